/* Saved modules (core/io/module_file.c), pipeline load:/average: entries and
 * the outputs of a pipeline run (modules/, pipeline.yaml, loss.svg), merge
 * and generate, on a byte-level GPT-2 of test size (2 layers, d_model 32).
 *
 * Tolerances: a saved and reloaded module reproduces the evaluation loss
 * bit for bit (the same f32 values go through the same code); an average
 * equals (float)(w_a a + w_b b) computed in double, exactly; a merged model
 * evaluates within 1e-5 nats of the model with its modules. */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "peftref/pipeline.h"
#include "runtime.h"
#include "harness.h"

#define PLUGINS TEST_BUILDDIR "/plugins/.libs"
#define CORPUS TEST_SRCDIR "/data/train/corpus.txt"

static pr_registry *reg;
static char *tmp;

static int setup_all(void **state)
{
    (void)state;
    static const char *const need[] = { "lora", "ia3", "prefix_tuning_mlp", "prompt_tuning" };
    if (th_registry_open(PLUGINS, need, 4, &reg))
        return -1;
    tmp = strdup("/tmp/peftref-module-io-XXXXXX");
    if (!tmp || !mkdtemp(tmp))
        return -1;
    setenv("PEFTREF_PLUGIN_PATH", PLUGINS, 1);
    return 0;
}

static int teardown_all(void **state)
{
    (void)state;
    char cmd[512];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmp);
    if (system(cmd) != 0)
        return -1;
    free(tmp);
    pr_registry_free(reg);
    return 0;
}

static void cfg_tiny(pr_model_config *c, uint64_t seed)
{
    assert_int_equal(pr_config_preset("gpt2-tiny", c), PR_OK);
    c->n_layers = 2;
    c->d_model = 32;
    c->n_heads = 2;
    c->n_kv_heads = 2;
    c->d_head = 16;
    c->d_ff = 64;
    c->vocab_size = 256;
    c->max_seq = 64;
    c->seed = seed;
}

static pr_model *tiny_model(uint64_t seed)
{
    pr_model_config c;
    cfg_tiny(&c, seed);
    pr_model *m = NULL;
    pr_error err = { 0 };
    assert_int_equal(pr_model_create(&c, &m, &err), PR_OK);
    return m;
}

/* Every parameter of mod set to small seeded values, so that a module
 * whose init is the identity (LoRA's B = 0, (IA)^3's ones) matters. */
static void randomise(pr_module *mod, uint64_t seed)
{
    uint64_t s = seed * 0x9e3779b97f4a7c15ull + 1;
    for (int i = 0; i < pr_module_n_params(mod); i++) {
        pr_module_param p;
        assert_int_equal(pr_module_param_at(mod, i, &p), PR_OK);
        for (int64_t k = 0; k < p.numel; k++) {
            s = s * 6364136223846793005ull + 1442695040888963407ull;
            p.data[k] += (float)((double)(s >> 40) / (double)(1ull << 24) - 0.5) * 0.2f;
        }
    }
}

/* Mean LM loss on fixed byte windows (B=2, T=16). */
static float eval_loss(pr_model *m)
{
    int tokens[32], targets[32];
    const char *text = "the quick brown fox jumps over the lazy dog, again and again.";
    for (int i = 0; i < 32; i++) {
        tokens[i] = (unsigned char)text[i];
        targets[i] = (unsigned char)text[i + 1];
    }
    pr_error err = { 0 };
    pr_model_set_training(m, 0);
    assert_int_equal(pr_model_reserve(m, 2, 16, &err), PR_OK);
    pr_batch b = { .tokens = tokens, .targets = targets, .B = 2, .T = 16 };
    float loss = 0.0f;
    assert_int_equal(pr_model_forward(m, &b, &loss, &err), PR_OK);
    return loss;
}

static pr_module *attach(pr_model *m, const char *tech, const char *name, uint32_t sites,
                         const pr_option_setting *opts, int n_opts)
{
    pr_module_spec spec = { .technique = pr_registry_find(reg, tech), .name = name, .sites = sites,
                            .options = opts, .n_options = n_opts, .trainable = 1, .seed = 5 };
    pr_module *mod = NULL;
    pr_error err = { 0 };
    int rc = pr_module_attach(m, &spec, &mod, &err);
    if (rc)
        fprintf(stderr, "attach: %s\n", err.msg);
    assert_int_equal(rc, PR_OK);
    return mod;
}

static char *path_in(const char *name)
{
    char *p = malloc(strlen(tmp) + strlen(name) + 2);
    assert_non_null(p);
    sprintf(p, "%s/%s", tmp, name);
    return p;
}

static void write_text(const char *path, const char *text)
{
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fputs(text, f);
    assert_int_equal(fclose(f), 0);
}

/* ---- save -> load reproduces the evaluation exactly ----------------------- */

