/* Tests of the GPT-2 family model: presets and parameter counts, site
 * names, the random init, whole-model gradients against finite
 * differences (base tensors and site hooks), loss masking, and errors.
 *
 * Gradient checks use central differences of the mean cross-entropy as
 * the forward pass computes it (float activations, loss summed in double).
 * Model: L=2, C=32, H=4, F=128, V=64, B=2, T=8 with init_std 0.1 so that
 * the loss is not flat (at GPT-2's 0.02 most gradients are ~1e-5 and
 * drown in float rounding).  See FD_* below for the tolerances. */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "peftref/peftref.h"
#include "model_internal.h"
#include "rng.h"
#include "gradcheck.h"
#include "harness.h"

/* Central differences with eps = 3e-3 on float parameters.  The loss
 * probed is the mean cross-entropy recomputed in double from the logits of
 * the forward pass (test_loss_and_masking checks it equals the forward's
 * own loss to 1e-5): that removes the final rounding of a ~4-nat loss to
 * float, 2.4e-7, which alone would put 4e-5 of noise into every
 * difference.  What remains is float rounding inside the network and the
 * truncation error eps^2/6 times the third derivative; over 20 seeds x 25
 * tensors x 6 probes the worst |fd - g| was 3.1e-5.  A probe fails when
 * |fd - g| > FD_ATOL + FD_RTOL * max(|g|, |fd|): 1e-4 absolute is three
 * times that worst case yet small against the typical probed gradient
 * (1e-3 .. 5e-2), and 5% relative catches any wrong factor, transposition
 * or missing term. */
#define FD_EPS 3e-3
#define FD_RTOL 5e-2
#define FD_ATOL 1e-4
#define FD_PROBES 6

enum { TB = 2, TT = 8 };

static pr_model_config small_config(uint64_t seed)
{
    return th_config(&(th_shape){ .L = 2, .C = 32, .H = 4, .Hkv = 4, .hd = 8, .F = 128, .V = 64, .max_seq = 16 }, seed);
}

static pr_model *small_model(uint64_t seed)
{
    pr_model_config c = small_config(seed);
    return th_model_new(&c, TB, TT);
}

static void loss_ctx_init(th_loss_ctx *lc, pr_model *m, unsigned seed)
{
    th_loss_init_rng(lc, m, TB, TT, seed);
}

/* forward + backward from zeroed gradients */
static void forward_backward(th_loss_ctx *lc)
{
    assert_true(isfinite(th_forward_backward(lc)));
}

/* FD-check every trainable base tensor; returns the failure count. */
static int check_trainable_tensors(th_loss_ctx *lc)
{
    int fails = 0, checked = 0;
    for (int i = 0; i < pr_model_n_tensors(lc->m); i++) {
        const pr_tensor_info *t = pr_model_tensor(lc->m, i);
        if (!t->trainable)
            continue;
        /* copy: gc_check probes through the forward pass, which must not
         * touch the analytic gradient, but keep it safe from later steps */
        float *g = malloc((size_t)t->numel * sizeof(float));
        assert_non_null(g);
        memcpy(g, t->grad, (size_t)t->numel * sizeof(float));
        fails += gc_check(t->name, t->data, g, (size_t)t->numel, th_loss, lc,
                          FD_EPS, FD_RTOL, FD_ATOL, FD_PROBES);
        free(g);
        checked++;
    }
    assert_true(checked > 0);
    return fails;
}

/* ---- configuration and names --------------------------------------------- */

static void test_presets_and_counts(void **state)
{
    (void)state;
    pr_model_config c;
    assert_int_equal(pr_config_preset("gpt2-small", &c), PR_OK);
    pr_error err = { 0 };
    assert_int_equal(pr_config_validate(&c, &err), PR_OK);
    assert_true(pr_config_param_count(&c) == INT64_C(124439808));
    assert_int_equal(c.n_layers, 12);
    assert_int_equal(c.d_model, 768);
    assert_int_equal(c.vocab_size, 50257);

    assert_int_equal(pr_config_preset("gpt2-tiny", &c), PR_OK);
    assert_int_equal(pr_config_validate(&c, &err), PR_OK);
    int64_t tiny = pr_config_param_count(&c);
    assert_true(tiny > 100000 && tiny < 140000);
    assert_int_equal(pr_config_preset("no-such-model", &c), PR_ERR_NOTFOUND);

    /* the sum of the created table equals the formula, tied head once */
    pr_model_config s = small_config(1);
    pr_model *m = NULL;
    assert_int_equal(pr_model_create(&s, &m, &err), PR_OK);
    int64_t sum = 0;
    for (int i = 0; i < pr_model_n_tensors(m); i++)
        sum += pr_model_tensor(m, i)->numel;
    assert_true(sum == pr_config_param_count(&s));
    assert_true(sum == pr_model_param_count(m));
    /* 2 embeddings + 12 per layer + final norm pair */
    assert_int_equal(pr_model_n_tensors(m), 2 + 12 * s.n_layers + 2);
    pr_model_free(m);

    /* an untied head adds one (V,C) tensor */
    s.tied_head = 0;
    assert_int_equal(pr_model_create(&s, &m, &err), PR_OK);
    assert_true(pr_model_param_count(m) == pr_config_param_count(&s));
    assert_non_null(pr_model_find_tensor(m, "lm_head.weight"));
    pr_model_free(m);
}

static void test_config_validate(void **state)
{
    (void)state;
    pr_model_config c;
    pr_error err = { 0 };
    pr_config_preset("gpt2-tiny", &c);
    c.n_kv_heads = 3;
    assert_int_equal(pr_config_validate(&c, &err), PR_ERR_INVALID);
    assert_non_null(strstr(err.msg, "n_kv_heads"));

    pr_config_preset("gpt2-tiny", &c);
    c.d_ff = 0;
    assert_int_equal(pr_config_validate(&c, &err), PR_ERR_INVALID);
    assert_non_null(strstr(err.msg, "d_ff"));

    pr_config_preset("gpt2-tiny", &c);
    c.norm_eps = -1.0f;
    assert_int_equal(pr_config_validate(&c, &err), PR_ERR_INVALID);
    assert_non_null(strstr(err.msg, "norm_eps"));

    pr_config_preset("gpt2-tiny", &c);
    c.family = PR_FAMILY_LLAMA;
    c.norm = PR_NORM_RMSNORM;
    c.act = PR_ACT_SWIGLU;
    c.pos = PR_POS_ROPE;
    c.rope_theta = 10000.0f;
    c.bias = 0;
    c.tied_head = 0;
    /* the LLaMA family keeps q, k and v separate */
    assert_int_equal(pr_config_validate(&c, &err), PR_ERR_UNSUPPORTED);
    assert_non_null(strstr(err.msg, "LLaMA"));
    assert_non_null(strstr(err.msg, "fused_qkv"));
    /* counting does not depend on it:
     * 2 norms of C + qkv + o + 3 SwiGLU matrices per layer, final norm, head */
    int64_t C = 64, F = 256, V = 256, L = 2;
    int64_t want = V * C + L * (2 * C + C * 3 * C + C * C + 3 * C * F) + C + V * C;
    assert_true(pr_config_param_count(&c) == want);
    pr_model *m = NULL;
    assert_int_equal(pr_model_create(&c, &m, &err), PR_ERR_UNSUPPORTED);
    assert_null(m);
    c.fused_qkv = 0;
    assert_int_equal(pr_model_create(&c, &m, &err), PR_OK);
    assert_true(pr_model_param_count(m) == want);
    assert_non_null(pr_model_find_tensor(m, "model.layers.1.self_attn.k_proj.weight"));
    pr_model_free(m);
    m = NULL;

    pr_config_preset("gpt2-tiny", &c);
    c.act = PR_ACT_SWIGLU;
    assert_int_equal(pr_config_validate(&c, &err), PR_ERR_UNSUPPORTED);
    assert_non_null(strstr(err.msg, "act"));
}

