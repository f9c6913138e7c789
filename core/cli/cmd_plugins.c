/* peftref plugins: list the techniques found as plugins and why any file
 * was refused, and print everything about one technique (inspect). */
#include "config.h"

#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "names.h"
#include "peftref/module.h"

static const char plugins_usage[] =
    "usage: peftref plugins [list]\n"
    "       peftref plugins inspect NAME [--model DIR | --preset NAME]\n"
    "       peftref plugins check PATH [--verbose]   (see 'peftref plugins check --help')\n"
    "\n"
    "List the PEFT techniques found as plugins, with the file each came from,\n"
    "and every file that was refused with the reason; or describe one\n"
    "technique: typology, options, sites, parameters.\n"
    "\n"
    "Plugins are searched, first found first:\n"
    "  1. the directories of $PEFTREF_PLUGIN_PATH (colon-separated);\n"
    "  2. <directory of this program>/plugins/.libs, when it runs from a\n"
    "     build tree;\n"
    "  3. the installed directory " PEFTREF_PLUGINSDIR ".\n"
    "In each directory every *.so file is a plugin, and every subdirectory\n"
    "holding a manifest.json is a technique pack whose *.so files must provide\n"
    "exactly the techniques the manifest lists.  A technique name found again\n"
    "later in the search is refused.\n"
    "\n"
    "Each plugin is first loaded in a child process: one that crashes or hangs\n"
    "while loading is refused with the reason, and the verdict is cached by the\n"
    "file's path, size and modification time in $PEFTREF_REGISTRY_CACHE (a\n"
    "path, or 'off'), else $XDG_CACHE_HOME/peftref/registry-cache.json or\n"
    "~/.cache/peftref/registry-cache.json.  $PEFTREF_SCAN_TIMEOUT: seconds a\n"
    "plugin may take to load (default 10).\n"
    "\n"
    "  -h, --help    show this help\n";

static const char inspect_usage[] =
    "usage: peftref plugins inspect NAME [--model DIR | --preset NAME]\n"
    "\n"
    "Describe technique NAME: identity, origin, its PEFT-Ref typology (Sabry &\n"
    "Belz 2023), options with types, defaults and ranges, the sites it may\n"
    "attach to, its parameter declarations, and what it adds to a model with\n"
    "its default sites.\n"
    "\n"
    "  --model DIR     count for the model in Hugging Face directory DIR\n"
    "  --preset NAME   count for a preset shape (default gpt2-small)\n"
    "  -h, --help      show this help\n";

/* ---- the typology in the paper's words ------------------------------------ */

static const char *word(const char *const *names, int n, int v)
{
    return v >= 1 && v <= n ? names[v - 1] : "?";
}

#define WORD(table, v) word(table, (int)(sizeof table / sizeof table[0]), v)

static const char *const intra_words[] = {"none (free vectors)", "dense", "factorised (low-rank, Kronecker)",
                                          "attention"};
static const char *const inter_words[] = {"fixed", "dynamic (reaches the model through attention weights)"};
static const char *const adaptation_words[] = {"addition", "reparameterisation", "rescaling",
                                               "selection (trains existing base tensors)"};
static const char *const sharing_words[] = {"none", "across layers", "across sites"};
static const char *const input_words[] = {"hidden states", "token embeddings", "the frozen weights themselves",
                                          "none"};
static const char *const insertion_words[] = {"sequential (module reads the site output)",
                                              "parallel (module reads the site input)",
                                              "concatenative (prepends positions)", "in-place (nothing inserted)"};
static const char *const insertions_words[] = {"1 (once per model)", "L (one per chosen layer)",
                                               "sites x L (one per chosen site and layer)",
                                               "none (selection)"};
static const char *const integration_words[] = {"concatenation", "direct addition", "scaled addition",
                                                "gated addition", "rescaling", "weight delta",
                                                "custom (the technique's own)", "selection"};
