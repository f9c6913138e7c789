/* peftref core: data parallelism over MPI (see dist.h). */
#include "config.h"

#include <limits.h>
#include <omp.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#ifdef HAVE_MPI
#include <mpi.h>
#endif

#include "dist.h"

void openblas_set_num_threads(int n);
int openblas_get_num_threads(void);

static int g_rank = 0, g_size = 1;
#ifdef HAVE_MPI
static int g_active = 0, g_agreed_failure = 0;
#endif

/* Two buffers for the stop note so a signal never reads a half-written one. */
#define NOTE_MAX 1024
static char g_note[2][NOTE_MAX];
static volatile sig_atomic_t g_note_at = -1;

int dist_built(void)
{
#ifdef HAVE_MPI
    return 1;
#else
    return 0;
#endif
}

int dist_rank(void)
{
    return g_rank;
}

int dist_size(void)
{
    return g_size;
}

#ifdef HAVE_MPI
/* Launched by mpirun (Open MPI), or by a PMI / PMIx launcher (MPICH's
 * hydra, Slurm's srun). */
static int launched(void)
{
    return getenv("OMPI_COMM_WORLD_SIZE") || getenv("PMI_SIZE") || getenv("PMIX_RANK");
}

static int env_threads(const char *name)
{
    const char *s = getenv(name);
    if (!s || !*s)
        return 0;
    char *end;
    long v = strtol(s, &end, 10);
    return (*end == '\0' || *end == ',') && v > 0 && v < 4096 ? (int)v : 0;
}

/* Threads per rank: what the user set, else the CPUs this rank is bound to,
 * at most the host's cores shared equally among its ranks. */
static void set_threads(void)
{
    MPI_Comm local;
    int n_local = 1;
    if (MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &local) == MPI_SUCCESS) {
        MPI_Comm_size(local, &n_local);
        MPI_Comm_free(&local);
    }
    long online = sysconf(_SC_NPROCESSORS_ONLN);
    if (online < 1)
        online = 1;
    cpu_set_t set;
    int bound = 0;
    if (sched_getaffinity(0, sizeof set, &set) == 0)
        bound = CPU_COUNT(&set);
    int user = env_threads("OPENBLAS_NUM_THREADS");
    if (!user)
        user = env_threads("OMP_NUM_THREADS");
    int t;
    if (user) {
        t = user;
        if ((long)t * n_local > online && g_rank == 0)
            fprintf(stderr, "peftref: warning: %d ranks on this host x %d threads each exceed its %ld cores; "
                    "set OPENBLAS_NUM_THREADS=%ld\n", n_local, t, online, online / n_local > 0 ? online / n_local : 1);
    } else {
        /* bound to a core: 1; to a socket that several ranks share: its
         * share of the host */
        t = bound > 0 && bound < online ? bound : (int)online;
        if (t > online / n_local)
            t = (int)(online / n_local);
    }
    if (t < 1)
        t = 1;
    openblas_set_num_threads(t);
    omp_set_num_threads(t);
}
#endif

int dist_init(int *argc, char ***argv)
{
#ifdef HAVE_MPI
    if (!launched())
        return 0;
    int inited = 0;
    MPI_Initialized(&inited);
    if (!inited && MPI_Init(argc, argv) != MPI_SUCCESS) {
        fprintf(stderr, "peftref: MPI_Init failed under the launcher\n");
        return 1;
    }
    MPI_Comm_rank(MPI_COMM_WORLD, &g_rank);
    MPI_Comm_size(MPI_COMM_WORLD, &g_size);
    /* errors come back as values: a failed collective is reported, not fatal */
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
    g_active = 1;
    if (g_size > 1)
        set_threads();
#else
    (void)argc;
    (void)argv;
#endif
    return 0;
}

int dist_finish(int status)
{
#ifdef HAVE_MPI
    if (!g_active)
        return status;
    g_active = 0;
    if (status != 0 && !g_agreed_failure && g_size > 1)
        MPI_Abort(MPI_COMM_WORLD, status);
    MPI_Finalize();
#endif
    return status;
}

