/* peftref core: RMSNorm, rotary position embeddings and SwiGLU as
 * forward/backward pairs (see llama_kernels.h).
 *
 * Per-row and elementwise loops use OpenMP only when the work is large
 * enough to pay for waking the team, with the same threshold as kernels.c. */
#include "llama_kernels.h"

#include <math.h>

/* Below this many elements a loop runs on the calling thread only. */
#define PAR_MIN 8192
/* Column block for the reduction over rows (dw): each block is owned by
 * one thread, so no atomics and no per-thread buffers. */
#define COL_BLOCK 64

/* ------------------------------------------------------------------------
 * RMSNorm.  y = xhat w with xhat = x r, r = (m + eps)^(-1/2), m = mean x^2.
 * dr/dx_j = -r^3 x_j / C, so with g = dout w:
 *   dx_j = r g_j - x_j r^3 / C sum_k g_k x_k = r (g_j - xhat_j mean_k(g_k xhat_k)). */

void rmsnorm_forward(float *out, float *rstd, const float *x, const float *w, int N, int C, float eps)
{
#pragma omp parallel for schedule(static) if ((long)N * C >= PAR_MIN)
    for (int i = 0; i < N; i++) {
        const float *xi = x + (size_t)i * C;
        double ss = 0.0;
#pragma omp simd reduction(+ : ss)
        for (int c = 0; c < C; c++) ss += (double)xi[c] * (double)xi[c];
        float rs = (float)(1.0 / sqrt(ss / C + (double)eps));
        float *o = out + (size_t)i * C;
        /* transformers multiplies by rstd first, then by the weight */
#pragma omp simd
        for (int c = 0; c < C; c++) o[c] = (xi[c] * rs) * w[c];
        if (rstd) rstd[i] = rs;
    }
}

void rmsnorm_backward(float *dx, float *dw, const float *dout, const float *x, const float *w,
                      const float *rstd, int N, int C)
{
    int par = (long)N * C >= PAR_MIN;
    if (dx) {
#pragma omp parallel for schedule(static) if (par)
        for (int i = 0; i < N; i++) {
            const float *xi = x + (size_t)i * C;
            const float *g = dout + (size_t)i * C;
            float rs = rstd[i];
            double sgx = 0.0;
#pragma omp simd reduction(+ : sgx)
            for (int c = 0; c < C; c++) sgx += (double)(g[c] * w[c]) * (double)(xi[c] * rs);
            float mgx = (float)(sgx / C);
            float *d = dx + (size_t)i * C;
#pragma omp simd
            for (int c = 0; c < C; c++) d[c] += rs * (g[c] * w[c] - (xi[c] * rs) * mgx);
        }
    }
    if (dw) {
        int nblk = (C + COL_BLOCK - 1) / COL_BLOCK;
#pragma omp parallel for schedule(static) if (par && nblk > 1)
        for (int blk = 0; blk < nblk; blk++) {
            int c0 = blk * COL_BLOCK, nc = C - c0 < COL_BLOCK ? C - c0 : COL_BLOCK;
            double aw[COL_BLOCK];
            for (int c = 0; c < nc; c++) aw[c] = 0.0;
            for (int i = 0; i < N; i++) {
                const float *xi = x + (size_t)i * C + c0;
                const float *g = dout + (size_t)i * C + c0;
                float rs = rstd[i];
#pragma omp simd
                for (int c = 0; c < nc; c++) aw[c] += (double)(g[c] * (xi[c] * rs));
            }
            for (int c = 0; c < nc; c++) dw[c0 + c] += (float)aw[c];
        }
    }
}

/* ------------------------------------------------------------------------
 * rotary position embeddings */

void rope_inv_freq(double *inv_freq, int hd, const rope_params *p)
{
    int half = hd / 2;
    for (int i = 0; i < half; i++) inv_freq[i] = pow(p->theta, -(2.0 * i) / hd);
    if (p->scaling == ROPE_SCALING_LINEAR) {
        /* position interpolation: positions / factor, folded into the frequencies */
        for (int i = 0; i < half; i++) inv_freq[i] /= p->factor;
    } else if (p->scaling == ROPE_SCALING_LLAMA3) {
        /* Llama 3.1: wavelengths shorter than L/high are kept, longer than
         * L/low are divided by factor, and in between the frequency moves
         * linearly in L/wavelen from the divided to the kept value. */
        const double two_pi = 6.283185307179586476925286766559;
        double L = (double)p->original_max_pos;
        double lo = p->low_freq_factor, hi = p->high_freq_factor;
        double high_freq_wavelen = L / hi, low_freq_wavelen = L / lo;
        for (int i = 0; i < half; i++) {
            double f = inv_freq[i], wavelen = two_pi / f;
            if (wavelen < high_freq_wavelen) continue;
            if (wavelen > low_freq_wavelen) {
                inv_freq[i] = f / p->factor;
            } else {
                double s = (L / wavelen - lo) / (hi - lo);
                inv_freq[i] = (1.0 - s) * f / p->factor + s * f;
            }
        }
    }
}

