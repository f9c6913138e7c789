/* peftref typology: the PEFT-Ref table (Sabry & Belz 2023, arXiv
 * 2304.12410) of every technique the plugin registry finds, built-in or
 * third-party: one row per technique, one column per typology dimension,
 * then mergeability and the trainable-parameter formula.
 *
 * The values are written in DESIGN.md §1's words (the typology table's
 * spellings).  The number of insertions is the technique's rule evaluated
 * on its default sites: per-layer sites count L each and model-level sites
 * 1 each, so (IA)^3's three per-layer sites read "3L".
 *
 * Formats: aligned text (default), a Markdown table, CSV (RFC 4180: CRLF
 * line ends, fields with a comma, quote or line break quoted, quotes
 * doubled) and JSON (an array of objects, workspace an array of names,
 * mergeable a boolean). */
#include "config.h"

#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "cli.h"
#include "peftref/module.h"

static const char typology_usage[] =
    "usage: peftref typology [--format text|markdown|csv|json]\n"
    "\n"
    "Print the PEFT-Ref typology (Sabry & Belz 2023) of every technique found\n"
    "as a plugin (see 'peftref plugins --help' for where they are searched):\n"
    "intra-connectivity, inter-connectivity, parameter adaptation, parameter\n"
    "sharing, input type, insertion form, number of insertions (on the\n"
    "technique's default sites), integration form and workspace, whether it\n"
    "can be merged into the frozen weights, and its trainable-parameter\n"
    "formula.  One row per technique, sorted by name.\n"
    "\n"
    "  -f, --format F  text (aligned columns, the default), markdown, csv\n"
    "                  (RFC 4180) or json (an array of objects)\n"
    "  -h, --help      show this help\n";

/* ---- the words of DESIGN.md §1 ------------------------------------------- */

static const char *const intra_words[] = {"none", "dense", "factorised", "attention"};
static const char *const inter_words[] = {"fixed", "dynamic"};
static const char *const adaptation_words[] = {"addition", "reparameterisation", "rescaling", "selection"};
static const char *const sharing_words[] = {"none", "across-layers", "across-sites"};
static const char *const input_words[] = {"hidden-states", "embeddings", "weights", "none"};
static const char *const insertion_words[] = {"sequential", "parallel", "concatenative", "in-place"};
static const char *const integration_words[] = {"concatenation", "direct-addition", "scaled-addition",
                                                "gated-addition", "rescaling", "weight-delta", "custom",
                                                "selection"};
static const char *const workspace_words[] = {"embedding", "attention", "ffn", "norm", "head"};

static const char *word(const char *const *names, int n, int v)
{
    return v >= 1 && v <= n ? names[v - 1] : "?";
}

#define WORD(table, v) word(table, (int)(sizeof table / sizeof table[0]), v)

/* ---- rows -------------------------------------------------------------------- */

enum {
    COL_TECHNIQUE,
    COL_INTRA,
    COL_INTER,
    COL_ADAPTATION,
    COL_SHARING,
    COL_INPUT,
    COL_INSERTION,
    COL_INSERTIONS,
    COL_INTEGRATION,
    COL_WORKSPACE,
    COL_MERGE,
    COL_PARAMS,
    N_COLS
};

/* Header words (text and Markdown) and keys (CSV header and JSON). */
static const char *const col_titles[N_COLS] = {
    "technique", "intra-connectivity", "inter-connectivity", "parameter adaptation", "parameter sharing",
    "input type", "insertion form", "insertions", "integration form", "workspace", "merge", "trainable parameters",
};
static const char *const col_keys[N_COLS] = {
    "technique", "intra_connectivity", "inter_connectivity", "parameter_adaptation", "parameter_sharing",
    "input_type", "insertion_form", "insertions", "integration_form", "workspace", "mergeable", "param_formula",
};

typedef struct row {
    const pr_technique *t;
    char cell[N_COLS][512];
} row;

/* "3L", "L", "2L + 1", "1", "none": the rule on the default sites. */
static void insertions_text(const pr_technique *t, char *buf, size_t len)
{
    switch (t->insertions) {
    case PR_INSERTIONS_ONCE: snprintf(buf, len, "1"); return;
    case PR_INSERTIONS_PER_LAYER: snprintf(buf, len, "L"); return;
    case PR_INSERTIONS_NONE: snprintf(buf, len, "none"); return;
    case PR_INSERTIONS_PER_SITE_LAYER: break;
    default: snprintf(buf, len, "?"); return;
    }
    int per_layer = 0, model_level = 0;
    for (int s = 0; s < PR_SITE_COUNT; s++)
        if (t->default_sites & PR_SITE_BIT(s)) {
            if (pr_site_is_per_layer(s))
                per_layer++;
            else
                model_level++;
        }
    char l[32] = "";
    if (per_layer == 1)
        snprintf(l, sizeof l, "L");
    else if (per_layer > 1)
        snprintf(l, sizeof l, "%dL", per_layer);
    if (*l && model_level)
        snprintf(buf, len, "%s + %d", l, model_level);
    else if (*l)
        snprintf(buf, len, "%s", l);
    else
        snprintf(buf, len, "%d", model_level);
}

