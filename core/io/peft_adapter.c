/* peftref core: a Hugging Face PEFT adapter directory opened as a saved
 * module (docs/modules.md, "Interoperability").
 *
 * The directory holds adapter_config.json (a PEFT config: peft_type and the
 * type's fields) and adapter_model.safetensors (the state dict under PEFT's
 * keys, the adapter name removed).  Saved modules already use those keys
 * where the technique exists in PEFT (peft_names.c), so opening is a
 * translation of the config into a technique, sites, layers and options;
 * the tensors are then filled exactly as a module file's with PEFT names.
 *
 * Which modules an adapter adapts follows PEFT's rules
 * (peft.tuners.tuners_utils.check_target_module_exists), applied to the
 * base model's own module names ("transformer.h.3.attn.c_attn",
 * "model.layers.3.self_attn.q_proj"):
 *   target_modules a list   a name equal to an entry or ending in "." + entry
 *                           (GPT-2's "c_proj" is attn.c_proj and mlp.c_proj)
 *   target_modules a string a regular expression matching the whole name
 *   exclude_modules         the same rules, taking names out
 *   layers_to_transform     the block index (after layers_pattern, or any
 *                           ".<name>.<index>." in the name) in the list
 *   rank_pattern, alpha_pattern   the first key k (in file order) for which
 *                           "(.*\.)?(k)$" matches the name from its start
 *                           gives that module's r / lora_alpha
 * A peftref module attaches at one set of sites on one set of layers with
 * options per site, so the matched modules must form such a product and the
 * resolved ranks and alphas must not vary along the layers; otherwise the
 * adapter is refused, naming the field.  Regular expressions are POSIX
 * extended ones, which agree with Python's re on the usual patterns
 * (alternation, classes, ".*", escaped dots) but know no \d or (?:...).
 *
 * Fields.  Every field PEFT writes for the type is known: a field at its
 * default, or at a value peftref honours, is accepted; any other value is an
 * error naming the field and the value; an unknown field is an error naming
 * it unless the caller allows unknown fields. */
#include "config.h"

#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <regex.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "peft_adapter.h"
#include "peft_adapter_internal.h"


int peft_is_adapter_dir(const char *path)
{
    struct stat st;
    char p[4096];
    if (!path || stat(path, &st) != 0 || !S_ISDIR(st.st_mode))
        return 0;
    snprintf(p, sizeof p, "%s/%s", path, CONFIG_NAME);
    return stat(p, &st) == 0 && S_ISREG(st.st_mode);
}

/* ---- what the config says ------------------------------------------------------------------------ */



const char *pa_keep(pr_module_file *f, const char *s)
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

/* A JSON value as compact text, in buf. */
const char *pa_json_text(const json_t *v, char *buf, size_t len)
{
    char *s = v ? json_dumps(v, JSON_COMPACT | JSON_ENCODE_ANY) : NULL;
    snprintf(buf, len, "%s", s ? s : "null");
    free(s);
    return buf;
}

/* why may hold "{tech}", the name of the technique the adapter is read as. */
int pa_bad_value(reader *R, const char *field, const json_t *v, const char *why)
{
    char b[256], w[512];
    const char *at = strstr(why, "{tech}");
    if (at && R->tech) {
        snprintf(w, sizeof w, "%.*s%s%s", (int)(at - why), why, R->tech, at + 6);
        why = w;
    }
    return pr_errorf(R->err, PR_ERR_UNSUPPORTED, "%s/" CONFIG_NAME ": %s = %s is not supported: %s", R->dir, field,
                     pa_json_text(v, b, sizeof b), why);
}

const json_t *pa_get(const reader *R, const char *field)
{
    const json_t *v = json_object_get(R->root, field);
    return v && !json_is_null(v) ? v : NULL;
}

/* A field absent, null or an empty list or object: its default. */
int pa_is_empty(const json_t *v)
{
    return !v || json_is_null(v) || (json_is_array(v) && json_array_size(v) == 0) ||
           (json_is_object(v) && json_object_size(v) == 0);
}