/* Each dimension's upper bound (include/peftref/config.h) is named in
 * the message; a shape whose products pass 2^31 elements per matrix is
 * refused; the bounds themselves and the GPT-2 presets are accepted. */
static void test_config_bounds(void **state)
{
    (void)state;
    pr_model_config c;
    pr_error err = { 0 };
    pr_config_preset("gpt2-tiny", &c);
    c.n_layers = 500000;
    assert_int_equal(pr_config_validate(&c, &err), PR_ERR_INVALID);
    assert_string_equal(err.msg, "config: n_layers 500000 is more than 1024 (PR_MAX_N_LAYERS)");
    assert_true(pr_config_param_count(&c) == -1);
    c.n_layers = PR_MAX_N_LAYERS;
    assert_int_equal(pr_config_validate(&c, &err), PR_OK);
    assert_true(pr_config_param_count(&c) > 0);

    const struct { int *field; int max; const char *msg; } b[] = {
        { &c.d_model, PR_MAX_D_MODEL, "config: d_model 65537 is more than 65536 (PR_MAX_D_MODEL)" },
        { &c.n_heads, PR_MAX_N_HEADS, "config: n_heads 1025 is more than 1024 (PR_MAX_N_HEADS)" },
        { &c.n_kv_heads, PR_MAX_N_HEADS, "config: n_kv_heads 1025 is more than 1024 (PR_MAX_N_HEADS)" },
        { &c.d_head, PR_MAX_D_HEAD, "config: d_head 4097 is more than 4096 (PR_MAX_D_HEAD)" },
        { &c.d_ff, PR_MAX_D_FF, "config: d_ff 262145 is more than 262144 (PR_MAX_D_FF)" },
        { &c.vocab_size, PR_MAX_VOCAB, "config: vocab_size 4194305 is more than 4194304 (PR_MAX_VOCAB)" },
        { &c.max_seq, PR_MAX_SEQ, "config: max_seq 1048577 is more than 1048576 (PR_MAX_SEQ)" },
    };
    for (size_t i = 0; i < sizeof b / sizeof b[0]; i++) {
        pr_config_preset("gpt2-tiny", &c);
        *b[i].field = b[i].max + 1;
        assert_int_equal(pr_config_validate(&c, &err), PR_ERR_INVALID);
        assert_string_equal(err.msg, b[i].msg);
        assert_true(pr_config_param_count(&c) == -1);
        *b[i].field = INT32_MAX;   /* no overflow on the way to the refusal */
        assert_int_equal(pr_config_validate(&c, &err), PR_ERR_INVALID);
        assert_true(pr_config_param_count(&c) == -1);
    }

    /* every dimension within its bound, a product past 2^31 elements */
    pr_config_preset("gpt2-tiny", &c);
    c.d_model = PR_MAX_D_MODEL;
    c.vocab_size = PR_MAX_VOCAB;
    c.n_heads = c.n_kv_heads = 1024;
    c.d_head = 64;
    c.d_ff = PR_MAX_D_FF;
    assert_int_equal(pr_config_validate(&c, &err), PR_ERR_INVALID);
    assert_string_equal(err.msg, "config: a weight matrix of this shape exceeds 2^31 elements");
    /* counted without overflow all the same: 2^22 x 2^16 embedding ... */
    int64_t n = pr_config_param_count(&c);
    assert_true(n > (int64_t)PR_MAX_VOCAB * PR_MAX_D_MODEL);

    static const char *const presets[] = { "gpt2-tiny", "gpt2-small", "gpt2-medium", "gpt2-large", "gpt2-xl" };
    for (size_t i = 0; i < sizeof presets / sizeof presets[0]; i++) {
        assert_int_equal(pr_config_preset(presets[i], &c), PR_OK);
        assert_int_equal(pr_config_validate(&c, &err), PR_OK);
    }
}

static void test_site_names(void **state)
{
    (void)state;
    for (int s = 0; s < PR_SITE_COUNT; s++)
        assert_int_equal(pr_site_parse(pr_site_name(s)), s);
    assert_string_equal(pr_site_name(PR_SITE_ATTN_K), "attn.k");
    assert_string_equal(pr_site_name(PR_SITE_COUNT), "?");
    assert_int_equal(pr_site_parse("c_attn"), PR_SITE_QKV);
    assert_int_equal(pr_site_parse("attn.c_attn"), PR_SITE_QKV);
    assert_int_equal(pr_site_parse("attn.c_proj"), PR_SITE_O);
    assert_int_equal(pr_site_parse("mlp.c_proj"), PR_SITE_FFN_DOWN);
    assert_int_equal(pr_site_parse("c_proj"), -1); /* ambiguous in GPT-2 */
    assert_int_equal(pr_site_parse("c_fc"), PR_SITE_FFN_UP);
    assert_int_equal(pr_site_parse("mlp.c_fc"), PR_SITE_FFN_UP);
    assert_int_equal(pr_site_parse("q_proj"), PR_SITE_Q);
    assert_int_equal(pr_site_parse("self_attn.v_proj"), PR_SITE_V);
    assert_int_equal(pr_site_parse("o_proj"), PR_SITE_O);
    assert_int_equal(pr_site_parse("mlp.gate_proj"), PR_SITE_FFN_GATE);
    assert_int_equal(pr_site_parse("down_proj"), PR_SITE_FFN_DOWN);
    assert_int_equal(pr_site_parse("wte"), PR_SITE_EMBED);
    assert_int_equal(pr_site_parse("embeddings"), PR_SITE_EMBED);
    assert_int_equal(pr_site_parse("nope"), -1);
    assert_int_equal(pr_site_parse(NULL), -1);
    assert_int_equal(pr_site_is_projection(PR_SITE_V), 1);
    assert_int_equal(pr_site_is_projection(PR_SITE_ATTN_V), 0);
    assert_int_equal(pr_site_is_per_layer(PR_SITE_EMBED), 0);
    assert_int_equal(pr_site_is_per_layer(PR_SITE_BLOCK_OUT), 1);
}