static void roundtrip(const char *tech, uint32_t sites, const pr_option_setting *opts, int n_opts, const char *file,
                      const char *want_names)
{
    pr_model *a = tiny_model(11);
    pr_module *mod = attach(a, tech, "m", sites, opts, n_opts);
    randomise(mod, 3);
    float la = eval_loss(a);
    char *path = path_in(file);
    pr_error err = { 0 };
    pr_module_save_info info = { .steps = 7, .final_train_loss = 1.5, .final_val_loss = NAN };
    assert_int_equal(pr_module_save(mod, path, &info, &err), PR_OK);

    pr_module_file *f = NULL;
    assert_int_equal(pr_module_file_open(path, reg, &f, &err), PR_OK);
    assert_string_equal(pr_module_file_meta(f, "technique"), tech);
    assert_string_equal(pr_module_file_meta(f, "tensor_names"), want_names);
    assert_non_null(strstr(pr_module_file_meta(f, "training"), "\"steps\":7"));
    assert_non_null(pr_module_file_meta(f, "peftref_version"));
    pr_module_file_close(f);

    pr_model *b = tiny_model(11);
    pr_module_load_options lo = { .name = NULL, .trainable = 0 };
    pr_module *back = NULL;
    int rc = pr_module_load(b, path, reg, &lo, &back, &err);
    if (rc)
        fprintf(stderr, "load: %s\n", err.msg);
    assert_int_equal(rc, PR_OK);
    assert_string_equal(pr_module_name(back), "m");
    assert_int_equal(pr_module_param_count(back), pr_module_param_count(mod));
    assert_int_equal(pr_module_trainable_count(back), 0);
    float lb = eval_loss(b);
    assert_memory_equal(&la, &lb, sizeof la);   /* bit-identical */
    pr_model_free(a);
    pr_model_free(b);
    free(path);
}

static void test_roundtrip_lora_peft_names(void **state)
{
    (void)state;
    /* qkv is GPT-2's attn.c_attn: Hugging Face PEFT names */
    pr_option_setting o[] = { { "r", "4", -1 }, { "alpha", "8", -1 } };
    roundtrip("lora", PR_SITE_BIT(PR_SITE_QKV) | PR_SITE_BIT(PR_SITE_FFN_DOWN), o, 2, "lora_qkv.safetensors", "peft");
    char *path = path_in("lora_qkv.safetensors");
    pr_module_file *f = NULL;
    pr_error err = { 0 };
    assert_int_equal(pr_module_file_open(path, reg, &f, &err), PR_OK);
    assert_string_equal(pr_module_file_meta(f, "peft_type"), "LORA");
    pr_module_file_close(f);
    /* the names and shapes PEFT uses: lora_A (r, d_in), lora_B (d_out, r) */
    FILE *fp = fopen(path, "rb");
    assert_non_null(fp);
    char head[8192] = { 0 };
    assert_true(fread(head, 1, sizeof head - 1, fp) > 8);
    fclose(fp);
    const char *h = head + 8;
    assert_non_null(strstr(h, "\"base_model.model.transformer.h.0.attn.c_attn.lora_A.weight\":{\"dtype\":\"F32\","
                              "\"shape\":[4,32]"));
    assert_non_null(strstr(h, "\"base_model.model.transformer.h.1.attn.c_attn.lora_B.weight\":{\"dtype\":\"F32\","
                              "\"shape\":[96,4]"));
    assert_non_null(strstr(h, "\"base_model.model.transformer.h.1.mlp.c_proj.lora_A.weight\":{\"dtype\":\"F32\","
                              "\"shape\":[4,64]"));
    free(path);
}

static void test_roundtrip_lora_host_names(void **state)
{
    (void)state;
    /* q and v are slices of c_attn: PEFT cannot name them */
    pr_option_setting o[] = { { "r", "4", -1 }, { "r", "2", PR_SITE_V } };
    roundtrip("lora", PR_SITE_BIT(PR_SITE_Q) | PR_SITE_BIT(PR_SITE_V), o, 2, "lora_qv.safetensors", "peftref");
}

static void test_roundtrip_ia3(void **state)
{
    (void)state;
    roundtrip("ia3", 0, NULL, 0, "ia3.safetensors", "peft");
    /* GPT-2's fused c_attn: one (d_q + 2 d_kv, 1) vector per layer */
    char *path = path_in("ia3.safetensors");
    FILE *fp = fopen(path, "rb");
    assert_non_null(fp);
    char head[8192] = { 0 };
    assert_true(fread(head, 1, sizeof head - 1, fp) > 8);
    fclose(fp);
    assert_non_null(strstr(head + 8, "\"base_model.model.transformer.h.0.attn.c_attn.ia3_l\":{\"dtype\":\"F32\","
                                     "\"shape\":[96,1]"));
    assert_non_null(strstr(head + 8, "\"base_model.model.transformer.h.1.mlp.c_proj.ia3_l\":{\"dtype\":\"F32\","
                                     "\"shape\":[1,64]"));
    free(path);
}

