/* peftref plan: check a YAML pipeline and show what it would attach and
 * train, without training (and, for a preset or inline config, without
 * allocating the model). */
#include "config.h"

#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"

static const char plan_usage[] =
    "usage: peftref plan PIPELINE.yaml [--set KEY=VALUE ...] [--arm NAME]\n"
    "\n"
    "Check a pipeline (docs/pipeline.md) and print each module with its\n"
    "technique, sites, layers, insertions and parameter count, then one line\n"
    "in Hugging Face PEFT's format:\n"
    "  trainable params: N || all params: M || trainable%: P\n"
    "Nothing is trained.  Every problem in the file is reported as\n"
    "FILE:LINE:COL: message (1-based).\n"
    "\n"
    "  --set KEY=VALUE   override one value before checking, by its dotted path:\n"
    "                    train.steps=10, model.preset=gpt2-tiny,\n"
    "                    modules.0.options.r=4, modules.0.sites=[q,v]\n"
    "  --arm NAME        plan one arm of the file's compare section\n"
    "  -h, --help        show this help\n"
    "\n"
    "Exit status: 0 valid, 1 the pipeline has errors, 2 usage.\n";

int cli_is_pipeline(const char *s)
{
    size_t n = s ? strlen(s) : 0;
    return (n > 5 && strcmp(s + n - 5, ".yaml") == 0) || (n > 4 && strcmp(s + n - 4, ".yml") == 0);
}

static void print_line(void *arg, const char *line)
{
    (void)arg;
    fprintf(stderr, "%s\n", line);
}

/* cli_pipeline_open without the warnings about techniques offered twice. */
static int open_pipeline(const char *cmd, const char *path, const char *const *sets, int n_sets, pr_registry **reg,
                         pr_pipeline **pipe)
{
    pr_error err = { 0 };
    *pipe = NULL;
    if (pr_registry_open(NULL, reg, &err)) {
        fprintf(stderr, "peftref %s: %s\n", cmd, err.msg);
        return 1;
    }
    int rc = pr_pipeline_load_report(path, sets, n_sets, *reg, pipe, print_line, NULL, &err);
    if (rc == PR_ERR_INVALID)
        return 1;   /* the diagnostics are printed */
    if (rc) {
        fprintf(stderr, "peftref %s: %s\n", cmd, err.msg);
        return 1;
    }
    return 0;
}

int cli_pipeline_open(const char *cmd, const char *path, const char *const *sets, int n_sets, pr_registry **reg,
                      pr_pipeline **pipe)
{
    int rc = open_pipeline(cmd, path, sets, n_sets, reg, pipe);
    if (rc == 0)
        cli_warn_shadowed_pipeline(cmd, *reg, *pipe);
    return rc;
}

int cli_pipeline_open_arm(const char *cmd, const char *path, const char *const *sets, int n_sets, const char *arm,
                          pr_registry **reg, pr_pipeline **pipe)
{
    if (!arm)
        return cli_pipeline_open(cmd, path, sets, n_sets, reg, pipe);
    int rc = open_pipeline(cmd, path, sets, n_sets, reg, pipe);
    if (rc)
        return rc;
    int i = pr_pipeline_find_arm(*pipe, arm);
    if (i < 0) {
        char names[512];
        cli_arm_list(*pipe, names, sizeof names);
        if (pr_pipeline_n_arms(*pipe) == 0)
            fprintf(stderr, "peftref %s: --arm %s: %s has no compare section\n", cmd, arm, path);
        else
            fprintf(stderr, "peftref %s: --arm %s: no such arm in %s (its arms: %s)\n", cmd, arm, path, names);
        pr_pipeline_free(*pipe);
        *pipe = NULL;
        return 1;
    }
    pr_pipeline_free(*pipe);
    *pipe = NULL;
    pr_error err = { 0 };
    rc = pr_pipeline_load_arm(path, i, sets, n_sets, *reg, pipe, print_line, NULL, &err);
    if (rc && rc != PR_ERR_INVALID)
        fprintf(stderr, "peftref %s: %s\n", cmd, err.msg);
    if (rc == 0)
        cli_warn_shadowed_pipeline(cmd, *reg, *pipe);
    return rc ? 1 : 0;
}

void cli_arm_list(const pr_pipeline *pipe, char *buf, size_t len)
{
    size_t o = 0;
    buf[0] = '\0';
    for (int i = 0; i < pr_pipeline_n_arms(pipe); i++) {
        int w = snprintf(buf + o, len - o, "%s%s", i ? ", " : "", pr_pipeline_arm_name(pipe, i));
        if (w < 0 || (size_t)w >= len - o)
            break;
        o += (size_t)w;
    }
}

