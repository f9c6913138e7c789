/* peftref core: the host services table (peftref/plugin.h, pr_host).
 *
 * Every entry is a plain function over raw floats so a plugin needs no
 * peftref library at link time.  The RNG is splitmix64 (Steele, Lea and
 * Flood 2014) on a state the caller keeps, so a stream depends only on its
 * seed and the number of draws; GEMM is cblas_sgemm, row-major. */
#include "host.h"

#include "peftref/site.h"

#include "peftref/status.h"

#include <cblas.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* ---- memory ------------------------------------------------------------- */

static void *host_alloc(size_t size)
{
    return malloc(size ? size : 1);
}

static void host_free(void *p)
{
    free(p);
}

/* ---- errors and logging --------------------------------------------------- */

static _Thread_local host_call *current_call;
/* Messages reported outside any host call (a plugin calling error() from
 * its own thread) land here and are otherwise dropped. */
static _Thread_local host_call stray_call;

void host_call_begin(host_call *c)
{
    c->msg[0] = '\0';
    c->has_msg = 0;
    c->prev = current_call;
    current_call = c;
}

void host_call_end(host_call *c)
{
    if (current_call == c)
        current_call = c->prev;
}

static int host_error(const pr_ctx *ctx, const char *fmt, ...)
{
    (void)ctx;
    host_call *c = current_call ? current_call : &stray_call;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->msg, sizeof c->msg, fmt ? fmt : "(no message)", ap);
    va_end(ap);
    c->has_msg = 1;
    return PR_ERR_INVALID;
}

/* Threshold from PEFTREF_LOG ("debug", "info", "warn"); info by default. */
static int log_threshold(void)
{
    const char *s = getenv("PEFTREF_LOG");
    if (!s)
        return PR_LOG_INFO;
    if (strcmp(s, "debug") == 0)
        return PR_LOG_DEBUG;
    if (strcmp(s, "warn") == 0)
        return PR_LOG_WARN;
    return PR_LOG_INFO;
}

static void host_log(const pr_ctx *ctx, int level, const char *fmt, ...)
{
    if (level < log_threshold())
        return;
    char msg[HOST_MSG_MAX];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt ? fmt : "", ap);
    va_end(ap);
    const char *lv = level >= PR_LOG_WARN ? "warning" : level == PR_LOG_INFO ? "info" : "debug";
    const char *tech = ctx && ctx->technique ? ctx->technique->name : NULL;
    if (tech && ctx->layer >= 0)
        fprintf(stderr, "peftref: %s: %s at h.%d.%s: %s\n", lv, tech, ctx->layer, pr_site_name(ctx->site), msg);
    else if (tech)
        fprintf(stderr, "peftref: %s: %s at %s: %s\n", lv, tech, pr_site_name(ctx->site), msg);
    else
        fprintf(stderr, "peftref: %s: %s\n", lv, msg);
}

/* ---- random numbers ------------------------------------------------------- */

