/* peftref core: calling a technique's callbacks: the pr_ctx of one call, its
 * saved and scratch buffers, the host's temporaries, and reserve (planning
 * those buffers for B x T before a step). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "module_internal.h"
#include "host.h"

/* Variables for saved and scratch buffer shapes: model ones plus rows, B, T. */
static int buffer_vars(const insertion *ins, int B, int T, expr_var *v)
{
    int n = mod_model_vars(ins->mod, &ins->dims, ins->opts, v);
    v[n++] = (expr_var){ "rows", (double)B * T };
    v[n++] = (expr_var){ "B", B };
    v[n++] = (expr_var){ "T", T };
    v[n++] = (expr_var){ "n_members", ins->mod->n_members };
    return n;
}

/* ---- calling the plugin ------------------------------------------------------------------------ */

static int call_failed(const pr_module *mod, const insertion *in, const char *what, int rc, const host_call *hc,
                       pr_error *err)
{
    int code = (rc > 0 && rc <= PR_ERR_INTERRUPTED) ? rc : PR_ERR_INVALID;
    char msg[HOST_MSG_MAX + 64];
    if (hc->has_msg)
        snprintf(msg, sizeof msg, "%s", hc->msg);
    else
        snprintf(msg, sizeof msg, "%s() failed with status %d", what, rc);
    return pr_errorf(err, code, "module '%s' (technique %s) at %s: %s", mod_name(mod), mod->t.name,
                     in ? in->where : "(module)", msg);
}

static int mod_rerunning(const pr_module *mod)
{
    const model_modules *e = model_modules_of(mod->model);
    return e && e->rerun;
}

int mod_call(const pr_module *mod, const insertion *in, pr_callback cb, const char *what, const pr_ctx *c,
                pr_error *err)
{
    if (!cb)
        return pr_errorf(err, PR_ERR_UNSUPPORTED, "module '%s' (technique %s) at %s: the technique has no %s()",
                         mod_name(mod), mod->t.name, in ? in->where : "(module)", what);
    host_call hc;
    host_call_begin(&hc);
    hc.ctx = c;
    hc.model = mod->model;
    int rc = cb(c);
    host_call_end(&hc);
    /* a rerun forward (recompute) reported its loss the first time */
    if (hc.aux_loss != 0.0 && !mod_rerunning(mod))
        mod_add_aux_loss(mod->model, hc.aux_loss);
    return rc ? call_failed(mod, in, what, rc, &hc, err) : PR_OK;
}

uint64_t mod_forward_call(insertion *in)
{
    if (mod_rerunning(in->mod))
        return in->n_fwd ? in->n_fwd - 1 : 0;
    return in->n_fwd++;
}

static uint64_t call_seed(const pr_module *mod, const insertion *in, uint64_t step)
{
    return host_mix64(mod->seed ^ host_mix64(((uint64_t)(in->index + 1) << 32) ^ host_mix64(step + 1)));
}

/* The context of one call, without site tensors. */
void mod_ctx_init(const insertion *in, pr_ctx *c, int B, int T, int training, uint64_t step)
{
    const pr_module *mod = in->mod;
    memset(c, 0, sizeof *c);
    c->struct_size = sizeof *c;
    c->host = host_services();
    c->technique = mod->tech_ptr;
    c->dims = &in->dims;
    c->site = in->site;
    c->layer = in->layer;
    c->insertion = in->index;
    c->B = B;
    c->T = T;
    c->rows = B * T;
    c->training = training;
    c->seed = call_seed(mod, in, step);
    c->module_seed = host_mix64(mod->seed ^ host_mix64((uint64_t)(in->index + 1) << 32));
    c->step = (int64_t)(in->n_fwd >> 24);
    c->sample_index = mod_samples(mod->model);
    c->options = in->opts;
    c->n_options = mod->t.n_options;
    uint32_t np = mod->t.n_params ? mod->t.n_params : 1;
    c->params = in->ptrs;
    c->grads = in->ptrs + np;
    c->n_params = mod->t.n_params;
    c->saved = in->ptrs + 2 * np;
    c->n_saved = mod->t.n_saved;
    c->scratch = in->ptrs + 2 * np + mod->t.n_saved;
    c->n_scratch = mod->t.n_scratch;
    /* the site tensors of this call: the callers fill them through CT() */
    insertion *store = (insertion *)in;
    memset(store->site_t, 0, sizeof store->site_t);
    c->in = &store->site_t[0];
    c->out = &store->site_t[1];
    c->d_in = &store->site_t[2];
    c->d_out = &store->site_t[3];
    c->base_weight = in->has_bw ? &in->bw : NULL;
    c->base_bias = in->has_bb ? &in->bb : NULL;
    c->base_layout = in->bw_layout ? in->bw_layout : PR_WEIGHT_IN_OUT;
    c->scale = in->scale;
}

/* Floats of buffer list decls evaluated for B x T (each rounded up). */
static int buffers_size(const insertion *in, const pr_buffer_decl *d, uint32_t n, int B, int T, pr_tensor *views,
                        float *base, size_t *total, pr_error *err)
{
    expr_var v[MAX_VARS];
    char e[256];
    int nv = buffer_vars(in, B, T, v);
    size_t off = 0;
    for (uint32_t i = 0; i < n; i++) {
        int64_t dims[4];
        int nd = 0;
        if (!d[i].shape || expr_eval_shape(d[i].shape, v, nv, dims, &nd, e, sizeof e))
            return pr_errorf(err, PR_ERR_INVALID, "module '%s': buffer '%s' shape '%s' at %s: %s", mod_name(in->mod),
                             d[i].name ? d[i].name : "?", d[i].shape ? d[i].shape : "", in->where,
                             d[i].shape ? e : "missing");
        if (views)
            views[i] = mod_view(base ? base + off : NULL, nd, dims);
        off += mod_round_up((size_t)mod_shape_numel(dims, nd));
    }
    *total = off;
    return PR_OK;
}