static void workspace_text(uint32_t ws, char *buf, size_t len)
{
    size_t n = 0;
    buf[0] = '\0';
    for (int i = 0; i < 5; i++)
        if (ws & (1u << i)) {
            int w = snprintf(buf + n, len - n, "%s%s", n ? ", " : "", workspace_words[i]);
            if (w < 0 || (size_t)w >= len - n)
                break;
            n += (size_t)w;
        }
    if (!n)
        snprintf(buf, len, "none");
}

static void row_fill(row *r, const pr_technique *t)
{
    r->t = t;
    snprintf(r->cell[COL_TECHNIQUE], sizeof r->cell[0], "%s", t->name);
    snprintf(r->cell[COL_INTRA], sizeof r->cell[0], "%s", WORD(intra_words, t->intra));
    snprintf(r->cell[COL_INTER], sizeof r->cell[0], "%s", WORD(inter_words, t->inter));
    snprintf(r->cell[COL_ADAPTATION], sizeof r->cell[0], "%s", WORD(adaptation_words, t->adaptation));
    cli_sharing_text(t, sharing_words, (int)(sizeof sharing_words / sizeof sharing_words[0]), r->cell[COL_SHARING],
                     sizeof r->cell[0]);
    snprintf(r->cell[COL_INPUT], sizeof r->cell[0], "%s", WORD(input_words, t->input));
    snprintf(r->cell[COL_INSERTION], sizeof r->cell[0], "%s", WORD(insertion_words, t->insertion));
    insertions_text(t, r->cell[COL_INSERTIONS], sizeof r->cell[0]);
    snprintf(r->cell[COL_INTEGRATION], sizeof r->cell[0], "%s", WORD(integration_words, t->integration));
    workspace_text(t->workspace, r->cell[COL_WORKSPACE], sizeof r->cell[0]);
    snprintf(r->cell[COL_MERGE], sizeof r->cell[0], "%s", t->merge ? "yes" : "no");
    snprintf(r->cell[COL_PARAMS], sizeof r->cell[0], "%s", t->param_formula ? t->param_formula : "");
    /* one line per cell, whatever a third-party formula holds */
    for (char *p = r->cell[COL_PARAMS]; *p; p++)
        if (*p == '\n' || *p == '\r' || *p == '\t')
            *p = ' ';
}

static int row_cmp(const void *a, const void *b)
{
    return strcmp(((const row *)a)->t->name, ((const row *)b)->t->name);
}

/* ---- formats ------------------------------------------------------------------ */

/* Aligned columns, two spaces apart; the last column is not padded. */
static void print_text(const row *rows, int n)
{
    int w[N_COLS];
    for (int c = 0; c < N_COLS; c++) {
        w[c] = (int)strlen(col_titles[c]);
        for (int i = 0; i < n; i++) {
            int l = (int)strlen(rows[i].cell[c]);
            w[c] = l > w[c] ? l : w[c];
        }
    }
    for (int i = -1; i < n; i++)
        for (int c = 0; c < N_COLS; c++) {
            const char *s = i < 0 ? col_titles[c] : rows[i].cell[c];
            if (c == N_COLS - 1)
                printf("%s\n", s);
            else
                printf("%-*s  ", w[c], s);
        }
}

static void md_cell(const char *s)
{
    putchar(' ');
    for (; *s; s++) {
        if (*s == '|')
            putchar('\\');
        putchar(*s);
    }
    fputs(" |", stdout);
}

static void print_markdown(const row *rows, int n)
{
    putchar('|');
    for (int c = 0; c < N_COLS; c++)
        md_cell(col_titles[c]);
    fputs("\n|", stdout);
    for (int c = 0; c < N_COLS; c++)
        fputs("---|", stdout);
    putchar('\n');
    for (int i = 0; i < n; i++) {
        putchar('|');
        for (int c = 0; c < N_COLS; c++)
            md_cell(rows[i].cell[c]);
        putchar('\n');
    }
}

/* RFC 4180 field: quoted when it holds a comma, a quote or a line break. */
static void csv_field(const char *s)
{
    if (!strpbrk(s, ",\"\r\n")) {
        fputs(s, stdout);
        return;
    }
    putchar('"');
    for (; *s; s++) {
        if (*s == '"')
            putchar('"');
        putchar(*s);
    }
    putchar('"');
}

