/* peftref core: Hugging Face PEFT's names and layouts for a module's tensors.
 *
 * One placer for every technique: it reads what the technique declares
 * (pr_technique.peft_type, each parameter's peft_key and peft_layout,
 * plugin.h) and the parameter's scope and shape; the only model knowledge
 * here is where a site lives in Hugging Face's module tree, per family. */
#include "config.h"

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "module_file.h"
#include "peft_adapter.h"

/* ---- a technique's PEFT variant ------------------------------------------------------------ */

const pr_ext_peft_config *peft_technique_variant(const pr_technique *t)
{
    const pr_ext_peft_config *v = t && t->extension_data ? t->extension_data(PR_EXT_PEFT_CONFIG_URI) : NULL;
    return v && v->struct_size >= offsetof(pr_ext_peft_config, no_import) + sizeof v->no_import ? v : NULL;
}

json_t *peft_technique_implies(const pr_technique *t)
{
    const pr_ext_peft_config *v = peft_technique_variant(t);
    if (!v || !v->implies)
        return json_object();
    json_t *o = json_loads(v->implies, 0, NULL);
    if (o && !json_is_object(o)) {
        json_decref(o);
        o = NULL;
    }
    return o;
}

/* ---- the base model as a technique's PEFT codec sees it -------------------------------------- */

void peft_model_of(const pr_model_config *c, pr_peft_model *m)
{
    int gpt2 = c->family == PR_FAMILY_GPT2;
    memset(m, 0, sizeof *m);
    m->struct_size = sizeof *m;
    m->family = gpt2 ? "GPT-2" : "LLaMA-family";
    m->conv1d = gpt2;   /* transformers' Conv1D [in, out] projections */
    m->fused_qkv = (uint32_t)(c->fused_qkv != 0);
    m->tied_head = (uint32_t)(c->tied_head != 0);
    m->n_layers = c->n_layers;
    m->d_model = c->d_model;
    m->n_heads = c->n_heads;
    m->n_kv_heads = c->n_kv_heads;
    m->d_head = c->d_head;
    m->vocab_size = c->vocab_size;
    m->embed = gpt2 ? "transformer.wte" : "model.embed_tokens";
    m->layers_name = gpt2 ? "h" : "layers";
}

/* ---- Hugging Face module paths per model family ------------------------------------------- */

/* The module path of a projection site in Hugging Face's layout. */
const char *peft_site_path(const pr_model_config *c, int site)
{
    if (c->family == PR_FAMILY_GPT2) {
        switch (site) {
        case PR_SITE_QKV: return c->fused_qkv ? "attn.c_attn" : NULL;
        case PR_SITE_O: return "attn.c_proj";
        case PR_SITE_FFN_UP: return "mlp.c_fc";
        case PR_SITE_FFN_DOWN: return "mlp.c_proj";
        default: return NULL;
        }
    }
    switch (site) {
    case PR_SITE_Q: return "self_attn.q_proj";
    case PR_SITE_K: return "self_attn.k_proj";
    case PR_SITE_V: return "self_attn.v_proj";
    case PR_SITE_O: return "self_attn.o_proj";
    case PR_SITE_FFN_UP: return "mlp.up_proj";
    case PR_SITE_FFN_GATE: return "mlp.gate_proj";
    case PR_SITE_FFN_DOWN: return "mlp.down_proj";
    default: return NULL;
    }
}

const char *peft_blocks_path(const pr_model_config *c)
{
    return c->family == PR_FAMILY_GPT2 ? "transformer.h" : "model.layers";
}

/* The projection a stream site's values fold into (as the model's
 * site_weight has it): attn.k / attn.v the projection they come from, at
 * rows [offset, offset + d_kv) of its output (the k and v slices of a
 * fused q,k,v projection); ffn.act the down projection they go to, at its
 * input.  *width is that side's full width.  0 when the site folds into
 * nothing. */