static void test_roundtrip_prompt(void **state)
{
    (void)state;
    pr_option_setting o[] = { { "n_tokens", "3", -1 } };
    roundtrip("prompt_tuning", 0, o, 1, "prompt.safetensors", "peft");
    char *path = path_in("prompt.safetensors");
    FILE *fp = fopen(path, "rb");
    assert_non_null(fp);
    char head[4096] = { 0 };
    assert_true(fread(head, 1, sizeof head - 1, fp) > 8);
    fclose(fp);
    assert_non_null(strstr(head + 8, "\"prompt_embeddings\":{\"dtype\":\"F32\",\"shape\":[3,32]"));
    free(path);
}

/* prefix_tuning_mlp's MLP is training-only: saving folds it into the
 * per-layer prefixes (PEFT's prompt_embeddings, n x 2 L d_kv), which load
 * as a prefix_tuning module giving the same outputs. */
static void test_fold_prefix_mlp(void **state)
{
    (void)state;
    pr_model *a = tiny_model(11);
    pr_option_setting o[] = { { "n_tokens", "4", -1 }, { "encoder_hidden_size", "16", -1 } };
    pr_module *mod = attach(a, "prefix_tuning_mlp", "px", 0, o, 2);
    randomise(mod, 9);
    float la = eval_loss(a);
    char *path = path_in("px.safetensors");
    pr_error err = { 0 };
    assert_int_equal(pr_module_save(mod, path, NULL, &err), PR_OK);
    FILE *fp = fopen(path, "rb");
    assert_non_null(fp);
    char head[4096] = { 0 };
    assert_true(fread(head, 1, sizeof head - 1, fp) > 8);
    fclose(fp);
    assert_non_null(strstr(head + 8, "\"prompt_embeddings\":{\"dtype\":\"F32\",\"shape\":[4,128]"));
    assert_null(strstr(head + 8, "transform_0_weight"));
    assert_non_null(strstr(head + 8, "\"folded\":\"true\""));

    pr_model *b = tiny_model(11);
    pr_module_load_options lo = { 0 };
    pr_module *back = NULL;
    int rc = pr_module_load(b, path, reg, &lo, &back, &err);
    if (rc)
        fprintf(stderr, "load: %s\n", err.msg);
    assert_int_equal(rc, PR_OK);
    assert_string_equal(pr_module_technique(back)->name, "prefix_tuning");
    assert_int_equal(pr_module_param_count(back), 2 * (2 * 4 * 32));
    float lb = eval_loss(b);
    assert_true(fabsf(la - lb) <= 1e-5f);
    pr_model_free(a);
    pr_model_free(b);
    free(path);
}

/* ---- fingerprint ------------------------------------------------------------------ */

static void test_fingerprint_mismatch(void **state)
{
    (void)state;
    char *path = path_in("fp.safetensors");
    pr_model *a = tiny_model(11);
    pr_module *mod = attach(a, "lora", "fp", 0, NULL, 0);
    pr_error err = { 0 };
    assert_int_equal(pr_module_save(mod, path, NULL, &err), PR_OK);
    char f1[64], f2[64];
    pr_model *b = tiny_model(12);   /* other weights, same shape */
    pr_model_fingerprint(a, f1, sizeof f1);
    pr_model_fingerprint(b, f2, sizeof f2);
    assert_string_not_equal(f1, f2);
    pr_module_load_options lo = { 0 };
    assert_int_equal(pr_module_load(b, path, reg, &lo, NULL, &err), PR_ERR_INVALID);
    assert_non_null(strstr(err.msg, "another base model"));
    assert_non_null(strstr(err.msg, f1));
    assert_non_null(strstr(err.msg, f2));
    assert_int_equal(pr_model_n_modules(b), 0);
    lo.force = 1;
    assert_int_equal(pr_module_load(b, path, reg, &lo, NULL, &err), PR_OK);
    assert_int_equal(pr_model_n_modules(b), 1);
    pr_model_free(a);
    pr_model_free(b);
    free(path);
}

/* Replace the first occurrence of from in path's bytes by to (same length). */
static void patch_file(const char *path, const char *from, const char *to)
{
    assert_int_equal(strlen(from), strlen(to));
    FILE *fp = fopen(path, "rb");
    assert_non_null(fp);
    static char buf[1 << 16];
    size_t n = fread(buf, 1, sizeof buf, fp);
    fclose(fp);
    assert_true(n > 8 && n < sizeof buf);
    char *at = memmem(buf, n, from, strlen(from));
    if (!at)
        fail_msg("%s: '%s' not found in %.*s", path, from, (int)(n > 600 ? 600 : n), buf + 8);
    memcpy(at, to, strlen(to));
    fp = fopen(path, "wb");
    assert_non_null(fp);
    assert_int_equal(fwrite(buf, 1, n, fp), n);
    assert_int_equal(fclose(fp), 0);
}

