/* peftref: site names and the aliases users know from checkpoints. */
#include <string.h>

#include "peftref/site.h"

static const char *const site_names[PR_SITE_COUNT] = {
    [PR_SITE_EMBED] = "embed",
    [PR_SITE_QKV] = "qkv",
    [PR_SITE_Q] = "q",
    [PR_SITE_K] = "k",
    [PR_SITE_V] = "v",
    [PR_SITE_O] = "o",
    [PR_SITE_ATTN_K] = "attn.k",
    [PR_SITE_ATTN_V] = "attn.v",
    [PR_SITE_ATTN_OUT] = "attn_out",
    [PR_SITE_FFN_UP] = "ffn.up",
    [PR_SITE_FFN_GATE] = "ffn.gate",
    [PR_SITE_FFN_ACT] = "ffn.act",
    [PR_SITE_FFN_DOWN] = "ffn.down",
    [PR_SITE_FFN_OUT] = "ffn_out",
    [PR_SITE_BLOCK_OUT] = "block_out",
};

/* Module names of Hugging Face GPT-2 and LLaMA checkpoints.  A bare
 * "c_proj" is refused: GPT-2 has one in attention (o) and one in the MLP
 * (ffn.down), so the prefix must say which. */
static const struct { const char *alias; int site; } site_aliases[] = {
    { "wte", PR_SITE_EMBED },
    { "embeddings", PR_SITE_EMBED },
    { "embed_tokens", PR_SITE_EMBED },
    { "c_attn", PR_SITE_QKV },
    { "attn.c_attn", PR_SITE_QKV },
    { "attn.c_proj", PR_SITE_O },
    { "c_fc", PR_SITE_FFN_UP },
    { "mlp.c_fc", PR_SITE_FFN_UP },
    { "mlp.c_proj", PR_SITE_FFN_DOWN },
    { "q_proj", PR_SITE_Q },
    { "k_proj", PR_SITE_K },
    { "v_proj", PR_SITE_V },
    { "o_proj", PR_SITE_O },
    { "self_attn.q_proj", PR_SITE_Q },
    { "self_attn.k_proj", PR_SITE_K },
    { "self_attn.v_proj", PR_SITE_V },
    { "self_attn.o_proj", PR_SITE_O },
    { "up_proj", PR_SITE_FFN_UP },
    { "gate_proj", PR_SITE_FFN_GATE },
    { "down_proj", PR_SITE_FFN_DOWN },
    { "mlp.up_proj", PR_SITE_FFN_UP },
    { "mlp.gate_proj", PR_SITE_FFN_GATE },
    { "mlp.down_proj", PR_SITE_FFN_DOWN },
};

const char *pr_site_name(int site)
{
    if (site < 0 || site >= PR_SITE_COUNT)
        return "?";
    return site_names[site];
}

int pr_site_parse(const char *name)
{
    if (!name)
        return -1;
    for (int s = 0; s < PR_SITE_COUNT; s++)
        if (strcmp(name, site_names[s]) == 0)
            return s;
    for (size_t i = 0; i < sizeof site_aliases / sizeof site_aliases[0]; i++)
        if (strcmp(name, site_aliases[i].alias) == 0)
            return site_aliases[i].site;
    return -1;
}

int pr_site_is_projection(int site)
{
    switch (site) {
    case PR_SITE_QKV:
    case PR_SITE_Q:
    case PR_SITE_K:
    case PR_SITE_V:
    case PR_SITE_O:
    case PR_SITE_FFN_UP:
    case PR_SITE_FFN_GATE:
    case PR_SITE_FFN_DOWN:
        return 1;
    default:
        return 0;
    }
}

int pr_site_is_per_layer(int site)
{
    return site > PR_SITE_EMBED && site < PR_SITE_COUNT;
}
