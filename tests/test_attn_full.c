/* peftref tests: attention with the full score matrix (PEFTREF_ATTN_FULL=1,
 * attention_set_full_scores) against the causal path that computes, per
 * block of query rows, only the keys up to the block's last row.
 *
 * The two paths differ only in how many key columns each product reads;
 * the extra columns are masked (their probabilities and score gradients are
 * exactly 0), so every output must agree up to the order of the sums inside
 * the products.  Tolerance: max |full - causal| <= 1e-5 * max(|causal|, 1e-3)
 * per array (sums of <= 300 products of O(1) floats, rounded at ~1e-7
 * relative).  The causal path itself is checked against a naive double
 * reference and finite differences in tests/test_kernels.c; here the full
 * path's forward is also checked against a naive double reference
 * (1e-5 absolute, as there), so a mistake in both paths alike still fails.
 * T > 128 (the kernel's query block) in every case, so that the causal path
 * really skips columns; P > 0 (prefix keys) and grouped-query heads
 * (H > Hkv) are covered, and q, k, v as slices of one fused buffer. */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

#define REL_TOL 1e-5
#define REF_TOL 1e-5

typedef struct {
    const char *name;
    int B, T, H, Hkv, hd, P;
    int fused; /* q, k, v as column slices of one (B,T,(H+2Hkv)hd) buffer */
} att_case;

static float *frand(size_t n, uint64_t seed, float scale)
{
    float *p = malloc(n * sizeof *p + 1);
    assert_non_null(p);
    uint64_t x = seed * 0x9E3779B97F4A7C15ull + 1;
    for (size_t i = 0; i < n; i++) {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        p[i] = scale * ((float)((x * 0x2545F4914F6CDD1Dull) >> 40) / (float)(1 << 24) * 2.0f - 1.0f);
    }
    return p;
}

static float *fzero(size_t n)
{
    float *p = calloc(n + 1, sizeof *p);
    assert_non_null(p);
    return p;
}

/* fails naming the case and array when full and causal disagree */
static void assert_close(const att_case *a, const char *what, const float *full, const float *causal, size_t n)
{
    double dmax = 0.0, amax = 0.0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)full[i] - causal[i]);
        if (d > dmax) dmax = d;
        if (fabs(causal[i]) > amax) amax = fabs(causal[i]);
    }
    double tol = REL_TOL * fmax(amax, 1e-3);
    if (amax == 0.0)
        fail_msg("%s %s: every causal value is 0; the case checks nothing", a->name, what);
    if (!(dmax <= tol))
        fail_msg("%s %s: max |full - causal| = %g > %g (1e-5 x max |causal| %g)", a->name, what, dmax, tol, amax);
}

/* Naive attention in double over all T keys with the causal mask, for out. */
static double ref_max_err(const att_case *a, const float *out, const float *q, int ldq, const float *k, int ldk,
                          const float *v, int ldv, const float *pk, const float *pv)
{
    int T = a->T, H = a->H, hd = a->hd, P = a->P, PT = P + T, grp = H / a->Hkv;
    double *s = malloc((size_t)PT * sizeof *s), err = 0.0;
    assert_non_null(s);
    for (int b = 0; b < a->B; b++)
        for (int h = 0; h < H; h++) {
            int g = h / grp;
            for (int t = 0; t < T; t++) {
                const float *qt = q + (size_t)(b * T + t) * ldq + h * hd;
                double mx = -INFINITY, sum = 0.0;
                for (int j = 0; j <= P + t; j++) {
                    const float *kj = j < P ? pk + (size_t)(g * P + j) * hd : k + (size_t)(b * T + j - P) * ldk + g * hd;
                    double d = 0.0;
                    for (int i = 0; i < hd; i++) d += (double)qt[i] * kj[i];
                    s[j] = d / sqrt((double)hd);
                    if (s[j] > mx) mx = s[j];
                }
                for (int j = 0; j <= P + t; j++) sum += (s[j] = exp(s[j] - mx));
                for (int i = 0; i < hd; i++) {
                    double acc = 0.0;
                    for (int j = 0; j <= P + t; j++) {
                        const float *vj = j < P ? pv + (size_t)(g * P + j) * hd : v + (size_t)(b * T + j - P) * ldv + g * hd;
                        acc += s[j] / sum * vj[i];
                    }
                    double e = fabs(acc - out[(size_t)(b * T + t) * H * hd + h * hd + i]);
                    if (e > err) err = e;
                }
            }
        }
    free(s);
    return err;
}

typedef struct {
    float *out, *att, *dq, *dk, *dv, *dpk, *dpv;
} att_result;

