/* Hugging Face PEFT adapters in and out (docs/modules.md, "Interoperability").
 *
 * Import.  tests/ref/make_peft_fixtures.py (float64 PyTorch, PEFT's keys,
 * shapes and config fields written by hand; PEFT is not installed) wrote
 * adapters of every imported type for the GPT-2 and LLaMA (gqa) parity
 * models, with the mean loss on their 2-sequence batch.  Each is loaded by a
 * pipeline's `load:` and must give that loss within 1e-4 relative (float32
 * against float64; the rounding measured is below 1e-6).  The adapters move
 * the base loss by 5e-4 (GPT-2 ia3) to 2e-1 relative.  Covered: LoRA with
 * rsLoRA, rank_pattern, alpha_pattern, GPT-2's "c_proj" matching both
 * attn.c_proj and mlp.c_proj, a regular-expression target_modules,
 * layers_to_transform; DoRA; IA3 with feedforward_modules; prompt tuning;
 * prefix tuning (against the reference's loss with the tokens at positions
 * 0.., peftref's convention; Hugging Face's, after the prefix, is printed);
 * LoHa, LoKr, OFT, BOFT (two butterfly factors), HRA, trainable tokens
 * (LLaMA), VeRA, FourierFT (with n_frequency_pattern), P-tuning and AdaLoRA
 * (both; GPT-2's with a rank_pattern that resized three of its four
 * modules, LLaMA's without one).  lora_fa exports as LORA.  AdaLoRA's round
 * trip also checks the kept triplets found again from lora_E's zeros.
 * The seven PEFT LoRA adapters of tests/ref/llama-parity load the same way
 * and give loss_lora.
 *
 * Round trips.  PEFT -> peftref -> PEFT (`peftref export --format peft`)
 * gives back the same tensors bit for bit and the same loss bit for bit, and
 * `--format peftref` of a pipeline that loaded a PEFT adapter writes the same
 * values under peftref's module format.
 *
 * Refusals.  Each refusal's message is checked, and a failed export leaves
 * nothing at --out.
 *
 * PiSSA.  A lora module with init_lora_weights pissa, trained a few steps,
 * exports as a plain LoRA of rank 2r; on the original base it gives the
 * pissa module's logits within 1e-5 relative. */
#include <jansson.h>
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <cmocka.h>

#include "peftref/peftref.h"
#include "peftref/pipeline.h"
#include "harness.h"
#include "safetensors.h"

#define REF TEST_SRCDIR "/ref"
#define FIX REF "/peft-adapters"
#define PLUGINS TEST_BUILDDIR "/plugins/.libs"
#define CLI TEST_BUILDDIR "/peftref"
#define RTOL 1e-4

static pr_registry *reg;
static char *tmp;

static int setup(void **state)
{
    (void)state;
    pr_error err = { 0 };
    if (pr_registry_open(PLUGINS, &reg, &err) != PR_OK) {
        fprintf(stderr, "registry: %s\n", err.msg);
        return -1;
    }
    tmp = th_scratch_dir("peft-interop");
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    pr_registry_free(reg);
    th_remove_tree(tmp);
    free(tmp);
    return 0;
}

typedef struct batch {
    int B, T;
    int *tokens, *targets;
} batch;

static void batch_read(const char *path, batch *b)
{
    st_file *st = NULL;
    pr_error err = { 0 };
    if (st_open(path, 0, &st, &err))
        fail_msg("%s", err.msg);
    const st_tensor *tk = st_find(st, "tokens"), *tg = st_find(st, "targets");
    assert_non_null(tk);
    assert_non_null(tg);
    b->B = (int)tk->shape[0];
    b->T = (int)tk->shape[1];
    size_t n = (size_t)b->B * b->T;
    float *a = malloc(n * sizeof *a), *c = malloc(n * sizeof *c);
    b->tokens = malloc(n * sizeof(int));
    b->targets = malloc(n * sizeof(int));
    assert_true(a && c && b->tokens && b->targets);
    assert_int_equal(st_to_f32(st, tk, a, &err), PR_OK);
    assert_int_equal(st_to_f32(st, tg, c, &err), PR_OK);
    for (size_t i = 0; i < n; i++) {
        b->tokens[i] = (int)lrintf(a[i]);
        b->targets[i] = (int)lrintf(c[i]);
    }
    free(a);
    free(c);
    st_close(st);
}

static void batch_free(batch *b)
{
    free(b->tokens);
    free(b->targets);
}

static const char *base_dir(const char *base)
{
    return !strcmp(base, "gpt2") ? REF "/gpt2-parity" : REF "/llama-parity/gqa";
}

/* A pipeline at tmp/NAME.yaml on model dir with one `load:` entry (extra:
 * more keys of it, e.g. "allow_unknown_fields: true"). */
static void write_pipeline(const char *name, const char *model, const char *load, const char *extra, char *path,
                           size_t len)
{
    snprintf(path, len, "%s/%s.yaml", tmp, name);
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fprintf(f, "model:\n  path: %s\ntask: {type: lm, train: %s/../data/fortunes/adapt-train.txt}\nmodules:\n"
               "  - load: %s\n    mode: frozen\n%s%s%s", model, TEST_SRCDIR, load, extra ? "    " : "",
            extra ? extra : "", extra ? "\n" : "");
    fclose(f);
}

/* Load the pipeline: 0 and *p, or the error text in msg. */
static int load_pipeline(const char *path, pr_pipeline **p, char *msg, size_t len)
{
    pr_error err = { 0 };
    *p = NULL;
    int rc = pr_pipeline_load(path, NULL, 0, reg, p, &err);
    if (rc && msg)
        snprintf(msg, len, "%s", err.msg);
    return rc;
}

/* The mean loss of the pipeline's model on b; logits copied to *logits when given. */
static double pipeline_loss(const char *path, const batch *b, float **logits)
{
    pr_pipeline *p = NULL;
    char msg[PR_ERROR_MSG_MAX];
    if (load_pipeline(path, &p, msg, sizeof msg))
        fail_msg("%s: %s", path, msg);
    pr_model *m = NULL;
    pr_tokenizer *tok = NULL;
    pr_error err = { 0 };
    if (pr_pipeline_build(p, &m, &tok, &err))
        fail_msg("%s: build: %s", path, err.msg);
    if (pr_model_reserve(m, b->B, b->T, &err))
        fail_msg("reserve: %s", err.msg);
    pr_batch pb = { .tokens = b->tokens, .targets = b->targets, .B = b->B, .T = b->T };
    float loss = NAN;
    if (pr_model_forward(m, &pb, &loss, &err))
        fail_msg("forward: %s", err.msg);
    if (logits) {
        size_t n = (size_t)b->B * b->T * pr_model_get_config(m)->vocab_size;
        *logits = malloc(n * sizeof **logits);
        assert_non_null(*logits);
        /* the real positions' logits (prompt tuning adds virtual ones first) */
        memcpy(*logits, pr_model_logits(m), n * sizeof **logits);
    }
    pr_tokenizer_free(tok);
    pr_model_free(m);
    pr_pipeline_free(p);
    return loss;
}

