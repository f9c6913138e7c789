/* peftref compare: the comparison table, its arms and its renderings.
 *
 * core/cli/cmd_compare.c loads the arms and runs each in its own child
 * process (core/cli/compare_run.c), filling one compare_row per arm
 * (rows[0] is the untrained base model); core/cli/compare_report.c
 * renders the table as aligned text, Markdown, CSV or JSON, and draws the
 * validation-loss curves as SVG. */
#ifndef PEFTREF_CLI_COMPARE_H
#define PEFTREF_CLI_COMPARE_H

#include <stdint.h>
#include <stdio.h>
#include "overhead.h"
#include "peftref/peftref.h"

typedef struct compare_point {
    int64_t step;
    double loss;
} compare_point;

typedef struct compare_row {
    char name[128];
    /* the arm's techniques joined by "+", or "none" */
    char techniques[256];
    int is_base;              /* the untrained base model, evaluated only */
    int ok;                   /* ran to the end */
    char error[1024];         /* why not, one line */
    /* from the plan (no model built) */
    int have_plan;
    int64_t trainable_plan;   /* as `peftref plan` counts it */
    int64_t all_params;       /* base + modules + classification head */
    overhead cost;
    /* from the child process */
    int have_result;
    int64_t trainable;        /* tensors the optimizer updated */
    int64_t steps;
    double seconds;           /* the child's wall time */
    double step_seconds;      /* in optimizer steps only */
    int64_t tokens;           /* trained on */
    double peak_mib;          /* VmHWM of the child process */
    double initial_val_loss, val_loss;
    double val_accuracy;      /* classification; < 0 for lm */
    compare_point *curve;     /* validation loss per evaluation */
    int n_curve;
} compare_row;

typedef struct compare_table {
    const char *const *pipelines;
    int n_pipelines;
    const char *task;         /* "lm" or "classification" */
    int steps, eval_every;
    compare_row *rows;
    int n_rows;
} compare_table;

typedef struct compare_arm {
    compare_row *row;
    const char *path;        /* its pipeline file */
    pr_pipeline *pipe;       /* NULL when it did not load */
    pr_train_config tc;      /* what the child trains with */
    char *out_dir;
} compare_arm;

/* Run arm a in a child process and fill its row.  Returns 1 when the
 * child was interrupted (SIGINT/SIGTERM). */
int compare_run_arm(compare_arm *a);

/* The evaluations in out_dir/metrics.jsonl as the row's curve. */
void compare_read_curve(compare_row *r, const char *out_dir);

enum { COMPARE_TEXT = 0, COMPARE_MARKDOWN = 1, COMPARE_CSV = 2, COMPARE_JSON = 3 };

/* "text", "markdown" (or "md"), "csv", "json" -> COMPARE_*; -1 otherwise. */
int compare_format_parse(const char *s);

/* The table in format fmt, in a fresh NUL-terminated string (NULL when
 * out of memory). */
char *compare_render(const compare_table *t, int fmt);

/* Every row's validation-loss curve on one plot (a dashed line for the
 * untrained base), as a standalone SVG document. */
char *compare_svg(const compare_table *t);

#endif
