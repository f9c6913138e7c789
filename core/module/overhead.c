/* peftref core: inference overhead of a pipeline's modules (see overhead.h). */
#include "config.h"

#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "overhead.h"
#include "expr.h"
#include "model_internal.h"

#define MAX_VARS 80

/* Descriptor arrays are read with the element size the plugin declared
 * (the first element's struct_size), only as far as it covers. */
static void decl_copy(void *dst, size_t host_size, const void *base, uint32_t i)
{
    uint32_t stride = *(const uint32_t *)base;
    if (stride == 0)
        stride = (uint32_t)host_size;
    const char *src = (const char *)base + (size_t)i * stride;
    memset(dst, 0, host_size);
    memcpy(dst, src, stride < host_size ? stride : host_size);
}

static double option_number(const pr_option_decl *o, const char *text)
{
    if (o->type == PR_OPT_BOOL)
        return !strcasecmp(text, "true") || !strcasecmp(text, "yes") || !strcasecmp(text, "on") ||
               !strcmp(text, "1");
    if (o->type == PR_OPT_ENUM) {
        for (int k = 0; o->choices && o->choices[k]; k++)
            if (strcmp(o->choices[k], text) == 0)
                return k;
        return o->def;
    }
    return strtod(text, NULL);
}

/* The model's dimensions, the site's widths and the module's numeric
 * options as resolved at site (defaults, then options, then site_options). */
typedef struct site_set_dims {
    int max_d_in, max_d_out, n_sites, n_layers;
} site_set_dims;

static int site_vars(const pr_model_config *c, int d_in, int d_out, const site_set_dims *ss,
                     const pr_module_spec *spec, int site, expr_var *v)
{
    const pr_technique *t = spec->technique;
    int n = 0;
    v[n++] = (expr_var){ "d_model", c->d_model };
    v[n++] = (expr_var){ "n_heads", c->n_heads };
    v[n++] = (expr_var){ "n_kv_heads", c->n_kv_heads };
    v[n++] = (expr_var){ "d_head", c->d_head };
    v[n++] = (expr_var){ "d_ff", c->d_ff };
    v[n++] = (expr_var){ "n_layers", c->n_layers };
    v[n++] = (expr_var){ "vocab", c->vocab_size };
    v[n++] = (expr_var){ "d_in", d_in };
    v[n++] = (expr_var){ "d_out", d_out };
    v[n++] = (expr_var){ "max_d_in", ss->max_d_in };
    v[n++] = (expr_var){ "max_d_out", ss->max_d_out };
    v[n++] = (expr_var){ "n_sites", ss->n_sites };
    v[n++] = (expr_var){ "n_chosen_layers", ss->n_layers };
    for (uint32_t i = 0; t->options && i < t->n_options && n < MAX_VARS; i++) {
        pr_option_decl o;
        decl_copy(&o, sizeof o, t->options, i);
        if (!o.name || o.type == PR_OPT_STRING)
            continue;
        double val = o.def;
        for (int pass = 0; pass < 2; pass++)
            for (int k = 0; k < spec->n_options; k++) {
                const pr_option_setting *s = &spec->options[k];
                if (strcmp(s->name, o.name) == 0 && (pass == 0 ? s->site < 0 : s->site == site))
                    val = option_number(&o, s->value);
            }
        v[n++] = (expr_var){ o.name, val };
    }
    return n;
}

