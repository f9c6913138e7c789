/* Tests for YAML pipelines: the plan's parameter line, a tiny pipeline
 * that trains end to end, every malformed fixture's first diagnostic,
 * multi-error reports, and --set overrides. */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "peftref/pipeline.h"
#include "runtime.h"
#include "harness.h"

#define PIPES TEST_SRCDIR "/data/pipelines/"
#define PLUGINS TEST_BUILDDIR "/plugins/.libs"

static pr_registry *reg;

static int open_registry(void **state)
{
    (void)state;
    static const char *const need[] = { "lora" };
    return th_registry_open(PLUGINS, need, 1, &reg);
}

static int close_registry(void **state)
{
    (void)state;
    pr_registry_free(reg);
    return 0;
}

/* A fresh empty directory under /tmp; caller frees. */
static char *temp_dir(void)
{
    return th_temp_dir("/tmp/peftref-pipeline-XXXXXX");
}

/* The first line of a multi-line message. */
static void first_line(const char *msg, char *buf, size_t len)
{
    size_t n = strcspn(msg, "\n");
    if (n >= len)
        n = len - 1;
    memcpy(buf, msg, n);
    buf[n] = '\0';
}

/* ---- plan --------------------------------------------------------------- */

/* GPT-2 small with LoRA r=8 on the fused QKV projection:
 * 12 layers x 8 x (768 + 2304) = 294,912 trainable of
 * 124,439,808 + 294,912 = 124,734,720; 294912 / 124734720 = 0.23643 %. */
static void test_plan_gpt2_small_lora(void **state)
{
    (void)state;
    pr_pipeline *p = NULL;
    pr_error err = { 0 };
    int rc = pr_pipeline_load(PIPES "gpt2_small_lora.yaml", NULL, 0, reg, &p, &err);
    if (rc)
        fprintf(stderr, "%s\n", err.msg);
    assert_int_equal(rc, PR_OK);
    assert_int_equal(pr_pipeline_model_source(p), PR_PIPELINE_MODEL_PRESET);
    assert_int_equal(pr_pipeline_n_modules(p), 1);
    const pr_module_plan *pl = pr_pipeline_module_plan(p, 0);
    assert_non_null(pl);
    assert_int_equal(pl->insertions, 12);
    assert_int_equal(pl->params, 294912);
    assert_int_equal(pl->trainable, 294912);
    pr_pipeline_counts c;
    assert_int_equal(pr_pipeline_counts_get(p, &c, &err), PR_OK);
    assert_int_equal(c.base, 124439808);
    assert_int_equal(c.all, 124734720);
    assert_int_equal(c.trainable, 294912);
    char line[256];
    pr_pipeline_format_counts(&c, line, sizeof line);
    assert_string_equal(line, "trainable params: 294,912 || all params: 124,734,720 || trainable%: 0.2364");
    pr_module_spec spec;
    assert_int_equal(pr_pipeline_module_spec(p, 0, &spec), PR_OK);
    assert_string_equal(spec.name, "lora");
    assert_int_equal(spec.n_options, 2);
    pr_pipeline_free(p);
}

/* Classification adds a head of C*K + K, trained: gpt2-tiny (C = 64) with
 * three string labels in cls.jsonl gives 64*3 + 3 = 195, the only
 * trainable tensor when no module is attached. */
static void test_plan_classification_head(void **state)
{
    (void)state;
    const char *sets[] = { "modules=[]", "task.type=classification", "task.train=" TEST_SRCDIR "/data/train/cls.jsonl",
                           "task.validation=" TEST_SRCDIR "/data/train/cls.jsonl", "model.preset=gpt2-tiny" };
    pr_pipeline *p = NULL;
    pr_error err = { 0 };
    int rc = pr_pipeline_load(PIPES "tiny_lora.yaml", sets, 5, reg, &p, &err);
    if (rc)
        fprintf(stderr, "%s\n", err.msg);
    assert_int_equal(rc, PR_OK);
    pr_pipeline_counts c;
    assert_int_equal(pr_pipeline_counts_get(p, &c, &err), PR_OK);
    assert_int_equal(c.classes, 3);
    assert_int_equal(c.head, 195);
    assert_int_equal(c.trainable, 195);
    assert_int_equal(c.all, c.base + 195);
    pr_pipeline_free(p);
}

/* model.path: a Hugging Face directory is loaded once at load time (to
 * learn its shape), handed to build, and its tokenizer is the default. */
