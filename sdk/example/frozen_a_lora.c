/* frozen_a_lora: a worked example of the peftref plugin ABI 1.
 *
 * A low-rank update beside a frozen projection whose down projection A is a
 * frozen random buffer and whose up projection B alone is trained (the
 * LoRA-FA idea: Zhang et al. 2023, "LoRA-FA: Memory-efficient Low-rank
 * Adaptation for Large Language Models Fine-tuning", arXiv 2308.03303):
 *
 *     A (r, d_in)    frozen, normal(0, 1/sqrt(d_in)) from the module's seed;
 *                    regenerated on load, never written to module files
 *     B (d_out, r)   trained, zeros: the module starts as the identity
 *
 *     h = dropout(x) . A^T . B^T      (rows, d_out)
 *     y <- y + s * h,  s = alpha / r  (the host applies s: SCALED_ADD)
 *
 * What it shows an author:
 *  - a frozen buffer (PR_PARAM_FROZEN | PR_PARAM_REGENERATE);
 *  - a saved buffer (xa, kept from forward for backward) and scratch
 *    (lent per call);
 *  - a strided GEMM: at q, k or v of a fused-QKV model the site tensors are
 *    column slices, so rows are stride[0] floats apart;
 *  - the host's dropout, keyed by sample so masks do not depend on how a
 *    batch is split;
 *  - merge: the weight delta s * A^T.B^T, shaped [d_in, d_out].
 *
 * Build against the installed SDK:
 *   cc -std=c11 -O2 -fPIC -shared $(pkg-config --cflags peftref-plugin) \
 *      -o frozen_a_lora.so frozen_a_lora.c */
#include <stdio.h>
#include <string.h>

#include <peftref/plugin.h>

PR_PLUGIN_EXPORT const pr_plugin *peftref_plugin_entry(const pr_entry_args *args);

enum { OPT_R, OPT_ALPHA, OPT_DROPOUT, N_OPTS };
enum { PARAM_A, PARAM_B, N_PARAMS };
enum { SAVED_XA, SAVED_MASK, N_SAVED };
enum { SCRATCH_XD, SCRATCH_DXA, N_SCRATCH };

static const pr_option_decl options[N_OPTS] = {
    [OPT_R] = { .struct_size = sizeof(pr_option_decl), .name = "r", .type = PR_OPT_INT, .def = 8, .min = 1,
                .max = 4096, .help = "rank of the update" },
    [OPT_ALPHA] = { .struct_size = sizeof(pr_option_decl), .name = "alpha", .type = PR_OPT_FLOAT, .def = 16,
                    .min = 0, .max = 1e6, .help = "the update is scaled by alpha / r" },
    [OPT_DROPOUT] = { .struct_size = sizeof(pr_option_decl), .name = "dropout", .type = PR_OPT_FLOAT,
                      .def = 0, .min = 0, .max = 0.999, .help = "dropout on the module input in training" },
};

static const pr_param_decl params[N_PARAMS] = {
    [PARAM_A] = { .struct_size = sizeof(pr_param_decl), .name = "A", .shape = "r, d_in",
                  .init = PR_INIT_NORMAL, .init_arg = "1 / sqrt(d_in)", .scope = PR_SCOPE_INSERTION,
                  .flags = PR_PARAM_FROZEN | PR_PARAM_REGENERATE,
                  .help = "frozen random down projection, regenerated from the module's seed" },
    [PARAM_B] = { .struct_size = sizeof(pr_param_decl), .name = "B", .shape = "d_out, r", .init = PR_INIT_ZEROS,
                  .scope = PR_SCOPE_INSERTION, .help = "trained up projection; zeros" },
};

static const pr_buffer_decl saved[N_SAVED] = {
    [SAVED_XA] = { .struct_size = sizeof(pr_buffer_decl), .name = "xa", .shape = "rows, r" },
    [SAVED_MASK] = { .struct_size = sizeof(pr_buffer_decl), .name = "mask", .shape = "rows, (d_in + 31) / 32" },
};

static const pr_buffer_decl scratch[N_SCRATCH] = {
    [SCRATCH_XD] = { .struct_size = sizeof(pr_buffer_decl), .name = "x_dropped", .shape = "rows, d_in" },
    [SCRATCH_DXA] = { .struct_size = sizeof(pr_buffer_decl), .name = "d_xa", .shape = "rows, r" },
};

/* Row stride of a 2-D view (0 = packed). */
static int ld(const pr_tensor *t)
{
    return (int)(t->stride[0] ? t->stride[0] : t->shape[1]);
}

/* forward: in = x (rows, d_in; strided) -> out = h (rows, d_out), unscaled. */
static int fa_forward(const pr_ctx *ctx)
{
    const pr_host *h = ctx->host;
    const pr_tensor *A = ctx->params[PARAM_A], *B = ctx->params[PARAM_B];
    const int r = (int)A->shape[0], d_in = (int)A->shape[1], d_out = (int)B->shape[0], rows = ctx->rows;
    const float p = (float)ctx->options[OPT_DROPOUT].num;
    if (!ctx->in->data || !ctx->out->data)
        return h->error(ctx, "frozen_a_lora: forward needs its input and output");
    const float *x = ctx->in->data;
    int ldx = ld(ctx->in);
    if (ctx->training && p > 0.0f) {
        h->dropout_mask(ctx, 0, p, d_in, ctx->saved[SAVED_MASK]->data);
        float *xd = ctx->scratch[SCRATCH_XD]->data;
        h->dropout_apply(xd, d_in, x, ldx, ctx->saved[SAVED_MASK]->data, rows, d_in, p);
        x = xd;
        ldx = d_in;
    }
    float *xa = ctx->saved[SAVED_XA]->data;
    h->gemm(0, 1, rows, r, d_in, 1.0f, x, ldx, A->data, d_in, 0.0f, xa, r);
    h->gemm(0, 1, rows, d_out, r, 1.0f, xa, r, B->data, r, 0.0f, ctx->out->data, ld(ctx->out));
    return 0;
}

