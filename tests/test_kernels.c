/* peftref tests: the standard components of core/model/kernels.c.
 *
 * Every backward pass is checked against central finite differences of a
 * scalar loss L = sum(out * R) for a fixed random R (so dout = R), with L
 * accumulated in double.  Forward passes are checked against naive loops
 * computed in double.  Backward accumulation (+=) is checked by calling
 * each backward twice.
 *
 * Tolerances.
 *  - Forward vs naive double reference: 1e-5 absolute (values are O(1);
 *    float rounding of sums of <= 16 products is ~1e-6).
 *  - Finite differences: eps = 1e-2, rtol = 1e-2, atol = 1e-4 on inputs of
 *    magnitude <= 1 (scores and activations O(1)).  The loss is evaluated
 *    from float outputs, each rounded to ~1e-7 relative; a probe moves tens
 *    to thousands of outputs, so the difference of two losses carries
 *    ~1e-7..1e-6 of noise, divided by 2 eps.  With eps = 1e-3 that noise
 *    reached 1.2e-4 (0.9 of the tolerance, attention on a fused buffer);
 *    with eps = 1e-2 it is 10x smaller, while the truncation error of the
 *    central difference, eps^2/6 |f'''|, stays below 2e-5 for these smooth
 *    O(1) functions.  Measured worst |g - fd| / tolerance: 0.06.  A wrong
 *    gradient is off by O(|g|), which the tolerance catches for |g| > 2e-4,
 *    and the probed gradients are mostly 1e-3 .. 1e-1.
 *  - Accumulation: the second backward call must give 2x the first within
 *    1e-6 relative + 1e-6 absolute (only summation order differs). */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gradcheck.h"
#include "kernels.h"

#define FD_EPS 1e-2
#define FD_RTOL 1e-2
#define FD_ATOL 1e-4
#define FWD_TOL 1e-5

static float *falloc(size_t n)
{
    float *p = calloc(n ? n : 1, sizeof(float));
    assert_non_null(p);
    return p;
}

static float *frand(size_t n, unsigned seed, float scale)
{
    float *p = falloc(n);
    gc_fill(p, n, seed, scale);
    return p;
}

static double dot_d(const float *a, const float *b, size_t n)
{
    double s = 0.0;
    for (size_t i = 0; i < n; i++) s += (double)a[i] * (double)b[i];
    return s;
}

static double max_abs_diff(const float *a, const float *b, size_t n)
{
    double m = 0.0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - (double)b[i]);
        if (!(d <= m)) m = d; /* NaN propagates as a failure */
    }
    return m;
}

static double max_abs_diff_d(const float *a, const double *b, size_t n)
{
    double m = 0.0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - b[i]);
        if (!(d <= m)) m = d;
    }
    return m;
}

/* g2 must equal 2 * g1 up to summation order */
static void assert_doubled(const char *what, const float *g1, const float *g2, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        double want = 2.0 * g1[i];
        if (!(fabs(g2[i] - want) <= 1e-6 + 1e-6 * fabs(want)))
            fail_msg("%s: second backward gives %g at %zu, want 2 x %g", what, g2[i], i, g1[i]);
    }
}

/* ------------------------------------------------------------------------
 * encoder */

typedef struct {
    float *out, *wte, *wpe, *R;
    const int *tokens;
    int B, T, C;
} enc_ctx;

static double enc_loss(void *p)
{
    enc_ctx *c = p;
    encoder_forward(c->out, c->tokens, c->wte, c->wpe, c->B, c->T, c->C);
    return dot_d(c->out, c->R, (size_t)c->B * c->T * c->C);
}

static void test_encoder(void **state)
{
    (void)state;
    enum { B = 2, T = 5, C = 8, V = 7 };
    /* token 3 repeats, within and across sequences */
    const int tokens[B * T] = { 3, 1, 3, 0, 6, 2, 3, 5, 5, 3 };
    float *wte = frand(V * C, 1, 1.0f), *wpe = frand(T * C, 2, 1.0f);
    float *R = frand(B * T * C, 3, 1.0f), *out = falloc(B * T * C);
    enc_ctx c = { out, wte, wpe, R, tokens, B, T, C };

    encoder_forward(out, tokens, wte, wpe, B, T, C);
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++)
            for (int i = 0; i < C; i++) {
                float want = wte[tokens[b * T + t] * C + i] + wpe[t * C + i];
                assert_true(out[(b * T + t) * C + i] == want);
            }
    /* without positions (RoPE models) the output is the token embedding */
    encoder_forward(out, tokens, wte, NULL, B, T, C);
    for (int n = 0; n < B * T; n++)
        assert_memory_equal(out + n * C, wte + tokens[n] * C, C * sizeof(float));

    float *dwte = falloc(V * C), *dwpe = falloc(T * C);
    encoder_backward(dwte, dwpe, R, tokens, B, T, C);
    /* tolerance: the loss is linear in wte and wpe, so fd is exact up to rounding */
    assert_int_equal(gc_check("encoder dwte", wte, dwte, V * C, enc_loss, &c, FD_EPS, FD_RTOL, FD_ATOL, 0), 0);
    assert_int_equal(gc_check("encoder dwpe", wpe, dwpe, T * C, enc_loss, &c, FD_EPS, FD_RTOL, FD_ATOL, 0), 0);

    float *dwte2 = falloc(V * C), *dwpe2 = falloc(T * C);
    memcpy(dwte2, dwte, V * C * sizeof(float));
    memcpy(dwpe2, dwpe, T * C * sizeof(float));
    encoder_backward(dwte2, dwpe2, R, tokens, B, T, C);
    assert_doubled("encoder dwte", dwte, dwte2, V * C);
    assert_doubled("encoder dwpe", dwpe, dwpe2, T * C);
    /* NULL gradients are skipped */
    encoder_backward(NULL, dwpe2, R, tokens, B, T, C);
    encoder_backward(dwte2, NULL, R, tokens, B, T, C);

    free(wte); free(wpe); free(R); free(out); free(dwte); free(dwpe); free(dwte2); free(dwpe2);
}

