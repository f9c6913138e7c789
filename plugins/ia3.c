/* (IA)^3: infused adapter by inhibiting and amplifying inner activations
 * (Liu, Tam, Muqeeth, Mohta, Huang, Bansal, Raffel 2022, "Few-Shot
 * Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
 * Learning", arXiv 2205.05638).
 *
 * Three learned vectors per layer rescale, element-wise, the keys and the
 * values entering attention and the FFN's hidden activation:
 *
 *     attn.k    k  <- l_k  (.) k     l_k  (n_kv_heads * d_head)
 *     attn.v    v  <- l_v  (.) v     l_v  (n_kv_heads * d_head)
 *     ffn.act   a  <- l_ff (.) a     l_ff (d_ff),  a = gelu(x W_up + b_up)
 *
 * On LLaMA-family models the defaults are the k and v projection sites
 * (k_proj's output is the keys before RoPE, which is where Hugging Face
 * PEFT scales them; attn.k follows RoPE and does not fold into k_proj)
 * and ffn.act, the input of down_proj (silu(gate) * up).
 *
 * each initialised to ones, so the adapted model starts as the base model
 * (the paper, §3.3; Hugging Face PEFT's init_ia3_weights).  Parameter name
 * ia3_l as in Hugging Face PEFT.  Trainable parameters: L * (2 * d_kv +
 * d_ff), 3L insertions.
 *
 * The host integrates (PR_INTEGRATE_RESCALE): forward returns one row
 * (1, width) = l and the host multiplies every row of the site's values by
 * it; backward receives that row's gradient dl = sum_rows(dy * y_old) and
 * accumulates it.  The vector does not depend on the module's input, so
 * there is no input gradient to give (the host passes dy * l upstream).
 *
 * merge folds l into the frozen weight the values come from or go to
 * (plugin.h): at attn.k / attn.v the k / v column slice W [d_model, d_kv]
 * of the fused c_attn projection and its bias b, whose columns scale,
 *     delta W = W diag(l - 1),   delta b = b (.) (l - 1);
 * at ffn.act the down projection W [d_ff, d_model] whose rows scale,
 *     delta W = diag(l - 1) W    (its bias is added after, untouched).
 *
 * This file includes only peftref's public plugin headers (plugin.h,
 * ext/peft_config.h), its PEFT codecs (peft/codecs.h) and libc, and links against
 * nothing of peftref. */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <peftref/plugin.h>
#include <peftref/ext/peft_config.h>

#include "peft/codecs.h"

PR_PLUGIN_EXPORT const pr_plugin *peftref_plugin_entry(const pr_entry_args *args);

enum { PARAM_L, N_PARAMS };
enum { SCRATCH_W, N_SCRATCH };

static const pr_param_decl ia3_params[N_PARAMS] = {
    [PARAM_L] = {
        .struct_size = sizeof(pr_param_decl), .name = "ia3_l", .shape = "d_out",
        .init = PR_INIT_ONES, .scope = PR_SCOPE_INSERTION,
        /* Hugging Face PEFT's name, at the projection the vector folds
         * into: (d, 1) at a k / v projection ((d_q + 2 d_kv, 1) at GPT-2's
         * fused c_attn, q rows ones) and (1, d_ff) at the down projection */
        .peft_key = "{prefix}.ia3_l",
        .peft_layout = PR_PEFT_FOLD_VECTOR,
        .help = "the rescaling vector: l_k at attn.k, l_v at attn.v, l_ff at ffn.act; ones, so "
                "the module starts as the identity (Liu et al. 2022, §3.3)",
    },
};

/* merge only: the frozen weight in f32, [d_model, d_kv] (attn.k, attn.v)
 * or [d_ff, d_model] (ffn.act); d_out is the site's width */
static const pr_buffer_decl ia3_scratch[N_SCRATCH] = {
    [SCRATCH_W] = { .struct_size = sizeof(pr_buffer_decl), .name = "base_w",
                    .shape = "d_model, d_out" },
};

static int row_stride(const pr_tensor *t)
{
    return (int)(t->stride[0] ? t->stride[0] : t->shape[1]);
}

/* The vector of this insertion and its length. */
static int ia3_vector(const pr_ctx *ctx, const float **l, int *n)
{
    if (ctx->n_params < N_PARAMS || !ctx->params || !ctx->params[PARAM_L]->data)
        return ctx->host->error(ctx, "ia3: expected its parameter ia3_l, got %u parameters",
                                ctx->n_params);
    const pr_tensor *p = ctx->params[PARAM_L];
    if (p->ndim != 1 || p->shape[0] < 1)
        return ctx->host->error(ctx, "ia3: ia3_l must be a vector (d_out)");
    *l = p->data;
    *n = (int)p->shape[0];
    return 0;
}

