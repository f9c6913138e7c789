/* peftref core: the standard components as forward/backward pairs.
 *
 * Matrix products go through OpenBLAS (cblas_sgemm), which runs its own
 * threads; BLAS is therefore never called from inside an OpenMP parallel
 * region.  Elementwise and per-row loops use OpenMP, but only when the
 * work is large enough to pay for waking the team (PAR_MIN elements).
 * Hot loops carry `omp simd` so that they vectorise at -O2.  exp() is
 * computed by a polynomial (exp_poly below) so that softmax,
 * cross-entropy and GELU vectorise too. */
#include "kernels.h"

#include <cblas.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Below this many elements a loop runs on the calling thread only. */
#define PAR_MIN 8192
/* Column block for the reductions over rows (dw, db): each block is
 * owned by one thread, so no atomics and no per-thread buffers. */
#define COL_BLOCK 64
/* Query rows per attention block: a block of queries only needs keys up to
 * its last row, which skips about half of the causal score matrix. */
#define ATT_BLOCK 128

/* ------------------------------------------------------------------------
 * exp(y) for y in [-87, 88], the range where 2^n is a normal float that
 * can be built directly in the exponent bits.
 * y = n ln2 + r with |r| <= ln2/2 (Cody-Waite split of ln2); exp(r) by its
 * degree-7 Taylor polynomial (truncation error below 6e-9 relative).
 * Measured relative error over the range: 1.1e-7 (glibc expf: 6e-8).
 *
 * Callers first clamp the argument with exp_arg() in a loop of its own:
 * with -ftrapping-math (the default) GCC will not vectorise a loop where
 * the clamp's select sits in front of the polynomial, but it vectorises
 * both loops when they are separate.  The clamp is harmless where it is
 * used: softmax arguments are <= 0 and exp(-87) = 1.6e-38 is negligible
 * next to a sum >= 1; the logistic in GELU has saturated long before. */
#define EXP_LO (-87.0f)
#define EXP_HI 88.0f

static inline float exp_arg(float y)
{
    y = y < EXP_LO ? EXP_LO : y;
    return y > EXP_HI ? EXP_HI : y;
}

static inline float exp_poly(float y)
{
    /* round-to-nearest of y*log2(e) by the 1.5*2^23 trick */
    const float shifter = 12582912.0f;
    float nf = (y * 1.44269504088896341f + shifter) - shifter;
    float r = y - nf * 0.693145751953125f;    /* ln2 high part: exact product */
    r = r - nf * 1.42860682030941723e-6f;     /* ln2 low part */
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    union { uint32_t u; float f; } s;
    s.u = (uint32_t)((int32_t)nf + 127) << 23;
    return p * s.f;
}

/* s[j] = exp(s[j] - mx) for j < n; returns the sum (in double). */
static double exp_shifted_inplace(float *s, int n, float mx)
{
#pragma omp simd
    for (int j = 0; j < n; j++) s[j] = exp_arg(s[j] - mx);
    double sum = 0.0;
#pragma omp simd reduction(+ : sum)
    for (int j = 0; j < n; j++) {
        float e = exp_poly(s[j]);
        s[j] = e;
        sum += e;
    }
    return sum;
}

/* ------------------------------------------------------------------------
 * encoder */

void encoder_forward(float *out, const int *tokens, const float *wte, const float *wpe,
                     int B, int T, int C)
{
    long N = (long)B * T;
#pragma omp parallel for schedule(static) if (N * C >= PAR_MIN)
    for (long i = 0; i < N; i++) {
        int t = (int)(i % T);
        float *o = out + i * C;
        const float *e = wte + (size_t)tokens[i] * C;
        if (wpe) {
            const float *p = wpe + (size_t)t * C;
#pragma omp simd
            for (int c = 0; c < C; c++) o[c] = e[c] + p[c];
        } else {
            memcpy(o, e, (size_t)C * sizeof(float));
        }
    }
}

