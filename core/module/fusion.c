/* peftref core: AdapterFusion's technique and site hooks (host code, not a
 * plugin): attention over the contributions of frozen fused modules. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "module_internal.h"
#include "host.h"

/* ---- fusion (AdapterFusion) -------------------------------------------------------------------- */

/* The fusion module's technique: host code, not a plugin.  W_Q and W_K
 * start as normal(0, 0.02) (the BERT-style init of AdapterFusion's
 * reference implementation, adapter-transformers), W_V as the identity
 * with 1e-6 off the diagonal (Pfeiffer et al. 2021, section 3.2: a
 * diagonal of ones and small weights elsewhere, to keep the adapters'
 * representations), so the fusion starts as the mean of the fused
 * contributions. */
static int fusion_init(const pr_ctx *c)
{
    pr_tensor *v = c->params[2];
    int64_t d = v->shape[0];
    float *w = v->data;
    for (int64_t i = 0; i < d; i++)
        for (int64_t j = 0; j < d; j++)
            w[i * d + j] = i == j ? 1.0f : 1e-6f;
    return 0;
}

static const pr_param_decl fusion_params[] = {
    { .struct_size = sizeof(pr_param_decl), .name = "query", .shape = "d_out, d_out", .init = PR_INIT_NORMAL,
      .init_arg = "0.02", .scope = PR_SCOPE_INSERTION, .help = "W_Q: query = y W_Q, y the site output" },
    { .struct_size = sizeof(pr_param_decl), .name = "key", .shape = "d_out, d_out", .init = PR_INIT_NORMAL,
      .init_arg = "0.02", .scope = PR_SCOPE_INSERTION,
      .help = "W_K: key_i = h_i W_K, h_i a fused module's contribution" },
    { .struct_size = sizeof(pr_param_decl), .name = "value", .shape = "d_out, d_out", .init = PR_INIT_CUSTOM,
      .scope = PR_SCOPE_INSERTION, .help = "W_V: value_i = h_i W_V; identity plus 1e-6 off the diagonal" },
};

const pr_technique mod_fusion_technique = {
    .struct_size = sizeof(pr_technique),
    .abi_major = PR_ABI_MAJOR,
    .name = "adapter_fusion",
    .version = "1.0.0",
    .summary = "AdapterFusion: attention over the contributions of frozen modules at one site",
    .citation = "Pfeiffer, Kamath, Rueckle, Cho, Gurevych 2021, AdapterFusion: Non-Destructive Task Composition "
                "for Transfer Learning, arXiv 2005.00247",
    .license = "MIT",
    .intra = PR_INTRA_ATTENTION,
    .inter = PR_INTER_FIXED,
    .adaptation = PR_ADAPT_ADDITION,
    .sharing = PR_SHARE_NONE,
    .input = PR_INPUT_HIDDEN,
    .insertion = PR_INSERT_SEQUENTIAL,
    .insertions = PR_INSERTIONS_PER_SITE_LAYER,
    .integration = PR_INTEGRATE_CUSTOM,
    .sites = (1u << PR_SITE_COUNT) - 1,
    .params = fusion_params,
    .n_params = 3,
    .param_formula = "3 * d_out^2 per insertion",
    .init = fusion_init,
};

/* A fusion insertion's saved block for `rows` positions and n fused
 * modules: yq, Q (rows, d); H, K, V (n, rows, d); A (rows, n). */
typedef struct fusion_bufs {
    float *yq, *q, *h, *k, *v, *a;
} fusion_bufs;

static size_t fusion_block_floats(const insertion *in, size_t rows)
{
    size_t rd = mod_round_up(rows * (size_t)in->dims.d_out), n = (size_t)in->mod->n_kids;
    return rd * (2 + 3 * n) + mod_round_up(rows * n);
}

static fusion_bufs fusion_views(const insertion *in, size_t rows)
{
    size_t rd = mod_round_up(rows * (size_t)in->dims.d_out), n = (size_t)in->mod->n_kids;
    fusion_bufs f;
    f.yq = in->fu;
    f.q = f.yq + rd;
    f.h = f.q + rd;
    f.k = f.h + n * rd;
    f.v = f.k + n * rd;
    f.a = f.v + n * rd;
    return f;
}

/* Scratch of a fusion backward: dQ, dK, dV, dH, dyq (rows, d); dS (rows, n);
 * dx when the site input needs no gradient (rows, d_in). */
static size_t fusion_scratch_floats(const insertion *in, size_t rows)
{
    return 5 * mod_round_up(rows * (size_t)in->dims.d_out) + mod_round_up(rows * (size_t)in->mod->n_kids) +
           mod_round_up(rows * (size_t)in->dims.d_in);
}