static void test_rng(void **state)
{
    (void)state;
    pr_rng a, b;
    rng_seed(&a, 42);
    rng_seed(&b, 42);
    for (int i = 0; i < 100; i++)
        assert_true(rng_next(&a) == rng_next(&b));
    rng_seed(&b, 43);
    assert_true(rng_next(&a) != rng_next(&b));
    /* 20000 normals: mean within 5 sigma (0.035), variance within 0.05 */
    double s = 0, s2 = 0;
    int n = 20000;
    for (int i = 0; i < n; i++) {
        float u = rng_uniform(&a);
        assert_true(u >= 0.0f && u < 1.0f);
        double z = rng_normal(&a);
        assert_true(isfinite(z));
        s += z;
        s2 += z * z;
    }
    double mean = s / n, var = s2 / n - mean * mean;
    assert_true(fabs(mean) < 0.035);
    assert_true(fabs(var - 1.0) < 0.05);
}

/* The random init is one rng_normal stream in table order, whatever the
 * thread count of its chunked Box-Muller: every weight of a model whose
 * tensors span several chunks equals the serial stream bit for bit. */
static void test_init_stream(void **state)
{
    (void)state;
    pr_model_config c;
    assert_int_equal(pr_config_preset("llama-tiny", &c), PR_OK);
    c.vocab_size = 1200; /* embed_tokens 1200 x 64 = 76,800: two chunks of 65,536 */
    c.seed = 99;
    pr_model *m = NULL;
    pr_error err = { 0 };
    assert_int_equal(pr_model_create(&c, &m, &err), PR_OK);
    pr_rng r;
    rng_seed(&r, c.seed);
    size_t checked = 0;
    for (int i = 0; i < pr_model_n_tensors(m); i++) {
        const pr_tensor_info *t = pr_model_tensor(m, i);
        if (t->kind != PR_TENSOR_WEIGHT && t->kind != PR_TENSOR_EMBEDDING)
            continue;
        for (int64_t j = 0; j < t->numel; j++) {
            float want = c.init_std * rng_normal(&r);
            if (memcmp(&want, &t->data[j], sizeof want) != 0)
                fail_msg("%s[%lld] = %.9g, the serial stream gives %.9g", t->name, (long long)j,
                         (double)t->data[j], (double)want);
        }
        checked += (size_t)t->numel;
    }
    assert_true(checked > 65536);
    pr_model_free(m);
}

/* ---- tensors and init ---------------------------------------------------- */

static void test_tensor_table(void **state)
{
    (void)state;
    pr_model *m = small_model(7);
    const pr_tensor_info *t = pr_model_find_tensor(m, "h.1.attn.c_attn.weight");
    assert_non_null(t);
    assert_int_equal(t->ndim, 2);
    assert_true(t->shape[0] == 32 && t->shape[1] == 96);
    assert_int_equal(t->layer, 1);
    assert_int_equal(t->kind, PR_TENSOR_WEIGHT);
    assert_ptr_equal(pr_model_find_tensor(m, "transformer.h.1.attn.c_attn.weight"), t);
    t = pr_model_find_tensor(m, "h.0.mlp.c_proj.weight");
    assert_true(t->shape[0] == 128 && t->shape[1] == 32);
    t = pr_model_find_tensor(m, "wte.weight");
    assert_true(t->shape[0] == 64 && t->shape[1] == 32 && t->layer == -1);
    assert_int_equal(t->kind, PR_TENSOR_EMBEDDING);
    assert_int_equal(pr_model_find_tensor(m, "wpe.weight")->kind, PR_TENSOR_EMBEDDING);
    t = pr_model_find_tensor(m, "ln_f.bias");
    assert_int_equal(t->kind, PR_TENSOR_NORM_BIAS);
    assert_null(pr_model_find_tensor(m, "h.2.ln_1.weight"));
    assert_null(pr_model_find_tensor(m, "lm_head.weight")); /* tied */

    /* init: gains 1, biases 0, weights ~ N(0, 0.1), residual projections
     * ~ N(0, 0.1/sqrt(2L)) = 0.05; the std estimate over >= 4096 draws is
     * within 10% with overwhelming probability */
    for (int i = 0; i < pr_model_n_tensors(m); i++) {
        t = pr_model_tensor(m, i);
        assert_non_null(t->data);
        assert_null(t->grad);
        if (t->kind == PR_TENSOR_NORM_GAIN)
            for (int64_t j = 0; j < t->numel; j++) assert_true(t->data[j] == 1.0f);
        else if (t->kind != PR_TENSOR_WEIGHT && t->kind != PR_TENSOR_EMBEDDING)
            for (int64_t j = 0; j < t->numel; j++) assert_true(t->data[j] == 0.0f);
        else if (t->numel >= 4096) {
            double s2 = 0;
            for (int64_t j = 0; j < t->numel; j++) s2 += (double)t->data[j] * t->data[j];
            double sd = sqrt(s2 / (double)t->numel);
            double want = strstr(t->name, "c_proj.weight") ? 0.1 / 2.0 : 0.1;
            assert_true(fabs(sd / want - 1.0) < 0.1);
        }
    }
    pr_model_free(m);
}

static void test_determinism(void **state)
{
    (void)state;
    pr_model *a = small_model(11), *b = small_model(11), *c = small_model(12);
    int differ = 0;
    for (int i = 0; i < pr_model_n_tensors(a); i++) {
        const pr_tensor_info *ta = pr_model_tensor(a, i), *tb = pr_model_tensor(b, i), *tc = pr_model_tensor(c, i);
        assert_string_equal(ta->name, tb->name);
        assert_memory_equal(ta->data, tb->data, (size_t)ta->numel * sizeof(float));
        if (memcmp(ta->data, tc->data, (size_t)ta->numel * sizeof(float)) != 0)
            differ++;
    }
    /* every weight matrix (2 + 4 per layer) differs between seeds */
    assert_int_equal(differ, 2 + 4 * 2);

    /* same model, same batch: bit-identical logits */
    th_loss_ctx la, lb;
    loss_ctx_init(&la, a, 5);
    loss_ctx_init(&lb, b, 5);
    double l1 = th_loss(&la), l2 = th_loss(&lb);
    assert_true(l1 == l2);
    assert_memory_equal(pr_model_logits(a), pr_model_logits(b), (size_t)TB * TT * 64 * sizeof(float));
    pr_model_free(a);
    pr_model_free(b);
    pr_model_free(c);
}

/* ---- loss ---------------------------------------------------------------- */

