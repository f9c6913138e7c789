/* peftref core: the GPT-2 family model, its forward and backward passes,
 * and the site hooks through which PEFT modules attach.
 *
 * Memory is explicit and planned once:
 *  - base tensors: one f32 block (or checkpoint mappings), Hugging Face
 *    names and layouts, so f32 checkpoints are used in place;
 *  - gradients of the trainable base tensors: one flat block, re-laid out
 *    only when trainability changes; tensors added by modules keep the
 *    data and gradient memory their owner gave;
 *  - activations and their gradients: one block of named views, planned by
 *    pr_model_reserve (and again when a hook at a stream site or a
 *    concatenation provider appears).
 * Forward and backward never allocate.
 *
 * Shapes: B batch, T time, N = B*T rows, C = d_model, Q = H*hd (query
 * width), KV = Hkv*hd (key/value width), QKV = Q + 2*KV, F = d_ff,
 * V = vocab.  Weights are GPT-2 Conv1D [in, out]; the tied head reads
 * wte (V,C) as nn.Linear [out, in].
 *
 * Virtual positions (prompt tuning, Lester et al. 2021): with nv vectors
 * prepended at the embedding site every sequence runs on T = nv + Tr
 * positions, Tr of them real tokens.  Inside the blocks T is that internal
 * length; tokens, targets, logits and the loss cover the Nr = B*Tr real
 * rows only, gathered from the final norm's output.  Prefix keys/values
 * (prefix tuning, Li & Liang 2021) add P columns to a layer's attention:
 * att is (B,H,T,P+T). */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "peftref/model.h"
#include "peftref/module.h"
#include "model_internal.h"
#include "kernels.h"
#include "rng.h"

#define TENSOR_NAME_LEN 64
#define ALIGN_FLOATS 16   /* 64-byte aligned views */

typedef struct layer_params {
    pr_tensor_info *ln1w, *ln1b;
    pr_tensor_info *qkvw, *qkvb;           /* attn.c_attn  (C, QKV), (QKV) */
    pr_tensor_info *attprojw, *attprojb;   /* attn.c_proj  (Q, C), (C) */
    pr_tensor_info *ln2w, *ln2b;
    pr_tensor_info *fcw, *fcb;             /* mlp.c_fc     (C, F), (F) */
    pr_tensor_info *fcprojw, *fcprojb;     /* mlp.c_proj   (F, C), (C) */
} layer_params;

/* Saved activations of one block.  The stream-site buffers (katt, vatt,
 * aout, act, fout, bout) exist only where hooks are attached; without
 * hooks the state leaving the site is the state entering it. */
typedef struct layer_acts {
    float *ln1, *ln1_mean, *ln1_rstd;  /* (N,C), (N), (N) */
    float *qkv;                        /* (N,QKV) after qkv/q/k/v hooks */
    float *katt, *vatt;                /* (N,KV) attn.k / attn.v outputs */
    float *pk, *pv;                    /* (Hkv,P,hd) prefix keys/values, only with P > 0 */
    float *att;                        /* (B,H,T,P+T) softmax probabilities */
    float *atty;                       /* (N,Q) attention output */
    float *attproj;                    /* (N,C) c_proj output after o hooks */
    float *aout;                       /* (N,C) attn_out output */
    float *resid2;                     /* (N,C) residual after attention */
    float *ln2, *ln2_mean, *ln2_rstd;  /* (N,C), (N), (N) */
    float *fch;                        /* (N,F) c_fc output after ffn.up hooks */
    float *fch_gelu;                   /* (N,F) */
    float *act;                        /* (N,F) ffn.act output */
    float *fcproj;                     /* (N,C) c_proj output after ffn.down hooks */
    float *fout;                       /* (N,C) ffn_out output */
    float *resid3;                     /* (N,C) residual after the FFN */
    float *bout;                       /* (N,C) block_out output */
} layer_acts;

typedef struct hook_list {
    pr_site_hook *h;
    int n, cap;
} hook_list;

/* Concatenation providers of one site instance, in attach order. */
typedef struct concat_list {
    pr_concat_provider *p;
    int n, cap;
    int total;                   /* positions they prepend together */
} concat_list;

typedef struct mapping {
    void *addr;
    size_t len;
} mapping;

struct pr_model {
    pr_model_config cfg;

    int n_base;                  /* base tensors, first in the table */
    pr_tensor_info *tensors;     /* (n_base) */
    char *names;                 /* n_base * TENSOR_NAME_LEN */
    pr_tensor_info **tab;        /* (n_tensors) the table: base, then added ones */
    int n_tensors, tab_cap;
    float *storage;              /* owned block for tensors not set elsewhere */
    mapping *maps;
    int n_maps;
    pr_tensor_info *wte, *wpe, *lnfw, *lnfb;
    pr_tensor_info *head;        /* wte when tied, else lm_head.weight (V,C) */
    layer_params *lp;            /* (L) */

    float *grads;                /* flat gradients of trainable tensors */
    size_t n_grads;

    hook_list *hooks;            /* (L+1) * PR_SITE_COUNT; slot 0.. is layer -1 */
    concat_list *concat;         /* same slots; used at embed, attn.k, attn.v */
    int training;                /* handed to hooks as pr_site_io.training */
    model_modules modules;       /* attached modules (core/module/ fills the list) */

    /* activations, planned for up to resB sequences of resT real tokens
     * and resTi internal positions (resTi >= resT + virtual positions) */
    int resB, resT, resTi;
    float *act_block;
    int *tok_block;              /* tokens and targets (resB*resT each) */
    float *vrows, *dvrows;       /* (nv,C) virtual vectors, their batch-summed gradient */
    float *prow;                 /* (Pmax,KV) prefix rows as providers write/read them */
    float *dpk, *dpv;            /* (Hkv,Pmax,hd) prefix gradients of one layer */
    float *encoded, *embed_y;    /* (N,C) */
    layer_acts *la;              /* (L) */
    float *lnf, *lnf_mean, *lnf_rstd;
    float *hid, *dhid;           /* (Nr,C) real rows of lnf and their gradient, only with nv > 0 */
    int hidden_only;       /* last forward stopped at the final norm */
    float *logits, *probs;       /* (Nr,V) */
    float *losses;               /* (Nr) */
    /* backward scratch */
    float *dres, *dtmp;          /* (N,C) residual-stream gradient, ping-pong */
    float *dstream;              /* (N,C) dy of attn_out / ffn_out hooks */
    float *dln;                  /* (N,C) gradient of a norm output */
    float *dqkv;                 /* (N,QKV) */
    float *dkatt, *dvatt;        /* (N,KV), only with attn.k / attn.v hooks */
    float *datty;                /* (N,Q) */
    float *dattproj, *dfcproj;   /* (N,C) */
    float *dffa, *dffb;          /* (N,F) */
    float *dlogits;              /* (Nr,V) */
    float *att_scratch;          /* (T,Pmax+T) */

    /* the last forward: T internal positions = nv virtual + Tr real */
    int B, T, Tr, nv;
    int have_fwd, have_targets;
    int64_t scored;
    int *tokens, *targets;
};

/* ---- tensor table ------------------------------------------------------ */

static pr_tensor_info *add_tensor(pr_model *m, int kind, int layer, int ndim,
                                  int64_t s0, int64_t s1, const char *name)
{
    int i = m->n_base++;
    pr_tensor_info *t = &m->tensors[i];
    m->tab[m->n_tensors++] = t;
    char *dst = m->names + (size_t)i * TENSOR_NAME_LEN;
    memcpy(dst, name, strlen(name) + 1);
    t->name = dst;
    t->ndim = ndim;
    t->shape[0] = s0;
    t->shape[1] = ndim > 1 ? s1 : 0;
    t->numel = ndim > 1 ? s0 * s1 : s0;
    t->kind = kind;
    t->layer = layer;
    return t;
}

static pr_tensor_info *add_layer_tensor(pr_model *m, int kind, int l, int ndim, int64_t s0,
                                        int64_t s1, const char *suffix)
{
    char name[TENSOR_NAME_LEN];
    snprintf(name, sizeof name, "h.%d.%s", l, suffix);
    return add_tensor(m, kind, l, ndim, s0, s1, name);
}

static void build_tensor_table(pr_model *m)
{
    const pr_model_config *c = &m->cfg;
    int64_t C = c->d_model, F = c->d_ff, V = c->vocab_size;
    int64_t Q = (int64_t)c->n_heads * c->d_head, KV = (int64_t)c->n_kv_heads * c->d_head;
    int64_t QKV = Q + 2 * KV;
    int b = c->bias;

    m->wte = add_tensor(m, PR_TENSOR_EMBEDDING, -1, 2, V, C, "wte.weight");
    m->wpe = add_tensor(m, PR_TENSOR_EMBEDDING, -1, 2, c->max_seq, C, "wpe.weight");
    for (int l = 0; l < c->n_layers; l++) {
        layer_params *p = &m->lp[l];
        p->ln1w = add_layer_tensor(m, PR_TENSOR_NORM_GAIN, l, 1, C, 0, "ln_1.weight");
        if (b) p->ln1b = add_layer_tensor(m, PR_TENSOR_NORM_BIAS, l, 1, C, 0, "ln_1.bias");
        p->qkvw = add_layer_tensor(m, PR_TENSOR_WEIGHT, l, 2, C, QKV, "attn.c_attn.weight");
        if (b) p->qkvb = add_layer_tensor(m, PR_TENSOR_BIAS, l, 1, QKV, 0, "attn.c_attn.bias");
        p->attprojw = add_layer_tensor(m, PR_TENSOR_WEIGHT, l, 2, Q, C, "attn.c_proj.weight");
        if (b) p->attprojb = add_layer_tensor(m, PR_TENSOR_BIAS, l, 1, C, 0, "attn.c_proj.bias");
        p->ln2w = add_layer_tensor(m, PR_TENSOR_NORM_GAIN, l, 1, C, 0, "ln_2.weight");
        if (b) p->ln2b = add_layer_tensor(m, PR_TENSOR_NORM_BIAS, l, 1, C, 0, "ln_2.bias");
        p->fcw = add_layer_tensor(m, PR_TENSOR_WEIGHT, l, 2, C, F, "mlp.c_fc.weight");
        if (b) p->fcb = add_layer_tensor(m, PR_TENSOR_BIAS, l, 1, F, 0, "mlp.c_fc.bias");
        p->fcprojw = add_layer_tensor(m, PR_TENSOR_WEIGHT, l, 2, F, C, "mlp.c_proj.weight");
        if (b) p->fcprojb = add_layer_tensor(m, PR_TENSOR_BIAS, l, 1, C, 0, "mlp.c_proj.bias");
    }
    m->lnfw = add_tensor(m, PR_TENSOR_NORM_GAIN, -1, 1, C, 0, "ln_f.weight");
    if (b) m->lnfb = add_tensor(m, PR_TENSOR_NORM_BIAS, -1, 1, C, 0, "ln_f.bias");
    m->head = c->tied_head ? m->wte : add_tensor(m, PR_TENSOR_WEIGHT, -1, 2, V, C, "lm_head.weight");
}

