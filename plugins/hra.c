/* HRA: Householder reflection adaptation (Yuan, Chen, Zhang, Zhang, Jin
 * 2024, "Bridging The Gap between Low-rank and Orthogonal Adaptation via
 * Householder Reflection Adaptation", arXiv 2405.17484).
 *
 * A frozen projection is multiplied by a chain of r Householder
 * reflections.  In Hugging Face PEFT's (out, in) orientation
 *
 *     W' = W H_1 H_2 ... H_r,   H_i = I - 2 u_i u_i^T / |u_i|^2   (d_in x d_in)
 *
 * so with our W [d_in, d_out] (y = x.W) the adapted weight is
 * W'_io = H_r ... H_1 W_io, i.e. y' = x'.W + b with
 * x' = x H_r H_{r-1} ... H_1 (each H_i symmetric): the reflections act on
 * the rows of x, H_r first.  The module is orthogonal by construction
 * (a product of reflections), so W' keeps W's Gram matrix.
 *
 *     hra_u (d_in, r)   the vectors u_i as its columns, as PEFT stores them.
 *                       PEFT's init (init_weights = true, r even): a
 *                       (d_in, r/2) matrix drawn kaiming_uniform(a =
 *                       sqrt(5)) -- fan_in r/2, uniform(+-sqrt(2/r)) --
 *                       with every column repeated (repeat_interleave), so
 *                       u_{2j} = u_{2j+1}, H_{2j} H_{2j+1} = I and the module
 *                       starts as the identity (up to rounding).  Odd r,
 *                       or init_weights = false: kaiming_uniform over all r
 *                       columns (uniform(+-1/sqrt(r))), not the identity.
 *
 * Integration is custom (PR_INTEGRATE_CUSTOM, reading the frozen weight
 * through host->base_weight_f32 as DoRA does): integrate_forward adds
 *
 *     y <- y + (x' - x).W
 *
 * to the site output y = x.W + b, which is y' = x'.W + b.  forward()
 * computes the same h = (x' - x).W on its own output.  Backward, with
 * g = dy.W^T, goes back through the reflections reusing that each is an
 * involution (z_in = H_i z_out) from the saved x', for unit v_i = u_i/|u_i|:
 *
 *     z_out = z_in - 2 (z_in.v) v
 *     dv   += -2 sum_rows ((z_in.v) g_out + (g_out.v) z_in)
 *     g_in  = g_out - 2 (g_out.v) v
 *     du_i += (dv - (dv.v) v) / |u_i|,     dx += g_in(first) - g
 *
 * and dy is passed on unchanged (y enters y' with coefficient 1).
 * merge() returns W' - W.  A zero vector u_i counts as no reflection
 * (PEFT would divide by zero).
 *
 * Not implemented: PEFT's apply_GS (Gram-Schmidt orthogonalised u, a
 * different parameterisation with the same forward form I - 2 U U^T) and
 * the paper's optional orthogonality regulariser lambda ||I - U^T U||_F^2,
 * which PEFT does not implement either.
 *
 * Saved per insertion: x' (rows, d_in).  Scratch: the frozen weight in f32
 * (d_in, d_out), the unit vectors (r, d_in) and their norms (r), the
 * difference x' - x or the input gradient (rows, d_in), the walked-back z
 * (rows, d_in), dv (r, d_in).
 *
 * This file includes only peftref's public plugin headers (plugin.h,
 * ext/peft_config.h), its PEFT codecs (peft/codecs.h) and libc/libm, and links
 * against nothing of peftref. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include <peftref/plugin.h>
#include <peftref/ext/peft_config.h>

#include "peft/codecs.h"

PR_PLUGIN_EXPORT const pr_plugin *peftref_plugin_entry(const pr_entry_args *args);

enum { OPT_R, OPT_INIT, N_OPTS };
enum { PARAM_U, N_PARAMS };
enum { SAVED_XP, N_SAVED };
enum { SCRATCH_W, SCRATCH_V, SCRATCH_NORM, SCRATCH_D, SCRATCH_Z, SCRATCH_DV, N_SCRATCH };

static const pr_option_decl hra_options[N_OPTS] = {
    [OPT_R] = {
        .struct_size = sizeof(pr_option_decl), .name = "r", .type = PR_OPT_INT,
        .def = 8, .min = 1, .max = 4096, .per_site = 1,
        .help = "number of Householder reflections; even for the identity initialisation; default 8 "
                "as Hugging Face PEFT's HRAConfig r",
    },
    [OPT_INIT] = {
        .struct_size = sizeof(pr_option_decl), .name = "init_weights", .type = PR_OPT_BOOL,
        .def = 1, .per_site = 0,
        .help = "true (default, as Hugging Face PEFT): pairs of equal vectors, so the module starts "
                "as the identity (r even); false: every vector random",
    },
};

static const pr_param_decl hra_params[N_PARAMS] = {
    [PARAM_U] = {
        .struct_size = sizeof(pr_param_decl), .name = "hra_u", .shape = "d_in, r",
        .init = PR_INIT_CUSTOM, .scope = PR_SCOPE_INSERTION,
        .peft_key = "{prefix}.hra_u", .peft_layout = PR_PEFT_AS_IS,
        .help = "the reflection vectors u_1..u_r as columns; pairs of equal kaiming_uniform columns",
    },
};

static const pr_buffer_decl hra_saved[N_SAVED] = {
    [SAVED_XP] = { .struct_size = sizeof(pr_buffer_decl), .name = "x_reflected", .shape = "rows, d_in" },
};

static const pr_buffer_decl hra_scratch[N_SCRATCH] = {
    [SCRATCH_W] = { .struct_size = sizeof(pr_buffer_decl), .name = "base_w", .shape = "d_in, d_out" },
    [SCRATCH_V] = { .struct_size = sizeof(pr_buffer_decl), .name = "unit", .shape = "r, d_in" },
    [SCRATCH_NORM] = { .struct_size = sizeof(pr_buffer_decl), .name = "norm", .shape = "r" },
    [SCRATCH_D] = { .struct_size = sizeof(pr_buffer_decl), .name = "rows_a", .shape = "rows, d_in" },
    [SCRATCH_Z] = { .struct_size = sizeof(pr_buffer_decl), .name = "rows_b", .shape = "rows, d_in" },
    [SCRATCH_DV] = { .struct_size = sizeof(pr_buffer_decl), .name = "d_unit", .shape = "r, d_in" },
};

static int row_stride(const pr_tensor *t)
{
    return (int)(t->stride[0] ? t->stride[0] : t->shape[1]);
}

typedef struct hra_call {
    int r, d_in, d_out, rows;
    const float *u;     /* (d_in, r) */
    float *v, *norm;    /* unit vectors (r, d_in), |u_i| */
    const float *W;     /* frozen weight, f32 [d_in, d_out] packed */
} hra_call;

