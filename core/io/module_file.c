/* peftref core: saved modules (include/peftref/module.h, docs/modules.md).
 *
 * A saved module is one safetensors file.  Its __metadata__ strings say
 * what to attach again (technique, technique_version, options,
 * site_options, sites, layers), on what (base_fingerprint, base_config),
 * how it came to be (training, peftref_version) and how its tensors are
 * named (tensor_names: "peft" or "peftref").
 *
 * Tensor names.  Where the technique exists in Hugging Face PEFT the file
 * uses PEFT's state-dict names and shapes, so a converter is a renaming:
 *   LoRA, DoRA   base_model.model.transformer.h.L.<module>.lora_A.weight
 *                (r, d_in), lora_B.weight (d_out, r),
 *                lora_magnitude_vector (d_out)
 *   (IA)^3       <module>.ia3_l: (d_out, 1) at a projection's output; GPT-2's
 *                fused attn.c_attn holds q, k and v in one (d_q + 2 d_kv, 1)
 *                vector whose q third is ones; (1, d_ff) at mlp.c_proj's input
 *   prompt       prompt_embeddings (n_tokens, d_model)
 *   prefix       prompt_embeddings (n_tokens, 2 L d_kv), layer l's keys in
 *                columns 2l d_kv .. and its values in (2l+1) d_kv ..
 * A module copy therefore lands in a file tensor as nb blocks of
 * (br, bc) elements at row r0 and columns c0 + b*cstep (one block for all
 * but the prefix).  Anything else (sites PEFT cannot name, such as GPT-2's
 * q slice, gates, other techniques) keeps the host's names
 * "<module>/h.<layer>.<site>.<param>" for the whole module. */
#include "config.h"

#include <jansson.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "peftref/peftref.h"
#include "peftref/module.h"
#include "safetensors.h"

#define FP_SAMPLES 65536

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

/* ---- Hugging Face PEFT names ----------------------------------------------------------------- */

typedef struct placement {
    char name[256];
    int ndim;
    int64_t shape[2];          /* the file tensor, viewed as (R, C) */
    int64_t r0, c0, cstep;
    int64_t nb, br, bc;        /* the copy as nb blocks of (br, bc) */
    float fill;                /* elements no copy covers */
} placement;

/* The module path of a projection site in Hugging Face's layout. */
static const char *hf_site_path(const pr_model_config *c, int site)
{
    if (c->family == PR_FAMILY_GPT2) {
        switch (site) {
        case PR_SITE_QKV: return c->fused_qkv ? "attn.c_attn" : NULL;
        case PR_SITE_O: return "attn.c_proj";
        case PR_SITE_FFN_UP: return "mlp.c_fc";
        case PR_SITE_FFN_DOWN: return "mlp.c_proj";
        default: return NULL;
        }
    }
    switch (site) {
    case PR_SITE_Q: return "self_attn.q_proj";
    case PR_SITE_K: return "self_attn.k_proj";
    case PR_SITE_V: return "self_attn.v_proj";
    case PR_SITE_O: return "self_attn.o_proj";
    case PR_SITE_FFN_UP: return "mlp.up_proj";
    case PR_SITE_FFN_GATE: return "mlp.gate_proj";
    case PR_SITE_FFN_DOWN: return "mlp.down_proj";
    default: return NULL;
    }
}

static const char *hf_layer_prefix(const pr_model_config *c)
{
    return c->family == PR_FAMILY_GPT2 ? "base_model.model.transformer.h" : "base_model.model.model.layers";
}

/* PEFT's peft_type for the technique, or NULL when PEFT lacks it. */
static const char *peft_type(const char *technique)
{
    if (!strcmp(technique, "lora") || !strcmp(technique, "dora"))
        return "LORA";
    if (!strcmp(technique, "ia3"))
        return "IA3";
    if (!strcmp(technique, "prompt_tuning"))
        return "PROMPT_TUNING";
    if (!strcmp(technique, "prefix_tuning") || !strcmp(technique, "prefix_tuning_mlp"))
        return "PREFIX_TUNING";
    return NULL;
}

