/* peftref core: AdapterFusion as the public API sees it: pr_module_fuse,
 * its plan, the fusion technique, and saving and loading a fusion file. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "module_internal.h"
#include "names.h"
#include "model_internal.h"
#include "safetensors.h"

int pr_module_n_fused(const pr_module *mod)
{
    return mod ? mod->n_kids : 0;
}

pr_module *pr_module_fused(const pr_module *mod, int i)
{
    return mod && i >= 0 && i < mod->n_kids ? mod->kids[i] : NULL;
}

pr_module *pr_module_fused_by(const pr_module *mod)
{
    return mod ? mod->fused_by : NULL;
}

/* "a, b" of a layer list, or "all" */
static void layer_text(const pr_module *mod, char *buf, size_t len)
{
    size_t o = 0;
    buf[0] = '\0';
    if (mod->layers_all) {
        snprintf(buf, len, "all");
        return;
    }
    for (int i = 0; i < mod->n_layers; i++) {
        int w = snprintf(buf + o, len - o, "%s%d", i ? ", " : "", mod->layers[i]);
        if (w < 0 || (size_t)w >= len - o)
            break;
        o += (size_t)w;
    }
}

int pr_module_fuse(pr_model *m, const pr_fusion_spec *spec, pr_module **out, pr_error *err)
{
    if (out)
        *out = NULL;
    if (!m || !spec || (spec->n_modules > 0 && !spec->modules))
        return pr_errorf(err, PR_ERR_INVALID, "fusion: NULL model, spec or module list");
    const char *nm = spec->name ? spec->name : "fusion";
    if (spec->n_modules < 2)
        return pr_errorf(err, PR_ERR_INVALID, "fusion '%s': fuses at least two modules (got %d)", nm,
                         spec->n_modules);
    const model_modules *e = model_modules_of(m);
    pr_module *const *kids = spec->modules;
    for (int i = 0; i < spec->n_modules; i++) {
        const pr_module *k = kids[i];
        if (!k)
            return pr_errorf(err, PR_ERR_INVALID, "fusion '%s': module %d is NULL", nm, i);
        int found = 0;
        for (int j = 0; e && j < e->n && !found; j++)
            found = e->mods[j] == k;
        if (k->fused_by)
            return pr_errorf(err, PR_ERR_INVALID, "fusion '%s': module '%s' is fused already, by '%s'", nm,
                             mod_name(k), mod_name(k->fused_by));
        if (!found)
            return pr_errorf(err, PR_ERR_INVALID, "fusion '%s': module '%s' is not attached to this model", nm,
                             mod_name(k));
        for (int j = 0; j < i; j++)
            if (kids[j] == k)
                return pr_errorf(err, PR_ERR_INVALID, "fusion '%s': module '%s' is listed twice", nm, mod_name(k));
        if (k->n_kids)
            return pr_errorf(err, PR_ERR_INVALID, "fusion '%s': module '%s' is a fusion itself; fusions do not nest",
                             nm, mod_name(k));
        if (k->trainable)
            return pr_errorf(err, PR_ERR_INVALID, "fusion '%s': module '%s' is trainable; AdapterFusion combines "
                             "frozen modules (load them with mode: frozen, or attach them with trainable 0)", nm,
                             mod_name(k));
        if (!mod_form(k)->additive)
            return pr_errorf(err, PR_ERR_INVALID, "fusion '%s': module '%s' (technique %s) integrates by %s; fusion "
                             "combines modules that add to the site output (direct, scaled or gated addition)", nm,
                             mod_name(k), k->t.name, mod_form(k)->name);
        if (k->merged)
            return pr_errorf(err, PR_ERR_INVALID, "fusion '%s': module '%s' is merged; unmerge it first", nm,
                             mod_name(k));
        if (i == 0)
            continue;
        const pr_module *a = kids[0];
        char x[256], y[256];
        if (k->sites != a->sites) {
            names_site_mask(a->sites, "none", x, sizeof x);
            names_site_mask(k->sites, "none", y, sizeof y);
            return pr_errorf(err, PR_ERR_INVALID, "fusion '%s': modules '%s' and '%s' attach at different sites (%s; "
                             "%s); fused modules must share their sites and layers", nm, mod_name(a), mod_name(k),
                             x, y);
        }
        int same = k->n_layers == a->n_layers;
        for (int l = 0; same && l < k->n_layers; l++)
            same = k->layers[l] == a->layers[l];
        if (!same) {
            layer_text(a, x, sizeof x);
            layer_text(k, y, sizeof y);
            return pr_errorf(err, PR_ERR_INVALID, "fusion '%s': modules '%s' and '%s' use different layers (%s; %s); "
                             "fused modules must share their sites and layers", nm, mod_name(a), mod_name(k), x, y);
        }
    }
    const pr_module *a = kids[0];
    pr_module_spec fs;
    memset(&fs, 0, sizeof fs);
    fs.technique = &mod_fusion_technique;
    fs.name = nm;
    fs.sites = a->sites;
    fs.layers = a->layers_all ? NULL : a->layers;
    fs.n_layers = a->layers_all ? 0 : a->n_layers;
    fs.trainable = spec->trainable;
    fs.seed = spec->seed;
    return mod_attach_impl(m, &fs, kids, spec->n_modules, out, err);
}

