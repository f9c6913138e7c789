/* peftref core: GGUF writer and reader (gguf.h). */
#include "config.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/base/fileio.h"
#include "core/io/gguf.h"
#include "core/io/safetensors.h"

/* ---- little-endian byte buffer ------------------------------------------ */

typedef struct bytebuf {
    unsigned char *p;
    size_t n, cap;
    int oom;
} bytebuf;

static void bb_put(bytebuf *b, const void *src, size_t len)
{
    if (b->oom)
        return;
    if (b->n + len > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->n + len)
            cap *= 2;
        unsigned char *p = realloc(b->p, cap);
        if (!p) {
            b->oom = 1;
            return;
        }
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->n, src, len);
    b->n += len;
}

static void bb_u32(bytebuf *b, uint32_t v)
{
    unsigned char x[4] = {(unsigned char)v, (unsigned char)(v >> 8), (unsigned char)(v >> 16),
                          (unsigned char)(v >> 24)};
    bb_put(b, x, 4);
}

static void bb_u64(bytebuf *b, uint64_t v)
{
    bb_u32(b, (uint32_t)v);
    bb_u32(b, (uint32_t)(v >> 32));
}

static void bb_str(bytebuf *b, const char *s, size_t len)
{
    bb_u64(b, len);
    bb_put(b, s, len);
}

static void bb_f32(bytebuf *b, float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    bb_u32(b, u);
}

/* ---- writer -------------------------------------------------------------- */

typedef struct wtensor {
    char *name;
    int n_dims;
    int64_t ne[4];
    int type;
    float *data;
    int owned;
} wtensor;

struct gguf_writer {
    bytebuf kv;
    uint64_t n_kv;
    char **keys;
    size_t n_keys, keys_cap;
    wtensor *t;
    size_t n_t, t_cap;
    uint32_t alignment;
    int oom;
    char dup[256];   /* first duplicate key or tensor name */
};

gguf_writer *gguf_writer_new(void)
{
    gguf_writer *w = calloc(1, sizeof *w);
    if (w)
        w->alignment = GGUF_DEFAULT_ALIGNMENT;
    return w;
}

void gguf_writer_free(gguf_writer *w)
{
    if (!w)
        return;
    free(w->kv.p);
    for (size_t i = 0; i < w->n_keys; i++)
        free(w->keys[i]);
    free(w->keys);
    for (size_t i = 0; i < w->n_t; i++) {
        free(w->t[i].name);
        if (w->t[i].owned)
            free(w->t[i].data);
    }
    free(w->t);
    free(w);
}

/* Record key; 0 when it is new. */
static int new_key(gguf_writer *w, const char *key)
{
    for (size_t i = 0; i < w->n_keys; i++)
        if (strcmp(w->keys[i], key) == 0) {
            if (!w->dup[0])
                snprintf(w->dup, sizeof w->dup, "key '%s'", key);
            return -1;
        }
    if (w->n_keys == w->keys_cap) {
        size_t cap = w->keys_cap ? 2 * w->keys_cap : 32;
        char **k = realloc(w->keys, cap * sizeof *k);
        if (!k) {
            w->oom = 1;
            return -1;
        }
        w->keys = k;
        w->keys_cap = cap;
    }
    char *copy = strdup(key);
    if (!copy) {
        w->oom = 1;
        return -1;
    }
    w->keys[w->n_keys++] = copy;
    w->n_kv++;
    bb_str(&w->kv, key, strlen(key));
    return 0;
}

void gguf_set_str(gguf_writer *w, const char *key, const char *value)
{
    if (new_key(w, key))
        return;
    bb_u32(&w->kv, GGUF_T_STRING);
    bb_str(&w->kv, value, strlen(value));
}

void gguf_set_u32(gguf_writer *w, const char *key, uint32_t value)
{
    if (new_key(w, key))
        return;
    bb_u32(&w->kv, GGUF_T_UINT32);
    bb_u32(&w->kv, value);
    if (strcmp(key, "general.alignment") == 0)
        w->alignment = value;
}

