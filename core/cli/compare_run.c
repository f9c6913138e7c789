/* peftref compare: one arm trained in a child process.
 *
 * The child builds the arm's model, trains it and sends back one JSON
 * object over a pipe: the training result and its own peak memory
 * (VmHWM, /proc/self/status, read when training ends, so that the number
 * is the arm's alone).  The parent fills the arm's compare_row from it, or
 * with why there is none (a signal, an exit without a result), and reads
 * the validation-loss curve from the arm's metrics.jsonl. */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#ifdef __linux__
#include <sys/prctl.h>
#endif

#include "compare.h"
#include "dist.h"
#include "fileio.h"
#include "run_fingerprint.h"

static double now_seconds(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* The child training now (0 when none), for the signal forwarder. */
static volatile pid_t running_child;
static volatile sig_atomic_t *stop_flag;
static struct sigaction saved_int, saved_term;

static void forward_signal(int sig)
{
    if (stop_flag)
        *stop_flag = 1;
    pid_t c = running_child;
    if (c > 0)
        kill(c, sig);   /* the child's trainer checkpoints and stops */
}

void compare_signals_install(volatile sig_atomic_t *flag)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = forward_signal;
    sigemptyset(&sa.sa_mask);
    stop_flag = flag;
    sigaction(SIGINT, &sa, &saved_int);
    sigaction(SIGTERM, &sa, &saved_term);
}

void compare_signals_restore(void)
{
    sigaction(SIGINT, &saved_int, NULL);
    sigaction(SIGTERM, &saved_term, NULL);
    stop_flag = NULL;
}

uint64_t compare_seed(uint64_t train_seed, int i)
{
    return (train_seed + 1000003ull * (uint64_t)i) & 0x7fffffffffffffffull;
}

/* C = A * B on n x n matrices, repeated: a fixed amount of arithmetic whose
 * time follows the machine's load. */
double compare_calibrate(void)
{
    enum { N = 96, REPS = 16 };   /* about 15 M multiply-adds: some milliseconds */
    static float a[N * N], b[N * N], c[N * N];
    for (int i = 0; i < N * N; i++) {
        a[i] = (float)(i % 7) * 0.25f;
        b[i] = (float)(i % 5) * 0.5f;
    }
    double best = 0;
    for (int trial = 0; trial < 3; trial++) {
        double t0 = now_seconds();
        for (int r = 0; r < REPS; r++)
            for (int i = 0; i < N; i++)
                for (int j = 0; j < N; j++) {
                    float acc = 0;
                    for (int k = 0; k < N; k++)
                        acc += a[i * N + k] * b[k * N + j];
                    c[i * N + j] = acc + (float)r;
                }
        double t = now_seconds() - t0;
        /* the fastest of three: one preemption does not decide, a lasting load does */
        if (trial == 0 || t < best)
            best = t;
    }
    volatile float sink = c[N + 1];
    (void)sink;
    return best;
}


/* Peak resident set of this process in KiB: VmHWM, else ru_maxrss. */
long compare_peak_kib(void)
{
    long kib = -1;
    FILE *f = fopen("/proc/self/status", "r");
    if (f) {
        char line[256];
        while (fgets(line, sizeof line, f))
            if (sscanf(line, "VmHWM: %ld kB", &kib) == 1)
                break;
        fclose(f);
    }
    if (kib <= 0) {
        struct rusage ru;
        if (getrusage(RUSAGE_SELF, &ru) == 0)
            kib = ru.ru_maxrss;
    }
    return kib;
}

static json_t *real_or_null(double v)
{
    return isfinite(v) ? json_real(v) : json_null();
}

static int write_all(int fd, const char *s, size_t n)
{
    while (n > 0) {
        ssize_t w = write(fd, s, n);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return -1;
        s += w;
        n -= (size_t)w;
    }
    return 0;
}

/* What decides a run's result: the run's fingerprint (pipeline, data,
 * base model) and the program's own bytes. */
