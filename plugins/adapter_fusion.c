/* peftref plugin: AdapterFusion (Pfeiffer, Kamath, Rueckle, Cho, Gurevych
 * 2021, arXiv 2005.00247), a composite technique (plugin.h,
 * pr_technique.composite): attention, per position, over the
 * contributions h_i of frozen modules attached at the same site, with
 * the query read from the site output y:
 *     q = y W_Q,  key_i = h_i W_K,  v_i = h_i W_V      (W_* d x d, d = d_out)
 *     a_i = softmax_i(q . key_i)                        (no temperature)
 *     h = sum_i a_i v_i,   y <- y + h                   (direct addition)
 * The host runs the members and hands their h_i (members[i]) and y
 * (site_y); it adds h and routes d_members[i] into the members' backward.
 * W_Q and W_K start as normal(0, 0.02) (the BERT-style init of the
 * reference implementation, adapter-transformers), W_V as the identity
 * with 1e-6 off the diagonal (section 3.2: keep the adapters'
 * representations), so the fusion starts near the mean of the
 * contributions. */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "peftref/plugin.h"

PR_PLUGIN_EXPORT const pr_plugin *peftref_plugin_entry(const pr_entry_args *args);

enum { P_QUERY, P_KEY, P_VALUE, N_PARAMS };
enum { S_Q, S_K, S_V, S_A, N_SAVED };
enum { X_DQ, X_DK, X_DV, X_DS, N_SCRATCH };

static float *fdata(const pr_tensor *t)
{
    return (float *)t->data;
}

static int ld(const pr_tensor *t)
{
    return (int)t->stride[0];
}

/* W_V = I + 1e-6 off the diagonal; W_Q and W_K come from their decls. */
static int fusion_init(const pr_ctx *c)
{
    const pr_tensor *v = c->params[P_VALUE];
    int64_t d = v->shape[0];
    float *w = fdata(v);
    for (int64_t i = 0; i < d; i++)
        for (int64_t j = 0; j < d; j++)
            w[i * d + j] = i == j ? 1.0f : 1e-6f;
    return 0;
}

/* saved: q (rows, d); key_i, v_i (n rows-blocks of (rows, d)); a (rows, n). */
static int fusion_forward(const pr_ctx *c)
{
    const pr_host *host = c->host;
    int rows = c->rows, d = c->dims->d_out, n = (int)c->n_members;
    if (n < 1 || !c->site_y || !c->members)
        return host->error(c, "adapter_fusion: called without members (attach it with pr_module_compose)");
    const float *wq = fdata(c->params[P_QUERY]), *wk = fdata(c->params[P_KEY]), *wv = fdata(c->params[P_VALUE]);
    float *q = fdata(c->saved[S_Q]), *k = fdata(c->saved[S_K]), *v = fdata(c->saved[S_V]), *a = fdata(c->saved[S_A]);
    size_t rd = (size_t)rows * d;
    for (int i = 0; i < n; i++) {
        const pr_tensor *h = c->members[i];
        host->gemm(0, 0, rows, d, d, 1.0f, fdata(h), ld(h), wk, d, 0.0f, k + (size_t)i * rd, d);
        host->gemm(0, 0, rows, d, d, 1.0f, fdata(h), ld(h), wv, d, 0.0f, v + (size_t)i * rd, d);
    }
    host->gemm(0, 0, rows, d, d, 1.0f, fdata(c->site_y), ld(c->site_y), wq, d, 0.0f, q, d);
    for (int r = 0; r < rows; r++) {
        float *ar = a + (size_t)r * n;
        const float *qr = q + (size_t)r * d;
        for (int i = 0; i < n; i++) {
            const float *kr = k + (size_t)i * rd + (size_t)r * d;
            double sc = 0.0;
            for (int j = 0; j < d; j++)
                sc += (double)qr[j] * kr[j];
            ar[i] = (float)sc;
        }
    }
    host->softmax_rows(a, rows, n);
    float *out = fdata(c->out);
    int lo = ld(c->out);
    for (int r = 0; r < rows; r++) {
        float *o = out + (size_t)r * lo;
        for (int i = 0; i < n; i++) {
            const float *vr = v + (size_t)i * rd + (size_t)r * d;
            float ai = a[(size_t)r * n + i];
            for (int j = 0; j < d; j++)
                o[j] += ai * vr[j];
        }
    }
    return 0;
}