/* forward: out (1, n) = l. */
static int ia3_forward(const pr_ctx *ctx)
{
    const float *l;
    int n, rc = ia3_vector(ctx, &l, &n);
    if (rc)
        return rc;
    if (!ctx->out->data || ctx->out->ndim != 2 || ctx->out->shape[0] < 1 || ctx->out->shape[1] != n)
        return ctx->host->error(ctx, "ia3: forward output must be one row of %d (the site's width), "
                                     "got (%lld, %lld)", n, (long long)ctx->out->shape[0],
                                (long long)ctx->out->shape[1]);
    memcpy(ctx->out->data, l, (size_t)n * sizeof(float));
    return 0;
}

/* backward: d_out (1, n) = dl; grad(l) += dl.  No input gradient. */
static int ia3_backward(const pr_ctx *ctx)
{
    const float *l;
    int n, rc = ia3_vector(ctx, &l, &n);
    if (rc)
        return rc;
    if (!ctx->d_out->data || ctx->d_out->shape[1] != n)
        return ctx->host->error(ctx, "ia3: backward needs d_out, one row of %d", n);
    float *g = ctx->grads ? ctx->grads[PARAM_L]->data : NULL;
    if (!g)
        return 0;
    const float *dl = ctx->d_out->data;
    for (int j = 0; j < n; j++)
        g[j] += dl[j];
    return 0;
}

/* merge: see the header.  The frozen weight comes in f32 and [in, out]
 * orientation from host->base_weight_f32 (whatever its storage dtype or
 * layout) into the scratch buffer base_w: [d_model, d_kv] at attn.k /
 * attn.v, [d_ff, d_model] at ffn.act, d_model * d_out floats either way.
 * out is the delta in the same [in, out] orientation; bias_delta (cols)
 * when base_bias is set. */
static int ia3_merge(const pr_ctx *ctx)
{
    const pr_host *host = ctx->host;
    const float *l;
    int n, rc = ia3_vector(ctx, &l, &n);
    if (rc)
        return rc;
    const pr_tensor *w = ctx->base_weight;
    if (!w || w->ndim != 2)
        return host->error(ctx, "ia3: merge needs the frozen weight the site folds into");
    const int out_in = ctx->base_layout == PR_WEIGHT_OUT_IN;
    const int rows = (int)w->shape[out_in ? 1 : 0], cols = (int)w->shape[out_in ? 0 : 1];
    if (!ctx->out->data || ctx->out->shape[0] != rows || ctx->out->shape[1] != cols)
        return host->error(ctx, "ia3: merge output must be shaped like the weight [%d, %d]", rows, cols);
    if (ctx->n_scratch < N_SCRATCH || !ctx->scratch[SCRATCH_W]->data ||
        ctx->scratch[SCRATCH_W]->shape[0] * ctx->scratch[SCRATCH_W]->shape[1] < (int64_t)rows * cols)
        return host->error(ctx, "ia3: scratch buffer 'base_w' must hold the [%d, %d] frozen weight",
                           rows, cols);
    float *W = ctx->scratch[SCRATCH_W]->data;
    if (host->base_weight_f32(ctx, W) != 0)
        return host->error(ctx, "ia3: the host gave no frozen weight to fold l into");
    const int ldo = row_stride(ctx->out);
    float *dW = ctx->out->data;

    if (ctx->site == PR_SITE_FFN_ACT) {
        /* the values go to the down projection: scale its rows */
        if (rows != n)
            return host->error(ctx, "ia3: the down projection has %d rows, ia3_l has %d", rows, n);
        for (int i = 0; i < rows; i++)
            for (int j = 0; j < cols; j++)
                dW[(size_t)i * ldo + j] = (l[i] - 1.0f) * W[(size_t)i * cols + j];
        return 0;
    }
    if (ctx->site != PR_SITE_ATTN_K && ctx->site != PR_SITE_ATTN_V && ctx->site != PR_SITE_K &&
        ctx->site != PR_SITE_V)
        return host->error(ctx, "ia3: cannot merge at this site (k, v, attn.k, attn.v, ffn.act only)");
    /* the values come from the k / v projection: scale its columns and bias */
    if (cols != n)
        return host->error(ctx, "ia3: the projection has %d columns, ia3_l has %d", cols, n);
    for (int i = 0; i < rows; i++)
        for (int j = 0; j < cols; j++)
            dW[(size_t)i * ldo + j] = W[(size_t)i * cols + j] * (l[j] - 1.0f);
    if (ctx->base_bias && ctx->base_bias->data) {
        /* bias_delta arrived with ABI 1.0's final pr_ctx; read it only when
         * the host's struct covers it */
        const pr_tensor *bd = ctx->struct_size >= offsetof(pr_ctx, bias_delta) + sizeof(ctx->bias_delta)
                                  ? ctx->bias_delta : NULL;
        if (!bd || !bd->data || bd->shape[0] != cols)
            return host->error(ctx, "ia3: the projection has a bias but the host gave no bias delta "
                                    "of %d to fold l into", cols);
        const float *b = ctx->base_bias->data;
        float *db = bd->data;
        for (int j = 0; j < cols; j++)
            db[j] = b[j] * (l[j] - 1.0f);
    }
    return 0;
}

