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

/* The frozen weight the site folds into (a projection's own; attn.k and
 * attn.v the key / value projection; ffn.act the down projection),
 * viewed as the family stores it: f32, or bf16 under precision bf16
 * (plugins read it through host->base_weight_f32 either way). */
static void view_base_weight(pr_module *mod, insertion *in)
{
    model_weight_view v;
    pr_error e2 = { 0 };
    in->has_bw = in->has_bb = 0;
    if (model_site_weight_view(mod->model, in->site, in->layer, &v, &e2) != PR_OK || (!v.w && !v.w16))
        return;
    const int out_in = v.layout == PR_WEIGHT_OUT_IN;
    in->bw = mod_view2(v.w, out_in ? v.d_out : v.d_in, out_in ? v.d_in : v.d_out, v.ld);
    if (!v.w) {
        in->bw.data = (void *)v.w16;
        in->bw.dtype = PR_DTYPE_BF16;
    }
    in->bw_layout = v.layout;
    in->has_bw = 1;
    if (v.b) {
        int64_t n = v.d_out;
        in->bb = mod_view(v.b, 1, &n);
        in->has_bb = 1;
    }
}

void module_refresh_base_views(pr_module *mod)
{
    for (int k = 0; mod && k < mod->n_ins; k++)
        view_base_weight(mod, &mod->ins[k]);
}

int module_is_merged(const pr_module *mod)
{
    return mod && mod->merged;
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
        in->ptrs = calloc(2 * np + (mod->t.n_saved + mod->t.n_scratch) + 1, sizeof *in->ptrs);
        if (!in->params || !in->grads || !in->saved || !in->scratch || !in->ptrs)
            return pr_errorf(err, PR_ERR_NOMEM, "module '%s': out of memory", mod_name(mod));
        pr_tensor **pp = in->ptrs;
        for (uint32_t i = 0; i < np; i++) {
            pp[i] = &in->params[i];
            pp[np + i] = &in->grads[i];
        }
        for (uint32_t i = 0; i < mod->t.n_saved; i++)
            pp[2 * np + i] = &in->saved[i];
        for (uint32_t i = 0; i < mod->t.n_scratch; i++)
            pp[2 * np + mod->t.n_saved + i] = &in->scratch[i];
        if (mod_form(mod)->alloc && mod_form(mod)->alloc(in))
            return pr_errorf(err, PR_ERR_NOMEM, "module '%s': out of memory", mod_name(mod));
        view_base_weight(mod, in);
    }
    fill_views(mod);
    return PR_OK;
}

