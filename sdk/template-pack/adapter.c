/* example_adapter: a bottleneck adapter after a sub-layer (Houlsby et al.
 * 2019, arXiv 1902.00751; at ffn_out alone it is Pfeiffer et al.'s
 * placement, arXiv 2005.00247),
 *
 *     z = y . W_down + b_down     (rows, m)
 *     a = act(z)
 *     h = a . W_up + b_up         (rows, d)
 *     y <- y + h                  (DIRECT_ADD: the host adds)
 *
 * Sequential insertion: the module input is the site output y.  W_up
 * starts at zero, so the adapter starts as the identity (Houlsby's
 * near-identity initialisation).  z and a are kept for backward in saved
 * buffers; da and dz are scratch.  The biases go through the host's
 * add_bias_rows (y += b on every row) and their gradients through col_sums
 * (db += column sums of dy), so the plugin copies no such loop. */
#include <string.h>

#include "pack.h"

enum { OPT_M, OPT_ACT, N_OPTS };
enum { P_DOWN_W, P_DOWN_B, P_UP_W, P_UP_B, N_PARAMS };
enum { S_Z, S_A, N_SAVED };
enum { X_DA, X_DZ, N_SCRATCH };

/* enum option choices, in the order of the activations below */
static const char *const act_choices[] = { "relu", "gelu", "silu", "tanh", NULL };
static const int act_kind[] = { PR_ACT_RELU, PR_ACT_GELU, PR_ACT_SILU, PR_ACT_TANH };

static const pr_option_decl options[N_OPTS] = {
    [OPT_M] = {
        .struct_size = sizeof(pr_option_decl), .name = "m", .type = PR_OPT_INT,
        .def = 16, .min = 1, .max = 65536, .per_site = 1,
        .help = "bottleneck width",
    },
    [OPT_ACT] = {
        .struct_size = sizeof(pr_option_decl), .name = "act", .type = PR_OPT_ENUM,
        .def = 0, .choices = act_choices,
        .help = "nonlinearity between the two projections",
    },
};

static const pr_param_decl params[N_PARAMS] = {
    [P_DOWN_W] = { .struct_size = sizeof(pr_param_decl), .name = "down_weight",
                   .shape = "d_out, m", .init = PR_INIT_NORMAL, .init_arg = "0.01",
                   .scope = PR_SCOPE_INSERTION, .help = "W_down [d, m]" },
    [P_DOWN_B] = { .struct_size = sizeof(pr_param_decl), .name = "down_bias", .shape = "m",
                   .init = PR_INIT_ZEROS, .scope = PR_SCOPE_INSERTION,
                   .flags = PR_PARAM_NO_DECAY, .help = "b_down" },
    [P_UP_W] = { .struct_size = sizeof(pr_param_decl), .name = "up_weight", .shape = "m, d_out",
                 .init = PR_INIT_ZEROS, .scope = PR_SCOPE_INSERTION,
                 .help = "W_up [m, d]; zeros: the adapter starts as the identity" },
    [P_UP_B] = { .struct_size = sizeof(pr_param_decl), .name = "up_bias", .shape = "d_out",
                 .init = PR_INIT_ZEROS, .scope = PR_SCOPE_INSERTION,
                 .flags = PR_PARAM_NO_DECAY, .help = "b_up" },
};

static const pr_buffer_decl saved[N_SAVED] = {
    [S_Z] = { .struct_size = sizeof(pr_buffer_decl), .name = "z", .shape = "rows, m" },
    [S_A] = { .struct_size = sizeof(pr_buffer_decl), .name = "a", .shape = "rows, m" },
};

static const pr_buffer_decl scratch[N_SCRATCH] = {
    [X_DA] = { .struct_size = sizeof(pr_buffer_decl), .name = "da", .shape = "rows, m" },
    [X_DZ] = { .struct_size = sizeof(pr_buffer_decl), .name = "dz", .shape = "rows, m" },
};

static float *P(const pr_ctx *ctx, int i) { return ctx->params[i]->data; }

/* parameter i's gradient, or NULL when it is not trained (ctx->grads itself
 * is NULL when nothing is) */
static float *G(const pr_ctx *ctx, int i) { return ctx->grads ? ctx->grads[i]->data : NULL; }

static int check_shapes(const pr_ctx *ctx, int *d, int *m)
{
    if (ctx->n_params < N_PARAMS || ctx->n_saved < N_SAVED || ctx->n_scratch < N_SCRATCH)
        return ctx->host->error(ctx, "example_adapter: missing parameters or buffers");
    *d = (int)ctx->params[P_DOWN_W]->shape[0];
    *m = (int)ctx->params[P_DOWN_W]->shape[1];
    return 0;
}

