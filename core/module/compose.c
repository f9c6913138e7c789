/* peftref core: composition: the learned gates (UniPELT) of gated modules. */
#include <math.h>
#include <stdint.h>

#include "module_internal.h"

/* ---- composition: gates ----------------------------------------------------------------------- */

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

