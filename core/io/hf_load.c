/* peftref core: Hugging Face checkpoints (config.json + safetensors) of the
 * GPT-2 and LLaMA families.
 *
 * A checkpoint directory holds config.json and either model.safetensors or
 * model.safetensors.index.json, whose "weight_map" names the shard file of
 * every tensor.  Tensor names are those of transformers' GPT2Model, with or
 * without the "transformer." prefix GPT2LMHeadModel adds, or of
 * LlamaForCausalLM and its relatives ("model.layers.0.self_attn.q_proj.
 * weight").  Both are stored in the model's own layout (GPT-2's Conv1D
 * [in, out], nn.Linear's [out, in]), so F32 tensors are used in place from a private writable mapping (pages a
 * trainable tensor writes are copied, the file is never touched); F16 and
 * BF16 tensors are converted into one f32 block. */
#include <errno.h>
#include <jansson.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>

#include "fileio.h"
#include "hf_config.h"
#include "model_internal.h"
#include "safetensors.h"

#define CONFIG_MAX_BYTES ((size_t)4 << 20)
#define INDEX_MAX_BYTES ((size_t)64 << 20)

static const char prefix[] = "transformer.";

static int load_config(const char *dir, pr_model_config *cfg, pr_error *err)
{
    char *path = fileio_join(dir, "config.json");
    if (!path)
        return pr_errorf(err, PR_ERR_NOMEM, "%s: out of memory", dir);
    char *text = NULL;
    size_t len = 0;
    int rc = fileio_read_all(path, CONFIG_MAX_BYTES, &text, &len, err);
    if (rc == PR_OK) {
        json_error_t jerr;
        json_t *root = json_loadb(text, len, 0, &jerr);
        if (!root) {
            rc = pr_errorf(err, PR_ERR_FORMAT, "%s:%d:%d: invalid JSON: %s", path, jerr.line,
                           jerr.column, jerr.text);
        } else {
            rc = hf_parse_config(root, path, cfg, err);
            int vrc = rc == PR_OK ? pr_config_validate(cfg, err) : PR_OK;
            if (vrc != PR_OK) {
                char inner[PR_ERROR_MSG_MAX];
                snprintf(inner, sizeof inner, "%s", err ? err->msg : "");
                rc = pr_errorf(err, (pr_status)vrc, "%s: %s", path, inner);
            }
            json_decref(root);
        }
        free(text);
    }
    free(path);
    return rc;
}

/* ---- tensor sources --------------------------------------------------------- */

typedef struct shard {
    char *path;          /* full path */
    st_file *st;
    unsigned char *claimed;  /* per tensor of st: taken by a model tensor */
    int used;            /* a model tensor points into the mapping */
} shard;

typedef struct sources {
    shard *shards;
    int n_shards;
    /* sharded checkpoints: weight_map, name -> shard index */
    char *index_path;
    char **wm_names;
    int *wm_shard;
    int n_wm;
} sources;

static void sources_free(sources *s)
{
    for (int i = 0; i < s->n_shards; i++) {
        st_close(s->shards[i].st);
        free(s->shards[i].path);
        free(s->shards[i].claimed);
    }
    free(s->shards);
    for (int i = 0; i < s->n_wm; i++)
        free(s->wm_names[i]);
    free(s->wm_names);
    free(s->wm_shard);
    free(s->index_path);
    memset(s, 0, sizeof *s);
}

static int add_shard(sources *s, const char *dir, const char *file, pr_error *err)
{
    shard *ns = realloc(s->shards, (size_t)(s->n_shards + 1) * sizeof *ns);
    if (!ns)
        return pr_errorf(err, PR_ERR_NOMEM, "%s: out of memory", dir);
    s->shards = ns;
    shard *sh = &s->shards[s->n_shards];
    memset(sh, 0, sizeof *sh);
    sh->path = fileio_join(dir, file);
    if (!sh->path)
        return pr_errorf(err, PR_ERR_NOMEM, "%s: out of memory", dir);
    s->n_shards++;
    int rc = st_open(sh->path, ST_OPEN_WRITABLE, &sh->st, err);
    if (rc != PR_OK)
        return rc;
    sh->claimed = calloc((size_t)st_count(sh->st) + 1, 1);
    if (!sh->claimed)
        return pr_errorf(err, PR_ERR_NOMEM, "%s: out of memory", sh->path);
    return PR_OK;
}

static int shard_by_file(const sources *s, const char *dir, const char *file)
{
    char *p = fileio_join(dir, file);
    int found = -1;
    for (int i = 0; p && i < s->n_shards; i++)
        if (strcmp(s->shards[i].path, p) == 0)
            found = i;
    free(p);
    return found;
}

