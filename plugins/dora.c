/* DoRA: weight-decomposed low-rank adaptation (Liu, Wang, Yin, Molchanov,
 * Wang, Cheng, Chen 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation",
 * arXiv 2402.09353).
 *
 * A frozen projection y = x.W + b (W [d_in, d_out]) is reparameterised as a
 * magnitude times a direction, the direction adapted by a LoRA update:
 *
 *     V  = W + s * A^T.B^T                      [d_in, d_out]
 *     n_j = ||V[:, j]||                         column norm over the input dimension,
 *                                               one per output column (d_out)
 *     W' = V * diag(m / n)                      y' = x.W' + b
 *
 *     lora_A (r, d_in)             kaiming_uniform(a = sqrt(5)), as Hugging Face PEFT
 *     lora_B (d_out, r)            zeros
 *     lora_magnitude_vector (d_out) set by setup() to the column norms of the frozen W,
 *                                   so with B = 0 the module is the identity
 *     s = alpha / r, or alpha / sqrt(r) with use_rslora (Kalajdzievski 2023,
 *     arXiv 2312.03732), as LoRA.
 *
 * Integration is custom (PR_INTEGRATE_CUSTOM): integrate_forward receives x
 * and the site output y = x.W + b and writes, with g = m / n,
 *
 *     y <- y + (g - 1) * base + g * s * h,    h = x_d.A^T.B^T
 *
 * where base = x.W is read off the site output as y - b (no extra matrix
 * product) when no dropout applies, and computed as x_d.W when it does:
 * x_d = dropout(x) then feeds the whole DoRA branch and the frozen path
 * keeps the full x, y = x.W + b + x_d.(W' - W), the convention of Hugging
 * Face PEFT's DoRA layer.  In eval (or dropout 0) this is exactly
 * y' = x.W' + b; with B = 0 and m = n the added terms are exact zeros, so
 * the output is bit-identical to the base model's.  A module attached
 * before DoRA at the same site changes y, and DoRA then rescales its
 * contribution with the base output's.
 *
 * forward()/backward() give the same function in the parallel-branch form,
 * h = x_d.(W' - W) on the module output (what integrate_forward adds to
 * y), computing x_d.W explicitly; the host drives the integrate callbacks.
 *
 * Backward is exact: the column norms depend on A and B, and their
 * gradient is included.  With u = base + s*h (= x_d.V), dy the gradient of
 * the new y and G = dy * g (per column):
 *
 *     dm_j += sum_i dy_ij u_ij / n_j
 *     c_j   = -m_j (sum_i dy_ij u_ij) / n_j^3   dL/dV through the norm = V diag(c)
 *     dB   += s * (G^T . xa + diag(c) V^T . A^T)       xa = x_d.A^T
 *     dA   += s * ((G.B)^T . x_d + B^T diag(c) V^T)
 *     dy_old = G (base from y), or dy (base computed), and then
 *     dx   += s * G.B.A (+ ((g - 1) * dy).W^T when base was computed),
 *             through the dropout mask when one applied.
 * The paper (section 4.3) and PEFT treat ||V||_c as a constant in backward
 * to save memory; detach_norm = true does the same (c = 0, a gradient of a
 * different function).  The default is the exact gradient.
 *
 * merge() returns W' - W, so the host's merged weight is W'; the bias is
 * unchanged (bias_delta is left at zero).
 *
 * Saved per insertion: xa (rows, r), u (rows, d_out), weight_norm (d_out),
 * the dropout mask (32 bits per float slot, drawn by host->dropout_mask,
 * keyed by sample) and two flags (dropout applied, base computed).
 * Scratch: x_dropped (rows, d_in), v (d_in, d_out), rows_tmp (rows, d_out),
 * d_xa (rows, r), col (d_out), base_w (d_in, d_out): the frozen weight in
 * f32 and [d_in, d_out] orientation, filled by host->base_weight_f32 in
 * every callback that reads W (it may be stored bf16, or [d_out, d_in]).
 *
 * This file includes only peftref's public plugin headers (plugin.h,
 * ext/peft_config.h), its PEFT codecs (peft/codecs.h) and libc/libm, and links
 * against nothing of peftref: the matrix products go through host->gemm,
 * the dropout through the host's dropout services. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include <peftref/ext/peft_config.h>
#include <peftref/plugin.h>

#include "peft/codecs.h"

PR_PLUGIN_EXPORT const pr_plugin *peftref_plugin_entry(const pr_entry_args *args);

enum { OPT_R, OPT_ALPHA, OPT_DROPOUT, OPT_RSLORA, OPT_DETACH, N_OPTS };
enum { PARAM_A, PARAM_B, PARAM_M, N_PARAMS };
enum { SAVED_XA, SAVED_U, SAVED_NORM, SAVED_MASK, SAVED_FLAGS, N_SAVED };
enum { SCRATCH_XD, SCRATCH_V, SCRATCH_TMP, SCRATCH_DXA, SCRATCH_COL, SCRATCH_W, N_SCRATCH };
enum { FLAG_DROPOUT, FLAG_BASE_COMPUTED };

/* Columns per block of the column-norm and column-sum loops: rows are read
 * contiguously and each column's sum is kept in double. */