static void test_model_path(void **state)
{
    (void)state;
    char *dir = temp_dir();
    char model_dir[512], set_path[600];
    snprintf(model_dir, sizeof model_dir, "%s/tiny", dir);
    pr_model_config cfg;
    assert_int_equal(pr_config_preset("gpt2-tiny", &cfg), PR_OK);
    pr_model *m = NULL;
    pr_error err = { 0 };
    assert_int_equal(pr_model_create(&cfg, &m, &err), PR_OK);
    assert_int_equal(pr_model_save_hf(m, model_dir, NULL, &err), PR_OK);
    const float first = pr_model_tensor(m, 0)->data[0];
    pr_model_free(m);
    m = NULL;

    snprintf(set_path, sizeof set_path, "model.path=%s", model_dir);
    const char *sets[] = { set_path };
    pr_pipeline *p = NULL;
    int rc = pr_pipeline_load(PIPES "tiny_lora.yaml", sets, 1, reg, &p, &err);
    if (rc)
        fprintf(stderr, "%s\n", err.msg);
    assert_int_equal(rc, PR_OK);
    assert_int_equal(pr_pipeline_model_source(p), PR_PIPELINE_MODEL_PATH);
    assert_string_equal(pr_pipeline_model_name(p), model_dir);
    assert_string_equal(pr_pipeline_tokenizer_dir(p), model_dir);
    assert_int_equal(pr_pipeline_model_config(p)->d_model, 64);
    pr_pipeline_counts c;
    assert_int_equal(pr_pipeline_counts_get(p, &c, &err), PR_OK);
    /* gpt2-tiny: q 4 x 128 + v 2 x 128 per layer, two layers */
    assert_int_equal(c.trainable, 1536);
    assert_int_equal(c.all, pr_config_param_count(&cfg) + 1536);
    pr_tokenizer *tok = NULL;
    rc = pr_pipeline_build(p, &m, &tok, &err);
    if (rc)
        fprintf(stderr, "%s\n", err.msg);
    assert_int_equal(rc, PR_OK);
    assert_true(pr_model_tensor(m, 0)->data[0] == first);   /* the saved weights */
    assert_int_equal(pr_model_n_modules(m), 1);
    assert_int_equal(pr_model_param_count(m), c.all);
    pr_tokenizer_free(tok);
    pr_model_free(m);
    pr_pipeline_free(p);
    th_remove_tree(dir);
    free(dir);
}

/* ---- train end to end ------------------------------------------------------ */

/* The tiny pipeline (LoRA on q and v of a 2-layer byte model) trains: the
 * base stays frozen, only the modules' 768 parameters are trainable, and
 * the validation loss falls by more than 0.05 nats in 40 steps. */
static void test_train_tiny(void **state)
{
    (void)state;
    char *dir = temp_dir();
    char out[512];
    snprintf(out, sizeof out, "train.output=%s/run", dir);
    const char *sets[] = { out, "train.steps=40", "train.lr=3e-2", "train.eval_batches=4" };
    pr_pipeline *p = NULL;
    pr_error err = { 0 };
    int rc = pr_pipeline_load(PIPES "tiny_lora.yaml", sets, 4, reg, &p, &err);
    if (rc)
        fprintf(stderr, "%s\n", err.msg);
    assert_int_equal(rc, PR_OK);
    pr_model *m = NULL;
    pr_tokenizer *tok = NULL;
    rc = pr_pipeline_build(p, &m, &tok, &err);
    if (rc)
        fprintf(stderr, "%s\n", err.msg);
    assert_int_equal(rc, PR_OK);
    assert_int_equal(pr_model_n_modules(m), 1);
    assert_string_equal(pr_module_name(pr_model_module(m, 0)), "lora_qv");
    int64_t trainable = 0;
    for (int i = 0; i < pr_model_n_tensors(m); i++) {
        const pr_tensor_info *t = pr_model_tensor(m, i);
        if (t->kind != PR_TENSOR_MODULE)
            assert_false(t->trainable);
        if (t->trainable)
            trainable += t->numel;
    }
    /* q: 4 x (32 + 32), v: 2 x (32 + 32), two layers */
    assert_int_equal(trainable, 768);
    /* the plan counted what the built model holds */
    pr_pipeline_counts c;
    assert_int_equal(pr_pipeline_counts_get(p, &c, &err), PR_OK);
    assert_int_equal(c.trainable, trainable);
    assert_int_equal(c.all, pr_model_param_count(m));
    pr_train_config tc;
    pr_pipeline_train_config(p, &tc);
    assert_int_equal(tc.steps, 40);
    tc.quiet = 1;
    pr_train_result res;
    rc = pr_train(m, tok, &tc, &res, &err);
    if (rc)
        fprintf(stderr, "%s\n", err.msg);
    assert_int_equal(rc, PR_OK);
    assert_int_equal(res.steps_done, 40);
    assert_true(res.final_val_loss < res.initial_val_loss - 0.05);
    assert_true(res.final_train_loss < res.first_train_loss);
    pr_tokenizer_free(tok);
    pr_model_free(m);
    pr_pipeline_free(p);
    th_remove_tree(dir);
    free(dir);
}

