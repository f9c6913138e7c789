/* peftref export --format peft | peftref.
 *
 * --format peftref writes the module as pr_module_save does (docs/modules.md).
 * --format peft writes Hugging Face PEFT's adapter directory: the module is
 * saved first (saved modules already use PEFT's keys and shapes where PEFT
 * has the technique, peft_names.c), then its tensors are copied into
 * adapter_model.safetensors and its options translated into the
 * adapter_config.json fields PEFT writes for the type:
 *
 *   lora, dora     LORA   r, lora_alpha, lora_dropout, use_rslora, use_dora,
 *                         target_modules, rank_pattern / alpha_pattern (the
 *                         sites whose r / alpha differ), layers_to_transform,
 *                         fan_in_fan_out (GPT-2's Conv1D), init_lora_weights
 *   ia3            IA3    target_modules, feedforward_modules
 *   prompt_tuning  PROMPT_TUNING   num_virtual_tokens, token_dim, ...
 *   prefix_tuning(_mlp)  PREFIX_TUNING   num_virtual_tokens, token_dim =
 *                         num_key_value_heads * head_dim, prefix_projection false
 *   lora_fa        LORA   as lora (lora_A is only not trained)
 *   p_tuning       P_TUNING   the folded prompt; PromptEncoderConfig's fields
 *   loha, lokr     LOHA, LOKR   r, alpha, rank_pattern / alpha_pattern (LLaMA only:
 *                         PEFT's LyCORIS layers refuse GPT-2's Conv1D)
 *   vera           VERA   r, vera_dropout, d_initial, save_projection true
 *   oft, hra       OFT, HRA   r / oft_block_size, use_cayley_neumann false; r (LLaMA only)
 *   boft           BOFT   boft_block_size / boft_block_num, boft_n_butterfly_factor;
 *                         boft_R (m, nb, b, b) as saved (LLaMA only)
 *   fourierft      FOURIERFT  n_frequency (+ n_frequency_pattern), scaling, random_loc_seed
 *   trainable_tokens  TRAINABLE_TOKENS   token_indices (untied heads only)
 *   adalora        ADALORA   LoraConfig's fields and init_r, target_r, tinit, tfinal,
 *                         deltaT, beta1, beta2, orth_reg_weight, total_step; each
 *                         module's kept triplets and rank_pattern (adalora_tensors)
 *
 * A lora module initialised by pissa or olora computes
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
#include "module_file.h"
#include "peft_adapter.h"
#include "peftref/head.h"
#include "peftref/pipeline.h"

#define ERR(...) (fprintf(stderr, "peftref export: " __VA_ARGS__), fputc('\n', stderr), 1)

/* ---- the run and its module ---------------------------------------------------------------------- */

typedef struct job {
    pr_registry *reg;
    pr_pipeline *pipe;
    pr_model *m;
    pr_tokenizer *tok;
    pr_module *mod;
    const pr_technique *t;
    const pr_model_config *cfg;
} job;

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

typedef struct tensor_out {
    char name[256];
    int ndim;
    int64_t shape[4];
    float *data;
} tensor_out;

typedef struct adapter {
    tensor_out *t;
    int n;
    st_file *st;             /* the module as saved (PEFT names) */
} adapter;

static void adapter_free(adapter *a)
{
    for (int i = 0; i < a->n; i++)
        free(a->t[i].data);
    free(a->t);
    st_close(a->st);
}

static tensor_out *find_tensor(adapter *a, const char *name)
{
    for (int i = 0; i < a->n; i++)
        if (!strcmp(a->t[i].name, name))
            return &a->t[i];
    return NULL;
}

static tensor_out *add_tensor(adapter *a, const char *name, int ndim, const int64_t *shape)
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
        tensor_out *o = add_tensor(a, t->name, t->ndim, t->shape);
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
        tensor_out *o = find_tensor(a, key);
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