/* ------------------------------------------------------------------------
 * layernorm */

typedef struct {
    float *out, *mean, *rstd, *inp, *w, *b, *R;
    int N, C;
} ln_ctx;

#define LN_EPS 1e-5f

static double ln_loss(void *p)
{
    ln_ctx *c = p;
    layernorm_forward(c->out, c->mean, c->rstd, c->inp, c->w, c->b, c->N, c->C, LN_EPS);
    return dot_d(c->out, c->R, (size_t)c->N * c->C);
}

static void ln_case(int with_bias)
{
    enum { N = 6, C = 16 };
    float *inp = frand(N * C, 10, 1.0f), *w = frand(C, 11, 0.3f), *b = frand(C, 12, 0.5f);
    float *R = frand(N * C, 13, 1.0f);
    float *out = falloc(N * C), *mean = falloc(N), *rstd = falloc(N);
    for (int i = 0; i < C; i++) w[i] += 1.0f;
    /* one row with a large offset: the two-pass variance must not cancel */
    for (int i = 0; i < C; i++) inp[2 * C + i] += 100.0f;
    float *bb = with_bias ? b : NULL;
    ln_ctx c = { out, mean, rstd, inp, w, bb, R, N, C };

    layernorm_forward(out, mean, rstd, inp, w, bb, N, C, LN_EPS);
    for (int n = 0; n < N; n++) {
        double m = 0.0, v = 0.0;
        for (int i = 0; i < C; i++) m += inp[n * C + i];
        m /= C;
        for (int i = 0; i < C; i++) v += (inp[n * C + i] - m) * (inp[n * C + i] - m);
        v /= C;
        double rs = 1.0 / sqrt(v + LN_EPS);
        assert_true(fabs(mean[n] - m) <= FWD_TOL * (1.0 + fabs(m)));
        assert_true(fabs(rstd[n] - rs) <= FWD_TOL * rs);
        for (int i = 0; i < C; i++) {
            double want = (inp[n * C + i] - m) * rs * w[i] + (bb ? bb[i] : 0.0);
            assert_true(fabs(out[n * C + i] - want) <= FWD_TOL);
        }
    }

    /* Remove the offset for the finite differences: at 100 the float mean
     * is rounded to 3.8e-6, which would show up as fd noise of ~1e-3. */
    for (int i = 0; i < C; i++) inp[2 * C + i] -= 100.0f;
    layernorm_forward(out, mean, rstd, inp, w, bb, N, C, LN_EPS);
    float *dinp = falloc(N * C), *dw = falloc(C), *db = falloc(C);
    layernorm_backward(dinp, dw, with_bias ? db : NULL, R, inp, w, mean, rstd, N, C);
    assert_int_equal(gc_check("layernorm dinp", inp, dinp, N * C, ln_loss, &c, FD_EPS, FD_RTOL, FD_ATOL, 0), 0);
    assert_int_equal(gc_check("layernorm dw", w, dw, C, ln_loss, &c, FD_EPS, FD_RTOL, FD_ATOL, 0), 0);
    if (with_bias)
        assert_int_equal(gc_check("layernorm db", b, db, C, ln_loss, &c, FD_EPS, FD_RTOL, FD_ATOL, 0), 0);

    float *dinp2 = falloc(N * C), *dw2 = falloc(C), *db2 = falloc(C);
    memcpy(dinp2, dinp, N * C * sizeof(float));
    memcpy(dw2, dw, C * sizeof(float));
    memcpy(db2, db, C * sizeof(float));
    layernorm_backward(dinp2, dw2, with_bias ? db2 : NULL, R, inp, w, mean, rstd, N, C);
    assert_doubled("layernorm dinp", dinp, dinp2, N * C);
    assert_doubled("layernorm dw", dw, dw2, C);
    if (with_bias) assert_doubled("layernorm db", db, db2, C);

    /* each NULL gradient is skipped and the others are unaffected */
    float *dw3 = falloc(C);
    layernorm_backward(NULL, dw3, NULL, R, inp, w, mean, rstd, N, C);
    assert_true(max_abs_diff(dw3, dw, C) == 0.0);

    free(inp); free(w); free(b); free(R); free(out); free(mean); free(rstd);
    free(dinp); free(dw); free(db); free(dinp2); free(dw2); free(db2); free(dw3);
}

