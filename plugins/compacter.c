/* Compacter and Compacter++: adapters whose projections are low-rank
 * parameterised hypercomplex multiplication (LPHM) layers (Karimi Mahabadi,
 * Henderson, Ruder 2021, "Compacter: Efficient Low-Rank Hypercomplex
 * Adapter Layers", arXiv 2106.04647).
 *
 * An adapter after a sub-layer (sequential insertion, the host adds the
 * residual):
 *
 *     h = LPHM_up(gelu(LPHM_down(y)))            y <- y + h
 *     LPHM(x) = x . W + b,   W = sum_{i=1..n} A_i (x) B_i,   B_i = s_i . t_i
 *
 * with, for a site of width d and a bottleneck of width m,
 *
 *     phm_rule      A    (n, n, n)         the "slow" weights A_i (n x n):
 *                                          ONE copy for the whole module,
 *                                          shared by every layer, every site
 *                                          and by the down and up projections
 *     down_W_left   s    (n, d/n, rank)    down projection W_down (d, m):
 *     down_W_right  t    (n, rank, m/n)    B_i = s_i t_i  (d/n x m/n)
 *     down_bias          (m)
 *     up_W_left     s    (n, m/n, rank)    up projection W_up (m, d):
 *     up_W_right    t    (n, rank, d/n)    B_i = s_i t_i  (m/n x d/n)
 *     up_bias            (d)
 *
 * The paper (§3.2-3.3) shares the A_i across all Compacter layers; its
 * reference implementation keeps a single phm_rule per transformer stack
 * that every PHM layer, down and up alike, uses, and the paper counts its
 * parameters as n^3 + 4L(d + m) for rank one.  peftref does the same.
 * Kronecker layout, for W (P*a, Q*b) = sum_i A_i (x) B_i with B_i (a x b):
 *     W[p*a + u, q*b + v] = sum_i A_i[p, q] * B_i[u, v].
 *
 * Defaults (the paper's T5-base setting and its reference configuration):
 * n = 4 Kronecker products, rank 1, reduction factor 32 (m = d/32, 24 for
 * d = 768), gelu (tanh approximation, "gelu_new"), A_i ~ normal(0, 1e-4),
 * s and t glorot-uniform with gain sqrt(2) per (i) slice.  One departure:
 * up_W_right starts at zero, so W_up = 0 and the adapted model starts as
 * the base model (the reference draws it glorot-uniform too).  The
 * bottleneck m is option m when set, else d / reduction_factor rounded
 * down to a multiple of n (at least n); d and m must be divisible by n,
 * which setup() checks.
 *
 * Per insertion the forward builds W_down and W_up from their Kronecker
 * sums into scratch and runs two GEMMs; backward forms dW = x^T dz (and
 * a^T dh) with one GEMM and reduces it into dA_i (every insertion adds
 * into the one shared gradient), ds_i and dt_i:
 *     dA_i[p, q] = <dW_pq, B_i>,  dB_i = sum_pq A_i[p, q] dW_pq,
 *     ds_i = dB_i t_i^T,          dt_i = s_i^T dB_i.
 *
 * Compacter adapts after attention and after the FFN (attn_out, ffn_out,
 * as Houlsby et al. 2019); Compacter++ after the FFN only (ffn_out, the
 * placement of Pfeiffer et al. 2021).
 *
 * This file includes only <peftref/plugin.h> and libc, and links against
 * nothing of peftref: the matrix products, gelu, bias rows and bias
 * gradients go through the host. */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <peftref/plugin.h>

PR_PLUGIN_EXPORT const pr_plugin *peftref_plugin_entry(const pr_entry_args *args);

enum { OPT_N, OPT_RF, OPT_M, OPT_RANK, OPT_PHM_INIT, N_OPTS };
enum { P_RULE, P_DS, P_DT, P_DB, P_US, P_UT, P_UB, N_PARAMS };
enum { SV_Z, SV_A, N_SAVED };
enum { SC_WD, SC_WU, SC_G, SC_BI, SC_DA, SC_DZ, N_SCRATCH };

