/* Prefix tuning: n_tokens trainable key and value vectors prepended to the
 * keys and values of every attention layer of a frozen model (Li and Liang
 * 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation",
 * arXiv 2101.00190).  Every query attends to the prefix columns besides
 * the sequence's own (causal) keys.
 *
 * Two techniques in this shared object:
 *
 *   prefix_tuning      the prefixes themselves, one tensor per layer
 *                        prefix (2, n_tokens, d_kv)  [0] keys, [1] values
 *                      (LAYER scope: attn.k and attn.v of a layer share
 *                      the copy, each reading its half).  What is trained
 *                      is what is saved: 2 * n_tokens * d_kv per layer.
 *
 *   prefix_tuning_mlp  the paper's reparameterisation (§4.3), used only in
 *                      training: a smaller embedding P' passed through an
 *                      MLP generates every layer's prefixes,
 *                        P = MLP(P') = tanh(P' W0^T + b0) W2^T + b2
 *                        embedding           (n_tokens, d_model)     P'
 *                        transform_0_weight  (h, d_model)            W0
 *                        transform_0_bias    (h)                     b0
 *                        transform_2_weight  (2 * n_layers * d_kv, h) W2
 *                        transform_2_bias    (2 * n_layers * d_kv)   b2
 *                      with h = encoder_hidden_size (names and layout of
 *                      Hugging Face PEFT's PrefixEncoder with
 *                      prefix_projection, dots written as underscores).
 *                      Column block (2 * layer + kv) * d_kv of P is layer
 *                      `layer`'s keys (kv = 0) or values (kv = 1).  All
 *                      five tensors are global and PR_PARAM_TRAINING_ONLY:
 *                      fold() turns them into prefix_tuning's per-layer
 *                      prefix tensors at save time, so the saved module is
 *                      a plain prefix_tuning module.
 *
 * d_kv = n_kv_heads * d_head, the width of the attn.k and attn.v sites.
 * The host integrates by concatenation at attn.k and attn.v (CONCAT,
 * n_virtual = n_tokens; a layer's key and value providers must agree, so
 * both sites are used together): forward writes the insertion's
 * (n_tokens, d_kv) rows, backward receives their gradient summed over the
 * batch.
 *
 * Cost of the MLP.  A plugin keeps no state between calls except its
 * declared buffers, so each of the 2L insertions computes the hidden layer
 * tanh(P' W0^T + b0) (n_tokens * d_model * h multiply-adds) itself and
 * keeps it in its saved buffer, and then only its own d_kv columns of the
 * output layer (n_tokens * h * d_kv).  The output layer thus costs what
 * one full MLP pass costs; the hidden layer is computed 2L times instead
 * of once.  For GPT-2 small (d_model 768, L 12) with n_tokens 10 and h 512
 * that is 94M multiply-adds per step for the hidden layers, small beside
 * the model's own forward pass.  When the MLP covers every model layer but
 * the module uses fewer, the columns of the unused layers get no gradient
 * (like PEFT's PrefixEncoder, the MLP always spans n_layers).
 *
 * This file includes only peftref's public plugin headers (plugin.h,
 * ext/peft_config.h), its PEFT codecs (peft/codecs.h) and libc/libm, and links
 * against nothing of peftref: products go through host->gemm, the MLP's
 * biases and bias gradients through host->add_bias_rows and host->col_sums. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include <peftref/plugin.h>
#include <peftref/ext/peft_config.h>

#include "peft/codecs.h"

PR_PLUGIN_EXPORT const pr_plugin *peftref_plugin_entry(const pr_entry_args *args);

#define CITATION                                                                                         \
    "Li, Liang (2021). Prefix-Tuning: Optimizing Continuous Prompts for Generation. ACL-IJCNLP 2021. " \
    "arXiv:2101.00190"

/* ---- declarations ---------------------------------------------------------------------------- */

enum { P_OPT_N_TOKENS, P_OPT_INIT_STD, P_N_OPTS };
enum { P_PARAM_PREFIX, P_N_PARAMS };

enum { M_OPT_N_TOKENS, M_OPT_HIDDEN, M_OPT_INIT_STD, M_N_OPTS };
enum { M_EMB, M_W0, M_B0, M_W2, M_B2, M_N_PARAMS };
enum { M_SAVED_HIDDEN, M_N_SAVED };
enum { M_SCRATCH_DHIDDEN, M_N_SCRATCH };

