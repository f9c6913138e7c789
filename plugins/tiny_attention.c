/* Tiny-attention adapter (Zhao, Tan, Mei 2022, "Tiny-Attention Adapter:
 * Contexts Are More Important Than the Number of Parameters", EMNLP 2022,
 * arXiv 2211.01979).
 *
 * A multi-head attention with a tiny per-head dimension beside the
 * attention sub-layer (parallel insertion at attn_out): its input x is the
 * sub-layer's input, the normalised hidden state entering attention, and
 * its output is added, scaled, to the attention output:
 *
 *     q = x Wq^T + bq,  k = x Wk^T,  v = x Wv^T + bv       (rows, H*dh)
 *     per sequence b and head j, causal over the T positions of b:
 *       P[t, s] = softmax_{s <= t}(q_t . k_s / sqrt(dh)),  u_t = sum_s P[t, s] v_s
 *     h = u Wo^T + bo                                      (rows, d)
 *     y <- y + scale * h
 *
 * The model is a causal language model, so position t attends only to
 * positions s <= t of its own sequence (rows are B sequences of T
 * positions; T counts any virtual positions a concatenation module adds).
 *
 * Parameters per insertion, in the layout of a PyTorch nn.Linear (weight
 * (out, in)):
 *     q_weight, k_weight, v_weight   (H*dh, d)   uniform(+-1/sqrt(d)), nn.Linear's init
 *     q_bias, v_bias                 (H*dh)      uniform(+-1/sqrt(d)), nn.Linear's init
 *     o_weight                       (d, H*dh)   zeros: the module starts as the identity
 *     o_bias                         (d)         zeros
 * so 4*d*H*dh + 2*H*dh + d per insertion.  There is no key bias: it adds
 * q_t . b_k to every score of row t, which the softmax cancels, so it could
 * never receive a gradient.
 *
 * Defaults: one head of dimension 1 (heads = 1, head_dim = 1), the
 * configuration of the paper's reference implementation (attention
 * embedding 1, one head), which is where its 0.05% of RoBERTa-large comes
 * from.  Differences from that implementation: it normalises x with a
 * LayerNorm of its own, where peftref uses the model's frozen pre-attention
 * norm (the site's input is already normalised); its projection d -> 3A
 * followed by nn.MultiheadAttention's A -> A in-projections is one linear
 * map, kept here as one; its output projection starts at 0.01 times the
 * default init, here at zero; it applies dropout 0.1 to the attention
 * probabilities, which peftref does not.
 *
 * Saved for backward per insertion: qkv (rows, 3*H*dh), the attention
 * probabilities P (B, H, T, T; zero above the diagonal) and u (rows, H*dh).
 * Scratch: d_u (rows, H*dh), d_qkv (rows, 3*H*dh), one row of dP (T).
 *
 * This file includes only <peftref/plugin.h> and libc/libm, and links
 * against nothing of peftref: the projections go through host->gemm, their
 * biases and bias gradients through host->add_bias_rows and host->col_sums. */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <peftref/plugin.h>

PR_PLUGIN_EXPORT const pr_plugin *peftref_plugin_entry(const pr_entry_args *args);

enum { OPT_HEADS, OPT_HEAD_DIM, OPT_SCALE, N_OPTS };
enum { P_QW, P_QB, P_KW, P_VW, P_VB, P_OW, P_OB, N_PARAMS };

/* The q, k, v projections' weight and bias indices (k has no bias). */
static const int proj_w[3] = { P_QW, P_KW, P_VW };
static const int proj_b[3] = { P_QB, -1, P_VB };
enum { SV_QKV, SV_P, SV_U, N_SAVED };
enum { SC_DU, SC_DQKV, SC_DP, N_SCRATCH };

static const pr_option_decl ta_options[N_OPTS] = {
    [OPT_HEADS] = {
        .struct_size = sizeof(pr_option_decl), .name = "heads", .type = PR_OPT_INT,
        .def = 1, .min = 1, .max = 1024, .per_site = 1,
        .help = "number of attention heads H (the paper's reference configuration: 1)",
    },
    [OPT_HEAD_DIM] = {
        .struct_size = sizeof(pr_option_decl), .name = "head_dim", .type = PR_OPT_INT,
        .def = 1, .min = 1, .max = 1024, .per_site = 1,
        .help = "per-head dimension dh, the 'tiny' of tiny attention (the paper's reference "
                "configuration: 1)",
    },
    [OPT_SCALE] = {
        .struct_size = sizeof(pr_option_decl), .name = "scale", .type = PR_OPT_FLOAT,
        .def = 1, .min = 0, .max = 1e6, .per_site = 1,
        .help = "the module's output is added to the attention output times scale (the paper "
                "adds it unscaled: 1)",
    },
};