/* Shapes, unit vectors and (with_weight) the frozen weight. */
static int hra_get_call(const pr_ctx *ctx, hra_call *h, int with_weight)
{
    const pr_host *host = ctx->host;
    if (ctx->n_params < N_PARAMS || ctx->n_options < N_OPTS || ctx->n_scratch < N_SCRATCH)
        return host->error(ctx, "hra: expected %d parameter, %d options and %d scratch buffers, got %u, %u "
                                "and %u",
                           N_PARAMS, N_OPTS, N_SCRATCH, ctx->n_params, ctx->n_options, ctx->n_scratch);
    const pr_tensor *u = ctx->params[PARAM_U];
    if (u->ndim != 2 || !u->data)
        return host->error(ctx, "hra: hra_u must be (d_in, r)");
    h->d_in = (int)u->shape[0];
    h->r = (int)u->shape[1];
    h->d_out = ctx->dims->d_out;
    h->rows = ctx->rows;
    h->u = u->data;
    h->v = ctx->scratch[SCRATCH_V]->data;
    h->norm = ctx->scratch[SCRATCH_NORM]->data;
    if (!h->v || !h->norm)
        return host->error(ctx, "hra: scratch buffers 'unit' and 'norm' are missing");
    for (int i = 0; i < h->r; i++) {
        double n2 = 0.0;
        for (int q = 0; q < h->d_in; q++)
            n2 += (double)h->u[(size_t)q * h->r + i] * h->u[(size_t)q * h->r + i];
        double n = sqrt(n2);
        h->norm[i] = (float)n;
        float *vi = h->v + (size_t)i * h->d_in;
        for (int q = 0; q < h->d_in; q++)
            vi[q] = n > 0.0 ? (float)(h->u[(size_t)q * h->r + i] / n) : 0.0f;
    }
    h->W = NULL;
    if (!with_weight)
        return 0;
    const pr_tensor *w = ctx->base_weight;
    if (!w || !w->data)
        return host->error(ctx, "hra: the site has no frozen weight to reflect (projection sites only)");
    float *wf = ctx->scratch[SCRATCH_W]->data;
    if (!wf || ctx->scratch[SCRATCH_W]->shape[0] * ctx->scratch[SCRATCH_W]->shape[1] < (int64_t)h->d_in * h->d_out)
        return host->error(ctx, "hra: scratch buffer 'base_w' must hold the [%d, %d] frozen weight", h->d_in,
                           h->d_out);
    if (host->base_weight_f32(ctx, wf) != 0)
        return host->error(ctx, "hra: the host gave no frozen weight in f32");
    h->W = wf;
    return 0;
}

