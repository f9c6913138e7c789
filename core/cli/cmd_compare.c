/* peftref compare: train several pipelines, or the arms of one pipeline's
 * compare section, each in its own child process, on the same data with
 * the same seed and budget, and print the PEFT-Ref comparison table.
 *
 * A child process per arm isolates the arms from one another (a crash or
 * a NaN fails that arm only) and makes peak memory a per-arm number: the
 * child reads its own high-water mark (VmHWM, /proc/self/status) when its
 * training ends and sends it back with the training result, one JSON
 * object over a pipe.  The parent runs nothing heavy itself: it checks the
 * pipelines, plans them (parameter counts, inference overhead), forks, and
 * reads each arm's validation-loss curve from its metrics.jsonl; both
 * sides of the fork are core/cli/compare_run.c's. */
#include "config.h"

#include <errno.h>
#include <ftw.h>
#include <getopt.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#include "cli.h"
#include "compare.h"
#include "fileio.h"
#include "runtime.h"

static const char compare_usage[] =
    "usage: peftref compare PIPELINE.yaml [PIPELINE.yaml ...] [--set KEY=VALUE ...]\n"
    "                       [--format text|markdown|csv|json] [--out DIR] [--progress MODE] [--quiet]\n"
    "\n"
    "Train every arm on the same data with the same seed and budget, each in\n"
    "its own process, evaluate the untrained base model once, and print one\n"
    "row per arm: techniques, trainable parameters and their share of all,\n"
    "peak memory, time per step and tokens per second, inference overhead\n"
    "(extra positions, extra FLOPs per token unmerged and merged), final\n"
    "validation loss and perplexity (accuracy for classification).\n"
    "\n"
    "The arms are the entries of one pipeline's compare section, or the\n"
    "pipelines given (each one arm, or its own arms when it has a compare\n"
    "section); pipelines given together must agree on the model, data, seed\n"
    "and budget.  docs/pipeline.md, \"Compare arms\", describes the section\n"
    "and how each column is measured.\n"
    "\n"
    "  --set KEY=VALUE   override a value in every pipeline (as peftref train)\n"
    "  --format F        text (aligned, the default), markdown, csv or json\n"
    "  --out DIR         write DIR/table.{txt,md,csv,json} and DIR/curves.svg (every\n"
    "                    arm's validation loss per step); arms train in DIR/arms/NAME\n"
    "                    (afresh: an earlier checkpoint there is removed).  Without\n"
    "                    --out they train in a temporary directory\n"
    "  --progress MODE   each arm's training progress: auto (a bar when stderr is a\n"
    "                    terminal, else only the per-arm lines), bar, plain, none\n"
    "  --quiet           no progress on stderr at all\n"
    "  -h, --help        show this help\n"
    "\n"
    "Arms that fail (a bad configuration, a NaN loss, a crash) are reported in\n"
    "the table with the reason; the others still run.\n"
    "Exit status: 0 every arm finished, 1 an arm failed or nothing could run,\n"
    "2 usage, 130 interrupted.\n";

static volatile sig_atomic_t interrupted;

static void on_interrupt(int sig)
{
    (void)sig;
    interrupted = 1;
}

/* ---- loading ------------------------------------------------------------------------------------------ */

/* Diagnostics of a pipeline that does not load: printed as they come, and
 * the first few kept for the table. */
typedef struct diag_sink {
    char text[sizeof ((compare_row *)0)->error];
    int n;
    int quiet;
} diag_sink;

static void collect(void *arg, const char *line)
{
    diag_sink *s = arg;
    if (!s->quiet)
        fprintf(stderr, "%s\n", line);
    if (s->n < 3) {
        size_t o = strlen(s->text);
        snprintf(s->text + o, sizeof s->text - o, "%s%s", o ? "; " : "", line);
    }
    s->n++;
}

static void sink_finish(diag_sink *s, const pr_error *err)
{
    if (s->n > 3) {
        size_t o = strlen(s->text);
        snprintf(s->text + o, sizeof s->text - o, "; (%d more)", s->n - 3);
    }
    if (!s->text[0])
        snprintf(s->text, sizeof s->text, "%s", err->msg[0] ? err->msg : "the pipeline does not load");
}

/* The file name without directory and extension. */
static void stem_of(const char *path, char *buf, size_t len)
{
    const char *b = strrchr(path, '/');
    snprintf(buf, len, "%s", b ? b + 1 : path);
    char *dot = strrchr(buf, '.');
    if (dot && dot != buf)
        *dot = '\0';
}

