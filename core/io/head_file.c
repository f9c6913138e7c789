/* peftref: the classification head's file (see include/peftref/head.h). */
#include "config.h"

#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "peftref/head.h"
#include "safetensors.h"

void pr_head_free(pr_head *h)
{
    if (!h)
        return;
    for (int k = 0; h->labels && k < h->n_labels; k++)
        free(h->labels[k]);
    free(h->labels);
    free(h->weight);
    free(h->bias);
    memset(h, 0, sizeof *h);
}

/* Room for a head of C x K with K empty names. */
static int head_alloc(pr_head *h, int C, int K, pr_error *err)
{
    memset(h, 0, sizeof *h);
    h->labels = calloc((size_t)K, sizeof *h->labels);
    h->weight = malloc(sizeof(float) * (size_t)C * (size_t)K);
    h->bias = malloc(sizeof(float) * (size_t)K);
    if (!h->labels || !h->weight || !h->bias) {
        free(h->labels);
        free(h->weight);
        free(h->bias);
        memset(h, 0, sizeof *h);
        return pr_errorf(err, PR_ERR_NOMEM, "out of memory for a %d x %d head", C, K);
    }
    h->d_model = C;
    h->n_labels = K;
    return PR_OK;
}

int pr_head_copy(pr_head *dst, const pr_head *src, pr_error *err)
{
    int rc = head_alloc(dst, src->d_model, src->n_labels, err);
    if (rc)
        return rc;
    dst->int_labels = src->int_labels;
    memcpy(dst->weight, src->weight, sizeof(float) * (size_t)src->d_model * (size_t)src->n_labels);
    memcpy(dst->bias, src->bias, sizeof(float) * (size_t)src->n_labels);
    for (int k = 0; k < src->n_labels; k++)
        if (!(dst->labels[k] = strdup(src->labels[k]))) {
            pr_head_free(dst);
            return pr_errorf(err, PR_ERR_NOMEM, "out of memory");
        }
    return PR_OK;
}

int pr_head_save(const pr_head *h, const char *path, int64_t steps, double val_loss, pr_error *err)
{
    int C = h->d_model, K = h->n_labels;
    if (K < 1 || C < 1)
        return pr_errorf(err, PR_ERR_INVALID, "%s: no head to save", path);
    /* (C,K) in memory; (K,C) in the file, as torch.nn.Linear(C, K).weight */
    float *wt = malloc(sizeof(float) * (size_t)C * (size_t)K);
    json_t *labels = json_array();
    if (!wt || !labels) {
        free(wt);
        json_decref(labels);
        return pr_errorf(err, PR_ERR_NOMEM, "out of memory");
    }
    for (int c = 0; c < C; c++)
        for (int k = 0; k < K; k++)
            wt[(size_t)k * C + c] = h->weight[(size_t)c * K + k];
    for (int k = 0; k < K; k++)
        json_array_append_new(labels, json_string(h->labels[k]));
    char *lab = json_dumps(labels, JSON_COMPACT);
    json_decref(labels);
    char dm[24], nl[24], tr[160];
    snprintf(dm, sizeof dm, "%d", C);
    snprintf(nl, sizeof nl, "%d", K);
    if (isfinite(val_loss))
        snprintf(tr, sizeof tr, "{\"steps\":%lld,\"final_val_loss\":%.9g}", (long long)steps, val_loss);
    else
        snprintf(tr, sizeof tr, "{\"steps\":%lld}", (long long)steps);
    st_entry e[2] = {{.name = "weight", .ndim = 2, .shape = {K, C}, .data = wt},
                     {.name = "bias", .ndim = 1, .shape = {K}, .data = h->bias}};
    st_kv meta[] = {{"format", "peftref-head"}, {"task", "classification"}, {"pooling", "last_token"},
                    {"d_model", dm}, {"n_labels", nl}, {"label_type", h->int_labels ? "integer" : "string"},
                    {"labels", lab ? lab : "[]"}, {"training", tr}};
    int rc = lab ? (int)st_write(path, e, 2, meta, (int)(sizeof meta / sizeof meta[0]), err)
                 : (int)pr_errorf(err, PR_ERR_NOMEM, "out of memory");
    free(lab);
    free(wt);
    return rc;
}

