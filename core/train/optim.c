/* peftref core: AdamW over parameter groups (formulas in optim.h). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "optim.h"

/* Elements per chunk.  Fixed, so chunk boundaries and hence the order of
 * every double summation are independent of the thread count. */
#define OPTIM_CHUNK ((size_t)16384)
/* Below this many elements in total, threads cost more than they save. */
#define OPTIM_PAR_MIN ((size_t)1 << 16)

void optim_config_default(optim_config *cfg)
{
    cfg->beta1 = 0.9f;
    cfg->beta2 = 0.999f;
    cfg->eps = 1e-8f;
    cfg->weight_decay = 0.01f;
}

int optim_config_validate(const optim_config *cfg, pr_error *err)
{
    if (!(cfg->beta1 >= 0.0f && cfg->beta1 < 1.0f))
        return pr_errorf(err, PR_ERR_INVALID, "optimizer: beta1 = %g is outside [0, 1)",
                         (double)cfg->beta1);
    if (!(cfg->beta2 >= 0.0f && cfg->beta2 < 1.0f))
        return pr_errorf(err, PR_ERR_INVALID, "optimizer: beta2 = %g is outside [0, 1)",
                         (double)cfg->beta2);
    if (!(cfg->eps > 0.0f) || !isfinite(cfg->eps))
        return pr_errorf(err, PR_ERR_INVALID, "optimizer: eps = %g must be positive and finite",
                         (double)cfg->eps);
    if (!(cfg->weight_decay >= 0.0f) || !isfinite(cfg->weight_decay))
        return pr_errorf(err, PR_ERR_INVALID,
                         "optimizer: weight_decay = %g must be non-negative and finite",
                         (double)cfg->weight_decay);
    return PR_OK;
}

int optim_default_decay(const char *name, int ndim)
{
    (void)name;
    return ndim >= 2;
}

void optim_free(optim *o)
{
    if (!o)
        return;
    for (int i = 0; i < o->n_segs; i++)
        free(o->segs[i].name);
    free(o->segs);
    free(o->group_lr_mult);
    free(o->group_wd);
    free(o->state);
    free(o->chunks);
    free(o->partial);
    memset(o, 0, sizeof *o);
    o->last_norm = -1.0;
}

/* Validate groups and segments before allocating anything. */
static int check_groups(const optim_group *groups, int n_groups, int *n_segs, size_t *n_total,
                        size_t *n_chunks, pr_error *err)
{
    if (n_groups < 1 || !groups)
        return pr_errorf(err, PR_ERR_INVALID, "optimizer: no parameter groups");
    int ns = 0;
    size_t total = 0, chunks = 0;
    for (int g = 0; g < n_groups; g++) {
        const optim_group *gr = &groups[g];
        if (!(gr->lr_mult >= 0.0f) || !isfinite(gr->lr_mult))
            return pr_errorf(err, PR_ERR_INVALID,
                             "optimizer: group %d: lr multiplier %g must be non-negative", g,
                             (double)gr->lr_mult);
        if (gr->weight_decay != OPTIM_WD_DEFAULT &&
            (!(gr->weight_decay >= 0.0f) || !isfinite(gr->weight_decay)))
            return pr_errorf(err, PR_ERR_INVALID,
                             "optimizer: group %d: weight decay %g must be non-negative", g,
                             (double)gr->weight_decay);
        if (gr->n_segs < 0 || (gr->n_segs > 0 && !gr->segs))
            return pr_errorf(err, PR_ERR_INVALID, "optimizer: group %d: bad segment list", g);
        for (int s = 0; s < gr->n_segs; s++) {
            const optim_segment *sg = &gr->segs[s];
            if (!sg->name || !sg->name[0])
                return pr_errorf(err, PR_ERR_INVALID, "optimizer: group %d: segment %d has no name",
                                 g, s);
            if (sg->n == 0 || !sg->param || !sg->grad)
                return pr_errorf(err, PR_ERR_INVALID,
                                 "optimizer: segment '%s': empty, or no parameter or gradient",
                                 sg->name);
            for (int g2 = 0; g2 <= g; g2++)
                for (int s2 = 0; s2 < (g2 == g ? s : groups[g2].n_segs); s2++)
                    if (strcmp(groups[g2].segs[s2].name, sg->name) == 0)
                        return pr_errorf(err, PR_ERR_INVALID,
                                         "optimizer: segment '%s' given twice", sg->name);
            if (sg->n > (SIZE_MAX / 2 / sizeof(float)) - total)
                return pr_errorf(err, PR_ERR_INVALID, "optimizer: segment '%s': too large",
                                 sg->name);
            total += sg->n;
            chunks += (sg->n + OPTIM_CHUNK - 1) / OPTIM_CHUNK;
            ns++;
        }
    }
    if (ns == 0)
        return pr_errorf(err, PR_ERR_INVALID, "optimizer: no trainable tensors");
    if (chunks > (size_t)INT32_MAX)
        return pr_errorf(err, PR_ERR_INVALID, "optimizer: too many elements");
    *n_segs = ns;
    *n_total = total;
    *n_chunks = chunks;
    return PR_OK;
}

