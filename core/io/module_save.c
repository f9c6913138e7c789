/* peftref core: writing a saved module, and the base model's fingerprint. */
#include "config.h"

#include <jansson.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model_internal.h"
#include "module_file.h"

#define FP_SAMPLES MODEL_FP_SAMPLES

/* ---- fingerprint --------------------------------------------------------------------------- */

typedef struct fnv {
    uint64_t h;
} fnv;

static void fnv_bytes(fnv *f, const void *p, size_t n)
{
    const unsigned char *b = p;
    uint64_t h = f->h;
    for (size_t i = 0; i < n; i++) {
        h ^= b[i];
        h *= 0x100000001b3ull;
    }
    f->h = h;
}

void pr_model_fingerprint(const pr_model *m, char *buf, size_t len)
{
    fnv f = { 0xcbf29ce484222325ull };
    const pr_model_config *c = pr_model_get_config(m);
    char cs[512];
    snprintf(cs, sizeof cs,
             "family=%d L=%d C=%d H=%d Hkv=%d hd=%d F=%d V=%d S=%d eps=%.9g bias=%d tied=%d fused=%d norm=%d act=%d "
             "pos=%d theta=%.9g",
             c->family, c->n_layers, c->d_model, c->n_heads, c->n_kv_heads, c->d_head, c->d_ff, c->vocab_size,
             c->max_seq, (double)c->norm_eps, c->bias, c->tied_head, c->fused_qkv, c->norm, c->act, c->pos,
             (double)c->rope_theta);
    fnv_bytes(&f, cs, strlen(cs) + 1);
    for (int i = 0; i < pr_model_n_tensors(m); i++) {
        const pr_tensor_info *t = pr_model_tensor(m, i);
        if (t->kind == PR_TENSOR_MODULE)
            continue;
        fnv_bytes(&f, t->name, strlen(t->name) + 1);
        int32_t nd = t->ndim;
        fnv_bytes(&f, &nd, sizeof nd);
        fnv_bytes(&f, t->shape, (size_t)t->ndim * sizeof t->shape[0]);
        const float *kept = model_tensor_fp_samples(m, t);
        if (kept) { /* stored in bf16: the f32 values it was converted from */
            fnv_bytes(&f, kept, (size_t)model_fp_sample_count(t->numel) * sizeof(float));
            continue;
        }
        if (!t->data)
            continue;
        if (t->numel <= FP_SAMPLES) {
            fnv_bytes(&f, t->data, (size_t)t->numel * sizeof(float));
        } else {
            for (int64_t k = 0; k < FP_SAMPLES; k++) {
                int64_t at = (int64_t)((__int128)k * t->numel / FP_SAMPLES);
                fnv_bytes(&f, t->data + at, sizeof(float));
            }
        }
    }
    snprintf(buf, len, "fp1:%016llx", (unsigned long long)f.h);
}
/* ---- technique declarations, read as the host reads a plugin's arrays -------------------------- */

void mf_read_decl(void *dst, size_t host_size, const void *base, uint32_t i)
{
    memset(dst, 0, host_size);
    if (!base)
        return;
    uint32_t stride = *(const uint32_t *)base;
    if (stride == 0)
        stride = (uint32_t)host_size;
    const char *src = (const char *)base + (size_t)i * stride;
    uint32_t own = *(const uint32_t *)src;
    memcpy(dst, src, own < host_size ? own : host_size);
}

static json_t *option_json(const pr_option_decl *o, const pr_option_value *v)
{
    switch (o->type) {
    case PR_OPT_INT: return json_integer((json_int_t)llround(v->num));
    case PR_OPT_FLOAT: return json_real(v->num);
    case PR_OPT_BOOL: return json_boolean(v->num != 0.0);
    case PR_OPT_ENUM: return json_string(v->str ? v->str : "");
    default: return json_string(v->str ? v->str : "");
    }
}

/* A module's resolved options as compact JSON, the "options" a saved module
 * records (the run fingerprint, core/train/run_fingerprint.c, compares them);
 * NULL when out of memory. */
char *mf_module_options_json(const pr_module *mod)
{
    const pr_technique *t = pr_module_technique(mod);
    json_t *oj = json_object();
    if (!oj)
        return NULL;
    for (uint32_t i = 0; t && i < t->n_options; i++) {
        pr_option_decl d;
        mf_read_decl(&d, sizeof d, t->options, i);
        json_object_set_new(oj, d.name, option_json(&d, pr_module_option(mod, (int)i)));
    }
    char *s = json_dumps(oj, JSON_COMPACT | JSON_SORT_KEYS);
    json_decref(oj);
    return s;
}

