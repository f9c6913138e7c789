/* peftref CLI: the --precision option of eval and generate. */
#include "config.h"

#include <stdio.h>

#include "bf16.h"
#include "cli.h"
#include "peftref/model.h"

int cli_parse_precision(const char *cmd, const char *s)
{
    int p = pr_precision_parse(s);
    if (p < 0) {
        fprintf(stderr, "peftref %s: --precision expects f32 or bf16, got '%s'\n", cmd, s);
        return -1;
    }
    pr_error err = {0};
    if (pr_precision_available(p, &err)) {
        fprintf(stderr, "peftref %s: --precision %s: %s\n", cmd, s, err.msg);
        return -1;
    }
    return p;
}

/* `peftref runtime`'s bf16 lines: oneDNN's version and ISA, one measured
 * product in f32 and in bf16, and a warning when bf16 is the slower. */
void cli_runtime_bf16(void)
{
    const char *v = bf16_dnnl_version();
    if (!v) {
        printf("bf16: unavailable (built without oneDNN; precision bf16 is refused)\n");
        return;
    }
    printf("bf16: oneDNN %s (OpenMP threads), ISA %s\n", v, bf16_isa());
    const int M = 512, K = 768, N = 768;
    double gf = 2.0 * M * K * N * 1e-9;
    double tf = bf16_time_matmul(0, M, K, N, 5), tb = bf16_time_matmul(1, M, K, N, 5);
    if (tf <= 0 || tb <= 0) {
        printf("bf16: the %dx%dx%d test product failed\n", M, K, N);
        return;
    }
    printf("bf16: measured %dx%dx%d product: f32 sgemm %.0f GFLOP/s, bf16 oneDNN %.0f GFLOP/s (%.2fx)\n", M, K, N,
           gf / tf, gf / tb, tf / tb);
    if (tb > tf)
        printf("warning: bf16 products are slower than f32 on this CPU (measured above%s); precision bf16 still "
               "halves the frozen weights' memory\n",
               bf16_isa_native() ? "" : "; no AMX or AVX-512 BF16: oneDNN emulates bf16");
}
