/* peftref core: training data: loading, splitting, sampling, batching.
 * The rules (chunking, end-of-text, prompt masking, truncation, label
 * sets, padding) are stated in docs/data.md and core/train/data.h. */
#include "config.h"

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "data.h"
#include "fileio.h"
#include "rng.h"

#define DATA_DEFAULT_MAX_BYTES ((size_t)1 << 30)
#define DATA_MAX_INT_LABEL 65535

/* ---- growing a dataset ---------------------------------------------------- */

typedef struct builder {
    data_dataset *ds;
    size_t cap_tokens;
    size_t cap_ex;
} builder;

static int builder_add(builder *b, const int *toks, int n, int n_prompt, int label, pr_error *err)
{
    data_dataset *ds = b->ds;
    if (ds->n_tokens + (size_t)n > b->cap_tokens) {
        size_t cap = b->cap_tokens ? b->cap_tokens : 4096;
        while (cap < ds->n_tokens + (size_t)n)
            cap *= 2;
        int *t = realloc(ds->tokens, cap * sizeof *t);
        if (!t)
            return pr_errorf(err, PR_ERR_NOMEM, "data: cannot allocate %zu tokens", cap);
        ds->tokens = t;
        b->cap_tokens = cap;
    }
    if (ds->n == b->cap_ex) {
        size_t cap = b->cap_ex ? 2 * b->cap_ex : 256;
        data_example *e = realloc(ds->ex, cap * sizeof *e);
        if (!e)
            return pr_errorf(err, PR_ERR_NOMEM, "data: cannot allocate %zu examples", cap);
        ds->ex = e;
        b->cap_ex = cap;
    }
    data_example *e = &ds->ex[ds->n++];
    e->off = ds->n_tokens;
    e->n = n;
    e->n_prompt = n_prompt;
    e->label = label;
    memcpy(ds->tokens + ds->n_tokens, toks, (size_t)n * sizeof *toks);
    ds->n_tokens += (size_t)n;
    return PR_OK;
}

/* Windows of up to T+1 tokens starting every T tokens: the inputs of
 * consecutive windows do not overlap and every token after the first is a
 * target exactly once (the windows of pr_eval_tokens).  A last window
 * with fewer than T+1 tokens is kept when it has at least 2. */
static int builder_add_chunks(builder *b, const int *toks, size_t n, int T, pr_error *err)
{
    for (size_t s = 0; s + 1 < n; s += (size_t)T) {
        size_t len = n - s < (size_t)T + 1 ? n - s : (size_t)T + 1;
        int rc = builder_add(b, toks + s, (int)len, 0, -1, err);
        if (rc)
            return rc;
    }
    return PR_OK;
}

/* A growing int buffer for one record's tokens. */
typedef struct ibuf {
    int *v;
    size_t n, cap;
} ibuf;

static int ibuf_push(ibuf *b, const int *v, size_t n, pr_error *err)
{
    if (b->n + n > b->cap) {
        size_t cap = b->cap ? b->cap : 1024;
        while (cap < b->n + n)
            cap *= 2;
        int *p = realloc(b->v, cap * sizeof *p);
        if (!p)
            return pr_errorf(err, PR_ERR_NOMEM, "data: cannot allocate %zu tokens", cap);
        b->v = p;
        b->cap = cap;
    }
    if (n)
        memcpy(b->v + b->n, v, n * sizeof *v);
    b->n += n;
    return PR_OK;
}

/* ---- labels ----------------------------------------------------------------- */

void data_labels_free(data_labels *labels)
{
    if (!labels)
        return;
    for (int i = 0; i < labels->n; i++)
        free(labels->names[i]);
    free(labels->names);
    memset(labels, 0, sizeof *labels);
}

