/* peftref export --format peft: the host's side of a technique's write()
 * (include/peftref/ext/peft_config.h, struct pr_peft_writer) over the run's
 * module and the adapter being written.
 *
 * write() sets its type's adapter_config.json fields through put_*() and
 * reshapes or makes the adapter's tensors; what every type shares (the
 * module's options, PEFT's module names of the sites, target_modules,
 * layers_to_transform, *_pattern objects) is here once.  A failing service
 * records its message through fail() as write() itself does; the first
 * message recorded is the one printed. */
#include "config.h"

#include <jansson.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "export_peft.h"
#include "peft_adapter.h"
#include "peftref/site.h"

struct pr_peft_out {
    job *j;
    adapter *a;
    json_t *c;               /* adapter_config.json */
    pr_peft_model model;
    int failed;
    char msg[PR_ERROR_MSG_MAX];
    char note[512];
    /* what write() may still hold a pointer to (tensor names it was given,
     * tensor data replaced or dropped), freed when it has returned */
    void **kept;
    int n_kept, cap_kept;
};

/* Free p once write() has returned; 0, or -1 (p freed now) when out of memory. */
static int keep(pr_peft_out *o, void *p)
{
    if (o->n_kept == o->cap_kept) {
        int cap = o->cap_kept ? 2 * o->cap_kept : 16;
        void **v = realloc(o->kept, (size_t)cap * sizeof *v);
        if (!v) {
            free(p);
            return -1;
        }
        o->kept = v;
        o->cap_kept = cap;
    }
    o->kept[o->n_kept++] = p;
    return 0;
}

/* ---- the module -------------------------------------------------------------------------------------- */

static const pr_peft_model *w_model(pr_peft_out *o)
{
    return &o->model;
}

static const char *w_technique(pr_peft_out *o)
{
    return o->j->t->name;
}

static const char *w_module_name(pr_peft_out *o)
{
    return pr_module_name(o->j->mod);
}

static const char *w_site_path(pr_peft_out *o, int site)
{
    return site < 0 || site >= PR_SITE_COUNT ? NULL : peft_site_path(o->j->cfg, site);
}

static const char *w_blocks_path(pr_peft_out *o)
{
    return peft_blocks_path(o->j->cfg);
}

static const char *w_site_name(pr_peft_out *o, int site)
{
    (void)o;
    return pr_site_name(site);
}

static int w_fail(pr_peft_out *o, int code, const char *fmt, ...)
{
    if (!o->failed) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(o->msg, sizeof o->msg, fmt, ap);
        va_end(ap);
        o->failed = 1;
    }
    return code;
}

static double w_opt_num(pr_peft_out *o, const char *name, int site, double def)
{
    int i = pr_module_option_index(o->j->mod, name);
    if (i < 0)
        return def;
    const pr_option_value *v = site < 0 ? pr_module_option(o->j->mod, i) : pr_module_site_option(o->j->mod, site, i);
    return v ? v->num : def;
}

static const char *w_opt_str(pr_peft_out *o, const char *name)
{
    int i = pr_module_option_index(o->j->mod, name);
    const pr_option_value *v = i < 0 ? NULL : pr_module_option(o->j->mod, i);
    return v && v->str ? v->str : NULL;
}

static uint32_t w_sites(pr_peft_out *o)
{
    return pr_module_sites(o->j->mod);
}

static const int *w_layers(pr_peft_out *o, int *n)
{
    int k = 0;
    const int *ls = pr_module_layers(o->j->mod, &k);
    if (n)
        *n = ls ? k : 0;
    return ls;
}

static int w_one_value(pr_peft_out *o, const char *option, const char *field, double *out)
{
    double v = w_opt_num(o, option, -1, 0);
    uint32_t sites = w_sites(o);
    for (int s = 0; s < PR_SITE_COUNT; s++)
        if ((sites & PR_SITE_BIT(s)) && w_opt_num(o, option, s, v) != v)
            return w_fail(o, PR_PEFT_ERR_UNSUPPORTED, "module '%s' (technique %s) sets %s per site (%g at %s, %g for "
                          "the module); PEFT's %s has one value for every module; use --format peftref",
                          w_module_name(o), w_technique(o), option, w_opt_num(o, option, s, v), pr_site_name(s), v,
                          field);
    if (out)
        *out = v;
    return PR_PEFT_OK;
}

