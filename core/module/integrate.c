/* peftref core: the integration forms (see module_internal.h), one row
 * each of mod_forms, indexed by pr_integration: the forward and backward
 * a site hook runs, what reserve plans, the host memory an insertion
 * keeps, and how an insertion installs itself in the model.  The site
 * hook (mod_hook_forward / mod_hook_backward) does what every form shares
 * (views, context, the input gradient's buffer) and calls its row. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "module_internal.h"
#include "host.h"

/* ---- shared by the forms ------------------------------------------------------------------------ */

/* k of y += k*h: the scale (SCALED_ADD) or 1, times the gate. */
float mod_add_coefficient(const insertion *in)
{
    float k = mod_form(in->mod)->scaled ? in->scale : 1.0f;
    return k * mod_gate_value(in);
}

static size_t max_size(size_t a, size_t b)
{
    return a > b ? a : b;
}

/* y_old (rows, d_out) = y as it enters the hook. */
static void keep_y(insertion *in, const pr_site_io *io)
{
    mod_copy_rows(in->y_old, io->y_dim, io->y, io->y_ld, io->rows, io->y_dim);
}

/* The module input: x (parallel), or y_old (sequential). */
static pr_tensor module_input(const insertion *in, const pr_site_io *io)
{
    if (in->mod->t.insertion == PR_INSERT_SEQUENTIAL)
        return mod_view2(in->y_old, io->rows, io->y_dim, io->y_dim);
    return mod_view2(io->x, io->rows, io->x_dim, io->x_ld);
}

/* ---- direct, scaled and gated addition: y += k*h ------------------------------------------------ */

/* A composite module (n_members > 0) is an addition whose h comes from
 * its members through compose_forward: in is x, y_old is kept as its
 * site_y, and in backward site_y's gradient collects in area B. */
static int add_forward(insertion *in, const pr_site_io *io, pr_ctx *c, float *area_a, pr_error *err)
{
    pr_module *mod = in->mod;
    int rows = io->rows, d_out = io->y_dim, comp = mod->n_members > 0, rc;
    if (mod->t.insertion == PR_INSERT_SEQUENTIAL || comp)
        keep_y(in, io);
    CT(c, in) = comp ? mod_view2(io->x, rows, io->x_dim, io->x_ld) : module_input(in, io);
    float *h = mod->gated ? in->h_keep : area_a;
    memset(h, 0, (size_t)rows * in->w_out * sizeof(float));
    CT(c, out) = mod_view2(h, rows, in->w_out, in->w_out);
    rc = comp ? mod_composite_forward(in, io, c, err) : mod_call(mod, in, mod->t.forward, "forward", c, err);
    if (rc)
        return rc;
    mod_axpy_rows(io->y, io->y_ld, h, in->w_out, rows, d_out, mod_add_coefficient(in));
    return PR_OK;
}

static int add_backward(insertion *in, const pr_site_io *io, pr_ctx *c, float *dx, int dx_ld, float *area_a,
                        float *area_b, pr_error *err)
{
    pr_module *mod = in->mod;
    int rows = io->rows, d_out = io->y_dim, comp = mod->n_members > 0, rc;
    int seq = mod->t.insertion == PR_INSERT_SEQUENTIAL || comp;
    float s = mod_gate_value(in), *dg = mod_gate_grad(in);
    CT(c, in) = comp ? mod_view2(io->x, rows, io->x_dim, io->x_ld) : module_input(in, io);
    if (seq)
        memset(area_b, 0, (size_t)rows * d_out * sizeof(float));
    if (seq && !comp)
        CT(c, d_in) = mod_view2(area_b, rows, d_out, d_out);
    else
        CT(c, d_in) = mod_view2(dx, rows, io->x_dim, dx_ld);
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
        CT(c, out) = mod_view2(in->h_keep, rows, in->w_out, in->w_out);
    }
    if (mod->t.integration == PR_INTEGRATE_DIRECT_ADD && !mod->gated) {
        CT(c, d_out) = mod_view2(io->dy, rows, d_out, io->y_ld);
    } else {
        for (int r = 0; r < rows; r++) {
            const float *dy = io->dy + (size_t)r * io->y_ld;
            float *d = area_a + (size_t)r * d_out;
            for (int j = 0; j < d_out; j++)
                d[j] = k * dy[j];
        }
        CT(c, d_out) = mod_view2(area_a, rows, d_out, d_out);
    }
    rc = comp ? mod_composite_backward(in, io, c, dx, dx_ld, area_b, err)
              : mod_call(mod, in, mod->t.backward, "backward", c, err);
    if (rc)
        return rc;
    if (seq)
        mod_axpy_rows(io->dy, io->y_ld, area_b, d_out, rows, d_out, 1.0f);
    return PR_OK;
}

