/* peftref core: the plugin conformance checker's driver (see check.h for
 * what each check verifies and its tolerances): running each check in a
 * child process, relaying and tallying its outcome, and the per-file
 * report.  The checks themselves are in check_gradient.c, check_decls.c,
 * check_roundtrip.c and check_finite.c, on the bench of check_bench.c.
 *
 * The parent process loads the plugin (after a child has loaded it once
 * without crashing), then forks one child per check.  A child builds its
 * own tiny model, attaches the technique, runs the check and writes its
 * outcome to a pipe:
 *     "    detail"      zero or more verbose lines (--verbose)
 *     "PASS detail" or "FAIL detail"
 *     "END"
 * A child that ends without "END" crashed, aborted, was stopped by its
 * alarm or exited early; the parent reports that as the check failing.
 * The parent itself never runs a model step, so no BLAS or OpenMP thread
 * state is ever inherited across fork. */
#include <errno.h>
#include <limits.h>
#include <signal.h>
#include <stdint.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include "peftref/module.h"
#include "check.h"
#include "check_internal.h"

/* ---- running checks in children ----------------------------------------------------------------- */

typedef enum check_kind {
    CHECK_LOAD, CHECK_GRADIENT, CHECK_PARAMS, CHECK_DETERMINISM, CHECK_ACCUMULATION, CHECK_SAVE_LOAD,
    CHECK_OPTIONS, CHECK_FINITE
} check_kind;

typedef struct job {
    check_kind kind;
    const pr_technique *t;
    int site;
    const char *search_dir;   /* CHECK_LOAD */
    const check_options *o;
} job;

static void child_load(const job *j, report *r)
{
    pr_registry *reg = NULL;
    pr_error err = { 0 };
    if (pr_registry_open(j->search_dir, &reg, &err))
        chk_problem(r, "%s", err.msg);
    pr_registry_free(reg);
    chk_finish(r, "loads");
}

static void run_child(const job *j, FILE *res)
{
    report r;
    memset(&r, 0, sizeof r);
    r.f = res;
    r.verbose = j->o->verbose;
    switch (j->kind) {
    case CHECK_LOAD: child_load(j, &r); break;
    case CHECK_GRADIENT: chk_gradient(j->t, j->site, j->o, &r); break;
    case CHECK_PARAMS: chk_params(j->t, j->o, &r); break;
    case CHECK_DETERMINISM: chk_determinism(j->t, j->o, &r); break;
    case CHECK_ACCUMULATION: chk_accumulation(j->t, j->o, &r); break;
    case CHECK_SAVE_LOAD: chk_save_load(j->t, j->o, &r); break;
    case CHECK_OPTIONS: chk_options(j->t, j->o, &r); break;
    case CHECK_FINITE: chk_finite(j->t, j->o, &r); break;
    }
}

static const char *signal_abbrev(int sig)
{
    switch (sig) {
    case SIGSEGV: return "SIGSEGV";
    case SIGABRT: return "SIGABRT";
    case SIGBUS: return "SIGBUS";
    case SIGFPE: return "SIGFPE";
    case SIGILL: return "SIGILL";
    case SIGALRM: return "SIGALRM";
    case SIGKILL: return "SIGKILL";
    case SIGTERM: return "SIGTERM";
    case SIGTRAP: return "SIGTRAP";
    case SIGSYS: return "SIGSYS";
    case SIGPIPE: return "SIGPIPE";
    default: return "signal";
    }
}

typedef struct tally {
    int checks, failed, skipped;
} tally;

/* Fork, run job in the child, relay its verbose lines and print the
 * outcome line under label.  Returns 0 when the check passed. */
