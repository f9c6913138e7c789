/* peftref export --format peft | peftref.
 *
 * --format peftref writes the module as pr_module_save does (docs/modules.md).
 * --format peft writes Hugging Face PEFT's adapter directory: the module is
 * saved first (saved modules already use PEFT's keys and shapes where PEFT
 * has the technique, peft_names.c), then its tensors are copied into
 * adapter_model.safetensors and its options translated into the
 * adapter_config.json fields PEFT writes for the technique's peft_type
 * (pr_technique.peft_type), plus the fields a variant implies through the
 * peft-config extension (include/peftref/ext/peft_config.h: DoRA's
 * "use_dora": true):
 *
 *   LORA           r, lora_alpha, lora_dropout, use_rslora, use_dora,
 *                  target_modules, rank_pattern / alpha_pattern (the sites
 *                  whose r / alpha differ), layers_to_transform,
 *                  fan_in_fan_out (GPT-2's Conv1D), init_lora_weights
 *   IA3            target_modules, feedforward_modules
 *   PROMPT_TUNING  num_virtual_tokens, token_dim, ...
 *   PREFIX_TUNING  num_virtual_tokens, token_dim = num_key_value_heads *
 *                  head_dim, prefix_projection false
 *   P_TUNING       the folded prompt; PromptEncoderConfig's fields
 *   LOHA, LOKR     r, alpha, rank_pattern / alpha_pattern (LLaMA only: PEFT's
 *                  LyCORIS layers refuse GPT-2's Conv1D)
 *   VERA           r, vera_dropout, d_initial, save_projection true
 *   OFT, HRA       r / oft_block_size, use_cayley_neumann false; r (LLaMA only)
 *   BOFT           boft_block_size / boft_block_num, boft_n_butterfly_factor;
 *                  boft_R (m, nb, b, b) as saved (LLaMA only)
 *   FOURIERFT      n_frequency (+ n_frequency_pattern), scaling, random_loc_seed
 *   TRAINABLE_TOKENS  token_indices (untied heads only)
 *   ADALORA        LoraConfig's fields and init_r, target_r, tinit, tfinal,
 *                  deltaT, beta1, beta2, orth_reg_weight, total_step; each
 *                  module's kept triplets and rank_pattern (adalora_tensors)
 *
 * A LORA module initialised by pissa or olora (option init_lora_weights) computes
 * x.W + s x.(A^T B^T - A0^T B0^T) with frozen A0, B0 from the base weight
 * (plugins/lora.c); PEFT's conversion of such an adapter to a plain LoRA
 * on the original base (path_initial_model_for_weight_conversion) is rank
 * 2r with A' = [A; A0], B' = [B, -B0] and the scale kept: lora_alpha' =
 * 2 alpha (alpha sqrt(2) with use_rslora), and so for every site's r and
 * alpha.  That is what is written.
 *
 * Both write to a temporary name beside --out and rename it into place, so
 * a failure leaves nothing at --out. */
#include "config.h"

#include <dirent.h>
#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cli.h"
#include "export.h"
#include "export_peft.h"
#include "module_file.h"
#include "peft_adapter.h"
#include "peftref/head.h"
#include "peftref/pipeline.h"


/* ---- the run and its module ---------------------------------------------------------------------- */


static void job_free(job *j)
{
    pr_tokenizer_free(j->tok);
    pr_model_free(j->m);
    pr_pipeline_free(j->pipe);
    pr_registry_free(j->reg);
}

static int job_open(const export_request *r, job *j)
{
    memset(j, 0, sizeof *j);
    int rc = cli_pipeline_build("export", r->src, r->sets, r->n_sets, &j->reg, &j->pipe, &j->m, &j->tok);
    if (rc)
        return rc;
    char names[512] = "";
    int n = pr_model_n_modules(j->m);
    for (int i = 0; i < n; i++) {
        pr_module *mod = pr_model_module(j->m, i);
        size_t k = strlen(names);
        snprintf(names + k, sizeof names - k, "%s%s", k ? ", " : "", pr_module_name(mod));
        if (r->module ? !strcmp(pr_module_name(mod), r->module) : n == 1)
            j->mod = mod;
    }
    if (!j->mod) {
        if (n == 0)
            rc = ERR("%s has no module to export", r->src);
        else if (r->module)
            rc = ERR("%s has no module '%s' (its modules: %s)", r->src, r->module, names);
        else
            rc = ERR("%s has %d modules (%s); say which with --module NAME", r->src, n, names);
        job_free(j);
        return rc;
    }
    j->t = pr_module_technique(j->mod);
    j->cfg = pr_model_get_config(j->m);
    return 0;
}

