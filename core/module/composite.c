/* peftref core: composite modules (pr_technique.composite; plugin.h, the
 * compose_forward/compose_backward row of the call table).  A composite
 * module attaches over members, modules already attached at the same
 * sites and layers; its hook runs their forward and backward itself and
 * hands their contributions to the technique's compose callbacks.  The
 * host's part is generic and lives here: the members list, the calling
 * order, the gradient routing, the plan, and saving the composite's own
 * parameters.  What a composite computes is its plugin's. */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "module_internal.h"
#include "names.h"
#include "model_internal.h"
#include "safetensors.h"

#define COMPOSITE_FORMAT "peftref-composite"

int pr_module_n_members(const pr_module *mod)
{
    return mod ? mod->n_members : 0;
}

pr_module *pr_module_member(const pr_module *mod, int i)
{
    return mod && i >= 0 && i < mod->n_members ? mod->members[i] : NULL;
}

pr_module *pr_module_composed_by(const pr_module *mod)
{
    return mod ? mod->composed_by : NULL;
}

/* 1 when t sets composite within its struct_size. */
static int is_composite(const pr_technique *t)
{
    return t && t->struct_size >= offsetof(pr_technique, composite) + sizeof t->composite && t->composite;
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

/* Why member i cannot join (0: it can), checked against the members
 * before it. */
static int check_member(const pr_model *m, const char *nm, pr_module *const *mem, int i, pr_error *err)
{
    const model_modules *e = model_modules_of(m);
    const pr_module *k = mem[i];
    if (!k)
        return pr_errorf(err, PR_ERR_INVALID, "composite '%s': member %d is NULL", nm, i);
    int found = 0;
    for (int j = 0; e && j < e->n && !found; j++)
        found = e->mods[j] == k;
    if (k->composed_by)
        return pr_errorf(err, PR_ERR_INVALID, "composite '%s': module '%s' is a member already, of '%s'", nm,
                         mod_name(k), mod_name(k->composed_by));
    if (!found)
        return pr_errorf(err, PR_ERR_INVALID, "composite '%s': module '%s' is not attached to this model", nm,
                         mod_name(k));
    for (int j = 0; j < i; j++)
        if (mem[j] == k)
            return pr_errorf(err, PR_ERR_INVALID, "composite '%s': module '%s' is listed twice", nm, mod_name(k));
    if (k->n_members)
        return pr_errorf(err, PR_ERR_INVALID, "composite '%s': module '%s' is a composite itself; composites do "
                         "not nest", nm, mod_name(k));
    if (k->trainable)
        return pr_errorf(err, PR_ERR_INVALID, "composite '%s': module '%s' is trainable; a composite combines "
                         "frozen modules (load them with mode: frozen, or attach them with trainable 0)", nm,
                         mod_name(k));
    if (!mod_form(k)->additive)
        return pr_errorf(err, PR_ERR_INVALID, "composite '%s': module '%s' (technique %s) integrates by %s; a "
                         "composite combines modules that add to the site output (direct, scaled or gated "
                         "addition)", nm, mod_name(k), k->t.name, mod_form(k)->name);
    if (k->merged)
        return pr_errorf(err, PR_ERR_INVALID, "composite '%s': module '%s' is merged; unmerge it first", nm,
                         mod_name(k));
    if (i == 0)
        return PR_OK;
    const pr_module *a = mem[0];
    char x[256], y[256];
    if (k->sites != a->sites) {
        names_site_mask(a->sites, "none", x, sizeof x);
        names_site_mask(k->sites, "none", y, sizeof y);
        return pr_errorf(err, PR_ERR_INVALID, "composite '%s': modules '%s' and '%s' attach at different sites "
                         "(%s; %s); members must share their sites and layers", nm, mod_name(a), mod_name(k), x, y);
    }
    int same = k->n_layers == a->n_layers;
    for (int l = 0; same && l < k->n_layers; l++)
        same = k->layers[l] == a->layers[l];
    if (!same) {
        layer_text(a, x, sizeof x);
        layer_text(k, y, sizeof y);
        return pr_errorf(err, PR_ERR_INVALID, "composite '%s': modules '%s' and '%s' use different layers (%s; "
                         "%s); members must share their sites and layers", nm, mod_name(a), mod_name(k), x, y);
    }
    return PR_OK;
}

int pr_module_compose(pr_model *m, const pr_module_spec *spec, pr_module *const *members, int n_members,
                      pr_module **out, pr_error *err)
{
    if (out)
        *out = NULL;
    if (!m || !spec || (n_members > 0 && !members))
        return pr_errorf(err, PR_ERR_INVALID, "composite: NULL model, spec or member list");
    if (!spec->technique)
        return pr_errorf(err, PR_ERR_INVALID, "composite '%s': no technique", spec->name ? spec->name : "?");
    const char *nm = spec->name ? spec->name : spec->technique->name;
    if (!is_composite(spec->technique))
        return pr_errorf(err, PR_ERR_INVALID, "composite '%s': technique %s is not composite; it cannot combine "
                         "other modules", nm, spec->technique->name);
    if (n_members < 2)
        return pr_errorf(err, PR_ERR_INVALID, "composite '%s' (technique %s): combines at least two modules (got "
                         "%d)", nm, spec->technique->name, n_members);
    int rc;
    for (int i = 0; i < n_members; i++)
        if ((rc = check_member(m, nm, members, i, err)))
            return rc;
    const pr_module *a = members[0];
    pr_module_spec fs = *spec;
    fs.name = nm;
    fs.sites = a->sites;
    fs.layers = a->layers_all ? NULL : a->layers;
    fs.n_layers = a->layers_all ? 0 : a->n_layers;
    return mod_attach_impl(m, &fs, members, n_members, out, err);
}

int pr_composite_plan_for(const pr_model_config *cfg, const pr_module_spec *composite,
                          const pr_module_spec *member, pr_module_plan *out, pr_error *err)
{
    if (!cfg || !composite || !member || !out)
        return pr_errorf(err, PR_ERR_INVALID, "composite plan: NULL config, spec or output");
    memset(out, 0, sizeof *out);
    if (!is_composite(composite->technique))
        return pr_errorf(err, PR_ERR_INVALID, "composite plan: technique %s is not composite",
                         composite->technique ? composite->technique->name : "(none)");
    pr_model *m = NULL;
    int rc = model_create_empty(cfg, &m, err);
    if (rc)
        return rc;
    pr_module *k = NULL;
    rc = mod_resolve(m, member, &k, err);
    if (rc == PR_OK && !mod_form(k)->additive)
        rc = pr_errorf(err, PR_ERR_INVALID, "%s: technique '%s' integrates by %s; a composite combines modules "
                       "that add to the site output (direct, scaled or gated addition)", composite->technique->name,
                       k->t.name, mod_form(k)->name);
    if (rc == PR_OK) {
        pr_module_spec fs = *composite;
        fs.sites = k->sites;
        fs.layers = k->layers_all ? NULL : k->layers;
        fs.n_layers = k->layers_all ? 0 : k->n_layers;
        rc = pr_module_plan_for(cfg, &fs, out, err);
    }
    mod_free(k);
    pr_model_free(m);
    return rc;
}

/* ---- saving the composite's own parameters -------------------------------------------------------- */

/* Every parameter copy under its name without the "<module>/" prefix
 * ("h.0.ffn_out.query"), so a composite loads under any name. */
int pr_composite_save(const pr_module *mod, const char *path, pr_error *err)
{
    if (!mod || !path)
        return pr_errorf(err, PR_ERR_INVALID, "composite save: NULL module or path");
    if (!mod->n_members)
        return pr_errorf(err, PR_ERR_INVALID, "module '%s' is not a composite module", mod_name(mod));
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
    snprintf(n, sizeof n, "%d", mod->n_members);
    st_kv meta[] = { { "format", COMPOSITE_FORMAT }, { "technique", mod->t.name },
                     { "technique_version", mod->t.version ? mod->t.version : "" }, { "members", n } };
    int rc = st_write(path, e, mod->n_copies, meta, 4, err);
    free(e);
    return rc;
}

/* The file's format: "peftref-composite", or the technique-specific
 * "peftref-*" word of files written before composites were generic; its
 * technique metadata must name the module's technique either way. */
static int composite_format_ok(const char *fmt)
{
    return fmt && strncmp(fmt, "peftref-", 8) == 0 && strcmp(fmt, "peftref-module") != 0;
}

int pr_composite_fill(pr_module *mod, const char *path, pr_error *err)
{
    if (!mod || !path)
        return pr_errorf(err, PR_ERR_INVALID, "composite load: NULL module or path");
    if (!mod->n_members)
        return pr_errorf(err, PR_ERR_INVALID, "module '%s' is not a composite module", mod_name(mod));
    st_file *f = NULL;
    int rc = st_open(path, 0, &f, err);
    if (rc)
        return rc;
    const char *fmt = st_metadata(f, "format"), *tech = st_metadata(f, "technique");
    if (!composite_format_ok(fmt)) {
        st_close(f);
        return pr_errorf(err, PR_ERR_INVALID, "%s: not a composite module file (metadata format is '%s', not '%s')",
                         path, fmt ? fmt : "missing", COMPOSITE_FORMAT);
    }
    if (!tech || strcmp(tech, mod->t.name) != 0) {
        st_close(f);
        return pr_errorf(err, PR_ERR_INVALID, "%s: the file holds technique '%s'; module '%s' is %s", path,
                         tech ? tech : "(missing)", mod_name(mod), mod->t.name);
    }
    size_t skip = strlen(mod_name(mod)) + 1;
    for (int c = 0; c < mod->n_copies && !rc; c++) {
        const param_copy *pc = &mod->copies[c];
        const st_tensor *t = st_find(f, pc->name + skip);
        char want[64], got[64];
        if (!t) {
            rc = pr_errorf(err, PR_ERR_INVALID, "%s: no tensor '%s' for composite '%s' (saved at other sites or "
                           "layers?)", path, pc->name + skip, mod_name(mod));
            break;
        }
        int same = t->ndim == pc->ndim;
        for (int d = 0; same && d < pc->ndim; d++)
            same = t->shape[d] == pc->shape[d];
        if (!same) {
            st_format_shape(pc->ndim, pc->shape, want, sizeof want);
            st_format_shape(t->ndim, t->shape, got, sizeof got);
            rc = pr_errorf(err, PR_ERR_INVALID, "%s: tensor '%s' has shape %s; composite '%s' needs %s", path,
                           pc->name + skip, got, mod_name(mod), want);
            break;
        }
        rc = st_to_f32(f, t, mod->params + pc->off, err);
    }
    st_close(f);
    return rc;
}

/* ---- the members at one insertion ----------------------------------------------------------------- */

int mod_composite_alloc(pr_module *mod)
{
    size_t n = (size_t)mod->n_members;
    for (int k = 0; k < mod->n_ins; k++) {
        insertion *in = &mod->ins[k];
        in->cm_t = calloc(2 * n + 2, sizeof *in->cm_t);
        in->cm_p = calloc(2 * n, sizeof *in->cm_p);
        if (!in->cm_t || !in->cm_p)
            return -1;
    }
    return 0;
}

size_t mod_composite_floats(const insertion *in, size_t rows)
{
    return 2 * (size_t)in->mod->n_members * mod_round_up(rows * (size_t)in->dims.d_out);
}

int mod_composite_reserve(insertion *in, int B, int T, pr_error *err)
{
    pr_module *mod = in->mod;
    for (int i = 0; i < mod->n_members; i++) {
        int rc = mod_reserve_insertion(&mod->members[i]->ins[in->index], B, T, err);
        if (rc)
            return rc;
    }
    return PR_OK;
}

/* The context of member insertion mi's call: its input is the site input
 * x (parallel) or y_old, the site output as the composite received it
 * (sequential). */
static int member_ctx(const insertion *mi, const pr_site_io *io, const float *y_old, uint64_t step, pr_ctx *c,
                      pr_error *err)
{
    float *a, *b;
    int rc = mod_prepare_views((insertion *)mi, io->B, io->T, &a, &b, err);
    if (rc)
        return rc;
    mod_ctx_init(mi, c, io->B, io->T, io->training, step);
    if (mi->mod->t.insertion == PR_INSERT_SEQUENTIAL)
        CT(c, in) = mod_view2(y_old, io->rows, io->y_dim, io->y_dim);
    else
        CT(c, in) = mod_view2(io->x, io->rows, io->x_dim, io->x_ld);
    return PR_OK;
}

/* h_i = k_i f_i(input_i) (k_i the member's scale and gate) for every
 * member, then compose_forward(members = h, in = x, site_y = y_old) into
 * c->out, which add_forward integrates. */
int mod_composite_forward(insertion *in, const pr_site_io *io, pr_ctx *c, pr_error *err)
{
    pr_module *mod = in->mod;
    int n = mod->n_members, rows = io->rows, d = io->y_dim, rc;
    size_t rd = (size_t)rows * d, stride = mod_round_up(rd);
    pr_tensor *ht = in->cm_t, *yt = in->cm_t + 2 * n;
    for (int i = 0; i < n; i++) {
        insertion *mi = &mod->members[i]->ins[in->index];
        float *h = in->mh + (size_t)i * stride;
        pr_ctx mc;
        if ((rc = member_ctx(mi, io, in->y_old, mod_forward_call(mi), &mc, err)))
            return rc;
        memset(h, 0, rd * sizeof(float));
        CT(&mc, out) = mod_view2(h, rows, d, d);
        if ((rc = mod_call(mi->mod, mi, mi->mod->t.forward, "forward", &mc, err)))
            return rc;
        float k = mod_add_coefficient(mi);
        if (k != 1.0f)
            for (size_t j = 0; j < rd; j++)
                h[j] *= k;
        ht[i] = mod_view2(h, rows, d, d);
        in->cm_p[i] = &ht[i];
    }
    *yt = mod_view2(in->y_old, rows, d, d);
    c->members = in->cm_p;
    c->n_members = (uint32_t)n;
    c->site_y = yt;
    return mod_call(mod, in, mod->t.compose_forward, "compose_forward", c, err);
}

/* compose_backward (d_out given; d_members[i] and d_site_y zeroed, to
 * accumulate), then each member's backward with k_i d_members[i]: its
 * input gradient goes to dx (parallel) or site_dy (sequential), which
 * add_backward then adds to dy. */
int mod_composite_backward(insertion *in, const pr_site_io *io, pr_ctx *c, float *dx, int dx_ld, float *site_dy,
                           pr_error *err)
{
    pr_module *mod = in->mod;
    int n = mod->n_members, rows = io->rows, d = io->y_dim, rc;
    size_t rd = (size_t)rows * d, stride = mod_round_up(rd);
    pr_tensor *ht = in->cm_t, *dht = in->cm_t + n, *yt = in->cm_t + 2 * n, *dyt = yt + 1;
    for (int i = 0; i < n; i++) {
        float *dh = in->mdh + (size_t)i * stride;
        memset(dh, 0, rd * sizeof(float));
        ht[i] = mod_view2(in->mh + (size_t)i * stride, rows, d, d);
        dht[i] = mod_view2(dh, rows, d, d);
        in->cm_p[i] = &ht[i];
        in->cm_p[n + i] = &dht[i];
    }
    *yt = mod_view2(in->y_old, rows, d, d);
    *dyt = mod_view2(site_dy, rows, d, d);
    c->members = in->cm_p;
    c->d_members = in->cm_p + n;
    c->n_members = (uint32_t)n;
    c->site_y = yt;
    c->d_site_y = dyt;
    if ((rc = mod_call(mod, in, mod->t.compose_backward, "compose_backward", c, err)))
        return rc;
    for (int i = 0; i < n; i++) {
        insertion *mi = &mod->members[i]->ins[in->index];
        float *dh = in->mdh + (size_t)i * stride, k = mod_add_coefficient(mi);
        if (k != 1.0f)
            for (size_t j = 0; j < rd; j++)
                dh[j] *= k;
        pr_ctx mc;
        if ((rc = member_ctx(mi, io, in->y_old, mi->n_fwd ? mi->n_fwd - 1 : 0, &mc, err)))
            return rc;
        CT(&mc, d_out) = mod_view2(dh, rows, d, d);
        if (mi->mod->t.insertion == PR_INSERT_SEQUENTIAL)
            CT(&mc, d_in) = mod_view2(site_dy, rows, d, d);
        else
            CT(&mc, d_in) = mod_view2(dx, rows, io->x_dim, dx_ld);
        if ((rc = mod_call(mi->mod, mi, mi->mod->t.backward, "backward", &mc, err)))
            return rc;
    }
    return PR_OK;
}