void gguf_set_i32(gguf_writer *w, const char *key, int32_t value)
{
    if (new_key(w, key))
        return;
    bb_u32(&w->kv, GGUF_T_INT32);
    bb_u32(&w->kv, (uint32_t)value);
}

void gguf_set_f32(gguf_writer *w, const char *key, float value)
{
    if (new_key(w, key))
        return;
    bb_u32(&w->kv, GGUF_T_FLOAT32);
    bb_f32(&w->kv, value);
}

void gguf_set_bool(gguf_writer *w, const char *key, int value)
{
    if (new_key(w, key))
        return;
    unsigned char v = value ? 1 : 0;
    bb_u32(&w->kv, GGUF_T_BOOL);
    bb_put(&w->kv, &v, 1);
}

void gguf_set_arr_str(gguf_writer *w, const char *key, const char *const *s, const size_t *len, size_t n)
{
    if (new_key(w, key))
        return;
    bb_u32(&w->kv, GGUF_T_ARRAY);
    bb_u32(&w->kv, GGUF_T_STRING);
    bb_u64(&w->kv, n);
    for (size_t i = 0; i < n; i++)
        bb_str(&w->kv, s[i], len[i]);
}

void gguf_set_arr_i32(gguf_writer *w, const char *key, const int32_t *v, size_t n)
{
    if (new_key(w, key))
        return;
    bb_u32(&w->kv, GGUF_T_ARRAY);
    bb_u32(&w->kv, GGUF_T_INT32);
    bb_u64(&w->kv, n);
    for (size_t i = 0; i < n; i++)
        bb_u32(&w->kv, (uint32_t)v[i]);
}

void gguf_set_arr_f32(gguf_writer *w, const char *key, const float *v, size_t n)
{
    if (new_key(w, key))
        return;
    bb_u32(&w->kv, GGUF_T_ARRAY);
    bb_u32(&w->kv, GGUF_T_FLOAT32);
    bb_u64(&w->kv, n);
    for (size_t i = 0; i < n; i++)
        bb_f32(&w->kv, v[i]);
}

void gguf_add_tensor(gguf_writer *w, const char *name, int n_dims, const int64_t *ne, int type, float *data,
                     int owned)
{
    int bad = w->oom || n_dims < 1 || n_dims > 4;
    for (size_t i = 0; i < w->n_t && !bad; i++)
        if (strcmp(w->t[i].name, name) == 0) {
            if (!w->dup[0])
                snprintf(w->dup, sizeof w->dup, "tensor '%s'", name);
            bad = 1;
        }
    if (!bad && w->n_t == w->t_cap) {
        size_t cap = w->t_cap ? 2 * w->t_cap : 64;
        wtensor *t = realloc(w->t, cap * sizeof *t);
        if (!t)
            w->oom = bad = 1;
        else {
            w->t = t;
            w->t_cap = cap;
        }
    }
    char *copy = bad ? NULL : strdup(name);
    if (!copy) {
        if (!bad)
            w->oom = 1;
        if (owned)
            free(data);
        return;
    }
    wtensor *t = &w->t[w->n_t++];
    memset(t, 0, sizeof *t);
    t->name = copy;
    t->n_dims = n_dims;
    for (int d = 0; d < n_dims; d++)
        t->ne[d] = ne[d];
    t->type = type;
    t->data = data;
    t->owned = owned;
}

static uint64_t tensor_numel(const int64_t *ne, int n_dims)
{
    uint64_t n = 1;
    for (int d = 0; d < n_dims; d++)
        n *= (uint64_t)ne[d];
    return n;
}

static uint64_t tensor_bytes(const wtensor *t)
{
    return tensor_numel(t->ne, t->n_dims) * (t->type == GGUF_TENSOR_F16 ? 2u : 4u);
}

static uint64_t align_up(uint64_t x, uint64_t a)
{
    return (x + a - 1) / a * a;
}