int pr_fusion_plan_for(const pr_model_config *cfg, const pr_module_spec *fused, int trainable, pr_module_plan *out,
                       pr_error *err)
{
    if (!cfg || !fused || !out)
        return pr_errorf(err, PR_ERR_INVALID, "fusion plan: NULL config, spec or output");
    memset(out, 0, sizeof *out);
    pr_model *m = NULL;
    int rc = model_create_empty(cfg, &m, err);
    if (rc)
        return rc;
    pr_module *k = NULL;
    rc = mod_resolve(m, fused, &k, err);
    if (rc == PR_OK && !mod_form(k)->additive)
        rc = pr_errorf(err, PR_ERR_INVALID, "fusion: technique '%s' integrates by %s; fusion combines modules that "
                       "add to the site output (direct, scaled or gated addition)", k->t.name,
                       mod_form(k)->name);
    if (rc == PR_OK) {
        pr_module_spec fs;
        memset(&fs, 0, sizeof fs);
        fs.technique = &mod_fusion_technique;
        fs.name = "fusion";
        fs.sites = k->sites;
        fs.layers = k->layers_all ? NULL : k->layers;
        fs.n_layers = k->layers_all ? 0 : k->n_layers;
        fs.trainable = trainable;
        rc = pr_module_plan_for(cfg, &fs, out, err);
    }
    mod_free(k);
    pr_model_free(m);
    return rc;
}

const pr_technique *pr_fusion_technique(void)
{
    return &mod_fusion_technique;
}

/* A fusion file: every parameter copy under its name without the
 * "<module>/" prefix ("h.0.ffn_out.query"), so a fusion loads under any
 * name. */
int pr_fusion_save(const pr_module *mod, const char *path, pr_error *err)
{
    if (!mod || !path)
        return pr_errorf(err, PR_ERR_INVALID, "fusion save: NULL module or path");
    if (!mod->n_kids)
        return pr_errorf(err, PR_ERR_INVALID, "module '%s' is not a fusion module", mod_name(mod));
    st_entry *e = calloc((size_t)mod->n_copies, sizeof *e);
    if (!e)
        return pr_errorf(err, PR_ERR_NOMEM, "%s: out of memory", path);
    size_t skip = strlen(mod_name(mod)) + 1;
    for (int c = 0; c < mod->n_copies; c++) {
        const param_copy *pc = &mod->copies[c];
        e[c].name = pc->name + skip;
        e[c].ndim = pc->ndim;
        memcpy(e[c].shape, pc->shape, sizeof pc->shape);
        e[c].data = mod->params + pc->off;
        e[c].dtype = ST_F32;
    }
    char n[32];
    snprintf(n, sizeof n, "%d", mod->n_kids);
    st_kv meta[] = { { "format", "peftref-fusion" }, { "technique", mod_fusion_technique.name },
                     { "technique_version", mod_fusion_technique.version }, { "fused_modules", n } };
    int rc = st_write(path, e, mod->n_copies, meta, 4, err);
    free(e);
    return rc;
}

int pr_fusion_fill(pr_module *mod, const char *path, pr_error *err)
{
    if (!mod || !path)
        return pr_errorf(err, PR_ERR_INVALID, "fusion load: NULL module or path");
    if (!mod->n_kids)
        return pr_errorf(err, PR_ERR_INVALID, "module '%s' is not a fusion module", mod_name(mod));
    st_file *f = NULL;
    int rc = st_open(path, 0, &f, err);
    if (rc)
        return rc;
    const char *fmt = st_metadata(f, "format");
    if (!fmt || strcmp(fmt, "peftref-fusion") != 0) {
        st_close(f);
        return pr_errorf(err, PR_ERR_INVALID, "%s: not a fusion file (metadata format is '%s', not 'peftref-fusion')",
                         path, fmt ? fmt : "missing");
    }
    size_t skip = strlen(mod_name(mod)) + 1;
    for (int c = 0; c < mod->n_copies && !rc; c++) {
        const param_copy *pc = &mod->copies[c];
        const st_tensor *t = st_find(f, pc->name + skip);
        char want[64], got[64];
        if (!t) {
            rc = pr_errorf(err, PR_ERR_INVALID, "%s: no tensor '%s' for fusion '%s' (fused at other sites or layers?)",
                           path, pc->name + skip, mod_name(mod));
            break;
        }
        int same = t->ndim == pc->ndim;
        for (int d = 0; same && d < pc->ndim; d++)
            same = t->shape[d] == pc->shape[d];
        if (!same) {
            st_format_shape(pc->ndim, pc->shape, want, sizeof want);
            st_format_shape(t->ndim, t->shape, got, sizeof got);
            rc = pr_errorf(err, PR_ERR_INVALID, "%s: tensor '%s' has shape %s; fusion '%s' needs %s", path,
                           pc->name + skip, got, mod_name(mod), want);
            break;
        }
        rc = st_to_f32(f, t, mod->params + pc->off, err);
    }
    st_close(f);
    return rc;
}