static int hf_fold_target(const pr_model_config *c, int site, int *proj, int *input_side, int64_t *offset,
                          int64_t *width)
{
    int64_t d_q = (int64_t)c->n_heads * c->d_head, d_kv = (int64_t)c->n_kv_heads * c->d_head;
    int fused = c->family == PR_FAMILY_GPT2 && c->fused_qkv;
    *input_side = 0;
    *offset = 0;
    switch (site) {
    case PR_SITE_ATTN_K:
    case PR_SITE_ATTN_V:
        if (fused) {
            *proj = PR_SITE_QKV;
            *offset = d_q + (site == PR_SITE_ATTN_V ? d_kv : 0);
            *width = d_q + 2 * d_kv;
        } else {
            *proj = site == PR_SITE_ATTN_V ? PR_SITE_V : PR_SITE_K;
            *width = d_kv;
        }
        return 1;
    case PR_SITE_FFN_ACT:
        *proj = PR_SITE_FFN_DOWN;
        *input_side = 1;
        *width = c->d_ff;
        return 1;
    default:
        return 0;
    }
}

/* ---- the placer -------------------------------------------------------------------------------- */

/* key with {prefix}, {layer} and {embed} (the token embedding's module,
 * "base_model.model.transformer.wte" / "base_model.model.model.embed_tokens")
 * filled in; 0 when it does not fit or names another placeholder. */
static int expand_key(const char *key, const char *prefix, int layer, const pr_model_config *c, char *out,
                      size_t len)
{
    size_t n = 0;
    for (const char *k = key; *k;) {
        char num[16];
        const char *put;
        size_t plen;
        if (*k == '{') {
            if (!strncmp(k, "{prefix}", 8)) {
                put = prefix;
                k += 8;
            } else if (!strncmp(k, "{embed}", 7)) {
                put = c->family == PR_FAMILY_GPT2 ? "base_model.model.transformer.wte"
                                                  : "base_model.model.model.embed_tokens";
                k += 7;
            } else if (!strncmp(k, "{layer}", 7)) {
                snprintf(num, sizeof num, "%d", layer);
                put = num;
                k += 7;
            } else {
                return 0;
            }
            plen = strlen(put);
        } else {
            put = k++;
            plen = 1;
        }
        if (n + plen >= len)
            return 0;
        memcpy(out + n, put, plen);
        n += plen;
    }
    out[n] = '\0';
    return 1;
}

/* The declaration of p's parameter: among t's fold_params (fold: p is
 * fold() output) or its params. */
static int find_decl(const pr_technique *t, int fold, const char *name, pr_param_decl *d)
{
    const pr_param_decl *base = fold ? t->fold_params : t->params;
    uint32_t n = fold ? t->n_fold_params : t->n_params;
    for (uint32_t i = 0; i < n; i++) {
        mf_read_decl(d, sizeof *d, base, i);
        if (d->name && name && !strcmp(d->name, name))
            return 1;
    }
    return 0;
}