int optim_init(optim *o, const optim_config *cfg, const optim_group *groups, int n_groups,
               pr_error *err)
{
    memset(o, 0, sizeof *o);
    o->last_norm = -1.0;
    int rc = optim_config_validate(cfg, err);
    if (rc != PR_OK)
        return rc;
    int ns = 0;
    size_t total = 0, nchunks = 0;
    rc = check_groups(groups, n_groups, &ns, &total, &nchunks, err);
    if (rc != PR_OK)
        return rc;

    o->cfg = *cfg;
    o->group_lr_mult = malloc((size_t)n_groups * sizeof *o->group_lr_mult);
    o->group_wd = malloc((size_t)n_groups * sizeof *o->group_wd);
    o->segs = calloc((size_t)ns, sizeof *o->segs);
    o->state = calloc(2 * total, sizeof *o->state);
    o->chunks = malloc(nchunks * sizeof *o->chunks);
    o->partial = malloc(nchunks * sizeof *o->partial);
    if (!o->group_lr_mult || !o->group_wd || !o->segs || !o->state || !o->chunks ||
        !o->partial) {
        optim_free(o);
        return pr_errorf(err, PR_ERR_NOMEM,
                         "optimizer: cannot allocate state for %zu parameters", total);
    }
    o->n_groups = n_groups;
    o->n_total = total;
    o->n_chunks = (int)nchunks;

    float *m = o->state, *v = o->state + total;
    size_t off = 0;
    int k = 0, c = 0;
    for (int g = 0; g < n_groups; g++) {
        o->group_lr_mult[g] = groups[g].lr_mult;
        o->group_wd[g] = groups[g].weight_decay == OPTIM_WD_DEFAULT ? cfg->weight_decay
                                                                    : groups[g].weight_decay;
        for (int s = 0; s < groups[g].n_segs; s++, k++) {
            const optim_segment *src = &groups[g].segs[s];
            optim_seg *dst = &o->segs[k];
            o->n_segs = k + 1; /* so optim_free releases the names copied so far */
            dst->name = strdup(src->name);
            if (!dst->name) {
                optim_free(o);
                return pr_errorf(err, PR_ERR_NOMEM, "optimizer: out of memory");
            }
            dst->param = src->param;
            dst->grad = src->grad;
            dst->n = src->n;
            dst->decay = src->decay != 0;
            dst->group = g;
            dst->offset = off;
            dst->m = m + off;
            dst->v = v + off;
            for (size_t b = 0; b < src->n; b += OPTIM_CHUNK, c++) {
                o->chunks[c].seg = k;
                o->chunks[c].begin = b;
                o->chunks[c].len = src->n - b < OPTIM_CHUNK ? src->n - b : OPTIM_CHUNK;
            }
            off += src->n;
        }
    }
    return PR_OK;
}

void optim_zero_grad(optim *o)
{
    for (int i = 0; i < o->n_segs; i++)
        memset(o->segs[i].grad, 0, o->segs[i].n * sizeof(float));
}

/* partial[c] = sum of g^2 over chunk c, in double.  A chunk's sum is
 * finite iff all its gradients are (FLT_MAX^2 * OPTIM_CHUNK < DBL_MAX). */
static void chunk_sumsq(const optim *o)
{
    const optim_chunk *chunks = o->chunks;
    const optim_seg *segs = o->segs;
    double *partial = o->partial;
    int nc = o->n_chunks;
#pragma omp parallel for schedule(static) if (o->n_total >= OPTIM_PAR_MIN)
    for (int c = 0; c < nc; c++) {
        const float *g = segs[chunks[c].seg].grad + chunks[c].begin;
        size_t len = chunks[c].len;
        double s = 0.0;
        for (size_t i = 0; i < len; i++)
            s += (double)g[i] * (double)g[i];
        partial[c] = s;
    }
}