int mod_fusion_reserve(void *self, int B, int T, pr_error *err)
{
    insertion *in = self;
    pr_module *mod = in->mod;
    int rc;
    for (int i = 0; i < mod->n_kids; i++)
        if ((rc = mod_reserve_insertion(&mod->kids[i]->ins[in->index], B, T, err)))
            return rc;
    if (in->fu && B <= in->res_B && T <= in->res_T)
        return PR_OK;
    if (in->fu) {
        B = B > in->res_B ? B : in->res_B;
        T = T > in->res_T ? T : in->res_T;
    }
    size_t rows = (size_t)B * (size_t)T, nb = fusion_block_floats(in, rows), ns = fusion_scratch_floats(in, rows);
    float *block = mod_alloc_floats(nb);
    if (!block)
        return pr_errorf(err, PR_ERR_NOMEM, "fusion '%s' at %s: out of memory for saved activations (B=%d, T=%d)",
                         mod_name(mod), in->where, B, T);
    rc = mod_grow_scratch(mod, ns, "fusion", err);
    if (rc) {
        free(block);
        return rc;
    }
    free(in->block);
    in->block = in->fu = block;
    in->block_floats = nb;
    in->res_B = B;
    in->res_T = T;
    return PR_OK;
}

/* The context of fused module `kid`'s call at the fusion insertion's
 * site: its input is the site input x (parallel) or yq, the site output
 * as the fusion received it (sequential). */
static int fusion_kid_ctx(const insertion *ki, const pr_site_io *io, const float *yq, uint64_t step, pr_ctx *c,
                          pr_error *err)
{
    float *a, *b;
    int rc = mod_prepare_views((insertion *)ki, io->B, io->T, &a, &b, err);
    if (rc)
        return rc;
    mod_ctx_init(ki, c, io->B, io->T, io->training, step);
    if (ki->mod->t.insertion == PR_INSERT_SEQUENTIAL)
        CT(c, in) = mod_view2(yq, io->rows, io->y_dim, io->y_dim);
    else
        CT(c, in) = mod_view2(io->x, io->rows, io->x_dim, io->x_ld);
    return PR_OK;
}

/* Forward at one site, rows r, d = d_out, n fused modules:
 *   h_i = k_i f_i(input_i)          each fused module's contribution
 *   q = y W_Q, key_i = h_i W_K, v_i = h_i W_V
 *   a_i = softmax_i(q . key_i)      per row, no temperature
 *   y <- y + sum_i a_i v_i */
int mod_fusion_forward(void *self, const pr_site_io *io, pr_error *err)
{
    insertion *in = self;
    pr_module *mod = in->mod;
    if (!in->fu || io->B > in->res_B || io->T > in->res_T)
        return pr_errorf(err, PR_ERR_INVALID,
                         "fusion '%s' at %s: batch B=%d x T=%d exceeds what pr_model_reserve planned (B=%d x T=%d)",
                         mod_name(mod), in->where, io->B, io->T, in->res_B, in->res_T);
    const pr_host *host = host_services();
    int rows = io->rows, d = io->y_dim, n = mod->n_kids, rc;
    size_t rd = (size_t)rows * d, stride = mod_round_up(rd);
    fusion_bufs f = fusion_views(in, (size_t)rows);
    const float *wq = in->params[0].data, *wk = in->params[1].data, *wv = in->params[2].data;
    mod_copy_rows(f.yq, d, io->y, io->y_ld, rows, d);
    for (int i = 0; i < n; i++) {
        insertion *ki = &mod->kids[i]->ins[in->index];
        pr_ctx c;
        if ((rc = fusion_kid_ctx(ki, io, f.yq, ki->n_fwd++, &c, err)))
            return rc;
        float *h = f.h + (size_t)i * stride;
        memset(h, 0, rd * sizeof(float));
        CT(&c, out) = mod_view2(h, rows, d, d);
        if ((rc = mod_call(ki->mod, ki, ki->mod->t.forward, "forward", &c, err)))
            return rc;
        float k = mod_add_coefficient(ki);
        if (k != 1.0f)
            for (size_t j = 0; j < rd; j++)
                h[j] *= k;
        host->gemm(0, 0, rows, d, d, 1.0f, h, d, wk, d, 0.0f, f.k + (size_t)i * stride, d);
        host->gemm(0, 0, rows, d, d, 1.0f, h, d, wv, d, 0.0f, f.v + (size_t)i * stride, d);
    }
    host->gemm(0, 0, rows, d, d, 1.0f, f.yq, d, wq, d, 0.0f, f.q, d);
    for (int r = 0; r < rows; r++) {
        float *ar = f.a + (size_t)r * n;
        const float *qr = f.q + (size_t)r * d;
        for (int i = 0; i < n; i++) {
            const float *kr = f.k + (size_t)i * stride + (size_t)r * d;
            double sc = 0.0;
            for (int j = 0; j < d; j++)
                sc += (double)qr[j] * kr[j];
            ar[i] = (float)sc;
        }
    }
    host->softmax_rows(f.a, rows, n);
    for (int r = 0; r < rows; r++) {
        float *y = io->y + (size_t)r * io->y_ld;
        for (int i = 0; i < n; i++) {
            const float *vr = f.v + (size_t)i * stride + (size_t)r * d;
            float a = f.a[(size_t)r * n + i];
            for (int j = 0; j < d; j++)
                y[j] += a * vr[j];
        }
    }
    return PR_OK;
}

