/* peftref core: resolving a module spec (stage 1 of attach): expression
 * variables, options, sites, layers, insertions, parameter copies and
 * selection; pr_module_plan_for runs it on a tensor table without storage. */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "module_internal.h"
#include "names.h"
#include "model_internal.h"

/* ---- expression variables ------------------------------------------------------ */

int mod_model_vars(const pr_module *mod, const pr_dims *d, const pr_option_value *opts, expr_var *v)
{
    int n = 0;
    v[n++] = (expr_var){ "d_model", d->d_model };
    v[n++] = (expr_var){ "n_heads", d->n_heads };
    v[n++] = (expr_var){ "n_kv_heads", d->n_kv_heads };
    v[n++] = (expr_var){ "d_head", d->d_head };
    v[n++] = (expr_var){ "d_ff", d->d_ff };
    v[n++] = (expr_var){ "n_layers", d->n_layers };
    v[n++] = (expr_var){ "vocab", d->vocab };
    v[n++] = (expr_var){ "d_in", d->d_in };
    v[n++] = (expr_var){ "d_out", d->d_out };
    v[n++] = (expr_var){ "max_d_in", d->max_d_in };
    v[n++] = (expr_var){ "max_d_out", d->max_d_out };
    v[n++] = (expr_var){ "n_sites", mod_count_bits(mod->sites) };
    v[n++] = (expr_var){ "n_chosen_layers", mod->layers_all ? d->n_layers : mod->n_layers };
    for (uint32_t i = 0; i < mod->t.n_options; i++) {
        const pr_option_decl *o = &mod->opt[i];
        if (o->type == PR_OPT_STRING || !o->name)
            continue;
        v[n++] = (expr_var){ o->name, opts[i].num };
    }
    return n;
}

int mod_count_bits(uint32_t x)
{
    int n = 0;
    for (; x; x &= x - 1)
        n++;
    return n;
}

int64_t mod_shape_numel(const int64_t *dims, int ndim)
{
    int64_t n = 1;
    for (int d = 0; d < ndim; d++)
        n *= dims[d];
    return n;
}
/* ---- options --------------------------------------------------------------------- */

static const char *keep_str(pr_module *mod, const char *s)
{
    char **ns = realloc(mod->strs, (size_t)(mod->n_strs + 1) * sizeof *ns);
    if (!ns)
        return NULL;
    mod->strs = ns;
    char *d = mod_dup_str(s);
    if (!d)
        return NULL;
    mod->strs[mod->n_strs++] = d;
    return d;
}

int mod_option_index(const pr_module *mod, const char *name)
{
    for (uint32_t i = 0; i < mod->t.n_options; i++)
        if (mod->opt[i].name && strcmp(mod->opt[i].name, name) == 0)
            return (int)i;
    return -1;
}

int pr_module_option_index(const pr_module *mod, const char *name)
{
    return mod && name ? mod_option_index(mod, name) : -1;
}

static int parse_bool(const char *s, int *out)
{
    static const char *const yes[] = { "true", "1", "yes", "on" };
    static const char *const no[] = { "false", "0", "no", "off" };
    for (int i = 0; i < 4; i++) {
        if (strcasecmp(s, yes[i]) == 0) { *out = 1; return 0; }
        if (strcasecmp(s, no[i]) == 0) { *out = 0; return 0; }
    }
    return -1;
}

static int option_defaults(pr_module *mod, pr_error *err)
{
    for (uint32_t i = 0; i < mod->t.n_options; i++) {
        const pr_option_decl *o = &mod->opt[i];
        pr_option_value *v = &mod->base_opts[i];
        v->num = o->def;
        v->str = NULL;
        if (o->type == PR_OPT_STRING) {
            v->str = keep_str(mod, o->def_str ? o->def_str : "");
            if (!v->str)
                return pr_errorf(err, PR_ERR_NOMEM, "module '%s': out of memory", mod_name(mod));
        } else if (o->type == PR_OPT_ENUM) {
            int n = 0;
            while (o->choices && o->choices[n])
                n++;
            int k = (int)o->def;
            v->str = (k >= 0 && k < n) ? o->choices[k] : NULL;
        }
    }
    return PR_OK;
}