#define N_TOKENS_OPTION                                                                                  \
    {                                                                                                    \
        .struct_size = sizeof(pr_option_decl), .name = "n_tokens", .type = PR_OPT_INT, .def = 10,       \
        .min = 1, .max = 4096,                                                                           \
        .help = "prefix length: key and value vectors prepended in every layer (Hugging Face PEFT: "    \
                "num_virtual_tokens, which has no default); 10 as Li and Liang 2021 use for GPT-2 "     \
                "table-to-text (§7.2: gains level off beyond it there)",                                \
    }

static const pr_option_decl plain_options[P_N_OPTS] = {
    [P_OPT_N_TOKENS] = N_TOKENS_OPTION,
    [P_OPT_INIT_STD] = {
        .struct_size = sizeof(pr_option_decl), .name = "init_std", .type = PR_OPT_FLOAT, .def = 1.0,
        .min = 0, .max = 100,
        .help = "prefixes start as normal(0, init_std); 1 is torch.nn.Embedding's init, which Hugging "
                "Face PEFT's prefix tuning without projection uses (the paper initialises from real "
                "words' activations, which needs the model run and is not offered)",
    },
};

/* prefix_tuning's parameter, and prefix_tuning_mlp's fold output: the same
 * tensor, so a folded module loads as a prefix_tuning module. */
static const pr_param_decl prefix_decl[P_N_PARAMS] = {
    [P_PARAM_PREFIX] = {
        .struct_size = sizeof(pr_param_decl), .name = "prefix", .shape = "2, n_tokens, d_out",
        .init = PR_INIT_NORMAL, .init_arg = "init_std", .scope = PR_SCOPE_LAYER,
        /* Hugging Face PEFT's one (n_tokens, n_layers * 2 * d_kv) tensor:
         * layer l's keys in columns 2l d_kv .., its values in (2l+1) d_kv .. */
        .peft_key = "prompt_embeddings",
        .peft_layout = PR_PEFT_LAYERS_CONCAT,
        .help = "one layer's prefix: [0] the n_tokens keys, [1] the n_tokens values, d_kv wide",
    },
};

static const pr_option_decl mlp_options[M_N_OPTS] = {
    [M_OPT_N_TOKENS] = N_TOKENS_OPTION,
    [M_OPT_HIDDEN] = {
        .struct_size = sizeof(pr_option_decl), .name = "encoder_hidden_size", .type = PR_OPT_INT,
        .def = 512, .min = 1, .max = 65536,
        .help = "hidden width h of the reparameterisation MLP; 512 as in Li and Liang's table-to-text "
                "runs (mid_dim); Hugging Face PEFT's encoder_hidden_size defaults to d_model",
    },
    [M_OPT_INIT_STD] = {
        .struct_size = sizeof(pr_option_decl), .name = "init_std", .type = PR_OPT_FLOAT, .def = 1.0,
        .min = 0, .max = 100,
        .help = "the embedding P' starts as normal(0, init_std); 1 is torch.nn.Embedding's init, as in "
                "Hugging Face PEFT's PrefixEncoder",
    },
};

/* torch.nn.Linear's default init, as PEFT's PrefixEncoder gets it: weights
 * kaiming_uniform(a = sqrt(5)) = uniform(+-1/sqrt(fan_in)), biases
 * uniform(+-1/sqrt(fan_in)). */