static void test_layernorm(void **state)
{
    (void)state;
    ln_case(1);
}

static void test_layernorm_no_bias(void **state)
{
    (void)state;
    ln_case(0);
}

/* ------------------------------------------------------------------------
 * matmul */

typedef struct {
    float *obuf, *out, *inp, *w, *b, *Rbuf;
    size_t obuf_n;
    int ldo, ldi, w_in_out, N, C, OC;
} mm_ctx;

static double mm_loss(void *p)
{
    mm_ctx *c = p;
    matmul_forward(c->out, c->ldo, c->inp, c->ldi, c->w, c->w_in_out, c->b, c->N, c->C, c->OC);
    /* R is zero on the padding columns, so only the product contributes */
    return dot_d(c->obuf, c->Rbuf, c->obuf_n);
}

/* in_pad/out_pad extra columns around the (N,C) input and (N,OC) output;
 * the slice starts at column 1 of the input and 2 of the output. */
static void mm_case(int w_in_out, int in_pad, int out_pad, int with_bias)
{
    enum { N = 6, C = 8, OC = 12 };
    const int ldi = C + in_pad, ldo = OC + out_pad;
    const int ioff = in_pad ? 1 : 0, ooff = out_pad ? 2 : 0;
    const float sentinel = 12345.0f;
    char tag[64];
    snprintf(tag, sizeof tag, "matmul[%s,%s%s]", w_in_out ? "C,OC" : "OC,C",
             in_pad || out_pad ? "strided" : "dense", with_bias ? ",bias" : "");

    float *ibuf = frand((size_t)N * ldi, 20 + w_in_out, 1.0f);
    float *w = frand((size_t)C * OC, 22 + w_in_out, 1.0f);
    float *b = with_bias ? frand(OC, 24, 1.0f) : NULL;
    float *obuf = falloc((size_t)N * ldo), *Rbuf = falloc((size_t)N * ldo);
    float *Rtmp = frand((size_t)N * OC, 25, 1.0f);
    for (int i = 0; i < N * ldo; i++) obuf[i] = sentinel;
    for (int n = 0; n < N; n++)
        memcpy(Rbuf + (size_t)n * ldo + ooff, Rtmp + (size_t)n * OC, OC * sizeof(float));
    float *inp = ibuf + ioff, *out = obuf + ooff, *dout = Rbuf + ooff;
    mm_ctx c = { obuf, out, inp, w, b, Rbuf, (size_t)N * ldo, ldo, ldi, w_in_out, N, C, OC };

    /* forward vs triple loop */
    matmul_forward(out, ldo, inp, ldi, w, w_in_out, b, N, C, OC);
    for (int n = 0; n < N; n++)
        for (int o = 0; o < OC; o++) {
            double s = b ? b[o] : 0.0;
            for (int i = 0; i < C; i++)
                s += (double)inp[n * ldi + i] * (w_in_out ? w[i * OC + o] : w[o * C + i]);
            if (!(fabs(out[n * ldo + o] - s) <= FWD_TOL))
                fail_msg("%s forward [%d,%d] = %g, want %g", tag, n, o, out[n * ldo + o], s);
        }
    /* columns outside the slice are untouched */
    for (int n = 0; n < N; n++)
        for (int j = 0; j < ldo; j++)
            if (j < ooff || j >= ooff + OC) assert_true(obuf[n * ldo + j] == sentinel);

    /* backward: dinp has the input's layout so the fd runs over the whole
     * input buffer; its padding must get exactly zero gradient */
    float *dibuf = falloc((size_t)N * ldi), *dw = falloc((size_t)C * OC), *db = falloc(OC);
    float *dinp = dibuf + ioff;
    matmul_backward(dinp, ldi, dw, b ? db : NULL, dout, ldo, inp, ldi, w, w_in_out, N, C, OC);
    char what[96];
    snprintf(what, sizeof what, "%s dinp", tag);
    assert_int_equal(gc_check(what, ibuf, dibuf, (size_t)N * ldi, mm_loss, &c, FD_EPS, FD_RTOL, FD_ATOL, 0), 0);
    snprintf(what, sizeof what, "%s dw", tag);
    assert_int_equal(gc_check(what, w, dw, (size_t)C * OC, mm_loss, &c, FD_EPS, FD_RTOL, FD_ATOL, 0), 0);
    if (b) {
        snprintf(what, sizeof what, "%s db", tag);
        assert_int_equal(gc_check(what, b, db, OC, mm_loss, &c, FD_EPS, FD_RTOL, FD_ATOL, 0), 0);
    }

    /* accumulation, and NULL gradients skipped */
    float *dibuf2 = falloc((size_t)N * ldi), *dw2 = falloc((size_t)C * OC), *db2 = falloc(OC);
    memcpy(dibuf2, dibuf, (size_t)N * ldi * sizeof(float));
    memcpy(dw2, dw, (size_t)C * OC * sizeof(float));
    memcpy(db2, db, OC * sizeof(float));
    matmul_backward(dibuf2 + ioff, ldi, dw2, b ? db2 : NULL, dout, ldo, inp, ldi, w, w_in_out, N, C, OC);
    assert_doubled("matmul dinp", dibuf, dibuf2, (size_t)N * ldi);
    assert_doubled("matmul dw", dw, dw2, (size_t)C * OC);
    if (b) assert_doubled("matmul db", db, db2, OC);
    float *dw3 = falloc((size_t)C * OC);
    matmul_backward(NULL, ldi, dw3, NULL, dout, ldo, inp, ldi, w, w_in_out, N, C, OC);
    assert_true(max_abs_diff(dw3, dw, (size_t)C * OC) == 0.0);
    matmul_backward(NULL, ldi, NULL, NULL, dout, ldo, inp, ldi, w, w_in_out, N, C, OC);

    free(ibuf); free(w); free(b); free(obuf); free(Rbuf); free(Rtmp);
    free(dibuf); free(dw); free(db); free(dibuf2); free(dw2); free(db2); free(dw3);
}