/* The site width d and the bottleneck m as shape expressions: m is option
 * m when it is >= 1, else max(n, floor(d / reduction_factor / n) * n). */
#define D_ "d_out"
#define M_ "(m + (1 - min(m, 1)) * max(n, d_out / reduction_factor / n * n))"

static const pr_option_decl compacter_options[N_OPTS] = {
    [OPT_N] = {
        .struct_size = sizeof(pr_option_decl), .name = "n", .type = PR_OPT_INT,
        .def = 4, .min = 1, .max = 64, .per_site = 0,
        .help = "number of Kronecker products, the size of each shared A_i (n x n); d and m must "
                "be divisible by n (the paper: 4)",
    },
    [OPT_RF] = {
        .struct_size = sizeof(pr_option_decl), .name = "reduction_factor", .type = PR_OPT_INT,
        .def = 32, .min = 1, .max = 1 << 20, .per_site = 1,
        .help = "bottleneck m = d / reduction_factor, rounded down to a multiple of n and at least "
                "n, unless m is given (the paper's T5-base setting: 32, m = 24 for d = 768)",
    },
    [OPT_M] = {
        .struct_size = sizeof(pr_option_decl), .name = "m", .type = PR_OPT_INT,
        .def = 0, .min = 0, .max = 1 << 20, .per_site = 1,
        .help = "bottleneck width m, a multiple of n; 0 derives it from reduction_factor",
    },
    [OPT_RANK] = {
        .struct_size = sizeof(pr_option_decl), .name = "rank", .type = PR_OPT_INT,
        .def = 1, .min = 1, .max = 4096, .per_site = 0,
        .help = "rank of the fast weights B_i = s_i t_i (the paper: 1)",
    },
    [OPT_PHM_INIT] = {
        .struct_size = sizeof(pr_option_decl), .name = "phm_init_range", .type = PR_OPT_FLOAT,
        .def = 1e-4, .min = 0, .max = 10, .per_site = 0,
        .help = "standard deviation of the normal init of the shared A_i (the paper's reference "
                "configuration: 0.0001)",
    },
};

static const pr_param_decl compacter_params[N_PARAMS] = {
    [P_RULE] = {
        .struct_size = sizeof(pr_param_decl), .name = "phm_rule", .shape = "n, n, n",
        .init = PR_INIT_NORMAL, .init_arg = "phm_init_range", .scope = PR_SCOPE_GLOBAL,
        .help = "the shared slow weights A_1..A_n (n x n each): one copy for every layer, site "
                "and projection; normal(0, phm_init_range)",
    },
    [P_DS] = {
        .struct_size = sizeof(pr_param_decl), .name = "down_W_left", .shape = "n, " D_ " / n, rank",
        .init = PR_INIT_UNIFORM, .init_arg = "sqrt(12 / (" D_ " / n + rank))",
        .scope = PR_SCOPE_INSERTION,
        .help = "s_i of the down projection's B_i = s_i t_i; glorot uniform, gain sqrt(2)",
    },
    [P_DT] = {
        .struct_size = sizeof(pr_param_decl), .name = "down_W_right", .shape = "n, rank, " M_ " / n",
        .init = PR_INIT_UNIFORM, .init_arg = "sqrt(12 / (" M_ " / n + rank))",
        .scope = PR_SCOPE_INSERTION,
        .help = "t_i of the down projection's B_i = s_i t_i; glorot uniform, gain sqrt(2)",
    },
    [P_DB] = {
        .struct_size = sizeof(pr_param_decl), .name = "down_bias", .shape = M_,
        .init = PR_INIT_ZEROS, .scope = PR_SCOPE_INSERTION,
        .help = "bias of the down projection; zeros",
    },
    [P_US] = {
        .struct_size = sizeof(pr_param_decl), .name = "up_W_left", .shape = "n, " M_ " / n, rank",
        .init = PR_INIT_UNIFORM, .init_arg = "sqrt(12 / (" M_ " / n + rank))",
        .scope = PR_SCOPE_INSERTION,
        .help = "s_i of the up projection's B_i = s_i t_i; glorot uniform, gain sqrt(2)",
    },
    [P_UT] = {
        .struct_size = sizeof(pr_param_decl), .name = "up_W_right", .shape = "n, rank, " D_ " / n",
        .init = PR_INIT_ZEROS, .scope = PR_SCOPE_INSERTION,
        .help = "t_i of the up projection's B_i = s_i t_i; zeros, so W_up = 0 and the adapted "
                "model starts as the base model",
    },
    [P_UB] = {
        .struct_size = sizeof(pr_param_decl), .name = "up_bias", .shape = D_,
        .init = PR_INIT_ZEROS, .scope = PR_SCOPE_INSERTION,
        .help = "bias of the up projection; zeros",
    },
};

