/* peftref core: concatenation providers, the positions a module prepends.
 *
 * At embed a provider prepends virtual positions to every sequence
 * (prompt tuning, Lester et al. 2021); at attn.k / attn.v it prepends key
 * and value rows that every query attends to (prefix tuning, Li & Liang
 * 2021): layer l's attention is then (B,H,T,P+T).  Values are shared by
 * the batch; their gradients arrive summed over it. */
#include <stdlib.h>
#include <string.h>

#include "family.h"

static concat_list *site_concat(const pr_model *m, int site, int layer)
{
    return &m->concat[(size_t)(layer + 1) * PR_SITE_COUNT + (size_t)site];
}

int pr_model_virtual_positions(const pr_model *m)
{
    return m ? site_concat(m, PR_SITE_EMBED, -1)->total : 0;
}

/* Prefix columns layer l's attention must hold room for (its k and v
 * providers must agree; forward checks). */
int model_prefix_room(const pr_model *m, int l)
{
    int nk = site_concat(m, PR_SITE_ATTN_K, l)->total, nv = site_concat(m, PR_SITE_ATTN_V, l)->total;
    return nk > nv ? nk : nv;
}

int model_max_prefix_room(const pr_model *m)
{
    int p = 0;
    for (int l = 0; l < m->cfg.n_layers; l++)
        if (model_prefix_room(m, l) > p)
            p = model_prefix_room(m, l);
    return p;
}

int model_position_offset(const pr_model *m)
{
    return model_max_prefix_room(m);
}

int model_check_prefixes(const pr_model *m, pr_error *err)
{
    for (int l = 0; l < m->cfg.n_layers; l++) {
        int nk = site_concat(m, PR_SITE_ATTN_K, l)->total, nvl = site_concat(m, PR_SITE_ATTN_V, l)->total;
        if (nk != nvl)
            return pr_errorf(err, PR_ERR_INVALID, "forward: layer %d prepends %d prefix keys (attn.k) but %d prefix "
                             "values (attn.v); its key and value providers must agree", l, nk, nvl);
    }
    return PR_OK;
}

int pr_model_attach_concat(pr_model *m, int site, int layer, const pr_concat_provider *p, pr_error *err)
{
    if (!m || !p || !p->forward)
        return pr_errorf(err, PR_ERR_INVALID, "attach_concat: NULL model, provider or provider forward");
    if (site != PR_SITE_EMBED && site != PR_SITE_ATTN_K && site != PR_SITE_ATTN_V)
        return pr_errorf(err, PR_ERR_UNSUPPORTED,
                         "attach_concat: site '%s' takes no concatenation (only embed, attn.k and attn.v)",
                         pr_site_name(site));
    int rc = model_check_site_layer(m, site, layer, "attach_concat", err);
    pr_model_decode_end(m);
    if (rc)
        return rc;
    if (p->n <= 0)
        return pr_errorf(err, PR_ERR_INVALID, "attach_concat: a provider at site '%s' must prepend n > 0 "
                         "positions (got %d)", pr_site_name(site), p->n);
    concat_list *cl = site_concat(m, site, layer);
    int nv = pr_model_virtual_positions(m) + (site == PR_SITE_EMBED ? p->n : 0);
    if (site == PR_SITE_EMBED) {
        if (nv >= m->cfg.max_seq)
            return pr_errorf(err, PR_ERR_INVALID, "attach_concat: %d virtual positions leave no room for "
                             "tokens in max_seq=%d", nv, m->cfg.max_seq);
        if (m->act_block && m->resT + nv > m->cfg.max_seq)
            return pr_errorf(err, PR_ERR_INVALID, "attach_concat: %d virtual positions plus the reserved "
                             "T=%d exceed max_seq=%d", nv, m->resT, m->cfg.max_seq);
    }
    if (cl->n == cl->cap) {
        int cap = cl->cap ? 2 * cl->cap : 4;
        pr_concat_provider *np = realloc(cl->p, (size_t)cap * sizeof *np);
        if (!np)
            return pr_errorf(err, PR_ERR_NOMEM, "attach_concat: out of memory");
        cl->p = np;
        cl->cap = cap;
    }
    cl->p[cl->n++] = *p;
    cl->total += p->n;
    m->have_fwd = 0;
    if (!m->act_block)
        return PR_OK;
    /* more positions, or more prefix columns: plan again; virtual
     * positions change what the hooks see, so they plan again too */
    int Ti = site == PR_SITE_EMBED ? m->resT + nv : m->resTi;
    rc = model_plan_activations(m, m->resB, m->resT, Ti, err);
    if (!rc && site == PR_SITE_EMBED)
        rc = model_reserve_all_hooks(m, err);
    if (rc) {
        cl->n--;
        cl->total -= p->n;
    }
    return rc;
}