/* ---- writing beside --out and renaming ------------------------------------------------------------ */

/* Remove path: a file, or a directory of plain files. */
static int remove_path(const char *path)
{
    struct stat st;
    if (lstat(path, &st) != 0)
        return errno == ENOENT ? 0 : -1;
    if (!S_ISDIR(st.st_mode))
        return unlink(path);
    DIR *d = opendir(path);
    if (!d)
        return -1;
    struct dirent *e;
    char p[4096];
    while ((e = readdir(d))) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, ".."))
            continue;
        snprintf(p, sizeof p, "%s/%s", path, e->d_name);
        unlink(p);
    }
    closedir(d);
    return rmdir(path);
}

static int check_out(const export_request *r)
{
    struct stat st;
    if (lstat(r->out, &st) == 0 && !r->force)
        return ERR("%s exists (--force replaces it)", r->out);
    return 0;
}

/* Move tmp to r->out, replacing what --force allows. */
static int put_in_place(const export_request *r, const char *tmp)
{
    struct stat st;
    if (lstat(r->out, &st) == 0) {
        if (!r->force || remove_path(r->out) != 0) {
            int e = errno;
            remove_path(tmp);
            return r->force ? ERR("cannot replace %s: %s", r->out, strerror(e))
                            : ERR("%s exists (--force replaces it)", r->out);
        }
    }
    if (rename(tmp, r->out) != 0) {
        int e = errno;
        remove_path(tmp);
        return ERR("cannot rename %s to %s: %s", tmp, r->out, strerror(e));
    }
    return 0;
}

static void temp_name(const char *out, const char *what, char *buf, size_t len)
{
    snprintf(buf, len, "%s.%s-%ld", out, what, (long)getpid());
}

/* ---- --format peftref ---------------------------------------------------------------------------- */

static int save_module(job *j, const char *path, pr_error *err)
{
    pr_module_save_info info;
    memset(&info, 0, sizeof info);
    info.base_fingerprint = pr_pipeline_base_fingerprint(j->pipe);
    info.final_train_loss = NAN;
    info.final_val_loss = NAN;
    return pr_module_save(j->mod, path, &info, err);
}

int export_peftref(const export_request *r)
{
    job j;
    int rc = check_out(r);
    if (rc || (rc = job_open(r, &j)))
        return rc;
    char tmp[4096];
    temp_name(r->out, "tmp", tmp, sizeof tmp);
    pr_error err = { 0 };
    if (save_module(&j, tmp, &err)) {
        remove_path(tmp);
        rc = ERR("%s", err.msg);
    } else if (!(rc = put_in_place(r, tmp))) {
        printf("wrote module '%s' (technique %s) to %s\n", pr_module_name(j.mod), j.t->name, r->out);
    }
    job_free(&j);
    return rc;
}

/* ---- --format peft: the tensors -------------------------------------------------------------------- */



static void adapter_free(adapter *a)
{
    for (int i = 0; i < a->n; i++)
        free(a->t[i].data);
    free(a->t);
    st_close(a->st);
}

tensor_out *xp_find_tensor(adapter *a, const char *name)
{
    for (int i = 0; i < a->n; i++)
        if (!strcmp(a->t[i].name, name))
            return &a->t[i];
    return NULL;
}

tensor_out *xp_add_tensor(adapter *a, const char *name, int ndim, const int64_t *shape)
{
    tensor_out *v = realloc(a->t, (size_t)(a->n + 1) * sizeof *v);
    if (!v)
        return NULL;
    a->t = v;
    tensor_out *o = &a->t[a->n];
    memset(o, 0, sizeof *o);
    snprintf(o->name, sizeof o->name, "%s", name);
    o->ndim = ndim;
    int64_t n = 1;
    for (int d = 0; d < ndim; d++)
        n *= (o->shape[d] = shape[d]);
    if (!(o->data = malloc((size_t)(n ? n : 1) * sizeof(float))))
        return NULL;
    a->n++;
    return o;
}

