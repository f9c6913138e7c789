/* peftref core: the forward and backward passes, whatever the family.
 *
 * embed -> [embed hooks] -> block 0 .. L-1, each followed by its block_out
 * site -> final norm -> LM head -> cross-entropy; backward is the same
 * path in reverse.  The blocks and the final norm are the family's
 * (family.h); the embedding, the head and every site outside a block are
 * the frame's.
 *
 * Positions: with prefix keys and values (prefix tuning) of length P the
 * sequence's positions start at P, where Hugging Face places tokens after
 * a past_key_values cache of that length (model_position_offset).
 *
 * Virtual positions (prompt tuning, Lester et al. 2021): with nv vectors
 * prepended at the embedding site every sequence runs on T = nv + Tr
 * positions, Tr of them real tokens.  Inside the blocks T is that internal
 * length; tokens, targets, logits and the loss cover the Nr = B*Tr real
 * rows only, gathered from the final norm's output.  The LM head reads
 * the token table (tied) or its own (V,C) weight as nn.Linear [out, in]. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "family.h"
#include "kernels.h"

/* Embeddings of T = nv + Tr positions per sequence, out (B,T,C): virtual
 * position p is the providers' vector p plus wpe[p], real token t is
 * wte[token] + wpe[nv + t] (the order Hugging Face PEFT uses for GPT-2). */
static int embed_forward(pr_model *m, pr_error *err)
{
    const pr_model_config *c = &m->cfg;
    int B = m->B, T = m->T, Tr = m->Tr, nv = m->nv, C = c->d_model;
    const float *wpe = data_of(m->wpe);
    if (wpe)
        wpe += (size_t)model_position_offset(m) * C;
    if (nv == 0) {
        model_encoder_forward(m, m->encoded, m->tokens, wpe, B, T, C);
        return PR_OK;
    }
    int rc = model_concat_forward(m, PR_SITE_EMBED, -1, m->vrows, C, err);
    if (rc)
        return rc;
    for (int b = 0; b < B; b++) {
        float *out = m->encoded + (size_t)b * T * C;
        for (size_t i = 0; i < (size_t)nv * C; i++)
            out[i] = m->vrows[i] + (wpe ? wpe[i] : 0.0f);
        model_encoder_forward(m, out + (size_t)nv * C, m->tokens + (size_t)b * Tr,
                              wpe ? wpe + (size_t)nv * C : NULL, 1, Tr, C);
    }
    return PR_OK;
}

/* dx (B,T,C) is the gradient of the embeddings. */
static int embed_backward(pr_model *m, const float *dx, pr_error *err)
{
    const pr_model_config *c = &m->cfg;
    int B = m->B, T = m->T, Tr = m->Tr, nv = m->nv, C = c->d_model;
    float *dwte = grad_of(m->wte), *dwpe = grad_of(m->wpe);
    if (dwpe)
        dwpe += (size_t)model_position_offset(m) * C;
    if (nv == 0) {
        if (dwte || dwpe)
            encoder_backward(dwte, dwpe, dx, m->tokens, B, T, C);
        return PR_OK;
    }
    size_t nC = (size_t)nv * C;
    memset(m->dvrows, 0, nC * sizeof(float));
    for (int b = 0; b < B; b++)
        model_add_rows(m->dvrows, C, dx + (size_t)b * T * C, C, nv, C);
    if (dwpe)
        model_add_rows(dwpe, C, m->dvrows, C, nv, C);
    if (dwte || dwpe)
        for (int b = 0; b < B; b++)
            encoder_backward(dwte, dwpe ? dwpe + nC : NULL, dx + (size_t)b * T * C + nC,
                             m->tokens + (size_t)b * Tr, 1, Tr, C);
    return model_concat_backward(m, PR_SITE_EMBED, -1, m->dvrows, C, err);
}

/* internal rows (B, nv+Tr, C) -> real rows (B, Tr, C) */
static void gather_real_rows(float *dst, const float *src, int B, int nv, int Tr, int C)
{
    for (int b = 0; b < B; b++)
        memcpy(dst + (size_t)b * Tr * C, src + ((size_t)b * (nv + Tr) + nv) * C, (size_t)Tr * C * sizeof(float));
}