static const pr_buffer_decl compacter_saved[N_SAVED] = {
    [SV_Z] = { .struct_size = sizeof(pr_buffer_decl), .name = "z", .shape = "rows, " M_ },
    [SV_A] = { .struct_size = sizeof(pr_buffer_decl), .name = "a", .shape = "rows, " M_ },
};

static const pr_buffer_decl compacter_scratch[N_SCRATCH] = {
    [SC_WD] = { .struct_size = sizeof(pr_buffer_decl), .name = "w_down", .shape = D_ ", " M_ },
    [SC_WU] = { .struct_size = sizeof(pr_buffer_decl), .name = "w_up", .shape = M_ ", " D_ },
    [SC_G] = { .struct_size = sizeof(pr_buffer_decl), .name = "d_w", .shape = D_ ", " M_ },
    [SC_BI] = { .struct_size = sizeof(pr_buffer_decl), .name = "b_i",
                .shape = "2, (" D_ " / n) * (" M_ " / n)" },
    [SC_DA] = { .struct_size = sizeof(pr_buffer_decl), .name = "d_a", .shape = "rows, " M_ },
    [SC_DZ] = { .struct_size = sizeof(pr_buffer_decl), .name = "d_z", .shape = "rows, " M_ },
};

static int row_stride(const pr_tensor *t)
{
    return (int)(t->stride[0] ? t->stride[0] : t->shape[1]);
}

/* The shapes of one call, read from the parameters the host allocated. */
typedef struct cp_dims {
    int n, r, d, m, rows;
} cp_dims;

static int cp_get_dims(const pr_ctx *ctx, cp_dims *c)
{
    const pr_host *host = ctx->host;
    if (ctx->n_params < N_PARAMS || ctx->n_options < N_OPTS)
        return host->error(ctx, "compacter: expected %d parameters and %d options, got %u and %u",
                           N_PARAMS, N_OPTS, ctx->n_params, ctx->n_options);
    for (int i = 0; i < N_PARAMS; i++)
        if (!ctx->params[i]->data)
            return host->error(ctx, "compacter: parameter '%s' has no data",
                               compacter_params[i].name);
    const pr_tensor *rule = ctx->params[P_RULE], *ds = ctx->params[P_DS];
    const pr_tensor *db = ctx->params[P_DB], *ub = ctx->params[P_UB];
    c->n = (int)rule->shape[0];
    c->r = (int)ds->shape[2];
    c->m = (int)db->shape[0];
    c->d = (int)ub->shape[0];
    c->rows = ctx->rows;
    if (rule->ndim != 3 || ds->ndim != 3 || c->n < 1)
        return host->error(ctx, "compacter: phm_rule must be (n, n, n) and down_W_left (n, d/n, rank)");
    if (c->d % c->n != 0)
        return host->error(ctx, "compacter: the site width d = %d is not divisible by n = %d; "
                           "choose n dividing %d", c->d, c->n, c->d);
    if (c->m % c->n != 0)
        return host->error(ctx, "compacter: the bottleneck m = %d is not divisible by n = %d; "
                           "choose m (or reduction_factor) so that n divides m", c->m, c->n);
    const int a = c->d / c->n, b = c->m / c->n;
    const pr_tensor *dt = ctx->params[P_DT], *us = ctx->params[P_US], *ut = ctx->params[P_UT];
    if (ds->shape[0] != c->n || ds->shape[1] != a || dt->shape[0] != c->n || dt->shape[1] != c->r ||
        dt->shape[2] != b || us->shape[0] != c->n || us->shape[1] != b || us->shape[2] != c->r ||
        ut->shape[0] != c->n || ut->shape[1] != c->r || ut->shape[2] != a)
        return host->error(ctx, "compacter: the factor shapes do not agree with n = %d, d = %d, "
                           "m = %d, rank = %d", c->n, c->d, c->m, c->r);
    return 0;
}

