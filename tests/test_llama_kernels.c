/* peftref tests: the LLaMA-family components of core/model/llama_kernels.c
 * (RMSNorm, rotary position embeddings, SwiGLU).
 *
 * Every backward pass is checked against central finite differences of a
 * scalar loss L = sum(out * R) for a fixed random R (so dout = R), with L
 * accumulated in double; forward passes against naive loops in double;
 * accumulation (+=) by calling each backward twice; NULL gradients by
 * comparing the one gradient computed alone with the same one computed
 * together with the other.
 *
 * Tolerances.
 *  - Forward vs double reference: 2e-6 relative + 1e-6 absolute (values
 *    O(1), each output a handful of float operations, ~1e-7 each).
 *  - Finite differences: eps = 1e-2, rtol = 1e-2, atol = 1e-4, as in
 *    test_kernels.c (the argument there: float-rounded outputs give a loss
 *    noise of ~1e-7..1e-6, divided by 2 eps; truncation eps^2/6 |f'''| stays
 *    below ~2e-5 for these O(1) functions).  RoPE is linear in x, so its fd
 *    is exact up to rounding.  RMSNorm inputs are kept away from rows whose
 *    root mean square is tiny (there the function has curvature ~1/rms^2
 *    and a step of 1e-2 is no longer small); SwiGLU gates are in [-4, 4].
 *  - Accumulation: the second call gives 2x the first within 1e-6 relative
 *    + 1e-6 absolute.
 *  - rope_inv_freq against an independent formula: 1e-14 relative (both in
 *    double, a few operations apart).
 *  - Large shapes (past the OpenMP threshold) against double references:
 *    1e-5 relative + 1e-5 absolute (sums of up to 130 float products). */
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
#include "llama_kernels.h"

#define FD_EPS 1e-2
#define FD_RTOL 1e-2
#define FD_ATOL 1e-4
#define FWD_RTOL 2e-6
#define FWD_ATOL 1e-6
#define PI_D 3.141592653589793238462643383279

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

static float *fcopy(const float *a, size_t n)
{
    float *p = falloc(n);
    memcpy(p, a, n * sizeof(float));
    return p;
}

static double dot_d(const float *a, const float *b, size_t n)
{
    double s = 0.0;
    for (size_t i = 0; i < n; i++) s += (double)a[i] * (double)b[i];
    return s;
}

static void assert_close(const char *what, size_t i, double got, double want, double rtol, double atol)
{
    if (!(fabs(got - want) <= atol + rtol * fabs(want)))
        fail_msg("%s [%zu] = %.9g, want %.9g (|diff| %.3g, tol %.3g)", what, i, got, want,
                 fabs(got - want), atol + rtol * fabs(want));
}

/* g2 must equal 2 * g1 up to summation order */
static void assert_doubled(const char *what, const float *g1, const float *g2, size_t n)
{
    for (size_t i = 0; i < n; i++) assert_close(what, i, g2[i], 2.0 * g1[i], 1e-6, 1e-6);
}

static void assert_finite(const char *what, const float *a, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (!isfinite(a[i])) fail_msg("%s [%zu] = %g is not finite", what, i, a[i]);
}

/* ------------------------------------------------------------------------
 * RMSNorm */

#define RMS_EPS 1e-6f

/* out = x / sqrt(mean x^2 + eps) * w in double; rstd_d (N) */
static void rms_ref(double *out, double *rstd_d, const float *x, const float *w, int N, int C, double eps)
{
    for (int i = 0; i < N; i++) {
        double ss = 0.0;
        for (int c = 0; c < C; c++) ss += (double)x[i * C + c] * x[i * C + c];
        double r = 1.0 / sqrt(ss / C + eps);
        rstd_d[i] = r;
        for (int c = 0; c < C; c++) out[(size_t)i * C + c] = x[i * C + c] * r * w[c];
    }
}

/* the analytic gradient written from the chain rule in double, term by term:
 * y_j = x_j r w_j, dr/dx_k = -x_k r^3 / C */
static void rms_ref_grad(double *dx, double *dw, const float *dout, const float *x, const float *w,
                         int N, int C, double eps)
{
    for (int c = 0; c < C; c++) dw[c] = 0.0;
    for (int i = 0; i < N; i++) {
        const float *xi = x + (size_t)i * C, *g = dout + (size_t)i * C;
        double ss = 0.0;
        for (int c = 0; c < C; c++) ss += (double)xi[c] * xi[c];
        double r = 1.0 / sqrt(ss / C + eps);
        double gwx = 0.0; /* sum_j g_j w_j x_j */
        for (int c = 0; c < C; c++) gwx += (double)g[c] * w[c] * xi[c];
        for (int k = 0; k < C; k++) {
            dx[(size_t)i * C + k] = (double)g[k] * w[k] * r - gwx * xi[k] * r * r * r / C;
            dw[k] += (double)g[k] * xi[k] * r;
        }
    }
}