int data_labels_copy(data_labels *dst, const data_labels *src, pr_error *err)
{
    memset(dst, 0, sizeof *dst);
    if (src->n == 0)
        return PR_OK;
    dst->names = calloc((size_t)src->n, sizeof *dst->names);
    if (!dst->names)
        return pr_errorf(err, PR_ERR_NOMEM, "data: cannot allocate %d label names", src->n);
    dst->is_int = src->is_int;
    for (int i = 0; i < src->n; i++) {
        dst->names[i] = strdup(src->names[i]);
        if (!dst->names[i]) {
            dst->n = i;
            data_labels_free(dst);
            return pr_errorf(err, PR_ERR_NOMEM, "data: cannot copy label names");
        }
    }
    dst->n = src->n;
    return PR_OK;
}

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* Index of a string label in a sorted label set, or -1. */
static int label_find(const data_labels *L, const char *s)
{
    int lo = 0, hi = L->n - 1;
    while (lo <= hi) {
        int mid = lo + (hi - lo) / 2;
        int c = strcmp(L->names[mid], s);
        if (c == 0)
            return mid;
        if (c < 0)
            lo = mid + 1;
        else
            hi = mid - 1;
    }
    return -1;
}

/* ---- JSON Lines ------------------------------------------------------------- */

static const char *json_kind(const json_t *v)
{
    switch (json_typeof(v)) {
    case JSON_OBJECT: return "an object";
    case JSON_ARRAY: return "an array";
    case JSON_STRING: return "a string";
    case JSON_INTEGER: return "an integer";
    case JSON_REAL: return "a real number";
    case JSON_TRUE:
    case JSON_FALSE: return "a boolean";
    case JSON_NULL: return "null";
    }
    return "an unknown value";
}

static int get_string(const json_t *rec, const char *key, const char *path, int line, const char **s,
                      size_t *len, pr_error *err)
{
    const json_t *v = json_object_get(rec, key);
    if (!v)
        return pr_errorf(err, PR_ERR_FORMAT, "%s:%d: field \"%s\" is missing", path, line, key);
    if (!json_is_string(v))
        return pr_errorf(err, PR_ERR_FORMAT, "%s:%d: field \"%s\" must be a string, not %s", path, line,
                         key, json_kind(v));
    *s = json_string_value(v);
    *len = json_string_length(v);
    return PR_OK;
}

static int encode_field(const pr_tokenizer *tok, const char *s, size_t len, const char *path, int line,
                        const char *key, int **ids, size_t *n, pr_error *err)
{
    pr_error e = {0};
    int rc = pr_tokenizer_encode(tok, s, len, ids, n, &e);
    if (rc) {
        *ids = NULL;
        return pr_errorf(err, (pr_status)rc, "%s:%d: field \"%s\": %s", path, line, key, e.msg);
    }
    return PR_OK;
}

typedef struct jsonl_ctx {
    const char *path;
    const pr_tokenizer *tok;
    int T;
    int eot;                    /* appended to lm records, or -1 */
    const data_labels *given;   /* fixed label set, or NULL */
    int label_optional;         /* with given: a record may lack "label" */
    builder b;
    ibuf seq;
    /* classification without a given label set: the labels as read */
    int label_kind;             /* 0 unknown, 1 strings, 2 integers */
    char **raw;                 /* per example: the string label */
    size_t cap_raw;
    long long max_int;
} jsonl_ctx;

/* {"text": ...}: the record's tokens, then EOT, cut into windows. */
static int lm_text_record(jsonl_ctx *c, const json_t *rec, int line, pr_error *err)
{
    const char *s;
    size_t len, n;
    int *ids;
    int rc = get_string(rec, "text", c->path, line, &s, &len, err);
    if (!rc)
        rc = encode_field(c->tok, s, len, c->path, line, "text", &ids, &n, err);
    if (rc)
        return rc;
    c->seq.n = 0;
    rc = ibuf_push(&c->seq, ids, n, err);
    free(ids);
    if (!rc && c->eot >= 0)
        rc = ibuf_push(&c->seq, &c->eot, 1, err);
    if (rc)
        return rc;
    if (c->seq.n < 2) {
        c->b.ds->n_skipped++;
        return PR_OK;
    }
    return builder_add_chunks(&c->b, c->seq.v, c->seq.n, c->T, err);
}