static json_t *expected(void)
{
    json_error_t je;
    json_t *j = json_load_file(FIX "/expected.json", 0, &je);
    if (!j)
        fail_msg("%s: %s", FIX "/expected.json", je.text);
    return j;
}

/* ---- import ---------------------------------------------------------------------------------------- */

static void test_import_fixtures(void **state)
{
    (void)state;
    json_t *ex = expected();
    const char *name;
    json_t *v;
    int n = 0;
    json_object_foreach(ex, name, v) {
        const char *base = json_string_value(json_object_get(v, "base"));
        /* Hugging Face's loss: prefix cases place the tokens after the prefix */
        double want = json_number_value(json_object_get(v, "loss"));
        double pos0 = json_number_value(json_object_get(v, "loss_pos0"));
        char model[512], load[512], path[1024], bpath[1024];
        snprintf(model, sizeof model, "%s/model", base_dir(base));
        snprintf(load, sizeof load, FIX "/%s", name);
        snprintf(bpath, sizeof bpath, "%s/expected.safetensors", base_dir(base));
        batch b;
        batch_read(bpath, &b);
        write_pipeline(name, model, load, NULL, path, sizeof path);
        double got = pipeline_loss(path, &b, NULL);
        double rel = fabs(got - want) / fabs(want);
        fprintf(stderr, "  %-16s loss %.9f reference %.9f: %.2e relative%s", name, got, want, rel,
                rel <= RTOL ? "" : "  <-- FAIL");
        if (pos0 != want)
            fprintf(stderr, " (with the tokens at positions 0.. instead: %.9f)", pos0);
        fputc('\n', stderr);
        assert_true(rel <= RTOL);
        batch_free(&b);
        n++;
    }
    assert_int_equal(n, 25);
    json_decref(ex);
}

static void test_import_llama_parity(void **state)
{
    (void)state;
    static const char *const cases[] = { "gqa", "mqa", "mha", "bias", "qwen2", "qwen3", "mistral" };
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        char model[512], load[512], path[1024], bpath[1024];
        snprintf(model, sizeof model, REF "/llama-parity/%s/model", cases[c]);
        snprintf(load, sizeof load, REF "/llama-parity/%s/lora", cases[c]);
        snprintf(bpath, sizeof bpath, REF "/llama-parity/%s/expected.safetensors", cases[c]);
        batch b;
        batch_read(bpath, &b);
        st_file *st = NULL;
        pr_error err = { 0 };
        assert_int_equal(st_open(bpath, 0, &st, &err), PR_OK);
        float want;
        assert_int_equal(st_to_f32(st, st_find(st, "loss_lora"), &want, &err), PR_OK);
        st_close(st);
        char name[64];
        snprintf(name, sizeof name, "parity_%s", cases[c]);
        write_pipeline(name, model, load, NULL, path, sizeof path);
        double got = pipeline_loss(path, &b, NULL), rel = fabs(got - want) / fabs(want);
        fprintf(stderr, "  llama-parity/%-8s loss %.9f loss_lora %.9f: %.2e relative\n", cases[c], got, want, rel);
        assert_true(rel <= RTOL);
        batch_free(&b);
    }
}

/* ---- round trips ------------------------------------------------------------------------------------ */

static int run_cli(const char *const *args, char *err_text, size_t len)
{
    char errp[1024], outp[1024];
    snprintf(errp, sizeof errp, "%s/cli.err", tmp);
    snprintf(outp, sizeof outp, "%s/cli.out", tmp);
    int rc = th_run_cli(CLI, PLUGINS, args, outp, errp);
    if (err_text) {
        err_text[0] = '\0';
        FILE *f = fopen(errp, "r");
        if (f) {
            size_t n = fread(err_text, 1, len - 1, f);
            err_text[n] = '\0';
            fclose(f);
        }
    }
    return rc;
}

/* Every tensor of a equals b's, bytes and shapes. */
static void same_tensors(const char *a_path, const char *b_path)
{
    st_file *a = NULL, *b = NULL;
    pr_error err = { 0 };
    assert_int_equal(st_open(a_path, 0, &a, &err), PR_OK);
    assert_int_equal(st_open(b_path, 0, &b, &err), PR_OK);
    assert_int_equal(st_count(a), st_count(b));
    for (int i = 0; i < st_count(a); i++) {
        const st_tensor *t = st_tensor_at(a, i), *u = st_find(b, t->name);
        if (!u)
            fail_msg("%s: no tensor '%s' of %s", b_path, t->name, a_path);
        assert_int_equal(t->ndim, u->ndim);
        for (int d = 0; d < t->ndim; d++)
            assert_int_equal(t->shape[d], u->shape[d]);
        assert_int_equal(t->nbytes, u->nbytes);
        assert_memory_equal(t->data, u->data, t->nbytes);
    }
    st_close(a);
    st_close(b);
}

static void test_round_trip(void **state)
{
    (void)state;
    json_t *ex = expected();
    const char *name;
    json_t *v;
    json_object_foreach(ex, name, v) {
        const char *base = json_string_value(json_object_get(v, "base"));
        char model[512], load[512], path[1024], path2[1024], out[1024], bpath[1024], a[1100], b2[1100];
        snprintf(model, sizeof model, "%s/model", base_dir(base));
        snprintf(load, sizeof load, FIX "/%s", name);
        snprintf(bpath, sizeof bpath, "%s/expected.safetensors", base_dir(base));
        snprintf(out, sizeof out, "%s/rt_%s", tmp, name);
        batch b;
        batch_read(bpath, &b);
        char rt[80];
        snprintf(rt, sizeof rt, "rt1_%s", name);
        write_pipeline(rt, model, load, NULL, path, sizeof path);
        const char *args[] = { "peftref", "export", path, "--format", "peft", "--out", out, NULL };
        char e[2048];
        if (run_cli(args, e, sizeof e) != 0)
            fail_msg("export %s: %s", name, e);
        snprintf(a, sizeof a, "%s/adapter_model.safetensors", load);
        snprintf(b2, sizeof b2, "%s/adapter_model.safetensors", out);
        same_tensors(a, b2);
        same_tensors(b2, a);
        snprintf(rt, sizeof rt, "rt2_%s", name);
        write_pipeline(rt, model, out, NULL, path2, sizeof path2);
        double l1 = pipeline_loss(path, &b, NULL), l2 = pipeline_loss(path2, &b, NULL);
        assert_true(l1 == l2);   /* bit for bit */
        /* and into peftref's own module file: the same values */
        char mf[1024];
        snprintf(mf, sizeof mf, "%s/rt_%s.safetensors", tmp, name);
        const char *args2[] = { "peftref", "export", path2, "--format", "peftref", "--out", mf, NULL };
        if (run_cli(args2, e, sizeof e) != 0)
            fail_msg("export peftref %s: %s", name, e);
        /* adalora's module file holds lora_E whole, under peftref's names (plugins/adalora.c) */
        if (!strstr(name, "adalora"))
            same_tensors(a, mf);
        snprintf(rt, sizeof rt, "rt3_%s", name);
        write_pipeline(rt, model, mf, NULL, path2, sizeof path2);
        assert_true(pipeline_loss(path2, &b, NULL) == l1);
        if (strstr(name, "adalora")) {
            /* the module file carries no rank_pattern buffer (it comes back as ones): the kept
             * triplets are found from lora_E's zeros, the same PEFT tensors again */
            snprintf(out, sizeof out, "%s/rt4_%s", tmp, name);
            const char *args3[] = { "peftref", "export", path2, "--format", "peft", "--out", out, NULL };
            if (run_cli(args3, e, sizeof e) != 0)
                fail_msg("export %s from its module file: %s", name, e);
            snprintf(b2, sizeof b2, "%s/adapter_model.safetensors", out);
            same_tensors(a, b2);
            same_tensors(b2, a);
        }
        batch_free(&b);
    }
    json_decref(ex);
}

