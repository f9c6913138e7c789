/* Parity of the LLaMA family with an independent reference.
 *
 * tests/ref/make_llama_fixtures.py (plain PyTorch, float64; see
 * tests/ref/llama-parity/README.md) wrote seven tiny Hugging Face
 * checkpoints (gqa, mqa, mha, bias, qwen2, qwen3, mistral: grouped-,
 * multi-query and multi-head attention, tied and untied heads, head_dim !=
 * hidden / heads, rope_scaling linear and llama3, attention and MLP
 * biases, Qwen2's q/k/v biases, Qwen3's q/k norms; F32, BF16, F16 and a
 * sharded file), a PEFT LoRA adapter on all seven projections of each,
 * and for one 2x12 batch the logits, the mean loss and the gradient of
 * every base parameter (full finetuning) and of every LoRA tensor (base
 * frozen).  peftref loads each checkpoint through pr_model_load_hf, the
 * adapter's tensors into the lora plugin's parameters, and must match:
 *
 *   logits:     max |a - b| <= 1e-4 * max |b|     (per tensor)
 *   loss:       |a - b| <= 1e-4 * |b|
 *   gradients:  max |a - b| <= 1e-4 * max |b|     (per tensor)
 *
 * float32 rounding of the same model was measured at 1.0e-6 (logits),
 * 1.0e-7 (loss) and 3.5e-6 (gradients) of those scales, so the bounds
 * leave 30x for other BLAS kernels and thread counts while any wrong
 * formula (rotate-half pairing, a missing RoPE scale, the GQA head map, a
 * norm before or after RoPE) is off by far more: each case's own feature
 * moves the logits by at least 0.27 of max |logit|.  The gqa case also
 * holds 8 greedy tokens from a 5-token prompt, with and without LoRA,
 * which `peftref generate`'s cached path and the full forward must
 * reproduce exactly.  PEFTREF_PARITY_VERBOSE=1 prints every comparison. */
#include <dlfcn.h>
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "peftref/peftref.h"
#include "harness.h"
#include "safetensors.h"

#define REF_DIR TEST_SRCDIR "/ref/llama-parity"
#define LORA_SO TEST_BUILDDIR "/plugins/.libs/lora.so"
#define RTOL 1e-4

static const char *const cases[] = { "gqa", "mqa", "mha", "bias", "qwen2", "qwen3", "mistral" };
#define N_CASES ((int)(sizeof cases / sizeof cases[0]))

typedef struct fixture {
    char path[512];
    st_file *ref;
    int B, T;
    int *tokens, *targets;
} fixture;

static int verbose(void)
{
    const char *v = getenv("PEFTREF_PARITY_VERBOSE");
    return v && *v && strcmp(v, "0") != 0;
}

static float *ref_f32(const fixture *fx, const char *name, int64_t n)
{
    pr_error err = { 0 };
    const st_tensor *t = st_find(fx->ref, name);
    if (!t)
        fail_msg("%s: no tensor \"%s\"", fx->path, name);
    if (n >= 0 && t->numel != n)
        fail_msg("%s: tensor \"%s\" has %lld values, expected %lld", fx->path, name, (long long)t->numel,
                 (long long)n);
    float *v = malloc(sizeof(float) * (size_t)(t->numel ? t->numel : 1));
    assert_non_null(v);
    if (st_to_f32(fx->ref, t, v, &err) != PR_OK)
        fail_msg("%s", err.msg);
    return v;
}

static void fixture_open(fixture *fx, const char *name)
{
    memset(fx, 0, sizeof *fx);
    snprintf(fx->path, sizeof fx->path, "%s/%s/expected.safetensors", REF_DIR, name);
    pr_error err = { 0 };
    if (st_open(fx->path, 0, &fx->ref, &err) != PR_OK)
        fail_msg("%s", err.msg);
    const st_tensor *tk = st_find(fx->ref, "tokens");
    assert_non_null(tk);
    assert_int_equal(tk->ndim, 2);
    fx->B = (int)tk->shape[0];
    fx->T = (int)tk->shape[1];
    size_t n = (size_t)fx->B * fx->T;
    float *tok = ref_f32(fx, "tokens", (int64_t)n), *tgt = ref_f32(fx, "targets", (int64_t)n);
    fx->tokens = malloc(n * sizeof(int));
    fx->targets = malloc(n * sizeof(int));
    assert_non_null(fx->tokens);
    assert_non_null(fx->targets);
    for (size_t i = 0; i < n; i++) {
        fx->tokens[i] = (int)lrintf(tok[i]);
        fx->targets[i] = (int)lrintf(tgt[i]);
    }
    free(tok);
    free(tgt);
}

