/* Bottleneck adapters: a technique pack of three techniques that share one
 * module, a two-layer bottleneck MLP on the hidden state,
 *
 *     z = u . W_down + b_down          W_down (d, m), b_down (m)
 *     h = act(z) . W_up + b_up         W_up (m, d),   b_up (d)
 *
 * with d = d_model, and differ in where it sits and how its output joins
 * the model (PEFT-Ref, Sabry & Belz 2023, arXiv 2304.12410):
 *
 *   adapter_houlsby   Houlsby et al. 2019, "Parameter-Efficient Transfer
 *                     Learning for NLP", arXiv 1902.00751: after the
 *                     attention sub-layer and after the FFN sub-layer
 *                     (sites attn_out, ffn_out), sequential, u = y, the
 *                     sub-layer output: y <- y + h(y).  2L insertions.
 *   adapter_pfeiffer  Pfeiffer et al. 2021, "AdapterFusion: Non-Destructive
 *                     Task Composition for Transfer Learning", arXiv
 *                     2005.00247: the same, after the FFN only (ffn_out),
 *                     with AdapterHub's defaults (m = d_model / 16, ReLU).
 *                     L insertions.
 *   adapter_parallel  He et al. 2022, "Towards a Unified View of
 *                     Parameter-Efficient Transfer Learning", arXiv
 *                     2110.04366: parallel, u = x, the sub-layer INPUT (the
 *                     normalised hidden state entering the FFN or the
 *                     attention), y <- y + s * h(x), beside the FFN
 *                     (ffn_out, default) or the attention (attn_out).
 *
 * Every insertion owns 2*m*d + m + d parameters.  None is mergeable: the
 * nonlinearity keeps h out of the frozen weights.
 *
 * Weights are stored [in, out] (u . W), the layout of GPT-2's Conv1D
 * weights; AdapterHub's torch.nn.Linear weights are their transposes.
 *
 * The host integrates (DIRECT_ADD for the sequential two, SCALED_ADD with
 * s = scaling for the parallel one): forward returns h, backward receives
 * d_out = dL/dh (s*dy for the parallel adapter) and accumulates
 *
 *     dW_up   += act(z)^T . dh           db_up   += sum_rows dh
 *     dz       = act'(z) * (dh . W_up^T)
 *     dW_down += u^T . dz                db_down += sum_rows dz
 *     du      += dz . W_down^T
 *
 * Saved per insertion: z (rows, m).  Scratch: t (rows, m), act(z) and
 * then dL/d act(z); dz (rows, m).
 *
 * This file includes only <peftref/plugin.h> and libc, and links against
 * nothing of peftref: products, activations, bias rows and bias gradients
 * (add_bias_rows, col_sums) go through the host. */
#include <stdint.h>
#include <string.h>

#include <peftref/plugin.h>

PR_PLUGIN_EXPORT const pr_plugin *peftref_plugin_entry(const pr_entry_args *args);

/* Parameters, saved and scratch buffers: the same order in all three
 * techniques (and so in ctx->params, ctx->saved, ctx->scratch). */
enum { PARAM_DOWN_W, PARAM_DOWN_B, PARAM_UP_W, PARAM_UP_B, N_PARAMS };
enum { SAVED_Z, N_SAVED };
enum { SCRATCH_T, SCRATCH_DZ, N_SCRATCH };

/* Options.  The activation sits at index OPT_ACT in every technique, so
 * the shared callbacks find it there. */
enum { OPT_ACT = 1 };
enum { H_OPT_M, H_OPT_ACT, H_OPT_INIT, H_OPT_INIT_STD, H_N_OPTS };
enum { P_OPT_REDUCTION, P_OPT_ACT, P_OPT_INIT, P_OPT_INIT_STD, P_N_OPTS };
enum { A_OPT_M, A_OPT_ACT, A_OPT_SCALING, A_N_OPTS };

/* The pr_activation names, in pr_activation order: an ENUM option's index
 * is the activation. */
static const char *const activation_names[] = { "identity", "relu", "gelu", "silu", "tanh", "sigmoid", NULL };

