/* LoHa: low-rank Hadamard-product update of a frozen projection
 * (Hyeon-Woo, Ye-Bin, Oh 2022, "FedPara: Low-Rank Hadamard Product for
 * Communication-Efficient Federated Learning", arXiv 2108.06098), as
 * Hugging Face PEFT's LoHa (LyCORIS) implements it for an nn.Linear.
 *
 * Parameters, named and shaped as PEFT's LoHaLayer (W is PEFT's
 * [d_out, d_in] orientation):
 *
 *     hada_w1_a (d_out, r)  kaiming_uniform(a = sqrt(5))
 *     hada_w1_b (r, d_in)   kaiming_uniform(a = sqrt(5))
 *     hada_w2_a (d_out, r)  kaiming_uniform(a = sqrt(5))
 *     hada_w2_b (r, d_in)   zeros, so dW = 0 and the module starts as the
 *                           identity (PEFT's reset_adapter_parameters)
 *
 *     dW = s * (w1_a . w1_b) (.) (w2_a . w2_b)      [d_out, d_in],  s = alpha / r
 *
 * Integration: PR_INTEGRATE_WEIGHT_DELTA.  PEFT's forward builds the delta
 * weight and applies it (F.linear(x, dW)); the host's weight-delta form is
 * exactly that: it calls merge() at every forward for dW^T in its
 * [d_in, d_out] orientation and adds x . dW^T; backward() receives
 * G = x^T dy [d_in, d_out], the gradient of merge()'s output, and turns it
 * into the factors' gradients.  merge() is also what pr_module_merge
 * folds into the frozen weight.
 *
 * Not implemented (PEFT's defaults switch them off): rank_dropout and
 * module_dropout (both 0.0 in PEFT), use_effective_conv2d (convolutions
 * only; peftref adapts projections).
 *
 * Scratch (per call): P1 = w1_a.w1_b, P2 = w2_a.w2_b and dP, each
 * (d_out, d_in).  This file includes only peftref's public plugin headers (plugin.h,
 * ext/peft_config.h), its PEFT codecs (peft/codecs.h) and libc. */
#include <stdint.h>

#include <string.h>

#include <peftref/plugin.h>
#include <peftref/ext/peft_config.h>

#include "peft/codecs.h"

PR_PLUGIN_EXPORT const pr_plugin *peftref_plugin_entry(const pr_entry_args *args);

enum { OPT_R, OPT_ALPHA, N_OPTS };
enum { PARAM_W1A, PARAM_W1B, PARAM_W2A, PARAM_W2B, N_PARAMS };
enum { SCRATCH_P1, SCRATCH_P2, SCRATCH_DP, N_SCRATCH };

static const pr_option_decl loha_options[N_OPTS] = {
    [OPT_R] = {
        .struct_size = sizeof(pr_option_decl), .name = "r", .type = PR_OPT_INT,
        .def = 8, .min = 1, .max = 4096, .per_site = 1,
        .help = "rank of each of the two factor products; default 8 as Hugging Face PEFT's LoHaConfig r",
    },
    [OPT_ALPHA] = {
        .struct_size = sizeof(pr_option_decl), .name = "alpha", .type = PR_OPT_FLOAT,
        .def = 8, .min = 0, .max = 1e6, .per_site = 1,
        .help = "scaling numerator: dW is scaled by alpha/r; default 8 as PEFT's LoHaConfig alpha",
    },
};

