/* peftref core: the sites of a model and the hooks attached there.
 *
 * At one site instance (site, layer) the hooks run forward in attach
 * order and backward in reverse (peftref/model.h).  Three kinds of site
 * run them differently: a projection site changes the projection's output
 * in place; a stream site (embed, attn.k, attn.v, ffn.act, block_out)
 * passes the state through unless hooks are attached, when its output
 * gets a buffer of its own; a sub-layer site (attn_out, ffn_out) sees the
 * sub-layer's input as x and its output before the residual add as y.
 * A family's block calls these at its sites; the frame calls them at
 * embed and block_out. */
#include <stdlib.h>
#include <string.h>

#include "family.h"

static hook_list *site_hooks(const pr_model *m, int site, int layer)
{
    return &m->hooks[(size_t)(layer + 1) * PR_SITE_COUNT + (size_t)site];
}

int model_has_hooks(const pr_model *m, int site, int layer)
{
    return site_hooks(m, site, layer)->n > 0;
}

int model_any_layer_has_hooks(const pr_model *m, int site)
{
    for (int l = 0; l < m->cfg.n_layers; l++)
        if (model_has_hooks(m, site, l))
            return 1;
    return 0;
}

int pr_model_site_dims(const pr_model *m, int site, int *d_in, int *d_out)
{
    int din = -1, dout = -1;
    if (m) {
        const pr_model_config *c = &m->cfg;
        int C = c->d_model, F = c->d_ff;
        int Q = c->n_heads * c->d_head, KV = c->n_kv_heads * c->d_head;
        switch (site) {
        case PR_SITE_EMBED: din = dout = C; break;
        case PR_SITE_QKV:
            if (c->fused_qkv) { din = C; dout = Q + 2 * KV; }
            break;
        case PR_SITE_Q: din = C; dout = Q; break;
        case PR_SITE_K:
        case PR_SITE_V: din = C; dout = KV; break;
        case PR_SITE_O: din = Q; dout = C; break;
        case PR_SITE_ATTN_K:
        case PR_SITE_ATTN_V: din = dout = KV; break;
        case PR_SITE_ATTN_OUT: din = dout = C; break;
        case PR_SITE_FFN_UP: din = C; dout = F; break;
        case PR_SITE_FFN_GATE:
            if (c->act == PR_ACT_SWIGLU) { din = C; dout = F; }
            break;
        case PR_SITE_FFN_ACT: din = dout = F; break;
        case PR_SITE_FFN_DOWN: din = F; dout = C; break;
        case PR_SITE_FFN_OUT:
        case PR_SITE_BLOCK_OUT: din = dout = C; break;
        default: break;
        }
    }
    if (d_in) *d_in = din;
    if (d_out) *d_out = dout;
    return din < 0 ? -1 : 0;
}

/* Prefix a callback's message with what failed and where. */
int model_site_failed(int rc, const char *what, int site, int layer, pr_error *err)
{
    if (rc == PR_OK)
        rc = PR_ERR_INVALID;
    if (err) {
        char inner[PR_ERROR_MSG_MAX];
        memcpy(inner, err->msg, sizeof inner);
        inner[sizeof inner - 1] = '\0';
        pr_errorf(err, rc, "%s at site '%s' layer %d: %s", what, pr_site_name(site), layer, inner);
    }
    return rc;
}

/* The site exists in this model and layer fits it. */
int model_check_site_layer(const pr_model *m, int site, int layer, const char *fn, pr_error *err)
{
    if (site < 0 || site >= PR_SITE_COUNT)
        return pr_errorf(err, PR_ERR_INVALID, "%s: site %d out of range", fn, site);
    if (pr_model_site_dims(m, site, NULL, NULL) != 0)
        return pr_errorf(err, PR_ERR_UNSUPPORTED, "%s: site '%s' does not exist in %s models", fn,
                         pr_site_name(site), m->ops->name);
    if (pr_site_is_per_layer(site)) {
        if (layer < 0 || layer >= m->cfg.n_layers)
            return pr_errorf(err, PR_ERR_INVALID, "%s: layer %d out of range [0, %d) for site '%s'", fn,
                             layer, m->cfg.n_layers, pr_site_name(site));
    } else if (layer != -1) {
        return pr_errorf(err, PR_ERR_INVALID, "%s: site '%s' is model-level; layer must be -1 (got %d)", fn,
                         pr_site_name(site), layer);
    }
    return PR_OK;
}