/* The up projection's init (plugin.h init_option): pr_init names. */
static const char *const up_init_names[] = { "zeros", "normal", NULL };

/* ---- descriptors -------------------------------------------------------- */

#define SUBLAYER_SITES (PR_SITE_BIT(PR_SITE_ATTN_OUT) | PR_SITE_BIT(PR_SITE_FFN_OUT))

static const pr_option_decl houlsby_options[H_N_OPTS] = {
    [H_OPT_M] = {
        .struct_size = sizeof(pr_option_decl), .name = "m", .type = PR_OPT_INT,
        .def = 64, .min = 1, .max = 65536, .per_site = 1,
        .help = "bottleneck width; default 64, the paper's middle adapter size (it sweeps 8, 64 and "
                "256) and google-research/adapter-bert's default hidden_size",
    },
    [H_OPT_ACT] = {
        .struct_size = sizeof(pr_option_decl), .name = "activation", .type = PR_OPT_ENUM,
        .def = PR_ACT_GELU, .choices = activation_names,
        .help = "nonlinearity in the bottleneck; default gelu, as the paper's reference code "
                "(google-research/adapter-bert); AdapterHub's Houlsby config uses swish (silu)",
    },
    [H_OPT_INIT] = {
        .struct_size = sizeof(pr_option_decl), .name = "init", .type = PR_OPT_ENUM,
        .def = 0, .choices = up_init_names,
        .help = "init of the up projection: zeros (default) starts the module as the exact "
                "identity; normal draws it from N(0, init_std) like the down projection, the "
                "paper's near-identity init",
    },
    [H_OPT_INIT_STD] = {
        .struct_size = sizeof(pr_option_decl), .name = "init_std", .type = PR_OPT_FLOAT,
        .def = 1e-2, .min = 0, .max = 1,
        .help = "standard deviation of the normal init; default 1e-2, the paper's (Section 3.6; it "
                "also truncates at two standard deviations, which peftref does not)",
    },
};

static const pr_option_decl pfeiffer_options[P_N_OPTS] = {
    [P_OPT_REDUCTION] = {
        .struct_size = sizeof(pr_option_decl), .name = "reduction_factor", .type = PR_OPT_INT,
        .def = 16, .min = 1, .max = 65536,
        .help = "bottleneck width m = max(1, d_model / reduction_factor); default 16, AdapterHub's "
                "PfeifferConfig",
    },
    [P_OPT_ACT] = {
        .struct_size = sizeof(pr_option_decl), .name = "activation", .type = PR_OPT_ENUM,
        .def = PR_ACT_RELU, .choices = activation_names,
        .help = "nonlinearity in the bottleneck; default relu, AdapterHub's PfeifferConfig",
    },
    [P_OPT_INIT] = {
        .struct_size = sizeof(pr_option_decl), .name = "init", .type = PR_OPT_ENUM,
        .def = 0, .choices = up_init_names,
        .help = "init of the up projection: zeros (default) starts the module as the exact "
                "identity; normal draws it from N(0, init_std) like the down projection, "
                "AdapterHub's init_weights=\"bert\"",
    },
    [P_OPT_INIT_STD] = {
        .struct_size = sizeof(pr_option_decl), .name = "init_std", .type = PR_OPT_FLOAT,
        .def = 0.02, .min = 0, .max = 1,
        .help = "standard deviation of the normal init; default 0.02, AdapterHub's "
                "init_weights=\"bert\" (BERT's initializer_range)",
    },
};