/* out (total, width): each provider fills its n rows, in attach order. */
int model_concat_forward(const pr_model *m, int site, int layer, float *out, int width, pr_error *err)
{
    const concat_list *cl = site_concat(m, site, layer);
    size_t off = 0;
    for (int i = 0; i < cl->n; i++) {
        if (err) err->msg[0] = '\0';
        int rc = cl->p[i].forward(cl->p[i].self, site, layer, out + off * (size_t)width, err);
        if (rc)
            return model_site_failed(rc, "concat provider forward", site, layer, err);
        off += (size_t)cl->p[i].n;
    }
    return PR_OK;
}

/* dout (total, width), summed over the batch; reverse attach order.  A
 * provider without backward has nothing to train. */
int model_concat_backward(const pr_model *m, int site, int layer, const float *dout, int width, pr_error *err)
{
    const concat_list *cl = site_concat(m, site, layer);
    size_t off = (size_t)cl->total;
    for (int i = cl->n - 1; i >= 0; i--) {
        off -= (size_t)cl->p[i].n;
        if (!cl->p[i].backward)
            continue;
        if (err) err->msg[0] = '\0';
        int rc = cl->p[i].backward(cl->p[i].self, site, layer, dout + off * (size_t)width, err);
        if (rc)
            return model_site_failed(rc, "concat provider backward", site, layer, err);
    }
    return PR_OK;
}

/* rows (P, Hkv*hd) -> heads (Hkv, P, hd), the attention kernel's prefix layout */
static void rows_to_heads(float *heads, const float *rows, int P, int Hkv, int hd)
{
    for (int p = 0; p < P; p++)
        for (int g = 0; g < Hkv; g++)
            memcpy(heads + ((size_t)g * P + p) * hd, rows + ((size_t)p * Hkv + g) * hd, (size_t)hd * sizeof(float));
}

/* heads (Hkv, P, hd) -> rows (P, Hkv*hd) */
static void heads_to_rows(float *rows, const float *heads, int P, int Hkv, int hd)
{
    for (int p = 0; p < P; p++)
        for (int g = 0; g < Hkv; g++)
            memcpy(rows + ((size_t)p * Hkv + g) * hd, heads + ((size_t)g * P + p) * hd, (size_t)hd * sizeof(float));
}

/* Prefix keys and values of layer l into lf[l].pk, .pv, and their count P. */
int model_prefix_forward(pr_model *m, int l, pr_error *err)
{
    const pr_model_config *c = &m->cfg;
    layer_frame *a = &m->lf[l];
    int Hkv = c->n_kv_heads, hd = c->d_head, KV = Hkv * hd;
    int n = site_concat(m, PR_SITE_ATTN_K, l)->total, rc;
    a->P = n;
    if (n == 0)
        return PR_OK;
    if ((rc = model_concat_forward(m, PR_SITE_ATTN_K, l, m->prow, KV, err)))
        return rc;
    rows_to_heads(a->pk, m->prow, n, Hkv, hd);
    if ((rc = model_concat_forward(m, PR_SITE_ATTN_V, l, m->prow, KV, err)))
        return rc;
    rows_to_heads(a->pv, m->prow, n, Hkv, hd);
    return PR_OK;
}

/* m->dpk, m->dpv (Hkv,P,hd) hold the prefix gradients of layer l. */
int model_prefix_backward(pr_model *m, int l, pr_error *err)
{
    const pr_model_config *c = &m->cfg;
    int Hkv = c->n_kv_heads, hd = c->d_head, KV = Hkv * hd, P = m->lf[l].P, rc;
    if (P == 0)
        return PR_OK;
    heads_to_rows(m->prow, m->dpv, P, Hkv, hd);
    if ((rc = model_concat_backward(m, PR_SITE_ATTN_V, l, m->prow, KV, err)))
        return rc;
    heads_to_rows(m->prow, m->dpk, P, Hkv, hd);
    return model_concat_backward(m, PR_SITE_ATTN_K, l, m->prow, KV, err);
}