static char *fingerprint_of(const pr_model *m, const pr_train_config *tc, int mpi_ranks, pr_error *err)
{
    run_fp f;
    run_fp_init(&f);
    char *s = NULL;
    /* the ranks train the same steps, but time them differently: a change
     * of compare.mpi_ranks trains the arm again (a single-process arm's
     * fingerprint is what it was before the key existed) */
    int ok = run_fp_of_run(&f, m, tc, err) == PR_OK && run_fp_add_file(&f, "code.program", "/proc/self/exe", err) == PR_OK;
    if (ok && mpi_ranks > 1 && run_fp_set(&f, "compare.mpi_ranks", "%d", mpi_ranks) != 0)
        ok = 0 * pr_errorf(err, PR_ERR_NOMEM, "out of memory");
    if (ok)
        s = run_fp_json(&f);
    run_fp_free(&f);
    return s;
}

/* out_dir/compare_result.json of a finished run with this fingerprint:
 * its result object (new reference), else NULL. */
static json_t *stored_result(const char *out_dir, const char *fp)
{
    char *path = fileio_join(out_dir, COMPARE_RESULT_FILE);
    json_t *o = path ? json_load_file(path, 0, NULL) : NULL;
    free(path);
    const char *old = json_string_value(json_object_get(o, "fingerprint"));
    json_t *res = old && fp && !strcmp(old, fp) ? json_object_get(o, "result") : NULL;
    if (json_is_object(res))
        json_incref(res);
    else
        res = NULL;
    json_decref(o);
    return res;
}

static void store_result(const char *out_dir, const char *fp, json_t *res)
{
    json_t *o = json_object();
    char *path = fileio_join(out_dir, COMPARE_RESULT_FILE);
    if (o && path && fp) {
        json_object_set_new(o, "fingerprint", json_string(fp));
        json_object_set(o, "result", res);
        char *s = json_dumps(o, JSON_INDENT(1));
        pr_error e = { 0 };
        if (s && fileio_write_atomic(path, s, strlen(s), &e))
            fprintf(stderr, "peftref compare: %s\n", e.msg);
        free(s);
    }
    free(path);
    json_decref(o);
}

/* The result one run reports (the child over its pipe, `peftref train
 * --result-json` in its file): rc and error, the training summary and the
 * peak resident memory in KiB (< 0: not measured). */
static json_t *result_object(int rc, const char *msg, const pr_train_result *res, long peak)
{
    json_t *o = json_object();
    if (!o)
        return NULL;
    json_object_set_new(o, "rc", json_integer(rc));
    json_object_set_new(o, "error", json_string(rc && msg ? msg : ""));
    json_object_set_new(o, "interrupted", json_boolean(res->interrupted));
    json_object_set_new(o, "complete", json_boolean(res->complete));
    json_object_set_new(o, "steps", json_integer((json_int_t)res->steps_done));
    json_object_set_new(o, "steps_timed", json_integer((json_int_t)(res->complete ? 0 :
                        res->steps_done - (res->resumed_from > 0 ? res->resumed_from : 0))));
    json_object_set_new(o, "step_seconds", real_or_null(res->step_seconds));
    json_object_set_new(o, "tokens", json_integer((json_int_t)res->tokens_trained));
    json_object_set_new(o, "trainable", json_integer((json_int_t)res->trainable_params));
    json_object_set_new(o, "initial_val_loss", real_or_null(res->initial_val_loss));
    json_object_set_new(o, "val_loss", real_or_null(res->final_val_loss));
    json_object_set_new(o, "val_accuracy", real_or_null(res->final_val_accuracy));
    json_object_set_new(o, "peak_kib", json_integer(peak));
    return o;
}

