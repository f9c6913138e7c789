/* peftref core: reading and writing safetensors files. */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "fileio.h"
#include "safetensors.h"

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "safetensors data is little-endian; peftref maps it in place and needs a little-endian host"
#endif

/* Headers beyond this are refused before parsing (the reference
 * implementation uses the same 100 MB bound). */
#define ST_MAX_HEADER ((uint64_t)100 * 1000 * 1000)

struct st_file {
    char *path;
    void *map;
    size_t map_len;
    size_t data_start;      /* 8 + N */
    st_tensor *tensors;     /* sorted by name */
    int n;
    st_kv *meta;            /* owned strings */
    int n_meta;
};

/* ---- dtypes --------------------------------------------------------------- */

typedef struct dtype_desc {
    const char *name;
    size_t size;
    int dtype;
} dtype_desc;

/* Every dtype the format defines with a whole-byte element size. */
static const dtype_desc dtypes[] = {
    {"F32", 4, ST_F32},   {"F16", 2, ST_F16},   {"BF16", 2, ST_BF16},
    {"F64", 8, ST_DTYPE_OTHER}, {"I64", 8, ST_DTYPE_OTHER}, {"U64", 8, ST_DTYPE_OTHER},
    {"I32", 4, ST_DTYPE_OTHER}, {"U32", 4, ST_DTYPE_OTHER}, {"I16", 2, ST_DTYPE_OTHER},
    {"U16", 2, ST_DTYPE_OTHER}, {"I8", 1, ST_DTYPE_OTHER},  {"U8", 1, ST_DTYPE_OTHER},
    {"BOOL", 1, ST_DTYPE_OTHER}, {"F8_E4M3", 1, ST_DTYPE_OTHER},
    {"F8_E5M2", 1, ST_DTYPE_OTHER},
};

static const dtype_desc *dtype_lookup(const char *name)
{
    for (size_t i = 0; i < sizeof dtypes / sizeof dtypes[0]; i++)
        if (strcmp(dtypes[i].name, name) == 0)
            return &dtypes[i];
    return NULL;
}

static const char *dtype_name(int dtype)
{
    switch (dtype) {
    case ST_F32: return "F32";
    case ST_F16: return "F16";
    case ST_BF16: return "BF16";
    }
    return NULL;
}

/* ---- scalar conversions ----------------------------------------------------- */

static float f32_from_bits(uint32_t u)
{
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static uint32_t bits_from_f32(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

/* binary16: 1 sign, 5 exponent (bias 15), 10 mantissa bits. */
float st_f16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t mant = h & 0x3ffu;
    uint32_t bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (mant << 13);   /* inf, or NaN keeping its payload */
    } else if (exp != 0) {
        bits = sign | ((exp + 112u) << 23) | (mant << 13);  /* rebias 15 -> 127 */
    } else if (mant == 0) {
        bits = sign;
    } else {
        /* Subnormal mant * 2^-24: normalise so the leading one reaches bit
         * 10; after s shifts the value is 1.f * 2^(-14-s). */
        uint32_t s = 0;
        while (!(mant & 0x400u)) {
            mant <<= 1;
            s++;
        }
        bits = sign | ((113u - s) << 23) | ((mant & 0x3ffu) << 13);
    }
    return f32_from_bits(bits);
}

float st_bf16_to_f32(uint16_t b)
{
    return f32_from_bits((uint32_t)b << 16);
}

/* Round q (already truncated) to nearest even given the dropped bits rem
 * out of a field whose half-way value is half. */
static uint32_t round_nearest_even(uint32_t q, uint32_t rem, uint32_t half)
{
    if (rem > half || (rem == half && (q & 1u)))
        q++;
    return q;
}

