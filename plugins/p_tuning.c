/* P-tuning: virtual tokens produced by a trainable prompt encoder and
 * prepended to the input embeddings of a frozen model (Liu, Zheng, Du,
 * Ding, Qian, Yang and Tang 2021, "GPT Understands, Too", arXiv
 * 2103.10385).  The paper's prompt encoder is a bidirectional LSTM with a
 * two-layer ReLU MLP on top (§3.2); Hugging Face PEFT's PromptEncoder
 * offers that (encoder_reparameterization_type = LSTM) and, as its default,
 * an MLP alone (MLP), which is what this plugin implements:
 *
 *     P = MLP(E) = relu(relu(E W0^T + b0) W2^T + b2) W4^T + b4
 *
 *     embedding          (n_tokens, d_model)  E   PEFT: embedding.weight
 *     mlp_head_0_weight  (h, d_model)         W0  PEFT: mlp_head.0.weight
 *     mlp_head_0_bias    (h)                  b0  PEFT: mlp_head.0.bias
 *     mlp_head_2_weight  (h, h)               W2  PEFT: mlp_head.2.weight
 *     mlp_head_2_bias    (h)                  b2  PEFT: mlp_head.2.bias
 *     mlp_head_4_weight  (d_model, h)         W4  PEFT: mlp_head.4.weight
 *     mlp_head_4_bias    (d_model)            b4  PEFT: mlp_head.4.bias
 *
 * PEFT's layout exactly: torch.nn.Sequential(Linear(d, h), ReLU(),
 * Linear(h, h), ReLU(), Linear(h, d)) (src/peft/tuners/p_tuning/model.py,
 * MLP branch), so indices 1 and 3 are the ReLUs and hold no parameters;
 * weights in PyTorch's (out, in) layout, h = encoder_hidden_size, which
 * PEFT defaults to token_dim (= d_model; our 0).  Every tensor is global
 * and PR_PARAM_TRAINING_ONLY: fold() runs the MLP once at save time and
 * writes prompt_tuning's one parameter, prompt (n_tokens, d_model), so the
 * saved module is a plain prompt_tuning module (folds_to).  Hugging Face
 * PEFT does the same: a P_TUNING checkpoint holds only
 * "prompt_embeddings", the encoder's output (get_prompt_embedding_to_save).
 *
 * LSTM (the paper's encoder) is not implemented: the option
 * encoder_reparameterization_type offers MLP only, so a pipeline asking
 * for LSTM is refused by the host with the list of choices.
 *
 * The host integrates by concatenation at the embed site exactly as for
 * prompt tuning (PR_INTEGRATE_CONCAT, n_virtual = n_tokens): forward
 * writes the n_tokens virtual rows, backward receives their gradient
 * summed over the batch.
 *
 * Trainable parameters in training: n_tokens * d + h * d + h + h * h + h +
 * d * h + d.  Saved after fold: n_tokens * d.
 *
 * This file includes only peftref's public plugin headers (plugin.h,
 * ext/peft_config.h), its PEFT codecs (peft/codecs.h) and libc, and links against
 * nothing of peftref: products through host->gemm, biases through
 * host->add_bias_rows and host->col_sums. */
#include <stdint.h>
#include <string.h>

#include <peftref/plugin.h>
#include <peftref/ext/peft_config.h>

#include "peft/codecs.h"

PR_PLUGIN_EXPORT const pr_plugin *peftref_plugin_entry(const pr_entry_args *args);

/* h = encoder_hidden_size, or d_model when it is 0 (PEFT's None -> token_dim) */
#define HID "(encoder_hidden_size + d_model * (1 - min(encoder_hidden_size, 1)))"

enum { OPT_N_TOKENS, OPT_HIDDEN, OPT_TYPE, OPT_INIT, OPT_INIT_TEXT, OPT_INIT_STD, N_OPTS };
enum { P_EMB, P_W0, P_B0, P_W2, P_B2, P_W4, P_B4, N_PARAMS };
enum { S_H1, S_H2, N_SAVED };
enum { X_D1, X_D2, N_SCRATCH };

/* pr_init names (init_option): the input embedding's initialisation */
static const char *const init_choices[] = { "normal", "embed_rows", "text", NULL };
static const char *const type_choices[] = { "MLP", NULL };

