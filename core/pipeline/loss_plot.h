/* peftref core: what a training run leaves besides its checkpoint and
 * modules: a plot of its loss curves. */
#ifndef PEFTREF_CORE_RUN_H
#define PEFTREF_CORE_RUN_H

#include "peftref/status.h"

/* Read metrics.jsonl (lines with "step" and "loss" or "val_loss") and write
 * an SVG plot of the training loss per step (a line) and the validation
 * loss (points), with axes, ticks, labels and a legend.  title is drawn
 * above the plot (escaped).  A file without loss lines gives a plot that
 * says so. */
int run_loss_svg(const char *metrics_path, const char *svg_path, const char *title, pr_error *err);

#endif