static const pr_option_decl parallel_options[A_N_OPTS] = {
    [A_OPT_M] = {
        .struct_size = sizeof(pr_option_decl), .name = "m", .type = PR_OPT_INT,
        .def = 64, .min = 1, .max = 65536, .per_site = 1,
        .help = "bottleneck width; default 64 for the small models peftref targets (the paper "
                "uses 512 on d_model 1024 models; 64 is Houlsby's standard size, about 1% of "
                "GPT-2 small's parameters at ffn_out)",
    },
    [A_OPT_ACT] = {
        .struct_size = sizeof(pr_option_decl), .name = "activation", .type = PR_OPT_ENUM,
        .def = PR_ACT_RELU, .choices = activation_names,
        .help = "nonlinearity in the bottleneck; default relu, as the paper's code "
                "(jxhe/unify-parameter-efficient-tuning)",
    },
    [A_OPT_SCALING] = {
        .struct_size = sizeof(pr_option_decl), .name = "scaling", .type = PR_OPT_FLOAT,
        .def = 4, .min = 0, .max = 1e6, .per_site = 1,
        .help = "scale s of y + s*h(x); default 4, the paper's choice for the parallel adapter "
                "beside the FFN",
    },
};

/* Biases are not weight-decayed (flag PR_PARAM_NO_DECAY). */
static const pr_param_decl houlsby_params[N_PARAMS] = {
    [PARAM_DOWN_W] = {
        .struct_size = sizeof(pr_param_decl), .name = "down_weight", .shape = "d_model, m",
        .init = PR_INIT_NORMAL, .init_arg = "init_std", .scope = PR_SCOPE_INSERTION,
        .help = "down projection [d_model, m]; N(0, init_std)",
    },
    [PARAM_DOWN_B] = {
        .struct_size = sizeof(pr_param_decl), .name = "down_bias", .shape = "m",
        .init = PR_INIT_ZEROS, .scope = PR_SCOPE_INSERTION, .flags = PR_PARAM_NO_DECAY,
        .help = "down projection bias; zeros",
    },
    [PARAM_UP_W] = {
        .struct_size = sizeof(pr_param_decl), .name = "up_weight", .shape = "m, d_model",
        .init = PR_INIT_ZEROS, .init_arg = "init_std", .scope = PR_SCOPE_INSERTION,
        .init_option = "init",
        .help = "up projection [m, d_model]; zeros, or N(0, init_std) with init: normal",
    },
    [PARAM_UP_B] = {
        .struct_size = sizeof(pr_param_decl), .name = "up_bias", .shape = "d_model",
        .init = PR_INIT_ZEROS, .scope = PR_SCOPE_INSERTION, .flags = PR_PARAM_NO_DECAY,
        .help = "up projection bias; zeros",
    },
};

#define PFEIFFER_M "max(1, d_model / reduction_factor)"

static const pr_param_decl pfeiffer_params[N_PARAMS] = {
    [PARAM_DOWN_W] = {
        .struct_size = sizeof(pr_param_decl), .name = "down_weight", .shape = "d_model, " PFEIFFER_M,
        .init = PR_INIT_NORMAL, .init_arg = "init_std", .scope = PR_SCOPE_INSERTION,
        .help = "down projection [d_model, m]; N(0, init_std)",
    },
    [PARAM_DOWN_B] = {
        .struct_size = sizeof(pr_param_decl), .name = "down_bias", .shape = PFEIFFER_M,
        .init = PR_INIT_ZEROS, .scope = PR_SCOPE_INSERTION, .flags = PR_PARAM_NO_DECAY,
        .help = "down projection bias; zeros",
    },
    [PARAM_UP_W] = {
        .struct_size = sizeof(pr_param_decl), .name = "up_weight", .shape = PFEIFFER_M ", d_model",
        .init = PR_INIT_ZEROS, .init_arg = "init_std", .scope = PR_SCOPE_INSERTION,
        .init_option = "init",
        .help = "up projection [m, d_model]; zeros, or N(0, init_std) with init: normal",
    },
    [PARAM_UP_B] = {
        .struct_size = sizeof(pr_param_decl), .name = "up_bias", .shape = "d_model",
        .init = PR_INIT_ZEROS, .scope = PR_SCOPE_INSERTION, .flags = PR_PARAM_NO_DECAY,
        .help = "up projection bias; zeros",
    },
};