static const pr_param_decl mlp_params[M_N_PARAMS] = {
    [M_EMB] = {
        .struct_size = sizeof(pr_param_decl), .name = "embedding", .shape = "n_tokens, d_model",
        .init = PR_INIT_NORMAL, .init_arg = "init_std", .scope = PR_SCOPE_GLOBAL,
        .flags = PR_PARAM_TRAINING_ONLY,
        .help = "P', one d_model row per prefix position; the MLP's input",
    },
    [M_W0] = {
        .struct_size = sizeof(pr_param_decl), .name = "transform_0_weight",
        .shape = "encoder_hidden_size, d_model", .init = PR_INIT_KAIMING_UNIFORM, .init_arg = "sqrt(5)",
        .scope = PR_SCOPE_GLOBAL, .flags = PR_PARAM_TRAINING_ONLY,
        .help = "first MLP layer, d_model -> h (PyTorch (out, in) layout)",
    },
    [M_B0] = {
        .struct_size = sizeof(pr_param_decl), .name = "transform_0_bias", .shape = "encoder_hidden_size",
        .init = PR_INIT_UNIFORM, .init_arg = "1 / sqrt(d_model)", .scope = PR_SCOPE_GLOBAL,
        .flags = PR_PARAM_TRAINING_ONLY | PR_PARAM_NO_DECAY,
        .help = "first MLP layer's bias",
    },
    [M_W2] = {
        .struct_size = sizeof(pr_param_decl), .name = "transform_2_weight",
        .shape = "2 * n_layers * d_out, encoder_hidden_size", .init = PR_INIT_KAIMING_UNIFORM,
        .init_arg = "sqrt(5)", .scope = PR_SCOPE_GLOBAL, .flags = PR_PARAM_TRAINING_ONLY,
        .help = "second MLP layer, h -> every layer's keys and values (after the tanh)",
    },
    [M_B2] = {
        .struct_size = sizeof(pr_param_decl), .name = "transform_2_bias", .shape = "2 * n_layers * d_out",
        .init = PR_INIT_UNIFORM, .init_arg = "1 / sqrt(encoder_hidden_size)", .scope = PR_SCOPE_GLOBAL,
        .flags = PR_PARAM_TRAINING_ONLY | PR_PARAM_NO_DECAY,
        .help = "second MLP layer's bias",
    },
};

static const pr_buffer_decl mlp_saved[M_N_SAVED] = {
    [M_SAVED_HIDDEN] = { .struct_size = sizeof(pr_buffer_decl), .name = "hidden",
                         .shape = "n_tokens, encoder_hidden_size" },
};

static const pr_buffer_decl mlp_scratch[M_N_SCRATCH] = {
    [M_SCRATCH_DHIDDEN] = { .struct_size = sizeof(pr_buffer_decl), .name = "d_hidden",
                            .shape = "n_tokens, encoder_hidden_size" },
};

/* ---- shared helpers ---------------------------------------------------------------------------- */

static int row_stride(const pr_tensor *t)
{
    return (int)(t->stride[0] ? t->stride[0] : t->shape[1]);
}

/* 0 for the keys (attn.k), 1 for the values (attn.v), -1 elsewhere. */
static int kv_of(const pr_ctx *ctx)
{
    return ctx->site == PR_SITE_ATTN_K ? 0 : ctx->site == PR_SITE_ATTN_V ? 1 : -1;
}

/* The site rows t must be (n, d) with n = n_tokens and d = d_kv. */
static int check_rows(const pr_ctx *ctx, const char *tech, const pr_tensor *t, const char *what, int n, int d)
{
    if (!t->data || t->ndim != 2 || t->shape[0] != n || t->shape[1] != d)
        return ctx->host->error(ctx, "%s: %s must be (%d, %d) (n_tokens, d_kv)%s", tech, what, n, d,
                                t->data ? "" : " and is missing");
    return 0;
}

/* ---- prefix_tuning: the prefixes themselves ---------------------------------------------------------- */

/* This insertion's half of the layer's prefix: (n_tokens, d_kv) rows. */
static int plain_half(const pr_ctx *ctx, const pr_tensor *rows, const char *what, size_t *off, int *n, int *d)
{
    int kv = kv_of(ctx);
    if (kv < 0)
        return ctx->host->error(ctx, "prefix_tuning: attaches at attn.k and attn.v only");
    if (ctx->n_params < P_N_PARAMS || !ctx->params[P_PARAM_PREFIX]->data)
        return ctx->host->error(ctx, "prefix_tuning: expected the 'prefix' parameter, got %u parameters",
                                ctx->n_params);
    const pr_tensor *p = ctx->params[P_PARAM_PREFIX];
    if (p->ndim != 3 || p->shape[0] != 2)
        return ctx->host->error(ctx, "prefix_tuning: 'prefix' must be (2, n_tokens, d_kv)");
    *n = (int)p->shape[1];
    *d = (int)p->shape[2];
    *off = (size_t)kv * (size_t)*n * (size_t)*d;
    return check_rows(ctx, "prefix_tuning", rows, what, *n, *d);
}