/* ---- refusals ---------------------------------------------------------------------------------------- */

/* A copy of fixture src at tmp/name whose adapter_config.json has field set
 * to the JSON value (NULL: removed). */
static void variant(const char *src, const char *name, const char *field, const char *value, char *dir,
                    size_t len)
{
    snprintf(dir, len, "%s/%s", tmp, name);
    mkdir(dir, 0777);
    char p[1024], q[1024];
    snprintf(p, sizeof p, "%s/adapter_config.json", src);
    json_error_t je;
    json_t *c = json_load_file(p, 0, &je);
    assert_non_null(c);
    if (value) {
        json_t *v = json_loads(value, JSON_DECODE_ANY, &je);
        assert_non_null(v);
        json_object_set_new(c, field, v);
    } else {
        json_object_del(c, field);
    }
    snprintf(q, sizeof q, "%s/adapter_config.json", dir);
    assert_int_equal(json_dump_file(c, q, JSON_INDENT(2)), 0);
    json_decref(c);
    snprintf(p, sizeof p, "%s/adapter_model.safetensors", src);
    snprintf(q, sizeof q, "%s/adapter_model.safetensors", dir);
    unlink(q);
    assert_int_equal(symlink(p, q), 0);
}

static void expect_refusal(const char *model, const char *dir, const char *extra, const char *want)
{
    char path[1024], msg[PR_ERROR_MSG_MAX];
    const char *b = strrchr(dir, '/');
    write_pipeline(b + 1, model, dir, extra, path, sizeof path);
    pr_pipeline *p = NULL;
    int rc = load_pipeline(path, &p, msg, sizeof msg);
    if (rc == 0) {
        /* some refusals come when the values are filled */
        pr_model *m = NULL;
        pr_tokenizer *tok = NULL;
        pr_error err = { 0 };
        rc = pr_pipeline_build(p, &m, &tok, &err);
        snprintf(msg, sizeof msg, "%s", err.msg);
        pr_tokenizer_free(tok);
        pr_model_free(m);
        pr_pipeline_free(p);
    }
    if (!rc || !strstr(msg, want))
        fail_msg("%s: expected an error containing\n    %s\ngot (rc %d)\n    %s", dir, want, rc, msg);
}