/* A module file whose metadata names an unknown site or holds a bad option
 * value is refused with a message that quotes the offending name: the
 * name must be reported before the JSON holding it is released (ASan
 * reports a use after free otherwise). */
static void test_bad_metadata_names_quoted(void **state)
{
    (void)state;
    static const struct { const char *from, *to, *want; } cases[] = {
        { "[\\\"qkv\\\"]", "[\\\"qkz\\\"]", "metadata sites: unknown site 'qkz'" },
        { "\\\"alpha\\\":8.0", "\\\"alpha\\\":[1]", "metadata options.alpha: bad value" },
    };
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        char name[32];
        snprintf(name, sizeof name, "badmeta%zu.safetensors", c);
        char *path = path_in(name);
        pr_model *a = tiny_model(11);
        pr_option_setting o[] = { { "r", "4", -1 }, { "alpha", "8", -1 } };
        pr_module *mod = attach(a, "lora", "m", PR_SITE_BIT(PR_SITE_QKV), o, 2);
        pr_error err = { 0 };
        assert_int_equal(pr_module_save(mod, path, NULL, &err), PR_OK);
        pr_model_free(a);
        patch_file(path, cases[c].from, cases[c].to);
        pr_module_file *f = NULL;
        assert_int_equal(pr_module_file_open(path, reg, &f, &err), PR_ERR_FORMAT);
        assert_null(f);
        if (!strstr(err.msg, cases[c].want))
            fail_msg("message '%s' lacks '%s'", err.msg, cases[c].want);
        assert_non_null(strstr(err.msg, path));
        free(path);
    }
}

/* A file found by fuzz_module whose tensor names are shorter than its
 * saved module name: comparing two such files for averaging read past the
 * end of the name (ASan: heap-buffer-overflow in strcmp). */
static void test_average_short_tensor_names(void **state)
{
    (void)state;
    const char *path = TEST_SRCDIR "/data/fuzz-regressions/module-short-tensor-name.safetensors";
    pr_module_file *f = NULL;
    pr_error err = { 0 };
    if (pr_module_file_open(path, reg, &f, &err) != PR_OK)
        fail_msg("the regression file no longer opens (%s): it must reach the average check", err.msg);
    pr_module_file *two[2] = { f, f };
    assert_int_equal(pr_module_files_compatible(two, 2, &err), PR_OK);   /* a file agrees with itself */
    pr_module_file_close(f);
}

/* ---- pipelines: modes, reuse, average ------------------------------------------------ */

static const char model_yaml[] = "model:\n  config: {n_layers: 2, d_model: 32, n_heads: 2, d_ff: 64, vocab: 256, "
                                 "max_seq: 64}\n  seed: 3\n";

/* Write a pipeline whose modules section is mods, load and build it. */
static pr_pipeline *pipeline(const char *file, const char *mods, const char *out, pr_model **m, pr_tokenizer **tok,
                             pr_error *err)
{
    char *path = path_in(file);
    char text[4096];
    snprintf(text, sizeof text,
             "%smodules:\n%stask:\n  type: lm\n  train: %s\ntrain: {steps: 3, batch: 2, seq_len: 16, lr: 0.01, "
             "schedule: constant, log_every: 0, eval_batches: 2, output: %s/%s}\n",
             model_yaml, mods, CORPUS, tmp, out);
    write_text(path, text);
    pr_pipeline *p = NULL;
    int rc = pr_pipeline_load(path, NULL, 0, reg, &p, err);
    free(path);
    if (rc)
        return NULL;
    if (m && pr_pipeline_build(p, m, tok, err)) {
        pr_pipeline_free(p);
        return NULL;
    }
    return p;
}

/* Train a LoRA module for task A on the pipeline's base and save it. */
static void make_task_a(const char *name, const char *r, uint64_t rand_seed)
{
    char mods[256], file[128];
    snprintf(mods, sizeof mods, "  - {technique: lora, name: %s, sites: [q, v], options: {r: %s}}\n", name, r);
    snprintf(file, sizeof file, "%s.yaml", name);
    pr_error err = { 0 };
    pr_model *m = NULL;
    pr_tokenizer *tok = NULL;
    pr_pipeline *p = pipeline(file, mods, name, &m, &tok, &err);
    if (!p)
        fprintf(stderr, "%s\n", err.msg);
    assert_non_null(p);
    randomise(pr_model_module(m, 0), rand_seed);
    assert_int_equal(pr_pipeline_save_run(p, m, NULL, &err), PR_OK);
    pr_tokenizer_free(tok);
    pr_model_free(m);
    pr_pipeline_free(p);
}