double optim_grad_norm(const optim *o)
{
    chunk_sumsq(o);
    double s = 0.0;
    for (int c = 0; c < o->n_chunks; c++)
        s += o->partial[c];
    return sqrt(s);
}

double optim_clip(optim *o, double max_norm)
{
    double norm = optim_grad_norm(o);
    o->last_norm = norm;
    if (!(max_norm > 0.0) || !isfinite(norm) || norm <= max_norm)
        return norm;
    double scale = max_norm / norm;
    const optim_chunk *chunks = o->chunks;
    optim_seg *segs = o->segs;
    int nc = o->n_chunks;
#pragma omp parallel for schedule(static) if (o->n_total >= OPTIM_PAR_MIN)
    for (int c = 0; c < nc; c++) {
        float *g = segs[chunks[c].seg].grad + chunks[c].begin;
        size_t len = chunks[c].len;
        for (size_t i = 0; i < len; i++)
            g[i] = (float)((double)g[i] * scale);
    }
    return norm;
}

const char *optim_nonfinite_grad(const optim *o, size_t *index)
{
    chunk_sumsq(o);
    for (int c = 0; c < o->n_chunks; c++) {
        if (isfinite(o->partial[c]))
            continue;
        const optim_chunk *ch = &o->chunks[c];
        const optim_seg *sg = &o->segs[ch->seg];
        for (size_t i = ch->begin; i < ch->begin + ch->len; i++)
            if (!isfinite(sg->grad[i])) {
                if (index)
                    *index = i;
                return sg->name;
            }
    }
    return NULL;
}

int optim_step(optim *o, float lr, pr_error *err)
{
    if (!(lr >= 0.0f) || !isfinite(lr))
        return pr_errorf(err, PR_ERR_INVALID, "optimizer: learning rate %g is not a finite "
                         "non-negative number", (double)lr);
    if (o->t == INT64_MAX)
        return pr_errorf(err, PR_ERR_INVALID, "optimizer: step count overflow");
    o->t++;
    const float b1 = o->cfg.beta1, b2 = o->cfg.beta2, eps = o->cfg.eps;
    /* 1 / (1 - beta^t), in double: beta^t underflows gracefully to 0. */
    const float inv_bc1 = (float)(1.0 / (1.0 - pow((double)b1, (double)o->t)));
    const float inv_bc2 = (float)(1.0 / (1.0 - pow((double)b2, (double)o->t)));
    const optim_chunk *chunks = o->chunks;
    const optim_seg *segs = o->segs;
    const float *lr_mult = o->group_lr_mult, *group_wd = o->group_wd;
    int nc = o->n_chunks;
#pragma omp parallel for schedule(static) if (o->n_total >= OPTIM_PAR_MIN)
    for (int c = 0; c < nc; c++) {
        const optim_seg *sg = &segs[chunks[c].seg];
        size_t b = chunks[c].begin, len = chunks[c].len;
        const float lr_g = lr * lr_mult[sg->group];
        const float wd = sg->decay ? group_wd[sg->group] : 0.0f;
        float *p = sg->param + b, *m = sg->m + b, *v = sg->v + b;
        const float *g = sg->grad + b;
        for (size_t i = 0; i < len; i++) {
            float gi = g[i];
            float mi = b1 * m[i] + (1.0f - b1) * gi;
            float vi = b2 * v[i] + (1.0f - b2) * gi * gi;
            m[i] = mi;
            v[i] = vi;
            float update = (mi * inv_bc1) / (sqrtf(vi * inv_bc2) + eps);
            /* decay and Adam update both from the old p (decoupled) */
            p[i] -= lr_g * (update + wd * p[i]);
        }
    }
    return PR_OK;
}

void optim_state_block(optim *o, float **m, float **v, size_t *n)
{
    if (m)
        *m = o->state;
    if (v)
        *v = o->state + o->n_total;
    if (n)
        *n = o->n_total;
}

int64_t optim_get_t(const optim *o)
{
    return o->t;
}

int optim_set_t(optim *o, int64_t t, pr_error *err)
{
    if (t < 0)
        return pr_errorf(err, PR_ERR_INVALID, "optimizer: step count %lld is negative",
                         (long long)t);
    o->t = t;
    return PR_OK;
}