typedef struct {
    float *out, *rstd, *x, *w, *R;
    int N, C;
} rms_ctx;

static double rms_loss(void *p)
{
    rms_ctx *c = p;
    rmsnorm_forward(c->out, c->rstd, c->x, c->w, c->N, c->C, RMS_EPS);
    return dot_d(c->out, c->R, (size_t)c->N * c->C);
}

static void rms_case(int N, int C, unsigned seed)
{
    size_t n = (size_t)N * C;
    float *x = frand(n, seed, 1.0f), *w = frand(C, seed + 1, 0.5f), *R = frand(n, seed + 2, 1.0f);
    float *out = falloc(n), *rstd = falloc(N);
    for (int c = 0; c < C; c++) w[c] += 1.0f;
    /* keep every row's rms >= 0.4 (see the tolerances): push entries away from 0 */
    for (size_t i = 0; i < n; i++) x[i] += x[i] < 0 ? -0.4f : 0.4f;
    rms_ctx ctx = { out, rstd, x, w, R, N, C };

    double *want = malloc(n * sizeof(double)), *rs_want = malloc((size_t)N * sizeof(double));
    assert_non_null(want);
    assert_non_null(rs_want);
    rms_ref(want, rs_want, x, w, N, C, RMS_EPS);
    rmsnorm_forward(out, rstd, x, w, N, C, RMS_EPS);
    for (int i = 0; i < N; i++) assert_close("rmsnorm rstd", (size_t)i, rstd[i], rs_want[i], FWD_RTOL, 0.0);
    for (size_t i = 0; i < n; i++) assert_close("rmsnorm out", i, out[i], want[i], FWD_RTOL, FWD_ATOL);
    /* rstd is optional in forward and changes nothing else */
    float *out2 = falloc(n);
    rmsnorm_forward(out2, NULL, x, w, N, C, RMS_EPS);
    assert_memory_equal(out, out2, n * sizeof(float));

    float *dx = falloc(n), *dw = falloc(C);
    rmsnorm_backward(dx, dw, R, x, w, rstd, N, C);
    char what[64];
    snprintf(what, sizeof what, "rmsnorm dx N=%d C=%d", N, C);
    assert_int_equal(gc_check(what, x, dx, n, rms_loss, &ctx, FD_EPS, FD_RTOL, FD_ATOL, 0), 0);
    snprintf(what, sizeof what, "rmsnorm dw N=%d C=%d", N, C);
    assert_int_equal(gc_check(what, w, dw, C, rms_loss, &ctx, FD_EPS, FD_RTOL, FD_ATOL, 0), 0);
    rmsnorm_forward(out, rstd, x, w, N, C, RMS_EPS); /* gc_check leaves the last probe's rstd */

    /* accumulation */
    float *dx2 = fcopy(dx, n), *dw2 = fcopy(dw, C);
    rmsnorm_backward(dx2, dw2, R, x, w, rstd, N, C);
    assert_doubled("rmsnorm dx", dx, dx2, n);
    assert_doubled("rmsnorm dw", dw, dw2, C);
    /* NULL skips one gradient without changing the other */
    float *dxa = falloc(n), *dwa = falloc(C);
    rmsnorm_backward(dxa, NULL, R, x, w, rstd, N, C);
    rmsnorm_backward(NULL, dwa, R, x, w, rstd, N, C);
    assert_memory_equal(dxa, dx, n * sizeof(float));
    assert_memory_equal(dwa, dw, C * sizeof(float));
    rmsnorm_backward(NULL, NULL, R, x, w, rstd, N, C);

    free(x); free(w); free(R); free(out); free(out2); free(rstd); free(want); free(rs_want);
    free(dx); free(dw); free(dx2); free(dw2); free(dxa); free(dwa);
}

static void test_rmsnorm(void **state)
{
    (void)state;
    rms_case(5, 7, 10);   /* odd N and C */
    rms_case(3, 2, 20);   /* C = 2: qwen3's q/k norm with the smallest head */
    rms_case(4, 1, 30);   /* C = 1 */
    rms_case(3, 130, 40); /* C past two column blocks of the dw reduction */
}