static int cp_check_buffers(const pr_ctx *ctx, int need_scratch)
{
    if (ctx->n_saved < N_SAVED || ctx->n_scratch < N_SCRATCH)
        return ctx->host->error(ctx, "compacter: expected %d saved and %d scratch buffers, got %u and %u",
                                N_SAVED, N_SCRATCH, ctx->n_saved, ctx->n_scratch);
    for (int i = 0; i < N_SAVED; i++)
        if (!ctx->saved[i]->data)
            return ctx->host->error(ctx, "compacter: saved buffer '%s' is missing",
                                    compacter_saved[i].name);
    for (int i = 0; need_scratch && i < N_SCRATCH; i++)
        if (!ctx->scratch[i]->data)
            return ctx->host->error(ctx, "compacter: scratch buffer '%s' is missing",
                                    compacter_scratch[i].name);
    return 0;
}

/* W (n*a, n*b; packed) = sum_i A_i (x) (s_i t_i).
 * A (n, n, n), s (n, a, r), t (n, r, b); bi (a*b) is scratch. */
static void kron_build(const pr_host *host, float *W, const float *A, const float *s, const float *t,
                       int n, int a, int b, int r, float *bi)
{
    const int ld = n * b;
    memset(W, 0, (size_t)n * a * (size_t)ld * sizeof(float));
    for (int i = 0; i < n; i++) {
        /* B_i (a, b) = s_i (a, r) . t_i (r, b) */
        host->gemm(0, 0, a, b, r, 1.0f, s + (size_t)i * a * r, r, t + (size_t)i * r * b, b, 0.0f, bi, b);
        for (int p = 0; p < n; p++)
            for (int q = 0; q < n; q++) {
                const float c = A[((size_t)i * n + p) * n + q];
                for (int u = 0; u < a; u++) {
                    float *w = W + (size_t)(p * a + u) * ld + (size_t)q * b;
                    const float *bu = bi + (size_t)u * b;
                    for (int v = 0; v < b; v++)
                        w[v] += c * bu[v];
                }
            }
    }
}

/* Reduce G = dL/dW (n*a, n*b; packed) into the factors' gradients
 * (each may be NULL):
 *   dA_i[p, q] += <G_pq, B_i>,  dB_i = sum_pq A_i[p, q] G_pq,
 *   ds_i += dB_i t_i^T,         dt_i += s_i^T dB_i.
 * bi and dbi (a*b each) are scratch. */