static const pr_param_decl parallel_params[N_PARAMS] = {
    [PARAM_DOWN_W] = {
        .struct_size = sizeof(pr_param_decl), .name = "down_weight", .shape = "d_model, m",
        .init = PR_INIT_UNIFORM, .init_arg = "1 / sqrt(d_model)", .scope = PR_SCOPE_INSERTION,
        .help = "down projection [d_model, m]; uniform(-1/sqrt(d_model), 1/sqrt(d_model)), i.e. "
                "PyTorch's kaiming_uniform_(a = sqrt(5)) on the (m, d_model) Linear weight, as the "
                "paper's code initialises it",
    },
    [PARAM_DOWN_B] = {
        .struct_size = sizeof(pr_param_decl), .name = "down_bias", .shape = "m",
        .init = PR_INIT_ZEROS, .scope = PR_SCOPE_INSERTION, .flags = PR_PARAM_NO_DECAY,
        .help = "down projection bias; zeros",
    },
    [PARAM_UP_W] = {
        .struct_size = sizeof(pr_param_decl), .name = "up_weight", .shape = "m, d_model",
        .init = PR_INIT_ZEROS, .scope = PR_SCOPE_INSERTION,
        .help = "up projection [m, d_model]; zeros, so the module starts as the identity",
    },
    [PARAM_UP_B] = {
        .struct_size = sizeof(pr_param_decl), .name = "up_bias", .shape = "d_model",
        .init = PR_INIT_ZEROS, .scope = PR_SCOPE_INSERTION, .flags = PR_PARAM_NO_DECAY,
        .help = "up projection bias; zeros",
    },
};

static const pr_buffer_decl bottleneck_saved[N_SAVED] = {
    [SAVED_Z] = { .struct_size = sizeof(pr_buffer_decl), .name = "z", .shape = "rows, m" },
};
static const pr_buffer_decl bottleneck_scratch[N_SCRATCH] = {
    [SCRATCH_T] = { .struct_size = sizeof(pr_buffer_decl), .name = "t", .shape = "rows, m" },
    [SCRATCH_DZ] = { .struct_size = sizeof(pr_buffer_decl), .name = "dz", .shape = "rows, m" },
};
static const pr_buffer_decl pfeiffer_saved[N_SAVED] = {
    [SAVED_Z] = { .struct_size = sizeof(pr_buffer_decl), .name = "z", .shape = "rows, " PFEIFFER_M },
};
static const pr_buffer_decl pfeiffer_scratch[N_SCRATCH] = {
    [SCRATCH_T] = { .struct_size = sizeof(pr_buffer_decl), .name = "t", .shape = "rows, " PFEIFFER_M },
    [SCRATCH_DZ] = { .struct_size = sizeof(pr_buffer_decl), .name = "dz", .shape = "rows, " PFEIFFER_M },
};

/* ---- the shared module -------------------------------------------------- */

/* Row stride of a 2-D tensor (0 in an unfilled stride means packed rows). */
static int row_stride(const pr_tensor *t)
{
    return (int)(t->stride[0] ? t->stride[0] : t->shape[1]);
}

/* The shapes of one call, read from the parameters the host allocated. */
typedef struct bn_call {
    int d, m, rows, act;
    const float *wd, *bd, *wu, *bu;
    float *z, *t, *dz;
} bn_call;

/* The technique's name, for error messages. */
static const char *tname(const pr_ctx *ctx)
{
    return ctx->technique && ctx->technique->name ? ctx->technique->name : "adapter";
}