/* {"prompt": ..., "completion": ...}: prompt ++ completion ++ EOT in one
 * example of at most T+1 tokens.  Too long: drop prompt tokens from the
 * left; when the completion alone leaves no room, keep the prompt's last
 * token and cut the completion on the right. */
static int lm_prompt_record(jsonl_ctx *c, const json_t *rec, int line, pr_error *err)
{
    const char *ps, *cs;
    size_t plen, clen, np, nc;
    int *pids = NULL, *cids = NULL;
    int rc = get_string(rec, "prompt", c->path, line, &ps, &plen, err);
    if (!rc)
        rc = get_string(rec, "completion", c->path, line, &cs, &clen, err);
    if (!rc)
        rc = encode_field(c->tok, ps, plen, c->path, line, "prompt", &pids, &np, err);
    if (!rc)
        rc = encode_field(c->tok, cs, clen, c->path, line, "completion", &cids, &nc, err);
    if (rc) {
        free(pids);
        return rc;
    }
    size_t P = np, C = nc + (c->eot >= 0 ? 1 : 0), L = (size_t)c->T + 1;
    size_t keep_p = P, keep_c = C;
    if (P + C > L) {
        c->b.ds->n_truncated++;
        size_t min_p = P > 0 ? 1 : 0;
        if (C + min_p <= L) {
            keep_p = L - C;
        } else {
            keep_p = min_p;
            keep_c = L - min_p;
        }
    }
    int skip = C == 0 || keep_p + keep_c < 2;
    if (skip) {
        c->b.ds->n_skipped++;
    } else {
        /* last keep_p prompt tokens ++ first keep_c of completion ++ EOT */
        size_t from_c = keep_c < nc ? keep_c : nc;
        c->seq.n = 0;
        rc = ibuf_push(&c->seq, pids + (P - keep_p), keep_p, err);
        if (!rc)
            rc = ibuf_push(&c->seq, cids, from_c, err);
        if (!rc && keep_c > from_c)
            rc = ibuf_push(&c->seq, &c->eot, 1, err);
    }
    free(pids);
    free(cids);
    if (rc || skip)
        return rc;
    return builder_add(&c->b, c->seq.v, (int)(keep_p + keep_c), (int)keep_p, -1, err);
}