#define COL_BLOCK 64

static const pr_option_decl dora_options[N_OPTS] = {
    [OPT_R] = {
        .struct_size = sizeof(pr_option_decl), .name = "r", .type = PR_OPT_INT,
        .def = 8, .min = 1, .max = 4096, .per_site = 1,
        .help = "rank of the direction update B.A; default 8 as Hugging Face PEFT's LoraConfig "
                "(use_dora=True)",
    },
    [OPT_ALPHA] = {
        .struct_size = sizeof(pr_option_decl), .name = "alpha", .peft_name = "lora_alpha", .type = PR_OPT_FLOAT,
        .def = 8, .min = 0, .max = 1e6, .per_site = 1,
        .help = "scaling numerator: the direction update is scaled by alpha/r (alpha/sqrt(r) with "
                "use_rslora); default 8 as Hugging Face PEFT's lora_alpha",
    },
    [OPT_DROPOUT] = {
        .struct_size = sizeof(pr_option_decl), .name = "dropout", .peft_name = "lora_dropout", .type = PR_OPT_FLOAT,
        .def = 0, .min = 0, .max = 0.999, .per_site = 0,
        .help = "dropout probability on the input of the DoRA branch in training, in [0, 1); "
                "default 0 as Hugging Face PEFT's lora_dropout",
    },
    [OPT_RSLORA] = {
        .struct_size = sizeof(pr_option_decl), .name = "use_rslora", .type = PR_OPT_BOOL,
        .def = 0, .per_site = 0,
        .help = "rank-stabilised scale alpha/sqrt(r) instead of alpha/r (Kalajdzievski 2023, "
                "arXiv 2312.03732)",
    },
    [OPT_DETACH] = {
        .struct_size = sizeof(pr_option_decl), .name = "detach_norm", .type = PR_OPT_BOOL,
        .def = 0, .per_site = 0,
        .help = "treat the column norm ||W + s*(B.A)^T||_c as a constant in backward, as the "
                "DoRA paper (section 4.3) and Hugging Face PEFT do to save memory; default false: "
                "the exact gradient",
    },
};

static const pr_param_decl dora_params[N_PARAMS] = {
    [PARAM_A] = {
        .struct_size = sizeof(pr_param_decl), .name = "lora_A", .shape = "r, d_in",
        .init = PR_INIT_KAIMING_UNIFORM, .init_arg = "sqrt(5)", .scope = PR_SCOPE_INSERTION,
        .peft_key = "{prefix}.lora_A.weight", .peft_layout = PR_PEFT_AS_IS,
        .help = "down projection of the direction update; uniform(-1/sqrt(d_in), 1/sqrt(d_in)) "
                "as Hugging Face PEFT",
    },
    [PARAM_B] = {
        .struct_size = sizeof(pr_param_decl), .name = "lora_B", .shape = "d_out, r",
        .init = PR_INIT_ZEROS, .scope = PR_SCOPE_INSERTION,
        .peft_key = "{prefix}.lora_B.weight", .peft_layout = PR_PEFT_AS_IS,
        .help = "up projection of the direction update; zeros",
    },
    [PARAM_M] = {
        .struct_size = sizeof(pr_param_decl), .name = "lora_magnitude_vector", .shape = "d_out",
        .init = PR_INIT_ONES, .scope = PR_SCOPE_INSERTION,
        .peft_key = "{prefix}.lora_magnitude_vector", .peft_layout = PR_PEFT_AS_IS,
        .help = "magnitude m, one per output column; setup() sets it to the column norms of the "
                "frozen weight, so the adapted model starts equal to the base model",
    },
};

