/* peftref tests: precision bf16 (core/model/bf16.c, core/model/precision.c).
 *
 * Tolerances come from bf16's rounding: f32 -> bf16 to nearest even has
 * relative error u <= 2^-8.  A product of two rounded operands is off by
 * at most (1+u)^2 - 1 < 2^-7 + 2^-16 of |a||w|, so an f32-accumulated dot
 * product of K terms is within
 *     |c16 - c| <= (2^-7 + 2^-16 + K 2^-24) * sum_k |a_k| |w_k|        (*)
 * of the exact one (the K 2^-24 term is f32 accumulation, whatever order
 * oneDNN sums in).  The same operands rounded first and multiplied in
 * double must agree with oneDNN within K 2^-24 sum|a||w| (bf16 inputs,
 * f32 accumulation: nothing else may round).
 *
 *  - conversions: ties to even, NaN and infinities kept, |error| <= 2^-8|x|;
 *  - bf16_matmul against double references within (*) and the tighter
 *    bound, both weight orientations, bias, accumulation, row strides and
 *    row chunks;
 *  - a model converted to bf16 keeps its tensor table (names, shapes),
 *    stores half the bytes, keeps its fingerprint, saves the bf16 values
 *    as f32, and refuses what it cannot do (training a bf16 tensor,
 *    merging into it, going back to f32);
 *  - host->base_weight_f32 from bf16 storage: GPT-2's fused-QKV slice
 *    ([d_in, d_out], offset) and LLaMA's nn.Linear ([d_out, d_in]), equal
 *    to the rounded f32 weight, for a module attached before conversion;
 *  - gradients of LoRA's parameters under bf16 against finite differences
 *    and against the f32 gradients (looser tolerances, stated there);
 *  - LLaMA's cached decoding in bf16 against its full forward;
 *  - the built-in task: LoRA's validation loss in bf16 within 1% of f32's;
 *  - without oneDNN: precision bf16 is refused with a message saying why
 *    (a build with oneDNN skips that test and says so). */
#include "config.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "peftref/peftref.h"
#include "peftref/module.h"
#include "peftref/pipeline.h"
#include "peftref/plugin.h"
#include "bf16.h"
#include "family.h"
#include "gradcheck.h"
#include "harness.h"
#include "host.h"
#include "module_internal.h"

#define LORA_SO TEST_BUILDDIR "/plugins/.libs/lora.so"
#define PEFTREF_BIN TEST_BUILDDIR "/peftref"
#define PLUGINS TEST_BUILDDIR "/plugins/.libs"

static const double U = 1.0 / 256.0;            /* bf16 unit roundoff 2^-8 */
static const double F32_EPS = 1.0 / 16777216.0; /* 2^-24 */

static const pr_technique *lora;
static void *lora_so;

static int group_setup(void **state)
{
    (void)state;
    lora = th_plugin_technique(LORA_SO, &lora_so);
    return lora ? 0 : -1;
}

static int group_teardown(void **state)
{
    (void)state;
    bf16_shutdown();
    return 0;
}

/* ---- conversions ------------------------------------------------------------ */