static int count_tensors(const pr_model_config *c)
{
    int per_layer = c->bias ? 12 : 6;
    return 2 + c->n_layers * per_layer + (c->bias ? 2 : 1) + (c->tied_head ? 0 : 1);
}

int model_create_empty(const pr_model_config *cfg, pr_model **out, pr_error *err)
{
    if (!out)
        return pr_errorf(err, PR_ERR_INVALID, "model: NULL output pointer");
    *out = NULL;
    int rc = pr_config_validate(cfg, err);
    if (rc)
        return rc;
    pr_model *m = calloc(1, sizeof *m);
    if (!m)
        return pr_errorf(err, PR_ERR_NOMEM, "model: out of memory");
    m->cfg = *cfg;
    int L = cfg->n_layers, nt = count_tensors(cfg);
    m->tensors = calloc((size_t)nt, sizeof *m->tensors);
    m->names = calloc((size_t)nt, TENSOR_NAME_LEN);
    m->tab = calloc((size_t)nt, sizeof *m->tab);
    m->tab_cap = nt;
    m->lp = calloc((size_t)L, sizeof *m->lp);
    m->la = calloc((size_t)L, sizeof *m->la);
    m->hooks = calloc((size_t)(L + 1) * PR_SITE_COUNT, sizeof *m->hooks);
    m->concat = calloc((size_t)(L + 1) * PR_SITE_COUNT, sizeof *m->concat);
    if (!m->tensors || !m->names || !m->tab || !m->lp || !m->la || !m->hooks || !m->concat) {
        pr_model_free(m);
        return pr_errorf(err, PR_ERR_NOMEM, "model: out of memory for the tensor table");
    }
    build_tensor_table(m);
    *out = m;
    return PR_OK;
}

int model_alloc_storage(pr_model *m, pr_error *err)
{
    size_t n = 0;
    for (int i = 0; i < m->n_base; i++)
        if (!m->tensors[i].data)
            n += (size_t)m->tensors[i].numel;
    if (n == 0)
        return PR_OK;
    if (m->storage)
        return pr_errorf(err, PR_ERR_INVALID, "model: base storage is already allocated");
    void *p = NULL;
    if (posix_memalign(&p, 64, n * sizeof(float)) != 0)
        return pr_errorf(err, PR_ERR_NOMEM, "model: out of memory for %zu parameters", n);
    m->storage = p;
    size_t off = 0;
    for (int i = 0; i < m->n_base; i++) {
        pr_tensor_info *t = &m->tensors[i];
        if (!t->data) {
            t->data = m->storage + off;
            off += (size_t)t->numel;
        }
    }
    return PR_OK;
}

void model_set_tensor_data(pr_model *m, int i, float *data)
{
    if (m && i >= 0 && i < m->n_base)
        m->tensors[i].data = data;
}

int model_adopt_mapping(pr_model *m, void *addr, size_t len, pr_error *err)
{
    mapping *nm = realloc(m->maps, (size_t)(m->n_maps + 1) * sizeof *nm);
    if (!nm)
        return pr_errorf(err, PR_ERR_NOMEM, "model: out of memory recording a mapping");
    m->maps = nm;
    m->maps[m->n_maps].addr = addr;
    m->maps[m->n_maps].len = len;
    m->n_maps++;
    return PR_OK;
}

static int is_residual_projection(const pr_model *m, const pr_tensor_info *t)
{
    if (t->layer < 0)
        return 0;
    const layer_params *p = &m->lp[t->layer];
    return t == p->attprojw || t == p->fcprojw;
}

/* GPT-2 init (Radford et al. 2019, sec. 2.3): weights normal(0, std),
 * projections into the residual stream scaled by 1/sqrt(2L) because L
 * blocks each add two of them; biases 0, norm gains 1.  One stream in
 * table order, so a seed fixes the model. */
void model_init_random(pr_model *m)
{
    pr_rng rng;
    rng_seed(&rng, m->cfg.seed);
    float std = m->cfg.init_std;
    float std_res = std / sqrtf(2.0f * (float)m->cfg.n_layers);
    for (int i = 0; i < m->n_base; i++) {
        pr_tensor_info *t = &m->tensors[i];
        size_t n = (size_t)t->numel;
        switch (t->kind) {
        case PR_TENSOR_EMBEDDING:
        case PR_TENSOR_WEIGHT: {
            float s = is_residual_projection(m, t) ? std_res : std;
            for (size_t j = 0; j < n; j++)
                t->data[j] = s * rng_normal(&rng);
            break;
        }
        case PR_TENSOR_NORM_GAIN:
            for (size_t j = 0; j < n; j++)
                t->data[j] = 1.0f;
            break;
        default:
            memset(t->data, 0, n * sizeof(float));
            break;
        }
    }
}

int pr_model_create(const pr_model_config *cfg, pr_model **out, pr_error *err)
{
    pr_model *m = NULL;
    int rc = model_create_empty(cfg, &m, err);
    if (rc)
        return rc;
    rc = model_alloc_storage(m, err);
    if (rc) {
        pr_model_free(m);
        return rc;
    }
    model_init_random(m);
    *out = m;
    return PR_OK;
}

static void free_added_tensor(pr_tensor_info *t)
{
    free((char *)t->name);
    free(t);
}

void pr_model_free(pr_model *m)
{
    if (!m)
        return;
    /* modules attached to m (core/module/module.c) go with it */
    pr_model_detach_modules(m);
    for (int i = 0; i < m->n_maps; i++)
        munmap(m->maps[i].addr, m->maps[i].len);
    free(m->maps);
    int slots = (m->cfg.n_layers + 1) * PR_SITE_COUNT;
    for (int i = 0; m->hooks && i < slots; i++)
        free(m->hooks[i].h);
    for (int i = 0; m->concat && i < slots; i++)
        free(m->concat[i].p);
    free(m->hooks);
    free(m->concat);
    free(m->act_block);
    free(m->tok_block);
    free(m->grads);
    free(m->storage);
    free(m->la);
    free(m->lp);
    for (int i = m->n_base; m->tab && i < m->n_tensors; i++)
        free_added_tensor(m->tab[i]);
    free(m->tab);
    free(m->names);
    free(m->tensors);
    free(m);
}

model_modules *model_modules_of(const pr_model *m)
{
    return m ? (model_modules *)&m->modules : NULL;
}

const pr_model_config *pr_model_get_config(const pr_model *m)
{
    return m ? &m->cfg : NULL;
}

int pr_model_n_tensors(const pr_model *m)
{
    return m ? m->n_tensors : 0;
}

const pr_tensor_info *pr_model_tensor(const pr_model *m, int i)
{
    if (!m || i < 0 || i >= m->n_tensors)
        return NULL;
    return m->tab[i];
}

static pr_tensor_info *find_exact(const pr_model *m, const char *name)
{
    for (int i = 0; i < m->n_tensors; i++)
        if (strcmp(m->tab[i]->name, name) == 0)
            return m->tab[i];
    return NULL;
}

/* Exact name, or a base name with Hugging Face's "transformer." prefix. */
static pr_tensor_info *find_tensor(const pr_model *m, const char *name)
{
    static const char prefix[] = "transformer.";
    if (!m || !name)
        return NULL;
    pr_tensor_info *t = find_exact(m, name);
    if (!t && strncmp(name, prefix, sizeof prefix - 1) == 0)
        t = find_exact(m, name + sizeof prefix - 1);
    return t;
}

const pr_tensor_info *pr_model_find_tensor(const pr_model *m, const char *name)
{
    return find_tensor(m, name);
}

/* Every distinct tensor once: an added tensor that views the same memory
 * as an earlier one (a parameter shared across sites registered under two
 * names) is not counted again. */
int64_t pr_model_param_count(const pr_model *m)
{
    int64_t n = 0;
    for (int i = 0; m && i < m->n_tensors; i++) {
        const pr_tensor_info *t = m->tab[i];
        int seen = 0;
        for (int j = 0; i >= m->n_base && j < i && !seen; j++)
            seen = m->tab[j]->data == t->data && m->tab[j]->numel == t->numel;
        if (!seen)
            n += t->numel;
    }
    return n;
}

int pr_model_add_tensor(pr_model *m, const char *name, int ndim, const int64_t *shape, float *data,
                        float *grad, pr_error *err)
{
    if (!m || !name || !shape || !data)
        return pr_errorf(err, PR_ERR_INVALID, "add_tensor: NULL model, name, shape or data");
    if (!name[0])
        return pr_errorf(err, PR_ERR_INVALID, "add_tensor: empty tensor name");
    if (ndim < 1 || ndim > 4)
        return pr_errorf(err, PR_ERR_INVALID, "add_tensor '%s': ndim must be 1..4 (got %d)", name, ndim);
    int64_t numel = 1;
    for (int d = 0; d < ndim; d++) {
        if (shape[d] <= 0)
            return pr_errorf(err, PR_ERR_INVALID, "add_tensor '%s': dimension %d must be positive (got %lld)",
                             name, d, (long long)shape[d]);
        if (numel > INT64_MAX / shape[d])
            return pr_errorf(err, PR_ERR_INVALID, "add_tensor '%s': too many elements", name);
        numel *= shape[d];
    }
    if (find_tensor(m, name))
        return pr_errorf(err, PR_ERR_INVALID, "add_tensor: the model already has a tensor named '%s'", name);
    if (m->n_tensors == m->tab_cap) {
        int cap = 2 * m->tab_cap;
        pr_tensor_info **nt = realloc(m->tab, (size_t)cap * sizeof *nt);
        if (!nt)
            return pr_errorf(err, PR_ERR_NOMEM, "add_tensor '%s': out of memory", name);
        m->tab = nt;
        m->tab_cap = cap;
    }
    pr_tensor_info *t = calloc(1, sizeof *t);
    char *nm = strdup(name);
    if (!t || !nm) {
        free(t);
        free(nm);
        return pr_errorf(err, PR_ERR_NOMEM, "add_tensor '%s': out of memory", name);
    }
    t->name = nm;
    t->ndim = ndim;
    for (int d = 0; d < ndim; d++)
        t->shape[d] = shape[d];
    t->numel = numel;
    t->data = data;
    t->grad = grad;
    t->trainable = grad != NULL;
    t->kind = PR_TENSOR_MODULE;
    t->layer = -1;
    m->tab[m->n_tensors++] = t;
    return PR_OK;
}