/* ---- malformed pipelines -------------------------------------------------- */

typedef struct bad_case {
    const char *file;
    const char *first;   /* first diagnostic, after "<dir>/" */
} bad_case;

static const bad_case bad_cases[] = {
    { "bad_syntax.yaml", "bad_syntax.yaml:3:2: YAML syntax error: did not find expected key (while parsing a block "
                         "mapping that starts at 1:1); check the indentation" },
    { "bad_unknown_key.yaml", "bad_unknown_key.yaml:9:3: unknown key 'train.learning_rate' (did you mean 'lr'?)" },
    { "bad_type.yaml", "bad_type.yaml:8:10: train.steps: expected an integer, got 'ten'" },
    { "bad_range.yaml", "bad_range.yaml:8:10: train.batch: 0 is out of range (at least 1)" },
    { "bad_missing.yaml", "bad_missing.yaml:1:1: missing required key 'task'" },
    { "bad_technique.yaml", "bad_technique.yaml:4:16: modules.0.technique: unknown technique 'lroa' "
                            "(did you mean 'lora'?)" },
    { "bad_option.yaml", "bad_option.yaml:6:7: modules.0.options: technique 'lora' has no option 'rank' "
                         "(did you mean 'r'?)" },
    { "bad_option_range.yaml", "bad_option_range.yaml:7:16: modules.0.options.dropout: 1.5 is out of range "
                               "[0, 0.999]" },
    { "bad_site.yaml", "bad_site.yaml:5:16: modules.0.sites: unknown site 'vv' (did you mean 'v'?)" },
    { "bad_site_technique.yaml", "bad_site_technique.yaml:5:16: modules.0.sites: technique 'lora' cannot attach "
                                 "at site 'ffn_out' (allowed: qkv, q, k, v, o, ffn.up, ffn.gate, ffn.down)" },
    { "bad_site_model.yaml", "bad_site_model.yaml:5:13: modules.0.sites: site 'ffn.gate' does not exist in this "
                             "model" },
    { "bad_layers.yaml", "bad_layers.yaml:5:17: modules.0.layers: layer 2 is out of range: the model has 2 layers "
                         "(0-1)" },
    { "bad_layer_range.yaml", "bad_layer_range.yaml:5:14: modules.0.layers: bad layer range '1-0': it ends before "
                              "it starts" },
    { "bad_duplicate_name.yaml", "bad_duplicate_name.yaml:8:11: modules.1.name: duplicate module name 'adapt' "
                                 "(modules.0, line 5)" },
    { "bad_duplicate_key.yaml", "bad_duplicate_key.yaml:9:3: duplicate key 'steps' (first at line 8)" },
    { "bad_model.yaml", "bad_model.yaml:2:11: model.preset: unknown preset 'gpt2-smal' (did you mean "
                        "'gpt2-small'?)" },
    { "bad_model_sources.yaml", "bad_model_sources.yaml:3:3: model: give exactly one of path, preset or config "
                                "(found more than one)" },
    { "bad_per_site.yaml", "bad_per_site.yaml:7:11: modules.0.site_options.v.dropout: option 'dropout' cannot be "
                           "set per site (set it under options)" },
    { "bad_enum.yaml", "bad_enum.yaml:5:9: task.type: 'clasification' is not one of lm, classification "
                       "(did you mean 'classification'?)" },
    { "bad_seq_len.yaml", "bad_seq_len.yaml:7:12: train.seq_len: 128 exceeds the model's 64 positions (max_seq)" },
    { "bad_data.yaml", "bad_data.yaml:7:10: task.train: cannot read '" TEST_SRCDIR "/data/pipelines/no/such/"
                       "train.txt' (relative to the pipeline's directory): No such file or directory" },
};

static void test_bad_fixtures(void **state)
{
    (void)state;
    for (size_t i = 0; i < sizeof bad_cases / sizeof bad_cases[0]; i++) {
        char path[512], line[PR_ERROR_MSG_MAX], want[1024];
        snprintf(path, sizeof path, PIPES "%s", bad_cases[i].file);
        snprintf(want, sizeof want, PIPES "%s", bad_cases[i].first);
        pr_pipeline *p = (pr_pipeline *)&path; /* must be reset to NULL */
        pr_error err = { 0 };
        int rc = pr_pipeline_load(path, NULL, 0, reg, &p, &err);
        first_line(err.msg, line, sizeof line);
        if (strcmp(line, want) != 0)
            fprintf(stderr, "%s:\n  got  %s\n  want %s\n", bad_cases[i].file, line, want);
        assert_int_equal(rc, PR_ERR_INVALID);
        assert_null(p);
        assert_string_equal(line, want);
    }
}

