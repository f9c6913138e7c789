/* Tests of `peftref compare` and compare arms: the table is complete in
 * every format and its curves are drawn; trainable counts agree with
 * `peftref plan`; two arms with the same modules train identically; a
 * broken arm fails alone; arm diagnostics point into the file; pipelines
 * given together must share their budget; training progress as log lines
 * and as a bar. */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <jansson.h>
#include <math.h>
#include <pty.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "peftref/pipeline.h"
#include "harness.h"

#define CMP TEST_SRCDIR "/data/compare/"
#define PLUGINS TEST_BUILDDIR "/plugins/.libs"

/* ---- helpers -------------------------------------------------------------------- */

static char *temp_dir(void)
{
    return th_temp_dir("/tmp/peftref-compare-test-XXXXXX");
}

/* Run the CLI with args; stdout and stderr to files; the exit status. */
static int run_cli(const char *const *args, const char *out_path, const char *err_path)
{
    return th_run_cli(PEFTREF_BIN, PLUGINS, args, out_path, err_path);
}

static char *slurp(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        fail_msg("cannot open %s", path);
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *s = malloc((size_t)n + 1);
    assert_non_null(s);
    assert_int_equal(fread(s, 1, (size_t)n, f), (size_t)n);
    s[n] = '\0';
    fclose(f);
    return s;
}

static char *join(const char *dir, const char *name)
{
    size_t n = strlen(dir) + strlen(name) + 2;
    char *s = malloc(n);
    assert_non_null(s);
    snprintf(s, n, "%s/%s", dir, name);
    return s;
}

static json_t *load_json(const char *path)
{
    json_error_t e;
    json_t *j = json_load_file(path, 0, &e);
    if (!j)
        fail_msg("%s:%d: %s", path, e.line, e.text);
    return j;
}

static const json_t *row_named(const json_t *table, const char *name)
{
    const json_t *rows = json_object_get(table, "rows");
    for (size_t i = 0; i < json_array_size(rows); i++) {
        const json_t *r = json_array_get(rows, i);
        if (!strcmp(json_string_value(json_object_get(r, "arm")), name))
            return r;
    }
    fail_msg("no row named '%s'", name);
    return NULL;
}

static double num(const json_t *row, const char *key)
{
    const json_t *v = json_object_get(row, key);
    if (!json_is_number(v))
        fail_msg("%s: '%s' is not a number", json_string_value(json_object_get(row, "arm")), key);
    return json_number_value(v);
}

/* Fields of one RFC 4180 record (quoted fields may hold commas and ""). */
static int csv_count(const char *line)
{
    int n = 1, quoted = 0;
    for (const char *s = line; *s && *s != '\r' && (*s != '\n' || quoted); s++) {
        if (*s == '"')
            quoted = !quoted;
        else if (*s == ',' && !quoted)
            n++;
    }
    return n;
}

/* ---- the four-arm comparison ------------------------------------------------------ */

static const char *const four_arms[] = { "lora", "bitfit", "ia3", "full" };

/* `peftref compare four.yaml`: every column of every arm is filled in
 * each format, the base row is there, every technique starts from the
 * base's loss and ends below it, and curves.svg has a line per arm. */