static void test_loss_and_masking(void **state)
{
    (void)state;
    pr_model *m = small_model(3);
    th_loss_ctx lc;
    loss_ctx_init(&lc, m, 9);
    int V = 64, N = TB * TT;

    /* the loss is the mean CE over scored rows, recomputed here in double */
    for (int t = TT - 3; t < TT; t++) {
        lc.targets[t] = -1;          /* last 3 positions of row 0 */
        lc.targets[TT + t] = -1;     /* and of row 1 */
    }
    lc.targets[TT + 1] = -100;       /* any negative id is unscored */
    float loss = 0.0f;
    pr_error err = { 0 };
    assert_int_equal(pr_model_forward(m, &lc.batch, &loss, &err), PR_OK);
    assert_true(pr_model_scored_tokens(m) == N - 7);
    const float *logits = pr_model_logits(m);
    assert_true(fabs(loss - th_mean_ce(logits, lc.targets, N, V)) < 1e-5);

    /* a new last token changes only unscored logits: the loss is identical */
    float *saved = malloc((size_t)N * V * sizeof(float));
    memcpy(saved, logits, (size_t)N * V * sizeof(float));
    lc.tokens[TT - 1] = (lc.tokens[TT - 1] + 1) % V;
    lc.tokens[2 * TT - 1] = (lc.tokens[2 * TT - 1] + 1) % V;
    float loss2 = 0.0f;
    assert_int_equal(pr_model_forward(m, &lc.batch, &loss2, &err), PR_OK);
    assert_true(loss2 == loss);
    assert_true(memcmp(saved, pr_model_logits(m), (size_t)N * V * sizeof(float)) != 0);
    /* and so does another ignore id at an unscored position */
    lc.targets[TT + 1] = -1;
    assert_int_equal(pr_model_forward(m, &lc.batch, &loss2, &err), PR_OK);
    assert_true(loss2 == loss);
    free(saved);

    /* nothing scored: forward is fine, backward is an error */
    for (int i = 0; i < N; i++) lc.targets[i] = -1;
    float l = 1.0f;
    assert_int_equal(pr_model_forward(m, &lc.batch, &l, &err), PR_OK);
    assert_true(pr_model_scored_tokens(m) == 0);
    assert_int_equal(pr_model_backward(m, &err), PR_ERR_INVALID);
    assert_non_null(strstr(err.msg, "scored"));

    /* logits only: no targets, no backward */
    lc.batch.targets = NULL;
    assert_int_equal(pr_model_forward(m, &lc.batch, NULL, &err), PR_OK);
    assert_int_equal(pr_model_backward(m, &err), PR_ERR_INVALID);
    pr_model_free(m);
}

/* ---- gradients of base tensors ------------------------------------------- */

static void test_grad_full(void **state)
{
    (void)state;
    pr_model *m = small_model(21);
    pr_error err = { 0 };
    assert_int_equal(pr_model_set_trainable(m, "*", 1, &err), PR_OK);
    th_loss_ctx lc;
    loss_ctx_init(&lc, m, 22);
    lc.targets[3] = -1; /* one unscored row inside the batch */
    forward_backward(&lc);
    assert_int_equal(check_trainable_tensors(&lc), 0);

    /* gradients accumulate: a second backward doubles them */
    const pr_tensor_info *t = pr_model_find_tensor(m, "h.0.attn.c_attn.weight");
    float g0 = t->grad[5];
    float loss;
    assert_int_equal(pr_model_forward(m, &lc.batch, &loss, &err), PR_OK);
    assert_int_equal(pr_model_backward(m, &err), PR_OK);
    assert_true(fabsf(t->grad[5] - 2.0f * g0) <= 1e-6f * fabsf(g0) + 1e-9f);
    pr_model_zero_grad(m);
    assert_true(t->grad[5] == 0.0f);
    pr_model_free(m);
}

static void test_grad_frozen_and_bitfit(void **state)
{
    (void)state;
    pr_model *m = small_model(31);
    pr_error err = { 0 };
    th_loss_ctx lc;
    loss_ctx_init(&lc, m, 32);

    /* nothing trainable: backward runs, no gradient anywhere */
    forward_backward(&lc);
    for (int i = 0; i < pr_model_n_tensors(m); i++)
        assert_null(pr_model_tensor(m, i)->grad);

    /* BitFit-like: every bias (projections and norms) */
    int n = 0;
    for (int i = 0; i < pr_model_n_tensors(m); i++) {
        const pr_tensor_info *t = pr_model_tensor(m, i);
        if (t->kind == PR_TENSOR_BIAS || t->kind == PR_TENSOR_NORM_BIAS) {
            assert_int_equal(pr_model_set_trainable(m, t->name, 1, &err), PR_OK);
            n++;
        }
    }
    assert_int_equal(n, 2 * 6 + 1);
    for (int i = 0; i < pr_model_n_tensors(m); i++) {
        const pr_tensor_info *t = pr_model_tensor(m, i);
        int is_bias = t->kind == PR_TENSOR_BIAS || t->kind == PR_TENSOR_NORM_BIAS;
        assert_int_equal(t->trainable, is_bias);
        if (is_bias) assert_non_null(t->grad);
        else assert_null(t->grad);
    }
    forward_backward(&lc);
    assert_int_equal(check_trainable_tensors(&lc), 0);

    /* turning one off releases its gradient and keeps the others */
    const pr_tensor_info *t = pr_model_find_tensor(m, "h.1.mlp.c_fc.bias");
    const pr_tensor_info *u = pr_model_find_tensor(m, "ln_f.bias");
    float keep = u->grad[3];
    assert_int_equal(pr_model_set_trainable(m, "transformer.h.1.mlp.c_fc.bias", 0, &err), PR_OK);
    assert_null(t->grad);
    assert_true(u->grad[3] == keep);
    assert_int_equal(pr_model_set_trainable(m, "h.9.nothing", 1, &err), PR_ERR_NOTFOUND);
    assert_non_null(strstr(err.msg, "h.9.nothing"));
    pr_model_free(m);
}

/* Task heads: a hidden-only forward and a backward from dLoss/dhidden.
 * Loss = sum(hidden * R) / N with fixed R in [-0.1, 0.1] (the scale of a
 * head initialised like the model, so the gradients and the float noise
 * of the differences are those of the CE checks and the same tolerances
 * apply), and dLoss/dhidden = R / N. */
typedef struct hidden_ctx {
    th_loss_ctx lc;
    float R[TB * TT * 32];
} hidden_ctx;

static double hidden_loss(void *ctx)
{
    hidden_ctx *hc = ctx;
    pr_error err = { 0 };
    if (pr_model_forward(hc->lc.m, &hc->lc.batch, NULL, &err) != PR_OK)
        return NAN;
    const float *h = pr_model_hidden(hc->lc.m);
    double s = 0;
    for (int i = 0; i < TB * TT * 32; i++)
        s += (double)h[i] * hc->R[i];
    return s / (TB * TT);
}