/* PeftConfig's own fields, common to every type. */
static const cfg_field common_fields[] = {
    { "peft_type", PR_PEFT_READ, NULL },
    { "task_type", PR_PEFT_READ, NULL },
    { "base_model_name_or_path", PR_PEFT_INFO, NULL },
    { "revision", PR_PEFT_INFO, NULL },
    { "inference_mode", PR_PEFT_INFO, NULL },
    { "auto_mapping", PR_PEFT_INFO, NULL },
    { "peft_version", PR_PEFT_INFO, NULL },
    { "modules_to_save", PR_PEFT_EMPTY, "peftref imports adapters without modules_to_save (a classification head loads "
                                  "through the pipeline's task.head)" },
};

static const cfg_field *find_field(const cfg_field *t, int n, const char *name)
{
    for (int i = 0; i < n; i++)
        if (!strcmp(t[i].name, name))
            return &t[i];
    return NULL;
}

int pa_check_fields(reader *R, const cfg_field *own, int n_own)
{
    const char *k;
    json_t *v;
    int n_common = (int)(sizeof common_fields / sizeof common_fields[0]);
    json_object_foreach(R->root, k, v) {
        const cfg_field *fd = find_field(common_fields, n_common, k);
        if (!fd)
            fd = find_field(own, n_own, k);
        if (!fd) {
            if (R->flags & PR_MODULE_FILE_ALLOW_UNKNOWN_FIELDS)
                continue;
            return pr_errorf(R->err, PR_ERR_UNSUPPORTED, "%s/" CONFIG_NAME ": unknown field '%s' for peft_type %s "
                             "(allow_unknown_fields: true in the load entry accepts it)", R->dir, k, R->type);
        }
        const char *why = fd->why ? fd->why : "peftref offers only its default";
        if (fd->check == PR_PEFT_EMPTY && !pa_is_empty(v))
            return pa_bad_value(R, k, v, why);
        if (fd->check == PR_PEFT_FALSE && !json_is_null(v) && !json_is_false(v))
            return pa_bad_value(R, k, v, why);
        if (fd->check == PR_PEFT_TRUE && !json_is_null(v) && !json_is_true(v))
            return pa_bad_value(R, k, v, why);
        if (fd->check == PR_PEFT_ZERO && !json_is_null(v) && !(json_is_number(v) && json_number_value(v) == 0))
            return pa_bad_value(R, k, v, why);
    }
    return PR_OK;
}

int pa_get_int(reader *R, const char *field, int required, long long min, long long *out)
{
    const json_t *v = pa_get(R, field);
    if (!v) {
        if (required)
            return pr_errorf(R->err, PR_ERR_FORMAT, "%s/" CONFIG_NAME ": missing field '%s'", R->dir, field);
        return -1;   /* absent */
    }
    if (!json_is_integer(v) || json_integer_value(v) < min) {
        char b[128];
        return pr_errorf(R->err, PR_ERR_FORMAT, "%s/" CONFIG_NAME ": %s = %s is not an integer >= %lld", R->dir,
                         field, pa_json_text(v, b, sizeof b), min);
    }
    *out = json_integer_value(v);
    return PR_OK;
}

/* *out = def when absent; below min is refused ("expected a value >= min") */
int pa_get_num(reader *R, const char *field, double def, double min, double *out)
{
    const json_t *v = pa_get(R, field);
    *out = def;
    if (!v)
        return PR_OK;
    if (!json_is_number(v)) {
        char b[128];
        return pr_errorf(R->err, PR_ERR_FORMAT, "%s/" CONFIG_NAME ": %s = %s is not a number", R->dir, field,
                         pa_json_text(v, b, sizeof b));
    }
    *out = json_number_value(v);
    if (*out < min) {
        char why[64];
        snprintf(why, sizeof why, "expected a value >= %g", min);
        return pa_bad_value(R, field, v, why);
    }
    return PR_OK;
}