char *compare_result_json(int rc, const char *msg, const pr_train_result *res, long peak_kib, int ranks,
                          double peak_kib_sum)
{
    json_t *o = result_object(rc, msg, res, peak_kib);
    if (!o)
        return NULL;
    json_object_set_new(o, "ranks", json_integer(ranks));
    json_object_set_new(o, "peak_kib_all_ranks", json_integer((json_int_t)peak_kib_sum));
    char *s = json_dumps(o, JSON_INDENT(1));
    json_decref(o);
    return s;
}

/* mpirun (or $PEFTREF_MPIRUN, split at blanks, e.g. "mpirun --oversubscribe")
 * as an argv prefix in words[0..*n); the words point into buf.  0, or -1
 * with why in err when no launcher is on PATH. */
static int launcher(char *buf, size_t len, char **words, int max, int *n, pr_error *err)
{
    const char *env = getenv("PEFTREF_MPIRUN");
    snprintf(buf, len, "%s", env && *env ? env : "mpirun");
    *n = 0;
    for (char *save = NULL, *w = strtok_r(buf, " \t", &save); w && *n < max; w = strtok_r(NULL, " \t", &save))
        words[(*n)++] = w;
    if (*n == 0)
        return pr_errorf(err, PR_ERR_INVALID, "PEFTREF_MPIRUN is blank");
    if (strchr(words[0], '/'))
        return access(words[0], X_OK) == 0 ? 0
               : pr_errorf(err, PR_ERR_NOTFOUND, "the MPI launcher %s cannot be run", words[0]);
    const char *path = getenv("PATH");
    char dir[4096];
    for (const char *p = path ? path : "/usr/bin:/bin"; *p;) {
        size_t k = strcspn(p, ":");
        snprintf(dir, sizeof dir, "%.*s/%s", (int)k, p, words[0]);
        if (k > 0 && access(dir, X_OK) == 0)
            return 0;
        p += k + (p[k] == ':');
    }
    return pr_errorf(err, PR_ERR_NOTFOUND, "%s is not on PATH", words[0]);
}

int compare_mpi_available(char *why, size_t len)
{
    pr_error e = { 0 };
    char buf[1024];
    char *w[64];
    int n;
    if (!dist_built()) {
        snprintf(why, len, "peftref was built without MPI (configure found no MPI library; install libopenmpi-dev "
                 "and openmpi-bin and build again)");
        return 0;
    }
    if (launcher(buf, sizeof buf, w, 64, &n, &e)) {
        snprintf(why, len, "%s (install openmpi-bin, or set PEFTREF_MPIRUN)", e.msg);
        return 0;
    }
    return 1;
}

/* The launcher training now in the child of a compare_mpi arm, for its
 * signal forwarder. */
static volatile pid_t running_launcher;
static volatile sig_atomic_t launcher_signalled;

static void forward_to_launcher(int sig)
{
    pid_t c = running_launcher;
    launcher_signalled = sig;
    if (c > 0)
        kill(c, sig);   /* mpirun passes it to the ranks, which end at once */
}

/* In the child of an arm with mpi_ranks > 1: `mpirun -np N peftref train
 * PIPELINE [--arm NAME [--arm-setting K]] --set ... --out DIR
 * --result-json DIR/mpi_result.json`, then that file's result (rank 0's
 * peak memory as peak_kib).  NULL with err set when there is none. */
