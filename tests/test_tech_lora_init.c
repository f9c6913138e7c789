/* peftref tests: LoRA's init_lora_weights (plugins/lora.c).
 *
 * On the GPT-2-family test model (2 layers, d_model 32, d_ff 128), at sites
 * q (32 -> 32), ffn.up (32 -> 128, W taller than wide) and ffn.down
 * (128 -> 32, wider than tall), r = 4, alpha = 8 (s = 2):
 *  - pissa, olora: the logits at init equal the base model's (W + s(BA -
 *    B0A0) = W): max |diff| <= 1e-6 * max |logit|;
 *  - pissa: s * B0.A0 equals the rank-r truncated SVD of W, W.V_r.V_r^T with
 *    V_r from subspace iteration on W^T W in double, computed here
 *    (max |diff| <= 1e-4 * max |W|);
 *  - olora: B0 has orthonormal columns (|B0^T B0 - I| <= 1e-5) and B0.A0 =
 *    Q_r.R_r, computed here as the projection of W onto its first r
 *    columns' span by Gram-Schmidt (sign-free; <= 1e-4 * max |W|);
 *  - gradients by finite differences (eps 3e-3, |fd - g| <= 1e-4 + 5e-2
 *    max(|fd|, |g|)), factors moved off their init;
 *  - the rank-2r plain LoRA A' = [A; A0], B' = [B, -B0] with alpha' =
 *    2 alpha (PEFT's conversion) gives the same logits (<= 1e-5 relative);
 *  - merge reproduces the logits, unmerge restores W bit for bit;
 *  - counts: trainable r (d_in + d_out) per insertion, lora_A0 / lora_B0
 *    as many frozen;
 *  - gaussian: lora_A's std is about 1/r, lora_B zero; loftq is refused. */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <dlfcn.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "peftref/peftref.h"
#include "peftref/module.h"
#include "peftref/plugin.h"
#include "gradcheck.h"
#include "harness.h"

#define LORA_SO TEST_BUILDDIR "/plugins/.libs/lora.so"

static void *lora_so;
static const pr_technique *lora;

static int setup_plugins(void **state)
{
    (void)state;
    lora = th_plugin_technique(LORA_SO, &lora_so);
    return lora ? 0 : -1;
}

static int teardown_plugins(void **state)
{
    (void)state;
    if (lora_so)
        dlclose(lora_so);
    return 0;
}

enum { MB = 2, MT = 6, MV = 64, L = 2, C = 32, F = 128, R = 4 };
static const uint32_t SITES = PR_SITE_BIT(PR_SITE_Q) | PR_SITE_BIT(PR_SITE_FFN_UP) | PR_SITE_BIT(PR_SITE_FFN_DOWN);
static const int SITE_LIST[3] = { PR_SITE_Q, PR_SITE_FFN_UP, PR_SITE_FFN_DOWN };
static const char *const SITE_NAME[3] = { "q", "ffn.up", "ffn.down" };

typedef struct run {
    pr_model *m;
    int tokens[MB * MT], targets[MB * MT];
} run;

static pr_model_config config(void)
{
    return th_config(&(th_shape){ L, C, 4, 4, C / 4, F, MV, 16 }, 7);
}

static run *run_new(void)
{
    run *r = calloc(1, sizeof *r);
    assert_non_null(r);
    pr_model_config c = config();
    pr_error err = { 0 };
    if (pr_model_create(&c, &r->m, &err) || pr_model_reserve(r->m, MB, MT, &err))
        fail_msg("model: %s", err.msg);
    for (int i = 0; i < MB * MT; i++) {
        r->tokens[i] = (i * 17 + 5) % MV;
        r->targets[i] = (i * 29 + 3) % MV;
    }
    return r;
}

static void run_free(run *r)
{
    pr_model_free(r->m);
    free(r);
}

static double model_loss(void *arg)
{
    run *r = arg;
    return th_forward_ce(r->m, r->tokens, r->targets, MB, MT);
}