static void test_backward_hidden(void **state)
{
    (void)state;
    pr_model *m = small_model(37);
    pr_error err = { 0 };
    assert_int_equal(pr_model_set_trainable(m, "*", 1, &err), PR_OK);
    static hidden_ctx hc;
    loss_ctx_init(&hc.lc, m, 38);
    hc.lc.batch.targets = NULL;
    hc.lc.batch.hidden_only = 1;
    gc_fill(hc.R, TB * TT * 32, 39, 0.1f);
    float dh[TB * TT * 32];
    for (int i = 0; i < TB * TT * 32; i++)
        dh[i] = hc.R[i] / (TB * TT);

    assert_int_equal(pr_model_forward(m, &hc.lc.batch, NULL, &err), PR_OK);
    assert_null(pr_model_logits(m));
    assert_non_null(pr_model_hidden(m));
    /* no loss to differentiate, but a hidden-state gradient works */
    assert_int_equal(pr_model_backward(m, &err), PR_ERR_INVALID);
    pr_model_zero_grad(m);
    assert_int_equal(pr_model_backward_hidden(m, dh, &err), PR_OK);

    int f = 0, checked = 0;
    for (int i = 0; i < pr_model_n_tensors(m); i++) {
        const pr_tensor_info *t = pr_model_tensor(m, i);
        if (strcmp(t->name, "wte.weight") == 0)
            continue; /* no head here: only batch-token rows; see below */
        float *g = malloc((size_t)t->numel * sizeof(float));
        memcpy(g, t->grad, (size_t)t->numel * sizeof(float));
        f += gc_check(t->name, t->data, g, (size_t)t->numel, hidden_loss, &hc, FD_EPS, FD_RTOL, FD_ATOL, FD_PROBES);
        free(g);
        checked++;
    }
    const pr_tensor_info *wte = pr_model_find_tensor(m, "wte.weight");
    size_t row = (size_t)hc.lc.tokens[5] * 32;
    float g[32];
    memcpy(g, wte->grad + row, sizeof g);
    f += gc_check("wte[tokens[5]]", wte->data + row, g, 32, hidden_loss, &hc, FD_EPS, FD_RTOL, FD_ATOL, 0);
    assert_true(checked > 20);
    assert_int_equal(f, 0);
    pr_model_free(m);
}

/* ---- site hooks written for the test ------------------------------------- */

/* Parallel low-rank branch y += x . A . B, A (d_in, r), B (r, d_out). */
typedef struct lowrank {
    int d_in, d_out, r;
    float *A, *B, *dA, *dB;
    float *h; /* (rows, r) saved x.A */
    float *x_seen; /* (rows, d_in) the x of the last forward */
    int calls_fwd, calls_bwd;
} lowrank;

static void lowrank_init(lowrank *lr, int d_in, int d_out, int r, unsigned seed, float scale_b)
{
    lr->d_in = d_in;
    lr->d_out = d_out;
    lr->r = r;
    lr->A = calloc((size_t)d_in * r, sizeof(float));
    lr->B = calloc((size_t)r * d_out, sizeof(float));
    lr->dA = calloc((size_t)d_in * r, sizeof(float));
    lr->dB = calloc((size_t)r * d_out, sizeof(float));
    lr->h = calloc((size_t)TB * TT * r, sizeof(float));
    lr->x_seen = calloc((size_t)TB * TT * d_in, sizeof(float));
    gc_fill(lr->A, (size_t)d_in * r, seed, 0.3f);
    if (scale_b != 0.0f)
        gc_fill(lr->B, (size_t)r * d_out, seed + 1, scale_b);
    lr->calls_fwd = lr->calls_bwd = 0;
}

static void lowrank_free(lowrank *lr)
{
    free(lr->A); free(lr->B); free(lr->dA); free(lr->dB); free(lr->h); free(lr->x_seen);
}

static int lowrank_forward(void *self, const pr_site_io *io, pr_error *err)
{
    lowrank *lr = self;
    if (io->x_dim != lr->d_in || io->y_dim != lr->d_out)
        return pr_errorf(err, PR_ERR_INVALID, "lowrank: dims %d->%d, expected %d->%d",
                         io->x_dim, io->y_dim, lr->d_in, lr->d_out);
    for (int i = 0; i < io->rows; i++) {
        const float *x = io->x + (size_t)i * io->x_ld;
        float *h = lr->h + (size_t)i * lr->r;
        memcpy(lr->x_seen + (size_t)i * lr->d_in, x, (size_t)lr->d_in * sizeof(float));
        for (int k = 0; k < lr->r; k++) {
            float s = 0;
            for (int j = 0; j < lr->d_in; j++) s += x[j] * lr->A[j * lr->r + k];
            h[k] = s;
        }
        float *y = io->y + (size_t)i * io->y_ld;
        for (int o = 0; o < lr->d_out; o++) {
            float s = 0;
            for (int k = 0; k < lr->r; k++) s += h[k] * lr->B[k * lr->d_out + o];
            y[o] += s;
        }
    }
    lr->calls_fwd++;
    return PR_OK;
}

static int lowrank_backward(void *self, const pr_site_io *io, pr_error *err)
{
    (void)err;
    lowrank *lr = self;
    float dh[64];
    for (int i = 0; i < io->rows; i++) {
        const float *x = io->x + (size_t)i * io->x_ld;
        const float *dy = io->dy + (size_t)i * io->y_ld;
        const float *h = lr->h + (size_t)i * lr->r;
        for (int k = 0; k < lr->r; k++) {
            float s = 0;
            for (int o = 0; o < lr->d_out; o++) {
                lr->dB[k * lr->d_out + o] += h[k] * dy[o];
                s += lr->B[k * lr->d_out + o] * dy[o];
            }
            dh[k] = s;
        }
        for (int j = 0; j < lr->d_in; j++) {
            float s = 0;
            for (int k = 0; k < lr->r; k++) {
                lr->dA[j * lr->r + k] += x[j] * dh[k];
                s += lr->A[j * lr->r + k] * dh[k];
            }
            if (io->dx) io->dx[(size_t)i * io->x_ld + j] += s;
        }
    }
    lr->calls_bwd++;
    return PR_OK;
}

static pr_site_hook lowrank_hook(lowrank *lr)
{
    pr_site_hook h = { .forward = lowrank_forward, .backward = lowrank_backward, .self = lr };
    return h;
}

/* Sequential elementwise rescaling y <- y * s (IA3-like), s (dim). */
typedef struct rescale {
    int dim;
    float *s, *ds;
    float *y_in; /* (rows, dim) the y it was given */
} rescale;

static void rescale_init(rescale *rs, int dim, unsigned seed)
{
    rs->dim = dim;
    rs->s = malloc((size_t)dim * sizeof(float));
    rs->ds = calloc((size_t)dim, sizeof(float));
    rs->y_in = calloc((size_t)TB * TT * dim, sizeof(float));
    gc_fill(rs->s, (size_t)dim, seed, 0.5f);
    for (int j = 0; j < dim; j++) rs->s[j] += 1.0f;
}

static void rescale_free(rescale *rs)
{
    free(rs->s); free(rs->ds); free(rs->y_in);
}

static int rescale_forward(void *self, const pr_site_io *io, pr_error *err)
{
    rescale *rs = self;
    if (io->y_dim != rs->dim)
        return pr_errorf(err, PR_ERR_INVALID, "rescale: dim %d, expected %d", io->y_dim, rs->dim);
    for (int i = 0; i < io->rows; i++) {
        float *y = io->y + (size_t)i * io->y_ld;
        memcpy(rs->y_in + (size_t)i * rs->dim, y, (size_t)rs->dim * sizeof(float));
        for (int j = 0; j < rs->dim; j++) y[j] *= rs->s[j];
    }
    return PR_OK;
}

static int rescale_backward(void *self, const pr_site_io *io, pr_error *err)
{
    (void)err;
    rescale *rs = self;
    for (int i = 0; i < io->rows; i++) {
        float *dy = io->dy + (size_t)i * io->y_ld;
        const float *y = rs->y_in + (size_t)i * rs->dim;
        for (int j = 0; j < rs->dim; j++) {
            rs->ds[j] += y[j] * dy[j];
            dy[j] *= rs->s[j];
        }
    }
    return PR_OK;
}