static int option_index(const pr_technique *t, const char *name)
{
    for (uint32_t i = 0; i < t->n_options; i++) {
        pr_option_decl d;
        mf_read_decl(&d, sizeof d, t->options, i);
        if (d.name && !strcmp(d.name, name))
            return (int)i;
    }
    return -1;
}

/* A numeric option (site -1: the module's value). */
static double opt_num(const job *j, const char *name, int site, double def)
{
    int i = option_index(j->t, name);
    if (i < 0)
        return def;
    const pr_option_value *v = site < 0 ? pr_module_option(j->mod, i) : pr_module_site_option(j->mod, site, i);
    return v ? v->num : def;
}

static const char *opt_str(const job *j, const char *name)
{
    int i = option_index(j->t, name);
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

static json_t *site_names(const job *j, uint32_t sites, int lora_kind)
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

static void set_layers(const job *j, json_t *c)
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

static json_t *num_json(double v)
{
    return v == floor(v) && fabs(v) < 1e15 ? json_integer((json_int_t)v) : json_real(v);
}

static int lora_config(const job *j, json_t *c, int doubled)
{
    int dora = !strcmp(j->t->name, "dora");
    int rslora = opt_num(j, "use_rslora", -1, 0) != 0;
    /* the doubled rank of a converted pissa / olora module keeps s = alpha / r (or / sqrt(r)) */
    double rk = doubled ? 2.0 : 1.0, ak = doubled ? (rslora ? sqrt(2.0) : 2.0) : 1.0;
    double r = opt_num(j, "r", -1, 8), alpha = opt_num(j, "alpha", -1, 8);
    uint32_t sites = pr_module_sites(j->mod);
    json_object_set_new(c, "r", num_json(r * rk));
    json_object_set_new(c, "lora_alpha", num_json(alpha * ak));
    json_object_set_new(c, "lora_dropout", json_real(opt_num(j, "dropout", -1, 0)));
    json_object_set_new(c, "use_rslora", json_boolean(rslora));
    json_object_set_new(c, "use_dora", json_boolean(dora));
    json_object_set_new(c, "target_modules", site_names(j, sites, 1));
    json_object_set_new(c, "exclude_modules", json_null());
    json_object_set_new(c, "fan_in_fan_out", json_boolean(j->cfg->family == PR_FAMILY_GPT2));
    json_object_set_new(c, "bias", json_string("none"));
    const char *init = dora ? NULL : opt_str(j, "init_lora_weights");
    if (!init || doubled || !strcmp(init, "true"))
        json_object_set_new(c, "init_lora_weights", json_true());
    else if (!strcmp(init, "false"))
        json_object_set_new(c, "init_lora_weights", json_false());
    else
        json_object_set_new(c, "init_lora_weights", json_string(init));
    set_layers(j, c);
    json_t *rp = json_object(), *ap = json_object();
    for (int s = 0; s < PR_SITE_COUNT; s++) {
        if (!(sites & PR_SITE_BIT(s)))
            continue;
        const char *p = peft_site_path(j->cfg, s);
        if (!p)
            continue;
        const char *name = j->cfg->family == PR_FAMILY_GPT2 ? p : strrchr(p, '.') + 1;
        double sr = opt_num(j, "r", s, r), sa = opt_num(j, "alpha", s, alpha);
        if (sr != r)
            json_object_set_new(rp, name, num_json(sr * rk));
        if (sa != alpha)
            json_object_set_new(ap, name, num_json(sa * ak));
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

/* ---- the further weight types: LOHA, LOKR, VERA, OFT, HRA, FOURIERFT ----------------------------------- */

/* A per-site option that PEFT's config has one value for: the module's, or
 * an error naming the site whose value differs. */
static int one_value(const job *j, const char *opt, const char *field, double *out)
{
    double v = opt_num(j, opt, -1, 0);
    uint32_t sites = pr_module_sites(j->mod);
    for (int s = 0; s < PR_SITE_COUNT; s++)
        if ((sites & PR_SITE_BIT(s)) && opt_num(j, opt, s, v) != v)
            return ERR("module '%s' (technique %s) sets %s per site (%g at %s, %g for the module); PEFT's %s has "
                       "one value for every module; use --format peftref", pr_module_name(j->mod), j->t->name, opt,
                       opt_num(j, opt, s, v), pr_site_name(s), v, field);
    *out = v;
    return 0;
}

/* The sites whose option opt differs from the module's, as PEFT's
 * *_pattern object (module name -> value). */
static json_t *site_pattern(const job *j, const char *opt, double def)
{
    json_t *p = json_object();
    uint32_t sites = pr_module_sites(j->mod);
    for (int s = 0; s < PR_SITE_COUNT; s++) {
        const char *path = (sites & PR_SITE_BIT(s)) ? peft_site_path(j->cfg, s) : NULL;
        if (!path)
            continue;
        double v = opt_num(j, opt, s, def);
        if (v != def)
            json_object_set_new(p, j->cfg->family == PR_FAMILY_GPT2 ? path : strrchr(path, '.') + 1, num_json(v));
    }
    return p;
}

/* PEFT adapts these types only in nn.Linear (and convolution) layers; GPT-2's
 * projections are transformers' Conv1D, which their _create_new_module
 * refuses ("Target module ... is not supported"). */
static int linear_only(const job *j)
{
    if (j->cfg->family != PR_FAMILY_GPT2)
        return 0;
    return ERR("module '%s' (technique %s): Hugging Face PEFT's %s adapts torch.nn.Linear layers only, and GPT-2's "
               "projections are transformers' Conv1D, which it refuses; use --format peftref",
               pr_module_name(j->mod), j->t->name, j->t->peft_type);
}

static void target_fields(const job *j, json_t *c, int has_exclude, int has_fifo)
{
    json_object_set_new(c, "target_modules", site_names(j, pr_module_sites(j->mod), 1));
    if (has_exclude)
        json_object_set_new(c, "exclude_modules", json_null());
    if (has_fifo)
        json_object_set_new(c, "fan_in_fan_out", json_boolean(j->cfg->family == PR_FAMILY_GPT2));
    set_layers(j, c);
}

/* LoKr's factorised lokr_w2 exists in PEFT only when r < max(k, n) / 2 (else
 * it is one full lokr_w2 (k, n), LoKrLayer.update_layer's use_w2). */
static int lokr_check(const job *j, const adapter *a)
{
    for (int i = 0; i < a->n; i++) {
        const tensor_out *w2a = &a->t[i];
        size_t L = strlen(w2a->name);
        if (L < 10 || strcmp(w2a->name + L - 10, ".lokr_w2_a"))
            continue;
        char bname[256];
        snprintf(bname, sizeof bname, "%.*s.lokr_w2_b", (int)(L - 10), w2a->name);
        const tensor_out *w2b = find_tensor((adapter *)a, bname);
        if (!w2b)
            continue;
        int64_t k = w2a->shape[0], r = w2a->shape[1], n = w2b->shape[1], mx = k > n ? k : n;
        if (2 * r >= mx)
            return ERR("module '%s' (technique lokr): at %.*s, r = %lld is not below max(k, n) / 2 = %lld / 2, "
                       "where Hugging Face PEFT's LoKr keeps one full lokr_w2 (%lld, %lld) instead of lokr_w2_a and "
                       "lokr_w2_b; use --format peftref (or a smaller r)", pr_module_name(j->mod), (int)(L - 10),
                       w2a->name, (long long)r, (long long)mx, (long long)k, (long long)n);
    }
    return 0;
}

static int lycoris_config(const job *j, json_t *c, const adapter *a, int lokr)
{
    int rc = linear_only(j);
    if (rc || (lokr && (rc = lokr_check(j, a))))
        return rc;
    double r = opt_num(j, "r", -1, 8), alpha = opt_num(j, "alpha", -1, 8);
    json_object_set_new(c, "r", num_json(r));
    json_object_set_new(c, "alpha", num_json(alpha));
    json_object_set_new(c, "rank_pattern", site_pattern(j, "r", r));
    json_object_set_new(c, "alpha_pattern", site_pattern(j, "alpha", alpha));
    json_object_set_new(c, "rank_dropout", json_real(0.0));
    json_object_set_new(c, "module_dropout", json_real(0.0));
    json_object_set_new(c, "use_effective_conv2d", json_false());
    json_object_set_new(c, "init_weights", json_true());
    if (lokr) {
        json_object_set_new(c, "decompose_both", json_false());
        json_object_set_new(c, "decompose_factor", json_integer(-1));
        json_object_set_new(c, "rank_dropout_scale", json_false());
    }
    target_fields(j, c, 1, 0);
    return 0;
}

static int vera_config(const job *j, json_t *c)
{
    if (opt_num(j, "save_projection", -1, 1) == 0)
        return ERR("module '%s' (technique %s) regenerates vera_A and vera_B from peftref's seed, which Hugging Face "
                   "PEFT (projection_prng_key through torch's generator) does not reproduce; train with technique "
                   "vera (save_projection true) or use --format peftref", pr_module_name(j->mod), j->t->name);
    double d_initial;
    int rc = one_value(j, "d_initial", "d_initial", &d_initial);
    if (rc)
        return rc;
    json_object_set_new(c, "r", num_json(opt_num(j, "r", -1, 256)));
    json_object_set_new(c, "projection_prng_key", json_integer(0));
    json_object_set_new(c, "save_projection", json_true());
    json_object_set_new(c, "vera_dropout", json_real(opt_num(j, "dropout", -1, 0)));
    json_object_set_new(c, "d_initial", json_real(d_initial));
    json_object_set_new(c, "bias", json_string("none"));
    json_object_set_new(c, "init_weights", json_true());
    target_fields(j, c, 0, 1);
    return 0;
}

static int oft_config(const job *j, json_t *c)
{
    double r, bs;
    int rc = linear_only(j);
    if (rc || (rc = one_value(j, "r", "r", &r)) || (rc = one_value(j, "oft_block_size", "oft_block_size", &bs)))
        return rc;
    json_object_set_new(c, "r", num_json(r));
    json_object_set_new(c, "oft_block_size", num_json(r ? 0 : bs));
    json_object_set_new(c, "module_dropout", json_real(0.0));
    json_object_set_new(c, "bias", json_string("none"));
    json_object_set_new(c, "init_weights", json_true());
    json_object_set_new(c, "coft", json_false());
    json_object_set_new(c, "eps", json_real(6e-05));
    json_object_set_new(c, "block_share", json_false());
    /* peftref computes the exact Cayley transform (plugins/oft.c) */
    json_object_set_new(c, "use_cayley_neumann", json_false());
    json_object_set_new(c, "num_cayley_neumann_terms", json_integer(5));
    target_fields(j, c, 1, 1);
    return 0;
}

/* BOFTConfig: boft_block_size and boft_block_num are exclusive (one is 0);
 * peftref's boft takes boft_block_size when it is set. */
static int boft_config(const job *j, json_t *c)
{
    double bs, bn, m;
    int rc = linear_only(j);
    if (rc || (rc = one_value(j, "boft_block_size", "boft_block_size", &bs)) ||
        (rc = one_value(j, "boft_block_num", "boft_block_num", &bn)) ||
        (rc = one_value(j, "boft_n_butterfly_factor", "boft_n_butterfly_factor", &m)))
        return rc;
    json_object_set_new(c, "boft_block_size", num_json(bs));
    json_object_set_new(c, "boft_block_num", num_json(bs ? 0 : bn));
    json_object_set_new(c, "boft_n_butterfly_factor", num_json(m));
    json_object_set_new(c, "boft_dropout", json_real(0.0));
    json_object_set_new(c, "bias", json_string("none"));
    json_object_set_new(c, "init_weights", json_true());
    target_fields(j, c, 1, 1);
    return 0;
}

static int hra_config(const job *j, json_t *c)
{
    double r;
    int rc = linear_only(j);
    if (rc || (rc = one_value(j, "r", "r", &r)))
        return rc;
    json_object_set_new(c, "r", num_json(r));
    json_object_set_new(c, "apply_GS", json_false());
    json_object_set_new(c, "init_weights", json_boolean(opt_num(j, "init_weights", -1, 1) != 0));
    json_object_set_new(c, "bias", json_string("none"));
    target_fields(j, c, 1, 0);
    return 0;
}

static int fourierft_config(const job *j, json_t *c)
{
    const char *norm = opt_str(j, "ifft2_norm");
    if (norm && strcmp(norm, "backward"))
        return ERR("module '%s' (technique fourierft) uses ifft2_norm %s; Hugging Face PEFT's FourierFT uses "
                   "torch.fft.ifft2's default (backward) and has no field for another; use --format peftref",
                   pr_module_name(j->mod), norm);
    double n = opt_num(j, "n_frequency", -1, 1000);
    json_object_set_new(c, "n_frequency", num_json(n));
    json_object_set_new(c, "n_frequency_pattern", site_pattern(j, "n_frequency", n));
    json_object_set_new(c, "scaling", json_real(opt_num(j, "scaling", -1, 150)));
    json_object_set_new(c, "random_loc_seed", num_json(opt_num(j, "random_loc_seed", -1, 777)));
    json_object_set_new(c, "init_weights", json_boolean(opt_num(j, "init_weights", -1, 0) != 0));
    json_object_set_new(c, "bias", json_string("none"));
    target_fields(j, c, 1, 1);
    return 0;
}

/* TrainableTokensConfig: the embedding's rows token_indices.  PEFT ties the
 * same rows of a tied output head to them; peftref's trainable_tokens
 * changes the input side only. */
static int trainable_tokens_config(const job *j, json_t *c)
{
    if (j->cfg->tied_head)
        return ERR("module '%s' (technique trainable_tokens): the base model ties its output head to the token "
                   "embedding, where Hugging Face PEFT's TRAINABLE_TOKENS replaces the head's rows too and peftref's "
                   "trainable_tokens only the input rows; use --format peftref", pr_module_name(j->mod));
    const char *ids = opt_str(j, "token_indices");
    json_t *a = json_array();
    for (const char *s = ids ? ids : ""; *s;) {
        char *end;
        long v = strtol(s, &end, 10);
        if (end == s) {
            s++;
            continue;
        }
        json_array_append_new(a, json_integer(v));
        s = end;
    }
    json_object_set_new(c, "token_indices", a);
    json_t *tm = json_array();
    json_array_append_new(tm, json_string(j->cfg->family == PR_FAMILY_GPT2 ? "wte" : "embed_tokens"));
    json_object_set_new(c, "target_modules", tm);
    json_object_set_new(c, "init_weights", json_boolean(opt_num(j, "init_weights", -1, 1) != 0));
    return 0;
}

static int ia3_config(const job *j, json_t *c)
{
    uint32_t sites = pr_module_sites(j->mod);
    if (j->cfg->family != PR_FAMILY_GPT2 && (sites & (PR_SITE_BIT(PR_SITE_ATTN_K) | PR_SITE_BIT(PR_SITE_ATTN_V))))
        return ERR("module '%s' (technique ia3) scales keys or values after RoPE (attn.k, attn.v), which PEFT's "
                   "k_proj / v_proj vectors do not express on a LLaMA-family model (use sites k and v); use "
                   "--format peftref", pr_module_name(j->mod));
    json_object_set_new(c, "target_modules", site_names(j, sites, 0));
    json_t *ff = json_array();
    if (sites & PR_SITE_BIT(PR_SITE_FFN_ACT)) {
        const char *p = peft_site_path(j->cfg, PR_SITE_FFN_DOWN);
        json_array_append_new(ff, json_string(j->cfg->family == PR_FAMILY_GPT2 ? p : strrchr(p, '.') + 1));
    }
    json_object_set_new(c, "feedforward_modules", ff);
    json_object_set_new(c, "exclude_modules", json_null());
    json_object_set_new(c, "fan_in_fan_out", json_boolean(j->cfg->family == PR_FAMILY_GPT2));
    json_object_set_new(c, "init_ia3_weights", json_true());
    return 0;
}

static void prompt_config(const job *j, json_t *c, int prefix, int ptuning)
{
    const pr_model_config *g = j->cfg;
    json_object_set_new(c, "num_virtual_tokens", num_json(opt_num(j, "n_tokens", -1, 0)));
    json_object_set_new(c, "num_layers", json_integer(g->n_layers));
    json_object_set_new(c, "num_transformer_submodules", json_integer(1));
    if (prefix) {
        /* PEFT's past_key_values per layer: num_key_value_heads heads of head_dim */
        json_object_set_new(c, "token_dim", json_integer((json_int_t)g->n_kv_heads * g->d_head));
        json_object_set_new(c, "num_attention_heads", json_integer(g->n_kv_heads));
        json_object_set_new(c, "encoder_hidden_size", json_integer(g->d_model));
        json_object_set_new(c, "prefix_projection", json_false());
        return;
    }
    json_object_set_new(c, "token_dim", json_integer(g->d_model));
    json_object_set_new(c, "num_attention_heads", json_integer(g->n_heads));
    if (ptuning) {
        /* PromptEncoderConfig; the file holds the MLP's output (p_tuning folds
         * to it when saved), which PEFT's PromptEncoder in inference mode
         * uses as its embedding */
        json_object_set_new(c, "encoder_reparameterization_type", json_string("MLP"));
        double h = opt_num(j, "encoder_hidden_size", -1, 0);   /* 0: token_dim, PEFT's None */
        json_object_set_new(c, "encoder_hidden_size", json_integer(h > 0 ? (json_int_t)h : g->d_model));
        json_object_set_new(c, "encoder_num_layers", json_integer(2));
        json_object_set_new(c, "encoder_dropout", json_real(0.0));
        return;
    }
    const char *init = opt_str(j, "init"), *text = opt_str(j, "init_text");
    int is_text = init && !strcmp(init, "text");
    json_object_set_new(c, "prompt_tuning_init",
                        json_string(is_text ? "TEXT" : init && !strcmp(init, "normal") ? "RANDOM" : "SAMPLE_VOCAB"));
    json_object_set_new(c, "prompt_tuning_init_text", is_text && text ? json_string(text) : json_null());
    json_object_set_new(c, "tokenizer_name_or_path", json_null());
    json_object_set_new(c, "tokenizer_kwargs", json_null());
}

/* ---- ADALORA ----------------------------------------------------------------------------------------- */

/* peftref's adalora keeps init_r triplets per insertion, lora_E of every
 * insertion in one (insertions, init_r) tensor (row k: insertion k, layer
 * by layer in site order), and the mask of kept triplets in its
 * rank_pattern buffer, which module files do not carry (it comes back as
 * ones).  What PEFT saves (AdaLoraModel.resize_state_dict_by_rank_pattern)
 * is each module's kept triplets only: lora_A (k, in), lora_B (out, k),
 * lora_E (k, 1), with rank_pattern {"<module>.lora_E": init_r booleans}.
 * A triplet is kept when the buffer keeps it and its singular value is not
 * 0: the budget's masking zeroes lora_E and every step after the final
 * allocation zeroes it again, so a pruned triplet's value is exactly 0
 * where a trained kept one is not.  A module whose lora_E is 0 everywhere
 * (never trained) is written whole with rank_pattern null, so it keeps
 * training as it would in peftref. */
static int adalora_tensors(job *j, adapter *a, json_t *c)
{
    const char *mname = pr_module_name(j->mod);
    const float *E = NULL, *P = NULL;
    int64_t n_rows = 0, r = 0;
    for (int i = 0; i < pr_module_n_params(j->mod); i++) {
        pr_module_param p;
        pr_module_param_at(j->mod, i, &p);
        if (!strcmp(p.param, "lora_E") || !strcmp(p.param, "rank_pattern")) {
            if (p.ndim != 2)
                return ERR("module '%s': %s is not 2-dimensional", mname, p.param);
            *(!strcmp(p.param, "lora_E") ? &E : &P) = p.data;
            n_rows = p.shape[0];
            r = p.shape[1];
        }
    }
    if (!E)
        return ERR("module '%s' (technique adalora) has no lora_E", mname);
    int any = 0, pruned = 0;
    for (int64_t i = 0; i < n_rows * r; i++) {
        any |= E[i] != 0.0f;
        pruned |= E[i] == 0.0f || (P && P[i] == 0.0f);
    }
    int resize = any && pruned;
    uint32_t sites = pr_module_sites(j->mod);
    int n_sites = 0, nl = 0;
    for (int s = 0; s < PR_SITE_COUNT; s++)
        n_sites += (sites & PR_SITE_BIT(s)) != 0;
    const int *ls = pr_module_layers(j->mod, &nl);
    if (!ls)
        nl = j->cfg->n_layers;
    if ((int64_t)n_sites * nl != n_rows)
        return ERR("module '%s': lora_E has %lld rows for %d insertions", mname, (long long)n_rows, n_sites * nl);
    json_t *rp = resize ? json_object() : json_null();
    int rc = 0;
    for (int i = 0; !rc && i < pr_module_n_params(j->mod); i++) {
        pr_module_param p;
        pr_module_param_at(j->mod, i, &p);
        int is_a = !strcmp(p.param, "lora_A"), is_b = !strcmp(p.param, "lora_B");
        if (!is_a && !is_b)
            continue;
        const char *path = peft_site_path(j->cfg, p.site);
        if (!path) {
            rc = ERR("module '%s' (technique adalora) adapts %s, which has no Hugging Face module name; use --format "
                     "peftref", mname, pr_site_name(p.site));
            break;
        }
        int li = 0, si = 0;
        while (ls && li < nl && ls[li] != p.layer)
            li++;
        if (!ls)
            li = p.layer;
        for (int s = 0; s < p.site; s++)
            si += (sites & PR_SITE_BIT(s)) != 0;
        int64_t k = (int64_t)li * n_sites + si;
        const float *ek = E + k * r, *pk = P ? P + k * r : NULL;
        int64_t kept = 0;
        for (int64_t q = 0; q < r; q++)
            kept += !resize || (ek[q] != 0.0f && (!pk || pk[q] != 0.0f));
        char mod[200], key[256];
        snprintf(mod, sizeof mod, "%s.%d.%s", peft_blocks_path(j->cfg), p.layer, path);
        int64_t shape[2];
        if (is_a) {
            shape[0] = kept;
            shape[1] = p.shape[1];
        } else {
            shape[0] = p.shape[0];
            shape[1] = kept;
        }
        snprintf(key, sizeof key, "base_model.model.%s.lora_%c", mod, is_a ? 'A' : 'B');
        tensor_out *o = add_tensor(a, key, 2, shape);
        tensor_out *oe = NULL;
        if (o && is_a) {
            int64_t es[2] = { kept, 1 };
            snprintf(key, sizeof key, "base_model.model.%s.lora_E", mod);
            oe = add_tensor(a, key, 2, es);
            o = &a->t[a->n - 2];   /* add_tensor may move the array */
        }
        if (!o || (is_a && !oe)) {
            rc = ERR("out of memory");
            break;
        }
        int64_t q = 0;
        json_t *bools = is_a && resize ? json_array() : NULL;
        for (int64_t t = 0; t < r; t++) {
            int keep = !resize || (ek[t] != 0.0f && (!pk || pk[t] != 0.0f));
            if (bools)
                json_array_append_new(bools, json_boolean(keep));
            if (!keep)
                continue;
            if (is_a) {
                memcpy(o->data + q * p.shape[1], p.data + t * p.shape[1], (size_t)p.shape[1] * sizeof(float));
                oe->data[q] = ek[t];
            } else {
                for (int64_t row = 0; row < p.shape[0]; row++)
                    o->data[row * kept + q] = p.data[row * r + t];
            }
            q++;
        }
        if (bools) {
            snprintf(key, sizeof key, "%s.lora_E", mod);
            json_object_set_new(rp, key, bools);
        }
    }
    if (rc) {
        json_decref(rp);
        return rc;
    }
    json_object_set_new(c, "rank_pattern", rp);
    return 0;
}

static int adalora_config(const job *j, json_t *c)
{
    int rc = lora_config(j, c, 0);
    if (rc)
        return rc;
    json_object_set_new(c, "r", json_integer(8));   /* LoraConfig's r, which AdaLoRA does not use */
    json_object_del(c, "rank_pattern");
    static const char *const ints[][2] = { { "target_r", "target_r" }, { "init_r", "init_r" }, { "tinit", "tinit" },
                                           { "tfinal", "tfinal" }, { "deltaT", "delta_t" } };
    for (size_t i = 0; i < sizeof ints / sizeof ints[0]; i++)
        json_object_set_new(c, ints[i][0], num_json(opt_num(j, ints[i][1], -1, 0)));
    json_object_set_new(c, "beta1", json_real(opt_num(j, "beta1", -1, 0.85)));
    json_object_set_new(c, "beta2", json_real(opt_num(j, "beta2", -1, 0.85)));
    json_object_set_new(c, "orth_reg_weight", json_real(opt_num(j, "orth_reg_weight", -1, 0.5)));
    double total = opt_num(j, "total_step", -1, 0);
    json_object_set_new(c, "total_step", total > 0 ? num_json(total) : json_null());
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
    tensor_out *w = add_tensor(a, "base_model.model.score.weight", 2, shape);
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
        tensor_out *b = add_tensor(a, "base_model.model.score.bias", 1, bs);
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
    int lora = type && !strcmp(type, "LORA") &&
               (!strcmp(t->name, "lora") || !strcmp(t->name, "dora") || !strcmp(t->name, "lora_fa"));
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
        rc = ERR("module '%s': technique %s (PEFT type %s) is not written as a PEFT adapter by peftref (LORA from "
                 "lora, dora and lora_fa, IA3, PROMPT_TUNING, P_TUNING, PREFIX_TUNING, LOHA, LOKR, VERA, OFT, BOFT, "
                 "HRA, FOURIERFT, TRAINABLE_TOKENS and ADALORA are); use --format peftref", name, t->name, type);
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
    const char *init = lora && !strcmp(t->name, "lora") ? opt_str(&j, "init_lora_weights") : NULL;
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
            rc = lora_config(&j, c, doubled);
        else if (ada && !(rc = adalora_config(&j, c)))
            rc = adalora_tensors(&j, &a, c);
        else if (ia3)
            rc = ia3_config(&j, c);
        else if (!strcmp(type, "LOHA") || !strcmp(type, "LOKR"))
            rc = lycoris_config(&j, c, &a, !strcmp(type, "LOKR"));
        else if (!strcmp(type, "VERA"))
            rc = vera_config(&j, c);
        else if (!strcmp(type, "OFT"))
            rc = oft_config(&j, c);
        else if (!strcmp(type, "BOFT"))
            rc = boft_config(&j, c);
        else if (!strcmp(type, "HRA"))
            rc = hra_config(&j, c);
        else if (!strcmp(type, "FOURIERFT"))
            rc = fourierft_config(&j, c);
        else if (!strcmp(type, "TRAINABLE_TOKENS"))
            rc = trainable_tokens_config(&j, c);
        else
            prompt_config(&j, c, prefix, ptuning);
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