/* real rows (B, Tr, C) -> internal rows (B, nv+Tr, C), virtual rows zero */
static void scatter_real_rows(float *dst, const float *src, int B, int nv, int Tr, int C)
{
    for (int b = 0; b < B; b++) {
        float *d = dst + (size_t)b * (nv + Tr) * C;
        memset(d, 0, (size_t)nv * C * sizeof(float));
        memcpy(d + (size_t)nv * C, src + (size_t)b * Tr * C, (size_t)Tr * C * sizeof(float));
    }
}

/* The token ids of the rows at the embed site: sequence b's position t < nv
 * is virtual (-1), position t >= nv holds token t - nv of the batch. */
int model_embed_token_ids(const pr_model *m, int rows, int32_t *ids)
{
    if (!m || !ids || !m->embed_live || rows != m->B * m->T)
        return PR_ERR_INVALID;
    for (int b = 0; b < m->B; b++)
        for (int t = 0; t < m->T; t++)
            ids[(size_t)b * m->T + t] = t < m->nv ? -1 : (int32_t)m->tokens[(size_t)b * m->Tr + (t - m->nv)];
    return PR_OK;
}

/* ---- the LM head and the cross-entropy ----------------------------------
 *
 * Full path (m->ce_full): logits (Nr,V) = h W^T for every real row, the
 * softmax probabilities kept for the backward, dlogits (Nr,V) there.
 * Chunked path (the default): ce_rows rows at a time; the forward keeps
 * only the per-row losses, and the backward recomputes each chunk's
 * logits (one more head product) and takes dh and the head's gradient
 * from it.  When the head is frozen and the model is training, the
 * forward instead takes each chunk's dh for the sum of the scored losses
 * right after its loss (ce_dh) and the backward only scales it by
 * 1/n_scored: no second head product, and still nothing a skipped
 * backward would have to undo, since no gradient is touched.  The recomputation is what makes it right for every caller:
 * the scale 1/n_scored is known only at the backward
 * (pr_model_backward_over), an evaluation never pays for a gradient, a
 * frozen head gets none, and no gradient is touched by a forward whose
 * backward is skipped (a non-finite loss).  A chunk's rows are the same
 * rows of the full products: the logits and losses came out bit for bit
 * in tests/test_ce_chunks.c, the gradients within float rounding (the
 * BLAS picks its kernels by the number of rows, and the head's gradient
 * sums the chunks' rows in another order). */

/* Final norm output at the real positions, (B,Tr,C). */
static const float *real_hidden(const pr_model *m)
{
    return m->nv ? m->hid : m->lnf;
}

/* out (n,V) = the logits of real rows [r0, r0+n) */
static int head_logits(pr_model *m, float *out, int r0, int n, pr_error *err)
{
    int C = m->cfg.d_model, V = m->cfg.vocab_size;
    return model_matmul_forward(m, out, V, real_hidden(m) + (size_t)r0 * C, C, m->head, 0, NULL, n, C, V, err);
}

/* PEFTREF_CE_RECOMPUTE=1: the backward recomputes the logits even for a
 * frozen head (the chunked path's general form; benchmarks and tests). */
static int ce_recompute(void)
{
    const char *e = getenv("PEFTREF_CE_RECOMPUTE");
    return e && *e && strcmp(e, "0") != 0;
}

static int any_scored(const int *targets, int n)
{
    for (int i = 0; i < n; i++)
        if (targets[i] >= 0)
            return 1;
    return 0;
}

/* m->losses (Nr) and m->scored from the head when targets are given; the
 * full path also leaves the logits (and probabilities) in place. */
