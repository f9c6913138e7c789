/* peftref: what the files of core/pipeline/ share (private to them).
 *
 * A pipeline loads in three stages (docs/pipeline.md):
 *   yaml_tree.c    YAML text -> a tree of ynodes, each keeping its 1-based
 *                  line and column;
 *   overrides.c    `--set key.path=value` edits that tree (nodes located
 *                  "--set:N:COL"), as arms.c does for an arm's set:;
 *   schema.c, modules.c, saved_modules.c, arms.c
 *                  the validator walks the tree against the schema into a
 *                  pr_pipeline, collecting every problem in a loader's
 *                  diags (diagnostics.c) instead of stopping at the first;
 * pipeline.c drives the stages and owns the pr_pipeline; build.c and
 * run_outputs.c turn a loaded one into a model and a run's files. */
#ifndef PEFTREF_PIPELINE_INTERNAL_H
#define PEFTREF_PIPELINE_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

#include "peftref/peftref.h"

/* ---- the YAML tree (yaml_tree.c) ------------------------------------------ */

enum { Y_SCALAR = 1, Y_SEQ = 2, Y_MAP = 3 };

/* Limits on a pipeline file, which is outside input (docs/security.md,
 * "Limits on outside input").  The tree is built with aliases expanded
 * (an alias is a copy of its anchor's node), so a few hundred bytes of
 * aliases of aliases ("billion laughs") could ask for billions of nodes:
 * the builder counts the nodes, scalar bytes and depth each alias would
 * add and refuses it, before copying, when the expanded tree would pass
 * one of these.  Each limit applies to one parse: the file, or one --set
 * value. */
#define PL_YAML_MAX_BYTES ((size_t)1 << 20)          /* the pipeline file: 1 MiB */
#define PL_YAML_MAX_NODES 100000                     /* nodes of the expanded tree */
#define PL_YAML_MAX_TEXT ((size_t)4 << 20)           /* scalar bytes of the expanded tree: 4 MiB */
#define PL_YAML_MAX_DEPTH 64                         /* nesting, the top-level mapping at depth 0 */
/* Each compare arm is checked as a copy of the whole tree, so the arms
 * multiply the tree's size: at most this many (at most 12.8 million nodes
 * copied in all). */
#define PL_MAX_ARMS 128
#define PL_MAX_SEEDS 100   /* compare.seeds */
#define PL_MAX_MPI_RANKS 4096   /* compare.mpi_ranks */

typedef struct ynode {
    int kind;
    char *text;            /* scalar value */
    int plain;             /* an unquoted scalar (may be null, a number, a bool) */
    const char *src;       /* file name, or "--set" */
    int line, col;         /* 1-based */
    int n, cap;
    struct ynode **keys;   /* map: key scalars, parallel to vals */
    struct ynode **vals;   /* map values, list items */
} ynode;

void pl_ynode_free(ynode *n);
ynode *pl_ynode_new(int kind, const char *src, int line, int col);
ynode *pl_ynode_scalar(const char *text, int plain, const char *src, int line, int col);
/* Append (key, val) to a map or val to a list; takes ownership. */
int pl_ynode_push(ynode *n, ynode *key, ynode *val);
ynode *pl_ynode_copy(const ynode *s);
/* The index of key in map m, or -1 (also when m is not a map). */
int pl_map_find(const ynode *m, const char *key);
const ynode *pl_map_get(const ynode *m, const char *key);
void pl_map_remove(ynode *m, int i);
/* YAML's null: an empty or ~/null plain scalar. */
int pl_is_null(const ynode *n);

/* ---- diagnostics (diagnostics.c) ------------------------------------------ */

typedef struct diag {
    int rank;      /* 0: the file, 1: an override, 2: no location */
    int line, col, seq;
    char *text;
} diag;

typedef struct diags {
    diag *v;
    int n, cap;
    int oom;
} diags;

/* The src of every node and diagnostic an override makes: compared by
 * address, it ranks those diagnostics after the file's. */
extern const char pl_set_src[];

