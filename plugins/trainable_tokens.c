/* Trainable tokens: train only chosen rows of the token embedding
 * (Hugging Face PEFT's TRAINABLE_TOKENS, src/peft/tuners/trainable_tokens;
 * PEFT cites no paper for it).
 *
 *     trainable_tokens_delta  (n_token_indices, d_model)
 *
 * holds the NEW values of the rows token_indices[k] (PEFT's name and
 * meaning: the rows replace the embedding's, they are not added to it),
 * initialised to the embedding's own rows (PEFT's init_weights = true, so
 * the module starts as the identity) or to normal(0, 1) (init_weights =
 * false, torch.randn).  The embedding itself stays frozen: only these n rows
 * train, and they are what is saved.
 *
 * How it meets the model: the host's SELECT integration makes whole base
 * tensors trainable (core/module/plan.c resolve_selection: by kind and
 * workspace, never a part of a tensor), so it cannot select rows.  This
 * plugin therefore works at the embed site with a custom integration: for
 * every row r of the embedded sequence whose token is token_indices[k],
 *
 *     y[r] += trainable_tokens_delta[k] - E[token_indices[k]]
 *
 * which replaces that token's row of E in y = E[token] (+ the position
 * embedding, GPT-2); its backward adds dy[r] to row k of the gradient.
 *
 * What it needs of the host.  ABI 1 gives an embed-site callback the
 * embedded rows (ctx->in, ctx->out) but neither the token ids they came
 * from nor the token embedding (ctx->base_weight is NULL at stream sites).
 * Both come through the host extension PR_EXT_EMBED_TOKENS_URI
 * (<peftref/ext/embed_tokens.h>): token_ids gives the id of every row of
 * the call (-1 at a virtual position, so prompt-tuning rows are never
 * replaced), token_row_f32 a row of the frozen embedding.  A host without
 * the extension, or a call where it has no ids, stops the technique with
 * an error that says so rather than silently leaving the rows untrained.
 *
 * Gaps.  A shape expression cannot count a STRING option's list, so
 * n_token_indices states the count (checked against token_indices).  PEFT
 * also replaces the same rows of a tied LM head (GPT-2 ties wte to the
 * head): no site reaches the LM head, so here only the input side changes,
 * and the logits of the chosen tokens still use the frozen rows.  There is
 * no merge: the embed site has no base weight for a merge to write into.
 * The embedding must stay frozen (as in PEFT): E[token_indices[k]] is read
 * as a constant, so a trainable embedding would get dy for rows that are
 * in fact replaced.
 *
 * This file includes only <peftref/plugin.h>, the extension headers
 * <peftref/ext/embed_tokens.h> and <peftref/ext/peft_config.h>, its PEFT
 * codecs (peft/codecs.h) and libc, and links against nothing of
 * peftref. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <peftref/ext/embed_tokens.h>
#include <peftref/plugin.h>
#include <peftref/ext/peft_config.h>

#include "peft/codecs.h"

PR_PLUGIN_EXPORT const pr_plugin *peftref_plugin_entry(const pr_entry_args *args);

/* ---- declarations ------------------------------------------------------------------------------ */

enum { OPT_INDICES, OPT_N, OPT_INIT_WEIGHTS, N_OPTS };
enum { P_DELTA, N_PARAMS };
enum { X_ORIG, X_IDS, N_SCRATCH };

#define MAX_INDICES 65536

static const pr_option_decl tt_options[N_OPTS] = {
    [OPT_INDICES] = {
        .struct_size = sizeof(pr_option_decl), .name = "token_indices", .type = PR_OPT_STRING, .def_str = "0",
        .help = "comma-separated token ids whose embedding rows are trained, e.g. \"50256, 17, 42\" (PEFT: "
                "token_indices, a list with no useful default; here \"0\" so the defaults attach)",
    },
    [OPT_N] = {
        .struct_size = sizeof(pr_option_decl), .name = "n_token_indices", .type = PR_OPT_INT, .def = 1, .min = 1,
        .max = MAX_INDICES,
        .help = "how many ids token_indices lists (a parameter shape cannot count a string's list; not in PEFT, "
                "where it is len(token_indices)); must match",
    },
    [OPT_INIT_WEIGHTS] = {
        .struct_size = sizeof(pr_option_decl), .name = "init_weights", .type = PR_OPT_BOOL, .def = 1,
        .help = "true: the rows start as the embedding's own (the module starts as the identity; PEFT's "
                "default); false: normal(0, 1) (torch.randn)",
    },
};

