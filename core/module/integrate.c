/* peftref core: the integration forms a site hook implements (see
 * module_internal.h): forward and backward of direct, scaled and gated
 * addition, rescaling, weight delta and custom integration. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "module_internal.h"
#include "host.h"

/* ---- integration forms ------------------------------------------------------------------------- */

/* k of y += k*h: the scale (SCALED_ADD) or 1, times the gate. */
float mod_add_coefficient(const insertion *in)
{
    float k = in->mod->t.integration == PR_INTEGRATE_SCALED_ADD ? in->scale : 1.0f;
    return k * mod_gate_value(in);
}

int mod_hook_forward(void *self, const pr_site_io *io, pr_error *err)
{
    insertion *in = self;
    pr_module *mod = in->mod;
    if (mod->merged || mod->fused_by)
        return PR_OK;
    float *area_a, *area_b;
    int rc = mod_prepare_views(in, io->B, io->T, &area_a, &area_b, err);
    if (rc)
        return rc;
    (void)area_b;
    pr_ctx c;
    mod_ctx_init(in, &c, io->B, io->T, io->training, in->n_fwd++);
    int rows = io->rows, integ = mod->t.integration, seq = mod->t.insertion == PR_INSERT_SEQUENTIAL;
    int d_out = io->y_dim;
    float s = mod_gate_value(in);

    if (integ == PR_INTEGRATE_CUSTOM) {
        if (mod->gated)
            mod_copy_rows(in->y_old, d_out, io->y, io->y_ld, rows, d_out);
        c.in = mod_view2(io->x, rows, io->x_dim, io->x_ld);
        c.out = mod_view2(io->y, rows, io->y_dim, io->y_ld);
        if ((rc = mod_call(mod, in, mod->t.integrate_forward, "integrate_forward", &c, err)) || !mod->gated)
            return rc;
        /* gated: D = F - y_old (kept), y = y_old + s*D */
        for (int r = 0; r < rows; r++) {
            float *y = io->y + (size_t)r * io->y_ld, *dk = in->h_keep + (size_t)r * d_out;
            const float *yo = in->y_old + (size_t)r * d_out;
            for (int j = 0; j < d_out; j++) {
                dk[j] = y[j] - yo[j];
                y[j] = yo[j] + s * dk[j];
            }
        }
        return PR_OK;
    }
    if (integ == PR_INTEGRATE_WEIGHT_DELTA) {
        int din = in->dims.d_in;
        memset(in->dw, 0, (size_t)din * d_out * sizeof(float));
        c.in = mod_view2(io->x, rows, io->x_dim, io->x_ld);
        c.out = mod_view2(in->dw, din, d_out, d_out);
        if ((rc = mod_call(mod, in, mod->t.merge, "merge", &c, err)))
            return rc;
        /* y (rows, d_out) += s * x (rows, d_in) . dW (d_in, d_out) */
        host_services()->gemm(0, 0, rows, d_out, din, s, io->x, io->x_ld, in->dw, d_out, 1.0f, io->y, io->y_ld);
        return PR_OK;
    }
    /* the module input: x, or a copy of y as it enters this hook */
    const float *inp = io->x;
    int in_ld = io->x_ld, in_w = io->x_dim;
    if (mod_needs_y_old(mod)) {
        mod_copy_rows(in->y_old, d_out, io->y, io->y_ld, rows, d_out);
        if (seq) {
            inp = in->y_old;
            in_ld = in_w = d_out;
        }
    }
    c.in = mod_view2(inp, rows, in_w, in_ld);
    if (integ == PR_INTEGRATE_RESCALE) {
        memset(in->h_keep, 0, (size_t)in->w_out * sizeof(float));
        c.out = mod_view2(in->h_keep, 1, in->w_out, in->w_out);
        if ((rc = mod_call(mod, in, mod->t.forward, "forward", &c, err)))
            return rc;
        /* y (rows, d_out) *= h (1, d_out), or 1 + s*(h - 1) when gated */
        for (int r = 0; r < rows; r++) {
            float *y = io->y + (size_t)r * io->y_ld;
            for (int j = 0; j < d_out; j++)
                y[j] *= mod->gated ? 1.0f + s * (in->h_keep[j] - 1.0f) : in->h_keep[j];
        }
        return PR_OK;
    }
    /* addition forms: y += k * h */
    float *h = mod->gated ? in->h_keep : area_a;
    memset(h, 0, (size_t)rows * in->w_out * sizeof(float));
    c.out = mod_view2(h, rows, in->w_out, in->w_out);
    if ((rc = mod_call(mod, in, mod->t.forward, "forward", &c, err)))
        return rc;
    mod_axpy_rows(io->y, io->y_ld, h, in->w_out, rows, d_out, mod_add_coefficient(in));
    return PR_OK;
}