static int bn_prepare(const pr_ctx *ctx, bn_call *b)
{
    const pr_host *host = ctx->host;
    const char *name = tname(ctx);
    if (ctx->n_params < N_PARAMS || ctx->n_options <= OPT_ACT || ctx->n_saved < N_SAVED ||
        ctx->n_scratch < N_SCRATCH)
        return host->error(ctx, "%s: expected %d parameters, %d saved and %d scratch buffers, got %u, %u and %u",
                           name, N_PARAMS, N_SAVED, N_SCRATCH, ctx->n_params, ctx->n_saved, ctx->n_scratch);
    const pr_tensor *wd = ctx->params[PARAM_DOWN_W], *bd = ctx->params[PARAM_DOWN_B];
    const pr_tensor *wu = ctx->params[PARAM_UP_W], *bu = ctx->params[PARAM_UP_B];
    if (wd->ndim != 2 || wu->ndim != 2 || bd->ndim != 1 || bu->ndim != 1 || !wd->data || !wu->data ||
        !bd->data || !bu->data || wu->shape[0] != wd->shape[1] || wu->shape[1] != wd->shape[0] ||
        bd->shape[0] != wd->shape[1] || bu->shape[0] != wd->shape[0])
        return host->error(ctx, "%s: parameters must be down_weight (d, m), down_bias (m), up_weight (m, d) and "
                           "up_bias (d)", name);
    b->d = (int)wd->shape[0];
    b->m = (int)wd->shape[1];
    b->rows = ctx->rows;
    b->act = (int)ctx->options[OPT_ACT].num;
    b->wd = wd->data;
    b->bd = bd->data;
    b->wu = wu->data;
    b->bu = bu->data;
    b->z = ctx->saved[SAVED_Z]->data;
    b->t = ctx->scratch[SCRATCH_T]->data;
    b->dz = ctx->scratch[SCRATCH_DZ]->data;
    if (!b->z || !b->t || !b->dz)
        return host->error(ctx, "%s: a saved or scratch buffer is missing", name);
    if (ctx->saved[SAVED_Z]->ndim != 2 || ctx->saved[SAVED_Z]->shape[0] < b->rows ||
        ctx->saved[SAVED_Z]->shape[1] != b->m)
        return host->error(ctx, "%s: saved buffer 'z' is (%lld, %lld), the call needs (%d, %d)", name,
                           (long long)ctx->saved[SAVED_Z]->shape[0], (long long)ctx->saved[SAVED_Z]->shape[1],
                           b->rows, b->m);
    if (!ctx->in->data || ctx->in->shape[1] != b->d)
        return host->error(ctx, "%s: module input must be (rows, %d)", name, b->d);
    return 0;
}

/* forward: in = u (rows, d) -> out = h (rows, d). */
static int bn_forward(const pr_ctx *ctx)
{
    const pr_host *host = ctx->host;
    bn_call b;
    int rc = bn_prepare(ctx, &b);
    if (rc)
        return rc;
    if (!ctx->out->data || ctx->out->shape[1] != b.d)
        return host->error(ctx, "%s: module output must be (rows, %d)", tname(ctx), b.d);
    const int ldo = row_stride(ctx->out);
    float *out = ctx->out->data;
    /* z (rows, m) = u . W_down + b_down */
    host->gemm(0, 0, b.rows, b.m, b.d, 1.0f, ctx->in->data, row_stride(ctx->in), b.wd, b.m, 0.0f, b.z, b.m);
    host->add_bias_rows(b.z, b.m, b.bd, b.rows, b.m);
    /* h (rows, d) = act(z) . W_up + b_up */
    host->act_forward(b.act, b.t, b.z, (size_t)b.rows * b.m);
    host->gemm(0, 0, b.rows, b.d, b.m, 1.0f, b.t, b.m, b.wu, b.d, 0.0f, out, ldo);
    host->add_bias_rows(out, ldo, b.bu, b.rows, b.d);
    return 0;
}

/* backward: d_out = dh (rows, d); accumulates the parameter gradients and
 * d_in (may be NULL) as in the header comment. */
