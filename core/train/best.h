/* peftref core: the best evaluation so far, for train.keep_best and
 * train.early_stop (docs/pipeline.md, "Best modules and early stopping").
 *
 * An evaluation improves on the best when its metric is lower (val_loss)
 * or higher (val_accuracy) than the best by more than min_delta; the first
 * always does.  bad counts the evaluations since the last improvement:
 * early stopping stops when it reaches the patience. */
#ifndef PEFTREF_CORE_BEST_H
#define PEFTREF_CORE_BEST_H

#include <stdint.h>

typedef struct best_tracker {
    int on;
    int higher;        /* val_accuracy: higher is better */
    double min_delta;
    double best;       /* NAN before the first evaluation */
    int64_t best_step; /* -1 before it */
    int bad;
} best_tracker;

/* metric: "val_loss" (also NULL) or "val_accuracy". */
void best_init(best_tracker *b, const char *metric, double min_delta);
/* 1 when value (at step) improves on the best (and becomes it), else 0
 * (and bad grows).  A NaN never improves. */
int best_update(best_tracker *b, int64_t step, double value);

#endif