static const pr_buffer_decl dora_saved[N_SAVED] = {
    [SAVED_XA] = { .struct_size = sizeof(pr_buffer_decl), .name = "xa", .shape = "rows, r" },
    [SAVED_U] = { .struct_size = sizeof(pr_buffer_decl), .name = "u", .shape = "rows, d_out" },
    [SAVED_NORM] = { .struct_size = sizeof(pr_buffer_decl), .name = "weight_norm",
                     .shape = "d_out" },
    [SAVED_MASK] = { .struct_size = sizeof(pr_buffer_decl), .name = "dropout_mask",
                     .shape = "rows, (d_in + 31) / 32" },
    [SAVED_FLAGS] = { .struct_size = sizeof(pr_buffer_decl), .name = "flags", .shape = "2" },
};

static const pr_buffer_decl dora_scratch[N_SCRATCH] = {
    [SCRATCH_XD] = { .struct_size = sizeof(pr_buffer_decl), .name = "x_dropped",
                     .shape = "rows, d_in" },
    [SCRATCH_V] = { .struct_size = sizeof(pr_buffer_decl), .name = "v", .shape = "d_in, d_out" },
    [SCRATCH_TMP] = { .struct_size = sizeof(pr_buffer_decl), .name = "rows_tmp",
                      .shape = "rows, d_out" },
    [SCRATCH_DXA] = { .struct_size = sizeof(pr_buffer_decl), .name = "d_xa", .shape = "rows, r" },
    [SCRATCH_COL] = { .struct_size = sizeof(pr_buffer_decl), .name = "col", .shape = "d_out" },
    [SCRATCH_W] = { .struct_size = sizeof(pr_buffer_decl), .name = "base_w", .shape = "d_in, d_out" },
};

/* Row stride of a 2-D tensor (0 in an unfilled stride means packed rows). */
static int row_stride(const pr_tensor *t)
{
    return (int)(t->stride[0] ? t->stride[0] : t->shape[1]);
}

/* s = alpha / r, or alpha / sqrt(r) with use_rslora. */
static float dora_scale(const pr_ctx *ctx)
{
    double r = ctx->options[OPT_R].num, alpha = ctx->options[OPT_ALPHA].num;
    if (r < 1)
        return 0.0f;
    return (float)(ctx->options[OPT_RSLORA].num != 0 ? alpha / sqrt(r) : alpha / r);
}

/* Everything one call reads: shapes, parameters, the frozen weight (in
 * f32, [d_in, d_out], in scratch base_w). */
typedef struct dora_call {
    int r, d_in, d_out, rows;
    float s;
    const float *A, *B, *m;
    const float *W;
    int ldw;
    const float *bias;
} dora_call;

static int dora_get_call(const pr_ctx *ctx, dora_call *d)
{
    const pr_host *host = ctx->host;
    if (ctx->n_params < N_PARAMS || ctx->n_options < N_OPTS)
        return host->error(ctx, "dora: expected %d parameters and %d options, got %u and %u",
                           N_PARAMS, N_OPTS, ctx->n_params, ctx->n_options);
    const pr_tensor *a = ctx->params[PARAM_A], *b = ctx->params[PARAM_B];
    const pr_tensor *m = ctx->params[PARAM_M];
    if (a->ndim != 2 || b->ndim != 2 || m->ndim != 1 || !a->data || !b->data || !m->data ||
        b->shape[1] != a->shape[0] || m->shape[0] != b->shape[0])
        return host->error(ctx, "dora: lora_A, lora_B and lora_magnitude_vector must be (r, d_in), "
                                "(d_out, r) and (d_out)");
    d->r = (int)a->shape[0];
    d->d_in = (int)a->shape[1];
    d->d_out = (int)b->shape[0];
    d->rows = ctx->rows;
    d->s = dora_scale(ctx);
    d->A = a->data;
    d->B = b->data;
    d->m = m->data;
    const pr_tensor *w = ctx->base_weight;
    if (!w || !w->data)
        return host->error(ctx, "dora: the site has no frozen weight to decompose (projection "
                                "sites only)");
    /* the stored orientation: [d_in, d_out], or [d_out, d_in] (OUT_IN) */
    const int out_in = ctx->base_layout == PR_WEIGHT_OUT_IN;
    if (w->ndim != 2 || w->shape[out_in ? 1 : 0] != d->d_in || w->shape[out_in ? 0 : 1] != d->d_out)
        return host->error(ctx, "dora: the frozen weight is [%lld, %lld]%s, the parameters expect "
                                "[%d, %d]",
                           (long long)w->shape[0], (long long)w->shape[1], out_in ? " (out, in)" : "",
                           d->d_in, d->d_out);
    if (ctx->n_scratch < N_SCRATCH || !ctx->scratch[SCRATCH_W]->data ||
        ctx->scratch[SCRATCH_W]->shape[0] * ctx->scratch[SCRATCH_W]->shape[1] <
            (int64_t)d->d_in * d->d_out)
        return host->error(ctx, "dora: scratch buffer 'base_w' must hold the [%d, %d] frozen weight",
                           d->d_in, d->d_out);
    float *wf = ctx->scratch[SCRATCH_W]->data;
    if (host->base_weight_f32(ctx, wf) != 0)
        return host->error(ctx, "dora: the host gave no frozen weight in f32");
    d->W = wf;
    d->ldw = d->d_out;
    d->bias = ctx->base_bias && ctx->base_bias->data ? ctx->base_bias->data : NULL;
    return 0;
}