static void test_refusals(void **state)
{
    (void)state;
    const char *g2 = REF "/gpt2-parity/model", *ll = REF "/llama-parity/gqa/model";
    char d[1024], want[2048];

    variant(FIX "/gpt2_lora", "bad_type", "peft_type", "\"FOO\"", d, sizeof d);
    /* the types come from the techniques found, each once, in order */
    snprintf(want, sizeof want, "%s: no technique found declares PEFT type FOO; those found read ADALORA, BOFT, "
             "FOURIERFT, HRA, IA3, LOHA, LOKR, LORA, OFT, PREFIX_TUNING, PROMPT_TUNING, P_TUNING, TRAINABLE_TOKENS, "
             "VERA (peftref plugins lists the techniques)", d);
    expect_refusal(g2, d, NULL, want);

    variant(FIX "/gpt2_lora", "known_type", "peft_type", "\"POLY\"", d, sizeof d);
    snprintf(want, sizeof want, "%s: no technique found declares PEFT type POLY; those found read ADALORA, ", d);
    expect_refusal(g2, d, NULL, want);

    variant(FIX "/gpt2_lora", "bad_bias", "bias", "\"all\"", d, sizeof d);
    snprintf(want, sizeof want, "%s/adapter_config.json: bias = \"all\" is not supported: peftref's lora trains no "
             "biases (BitFit is a module of its own)", d);
    expect_refusal(g2, d, NULL, want);

    variant(FIX "/gpt2_lora", "bad_lora_bias", "lora_bias", "true", d, sizeof d);
    snprintf(want, sizeof want, "%s/adapter_config.json: lora_bias = true is not supported: peftref's lora has no "
             "bias of its own", d);
    expect_refusal(g2, d, NULL, want);

    variant(FIX "/gpt2_lora", "bad_mts", "modules_to_save", "[\"lm_head\"]", d, sizeof d);
    snprintf(want, sizeof want, "%s/adapter_config.json: modules_to_save = [\"lm_head\"] is not supported: peftref "
             "imports adapters without modules_to_save", d);
    expect_refusal(g2, d, NULL, want);

    variant(FIX "/llama_lora", "bad_fifo", "fan_in_fan_out", "true", d, sizeof d);
    snprintf(want, sizeof want, "%s/adapter_config.json: fan_in_fan_out = true is not supported: the LLaMA family's "
             "projections are nn.Linear [out, in]", d);
    expect_refusal(ll, d, NULL, want);

    variant(FIX "/gpt2_lora", "unknown_field", "frobnicate", "3", d, sizeof d);
    snprintf(want, sizeof want, "%s/adapter_config.json: unknown field 'frobnicate' for peft_type LORA "
             "(allow_unknown_fields: true in the load entry accepts it)", d);
    expect_refusal(g2, d, NULL, want);
    /* ... which allow_unknown_fields accepts, with the same loss */
    {
        char path[1024], bpath[1024];
        write_pipeline("unknown_ok", g2, d, "allow_unknown_fields: true", path, sizeof path);
        snprintf(bpath, sizeof bpath, "%s/expected.safetensors", REF "/gpt2-parity");
        batch b;
        batch_read(bpath, &b);
        json_t *ex = expected();
        double want_l = json_number_value(json_object_get(json_object_get(ex, "gpt2_lora"), "loss"));
        assert_true(fabs(pipeline_loss(path, &b, NULL) - want_l) <= RTOL * want_l);
        json_decref(ex);
        batch_free(&b);
    }

    /* shape mismatch: rank_pattern says 3 where the tensors have rank 2 */
    variant(FIX "/gpt2_lora", "bad_shape", "rank_pattern", "{\"attn.c_attn\": 3}", d, sizeof d);
    snprintf(want, sizeof want, "%s: tensor 'base_model.model.transformer.h.0.attn.c_attn.lora_A.weight' is "
             "[2, 48] but module 'bad_shape' (as planned) needs [3, 48]", d);
    expect_refusal(g2, d, NULL, want);

    /* missing key: target_modules names a module the file has no tensors for */
    variant(FIX "/gpt2_lora", "missing_key", "target_modules", "[\"c_attn\", \"c_proj\", \"c_fc\"]", d, sizeof d);
    snprintf(want, sizeof want, "%s: no tensor 'base_model.model.transformer.h.0.mlp.c_fc.lora_A.weight' for "
             "parameter 'missing_key/h.0.ffn.up.lora_A' of module 'missing_key'", d);
    expect_refusal(g2, d, NULL, want);

    /* a tensor no target covers */
    variant(FIX "/gpt2_lora", "extra_key", "target_modules", "[\"c_attn\", \"attn.c_proj\"]", d, sizeof d);
    snprintf(want, sizeof want, "%s: tensor 'base_model.model.transformer.h.0.mlp.c_proj.lora_A.weight' matches no "
             "parameter of module 'extra_key'", d);
    expect_refusal(g2, d, NULL, want);

    /* base mismatch: a GPT-2 adapter on a LLaMA model, and a LLaMA one on GPT-2 */
    variant(FIX "/gpt2_lora", "wrong_family", "fan_in_fan_out", "false", d, sizeof d);
    snprintf(want, sizeof want, "%s/adapter_config.json: target_modules = [\"c_attn\",\"c_proj\"] selects no module "
             "of this LLaMA-family base model (is the adapter for another model?)", d);
    expect_refusal(ll, d, NULL, want);
    variant(FIX "/llama_ia3", "wrong_family2", "target_modules", "[\"c_attn\"]", d, sizeof d);
    snprintf(want, sizeof want, "%s/adapter_model.safetensors: tensor 'base_model.model.model.layers.0.mlp.down_proj."
             "ia3_l' names a LLaMA-family module, but the base model is GPT-2", d);
    expect_refusal(g2, d, NULL, want);
    /* the prompt's width against the base */
    variant(FIX "/llama_prompt", "wrong_dim", "token_dim", "48", d, sizeof d);
    snprintf(want, sizeof want, "%s/adapter_config.json: token_dim = 48 does not fit the base model, whose hidden "
             "size is 32", d);
    expect_refusal(ll, d, NULL, want);

    /* per-layer ranks peftref cannot hold */
    variant(FIX "/gpt2_lora", "layer_rank", "rank_pattern", "{\"h.0.attn.c_attn\": 2}", d, sizeof d);
    snprintf(want, sizeof want, "%s/adapter_config.json: rank_pattern = {\"h.0.attn.c_attn\":2} gives "
             "'transformer.h.0.attn.c_attn' 2 but 'transformer.h.1.attn.c_attn' 4; peftref's r is per site, the same "
             "on every layer", d);
    expect_refusal(g2, d, NULL, want);

    /* IA3 on the queries */
    variant(FIX "/gpt2_ia3", "ia3_q", "feedforward_modules", "[\"mlp.c_proj\"]", d, sizeof d);
    {
        /* a copy whose c_attn vector scales a query element */
        char src[1024], dst[1100];
        snprintf(src, sizeof src, FIX "/gpt2_ia3/adapter_model.safetensors");
        snprintf(dst, sizeof dst, "%s/adapter_model.safetensors", d);
        unlink(dst);
        st_file *st = NULL;
        pr_error err = { 0 };
        assert_int_equal(st_open(src, 0, &st, &err), PR_OK);
        int n = st_count(st);
        st_entry *e = calloc((size_t)n, sizeof *e);
        float **vals = calloc((size_t)n, sizeof *vals);
        for (int i = 0; i < n; i++) {
            const st_tensor *t = st_tensor_at(st, i);
            vals[i] = malloc((size_t)t->numel * sizeof(float));
            st_to_f32(st, t, vals[i], &err);
            if (strstr(t->name, "h.1.attn.c_attn"))
                vals[i][3] = 0.5f;
            e[i] = (st_entry){ .name = t->name, .ndim = t->ndim, .data = vals[i], .dtype = ST_F32 };
            memcpy(e[i].shape, t->shape, sizeof t->shape[0] * (size_t)t->ndim);
        }
        assert_int_equal(st_write(dst, e, n, NULL, 0, &err), PR_OK);
        for (int i = 0; i < n; i++)
            free(vals[i]);
        free(vals);
        free(e);
        st_close(st);
    }
    snprintf(want, sizeof want, "%s/adapter_model.safetensors: tensor 'base_model.model.transformer.h.1.attn.c_attn."
             "ia3_l' scales the queries (element 3 is 0.5, not 1); peftref's ia3 scales keys and values", d);
    expect_refusal(g2, d, NULL, want);

    /* PEFT's defaults per model are not guessed */
    variant(FIX "/llama_lora", "no_targets", "target_modules", "null", d, sizeof d);
    snprintf(want, sizeof want, "%s/adapter_config.json: target_modules is missing or null: peftref does not guess "
             "PEFT's per-model defaults; name the modules", d);
    expect_refusal(ll, d, NULL, want);

    /* the further types: one field value each that peftref cannot honour */
    static const struct {
        const char *fix, *name, *field, *value, *want;
    } further[] = {
        { "llama_loha", "bad_loha", "rank_dropout", "0.5",
          "rank_dropout = 0.5 is not supported: peftref's loha has no rank dropout" },
        { "llama_lokr", "bad_lokr", "decompose_both", "true",
          "decompose_both = true is not supported: peftref's lokr keeps lokr_w1 whole (lokr_w1_a / lokr_w1_b are "
          "not offered)" },
        { "llama_vera", "bad_vera", "save_projection", "false",
          "save_projection = false is not supported: peftref cannot regenerate PEFT's vera_A and vera_B from "
          "projection_prng_key; save them with the adapter" },
        { "llama_oft", "bad_oft", "use_cayley_neumann", "true",
          "use_cayley_neumann = true is not supported: peftref computes the exact Cayley transform (I - S)(I + "
          "S)^-1, not PEFT's truncated Neumann series, which gives another rotation" },
        { "llama_hra", "bad_hra", "apply_GS", "true",
          "apply_GS = true is not supported: peftref's hra reflects along the vectors themselves (Gram-Schmidt is "
          "not offered)" },
        { "llama_fourierft", "bad_fourierft", "bias", "\"all\"",
          "bias = \"all\" is not supported: peftref's fourierft trains no biases (BitFit is a module of its own)" },
        { "llama_ptuning", "bad_ptuning", "encoder_reparameterization_type", "\"GRU\"",
          "encoder_reparameterization_type = \"GRU\" is not supported: PEFT's prompt encoder is MLP or LSTM" },
        { "llama_trainable_tokens", "bad_tt", "target_modules", "[\"lm_head\"]",
          "target_modules = [\"lm_head\"] is not supported: peftref's trainable_tokens works on the token embedding "
          "only" },
        { "gpt2_vera", "bad_gpt2_vera", "vera_dropout", "-0.5",
          "vera_dropout = -0.5 is not supported: expected a value >= 0" },
        { "llama_boft", "bad_boft", "boft_dropout", "0.5",
          "boft_dropout = 0.5 is not supported: peftref's boft has no multiplicative dropout (blocks replaced by the "
          "identity)" },
        { "llama_boft", "bad_boft_bn", "boft_block_num", "8",
          "boft_block_size = 4 is not supported: PEFT's BOFT takes exactly one of boft_block_size and boft_block_num "
          "non-zero" },
        { "gpt2_adalora", "bad_adalora", "lora_alpha", "0",
          "lora_alpha = 0 is not supported: with a rank_pattern, PEFT scales each module by its kept rank when "
          "lora_alpha <= 0, and peftref's adalora by init_r; give lora_alpha > 0" },
        { "gpt2_adalora", "bad_adalora_pat", "init_r", "5",
          "rank_pattern = " },
    };
    for (size_t i = 0; i < sizeof further / sizeof further[0]; i++) {
        char src[512];
        snprintf(src, sizeof src, FIX "/%s", further[i].fix);
        variant(src, further[i].name, further[i].field, further[i].value, d, sizeof d);
        snprintf(want, sizeof want, "%s/adapter_config.json: %s", d, further[i].want);
        expect_refusal(strncmp(further[i].fix, "gpt2", 4) ? ll : g2, d, NULL, want);
    }
    /* PEFT's LoHa never adapts GPT-2's Conv1D */
    variant(FIX "/llama_loha", "loha_on_gpt2", "target_modules", "[\"c_attn\"]", d, sizeof d);
    snprintf(want, sizeof want, "%s/adapter_config.json: peft_type LOHA adapts torch.nn.Linear layers, and this GPT-2 "
             "base model's projections are Conv1D, which PEFT's LOHA refuses", d);
    expect_refusal(g2, d, NULL, want);
    /* PEFT's full lokr_w2 (r >= max(k, n) / 2) is not peftref's */
    variant(FIX "/llama_lokr", "bad_lokr_ab", "alpha", "3", d, sizeof d);
    {
        /* a copy of the tensors with one lokr_w2_a renamed to PEFT's full lokr_w2 */
        char cmd[4096];
        snprintf(cmd, sizeof cmd, "rm -f %s/adapter_model.safetensors && /usr/bin/env python3 -c \"import sys, json, "
                 "struct; b=open(sys.argv[1],'rb').read(); n=struct.unpack('<Q',b[:8])[0]; h=json.loads(b[8:8+n]); "
                 "k='base_model.model.model.layers.0.self_attn.q_proj.lokr_w2'; h[k]=h.pop(k+'_a'); "
                 "t=json.dumps(h).encode(); open(sys.argv[2],'wb').write(struct.pack('<Q',len(t))+t+b[8+n:])\" "
                 "%s/llama_lokr/adapter_model.safetensors %s/adapter_model.safetensors", d, FIX, d);
        assert_int_equal(system(cmd), 0);
    }
    snprintf(want, sizeof want, "%s/adapter_model.safetensors: tensor "
             "'base_model.model.model.layers.0.self_attn.q_proj.lokr_w2' is PEFT's lokr_w2, which peftref's lokr "
             "does not have (it keeps lokr_w1 whole and lokr_w2 as lokr_w2_a . lokr_w2_b, PEFT's choice for r < "
             "max(k, n) / 2)", d);
    expect_refusal(ll, d, NULL, want);
    /* PEFT's BOFT never adapts GPT-2's Conv1D */
    variant(FIX "/llama_boft", "boft_on_gpt2", "target_modules", "[\"c_attn\"]", d, sizeof d);
    snprintf(want, sizeof want, "%s/adapter_config.json: peft_type BOFT adapts torch.nn.Linear layers, and this GPT-2 "
             "base model's projections are Conv1D, which PEFT's BOFT refuses", d);
    expect_refusal(g2, d, NULL, want);
    /* an AdaLoRA rank_pattern whose kept count does not fit the tensors */
    variant(FIX "/gpt2_adalora", "adalora_short", "rank_pattern",
            "{\"transformer.h.0.attn.c_attn.lora_E\": [true, true, true, true]}", d, sizeof d);
    snprintf(want, sizeof want, "%s/adapter_model.safetensors: tensor 'base_model.model.transformer.h.0.attn.c_attn."
             "lora_A' is [3, 48] but rank_pattern and the base model need [4, 48]", d);
    expect_refusal(g2, d, NULL, want);
}

