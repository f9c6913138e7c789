/* peftref: language-model evaluation over fixed windows (see eval.h). */
#include "config.h"

#include <math.h>
#include <stdlib.h>

#include "peftref/eval.h"

int pr_eval_tokens(pr_model *m, const int *ids, size_t n, int T, int batch, pr_eval_result *res,
                   pr_error *err)
{
    if (T < 1)
        return pr_errorf(err, PR_ERR_INVALID, "sequence length must be at least 1 (got %d)", T);
    if (batch < 1)
        return pr_errorf(err, PR_ERR_INVALID, "batch must be at least 1 (got %d)", batch);
    if (n < (size_t)T + 1)
        return pr_errorf(err, PR_ERR_INVALID,
                         "%zu tokens are too few for one window of %d: need at least %d", n, T, T + 1);
    const pr_model_config *cfg = pr_model_get_config(m);
    int room = cfg->max_seq - pr_model_virtual_positions(m);
    if (T > room)
        return pr_errorf(err, PR_ERR_INVALID,
                         "sequence length %d exceeds the %d positions the model has for text (%d, less %d "
                         "virtual)", T, room, cfg->max_seq, pr_model_virtual_positions(m));
    size_t W = (n - 1) / (size_t)T;
    if ((size_t)batch > W)
        batch = (int)W;
    pr_model_set_training(m, 0);
    int rc = pr_model_reserve(m, batch, T, err);
    if (rc)
        return rc;
    int *targets = malloc(sizeof(int) * (size_t)batch * (size_t)T);
    if (!targets)
        return pr_errorf(err, PR_ERR_NOMEM, "out of memory for %d x %d targets", batch, T);
    double sum = 0.0;
    for (size_t w0 = 0; w0 < W; w0 += (size_t)batch) {
        int B = (int)((W - w0) < (size_t)batch ? (W - w0) : (size_t)batch);
        /* windows w0..w0+B-1 are contiguous in the stream: inputs start at
         * w*T, targets are the same stream shifted by one. */
        const int *inputs = ids + w0 * (size_t)T;
        for (int b = 0; b < B; b++)
            for (int t = 0; t < T; t++)
                targets[(size_t)b * T + t] = ids[(w0 + (size_t)b) * T + (size_t)t + 1];
        pr_batch bt = {.tokens = inputs, .targets = targets, .B = B, .T = T};
        float loss = 0.0f;
        rc = pr_model_forward(m, &bt, &loss, err);
        if (rc) {
            free(targets);
            return rc;
        }
        sum += (double)loss * (double)B * (double)T;
    }
    free(targets);
    res->windows = (int64_t)W;
    res->tokens = (int64_t)W * T;
    res->loss = sum / (double)res->tokens;
    res->perplexity = exp(res->loss);
    if (!isfinite(res->loss))
        return pr_errorf(err, PR_ERR_NUMERIC, "evaluation loss is not finite");
    return PR_OK;
}