static int dora_check_buffers(const pr_ctx *ctx, const dora_call *d)
{
    const pr_host *host = ctx->host;
    if (ctx->n_saved < N_SAVED || ctx->n_scratch < N_SCRATCH)
        return host->error(ctx, "dora: expected %d saved and %d scratch buffers, got %u and %u",
                           N_SAVED, N_SCRATCH, ctx->n_saved, ctx->n_scratch);
    for (int i = 0; i < N_SAVED; i++)
        if (!ctx->saved[i]->data)
            return host->error(ctx, "dora: saved buffer '%s' is missing", dora_saved[i].name);
    for (int i = 0; i < N_SCRATCH; i++)
        if (i != SCRATCH_XD && !ctx->scratch[i]->data)
            return host->error(ctx, "dora: scratch buffer '%s' is missing", dora_scratch[i].name);
    if (ctx->saved[SAVED_U]->shape[0] < d->rows)
        return host->error(ctx, "dora: saved buffer 'u' holds %lld rows, the call has %d",
                           (long long)ctx->saved[SAVED_U]->shape[0], d->rows);
    return 0;
}

/* n (d_out) = column norms of v (d_in, d_out; row stride ld), summed in
 * double, row by row, in blocks of columns.  setup() and forward share it,
 * so with B = 0 the magnitude equals the norm bit for bit. */
static void column_norms(float *n, const float *v, int ld, int d_in, int d_out)
{
    double acc[COL_BLOCK];
    for (int j0 = 0; j0 < d_out; j0 += COL_BLOCK) {
        int nb = d_out - j0 < COL_BLOCK ? d_out - j0 : COL_BLOCK;
        for (int j = 0; j < nb; j++)
            acc[j] = 0.0;
        for (int k = 0; k < d_in; k++) {
            const float *vk = v + (size_t)k * ld + j0;
            for (int j = 0; j < nb; j++)
                acc[j] += (double)vk[j] * vk[j];
        }
        for (int j = 0; j < nb; j++)
            n[j0 + j] = (float)sqrt(acc[j]);
    }
}

/* v (d_in, d_out, packed) = W + s * A^T.B^T */
static void direction(const pr_host *host, const dora_call *d, float *v)
{
    for (int k = 0; k < d->d_in; k++)
        memcpy(v + (size_t)k * d->d_out, d->W + (size_t)k * d->ldw, (size_t)d->d_out * sizeof(float));
    host->gemm(1, 1, d->d_in, d->d_out, d->r, d->s, d->A, d->d_in, d->B, d->r, 1.0f, v, d->d_out);
}

/* The magnitude over the norm; a zero column (a zero column of W with
 * B = 0) gives g = 0 instead of 0/0. */
static float ratio(float m, float n)
{
    return n > 0.0f ? m / n : 0.0f;
}

/* The DoRA branch.  integrate: ctx->out is the site output y (read/write);
 * otherwise ctx->out is the module output h = x_d.(W' - W) (overwritten). */
