/* example_gain: a learned per-channel gain on a hidden state,
 *
 *     y <- y * l        l (d_out), ones at the start
 *
 * in the manner of (IA)^3 (Liu et al. 2022, arXiv 2205.05638), which
 * rescales keys, values and the FFN activation.  The host implements the
 * RESCALE integration: forward returns h = l as ONE row of d_out, the host
 * multiplies every row of y by it; backward receives dh = sum over rows of
 * dy * y (one row; summing whatever rows arrive keeps this correct for a
 * host that hands them unsummed). */
#include "pack.h"

enum { PARAM_GAIN, N_PARAMS };

static const pr_param_decl params[N_PARAMS] = {
    [PARAM_GAIN] = {
        .struct_size = sizeof(pr_param_decl), .name = "gain", .shape = "d_out",
        .init = PR_INIT_ONES, .scope = PR_SCOPE_INSERTION, .flags = PR_PARAM_NO_DECAY,
        .help = "per-channel gain, ones so that the module starts as the identity",
    },
};

/* forward: out (1, d_out) = l */
static int gain_forward(const pr_ctx *ctx)
{
    const pr_tensor *l = ctx->params[PARAM_GAIN];
    if (!ctx->out->data || ctx->out->shape[1] != l->shape[0])
        return ctx->host->error(ctx, "example_gain: output width %lld, gain width %lld",
                                (long long)ctx->out->shape[1], (long long)l->shape[0]);
    const float *g = l->data;
    float *out = ctx->out->data;
    for (int64_t j = 0; j < l->shape[0]; j++)
        out[j] = g[j];
    return 0;
}

/* backward: dl += sum over the rows of d_out (host->col_sums) */
static int gain_backward(const pr_ctx *ctx)
{
    float *dl = ctx->grads ? ctx->grads[PARAM_GAIN]->data : NULL;
    if (!dl)
        return 0;
    const pr_tensor *dh = ctx->d_out;
    ctx->host->col_sums(dl, dh->data, (int)dh->stride[0], (int)dh->shape[0], (int)dh->shape[1]);
    return 0;
}

const pr_technique example_gain = {
    .struct_size = sizeof(pr_technique),
    .abi_major = PR_ABI_MAJOR,
    .name = "example_gain",
    .version = PACKAGE_VERSION,
    .summary = "A learned per-channel gain on keys, values or the FFN activation: y <- y * l",
    .citation = "after Liu et al. (2022), Few-Shot Parameter-Efficient Fine-Tuning is Better and "
                "Cheaper than In-Context Learning, arXiv:2205.05638",
    .license = "MIT",
    .intra = PR_INTRA_NONE,
    .inter = PR_INTER_FIXED,
    .adaptation = PR_ADAPT_RESCALING,
    .sharing = PR_SHARE_NONE,
    .input = PR_INPUT_NONE,
    .insertion = PR_INSERT_SEQUENTIAL,
    .insertions = PR_INSERTIONS_PER_SITE_LAYER,
    .integration = PR_INTEGRATE_RESCALE,
    .workspace = PR_WS_ATTENTION | PR_WS_FFN,
    .sites = PR_SITE_BIT(PR_SITE_ATTN_K) | PR_SITE_BIT(PR_SITE_ATTN_V) |
             PR_SITE_BIT(PR_SITE_FFN_ACT),
    .default_sites = PR_SITE_BIT(PR_SITE_ATTN_K) | PR_SITE_BIT(PR_SITE_ATTN_V) |
                     PR_SITE_BIT(PR_SITE_FFN_ACT),
    .params = params,
    .n_params = N_PARAMS,
    .param_formula = "d_out per insertion: L * (d_k + d_v + d_ff) at the default sites",
    .forward = gain_forward,
    .backward = gain_backward,
};