/* The module's tensors under PEFT's names, from the module saved to path. */
static int read_saved(job *j, const char *path, adapter *a)
{
    pr_error err = { 0 };
    if (st_open(path, 0, &a->st, &err))
        return ERR("%s", err.msg);
    const char *names = st_metadata(a->st, "tensor_names");
    if (!names || strcmp(names, "peft"))
        return ERR("module '%s' (technique %s) is attached where Hugging Face PEFT has no module name (sites "
                   "such as GPT-2's q, k or v slices of c_attn, or a prefix on some layers only); use --format "
                   "peftref", pr_module_name(j->mod), j->t->name);
    for (int i = 0; i < st_count(a->st); i++) {
        const st_tensor *t = st_tensor_at(a->st, i);
        if (t->ndim < 1 || t->ndim > 4)
            return ERR("module tensor '%s' has %d dimensions", t->name, t->ndim);
        tensor_out *o = xp_add_tensor(a, t->name, t->ndim, t->shape);
        if (!o)
            return ERR("out of memory");
        if (st_to_f32(a->st, t, o->data, &err))
            return ERR("%s", err.msg);
    }
    return 0;
}

/* pissa / olora: [A; A0] and [B, -B0] per insertion (see the top). */
static int append_initial_factors(job *j, adapter *a)
{
    for (int i = 0; i < pr_module_n_params(j->mod); i++) {
        pr_module_param p;
        pr_module_param_at(j->mod, i, &p);
        int is_a = !strcmp(p.param, "lora_A0"), is_b = !strcmp(p.param, "lora_B0");
        if ((!is_a && !is_b) || p.numel == 0)
            continue;
        const char *path = peft_site_path(j->cfg, p.site);
        char key[256];
        snprintf(key, sizeof key, "base_model.model.%s.%d.%s.lora_%c.weight", peft_blocks_path(j->cfg), p.layer,
                 path ? path : "?", is_a ? 'A' : 'B');
        tensor_out *o = xp_find_tensor(a, key);
        if (!o || o->ndim != 2 || p.ndim != 2)
            return ERR("module '%s': no tensor '%s' for its initial factor %s", pr_module_name(j->mod), key, p.name);
        int64_t R = o->shape[0], C = o->shape[1];
        float *d;
        if (is_a) {   /* (r, d_in) over (r0, d_in) */
            if (p.shape[1] != C)
                return ERR("module '%s': %s does not fit %s", pr_module_name(j->mod), p.name, key);
            d = malloc((size_t)((R + p.shape[0]) * C) * sizeof *d);
            if (!d)
                return ERR("out of memory");
            memcpy(d, o->data, (size_t)(R * C) * sizeof *d);
            memcpy(d + R * C, p.data, (size_t)(p.shape[0] * C) * sizeof *d);
            o->shape[0] = R + p.shape[0];
        } else {      /* (d_out, r) beside -(d_out, r0) */
            if (p.shape[0] != R)
                return ERR("module '%s': %s does not fit %s", pr_module_name(j->mod), p.name, key);
            int64_t C2 = C + p.shape[1];
            d = malloc((size_t)(R * C2) * sizeof *d);
            if (!d)
                return ERR("out of memory");
            for (int64_t row = 0; row < R; row++) {
                memcpy(d + row * C2, o->data + row * C, (size_t)C * sizeof *d);
                for (int64_t k = 0; k < p.shape[1]; k++)
                    d[row * C2 + C + k] = -p.data[row * p.shape[1] + k];
            }
            o->shape[1] = C2;
        }
        free(o->data);
        o->data = d;
    }
    return 0;
}

/* ---- --format peft: adapter_config.json ------------------------------------------------------------ */

/* A numeric option (site -1: the module's value). */
double xp_opt_num(const job *j, const char *name, int site, double def)
{
    int i = pr_module_option_index(j->mod, name);
    if (i < 0)
        return def;
    const pr_option_value *v = site < 0 ? pr_module_option(j->mod, i) : pr_module_site_option(j->mod, site, i);
    return v ? v->num : def;
}

const char *xp_opt_str(const job *j, const char *name)
{
    int i = pr_module_option_index(j->mod, name);
    const pr_option_value *v = i < 0 ? NULL : pr_module_option(j->mod, i);
    return v && v->str ? v->str : NULL;
}

/* The PeftConfig fields every type writes. */
static json_t *common_config(const job *j, const char *type)
{
    json_t *c = json_object();
    const char *base = pr_pipeline_model_name(j->pipe);
    json_object_set_new(c, "peft_type", json_string(type));
    json_object_set_new(c, "task_type", json_string(pr_pipeline_head(j->pipe) ? "SEQ_CLS" : "CAUSAL_LM"));
    json_object_set_new(c, "base_model_name_or_path", json_string(base ? base : ""));
    json_object_set_new(c, "revision", json_null());
    json_object_set_new(c, "inference_mode", json_true());
    json_object_set_new(c, "auto_mapping", json_null());
    json_object_set_new(c, "modules_to_save", json_null());
    return c;
}