static void test_four_arms_table(void **state)
{
    (void)state;
    char *dir = temp_dir(), *out = join(dir, "stdout.json"), *err = join(dir, "stderr"), *odir = join(dir, "out");
    const char *args[] = { PEFTREF_BIN, "compare", CMP "four.yaml", "--format", "json", "--out", odir,
                           "--progress", "none", NULL };
    assert_int_equal(run_cli(args, out, err), 0);

    /* JSON on stdout, the same as table.json */
    json_t *t = load_json(out);
    char *tj = join(odir, "table.json");
    json_t *t2 = load_json(tj);
    assert_true(json_equal(t, t2));
    const json_t *rows = json_object_get(t, "rows");
    assert_int_equal(json_array_size(rows), 5);
    const json_t *base = json_array_get(rows, 0);
    assert_true(json_is_true(json_object_get(base, "base")));
    assert_string_equal(json_string_value(json_object_get(base, "arm")), "base (untrained)");
    double base_loss = num(base, "val_loss");
    assert_true(isfinite(base_loss) && base_loss > 0);
    assert_true(num(base, "peak_memory_mib") > 0);
    static const char *const filled[] = { "trainable_params", "all_params", "trainable_percent", "peak_memory_mib",
                                          "ms_per_step", "tokens_per_second", "extra_positions",
                                          "extra_flops_per_token", "extra_flops_per_token_merged", "val_loss",
                                          "val_perplexity", "initial_val_loss" };
    for (int i = 0; i < 4; i++) {
        const json_t *r = row_named(t, four_arms[i]);
        assert_string_equal(json_string_value(json_object_get(r, "status")), "ok");
        for (size_t k = 0; k < sizeof filled / sizeof filled[0]; k++)
            (void)num(r, filled[k]);
        assert_true(num(r, "trainable_params") > 0);
        assert_true(num(r, "peak_memory_mib") > 1.0);
        assert_true(num(r, "ms_per_step") > 0 && num(r, "tokens_per_second") > 0);
        assert_true(num(r, "steps") == 12);
        double loss = num(r, "val_loss");
        /* perplexity is exp(loss), to rounding */
        assert_true(fabs(num(r, "val_perplexity") - exp(loss)) <= 1e-9 * exp(loss));
        /* identity initialisation: every arm starts from the base model's loss */
        assert_true(fabs(num(r, "initial_val_loss") - base_loss) < 1e-6);
        assert_true(loss < base_loss);
        /* the curve: evaluations at 0, 4, 8, 12, ending at the final loss
         * (metrics.jsonl keeps six decimals) */
        const json_t *curve = json_object_get(r, "curve");
        assert_int_equal(json_array_size(curve), 4);
        for (size_t k = 0; k < 4; k++)
            assert_int_equal(json_integer_value(json_array_get(json_array_get(curve, k), 0)), 4 * (int)k);
        assert_true(fabs(json_number_value(json_array_get(json_array_get(curve, 3), 1)) - loss) < 1e-5);
    }
    /* LoRA r=4 on q and v of 2 layers: 2*2*4*(32+32) = 1024 parameters,
     * 2 FLOPs each per token unmerged, none merged; (IA)^3 one multiply per
     * rescaled element, 2*(32+32+64) = 256; selection adds nothing */
    const json_t *lora = row_named(t, "lora"), *ia3 = row_named(t, "ia3");
    assert_int_equal((int)num(lora, "trainable_params"), 1024);
    assert_int_equal((int)num(lora, "extra_flops_per_token"), 2048);
    assert_int_equal((int)num(lora, "extra_flops_per_token_merged"), 0);
    assert_int_equal((int)num(ia3, "extra_flops_per_token"), 256);
    assert_int_equal((int)num(row_named(t, "full"), "extra_flops_per_token"), 0);
    assert_int_equal((int)num(row_named(t, "bitfit"), "extra_positions"), 0);
    assert_true(fabs(num(row_named(t, "full"), "trainable_percent") - 100.0) < 1e-9);

    /* the default text table: eight columns within 100 characters a line */
    char *narrow_path = join(odir, "table.txt"), *narrow = slurp(narrow_path);
    int narrow_lines = 0;
    assert_non_null(strstr(narrow, "+FLOP/tok"));
    assert_null(strstr(narrow, "ms/step"));
    for (char *save = NULL, *l = strtok_r(narrow, "\n", &save); l; l = strtok_r(NULL, "\n", &save), narrow_lines++)
        assert_true(strlen(l) <= 100);
    assert_true(narrow_lines >= 7);
    free(narrow);
    free(narrow_path);
    /* --wide (table_wide.txt): a header, a rule, five rows; no arm row has an empty cell */
    char *txt_path = join(odir, "table_wide.txt"), *txt = slurp(txt_path);
    int lines = 0, rows_seen = 0;
    for (char *save = NULL, *l = strtok_r(txt, "\n", &save); l; l = strtok_r(NULL, "\n", &save), lines++) {
        if (lines < 2 || !strncmp(l, "note:", 5))
            continue;
        rows_seen++;
        int is_base = strncmp(l, "base (untrained)", 16) == 0;
        /* cells are separated by two or more spaces */
        int cells = 0, dash = 0;
        for (char *p = l; *p;) {
            while (*p == ' ')
                p++;
            if (!*p)
                break;
            char *q = strstr(p, "  ");
            size_t n = q ? (size_t)(q - p) : strlen(p);
            if (n == 1 && *p == '-')
                dash++;
            cells++;
            p += n;
        }
        assert_int_equal(cells, 13);
        if (!is_base)
            assert_int_equal(dash, 0);
    }
    assert_int_equal(rows_seen, 5);

    /* Markdown: 14 pipes a line; CSV: the header's field count everywhere */
    char *md_path = join(odir, "table.md"), *md = slurp(md_path);
    int md_lines = 0;
    for (char *save = NULL, *l = strtok_r(md, "\n", &save); l; l = strtok_r(NULL, "\n", &save), md_lines++) {
        int pipes = 0;
        for (char *p = l; *p; p++)
            pipes += *p == '|' && (p == l || p[-1] != '\\');
        assert_int_equal(pipes, 14);
    }
    assert_int_equal(md_lines, 7);
    char *csv_path = join(odir, "table.csv"), *csv = slurp(csv_path);
    int header = -1, records = 0;
    for (char *save = NULL, *l = strtok_r(csv, "\n", &save); l; l = strtok_r(NULL, "\n", &save), records++) {
        int n = csv_count(l);
        if (header < 0)
            header = n;
        assert_int_equal(n, header);
    }
    assert_int_equal(header, 22);
    assert_int_equal(records, 6);

    /* curves.svg: an SVG document with a polyline per arm and the legend */
    char *svg_path = join(odir, "curves.svg"), *svg = slurp(svg_path);
    assert_non_null(strstr(svg, "<svg"));
    assert_non_null(strstr(svg, "</svg>"));
    int polylines = 0;
    for (char *p = svg; (p = strstr(p, "<polyline")); p++)
        polylines++;
    assert_int_equal(polylines, 4);
    for (int i = 0; i < 4; i++) {
        char want[64];
        snprintf(want, sizeof want, ">%s</text>", four_arms[i]);
        assert_non_null(strstr(svg, want));
    }
    assert_non_null(strstr(svg, "base (untrained)"));

    /* per-arm progress on stderr */
    char *e = slurp(err);
    assert_non_null(strstr(e, "arm 1/4: lora ... done in "));
    assert_non_null(strstr(e, "arm 4/4: full ... done in "));
    assert_null(strchr(e, '\r'));

    /* the trainable counts are `peftref plan`'s for the same arms */
    char *plan_out = join(dir, "plan.txt");
    for (int i = 0; i < 4; i++) {
        const char *pa[] = { PEFTREF_BIN, "plan", CMP "four.yaml", "--arm", four_arms[i], NULL };
        assert_int_equal(run_cli(pa, plan_out, NULL), 0);
        char *p = slurp(plan_out), *line = strstr(p, "trainable params: ");
        assert_non_null(line);
        long long n = 0;
        for (char *c = line + 18; *c && *c != ' '; c++)
            if (*c >= '0' && *c <= '9')
                n = 10 * n + (*c - '0');
        assert_int_equal(n, (long long)num(row_named(t, four_arms[i]), "trainable_params"));
        assert_int_equal(n, (long long)num(row_named(t, four_arms[i]), "trainable_params_plan"));
        free(p);
    }
    free(plan_out);
    free(e);
    free(svg);
    free(svg_path);
    free(csv);
    free(csv_path);
    free(md);
    free(md_path);
    free(txt);
    free(txt_path);
    json_decref(t2);
    free(tj);
    json_decref(t);
    th_remove_tree(dir);
    free(dir);
    free(out);
    free(err);
    free(odir);
}