/* eps dominates a zero row, and large values do not overflow the squares */
static void test_rmsnorm_extremes(void **state)
{
    (void)state;
    enum { C = 4 };
    const float x[3 * C] = { 0, 0, 0, 0, 1e20f, -1e20f, 1e20f, -1e20f, 1e-3f, 0, 0, 0 };
    const float w[C] = { 1, 2, 3, 4 };
    float out[3 * C], rstd[3];
    rmsnorm_forward(out, rstd, x, w, 3, C, RMS_EPS);
    assert_finite("rmsnorm out", out, 3 * C);
    assert_close("rmsnorm zero row rstd", 0, rstd[0], 1.0 / sqrt(1e-6), FWD_RTOL, 0.0);
    for (int c = 0; c < C; c++) assert_true(out[c] == 0.0f);
    /* x^2 = 1e40 is past float's range: the mean of squares is taken in double */
    for (int c = 0; c < C; c++)
        assert_close("rmsnorm 1e20 row", (size_t)c, out[C + c], (c % 2 ? -1.0 : 1.0) * w[c], FWD_RTOL, 0.0);
    double r = 1.0 / sqrt(1e-6 / 4 + 1e-6);
    assert_close("rmsnorm small row", 0, out[2 * C], (double)1e-3f * r, FWD_RTOL, 0.0);
}

/* past the OpenMP threshold (N*C >= 8192), against the double references */
static void test_rmsnorm_large(void **state)
{
    (void)state;
    enum { N = 70, C = 130 };
    size_t n = (size_t)N * C;
    float *x = frand(n, 50, 2.0f), *w = frand(C, 51, 1.0f), *R = frand(n, 52, 1.0f);
    float *out = falloc(n), *rstd = falloc(N), *dx = falloc(n), *dw = falloc(C);
    double *want = malloc(n * sizeof(double)), *rs = malloc(N * sizeof(double));
    double *dxw = malloc(n * sizeof(double)), *dww = malloc(C * sizeof(double));
    assert_non_null(want); assert_non_null(rs); assert_non_null(dxw); assert_non_null(dww);
    rmsnorm_forward(out, rstd, x, w, N, C, RMS_EPS);
    rms_ref(want, rs, x, w, N, C, RMS_EPS);
    for (size_t i = 0; i < n; i++) assert_close("rmsnorm large out", i, out[i], want[i], 1e-5, 1e-5);
    rmsnorm_backward(dx, dw, R, x, w, rstd, N, C);
    rms_ref_grad(dxw, dww, R, x, w, N, C, RMS_EPS);
    for (size_t i = 0; i < n; i++) assert_close("rmsnorm large dx", i, dx[i], dxw[i], 1e-5, 1e-5);
    for (int c = 0; c < C; c++) assert_close("rmsnorm large dw", (size_t)c, dw[c], dww[c], 1e-5, 1e-5);
    free(x); free(w); free(R); free(out); free(rstd); free(dx); free(dw);
    free(want); free(rs); free(dxw); free(dww);
}

/* ------------------------------------------------------------------------
 * rope: inverse frequencies */

/* inv_freq without scaling, written as exp(-(2i/hd) ln theta) */
static double inv_freq_plain(int i, int hd, double theta)
{
    return exp(-((double)(2 * i) / (double)hd) * log(theta));
}

enum { BAND_KEPT, BAND_SMOOTH, BAND_DIVIDED };

/* Llama 3.1's rule written on the number of rotations within the original
 * context, L / wavelen = L f / (2 pi): more than high_freq_factor rotations
 * keeps f, fewer than low_freq_factor divides it by factor, in between it is
 * the mix s f + (1 - s) f / factor with s linear in the rotations. */
static double llama3_ref(double f, double L, double factor, double lo, double hi, int *band)
{
    double rot = L * f / (2.0 * PI_D);
    if (rot > hi) {
        *band = BAND_KEPT;
        return f;
    }
    if (rot < lo) {
        *band = BAND_DIVIDED;
        return f / factor;
    }
    *band = BAND_SMOOTH;
    double s = (rot - lo) / (hi - lo);
    return f * (s + (1.0 - s) / factor);
}