static int bn_backward(const pr_ctx *ctx)
{
    const pr_host *host = ctx->host;
    bn_call b;
    int rc = bn_prepare(ctx, &b);
    if (rc)
        return rc;
    if (!ctx->d_out->data || ctx->d_out->shape[1] != b.d)
        return host->error(ctx, "%s: backward needs d_out (rows, %d)", tname(ctx), b.d);
    const float *dh = ctx->d_out->data;
    const int lddh = row_stride(ctx->d_out);
    float *g[N_PARAMS] = { 0 };
    for (int i = 0; i < N_PARAMS && ctx->grads; i++)
        g[i] = ctx->grads[i]->data;

    /* t = act(z), recomputed from the saved pre-activation */
    host->act_forward(b.act, b.t, b.z, (size_t)b.rows * b.m);
    if (g[PARAM_UP_W]) /* dW_up (m, d) += act(z)^T . dh */
        host->gemm(1, 0, b.m, b.d, b.rows, 1.0f, b.t, b.m, dh, lddh, 1.0f, g[PARAM_UP_W], b.d);
    if (g[PARAM_UP_B])
        host->col_sums(g[PARAM_UP_B], dh, lddh, b.rows, b.d);
    /* t = d act(z) (rows, m) = dh . W_up^T; dz = act'(z) * t */
    host->gemm(0, 1, b.rows, b.m, b.d, 1.0f, dh, lddh, b.wu, b.d, 0.0f, b.t, b.m);
    memset(b.dz, 0, (size_t)b.rows * b.m * sizeof(float));
    host->act_backward(b.act, b.dz, b.z, b.t, (size_t)b.rows * b.m);
    if (g[PARAM_DOWN_W]) /* dW_down (d, m) += u^T . dz */
        host->gemm(1, 0, b.d, b.m, b.rows, 1.0f, ctx->in->data, row_stride(ctx->in), b.dz, b.m, 1.0f,
                   g[PARAM_DOWN_W], b.m);
    if (g[PARAM_DOWN_B])
        host->col_sums(g[PARAM_DOWN_B], b.dz, b.m, b.rows, b.m);
    if (ctx->d_in->data) /* du (rows, d) += dz . W_down^T */
        host->gemm(0, 1, b.rows, b.d, b.m, 1.0f, b.dz, b.m, b.wd, b.m, 1.0f, ctx->d_in->data,
                   row_stride(ctx->d_in));
    return 0;
}

/* ---- the techniques ------------------------------------------------------ */

static const pr_technique houlsby_technique = {
    .struct_size = sizeof(pr_technique),
    .abi_major = PR_ABI_MAJOR,
    .name = "adapter_houlsby",
    .version = "1.0.0",
    .summary = "Bottleneck adapter y <- y + W_up.act(W_down.y) after the attention and the FFN "
               "sub-layers of every layer, before their residual adds.",
    .citation = "Houlsby, Giurgiu, Jastrzebski, Morrone, de Laroussilhe, Gesmundo, Attariyan, Gelly "
                "(2019). Parameter-Efficient Transfer Learning for NLP. ICML. arXiv:1902.00751",
    .license = "MIT",
    .intra = PR_INTRA_DENSE,
    .inter = PR_INTER_FIXED,
    .adaptation = PR_ADAPT_ADDITION,
    .sharing = PR_SHARE_NONE,
    .input = PR_INPUT_HIDDEN,
    .insertion = PR_INSERT_SEQUENTIAL,
    .insertions = PR_INSERTIONS_PER_SITE_LAYER,
    .integration = PR_INTEGRATE_DIRECT_ADD,
    .workspace = PR_WS_ATTENTION | PR_WS_FFN,
    .options = houlsby_options,
    .n_options = H_N_OPTS,
    .sites = SUBLAYER_SITES,
    .default_sites = SUBLAYER_SITES,
    .params = houlsby_params,
    .n_params = N_PARAMS,
    .saved = bottleneck_saved,
    .n_saved = N_SAVED,
    .scratch = bottleneck_scratch,
    .n_scratch = N_SCRATCH,
    .module_in = "d_out",
    .param_formula = "per insertion: 2*m*d + m + d (d = d_model); insertions = 2L (attn_out, ffn_out)",
    .forward = bn_forward,
    .backward = bn_backward,
};