/* dh the gradient of h (d_out):
 *   dA_i = dh . v_i;  dS = A * (dA - sum_j A_j dA_j)      (softmax)
 *   dq = sum_i dS_i key_i;  dkey_i = dS_i q;  dv_i = A_i dh
 *   dW_Q += y^T dq;  dW_K += sum_i h_i^T dkey_i;  dW_V += sum_i h_i^T dv_i
 *   d_site_y += dq W_Q^T;  d_members[i] += dkey_i W_K^T + dv_i W_V^T */
static int fusion_backward(const pr_ctx *c)
{
    const pr_host *host = c->host;
    int rows = c->rows, d = c->dims->d_out, n = (int)c->n_members;
    if (n < 1 || !c->site_y || !c->members || !c->d_members || !c->d_site_y)
        return host->error(c, "adapter_fusion: called without members (attach it with pr_module_compose)");
    const float *wq = fdata(c->params[P_QUERY]), *wk = fdata(c->params[P_KEY]), *wv = fdata(c->params[P_VALUE]);
    float *gq = fdata(c->grads[P_QUERY]), *gk = fdata(c->grads[P_KEY]), *gv = fdata(c->grads[P_VALUE]);
    const float *q = fdata(c->saved[S_Q]), *k = fdata(c->saved[S_K]), *v = fdata(c->saved[S_V]);
    const float *a = fdata(c->saved[S_A]);
    float *dq = fdata(c->scratch[X_DQ]), *dk = fdata(c->scratch[X_DK]), *dv = fdata(c->scratch[X_DV]);
    float *ds = fdata(c->scratch[X_DS]);
    const float *dy = fdata(c->d_out), *y = fdata(c->site_y);
    int ldy = ld(c->d_out);
    size_t rd = (size_t)rows * d;
    /* the softmax */
    for (int r = 0; r < rows; r++) {
        const float *dyr = dy + (size_t)r * ldy, *ar = a + (size_t)r * n;
        float *sr = ds + (size_t)r * n;
        double m = 0.0;
        for (int i = 0; i < n; i++) {
            const float *vr = v + (size_t)i * rd + (size_t)r * d;
            double da = 0.0;
            for (int j = 0; j < d; j++)
                da += (double)dyr[j] * vr[j];
            sr[i] = (float)da;
            m += ar[i] * da;
        }
        for (int i = 0; i < n; i++)
            sr[i] = ar[i] * (float)(sr[i] - m);
    }
    /* the query path */
    memset(dq, 0, rd * sizeof(float));
    for (int r = 0; r < rows; r++)
        for (int i = 0; i < n; i++) {
            const float *kr = k + (size_t)i * rd + (size_t)r * d;
            float *dqr = dq + (size_t)r * d, s = ds[(size_t)r * n + i];
            for (int j = 0; j < d; j++)
                dqr[j] += s * kr[j];
        }
    if (gq)
        host->gemm(1, 0, d, d, rows, 1.0f, y, ld(c->site_y), dq, d, 1.0f, gq, d);
    host->gemm(0, 1, rows, d, d, 1.0f, dq, d, wq, d, 1.0f, fdata(c->d_site_y), ld(c->d_site_y));
    /* keys, values and the members' contributions */
    for (int i = 0; i < n; i++) {
        const pr_tensor *h = c->members[i], *dh = c->d_members[i];
        for (int r = 0; r < rows; r++) {
            float sv = ds[(size_t)r * n + i], av = a[(size_t)r * n + i];
            const float *qr = q + (size_t)r * d, *dyr = dy + (size_t)r * ldy;
            float *dkr = dk + (size_t)r * d, *dvr = dv + (size_t)r * d;
            for (int j = 0; j < d; j++) {
                dkr[j] = sv * qr[j];
                dvr[j] = av * dyr[j];
            }
        }
        if (gk)
            host->gemm(1, 0, d, d, rows, 1.0f, fdata(h), ld(h), dk, d, 1.0f, gk, d);
        if (gv)
            host->gemm(1, 0, d, d, rows, 1.0f, fdata(h), ld(h), dv, d, 1.0f, gv, d);
        host->gemm(0, 1, rows, d, d, 1.0f, dk, d, wk, d, 1.0f, fdata(dh), ld(dh));
        host->gemm(0, 1, rows, d, d, 1.0f, dv, d, wv, d, 1.0f, fdata(dh), ld(dh));
    }
    return 0;
}