static int n_reported;
static char reported[16][PR_ERROR_MSG_MAX];

static void collect(void *arg, const char *line)
{
    assert_ptr_equal(arg, &n_reported);
    if (n_reported < 16)
        snprintf(reported[n_reported], sizeof reported[0], "%s", line);
    n_reported++;
}

/* Every problem of bad_multi.yaml is reported, in file order, both to the
 * report callback and (as lines) in err. */
static void test_multi_errors(void **state)
{
    (void)state;
    static const char *const want[] = {
        "bad_multi.yaml:4:3: unknown key 'model.sed' (did you mean 'seed'?)",
        "bad_multi.yaml:7:18: modules.0.options.r: -1 is out of range [1, 4096]",
        "bad_multi.yaml:7:22: modules.0.options: technique 'lora' has no option 'alpah' (did you mean 'alpha'?)",
        "bad_multi.yaml:8:17: modules.0.layers: layer 7 is out of range: the model has 2 layers (0-1)",
        "bad_multi.yaml:10:10: task.train: cannot read '" TEST_SRCDIR "/data/pipelines/missing.txt' (relative to "
        "the pipeline's directory): No such file or directory",
        "bad_multi.yaml:12:10: train.steps: -5 is out of range (at least 0)",
        "bad_multi.yaml:13:7: train.lr: expected a number, got 'fast'",
    };
    const int n = (int)(sizeof want / sizeof want[0]);
    pr_pipeline *p = NULL;
    pr_error err = { 0 };
    n_reported = 0;
    int rc = pr_pipeline_load_report(PIPES "bad_multi.yaml", NULL, 0, reg, &p, collect, &n_reported, &err);
    assert_int_equal(rc, PR_ERR_INVALID);
    assert_int_equal(n_reported, n);
    const char *s = err.msg;
    for (int i = 0; i < n; i++) {
        char w[PR_ERROR_MSG_MAX], line[PR_ERROR_MSG_MAX];
        snprintf(w, sizeof w, PIPES "%s", want[i]);
        assert_string_equal(reported[i], w);
        assert_non_null(s);
        first_line(s, line, sizeof line);
        assert_string_equal(line, w);
        s = strchr(s, '\n');
        s = s ? s + 1 : NULL;
    }
    assert_null(s);
}

/* More problems than err can hold: whole lines, then a count of the rest. */
static void test_many_errors_truncated(void **state)
{
    (void)state;
    char *dir = temp_dir();
    char path[512];
    snprintf(path, sizeof path, "%s/many.yaml", dir);
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fprintf(f, "model: {preset: gpt2-tiny}\nmodules: []\ntask: {train: %s/data/train/corpus.txt}\ntrain:\n",
            TEST_SRCDIR);
    for (int i = 0; i < 40; i++)
        fprintf(f, "  unknown_%02d: 1\n", i);
    fclose(f);
    pr_pipeline *p = NULL;
    pr_error err = { 0 };
    n_reported = 0;
    assert_int_equal(pr_pipeline_load_report(path, NULL, 0, reg, &p, collect, &n_reported, &err), PR_ERR_INVALID);
    assert_int_equal(n_reported, 40);
    assert_true(strlen(err.msg) < sizeof err.msg);
    const char *last = strrchr(err.msg, '\n');
    assert_non_null(last);
    int lines = 1, more = 0;
    for (const char *c = err.msg; *c; c++)
        lines += *c == '\n';
    assert_int_equal(sscanf(last + 1, "(%d more errors)", &more), 1);
    assert_int_equal(lines - 1 + more, 40);
    char want[600];
    snprintf(want, sizeof want, "%s:5:3: unknown key 'train.unknown_00'", path);
    assert_memory_equal(err.msg, want, strlen(want));
    th_remove_tree(dir);
    free(dir);
}

/* YAML anchors and aliases work, held under a top-level "x-" key; an
 * alias to nothing is reported where it is used. */
static void test_yaml_aliases(void **state)
{
    (void)state;
    char *dir = temp_dir();
    char path[512];
    snprintf(path, sizeof path, "%s/alias.yaml", dir);
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fprintf(f, "x-lora: &lora {r: 2, alpha: 4}\n"
               "model: {preset: gpt2-tiny}\n"
               "modules:\n"
               "  - {technique: lora, name: attn, sites: [q], options: *lora}\n"
               "  - {technique: lora, name: mlp, sites: [ffn.up], options: *lora}\n"
               "task: {train: %s/data/train/corpus.txt}\n", TEST_SRCDIR);
    fclose(f);
    pr_pipeline *p = NULL;
    pr_error err = { 0 };
    int rc = pr_pipeline_load(path, NULL, 0, reg, &p, &err);
    if (rc)
        fprintf(stderr, "%s\n", err.msg);
    assert_int_equal(rc, PR_OK);
    /* gpt2-tiny, r=2: q 2 x (64 + 64), ffn.up 2 x (64 + 256), two layers each */
    assert_int_equal(pr_pipeline_module_plan(p, 0)->params, 512);
    assert_int_equal(pr_pipeline_module_plan(p, 1)->params, 1280);
    pr_pipeline_free(p);

    const char *sets[] = { "modules.1.options=*nothing" };
    assert_int_equal(pr_pipeline_load(path, sets, 1, reg, &p, &err), PR_ERR_INVALID);
    assert_string_equal(err.msg, "--set:1:19: unknown alias '*nothing'");
    th_remove_tree(dir);
    free(dir);
}

