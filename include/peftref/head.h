/* peftref: the classification head, a task module saved with the others.
 *
 * A sequence-classification run trains, besides its modules, a linear head
 * over the final hidden state of each text's last real token ("last_token"
 * pooling; padding is on the right and attention causal, so that position
 * has seen the whole text):
 *   pooled (C); logits (K) = pooled . W + b; p = softmax(logits)
 * C = d_model, K = the labels, in the order of `labels` (docs/data.md: the
 * sorted strings of the training file, or 0..K-1 for integer labels).
 *
 * Its file, RUN/modules/head.safetensors (docs/modules.md, "The task
 * head"), holds "weight" (K, C) -- out x in, as torch.nn.Linear stores it --
 * and "bias" (K), F32, with metadata format "peftref-head", task,
 * pooling, d_model, n_labels and labels (a JSON array of names, in class
 * order). */
#ifndef PEFTREF_HEAD_H
#define PEFTREF_HEAD_H

#include <stdint.h>
#include "peftref/status.h"
#include "peftref/model.h"
#include "peftref/tokenizer.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct pr_head {
    int d_model;       /* C */
    int n_labels;      /* K; 0: no head */
    int int_labels;    /* the labels were JSON integers (names "0".."K-1") */
    char **labels;     /* K names in class order */
    float *weight;     /* (C,K) row-major: logit k = sum_c h[c] * weight[c*K + k] + bias[k] */
    float *bias;       /* (K) */
} pr_head;

void pr_head_free(pr_head *h);
/* A deep copy (dst freed with pr_head_free). */
int pr_head_copy(pr_head *dst, const pr_head *src, pr_error *err);

/* Write h to path atomically.  steps and val_loss (NAN when unknown) go
 * into the "training" metadata. */
int pr_head_save(const pr_head *h, const char *path, int64_t steps, double val_loss, pr_error *err);
/* Read a head file; d_model > 0 must match its d_model.  Errors name the
 * file and the field. */
int pr_head_load(const char *path, int d_model, pr_head *h, pr_error *err);

/* ---- scoring -------------------------------------------------------------- */

/* The head's predictions over the n examples of a file. */
typedef struct pr_cls_predictions {
    int n, K;
    int *gold;       /* (n) label index; -1 when the record has no "label" */
    float *probs;    /* (n,K) */
    double loss;     /* mean cross-entropy over the labelled examples (nats) */
    int n_labelled;
} pr_cls_predictions;

void pr_cls_predictions_free(pr_cls_predictions *p);

/* Score JSONL path ({"text", "label"} records; labels_optional lets
 * records lack "label") with m and h, T positions, batch rows per forward.
 * Labels must be h's; a record's problem names path:line. */
int pr_classify_file(pr_model *m, const pr_tokenizer *tok, const pr_head *h, const char *path, int T, int batch,
                     int labels_optional, pr_cls_predictions *out, pr_error *err);
/* The same over a run's validation split: val_path, else the held-out
 * val_fraction of train_path chosen with seed, as pr_train chooses it. */
int pr_classify_split(pr_model *m, const pr_tokenizer *tok, const pr_head *h, const char *train_path,
                      const char *val_path, double val_fraction, uint64_t seed, int T, int batch,
                      pr_cls_predictions *out, pr_error *err);

/* Over the labelled examples: accuracy; macro-F1, the mean of
 * F1_k = 2 TP_k / (2 TP_k + FP_k + FN_k) over the labels that are the gold
 * or the predicted label (argmax, the lowest index on ties) of at least one
 * example (scikit-learn's f1_score(average="macro")); and per label its
 * examples (per_n) and those predicted right (per_correct), K entries
 * each, the caller's. */
typedef struct pr_cls_scores {
    int n;
    double loss, accuracy, macro_f1;
} pr_cls_scores;
void pr_cls_score(const pr_cls_predictions *p, pr_cls_scores *s, int *per_n, int *per_correct);

#ifdef __cplusplus
}
#endif
#endif