/* h (rows, w_out) in area A; y_old when sequential or composite; h kept
 * when gated. */
static void add_reserve(const insertion *in, size_t rows, form_need *need)
{
    int y = in->mod->t.insertion == PR_INSERT_SEQUENTIAL || in->mod->n_members > 0;
    need->area_a = mod_round_up(rows * (size_t)in->w_out);
    need->y_old = y ? mod_round_up(rows * (size_t)in->dims.d_out) : 0;
    need->keep = in->mod->gated ? mod_round_up(rows * (size_t)in->w_out) : 0;
}

/* ---- rescaling: y *= h ------------------------------------------------------------------------- */

static int rescale_forward(insertion *in, const pr_site_io *io, pr_ctx *c, float *area_a, pr_error *err)
{
    pr_module *mod = in->mod;
    int rows = io->rows, d_out = io->y_dim, rc;
    float s = mod_gate_value(in);
    keep_y(in, io);
    CT(c, in) = module_input(in, io);
    memset(in->h_keep, 0, (size_t)in->w_out * sizeof(float));
    CT(c, out) = mod_view2(in->h_keep, 1, in->w_out, in->w_out);
    if ((rc = mod_call(mod, in, mod->t.forward, "forward", c, err)))
        return rc;
    /* y (rows, d_out) *= h (1, d_out), or 1 + s*(h - 1) when gated */
    for (int r = 0; r < rows; r++) {
        float *y = io->y + (size_t)r * io->y_ld;
        for (int j = 0; j < d_out; j++)
            y[j] *= mod->gated ? 1.0f + s * (in->h_keep[j] - 1.0f) : in->h_keep[j];
    }
    return PR_OK;
}

static int rescale_backward(insertion *in, const pr_site_io *io, pr_ctx *c, float *dx, int dx_ld, float *area_a,
                            float *area_b, pr_error *err)
{
    pr_module *mod = in->mod;
    int rows = io->rows, d_out = io->y_dim, seq = mod->t.insertion == PR_INSERT_SEQUENTIAL, rc;
    float s = mod_gate_value(in), *dg = mod_gate_grad(in);
    CT(c, in) = module_input(in, io);
    if (seq) {
        memset(area_b, 0, (size_t)rows * d_out * sizeof(float));
        CT(c, d_in) = mod_view2(area_b, rows, d_out, d_out);
    } else {
        CT(c, d_in) = mod_view2(dx, rows, io->x_dim, dx_ld);
    }
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
    CT(c, out) = mod_view2(in->h_keep, 1, in->w_out, in->w_out);
    CT(c, d_out) = mod_view2(area_a, 1, in->w_out, in->w_out);
    if ((rc = mod_call(mod, in, mod->t.backward, "backward", c, err)))
        return rc;
    if (seq)
        mod_axpy_rows(io->dy, io->y_ld, area_b, d_out, rows, d_out, 1.0f);
    return PR_OK;
}

/* dh (1, w_out) in area A; y_old always (dh needs it); h lives in h_keep
 * (rescale_alloc), gated or not. */
static void rescale_reserve(const insertion *in, size_t rows, form_need *need)
{
    need->area_a = mod_round_up(rows * (size_t)in->w_out);
    need->y_old = mod_round_up(rows * (size_t)in->dims.d_out);
    need->keep = 0;
}

static int rescale_alloc(insertion *in)
{
    in->h_keep = mod_alloc_floats((size_t)in->w_out);
    return in->h_keep ? 0 : -1;
}

static void rescale_release(insertion *in)
{
    free(in->h_keep);
    in->h_keep = NULL;
}

/* ---- weight delta: y += s * x.dW ---------------------------------------------------------------- */