/* ---- limits on the YAML tree (docs/security.md) ------------------------------ */

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* Load text written to DIR/name; returns the status, err filled, the time
 * taken in *secs.  The loads below must be refused at once: the time is
 * only a generous sanity bound (machines are shared). */
static int load_text(const char *dir, const char *name, const char *text, char *path, size_t path_len,
                     pr_error *err, double *secs)
{
    snprintf(path, path_len, "%s/%s", dir, name);
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fputs(text, f);
    assert_int_equal(fclose(f), 0);
    pr_pipeline *p = NULL;
    double t0 = now_s();
    int rc = pr_pipeline_load(path, NULL, 0, reg, &p, err);
    *secs = now_s() - t0;
    pr_pipeline_free(p);
    return rc;
}

/* "Billion laughs": nine levels of ten aliases of the level below, 10^9
 * scalars from a few hundred bytes (before the limit: gigabytes and
 * minutes).  Level d holds 11,111 nodes and the tree has 12,351 when e
 * starts, so e's eighth *d is the alias that passes 100,000. */
static void test_yaml_alias_bomb(void **state)
{
    (void)state;
    char *dir = temp_dir(), path[512], text[2048], expect[1024];
    size_t o = (size_t)snprintf(text, sizeof text, "a: &a [x, x, x, x, x, x, x, x, x, x]\n");
    for (char c = 'b'; c <= 'i'; c++)
        o += (size_t)snprintf(text + o, sizeof text - o, "%c: &%c [*%c, *%c, *%c, *%c, *%c, *%c, *%c, *%c, *%c, *%c]\n",
                              c, c, c - 1, c - 1, c - 1, c - 1, c - 1, c - 1, c - 1, c - 1, c - 1, c - 1);
    snprintf(text + o, sizeof text - o, "model: {preset: gpt2-tiny}\nmodules: []\ntask: {train: x.txt}\n");
    pr_error err = { 0 };
    double secs;
    assert_int_equal(load_text(dir, "bomb.yaml", text, path, sizeof path, &err, &secs), PR_ERR_INVALID);
    snprintf(expect, sizeof expect, "%s:5:36: alias '*d' would make the pipeline more than 100000 YAML nodes "
             "(PL_YAML_MAX_NODES)", path);
    assert_string_equal(err.msg, expect);
    assert_true(secs < 5.0);

    /* bytes: 1000 aliases of a 200 kB string (200 MB expanded) */
    size_t big = 200000, len = big + 16 + 1000 * 4 + 64;
    char *t = malloc(len);
    assert_non_null(t);
    o = (size_t)snprintf(t, len, "s: &s \"");
    memset(t + o, 'x', big);
    o += big;
    o += (size_t)snprintf(t + o, len - o, "\"\nl: [");
    for (int i = 0; i < 1000; i++)
        o += (size_t)snprintf(t + o, len - o, "%s*s", i ? ", " : "");
    snprintf(t + o, len - o, "]\n");
    assert_int_equal(load_text(dir, "text.yaml", t, path, sizeof path, &err, &secs), PR_ERR_INVALID);
    /* 200,002 bytes before l's list (keys s and l, the string): the 20th
     * alias (column 5 + 4 * 19) passes 4 MiB */
    snprintf(expect, sizeof expect, "%s:2:81: alias '*s' would make the pipeline's text more than 4194304 bytes "
             "(PL_YAML_MAX_TEXT)", path);
    assert_string_equal(err.msg, expect);
    assert_true(secs < 5.0);
    free(t);
    th_remove_tree(dir);
    free(dir);
}

/* Nesting: written out, and made by aliases of aliases, each wrapping the
 * one before in ten more lists (3000 of them: 45 million nodes 30,000
 * levels deep before the limit). */