void pr_model_remove_tensors(pr_model *m, const char *prefix)
{
    if (!m || !prefix)
        return;
    size_t len = strlen(prefix);
    int keep = m->n_base;
    for (int i = m->n_base; i < m->n_tensors; i++) {
        pr_tensor_info *t = m->tab[i];
        if (strncmp(t->name, prefix, len) == 0)
            free_added_tensor(t);
        else
            m->tab[keep++] = t;
    }
    m->n_tensors = keep;
}

/* ---- trainable tensors and their gradients ----------------------------- */

/* One flat block for every trainable base tensor's gradient, in table
 * order, so an optimizer or an all-reduce is one loop.  Values
 * accumulated so far survive the re-layout.  Added tensors keep the
 * gradient memory their owner gave. */
static int relayout_grads(pr_model *m, pr_error *err)
{
    size_t n = 0;
    for (int i = 0; i < m->n_base; i++)
        if (m->tensors[i].trainable)
            n += (size_t)m->tensors[i].numel;
    float *g = NULL;
    if (n > 0) {
        g = calloc(n, sizeof(float));
        if (!g)
            return pr_errorf(err, PR_ERR_NOMEM, "model: out of memory for %zu gradients", n);
    }
    size_t off = 0;
    for (int i = 0; i < m->n_base; i++) {
        pr_tensor_info *t = &m->tensors[i];
        if (t->trainable) {
            if (t->grad)
                memcpy(g + off, t->grad, (size_t)t->numel * sizeof(float));
            t->grad = g + off;
            off += (size_t)t->numel;
        } else {
            t->grad = NULL;
        }
    }
    free(m->grads);
    m->grads = g;
    m->n_grads = n;
    return PR_OK;
}

/* "*" means every tensor that can train: all base tensors and the added
 * tensors that came with a gradient. */
int pr_model_set_trainable(pr_model *m, const char *name, int on, pr_error *err)
{
    if (!m || !name)
        return pr_errorf(err, PR_ERR_INVALID, "set_trainable: NULL model or name");
    on = on ? 1 : 0;
    if (strcmp(name, "*") == 0) {
        for (int i = 0; i < m->n_tensors; i++)
            if (m->tab[i]->kind != PR_TENSOR_MODULE || m->tab[i]->grad)
                m->tab[i]->trainable = on;
        return relayout_grads(m, err);
    }
    pr_tensor_info *t = find_tensor(m, name);
    if (!t)
        return pr_errorf(err, PR_ERR_NOTFOUND, "set_trainable: no tensor named '%s'", name);
    if (t->kind == PR_TENSOR_MODULE) {
        if (on && !t->grad)
            return pr_errorf(err, PR_ERR_INVALID,
                             "set_trainable: tensor '%s' was added without gradient memory; it cannot train", name);
        t->trainable = on;
        return PR_OK;
    }
    if (t->trainable == on)
        return PR_OK;
    t->trainable = on;
    return relayout_grads(m, err);
}

void pr_model_zero_grad(pr_model *m)
{
    if (!m)
        return;
    if (m->grads)
        memset(m->grads, 0, m->n_grads * sizeof(float));
    for (int i = m->n_base; i < m->n_tensors; i++)
        if (m->tab[i]->grad)
            memset(m->tab[i]->grad, 0, (size_t)m->tab[i]->numel * sizeof(float));
}

/* ---- hooks --------------------------------------------------------------- */

static hook_list *site_hooks(const pr_model *m, int site, int layer)
{
    return &m->hooks[(size_t)(layer + 1) * PR_SITE_COUNT + (size_t)site];
}

static concat_list *site_concat(const pr_model *m, int site, int layer)
{
    return &m->concat[(size_t)(layer + 1) * PR_SITE_COUNT + (size_t)site];
}

int pr_model_virtual_positions(const pr_model *m)
{
    return m ? site_concat(m, PR_SITE_EMBED, -1)->total : 0;
}

/* Prefix columns layer l's attention must hold room for (its k and v
 * providers must agree; forward checks). */
static int prefix_room(const pr_model *m, int l)
{
    int nk = site_concat(m, PR_SITE_ATTN_K, l)->total, nv = site_concat(m, PR_SITE_ATTN_V, l)->total;
    return nk > nv ? nk : nv;
}

static int max_prefix_room(const pr_model *m)
{
    int p = 0;
    for (int l = 0; l < m->cfg.n_layers; l++)
        if (prefix_room(m, l) > p)
            p = prefix_room(m, l);
    return p;
}

void pr_model_set_training(pr_model *m, int training)
{
    if (m)
        m->training = training ? 1 : 0;
}

int pr_model_get_training(const pr_model *m)
{
    return m ? m->training : 0;
}

static int has_hooks(const pr_model *m, int site, int layer)
{
    return site_hooks(m, site, layer)->n > 0;
}

static int any_layer_has_hooks(const pr_model *m, int site)
{
    for (int l = 0; l < m->cfg.n_layers; l++)
        if (has_hooks(m, site, l))
            return 1;
    return 0;
}

int pr_model_site_dims(const pr_model *m, int site, int *d_in, int *d_out)
{
    int din = -1, dout = -1;
    if (m) {
        const pr_model_config *c = &m->cfg;
        int C = c->d_model, F = c->d_ff;
        int Q = c->n_heads * c->d_head, KV = c->n_kv_heads * c->d_head;
        switch (site) {
        case PR_SITE_EMBED: din = dout = C; break;
        case PR_SITE_QKV:
            if (c->fused_qkv) { din = C; dout = Q + 2 * KV; }
            break;
        case PR_SITE_Q: din = C; dout = Q; break;
        case PR_SITE_K:
        case PR_SITE_V: din = C; dout = KV; break;
        case PR_SITE_O: din = Q; dout = C; break;
        case PR_SITE_ATTN_K:
        case PR_SITE_ATTN_V: din = dout = KV; break;
        case PR_SITE_ATTN_OUT: din = dout = C; break;
        case PR_SITE_FFN_UP: din = C; dout = F; break;
        case PR_SITE_FFN_GATE:
            if (c->act == PR_ACT_SWIGLU) { din = C; dout = F; }
            break;
        case PR_SITE_FFN_ACT: din = dout = F; break;
        case PR_SITE_FFN_DOWN: din = F; dout = C; break;
        case PR_SITE_FFN_OUT:
        case PR_SITE_BLOCK_OUT: din = dout = C; break;
        default: break;
        }
    }
    if (d_in) *d_in = din;
    if (d_out) *d_out = dout;
    return din < 0 ? -1 : 0;
}

static int plan_activations(pr_model *m, int B, int Tr, int Ti, pr_error *err);

/* Prefix a callback's message with what failed and where. */
static int site_failed(int rc, const char *what, int site, int layer, pr_error *err)
{
    if (rc == PR_OK)
        rc = PR_ERR_INVALID;
    if (err) {
        char inner[PR_ERROR_MSG_MAX];
        memcpy(inner, err->msg, sizeof inner);
        inner[sizeof inner - 1] = '\0';
        pr_errorf(err, rc, "%s at site '%s' layer %d: %s", what, pr_site_name(site), layer, inner);
    }
    return rc;
}

/* The site exists in this model and layer fits it. */
static int check_site_layer(const pr_model *m, int site, int layer, const char *fn, pr_error *err)
{
    if (site < 0 || site >= PR_SITE_COUNT)
        return pr_errorf(err, PR_ERR_INVALID, "%s: site %d out of range", fn, site);
    if (pr_model_site_dims(m, site, NULL, NULL) != 0)
        return pr_errorf(err, PR_ERR_UNSUPPORTED, "%s: site '%s' does not exist in %s models", fn,
                         pr_site_name(site), m->cfg.family == PR_FAMILY_GPT2 ? "GPT-2" : "this family's");
    if (pr_site_is_per_layer(site)) {
        if (layer < 0 || layer >= m->cfg.n_layers)
            return pr_errorf(err, PR_ERR_INVALID, "%s: layer %d out of range [0, %d) for site '%s'", fn,
                             layer, m->cfg.n_layers, pr_site_name(site));
    } else if (layer != -1) {
        return pr_errorf(err, PR_ERR_INVALID, "%s: site '%s' is model-level; layer must be -1 (got %d)", fn,
                         pr_site_name(site), layer);
    }
    return PR_OK;
}

/* A hook plans for the planned capacity: resB sequences of resTi
 * internal positions (virtual ones included). */
static int reserve_hook(const pr_model *m, const pr_site_hook *h, int site, int layer, pr_error *err)
{
    if (!h->reserve)
        return PR_OK;
    if (err) err->msg[0] = '\0';
    int rc = h->reserve(h->self, m->resB, m->resTi, err);
    return rc ? site_failed(rc, "hook reserve", site, layer, err) : PR_OK;
}

static int reserve_all_hooks(const pr_model *m, pr_error *err)
{
    for (int layer = -1; layer < m->cfg.n_layers; layer++)
        for (int site = 0; site < PR_SITE_COUNT; site++) {
            const hook_list *hl = site_hooks(m, site, layer);
            for (int i = 0; i < hl->n; i++) {
                int rc = reserve_hook(m, &hl->h[i], site, layer, err);
                if (rc)
                    return rc;
            }
        }
    return PR_OK;
}