/* The values of t in little-endian bytes, chunked through buf. */
static int write_tensor(fileio_writer *fw, const wtensor *t, pr_error *err)
{
    enum { CHUNK = 16384 };
    unsigned char buf[CHUNK * 4];
    uint64_t n = tensor_numel(t->ne, t->n_dims);
    for (uint64_t i = 0; i < n; i += CHUNK) {
        size_t k = (size_t)(n - i < CHUNK ? n - i : CHUNK), len = 0;
        for (size_t j = 0; j < k; j++) {
            float f = t->data[i + j];
            if (t->type == GGUF_TENSOR_F16) {
                uint16_t h = st_f32_to_f16(f);
                buf[len++] = (unsigned char)h;
                buf[len++] = (unsigned char)(h >> 8);
            } else {
                uint32_t u;
                memcpy(&u, &f, 4);
                for (int b = 0; b < 4; b++)
                    buf[len++] = (unsigned char)(u >> (8 * b));
            }
        }
        if (fileio_writer_write(fw, buf, len, err))
            return err->code;
    }
    return PR_OK;
}

int gguf_writer_save(gguf_writer *w, const char *path, pr_error *err)
{
    if (w->oom || w->kv.oom)
        return pr_errorf(err, PR_ERR_NOMEM, "%s: out of memory building the GGUF header", path);
    if (w->dup[0])
        return pr_errorf(err, PR_ERR_INVALID, "%s: %s given twice", path, w->dup);
    if (w->alignment == 0 || (w->alignment & (w->alignment - 1)))
        return pr_errorf(err, PR_ERR_INVALID, "%s: general.alignment %u is not a power of two", path, w->alignment);
    bytebuf h = {0};
    bb_put(&h, "GGUF", 4);
    bb_u32(&h, GGUF_VERSION);
    bb_u64(&h, w->n_t);
    bb_u64(&h, w->n_kv);
    bb_put(&h, w->kv.p, w->kv.n);
    uint64_t off = 0;
    for (size_t i = 0; i < w->n_t; i++) {
        const wtensor *t = &w->t[i];
        bb_str(&h, t->name, strlen(t->name));
        bb_u32(&h, (uint32_t)t->n_dims);
        for (int d = 0; d < t->n_dims; d++)
            bb_u64(&h, (uint64_t)t->ne[d]);
        bb_u32(&h, (uint32_t)t->type);
        bb_u64(&h, off);
        off = align_up(off + tensor_bytes(t), w->alignment);
    }
    static const unsigned char zeros[256];
    size_t pad = (size_t)(align_up(h.n, w->alignment) - h.n);
    while (pad) {
        size_t k = pad < sizeof zeros ? pad : sizeof zeros;
        bb_put(&h, zeros, k);
        pad -= k;
    }
    if (h.oom) {
        free(h.p);
        return pr_errorf(err, PR_ERR_NOMEM, "%s: out of memory building the GGUF header", path);
    }
    fileio_writer fw;
    if (fileio_writer_open(&fw, path, err)) {
        free(h.p);
        return err->code;
    }
    int rc = fileio_writer_write(&fw, h.p, h.n, err);
    free(h.p);
    for (size_t i = 0; i < w->n_t && rc == PR_OK; i++) {
        rc = write_tensor(&fw, &w->t[i], err);
        uint64_t b = tensor_bytes(&w->t[i]);
        for (uint64_t p = align_up(b, w->alignment) - b; rc == PR_OK && p; ) {
            size_t k = p < sizeof zeros ? (size_t)p : sizeof zeros;
            rc = fileio_writer_write(&fw, zeros, k, err);
            p -= k;
        }
    }
    if (rc) {
        fileio_writer_abort(&fw);
        return rc;
    }
    return fileio_writer_commit(&fw, err);
}

/* ---- reader -------------------------------------------------------------- */