void encoder_backward(float *dwte, float *dwpe, const float *dout, const int *tokens,
                      int B, int T, int C)
{
    long N = (long)B * T;
    int par = N * C >= PAR_MIN;
    if (dwpe) {
        /* position t gathers rows (b, t) for every b: rows of dwpe are disjoint */
#pragma omp parallel for schedule(static) if (par)
        for (int t = 0; t < T; t++) {
            float *d = dwpe + (size_t)t * C;
            for (int b = 0; b < B; b++) {
                const float *g = dout + ((size_t)b * T + t) * C;
#pragma omp simd
                for (int c = 0; c < C; c++) d[c] += g[c];
            }
        }
    }
    if (dwte) {
        /* a token may repeat, so split the columns instead of the rows */
        int nblk = (C + COL_BLOCK - 1) / COL_BLOCK;
#pragma omp parallel for schedule(static) if (par && nblk > 1)
        for (int blk = 0; blk < nblk; blk++) {
            int c0 = blk * COL_BLOCK, c1 = c0 + COL_BLOCK < C ? c0 + COL_BLOCK : C;
            for (long i = 0; i < N; i++) {
                float *d = dwte + (size_t)tokens[i] * C;
                const float *g = dout + i * C;
#pragma omp simd
                for (int c = c0; c < c1; c++) d[c] += g[c];
            }
        }
    }
}

/* ------------------------------------------------------------------------
 * layernorm: out = (x - mean) * rstd * w + b, rstd = 1/sqrt(var + eps),
 * var the biased variance (Ba et al. 2016).  Two passes, sums in double. */

void layernorm_forward(float *out, float *mean, float *rstd, const float *inp,
                       const float *w, const float *b, int N, int C, float eps)
{
#pragma omp parallel for schedule(static) if ((long)N * C >= PAR_MIN)
    for (int i = 0; i < N; i++) {
        const float *x = inp + (size_t)i * C;
        double s = 0.0;
#pragma omp simd reduction(+ : s)
        for (int c = 0; c < C; c++) s += x[c];
        float m = (float)(s / C);
        double v = 0.0;
#pragma omp simd reduction(+ : v)
        for (int c = 0; c < C; c++) {
            float d = x[c] - m;
            v += (double)(d * d);
        }
        float rs = (float)(1.0 / sqrt(v / C + (double)eps));
        float *o = out + (size_t)i * C;
        if (b) {
#pragma omp simd
            for (int c = 0; c < C; c++) o[c] = (x[c] - m) * rs * w[c] + b[c];
        } else {
#pragma omp simd
            for (int c = 0; c < C; c++) o[c] = (x[c] - m) * rs * w[c];
        }
        mean[i] = m;
        rstd[i] = rs;
    }
}

/* With xhat = (x - mean) rstd and g = dout * w:
 *   dx = rstd (g - mean(g) - xhat mean(g xhat)),  dw += dout xhat,  db += dout. */
void layernorm_backward(float *dinp, float *dw, float *db, const float *dout,
                        const float *inp, const float *w, const float *mean,
                        const float *rstd, int N, int C)
{
    int par = (long)N * C >= PAR_MIN;
    if (dinp) {
#pragma omp parallel for schedule(static) if (par)
        for (int i = 0; i < N; i++) {
            const float *x = inp + (size_t)i * C;
            const float *g = dout + (size_t)i * C;
            float m = mean[i], rs = rstd[i];
            double sg = 0.0, sgx = 0.0;
#pragma omp simd reduction(+ : sg, sgx)
            for (int c = 0; c < C; c++) {
                float gw = g[c] * w[c];
                sg += gw;
                sgx += gw * ((x[c] - m) * rs);
            }
            float mg = (float)(sg / C), mgx = (float)(sgx / C);
            float *d = dinp + (size_t)i * C;
#pragma omp simd
            for (int c = 0; c < C; c++) {
                float xh = (x[c] - m) * rs;
                d[c] += rs * (g[c] * w[c] - mg - xh * mgx);
            }
        }
    }
    if (dw || db) {
        int nblk = (C + COL_BLOCK - 1) / COL_BLOCK;
#pragma omp parallel for schedule(static) if (par && nblk > 1)
        for (int blk = 0; blk < nblk; blk++) {
            int c0 = blk * COL_BLOCK, nc = C - c0 < COL_BLOCK ? C - c0 : COL_BLOCK;
            double aw[COL_BLOCK], ab[COL_BLOCK];
            for (int c = 0; c < nc; c++) aw[c] = ab[c] = 0.0;
            for (int i = 0; i < N; i++) {
                const float *x = inp + (size_t)i * C + c0;
                const float *g = dout + (size_t)i * C + c0;
                float m = mean[i], rs = rstd[i];
#pragma omp simd
                for (int c = 0; c < nc; c++) {
                    aw[c] += g[c] * ((x[c] - m) * rs);
                    ab[c] += g[c];
                }
            }
            if (dw)
                for (int c = 0; c < nc; c++) dw[c0 + c] += (float)aw[c];
            if (db)
                for (int c = 0; c < nc; c++) db[c0 + c] += (float)ab[c];
        }
    }
}

