/* peftref core: the safetensors file format.
 *
 * Layout (https://github.com/huggingface/safetensors): an unsigned 64-bit
 * little-endian header length N, N bytes of UTF-8 JSON
 *   {"NAME": {"dtype": "F32", "shape": [d0, d1, ...],
 *             "data_offsets": [begin, end]}, ...,
 *    "__metadata__": {"key": "value", ...}}
 * padded with spaces, then the data buffer.  Offsets are relative to the
 * start of the buffer (byte 8 + N of the file); values are little-endian,
 * row-major.
 *
 * The reader memory-maps the file and validates the whole header before
 * returning: every entry complete, shapes non-negative, byte counts equal
 * numel * dtype size, ranges inside the buffer and not overlapping.
 * Tensors of dtypes other than F32, F16 and BF16 may be listed and looked
 * up but not converted. */
#ifndef PEFTREF_CORE_SAFETENSORS_H
#define PEFTREF_CORE_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>
#include "peftref/status.h"

#define ST_MAX_DIMS 8

typedef enum st_dtype {
    ST_DTYPE_OTHER = 0,  /* a valid safetensors dtype peftref does not convert */
    ST_F32 = 1,
    ST_F16 = 2,
    ST_BF16 = 3
} st_dtype;

typedef struct st_tensor {
    const char *name;
    int dtype;                  /* st_dtype */
    const char *dtype_name;     /* as written in the header, e.g. "BF16" */
    int ndim;
    int64_t shape[ST_MAX_DIMS];
    int64_t numel;              /* 1 for a scalar (ndim 0) */
    size_t nbytes;
    size_t offset;              /* of the first byte within the file */
    void *data;                 /* raw little-endian bytes in the mapping;
                                   writable (copy-on-write) only when the file
                                   was opened with ST_OPEN_WRITABLE */
} st_tensor;

typedef struct st_file st_file;

enum {
    /* Map PROT_READ|PROT_WRITE, MAP_PRIVATE: writes stay in this process
     * (copy-on-write) and never reach the file. */
    ST_OPEN_WRITABLE = 1
};

/* Open, map and validate path.  Errors name the file and, where one is to
 * blame, the tensor. */
int st_open(const char *path, int flags, st_file **out, pr_error *err);
void st_close(st_file *f);

const char *st_path(const st_file *f);
int st_count(const st_file *f);
/* Tensors sorted by name, 0 <= i < st_count. */
const st_tensor *st_tensor_at(const st_file *f, int i);
/* NULL when absent. */
const st_tensor *st_find(const st_file *f, const char *name);
/* "__metadata__" value of key, or NULL. */
const char *st_metadata(const st_file *f, const char *key);
int st_metadata_count(const st_file *f);
/* i-th metadata pair (0 <= i < st_metadata_count). */
void st_metadata_at(const st_file *f, int i, const char **key, const char **value);

/* Convert tensor t of f to f32 into dst (t->numel floats).  F16 and BF16
 * convert exactly (every value, including subnormals, infinities and NaN,
 * is representable in f32); other dtypes fail with PR_ERR_UNSUPPORTED. */
int st_to_f32(const st_file *f, const st_tensor *t, float *dst, pr_error *err);

/* Give up ownership of the mapping: st_close will no longer unmap it and
 * the caller must munmap(*addr, *len).  Tensor data pointers stay valid. */
void st_detach_mapping(st_file *f, void **addr, size_t *len);

/* Scalar conversions (IEEE 754 binary16 and bfloat16 <-> binary32).  The
 * narrowing ones round to nearest, ties to even; overflow gives infinity,
 * NaN stays NaN. */
float st_f16_to_f32(uint16_t h);
float st_bf16_to_f32(uint16_t b);
uint16_t st_f32_to_f16(float f);
uint16_t st_f32_to_bf16(float f);

/* Format a shape as "[d0, d1, ...]" into buf (truncated to size). */
void st_format_shape(int ndim, const int64_t *shape, char *buf, size_t size);

/* ---- writing -------------------------------------------------------------- */

typedef struct st_entry {
    const char *name;
    int ndim;
    int64_t shape[ST_MAX_DIMS];
    const float *data;   /* numel f32 values */
    int dtype;           /* stored dtype: ST_F32 (or 0), ST_F16 or ST_BF16 */
} st_entry;

typedef struct st_kv {
    const char *key;
    const char *value;
} st_kv;

/* Atomically write n tensors and n_meta metadata pairs to path.  The header
 * is space-padded to a multiple of 8 bytes and F32 tensors are stored
 * before 2-byte ones, so every F32 tensor is 4-byte aligned in the file
 * (and in a mapping of it).  Names must be unique and not "__metadata__". */
int st_write(const char *path, const st_entry *entries, int n, const st_kv *meta, int n_meta,
             pr_error *err);

#endif