/* forward: out (n_tokens, d_kv) = prefix[kv] */
static int plain_forward(const pr_ctx *ctx)
{
    size_t off;
    int n, d, rc = plain_half(ctx, ctx->out, "the output", &off, &n, &d);
    if (rc)
        return rc;
    const float *src = (const float *)ctx->params[P_PARAM_PREFIX]->data + off;
    float *out = ctx->out->data;
    const int ld = row_stride(ctx->out);
    for (int i = 0; i < n; i++)
        memcpy(out + (size_t)i * ld, src + (size_t)i * d, (size_t)d * sizeof(float));
    return 0;
}

/* backward: d_prefix[kv] (n_tokens, d_kv) += d_out */
static int plain_backward(const pr_ctx *ctx)
{
    size_t off;
    int n, d, rc = plain_half(ctx, ctx->d_out, "d_out", &off, &n, &d);
    if (rc)
        return rc;
    float *g = ctx->grads ? ctx->grads[P_PARAM_PREFIX]->data : NULL;
    if (!g)
        return 0;
    g += off;
    const float *dout = ctx->d_out->data;
    const int ld = row_stride(ctx->d_out);
    for (int i = 0; i < n; i++)
        for (int j = 0; j < d; j++)
            g[(size_t)i * d + j] += dout[(size_t)i * ld + j];
    return 0;
}

/* ---- prefix_tuning_mlp: the MLP reparameterisation ------------------------------------------------------ */

typedef struct mlp_view {
    int n, d_model, h, d_kv, off;  /* off: first row of W2 (entry of b2) of this insertion's block */
    const float *emb, *w0, *b0, *w2, *b2;
} mlp_view;

static int mlp_get(const pr_ctx *ctx, mlp_view *v)
{
    const pr_host *host = ctx->host;
    int kv = kv_of(ctx);
    if (kv < 0)
        return host->error(ctx, "prefix_tuning_mlp: attaches at attn.k and attn.v only");
    if (ctx->n_params < M_N_PARAMS)
        return host->error(ctx, "prefix_tuning_mlp: expected %d parameters, got %u", M_N_PARAMS, ctx->n_params);
    for (int i = 0; i < M_N_PARAMS; i++)
        if (!ctx->params[i]->data)
            return host->error(ctx, "prefix_tuning_mlp: parameter '%s' is missing", mlp_params[i].name);
    const pr_tensor *e = ctx->params[M_EMB], *w0 = ctx->params[M_W0], *b0 = ctx->params[M_B0];
    const pr_tensor *w2 = ctx->params[M_W2], *b2 = ctx->params[M_B2];
    v->n = (int)e->shape[0];
    v->d_model = (int)e->shape[1];
    v->h = (int)w0->shape[0];
    const int L = ctx->dims->n_layers;
    if (e->ndim != 2 || w0->ndim != 2 || b0->ndim != 1 || w2->ndim != 2 || b2->ndim != 1 ||
        w0->shape[1] != v->d_model || b0->shape[0] != v->h || w2->shape[1] != v->h ||
        b2->shape[0] != w2->shape[0] || L < 1 || w2->shape[0] % (2 * L) != 0)
        return host->error(ctx, "prefix_tuning_mlp: parameter shapes disagree: embedding (n_tokens, d_model), "
                                "transform_0 (h, d_model) and (h), transform_2 (2 * n_layers * d_kv, h) and "
                                "(2 * n_layers * d_kv) with n_layers = %d",
                           L);
    v->d_kv = (int)(w2->shape[0] / (2 * L));
    if (ctx->layer < 0 || ctx->layer >= L)
        return host->error(ctx, "prefix_tuning_mlp: layer %d is outside [0, %d)", ctx->layer, L);
    v->off = (2 * ctx->layer + kv) * v->d_kv;
    v->emb = e->data;
    v->w0 = w0->data;
    v->b0 = b0->data;
    v->w2 = w2->data;
    v->b2 = b2->data;
    return 0;
}

/* hid (n, h) = tanh(P' W0^T + b0) */
static void mlp_hidden(const pr_ctx *ctx, const mlp_view *v, float *hid)
{
    ctx->host->gemm(0, 1, v->n, v->h, v->d_model, 1.0f, v->emb, v->d_model, v->w0, v->d_model, 0.0f, hid, v->h);
    ctx->host->add_bias_rows(hid, v->h, v->b0, v->n, v->h);
    for (size_t i = 0; i < (size_t)v->n * (size_t)v->h; i++)
        hid[i] = tanhf(hid[i]);
}