int cli_pipeline_print_counts(const char *cmd, const pr_pipeline *pipe, FILE *out)
{
    pr_pipeline_counts c;
    pr_error err = { 0 };
    if (pr_pipeline_counts_get(pipe, &c, &err)) {
        fprintf(stderr, "peftref %s: %s\n", cmd, err.msg);
        return 1;
    }
    char line[256];
    pr_pipeline_format_counts(&c, line, sizeof line);
    fprintf(out, "%s\n", line);
    return 0;
}

/* 1234567 -> "1,234,567" */
static void grouped(long long v, char *buf, size_t len)
{
    char d[32];
    snprintf(d, sizeof d, "%lld", v < 0 ? -v : v);
    size_t n = strlen(d), o = 0;
    if (v < 0 && o + 1 < len)
        buf[o++] = '-';
    for (size_t i = 0; i < n && o + 2 < len; i++) {
        if (i > 0 && (n - i) % 3 == 0)
            buf[o++] = ',';
        buf[o++] = d[i];
    }
    buf[o] = '\0';
}

static void site_names(uint32_t mask, char *buf, size_t len)
{
    size_t o = 0;
    buf[0] = '\0';
    for (int s = 0; s < PR_SITE_COUNT; s++)
        if (mask & PR_SITE_BIT(s)) {
            int w = snprintf(buf + o, len - o, "%s%s", o ? "," : "", pr_site_name(s));
            if (w < 0 || (size_t)w >= len - o)
                break;
            o += (size_t)w;
        }
    if (!buf[0])
        snprintf(buf, len, "-");
}

/* Sorted layer list as ranges: "0-3,7". */
static void layer_names(const int *layers, int n, char *buf, size_t len)
{
    if (!layers) {
        snprintf(buf, len, "all");
        return;
    }
    int sorted[4096];
    if (n > 4096)
        n = 4096;
    memcpy(sorted, layers, (size_t)n * sizeof *sorted);
    for (int i = 1; i < n; i++)
        for (int j = i; j > 0 && sorted[j - 1] > sorted[j]; j--) {
            int t = sorted[j];
            sorted[j] = sorted[j - 1];
            sorted[j - 1] = t;
        }
    size_t o = 0;
    buf[0] = '\0';
    for (int i = 0; i < n;) {
        int j = i;
        while (j + 1 < n && sorted[j + 1] == sorted[j] + 1)
            j++;
        int w = j > i ? snprintf(buf + o, len - o, "%s%d-%d", o ? "," : "", sorted[i], sorted[j])
                      : snprintf(buf + o, len - o, "%s%d", o ? "," : "", sorted[i]);
        if (w < 0 || (size_t)w >= len - o)
            break;
        o += (size_t)w;
        i = j + 1;
    }
}