static void one_block(placement *pl, const pr_module_param *p)
{
    pl->ndim = p->ndim == 1 ? 1 : 2;
    pl->shape[0] = p->shape[0];
    pl->shape[1] = p->ndim == 1 ? 1 : p->shape[1];
    pl->nb = 1;
    pl->br = pl->shape[0];
    pl->bc = pl->shape[1];
}

/* Where copy p of a module of technique tech goes in PEFT's layout; 0 when
 * PEFT has no name for it.  all_layers: the module uses every layer. */
static int peft_place(const char *tech, const pr_module_param *p, const pr_model_config *c, int all_layers,
                      placement *pl)
{
    memset(pl, 0, sizeof *pl);
    const char *type = peft_type(tech);
    if (!type || p->ndim < 1 || p->ndim > 3)
        return 0;
    int d_kv = c->n_kv_heads * c->d_head, d_q = c->n_heads * c->d_head;
    if (!strcmp(type, "LORA")) {
        const char *path = hf_site_path(c, p->site);
        if (!path || p->layer < 0 || p->scope != PR_SCOPE_INSERTION)
            return 0;
        const char *suffix;
        if (!strcmp(p->param, "lora_A") && p->ndim == 2)
            suffix = "lora_A.weight";
        else if (!strcmp(p->param, "lora_B") && p->ndim == 2)
            suffix = "lora_B.weight";
        else if (!strcmp(p->param, "lora_magnitude_vector") && p->ndim == 1)
            suffix = "lora_magnitude_vector";
        else
            return 0;
        snprintf(pl->name, sizeof pl->name, "%s.%d.%s.%s", hf_layer_prefix(c), p->layer, path, suffix);
        one_block(pl, p);
        return 1;
    }
    if (!strcmp(type, "IA3")) {
        if (strcmp(p->param, "ia3_l") || p->ndim != 1 || p->layer < 0 || p->scope != PR_SCOPE_INSERTION)
            return 0;
        const char *path;
        pl->ndim = 2;
        pl->nb = 1;
        pl->fill = 1.0f;
        if (p->site == PR_SITE_FFN_ACT) {
            /* PEFT's feed-forward form: (1, in_features) at the down projection */
            path = c->family == PR_FAMILY_GPT2 ? "mlp.c_proj" : "mlp.down_proj";
            pl->shape[0] = 1;
            pl->shape[1] = p->shape[0];
            pl->br = 1;
            pl->bc = p->shape[0];
        } else if (p->site == PR_SITE_ATTN_K || p->site == PR_SITE_ATTN_V) {
            int is_v = p->site == PR_SITE_ATTN_V;
            if (c->family == PR_FAMILY_GPT2) {
                if (!c->fused_qkv)
                    return 0;
                path = "attn.c_attn";
                pl->shape[0] = d_q + 2 * d_kv;
                pl->r0 = d_q + (is_v ? d_kv : 0);
            } else {
                path = is_v ? "self_attn.v_proj" : "self_attn.k_proj";
                pl->shape[0] = d_kv;
            }
            pl->shape[1] = 1;
            pl->br = p->shape[0];
            pl->bc = 1;
        } else {
            return 0;
        }
        snprintf(pl->name, sizeof pl->name, "%s.%d.%s.ia3_l", hf_layer_prefix(c), p->layer, path);
        return 1;
    }
    if (!strcmp(type, "PROMPT_TUNING")) {
        if (p->ndim != 2 || p->scope != PR_SCOPE_GLOBAL)
            return 0;
        snprintf(pl->name, sizeof pl->name, "prompt_embeddings");
        one_block(pl, p);
        return 1;
    }
    /* PREFIX_TUNING: (2, n, d_kv) per layer, every layer */
    if (!all_layers || p->ndim != 3 || p->shape[0] != 2 || p->shape[2] != d_kv || p->layer < 0 ||
        p->scope != PR_SCOPE_LAYER)
        return 0;
    snprintf(pl->name, sizeof pl->name, "prompt_embeddings");
    pl->ndim = 2;
    pl->shape[0] = p->shape[1];
    pl->shape[1] = (int64_t)2 * c->n_layers * d_kv;
    pl->c0 = (int64_t)2 * p->layer * d_kv;
    pl->cstep = d_kv;
    pl->nb = 2;
    pl->br = p->shape[1];
    pl->bc = d_kv;
    return 1;
}