/* A hook plans for the planned capacity: resB sequences of resTi
 * internal positions (virtual ones included). */
static int reserve_hook(const pr_model *m, const pr_site_hook *h, int site, int layer, pr_error *err)
{
    if (!h->reserve)
        return PR_OK;
    if (err) err->msg[0] = '\0';
    int rc = h->reserve(h->self, m->resB, m->resTi, err);
    return rc ? model_site_failed(rc, "hook reserve", site, layer, err) : PR_OK;
}

int model_reserve_all_hooks(const pr_model *m, pr_error *err)
{
    for (int layer = -1; layer < m->cfg.n_layers; layer++)
        for (int site = 0; site < PR_SITE_COUNT; site++) {
            const hook_list *hl = site_hooks(m, site, layer);
            for (int i = 0; i < hl->n; i++) {
                int rc = reserve_hook(m, &hl->h[i], site, layer, err);
                if (rc)
                    return rc;
            }
        }
    return PR_OK;
}

int pr_model_attach_hook(pr_model *m, int site, int layer, const pr_site_hook *hook, pr_error *err)
{
    if (!m || !hook || !hook->forward)
        return pr_errorf(err, PR_ERR_INVALID, "attach_hook: NULL model, hook or hook forward");
    int rc = model_check_site_layer(m, site, layer, "attach_hook", err);
    if (rc)
        return rc;
    hook_list *hl = site_hooks(m, site, layer);
    if (hl->n == hl->cap) {
        int cap = hl->cap ? 2 * hl->cap : 4;
        pr_site_hook *nh = realloc(hl->h, (size_t)cap * sizeof *nh);
        if (!nh)
            return pr_errorf(err, PR_ERR_NOMEM, "attach_hook: out of memory");
        hl->h = nh;
        hl->cap = cap;
    }
    hl->h[hl->n++] = *hook;
    m->have_fwd = 0;
    pr_model_decode_end(m); /* cached keys and values no longer hold */
    if (!m->act_block)
        return PR_OK;
    /* the first hook at a stream site needs its own output buffer */
    if (hl->n == 1 && !pr_site_is_projection(site))
        rc = model_plan_activations(m, m->resB, m->resT, m->resTi, err);
    if (!rc)
        rc = reserve_hook(m, hook, site, layer, err);
    if (rc)
        hl->n--;
    return rc;
}

void pr_model_detach_hooks(pr_model *m)
{
    if (!m)
        return;
    for (int i = 0; i < (m->cfg.n_layers + 1) * PR_SITE_COUNT; i++) {
        m->hooks[i].n = 0;
        m->concat[i].n = 0;
        m->concat[i].total = 0;
    }
    m->have_fwd = 0;
    pr_model_decode_end(m);
}

/* The frame checks the site; the family says where its weight lives. */
int model_site_weight_view(pr_model *m, int site, int layer, model_weight_view *v, pr_error *err)
{
    if (!m || !v)
        return pr_errorf(err, PR_ERR_INVALID, "site_weight: NULL model or output");
    int rc = model_check_site_layer(m, site, layer, "site_weight", err);
    if (rc)
        return rc;
    if (!pr_site_is_projection(site) && site != PR_SITE_ATTN_K && site != PR_SITE_ATTN_V &&
        site != PR_SITE_FFN_ACT)
        return pr_errorf(err, PR_ERR_INVALID, "site_weight: site '%s' is a stream site; it has no weight",
                         pr_site_name(site));
    memset(v, 0, sizeof *v);
    if ((rc = m->ops->site_weight(m, site, layer, v, err)))
        return rc;
    const uint16_t *w16 = model_tensor_bf16(m, v->tensor);
    if (w16 && !v->w)
        v->w16 = w16 + v->off;
    return PR_OK;
}