uint16_t st_f32_to_f16(float f)
{
    uint32_t x = bits_from_f32(f);
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
    uint32_t exp = (x >> 23) & 0xffu;
    uint32_t mant = x & 0x7fffffu;
    if (exp == 0xff) /* inf stays inf; NaN stays (quiet) NaN */
        return (uint16_t)(sign | 0x7c00u | (mant ? 0x200u | (mant >> 13) : 0u));
    int e = (int)exp - 127 + 15;  /* binary16 biased exponent */
    if (e >= 31)
        return (uint16_t)(sign | 0x7c00u);
    if (e <= 0) {
        /* Result subnormal (or zero): in units of 2^-24 the value is
         * (1.m * 2^23) * 2^(e-14).  Below half a unit it rounds to zero. */
        if (e < -10)
            return sign;
        uint32_t full = mant | 0x800000u;
        uint32_t shift = (uint32_t)(14 - e);
        uint32_t q = full >> shift;
        uint32_t rem = full & ((1u << shift) - 1u);
        /* A carry into bit 10 yields the smallest normal, correctly encoded. */
        return (uint16_t)(sign | round_nearest_even(q, rem, 1u << (shift - 1)));
    }
    uint32_t q = ((uint32_t)e << 10) | (mant >> 13);
    /* A carry may reach the exponent; past the largest finite value it
     * gives exactly the infinity encoding 0x7c00. */
    return (uint16_t)(sign | round_nearest_even(q, mant & 0x1fffu, 0x1000u));
}

uint16_t st_f32_to_bf16(float f)
{
    uint32_t x = bits_from_f32(f);
    if ((x & 0x7fffffffu) > 0x7f800000u)
        return (uint16_t)((x >> 16) | 0x40u);  /* NaN: keep it NaN (quiet) */
    uint32_t q = x >> 16;
    return (uint16_t)round_nearest_even(q, x & 0xffffu, 0x8000u);
}

/* ---- reading ---------------------------------------------------------------- */

void st_format_shape(int ndim, const int64_t *shape, char *buf, size_t size)
{
    size_t k = 0;
    int r = snprintf(buf, size, "[");
    for (int d = 0; d < ndim && r >= 0; d++) {
        k += (size_t)r;
        if (k >= size)
            return;
        r = snprintf(buf + k, size - k, "%s%" PRId64, d ? ", " : "", shape[d]);
    }
    if (r >= 0 && (k += (size_t)r) < size)
        snprintf(buf + k, size - k, "]");
}

static void st_free(st_file *f)
{
    if (!f)
        return;
    if (f->map)
        munmap(f->map, f->map_len);
    if (f->tensors)
        for (int i = 0; i < f->n; i++)
            free((char *)f->tensors[i].name);
    free(f->tensors);
    if (f->meta)
        for (int i = 0; i < f->n_meta; i++) {
            free((char *)f->meta[i].key);
            free((char *)f->meta[i].value);
        }
    free(f->meta);
    free(f->path);
    free(f);
}

void st_close(st_file *f)
{
    st_free(f);
}

static int cmp_tensor_name(const void *a, const void *b)
{
    return strcmp(((const st_tensor *)a)->name, ((const st_tensor *)b)->name);
}

static int cmp_tensor_offset(const void *a, const void *b)
{
    const st_tensor *x = *(const st_tensor *const *)a, *y = *(const st_tensor *const *)b;
    return (x->offset > y->offset) - (x->offset < y->offset);
}

static int json_nonneg_int(const json_t *v, int64_t *out)
{
    if (!json_is_integer(v) || json_integer_value(v) < 0)
        return 0;
    *out = (int64_t)json_integer_value(v);
    return 1;
}