/* Short forms for the listing table. */
static const char *const integration_short[] = {"concatenation", "direct-addition", "scaled-addition",
                                                "gated-addition", "rescaling", "weight-delta", "custom",
                                                "selection"};
static const char *const option_types[] = {"int", "float", "bool", "enum", "string"};
static const char *const scope_words[] = {"per insertion", "per layer", "per site", "global"};

/* Print text wrapped to width columns.  The cursor stands at column col
 * of the first line; continuation lines are indented by indent. */
static void print_wrapped_at(const char *text, int col, int indent, int width)
{
    const char *p = text;
    int first = 1;
    while (*p == ' ')
        p++;
    while (*p) {
        int avail = width - (first ? col : indent), len = (int)strlen(p), cut = len;
        if (avail < 20)
            avail = 20;
        if (len > avail) {
            cut = avail;
            while (cut > 0 && p[cut] != ' ')
                cut--;
            if (cut == 0) {
                cut = avail;
                while (p[cut] && p[cut] != ' ')
                    cut++;
            }
        }
        printf("%*s%.*s\n", first ? 0 : indent, "", cut, p);
        first = 0;
        p += cut;
        while (*p == ' ')
            p++;
    }
    if (first)
        putchar('\n');
}

static void print_wrapped(const char *text, int indent, int width)
{
    printf("%*s", indent, "");
    print_wrapped_at(text, indent, indent, width);
}

#define FIELD_COL 24

static void print_field(const char *label, const char *value)
{
    printf("  %-*s", FIELD_COL - 2, label);
    print_wrapped_at(value && *value ? value : "(none)", FIELD_COL, FIELD_COL, 78);
}


static void workspace_list(uint32_t ws, char *buf, size_t len)
{
    static const char *const names[] = {"embedding", "attention", "ffn", "norm", "head"};
    buf[0] = '\0';
    size_t n = 0;
    for (int i = 0; i < 5; i++)
        if (ws & (1u << i)) {
            int w = snprintf(buf + n, len - n, "%s%s", n ? ", " : "", names[i]);
            if (w < 0 || (size_t)w >= len - n)
                break;
            n += (size_t)w;
        }
    if (!n)
        snprintf(buf, len, "(none)");
}

static void init_text(const pr_param_decl *p, char *buf, size_t len)
{
    const char *arg = p->init_arg ? p->init_arg : "0";
    switch (p->init) {
    case PR_INIT_ZEROS: snprintf(buf, len, "zeros"); break;
    case PR_INIT_ONES: snprintf(buf, len, "ones"); break;
    case PR_INIT_NORMAL: snprintf(buf, len, "normal(0, %s)", arg); break;
    case PR_INIT_UNIFORM: snprintf(buf, len, "uniform(-%s, %s)", arg, arg); break;
    case PR_INIT_KAIMING_UNIFORM: snprintf(buf, len, "kaiming-uniform(a = %s)", arg); break;
    case PR_INIT_EMBED_ROWS: snprintf(buf, len, "rows of the token embedding"); break;
    case PR_INIT_TEXT: snprintf(buf, len, "embeddings of the text of option %s", p->init_source ? p->init_source : "?"); break;
    case PR_INIT_CONSTANT: snprintf(buf, len, "constant %s", arg); break;
    case PR_INIT_CUSTOM: snprintf(buf, len, "custom (init callback)"); break;
    default: snprintf(buf, len, "?"); break;
    }
}

static void option_default(const pr_option_decl *o, char *buf, size_t len)
{
    switch (o->type) {
    case PR_OPT_BOOL: snprintf(buf, len, "%s", o->def != 0 ? "true" : "false"); break;
    case PR_OPT_ENUM: snprintf(buf, len, "%s", o->choices ? o->choices[(int)o->def] : "?"); break;
    case PR_OPT_STRING: snprintf(buf, len, "\"%s\"", o->def_str ? o->def_str : ""); break;
    default: snprintf(buf, len, "%g", o->def); break;
    }
}