static int same_value(const pr_option_decl *o, const pr_option_value *a, const pr_option_value *b)
{
    if (o->type == PR_OPT_STRING)
        return !strcmp(a->str ? a->str : "", b->str ? b->str : "");
    return a->num == b->num;
}
/* ---- saving ----------------------------------------------------------------------------------------- */

typedef struct out_tensor {
    char *name;
    int ndim;
    int64_t shape[4];
    float *data;
} out_tensor;

typedef struct saver {
    pr_module *mod;
    const pr_model_config *cfg;
    const pr_technique *tech;
    int all_layers;
    int peft;             /* 1: PEFT names */
    int pass;             /* 0: decide names, 1: gather */
    int fold;             /* 1: the copies are fold() output (fold_params) */
    uint32_t skip_flags;  /* parameters left out (training-only, when folded) */
    out_tensor *t;
    int n, cap;
} saver;

static out_tensor *out_find(saver *s, const char *name)
{
    for (int i = 0; i < s->n; i++)
        if (!strcmp(s->t[i].name, name))
            return &s->t[i];
    return NULL;
}

static out_tensor *out_add(saver *s, const char *name, int ndim, const int64_t *shape, float fill, pr_error *err)
{
    if (s->n == s->cap) {
        int cap = s->cap ? 2 * s->cap : 16;
        out_tensor *t = realloc(s->t, (size_t)cap * sizeof *t);
        if (!t) {
            pr_errorf(err, PR_ERR_NOMEM, "out of memory saving a module");
            return NULL;
        }
        s->t = t;
        s->cap = cap;
    }
    out_tensor *o = &s->t[s->n];
    memset(o, 0, sizeof *o);
    int64_t numel = 1;
    for (int d = 0; d < ndim; d++) {
        o->shape[d] = shape[d];
        numel *= shape[d];
    }
    o->ndim = ndim;
    o->name = strdup(name);
    o->data = malloc((size_t)(numel ? numel : 1) * sizeof(float));
    if (!o->name || !o->data) {
        free(o->name);
        free(o->data);
        pr_errorf(err, PR_ERR_NOMEM, "out of memory saving a module");
        return NULL;
    }
    for (int64_t i = 0; i < numel; i++)
        o->data[i] = fill;
    s->n++;
    return o;
}

/* Host name of a copy: the table name with the module's name as it is. */
static int save_param(void *arg, const pr_module_param *p, pr_error *err)
{
    saver *s = arg;
    if (p->flags & s->skip_flags)
        return PR_OK;
    placement pl;
    if (s->pass == 0) {
        if (!peft_place(s->tech, s->fold, p, s->cfg, s->all_layers, &pl))
            s->peft = 0;
        return PR_OK;
    }
    if (!s->peft) {
        out_tensor *o = out_add(s, p->name, p->ndim, p->shape, 0.0f, err);
        if (!o)
            return PR_ERR_NOMEM;
        memcpy(o->data, p->data, (size_t)p->numel * sizeof(float));
        return PR_OK;
    }
    peft_place(s->tech, s->fold, p, s->cfg, s->all_layers, &pl);
    out_tensor *o = out_find(s, pl.name);
    if (!o && !(o = out_add(s, pl.name, pl.ndim, pl.full, pl.fill, err)))
        return PR_ERR_NOMEM;
    /* copies sharing a tensor (packed vectors, concatenated layers) agree on its shape */
    int same = o->ndim == pl.ndim;
    for (int d = 0; same && d < pl.ndim; d++)
        same = o->shape[d] == pl.full[d];
    if (!same)
        return pr_errorf(err, PR_ERR_INVALID, "module tensor '%s' (Hugging Face PEFT's '%s') does not fit the "
                         "tensor other copies put there", p->name, pl.name);
    peft_place_values(&pl, o->data, p->data, 1);
    return PR_OK;
}

static int has_training_only(const pr_module *mod)
{
    for (int i = 0; i < pr_module_n_params(mod); i++) {
        pr_module_param p;
        pr_module_param_at(mod, i, &p);
        if (p.flags & PR_PARAM_TRAINING_ONLY)
            return 1;
    }
    return 0;
}