#define HD_ "heads * head_dim"
#define W_INIT "1 / sqrt(d_in)"

static const pr_param_decl ta_params[N_PARAMS] = {
    [P_QW] = { .struct_size = sizeof(pr_param_decl), .name = "q_weight", .shape = HD_ ", d_in",
               .init = PR_INIT_UNIFORM, .init_arg = W_INIT, .scope = PR_SCOPE_INSERTION,
               .help = "query projection (H*dh, d); nn.Linear's uniform(+-1/sqrt(d))" },
    [P_QB] = { .struct_size = sizeof(pr_param_decl), .name = "q_bias", .shape = HD_,
               .init = PR_INIT_UNIFORM, .init_arg = W_INIT, .scope = PR_SCOPE_INSERTION,
               .flags = PR_PARAM_NO_DECAY, .help = "query bias; nn.Linear's uniform(+-1/sqrt(d))" },
    [P_KW] = { .struct_size = sizeof(pr_param_decl), .name = "k_weight", .shape = HD_ ", d_in",
               .init = PR_INIT_UNIFORM, .init_arg = W_INIT, .scope = PR_SCOPE_INSERTION,
               .help = "key projection (H*dh, d); nn.Linear's uniform(+-1/sqrt(d))" },
    [P_VW] = { .struct_size = sizeof(pr_param_decl), .name = "v_weight", .shape = HD_ ", d_in",
               .init = PR_INIT_UNIFORM, .init_arg = W_INIT, .scope = PR_SCOPE_INSERTION,
               .help = "value projection (H*dh, d); nn.Linear's uniform(+-1/sqrt(d))" },
    [P_VB] = { .struct_size = sizeof(pr_param_decl), .name = "v_bias", .shape = HD_,
               .init = PR_INIT_UNIFORM, .init_arg = W_INIT, .scope = PR_SCOPE_INSERTION,
               .flags = PR_PARAM_NO_DECAY, .help = "value bias; nn.Linear's uniform(+-1/sqrt(d))" },
    [P_OW] = { .struct_size = sizeof(pr_param_decl), .name = "o_weight", .shape = "d_out, " HD_,
               .init = PR_INIT_ZEROS, .scope = PR_SCOPE_INSERTION,
               .help = "output projection (d, H*dh); zeros, so the module starts as the identity" },
    [P_OB] = { .struct_size = sizeof(pr_param_decl), .name = "o_bias", .shape = "d_out",
               .init = PR_INIT_ZEROS, .scope = PR_SCOPE_INSERTION, .flags = PR_PARAM_NO_DECAY,
               .help = "output bias; zeros" },
};

static const pr_buffer_decl ta_saved[N_SAVED] = {
    [SV_QKV] = { .struct_size = sizeof(pr_buffer_decl), .name = "qkv", .shape = "rows, 3 * " HD_ },
    [SV_P] = { .struct_size = sizeof(pr_buffer_decl), .name = "probs", .shape = "B, heads, T, T" },
    [SV_U] = { .struct_size = sizeof(pr_buffer_decl), .name = "u", .shape = "rows, " HD_ },
};

static const pr_buffer_decl ta_scratch[N_SCRATCH] = {
    [SC_DU] = { .struct_size = sizeof(pr_buffer_decl), .name = "d_u", .shape = "rows, " HD_ },
    [SC_DQKV] = { .struct_size = sizeof(pr_buffer_decl), .name = "d_qkv", .shape = "rows, 3 * " HD_ },
    [SC_DP] = { .struct_size = sizeof(pr_buffer_decl), .name = "d_p", .shape = "T" },
};

static int row_stride(const pr_tensor *t)
{
    return (int)(t->stride[0] ? t->stride[0] : t->shape[1]);
}

typedef struct ta_dims {
    int H, dh, hd, d_in, d_out, B, T, rows;
} ta_dims;

