/* peftref export --format peft | peftref.
 *
 * --format peftref writes the module as pr_module_save does (docs/modules.md).
 * --format peft writes Hugging Face PEFT's adapter directory for the
 * technique's peft_type (pr_technique.peft_type).  What every PEFT type
 * shares is here: the module is saved first (saved modules already use
 * PEFT's keys and shapes where PEFT has the technique, peft_names.c) and
 * its tensors copied into adapter_model.safetensors (unless the technique's
 * writer makes every tensor itself, own_tensors), PeftConfig's common
 * fields are set, and then the technique's own write() of its peft-config
 * extension (include/peftref/ext/peft_config.h, through the host services
 * of export_peft_host.c) sets its type's fields and reshapes the tensors
 * where its saved form differs from PEFT's.  After it come the fields the
 * technique implies within its type, a classification head as
 * modules_to_save "score", and the writing.
 *
 * Both write to a temporary name beside --out and rename it into place, so
 * a failure leaves nothing at --out. */
#include "config.h"

#include <dirent.h>
#include <errno.h>
#include <stddef.h>
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

/* ---- --format peft: adapter_config.json ------------------------------------------------------------ */

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

/* ext covers member m (a plugin built against a shorter pr_ext_peft_config has none of the later ones) */
#define EXT_HAS(ext, m) ((ext)->struct_size >= offsetof(pr_ext_peft_config, m) + sizeof (ext)->m)

int export_peft(const export_request *r)
{
    job j;
    int rc = check_out(r);
    if (rc || (rc = job_open(r, &j)))
        return rc;
    const pr_technique *t = j.t;
    const char *name = pr_module_name(j.mod);
    const char *type = t->peft_type;
    const pr_ext_peft_config *ext = peft_technique_variant(t);
    int (*write)(const pr_peft_writer *, pr_peft_out *) = ext && EXT_HAS(ext, write) ? ext->write : NULL;
    int own_tensors = ext && EXT_HAS(ext, own_tensors) && ext->own_tensors;
    if (!type || t->integration == PR_INTEGRATE_SELECT)
        rc = ERR("module '%s': technique %s has no Hugging Face PEFT type; use --format peftref", name, t->name);
    else if (!write)
        rc = ERR("module '%s': technique %s (PEFT type %s) has no Hugging Face PEFT writer; use --format peftref", name,
                 t->name, type);
    else if (pr_module_is_gated(j.mod))
        rc = ERR("module '%s' sits behind a learned gate, which PEFT has no field for; use --format peftref", name);
    if (rc) {
        job_free(&j);
        return rc;
    }
    char tmp[4096], note[512] = "";
    temp_name(r->out, "module", tmp, sizeof tmp);
    pr_error err = { 0 };
    adapter a = { 0 };
    json_t *c = NULL;
    if (save_module(&j, tmp, &err))
        rc = ERR("%s", err.msg);
    if (!rc && own_tensors && st_open(tmp, 0, &a.st, &err))   /* its metadata; write() makes the tensors */
        rc = ERR("%s", err.msg);
    if (!rc && !own_tensors)
        rc = read_saved(&j, tmp, &a);
    unlink(tmp);
    if (!rc && !(c = common_config(&j, type)))
        rc = ERR("out of memory");
    if (!rc)
        rc = xp_write_type(&j, &a, c, write, note, sizeof note);
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
        printf("wrote module '%s' (technique %s) as a Hugging Face PEFT %s adapter to %s%s%s%s\n", name, t->name, type,
               r->out, *note ? " (" : "", note, *note ? ")" : "");
    json_decref(c);
    adapter_free(&a);
    job_free(&j);
    return rc;
}
