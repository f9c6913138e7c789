/* peftref core: data parallelism over MPI (docs/distributed.md).
 *
 * One binary serves both kinds of run.  When configure found an MPI
 * library (HAVE_MPI) it is linked in, but MPI_Init runs only when a
 * launcher started the process (mpirun sets OMPI_COMM_WORLD_SIZE, PMI and
 * PMIx launchers PMI_SIZE or PMIX_RANK); a process started directly is a
 * world of one rank and never touches MPI.  Without HAVE_MPI every call
 * below is that world of one.
 *
 * Failure is collective: a rank that fails calls dist_agree with its
 * status like every other rank, and every rank then returns the status
 * and message of the lowest failing rank, so no rank is left waiting in a
 * collective that another has abandoned.  A rank that dies outright
 * (kill -9) is mpirun's to notice: it sends SIGTERM to the others, and
 * dist_signal_exit writes rank 0's note (the step, the last checkpoint)
 * and ends the process. */
#ifndef PEFTREF_CORE_DIST_H
#define PEFTREF_CORE_DIST_H

#include <stddef.h>

#include "peftref/status.h"

/* At the top of main (after runtime_reexec_if_needed).  Under a launcher:
 * MPI_Init, and OpenBLAS and OpenMP threads per rank set so that the
 * ranks on one host never run more threads than the cores they were given
 * (the CPUs a rank is bound to, or the host's cores shared among its local
 * ranks; OPENBLAS_NUM_THREADS or OMP_NUM_THREADS, when set, decide, with a
 * warning when they oversubscribe).  Returns 0, or non-zero after a
 * message on stderr when MPI_Init failed. */
int dist_init(int *argc, char ***argv);

/* At the end of main with the exit status: MPI_Finalize when every rank
 * ends together (status 0, or a failure every rank agreed on), MPI_Abort
 * otherwise (a failure of this rank alone, which the others would wait
 * for forever).  Returns status. */
int dist_finish(int status);

int dist_built(void);   /* 1 when linked with MPI */
int dist_rank(void);    /* 0 .. dist_size() - 1 */
int dist_size(void);    /* ranks in the job; 1 without MPI or launcher */

/* "mpi: not built", "mpi: 1 rank", or "mpi: N ranks, T threads each". */
void dist_describe(char *buf, size_t size);

/* In-place sums over every rank (no-ops for one rank).  n may exceed
 * INT_MAX: the sum then goes in pieces. */
int dist_sum_floats(float *buf, size_t n, pr_error *err);
int dist_sum_doubles(double *buf, int n, pr_error *err);

/* Collective status: every rank passes its own rc (and err with its
 * message when rc != 0); all return the rc of the lowest failing rank,
 * with its message in err (prefixed "rank R of N: " on the other ranks),
 * or PR_OK when none failed. */
int dist_agree(int rc, pr_error *err);

/* In a child forked from a rank (peftref compare launched under mpirun
 * runs one single-process arm per rank): from here on this process is a
 * world of one that never calls MPI; the parent rank keeps its place. */
void dist_detach(void);

/* Every rank's NUL-terminated text, gathered on rank 0: there *all gets
 * dist_size() strings (freed by the caller, each and the array), on the
 * other ranks NULL.  A world of one gets a copy of its own. */
int dist_gather_text(const char *mine, char ***all, pr_error *err);

/* The note rank 0 writes when a signal ends a multi-rank run (the step in
 * flight, where the last checkpoint is); copied, safe to update between
 * steps while signals may arrive. */
void dist_set_stop_note(const char *note);

/* For a signal handler of a multi-rank run: rank 0 writes
 * "peftref: rank 0 of N: stopped by signal S: NOTE" to stderr; every rank
 * then ends at once (_exit), since a peer that died leaves the next
 * collective waiting forever.  Async-signal-safe. */
void dist_signal_exit(int sig);

#endif