void dist_describe(char *buf, size_t size)
{
    if (!dist_built()) {
        snprintf(buf, size, "mpi: not built");
        return;
    }
    if (g_size == 1) {
        snprintf(buf, size, "mpi: 1 rank");
        return;
    }
    int t = openblas_get_num_threads();
    snprintf(buf, size, "mpi: %d ranks, %d thread%s each", g_size, t, t == 1 ? "" : "s");
}

#ifdef HAVE_MPI
static int mpi_error(int code, const char *what, pr_error *err)
{
    char s[MPI_MAX_ERROR_STRING];
    int len = 0;
    if (MPI_Error_string(code, s, &len) != MPI_SUCCESS)
        snprintf(s, sizeof s, "MPI error %d", code);
    return pr_errorf(err, PR_ERR_IO, "rank %d of %d: %s failed: %s (a rank has probably died)", g_rank, g_size, what,
                     s);
}
#endif

int dist_sum_floats(float *buf, size_t n, pr_error *err)
{
#ifdef HAVE_MPI
    if (g_size == 1)
        return PR_OK;
    for (size_t off = 0; off < n;) {
        size_t k = n - off < (size_t)INT_MAX ? n - off : (size_t)INT_MAX;
        int rc = MPI_Allreduce(MPI_IN_PLACE, buf + off, (int)k, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
        if (rc != MPI_SUCCESS)
            return mpi_error(rc, "the gradient all-reduce", err);
        off += k;
    }
#else
    (void)buf;
    (void)n;
    (void)err;
#endif
    return PR_OK;
}

int dist_sum_doubles(double *buf, int n, pr_error *err)
{
#ifdef HAVE_MPI
    if (g_size == 1)
        return PR_OK;
    int rc = MPI_Allreduce(MPI_IN_PLACE, buf, n, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
    if (rc != MPI_SUCCESS)
        return mpi_error(rc, "an all-reduce of step statistics", err);
#else
    (void)buf;
    (void)n;
    (void)err;
#endif
    return PR_OK;
}

int dist_agree(int rc, pr_error *err)
{
#ifdef HAVE_MPI
    if (g_size == 1)
        return rc;
    int mine = rc ? g_rank : g_size, first = g_size;
    int mrc = MPI_Allreduce(&mine, &first, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
    if (mrc != MPI_SUCCESS)
        return mpi_error(mrc, "agreeing on a status", err);
    if (first == g_size)
        return PR_OK;
    struct {
        int rc;
        char msg[PR_ERROR_MSG_MAX];
    } m;
    memset(&m, 0, sizeof m);
    if (g_rank == first) {
        m.rc = rc;
        snprintf(m.msg, sizeof m.msg, "%s", err ? err->msg : "failed");
    }
    mrc = MPI_Bcast(&m, (int)sizeof m, MPI_BYTE, first, MPI_COMM_WORLD);
    if (mrc != MPI_SUCCESS)
        return mpi_error(mrc, "sharing a failure", err);
    g_agreed_failure = 1;
    if (g_rank != first)
        pr_errorf(err, (pr_status)m.rc, "rank %d of %d: %.*s", first, g_size, PR_ERROR_MSG_MAX - 32, m.msg);
    return m.rc;
#else
    (void)err;
    return rc;
#endif
}

void dist_detach(void)
{
#ifdef HAVE_MPI
    g_active = 0;   /* the child _exits: neither MPI_Finalize nor MPI_Abort is its to call */
#endif
    g_rank = 0;
    g_size = 1;
}

int dist_gather_text(const char *mine, char ***all, pr_error *err)
{
    *all = NULL;
    size_t n = strlen(mine) + 1;
    if (g_size == 1) {
        char **a = calloc(1, sizeof *a);
        if (!a || !(a[0] = strdup(mine))) {
            free(a);
            return pr_errorf(err, PR_ERR_NOMEM, "out of memory");
        }
        *all = a;
        return PR_OK;
    }
#ifdef HAVE_MPI
    if (n > (size_t)INT_MAX)
        return pr_errorf(err, PR_ERR_INVALID, "rank %d of %d: %zu bytes to gather, more than MPI counts", g_rank,
                         g_size, n);
    int len = (int)n, *lens = NULL, *offs = NULL;
    char *buf = NULL;
    /* the other ranks wait in the gather: rank 0 out of memory ends the job */
    if (g_rank == 0 && (!(lens = calloc((size_t)g_size, sizeof *lens)) || !(offs = calloc((size_t)g_size, sizeof *offs)))) {
        fprintf(stderr, "peftref: rank 0: out of memory gathering results\n");
        MPI_Abort(MPI_COMM_WORLD, 1);
    }
    int rc = MPI_Gather(&len, 1, MPI_INT, lens, 1, MPI_INT, 0, MPI_COMM_WORLD);
    if (rc != MPI_SUCCESS) {
        free(lens);
        free(offs);
        return mpi_error(rc, "gathering results", err);
    }
    size_t total = 0;
    if (g_rank == 0 && lens) {
        for (int r = 0; r < g_size; r++) {
            offs[r] = (int)total;
            total += (size_t)(lens[r] > 0 ? lens[r] : 0);
        }
        if (total > (size_t)INT_MAX || !(buf = malloc(total))) {
            fprintf(stderr, "peftref: rank 0: cannot hold the %zu bytes of results gathered\n", total);
            MPI_Abort(MPI_COMM_WORLD, 1);
        }
    }
    rc = MPI_Gatherv(mine, len, MPI_CHAR, buf, lens, offs, MPI_CHAR, 0, MPI_COMM_WORLD);
    if (rc != MPI_SUCCESS) {
        free(lens);
        free(offs);
        free(buf);
        return mpi_error(rc, "gathering results", err);
    }
    if (g_rank != 0)
        return PR_OK;
    char **a = calloc((size_t)g_size, sizeof *a);
    for (int r = 0; a && r < g_size; r++) {
        size_t l = (size_t)lens[r];
        if (!(a[r] = malloc(l))) {
            for (int k = 0; k < r; k++)
                free(a[k]);
            free(a);
            a = NULL;
            break;
        }
        memcpy(a[r], buf + offs[r], l);
        a[r][l - 1] = '\0';
    }
    free(lens);
    free(offs);
    free(buf);
    if (!a)
        return pr_errorf(err, PR_ERR_NOMEM, "rank 0: out of memory gathering results");
    *all = a;
    return PR_OK;
#else
    return pr_errorf(err, PR_ERR_INVALID, "%zu bytes: several ranks without MPI", n);
#endif
}

void dist_set_stop_note(const char *note)
{
    int next = g_note_at == 0 ? 1 : 0;
    snprintf(g_note[next], NOTE_MAX, "%s", note);
    g_note_at = next;
}

static size_t put(char *dst, size_t at, size_t cap, const char *s)
{
    while (*s && at + 1 < cap)
        dst[at++] = *s++;
    return at;
}

static size_t put_int(char *dst, size_t at, size_t cap, int v)
{
    char d[16];
    int n = 0;
    unsigned u = v < 0 ? 0u : (unsigned)v;
    do {
        d[n++] = (char)('0' + u % 10);
        u /= 10;
    } while (u && n < 15);
    while (n > 0 && at + 1 < cap)
        dst[at++] = d[--n];
    return at;
}

void dist_signal_exit(int sig)
{
    if (g_rank == 0) {
        char line[NOTE_MAX + 128];
        size_t at = put(line, 0, sizeof line, "peftref train: rank 0 of ");
        at = put_int(line, at, sizeof line, g_size);
        at = put(line, at, sizeof line, ": stopped by signal ");
        at = put_int(line, at, sizeof line, sig);
        at = put(line, at, sizeof line, " (mpirun ends every rank when one fails or the job is interrupted)");
        int k = g_note_at;
        if (k >= 0) {
            at = put(line, at, sizeof line, ": ");
            at = put(line, at, sizeof line, g_note[k]);
        }
        at = put(line, at, sizeof line, "\n");
        ssize_t w = write(STDERR_FILENO, line, at);
        (void)w;
    }
    _exit(128 + sig);
}