/* Values of tensor name in model m, copied. */
static float *tensor_copy(const pr_model *m, const char *name, int64_t *n)
{
    const pr_tensor_info *t = pr_model_find_tensor(m, name);
    assert_non_null(t);
    float *v = malloc((size_t)t->numel * sizeof *v);
    assert_non_null(v);
    memcpy(v, t->data, (size_t)t->numel * sizeof *v);
    *n = t->numel;
    return v;
}

static void test_modes(void **state)
{
    (void)state;
    make_task_a("a", "4", 1);
    char mods[512];
    pr_error err = { 0 };
    pr_model *m = NULL;
    pr_tokenizer *tok = NULL;
    int64_t n;

    /* frozen: attached with the saved values, no gradients, counted in all */
    snprintf(mods, sizeof mods, "  - {load: %s/a/modules/a.safetensors, mode: frozen}\n", tmp);
    pr_pipeline *p = pipeline("frozen.yaml", mods, "frozen", &m, &tok, &err);
    assert_non_null(p);
    const pr_tensor_info *t = pr_model_find_tensor(m, "a/h.0.q.lora_B");
    assert_non_null(t);
    assert_null(t->grad);
    assert_int_equal(t->trainable, 0);
    float *saved = tensor_copy(m, "a/h.0.q.lora_B", &n);
    int nonzero = 0;
    for (int64_t i = 0; i < n; i++)
        nonzero += saved[i] != 0.0f;
    assert_true(nonzero > 0);   /* the randomised values, not LoRA's zero init */
    pr_pipeline_counts c;
    assert_int_equal(pr_pipeline_counts_get(p, &c, &err), PR_OK);
    assert_int_equal(c.trainable, 0);
    assert_int_equal(c.modules, 2 * (4 * (32 + 32)) * 2);
    assert_int_equal(c.all, c.base + c.modules);
    pr_tokenizer_free(tok);
    pr_model_free(m);
    pr_pipeline_free(p);

    /* continue: starts from the saved values and trains them */
    snprintf(mods, sizeof mods, "  - {load: %s/a/modules/a.safetensors, mode: continue}\n", tmp);
    p = pipeline("continue.yaml", mods, "continue", &m, &tok, &err);
    assert_non_null(p);
    t = pr_model_find_tensor(m, "a/h.0.q.lora_B");
    assert_non_null(t->grad);
    assert_memory_equal(t->data, saved, (size_t)n * sizeof *saved);
    pr_train_config tc;
    pr_pipeline_train_config(p, &tc);
    tc.quiet = 1;
    pr_train_result res;
    assert_int_equal(pr_train(m, tok, &tc, &res, &err), PR_OK);
    assert_memory_not_equal(t->data, saved, (size_t)n * sizeof *saved);
    pr_tokenizer_free(tok);
    pr_model_free(m);
    pr_pipeline_free(p);

    /* new: same configuration and shapes, fresh init (LoRA's B = 0) */
    snprintf(mods, sizeof mods, "  - {load: %s/a/modules/a.safetensors, mode: new, name: fresh}\n", tmp);
    p = pipeline("new.yaml", mods, "new", &m, &tok, &err);
    assert_non_null(p);
    t = pr_model_find_tensor(m, "fresh/h.0.q.lora_B");
    assert_non_null(t);
    assert_non_null(t->grad);
    assert_int_equal(t->numel, n);
    for (int64_t i = 0; i < n; i++)
        assert_true(t->data[i] == 0.0f);
    assert_int_equal(pr_pipeline_counts_get(p, &c, &err), PR_OK);
    assert_int_equal(c.trainable, 2 * (4 * (32 + 32)) * 2);
    pr_tokenizer_free(tok);
    pr_model_free(m);
    pr_pipeline_free(p);
    free(saved);

    /* mode is required, at the module's line and column */
    snprintf(mods, sizeof mods, "  - {load: %s/a/modules/a.safetensors}\n", tmp);
    assert_null(pipeline("nomode.yaml", mods, "nomode", NULL, NULL, &err));
    assert_non_null(strstr(err.msg, "nomode.yaml:5:5: modules.0: missing required key 'mode'"));
    /* a saved module brings its own technique */
    snprintf(mods, sizeof mods, "  - {load: %s/a/modules/a.safetensors, mode: frozen, technique: lora}\n", tmp);
    assert_null(pipeline("extra.yaml", mods, "extra", NULL, NULL, &err));
    assert_non_null(strstr(err.msg, "modules.0.technique: a saved module brings its own"));
}

/* A module trained on task A reused frozen beside a new module for task B:
 * training B leaves A's tensors unchanged bit for bit. */
