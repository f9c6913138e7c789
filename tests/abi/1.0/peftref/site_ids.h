/* peftref: the site identifiers, data only (no functions), so that the
 * plugin ABI (peftref/plugin.h) declares nothing a plugin cannot call.
 *
 * A site is where a PEFT module meets the frozen model (PEFT-Ref's
 * "workspace" refined to one tensor).  Sites are family-neutral: a GPT-2
 * model and a LLaMA model expose the same names; a site a family lacks
 * (ffn.gate in GPT-2) simply has no instance.
 *
 * Three kinds of site:
 *  - projection sites (qkv, q, k, v, o, ffn.up, ffn.gate, ffn.down): the
 *    module sees the projection input x (rows x d_in) and its output y
 *    (rows x d_out).  q, k and v of a fused-QKV model are column slices of
 *    the fused output, so y carries a row stride.
 *  - stream sites (embed, attn.k, attn.v, ffn.act, block_out): the module
 *    sees one hidden state; x is that state as it entered the site and y
 *    is the state it leaves with.
 *  - sub-layer sites (attn_out, ffn_out): y is the sub-layer's output
 *    before the residual add and x the sub-layer's input (the normalised
 *    hidden state entering attention or the FFN), so a sequential module
 *    (Houlsby adapter) transforms y while a parallel one (He et al. 2022's
 *    parallel adapter) adds f(x) to y.
 *
 * Stable in ABI 1: the values below never change; new sites are appended
 * before PR_SITE_COUNT (which therefore grows: never store it in a plugin
 * as a bound on what a host may send). */
#ifndef PEFTREF_SITE_IDS_H
#define PEFTREF_SITE_IDS_H

typedef enum pr_site {
    PR_SITE_EMBED = 0,     /* input embeddings (token + position), layer -1 */
    PR_SITE_QKV,           /* fused q,k,v projection; HF GPT-2: attn.c_attn */
    PR_SITE_Q,             /* query projection (slice of qkv when fused) */
    PR_SITE_K,             /* key projection */
    PR_SITE_V,             /* value projection */
    PR_SITE_O,             /* attention output projection; HF GPT-2: attn.c_proj */
    PR_SITE_ATTN_K,        /* keys entering the scores (after RoPE) */
    PR_SITE_ATTN_V,        /* values entering the weighted sum */
    PR_SITE_ATTN_OUT,      /* attention sub-layer output, before the residual add */
    PR_SITE_FFN_UP,        /* FFN up projection; HF GPT-2: mlp.c_fc */
    PR_SITE_FFN_GATE,      /* FFN gate projection (SwiGLU families) */
    PR_SITE_FFN_ACT,       /* FFN hidden activation, after the nonlinearity */
    PR_SITE_FFN_DOWN,      /* FFN down projection; HF GPT-2: mlp.c_proj */
    PR_SITE_FFN_OUT,       /* FFN sub-layer output, before the residual add */
    PR_SITE_BLOCK_OUT,     /* block output (residual stream after the block) */
    PR_SITE_COUNT
} pr_site;

/* Sites as a set: bit (1u << pr_site). */
#define PR_SITE_BIT(s) (1u << (unsigned)(s))

#endif