static int dora_run_forward(const pr_ctx *ctx, int integrate)
{
    const pr_host *host = ctx->host;
    dora_call d;
    int rc = dora_get_call(ctx, &d);
    if (rc || (rc = dora_check_buffers(ctx, &d)))
        return rc;
    if (!ctx->in->data || !ctx->out->data)
        return host->error(ctx, "dora: forward needs its input and output tensors");
    if (ctx->in->shape[1] != d.d_in || ctx->out->shape[1] != d.d_out)
        return host->error(ctx, "dora: site widths %lld -> %lld, parameters expect %d -> %d",
                           (long long)ctx->in->shape[1], (long long)ctx->out->shape[1], d.d_in,
                           d.d_out);

    const float p = (float)ctx->options[OPT_DROPOUT].num;
    const int drop = ctx->training && p > 0.0f;
    const int computed = !integrate || drop;
    float *flags = ctx->saved[SAVED_FLAGS]->data;
    flags[FLAG_DROPOUT] = drop ? 1.0f : 0.0f;
    flags[FLAG_BASE_COMPUTED] = computed ? 1.0f : 0.0f;

    const float *x = ctx->in->data;
    int ldx = row_stride(ctx->in);
    if (drop) {
        float *xd = ctx->scratch[SCRATCH_XD]->data;
        if (!xd)
            return host->error(ctx, "dora: scratch buffer 'x_dropped' is missing");
        void *mask = ctx->saved[SAVED_MASK]->data;
        host->dropout_mask(ctx, 0, p, d.d_in, mask);
        host->dropout_apply(xd, d.d_in, x, ldx, mask, d.rows, d.d_in, p);
        x = xd;
        ldx = d.d_in;
    }
    float *xa = ctx->saved[SAVED_XA]->data, *u = ctx->saved[SAVED_U]->data;
    float *n = ctx->saved[SAVED_NORM]->data, *v = ctx->scratch[SCRATCH_V]->data;
    float *tmp = ctx->scratch[SCRATCH_TMP]->data;

    /* V and its column norms */
    direction(host, &d, v);
    column_norms(n, v, d.d_out, d.d_in, d.d_out);
    /* xa (rows, r) = x_d.A^T;  u (rows, d_out) = s * xa.B^T, base added below */
    host->gemm(0, 1, d.rows, d.r, d.d_in, 1.0f, x, ldx, d.A, d.d_in, 0.0f, xa, d.r);
    host->gemm(0, 1, d.rows, d.d_out, d.r, d.s, xa, d.r, d.B, d.r, 0.0f, u, d.d_out);
    /* base (rows, d_out) = x_d.W when it cannot be read off y */
    if (computed)
        host->gemm(0, 0, d.rows, d.d_out, d.d_in, 1.0f, x, ldx, d.W, d.ldw, 0.0f, tmp, d.d_out);

    float *y = ctx->out->data;
    const int ldy = row_stride(ctx->out);
    for (int i = 0; i < d.rows; i++) {
        float *yi = y + (size_t)i * ldy, *ui = u + (size_t)i * d.d_out;
        const float *ti = tmp + (size_t)i * d.d_out;
        for (int j = 0; j < d.d_out; j++) {
            float g = ratio(d.m[j], n[j]);
            float base = computed ? ti[j] : yi[j] - (d.bias ? d.bias[j] : 0.0f);
            float delta = (g - 1.0f) * base + g * ui[j];
            if (integrate)
                yi[j] += delta;
            else
                yi[j] = delta;
            ui[j] += base;
        }
    }
    return 0;
}

/* Backward of dora_run_forward.  ctx->d_out is the gradient of the new y
 * (integrate: replaced by the gradient of the old y) or of h. */