int pr_model_attach_hook(pr_model *m, int site, int layer, const pr_site_hook *hook, pr_error *err)
{
    if (!m || !hook || !hook->forward)
        return pr_errorf(err, PR_ERR_INVALID, "attach_hook: NULL model, hook or hook forward");
    int rc = check_site_layer(m, site, layer, "attach_hook", err);
    if (rc)
        return rc;
    hook_list *hl = site_hooks(m, site, layer);
    if (hl->n == hl->cap) {
        int cap = hl->cap ? 2 * hl->cap : 4;
        pr_site_hook *nh = realloc(hl->h, (size_t)cap * sizeof *nh);
        if (!nh)
            return pr_errorf(err, PR_ERR_NOMEM, "attach_hook: out of memory");
        hl->h = nh;
        hl->cap = cap;
    }
    hl->h[hl->n++] = *hook;
    m->have_fwd = 0;
    if (!m->act_block)
        return PR_OK;
    /* the first hook at a stream site needs its own output buffer */
    if (hl->n == 1 && !pr_site_is_projection(site))
        rc = plan_activations(m, m->resB, m->resT, m->resTi, err);
    if (!rc)
        rc = reserve_hook(m, hook, site, layer, err);
    if (rc)
        hl->n--;
    return rc;
}

int pr_model_attach_concat(pr_model *m, int site, int layer, const pr_concat_provider *p, pr_error *err)
{
    if (!m || !p || !p->forward)
        return pr_errorf(err, PR_ERR_INVALID, "attach_concat: NULL model, provider or provider forward");
    if (site != PR_SITE_EMBED && site != PR_SITE_ATTN_K && site != PR_SITE_ATTN_V)
        return pr_errorf(err, PR_ERR_UNSUPPORTED,
                         "attach_concat: site '%s' takes no concatenation (only embed, attn.k and attn.v)",
                         pr_site_name(site));
    int rc = check_site_layer(m, site, layer, "attach_concat", err);
    if (rc)
        return rc;
    if (p->n <= 0)
        return pr_errorf(err, PR_ERR_INVALID, "attach_concat: a provider at site '%s' must prepend n > 0 "
                         "positions (got %d)", pr_site_name(site), p->n);
    concat_list *cl = site_concat(m, site, layer);
    int nv = pr_model_virtual_positions(m) + (site == PR_SITE_EMBED ? p->n : 0);
    if (site == PR_SITE_EMBED) {
        if (nv >= m->cfg.max_seq)
            return pr_errorf(err, PR_ERR_INVALID, "attach_concat: %d virtual positions leave no room for "
                             "tokens in max_seq=%d", nv, m->cfg.max_seq);
        if (m->act_block && m->resT + nv > m->cfg.max_seq)
            return pr_errorf(err, PR_ERR_INVALID, "attach_concat: %d virtual positions plus the reserved "
                             "T=%d exceed max_seq=%d", nv, m->resT, m->cfg.max_seq);
    }
    if (cl->n == cl->cap) {
        int cap = cl->cap ? 2 * cl->cap : 4;
        pr_concat_provider *np = realloc(cl->p, (size_t)cap * sizeof *np);
        if (!np)
            return pr_errorf(err, PR_ERR_NOMEM, "attach_concat: out of memory");
        cl->p = np;
        cl->cap = cap;
    }
    cl->p[cl->n++] = *p;
    cl->total += p->n;
    m->have_fwd = 0;
    if (!m->act_block)
        return PR_OK;
    /* more positions, or more prefix columns: plan again; virtual
     * positions change what the hooks see, so they plan again too */
    int Ti = site == PR_SITE_EMBED ? m->resT + nv : m->resTi;
    rc = plan_activations(m, m->resB, m->resT, Ti, err);
    if (!rc && site == PR_SITE_EMBED)
        rc = reserve_all_hooks(m, err);
    if (rc) {
        cl->n--;
        cl->total -= p->n;
    }
    return rc;
}

void pr_model_detach_hooks(pr_model *m)
{
    if (!m)
        return;
    for (int i = 0; i < (m->cfg.n_layers + 1) * PR_SITE_COUNT; i++) {
        m->hooks[i].n = 0;
        m->concat[i].n = 0;
        m->concat[i].total = 0;
    }
    m->have_fwd = 0;
}

/* [d_in, d_out] views of the Conv1D weights; q, k and v are column slices
 * of the fused c_attn weight [C, Q + 2KV] at offsets 0, Q, Q + KV.  The
 * stream sites attn.k and attn.v fold into the k and v slices (the
 * projection their values come from) and ffn.act into the whole
 * mlp.c_proj weight [F, C] (the projection its values go to), without a
 * bias: a per-channel rescaling of those values is a rescaling of the
 * slice's columns and bias, or of c_proj's rows. */
int pr_model_site_weight(pr_model *m, int site, int layer, float **w, int *ld, float **b, pr_error *err)
{
    if (!m || !w || !ld)
        return pr_errorf(err, PR_ERR_INVALID, "site_weight: NULL model or output");
    int rc = check_site_layer(m, site, layer, "site_weight", err);
    if (rc)
        return rc;
    if (!pr_site_is_projection(site) && site != PR_SITE_ATTN_K && site != PR_SITE_ATTN_V &&
        site != PR_SITE_FFN_ACT)
        return pr_errorf(err, PR_ERR_INVALID, "site_weight: site '%s' is a stream site; it has no weight",
                         pr_site_name(site));
    const pr_model_config *c = &m->cfg;
    const layer_params *p = &m->lp[layer];
    int C = c->d_model, F = c->d_ff, Q = c->n_heads * c->d_head, KV = c->n_kv_heads * c->d_head;
    pr_tensor_info *wt = NULL, *bt = NULL;
    int off = 0, stride = 0;
    switch (site) {
    case PR_SITE_QKV: wt = p->qkvw; bt = p->qkvb; stride = Q + 2 * KV; break;
    case PR_SITE_Q: wt = p->qkvw; bt = p->qkvb; stride = Q + 2 * KV; break;
    case PR_SITE_K: wt = p->qkvw; bt = p->qkvb; stride = Q + 2 * KV; off = Q; break;
    case PR_SITE_V: wt = p->qkvw; bt = p->qkvb; stride = Q + 2 * KV; off = Q + KV; break;
    case PR_SITE_O: wt = p->attprojw; bt = p->attprojb; stride = C; break;
    case PR_SITE_FFN_UP: wt = p->fcw; bt = p->fcb; stride = F; break;
    case PR_SITE_FFN_DOWN: wt = p->fcprojw; bt = p->fcprojb; stride = C; break;
    case PR_SITE_ATTN_K: wt = p->qkvw; bt = p->qkvb; stride = Q + 2 * KV; off = Q; break;
    case PR_SITE_ATTN_V: wt = p->qkvw; bt = p->qkvb; stride = Q + 2 * KV; off = Q + KV; break;
    case PR_SITE_FFN_ACT: wt = p->fcprojw; stride = C; break;
    default:
        return pr_errorf(err, PR_ERR_UNSUPPORTED, "site_weight: site '%s' has no weight in GPT-2 models",
                         pr_site_name(site));
    }
    if (!wt->data)
        return pr_errorf(err, PR_ERR_INVALID, "site_weight: tensor '%s' has no data", wt->name);
    *w = wt->data + off;
    *ld = stride;
    if (b)
        *b = bt && bt->data ? bt->data + off : NULL;
    return PR_OK;
}

/* ---- activation memory --------------------------------------------------- */

typedef struct bump {
    float *base;   /* NULL while sizing */
    size_t off;
} bump;

static float *take(bump *b, size_t n)
{
    float *p = b->base ? b->base + b->off : NULL;
    b->off += (n + ALIGN_FLOATS - 1) / ALIGN_FLOATS * ALIGN_FLOATS;
    return p;
}

static float *take_if(bump *b, int cond, size_t n)
{
    return cond ? take(b, n) : NULL;
}

/* Lay out every view for B sequences of Tr real tokens and Ti internal
 * positions.  Run once with base NULL to size the block and once to
 * assign the views. */
static void layout_activations(pr_model *m, bump *b, int B, int Tr, int Ti)
{
    const pr_model_config *c = &m->cfg;
    size_t N = (size_t)B * (size_t)Ti, Nr = (size_t)B * (size_t)Tr, T = (size_t)Ti;
    size_t C = (size_t)c->d_model, F = (size_t)c->d_ff;
    size_t V = (size_t)c->vocab_size, H = (size_t)c->n_heads, Hkv = (size_t)c->n_kv_heads;
    size_t hd = (size_t)c->d_head, Q = H * hd, KV = Hkv * hd, QKV = Q + 2 * KV;
    size_t nv = (size_t)pr_model_virtual_positions(m), Pmax = (size_t)max_prefix_room(m);

    m->vrows = take_if(b, nv > 0, nv * C);
    m->encoded = take(b, N * C);
    m->embed_y = take_if(b, has_hooks(m, PR_SITE_EMBED, -1), N * C);
    for (int l = 0; l < c->n_layers; l++) {
        layer_acts *a = &m->la[l];
        size_t P = (size_t)prefix_room(m, l);
        a->ln1 = take(b, N * C);
        a->ln1_mean = take(b, N);
        a->ln1_rstd = take(b, N);
        a->qkv = take(b, N * QKV);
        a->katt = take_if(b, has_hooks(m, PR_SITE_ATTN_K, l), N * KV);
        a->vatt = take_if(b, has_hooks(m, PR_SITE_ATTN_V, l), N * KV);
        a->pk = take_if(b, P > 0, Hkv * P * hd);
        a->pv = take_if(b, P > 0, Hkv * P * hd);
        a->att = take(b, (size_t)B * H * T * (P + T));
        a->atty = take(b, N * Q);
        a->attproj = take(b, N * C);
        a->aout = take_if(b, has_hooks(m, PR_SITE_ATTN_OUT, l), N * C);
        a->resid2 = take(b, N * C);
        a->ln2 = take(b, N * C);
        a->ln2_mean = take(b, N);
        a->ln2_rstd = take(b, N);
        a->fch = take(b, N * F);
        a->fch_gelu = take(b, N * F);
        a->act = take_if(b, has_hooks(m, PR_SITE_FFN_ACT, l), N * F);
        a->fcproj = take(b, N * C);
        a->fout = take_if(b, has_hooks(m, PR_SITE_FFN_OUT, l), N * C);
        a->resid3 = take(b, N * C);
        a->bout = take_if(b, has_hooks(m, PR_SITE_BLOCK_OUT, l), N * C);
    }
    m->lnf = take(b, N * C);
    m->lnf_mean = take(b, N);
    m->lnf_rstd = take(b, N);
    m->hid = take_if(b, nv > 0, Nr * C);
    m->logits = take(b, Nr * V);
    m->probs = take(b, Nr * V);
    m->losses = take(b, Nr);

    m->dvrows = take_if(b, nv > 0, nv * C);
    m->prow = take_if(b, Pmax > 0, Pmax * KV);
    m->dpk = take_if(b, Pmax > 0, Hkv * Pmax * hd);
    m->dpv = take_if(b, Pmax > 0, Hkv * Pmax * hd);
    m->dhid = take_if(b, nv > 0, Nr * C);
    m->dres = take(b, N * C);
    m->dtmp = take(b, N * C);
    m->dstream = take(b, N * C);
    m->dln = take(b, N * C);
    m->dqkv = take(b, N * QKV);
    m->dkatt = take_if(b, any_layer_has_hooks(m, PR_SITE_ATTN_K), N * KV);
    m->dvatt = take_if(b, any_layer_has_hooks(m, PR_SITE_ATTN_V), N * KV);
    m->datty = take(b, N * Q);
    m->dattproj = take(b, N * C);
    m->dfcproj = take(b, N * C);
    m->dffa = take(b, N * F);
    m->dffb = take(b, N * F);
    m->dlogits = take(b, Nr * V);
    m->att_scratch = take(b, T * (Pmax + T));
}