/* "lora+bitfit", or "none". */
static void technique_list(const pr_pipeline *p, char *buf, size_t len)
{
    size_t o = 0;
    buf[0] = '\0';
    for (int i = 0; i < pr_pipeline_n_modules(p); i++) {
        pr_module_spec s;
        if (pr_pipeline_module_spec(p, i, &s) || !s.technique)
            continue;
        int w = snprintf(buf + o, len - o, "%s%s", o ? "+" : "", s.technique->name);
        if (w < 0 || (size_t)w >= len - o)
            break;
        o += (size_t)w;
    }
    if (!buf[0])
        snprintf(buf, len, "none");
}

static int str_differs(const char *a, const char *b)
{
    return (a == NULL) != (b == NULL) || (a && strcmp(a, b) != 0);
}

/* Every arm must train the same base model on the same data with the same
 * seed and budget.  Returns 0, or 1 with what differs in why. */
static int budget_differs(const pr_pipeline *ref, const pr_pipeline *p, char *why, size_t len)
{
    const pr_model_config *a = pr_pipeline_model_config(ref), *b = pr_pipeline_model_config(p);
    pr_train_config x, y;
    pr_pipeline_train_config(ref, &x);
    pr_pipeline_train_config(p, &y);
#define DIFF_INT(what, u, v)                                                                                   \
    if ((u) != (v)) {                                                                                          \
        snprintf(why, len, "%s is %lld here but %lld in %s", what, (long long)(v), (long long)(u),               \
                 pr_pipeline_path(ref));                                                                       \
        return 1;                                                                                              \
    }
#define DIFF_STR(what, u, v)                                                                                   \
    if (str_differs(u, v)) {                                                                                   \
        snprintf(why, len, "%s is '%s' here but '%s' in %s", what, (v) ? (v) : "(none)", (u) ? (u) : "(none)",  \
                 pr_pipeline_path(ref));                                                                       \
        return 1;                                                                                              \
    }
    DIFF_INT("the model source", pr_pipeline_model_source(ref), pr_pipeline_model_source(p))
    DIFF_STR("model", pr_pipeline_model_name(ref), pr_pipeline_model_name(p))
    DIFF_STR("model.tokenizer", pr_pipeline_tokenizer_dir(ref), pr_pipeline_tokenizer_dir(p))
    DIFF_INT("model n_layers", a->n_layers, b->n_layers)
    DIFF_INT("model d_model", a->d_model, b->d_model)
    DIFF_INT("model n_heads", a->n_heads, b->n_heads)
    DIFF_INT("model n_kv_heads", a->n_kv_heads, b->n_kv_heads)
    DIFF_INT("model d_head", a->d_head, b->d_head)
    DIFF_INT("model d_ff", a->d_ff, b->d_ff)
    DIFF_INT("model vocab", a->vocab_size, b->vocab_size)
    DIFF_INT("model max_seq", a->max_seq, b->max_seq)
    DIFF_INT("model bias", a->bias, b->bias)
    DIFF_INT("model tied_head", a->tied_head, b->tied_head)
    DIFF_INT("model.seed", (long long)a->seed, (long long)b->seed)
    DIFF_STR("task.type", x.task, y.task)
    DIFF_STR("task.train", x.train_path, y.train_path)
    DIFF_STR("task.validation", x.val_path, y.val_path)
    DIFF_STR("task.format", x.format, y.format)
    if (x.val_fraction != y.val_fraction) {
        snprintf(why, len, "task.val_fraction is %g here but %g in %s", y.val_fraction, x.val_fraction,
                 pr_pipeline_path(ref));
        return 1;
    }
    DIFF_INT("train.steps", x.steps, y.steps)
    DIFF_INT("train.batch", x.batch, y.batch)
    DIFF_INT("train.seq_len", x.seq_len, y.seq_len)
    DIFF_INT("train.accum", x.accum, y.accum)
    DIFF_INT("train.seed", (long long)x.seed, (long long)y.seed)
    DIFF_INT("train.eval_every", x.eval_every, y.eval_every)
    DIFF_INT("train.eval_batches", x.eval_batches, y.eval_batches)
#undef DIFF_INT
#undef DIFF_STR
    return 0;
}

/* ---- directories ------------------------------------------------------------------------------------------------- */

