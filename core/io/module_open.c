/* peftref core: opening a saved module: its metadata, technique (or folded
 * form), options, sites and layers, and the base-model check. */
#include "config.h"

#include <jansson.h>
#include <math.h>
#include <stdint.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "module_file.h"
#include "peft_adapter.h"

/* ---- opening ------------------------------------------------------------------------------------------ */

static const char *fkeep(pr_module_file *f, const char *s)
{
    char **v = realloc(f->strs, (size_t)(f->n_strs + 1) * sizeof *v);
    if (!v)
        return NULL;
    f->strs = v;
    char *d = strdup(s);
    if (d)
        f->strs[f->n_strs++] = d;
    return d;
}

void pr_module_file_close(pr_module_file *f)
{
    if (!f)
        return;
    st_close(f->st);
    for (int i = 0; i < f->n_strs; i++)
        free(f->strs[i]);
    free(f->strs);
    free(f->opts);
    free(f->layers);
    free(f->path);
    free(f);
}

const char *pr_module_file_path(const pr_module_file *f)
{
    return f ? f->path : NULL;
}

const char *pr_module_file_meta(const pr_module_file *f, const char *key)
{
    return f ? st_metadata(f->st, key) : NULL;
}

static long major_of(const char *v)
{
    return v ? strtol(v, NULL, 10) : 0;
}

int mf_has_option(const pr_technique *t, const char *name)
{
    for (uint32_t i = 0; i < t->n_options; i++) {
        pr_option_decl d;
        mf_read_decl(&d, sizeof d, t->options, i);
        if (d.name && !strcmp(d.name, name))
            return 1;
    }
    return 0;
}

/* The folded form of technique t: the technique its folds_to names, when
 * the registry has it and it fits what fold() saves (the same integration
 * and sites, parameters exactly t's fold_params by name, shape and scope,
 * options t also has); NULL otherwise. */
static const pr_technique *folded_form(const pr_registry *reg, const pr_technique *t)
{
    const pr_technique *u = t->folds_to ? pr_registry_find(reg, t->folds_to) : NULL;
    if (!u || u == t || u->integration != t->integration || u->sites != t->sites || u->n_params != t->n_fold_params)
        return NULL;
    for (uint32_t i = 0; i < u->n_params; i++) {
        pr_param_decl a, b;
        mf_read_decl(&a, sizeof a, u->params, i);
        mf_read_decl(&b, sizeof b, t->fold_params, i);
        if (!a.name || !b.name || strcmp(a.name, b.name) || !a.shape || !b.shape || strcmp(a.shape, b.shape) ||
            a.scope != b.scope || (a.flags & PR_PARAM_TRAINING_ONLY))
            return NULL;
    }
    for (uint32_t i = 0; i < u->n_options; i++) {
        pr_option_decl d;
        mf_read_decl(&d, sizeof d, u->options, i);
        if (!d.name || !mf_has_option(t, d.name))
            return NULL;
    }
    return u;
}

/* A JSON value as option text. */
static const char *value_text(pr_module_file *f, const json_t *v, char *buf, size_t len)
{
    if (json_is_integer(v))
        snprintf(buf, len, "%lld", (long long)json_integer_value(v));
    else if (json_is_real(v))
        snprintf(buf, len, "%.17g", json_real_value(v));
    else if (json_is_boolean(v))
        snprintf(buf, len, "%s", json_is_true(v) ? "true" : "false");
    else if (json_is_string(v))
        return fkeep(f, json_string_value(v));
    else
        return NULL;
    return fkeep(f, buf);
}

static int push_opt(pr_module_file *f, const char *name, const char *value, int site)
{
    pr_option_setting *o = realloc(f->opts, (size_t)(f->n_opts + 1) * sizeof *o);
    if (!o)
        return -1;
    f->opts = o;
    o[f->n_opts++] = (pr_option_setting){ name, value, site };
    return 0;
}

