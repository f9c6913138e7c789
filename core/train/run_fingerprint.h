/* peftref core: a run's fingerprint, everything that changes what a
 * training run computes, as ordered (setting, value) text pairs.
 *
 * A checkpoint stores it (as a JSON object of strings); a resume compares
 * the stored one with the run's own and names every setting that differs
 * with its old and new value.  It is built from the model and the training
 * configuration alone, so other commands (a resumable compare) can build
 * and compare the same fingerprint.
 *
 * Contents (run_fp_of_run):
 *   task, data.format, data.val_fraction
 *   data.train, data.validation   "size=N fnv1a64=16 hex digits" of the whole
 *                                 file ("none" without a validation file)
 *   model.shape                   layers, width, heads, vocabulary, positions
 *   model.fingerprint             pr_model_fingerprint of the base model
 *                                 (taken before training changes it)
 *   train.steps batch seq_len accum lr min_lr_ratio warmup schedule
 *         weight_decay decay_all clip beta1 beta2 eps head_lr_mult seed
 *         (keep_best, early_stop: only when on)
 *   trainable                     names of the trainable base tensors (count
 *                                 and a hash of the names)
 *   module.NAME                   technique@version, trainable, sites,
 *                                 layers, seed and every resolved option
 * The trainer adds what only it knows (labels: the classification label
 * count, params: the trainable element count).  Evaluation, logging and
 * checkpoint cadence, the output directory and progress display are left
 * out: they do not change the result. */
#ifndef PEFTREF_CORE_RUN_FINGERPRINT_H
#define PEFTREF_CORE_RUN_FINGERPRINT_H

#include <stddef.h>
#include "peftref/status.h"
#include "peftref/model.h"
#include "peftref/train.h"

typedef struct run_fp {
    int n, cap;
    char **key, **val;
} run_fp;

void run_fp_init(run_fp *f);
void run_fp_free(run_fp *f);
/* Add (or replace) key with a printf-formatted value. */
int run_fp_set(run_fp *f, const char *key, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;
/* The value of key, or NULL. */
const char *run_fp_get(const run_fp *f, const char *key);
/* key = "size=N fnv1a64=H" of path's whole contents (path NULL: "none"). */
int run_fp_add_file(run_fp *f, const char *key, const char *path, pr_error *err);
/* Everything above from m (before training) and cfg. */
int run_fp_of_run(run_fp *f, const pr_model *m, const pr_train_config *cfg, pr_error *err);
/* As a compact JSON object of strings, in order (caller frees); NULL when
 * out of memory. */
char *run_fp_json(const run_fp *f);
/* Parse run_fp_json's text; PR_ERR_FORMAT when it is not such an object. */
int run_fp_parse(const char *json, run_fp *f, pr_error *err);
/* Compare old (a checkpoint's) with now: returns the number of settings
 * that differ (a key present in only one counts, its missing value shown as
 * "(none)").  msg gets "lr 0.001 -> 10, train.steps 40 -> 80" (truncated to
 * len); *json (may be NULL; caller frees) {"lr": {"old": "0.001", "new": "10"}}. */
int run_fp_diff(const run_fp *old, const run_fp *now, char *msg, size_t len, char **json);

#endif