/* ------------------------------------------------------------------------
 * matmul */

void matmul_forward(float *out, int ldo, const float *inp, int ldi, const float *w,
                    int w_in_out, const float *b, int N, int C, int OC)
{
    if (N <= 0 || OC <= 0) return;
    if (b) {
        /* out starts as the bias; sgemm then accumulates with beta = 1 */
#pragma omp parallel for schedule(static) if ((long)N * OC >= PAR_MIN)
        for (int i = 0; i < N; i++) memcpy(out + (size_t)i * ldo, b, (size_t)OC * sizeof(float));
    } else if (C <= 0) {
        for (int i = 0; i < N; i++) memset(out + (size_t)i * ldo, 0, (size_t)OC * sizeof(float));
    }
    if (C <= 0) return;
    if (w_in_out)
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, N, OC, C, 1.0f, inp, ldi,
                    w, OC, b ? 1.0f : 0.0f, out, ldo);
    else
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, N, OC, C, 1.0f, inp, ldi,
                    w, C, b ? 1.0f : 0.0f, out, ldo);
}

void matmul_backward(float *dinp, int lddi, float *dw, float *db, const float *dout, int lddo,
                     const float *inp, int ldi, const float *w, int w_in_out,
                     int N, int C, int OC)
{
    if (N <= 0 || OC <= 0) return;
    if (dinp && C > 0) {
        if (w_in_out) /* W [C,OC]: dinp += dout W^T */
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, N, C, OC, 1.0f, dout, lddo,
                        w, OC, 1.0f, dinp, lddi);
        else /* W [OC,C]: dinp += dout W */
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, N, C, OC, 1.0f, dout, lddo,
                        w, C, 1.0f, dinp, lddi);
    }
    if (dw && C > 0) {
        if (w_in_out) /* dW [C,OC] += inp^T dout */
            cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, C, OC, N, 1.0f, inp, ldi,
                        dout, lddo, 1.0f, dw, OC);
        else /* dW [OC,C] += dout^T inp */
            cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, OC, C, N, 1.0f, dout, lddo,
                        inp, ldi, 1.0f, dw, C);
    }
    if (db) {
        int nblk = (OC + COL_BLOCK - 1) / COL_BLOCK;
#pragma omp parallel for schedule(static) if ((long)N * OC >= PAR_MIN && nblk > 1)
        for (int blk = 0; blk < nblk; blk++) {
            int c0 = blk * COL_BLOCK, nc = OC - c0 < COL_BLOCK ? OC - c0 : COL_BLOCK;
            double acc[COL_BLOCK];
            for (int c = 0; c < nc; c++) acc[c] = 0.0;
            for (int i = 0; i < N; i++) {
                const float *g = dout + (size_t)i * lddo + c0;
#pragma omp simd
                for (int c = 0; c < nc; c++) acc[c] += g[c];
            }
            for (int c = 0; c < nc; c++) db[c0 + c] += (float)acc[c];
        }
    }
}

