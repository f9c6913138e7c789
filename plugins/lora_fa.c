/* LoRA-FA: LoRA with a frozen down projection (Zhang, Zhang, Shi, Chu, Li
 * 2023, "LoRA-FA: Memory-efficient Low-rank Adaptation for Large Language
 * Models Fine-tuning", arXiv 2308.03303).
 *
 * LoRA (plugins/lora.c) whose A is initialised as LoRA's and then frozen:
 * only B is trained.  The paper's point is memory: with A fixed, the
 * gradient of B needs only x.A^T (rows, r), so the full-width input x
 * (rows, d_in) need not be kept for backward.  Names and shapes as Hugging
 * Face PEFT's LoRA (PEFT trains LoRA-FA through create_lorafa_optimizer on
 * an ordinary LoraConfig, which leaves lora_A untrained), so a saved module
 * is a plain LoRA module:
 *
 *     lora_A (r, d_in)    kaiming_uniform(a = sqrt(5)), as PEFT; frozen, saved
 *     lora_B (d_out, r)   zeros, trained: the module starts as the identity
 *
 *     h = dropout(x) . A^T . B^T            (rows, d_out)
 *     y <- y + s * h,   s = alpha / r  (alpha / sqrt(r) with use_rslora)
 *
 * merge() folds dW = s * A^T.B^T, shaped [d_in, d_out].
 *
 * Saved for backward, per insertion: xa (rows, r) = x_dropped . A^T, the
 * dropout mask bits, and whether forward applied dropout; scratch:
 * x_dropped (rows, d_in), d_xa (rows, r).  A's gradient is never formed
 * (the host gives a frozen buffer none), so backward never reads x: dB
 * comes from xa, dx from dh.B.A.
 *
 * Includes only <peftref/plugin.h> and libc/libm. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include <peftref/ext/peft_config.h>
#include <peftref/plugin.h>

#include "peft/codecs.h"

PR_PLUGIN_EXPORT const pr_plugin *peftref_plugin_entry(const pr_entry_args *args);

/* Indices into the declaration arrays below (and so into ctx->options,
 * ctx->params, ctx->saved and ctx->scratch). */
enum { OPT_R, OPT_ALPHA, OPT_DROPOUT, OPT_RSLORA, N_OPTS };
enum { PARAM_A, PARAM_B, N_PARAMS };
enum { SAVED_XA, SAVED_MASK, SAVED_DROPOUT_ON, N_SAVED };
enum { SCRATCH_XD, SCRATCH_DXA, N_SCRATCH };

static const pr_option_decl fa_options[N_OPTS] = {
    [OPT_R] = {
        .struct_size = sizeof(pr_option_decl), .name = "r", .type = PR_OPT_INT,
        .def = 8, .min = 1, .max = 4096, .per_site = 1,
        .help = "rank of the update B.A; default 8 as Hugging Face PEFT's LoraConfig r",
    },
    [OPT_ALPHA] = {
        .struct_size = sizeof(pr_option_decl), .name = "alpha", .peft_name = "lora_alpha", .type = PR_OPT_FLOAT,
        .def = 8, .min = 0, .max = 1e6, .per_site = 1,
        .help = "scaling numerator: the update is scaled by alpha/r (alpha/sqrt(r) with "
                "use_rslora); Hugging Face PEFT's lora_alpha, default 8",
    },
    [OPT_DROPOUT] = {
        .struct_size = sizeof(pr_option_decl), .name = "dropout", .peft_name = "lora_dropout", .type = PR_OPT_FLOAT,
        .def = 0, .min = 0, .max = 0.999, .per_site = 0,
        .help = "dropout probability on the module input in training, in [0, 1); default 0 "
                "as Hugging Face PEFT's lora_dropout (the paper's GPT-2 runs used 0.1)",
    },
    [OPT_RSLORA] = {
        .struct_size = sizeof(pr_option_decl), .name = "use_rslora", .type = PR_OPT_BOOL,
        .def = 0, .per_site = 0,
        .help = "rank-stabilised scale alpha/sqrt(r) instead of alpha/r (Kalajdzievski 2023, "
                "arXiv 2312.03732)",
    },
};

