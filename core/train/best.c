/* peftref core: the best evaluation so far (see best.h). */
#include "config.h"

#include <math.h>
#include <string.h>

#include "best.h"

void best_init(best_tracker *b, const char *metric, double min_delta)
{
    memset(b, 0, sizeof *b);
    b->on = 1;
    b->higher = metric && strcmp(metric, "val_accuracy") == 0;
    b->min_delta = min_delta > 0 ? min_delta : 0.0;
    b->best = NAN;
    b->best_step = -1;
}

int best_update(best_tracker *b, int64_t step, double value)
{
    int better = isfinite(value) &&
                 (isnan(b->best) ||
                  (b->higher ? value > b->best + b->min_delta : value < b->best - b->min_delta));
    if (better) {
        b->best = value;
        b->best_step = step;
        b->bad = 0;
    } else {
        b->bad++;
    }
    return better;
}
