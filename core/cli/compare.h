/* peftref compare: the comparison table, its arms and its renderings.
 *
 * core/cli/cmd_compare.c loads the arms and runs each in its own child
 * process (core/cli/compare_run.c), filling one compare_row per arm
 * (rows[0] is the untrained base model); core/cli/compare_report.c
 * renders the table as aligned text, Markdown, CSV or JSON, and draws the
 * validation-loss curves as SVG. */
#ifndef PEFTREF_CLI_COMPARE_H
#define PEFTREF_CLI_COMPARE_H

#include <jansson.h>
#include <stdint.h>
#include <signal.h>
#include <stdio.h>
#include "overhead.h"
#include "peftref/peftref.h"

typedef struct compare_point {
    int64_t step;
    double loss;              /* the mean over seeds */
    double lo, hi;            /* the lowest and highest seed's */
} compare_point;

/* A figure over the seeds of one setting: mean, sample standard deviation
 * (n - 1 in the denominator; 0 for n = 1) and how many seeds gave it. */
typedef struct compare_stat {
    double mean, sd;
    int n;
} compare_stat;

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
    int64_t steps_timed;      /* steps in step_seconds (fewer than steps after a resume) */
    int reused;               /* a finished run of an earlier compare, not trained again */
    double calib_seconds;     /* the load probe timed just before this run (compare_calibrate) */
    /* over seeds (compare_aggregate); n = 0 when not aggregated */
    compare_stat s_loss, s_metric, s_ms, s_tps, s_peak;
    int seeds;                /* seeds asked for */
    char setting[512];        /* the chosen setting of a sweep, "" without one */
} compare_row;

typedef struct compare_table {
    const char *const *pipelines;
    int n_pipelines;
    const char *task;         /* "lm" or "classification" */
    int steps, eval_every;
    compare_row *rows;
    int n_rows;
    int wide;                 /* text: every column (else the essential ones, within 100 columns) */
    int seeds;                /* seeds per arm */
    double calib_lo, calib_hi; /* the fastest and slowest load probe; 0 when not measured */
} compare_table;

/* A finished run's fingerprint and result, in its directory, for --resume. */
#define COMPARE_RESULT_FILE "compare_result.json"

typedef struct compare_arm {
    compare_row *row;
    const char *path;        /* its pipeline file */
    pr_pipeline *pipe;       /* NULL when it did not load */
    pr_train_config tc;      /* what the child trains with */
    char *out_dir;
    int resume;              /* reuse a finished run whose fingerprint matches, else continue its checkpoint */
    int arm_index;           /* in its file's compare section; -1: the file is the arm */
    /* compare.mpi_ranks > 1: the child runs `mpirun -np mpi_ranks peftref
     * train path [--arm arm_name [--arm-setting arm_point]] --set sets...
     * --set seed_set` instead of training in-process */
    int mpi_ranks;
    const char *arm_name;    /* NULL when the file is the arm */
    int arm_point;           /* the setting of its sweep */
    const char *const *sets; /* the compare's --set overrides */
    int n_sets;
    char seed_set[64];       /* "train.seed=S" of seed index > 0, else "" */
} compare_arm;

/* What `peftref train --result-json` leaves for a compare_arm with
 * mpi_ranks > 1, in the run's directory. */
#define COMPARE_MPI_RESULT_FILE "mpi_result.json"

/* ---- loading (compare_load.c) ---- */

typedef struct compare_list {
    compare_arm *arms;       /* arms[0]: the untrained base */
    int n_arms, cap_arms;
    compare_row *rows;       /* parallel to arms */
} compare_list;

/* Diagnostics of a pipeline that does not load: printed as they come
 * (unless quiet), the first few kept for the table (compare_collect is a
 * pr_pipeline_report_fn). */
typedef struct compare_diags {
    char text[1024];
    int n;
    int quiet;
} compare_diags;
void compare_collect(void *arg, const char *line);
void compare_sink_finish(compare_diags *s, const pr_error *err);

/* Every arm of files (rows[0] the base, to fill); 1 when nothing can be
 * compared, -1 out of memory. */
int compare_load_arms(compare_list *R, char **files, int n_files, const char *const *sets, int n_sets,
                      const pr_registry *reg, int quiet);
void compare_warn_shadowed(const compare_list *R, const pr_registry *reg);
/* Returns 1 with what differs in why when p does not train ref's base
 * model on its data with its seed and budget. */
int compare_budget_differs(const pr_pipeline *ref, const pr_pipeline *p, char *why, size_t len);
/* "lora+bitfit", or "none". */
void compare_technique_list(const pr_pipeline *p, char *buf, size_t len);
int compare_make_dirs(const char *dir);
void compare_remove_tree(const char *dir);