static void test_yaml_deep_nesting(void **state)
{
    (void)state;
    char *dir = temp_dir(), path[512], expect[1024];
    const int deep = 100000;
    size_t len = 2 * (size_t)deep + 64, o;
    char *t = malloc(len);
    assert_non_null(t);
    o = (size_t)snprintf(t, len, "x: ");
    memset(t + o, '[', (size_t)deep);
    memset(t + o + deep, ']', (size_t)deep);
    snprintf(t + o + 2 * (size_t)deep, len - o - 2 * (size_t)deep, "\n");
    pr_error err = { 0 };
    double secs;
    assert_int_equal(load_text(dir, "deep.yaml", t, path, sizeof path, &err, &secs), PR_ERR_INVALID);
    /* the top-level mapping is level 0, x's list level 1: the 65th '[' is level 65 */
    snprintf(expect, sizeof expect, "%s:1:68: nesting deeper than 64 levels (PL_YAML_MAX_DEPTH)", path);
    assert_string_equal(err.msg, expect);
    assert_true(secs < 5.0);
    free(t);

    const int levels = 3000;
    len = (size_t)levels * 48 + 64;
    t = malloc(len);
    assert_non_null(t);
    o = (size_t)snprintf(t, len, "chain:\n  - &a0 x\n");
    for (int k = 1; k < levels; k++)
        o += (size_t)snprintf(t + o, len - o, "  - &a%d [[[[[[[[[[*a%d]]]]]]]]]]\n", k, k - 1);
    assert_int_equal(load_text(dir, "chain.yaml", t, path, sizeof path, &err, &secs), PR_ERR_INVALID);
    /* an item is at level 2 and its alias at level 12: *a5 reaches 12 + 5 * 10 = 62, *a6 72 */
    snprintf(expect, sizeof expect, "%s:9:19: alias '*a6' would nest the pipeline deeper than 64 levels "
             "(PL_YAML_MAX_DEPTH)", path);
    assert_string_equal(err.msg, expect);
    assert_true(secs < 5.0);
    free(t);
    th_remove_tree(dir);
    free(dir);
}

/* Every compare arm is checked as a copy of the whole file: 5000 arms
 * beside 60,000 nodes took minutes before PL_MAX_ARMS. */
static void test_too_many_arms(void **state)
{
    (void)state;
    char *dir = temp_dir(), path[512], expect[1024];
    size_t len = 60000 * 3 + 5000 * 40 + 1024, o;
    char *t = malloc(len);
    assert_non_null(t);
    o = (size_t)snprintf(t, len, "x-pad: [1");
    for (int i = 1; i < 60000; i++)
        o += (size_t)snprintf(t + o, len - o, ", 1");
    o += (size_t)snprintf(t + o, len - o, "]\nmodel: {preset: gpt2-tiny}\nmodules: []\n"
                          "task: {train: %s/data/train/corpus.txt}\ncompare:\n  arms:\n", TEST_SRCDIR);
    for (int i = 0; i < 5000; i++)
        o += (size_t)snprintf(t + o, len - o, "    - {name: a%d, modules: []}\n", i);
    pr_error err = { 0 };
    double secs;
    assert_int_equal(load_text(dir, "arms.yaml", t, path, sizeof path, &err, &secs), PR_ERR_INVALID);
    snprintf(expect, sizeof expect, "%s:7:5: compare.arms: 5000 arms, more than 128 (PL_MAX_ARMS)", path);
    assert_string_equal(err.msg, expect);
    assert_true(secs < 5.0);
    free(t);
    th_remove_tree(dir);
    free(dir);
}

/* ---- limits on the model's dimensions -------------------------------------------- */

/* n_layers 500000 (before the bounds: over a minute and 2 GB building the
 * tensor table) is refused at once, naming the bound; so is a product of
 * bounded dimensions past a matrix's 2^31 elements; a real shape passes. */
