/* peftref core: training data (see docs/data.md).
 *
 * A dataset is a list of examples, each a short run of token ids cut from
 * a plain text file or from JSON Lines records:
 *  - language modelling ("lm"): an example holds n <= T+1 tokens; its
 *    inputs are tokens[0..n-2] and its targets tokens[1..n-1].  The first
 *    n_prompt tokens are a prompt: the targets at positions
 *    0..n_prompt-2 are not scored (the prompt's last position predicts the
 *    first completion token and is scored);
 *  - sequence classification ("classification"): an example holds
 *    n <= T tokens, all inputs, and a label index into the dataset's
 *    label set.
 * Batches are right-padded rows of T positions; targets of padding and
 * prompt positions are -1.  A sampler orders examples by a per-epoch
 * shuffle derived from (seed, epoch) only, so (epoch, cursor) is the whole
 * state needed to resume. */
#ifndef PEFTREF_CORE_DATA_H
#define PEFTREF_CORE_DATA_H

#include <stddef.h>
#include <stdint.h>

#include "peftref/status.h"
#include "peftref/tokenizer.h"

typedef enum data_task { DATA_TASK_LM = 1, DATA_TASK_CLASSIFICATION = 2 } data_task;

/* A target that is not scored: padding, prompt positions, classification. */
#define DATA_IGNORE (-1)

typedef struct data_example {
    size_t off;     /* first token in the dataset's token array */
    int n;          /* tokens */
    int n_prompt;   /* lm: leading prompt tokens (0 for plain text) */
    int label;      /* classification: index into the label set; -1 for lm */
} data_example;

/* Classification labels.  String labels are the sorted unique strings of
 * the training file; integer labels are 0..K-1 as written, K = max + 1,
 * and their names are the decimal integers. */
typedef struct data_labels {
    int n;          /* K */
    int is_int;     /* labels were JSON integers */
    char **names;   /* K NUL-terminated names */
} data_labels;

typedef struct data_dataset {
    int task;             /* data_task */
    int seq_len;          /* T the dataset was cut for */
    int *tokens;          /* all examples' tokens, back to back */
    size_t n_tokens;
    data_example *ex;
    size_t n;             /* examples */
    data_labels labels;   /* classification only (n = 0 otherwise) */
    size_t n_records;     /* JSONL records read (1 for a text file) */
    size_t n_skipped;     /* records that gave nothing to score */
    size_t n_truncated;   /* records shortened to fit */
} data_dataset;

typedef struct data_options {
    /* classification: the label set examples must belong to (e.g. the
     * training set's, when loading validation data); NULL builds one */
    const data_labels *labels;
    /* classification with a given label set: a record may lack "label"
     * (its example's label is then -1), as inputs to predict do */
    int label_optional;
    /* lm JSONL: do not append the tokenizer's end-of-text id */
    int no_eot;
    /* largest file accepted, in bytes; 0 means 1 GiB */
    size_t max_bytes;
} data_options;

/* Load path as format "text", "jsonl" or "auto" (NULL = "auto": .jsonl
 * and .json are JSONL, anything else text) for task "lm" or
 * "classification" (NULL = "lm"), cut for sequences of seq_len positions.
 * options may be NULL.  On failure *ds is left empty and err names
 * file:line and the field. */
int data_load(const char *path, const char *format, const char *task, const pr_tokenizer *tok,
              int seq_len, const data_options *options, data_dataset *ds, pr_error *err);
void data_dataset_free(data_dataset *ds);

/* Copy of a label set (dst freed with data_labels_free). */
int data_labels_copy(data_labels *dst, const data_labels *src, pr_error *err);
void data_labels_free(data_labels *labels);

/* Split ds into disjoint train and val datasets (both fresh copies, ds is
 * unchanged).  round(n * val_fraction) examples, at least one, chosen by
 * a shuffle seeded with seed, go to val; each part keeps ds's order.
 * Needs 0 < val_fraction < 1 and at least two examples. */
int data_split(const data_dataset *ds, double val_fraction, uint64_t seed, data_dataset *train,
               data_dataset *val, pr_error *err);

/* Padding id for a tokenizer: its end-of-text id, else 0. */
int data_pad_id(const pr_tokenizer *tok);

/* Fill one batch from examples idx[0..n_idx-1] (n_idx <= B); rows
 * n_idx..B-1 are empty.  Outputs, row-major:
 *   tokens  (B,T)  example tokens, right-padded with pad_id
 *   targets (B,T)  lm: next token, DATA_IGNORE at prompt and padding
 *                  positions; classification: all DATA_IGNORE (may be NULL)
 *   lengths (B)    real (non-padding) positions of each row (may be NULL)
 *   labels  (B)    classification: label index; lm and empty rows: -1
 *                  (may be NULL)
 * An example with more positions than T is an error. */
int data_make_batch(const data_dataset *ds, const size_t *idx, int n_idx, int B, int T, int *tokens,
                    int *targets, int *lengths, int *labels, int pad_id, pr_error *err);

/* Scored targets of examples idx[0..n_idx-1] (idx NULL: the whole
 * dataset): lm counts the targets data_make_batch leaves >= 0,
 * classification counts one per example. */
int64_t data_count_scored(const data_dataset *ds, const size_t *idx, size_t n_idx);

/* Epoch-shuffled order over n examples. */
typedef struct data_sampler {
    size_t n;
    uint64_t seed;
    int shuffle;        /* 0: every epoch in file order */
    uint64_t epoch;
    size_t cursor;      /* next position in perm */
    size_t *perm;       /* this epoch's order */
} data_sampler;

int data_sampler_init(data_sampler *s, size_t n, uint64_t seed, int shuffle, pr_error *err);
void data_sampler_free(data_sampler *s);
/* Next B example indices; a batch that reaches the end of an epoch goes
 * on with the next epoch's order. */
void data_sampler_next(data_sampler *s, size_t *idx, int B);
/* The position (epoch, cursor) before the next batch. */
void data_sampler_get_position(const data_sampler *s, uint64_t *epoch, uint64_t *cursor);
/* Resume at a position from data_sampler_get_position (cursor <= n). */
int data_sampler_set_position(data_sampler *s, uint64_t epoch, uint64_t cursor, pr_error *err);

#endif