/* Base mismatch through peftref's fingerprint, and export refusals leaving
 * nothing behind. */
static void test_export_refusals(void **state)
{
    (void)state;
    char path[1024], out[1024], e[4096];
    /* an adapter exported from the GPT-2 parity model records its fingerprint */
    write_pipeline("fp_src", REF "/gpt2-parity/model", FIX "/gpt2_lora", NULL, path, sizeof path);
    snprintf(out, sizeof out, "%s/fp_adapter", tmp);
    const char *args[] = { "peftref", "export", path, "--format", "peft", "--out", out, NULL };
    assert_int_equal(run_cli(args, e, sizeof e), 0);
    /* the same adapter again without --force: refused, the first left as it was */
    assert_int_equal(run_cli(args, e, sizeof e), 1);
    char want[2048];
    snprintf(want, sizeof want, "peftref export: %s exists (--force replaces it)\n", out);
    assert_string_equal(e, want);
    /* on another GPT-2 of the same shape (other weights) it is refused */
    {
        char other[1024], cmd[4096];
        snprintf(other, sizeof other, "%s/other-gpt2", tmp);
        mkdir(other, 0777);
        snprintf(cmd, sizeof cmd, "cp %s/gpt2-parity/model/config.json %s/ && /usr/bin/env python3 -c \"import sys; "
                 "b=bytearray(open(sys.argv[1],'rb').read()); b[-5]^=0x40; open(sys.argv[2],'wb').write(b)\" "
                 "%s/gpt2-parity/model/model.safetensors %s/model.safetensors", REF, other, REF, other);
        assert_int_equal(system(cmd), 0);
        char d2[1024];
        snprintf(d2, sizeof d2, "%s/fp_adapter", tmp);
        write_pipeline("fp_other", other, d2, NULL, path, sizeof path);
        pr_pipeline *p = NULL;
        char msg[PR_ERROR_MSG_MAX];
        assert_int_equal(load_pipeline(path, &p, msg, sizeof msg), 0);
        pr_model *m = NULL;
        pr_tokenizer *tok = NULL;
        pr_error err = { 0 };
        assert_int_not_equal(pr_pipeline_build(p, &m, &tok, &err), 0);
        snprintf(want, sizeof want, "%s: saved on another base model (fingerprint fp1:", d2);
        if (!strstr(err.msg, want) || !strstr(err.msg, "use force: true to load it anyway"))
            fail_msg("got %s", err.msg);
        pr_pipeline_free(p);
    }
    /* a technique PEFT lacks, and a site PEFT cannot name: refused, nothing written */
    static const struct {
        const char *mod, *want;
    } cases[] = {
        { "{technique: adapter_houlsby}", "peftref export: module 'adapter_houlsby': technique adapter_houlsby has "
                                         "no Hugging Face PEFT type; use --format peftref\n" },
        { "{technique: lora, sites: [q, v]}", "peftref export: module 'lora' (technique lora) is attached where "
                                             "Hugging Face PEFT has no module name (sites such as GPT-2's q, k or v "
                                             "slices of c_attn, or a prefix on some layers only); use --format "
                                             "peftref\n" },
        { "{technique: loha}", "peftref export: module 'loha' (technique loha): Hugging Face PEFT's LOHA adapts "
                              "torch.nn.Linear layers only, and GPT-2's projections are transformers' Conv1D, which "
                              "it refuses; use --format peftref\n" },
        { "{technique: boft}", "peftref export: module 'boft' (technique boft): Hugging Face PEFT's BOFT adapts "
                              "torch.nn.Linear layers only, and GPT-2's projections are transformers' Conv1D, which "
                              "it refuses; use --format peftref\n" },
        { "{technique: adalora, sites: [q, v], options: {total_step: 10}}",
          "peftref export: module 'adalora' (technique adalora) adapts q, which has no Hugging Face module name; use "
          "--format peftref\n" },
        { "{technique: trainable_tokens, options: {token_indices: \"5, 9\", n_token_indices: 2}}",
          "peftref export: module 'trainable_tokens' (technique trainable_tokens): the base model ties its output "
          "head to the token embedding, where Hugging Face PEFT's TRAINABLE_TOKENS replaces the head's rows too and "
          "peftref's trainable_tokens only the input rows; use --format peftref\n" },
        { "{technique: fourierft, sites: [qkv], options: {ifft2_norm: ortho, n_frequency: 8}}",
          "peftref export: module 'fourierft' (technique fourierft) uses ifft2_norm ortho; Hugging Face PEFT's FourierFT uses "
          "torch.fft.ifft2's default (backward) and has no field for another; use --format peftref\n" },
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        snprintf(path, sizeof path, "%s/refuse%zu.yaml", tmp, i);
        FILE *f = fopen(path, "w");
        assert_non_null(f);
        fprintf(f, "model: {path: %s/gpt2-parity/model}\ntask: {type: lm, train: %s/../data/fortunes/adapt-train.txt}"
                   "\nmodules:\n  - %s\n", REF, TEST_SRCDIR, cases[i].mod);
        fclose(f);
        snprintf(out, sizeof out, "%s/refused%zu", tmp, i);
        const char *a2[] = { "peftref", "export", path, "--format", "peft", "--out", out, NULL };
        assert_int_equal(run_cli(a2, e, sizeof e), 1);
        assert_string_equal(e, cases[i].want);
        struct stat st;
        assert_int_not_equal(lstat(out, &st), 0);
        /* no temporary left beside it either */
        char t1[1100];
        snprintf(t1, sizeof t1, "ls %s | grep -c refused%zu >/dev/null", tmp, i);
        assert_int_not_equal(system(t1), 0);
    }
}