static void test_matmul_conv1d_layout(void **state)
{
    (void)state;
    mm_case(1, 0, 0, 1);
    mm_case(1, 0, 0, 0);
}

static void test_matmul_linear_layout(void **state)
{
    (void)state;
    mm_case(0, 0, 0, 1);
    mm_case(0, 0, 0, 0);
}

static void test_matmul_strided(void **state)
{
    (void)state;
    mm_case(1, 5, 3, 1);
    mm_case(0, 5, 3, 1);
    mm_case(0, 0, 3, 0);
}

/* ------------------------------------------------------------------------
 * gelu */

typedef struct {
    float *out, *inp, *R;
    size_t n;
} gelu_ctx;

static double gelu_loss(void *p)
{
    gelu_ctx *c = p;
    gelu_forward(c->out, c->inp, c->n);
    return dot_d(c->out, c->R, c->n);
}

static double gelu_ref(double x)
{
    return 0.5 * x * (1.0 + tanh(sqrt(2.0 / M_PI) * (x + 0.044715 * x * x * x)));
}

static double gelu_grad_ref(double x)
{
    double k = sqrt(2.0 / M_PI), u = k * (x + 0.044715 * x * x * x), th = tanh(u);
    return 0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * k * (1.0 + 3.0 * 0.044715 * x * x);
}

static void test_gelu(void **state)
{
    (void)state;
    enum { n = 37 }; /* not a multiple of the vector width */
    float *inp = frand(n, 30, 4.0f), *R = frand(n, 31, 1.0f), *out = falloc(n);
    /* saturated tails, where 1 + tanh u must not cancel to garbage */
    inp[0] = -30.0f;
    inp[1] = 30.0f;
    inp[2] = -9.0f;
    inp[3] = 0.0f;
    gelu_ctx c = { out, inp, R, n };
    gelu_forward(out, inp, n);
    for (int i = 0; i < n; i++) {
        double want = gelu_ref(inp[i]);
        /* 1e-6 relative + 1e-7 absolute: a few float ulps */
        if (!(fabs(out[i] - want) <= 1e-7 + 1e-6 * fabs(want)))
            fail_msg("gelu(%g) = %.9g, want %.9g", inp[i], out[i], want);
    }
    float *dinp = falloc(n), *dinp2 = falloc(n);
    gelu_backward(dinp, inp, R, n);
    for (int i = 0; i < n; i++) {
        double want = gelu_grad_ref(inp[i]) * R[i];
        if (!(fabs(dinp[i] - want) <= 1e-7 + 1e-5 * fabs(want)))
            fail_msg("gelu'(%g) dout = %.9g, want %.9g", inp[i], dinp[i], want);
    }
    assert_int_equal(gc_check("gelu dinp", inp, dinp, n, gelu_loss, &c, FD_EPS, FD_RTOL, FD_ATOL, 0), 0);
    memcpy(dinp2, dinp, n * sizeof(float));
    gelu_backward(dinp2, inp, R, n);
    assert_doubled("gelu dinp", dinp, dinp2, n);
    free(inp); free(R); free(out); free(dinp); free(dinp2);
}

/* Long enough for the multi-threaded, chunked path; compared with the
 * double reference only (cheap). */
static void test_gelu_large(void **state)
{
    (void)state;
    const size_t n = 3 * 8192 + 13;
    float *inp = frand(n, 32, 6.0f), *g = frand(n, 33, 1.0f), *out = falloc(n), *dinp = falloc(n);
    gelu_forward(out, inp, n);
    gelu_backward(dinp, inp, g, n);
    for (size_t i = 0; i < n; i++) {
        double want = gelu_ref(inp[i]), dwant = gelu_grad_ref(inp[i]) * g[i];
        if (!(fabs(out[i] - want) <= 1e-7 + 1e-6 * fabs(want)))
            fail_msg("gelu(%g) = %.9g, want %.9g", inp[i], out[i], want);
        if (!(fabs(dinp[i] - dwant) <= 1e-7 + 1e-5 * fabs(dwant)))
            fail_msg("gelu'(%g) dout = %.9g, want %.9g", inp[i], dinp[i], dwant);
    }
    free(inp); free(g); free(out); free(dinp);
}