static void run_case(const att_case *a)
{
    const int B = a->B, T = a->T, H = a->H, Hkv = a->Hkv, hd = a->hd, P = a->P, PT = P + T;
    const int W = (H + 2 * Hkv) * hd;
    const size_t nq = (size_t)B * T * H * hd, natt = (size_t)B * H * T * PT, np = (size_t)Hkv * P * hd;
    float *buf, *q, *k, *v;
    int ldq, ldk, ldv;
    size_t nbuf;
    if (a->fused) {
        nbuf = (size_t)B * T * W;
        buf = frand(nbuf, 11, 1.0f);
        q = buf;
        k = buf + H * hd;
        v = buf + (H + Hkv) * hd;
        ldq = ldk = ldv = W;
    } else {
        /* q, k, v in one allocation, each contiguous */
        size_t nkv = (size_t)B * T * Hkv * hd;
        nbuf = nq + 2 * nkv;
        buf = frand(nbuf, 12, 1.0f);
        q = buf;
        k = buf + nq;
        v = buf + nq + nkv;
        ldq = H * hd;
        ldk = ldv = Hkv * hd;
    }
    float *pk = P ? frand(np, 13, 1.0f) : NULL, *pv = P ? frand(np, 14, 1.0f) : NULL;
    float *R = frand(nq, 15, 1.0f);
    float *scratch = fzero((size_t)T * PT);
    att_result r[2];
    for (int full = 0; full < 2; full++) {
        att_result *x = &r[full];
        x->out = fzero(nq);
        x->att = fzero(natt);
        /* the gradients with q's, k's and v's layout: one array of the buffer's size */
        x->dq = fzero(nbuf);
        x->dk = a->fused ? x->dq + H * hd : x->dq + nq;
        x->dv = a->fused ? x->dq + (H + Hkv) * hd : x->dq + nq + (size_t)B * T * Hkv * hd;
        x->dpk = P ? fzero(np) : NULL;
        x->dpv = P ? fzero(np) : NULL;
        /* garbage in att beyond what the kernel writes must not matter */
        for (size_t i = 0; i < natt; i++) x->att[i] = 7.0f;
        attention_set_full_scores(full);
        attention_forward(x->out, x->att, q, ldq, k, ldk, v, ldv, pk, pv, P, B, T, H, Hkv, hd);
        attention_backward(x->dq, x->dk, x->dv, x->dpk, x->dpv, R, x->att, q, ldq, k, ldk, v, ldv, pk, pv, P,
                           B, T, H, Hkv, hd, scratch);
    }
    attention_set_full_scores(0);
    assert_close(a, "out", r[1].out, r[0].out, nq);
    assert_close(a, "att", r[1].att, r[0].att, natt);
    assert_close(a, "dq/dk/dv", r[1].dq, r[0].dq, nbuf);
    if (P) {
        assert_close(a, "dpk", r[1].dpk, r[0].dpk, np);
        assert_close(a, "dpv", r[1].dpv, r[0].dpv, np);
    }
    /* masked probabilities are exactly 0 in the full path */
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++)
            for (int t = 0; t < T; t++)
                for (int j = P + t + 1; j < PT; j++)
                    if (r[1].att[(((size_t)b * H + h) * T + t) * PT + j] != 0.0f)
                        fail_msg("%s: full path att[b%d h%d t%d key %d] = %g, masked, expected 0", a->name, b, h, t,
                                 j, (double)r[1].att[(((size_t)b * H + h) * T + t) * PT + j]);
    double e = ref_max_err(a, r[1].out, q, ldq, k, ldk, v, ldv, pk, pv);
    if (!(e <= REF_TOL))
        fail_msg("%s: full path out against the naive double reference: max error %g > %g", a->name, e, REF_TOL);
    for (int full = 0; full < 2; full++) {
        free(r[full].out);
        free(r[full].att);
        free(r[full].dq);
        free(r[full].dpk);
        free(r[full].dpv);
    }
    free(buf);
    free(pk);
    free(pv);
    free(R);
    free(scratch);
}

static void test_mha_no_prefix(void **state)
{
    (void)state;
    const att_case a = { "mha T200", 2, 200, 2, 2, 16, 0, 0 };
    run_case(&a);
}

static void test_gqa_prefix(void **state)
{
    (void)state;
    const att_case a = { "gqa H4/Hkv2 P5 T300", 1, 300, 4, 2, 8, 5, 0 };
    run_case(&a);
}

static void test_gqa_prefix_fused(void **state)
{
    (void)state;
    const att_case a = { "fused gqa H6/Hkv2 P3 T257", 2, 257, 6, 2, 8, 3, 1 };
    run_case(&a);
}

/* the switch also reaches a mode set before: full then causal again gives the causal result */
static void test_switch_back(void **state)
{
    (void)state;
    const int T = 160, H = 2, hd = 4;
    const size_t n = (size_t)T * H * hd, natt = (size_t)H * T * T;
    float *q = frand(n, 21, 1.0f), *k = frand(n, 22, 1.0f), *v = frand(n, 23, 1.0f);
    float *o1 = fzero(n), *o2 = fzero(n), *att = fzero(natt);
    attention_set_full_scores(0);
    attention_forward(o1, att, q, H * hd, k, H * hd, v, H * hd, NULL, NULL, 0, 1, T, H, H, hd);
    attention_set_full_scores(1);
    attention_forward(o2, att, q, H * hd, k, H * hd, v, H * hd, NULL, NULL, 0, 1, T, H, H, hd);
    attention_set_full_scores(0);
    attention_forward(o2, att, q, H * hd, k, H * hd, v, H * hd, NULL, NULL, 0, 1, T, H, H, hd);
    assert_memory_equal(o1, o2, n * sizeof *o1);
    free(q);
    free(k);
    free(v);
    free(o1);
    free(o2);
    free(att);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_mha_no_prefix),
        cmocka_unit_test(test_gqa_prefix),
        cmocka_unit_test(test_gqa_prefix_fused),
        cmocka_unit_test(test_switch_back),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