int pa_get_bool(reader *R, const char *field, int def, int *out)
{
    const json_t *v = pa_get(R, field);
    *out = def;
    if (!v)
        return PR_OK;
    if (!json_is_boolean(v)) {
        char b[128];
        return pr_errorf(R->err, PR_ERR_FORMAT, "%s/" CONFIG_NAME ": %s = %s is not true or false", R->dir, field,
                         pa_json_text(v, b, sizeof b));
    }
    *out = json_is_true(v);
    return PR_OK;
}

int pa_push_opt(reader *R, const char *name, const char *value, int site)
{
    pr_module_file *f = R->f;
    const char *n = pa_keep(f, name), *v = pa_keep(f, value);
    pr_option_setting *o = n && v ? realloc(f->opts, (size_t)(f->n_opts + 1) * sizeof *o) : NULL;
    if (!o)
        return pr_errorf(R->err, PR_ERR_NOMEM, "%s: out of memory", R->dir);
    f->opts = o;
    o[f->n_opts++] = (pr_option_setting){ n, v, site };
    return PR_OK;
}

int pa_push_num(reader *R, const char *name, double v, int site)
{
    char b[64];
    snprintf(b, sizeof b, "%.17g", v);
    return pa_push_opt(R, name, b, site);
}

/* ---- the base model's modules and PEFT's matching ----------------------------------------------- */



static const char *const gpt2_block_paths[] = { "", "ln_1", "attn", "attn.c_attn", "attn.c_proj", "ln_2", "mlp",
                                                "mlp.c_fc", "mlp.c_proj", "mlp.act" };
static const char *const gpt2_top[] = { "transformer", "transformer.wte", "transformer.wpe", "transformer.h",
                                        "transformer.ln_f", "lm_head" };
static const char *const llama_block_paths[] = { "", "input_layernorm", "self_attn", "self_attn.q_proj",
                                                 "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                                 "post_attention_layernorm", "mlp", "mlp.gate_proj", "mlp.up_proj",
                                                 "mlp.down_proj", "mlp.act_fn" };
static const char *const llama_top[] = { "model", "model.embed_tokens", "model.layers", "model.norm",
                                         "model.rotary_emb", "lm_head" };


static hf_module *list_modules(const pr_model_config *c, int *n)
{
    int gpt2 = c->family == PR_FAMILY_GPT2;
    const char *const *bp = gpt2 ? gpt2_block_paths : llama_block_paths;
    const char *const *top = gpt2 ? gpt2_top : llama_top;
    int nb = gpt2 ? NELEM(gpt2_block_paths) : NELEM(llama_block_paths),
        nt = gpt2 ? NELEM(gpt2_top) : NELEM(llama_top);
    hf_module *m = calloc((size_t)(nt + nb * c->n_layers), sizeof *m);
    if (!m)
        return NULL;
    int k = 0;
    for (int i = 0; i < nt; i++, k++) {
        snprintf(m[k].name, sizeof m[k].name, "%s", top[i]);
        m[k].layer = -1;
        m[k].path = top[i];
    }
    for (int l = 0; l < c->n_layers; l++)
        for (int i = 0; i < nb; i++, k++) {
            snprintf(m[k].name, sizeof m[k].name, "%s.%d%s%s", peft_blocks_path(c), l, *bp[i] ? "." : "", bp[i]);
            m[k].layer = l;
            m[k].path = bp[i];
        }
    *n = k;
    return m;
}

/* Python's re.fullmatch(pattern, s) (anchor: "^(%s)$") or re.match(rf"(.*\.)?({key})$", s)
 * (anchor "^(.*\\.)?(%s)$"), with POSIX extended syntax; -1 when pattern
 * does not compile. */
