/* peftref core: GGUF files (ggml's docs/gguf.md, version 3), written for
 * llama.cpp and read back by the tests.
 *
 * Layout, little-endian throughout:
 *   "GGUF"  u32 version (3)  u64 tensor_count  u64 kv_count
 *   kv_count x { string key, u32 value_type, value }
 *   tensor_count x { string name, u32 n_dims, u64 ne[n_dims], u32 ggml_type, u64 offset }
 *   zero padding to general.alignment (32 when absent), then the tensor
 *   data, each tensor starting at data_start + offset, offset a multiple of
 *   the alignment.
 * A string is u64 length + bytes (no NUL).  An array is u32 element type,
 * u64 count, the elements.  ne[0] is the fastest-varying dimension, so a
 * row-major (rows, cols) matrix is ne = {cols, rows}. */
#ifndef PEFTREF_CORE_IO_GGUF_H
#define PEFTREF_CORE_IO_GGUF_H

#include <stddef.h>
#include <stdint.h>

#include "peftref/status.h"

enum gguf_value_type {
    GGUF_T_UINT8 = 0, GGUF_T_INT8 = 1, GGUF_T_UINT16 = 2, GGUF_T_INT16 = 3, GGUF_T_UINT32 = 4,
    GGUF_T_INT32 = 5, GGUF_T_FLOAT32 = 6, GGUF_T_BOOL = 7, GGUF_T_STRING = 8, GGUF_T_ARRAY = 9,
    GGUF_T_UINT64 = 10, GGUF_T_INT64 = 11, GGUF_T_FLOAT64 = 12
};

/* ggml tensor types written here */
enum gguf_tensor_type { GGUF_TENSOR_F32 = 0, GGUF_TENSOR_F16 = 1 };

#define GGUF_VERSION 3
#define GGUF_DEFAULT_ALIGNMENT 32

/* ---- writing ------------------------------------------------------------ */

typedef struct gguf_writer gguf_writer;

gguf_writer *gguf_writer_new(void);
/* Frees the writer and every tensor buffer handed over with owned = 1. */
void gguf_writer_free(gguf_writer *w);

/* Key/value pairs, in the order written.  A key given twice is an error
 * (reported by gguf_writer_save). */
void gguf_set_str(gguf_writer *w, const char *key, const char *value);
void gguf_set_u32(gguf_writer *w, const char *key, uint32_t value);
void gguf_set_i32(gguf_writer *w, const char *key, int32_t value);
void gguf_set_f32(gguf_writer *w, const char *key, float value);
void gguf_set_bool(gguf_writer *w, const char *key, int value);
/* Arrays: strings given as (pointer, length) pairs, copied. */
void gguf_set_arr_str(gguf_writer *w, const char *key, const char *const *s, const size_t *len, size_t n);
void gguf_set_arr_i32(gguf_writer *w, const char *key, const int32_t *v, size_t n);
void gguf_set_arr_f32(gguf_writer *w, const char *key, const float *v, size_t n);

/* One tensor of f32 values, stored as type (F32, or F16 rounded to
 * nearest even).  ne[0] fastest.  data stays the caller's unless owned
 * (then the writer free()s it). */
void gguf_add_tensor(gguf_writer *w, const char *name, int n_dims, const int64_t *ne, int type, float *data,
                     int owned);

/* Write everything to path atomically (a temporary name, then rename):
 * nothing is left at path on failure.  Also reports the first error of
 * the calls above (out of memory, a duplicate key or tensor name). */
int gguf_writer_save(gguf_writer *w, const char *path, pr_error *err);

/* ---- reading (the whole file in memory) --------------------------------- */

typedef struct gguf_kv {
    char *key;
    uint32_t type;          /* gguf_value_type */
    uint32_t arr_type;      /* for arrays */
    uint64_t n;             /* array length (1 for scalars) */
    const unsigned char *data; /* the value's bytes in the file (arrays: the first element) */
    size_t size;            /* bytes of the value (arrays: of all elements) */
} gguf_kv;

typedef struct gguf_tensor_info {
    char *name;
    uint32_t n_dims;
    int64_t ne[4];
    uint32_t type;
    uint64_t offset;        /* from data_start */
    const unsigned char *data;
    size_t size;
} gguf_tensor_info;

typedef struct gguf_file {
    unsigned char *buf;
    size_t len;
    uint32_t version;
    uint32_t alignment;
    size_t data_start;      /* byte offset of the tensor data */
    uint64_t n_kv, n_tensors;
    gguf_kv *kv;
    gguf_tensor_info *tensors;
} gguf_file;

/* Parse path; every length and offset is checked against the file's size,
 * and errors name the file and the byte offset or key. */
int gguf_file_read(const char *path, gguf_file **out, pr_error *err);
void gguf_file_free(gguf_file *f);
const gguf_kv *gguf_file_find_kv(const gguf_file *f, const char *key);
const gguf_tensor_info *gguf_file_find_tensor(const gguf_file *f, const char *name);
/* Typed reads of a kv (0 when it has another type or is absent). */
int gguf_kv_get_str(const gguf_kv *kv, const char **s, size_t *len);
int gguf_kv_get_u32(const gguf_kv *kv, uint32_t *v);
int gguf_kv_get_f32(const gguf_kv *kv, float *v);
/* Element i of a string array. */
int gguf_kv_arr_str(const gguf_kv *kv, uint64_t i, const char **s, size_t *len);
/* A tensor's values as f32 (F32 or F16), n = product of ne. */
int gguf_tensor_to_f32(const gguf_tensor_info *t, float *out, size_t n);

#endif