/* ------------------------------------------------------------------------
 * GELU, tanh approximation (Hendrycks & Gimpel 2016; GPT-2's gelu_new):
 *   gelu(x) = x/2 (1 + tanh u),  u = sqrt(2/pi) (x + 0.044715 x^3).
 * Since (1 + tanh u)/2 = sigma(2u), the logistic, gelu(x) = x sigma(2u)
 * with sigma(2u) = 1/(1 + E), E = exp(-2u); no cancellation for large
 * negative x.  gelu'(x) = sigma + x sigma (1 - sigma) 2 u'(x), and
 * sigma (1 - sigma) = sigma * (E sigma), which never overflows. */

#define GELU_K 0.7978845608028654f /* sqrt(2/pi) */
#define GELU_A 0.044715f
/* elements per chunk: the clamped exp arguments of one chunk live on the stack */
#define GELU_CHUNK 512

void gelu_forward(float *out, const float *inp, size_t n)
{
    size_t nchunk = (n + GELU_CHUNK - 1) / GELU_CHUNK;
#pragma omp parallel for schedule(static) if (n >= PAR_MIN)
    for (size_t ci = 0; ci < nchunk; ci++) {
        size_t i0 = ci * GELU_CHUNK, m = n - i0 < GELU_CHUNK ? n - i0 : GELU_CHUNK;
        const float *x = inp + i0;
        float *o = out + i0;
        float y[GELU_CHUNK];
#pragma omp simd
        for (size_t i = 0; i < m; i++)
            y[i] = exp_arg(-2.0f * GELU_K * (x[i] + GELU_A * x[i] * x[i] * x[i]));
#pragma omp simd
        for (size_t i = 0; i < m; i++) o[i] = x[i] / (1.0f + exp_poly(y[i]));
    }
}

void gelu_backward(float *dinp, const float *inp, const float *dout, size_t n)
{
    size_t nchunk = (n + GELU_CHUNK - 1) / GELU_CHUNK;
#pragma omp parallel for schedule(static) if (n >= PAR_MIN)
    for (size_t ci = 0; ci < nchunk; ci++) {
        size_t i0 = ci * GELU_CHUNK, m = n - i0 < GELU_CHUNK ? n - i0 : GELU_CHUNK;
        const float *x = inp + i0, *g = dout + i0;
        float *d = dinp + i0;
        float y[GELU_CHUNK];
#pragma omp simd
        for (size_t i = 0; i < m; i++)
            y[i] = exp_arg(-2.0f * GELU_K * (x[i] + GELU_A * x[i] * x[i] * x[i]));
#pragma omp simd
        for (size_t i = 0; i < m; i++) {
            float E = exp_poly(y[i]);
            float sg = 1.0f / (1.0f + E);
            float du2 = 2.0f * GELU_K * (1.0f + 3.0f * GELU_A * x[i] * x[i]);
            d[i] += (sg + x[i] * sg * (E * sg) * du2) * g[i];
        }
    }
}

/* ------------------------------------------------------------------------
 * residual */

void residual_forward(float *out, const float *a, const float *b, size_t n)
{
#pragma omp parallel for simd schedule(static) if (n >= 4 * PAR_MIN)
    for (size_t i = 0; i < n; i++) out[i] = a[i] + b[i];
}

void residual_backward(float *da, float *db, const float *dout, size_t n)
{
    if (da) {
#pragma omp parallel for simd schedule(static) if (n >= 4 * PAR_MIN)
        for (size_t i = 0; i < n; i++) da[i] += dout[i];
    }
    if (db) {
#pragma omp parallel for simd schedule(static) if (n >= 4 * PAR_MIN)
        for (size_t i = 0; i < n; i++) db[i] += dout[i];
    }
}