/* {"text": ..., "label": string | integer}: the first T tokens. */
static int cls_record(jsonl_ctx *c, const json_t *rec, int line, pr_error *err)
{
    const json_t *lab = json_object_get(rec, "label");
    const char *s;
    size_t len, n;
    int *ids;
    int rc = get_string(rec, "text", c->path, line, &s, &len, err);
    if (rc)
        return rc;
    int label = -1, kind = json_is_string(lab) ? 1 : json_is_integer(lab) ? 2 : 0;
    if (!lab && c->given && c->label_optional)
        goto text;
    if (!lab)
        return pr_errorf(err, PR_ERR_FORMAT, "%s:%d: field \"label\" is missing", c->path, line);
    if (!kind)
        return pr_errorf(err, PR_ERR_FORMAT, "%s:%d: field \"label\" must be a string or an integer, not %s",
                         c->path, line, json_kind(lab));
    int want = c->given ? (c->given->is_int ? 2 : 1) : c->label_kind;
    if (want && kind != want)
        return pr_errorf(err, PR_ERR_FORMAT, "%s:%d: field \"label\" is %s, but %s labels are %s", c->path,
                         line, json_kind(lab), c->given ? "the training set's" : "earlier records'",
                         want == 1 ? "strings" : "integers");
    c->label_kind = kind;
    if (kind == 2) {
        json_int_t v = json_integer_value(lab);
        if (v < 0 || v > DATA_MAX_INT_LABEL)
            return pr_errorf(err, PR_ERR_FORMAT, "%s:%d: field \"label\": %lld is outside 0..%d", c->path,
                             line, (long long)v, DATA_MAX_INT_LABEL);
        if (c->given && v >= c->given->n)
            return pr_errorf(err, PR_ERR_FORMAT,
                             "%s:%d: field \"label\": %lld is not in the training label set (0..%d)",
                             c->path, line, (long long)v, c->given->n - 1);
        if (v > c->max_int)
            c->max_int = v;
        label = (int)v;
    } else if (json_string_length(lab) == 0) {
        return pr_errorf(err, PR_ERR_FORMAT, "%s:%d: field \"label\" is an empty string (a label needs a name)",
                         c->path, line);
    } else if (c->given) {
        label = label_find(c->given, json_string_value(lab));
        if (label < 0)
            return pr_errorf(err, PR_ERR_FORMAT, "%s:%d: field \"label\": \"%s\" is not in the training label set",
                             c->path, line, json_string_value(lab));
    }
text:
    rc = encode_field(c->tok, s, len, c->path, line, "text", &ids, &n, err);
    if (rc)
        return rc;
    if (n == 0) {
        free(ids);
        return pr_errorf(err, PR_ERR_FORMAT, "%s:%d: field \"text\" gives no tokens", c->path, line);
    }
    if (n > (size_t)c->T) {
        n = (size_t)c->T;
        c->b.ds->n_truncated++;
    }
    if (kind == 1 && !c->given) {
        size_t i = c->b.ds->n;
        if (i == c->cap_raw) {
            size_t cap = c->cap_raw ? 2 * c->cap_raw : 256;
            char **r = realloc(c->raw, cap * sizeof *r);
            if (!r) {
                free(ids);
                return pr_errorf(err, PR_ERR_NOMEM, "data: cannot allocate %zu labels", cap);
            }
            c->raw = r;
            c->cap_raw = cap;
        }
        c->raw[i] = strdup(json_string_value(lab));
        if (!c->raw[i]) {
            free(ids);
            return pr_errorf(err, PR_ERR_NOMEM, "data: cannot copy a label");
        }
    }
    rc = builder_add(&c->b, ids, (int)n, 0, label, err);
    if (rc && kind == 1 && !c->given)
        free(c->raw[c->b.ds->n]); /* the example was not added */
    free(ids);
    return rc;
}

/* The label set of the examples read, and each example's index in it. */
static int cls_finish_labels(jsonl_ctx *c, pr_error *err)
{
    data_dataset *ds = c->b.ds;
    if (c->given)
        return data_labels_copy(&ds->labels, c->given, err);
    data_labels *L = &ds->labels;
    if (c->label_kind == 2) {
        int K = (int)c->max_int + 1;
        L->names = calloc((size_t)K, sizeof *L->names);
        if (!L->names)
            return pr_errorf(err, PR_ERR_NOMEM, "data: cannot allocate %d labels", K);
        L->is_int = 1;
        for (int k = 0; k < K; k++) {
            char buf[16];
            snprintf(buf, sizeof buf, "%d", k);
            L->names[k] = strdup(buf);
            if (!L->names[k])
                return pr_errorf(err, PR_ERR_NOMEM, "data: cannot allocate label names");
            L->n = k + 1;
        }
        return PR_OK;
    }
    /* strings: sorted unique copies */
    char **sorted = malloc(ds->n * sizeof *sorted);
    if (!sorted)
        return pr_errorf(err, PR_ERR_NOMEM, "data: cannot allocate %zu labels", ds->n);
    memcpy(sorted, c->raw, ds->n * sizeof *sorted);
    qsort(sorted, ds->n, sizeof *sorted, cmp_str);
    size_t K = 0;
    for (size_t i = 0; i < ds->n; i++)
        if (i == 0 || strcmp(sorted[i], sorted[i - 1]) != 0)
            sorted[K++] = sorted[i];
    if (K > (size_t)DATA_MAX_INT_LABEL + 1) {
        free(sorted);
        return pr_errorf(err, PR_ERR_FORMAT, "%s: %zu distinct labels, more than %d", c->path, K,
                         DATA_MAX_INT_LABEL + 1);
    }
    L->names = calloc(K, sizeof *L->names);
    if (!L->names) {
        free(sorted);
        return pr_errorf(err, PR_ERR_NOMEM, "data: cannot allocate %zu labels", K);
    }
    for (size_t k = 0; k < K; k++) {
        L->names[k] = strdup(sorted[k]);
        if (!L->names[k]) {
            free(sorted);
            return pr_errorf(err, PR_ERR_NOMEM, "data: cannot allocate label names");
        }
        L->n = (int)k + 1;
    }
    free(sorted);
    for (size_t i = 0; i < ds->n; i++)
        ds->ex[i].label = label_find(L, c->raw[i]);
    return PR_OK;
}