static float *logits_now(run *r)
{
    (void)model_loss(r);
    float *l = malloc((size_t)MB * MT * MV * sizeof(float));
    assert_non_null(l);
    memcpy(l, pr_model_logits(r->m), (size_t)MB * MT * MV * sizeof(float));
    return l;
}

/* max |a - b| / max |a| */
static double rel_diff(const float *a, const float *b)
{
    double worst = 0.0, s = 0.0;
    for (size_t i = 0; i < (size_t)MB * MT * MV; i++) {
        worst = fmax(worst, fabs((double)a[i] - b[i]));
        s = fmax(s, fabs((double)a[i]));
    }
    return worst / (s > 0 ? s : 1);
}

static pr_module *attach_init(run *r, const char *name, const char *init, const char *rank, const char *alpha)
{
    const pr_option_setting o[] = { { "r", rank, -1 }, { "alpha", alpha, -1 }, { "init_lora_weights", init, -1 } };
    pr_module_spec spec = { .technique = lora, .name = name, .sites = SITES, .options = o, .n_options = 3,
                            .trainable = 1, .seed = 11 };
    return th_attach(r->m, &spec);
}

static const pr_tensor_info *mt(const run *r, const char *mod, int layer, const char *site, const char *param)
{
    char name[128];
    snprintf(name, sizeof name, "%s/h.%d.%s.%s", mod, layer, site, param);
    const pr_tensor_info *t = pr_model_find_tensor(r->m, name);
    if (!t)
        fail_msg("no tensor %s", name);
    return t;
}

/* The site's frozen weight in PEFT's orientation, M (d_out x d_in), row-major doubles. */
static double *weight_out_in(run *r, int site, int layer, int *d_in, int *d_out)
{
    float *w, *b;
    int ld;
    pr_error err = { 0 };
    assert_int_equal(pr_model_site_weight(r->m, site, layer, &w, &ld, &b, &err), PR_OK);
    assert_int_equal(pr_model_site_dims(r->m, site, d_in, d_out), PR_OK);
    double *m = malloc((size_t)*d_in * *d_out * sizeof(double));
    assert_non_null(m);
    for (int k = 0; k < *d_in; k++)
        for (int j = 0; j < *d_out; j++)
            m[(size_t)j * *d_in + k] = w[(size_t)k * ld + j];
    return m;
}

/* P (n x n) = V V^T, V the top-r right singular subspace of M (m x n), by
 * orthogonal iteration on M^T M with Gram-Schmidt, in double. */
static void right_projector(const double *M, int m, int n, int r, double *P)
{
    double *V = calloc((size_t)n * r, sizeof *V), *T = calloc((size_t)m, sizeof *T), *W = calloc((size_t)n * r, sizeof *W);
    assert_true(V && T && W);
    for (int i = 0; i < n * r; i++)
        V[i] = sin(1.0 + 7.3 * i); /* column k at V[k*n ...] */
    for (int it = 0; it < 4000; it++) {
        for (int k = 0; k < r; k++) { /* W_k = M^T M V_k */
            for (int i = 0; i < m; i++) {
                double s = 0;
                for (int j = 0; j < n; j++)
                    s += M[(size_t)i * n + j] * V[(size_t)k * n + j];
                T[i] = s;
            }
            for (int j = 0; j < n; j++) {
                double s = 0;
                for (int i = 0; i < m; i++)
                    s += M[(size_t)i * n + j] * T[i];
                W[(size_t)k * n + j] = s;
            }
        }
        for (int k = 0; k < r; k++) { /* Gram-Schmidt, twice */
            double *w = W + (size_t)k * n;
            for (int pass = 0; pass < 2; pass++)
                for (int q = 0; q < k; q++) {
                    double d = 0;
                    for (int j = 0; j < n; j++)
                        d += w[j] * W[(size_t)q * n + j];
                    for (int j = 0; j < n; j++)
                        w[j] -= d * W[(size_t)q * n + j];
                }
            double nr = 0;
            for (int j = 0; j < n; j++)
                nr += w[j] * w[j];
            nr = sqrt(nr);
            for (int j = 0; j < n; j++)
                w[j] /= nr;
        }
        memcpy(V, W, (size_t)n * r * sizeof *V);
    }
    for (int a = 0; a < n; a++)
        for (int b = 0; b < n; b++) {
            double s = 0;
            for (int k = 0; k < r; k++)
                s += V[(size_t)k * n + a] * V[(size_t)k * n + b];
            P[(size_t)a * n + b] = s;
        }
    free(V);
    free(T);
    free(W);
}