/* One line without its trailing blanks. */
static void print_line(char *line)
{
    size_t n = strlen(line);
    while (n && line[n - 1] == ' ')
        line[--n] = '\0';
    puts(line);
}

static void print_options(const pr_technique *t)
{
    printf("\nOptions:\n");
    if (t->n_options == 0) {
        printf("  (none)\n");
        return;
    }
    for (uint32_t i = 0; i < t->n_options; i++) {
        const pr_option_decl *o = &t->options[i];
        char def[128], range[256] = "";
        option_default(o, def, sizeof def);
        if (o->type == PR_OPT_INT || o->type == PR_OPT_FLOAT)
            snprintf(range, sizeof range, "range [%g, %g]", o->min, o->max);
        else if (o->type == PR_OPT_ENUM && o->choices) {
            size_t n = (size_t)snprintf(range, sizeof range, "choices:");
            for (int k = 0; o->choices[k] && n < sizeof range; k++)
                n += (size_t)snprintf(range + n, sizeof range - n, "%s %s", k ? "," : "", o->choices[k]);
        }
        char line[512];
        snprintf(line, sizeof line, "  %-16s %-7s default %-10s %s%s%s", o->name, WORD(option_types, o->type), def,
                 range, *range && o->per_site ? "  " : "", o->per_site ? "per-site" : "");
        print_line(line);
        if (o->help)
            print_wrapped(o->help, 19, 78);
    }
}

static void print_buffers(const char *title, const pr_buffer_decl *b, uint32_t n)
{
    if (!n)
        return;
    printf("\n%s:\n", title);
    for (uint32_t i = 0; i < n; i++)
        printf("  %-16s [%s]\n", b[i].name, b[i].shape);
}

static void print_params(const pr_technique *t, const char *title, const pr_param_decl *ps, uint32_t n)
{
    printf("\n%s:\n", title);
    if (!n) {
        printf("  (none)\n");
        return;
    }
    for (uint32_t i = 0; i < n; i++) {
        const pr_param_decl *p = &ps[i];
        char init[160], shape[160];
        init_text(p, init, sizeof init);
        if (p->init_option) {
            /* The enum option's choice overrides init; show its default. */
            const char *def = "?";
            for (uint32_t k = 0; k < t->n_options; k++)
                if (strcmp(t->options[k].name, p->init_option) == 0 && t->options[k].choices)
                    def = t->options[k].choices[(int)t->options[k].def];
            snprintf(init, sizeof init, "by option %s (default %s)", p->init_option, def);
        }
        snprintf(shape, sizeof shape, "[%s]", p->shape);
        printf("  %-16s %-18s %-28s  %s%s%s%s\n", p->name, shape, init, WORD(scope_words, p->scope),
               p->flags & PR_PARAM_NO_DECAY ? ", no-decay" : "",
               p->flags & PR_PARAM_TRAINING_ONLY ? ", training-only" : "",
               p->flags & PR_PARAM_FROZEN ? ", frozen" : "");
        if (p->help)
            print_wrapped(p->help, 19, 78);
    }
}

static void print_selection(const pr_technique *t)
{
    static const char *const kinds[] = {"projection weights", "projection biases", "norm gains", "norm biases",
                                        "embedding tables"};
    char ws[128];
    workspace_list(t->workspace, ws, sizeof ws);
    printf("\nSelected base tensors (in %s):\n ", ws);
    for (int i = 0; i < 5; i++)
        if (t->select_kinds & (1u << i))
            printf(" %s;", kinds[i]);
    putchar('\n');
}

