/* peftref: YAML pipelines.
 *
 * A pipeline names a base model, the modules to attach to it (technique,
 * sites, layers, options), the task and its data, and the training
 * settings, in one YAML file (docs/pipeline.md documents every key).
 * Loading parses the file with libyaml, applies `--set key=value`
 * overrides, and validates everything it can without allocating a model:
 * keys, types, ranges, techniques and their options, sites, layers, data
 * files.  Every problem found is reported, not only the first, each as
 * one line
 *
 *     FILE:LINE:COL: message
 *
 * with 1-based line and column numbers (an override's problems are
 * reported as `--set:N:COL:`, N the override's 1-based position and COL
 * the column in its KEY=VALUE text).
 *
 * Data flows one way: pr_pipeline_load (validated plan) ->
 * pr_pipeline_build (model with modules attached) -> pr_train with
 * pr_pipeline_train_config. */
#ifndef PEFTREF_PIPELINE_H
#define PEFTREF_PIPELINE_H

#include <stddef.h>
#include <stdint.h>
#include "peftref/status.h"
#include "peftref/config.h"
#include "peftref/model.h"
#include "peftref/module.h"
#include "peftref/tokenizer.h"
#include "peftref/train.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct pr_pipeline pr_pipeline;

/* Called once per diagnostic line, in file order, before load returns. */
typedef void (*pr_pipeline_report_fn)(void *arg, const char *line);

/* Load and validate path.  overrides are "key.path=value" strings applied
 * in order before validation (the value is YAML: "4", "[q, v]",
 * "{r: 4}").  techniques come from reg, which must outlive the pipeline.
 * On failure err holds the diagnostics, one per line (as many whole lines
 * as fit, then a count of the rest); report, when given, receives every
 * line.  A model given by `path:` is loaded here (memory-mapped) to learn
 * its shape, and handed to pr_pipeline_build later. */
int pr_pipeline_load(const char *path, const char *const *overrides, int n_overrides, const pr_registry *reg,
                     pr_pipeline **out, pr_error *err);
int pr_pipeline_load_report(const char *path, const char *const *overrides, int n_overrides,
                            const pr_registry *reg, pr_pipeline **out, pr_pipeline_report_fn report, void *arg,
                            pr_error *err);
void pr_pipeline_free(pr_pipeline *p);

/* ---- what was loaded ---------------------------------------------------- */

typedef enum pr_pipeline_source {
    PR_PIPELINE_MODEL_PATH = 1,    /* a Hugging Face directory */
    PR_PIPELINE_MODEL_PRESET = 2,  /* a built-in shape, seeded random init */
    PR_PIPELINE_MODEL_CONFIG = 3   /* dimensions given inline, seeded random init */
} pr_pipeline_source;

const char *pr_pipeline_path(const pr_pipeline *p);
int pr_pipeline_model_source(const pr_pipeline *p);
/* The model directory (PATH) or preset name (PRESET); NULL for CONFIG. */
const char *pr_pipeline_model_name(const pr_pipeline *p);
/* The base model's shape (read from config.json for a directory). */
const pr_model_config *pr_pipeline_model_config(const pr_pipeline *p);
/* Tokenizer directory, or NULL for the byte tokenizer. */
const char *pr_pipeline_tokenizer_dir(const pr_pipeline *p);

int pr_pipeline_n_modules(const pr_pipeline *p);
/* The i-th module as pr_module_attach takes it (pointers stay valid while
 * p lives; tokenizer is NULL: pr_pipeline_build fills it). */
int pr_pipeline_module_spec(const pr_pipeline *p, int i, pr_module_spec *spec);
/* Where the module and its parameters would go, from the validated plan. */
const pr_module_plan *pr_pipeline_module_plan(const pr_pipeline *p, int i);
/* Layers chosen for module i: NULL with *n = the model's layer count for
 * every layer. */
const int *pr_pipeline_module_layers(const pr_pipeline *p, int i, int *n);

/* Parameter counts as Hugging Face PEFT's print_trainable_parameters
 * reports them.  all counts every distinct tensor once: the base model,
 * the modules' parameters, and for classification the head (C*K + K).
 * trainable is what the optimizer updates: module parameters marked
 * trainable, base elements selected by selection techniques, the head. */
typedef struct pr_pipeline_counts {
    int64_t base;           /* base-model parameters */
    int64_t modules;        /* parameters the modules own */
    int64_t head;           /* classification head, 0 for lm */
    int classes;            /* K, 0 for lm */
    int64_t all;
    int64_t trainable;
} pr_pipeline_counts;

/* Counts from the plan, without building the model.  For classification
 * the class count comes from the training labels (so the data and the
 * tokenizer are read). */
int pr_pipeline_counts_get(const pr_pipeline *p, pr_pipeline_counts *out, pr_error *err);