/* Validate one header entry and fill t (t->name already set). */
static int parse_entry(const st_file *f, const json_t *v, size_t buffer_size, st_tensor *t,
                       pr_error *err)
{
    const char *path = f->path, *name = t->name;
    if (!json_is_object(v))
        return pr_errorf(err, PR_ERR_FORMAT, "%s: tensor '%s': header entry is not an object",
                         path, name);
    const json_t *jd = json_object_get(v, "dtype");
    const json_t *js = json_object_get(v, "shape");
    const json_t *jo = json_object_get(v, "data_offsets");
    if (!jd || !js || !jo)
        return pr_errorf(err, PR_ERR_FORMAT, "%s: tensor '%s': header entry lacks \"%s\"", path,
                         name, !jd ? "dtype" : !js ? "shape" : "data_offsets");
    if (!json_is_string(jd))
        return pr_errorf(err, PR_ERR_FORMAT, "%s: tensor '%s': dtype is not a string", path, name);
    const dtype_desc *dd = dtype_lookup(json_string_value(jd));
    if (!dd)
        return pr_errorf(err, PR_ERR_UNSUPPORTED, "%s: tensor '%s': unsupported dtype '%s'", path,
                         name, json_string_value(jd));
    t->dtype = dd->dtype;
    t->dtype_name = dd->name;

    if (!json_is_array(js))
        return pr_errorf(err, PR_ERR_FORMAT, "%s: tensor '%s': shape is not an array", path, name);
    size_t nd = json_array_size(js);
    if (nd > ST_MAX_DIMS)
        return pr_errorf(err, PR_ERR_UNSUPPORTED, "%s: tensor '%s': %zu dimensions (at most %d)",
                         path, name, nd, ST_MAX_DIMS);
    t->ndim = (int)nd;
    int64_t numel = 1;
    int zero = 0;
    for (size_t d = 0; d < nd; d++) {
        int64_t s;
        if (!json_nonneg_int(json_array_get(js, d), &s))
            return pr_errorf(err, PR_ERR_FORMAT,
                             "%s: tensor '%s': shape[%zu] is not a non-negative integer", path,
                             name, d);
        t->shape[d] = s;
        if (s == 0)
            zero = 1;
        else if (!zero && numel > INT64_MAX / s)
            return pr_errorf(err, PR_ERR_FORMAT, "%s: tensor '%s': element count overflows",
                             path, name);
        else if (!zero)
            numel *= s;
    }
    t->numel = zero ? 0 : numel;
    if ((uint64_t)t->numel > SIZE_MAX / dd->size)
        return pr_errorf(err, PR_ERR_FORMAT, "%s: tensor '%s': byte count overflows", path, name);
    size_t want = (size_t)t->numel * dd->size;

    int64_t b, e;
    if (!json_is_array(jo) || json_array_size(jo) != 2 ||
        !json_nonneg_int(json_array_get(jo, 0), &b) || !json_nonneg_int(json_array_get(jo, 1), &e))
        return pr_errorf(err, PR_ERR_FORMAT,
                         "%s: tensor '%s': data_offsets is not a pair of non-negative integers",
                         path, name);
    if (e < b)
        return pr_errorf(err, PR_ERR_FORMAT,
                         "%s: tensor '%s': data_offsets [%" PRId64 ", %" PRId64 "] end before they begin",
                         path, name, b, e);
    if ((uint64_t)e > buffer_size)
        return pr_errorf(err, PR_ERR_FORMAT,
                         "%s: tensor '%s': data_offsets [%" PRId64 ", %" PRId64
                         "] exceed the %zu-byte data buffer (truncated file?)",
                         path, name, b, e, buffer_size);
    if ((uint64_t)(e - b) != (uint64_t)want) {
        char shp[160];
        st_format_shape(t->ndim, t->shape, shp, sizeof shp);
        return pr_errorf(err, PR_ERR_FORMAT,
                         "%s: tensor '%s': data_offsets [%" PRId64 ", %" PRId64 "] span %" PRId64
                         " bytes but shape %s of %s needs %zu",
                         path, name, b, e, e - b, shp, dd->name, want);
    }
    t->nbytes = want;
    t->offset = f->data_start + (size_t)b;
    t->data = (char *)f->map + t->offset;
    return PR_OK;
}

static int parse_metadata(st_file *f, const json_t *v, pr_error *err)
{
    if (!json_is_object(v))
        return pr_errorf(err, PR_ERR_FORMAT, "%s: __metadata__ is not an object", f->path);
    size_t n = json_object_size(v);
    f->meta = calloc(n ? n : 1, sizeof *f->meta);
    if (!f->meta)
        return pr_errorf(err, PR_ERR_NOMEM, "%s: out of memory", f->path);
    const char *key;
    json_t *val;
    json_object_foreach((json_t *)v, key, val) {
        if (!json_is_string(val))
            return pr_errorf(err, PR_ERR_FORMAT, "%s: __metadata__ value of '%s' is not a string",
                             f->path, key);
        st_kv *kv = &f->meta[f->n_meta];
        kv->key = strdup(key);
        kv->value = strdup(json_string_value(val));
        f->n_meta++;
        if (!kv->key || !kv->value)
            return pr_errorf(err, PR_ERR_NOMEM, "%s: out of memory", f->path);
    }
    return PR_OK;
}