static const pr_param_decl loha_params[N_PARAMS] = {
    [PARAM_W1A] = {
        .struct_size = sizeof(pr_param_decl), .name = "hada_w1_a", .shape = "d_out, r",
        .init = PR_INIT_KAIMING_UNIFORM, .init_arg = "sqrt(5)", .scope = PR_SCOPE_INSERTION,
        .peft_key = "{prefix}.hada_w1_a", .peft_layout = PR_PEFT_AS_IS,
        .help = "first product's left factor; kaiming_uniform(a=sqrt(5)) as PEFT",
    },
    [PARAM_W1B] = {
        .struct_size = sizeof(pr_param_decl), .name = "hada_w1_b", .shape = "r, d_in",
        .init = PR_INIT_KAIMING_UNIFORM, .init_arg = "sqrt(5)", .scope = PR_SCOPE_INSERTION,
        .peft_key = "{prefix}.hada_w1_b", .peft_layout = PR_PEFT_AS_IS,
        .help = "first product's right factor; kaiming_uniform(a=sqrt(5)) as PEFT",
    },
    [PARAM_W2A] = {
        .struct_size = sizeof(pr_param_decl), .name = "hada_w2_a", .shape = "d_out, r",
        .init = PR_INIT_KAIMING_UNIFORM, .init_arg = "sqrt(5)", .scope = PR_SCOPE_INSERTION,
        .peft_key = "{prefix}.hada_w2_a", .peft_layout = PR_PEFT_AS_IS,
        .help = "second product's left factor; kaiming_uniform(a=sqrt(5)) as PEFT",
    },
    [PARAM_W2B] = {
        .struct_size = sizeof(pr_param_decl), .name = "hada_w2_b", .shape = "r, d_in",
        .init = PR_INIT_ZEROS, .scope = PR_SCOPE_INSERTION,
        .peft_key = "{prefix}.hada_w2_b", .peft_layout = PR_PEFT_AS_IS,
        .help = "second product's right factor; zeros, so the module starts as the identity",
    },
};

static const pr_buffer_decl loha_scratch[N_SCRATCH] = {
    [SCRATCH_P1] = { .struct_size = sizeof(pr_buffer_decl), .name = "p1", .shape = "d_out, d_in" },
    [SCRATCH_P2] = { .struct_size = sizeof(pr_buffer_decl), .name = "p2", .shape = "d_out, d_in" },
    [SCRATCH_DP] = { .struct_size = sizeof(pr_buffer_decl), .name = "dp", .shape = "d_out, d_in" },
};

static int row_stride(const pr_tensor *t)
{
    return (int)(t->stride[0] ? t->stride[0] : t->shape[1]);
}

typedef struct loha_dims {
    int r, d_in, d_out;
    const float *w1a, *w1b, *w2a, *w2b;
    float *p1, *p2, *dp;
} loha_dims;

/* Reads the shapes, and builds P1 and P2 in scratch. */
static int loha_build(const pr_ctx *ctx, loha_dims *d)
{
    const pr_host *host = ctx->host;
    if (ctx->n_params < N_PARAMS || ctx->n_scratch < N_SCRATCH)
        return host->error(ctx, "loha: expected %d parameters and %d scratch buffers, got %u and %u",
                           N_PARAMS, N_SCRATCH, ctx->n_params, ctx->n_scratch);
    const pr_tensor *a1 = ctx->params[PARAM_W1A], *b1 = ctx->params[PARAM_W1B];
    const pr_tensor *a2 = ctx->params[PARAM_W2A], *b2 = ctx->params[PARAM_W2B];
    if (a1->ndim != 2 || b1->ndim != 2 || a2->ndim != 2 || b2->ndim != 2 || !a1->data || !b1->data ||
        !a2->data || !b2->data || a1->shape[1] != b1->shape[0] || a2->shape[0] != a1->shape[0] ||
        a2->shape[1] != a1->shape[1] || b2->shape[0] != b1->shape[0] || b2->shape[1] != b1->shape[1])
        return host->error(ctx, "loha: hada_w*_a must be (d_out, r) and hada_w*_b (r, d_in)");
    d->d_out = (int)a1->shape[0];
    d->r = (int)a1->shape[1];
    d->d_in = (int)b1->shape[1];
    d->w1a = a1->data;
    d->w1b = b1->data;
    d->w2a = a2->data;
    d->w2b = b2->data;
    d->p1 = ctx->scratch[SCRATCH_P1]->data;
    d->p2 = ctx->scratch[SCRATCH_P2]->data;
    d->dp = ctx->scratch[SCRATCH_DP]->data;
    if (!d->p1 || !d->p2 || !d->dp)
        return host->error(ctx, "loha: a scratch buffer is missing");
    /* P (d_out, d_in) = w_a (d_out, r) . w_b (r, d_in) */
    host->gemm(0, 0, d->d_out, d->d_in, d->r, 1.0f, d->w1a, d->r, d->w1b, d->d_in, 0.0f, d->p1, d->d_in);
    host->gemm(0, 0, d->d_out, d->d_in, d->r, 1.0f, d->w2a, d->r, d->w2b, d->d_in, 0.0f, d->p2, d->d_in);
    return 0;
}