static void test_reuse_frozen_with_new(void **state)
{
    (void)state;
    make_task_a("ta", "4", 2);
    char mods[512];
    snprintf(mods, sizeof mods,
             "  - {load: %s/ta/modules/ta.safetensors, mode: frozen}\n  - {technique: ia3, name: tb}\n", tmp);
    pr_error err = { 0 };
    pr_model *m = NULL;
    pr_tokenizer *tok = NULL;
    pr_pipeline *p = pipeline("reuse.yaml", mods, "reuse", &m, &tok, &err);
    if (!p)
        fprintf(stderr, "%s\n", err.msg);
    assert_non_null(p);
    int64_t na, nb;
    float *a0 = tensor_copy(m, "ta/h.1.v.lora_A", &na);
    float *a1 = tensor_copy(m, "ta/h.0.q.lora_B", &na);
    float *b0 = tensor_copy(m, "tb/h.0.ffn.act.ia3_l", &nb);
    pr_train_config tc;
    pr_pipeline_train_config(p, &tc);
    tc.quiet = 1;
    pr_train_result res;
    assert_int_equal(pr_train(m, tok, &tc, &res, &err), PR_OK);
    assert_memory_equal(pr_model_find_tensor(m, "ta/h.1.v.lora_A")->data, a0, (size_t)pr_model_find_tensor(m, "ta/h.1.v.lora_A")->numel * sizeof(float));
    assert_memory_equal(pr_model_find_tensor(m, "ta/h.0.q.lora_B")->data, a1, (size_t)na * sizeof(float));
    assert_memory_not_equal(pr_model_find_tensor(m, "tb/h.0.ffn.act.ia3_l")->data, b0, (size_t)nb * sizeof(float));
    /* the run saves B and references A */
    assert_int_equal(pr_pipeline_save_run(p, m, &res, &err), PR_OK);
    char *snap = path_in("reuse/pipeline.yaml"), *tb = path_in("reuse/modules/tb.safetensors"),
         *ta = path_in("reuse/modules/ta.safetensors");
    assert_int_equal(access(tb, R_OK), 0);
    assert_int_not_equal(access(ta, R_OK), 0);
    pr_tokenizer_free(tok);
    pr_model_free(m);
    pr_pipeline_free(p);
    /* the snapshot reloads the run as a whole */
    pr_pipeline *q = NULL;
    assert_int_equal(pr_pipeline_load(snap, NULL, 0, reg, &q, &err), PR_OK);
    assert_int_equal(pr_pipeline_n_modules(q), 2);
    pr_pipeline_free(q);
    free(snap);
    free(tb);
    free(ta);
    free(a0);
    free(a1);
    free(b0);
}

static void test_average(void **state)
{
    (void)state;
    make_task_a("av1", "4", 3);
    make_task_a("av2", "4", 4);
    char mods[512];
    pr_error err = { 0 };
    pr_model *m = NULL;
    pr_tokenizer *tok = NULL;
    /* host-named modules average under one name: load both under "av" */
    char cmd[1024];
    snprintf(cmd, sizeof cmd, "cd '%s' && mkdir -p x && cp av1/modules/av1.safetensors x/one.safetensors && "
             "cp av2/modules/av2.safetensors x/two.safetensors", tmp);
    assert_int_equal(system(cmd), 0);
    /* different module names are refused, naming both files */
    snprintf(mods, sizeof mods, "  - {average: [%s/x/one.safetensors, %s/x/two.safetensors], mode: frozen}\n", tmp, tmp);
    pr_pipeline *p = pipeline("avg.yaml", mods, "avg", &m, &tok, &err);
    assert_null(p);
    assert_non_null(strstr(err.msg, "one.safetensors"));
    assert_non_null(strstr(err.msg, "two.safetensors"));

    /* same name: resave av2's values under av1's name through a pipeline */
    snprintf(mods, sizeof mods, "  - {load: %s/x/two.safetensors, mode: continue, name: av1}\n", tmp);
    p = pipeline("rename.yaml", mods, "rename", &m, &tok, &err);
    assert_non_null(p);
    assert_int_equal(pr_pipeline_save_run(p, m, NULL, &err), PR_OK);
    pr_tokenizer_free(tok);
    pr_model_free(m);
    pr_pipeline_free(p);

    snprintf(mods, sizeof mods,
             "  - {average: [%s/av1/modules/av1.safetensors, %s/rename/modules/av1.safetensors], mode: frozen}\n", tmp,
             tmp);
    p = pipeline("avg2.yaml", mods, "avg2", &m, &tok, &err);
    if (!p)
        fprintf(stderr, "%s\n", err.msg);
    assert_non_null(p);
    pr_model *ma = NULL, *mb = NULL;
    pr_module_load_options lo = { 0 };
    ma = tiny_model(3);
    mb = tiny_model(3);
    char *fa = path_in("av1/modules/av1.safetensors"), *fb = path_in("rename/modules/av1.safetensors");
    lo.force = 1;
    assert_int_equal(pr_module_load(ma, fa, reg, &lo, NULL, &err), PR_OK);
    assert_int_equal(pr_module_load(mb, fb, reg, &lo, NULL, &err), PR_OK);
    int checked = 0;
    for (int i = 0; i < pr_model_n_tensors(m); i++) {
        const pr_tensor_info *t = pr_model_tensor(m, i);
        if (t->kind != PR_TENSOR_MODULE)
            continue;
        const pr_tensor_info *x = pr_model_find_tensor(ma, t->name), *y = pr_model_find_tensor(mb, t->name);
        assert_non_null(x);
        assert_non_null(y);
        for (int64_t k = 0; k < t->numel; k++) {
            float want = (float)(0.5 * (double)x->data[k] + 0.5 * (double)y->data[k]);
            assert_memory_equal(&t->data[k], &want, sizeof want);
        }
        assert_memory_not_equal(x->data, y->data, (size_t)t->numel * sizeof(float));
        checked++;
    }
    assert_int_equal(checked, 8);
    pr_tokenizer_free(tok);
    pr_model_free(m);
    pr_pipeline_free(p);
    pr_model_free(ma);
    pr_model_free(mb);

    /* one technique with identical options only: r 4 vs 2 is named */
    make_task_a("av3", "2", 5);
    snprintf(cmd, sizeof cmd, "cd '%s' && cp av3/modules/av3.safetensors x/av1.safetensors", tmp);
    assert_int_equal(system(cmd), 0);
    snprintf(mods, sizeof mods, "  - {average: [%s, %s/x/av1.safetensors], mode: continue}\n", fa, tmp);
    assert_null(pipeline("avg3.yaml", mods, "avg3", NULL, NULL, &err));
    assert_non_null(strstr(err.msg, "differ in options: 'r' is 4 in one and 2 in the other"));
    assert_non_null(strstr(err.msg, "av1/modules/av1.safetensors"));
    assert_non_null(strstr(err.msg, "x/av1.safetensors"));
    free(fa);
    free(fb);
}