static const pr_param_decl fusion_params[N_PARAMS] = {
    [P_QUERY] = { .struct_size = sizeof(pr_param_decl), .name = "query", .shape = "d_out, d_out",
                  .init = PR_INIT_NORMAL, .init_arg = "0.02", .scope = PR_SCOPE_INSERTION,
                  .help = "W_Q: query = y W_Q, y the site output" },
    [P_KEY] = { .struct_size = sizeof(pr_param_decl), .name = "key", .shape = "d_out, d_out",
                .init = PR_INIT_NORMAL, .init_arg = "0.02", .scope = PR_SCOPE_INSERTION,
                .help = "W_K: key_i = h_i W_K, h_i a member's contribution" },
    [P_VALUE] = { .struct_size = sizeof(pr_param_decl), .name = "value", .shape = "d_out, d_out",
                  .init = PR_INIT_CUSTOM, .scope = PR_SCOPE_INSERTION,
                  .help = "W_V: value_i = h_i W_V; identity plus 1e-6 off the diagonal" },
};

static const pr_buffer_decl fusion_saved[N_SAVED] = {
    [S_Q] = { sizeof(pr_buffer_decl), "q", "rows, d_out" },
    [S_K] = { sizeof(pr_buffer_decl), "keys", "n_members * rows, d_out" },
    [S_V] = { sizeof(pr_buffer_decl), "values", "n_members * rows, d_out" },
    [S_A] = { sizeof(pr_buffer_decl), "attention", "rows, n_members" },
};

static const pr_buffer_decl fusion_scratch[N_SCRATCH] = {
    [X_DQ] = { sizeof(pr_buffer_decl), "d_q", "rows, d_out" },
    [X_DK] = { sizeof(pr_buffer_decl), "d_key", "rows, d_out" },
    [X_DV] = { sizeof(pr_buffer_decl), "d_value", "rows, d_out" },
    [X_DS] = { sizeof(pr_buffer_decl), "d_scores", "rows, n_members" },
};

static const pr_technique fusion_technique = {
    .struct_size = sizeof(pr_technique),
    .abi_major = PR_ABI_MAJOR,
    .name = "adapter_fusion",
    .version = "1.0.0",
    .summary = "AdapterFusion: attention over the contributions of frozen modules at one site, the query "
               "from the site output; a composite (attach it over its members with pr_module_compose, or a "
               "pipeline's fuse: entry)",
    .citation = "Pfeiffer, Kamath, Rueckle, Cho, Gurevych (2021). AdapterFusion: Non-Destructive Task "
                "Composition for Transfer Learning. arXiv:2005.00247",
    .license = "MIT",
    .intra = PR_INTRA_ATTENTION,
    .inter = PR_INTER_DYNAMIC,
    .adaptation = PR_ADAPT_ADDITION,
    .sharing = PR_SHARE_NONE,
    .input = PR_INPUT_HIDDEN,
    /* its query reads the site output y: after the layer, like the adapters it combines */
    .insertion = PR_INSERT_SEQUENTIAL,
    .insertions = PR_INSERTIONS_PER_SITE_LAYER,
    .integration = PR_INTEGRATE_DIRECT_ADD,
    .workspace = PR_WS_ATTENTION | PR_WS_FFN,
    .sites = (1u << PR_SITE_COUNT) - 1,
    .default_sites = PR_SITE_BIT(PR_SITE_FFN_OUT),
    .params = fusion_params,
    .n_params = N_PARAMS,
    .saved = fusion_saved,
    .n_saved = N_SAVED,
    .scratch = fusion_scratch,
    .n_scratch = N_SCRATCH,
    .param_formula = "3 * d_out^2 per insertion (W_Q, W_K, W_V), at the sites and layers of its members",
    .init = fusion_init,
    .composite = 1,
    .compose_forward = fusion_forward,
    .compose_backward = fusion_backward,
};

static const pr_technique *const fusion_techniques[] = { &fusion_technique };

static const pr_plugin fusion_plugin = {
    .struct_size = sizeof(pr_plugin),
    .abi_major = PR_ABI_MAJOR,
    .name = "adapter_fusion",
    .version = "1.0.0",
    .n_techniques = 1,
    .techniques = fusion_techniques,
};

PR_PLUGIN_EXPORT const pr_plugin *peftref_plugin_entry(const pr_entry_args *args)
{
    (void)args; /* a built-in plugin needs none of the host's entry arguments */
    return &fusion_plugin;
}