/* merge: out [d_in, d_out] = s * (P1 (.) P2)^T, s = ctx->scale = alpha / r. */
static int loha_merge(const pr_ctx *ctx)
{
    loha_dims d;
    int rc = loha_build(ctx, &d);
    if (rc)
        return rc;
    if (!ctx->out->data || ctx->out->shape[0] != d.d_in || ctx->out->shape[1] != d.d_out)
        return ctx->host->error(ctx, "loha: merge output must be [%d, %d]", d.d_in, d.d_out);
    float *out = ctx->out->data;
    const int ld = row_stride(ctx->out);
    const float s = ctx->scale;
    for (int o = 0; o < d.d_out; o++) {
        const float *q1 = d.p1 + (size_t)o * d.d_in, *q2 = d.p2 + (size_t)o * d.d_in;
        for (int i = 0; i < d.d_in; i++)
            out[(size_t)i * ld + o] = s * q1[i] * q2[i];
    }
    return 0;
}

/* forward (not called by the host for a weight delta, which calls merge()
 * instead; for direct use): out (rows, d_out) = x . dW^T-in-[d_in, d_out], i.e.
 * h = s * x . (P1 (.) P2)^T. */
static int loha_forward(const pr_ctx *ctx)
{
    loha_dims d;
    int rc = loha_build(ctx, &d);
    if (rc)
        return rc;
    if (!ctx->in->data || !ctx->out->data || ctx->in->shape[1] != d.d_in || ctx->out->shape[1] != d.d_out)
        return ctx->host->error(ctx, "loha: forward needs in (rows, %d) and out (rows, %d)", d.d_in, d.d_out);
    const size_t n = (size_t)d.d_out * d.d_in;
    for (size_t k = 0; k < n; k++)
        d.dp[k] = ctx->scale * d.p1[k] * d.p2[k];
    ctx->host->gemm(0, 1, ctx->rows, d.d_out, d.d_in, 1.0f, ctx->in->data, row_stride(ctx->in), d.dp, d.d_in,
                    0.0f, ctx->out->data, row_stride(ctx->out));
    return 0;
}

/* backward: d_out = G [d_in, d_out], the gradient of merge()'s output.
 *   dP1 = s * G^T (.) P2,  dw1_a += dP1 . w1_b^T,  dw1_b += w1_a^T . dP1
 *   dP2 = s * G^T (.) P1,  dw2_a += dP2 . w2_b^T,  dw2_b += w2_a^T . dP2 */
static int loha_backward(const pr_ctx *ctx)
{
    const pr_host *host = ctx->host;
    loha_dims d;
    int rc = loha_build(ctx, &d);
    if (rc)
        return rc;
    if (!ctx->d_out->data || ctx->d_out->shape[0] != d.d_in || ctx->d_out->shape[1] != d.d_out)
        return host->error(ctx, "loha: backward needs d_out [%d, %d]", d.d_in, d.d_out);
    const float *g = ctx->d_out->data;
    const int ldg = row_stride(ctx->d_out);
    const float s = ctx->scale;
    for (int pass = 0; pass < 2; pass++) {
        float *da = ctx->grads ? ctx->grads[pass ? PARAM_W2A : PARAM_W1A]->data : NULL;
        float *db = ctx->grads ? ctx->grads[pass ? PARAM_W2B : PARAM_W1B]->data : NULL;
        if (!da && !db)
            continue;
        const float *other = pass ? d.p1 : d.p2;
        for (int o = 0; o < d.d_out; o++)
            for (int i = 0; i < d.d_in; i++)
                d.dp[(size_t)o * d.d_in + i] = s * g[(size_t)i * ldg + o] * other[(size_t)o * d.d_in + i];
        const float *wa = pass ? d.w2a : d.w1a, *wb = pass ? d.w2b : d.w1b;
        if (da) /* (d_out, r) += dP (d_out, d_in) . w_b^T */
            host->gemm(0, 1, d.d_out, d.r, d.d_in, 1.0f, d.dp, d.d_in, wb, d.d_in, 1.0f, da, d.r);
        if (db) /* (r, d_in) += w_a^T . dP */
            host->gemm(1, 0, d.r, d.d_in, d.d_out, 1.0f, wa, d.r, d.dp, d.d_in, 1.0f, db, d.d_in);
    }
    return 0;
}