static int run_check(const job *j, const char *label, FILE *out, tally *tl)
{
    int fds[2];
    tl->checks++;
    if (pipe(fds) != 0) {
        fprintf(out, "FAIL %s: cannot create a pipe: %s\n", label, strerror(errno));
        tl->failed++;
        return 1;
    }
    fflush(NULL);
    pid_t pid = fork();
    if (pid < 0) {
        close(fds[0]);
        close(fds[1]);
        fprintf(out, "FAIL %s: cannot fork: %s\n", label, strerror(errno));
        tl->failed++;
        return 1;
    }
    if (pid == 0) {
        close(fds[0]);
        /* the plugin's own output must not mix with the report */
        dup2(STDERR_FILENO, STDOUT_FILENO);
        /* a crash ends this process, whatever handlers the caller installed
         * (a test framework's longjmp would carry on in the child) */
        static const int fatal[] = { SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGABRT, SIGALRM };
        for (size_t k = 0; k < sizeof fatal / sizeof fatal[0]; k++)
            signal(fatal[k], SIG_DFL);
        alarm((unsigned)(j->o->timeout > 0 ? j->o->timeout : CHECK_DEFAULT_TIMEOUT));
        FILE *res = fdopen(fds[1], "w");
        if (res)
            run_child(j, res);
        if (res)
            fclose(res);
        _exit(0);
    }
    close(fds[1]);
    char *buf = NULL;
    size_t len = 0, cap = 0;
    for (;;) {
        if (len + 4096 + 1 > cap) {
            size_t nc = cap ? cap * 2 : 8192;
            char *nb = realloc(buf, nc);
            if (!nb)
                break;
            buf = nb;
            cap = nc;
        }
        ssize_t n = read(fds[0], buf + len, cap - len - 1);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        len += (size_t)n;
    }
    close(fds[0]);
    int status = 0;
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
        ;
    if (buf)
        buf[len] = '\0';

    /* verbose lines, then the outcome */
    char *outcome = NULL;
    int ended = 0;
    for (char *line = buf, *next; line && *line; line = next) {
        next = strchr(line, '\n');
        if (next)
            *next++ = '\0';
        if (strncmp(line, "PASS ", 5) == 0 || strncmp(line, "FAIL ", 5) == 0)
            outcome = line;
        else if (strcmp(line, "END") == 0)
            ended = 1;
        else if (j->o->verbose)
            fprintf(out, "%s\n", line);
    }
    int failed = 1;
    if (ended && outcome && WIFEXITED(status) && WEXITSTATUS(status) == 0) {
        failed = outcome[0] == 'F';
        fprintf(out, "%.4s %s: %s\n", outcome, label, outcome + 5);
    } else if (WIFSIGNALED(status) && WTERMSIG(status) == SIGALRM) {
        fprintf(out, "FAIL %s: timed out after %d s (SIGALRM)\n", label,
                j->o->timeout > 0 ? j->o->timeout : CHECK_DEFAULT_TIMEOUT);
    } else if (WIFSIGNALED(status)) {
        int sig = WTERMSIG(status);
        fprintf(out, "FAIL %s: crashed with %s (%s)\n", label, signal_abbrev(sig), strsignal(sig));
    } else {
        fprintf(out, "FAIL %s: crashed: the check process exited with status %d before reporting a result (its "
                "error output says why)\n", label, WIFEXITED(status) ? WEXITSTATUS(status) : -1);
    }
    free(buf);
    tl->failed += failed;
    return failed;
}