/* out (n, d_kv; ld) = hid W2[off : off + d_kv]^T + b2[off : off + d_kv] */
static void mlp_output(const pr_ctx *ctx, const mlp_view *v, const float *hid, float *out, int ld)
{
    ctx->host->gemm(0, 1, v->n, v->d_kv, v->h, 1.0f, hid, v->h, v->w2 + (size_t)v->off * v->h, v->h, 0.0f, out,
                    ld);
    ctx->host->add_bias_rows(out, ld, v->b2 + v->off, v->n, v->d_kv);
}

static int mlp_buffer(const pr_ctx *ctx, const pr_tensor *t, const char *name, const mlp_view *v)
{
    if (!t->data || t->shape[0] * (t->ndim > 1 ? t->shape[1] : 1) < (int64_t)v->n * v->h)
        return ctx->host->error(ctx, "prefix_tuning_mlp: buffer '%s' must hold (%d, %d) floats", name, v->n, v->h);
    return 0;
}

/* forward: hidden (saved) = tanh(P' W0^T + b0); out = this insertion's block of hidden W2^T + b2 */
static int mlp_forward(const pr_ctx *ctx)
{
    mlp_view v;
    int rc = mlp_get(ctx, &v);
    if (rc || (rc = check_rows(ctx, "prefix_tuning_mlp", ctx->out, "the output", v.n, v.d_kv)))
        return rc;
    if (ctx->n_saved < M_N_SAVED)
        return ctx->host->error(ctx, "prefix_tuning_mlp: the saved buffer 'hidden' is missing");
    if ((rc = mlp_buffer(ctx, ctx->saved[M_SAVED_HIDDEN], "hidden", &v)))
        return rc;
    float *hid = ctx->saved[M_SAVED_HIDDEN]->data;
    mlp_hidden(ctx, &v, hid);
    mlp_output(ctx, &v, hid, ctx->out->data, row_stride(ctx->out));
    return 0;
}

/* backward, G = d_out (n, d_kv), H = hidden, A = P' W0^T + b0:
 *   dW2[block] += G^T H          db2[block] += colsum G
 *   dH = G W2[block]             dA = dH * (1 - H^2)
 *   dW0 += dA^T P'               db0 += colsum dA
 *   dP' += dA W0 */
static int mlp_backward(const pr_ctx *ctx)
{
    const pr_host *host = ctx->host;
    mlp_view v;
    int rc = mlp_get(ctx, &v);
    if (rc || (rc = check_rows(ctx, "prefix_tuning_mlp", ctx->d_out, "d_out", v.n, v.d_kv)))
        return rc;
    float *g[M_N_PARAMS] = { 0 };
    int any = 0;
    for (int i = 0; i < M_N_PARAMS; i++)
        any |= (g[i] = ctx->grads ? ctx->grads[i]->data : NULL) != NULL;
    if (!any)
        return 0;
    if (ctx->n_saved < M_N_SAVED || ctx->n_scratch < M_N_SCRATCH)
        return host->error(ctx, "prefix_tuning_mlp: the saved buffer 'hidden' or the scratch 'd_hidden' is missing");
    if ((rc = mlp_buffer(ctx, ctx->saved[M_SAVED_HIDDEN], "hidden", &v)) ||
        (rc = mlp_buffer(ctx, ctx->scratch[M_SCRATCH_DHIDDEN], "d_hidden", &v)))
        return rc;
    const float *G = ctx->d_out->data, *H = ctx->saved[M_SAVED_HIDDEN]->data;
    const int ldg = row_stride(ctx->d_out), n = v.n, h = v.h, dk = v.d_kv, C = v.d_model;
    float *dA = ctx->scratch[M_SCRATCH_DHIDDEN]->data;

    if (g[M_W2])
        host->gemm(1, 0, dk, h, n, 1.0f, G, ldg, H, h, 1.0f, g[M_W2] + (size_t)v.off * h, h);
    if (g[M_B2])
        host->col_sums(g[M_B2] + v.off, G, ldg, n, dk);
    if (!g[M_EMB] && !g[M_W0] && !g[M_B0])
        return 0;
    host->gemm(0, 0, n, h, dk, 1.0f, G, ldg, v.w2 + (size_t)v.off * h, h, 0.0f, dA, h);
    for (size_t i = 0; i < (size_t)n * h; i++)
        dA[i] *= 1.0f - H[i] * H[i];
    if (g[M_W0])
        host->gemm(1, 0, h, C, n, 1.0f, dA, h, v.emb, C, 1.0f, g[M_W0], C);
    if (g[M_B0])
        host->col_sums(g[M_B0], dA, h, n, h);
    if (g[M_EMB])
        host->gemm(0, 0, n, C, h, 1.0f, dA, h, v.w0, C, 1.0f, g[M_EMB], C);
    return 0;
}

