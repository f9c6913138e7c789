/* peftref core: Hugging Face PEFT's names and layouts for a module's tensors, by
 * technique name; replaceable whole. */
#include "config.h"

#include <jansson.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "module_file.h"

/* ---- Hugging Face PEFT names ----------------------------------------------------------------- */

/* The module path of a projection site in Hugging Face's layout. */
static const char *hf_site_path(const pr_model_config *c, int site)
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

static const char *hf_layer_prefix(const pr_model_config *c)
{
    return c->family == PR_FAMILY_GPT2 ? "base_model.model.transformer.h" : "base_model.model.model.layers";
}

/* PEFT's peft_type for the technique, or NULL when PEFT lacks it. */
const char *peft_type(const char *technique)
{
    if (!strcmp(technique, "lora") || !strcmp(technique, "dora"))
        return "LORA";
    if (!strcmp(technique, "ia3"))
        return "IA3";
    if (!strcmp(technique, "prompt_tuning"))
        return "PROMPT_TUNING";
    if (!strcmp(technique, "prefix_tuning") || !strcmp(technique, "prefix_tuning_mlp"))
        return "PREFIX_TUNING";
    return NULL;
}

static void one_block(placement *pl, const pr_module_param *p)
{
    pl->ndim = p->ndim == 1 ? 1 : 2;
    pl->shape[0] = p->shape[0];
    pl->shape[1] = p->ndim == 1 ? 1 : p->shape[1];
    pl->nb = 1;
    pl->br = pl->shape[0];
    pl->bc = pl->shape[1];
}

/* Where copy p of a module of technique tech goes in PEFT's layout; 0 when
 * PEFT has no name for it.  all_layers: the module uses every layer. */
int peft_place(const char *tech, const pr_module_param *p, const pr_model_config *c, int all_layers,
                      placement *pl)
{
    memset(pl, 0, sizeof *pl);
    const char *type = peft_type(tech);
    if (!type || p->ndim < 1 || p->ndim > 3)
        return 0;
    int d_kv = c->n_kv_heads * c->d_head, d_q = c->n_heads * c->d_head;
    if (!strcmp(type, "LORA")) {
        const char *path = hf_site_path(c, p->site);
        if (!path || p->layer < 0 || p->scope != PR_SCOPE_INSERTION)
            return 0;
        const char *suffix;
        if (!strcmp(p->param, "lora_A") && p->ndim == 2)
            suffix = "lora_A.weight";
        else if (!strcmp(p->param, "lora_B") && p->ndim == 2)
            suffix = "lora_B.weight";
        else if (!strcmp(p->param, "lora_magnitude_vector") && p->ndim == 1)
            suffix = "lora_magnitude_vector";
        else
            return 0;
        snprintf(pl->name, sizeof pl->name, "%s.%d.%s.%s", hf_layer_prefix(c), p->layer, path, suffix);
        one_block(pl, p);
        return 1;
    }
    if (!strcmp(type, "IA3")) {
        if (strcmp(p->param, "ia3_l") || p->ndim != 1 || p->layer < 0 || p->scope != PR_SCOPE_INSERTION)
            return 0;
        const char *path;
        pl->ndim = 2;
        pl->nb = 1;
        pl->fill = 1.0f;
        if (p->site == PR_SITE_FFN_ACT) {
            /* PEFT's feed-forward form: (1, in_features) at the down projection */
            path = c->family == PR_FAMILY_GPT2 ? "mlp.c_proj" : "mlp.down_proj";
            pl->shape[0] = 1;
            pl->shape[1] = p->shape[0];
            pl->br = 1;
            pl->bc = p->shape[0];
        } else if (p->site == PR_SITE_ATTN_K || p->site == PR_SITE_ATTN_V) {
            int is_v = p->site == PR_SITE_ATTN_V;
            if (c->family == PR_FAMILY_GPT2) {
                if (!c->fused_qkv)
                    return 0;
                path = "attn.c_attn";
                pl->shape[0] = d_q + 2 * d_kv;
                pl->r0 = d_q + (is_v ? d_kv : 0);
            } else {
                path = is_v ? "self_attn.v_proj" : "self_attn.k_proj";
                pl->shape[0] = d_kv;
            }
            pl->shape[1] = 1;
            pl->br = p->shape[0];
            pl->bc = 1;
        } else {
            return 0;
        }
        snprintf(pl->name, sizeof pl->name, "%s.%d.%s.ia3_l", hf_layer_prefix(c), p->layer, path);
        return 1;
    }
    if (!strcmp(type, "PROMPT_TUNING")) {
        if (p->ndim != 2 || p->scope != PR_SCOPE_GLOBAL)
            return 0;
        snprintf(pl->name, sizeof pl->name, "prompt_embeddings");
        one_block(pl, p);
        return 1;
    }
    /* PREFIX_TUNING: (2, n, d_kv) per layer, every layer */
    if (!all_layers || p->ndim != 3 || p->shape[0] != 2 || p->shape[2] != d_kv || p->layer < 0 ||
        p->scope != PR_SCOPE_LAYER)
        return 0;
    snprintf(pl->name, sizeof pl->name, "prompt_embeddings");
    pl->ndim = 2;
    pl->shape[0] = p->shape[1];
    pl->shape[1] = (int64_t)2 * c->n_layers * d_kv;
    pl->c0 = (int64_t)2 * p->layer * d_kv;
    pl->cstep = d_kv;
    pl->nb = 2;
    pl->br = p->shape[1];
    pl->bc = d_kv;
    return 1;
}

/* Copy between a copy's values x (nb*br*bc) and the file tensor f (R, C). */
void peft_place_values(const placement *pl, float *f, float *x, int to_file)
{
    int64_t C = pl->shape[1];
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
