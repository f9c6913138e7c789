/* peftref core: the training loop's progress report on stderr
 * (progress.c), as the loop in train.c drives it.  Not installed.
 *
 * PLAIN writes a log line every log_every steps and one per evaluation.
 * BAR redraws one line in place ("\r", then ESC[K to erase the rest of the
 * line) at most ten times a second, no wider than the terminal, and ends it
 * with a newline before anything else is written (a message, an error, the
 * caller's results), so the bar never mixes with other output. */
#ifndef PEFTREF_CORE_PROGRESS_H
#define PEFTREF_CORE_PROGRESS_H

#include <stdint.h>

#include "peftref/train.h"

typedef struct progress {
    int mode;              /* PR_PROGRESS_BAR, _PLAIN or _NONE, resolved */
    int total;             /* steps */
    int is_cls;
    int drawn;             /* a bar line is on screen and not yet ended */
    double t_start;        /* this session's start (a resumed run starts late) */
    double t_drawn;
    int64_t step_start;
    double loss, val, acc; /* latest; NAN until known */
} progress;

/* Resolve cfg's progress mode (quiet, auto) for a run of cfg->steps steps
 * resuming at step; is_cls: report accuracy with validation losses. */
void train_progress_init(progress *pg, const pr_train_config *cfg, int is_cls, int64_t step);
/* After a training step: a plain log line when one is due, or the bar. */
void train_progress_step(progress *pg, const pr_train_config *cfg, int64_t step, double loss, float lr, double norm,
                         double tps_window, int64_t tokens, double now);
/* After an evaluation. */
void train_progress_eval(progress *pg, int64_t step, double vloss, double vacc, int64_t tokens, double now);
/* End a drawn bar's line, so what follows starts on a fresh one. */
void train_progress_end_line(progress *pg);

#endif