static void test_rope_inv_freq_none_linear(void **state)
{
    (void)state;
    const int hds[] = { 2, 6, 64, 128 };
    const double thetas[] = { 10000.0, 500000.0, 1000000.0 };
    for (size_t a = 0; a < sizeof hds / sizeof hds[0]; a++)
        for (size_t b = 0; b < sizeof thetas / sizeof thetas[0]; b++) {
            int hd = hds[a];
            double f0[64], f1[64];
            rope_params p = { .theta = thetas[b], .scaling = ROPE_SCALING_NONE, .factor = 4.0 };
            rope_inv_freq(f0, hd, &p);
            p.scaling = ROPE_SCALING_LINEAR;
            rope_inv_freq(f1, hd, &p);
            assert_true(f0[0] == 1.0);
            for (int i = 0; i < hd / 2; i++) {
                assert_close("inv_freq none", (size_t)i, f0[i], inv_freq_plain(i, hd, thetas[b]), 1e-14, 0.0);
                assert_close("inv_freq linear", (size_t)i, f1[i], f0[i] / 4.0, 1e-15, 0.0);
            }
        }
}

static void llama3_case(int hd, double theta, int L, double factor, double lo, double hi,
                        int need_all_bands, int *bands)
{
    double f[64], plain[64];
    rope_params p = { .theta = theta, .scaling = ROPE_SCALING_LLAMA3, .factor = factor,
                      .low_freq_factor = lo, .high_freq_factor = hi, .original_max_pos = L };
    rope_inv_freq(f, hd, &p);
    p.scaling = ROPE_SCALING_NONE;
    rope_inv_freq(plain, hd, &p);
    int count[3] = { 0, 0, 0 };
    for (int i = 0; i < hd / 2; i++) {
        double want = llama3_ref(inv_freq_plain(i, hd, theta), L, factor, lo, hi, &bands[i]);
        count[bands[i]]++;
        assert_close("inv_freq llama3", (size_t)i, f[i], want, 1e-14, 0.0);
        /* the band's defining property, on the values themselves */
        if (bands[i] == BAND_KEPT) assert_true(f[i] == plain[i]);
        if (bands[i] == BAND_DIVIDED) assert_close("llama3 divided", (size_t)i, f[i], plain[i] / factor, 1e-15, 0.0);
        if (bands[i] == BAND_SMOOTH) assert_true(f[i] > plain[i] / factor && f[i] < plain[i]);
    }
    if (need_all_bands) {
        printf("llama3 hd=%d theta=%g L=%d: kept %d, smoothed %d, divided %d\n", hd, theta, L,
               count[BAND_KEPT], count[BAND_SMOOTH], count[BAND_DIVIDED]);
        assert_true(count[BAND_KEPT] > 0 && count[BAND_SMOOTH] > 0 && count[BAND_DIVIDED] > 0);
    }
}

static void test_rope_inv_freq_llama3(void **state)
{
    (void)state;
    int bands[64];
    /* hd 16, theta 1e4: wavelengths 6.3, 19.9, 62.8, 199, ...; with L = 64 and
     * factors 1 and 4 the bounds are 16 and 64: one kept, two smoothed, five divided */
    llama3_case(16, 10000.0, 64, 8.0, 1.0, 4.0, 1, bands);
    assert_int_equal(bands[0], BAND_KEPT);
    assert_int_equal(bands[1], BAND_SMOOTH);
    assert_int_equal(bands[2], BAND_SMOOTH);
    for (int i = 3; i < 8; i++) assert_int_equal(bands[i], BAND_DIVIDED);
    /* the smoothed value for index 1 by hand: rotations 64/19.86918 = 3.221070,
     * s = 2.221070/3 = 0.740357, f = 0.3162278 (0.740357 + 0.259643/8) = 0.2443846 */
    {
        double f[8];
        rope_params p = { .theta = 10000.0, .scaling = ROPE_SCALING_LLAMA3, .factor = 8.0,
                          .low_freq_factor = 1.0, .high_freq_factor = 4.0, .original_max_pos = 64 };
        rope_inv_freq(f, 16, &p);
        assert_close("llama3 hand value", 1, f[1], 0.2443846, 1e-6, 0.0);
    }
    /* other factors: bounds at wavelengths 2048/3 and 2048/1.5; index 9 (1117) is smoothed */
    llama3_case(32, 10000.0, 2048, 16.0, 1.5, 3.0, 1, bands);
    assert_int_equal(bands[8], BAND_KEPT);
    assert_int_equal(bands[9], BAND_SMOOTH);
    assert_int_equal(bands[10], BAND_DIVIDED);

    /* Llama 3.1's configuration: theta 5e5, factor 8, low 1, high 4, L 8192:
     * kept below wavelength 2048, divided above 8192 */
    llama3_case(128, 500000.0, 8192, 8.0, 1.0, 4.0, 1, bands);
    assert_int_equal(bands[0], BAND_KEPT);
    assert_int_equal(bands[28], BAND_KEPT);
    assert_int_equal(bands[29], BAND_SMOOTH);
    assert_int_equal(bands[34], BAND_SMOOTH);
    assert_int_equal(bands[35], BAND_DIVIDED);
    assert_int_equal(bands[63], BAND_DIVIDED);
    llama3_case(64, 500000.0, 8192, 8.0, 1.0, 4.0, 1, bands);
    assert_int_equal(bands[14], BAND_KEPT);
    assert_int_equal(bands[15], BAND_SMOOTH);
    assert_int_equal(bands[17], BAND_SMOOTH);
    assert_int_equal(bands[18], BAND_DIVIDED);
    /* Llama 3.2's factor 32 moves values, not bands */
    llama3_case(64, 500000.0, 8192, 32.0, 1.0, 4.0, 1, bands);
    assert_int_equal(bands[15], BAND_SMOOTH);
    assert_int_equal(bands[18], BAND_DIVIDED);
}