static int head_loss_forward(pr_model *m, int targets, pr_error *err)
{
    int Nr = m->B * m->Tr, V = m->cfg.vocab_size, R = m->ce_rows, rc;
    if (m->ce_full) {
        if ((rc = head_logits(m, m->logits, 0, Nr, err)))
            return rc;
        m->logits_ready = 1;
        if (targets)
            m->scored = crossentropy_forward(m->losses, m->probs, m->logits, m->targets, Nr, V);
        return PR_OK;
    }
    m->ce_dh_ready = 0;
    if (!targets)
        return PR_OK; /* the logits are made when asked for (pr_model_logits) */
    int C = m->cfg.d_model, early = m->training && !grad_of(m->head) && !ce_recompute();
    const float *h = real_hidden(m);
    long scored = 0;
    for (int r0 = 0; r0 < Nr; r0 += R) {
        int n = Nr - r0 < R ? Nr - r0 : R;
        const int *tg = m->targets + r0;
        if (early)
            memset(m->ce_dh + (size_t)r0 * C, 0, (size_t)n * C * sizeof(float));
        if (!any_scored(tg, n)) {
            memset(m->losses + r0, 0, (size_t)n * sizeof(float));
            continue;
        }
        if ((rc = head_logits(m, m->ce_logits, r0, n, err)))
            return rc;
        scored += crossentropy_forward(m->losses + r0, m->ce_probs, m->ce_logits, tg, n, V);
        if (!early)
            continue;
        crossentropy_backward_inplace(m->ce_probs, tg, n, V, 1.0f);
        if ((rc = model_matmul_backward(m, m->ce_dh + (size_t)r0 * C, C, NULL, NULL, m->ce_probs, V,
                                        h + (size_t)r0 * C, C, m->head, 0, n, C, V, err)))
            return rc;
    }
    m->scored = scored;
    m->ce_dh_ready = early;
    return PR_OK;
}

/* dh (Nr,C) = dLoss/d(real rows) for loss = sum of scored losses * scale;
 * the head's gradient, when it has one, accumulates. */
static int head_loss_backward(pr_model *m, float *dh, float scale, pr_error *err)
{
    int Nr = m->B * m->Tr, C = m->cfg.d_model, V = m->cfg.vocab_size, R = m->ce_rows, rc;
    const float *h = real_hidden(m);
    float *dw = grad_of(m->head);
    if (m->ce_dh_ready && !m->ce_full) {
        for (size_t i = 0; i < (size_t)Nr * C; i++)
            dh[i] = scale * m->ce_dh[i];
        return PR_OK;
    }
    memset(dh, 0, (size_t)Nr * C * sizeof(float));
    if (m->ce_full) {
        memset(m->dlogits, 0, (size_t)Nr * V * sizeof(float));
        crossentropy_backward(m->dlogits, m->probs, m->targets, Nr, V, scale);
        return model_matmul_backward(m, dh, C, dw, NULL, m->dlogits, V, h, C, m->head, 0, Nr, C, V, err);
    }
    for (int r0 = 0; r0 < Nr; r0 += R) {
        int n = Nr - r0 < R ? Nr - r0 : R;
        const int *tg = m->targets + r0;
        if (!any_scored(tg, n))
            continue; /* dlogits 0: nothing to add */
        if ((rc = head_logits(m, m->ce_logits, r0, n, err)))
            return rc;
        crossentropy_forward(m->losses + r0, m->ce_probs, m->ce_logits, tg, n, V);
        crossentropy_backward_inplace(m->ce_probs, tg, n, V, scale);
        if ((rc = model_matmul_backward(m, dh + (size_t)r0 * C, C, dw, NULL, m->ce_probs, V, h + (size_t)r0 * C, C,
                                        m->head, 0, n, C, V, err)))
            return rc;
    }
    return PR_OK;
}

/* ---- forward ------------------------------------------------------------- */