static void kron_reduce(const pr_host *host, const float *G, const float *A, const float *s,
                        const float *t, float *dA, float *ds, float *dt, int n, int a, int b, int r,
                        float *bi, float *dbi)
{
    const int ld = n * b;
    const int want_b = ds || dt;
    for (int i = 0; i < n; i++) {
        const float *si = s + (size_t)i * a * r, *ti = t + (size_t)i * r * b;
        host->gemm(0, 0, a, b, r, 1.0f, si, r, ti, b, 0.0f, bi, b);
        if (want_b)
            memset(dbi, 0, (size_t)a * b * sizeof(float));
        for (int p = 0; p < n; p++)
            for (int q = 0; q < n; q++) {
                const float c = A[((size_t)i * n + p) * n + q];
                double acc = 0.0;
                for (int u = 0; u < a; u++) {
                    const float *g = G + (size_t)(p * a + u) * ld + (size_t)q * b;
                    const float *bu = bi + (size_t)u * b;
                    float *du = dbi + (size_t)u * b;
                    for (int v = 0; v < b; v++) {
                        acc += (double)g[v] * bu[v];
                        if (want_b)
                            du[v] += c * g[v];
                    }
                }
                if (dA)
                    dA[((size_t)i * n + p) * n + q] += (float)acc;
            }
        if (ds) /* ds_i (a, r) += dB_i (a, b) . t_i^T */
            host->gemm(0, 1, a, r, b, 1.0f, dbi, b, ti, b, 1.0f, ds + (size_t)i * a * r, r);
        if (dt) /* dt_i (r, b) += s_i^T . dB_i (a, b) */
            host->gemm(1, 0, r, b, a, 1.0f, si, r, dbi, b, 1.0f, dt + (size_t)i * r * b, b);
    }
}

#define PD(i) ((const float *)ctx->params[i]->data)
#define SD(i) ((float *)ctx->scratch[i]->data)

/* setup: d and m must be divisible by n (the host cannot tell from the
 * shape expressions, whose integer division would silently truncate). */
static int compacter_setup(const pr_ctx *ctx)
{
    cp_dims c;
    int rc = cp_get_dims(ctx, &c);
    if (rc)
        return rc;
    if (ctx->dims && ctx->dims->d_out != c.d)
        return ctx->host->error(ctx, "compacter: up_bias has %d entries but the site is %d wide",
                                c.d, ctx->dims->d_out);
    return 0;
}

/* forward: in = y (rows, d) -> out = h (rows, d) = gelu(y W_down + b_d) W_up + b_u */
static int compacter_forward(const pr_ctx *ctx)
{
    const pr_host *host = ctx->host;
    cp_dims c;
    int rc = cp_get_dims(ctx, &c);
    if (rc || (rc = cp_check_buffers(ctx, 1)))
        return rc;
    if (!ctx->in->data || !ctx->out->data)
        return host->error(ctx, "compacter: forward needs its input and output tensors");
    if (ctx->in->shape[1] != c.d || ctx->out->shape[1] != c.d)
        return host->error(ctx, "compacter: site widths %lld -> %lld, parameters expect %d -> %d",
                           (long long)ctx->in->shape[1], (long long)ctx->out->shape[1], c.d, c.d);
    const int n = c.n, a = c.d / n, b = c.m / n;
    float *z = ctx->saved[SV_Z]->data, *act = ctx->saved[SV_A]->data;
    float *wd = SD(SC_WD), *wu = SD(SC_WU), *bi = SD(SC_BI);

    /* z (rows, m) = y . W_down + b_down;  act = gelu(z) */
    kron_build(host, wd, PD(P_RULE), PD(P_DS), PD(P_DT), n, a, b, c.r, bi);
    host->gemm(0, 0, c.rows, c.m, c.d, 1.0f, ctx->in->data, row_stride(ctx->in), wd, c.m, 0.0f, z, c.m);
    host->add_bias_rows(z, c.m, PD(P_DB), c.rows, c.m);
    host->act_forward(PR_ACT_GELU, act, z, (size_t)c.rows * c.m);
    /* h (rows, d) = act . W_up + b_up */
    kron_build(host, wu, PD(P_RULE), PD(P_US), PD(P_UT), n, b, a, c.r, bi);
    const int ldo = row_stride(ctx->out);
    host->gemm(0, 0, c.rows, c.d, c.m, 1.0f, act, c.m, wu, c.d, 0.0f, ctx->out->data, ldo);
    host->add_bias_rows(ctx->out->data, ldo, PD(P_UB), c.rows, c.d);
    return 0;
}

/* backward: d_out = dh (rows, d).  Accumulates the gradients of the up
 * factors (from dW_up = act^T dh), up_bias, the down factors (from
 * dW_down = y^T dz, dz = gelu'(z) (.) dh W_up^T), down_bias, the shared
 * phm_rule (from both), and d_in += dz W_down^T. */