/* Parse and validate the JSON header of a mapped file. */
static int parse_header(st_file *f, const char *hdr, size_t hdr_len, pr_error *err)
{
    json_error_t jerr;
    json_t *root = json_loadb(hdr, hdr_len, JSON_REJECT_DUPLICATES, &jerr);
    if (!root)
        return pr_errorf(err, PR_ERR_FORMAT, "%s: header is not valid JSON: %s (column %d)",
                         f->path, jerr.text, jerr.column);
    int rc = PR_OK;
    if (!json_is_object(root)) {
        rc = pr_errorf(err, PR_ERR_FORMAT, "%s: header is not a JSON object", f->path);
        goto out;
    }
    size_t buffer_size = f->map_len - f->data_start;
    size_t n = json_object_size(root);
    f->tensors = calloc(n ? n : 1, sizeof *f->tensors);
    if (!f->tensors) {
        rc = pr_errorf(err, PR_ERR_NOMEM, "%s: out of memory", f->path);
        goto out;
    }
    const char *key;
    json_t *val;
    json_object_foreach(root, key, val) {
        if (strcmp(key, "__metadata__") == 0) {
            rc = parse_metadata(f, val, err);
        } else {
            st_tensor *t = &f->tensors[f->n];
            t->name = strdup(key);
            if (!t->name) {
                rc = pr_errorf(err, PR_ERR_NOMEM, "%s: out of memory", f->path);
                goto out;
            }
            f->n++;
            rc = parse_entry(f, val, buffer_size, t, err);
        }
        if (rc != PR_OK)
            goto out;
    }
    qsort(f->tensors, (size_t)f->n, sizeof *f->tensors, cmp_tensor_name);

    /* No two non-empty tensors may share bytes. */
    if (f->n > 1) {
        const st_tensor **by_off = malloc((size_t)f->n * sizeof *by_off);
        if (!by_off) {
            rc = pr_errorf(err, PR_ERR_NOMEM, "%s: out of memory", f->path);
            goto out;
        }
        int k = 0;
        for (int i = 0; i < f->n; i++)
            if (f->tensors[i].nbytes > 0)
                by_off[k++] = &f->tensors[i];
        qsort(by_off, (size_t)k, sizeof *by_off, cmp_tensor_offset);
        for (int i = 1; i < k; i++) {
            const st_tensor *a = by_off[i - 1], *b = by_off[i];
            if (a->offset + a->nbytes > b->offset) {
                rc = pr_errorf(err, PR_ERR_FORMAT, "%s: tensors '%s' and '%s' overlap in the data buffer",
                               f->path, a->name, b->name);
                break;
            }
        }
        free(by_off);
    }
out:
    json_decref(root);
    return rc;
}