static int delta_forward(insertion *in, const pr_site_io *io, pr_ctx *c, float *area_a, pr_error *err)
{
    pr_module *mod = in->mod;
    int rows = io->rows, d_out = io->y_dim, din = in->dims.d_in, rc;
    float s = mod_gate_value(in);
    memset(in->dw, 0, (size_t)din * d_out * sizeof(float));
    CT(c, in) = mod_view2(io->x, rows, io->x_dim, io->x_ld);
    CT(c, out) = mod_view2(in->dw, din, d_out, d_out);
    if ((rc = mod_call(mod, in, mod->t.merge, "merge", c, err)))
        return rc;
    /* y (rows, d_out) += s * x (rows, d_in) . dW (d_in, d_out) */
    host_services()->gemm(0, 0, rows, d_out, din, s, io->x, io->x_ld, in->dw, d_out, 1.0f, io->y, io->y_ld);
    return PR_OK;
}

static int delta_backward(insertion *in, const pr_site_io *io, pr_ctx *c, float *dx, int dx_ld, float *area_a,
                          float *area_b, pr_error *err)
{
    pr_module *mod = in->mod;
    const pr_host *host = host_services();
    int rows = io->rows, d_out = io->y_dim, din = in->dims.d_in;
    float s = mod_gate_value(in), *dg = mod_gate_grad(in);
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
    CT(c, in) = mod_view2(io->x, rows, io->x_dim, io->x_ld);
    CT(c, out) = mod_view2(in->dw, din, d_out, d_out);
    CT(c, d_out) = mod_view2(area_a, din, d_out, d_out);
    return mod_call(mod, in, mod->t.backward, "backward", c, err);
}

/* area A holds G = x^T dy (d_in, d_out) too */
static void delta_reserve(const insertion *in, size_t rows, form_need *need)
{
    need->area_a = max_size(mod_round_up(rows * (size_t)in->w_out),
                            mod_round_up((size_t)in->dims.d_in * (size_t)in->dims.d_out));
    need->y_old = 0;
    need->keep = 0;
}

static int delta_alloc(insertion *in)
{
    in->dw = mod_alloc_floats((size_t)in->dims.d_in * (size_t)in->dims.d_out);
    return in->dw ? 0 : -1;
}

static void delta_release(insertion *in)
{
    free(in->dw);
    in->dw = NULL;
}

/* ---- custom: the technique's integrate_forward / integrate_backward ------------------------------ */

