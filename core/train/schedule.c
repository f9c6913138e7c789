/* peftref core: learning-rate schedules (formulas in schedule.h). */
#include <math.h>
#include <string.h>

#include "schedule.h"

static const char *const kind_names[] = {"constant", "linear", "cosine"};
#define N_KINDS ((int)(sizeof kind_names / sizeof kind_names[0]))

const char *sched_kind_name(int kind)
{
    return kind >= 0 && kind < N_KINDS ? kind_names[kind] : "unknown";
}

int sched_kind_parse(const char *name, int *kind, pr_error *err)
{
    for (int k = 0; k < N_KINDS; k++)
        if (name && strcmp(name, kind_names[k]) == 0) {
            *kind = k;
            return PR_OK;
        }
    return pr_errorf(err, PR_ERR_NOTFOUND,
                     "schedule: unknown kind '%s' (expected constant, linear or cosine)",
                     name ? name : "(null)");
}

int sched_validate(const sched_config *c, pr_error *err)
{
    if (c->kind < 0 || c->kind >= N_KINDS)
        return pr_errorf(err, PR_ERR_INVALID, "schedule: unknown kind %d", c->kind);
    if (!(c->lr >= 0.0f) || !isfinite(c->lr))
        return pr_errorf(err, PR_ERR_INVALID, "schedule: lr = %g must be non-negative and finite",
                         (double)c->lr);
    if (c->warmup < 0)
        return pr_errorf(err, PR_ERR_INVALID, "schedule: warmup = %lld is negative",
                         (long long)c->warmup);
    if (!(c->min_ratio >= 0.0f && c->min_ratio <= 1.0f))
        return pr_errorf(err, PR_ERR_INVALID, "schedule: min_ratio = %g is outside [0, 1]",
                         (double)c->min_ratio);
    if (c->kind != SCHED_CONSTANT && c->total <= 0)
        return pr_errorf(err, PR_ERR_INVALID,
                         "schedule: %s decay needs total steps > 0 (got %lld)",
                         sched_kind_name(c->kind), (long long)c->total);
    if (c->kind != SCHED_CONSTANT && c->warmup > c->total)
        return pr_errorf(err, PR_ERR_INVALID,
                         "schedule: warmup = %lld exceeds total steps = %lld",
                         (long long)c->warmup, (long long)c->total);
    return PR_OK;
}

float sched_lr(const sched_config *c, int64_t step)
{
    const double lr = c->lr;
    const int64_t s = step < 0 ? 0 : step;
    if (s < c->warmup)
        return (float)(lr * (double)(s + 1) / (double)c->warmup);
    if (c->kind == SCHED_CONSTANT)
        return (float)lr;
    const double lr_min = (double)c->min_ratio * lr;
    const int64_t span = c->total - c->warmup;
    double p = span > 0 ? (double)(s - c->warmup) / (double)span : 1.0;
    if (p > 1.0)
        p = 1.0;
    if (c->kind == SCHED_LINEAR)
        return (float)(lr_min + (lr - lr_min) * (1.0 - p));
    return (float)(lr_min + (lr - lr_min) * 0.5 * (1.0 + cos(M_PI * p)));
}