/* "trainable params: 294,912 || all params: 124,734,720 || trainable%: 0.2364" */
void pr_pipeline_format_counts(const pr_pipeline_counts *c, char *buf, size_t len);

/* ---- building and training ------------------------------------------------ */

/* Create (preset, config) or take the loaded (path) base model with every
 * base tensor frozen, open the tokenizer, and attach the modules in
 * pipeline order.  The caller frees *model and *tok. */
int pr_pipeline_build(pr_pipeline *p, pr_model **model, pr_tokenizer **tok, pr_error *err);

/* The task and train settings.  Strings point into p; cfg->head is p's
 * head (the one task.head names, trained in place by pr_train), and
 * keep_best saves into train.output/modules/best/ (docs/pipeline.md). */
void pr_pipeline_train_config(const pr_pipeline *p, pr_train_config *cfg);

/* The classification head: task.head's, or the one pr_train trained with
 * this pipeline's config; NULL when there is none. */
const pr_head *pr_pipeline_head(const pr_pipeline *p);

/* ---- compare arms (docs/pipeline.md, "Compare arms") ---------------------
 *
 * A top-level `compare:` section lists arms.  Each arm's `modules` replace
 * the file's, and its `set:` entries (dotted paths as for --set, limited to
 * modules.* and the optimisation keys of train) apply after the --set
 * overrides, which edit the file as written.  Every arm trains the same
 * base model on the same data with the same seed and budget.
 * pr_pipeline_load and pr_pipeline_load_report check the base pipeline and
 * every arm, reporting each problem once. */

#define PR_PIPELINE_BASE (-1)

/* Load path as arm `arm` (0-based) sees it, or with PR_PIPELINE_BASE the
 * base pipeline alone (arms named but not checked).  An arm's
 * train.output is the file's (or its default) followed by "/ARM_NAME". */
int pr_pipeline_load_arm(const char *path, int arm, const char *const *overrides, int n_overrides,
                         const pr_registry *reg, pr_pipeline **out, pr_pipeline_report_fn report, void *arg,
                         pr_error *err);

/* The arms of the file's compare section (0 without one), their names
 * (given, or the techniques joined by '+'), the index of a name (-1 when
 * none has it), and the arm p was loaded as (NULL for the base). */
int pr_pipeline_n_arms(const pr_pipeline *p);
const char *pr_pipeline_arm_name(const pr_pipeline *p, int i);
int pr_pipeline_find_arm(const pr_pipeline *p, const char *name);
const char *pr_pipeline_arm(const pr_pipeline *p);

/* compare.seeds: how many times each arm is trained (1 without it). */
int pr_pipeline_compare_seeds(const pr_pipeline *p);

/* Train into dir in place of train.output (and an arm's /NAME): where
 * the run's checkpoint, metrics and outputs go (peftref train --out). */
int pr_pipeline_set_output(pr_pipeline *p, const char *dir, pr_error *err);

/* compare.mpi_ranks: the MPI ranks each arm trains on (1 without it);
 * *where (may be NULL) gets the value's FILE:LINE:COL, or NULL when the
 * key is absent. */
int pr_pipeline_compare_mpi_ranks(const pr_pipeline *p, const char **where);

/* An arm's `sweep:` ({KEY: [VALUE, ...], ...}, keys as its set: takes)
 * is a grid of settings, the last key varying fastest: their number (1
 * without a sweep), each one's "KEY=VALUE, KEY=VALUE" text (NULL without
 * a sweep), and arm `arm` loaded at setting `point` (0-based; as
 * pr_pipeline_load_arm otherwise). */
int pr_pipeline_arm_points(const pr_pipeline *p, int i);
const char *pr_pipeline_arm_point_label(const pr_pipeline *p, int i, int point);
int pr_pipeline_load_arm_point(const char *path, int arm, int point, const char *const *overrides,
                               int n_overrides, const pr_registry *reg, pr_pipeline **out,
                               pr_pipeline_report_fn report, void *arg, pr_error *err);

/* ---- saved modules and run outputs (docs/pipeline.md, docs/modules.md) ---- */

/* The base model's pr_model_fingerprint, taken by pr_pipeline_build before
 * any module was attached (NULL before a build). */
const char *pr_pipeline_base_fingerprint(const pr_pipeline *p);

/* After training m (built from p): write train.output/modules/NAME.safetensors
 * for every module that was not loaded frozen (those are referenced, not
 * copied) and train.output/pipeline.yaml, the resolved pipeline with every
 * module loaded frozen, so that `peftref eval --pipeline RUN` reloads the
 * run.  res (may be NULL) gives the training summary saved with them. */
int pr_pipeline_save_run(const pr_pipeline *p, pr_model *m, const pr_train_result *res, pr_error *err);

#ifdef __cplusplus
}
#endif
#endif