/* ------------------------------------------------------------------------
 * residual */

typedef struct {
    float *out, *a, *b, *R;
    size_t n;
} res_ctx;

static double res_loss(void *p)
{
    res_ctx *c = p;
    residual_forward(c->out, c->a, c->b, c->n);
    return dot_d(c->out, c->R, c->n);
}

static void test_residual(void **state)
{
    (void)state;
    enum { n = 2 * 5 * 8 };
    float *a = frand(n, 40, 1.0f), *b = frand(n, 41, 1.0f), *R = frand(n, 42, 1.0f);
    float *out = falloc(n), *da = falloc(n), *db = falloc(n), *da2 = falloc(n);
    res_ctx c = { out, a, b, R, n };
    residual_forward(out, a, b, n);
    for (int i = 0; i < n; i++) assert_true(out[i] == a[i] + b[i]);
    residual_backward(da, db, R, n);
    assert_int_equal(gc_check("residual da", a, da, n, res_loss, &c, FD_EPS, FD_RTOL, FD_ATOL, 0), 0);
    assert_int_equal(gc_check("residual db", b, db, n, res_loss, &c, FD_EPS, FD_RTOL, FD_ATOL, 0), 0);
    memcpy(da2, da, n * sizeof(float));
    residual_backward(da2, NULL, R, n);
    assert_doubled("residual da", da, da2, n);
    /* in place: out aliases a */
    residual_forward(out, a, b, n);
    float *a2 = falloc(n);
    memcpy(a2, a, n * sizeof(float));
    residual_forward(a2, a2, b, n);
    assert_true(max_abs_diff(a2, out, n) == 0.0);
    free(a); free(b); free(R); free(out); free(da); free(db); free(da2); free(a2);
}

/* ------------------------------------------------------------------------
 * attention */

typedef struct {
    const char *name;
    int B, T, H, Hkv, hd, P;
    int fused;       /* q, k, v as column slices of one (B,T,(H+2Hkv)hd) buffer */
    size_t max_probe; /* 0 = every entry */
} att_case;

typedef struct {
    const att_case *ac;
    /* fused: qkv holds all three; otherwise q, k, v are separate */
    float *qkv, *qb, *kb, *vb;
    const float *q, *k, *v;
    int ldq, ldk, ldv;
    float *pk, *pv, *out, *att, *R;
} att_ctx;

static double att_loss(void *p)
{
    att_ctx *c = p;
    const att_case *a = c->ac;
    attention_forward(c->out, c->att, c->q, c->ldq, c->k, c->ldk, c->v, c->ldv, c->pk, c->pv,
                      a->P, a->B, a->T, a->H, a->Hkv, a->hd);
    return dot_d(c->out, c->R, (size_t)a->B * a->T * a->H * a->hd);
}

/* Naive per-query softmax attention in double: out (B,T,H*hd), att (B,H,T,P+T). */
static void att_reference(double *out, double *att, const att_ctx *c)
{
    const att_case *a = c->ac;
    int B = a->B, T = a->T, H = a->H, hd = a->hd, P = a->P, PT = P + T;
    int grp = H / a->Hkv;
    double *s = malloc((size_t)PT * sizeof(double));
    assert_non_null(s);
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++) {
            int g = h / grp;
            for (int t = 0; t < T; t++) {
                const float *qt = c->q + (size_t)(b * T + t) * c->ldq + h * hd;
                double mx = -INFINITY;
                for (int j = 0; j < PT; j++) {
                    if (j >= P + t + 1) { /* causal: key position j-P > t */
                        s[j] = 0.0;
                        continue;
                    }
                    const float *kj = j < P ? c->pk + (size_t)(g * P + j) * hd
                                            : c->k + (size_t)(b * T + j - P) * c->ldk + g * hd;
                    double d = 0.0;
                    for (int i = 0; i < hd; i++) d += (double)qt[i] * kj[i];
                    s[j] = d / sqrt((double)hd);
                    if (s[j] > mx) mx = s[j];
                }
                double sum = 0.0;
                for (int j = 0; j <= P + t; j++) {
                    s[j] = exp(s[j] - mx);
                    sum += s[j];
                }
                double *ar = att + ((size_t)(b * H + h) * T + t) * PT;
                for (int j = 0; j < PT; j++) ar[j] = j <= P + t ? s[j] / sum : 0.0;
                double *o = out + (size_t)(b * T + t) * H * hd + h * hd;
                for (int i = 0; i < hd; i++) {
                    double acc = 0.0;
                    for (int j = 0; j <= P + t; j++) {
                        const float *vj = j < P ? c->pv + (size_t)(g * P + j) * hd
                                                : c->v + (size_t)(b * T + j - P) * c->ldv + g * hd;
                        acc += ar[j] * vj[i];
                    }
                    o[i] = acc;
                }
            }
        }
    free(s);
}