typedef struct cursor {
    const unsigned char *p;
    size_t n, at;
    const char *path;
    pr_error *err;
    int failed;
} cursor;

static int need(cursor *c, uint64_t k, const char *what)
{
    if (c->failed)
        return -1;
    if (k > c->n - c->at) {
        pr_errorf(c->err, PR_ERR_FORMAT, "%s: truncated at byte %zu reading %s", c->path, c->at, what);
        c->failed = 1;
        return -1;
    }
    return 0;
}

static uint32_t rd_u32(cursor *c, const char *what)
{
    if (need(c, 4, what))
        return 0;
    const unsigned char *p = c->p + c->at;
    c->at += 4;
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t rd_u64(cursor *c, const char *what)
{
    uint64_t lo = rd_u32(c, what);
    return lo | (uint64_t)rd_u32(c, what) << 32;
}

static char *rd_str(cursor *c, const char *what)
{
    uint64_t len = rd_u64(c, what);
    if (need(c, len, what))
        return NULL;
    char *s = malloc((size_t)len + 1);
    if (!s) {
        pr_errorf(c->err, PR_ERR_NOMEM, "%s: out of memory", c->path);
        c->failed = 1;
        return NULL;
    }
    memcpy(s, c->p + c->at, (size_t)len);
    s[len] = '\0';
    c->at += (size_t)len;
    return s;
}

static size_t scalar_size(uint32_t type)
{
    switch (type) {
    case GGUF_T_UINT8: case GGUF_T_INT8: case GGUF_T_BOOL: return 1;
    case GGUF_T_UINT16: case GGUF_T_INT16: return 2;
    case GGUF_T_UINT32: case GGUF_T_INT32: case GGUF_T_FLOAT32: return 4;
    case GGUF_T_UINT64: case GGUF_T_INT64: case GGUF_T_FLOAT64: return 8;
    default: return 0;
    }
}

/* Skip one value of type (not an array); 0 on success. */
static int skip_value(cursor *c, uint32_t type, const char *key)
{
    if (type == GGUF_T_STRING) {
        uint64_t len = rd_u64(c, key);
        if (need(c, len, key))
            return -1;
        c->at += (size_t)len;
        return 0;
    }
    size_t s = scalar_size(type);
    if (!s) {
        pr_errorf(c->err, PR_ERR_FORMAT, "%s: key '%s' has unknown value type %u", c->path, key, type);
        c->failed = 1;
        return -1;
    }
    if (need(c, s, key))
        return -1;
    c->at += s;
    return 0;
}

void gguf_file_free(gguf_file *f)
{
    if (!f)
        return;
    for (uint64_t i = 0; f->kv && i < f->n_kv; i++)
        free(f->kv[i].key);
    for (uint64_t i = 0; f->tensors && i < f->n_tensors; i++)
        free(f->tensors[i].name);
    free(f->kv);
    free(f->tensors);
    free(f->buf);
    free(f);
}

int gguf_file_read(const char *path, gguf_file **out, pr_error *err)
{
    *out = NULL;
    gguf_file *f = calloc(1, sizeof *f);
    if (!f)
        return pr_errorf(err, PR_ERR_NOMEM, "%s: out of memory", path);
    char *buf;
    if (fileio_read_all(path, (size_t)1 << 40, &buf, &f->len, err)) {
        free(f);
        return err->code;
    }
    f->buf = (unsigned char *)buf;
    cursor c = {f->buf, f->len, 0, path, err, 0};
    if (need(&c, 4, "the magic") == 0 && memcmp(f->buf, "GGUF", 4) != 0) {
        gguf_file_free(f);
        return pr_errorf(err, PR_ERR_FORMAT, "%s: not a GGUF file (magic)", path);
    }
    c.at = 4;
    f->version = rd_u32(&c, "the version");
    f->n_tensors = rd_u64(&c, "the tensor count");
    f->n_kv = rd_u64(&c, "the key/value count");
    if (!c.failed && f->version != GGUF_VERSION) {
        gguf_file_free(f);
        return pr_errorf(err, PR_ERR_FORMAT, "%s: GGUF version %u (this reader knows 3)", path, f->version);
    }
    /* each kv takes at least 12 bytes and each tensor info 24 */
    if (!c.failed && (f->n_kv > f->len / 12 || f->n_tensors > f->len / 24)) {
        gguf_file_free(f);
        return pr_errorf(err, PR_ERR_FORMAT, "%s: counts (%llu kv, %llu tensors) exceed the file", path,
                         (unsigned long long)f->n_kv, (unsigned long long)f->n_tensors);
    }
    if (!c.failed) {
        f->kv = calloc((size_t)f->n_kv + 1, sizeof *f->kv);
        f->tensors = calloc((size_t)f->n_tensors + 1, sizeof *f->tensors);
        if (!f->kv || !f->tensors) {
            gguf_file_free(f);
            return pr_errorf(err, PR_ERR_NOMEM, "%s: out of memory", path);
        }
    }
    f->alignment = GGUF_DEFAULT_ALIGNMENT;
    for (uint64_t i = 0; !c.failed && i < f->n_kv; i++) {
        gguf_kv *kv = &f->kv[i];
        kv->key = rd_str(&c, "a key");
        if (!kv->key)
            break;
        kv->type = rd_u32(&c, kv->key);
        kv->n = 1;
        if (kv->type == GGUF_T_ARRAY) {
            kv->arr_type = rd_u32(&c, kv->key);
            kv->n = rd_u64(&c, kv->key);
            if (c.failed)
                break;
            if (kv->n > f->len) {
                pr_errorf(err, PR_ERR_FORMAT, "%s: array '%s' claims %llu elements", path, kv->key,
                          (unsigned long long)kv->n);
                c.failed = 1;
                break;
            }
            kv->data = f->buf + c.at;
            for (uint64_t j = 0; j < kv->n && !c.failed; j++)
                skip_value(&c, kv->arr_type, kv->key);
        } else {
            kv->data = f->buf + c.at;
            skip_value(&c, kv->type, kv->key);
        }
        if (c.failed)
            break;
        kv->size = (size_t)(f->buf + c.at - kv->data);
        if (strcmp(kv->key, "general.alignment") == 0) {
            uint32_t a;
            if (!gguf_kv_get_u32(kv, &a) || a == 0 || (a & (a - 1))) {
                pr_errorf(err, PR_ERR_FORMAT, "%s: general.alignment is not a u32 power of two", path);
                c.failed = 1;
                break;
            }
            f->alignment = a;
        }
    }
    for (uint64_t i = 0; !c.failed && i < f->n_tensors; i++) {
        gguf_tensor_info *t = &f->tensors[i];
        t->name = rd_str(&c, "a tensor name");
        if (!t->name)
            break;
        t->n_dims = rd_u32(&c, t->name);
        if (!c.failed && (t->n_dims < 1 || t->n_dims > 4)) {
            pr_errorf(err, PR_ERR_FORMAT, "%s: tensor '%s' has %u dimensions", path, t->name, t->n_dims);
            c.failed = 1;
            break;
        }
        for (uint32_t d = 0; d < t->n_dims; d++)
            t->ne[d] = (int64_t)rd_u64(&c, t->name);
        t->type = rd_u32(&c, t->name);
        t->offset = rd_u64(&c, t->name);
    }
    if (!c.failed) {
        f->data_start = (size_t)align_up(c.at, f->alignment);
        for (uint64_t i = 0; i < f->n_tensors && !c.failed; i++) {
            gguf_tensor_info *t = &f->tensors[i];
            if (t->type != GGUF_TENSOR_F32 && t->type != GGUF_TENSOR_F16) {
                pr_errorf(err, PR_ERR_FORMAT, "%s: tensor '%s' has ggml type %u (this reader knows F32, F16)", path,
                          t->name, t->type);
                c.failed = 1;
                break;
            }
            uint64_t n = 1;
            for (uint32_t d = 0; d < t->n_dims; d++) {
                if (t->ne[d] <= 0 || (uint64_t)t->ne[d] > f->len)
                    n = UINT64_MAX;
                else if (n != UINT64_MAX)
                    n = n > f->len ? UINT64_MAX : n * (uint64_t)t->ne[d];
            }
            uint64_t bytes = n == UINT64_MAX ? UINT64_MAX : n * (t->type == GGUF_TENSOR_F16 ? 2u : 4u);
            if (t->offset % f->alignment) {
                pr_errorf(err, PR_ERR_FORMAT, "%s: tensor '%s' offset %llu is not a multiple of the alignment %u",
                          path, t->name, (unsigned long long)t->offset, f->alignment);
                c.failed = 1;
            } else if (bytes == UINT64_MAX || t->offset > f->len - f->data_start ||
                       bytes > f->len - f->data_start - t->offset) {
                pr_errorf(err, PR_ERR_FORMAT, "%s: tensor '%s' data lies outside the file", path, t->name);
                c.failed = 1;
            } else {
                t->data = f->buf + f->data_start + t->offset;
                t->size = (size_t)bytes;
            }
        }
    }
    if (c.failed) {
        gguf_file_free(f);
        return err->code ? err->code : PR_ERR_FORMAT;
    }
    *out = f;
    return PR_OK;
}

const gguf_kv *gguf_file_find_kv(const gguf_file *f, const char *key)
{
    for (uint64_t i = 0; i < f->n_kv; i++)
        if (strcmp(f->kv[i].key, key) == 0)
            return &f->kv[i];
    return NULL;
}

const gguf_tensor_info *gguf_file_find_tensor(const gguf_file *f, const char *name)
{
    for (uint64_t i = 0; i < f->n_tensors; i++)
        if (strcmp(f->tensors[i].name, name) == 0)
            return &f->tensors[i];
    return NULL;
}

static uint32_t le32(const unsigned char *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t le64(const unsigned char *p)
{
    return (uint64_t)le32(p) | (uint64_t)le32(p + 4) << 32;
}

int gguf_kv_get_str(const gguf_kv *kv, const char **s, size_t *len)
{
    if (!kv || kv->type != GGUF_T_STRING)
        return 0;
    *len = (size_t)le64(kv->data);
    *s = (const char *)kv->data + 8;
    return 1;
}

int gguf_kv_get_u32(const gguf_kv *kv, uint32_t *v)
{
    if (!kv || kv->type != GGUF_T_UINT32)
        return 0;
    *v = le32(kv->data);
    return 1;
}

int gguf_kv_get_f32(const gguf_kv *kv, float *v)
{
    if (!kv || kv->type != GGUF_T_FLOAT32)
        return 0;
    uint32_t u = le32(kv->data);
    memcpy(v, &u, 4);
    return 1;
}

int gguf_kv_arr_str(const gguf_kv *kv, uint64_t i, const char **s, size_t *len)
{
    if (!kv || kv->type != GGUF_T_ARRAY || kv->arr_type != GGUF_T_STRING || i >= kv->n)
        return 0;
    const unsigned char *p = kv->data;
    for (uint64_t j = 0; j < i; j++)
        p += 8 + le64(p);
    *len = (size_t)le64(p);
    *s = (const char *)p + 8;
    return 1;
}

int gguf_tensor_to_f32(const gguf_tensor_info *t, float *out, size_t n)
{
    size_t w = t->type == GGUF_TENSOR_F16 ? 2 : 4;
    if (n * w != t->size)
        return 0;
    for (size_t i = 0; i < n; i++) {
        const unsigned char *p = t->data + i * w;
        if (w == 2)
            out[i] = st_f16_to_f32((uint16_t)(p[0] | p[1] << 8));
        else {
            uint32_t u = le32(p);
            memcpy(&out[i], &u, 4);
        }
    }
    return 1;
}