/* ---- adapter_config.json ------------------------------------------------------------------------------- */

/* v as JSON: an integer when whole */
static json_t *num_json(double v)
{
    return v == floor(v) && fabs(v) < 1e15 ? json_integer((json_int_t)v) : json_real(v);
}

static int set_field(pr_peft_out *o, const char *field, json_t *v)
{
    if (!field || !v) {
        json_decref(v);
        return w_fail(o, PR_PEFT_ERR_INVALID, "technique %s: its Hugging Face PEFT writer sets %s to no valid JSON "
                      "value", w_technique(o), field ? field : "a field without a name");
    }
    if (json_object_set_new(o->c, field, v) != 0)
        return w_fail(o, PR_PEFT_ERR_NOMEM, "out of memory");
    return PR_PEFT_OK;
}

static json_t *parse(pr_peft_out *o, const char *field, const char *text)
{
    json_error_t e;
    json_t *v = text ? json_loads(text, JSON_DECODE_ANY, &e) : NULL;
    if (!v)
        w_fail(o, PR_PEFT_ERR_INVALID, "technique %s: its Hugging Face PEFT writer's value for %s is not JSON (%s): %s",
               w_technique(o), field ? field : "?", text ? e.text : "none given", text ? text : "");
    return v;
}

static int w_put_json(pr_peft_out *o, const char *field, const char *text)
{
    json_t *v = parse(o, field, text);
    return v ? set_field(o, field, v) : PR_PEFT_ERR_INVALID;
}

static int w_put_str(pr_peft_out *o, const char *field, const char *s)
{
    return set_field(o, field, s ? json_string(s) : json_null());
}

static int w_put_num(pr_peft_out *o, const char *field, double v)
{
    return set_field(o, field, num_json(v));
}

static int w_put_real(pr_peft_out *o, const char *field, double v)
{
    return set_field(o, field, json_real(v));
}

static int w_put_item(pr_peft_out *o, const char *field, const char *key, const char *text)
{
    json_t *v = parse(o, field, text);
    if (!v)
        return PR_PEFT_ERR_INVALID;
    json_t *to = field ? json_object_get(o->c, field) : NULL;
    if (!to || json_is_null(to)) {
        int rc = set_field(o, field, key ? json_object() : json_array());
        if (rc) {
            json_decref(v);
            return rc;
        }
        to = json_object_get(o->c, field);
    }
    if (key ? !json_is_object(to) : !json_is_array(to)) {
        json_decref(v);
        return w_fail(o, PR_PEFT_ERR_INVALID, "technique %s: its Hugging Face PEFT writer adds %s to %s, which is not "
                      "%s", w_technique(o), key ? key : "an element", field, key ? "an object" : "a list");
    }
    if (key)
        return json_object_set_new(to, key, v) ? w_fail(o, PR_PEFT_ERR_NOMEM, "out of memory") : PR_PEFT_OK;
    size_t i;
    json_t *e;
    json_array_foreach(to, i, e) {
        if (json_equal(e, v)) {
            json_decref(v);
            return PR_PEFT_OK;
        }
    }
    return json_array_append_new(to, v) ? w_fail(o, PR_PEFT_ERR_NOMEM, "out of memory") : PR_PEFT_OK;
}

static int w_del(pr_peft_out *o, const char *field)
{
    if (field)
        json_object_del(o->c, field);
    return PR_PEFT_OK;
}

/* GPT-2's paths are written whole: "c_proj" alone would be both attn.c_proj
 * and mlp.c_proj; the LLaMA family's last component is unique. */
static const char *w_config_name(pr_peft_out *o, int site)
{
    const char *p = w_site_path(o, site);
    if (!p || o->j->cfg->family == PR_FAMILY_GPT2)
        return p;
    const char *dot = strrchr(p, '.');
    return dot ? dot + 1 : p;
}

static int w_put_targets(pr_peft_out *o, const char *field, uint32_t sites)
{
    json_t *a = json_array();
    for (int s = 0; a && s < PR_SITE_COUNT; s++) {
        const char *name = (sites & PR_SITE_BIT(s)) ? w_config_name(o, s) : NULL;
        int dup = 0;
        size_t i;
        json_t *e;
        json_array_foreach(a, i, e) dup |= name && !strcmp(json_string_value(e), name);
        if (name && !dup)
            json_array_append_new(a, json_string(name));
    }
    return set_field(o, field, a);
}