/* Same modules, same seed and data: identical losses, step for step. */
static void test_twin_arms_train_identically(void **state)
{
    (void)state;
    char *dir = temp_dir(), *out = join(dir, "t.json");
    const char *args[] = { PEFTREF_BIN, "compare", CMP "twins.yaml", "--format", "json", "--quiet", NULL };
    assert_int_equal(run_cli(args, out, NULL), 0);
    json_t *t = load_json(out);
    const json_t *a = row_named(t, "first"), *b = row_named(t, "second");
    assert_true(num(a, "val_loss") == num(b, "val_loss"));
    assert_true(json_equal(json_object_get(a, "curve"), json_object_get(b, "curve")));
    assert_int_equal(json_array_size(json_object_get(a, "curve")), 3);
    json_decref(t);
    th_remove_tree(dir);
    free(dir);
    free(out);
}

/* A broken arm is a failed row with the diagnostic; the others run; the
 * exit status is 1. */
static void test_broken_arm_fails_alone(void **state)
{
    (void)state;
    char *dir = temp_dir(), *out = join(dir, "t.csv");
    const char *args[] = { PEFTREF_BIN, "compare", CMP "bad_arm.yaml", "--format", "json", "--quiet", NULL };
    assert_int_equal(run_cli(args, out, NULL), 1);
    json_t *t = load_json(out);
    const json_t *ok = row_named(t, "ia3"), *bad = row_named(t, "broken");
    assert_string_equal(json_string_value(json_object_get(ok, "status")), "ok");
    assert_true(isfinite(num(ok, "val_loss")));
    assert_string_equal(json_string_value(json_object_get(bad, "status")), "failed");
    const char *why = json_string_value(json_object_get(bad, "error"));
    assert_non_null(why);
    assert_non_null(strstr(why, "bad_arm.yaml:11:48: compare.arms.1.modules.0.options.r: 0 is out of range"));
    assert_true(json_is_null(json_object_get(bad, "val_loss")));
    json_decref(t);
    th_remove_tree(dir);
    free(dir);
    free(out);
}

