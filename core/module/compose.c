/* peftref core: composition: the step that keys module randomness, and the
 * learned gates (UniPELT) of gated modules. */
#include <math.h>
#include <stdint.h>

#include "module_internal.h"

/* ---- composition: gates and fusion ------------------------------------------------------------- */

/* n_fwd is the step part of call_seed(): step * 2^24 plus the calls made
 * within the step. */
static void module_set_step(pr_module *mod, uint64_t step)
{
    for (int k = 0; k < mod->n_ins; k++)
        mod->ins[k].n_fwd = step << 24;
    for (int i = 0; i < mod->n_kids; i++)
        module_set_step(mod->kids[i], step);
}

void pr_model_set_step(pr_model *m, uint64_t step)
{
    const model_modules *e = model_modules_of(m);
    for (int i = 0; e && i < e->n; i++)
        module_set_step(e->mods[i], step);
}

int pr_module_is_gated(const pr_module *mod)
{
    return mod ? mod->gated : 0;
}


static float sigmoid(float g)
{
    return 1.0f / (1.0f + expf(-g));
}

/* s = sigmoid(g) of the insertion's gate, 1 without one. */
float mod_gate_value(const insertion *in)
{
    return in->gate >= 0 ? sigmoid(in->mod->params[in->mod->copies[in->gate].off]) : 1.0f;
}

/* Where dL/dg accumulates; NULL without a gate or when it is frozen. */
float *mod_gate_grad(const insertion *in)
{
    if (in->gate < 0)
        return NULL;
    const param_copy *gc = &in->mod->copies[in->gate];
    return gc->trained ? in->mod->grads + gc->goff : NULL;
}