static int load_index(sources *s, const char *dir, pr_error *err)
{
    char *text = NULL;
    size_t len = 0;
    int rc = fileio_read_all(s->index_path, INDEX_MAX_BYTES, &text, &len, err);
    if (rc != PR_OK)
        return rc;
    json_error_t jerr;
    json_t *root = json_loadb(text, len, 0, &jerr);
    free(text);
    if (!root)
        return pr_errorf(err, PR_ERR_FORMAT, "%s:%d:%d: invalid JSON: %s", s->index_path,
                         jerr.line, jerr.column, jerr.text);
    const json_t *wm = json_is_object(root) ? json_object_get(root, "weight_map") : NULL;
    if (!json_is_object(wm)) {
        json_decref(root);
        return pr_errorf(err, PR_ERR_FORMAT, "%s: missing object 'weight_map'", s->index_path);
    }
    size_t n = json_object_size(wm);
    s->wm_names = calloc(n + 1, sizeof *s->wm_names);
    s->wm_shard = calloc(n + 1, sizeof *s->wm_shard);
    if (!s->wm_names || !s->wm_shard) {
        json_decref(root);
        return pr_errorf(err, PR_ERR_NOMEM, "%s: out of memory", s->index_path);
    }
    const char *name;
    json_t *v;
    json_object_foreach((json_t *)wm, name, v) {
        const char *file = json_is_string(v) ? json_string_value(v) : NULL;
        if (!file || !*file || strchr(file, '/') || strcmp(file, "..") == 0 || strcmp(file, ".") == 0) {
            rc = pr_errorf(err, PR_ERR_FORMAT,
                           "%s: weight_map entry of tensor '%s' is not a file name in the checkpoint directory",
                           s->index_path, name);
            break;
        }
        int k = shard_by_file(s, dir, file);
        if (k < 0) {
            if ((rc = add_shard(s, dir, file, err)) != PR_OK)
                break;
            k = s->n_shards - 1;
        }
        s->wm_names[s->n_wm] = strdup(name);
        s->wm_shard[s->n_wm] = k;
        if (!s->wm_names[s->n_wm]) {
            rc = pr_errorf(err, PR_ERR_NOMEM, "%s: out of memory", s->index_path);
            break;
        }
        s->n_wm++;
    }
    json_decref(root);
    return rc;
}

static int file_exists(const char *path)
{
    struct stat sb;
    return stat(path, &sb) == 0;
}

static int open_sources(sources *s, const char *dir, pr_error *err)
{
    memset(s, 0, sizeof *s);
    char *single = fileio_join(dir, "model.safetensors");
    s->index_path = fileio_join(dir, "model.safetensors.index.json");
    if (!single || !s->index_path) {
        free(single);
        return pr_errorf(err, PR_ERR_NOMEM, "%s: out of memory", dir);
    }
    int rc;
    if (file_exists(single) || !file_exists(s->index_path)) {
        free(s->index_path);
        s->index_path = NULL;
        if (file_exists(single))
            rc = add_shard(s, dir, "model.safetensors", err);
        else
            rc = pr_errorf(err, PR_ERR_NOTFOUND,
                           "%s: no model.safetensors or model.safetensors.index.json in the checkpoint directory",
                           dir);
    } else {
        rc = load_index(s, dir, err);
    }
    free(single);
    return rc;
}

/* Find the file tensor holding model tensor `name`, under its own name or
 * with the "transformer." prefix; exactly one must exist. */
static int find_source(sources *s, const char *dir, const char *name, int *out_shard,
                       const st_tensor **out_t, pr_error *err)
{
    char *alt = malloc(sizeof prefix + strlen(name));
    if (!alt)
        return pr_errorf(err, PR_ERR_NOMEM, "%s: out of memory", dir);
    memcpy(alt, prefix, sizeof prefix - 1);
    strcpy(alt + sizeof prefix - 1, name);
    const char *cand[2] = {name, alt};
    int found = 0, rc = PR_OK;
    for (int c = 0; c < 2 && rc == PR_OK; c++) {
        int k = -1;
        if (s->index_path) {
            for (int i = 0; i < s->n_wm; i++)
                if (strcmp(s->wm_names[i], cand[c]) == 0)
                    k = s->wm_shard[i];
        } else if (st_find(s->shards[0].st, cand[c])) {
            k = 0;
        }
        if (k < 0)
            continue;
        const st_tensor *t = st_find(s->shards[k].st, cand[c]);
        if (!t) {
            rc = pr_errorf(err, PR_ERR_FORMAT,
                           "%s: tensor '%s' is missing although %s maps it to this file",
                           s->shards[k].path, cand[c], s->index_path);
        } else if (found) {
            rc = pr_errorf(err, PR_ERR_FORMAT, "%s: tensor '%s' is present both as '%s' and as '%s'",
                           s->index_path ? s->index_path : s->shards[k].path, name, name, alt);
        } else {
            found = 1;
            *out_shard = k;
            *out_t = t;
        }
    }
    if (rc == PR_OK && !found)
        rc = pr_errorf(err, PR_ERR_NOTFOUND, "%s: tensor '%s' not found (nor '%s')",
                       s->index_path ? s->index_path : s->shards[0].path, name, alt);
    free(alt);
    return rc;
}