uint64_t host_mix64(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

uint64_t host_hash_str(uint64_t h, const char *s)
{
    uint64_t f = 0xCBF29CE484222325ull ^ h;
    for (; s && *s; s++) {
        f ^= (unsigned char)*s;
        f *= 0x100000001B3ull;
    }
    return host_mix64(f);
}

/* splitmix64: advance by the golden-ratio increment, mix. */
static uint64_t host_rng_next(uint64_t *state)
{
    *state += 0x9E3779B97F4A7C15ull;
    return host_mix64(*state);
}

static float host_rng_uniform(uint64_t *state)
{
    return (float)(host_rng_next(state) >> 40) * (1.0f / 16777216.0f);
}

/* Box-Muller from two draws, no cached second value. */
static float host_rng_normal(uint64_t *state)
{
    double u1 = ((double)(host_rng_next(state) >> 11) + 1.0) * (1.0 / 9007199254740993.0);
    double u2 = (double)(host_rng_next(state) >> 11) * (1.0 / 9007199254740992.0);
    return (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}

/* ---- BLAS ------------------------------------------------------------------ */

static void host_gemm(int trans_a, int trans_b, int M, int N, int K, float alpha, const float *A, int lda,
                      const float *B, int ldb, float beta, float *C, int ldc)
{
    if (M <= 0 || N <= 0)
        return;
    if (K <= 0) {
        for (int i = 0; i < M; i++)
            for (int j = 0; j < N; j++)
                C[(size_t)i * ldc + j] = beta == 0.0f ? 0.0f : beta * C[(size_t)i * ldc + j];
        return;
    }
    cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans, M, N, K,
                alpha, A, lda, B, ldb, beta, C, ldc);
}

/* ---- activations ----------------------------------------------------------- */

#define GELU_K 0.7978845608028654f /* sqrt(2/pi) */

static float sigmoidf(float x)
{
    return 1.0f / (1.0f + expf(-x));
}

static void host_act_forward(int act, float *out, const float *in, size_t n)
{
    switch (act) {
    case PR_ACT_RELU:
        for (size_t i = 0; i < n; i++)
            out[i] = in[i] > 0.0f ? in[i] : 0.0f;
        break;
    case PR_ACT_GELU:
        /* 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) (Hendrycks and Gimpel 2016) */
        for (size_t i = 0; i < n; i++) {
            float x = in[i];
            out[i] = 0.5f * x * (1.0f + tanhf(GELU_K * (x + 0.044715f * x * x * x)));
        }
        break;
    case PR_ACT_SILU:
        for (size_t i = 0; i < n; i++)
            out[i] = in[i] * sigmoidf(in[i]);
        break;
    case PR_ACT_TANH:
        for (size_t i = 0; i < n; i++)
            out[i] = tanhf(in[i]);
        break;
    case PR_ACT_SIGMOID:
        for (size_t i = 0; i < n; i++)
            out[i] = sigmoidf(in[i]);
        break;
    default: /* identity */
        if (out != in)
            memmove(out, in, n * sizeof(float));
        break;
    }
}

static void host_act_backward(int act, float *din, const float *in, const float *dout, size_t n)
{
    switch (act) {
    case PR_ACT_RELU:
        for (size_t i = 0; i < n; i++)
            din[i] += in[i] > 0.0f ? dout[i] : 0.0f;
        break;
    case PR_ACT_GELU:
        for (size_t i = 0; i < n; i++) {
            float x = in[i], u = GELU_K * (x + 0.044715f * x * x * x);
            float th = tanhf(u);
            float du = GELU_K * (1.0f + 3.0f * 0.044715f * x * x);
            din[i] += dout[i] * (0.5f * (1.0f + th) + 0.5f * x * (1.0f - th * th) * du);
        }
        break;
    case PR_ACT_SILU:
        for (size_t i = 0; i < n; i++) {
            float s = sigmoidf(in[i]);
            din[i] += dout[i] * s * (1.0f + in[i] * (1.0f - s));
        }
        break;
    case PR_ACT_TANH:
        for (size_t i = 0; i < n; i++) {
            float t = tanhf(in[i]);
            din[i] += dout[i] * (1.0f - t * t);
        }
        break;
    case PR_ACT_SIGMOID:
        for (size_t i = 0; i < n; i++) {
            float s = sigmoidf(in[i]);
            din[i] += dout[i] * s * (1.0f - s);
        }
        break;
    default:
        for (size_t i = 0; i < n; i++)
            din[i] += dout[i];
        break;
    }
}

/* ---- softmax ---------------------------------------------------------------- */

/* x (rows, cols) <- softmax over each row, max-subtracted. */
static void host_softmax_rows(float *x, int rows, int cols)
{
    for (int r = 0; r < rows; r++) {
        float *row = x + (size_t)r * cols;
        float mx = -INFINITY;
        for (int j = 0; j < cols; j++)
            mx = row[j] > mx ? row[j] : mx;
        double z = 0.0;
        for (int j = 0; j < cols; j++) {
            row[j] = expf(row[j] - mx);
            z += row[j];
        }
        float inv = (float)(1.0 / z);
        for (int j = 0; j < cols; j++)
            row[j] *= inv;
    }
}

/* dx += y * (dy - sum_j dy_j y_j), per row. */
static void host_softmax_rows_backward(float *dx, const float *y, const float *dy, int rows, int cols)
{
    for (int r = 0; r < rows; r++) {
        const float *yr = y + (size_t)r * cols, *dyr = dy + (size_t)r * cols;
        float *dxr = dx + (size_t)r * cols;
        double dot = 0.0;
        for (int j = 0; j < cols; j++)
            dot += (double)dyr[j] * yr[j];
        for (int j = 0; j < cols; j++)
            dxr[j] += yr[j] * (dyr[j] - (float)dot);
    }
}

/* ---- threads ------------------------------------------------------------------ */

/* Static schedule: thread t of n_t gets one contiguous chunk, sizes
 * differing by at most one. */
static void host_parallel_for(int64_t n, void (*fn)(void *arg, int64_t begin, int64_t end), void *arg)
{
    if (n <= 0 || !fn)
        return;
#ifdef _OPENMP
    int nt = omp_get_max_threads();
    if (nt > 1 && n > 1 && !omp_in_parallel()) {
        if ((int64_t)nt > n)
            nt = (int)n;
        int64_t q = n / nt, rem = n % nt;
#pragma omp parallel for schedule(static) num_threads(nt)
        for (int t = 0; t < nt; t++) {
            int64_t begin = q * t + (t < rem ? t : rem);
            int64_t end = begin + q + (t < rem ? 1 : 0);
            fn(arg, begin, end);
        }
        return;
    }
#endif
    fn(arg, 0, n);
}

/* ---- the table ------------------------------------------------------------------ */

static const pr_host services = {
    .struct_size = sizeof(pr_host),
    .abi_major = PR_ABI_MAJOR,
    .abi_minor = PR_ABI_MINOR,
    .alloc = host_alloc,
    .free = host_free,
    .error = host_error,
    .log = host_log,
    .rng_next = host_rng_next,
    .rng_uniform = host_rng_uniform,
    .rng_normal = host_rng_normal,
    .gemm = host_gemm,
    .act_forward = host_act_forward,
    .act_backward = host_act_backward,
    .softmax_rows = host_softmax_rows,
    .softmax_rows_backward = host_softmax_rows_backward,
    .parallel_for = host_parallel_for,
};

const pr_host *host_services(void)
{
    return &services;
}