static void print_callbacks(const pr_technique *t)
{
    printf("\nCallbacks:\n ");
    struct {
        const char *name;
        int present;
    } cb[] = {
        {"forward", t->forward != NULL},   {"backward", t->backward != NULL},
        {"integrate_forward", t->integrate_forward != NULL},
        {"integrate_backward", t->integrate_backward != NULL},
        {"merge", t->merge != NULL},       {"setup", t->setup != NULL},
        {"init", t->init != NULL},         {"fold", t->fold != NULL},
        {"scale", t->scale != NULL},       {"teardown", t->teardown != NULL},
    };
    int any = 0;
    for (size_t i = 0; i < sizeof cb / sizeof cb[0]; i++)
        if (cb[i].present) {
            printf(" %s", cb[i].name);
            any = 1;
        }
    printf("%s\n", any ? "" : " (none)");
    printf("  mergeable into the frozen weights: %s\n", t->merge ? "yes" : "no");
}

static void print_page(const pr_technique *t, const char *origin)
{
    char buf[512];
    printf("Technique Details:\n");
    print_field("Name", t->name);
    print_field("Version", t->version);
    print_field("Summary", t->summary);
    print_field("Citation", t->citation);
    print_field("License", t->license);
    print_field("Origin", origin);

    printf("\nTypology (PEFT-Ref, Sabry & Belz 2023, arXiv 2304.12410):\n");
    print_field("intra-connectivity", WORD(intra_words, t->intra));
    print_field("inter-connectivity", WORD(inter_words, t->inter));
    print_field("parameter adaptation", WORD(adaptation_words, t->adaptation));
    char sharing[64];
    cli_sharing_text(t, sharing_words, (int)(sizeof sharing_words / sizeof sharing_words[0]), sharing, sizeof sharing);
    print_field("parameter sharing", sharing);
    print_field("input type", WORD(input_words, t->input));
    print_field("insertion form", WORD(insertion_words, t->insertion));
    print_field("number of insertions", WORD(insertions_words, t->insertions));
    if (t->integration == PR_INTEGRATE_SCALED_ADD) {
        snprintf(buf, sizeof buf, "scaled addition, s = %s",
                 t->scale_expr ? t->scale_expr : "computed by the technique's scale()");
        print_field("integration form", buf);
    } else {
        print_field("integration form", WORD(integration_words, t->integration));
    }
    workspace_list(t->workspace, buf, sizeof buf);
    print_field("workspace", buf);

    print_options(t);

    printf("\nSites:\n");
    names_site_mask(t->sites, "(none)", buf, sizeof buf);
    print_field("allowed", buf);
    names_site_mask(t->default_sites, "(none)", buf, sizeof buf);
    print_field("default", buf);

    if (t->integration == PR_INTEGRATE_SELECT)
        print_selection(t);
    print_params(t, "Parameters", t->params, t->n_params);
    if (t->n_fold_params)
        print_params(t, "Parameters after fold (saved form)", t->fold_params, t->n_fold_params);
    print_buffers("Saved for backward (per insertion)", t->saved, t->n_saved);
    print_buffers("Scratch (lent per call)", t->scratch, t->n_scratch);

    printf("\nShapes:\n");
    print_field("module input width", t->module_in ? t->module_in : "d_in");
    print_field("module output width", t->module_out ? t->module_out : "d_out");
    if (t->n_virtual)
        print_field("virtual positions", t->n_virtual);
    print_field("trainable parameters", t->param_formula);

    print_callbacks(t);
}

/* What attaching the technique with its default sites and options adds to
 * a model of shape cfg (pr_module_plan_for: nothing is allocated). */