/* Parse text for option i into *v, checking type and bounds. */
static int option_parse(pr_module *mod, int i, const char *text, int site, pr_option_value *v, pr_error *err)
{
    const pr_option_decl *o = &mod->opt[i];
    char at[48] = "";
    if (site >= 0)
        snprintf(at, sizeof at, " at site '%s'", pr_site_name(site));
    if (!text)
        return pr_errorf(err, PR_ERR_INVALID, "module '%s': option '%s'%s has no value", mod_name(mod), o->name, at);
    char *end = NULL;
    switch (o->type) {
    case PR_OPT_INT: {
        long long x = strtoll(text, &end, 10);
        if (end == text || *end)
            return pr_errorf(err, PR_ERR_INVALID, "module '%s': option '%s'%s = '%s' is not an integer",
                             mod_name(mod), o->name, at, text);
        v->num = (double)x;
        break;
    }
    case PR_OPT_FLOAT: {
        double x = strtod(text, &end);
        if (end == text || *end || !isfinite(x))
            return pr_errorf(err, PR_ERR_INVALID, "module '%s': option '%s'%s = '%s' is not a finite number",
                             mod_name(mod), o->name, at, text);
        v->num = x;
        break;
    }
    case PR_OPT_BOOL: {
        int b;
        if (parse_bool(text, &b))
            return pr_errorf(err, PR_ERR_INVALID, "module '%s': option '%s'%s = '%s' is not a boolean (true/false)",
                             mod_name(mod), o->name, at, text);
        v->num = b;
        break;
    }
    case PR_OPT_ENUM: {
        char known[256] = "";
        size_t off = 0;
        for (int k = 0; o->choices && o->choices[k]; k++) {
            if (strcmp(o->choices[k], text) == 0) {
                v->num = k;
                v->str = o->choices[k];
                return PR_OK;
            }
            int w = snprintf(known + off, sizeof known - off, "%s%s", k ? ", " : "", o->choices[k]);
            if (w > 0 && (size_t)w < sizeof known - off)
                off += (size_t)w;
        }
        return pr_errorf(err, PR_ERR_INVALID, "module '%s': option '%s'%s = '%s' is not one of: %s",
                         mod_name(mod), o->name, at, text, known);
    }
    case PR_OPT_STRING:
        v->str = keep_str(mod, text);
        if (!v->str)
            return pr_errorf(err, PR_ERR_NOMEM, "module '%s': out of memory", mod_name(mod));
        return PR_OK;
    default:
        return pr_errorf(err, PR_ERR_INVALID, "module '%s': option '%s' has unknown type %d", mod_name(mod),
                         o->name, o->type);
    }
    if ((o->type == PR_OPT_INT || o->type == PR_OPT_FLOAT) && !(o->min == 0.0 && o->max == 0.0) &&
        (v->num < o->min || v->num > o->max))
        return pr_errorf(err, PR_ERR_INVALID, "module '%s': option '%s'%s = %s is out of range [%g, %g]",
                         mod_name(mod), o->name, at, text, o->min, o->max);
    return PR_OK;
}

static int resolve_options(pr_module *mod, const pr_module_spec *spec, pr_error *err)
{
    if (mod->t.n_options > MAX_OPTIONS)
        return pr_errorf(err, PR_ERR_UNSUPPORTED, "module '%s': technique '%s' declares %u options (at most %d)",
                         mod_name(mod), mod->t.name, mod->t.n_options, MAX_OPTIONS);
    for (uint32_t i = 0; i < mod->t.n_options; i++)
        mod_read_elem(&mod->opt[i], sizeof mod->opt[i], mod->t.options, i);
    int rc = option_defaults(mod, err);
    if (rc)
        return rc;
    /* every-site settings first, then per-site overrides */
    for (int pass = 0; pass < 2; pass++)
        for (int k = 0; k < spec->n_options; k++) {
            const pr_option_setting *s = &spec->options[k];
            if ((pass == 0) != (s->site < 0))
                continue;
            if (!s->name)
                return pr_errorf(err, PR_ERR_INVALID, "module '%s': option %d has no name", mod_name(mod), k);
            int i = mod_option_index(mod, s->name);
            if (i < 0) {
                char known[512] = "";
                size_t off = 0;
                for (uint32_t j = 0; j < mod->t.n_options; j++) {
                    int w = snprintf(known + off, sizeof known - off, "%s%s", j ? ", " : "", mod->opt[j].name);
                    if (w > 0 && (size_t)w < sizeof known - off)
                        off += (size_t)w;
                }
                return pr_errorf(err, PR_ERR_INVALID, "module '%s': unknown option '%s' (technique '%s' has: %s)",
                                 mod_name(mod), s->name, mod->t.name, off ? known : "no options");
            }
            if (s->site < 0) {
                if ((rc = option_parse(mod, i, s->value, -1, &mod->base_opts[i], err)))
                    return rc;
                continue;
            }
            if (!mod->opt[i].per_site)
                return pr_errorf(err, PR_ERR_INVALID, "module '%s': option '%s' cannot be set per site (site '%s')",
                                 mod_name(mod), s->name, pr_site_name(s->site));
            if (s->site >= PR_SITE_COUNT || !(mod->sites & PR_SITE_BIT(s->site)))
                return pr_errorf(err, PR_ERR_INVALID,
                                 "module '%s': option '%s' is set for site '%s', which the module does not use",
                                 mod_name(mod), s->name, pr_site_name(s->site));
        }
    /* resolved values per site */
    size_t n = mod->t.n_options ? mod->t.n_options : 1;
    mod->site_opts = calloc((size_t)PR_SITE_COUNT * n, sizeof *mod->site_opts);
    if (!mod->site_opts)
        return pr_errorf(err, PR_ERR_NOMEM, "module '%s': out of memory", mod_name(mod));
    for (int s = 0; s < PR_SITE_COUNT; s++)
        memcpy(mod->site_opts + (size_t)s * n, mod->base_opts, mod->t.n_options * sizeof *mod->base_opts);
    for (int k = 0; k < spec->n_options; k++) {
        const pr_option_setting *s = &spec->options[k];
        if (s->site < 0)
            continue;
        int i = mod_option_index(mod, s->name);
        if ((rc = option_parse(mod, i, s->value, s->site, mod->site_opts + (size_t)s->site * n + i, err)))
            return rc;
    }
    return PR_OK;
}