/* fold: out_params[0] = the layer's prefix (2, n_tokens, d_kv), both
 * halves: [0] the keys and [1] the values MLP(P') gives this layer.  The
 * copy is shared by the layer's attn.k and attn.v insertions; whichever
 * the host calls fold() for fills all of it (a second call writes the same
 * values).  The hidden layer goes to memory from host->alloc, so neither a
 * pending backward's saved buffer nor scratch is needed. */
static int mlp_fold(const pr_ctx *ctx)
{
    mlp_view v;
    int rc = mlp_get(ctx, &v);
    if (rc)
        return rc;
    if (ctx->n_out_params < 1 || !ctx->out_params || !ctx->out_params[0]->data)
        return ctx->host->error(ctx, "prefix_tuning_mlp: fold needs the output tensor 'prefix'");
    const pr_tensor *p = ctx->out_params[0];
    if (p->ndim != 3 || p->shape[0] != 2 || p->shape[1] != v.n || p->shape[2] != v.d_kv)
        return ctx->host->error(ctx, "prefix_tuning_mlp: fold output 'prefix' must be (2, %d, %d)", v.n, v.d_kv);
    float *hid = ctx->host->alloc((size_t)v.n * (size_t)v.h * sizeof(float));
    if (!hid)
        return ctx->host->error(ctx, "prefix_tuning_mlp: out of memory for %d x %d floats", v.n, v.h);
    mlp_hidden(ctx, &v, hid);
    for (int kv = 0; kv < 2; kv++) {
        v.off = (2 * ctx->layer + kv) * v.d_kv;
        mlp_output(ctx, &v, hid, (float *)p->data + (size_t)kv * v.n * v.d_kv, v.d_kv);
    }
    ctx->host->free(hid);
    return 0;
}

/* ---- descriptors ---------------------------------------------------------------------------------- */

static const pr_ext_peft_config peft_prefix = {
    .struct_size = sizeof(pr_ext_peft_config),
    .read = peft_read_prefix_tuning,
    .write = peft_write_prefix_tuning,
};

static const void *peft_prefix_extension(const char *uri)
{
    return strcmp(uri, PR_EXT_PEFT_CONFIG_URI) ? NULL : &peft_prefix;
}

static const pr_technique plain_technique = {
    .struct_size = sizeof(pr_technique),
    .abi_major = PR_ABI_MAJOR,
    .name = "prefix_tuning",
    .version = "1.0.0",
    .summary = "n_tokens trainable key and value vectors prepended to every layer's attention keys and "
               "values (Hugging Face PEFT's prefix tuning with prefix_projection = false, its default); "
               "prefix_tuning_mlp trains them through the paper's MLP instead.",
    .citation = CITATION,
    .license = "MIT",
    /* PEFT-Ref (arXiv 2304.12410): free vectors (intra none) reaching the
     * model through attention weights (inter dynamic), new parameters
     * (addition), one prefix per layer (no sharing), no module input,
     * concatenated to K and V once per layer (k and v together). */
    .intra = PR_INTRA_NONE,
    .inter = PR_INTER_DYNAMIC,
    .adaptation = PR_ADAPT_ADDITION,
    .sharing = PR_SHARE_NONE,
    .input = PR_INPUT_NONE,
    .insertion = PR_INSERT_CONCATENATIVE,
    .insertions = PR_INSERTIONS_PER_LAYER,
    .integration = PR_INTEGRATE_CONCAT,
    .workspace = PR_WS_ATTENTION,
    .options = plain_options,
    .n_options = P_N_OPTS,
    .sites = PR_SITE_BIT(PR_SITE_ATTN_K) | PR_SITE_BIT(PR_SITE_ATTN_V),
    .default_sites = PR_SITE_BIT(PR_SITE_ATTN_K) | PR_SITE_BIT(PR_SITE_ATTN_V),
    .params = prefix_decl,
    .n_params = P_N_PARAMS,
    .n_virtual = "n_tokens",
    .param_formula = "2 * n_tokens * d_kv per layer (d_kv = n_kv_heads * d_head; one (2, n_tokens, d_kv) "
                     "tensor per layer, shared by its attn.k and attn.v)",
    .forward = plain_forward,
    .backward = plain_backward,
    .peft_type = "PREFIX_TUNING",
    .extension_data = peft_prefix_extension,
};