static int plan_activations(pr_model *m, int B, int Tr, int Ti, pr_error *err)
{
    bump sizing = { NULL, 0 };
    layout_activations(m, &sizing, B, Tr, Ti);
    size_t bytes = sizing.off * sizeof(float);
    void *block = NULL;
    if (posix_memalign(&block, 64, bytes) != 0)
        return pr_errorf(err, PR_ERR_NOMEM, "reserve: out of memory for %zu bytes of activations (B=%d, T=%d)",
                         bytes, B, Ti);
    int *toks = malloc(2 * (size_t)B * (size_t)Tr * sizeof(int));
    if (!toks) {
        free(block);
        return pr_errorf(err, PR_ERR_NOMEM, "reserve: out of memory for token buffers");
    }
    memset(block, 0, bytes);
    free(m->act_block);
    free(m->tok_block);
    m->act_block = block;
    m->tok_block = toks;
    m->tokens = toks;
    m->targets = toks + (size_t)B * (size_t)Tr;
    bump assign = { m->act_block, 0 };
    layout_activations(m, &assign, B, Tr, Ti);
    m->resB = B;
    m->resT = Tr;
    m->resTi = Ti;
    m->have_fwd = 0;
    return PR_OK;
}

/* T counts real tokens; the plan adds the virtual positions. */
int pr_model_reserve(pr_model *m, int B, int T, pr_error *err)
{
    if (!m)
        return pr_errorf(err, PR_ERR_INVALID, "reserve: NULL model");
    if (B <= 0 || T <= 0)
        return pr_errorf(err, PR_ERR_INVALID, "reserve: B and T must be positive (got B=%d, T=%d)", B, T);
    int nv = pr_model_virtual_positions(m);
    if (T + nv > m->cfg.max_seq) {
        if (nv)
            return pr_errorf(err, PR_ERR_INVALID, "reserve: T=%d plus %d virtual positions exceeds the model's "
                             "max_seq=%d", T, nv, m->cfg.max_seq);
        return pr_errorf(err, PR_ERR_INVALID, "reserve: T=%d exceeds the model's max_seq=%d", T, m->cfg.max_seq);
    }
    /* the kernels count rows N = B*T in an int */
    if ((int64_t)B * (T + nv) > INT32_MAX)
        return pr_errorf(err, PR_ERR_INVALID, "reserve: batch B=%d x T=%d has more than 2^31 rows", B, T + nv);
    if (!m->act_block || B > m->resB || T > m->resT || T + nv > m->resTi) {
        if (m->act_block) {
            if (B < m->resB) B = m->resB;
            if (T < m->resT) T = m->resT;
        }
        int rc = plan_activations(m, B, T, T + nv, err);
        if (rc)
            return rc;
    }
    return reserve_all_hooks(m, err);
}

/* ---- small row helpers --------------------------------------------------- */

/* dst (rows, cols; stride ldd) = src (rows, cols; stride lds) */
static void copy_rows(float *dst, int ldd, const float *src, int lds, int rows, int cols)
{
    for (int r = 0; r < rows; r++)
        memcpy(dst + (size_t)r * ldd, src + (size_t)r * lds, (size_t)cols * sizeof(float));
}

/* dst (rows, cols; stride ldd) += src (rows, cols; stride lds) */
static void add_rows(float *dst, int ldd, const float *src, int lds, int rows, int cols)
{
    for (int r = 0; r < rows; r++) {
        float *d = dst + (size_t)r * ldd;
        const float *s = src + (size_t)r * lds;
        for (int j = 0; j < cols; j++)
            d[j] += s[j];
    }
}

static float *grad_of(const pr_tensor_info *t)
{
    return t ? t->grad : NULL;
}

static const float *data_of(const pr_tensor_info *t)
{
    return t ? t->data : NULL;
}

/* ---- running hooks ------------------------------------------------------- */

static pr_site_io site_io(const pr_model *m, int site, int layer, const float *x, int x_dim, int x_ld,
                          float *y, int y_dim, int y_ld, float *dx, float *dy)
{
    pr_site_io io;
    io.site = site;
    io.layer = layer;
    io.B = m->B;
    io.T = m->T;
    io.rows = m->B * m->T;
    io.x = x;
    io.x_dim = x_dim;
    io.x_ld = x_ld;
    io.y = y;
    io.y_dim = y_dim;
    io.y_ld = y_ld;
    io.dx = dx;
    io.dy = dy;
    io.training = m->training;
    return io;
}

static int hooks_forward(const pr_model *m, const pr_site_io *io, pr_error *err)
{
    const hook_list *hl = site_hooks(m, io->site, io->layer);
    for (int i = 0; i < hl->n; i++) {
        if (err) err->msg[0] = '\0';
        int rc = hl->h[i].forward(hl->h[i].self, io, err);
        if (rc)
            return site_failed(rc, "hook forward", io->site, io->layer, err);
    }
    return PR_OK;
}

static int hooks_backward(const pr_model *m, const pr_site_io *io, pr_error *err)
{
    const hook_list *hl = site_hooks(m, io->site, io->layer);
    for (int i = hl->n - 1; i >= 0; i--) {
        if (err) err->msg[0] = '\0';
        if (!hl->h[i].backward) {
            pr_errorf(err, PR_ERR_UNSUPPORTED, "the hook has no backward");
            return site_failed(PR_ERR_UNSUPPORTED, "hook backward", io->site, io->layer, err);
        }
        int rc = hl->h[i].backward(hl->h[i].self, io, err);
        if (rc)
            return site_failed(rc, "hook backward", io->site, io->layer, err);
    }
    return PR_OK;
}

/* Projection site: y (rows, y_dim; y_ld) was just computed from x. */
static int proj_forward(pr_model *m, int site, int layer, const float *x, int x_dim,
                        float *y, int y_dim, int y_ld, pr_error *err)
{
    if (!has_hooks(m, site, layer))
        return PR_OK;
    pr_site_io io = site_io(m, site, layer, x, x_dim, x_dim, y, y_dim, y_ld, NULL, NULL);
    return hooks_forward(m, &io, err);
}

static int proj_backward(pr_model *m, int site, int layer, const float *x, int x_dim, float *dx,
                         float *y, int y_dim, int y_ld, float *dy, pr_error *err)
{
    if (!has_hooks(m, site, layer))
        return PR_OK;
    pr_site_io io = site_io(m, site, layer, x, x_dim, x_dim, y, y_dim, y_ld, dx, dy);
    return hooks_backward(m, &io, err);
}

/* Stream site.  Without hooks the state passes through (*out = x).  With
 * hooks, ybuf (rows, dim) receives a copy of x that the hooks change, so x
 * keeps the values that entered the site. */
static int stream_forward(pr_model *m, int site, int layer, const float *x, int x_ld, float *ybuf,
                          int dim, const float **out, int *out_ld, pr_error *err)
{
    *out = x;
    if (out_ld) *out_ld = x_ld;
    if (!has_hooks(m, site, layer))
        return PR_OK;
    if (!ybuf)
        return pr_errorf(err, PR_ERR_INVALID, "forward: no buffer planned for site '%s' layer %d",
                         pr_site_name(site), layer);
    int rows = m->B * m->T;
    copy_rows(ybuf, dim, x, x_ld, rows, dim);
    pr_site_io io = site_io(m, site, layer, x, dim, x_ld, ybuf, dim, dim, NULL, NULL);
    int rc = hooks_forward(m, &io, err);
    *out = ybuf;
    if (out_ld) *out_ld = dim;
    return rc;
}

/* Stream site backward: dy (rows, dim) is the gradient of the state
 * leaving, dx (rows, dim; x_ld) that of the state entering.  After the
 * hooks, the identity path y0 = x adds what remains in dy to dx. */
static int stream_backward(pr_model *m, int site, int layer, const float *x, int x_ld, float *dx,
                           float *y, float *dy, int dim, pr_error *err)
{
    pr_site_io io = site_io(m, site, layer, x, dim, x_ld, y, dim, dim, dx, dy);
    int rc = hooks_backward(m, &io, err);
    if (rc)
        return rc;
    add_rows(dx, x_ld, dy, dim, m->B * m->T, dim);
    return PR_OK;
}

