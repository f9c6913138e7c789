/* peftref core: attaching a module (stages 2 and 4): allocating its blocks,
 * registering its tensors, installing its hooks or providers or selection,
 * and undoing all of that when a stage fails. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "module_internal.h"

/* ---- attach ---------------------------------------------------------------------------------------- */

static void fill_views(pr_module *mod)
{
    for (int k = 0; k < mod->n_ins; k++) {
        insertion *in = &mod->ins[k];
        for (uint32_t i = 0; i < mod->t.n_params; i++) {
            const param_copy *pc = &mod->copies[in->copy[i]];
            in->params[i] = mod_view(mod->params + pc->off, pc->ndim, pc->shape);
            in->grads[i] = mod_view(pc->trained ? mod->grads + pc->goff : NULL, pc->ndim, pc->shape);
        }
    }
}

/* Shape [rows, cols] of the frozen weight a site folds into
 * (pr_model_site_weight): a projection's own [d_in, d_out]; for attn.k and
 * attn.v the key / value projection [d_model, d_out] (a rescaling scales
 * its columns and bias); for ffn.act the down projection [d_ff, d_model]
 * (a rescaling scales its rows).  0 for sites without one. */
static int site_weight_shape(const insertion *in, int64_t *rows, int64_t *cols)
{
    const pr_dims *d = &in->dims;
    if (pr_site_is_projection(in->site)) {
        *rows = d->d_in;
        *cols = d->d_out;
    } else if (in->site == PR_SITE_ATTN_K || in->site == PR_SITE_ATTN_V) {
        *rows = d->d_model;
        *cols = d->d_out;
    } else if (in->site == PR_SITE_FFN_ACT) {
        *rows = d->d_out;
        *cols = d->d_model;
    } else {
        return 0;
    }
    return 1;
}

static int alloc_module(pr_module *mod, pr_error *err)
{
    mod->params = mod_alloc_floats(mod->n_param_floats);
    mod->grads = mod->n_grad_floats ? mod_alloc_floats(mod->n_grad_floats) : NULL;
    if (!mod->params || (mod->n_grad_floats && !mod->grads))
        return pr_errorf(err, PR_ERR_NOMEM, "module '%s': out of memory for %zu parameters", mod_name(mod),
                         mod->n_param_floats);
    uint32_t np = mod->t.n_params ? mod->t.n_params : 1;
    for (int k = 0; k < mod->n_ins; k++) {
        insertion *in = &mod->ins[k];
        in->params = calloc(np, sizeof *in->params);
        in->grads = calloc(np, sizeof *in->grads);
        in->saved = calloc(mod->t.n_saved ? mod->t.n_saved : 1, sizeof *in->saved);
        in->scratch = calloc(mod->t.n_scratch ? mod->t.n_scratch : 1, sizeof *in->scratch);
        if (!in->params || !in->grads || !in->saved || !in->scratch)
            return pr_errorf(err, PR_ERR_NOMEM, "module '%s': out of memory", mod_name(mod));
        if (mod_form(mod)->alloc && mod_form(mod)->alloc(in))
            return pr_errorf(err, PR_ERR_NOMEM, "module '%s': out of memory", mod_name(mod));
        int64_t wr, wc;
        if (site_weight_shape(in, &wr, &wc)) {
            float *w = NULL, *b = NULL;
            int ld = 0;
            pr_error e2 = { 0 };
            if (pr_model_site_weight(mod->model, in->site, in->layer, &w, &ld, &b, &e2) == PR_OK && w) {
                in->bw = mod_view2(w, wr, wc, ld);
                in->has_bw = 1;
                if (b) {
                    in->bb = mod_view(b, 1, &wc);
                    in->has_bb = 1;
                }
            }
        }
    }
    fill_views(mod);
    return PR_OK;
}

static int register_tensors(pr_module *mod, pr_error *err)
{
    for (int c = 0; c < mod->n_copies; c++) {
        const param_copy *pc = &mod->copies[c];
        int rc = pr_model_add_tensor(mod->model, pc->name, pc->ndim, pc->shape, mod->params + pc->off,
                                     pc->trained ? mod->grads + pc->goff : NULL, err);
        if (rc)
            return rc;
    }
    return PR_OK;
}

static int attach_integration(pr_module *mod, pr_error *err)
{
    int rc;
    if (mod_is_select(mod)) {
        for (int i = 0; i < mod->n_selected; i++)
            if ((rc = pr_model_set_trainable(mod->model, mod->selected[i], 1, err)))
                return rc;
        return PR_OK;
    }
    for (int k = 0; k < mod->n_ins; k++) {
        if ((rc = mod_form(mod)->install(&mod->ins[k], err)))
            return rc;
        mod->hooks_attached = 1;
    }
    return PR_OK;
}

void mod_undo_selection(pr_module *mod)
{
    for (int i = 0; i < mod->n_selected; i++)
        pr_model_set_trainable(mod->model, mod->selected[i], 0, NULL);
}

