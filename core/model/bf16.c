/* peftref core: bf16 conversions and the bf16 product on oneDNN (see bf16.h).
 *
 * One CPU engine and stream for the process.  Matmul primitives are kept
 * in a small table keyed by shape and strides (oneDNN's own cache would
 * also find them, but only after building a primitive descriptor per
 * call); memory objects get their data handle set per call.  oneDNN here
 * runs on OpenMP (Debian builds it so), the same libgomp as our kernels,
 * so its threads are the team our own loops use: the thread policy of
 * runtime.h (OMP_WAIT_POLICY=passive) keeps them from spinning between
 * products while OpenBLAS works. */
#include "config.h"

#include <cblas.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "bf16.h"

#ifdef HAVE_DNNL
#include <oneapi/dnnl/dnnl.h>
#endif

#define PAR_MIN 32768
/* most bf16 elements of A cast at once: 32 MB of scratch */
#define CHUNK_ELEMS_DEFAULT ((size_t)16 << 20)
static size_t chunk_elems = CHUNK_ELEMS_DEFAULT;

void bf16_set_chunk_elems(size_t n)
{
    chunk_elems = n ? n : CHUNK_ELEMS_DEFAULT;
}

void bf16_from_f32(uint16_t *dst, const float *src, size_t n)
{
#pragma omp parallel for simd schedule(static) if (n >= PAR_MIN)
    for (size_t i = 0; i < n; i++)
        dst[i] = bf16_from_f32_1(src[i]);
}