static int check_batch(pr_model *m, const pr_batch *bt, pr_error *err)
{
    const pr_model_config *c = &m->cfg;
    if (!bt || !bt->tokens)
        return pr_errorf(err, PR_ERR_INVALID, "forward: NULL batch or tokens");
    if (bt->B <= 0 || bt->T <= 0)
        return pr_errorf(err, PR_ERR_INVALID, "forward: B and T must be positive (got B=%d, T=%d)", bt->B, bt->T);
    int nv = pr_model_virtual_positions(m), P = model_position_offset(m);
    int pos0 = m->decode_pos >= 0 ? m->decode_pos : 0;
    if (P + pos0 + bt->T + nv > c->max_seq) {
        if (nv || P)
            return pr_errorf(err, PR_ERR_INVALID, "forward: T=%d after %d prefix and %d virtual positions exceeds "
                             "the model's max_seq=%d", pos0 + bt->T, P, nv, c->max_seq);
        return pr_errorf(err, PR_ERR_INVALID, "forward: T=%d exceeds the model's max_seq=%d", pos0 + bt->T,
                         c->max_seq);
    }
    if (!m->act_block)
        return pr_errorf(err, PR_ERR_INVALID, "forward: no activation memory; call pr_model_reserve first");
    if (bt->B > m->resB || bt->T > m->resT || bt->T + nv > m->resTi)
        return pr_errorf(err, PR_ERR_INVALID, "forward: batch B=%d x T=%d exceeds the reservation B=%d x T=%d",
                         bt->B, bt->T, m->resB, m->resT);
    for (int i = 0; i < m->n_base; i++)
        if (!m->tensors[i].data && !model_tensor_bf16(m, &m->tensors[i]))
            return pr_errorf(err, PR_ERR_INVALID, "forward: tensor '%s' has no data", m->tensors[i].name);
    int rc = model_check_prefixes(m, err);
    if (rc)
        return rc;
    for (int b = 0; b < bt->B; b++)
        for (int t = 0; t < bt->T; t++) {
            int id = bt->tokens[(size_t)b * bt->T + t];
            if (id < 0 || id >= c->vocab_size)
                return pr_errorf(err, PR_ERR_INVALID,
                                 "forward: token id %d at batch %d position %d is outside the vocabulary [0, %d)",
                                 id, b, t, c->vocab_size);
            if (bt->targets && bt->targets[(size_t)b * bt->T + t] >= c->vocab_size)
                return pr_errorf(err, PR_ERR_INVALID,
                                 "forward: target id %d at batch %d position %d is outside the vocabulary [0, %d)",
                                 bt->targets[(size_t)b * bt->T + t], b, t, c->vocab_size);
        }
    return PR_OK;
}

int pr_model_forward(pr_model *m, const pr_batch *batch, float *loss, pr_error *err)
{
    if (!m)
        return pr_errorf(err, PR_ERR_INVALID, "forward: NULL model");
    int rc = check_batch(m, batch, err);
    if (rc)
        return rc;
    const pr_model_config *c = &m->cfg;
    int B = batch->B, Tr = batch->T, nv = pr_model_virtual_positions(m), T = nv + Tr;
    int Nr = B * Tr, C = c->d_model;

    m->have_fwd = 0;
    m->logits_ready = 0;
    m->B = B;
    m->T = T;
    m->Tr = Tr;
    m->nv = nv;
    m->have_targets = batch->targets != NULL;
    m->scored = 0;
    memcpy(m->tokens, batch->tokens, (size_t)Nr * sizeof(int));
    if (batch->targets)
        memcpy(m->targets, batch->targets, (size_t)Nr * sizeof(int));

    if ((rc = embed_forward(m, err)))
        return rc;
    const float *x;
    m->embed_live = 1;
    rc = model_stream_forward(m, PR_SITE_EMBED, -1, m->encoded, C, m->embed_y, C, &x, NULL, err);
    m->embed_live = 0;
    if (rc)
        return rc;
    for (int l = 0; l < c->n_layers; l++) {
        layer_frame *f = &m->lf[l];
        f->in = x;
        if (f->xin) {   /* recompute: the shared area that holds x is the next block's */
            memcpy(f->xin, x, (size_t)B * T * C * sizeof(float));
            f->in = f->xin;
        }
        if ((rc = m->ops->block_forward(m, l, f->in, &f->pre, err)) ||
            (rc = model_stream_forward(m, PR_SITE_BLOCK_OUT, l, f->pre, C, f->bout, C, &f->out, NULL, err)))
            return rc;
        x = f->out;
    }
    m->area_layer = c->n_layers - 1;
    m->ops->final_norm_forward(m, x, m->lnf);
    if (nv)
        gather_real_rows(m->hid, m->lnf, B, nv, Tr, C);
    m->hidden_only = batch->hidden_only;
    if (batch->hidden_only) {
        if (batch->targets)
            return pr_errorf(err, PR_ERR_INVALID, "forward: hidden_only takes no targets");
        if (loss)
            *loss = 0.0f;
        m->have_fwd = 1;
        return PR_OK;
    }
    if ((rc = head_loss_forward(m, batch->targets != NULL, err)))
        return rc;
    if (batch->targets) {
        double sum = 0.0;
        for (int i = 0; i < Nr; i++)
            sum += m->losses[i];
        if (loss)
            *loss = m->scored > 0 ? (float)(sum / (double)m->scored) : 0.0f;
    } else if (loss) {
        *loss = 0.0f;
    }
    m->have_fwd = 1;
    return PR_OK;
}

