/* peftref core: training checkpoints (resume a run exactly where it stopped).
 *
 * One safetensors file (core/io/safetensors.h), written atomically through
 * core/base/fileio.h: a failed or interrupted save leaves the previous file at
 * PATH untouched.  Contents, all F32:
 *
 *   param.<name>    each trainable tensor, in its own shape
 *   adam_m.<name>   AdamW first moment of that tensor, same shape
 *   adam_v.<name>   AdamW second moment, same shape
 *
 * and "__metadata__" strings:
 *
 *   format             "peftref.trainstate"
 *   format_version     "1"
 *   fingerprint        the caller's configuration hash; load refuses a
 *                      checkpoint whose fingerprint differs
 *   step               training steps completed (decimal)
 *   optim_t            optimizer step count t (decimal; with moments only)
 *   rng                the 256-bit generator state: four 16-digit hex words
 *                      separated by spaces, s[0] first
 *   data_epoch         data position: epoch, cursor within it (decimal)
 *   data_cursor
 *   data_shuffle_seed  the seed of the epoch's shuffle (16 hex digits)
 *
 * The module is generic: it sees named float arrays and a flat moment
 * block, not models, techniques or optimizers.  The moment block m (and
 * likewise v) holds the tensors' moments concatenated in the order of the
 * params array, which is the layout core/train/optim.h uses when its segments
 * are given in that same order. */
#ifndef PEFTREF_CORE_TRAINSTATE_H
#define PEFTREF_CORE_TRAINSTATE_H

#include <stddef.h>
#include <stdint.h>
#include "peftref/status.h"
#include "safetensors.h"

#define TRAINSTATE_FORMAT "peftref.trainstate"
#define TRAINSTATE_VERSION 1

/* A trainable tensor: n = product of shape (1 for ndim 0) floats at data. */
typedef struct trainstate_tensor {
    const char *name;
    float *data;
    size_t n;
    int ndim;
    int64_t shape[ST_MAX_DIMS];
} trainstate_tensor;

/* AdamW moments: n floats each, n = sum of the params' sizes. */
typedef struct trainstate_moments {
    float *m;
    float *v;
    size_t n;
    int64_t t;          /* optimizer step count */
} trainstate_moments;

/* Where the run is. */
typedef struct trainstate_progress {
    int64_t step;       /* training steps completed */
    uint64_t rng[4];    /* generator state (core/base/rng.h pr_rng.s) */
    int64_t epoch;      /* data position */
    int64_t cursor;
    uint64_t shuffle_seed;
} trainstate_progress;

/* Atomically write params, moments (may be NULL: none saved) and progress
 * to path, stamped with fingerprint.  Names must be unique and non-empty,
 * n must match the shape. */
int trainstate_save(const char *path, const char *fingerprint, const trainstate_tensor *params,
                    int n_params, const trainstate_moments *moments,
                    const trainstate_progress *progress, pr_error *err);

/* The same with n_extra more "__metadata__" strings (keys other than the
 * ones above). */
int trainstate_save_extra(const char *path, const char *fingerprint, const trainstate_tensor *params,
                          int n_params, const trainstate_moments *moments,
                          const trainstate_progress *progress, const st_kv *extra, int n_extra,
                          pr_error *err);

/* Read the metadata values of n keys of the checkpoint at path (the
 * fingerprint, the step, extra keys) into fresh strings (caller frees; NULL
 * for a key the file lacks) without checking anything but its format. */
int trainstate_read_meta(const char *path, const char *const *keys, char **values, int n, pr_error *err);

/* Read path into the caller's buffers.  Everything is validated before
 * anything is written: format and version, fingerprint (a mismatch names
 * the file and both fingerprints), every metadata field, every tensor's
 * presence, dtype and shape, and that the file holds no tensor the caller
 * did not ask for (missing and extra tensors are named).  On failure the
 * buffers are unchanged.  moments (may be NULL) gets m, v and t. */
int trainstate_load(const char *path, const char *fingerprint, const trainstate_tensor *params,
                    int n_params, trainstate_moments *moments, trainstate_progress *progress,
                    pr_error *err);

#endif