static int parse_options(pr_module_file *f, const char *text, int site, pr_error *err)
{
    json_error_t je;
    json_t *j = json_loads(text ? text : "{}", 0, &je);
    if (!j || !json_is_object(j)) {
        json_decref(j);
        return pr_errorf(err, PR_ERR_FORMAT, "%s: metadata options is not a JSON object", f->path);
    }
    const char *k;
    json_t *v;
    char buf[64];
    json_object_foreach(j, k, v) {
        if (site == -2) { /* site_options: {site: {name: value}} */
            int s = pr_site_parse(k);
            if (s < 0 || !json_is_object(v)) {
                /* k belongs to j: report before releasing it */
                int rc = pr_errorf(err, PR_ERR_FORMAT, "%s: metadata site_options: bad entry '%s'", f->path, k);
                json_decref(j);
                return rc;
            }
            const char *k2;
            json_t *v2;
            json_object_foreach(v, k2, v2) {
                const char *name = fkeep(f, k2), *val = value_text(f, v2, buf, sizeof buf);
                if (!name || !val || push_opt(f, name, val, s)) {
                    int rc = pr_errorf(err, PR_ERR_FORMAT, "%s: metadata site_options.%s.%s: bad value",
                                       f->path, k, k2);
                    json_decref(j);
                    return rc;
                }
            }
            continue;
        }
        if (!mf_has_option(f->t, k))
            continue;   /* an option of the training form only (folded files) */
        const char *name = fkeep(f, k), *val = value_text(f, v, buf, sizeof buf);
        if (!name || !val || push_opt(f, name, val, -1)) {
            int rc = pr_errorf(err, PR_ERR_FORMAT, "%s: metadata options.%s: bad value", f->path, k);
            json_decref(j);
            return rc;
        }
    }
    json_decref(j);
    return PR_OK;
}

int pr_module_file_open(const char *path, const pr_registry *reg, pr_module_file **out, pr_error *err)
{
    return pr_module_file_open_ex(path, reg, NULL, 0, out, err);
}

