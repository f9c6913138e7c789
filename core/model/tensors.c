/* peftref core: the model's tensor table.
 *
 * Base tensors (the family's, built once in checkpoint order) come first;
 * tensors added by modules and task heads follow, with the data and
 * gradient memory their owner gave.  Entries never move, so pointers
 * handed out stay valid until their tensor is removed. */
#include <stdint.h>
#include <stdlib.h>
#include <stdio.h>
#include <string.h>

#include "family.h"

pr_tensor_info *model_add_base_tensor(pr_model *m, int kind, int layer, int ndim, int64_t s0, int64_t s1,
                                      const char *name)
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

static void free_added_tensor(pr_tensor_info *t)
{
    free((char *)t->name);
    free(t);
}

void model_free_added_tensors(pr_model *m)
{
    for (int i = m->n_base; m->tab && i < m->n_tensors; i++)
        free_added_tensor(m->tab[i]);
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
pr_tensor_info *model_find_tensor(const pr_model *m, const char *name)
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
    return model_find_tensor(m, name);
}

int pr_model_set_tensor_optim(pr_model *m, const char *name, int no_decay, float lr_mult, pr_error *err)
{
    pr_tensor_info *t = m ? model_find_tensor(m, name) : NULL;
    if (!t)
        return pr_errorf(err, PR_ERR_NOTFOUND, "no tensor named '%s'", name ? name : "(null)");
    if (!(lr_mult >= 0.0f) || lr_mult > 1e6f)
        return pr_errorf(err, PR_ERR_INVALID, "tensor '%s': learning-rate multiplier %g must be in [0, 1e6]", name,
                         (double)lr_mult);
    t->no_decay = no_decay != 0;
    t->lr_mult = lr_mult;
    return PR_OK;
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
    if (model_find_tensor(m, name))
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

pr_tensor_info *model_add_layer_tensor(pr_model *m, int kind, int l, int ndim, int64_t s0, int64_t s1,
                                       const char *suffix)
{
    char name[TENSOR_NAME_LEN];
    snprintf(name, sizeof name, "%s%d.%s", m->ops->layer_prefix, l, suffix);
    return model_add_base_tensor(m, kind, l, ndim, s0, s1, name);
}

void model_set_workspace(pr_tensor_info *t, uint32_t ws)
{
    if (t)
        t->workspace = ws;
}