static int regex_match(const char *anchor, const char *pattern, const char *s)
{
    size_t len = strlen(anchor) + strlen(pattern) + 1;
    char *full = malloc(len);
    if (!full)
        return -1;
    snprintf(full, len, anchor, pattern);
    regex_t re;
    int rc = regcomp(&re, full, REG_EXTENDED | REG_NOSUB);
    free(full);
    if (rc)
        return -1;
    rc = regexec(&re, s, 0, NULL, 0) == 0;
    regfree(&re);
    return rc;
}

/* PEFT's target_modules / exclude_modules / feedforward_modules test on a
 * module name: 1 matches, 0 not, -1 bad pattern (after an error). */
int pa_names_match(reader *R, const char *field, const json_t *v, const char *name)
{
    if (json_is_string(v)) {
        int m = regex_match("^(%s)$", json_string_value(v), name);
        if (m < 0)
            return pa_bad_value(R, field, v, "not a POSIX extended regular expression"), -1;
        return m;
    }
    size_t i, nlen = strlen(name);
    json_t *e;
    json_array_foreach(v, i, e) {
        const char *t = json_string_value(e);
        size_t tl = t ? strlen(t) : 0;
        if (!t)
            continue;
        if (!strcmp(name, t) || (nlen > tl && name[nlen - tl - 1] == '.' && !strcmp(name + nlen - tl, t)))
            return 1;
    }
    return 0;
}

int pa_check_name_list(reader *R, const char *field, const json_t *v, int required)
{
    if (!v) {
        if (required)
            return pr_errorf(R->err, PR_ERR_UNSUPPORTED, "%s/" CONFIG_NAME ": %s is missing or null: peftref does "
                             "not guess PEFT's per-model defaults; name the modules", R->dir, field);
        return PR_OK;
    }
    if (json_is_string(v))
        return PR_OK;
    if (json_is_array(v)) {
        size_t i;
        json_t *e;
        json_array_foreach(v, i, e)
            if (!json_is_string(e))
                return pa_bad_value(R, field, v, "expected a list of module names or one regular expression");
        return PR_OK;
    }
    return pa_bad_value(R, field, v, "expected a list of module names or one regular expression");
}

/* The layers_to_transform list (NULL: every layer), as a mask over layers. */
static int read_layers(reader *R, const pr_model_config *c, unsigned char *want, int *restricted)
{
    const json_t *v = pa_get(R, "layers_to_transform");
    *restricted = v != NULL;
    for (int l = 0; l < c->n_layers; l++)
        want[l] = !v;
    if (!v)
        return PR_OK;
    if (json_is_integer(v)) {
        long long l = json_integer_value(v);
        if (l < 0 || l >= c->n_layers)
            return pa_bad_value(R, "layers_to_transform", v, "the base model has fewer layers");
        want[l] = 1;
    } else if (json_is_array(v)) {
        size_t i;
        json_t *e;
        json_array_foreach(v, i, e) {
            long long l = json_is_integer(e) ? json_integer_value(e) : -1;
            if (l < 0 || l >= c->n_layers)
                return pa_bad_value(R, "layers_to_transform", v, "a layer index of the base model was expected");
            want[l] = 1;
        }
    } else {
        return pa_bad_value(R, "layers_to_transform", v, "expected a layer index or a list of them");
    }
    const json_t *p = pa_get(R, "layers_pattern");
    const char *own = c->family == PR_FAMILY_GPT2 ? "h" : "layers";
    if (p && !(json_is_string(p) && !strcmp(json_string_value(p), own)) &&
        !(json_is_array(p) && json_array_size(p) == 1 && json_is_string(json_array_get(p, 0)) &&
          !strcmp(json_string_value(json_array_get(p, 0)), own))) {
        char why[96];
        snprintf(why, sizeof why, "this model's blocks are '%s'", own);
        return pa_bad_value(R, "layers_pattern", p, why);
    }
    return PR_OK;
}