/* Sub-layer site (attn_out, ffn_out; peftref/site.h): y0 (rows, dim) is
 * the sub-layer's output before the residual add and x (rows, dim) the
 * sub-layer's input, the normalised state entering attention or the FFN.
 * Without hooks *out = y0.  With hooks, ybuf receives a copy of y0 that
 * the hooks change, and they see x as the site input. */
static int sublayer_forward(pr_model *m, int site, int layer, const float *x, const float *y0, float *ybuf,
                            int dim, const float **out, pr_error *err)
{
    *out = y0;
    if (!has_hooks(m, site, layer))
        return PR_OK;
    if (!ybuf)
        return pr_errorf(err, PR_ERR_INVALID, "forward: no buffer planned for site '%s' layer %d",
                         pr_site_name(site), layer);
    copy_rows(ybuf, dim, y0, dim, m->B * m->T, dim);
    pr_site_io io = site_io(m, site, layer, x, dim, dim, ybuf, dim, dim, NULL, NULL);
    int rc = hooks_forward(m, &io, err);
    *out = ybuf;
    return rc;
}

/* Sub-layer site backward: dy (rows, dim) is the gradient of the output
 * leaving the site (the hooks may change it); dx (rows, dim) accumulates
 * the gradient of the sub-layer input x; dy0 (rows, dim) receives what
 * remains in dy, the gradient of y0 through the identity path. */
static int sublayer_backward(pr_model *m, int site, int layer, const float *x, float *dx, float *y, float *dy,
                             float *dy0, int dim, pr_error *err)
{
    pr_site_io io = site_io(m, site, layer, x, dim, dim, y, dim, dim, dx, dy);
    int rc = hooks_backward(m, &io, err);
    if (rc)
        return rc;
    copy_rows(dy0, dim, dy, dim, m->B * m->T, dim);
    return PR_OK;
}

/* ---- concatenation providers ---------------------------------------------- */

/* out (total, width): each provider fills its n rows, in attach order. */
static int concat_forward(const pr_model *m, int site, int layer, float *out, int width, pr_error *err)
{
    const concat_list *cl = site_concat(m, site, layer);
    size_t off = 0;
    for (int i = 0; i < cl->n; i++) {
        if (err) err->msg[0] = '\0';
        int rc = cl->p[i].forward(cl->p[i].self, site, layer, out + off * (size_t)width, err);
        if (rc)
            return site_failed(rc, "concat provider forward", site, layer, err);
        off += (size_t)cl->p[i].n;
    }
    return PR_OK;
}

/* dout (total, width), summed over the batch; reverse attach order.  A
 * provider without backward has nothing to train. */
static int concat_backward(const pr_model *m, int site, int layer, const float *dout, int width, pr_error *err)
{
    const concat_list *cl = site_concat(m, site, layer);
    size_t off = (size_t)cl->total;
    for (int i = cl->n - 1; i >= 0; i--) {
        off -= (size_t)cl->p[i].n;
        if (!cl->p[i].backward)
            continue;
        if (err) err->msg[0] = '\0';
        int rc = cl->p[i].backward(cl->p[i].self, site, layer, dout + off * (size_t)width, err);
        if (rc)
            return site_failed(rc, "concat provider backward", site, layer, err);
    }
    return PR_OK;
}

/* rows (P, Hkv*hd) -> heads (Hkv, P, hd), the attention kernel's prefix layout */
static void rows_to_heads(float *heads, const float *rows, int P, int Hkv, int hd)
{
    for (int p = 0; p < P; p++)
        for (int g = 0; g < Hkv; g++)
            memcpy(heads + ((size_t)g * P + p) * hd, rows + ((size_t)p * Hkv + g) * hd, (size_t)hd * sizeof(float));
}

/* heads (Hkv, P, hd) -> rows (P, Hkv*hd) */
static void heads_to_rows(float *rows, const float *heads, int P, int Hkv, int hd)
{
    for (int p = 0; p < P; p++)
        for (int g = 0; g < Hkv; g++)
            memcpy(rows + ((size_t)p * Hkv + g) * hd, heads + ((size_t)g * P + p) * hd, (size_t)hd * sizeof(float));
}

/* Prefix keys and values of layer l into a->pk, a->pv; returns P. */
static int prefix_forward(pr_model *m, int l, int *P, pr_error *err)
{
    const pr_model_config *c = &m->cfg;
    layer_acts *a = &m->la[l];
    int Hkv = c->n_kv_heads, hd = c->d_head, KV = Hkv * hd;
    int n = site_concat(m, PR_SITE_ATTN_K, l)->total, rc;
    *P = n;
    if (n == 0)
        return PR_OK;
    if ((rc = concat_forward(m, PR_SITE_ATTN_K, l, m->prow, KV, err)))
        return rc;
    rows_to_heads(a->pk, m->prow, n, Hkv, hd);
    if ((rc = concat_forward(m, PR_SITE_ATTN_V, l, m->prow, KV, err)))
        return rc;
    rows_to_heads(a->pv, m->prow, n, Hkv, hd);
    return PR_OK;
}

/* m->dpk, m->dpv (Hkv,P,hd) hold the prefix gradients of layer l. */
static int prefix_backward(pr_model *m, int l, int P, pr_error *err)
{
    const pr_model_config *c = &m->cfg;
    int Hkv = c->n_kv_heads, hd = c->d_head, KV = Hkv * hd, rc;
    heads_to_rows(m->prow, m->dpv, P, Hkv, hd);
    if ((rc = concat_backward(m, PR_SITE_ATTN_V, l, m->prow, KV, err)))
        return rc;
    heads_to_rows(m->prow, m->dpk, P, Hkv, hd);
    return concat_backward(m, PR_SITE_ATTN_K, l, m->prow, KV, err);
}

/* Embeddings of T = nv + Tr positions per sequence, out (B,T,C): virtual
 * position p is the providers' vector p plus wpe[p], real token t is
 * wte[token] + wpe[nv + t] (the order Hugging Face PEFT uses for GPT-2). */
static int embed_forward(pr_model *m, pr_error *err)
{
    const pr_model_config *c = &m->cfg;
    int B = m->B, T = m->T, Tr = m->Tr, nv = m->nv, C = c->d_model;
    const float *wpe = data_of(m->wpe);
    if (nv == 0) {
        encoder_forward(m->encoded, m->tokens, m->wte->data, wpe, B, T, C);
        return PR_OK;
    }
    int rc = concat_forward(m, PR_SITE_EMBED, -1, m->vrows, C, err);
    if (rc)
        return rc;
    for (int b = 0; b < B; b++) {
        float *out = m->encoded + (size_t)b * T * C;
        for (size_t i = 0; i < (size_t)nv * C; i++)
            out[i] = m->vrows[i] + (wpe ? wpe[i] : 0.0f);
        encoder_forward(out + (size_t)nv * C, m->tokens + (size_t)b * Tr, m->wte->data,
                        wpe ? wpe + (size_t)nv * C : NULL, 1, Tr, C);
    }
    return PR_OK;
}

/* dx (B,T,C) is the gradient of the embeddings. */
static int embed_backward(pr_model *m, const float *dx, pr_error *err)
{
    const pr_model_config *c = &m->cfg;
    int B = m->B, T = m->T, Tr = m->Tr, nv = m->nv, C = c->d_model;
    float *dwte = grad_of(m->wte), *dwpe = grad_of(m->wpe);
    if (nv == 0) {
        if (dwte || dwpe)
            encoder_backward(dwte, dwpe, dx, m->tokens, B, T, C);
        return PR_OK;
    }
    size_t nC = (size_t)nv * C;
    memset(m->dvrows, 0, nC * sizeof(float));
    for (int b = 0; b < B; b++)
        add_rows(m->dvrows, C, dx + (size_t)b * T * C, C, nv, C);
    if (dwpe)
        add_rows(dwpe, C, m->dvrows, C, nv, C);
    if (dwte || dwpe)
        for (int b = 0; b < B; b++)
            encoder_backward(dwte, dwpe ? dwpe + nC : NULL, dx + (size_t)b * T * C + nC,
                             m->tokens + (size_t)b * Tr, 1, Tr, C);
    return concat_backward(m, PR_SITE_EMBED, -1, m->dvrows, C, err);
}

/* internal rows (B, nv+Tr, C) -> real rows (B, Tr, C) */
static void gather_real_rows(float *dst, const float *src, int B, int nv, int Tr, int C)
{
    for (int b = 0; b < B; b++)
        memcpy(dst + (size_t)b * Tr * C, src + ((size_t)b * (nv + Tr) + nv) * C, (size_t)Tr * C * sizeof(float));
}

/* real rows (B, Tr, C) -> internal rows (B, nv+Tr, C), virtual rows zero */
static void scatter_real_rows(float *dst, const float *src, int B, int nv, int Tr, int C)
{
    for (int b = 0; b < B; b++) {
        float *d = dst + (size_t)b * (nv + Tr) * C;
        memset(d, 0, (size_t)nv * C * sizeof(float));
        memcpy(d + (size_t)nv * C, src + (size_t)b * Tr * C, (size_t)Tr * C * sizeof(float));
    }
}

/* ---- forward ------------------------------------------------------------- */

static const float *embed_output(const pr_model *m)
{
    return has_hooks(m, PR_SITE_EMBED, -1) ? m->embed_y : m->encoded;
}

static const float *layer_output(const pr_model *m, int l)
{
    const layer_acts *a = &m->la[l];
    return has_hooks(m, PR_SITE_BLOCK_OUT, l) ? a->bout : a->resid3;
}

static const float *layer_input(const pr_model *m, int l)
{
    return l == 0 ? embed_output(m) : layer_output(m, l - 1);
}

/* Final norm output at the real positions, (B,Tr,C). */
static const float *real_hidden(const pr_model *m)
{
    return m->nv ? m->hid : m->lnf;
}