static int custom_forward(insertion *in, const pr_site_io *io, pr_ctx *c, float *area_a, pr_error *err)
{
    pr_module *mod = in->mod;
    int rows = io->rows, d_out = io->y_dim, rc;
    float s = mod_gate_value(in);
    if (mod->gated)
        keep_y(in, io);
    CT(c, in) = mod_view2(io->x, rows, io->x_dim, io->x_ld);
    CT(c, out) = mod_view2(io->y, rows, io->y_dim, io->y_ld);
    if ((rc = mod_call(mod, in, mod->t.integrate_forward, "integrate_forward", c, err)) || !mod->gated)
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

static int custom_backward(insertion *in, const pr_site_io *io, pr_ctx *c, float *dx, int dx_ld, float *area_a,
                           float *area_b, pr_error *err)
{
    pr_module *mod = in->mod;
    int rows = io->rows, d_out = io->y_dim, rc;
    float s = mod_gate_value(in), *dg = mod_gate_grad(in);
    CT(c, in) = mod_view2(io->x, rows, io->x_dim, io->x_ld);
    CT(c, out) = mod_view2(io->y, rows, io->y_dim, io->y_ld);
    CT(c, d_in) = mod_view2(dx, rows, io->x_dim, dx_ld);
    if (!mod->gated) {
        CT(c, d_out) = mod_view2(io->dy, rows, io->y_dim, io->y_ld);
        return mod_call(mod, in, mod->t.integrate_backward, "integrate_backward", c, err);
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
    CT(c, d_out) = mod_view2(area_a, rows, d_out, d_out);
    if ((rc = mod_call(mod, in, mod->t.integrate_backward, "integrate_backward", c, err)))
        return rc;
    for (int r = 0; r < rows; r++) {
        float *dy = io->dy + (size_t)r * io->y_ld;
        const float *b = area_a + (size_t)r * d_out;
        for (int j = 0; j < d_out; j++)
            dy[j] = (1.0f - s) * dy[j] + b[j];
    }
    return PR_OK;
}

/* gated: y_old, D = F - y_old kept, s*dy in area A (all rows x d_out) */
static void custom_reserve(const insertion *in, size_t rows, form_need *need)
{
    size_t yd = mod_round_up(rows * (size_t)in->dims.d_out);
    int g = in->mod->gated;
    need->area_a = max_size(mod_round_up(rows * (size_t)in->w_out), g ? yd : 0);
    need->y_old = g ? yd : 0;
    need->keep = g ? yd : 0;
}

/* ---- the site hook ------------------------------------------------------------------------------ */

int mod_hook_forward(void *self, const pr_site_io *io, pr_error *err)
{
    insertion *in = self;
    pr_module *mod = in->mod;
    if (mod->merged || mod->composed_by)
        return PR_OK;
    float *area_a, *area_b;
    int rc = mod_prepare_views(in, io->B, io->T, &area_a, &area_b, err);
    if (rc)
        return rc;
    pr_ctx c;
    mod_ctx_init(in, &c, io->B, io->T, io->training, mod_forward_call(in));
    return mod_form(mod)->forward(in, io, &c, area_a, err);
}

int mod_hook_backward(void *self, const pr_site_io *io, pr_error *err)
{
    insertion *in = self;
    pr_module *mod = in->mod;
    if (mod->merged || mod->composed_by)
        return PR_OK;
    float *area_a, *area_b;
    int rc = mod_prepare_views(in, io->B, io->T, &area_a, &area_b, err);
    if (rc)
        return rc;
    pr_ctx c;
    mod_ctx_init(in, &c, io->B, io->T, io->training, in->n_fwd ? in->n_fwd - 1 : 0);
    /* where the module's input gradient goes: dx, or area B when the site
     * input needs none (so the parameters still get theirs) */
    float *dx = io->dx;
    int dx_ld = io->x_ld;
    if (!dx) {
        /* a composite keeps the start of area B for site_y's gradient */
        dx = mod->n_members ? area_b + mod_round_up((size_t)io->rows * (size_t)io->y_dim) : area_b;
        memset(dx, 0, (size_t)io->rows * io->x_dim * sizeof(float));
        dx_ld = io->x_dim;
    }
    return mod_form(mod)->backward(in, io, &c, dx, dx_ld, area_a, area_b, err);
}

static int hook_install(insertion *in, pr_error *err)
{
    pr_site_hook h = { mod_hook_forward, mod_hook_backward, in, mod_hook_reserve };
    return pr_model_attach_hook(in->mod->model, in->site, in->layer, &h, err);
}

/* ---- the table ---------------------------------------------------------------------------------- */

#define ADD_FORM .additive = 1, .fixed_in = 1, .fixed_out = 1, .merges_gated = 1, .forward = add_forward, \
                 .backward = add_backward, .reserve = add_reserve, .install = hook_install

const integration_form mod_forms[PR_INTEGRATE_SELECT + 1] = {
    [PR_INTEGRATE_DIRECT_ADD] = { .name = "addition", ADD_FORM },
    [PR_INTEGRATE_SCALED_ADD] = { .name = "addition", .scaled = 1, ADD_FORM },
    [PR_INTEGRATE_GATED_ADD] = { .name = "addition", .gated = 1, ADD_FORM },
    [PR_INTEGRATE_RESCALE] = { .name = "rescaling", .fixed_in = 1, .fixed_out = 1, .forward = rescale_forward,
                               .backward = rescale_backward, .reserve = rescale_reserve, .alloc = rescale_alloc,
                               .release = rescale_release, .install = hook_install },
    [PR_INTEGRATE_WEIGHT_DELTA] = { .name = "a weight delta", .fixed_out = 1, .merges_gated = 1,
                                    .forward = delta_forward, .backward = delta_backward, .reserve = delta_reserve,
                                    .alloc = delta_alloc, .release = delta_release, .install = hook_install },
    [PR_INTEGRATE_CUSTOM] = { .name = "a custom integration", .merges_gated = 1, .forward = custom_forward,
                              .backward = custom_backward, .reserve = custom_reserve, .install = hook_install },
    [PR_INTEGRATE_CONCAT] = { .name = "concatenation", .fixed_out = 1, .merges_gated = 1,
                              .reserve = mod_concat_reserve, .install = mod_concat_install },
    [PR_INTEGRATE_SELECT] = { .name = "selection", .merges_gated = 1 },
};

const integration_form *mod_form(const pr_module *mod)
{
    static const integration_form none = { .name = "an unknown integration" };
    uint32_t i = (uint32_t)mod->t.integration;
    return i < sizeof mod_forms / sizeof mod_forms[0] && mod_forms[i].name ? &mod_forms[i] : &none;
}