/* Extra FLOPs per token of one insertion (not a concatenation). */
static int insertion_flops(const pr_technique *t, const expr_var *v, int nv, int d_in, int d_out, int64_t *flops,
                           int *lower_bound, pr_error *err)
{
    char e[256];
    int64_t w;
    *flops = 0;
    if (t->flops_per_token) {   /* the technique's own count */
        if (expr_eval_int(t->flops_per_token, v, nv, &w, e, sizeof e))
            return pr_errorf(err, PR_ERR_INVALID, "technique '%s': flops_per_token '%s': %s", t->name,
                             t->flops_per_token, e);
        *flops = w;
        return PR_OK;
    }
    switch (t->integration) {
    case PR_INTEGRATE_RESCALE:
        /* one multiply per element of the rescaled row */
        if (expr_eval_int(t->module_out ? t->module_out : "d_out", v, nv, &w, e, sizeof e))
            return pr_errorf(err, PR_ERR_INVALID, "technique '%s': module_out: %s", t->name, e);
        *flops = w;
        return PR_OK;
    case PR_INTEGRATE_WEIGHT_DELTA:
        *flops = 2 * (int64_t)d_in * d_out;
        return PR_OK;
    default:
        break;
    }
    if (t->integration == PR_INTEGRATE_CUSTOM || t->intra == PR_INTRA_ATTENTION)
        *lower_bound = 1;
    for (uint32_t i = 0; t->params && i < t->n_params; i++) {
        pr_param_decl d;
        decl_copy(&d, sizeof d, t->params, i);
        if (!d.shape || (d.flags & PR_PARAM_TRAINING_ONLY))
            continue;   /* folded away before inference */
        int64_t dims[4];
        int ndim;
        if (expr_eval_shape_z(d.shape, v, nv, (d.flags & PR_PARAM_FROZEN) != 0, dims, &ndim, e, sizeof e))
            return pr_errorf(err, PR_ERR_INVALID, "technique '%s': parameter '%s' shape '%s': %s", t->name,
                             d.name ? d.name : "?", d.shape, e);
        int64_t numel = 1;
        for (int k = 0; k < ndim; k++)
            numel *= dims[k];
        if (ndim == 1)
            *flops += numel;       /* a bias add or an elementwise gain */
        else if (ndim == 2)
            *flops += 2 * numel;   /* a matrix: one multiply-add per weight */
        else
            *lower_bound = 1;      /* factors of a matrix formed per forward pass */
    }
    return PR_OK;
}

int overhead_of_pipeline(const pr_pipeline *p, overhead *out, pr_error *err)
{
    memset(out, 0, sizeof *out);
    int nm = pr_pipeline_n_modules(p);
    if (nm == 0)
        return PR_OK;
    const pr_model_config *cfg = pr_pipeline_model_config(p);
    pr_model *shape = NULL;
    int rc = model_create_empty(cfg, &shape, err);
    if (rc)
        return rc;
    for (int i = 0; i < nm && rc == PR_OK; i++) {
        pr_module_spec spec;
        const pr_module_plan *plan = pr_pipeline_module_plan(p, i);
        if (pr_pipeline_module_spec(p, i, &spec) || !plan || !spec.technique)
            continue;
        const pr_technique *t = spec.technique;
        if (t->integration == PR_INTEGRATE_SELECT || t->insertion == PR_INSERT_IN_PLACE)
            continue;
        int n_layers = 0;
        pr_pipeline_module_layers(p, i, &n_layers);
        int mergeable = t->merge != NULL && t->integration != PR_INTEGRATE_CONCAT;
        int prefix = 0;
        site_set_dims ss = { 0, 0, 0, n_layers };
        for (int s = 0; s < PR_SITE_COUNT; s++) {
            int a = 0, b = 0;
            if (!(plan->sites & PR_SITE_BIT(s)) || pr_model_site_dims(shape, s, &a, &b))
                continue;
            ss.max_d_in = a > ss.max_d_in ? a : ss.max_d_in;
            ss.max_d_out = b > ss.max_d_out ? b : ss.max_d_out;
            ss.n_sites++;
        }
        for (int s = 0; s < PR_SITE_COUNT && rc == PR_OK; s++) {
            if (!(plan->sites & PR_SITE_BIT(s)))
                continue;
            int d_in = 0, d_out = 0;
            if (pr_model_site_dims(shape, s, &d_in, &d_out))
                continue;
            expr_var v[MAX_VARS];
            int nv = site_vars(cfg, d_in, d_out, &ss, &spec, s, v);
            if (t->integration == PR_INTEGRATE_CONCAT) {
                int64_t nvirt;
                char e[256];
                if (!t->n_virtual || expr_eval_int(t->n_virtual, v, nv, &nvirt, e, sizeof e)) {
                    rc = pr_errorf(err, PR_ERR_INVALID, "technique '%s': n_virtual: %s", t->name,
                                   t->n_virtual ? e : "missing");
                    break;
                }
                if (s == PR_SITE_EMBED)
                    out->positions += (int)nvirt;
                else if (nvirt > prefix)
                    prefix = (int)nvirt;   /* a layer's k and v agree on it */
                continue;
            }
            int64_t per;
            rc = insertion_flops(t, v, nv, d_in, d_out, &per, &out->flops_lower_bound, err);
            int64_t count = pr_site_is_per_layer(s) ? n_layers : 1;
            out->flops += per * count;
            if (!mergeable)
                out->flops_merged += per * count;
        }
        out->prefix += prefix;
    }
    pr_model_free(shape);
    return rc;
}