/* A projection module: the site whose Hugging Face path it is. */
static int projection_site_of(const pr_model_config *c, const hf_module *m, uint32_t *sites)
{
    static const int cand[] = { PR_SITE_QKV, PR_SITE_Q, PR_SITE_K, PR_SITE_V, PR_SITE_O, PR_SITE_FFN_UP,
                                PR_SITE_FFN_GATE, PR_SITE_FFN_DOWN };
    for (int i = 0; m->layer >= 0 && i < NELEM(cand); i++) {
        const char *p = peft_site_path(c, cand[i]);
        if (p && !strcmp(p, m->path)) {
            *sites = PR_SITE_BIT(cand[i]);
            return 1;
        }
    }
    return 0;
}

/* What module m becomes: the technique's site_of, or its projection. */
static int site_of(reader *R, pr_peft_site_of_fn fn, const hf_module *m, uint32_t *sites)
{
    if (!fn)
        return projection_site_of(R->c, m, sites);
    return fn(&pa_host, R, m->name, m->layer, m->path, sites);
}

/* The modules target_modules (less exclude_modules, within
 * layers_to_transform) selects: sites and layers, which must form a
 * product.  matched[k] is the sites mods[k] gives, 0 for a module not selected. */
static int match_modules(reader *R, pr_peft_site_of_fn fn, const hf_module *mods, int n, uint32_t *matched,
                         uint32_t *sites_out, unsigned char *layers_out)
{
    const pr_model_config *c = R->c;
    const json_t *tm = pa_get(R, "target_modules"), *ex = pa_get(R, "exclude_modules");
    int rc = pa_check_name_list(R, "target_modules", tm, 1);
    if (!rc)
        rc = pa_check_name_list(R, "exclude_modules", ex, 0);
    if (rc)
        return rc;
    unsigned char *want = calloc((size_t)c->n_layers + 1, 1);
    uint32_t *per_layer = calloc((size_t)c->n_layers + 1, sizeof *per_layer);
    if (!want || !per_layer) {
        free(want);
        free(per_layer);
        return pr_errorf(R->err, PR_ERR_NOMEM, "%s: out of memory", R->dir);
    }
    int restricted = 0;
    rc = read_layers(R, c, want, &restricted);
    int all_linear = json_is_string(tm) && !strcmp(json_string_value(tm), "all-linear");
    uint32_t sites = 0;
    for (int k = 0; k < n && !rc; k++) {
        const hf_module *m = &mods[k];
        matched[k] = 0;
        int hit;
        if (all_linear) {   /* PEFT: every linear layer but the output head */
            uint32_t s;
            hit = m->layer >= 0 && projection_site_of(c, m, &s) == 1;
        } else {
            hit = pa_names_match(R, "target_modules", tm, m->name);
        }
        if (hit > 0 && ex)
            hit = pa_names_match(R, "exclude_modules", ex, m->name) > 0 ? 0 : hit;
        if (hit < 0) {
            rc = PR_ERR_UNSUPPORTED;
            break;
        }
        if (!hit || (restricted && (m->layer < 0 || !want[m->layer])))
            continue;
        uint32_t s = 0;
        int ok = site_of(R, fn, m, &s);
        if (ok < 0) {
            rc = PR_ERR_UNSUPPORTED;
            break;
        }
        if (!ok) {
            char b[256];
            rc = pr_errorf(R->err, PR_ERR_UNSUPPORTED, "%s/" CONFIG_NAME ": target_modules = %s selects '%s', where "
                           "%s cannot attach", R->dir, pa_json_text(tm, b, sizeof b), m->name, R->tech);
            break;
        }
        matched[k] = s;
        per_layer[m->layer] |= s;
        sites |= s;
    }
    if (!rc && !sites) {
        char b[256];
        rc = pr_errorf(R->err, PR_ERR_INVALID, "%s/" CONFIG_NAME ": target_modules = %s selects no module of this "
                       "%s base model (is the adapter for another model?)", R->dir, pa_json_text(tm, b, sizeof b),
                       c->family == PR_FAMILY_GPT2 ? "GPT-2" : "LLaMA-family");
    }
    for (int l = 0; l < c->n_layers && !rc; l++) {
        layers_out[l] = per_layer[l] != 0;
        if (per_layer[l] && per_layer[l] != sites) {
            char b[256];
            rc = pr_errorf(R->err, PR_ERR_UNSUPPORTED,
                           "%s/" CONFIG_NAME ": target_modules = %s selects other modules "
                           "on layer %d than on others; a peftref module uses the same sites on every layer it "
                           "adapts",
                           R->dir, pa_json_text(tm, b, sizeof b), l);
        }
    }
    *sites_out = sites;
    free(want);
    free(per_layer);
    return rc;
}