/* Copy between a copy's values x (nb*br*bc) and the file tensor f (R, C). */
static void place(const placement *pl, float *f, float *x, int to_file)
{
    int64_t C = pl->shape[1];
    for (int64_t b = 0; b < pl->nb; b++)
        for (int64_t r = 0; r < pl->br; r++) {
            float *fr = f + (pl->r0 + r) * C + pl->c0 + b * pl->cstep;
            float *xr = x + (b * pl->br + r) * pl->bc;
            if (to_file)
                memcpy(fr, xr, (size_t)pl->bc * sizeof(float));
            else
                memcpy(xr, fr, (size_t)pl->bc * sizeof(float));
        }
}

/* ---- technique declarations, read as the host reads a plugin's arrays -------------------------- */

static void read_decl(void *dst, size_t host_size, const void *base, uint32_t i)
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
    const char *tech;
    int all_layers;
    int peft;             /* 1: PEFT names */
    int pass;             /* 0: decide names, 1: gather */
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
        if (!peft_place(s->tech, p, s->cfg, s->all_layers, &pl))
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
    peft_place(s->tech, p, s->cfg, s->all_layers, &pl);
    out_tensor *o = out_find(s, pl.name);
    if (!o && !(o = out_add(s, pl.name, pl.ndim, pl.shape, pl.fill, err)))
        return PR_ERR_NOMEM;
    place(&pl, o->data, p->data, 1);
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
    s->skip_flags = folded ? PR_PARAM_TRAINING_ONLY : 0;
    for (int i = 0; i < pr_module_n_params(mod); i++) {
        pr_module_param p;
        pr_module_param_at(mod, i, &p);
        int rc = save_param(s, &p, err);
        if (rc)
            return rc;
    }
    return folded ? pr_module_fold(mod, save_param, s, err) : PR_OK;
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
    s.tech = t->name;
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
        s.peft = peft_type(t->name) != NULL;
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
        read_decl(&d, sizeof d, t->options, i);
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
        { "peft_type", s.peft ? peft_type(t->name) : "" },
    };
    int n_meta = (int)(sizeof meta / sizeof meta[0]) - (s.peft ? 0 : 1);
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

/* ---- opening ------------------------------------------------------------------------------------------ */

struct pr_module_file {
    st_file *st;
    char *path;
    const pr_technique *t;      /* what to attach: the saved technique or its folded form */
    const char *saved_name;
    int peft;
    int folded;
    int gated;                  /* saved behind learned gates (spec gate) */
    int all_layers;
    int *layers;
    int n_layers;
    uint32_t sites;
    pr_option_setting *opts;
    int n_opts;
    char **strs;
    int n_strs;
};

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

static int has_option(const pr_technique *t, const char *name)
{
    for (uint32_t i = 0; i < t->n_options; i++) {
        pr_option_decl d;
        read_decl(&d, sizeof d, t->options, i);
        if (d.name && !strcmp(d.name, name))
            return 1;
    }
    return 0;
}

/* The folded form of technique t: a technique of the registry with the
 * same integration and sites whose parameters are exactly t's
 * fold_params (names and shapes) and whose options t also has.
 * (prefix_tuning_mlp folds into prefix_tuning.) */