static int gather(saver *s, pr_error *err)
{
    pr_module *mod = s->mod;
    int folded = has_training_only(mod);
    s->skip_flags = (folded ? PR_PARAM_TRAINING_ONLY : 0) | PR_PARAM_REGENERATE;
    s->fold = 0;
    for (int i = 0; i < pr_module_n_params(mod); i++) {
        pr_module_param p;
        pr_module_param_at(mod, i, &p);
        int rc = save_param(s, &p, err);
        if (rc)
            return rc;
    }
    if (!folded)
        return PR_OK;
    s->fold = 1;
    return pr_module_fold(mod, save_param, s, err);
}

static char *json_text(json_t *j)
{
    char *s = json_dumps(j, JSON_COMPACT | JSON_SORT_KEYS | JSON_ENCODE_ANY);
    json_decref(j);
    return s;
}

static char *config_json(const pr_model_config *c)
{
    json_t *o = json_object();
    json_object_set_new(o, "family", json_string(c->family == PR_FAMILY_GPT2 ? "gpt2" : "llama"));
    json_object_set_new(o, "n_layers", json_integer(c->n_layers));
    json_object_set_new(o, "d_model", json_integer(c->d_model));
    json_object_set_new(o, "n_heads", json_integer(c->n_heads));
    json_object_set_new(o, "n_kv_heads", json_integer(c->n_kv_heads));
    json_object_set_new(o, "d_head", json_integer(c->d_head));
    json_object_set_new(o, "d_ff", json_integer(c->d_ff));
    json_object_set_new(o, "vocab", json_integer(c->vocab_size));
    json_object_set_new(o, "max_seq", json_integer(c->max_seq));
    return json_text(o);
}

static json_t *num_or_null(double v)
{
    return isfinite(v) ? json_real(v) : json_null();
}