/* backward: d_out = s * dy.  dB += dh^T . xa; dx += mask(dh . B . A).
 * A is frozen: the host gives it no gradient. */
static int fa_backward(const pr_ctx *ctx)
{
    const pr_host *h = ctx->host;
    const pr_tensor *A = ctx->params[PARAM_A], *B = ctx->params[PARAM_B];
    const int r = (int)A->shape[0], d_in = (int)A->shape[1], d_out = (int)B->shape[0], rows = ctx->rows;
    const float p = (float)ctx->options[OPT_DROPOUT].num;
    const float *dh = ctx->d_out->data;
    float *dB = ctx->grads ? ctx->grads[PARAM_B]->data : NULL;
    if (dB)
        h->gemm(1, 0, d_out, r, rows, 1.0f, dh, ld(ctx->d_out), ctx->saved[SAVED_XA]->data, r, 1.0f, dB, r);
    if (!ctx->d_in->data)
        return 0;
    float *dxa = ctx->scratch[SCRATCH_DXA]->data;
    h->gemm(0, 0, rows, r, d_out, 1.0f, dh, ld(ctx->d_out), B->data, r, 0.0f, dxa, r);
    if (ctx->training && p > 0.0f) {
        float *dxd = ctx->scratch[SCRATCH_XD]->data;
        h->gemm(0, 0, rows, d_in, r, 1.0f, dxa, r, A->data, d_in, 0.0f, dxd, d_in);
        h->dropout_backward(ctx->d_in->data, ld(ctx->d_in), dxd, d_in, ctx->saved[SAVED_MASK]->data, rows, d_in,
                            p);
    } else {
        h->gemm(0, 0, rows, d_in, r, 1.0f, dxa, r, A->data, d_in, 1.0f, ctx->d_in->data, ld(ctx->d_in));
    }
    return 0;
}

/* merge: out [d_in, d_out] = s * A^T . B^T. */
static int fa_merge(const pr_ctx *ctx)
{
    const pr_tensor *A = ctx->params[PARAM_A], *B = ctx->params[PARAM_B];
    const int r = (int)A->shape[0], d_in = (int)A->shape[1], d_out = (int)B->shape[0];
    ctx->host->gemm(1, 1, d_in, d_out, r, ctx->scale, A->data, d_in, B->data, r, 0.0f, ctx->out->data,
                    ld(ctx->out));
    return 0;
}

static const pr_technique technique = {
    .struct_size = sizeof(pr_technique),
    .abi_major = PR_ABI_MAJOR,
    .name = "frozen_a_lora",
    .version = "1.0.0",
    .summary = "Low-rank update with a frozen random down projection; only the up projection trains.",
    .citation = "Zhang, Zhang, Shi, Chu, Li (2023). LoRA-FA: Memory-efficient Low-rank Adaptation for Large "
                "Language Models Fine-tuning. arXiv:2308.03303",
    .license = "MIT",
    .intra = PR_INTRA_FACTORISED,
    .inter = PR_INTER_FIXED,
    .adaptation = PR_ADAPT_REPARAMETERISATION,
    .sharing = PR_SHARE_NONE,
    .input = PR_INPUT_HIDDEN,
    .insertion = PR_INSERT_PARALLEL,
    .insertions = PR_INSERTIONS_PER_SITE_LAYER,
    .integration = PR_INTEGRATE_SCALED_ADD,
    .workspace = PR_WS_ATTENTION | PR_WS_FFN,
    .options = options,
    .n_options = N_OPTS,
    .sites = PR_SITE_BIT(PR_SITE_QKV) | PR_SITE_BIT(PR_SITE_Q) | PR_SITE_BIT(PR_SITE_K) | PR_SITE_BIT(PR_SITE_V) |
             PR_SITE_BIT(PR_SITE_O) | PR_SITE_BIT(PR_SITE_FFN_UP) | PR_SITE_BIT(PR_SITE_FFN_DOWN),
    .default_sites = PR_SITE_BIT(PR_SITE_Q) | PR_SITE_BIT(PR_SITE_V),
    .params = params,
    .n_params = N_PARAMS,
    .saved = saved,
    .n_saved = N_SAVED,
    .scratch = scratch,
    .n_scratch = N_SCRATCH,
    .scale_expr = "alpha / r",
    .param_formula = "trained: r * d_out per insertion (B); frozen: r * d_in (A, regenerated, not saved)",
    .flops_per_token = "2 * r * (d_in + d_out)",
    .forward = fa_forward,
    .backward = fa_backward,
    .merge = fa_merge,
};

static const pr_technique *const techniques[] = { &technique };

static const pr_plugin plugin = {
    .struct_size = sizeof(pr_plugin),
    .abi_major = PR_ABI_MAJOR,
    .name = "frozen_a_lora",
    .version = "1.0.0",
    .n_techniques = 1,
    .techniques = techniques,
};

PR_PLUGIN_EXPORT const pr_plugin *peftref_plugin_entry(const pr_entry_args *args)
{
    /* A plugin that needs a newer host says why it refuses. */
    if (args && (int)args->abi_minor < PR_ABI_MINOR) {
        if (args->error)
            snprintf(args->error, args->error_size, "frozen_a_lora: needs ABI 1.%d, the host speaks 1.%u",
                     PR_ABI_MINOR, args->abi_minor);
        return NULL;
    }
    return &plugin;
}
