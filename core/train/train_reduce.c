/* peftref core: data-parallel training's side of a step: one in-place
 * all-reduce over the trainable gradients (packed when they are not
 * contiguous), rank 0's decisions shared with every rank, and the note a
 * signal prints (docs/distributed.md). */
#include "config.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "peftref/train.h"
#include "dist.h"
#include "trainer.h"

/* ---- the gradient all-reduce ------------------------------------------------
 * Every trainable tensor's gradient (the model's flat block, each module's
 * block, the classification head's) is summed over the ranks in one
 * MPI_Allreduce.  When the optimizer's segments lie back to back in memory
 * the sum runs in place over them; otherwise they are packed into one
 * staging block first.  No scaling follows: each rank's backward already
 * divided by the step's scored targets on every rank (train_run_batch). */
static int cmp_seg_addr(const void *a, const void *b)
{
    const optim_seg *x = *(const optim_seg *const *)a, *y = *(const optim_seg *const *)b;
    return x->grad < y->grad ? -1 : x->grad > y->grad;
}

int train_plan_reduce(trainer *t, pr_error *err)
{
    t->red_n = t->opt_ready ? t->opt.n_total : 0;
    if (t->ranks == 1 || t->red_n == 0)
        return PR_OK;
    const optim_seg **order = malloc((size_t)t->opt.n_segs * sizeof *order);
    if (!order)
        return pr_errorf(err, PR_ERR_NOMEM, "out of memory planning the gradient all-reduce");
    for (int i = 0; i < t->opt.n_segs; i++)
        order[i] = &t->opt.segs[i];
    qsort(order, (size_t)t->opt.n_segs, sizeof *order, cmp_seg_addr);
    int contiguous = 1;
    for (int i = 1; i < t->opt.n_segs && contiguous; i++)
        contiguous = order[i - 1]->grad + order[i - 1]->n == order[i]->grad;
    t->red_single = contiguous;
    t->red_ptr = order[0]->grad;
    free(order);
    if (!contiguous && !(t->red_buf = malloc(t->red_n * sizeof(float))))
        return pr_errorf(err, PR_ERR_NOMEM, "out of memory for the %zu-float gradient all-reduce block", t->red_n);
    return PR_OK;
}

int train_reduce_grads(trainer *t, pr_error *err)
{
    if (t->ranks == 1 || t->red_n == 0)
        return PR_OK;
    if (t->red_single)
        return dist_sum_floats(t->red_ptr, t->red_n, err);
    size_t off = 0;
    for (int i = 0; i < t->opt.n_segs; i++) {
        memcpy(t->red_buf + off, t->opt.segs[i].grad, t->opt.segs[i].n * sizeof(float));
        off += t->opt.segs[i].n;
    }
    int rc = dist_sum_floats(t->red_buf, t->red_n, err);
    off = 0;
    for (int i = 0; i < t->opt.n_segs && !rc; i++) {
        memcpy(t->opt.segs[i].grad, t->red_buf + off, t->opt.segs[i].n * sizeof(float));
        off += t->opt.segs[i].n;
    }
    return rc;
}

/* rank 0's value of v, on every rank */
int train_from_rank0(trainer *t, int v, pr_error *err, int *rc)
{
    double d = t->rank == 0 ? (double)v : 0.0;
    *rc = dist_sum_doubles(&d, 1, err);
    return (int)d;
}

/* What rank 0 says when a signal ends a run of several ranks. */
void train_update_stop_note(const trainer *t, int64_t step)
{
    if (t->ranks == 1 || t->rank != 0)
        return;
    char note[1024];
    if (t->ckpt_step >= 0)
        snprintf(note, sizeof note, "step %lld was in flight; the last checkpoint, %s at step %lld, is intact: "
                 "continue with mpirun -np %d peftref train ... --resume", (long long)step + 1, t->ckpt_path,
                 (long long)t->ckpt_step, t->ranks);
    else
        snprintf(note, sizeof note, "step %lld was in flight and no checkpoint has been written yet "
                 "(train.checkpoint_every sets how often one is)", (long long)step + 1);
    dist_set_stop_note(note);
}