int st_open(const char *path, int flags, st_file **out, pr_error *err)
{
    *out = NULL;
    st_file *f = calloc(1, sizeof *f);
    if (!f || !(f->path = strdup(path))) {
        free(f);
        return pr_errorf(err, PR_ERR_NOMEM, "%s: out of memory", path);
    }
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        int e = errno;
        st_free(f);
        return pr_errorf(err, e == ENOENT ? PR_ERR_NOTFOUND : PR_ERR_IO, "%s: cannot open: %s",
                         path, strerror(e));
    }
    struct stat sb;
    int rc = PR_OK;
    if (fstat(fd, &sb) != 0) {
        rc = pr_errorf(err, PR_ERR_IO, "%s: cannot stat: %s", path, strerror(errno));
    } else if (!S_ISREG(sb.st_mode)) {
        rc = pr_errorf(err, PR_ERR_INVALID, "%s: not a regular file", path);
    } else if (sb.st_size < 8) {
        rc = pr_errorf(err, PR_ERR_FORMAT,
                       "%s: file is %lld bytes, too short for the 8-byte header length (truncated?)",
                       path, (long long)sb.st_size);
    } else if ((unsigned long long)sb.st_size > SIZE_MAX) {
        rc = pr_errorf(err, PR_ERR_UNSUPPORTED, "%s: file too large to map", path);
    } else {
        int prot = PROT_READ | ((flags & ST_OPEN_WRITABLE) ? PROT_WRITE : 0);
        void *map = mmap(NULL, (size_t)sb.st_size, prot, MAP_PRIVATE, fd, 0);
        if (map == MAP_FAILED)
            rc = pr_errorf(err, PR_ERR_IO, "%s: mmap failed: %s", path, strerror(errno));
        else {
            f->map = map;
            f->map_len = (size_t)sb.st_size;
        }
    }
    close(fd); /* the mapping keeps the file open */
    if (rc != PR_OK) {
        st_free(f);
        return rc;
    }

    const unsigned char *p = f->map;
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--)
        hlen = (hlen << 8) | p[i];
    if (hlen > (uint64_t)(f->map_len - 8)) {
        rc = pr_errorf(err, PR_ERR_FORMAT,
                       "%s: header length %" PRIu64 " exceeds the %zu bytes after it (truncated or not safetensors?)",
                       path, hlen, f->map_len - 8);
    } else if (hlen > ST_MAX_HEADER) {
        rc = pr_errorf(err, PR_ERR_FORMAT, "%s: header length %" PRIu64 " exceeds the %" PRIu64 " allowed",
                       path, hlen, ST_MAX_HEADER);
    } else if (hlen < 2) {
        rc = pr_errorf(err, PR_ERR_FORMAT, "%s: header length %" PRIu64 " is too small for a JSON object",
                       path, hlen);
    } else {
        f->data_start = 8 + (size_t)hlen;
        rc = parse_header(f, (const char *)p + 8, (size_t)hlen, err);
    }
    if (rc != PR_OK) {
        st_free(f);
        return rc;
    }
    *out = f;
    return PR_OK;
}

const char *st_path(const st_file *f)
{
    return f->path;
}

int st_count(const st_file *f)
{
    return f->n;
}

const st_tensor *st_tensor_at(const st_file *f, int i)
{
    return (i >= 0 && i < f->n) ? &f->tensors[i] : NULL;
}

const st_tensor *st_find(const st_file *f, const char *name)
{
    st_tensor key;
    key.name = name;
    return bsearch(&key, f->tensors, (size_t)f->n, sizeof *f->tensors, cmp_tensor_name);
}

const char *st_metadata(const st_file *f, const char *key)
{
    for (int i = 0; i < f->n_meta; i++)
        if (strcmp(f->meta[i].key, key) == 0)
            return f->meta[i].value;
    return NULL;
}

int st_metadata_count(const st_file *f)
{
    return f->n_meta;
}

void st_metadata_at(const st_file *f, int i, const char **key, const char **value)
{
    *key = f->meta[i].key;
    *value = f->meta[i].value;
}

void st_detach_mapping(st_file *f, void **addr, size_t *len)
{
    *addr = f->map;
    *len = f->map_len;
    f->map = NULL;
    f->map_len = 0;
}

int st_to_f32(const st_file *f, const st_tensor *t, float *dst, pr_error *err)
{
    const unsigned char *src = t->data;
    size_t n = (size_t)t->numel;
    switch (t->dtype) {
    case ST_F32:
        if (n)
            memcpy(dst, src, n * sizeof(float));
        return PR_OK;
    case ST_F16:
        for (size_t i = 0; i < n; i++)
            dst[i] = st_f16_to_f32((uint16_t)(src[2 * i] | (src[2 * i + 1] << 8)));
        return PR_OK;
    case ST_BF16:
        for (size_t i = 0; i < n; i++)
            dst[i] = st_bf16_to_f32((uint16_t)(src[2 * i] | (src[2 * i + 1] << 8)));
        return PR_OK;
    }
    return pr_errorf(err, PR_ERR_UNSUPPORTED,
                     "%s: tensor '%s': dtype %s cannot be converted to F32 (F32, F16, BF16 can)",
                     f->path, t->name, t->dtype_name);
}