static const pr_option_decl pt_options[N_OPTS] = {
    [OPT_N_TOKENS] = {
        .struct_size = sizeof(pr_option_decl), .name = "n_tokens", .type = PR_OPT_INT,
        .def = 20, .min = 1, .max = 4096, .peft_name = "num_virtual_tokens",
        .help = "virtual tokens prepended to the input (Hugging Face PEFT: num_virtual_tokens, which has no "
                "default); 20 as prompt_tuning's.  Virtual plus real positions must fit the model's max_seq",
    },
    [OPT_HIDDEN] = {
        .struct_size = sizeof(pr_option_decl), .name = "encoder_hidden_size", .type = PR_OPT_INT,
        .def = 0, .min = 0, .max = 65536,
        .help = "hidden width h of the prompt encoder's MLP; 0 = d_model (Hugging Face PEFT's default None, "
                "which it sets to token_dim)",
    },
    [OPT_TYPE] = {
        .struct_size = sizeof(pr_option_decl), .name = "encoder_reparameterization_type", .type = PR_OPT_ENUM,
        .def = 0, .choices = type_choices,
        .help = "the prompt encoder: MLP (Hugging Face PEFT's default and recommendation: Linear, ReLU, Linear, "
                "ReLU, Linear).  PEFT's LSTM (the paper's bidirectional LSTM + MLP) is not implemented",
    },
    [OPT_INIT] = {
        .struct_size = sizeof(pr_option_decl), .name = "init", .type = PR_OPT_ENUM, .def = 0,
        .choices = init_choices,
        .help = "initialisation of the encoder's input embedding: normal = normal(0, init_std) (PEFT's "
                "torch.nn.Embedding), embed_rows = rows of the token embedding at sampled ids, text = the "
                "embeddings of init_text's tokens, cycled.  Also prompt_tuning's option, so the folded module "
                "loads as prompt_tuning",
    },
    [OPT_INIT_TEXT] = {
        .struct_size = sizeof(pr_option_decl), .name = "init_text", .type = PR_OPT_STRING, .def_str = "",
        .help = "text whose token embeddings initialise the encoder's input embedding when init = text",
    },
    [OPT_INIT_STD] = {
        .struct_size = sizeof(pr_option_decl), .name = "init_std", .type = PR_OPT_FLOAT, .def = 1.0, .min = 0,
        .max = 100,
        .help = "standard deviation of the normal init; 1 is torch.nn.Embedding's, as in PEFT's PromptEncoder",
    },
};

/* torch.nn.Linear's default init, as PEFT's PromptEncoder gets it: weights
 * kaiming_uniform(a = sqrt(5)) = uniform(+-1/sqrt(fan_in)), biases
 * uniform(+-1/sqrt(fan_in)). */
