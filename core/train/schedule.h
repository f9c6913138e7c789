/* peftref core: learning-rate schedules.
 *
 * For step s (0-based), base rate lr, warmup W >= 0 steps, total S steps
 * and floor lr_min = min_ratio * lr:
 *
 *   s < W:   lr(s) = lr * (s + 1) / W          linear warmup; reaches lr at s = W - 1
 *   s >= W:  p = min(1, (s - W) / (S - W))     decay progress (p = 1 when S <= W)
 *     constant: lr(s) = lr
 *     linear:   lr(s) = lr_min + (lr - lr_min) * (1 - p)
 *     cosine:   lr(s) = lr_min + (lr - lr_min) * (1 + cos(pi * p)) / 2
 *                                              (Loshchilov & Hutter, SGDR, ICLR 2017)
 *
 * So the decay starts from lr at s = W and reaches lr_min at s = S; steps
 * past S stay at lr_min.  Computed in double, returned as float. */
#ifndef PEFTREF_CORE_SCHEDULE_H
#define PEFTREF_CORE_SCHEDULE_H

#include <stdint.h>
#include "peftref/status.h"

typedef enum sched_kind {
    SCHED_CONSTANT = 0,
    SCHED_LINEAR = 1,
    SCHED_COSINE = 2
} sched_kind;

typedef struct sched_config {
    int kind;          /* sched_kind */
    float lr;          /* base (peak) learning rate, >= 0 */
    int64_t warmup;    /* W >= 0 */
    int64_t total;     /* S; > 0 for linear and cosine, unused by constant */
    float min_ratio;   /* lr_min = min_ratio * lr, 0 <= min_ratio <= 1 */
} sched_config;

/* Check ranges; errors name the field. */
int sched_validate(const sched_config *c, pr_error *err);

/* Learning rate at 0-based step s (s < 0 is treated as 0). */
float sched_lr(const sched_config *c, int64_t step);

/* "constant", "linear", "cosine" <-> sched_kind.  parse returns
 * PR_ERR_NOTFOUND (naming the value) for anything else. */
int sched_kind_parse(const char *name, int *kind, pr_error *err);
const char *sched_kind_name(int kind);

#endif