/* ------------------------------------------------------------------------
 * rope: tables and rotation */

static void test_rope_tables(void **state)
{
    (void)state;
    enum { HD = 8, NP = 40, P0 = 13 };
    double f[HD / 2];
    rope_params p = { .theta = 10000.0, .scaling = ROPE_SCALING_NONE };
    rope_inv_freq(f, HD, &p);
    float c[NP * HD / 2], s[NP * HD / 2], c0[(P0 + NP) * HD / 2], s0[(P0 + NP) * HD / 2];
    rope_tables(c, s, f, HD, P0, NP);
    for (int t = 0; t < NP; t++)
        for (int i = 0; i < HD / 2; i++) {
            double a = (double)(P0 + t) * inv_freq_plain(i, HD, 10000.0);
            size_t k = (size_t)t * HD / 2 + i;
            /* float rounding of cos and sin: 6e-8 absolute at most */
            assert_close("rope cos", k, c[k], cos(a), 0.0, 1e-7);
            assert_close("rope sin", k, s[k], sin(a), 0.0, 1e-7);
        }
    /* a table from pos0 = P0 is rows P0.. of the table from 0, exactly */
    rope_tables(c0, s0, f, HD, 0, P0 + NP);
    assert_memory_equal(c, c0 + P0 * HD / 2, sizeof c);
    assert_memory_equal(s, s0 + P0 * HD / 2, sizeof s);
}

/* rotate x (B,T,nh*hd, stride ldx) in double from the tables: the reference */
static void rope_ref(double *out, const float *x, int ldx, const float *c, const float *s,
                     int B, int T, int nh, int hd)
{
    int half = hd / 2;
    for (int r = 0; r < B * T; r++)
        for (int h = 0; h < nh; h++)
            for (int i = 0; i < half; i++) {
                const float *xh = x + (size_t)r * ldx + h * hd;
                double cc = c[(r % T) * half + i], ss = s[(r % T) * half + i];
                double *o = out + ((size_t)r * nh + h) * hd;
                o[i] = xh[i] * cc - xh[i + half] * ss;
                o[i + half] = xh[i + half] * cc + xh[i] * ss;
            }
}

typedef struct {
    float *out, *x, *c, *s, *R;
    int ldo, ldx, B, T, nh, hd;
} rope_ctx;

static double rope_loss(void *p)
{
    rope_ctx *k = p;
    rope_forward(k->out, k->ldo, k->x, k->ldx, k->c, k->s, k->B, k->T, k->nh, k->hd);
    /* R has the layout of out, including the padding columns (zero in out) */
    return dot_d(k->out, k->R, (size_t)k->B * k->T * k->ldo);
}