static void check_technique(const pr_technique *t, const check_options *o, FILE *out, tally *tl)
{
    char label[LABEL_MAX];
    job j = { .t = t, .site = -1, .o = o };
    if (t->struct_size >= offsetof(pr_technique, composite) + sizeof t->composite && t->composite) {
        /* its forward needs members, which the test model does not have */
        fprintf(out, "SKIP %s: a composite technique (it combines other modules); the checker does not drive "
                "compositions\n", t->name);
        tl->skipped++;
        return;
    }

    /* the sites of the test model, from a model built here (nothing runs) */
    pr_model_config cfg = chk_shape_a();
    pr_model *m = NULL;
    pr_error err = { 0 };
    int have_model = pr_model_create(&cfg, &m, &err) == PR_OK;
    j.kind = CHECK_GRADIENT;
    if (chk_is_select(t) || t->sites == 0) {
        snprintf(label, sizeof label, "%s/gradient", t->name);
        run_check(&j, label, out, tl);
    } else {
        for (int s = 0; s < PR_SITE_COUNT; s++) {
            if (!(t->sites & PR_SITE_BIT(s)))
                continue;
            char where[64];
            chk_site_label(s, where, sizeof where);
            snprintf(label, sizeof label, "%s/gradient/%s", t->name, where);
            if (have_model && !chk_site_exists(m, s)) {
                fprintf(out, "SKIP %s: the %s test model has no %s site\n", label,
                        chk_family() == PR_FAMILY_LLAMA ? "LLaMA" : "GPT-2", pr_site_name(s));
                tl->skipped++;
                continue;
            }
            j.site = s;
            run_check(&j, label, out, tl);
        }
    }
    pr_model_free(m);
    j.site = -1;
    static const struct { check_kind kind; const char *name; } rest[] = {
        { CHECK_PARAMS, "params" },
        { CHECK_DETERMINISM, "determinism" },
        { CHECK_ACCUMULATION, "accumulation" },
        { CHECK_SAVE_LOAD, "save-load" },
        { CHECK_OPTIONS, "options" },
        { CHECK_FINITE, "finite" },
    };
    for (size_t k = 0; k < sizeof rest / sizeof rest[0]; k++) {
        j.kind = rest[k].kind;
        snprintf(label, sizeof label, "%s/%s", t->name, rest[k].name);
        run_check(&j, label, out, tl);
    }
}

/* One "load" check per file: refused with its reason, or the techniques
 * it provides.  label names the file when one was given (the registry
 * sees it under a link), NULL for a directory. */
static void report_load(const pr_registry *reg, const char *label, FILE *out, tally *tl)
{
    char lb[LABEL_MAX];
    int nr = pr_registry_refused_count(reg), nt = pr_registry_count(reg);
    if (label) {
        tl->checks++;
        tl->failed += nr > 0 || nt == 0;
        if (nr == 0 && nt == 0)
            fprintf(out, "FAIL %s: no techniques found\n", label);
    }
    for (int i = 0; i < nr; i++) {
        const char *p, *why;
        pr_registry_refused(reg, i, &p, &why);
        const char *pb = strrchr(p, '/');
        snprintf(lb, sizeof lb, "%s/load", pb ? pb + 1 : p);
        fprintf(out, "FAIL %s: refused: %s\n", label ? label : lb, why);
        if (!label) {
            tl->checks++;
            tl->failed++;
        }
    }
    /* the techniques, grouped by the file they came from */
    for (int i = 0; i < nt && !(label && nr); i++) {
        const char *origin = pr_registry_origin(reg, i);
        int first = 1;
        for (int k = 0; k < i && first; k++)
            first = strcmp(pr_registry_origin(reg, k), origin) != 0;
        if (!first)
            continue;
        const char *ob = strrchr(origin, '/');
        snprintf(lb, sizeof lb, "%s/load", ob ? ob + 1 : origin);
        if (!label)
            tl->checks++;
        fprintf(out, "PASS %s:", label ? label : lb);
        for (int k = i; k < nt; k++)
            if (strcmp(pr_registry_origin(reg, k), origin) == 0) {
                const pr_technique *t = pr_registry_technique(reg, k);
                fprintf(out, " %s %s", t->name, t->version ? t->version : "");
            }
        fputc('\n', out);
    }
}

/* A fresh directory holding one symbolic link to path, named so that the
 * registry's "*.so" rule takes it. */