/* The logits are the model's state of the last forward: made on the
 * first request after a chunked forward (from the saved real rows and the
 * head as it is then), in a buffer of the model's own.  The cast writes
 * that cache through the const handle; pr_model objects are only ever
 * made by pr_model_new, never defined const. */
const float *pr_model_logits(const pr_model *cm)
{
    if (!cm || !cm->have_fwd || cm->hidden_only)
        return NULL;
    if (cm->logits_ready)
        return cm->logits;
    pr_model *m = (pr_model *)cm;
    int Nr = m->B * m->Tr, V = m->cfg.vocab_size;
    if (!m->logits_own) {
        m->logits_own = malloc((size_t)m->resB * (size_t)m->resT * (size_t)V * sizeof(float));
        if (!m->logits_own)
            return NULL;
    }
    m->logits = m->logits_own;
    pr_error err = { 0 };
    if (head_logits(m, m->logits, 0, Nr, &err))
        return NULL;
    m->logits_ready = 1;
    return m->logits;
}

const float *pr_model_hidden(const pr_model *m)
{
    return m && m->have_fwd ? real_hidden(m) : NULL;
}

int64_t pr_model_scored_tokens(const pr_model *m)
{
    return m && m->have_fwd ? m->scored : 0;
}

/* ---- backward ------------------------------------------------------------ */

static int backward_from_final_norm(pr_model *m, pr_error *err);

int pr_model_backward(pr_model *m, pr_error *err)
{
    return pr_model_backward_over(m, m ? m->scored : 0, err);
}

int pr_model_backward_over(pr_model *m, int64_t n_scored, pr_error *err)
{
    if (!m)
        return pr_errorf(err, PR_ERR_INVALID, "backward: NULL model");
    if (!m->have_fwd)
        return pr_errorf(err, PR_ERR_INVALID, "backward: no forward pass to differentiate (or the model changed since)");
    if (!m->have_targets)
        return pr_errorf(err, PR_ERR_INVALID, "backward: the last forward had no targets");
    if (m->scored <= 0)
        return pr_errorf(err, PR_ERR_INVALID, "backward: the last forward scored no targets (all are -1)");
    if (n_scored < m->scored)
        return pr_errorf(err, PR_ERR_INVALID, "backward: %lld scored targets in all is fewer than the %lld of "
                         "the last forward", (long long)n_scored, (long long)m->scored);
    /* loss = sum over scored rows / n_scored -> logits -> ln_f at the real rows */
    float *dh = m->nv ? m->dhid : m->dln;
    int rc = head_loss_backward(m, dh, 1.0f / (float)n_scored, err);
    if (rc)
        return rc;
    if (m->nv)
        scatter_real_rows(m->dln, dh, m->B, m->nv, m->Tr, m->cfg.d_model);
    return backward_from_final_norm(m, err);
}