static void rope_case(int B, int T, int nh, int hd, int pad_x, int pad_o, int pos0, unsigned seed)
{
    int W = nh * hd, ldx = W + pad_x, ldo = W + pad_o, half = hd / 2;
    size_t nx = (size_t)B * T * ldx, no = (size_t)B * T * ldo;
    double f[64];
    rope_params p = { .theta = 10000.0, .scaling = ROPE_SCALING_NONE };
    rope_inv_freq(f, hd, &p);
    float *c = falloc((size_t)T * half), *s = falloc((size_t)T * half);
    rope_tables(c, s, f, hd, pos0, T);
    float *x = frand(nx, seed, 1.0f), *out = falloc(no), *R = frand(no, seed + 1, 1.0f);
    for (int r = 0; r < B * T; r++) /* the padding of out is never written: keep R 0 there */
        for (int j = W; j < ldo; j++) R[(size_t)r * ldo + j] = 0.0f;

    double *want = malloc((size_t)B * T * W * sizeof(double));
    assert_non_null(want);
    rope_forward(out, ldo, x, ldx, c, s, B, T, nh, hd);
    rope_ref(want, x, ldx, c, s, B, T, nh, hd);
    for (int r = 0; r < B * T; r++)
        for (int j = 0; j < W; j++)
            assert_close("rope out", (size_t)r * W + j, out[(size_t)r * ldo + j], want[(size_t)r * W + j],
                         FWD_RTOL, FWD_ATOL);
    /* the rotation keeps each (i, i + hd/2) pair's norm */
    for (int r = 0; r < B * T; r++)
        for (int h = 0; h < nh; h++)
            for (int i = 0; i < half; i++) {
                const float *xh = x + (size_t)r * ldx + h * hd, *oh = out + (size_t)r * ldo + h * hd;
                double n0 = hypot(xh[i], xh[i + half]), n1 = hypot(oh[i], oh[i + half]);
                assert_close("rope pair norm", (size_t)i, n1, n0, 1e-6, 1e-7);
            }

    /* in place (same stride) gives exactly the out-of-place result */
    float *xi = fcopy(x, nx), *oo = falloc(nx);
    rope_forward(oo, ldx, x, ldx, c, s, B, T, nh, hd);
    rope_forward(xi, ldx, xi, ldx, c, s, B, T, nh, hd);
    for (int r = 0; r < B * T; r++)
        assert_memory_equal(xi + (size_t)r * ldx, oo + (size_t)r * ldx, (size_t)W * sizeof(float));

    /* backward: R^T dout, against fd of the loss (linear in x) */
    float *dx = falloc(nx);
    rope_backward(dx, ldx, R, ldo, c, s, B, T, nh, hd);
    rope_ctx k = { out, x, c, s, R, ldo, ldx, B, T, nh, hd };
    char what[64];
    snprintf(what, sizeof what, "rope dx hd=%d nh=%d", hd, nh);
    assert_int_equal(gc_check(what, x, dx, nx, rope_loss, &k, FD_EPS, FD_RTOL, FD_ATOL, 0), 0);
    /* padding columns of dx are not touched */
    for (int r = 0; r < B * T; r++)
        for (int j = W; j < ldx; j++) assert_true(dx[(size_t)r * ldx + j] == 0.0f);
    float *dx2 = fcopy(dx, nx);
    rope_backward(dx2, ldx, R, ldo, c, s, B, T, nh, hd);
    assert_doubled("rope dx", dx, dx2, nx);
    /* backward undoes forward: R^T R x = x */
    float *back = falloc(nx);
    rope_forward(oo, ldx, x, ldx, c, s, B, T, nh, hd);
    rope_backward(back, ldx, oo, ldx, c, s, B, T, nh, hd);
    for (int r = 0; r < B * T; r++)
        for (int j = 0; j < W; j++)
            assert_close("rope R^T R x", (size_t)j, back[(size_t)r * ldx + j], x[(size_t)r * ldx + j], 1e-6, 1e-6);

    free(c); free(s); free(x); free(out); free(R); free(want); free(xi); free(oo);
    free(dx); free(dx2); free(back);
}

static void test_rope(void **state)
{
    (void)state;
    rope_case(2, 3, 3, 2, 0, 0, 0, 60);   /* hd = 2: one pair per head */
    rope_case(1, 5, 2, 6, 3, 1, 7, 70);   /* odd half, odd T, strided rows, pos0 > 0 */
    rope_case(3, 4, 1, 16, 5, 0, 100, 80);
}