static void test_model_bounds(void **state)
{
    (void)state;
    char *dir = temp_dir(), path[512], expect[1024], text[1024];
    pr_error err = { 0 };
    double secs;
    snprintf(text, sizeof text, "model: {config: {n_layers: 500000}}\nmodules: [{technique: lora}]\n"
             "task: {train: %s/data/train/corpus.txt}\n", TEST_SRCDIR);
    assert_int_equal(load_text(dir, "layers.yaml", text, path, sizeof path, &err, &secs), PR_ERR_INVALID);
    snprintf(expect, sizeof expect, "%s:1:28: model.config.n_layers: 500000 is more than 1024 (PR_MAX_N_LAYERS)",
             path);
    assert_string_equal(err.msg, expect);
    assert_true(secs < 5.0);

    snprintf(text, sizeof text, "model: {config: {vocab: 99999999999999999}}\nmodules: []\n"
             "task: {train: %s/data/train/corpus.txt}\n", TEST_SRCDIR);
    assert_int_equal(load_text(dir, "vocab.yaml", text, path, sizeof path, &err, &secs), PR_ERR_INVALID);
    snprintf(expect, sizeof expect, "%s:1:25: model.config.vocab: 99999999999999999 is more than 4194304 "
             "(PR_MAX_VOCAB)", path);
    assert_string_equal(err.msg, expect);

    snprintf(text, sizeof text, "model: {config: {d_model: 65536, n_heads: 1024, vocab: 4194304}}\nmodules: []\n"
             "task: {train: %s/data/train/corpus.txt}\n", TEST_SRCDIR);
    assert_int_equal(load_text(dir, "product.yaml", text, path, sizeof path, &err, &secs), PR_ERR_INVALID);
    snprintf(expect, sizeof expect, "%s:1:17: model.config: config: a weight matrix of this shape exceeds 2^31 "
             "elements", path);
    assert_string_equal(err.msg, expect);
    assert_true(secs < 5.0);

    /* gpt2-small written out as a config */
    snprintf(text, sizeof text, "model: {config: {n_layers: 12, d_model: 768, n_heads: 12, vocab: 50257, "
             "max_seq: 1024}}\nmodules: [{technique: lora}]\ntask: {train: %s/data/train/corpus.txt}\n",
             TEST_SRCDIR);
    assert_int_equal(load_text(dir, "small.yaml", text, path, sizeof path, &err, &secs), PR_OK);
    th_remove_tree(dir);
    free(dir);
}

/* An anchor inside a value dropped for its duplicate key is forgotten: a
 * later alias copies the first anchor of that name, not freed memory. */
static void test_yaml_dropped_anchor(void **state)
{
    (void)state;
    char *dir = temp_dir(), path[512], expect[1024];
    pr_error err = { 0 };
    double secs;
    assert_int_equal(load_text(dir, "dup.yaml", "x-k: &k [1]\nx-k: &k {a: [2, 3]}\nx-y: *k\n", path, sizeof path, &err,
                               &secs),
                     PR_ERR_INVALID);
    snprintf(expect, sizeof expect, "%s:2:1: duplicate key 'x-k' (first at line 1)", path);
    if (!strstr(err.msg, expect))
        fail_msg("no '%s' in '%s'", expect, err.msg);
    th_remove_tree(dir);
    free(dir);
}

/* ---- overrides ------------------------------------------------------------------ */

static void test_set_overrides(void **state)
{
    (void)state;
    const char *sets[] = {
        "train.steps=7",
        "modules.0.options.r=2",
        "model.preset=gpt2-tiny",        /* replaces the file's model.config */
        "modules.0.site_options.v.r=1",
        "modules.1={technique: lora, name: up, sites: ffn.up, layers: 1, options: {r: 1}}",
        "task.val_fraction=0.25",
    };
    pr_pipeline *p = NULL;
    pr_error err = { 0 };
    int rc = pr_pipeline_load(PIPES "tiny_lora.yaml", sets, 6, reg, &p, &err);
    if (rc)
        fprintf(stderr, "%s\n", err.msg);
    assert_int_equal(rc, PR_OK);
    assert_int_equal(pr_pipeline_model_source(p), PR_PIPELINE_MODEL_PRESET);
    assert_int_equal(pr_pipeline_model_config(p)->d_model, 64);
    pr_train_config tc;
    pr_pipeline_train_config(p, &tc);
    assert_int_equal(tc.steps, 7);
    assert_int_equal(tc.batch, 4);   /* untouched */
    assert_true(tc.val_fraction == 0.25);
    assert_int_equal(pr_pipeline_n_modules(p), 2);
    /* gpt2-tiny: q r=2 -> 2 x 128, v r=1 -> 1 x 128, per layer, two layers */
    assert_int_equal(pr_pipeline_module_plan(p, 0)->params, 2 * (256 + 128));
    /* ffn.up of layer 1 only, r=1: 64 + 256 */
    assert_int_equal(pr_pipeline_module_plan(p, 1)->params, 320);
    assert_int_equal(pr_pipeline_module_plan(p, 1)->insertions, 1);
    int n = 0;
    const int *layers = pr_pipeline_module_layers(p, 1, &n);
    assert_int_equal(n, 1);
    assert_int_equal(layers[0], 1);
    pr_pipeline_free(p);
}

/* Bad override paths and values: "--set:N:COL:" with N the override's
 * position and COL the column in its KEY=VALUE text. */
