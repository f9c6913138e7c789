/* peftref core: the host services table (peftref/plugin.h, pr_host).
 *
 * Every entry is a plain function over raw floats so a plugin needs no
 * peftref library at link time.  The RNG is splitmix64 (Steele, Lea and
 * Flood 2014) on a state the caller keeps, so a stream depends only on its
 * seed and the number of draws; GEMM is cblas_sgemm, row-major. */
#include "host.h"

#include "model_internal.h"
#include "peftref/ext/embed_tokens.h"
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
    c->aux_loss = 0.0;
    c->ctx = NULL;
    c->model = NULL;
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

/* ---- dropout keyed by sample --------------------------------------------------- */

/* The key of row r of a call: every input that decides the mask, and
 * nothing of how the batch was split (not the micro-batch, not the rank):
 * (module seed, step, global sample index, position, site, layer, stream). */
static uint64_t dropout_row_key(const pr_ctx *ctx, uint32_t stream, int r)
{
    int T = ctx->T > 0 ? ctx->T : 1;
    int b = r / T, t = r % T;
    int64_t sample = ctx->sample_index ? ctx->sample_index[b] : b;
    uint64_t k = host_mix64(ctx->module_seed ^ 0xD1B54A32D192ED03ull);
    k = host_mix64(k ^ (uint64_t)(ctx->step + 1));
    k = host_mix64(k ^ (uint64_t)sample);
    k = host_mix64(k ^ ((uint64_t)(uint32_t)t << 32 | (uint32_t)(ctx->layer + 1)));
    return host_mix64(k ^ ((uint64_t)(uint32_t)ctx->site << 32 | stream));
}

static void host_dropout_mask(const pr_ctx *ctx, uint32_t stream, float p, int cols, void *mask)
{
    const int words = (cols + 31) / 32;
    uint32_t *w = mask;
    const int drop = ctx->training && p > 0.0f;
    for (int r = 0; r < ctx->rows; r++) {
        uint64_t state = drop ? dropout_row_key(ctx, stream, r) : 0;
        for (int k = 0; k < words; k++) {
            uint32_t u = 0;
            for (int b = 0; b < 32 && k * 32 + b < cols; b++)
                if (!drop || host_rng_uniform(&state) >= p)
                    u |= 1u << b;
            w[(size_t)r * words + k] = u;
        }
    }
}

static int kept(const uint32_t *w, int words, int r, int j)
{
    return (w[(size_t)r * words + j / 32] >> (j % 32)) & 1u;
}

static void host_dropout_apply(float *out, int ld_out, const float *in, int ld_in, const void *mask, int rows,
                               int cols, float p)
{
    const int words = (cols + 31) / 32;
    const float s = 1.0f / (1.0f - p);
    for (int r = 0; r < rows; r++)
        for (int j = 0; j < cols; j++)
            out[(size_t)r * ld_out + j] = kept(mask, words, r, j) ? in[(size_t)r * ld_in + j] * s : 0.0f;
}

static void host_dropout_backward(float *d_in, int ld_in, const float *d_out, int ld_out, const void *mask,
                                  int rows, int cols, float p)
{
    const int words = (cols + 31) / 32;
    const float s = 1.0f / (1.0f - p);
    for (int r = 0; r < rows; r++)
        for (int j = 0; j < cols; j++)
            if (kept(mask, words, r, j))
                d_in[(size_t)r * ld_in + j] += s * d_out[(size_t)r * ld_out + j];
}

/* ---- bias rows ------------------------------------------------------------------ */

static void host_col_sums(float *sums, const float *x, int ld, int rows, int cols)
{
    for (int r = 0; r < rows; r++)
        for (int j = 0; j < cols; j++)
            sums[j] += x[(size_t)r * ld + j];
}

static void host_add_bias_rows(float *y, int ld, const float *bias, int rows, int cols)
{
    for (int r = 0; r < rows; r++)
        for (int j = 0; j < cols; j++)
            y[(size_t)r * ld + j] += bias[j];
}

/* ---- base weights in f32 ---------------------------------------------------------- */