/* ---- PiSSA to plain LoRA ------------------------------------------------------------------------------ */

static void test_pissa_export(void **state)
{
    (void)state;
    char path[1024], run[1024], out[1024], e[4096];
    snprintf(path, sizeof path, "%s/pissa.yaml", tmp);
    snprintf(run, sizeof run, "%s/pissa-run", tmp);
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fprintf(f, "model: {path: %s/../models/fortunes-gpt2}\n"
               "task: {type: lm, train: %s/../data/fortunes/adapt-train.txt}\n"
               "modules:\n  - {technique: lora, sites: [qkv, ffn.down], options: {r: 4, alpha: 8, "
               "init_lora_weights: pissa}, site_options: {ffn.down: {r: 2, alpha: 3}}}\n"
               "train: {steps: 4, batch: 2, seq_len: 16, lr: 1e-2, output: %s, eval_every: 0}\n",
            TEST_SRCDIR, TEST_SRCDIR, run);
    fclose(f);
    const char *train[] = { "peftref", "train", path, NULL };
    if (run_cli(train, e, sizeof e) != 0)
        fail_msg("train: %s", e);
    snprintf(out, sizeof out, "%s/pissa-peft", tmp);
    const char *args[] = { "peftref", "export", run, "--format", "peft", "--out", out, NULL };
    if (run_cli(args, e, sizeof e) != 0)
        fail_msg("export: %s", e);
    /* the config: rank and alpha doubled, so the scale stays */
    char cp[1100];
    snprintf(cp, sizeof cp, "%s/adapter_config.json", out);
    json_error_t je;
    json_t *c = json_load_file(cp, 0, &je);
    assert_non_null(c);
    assert_int_equal(json_integer_value(json_object_get(c, "r")), 8);
    assert_true(json_number_value(json_object_get(c, "lora_alpha")) == 16.0);
    assert_true(json_is_true(json_object_get(c, "init_lora_weights")));
    assert_int_equal(json_integer_value(json_object_get(json_object_get(c, "rank_pattern"), "mlp.c_proj")), 4);
    assert_true(json_number_value(json_object_get(json_object_get(c, "alpha_pattern"), "mlp.c_proj")) == 6.0);
    json_decref(c);
    /* the same logits on the original base */
    batch b = { .B = 2, .T = 12 };
    int tokens[24], targets[24];
    for (int i = 0; i < 24; i++) {
        tokens[i] = (i * 37 + 11) % 256;
        targets[i] = (i * 53 + 5) % 256;
    }
    b.tokens = tokens;
    b.targets = targets;
    char rp[1100], pp[1100];
    snprintf(rp, sizeof rp, "%s/pipeline.yaml", run);
    write_pipeline("pissa_plain", TEST_SRCDIR "/../models/fortunes-gpt2", out, NULL, pp, sizeof pp);
    float *la = NULL, *lb = NULL, *l0 = NULL;
    pipeline_loss(rp, &b, &la);
    pipeline_loss(pp, &b, &lb);
    /* and the base alone, to see the module matters */
    char bp[1100];
    snprintf(bp, sizeof bp, "%s/base.yaml", tmp);
    f = fopen(bp, "w");
    assert_non_null(f);
    fprintf(f, "model: {path: %s/../models/fortunes-gpt2}\ntask: {type: lm, train: %s/../data/fortunes/"
               "adapt-train.txt}\nmodules: []\n", TEST_SRCDIR, TEST_SRCDIR);
    fclose(f);
    pipeline_loss(bp, &b, &l0);
    size_t n = 24 * 256;
    double scale = 0, diff = 0, moved = 0;
    for (size_t i = 0; i < n; i++) {
        scale = fmax(scale, fabs(la[i]));
        diff = fmax(diff, fabs((double)la[i] - lb[i]));
        moved = fmax(moved, fabs((double)la[i] - l0[i]));
    }
    fprintf(stderr, "  pissa -> plain LoRA rank 2r: max|logit diff| %.3e of max|logit| %.3e (%.2e); the module "
            "moves the logits by %.3e\n", diff, scale, diff / scale, moved);
    assert_true(diff <= 1e-5 * scale);
    assert_true(moved > 1e-3 * scale);
    free(la);
    free(lb);
    free(l0);
}