static int compacter_backward(const pr_ctx *ctx)
{
    const pr_host *host = ctx->host;
    cp_dims c;
    int rc = cp_get_dims(ctx, &c);
    if (rc || (rc = cp_check_buffers(ctx, 1)))
        return rc;
    if (!ctx->d_out->data)
        return host->error(ctx, "compacter: backward needs d_out");
    const int n = c.n, a = c.d / n, b = c.m / n;
    const float *dh = ctx->d_out->data;
    const int lddh = row_stride(ctx->d_out);
    const float *z = ctx->saved[SV_Z]->data, *act = ctx->saved[SV_A]->data;
    float *wd = SD(SC_WD), *wu = SD(SC_WU), *g = SD(SC_G), *da = SD(SC_DA), *dz = SD(SC_DZ);
    float *bi = SD(SC_BI), *dbi = bi + (size_t)a * b;
    float *grad[N_PARAMS];
    for (int i = 0; i < N_PARAMS; i++)
        grad[i] = ctx->grads ? ctx->grads[i]->data : NULL;
    float *dx = ctx->d_in->data;

    /* up projection */
    if (grad[P_UB])
        host->col_sums(grad[P_UB], dh, lddh, c.rows, c.d);
    if (grad[P_RULE] || grad[P_US] || grad[P_UT]) {
        /* dW_up (m, d) = act^T . dh */
        host->gemm(1, 0, c.m, c.d, c.rows, 1.0f, act, c.m, dh, lddh, 0.0f, g, c.d);
        kron_reduce(host, g, PD(P_RULE), PD(P_US), PD(P_UT), grad[P_RULE], grad[P_US], grad[P_UT], n,
                    b, a, c.r, bi, dbi);
    }
    const int need_down = grad[P_RULE] || grad[P_DS] || grad[P_DT] || grad[P_DB] || dx;
    if (!need_down)
        return 0;
    /* d_a (rows, m) = dh . W_up^T;  d_z = gelu'(z) (.) d_a */
    kron_build(host, wu, PD(P_RULE), PD(P_US), PD(P_UT), n, b, a, c.r, bi);
    host->gemm(0, 1, c.rows, c.m, c.d, 1.0f, dh, lddh, wu, c.d, 0.0f, da, c.m);
    memset(dz, 0, (size_t)c.rows * c.m * sizeof(float));
    host->act_backward(PR_ACT_GELU, dz, z, da, (size_t)c.rows * c.m);

    /* down projection */
    if (grad[P_DB])
        host->col_sums(grad[P_DB], dz, c.m, c.rows, c.m);
    if (grad[P_RULE] || grad[P_DS] || grad[P_DT]) {
        if (!ctx->in->data)
            return host->error(ctx, "compacter: backward needs the module input (in)");
        /* dW_down (d, m) = y^T . d_z */
        host->gemm(1, 0, c.d, c.m, c.rows, 1.0f, ctx->in->data, row_stride(ctx->in), dz, c.m, 0.0f, g,
                   c.m);
        kron_reduce(host, g, PD(P_RULE), PD(P_DS), PD(P_DT), grad[P_RULE], grad[P_DS], grad[P_DT], n,
                    a, b, c.r, bi, dbi);
    }
    if (dx) {
        /* d_in (rows, d) += d_z . W_down^T */
        kron_build(host, wd, PD(P_RULE), PD(P_DS), PD(P_DT), n, a, b, c.r, bi);
        host->gemm(0, 1, c.rows, c.d, c.m, 1.0f, dz, c.m, wd, c.m, 1.0f, dx, row_stride(ctx->d_in));
    }
    return 0;
}

#define COMPACTER_CITATION                                                                          \
    "Karimi Mahabadi, Henderson, Ruder (2021). Compacter: Efficient Low-Rank Hypercomplex Adapter " \
    "Layers. NeurIPS 2021. arXiv:2106.04647"