/* forward: in = y (rows, d) -> out = h (rows, d) */
static int adapter_forward(const pr_ctx *ctx)
{
    const pr_host *host = ctx->host;
    int d = 0, m = 0, rc = check_shapes(ctx, &d, &m);
    if (rc)
        return rc;
    if (ctx->in->shape[1] != d || ctx->out->shape[1] != d)
        return host->error(ctx, "example_adapter: site width %lld, parameters expect %d",
                           (long long)ctx->in->shape[1], d);
    const int rows = ctx->rows, act = act_kind[(int)ctx->options[OPT_ACT].num];
    float *z = ctx->saved[S_Z]->data, *a = ctx->saved[S_A]->data;
    /* z (rows, m) = y (rows, d) . W_down (d, m) + b_down */
    host->gemm(0, 0, rows, m, d, 1.0f, ctx->in->data, (int)ctx->in->stride[0], P(ctx, P_DOWN_W), m,
               0.0f, z, m);
    host->add_bias_rows(z, m, P(ctx, P_DOWN_B), rows, m);
    host->act_forward(act, a, z, (size_t)rows * m);
    /* h (rows, d) = a (rows, m) . W_up (m, d) + b_up */
    float *h = ctx->out->data;
    const int ldh = (int)ctx->out->stride[0];
    host->gemm(0, 0, rows, d, m, 1.0f, a, m, P(ctx, P_UP_W), d, 0.0f, h, ldh);
    host->add_bias_rows(h, ldh, P(ctx, P_UP_B), rows, d);
    return 0;
}

/* backward: d_out = dh (rows, d); in = the y of the matching forward.
 *   dW_up += a^T dh, db_up += sum dh, da = dh W_up^T, dz = act'(z) da,
 *   dW_down += y^T dz, db_down += sum dz, d_in += dz W_down^T */
static int adapter_backward(const pr_ctx *ctx)
{
    const pr_host *host = ctx->host;
    int d = 0, m = 0, rc = check_shapes(ctx, &d, &m);
    if (rc)
        return rc;
    const int rows = ctx->rows, act = act_kind[(int)ctx->options[OPT_ACT].num];
    const float *dh = ctx->d_out->data, *z = ctx->saved[S_Z]->data, *a = ctx->saved[S_A]->data;
    const int lddh = (int)ctx->d_out->stride[0];
    float *da = ctx->scratch[X_DA]->data, *dz = ctx->scratch[X_DZ]->data;
    float *g_dw = G(ctx, P_DOWN_W), *g_db = G(ctx, P_DOWN_B);
    float *g_uw = G(ctx, P_UP_W), *g_ub = G(ctx, P_UP_B);

    if (g_uw)
        host->gemm(1, 0, m, d, rows, 1.0f, a, m, dh, lddh, 1.0f, g_uw, d);
    if (g_ub)
        host->col_sums(g_ub, dh, lddh, rows, d);
    if (!g_dw && !g_db && !ctx->d_in->data)
        return 0;
    host->gemm(0, 1, rows, m, d, 1.0f, dh, lddh, P(ctx, P_UP_W), d, 0.0f, da, m);
    memset(dz, 0, sizeof(float) * (size_t)rows * m);
    host->act_backward(act, dz, z, da, (size_t)rows * m);
    if (g_dw) {
        if (!ctx->in->data)
            return host->error(ctx, "example_adapter: backward needs its input y");
        host->gemm(1, 0, d, m, rows, 1.0f, ctx->in->data, (int)ctx->in->stride[0], dz, m, 1.0f,
                   g_dw, m);
    }
    if (g_db)
        host->col_sums(g_db, dz, m, rows, m);
    if (ctx->d_in->data)
        host->gemm(0, 1, rows, d, m, 1.0f, dz, m, P(ctx, P_DOWN_W), m, 1.0f, ctx->d_in->data,
                   (int)ctx->d_in->stride[0]);
    return 0;
}

const pr_technique example_adapter = {
    .struct_size = sizeof(pr_technique),
    .abi_major = PR_ABI_MAJOR,
    .name = "example_adapter",
    .version = PACKAGE_VERSION,
    .summary = "Bottleneck adapter after a sub-layer: y <- y + act(y.W_down + b).W_up + b",
    .citation = "Houlsby et al. (2019), Parameter-Efficient Transfer Learning for NLP, "
                "arXiv:1902.00751",
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
    .options = options,
    .n_options = N_OPTS,
    .sites = PR_SITE_BIT(PR_SITE_ATTN_OUT) | PR_SITE_BIT(PR_SITE_FFN_OUT),
    .default_sites = PR_SITE_BIT(PR_SITE_FFN_OUT),
    .params = params,
    .n_params = N_PARAMS,
    .saved = saved,
    .n_saved = N_SAVED,
    .scratch = scratch,
    .n_scratch = N_SCRATCH,
    .module_in = "d_out",
    .module_out = "d_out",
    .param_formula = "2 * m * d + m + d per insertion",
    .forward = adapter_forward,
    .backward = adapter_backward,
};