static int w_put_layers(pr_peft_out *o)
{
    int n = 0;
    const int *ls = w_layers(o, &n);
    if (!ls) {
        int rc = set_field(o, "layers_to_transform", json_null());
        return rc ? rc : set_field(o, "layers_pattern", json_null());
    }
    json_t *a = json_array();
    for (int i = 0; i < n; i++)
        json_array_append_new(a, json_integer(ls[i]));
    int rc = set_field(o, "layers_to_transform", a);
    return rc ? rc : set_field(o, "layers_pattern", json_string(o->model.layers_name));
}

static int w_put_pattern(pr_peft_out *o, const char *field, const char *option, double def)
{
    json_t *p = json_object();
    uint32_t sites = w_sites(o);
    for (int s = 0; s < PR_SITE_COUNT; s++) {
        const char *name = (sites & PR_SITE_BIT(s)) ? w_config_name(o, s) : NULL;
        double v = name ? w_opt_num(o, option, s, def) : def;
        if (v != def)
            json_object_set_new(p, name, num_json(v));
    }
    return set_field(o, field, p);
}

/* ---- the module's parameters and the adapter's tensors ------------------------------------------------- */

static int w_n_params(pr_peft_out *o)
{
    return pr_module_n_params(o->j->mod);
}

static int w_param(pr_peft_out *o, int i, pr_peft_param *p)
{
    pr_module_param mp;
    if (i < 0 || i >= w_n_params(o) || pr_module_param_at(o->j->mod, i, &mp) != PR_OK)
        return w_fail(o, PR_PEFT_ERR_NOTFOUND, "module '%s' has no parameter %d", w_module_name(o), i);
    memset(p, 0, sizeof *p);
    p->name = mp.param;
    p->site = mp.scope == PR_SCOPE_INSERTION || mp.scope == PR_SCOPE_SITE ? mp.site : -1;
    p->layer = mp.scope == PR_SCOPE_INSERTION || mp.scope == PR_SCOPE_LAYER ? mp.layer : -1;
    p->ndim = mp.ndim > 0 && mp.ndim <= 4 ? (uint32_t)mp.ndim : 0;
    for (uint32_t d = 0; d < p->ndim; d++)
        p->shape[d] = mp.shape[d];
    p->data = mp.data;
    return PR_PEFT_OK;
}

static int w_n_tensors(pr_peft_out *o)
{
    return o->a->n;
}

static int w_tensor(pr_peft_out *o, int i, pr_peft_tensor *t)
{
    if (i < 0 || i >= o->a->n)
        return w_fail(o, PR_PEFT_ERR_NOTFOUND, "the adapter has no tensor %d", i);
    const tensor_out *v = &o->a->t[i];
    /* a copy of the name: add_tensor may move the list that holds it */
    char *name = strdup(v->name);
    if (!name || keep(o, name))
        return w_fail(o, PR_PEFT_ERR_NOMEM, "out of memory");
    memset(t, 0, sizeof *t);
    t->name = name;
    t->ndim = (uint32_t)v->ndim;
    for (int d = 0; d < v->ndim; d++)
        t->shape[d] = v->shape[d];
    t->data = v->data;
    return PR_PEFT_OK;
}

static int w_find_tensor(pr_peft_out *o, const char *name)
{
    for (int i = 0; name && i < o->a->n; i++)
        if (!strcmp(o->a->t[i].name, name))
            return i;
    return -1;
}

/* ndim in 1..4 and a shape of non-negative sizes: their product, else -1 */
static int64_t shape_numel(uint32_t ndim, const int64_t *shape)
{
    if (ndim < 1 || ndim > 4 || !shape)
        return -1;
    int64_t n = 1;
    for (uint32_t d = 0; d < ndim; d++) {
        if (shape[d] < 0 || (shape[d] && n > INT64_MAX / 4 / shape[d]))
            return -1;
        n *= shape[d];
    }
    return n;
}

static float *w_add_tensor(pr_peft_out *o, const char *name, uint32_t ndim, const int64_t *shape)
{
    if (!name || strlen(name) >= sizeof o->a->t[0].name || shape_numel(ndim, shape) < 0) {
        w_fail(o, PR_PEFT_ERR_INVALID, "technique %s: its Hugging Face PEFT writer adds a tensor '%s' of %u "
               "dimensions, which the adapter cannot hold", w_technique(o), name ? name : "", ndim);
        return NULL;
    }
    tensor_out *t = xp_add_tensor(o->a, name, (int)ndim, shape);
    if (!t)
        w_fail(o, PR_PEFT_ERR_NOMEM, "out of memory");
    return t ? t->data : NULL;
}