static pr_site_hook rescale_hook(rescale *rs)
{
    pr_site_hook h = { .forward = rescale_forward, .backward = rescale_backward, .self = rs };
    return h;
}

static void attach(pr_model *m, int site, int layer, pr_site_hook h)
{
    pr_error err = { 0 };
    int rc = pr_model_attach_hook(m, site, layer, &h, &err);
    if (rc) fprintf(stderr, "attach: %s\n", err.msg);
    assert_int_equal(rc, PR_OK);
}

static int check_lowrank(th_loss_ctx *lc, lowrank *lr, const char *what)
{
    char name[64];
    snprintf(name, sizeof name, "%s.A", what);
    int f = gc_check(name, lr->A, lr->dA, (size_t)lr->d_in * lr->r, th_loss, lc, FD_EPS, FD_RTOL, FD_ATOL, FD_PROBES);
    snprintf(name, sizeof name, "%s.B", what);
    f += gc_check(name, lr->B, lr->dB, (size_t)lr->r * lr->d_out, th_loss, lc, FD_EPS, FD_RTOL, FD_ATOL, FD_PROBES);
    return f;
}

static void zero_lowrank(lowrank *lr)
{
    memset(lr->dA, 0, (size_t)lr->d_in * lr->r * sizeof(float));
    memset(lr->dB, 0, (size_t)lr->r * lr->d_out * sizeof(float));
}

/* The same code runs GPT-2 variants the config can describe: no biases,
 * an untied head, grouped-query heads (Hkv = H/2) and d_head != C/H. */
static void test_grad_variants(void **state)
{
    (void)state;
    pr_model_config c = small_config(35);
    c.bias = 0;
    c.tied_head = 0;
    c.n_kv_heads = 2;
    c.d_head = 6;  /* Q = 24, KV = 12, QKV = 48 with C = 32 */
    pr_model *m = NULL;
    pr_error err = { 0 };
    assert_int_equal(pr_model_create(&c, &m, &err), PR_OK);
    assert_true(pr_model_param_count(m) == pr_config_param_count(&c));
    assert_null(pr_model_find_tensor(m, "h.0.attn.c_attn.bias"));
    assert_null(pr_model_find_tensor(m, "ln_f.bias"));
    const pr_tensor_info *t = pr_model_find_tensor(m, "h.0.attn.c_attn.weight");
    assert_true(t->shape[0] == 32 && t->shape[1] == 48);
    t = pr_model_find_tensor(m, "h.1.attn.c_proj.weight");
    assert_true(t->shape[0] == 24 && t->shape[1] == 32);
    int din, dout;
    assert_int_equal(pr_model_site_dims(m, PR_SITE_K, &din, &dout), 0);
    assert_true(din == 32 && dout == 12);
    assert_int_equal(pr_model_site_dims(m, PR_SITE_O, &din, &dout), 0);
    assert_true(din == 24 && dout == 32);
    assert_int_equal(pr_model_reserve(m, TB, TT, &err), PR_OK);
    assert_int_equal(pr_model_set_trainable(m, "*", 1, &err), PR_OK);

    lowrank k0;
    lowrank_init(&k0, 32, 12, 2, 1500, 0.3f);
    attach(m, PR_SITE_K, 0, lowrank_hook(&k0));
    rescale v1;
    rescale_init(&v1, 12, 1600);
    attach(m, PR_SITE_ATTN_V, 1, rescale_hook(&v1));

    th_loss_ctx lc;
    loss_ctx_init(&lc, m, 36);
    forward_backward(&lc);
    int f = check_trainable_tensors(&lc) + check_lowrank(&lc, &k0, "k0") +
            gc_check("v1.s", v1.s, v1.ds, 12, th_loss, &lc, FD_EPS, FD_RTOL, FD_ATOL, FD_PROBES);
    /* untied: only rows of tokens in the batch have a wte gradient, so
     * probe one such row in full as well */
    t = pr_model_find_tensor(m, "wte.weight");
    size_t row = (size_t)lc.tokens[3] * 32;
    float g[32];
    memcpy(g, t->grad + row, sizeof g);
    f += gc_check("wte[tokens[3]]", t->data + row, g, 32, th_loss, &lc, FD_EPS, FD_RTOL, FD_ATOL, 0);
    assert_int_equal(f, 0);
    lowrank_free(&k0);
    rescale_free(&v1);
    pr_model_free(m);
}

/* Parallel low-rank hooks at projection sites, fused and sliced. */
static void test_hook_parallel_projections(void **state)
{
    (void)state;
    pr_model *m = small_model(41);
    th_loss_ctx lc;
    loss_ctx_init(&lc, m, 42);
    int din, dout;
    assert_int_equal(pr_model_site_dims(m, PR_SITE_QKV, &din, &dout), 0);
    assert_true(din == 32 && dout == 96);
    assert_int_equal(pr_model_site_dims(m, PR_SITE_V, &din, &dout), 0);
    assert_true(din == 32 && dout == 32);
    assert_int_equal(pr_model_site_dims(m, PR_SITE_FFN_DOWN, &din, &dout), 0);
    assert_true(din == 128 && dout == 32);
    assert_int_equal(pr_model_site_dims(m, PR_SITE_FFN_GATE, &din, &dout), -1);
    assert_int_equal(din, -1);

    lowrank qkv0, o1, v1, down0;
    lowrank_init(&qkv0, 32, 96, 4, 100, 0.3f);
    lowrank_init(&o1, 32, 32, 4, 200, 0.3f);
    lowrank_init(&v1, 32, 32, 2, 300, 0.3f);
    lowrank_init(&down0, 128, 32, 2, 400, 0.3f);
    attach(m, PR_SITE_QKV, 0, lowrank_hook(&qkv0));
    attach(m, PR_SITE_O, 1, lowrank_hook(&o1));
    attach(m, PR_SITE_V, 1, lowrank_hook(&v1));
    attach(m, PR_SITE_FFN_DOWN, 0, lowrank_hook(&down0));
    forward_backward(&lc);
    assert_int_equal(qkv0.calls_fwd, 1);
    assert_int_equal(qkv0.calls_bwd, 1);
    int f = check_lowrank(&lc, &qkv0, "qkv0") + check_lowrank(&lc, &o1, "o1") +
            check_lowrank(&lc, &v1, "v1") + check_lowrank(&lc, &down0, "down0");
    assert_int_equal(f, 0);

    /* with base tensors trainable too, their gradients see the hooks */
    pr_error err = { 0 };
    assert_int_equal(pr_model_set_trainable(m, "h.0.ln_1.weight", 1, &err), PR_OK);
    assert_int_equal(pr_model_set_trainable(m, "h.1.attn.c_attn.weight", 1, &err), PR_OK);
    assert_int_equal(pr_model_set_trainable(m, "wpe.weight", 1, &err), PR_OK);
    zero_lowrank(&qkv0); zero_lowrank(&o1); zero_lowrank(&v1); zero_lowrank(&down0);
    forward_backward(&lc);
    assert_int_equal(check_trainable_tensors(&lc), 0);

    lowrank_free(&qkv0); lowrank_free(&o1); lowrank_free(&v1); lowrank_free(&down0);
    pr_model_free(m);
}

