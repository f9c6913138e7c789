/* peftref export --format peft: what export_peft.c (the run, the tensors,
 * LORA and the writing) and export_peft_types.c (the further PEFT types'
 * adapter_config.json and AdaLoRA's tensors) share. */
#ifndef PEFTREF_CLI_EXPORT_PEFT_H
#define PEFTREF_CLI_EXPORT_PEFT_H

#include <jansson.h>
#include <stdint.h>

#include "peftref/module.h"
#include "peftref/pipeline.h"
#include "safetensors.h"

/* print "peftref export: ..." and a newline; evaluates to 1 (an exit status) */
#define ERR(...) (fprintf(stderr, "peftref export: " __VA_ARGS__), fputc('\n', stderr), 1)

/* the run and its module */
typedef struct job {
    pr_registry *reg;
    pr_pipeline *pipe;
    pr_model *m;
    pr_tokenizer *tok;
    pr_module *mod;
    const pr_technique *t;
    const pr_model_config *cfg;
} job;

typedef struct tensor_out {
    char name[256];
    int ndim;
    int64_t shape[4];
    float *data;
} tensor_out;

typedef struct adapter {
    tensor_out *t;
    int n;
    st_file *st;             /* the module as saved (PEFT names) */
} adapter;

double xp_opt_num(const job *j, const char *name, int site, double def);
const char *xp_opt_str(const job *j, const char *name);
json_t *xp_site_names(const job *j, uint32_t sites, int lora_kind);
void xp_set_layers(const job *j, json_t *c);
json_t *xp_num_json(double v);
tensor_out *xp_add_tensor(adapter *a, const char *name, int ndim, const int64_t *shape);
tensor_out *xp_find_tensor(adapter *a, const char *name);
int xp_lora_config(const job *j, json_t *c, int doubled);
int xp_lycoris_config(const job *j, json_t *c, const adapter *a, int lokr);
int xp_vera_config(const job *j, json_t *c);
int xp_oft_config(const job *j, json_t *c);
int xp_boft_config(const job *j, json_t *c);
int xp_hra_config(const job *j, json_t *c);
int xp_fourierft_config(const job *j, json_t *c);
int xp_trainable_tokens_config(const job *j, json_t *c);
int xp_ia3_config(const job *j, json_t *c);
void xp_prompt_config(const job *j, json_t *c, int prefix, int ptuning);
int xp_adalora_tensors(job *j, adapter *a, json_t *c);
int xp_adalora_config(const job *j, json_t *c);

#endif