/* Backward, dy the gradient of the y the fusion left:
 *   dA_i = dy . v_i;  dS = A * (dA - sum_j A_j dA_j)      (softmax)
 *   dq = sum_i dS_i key_i;  dkey_i = dS_i q;  dv_i = A_i dy
 *   dW_Q += yq^T dq;  dW_K += sum_i h_i^T dkey_i;  dW_V += sum_i h_i^T dv_i
 *   dh_i = dkey_i W_K^T + dv_i W_V^T, handed to module i's backward as
 *   k_i dh_i (its input gradient goes to dx, or to dyq when it reads y)
 *   dy <- dy + dq W_Q^T + (sequential modules' input gradients). */
int mod_fusion_backward(void *self, const pr_site_io *io, pr_error *err)
{
    insertion *in = self;
    pr_module *mod = in->mod;
    if (!in->fu || io->B > in->res_B || io->T > in->res_T)
        return pr_errorf(err, PR_ERR_INVALID, "fusion '%s' at %s: backward without a planned forward", mod_name(mod),
                         in->where);
    const pr_host *host = host_services();
    int rows = io->rows, d = io->y_dim, n = mod->n_kids, rc;
    size_t rd = (size_t)rows * d, stride = mod_round_up(rd);
    fusion_bufs f = fusion_views(in, (size_t)rows);
    const float *wq = in->params[0].data, *wk = in->params[1].data, *wv = in->params[2].data;
    float *gq = in->grads[0].data, *gk = in->grads[1].data, *gv = in->grads[2].data;
    float *dq = mod->scratch, *dk = dq + stride, *dv = dk + stride, *dh = dv + stride, *dyq = dh + stride;
    float *ds = dyq + stride, *dxs = ds + mod_round_up((size_t)rows * n);
    float *dx = io->dx;
    int dx_ld = io->x_ld;
    if (!dx) {
        memset(dxs, 0, (size_t)rows * io->x_dim * sizeof(float));
        dx = dxs;
        dx_ld = io->x_dim;
    }
    /* the softmax */
    for (int r = 0; r < rows; r++) {
        const float *dy = io->dy + (size_t)r * io->y_ld, *ar = f.a + (size_t)r * n;
        float *sr = ds + (size_t)r * n;
        double m = 0.0;
        for (int i = 0; i < n; i++) {
            const float *vr = f.v + (size_t)i * stride + (size_t)r * d;
            double da = 0.0;
            for (int j = 0; j < d; j++)
                da += (double)dy[j] * vr[j];
            sr[i] = (float)da;
            m += ar[i] * da;
        }
        for (int i = 0; i < n; i++)
            sr[i] = ar[i] * (float)(sr[i] - m);
    }
    /* the query path */
    memset(dq, 0, rd * sizeof(float));
    for (int r = 0; r < rows; r++)
        for (int i = 0; i < n; i++)
            mod_axpy_rows(dq + (size_t)r * d, d, f.k + (size_t)i * stride + (size_t)r * d, d, 1, d, ds[(size_t)r * n + i]);
    if (gq)
        host->gemm(1, 0, d, d, rows, 1.0f, f.yq, d, dq, d, 1.0f, gq, d);
    host->gemm(0, 1, rows, d, d, 1.0f, dq, d, wq, d, 0.0f, dyq, d);
    /* keys, values and the fused modules */
    for (int i = 0; i < n; i++) {
        const float *h = f.h + (size_t)i * stride;
        for (int r = 0; r < rows; r++) {
            float sv = ds[(size_t)r * n + i], av = f.a[(size_t)r * n + i];
            const float *qr = f.q + (size_t)r * d, *dy = io->dy + (size_t)r * io->y_ld;
            float *dkr = dk + (size_t)r * d, *dvr = dv + (size_t)r * d;
            for (int j = 0; j < d; j++) {
                dkr[j] = sv * qr[j];
                dvr[j] = av * dy[j];
            }
        }
        if (gk)
            host->gemm(1, 0, d, d, rows, 1.0f, h, d, dk, d, 1.0f, gk, d);
        if (gv)
            host->gemm(1, 0, d, d, rows, 1.0f, h, d, dv, d, 1.0f, gv, d);
        insertion *ki = &mod->kids[i]->ins[in->index];
        float k = mod_add_coefficient(ki);
        host->gemm(0, 1, rows, d, d, k, dk, d, wk, d, 0.0f, dh, d);
        host->gemm(0, 1, rows, d, d, k, dv, d, wv, d, 1.0f, dh, d);
        pr_ctx c;
        if ((rc = fusion_kid_ctx(ki, io, f.yq, ki->n_fwd ? ki->n_fwd - 1 : 0, &c, err)))
            return rc;
        CT(&c, d_out) = mod_view2(dh, rows, d, d);
        if (ki->mod->t.insertion == PR_INSERT_SEQUENTIAL)
            CT(&c, d_in) = mod_view2(dyq, rows, d, d);
        else
            CT(&c, d_in) = mod_view2(dx, rows, io->x_dim, dx_ld);
        if ((rc = mod_call(ki->mod, ki, ki->mod->t.backward, "backward", &c, err)))
            return rc;
    }
    mod_axpy_rows(io->dy, io->y_ld, dyq, d, rows, d, 1.0f);
    return PR_OK;
}