static const pr_ext_peft_config peft_ia3 = {
    .struct_size = sizeof(pr_ext_peft_config),
    .read = peft_read_ia3,
    .write = peft_write_ia3,
};

static const void *peft_ia3_extension(const char *uri)
{
    return strcmp(uri, PR_EXT_PEFT_CONFIG_URI) ? NULL : &peft_ia3;
}

static const pr_technique ia3_technique = {
    .struct_size = sizeof(pr_technique),
    .abi_major = PR_ABI_MAJOR,
    .name = "ia3",
    .version = "1.0.0",
    .summary = "(IA)^3: learned vectors rescale the keys, the values and the FFN activation of "
               "every layer, k <- l_k*k, v <- l_v*v, a <- l_ff*a; ones at init, mergeable into "
               "the key/value projection columns and the down projection rows.",
    .citation = "Liu, Tam, Muqeeth, Mohta, Huang, Bansal, Raffel (2022). Few-Shot "
                "Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning. "
                "arXiv:2205.05638",
    .license = "MIT",
    .intra = PR_INTRA_NONE,
    .inter = PR_INTER_FIXED,
    .adaptation = PR_ADAPT_RESCALING,
    .sharing = PR_SHARE_NONE,
    .input = PR_INPUT_HIDDEN,
    .insertion = PR_INSERT_SEQUENTIAL,
    .insertions = PR_INSERTIONS_PER_SITE_LAYER,
    .integration = PR_INTEGRATE_RESCALE,
    .workspace = PR_WS_ATTENTION | PR_WS_FFN,
    .sites = PR_SITE_BIT(PR_SITE_ATTN_K) | PR_SITE_BIT(PR_SITE_ATTN_V) |
             PR_SITE_BIT(PR_SITE_FFN_ACT) | PR_SITE_BIT(PR_SITE_K) | PR_SITE_BIT(PR_SITE_V),
    .default_sites = PR_SITE_BIT(PR_SITE_ATTN_K) | PR_SITE_BIT(PR_SITE_ATTN_V) |
                     PR_SITE_BIT(PR_SITE_FFN_ACT),
    /* Hugging Face PEFT's LLaMA targets: k_proj, v_proj (their outputs;
     * the keys before RoPE) and down_proj as feed-forward (its input) */
    .default_sites_llama = PR_SITE_BIT(PR_SITE_K) | PR_SITE_BIT(PR_SITE_V) | PR_SITE_BIT(PR_SITE_FFN_ACT),
    .params = ia3_params,
    .n_params = N_PARAMS,
    .scratch = ia3_scratch,
    .n_scratch = N_SCRATCH,
    .param_formula = "per insertion: d_out (the site's width); insertions = 3L (attn.k, attn.v, "
                     "ffn.act): L * (2 * n_kv_heads * d_head + d_ff)",
    .forward = ia3_forward,
    .backward = ia3_backward,
    .merge = ia3_merge,
    .peft_type = "IA3",
    .extension_data = peft_ia3_extension,
};

static const pr_technique *const ia3_techniques[] = { &ia3_technique };

static const pr_plugin ia3_plugin = {
    .struct_size = sizeof(pr_plugin),
    .abi_major = PR_ABI_MAJOR,
    .name = "ia3",
    .version = "1.0.0",
    .n_techniques = 1,
    .techniques = ia3_techniques,
};

PR_PLUGIN_EXPORT const pr_plugin *peftref_plugin_entry(const pr_entry_args *args)
{
    (void)args; /* a built-in plugin needs none of the host's entry arguments */
    return &ia3_plugin;
}