static void fixture_close(fixture *fx)
{
    st_close(fx->ref);
    free(fx->tokens);
    free(fx->targets);
}

static pr_model *load_case(const char *name, int B, int T)
{
    char dir[512];
    snprintf(dir, sizeof dir, "%s/%s/model", REF_DIR, name);
    pr_error err = { 0 };
    pr_model *m = NULL;
    if (pr_model_load_hf(dir, &m, &err) != PR_OK)
        fail_msg("pr_model_load_hf(%s): %s", dir, err.msg);
    if (pr_model_reserve(m, B, T, &err) != PR_OK)
        fail_msg("reserve: %s", err.msg);
    return m;
}

/* max |a - b| <= RTOL * max |b| over n values; returns 1 when it holds. */
static int close_to(const char *what, const float *a, const float *b, size_t n)
{
    double worst = 0.0, scale = 0.0;
    size_t at = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - b[i]);
        if (d > worst) {
            worst = d;
            at = i;
        }
        scale = fmax(scale, fabs((double)b[i]));
    }
    int ok = worst <= RTOL * scale && isfinite(worst) && scale > 0.0;
    if (verbose() || !ok)
        fprintf(stderr, "  %-60s max|diff| %.3e at %zu of max|ref| %.3e: %.2e of it%s\n", what, worst, at, scale,
                scale > 0 ? worst / scale : 0.0, ok ? "" : "  <-- FAIL");
    return ok;
}

static float run_batch(pr_model *m, const fixture *fx)
{
    pr_batch b = { .tokens = fx->tokens, .targets = fx->targets, .B = fx->B, .T = fx->T };
    pr_error err = { 0 };
    float loss = NAN;
    pr_model_zero_grad(m);
    if (pr_model_forward(m, &b, &loss, &err) != PR_OK || pr_model_backward(m, &err) != PR_OK)
        fail_msg("forward/backward: %s", err.msg);
    return loss;
}

static int check_outputs(pr_model *m, const fixture *fx, float loss, const char *logits_name, const char *loss_name)
{
    int V = pr_model_get_config(m)->vocab_size;
    size_t n = (size_t)fx->B * fx->T * V;
    float *want = ref_f32(fx, logits_name, (int64_t)n), *wl = ref_f32(fx, loss_name, 1);
    int ok = close_to(logits_name, pr_model_logits(m), want, n);
    double dl = fabs((double)loss - wl[0]);
    int lok = dl <= RTOL * fabs((double)wl[0]);
    if (verbose() || !lok)
        fprintf(stderr, "  %-60s %.7f vs %.7f: %.2e relative%s\n", loss_name, (double)loss, (double)wl[0],
                dl / fabs((double)wl[0]), lok ? "" : "  <-- FAIL");
    free(want);
    free(wl);
    return ok && lok;
}

/* Full finetuning: logits, loss and the gradient of every base tensor. */
static void test_base(void **state)
{
    (void)state;
    for (int c = 0; c < N_CASES; c++) {
        fixture fx;
        fixture_open(&fx, cases[c]);
        fprintf(stderr, "case %s\n", cases[c]);
        pr_model *m = load_case(cases[c], fx.B, fx.T);
        pr_error err = { 0 };
        assert_int_equal(pr_model_set_trainable(m, "*", 1, &err), PR_OK);
        float loss = run_batch(m, &fx);
        int ok = check_outputs(m, &fx, loss, "logits", "loss");
        int checked = 0;
        for (int i = 0; i < pr_model_n_tensors(m); i++) {
            const pr_tensor_info *t = pr_model_tensor(m, i);
            char name[160];
            snprintf(name, sizeof name, "grad.%s", t->name);
            float *want = ref_f32(&fx, name, t->numel);
            ok &= close_to(name, t->grad, want, (size_t)t->numel);
            free(want);
            checked++;
        }
        /* every reference gradient belongs to a model tensor */
        int n_grads = 0;
        for (int j = 0; j < st_count(fx.ref); j++)
            n_grads += strncmp(st_tensor_at(fx.ref, j)->name, "grad.", 5) == 0;
        assert_int_equal(checked, n_grads);
        if (!ok)
            fail_msg("case %s: base parity failed (above)", cases[c]);
        pr_model_free(m);
        fixture_close(&fx);
    }
}

/* Attach lora r=2 alpha=4 on the seven projections and load the adapter's
 * tensors (PEFT keys) into its parameters. */