static const pr_param_decl tt_params[N_PARAMS] = {
    [P_DELTA] = {
        .struct_size = sizeof(pr_param_decl), .name = "trainable_tokens_delta", .shape = "n_token_indices, d_model",
        .init = PR_INIT_CUSTOM, .scope = PR_SCOPE_GLOBAL, .flags = PR_PARAM_NO_DECAY,
        /* PEFT: base_model.model.transformer.wte.trainable_tokens_delta for
         * GPT-2, base_model.model.model.embed_tokens... for LLaMA ({embed}) */
        .peft_key = "{embed}.trainable_tokens_delta", .peft_layout = PR_PEFT_AS_IS,
        .help = "the new values of the rows token_indices lists, one d_model row each",
    },
};

static const pr_buffer_decl tt_scratch[N_SCRATCH] = {
    [X_ORIG] = { .struct_size = sizeof(pr_buffer_decl), .name = "original_rows", .shape = "n_token_indices, d_model" },
    [X_IDS] = { .struct_size = sizeof(pr_buffer_decl), .name = "row_ids", .shape = "rows" },
};

/* ---- helpers ----------------------------------------------------------------------------------- */

static int row_stride(const pr_tensor *t)
{
    return (int)(t->stride[0] ? t->stride[0] : t->shape[1]);
}

/* token_indices parsed into idx[n]; checks count, range and distinctness. */
static int parse_indices(const pr_ctx *ctx, int64_t *idx, int n)
{
    const pr_host *host = ctx->host;
    const char *s = ctx->n_options > OPT_INDICES ? ctx->options[OPT_INDICES].str : NULL;
    if (!s)
        return host->error(ctx, "trainable_tokens: option token_indices is missing");
    int k = 0;
    const char *p = s;
    for (;;) {
        while (*p == ' ' || *p == '\t')
            p++;
        if (!*p)
            break;
        char *end = NULL;
        long long v = strtoll(p, &end, 10);
        if (end == p)
            return host->error(ctx, "trainable_tokens: token_indices \"%s\": expected a token id at \"%s\"", s, p);
        if (v < 0 || v >= ctx->dims->vocab)
            return host->error(ctx, "trainable_tokens: token id %lld is outside the vocabulary [0, %d)", v,
                               ctx->dims->vocab);
        if (k >= n)
            return host->error(ctx, "trainable_tokens: token_indices lists more than n_token_indices = %d ids", n);
        for (int j = 0; j < k; j++)
            if (idx[j] == v)
                return host->error(ctx, "trainable_tokens: token id %lld is listed twice", v);
        idx[k++] = v;
        p = end;
        while (*p == ' ' || *p == '\t')
            p++;
        if (*p == ',')
            p++;
        else if (*p)
            return host->error(ctx, "trainable_tokens: token_indices \"%s\": unexpected '%c'", s, *p);
    }
    if (k != n)
        return host->error(ctx, "trainable_tokens: token_indices lists %d ids, n_token_indices says %d", k, n);
    return 0;
}

static const pr_ext_embed_tokens *ext_of(const pr_ctx *ctx)
{
    const pr_host *h = ctx->host;
    if (h->struct_size < offsetof(pr_host, extension_data) + sizeof h->extension_data || !h->extension_data)
        return NULL;
    const pr_ext_embed_tokens *e = h->extension_data(PR_EXT_EMBED_TOKENS_URI);
    if (!e || e->struct_size < sizeof(pr_ext_embed_tokens) || !e->token_ids || !e->token_row_f32)
        return NULL;
    return e;
}

static int no_ext(const pr_ctx *ctx, const char *what)
{
    return ctx->host->error(ctx, "trainable_tokens: %s needs the token ids and the token embedding at the embed "
                                 "site, which this host does not give a plugin (plugin ABI %u.%u without the "
                                 "interface " PR_EXT_EMBED_TOKENS_URI ")",
                            what, ctx->host->abi_major, ctx->host->abi_minor);
}

typedef struct view {
    int n, d;
    int64_t *idx;
    const pr_ext_embed_tokens *ext;
} view;