/* Host temporaries after the plugin's scratch: area A (module output,
 * scaled d_out, dh, dW gradient) and area B (d_in of the module input). */
static size_t area_a_floats(const insertion *in, int rows)
{
    form_need need;
    mod_form(in->mod)->reserve(in, (size_t)rows, &need);
    return need.area_a;
}

/* A composite's area B holds site_y's gradient (rows, d_out) first, then
 * the dx stand-in when the site input needs no gradient. */
static size_t area_b_floats(const insertion *in, int rows)
{
    int w = in->w_in > in->dims.d_in ? in->w_in : in->dims.d_in;
    size_t n = mod_round_up((size_t)rows * (size_t)w);
    return in->mod->n_members ? n + mod_round_up((size_t)rows * (size_t)in->dims.d_out) : n;
}

/* Point the saved and scratch views at B x T and find the host areas. */
int mod_prepare_views(insertion *in, int B, int T, float **area_a, float **area_b, pr_error *err)
{
    pr_module *mod = in->mod;
    if (B > in->res_B || T > in->res_T || !in->block)
        return pr_errorf(err, PR_ERR_INVALID,
                         "module '%s' at %s: batch B=%d x T=%d exceeds what pr_model_reserve planned (B=%d x T=%d)",
                         mod_name(mod), in->where, B, T, in->res_B, in->res_T);
    size_t ns = 0, nx = 0;
    int rc;
    if ((rc = buffers_size(in, mod->sd, mod->t.n_saved, B, T, in->saved, in->block, &ns, err)) ||
        (rc = buffers_size(in, mod->xd, mod->t.n_scratch, B, T, in->scratch, mod->scratch, &nx, err)))
        return rc;
    size_t need = nx + area_a_floats(in, B * T) + area_b_floats(in, B * T);
    if (need > mod->scratch_cap)
        return pr_errorf(err, PR_ERR_INVALID, "module '%s' at %s: scratch of %zu floats exceeds the %zu reserved",
                         mod_name(mod), in->where, need, mod->scratch_cap);
    *area_a = mod->scratch + nx;
    *area_b = *area_a + area_a_floats(in, B * T);
    return PR_OK;
}

/* Scratch for a call outside a step (setup, init, merge, fold,
 * after_backward, on_step): the declared scratch buffers for one row, so
 * those that do not depend on the batch (a frozen weight in f32) are lent
 * whole. */
int mod_lend_scratch(insertion *in, pr_error *err)
{
    pr_module *mod = in->mod;
    size_t nx = 0;
    int rc;
    if ((rc = buffers_size(in, mod->xd, mod->t.n_scratch, 1, 1, NULL, NULL, &nx, err)) ||
        (rc = mod_grow_scratch(mod, nx, "module", err)))
        return rc;
    return buffers_size(in, mod->xd, mod->t.n_scratch, 1, 1, in->scratch, mod->scratch, &nx, err);
}

/* ---- reserve ----------------------------------------------------------------------------------- */

int mod_reserve_insertion(insertion *in, int B, int T, pr_error *err)
{
    pr_module *mod = in->mod;
    if (in->block && B <= in->res_B && T <= in->res_T)
        return PR_OK;
    if (in->block) {
        B = B > in->res_B ? B : in->res_B;
        T = T > in->res_T ? T : in->res_T;
    }
    size_t rows = (size_t)B * (size_t)T, ns = 0, nx = 0;
    int rc;
    if ((rc = buffers_size(in, mod->sd, mod->t.n_saved, B, T, NULL, NULL, &ns, err)) ||
        (rc = buffers_size(in, mod->xd, mod->t.n_scratch, B, T, NULL, NULL, &nx, err)))
        return rc;
    form_need fn;
    mod_form(mod)->reserve(in, rows, &fn);
    size_t ny = fn.y_old, nh = fn.keep, nm = mod_composite_floats(in, rows);
    float *block = mod_alloc_floats(ns + ny + nh + nm);
    if (!block)
        return pr_errorf(err, PR_ERR_NOMEM, "module '%s' at %s: out of memory for saved activations (B=%d, T=%d)",
                         mod_name(mod), in->where, B, T);
    size_t need = nx + fn.area_a + area_b_floats(in, (int)rows);
    if ((rc = mod_grow_scratch(mod, need, "module", err))) {
        free(block);
        return rc;
    }
    free(in->block);
    in->block = block;
    in->block_floats = ns + ny + nh + nm;
    in->y_old = ny ? block + ns : NULL;
    if (nh)
        in->h_keep = block + ns + ny;
    in->mh = nm ? block + ns + ny + nh : NULL;
    in->mdh = nm ? in->mh + nm / 2 : NULL;
    in->res_B = B;
    in->res_T = T;
    return PR_OK;
}

int mod_hook_reserve(void *self, int B, int T, pr_error *err)
{
    insertion *in = self;
    int rc = in->mod->n_members ? mod_composite_reserve(in, B, T, err) : PR_OK;
    return rc ? rc : mod_reserve_insertion(in, B, T, err);
}