static double dot(const float *a, const float *b, int n)
{
    double s = 0.0;
    for (int i = 0; i < n; i++)
        s += (double)a[i] * b[i];
    return s;
}

/* z <- z - 2 (z.v) v */
static void reflect(float *z, const float *v, int n)
{
    float t = (float)(2.0 * dot(z, v, n));
    for (int i = 0; i < n; i++)
        z[i] -= t * v[i];
}

/* integrate: y (ctx->out) += (x' - x).W; otherwise out = (x' - x).W.
 * x' is saved for backward. */
static int hra_run_forward(const pr_ctx *ctx, int integrate)
{
    const pr_host *host = ctx->host;
    hra_call h;
    int rc = hra_get_call(ctx, &h, 1);
    if (rc)
        return rc;
    if (!ctx->in->data || !ctx->out->data || ctx->in->shape[1] != h.d_in || ctx->out->shape[1] != h.d_out)
        return host->error(ctx, "hra: forward needs x (rows, %d) and y (rows, %d)", h.d_in, h.d_out);
    if (ctx->n_saved < N_SAVED || !ctx->saved[SAVED_XP]->data || ctx->saved[SAVED_XP]->shape[0] < h.rows)
        return host->error(ctx, "hra: saved buffer 'x_reflected' is missing or too small");
    float *xp = ctx->saved[SAVED_XP]->data, *d = ctx->scratch[SCRATCH_D]->data;
    if (!d)
        return host->error(ctx, "hra: scratch buffer 'rows_a' is missing");
    const float *x = ctx->in->data;
    const int ldx = row_stride(ctx->in);
    for (int row = 0; row < h.rows; row++) {
        float *z = xp + (size_t)row * h.d_in, *di = d + (size_t)row * h.d_in;
        const float *xr = x + (size_t)row * ldx;
        memcpy(z, xr, (size_t)h.d_in * sizeof(float));
        for (int i = h.r - 1; i >= 0; i--)
            reflect(z, h.v + (size_t)i * h.d_in, h.d_in);
        for (int q = 0; q < h.d_in; q++)
            di[q] = z[q] - xr[q];
    }
    host->gemm(0, 0, h.rows, h.d_out, h.d_in, 1.0f, d, h.d_in, h.W, h.d_out, integrate ? 1.0f : 0.0f,
               ctx->out->data, row_stride(ctx->out));
    return 0;
}

/* Backward of h = (x' - x).W given dh = ctx->d_out (left unchanged). */
static int hra_run_backward(const pr_ctx *ctx)
{
    const pr_host *host = ctx->host;
    float *du = ctx->grads && ctx->n_params ? ctx->grads[PARAM_U]->data : NULL;
    float *dx = ctx->d_in->data;
    if (!du && !dx)
        return 0;
    hra_call h;
    int rc = hra_get_call(ctx, &h, 1);
    if (rc)
        return rc;
    if (!ctx->d_out->data || ctx->d_out->shape[1] != h.d_out)
        return host->error(ctx, "hra: backward needs dy (rows, %d)", h.d_out);
    if (ctx->n_saved < N_SAVED || !ctx->saved[SAVED_XP]->data)
        return host->error(ctx, "hra: saved buffer 'x_reflected' is missing");
    float *g = ctx->scratch[SCRATCH_D]->data, *z = ctx->scratch[SCRATCH_Z]->data;
    float *dv = ctx->scratch[SCRATCH_DV]->data;
    if (!g || !z || !dv)
        return host->error(ctx, "hra: scratch buffers are missing");
    const float *xp = ctx->saved[SAVED_XP]->data;
    /* g (rows, d_in) = dh . W^T */
    host->gemm(0, 1, h.rows, h.d_in, h.d_out, 1.0f, ctx->d_out->data, row_stride(ctx->d_out), h.W, h.d_out,
               0.0f, g, h.d_in);
    memcpy(z, xp, (size_t)h.rows * h.d_in * sizeof(float));
    memset(dv, 0, (size_t)h.r * h.d_in * sizeof(float));
    const int lddx = dx ? row_stride(ctx->d_in) : 0;
    for (int row = 0; row < h.rows; row++) {
        float *zr = z + (size_t)row * h.d_in, *gr = g + (size_t)row * h.d_in;
        float *dxr = dx ? dx + (size_t)row * lddx : NULL;
        /* dx gets -g (the -x of x' - x) and, at the end, g through the chain */
        if (dxr)
            for (int q = 0; q < h.d_in; q++)
                dxr[q] -= gr[q];
        /* forward applied i = r-1 .. 0; walk back i = 0 .. r-1 */
        for (int i = 0; i < h.r; i++) {
            const float *vi = h.v + (size_t)i * h.d_in;
            reflect(zr, vi, h.d_in); /* z_in = H_i z_out */
            const float a = (float)dot(zr, vi, h.d_in), b = (float)dot(gr, vi, h.d_in);
            if (du) {
                float *dvi = dv + (size_t)i * h.d_in;
                for (int q = 0; q < h.d_in; q++)
                    dvi[q] -= 2.0f * (a * gr[q] + b * zr[q]);
            }
            for (int q = 0; q < h.d_in; q++)
                gr[q] -= 2.0f * b * vi[q];
        }
        if (dxr)
            for (int q = 0; q < h.d_in; q++)
                dxr[q] += gr[q];
    }
    if (du)
        for (int i = 0; i < h.r; i++) {
            if (!(h.norm[i] > 0.0f))
                continue;
            const float *vi = h.v + (size_t)i * h.d_in, *dvi = dv + (size_t)i * h.d_in;
            const float p = (float)dot(dvi, vi, h.d_in);
            for (int q = 0; q < h.d_in; q++)
                du[(size_t)q * h.r + i] += (dvi[q] - p * vi[q]) / h.norm[i];
        }
    return 0;
}