/* Several pipelines: each one an arm named after its file; one with a
 * different budget is refused with the reason. */
static void test_pipelines_as_arms(void **state)
{
    (void)state;
    char *dir = temp_dir(), *out = join(dir, "t.json");
    const char *args[] = { PEFTREF_BIN, "compare", CMP "one_lora.yaml", CMP "one_bitfit.yaml", CMP "more_steps.yaml",
                           "--format", "json", "--quiet", NULL };
    assert_int_equal(run_cli(args, out, NULL), 1);
    json_t *t = load_json(out);
    assert_int_equal(json_array_size(json_object_get(t, "rows")), 4);
    assert_string_equal(json_string_value(json_object_get(row_named(t, "one_lora"), "status")), "ok");
    assert_string_equal(json_string_value(json_object_get(row_named(t, "one_bitfit"), "status")), "ok");
    const char *why = json_string_value(json_object_get(row_named(t, "more_steps"), "error"));
    assert_non_null(why);
    assert_non_null(strstr(why, "not comparable: train.steps is 5 here but 4 in "));
    json_decref(t);
    th_remove_tree(dir);
    free(dir);
    free(out);
}

/* Classification: accuracy instead of perplexity; the head counts as
 * trainable in every arm. */
static void test_classification_accuracy(void **state)
{
    (void)state;
    char *dir = temp_dir(), *out = join(dir, "t.csv"), *odir = join(dir, "o");
    const char *args[] = { PEFTREF_BIN, "compare", CMP "cls.yaml", "--format", "csv", "--out", odir, "--quiet",
                           NULL };
    assert_int_equal(run_cli(args, out, NULL), 0);
    char *csv = slurp(out);
    assert_non_null(strstr(csv, ",val_accuracy,"));
    assert_null(strstr(csv, "val_perplexity"));
    free(csv);
    char *tj = join(odir, "table.json");
    json_t *t = load_json(tj);
    assert_string_equal(json_string_value(json_object_get(t, "task")), "classification");
    /* LoRA r=2 on q, v of 2 layers (512) plus the head (32*2 + 2) */
    const json_t *lora = row_named(t, "lora");
    assert_int_equal((int)num(lora, "trainable_params"), 512 + 66);
    for (int i = 0; i < 2; i++) {
        const json_t *r = row_named(t, i ? "bitfit" : "lora");
        double acc = num(r, "val_accuracy");
        assert_true(acc >= 0.0 && acc <= 1.0);
        assert_true(json_is_null(json_object_get(r, "val_perplexity")));
    }
    json_decref(t);
    free(tj);
    th_remove_tree(dir);
    free(dir);
    free(out);
    free(odir);
}

/* ---- the compare section as a pipeline ------------------------------------------------ */

static pr_registry *reg;

static int open_registry(void **state)
{
    (void)state;
    static const char *const need[] = { "lora", "ia3", "bitfit", "full" };
    return th_registry_open(PLUGINS, need, 4, &reg);
}

static int close_registry(void **state)
{
    (void)state;
    pr_registry_free(reg);
    return 0;
}

static char reported[16][600];
static int n_reported;

static void collect(void *arg, const char *line)
{
    (void)arg;
    if (n_reported < 16)
        snprintf(reported[n_reported], sizeof reported[0], "%s", line);
    n_reported++;
}