static void where_of(int site, int layer, char *buf, size_t len)
{
    if (layer >= 0)
        snprintf(buf, len, "h.%d.%s", layer, pr_site_name(site));
    else
        snprintf(buf, len, "%s", pr_site_name(site));
}

/* ---- sites, layers, insertions ----------------------------------------------------- */

int mod_is_concat(const pr_module *mod)
{
    return mod->t.integration == PR_INTEGRATE_CONCAT;
}

int mod_is_select(const pr_module *mod)
{
    return mod->t.integration == PR_INTEGRATE_SELECT;
}

uint32_t pr_technique_default_sites(const pr_technique *t, int family)
{
    if (!t)
        return 0;
    if (family == PR_FAMILY_LLAMA &&
        t->struct_size >= offsetof(pr_technique, default_sites_llama) + sizeof t->default_sites_llama &&
        t->default_sites_llama)
        return t->default_sites_llama;
    return t->default_sites;
}

static int resolve_sites(pr_module *mod, const pr_model *m, const pr_module_spec *spec, pr_error *err)
{
    uint32_t all = (1u << PR_SITE_COUNT) - 1;
    uint32_t mask = spec->sites ? spec->sites : pr_technique_default_sites(&mod->t, pr_model_get_config(m)->family);
    char buf[256];
    if (mask & ~all)
        return pr_errorf(err, PR_ERR_INVALID, "module '%s': site mask 0x%x names sites beyond the %d known ones",
                         mod_name(mod), mask, PR_SITE_COUNT);
    for (int s = 0; s < PR_SITE_COUNT; s++) {
        if (!(mask & PR_SITE_BIT(s)))
            continue;
        if (!(mod->t.sites & PR_SITE_BIT(s))) {
            names_site_mask(mod->t.sites, "none", buf, sizeof buf);
            return pr_errorf(err, PR_ERR_INVALID, "module '%s': technique '%s' cannot attach at site '%s' (allowed: %s)",
                             mod_name(mod), mod->t.name, pr_site_name(s), buf);
        }
        if (pr_model_site_dims(m, s, NULL, NULL) != 0)
            return pr_errorf(err, PR_ERR_INVALID, "module '%s': site '%s' does not exist in this model (%s family%s)",
                             mod_name(mod), pr_site_name(s),
                             pr_model_get_config(m)->family == PR_FAMILY_GPT2 ? "GPT-2" : "LLaMA",
                             s == PR_SITE_QKV ? ", separate q/k/v projections" : "");
        if (mod_is_concat(mod) && s != PR_SITE_EMBED && s != PR_SITE_ATTN_K && s != PR_SITE_ATTN_V)
            return pr_errorf(err, PR_ERR_INVALID,
                             "module '%s': concatenation attaches only at embed, attn.k and attn.v (not '%s')",
                             mod_name(mod), pr_site_name(s));
    }
    if (!mask && !mod_is_select(mod))
        return pr_errorf(err, PR_ERR_INVALID, "module '%s': no sites chosen and technique '%s' has no default sites",
                         mod_name(mod), mod->t.name);
    mod->sites = mask;
    return PR_OK;
}