static void print_plan(const pr_technique *t, const pr_model_config *cfg, const char *model_label)
{
    char sites[256];
    names_site_mask(t->default_sites, "(none)", sites, sizeof sites);
    printf("\nOn %s (%d layers, d_model %d, d_ff %d, vocab %d), default sites and options:\n", model_label,
           cfg->n_layers, cfg->d_model, cfg->d_ff, cfg->vocab_size);
    pr_module_spec spec;
    memset(&spec, 0, sizeof spec);
    spec.technique = t;
    spec.trainable = 1;
    pr_module_plan plan;
    pr_error err = {0};
    if (pr_module_plan_for(cfg, &spec, &plan, &err) != PR_OK) {
        printf("  cannot attach: %s\n", err.msg);
        return;
    }
    char buf[256];
    names_site_mask(plan.sites, "(none)", sites, sizeof sites);
    print_field("sites used", sites);
    snprintf(buf, sizeof buf, "%d", plan.layers_used);
    print_field("layers used", buf);
    snprintf(buf, sizeof buf, "%d", plan.insertions);
    print_field("insertions", buf);
    int64_t base = pr_config_param_count(cfg);
    snprintf(buf, sizeof buf, "%lld (%.4f%% of the model's %lld)", (long long)plan.params,
             base > 0 ? 100.0 * (double)plan.params / (double)base : 0.0, (long long)base);
    print_field("module parameters", buf);
    snprintf(buf, sizeof buf, "%lld", (long long)plan.trainable);
    print_field("trainable", buf);
    if (plan.base_selected || t->integration == PR_INTEGRATE_SELECT) {
        snprintf(buf, sizeof buf, "%lld (%.4f%%)", (long long)plan.base_selected,
                 base > 0 ? 100.0 * (double)plan.base_selected / (double)base : 0.0);
        print_field("base elements trained", buf);
    }
}

/* ---- subcommands ------------------------------------------------------------ */

static int open_registry(const char *cmd, pr_registry **reg)
{
    pr_error err = {0};
    if (pr_registry_open(NULL, reg, &err)) {
        fprintf(stderr, "peftref %s: %s\n", cmd, err.msg);
        return 1;
    }
    return 0;
}

static int finish_output(const char *cmd)
{
    if (fflush(stdout) != 0 || ferror(stdout)) {
        fprintf(stderr, "peftref %s: writing to standard output: %s\n", cmd, strerror(errno));
        return 1;
    }
    return 0;
}

static int plugins_list(void)
{
    pr_registry *reg = NULL;
    if (open_registry("plugins", &reg))
        return 1;
    int n = pr_registry_count(reg);
    int w_name = 4, w_ver = 7, w_int = 11;
    for (int i = 0; i < n; i++) {
        const pr_technique *t = pr_registry_technique(reg, i);
        int a = (int)strlen(t->name), b = t->version ? (int)strlen(t->version) : 1;
        int c = (int)strlen(WORD(integration_short, t->integration));
        w_name = a > w_name ? a : w_name;
        w_ver = b > w_ver ? b : w_ver;
        w_int = c > w_int ? c : w_int;
    }
    if (n == 0) {
        printf("no techniques found (set PEFTREF_PLUGIN_PATH; 'peftref plugins --help' lists where peftref "
               "searches)\n");
    } else {
        printf("%-*s  %-*s  %-*s  %s\n", w_name, "NAME", w_ver, "VERSION", w_int, "INTEGRATION", "ORIGIN");
        for (int i = 0; i < n; i++) {
            const pr_technique *t = pr_registry_technique(reg, i);
            printf("%-*s  %-*s  %-*s  %s\n", w_name, t->name, w_ver, t->version ? t->version : "-", w_int,
                   WORD(integration_short, t->integration), pr_registry_origin(reg, i));
        }
    }
    int nr = pr_registry_refused_count(reg);
    if (nr) {
        printf("refused:\n");
        for (int i = 0; i < nr; i++) {
            const char *path, *reason;
            pr_registry_refused(reg, i, &path, &reason);
            printf("  %s: %s\n", path, reason);
        }
    }
    pr_registry_free(reg);
    return finish_output("plugins");
}