/* The site of module m's kind, for the per-site options. */
static int site_index(uint32_t bits)
{
    for (int s = 0; s < PR_SITE_COUNT; s++)
        if (bits & PR_SITE_BIT(s))
            return s;
    return -1;
}

/* rank_pattern / alpha_pattern for module name: the first key whose
 * "(.*\.)?(key)$" matches; 0 none, 1 found (*v), -1 error. */
static int pattern_value(reader *R, const char *field, const char *name, double *v)
{
    const json_t *p = pa_get(R, field);
    if (!p)
        return 0;
    if (!json_is_object(p))
        return pa_bad_value(R, field, p, "expected an object of module patterns"), -1;
    const char *k;
    json_t *e;
    json_object_foreach((json_t *)p, k, e) {
        int m = regex_match("^(.*\\.)?(%s)$", k, name);
        if (m < 0) {
            pr_errorf(R->err, PR_ERR_UNSUPPORTED, "%s/" CONFIG_NAME ": %s key '%s' is not a POSIX extended regular "
                      "expression", R->dir, field, k);
            return -1;
        }
        if (!m)
            continue;
        if (!json_is_number(e)) {
            char b[64];
            pr_errorf(R->err, PR_ERR_FORMAT, "%s/" CONFIG_NAME ": %s.%s = %s is not a number", R->dir, field, k,
                      pa_json_text(e, b, sizeof b));
            return -1;
        }
        *v = json_number_value(e);
        return 1;
    }
    return 0;
}

static int set_sites_layers(reader *R, uint32_t sites, const unsigned char *layers)
{
    const pr_model_config *c = R->c;
    pr_module_file *f = R->f;
    f->sites = sites;
    int n = 0;
    for (int l = 0; l < c->n_layers; l++)
        n += layers[l];
    f->all_layers = n == c->n_layers;
    if (f->all_layers)
        return PR_OK;
    f->layers = malloc((size_t)n * sizeof *f->layers);
    if (!f->layers)
        return pr_errorf(R->err, PR_ERR_NOMEM, "%s: out of memory", R->dir);
    f->n_layers = 0;
    for (int l = 0; l < c->n_layers; l++)
        if (layers[l])
            f->layers[f->n_layers++] = l;
    return PR_OK;
}

/* target_modules etc. matched (site_of, or the projection of a module's
 * path), and the *_pattern fields resolved per module: they must agree
 * along the layers of a site; values that differ from the module's become
 * site options. */