/* ------------------------------------------------------------------------
 * attention (Vaswani et al. 2017), causal, with grouped-query heads
 * (Ainslie et al. 2023) and optional prefix keys/values (Li & Liang 2021).
 *
 * Per (b, h) the keys are the P prefix rows followed by the T causal rows;
 * score row t of the (T, P+T) matrix sees columns 0 .. P+t.  Queries are
 * taken in blocks of ATT_BLOCK rows [r0, r1); such a block needs the
 * first P + r1 columns only, so every product below is restricted to them.
 * Each block is one sgemm for the prefix part and one for the causal part.
 *
 * The row softmax between the products runs on the calling thread, on
 * purpose: an OpenMP region between two sgemm calls leaves the OpenMP
 * workers spinning (libgomp's default wait policy) while OpenBLAS's
 * threads need the same cores.  On 2 cores at GPT-2 small shape (B=2,
 * T=1024, 12 heads) that made a forward pass take 0.3-3 s instead of
 * 70 ms; the serial softmax costs a few percent. */

/* PEFTREF_ATTN_FULL=1 (read once, at the first attention call) gives every
 * query block all T key columns, the masked ones computed and then zeroed
 * by the softmax: the full (T, P+T) score matrix, as attention computed it
 * before the causal skip.  The results agree with the causal path up to the
 * order of the sums in the products (bench_train's before/after row). */
static int att_full = -1;

void attention_set_full_scores(int on)
{
    att_full = on ? 1 : 0;
}

/* key columns (after the prefix) a block of query rows ending at r1 reads */
static int att_key_cols(int r1, int T)
{
    if (att_full < 0) {
        const char *e = getenv("PEFTREF_ATTN_FULL");
        att_full = e && *e && strcmp(e, "0") != 0;
    }
    return att_full ? T : r1;
}

/* Row-wise softmax of score rows r0..r1 (S holds row r0, row stride ld)
 * over the visible columns 0..P+t; columns P+t+1 .. ncols-1 become 0. */
static void att_softmax_rows(float *S, int ld, int r0, int r1, int P, int ncols)
{
    for (int t = r0; t < r1; t++) {
        float *s = S + (size_t)(t - r0) * ld;
        int nv = P + t + 1; /* visible columns */
        float mx = -INFINITY;
#pragma omp simd reduction(max : mx)
        for (int j = 0; j < nv; j++) mx = s[j] > mx ? s[j] : mx;
        double sum = exp_shifted_inplace(s, nv, mx);
        float inv = (float)(1.0 / sum);
#pragma omp simd
        for (int j = 0; j < nv; j++) s[j] *= inv;
        for (int j = nv; j < ncols; j++) s[j] = 0.0f;
    }
}

void attention_forward(float *out, float *att,
                       const float *q, int ldq, const float *k, int ldk,
                       const float *v, int ldv, const float *pk, const float *pv, int P,
                       int B, int T, int H, int Hkv, int hd)
{
    if (B <= 0 || T <= 0 || H <= 0 || Hkv <= 0 || H % Hkv || hd <= 0) return;
    if (P < 0) P = 0;
    int grp = H / Hkv;
    int PT = P + T, ldo = H * hd;
    float scale = (float)(1.0 / sqrt((double)hd));
    for (int b = 0; b < B; b++) {
        for (int h = 0; h < H; h++) {
            int g = h / grp;
            const float *qb = q + (size_t)b * T * ldq + (size_t)h * hd;
            const float *kb = k + (size_t)b * T * ldk + (size_t)g * hd;
            const float *vb = v + (size_t)b * T * ldv + (size_t)g * hd;
            const float *pkg = P ? pk + (size_t)g * P * hd : NULL;
            const float *pvg = P ? pv + (size_t)g * P * hd : NULL;
            float *ob = out + (size_t)b * T * ldo + (size_t)h * hd;
            float *ab = att + ((size_t)b * H + h) * T * PT;
            for (int r0 = 0; r0 < T; r0 += ATT_BLOCK) {
                int r1 = r0 + ATT_BLOCK < T ? r0 + ATT_BLOCK : T;
                int m = r1 - r0, kc = att_key_cols(r1, T);
                float *S = ab + (size_t)r0 * PT;
                const float *qr = qb + (size_t)r0 * ldq;
                float *orow = ob + (size_t)r0 * ldo;
                /* S = scale q [pk; k]^T */
                if (P)
                    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, P, hd, scale,
                                qr, ldq, pkg, hd, 0.0f, S, PT);
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, kc, hd, scale,
                            qr, ldq, kb, ldk, 0.0f, S + P, PT);
                att_softmax_rows(S, PT, r0, r1, P, PT);
                /* out = S [pv; v] */
                if (P)
                    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m, hd, P, 1.0f,
                                S, PT, pvg, hd, 0.0f, orow, ldo);
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m, hd, kc, 1.0f,
                            S + P, PT, vb, ldv, P ? 1.0f : 0.0f, orow, ldo);
            }
        }
    }
}

