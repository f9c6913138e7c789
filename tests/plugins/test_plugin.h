/* A small valid technique shared by the test plugins of the plugin
 * loader's tests: each plugin starts from tp_fill() and breaks one thing.
 *
 * The technique adds a learned bias b (d_out) beside a projection:
 * y <- y + b (parallel, direct addition).  Like every plugin it includes
 * only <peftref/plugin.h>. */
#ifndef PEFTREF_TEST_PLUGIN_H
#define PEFTREF_TEST_PLUGIN_H

#include <string.h>

#include <peftref/plugin.h>

PR_PLUGIN_EXPORT const pr_plugin *peftref_plugin_entry(const pr_entry_args *args);

/* out (rows, d_out) = b broadcast over the rows. */
static inline int tp_forward(const pr_ctx *ctx)
{
    if (ctx->n_params < 1 || !ctx->params[0]->data)
        return ctx->host->error(ctx, "test plugin: parameter 'bias' missing");
    const float *b = ctx->params[0]->data;
    int64_t cols = ctx->out->shape[1], ld = ctx->out->stride[0] ? ctx->out->stride[0] : cols;
    float *out = ctx->out->data;
    for (int64_t r = 0; r < ctx->out->shape[0]; r++)
        memcpy(out + r * ld, b, (size_t)cols * sizeof(float));
    return 0;
}

/* d_bias (d_out) += sum over rows of d_out; the output does not depend on
 * the input, so d_in is left alone. */
static inline int tp_backward(const pr_ctx *ctx)
{
    if (ctx->n_params < 1 || !ctx->grads || !ctx->grads[0]->data)
        return 0;
    float *g = ctx->grads[0]->data;
    int64_t cols = ctx->d_out->shape[1], ld = ctx->d_out->stride[0] ? ctx->d_out->stride[0] : cols;
    const float *dy = ctx->d_out->data;
    for (int64_t r = 0; r < ctx->d_out->shape[0]; r++)
        for (int64_t j = 0; j < cols; j++)
            g[j] += dy[r * ld + j];
    return 0;
}

static const pr_option_decl tp_options[] = {
    {.struct_size = sizeof(pr_option_decl), .name = "width", .type = PR_OPT_INT, .def = 1, .min = 1, .max = 64,
     .help = "unused; an option for shape expressions to name", .per_site = 1},
};

static const pr_param_decl tp_params[] = {
    {.struct_size = sizeof(pr_param_decl), .name = "bias", .shape = "d_out", .init = PR_INIT_ZEROS,
     .scope = PR_SCOPE_INSERTION, .flags = PR_PARAM_NO_DECAY, .help = "the learned bias"},
};

/* A valid descriptor named name; each test plugin then breaks one field. */
static inline void tp_fill(pr_technique *t, const char *name)
{
    memset(t, 0, sizeof *t);
    t->struct_size = sizeof *t;
    t->abi_major = PR_ABI_MAJOR;
    t->name = name;
    t->version = "0.1.0";
    t->summary = "Learned bias beside a projection (a plugin of peftref's loader tests).";
    t->citation = "none: a test fixture";
    t->license = "MIT";
    t->intra = PR_INTRA_NONE;
    t->inter = PR_INTER_FIXED;
    t->adaptation = PR_ADAPT_ADDITION;
    t->sharing = PR_SHARE_NONE;
    t->input = PR_INPUT_NONE;
    t->insertion = PR_INSERT_PARALLEL;
    t->insertions = PR_INSERTIONS_PER_SITE_LAYER;
    t->integration = PR_INTEGRATE_DIRECT_ADD;
    t->workspace = PR_WS_ATTENTION | PR_WS_FFN;
    t->options = tp_options;
    t->n_options = 1;
    t->sites = PR_SITE_BIT(PR_SITE_O) | PR_SITE_BIT(PR_SITE_FFN_DOWN);
    t->default_sites = PR_SITE_BIT(PR_SITE_O);
    t->params = tp_params;
    t->n_params = 1;
    t->param_formula = "d_out per insertion";
    t->forward = tp_forward;
    t->backward = tp_backward;
}

/* Fill plugin with the n techniques of list. */
static inline void tp_plugin(pr_plugin *p, const char *name, const pr_technique *const *list, uint32_t n)
{
    memset(p, 0, sizeof *p);
    p->struct_size = sizeof *p;
    p->abi_major = PR_ABI_MAJOR;
    p->name = name;
    p->version = "0.1.0";
    p->n_techniques = n;
    p->techniques = list;
}

#endif
