/* peftref core: initialising a module's parameters: each copy from its decl's
 * init (or its init_option), deterministic in (seed, parameter name, copy),
 * then the scale(), init() and setup() callbacks. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "module_internal.h"
#include "host.h"
#include "peftref/tokenizer.h"

/* ---- initialisation ------------------------------------------------------------------------------ */

/* The init of a parameter: its decl's init, or the pr_init named by the
 * choice of its init_option (plugin.h) in the insertion's options. */
static int param_init(const pr_module *mod, const pr_param_decl *p, const pr_option_value *opts, int *init,
                      pr_error *err)
{
    static const char *const names[] = {
        [PR_INIT_ZEROS] = "zeros", [PR_INIT_ONES] = "ones", [PR_INIT_NORMAL] = "normal",
        [PR_INIT_UNIFORM] = "uniform", [PR_INIT_KAIMING_UNIFORM] = "kaiming_uniform",
        [PR_INIT_EMBED_ROWS] = "embed_rows", [PR_INIT_TEXT] = "text", [PR_INIT_CONSTANT] = "constant",
    };
    *init = p->init;
    if (!p->init_option)
        return PR_OK;
    int oi = mod_option_index(mod, p->init_option);
    if (oi < 0 || mod->opt[oi].type != PR_OPT_ENUM)
        return pr_errorf(err, PR_ERR_INVALID, "module '%s': parameter '%s': init_option '%s' is not an enum option",
                         mod_name(mod), p->name, p->init_option);
    const char *choice = opts[oi].str;
    for (int k = 0; k < (int)(sizeof names / sizeof names[0]); k++)
        if (names[k] && choice && strcmp(names[k], choice) == 0) {
            *init = k;
            return PR_OK;
        }
    return pr_errorf(err, PR_ERR_INVALID, "module '%s': parameter '%s': option '%s' = '%s' is not an init (zeros, ones, "
                     "normal, uniform, kaiming_uniform, embed_rows, text, constant)", mod_name(mod), p->name,
                     p->init_option, choice ? choice : "");
}