void bf16_to_f32(float *dst, const uint16_t *src, size_t n)
{
#pragma omp parallel for simd schedule(static) if (n >= PAR_MIN)
    for (size_t i = 0; i < n; i++)
        dst[i] = bf16_to_f32_1(src[i]);
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

#ifdef HAVE_DNNL

int bf16_available(void)
{
    return 1;
}

typedef struct mm_key {
    int M, K, N, lda, ldc, has_bias, acc;
    int64_t ws0, ws1;
} mm_key;

typedef struct mm_entry {
    mm_key key;
    dnnl_primitive_t prim;
    dnnl_memory_t src, wei, bias, dst;
} mm_entry;

#define MM_CACHE 96

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static dnnl_engine_t engine;
static dnnl_stream_t stream;
static int ready;               /* 1 ok, -1 failed */
static mm_entry cache[MM_CACHE];
static int n_cache, next_evict;
static uint16_t *scratch;
static size_t scratch_n;

static int setup(pr_error *err)
{
    if (ready > 0)
        return PR_OK;
    if (ready < 0)
        return pr_errorf(err, PR_ERR_UNSUPPORTED, "bf16: oneDNN could not create a CPU engine");
    dnnl_status_t s = dnnl_engine_create(&engine, dnnl_cpu, 0);
    if (s == dnnl_success)
        s = dnnl_stream_create(&stream, engine, dnnl_stream_default_flags);
    if (s != dnnl_success) {
        ready = -1;
        return pr_errorf(err, PR_ERR_UNSUPPORTED, "bf16: oneDNN could not create a CPU engine and stream (status %d)",
                         (int)s);
    }
    ready = 1;
    return PR_OK;
}

static void entry_free(mm_entry *e)
{
    if (e->prim) dnnl_primitive_destroy(e->prim);
    if (e->src) dnnl_memory_destroy(e->src);
    if (e->wei) dnnl_memory_destroy(e->wei);
    if (e->bias) dnnl_memory_destroy(e->bias);
    if (e->dst) dnnl_memory_destroy(e->dst);
    memset(e, 0, sizeof *e);
}

/* The primitive for key k, built on first use. */
static mm_entry *entry_for(const mm_key *k, pr_error *err)
{
    for (int i = 0; i < n_cache; i++)
        if (memcmp(&cache[i].key, k, sizeof *k) == 0)
            return &cache[i];
    mm_entry *e;
    int appended = 0;
    if (n_cache < MM_CACHE) {
        e = &cache[n_cache++];
        appended = 1;
    } else {
        e = &cache[next_evict];
        next_evict = (next_evict + 1) % MM_CACHE;
        entry_free(e);
    }
    memset(e, 0, sizeof *e);
    dnnl_memory_desc_t src_md, wei_md, bias_md, dst_md;
    dnnl_dims_t sd = {k->M, k->K}, ss = {k->lda, 1};
    dnnl_dims_t wd = {k->K, k->N}, ws = {k->ws0, k->ws1};
    dnnl_dims_t bd = {1, k->N}, bs = {k->N, 1};
    dnnl_dims_t dd = {k->M, k->N}, ds = {k->ldc, 1};
    dnnl_primitive_attr_t attr = NULL;
    dnnl_post_ops_t po = NULL;
    dnnl_primitive_desc_t pd = NULL;
    dnnl_matmul_desc_t md;
    dnnl_status_t s = dnnl_memory_desc_init_by_strides(&src_md, 2, sd, dnnl_bf16, ss);
    if (s == dnnl_success) s = dnnl_memory_desc_init_by_strides(&wei_md, 2, wd, dnnl_bf16, ws);
    if (s == dnnl_success) s = dnnl_memory_desc_init_by_strides(&bias_md, 2, bd, dnnl_f32, bs);
    if (s == dnnl_success) s = dnnl_memory_desc_init_by_strides(&dst_md, 2, dd, dnnl_f32, ds);
    if (s == dnnl_success) s = dnnl_matmul_desc_init(&md, &src_md, &wei_md, k->has_bias ? &bias_md : NULL, &dst_md);
    if (s == dnnl_success) s = dnnl_primitive_attr_create(&attr);
    if (s == dnnl_success && k->acc) {
        s = dnnl_post_ops_create(&po);
        if (s == dnnl_success) s = dnnl_post_ops_append_sum(po, 1.0f);
        if (s == dnnl_success) s = dnnl_primitive_attr_set_post_ops(attr, po);
    }
    if (s == dnnl_success) s = dnnl_primitive_desc_create(&pd, &md, attr, engine, NULL);
    if (s == dnnl_success) s = dnnl_primitive_create(&e->prim, pd);
    if (s == dnnl_success) s = dnnl_memory_create(&e->src, &src_md, engine, DNNL_MEMORY_NONE);
    if (s == dnnl_success) s = dnnl_memory_create(&e->wei, &wei_md, engine, DNNL_MEMORY_NONE);
    if (s == dnnl_success && k->has_bias) s = dnnl_memory_create(&e->bias, &bias_md, engine, DNNL_MEMORY_NONE);
    if (s == dnnl_success) s = dnnl_memory_create(&e->dst, &dst_md, engine, DNNL_MEMORY_NONE);
    if (pd) dnnl_primitive_desc_destroy(pd);
    if (po) dnnl_post_ops_destroy(po);
    if (attr) dnnl_primitive_attr_destroy(attr);
    if (s != dnnl_success) {
        entry_free(e);   /* a zero key matches no product (M > 0) */
        if (appended) n_cache--;
        pr_errorf(err, PR_ERR_UNSUPPORTED,
                  "bf16 matmul (%d,%d)x(%d,%d) lda %d ldc %d weight strides (%lld,%lld): oneDNN status %d", k->M,
                  k->K, k->K, k->N, k->lda, k->ldc, (long long)k->ws0, (long long)k->ws1, (int)s);
        return NULL;
    }
    e->key = *k;
    return e;
}

int bf16_matmul(float *c, int ldc, const float *a, int lda, const uint16_t *w, int64_t ws0, int64_t ws1,
                const float *bias, int M, int K, int N, int accumulate, pr_error *err)
{
    if (M <= 0 || N <= 0)
        return PR_OK;
    if (K <= 0) {
        if (!accumulate)
            for (int i = 0; i < M; i++) {
                float *row = c + (size_t)i * ldc;
                for (int j = 0; j < N; j++) row[j] = bias ? bias[j] : 0.0f;
            }
        return PR_OK;
    }
    pthread_mutex_lock(&lock);
    int rc = setup(err);
    size_t rows = chunk_elems / (size_t)K;
    if (rows < 1) rows = 1;
    if (rows > (size_t)M) rows = (size_t)M;
    if (rc == PR_OK && scratch_n < rows * (size_t)K) {
        free(scratch);
        scratch_n = 0;
        if (posix_memalign((void **)&scratch, 64, rows * (size_t)K * sizeof(uint16_t)) != 0) {
            scratch = NULL;
            rc = pr_errorf(err, PR_ERR_NOMEM, "bf16 matmul: out of memory for a %zu x %d bf16 scratch", rows, K);
        } else {
            scratch_n = rows * (size_t)K;
        }
    }
    for (int r0 = 0; rc == PR_OK && r0 < M; r0 += (int)rows) {
        int mr = M - r0 < (int)rows ? M - r0 : (int)rows;
        const float *ar = a + (size_t)r0 * lda;
#pragma omp parallel for schedule(static) if ((size_t)mr * K >= PAR_MIN)
        for (int i = 0; i < mr; i++) {
            uint16_t *d = scratch + (size_t)i * K;
            const float *s = ar + (size_t)i * lda;
#pragma omp simd
            for (int k = 0; k < K; k++)
                d[k] = bf16_from_f32_1(s[k]);
        }
        mm_key key = {.M = mr, .K = K, .N = N, .lda = K, .ldc = ldc, .has_bias = bias != NULL,
                      .acc = accumulate != 0, .ws0 = ws0, .ws1 = ws1};
        mm_entry *e = entry_for(&key, err);
        if (!e) {
            rc = PR_ERR_UNSUPPORTED;
            break;
        }
        dnnl_memory_set_data_handle(e->src, scratch);
        dnnl_memory_set_data_handle(e->wei, (void *)w);
        dnnl_memory_set_data_handle(e->dst, c + (size_t)r0 * ldc);
        dnnl_exec_arg_t args[4] = {{DNNL_ARG_SRC, e->src}, {DNNL_ARG_WEIGHTS, e->wei}, {DNNL_ARG_DST, e->dst}};
        int nargs = 3;
        if (bias) {
            dnnl_memory_set_data_handle(e->bias, (void *)bias);
            args[nargs++] = (dnnl_exec_arg_t){DNNL_ARG_BIAS, e->bias};
        }
        dnnl_status_t s = dnnl_primitive_execute(e->prim, stream, nargs, args);
        if (s == dnnl_success) s = dnnl_stream_wait(stream);
        if (s != dnnl_success)
            rc = pr_errorf(err, PR_ERR_UNSUPPORTED, "bf16 matmul (%d,%d)x(%d,%d): oneDNN execute status %d", mr, K, K,
                           N, (int)s);
    }
    pthread_mutex_unlock(&lock);
    return rc;
}

const char *bf16_dnnl_version(void)
{
    static char buf[32];
    const dnnl_version_t *v = dnnl_version();
    snprintf(buf, sizeof buf, "%d.%d.%d", v->major, v->minor, v->patch);
    return buf;
}

const char *bf16_isa(void)
{
    switch (dnnl_get_effective_cpu_isa()) {
    case dnnl_cpu_isa_avx512_core_amx: return "avx512_core_amx (AMX bf16 tiles)";
    case dnnl_cpu_isa_avx512_core_bf16: return "avx512_core_bf16 (AVX-512 BF16 dot products, no AMX)";
    case dnnl_cpu_isa_avx512_core_vnni: return "avx512_core_vnni (no bf16 instructions: bf16 emulated)";
    case dnnl_cpu_isa_avx512_core: return "avx512_core (no bf16 instructions: bf16 emulated)";
    case dnnl_cpu_isa_avx2_vnni: return "avx2_vnni (no bf16 instructions)";
    case dnnl_cpu_isa_avx2: return "avx2 (no bf16 instructions)";
    default: return "older than avx2 (no bf16 instructions)";
    }
}

int bf16_isa_native(void)
{
    dnnl_cpu_isa_t isa = dnnl_get_effective_cpu_isa();
    return isa == dnnl_cpu_isa_avx512_core_bf16 || isa == dnnl_cpu_isa_avx512_core_amx;
}

void bf16_shutdown(void)
{
    pthread_mutex_lock(&lock);
    for (int i = 0; i < n_cache; i++)
        entry_free(&cache[i]);
    n_cache = next_evict = 0;
    free(scratch);
    scratch = NULL;
    scratch_n = 0;
    if (ready > 0) {
        dnnl_stream_destroy(stream);
        dnnl_engine_destroy(engine);
    }
    ready = 0;
    pthread_mutex_unlock(&lock);
}

#else /* no oneDNN */

int bf16_available(void)
{
    return 0;
}

int bf16_matmul(float *c, int ldc, const float *a, int lda, const uint16_t *w, int64_t ws0, int64_t ws1,
                const float *bias, int M, int K, int N, int accumulate, pr_error *err)
{
    (void)c; (void)ldc; (void)a; (void)lda; (void)w; (void)ws0; (void)ws1; (void)bias; (void)accumulate;
    return pr_errorf(err, PR_ERR_UNSUPPORTED, "bf16 matmul (%d,%d)x(%d,%d): this peftref was built without oneDNN",
                     M, K, K, N);
}

const char *bf16_dnnl_version(void)
{
    return NULL;
}

const char *bf16_isa(void)
{
    return "none (built without oneDNN)";
}

int bf16_isa_native(void)
{
    return 0;
}

void bf16_shutdown(void)
{
}

#endif

double bf16_time_matmul(int use_bf16, int M, int K, int N, int reps)
{
    if (use_bf16 && !bf16_available())
        return -1.0;
    float *a = malloc((size_t)M * K * sizeof(float)), *c = malloc((size_t)M * N * sizeof(float));
    float *wf = malloc((size_t)K * N * sizeof(float));
    uint16_t *w = malloc((size_t)K * N * sizeof(uint16_t));
    double best = -1.0;
    if (a && c && wf && w) {
        for (size_t i = 0; i < (size_t)M * K; i++) a[i] = (float)((i * 7919u) % 1000u) * 1e-3f - 0.5f;
        for (size_t i = 0; i < (size_t)K * N; i++) wf[i] = (float)((i * 104729u) % 1000u) * 1e-3f - 0.5f;
        bf16_from_f32(w, wf, (size_t)K * N);
        for (int r = 0; r <= reps; r++) { /* r = 0 warms up (and builds the primitive) */
            double t0 = now_s();
            if (use_bf16) {
                if (bf16_matmul(c, N, a, K, w, N, 1, NULL, M, K, N, 0, NULL)) {
                    best = -1.0;
                    break;
                }
            } else {
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, M, N, K, 1.0f, a, K, wf, N, 0.0f, c, N);
            }
            double dt = now_s() - t0;
            if (r > 0 && (best < 0 || dt < best)) best = dt;
        }
    }
    free(a);
    free(c);
    free(wf);
    free(w);
    return best;
}