static int cmp_int(const void *a, const void *b)
{
    int x = *(const int *)a, y = *(const int *)b;
    return (x > y) - (x < y);
}

static int resolve_layers(pr_module *mod, const pr_model *m, const pr_module_spec *spec, pr_error *err)
{
    int L = pr_model_get_config(m)->n_layers;
    mod->layers_all = spec->layers == NULL;
    int n = mod->layers_all ? L : spec->n_layers;
    if (!mod->layers_all && n <= 0)
        return pr_errorf(err, PR_ERR_INVALID, "module '%s': an empty layer list", mod_name(mod));
    mod->layers = malloc((size_t)(n ? n : 1) * sizeof *mod->layers);
    if (!mod->layers)
        return pr_errorf(err, PR_ERR_NOMEM, "module '%s': out of memory", mod_name(mod));
    for (int i = 0; i < n; i++) {
        int l = mod->layers_all ? i : spec->layers[i];
        if (l < 0 || l >= L)
            return pr_errorf(err, PR_ERR_INVALID, "module '%s': layer %d is out of range [0, %d)", mod_name(mod), l, L);
        mod->layers[i] = l;
    }
    qsort(mod->layers, (size_t)n, sizeof *mod->layers, cmp_int);
    for (int i = 1; i < n; i++)
        if (mod->layers[i] == mod->layers[i - 1])
            return pr_errorf(err, PR_ERR_INVALID, "module '%s': layer %d is listed twice", mod_name(mod),
                             mod->layers[i]);
    mod->n_layers = n;
    return PR_OK;
}

static int build_insertions(pr_module *mod, const pr_model *m, pr_error *err)
{
    if (mod_is_select(mod))
        return PR_OK;
    int n_model = 0, n_layer = 0;
    for (int s = 0; s < PR_SITE_COUNT; s++)
        if (mod->sites & PR_SITE_BIT(s))
            *(pr_site_is_per_layer(s) ? &n_layer : &n_model) += 1;
    int n = n_model + n_layer * mod->n_layers;
    mod->ins = calloc((size_t)(n ? n : 1), sizeof *mod->ins);
    if (!mod->ins)
        return pr_errorf(err, PR_ERR_NOMEM, "module '%s': out of memory", mod_name(mod));
    const pr_model_config *c = pr_model_get_config(m);
    size_t no = mod->t.n_options ? mod->t.n_options : 1;
    int k = 0;
    /* model-level sites first, then layer by layer in site order */
    for (int pass = 0; pass < 1 + mod->n_layers; pass++)
        for (int s = 0; s < PR_SITE_COUNT; s++) {
            if (!(mod->sites & PR_SITE_BIT(s)) || pr_site_is_per_layer(s) != (pass > 0))
                continue;
            insertion *in = &mod->ins[k];
            in->mod = mod;
            in->index = k;
            in->site = s;
            in->layer = pass > 0 ? mod->layers[pass - 1] : -1;
            in->gate = -1;
            in->opts = mod->site_opts + (size_t)s * no;
            pr_dims *d = &in->dims;
            d->struct_size = sizeof *d;
            d->d_model = c->d_model;
            d->n_heads = c->n_heads;
            d->n_kv_heads = c->n_kv_heads;
            d->d_head = c->d_head;
            d->d_ff = c->d_ff;
            d->n_layers = c->n_layers;
            d->vocab = c->vocab_size;
            d->family = c->family;
            pr_model_site_dims(m, s, &d->d_in, &d->d_out);
            where_of(s, in->layer, in->where, sizeof in->where);
            k++;
        }
    mod->n_ins = k;
    /* the widest site of the module, for tensors shared across its sites */
    int max_in = 0, max_out = 0;
    for (int i = 0; i < k; i++) {
        max_in = mod->ins[i].dims.d_in > max_in ? mod->ins[i].dims.d_in : max_in;
        max_out = mod->ins[i].dims.d_out > max_out ? mod->ins[i].dims.d_out : max_out;
    }
    for (int i = 0; i < k; i++) {
        mod->ins[i].dims.max_d_in = max_in;
        mod->ins[i].dims.max_d_out = max_out;
    }
    return PR_OK;
}