static void attach_adapter(pr_model *m, const pr_technique *lora, const char *name)
{
    uint32_t sites = PR_SITE_BIT(PR_SITE_Q) | PR_SITE_BIT(PR_SITE_K) | PR_SITE_BIT(PR_SITE_V) |
                     PR_SITE_BIT(PR_SITE_O) | PR_SITE_BIT(PR_SITE_FFN_GATE) | PR_SITE_BIT(PR_SITE_FFN_UP) |
                     PR_SITE_BIT(PR_SITE_FFN_DOWN);
    const pr_option_setting o[] = { { "r", "2", -1 }, { "alpha", "4", -1 } };
    pr_module_spec spec = { .technique = lora, .sites = sites, .options = o, .n_options = 2, .trainable = 1,
                            .seed = 1 };
    th_attach(m, &spec);
    char path[512];
    snprintf(path, sizeof path, "%s/%s/lora/adapter_model.safetensors", REF_DIR, name);
    st_file *ad = NULL;
    pr_error err = { 0 };
    if (st_open(path, 0, &ad, &err) != PR_OK)
        fail_msg("%s", err.msg);
    static const struct { int site; const char *key; } proj[] = {
        { PR_SITE_Q, "self_attn.q_proj" }, { PR_SITE_K, "self_attn.k_proj" }, { PR_SITE_V, "self_attn.v_proj" },
        { PR_SITE_O, "self_attn.o_proj" }, { PR_SITE_FFN_GATE, "mlp.gate_proj" },
        { PR_SITE_FFN_UP, "mlp.up_proj" }, { PR_SITE_FFN_DOWN, "mlp.down_proj" },
    };
    int loaded = 0;
    for (int l = 0; l < pr_model_get_config(m)->n_layers; l++)
        for (size_t p = 0; p < sizeof proj / sizeof proj[0]; p++)
            for (int ab = 0; ab < 2; ab++) {
                char key[200], mine[200];
                snprintf(key, sizeof key, "base_model.model.model.layers.%d.%s.lora_%c.weight", l, proj[p].key,
                         ab ? 'B' : 'A');
                snprintf(mine, sizeof mine, "lora/h.%d.%s.lora_%c", l, pr_site_name(proj[p].site), ab ? 'B' : 'A');
                const st_tensor *t = st_find(ad, key);
                const pr_tensor_info *ti = pr_model_find_tensor(m, mine);
                if (!t || !ti)
                    fail_msg("%s: %s (%s) missing", path, t ? mine : key, t ? "module" : "adapter");
                assert_true(t->numel == ti->numel && t->shape[0] == ti->shape[0]);
                if (st_to_f32(ad, t, ti->data, &err) != PR_OK)
                    fail_msg("%s", err.msg);
                loaded++;
            }
    assert_int_equal(loaded, st_count(ad));
    st_close(ad);
}

/* LoRA on all seven projections, base frozen: logits, loss and every
 * LoRA tensor's gradient. */
static void test_lora(void **state)
{
    (void)state;
    void *h = NULL;
    const pr_technique *lora = th_plugin_technique(LORA_SO, &h);
    assert_non_null(lora);
    for (int c = 0; c < N_CASES; c++) {
        fixture fx;
        fixture_open(&fx, cases[c]);
        fprintf(stderr, "case %s + lora\n", cases[c]);
        pr_model *m = load_case(cases[c], fx.B, fx.T);
        attach_adapter(m, lora, cases[c]);
        float loss = run_batch(m, &fx);
        int ok = check_outputs(m, &fx, loss, "logits_lora", "loss_lora");
        int checked = 0;
        for (int i = 0; i < pr_model_n_tensors(m); i++) {
            const pr_tensor_info *t = pr_model_tensor(m, i);
            if (t->kind != PR_TENSOR_MODULE)
                continue;
            assert_non_null(t->grad);
            /* "lora/h.<layer>.<site>.lora_<A|B>" */
            int l, off = 0;
            char site[32];
            assert_int_equal(sscanf(t->name, "lora/h.%d.%n", &l, &off), 1);
            const char *tail = strstr(t->name, ".lora_");
            assert_non_null(tail);
            assert_true(tail - (t->name + off) < (ptrdiff_t)sizeof site);
            memcpy(site, t->name + off, (size_t)(tail - (t->name + off)));
            site[tail - (t->name + off)] = '\0';
            char ab = tail[6];
            const char *key = NULL;
            switch (pr_site_parse(site)) {
            case PR_SITE_Q: key = "self_attn.q_proj"; break;
            case PR_SITE_K: key = "self_attn.k_proj"; break;
            case PR_SITE_V: key = "self_attn.v_proj"; break;
            case PR_SITE_O: key = "self_attn.o_proj"; break;
            case PR_SITE_FFN_GATE: key = "mlp.gate_proj"; break;
            case PR_SITE_FFN_UP: key = "mlp.up_proj"; break;
            case PR_SITE_FFN_DOWN: key = "mlp.down_proj"; break;
            default: fail_msg("unexpected module tensor %s", t->name);
            }
            char name[200];
            snprintf(name, sizeof name, "grad_lora.base_model.model.model.layers.%d.%s.lora_%c.weight", l, key, ab);
            float *want = ref_f32(&fx, name, t->numel);
            ok &= close_to(name, t->grad, want, (size_t)t->numel);
            free(want);
            checked++;
        }
        assert_int_equal(checked, pr_model_get_config(m)->n_layers * 7 * 2);
        if (!ok)
            fail_msg("case %s: LoRA parity failed (above)", cases[c]);
        pr_model_free(m);
        fixture_close(&fx);
    }
    dlclose(h);
}

