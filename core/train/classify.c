/* peftref: scoring a classification head over a file or a run's
 * validation split (see include/peftref/head.h).  The logits are the ones
 * training computes (train_head_logits), batch for batch, so a reloaded
 * run reproduces its validation accuracy exactly. */
#include "config.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "peftref/head.h"
#include "data.h"
#include "trainer.h"

/* z (K) = h (C) . W (C,K) + b (K), summed over c in order. */
void train_head_logits(const float *W, const float *bias, const float *h, int C, int K, float *z)
{
    for (int k = 0; k < K; k++)
        z[k] = bias[k];
    for (int c = 0; c < C; c++)
        for (int k = 0; k < K; k++)
            z[k] += h[c] * W[(size_t)c * K + k];
}

void pr_cls_predictions_free(pr_cls_predictions *p)
{
    if (!p)
        return;
    free(p->gold);
    free(p->probs);
    memset(p, 0, sizeof *p);
}

static int classify_dataset(pr_model *m, const pr_tokenizer *tok, const pr_head *h, const data_dataset *ds, int T,
                            int B, pr_cls_predictions *out, pr_error *err)
{
    int C = h->d_model, K = h->n_labels;
    if (pr_model_get_config(m)->d_model != C)
        return pr_errorf(err, PR_ERR_INVALID, "the head reads d_model %d, the model's is %d", C,
                         pr_model_get_config(m)->d_model);
    pr_model_set_training(m, 0);
    int rc = pr_model_reserve(m, B, T, err);
    if (rc)
        return rc;
    int *tokens = malloc(sizeof(int) * (size_t)B * T), *lengths = malloc(sizeof(int) * (size_t)B);
    int *labels = malloc(sizeof(int) * (size_t)B);
    size_t *idx = malloc(sizeof(size_t) * (size_t)B);
    float *z = malloc(sizeof(float) * (size_t)K);
    out->n = (int)ds->n;
    out->K = K;
    out->gold = malloc(sizeof(int) * (ds->n ? ds->n : 1));
    out->probs = malloc(sizeof(float) * (ds->n ? ds->n : 1) * (size_t)K);
    if (!tokens || !lengths || !labels || !idx || !z || !out->gold || !out->probs)
        rc = pr_errorf(err, PR_ERR_NOMEM, "out of memory for classification");
    int pad = data_pad_id(tok);
    double sum = 0.0;
    for (size_t i = 0; i < ds->n && !rc; i += (size_t)B) {
        int rows = (int)((ds->n - i) < (size_t)B ? (ds->n - i) : (size_t)B);
        for (int b = 0; b < rows; b++)
            idx[b] = i + (size_t)b;
        if ((rc = data_make_batch(ds, idx, rows, B, T, tokens, NULL, lengths, labels, pad, err)))
            break;
        pr_batch bt = {.tokens = tokens, .targets = NULL, .B = B, .T = T, .hidden_only = 1};
        if ((rc = pr_model_forward(m, &bt, NULL, err)))
            break;
        const float *hidden = pr_model_hidden(m);
        for (int b = 0; b < rows; b++) {
            train_head_logits(h->weight, h->bias, hidden + ((size_t)b * T + (size_t)(lengths[b] - 1)) * C, C, K, z);
            double mx = z[0], s = 0.0;
            for (int k = 1; k < K; k++)
                mx = z[k] > mx ? z[k] : mx;
            for (int k = 0; k < K; k++)
                s += exp(z[k] - mx);
            int g = ds->ex[i + (size_t)b].label;
            out->gold[i + (size_t)b] = g;
            if (g >= 0) {
                sum += -(z[g] - mx - log(s));
                out->n_labelled++;
            }
            for (int k = 0; k < K; k++)
                out->probs[(i + (size_t)b) * K + (size_t)k] = (float)(exp(z[k] - mx) / s);
        }
    }
    out->loss = out->n_labelled ? sum / out->n_labelled : NAN;
    free(tokens);
    free(lengths);
    free(labels);
    free(idx);
    free(z);
    if (rc)
        pr_cls_predictions_free(out);
    return rc;
}

static data_labels labels_of(const pr_head *h)
{
    return (data_labels){.n = h->n_labels, .is_int = h->int_labels, .names = h->labels};
}

int pr_classify_file(pr_model *m, const pr_tokenizer *tok, const pr_head *h, const char *path, int T, int batch,
                     int labels_optional, pr_cls_predictions *out, pr_error *err)
{
    memset(out, 0, sizeof *out);
    data_labels L = labels_of(h);
    data_options o = {.labels = &L, .label_optional = labels_optional};
    data_dataset ds;
    int rc = data_load(path, "jsonl", "classification", tok, T, &o, &ds, err);
    if (rc)
        return rc;
    if (ds.n == 0)
        rc = pr_errorf(err, PR_ERR_INVALID, "%s: no records to classify", path);
    else
        rc = classify_dataset(m, tok, h, &ds, T, batch, out, err);
    data_dataset_free(&ds);
    return rc;
}

int pr_classify_split(pr_model *m, const pr_tokenizer *tok, const pr_head *h, const char *train_path,
                      const char *val_path, double val_fraction, uint64_t seed, int T, int batch,
                      pr_cls_predictions *out, pr_error *err)
{
    if (val_path)
        return pr_classify_file(m, tok, h, val_path, T, batch, 0, out, err);
    memset(out, 0, sizeof *out);
    data_labels L = labels_of(h);
    data_options o = {.labels = &L};
    data_dataset all, tr, val;
    int rc = data_load(train_path, "jsonl", "classification", tok, T, &o, &all, err);
    if (rc)
        return rc;
    rc = data_split(&all, val_fraction, seed, &tr, &val, err);
    data_dataset_free(&all);
    if (rc)
        return rc;
    rc = classify_dataset(m, tok, h, &val, T, batch, out, err);
    data_dataset_free(&tr);
    data_dataset_free(&val);
    return rc;
}

static int argmax(const float *p, int K)
{
    int a = 0;
    for (int k = 1; k < K; k++)
        if (p[k] > p[a])
            a = k;
    return a;
}

void pr_cls_score(const pr_cls_predictions *p, pr_cls_scores *s, int *per_n, int *per_correct)
{
    int K = p->K;
    memset(s, 0, sizeof *s);
    memset(per_n, 0, sizeof(int) * (size_t)K);
    memset(per_correct, 0, sizeof(int) * (size_t)K);
    int *n_pred = calloc((size_t)K, sizeof(int));
    int correct = 0;
    for (int i = 0; i < p->n; i++) {
        int g = p->gold[i];
        if (g < 0)
            continue;
        int a = argmax(p->probs + (size_t)i * K, K);
        s->n++;
        per_n[g]++;
        if (n_pred)
            n_pred[a]++;
        if (a == g) {
            per_correct[g]++;
            correct++;
        }
    }
    double f1 = 0.0;
    int used = 0;
    for (int k = 0; k < K && n_pred; k++) {
        /* 2TP + FP + FN = (gold k) + (predicted k) */
        int den = per_n[k] + n_pred[k];
        if (den == 0)
            continue;
        f1 += 2.0 * per_correct[k] / den;
        used++;
    }
    free(n_pred);
    s->loss = p->loss;
    s->accuracy = s->n ? (double)correct / s->n : NAN;
    s->macro_f1 = used ? f1 / used : NAN;
}