/* The evaluator's message in e (rc != 0), or one that w is above max. */
static const char *too_big(char *e, size_t len, int rc, int64_t w, int64_t max, const char *bound)
{
    if (!rc)
        snprintf(e, len, "%lld is more than %lld (%s)", (long long)w, (long long)max, bound);
    return e;
}

/* Module widths, n_virtual and the scale-expression of each insertion. */
static int resolve_widths(pr_module *mod, pr_error *err)
{
    expr_var v[MAX_VARS];
    char e[256];
    for (int k = 0; k < mod->n_ins; k++) {
        insertion *in = &mod->ins[k];
        int nv = mod_model_vars(mod, &in->dims, in->opts, v);
        int seq = mod->t.insertion == PR_INSERT_SEQUENTIAL;
        int have_in = in->dims.d_in, have_out = in->dims.d_out;
        int expect_in = seq ? have_out : have_in;
        int64_t w;
        const char *src_in = mod->t.module_in ? mod->t.module_in : (seq ? "d_out" : "d_in");
        const char *src_out = mod->t.module_out ? mod->t.module_out : "d_out";
        /* widths are ints: a plugin's expression is held to EXPR_MAX_NUMEL
         * (the shapes of its parameters are bounded in resolve_params) */
        int rc = expr_eval_int(src_in, v, nv, &w, e, sizeof e);
        if (rc || w > EXPR_MAX_NUMEL)
            return pr_errorf(err, PR_ERR_INVALID, "module '%s': module_in '%s' at %s: %s", mod_name(mod), src_in,
                             in->where, too_big(e, sizeof e, rc, w, EXPR_MAX_NUMEL, "EXPR_MAX_NUMEL"));
        in->w_in = (int)w;
        rc = expr_eval_int(src_out, v, nv, &w, e, sizeof e);
        if (rc || w > EXPR_MAX_NUMEL)
            return pr_errorf(err, PR_ERR_INVALID, "module '%s': module_out '%s' at %s: %s", mod_name(mod), src_out,
                             in->where, too_big(e, sizeof e, rc, w, EXPR_MAX_NUMEL, "EXPR_MAX_NUMEL"));
        in->w_out = (int)w;
        const integration_form *form = mod_form(mod);
        if (form->fixed_in && in->w_in != expect_in)
            return pr_errorf(err, PR_ERR_INVALID,
                             "module '%s': module_in = %d at %s, but the %s insertion gives the module %d columns",
                             mod_name(mod), in->w_in, in->where, seq ? "sequential" : "parallel", expect_in);
        if (form->fixed_out && in->w_out != have_out)
            return pr_errorf(err, PR_ERR_INVALID, "module '%s': module_out = %d at %s, but the site output has %d columns",
                             mod_name(mod), in->w_out, in->where, have_out);
        if (mod_is_concat(mod)) {
            if (!mod->t.n_virtual)
                return pr_errorf(err, PR_ERR_INVALID, "module '%s': concatenation without an n_virtual expression",
                                 mod_name(mod));
            rc = expr_eval_int(mod->t.n_virtual, v, nv, &w, e, sizeof e);
            if (rc || w < 1 || w > PR_MAX_SEQ)
                return pr_errorf(err, PR_ERR_INVALID, "module '%s': n_virtual '%s' at %s: %s", mod_name(mod),
                                 mod->t.n_virtual, in->where,
                                 !rc && w < 1 ? "must be >= 1" : too_big(e, sizeof e, rc, w, PR_MAX_SEQ, "PR_MAX_SEQ"));
            in->n_virtual = (int)w;
        }
        in->scale = 1.0f;
        if (mod->t.scale_expr && !mod->t.scale) {
            double s;
            if (expr_eval(mod->t.scale_expr, v, nv, &s, e, sizeof e))
                return pr_errorf(err, PR_ERR_INVALID, "module '%s': scale_expr '%s' at %s: %s", mod_name(mod),
                                 mod->t.scale_expr, in->where, e);
            in->scale = (float)s;
        }
    }
    /* prefix rows of one layer's k and v must agree */
    for (int a = 0; mod_is_concat(mod) && a < mod->n_ins; a++)
        for (int b = a + 1; b < mod->n_ins; b++)
            if (mod->ins[a].layer == mod->ins[b].layer && mod->ins[a].layer >= 0 &&
                mod->ins[a].n_virtual != mod->ins[b].n_virtual)
                return pr_errorf(err, PR_ERR_INVALID, "module '%s': n_virtual is %d at %s but %d at %s",
                                 mod_name(mod), mod->ins[a].n_virtual, mod->ins[a].where, mod->ins[b].n_virtual,
                                 mod->ins[b].where);
    return PR_OK;
}