static const pr_param_decl fa_params[N_PARAMS] = {
    [PARAM_A] = {
        .struct_size = sizeof(pr_param_decl), .name = "lora_A", .shape = "r, d_in",
        .init = PR_INIT_KAIMING_UNIFORM, .init_arg = "sqrt(5)", .scope = PR_SCOPE_INSERTION,
        .flags = PR_PARAM_FROZEN,
        .peft_key = "{prefix}.lora_A.weight", .peft_layout = PR_PEFT_AS_IS,
        .help = "down projection, frozen after its init (saved with the module); "
                "uniform(-1/sqrt(d_in), 1/sqrt(d_in)) as Hugging Face PEFT's LoRA",
    },
    [PARAM_B] = {
        .struct_size = sizeof(pr_param_decl), .name = "lora_B", .shape = "d_out, r",
        .init = PR_INIT_ZEROS, .scope = PR_SCOPE_INSERTION,
        .peft_key = "{prefix}.lora_B.weight", .peft_layout = PR_PEFT_AS_IS,
        .help = "up projection, the only trained tensor; zeros, so the adapted model starts equal to "
                "the base model",
    },
};

static const pr_buffer_decl fa_saved[N_SAVED] = {
    [SAVED_XA] = { .struct_size = sizeof(pr_buffer_decl), .name = "xa", .shape = "rows, r" },
    [SAVED_MASK] = { .struct_size = sizeof(pr_buffer_decl), .name = "dropout_mask",
                     .shape = "rows, (d_in + 31) / 32" },
    [SAVED_DROPOUT_ON] = { .struct_size = sizeof(pr_buffer_decl), .name = "dropout_on",
                           .shape = "1" },
};

static const pr_buffer_decl fa_scratch[N_SCRATCH] = {
    [SCRATCH_XD] = { .struct_size = sizeof(pr_buffer_decl), .name = "x_dropped",
                     .shape = "rows, d_in" },
    [SCRATCH_DXA] = { .struct_size = sizeof(pr_buffer_decl), .name = "d_xa", .shape = "rows, r" },
};

/* Row stride of a 2-D tensor (0 in an unfilled stride means packed rows). */
static int row_stride(const pr_tensor *t)
{
    return (int)(t->stride[0] ? t->stride[0] : t->shape[1]);
}

/* The shapes of one call, read from the parameters the host allocated. */
typedef struct fa_dims {
    int r, d_in, d_out, rows;
    const float *A, *B;
} fa_dims;

static int fa_get_dims(const pr_ctx *ctx, fa_dims *d)
{
    if (ctx->n_params < N_PARAMS || ctx->n_options < N_OPTS)
        return ctx->host->error(ctx, "lora_fa: expected %d parameters and %d options, got %u and %u",
                                N_PARAMS, N_OPTS, ctx->n_params, ctx->n_options);
    const pr_tensor *a = ctx->params[PARAM_A], *b = ctx->params[PARAM_B];
    if (a->ndim != 2 || b->ndim != 2 || !a->data || !b->data || b->shape[1] != a->shape[0])
        return ctx->host->error(ctx, "lora_fa: lora_A and lora_B must be (r, d_in) and (d_out, r)");
    d->r = (int)a->shape[0];
    d->d_in = (int)a->shape[1];
    d->d_out = (int)b->shape[0];
    d->rows = ctx->rows;
    d->A = a->data;
    d->B = b->data;
    return 0;
}

static int fa_check_buffers(const pr_ctx *ctx, const fa_dims *d)
{
    if (ctx->n_saved < N_SAVED || ctx->n_scratch < N_SCRATCH)
        return ctx->host->error(ctx, "lora_fa: expected %d saved and %d scratch buffers, got %u and %u",
                                N_SAVED, N_SCRATCH, ctx->n_saved, ctx->n_scratch);
    for (int i = 0; i < N_SAVED; i++)
        if (!ctx->saved[i]->data)
            return ctx->host->error(ctx, "lora_fa: saved buffer '%s' is missing", fa_saved[i].name);
    if (ctx->saved[SAVED_XA]->shape[0] < d->rows)
        return ctx->host->error(ctx, "lora_fa: saved buffer 'xa' holds %lld rows, the call has %d",
                                (long long)ctx->saved[SAVED_XA]->shape[0], d->rows);
    return 0;
}

