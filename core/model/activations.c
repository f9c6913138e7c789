/* peftref core: activation memory, planned once per batch shape.
 *
 * One block holds every saved activation and every backward scratch
 * buffer as a named view, laid out twice by the same code: once to size
 * the block, once to assign the views.  The frame lays out what every
 * family shares (embedding, block_out, prefixes, final norm output, head,
 * residual-stream gradients); the family lays out its blocks' own.
 * Buffers of stream sites exist only while hooks are attached there. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "family.h"

#define ALIGN_FLOATS 16   /* 64-byte aligned views */

float *bump_take(bump *b, size_t n)
{
    if (b->overflow || n > BUMP_MAX_FLOATS - b->off) {
        b->overflow = 1;   /* only while sizing: the block is never made */
        return NULL;
    }
    float *p = b->base ? b->base + b->off : NULL;
    b->off += (n + ALIGN_FLOATS - 1) / ALIGN_FLOATS * ALIGN_FLOATS;
    return p;
}

float *bump_take_if(bump *b, int cond, size_t n)
{
    return cond ? bump_take(b, n) : NULL;
}

int model_act_areas(const pr_model *m)
{
    return m->recompute ? 1 : m->cfg.n_layers;
}

int model_act_has_hooks(const pr_model *m, int site, int l)
{
    return m->recompute ? model_any_layer_has_hooks(m, site) : model_has_hooks(m, site, l);
}

int model_act_prefix_room(const pr_model *m, int l)
{
    return m->recompute ? model_max_prefix_room(m) : model_prefix_room(m, l);
}

/* Lay out every view for B sequences of Tr real tokens and Ti internal
 * positions.  Run once with base NULL to size the block and once to
 * assign the views. */
static void layout_activations(pr_model *m, bump *b, int B, int Tr, int Ti)
{
    const pr_model_config *c = &m->cfg;
    size_t N = (size_t)B * (size_t)Ti, Nr = (size_t)B * (size_t)Tr;
    size_t C = (size_t)c->d_model, V = (size_t)c->vocab_size, Hkv = (size_t)c->n_kv_heads;
    size_t hd = (size_t)c->d_head, KV = Hkv * hd;
    size_t nv = (size_t)pr_model_virtual_positions(m), Pmax = (size_t)model_max_prefix_room(m);

    m->vrows = bump_take_if(b, nv > 0, nv * C);
    m->encoded = bump_take(b, N * C);
    m->embed_y = bump_take_if(b, model_has_hooks(m, PR_SITE_EMBED, -1), N * C);
    for (int l = 0; l < c->n_layers; l++) {
        layer_frame *f = &m->lf[l];
        size_t P = (size_t)model_prefix_room(m, l);
        f->pk = bump_take_if(b, P > 0, Hkv * P * hd);
        f->pv = bump_take_if(b, P > 0, Hkv * P * hd);
        f->bout = bump_take_if(b, model_has_hooks(m, PR_SITE_BLOCK_OUT, l), N * C);
        f->xin = bump_take_if(b, m->recompute && l > 0, N * C);
    }
    m->lnf = bump_take(b, N * C);
    m->hid = bump_take_if(b, nv > 0, Nr * C);
    size_t R = (size_t)m->ce_rows;
    m->ce_logits = bump_take_if(b, !m->ce_full, R * V);
    m->ce_probs = bump_take_if(b, !m->ce_full, R * V);
    m->ce_dh = bump_take_if(b, !m->ce_full, Nr * C);
    m->logits = bump_take_if(b, m->ce_full, Nr * V);
    m->probs = bump_take_if(b, m->ce_full, Nr * V);
    m->losses = bump_take(b, Nr);

    m->dvrows = bump_take_if(b, nv > 0, nv * C);
    m->prow = bump_take_if(b, Pmax > 0, Pmax * KV);
    m->dpk = bump_take_if(b, Pmax > 0, Hkv * Pmax * hd);
    m->dpv = bump_take_if(b, Pmax > 0, Hkv * Pmax * hd);
    m->dhid = bump_take_if(b, nv > 0, Nr * C);
    m->dres = bump_take(b, N * C);
    m->dtmp = bump_take(b, N * C);
    m->dstream = bump_take(b, N * C);
    m->dln = bump_take(b, N * C);
    m->dlogits = bump_take_if(b, m->ce_full, Nr * V);

    m->ops->layout(m, b, B, Ti);
}

/* Bytes of each of the two chunk buffers of the cross-entropy (ce_logits,
 * ce_probs), and the fewest rows of a chunk: each chunk's two head
 * products re-read and re-pack the whole (V,C) head (OpenBLAS packs its B
 * operand per call), so a chunk needs rows enough to amortise that.  On
 * a GPT-2-small LoRA step (B=4, T=256) 83-row chunks (16 MiB) ran about
 * 10% slower than the full path, 256-row chunks within 1% (min of 5 steps,
 * PEFTREF_CE_CHUNK_ROWS 83 / 256 / 512 / 1024 against PEFTREF_CE_FULL=1).
 * 256 rows of GPT-2's 50257 tokens is 2 x 51 MB against the 3 x Nr x V
 * floats of the full path (617 MB at B=4, T=256); 2 x 131 MB for a 128k
 * vocabulary. */
#define CE_CHUNK_BYTES ((size_t)16 << 20)
#define CE_CHUNK_MIN_ROWS 256

/* The head's cross-entropy for Nr real rows: PEFTREF_CE_FULL=1 keeps the
 * (Nr,V) logits, probabilities and their gradient (for measuring, and
 * for the test that compares both); otherwise chunks of ce_rows rows,
 * PEFTREF_CE_CHUNK_ROWS when set (tests), else CE_CHUNK_BYTES' worth and
 * at least CE_CHUNK_MIN_ROWS.
 * Read when the activations are planned, since their layout depends on
 * it. */
