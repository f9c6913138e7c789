/* peftref core: concatenation providers: the rows a module prepends at embed
 * (virtual positions) or at attn.k / attn.v (prefix keys and values). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "module_internal.h"
#include "host.h"

/* ---- concatenation providers --------------------------------------------------------------------- */

/* Gated: the technique fills P (kept), the model gets s*P. */
int mod_concat_forward(void *self, int site, int layer, float *out, pr_error *err)
{
    (void)site;
    (void)layer;
    insertion *in = self;
    pr_module *mod = in->mod;
    float *a, *b;
    int rc = mod_prepare_views(in, 1, in->n_virtual, &a, &b, err);
    if (rc)
        return rc;
    pr_ctx c;
    mod_ctx_init(in, &c, 1, in->n_virtual, pr_model_get_training(mod->model), mod_forward_call(in));
    size_t n = (size_t)in->n_virtual * (size_t)in->w_out;
    CT(&c, out) = mod_view2(mod->gated ? in->h_keep : out, in->n_virtual, in->w_out, in->w_out);
    if ((rc = mod_call(mod, in, mod->t.forward, "forward", &c, err)) || !mod->gated)
        return rc;
    float s = mod_gate_value(in);
    for (size_t i = 0; i < n; i++)
        out[i] = s * in->h_keep[i];
    return PR_OK;
}

/* Gated: dg += s(1-s) sum(dout * P); the technique gets s*dout. */
int mod_concat_backward(void *self, int site, int layer, const float *dout, pr_error *err)
{
    (void)site;
    (void)layer;
    insertion *in = self;
    pr_module *mod = in->mod;
    float *a, *b;
    int rc = mod_prepare_views(in, 1, in->n_virtual, &a, &b, err);
    if (rc)
        return rc;
    pr_ctx c;
    mod_ctx_init(in, &c, 1, in->n_virtual, pr_model_get_training(mod->model), in->n_fwd ? in->n_fwd - 1 : 0);
    if (mod->gated) {
        size_t n = (size_t)in->n_virtual * (size_t)in->w_out;
        float s = mod_gate_value(in), *dg = mod_gate_grad(in);
        double acc = 0.0;
        for (size_t i = 0; i < n; i++) {
            acc += (double)dout[i] * in->h_keep[i];
            a[i] = s * dout[i];
        }
        if (dg)
            *dg += (float)(acc * s * (1.0 - s));
        dout = a;
        CT(&c, out) = mod_view2(in->h_keep, in->n_virtual, in->w_out, in->w_out);
    }
    CT(&c, d_out) = mod_view2(dout, in->n_virtual, in->w_out, in->w_out);
    return mod_call(mod, in, mod->t.backward, "backward", &c, err);
}

/* the rows (1 x n_virtual, w_out) in area A; kept when gated */
void mod_concat_reserve(const insertion *in, size_t rows, form_need *need)
{
    need->area_a = mod_round_up(rows * (size_t)in->w_out);
    need->y_old = 0;
    need->keep = in->mod->gated ? mod_round_up(rows * (size_t)in->w_out) : 0;
}

/* A provider's rows do not depend on the batch: reserved once, here
 * (a no-op when they are already). */
int mod_concat_install(insertion *in, pr_error *err)
{
    int rc = mod_reserve_insertion(in, 1, in->n_virtual, err);
    if (rc)
        return rc;
    pr_concat_provider p = { in->n_virtual, mod_concat_forward, mod_concat_backward, in };
    return pr_model_attach_concat(in->mod->model, in->site, in->layer, &p, err);
}
