/* peftref core: what the PEFT adapter reader's files share: peft_adapter.c
 * (the config's common fields, PEFT's module matching, opening),
 * peft_adapter_host.c (the services a technique's read() gets) and
 * peft_adapter_resolve.c (which technique reads an adapter).  Not installed. */
#ifndef PEFTREF_CORE_IO_PEFT_ADAPTER_INTERNAL_H
#define PEFTREF_CORE_IO_PEFT_ADAPTER_INTERNAL_H

#include <jansson.h>
#include <stdint.h>

#include "peft_adapter.h"

#define CONFIG_NAME "adapter_config.json"
#define WEIGHTS_NAME "adapter_model.safetensors"

/* An adapter being read: pr_peft_in of include/peftref/ext/peft_config.h. */
typedef struct pr_peft_in {
    const char *dir;
    json_t *root;
    const char *type;
    const char *tech;          /* the technique the module is (pa_resolve) */
    const pr_technique *decl;  /* the technique whose read() reads it (tech, or one that folds to it) */
    const pr_ext_peft_config *ext;   /* decl's peft-config extension */
    unsigned flags;
    pr_error *err;
    pr_module_file *f;
    const pr_model_config *c;
    json_t *implies;           /* the fields the technique implies */
    int replaced;              /* the tensors were replaced under peftref's names */
    pr_peft_model pm;
    char where[3][4096];       /* pr_peft_file */
    float **bufs;              /* tensor_data's buffers, freed with the reader */
    int n_bufs;
} reader;

typedef pr_peft_field cfg_field;

/* A module of the base model as Hugging Face names it. */
typedef struct hf_module {
    char name[160];
    int layer;           /* -1 outside the blocks */
    const char *path;    /* below the layer ("attn.c_attn"), or the whole name outside the blocks */
} hf_module;

#define NELEM(a) ((int)(sizeof(a) / sizeof((a)[0])))

/* peft_adapter.c: the config's fields, PEFT's module matching, the tensors
 * against the base (each documented at its definition) */
int pa_bad_value(reader *R, const char *field, const json_t *v, const char *why);
int pa_check_fan_in_fan_out(reader *R);
int pa_check_name_list(reader *R, const char *field, const json_t *v, int required);
int pa_is_empty(const json_t *v);
int pa_check_fields(reader *R, const cfg_field *own, int n_own);
int pa_check_tensors(reader *R);
const json_t *pa_get(const reader *R, const char *field);
int pa_get_bool(reader *R, const char *field, int def, int *out);
int pa_get_int(reader *R, const char *field, int required, long long min, long long *out);
int pa_get_num(reader *R, const char *field, double def, double min, double *out);
const char *pa_json_text(const json_t *v, char *buf, size_t len);
const char *pa_keep(pr_module_file *f, const char *s);
int pa_names_match(reader *R, const char *field, const json_t *v, const char *name);
int pa_match_targets(reader *R, pr_peft_site_of_fn site_of, const pr_peft_pattern *pats, int n_pats);
int pa_push_opt(reader *R, const char *name, const char *value, int site);
int pa_push_num(reader *R, const char *name, double v, int site);
const char *pa_module_name_of(reader *R);
/* peft_adapter_host.c: the pr_peft_reader table read() gets */
extern const pr_peft_reader pa_host;
int pa_replace_tensors(reader *R, const pr_peft_tensor *t, uint32_t n);
/* peft_adapter_resolve.c: sets R->f->t, R->tech, R->decl, R->ext and
 * R->implies from the techniques declaring R->type. */
int pa_resolve(reader *R, const pr_registry *reg);

#endif