static json_t *run_under_mpi(compare_arm *a, pr_error *err)
{
    char lbuf[1024], np[16], point[16], res_path[4096], exe[4096];
    char *words[64];
    int n_words;
    if (launcher(lbuf, sizeof lbuf, words, 48, &n_words, err))
        return NULL;
    ssize_t el = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (el <= 0) {
        pr_errorf(err, PR_ERR_IO, "cannot find this program (/proc/self/exe): %s", strerror(errno));
        return NULL;
    }
    exe[el] = '\0';
    snprintf(res_path, sizeof res_path, "%s/%s", a->out_dir, COMPARE_MPI_RESULT_FILE);
    unlink(res_path);
    snprintf(np, sizeof np, "%d", a->mpi_ranks);
    snprintf(point, sizeof point, "%d", a->arm_point);
    const pr_train_config *tc = &a->tc;
    char ev[64];
    snprintf(ev, sizeof ev, "train.eval_every=%d", tc->eval_every);
    size_t cap = (size_t)n_words + 2 * (size_t)a->n_sets + 32;
    const char **argv = calloc(cap, sizeof *argv);
    if (!argv) {
        pr_errorf(err, PR_ERR_NOMEM, "out of memory");
        return NULL;
    }
    int k = 0;
    for (int i = 0; i < n_words; i++)
        argv[k++] = words[i];
    argv[k++] = "-np";
    argv[k++] = np;
    argv[k++] = exe;
    argv[k++] = "train";
    argv[k++] = a->path;
    if (a->arm_name) {
        argv[k++] = "--arm";
        argv[k++] = a->arm_name;
        if (a->arm_point > 0) {
            argv[k++] = "--arm-setting";
            argv[k++] = point;
        }
    }
    for (int i = 0; i < a->n_sets; i++) {
        argv[k++] = "--set";
        argv[k++] = a->sets[i];
    }
    if (a->seed_set[0]) {
        argv[k++] = "--set";
        argv[k++] = a->seed_set;
    }
    argv[k++] = "--set";
    argv[k++] = ev;
    argv[k++] = "--out";
    argv[k++] = a->out_dir;
    argv[k++] = "--result-json";
    argv[k++] = res_path;
    argv[k++] = tc->resume ? "--resume" : "--force";
    argv[k++] = "--progress";
    argv[k++] = tc->progress == PR_PROGRESS_BAR ? "bar" : tc->progress == PR_PROGRESS_PLAIN ? "plain" : "none";
    if (tc->quiet)
        argv[k++] = "--quiet";
    argv[k] = NULL;
    fflush(NULL);
    pid_t pid = fork();
    if (pid < 0) {
        pr_errorf(err, PR_ERR_IO, "cannot start %s: %s", words[0], strerror(errno));
        free(argv);
        return NULL;
    }
    if (pid == 0) {
        /* the ranks' own stdout (the parameter line, the result line) is
         * not the table's */
        int dn = open("/dev/null", O_WRONLY);
        if (dn >= 0) {
            dup2(dn, STDOUT_FILENO);
            close(dn);
        }
        execvp(argv[0], (char *const *)argv);
        fprintf(stderr, "peftref compare: cannot run %s: %s\n", argv[0], strerror(errno));
        _exit(127);
    }
    free(argv);
    running_launcher = pid;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = forward_to_launcher;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    int status = 0;
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
        ;
    running_launcher = 0;
    signal(SIGINT, SIG_DFL);
    signal(SIGTERM, SIG_DFL);
    json_t *o = json_load_file(res_path, 0, NULL);
    if (json_is_object(o)) {
        /* a signal that ended the ranks at once leaves no result: the run is interrupted */
        return o;
    }
    json_decref(o);
    if (launcher_signalled)
        pr_errorf(err, PR_ERR_INTERRUPTED, "interrupted by signal %d: the %d ranks ended at once; --resume "
                  "continues from the last train.checkpoint_every checkpoint, if any", (int)launcher_signalled,
                  a->mpi_ranks);
    else if (WIFSIGNALED(status))
        pr_errorf(err, PR_ERR_IO, "mpirun -np %d was killed by signal %d (%s)", a->mpi_ranks,
                  WTERMSIG(status), strsignal(WTERMSIG(status)));
    else if (WIFEXITED(status) && WEXITSTATUS(status) == 130)
        pr_errorf(err, PR_ERR_INTERRUPTED, "mpirun -np %d: the ranks were interrupted", a->mpi_ranks);
    else
        pr_errorf(err, PR_ERR_IO, "mpirun -np %d %s train exited with status %d without a result (its messages "
                  "are above)", a->mpi_ranks, exe, WIFEXITED(status) ? WEXITSTATUS(status) : -1);
    return NULL;
}

