/* peftref core: selection techniques (stage 1 of attach): the base
 * tensors a module makes trainable, by kind and workspace, in the chosen
 * layers; a model without any of those kinds refuses the module. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "module_internal.h"

/* ---- selection ------------------------------------------------------------------------------ */

/* Workspace of a base tensor, as its model family declares it. */
static uint32_t tensor_workspace(const pr_tensor_info *t)
{
    return t->kind == PR_TENSOR_MODULE ? 0 : t->workspace;
}

static uint32_t tensor_base_kind(const pr_tensor_info *t)
{
    switch (t->kind) {
    case PR_TENSOR_BIAS: return PR_BASE_BIAS;
    case PR_TENSOR_NORM_GAIN: return PR_BASE_NORM_GAIN;
    case PR_TENSOR_NORM_BIAS: return PR_BASE_NORM_BIAS;
    case PR_TENSOR_EMBEDDING: return PR_BASE_EMBEDDING;
    case PR_TENSOR_WEIGHT: return tensor_workspace(t) == PR_WS_EMBEDDING ? PR_BASE_EMBEDDING : PR_BASE_WEIGHT;
    default: return 0;
    }
}

static int layer_chosen(const pr_module *mod, int layer)
{
    if (layer < 0)
        return mod->layers_all;
    for (int i = 0; i < mod->n_layers; i++)
        if (mod->layers[i] == layer)
            return 1;
    return 0;
}

/* Base tensors a selection module makes trainable: kinds in select_kinds,
 * workspaces in workspace, per-layer tensors of the chosen layers, and
 * model-level tensors only when every layer is chosen.  Tensors that are
 * trainable already are left to their owner. */
int mod_resolve_selection(pr_module *mod, const pr_model *m, pr_error *err)
{
    if (!mod_is_select(mod) || !mod->trainable)
        return PR_OK;
    int n = pr_model_n_tensors(m);
    mod->selected = calloc((size_t)(n ? n : 1), sizeof *mod->selected);
    if (!mod->selected)
        return pr_errorf(err, PR_ERR_NOMEM, "module '%s': out of memory", mod_name(mod));
    for (int i = 0; i < n; i++) {
        const pr_tensor_info *t = pr_model_tensor(m, i);
        if (t->trainable || !(tensor_base_kind(t) & mod->t.select_kinds) ||
            !(tensor_workspace(t) & mod->t.workspace) || !layer_chosen(mod, t->layer))
            continue;
        mod->selected[mod->n_selected] = mod_dup_str(t->name);
        if (!mod->selected[mod->n_selected])
            return pr_errorf(err, PR_ERR_NOMEM, "module '%s': out of memory", mod_name(mod));
        mod->n_selected++;
        mod->base_selected += t->numel;
    }
    if (mod->n_selected == 0) {
        /* nothing left to select can mean another module owns it; a model
         * without such tensors at all (BitFit on LLaMA, which has no
         * biases) makes the technique meaningless here */
        int exist = 0;
        for (int i = 0; i < n && !exist; i++) {
            const pr_tensor_info *t = pr_model_tensor(m, i);
            exist = (tensor_base_kind(t) & mod->t.select_kinds) && (tensor_workspace(t) & mod->t.workspace) &&
                    layer_chosen(mod, t->layer);
        }
        if (!exist) {
            static const struct { uint32_t bit; const char *name; } kinds[] = {
                { PR_BASE_WEIGHT, "weights" }, { PR_BASE_BIAS, "biases" }, { PR_BASE_NORM_GAIN, "norm gains" },
                { PR_BASE_NORM_BIAS, "norm biases" }, { PR_BASE_EMBEDDING, "embeddings" },
            };
            char what[128] = "";
            for (size_t k = 0; k < sizeof kinds / sizeof kinds[0]; k++)
                if (mod->t.select_kinds & kinds[k].bit)
                    snprintf(what + strlen(what), sizeof what - strlen(what), "%s%s", what[0] ? " or " : "",
                             kinds[k].name);
            return pr_errorf(err, PR_ERR_UNSUPPORTED,
                             "module '%s': technique '%s' trains base %s, and this %s model has none in the "
                             "chosen layers and workspaces",
                             mod_name(mod), mod->t.name, what,
                             pr_model_get_config(m)->family == PR_FAMILY_LLAMA ? "LLaMA-family" : "GPT-2");
        }
    }
    return PR_OK;
}