/* Every problem of every arm, once, at its line and column. */
static void test_arm_diagnostics(void **state)
{
    (void)state;
    static const char *const want[] = {
        CMP "arms_errors.yaml:9:46: compare.arms.0.modules.0.sites: unknown site 'vv' (did you mean 'v'?)",
        CMP "arms_errors.yaml:10:29: compare.arms.1.modules.0.technique: unknown technique 'bitfitt' "
            "(did you mean 'bitfit'?)",
        CMP "arms_errors.yaml:11:13: compare.arms.2.name: duplicate arm name 'lora' (compare.arms.0, line 8)",
        CMP "arms_errors.yaml:13:13: compare.arms.2.set: 'train.steps' is the same for every arm (same base "
            "model, data, seed and budget); an arm may set modules.* and train.lr, min_lr_ratio, schedule, "
            "warmup, weight_decay, decay_all, clip, beta1, beta2, eps, head_lr_mult, log_every, progress",
        CMP "arms_errors.yaml:13:40: train.lr: -1 is out of range [0, 10]",
        CMP "arms_errors.yaml:13:62: compare.arms.2.modules.0.options: technique 'ia3' has no option 'x' "
            "(its options: none)",
        CMP "arms_errors.yaml:14:7: unknown key 'compare.arms.3.nme' (did you mean 'name'?)",
        CMP "arms_errors.yaml:14:7: compare.arms.3: missing required key 'modules' (write 'modules: []' for the "
            "base model alone)",
    };
    int n = (int)(sizeof want / sizeof want[0]);
    pr_pipeline *p = NULL;
    pr_error err = { 0 };
    n_reported = 0;
    assert_int_equal(pr_pipeline_load_report(CMP "arms_errors.yaml", NULL, 0, reg, &p, collect, NULL, &err),
                     PR_ERR_INVALID);
    assert_null(p);
    for (int i = 0; i < n && i < n_reported; i++)
        if (strcmp(reported[i], want[i]))
            fprintf(stderr, "got  %s\nwant %s\n", reported[i], want[i]);
    assert_int_equal(n_reported, n);
    for (int i = 0; i < n; i++)
        assert_string_equal(reported[i], want[i]);
}

/* An arm as a pipeline: its modules replace the file's, its set applies,
 * its output is the file's output / its name; the base keeps the file's. */
static void test_arm_as_pipeline(void **state)
{
    (void)state;
    pr_pipeline *base = NULL, *ia3 = NULL;
    pr_error err = { 0 };
    const char *sets[] = { "train.output=/tmp/cmp-out", "train.lr=0.5" };
    assert_int_equal(pr_pipeline_load_arm(CMP "four.yaml", PR_PIPELINE_BASE, sets, 2, reg, &base, NULL, NULL, &err),
                     PR_OK);
    assert_int_equal(pr_pipeline_n_arms(base), 4);
    assert_string_equal(pr_pipeline_arm_name(base, 1), "bitfit");
    assert_int_equal(pr_pipeline_find_arm(base, "ia3"), 2);
    assert_int_equal(pr_pipeline_find_arm(base, "nope"), -1);
    assert_null(pr_pipeline_arm(base));
    assert_int_equal(pr_pipeline_n_modules(base), 0);
    assert_int_equal(pr_pipeline_load_arm(CMP "four.yaml", 2, sets, 2, reg, &ia3, NULL, NULL, &err), PR_OK);
    assert_string_equal(pr_pipeline_arm(ia3), "ia3");
    assert_int_equal(pr_pipeline_n_modules(ia3), 1);
    pr_module_spec spec;
    assert_int_equal(pr_pipeline_module_spec(ia3, 0, &spec), PR_OK);
    assert_string_equal(spec.technique->name, "ia3");
    pr_train_config tb, ti;
    pr_pipeline_train_config(base, &tb);
    pr_pipeline_train_config(ia3, &ti);
    /* --set edits the file; the arm's set: wins over it */
    assert_true(fabsf(tb.lr - 0.5f) < 1e-7f);
    assert_true(fabsf(ti.lr - 3e-2f) < 1e-9f);
    assert_int_equal(ti.steps, tb.steps);
    assert_string_equal(tb.out_dir, "/tmp/cmp-out");
    assert_string_equal(ti.out_dir, "/tmp/cmp-out/ia3");
    pr_pipeline_free(ia3);
    pr_pipeline_free(base);
    /* out of range arm */
    assert_int_equal(pr_pipeline_load_arm(CMP "four.yaml", 9, NULL, 0, reg, &ia3, NULL, NULL, &err), PR_ERR_INVALID);
    assert_null(ia3);
}

/* ---- progress ---------------------------------------------------------------------------- */

/* --progress plain: log lines, never a carriage return; --progress bar
 * (even into a file): one line redrawn with "\r" and erased to its end,
 * ended by a newline before the results. */