static float from_bits(uint32_t u)
{
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static void test_convert(void **state)
{
    (void)state;
    assert_int_equal(bf16_from_f32_1(1.0f), 0x3F80);
    /* 1 + 2^-8 lies halfway between 1 and 1 + 2^-7: ties to even (1) */
    assert_int_equal(bf16_from_f32_1(1.0f + 0x1p-8f), 0x3F80);
    /* 1 + 3*2^-8 is halfway between 1 + 2^-7 (odd) and 1 + 2^-6: to 1 + 2^-6 */
    assert_int_equal(bf16_from_f32_1(1.0f + 3 * 0x1p-8f), 0x3F82);
    /* just above the halfway point rounds up */
    assert_int_equal(bf16_from_f32_1(from_bits(0x3F808001u)), 0x3F81);
    assert_int_equal(bf16_from_f32_1(-2.0f), 0xC000);
    assert_true(isinf(bf16_to_f32_1(bf16_from_f32_1(INFINITY))));
    assert_true(isnan(bf16_to_f32_1(bf16_from_f32_1(NAN))));
    /* a NaN whose payload sits only in the low half stays a NaN */
    assert_true(isnan(bf16_to_f32_1(bf16_from_f32_1(from_bits(0x7F800001u)))));
    /* random values: within 2^-8 relative, and bf16 values convert exactly */
    enum { N = 100000 };
    float *x = malloc(N * sizeof *x), *y = malloc(N * sizeof *y);
    uint16_t *h = malloc(N * sizeof *h);
    assert_non_null(x);
    assert_non_null(y);
    assert_non_null(h);
    gc_fill(x, N, 7, 3.0f);
    bf16_from_f32(h, x, N);
    bf16_to_f32(y, h, N);
    double worst = 0;
    for (int i = 0; i < N; i++) {
        if (x[i] != 0.0f)
            worst = fmax(worst, fabs((double)y[i] - x[i]) / fabs((double)x[i]));
        assert_int_equal(bf16_from_f32_1(y[i]), h[i]);
    }
    printf("conversion: max relative error %.3g (bound 2^-8 = %.3g)\n", worst, U);
    assert_true(worst <= U);
    assert_true(worst > U / 4); /* it does round */
    free(x);
    free(y);
    free(h);
}

/* ---- the product --------------------------------------------------------------- */

/* C (M,N; ldc) (+)= A (M,K; lda) . W(K,N) [+ b] on oneDNN against two double
 * references: exact f32 operands within (*), bf16-rounded operands within
 * K 2^-24 sum|a||w|. */
static void check_product(int M, int K, int N, int lda, int ldc, int w_in_out, int with_bias, int accumulate,
                          size_t chunk)
{
    if (!bf16_available()) {
        printf("bf16 product: skipped (built without oneDNN)\n");
        return;
    }
    float *a = malloc((size_t)M * lda * sizeof *a), *w = malloc((size_t)K * N * sizeof *w);
    float *c = malloc((size_t)M * ldc * sizeof *c), *c0 = malloc((size_t)M * ldc * sizeof *c0);
    float *b = malloc((size_t)N * sizeof *b);
    uint16_t *w16 = malloc((size_t)K * N * sizeof *w16);
    assert_true(a && w && c && c0 && b && w16);
    gc_fill(a, (size_t)M * lda, 11, 1.5f);
    gc_fill(w, (size_t)K * N, 12, 0.5f);
    gc_fill(b, (size_t)N, 13, 1.0f);
    gc_fill(c0, (size_t)M * ldc, 14, 2.0f);
    memcpy(c, c0, (size_t)M * ldc * sizeof *c);
    bf16_from_f32(w16, w, (size_t)K * N);
    /* w holds W (K,N) as [K, N] (in_out) or [N, K] */
    int64_t s0 = w_in_out ? N : 1, s1 = w_in_out ? 1 : K;
    pr_error err = {0};
    bf16_set_chunk_elems(chunk);
    int rc = bf16_matmul(c, ldc, a, lda, w16, s0, s1, with_bias ? b : NULL, M, K, N, accumulate, &err);
    bf16_set_chunk_elems(0);
    if (rc)
        fprintf(stderr, "%s\n", err.msg);
    assert_int_equal(rc, PR_OK);
    double worst_exact = 0, worst_rounded = 0;
    for (int i = 0; i < M; i++) {
        for (int j = 0; j < N; j++) {
            double ex = 0, rd = 0, s = 0;
            for (int k = 0; k < K; k++) {
                double av = a[(size_t)i * lda + k], wv = w[k * s0 + j * s1];
                double ar = bf16_to_f32_1(bf16_from_f32_1((float)av)), wr = bf16_to_f32_1(w16[k * s0 + j * s1]);
                ex += av * wv;
                rd += ar * wr;
                s += fabs(av * wv);
            }
            double add = (with_bias ? b[j] : 0.0) + (accumulate ? c0[(size_t)i * ldc + j] : 0.0);
            double got = c[(size_t)i * ldc + j] - add;
            /* the additions themselves round in f32: one ulp of |add| + |sum| */
            double slack = 2 * F32_EPS * (fabs(add) + fabs(got));
            double bound_exact = (2 * U + U * U + K * F32_EPS) * s + slack;
            double bound_rounded = K * F32_EPS * s + slack + 1e-30;
            assert_true(fabs(got - ex) <= bound_exact);
            assert_true(fabs(got - rd) <= bound_rounded);
            worst_exact = fmax(worst_exact, fabs(got - ex) / (s + 1e-30));
            worst_rounded = fmax(worst_rounded, fabs(got - rd) / (s + 1e-30));
        }
        /* columns past N in a strided C are untouched */
        for (int j = N; j < ldc; j++)
            assert_true(c[(size_t)i * ldc + j] == c0[(size_t)i * ldc + j]);
    }
    printf("bf16 product %dx%dx%d (%s, bias %d, acc %d, chunk %zu): max |err|/sum|aw| %.3g vs f32 operands "
           "(bound %.3g), %.3g vs rounded operands (bound %.3g)\n",
           M, K, N, w_in_out ? "[K,N]" : "[N,K]", with_bias, accumulate, chunk, worst_exact,
           2 * U + U * U + K * F32_EPS, worst_rounded, K * F32_EPS);
    free(a);
    free(w);
    free(c);
    free(c0);
    free(b);
    free(w16);
}

static void test_matmul(void **state)
{
    (void)state;
    check_product(37, 64, 48, 64, 48, 1, 0, 0, 0);
    check_product(37, 64, 48, 70, 53, 0, 1, 0, 0);      /* strides, [N,K], bias */
    check_product(29, 96, 40, 100, 40, 1, 1, 1, 0);     /* accumulate (backward's +=) */
    check_product(50, 64, 24, 64, 30, 0, 0, 1, 1000);   /* chunks of 15 rows, the last 5 */
    check_product(1, 300, 7, 300, 7, 1, 1, 0, 0);       /* one row */
}

/* ---- a converted model ------------------------------------------------------------ */

static pr_model *tiny(const char *preset, int B, int T)
{
    pr_model_config cfg;
    assert_int_equal(pr_config_preset(preset, &cfg), PR_OK);
    cfg.init_std = 0.1f;
    return th_model_new(&cfg, B, T);
}

static void test_model_storage(void **state)
{
    (void)state;
    if (!bf16_available()) {
        printf("model storage: skipped (built without oneDNN)\n");
        return;
    }
    pr_model *m = tiny("gpt2-tiny", 2, 8);
    int n = pr_model_n_tensors(m);
    float **orig = calloc((size_t)n, sizeof *orig);
    char **names = calloc((size_t)n, sizeof *names);
    assert_non_null(orig);
    assert_non_null(names);
    for (int i = 0; i < n; i++) {
        const pr_tensor_info *t = pr_model_tensor(m, i);
        orig[i] = malloc((size_t)t->numel * sizeof(float));
        memcpy(orig[i], t->data, (size_t)t->numel * sizeof(float));
        names[i] = strdup(t->name);
    }
    char fp0[64], fp1[64];
    pr_model_fingerprint(m, fp0, sizeof fp0);
    /* logits in f32, then bf16 */
    th_loss_ctx lc;
    th_loss_init_rng(&lc, m, 2, 8, 5);
    float *l32 = th_logits_copy(&lc);
    pr_error err = {0};
    assert_int_equal(pr_model_get_precision(m), PR_PRECISION_F32);
    assert_int_equal(pr_model_set_precision(m, PR_PRECISION_BF16, &err), PR_OK);
    assert_int_equal(pr_model_get_precision(m), PR_PRECISION_BF16);
    pr_model_fingerprint(m, fp1, sizeof fp1);
    assert_string_equal(fp0, fp1);
    size_t f32_bytes = 0;
    int converted = 0;
    assert_int_equal(pr_model_n_tensors(m), n);
    for (int i = 0; i < n; i++) {
        const pr_tensor_info *t = pr_model_tensor(m, i);
        assert_string_equal(t->name, names[i]);
        float *back = malloc((size_t)t->numel * sizeof(float));
        assert_int_equal(pr_model_tensor_f32(m, t, back, &err), PR_OK);
        if (pr_model_tensor_is_bf16(m, t)) {
            assert_null(t->data);
            assert_int_equal(t->ndim, 2);
            converted++;
            f32_bytes += (size_t)t->numel * sizeof(float);
            for (int64_t j = 0; j < t->numel; j++)
                assert_true(back[j] == bf16_to_f32_1(bf16_from_f32_1(orig[i][j])));
        } else {
            assert_non_null(t->data);
            assert_memory_equal(back, orig[i], (size_t)t->numel * sizeof(float));
        }
        free(back);
    }
    /* 2 layers x (c_attn, attn.c_proj, c_fc, mlp.c_proj) + the tied wte */
    assert_int_equal(converted, 9);
    assert_int_equal(pr_model_bf16_bytes(m) * 2, f32_bytes);
    assert_non_null(pr_model_find_tensor(m, "h.1.mlp.c_fc.weight"));
    assert_true(pr_model_tensor_is_bf16(m, pr_model_find_tensor(m, "wte.weight")));
    assert_false(pr_model_tensor_is_bf16(m, pr_model_find_tensor(m, "wpe.weight")));
    assert_false(pr_model_tensor_is_bf16(m, pr_model_find_tensor(m, "h.0.ln_1.weight")));
    /* logits: every product in bf16; relative to the logits' scale */
    float *l16 = th_logits_copy(&lc);
    double d = 0, s = 0;
    size_t nl = (size_t)2 * 8 * pr_model_get_config(m)->vocab_size;
    for (size_t i = 0; i < nl; i++) {
        d = fmax(d, fabs((double)l16[i] - l32[i]));
        s = fmax(s, fabs((double)l32[i]));
    }
    printf("gpt2-tiny logits: max |bf16 - f32| %.3g, max |f32| %.3g\n", d, s);
    /* 2 layers, 5 products on the path to a logit, each within 2^-7 relative: a few percent at most */
    assert_true(d <= 0.05 * s);
    assert_true(d > 0);
    /* saving writes the bf16 values as f32 */
    char *dir = th_scratch_dir("peftref-bf16");
    assert_int_equal(pr_model_save_hf(m, dir, NULL, &err), PR_OK);
    pr_model *r = NULL;
    assert_int_equal(pr_model_load_hf(dir, &r, &err), PR_OK);
    for (int i = 0; i < n; i++) {
        const pr_tensor_info *t = pr_model_tensor(m, i), *u = pr_model_find_tensor(r, t->name);
        assert_non_null(u);
        float *back = malloc((size_t)t->numel * sizeof(float));
        assert_int_equal(pr_model_tensor_f32(m, t, back, &err), PR_OK);
        assert_memory_equal(u->data, back, (size_t)t->numel * sizeof(float));
        free(back);
    }
    pr_model_free(r);
    th_remove_tree(dir);
    free(dir);
    /* what bf16 storage refuses, each naming the tensor or why */
    assert_int_equal(pr_model_set_trainable(m, "h.0.attn.c_attn.weight", 1, &err), PR_ERR_INVALID);
    assert_non_null(strstr(err.msg, "h.0.attn.c_attn.weight"));
    assert_non_null(strstr(err.msg, "bf16"));
    assert_int_equal(pr_model_set_trainable(m, "h.0.attn.c_attn.bias", 1, &err), PR_OK);
    assert_int_equal(pr_model_set_precision(m, PR_PRECISION_F32, &err), PR_ERR_UNSUPPORTED);
    float *w;
    int ld;
    assert_int_equal(pr_model_site_weight(m, PR_SITE_QKV, 0, &w, &ld, NULL, &err), PR_ERR_UNSUPPORTED);
    assert_non_null(strstr(err.msg, "bf16"));
    for (int i = 0; i < n; i++) {
        free(orig[i]);
        free(names[i]);
    }
    free(orig);
    free(names);
    free(l32);
    free(l16);
    pr_model_free(m);
}

/* ---- base_weight_f32 from bf16 storage ------------------------------------------------ */

/* A LoRA module at site on preset's model, attached in f32; after the
 * conversion its insertion's base weight is bf16 storage and
 * host->base_weight_f32 returns the rounded f32 weight [d_in, d_out]. */
static void check_base_weight(const char *preset, int site, const char *site_name)
{
    pr_model *m = tiny(preset, 1, 4);
    pr_module_spec spec = {.technique = lora, .sites = PR_SITE_BIT(site), .trainable = 1, .seed = 3};
    pr_module *mod = th_attach(m, &spec);
    insertion *in = &mod->ins[0];
    assert_true(in->has_bw);
    int out_in = in->bw_layout == PR_WEIGHT_OUT_IN;
    int64_t d_in = in->bw.shape[out_in ? 1 : 0], d_out = in->bw.shape[out_in ? 0 : 1];
    pr_ctx ctx = {.struct_size = sizeof(pr_ctx), .base_weight = &in->bw, .base_layout = in->bw_layout};
    const pr_host *h = host_services();
    float *f0 = malloc((size_t)(d_in * d_out) * sizeof(float)), *f1 = malloc((size_t)(d_in * d_out) * sizeof(float));
    assert_int_equal(h->base_weight_f32(&ctx, f0), 0);
    pr_error err = {0};
    assert_int_equal(pr_model_set_precision(m, PR_PRECISION_BF16, &err), PR_OK);
    assert_int_equal(in->bw.dtype, PR_DTYPE_BF16);
    ctx.base_weight = &in->bw;
    assert_int_equal(h->base_weight_f32(&ctx, f1), 0);
    double worst = 0;
    for (int64_t i = 0; i < d_in * d_out; i++) {
        assert_true(f1[i] == bf16_to_f32_1(bf16_from_f32_1(f0[i])));
        if (f0[i] != 0.0f)
            worst = fmax(worst, fabs((double)f1[i] - f0[i]) / fabs((double)f0[i]));
    }
    printf("%s site %s: base_weight_f32 from bf16 [%lld, %lld] %s, max relative change %.3g\n", preset, site_name,
           (long long)d_in, (long long)d_out, out_in ? "stored [d_out, d_in]" : "stored [d_in, d_out]", worst);
    assert_true(worst <= U);
    /* a merge would write f32 weights: refused */
    assert_int_equal(pr_module_merge(mod, &err), PR_ERR_UNSUPPORTED);
    assert_non_null(strstr(err.msg, "bf16"));
    free(f0);
    free(f1);
    pr_model_free(m);
}

static void test_base_weight_f32(void **state)
{
    (void)state;
    if (!bf16_available()) {
        printf("base_weight_f32: skipped (built without oneDNN)\n");
        return;
    }
    check_base_weight("gpt2-tiny", PR_SITE_V, "v (columns 2C..3C of the fused c_attn)");
    check_base_weight("llama-tiny", PR_SITE_K, "k (k_proj)");
    check_base_weight("llama-tiny", PR_SITE_FFN_DOWN, "ffn.down");
}

/* ---- gradients of module parameters under bf16 ------------------------------------------------- */

/* LoRA on q and v with a non-zero B, so that every factor has a gradient. */
static pr_model *lora_model(const char *preset)
{
    pr_model *m = tiny(preset, 2, 6);
    pr_module_spec spec = {.technique = lora, .sites = PR_SITE_BIT(PR_SITE_Q) | PR_SITE_BIT(PR_SITE_V),
                           .trainable = 1, .seed = 9};
    (void)th_attach(m, &spec);
    unsigned seed = 40;
    for (int i = 0; i < pr_model_n_tensors(m); i++) {
        const pr_tensor_info *t = pr_model_tensor(m, i);
        if (t->kind == PR_TENSOR_MODULE && strstr(t->name, "lora_B"))
            gc_fill(t->data, (size_t)t->numel, seed++, 0.3f);
    }
    return m;
}

static void check_grads(const char *preset)
{
    pr_model *m32 = lora_model(preset), *m16 = lora_model(preset);
    pr_error err = {0};
    assert_int_equal(pr_model_set_precision(m16, PR_PRECISION_BF16, &err), PR_OK);
    th_loss_ctx l32, l16;
    th_loss_init_rng(&l32, m32, 2, 6, 21);
    th_loss_init_rng(&l16, m16, 2, 6, 21);
    th_forward_backward(&l32);
    th_forward_backward(&l16);
    /* The f32 gradients pass the usual check (test_compose's tolerances).
     * The bf16 gradients are checked against the same finite differences
     * of the f32 loss: the bf16 model's own loss is a step function (its
     * activations are rounded to bf16 before every frozen product, so it
     * jumps by ~2^-8 relative wherever a perturbation flips a rounding;
     * at eps 1e-2 its differences measured 30x the gradient), while its
     * backward, like autocast's, is the f32 backward with the products
     * rounded: the gradient of the smooth loss, perturbed.  Looser
     * tolerance: rtol 5e-2 -> 1.5e-1, the f32 check's 5% plus the bf16
     * gradients' own error (at most 10 products x 2^-7 = 8% on a 2-layer
     * model, below). */
    const th_fd fd32 = {3e-3, 5e-2, 1e-4, 6, 1e-7};
    double num = 0, den = 0;
    int checked = 0;
    for (int i = 0; i < pr_model_n_tensors(m16); i++) {
        const pr_tensor_info *t = pr_model_tensor(m16, i);
        pr_tensor_info *u = (pr_tensor_info *)pr_model_find_tensor(m32, t->name);
        if (t->kind != PR_TENSOR_MODULE || !t->trainable)
            continue;
        assert_non_null(u);
        for (int64_t j = 0; j < t->numel; j++) {
            num += ((double)t->grad[j] - u->grad[j]) * ((double)t->grad[j] - u->grad[j]);
            den += (double)u->grad[j] * u->grad[j];
        }
        th_check_tensor_fd(&l32, u, &fd32);
        float *g16 = malloc((size_t)t->numel * sizeof(float));
        assert_non_null(g16);
        memcpy(g16, t->grad, (size_t)t->numel * sizeof(float));
        char what[200];
        snprintf(what, sizeof what, "%s (bf16 gradient)", t->name);
        assert_int_equal(gc_check(what, u->data, g16, (size_t)t->numel, th_loss, &l32, 3e-3, 1.5e-1, 2e-4, 6), 0);
        free(g16);
        checked++;
    }
    double rel = sqrt(num / den);
    printf("%s: %d LoRA tensors: f32 and bf16 gradients pass finite differences; |g_bf16 - g_f32| / |g_f32| = "
           "%.3g\n", preset, checked, rel);
    assert_true(checked == 2 * 2 * pr_model_get_config(m16)->n_layers);
    /* Normwise against the f32 gradients: every frozen product on the way
     * to and from a LoRA factor (2 layers: about ten forward and backward)
     * adds at most 2^-7 relative, ~2^-8 typically, and independent
     * roundings add in quadrature: sqrt(10) 2^-8 ~ 1.2%.  Bound 5e-2: the
     * worst case 10 x 2^-7 = 4%, with room. */
    assert_true(rel <= 5e-2);
    assert_true(rel > 0);
    pr_model_free(m32);
    pr_model_free(m16);
}

static void test_grads(void **state)
{
    (void)state;
    if (!bf16_available()) {
        printf("gradients: skipped (built without oneDNN)\n");
        return;
    }
    check_grads("gpt2-tiny");
    check_grads("llama-tiny");
}

/* ---- incremental decoding ------------------------------------------------------------------ */

/* LLaMA's cached decoding in bf16 runs its products one row at a time:
 * the logits equal the full forward's but for the order oneDNN sums in
 * (a bf16 x bf16 product is exact in f32), so within 1e-4 of their scale. */
static void test_decode(void **state)
{
    (void)state;
    if (!bf16_available()) {
        printf("decode: skipped (built without oneDNN)\n");
        return;
    }
    enum { TT = 7 };
    pr_model *m = tiny("llama-tiny", 1, TT);
    pr_error err = {0};
    assert_int_equal(pr_model_set_precision(m, PR_PRECISION_BF16, &err), PR_OK);
    th_loss_ctx lc;
    th_loss_init_rng(&lc, m, 1, TT, 17);
    float *full = th_logits_copy(&lc);
    int V = pr_model_get_config(m)->vocab_size;
    assert_int_equal(pr_model_decode_begin(m, TT, &err), PR_OK);
    assert_int_equal(pr_model_decode(m, lc.tokens, 2, &err), PR_OK);
    double worst = th_max_abs_diff(pr_model_logits(m), full, (size_t)2 * V), scale = 0;
    for (int t = 2; t < TT; t++) {
        assert_int_equal(pr_model_decode(m, lc.tokens + t, 1, &err), PR_OK);
        worst = fmax(worst, th_max_abs_diff(pr_model_logits(m), full + (size_t)t * V, (size_t)V));
    }
    for (size_t j = 0; j < (size_t)TT * V; j++)
        scale = fmax(scale, fabs((double)full[j]));
    printf("llama-tiny bf16: cached vs full logits max |diff| %.3g of max %.3g\n", worst, scale);
    assert_true(worst <= 1e-4 * scale);
    free(full);
    pr_model_free(m);
}

/* ---- the built-in task ---------------------------------------------------------------------- */

/* The last val_loss in run/metrics.jsonl. */
static double last_val_loss(const char *run)
{
    char path[1024], line[4096];
    snprintf(path, sizeof path, "%s/metrics.jsonl", run);
    FILE *f = fopen(path, "r");
    assert_non_null(f);
    double v = NAN;
    while (fgets(line, sizeof line, f)) {
        const char *p = strstr(line, "\"val_loss\": ");
        if (p)
            v = strtod(p + 12, NULL);
    }
    fclose(f);
    return v;
}

static void test_builtin_task(void **state)
{
    (void)state;
    if (!bf16_available()) {
        printf("built-in task: skipped (built without oneDNN)\n");
        return;
    }
    char *dir = th_scratch_dir("peftref-bf16-task");
    char yaml[1024], pipe[600];
    snprintf(pipe, sizeof pipe, "%s/lora.yaml", dir);
    /* the quick start's LoRA arm (examples/fortunes-compare.yaml) on a
     * quarter of its budget: 20 steps of 8 sequences of 96 bytes */
    snprintf(yaml, sizeof yaml,
             "model:\n  path: %s/../models/fortunes-gpt2\n"
             "task:\n  type: classification\n  train: %s/../data/fortunes/classify-train.jsonl\n"
             "  validation: %s/../data/fortunes/classify-val.jsonl\n"
             "modules:\n  - technique: lora\n    options: {r: 8, alpha: 16}\n"
             "train:\n  steps: 20\n  batch: 8\n  seq_len: 96\n  lr: 3e-3\n  warmup: 5\n  weight_decay: 0.0\n"
             "  seed: 7\n  progress: none\n",
             TEST_SRCDIR, TEST_SRCDIR, TEST_SRCDIR);
    FILE *f = fopen(pipe, "w");
    assert_non_null(f);
    fputs(yaml, f);
    fclose(f);
    double v[2];
    const char *prec[2] = {"f32", "bf16"};
    for (int k = 0; k < 2; k++) {
        char out[700], set_out[760], set_prec[64];
        snprintf(out, sizeof out, "%s/run-%s", dir, prec[k]);
        snprintf(set_out, sizeof set_out, "train.output=%s", out);
        snprintf(set_prec, sizeof set_prec, "train.precision=%s", prec[k]);
        const char *args[] = {"peftref", "train", pipe, "--set", set_out, "--set", set_prec, "--quiet", NULL};
        assert_int_equal(th_run_cli(PEFTREF_BIN, PLUGINS, args, "/dev/null", NULL), 0);
        v[k] = last_val_loss(out);
        th_remove_tree(out);
    }
    double rel = fabs(v[1] - v[0]) / v[0];
    printf("built-in task, LoRA r 8, 20 steps: val_loss f32 %.6f, bf16 %.6f, relative difference %.3g%%\n", v[0],
           v[1], 100 * rel);
    /* Tolerance 1%: the loss is a mean over the validation set, so
     * per-element rounding (2^-8 relative, independent signs) mostly
     * averages out, and what remains is the drift of 20 optimizer steps
     * from slightly different gradients (within ~1-2% of each other,
     * test_grads); 1% is ~2.5 bf16 ulps of the loss. */
    assert_true(isfinite(v[0]) && isfinite(v[1]));
    assert_true(rel <= 0.01);
    th_remove_tree(dir);
    free(dir);
}

/* ---- without oneDNN ----------------------------------------------------------------------- */

static void test_without_dnnl(void **state)
{
    (void)state;
#ifdef HAVE_DNNL
    printf("without oneDNN: skipped; this build has oneDNN %s (configure --without-dnnl builds the refusal "
           "tested here)\n",
           bf16_dnnl_version());
    skip();
#else
    pr_model *m = tiny("gpt2-tiny", 1, 4);
    pr_error err = {0};
    assert_int_equal(pr_model_set_precision(m, PR_PRECISION_BF16, &err), PR_ERR_UNSUPPORTED);
    printf("refused: %s\n", err.msg);
    assert_non_null(strstr(err.msg, "precision bf16"));
    assert_non_null(strstr(err.msg, "oneDNN"));
    assert_non_null(strstr(err.msg, "libdnnl-dev"));
    assert_int_equal(pr_model_get_precision(m), PR_PRECISION_F32);
    assert_non_null(pr_model_find_tensor(m, "wte.weight")->data);
    /* a pipeline asking for it fails at its line */
    char *dir = th_scratch_dir("peftref-nodnnl");
    char path[600];
    snprintf(path, sizeof path, "%s/p.yaml", dir);
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fputs("model:\n  preset: gpt2-tiny\ntask:\n  type: lm\n  train: x.txt\nmodules: []\ntrain:\n  steps: 1\n"
          "  precision: bf16\n", f);
    fclose(f);
    snprintf(path, sizeof path, "%s/x.txt", dir);
    f = fopen(path, "w");
    assert_non_null(f);
    fputs("some text to train on\n", f);
    fclose(f);
    snprintf(path, sizeof path, "%s/p.yaml", dir);
    pr_pipeline *p = NULL;
    pr_registry *reg = NULL;
    assert_int_equal(pr_registry_open(PLUGINS, &reg, &err), PR_OK);
    assert_int_not_equal(pr_pipeline_load(path, NULL, 0, reg, &p, &err), PR_OK);
    pr_registry_free(reg);
    printf("pipeline refused: %s\n", err.msg);
    /* the only complaint, at line 9, column 14 */
    assert_non_null(strstr(err.msg, "p.yaml:9:14: train.precision: precision bf16 needs oneDNN"));
    assert_null(strchr(err.msg, '\n'));
    assert_non_null(strstr(err.msg, "oneDNN"));
    th_remove_tree(dir);
    free(dir);
    pr_model_free(m);
#endif
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_convert),
        cmocka_unit_test(test_matmul),
        cmocka_unit_test(test_model_storage),
        cmocka_unit_test(test_base_weight_f32),
        cmocka_unit_test(test_grads),
        cmocka_unit_test(test_decode),
        cmocka_unit_test(test_builtin_task),
        cmocka_unit_test(test_without_dnnl),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
