/* peftref core: the state of one training run, shared by the loop
 * (train.c) and its batch and evaluation steps (batch.c). */
#ifndef PEFTREF_CORE_TRAINER_H
#define PEFTREF_CORE_TRAINER_H

#include <stdint.h>
#include <stdio.h>

#include "peftref/train.h"
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
    int B, T, C, K;
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
    char *ckpt_path, *metrics_path;
    FILE *metrics;
} trainer;

/* One micro-batch of rows: forward, and backward when asked.  The mean
 * loss over its scored targets in *loss and their count in *scored;
 * correct predictions are added to *correct (classification, may be NULL). */
int train_run_batch(trainer *t, int rows, int backward, double *loss, int64_t *scored, int *correct,
                    pr_error *err);

/* Mean validation loss (weighted by scored targets) and accuracy (-1 for a
 * language-model task), over eval_batches batches (all when 0). */
int train_evaluate(trainer *t, double *loss_out, double *acc_out, pr_error *err);

#endif