static void test_progress_modes(void **state)
{
    (void)state;
    char *dir = temp_dir(), *out = join(dir, "stdout"), *err = join(dir, "stderr");
    char o1[600];
    snprintf(o1, sizeof o1, "train.output=%s/plain", dir);
    const char *plain[] = { PEFTREF_BIN, "train", CMP "one_lora.yaml", "--set", o1, "--set", "train.log_every=2",
                            "--progress", "plain", NULL };
    assert_int_equal(run_cli(plain, out, err), 0);
    char *e = slurp(err);
    assert_non_null(strstr(e, "step      0  val_loss "));
    assert_non_null(strstr(e, "step      2/4  loss "));
    assert_non_null(strstr(e, "step      4/4  loss "));
    assert_null(strchr(e, '\r'));
    free(e);

    char o2[600];
    snprintf(o2, sizeof o2, "train.output=%s/bar", dir);
    const char *bar[] = { PEFTREF_BIN, "train", CMP "one_lora.yaml", "--set", o2, "--progress", "bar", NULL };
    assert_int_equal(run_cli(bar, out, err), 0);
    e = slurp(err);
    char *last = strstr(e, "\rstep 4/4 ");
    assert_non_null(last);
    assert_non_null(strstr(e, "\033[K"));
    assert_non_null(strstr(last, "100% loss "));
    assert_non_null(strstr(last, "tok/s | ETA "));
    /* the bar's line is ended before anything else */
    char *nl = strchr(last, '\n');
    assert_non_null(nl);
    assert_null(strstr(e, "step      4/4"));
    free(e);
    char *o = slurp(out);
    assert_non_null(strstr(o, "\nsteps 4 "));
    free(o);

    char o3[600];
    snprintf(o3, sizeof o3, "train.output=%s/none", dir);
    const char *none[] = { PEFTREF_BIN, "train", CMP "one_lora.yaml", "--set", o3, "--set", "train.progress=none",
                           NULL };
    assert_int_equal(run_cli(none, out, err), 0);
    e = slurp(err);
    assert_null(strstr(e, "step "));
    free(e);
    th_remove_tree(dir);
    free(dir);
    free(out);
    free(err);
}

/* --progress auto (the default): on a terminal (a pseudo-terminal here)
 * the bar, into a file the plain log lines. */