static int register_tensors(pr_module *mod, pr_error *err)
{
    for (int c = 0; c < mod->n_copies; c++) {
        const param_copy *pc = &mod->copies[c];
        if (pc->numel == 0)
            continue;   /* a frozen buffer the options leave out: nothing to name */
        int rc = pr_model_add_tensor(mod->model, pc->name, pc->ndim, pc->shape, mod->params + pc->off,
                                     pc->trained ? mod->grads + pc->goff : NULL, err);
        if (rc)
            return rc;
        if (pc->decl < 0)
            continue;   /* a gate: the usual rules */
        /* what the declaration asks of the optimizer: no decay, a learning-rate multiplier (LoRA+) */
        const pr_param_decl *d = &mod->pd[pc->decl];
        double lr = 1.0;
        if (d->lr_scale) {
            const insertion *in = &mod->ins[pc->first_ins >= 0 ? pc->first_ins : 0];
            expr_var v[MAX_VARS];
            char e[256];
            int nv = mod_model_vars(mod, &in->dims, in->opts, v);
            if (expr_eval(d->lr_scale, v, nv, &lr, e, sizeof e))
                return pr_errorf(err, PR_ERR_INVALID, "module '%s': parameter '%s' lr_scale '%s': %s", mod_name(mod),
                                 d->name, d->lr_scale, e);
        }
        if ((d->flags & PR_PARAM_NO_DECAY) || d->lr_scale) {
            if ((rc = pr_model_set_tensor_optim(mod->model, pc->name, (d->flags & PR_PARAM_NO_DECAY) != 0, (float)lr,
                                                err)))
                return rc;
        }
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

/* 1 when a module of m, or a member of a composite module of m, is named name. */
static int name_taken(const pr_model *m, const char *name)
{
    const model_modules *e = model_modules_of(m);
    for (int i = 0; e && i < e->n; i++) {
        if (strcmp(e->mods[i]->name, name) == 0)
            return 1;
        for (int k = 0; k < e->mods[i]->n_members; k++)
            if (strcmp(e->mods[i]->members[k]->name, name) == 0)
                return 1;
    }
    return 0;
}

/* A composite module takes its members out of the model's list and the
 * hook lists are rebuilt without their hooks (the composite runs them). */
static void adopt_members(pr_model *m, pr_module *mod)
{
    for (int k = 0; k < mod->n_members; k++) {
        mod->members[k]->composed_by = mod;
        mod_list_remove(m, mod->members[k]);
    }
    mod_reattach_others(m, NULL);
}

/* pr_module_attach, and for a composite module (n_members > 0) the
 * modules it combines, whose insertions match its own one for one. */
int mod_attach_impl(pr_model *m, const pr_module_spec *spec, pr_module *const *members, int n_members, pr_module **out,
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
    if (!mod->t.composite != !(n_members > 0)) {
        rc = mod->t.composite
                 ? pr_errorf(err, PR_ERR_INVALID, "module '%s': technique %s is composite (it combines modules "
                             "attached before it); attach it with pr_module_compose", mod->name, mod->t.name)
                 : pr_errorf(err, PR_ERR_INVALID, "module '%s': technique %s is not composite; it cannot combine "
                             "other modules", mod->name, mod->t.name);
        mod_free(mod);
        return rc;
    }
    if (name_taken(m, mod->name)) {
        rc = pr_errorf(err, PR_ERR_INVALID, "module '%s': the model already has a module of that name; give it "
                       "another name", mod->name);
        mod_free(mod);
        return rc;
    }
    if (n_members > 0) {
        mod->members = malloc((size_t)n_members * sizeof *mod->members);
        if (!mod->members) {
            mod_free(mod);
            return pr_errorf(err, PR_ERR_NOMEM, "module: out of memory");
        }
        memcpy(mod->members, members, (size_t)n_members * sizeof *mod->members);
        mod->n_members = n_members;
        for (int i = 0; i < n_members; i++) {
            int same = members[i]->n_ins == mod->n_ins;
            for (int k = 0; same && k < mod->n_ins; k++)
                same = members[i]->ins[k].site == mod->ins[k].site && members[i]->ins[k].layer == mod->ins[k].layer;
            if (!same) {
                rc = pr_errorf(err, PR_ERR_INVALID, "module '%s': member '%s' has other insertions than the "
                               "composite", mod->name, members[i]->name);
                mod->n_members = 0;
                mod_free(mod);
                return rc;
            }
        }
        if (mod_composite_alloc(mod)) {
            mod->n_members = 0;
            mod_free(mod);
            return pr_errorf(err, PR_ERR_NOMEM, "module: out of memory");
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
        mod->n_members = 0;
        mod_free(mod);
        if (err)
            *err = keep;
        return rc;
    }
    if (mod_list_add(m, mod)) {
        pr_model_remove_tensors(m, prefix);
        mod_undo_selection(mod);
        mod_reattach_others(m, mod);
        mod->n_members = 0;
        mod_free(mod);
        return pr_errorf(err, PR_ERR_NOMEM, "module: out of memory");
    }
    if (mod->n_members)
        adopt_members(m, mod);
    if (out)
        *out = mod;
    return PR_OK;
}

int pr_module_attach(pr_model *m, const pr_module_spec *spec, pr_module **out, pr_error *err)
{
    return mod_attach_impl(m, spec, NULL, 0, out, err);
}