static int is_blank(const char *s, const char *e)
{
    for (; s < e; s++)
        if (*s != ' ' && *s != '\t' && *s != '\r')
            return 0;
    return 1;
}

static int load_jsonl(jsonl_ctx *c, const char *buf, size_t len, int task, pr_error *err)
{
    const char *p = buf, *end = buf + len;
    if (len >= 3 && memcmp(p, "\xEF\xBB\xBF", 3) == 0)
        p += 3; /* a UTF-8 byte-order mark */
    int rc = PR_OK;
    for (int line = 1; p < end && !rc; line++) {
        const char *nl = memchr(p, '\n', (size_t)(end - p));
        const char *le = nl ? nl : end;
        if (!is_blank(p, le)) {
            json_error_t jerr;
            json_t *rec = json_loadb(p, (size_t)(le - p), JSON_REJECT_DUPLICATES, &jerr);
            if (!rec) {
                rc = pr_errorf(err, PR_ERR_FORMAT, "%s:%d:%d: invalid JSON: %s", c->path, line, jerr.column,
                               jerr.text);
            } else if (!json_is_object(rec)) {
                rc = pr_errorf(err, PR_ERR_FORMAT, "%s:%d: a record must be a JSON object, not %s", c->path,
                               line, json_kind(rec));
            } else {
                c->b.ds->n_records++;
                if (task == DATA_TASK_CLASSIFICATION)
                    rc = cls_record(c, rec, line, err);
                else if (json_object_get(rec, "prompt") || json_object_get(rec, "completion"))
                    rc = lm_prompt_record(c, rec, line, err);
                else
                    rc = lm_text_record(c, rec, line, err);
            }
            json_decref(rec);
        }
        p = le + (nl ? 1 : 0);
    }
    if (!rc && task == DATA_TASK_CLASSIFICATION && c->b.ds->n > 0)
        rc = cls_finish_labels(c, err);
    return rc;
}

/* ---- loading ---------------------------------------------------------------- */

void data_dataset_free(data_dataset *ds)
{
    if (!ds)
        return;
    free(ds->tokens);
    free(ds->ex);
    data_labels_free(&ds->labels);
    memset(ds, 0, sizeof *ds);
}

static int ends_with(const char *s, const char *suffix)
{
    size_t n = strlen(s), m = strlen(suffix);
    return n >= m && strcasecmp(s + n - m, suffix) == 0;
}

