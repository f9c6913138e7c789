/* peftref core: filling an attached module from a saved one, and pr_module_load. */
#include "config.h"

#include <jansson.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "module_file.h"

/* ---- filling ------------------------------------------------------------------------------------------- */

/* The values of file tensor name as f32 (malloc'ed, numel of f[0]'s). */
static int src_get(const source *s, const char *name, const st_tensor **info, float **out, pr_error *err)
{
    *out = NULL;
    const st_tensor *t0 = st_find(s->f[0]->st, name);
    *info = t0;
    if (!t0)
        return PR_ERR_NOTFOUND;
    size_t n = (size_t)t0->numel;
    float *acc = malloc((n ? n : 1) * sizeof(float));
    float *tmp = s->n > 1 ? malloc((n ? n : 1) * sizeof(float)) : NULL;
    double *sum = s->n > 1 ? calloc(n ? n : 1, sizeof(double)) : NULL;
    if (!acc || (s->n > 1 && (!tmp || !sum))) {
        free(acc);
        free(tmp);
        free(sum);
        return pr_errorf(err, PR_ERR_NOMEM, "out of memory reading '%s'", name);
    }
    int rc = PR_OK;
    if (s->n == 1) {
        rc = st_to_f32(s->f[0]->st, t0, acc, err);
    } else {
        for (int k = 0; k < s->n && !rc; k++) {
            const st_tensor *tk = st_find(s->f[k]->st, name);
            if (!tk || tk->numel != t0->numel) {
                rc = pr_errorf(err, PR_ERR_INVALID, "%s: tensor '%s' is missing or has another shape", s->f[k]->path,
                               name);
                break;
            }
            if ((rc = st_to_f32(s->f[k]->st, tk, tmp, err)))
                break;
            for (size_t i = 0; i < n; i++)
                sum[i] += s->w[k] * (double)tmp[i];
        }
        for (size_t i = 0; i < n && !rc; i++)
            acc[i] = (float)sum[i];
    }
    free(tmp);
    free(sum);
    if (rc) {
        free(acc);
        return rc;
    }
    *out = acc;
    return PR_OK;
}

void mf_shape_text(int ndim, const int64_t *shape, char *buf, size_t len)
{
    st_format_shape(ndim, shape, buf, len);
}

static int fill_select(const source *s, pr_module *mod, pr_error *err)
{
    pr_module_file *f = s->f[0];
    pr_model *m = pr_module_model(mod);
    size_t plen = strlen(f->saved_name);
    for (int i = 0; i < st_count(f->st); i++) {
        const st_tensor *t = st_tensor_at(f->st, i);
        if (strncmp(t->name, f->saved_name, plen) || t->name[plen] != '/')
            return pr_errorf(err, PR_ERR_FORMAT, "%s: tensor '%s' does not belong to module '%s'", f->path, t->name,
                             f->saved_name);
        const char *base = t->name + plen + 1;
        const pr_tensor_info *ti = pr_model_find_tensor(m, base);
        if (!ti || ti->kind == PR_TENSOR_MODULE || !ti->data)
            return pr_errorf(err, PR_ERR_INVALID, "%s: tensor '%s' names no base tensor '%s' of this model", f->path,
                             t->name, base);
        int same = ti->ndim == t->ndim;
        for (int d = 0; same && d < t->ndim; d++)
            same = ti->shape[d] == t->shape[d];
        if (!same) {
            char a[64], b[64];
            mf_shape_text(t->ndim, t->shape, a, sizeof a);
            mf_shape_text(ti->ndim, ti->shape, b, sizeof b);
            return pr_errorf(err, PR_ERR_INVALID, "%s: tensor '%s' is %s but the model's '%s' is %s", f->path,
                             t->name, a, base, b);
        }
        const st_tensor *info;
        float *v;
        int rc = src_get(s, t->name, &info, &v, err);
        if (rc)
            return rc;
        memcpy(ti->data, v, (size_t)ti->numel * sizeof(float));
        free(v);
    }
    for (int i = 0; i < pr_module_n_selected(mod); i++) {
        char name[512];
        snprintf(name, sizeof name, "%s/%s", f->saved_name, pr_module_selected(mod, i));
        if (!st_find(f->st, name))
            return pr_errorf(err, PR_ERR_INVALID, "%s: module '%s' selects '%s', which the file does not hold", f->path,
                             pr_module_name(mod), pr_module_selected(mod, i));
    }
    return PR_OK;
}

