/* peftref command-line interface: one function per subcommand.  Each gets
 * argv with argv[0] = the subcommand name and returns the process exit
 * status: 0 success, 1 failure, 2 usage error. */
#ifndef PEFTREF_CLI_H
#define PEFTREF_CLI_H

#include <stddef.h>
#include <stdio.h>
#include "peftref/peftref.h"
#include "peftref/module.h"
#include "peftref/pipeline.h"

int cmd_eval(int argc, char **argv);
/* `peftref predict`, and eval's classification scores (cmd_predict.c). */
int cmd_predict(int argc, char **argv);
int cli_eval_classification(const char *arg, pr_pipeline *p, pr_model *m, pr_tokenizer *tok, const char *data,
                            int T, int batch, int json);
int cmd_tokenize(int argc, char **argv);
int cmd_train(int argc, char **argv);
int cmd_plugins(int argc, char **argv);
/* `peftref typology` (core/cli/cmd_typology.c). */
int cmd_typology(int argc, char **argv);
/* `peftref plugins check` (core/cli/cmd_check.c), dispatched by cmd_plugins. */
int cmd_plugins_check(int argc, char **argv);
int cmd_plan(int argc, char **argv);
/* `peftref compare` (core/cli/cmd_compare.c). */
int cmd_compare(int argc, char **argv);
/* `peftref merge` and `peftref generate` (core/cli/cmd_merge.c, cmd_generate.c). */
int cmd_merge(int argc, char **argv);
/* `peftref export` (core/cli/cmd_export.c; writers export_peft.c, export_gguf.c). */
int cmd_export(int argc, char **argv);
int cmd_generate(int argc, char **argv);

/* Pipelines (core/cli/cmd_plan.c): open the plugin registry and load path
 * with the --set overrides, printing every diagnostic line to stderr. */
int cli_pipeline_open(const char *cmd, const char *path, const char *const *sets, int n_sets,
                      pr_registry **reg, pr_pipeline **pipe);
/* The Hugging Face PEFT parameter line of a loaded pipeline, to out. */
int cli_pipeline_print_counts(const char *cmd, const pr_pipeline *pipe, FILE *out);
/* 1 when s names a pipeline file (ends in .yaml or .yml). */
int cli_is_pipeline(const char *s);
/* As cli_pipeline_open; with arm (a name), the pipeline as that arm of the
 * file's compare section sees it (after checking the whole file). */
int cli_pipeline_open_arm(const char *cmd, const char *path, const char *const *sets, int n_sets, const char *arm,
                          pr_registry **reg, pr_pipeline **pipe);
/* "a, b, c" from a pipeline's arm names, to buf. */
void cli_arm_list(const pr_pipeline *pipe, char *buf, size_t len);
/* A pipeline named as a file, or a run directory RUN standing for
 * RUN/pipeline.yaml (what peftref train writes): the file's path in buf,
 * or NULL when arg is neither. */
const char *cli_pipeline_file(const char *arg, char *buf, size_t len);
/* Load (as cli_pipeline_open) and build a pipeline given as a file or run
 * directory: the model with its modules and the tokenizer.  Returns the
 * exit status; on failure everything is freed. */
int cli_pipeline_build(const char *cmd, const char *arg, const char *const *sets, int n_sets, pr_registry **reg,
                       pr_pipeline **pipe, pr_model **m, pr_tokenizer **tok);

/* Technique name was offered by more than one plugin file: one line per
 * later file to stderr, "peftref CMD: warning: technique 'NAME' is
 * provided by both A and B; using A" (nothing when it was offered once). */
void cli_warn_shadowed(const char *cmd, const pr_registry *reg, const char *name);
/* cli_warn_shadowed for each technique the modules of pipe use, once each. */
void cli_warn_shadowed_pipeline(const char *cmd, const pr_registry *reg, const pr_pipeline *pipe);

/* Read a whole file ("-" = stdin).  *data is NUL-terminated (free() it). */
int cli_read_file(const char *path, char **data, size_t *len, pr_error *err);
/* --precision's value (pr_precision) for command cmd, or -1 after printing
 * why not (an unknown name, or bf16 in a build without oneDNN). */
int cli_parse_precision(const char *cmd, const char *s);
/* Print `peftref runtime`'s bf16 lines (oneDNN version, ISA, a measured product). */
void cli_runtime_bf16(void);
/* Parse a positive int option value; prints a usage error naming opt. */
int cli_parse_int(const char *cmd, const char *opt, const char *s, int min, int max, int *out);
/* Load a model: a Hugging Face directory or a named preset (random init). */
int cli_load_model(const char *dir, const char *preset, long long seed, pr_model **m, pr_error *err);
/* Open the tokenizer for a model directory, or the byte tokenizer when dir
 * is NULL and the preset's vocabulary is 256. */
int cli_load_tokenizer(const char *dir, const pr_model *m, pr_tokenizer **tok, pr_error *err);

/* The technique's parameter sharing as a set (sharing_set, else {sharing}):
 * words[v - 1] names pr_sharing value v, joined with ", ". */
void cli_sharing_text(const pr_technique *t, const char *const *words, int n_words, char *buf, size_t len);

#endif
