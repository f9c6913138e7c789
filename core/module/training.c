/* peftref core: what the training loop tells the modules and asks of them:
 * the step and the batch's sample indices (which key every module's
 * randomness), the per-step and after-backward callbacks, and the
 * auxiliary losses those callbacks report. */
#include <stdint.h>

#include "module_internal.h"

/* n_fwd is the step part of the per-call seed: step * 2^24 plus the calls
 * made within the step. */
static void module_set_step(pr_module *mod, uint64_t step)
{
    for (int k = 0; k < mod->n_ins; k++)
        mod->ins[k].n_fwd = step << 24;
    for (int i = 0; i < mod->n_members; i++)
        module_set_step(mod->members[i], step);
}

void pr_model_set_step(pr_model *m, uint64_t step)
{
    model_modules *e = model_modules_of(m);
    if (!e)
        return;
    e->step = step;
    for (int i = 0; i < e->n; i++)
        module_set_step(e->mods[i], step);
}

void pr_model_set_samples(pr_model *m, const int64_t *sample_index)
{
    model_modules *e = model_modules_of(m);
    if (e)
        e->samples = sample_index;
}

const int64_t *mod_samples(const pr_model *m)
{
    const model_modules *e = model_modules_of(m);
    return e ? e->samples : NULL;
}

/* One callback on every insertion of every module that has it. */
static int each_insertion(pr_model *m, int which, pr_error *err)
{
    model_modules *e = model_modules_of(m);
    for (int i = 0; e && i < e->n; i++) {
        pr_module *mod = e->mods[i];
        pr_callback cb = which ? mod->t.on_step : mod->t.after_backward;
        if (!cb || !mod->trainable)
            continue;
        for (int k = 0; k < mod->n_ins; k++) {
            pr_ctx c;
            int rc = mod_lend_scratch(&mod->ins[k], err);
            if (rc)
                return rc;
            mod_ctx_init(&mod->ins[k], &c, 0, 0, 1, e->step);
            c.step = (int64_t)e->step + which;
            rc = mod_call(mod, &mod->ins[k], cb, which ? "on_step" : "after_backward", &c, err);
            if (rc)
                return rc;
        }
    }
    return PR_OK;
}

int pr_model_after_backward(pr_model *m, pr_error *err)
{
    return each_insertion(m, 0, err);
}

int pr_model_after_step(pr_model *m, pr_error *err)
{
    return each_insertion(m, 1, err);
}

void mod_add_aux_loss(const pr_model *m, double value)
{
    model_modules *e = model_modules_of(m);
    if (e)
        e->aux_loss += value;
}

double pr_model_take_aux_loss(pr_model *m)
{
    model_modules *e = model_modules_of(m);
    if (!e)
        return 0.0;
    double v = e->aux_loss;
    e->aux_loss = 0.0;
    return v;
}