int pa_match_targets(reader *R, pr_peft_site_of_fn fn, const pr_peft_pattern *pats, int n_pats)
{
    const pr_model_config *c = R->c;
    int n = 0;
    hf_module *mods = list_modules(c, &n);
    uint32_t *matched = mods ? calloc((size_t)n, sizeof *matched) : NULL;
    unsigned char *layers = calloc((size_t)c->n_layers + 1, 1);
    double(*val)[8] = calloc(PR_SITE_COUNT, sizeof *val);
    const char **first = calloc(PR_SITE_COUNT, sizeof *first);
    int rc = PR_OK;
    if (n_pats > 8)
        rc = pr_errorf(R->err, PR_ERR_INVALID, "%s: technique %s gives %d patterns, more than 8", R->dir, R->tech,
                       n_pats);
    else if (!mods || !matched || !layers || !val || !first)
        rc = pr_errorf(R->err, PR_ERR_NOMEM, "%s: out of memory", R->dir);
    uint32_t sites = 0;
    if (!rc)
        rc = match_modules(R, fn, mods, n, matched, &sites, layers);
    for (int k = 0; k < n && !rc; k++) {
        if (!matched[k])
            continue;
        int s = site_index(matched[k]);
        for (int q = 0; q < n_pats && !rc; q++) {
            double v = pats[q].def;
            if (pattern_value(R, pats[q].field, mods[k].name, &v) < 0) {
                rc = PR_ERR_UNSUPPORTED;
                break;
            }
            if (pats[q].integer && (v < 1 || v != floor(v))) {
                rc = pr_errorf(R->err, PR_ERR_UNSUPPORTED, "%s/" CONFIG_NAME ": %s gives '%s' %g, not a positive "
                               "integer", R->dir, pats[q].field, mods[k].name, v);
                break;
            }
            if (!first[s]) {
                val[s][q] = v;
            } else if (val[s][q] != v) {
                char b[256];
                rc = pr_errorf(R->err, PR_ERR_UNSUPPORTED,
                               "%s/" CONFIG_NAME ": %s = %s gives '%s' %g but '%s' %g; "
                               "peftref's %s is per site, the same on every layer",
                               R->dir, pats[q].field, pa_json_text(pa_get(R, pats[q].field), b, sizeof b), first[s],
                               val[s][q], mods[k].name, v, pats[q].option);
            }
        }
        if (!first[s])
            first[s] = mods[k].name;
    }
    if (!rc)
        rc = set_sites_layers(R, sites, layers);
    for (int s = 0; s < PR_SITE_COUNT && !rc; s++)
        for (int q = 0; first[s] && q < n_pats && !rc; q++)
            if (val[s][q] != pats[q].def)
                rc = pa_push_num(R, pats[q].option, val[s][q], s);
    free(mods);
    free(matched);
    free(layers);
    free(val);
    free(first);
    return rc;
}

int pa_check_fan_in_fan_out(reader *R)
{
    const pr_model_config *c = R->c;
    const json_t *v = pa_get(R, "fan_in_fan_out");
    if (!v || json_is_false(v))
        return PR_OK;
    /* PEFT sets it for GPT-2's Conv1D itself; an nn.Linear model's weights are [out, in] */
    if (json_is_true(v) && c->family == PR_FAMILY_GPT2)
        return PR_OK;
    return pa_bad_value(R, "fan_in_fan_out", v, "the LLaMA family's projections are nn.Linear [out, in]");
}

/* ---- the tensors against the base --------------------------------------------------------------- */

/* Keys name this family's modules and layers. */
int pa_check_tensors(reader *R)
{
    const pr_model_config *c = R->c;
    const char *own =
        c->family == PR_FAMILY_GPT2 ? "base_model.model.transformer.h." : "base_model.model.model.layers.";
    const char *other =
        c->family == PR_FAMILY_GPT2 ? "base_model.model.model.layers." : "base_model.model.transformer.h.";
    st_file *st = R->f->st;
    for (int i = 0; i < st_count(st); i++) {
        const st_tensor *t = st_tensor_at(st, i);
        if (!strncmp(t->name, other, strlen(other)))
            return pr_errorf(R->err, PR_ERR_INVALID,
                             "%s/" WEIGHTS_NAME ": tensor '%s' names a %s module, but the "
                             "base model is %s",
                             R->dir, t->name, c->family == PR_FAMILY_GPT2 ? "LLaMA-family" : "GPT-2",
                             c->family == PR_FAMILY_GPT2 ? "GPT-2" : "of the LLaMA family");
        if (!strncmp(t->name, own, strlen(own))) {
            char *end = NULL;
            long l = strtol(t->name + strlen(own), &end, 10);
            if (end && *end == '.' && (l < 0 || l >= c->n_layers))
                return pr_errorf(R->err, PR_ERR_INVALID, "%s/" WEIGHTS_NAME ": tensor '%s' is for layer %ld, but the "
                                 "base model has %d layers", R->dir, t->name, l, c->n_layers);
        }
    }
    return PR_OK;
}

