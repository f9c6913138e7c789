/* peftref core: Hugging Face PEFT adapter directories (adapter_config.json
 * + adapter_model.safetensors) opened as saved modules (peft_adapter.c),
 * and the module-path knowledge the exporter shares with it. */
#ifndef PEFTREF_CORE_PEFT_ADAPTER_H
#define PEFTREF_CORE_PEFT_ADAPTER_H

#include <jansson.h>

#include <peftref/ext/peft_config.h>

#include "module_file.h"

/* 1 when path is a directory holding adapter_config.json. */
int peft_is_adapter_dir(const char *path);

/* Open the PEFT adapter directory dir as a saved module for a base model
 * of shape cfg: the technique, sites, layers and options come from
 * adapter_config.json under PEFT's matching rules, the tensors are
 * adapter_model.safetensors under PEFT's names.  flags:
 * PR_MODULE_FILE_ALLOW_UNKNOWN_FIELDS. */
int peft_adapter_open(const char *dir, const pr_registry *reg, const pr_model_config *cfg, unsigned flags,
                      pr_module_file **out, pr_error *err);

/* The Hugging Face module path (below the layer, e.g. "attn.c_attn",
 * "self_attn.q_proj") of a projection site, NULL when it has none. */
const char *peft_site_path(const pr_model_config *c, int site);
/* The base model as a technique's read() / write() sees it (peft_config.h). */
void peft_model_of(const pr_model_config *c, pr_peft_model *m);
/* "transformer.h" (GPT-2) or "model.layers" (LLaMA family): the blocks'
 * module list in the base model's own names. */
const char *peft_blocks_path(const pr_model_config *c);

/* A technique's PEFT variant (include/peftref/ext/peft_config.h), NULL when
 * it declares none. */
const pr_ext_peft_config *peft_technique_variant(const pr_technique *t);
/* The fields t implies as a new JSON object (empty when none), NULL when
 * its implies text is not a JSON object (the plugin validator refuses such
 * a technique). */
json_t *peft_technique_implies(const pr_technique *t);

#endif