static int ta_get_dims(const pr_ctx *ctx, ta_dims *d, int need_buffers)
{
    const pr_host *host = ctx->host;
    if (ctx->n_params < N_PARAMS || ctx->n_options < N_OPTS)
        return host->error(ctx, "tiny_attention: expected %d parameters and %d options, got %u and %u",
                           N_PARAMS, N_OPTS, ctx->n_params, ctx->n_options);
    for (int i = 0; i < N_PARAMS; i++)
        if (!ctx->params[i]->data)
            return host->error(ctx, "tiny_attention: parameter '%s' has no data", ta_params[i].name);
    d->H = (int)ctx->options[OPT_HEADS].num;
    d->dh = (int)ctx->options[OPT_HEAD_DIM].num;
    d->hd = d->H * d->dh;
    const pr_tensor *qw = ctx->params[P_QW], *ow = ctx->params[P_OW];
    if (qw->ndim != 2 || ow->ndim != 2 || qw->shape[0] != d->hd || ow->shape[1] != d->hd)
        return host->error(ctx, "tiny_attention: q_weight must be (%d, d_in) and o_weight (d_out, %d) "
                           "for heads = %d, head_dim = %d", d->hd, d->hd, d->H, d->dh);
    d->d_in = (int)qw->shape[1];
    d->d_out = (int)ow->shape[0];
    d->B = ctx->B;
    d->T = ctx->T;
    d->rows = ctx->rows;
    if (d->B < 1 || d->T < 1 || d->rows != d->B * d->T)
        return host->error(ctx, "tiny_attention: rows = %d must be B x T = %d x %d (attention runs "
                           "within each sequence)", d->rows, d->B, d->T);
    if (!need_buffers)
        return 0;
    if (ctx->n_saved < N_SAVED || ctx->n_scratch < N_SCRATCH)
        return host->error(ctx, "tiny_attention: expected %d saved and %d scratch buffers, got %u and %u",
                           N_SAVED, N_SCRATCH, ctx->n_saved, ctx->n_scratch);
    for (int i = 0; i < N_SAVED; i++)
        if (!ctx->saved[i]->data)
            return host->error(ctx, "tiny_attention: saved buffer '%s' is missing", ta_saved[i].name);
    for (int i = 0; i < N_SCRATCH; i++)
        if (!ctx->scratch[i]->data)
            return host->error(ctx, "tiny_attention: scratch buffer '%s' is missing", ta_scratch[i].name);
    const pr_tensor *p = ctx->saved[SV_P];
    if (p->ndim != 4 || p->shape[0] < d->B || p->shape[1] != d->H || p->shape[2] < d->T)
        return host->error(ctx, "tiny_attention: saved buffer 'probs' is not (B, heads, T, T) for "
                           "B = %d, heads = %d, T = %d", d->B, d->H, d->T);
    return 0;
}

#define PD(i) ((const float *)ctx->params[i]->data)

/* forward: in = x (rows, d_in) -> out = h (rows, d_out), unscaled. */
static int ta_forward(const pr_ctx *ctx)
{
    const pr_host *host = ctx->host;
    ta_dims d;
    int rc = ta_get_dims(ctx, &d, 1);
    if (rc)
        return rc;
    if (!ctx->in->data || !ctx->out->data)
        return host->error(ctx, "tiny_attention: forward needs its input and output tensors");
    if (ctx->in->shape[1] != d.d_in || ctx->out->shape[1] != d.d_out)
        return host->error(ctx, "tiny_attention: site widths %lld -> %lld, parameters expect %d -> %d",
                           (long long)ctx->in->shape[1], (long long)ctx->out->shape[1], d.d_in, d.d_out);
    const float *x = ctx->in->data;
    const int ldx = row_stride(ctx->in), hd = d.hd, ld3 = 3 * hd, T = d.T, dh = d.dh;
    float *qkv = ctx->saved[SV_QKV]->data, *P = ctx->saved[SV_P]->data, *u = ctx->saved[SV_U]->data;

    /* q | k | v (rows, 3*hd) = x . W^T + b */
    for (int w = 0; w < 3; w++) {
        float *dst = qkv + (size_t)w * hd;
        host->gemm(0, 1, d.rows, hd, d.d_in, 1.0f, x, ldx, PD(proj_w[w]), d.d_in, 0.0f, dst, ld3);
        if (proj_b[w] >= 0)
            host->add_bias_rows(dst, ld3, PD(proj_b[w]), d.rows, hd);
    }
    const float inv = 1.0f / sqrtf((float)dh);
    for (int b = 0; b < d.B; b++)
        for (int h = 0; h < d.H; h++) {
            const float *q0 = qkv + (size_t)b * T * ld3 + (size_t)h * dh;
            const float *k0 = q0 + hd, *v0 = q0 + 2 * hd;
            for (int t = 0; t < T; t++) {
                float *pt = P + (((size_t)b * d.H + h) * T + t) * T;
                const float *qt = q0 + (size_t)t * ld3;
                float mx = -INFINITY;
                for (int s = 0; s <= t; s++) {
                    const float *ks = k0 + (size_t)s * ld3;
                    float sc = 0.0f;
                    for (int j = 0; j < dh; j++)
                        sc += qt[j] * ks[j];
                    pt[s] = sc * inv;
                    mx = pt[s] > mx ? pt[s] : mx;
                }
                float sum = 0.0f;
                for (int s = 0; s <= t; s++) {
                    pt[s] = expf(pt[s] - mx);
                    sum += pt[s];
                }
                const float rs = 1.0f / sum;
                for (int s = 0; s <= t; s++)
                    pt[s] *= rs;
                for (int s = t + 1; s < T; s++)
                    pt[s] = 0.0f;
                float *ut = u + ((size_t)b * T + t) * hd + (size_t)h * dh;
                for (int j = 0; j < dh; j++)
                    ut[j] = 0.0f;
                for (int s = 0; s <= t; s++) {
                    const float *vs = v0 + (size_t)s * ld3;
                    for (int j = 0; j < dh; j++)
                        ut[j] += pt[s] * vs[j];
                }
            }
        }
    /* h (rows, d_out) = u . Wo^T + bo */
    const int ldo = row_stride(ctx->out);
    float *out = ctx->out->data;
    host->gemm(0, 1, d.rows, d.d_out, hd, 1.0f, u, hd, PD(P_OW), hd, 0.0f, out, ldo);
    host->add_bias_rows(out, ldo, PD(P_OB), d.rows, d.d_out);
    return 0;
}