int data_load(const char *path, const char *format, const char *task, const pr_tokenizer *tok,
              int seq_len, const data_options *options, data_dataset *ds, pr_error *err)
{
    memset(ds, 0, sizeof *ds);
    data_options defaults = {0};
    const data_options *o = options ? options : &defaults;
    if (!path || !tok)
        return pr_errorf(err, PR_ERR_INVALID, "data: a path and a tokenizer are needed");
    if (seq_len < 1)
        return pr_errorf(err, PR_ERR_INVALID, "%s: seq_len must be at least 1, not %d", path, seq_len);

    int t;
    if (!task || strcmp(task, "lm") == 0)
        t = DATA_TASK_LM;
    else if (strcmp(task, "classification") == 0)
        t = DATA_TASK_CLASSIFICATION;
    else
        return pr_errorf(err, PR_ERR_INVALID, "%s: unknown task \"%s\" (lm, classification)", path, task);

    int jsonl;
    if (!format || strcmp(format, "auto") == 0)
        jsonl = ends_with(path, ".jsonl") || ends_with(path, ".json");
    else if (strcmp(format, "jsonl") == 0)
        jsonl = 1;
    else if (strcmp(format, "text") == 0)
        jsonl = 0;
    else
        return pr_errorf(err, PR_ERR_INVALID, "%s: unknown data format \"%s\" (text, jsonl, auto)", path,
                         format);
    if (!jsonl && t == DATA_TASK_CLASSIFICATION)
        return pr_errorf(err, PR_ERR_UNSUPPORTED,
                         "%s: classification data must be JSON Lines records with \"text\" and \"label\"", path);
    if (o->labels && t != DATA_TASK_CLASSIFICATION)
        return pr_errorf(err, PR_ERR_INVALID, "%s: a label set is only meaningful for classification", path);

    char *buf;
    size_t len;
    int rc = fileio_read_all(path, o->max_bytes ? o->max_bytes : DATA_DEFAULT_MAX_BYTES, &buf, &len, err);
    if (rc)
        return rc;
    ds->task = t;
    ds->seq_len = seq_len;
    builder b = {.ds = ds};

    if (!jsonl) {
        int *ids;
        size_t n;
        pr_error e = {0};
        rc = pr_tokenizer_encode(tok, buf, len, &ids, &n, &e);
        if (rc) {
            rc = pr_errorf(err, (pr_status)rc, "%s: %s", path, e.msg);
        } else {
            ds->n_records = 1;
            rc = builder_add_chunks(&b, ids, n, seq_len, err);
            free(ids);
        }
    } else {
        jsonl_ctx c = {
            .path = path,
            .tok = tok,
            .T = seq_len,
            .eot = o->no_eot ? -1 : pr_tokenizer_eot(tok),
            .given = o->labels,
            .label_optional = o->label_optional,
            .b = b,
            .max_int = -1,
        };
        rc = load_jsonl(&c, buf, len, t, err);
        if (c.raw) {
            /* raw labels exist for examples 0..n-1 (on failure, n at the time) */
            for (size_t i = 0; i < ds->n; i++)
                free(c.raw[i]);
            free(c.raw);
        }
        free(c.seq.v);
    }
    free(buf);
    if (!rc && ds->n == 0)
        rc = pr_errorf(err, PR_ERR_FORMAT, "%s: no examples (%zu record%s read, %zu with nothing to score)", path,
                       ds->n_records, ds->n_records == 1 ? "" : "s", ds->n_skipped);
    if (rc)
        data_dataset_free(ds);
    return rc;
}

/* ---- shuffles ------------------------------------------------------------- */

/* uniform in [0, bound) without modulo bias (Lemire's threshold) */
static uint64_t below(pr_rng *r, uint64_t bound)
{
    uint64_t threshold = (0 - bound) % bound;
    for (;;) {
        uint64_t x = rng_next(r);
        if (x >= threshold)
            return x % bound;
    }
}

/* Fisher-Yates over a[0..n-1] */
static void shuffle(size_t *a, size_t n, pr_rng *r)
{
    for (size_t i = n; i > 1; i--) {
        size_t j = (size_t)below(r, (uint64_t)i);
        size_t t = a[i - 1];
        a[i - 1] = a[j];
        a[j] = t;
    }
}