static int plugins_inspect(int argc, char **argv)
{
    static const struct option opts[] = {{"model", required_argument, 0, 'm'},
                                         {"preset", required_argument, 0, 'p'},
                                         {"help", no_argument, 0, 'h'},
                                         {0, 0, 0, 0}};
    const char *model_dir = NULL, *preset = NULL;
    optind = 1;
    opterr = 0;
    int c;
    while ((c = getopt_long(argc, argv, ":h", opts, NULL)) != -1) {
        switch (c) {
        case 'm': model_dir = optarg; break;
        case 'p': preset = optarg; break;
        case 'h': fputs(inspect_usage, stdout); return 0;
        case ':':
            fprintf(stderr, "peftref plugins inspect: option '%s' needs a value\n%s", argv[optind - 1],
                    inspect_usage);
            return 2;
        default:
            fprintf(stderr, "peftref plugins inspect: unknown option '%s'\n%s", argv[optind - 1], inspect_usage);
            return 2;
        }
    }
    if (model_dir && preset) {
        fprintf(stderr, "peftref plugins inspect: give --model or --preset, not both\n%s", inspect_usage);
        return 2;
    }
    if (argc - optind != 1) {
        fprintf(stderr, "peftref plugins inspect: give one technique NAME\n%s", inspect_usage);
        return 2;
    }
    const char *name = argv[optind];

    pr_model_config cfg;
    if (!model_dir && pr_config_preset(preset ? preset : "gpt2-small", &cfg) != PR_OK) {
        fprintf(stderr, "peftref plugins inspect: unknown preset '%s' (known: %s)\n", preset, pr_config_preset_names());
        return 2;
    }
    pr_registry *reg = NULL;
    if (open_registry("plugins inspect", &reg))
        return 1;
    int rc = 1;
    pr_model *model = NULL;
    const pr_technique *t = pr_registry_find(reg, name);
    if (!t) {
        const char *s = pr_registry_suggest(reg, name);
        if (s)
            fprintf(stderr, "peftref plugins inspect: no technique named '%s'; did you mean '%s'?\n", name, s);
        else
            fprintf(stderr, "peftref plugins inspect: no technique named '%s' ('peftref plugins' lists them)\n",
                    name);
        goto done;
    }
    const char *origin = NULL;
    for (int i = 0; i < pr_registry_count(reg); i++)
        if (pr_registry_technique(reg, i) == t)
            origin = pr_registry_origin(reg, i);
    cli_warn_shadowed("plugins inspect", reg, name);
    if (model_dir) {
        /* The model's shape is all the count needs; its weights are mapped, not read. */
        pr_error err = {0};
        if (cli_load_model(model_dir, NULL, -1, &model, &err) != PR_OK) {
            fprintf(stderr, "peftref plugins inspect: %s\n", err.msg);
            goto done;
        }
        cfg = *pr_model_get_config(model);
    }
    print_page(t, origin);
    print_plan(t, &cfg, model_dir ? model_dir : preset ? preset : "gpt2-small");
    rc = finish_output("plugins inspect");
done:
    pr_model_free(model);
    pr_registry_free(reg);
    return rc;
}

int cmd_plugins(int argc, char **argv)
{
    if (argc < 2)
        return plugins_list();
    const char *sub = argv[1];
    if (strcmp(sub, "--help") == 0 || strcmp(sub, "-h") == 0 || strcmp(sub, "help") == 0) {
        fputs(plugins_usage, stdout);
        return 0;
    }
    if (strcmp(sub, "list") == 0) {
        if (argc > 2 && (strcmp(argv[2], "--help") == 0 || strcmp(argv[2], "-h") == 0)) {
            fputs(plugins_usage, stdout);
            return 0;
        }
        if (argc > 2) {
            fprintf(stderr, "peftref plugins list: unexpected argument '%s'\n%s", argv[2], plugins_usage);
            return 2;
        }
        return plugins_list();
    }
    if (strcmp(sub, "inspect") == 0)
        return plugins_inspect(argc - 1, argv + 1);
    if (strcmp(sub, "check") == 0)
        return cmd_plugins_check(argc - 1, argv + 1);
    fprintf(stderr, "peftref plugins: unknown subcommand '%s'\n%s", sub, plugins_usage);
    return 2;
}