static int hra_integrate_forward(const pr_ctx *ctx)
{
    return hra_run_forward(ctx, 1);
}

/* d_out = dy stays the gradient of the old y; dx and du accumulate. */
static int hra_integrate_backward(const pr_ctx *ctx)
{
    return hra_run_backward(ctx);
}

static int hra_forward(const pr_ctx *ctx)
{
    return hra_run_forward(ctx, 0);
}

static int hra_backward(const pr_ctx *ctx)
{
    return hra_run_backward(ctx);
}

/* merge: out [d_in, d_out] = H_r ... H_1 W - W: each reflection acts on
 * W's columns, H_1 first. */
static int hra_merge(const pr_ctx *ctx)
{
    const pr_host *host = ctx->host;
    hra_call h;
    int rc = hra_get_call(ctx, &h, 1);
    if (rc)
        return rc;
    if (!ctx->out->data || ctx->out->shape[0] != h.d_in || ctx->out->shape[1] != h.d_out)
        return host->error(ctx, "hra: merge output must be [%d, %d]", h.d_in, h.d_out);
    float *out = ctx->out->data;
    const int ld = row_stride(ctx->out);
    for (int q = 0; q < h.d_in; q++)
        memcpy(out + (size_t)q * ld, h.W + (size_t)q * h.d_out, (size_t)h.d_out * sizeof(float));
    for (int i = 0; i < h.r; i++) {
        const float *vi = h.v + (size_t)i * h.d_in;
        /* column by column: col -= 2 (v.col) v, in blocks of columns */
        for (int j0 = 0; j0 < h.d_out; j0 += 64) {
            int nb = h.d_out - j0 < 64 ? h.d_out - j0 : 64;
            double acc[64] = { 0 };
            for (int q = 0; q < h.d_in; q++) {
                const float *oq = out + (size_t)q * ld + j0;
                for (int j = 0; j < nb; j++)
                    acc[j] += (double)vi[q] * oq[j];
            }
            for (int q = 0; q < h.d_in; q++) {
                float *oq = out + (size_t)q * ld + j0;
                for (int j = 0; j < nb; j++)
                    oq[j] -= (float)(2.0 * acc[j]) * vi[q];
            }
        }
    }
    for (int q = 0; q < h.d_in; q++) {
        float *oq = out + (size_t)q * ld;
        const float *wq = h.W + (size_t)q * h.d_out;
        for (int j = 0; j < h.d_out; j++)
            oq[j] -= wq[j];
    }
    return 0;
}

/* init: PEFT's kaiming_uniform(a = sqrt(5)) of a (d_in, r/2) matrix with
 * repeated columns (r even, init_weights), else of the whole (d_in, r). */
