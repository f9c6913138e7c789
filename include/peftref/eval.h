/* peftref: language-model evaluation on a token stream.
 *
 * With N tokens and window length T there are W = floor((N-1)/T) windows.
 * Window k covers tokens k*T .. k*T+T; its inputs are the first T and its
 * targets the last T.  loss is the mean cross-entropy in nats over the W*T
 * targets and perplexity = exp(loss).  N < T+1 is an error. */
#ifndef PEFTREF_EVAL_H
#define PEFTREF_EVAL_H

#include <stddef.h>
#include <stdint.h>
#include "peftref/status.h"
#include "peftref/model.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct pr_eval_result {
    double loss;
    double perplexity;
    int64_t tokens;    /* W*T scored targets */
    int64_t windows;   /* W */
} pr_eval_result;

/* batch: windows evaluated per forward (>= 1). */
int pr_eval_tokens(pr_model *m, const int *ids, size_t n, int T, int batch, pr_eval_result *res, pr_error *err);

#ifdef __cplusplus
}
#endif
#endif
