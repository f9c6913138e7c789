/* scaled_bias: a learned bias vector added at a site, scaled by alpha.
 *
 *     y <- y + alpha * b        b (d_out), zeros at the start
 *
 * A complete peftref technique in one file, meant to be copied: rename it,
 * change the descriptor and the two callbacks, build with the Makefile next
 * to it, and check it with `peftref plugins check ./NAME.so`.
 *
 * What every plugin does, and this one shows:
 *  - include only <peftref/plugin.h> (and the C library);
 *  - describe itself in data: identity, the PEFT-Ref typology, options,
 *    sites, parameters;
 *  - compute the module output h in forward and leave the integration to
 *    the host (here SCALED_ADD with scale_expr "alpha": the host adds
 *    alpha*h to y, and hands backward d_out = alpha*dy);
 *  - ACCUMULATE (+=) into the gradients it is given in backward, skipping
 *    any whose data is NULL;
 *  - use the host's services (here col_sums for the bias gradient) rather
 *    than copying such loops;
 *  - export one symbol, peftref_plugin_entry, which receives the host's
 *    entry arguments (compile with -fvisibility=hidden and mark it
 *    PR_PLUGIN_EXPORT); a plugin that refuses to load returns NULL after
 *    writing its reason into args->error. */
#include <stddef.h>

#include <peftref/plugin.h>

PR_PLUGIN_EXPORT const pr_plugin *peftref_plugin_entry(const pr_entry_args *args);

enum { OPT_ALPHA, N_OPTS };
enum { PARAM_BIAS, N_PARAMS };

static const pr_option_decl options[N_OPTS] = {
    [OPT_ALPHA] = {
        .struct_size = sizeof(pr_option_decl), .name = "alpha", .type = PR_OPT_FLOAT,
        .def = 1.0, .min = 0.0, .max = 1000.0, .per_site = 1,
        .help = "scale of the bias (the host multiplies the module output by it)",
    },
};

static const pr_param_decl params[N_PARAMS] = {
    [PARAM_BIAS] = {
        .struct_size = sizeof(pr_param_decl), .name = "bias", .shape = "d_out",
        .init = PR_INIT_ZEROS, .scope = PR_SCOPE_INSERTION, .flags = PR_PARAM_NO_DECAY,
        .help = "the bias added to every position",
    },
};

/* forward: out = h (rows, d_out), every row equal to b.  The input is not
 * read (input type "none"). */
static int scaled_bias_forward(const pr_ctx *ctx)
{
    const pr_tensor *b = ctx->params[PARAM_BIAS];
    const pr_tensor *out = ctx->out;
    if (!out->data || out->shape[1] != b->shape[0])
        return ctx->host->error(ctx, "scaled_bias: output width %lld, bias width %lld",
                                (long long)out->shape[1], (long long)b->shape[0]);
    const float *bias = b->data;
    const int64_t rows = out->shape[0], cols = out->shape[1], ld = out->stride[0];
    for (int64_t i = 0; i < rows; i++) {
        float *row = (float *)out->data + i * ld;
        for (int64_t j = 0; j < cols; j++)
            row[j] = bias[j];
    }
    return 0;
}

/* backward: d_out = dh (rows, d_out).  db += sum over rows of dh (the
 * host's col_sums); the input has no gradient from this module (h does not
 * depend on it). */
static int scaled_bias_backward(const pr_ctx *ctx)
{
    float *db = ctx->grads ? ctx->grads[PARAM_BIAS]->data : NULL;
    if (!db)
        return 0; /* frozen: nothing to accumulate */
    const pr_tensor *dh = ctx->d_out;
    ctx->host->col_sums(db, dh->data, (int)dh->stride[0], (int)dh->shape[0], (int)dh->shape[1]);
    return 0;
}

static const pr_technique scaled_bias = {
    .struct_size = sizeof(pr_technique),
    .abi_major = PR_ABI_MAJOR,
    .name = "scaled_bias",
    .version = "1.0.0",
    .summary = "A learned bias vector added at a site: y <- y + alpha * b",
    .citation = "peftref SDK template",
    .license = "MIT",
    /* typology (PEFT-Ref, Sabry & Belz 2023) */
    .intra = PR_INTRA_NONE,              /* a free vector */
    .inter = PR_INTER_FIXED,
    .adaptation = PR_ADAPT_ADDITION,
    .sharing = PR_SHARE_NONE,
    .input = PR_INPUT_NONE,
    .insertion = PR_INSERT_PARALLEL,
    .insertions = PR_INSERTIONS_PER_SITE_LAYER,
    .integration = PR_INTEGRATE_SCALED_ADD,
    .workspace = PR_WS_ATTENTION | PR_WS_FFN,
    .options = options,
    .n_options = N_OPTS,
    .sites = PR_SITE_BIT(PR_SITE_O) | PR_SITE_BIT(PR_SITE_ATTN_OUT) |
             PR_SITE_BIT(PR_SITE_FFN_UP) | PR_SITE_BIT(PR_SITE_FFN_DOWN) |
             PR_SITE_BIT(PR_SITE_FFN_OUT),
    .default_sites = PR_SITE_BIT(PR_SITE_FFN_OUT),
    .params = params,
    .n_params = N_PARAMS,
    .scale_expr = "alpha",
    .param_formula = "d_out per insertion",
    .forward = scaled_bias_forward,
    .backward = scaled_bias_backward,
};

static const pr_technique *const techniques[] = { &scaled_bias };

static const pr_plugin plugin = {
    .struct_size = sizeof(pr_plugin),
    .abi_major = PR_ABI_MAJOR,
    .name = "scaled_bias",
    .version = "1.0.0",
    .n_techniques = 1,
    .techniques = techniques,
};

PR_PLUGIN_EXPORT const pr_plugin *peftref_plugin_entry(const pr_entry_args *args)
{
    (void)args; /* host, bundle_path, error: unused by a plugin that always loads */
    return &plugin;
}