static int make_dirs(const char *dir)
{
    char buf[4096];
    snprintf(buf, sizeof buf, "%s", dir);
    for (char *s = buf + 1; *s; s++)
        if (*s == '/') {
            *s = '\0';
            if (mkdir(buf, 0777) != 0 && errno != EEXIST)
                return -1;
            *s = '/';
        }
    return mkdir(buf, 0777) != 0 && errno != EEXIST ? -1 : 0;
}

static int remove_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st;
    (void)flag;
    (void)ftw;
    remove(path);
    return 0;
}

static void remove_tree(const char *dir)
{
    nftw(dir, remove_entry, 16, FTW_DEPTH | FTW_PHYS);
}

/* out/NAME, with a fresh start: no checkpoint of an earlier run. */
static char *arm_dir(const char *root, const char *name)
{
    char *d = fileio_join(root, name);
    if (!d)
        return NULL;
    char *ck = fileio_join(d, "checkpoint.safetensors");
    if (ck)
        unlink(ck);
    free(ck);
    return d;
}

static int write_file(const char *dir, const char *name, const char *text)
{
    pr_error err = { 0 };
    char *path = fileio_join(dir, name);
    int rc = path ? fileio_write_atomic(path, text, strlen(text), &err)
                  : (int)pr_errorf(&err, PR_ERR_NOMEM, "out of memory");
    if (rc)
        fprintf(stderr, "peftref compare: %s\n", err.msg);
    free(path);
    return rc;
}

/* ---- the command ------------------------------------------------------------------------------------------------- */

typedef struct run {
    compare_arm *arms;               /* arms[0]: the untrained base */
    int n_arms, cap_arms;
    compare_row *rows;       /* parallel to arms */
} run;

static compare_arm *new_arm(run *R, const char *name, const char *path)
{
    if (R->n_arms == R->cap_arms) {
        int cap = R->cap_arms ? 2 * R->cap_arms : 8;
        compare_arm *a = realloc(R->arms, (size_t)cap * sizeof *a);
        if (!a)
            return NULL;
        R->arms = a;
        compare_row *r = realloc(R->rows, (size_t)cap * sizeof *r);
        if (!r)
            return NULL;
        R->rows = r;
        R->cap_arms = cap;
    }
    compare_arm *a = &R->arms[R->n_arms];
    compare_row *r = &R->rows[R->n_arms];
    memset(a, 0, sizeof *a);
    memset(r, 0, sizeof *r);
    r->val_loss = r->initial_val_loss = NAN;
    r->val_accuracy = -1;
    snprintf(r->name, sizeof r->name, "%s", name);
    snprintf(r->techniques, sizeof r->techniques, "-");
    a->path = path;
    R->n_arms++;
    return a;
}

/* Load every arm (rows stay in order; arms[i].row is set at the end, once
 * the arrays stop moving). */
/* A technique offered by two files is named once, whichever arms use it. */
static void warn_shadowed_arms(const run *R, const pr_registry *reg)
{
    for (int t = 0; t < pr_registry_count(reg); t++) {
        const pr_technique *tech = pr_registry_technique(reg, t);
        int used = 0;
        for (int i = 0; i < R->n_arms && !used; i++)
            for (int k = 0; R->arms[i].pipe && k < pr_pipeline_n_modules(R->arms[i].pipe) && !used; k++) {
                pr_module_spec spec;
                used = pr_pipeline_module_spec(R->arms[i].pipe, k, &spec) == PR_OK && spec.technique == tech;
            }
        if (used)
            cli_warn_shadowed("compare", reg, tech->name);
    }
}