/* ---- LoRA-FA as PEFT's LORA ------------------------------------------------------------------------- */

/* A trained lora_fa module exports as a LoraConfig adapter (lora_A is just
 * not trained); loaded back it is a lora module with the same tensors bit
 * for bit and the same loss within float32 rounding of another code path. */
/* A plugin directory of the built plugins less those in drop, plus the
 * test plugins in extra (tests/plugins), opened as a registry. */
static pr_registry *registry_of(const char *tag, const char *const *drop, const char *const *extra)
{
    char dir[1024], from[2048], to[2048];
    snprintf(dir, sizeof dir, "%s/plugins-%s", tmp, tag);
    assert_int_equal(mkdir(dir, 0700), 0);
    DIR *d = opendir(PLUGINS);
    assert_non_null(d);
    struct dirent *e;
    while ((e = readdir(d))) {
        size_t n = strlen(e->d_name);
        int keep = n > 3 && !strcmp(e->d_name + n - 3, ".so");
        for (int i = 0; keep && drop && drop[i]; i++)
            keep = strcmp(e->d_name, drop[i]) != 0;
        if (!keep)
            continue;
        snprintf(from, sizeof from, "%s/%s", PLUGINS, e->d_name);
        snprintf(to, sizeof to, "%s/%s", dir, e->d_name);
        assert_int_equal(symlink(from, to), 0);
    }
    closedir(d);
    for (int i = 0; extra && extra[i]; i++) {
        snprintf(from, sizeof from, "%s/tests/plugins/.libs/%s", TEST_BUILDDIR, extra[i]);
        snprintf(to, sizeof to, "%s/%s", dir, extra[i]);
        assert_int_equal(symlink(from, to), 0);
    }
    pr_registry *r = NULL;
    pr_error err = { 0 };
    if (pr_registry_open(dir, &r, &err))
        fail_msg("registry %s: %s", dir, err.msg);
    return r;
}

/* Which technique reads an adapter comes from what the techniques declare
 * (peft_type and the peft-config extension), not from their names. */
static void test_technique_choice(void **state)
{
    (void)state;
    const char *g2 = REF "/gpt2-parity/model";
    char want[2048];
    pr_registry *full = reg;

    /* use_dora: true with no technique implying it is refused, not read as lora */
    const char *no_dora[] = { "dora.so", NULL };
    reg = registry_of("no-dora", no_dora, NULL);
    snprintf(want, sizeof want, "%s/adapter_config.json: use_dora = true is not supported: no technique found "
             "declares PEFT's LORA with use_dora (peftref plugins lists them)", FIX "/gpt2_dora");
    expect_refusal(g2, FIX "/gpt2_dora", NULL, want);
    pr_registry_free(reg);

    /* a type no technique declares */
    const char *no_vera[] = { "vera.so", NULL };
    reg = registry_of("no-vera", no_vera, NULL);
    snprintf(want, sizeof want, "%s: no technique found declares PEFT type VERA; those found read ADALORA, BOFT, "
             "FOURIERFT, HRA, IA3, LOHA, LOKR, LORA, OFT, PREFIX_TUNING, PROMPT_TUNING, P_TUNING, TRAINABLE_TOKENS "
             "(peftref plugins lists the techniques)", FIX "/gpt2_vera");
    expect_refusal(g2, FIX "/gpt2_vera", NULL, want);
    pr_registry_free(reg);

    /* two techniques that both read a plain LORA adapter */
    const char *twin[] = { "peft_twin.so", "peft_bad_implies.so", NULL };
    reg = registry_of("twin", NULL, twin);
    snprintf(want, sizeof want, "%s/adapter_config.json: techniques ", FIX "/gpt2_lora");
    expect_refusal(g2, FIX "/gpt2_lora", NULL, want);
    expect_refusal(g2, FIX "/gpt2_lora", NULL, "both read this PEFT LORA adapter; leave one of them out of the "
                                                "plugin path");
    expect_refusal(g2, FIX "/gpt2_lora", NULL, "peft-twin");
    /* a use_dora adapter still goes to dora, which implies more of it */
    pr_pipeline *p = NULL;
    char path[1024], msg[PR_ERROR_MSG_MAX];
    write_pipeline("twin_dora", g2, FIX "/gpt2_dora", NULL, path, sizeof path);
    if (load_pipeline(path, &p, msg, sizeof msg))
        fail_msg("%s: %s", path, msg);
    pr_pipeline_free(p);
    /* and the validator refuses an implies that is not a JSON object */
    int refused = 0;
    for (int i = 0; i < pr_registry_refused_count(reg); i++) {
        const char *at, *why;
        pr_registry_refused(reg, i, &at, &why);
        if (strstr(at, "peft_bad_implies") && strstr(why, "peft-config implies is not a JSON object"))
            refused = 1;
    }
    assert_true(refused);
    assert_null(pr_registry_find(reg, "peft-bad-implies"));
    pr_registry_free(reg);

    /* a technique that declares ADALORA without a read() of it is no reader */
    const char *no_ada[] = { "adalora.so", NULL }, *ada[] = { "peft_ada.so", NULL };
    reg = registry_of("ada", no_ada, ada);
    snprintf(want, sizeof want, "%s/adapter_config.json: no technique found reads PEFT ADALORA adapters: peft-ada "
             "declares the type without a read() that imports", FIX "/gpt2_adalora");
    expect_refusal(g2, FIX "/gpt2_adalora", NULL, want);
    pr_registry_free(reg);

    /* an outside plugin's read() (tests/plugins/lora_like.h): without lora.so, peft-twin reads a plain
     * LORA adapter (gpt2_lora without rsLoRA and alpha_pattern) to the built-in lora's loss; what it does
     * not offer it refuses in its own words */
    char d1[1024], d2[1024];
    variant(FIX "/gpt2_lora", "twin_plain1", "use_rslora", "false", d1, sizeof d1);
    variant(d1, "twin_plain", "alpha_pattern", "{}", d2, sizeof d2);
    json_t *ex = expected();
    json_t *fx = json_object_get(ex, "gpt2_lora");
    assert_non_null(fx);
    char bpath[1024];
    snprintf(bpath, sizeof bpath, "%s/expected.safetensors", base_dir(json_string_value(json_object_get(fx, "base"))));
    batch b;
    batch_read(bpath, &b);
    reg = full;
    write_pipeline("twin_lora", g2, d2, NULL, path, sizeof path);
    double ref = pipeline_loss(path, &b, NULL);
    const char *no_lora[] = { "lora.so", NULL }, *twin_only[] = { "peft_twin.so", NULL };
    reg = registry_of("twin-only", no_lora, twin_only);
    write_pipeline("twin_only", g2, d2, NULL, path, sizeof path);
    double got = pipeline_loss(path, &b, NULL);
    fprintf(stderr, "  peft-twin reads %s: loss %.9f, lora's %.9f\n", d2, got, ref);
    assert_true(fabs(got - ref) <= 1e-6 * fabs(ref));
    batch_free(&b);
    json_decref(ex);
    variant(FIX "/gpt2_lora", "twin_rslora", "alpha_pattern", "{}", d1, sizeof d1);
    snprintf(want, sizeof want, "%s/adapter_config.json: use_rslora = true is not supported: peft-twin scales by "
             "alpha / r", d1);
    expect_refusal(g2, d1, NULL, want);
    snprintf(want, sizeof want, "%s/adapter_config.json: alpha_pattern = {\"mlp.c_proj\":3} is not supported: "
             "peft-twin's alpha is one value for every module", FIX "/gpt2_lora");
    expect_refusal(g2, FIX "/gpt2_lora", NULL, want);
    pr_registry_free(reg);
    reg = full;
}