static const pr_technique *folded_form(const pr_registry *reg, const pr_technique *t)
{
    for (int k = 0; k < pr_registry_count(reg); k++) {
        const pr_technique *u = pr_registry_technique(reg, k);
        if (u == t || u->integration != t->integration || u->sites != t->sites || u->n_params != t->n_fold_params)
            continue;
        int ok = 1;
        for (uint32_t i = 0; i < u->n_params && ok; i++) {
            pr_param_decl a, b;
            read_decl(&a, sizeof a, u->params, i);
            read_decl(&b, sizeof b, t->fold_params, i);
            ok = a.name && b.name && !strcmp(a.name, b.name) && a.shape && b.shape && !strcmp(a.shape, b.shape) &&
                 a.scope == b.scope && !(a.flags & PR_PARAM_TRAINING_ONLY);
        }
        for (uint32_t i = 0; i < u->n_options && ok; i++) {
            pr_option_decl d;
            read_decl(&d, sizeof d, u->options, i);
            ok = d.name && has_option(t, d.name);
        }
        if (ok)
            return u;
    }
    return NULL;
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
        if (!has_option(f->t, k))
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
    *out = NULL;
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
}

int pr_module_file_check_base(const pr_module_file *f, const char *fingerprint, pr_error *err)
{
    const char *saved = st_metadata(f->st, "base_fingerprint");
    if (saved && fingerprint && !strcmp(saved, fingerprint))
        return PR_OK;
    const char *cfg = st_metadata(f->st, "base_config");
    return pr_errorf(err, PR_ERR_INVALID, "%s: saved on another base model (fingerprint %s, base %s; this model's is "
                     "%s); use force: true to load it anyway", f->path, saved ? saved : "missing", cfg ? cfg : "?",
                     fingerprint ? fingerprint : "?");
}

/* ---- filling ------------------------------------------------------------------------------------------- */

/* One file, or the weighted mean of several compatible ones. */
typedef struct source {
    pr_module_file *const *f;
    const double *w;
    int n;
} source;

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

static void shape_text(int ndim, const int64_t *shape, char *buf, size_t len)
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
            shape_text(t->ndim, t->shape, a, sizeof a);
            shape_text(ti->ndim, ti->shape, b, sizeof b);
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

static int fill_from(const source *s, pr_module *mod, pr_error *err)
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
            if (!peft_place(t->name, &p, cfg, all, &pl)) {
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
            int64_t fs[2] = { info->ndim >= 1 ? info->shape[0] : 1, info->ndim == 2 ? info->shape[1] : 1 };
            same = info->ndim == pl.ndim && fs[0] == pl.shape[0] && fs[1] == pl.shape[1];
        } else {
            same = info->ndim == p.ndim;
            for (int d = 0; same && d < p.ndim; d++)
                same = info->shape[d] == p.shape[d];
        }
        if (!same) {
            char a[64], b[64];
            shape_text(info->ndim, info->shape, a, sizeof a);
            if (f->peft)
                shape_text(pl.ndim, pl.shape, b, sizeof b);
            else
                shape_text(p.ndim, p.shape, b, sizeof b);
            rc = pr_errorf(err, PR_ERR_INVALID, "%s: tensor '%s' is %s but module '%s' (as planned) needs %s", f->path,
                           fname, a, pr_module_name(mod), b);
            free(v);
            break;
        }
        if (f->peft) {
            place(&pl, v, p.data, 0);
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
    return fill_from(&s, mod, err);
}

/* First difference between two JSON metadata values, as text. */
static void json_diff(const char *a, const char *b, char *buf, size_t len)
{
    json_error_t je;
    json_t *x = json_loads(a ? a : "null", JSON_DECODE_ANY, &je), *y = json_loads(b ? b : "null", JSON_DECODE_ANY, &je);
    buf[0] = '\0';
    if (json_is_object(x) && json_is_object(y)) {
        const char *k;
        json_t *v;
        json_object_foreach(x, k, v) {
            json_t *w = json_object_get(y, k);
            if (!w || !json_equal(v, w)) {
                char *sv = json_dumps(v, JSON_ENCODE_ANY | JSON_COMPACT | JSON_SORT_KEYS);
                char *sw = w ? json_dumps(w, JSON_ENCODE_ANY | JSON_COMPACT | JSON_SORT_KEYS) : NULL;
                snprintf(buf, len, "'%s' is %s in one and %s in the other", k, sv ? sv : "?", sw ? sw : "absent");
                free(sv);
                free(sw);
                break;
            }
        }
        json_object_foreach(y, k, v) {
            if (!buf[0] && !json_object_get(x, k))
                snprintf(buf, len, "'%s' is absent in one", k);
        }
    }
    if (!buf[0])
        snprintf(buf, len, "%s vs %s", a ? a : "(none)", b ? b : "(none)");
    json_decref(x);
    json_decref(y);
}