/* max |(s B0 A0)_{ij} - ref_{ij}| / max |M| */
static double factor_err(const pr_tensor_info *a0, const pr_tensor_info *b0, double s, const double *ref,
                         const double *M, int d_in, int d_out)
{
    double worst = 0, mx = 0;
    for (int i = 0; i < d_out; i++)
        for (int j = 0; j < d_in; j++) {
            double v = 0;
            for (int k = 0; k < R; k++)
                v += (double)b0->data[(size_t)i * R + k] * a0->data[(size_t)k * d_in + j];
            worst = fmax(worst, fabs(s * v - ref[(size_t)i * d_in + j]));
            mx = fmax(mx, fabs(M[(size_t)i * d_in + j]));
        }
    return worst / mx;
}

static void test_identity_at_init(void **state)
{
    (void)state;
    const char *inits[] = { "pissa", "olora" };
    for (int k = 0; k < 2; k++) {
        run *r = run_new();
        float *base = logits_now(r);
        (void)attach_init(r, "lora", inits[k], "4", "8");
        float *with = logits_now(r);
        double d = rel_diff(base, with);
        print_message("%s: identity at init, max |diff| / max |logit| = %.3g\n", inits[k], d);
        assert_true(d <= 1e-6);
        /* and the factors are not trivial */
        const pr_tensor_info *b = mt(r, "lora", 1, "q", "lora_B");
        double nb = 0;
        for (int i = 0; i < (int)b->numel; i++)
            nb += fabs(b->data[i]);
        assert_true(nb > 0);
        free(base);
        free(with);
        run_free(r);
    }
}

static void test_pissa_is_truncated_svd(void **state)
{
    (void)state;
    run *r = run_new();
    (void)attach_init(r, "lora", "pissa", "4", "8");
    for (int l = 0; l < L; l++)
        for (int si = 0; si < 3; si++) {
            int d_in, d_out;
            double *M = weight_out_in(r, SITE_LIST[si], l, &d_in, &d_out);
            double *P = malloc((size_t)d_in * d_in * sizeof *P), *ref = malloc((size_t)d_out * d_in * sizeof *ref);
            assert_true(P && ref);
            right_projector(M, d_out, d_in, R, P);
            for (int i = 0; i < d_out; i++)
                for (int j = 0; j < d_in; j++) {
                    double s = 0;
                    for (int q = 0; q < d_in; q++)
                        s += M[(size_t)i * d_in + q] * P[(size_t)q * d_in + j];
                    ref[(size_t)i * d_in + j] = s;
                }
            double e = factor_err(mt(r, "lora", l, SITE_NAME[si], "lora_A0"), mt(r, "lora", l, SITE_NAME[si], "lora_B0"),
                                  2.0, ref, M, d_in, d_out);
            print_message("pissa h.%d.%s: max |s B0 A0 - W_r| / max |W| = %.3g\n", l, SITE_NAME[si], e);
            assert_true(e <= 1e-4);
            /* lora_A, lora_B start equal to the frozen copies */
            assert_memory_equal(mt(r, "lora", l, SITE_NAME[si], "lora_A")->data,
                                mt(r, "lora", l, SITE_NAME[si], "lora_A0")->data, (size_t)R * d_in * sizeof(float));
            free(M);
            free(P);
            free(ref);
        }
    run_free(r);
}