__attribute__((format(printf, 3, 4))) void pl_diag_at(diags *d, const ynode *at, const char *fmt, ...);
/* At an explicit location (col may point inside a scalar). */
__attribute__((format(printf, 5, 6))) void pl_diag_loc(diags *d, const char *src, int line, int col,
                                                       const char *fmt, ...);
void pl_diags_free(diags *d);
/* Sort d (the file's first, by position, then the overrides', then those
 * without a location), hand each to report and fill err with as many as
 * fit. */
void pl_report_all(diags *d, pr_pipeline_report_fn report, void *arg, pr_error *err);
/* " (did you mean 'x'?)" or "": the closest of names[0..n) to s. */
void pl_hint(char *buf, size_t len, const char *s, const char *const *names, int n);

/* Parse one YAML document from text (len bytes) located at src, its line
 * numbers counted from line_base and columns after col_base (a file: 1, 0;
 * an override: its ordinal, the column before its value).  *root is NULL
 * for an empty stream.  Returns -1 after reporting a syntax error. */
int pl_parse_yaml(const char *text, size_t len, const char *src, int line_base, int col_base, diags *d,
                  ynode **root);

/* ---- the pipeline (pipeline.c) -------------------------------------------- */

typedef struct pipe_module {
    const char *name;
    const pr_technique *t;
    uint32_t sites;              /* 0: the technique's defaults */
    int *layers;                 /* NULL: every layer */
    int n_layers;
    pr_option_setting *opts;
    int n_opts;
    int trainable;
    uint64_t seed;
    int has_seed;
    pr_module_plan plan;
    int planned;
    char where[300];             /* "FILE:LINE:COL" of the module */
    /* a saved module (load:) or the mean of several (average:) */
    int kind;                    /* MOD_TECHNIQUE, MOD_LOAD, MOD_AVERAGE */
    int mode;                    /* MODE_FROZEN, MODE_CONTINUE, MODE_NEW */
    int force;                   /* accept another base model */
    pr_module_file **files;
    int n_files;
    double *weights;             /* average: normalised to sum 1 */
    const char *base_name;       /* default name: the saved module's */
    int gate;                    /* gate: true (docs/pipeline.md, "Composition") */
    const char *composite_load;  /* fuse: the composite's trained weights to start from (load:) */
} pipe_module;

/* MOD_FUSE: `fuse: [FILE, ...]`, the files frozen and combined by a composite module */
enum { MOD_TECHNIQUE = 0, MOD_LOAD = 1, MOD_AVERAGE = 2, MOD_FUSE = 3 };
enum { MODE_FROZEN = 1, MODE_CONTINUE = 2, MODE_NEW = 3 };

struct pr_pipeline {
    char *path;
    char **strs;                 /* every string the pipeline hands out */
    int n_strs, cap_strs;
    int source;
    const char *model_name;      /* directory or preset name */
    const char *tok_dir;
    pr_model_config cfg;
    int have_cfg;
    pr_model *loaded;            /* a `path:` model, until build takes it */
    char model_where[300];
    pipe_module *mods;
    int n_mods;
    pr_train_config tc;
    const pr_registry *reg;
    const char **arm_names;      /* compare.arms, in order (strings kept in strs) */
    int n_arms;
    const char *arm;             /* the arm applied, or NULL for the base */
    int compare_seeds;           /* compare.seeds (1 without it) */
    int compare_mpi_ranks;       /* compare.mpi_ranks (1 without it) */
    char compare_mpi_ranks_at[320]; /* FILE:LINE:COL of its value, "" without it */
    int *arm_n_points;           /* per arm: settings of its sweep (1 without one) */
    const char ***arm_labels;    /* per arm: "KEY=VALUE, ..." of each setting (NULL without a sweep) */
    char base_fp[64];            /* pr_model_fingerprint of the base, set by build */
    pr_head head;                /* classification: the head task.head names, then the trained one */
    const char *head_path;       /* task.head as resolved, or NULL */
    pr_model *built;             /* the model build made (not owned), which keep_best saves */
};