static const pr_technique pfeiffer_technique = {
    .struct_size = sizeof(pr_technique),
    .abi_major = PR_ABI_MAJOR,
    .name = "adapter_pfeiffer",
    .version = "1.0.0",
    .summary = "Bottleneck adapter y <- y + W_up.relu(W_down.y) after the FFN sub-layer of every "
               "layer only, m = d_model / 16 (AdapterHub's Pfeiffer configuration).",
    .citation = "Pfeiffer, Kamath, Rueckle, Cho, Gurevych (2021). AdapterFusion: Non-Destructive "
                "Task Composition for Transfer Learning. EACL. arXiv:2005.00247",
    .license = "MIT",
    .intra = PR_INTRA_DENSE,
    .inter = PR_INTER_FIXED,
    .adaptation = PR_ADAPT_ADDITION,
    .sharing = PR_SHARE_NONE,
    .input = PR_INPUT_HIDDEN,
    .insertion = PR_INSERT_SEQUENTIAL,
    .insertions = PR_INSERTIONS_PER_LAYER,
    .integration = PR_INTEGRATE_DIRECT_ADD,
    .workspace = PR_WS_FFN,
    .options = pfeiffer_options,
    .n_options = P_N_OPTS,
    .sites = PR_SITE_BIT(PR_SITE_FFN_OUT),
    .default_sites = PR_SITE_BIT(PR_SITE_FFN_OUT),
    .params = pfeiffer_params,
    .n_params = N_PARAMS,
    .saved = pfeiffer_saved,
    .n_saved = N_SAVED,
    .scratch = pfeiffer_scratch,
    .n_scratch = N_SCRATCH,
    .module_in = "d_out",
    .param_formula = "per layer: 2*m*d + m + d (d = d_model, m = max(1, d_model / reduction_factor)); "
                     "insertions = L (ffn_out)",
    .forward = bn_forward,
    .backward = bn_backward,
};

static const pr_technique parallel_technique = {
    .struct_size = sizeof(pr_technique),
    .abi_major = PR_ABI_MAJOR,
    .name = "adapter_parallel",
    .version = "1.0.0",
    .summary = "Parallel adapter y <- y + s * W_up.relu(W_down.x) beside the FFN (default) or the "
               "attention, x the sub-layer's normalised input, s = 4.",
    .citation = "He, Zhou, Ma, Berg-Kirkpatrick, Neubig (2022). Towards a Unified View of "
                "Parameter-Efficient Transfer Learning. ICLR. arXiv:2110.04366",
    .license = "MIT",
    .intra = PR_INTRA_DENSE,
    .inter = PR_INTER_FIXED,
    .adaptation = PR_ADAPT_ADDITION,
    .sharing = PR_SHARE_NONE,
    .input = PR_INPUT_HIDDEN,
    .insertion = PR_INSERT_PARALLEL,
    .insertions = PR_INSERTIONS_PER_SITE_LAYER,
    .integration = PR_INTEGRATE_SCALED_ADD,
    .workspace = PR_WS_ATTENTION | PR_WS_FFN,
    .options = parallel_options,
    .n_options = A_N_OPTS,
    .sites = SUBLAYER_SITES,
    .default_sites = PR_SITE_BIT(PR_SITE_FFN_OUT),
    .params = parallel_params,
    .n_params = N_PARAMS,
    .saved = bottleneck_saved,
    .n_saved = N_SAVED,
    .scratch = bottleneck_scratch,
    .n_scratch = N_SCRATCH,
    .scale_expr = "scaling",
    .param_formula = "per insertion: 2*m*d + m + d (d = d_model); insertions = L per chosen site "
                     "(default ffn_out: L; attn_out and ffn_out: 2L)",
    .forward = bn_forward,
    .backward = bn_backward,
};

static const pr_technique *const adapter_techniques[] = {
    &houlsby_technique,
    &pfeiffer_technique,
    &parallel_technique,
};

static const pr_plugin adapters_plugin = {
    .struct_size = sizeof(pr_plugin),
    .abi_major = PR_ABI_MAJOR,
    .name = "adapters",
    .version = "1.0.0",
    .n_techniques = sizeof adapter_techniques / sizeof adapter_techniques[0],
    .techniques = adapter_techniques,
};

PR_PLUGIN_EXPORT const pr_plugin *peftref_plugin_entry(const pr_entry_args *args)
{
    (void)args; /* a built-in plugin needs none of the host's entry arguments */
    return &adapters_plugin;
}