static void test_olora_is_qr(void **state)
{
    (void)state;
    run *r = run_new();
    (void)attach_init(r, "lora", "olora", "4", "8");
    for (int l = 0; l < L; l++)
        for (int si = 0; si < 3; si++) {
            int d_in, d_out;
            double *M = weight_out_in(r, SITE_LIST[si], l, &d_in, &d_out);
            const pr_tensor_info *a0 = mt(r, "lora", l, SITE_NAME[si], "lora_A0");
            const pr_tensor_info *b0 = mt(r, "lora", l, SITE_NAME[si], "lora_B0");
            double orth = 0;
            for (int a = 0; a < R; a++)
                for (int b = 0; b < R; b++) {
                    double s = 0;
                    for (int i = 0; i < d_out; i++)
                        s += (double)b0->data[(size_t)i * R + a] * b0->data[(size_t)i * R + b];
                    orth = fmax(orth, fabs(s - (a == b)));
                }
            for (int k = 0; k < R; k++) /* R_r is upper triangular */
                for (int c = 0; c < k; c++)
                    assert_true(a0->data[(size_t)k * d_in + c] == 0.0f);
            /* Q_r R_r = Q_r Q_r^T M: Gram-Schmidt of M's first r columns */
            double *q = calloc((size_t)d_out * R, sizeof *q), *ref = calloc((size_t)d_out * d_in, sizeof *ref);
            assert_true(q && ref);
            for (int k = 0; k < R; k++) {
                double *qk = q + (size_t)k * d_out;
                for (int i = 0; i < d_out; i++)
                    qk[i] = M[(size_t)i * d_in + k];
                for (int pass = 0; pass < 2; pass++)
                    for (int p = 0; p < k; p++) {
                        double d = 0;
                        for (int i = 0; i < d_out; i++)
                            d += qk[i] * q[(size_t)p * d_out + i];
                        for (int i = 0; i < d_out; i++)
                            qk[i] -= d * q[(size_t)p * d_out + i];
                    }
                double n = 0;
                for (int i = 0; i < d_out; i++)
                    n += qk[i] * qk[i];
                for (int i = 0; i < d_out; i++)
                    qk[i] /= sqrt(n);
            }
            for (int i = 0; i < d_out; i++)
                for (int j = 0; j < d_in; j++) {
                    double s = 0;
                    for (int k = 0; k < R; k++) {
                        double qm = 0;
                        for (int t = 0; t < d_out; t++)
                            qm += q[(size_t)k * d_out + t] * M[(size_t)t * d_in + j];
                        s += q[(size_t)k * d_out + i] * qm;
                    }
                    ref[(size_t)i * d_in + j] = s;
                }
            double e = factor_err(a0, b0, 1.0, ref, M, d_in, d_out);
            print_message("olora h.%d.%s: |B0^T B0 - I| = %.3g, max |B0 A0 - Q_r R_r| / max |W| = %.3g\n", l,
                          SITE_NAME[si], orth, e);
            assert_true(orth <= 1e-5);
            assert_true(e <= 1e-4);
            free(M);
            free(q);
            free(ref);
        }
    run_free(r);
}

static void fill_factors(run *r, const char *mod)
{
    unsigned seed = 900;
    for (int i = 0; i < pr_model_n_tensors(r->m); i++) {
        const pr_tensor_info *t = pr_model_tensor(r->m, i);
        size_t ln = strlen(t->name), lm = strlen(mod);
        if (t->kind != PR_TENSOR_MODULE || strncmp(t->name, mod, lm) || t->name[lm] != '/')
            continue;
        if (ln > 7 && (!strcmp(t->name + ln - 7, ".lora_A") || !strcmp(t->name + ln - 7, ".lora_B"))) {
            float *tmp = malloc((size_t)t->numel * sizeof(float));
            gc_fill(tmp, (size_t)t->numel, seed++, 0.2f);
            for (int k = 0; k < (int)t->numel; k++)
                t->data[k] += tmp[k];
            free(tmp);
        }
    }
}