/* backward: d_out = dh = scale * dy (rows, d_out).  Accumulates
 *   dWo += dh^T u,  dbo += colsum(dh),  d_u = dh Wo
 *   per sequence and head: dP[t, s] = d_u_t . v_s, dv_s += P[t, s] d_u_t,
 *   dS = P (.) (dP - sum_s P dP) / sqrt(dh), dq_t += dS k_s, dk_s += dS q_t
 *   dW_{q,k,v} += d{q,k,v}^T x,  db += colsum,  dx += d{q,k,v} W. */
static int ta_backward(const pr_ctx *ctx)
{
    const pr_host *host = ctx->host;
    ta_dims d;
    int rc = ta_get_dims(ctx, &d, 1);
    if (rc)
        return rc;
    if (!ctx->d_out->data)
        return host->error(ctx, "tiny_attention: backward needs d_out");
    const float *dh_ = ctx->d_out->data;
    const int lddh = row_stride(ctx->d_out), hd = d.hd, ld3 = 3 * hd, T = d.T, dh = d.dh;
    const float *qkv = ctx->saved[SV_QKV]->data, *P = ctx->saved[SV_P]->data, *u = ctx->saved[SV_U]->data;
    float *du = ctx->scratch[SC_DU]->data, *dqkv = ctx->scratch[SC_DQKV]->data;
    float *dp = ctx->scratch[SC_DP]->data;
    float *grad[N_PARAMS];
    for (int i = 0; i < N_PARAMS; i++)
        grad[i] = ctx->grads ? ctx->grads[i]->data : NULL;
    float *dx = ctx->d_in->data;

    if (grad[P_OW])
        host->gemm(1, 0, d.d_out, hd, d.rows, 1.0f, dh_, lddh, u, hd, 1.0f, grad[P_OW], hd);
    if (grad[P_OB])
        host->col_sums(grad[P_OB], dh_, lddh, d.rows, d.d_out);
    int need_qkv = dx != NULL;
    for (int w = 0; w < 3; w++)
        need_qkv |= grad[proj_w[w]] != NULL || (proj_b[w] >= 0 && grad[proj_b[w]] != NULL);
    if (!need_qkv)
        return 0;

    /* d_u (rows, hd) = dh . Wo */
    host->gemm(0, 0, d.rows, hd, d.d_out, 1.0f, dh_, lddh, PD(P_OW), hd, 0.0f, du, hd);
    memset(dqkv, 0, (size_t)d.rows * ld3 * sizeof(float));
    const float inv = 1.0f / sqrtf((float)dh);
    for (int b = 0; b < d.B; b++)
        for (int h = 0; h < d.H; h++) {
            const size_t base = (size_t)b * T * ld3 + (size_t)h * dh;
            const float *q0 = qkv + base, *k0 = q0 + hd, *v0 = q0 + 2 * hd;
            float *dq0 = dqkv + base, *dk0 = dq0 + hd, *dv0 = dq0 + 2 * hd;
            for (int t = 0; t < T; t++) {
                const float *pt = P + (((size_t)b * d.H + h) * T + t) * T;
                const float *dut = du + ((size_t)b * T + t) * hd + (size_t)h * dh;
                float dot = 0.0f;
                for (int s = 0; s <= t; s++) {
                    const float *vs = v0 + (size_t)s * ld3;
                    float *dvs = dv0 + (size_t)s * ld3;
                    float a = 0.0f;
                    for (int j = 0; j < dh; j++) {
                        a += dut[j] * vs[j];
                        dvs[j] += pt[s] * dut[j];
                    }
                    dp[s] = a;
                    dot += pt[s] * a;
                }
                const float *qt = q0 + (size_t)t * ld3;
                float *dqt = dq0 + (size_t)t * ld3;
                for (int s = 0; s <= t; s++) {
                    const float ds = pt[s] * (dp[s] - dot) * inv;
                    const float *ks = k0 + (size_t)s * ld3;
                    float *dks = dk0 + (size_t)s * ld3;
                    for (int j = 0; j < dh; j++) {
                        dqt[j] += ds * ks[j];
                        dks[j] += ds * qt[j];
                    }
                }
            }
        }

    const float *x = ctx->in->data;
    const int ldx = x ? row_stride(ctx->in) : 0;
    for (int w = 0; w < 3; w++) {
        const float *g = dqkv + (size_t)w * hd;
        if (grad[proj_w[w]]) {
            if (!x)
                return host->error(ctx, "tiny_attention: backward needs the module input (in)");
            /* dW (hd, d_in) += d{q,k,v}^T . x */
            host->gemm(1, 0, hd, d.d_in, d.rows, 1.0f, g, ld3, x, ldx, 1.0f, grad[proj_w[w]], d.d_in);
        }
        if (proj_b[w] >= 0 && grad[proj_b[w]])
            host->col_sums(grad[proj_b[w]], g, ld3, d.rows, hd);
        if (dx) /* dx (rows, d_in) += d{q,k,v} . W */
            host->gemm(0, 0, d.rows, d.d_in, hd, 1.0f, g, ld3, PD(proj_w[w]), d.d_in, 1.0f, dx,
                       row_stride(ctx->d_in));
    }
    return 0;
}

