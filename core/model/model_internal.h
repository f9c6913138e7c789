/* peftref core: what the checkpoint loader needs from the model. */
#ifndef PEFTREF_CORE_MODEL_INTERNAL_H
#define PEFTREF_CORE_MODEL_INTERNAL_H

#include <stddef.h>
#include "peftref/model.h"

/* Build the tensor table for cfg without base storage: every tensor's data
 * is NULL until model_set_tensor_data or model_alloc_storage. */
int model_create_empty(const pr_model_config *cfg, pr_model **out, pr_error *err);
/* Allocate one f32 block for every tensor whose data is still NULL. */
int model_alloc_storage(pr_model *m, pr_error *err);
/* Point tensor i at data (memory the model does not own, e.g. a mapping). */
void model_set_tensor_data(pr_model *m, int i, float *data);
/* Hand the model a mapping to munmap when it is freed. */
int model_adopt_mapping(pr_model *m, void *addr, size_t len, pr_error *err);
/* Random init (GPT-2 scheme) of every tensor from cfg->seed. */
void model_init_random(pr_model *m);

/* The modules attached to a model, in attach order: the model holds the
 * list, core/module/ fills it, and pr_model_detach_modules (which
 * pr_model_free calls first) empties and frees it. */
typedef struct model_modules {
    struct pr_module **mods;
    int n, cap;
} model_modules;
/* m's list; NULL for a NULL m. */
model_modules *model_modules_of(const pr_model *m);

#endif