/* forward: in = x (rows, d_in) -> out = h (rows, d_out), unscaled. */
static int fa_forward(const pr_ctx *ctx)
{
    const pr_host *host = ctx->host;
    fa_dims d;
    int rc = fa_get_dims(ctx, &d);
    if (rc || (rc = fa_check_buffers(ctx, &d)))
        return rc;
    if (!ctx->in->data || !ctx->out->data)
        return host->error(ctx, "lora_fa: forward needs its input and output tensors");
    if (ctx->in->shape[1] != d.d_in || ctx->out->shape[1] != d.d_out)
        return host->error(ctx, "lora_fa: site widths %lld -> %lld, parameters expect %d -> %d",
                           (long long)ctx->in->shape[1], (long long)ctx->out->shape[1], d.d_in,
                           d.d_out);

    const float p = (float)ctx->options[OPT_DROPOUT].num;
    const int drop = ctx->training && p > 0.0f;
    float *xa = ctx->saved[SAVED_XA]->data;
    ((float *)ctx->saved[SAVED_DROPOUT_ON]->data)[0] = drop ? 1.0f : 0.0f;

    const float *x = ctx->in->data;
    int ldx = row_stride(ctx->in);
    if (drop) {
        void *mask = ctx->saved[SAVED_MASK]->data;
        float *xd = ctx->scratch[SCRATCH_XD]->data;
        if (!xd)
            return host->error(ctx, "lora_fa: scratch buffer 'x_dropped' is missing");
        host->dropout_mask(ctx, 0, p, d.d_in, mask);
        host->dropout_apply(xd, d.d_in, x, ldx, mask, d.rows, d.d_in, p);
        x = xd;
        ldx = d.d_in;
    }
    /* xa (rows, r) = x (rows, d_in) . A^T */
    host->gemm(0, 1, d.rows, d.r, d.d_in, 1.0f, x, ldx, d.A, d.d_in, 0.0f, xa, d.r);
    /* h (rows, d_out) = xa . B^T */
    host->gemm(0, 1, d.rows, d.d_out, d.r, 1.0f, xa, d.r, d.B, d.r, 0.0f, ctx->out->data,
               row_stride(ctx->out));
    return 0;
}

/* backward: d_out = dh = s*dy (rows, d_out).  Accumulates
 *   dB += dh^T . xa                 (d_out, r)
 *   dx += keep/(1-p) * (dh . B . A) (rows, d_in)
 * lora_A is frozen: no gradient (the host passes none). */
static int fa_backward(const pr_ctx *ctx)
{
    const pr_host *host = ctx->host;
    fa_dims d;
    int rc = fa_get_dims(ctx, &d);
    if (rc || (rc = fa_check_buffers(ctx, &d)))
        return rc;
    if (!ctx->d_out->data)
        return host->error(ctx, "lora_fa: backward needs d_out");
    const float *dh = ctx->d_out->data;
    const int lddh = row_stride(ctx->d_out);
    const float *xa = ctx->saved[SAVED_XA]->data;
    float *dB = ctx->n_params && ctx->grads ? ctx->grads[PARAM_B]->data : NULL;
    float *dx = ctx->d_in->data;

    if (dB)
        host->gemm(1, 0, d.d_out, d.r, d.rows, 1.0f, dh, lddh, xa, d.r, 1.0f, dB, d.r);
    if (!dx)
        return 0;

    float *dxa = ctx->scratch[SCRATCH_DXA]->data;
    if (!dxa)
        return host->error(ctx, "lora_fa: scratch buffer 'd_xa' is missing");
    /* d_xa (rows, r) = dh (rows, d_out) . B (d_out, r) */
    host->gemm(0, 0, d.rows, d.r, d.d_out, 1.0f, dh, lddh, d.B, d.r, 0.0f, dxa, d.r);

    const int drop = ((const float *)ctx->saved[SAVED_DROPOUT_ON]->data)[0] != 0.0f;
    const float p = (float)ctx->options[OPT_DROPOUT].num;
    const void *mask = ctx->saved[SAVED_MASK]->data;
    float *xd = ctx->scratch[SCRATCH_XD]->data;
    if (drop && !xd)
        return host->error(ctx, "lora_fa: scratch buffer 'x_dropped' is missing");

    const int lddx = row_stride(ctx->d_in);
    if (!drop) {
        host->gemm(0, 0, d.rows, d.d_in, d.r, 1.0f, dxa, d.r, d.A, d.d_in, 1.0f, dx, lddx);
    } else {
        /* x_dropped's scratch is free in backward: d(x_dropped) goes
         * there, then through the mask into dx. */
        host->gemm(0, 0, d.rows, d.d_in, d.r, 1.0f, dxa, d.r, d.A, d.d_in, 0.0f, xd, d.d_in);
        host->dropout_backward(dx, lddx, xd, d.d_in, mask, d.rows, d.d_in, p);
    }
    return 0;
}