int pr_module_save(pr_module *mod, const char *path, const pr_module_save_info *info, pr_error *err)
{
    if (!mod || !path)
        return pr_errorf(err, PR_ERR_INVALID, "module save: NULL module or path");
    const pr_technique *t = pr_module_technique(mod);
    pr_model *m = NULL;
    const char *mname = pr_module_name(mod);
    saver s;
    memset(&s, 0, sizeof s);
    s.mod = mod;
    s.tech = t;
    int n_layers_used = 0;
    s.all_layers = pr_module_layers(mod, &n_layers_used) == NULL;
    int rc = PR_OK;
    char fp[64];
    char *opts = NULL, *site_opts = NULL, *sites = NULL, *layers = NULL, *cfgj = NULL, *train = NULL;
    st_entry *entries = NULL;
    int is_select = t->integration == PR_INTEGRATE_SELECT;

    m = pr_module_model(mod);
    s.cfg = pr_model_get_config(m);
    if (info && info->base_fingerprint)
        snprintf(fp, sizeof fp, "%s", info->base_fingerprint);
    else
        pr_model_fingerprint(m, fp, sizeof fp);

    if (is_select) {
        if (!pr_module_is_trainable(mod) || pr_module_n_selected(mod) == 0)
            return pr_errorf(err, PR_ERR_INVALID, "module '%s' (technique %s): a frozen selection module holds no "
                             "tensors of its own to save", mname, t->name);
        for (int i = 0; i < pr_module_n_selected(mod) && !rc; i++) {
            const pr_tensor_info *ti = pr_model_find_tensor(m, pr_module_selected(mod, i));
            char name[512];
            snprintf(name, sizeof name, "%s/%s", mname, ti->name);
            out_tensor *o = out_add(&s, name, ti->ndim, ti->shape, 0.0f, err);
            if (!o)
                rc = PR_ERR_NOMEM;
            else
                memcpy(o->data, ti->data, (size_t)ti->numel * sizeof(float));
        }
    } else {
        s.peft = t->peft_type != NULL;
        s.pass = 0;
        if ((rc = gather(&s, err)) == PR_OK) {
            s.pass = 1;
            rc = gather(&s, err);
        }
    }
    if (rc)
        goto done;

    /* options: every resolved value; site_options: what differs per site */
    json_t *oj = json_object(), *so = json_object();
    for (uint32_t i = 0; i < t->n_options; i++) {
        pr_option_decl d;
        mf_read_decl(&d, sizeof d, t->options, i);
        const pr_option_value *base = pr_module_option(mod, (int)i);
        json_object_set_new(oj, d.name, option_json(&d, base));
        for (int site = 0; site < PR_SITE_COUNT; site++) {
            if (!(pr_module_sites(mod) & PR_SITE_BIT(site)))
                continue;
            const pr_option_value *v = pr_module_site_option(mod, site, (int)i);
            if (same_value(&d, base, v))
                continue;
            json_t *sj = json_object_get(so, pr_site_name(site));
            if (!sj) {
                sj = json_object();
                json_object_set_new(so, pr_site_name(site), sj);
            }
            json_object_set_new(sj, d.name, option_json(&d, v));
        }
    }
    opts = json_text(oj);
    site_opts = json_text(so);
    json_t *sj = json_array();
    for (int site = 0; site < PR_SITE_COUNT; site++)
        if (pr_module_sites(mod) & PR_SITE_BIT(site))
            json_array_append_new(sj, json_string(pr_site_name(site)));
    sites = json_text(sj);
    if (s.all_layers) {
        layers = strdup("all");
    } else {
        int nl = 0;
        const int *ls = pr_module_layers(mod, &nl);
        json_t *lj = json_array();
        for (int i = 0; i < nl; i++)
            json_array_append_new(lj, json_integer(ls[i]));
        layers = json_text(lj);
    }
    cfgj = config_json(s.cfg);
    json_t *tr = json_object();
    json_object_set_new(tr, "steps", json_integer(info ? info->steps : 0));
    json_object_set_new(tr, "final_train_loss", num_or_null(info ? info->final_train_loss : NAN));
    json_object_set_new(tr, "final_val_loss", num_or_null(info ? info->final_val_loss : NAN));
    train = json_text(tr);
    if (!opts || !site_opts || !sites || !layers || !cfgj || !train) {
        rc = pr_errorf(err, PR_ERR_NOMEM, "%s: out of memory", path);
        goto done;
    }
    int folded = !is_select && has_training_only(mod);
    /* frozen buffers regenerated on load need the module's seed */
    int regenerates = 0;
    for (int i = 0; i < pr_module_n_params(mod); i++) {
        pr_module_param p;
        pr_module_param_at(mod, i, &p);
        regenerates |= (p.flags & PR_PARAM_REGENERATE) != 0;
    }
    char seed_hex[24];
    snprintf(seed_hex, sizeof seed_hex, "%016llx", (unsigned long long)pr_module_seed(mod));
    st_kv meta[] = {
        { "format", "peftref-module" },
        { "format_version", "1" },
        { "peftref_version", pr_version() },
        { "technique", t->name },
        { "technique_version", t->version ? t->version : "0" },
        { "name", mname },
        { "options", opts },
        { "site_options", site_opts },
        { "sites", sites },
        { "layers", layers },
        { "base_fingerprint", fp },
        { "base_config", cfgj },
        { "training", train },
        { "tensor_names", s.peft ? "peft" : "peftref" },
        { "folded", folded ? "true" : "false" },
        { "gated", pr_module_is_gated(mod) ? "true" : "false" },
        { "seed", seed_hex },
        { "peft_type", s.peft ? t->peft_type : "" },
    };
    int n_meta = (int)(sizeof meta / sizeof meta[0]) - (s.peft ? 0 : 1);
    if (!regenerates) {   /* no seed to keep: drop it, keeping peft_type */
        meta[n_meta - (s.peft ? 2 : 1)] = meta[n_meta - 1];
        n_meta--;
    }
    entries = calloc((size_t)(s.n ? s.n : 1), sizeof *entries);
    if (!entries) {
        rc = pr_errorf(err, PR_ERR_NOMEM, "%s: out of memory", path);
        goto done;
    }
    for (int i = 0; i < s.n; i++) {
        entries[i].name = s.t[i].name;
        entries[i].ndim = s.t[i].ndim;
        memcpy(entries[i].shape, s.t[i].shape, sizeof s.t[i].shape);
        entries[i].data = s.t[i].data;
        entries[i].dtype = ST_F32;
    }
    rc = st_write(path, entries, s.n, meta, n_meta, err);
done:
    for (int i = 0; i < s.n; i++) {
        free(s.t[i].name);
        free(s.t[i].data);
    }
    free(s.t);
    free(entries);
    free(opts);
    free(site_opts);
    free(sites);
    free(layers);
    free(cfgj);
    free(train);
    return rc;
}