static void test_gradients(void **state)
{
    (void)state;
    const char *inits[] = { "pissa", "olora" };
    for (int k = 0; k < 2; k++) {
        run *r = run_new();
        (void)attach_init(r, "lora", inits[k], "4", "8");
        pr_error err = { 0 };
        assert_int_equal(pr_model_set_trainable(r->m, "h.0.ln_1.weight", 1, &err), PR_OK);
        assert_int_equal(pr_model_set_trainable(r->m, "h.1.ln_2.weight", 1, &err), PR_OK);
        fill_factors(r, "lora");
        pr_model_zero_grad(r->m);
        (void)model_loss(r);
        if (pr_model_backward(r->m, &err))
            fail_msg("backward: %s", err.msg);
        int fails = 0, n = 0;
        for (int i = 0; i < pr_model_n_tensors(r->m); i++) {
            const pr_tensor_info *t = pr_model_tensor(r->m, i);
            if (!t->trainable)
                continue;
            fails += gc_check(t->name, t->data, t->grad, (size_t)t->numel, model_loss, r, 3e-3, 5e-2, 1e-4, 6);
            n++;
        }
        assert_int_equal(n, 2 * 3 * L + 2); /* lora_A, lora_B per insertion; two gains; not A0, B0 */
        assert_int_equal(fails, 0);
        run_free(r);
    }
}

/* PEFT's conversion of a PiSSA / OLoRA adapter to plain LoRA: rank 2r,
 * A' = [A; A0], B' = [B, -B0], alpha' = 2 alpha (s unchanged). */
static void test_plain_lora_conversion(void **state)
{
    (void)state;
    const char *inits[] = { "pissa", "olora" };
    for (int k = 0; k < 2; k++) {
        run *r = run_new();
        pr_module *mod = attach_init(r, "pi", inits[k], "4", "8");
        fill_factors(r, "pi");
        float *want = logits_now(r);
        pr_module_detach(mod);
        float *base = logits_now(r);
        (void)attach_init(r, "conv", "true", "8", "16");
        /* re-attach the original to read its factors: same seed and base, so
         * the same init; then the same perturbation */
        pr_module *src = attach_init(r, "pi", inits[k], "4", "8");
        fill_factors(r, "pi");
        for (int l = 0; l < L; l++)
            for (int si = 0; si < 3; si++) {
                const char *s = SITE_NAME[si];
                const pr_tensor_info *A = mt(r, "pi", l, s, "lora_A"), *B = mt(r, "pi", l, s, "lora_B");
                const pr_tensor_info *A0 = mt(r, "pi", l, s, "lora_A0"), *B0 = mt(r, "pi", l, s, "lora_B0");
                const pr_tensor_info *Ac = mt(r, "conv", l, s, "lora_A"), *Bc = mt(r, "conv", l, s, "lora_B");
                int d_in = (int)A->shape[1], d_out = (int)B->shape[0];
                memcpy(Ac->data, A->data, (size_t)R * d_in * sizeof(float));
                memcpy(Ac->data + (size_t)R * d_in, A0->data, (size_t)R * d_in * sizeof(float));
                for (int i = 0; i < d_out; i++)
                    for (int q = 0; q < R; q++) {
                        Bc->data[(size_t)i * 2 * R + q] = B->data[(size_t)i * R + q];
                        Bc->data[(size_t)i * 2 * R + R + q] = -B0->data[(size_t)i * R + q];
                    }
            }
        pr_module_detach(src);
        float *got = logits_now(r);
        double d = rel_diff(want, got), moved = rel_diff(want, base);
        print_message("%s -> rank-8 plain LoRA: max |diff| / max |logit| = %.3g (the adapter moves them by %.3g)\n",
                      inits[k], d, moved);
        assert_true(moved > 1e-3);
        assert_true(d <= 1e-5);
        free(want);
        free(base);
        free(got);
        run_free(r);
    }
}