/* ---- the command line: train outputs, eval, merge, generate ------------------------------- */

/* Run a shell command, its standard output into buf. */
static int run(char *buf, size_t len, const char *fmt, ...)
{
    char cmd[4096];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(cmd, sizeof cmd, fmt, ap);
    va_end(ap);
    FILE *p = popen(cmd, "r");
    assert_non_null(p);
    size_t n = fread(buf, 1, len - 1, p);
    buf[n] = '\0';
    int st = pclose(p);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

static double json_loss(const char *out)
{
    const char *l = strstr(out, "\"loss\": ");
    assert_non_null(l);
    return strtod(l + 8, NULL);
}

static int count(const char *s, const char *needle)
{
    int n = 0;
    for (const char *p = strstr(s, needle); p; p = strstr(p + 1, needle))
        n++;
    return n;
}

static void test_cli_train_merge_generate(void **state)
{
    (void)state;
    char *yaml = path_in("cli.yaml");
    char text[2048], out[8192], out2[8192];
    snprintf(text, sizeof text,
             "%smodules:\n  - {technique: lora, name: l, sites: [qkv, o], options: {r: 4, alpha: 8}}\n"
             "  - {technique: ia3, name: s}\ntask:\n  type: lm\n  train: %s\n"
             "train: {steps: 4, batch: 2, seq_len: 16, lr: 0.05, schedule: constant, eval_every: 2, "
             "eval_batches: 2, log_every: 0, output: %s/clirun}\n",
             model_yaml, CORPUS, tmp);
    write_text(yaml, text);
    assert_int_equal(run(out, sizeof out, "%s train '%s' --quiet 2>&1", PEFTREF_BIN, yaml), 0);

    /* loss.svg: an SVG document with axes, the train line, validation points, a legend */
    char *svg_path = path_in("clirun/loss.svg");
    FILE *f = fopen(svg_path, "r");
    assert_non_null(f);
    char svg[65536];
    size_t n = fread(svg, 1, sizeof svg - 1, f);
    svg[n] = '\0';
    fclose(f);
    assert_true(strncmp(svg, "<?xml version=\"1.0\"", 19) == 0);
    assert_non_null(strstr(svg, "<svg xmlns=\"http://www.w3.org/2000/svg\""));
    assert_non_null(strstr(svg, "</svg>\n"));
    assert_int_equal(count(svg, "<svg"), 1);
    assert_int_equal(count(svg, "<g"), count(svg, "</g>"));
    assert_int_equal(count(svg, "<text"), count(svg, "</text>"));
    assert_int_equal(count(svg, "<polyline class=\"train\""), 1);
    assert_int_equal(count(svg, "<circle cx"), 3 + 1);   /* steps 0, 2, 4 and the legend's */
    assert_non_null(strstr(svg, ">step</text>"));
    assert_non_null(strstr(svg, ">train loss</text>"));
    assert_non_null(strstr(svg, ">validation loss</text>"));
    assert_non_null(strstr(svg, "class=\"x-ticks\""));
    assert_non_null(strstr(svg, "class=\"y-ticks\""));
    free(svg_path);

    /* merged model evaluates as the run with its modules */
    char *run_dir = path_in("clirun"), *merged = path_in("merged");
    assert_int_equal(run(out, sizeof out, "%s eval --pipeline '%s' --data %s --seq-len 16 --json", PEFTREF_BIN,
                         run_dir, CORPUS), 0);
    assert_int_equal(run(out2, sizeof out2, "%s merge '%s' --out '%s'", PEFTREF_BIN, run_dir, merged), 0);
    assert_non_null(strstr(out2, "merged 2 modules"));
    assert_int_equal(run(out2, sizeof out2, "%s eval --model '%s' --data %s --seq-len 16 --json", PEFTREF_BIN, merged,
                         CORPUS), 0);
    double with = json_loss(out), merged_loss = json_loss(out2);
    assert_true(fabs(with - merged_loss) <= 1e-5);
    /* without its modules the base evaluates differently */
    assert_int_equal(run(out2, sizeof out2, "%s eval --pipeline '%s' --set modules=[] --data %s --json", PEFTREF_BIN,
                         yaml, CORPUS), 0);
    assert_true(fabs(json_loss(out2) - with) > 1e-4);

    /* a module without merge() is named, or left out on request */
    char *p2 = path_in("prompt.yaml");
    snprintf(text, sizeof text,
             "%smodules:\n  - {load: %s/clirun/modules/l.safetensors, mode: frozen}\n"
             "  - {technique: adapter_pfeiffer, name: ad}\ntask:\n  train: %s\n",
             model_yaml, tmp, CORPUS);
    write_text(p2, text);
    assert_int_equal(run(out2, sizeof out2, "%s merge '%s' --out '%s/m2' 2>&1", PEFTREF_BIN, p2, tmp), 1);
    assert_non_null(strstr(out2, "module 'ad' (technique adapter_pfeiffer) cannot be merged"));
    assert_int_equal(run(out2, sizeof out2, "%s merge '%s' --out '%s/m2' --skip-unmergeable 2>&1", PEFTREF_BIN, p2,
                         tmp), 0);
    assert_non_null(strstr(out2, "warning: left out module 'ad'"));
    assert_non_null(strstr(out2, "merged 1 module (some left out)"));

    /* generate: deterministic for a seed; greedy ignores the seed */
    assert_int_equal(run(out, sizeof out, "%s generate '%s' --prompt 'The ' --tokens 12 --seed 7", PEFTREF_BIN,
                         run_dir), 0);
    assert_int_equal(run(out2, sizeof out2, "%s generate '%s' --prompt 'The ' --tokens 12 --seed 7", PEFTREF_BIN,
                         run_dir), 0);
    assert_string_equal(out, out2);
    assert_true(strncmp(out, "The ", 4) == 0);
    assert_int_equal(run(out, sizeof out, "%s generate '%s' --prompt 'The ' --tokens 12 --temperature 0 --seed 1",
                         PEFTREF_BIN, run_dir), 0);
    assert_int_equal(run(out2, sizeof out2,
                         "%s generate '%s' --prompt 'The ' --tokens 12 --temperature 0 --seed 99 --top-k 5",
                         PEFTREF_BIN, run_dir), 0);
    assert_string_equal(out, out2);
    /* the merged model greedily generates what the run does */
    assert_int_equal(run(out2, sizeof out2, "%s generate --model '%s' --prompt 'The ' --tokens 12 --temperature 0",
                         PEFTREF_BIN, merged), 0);
    assert_string_equal(out, out2);
    assert_int_equal(run(out, sizeof out, "%s generate --help", PEFTREF_BIN), 0);
    assert_non_null(strstr(out, "usage: peftref generate"));
    assert_int_equal(run(out, sizeof out, "%s merge --help", PEFTREF_BIN), 0);
    assert_non_null(strstr(out, "usage: peftref merge"));
    free(p2);
    free(run_dir);
    free(merged);
    free(yaml);
}

int main(int argc, char **argv)
{
    (void)argc;
    runtime_reexec_if_needed(argv);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_roundtrip_lora_peft_names),
        cmocka_unit_test(test_roundtrip_lora_host_names),
        cmocka_unit_test(test_roundtrip_ia3),
        cmocka_unit_test(test_roundtrip_prompt),
        cmocka_unit_test(test_fold_prefix_mlp),
        cmocka_unit_test(test_fingerprint_mismatch),
        cmocka_unit_test(test_bad_metadata_names_quoted),
        cmocka_unit_test(test_average_short_tensor_names),
        cmocka_unit_test(test_modes),
        cmocka_unit_test(test_reuse_frozen_with_new),
        cmocka_unit_test(test_average),
        cmocka_unit_test(test_cli_train_merge_generate),
    };
    return cmocka_run_group_tests(tests, setup_all, teardown_all);
}