json_t *xp_site_names(const job *j, uint32_t sites, int lora_kind)
{
    json_t *a = json_array();
    for (int s = 0; s < PR_SITE_COUNT; s++) {
        if (!(sites & PR_SITE_BIT(s)))
            continue;
        const char *p = peft_site_path(j->cfg, s);
        if (!p && !lora_kind) {   /* ia3's stream sites: the projection they fold into */
            if (s == PR_SITE_FFN_ACT)
                p = peft_site_path(j->cfg, PR_SITE_FFN_DOWN);
            else if (s == PR_SITE_ATTN_K || s == PR_SITE_ATTN_V)
                p = peft_site_path(j->cfg, PR_SITE_QKV);
        }
        if (!p)
            continue;
        /* GPT-2's paths are written whole: "c_proj" alone would be both attn.c_proj and mlp.c_proj */
        const char *name = j->cfg->family == PR_FAMILY_GPT2 ? p : strrchr(p, '.') + 1;
        int dup = 0;
        size_t i;
        json_t *e;
        json_array_foreach(a, i, e) dup |= !strcmp(json_string_value(e), name);
        if (!dup)
            json_array_append_new(a, json_string(name));
    }
    return a;
}

void xp_set_layers(const job *j, json_t *c)
{
    int n = 0;
    const int *ls = pr_module_layers(j->mod, &n);
    if (!ls) {
        json_object_set_new(c, "layers_to_transform", json_null());
        json_object_set_new(c, "layers_pattern", json_null());
        return;
    }
    json_t *a = json_array();
    for (int i = 0; i < n; i++)
        json_array_append_new(a, json_integer(ls[i]));
    json_object_set_new(c, "layers_to_transform", a);
    json_object_set_new(c, "layers_pattern", json_string(j->cfg->family == PR_FAMILY_GPT2 ? "h" : "layers"));
}

json_t *xp_num_json(double v)
{
    return v == floor(v) && fabs(v) < 1e15 ? json_integer((json_int_t)v) : json_real(v);
}

int xp_lora_config(const job *j, json_t *c, int doubled)
{
    int rslora = xp_opt_num(j, "use_rslora", -1, 0) != 0;
    /* the doubled rank of a converted pissa / olora module keeps s = alpha / r (or / sqrt(r)) */
    double rk = doubled ? 2.0 : 1.0, ak = doubled ? (rslora ? sqrt(2.0) : 2.0) : 1.0;
    double r = xp_opt_num(j, "r", -1, 8), alpha = xp_opt_num(j, "alpha", -1, 8);
    uint32_t sites = pr_module_sites(j->mod);
    json_object_set_new(c, "r", xp_num_json(r * rk));
    json_object_set_new(c, "lora_alpha", xp_num_json(alpha * ak));
    json_object_set_new(c, "lora_dropout", json_real(xp_opt_num(j, "dropout", -1, 0)));
    json_object_set_new(c, "use_rslora", json_boolean(rslora));
    json_object_set_new(c, "use_dora", json_false());   /* a variant's implied fields are set after */
    json_object_set_new(c, "target_modules", xp_site_names(j, sites, 1));
    json_object_set_new(c, "exclude_modules", json_null());
    json_object_set_new(c, "fan_in_fan_out", json_boolean(j->cfg->family == PR_FAMILY_GPT2));
    json_object_set_new(c, "bias", json_string("none"));
    const char *init = xp_opt_str(j, "init_lora_weights");
    if (!init || doubled || !strcmp(init, "true"))
        json_object_set_new(c, "init_lora_weights", json_true());
    else if (!strcmp(init, "false"))
        json_object_set_new(c, "init_lora_weights", json_false());
    else
        json_object_set_new(c, "init_lora_weights", json_string(init));
    xp_set_layers(j, c);
    json_t *rp = json_object(), *ap = json_object();
    for (int s = 0; s < PR_SITE_COUNT; s++) {
        if (!(sites & PR_SITE_BIT(s)))
            continue;
        const char *p = peft_site_path(j->cfg, s);
        if (!p)
            continue;
        const char *name = j->cfg->family == PR_FAMILY_GPT2 ? p : strrchr(p, '.') + 1;
        double sr = xp_opt_num(j, "r", s, r), sa = xp_opt_num(j, "alpha", s, alpha);
        if (sr != r)
            json_object_set_new(rp, name, xp_num_json(sr * rk));
        if (sa != alpha)
            json_object_set_new(ap, name, xp_num_json(sa * ak));
    }
    json_object_set_new(c, "rank_pattern", rp);
    json_object_set_new(c, "alpha_pattern", ap);
    static const char *const nulls[] = { "megatron_config", "eva_config", "corda_config", "layer_replication",
                                         "trainable_token_indices", "target_parameters" };
    for (size_t i = 0; i < sizeof nulls / sizeof nulls[0]; i++)
        json_object_set_new(c, nulls[i], json_null());
    json_object_set_new(c, "megatron_core", json_string("megatron.core"));
    json_object_set_new(c, "loftq_config", json_object());
    json_object_set_new(c, "lora_bias", json_false());
    json_object_set_new(c, "use_qalora", json_false());
    json_object_set_new(c, "qalora_group_size", json_integer(16));
    return 0;
}