static const pr_technique ta_technique = {
    .struct_size = sizeof(pr_technique),
    .abi_major = PR_ABI_MAJOR,
    .name = "tiny_attention",
    .version = "1.0.0",
    .summary = "A causal multi-head attention with a tiny head dimension (default one head of "
               "dimension 1) beside the attention sub-layer: it reads the sub-layer's normalised "
               "input and adds scale * its output to the attention output.",
    .citation = "Zhao, Tan, Mei (2022). Tiny-Attention Adapter: Contexts Are More Important Than "
                "the Number of Parameters. EMNLP 2022. arXiv:2211.01979",
    .license = "MIT",
    .intra = PR_INTRA_ATTENTION,
    .inter = PR_INTER_FIXED,
    .adaptation = PR_ADAPT_ADDITION,
    .sharing = PR_SHARE_NONE,
    .input = PR_INPUT_HIDDEN,
    .insertion = PR_INSERT_PARALLEL,
    .insertions = PR_INSERTIONS_PER_SITE_LAYER,
    .integration = PR_INTEGRATE_SCALED_ADD,
    .workspace = PR_WS_ATTENTION | PR_WS_FFN,
    .options = ta_options,
    .n_options = N_OPTS,
    .sites = PR_SITE_BIT(PR_SITE_ATTN_OUT) | PR_SITE_BIT(PR_SITE_FFN_OUT),
    .default_sites = PR_SITE_BIT(PR_SITE_ATTN_OUT),
    .params = ta_params,
    .n_params = N_PARAMS,
    .saved = ta_saved,
    .n_saved = N_SAVED,
    .scratch = ta_scratch,
    .n_scratch = N_SCRATCH,
    .scale_expr = "scale",
    .param_formula = "per insertion: 4*d*H*dh + 2*H*dh + d (q, k, v, o weights; q, v, o biases), "
                     "H = heads, dh = head_dim; insertions = L (attn_out)",
    .forward = ta_forward,
    .backward = ta_backward,
};

static const pr_technique *const ta_techniques[] = { &ta_technique };

static const pr_plugin ta_plugin = {
    .struct_size = sizeof(pr_plugin),
    .abi_major = PR_ABI_MAJOR,
    .name = "tiny_attention",
    .version = "1.0.0",
    .n_techniques = 1,
    .techniques = ta_techniques,
};

PR_PLUGIN_EXPORT const pr_plugin *peftref_plugin_entry(const pr_entry_args *args)
{
    (void)args; /* a built-in plugin needs none of the host's entry arguments */
    return &ta_plugin;
}