static int check_batch(pr_model *m, const pr_batch *bt, pr_error *err)
{
    const pr_model_config *c = &m->cfg;
    if (!bt || !bt->tokens)
        return pr_errorf(err, PR_ERR_INVALID, "forward: NULL batch or tokens");
    if (bt->B <= 0 || bt->T <= 0)
        return pr_errorf(err, PR_ERR_INVALID, "forward: B and T must be positive (got B=%d, T=%d)", bt->B, bt->T);
    int nv = pr_model_virtual_positions(m);
    if (bt->T + nv > c->max_seq) {
        if (nv)
            return pr_errorf(err, PR_ERR_INVALID, "forward: T=%d plus %d virtual positions exceeds the model's "
                             "max_seq=%d", bt->T, nv, c->max_seq);
        return pr_errorf(err, PR_ERR_INVALID, "forward: T=%d exceeds the model's max_seq=%d", bt->T, c->max_seq);
    }
    if (!m->act_block)
        return pr_errorf(err, PR_ERR_INVALID, "forward: no activation memory; call pr_model_reserve first");
    if (bt->B > m->resB || bt->T > m->resT || bt->T + nv > m->resTi)
        return pr_errorf(err, PR_ERR_INVALID, "forward: batch B=%d x T=%d exceeds the reservation B=%d x T=%d",
                         bt->B, bt->T, m->resB, m->resT);
    for (int i = 0; i < m->n_base; i++)
        if (!m->tensors[i].data)
            return pr_errorf(err, PR_ERR_INVALID, "forward: tensor '%s' has no data", m->tensors[i].name);
    for (int l = 0; l < c->n_layers; l++) {
        int nk = site_concat(m, PR_SITE_ATTN_K, l)->total, nvl = site_concat(m, PR_SITE_ATTN_V, l)->total;
        if (nk != nvl)
            return pr_errorf(err, PR_ERR_INVALID, "forward: layer %d prepends %d prefix keys (attn.k) but %d prefix "
                             "values (attn.v); its key and value providers must agree", l, nk, nvl);
    }
    for (int b = 0; b < bt->B; b++)
        for (int t = 0; t < bt->T; t++) {
            int id = bt->tokens[(size_t)b * bt->T + t];
            if (id < 0 || id >= c->vocab_size)
                return pr_errorf(err, PR_ERR_INVALID,
                                 "forward: token id %d at batch %d position %d is outside the vocabulary [0, %d)",
                                 id, b, t, c->vocab_size);
            if (bt->targets && bt->targets[(size_t)b * bt->T + t] >= c->vocab_size)
                return pr_errorf(err, PR_ERR_INVALID,
                                 "forward: target id %d at batch %d position %d is outside the vocabulary [0, %d)",
                                 bt->targets[(size_t)b * bt->T + t], b, t, c->vocab_size);
        }
    return PR_OK;
}

static int block_forward(pr_model *m, int l, const float *x, pr_error *err)
{
    const pr_model_config *c = &m->cfg;
    const layer_params *p = &m->lp[l];
    layer_acts *a = &m->la[l];
    int B = m->B, T = m->T, N = B * T, C = c->d_model, F = c->d_ff;
    int H = c->n_heads, Hkv = c->n_kv_heads, hd = c->d_head;
    int Q = H * hd, KV = Hkv * hd, QKV = Q + 2 * KV;
    float eps = c->norm_eps;
    int rc;

    /* attention: x -> ln1 -> qkv -> attention -> c_proj */
    layernorm_forward(a->ln1, a->ln1_mean, a->ln1_rstd, x, p->ln1w->data, data_of(p->ln1b), N, C, eps);
    matmul_forward(a->qkv, QKV, a->ln1, C, p->qkvw->data, 1, data_of(p->qkvb), N, C, QKV);
    if ((rc = proj_forward(m, PR_SITE_QKV, l, a->ln1, C, a->qkv, QKV, QKV, err)) ||
        (rc = proj_forward(m, PR_SITE_Q, l, a->ln1, C, a->qkv, Q, QKV, err)) ||
        (rc = proj_forward(m, PR_SITE_K, l, a->ln1, C, a->qkv + Q, KV, QKV, err)) ||
        (rc = proj_forward(m, PR_SITE_V, l, a->ln1, C, a->qkv + Q + KV, KV, QKV, err)))
        return rc;
    const float *k, *v;
    int ldk, ldv;
    int P;
    if ((rc = stream_forward(m, PR_SITE_ATTN_K, l, a->qkv + Q, QKV, a->katt, KV, &k, &ldk, err)) ||
        (rc = stream_forward(m, PR_SITE_ATTN_V, l, a->qkv + Q + KV, QKV, a->vatt, KV, &v, &ldv, err)) ||
        (rc = prefix_forward(m, l, &P, err)))
        return rc;
    attention_forward(a->atty, a->att, a->qkv, QKV, k, ldk, v, ldv, a->pk, a->pv, P, B, T, H, Hkv, hd);
    matmul_forward(a->attproj, C, a->atty, Q, p->attprojw->data, 1, data_of(p->attprojb), N, Q, C);
    if ((rc = proj_forward(m, PR_SITE_O, l, a->atty, Q, a->attproj, C, C, err)))
        return rc;
    const float *aout;
    if ((rc = sublayer_forward(m, PR_SITE_ATTN_OUT, l, a->ln1, a->attproj, a->aout, C, &aout, err)))
        return rc;
    residual_forward(a->resid2, x, aout, (size_t)N * C);

    /* FFN: resid2 -> ln2 -> c_fc -> GELU -> c_proj */
    layernorm_forward(a->ln2, a->ln2_mean, a->ln2_rstd, a->resid2, p->ln2w->data, data_of(p->ln2b), N, C, eps);
    matmul_forward(a->fch, F, a->ln2, C, p->fcw->data, 1, data_of(p->fcb), N, C, F);
    if ((rc = proj_forward(m, PR_SITE_FFN_UP, l, a->ln2, C, a->fch, F, F, err)))
        return rc;
    gelu_forward(a->fch_gelu, a->fch, (size_t)N * F);
    const float *act;
    if ((rc = stream_forward(m, PR_SITE_FFN_ACT, l, a->fch_gelu, F, a->act, F, &act, NULL, err)))
        return rc;
    matmul_forward(a->fcproj, C, act, F, p->fcprojw->data, 1, data_of(p->fcprojb), N, F, C);
    if ((rc = proj_forward(m, PR_SITE_FFN_DOWN, l, act, F, a->fcproj, C, C, err)))
        return rc;
    const float *fout;
    if ((rc = sublayer_forward(m, PR_SITE_FFN_OUT, l, a->ln2, a->fcproj, a->fout, C, &fout, err)))
        return rc;
    residual_forward(a->resid3, a->resid2, fout, (size_t)N * C);
    const float *bout;
    return stream_forward(m, PR_SITE_BLOCK_OUT, l, a->resid3, C, a->bout, C, &bout, NULL, err);
}

int pr_model_forward(pr_model *m, const pr_batch *batch, float *loss, pr_error *err)
{
    if (!m)
        return pr_errorf(err, PR_ERR_INVALID, "forward: NULL model");
    int rc = check_batch(m, batch, err);
    if (rc)
        return rc;
    const pr_model_config *c = &m->cfg;
    int B = batch->B, Tr = batch->T, nv = pr_model_virtual_positions(m), T = nv + Tr;
    int N = B * T, Nr = B * Tr, C = c->d_model, V = c->vocab_size;

    m->have_fwd = 0;
    m->B = B;
    m->T = T;
    m->Tr = Tr;
    m->nv = nv;
    m->have_targets = batch->targets != NULL;
    m->scored = 0;
    memcpy(m->tokens, batch->tokens, (size_t)Nr * sizeof(int));
    if (batch->targets)
        memcpy(m->targets, batch->targets, (size_t)Nr * sizeof(int));

    if ((rc = embed_forward(m, err)))
        return rc;
    const float *x;
    if ((rc = stream_forward(m, PR_SITE_EMBED, -1, m->encoded, C, m->embed_y, C, &x, NULL, err)))
        return rc;
    for (int l = 0; l < c->n_layers; l++) {
        if ((rc = block_forward(m, l, x, err)))
            return rc;
        x = layer_output(m, l);
    }
    layernorm_forward(m->lnf, m->lnf_mean, m->lnf_rstd, x, m->lnfw->data, data_of(m->lnfb), N, C, c->norm_eps);
    if (nv)
        gather_real_rows(m->hid, m->lnf, B, nv, Tr, C);
    m->hidden_only = batch->hidden_only;
    if (batch->hidden_only) {
        if (batch->targets)
            return pr_errorf(err, PR_ERR_INVALID, "forward: hidden_only takes no targets");
        if (loss)
            *loss = 0.0f;
        m->have_fwd = 1;
        return PR_OK;
    }
    matmul_forward(m->logits, V, real_hidden(m), C, m->head->data, 0, NULL, Nr, C, V);

    if (batch->targets) {
        m->scored = crossentropy_forward(m->losses, m->probs, m->logits, m->targets, Nr, V);
        double sum = 0.0;
        for (int i = 0; i < Nr; i++)
            sum += m->losses[i];
        if (loss)
            *loss = m->scored > 0 ? (float)(sum / (double)m->scored) : 0.0f;
    } else if (loss) {
        *loss = 0.0f;
    }
    m->have_fwd = 1;
    return PR_OK;
}

const float *pr_model_logits(const pr_model *m)
{
    return m && m->have_fwd && !m->hidden_only ? m->logits : NULL;
}

const float *pr_model_hidden(const pr_model *m)
{
    return m && m->have_fwd ? real_hidden(m) : NULL;
}

int64_t pr_model_scored_tokens(const pr_model *m)
{
    return m && m->have_fwd ? m->scored : 0;
}

/* ---- backward ------------------------------------------------------------ */

/* On entry m->dres holds dLoss/d(block l output); on return dLoss/d(block
 * l input).  Mirrors block_forward line by line. */