/* In the child: build and train (or take the finished run's result when
 * resuming one whose fingerprint matches), send the result, exit. */
static void child_main(compare_arm *a, int fd)
{
    signal(SIGINT, SIG_DFL);
    signal(SIGTERM, SIG_DFL);
    /* forked from an MPI rank (arms side by side): this arm is a process of its own */
    dist_detach();
#ifdef __linux__
    /* the parent killed outright: stop at the next step with a checkpoint */
    prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (getppid() == 1)
        _exit(1);
#endif
    pr_error err = { 0 };
    pr_model *m = NULL;
    pr_tokenizer *tok = NULL;
    pr_train_result res;
    memset(&res, 0, sizeof res);
    res.final_val_accuracy = -1;
    res.resumed_from = -1;
    char *fp = NULL;
    json_t *o = NULL;
    int rc = pr_pipeline_build(a->pipe, &m, &tok, &err);
    if (rc == PR_OK && !(fp = fingerprint_of(m, &a->tc, a->mpi_ranks, &err)))
        rc = err.code ? err.code : PR_ERR_NOMEM;
    if (rc == PR_OK && a->resume && (o = stored_result(a->out_dir, fp))) {
        json_object_set_new(o, "reused", json_true());
    } else {
        if (rc == PR_OK && a->resume) {
            /* no finished run of this fingerprint: continue a checkpoint of
             * the same fingerprint, or start afresh */
            char *ck = fileio_join(a->out_dir, COMPARE_RESULT_FILE);
            if (ck && access(ck, F_OK) == 0) {
                a->tc.resume = 0;
                a->tc.force = 1;
                fprintf(stderr, "peftref compare: %s: settings, data or program changed since it finished: "
                        "training it again\n", a->out_dir);
                unlink(ck);
            }
            free(ck);
        }
        if (rc == PR_OK && a->mpi_ranks > 1) {
            /* the ranks build their own: this process holds nothing while they train */
            pr_tokenizer_free(tok);
            pr_model_free(m);
            tok = NULL;
            m = NULL;
            o = run_under_mpi(a, &err);
            if (!o) {
                rc = err.code ? err.code : PR_ERR_IO;
                res.interrupted = rc == PR_ERR_INTERRUPTED;
                o = result_object(rc, err.msg, &res, -1);
            } else {
                rc = (int)json_integer_value(json_object_get(o, "rc"));
            }
        } else {
            if (rc == PR_OK)
                rc = pr_train(m, tok, &a->tc, &res, &err);
            o = result_object(rc, err.msg, &res, compare_peak_kib());
        }
        if (o && rc == PR_OK && !json_is_true(json_object_get(o, "interrupted")) &&
            !json_is_true(json_object_get(o, "complete")))
            store_result(a->out_dir, fp, o);
    }
    if (o) {
        char *s = json_dumps(o, JSON_COMPACT);
        if (s)
            write_all(fd, s, strlen(s));
        free(s);
        json_decref(o);
    }
    free(fp);
    close(fd);
    _exit(rc == PR_OK ? 0 : 1);
}

static double json_num(const json_t *o, const char *key, double def)
{
    const json_t *v = json_object_get(o, key);
    return json_is_number(v) ? json_number_value(v) : def;
}

/* Run one arm in a child process and fill its row.  Returns 1 when the
 * child was interrupted (SIGINT/SIGTERM). */