/* ---- parameter copies ----------------------------------------------------------------- */

static const char *scope_name(int scope)
{
    switch (scope) {
    case PR_SCOPE_INSERTION: return "insertion";
    case PR_SCOPE_LAYER: return "layer";
    case PR_SCOPE_SITE: return "site";
    case PR_SCOPE_GLOBAL: return "global";
    default: return "?";
    }
}

static int add_copy(pr_module *mod, pr_error *err)
{
    if (mod->n_copies == mod->cap_copies) {
        int cap = mod->cap_copies ? 2 * mod->cap_copies : 16;
        param_copy *nc = realloc(mod->copies, (size_t)cap * sizeof *nc);
        if (!nc)
            return pr_errorf(err, PR_ERR_NOMEM, "module '%s': out of memory", mod_name(mod));
        mod->copies = nc;
        mod->cap_copies = cap;
    }
    memset(&mod->copies[mod->n_copies], 0, sizeof mod->copies[0]);
    mod->n_copies++;
    return PR_OK;
}

/* Tensor name of a copy: "<module>/<param>" (global), "<module>/h.L.<param>"
 * (layer), "<module>/<site>.<param>" (site), "<module>/h.L.<site>.<param>"
 * (insertion); model-level sites drop the "h.L." part. */
char *mod_copy_name(const pr_module *mod, const char *param, int scope, int site, int layer)
{
    char buf[256];
    const char *mn = mod_name(mod);
    if ((scope == PR_SCOPE_LAYER && layer >= 0))
        snprintf(buf, sizeof buf, "%s/h.%d.%s", mn, layer, param);
    else if (scope == PR_SCOPE_SITE || (scope == PR_SCOPE_INSERTION && layer < 0))
        snprintf(buf, sizeof buf, "%s/%s.%s", mn, pr_site_name(site), param);
    else if (scope == PR_SCOPE_INSERTION)
        snprintf(buf, sizeof buf, "%s/h.%d.%s.%s", mn, layer, pr_site_name(site), param);
    else
        snprintf(buf, sizeof buf, "%s/%s", mn, param);
    return mod_dup_str(buf);
}

