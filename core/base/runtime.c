/* peftref core: BLAS kernel detection and thread policy (see runtime.h). */
#include "config.h"

#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "dist.h"
#include "runtime.h"

/* OpenBLAS extensions (not in every cblas.h). */
char *openblas_get_corename(void);
int openblas_get_num_threads(void);

const char *runtime_blas_core(void)
{
#ifdef HAVE_OPENBLAS_GET_CORENAME
    const char *c = openblas_get_corename();
    return c ? c : "unknown";
#else
    return "unknown";
#endif
}

/* OpenBLAS's DYNAMIC_ARCH falls back to one of these when it does not
 * recognise the processor (driver/others/dynamic.c picks Prescott for an
 * unknown x86-64); none uses AVX2 or AVX-512. */
int runtime_blas_is_generic(void)
{
    static const char *generic[] = {"prescott", "core2", "penryn", "dunnington", "nehalem",
                                    "atom", "katmai", "coppermine", "northwood", "banias",
                                    "opteron", "barcelona", "generic", NULL};
    const char *c = runtime_blas_core();
    for (int i = 0; generic[i]; i++)
        if (strcasecmp(c, generic[i]) == 0)
            return 1;
    return 0;
}

const char *runtime_blas_suggested_core(void)
{
#if defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512cd"))
        return "SkylakeX";
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
        return "Haswell";
#endif
    return NULL;
}

int runtime_blas_threads(void)
{
    return openblas_get_num_threads();
}

int runtime_omp_threads(void)
{
    return omp_get_max_threads();
}

int runtime_reexec_if_needed(char **argv)
{
    if (getenv("PEFTREF_RUNTIME_SET"))
        return 0;
    int changed = 0;
    /* libgomp reads OMP_WAIT_POLICY once at load: idle OpenMP workers that
     * spin for their default spin count steal a core from OpenBLAS's
     * threads between our parallel loops and its GEMMs. */
    if (!getenv("OMP_WAIT_POLICY")) {
        setenv("OMP_WAIT_POLICY", "passive", 1);
        changed = 1;
    }
    /* OpenBLAS's own worker threads, once a GEMM is done, spin calling
     * sched_yield for 2^28 cycles (OPENBLAS_THREAD_TIMEOUT, 2^n cycles, n in
     * 4..30) before they sleep; on 2 cores they take a core from the OpenMP
     * team (our loops, and oneDNN's bf16 products) that runs next.
     * Measured on GPT-2-small LoRA in bf16 (bench/bf16.sh threads): idle,
     * 2.15 -> 2.08 s/step and 15k -> 0.8k preemptions; with other work on
     * the machine, 6.1 -> 4.0 s/step.  No effect on results. */
    if (!getenv("OPENBLAS_THREAD_TIMEOUT")) {
        setenv("OPENBLAS_THREAD_TIMEOUT", "4", 1);
        changed = 1;
    }
    if (runtime_blas_is_generic() && !getenv("OPENBLAS_CORETYPE")) {
        const char *s = runtime_blas_suggested_core();
        if (s) {
            fprintf(stderr,
                    "peftref: OpenBLAS did not recognise this CPU and chose its generic '%s' kernels; "
                    "using '%s' kernels instead (set OPENBLAS_CORETYPE to choose)\n",
                    runtime_blas_core(), s);
            setenv("OPENBLAS_CORETYPE", s, 1);
            changed = 1;
        }
    }
    if (!changed)
        return 0;
    setenv("PEFTREF_RUNTIME_SET", "1", 1);
    execv("/proc/self/exe", argv);
    /* exec failed (no /proc): carry on with the settings we have */
    return 0;
}

void runtime_describe(char *buf, unsigned long size)
{
    snprintf(buf, size, "blas: OpenBLAS %s%s, %d threads; omp: %d threads", runtime_blas_core(),
             runtime_blas_is_generic() ? " (generic fallback kernel)" : "", runtime_blas_threads(),
             runtime_omp_threads());
}

void runtime_describe_layout(char *buf, unsigned long size)
{
    char mpi[128];
    runtime_describe(buf, size);
    dist_describe(mpi, sizeof mpi);
    size_t n = strlen(buf);
    if (n + 2 < size)
        snprintf(buf + n, size - n, "; %s", mpi);
}

void runtime_warn_generic_blas(void)
{
    static int warned;
    if (warned || !runtime_blas_is_generic())
        return;
    warned = 1;
    const char *s = runtime_blas_suggested_core();
    fprintf(stderr,
            "peftref: warning: OpenBLAS runs its generic '%s' kernels, several times slower than this "
            "CPU allows%s%s%s\n",
            runtime_blas_core(), s ? "; set OPENBLAS_CORETYPE=" : "", s ? s : "", s ? "" : "");
}