/* A classification head: PEFT's modules_to_save "score", the classifier of
 * GPT2ForSequenceClassification / LlamaForSequenceClassification, as
 * torch.nn.Linear(d_model, K).weight (K, d_model). */
static int add_head(const job *j, adapter *a, json_t *c)
{
    const pr_head *h = pr_pipeline_head(j->pipe);
    if (!h || h->n_labels <= 0)
        return 0;
    int64_t shape[2] = { h->n_labels, h->d_model };
    tensor_out *w = xp_add_tensor(a, "base_model.model.score.weight", 2, shape);
    if (!w)
        return ERR("out of memory");
    for (int k = 0; k < h->n_labels; k++)
        for (int d = 0; d < h->d_model; d++)
            w->data[(size_t)k * h->d_model + d] = h->weight[(size_t)d * h->n_labels + k];
    int nonzero = 0;
    for (int k = 0; k < h->n_labels; k++)
        nonzero |= h->bias[k] != 0.0f;
    if (nonzero) {
        int64_t bs[1] = { h->n_labels };
        tensor_out *b = xp_add_tensor(a, "base_model.model.score.bias", 1, bs);
        if (!b)
            return ERR("out of memory");
        memcpy(b->data, h->bias, (size_t)h->n_labels * sizeof(float));
        fprintf(stderr, "peftref export: warning: the head's bias is written as score.bias; Hugging Face's "
                "*ForSequenceClassification score layer has none, so give it one to load this adapter\n");
    }
    json_t *m = json_array();
    json_array_append_new(m, json_string("score"));
    json_object_set_new(c, "modules_to_save", m);
    return 0;
}

static int write_adapter(const export_request *r, job *j, adapter *a, json_t *c)
{
    char tmp[4000], path[4096];
    temp_name(r->out, "tmp", tmp, sizeof tmp);
    remove_path(tmp);
    if (mkdir(tmp, 0777) != 0)
        return ERR("cannot create %s: %s", tmp, strerror(errno));
    snprintf(path, sizeof path, "%s/adapter_config.json", tmp);
    int rc = 0;
    if (json_dump_file(c, path, JSON_INDENT(2) | JSON_SORT_KEYS) != 0)
        rc = ERR("cannot write %s", path);
    st_entry *e = calloc((size_t)(a->n ? a->n : 1), sizeof *e);
    if (!rc && !e)
        rc = ERR("out of memory");
    for (int i = 0; !rc && i < a->n; i++) {
        e[i].name = a->t[i].name;
        e[i].ndim = a->t[i].ndim;
        for (int d = 0; d < a->t[i].ndim; d++)
            e[i].shape[d] = a->t[i].shape[d];
        e[i].data = a->t[i].data;
        e[i].dtype = ST_F32;
    }
    const char *fp = pr_pipeline_base_fingerprint(j->pipe), *bc = st_metadata(a->st, "base_config");
    st_kv meta[] = { { "format", "pt" }, { "peftref_base_fingerprint", fp ? fp : "" },
                     { "peftref_base_config", bc ? bc : "" } };
    pr_error err = { 0 };
    snprintf(path, sizeof path, "%s/adapter_model.safetensors", tmp);
    if (!rc && st_write(path, e, a->n, meta, fp ? 3 : 1, &err))
        rc = ERR("%s", err.msg);
    free(e);
    if (rc) {
        remove_path(tmp);
        return rc;
    }
    return put_in_place(r, tmp);
}