static void test_set_errors(void **state)
{
    (void)state;
    const char *sets[] = { "train.stpes=3", "modules.3.options.r=1", "train.steps.x=1", "train.steps=abc",
                           "nokey", "modules.0.sites=[q, vv]", "train.batch=[1" };
    static const char *const want[] = {
        "--set:1:7: unknown key 'train.stpes' (did you mean 'steps'?)",
        "--set:2:9: modules.3.options.r: '3' is not an index of 'modules', which has 1 item (0-0, or 1 to add one)",
        "--set:3:13: train.steps.x: 'train.steps' holds a value, not a mapping or a list",
        "--set:4:13: train.steps: expected an integer, got 'abc'",
        "--set:5:1: expected KEY=VALUE (e.g. train.steps=10), got 'nokey'",
        "--set:6:21: modules.0.sites: unknown site 'vv' (did you mean 'v'?)",
        "--set:7:15: YAML syntax error: did not find expected ',' or ']' (while parsing a flow sequence that "
        "starts at 7:13)",
    };
    const int n = (int)(sizeof want / sizeof want[0]);
    pr_pipeline *p = NULL;
    pr_error err = { 0 };
    n_reported = 0;
    int rc = pr_pipeline_load_report(PIPES "tiny_lora.yaml", sets, n, reg, &p, collect, &n_reported, &err);
    assert_int_equal(rc, PR_ERR_INVALID);
    /* the file's site_options.v no longer matches sites [q, vv]: not reported,
     * since the sites themselves are wrong */
    for (int i = 0; i < n && i < n_reported; i++)
        if (strcmp(reported[i], want[i]))
            fprintf(stderr, "got  %s\nwant %s\n", reported[i], want[i]);
    assert_int_equal(n_reported, n);
    for (int i = 0; i < n; i++)
        assert_string_equal(reported[i], want[i]);
}

/* ---- the command line --------------------------------------------------------------- */

/* Run the CLI with args; stdout to out_path; returns the exit status. */
static int run_cli(const char *const *args, const char *out_path)
{
    return th_run_cli(PEFTREF_BIN, PLUGINS, args, out_path, NULL);
}

static void last_line_of(const char *path, char *buf, size_t len)
{
    FILE *f = fopen(path, "r");
    assert_non_null(f);
    buf[0] = '\0';
    char line[1024];
    while (fgets(line, sizeof line, f)) {
        line[strcspn(line, "\n")] = '\0';
        snprintf(buf, len, "%s", line);
    }
    fclose(f);
}

static void test_cli_plan_and_train(void **state)
{
    (void)state;
    char *dir = temp_dir();
    char out[512], line[1024], set_out[512];
    snprintf(out, sizeof out, "%s/stdout", dir);
    const char *plan[] = { PEFTREF_BIN, "plan", PIPES "gpt2_small_lora.yaml", NULL };
    assert_int_equal(run_cli(plan, out), 0);
    last_line_of(out, line, sizeof line);
    assert_string_equal(line, "trainable params: 294,912 || all params: 124,734,720 || trainable%: 0.2364");

    const char *bad[] = { PEFTREF_BIN, "plan", PIPES "bad_multi.yaml", NULL };
    assert_int_equal(run_cli(bad, out), 1);

    snprintf(set_out, sizeof set_out, "train.output=%s/run", dir);
    const char *train[] = { PEFTREF_BIN, "train", "--quiet", "--set", "train.steps=3", PIPES "tiny_lora.yaml",
                            "--set", set_out, NULL };
    assert_int_equal(run_cli(train, out), 0);
    FILE *f = fopen(out, "r");
    assert_non_null(f);
    assert_non_null(fgets(line, sizeof line, f));
    fclose(f);
    assert_string_equal(line, "trainable params: 768 || all params: 28,160 || trainable%: 2.7273\n");
    last_line_of(out, line, sizeof line);
    assert_memory_equal(line, "steps 3 ", 8);
    char metrics[600];
    snprintf(metrics, sizeof metrics, "%s/run/metrics.jsonl", dir);
    assert_int_equal(access(metrics, R_OK), 0);
    th_remove_tree(dir);
    free(dir);
}

int main(int argc, char **argv)
{
    (void)argc;
    /* passive OpenMP waiting, as the program itself runs (spinning workers
     * starve OpenBLAS on small machines) */
    runtime_reexec_if_needed(argv);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_plan_gpt2_small_lora),
        cmocka_unit_test(test_plan_classification_head),
        cmocka_unit_test(test_model_path),
        cmocka_unit_test(test_train_tiny),
        cmocka_unit_test(test_bad_fixtures),
        cmocka_unit_test(test_multi_errors),
        cmocka_unit_test(test_many_errors_truncated),
        cmocka_unit_test(test_yaml_aliases),
        cmocka_unit_test(test_yaml_alias_bomb),
        cmocka_unit_test(test_yaml_deep_nesting),
        cmocka_unit_test(test_yaml_dropped_anchor),
        cmocka_unit_test(test_model_bounds),
        cmocka_unit_test(test_too_many_arms),
        cmocka_unit_test(test_set_overrides),
        cmocka_unit_test(test_set_errors),
        cmocka_unit_test(test_cli_plan_and_train),
    };
    return cmocka_run_group_tests(tests, open_registry, close_registry);
}