/* q.k after rope depends only on the position difference */
static void test_rope_relative(void **state)
{
    (void)state;
    enum { HD = 16, NP = 520 };
    double f[HD / 2];
    rope_params p = { .theta = 10000.0, .scaling = ROPE_SCALING_NONE };
    rope_inv_freq(f, HD, &p);
    float *c = falloc(NP * HD / 2), *s = falloc(NP * HD / 2);
    rope_tables(c, s, f, HD, 0, NP);
    float q[HD], k[HD], rq[HD], rk[HD];
    gc_fill(q, HD, 90, 1.0f);
    gc_fill(k, HD, 91, 1.0f);
    /* rotate one vector at position m: a B = 1, T = 1 call on table row m */
    const int m[] = { 3, 10, 52, 500 }, d[] = { 0, 2, 7 };
    for (size_t a = 0; a < sizeof d / sizeof d[0]; a++) {
        double first = 0.0;
        for (size_t b = 0; b < sizeof m / sizeof m[0]; b++) {
            int pm = m[b] + d[a], pn = m[b];
            rope_forward(rq, HD, q, HD, c + pm * HD / 2, s + pm * HD / 2, 1, 1, 1, HD);
            rope_forward(rk, HD, k, HD, c + pn * HD / 2, s + pn * HD / 2, 1, 1, 1, HD);
            double qk = dot_d(rq, rk, HD);
            if (b == 0) first = qk;
            /* float rotation of O(1) vectors: ~1e-6 */
            else assert_close("rope q.k at fixed distance", (size_t)m[b], qk, first, 0.0, 1e-5);
        }
    }
    /* and it does depend on the difference */
    rope_forward(rq, HD, q, HD, c + 5 * HD / 2, s + 5 * HD / 2, 1, 1, 1, HD);
    rope_forward(rk, HD, k, HD, c, s, 1, 1, 1, HD);
    double d5 = dot_d(rq, rk, HD);
    rope_forward(rq, HD, q, HD, c, s, 1, 1, 1, HD);
    assert_true(fabs(d5 - dot_d(rq, rk, HD)) > 1e-3);
    free(c); free(s);
}

/* past the OpenMP threshold (B*T*nh*hd >= 8192), against the double reference */
static void test_rope_large(void **state)
{
    (void)state;
    enum { B = 2, T = 33, NH = 4, HD = 32, W = NH * HD };
    size_t n = (size_t)B * T * W;
    double f[HD / 2];
    rope_params p = { .theta = 500000.0, .scaling = ROPE_SCALING_LLAMA3, .factor = 8.0,
                      .low_freq_factor = 1.0, .high_freq_factor = 4.0, .original_max_pos = 8192 };
    rope_inv_freq(f, HD, &p);
    float *c = falloc(T * HD / 2), *s = falloc(T * HD / 2);
    rope_tables(c, s, f, HD, 4000, T);
    float *x = frand(n, 95, 1.0f), *out = falloc(n), *g = frand(n, 96, 1.0f), *dx = falloc(n);
    double *want = malloc(n * sizeof(double));
    assert_non_null(want);
    rope_forward(out, W, x, W, c, s, B, T, NH, HD);
    rope_ref(want, x, W, c, s, B, T, NH, HD);
    for (size_t i = 0; i < n; i++) assert_close("rope large out", i, out[i], want[i], 1e-5, 1e-5);
    /* R^T g: rotating by the negated sines */
    float *sn = falloc(T * HD / 2);
    for (int i = 0; i < T * HD / 2; i++) sn[i] = -s[i];
    rope_backward(dx, W, g, W, c, s, B, T, NH, HD);
    rope_ref(want, g, W, c, sn, B, T, NH, HD);
    for (size_t i = 0; i < n; i++) assert_close("rope large dx", i, dx[i], want[i], 1e-5, 1e-5);
    free(c); free(s); free(sn); free(x); free(out); free(g); free(dx); free(want);
}

/* ------------------------------------------------------------------------
 * SwiGLU */

/* transformers' form: silu(z) = z / (1 + exp(-z)), in double (exp(100) fits) */
static double silu_d(double z) { return z / (1.0 + exp(-z)); }
static double dsilu_d(double z)
{
    double sg = 1.0 / (1.0 + exp(-z));
    return sg + z * sg * (1.0 - sg);
}

typedef struct {
    float *out, *g, *u, *R;
    size_t n;
} sw_ctx;

static double sw_loss(void *p)
{
    sw_ctx *c = p;
    swiglu_forward(c->out, c->g, c->u, c->n);
    return dot_d(c->out, c->R, c->n);
}