static void print_plan(const pr_pipeline *p)
{
    const pr_model_config *c = pr_pipeline_model_config(p);
    const char *src = pr_pipeline_model_source(p) == PR_PIPELINE_MODEL_PATH     ? "directory"
                      : pr_pipeline_model_source(p) == PR_PIPELINE_MODEL_PRESET ? "preset"
                                                                                : "config";
    char n[32];
    grouped(pr_config_param_count(c), n, sizeof n);
    printf("pipeline: %s%s%s\n", pr_pipeline_path(p), pr_pipeline_arm(p) ? ", arm " : "",
           pr_pipeline_arm(p) ? pr_pipeline_arm(p) : "");
    static const char *const variants[] = { "LLaMA", "LLaMA", "Mistral", "Qwen2", "Qwen3" };
    char heads[48];
    if (c->n_kv_heads != c->n_heads)
        snprintf(heads, sizeof heads, "%d heads (%d key/value)", c->n_heads, c->n_kv_heads);
    else
        snprintf(heads, sizeof heads, "%d heads", c->n_heads);
    printf("model:    %s%s%s: %s, %d layers, d_model %d, %s, d_ff %d, vocab %d, max_seq %d; %s params, frozen\n",
           src, pr_pipeline_model_name(p) ? " " : "", pr_pipeline_model_name(p) ? pr_pipeline_model_name(p) : "",
           c->family == PR_FAMILY_LLAMA ? variants[c->variant >= 0 && c->variant <= 4 ? c->variant : 0] : "GPT-2",
           c->n_layers, c->d_model, heads, c->d_ff, c->vocab_size, c->max_seq, n);
    pr_train_config tc;
    pr_pipeline_train_config(p, &tc);
    printf("task:     %s on %s", tc.task, tc.train_path);
    if (tc.val_path)
        printf(", validation %s\n", tc.val_path);
    else
        printf(", validation %g of it held out\n", tc.val_fraction);
    printf("train:    %d steps, batch %d x %d tokens, accum %d, lr %g (%s), output %s\n", tc.steps, tc.batch,
           tc.seq_len, tc.accum, (double)tc.lr, tc.schedule, tc.out_dir);
    int nm = pr_pipeline_n_modules(p);
    if (pr_pipeline_n_arms(p) > 0 && !pr_pipeline_arm(p)) {
        char names[512];
        cli_arm_list(p, names, sizeof names);
        printf("compare:  %d arms: %s (plan one with --arm NAME; peftref compare runs them all)\n",
               pr_pipeline_n_arms(p), names);
        const char *at = NULL;
        int ranks = pr_pipeline_compare_mpi_ranks(p, &at);
        if (ranks > 1)
            printf("          each arm trains on %d MPI ranks (compare.mpi_ranks: mpirun -np %d peftref train)\n",
                   ranks, ranks);
        else if (at)
            printf("          each arm trains in one process (compare.mpi_ranks: 1)\n");
    }
    if (nm == 0) {
        printf("modules:  none\n");
        return;
    }
    printf("modules (at a shared site they apply in this order):\n");
    printf("  %-16s %-14s %-18s %-10s %10s %14s %14s\n", "name", "technique", "sites", "layers", "insertions",
           "params", "trainable");
    for (int i = 0; i < nm; i++) {
        pr_module_spec s;
        pr_pipeline_module_spec(p, i, &s);
        const pr_module_plan *pl = pr_pipeline_module_plan(p, i);
        if (!pl)
            continue;
        char sites[160], layers[160], params[32], trainable[32];
        site_names(pl->sites, sites, sizeof sites);
        int nl = 0;
        const int *ls = pr_pipeline_module_layers(p, i, &nl);
        layer_names(ls, nl, layers, sizeof layers);
        grouped(pl->params, params, sizeof params);
        grouped(pl->trainable + pl->base_selected, trainable, sizeof trainable);
        printf("  %-16s %-14s %-18s %-10s %10d %14s %14s\n", s.name, s.technique->name, sites, layers,
               pl->insertions, params, trainable);
        if (pl->base_selected) {
            grouped(pl->base_selected, params, sizeof params);
            printf("  %-16s selects %s base-model elements to train\n", "", params);
        }
        if (s.n_options > 0) {
            printf("  %-16s options:", "");
            for (int k = 0; k < s.n_options; k++) {
                if (s.options[k].site >= 0)
                    printf(" %s:%s=%s", pr_site_name(s.options[k].site), s.options[k].name, s.options[k].value);
                else
                    printf(" %s=%s", s.options[k].name, s.options[k].value);
            }
            printf("\n");
        }
    }
}

int cmd_plan(int argc, char **argv)
{
    static const struct option opts[] = { { "set", required_argument, 0, 's' },
                                           { "arm", required_argument, 0, 'a' },
                                           { "help", no_argument, 0, 'h' },
                                           { 0, 0, 0, 0 } };
    const char **sets = calloc((size_t)argc + 1, sizeof *sets);
    if (!sets) {
        fprintf(stderr, "peftref plan: out of memory\n");
        return 1;
    }
    int n_sets = 0, c;
    const char *arm = NULL;
    optind = 1;
    opterr = 0;
    while ((c = getopt_long(argc, argv, ":hs:", opts, NULL)) != -1) {
        switch (c) {
        case 's': sets[n_sets++] = optarg; break;
        case 'a': arm = optarg; break;
        case 'h': fputs(plan_usage, stdout); free(sets); return 0;
        case ':':
            fprintf(stderr, "peftref plan: option '%s' needs a value\n", argv[optind - 1]);
            free(sets);
            return 2;
        default:
            fprintf(stderr, "peftref plan: unknown option '%s' (see peftref plan --help)\n", argv[optind - 1]);
            free(sets);
            return 2;
        }
    }
    if (argc - optind != 1) {
        fprintf(stderr, "peftref plan: expected one pipeline file (see peftref plan --help)\n");
        free(sets);
        return 2;
    }
    pr_registry *reg = NULL;
    pr_pipeline *p = NULL;
    int rc = cli_pipeline_open_arm("plan", argv[optind], sets, n_sets, arm, &reg, &p);
    if (rc == 0) {
        print_plan(p);
        rc = cli_pipeline_print_counts("plan", p, stdout);
    }
    if (rc == 0 && (fflush(stdout) != 0 || ferror(stdout))) {
        fprintf(stderr, "peftref plan: writing to standard output: %s\n", strerror(errno));
        rc = 1;
    }
    pr_pipeline_free(p);
    pr_registry_free(reg);
    free(sets);
    return rc;
}