static int resolve_params(pr_module *mod, pr_error *err)
{
    uint32_t np = mod->t.n_params;
    mod->pd = calloc(np ? np : 1, sizeof *mod->pd);
    if (!mod->pd)
        return pr_errorf(err, PR_ERR_NOMEM, "module '%s': out of memory", mod_name(mod));
    for (uint32_t i = 0; i < np; i++) {
        mod_read_elem(&mod->pd[i], sizeof mod->pd[i], mod->t.params, i);
        const pr_param_decl *p = &mod->pd[i];
        if (!p->name || !p->shape)
            return pr_errorf(err, PR_ERR_INVALID, "module '%s': parameter %u has no name or shape", mod_name(mod), i);
        if (p->scope < PR_SCOPE_INSERTION || p->scope > PR_SCOPE_GLOBAL)
            return pr_errorf(err, PR_ERR_INVALID, "module '%s': parameter '%s' has unknown scope %d", mod_name(mod),
                             p->name, p->scope);
        if (mod->gated && strcmp(p->name, "gate") == 0)
            return pr_errorf(err, PR_ERR_INVALID, "module '%s': parameter name 'gate' is reserved for the host's gate",
                             mod_name(mod));
    }
    expr_var v[MAX_VARS];
    char e[256];
    for (int k = 0; k < mod->n_ins; k++) {
        insertion *in = &mod->ins[k];
        in->copy = calloc(np ? np : 1, sizeof *in->copy);
        if (!in->copy)
            return pr_errorf(err, PR_ERR_NOMEM, "module '%s': out of memory", mod_name(mod));
        int nv = mod_model_vars(mod, &in->dims, in->opts, v);
        for (uint32_t i = 0; i < np; i++) {
            const pr_param_decl *p = &mod->pd[i];
            int64_t dims[4];
            int nd = 0;
            if (expr_eval_shape_z(p->shape, v, nv, (p->flags & PR_PARAM_FROZEN) != 0, dims, &nd, e, sizeof e))
                return pr_errorf(err, PR_ERR_INVALID, "module '%s': parameter '%s' shape '%s' at %s: %s", mod_name(mod),
                                 p->name, p->shape, in->where, e);
            int kl = (p->scope == PR_SCOPE_INSERTION || p->scope == PR_SCOPE_LAYER) ? in->layer : INT32_MIN;
            int ks = (p->scope == PR_SCOPE_INSERTION || p->scope == PR_SCOPE_SITE) ? in->site : -1;
            int found = -1, ordinal = 0;
            for (int c = 0; c < mod->n_copies; c++) {
                const param_copy *pc = &mod->copies[c];
                if (pc->decl != (int)i)
                    continue;
                if (pc->key_layer == kl && pc->key_site == ks) {
                    found = c;
                    break;
                }
                ordinal++;
            }
            if (found >= 0) {
                const param_copy *pc = &mod->copies[found];
                int same = pc->ndim == nd;
                for (int d = 0; same && d < nd; d++)
                    same = pc->shape[d] == dims[d];
                if (!same)
                    return pr_errorf(err, PR_ERR_INVALID,
                                     "module '%s': parameter '%s' (%s scope) has shape '%s' = %lld elements at %s "
                                     "but %lld at %s; a shared copy needs one shape",
                                     mod_name(mod), p->name, scope_name(p->scope), p->shape,
                                     (long long)mod_shape_numel(dims, nd), in->where, (long long)pc->numel,
                                     mod->ins[pc->first_ins].where);
                in->copy[i] = found;
                continue;
            }
            int rc = add_copy(mod, err);
            if (rc)
                return rc;
            param_copy *pc = &mod->copies[mod->n_copies - 1];
            pc->decl = (int)i;
            pc->key_layer = kl;
            pc->key_site = ks;
            pc->ndim = nd;
            memcpy(pc->shape, dims, sizeof dims);
            pc->numel = mod_shape_numel(dims, nd);
            pc->ordinal = ordinal;
            pc->first_ins = k;
            pc->trained = mod->trainable && !(p->flags & PR_PARAM_FROZEN);
            pc->name = mod_copy_name(mod, p->name, p->scope, in->site, in->layer);
            if (!pc->name)
                return pr_errorf(err, PR_ERR_NOMEM, "module '%s': out of memory", mod_name(mod));
            in->copy[i] = mod->n_copies - 1;
        }
        if (mod->gated) {
            int rc = add_copy(mod, err);
            if (rc)
                return rc;
            param_copy *pc = &mod->copies[mod->n_copies - 1];
            pc->decl = -1;
            pc->key_layer = in->layer;
            pc->key_site = in->site;
            pc->ndim = 1;
            pc->shape[0] = 1;
            pc->numel = 1;
            pc->first_ins = k;
            pc->trained = mod->trainable;
            pc->name = mod_copy_name(mod, "gate", PR_SCOPE_INSERTION, in->site, in->layer);
            if (!pc->name)
                return pr_errorf(err, PR_ERR_NOMEM, "module '%s': out of memory", mod_name(mod));
            in->gate = mod->n_copies - 1;
        }
    }
    /* each copy is at most EXPR_MAX_NUMEL; their sum, with gradients and
     * two optimiser moments, must still fit in ptrdiff_t bytes (a 32-bit
     * host) before anything is allocated */
    const size_t max_floats = (size_t)PTRDIFF_MAX / sizeof(float) / 4;
    size_t off = 0, goff = 0;
    for (int c = 0; c < mod->n_copies; c++) {
        param_copy *pc = &mod->copies[c];
        if (mod_round_up((size_t)pc->numel) > max_floats - off)
            return pr_errorf(err, PR_ERR_INVALID, "module '%s': its parameters would take more than %zu floats, more "
                             "than this host can address", mod_name(mod), max_floats);
        pc->off = off;
        off += mod_round_up((size_t)pc->numel);
        mod->param_count += pc->numel;
        if (pc->trained) {
            pc->goff = goff;
            goff += mod_round_up((size_t)pc->numel);
            mod->trainable_count += pc->numel;
        }
    }
    mod->n_param_floats = off;
    mod->n_grad_floats = goff;
    return PR_OK;
}

static int name_ok(const char *s)
{
    if (!s || !*s)
        return 0;
    for (; *s; s++)
        if (*s == '/' || *s == ' ' || (unsigned char)*s < 0x21)
            return 0;
    return 1;
}