static int ends_with(const char *s, const char *suffix)
{
    size_t a = strlen(s), b = strlen(suffix);
    return a >= b && strcmp(s + a - b, suffix) == 0;
}

/* Tensors a GPT-2 checkpoint may carry that the model does not need: the
 * causal-mask buffers, and the LM head when it is tied to wte. */
static int ignorable(const char *name, int tied)
{
    if (strncmp(name, prefix, sizeof prefix - 1) == 0)
        name += sizeof prefix - 1;
    if (ends_with(name, ".attn.bias") || ends_with(name, ".attn.masked_bias"))
        return 1;
    /* LLaMA checkpoints of older transformers saved RoPE's frequencies */
    if (ends_with(name, ".rotary_emb.inv_freq"))
        return 1;
    return tied && strcmp(name, "lm_head.weight") == 0;
}

static int check_shape(const pr_tensor_info *mt, const st_tensor *t, const char *path, pr_error *err)
{
    int same = mt->ndim == t->ndim;
    for (int d = 0; same && d < mt->ndim; d++)
        same = mt->shape[d] == t->shape[d];
    if (same)
        return PR_OK;
    char have[160], want[160];
    st_format_shape(t->ndim, t->shape, have, sizeof have);
    st_format_shape(mt->ndim, mt->shape, want, sizeof want);
    return pr_errorf(err, PR_ERR_FORMAT, "%s: tensor '%s' has shape %s but config.json implies %s",
                     path, t->name, have, want);
}

/* ---- loading ------------------------------------------------------------------- */

int pr_model_load_hf(const char *dir, pr_model **out, pr_error *err)
{
    if (!dir || !out)
        return pr_errorf(err, PR_ERR_INVALID, "load_hf: NULL directory or output");
    *out = NULL;
    pr_model_config cfg;
    int rc = load_config(dir, &cfg, err);
    if (rc != PR_OK)
        return rc;

    sources src;
    pr_model *m = NULL;
    int *src_shard = NULL;
    const st_tensor **src_t = NULL;
    rc = open_sources(&src, dir, err);
    if (rc == PR_OK)
        rc = model_create_empty(&cfg, &m, err);
    if (rc != PR_OK)
        goto fail;

    int nt = pr_model_n_tensors(m);
    src_shard = calloc((size_t)nt, sizeof *src_shard);
    src_t = calloc((size_t)nt, sizeof *src_t);
    if (!src_shard || !src_t) {
        rc = pr_errorf(err, PR_ERR_NOMEM, "%s: out of memory", dir);
        goto fail;
    }
    for (int i = 0; i < nt; i++) {
        const pr_tensor_info *mt = pr_model_tensor(m, i);
        if ((rc = find_source(&src, dir, mt->name, &src_shard[i], &src_t[i], err)) != PR_OK)
            goto fail;
        shard *sh = &src.shards[src_shard[i]];
        const st_tensor *t = src_t[i];
        if ((rc = check_shape(mt, t, sh->path, err)) != PR_OK)
            goto fail;
        if (t->dtype == ST_DTYPE_OTHER) {
            rc = pr_errorf(err, PR_ERR_UNSUPPORTED,
                           "%s: tensor '%s' has dtype %s; weights must be F32, F16 or BF16",
                           sh->path, t->name, t->dtype_name);
            goto fail;
        }
        sh->claimed[t - st_tensor_at(sh->st, 0)] = 1;
    }
    /* Everything else in the files must be a known buffer: an unexpected
     * tensor means the checkpoint is not the model config.json describes. */
    for (int k = 0; k < src.n_shards; k++) {
        shard *sh = &src.shards[k];
        for (int j = 0; j < st_count(sh->st); j++) {
            const char *name = st_tensor_at(sh->st, j)->name;
            if (!sh->claimed[j] && !ignorable(name, cfg.tied_head)) {
                rc = pr_errorf(err, PR_ERR_FORMAT,
                               "%s: unexpected tensor '%s' (not part of a %s model with this config.json)",
                               sh->path, name, cfg.family == PR_FAMILY_LLAMA ? "LLaMA-family" : "GPT-2");
                goto fail;
            }
        }
    }

    /* F32 tensors in place, aligned for float access; the rest converted. */
    for (int i = 0; i < nt; i++) {
        const st_tensor *t = src_t[i];
        if (t->dtype == ST_F32 && (uintptr_t)t->data % sizeof(float) == 0) {
            model_set_tensor_data(m, i, (float *)t->data);
            src.shards[src_shard[i]].used = 1;
        }
    }
    if ((rc = model_alloc_storage(m, err)) != PR_OK)
        goto fail;
    for (int i = 0; i < nt; i++) {
        const pr_tensor_info *mt = pr_model_tensor(m, i);
        if ((void *)mt->data != src_t[i]->data &&
            (rc = st_to_f32(src.shards[src_shard[i]].st, src_t[i], mt->data, err)) != PR_OK)
            goto fail;
    }
    for (int k = 0; k < src.n_shards; k++) {
        if (!src.shards[k].used)
            continue;
        void *addr;
        size_t len;
        st_detach_mapping(src.shards[k].st, &addr, &len);
        if ((rc = model_adopt_mapping(m, addr, len, err)) != PR_OK) {
            munmap(addr, len);
            goto fail;
        }
    }
    free(src_shard);
    free(src_t);
    sources_free(&src);
    *out = m;
    return PR_OK;

fail:
    pr_model_free(m);
    free(src_shard);
    free(src_t);
    sources_free(&src);
    return rc;
}