int pr_model_backward_hidden(pr_model *m, const float *dhidden, pr_error *err)
{
    if (!m || !dhidden)
        return pr_errorf(err, PR_ERR_INVALID, "backward: NULL model or gradient");
    if (!m->have_fwd)
        return pr_errorf(err, PR_ERR_INVALID, "backward: no forward pass to differentiate (or the model changed since)");
    if (m->nv)
        scatter_real_rows(m->dln, dhidden, m->B, m->nv, m->Tr, m->cfg.d_model);
    else
        memcpy(m->dln, dhidden, (size_t)m->B * m->T * m->cfg.d_model * sizeof(float));
    return backward_from_final_norm(m, err);
}

/* The lowest block whose backward anything needs: one holding a trainable
 * base tensor, a hook at any of its sites (a module's parameters, or a
 * frozen module the gradient must pass through to reach one) or prefix
 * keys and values; -1 when the embedding needs its gradient (trainable
 * token or position table, embed hooks, virtual positions); n_layers when
 * nothing below the final norm does.  Blocks below it are not
 * differentiated (LoRA on the top 4 of 12 layers runs backward through 4),
 * which leaves every gradient bit for bit what the full backward gives;
 * the lowest block run makes no input gradient of its own (the frozen
 * products' dX into its first norm and that norm's backward) unless the
 * norm is trainable.  PEFTREF_BACKWARD_ALL=1 (read once) runs every block
 * and makes every input gradient, for measuring. */
static int lowest_needed_layer(const pr_model *m)
{
    static int all = -1;
    if (all < 0) {
        const char *e = getenv("PEFTREF_BACKWARD_ALL");
        all = e && *e && strcmp(e, "0") != 0;
    }
    if (all || grad_of(m->wte) || grad_of(m->wpe) || model_has_hooks(m, PR_SITE_EMBED, -1) ||
        pr_model_virtual_positions(m) > 0)
        return -1;
    int L = m->cfg.n_layers, low = L;
    for (int i = 0; i < m->n_tensors; i++) {
        const pr_tensor_info *t = m->tab[i];
        if (t->grad && t->layer >= 0 && t->layer < low)
            low = t->layer;
    }
    for (int l = 0; l < low; l++) {
        if (model_prefix_room(m, l) > 0)
            return l;
        for (int s = 0; s < PR_SITE_COUNT; s++)
            if (pr_site_is_per_layer(s) && model_has_hooks(m, s, l))
                return l;
    }
    return low;
}

/* Recompute: block l's activations in the shared area for its backward.
 * The forward leaves the top block's there; any other block runs forward
 * again from its kept input, the hooks and providers at its sites
 * included (a module's forward repeats its last call's context and
 * rewrites the saved buffers of its insertion at layer l).  block_out's
 * hooks, outside the block, keep their own buffers. */
static int block_activations(pr_model *m, int l, pr_error *err)
{
    if (!m->recompute || m->area_layer == l)
        return PR_OK;
    layer_frame *f = &m->lf[l];
    m->area_layer = -1;
    m->modules.rerun = 1;
    int rc = m->ops->block_forward(m, l, f->in, &f->pre, err);
    m->modules.rerun = 0;
    if (!rc)
        m->area_layer = l;
    return rc;
}

/* m->dln holds dLoss/d(final norm output); propagate to every trainable
 * tensor and hook. */