/* merge: out [d_in, d_out] = s * A^T . B^T, s = ctx->scale. */
static int fa_merge(const pr_ctx *ctx)
{
    fa_dims d;
    int rc = fa_get_dims(ctx, &d);
    if (rc)
        return rc;
    if (!ctx->out->data || ctx->out->shape[0] != d.d_in || ctx->out->shape[1] != d.d_out)
        return ctx->host->error(ctx, "lora_fa: merge output must be [%d, %d]", d.d_in, d.d_out);
    ctx->host->gemm(1, 1, d.d_in, d.d_out, d.r, ctx->scale, d.A, d.d_in, d.B, d.r, 0.0f,
                    ctx->out->data, row_stride(ctx->out));
    return 0;
}

/* s = alpha / r, or alpha / sqrt(r) with use_rslora. */
static float fa_scale(const pr_ctx *ctx)
{
    double r = ctx->options[OPT_R].num, alpha = ctx->options[OPT_ALPHA].num;
    if (r < 1)
        return 0.0f;
    return (float)(ctx->options[OPT_RSLORA].num != 0 ? alpha / sqrt(r) : alpha / r);
}

/* PEFT has LoRA-FA as an optimizer (create_lorafa_optimizer) over a plain
 * LoRA: its adapters are LORA adapters, which a reader takes as lora. */
static const pr_ext_peft_config fa_peft = { .struct_size = sizeof(pr_ext_peft_config), .no_import = 1,
                                            .write = peft_write_lora, .gguf_adapter = "lora" };

static const void *fa_extension(const char *uri)
{
    return strcmp(uri, PR_EXT_PEFT_CONFIG_URI) ? NULL : &fa_peft;
}

static const pr_technique fa_technique = {
    .struct_size = sizeof(pr_technique),
    .abi_major = PR_ABI_MAJOR,
    .name = "lora_fa",
    .version = "1.0.0",
    .summary = "LoRA with the down projection A frozen after its random init: only B trains, "
               "y += (alpha/r) x.A^T.B^T. Default site qkv (PEFT's c_attn for GPT-2).",
    .citation = "Zhang, Zhang, Shi, Chu, Li (2023). LoRA-FA: Memory-efficient Low-rank Adaptation "
                "for Large Language Models Fine-tuning. arXiv:2308.03303",
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
    .options = fa_options,
    .n_options = N_OPTS,
    .sites = PR_SITE_BIT(PR_SITE_QKV) | PR_SITE_BIT(PR_SITE_Q) | PR_SITE_BIT(PR_SITE_K) |
             PR_SITE_BIT(PR_SITE_V) | PR_SITE_BIT(PR_SITE_O) | PR_SITE_BIT(PR_SITE_FFN_UP) |
             PR_SITE_BIT(PR_SITE_FFN_GATE) | PR_SITE_BIT(PR_SITE_FFN_DOWN),
    .default_sites = PR_SITE_BIT(PR_SITE_QKV),
    .default_sites_llama = PR_SITE_BIT(PR_SITE_Q) | PR_SITE_BIT(PR_SITE_V),
    .params = fa_params,
    .n_params = N_PARAMS,
    .saved = fa_saved,
    .n_saved = N_SAVED,
    .scratch = fa_scratch,
    .n_scratch = N_SCRATCH,
    .scale = fa_scale,
    .param_formula = "trained per insertion: r * d_out (lora_B); frozen: r * d_in (lora_A, saved); "
                     "r resolved per site; GPT-2 small, r = 8 at c_attn: 12 * 8 * 2304 = 221,184 "
                     "trained, 73,728 frozen",
    .forward = fa_forward,
    .backward = fa_backward,
    .merge = fa_merge,
    .peft_type = "LORA",
    .extension_data = fa_extension,
};

static const pr_technique *const fa_techniques[] = { &fa_technique };

static const pr_plugin fa_plugin = {
    .struct_size = sizeof(pr_plugin),
    .abi_major = PR_ABI_MAJOR,
    .name = "lora_fa",
    .version = "1.0.0",
    .n_techniques = 1,
    .techniques = fa_techniques,
};

PR_PLUGIN_EXPORT const pr_plugin *peftref_plugin_entry(const pr_entry_args *args)
{
    (void)args; /* a built-in plugin needs none of the host's entry arguments */
    return &fa_plugin;
}