/* Greedy decoding of the gqa case by full forwards over the growing
 * sequence, with and without the adapter. */
static void test_greedy(void **state)
{
    (void)state;
    void *h = NULL;
    const pr_technique *lora = th_plugin_technique(LORA_SO, &h);
    fixture fx;
    fixture_open(&fx, "gqa");
    float *prompt = ref_f32(&fx, "gen_prompt", -1);
    int P = (int)st_find(fx.ref, "gen_prompt")->numel;
    for (int with_lora = 0; with_lora < 2; with_lora++) {
        const char *gname = with_lora ? "gen_greedy_lora" : "gen_greedy";
        float *want = ref_f32(&fx, gname, -1);
        int n = (int)st_find(fx.ref, gname)->numel;
        pr_model *m = load_case("gqa", 1, P + n);
        if (with_lora)
            attach_adapter(m, lora, "gqa");
        pr_model_set_training(m, 0);
        int seq[64];
        int V = pr_model_get_config(m)->vocab_size;
        static float full_last[16][512];
        assert_true(n <= 16 && V <= 512);
        for (int i = 0; i < P; i++)
            seq[i] = (int)lrintf(prompt[i]);
        for (int k = 0; k < n; k++) {
            int T = P + k;
            pr_batch b = { .tokens = seq, .targets = NULL, .B = 1, .T = T };
            pr_error err = { 0 };
            if (pr_model_forward(m, &b, NULL, &err) != PR_OK)
                fail_msg("forward: %s", err.msg);
            const float *z = pr_model_logits(m) + (size_t)(T - 1) * V;
            int best = 0;
            for (int v = 1; v < V; v++)
                if (z[v] > z[best])
                    best = v;
            seq[T] = best;
            if (best != (int)lrintf(want[k]))
                fail_msg("%s: token %d is %d, the reference says %d", gname, k, best, (int)lrintf(want[k]));
            memcpy(full_last[k], z, (size_t)V * sizeof(float));
        }
        /* the cached path: the prompt at once, then one token at a time;
         * the same tokens, and logits within 1e-5 of the full forwards' max */
        pr_error err = { 0 };
        assert_int_equal(pr_model_decode_begin(m, P + n, &err), PR_OK);
        assert_int_equal(pr_model_decode_pos(m), 0);
        for (int k = 0; k < n; k++) {
            int rc = k == 0 ? pr_model_decode(m, seq, P, &err) : pr_model_decode(m, seq + P + k - 1, 1, &err);
            if (rc != PR_OK)
                fail_msg("decode: %s", err.msg);
            int rows = k == 0 ? P : 1;
            const float *z = pr_model_logits(m) + (size_t)(rows - 1) * V;
            int best = 0;
            for (int v = 1; v < V; v++)
                if (z[v] > z[best])
                    best = v;
            if (best != (int)lrintf(want[k]))
                fail_msg("%s (cached): token %d is %d, the reference says %d", gname, k, best, (int)lrintf(want[k]));
            char what[64];
            snprintf(what, sizeof what, "%s cached logits, token %d", gname, k);
            (void)close_to(what, z, full_last[k], (size_t)V); /* prints with PEFTREF_PARITY_VERBOSE */
            double worst = 0, scale = 0;
            for (int v = 0; v < V; v++) {
                worst = fmax(worst, fabs((double)z[v] - full_last[k][v]));
                scale = fmax(scale, fabs((double)full_last[k][v]));
            }
            assert_true(worst <= 1e-5 * scale);
        }
        assert_int_equal(pr_model_decode_pos(m), P + n - 1);
        /* the cache is full after one more; a further token is refused */
        assert_int_equal(pr_model_decode(m, seq + P + n - 1, 1, &err), PR_OK);
        assert_int_equal(pr_model_decode(m, seq, 1, &err), PR_ERR_INVALID);
        pr_model_decode_end(m);
        assert_int_equal(pr_model_decode_pos(m), -1);
        free(want);
        pr_model_free(m);
    }
    free(prompt);
    fixture_close(&fx);
    dlclose(h);
}

