/* peftref core: trainable tensors and their gradients. */
#include <stdlib.h>
#include <string.h>

#include "family.h"

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
        for (int i = 0; i < m->n_tensors && on; i++)
            if (model_tensor_bf16(m, m->tab[i]))
                return pr_errorf(err, PR_ERR_INVALID, "set_trainable '*': tensor '%s' is stored in bf16 (precision "
                                 "bf16); choose what trains before setting the precision", m->tab[i]->name);
        for (int i = 0; i < m->n_tensors; i++)
            if (m->tab[i]->kind != PR_TENSOR_MODULE || m->tab[i]->grad)
                m->tab[i]->trainable = on;
        return relayout_grads(m, err);
    }
    pr_tensor_info *t = model_find_tensor(m, name);
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
    if (on && model_tensor_bf16(m, t))
        return pr_errorf(err, PR_ERR_INVALID, "set_trainable: tensor '%s' is stored in bf16 (precision bf16); "
                         "choose what trains before setting the precision", name);
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