static int get_view(const pr_ctx *ctx, view *v, const char *what, int need_ext)
{
    const pr_host *host = ctx->host;
    if (ctx->n_params < N_PARAMS || !ctx->params || !ctx->params[P_DELTA]->data)
        return host->error(ctx, "trainable_tokens: expected the 'trainable_tokens_delta' parameter");
    const pr_tensor *p = ctx->params[P_DELTA];
    if (p->ndim != 2 || p->shape[1] != ctx->dims->d_model || p->shape[0] < 1 || p->shape[0] > MAX_INDICES)
        return host->error(ctx, "trainable_tokens: 'trainable_tokens_delta' must be (n_token_indices, d_model)");
    v->n = (int)p->shape[0];
    v->d = (int)p->shape[1];
    v->ext = ext_of(ctx);
    if (need_ext && !v->ext)
        return no_ext(ctx, what);
    v->idx = host->alloc((size_t)v->n * sizeof *v->idx);
    if (!v->idx)
        return host->error(ctx, "trainable_tokens: out of memory for %d ids", v->n);
    int rc = parse_indices(ctx, v->idx, v->n);
    if (rc)
        host->free(v->idx);
    return rc;
}

/* ---- callbacks --------------------------------------------------------------------------------- */

/* init: the rows the embedding has at token_indices (init_weights), or normal(0, 1). */
static int tt_init(const pr_ctx *ctx)
{
    const int copy = ctx->n_options > OPT_INIT_WEIGHTS && ctx->options[OPT_INIT_WEIGHTS].num != 0;
    view v;
    int rc = get_view(ctx, &v, "init_weights = true", copy);
    if (rc)
        return rc;
    float *V = ctx->params[P_DELTA]->data;
    if (copy) {
        for (int k = 0; k < v.n && !rc; k++)
            if (v.ext->token_row_f32(ctx, v.idx[k], V + (size_t)k * v.d))
                rc = ctx->host->error(ctx, "trainable_tokens: the host gave no embedding row for token %lld",
                                      (long long)v.idx[k]);
    } else {
        uint64_t st = ctx->seed;
        for (size_t i = 0; i < (size_t)v.n * v.d; i++)
            V[i] = ctx->host->rng_normal(&st);
    }
    ctx->host->free(v.idx);
    return rc;
}

/* The row ids of this call and the original rows, into scratch. */
static int call_rows(const pr_ctx *ctx, const view *v, int32_t **ids, float **orig)
{
    if (ctx->n_scratch < N_SCRATCH || !ctx->scratch[X_ORIG]->data || !ctx->scratch[X_IDS]->data)
        return ctx->host->error(ctx, "trainable_tokens: the scratch buffers are missing");
    *ids = ctx->scratch[X_IDS]->data; /* rows floats: as many int32 */
    *orig = ctx->scratch[X_ORIG]->data;
    if (v->ext->token_ids(ctx, *ids))
        return ctx->host->error(ctx, "trainable_tokens: the host gave no token ids for this call (%d rows at %s); "
                                     "it serves them only at the embed site during a model step",
                                ctx->rows, ctx->site == PR_SITE_EMBED ? "the embed site" : "another site");
    for (int k = 0; k < v->n; k++)
        if (v->ext->token_row_f32(ctx, v->idx[k], *orig + (size_t)k * v->d))
            return ctx->host->error(ctx, "trainable_tokens: the host gave no embedding row for token %lld",
                                    (long long)v->idx[k]);
    return 0;
}

static int which(const view *v, int32_t id)
{
    for (int k = 0; k < v->n; k++)
        if (v->idx[k] == id)
            return k;
    return -1;
}

/* y[r] += delta[k] - E[idx[k]] for every row r holding token idx[k] */
static int tt_integrate_forward(const pr_ctx *ctx)
{
    view v;
    int rc = get_view(ctx, &v, "forward", 1);
    if (rc)
        return rc;
    int32_t *ids;
    float *orig;
    if (!(rc = call_rows(ctx, &v, &ids, &orig))) {
        const float *V = ctx->params[P_DELTA]->data;
        float *y = ctx->out->data;
        const int ld = row_stride(ctx->out);
        for (int r = 0; r < ctx->rows; r++) {
            int k = ids[r] >= 0 ? which(&v, ids[r]) : -1;
            if (k < 0)
                continue;
            float *yr = y + (size_t)r * ld;
            for (int j = 0; j < v.d; j++)
                yr[j] += V[(size_t)k * v.d + j] - orig[(size_t)k * v.d + j];
        }
    }
    ctx->host->free(v.idx);
    return rc;
}