static int w_set_tensor(pr_peft_out *o, int i, uint32_t ndim, const int64_t *shape, const float *data)
{
    int64_t n = shape_numel(ndim, shape);
    if (i < 0 || i >= o->a->n || n < 0 || (n && !data))
        return w_fail(o, PR_PEFT_ERR_INVALID, "technique %s: its Hugging Face PEFT writer gives tensor %d a shape or "
                      "data the adapter cannot hold", w_technique(o), i);
    float *d = malloc((size_t)(n ? n : 1) * sizeof *d);
    if (!d)
        return w_fail(o, PR_PEFT_ERR_NOMEM, "out of memory");
    if (n)
        memcpy(d, data, (size_t)n * sizeof *d);
    tensor_out *t = &o->a->t[i];
    if (keep(o, t->data)) {   /* write() may hold the old data */
        t->data = NULL;
        free(d);
        return w_fail(o, PR_PEFT_ERR_NOMEM, "out of memory");
    }
    t->data = d;
    t->ndim = (int)ndim;
    for (uint32_t k = 0; k < 4; k++)
        t->shape[k] = k < ndim ? shape[k] : 0;
    return PR_PEFT_OK;
}

static int w_drop_tensors(pr_peft_out *o)
{
    int oom = 0;
    for (int i = 0; i < o->a->n; i++)
        oom |= keep(o, o->a->t[i].data) != 0;
    free(o->a->t);
    o->a->t = NULL;
    o->a->n = 0;
    return oom ? w_fail(o, PR_PEFT_ERR_NOMEM, "out of memory") : PR_PEFT_OK;
}

static int w_note(pr_peft_out *o, const char *text)
{
    size_t k = strlen(o->note);
    if (text && *text)
        snprintf(o->note + k, sizeof o->note - k, "%s%s", k ? "; " : "", text);
    return PR_PEFT_OK;
}

/* ---- write() ------------------------------------------------------------------------------------------ */

static const pr_peft_writer writer = {
    .struct_size = sizeof(pr_peft_writer),
    .model = w_model,
    .technique = w_technique,
    .module_name = w_module_name,
    .site_path = w_site_path,
    .blocks_path = w_blocks_path,
    .fail = w_fail,
    .opt_num = w_opt_num,
    .opt_str = w_opt_str,
    .one_value = w_one_value,
    .sites = w_sites,
    .layers = w_layers,
    .put_json = w_put_json,
    .put_str = w_put_str,
    .put_num = w_put_num,
    .put_real = w_put_real,
    .put_item = w_put_item,
    .del = w_del,
    .config_name = w_config_name,
    .put_targets = w_put_targets,
    .put_layers = w_put_layers,
    .put_pattern = w_put_pattern,
    .n_params = w_n_params,
    .param = w_param,
    .n_tensors = w_n_tensors,
    .tensor = w_tensor,
    .find_tensor = w_find_tensor,
    .add_tensor = w_add_tensor,
    .set_tensor = w_set_tensor,
    .drop_tensors = w_drop_tensors,
    .note = w_note,
    .site_name = w_site_name,
};

int xp_write_type(job *j, adapter *a, json_t *c, int (*write)(const pr_peft_writer *, pr_peft_out *), char *note,
                  size_t note_len)
{
    pr_peft_out *o = calloc(1, sizeof *o);
    if (!o)
        return ERR("out of memory");
    o->j = j;
    o->a = a;
    o->c = c;
    peft_model_of(j->cfg, &o->model);
    int rc = write(&writer, o);
    for (int i = 0; i < o->n_kept; i++)
        free(o->kept[i]);
    free(o->kept);
    if (rc || o->failed) {
        if (o->failed)
            (void)ERR("%s", o->msg);
        else
            (void)ERR("module '%s': technique %s's Hugging Face PEFT writer failed (code %d) without a message",
                pr_module_name(j->mod), j->t->name, rc);
        free(o);
        return 1;
    }
    snprintf(note, note_len, "%s", o->note);
    free(o);
    return 0;
}