static int load_arms(run *R, char **files, int n_files, const char *const *sets, int n_sets, const pr_registry *reg,
                     int quiet)
{
    if (!new_arm(R, "base (untrained)", NULL))
        return -1;
    for (int f = 0; f < n_files; f++) {
        char stem[128];
        stem_of(files[f], stem, sizeof stem);
        diag_sink sink = { .quiet = quiet };
        pr_error err = { 0 };
        pr_pipeline *base = NULL;
        if (pr_pipeline_load_arm(files[f], PR_PIPELINE_BASE, sets, n_sets, reg, &base, collect, &sink, &err)) {
            if (n_files == 1) {
                if (!sink.n)
                    fprintf(stderr, "peftref compare: %s\n", err.msg);
                return 1;   /* nothing to compare */
            }
            sink_finish(&sink, &err);
            compare_arm *a = new_arm(R, stem, files[f]);
            if (!a)
                return -1;
            snprintf(R->rows[R->n_arms - 1].error, sizeof R->rows[0].error, "%s", sink.text);
            continue;
        }
        int n = pr_pipeline_n_arms(base);
        if (n == 0) {
            compare_arm *a = new_arm(R, stem, files[f]);
            if (!a)
                return -1;
            a->pipe = base;
            continue;
        }
        for (int i = 0; i < n; i++) {
            char name[256];
            if (n_files > 1)
                snprintf(name, sizeof name, "%s:%s", stem, pr_pipeline_arm_name(base, i));
            else
                snprintf(name, sizeof name, "%s", pr_pipeline_arm_name(base, i));
            compare_arm *a = new_arm(R, name, files[f]);
            if (!a)
                return -1;
            diag_sink s2 = { .quiet = quiet };
            pr_error e2 = { 0 };
            if (pr_pipeline_load_arm(files[f], i, sets, n_sets, reg, &a->pipe, collect, &s2, &e2)) {
                sink_finish(&s2, &e2);
                snprintf(R->rows[R->n_arms - 1].error, sizeof R->rows[0].error, "%s", s2.text);
            }
        }
        pr_pipeline_free(base);
    }
    return 0;
}