static void test_lora_fa_export(void **state)
{
    (void)state;
    char path[1024], run[1024], out[1024], out2[1024], e[4096];
    snprintf(path, sizeof path, "%s/lora_fa.yaml", tmp);
    snprintf(run, sizeof run, "%s/lora_fa-run", tmp);
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fprintf(f, "model: {path: %s/../models/fortunes-gpt2}\n"
               "task: {type: lm, train: %s/../data/fortunes/adapt-train.txt}\n"
               "modules:\n  - {technique: lora_fa, sites: [qkv, ffn.down], options: {r: 4, alpha: 8}}\n"
               "train: {steps: 4, batch: 2, seq_len: 16, lr: 1e-2, output: %s, eval_every: 0}\n",
            TEST_SRCDIR, TEST_SRCDIR, run);
    fclose(f);
    const char *train[] = { "peftref", "train", path, NULL };
    if (run_cli(train, e, sizeof e) != 0)
        fail_msg("train: %s", e);
    snprintf(out, sizeof out, "%s/lora_fa-peft", tmp);
    const char *args[] = { "peftref", "export", run, "--format", "peft", "--out", out, NULL };
    if (run_cli(args, e, sizeof e) != 0)
        fail_msg("export: %s", e);
    char cp[1100];
    snprintf(cp, sizeof cp, "%s/adapter_config.json", out);
    json_error_t je;
    json_t *c = json_load_file(cp, 0, &je);
    assert_non_null(c);
    assert_string_equal(json_string_value(json_object_get(c, "peft_type")), "LORA");
    assert_int_equal(json_integer_value(json_object_get(c, "r")), 4);
    assert_true(json_number_value(json_object_get(c, "lora_alpha")) == 8.0);
    assert_true(json_is_false(json_object_get(c, "use_dora")));
    json_decref(c);
    batch b = { .B = 2, .T = 12 };
    int tokens[24], targets[24];
    for (int i = 0; i < 24; i++) {
        tokens[i] = (i * 37 + 11) % 256;
        targets[i] = (i * 53 + 5) % 256;
    }
    b.tokens = tokens;
    b.targets = targets;
    char rp[1100], pp[1100];
    snprintf(rp, sizeof rp, "%s/pipeline.yaml", run);
    write_pipeline("lora_fa_plain", TEST_SRCDIR "/../models/fortunes-gpt2", out, NULL, pp, sizeof pp);
    double l1 = pipeline_loss(rp, &b, NULL), l2 = pipeline_loss(pp, &b, NULL);
    fprintf(stderr, "  lora_fa -> PEFT LORA -> lora: loss %.9f and %.9f (%.2e relative)\n", l1, l2,
            fabs(l1 - l2) / fabs(l1));
    assert_true(fabs(l1 - l2) <= 1e-6 * fabs(l1));
    /* the trained module matters: the base alone gives another loss */
    char bp[1100];
    snprintf(bp, sizeof bp, "%s/lora_fa_base.yaml", tmp);
    f = fopen(bp, "w");
    assert_non_null(f);
    fprintf(f, "model: {path: %s/../models/fortunes-gpt2}\ntask: {type: lm, train: %s/../data/fortunes/"
               "adapt-train.txt}\nmodules: []\n", TEST_SRCDIR, TEST_SRCDIR);
    fclose(f);
    double l0 = pipeline_loss(bp, &b, NULL);
    fprintf(stderr, "  the base alone: loss %.9f\n", l0);
    assert_true(fabs(l1 - l0) > 1e-4 * fabs(l0));
    /* PEFT -> peftref (lora) -> PEFT: the same tensors */
    snprintf(out2, sizeof out2, "%s/lora_fa-peft2", tmp);
    const char *args2[] = { "peftref", "export", pp, "--format", "peft", "--out", out2, NULL };
    if (run_cli(args2, e, sizeof e) != 0)
        fail_msg("export: %s", e);
    char a[1100], b2[1100];
    snprintf(a, sizeof a, "%s/adapter_model.safetensors", out);
    snprintf(b2, sizeof b2, "%s/adapter_model.safetensors", out2);
    same_tensors(a, b2);
    same_tensors(b2, a);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_import_fixtures),
        cmocka_unit_test(test_import_llama_parity),
        cmocka_unit_test(test_round_trip),
        cmocka_unit_test(test_refusals),
        cmocka_unit_test(test_export_refusals),
        cmocka_unit_test(test_pissa_export),
        cmocka_unit_test(test_lora_fa_export),
        cmocka_unit_test(test_technique_choice),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