int pr_module_files_compatible(pr_module_file *const *f, int n, pr_error *err)
{
    static const char *const keys[] = { "technique", "options", "site_options", "sites", "layers", "tensor_names",
                                        "gated" };
    for (int k = 1; k < n; k++) {
        for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++) {
            const char *a = st_metadata(f[0]->st, keys[i]), *b = st_metadata(f[k]->st, keys[i]);
            if ((a == NULL) != (b == NULL) || (a && strcmp(a, b))) {
                char d[400];
                json_diff(a, b, d, sizeof d);
                return pr_errorf(err, PR_ERR_INVALID, "average: %s and %s differ in %s: %s", f[0]->path, f[k]->path,
                                 keys[i], d);
            }
        }
        if (st_count(f[0]->st) != st_count(f[k]->st))
            return pr_errorf(err, PR_ERR_INVALID, "average: %s holds %d tensors and %s %d", f[0]->path,
                             st_count(f[0]->st), f[k]->path, st_count(f[k]->st));
        for (int i = 0; i < st_count(f[0]->st); i++) {
            const st_tensor *a = st_tensor_at(f[0]->st, i), *b = st_tensor_at(f[k]->st, i);
            const char *an = a->name, *bn = b->name;
            /* host names carry the saved module name; compare what follows it */
            if (!f[0]->peft) {
                an += strlen(f[0]->saved_name) + 1;
                bn += strlen(f[k]->saved_name) + 1;
            }
            int same = !strcmp(an, bn) && a->ndim == b->ndim;
            for (int d = 0; same && d < a->ndim; d++)
                same = a->shape[d] == b->shape[d];
            if (!same) {
                char sa[64], sb[64];
                shape_text(a->ndim, a->shape, sa, sizeof sa);
                shape_text(b->ndim, b->shape, sb, sizeof sb);
                return pr_errorf(err, PR_ERR_INVALID, "average: %s and %s differ in tensors: '%s' %s vs '%s' %s",
                                 f[0]->path, f[k]->path, a->name, sa, b->name, sb);
            }
        }
    }
    return PR_OK;
}

int pr_module_files_fill_average(pr_module_file *const *f, const double *weights, int n, pr_module *mod,
                                 pr_error *err)
{
    if (n < 1)
        return pr_errorf(err, PR_ERR_INVALID, "average: no files");
    int rc = pr_module_files_compatible(f, n, err);
    if (rc)
        return rc;
    if (n == 1)
        return pr_module_file_fill(f[0], mod, err);
    /* tensors are looked up by f[0]'s names: host names differ only in the
     * module-name prefix, so other files are read through their own */
    if (!f[0]->peft) {
        for (int k = 1; k < n; k++)
            if (strcmp(f[k]->saved_name, f[0]->saved_name))
                return pr_errorf(err, PR_ERR_INVALID, "average: %s saved module '%s' and %s module '%s'; modules "
                                 "with host tensor names average only under one name", f[0]->path, f[0]->saved_name,
                                 f[k]->path, f[k]->saved_name);
    }
    source s = { f, weights, n };
    return fill_from(&s, mod, err);
}

/* ---- load ---------------------------------------------------------------------------------------------- */

int pr_module_load(pr_model *m, const char *path, const pr_registry *reg, const pr_module_load_options *opt,
                   pr_module **out, pr_error *err)
{
    if (out)
        *out = NULL;
    pr_module_file *f = NULL;
    int rc = pr_module_file_open(path, reg, &f, err);
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