/* ---- writing ---------------------------------------------------------------- */

static size_t entry_elem_size(const st_entry *e)
{
    return (e->dtype == ST_F32 || e->dtype == 0) ? 4 : 2;
}

static int entry_numel(const st_entry *e, const char *path, int64_t *numel, pr_error *err)
{
    if (e->ndim < 0 || e->ndim > ST_MAX_DIMS)
        return pr_errorf(err, PR_ERR_INVALID, "%s: tensor '%s': %d dimensions (0..%d allowed)",
                         path, e->name, e->ndim, ST_MAX_DIMS);
    int64_t n = 1;
    for (int d = 0; d < e->ndim; d++) {
        if (e->shape[d] < 0)
            return pr_errorf(err, PR_ERR_INVALID, "%s: tensor '%s': negative shape[%d]", path,
                             e->name, d);
        if (e->shape[d] > 0 && n > INT64_MAX / 4 / e->shape[d])
            return pr_errorf(err, PR_ERR_INVALID, "%s: tensor '%s': size overflows", path, e->name);
        n *= e->shape[d];
    }
    *numel = n;
    return PR_OK;
}

/* Build the padded header: 8-byte length plus JSON. */
static int build_header(const char *path, const st_entry *entries, int n, const st_kv *meta,
                        int n_meta, char **out, size_t *out_len, pr_error *err)
{
    int rc = PR_OK;
    json_t *root = json_object();
    if (!root)
        return pr_errorf(err, PR_ERR_NOMEM, "%s: out of memory", path);
    if (n_meta > 0) {
        json_t *m = json_object();
        if (!m || json_object_set_new(root, "__metadata__", m) != 0) {
            rc = pr_errorf(err, PR_ERR_NOMEM, "%s: out of memory", path);
            goto out;
        }
        for (int i = 0; i < n_meta; i++) {
            if (!meta[i].key || !meta[i].value) {
                rc = pr_errorf(err, PR_ERR_INVALID, "%s: metadata pair %d has a NULL key or value",
                               path, i);
                goto out;
            }
            if (json_object_set_new(m, meta[i].key, json_string(meta[i].value)) != 0) {
                rc = pr_errorf(err, PR_ERR_INVALID, "%s: metadata '%s' is not valid UTF-8", path,
                               meta[i].key);
                goto out;
            }
        }
    }
    /* Data order: 4-byte elements first, then 2-byte ones, each group in
     * entry order, so every F32 tensor starts at a multiple of 4. */
    uint64_t off = 0;
    for (int pass = 0; pass < 2; pass++) {
        for (int i = 0; i < n; i++) {
            const st_entry *e = &entries[i];
            if ((entry_elem_size(e) == 4) != (pass == 0))
                continue;
            int64_t numel = 0;
            if ((rc = entry_numel(e, path, &numel, err)) != PR_OK)
                goto out;
            uint64_t nbytes = (uint64_t)numel * entry_elem_size(e);
            json_t *shape = json_array(), *offs = json_array();
            json_t *obj = json_pack("{s:s, s:o, s:o}", "dtype",
                                    dtype_name(e->dtype ? e->dtype : ST_F32), "shape", shape,
                                    "data_offsets", offs);
            int bad = !obj;
            for (int d = 0; !bad && d < e->ndim; d++)
                bad = json_array_append_new(shape, json_integer(e->shape[d])) != 0;
            if (!bad)
                bad = json_array_append_new(offs, json_integer((json_int_t)off)) != 0 ||
                      json_array_append_new(offs, json_integer((json_int_t)(off + nbytes))) != 0;
            if (bad) {
                json_decref(obj);
                rc = pr_errorf(err, PR_ERR_NOMEM, "%s: out of memory", path);
                goto out;
            }
            if (json_object_set_new(root, e->name, obj) != 0) {
                rc = pr_errorf(err, PR_ERR_INVALID, "%s: tensor name '%s' is not valid UTF-8",
                               path, e->name);
                goto out;
            }
            off += nbytes;
        }
    }
    char *js = json_dumps(root, JSON_COMPACT);
    if (!js) {
        rc = pr_errorf(err, PR_ERR_NOMEM, "%s: out of memory", path);
        goto out;
    }
    size_t jl = strlen(js);
    size_t padded = (8 + jl + 7) / 8 * 8 - 8;
    char *buf = malloc(8 + padded);
    if (!buf) {
        free(js);
        rc = pr_errorf(err, PR_ERR_NOMEM, "%s: out of memory", path);
        goto out;
    }
    uint64_t hl = padded;
    for (int i = 0; i < 8; i++)
        buf[i] = (char)((hl >> (8 * i)) & 0xff);
    memcpy(buf + 8, js, jl);
    memset(buf + 8 + jl, ' ', padded - jl);
    free(js);
    *out = buf;
    *out_len = 8 + padded;
out:
    json_decref(root);
    return rc;
}