static void att_run(const att_case *a)
{
    const int B = a->B, T = a->T, H = a->H, Hkv = a->Hkv, hd = a->hd, P = a->P, PT = P + T;
    const size_t nq = (size_t)B * T * H * hd, nkv = (size_t)B * T * Hkv * hd;
    const size_t np = (size_t)Hkv * P * hd, natt = (size_t)B * H * T * PT;
    const int W = (H + 2 * Hkv) * hd;
    att_ctx c;
    memset(&c, 0, sizeof c);
    c.ac = a;
    if (a->fused) {
        c.qkv = frand((size_t)B * T * W, 50, 1.0f);
        c.q = c.qkv;
        c.k = c.qkv + H * hd;
        c.v = c.qkv + (H + Hkv) * hd;
        c.ldq = c.ldk = c.ldv = W;
    } else {
        c.qb = frand(nq, 51, 1.0f);
        c.kb = frand(nkv, 52, 1.0f);
        c.vb = frand(nkv, 53, 1.0f);
        c.q = c.qb;
        c.k = c.kb;
        c.v = c.vb;
        c.ldq = H * hd;
        c.ldk = c.ldv = Hkv * hd;
    }
    c.pk = P ? frand(np, 54, 1.0f) : NULL;
    c.pv = P ? frand(np, 55, 1.0f) : NULL;
    c.out = falloc(nq);
    c.att = falloc(natt);
    c.R = frand(nq, 56, 1.0f);

    /* forward vs the naive loop; masked probabilities exactly 0 */
    attention_forward(c.out, c.att, c.q, c.ldq, c.k, c.ldk, c.v, c.ldv, c.pk, c.pv, P, B, T, H, Hkv, hd);
    double *oref = malloc(nq * sizeof(double)), *aref = malloc(natt * sizeof(double));
    assert_non_null(oref);
    assert_non_null(aref);
    att_reference(oref, aref, &c);
    double eo = max_abs_diff_d(c.out, oref, nq), ea = max_abs_diff_d(c.att, aref, natt);
    if (!(eo <= FWD_TOL && ea <= FWD_TOL))
        fail_msg("attention %s forward: max |out - ref| = %g, max |att - ref| = %g (tol %g)",
                 a->name, eo, ea, FWD_TOL);
    for (int bh = 0; bh < B * H; bh++)
        for (int t = 0; t < T; t++) {
            const float *ar = c.att + ((size_t)bh * T + t) * PT;
            double sum = 0.0;
            for (int j = 0; j < PT; j++) {
                if (j > P + t) assert_true(ar[j] == 0.0f);
                sum += ar[j];
            }
            assert_true(fabs(sum - 1.0) <= 1e-5);
        }

    /* backward, scratch of exactly T*(P+T) floats so that overruns show under ASan */
    float *scratch = falloc((size_t)T * PT);
    float *dqkv = a->fused ? falloc((size_t)B * T * W) : NULL;
    float *dq = a->fused ? dqkv : falloc(nq);
    float *dk = a->fused ? dqkv + H * hd : falloc(nkv);
    float *dv = a->fused ? dqkv + (H + Hkv) * hd : falloc(nkv);
    float *dpk = P ? falloc(np) : NULL, *dpv = P ? falloc(np) : NULL;
    attention_backward(dq, dk, dv, dpk, dpv, c.R, c.att, c.q, c.ldq, c.k, c.ldk, c.v, c.ldv,
                       c.pk, c.pv, P, B, T, H, Hkv, hd, scratch);
    char what[96];
    if (a->fused) {
        snprintf(what, sizeof what, "attn %s dqkv", a->name);
        assert_int_equal(gc_check(what, c.qkv, dqkv, (size_t)B * T * W, att_loss, &c,
                                  FD_EPS, FD_RTOL, FD_ATOL, a->max_probe), 0);
    } else {
        snprintf(what, sizeof what, "attn %s dq", a->name);
        assert_int_equal(gc_check(what, c.qb, dq, nq, att_loss, &c, FD_EPS, FD_RTOL, FD_ATOL, a->max_probe), 0);
        snprintf(what, sizeof what, "attn %s dk", a->name);
        assert_int_equal(gc_check(what, c.kb, dk, nkv, att_loss, &c, FD_EPS, FD_RTOL, FD_ATOL, a->max_probe), 0);
        snprintf(what, sizeof what, "attn %s dv", a->name);
        assert_int_equal(gc_check(what, c.vb, dv, nkv, att_loss, &c, FD_EPS, FD_RTOL, FD_ATOL, a->max_probe), 0);
    }
    if (P) {
        snprintf(what, sizeof what, "attn %s dpk", a->name);
        assert_int_equal(gc_check(what, c.pk, dpk, np, att_loss, &c, FD_EPS, FD_RTOL, FD_ATOL, 0), 0);
        snprintf(what, sizeof what, "attn %s dpv", a->name);
        assert_int_equal(gc_check(what, c.pv, dpv, np, att_loss, &c, FD_EPS, FD_RTOL, FD_ATOL, 0), 0);
    }

    /* accumulation: a second call adds the same gradients again (forward
     * first: the last probe left att computed from a perturbed input) */
    attention_forward(c.out, c.att, c.q, c.ldq, c.k, c.ldk, c.v, c.ldv, c.pk, c.pv, P, B, T, H, Hkv, hd);
    size_t ng = a->fused ? (size_t)B * T * W : nq;
    float *g1 = falloc(ng), *g1pk = falloc(np), *g1pv = falloc(np);
    memcpy(g1, a->fused ? dqkv : dq, ng * sizeof(float));
    if (P) {
        memcpy(g1pk, dpk, np * sizeof(float));
        memcpy(g1pv, dpv, np * sizeof(float));
    }
    float *g1k = a->fused ? NULL : falloc(nkv), *g1v = a->fused ? NULL : falloc(nkv);
    if (!a->fused) {
        memcpy(g1k, dk, nkv * sizeof(float));
        memcpy(g1v, dv, nkv * sizeof(float));
    }
    attention_backward(dq, dk, dv, dpk, dpv, c.R, c.att, c.q, c.ldq, c.k, c.ldk, c.v, c.ldv,
                       c.pk, c.pv, P, B, T, H, Hkv, hd, scratch);
    assert_doubled("attention dq/dqkv", g1, a->fused ? dqkv : dq, ng);
    if (!a->fused) {
        assert_doubled("attention dk", g1k, dk, nkv);
        assert_doubled("attention dv", g1v, dv, nkv);
    }
    if (P) {
        assert_doubled("attention dpk", g1pk, dpk, np);
        assert_doubled("attention dpv", g1pv, dpv, np);
    }

    /* NULL gradients: only dv (no score gradient needed) equals the full dv */
    if (!a->fused) {
        float *dv_only = falloc(nkv);
        attention_backward(NULL, NULL, dv_only, NULL, NULL, c.R, c.att, c.q, c.ldq, c.k, c.ldk,
                           c.v, c.ldv, c.pk, c.pv, P, B, T, H, Hkv, hd, scratch);
        assert_true(max_abs_diff(dv_only, g1v, nkv) <= 1e-6);
        free(dv_only);
    }

    free(oref); free(aref); free(scratch); free(g1); free(g1pk); free(g1pv); free(g1k); free(g1v);
    if (a->fused) {
        free(c.qkv); free(dqkv);
    } else {
        free(c.qb); free(c.kb); free(c.vb); free(dq); free(dk); free(dv);
    }
    free(c.pk); free(c.pv); free(dpk); free(dpv); free(c.out); free(c.att); free(c.R);
}