static int dora_run_backward(const pr_ctx *ctx, int integrate)
{
    const pr_host *host = ctx->host;
    dora_call d;
    int rc = dora_get_call(ctx, &d);
    if (rc || (rc = dora_check_buffers(ctx, &d)))
        return rc;
    if (!ctx->d_out->data || ctx->d_out->shape[1] != d.d_out)
        return host->error(ctx, "dora: backward needs d_out (rows, %d)", d.d_out);
    float *dy = ctx->d_out->data;
    const int lddy = row_stride(ctx->d_out);
    const float *xa = ctx->saved[SAVED_XA]->data, *u = ctx->saved[SAVED_U]->data;
    const float *n = ctx->saved[SAVED_NORM]->data;
    const void *mask = ctx->saved[SAVED_MASK]->data;
    const float *flags = ctx->saved[SAVED_FLAGS]->data;
    const int drop = flags[FLAG_DROPOUT] != 0.0f, computed = flags[FLAG_BASE_COMPUTED] != 0.0f;
    const int detach = ctx->options[OPT_DETACH].num != 0;
    const float p = (float)ctx->options[OPT_DROPOUT].num;
    float *dA = ctx->grads ? ctx->grads[PARAM_A]->data : NULL;
    float *dB = ctx->grads ? ctx->grads[PARAM_B]->data : NULL;
    float *dm = ctx->grads ? ctx->grads[PARAM_M]->data : NULL;
    float *dx = ctx->d_in->data;
    float *G = ctx->scratch[SCRATCH_TMP]->data, *c = ctx->scratch[SCRATCH_COL]->data;
    float *dxa = ctx->scratch[SCRATCH_DXA]->data, *xd = ctx->scratch[SCRATCH_XD]->data;
    if (drop && !xd)
        return host->error(ctx, "dora: scratch buffer 'x_dropped' is missing");
    if (integrate ? computed != drop : !computed)
        return host->error(ctx, "dora: %s does not follow the forward it belongs to",
                           integrate ? "integrate_backward" : "backward");

    /* dg_j = sum_i dy_ij u_ij;  dm_j += dg_j / n_j;  c_j = -m_j dg_j / n_j^3 */
    double acc[COL_BLOCK];
    for (int j0 = 0; j0 < d.d_out; j0 += COL_BLOCK) {
        int nb = d.d_out - j0 < COL_BLOCK ? d.d_out - j0 : COL_BLOCK;
        for (int j = 0; j < nb; j++)
            acc[j] = 0.0;
        for (int i = 0; i < d.rows; i++) {
            const float *dyi = dy + (size_t)i * lddy + j0, *ui = u + (size_t)i * d.d_out + j0;
            for (int j = 0; j < nb; j++)
                acc[j] += (double)dyi[j] * ui[j];
        }
        for (int j = 0; j < nb; j++) {
            double nj = n[j0 + j];
            if (dm && nj > 0.0)
                dm[j0 + j] += (float)(acc[j] / nj);
            c[j0 + j] = detach || nj <= 0.0 ? 0.0f : (float)(-(double)d.m[j0 + j] * acc[j] / (nj * nj * nj));
        }
    }
    /* G (rows, d_out) = dy * g */
    for (int i = 0; i < d.rows; i++) {
        const float *dyi = dy + (size_t)i * lddy;
        float *gi = G + (size_t)i * d.d_out;
        for (int j = 0; j < d.d_out; j++)
            gi[j] = dyi[j] * ratio(d.m[j], n[j]);
    }
    /* the low-rank path: u = x_d.W + s * xa.B^T */
    if (dB)
        host->gemm(1, 0, d.d_out, d.r, d.rows, d.s, G, d.d_out, xa, d.r, 1.0f, dB, d.r);
    if (dA || dx)
        host->gemm(0, 0, d.rows, d.r, d.d_out, 1.0f, G, d.d_out, d.B, d.r, 0.0f, dxa, d.r);
    if (dA) {
        if (!ctx->in->data)
            return host->error(ctx, "dora: backward needs the module input (in) for lora_A's gradient");
        const float *x = ctx->in->data;
        int ldx = row_stride(ctx->in);
        if (drop) {
            host->dropout_apply(xd, d.d_in, x, ldx, mask, d.rows, d.d_in, p);
            x = xd;
            ldx = d.d_in;
        }
        host->gemm(1, 0, d.r, d.d_in, d.rows, d.s, dxa, d.r, x, ldx, 1.0f, dA, d.d_in);
    }
    /* the norm path: dL/dV = V diag(c), V = W + s * A^T.B^T */
    if (!detach && (dA || dB)) {
        float *v = ctx->scratch[SCRATCH_V]->data;
        direction(host, &d, v);
        for (int k = 0; k < d.d_in; k++) {
            float *vk = v + (size_t)k * d.d_out;
            for (int j = 0; j < d.d_out; j++)
                vk[j] *= c[j];
        }
        if (dA)
            host->gemm(1, 1, d.r, d.d_in, d.d_out, d.s, d.B, d.r, v, d.d_out, 1.0f, dA, d.d_in);
        if (dB)
            host->gemm(1, 1, d.d_out, d.r, d.d_in, d.s, v, d.d_out, d.A, d.d_in, 1.0f, dB, d.r);
    }
    /* the input: base from y passes dy_old = G to the frozen path; a
     * computed base leaves dy alone and adds ((g - 1) * dy).W^T here */
    if (dx) {
        const int lddx = row_stride(ctx->d_in);
        float *dxd = drop ? xd : dx;
        const int ldd = drop ? d.d_in : lddx;
        host->gemm(0, 0, d.rows, d.d_in, d.r, d.s, dxa, d.r, d.A, d.d_in, drop ? 0.0f : 1.0f, dxd,
                   ldd);
        if (computed) {
            /* G's slot is free again: H = (g - 1) * dy */
            for (int i = 0; i < d.rows; i++) {
                const float *dyi = dy + (size_t)i * lddy;
                float *hi = G + (size_t)i * d.d_out;
                for (int j = 0; j < d.d_out; j++)
                    hi[j] = (ratio(d.m[j], n[j]) - 1.0f) * dyi[j];
            }
            host->gemm(0, 1, d.rows, d.d_in, d.d_out, 1.0f, G, d.d_out, d.W, d.ldw, 1.0f, dxd, ldd);
        }
        if (drop)
            host->dropout_backward(dx, lddx, xd, d.d_in, mask, d.rows, d.d_in, p);
    }
    if (integrate && !computed)
        for (int i = 0; i < d.rows; i++) {
            float *dyi = dy + (size_t)i * lddy;
            for (int j = 0; j < d.d_out; j++)
                dyi[j] *= ratio(d.m[j], n[j]);
        }
    return 0;
}