/* ---- opening ------------------------------------------------------------------------------------ */

/* The module's name: the directory's, when it is one, else the technique's. */
const char *pa_module_name_of(reader *R)
{
    pr_module_file *f = R->f;
    if (f->saved_name)
        return f->saved_name;
    const char *base = strrchr(R->dir, '/');
    base = base && base[1] ? base + 1 : R->dir;
    int name_ok = *base != '\0' && strcmp(base, ".") && strcmp(base, "..");
    for (const char *s = base; *s && name_ok; s++)
        name_ok = (unsigned char)*s > 0x20 && *s != '/';
    f->saved_name = pa_keep(f, name_ok ? base : f->t->name);
    return f->saved_name;
}

int peft_adapter_open(const char *dir, const pr_registry *reg, const pr_model_config *cfg, unsigned flags,
                      pr_module_file **out, pr_error *err)
{
    *out = NULL;
    char path[4096];
    pr_module_file *f = calloc(1, sizeof *f);
    if (!f || !(f->path = strdup(dir))) {
        free(f);
        return pr_errorf(err, PR_ERR_NOMEM, "%s: out of memory", dir);
    }
    reader R = { .dir = dir, .flags = flags, .err = err, .f = f, .c = cfg };
    peft_model_of(cfg, &R.pm);
    snprintf(path, sizeof path, "%s/" CONFIG_NAME, dir);
    json_error_t je;
    int rc = PR_OK;
    R.root = json_load_file(path, 0, &je);
    if (!R.root || !json_is_object(R.root)) {
        rc = pr_errorf(err, PR_ERR_FORMAT, "%s:%d:%d: %s", path, je.line, je.column,
                       R.root ? "not a JSON object" : je.text);
        goto done;
    }
    const json_t *pt = pa_get(&R, "peft_type");
    if (!pt || !json_is_string(pt)) {
        rc = pr_errorf(err, PR_ERR_FORMAT, "%s: no peft_type (a string naming a PEFT type)", path);
        goto done;
    }
    R.type = json_string_value(pt);
    const json_t *task = pa_get(&R, "task_type");
    if (task && !(json_is_string(task) && !strcmp(json_string_value(task), "CAUSAL_LM"))) {
        rc = pa_bad_value(&R, "task_type", task, "peftref imports CAUSAL_LM adapters (or ones without a task_type)");
        goto done;
    }
    snprintf(path, sizeof path, "%s/" WEIGHTS_NAME, dir);
    if ((rc = st_open(path, 0, &f->st, err)) || (rc = pa_resolve(&R, reg)))
        goto done;
    /* the technique's own translation of its type's fields (peft_config.h) */
    if (err)
        err->msg[0] = '\0';
    rc = R.ext->read(&pa_host, &R);
    if (rc && err && !err->msg[0])
        rc = pr_errorf(err, rc, "%s: technique %s refused the adapter (code %d) without saying why", dir,
                       R.decl->name, rc);
    /* a read() that replaced the tensors checked them first (check_tensors) */
    if (rc || (!R.replaced && (rc = pa_check_tensors(&R))))
        goto done;
    pa_module_name_of(&R);
    /* a read() that replaced the tensors named them as peftref's module files do */
    f->peft = !R.replaced;
    f->peft_dir = 1;
    /* buffers a technique regenerates (lora's pissa / olora factors, from the
     * base weight) are not in the file */
    f->has_seed = 1;
    f->seed = 0x504546544144ull;
    if (!f->saved_name)
        rc = pr_errorf(err, PR_ERR_NOMEM, "%s: out of memory", dir);
done:
    for (int i = 0; i < R.n_bufs; i++)
        free(R.bufs[i]);
    free(R.bufs);
    json_decref(R.implies);
    json_decref(R.root);
    if (rc) {
        pr_module_file_close(f);
        return rc;
    }
    *out = f;
    return PR_OK;
}
