/* peftref host extension "embed-tokens": the token ids and the frozen token
 * embedding at the embed site.
 *
 * Plugin ABI 1 gives an embed-site callback the embedded rows (ctx->in,
 * ctx->out) but not the token ids they came from, nor the token embedding
 * table (ctx->base_weight is NULL at stream sites).  A technique that works
 * on chosen vocabulary rows (Hugging Face PEFT's TRAINABLE_TOKENS) asks the
 * host for them by URI:
 *
 *     const pr_ext_embed_tokens *e = host->extension_data(PR_EXT_EMBED_TOKENS_URI);
 *
 * NULL means the host does not offer the interface; otherwise check
 * e->struct_size against the offset of a member before using a member added
 * after the first two (the struct only grows, at its end).
 *
 * This header adds nothing to ABI 1's frozen structs; it includes only
 * <peftref/plugin.h>.  License: MIT */
#ifndef PEFTREF_EXT_EMBED_TOKENS_H
#define PEFTREF_EXT_EMBED_TOKENS_H

#include <stdint.h>

#include <peftref/plugin.h>

#ifdef __cplusplus
extern "C" {
#endif

#define PR_EXT_EMBED_TOKENS_URI "urn:peftref:ext:embed-tokens:1"

typedef struct pr_ext_embed_tokens {
    uint32_t struct_size; /* sizeof(pr_ext_embed_tokens) of the host that filled it */
    /* ids[r] (r < ctx->rows) = the token id that row r of this call's
     * embed-site tensors (ctx->in, ctx->out, ctx->d_out) was embedded from,
     * in the rows' order (sequence b's positions t at r = b*ctx->T + t), or
     * -1 at a virtual position (prompt-tuning rows prepended at the embed
     * site come first in every sequence).  Valid in forward, backward,
     * integrate_forward and integrate_backward at PR_SITE_EMBED during a
     * model step (training, evaluation and generation alike).  Returns 0,
     * or non-zero (ids untouched) when the call has no token ids: another
     * site, or a call outside a step (init, setup, merge, fold, on_step). */
    int (*token_ids)(const struct pr_ctx *ctx, int32_t *ids);
    /* dst (d_model floats) = row `id` (0 <= id < ctx->dims->vocab) of the
     * model's frozen token embedding (GPT-2's wte, LLaMA's embed_tokens),
     * in f32 whatever its storage.  Valid in any callback of a module
     * attached to a model (init included).  Returns 0, or non-zero for an
     * id out of range or a call with no model. */
    int (*token_row_f32)(const struct pr_ctx *ctx, int64_t id, float *dst);
} pr_ext_embed_tokens;

#ifdef __cplusplus
}
#endif
#endif