/* Softmax backward on the visible columns, folding in the score scale:
 * dS = scale * A * (dA - sum_j A dA); columns nv .. ncols-1 become 0. */
static void att_softmax_backward_rows(float *dS, int ld, const float *A, int lda,
                                      int r0, int r1, int P, int ncols, float scale)
{
    for (int t = r0; t < r1; t++) {
        float *d = dS + (size_t)(t - r0) * ld;
        const float *a = A + (size_t)(t - r0) * lda;
        int nv = P + t + 1;
        double dot = 0.0;
#pragma omp simd reduction(+ : dot)
        for (int j = 0; j < nv; j++) dot += a[j] * d[j];
        float fd = (float)dot;
#pragma omp simd
        for (int j = 0; j < nv; j++) d[j] = scale * a[j] * (d[j] - fd);
        for (int j = nv; j < ncols; j++) d[j] = 0.0f;
    }
}

void attention_backward(float *dq, float *dk, float *dv, float *dpk, float *dpv,
                        const float *dout, const float *att,
                        const float *q, int ldq, const float *k, int ldk,
                        const float *v, int ldv, const float *pk, const float *pv, int P,
                        int B, int T, int H, int Hkv, int hd, float *scratch)
{
    if (B <= 0 || T <= 0 || H <= 0 || Hkv <= 0 || H % Hkv || hd <= 0) return;
    if (P < 0) P = 0;
    if (!P) dpk = dpv = NULL;
    int grp = H / Hkv;
    int PT = P + T, ldo = H * hd;
    float scale = (float)(1.0 / sqrt((double)hd));
    int need_scores = dq || dk || dpk;
    if (!need_scores && !dv && !dpv) return;
    for (int b = 0; b < B; b++) {
        for (int h = 0; h < H; h++) {
            int g = h / grp;
            const float *qb = q + (size_t)b * T * ldq + (size_t)h * hd;
            const float *kb = k + (size_t)b * T * ldk + (size_t)g * hd;
            const float *vb = v + (size_t)b * T * ldv + (size_t)g * hd;
            const float *pkg = P ? pk + (size_t)g * P * hd : NULL;
            const float *pvg = P ? pv + (size_t)g * P * hd : NULL;
            float *dqb = dq ? dq + (size_t)b * T * ldq + (size_t)h * hd : NULL;
            float *dkb = dk ? dk + (size_t)b * T * ldk + (size_t)g * hd : NULL;
            float *dvb = dv ? dv + (size_t)b * T * ldv + (size_t)g * hd : NULL;
            float *dpkg = dpk ? dpk + (size_t)g * P * hd : NULL;
            float *dpvg = dpv ? dpv + (size_t)g * P * hd : NULL;
            const float *gb = dout + (size_t)b * T * ldo + (size_t)h * hd;
            const float *ab = att + ((size_t)b * H + h) * T * PT;
            for (int r0 = 0; r0 < T; r0 += ATT_BLOCK) {
                int r1 = r0 + ATT_BLOCK < T ? r0 + ATT_BLOCK : T;
                int m = r1 - r0, kc = att_key_cols(r1, T);
                const float *A = ab + (size_t)r0 * PT;
                const float *G = gb + (size_t)r0 * ldo;
                const float *qr = qb + (size_t)r0 * ldq;
                /* dv[0:kc] += A^T dout, dpv += A_prefix^T dout */
                if (dvb)
                    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, kc, hd, m, 1.0f,
                                A + P, PT, G, ldo, 1.0f, dvb, ldv);
                if (dpvg)
                    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, P, hd, m, 1.0f,
                                A, PT, G, ldo, 1.0f, dpvg, hd);
                if (!need_scores) continue;
                /* dA = dout [pv; v]^T into scratch (m, P + kc), row stride PT */
                float *dS = scratch;
                if (P)
                    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, P, hd, 1.0f,
                                G, ldo, pvg, hd, 0.0f, dS, PT);
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, kc, hd, 1.0f,
                            G, ldo, vb, ldv, 0.0f, dS + P, PT);
                att_softmax_backward_rows(dS, PT, A, PT, r0, r1, P, P + kc, scale);
                /* dq += dS [pk; k] */
                if (dqb) {
                    if (P)
                        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m, hd, P, 1.0f,
                                    dS, PT, pkg, hd, 1.0f, dqb + (size_t)r0 * ldq, ldq);
                    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m, hd, kc, 1.0f,
                                dS + P, PT, kb, ldk, 1.0f, dqb + (size_t)r0 * ldq, ldq);
                }
                /* dk[0:kc] += dS^T q, dpk += dS_prefix^T q */
                if (dkb)
                    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, kc, hd, m, 1.0f,
                                dS + P, PT, qr, ldq, 1.0f, dkb, ldk);
                if (dpkg)
                    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, P, hd, m, 1.0f,
                                dS, PT, qr, ldq, 1.0f, dpkg, hd);
            }
        }
    }
}