static int plan_crossentropy(const pr_model *m, int Nr, int *full, int *rows_out, pr_error *err)
{
    const char *e = getenv("PEFTREF_CE_FULL");
    *full = e && *e && strcmp(e, "0") != 0;
    size_t rows = CE_CHUNK_BYTES / ((size_t)m->cfg.vocab_size * sizeof(float));
    if (rows < CE_CHUNK_MIN_ROWS)
        rows = CE_CHUNK_MIN_ROWS;
    const char *r = getenv("PEFTREF_CE_CHUNK_ROWS");
    if (r && *r) {
        char *end = NULL;
        long v = strtol(r, &end, 10);
        if (*end || v <= 0 || v > INT32_MAX)
            return pr_errorf(err, PR_ERR_INVALID, "reserve: PEFTREF_CE_CHUNK_ROWS='%s' is not a positive row count",
                             r);
        rows = (size_t)v;
    }
    if (rows < 1)
        rows = 1;
    if (rows > (size_t)Nr)
        rows = (size_t)Nr;
    *rows_out = (int)rows;
    return PR_OK;
}

int model_plan_activations(pr_model *m, int B, int Tr, int Ti, pr_error *err)
{
    int full = 0, rows = 1;
    int rc = plan_crossentropy(m, B * Tr, &full, &rows, err);
    if (rc)
        return rc;
    /* sized for the new choice; a failure below keeps the previous block,
     * laid out for the previous one */
    int old_full = m->ce_full, old_rows = m->ce_rows;
    m->ce_full = full;
    m->ce_rows = rows;
    bump sizing = { NULL, 0, 0 };
    layout_activations(m, &sizing, B, Tr, Ti);
    m->ce_full = old_full;
    m->ce_rows = old_rows;
    if (sizing.overflow)
        return pr_errorf(err, PR_ERR_INVALID, "reserve: the activations of B=%d x T=%d with this model would "
                         "pass %zu bytes (BUMP_MAX_FLOATS floats)", B, Ti, BUMP_MAX_FLOATS * sizeof(float));
    size_t bytes = sizing.off * sizeof(float);
    void *block = NULL;
    if (posix_memalign(&block, 64, bytes) != 0)
        return pr_errorf(err, PR_ERR_NOMEM, "reserve: out of memory for %zu bytes of activations (B=%d, T=%d)",
                         bytes, B, Ti);
    int *toks = malloc(2 * (size_t)B * (size_t)Tr * sizeof(int));
    if (!toks) {
        free(block);
        return pr_errorf(err, PR_ERR_NOMEM, "reserve: out of memory for token buffers");
    }
    memset(block, 0, bytes);
    m->ce_full = full;
    m->ce_rows = rows;
    free(m->act_block);
    free(m->tok_block);
    free(m->logits_own);
    m->logits_own = NULL;
    m->logits_ready = 0;
    m->act_block = block;
    m->act_bytes = bytes;
    m->tok_block = toks;
    m->tokens = toks;
    m->targets = toks + (size_t)B * (size_t)Tr;
    bump assign = { m->act_block, 0, 0 };
    layout_activations(m, &assign, B, Tr, Ti);
    m->resB = B;
    m->resT = Tr;
    m->resTi = Ti;
    m->area_layer = -1;
    m->have_fwd = 0;
    return PR_OK;
}

int pr_model_set_recompute(pr_model *m, int on, pr_error *err)
{
    if (!m)
        return pr_errorf(err, PR_ERR_INVALID, "set_recompute: NULL model");
    on = on != 0;
    if (on == m->recompute)
        return PR_OK;
    m->recompute = on;
    m->have_fwd = 0;
    if (!m->act_block)
        return PR_OK;
    int rc = model_plan_activations(m, m->resB, m->resT, m->resTi, err);
    if (rc)
        m->recompute = !on;   /* the old plan still stands */
    return rc;
}

int pr_model_get_recompute(const pr_model *m)
{
    return m ? m->recompute : 0;
}

/* T counts real tokens; the plan adds the virtual positions. */
int pr_model_reserve(pr_model *m, int B, int T, pr_error *err)
{
    if (!m)
        return pr_errorf(err, PR_ERR_INVALID, "reserve: NULL model");
    if (B <= 0 || T <= 0)
        return pr_errorf(err, PR_ERR_INVALID, "reserve: B and T must be positive (got B=%d, T=%d)", B, T);
    int nv = pr_model_virtual_positions(m);
    if (T + nv > m->cfg.max_seq) {
        if (nv)
            return pr_errorf(err, PR_ERR_INVALID, "reserve: T=%d plus %d virtual positions exceeds the model's "
                             "max_seq=%d", T, nv, m->cfg.max_seq);
        return pr_errorf(err, PR_ERR_INVALID, "reserve: T=%d exceeds the model's max_seq=%d", T, m->cfg.max_seq);
    }
    /* the kernels count rows N = B*T in an int */
    if ((int64_t)B * (T + nv) > INT32_MAX)
        return pr_errorf(err, PR_ERR_INVALID, "reserve: batch B=%d x T=%d has more than 2^31 rows", B, T + nv);
    if (!m->act_block || B > m->resB || T > m->resT || T + nv > m->resTi) {
        if (m->act_block) {
            if (B < m->resB) B = m->resB;
            if (T < m->resT) T = m->resT;
        }
        int rc = model_plan_activations(m, B, T, T + nv, err);
        if (rc)
            return rc;
    }
    return model_reserve_all_hooks(m, err);
}