static int backward_from_final_norm(pr_model *m, pr_error *err)
{
    const pr_model_config *c = &m->cfg;
    int B = m->B, T = m->T, N = B * T, C = c->d_model;
    size_t NC = (size_t)N * C;
    int rc;
    /* the final norm's input is the top block's output, in the area with recompute */
    if ((rc = block_activations(m, c->n_layers - 1, err)))
        return rc;
    memset(m->dres, 0, NC * sizeof(float));
    m->ops->final_norm_backward(m, m->dres, m->dln, m->lf[c->n_layers - 1].out);

    int low = lowest_needed_layer(m);
    for (int l = c->n_layers - 1; l >= (low > 0 ? low : 0); l--) {
        const layer_frame *f = &m->lf[l];
        if ((rc = block_activations(m, l, err)))
            return rc;
        if (model_has_hooks(m, PR_SITE_BLOCK_OUT, l)) {
            memset(m->dtmp, 0, NC * sizeof(float));
            if ((rc = model_stream_backward(m, PR_SITE_BLOCK_OUT, l, f->pre, C, m->dtmp, f->bout, m->dres, C, err)))
                return rc;
            float *t = m->dres; m->dres = m->dtmp; m->dtmp = t;
        }
        m->bwd_no_input_grad = low >= 0 && l == low;
        rc = m->ops->block_backward(m, l, f->in, err);
        m->bwd_no_input_grad = 0;
        if (rc)
            return rc;
    }
    if (low >= 0)
        return PR_OK;

    if (model_has_hooks(m, PR_SITE_EMBED, -1)) {
        memset(m->dtmp, 0, NC * sizeof(float));
        m->embed_live = 1;
        rc = model_stream_backward(m, PR_SITE_EMBED, -1, m->encoded, C, m->dtmp, m->embed_y, m->dres, C, err);
        m->embed_live = 0;
        if (rc)
            return rc;
        float *t = m->dres; m->dres = m->dtmp; m->dtmp = t;
    }
    return embed_backward(m, m->dres, err);
}

/* ---- incremental decoding ------------------------------------------------ */

int pr_model_decode_begin(pr_model *m, int ctx, pr_error *err)
{
    if (!m)
        return pr_errorf(err, PR_ERR_INVALID, "decode: NULL model");
    pr_model_decode_end(m);
    if (!m->ops->decode_reserve)
        return pr_errorf(err, PR_ERR_UNSUPPORTED, "decode: %s models have no key/value cache; run full forwards",
                         m->ops->name);
    if (pr_model_virtual_positions(m) > 0)
        return pr_errorf(err, PR_ERR_UNSUPPORTED,
                         "decode: the model has %d virtual positions (prompt tuning); run full forwards",
                         pr_model_virtual_positions(m));
    int room = m->cfg.max_seq - model_position_offset(m);
    if (ctx < 1 || ctx > room)
        return pr_errorf(err, PR_ERR_INVALID, "decode: a cache of %d positions is outside [1, %d] (max_seq %d less "
                         "%d prefix positions)", ctx, room, m->cfg.max_seq, model_position_offset(m));
    int rc = m->ops->decode_reserve(m, ctx, err);
    if (rc)
        return rc;
    m->decode_ctx = ctx;
    m->decode_len = 0;
    m->decode_pos = -1;
    return PR_OK;
}

int pr_model_decode(pr_model *m, const int *tokens, int n, pr_error *err)
{
    if (!m || !tokens)
        return pr_errorf(err, PR_ERR_INVALID, "decode: NULL model or tokens");
    if (m->decode_ctx <= 0)
        return pr_errorf(err, PR_ERR_INVALID, "decode: no cache; call pr_model_decode_begin first");
    if (n < 1 || n > m->decode_ctx - m->decode_len)
        return pr_errorf(err, PR_ERR_INVALID, "decode: %d new tokens after %d cached do not fit the cache of %d", n,
                         m->decode_len, m->decode_ctx);
    pr_batch b = { .tokens = tokens, .targets = NULL, .B = 1, .T = n };
    m->decode_pos = m->decode_len;
    int rc = pr_model_forward(m, &b, NULL, err);
    m->decode_pos = -1;
    if (rc)
        return rc;
    m->decode_len += n;
    return PR_OK;
}

int pr_model_decode_pos(const pr_model *m)
{
    return m && m->decode_ctx > 0 ? m->decode_len : -1;
}

void pr_model_decode_end(pr_model *m)
{
    if (!m)
        return;
    if (m->decode_ctx > 0 && m->ops->decode_free)
        m->ops->decode_free(m);
    m->decode_ctx = 0;
    m->decode_len = 0;
    m->decode_pos = -1;
}