int mf_fill_from(const source *s, pr_module *mod, pr_error *err)
{
    pr_module_file *f = s->f[0];
    const pr_technique *t = pr_module_technique(mod);
    if (t->integration == PR_INTEGRATE_SELECT)
        return fill_select(s, mod, err);
    const pr_model_config *cfg = pr_model_get_config(pr_module_model(mod));
    int nl = 0;
    int all = pr_module_layers(mod, &nl) == NULL;
    size_t mlen = strlen(pr_module_name(mod));
    int used = 0;
    char (*seen)[512] = calloc((size_t)st_count(f->st) + 1, sizeof *seen);
    if (!seen)
        return pr_errorf(err, PR_ERR_NOMEM, "out of memory");
    int n_seen = 0, rc = PR_OK;
    for (int i = 0; i < pr_module_n_params(mod) && !rc; i++) {
        pr_module_param p;
        pr_module_param_at(mod, i, &p);
        placement pl;
        char fname[512];
        if (f->peft) {
            if (!peft_place(t, 0, &p, cfg, all, &pl)) {
                rc = pr_errorf(err, PR_ERR_INVALID, "%s: parameter '%s' of module '%s' has no Hugging Face PEFT name, "
                               "but the file uses them", f->path, p.name, pr_module_name(mod));
                break;
            }
            snprintf(fname, sizeof fname, "%s", pl.name);
        } else {
            /* the table name with the saved module name in front */
            snprintf(fname, sizeof fname, "%s/%s", f->saved_name, p.name + mlen + 1);
            memset(&pl, 0, sizeof pl);
            pl.ndim = p.ndim;
            pl.nb = 1;
            pl.br = 1;
            pl.bc = p.numel;
            pl.shape[0] = 1;
            pl.shape[1] = p.numel;
        }
        const st_tensor *info;
        float *v = NULL;
        rc = src_get(s, fname, &info, &v, err);
        if (rc == PR_ERR_NOTFOUND && (p.flags & PR_PARAM_REGENERATE) && f->has_seed) {
            rc = PR_OK;   /* regenerated from the saved seed when the module was attached */
            continue;
        }
        if (rc == PR_ERR_NOTFOUND) {
            if (p.flags & PR_PARAM_TRAINING_ONLY)
                rc = pr_errorf(err, PR_ERR_INVALID, "%s: module '%s': training-only parameter '%s' was folded away "
                               "when the file was saved; load it frozen (its folded form) or as new", f->path,
                               pr_module_name(mod), p.param);
            else
                rc = pr_errorf(err, PR_ERR_INVALID, "%s: no tensor '%s' for parameter '%s' of module '%s'", f->path,
                               fname, p.name, pr_module_name(mod));
            break;
        }
        if (rc)
            break;
        int same;
        if (f->peft) {
            same = info->ndim == pl.ndim;
            for (int d = 0; same && d < pl.ndim; d++)
                same = info->shape[d] == pl.full[d];
        } else {
            same = info->ndim == p.ndim;
            for (int d = 0; same && d < p.ndim; d++)
                same = info->shape[d] == p.shape[d];
        }
        if (!same) {
            char a[64], b[64];
            mf_shape_text(info->ndim, info->shape, a, sizeof a);
            if (f->peft)
                mf_shape_text(pl.ndim, pl.full, b, sizeof b);
            else
                mf_shape_text(p.ndim, p.shape, b, sizeof b);
            rc = pr_errorf(err, PR_ERR_INVALID, "%s: tensor '%s' is %s but module '%s' (as planned) needs %s", f->path,
                           fname, a, pr_module_name(mod), b);
            free(v);
            break;
        }
        if (f->peft) {
            peft_place_values(&pl, v, p.data, 0);
        } else {
            memcpy(p.data, v, (size_t)p.numel * sizeof(float));
        }
        free(v);
        int known = 0;
        for (int k = 0; k < n_seen && !known; k++)
            known = !strcmp(seen[k], fname);
        if (!known && n_seen < st_count(f->st))
            snprintf(seen[n_seen++], sizeof seen[0], "%s", fname);
        used++;
    }
    if (!rc && n_seen != st_count(f->st)) {
        for (int i = 0; i < st_count(f->st); i++) {
            const char *nm = st_tensor_at(f->st, i)->name;
            int known = 0;
            for (int k = 0; k < n_seen && !known; k++)
                known = !strcmp(seen[k], nm);
            if (!known) {
                rc = pr_errorf(err, PR_ERR_INVALID, "%s: tensor '%s' matches no parameter of module '%s' as planned "
                               "(another technique version, sites or layers?)", f->path, nm, pr_module_name(mod));
                break;
            }
        }
    }
    free(seen);
    (void)used;
    return rc;
}

int pr_module_file_fill(const pr_module_file *f, pr_module *mod, pr_error *err)
{
    pr_module_file *ff = (pr_module_file *)f;
    double w = 1.0;
    source s = { &ff, &w, 1 };
    return mf_fill_from(&s, mod, err);
}

/* ---- load ---------------------------------------------------------------------------------------------- */

int pr_module_load(pr_model *m, const char *path, const pr_registry *reg, const pr_module_load_options *opt,
                   pr_module **out, pr_error *err)
{
    if (out)
        *out = NULL;
    pr_module_file *f = NULL;
    int rc = pr_module_file_open_ex(path, reg, pr_model_get_config(m), 0, &f, err);
    if (rc)
        return rc;
    char fp[64];
    if (opt && opt->base_fingerprint)
        snprintf(fp, sizeof fp, "%s", opt->base_fingerprint);
    else
        pr_model_fingerprint(m, fp, sizeof fp);
    if (!(opt && opt->force) && (rc = pr_module_file_check_base(f, fp, err))) {
        pr_module_file_close(f);
        return rc;
    }
    pr_module_spec spec;
    pr_module_file_spec(f, &spec);
    if (opt && opt->name)
        spec.name = opt->name;
    spec.trainable = opt ? opt->trainable : 0;
    pr_module *mod = NULL;
    pr_error e = { 0 };
    rc = pr_module_attach(m, &spec, &mod, &e);
    if (rc) {
        pr_errorf(err, (pr_status)rc, "%s: %s", path, e.msg);
    } else if ((rc = pr_module_file_fill(f, mod, err))) {
        /* leave nothing half-loaded behind */
        pr_module_detach(mod);
        mod = NULL;
    }
    pr_module_file_close(f);
    if (out)
        *out = mod;
    return rc;
}