static int hra_init(const pr_ctx *ctx)
{
    if (ctx->n_params < N_PARAMS || !ctx->params[PARAM_U]->data || ctx->params[PARAM_U]->ndim != 2)
        return ctx->host->error(ctx, "hra: hra_u is missing");
    float *u = ctx->params[PARAM_U]->data;
    const int d_in = (int)ctx->params[PARAM_U]->shape[0], r = (int)ctx->params[PARAM_U]->shape[1];
    const int pairs = ctx->options[OPT_INIT].num != 0 && r % 2 == 0;
    const int cols = pairs ? r / 2 : r;
    const float bound = (float)(1.0 / sqrt((double)cols));
    uint64_t st = ctx->seed;
    for (int q = 0; q < d_in; q++)
        for (int j = 0; j < cols; j++) {
            float val = bound * (2.0f * ctx->host->rng_uniform(&st) - 1.0f);
            if (pairs) {
                u[(size_t)q * r + 2 * j] = val;
                u[(size_t)q * r + 2 * j + 1] = val;
            } else {
                u[(size_t)q * r + j] = val;
            }
        }
    return 0;
}

static const pr_ext_peft_config peft_hra = {
    .struct_size = sizeof(pr_ext_peft_config),
    .read = peft_read_hra,
    .write = peft_write_hra,
};

static const void *peft_hra_extension(const char *uri)
{
    return strcmp(uri, PR_EXT_PEFT_CONFIG_URI) ? NULL : &peft_hra;
}

static const pr_technique hra_technique = {
    .struct_size = sizeof(pr_technique),
    .abi_major = PR_ABI_MAJOR,
    .name = "hra",
    .version = "1.0.0",
    .summary = "Householder reflection adaptation: the frozen projection W becomes W H_1 ... H_r "
               "(PEFT's orientation), H_i = I - 2 u_i u_i^T / |u_i|^2 with trained u_i, an orthogonal "
               "multiplicative update. Default site qkv (PEFT's GPT-2 target c_attn).",
    .citation = "Yuan, Chen, Zhang, Zhang, Jin (2024). Bridging The Gap between Low-rank and Orthogonal "
                "Adaptation via Householder Reflection Adaptation. arXiv:2405.17484",
    .license = "MIT",
    .intra = PR_INTRA_FACTORISED,
    .inter = PR_INTER_FIXED,
    .adaptation = PR_ADAPT_REPARAMETERISATION,
    .sharing = PR_SHARE_NONE,
    /* the module multiplies the frozen weight itself */
    .input = PR_INPUT_WEIGHTS,
    .insertion = PR_INSERT_PARALLEL,
    .insertions = PR_INSERTIONS_PER_SITE_LAYER,
    .integration = PR_INTEGRATE_CUSTOM,
    .workspace = PR_WS_ATTENTION | PR_WS_FFN,
    .options = hra_options,
    .n_options = N_OPTS,
    .sites = PR_SITE_BIT(PR_SITE_QKV) | PR_SITE_BIT(PR_SITE_Q) | PR_SITE_BIT(PR_SITE_K) |
             PR_SITE_BIT(PR_SITE_V) | PR_SITE_BIT(PR_SITE_O) | PR_SITE_BIT(PR_SITE_FFN_UP) |
             PR_SITE_BIT(PR_SITE_FFN_GATE) | PR_SITE_BIT(PR_SITE_FFN_DOWN),
    .default_sites = PR_SITE_BIT(PR_SITE_QKV),
    .default_sites_llama = PR_SITE_BIT(PR_SITE_Q) | PR_SITE_BIT(PR_SITE_V),
    .params = hra_params,
    .n_params = N_PARAMS,
    .saved = hra_saved,
    .n_saved = N_SAVED,
    .scratch = hra_scratch,
    .n_scratch = N_SCRATCH,
    .param_formula = "per insertion: r * d_in (hra_u d_in x r), r resolved per site; insertions = chosen "
                     "sites x chosen layers (default qkv: L)",
    /* r reflections of x (4 r d_in) and (x' - x).W */
    .flops_per_token = "4 * r * d_in + 2 * d_in * d_out",
    .forward = hra_forward,
    .backward = hra_backward,
    .integrate_forward = hra_integrate_forward,
    .integrate_backward = hra_integrate_backward,
    .merge = hra_merge,
    .init = hra_init,
    .peft_type = "HRA",
    .extension_data = peft_hra_extension,
};

static const pr_technique *const hra_techniques[] = { &hra_technique };

static const pr_plugin hra_plugin = {
    .struct_size = sizeof(pr_plugin),
    .abi_major = PR_ABI_MAJOR,
    .name = "hra",
    .version = "1.0.0",
    .n_techniques = 1,
    .techniques = hra_techniques,
};

PR_PLUGIN_EXPORT const pr_plugin *peftref_plugin_entry(const pr_entry_args *args)
{
    (void)args;
    return &hra_plugin;
}