static void test_attention_mha(void **state)
{
    (void)state;
    const att_case a = { "mha", 2, 5, 2, 2, 4, 0, 0, 0 };
    att_run(&a);
}

static void test_attention_gqa(void **state)
{
    (void)state;
    const att_case a = { "gqa H=4 Hkv=2", 2, 6, 4, 2, 4, 0, 0, 0 };
    att_run(&a);
}

static void test_attention_prefix(void **state)
{
    (void)state;
    const att_case a = { "prefix P=3", 2, 5, 2, 2, 4, 3, 0, 0 };
    att_run(&a);
}

static void test_attention_fused(void **state)
{
    (void)state;
    /* GPT-2 style: q, k, v are column slices of one (B,T,3C) buffer */
    const att_case a = { "fused qkv", 2, 7, 2, 2, 4, 0, 1, 0 };
    att_run(&a);
    /* fused buffer with grouped heads and a prefix at once */
    const att_case b = { "fused gqa prefix", 2, 6, 4, 2, 4, 3, 1, 0 };
    att_run(&b);
}

/* T well beyond one block of query rows, so the per-block restriction of
 * keys and the block offsets are exercised; probes a spread subset. */
static void test_attention_long(void **state)
{
    (void)state;
    const att_case a = { "long T=300", 1, 300, 2, 1, 4, 2, 1, 48 };
    att_run(&a);
}

/* ------------------------------------------------------------------------
 * cross-entropy */

typedef struct {
    float *losses, *probs, *logits;
    const int *targets;
    int N, V;
} ce_ctx;

/* mean loss over the scored rows */
static double ce_loss(void *p)
{
    ce_ctx *c = p;
    long S = crossentropy_forward(c->losses, c->probs, c->logits, c->targets, c->N, c->V);
    double s = 0.0;
    for (int i = 0; i < c->N; i++) s += c->losses[i];
    return S ? s / (double)S : 0.0;
}