/* Point p->tc at p's head and keep_best's saver (run_outputs.c). */
void pl_tc_init(pr_pipeline *p);

/* A copy of s that lives as long as p (NULL when out of memory). */
const char *pl_keep(pr_pipeline *p, const char *s);

/* ---- validation (schema.c) ------------------------------------------------ */

typedef struct loader {
    pr_pipeline *p;
    diags d;
    const pr_registry *reg;
    char *dir;                 /* the YAML file's directory */
    pr_model *shape;           /* tensor table only (or the loaded model), for site checks */
    int shape_owned;
    int oom;
    const char *mod_prefix;    /* "compare.arms.N." while checking an arm's modules */
} loader;

/* Each reads node n at path (e.g. "train.steps") or reports why not and
 * returns -1. */
void pl_got(char *buf, size_t len, const ynode *n);
int pl_want_scalar(loader *L, const ynode *n, const char *path, const char *what);
int pl_want_map(loader *L, const ynode *n, const char *path);
int pl_parse_ll(const char *s, long long *out);
int pl_get_int(loader *L, const ynode *n, const char *path, long long lo, long long hi, long long *out);
/* lo_open / hi_open: exclusive bounds. */
int pl_get_float(loader *L, const ynode *n, const char *path, double lo, int lo_open, double hi, int hi_open,
                 double *out);
/* true/yes/on, false/no/off (any case) -> 1, 0; -1 otherwise. */
int pl_text_bool(const char *s, int *out);
int pl_get_bool(loader *L, const ynode *n, const char *path, int *out);
int pl_get_string(loader *L, const ynode *n, const char *path, const char **out);
int pl_get_choice(loader *L, const ynode *n, const char *path, const char *const *choices, int n_choices,
                  const char **out);
/* Report keys of map not in known[]. */
void pl_check_keys(loader *L, const ynode *map, const char *path, const char *const *known, int n_known);
const char *pl_resolve_path(loader *L, const ynode *n, const char *s);
void pl_check_exists(loader *L, const ynode *n, const char *path, const char *resolved, int dir);

void pl_load_model(loader *L, const ynode *m);
void pl_load_train(loader *L, const ynode *t);
void pl_load_task(loader *L, const ynode *t);
void pl_check_metrics(loader *L, const ynode *root);

/* ---- modules (modules.c, saved_modules.c) --------------------------------- */

/* A module or arm name: not empty, no '/', spaces or control characters. */
int pl_name_ok(const char *s);
void pl_fill_spec(const pr_pipeline *p, const pipe_module *pm, pr_module_spec *s);
void pl_load_modules(loader *L, const ynode *list);
/* Entries of the modules list made from saved module files, at path
 * ("modules.N"); *name_node is set to an explicit, valid name: key. */
int pl_load_saved(loader *L, const ynode *m, const char *path, pipe_module *pm, const ynode **name_node);
int pl_load_module_options(loader *L, const ynode *n, const char *path, pipe_module *pm);
int pl_load_fuse(loader *L, const ynode *m, const char *path, pipe_module *pm, const ynode **name_node);
void pl_plan_fuse(loader *L, const ynode *at, pipe_module *pm);

/* ---- overrides (overrides.c) ---------------------------------------------- */

void pl_apply_path(loader *L, ynode **root, const char *text, size_t klen, const char *value_text, ynode *val,
                   const char *src, int line, int col0);
/* Override number ordinal, "KEY=VALUE", applied to *root. */
void pl_apply_override(loader *L, ynode **root, const char *text, int ordinal);

/* ---- compare arms (arms.c) ------------------------------------------------ */

const ynode *pl_load_compare(loader *L, const ynode *c, int **ok);
/* The tree of arm (a compare.arms item) at setting point of its sweep
 * (0 without one). */
ynode *pl_arm_tree(loader *L, const ynode *root, const ynode *arm, int point);
/* The number of settings of arm's sweep (1 without one; 0 when malformed). */
int pl_arm_points(const ynode *arm);

#endif