/* a stream per (seed, purpose, epoch): the seed is mixed before the
 * epoch is folded in, so nearby seeds and epochs give unrelated orders */
static void seed_stream(pr_rng *r, uint64_t seed, uint64_t purpose, uint64_t epoch)
{
    pr_rng m;
    rng_seed(&m, seed ^ purpose);
    rng_seed(r, rng_next(&m) ^ epoch);
}

#define PURPOSE_SPLIT 0x73706c6974ULL   /* "split" */
#define PURPOSE_EPOCH 0x65706f6368ULL   /* "epoch" */

/* ---- split ---------------------------------------------------------------- */

static int subset(const data_dataset *ds, const unsigned char *mark, unsigned char want, data_dataset *out,
                  pr_error *err)
{
    memset(out, 0, sizeof *out);
    out->task = ds->task;
    out->seq_len = ds->seq_len;
    builder b = {.ds = out};
    for (size_t i = 0; i < ds->n; i++) {
        if (mark[i] != want)
            continue;
        const data_example *e = &ds->ex[i];
        int rc = builder_add(&b, ds->tokens + e->off, e->n, e->n_prompt, e->label, err);
        if (rc) {
            data_dataset_free(out);
            return rc;
        }
    }
    int rc = data_labels_copy(&out->labels, &ds->labels, err);
    if (rc)
        data_dataset_free(out);
    return rc;
}

int data_split(const data_dataset *ds, double val_fraction, uint64_t seed, data_dataset *train,
               data_dataset *val, pr_error *err)
{
    memset(train, 0, sizeof *train);
    memset(val, 0, sizeof *val);
    if (!(val_fraction > 0.0 && val_fraction < 1.0))
        return pr_errorf(err, PR_ERR_INVALID, "data: validation fraction must be in (0, 1), not %g", val_fraction);
    if (ds->n < 2)
        return pr_errorf(err, PR_ERR_INVALID, "data: %zu example%s cannot be split into train and validation",
                         ds->n, ds->n == 1 ? "" : "s");
    size_t n_val = (size_t)((double)ds->n * val_fraction + 0.5);
    if (n_val < 1)
        n_val = 1;
    if (n_val > ds->n - 1)
        n_val = ds->n - 1;

    size_t *perm = malloc(ds->n * sizeof *perm);
    unsigned char *mark = calloc(ds->n, 1);
    if (!perm || !mark) {
        free(perm);
        free(mark);
        return pr_errorf(err, PR_ERR_NOMEM, "data: cannot allocate a split of %zu examples", ds->n);
    }
    for (size_t i = 0; i < ds->n; i++)
        perm[i] = i;
    pr_rng r;
    seed_stream(&r, seed, PURPOSE_SPLIT, 0);
    shuffle(perm, ds->n, &r);
    for (size_t i = 0; i < n_val; i++)
        mark[perm[i]] = 1;
    free(perm);
    int rc = subset(ds, mark, 0, train, err);
    if (!rc)
        rc = subset(ds, mark, 1, val, err);
    if (rc)
        data_dataset_free(train);
    free(mark);
    return rc;
}

/* ---- batches -------------------------------------------------------------- */

int data_pad_id(const pr_tokenizer *tok)
{
    int eot = tok ? pr_tokenizer_eot(tok) : -1;
    return eot >= 0 ? eot : 0;
}

