/* peftref: the training engine.
 *
 * Trains the model's trainable tensors (and, for classification, a small
 * head) with AdamW, a warmup + decay schedule, global-norm clipping and
 * gradient accumulation.  Work is never lost: a checkpoint (trainable
 * tensors, optimizer moments, step, RNG state and data position) is
 * written atomically every ckpt_every steps, at the end, and when SIGINT or
 * SIGTERM arrives; a NaN or infinite loss stops training before anything is
 * updated, keeping the last good checkpoint.  Same seed, same result. */
#ifndef PEFTREF_TRAIN_H
#define PEFTREF_TRAIN_H

#include <stdint.h>
#include "peftref/status.h"
#include "peftref/model.h"
#include "peftref/tokenizer.h"
#include "peftref/head.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct pr_train_config {
    /* task and data */
    const char *task;          /* "lm" (default) or "classification" */
    const char *train_path;    /* text or JSONL */
    const char *val_path;      /* NULL: hold out val_fraction of train */
    const char *format;        /* "auto" (default), "text", "jsonl" */
    double val_fraction;       /* default 0.1 */
    /* budget and batch */
    int steps;                 /* optimizer steps */
    int batch;                 /* sequences per micro-batch */
    int seq_len;               /* T */
    int accum;                 /* micro-batches per step (default 1) */
    /* optimisation */
    float lr;                  /* peak learning rate */
    float min_lr_ratio;        /* final lr = min_lr_ratio * lr (default 0.1) */
    int warmup;                /* linear warmup steps */
    const char *schedule;      /* "cosine" (default), "linear", "constant" */
    float weight_decay;        /* AdamW decoupled decay on matrices (default 0.01) */
    int decay_all;             /* also decay biases, norm gains, vectors */
    float clip;                /* global-norm clip; 0 = off (default 1.0) */
    float beta1, beta2, eps;   /* AdamW (0.9, 0.999, 1e-8) */
    float head_lr_mult;        /* classification head lr multiplier (default 1) */
    uint64_t seed;             /* data order, head init */
    /* evaluation, logging, checkpoints */
    int eval_every;            /* steps between evaluations (0 = only at the end) */
    int eval_batches;          /* validation batches per evaluation (0 = all) */
    int log_every;             /* steps between log lines (default 10) */
    int ckpt_every;            /* steps between checkpoints (0 = only at the end) */
    const char *out_dir;       /* checkpoint.safetensors and metrics.jsonl go here */
    int resume;                /* continue from out_dir/checkpoint.safetensors if present */
    int quiet;                 /* no log lines on stderr (same as PR_PROGRESS_NONE) */
    int progress;              /* pr_progress: how progress is shown on stderr */
    /* output directory safety (docs/pipeline.md, "What a run leaves") */
    int resume_changed;        /* resume although settings differ from the
                                  checkpoint's (recorded in metrics.jsonl) */
    int force;                 /* start afresh in an out_dir holding an earlier
                                  run: its checkpoint is removed, its outputs replaced */
    /* classification head (peftref/head.h): in, the head to start from
     * (n_labels 0: a fresh one; else its labels must be the training
     * data's); out, the trained head, at the end and before each on_best */
    pr_head *head;
    /* best modules and early stopping (docs/pipeline.md, "Best modules and
     * early stopping"); every evaluation counts, step 0's included */
    const char *keep_best;            /* NULL (off), "val_loss" or "val_accuracy" */
    int early_stop_patience;          /* stop after this many evaluations without improvement; 0: off */
    double early_stop_min_delta;      /* an improvement is by more than this */
    const char *early_stop_metric;    /* NULL: "val_loss"; or "val_accuracy" */
    /* keep_best: called after each evaluation that improves keep_best's
     * metric, the model (and head) as evaluated */
    int (*on_best)(void *arg, int64_t step, double val_loss, double val_accuracy, pr_error *err);
    void *on_best_arg;
    /* pr_precision (peftref/model.h): PR_PRECISION_F32 (0, default) or
     * PR_PRECISION_BF16, set on the model before the first step */
    int precision;
    /* 1: activation recomputation (pr_model_set_recompute, peftref/model.h),
     * set on the model before its activations are reserved */
    int recompute;
} pr_train_config;

/* How training shows its progress on stderr.  AUTO (the default) draws a
 * one-line bar redrawn in place when stderr is a terminal (and TERM is not
 * "dumb"), and writes plain log lines otherwise. */
typedef enum pr_progress {
    PR_PROGRESS_AUTO = 0,
    PR_PROGRESS_BAR = 1,      /* step/total, bar, loss, tokens/s, ETA, val loss */
    PR_PROGRESS_PLAIN = 2,    /* one log line every log_every steps */
    PR_PROGRESS_NONE = 3
} pr_progress;

/* "auto", "bar", "plain", "none" -> pr_progress; -1 for anything else. */
int pr_progress_parse(const char *s);

/* Defaults for every field not about data. */
void pr_train_config_default(pr_train_config *cfg);

typedef struct pr_train_result {
    int64_t steps_done;
    double first_train_loss;
    double final_train_loss;
    double initial_val_loss;
    double final_val_loss;
    double final_val_accuracy;   /* classification; -1 for lm */
    double seconds;
    double tokens_per_second;
    int64_t trainable_params;
    int resumed_from;            /* step resumed from, -1 when fresh */
    int interrupted;             /* stopped by SIGINT/SIGTERM */
    double step_seconds;         /* time in optimizer steps (forward, backward,
                                    update), without evaluations and checkpoints */
    int64_t tokens_trained;      /* real (non-padding) tokens in those steps */
    int complete;                /* resumed a checkpoint at the last step: nothing
                                    trained; the losses are the checkpoint's */
    int64_t best_step;           /* keep_best: the step of the best evaluation, -1: none */
    double best_val_loss, best_val_accuracy;   /* ... and its values */
    int64_t early_stopped;       /* the step early stopping stopped at, -1: it did not */
    double allreduce_seconds;    /* of step_seconds, in the gradient all-reduce over
                                    MPI ranks (0 for one process) */
} pr_train_result;

/* The lock of a run's output directory (OUT/.lock: the holder's pid and
 * host), taken by pr_train for as long as it runs; a command that writes
 * more into OUT after training takes it first to hold it throughout.
 * Re-entrant within a process.  An error names the holding pid and host;
 * a lock whose pid is dead on this host is stale and taken over. */
int pr_train_lock(const char *out_dir, pr_error *err);
void pr_train_unlock(const char *out_dir);

/* Train m in place.  Base tensors marked trainable (pr_model_set_trainable)
 * are updated; at least one must be, or the task must be classification
 * (which always trains its head), or steps must be 0 (evaluation only: the
 * result holds the validation loss of m as it is).
 *
 * out_dir: a checkpoint there is continued only with resume, and only when
 * its fingerprint (core/train/run_fingerprint.h: optimiser and schedule
 * settings, data files, base model, modules) matches this run's, or with
 * resume_changed; a checkpoint already at the last step trains nothing
 * (res->complete).  Without a checkpoint, an earlier run's metrics or
 * outputs there are replaced only with force (resume restarts a run that
 * died before its first checkpoint). */
int pr_train(pr_model *m, const pr_tokenizer *tok, const pr_train_config *cfg, pr_train_result *res,
             pr_error *err);

#ifdef __cplusplus
}
#endif
#endif
