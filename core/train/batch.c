/* peftref: one training or evaluation batch (train.c's loop calls these):
 * the model's forward and backward, the classification head, and the
 * validation pass. */
#include "config.h"

#include <math.h>
#include <string.h>

#include "peftref/module.h"
#include "dist.h"
#include "trainer.h"

/* ---- classification head -------------------------------------------------
 * The head reads the final hidden state of each row's last real token
 * (position lengths[b]-1; padding is on the right and attention is causal,
 * so that position has seen the whole text).
 *   pooled (B,C); logits (B,K) = pooled . W + b; mean cross-entropy. */
static double head_forward_backward(trainer *t, int rows, int backward, int64_t n_all, int *correct)
{
    const float *hidden = pr_model_hidden(t->m);
    int C = t->C, K = t->K, T = t->T;
    const float *W = t->head, *bias = t->head + (size_t)C * K;
    float *dW = t->head_grad, *db = t->head_grad + (size_t)C * K;
    double loss = 0.0;
    int n = 0;
    if (backward)
        memset(t->dhidden, 0, sizeof(float) * (size_t)t->B * T * C);
    for (int b = 0; b < rows; b++) {
        if (t->labels[b] < 0)
            continue;
        const float *h = hidden + ((size_t)b * T + (size_t)(t->lengths[b] - 1)) * C;
        float *z = t->cls_logits + (size_t)b * K;
        train_head_logits(W, bias, h, C, K, z);
        double mx = z[0];
        int arg = 0;
        for (int k = 1; k < K; k++)
            if (z[k] > mx) {
                mx = z[k];
                arg = k;
            }
        double s = 0.0;
        for (int k = 0; k < K; k++)
            s += exp(z[k] - mx);
        loss += -(z[t->labels[b]] - mx - log(s));
        if (correct && arg == t->labels[b])
            (*correct)++;
        n++;
        /* probabilities overwrite the logits for the backward below */
        for (int k = 0; k < K; k++)
            z[k] = (float)(exp(z[k] - mx) / s);
    }
    if (n == 0)
        return 0.0;
    if (backward) {
        float scale = 1.0f / (float)(n_all > n ? n_all : n);
        for (int b = 0; b < rows; b++) {
            if (t->labels[b] < 0)
                continue;
            const float *h = hidden + ((size_t)b * T + (size_t)(t->lengths[b] - 1)) * C;
            float *dh = t->dhidden + ((size_t)b * T + (size_t)(t->lengths[b] - 1)) * C;
            float *p = t->cls_logits + (size_t)b * K;
            p[t->labels[b]] -= 1.0f;
            for (int k = 0; k < K; k++) {
                float g = p[k] * scale;
                db[k] += g;
                for (int c = 0; c < C; c++) {
                    dW[(size_t)c * K + k] += h[c] * g;
                    dh[c] += W[(size_t)c * K + k] * g;
                }
            }
        }
    }
    return loss / n;
}

/* One micro-batch: forward, and backward when asked (trainer.h). */
int train_run_batch(trainer *t, int rows, int backward, int64_t n_scored_all, double *loss, int64_t *scored,
                    int *correct, pr_error *err)
{
    int rc;
    pr_batch bt = {.tokens = t->tokens, .targets = t->is_cls ? NULL : t->targets, .B = t->B, .T = t->T,
                   .hidden_only = t->is_cls};
    float l = 0.0f;
    if ((rc = pr_model_forward(t->m, &bt, &l, err)))
        return rc;
    if (t->is_cls) {
        *loss = head_forward_backward(t, rows, backward, n_scored_all, correct);
        *scored = 0;
        for (int b = 0; b < rows; b++)
            *scored += t->labels[b] >= 0;
        if (backward && isfinite(*loss))
            rc = pr_model_backward_hidden(t->m, t->dhidden, err);
    } else {
        *loss = l;
        *scored = pr_model_scored_tokens(t->m);
        if (backward && isfinite(*loss) && *scored > 0)
            rc = pr_model_backward_over(t->m, n_scored_all > *scored ? n_scored_all : *scored, err);
    }
    return rc;
}

/* Mean validation loss (weighted by scored targets) and accuracy.  Rows
 * [0, max_rows) go in pieces of B rows, piece k to rank k % ranks. */
int train_evaluate(trainer *t, double *loss_out, double *acc_out, pr_error *err)
{
    pr_model_set_training(t->m, 0);
    size_t n = t->val.n;
    size_t max_rows = t->cfg->eval_batches > 0 ? (size_t)t->cfg->eval_batches * t->B_global : n;
    if (max_rows > n)
        max_rows = n;
    double sum = 0.0;
    int64_t total = 0;
    int correct = 0, rows_seen = 0, rc = PR_OK;
    size_t piece = 0;
    for (size_t i = 0; i < max_rows && !rc; i += (size_t)t->B, piece++) {
        if ((int)(piece % (size_t)t->ranks) != t->rank)
            continue;
        int rows = (int)((max_rows - i) < (size_t)t->B ? (max_rows - i) : (size_t)t->B);
        for (int b = 0; b < rows; b++)
            t->idx[b] = i + (size_t)b;
        rc = data_make_batch(&t->val, t->idx, rows, t->B, t->T, t->tokens, t->targets, t->lengths, t->labels,
                             t->pad_id, err);
        double l;
        int64_t scored;
        if (!rc && !(rc = train_run_batch(t, rows, 0, 0, &l, &scored, &correct, err))) {
            sum += l * (double)scored;
            total += scored;
            rows_seen += rows;
        }
    }
    if ((rc = dist_agree(rc, err)))
        return rc;
    double s[4] = {sum, (double)total, (double)correct, (double)rows_seen};
    if ((rc = dist_sum_doubles(s, 4, err)))
        return rc;
    *loss_out = s[1] > 0 ? s[0] / s[1] : NAN;
    *acc_out = t->is_cls && s[3] > 0 ? s[2] / s[3] : -1.0;
    return PR_OK;
}