int export_peft(const export_request *r)
{
    job j;
    int rc = check_out(r);
    if (rc || (rc = job_open(r, &j)))
        return rc;
    const pr_technique *t = j.t;
    const char *name = pr_module_name(j.mod);
    const char *type = t->peft_type;
    int lora = type && !strcmp(type, "LORA");
    int ia3 = type && !strcmp(type, "IA3"), prompt = type && !strcmp(type, "PROMPT_TUNING");
    int prefix = type && !strcmp(type, "PREFIX_TUNING"), ptuning = type && !strcmp(type, "P_TUNING");
    static const char *const weight_types[] = { "LOHA", "LOKR", "VERA", "OFT", "BOFT", "HRA", "FOURIERFT",
                                                "TRAINABLE_TOKENS", NULL };
    int weight = 0, ada = type && !strcmp(type, "ADALORA");
    for (int i = 0; type && weight_types[i] && !weight; i++)
        weight = !strcmp(type, weight_types[i]);
    if (!type || t->integration == PR_INTEGRATE_SELECT) {
        rc = ERR("module '%s': technique %s has no Hugging Face PEFT type; use --format peftref", name, t->name);
    } else if (!lora && !ada && !ia3 && !prompt && !prefix && !ptuning && !weight) {
        rc = ERR("module '%s': technique %s (PEFT type %s) is not written as a PEFT adapter by peftref (LORA, "
                 "IA3, PROMPT_TUNING, P_TUNING, PREFIX_TUNING, LOHA, LOKR, VERA, OFT, BOFT, HRA, FOURIERFT, "
                 "TRAINABLE_TOKENS and ADALORA are); use --format peftref", name, t->name, type);
    } else if (pr_module_is_gated(j.mod)) {
        rc = ERR("module '%s' sits behind a learned gate, which PEFT has no field for; use --format peftref", name);
    }
    if (rc) {
        job_free(&j);
        return rc;
    }
    char tmp[4096];
    temp_name(r->out, "module", tmp, sizeof tmp);
    pr_error err = { 0 };
    adapter a = { 0 };
    json_t *c = NULL;
    const char *init = lora ? xp_opt_str(&j, "init_lora_weights") : NULL;
    int doubled = init && (!strcmp(init, "pissa") || !strcmp(init, "olora"));
    if (save_module(&j, tmp, &err))
        rc = ERR("%s", err.msg);
    if (!rc && ada && st_open(tmp, 0, &a.st, &err))   /* its metadata; the tensors are split below */
        rc = ERR("%s", err.msg);
    if (!rc && !ada)
        rc = read_saved(&j, tmp, &a);
    unlink(tmp);
    if (!rc && doubled)
        rc = append_initial_factors(&j, &a);
    if (!rc) {
        c = common_config(&j, type);
        if (lora)
            rc = xp_lora_config(&j, c, doubled);
        else if (ada && !(rc = xp_adalora_config(&j, c)))
            rc = xp_adalora_tensors(&j, &a, c);
        else if (ia3)
            rc = xp_ia3_config(&j, c);
        else if (!strcmp(type, "LOHA") || !strcmp(type, "LOKR"))
            rc = xp_lycoris_config(&j, c, &a, !strcmp(type, "LOKR"));
        else if (!strcmp(type, "VERA"))
            rc = xp_vera_config(&j, c);
        else if (!strcmp(type, "OFT"))
            rc = xp_oft_config(&j, c);
        else if (!strcmp(type, "BOFT"))
            rc = xp_boft_config(&j, c);
        else if (!strcmp(type, "HRA"))
            rc = xp_hra_config(&j, c);
        else if (!strcmp(type, "FOURIERFT"))
            rc = xp_fourierft_config(&j, c);
        else if (!strcmp(type, "TRAINABLE_TOKENS"))
            rc = xp_trainable_tokens_config(&j, c);
        else
            xp_prompt_config(&j, c, prefix, ptuning);
    }
    if (!rc) {
        /* the fields the technique stands for within its type ({"use_dora": true}) */
        json_t *imp = peft_technique_implies(t);
        if (!imp)
            rc = ERR("technique %s: its peft-config extension's implies is not a JSON object", t->name);
        else
            json_object_update(c, imp);
        json_decref(imp);
    }
    if (!rc)
        rc = add_head(&j, &a, c);
    if (!rc && !(rc = write_adapter(r, &j, &a, c)))
        printf("wrote module '%s' (technique %s) as a Hugging Face PEFT %s adapter to %s%s\n", name, t->name, type,
               r->out, doubled ? " (converted to a plain LoRA of twice the rank)" : "");
    json_decref(c);
    adapter_free(&a);
    job_free(&j);
    return rc;
}