/* Stage 1, shared by plan and attach. */
int mod_resolve(const pr_model *m, const pr_module_spec *spec, pr_module **out, pr_error *err)
{
    *out = NULL;
    if (!m || !spec || !spec->technique)
        return pr_errorf(err, PR_ERR_INVALID, "module: NULL model, spec or technique");
    const pr_technique *t = spec->technique;
    if (t->abi_major != PR_ABI_MAJOR)
        return pr_errorf(err, PR_ERR_UNSUPPORTED, "module: technique '%s' is built for ABI %u, the host speaks %d",
                         t->name ? t->name : "?", t->abi_major, PR_ABI_MAJOR);
    pr_module *mod = calloc(1, sizeof *mod);
    if (!mod)
        return pr_errorf(err, PR_ERR_NOMEM, "module: out of memory");
    *out = mod;
    mod->tech_ptr = t;
    mod_read_elem(&mod->t, sizeof mod->t, t, 0);
    mod->t.struct_size = t->struct_size;
    if (!mod->t.name)
        return pr_errorf(err, PR_ERR_INVALID, "module: technique without a name");
    const char *nm = spec->name ? spec->name : mod->t.name;
    if (!name_ok(nm))
        return pr_errorf(err, PR_ERR_INVALID, "module: name '%s' must be non-empty without '/' or spaces", nm);
    mod->name = mod_dup_str(nm);
    if (!mod->name)
        return pr_errorf(err, PR_ERR_NOMEM, "module: out of memory");
    mod->model = (pr_model *)m;
    mod->trainable = spec->trainable != 0;
    mod->seed = spec->seed;
    uint32_t integ = (uint32_t)mod->t.integration;
    if (integ >= sizeof mod_forms / sizeof mod_forms[0] || !mod_forms[integ].name)
        return pr_errorf(err, PR_ERR_INVALID, "module '%s': technique '%s' has unknown integration form %d",
                         mod_name(mod), mod->t.name, mod->t.integration);
    mod->gated = spec->gate != 0 || mod_form(mod)->gated;
    if (spec->gate && mod_is_select(mod))
        return pr_errorf(err, PR_ERR_INVALID, "module '%s': technique '%s' selects base tensors; it has no output a "
                         "gate could scale (gate: true)", mod_name(mod), mod->t.name);
    if (spec->n_options < 0 || (spec->n_options > 0 && !spec->options))
        return pr_errorf(err, PR_ERR_INVALID, "module '%s': bad option list", mod_name(mod));
    int rc;
    if ((rc = resolve_sites(mod, m, spec, err)) || (rc = resolve_options(mod, spec, err)) ||
        (rc = resolve_layers(mod, m, spec, err)) || (rc = build_insertions(mod, m, err)) ||
        (rc = resolve_widths(mod, err)) || (rc = resolve_params(mod, err)) ||
        (rc = mod_resolve_selection(mod, m, err)))
        return rc;
    mod->sd = calloc(mod->t.n_saved ? mod->t.n_saved : 1, sizeof *mod->sd);
    mod->xd = calloc(mod->t.n_scratch ? mod->t.n_scratch : 1, sizeof *mod->xd);
    if (!mod->sd || !mod->xd)
        return pr_errorf(err, PR_ERR_NOMEM, "module '%s': out of memory", mod_name(mod));
    for (uint32_t i = 0; i < mod->t.n_saved; i++)
        mod_read_elem(&mod->sd[i], sizeof mod->sd[i], mod->t.saved, i);
    for (uint32_t i = 0; i < mod->t.n_scratch; i++)
        mod_read_elem(&mod->xd[i], sizeof mod->xd[i], mod->t.scratch, i);
    return PR_OK;
}

int pr_module_plan_for(const pr_model_config *cfg, const pr_module_spec *spec, pr_module_plan *out, pr_error *err)
{
    if (!cfg || !out)
        return pr_errorf(err, PR_ERR_INVALID, "plan: NULL config or output");
    memset(out, 0, sizeof *out);
    pr_model *m = NULL;
    int rc = model_create_empty(cfg, &m, err);
    if (rc)
        return rc;
    pr_module *mod = NULL;
    rc = mod_resolve(m, spec, &mod, err);
    if (rc == PR_OK) {
        out->insertions = mod->n_ins;
        out->params = mod->param_count;
        out->trainable = mod->trainable_count;
        out->base_selected = mod->base_selected;
        out->sites = mod->sites;
        int per_layer = mod_is_select(mod);
        for (int s = 0; s < PR_SITE_COUNT; s++)
            per_layer |= (mod->sites & PR_SITE_BIT(s)) && pr_site_is_per_layer(s);
        out->layers_used = per_layer ? mod->n_layers : 0;
    }
    mod_free(mod);
    pr_model_free(m);
    return rc;
}