/* Sequential rescaling at stream sites (ffn.act, attn_out, attn.k,
 * block_out), and two hooks at one site (rescale then parallel). */
static void test_hook_stream_sites(void **state)
{
    (void)state;
    pr_model *m = small_model(51);
    pr_error err = { 0 };
    th_loss_ctx lc;
    loss_ctx_init(&lc, m, 52);
    rescale act0, aout1, k1, bout0, act1;
    lowrank act1_par;
    rescale_init(&act0, 128, 500);
    rescale_init(&aout1, 32, 600);
    rescale_init(&k1, 32, 700);
    rescale_init(&bout0, 32, 800);
    rescale_init(&act1, 128, 900);
    lowrank_init(&act1_par, 128, 128, 2, 1000, 0.3f);
    /* attach after reserve: stream buffers are planned again */
    attach(m, PR_SITE_FFN_ACT, 0, rescale_hook(&act0));
    attach(m, PR_SITE_ATTN_OUT, 1, rescale_hook(&aout1));
    attach(m, PR_SITE_ATTN_K, 1, rescale_hook(&k1));
    attach(m, PR_SITE_BLOCK_OUT, 0, rescale_hook(&bout0));
    attach(m, PR_SITE_FFN_ACT, 1, rescale_hook(&act1));
    attach(m, PR_SITE_FFN_ACT, 1, lowrank_hook(&act1_par));
    assert_int_equal(pr_model_set_trainable(m, "h.1.attn.c_attn.bias", 1, &err), PR_OK);
    assert_int_equal(pr_model_set_trainable(m, "h.0.mlp.c_fc.weight", 1, &err), PR_OK);
    forward_backward(&lc);
    int f = 0;
    f += gc_check("act0.s", act0.s, act0.ds, 128, th_loss, &lc, FD_EPS, FD_RTOL, FD_ATOL, FD_PROBES);
    f += gc_check("aout1.s", aout1.s, aout1.ds, 32, th_loss, &lc, FD_EPS, FD_RTOL, FD_ATOL, FD_PROBES);
    f += gc_check("k1.s", k1.s, k1.ds, 32, th_loss, &lc, FD_EPS, FD_RTOL, FD_ATOL, FD_PROBES);
    f += gc_check("bout0.s", bout0.s, bout0.ds, 32, th_loss, &lc, FD_EPS, FD_RTOL, FD_ATOL, FD_PROBES);
    f += gc_check("act1.s", act1.s, act1.ds, 128, th_loss, &lc, FD_EPS, FD_RTOL, FD_ATOL, FD_PROBES);
    f += check_lowrank(&lc, &act1_par, "act1_par");
    f += check_trainable_tensors(&lc);
    assert_int_equal(f, 0);

    /* the second hook at a stream site sees as x the state that entered
     * the site, not the first hook's output: x equals what the rescale
     * (first in line) was given as y */
    assert_int_equal(pr_model_forward(m, &lc.batch, NULL, &err), PR_OK);
    assert_memory_equal(act1_par.x_seen, act1.y_in, (size_t)TB * TT * 128 * sizeof(float));
    rescale_free(&act0); rescale_free(&aout1); rescale_free(&k1); rescale_free(&bout0); rescale_free(&act1);
    lowrank_free(&act1_par);
    pr_model_free(m);
}

/* A hook at the embedding site, with the embeddings trainable too. */
static void test_hook_embed(void **state)
{
    (void)state;
    pr_model *m = small_model(61);
    pr_error err = { 0 };
    th_loss_ctx lc;
    loss_ctx_init(&lc, m, 62);
    lowrank emb;
    lowrank_init(&emb, 32, 32, 3, 1100, 0.3f);
    /* model-level site: layer must be -1 */
    pr_site_hook h = lowrank_hook(&emb);
    assert_int_equal(pr_model_attach_hook(m, PR_SITE_EMBED, 0, &h, &err), PR_ERR_INVALID);
    attach(m, PR_SITE_EMBED, -1, h);
    assert_int_equal(pr_model_set_trainable(m, "wte.weight", 1, &err), PR_OK);
    assert_int_equal(pr_model_set_trainable(m, "wpe.weight", 1, &err), PR_OK);
    forward_backward(&lc);
    int f = check_lowrank(&lc, &emb, "embed") + check_trainable_tensors(&lc);
    assert_int_equal(f, 0);
    lowrank_free(&emb);
    pr_model_free(m);
}

/* A parallel hook whose B is zero changes nothing, bit for bit. */
static void test_hook_zero_init_identity(void **state)
{
    (void)state;
    pr_model *m = small_model(71);
    th_loss_ctx lc;
    loss_ctx_init(&lc, m, 72);
    size_t n = (size_t)TB * TT * 64;
    double l0 = th_loss(&lc);
    float *ref = malloc(n * sizeof(float));
    memcpy(ref, pr_model_logits(m), n * sizeof(float));

    lowrank a, b, c;
    lowrank_init(&a, 32, 96, 4, 1200, 0.0f);
    lowrank_init(&b, 32, 32, 4, 1300, 0.0f);
    lowrank_init(&c, 128, 128, 4, 1400, 0.0f);
    attach(m, PR_SITE_QKV, 0, lowrank_hook(&a));
    attach(m, PR_SITE_O, 1, lowrank_hook(&b));
    attach(m, PR_SITE_FFN_ACT, 0, lowrank_hook(&c)); /* stream site: own buffer */
    double l1 = th_loss(&lc);
    assert_true(l0 == l1);
    assert_memory_equal(ref, pr_model_logits(m), n * sizeof(float));
    assert_int_equal(a.calls_fwd, 1);

    /* detaching restores the plain model, also bit for bit */
    pr_model_detach_hooks(m);
    assert_true(th_loss(&lc) == l0);
    assert_int_equal(a.calls_fwd, 1);
    free(ref);
    lowrank_free(&a); lowrank_free(&b); lowrank_free(&c);
    pr_model_free(m);
}

/* Hook order: forward in attach order, backward in reverse. */
static int order_log[8], order_n;
static int order_fwd(void *self, const pr_site_io *io, pr_error *err)
{
    (void)io; (void)err;
    order_log[order_n++] = (int)(intptr_t)self;
    return PR_OK;
}
static int order_bwd(void *self, const pr_site_io *io, pr_error *err)
{
    (void)io; (void)err;
    order_log[order_n++] = -(int)(intptr_t)self;
    return PR_OK;
}
static int failing_fwd(void *self, const pr_site_io *io, pr_error *err)
{
    (void)self; (void)io;
    return pr_errorf(err, PR_ERR_NUMERIC, "boom");
}