static int block_backward(pr_model *m, int l, pr_error *err)
{
    const pr_model_config *c = &m->cfg;
    const layer_params *p = &m->lp[l];
    layer_acts *a = &m->la[l];
    int B = m->B, T = m->T, N = B * T, C = c->d_model, F = c->d_ff;
    int H = c->n_heads, Hkv = c->n_kv_heads, hd = c->d_head;
    int Q = H * hd, KV = Hkv * hd, QKV = Q + 2 * KV;
    size_t NC = (size_t)N * C, NF = (size_t)N * F;
    const float *x = layer_input(m, l);
    int rc;

    /* block_out */
    if (has_hooks(m, PR_SITE_BLOCK_OUT, l)) {
        memset(m->dtmp, 0, NC * sizeof(float));
        if ((rc = stream_backward(m, PR_SITE_BLOCK_OUT, l, a->resid3, C, m->dtmp, a->bout, m->dres, C, err)))
            return rc;
        float *t = m->dres; m->dres = m->dtmp; m->dtmp = t;
    }
    /* resid3 = resid2 + fout: dres stays as d resid2's residual path */
    const float *act = has_hooks(m, PR_SITE_FFN_ACT, l) ? a->act : a->fch_gelu;
    /* dln gathers d ln2: from ffn_out's hooks (their input) and from ffn.up */
    memset(m->dln, 0, NC * sizeof(float));
    if (has_hooks(m, PR_SITE_FFN_OUT, l)) {
        memcpy(m->dstream, m->dres, NC * sizeof(float));
        if ((rc = sublayer_backward(m, PR_SITE_FFN_OUT, l, a->ln2, m->dln, a->fout, m->dstream, m->dfcproj, C, err)))
            return rc;
    } else {
        memcpy(m->dfcproj, m->dres, NC * sizeof(float));
    }
    /* ffn.down: fcproj = act . W + b */
    float *dact = m->dffa;
    memset(dact, 0, NF * sizeof(float));
    if ((rc = proj_backward(m, PR_SITE_FFN_DOWN, l, act, F, dact, a->fcproj, C, C, m->dfcproj, err)))
        return rc;
    matmul_backward(dact, F, grad_of(p->fcprojw), grad_of(p->fcprojb), m->dfcproj, C, act, F,
                    p->fcprojw->data, 1, N, F, C);
    /* ffn.act */
    float *dgelu_out = dact, *dfch = m->dffb;
    if (has_hooks(m, PR_SITE_FFN_ACT, l)) {
        memset(m->dffb, 0, NF * sizeof(float));
        if ((rc = stream_backward(m, PR_SITE_FFN_ACT, l, a->fch_gelu, F, m->dffb, a->act, dact, F, err)))
            return rc;
        dgelu_out = m->dffb;
        dfch = m->dffa;
    }
    memset(dfch, 0, NF * sizeof(float));
    gelu_backward(dfch, a->fch, dgelu_out, NF);
    /* ffn.up: fch = ln2 . W + b */
    if ((rc = proj_backward(m, PR_SITE_FFN_UP, l, a->ln2, C, m->dln, a->fch, F, F, dfch, err)))
        return rc;
    matmul_backward(m->dln, C, grad_of(p->fcw), grad_of(p->fcb), dfch, F, a->ln2, C, p->fcw->data, 1, N, C, F);
    layernorm_backward(m->dres, grad_of(p->ln2w), grad_of(p->ln2b), m->dln, a->resid2, p->ln2w->data,
                       a->ln2_mean, a->ln2_rstd, N, C);

    /* resid2 = x + aout; dln now gathers d ln1: from attn_out's hooks (their
     * input) and from q, k, v, qkv */
    memset(m->dln, 0, NC * sizeof(float));
    if (has_hooks(m, PR_SITE_ATTN_OUT, l)) {
        memcpy(m->dstream, m->dres, NC * sizeof(float));
        if ((rc = sublayer_backward(m, PR_SITE_ATTN_OUT, l, a->ln1, m->dln, a->aout, m->dstream, m->dattproj, C,
                                    err)))
            return rc;
    } else {
        memcpy(m->dattproj, m->dres, NC * sizeof(float));
    }
    /* o: attproj = atty . W + b */
    memset(m->datty, 0, (size_t)N * Q * sizeof(float));
    if ((rc = proj_backward(m, PR_SITE_O, l, a->atty, Q, m->datty, a->attproj, C, C, m->dattproj, err)))
        return rc;
    matmul_backward(m->datty, Q, grad_of(p->attprojw), grad_of(p->attprojb), m->dattproj, C, a->atty, Q,
                    p->attprojw->data, 1, N, Q, C);
    /* attention */
    int hk = has_hooks(m, PR_SITE_ATTN_K, l), hv = has_hooks(m, PR_SITE_ATTN_V, l);
    const float *k = hk ? a->katt : a->qkv + Q, *v = hv ? a->vatt : a->qkv + Q + KV;
    int ldk = hk ? KV : QKV, ldv = hv ? KV : QKV;
    float *dk = hk ? m->dkatt : m->dqkv + Q, *dv = hv ? m->dvatt : m->dqkv + Q + KV;
    int P = site_concat(m, PR_SITE_ATTN_K, l)->total;
    memset(m->dqkv, 0, (size_t)N * QKV * sizeof(float));
    if (hk) memset(m->dkatt, 0, (size_t)N * KV * sizeof(float));
    if (hv) memset(m->dvatt, 0, (size_t)N * KV * sizeof(float));
    if (P) {
        memset(m->dpk, 0, (size_t)P * KV * sizeof(float));
        memset(m->dpv, 0, (size_t)P * KV * sizeof(float));
    }
    attention_backward(m->dqkv, dk, dv, m->dpk, m->dpv, m->datty, a->att, a->qkv, QKV, k, ldk, v, ldv,
                       a->pk, a->pv, P, B, T, H, Hkv, hd, m->att_scratch);
    if (P && (rc = prefix_backward(m, l, P, err)))
        return rc;
    if (hv && (rc = stream_backward(m, PR_SITE_ATTN_V, l, a->qkv + Q + KV, QKV, m->dqkv + Q + KV,
                                    a->vatt, m->dvatt, KV, err)))
        return rc;
    if (hk && (rc = stream_backward(m, PR_SITE_ATTN_K, l, a->qkv + Q, QKV, m->dqkv + Q,
                                    a->katt, m->dkatt, KV, err)))
        return rc;
    /* q, k, v, qkv: qkv = ln1 . W + b */
    if ((rc = proj_backward(m, PR_SITE_V, l, a->ln1, C, m->dln, a->qkv + Q + KV, KV, QKV, m->dqkv + Q + KV, err)) ||
        (rc = proj_backward(m, PR_SITE_K, l, a->ln1, C, m->dln, a->qkv + Q, KV, QKV, m->dqkv + Q, err)) ||
        (rc = proj_backward(m, PR_SITE_Q, l, a->ln1, C, m->dln, a->qkv, Q, QKV, m->dqkv, err)) ||
        (rc = proj_backward(m, PR_SITE_QKV, l, a->ln1, C, m->dln, a->qkv, QKV, QKV, m->dqkv, err)))
        return rc;
    matmul_backward(m->dln, C, grad_of(p->qkvw), grad_of(p->qkvb), m->dqkv, QKV, a->ln1, C, p->qkvw->data, 1,
                    N, C, QKV);
    layernorm_backward(m->dres, grad_of(p->ln1w), grad_of(p->ln1b), m->dln, x, p->ln1w->data,
                       a->ln1_mean, a->ln1_rstd, N, C);
    return PR_OK;
}

static int backward_from_final_norm(pr_model *m, pr_error *err);

int pr_model_backward(pr_model *m, pr_error *err)
{
    if (!m)
        return pr_errorf(err, PR_ERR_INVALID, "backward: NULL model");
    if (!m->have_fwd)
        return pr_errorf(err, PR_ERR_INVALID, "backward: no forward pass to differentiate (or the model changed since)");
    if (!m->have_targets)
        return pr_errorf(err, PR_ERR_INVALID, "backward: the last forward had no targets");
    if (m->scored <= 0)
        return pr_errorf(err, PR_ERR_INVALID, "backward: the last forward scored no targets (all are -1)");
    const pr_model_config *c = &m->cfg;
    int Nr = m->B * m->Tr, C = c->d_model, V = c->vocab_size;

    /* loss = mean over scored rows -> logits -> ln_f at the real rows */
    memset(m->dlogits, 0, (size_t)Nr * V * sizeof(float));
    crossentropy_backward(m->dlogits, m->probs, m->targets, Nr, V, 1.0f / (float)m->scored);
    float *dh = m->nv ? m->dhid : m->dln;
    memset(dh, 0, (size_t)Nr * C * sizeof(float));
    matmul_backward(dh, C, grad_of(m->head), NULL, m->dlogits, V, real_hidden(m), C, m->head->data, 0, Nr, C, V);
    if (m->nv)
        scatter_real_rows(m->dln, dh, m->B, m->nv, m->Tr, C);
    return backward_from_final_norm(m, err);
}

int pr_model_backward_hidden(pr_model *m, const float *dhidden, pr_error *err)
{
    if (!m || !dhidden)
        return pr_errorf(err, PR_ERR_INVALID, "backward: NULL model or gradient");
    if (!m->have_fwd)
        return pr_errorf(err, PR_ERR_INVALID, "backward: no forward pass to differentiate (or the model changed since)");
    if (m->nv)
        scatter_real_rows(m->dln, dhidden, m->B, m->nv, m->Tr, m->cfg.d_model);
    else
        memcpy(m->dln, dhidden, (size_t)m->B * m->T * m->cfg.d_model * sizeof(float));
    return backward_from_final_norm(m, err);
}

/* m->dln holds dLoss/d(final norm output); propagate to every trainable
 * tensor and hook. */
static int backward_from_final_norm(pr_model *m, pr_error *err)
{
    const pr_model_config *c = &m->cfg;
    int B = m->B, T = m->T, N = B * T, C = c->d_model;
    size_t NC = (size_t)N * C;
    int rc;
    memset(m->dres, 0, NC * sizeof(float));
    layernorm_backward(m->dres, grad_of(m->lnfw), grad_of(m->lnfb), m->dln, layer_output(m, c->n_layers - 1),
                       m->lnfw->data, m->lnf_mean, m->lnf_rstd, N, C);

    for (int l = c->n_layers - 1; l >= 0; l--)
        if ((rc = block_backward(m, l, err)))
            return rc;

    if (has_hooks(m, PR_SITE_EMBED, -1)) {
        memset(m->dtmp, 0, NC * sizeof(float));
        if ((rc = stream_backward(m, PR_SITE_EMBED, -1, m->encoded, C, m->dtmp, m->embed_y, m->dres, C, err)))
            return rc;
        float *t = m->dres; m->dres = m->dtmp; m->dtmp = t;
    }
    return embed_backward(m, m->dres, err);
}