static int lone_dir(const char *path, char *dir, size_t dlen, char *link, size_t llen, pr_error *err)
{
    char *real = realpath(path, NULL);
    if (!real)
        return pr_errorf(err, PR_ERR_IO, "check: cannot resolve '%s': %s", path, strerror(errno));
    snprintf(dir, dlen, "%s", "/tmp/peftref-check-XXXXXX");
    if (!mkdtemp(dir)) {
        free(real);
        return pr_errorf(err, PR_ERR_IO, "check: cannot make a temporary directory: %s", strerror(errno));
    }
    const char *base = strrchr(path, '/');
    base = base ? base + 1 : path;
    size_t bl = strlen(base);
    int so = bl >= 3 && strcmp(base + bl - 3, ".so") == 0;
    snprintf(link, llen, "%s/%s%s", dir, base, so ? "" : ".so");
    if (symlink(real, link) != 0) {
        int e = errno;
        free(real);
        rmdir(dir);
        return pr_errorf(err, PR_ERR_IO, "check: cannot link '%s' into %s: %s", path, dir, strerror(e));
    }
    free(real);
    return PR_OK;
}

int check_plugin_file(const char *path, const check_options *opts, FILE *out, int *n_checks, int *n_failed,
                      pr_error *err)
{
    check_options o = { 0 };
    if (opts)
        o = *opts;
    chk_set_family(o.family);
    if (n_checks)
        *n_checks = 0;
    if (n_failed)
        *n_failed = 0;
    if (!path || !out)
        return pr_errorf(err, PR_ERR_INVALID, "check: NULL path or output");
    struct stat st;
    if (stat(path, &st) != 0)
        return pr_errorf(err, PR_ERR_NOTFOUND, "check: cannot read '%s': %s", path, strerror(errno));
    char dir[64] = "", link[PATH_MAX + 80] = "";
    const char *search = path;
    int is_dir = S_ISDIR(st.st_mode);
    if (!is_dir) {
        int rc = lone_dir(path, dir, sizeof dir, link, sizeof link, err);
        if (rc)
            return rc;
        search = dir;
    }

    tally tl = { 0, 0, 0 };
    char label[LABEL_MAX];
    const char *base = strrchr(path, '/');
    base = base && base[1] ? base + 1 : path;
    snprintf(label, sizeof label, "%s/load", base);
    /* load once in a child: a plugin whose entry crashes fails here only */
    job lj = { .kind = CHECK_LOAD, .site = -1, .search_dir = search, .o = &o };
    int load_failed = 0;
    {
        tally probe = { 0, 0, 0 };
        FILE *sink = tmpfile();
        load_failed = run_check(&lj, label, sink ? sink : out, &probe);
        if (load_failed && sink) {
            rewind(sink);
            char line[4096];
            while (fgets(line, sizeof line, sink))
                fputs(line, out);
        }
        if (sink)
            fclose(sink);
    }
    pr_registry *reg = NULL;
    int rc = PR_OK;
    if (load_failed) {
        tl.checks++;
        tl.failed++;
    } else {
        rc = pr_registry_open(search, &reg, err);
    }
    /* the library stays mapped once loaded: the link is no longer needed
     * (and is gone sooner if the output's reader stops early) */
    if (!is_dir) {
        unlink(link);
        rmdir(dir);
    }
    if (!load_failed && rc == PR_OK) {
        int nt = pr_registry_count(reg);
        report_load(reg, is_dir ? NULL : label, out, &tl);
        int matched = 0;
        for (int i = 0; i < nt; i++) {
            const pr_technique *t = pr_registry_technique(reg, i);
            if (o.technique && strcmp(o.technique, t->name) != 0)
                continue;
            matched++;
            check_technique(t, &o, out, &tl);
        }
        if (o.technique && !matched) {
            fprintf(out, "FAIL %s: the file has no technique named '%s'\n", label, o.technique);
            tl.checks++;
            tl.failed++;
        }
    }
    pr_registry_free(reg);
    if (rc)
        return rc;
    fprintf(out, "%s: %d check%s, %d passed, %d failed", path, tl.checks, tl.checks == 1 ? "" : "s",
            tl.checks - tl.failed, tl.failed);
    if (tl.skipped)
        fprintf(out, ", %d site%s skipped", tl.skipped, tl.skipped == 1 ? "" : "s");
    fputc('\n', out);
    fflush(out);
    if (n_checks)
        *n_checks = tl.checks;
    if (n_failed)
        *n_failed = tl.failed;
    return PR_OK;
}