static int place(const pr_technique *t, int fold, const pr_module_param *p, const pr_model_config *c, int all_layers,
                 placement *pl)
{
    memset(pl, 0, sizeof *pl);
    pr_param_decl d;
    if (!t->peft_type || !find_decl(t, fold, p->param, &d) || !d.peft_key || p->ndim < 1 || p->ndim > 4)
        return 0;
    int layout = d.peft_layout ? d.peft_layout : PR_PEFT_AS_IS;
    int has_prefix = strstr(d.peft_key, "{prefix}") != NULL, has_layer = strstr(d.peft_key, "{layer}") != NULL;
    int per_layer = p->layer >= 0;
    /* which copies a key can name, one tensor each (or one for all, concatenated) */
    if (layout == PR_PEFT_LAYERS_CONCAT) {
        if (has_prefix || has_layer || p->scope != PR_SCOPE_LAYER || !per_layer || !all_layers)
            return 0;
    } else if (has_prefix) {
        if (p->scope != PR_SCOPE_INSERTION || !per_layer)
            return 0;
    } else if (has_layer) {
        if (p->scope != PR_SCOPE_LAYER || !per_layer)
            return 0;
    } else if (p->scope != PR_SCOPE_GLOBAL) {
        return 0;
    }
    /* the module path {prefix} names: the site's, or (FOLD_VECTOR) that of
     * the projection the site's values fold into */
    int site = p->site, input_side = 0;
    int64_t offset = 0, width = p->shape[0];
    if (layout == PR_PEFT_FOLD_VECTOR) {
        if (p->ndim != 1 || !has_prefix)
            return 0;
        if (!peft_site_path(c, site) && !hf_fold_target(c, site, &site, &input_side, &offset, &width))
            return 0;
        if (offset + p->shape[0] > width)
            return 0;
    }
    char prefix[160] = "";
    if (has_prefix) {
        const char *path = peft_site_path(c, site);
        if (!path)
            return 0;
        snprintf(prefix, sizeof prefix, "base_model.model.%s.%d.%s", peft_blocks_path(c), p->layer, path);
    }
    if (!expand_key(d.peft_key, prefix, p->layer, c, pl->name, sizeof pl->name))
        return 0;
    pl->fill = t->integration == PR_INTEGRATE_RESCALE ? 1.0f : 0.0f;
    pl->nb = 1;
    pl->ndim = 2;
    switch (layout) {
    case PR_PEFT_AS_IS:
        /* an N-D parameter (BOFT's boft_R (m, nb, b, b)) keeps its shape,
         * its elements in the same order: a (prod of the leading dims, last)
         * matrix to the copy */
        pl->ndim = p->ndim;
        pl->br = 1;
        for (int k = 0; k + 1 < p->ndim; k++)
            pl->br *= p->shape[k];
        pl->bc = p->ndim == 1 ? p->shape[0] : p->shape[p->ndim - 1];
        if (p->ndim == 1) {
            pl->br = p->shape[0];
            pl->bc = 1;
        }
        pl->shape[0] = pl->br;
        pl->shape[1] = pl->bc;
        for (int k = 0; k < p->ndim; k++)
            pl->full[k] = p->shape[k];
        return 1;
    case PR_PEFT_TRANSPOSED:
        if (p->ndim != 2)
            return 0;
        pl->transposed = 1;
        pl->br = p->shape[0];
        pl->bc = p->shape[1];
        pl->shape[0] = pl->bc;
        pl->shape[1] = pl->br;
        return 1;
    case PR_PEFT_LAYERS_CONCAT:
        /* (nb, br, bc) per layer -> (br, n_layers * nb * bc), layer l's block b
         * at columns (l nb + b) bc */
        pl->nb = p->ndim == 3 ? p->shape[0] : 1;
        pl->br = p->ndim >= 2 ? p->shape[p->ndim - 2] : 1;
        pl->bc = p->shape[p->ndim - 1];
        pl->shape[0] = pl->br;
        pl->shape[1] = (int64_t)c->n_layers * pl->nb * pl->bc;
        pl->c0 = (int64_t)p->layer * pl->nb * pl->bc;
        pl->cstep = pl->bc;
        return 1;
    case PR_PEFT_FOLD_VECTOR:
        if (input_side) {
            pl->shape[0] = 1;
            pl->shape[1] = width;
            pl->c0 = offset;
            pl->br = 1;
            pl->bc = p->shape[0];
        } else {
            pl->shape[0] = width;
            pl->shape[1] = 1;
            pl->r0 = offset;
            pl->br = p->shape[0];
            pl->bc = 1;
        }
        return 1;
    default:
        return 0;
    }
}

int peft_place(const pr_technique *t, int fold, const pr_module_param *p, const pr_model_config *c, int all_layers,
               placement *pl)
{
    if (!place(t, fold, p, c, all_layers, pl))
        return 0;
    if (pl->ndim <= 2) {
        pl->full[0] = pl->shape[0];
        pl->full[1] = pl->shape[1];
    }
    return 1;
}

/* Copy between a copy's values x (nb*br*bc) and the file tensor f (R, C). */
void peft_place_values(const placement *pl, float *f, float *x, int to_file)
{
    int64_t C = pl->shape[1];
    if (pl->transposed) {
        for (int64_t r = 0; r < pl->br; r++)
            for (int64_t k = 0; k < pl->bc; k++) {
                float *fe = f + (pl->r0 + k) * C + pl->c0 + r, *xe = x + r * pl->bc + k;
                if (to_file)
                    *fe = *xe;
                else
                    *xe = *fe;
            }
        return;
    }
    for (int64_t b = 0; b < pl->nb; b++)
        for (int64_t r = 0; r < pl->br; r++) {
            float *fr = f + (pl->r0 + r) * C + pl->c0 + b * pl->cstep;
            float *xr = x + (b * pl->br + r) * pl->bc;
            if (to_file)
                memcpy(fr, xr, (size_t)pl->bc * sizeof(float));
            else
                memcpy(xr, fr, (size_t)pl->bc * sizeof(float));
        }
}
