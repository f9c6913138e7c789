/* peftref core: config.json of Hugging Face checkpoints (hf_config.c). */
#ifndef PEFTREF_CORE_IO_HF_CONFIG_H
#define PEFTREF_CORE_IO_HF_CONFIG_H

#include <jansson.h>
#include "peftref/config.h"

/* cfg from a parsed config.json (path names it in messages); the family
 * follows model_type.  cfg still needs pr_config_validate. */
int hf_parse_config(const json_t *root, const char *path, pr_model_config *cfg, pr_error *err);
/* The config.json object of cfg (new reference), or NULL with err set. */
json_t *hf_config_json(const pr_model_config *cfg, pr_error *err);

#endif