/* Run arm a in a child process and fill its row.  Returns 1 when the
 * child was interrupted (SIGINT/SIGTERM). */
int compare_run_arm(compare_arm *a);

/* 1 when an arm can train under mpirun (peftref built with MPI, the
 * launcher, mpirun or $PEFTREF_MPIRUN, on PATH); else 0 with why. */
int compare_mpi_available(char *why, size_t len);

/* The result a run reports, as the compare child sends it over its pipe
 * (rc, error, interrupted, complete, steps, steps_timed, step_seconds,
 * tokens, trainable, initial_val_loss, val_loss, val_accuracy, peak_kib)
 * plus ranks and peak_kib_all_ranks: `peftref train --result-json FILE`
 * writes it (rank 0, with its own peak memory as peak_kib).  A fresh
 * string, NULL when out of memory. */
char *compare_result_json(int rc, const char *msg, const pr_train_result *res, long peak_kib, int ranks,
                          double peak_kib_sum);
/* VmHWM of this process in KiB (ru_maxrss where /proc is missing). */
long compare_peak_kib(void);

/* The evaluations in out_dir/metrics.jsonl as the row's curve. */
void compare_read_curve(compare_row *r, const char *out_dir);

/* Forward SIGINT and SIGTERM received by this process to the arm's child
 * while one runs (install once; *flag is set too). */
void compare_signals_install(volatile sig_atomic_t *flag);
void compare_signals_restore(void);

/* Seconds a fixed small matrix-product loop takes now: timed before each
 * run, so that a change of machine load between arms shows. */
double compare_calibrate(void);

/* Seed index i of an arm: train.seed + 1000003 * i (mod 2^63), so seed 0
 * is train.seed itself. */
uint64_t compare_seed(uint64_t train_seed, int i);

/* ---- statistics over seeds, sweeps (compare_stats.c) ---- */

/* dst from runs[0..n) (the seeds of one setting): the plan and the
 * statistics of the runs that finished; ok when all did (else the first
 * failure, "seed K: REASON"); the curve is the mean per step with the
 * seeds' range. */
void compare_aggregate(compare_row *dst, compare_row *const *runs, int n, int cls);
/* The best of rows[0..n) on validation: lowest mean val loss, or for
 * classification highest mean accuracy, ties broken by val loss; -1 when
 * none finished. */
int compare_pick_best(const compare_row *rows, int n, int cls);
/* An arm's sweep as a table: one row per setting (labels[i]), the chosen
 * one marked; fmt COMPARE_MARKDOWN, COMPARE_CSV or COMPARE_JSON. */
char *compare_sweep_render(const char *arm, const compare_row *rows, const char *const *labels, int n, int best,
                           int cls, int fmt);

enum { COMPARE_TEXT = 0, COMPARE_MARKDOWN = 1, COMPARE_CSV = 2, COMPARE_JSON = 3 };

/* "text", "markdown" (or "md"), "csv", "json" -> COMPARE_*; -1 otherwise. */
int compare_format_parse(const char *s);

/* The table in format fmt, in a fresh NUL-terminated string (NULL when
 * out of memory). */
char *compare_render(const compare_table *t, int fmt);

/* Every row's validation-loss curve on one plot (a dashed line for the
 * untrained base), as a standalone SVG document. */
char *compare_svg(const compare_table *t);


/* ---- the runs of one comparison (compare_units.c, for cmd_compare.c) --------
 * compare_group: an arm's runs (settings x seeds), their rows and per-setting points;
 * the run directories, the sweep tables and the JSON rows MPI ranks
 * exchange (each function documented at its definition). */
typedef struct compare_group {
    compare_arm *units;
    compare_row *rows;        /* the runs' own rows */
    compare_row *points;      /* per setting, over its seeds */
    int n_points, n_seeds, best;
} compare_group;

int compare_collective(int rc, int *agreed);
void compare_empty_row(compare_row *r, const compare_row *like);
int compare_holds_comparison(const char *out);
double compare_num_of(const json_t *o, const char *key, double def);
int compare_prepare_unit(compare_arm *u, int is_base, int eval_every, int progress, int resume, const char *dir,
                         int mine);
json_t *compare_row_result_json(int unit, const compare_row *r);
void compare_row_result_read(compare_row *r, const json_t *o);
char *compare_unit_dir(const char *arms_root, const char *name, const compare_group *g, int pt, int s);
int compare_write_file(const char *dir, const char *name, const char *text);
int compare_write_sweep(const char *out, const compare_arm *a, const compare_group *g, int cls);

#endif