/* ---- saving ---------------------------------------------------------------------- */

int pr_model_save_safetensors(const pr_model *m, const char *path, pr_error *err)
{
    return pr_model_save_safetensors_as(m, path, "f32", err);
}

int pr_model_save_safetensors_as(const pr_model *m, const char *path, const char *dtype, pr_error *err)
{
    if (!m || !path)
        return pr_errorf(err, PR_ERR_INVALID, "save_safetensors: NULL model or path");
    int stored;
    if (!dtype || strcmp(dtype, "f32") == 0)
        stored = ST_F32;
    else if (strcmp(dtype, "f16") == 0)
        stored = ST_F16;
    else if (strcmp(dtype, "bf16") == 0)
        stored = ST_BF16;
    else
        return pr_errorf(err, PR_ERR_INVALID, "%s: unknown dtype '%s' (f32, f16 or bf16)", path, dtype);
    int nt = pr_model_n_tensors(m);
    st_entry *e = calloc((size_t)nt + 1, sizeof *e);
    if (!e)
        return pr_errorf(err, PR_ERR_NOMEM, "%s: out of memory", path);
    float **conv = calloc((size_t)nt + 1, sizeof *conv);   /* f32 copies of tensors stored in bf16 */
    if (!conv) {
        free(e);
        return pr_errorf(err, PR_ERR_NOMEM, "%s: out of memory", path);
    }
    int rc = PR_OK, n = 0;
    for (int i = 0; i < nt; i++) {
        const pr_tensor_info *t = pr_model_tensor(m, i);
        /* module parameters are saved with their module, not the base model */
        if (t->kind == PR_TENSOR_MODULE)
            continue;
        const float *data = t->data;
        if (!data && pr_model_tensor_is_bf16(m, t)) {
            if (!(conv[i] = malloc((size_t)t->numel * sizeof(float)))) {
                rc = pr_errorf(err, PR_ERR_NOMEM, "%s: out of memory converting tensor '%s' from bf16", path, t->name);
                break;
            }
            if ((rc = pr_model_tensor_f32(m, t, conv[i], err)))
                break;
            data = conv[i];
        }
        if (!data) {
            rc = pr_errorf(err, PR_ERR_INVALID, "%s: tensor '%s' has no data", path, t->name);
            break;
        }
        e[n].name = t->name;
        e[n].ndim = t->ndim;
        for (int d = 0; d < t->ndim && d < ST_MAX_DIMS; d++)
            e[n].shape[d] = t->shape[d];
        e[n].data = data;
        e[n].dtype = stored;
        n++;
    }
    static const st_kv meta[] = {{"format", "pt"}};
    if (rc == PR_OK)
        rc = st_write(path, e, n, meta, 1, err);
    for (int i = 0; i < nt; i++)
        free(conv[i]);
    free(conv);
    free(e);
    return rc;
}