int pr_module_file_open_ex(const char *path, const pr_registry *reg, const pr_model_config *cfg, unsigned flags,
                           pr_module_file **out, pr_error *err)
{
    *out = NULL;
    if (peft_is_adapter_dir(path)) {
        if (!cfg)
            return pr_errorf(err, PR_ERR_INVALID, "%s: a Hugging Face PEFT adapter directory is read against its "
                             "base model, and none is known here", path);
        return peft_adapter_open(path, reg, cfg, flags, out, err);
    }
    pr_module_file *f = calloc(1, sizeof *f);
    if (!f || !(f->path = strdup(path))) {
        free(f);
        return pr_errorf(err, PR_ERR_NOMEM, "%s: out of memory", path);
    }
    int rc = st_open(path, 0, &f->st, err);
    if (rc)
        goto fail;
    const char *fmt = st_metadata(f->st, "format");
    const char *tech = st_metadata(f->st, "technique");
    if (!fmt || strcmp(fmt, "peftref-module") || !tech) {
        rc = pr_errorf(err, PR_ERR_FORMAT, "%s: not a saved peftref module (no __metadata__ format "
                       "'peftref-module' with a technique)", path);
        goto fail;
    }
    const pr_technique *t = pr_registry_find(reg, tech);
    if (!t) {
        rc = pr_errorf(err, PR_ERR_NOTFOUND, "%s: technique '%s' is not installed (peftref plugins lists the "
                       "techniques found)", path, tech);
        goto fail;
    }
    const char *ver = st_metadata(f->st, "technique_version");
    if (major_of(ver) != major_of(t->version)) {
        rc = pr_errorf(err, PR_ERR_UNSUPPORTED, "%s: saved by technique '%s' version %s; the installed one is %s "
                       "(major versions differ)", path, tech, ver ? ver : "?", t->version ? t->version : "?");
        goto fail;
    }
    const char *folded = st_metadata(f->st, "folded");
    f->folded = folded && !strcmp(folded, "true");
    f->t = t;
    if (f->folded) {
        const pr_technique *u = folded_form(reg, t);
        if (u)
            f->t = u;
    }
    const char *names = st_metadata(f->st, "tensor_names");
    f->peft = names && !strcmp(names, "peft");
    const char *gated = st_metadata(f->st, "gated");
    f->gated = gated && !strcmp(gated, "true");
    /* the seed that regenerates frozen buffers left out of the file */
    const char *seed = st_metadata(f->st, "seed");
    if (seed) {
        char *end = NULL;
        errno = 0;
        unsigned long long v = strtoull(seed, &end, 16);
        if (errno || !end || end == seed || *end) {
            rc = pr_errorf(err, PR_ERR_FORMAT, "%s: metadata seed '%s' is not a hexadecimal number", path, seed);
            goto fail;
        }
        f->seed = (uint64_t)v;
        f->has_seed = 1;
    }
    f->saved_name = st_metadata(f->st, "name");
    if (!f->saved_name) {
        rc = pr_errorf(err, PR_ERR_FORMAT, "%s: metadata has no module name", path);
        goto fail;
    }
    /* sites */
    json_error_t je;
    json_t *sj = json_loads(st_metadata(f->st, "sites") ? st_metadata(f->st, "sites") : "", 0, &je);
    if (!sj || !json_is_array(sj)) {
        json_decref(sj);
        rc = pr_errorf(err, PR_ERR_FORMAT, "%s: metadata sites is not a JSON list", path);
        goto fail;
    }
    for (size_t i = 0; i < json_array_size(sj); i++) {
        const char *sn = json_string_value(json_array_get(sj, i));
        int site = sn ? pr_site_parse(sn) : -1;
        if (site < 0) {
            /* sn belongs to sj: report before releasing it */
            rc = pr_errorf(err, PR_ERR_FORMAT, "%s: metadata sites: unknown site '%s'", path, sn ? sn : "?");
            json_decref(sj);
            goto fail;
        }
        f->sites |= PR_SITE_BIT(site);
    }
    json_decref(sj);
    /* layers */
    const char *lt = st_metadata(f->st, "layers");
    if (!lt || !strcmp(lt, "all")) {
        f->all_layers = 1;
    } else {
        json_t *lj = json_loads(lt, 0, &je);
        if (!lj || !json_is_array(lj) || json_array_size(lj) == 0) {
            json_decref(lj);
            rc = pr_errorf(err, PR_ERR_FORMAT, "%s: metadata layers is neither 'all' nor a JSON list", path);
            goto fail;
        }
        f->n_layers = (int)json_array_size(lj);
        f->layers = malloc((size_t)f->n_layers * sizeof *f->layers);
        for (int i = 0; f->layers && i < f->n_layers; i++)
            f->layers[i] = (int)json_integer_value(json_array_get(lj, (size_t)i));
        json_decref(lj);
        if (!f->layers) {
            rc = pr_errorf(err, PR_ERR_NOMEM, "%s: out of memory", path);
            goto fail;
        }
    }
    if ((rc = parse_options(f, st_metadata(f->st, "options"), -1, err)) ||
        (rc = parse_options(f, st_metadata(f->st, "site_options"), -2, err)))
        goto fail;
    *out = f;
    return PR_OK;
fail:
    pr_module_file_close(f);
    return rc;
}

void pr_module_file_spec(const pr_module_file *f, pr_module_spec *spec)
{
    memset(spec, 0, sizeof *spec);
    spec->technique = f->t;
    spec->name = f->saved_name;
    spec->sites = f->sites;
    spec->layers = f->all_layers ? NULL : f->layers;
    spec->n_layers = f->all_layers ? 0 : f->n_layers;
    spec->options = f->opts;
    spec->n_options = f->n_opts;
    spec->trainable = 1;
    spec->gate = f->gated;
    if (f->has_seed)
        spec->seed = f->seed;
}

int pr_module_file_check_base(const pr_module_file *f, const char *fingerprint, pr_error *err)
{
    /* a PEFT adapter records peftref's fingerprint only when peftref wrote
     * it; others are checked by their tensor names and shapes */
    const char *saved = st_metadata(f->st, f->peft_dir ? "peftref_base_fingerprint" : "base_fingerprint");
    if (f->peft_dir && !saved)
        return PR_OK;
    if (saved && fingerprint && !strcmp(saved, fingerprint))
        return PR_OK;
    const char *cfg = st_metadata(f->st, f->peft_dir ? "peftref_base_config" : "base_config");
    return pr_errorf(err, PR_ERR_INVALID, "%s: saved on another base model (fingerprint %s, base %s; this model's is "
                     "%s); use force: true to load it anyway", f->path, saved ? saved : "missing", cfg ? cfg : "?",
                     fingerprint ? fingerprint : "?");
}