int data_make_batch(const data_dataset *ds, const size_t *idx, int n_idx, int B, int T, int *tokens,
                    int *targets, int *lengths, int *labels, int pad_id, pr_error *err)
{
    if (B < 1 || T < 1 || n_idx < 0 || n_idx > B)
        return pr_errorf(err, PR_ERR_INVALID, "data: batch of %d examples in B = %d rows of T = %d", n_idx, B, T);
    int lm = ds->task != DATA_TASK_CLASSIFICATION;
    for (int b = 0; b < B; b++) {
        int *tok_row = tokens + (size_t)b * (size_t)T;
        int *tgt_row = targets ? targets + (size_t)b * (size_t)T : NULL;
        const data_example *e = NULL;
        if (b < n_idx) {
            if (idx[b] >= ds->n)
                return pr_errorf(err, PR_ERR_INVALID, "data: example %zu does not exist (%zu examples)", idx[b],
                                 ds->n);
            e = &ds->ex[idx[b]];
        }
        int len = e ? (lm ? e->n - 1 : e->n) : 0;
        if (len > T)
            return pr_errorf(err, PR_ERR_INVALID, "data: example %zu has %d positions, more than T = %d", idx[b],
                             len, T);
        const int *src = e ? ds->tokens + e->off : NULL;
        for (int t = 0; t < T; t++) {
            tok_row[t] = t < len ? src[t] : pad_id;
            if (tgt_row)
                tgt_row[t] = (lm && t < len && t >= e->n_prompt - 1) ? src[t + 1] : DATA_IGNORE;
        }
        if (lengths)
            lengths[b] = len;
        if (labels)
            labels[b] = (e && !lm) ? e->label : -1;
    }
    return PR_OK;
}

int64_t data_count_scored(const data_dataset *ds, const size_t *idx, size_t n_idx)
{
    size_t n = idx ? n_idx : ds->n;
    int64_t total = 0;
    for (size_t i = 0; i < n; i++) {
        size_t k = idx ? idx[i] : i;
        if (k >= ds->n)
            continue;
        const data_example *e = &ds->ex[k];
        if (ds->task == DATA_TASK_CLASSIFICATION) {
            total += 1;
        } else {
            int masked = e->n_prompt > 1 ? e->n_prompt - 1 : 0;
            total += e->n - 1 - masked;
        }
    }
    return total;
}

/* ---- sampler -------------------------------------------------------------- */

static void sampler_order(data_sampler *s)
{
    for (size_t i = 0; i < s->n; i++)
        s->perm[i] = i;
    if (s->shuffle) {
        pr_rng r;
        seed_stream(&r, s->seed, PURPOSE_EPOCH, s->epoch);
        shuffle(s->perm, s->n, &r);
    }
}

int data_sampler_init(data_sampler *s, size_t n, uint64_t seed, int shuffle_on, pr_error *err)
{
    memset(s, 0, sizeof *s);
    if (n == 0)
        return pr_errorf(err, PR_ERR_INVALID, "data: a sampler needs at least one example");
    s->perm = malloc(n * sizeof *s->perm);
    if (!s->perm)
        return pr_errorf(err, PR_ERR_NOMEM, "data: cannot allocate a sampler over %zu examples", n);
    s->n = n;
    s->seed = seed;
    s->shuffle = shuffle_on != 0;
    sampler_order(s);
    return PR_OK;
}

void data_sampler_free(data_sampler *s)
{
    if (!s)
        return;
    free(s->perm);
    memset(s, 0, sizeof *s);
}

void data_sampler_next(data_sampler *s, size_t *idx, int B)
{
    for (int i = 0; i < B; i++) {
        if (s->cursor == s->n) {
            s->epoch++;
            s->cursor = 0;
            sampler_order(s);
        }
        idx[i] = s->perm[s->cursor++];
    }
}

void data_sampler_get_position(const data_sampler *s, uint64_t *epoch, uint64_t *cursor)
{
    *epoch = s->epoch;
    *cursor = (uint64_t)s->cursor;
}

int data_sampler_set_position(data_sampler *s, uint64_t epoch, uint64_t cursor, pr_error *err)
{
    if (cursor > (uint64_t)s->n)
        return pr_errorf(err, PR_ERR_INVALID, "data: sampler cursor %llu is past the %zu examples",
                         (unsigned long long)cursor, s->n);
    s->epoch = epoch;
    s->cursor = (size_t)cursor;
    sampler_order(s);
    return PR_OK;
}