static int init_copy(pr_module *mod, const pr_module_spec *spec, param_copy *pc, pr_error *err)
{
    float *x = mod->params + pc->off;
    size_t n = (size_t)pc->numel;
    if (pc->decl < 0) { /* a gate: sigmoid(0) = 1/2 */
        x[0] = 0.0f;
        return PR_OK;
    }
    const pr_param_decl *p = &mod->pd[pc->decl];
    const insertion *in = &mod->ins[pc->first_ins];
    expr_var v[MAX_VARS];
    char e[256];
    int nv = mod_model_vars(mod, &in->dims, in->opts, v);
    double arg = 0.0;
    if (p->init_arg && expr_eval(p->init_arg, v, nv, &arg, e, sizeof e))
        return pr_errorf(err, PR_ERR_INVALID, "module '%s': parameter '%s' init_arg '%s': %s", mod_name(mod), p->name,
                         p->init_arg, e);
    const pr_host *h = host_services();
    uint64_t st = host_hash_str(mod->seed, p->name) ^ host_mix64((uint64_t)pc->ordinal + 1);
    int init, rc0 = param_init(mod, p, in->opts, &init, err);
    if (rc0)
        return rc0;
    switch (init) {
    case PR_INIT_ZEROS:
        memset(x, 0, n * sizeof(float));
        break;
    case PR_INIT_ONES:
    case PR_INIT_CONSTANT: {
        float val = init == PR_INIT_ONES ? 1.0f : (float)arg;
        for (size_t i = 0; i < n; i++)
            x[i] = val;
        break;
    }
    case PR_INIT_NORMAL:
        for (size_t i = 0; i < n; i++)
            x[i] = (float)arg * h->rng_normal(&st);
        break;
    case PR_INIT_UNIFORM:
    case PR_INIT_KAIMING_UNIFORM: {
        double b = arg;
        if (init == PR_INIT_KAIMING_UNIFORM) /* He et al. 2015, PyTorch's kaiming_uniform_ */
            b = sqrt(6.0 / ((1.0 + arg * arg) * (double)pc->shape[pc->ndim - 1]));
        for (size_t i = 0; i < n; i++)
            x[i] = (float)((2.0 * h->rng_uniform(&st) - 1.0) * b);
        break;
    }
    case PR_INIT_EMBED_ROWS:
    case PR_INIT_TEXT: {
        const pr_tensor_info *wte = model_token_embedding(mod->model);
        int C = in->dims.d_model, V = in->dims.vocab;
        if (!wte || !wte->data)
            return pr_errorf(err, PR_ERR_INVALID, "module '%s': parameter '%s' copies token embeddings, but the model has none",
                             mod_name(mod), p->name);
        if (pc->shape[pc->ndim - 1] != C)
            return pr_errorf(err, PR_ERR_INVALID,
                             "module '%s': parameter '%s' copies embedding rows, so its last dimension must be d_model = %d (got %lld)",
                             mod_name(mod), p->name, C, (long long)pc->shape[pc->ndim - 1]);
        size_t nrows = n / (size_t)C;
        int *ids = NULL;
        size_t n_ids = 0;
        if (init == PR_INIT_TEXT) {
            /* the declared text option (pr_param_decl.init_source) */
            const char *src = p->init_source;
            int oi = src ? mod_option_index(mod, src) : -1;
            const char *text = oi >= 0 ? in->opts[oi].str : NULL;
            if (!src)
                return pr_errorf(err, PR_ERR_INVALID, "module '%s': parameter '%s' is initialised from text but "
                                 "declares no init_source option", mod_name(mod), p->name);
            if (!text || !*text)
                return pr_errorf(err, PR_ERR_INVALID, "module '%s': parameter '%s' is initialised from text, but option "
                                 "'%s' is %s", mod_name(mod), p->name, src, oi < 0 ? "not declared" : "empty");
            if (!spec->tokenizer)
                return pr_errorf(err, PR_ERR_INVALID, "module '%s': parameter '%s' is initialised from text; a tokenizer is needed",
                                 mod_name(mod), p->name);
            int rc = pr_tokenizer_encode(spec->tokenizer, text, strlen(text), &ids, &n_ids, err);
            if (rc)
                return rc;
            if (n_ids == 0) {
                free(ids);
                return pr_errorf(err, PR_ERR_INVALID, "module '%s': %s '%s' encodes to no tokens", mod_name(mod), src, text);
            }
        }
        for (size_t r = 0; r < nrows; r++) {
            int id = ids ? ids[r % n_ids] : (int)(h->rng_next(&st) % (uint64_t)V);
            if (id < 0 || id >= V) {
                free(ids);
                return pr_errorf(err, PR_ERR_INVALID, "module '%s': text token id %d is outside the vocabulary [0, %d)",
                                 mod_name(mod), id, V);
            }
            memcpy(x + r * (size_t)C, wte->data + (size_t)id * C, (size_t)C * sizeof(float));
        }
        free(ids);
        break;
    }
    case PR_INIT_CUSTOM:
        break; /* the init() callback, after every other parameter */
    default:
        return pr_errorf(err, PR_ERR_INVALID, "module '%s': parameter '%s' has unknown init %d", mod_name(mod), p->name,
                         init);
    }
    return PR_OK;
}
int mod_init_params(pr_module *mod, const pr_module_spec *spec, pr_error *err)
{
    int rc;
    /* the scale() callback first: init() and setup() see ctx->scale */
    for (int k = 0; k < mod->n_ins && mod->t.scale; k++) {
        insertion *in = &mod->ins[k];
        pr_ctx c;
        if ((rc = mod_lend_scratch(in, err)))
            return rc;
        mod_ctx_init(in, &c, 0, 0, 0, 0);
        in->scale = mod->t.scale(&c);
        if (!isfinite(in->scale))
            return pr_errorf(err, PR_ERR_NUMERIC, "module '%s' at %s: scale() returned a non-finite value",
                             mod_name(mod), in->where);
    }
    for (int c = 0; c < mod->n_copies; c++)
        if ((rc = init_copy(mod, spec, &mod->copies[c], err)))
            return rc;
    /* init(): once per insertion that first uses a PR_INIT_CUSTOM copy */
    for (int k = 0; k < mod->n_ins; k++) {
        insertion *in = &mod->ins[k];
        int owns = 0;
        for (uint32_t i = 0; i < mod->t.n_params && !owns; i++)
            owns = mod->pd[i].init == PR_INIT_CUSTOM && mod->copies[in->copy[i]].first_ins == k;
        if (!owns)
            continue;
        pr_ctx c;
        if ((rc = mod_lend_scratch(in, err)))
            return rc;
        mod_ctx_init(in, &c, 0, 0, 0, UINT64_MAX - 1);
        if ((rc = mod_call(mod, in, mod->t.init, "init", &c, err)))
            return rc;
    }
    for (int k = 0; k < mod->n_ins && mod->t.setup; k++) {
        insertion *in = &mod->ins[k];
        pr_ctx c;
        if ((rc = mod_lend_scratch(in, err)))
            return rc;
        mod_ctx_init(in, &c, 0, 0, 0, UINT64_MAX - 2);
        if ((rc = mod_call(mod, in, mod->t.setup, "setup", &c, err)))
            return rc;
    }
    return PR_OK;
}