static const pr_param_decl pt_params[N_PARAMS] = {
    [P_EMB] = {
        .struct_size = sizeof(pr_param_decl), .name = "embedding", .shape = "n_tokens, d_model",
        .init = PR_INIT_NORMAL, .init_arg = "init_std", .scope = PR_SCOPE_GLOBAL, .flags = PR_PARAM_TRAINING_ONLY,
        .init_option = "init", .init_source = "init_text",
        .help = "the encoder's input E, one d_model row per virtual token (PEFT: prompt_encoder.embedding)",
    },
    [P_W0] = {
        .struct_size = sizeof(pr_param_decl), .name = "mlp_head_0_weight", .shape = HID ", d_model",
        .init = PR_INIT_KAIMING_UNIFORM, .init_arg = "sqrt(5)", .scope = PR_SCOPE_GLOBAL,
        .flags = PR_PARAM_TRAINING_ONLY, .help = "first Linear, d_model -> h ((out, in) layout)",
    },
    [P_B0] = {
        .struct_size = sizeof(pr_param_decl), .name = "mlp_head_0_bias", .shape = HID, .init = PR_INIT_UNIFORM,
        .init_arg = "1 / sqrt(d_model)", .scope = PR_SCOPE_GLOBAL,
        .flags = PR_PARAM_TRAINING_ONLY | PR_PARAM_NO_DECAY, .help = "first Linear's bias",
    },
    [P_W2] = {
        .struct_size = sizeof(pr_param_decl), .name = "mlp_head_2_weight", .shape = HID ", " HID,
        .init = PR_INIT_KAIMING_UNIFORM, .init_arg = "sqrt(5)", .scope = PR_SCOPE_GLOBAL,
        .flags = PR_PARAM_TRAINING_ONLY, .help = "second Linear, h -> h (after the first ReLU)",
    },
    [P_B2] = {
        .struct_size = sizeof(pr_param_decl), .name = "mlp_head_2_bias", .shape = HID, .init = PR_INIT_UNIFORM,
        .init_arg = "1 / sqrt(" HID ")", .scope = PR_SCOPE_GLOBAL,
        .flags = PR_PARAM_TRAINING_ONLY | PR_PARAM_NO_DECAY, .help = "second Linear's bias",
    },
    [P_W4] = {
        .struct_size = sizeof(pr_param_decl), .name = "mlp_head_4_weight", .shape = "d_model, " HID,
        .init = PR_INIT_KAIMING_UNIFORM, .init_arg = "sqrt(5)", .scope = PR_SCOPE_GLOBAL,
        .flags = PR_PARAM_TRAINING_ONLY, .help = "third Linear, h -> d_model (after the second ReLU)",
    },
    [P_B4] = {
        .struct_size = sizeof(pr_param_decl), .name = "mlp_head_4_bias", .shape = "d_model", .init = PR_INIT_UNIFORM,
        .init_arg = "1 / sqrt(" HID ")", .scope = PR_SCOPE_GLOBAL,
        .flags = PR_PARAM_TRAINING_ONLY | PR_PARAM_NO_DECAY, .help = "third Linear's bias",
    },
};

/* What fold() writes: prompt_tuning's declaration of 'prompt' (name, shape,
 * scope, init and PEFT key), so the saved module loads as prompt_tuning and
 * its PEFT form is PEFT's P_TUNING checkpoint, prompt_embeddings. */
static const pr_param_decl pt_fold_decl[1] = {
    {
        .struct_size = sizeof(pr_param_decl), .name = "prompt", .shape = "n_tokens, d_model",
        .init = PR_INIT_EMBED_ROWS, .init_arg = "init_std", .scope = PR_SCOPE_GLOBAL, .init_option = "init",
        .init_source = "init_text", .peft_key = "prompt_embeddings", .peft_layout = PR_PEFT_AS_IS,
        .help = "the virtual tokens the encoder produces, MLP(embedding)",
    },
};

static const pr_buffer_decl pt_saved[N_SAVED] = {
    [S_H1] = { .struct_size = sizeof(pr_buffer_decl), .name = "hidden_1", .shape = "n_tokens, " HID },
    [S_H2] = { .struct_size = sizeof(pr_buffer_decl), .name = "hidden_2", .shape = "n_tokens, " HID },
};

static const pr_buffer_decl pt_scratch[N_SCRATCH] = {
    [X_D1] = { .struct_size = sizeof(pr_buffer_decl), .name = "d_hidden_1", .shape = "n_tokens, " HID },
    [X_D2] = { .struct_size = sizeof(pr_buffer_decl), .name = "d_hidden_2", .shape = "n_tokens, " HID },
};

/* ---- the encoder ------------------------------------------------------------------------------ */

typedef struct view {
    int n, d, h;
    const float *p[N_PARAMS];
} view;

static int row_stride(const pr_tensor *t)
{
    return (int)(t->stride[0] ? t->stride[0] : t->shape[1]);
}