static const pr_ext_peft_config peft_prefix_mlp = {
    .struct_size = sizeof(pr_ext_peft_config),
    .read = peft_read_prefix_tuning,
    .write = peft_write_prefix_tuning,
};

static const void *peft_prefix_mlp_extension(const char *uri)
{
    return strcmp(uri, PR_EXT_PEFT_CONFIG_URI) ? NULL : &peft_prefix_mlp;
}

static const pr_technique mlp_technique = {
    .struct_size = sizeof(pr_technique),
    .abi_major = PR_ABI_MAJOR,
    .name = "prefix_tuning_mlp",
    .version = "1.0.0",
    .summary = "Prefix tuning trained through the paper's reparameterisation: an MLP on a small "
               "embedding generates every layer's prefix keys and values (Hugging Face PEFT's "
               "prefix_projection = true); fold() saves the plain prefixes of prefix_tuning.",
    .citation = CITATION,
    .license = "MIT",
    /* As prefix_tuning, except that in training one embedding and one
     * dense MLP (intra dense) generate every layer's keys and values
     * (shared across layers, and across the k and v sites).  The folded,
     * saved form is prefix_tuning's free vectors. */
    .intra = PR_INTRA_DENSE,
    .inter = PR_INTER_DYNAMIC,
    .adaptation = PR_ADAPT_ADDITION,
    .sharing = PR_SHARE_ACROSS_LAYERS,
    .input = PR_INPUT_NONE,
    .insertion = PR_INSERT_CONCATENATIVE,
    .insertions = PR_INSERTIONS_PER_LAYER,
    .integration = PR_INTEGRATE_CONCAT,
    .workspace = PR_WS_ATTENTION,
    .options = mlp_options,
    .n_options = M_N_OPTS,
    .sites = PR_SITE_BIT(PR_SITE_ATTN_K) | PR_SITE_BIT(PR_SITE_ATTN_V),
    .default_sites = PR_SITE_BIT(PR_SITE_ATTN_K) | PR_SITE_BIT(PR_SITE_ATTN_V),
    .params = mlp_params,
    .n_params = M_N_PARAMS,
    .saved = mlp_saved,
    .n_saved = M_N_SAVED,
    .scratch = mlp_scratch,
    .n_scratch = M_N_SCRATCH,
    .n_virtual = "n_tokens",
    .param_formula = "in training, once: n_tokens * d_model + h * d_model + h + 2 * n_layers * d_kv * h + "
                     "2 * n_layers * d_kv (h = encoder_hidden_size, d_kv = n_kv_heads * d_head); saved "
                     "after fold: 2 * n_tokens * d_kv per layer",
    .forward = mlp_forward,
    .backward = mlp_backward,
    .fold = mlp_fold,
    .fold_params = prefix_decl,
    .n_fold_params = P_N_PARAMS,
    /* The MLP runs once per call, whatever the number of tokens, and the
     * saved (folded) module is plain prefix_tuning, which does no
     * arithmetic per token either.  The host's default rule would count 2
     * FLOP per element of the embedding and both MLP weights per token. */
    .flops_per_token = "0",
    /* PEFT's PrefixEncoder with prefix_projection: saved as the prefixes */
    .peft_type = "PREFIX_TUNING",
    .extension_data = peft_prefix_mlp_extension,
    .folds_to = "prefix_tuning",
};

static const pr_technique *const prefix_techniques[] = { &plain_technique, &mlp_technique };

static const pr_plugin prefix_plugin = {
    .struct_size = sizeof(pr_plugin),
    .abi_major = PR_ABI_MAJOR,
    .name = "prefix_tuning",
    .version = "1.0.0",
    .n_techniques = 2,
    .techniques = prefix_techniques,
};

PR_PLUGIN_EXPORT const pr_plugin *peftref_plugin_entry(const pr_entry_args *args)
{
    (void)args; /* a built-in plugin needs none of the host's entry arguments */
    return &prefix_plugin;
}