static float half_to_f32(int dtype, uint16_t h)
{
    uint32_t bits;
    if (dtype == PR_DTYPE_BF16) {
        bits = (uint32_t)h << 16;
    } else { /* IEEE half */
        uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
        if (e == 0 && m == 0)
            bits = sign;
        else if (e == 0) { /* subnormal */
            e = 127 - 15 + 1;
            while (!(m & 0x400u)) {
                m <<= 1;
                e--;
            }
            bits = sign | (e << 23) | ((m & 0x3FFu) << 13);
        } else if (e == 31)
            bits = sign | 0x7F800000u | (m << 13);
        else
            bits = sign | ((e + 127 - 15) << 23) | (m << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* dst [d_in, d_out] packed: element (i, j) of the IN_OUT view of the
 * call's weight, from either layout and any of f32, f16, bf16. */
static int host_base_weight_f32(const pr_ctx *ctx, float *dst)
{
    const pr_tensor *w = ctx ? ctx->base_weight : NULL;
    if (!w || !w->data || w->ndim != 2 || !dst)
        return PR_ERR_INVALID;
    const int out_in = ctx->base_layout == PR_WEIGHT_OUT_IN;
    const int64_t d_in = out_in ? w->shape[1] : w->shape[0], d_out = out_in ? w->shape[0] : w->shape[1];
    const int64_t ld = w->stride[0] ? w->stride[0] : w->shape[1];
    for (int64_t i = 0; i < d_in; i++)
        for (int64_t j = 0; j < d_out; j++) {
            int64_t at = out_in ? j * ld + i : i * ld + j;
            float v;
            if (w->dtype == PR_DTYPE_F32 || w->dtype == 0)
                v = ((const float *)w->data)[at];
            else if (w->dtype == PR_DTYPE_F16 || w->dtype == PR_DTYPE_BF16)
                v = half_to_f32(w->dtype, ((const uint16_t *)w->data)[at]);
            else
                return PR_ERR_UNSUPPORTED;
            dst[i * d_out + j] = v;
        }
    return PR_OK;
}

/* ---- auxiliary losses and extensions ------------------------------------------------ */

static void host_add_aux_loss(const pr_ctx *ctx, double value)
{
    (void)ctx;
    host_call *c = current_call ? current_call : &stray_call;
    c->aux_loss += value;
}

/* ---- extension urn:peftref:ext:embed-tokens:1 (peftref/ext/embed_tokens.h) ---------------- */

/* The model of the callback in progress on this thread whose context is
 * ctx (calls nest: a composite's member inside its parent), or NULL. */
static const pr_model *call_model(const pr_ctx *ctx)
{
    for (const host_call *c = current_call; c && ctx; c = c->prev)
        if (c->ctx == ctx)
            return c->model;
    return NULL;
}

static int embed_token_ids(const pr_ctx *ctx, int32_t *ids)
{
    const pr_model *m = call_model(ctx);
    if (!m || !ids || ctx->site != PR_SITE_EMBED || ctx->rows <= 0)
        return PR_ERR_INVALID;
    return model_embed_token_ids(m, ctx->rows, ids);
}

static int embed_token_row_f32(const pr_ctx *ctx, int64_t id, float *dst)
{
    const pr_model *m = call_model(ctx);
    const pr_tensor_info *wte = model_token_embedding(m);
    if (!wte || wte->ndim != 2 || !dst || id < 0 || id >= wte->shape[0])
        return PR_ERR_INVALID;
    return model_tensor_row_f32(m, wte, id, dst);   /* f32 or bf16 storage */
}

static const pr_ext_embed_tokens ext_embed_tokens = {
    .struct_size = sizeof(pr_ext_embed_tokens),
    .token_ids = embed_token_ids,
    .token_row_f32 = embed_token_row_f32,
};

/* The optional host interfaces, by URI: see peftref/ext/. */
static const void *host_extension_data(const char *uri)
{
    if (uri && strcmp(uri, PR_EXT_EMBED_TOKENS_URI) == 0)
        return &ext_embed_tokens;
    return NULL;
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
    .dropout_mask = host_dropout_mask,
    .dropout_apply = host_dropout_apply,
    .dropout_backward = host_dropout_backward,
    .col_sums = host_col_sums,
    .add_bias_rows = host_add_bias_rows,
    .base_weight_f32 = host_base_weight_f32,
    .add_aux_loss = host_add_aux_loss,
    .extension_data = host_extension_data,
};

const pr_host *host_services(void)
{
    return &services;
}