/* integrate_forward: in = x (rows, d_in), out = y = x.W + b (rows, d_out). */
static int dora_integrate_forward(const pr_ctx *ctx)
{
    return dora_run_forward(ctx, 1);
}

/* integrate_backward: d_out = dy, replaced by the gradient of the old y;
 * d_in = dx accumulated. */
static int dora_integrate_backward(const pr_ctx *ctx)
{
    return dora_run_backward(ctx, 1);
}

/* forward: in = x -> out = h = x_d.(W' - W), the change to the site output. */
static int dora_forward(const pr_ctx *ctx)
{
    return dora_run_forward(ctx, 0);
}

/* backward: d_out = dL/dh; accumulates dx and the parameters' gradients. */
static int dora_backward(const pr_ctx *ctx)
{
    return dora_run_backward(ctx, 0);
}

/* setup: m = column norms of the frozen weight. */
static int dora_setup(const pr_ctx *ctx)
{
    dora_call d;
    int rc = dora_get_call(ctx, &d);
    if (rc)
        return rc;
    column_norms(ctx->params[PARAM_M]->data, d.W, d.ldw, d.d_in, d.d_out);
    return 0;
}

/* merge: out [d_in, d_out] = W' - W = (W + s*A^T.B^T) * diag(m/n) - W; the
 * bias is unchanged. */
static int dora_merge(const pr_ctx *ctx)
{
    const pr_host *host = ctx->host;
    dora_call d;
    int rc = dora_get_call(ctx, &d);
    if (rc)
        return rc;
    if (!ctx->out->data || ctx->out->shape[0] != d.d_in || ctx->out->shape[1] != d.d_out)
        return host->error(ctx, "dora: merge output must be [%d, %d]", d.d_in, d.d_out);
    float *out = ctx->out->data;
    const int ld = row_stride(ctx->out);
    /* out = V = W + s * A^T.B^T in place, its norms, then V * g - W */
    for (int k = 0; k < d.d_in; k++)
        memcpy(out + (size_t)k * ld, d.W + (size_t)k * d.ldw, (size_t)d.d_out * sizeof(float));
    host->gemm(1, 1, d.d_in, d.d_out, d.r, d.s, d.A, d.d_in, d.B, d.r, 1.0f, out, ld);
    for (int j0 = 0; j0 < d.d_out; j0 += COL_BLOCK) {
        int nb = d.d_out - j0 < COL_BLOCK ? d.d_out - j0 : COL_BLOCK;
        float n[COL_BLOCK];
        column_norms(n, out + j0, ld, d.d_in, nb);
        for (int k = 0; k < d.d_in; k++) {
            float *ok = out + (size_t)k * ld + j0;
            const float *wk = d.W + (size_t)k * d.ldw + j0;
            for (int j = 0; j < nb; j++)
                ok[j] = ok[j] * ratio(d.m[j0 + j], n[j]) - wk[j];
        }
    }
    return 0;
}