static void test_merge(void **state)
{
    (void)state;
    run *r = run_new();
    pr_module *mod = attach_init(r, "lora", "pissa", "4", "8");
    fill_factors(r, "lora");
    int d_in, d_out;
    double *w0 = weight_out_in(r, PR_SITE_FFN_DOWN, 1, &d_in, &d_out);
    float *before = logits_now(r);
    pr_error err = { 0 };
    assert_int_equal(pr_module_merge(mod, &err), PR_OK);
    float *merged = logits_now(r);
    double d = rel_diff(before, merged);
    print_message("pissa merged: max |diff| / max |logit| = %.3g\n", d);
    assert_true(d <= 1e-5);
    assert_int_equal(pr_module_unmerge(mod, &err), PR_OK);
    double *w1 = weight_out_in(r, PR_SITE_FFN_DOWN, 1, &d_in, &d_out);
    assert_memory_equal(w0, w1, (size_t)d_in * d_out * sizeof(double));
    free(w0);
    free(w1);
    free(before);
    free(merged);
    run_free(r);
}

static void test_counts(void **state)
{
    (void)state;
    pr_model_config cfg = config();
    const pr_option_setting o[] = { { "r", "4", -1 }, { "init_lora_weights", "pissa", -1 } };
    pr_module_spec spec = { .technique = lora, .sites = SITES, .options = o, .n_options = 2, .trainable = 1, .seed = 11 };
    pr_module_plan plan;
    pr_error err = { 0 };
    assert_int_equal(pr_module_plan_for(&cfg, &spec, &plan, &err), PR_OK);
    /* per layer: q 4*(32+32) + ffn.up 4*(32+128) + ffn.down 4*(128+32) = 1536 */
    const int64_t trainable = (int64_t)L * (R * (C + C) + R * (C + F) + R * (F + C));
    assert_int_equal(plan.trainable, trainable);
    assert_int_equal(plan.params, 2 * trainable);
    assert_int_equal(plan.insertions, 3 * L);
}

static void test_gaussian_and_loftq(void **state)
{
    (void)state;
    run *r = run_new();
    (void)attach_init(r, "lora", "gaussian", "4", "8");
    const pr_tensor_info *a = mt(r, "lora", 0, "ffn.up", "lora_A"), *b = mt(r, "lora", 0, "ffn.up", "lora_B");
    double s2 = 0;
    for (int i = 0; i < (int)a->numel; i++)
        s2 += (double)a->data[i] * a->data[i];
    double sd = sqrt(s2 / (double)a->numel);
    print_message("gaussian: std of lora_A = %.4f (1/r = 0.25)\n", sd);
    assert_true(fabs(sd - 0.25) < 0.05);
    for (int i = 0; i < (int)b->numel; i++)
        assert_true(b->data[i] == 0.0f);
    const pr_option_setting o[] = { { "init_lora_weights", "loftq", -1 } };
    pr_module_spec spec = { .technique = lora, .name = "lq", .sites = SITES, .options = o, .n_options = 1, .trainable = 1,
                            .seed = 11 };
    pr_module *mod = NULL;
    pr_error err = { 0 };
    assert_int_not_equal(pr_module_attach(r->m, &spec, &mod, &err), PR_OK);
    print_message("loftq: %s\n", err.msg);
    assert_non_null(strstr(err.msg, "quantis"));
    run_free(r);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_identity_at_init),
        cmocka_unit_test(test_pissa_is_truncated_svd),
        cmocka_unit_test(test_olora_is_qr),
        cmocka_unit_test(test_gradients),
        cmocka_unit_test(test_plain_lora_conversion),
        cmocka_unit_test(test_merge),
        cmocka_unit_test(test_counts),
        cmocka_unit_test(test_gaussian_and_loftq),
    };
    return cmocka_run_group_tests(tests, setup_plugins, teardown_plugins);
}