int cmd_compare(int argc, char **argv)
{
    static const struct option opts[] = {
        { "set", required_argument, 0, 's' },      { "format", required_argument, 0, 'f' },
        { "out", required_argument, 0, 'o' },      { "progress", required_argument, 0, 'p' },
        { "quiet", no_argument, 0, 'q' },          { "help", no_argument, 0, 'h' },
        { 0, 0, 0, 0 }
    };
    const char **sets = calloc((size_t)argc + 3, sizeof *sets);
    if (!sets) {
        fprintf(stderr, "peftref compare: out of memory\n");
        return 1;
    }
    int n_sets = 0, fmt = COMPARE_TEXT, progress = PR_PROGRESS_AUTO, quiet = 0, c;
    const char *out = NULL;
    optind = 1;
    opterr = 0;
    while ((c = getopt_long(argc, argv, ":h", opts, NULL)) != -1) {
        switch (c) {
        case 's': sets[n_sets++] = optarg; break;
        case 'o': out = optarg; break;
        case 'q': quiet = 1; break;
        case 'f':
            if ((fmt = compare_format_parse(optarg)) < 0) {
                fprintf(stderr, "peftref compare: --format expects text, markdown, csv or json, got '%s'\n", optarg);
                free(sets);
                return 2;
            }
            break;
        case 'p':
            if ((progress = pr_progress_parse(optarg)) < 0) {
                fprintf(stderr, "peftref compare: --progress expects auto, bar, plain or none, got '%s'\n", optarg);
                free(sets);
                return 2;
            }
            break;
        case 'h': fputs(compare_usage, stdout); free(sets); return 0;
        case ':':
            fprintf(stderr, "peftref compare: option '%s' needs a value\n", argv[optind - 1]);
            free(sets);
            return 2;
        default:
            fprintf(stderr, "peftref compare: unknown option '%s' (see peftref compare --help)\n", argv[optind - 1]);
            free(sets);
            return 2;
        }
    }
    int n_files = argc - optind;
    char **files = argv + optind;
    if (n_files < 1) {
        fprintf(stderr, "peftref compare: expected one pipeline with a compare section, or several pipelines "
                "(see peftref compare --help)\n");
        free(sets);
        return 2;
    }
    for (int i = 0; i < n_files; i++)
        if (!cli_is_pipeline(files[i])) {
            fprintf(stderr, "peftref compare: '%s' is not a pipeline file (.yaml or .yml)\n", files[i]);
            free(sets);
            return 2;
        }
    /* per-arm lines always (unless quiet); the training's own progress as asked */
    int child_progress = quiet ? PR_PROGRESS_NONE : progress;
    if (child_progress == PR_PROGRESS_AUTO)
        child_progress = isatty(STDERR_FILENO) ? PR_PROGRESS_BAR : PR_PROGRESS_NONE;

    pr_registry *reg = NULL;
    pr_error err = { 0 };
    if (pr_registry_open(NULL, &reg, &err)) {
        fprintf(stderr, "peftref compare: %s\n", err.msg);
        free(sets);
        return 1;
    }
    run R;
    memset(&R, 0, sizeof R);
    pr_pipeline *base_pipe = NULL;
    char *root = NULL;
    int rc = load_arms(&R, files, n_files, sets, n_sets, reg, quiet);
    if (rc < 0)
        fprintf(stderr, "peftref compare: out of memory\n");
    if (rc)
        goto done;
    for (int i = 0; i < R.n_arms; i++)
        R.arms[i].row = &R.rows[i];
    warn_shadowed_arms(&R, reg);
    R.rows[0].is_base = 1;
    snprintf(R.rows[0].techniques, sizeof R.rows[0].techniques, "none");

    /* same model, data, seed and budget as the first arm that loaded */
    const pr_pipeline *ref = NULL;
    for (int i = 1; i < R.n_arms; i++) {
        compare_arm *a = &R.arms[i];
        if (!a->pipe)
            continue;
        char why[600];
        if (!ref) {
            ref = a->pipe;
        } else if (budget_differs(ref, a->pipe, why, sizeof why)) {
            snprintf(a->row->error, sizeof a->row->error, "not comparable: %s", why);
            pr_pipeline_free(a->pipe);
            a->pipe = NULL;
        }
    }
    if (!ref) {
        fprintf(stderr, "peftref compare: no arm could be loaded\n");
        rc = 1;
        goto done;
    }
    /* the untrained base: the reference's file without modules, evaluated only */
    {
        const char **bsets = sets;
        bsets[n_sets] = "modules=[]";
        bsets[n_sets + 1] = "train.steps=0";
        diag_sink sink = { .quiet = quiet };
        if (pr_pipeline_load_arm(pr_pipeline_path(ref), PR_PIPELINE_BASE, bsets, n_sets + 2, reg, &base_pipe,
                                 collect, &sink, &err)) {
            sink_finish(&sink, &err);
            snprintf(R.rows[0].error, sizeof R.rows[0].error, "%s", sink.text);
        }
        R.arms[0].pipe = base_pipe;
        R.arms[0].path = pr_pipeline_path(ref);
    }
    pr_train_config ref_tc;
    pr_pipeline_train_config(ref, &ref_tc);
    /* the reference may fail later and be freed: keep nothing that points into it */
    const char *task = ref_tc.task && !strcmp(ref_tc.task, "classification") ? "classification" : "lm";
    /* where the arms train */
    if (out) {
        if (make_dirs(out) != 0) {
            fprintf(stderr, "peftref compare: cannot create %s: %s\n", out, strerror(errno));
            rc = 1;
            goto done;
        }
        root = strdup(out);
    } else {
        const char *tmp = getenv("TMPDIR");
        char tmpl[4096];
        snprintf(tmpl, sizeof tmpl, "%s/peftref-compare-XXXXXX", tmp && *tmp ? tmp : "/tmp");
        root = mkdtemp(tmpl) ? strdup(tmpl) : NULL;
        if (!root) {
            fprintf(stderr, "peftref compare: cannot create a temporary directory: %s\n", strerror(errno));
            rc = 1;
            goto done;
        }
    }
    char *arms_root = fileio_join(root, "arms");
    if (!arms_root || make_dirs(arms_root) != 0) {
        fprintf(stderr, "peftref compare: cannot create %s/arms: %s\n", root, strerror(errno));
        free(arms_root);
        rc = 1;
        goto done;
    }
    /* plans and settings */
    int eval_every = ref_tc.eval_every > 0 ? ref_tc.eval_every : (ref_tc.steps >= 10 ? ref_tc.steps / 10 : 1);
    for (int i = 0; i < R.n_arms; i++) {
        compare_arm *a = &R.arms[i];
        compare_row *r = a->row;
        /* arm names become directory names */
        for (int j = 1; j < i; j++)
            if (!strcmp(R.rows[j].name, r->name)) {
                size_t l = strlen(r->name);
                snprintf(r->name + l, sizeof r->name - l, "_%d", i);
                break;
            }
        if (!a->pipe)
            continue;
        if (!r->is_base)
            technique_list(a->pipe, r->techniques, sizeof r->techniques);
        pr_pipeline_counts counts;
        pr_error e = { 0 };
        if (pr_pipeline_counts_get(a->pipe, &counts, &e) == PR_OK &&
            overhead_of_pipeline(a->pipe, &r->cost, &e) == PR_OK) {
            r->have_plan = 1;
            r->trainable_plan = r->is_base ? 0 : counts.trainable;
            r->all_params = counts.all;
        } else {
            snprintf(r->error, sizeof r->error, "%s", e.msg);
            pr_pipeline_free(a->pipe);
            a->pipe = NULL;
            continue;
        }
        pr_pipeline_train_config(a->pipe, &a->tc);
        a->tc.eval_every = r->is_base ? 0 : eval_every;
        a->tc.progress = r->is_base ? PR_PROGRESS_NONE : child_progress;
        a->tc.quiet = a->tc.progress == PR_PROGRESS_NONE;
        a->tc.resume = 0;
        a->tc.force = 1;   /* each comparison trains its arms afresh */
        a->tc.ckpt_every = 0;
        a->out_dir = r->is_base ? arm_dir(root, "base") : arm_dir(arms_root, r->name);
        if (!a->out_dir) {
            snprintf(r->error, sizeof r->error, "out of memory");
            pr_pipeline_free(a->pipe);
            a->pipe = NULL;
            continue;
        }
        a->tc.out_dir = a->out_dir;
    }
    free(arms_root);

    /* run: the base first, then every arm, one process each */
    struct sigaction sa, old_int, old_term;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_interrupt;
    sigemptyset(&sa.sa_mask);
    interrupted = 0;
    sigaction(SIGINT, &sa, &old_int);
    sigaction(SIGTERM, &sa, &old_term);
    if (!quiet) {
        runtime_warn_generic_blas();
        char line[256];
        runtime_describe(line, sizeof line);
        fprintf(stderr, "peftref compare: %d arm%s, %d steps each; %s\n", R.n_arms - 1, R.n_arms == 2 ? "" : "s",
                ref_tc.steps, line);
    }
    for (int i = 0; i < R.n_arms; i++) {
        compare_arm *a = &R.arms[i];
        compare_row *r = a->row;
        char label[300];
        if (r->is_base)
            snprintf(label, sizeof label, "%s", r->name);
        else
            snprintf(label, sizeof label, "arm %d/%d: %s", i, R.n_arms - 1, r->name);
        if (interrupted) {
            if (!r->error[0])
                snprintf(r->error, sizeof r->error, "not run: interrupted");
            continue;
        }
        if (!a->pipe) {
            if (!quiet)
                fprintf(stderr, "%s ... failed: %s\n", label, r->error);
            continue;
        }
        if (!quiet)
            fprintf(stderr, "%s ...\n", label);
        if (compare_run_arm(a))
            interrupted = 1;
        if (r->is_base)
            r->trainable = 0;   /* evaluated only (a classification head is counted, not trained) */
        if (!r->is_base)
            compare_read_curve(r, a->out_dir);
        if (!quiet) {
            if (r->ok)
                fprintf(stderr, "%s ... done in %.1f s\n", label, r->seconds);
            else
                fprintf(stderr, "%s ... failed in %.1f s: %s\n", label, r->seconds, r->error);
        }
    }
    sigaction(SIGINT, &old_int, NULL);
    sigaction(SIGTERM, &old_term, NULL);

    /* the table */
    compare_table t = { .pipelines = (const char *const *)files, .n_pipelines = n_files, .task = task,
                        .steps = ref_tc.steps, .eval_every = eval_every, .rows = R.rows, .n_rows = R.n_arms };
    char *text = compare_render(&t, fmt);
    if (!text) {
        fprintf(stderr, "peftref compare: out of memory\n");
        rc = 1;
        goto done;
    }
    fputs(text, stdout);
    free(text);
    if (fflush(stdout) != 0 || ferror(stdout)) {
        fprintf(stderr, "peftref compare: writing to standard output: %s\n", strerror(errno));
        rc = 1;
    }
    if (out) {
        static const char *const names[] = { "table.txt", "table.md", "table.csv", "table.json" };
        for (int f = 0; f < 4; f++) {
            char *s = compare_render(&t, f);
            if (!s || write_file(out, names[f], s))
                rc = 1;
            free(s);
        }
        char *svg = compare_svg(&t);
        if (!svg || write_file(out, "curves.svg", svg))
            rc = 1;
        free(svg);
        if (!quiet && rc == 0)
            fprintf(stderr, "peftref compare: wrote %s/table.{txt,md,csv,json} and %s/curves.svg\n", out, out);
    }
    for (int i = 0; i < R.n_arms; i++)
        if (!R.rows[i].ok)
            rc = rc ? rc : 1;
    if (interrupted)
        rc = 130;
done:
    if (root && !out)
        remove_tree(root);
    free(root);
    for (int i = 0; i < R.n_arms; i++) {
        pr_pipeline_free(R.arms[i].pipe);
        free(R.arms[i].out_dir);
        free(R.rows[i].curve);
    }
    free(R.arms);
    free(R.rows);
    pr_registry_free(reg);
    free(sets);
    return rc;
}
