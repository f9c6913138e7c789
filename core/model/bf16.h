/* peftref core: bf16 numbers and the bf16 matrix product through oneDNN.
 *
 * bf16 is the top half of an IEEE f32 (8 exponent bits, 7 mantissa bits):
 * f32 -> bf16 rounds to nearest even (relative error <= 2^-8), bf16 -> f32
 * is exact.  The product multiplies bf16 operands and accumulates in f32
 * (oneDNN's matmul with bf16 source and weights, f32 destination), the
 * arithmetic PyTorch's CPU autocast uses.
 *
 * Without oneDNN at configure time everything here still builds:
 * bf16_available() is 0, bf16_matmul returns PR_ERR_UNSUPPORTED and the
 * conversions keep working (saving, base_weight_f32). */
#ifndef PEFTREF_CORE_BF16_H
#define PEFTREF_CORE_BF16_H

#include <stddef.h>
#include <stdint.h>

#include "peftref/status.h"

/* 1 when this build has oneDNN (configure found libdnnl). */
int bf16_available(void);

/* f32 -> bf16, round to nearest even; NaN stays NaN (quiet). */
static inline uint16_t bf16_from_f32_1(float f)
{
    union { float f; uint32_t u; } v = { f };
    uint32_t rounded = (v.u + 0x7FFFu + ((v.u >> 16) & 1u)) >> 16;
    uint32_t quiet = (v.u >> 16) | 0x40u;
    /* a select, not a branch, so that loops over it vectorise */
    return (uint16_t)((v.u & 0x7FFFFFFFu) > 0x7F800000u ? quiet : rounded);
}

static inline float bf16_to_f32_1(uint16_t h)
{
    union { uint32_t u; float f; } v = { (uint32_t)h << 16 };
    return v.f;
}

/* dst (n) = bf16(src (n)); dst (n) = f32(src (n)).  Parallel over n. */
void bf16_from_f32(uint16_t *dst, const float *src, size_t n);
void bf16_to_f32(float *dst, const uint16_t *src, size_t n);

/* The product with f32 activations and bf16 weights:
 *   C (M,N; ldc) (+)= bf16(A) (M,K; lda) . W (K,N) [+ bias (N)]
 * W element (k, n) is at w[k*ws0 + n*ws1] (plain storage, either
 * orientation).  A is cast to bf16 in row chunks through a scratch the
 * backend keeps; accumulate 1 adds to C (oneDNN's sum post-op), 0
 * overwrites it.  Returns PR_OK, or an error with a message naming the
 * shape and oneDNN's status. */
int bf16_matmul(float *c, int ldc, const float *a, int lda, const uint16_t *w, int64_t ws0, int64_t ws1,
                const float *bias, int M, int K, int N, int accumulate, pr_error *err);

/* What `peftref runtime` prints: "2.6.3" (or NULL without oneDNN), and
 * the ISA oneDNN dispatches to on this CPU ("avx512_core_bf16", ...),
 * with a one-line verdict: is bf16 expected to beat f32 here? */
const char *bf16_dnnl_version(void);
const char *bf16_isa(void);
/* 1 with AMX or AVX-512 BF16 (native bf16 dot products), 0 otherwise:
 * there oneDNN emulates bf16 and f32 is faster.  Decided by ISA. */
int bf16_isa_native(void);

/* Seconds for one (M,K)x(K,N) product, best of reps, in bf16 (oneDNN) or
 * f32 (OpenBLAS sgemm); -1 when bf16 is unavailable. */
double bf16_time_matmul(int use_bf16, int M, int K, int N, int reps);

/* Most A elements cast per chunk (0: the default, 16M); for tests. */
void bf16_set_chunk_elems(size_t n);

/* Release the backend's scratch and cached primitives (tests, exit). */
void bf16_shutdown(void);

#endif