/* ------------------------------------------------------------------------
 * cross-entropy: loss_i = logsumexp(logits_i) - logits_i[target_i],
 * computed from the max-shifted sum in double rather than from log(prob),
 * so it stays exact when the target's probability underflows. */

long crossentropy_forward(float *losses, float *probs, const float *logits,
                          const int *targets, int N, int V)
{
    long scored = 0;
#pragma omp parallel for schedule(static) reduction(+ : scored) if ((long)N * V >= PAR_MIN)
    for (int i = 0; i < N; i++) {
        const float *x = logits + (size_t)i * V;
        float *p = probs + (size_t)i * V;
        float mx = -INFINITY;
#pragma omp simd reduction(max : mx)
        for (int j = 0; j < V; j++) mx = x[j] > mx ? x[j] : mx;
        memcpy(p, x, (size_t)V * sizeof(float));
        double sum = exp_shifted_inplace(p, V, mx);
        float inv = (float)(1.0 / sum);
#pragma omp simd
        for (int j = 0; j < V; j++) p[j] *= inv;
        int tgt = targets[i];
        if (tgt >= 0) {
            losses[i] = (float)(log(sum) + (double)mx - (double)x[tgt]);
            scored++;
        } else {
            losses[i] = 0.0f;
        }
    }
    return scored;
}

void crossentropy_backward(float *dlogits, const float *probs, const int *targets,
                           int N, int V, float scale)
{
#pragma omp parallel for schedule(static) if ((long)N * V >= PAR_MIN)
    for (int i = 0; i < N; i++) {
        int tgt = targets[i];
        if (tgt < 0) continue;
        float *d = dlogits + (size_t)i * V;
        const float *p = probs + (size_t)i * V;
#pragma omp simd
        for (int j = 0; j < V; j++) d[j] += p[j] * scale;
        d[tgt] -= scale;
    }
}

void crossentropy_backward_inplace(float *g, const int *targets, int N, int V, float scale)
{
#pragma omp parallel for schedule(static) if ((long)N * V >= PAR_MIN)
    for (int i = 0; i < N; i++) {
        float *d = g + (size_t)i * V;
        int tgt = targets[i];
        if (tgt < 0) {
            memset(d, 0, (size_t)V * sizeof(float));
            continue;
        }
#pragma omp simd
        for (int j = 0; j < V; j++) d[j] *= scale;
        d[tgt] -= scale;
    }
}