int mod_hook_backward(void *self, const pr_site_io *io, pr_error *err)
{
    insertion *in = self;
    pr_module *mod = in->mod;
    if (mod->merged || mod->fused_by)
        return PR_OK;
    float *area_a, *area_b;
    int rc = mod_prepare_views(in, io->B, io->T, &area_a, &area_b, err);
    if (rc)
        return rc;
    pr_ctx c;
    mod_ctx_init(in, &c, io->B, io->T, io->training, in->n_fwd ? in->n_fwd - 1 : 0);
    const pr_host *host = host_services();
    int rows = io->rows, integ = mod->t.integration, seq = mod->t.insertion == PR_INSERT_SEQUENTIAL;
    int d_out = io->y_dim, din_w = io->x_dim;
    float s = mod_gate_value(in), *dg = mod_gate_grad(in);

    /* where the module's input gradient goes */
    float *dx = io->dx;
    int dx_ld = io->x_ld;
    if (!dx) {
        memset(area_b, 0, (size_t)rows * din_w * sizeof(float));
        dx = area_b;
        dx_ld = din_w;
    }

    if (integ == PR_INTEGRATE_CUSTOM) {
        c.in = mod_view2(io->x, rows, io->x_dim, io->x_ld);
        c.out = mod_view2(io->y, rows, io->y_dim, io->y_ld);
        c.d_in = mod_view2(dx, rows, din_w, dx_ld);
        if (!mod->gated) {
            c.d_out = mod_view2(io->dy, rows, io->y_dim, io->y_ld);
            return mod_call(mod, in, mod->t.integrate_backward, "integrate_backward", &c, err);
        }
        /* y = y_old + s*(F - y_old): dg += s(1-s) sum(dy * D); the technique
         * gets s*dy and replaces it by its gradient w.r.t. y_old through F;
         * dy_old = (1 - s)*dy + that */
        double acc = 0.0;
        for (int r = 0; r < rows; r++) {
            const float *dy = io->dy + (size_t)r * io->y_ld, *dk = in->h_keep + (size_t)r * d_out;
            float *b = area_a + (size_t)r * d_out;
            for (int j = 0; j < d_out; j++) {
                acc += (double)dy[j] * dk[j];
                b[j] = s * dy[j];
            }
        }
        if (dg)
            *dg += (float)(acc * s * (1.0 - s));
        c.d_out = mod_view2(area_a, rows, d_out, d_out);
        if ((rc = mod_call(mod, in, mod->t.integrate_backward, "integrate_backward", &c, err)))
            return rc;
        for (int r = 0; r < rows; r++) {
            float *dy = io->dy + (size_t)r * io->y_ld;
            const float *b = area_a + (size_t)r * d_out;
            for (int j = 0; j < d_out; j++)
                dy[j] = (1.0f - s) * dy[j] + b[j];
        }
        return PR_OK;
    }
    if (integ == PR_INTEGRATE_WEIGHT_DELTA) {
        int din = in->dims.d_in;
        /* G (d_in, d_out) = x^T dy; dx += s * dy . dW^T */
        host->gemm(1, 0, din, d_out, rows, 1.0f, io->x, io->x_ld, io->dy, io->y_ld, 0.0f, area_a, d_out);
        host->gemm(0, 1, rows, din, d_out, s, io->dy, io->y_ld, in->dw, d_out, 1.0f, dx, dx_ld);
        if (mod->gated) {
            /* dg += s(1-s) <dW, G>; the technique gets s*G */
            double acc = 0.0;
            size_t n = (size_t)din * d_out;
            for (size_t i = 0; i < n; i++) {
                acc += (double)in->dw[i] * area_a[i];
                area_a[i] *= s;
            }
            if (dg)
                *dg += (float)(acc * s * (1.0 - s));
        }
        c.in = mod_view2(io->x, rows, io->x_dim, io->x_ld);
        c.out = mod_view2(in->dw, din, d_out, d_out);
        c.d_out = mod_view2(area_a, din, d_out, d_out);
        return mod_call(mod, in, mod->t.backward, "backward", &c, err);
    }

    /* module input and the buffer its gradient accumulates into */
    const float *inp = io->x;
    int in_ld = io->x_ld, in_w = io->x_dim;
    float *d_inp = dx;
    int d_inp_ld = dx_ld;
    if (seq) {
        inp = in->y_old;
        in_ld = in_w = d_out;
        memset(area_b, 0, (size_t)rows * d_out * sizeof(float));
        d_inp = area_b;
        d_inp_ld = d_out;
    }
    c.in = mod_view2(inp, rows, in_w, in_ld);
    c.d_in = mod_view2(d_inp, rows, in_w, d_inp_ld);

    if (integ == PR_INTEGRATE_RESCALE) {
        /* S (1, d_out) = sum_rows dy * y_old; dy <- dy * h (ungated) or
         * dy * (1 + s(h - 1)) (gated, with dh = s*S and
         * dg += s(1-s) sum_j S_j (h_j - 1)) */
        memset(area_a, 0, (size_t)d_out * sizeof(float));
        for (int r = 0; r < rows; r++) {
            float *dy = io->dy + (size_t)r * io->y_ld;
            const float *yo = in->y_old + (size_t)r * d_out;
            for (int j = 0; j < d_out; j++) {
                area_a[j] += dy[j] * yo[j];
                dy[j] *= mod->gated ? 1.0f + s * (in->h_keep[j] - 1.0f) : in->h_keep[j];
            }
        }
        if (mod->gated) {
            double acc = 0.0;
            for (int j = 0; j < d_out; j++) {
                acc += (double)area_a[j] * (in->h_keep[j] - 1.0f);
                area_a[j] *= s;
            }
            if (dg)
                *dg += (float)(acc * s * (1.0 - s));
        }
        c.out = mod_view2(in->h_keep, 1, in->w_out, in->w_out);
        c.d_out = mod_view2(area_a, 1, in->w_out, in->w_out);
    } else {
        float k = mod_add_coefficient(in);
        if (mod->gated) {
            /* y += k*h with k = c*s: dg += k(1-s) * sum(dy * h) */
            if (dg) {
                double acc = 0.0;
                for (int r = 0; r < rows; r++) {
                    const float *dy = io->dy + (size_t)r * io->y_ld, *h = in->h_keep + (size_t)r * in->w_out;
                    for (int j = 0; j < d_out; j++)
                        acc += (double)dy[j] * h[j];
                }
                *dg += (float)(acc * k * (1.0 - s));
            }
            c.out = mod_view2(in->h_keep, rows, in->w_out, in->w_out);
        }
        if (integ == PR_INTEGRATE_DIRECT_ADD && !mod->gated) {
            c.d_out = mod_view2(io->dy, rows, d_out, io->y_ld);
        } else {
            for (int r = 0; r < rows; r++) {
                const float *dy = io->dy + (size_t)r * io->y_ld;
                float *d = area_a + (size_t)r * d_out;
                for (int j = 0; j < d_out; j++)
                    d[j] = k * dy[j];
            }
            c.d_out = mod_view2(area_a, rows, d_out, d_out);
        }
    }
    if ((rc = mod_call(mod, in, mod->t.backward, "backward", &c, err)))
        return rc;
    if (seq)
        mod_axpy_rows(io->dy, io->y_ld, area_b, d_out, rows, d_out, 1.0f);
    return PR_OK;
}