static int write_entry_data(fileio_writer *w, const st_entry *e, pr_error *err)
{
    int64_t numel = 1;
    for (int d = 0; d < e->ndim; d++)
        numel *= e->shape[d];
    if (numel == 0)
        return PR_OK;
    if (entry_elem_size(e) == 4)
        return fileio_writer_write(w, e->data, (size_t)numel * sizeof(float), err);
    uint16_t buf[2048];
    for (int64_t i = 0; i < numel;) {
        size_t k = 0;
        for (; k < sizeof buf / sizeof buf[0] && i < numel; k++, i++)
            buf[k] = e->dtype == ST_F16 ? st_f32_to_f16(e->data[i]) : st_f32_to_bf16(e->data[i]);
        int rc = fileio_writer_write(w, buf, k * sizeof buf[0], err);
        if (rc != PR_OK)
            return rc;
    }
    return PR_OK;
}

int st_write(const char *path, const st_entry *entries, int n, const st_kv *meta, int n_meta,
             pr_error *err)
{
    for (int i = 0; i < n; i++) {
        const st_entry *e = &entries[i];
        if (!e->name)
            return pr_errorf(err, PR_ERR_INVALID, "%s: tensor %d has no name", path, i);
        if (strcmp(e->name, "__metadata__") == 0)
            return pr_errorf(err, PR_ERR_INVALID, "%s: '__metadata__' is not a tensor name", path);
        if (e->dtype != 0 && !dtype_name(e->dtype))
            return pr_errorf(err, PR_ERR_INVALID, "%s: tensor '%s': unknown dtype code %d", path,
                             e->name, e->dtype);
        for (int j = 0; j < i; j++)
            if (strcmp(entries[j].name, e->name) == 0)
                return pr_errorf(err, PR_ERR_INVALID, "%s: tensor '%s' given twice", path, e->name);
        int64_t numel;
        int rc = entry_numel(e, path, &numel, err);
        if (rc != PR_OK)
            return rc;
        if (numel > 0 && !e->data)
            return pr_errorf(err, PR_ERR_INVALID, "%s: tensor '%s' has no data", path, e->name);
    }
    char *hdr = NULL;
    size_t hdr_len = 0;
    int rc = build_header(path, entries, n, meta, n_meta, &hdr, &hdr_len, err);
    if (rc != PR_OK)
        return rc;
    fileio_writer w;
    rc = fileio_writer_open(&w, path, err);
    if (rc == PR_OK)
        rc = fileio_writer_write(&w, hdr, hdr_len, err);
    free(hdr);
    for (int pass = 0; rc == PR_OK && pass < 2; pass++)
        for (int i = 0; rc == PR_OK && i < n; i++)
            if ((entry_elem_size(&entries[i]) == 4) == (pass == 0))
                rc = write_entry_data(&w, &entries[i], err);
    if (rc == PR_OK)
        return fileio_writer_commit(&w, err);
    if (w.fd >= 0)
        fileio_writer_abort(&w);
    return rc;
}
