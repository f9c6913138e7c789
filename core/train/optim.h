/* peftref core: AdamW over parameter groups.
 *
 * AdamW (Loshchilov & Hutter, "Decoupled Weight Decay Regularization",
 * ICLR 2019; Adam: Kingma & Ba 2015).  At step t (1-based), for every
 * element of a segment in a group with multiplier mult and decay lambda:
 *
 *   lr_g  = lr * mult
 *   m     = beta1 * m + (1 - beta1) * g
 *   v     = beta2 * v + (1 - beta2) * g^2
 *   m_hat = m / (1 - beta1^t)          bias correction
 *   v_hat = v / (1 - beta2^t)
 *   p     = p - lr_g * lambda * p      decoupled decay (segments with decay = 1 only)
 *   p     = p - lr_g * m_hat / (sqrt(v_hat) + eps)
 *
 * The decay is scaled by the (scheduled) learning rate, as in PyTorch's
 * torch.optim.AdamW, and never passes through m or v: that decoupling is
 * what distinguishes AdamW from Adam with an L2 penalty.  At t = 1,
 * m_hat = g and v_hat = g^2, so every element moves by about lr_g.
 *
 * Memory: parameters and gradients belong to whoever holds the tensors; a
 * segment only points at them.  All optimizer state (m and v of every
 * segment) lives in one block allocated by optim_init: m of all segments
 * concatenated in order (groups in order, segments in order within a
 * group), then v in the same order.  Segment state pointers are views into
 * that block, so a checkpoint is two flat arrays plus the step count t.
 *
 * Determinism: every update is elementwise; reductions (gradient norm)
 * sum fixed-size chunks in parallel and the chunk sums serially in order,
 * so results do not depend on the number of threads. */
#ifndef PEFTREF_CORE_OPTIM_H
#define PEFTREF_CORE_OPTIM_H

#include <stddef.h>
#include <stdint.h>
#include "peftref/status.h"

typedef struct optim_config {
    float beta1;         /* 0 <= beta1 < 1; 0.9 */
    float beta2;         /* 0 <= beta2 < 1; 0.999 */
    float eps;           /* > 0; 1e-8 */
    float weight_decay;  /* lambda for groups that do not set their own; 0.01 */
} optim_config;

/* A trainable tensor as the optimizer sees it: n floats of param and the
 * gradient of the same size.  decay = 0 exempts it from weight decay
 * (biases, norm gains, scaling vectors; see optim_default_decay). */
typedef struct optim_segment {
    const char *name;    /* unique over all groups; copied */
    float *param;        /* n */
    float *grad;         /* n */
    size_t n;
    int decay;
} optim_segment;

/* Group weight_decay value meaning "use optim_config.weight_decay". */
#define OPTIM_WD_DEFAULT (-1.0f)

typedef struct optim_group {
    const optim_segment *segs;
    int n_segs;
    float lr_mult;       /* group lr = lr * lr_mult; >= 0 */
    float weight_decay;  /* >= 0, or OPTIM_WD_DEFAULT */
} optim_group;

/* A segment as the optimizer holds it. */
typedef struct optim_seg {
    char *name;
    float *param;        /* n, not owned */
    float *grad;         /* n, not owned */
    size_t n;
    int decay;
    int group;           /* index into the groups given to optim_init */
    size_t offset;       /* of this segment's state within m and within v */
    float *m;            /* n, view into the state block */
    float *v;            /* n, view into the state block */
} optim_seg;

/* A contiguous run of one segment's elements: the unit of parallel work
 * and of the deterministic reductions. */
typedef struct optim_chunk {
    int seg;
    size_t begin, len;
} optim_chunk;

typedef struct optim {
    optim_config cfg;
    int n_groups;
    float *group_lr_mult;   /* n_groups */
    float *group_wd;        /* n_groups, resolved */
    int n_segs;
    optim_seg *segs;
    size_t n_total;         /* sum of segment sizes */
    float *state;           /* 2 * n_total: m then v */
    int64_t t;              /* number of optim_step calls taken */
    double last_norm;       /* pre-clip gradient norm of the last optim_clip, or -1 */
    int n_chunks;
    optim_chunk *chunks;
    double *partial;        /* n_chunks, reduction scratch */
} optim;

/* beta1 0.9, beta2 0.999, eps 1e-8, weight_decay 0.01 (PyTorch's AdamW). */
void optim_config_default(optim_config *cfg);

/* Check ranges; errors name the field. */
int optim_config_validate(const optim_config *cfg, pr_error *err);

/* Copy the segment table, allocate and zero the state block, t = 0.
 * Fails on an invalid config, an empty or duplicate segment name, n = 0,
 * a NULL param or grad, or a negative lr multiplier.  On failure *o is
 * left freeable (optim_free is a no-op on it). */
int optim_init(optim *o, const optim_config *cfg, const optim_group *groups, int n_groups,
               pr_error *err);
void optim_free(optim *o);

/* Weight decay for a tensor by the usual rule: matrices (ndim >= 2, incl.
 * embeddings and learned prompts) are decayed; vectors (biases, norm
 * gains, (IA)^3-style scaling vectors) are not.  The name is not
 * consulted, so the rule is the same for every technique's tensors. */
int optim_default_decay(const char *name, int ndim);

/* Set every gradient to zero. */
void optim_zero_grad(optim *o);

/* Global L2 norm of all gradients, accumulated in double.  Inf or NaN
 * when a gradient is not finite. */
double optim_grad_norm(const optim *o);

/* Scale all gradients by max_norm / norm when norm > max_norm > 0
 * (Pascanu et al. 2013).  Returns the pre-clip norm, also kept in
 * o->last_norm.  A non-finite norm leaves the gradients untouched. */
double optim_clip(optim *o, double max_norm);

/* First segment (in state order) holding a non-finite gradient, or NULL;
 * *index (if non-NULL) receives the element's index within it. */
const char *optim_nonfinite_grad(const optim *o, size_t *index);

/* One AdamW step with base learning rate lr (t += 1).  Fails with
 * PR_ERR_INVALID for a negative or non-finite lr, leaving everything
 * unchanged.  Gradients are read, not cleared. */
int optim_step(optim *o, float lr, pr_error *err);

/* The flat state block for checkpointing: *m and *v point at n_total
 * floats each (layout above); *n (if non-NULL) receives n_total. */
void optim_state_block(optim *o, float **m, float **v, size_t *n);
/* Steps taken so far (the t of the bias correction). */
int64_t optim_get_t(const optim *o);
/* Restore t after loading m and v; t >= 0. */
int optim_set_t(optim *o, int64_t t, pr_error *err);

#endif