static void test_crossentropy(void **state)
{
    (void)state;
    enum { N = 6, V = 11 };
    const int targets[N] = { 3, -1, 0, 10, -1, 7 };
    float *logits = frand(N * V, 60, 2.0f), *probs = falloc(N * V), *losses = falloc(N);
    /* a row with huge logits: max subtraction must keep it finite */
    for (int j = 0; j < V; j++) logits[5 * V + j] += 1000.0f;
    ce_ctx c = { losses, probs, logits, targets, N, V };

    long S = crossentropy_forward(losses, probs, logits, targets, N, V);
    assert_int_equal(S, 4);
    for (int i = 0; i < N; i++) {
        const float *x = logits + i * V;
        double mx = -INFINITY, sum = 0.0, psum = 0.0;
        for (int j = 0; j < V; j++) mx = x[j] > mx ? x[j] : mx;
        for (int j = 0; j < V; j++) sum += exp(x[j] - mx);
        for (int j = 0; j < V; j++) {
            double want = exp(x[j] - mx) / sum;
            assert_true(fabs(probs[i * V + j] - want) <= 1e-6);
            psum += probs[i * V + j];
        }
        assert_true(fabs(psum - 1.0) <= 1e-5);
        double want = targets[i] < 0 ? 0.0 : log(sum) + mx - x[targets[i]];
        if (!(fabs(losses[i] - want) <= FWD_TOL))
            fail_msg("ce loss row %d = %g, want %g", i, losses[i], want);
    }

    float *dlogits = falloc(N * V), *dl2 = falloc(N * V);
    crossentropy_backward(dlogits, probs, targets, N, V, 1.0f / (float)S);
    /* the row offset by 1000 has float ulp 6e-5 there: gc_check divides by
     * the step actually stored, so the step is still resolved */
    assert_int_equal(gc_check("crossentropy dlogits", logits, dlogits, N * V, ce_loss, &c,
                              FD_EPS, FD_RTOL, FD_ATOL, 0), 0);
    /* ignored rows: zero gradient, and their logits do not change the loss */
    for (int j = 0; j < V; j++) {
        assert_true(dlogits[1 * V + j] == 0.0f);
        assert_true(dlogits[4 * V + j] == 0.0f);
    }
    double L0 = ce_loss(&c);
    for (int j = 0; j < V; j++) logits[1 * V + j] = 50.0f * (float)(j % 3) - 40.0f;
    double L1 = ce_loss(&c);
    assert_true(L0 == L1);

    memcpy(dl2, dlogits, N * V * sizeof(float));
    crossentropy_forward(losses, probs, logits, targets, N, V);
    crossentropy_backward(dl2, probs, targets, N, V, 1.0f / (float)S);
    assert_doubled("crossentropy dlogits", dlogits, dl2, N * V);

    /* nothing scored: count 0, all losses 0, no gradient */
    const int none[N] = { -1, -1, -1, -1, -1, -1 };
    float *dl3 = falloc(N * V);
    assert_int_equal(crossentropy_forward(losses, probs, logits, none, N, V), 0);
    for (int i = 0; i < N; i++) assert_true(losses[i] == 0.0f);
    crossentropy_backward(dl3, probs, none, N, V, 1.0f);
    for (int i = 0; i < N * V; i++) assert_true(dl3[i] == 0.0f);

    free(logits); free(probs); free(losses); free(dlogits); free(dl2); free(dl3);
}

/* A vocabulary large enough for the multi-threaded path, against double. */
static void test_crossentropy_large(void **state)
{
    (void)state;
    enum { N = 3, V = 5003 };
    const int targets[N] = { 17, -1, 5002 };
    float *logits = frand(N * V, 61, 8.0f), *probs = falloc(N * V), *losses = falloc(N);
    assert_int_equal(crossentropy_forward(losses, probs, logits, targets, N, V), 2);
    for (int i = 0; i < N; i++) {
        const float *x = logits + i * V;
        double mx = -INFINITY, sum = 0.0;
        for (int j = 0; j < V; j++) mx = x[j] > mx ? x[j] : mx;
        for (int j = 0; j < V; j++) sum += exp(x[j] - mx);
        for (int j = 0; j < V; j++) {
            double want = exp(x[j] - mx) / sum;
            /* relative 1e-5: exp is evaluated in float */
            if (!(fabs(probs[i * V + j] - want) <= 1e-5 * want + 1e-12))
                fail_msg("ce prob [%d,%d] = %g, want %g", i, j, probs[i * V + j], want);
        }
        double want = targets[i] < 0 ? 0.0 : log(sum) + mx - x[targets[i]];
        assert_true(fabs(losses[i] - want) <= FWD_TOL * (1.0 + fabs(want)));
    }
    free(logits); free(probs); free(losses);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_encoder),
        cmocka_unit_test(test_layernorm),
        cmocka_unit_test(test_layernorm_no_bias),
        cmocka_unit_test(test_matmul_conv1d_layout),
        cmocka_unit_test(test_matmul_linear_layout),
        cmocka_unit_test(test_matmul_strided),
        cmocka_unit_test(test_gelu),
        cmocka_unit_test(test_gelu_large),
        cmocka_unit_test(test_residual),
        cmocka_unit_test(test_attention_mha),
        cmocka_unit_test(test_attention_gqa),
        cmocka_unit_test(test_attention_prefix),
        cmocka_unit_test(test_attention_fused),
        cmocka_unit_test(test_attention_long),
        cmocka_unit_test(test_crossentropy),
        cmocka_unit_test(test_crossentropy_large),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