/* Write config text and the gqa case's tensors (every one, one dropped,
 * or one with a wrong shape) into dir, and load it. */
static int load_variant(const char *dir, const char *config, const char *drop, const char *reshape, pr_error *err)
{
    char path[600];
    snprintf(path, sizeof path, "%s/config.json", dir);
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fputs(config, f);
    fclose(f);
    pr_model *src = load_case("gqa", 1, 1);
    int n = pr_model_n_tensors(src), k = 0;
    st_entry *e = calloc((size_t)n, sizeof *e);
    assert_non_null(e);
    for (int i = 0; i < n; i++) {
        const pr_tensor_info *t = pr_model_tensor(src, i);
        if (drop && strcmp(t->name, drop) == 0)
            continue;
        e[k].name = t->name;
        e[k].ndim = t->ndim;
        for (int d = 0; d < t->ndim; d++)
            e[k].shape[d] = t->shape[d];
        if (reshape && strcmp(t->name, reshape) == 0) {
            e[k].shape[0] = t->shape[1];
            e[k].shape[1] = t->shape[0];
        }
        e[k].data = t->data;
        e[k].dtype = ST_F32;
        k++;
    }
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    pr_error werr = { 0 };
    assert_int_equal(st_write(path, e, k, NULL, 0, &werr), PR_OK);
    free(e);
    pr_model_free(src);
    pr_model *m = NULL;
    int rc = pr_model_load_hf(dir, &m, err);
    pr_model_free(m);
    return rc;
}

static void expect_in(const char *msg, const char *a, const char *b)
{
    if (!strstr(msg, a) || (b && !strstr(msg, b)))
        fail_msg("message \"%s\" lacks \"%s\"%s%s", msg, a, b ? " or " : "", b ? b : "");
}

/* What a directory gets wrong is named: the model_type and the families
 * peftref loads, a rope_scaling type, a missing or mis-shaped tensor. */
static void test_load_errors(void **state)
{
    (void)state;
    char *dir = th_scratch_dir("llama-load");
    char cfg_text[4096];
    char cfgpath[512];
    snprintf(cfgpath, sizeof cfgpath, "%s/gqa/model/config.json", REF_DIR);
    FILE *f = fopen(cfgpath, "r");
    assert_non_null(f);
    size_t len = fread(cfg_text, 1, sizeof cfg_text - 1, f);
    fclose(f);
    cfg_text[len] = '\0';
    pr_error err = { 0 };
    assert_int_equal(load_variant(dir, cfg_text, NULL, NULL, &err), PR_OK);

    char bad[4200];
    const char *mt = strstr(cfg_text, "\"llama\"");
    assert_non_null(mt);
    snprintf(bad, sizeof bad, "%.*s\"gemma\"%s", (int)(mt - cfg_text), cfg_text, mt + 7);
    assert_int_equal(load_variant(dir, bad, NULL, NULL, &err), PR_ERR_UNSUPPORTED);
    expect_in(err.msg, "gemma", "config.json");
    expect_in(err.msg, "\"llama\"", "\"qwen3\"");

    const char *rs = strstr(cfg_text, "\"rope_scaling\": null");
    assert_non_null(rs);
    snprintf(bad, sizeof bad, "%.*s\"rope_scaling\": {\"rope_type\": \"yarn\", \"factor\": 4}%s", (int)(rs - cfg_text),
             cfg_text, rs + strlen("\"rope_scaling\": null"));
    assert_int_equal(load_variant(dir, bad, NULL, NULL, &err), PR_ERR_UNSUPPORTED);
    expect_in(err.msg, "yarn", "rope_scaling");

    assert_int_equal(load_variant(dir, cfg_text, "model.layers.1.mlp.up_proj.weight", NULL, &err), PR_ERR_NOTFOUND);
    expect_in(err.msg, "model.layers.1.mlp.up_proj.weight", "model.safetensors");
    assert_int_equal(load_variant(dir, cfg_text, NULL, "model.layers.0.self_attn.k_proj.weight", &err), PR_ERR_FORMAT);
    expect_in(err.msg, "model.layers.0.self_attn.k_proj.weight", "shape");
    th_scratch_dir_free(dir);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_base),
        cmocka_unit_test(test_lora),
        cmocka_unit_test(test_greedy),
        cmocka_unit_test(test_load_errors),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
