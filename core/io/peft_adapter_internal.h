/* peftref core: what the PEFT adapter reader's files share: peft_adapter.c
 * (the config's fields, PEFT's module matching, opening), peft_adapter_types.c
 * (LORA, IA3, the prompt types and the further weight types) and
 * peft_adapter_adalora.c (ADALORA).  Not installed. */
#ifndef PEFTREF_CORE_IO_PEFT_ADAPTER_INTERNAL_H
#define PEFTREF_CORE_IO_PEFT_ADAPTER_INTERNAL_H

#include <jansson.h>
#include <stdint.h>

#include "peft_adapter.h"

#define CONFIG_NAME "adapter_config.json"
#define WEIGHTS_NAME "adapter_model.safetensors"

typedef struct reader {
    const char *dir;
    json_t *root;
    const char *type;
    const char *tech;   /* the technique the adapter is read as (pa_resolve) */
    unsigned flags;
    pr_error *err;
    pr_module_file *f;
    json_t *implies;    /* the fields the technique implies */
} reader;

/* How a known field's value is checked. */
enum {
    F_INFO = 1,    /* informational, any value (names, versions, modes) */
    F_EMPTY,       /* only its default: absent, null, [] or {} */
    F_FALSE,       /* only false (or absent) */
    F_TRUE,        /* only true (or absent) */
    F_READ,        /* read by the type's own code */
    F_ZERO         /* only 0 (or absent) */
};

typedef struct cfg_field {
    const char *name;
    int check;
    const char *why;   /* F_EMPTY, F_FALSE, F_TRUE: what peftref does instead */
} cfg_field;

/* The further types (PEFT 0.17 to 0.20 field sets). */
#define TARGET_FIELDS                                                                                          \
    { "target_modules", F_READ, NULL }, { "exclude_modules", F_READ, NULL },                                  \
        { "layers_to_transform", F_READ, NULL }, { "layers_pattern", F_READ, NULL }

/* A module of the base model as Hugging Face names it. */
typedef struct hf_module {
    char name[160];
    int layer;           /* -1 outside the blocks */
    const char *path;    /* below the layer ("attn.c_attn"), or the whole name outside the blocks */
} hf_module;

#define NELEM(a) ((int)(sizeof(a) / sizeof((a)[0])))

/* What a matched module becomes: the site(s) of the technique class. */
typedef int (*site_of_fn)(reader *R, const pr_model_config *c, const hf_module *m, uint32_t *sites);

/* A *_pattern field giving a per-site option. */
typedef struct site_pattern {
    const char *field, *opt;
    double def;          /* the module's value */
    int integer;         /* the value must be a positive integer */
} site_pattern;

/* peft_adapter.c: the config's fields, PEFT's module matching, the tensors
 * against the base (each documented at its definition) */
int pa_bad_value(reader *R, const char *field, const json_t *v, const char *why);
int pa_check_fan_in_fan_out(reader *R, const pr_model_config *c);
int pa_check_fields(reader *R, const cfg_field *own, int n_own);
int pa_check_fields2(reader *R, const cfg_field *own, int n_own, const cfg_field *own2, int n_own2);
int pa_check_name_list(reader *R, const char *field, const json_t *v, int required);
int pa_check_tensors(reader *R, const pr_model_config *c);
const json_t *pa_get(const reader *R, const char *field);
int pa_get_bool(reader *R, const char *field, int *out);
int pa_get_int(reader *R, const char *field, int required, long long min, long long *out);
int pa_get_num(reader *R, const char *field, double def, double *out);
int pa_ia3_site_of(reader *R, const pr_model_config *c, const hf_module *m, uint32_t *sites);
int pa_is_empty(const json_t *v);
const char *pa_json_text(const json_t *v, char *buf, size_t len);
const char *pa_keep(pr_module_file *f, const char *s);
hf_module *pa_list_modules(const pr_model_config *c, int *n);
int pa_lora_site_of(reader *R, const pr_model_config *c, const hf_module *m, uint32_t *sites);
int pa_match_modules(reader *R, const pr_model_config *c, site_of_fn site_of,
                     const hf_module *mods, int n, unsigned char *matched, uint32_t *sites_out,
                     unsigned char *layers_out);
int pa_names_match(reader *R, const char *field, const json_t *v, const char *name);
int pa_pattern_value(reader *R, const char *field, const char *name, double *v);
int pa_push_num(reader *R, const char *name, double v, int site);
int pa_push_opt(reader *R, const char *name, const char *value, int site);
int pa_set_sites_layers(reader *R, const pr_model_config *c, uint32_t sites, const unsigned char *layers);
int pa_site_index(uint32_t bits);
/* peft_adapter_types.c */
int pa_check_bias(reader *R);
extern const cfg_field pa_lora_fields[];
extern const int pa_n_lora_fields;
int pa_num_field(reader *R, const char *field, double def, double min, double *out);
int pa_open_ia3(reader *R, const pr_model_config *c);
int pa_open_lora(reader *R, const pr_model_config *c);
int pa_open_prompt(reader *R, const pr_model_config *c, int prefix, int ptuning);
int pa_open_targets(reader *R, const pr_model_config *c, const site_pattern *pats, int n_pats);
/* peft_adapter_resolve.c: sets R->f->t, R->tech and R->implies from the
 * techniques declaring R->type. */
int pa_resolve(reader *R, const pr_registry *reg);
/* The value the technique read implies for field (peft_config.h), NULL when none. */
const json_t *pa_implied(const reader *R, const char *field);
int pa_open_trainable_tokens(reader *R, const pr_model_config *c);
int pa_open_weight_type(reader *R, const pr_model_config *c);
/* peft_adapter_adalora.c */
const char *pa_module_name_of(reader *R);
int pa_open_adalora(reader *R, const pr_model_config *c);

#endif