/* The public view is [d_in, d_out]; a family storing [d_out, d_in] is
 * read through model_site_weight_view. */
int pr_model_site_weight(pr_model *m, int site, int layer, float **w, int *ld, float **b, pr_error *err)
{
    if (!m || !w || !ld)
        return pr_errorf(err, PR_ERR_INVALID, "site_weight: NULL model or output");
    model_weight_view v;
    int rc = model_site_weight_view(m, site, layer, &v, err);
    if (rc)
        return rc;
    if (v.layout != PR_WEIGHT_IN_OUT)
        return pr_errorf(err, PR_ERR_UNSUPPORTED, "site_weight: %s stores the weight at site '%s' as [d_out, "
                         "d_in]; it has no [d_in, d_out] view", m->ops->name, pr_site_name(site));
    if (!v.w)
        return pr_errorf(err, PR_ERR_UNSUPPORTED, "site_weight: tensor '%s' at site '%s' is stored in bf16 "
                         "(precision bf16); it has no f32 view", v.tensor ? v.tensor->name : "?", pr_site_name(site));
    *w = v.w;
    *ld = v.ld;
    if (b)
        *b = v.b;
    return PR_OK;
}

/* ---- small row helpers --------------------------------------------------- */


void model_copy_rows(float *dst, int ldd, const float *src, int lds, int rows, int cols)
{
    for (int r = 0; r < rows; r++)
        memcpy(dst + (size_t)r * ldd, src + (size_t)r * lds, (size_t)cols * sizeof(float));
}

void model_add_rows(float *dst, int ldd, const float *src, int lds, int rows, int cols)
{
    for (int r = 0; r < rows; r++) {
        float *d = dst + (size_t)r * ldd;
        const float *s = src + (size_t)r * lds;
        for (int j = 0; j < cols; j++)
            d[j] += s[j];
    }
}

/* ---- running hooks ------------------------------------------------------- */

static pr_site_io site_io(const pr_model *m, int site, int layer, const float *x, int x_dim, int x_ld,
                          float *y, int y_dim, int y_ld, float *dx, float *dy)
{
    pr_site_io io;
    io.site = site;
    io.layer = layer;
    io.B = m->B;
    io.T = m->T;
    io.rows = m->B * m->T;
    io.x = x;
    io.x_dim = x_dim;
    io.x_ld = x_ld;
    io.y = y;
    io.y_dim = y_dim;
    io.y_ld = y_ld;
    io.dx = dx;
    io.dy = dy;
    io.training = m->training;
    return io;
}

static int hooks_forward(const pr_model *m, const pr_site_io *io, pr_error *err)
{
    const hook_list *hl = site_hooks(m, io->site, io->layer);
    for (int i = 0; i < hl->n; i++) {
        if (err) err->msg[0] = '\0';
        int rc = hl->h[i].forward(hl->h[i].self, io, err);
        if (rc)
            return model_site_failed(rc, "hook forward", io->site, io->layer, err);
    }
    return PR_OK;
}

static int hooks_backward(const pr_model *m, const pr_site_io *io, pr_error *err)
{
    const hook_list *hl = site_hooks(m, io->site, io->layer);
    for (int i = hl->n - 1; i >= 0; i--) {
        if (err) err->msg[0] = '\0';
        if (!hl->h[i].backward) {
            pr_errorf(err, PR_ERR_UNSUPPORTED, "the hook has no backward");
            return model_site_failed(PR_ERR_UNSUPPORTED, "hook backward", io->site, io->layer, err);
        }
        int rc = hl->h[i].backward(hl->h[i].self, io, err);
        if (rc)
            return model_site_failed(rc, "hook backward", io->site, io->layer, err);
    }
    return PR_OK;
}

/* Projection site: y (rows, y_dim; y_ld) was just computed from x. */
int model_proj_forward(pr_model *m, int site, int layer, const float *x, int x_dim,
                        float *y, int y_dim, int y_ld, pr_error *err)
{
    if (!model_has_hooks(m, site, layer))
        return PR_OK;
    pr_site_io io = site_io(m, site, layer, x, x_dim, x_dim, y, y_dim, y_ld, NULL, NULL);
    return hooks_forward(m, &io, err);
}