void rope_tables(float *cos_t, float *sin_t, const double *inv_freq, int hd, int pos0, int n_pos)
{
    int half = hd / 2;
    for (int t = 0; t < n_pos; t++) {
        double pos = (double)pos0 + t;
        float *c = cos_t + (size_t)t * half, *s = sin_t + (size_t)t * half;
        for (int i = 0; i < half; i++) {
            double a = pos * inv_freq[i];
            c[i] = (float)cos(a);
            s[i] = (float)sin(a);
        }
    }
}

void rope_forward(float *out, int ldo, const float *x, int ldx, const float *cos_t, const float *sin_t,
                  int B, int T, int nh, int hd)
{
    long N = (long)B * T;
    int half = hd / 2;
#pragma omp parallel for schedule(static) if (N * nh * hd >= PAR_MIN)
    for (long r = 0; r < N; r++) {
        const float *c = cos_t + (size_t)(r % T) * half, *s = sin_t + (size_t)(r % T) * half;
        for (int h = 0; h < nh; h++) {
            const float *xh = x + (size_t)r * ldx + (size_t)h * hd;
            float *oh = out + (size_t)r * ldo + (size_t)h * hd;
            /* both halves are read before either is written: in place is safe */
#pragma omp simd
            for (int i = 0; i < half; i++) {
                float x1 = xh[i], x2 = xh[i + half];
                oh[i] = x1 * c[i] - x2 * s[i];
                oh[i + half] = x2 * c[i] + x1 * s[i];
            }
        }
    }
}

void rope_backward(float *dx, int lddx, const float *dout, int lddo, const float *cos_t, const float *sin_t,
                   int B, int T, int nh, int hd)
{
    long N = (long)B * T;
    int half = hd / 2;
#pragma omp parallel for schedule(static) if (N * nh * hd >= PAR_MIN)
    for (long r = 0; r < N; r++) {
        const float *c = cos_t + (size_t)(r % T) * half, *s = sin_t + (size_t)(r % T) * half;
        for (int h = 0; h < nh; h++) {
            const float *gh = dout + (size_t)r * lddo + (size_t)h * hd;
            float *dh = dx + (size_t)r * lddx + (size_t)h * hd;
#pragma omp simd
            for (int i = 0; i < half; i++) {
                float d1 = gh[i], d2 = gh[i + half];
                dh[i] += d1 * c[i] + d2 * s[i];
                dh[i + half] += d2 * c[i] - d1 * s[i];
            }
        }
    }
}

/* ------------------------------------------------------------------------
 * SwiGLU.  With e = exp(-|z|) <= 1 the logistic and its complement are
 *   z >= 0: s = 1/(1+e), 1-s = e/(1+e);   z < 0: s = e/(1+e), 1-s = 1/(1+e),
 * neither of which overflows or cancels; for z -> -inf, e underflows to 0
 * and silu, silu' go to (-)0 without NaN. */

static inline void sigmoid_pair(float z, float *s, float *one_minus_s)
{
    float e = expf(-fabsf(z));
    float inv = 1.0f / (1.0f + e);
    *s = z >= 0.0f ? inv : e * inv;
    *one_minus_s = z >= 0.0f ? e * inv : inv;
}

void swiglu_forward(float *out, const float *g, const float *u, size_t n)
{
#pragma omp parallel for schedule(static) if (n >= PAR_MIN)
    for (size_t i = 0; i < n; i++) {
        float s, sc;
        sigmoid_pair(g[i], &s, &sc);
        out[i] = (g[i] * s) * u[i];
    }
}

void swiglu_backward(float *dg, float *du, const float *dout, const float *g, const float *u, size_t n)
{
    if (!dg && !du) return;
#pragma omp parallel for schedule(static) if (n >= PAR_MIN)
    for (size_t i = 0; i < n; i++) {
        float s, sc, z = g[i];
        sigmoid_pair(z, &s, &sc);
        if (dg) dg[i] += dout[i] * u[i] * (s * (1.0f + z * sc));
        if (du) du[i] += dout[i] * (z * s);
    }
}