static void test_hook_order_and_errors(void **state)
{
    (void)state;
    pr_model *m = small_model(81);
    pr_error err = { 0 };
    th_loss_ctx lc;
    loss_ctx_init(&lc, m, 82);
    pr_site_hook h1 = { .forward = order_fwd, .backward = order_bwd, .self = (void *)(intptr_t)1 };
    pr_site_hook h2 = { .forward = order_fwd, .backward = order_bwd, .self = (void *)(intptr_t)2 };
    pr_site_hook h3 = { .forward = order_fwd, .backward = order_bwd, .self = (void *)(intptr_t)3 };
    attach(m, PR_SITE_FFN_UP, 1, h1);
    attach(m, PR_SITE_FFN_UP, 1, h2);
    attach(m, PR_SITE_BLOCK_OUT, 1, h3);
    order_n = 0;
    forward_backward(&lc);
    /* forward 1, 2 (ffn.up) then 3 (block_out); backward 3, then 2, 1 */
    int want[] = { 1, 2, 3, -3, -2, -1 };
    assert_int_equal(order_n, 6);
    assert_memory_equal(order_log, want, sizeof want);

    /* a failing hook fails the forward and names the site */
    pr_site_hook bad = { .forward = failing_fwd, .backward = NULL, .self = NULL };
    attach(m, PR_SITE_ATTN_V, 0, bad);
    float loss;
    assert_int_equal(pr_model_forward(m, &lc.batch, &loss, &err), PR_ERR_NUMERIC);
    assert_non_null(strstr(err.msg, "attn.v"));
    assert_non_null(strstr(err.msg, "boom"));
    assert_null(pr_model_logits(m));
    assert_int_equal(pr_model_backward(m, &err), PR_ERR_INVALID);

    /* sites GPT-2 lacks, bad layers and bad site ids */
    pr_model_detach_hooks(m);
    assert_int_equal(pr_model_attach_hook(m, PR_SITE_FFN_GATE, 0, &h1, &err), PR_ERR_UNSUPPORTED);
    assert_non_null(strstr(err.msg, "ffn.gate"));
    assert_int_equal(pr_model_attach_hook(m, PR_SITE_O, 2, &h1, &err), PR_ERR_INVALID);
    assert_int_equal(pr_model_attach_hook(m, PR_SITE_O, -1, &h1, &err), PR_ERR_INVALID);
    assert_int_equal(pr_model_attach_hook(m, PR_SITE_COUNT, 0, &h1, &err), PR_ERR_INVALID);
    pr_model_free(m);
}

/* ---- errors -------------------------------------------------------------- */

static void test_errors(void **state)
{
    (void)state;
    pr_model_config c = small_config(91);
    pr_model *m = NULL;
    pr_error err = { 0 };
    assert_int_equal(pr_model_create(&c, &m, &err), PR_OK);
    int tokens[TB * 32] = { 0 }, targets[TB * 32] = { 0 };
    pr_batch b = {.tokens = tokens, .targets = targets, .B = TB, .T = TT};
    float loss;

    /* forward before reserve */
    assert_int_equal(pr_model_forward(m, &b, &loss, &err), PR_ERR_INVALID);
    assert_non_null(strstr(err.msg, "reserve"));
    assert_int_equal(pr_model_backward(m, &err), PR_ERR_INVALID);
    /* reserve beyond the position table */
    assert_int_equal(pr_model_reserve(m, 1, 17, &err), PR_ERR_INVALID);
    assert_non_null(strstr(err.msg, "max_seq"));
    assert_int_equal(pr_model_reserve(m, TB, TT, &err), PR_OK);

    /* bad token id names its position */
    tokens[TT + 5] = 64;
    assert_int_equal(pr_model_forward(m, &b, &loss, &err), PR_ERR_INVALID);
    assert_non_null(strstr(err.msg, "batch 1 position 5"));
    tokens[TT + 5] = -2;
    assert_int_equal(pr_model_forward(m, &b, &loss, &err), PR_ERR_INVALID);
    tokens[TT + 5] = 0;
    targets[2] = 64;
    assert_int_equal(pr_model_forward(m, &b, &loss, &err), PR_ERR_INVALID);
    assert_non_null(strstr(err.msg, "target"));
    targets[2] = 0;

    /* T beyond max_seq, and beyond the reservation */
    b.T = 17;
    assert_int_equal(pr_model_forward(m, &b, &loss, &err), PR_ERR_INVALID);
    assert_non_null(strstr(err.msg, "max_seq"));
    b.T = 12;
    assert_int_equal(pr_model_forward(m, &b, &loss, &err), PR_ERR_INVALID);
    assert_non_null(strstr(err.msg, "reservation"));
    /* reserving a larger shape makes it work; a smaller batch still runs */
    assert_int_equal(pr_model_reserve(m, TB, 16, &err), PR_OK);
    assert_int_equal(pr_model_forward(m, &b, &loss, &err), PR_OK);
    assert_true(isfinite(loss));
    b.B = 1;
    b.T = 3;
    assert_int_equal(pr_model_forward(m, &b, &loss, &err), PR_OK);
    assert_true(fabsf(loss - logf(64.0f)) < 1.0f);
    pr_model_free(m);

    /* invalid config at create */
    c.n_heads = 0;
    assert_int_equal(pr_model_create(&c, &m, &err), PR_ERR_INVALID);
    assert_non_null(strstr(err.msg, "n_heads"));
}

/* A smaller batch inside the reservation gives the same rows. */
static void test_batch_rows_independent(void **state)
{
    (void)state;
    pr_model *m = small_model(95);
    th_loss_ctx lc;
    loss_ctx_init(&lc, m, 96);
    th_loss(&lc);
    size_t row = (size_t)TT * 64;
    float *two = malloc(2 * row * sizeof(float));
    memcpy(two, pr_model_logits(m), 2 * row * sizeof(float));
    lc.batch.B = 1;
    lc.batch.tokens = lc.tokens + TT;
    lc.batch.targets = lc.targets + TT;
    th_loss(&lc);
    const float *one = pr_model_logits(m);
    double md = 0;
    for (size_t i = 0; i < row; i++)
        md = fmax(md, fabs((double)one[i] - two[row + i]));
    assert_true(md < 1e-5);
    free(two);
    pr_model_free(m);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_presets_and_counts),
        cmocka_unit_test(test_config_validate),
        cmocka_unit_test(test_config_bounds),
        cmocka_unit_test(test_site_names),
        cmocka_unit_test(test_rng),
        cmocka_unit_test(test_init_stream),
        cmocka_unit_test(test_tensor_table),
        cmocka_unit_test(test_determinism),
        cmocka_unit_test(test_loss_and_masking),
        cmocka_unit_test(test_grad_full),
        cmocka_unit_test(test_grad_frozen_and_bitfit),
        cmocka_unit_test(test_grad_variants),
        cmocka_unit_test(test_backward_hidden),
        cmocka_unit_test(test_hook_parallel_projections),
        cmocka_unit_test(test_hook_stream_sites),
        cmocka_unit_test(test_hook_embed),
        cmocka_unit_test(test_hook_zero_init_identity),
        cmocka_unit_test(test_hook_order_and_errors),
        cmocka_unit_test(test_errors),
        cmocka_unit_test(test_batch_rows_independent),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