int model_proj_backward(pr_model *m, int site, int layer, const float *x, int x_dim, float *dx,
                         float *y, int y_dim, int y_ld, float *dy, pr_error *err)
{
    if (!model_has_hooks(m, site, layer))
        return PR_OK;
    pr_site_io io = site_io(m, site, layer, x, x_dim, x_dim, y, y_dim, y_ld, dx, dy);
    return hooks_backward(m, &io, err);
}

/* Stream site.  Without hooks the state passes through (*out = x).  With
 * hooks, ybuf (rows, dim) receives a copy of x that the hooks change, so x
 * keeps the values that entered the site. */
int model_stream_forward(pr_model *m, int site, int layer, const float *x, int x_ld, float *ybuf,
                          int dim, const float **out, int *out_ld, pr_error *err)
{
    *out = x;
    if (out_ld) *out_ld = x_ld;
    if (!model_has_hooks(m, site, layer))
        return PR_OK;
    if (!ybuf)
        return pr_errorf(err, PR_ERR_INVALID, "forward: no buffer planned for site '%s' layer %d",
                         pr_site_name(site), layer);
    int rows = m->B * m->T;
    model_copy_rows(ybuf, dim, x, x_ld, rows, dim);
    pr_site_io io = site_io(m, site, layer, x, dim, x_ld, ybuf, dim, dim, NULL, NULL);
    int rc = hooks_forward(m, &io, err);
    *out = ybuf;
    if (out_ld) *out_ld = dim;
    return rc;
}

/* Stream site backward: dy (rows, dim) is the gradient of the state
 * leaving, dx (rows, dim; x_ld) that of the state entering.  After the
 * hooks, the identity path y0 = x adds what remains in dy to dx. */
int model_stream_backward(pr_model *m, int site, int layer, const float *x, int x_ld, float *dx,
                           float *y, float *dy, int dim, pr_error *err)
{
    pr_site_io io = site_io(m, site, layer, x, dim, x_ld, y, dim, dim, dx, dy);
    int rc = hooks_backward(m, &io, err);
    if (rc)
        return rc;
    model_add_rows(dx, x_ld, dy, dim, m->B * m->T, dim);
    return PR_OK;
}

/* Sub-layer site (attn_out, ffn_out; peftref/site.h): y0 (rows, dim) is
 * the sub-layer's output before the residual add and x (rows, dim) the
 * sub-layer's input, the normalised state entering attention or the FFN.
 * Without hooks *out = y0.  With hooks, ybuf receives a copy of y0 that
 * the hooks change, and they see x as the site input. */
int model_sublayer_forward(pr_model *m, int site, int layer, const float *x, const float *y0, float *ybuf,
                            int dim, const float **out, pr_error *err)
{
    *out = y0;
    if (!model_has_hooks(m, site, layer))
        return PR_OK;
    if (!ybuf)
        return pr_errorf(err, PR_ERR_INVALID, "forward: no buffer planned for site '%s' layer %d",
                         pr_site_name(site), layer);
    model_copy_rows(ybuf, dim, y0, dim, m->B * m->T, dim);
    pr_site_io io = site_io(m, site, layer, x, dim, dim, ybuf, dim, dim, NULL, NULL);
    int rc = hooks_forward(m, &io, err);
    *out = ybuf;
    return rc;
}

/* Sub-layer site backward: dy (rows, dim) is the gradient of the output
 * leaving the site (the hooks may change it); dx (rows, dim) accumulates
 * the gradient of the sub-layer input x; dy0 (rows, dim) receives what
 * remains in dy, the gradient of y0 through the identity path. */
int model_sublayer_backward(pr_model *m, int site, int layer, const float *x, float *dx, float *y, float *dy,
                             float *dy0, int dim, pr_error *err)
{
    pr_site_io io = site_io(m, site, layer, x, dim, dim, y, dim, dim, dx, dy);
    int rc = hooks_backward(m, &io, err);
    if (rc)
        return rc;
    model_copy_rows(dy0, dim, dy, dim, m->B * m->T, dim);
    return PR_OK;
}