/* Forward FLOP per token: the two GEMMs with the built W_down (d, m) and
 * W_up (m, d), 2*d*m each.  The host's default rule (2 per element of each
 * 2-D parameter) would count 0, every factor being 3-D; building W from its
 * Kronecker sum is once per call, not per token. */
#define COMPACTER_FLOPS "4 * " D_ " * " M_

#define COMPACTER_COMMON                                                                            \
    .struct_size = sizeof(pr_technique), .abi_major = PR_ABI_MAJOR, .version = "1.0.0",             \
    .citation = COMPACTER_CITATION, .license = "MIT", .intra = PR_INTRA_FACTORISED,                \
    .inter = PR_INTER_FIXED, .adaptation = PR_ADAPT_ADDITION, .sharing = PR_SHARE_ACROSS_LAYERS,   \
    .input = PR_INPUT_HIDDEN, .insertion = PR_INSERT_SEQUENTIAL,                                    \
    .insertions = PR_INSERTIONS_PER_SITE_LAYER, .integration = PR_INTEGRATE_DIRECT_ADD,            \
    .options = compacter_options, .n_options = N_OPTS, .params = compacter_params,                 \
    .n_params = N_PARAMS, .saved = compacter_saved, .n_saved = N_SAVED,                             \
    .scratch = compacter_scratch, .n_scratch = N_SCRATCH, .forward = compacter_forward,            \
    .backward = compacter_backward, .setup = compacter_setup,                                       \
    .flops_per_token = COMPACTER_FLOPS

static const pr_technique compacter_technique = {
    COMPACTER_COMMON,
    .name = "compacter",
    .summary = "Houlsby-placed adapters (after attention and after the FFN) whose down and up "
               "projections are sums of Kronecker products A_i (x) s_i t_i, the n x n A_i shared "
               "by the whole module, with a gelu between; the host adds the residual.",
    .workspace = PR_WS_ATTENTION | PR_WS_FFN,
    .sites = PR_SITE_BIT(PR_SITE_ATTN_OUT) | PR_SITE_BIT(PR_SITE_FFN_OUT),
    .default_sites = PR_SITE_BIT(PR_SITE_ATTN_OUT) | PR_SITE_BIT(PR_SITE_FFN_OUT),
    .param_formula = "n^3 (phm_rule, shared by every insertion and by both projections) + per "
                     "insertion 2*rank*(d + m) + m + d, m = d / reduction_factor rounded down to a "
                     "multiple of n (at least n) unless m is set; insertions = 2L (attn_out, "
                     "ffn_out)",
};

static const pr_technique compacter_pp_technique = {
    COMPACTER_COMMON,
    .name = "compacter_pp",
    .summary = "Compacter++: the Compacter adapter after the FFN only (Pfeiffer placement), "
               "LPHM down and up projections with the n x n A_i shared across layers.",
    .workspace = PR_WS_FFN,
    .sites = PR_SITE_BIT(PR_SITE_FFN_OUT),
    .default_sites = PR_SITE_BIT(PR_SITE_FFN_OUT),
    .param_formula = "n^3 (phm_rule, shared by every insertion and by both projections) + per "
                     "insertion 2*rank*(d + m) + m + d, m = d / reduction_factor rounded down to a "
                     "multiple of n (at least n) unless m is set; insertions = L (ffn_out)",
};

static const pr_technique *const compacter_techniques[] = { &compacter_technique,
                                                            &compacter_pp_technique };

static const pr_plugin compacter_plugin = {
    .struct_size = sizeof(pr_plugin),
    .abi_major = PR_ABI_MAJOR,
    .name = "compacter",
    .version = "1.0.0",
    .n_techniques = 2,
    .techniques = compacter_techniques,
};

PR_PLUGIN_EXPORT const pr_plugin *peftref_plugin_entry(const pr_entry_args *args)
{
    (void)args; /* a built-in plugin needs none of the host's entry arguments */
    return &compacter_plugin;
}