static int get_view(const pr_ctx *ctx, view *v)
{
    const pr_host *host = ctx->host;
    if (ctx->n_params < N_PARAMS || !ctx->params)
        return host->error(ctx, "p_tuning: expected %d parameters, got %u", N_PARAMS, ctx->n_params);
    for (int i = 0; i < N_PARAMS; i++) {
        if (!ctx->params[i] || !ctx->params[i]->data)
            return host->error(ctx, "p_tuning: parameter '%s' is missing", pt_params[i].name);
        v->p[i] = ctx->params[i]->data;
    }
    pr_tensor *const *P = ctx->params;
    v->n = (int)P[P_EMB]->shape[0];
    v->d = (int)P[P_EMB]->shape[1];
    v->h = (int)P[P_W0]->shape[0];
    if (P[P_EMB]->ndim != 2 || P[P_W0]->ndim != 2 || P[P_W0]->shape[1] != v->d || P[P_B0]->ndim != 1 ||
        P[P_B0]->shape[0] != v->h || P[P_W2]->ndim != 2 || P[P_W2]->shape[0] != v->h || P[P_W2]->shape[1] != v->h ||
        P[P_B2]->ndim != 1 || P[P_B2]->shape[0] != v->h || P[P_W4]->ndim != 2 || P[P_W4]->shape[0] != v->d ||
        P[P_W4]->shape[1] != v->h || P[P_B4]->ndim != 1 || P[P_B4]->shape[0] != v->d)
        return host->error(ctx, "p_tuning: parameter shapes disagree: embedding (n_tokens, d), mlp_head_0 (h, d) "
                                "and (h), mlp_head_2 (h, h) and (h), mlp_head_4 (d, h) and (d)");
    return 0;
}

static int check_buf(const pr_ctx *ctx, const pr_tensor *t, const char *name, const view *v)
{
    if (!t || !t->data || t->shape[0] * (t->ndim > 1 ? t->shape[1] : 1) < (int64_t)v->n * v->h)
        return ctx->host->error(ctx, "p_tuning: buffer '%s' must hold (%d, %d) floats", name, v->n, v->h);
    return 0;
}

static int check_rows(const pr_ctx *ctx, const pr_tensor *t, const char *what, const view *v)
{
    if (!t->data || t->ndim != 2 || t->shape[0] != v->n || t->shape[1] != v->d)
        return ctx->host->error(ctx, "p_tuning: %s must be (%d, %d) (n_tokens, d_model)%s", what, v->n, v->d,
                                t->data ? "" : " and is missing");
    return 0;
}

static void relu(float *x, size_t n)
{
    for (size_t i = 0; i < n; i++)
        x[i] = x[i] > 0.0f ? x[i] : 0.0f;
}

/* h1 = relu(E W0^T + b0), h2 = relu(h1 W2^T + b2), out (ld) = h2 W4^T + b4 */
static void encode(const pr_ctx *ctx, const view *v, float *h1, float *h2, float *out, int ld)
{
    const pr_host *host = ctx->host;
    const int n = v->n, d = v->d, h = v->h;
    host->gemm(0, 1, n, h, d, 1.0f, v->p[P_EMB], d, v->p[P_W0], d, 0.0f, h1, h);
    host->add_bias_rows(h1, h, v->p[P_B0], n, h);
    relu(h1, (size_t)n * h);
    host->gemm(0, 1, n, h, h, 1.0f, h1, h, v->p[P_W2], h, 0.0f, h2, h);
    host->add_bias_rows(h2, h, v->p[P_B2], n, h);
    relu(h2, (size_t)n * h);
    host->gemm(0, 1, n, d, h, 1.0f, h2, h, v->p[P_W4], h, 0.0f, out, ld);
    host->add_bias_rows(out, ld, v->p[P_B4], n, d);
}

static int pt_forward(const pr_ctx *ctx)
{
    view v;
    int rc = get_view(ctx, &v);
    if (rc || (rc = check_rows(ctx, ctx->out, "the output", &v)))
        return rc;
    if (ctx->n_saved < N_SAVED || (rc = check_buf(ctx, ctx->saved[S_H1], "hidden_1", &v)) ||
        (rc = check_buf(ctx, ctx->saved[S_H2], "hidden_2", &v)))
        return rc ? rc : ctx->host->error(ctx, "p_tuning: the saved buffers are missing");
    encode(ctx, &v, ctx->saved[S_H1]->data, ctx->saved[S_H2]->data, ctx->out->data, row_stride(ctx->out));
    return 0;
}

/* backward, G = d_out (n, d), H1, H2 the saved ReLU outputs:
 *   dW4 += G^T H2     db4 += colsum G      D2 = (G W4) * [H2 > 0]
 *   dW2 += D2^T H1    db2 += colsum D2     D1 = (D2 W2) * [H1 > 0]
 *   dW0 += D1^T E     db0 += colsum D1     dE += D1 W0 */