static void test_swiglu(void **state)
{
    (void)state;
    enum { N = 37 };
    float *g = frand(N, 100, 4.0f), *u = frand(N, 101, 1.0f), *R = frand(N, 102, 1.0f), *out = falloc(N);
    sw_ctx ctx = { out, g, u, R, N };
    swiglu_forward(out, g, u, N);
    for (size_t i = 0; i < N; i++) assert_close("swiglu out", i, out[i], silu_d(g[i]) * u[i], FWD_RTOL, FWD_ATOL);

    float *dg = falloc(N), *du = falloc(N);
    swiglu_backward(dg, du, R, g, u, N);
    assert_int_equal(gc_check("swiglu dg", g, dg, N, sw_loss, &ctx, FD_EPS, FD_RTOL, FD_ATOL, 0), 0);
    assert_int_equal(gc_check("swiglu du", u, du, N, sw_loss, &ctx, FD_EPS, FD_RTOL, FD_ATOL, 0), 0);

    float *dg2 = fcopy(dg, N), *du2 = fcopy(du, N);
    swiglu_backward(dg2, du2, R, g, u, N);
    assert_doubled("swiglu dg", dg, dg2, N);
    assert_doubled("swiglu du", du, du2, N);
    float *dga = falloc(N), *dua = falloc(N);
    swiglu_backward(dga, NULL, R, g, u, N);
    swiglu_backward(NULL, dua, R, g, u, N);
    assert_memory_equal(dga, dg, N * sizeof(float));
    assert_memory_equal(dua, du, N * sizeof(float));
    swiglu_backward(NULL, NULL, R, g, u, N);

    /* out may alias g or u (out itself still holds gc_check's last probe) */
    swiglu_forward(out, g, u, N);
    float *ga = fcopy(g, N), *ua = fcopy(u, N);
    swiglu_forward(ga, ga, u, N);
    swiglu_forward(ua, g, ua, N);
    assert_memory_equal(ga, out, N * sizeof(float));
    assert_memory_equal(ua, out, N * sizeof(float));

    free(g); free(u); free(R); free(out); free(dg); free(du); free(dg2); free(du2);
    free(dga); free(dua); free(ga); free(ua);
}

/* saturated gates: no overflow, no NaN, values of the formula */
static void test_swiglu_extremes(void **state)
{
    (void)state;
    enum { N = 7 };
    const float z[N] = { -100, -20, -1, 0, 1, 20, 100 };
    const float u[N] = { 0.5f, -2, 3, 1, -1, 0.25f, 2 };
    const float one[N] = { 1, 1, 1, 1, 1, 1, 1 };
    float out[N], dg[N] = { 0 }, du[N] = { 0 };
    swiglu_forward(out, z, u, N);
    swiglu_backward(dg, du, one, z, u, N);
    assert_finite("swiglu out", out, N);
    assert_finite("swiglu dg", dg, N);
    assert_finite("swiglu du", du, N);
    for (size_t i = 0; i < N; i++) {
        /* relative 2e-6; absolute 1e-37 covers silu(-100) = -3.7e-42, which is
         * subnormal in float */
        assert_close("swiglu(z) out", i, out[i], silu_d(z[i]) * u[i], FWD_RTOL, 1e-37);
        assert_close("swiglu(z) du", i, du[i], silu_d(z[i]), FWD_RTOL, 1e-37);
        assert_close("swiglu(z) dg", i, dg[i], dsilu_d(z[i]) * u[i], FWD_RTOL, 1e-37);
    }
    /* exact values where the formula is exact */
    assert_true(out[3] == 0.0f);
    assert_true(dg[3] == 0.5f * u[3]);
    assert_true(out[6] == 100.0f * u[6]);
    assert_true(du[6] == 100.0f && dg[6] == u[6]);
    assert_true(fabsf(out[0]) < 1e-37f && fabsf(dg[0]) < 1e-37f);
}

/* past the OpenMP threshold, against the double formula */
static void test_swiglu_large(void **state)
{
    (void)state;
    enum { N = 10007 };
    float *g = frand(N, 110, 12.0f), *u = frand(N, 111, 1.0f), *R = frand(N, 112, 1.0f);
    float *out = falloc(N), *dg = falloc(N), *du = falloc(N);
    swiglu_forward(out, g, u, N);
    swiglu_backward(dg, du, R, g, u, N);
    for (size_t i = 0; i < N; i++) {
        assert_close("swiglu large out", i, out[i], silu_d(g[i]) * u[i], 1e-5, 1e-6);
        assert_close("swiglu large dg", i, dg[i], (double)R[i] * u[i] * dsilu_d(g[i]), 1e-5, 1e-6);
        assert_close("swiglu large du", i, du[i], (double)R[i] * silu_d(g[i]), 1e-5, 1e-6);
    }
    free(g); free(u); free(R); free(out); free(dg); free(du);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_rmsnorm),
        cmocka_unit_test(test_rmsnorm_extremes),
        cmocka_unit_test(test_rmsnorm_large),
        cmocka_unit_test(test_rope_inv_freq_none_linear),
        cmocka_unit_test(test_rope_inv_freq_llama3),
        cmocka_unit_test(test_rope_tables),
        cmocka_unit_test(test_rope),
        cmocka_unit_test(test_rope_relative),
        cmocka_unit_test(test_rope_large),
        cmocka_unit_test(test_swiglu),
        cmocka_unit_test(test_swiglu_extremes),
        cmocka_unit_test(test_swiglu_large),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