static int meta_int(const st_file *f, const char *key, int *out)
{
    const char *s = st_metadata(f, key);
    char *end = NULL;
    long v = s ? strtol(s, &end, 10) : 0;
    if (!s || *end || v < 1 || v > (1 << 24))
        return -1;
    *out = (int)v;
    return 0;
}

int pr_head_load(const char *path, int d_model, pr_head *h, pr_error *err)
{
    memset(h, 0, sizeof *h);
    st_file *f = NULL;
    int rc = st_open(path, 0, &f, err);
    if (rc)
        return rc;
    int C = 0, K = 0;
    const char *fmt = st_metadata(f, "format"), *pool = st_metadata(f, "pooling");
    const char *lt = st_metadata(f, "label_type");
    const st_tensor *w = st_find(f, "weight"), *b = st_find(f, "bias");
    json_t *labels = NULL;
    if (!fmt || strcmp(fmt, "peftref-head") != 0)
        rc = pr_errorf(err, PR_ERR_FORMAT, "%s: not a peftref head file (metadata \"format\" is %s%s%s)", path,
                       fmt ? "'" : "", fmt ? fmt : "missing", fmt ? "'" : "");
    else if (!pool || strcmp(pool, "last_token") != 0)
        rc = pr_errorf(err, PR_ERR_UNSUPPORTED, "%s: metadata \"pooling\": '%s' is not supported (last_token)",
                       path, pool ? pool : "(missing)");
    else if (meta_int(f, "d_model", &C) || meta_int(f, "n_labels", &K) || K < 2)
        rc = pr_errorf(err, PR_ERR_FORMAT, "%s: metadata \"d_model\" and \"n_labels\" (at least 2) are required",
                       path);
    else if (d_model > 0 && C != d_model)
        rc = pr_errorf(err, PR_ERR_INVALID, "%s: the head reads d_model %d, but the model's is %d", path, C,
                       d_model);
    else if (!w || w->ndim != 2 || w->shape[0] != K || w->shape[1] != C || !b || b->ndim != 1 ||
             b->shape[0] != K)
        rc = pr_errorf(err, PR_ERR_FORMAT, "%s: tensors \"weight\" (%d, %d) and \"bias\" (%d) are required", path,
                       K, C, K);
    else if (!(labels = json_loads(st_metadata(f, "labels") ? st_metadata(f, "labels") : "", 0, NULL)) ||
             !json_is_array(labels) || (int)json_array_size(labels) != K)
        rc = pr_errorf(err, PR_ERR_FORMAT, "%s: metadata \"labels\" must be a JSON array of %d names", path, K);
    if (!rc)
        rc = head_alloc(h, C, K, err);
    float *wt = rc ? NULL : malloc(sizeof(float) * (size_t)C * (size_t)K);
    if (!rc && !wt)
        rc = pr_errorf(err, PR_ERR_NOMEM, "out of memory");
    if (!rc && !(rc = st_to_f32(f, w, wt, err)) && !(rc = st_to_f32(f, b, h->bias, err))) {
        for (int c = 0; c < C; c++)
            for (int k = 0; k < K; k++)
                h->weight[(size_t)c * K + k] = wt[(size_t)k * C + c];
        h->int_labels = lt && strcmp(lt, "integer") == 0;
        for (int k = 0; k < K && !rc; k++) {
            const char *s = json_string_value(json_array_get(labels, (size_t)k));
            if (!s || !*s)
                rc = pr_errorf(err, PR_ERR_FORMAT, "%s: metadata \"labels\"[%d] is not a name", path, k);
            else if (!(h->labels[k] = strdup(s)))
                rc = pr_errorf(err, PR_ERR_NOMEM, "out of memory");
        }
    }
    free(wt);
    json_decref(labels);
    st_close(f);
    if (rc)
        pr_head_free(h);
    return rc;
}