static const pr_ext_peft_config peft_loha = {
    .struct_size = sizeof(pr_ext_peft_config),
    .read = peft_read_loha,
    .write = peft_write_loha,
};

static const void *peft_loha_extension(const char *uri)
{
    return strcmp(uri, PR_EXT_PEFT_CONFIG_URI) ? NULL : &peft_loha;
}

static const pr_technique loha_technique = {
    .struct_size = sizeof(pr_technique),
    .abi_major = PR_ABI_MAJOR,
    .name = "loha",
    .version = "1.0.0",
    .summary = "Low-rank Hadamard update dW = (alpha/r) (w1_a.w1_b) (.) (w2_a.w2_b) of a frozen "
               "projection, rebuilt every forward and mergeable (Hugging Face PEFT's LoHa for nn.Linear). "
               "Default site qkv (the fused c_attn).",
    .citation = "Hyeon-Woo, Ye-Bin, Oh (2022). FedPara: Low-Rank Hadamard Product for "
                "Communication-Efficient Federated Learning. ICLR 2022. arXiv:2108.06098",
    .license = "MIT",
    .intra = PR_INTRA_FACTORISED,
    .inter = PR_INTER_FIXED,
    .adaptation = PR_ADAPT_REPARAMETERISATION,
    .sharing = PR_SHARE_NONE,
    .input = PR_INPUT_HIDDEN,
    .insertion = PR_INSERT_PARALLEL,
    .insertions = PR_INSERTIONS_PER_SITE_LAYER,
    .integration = PR_INTEGRATE_WEIGHT_DELTA,
    .workspace = PR_WS_ATTENTION | PR_WS_FFN,
    .options = loha_options,
    .n_options = N_OPTS,
    .sites = PR_SITE_BIT(PR_SITE_QKV) | PR_SITE_BIT(PR_SITE_Q) | PR_SITE_BIT(PR_SITE_K) |
             PR_SITE_BIT(PR_SITE_V) | PR_SITE_BIT(PR_SITE_O) | PR_SITE_BIT(PR_SITE_FFN_UP) |
             PR_SITE_BIT(PR_SITE_FFN_DOWN),
    .default_sites = PR_SITE_BIT(PR_SITE_QKV),
    .default_sites_llama = PR_SITE_BIT(PR_SITE_Q) | PR_SITE_BIT(PR_SITE_V),
    .params = loha_params,
    .n_params = N_PARAMS,
    .scratch = loha_scratch,
    .n_scratch = N_SCRATCH,
    .scale_expr = "alpha / r",
    .param_formula = "per insertion: 2 * r * (d_in + d_out) (hada_w1_a, hada_w2_a d_out x r; "
                     "hada_w1_b, hada_w2_b r x d_in); insertions = chosen sites x chosen layers "
                     "(default qkv: L)",
    /* per token: x . dW (2 d_in d_out); building dW costs 4 r d_in d_out + 2 d_in d_out
     * per call, not per token */
    .flops_per_token = "2 * d_in * d_out",
    .forward = loha_forward,
    .backward = loha_backward,
    .merge = loha_merge,
    .peft_type = "LOHA",
    .extension_data = peft_loha_extension,
};

static const pr_technique *const loha_techniques[] = { &loha_technique };

static const pr_plugin loha_plugin = {
    .struct_size = sizeof(pr_plugin),
    .abi_major = PR_ABI_MAJOR,
    .name = "loha",
    .version = "1.0.0",
    .n_techniques = 1,
    .techniques = loha_techniques,
};

PR_PLUGIN_EXPORT const pr_plugin *peftref_plugin_entry(const pr_entry_args *args)
{
    (void)args;
    return &loha_plugin;
}