/* Hugging Face PEFT saves DoRA as a LoRA with use_dora = true. */
static const pr_ext_peft_config dora_peft = { .struct_size = sizeof(pr_ext_peft_config),
                                              .implies = "{\"use_dora\": true}",
                                              .read = peft_read_dora, .write = peft_write_lora };

static const void *dora_extension(const char *uri)
{
    return strcmp(uri, PR_EXT_PEFT_CONFIG_URI) ? NULL : &dora_peft;
}

static const pr_technique dora_technique = {
    .struct_size = sizeof(pr_technique),
    .abi_major = PR_ABI_MAJOR,
    .name = "dora",
    .version = "1.0.0",
    .summary = "Weight-decomposed LoRA: the frozen projection W becomes m * V / ||V||_c with "
               "V = W + (alpha/r) (B.A)^T, a trained magnitude m per output column and a low-rank "
               "direction update. Default site qkv (Hugging Face PEFT's GPT-2 target c_attn).",
    .citation = "Liu, Wang, Yin, Molchanov, Wang, Cheng, Chen (2024). DoRA: Weight-Decomposed "
                "Low-Rank Adaptation. arXiv:2402.09353",
    .license = "MIT",
    .intra = PR_INTRA_FACTORISED,
    .inter = PR_INTER_FIXED,
    .adaptation = PR_ADAPT_REPARAMETERISATION,
    .sharing = PR_SHARE_NONE,
    /* the module decomposes the frozen weight itself: its magnitude comes
     * from, and its direction is normalised with, W's column norms */
    .input = PR_INPUT_WEIGHTS,
    .insertion = PR_INSERT_PARALLEL,
    .insertions = PR_INSERTIONS_PER_SITE_LAYER,
    .integration = PR_INTEGRATE_CUSTOM,
    .workspace = PR_WS_ATTENTION | PR_WS_FFN,
    .options = dora_options,
    .n_options = N_OPTS,
    .sites = PR_SITE_BIT(PR_SITE_QKV) | PR_SITE_BIT(PR_SITE_Q) | PR_SITE_BIT(PR_SITE_K) |
             PR_SITE_BIT(PR_SITE_V) | PR_SITE_BIT(PR_SITE_O) | PR_SITE_BIT(PR_SITE_FFN_UP) |
             PR_SITE_BIT(PR_SITE_FFN_GATE) | PR_SITE_BIT(PR_SITE_FFN_DOWN),
    .default_sites = PR_SITE_BIT(PR_SITE_QKV),
    .default_sites_llama = PR_SITE_BIT(PR_SITE_Q) | PR_SITE_BIT(PR_SITE_V),
    .params = dora_params,
    .n_params = N_PARAMS,
    .saved = dora_saved,
    .n_saved = N_SAVED,
    .scratch = dora_scratch,
    .n_scratch = N_SCRATCH,
    .param_formula = "per insertion: r * (d_in + d_out) + d_out (lora_A r x d_in, lora_B d_out x r, "
                     "lora_magnitude_vector d_out; no biases), r resolved per site; insertions = "
                     "chosen sites x chosen layers (default qkv: L)",
    .forward = dora_forward,
    .backward = dora_backward,
    .integrate_forward = dora_integrate_forward,
    .integrate_backward = dora_integrate_backward,
    .merge = dora_merge,
    .setup = dora_setup,
    .peft_type = "LORA",
    .extension_data = dora_extension,
};

static const pr_technique *const dora_techniques[] = { &dora_technique };

static const pr_plugin dora_plugin = {
    .struct_size = sizeof(pr_plugin),
    .abi_major = PR_ABI_MAJOR,
    .name = "dora",
    .version = "1.0.0",
    .n_techniques = 1,
    .techniques = dora_techniques,
};

PR_PLUGIN_EXPORT const pr_plugin *peftref_plugin_entry(const pr_entry_args *args)
{
    (void)args; /* a built-in plugin needs none of the host's entry arguments */
    return &dora_plugin;
}
