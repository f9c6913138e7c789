/* peftref core: what saving a module reads (core/io/module_file.c): layers,
 * per-site options, selected tensors, parameter copies, and fold(). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "module_internal.h"

/* ---- what saving a module reads (core/io/module_file.c) ------------------------------------------------ */

int pr_module_is_trainable(const pr_module *mod)
{
    return mod ? mod->trainable : 0;
}

const int *pr_module_layers(const pr_module *mod, int *n)
{
    if (n)
        *n = mod ? mod->n_layers : 0;
    return mod && !mod->layers_all ? mod->layers : NULL;
}

const pr_option_value *pr_module_site_option(const pr_module *mod, int site, int i)
{
    if (!mod || site < 0 || site >= PR_SITE_COUNT || i < 0 || (uint32_t)i >= mod->t.n_options)
        return NULL;
    return mod->site_opts + (size_t)site * mod->t.n_options + i;
}

int pr_module_n_selected(const pr_module *mod)
{
    return mod ? mod->n_selected : 0;
}

const char *pr_module_selected(const pr_module *mod, int i)
{
    return mod && i >= 0 && i < mod->n_selected ? mod->selected[i] : NULL;
}

int pr_module_n_params(const pr_module *mod)
{
    return mod ? mod->n_copies : 0;
}

static void param_info(const pr_module *mod, const param_copy *pc, const char *pname, uint32_t flags, int scope,
                       float *data, pr_module_param *out)
{
    memset(out, 0, sizeof *out);
    out->name = pc->name;
    out->param = pname;
    out->flags = flags;
    out->scope = scope;
    out->site = pc->key_site >= 0 ? pc->key_site : mod->ins[pc->first_ins].site;
    out->layer = pc->key_layer != INT32_MIN ? pc->key_layer : -1;
    out->ndim = pc->ndim;
    memcpy(out->shape, pc->shape, sizeof out->shape);
    out->numel = pc->numel;
    out->data = data;
    out->trained = pc->trained;
}

int pr_module_param_at(const pr_module *mod, int i, pr_module_param *out)
{
    if (!mod || !out || i < 0 || i >= mod->n_copies)
        return PR_ERR_INVALID;
    const param_copy *pc = &mod->copies[i];
    if (pc->decl < 0)
        param_info(mod, pc, "gate", PR_PARAM_NO_DECAY, PR_SCOPE_INSERTION, mod->params + pc->off, out);
    else
        param_info(mod, pc, mod->pd[pc->decl].name, mod->pd[pc->decl].flags, mod->pd[pc->decl].scope,
                   mod->params + pc->off, out);
    return PR_OK;
}

/* fold(): the fold_params copies are grouped by scope exactly as
 * parameters are (resolve_params), each filled by the fold() call of the
 * first insertion that uses it, then handed to fn. */
int pr_module_fold(pr_module *mod, pr_module_param_fn fn, void *arg, pr_error *err)
{
    if (!mod || !fn)
        return pr_errorf(err, PR_ERR_INVALID, "fold: NULL module or callback");
    uint32_t nf = mod->t.n_fold_params;
    if (!nf)
        return PR_OK;
    if (!mod->t.fold)
        return pr_errorf(err, PR_ERR_UNSUPPORTED, "module '%s' (technique %s) declares fold_params but no fold()",
                         mod_name(mod), mod->t.name);
    pr_param_decl *fd = calloc(nf, sizeof *fd);
    param_copy *cp = calloc((size_t)mod->n_ins * nf + 1, sizeof *cp);
    int *which = calloc((size_t)mod->n_ins * nf + 1, sizeof *which);
    pr_tensor *outs = calloc(nf, sizeof *outs);
    pr_tensor **outp = calloc(nf, sizeof *outp);
    float **data = calloc((size_t)mod->n_ins * nf + 1, sizeof *data);
    int n = 0, rc = PR_OK;
    if (!fd || !cp || !which || !outs || !outp || !data) {
        rc = pr_errorf(err, PR_ERR_NOMEM, "module '%s': out of memory for folding", mod_name(mod));
        goto done;
    }
    for (uint32_t i = 0; i < nf; i++)
        mod_read_elem(&fd[i], sizeof fd[i], mod->t.fold_params, i);
    expr_var v[MAX_VARS];
    char e[256];
    for (int k = 0; k < mod->n_ins && !rc; k++) {
        insertion *in = &mod->ins[k];
        int nv = mod_model_vars(mod, &in->dims, in->opts, v);
        for (uint32_t i = 0; i < nf; i++) {
            const pr_param_decl *p = &fd[i];
            int64_t dims[4];
            int nd = 0;
            if (!p->name || !p->shape || expr_eval_shape(p->shape, v, nv, dims, &nd, e, sizeof e)) {
                rc = pr_errorf(err, PR_ERR_INVALID, "module '%s': fold parameter %u shape at %s: %s", mod_name(mod), i,
                               in->where, p->shape ? e : "missing");
                break;
            }
            int kl = (p->scope == PR_SCOPE_INSERTION || p->scope == PR_SCOPE_LAYER) ? in->layer : INT32_MIN;
            int ks = (p->scope == PR_SCOPE_INSERTION || p->scope == PR_SCOPE_SITE) ? in->site : -1;
            int found = -1;
            for (int c = 0; c < n && found < 0; c++)
                if (cp[c].decl == (int)i && cp[c].key_layer == kl && cp[c].key_site == ks)
                    found = c;
            if (found < 0) {
                param_copy *pc = &cp[n];
                pc->decl = (int)i;
                pc->key_layer = kl;
                pc->key_site = ks;
                pc->ndim = nd;
                memcpy(pc->shape, dims, sizeof dims);
                pc->numel = mod_shape_numel(dims, nd);
                pc->first_ins = k;
                pc->name = mod_copy_name(mod, p->name, p->scope, in->site, in->layer);
                data[n] = mod_alloc_floats((size_t)pc->numel);
                if (!pc->name || !data[n]) {
                    rc = pr_errorf(err, PR_ERR_NOMEM, "module '%s': out of memory for folding", mod_name(mod));
                    n++;
                    break;
                }
                found = n++;
            }
            which[(size_t)k * nf + i] = found;
        }
    }
    for (int k = 0; k < mod->n_ins && !rc; k++) {
        insertion *in = &mod->ins[k];
        int owns = 0;
        for (uint32_t i = 0; i < nf; i++) {
            int c = which[(size_t)k * nf + i];
            owns |= cp[c].first_ins == k;
            outs[i] = mod_view(data[c], cp[c].ndim, cp[c].shape);
        }
        if (!owns)
            continue;
        pr_ctx c;
        if ((rc = mod_lend_scratch(in, err)))
            break;
        mod_ctx_init(in, &c, 0, 0, 0, UINT64_MAX - 4);
        for (uint32_t i = 0; i < nf; i++)
            outp[i] = &outs[i];
        c.out_params = outp;
        c.n_out_params = nf;
        rc = mod_call(mod, in, mod->t.fold, "fold", &c, err);
    }
    for (int c = 0; c < n && !rc; c++) {
        pr_module_param info;
        param_info(mod, &cp[c], fd[cp[c].decl].name, fd[cp[c].decl].flags, fd[cp[c].decl].scope, data[c], &info);
        info.trained = 0;
        rc = fn(arg, &info, err);
    }
done:
    for (int c = 0; c < n; c++) {
        free(cp[c].name);
        free(data[c]);
    }
    free(fd);
    free(cp);
    free(which);
    free(outs);
    free(outp);
    free(data);
    return rc;
}