int compare_run_arm(compare_arm *a)
{
    compare_row *r = a->row;
    int pfd[2];
    if (pipe(pfd) != 0) {
        snprintf(r->error, sizeof r->error, "cannot create a pipe: %s", strerror(errno));
        return 0;
    }
    fflush(NULL);   /* nothing buffered is written twice */
    double t0 = now_seconds();
    pid_t pid = fork();
    if (pid < 0) {
        snprintf(r->error, sizeof r->error, "cannot start a process: %s", strerror(errno));
        close(pfd[0]);
        close(pfd[1]);
        return 0;
    }
    if (pid == 0) {
        close(pfd[0]);
        child_main(a, pfd[1]);
    }
    running_child = pid;
    close(pfd[1]);
    char *buf = NULL;
    size_t len = 0, cap = 0;
    for (;;) {
        if (len + 4096 > cap) {
            char *nb = realloc(buf, cap = cap ? 2 * cap : 8192);
            if (!nb)
                break;
            buf = nb;
        }
        ssize_t n = read(pfd[0], buf + len, cap - len - 1);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        len += (size_t)n;
    }
    close(pfd[0]);
    int status = 0;
    struct rusage ru;
    memset(&ru, 0, sizeof ru);
    while (wait4(pid, &status, 0, &ru) < 0 && errno == EINTR)
        ;
    running_child = 0;
    r->seconds = now_seconds() - t0;
    json_t *o = NULL;
    if (buf && len > 0) {
        buf[len] = '\0';
        o = json_loads(buf, 0, NULL);
    }
    free(buf);
    int was_interrupted = 0;
    if (WIFSIGNALED(status)) {
        int sig = WTERMSIG(status);
        snprintf(r->error, sizeof r->error, "the process was killed by signal %d (%s)", sig, strsignal(sig));
        was_interrupted = sig == SIGINT || sig == SIGTERM;
    } else if (!json_is_object(o)) {
        snprintf(r->error, sizeof r->error, "the process exited with status %d without a result",
                 WIFEXITED(status) ? WEXITSTATUS(status) : -1);
    } else {
        int rc = (int)json_integer_value(json_object_get(o, "rc"));
        const char *msg = json_string_value(json_object_get(o, "error"));
        r->have_result = 1;
        r->steps = (int64_t)json_num(o, "steps", 0);
        r->steps_timed = (int64_t)json_num(o, "steps_timed", (double)r->steps);
        r->reused = json_is_true(json_object_get(o, "reused"));
        r->step_seconds = json_num(o, "step_seconds", 0);
        r->tokens = (int64_t)json_num(o, "tokens", 0);
        r->trainable = (int64_t)json_num(o, "trainable", 0);
        r->initial_val_loss = json_num(o, "initial_val_loss", NAN);
        r->val_loss = json_num(o, "val_loss", NAN);
        r->val_accuracy = json_num(o, "val_accuracy", -1);
        double kib = json_num(o, "peak_kib", -1);
        r->peak_mib = (kib > 0 ? kib : (double)ru.ru_maxrss) / 1024.0;
        was_interrupted = json_is_true(json_object_get(o, "interrupted"));
        if (rc == PR_OK) {
            r->ok = 1;
        } else {
            snprintf(r->error, sizeof r->error, "%s", msg && msg[0] ? msg : "training failed");
            for (char *c = r->error; *c; c++)
                if (*c == '\n')
                    *c = ' ';
        }
    }
    json_decref(o);
    return was_interrupted;
}

/* The evaluations in out_dir/metrics.jsonl as the row's curve. */
void compare_read_curve(compare_row *r, const char *out_dir)
{
    char *path = fileio_join(out_dir, "metrics.jsonl");
    FILE *f = path ? fopen(path, "r") : NULL;
    free(path);
    if (!f)
        return;
    char line[4096];
    while (fgets(line, sizeof line, f)) {
        json_t *o = json_loads(line, 0, NULL);
        const json_t *step = json_object_get(o, "step"), *loss = json_object_get(o, "val_loss");
        if (json_is_integer(step) && json_is_number(loss)) {
            compare_point *c = realloc(r->curve, (size_t)(r->n_curve + 1) * sizeof *c);
            if (c) {
                r->curve = c;
                double v = json_number_value(loss);
                r->curve[r->n_curve++] = (compare_point){ (int64_t)json_integer_value(step), v, v, v };
            }
        }
        json_decref(o);
    }
    fclose(f);
}
