/* peftref core: the model's lifetime, whatever its family.
 *
 * A model is a family (family.h) over a shared frame.  Memory is explicit
 * and planned once:
 *  - base tensors: one f32 block (or checkpoint mappings), Hugging Face
 *    names and layouts, so f32 checkpoints are used in place;
 *  - gradients of the trainable base tensors: one flat block, re-laid out
 *    only when trainability changes (grads.c); tensors added by modules
 *    keep the data and gradient memory their owner gave (tensors.c);
 *  - activations and their gradients: one block of named views, planned by
 *    pr_model_reserve (activations.c), and again when a hook at a stream
 *    site (hooks.c) or a concatenation provider (concat.c) appears.
 * Forward and backward (passes.c) never allocate. */
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "peftref/module.h"
#include "family.h"
#include "rng.h"

const family_ops *family_find(int family)
{
    switch (family) {
    case PR_FAMILY_GPT2: return &family_gpt2;
    case PR_FAMILY_LLAMA: return &family_llama;
    default: return NULL;
    }
}

int model_create_empty(const pr_model_config *cfg, pr_model **out, pr_error *err)
{
    if (!out)
        return pr_errorf(err, PR_ERR_INVALID, "model: NULL output pointer");
    *out = NULL;
    int rc = pr_config_validate(cfg, err);
    if (rc)
        return rc;
    const family_ops *ops = family_find(cfg->family);
    if (!ops)
        return pr_errorf(err, PR_ERR_UNSUPPORTED, "model: family %d has no implementation", cfg->family);
    pr_model *m = calloc(1, sizeof *m);
    if (!m)
        return pr_errorf(err, PR_ERR_NOMEM, "model: out of memory");
    m->cfg = *cfg;
    m->ops = ops;
    m->decode_pos = -1;
    int L = cfg->n_layers, nt = ops->count_tensors(cfg);
    m->tensors = calloc((size_t)nt, sizeof *m->tensors);
    m->names = calloc((size_t)nt, TENSOR_NAME_LEN);
    m->tab = calloc((size_t)nt, sizeof *m->tab);
    m->tab_cap = nt;
    m->lf = calloc((size_t)L, sizeof *m->lf);
    m->hooks = calloc((size_t)(L + 1) * PR_SITE_COUNT, sizeof *m->hooks);
    m->concat = calloc((size_t)(L + 1) * PR_SITE_COUNT, sizeof *m->concat);
    if (!m->tensors || !m->names || !m->tab || !m->lf || !m->hooks || !m->concat) {
        pr_model_free(m);
        return pr_errorf(err, PR_ERR_NOMEM, "model: out of memory for the tensor table");
    }
    if ((rc = ops->build(m, err))) {
        pr_model_free(m);
        return rc;
    }
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
    /* anonymous pages rather than malloc: precision bf16 gives the pages
     * of the tensors it converts back (precision.c) */
    void *p = mmap(NULL, n * sizeof(float), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
        return pr_errorf(err, PR_ERR_NOMEM, "model: out of memory for %zu parameters", n);
    m->storage = p;
    m->storage_floats = n;
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

/* Weights and embeddings normal(0, std) with the family's std per tensor
 * (GPT-2 scales its residual projections), biases 0, norm gains 1.  One
 * stream in table order, so a seed fixes the model. */
enum { INIT_CHUNK = 1 << 16 };

/* x[j] = std * rng_normal(rng) for j < n, the same values in the same
 * order: the two uniforms of each normal are drawn in sequence, and the
 * Box-Muller transform of a chunk (the cost, for a billion weights) runs
 * across threads.  u holds 2 * INIT_CHUNK floats, or is NULL (serial). */
static void fill_normal(float *x, size_t n, float std, pr_rng *rng, float *u)
{
    if (!u) {
        for (size_t j = 0; j < n; j++)
            x[j] = std * rng_normal(rng);
        return;
    }
    for (size_t off = 0; off < n; off += INIT_CHUNK) {
        size_t len = n - off < INIT_CHUNK ? n - off : INIT_CHUNK;
        for (size_t j = 0; j < 2 * len; j++)
            u[j] = rng_uniform(rng);
        float *y = x + off;
#pragma omp parallel for schedule(static) if (len >= 4096)
        for (size_t j = 0; j < len; j++)
            y[j] = std * rng_box_muller(u[2 * j], u[2 * j + 1]);
    }
}

void model_init_random(pr_model *m)
{
    pr_rng rng;
    rng_seed(&rng, m->cfg.seed);
    float *u = malloc(2 * INIT_CHUNK * sizeof(float)); /* NULL: the serial path, same values */
    for (int i = 0; i < m->n_base; i++) {
        pr_tensor_info *t = &m->tensors[i];
        size_t n = (size_t)t->numel;
        switch (t->kind) {
        case PR_TENSOR_EMBEDDING:
        case PR_TENSOR_WEIGHT:
            fill_normal(t->data, n, m->ops->init_std(m, t), &rng, u);
            break;
        case PR_TENSOR_NORM_GAIN:
            for (size_t j = 0; j < n; j++)
                t->data[j] = 1.0f;
            break;
        default:
            memset(t->data, 0, n * sizeof(float));
            break;
        }
    }
    free(u);
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

void pr_model_free(pr_model *m)
{
    if (!m)
        return;
    /* modules attached to m (core/module/module.c) go with it */
    pr_model_detach_modules(m);
    pr_model_decode_end(m);
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
    free(m->logits_own);
    free(m->grads);
    if (m->storage)
        munmap(m->storage, m->storage_floats * sizeof(float));
    model_lowp_free(m);
    if (m->ops && m->ops->destroy)
        m->ops->destroy(m);
    free(m->lf);
    model_free_added_tensors(m);
    free(m->tab);
    free(m->names);
    free(m->tensors);
    free(m);
}

const pr_model_config *pr_model_get_config(const pr_model *m)
{
    return m ? &m->cfg : NULL;
}

/* Train/eval is a flag the hooks read; the base model has no dropout. */
void pr_model_set_training(pr_model *m, int training)
{
    if (m)
        m->training = training ? 1 : 0;
}

int pr_model_get_training(const pr_model *m)
{
    return m ? m->training : 0;
}

model_modules *model_modules_of(const pr_model *m)
{
    return m ? (model_modules *)&m->modules : NULL;
}

const pr_tensor_info *model_token_embedding(const pr_model *m)
{
    return m ? m->wte : NULL;
}