static int pt_backward(const pr_ctx *ctx)
{
    const pr_host *host = ctx->host;
    view v;
    int rc = get_view(ctx, &v);
    if (rc || (rc = check_rows(ctx, ctx->d_out, "d_out", &v)))
        return rc;
    float *g[N_PARAMS] = { 0 };
    int any = 0;
    for (int i = 0; i < N_PARAMS; i++)
        any |= (g[i] = ctx->grads && ctx->grads[i] ? ctx->grads[i]->data : NULL) != NULL;
    if (!any)
        return 0;
    if (ctx->n_saved < N_SAVED || ctx->n_scratch < N_SCRATCH)
        return host->error(ctx, "p_tuning: the saved buffers or the scratch are missing");
    if ((rc = check_buf(ctx, ctx->saved[S_H1], "hidden_1", &v)) ||
        (rc = check_buf(ctx, ctx->saved[S_H2], "hidden_2", &v)) ||
        (rc = check_buf(ctx, ctx->scratch[X_D1], "d_hidden_1", &v)) ||
        (rc = check_buf(ctx, ctx->scratch[X_D2], "d_hidden_2", &v)))
        return rc;
    const int n = v.n, d = v.d, h = v.h, ldg = row_stride(ctx->d_out);
    const float *G = ctx->d_out->data, *H1 = ctx->saved[S_H1]->data, *H2 = ctx->saved[S_H2]->data;
    float *D1 = ctx->scratch[X_D1]->data, *D2 = ctx->scratch[X_D2]->data;
    const size_t nh = (size_t)n * h;

    if (g[P_W4])
        host->gemm(1, 0, d, h, n, 1.0f, G, ldg, H2, h, 1.0f, g[P_W4], h);
    if (g[P_B4])
        host->col_sums(g[P_B4], G, ldg, n, d);
    if (!g[P_W2] && !g[P_B2] && !g[P_W0] && !g[P_B0] && !g[P_EMB])
        return 0;
    host->gemm(0, 0, n, h, d, 1.0f, G, ldg, v.p[P_W4], h, 0.0f, D2, h);
    for (size_t i = 0; i < nh; i++)
        D2[i] = H2[i] > 0.0f ? D2[i] : 0.0f;
    if (g[P_W2])
        host->gemm(1, 0, h, h, n, 1.0f, D2, h, H1, h, 1.0f, g[P_W2], h);
    if (g[P_B2])
        host->col_sums(g[P_B2], D2, h, n, h);
    if (!g[P_W0] && !g[P_B0] && !g[P_EMB])
        return 0;
    host->gemm(0, 0, n, h, h, 1.0f, D2, h, v.p[P_W2], h, 0.0f, D1, h);
    for (size_t i = 0; i < nh; i++)
        D1[i] = H1[i] > 0.0f ? D1[i] : 0.0f;
    if (g[P_W0])
        host->gemm(1, 0, h, d, n, 1.0f, D1, h, v.p[P_EMB], d, 1.0f, g[P_W0], d);
    if (g[P_B0])
        host->col_sums(g[P_B0], D1, h, n, h);
    if (g[P_EMB])
        host->gemm(0, 0, n, d, h, 1.0f, D1, h, v.p[P_W0], d, 1.0f, g[P_EMB], d);
    return 0;
}

/* fold: out_params[0] = prompt (n_tokens, d_model) = MLP(embedding), the
 * rows forward writes.  The hidden layers go to host->alloc'd memory, so
 * neither a pending backward's saved buffers nor scratch are touched. */