static void print_csv(const row *rows, int n)
{
    for (int i = -1; i < n; i++) {
        for (int c = 0; c < N_COLS; c++) {
            if (c)
                putchar(',');
            csv_field(i < 0 ? col_keys[c] : rows[i].cell[c]);
        }
        fputs("\r\n", stdout);
    }
}

static int print_json(const row *rows, int n)
{
    json_t *arr = json_array();
    if (!arr)
        return -1;
    for (int i = 0; i < n; i++) {
        json_t *o = json_object();
        if (!o || json_array_append_new(arr, o)) {
            json_decref(arr);
            return -1;
        }
        for (int c = 0; c < N_COLS; c++) {
            json_t *v;
            if (c == COL_WORKSPACE) {
                v = json_array();
                for (int k = 0; v && k < 5; k++)
                    if (rows[i].t->workspace & (1u << k))
                        json_array_append_new(v, json_string(workspace_words[k]));
            } else if (c == COL_MERGE) {
                v = json_boolean(rows[i].t->merge != NULL);
            } else {
                v = json_string(rows[i].cell[c]);
                if (!v) /* a third-party string that is not UTF-8 */
                    v = json_string("?");
            }
            if (!v || json_object_set_new(o, col_keys[c], v)) {
                json_decref(arr);
                return -1;
            }
        }
    }
    int rc = json_dumpf(arr, stdout, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
    json_decref(arr);
    if (rc)
        return -1;
    putchar('\n');
    return 0;
}

/* ---- the command ---------------------------------------------------------------- */

enum { FMT_TEXT, FMT_MARKDOWN, FMT_CSV, FMT_JSON };

int cmd_typology(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"format", required_argument, NULL, 'f'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    int fmt = FMT_TEXT, c;
    optind = 1;
    opterr = 0;
    while ((c = getopt_long(argc, argv, ":f:h", longopts, NULL)) != -1) {
        switch (c) {
        case 'f':
            if (strcmp(optarg, "text") == 0)
                fmt = FMT_TEXT;
            else if (strcmp(optarg, "markdown") == 0 || strcmp(optarg, "md") == 0)
                fmt = FMT_MARKDOWN;
            else if (strcmp(optarg, "csv") == 0)
                fmt = FMT_CSV;
            else if (strcmp(optarg, "json") == 0)
                fmt = FMT_JSON;
            else {
                fprintf(stderr, "peftref typology: unknown format '%s' (text, markdown, csv or json)\n", optarg);
                return 2;
            }
            break;
        case 'h':
            fputs(typology_usage, stdout);
            return 0;
        case ':':
            fprintf(stderr, "peftref typology: option '%s' needs a value\n%s", argv[optind - 1], typology_usage);
            return 2;
        default:
            fprintf(stderr, "peftref typology: unknown option '%s'\n%s", argv[optind - 1], typology_usage);
            return 2;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "peftref typology: unexpected argument '%s'\n%s", argv[optind], typology_usage);
        return 2;
    }

    pr_registry *reg = NULL;
    pr_error err = {0};
    if (pr_registry_open(NULL, &reg, &err)) {
        fprintf(stderr, "peftref typology: %s\n", err.msg);
        return 1;
    }
    int n = pr_registry_count(reg), rc = 1;
    row *rows = calloc((size_t)(n ? n : 1), sizeof *rows);
    if (!rows) {
        fprintf(stderr, "peftref typology: out of memory\n");
        goto done;
    }
    for (int i = 0; i < n; i++)
        row_fill(&rows[i], pr_registry_technique(reg, i));
    qsort(rows, (size_t)n, sizeof *rows, row_cmp);
    if (pr_registry_refused_count(reg) > 0)
        fprintf(stderr, "peftref typology: %d plugin file(s) refused; 'peftref plugins' says why\n",
                pr_registry_refused_count(reg));

    switch (fmt) {
    case FMT_MARKDOWN: print_markdown(rows, n); break;
    case FMT_CSV: print_csv(rows, n); break;
    case FMT_JSON:
        if (print_json(rows, n)) {
            fprintf(stderr, "peftref typology: could not build the JSON output\n");
            goto done;
        }
        break;
    default: print_text(rows, n); break;
    }
    if (fflush(stdout) != 0 || ferror(stdout)) {
        fprintf(stderr, "peftref typology: writing to standard output: %s\n", strerror(errno));
        goto done;
    }
    rc = 0;
done:
    free(rows);
    pr_registry_free(reg);
    return rc;
}