/* Undo a failed attach: the model's hook and concatenation lists cannot
 * drop one entry, so they are rebuilt, in attach order, from the modules
 * that stay. */
void mod_reattach_others(pr_model *m, const pr_module *except)
{
    pr_model_detach_hooks(m);
    model_modules *e = model_modules_of(m);
    for (int i = 0; e && i < e->n; i++) {
        pr_module *o = e->mods[i];
        if (o == except || !mod_form(o)->install)
            continue;
        for (int k = 0; k < o->n_ins; k++)
            mod_form(o)->install(&o->ins[k], NULL);
    }
}

void mod_prefix_of(const pr_module *mod, char *buf, size_t len)
{
    snprintf(buf, len, "%s/", mod_name(mod));
}

/* 1 when a module of m, or a module a fusion of m combines, is named name. */
static int name_taken(const pr_model *m, const char *name)
{
    const model_modules *e = model_modules_of(m);
    for (int i = 0; e && i < e->n; i++) {
        if (strcmp(e->mods[i]->name, name) == 0)
            return 1;
        for (int k = 0; k < e->mods[i]->n_kids; k++)
            if (strcmp(e->mods[i]->kids[k]->name, name) == 0)
                return 1;
    }
    return 0;
}

/* A fusion module takes its fused modules out of the model's list and
 * the hook lists are rebuilt without their hooks (the fusion runs them). */
static void adopt_kids(pr_model *m, pr_module *mod)
{
    for (int k = 0; k < mod->n_kids; k++) {
        mod->kids[k]->fused_by = mod;
        mod_list_remove(m, mod->kids[k]);
    }
    mod_reattach_others(m, NULL);
}

/* pr_module_attach, and for a fusion module (n_kids > 0) the modules it
 * combines, whose insertions match its own one for one. */
int mod_attach_impl(pr_model *m, const pr_module_spec *spec, pr_module *const *kids, int n_kids, pr_module **out,
                       pr_error *err)
{
    if (out)
        *out = NULL;
    pr_module *mod = NULL;
    int rc = mod_resolve(m, spec, &mod, err);
    if (rc) {
        mod_free(mod);
        return rc;
    }
    if (name_taken(m, mod->name)) {
        rc = pr_errorf(err, PR_ERR_INVALID, "module '%s': the model already has a module of that name; give it "
                       "another name", mod->name);
        mod_free(mod);
        return rc;
    }
    if (n_kids > 0) {
        mod->kids = malloc((size_t)n_kids * sizeof *mod->kids);
        if (!mod->kids) {
            mod_free(mod);
            return pr_errorf(err, PR_ERR_NOMEM, "module: out of memory");
        }
        memcpy(mod->kids, kids, (size_t)n_kids * sizeof *mod->kids);
        mod->n_kids = n_kids;
        for (int i = 0; i < n_kids; i++) {
            int same = kids[i]->n_ins == mod->n_ins;
            for (int k = 0; same && k < mod->n_ins; k++)
                same = kids[i]->ins[k].site == mod->ins[k].site && kids[i]->ins[k].layer == mod->ins[k].layer;
            if (!same) {
                rc = pr_errorf(err, PR_ERR_INVALID, "fusion '%s': module '%s' has other insertions than the fusion",
                               mod->name, kids[i]->name);
                mod->n_kids = 0;
                mod_free(mod);
                return rc;
            }
        }
    }
    char prefix[256];
    mod_prefix_of(mod, prefix, sizeof prefix);
    if ((rc = alloc_module(mod, err)) || (rc = register_tensors(mod, err)) || (rc = mod_init_params(mod, spec, err)) ||
        (rc = attach_integration(mod, err))) {
        pr_error keep = { 0 };
        if (err)
            keep = *err;
        pr_model_remove_tensors(m, prefix);
        mod_undo_selection(mod);
        if (mod->hooks_attached)
            mod_reattach_others(m, mod);
        mod->n_kids = 0;
        mod_free(mod);
        if (err)
            *err = keep;
        return rc;
    }
    if (mod_list_add(m, mod)) {
        pr_model_remove_tensors(m, prefix);
        mod_undo_selection(mod);
        mod_reattach_others(m, mod);
        mod->n_kids = 0;
        mod_free(mod);
        return pr_errorf(err, PR_ERR_NOMEM, "module: out of memory");
    }
    if (mod->n_kids)
        adopt_kids(m, mod);
    if (out)
        *out = mod;
    return PR_OK;
}

int pr_module_attach(pr_model *m, const pr_module_spec *spec, pr_module **out, pr_error *err)
{
    const pr_technique *ft = pr_fusion_technique();
    if (spec && spec->technique == ft) {
        if (out)
            *out = NULL;
        return pr_errorf(err, PR_ERR_INVALID, "module '%s': %s combines attached modules; attach it with "
                         "pr_module_fuse", spec->name ? spec->name : ft->name, ft->name);
    }
    return mod_attach_impl(m, spec, NULL, 0, out, err);
}