static int pt_fold(const pr_ctx *ctx)
{
    view v;
    int rc = get_view(ctx, &v);
    if (rc)
        return rc;
    if (ctx->n_out_params < 1 || !ctx->out_params || !ctx->out_params[0] || !ctx->out_params[0]->data)
        return ctx->host->error(ctx, "p_tuning: fold needs the output tensor 'prompt'");
    const pr_tensor *p = ctx->out_params[0];
    if (p->ndim != 2 || p->shape[0] != v.n || p->shape[1] != v.d)
        return ctx->host->error(ctx, "p_tuning: fold output 'prompt' must be (%d, %d)", v.n, v.d);
    float *hid = ctx->host->alloc(2 * (size_t)v.n * (size_t)v.h * sizeof(float));
    if (!hid)
        return ctx->host->error(ctx, "p_tuning: out of memory for 2 x %d x %d floats", v.n, v.h);
    encode(ctx, &v, hid, hid + (size_t)v.n * v.h, p->data, v.d);
    ctx->host->free(hid);
    return 0;
}

static const pr_ext_peft_config peft_pt = {
    .struct_size = sizeof(pr_ext_peft_config),
    .read = peft_read_p_tuning,
    .write = peft_write_p_tuning,
};

static const void *peft_pt_extension(const char *uri)
{
    return strcmp(uri, PR_EXT_PEFT_CONFIG_URI) ? NULL : &peft_pt;
}

static const pr_technique pt_technique = {
    .struct_size = sizeof(pr_technique),
    .abi_major = PR_ABI_MAJOR,
    .name = "p_tuning",
    .version = "1.0.0",
    .summary = "P-tuning: n_tokens virtual tokens prepended to the input embeddings, generated in training by a "
               "trainable prompt encoder (Hugging Face PEFT's MLP); saved as the plain prompt of prompt_tuning.",
    .citation = "Liu, Zheng, Du, Ding, Qian, Yang, Tang (2021). GPT Understands, Too. arXiv:2103.10385",
    .license = "MIT",
    /* PEFT-Ref (arXiv 2304.12410): the virtual tokens come from a dense
     * network (intra dense: the prompt encoder, §3.2) and reach the model
     * through attention (inter dynamic); new parameters (addition); one
     * encoder for one prompt (no sharing); in the embedding space (input
     * embeddings), prepended once to the input sequence (concatenative,
     * once, concat) at the embedding (workspace embedding). */
    .intra = PR_INTRA_DENSE,
    .inter = PR_INTER_DYNAMIC,
    .adaptation = PR_ADAPT_ADDITION,
    .sharing = PR_SHARE_NONE,
    .input = PR_INPUT_EMBEDDINGS,
    .insertion = PR_INSERT_CONCATENATIVE,
    .insertions = PR_INSERTIONS_ONCE,
    .integration = PR_INTEGRATE_CONCAT,
    .workspace = PR_WS_EMBEDDING,
    .options = pt_options,
    .n_options = N_OPTS,
    .sites = PR_SITE_BIT(PR_SITE_EMBED),
    .default_sites = PR_SITE_BIT(PR_SITE_EMBED),
    .params = pt_params,
    .n_params = N_PARAMS,
    .saved = pt_saved,
    .n_saved = N_SAVED,
    .scratch = pt_scratch,
    .n_scratch = N_SCRATCH,
    .n_virtual = "n_tokens",
    .param_formula = "in training, once: n_tokens * d + (d * h + h) + (h * h + h) + (h * d + d) (h = "
                     "encoder_hidden_size, d = d_model); saved after fold: n_tokens * d",
    .forward = pt_forward,
    .backward = pt_backward,
    .fold = pt_fold,
    .fold_params = pt_fold_decl,
    .n_fold_params = 1,
    /* The encoder runs once per call whatever the number of tokens, and the
     * folded module copies rows; the host's default rule would charge 2
     * FLOP per element of every weight for every token. */
    .flops_per_token = "0",
    .peft_type = "P_TUNING",
    .extension_data = peft_pt_extension,
    .folds_to = "prompt_tuning",
};

static const pr_technique *const pt_techniques[] = { &pt_technique };

static const pr_plugin pt_plugin = {
    .struct_size = sizeof(pr_plugin),
    .abi_major = PR_ABI_MAJOR,
    .name = "p_tuning",
    .version = "1.0.0",
    .n_techniques = 1,
    .techniques = pt_techniques,
};

PR_PLUGIN_EXPORT const pr_plugin *peftref_plugin_entry(const pr_entry_args *args)
{
    (void)args; /* a built-in plugin needs none of the host's entry arguments */
    return &pt_plugin;
}
