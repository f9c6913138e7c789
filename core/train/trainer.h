/* peftref core: the state of one training run, shared by the loop
 * (train.c) and its batch and evaluation steps (batch.c). */
#ifndef PEFTREF_CORE_TRAINER_H
#define PEFTREF_CORE_TRAINER_H

#include <stdint.h>
#include <stdio.h>

#include "peftref/train.h"
#include "best.h"
#include "data.h"
#include "optim.h"
#include "rng.h"
#include "run_fingerprint.h"
#include "train_state.h"

/* Everything one run holds; freed by trainer_free. */
typedef struct trainer {
    pr_model *m;
    const pr_train_config *cfg;
    int is_cls;
    int B, T, C, K;       /* B: the rows this rank runs of each micro-batch */
    /* data parallelism (dist.h): rank of ranks; each micro-batch of B_global
     * rows (train.batch) is split into ranks slices of B rows */
    int rank, ranks, B_global;
    size_t *idx_step;     /* (accum * B_global) example indices of the step in flight */
    /* the gradient all-reduce: one contiguous block (red_single, red_ptr)
     * or every segment packed into red_buf; red_n floats either way */
    float *red_buf, *red_ptr;
    size_t red_n;
    int red_single;
    int64_t *samples;   /* (B) global sample index of each row of the micro-batch in flight */
    data_dataset train, val;
    data_sampler sampler;
    int pad_id;
    int *tokens, *targets, *lengths, *labels; /* (B,T), (B,T), (B), (B) */
    size_t *idx;                              /* (B) */
    /* classification head: W (C,K) then b (K), and their gradients, in one
     * flat block each; pooled (B,C), logits (B,K), dhidden (B,T,C) */
    float *head, *head_grad, *pooled, *cls_logits, *dhidden;
    optim opt;
    int opt_ready;
    trainstate_tensor *ts;                    /* trainable tensors in optimizer order */
    int n_ts;
    pr_rng rng;
    run_fp fp;                                /* this run's settings (run_fingerprint.h) */
    char *fp_json;                            /* ... as the checkpoint stores them */
    int locked;                               /* holds out_dir's lock */
    int64_t ckpt_step;                        /* step of the checkpoint on disk, -1: none */
    /* the losses a checkpoint carries, so a finished run reports real ones */
    double first_loss, min_loss, last_loss, last_val, last_acc;
    int have_loss, warned_diverging;
    int diverging_steps;         /* consecutive steps past the diverging rule (not checkpointed: it only warns) */
    char *ckpt_path, *metrics_path;
    FILE *metrics;
    /* train.keep_best and train.early_stop; stopped_at: the step early
     * stopping stopped at (-1), carried by the checkpoint with both */
    best_tracker keep, stop;
    int64_t stopped_at;
} trainer;

/* checkpoint.c: write OUT/checkpoint.safetensors at step; continue one
 * (its settings checked, *changed the accepted differences as JSON);
 * where the last good one is, for a message; whether dir holds an
 * earlier run's outputs (named in buf); remove dir/name. */
int train_save_checkpoint(trainer *t, int64_t step, pr_error *err);
int train_resume_checkpoint(trainer *t, int64_t *step, char **changed, pr_error *err);
const char *train_ckpt_note(const trainer *t, char *buf, size_t len);
int train_has_outputs(const char *dir, char *buf, size_t len);
void train_remove_in(const char *dir, const char *name);

/* Copy the trained head and its labels into cfg->head (classification
 * with a head to fill; nothing otherwise). */
int train_export_head(trainer *t, pr_error *err);
/* Start from cfg->head when it holds one: its shape and labels must be
 * this run's. */
int train_import_head(trainer *t, pr_error *err);

/* The head's logits for one pooled row: z (K) = h (C) . W (C,K) + b (K)
 * (classify.c; training and pr_classify_* share it). */
void train_head_logits(const float *W, const float *bias, const float *h, int C, int K, float *z);

/* One micro-batch of rows: forward, and backward when asked.  The mean
 * loss over its scored targets in *loss and their count in *scored; the
 * backward is that of the sum of its target losses over n_scored_all, the
 * targets of the whole step on every rank (0: its own count), so the
 * pieces' gradients add up to the global batch's;
 * correct predictions are added to *correct (classification, may be NULL). */
int train_run_batch(trainer *t, int rows, int backward, int64_t n_scored_all, double *loss, int64_t *scored,
                    int *correct, pr_error *err);

/* Mean validation loss (weighted by scored targets) and accuracy (-1 for a
 * language-model task), over eval_batches batches of train.batch rows (all
 * when 0), the rows shared out among the ranks and the sums reduced. */
int train_evaluate(trainer *t, double *loss_out, double *acc_out, pr_error *err);

/* The data-parallel side of a step (train_reduce.c): the plan of the one
 * all-reduce over the trainable gradients, the reduction, rank 0's
 * decisions shared with every rank, and the note a signal prints. */
int train_plan_reduce(trainer *t, pr_error *err);
int train_reduce_grads(trainer *t, pr_error *err);
int train_from_rank0(trainer *t, int v, pr_error *err, int *rc);
void train_update_stop_note(const trainer *t, int64_t step);

#endif