/* d_delta[k] += dy[r] over the rows holding token idx[k]; dy passes unchanged to the old y */
static int tt_integrate_backward(const pr_ctx *ctx)
{
    float *g = ctx->grads && ctx->grads[P_DELTA] ? ctx->grads[P_DELTA]->data : NULL;
    if (!g)
        return 0;
    view v;
    int rc = get_view(ctx, &v, "backward", 1);
    if (rc)
        return rc;
    int32_t *ids;
    float *orig;
    if (!(rc = call_rows(ctx, &v, &ids, &orig))) {
        const float *dy = ctx->d_out->data;
        const int ld = row_stride(ctx->d_out);
        for (int r = 0; r < ctx->rows; r++) {
            int k = ids[r] >= 0 ? which(&v, ids[r]) : -1;
            if (k < 0)
                continue;
            for (int j = 0; j < v.d; j++)
                g[(size_t)k * v.d + j] += dy[(size_t)r * ld + j];
        }
    }
    ctx->host->free(v.idx);
    return rc;
}

/* forward/backward: the custom integration does everything. */
static int tt_forward(const pr_ctx *ctx)
{
    (void)ctx;
    return 0;
}

static const pr_ext_peft_config peft_tt = {
    .struct_size = sizeof(pr_ext_peft_config),
    .read = peft_read_trainable_tokens,
    .write = peft_write_trainable_tokens,
};

static const void *peft_tt_extension(const char *uri)
{
    return strcmp(uri, PR_EXT_PEFT_CONFIG_URI) ? NULL : &peft_tt;
}

static const pr_technique tt_technique = {
    .struct_size = sizeof(pr_technique),
    .abi_major = PR_ABI_MAJOR,
    .name = "trainable_tokens",
    .version = "1.0.0",
    .summary = "Train only chosen rows of the token embedding (Hugging Face PEFT's TRAINABLE_TOKENS): the rows "
               "of token_indices are replaced by trainable copies; saved as those rows.  Needs the host extension "
               PR_EXT_EMBED_TOKENS_URI " (the token ids at the embed site).",
    .citation = "Hugging Face PEFT, TrainableTokensConfig / TrainableTokensModel (peft_type TRAINABLE_TOKENS), "
                "https://github.com/huggingface/peft (no paper)",
    .license = "MIT",
    /* PEFT-Ref: free vectors (intra none), fixed (inter fixed), a
     * reparameterisation of the frozen embedding (the chosen rows are
     * replaced; the typology's selection value is tied to the host's
     * whole-tensor SELECT integration, which cannot select rows), no
     * sharing, input: embeddings, in place (no new position, nothing
     * inserted beside the table's rows), once, custom integration, at the
     * embedding. */
    .intra = PR_INTRA_NONE,
    .inter = PR_INTER_FIXED,
    .adaptation = PR_ADAPT_REPARAMETERISATION,
    .sharing = PR_SHARE_NONE,
    .input = PR_INPUT_EMBEDDINGS,
    .insertion = PR_INSERT_IN_PLACE,
    .insertions = PR_INSERTIONS_ONCE,
    .integration = PR_INTEGRATE_CUSTOM,
    .workspace = PR_WS_EMBEDDING,
    .options = tt_options,
    .n_options = N_OPTS,
    .sites = PR_SITE_BIT(PR_SITE_EMBED),
    .default_sites = PR_SITE_BIT(PR_SITE_EMBED),
    .params = tt_params,
    .n_params = N_PARAMS,
    .scratch = tt_scratch,
    .n_scratch = N_SCRATCH,
    .param_formula = "n_token_indices * d_model (one insertion, at the embedding)",
    .forward = tt_forward,
    .backward = tt_forward,
    .integrate_forward = tt_integrate_forward,
    .integrate_backward = tt_integrate_backward,
    .init = tt_init,
    /* a lookup per token, no arithmetic beyond one row add */
    .flops_per_token = "d_model",
    .peft_type = "TRAINABLE_TOKENS",
    .extension_data = peft_tt_extension,
};

static const pr_technique *const tt_techniques[] = { &tt_technique };

static const pr_plugin tt_plugin = {
    .struct_size = sizeof(pr_plugin),
    .abi_major = PR_ABI_MAJOR,
    .name = "trainable_tokens",
    .version = "1.0.0",
    .n_techniques = 1,
    .techniques = tt_techniques,
};

PR_PLUGIN_EXPORT const pr_plugin *peftref_plugin_entry(const pr_entry_args *args)
{
    (void)args; /* a built-in plugin needs none of the host's entry arguments */
    return &tt_plugin;
}
