/* bench/bf16_pack.c: does packing frozen bf16 weights in oneDNN's preferred
 * layout pay?  Times oneDNN's bf16 matmul (bf16 source and weights, f32
 * destination) at GPT-2-small's B*T = 1024 row shapes with the weights
 * plain [K,N] (forward), plain transposed [N,K] (the same storage read by
 * backward), and in the layout oneDNN picks (format_tag any, forward only).
 * Best of 5 after a warm-up.  Built and run by `bash bench/bf16.sh BUILD pack`
 * (cc -O2 bench/bf16_pack.c -ldnnl). */
#include <oneapi/dnnl/dnnl.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static dnnl_engine_t engine;
static dnnl_stream_t stream;

static double now_s(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static void check(dnnl_status_t s, int line)
{
    if (s != dnnl_success) {
        fprintf(stderr, "bf16_pack: oneDNN status %d at line %d\n", (int)s, line);
        exit(1);
    }
}
#define CK(x) check((x), __LINE__)

/* (M,K) x (K,N): weights plain [K,N], plain [N,K] (trans) or packed */
static void run(int M, int K, int N, int packed, int trans)
{
    dnnl_memory_desc_t a, w, c;
    dnnl_dims_t ad = {M, K}, as = {K, 1}, wd = {K, N}, cd = {M, N}, cs = {N, 1};
    dnnl_dims_t ws = {trans ? 1 : N, trans ? K : 1};
    CK(dnnl_memory_desc_init_by_strides(&a, 2, ad, dnnl_bf16, as));
    CK(dnnl_memory_desc_init_by_strides(&c, 2, cd, dnnl_f32, cs));
    if (packed)
        CK(dnnl_memory_desc_init_by_tag(&w, 2, wd, dnnl_bf16, dnnl_format_tag_any));
    else
        CK(dnnl_memory_desc_init_by_strides(&w, 2, wd, dnnl_bf16, ws));
    dnnl_matmul_desc_t md;
    dnnl_primitive_desc_t pd;
    dnnl_primitive_t p;
    CK(dnnl_matmul_desc_init(&md, &a, &w, NULL, &c));
    CK(dnnl_primitive_desc_create(&pd, &md, NULL, engine, NULL));
    const dnnl_memory_desc_t *wq = dnnl_primitive_desc_query_md(pd, dnnl_query_weights_md, 0);
    const char *impl = "?";
    dnnl_primitive_desc_query(pd, dnnl_query_impl_info_str, 0, &impl);
    CK(dnnl_primitive_create(&p, pd));
    void *A = calloc((size_t)M * K, 2), *W = calloc((size_t)K * N * 2, 2), *C = calloc((size_t)M * N, 4);
    dnnl_memory_t ma, mw, mc;
    CK(dnnl_memory_create(&ma, &a, engine, A));
    CK(dnnl_memory_create(&mw, wq, engine, W));
    CK(dnnl_memory_create(&mc, &c, engine, C));
    dnnl_exec_arg_t args[3] = {{DNNL_ARG_SRC, ma}, {DNNL_ARG_WEIGHTS, mw}, {DNNL_ARG_DST, mc}};
    double best = 1e30;
    for (int r = 0; r < 6; r++) {
        double t = now_s();
        CK(dnnl_primitive_execute(p, stream, 3, args));
        CK(dnnl_stream_wait(stream));
        t = now_s() - t;
        if (r > 0 && t < best)
            best = t;
    }
    printf("  %5dx%5dx%5d  %-14s %7.1f GFLOP/s  (%s)\n", M, K, N,
           packed ? "packed (any)" : trans ? "plain [N,K]" : "plain [K,N]", 2.0 * M * K * N / best * 1e-9, impl);
    dnnl_memory_destroy(ma);
    dnnl_memory_destroy(mw);
    dnnl_memory_destroy(mc);
    dnnl_primitive_destroy(p);
    dnnl_primitive_desc_destroy(pd);
    free(A);
    free(W);
    free(C);
}

int main(void)
{
    CK(dnnl_engine_create(&engine, dnnl_cpu, 0));
    CK(dnnl_stream_create(&stream, engine, dnnl_stream_default_flags));
    /* qkv, attention out, fc, fc proj, the LM head, and qkv's backward */
    static const int shapes[][3] = {{1024, 768, 2304}, {1024, 768, 768},    {1024, 768, 3072},
                                    {1024, 3072, 768}, {1024, 768, 50257}, {1024, 2304, 768}};
    for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++)
        for (int v = 0; v < 3; v++)
            run(shapes[i][0], shapes[i][1], shapes[i][2], v == 2, v == 1);
    dnnl_stream_destroy(stream);
    dnnl_engine_destroy(engine);
    return 0;
}