static void test_progress_auto(void **state)
{
    (void)state;
    char *dir = temp_dir(), *out = join(dir, "stdout"), *err = join(dir, "stderr");
    char o1[600];
    snprintf(o1, sizeof o1, "train.output=%s/file", dir);
    const char *file[] = { PEFTREF_BIN, "train", CMP "one_lora.yaml", "--set", o1, "--set", "train.log_every=2",
                           NULL };
    assert_int_equal(run_cli(file, out, err), 0);
    char *e = slurp(err);
    assert_non_null(strstr(e, "step      2/4  loss "));
    assert_null(strchr(e, '\r'));
    free(e);

    char o2[600];
    snprintf(o2, sizeof o2, "train.output=%s/tty", dir);
    const char *tty[] = { PEFTREF_BIN, "train", CMP "one_lora.yaml", "--set", o2, NULL };
    int master = -1;
    struct winsize ws = { .ws_row = 24, .ws_col = 100 };
    pid_t pid = forkpty(&master, NULL, NULL, &ws);
    assert_true(pid >= 0);
    if (pid == 0) {
        setenv("PEFTREF_PLUGIN_PATH", PLUGINS, 1);
        setenv("TERM", "xterm", 1);
        execv(PEFTREF_BIN, (char *const *)tty);
        _exit(98);
    }
    char buf[65536];
    size_t len = 0;
    for (;;) {
        ssize_t n = read(master, buf + len, sizeof buf - 1 - len);
        if (n <= 0)   /* EIO once the child has closed the terminal */
            break;
        len += (size_t)n;
    }
    buf[len] = '\0';
    close(master);
    int status = 0;
    assert_int_equal(waitpid(pid, &status, 0), pid);
    assert_true(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    char *bar = strstr(buf, "\rstep 4/4 [");
    assert_non_null(bar);
    assert_non_null(strstr(buf, "\033[K"));
    assert_null(strstr(buf, "step      2/4"));
    /* no redrawn bar is wider than the terminal's 100 columns */
    for (char *p = buf; (p = strchr(p, '\r'));) {
        p++;
        size_t n = strcspn(p, "\r\n\033");
        assert_true(n < 100);
    }
    /* the results start on a line of their own */
    char *res = strstr(buf, "steps 4 ");
    assert_non_null(res);
    assert_true(res > bar && res[-1] == '\n');
    th_remove_tree(dir);
    free(dir);
    free(out);
    free(err);
}

/* The last val_loss in a run's metrics.jsonl. */
static double last_val_loss(const char *run_dir)
{
    char *path = join(run_dir, "metrics.jsonl");
    FILE *f = fopen(path, "r");
    if (!f)
        fail_msg("cannot open %s", path);
    char line[4096];
    double v = NAN;
    while (fgets(line, sizeof line, f)) {
        json_t *o = json_loads(line, 0, NULL);
        if (json_is_number(json_object_get(o, "val_loss")))
            v = json_number_value(json_object_get(o, "val_loss"));
        json_decref(o);
    }
    fclose(f);
    free(path);
    return v;
}

/* compare.seeds: 3: every arm's val loss is the mean and sample sd of its
 * seeds' final losses (computed here from each run's metrics.jsonl), the
 * seeds differ, the text shows mean ± sd; the sweep arm's row is its
 * setting of lowest mean val loss, and its table is written. */
static void test_seeds_and_sweep(void **state)
{
    (void)state;
    char *dir = temp_dir(), *out = join(dir, "t.txt"), *odir = join(dir, "out");
    const char *args[] = { PEFTREF_BIN, "compare", CMP "seeds_sweep.yaml", "--out", odir, "--quiet", NULL };
    assert_int_equal(run_cli(args, out, NULL), 0);
    char *tj = join(odir, "table.json");
    json_t *t = load_json(tj);
    assert_int_equal(json_integer_value(json_object_get(t, "seeds")), 3);
    /* lora: arms/lora/seed0..2 */
    double v[3], sum = 0;
    for (int s = 0; s < 3; s++) {
        char rel[64];
        snprintf(rel, sizeof rel, "arms/lora/seed%d", s);
        char *rd = join(odir, rel);
        v[s] = last_val_loss(rd);
        sum += v[s];
        free(rd);
    }
    assert_true(v[0] != v[1] && v[1] != v[2]);
    double mean = sum / 3, ss = 0;
    for (int s = 0; s < 3; s++)
        ss += (v[s] - mean) * (v[s] - mean);
    double sd = sqrt(ss / 2);
    const json_t *lora = row_named(t, "lora");
    assert_int_equal((int)num(lora, "n_seeds"), 3);
    assert_true(fabs(num(lora, "val_loss") - mean) < 1e-5);
    assert_true(fabs(num(lora, "val_loss_sd") - sd) < 1e-5);
    assert_true(sd > 0);
    /* bitfit's sweep: p0 (lr 1e-5) and p1 (lr 3e-2), three seeds each */
    double m[2];
    for (int p = 0; p < 2; p++) {
        m[p] = 0;
        for (int s = 0; s < 3; s++) {
            char rel[64];
            snprintf(rel, sizeof rel, "arms/bitfit/p%d-seed%d", p, s);
            char *rd = join(odir, rel);
            m[p] += last_val_loss(rd) / 3;
            free(rd);
        }
    }
    int best = m[1] < m[0];
    const json_t *bit = row_named(t, "bitfit");
    assert_string_equal(json_string_value(json_object_get(bit, "setting")), best ? "train.lr=3e-2" : "train.lr=1e-5");
    assert_true(fabs(num(bit, "val_loss") - m[best]) < 1e-5);
    char *sj = join(odir, "sweeps/bitfit.json");
    json_t *sw = load_json(sj);
    const json_t *settings = json_object_get(sw, "settings");
    assert_int_equal(json_array_size(settings), 2);
    for (int p = 0; p < 2; p++) {
        const json_t *x = json_array_get(settings, (size_t)p);
        assert_true(fabs(num(x, "val_loss") - m[p]) < 1e-5);
        assert_int_equal(json_is_true(json_object_get(x, "best")), p == best);
    }
    char *smd = join(odir, "sweeps/bitfit.md"), *scsv = join(odir, "sweeps/bitfit.csv");
    free(slurp(smd));
    free(slurp(scsv));
    /* the text: mean ± sd in every trained row, lines within 100 columns */
    char *txt = slurp(out);
    assert_non_null(strstr(txt, "mean ± sample sd over 3 seeds"));
    int rows_sd = 0;
    for (char *save = NULL, *l = strtok_r(txt, "\n", &save); l; l = strtok_r(NULL, "\n", &save)) {
        rows_sd += (!strncmp(l, "lora ", 5) || !strncmp(l, "bitfit ", 7)) && strstr(l, "±") != NULL;
        size_t cols = 0;
        for (const char *c = l; *c; c++)
            cols += ((unsigned char)*c & 0xC0) != 0x80;
        assert_true(cols <= 100);
    }
    assert_int_equal(rows_sd, 2);
    /* the band: one per arm */
    char *svg_path = join(odir, "curves.svg"), *svg = slurp(svg_path);
    int bands = 0;
    for (char *p = svg; (p = strstr(p, "class=\"band\"")); p++)
        bands++;
    assert_int_equal(bands, 2);
    free(svg);
    free(svg_path);
    free(txt);
    free(smd);
    free(scsv);
    json_decref(sw);
    free(sj);
    json_decref(t);
    free(tj);
    th_remove_tree(dir);
    free(dir);
    free(out);
    free(odir);
}

/* A bad sweep is reported at its line and column. */
static void test_bad_sweep(void **state)
{
    (void)state;
    char *dir = temp_dir(), *err = join(dir, "err");
    const char *args[] = { PEFTREF_BIN, "plan", CMP "bad_sweep.yaml", NULL };
    assert_int_equal(run_cli(args, NULL, err), 1);
    char *e = slurp(err);
    assert_non_null(strstr(e, "bad_sweep.yaml:8:37: compare.arms.0.sweep: 'train.steps' cannot be swept"));
    assert_non_null(strstr(e, "bad_sweep.yaml:8:32: train.lr: -1 is out of range"));
    free(e);
    th_remove_tree(dir);
    free(dir);
    free(err);
}

/* An --out holding a comparison is refused (naming it) unless --resume or
 * --force; --resume reuses every finished run. */
static void test_rerun_refused(void **state)
{
    (void)state;
    char *dir = temp_dir(), *out = join(dir, "t.json"), *err = join(dir, "err"), *odir = join(dir, "out");
    const char *a1[] = { PEFTREF_BIN, "compare", CMP "twins.yaml", "--out", odir, "--format", "json",
                         "--progress", "none", NULL };
    assert_int_equal(run_cli(a1, out, err), 0);
    json_t *t1 = load_json(out);
    assert_int_equal(run_cli(a1, NULL, err), 1);
    char *e = slurp(err);
    assert_non_null(strstr(e, odir));
    assert_non_null(strstr(e, "--resume"));
    free(e);
    const char *a2[] = { PEFTREF_BIN, "compare", CMP "twins.yaml", "--out", odir, "--format", "json",
                         "--progress", "none", "--resume", NULL };
    assert_int_equal(run_cli(a2, out, err), 0);
    json_t *t2 = load_json(out);
    e = slurp(err);
    assert_non_null(strstr(e, "arm 1/2: first ... finished earlier: reused"));
    assert_non_null(strstr(e, "arm 2/2: second ... finished earlier: reused"));
    free(e);
    assert_true(num(row_named(t1, "first"), "val_loss") == num(row_named(t2, "first"), "val_loss"));
    assert_int_equal((int)num(row_named(t2, "first"), "reused"), 1);
    const char *a3[] = { PEFTREF_BIN, "compare", CMP "twins.yaml", "--out", odir, "--format", "json",
                         "--progress", "none", "--force", NULL };
    assert_int_equal(run_cli(a3, out, err), 0);
    json_t *t3 = load_json(out);
    assert_int_equal((int)num(row_named(t3, "first"), "reused"), 0);
    assert_true(num(row_named(t1, "first"), "val_loss") == num(row_named(t3, "first"), "val_loss"));
    json_decref(t1);
    json_decref(t2);
    json_decref(t3);
    th_remove_tree(dir);
    free(dir);
    free(out);
    free(err);
    free(odir);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_four_arms_table),
        cmocka_unit_test(test_twin_arms_train_identically),
        cmocka_unit_test(test_broken_arm_fails_alone),
        cmocka_unit_test(test_pipelines_as_arms),
        cmocka_unit_test(test_classification_accuracy),
        cmocka_unit_test(test_arm_diagnostics),
        cmocka_unit_test(test_arm_as_pipeline),
        cmocka_unit_test(test_progress_modes),
        cmocka_unit_test(test_progress_auto),
        cmocka_unit_test(test_seeds_and_sweep),
        cmocka_unit_test(test_bad_sweep),
        cmocka_unit_test(test_rerun_refused),
    };
    return cmocka_run_group_tests(tests, open_registry, close_registry);
}
