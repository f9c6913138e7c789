/* peftref core: process-wide runtime facts and policy.
 *
 * Two things decide CPU speed here: which OpenBLAS kernel set runs (a
 * DYNAMIC_ARCH build that does not recognise the CPU silently falls back to
 * generic kernels, several times slower), and whether OpenMP worker threads
 * spin while OpenBLAS's own threads work (on 2 cores that halves the
 * speed).  Both are fixed only by environment variables read when the
 * libraries load, so the command-line program checks them first thing and
 * re-executes itself once with corrected settings (runtime_reexec_if_needed). */
#ifndef PEFTREF_CORE_RUNTIME_H
#define PEFTREF_CORE_RUNTIME_H

/* OpenBLAS core name, e.g. "Haswell", "SkylakeX", "Prescott". */
const char *runtime_blas_core(void);
/* 1 when the core in use is a generic fallback kernel set. */
int runtime_blas_is_generic(void);
/* The kernel set this CPU supports best among the safe ones ("SkylakeX",
 * "Haswell"), or NULL when none applies. */
const char *runtime_blas_suggested_core(void);
int runtime_blas_threads(void);
int runtime_omp_threads(void);

/* Called at the top of main() with argv.  When OMP_WAIT_POLICY is unset it
 * sets it to "passive", and OPENBLAS_THREAD_TIMEOUT to 4 (OpenBLAS's idle
 * workers sleep at once instead of spinning); when OpenBLAS runs a generic fallback kernel and
 * the user has not chosen OPENBLAS_CORETYPE, it sets the suggested core.
 * If anything changed it re-executes the program (once; guarded by
 * PEFTREF_RUNTIME_SET) and does not return.  Otherwise returns 0. */
int runtime_reexec_if_needed(char **argv);

/* One line for logs: "blas: OpenBLAS Haswell, 2 threads; omp: 2 threads". */
void runtime_describe(char *buf, unsigned long size);

/* The same followed by the MPI layout (dist_describe), for a run's first
 * line: "blas: ...; omp: 1 threads; mpi: 2 ranks, 1 thread each". */
void runtime_describe_layout(char *buf, unsigned long size);

/* Warn on stderr (once per process) when a generic BLAS kernel is in use. */
void runtime_warn_generic_blas(void);

#endif
