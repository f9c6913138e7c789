/* peftref core: the plugin scanner -- every plugin library is loaded and
 * described in a child process before the host loads it, so that a
 * library that crashes or hangs in its constructors or in its entry is
 * refused instead of taking the host down (GStreamer's gst-plugin-scanner
 * and registry cache work the same way).
 *
 * For each library the registry is about to load, reg_scanner_verdict
 *   1. looks the library up in the registry cache, by its real path, size
 *      and modification time (and by the host doing the looking, see
 *      host_key); a hit gives the verdict without running anything;
 *   2. otherwise forks.  The child dlopens the library, calls its entry,
 *      validates every descriptor exactly as the registry does (the probe
 *      registry.c hands in), unloads it and writes its verdict -- accepted,
 *      or refused with the one-line reason -- to a pipe.  A child that dies
 *      of a signal is recorded as "crashed while loading: signal N (name)";
 *      one that exits without a verdict likewise with its exit status; one
 *      still running after the timeout is killed ("did not finish loading
 *      within N s").
 * Only a library the scanner accepted is then dlopened by the host.
 *
 * The scan forks, so it must run before anything that forbids fork or
 * makes it unsafe: open the registry (pr_registry_open) before MPI_Init,
 * before starting threads of your own and before the first model step
 * (BLAS and OpenMP thread pools).  With a warm cache no child is started.
 *
 * The registry cache is one JSON file per user:
 *   $PEFTREF_REGISTRY_CACHE   when set: "off" for no cache (every library
 *                             is scanned every time), else the file's path;
 *   $XDG_CACHE_HOME/peftref/registry-cache.json, else
 *   $HOME/.cache/peftref/registry-cache.json   (directories made 0700).
 *     {"format": "peftref-registry-cache", "version": 1,
 *      "entries": [{"host": "...", "path": "/real/path.so", "size": N,
 *                   "mtime_ns": N, "accepted": true|false, "reason": "..."}]}
 * It is written atomically (fileio.h) when a scan added something.  A
 * file that does not parse, has another format or version, or that this
 * user does not own or others may write is ignored and rewritten.  A
 * verdict is reused only for the same host, real path, size and mtime;
 * timeouts are not cached (a loaded machine may be the cause), crashes and
 * refusals are.  At most CACHE_MAX_ENTRIES entries are kept, this host's
 * first; entries for files that changed or vanished are dropped. */
#include "config.h"

#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <jansson.h>

#include "fileio.h"
#include "registry_internal.h"

#define CACHE_FORMAT "peftref-registry-cache"
#define CACHE_VERSION 1
#define CACHE_MAX_ENTRIES 1024
#define CACHE_MAX_BYTES (4u << 20)
#define VERDICT_MAX 1024

typedef struct scan_entry {
    char *host;
    char *path;
    long long size, mtime_ns;
    int accepted;
    char *reason;
    int fresh;                   /* decided by this scanner (not read from the file) */
} scan_entry;

struct reg_scanner {
    reg_probe_fn probe;
    char *cache_path;            /* NULL: no cache */
    char host[PATH_MAX + 128];
    scan_entry *e;
    int n, cap;
    int dirty;
    int timeout;                 /* seconds */
    int forks;                   /* children started, for the tests */
};

static void entry_free(scan_entry *x)
{
    free(x->host);
    free(x->path);
    free(x->reason);
}

static long long mtime_ns(const struct stat *st)
{
    return (long long)st->st_mtim.tv_sec * 1000000000LL + (long long)st->st_mtim.tv_nsec;
}

/* ---- where the cache lives ------------------------------------------------ */

/* mkdir path (one level) 0700 unless it exists as a directory. */
static int ensure_dir(const char *path)
{
    struct stat st;
    if (mkdir(path, 0700) == 0 || (errno == EEXIST && stat(path, &st) == 0 && S_ISDIR(st.st_mode)))
        return 0;
    return -1;
}

/* The cache file's path, NULL for no cache.  make_dirs: create the
 * default location's directories. */
static char *cache_location(int make_dirs)
{
    const char *e = getenv("PEFTREF_REGISTRY_CACHE");
    if (e && e[0])
        return strcmp(e, "off") == 0 ? NULL : strdup(e);
    char base[PATH_MAX];
    const char *xdg = getenv("XDG_CACHE_HOME"), *home = getenv("HOME");
    if (xdg && xdg[0] == '/')
        snprintf(base, sizeof base, "%s", xdg);
    else if (home && home[0] == '/')
        snprintf(base, sizeof base, "%s/.cache", home);
    else
        return NULL;
    if (make_dirs && ensure_dir(base) != 0)
        return NULL;
    char *dir = fileio_join(base, "peftref");
    if (!dir)
        return NULL;
    char *path = NULL;
    if (!make_dirs || ensure_dir(dir) == 0)
        path = fileio_join(dir, "registry-cache.json");
    free(dir);
    return path;
}

/* Who is asking: the version, the ABI, and the size and mtime of the
 * program and of the object holding this code (a rebuilt host may judge
 * descriptors differently, so its verdicts are its own). */
static void host_key(char *buf, size_t len)
{
    size_t o = (size_t)snprintf(buf, len, "peftref %s abi %d.%d", PACKAGE_VERSION, PR_ABI_MAJOR, PR_ABI_MINOR);
    char exe[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
    struct stat st;
    if (n > 0) {
        exe[n] = '\0';
        if (stat(exe, &st) == 0 && o < len)
            o += (size_t)snprintf(buf + o, len - o, " %s %lld %lld", exe, (long long)st.st_size, mtime_ns(&st));
    }
    Dl_info info;
    void *self = (void *)(uintptr_t)host_key;
    if (dladdr(self, &info) && info.dli_fname && info.dli_fname[0] == '/' && (n <= 0 || strcmp(info.dli_fname, exe) != 0) &&
        stat(info.dli_fname, &st) == 0 && o < len)
        snprintf(buf + o, len - o, " %s %lld %lld", info.dli_fname, (long long)st.st_size, mtime_ns(&st));
}

/* ---- reading and writing the cache ------------------------------------------ */

static int push(reg_scanner *s, const char *host, const char *path, long long size, long long mt, int accepted,
                const char *reason, int fresh)
{
    if (s->n == s->cap) {
        int nc = s->cap ? 2 * s->cap : 16;
        scan_entry *p = realloc(s->e, (size_t)nc * sizeof *p);
        if (!p)
            return -1;
        s->e = p;
        s->cap = nc;
    }
    scan_entry *x = &s->e[s->n];
    memset(x, 0, sizeof *x);
    x->host = strdup(host);
    x->path = strdup(path);
    x->reason = strdup(reason ? reason : "");
    if (!x->host || !x->path || !x->reason) {
        entry_free(x);
        return -1;
    }
    x->size = size;
    x->mtime_ns = mt;
    x->accepted = accepted;
    x->fresh = fresh;
    s->n++;
    return 0;
}

/* Read the cache file; anything wrong with it leaves the cache empty and
 * marked for rewriting. */
static void cache_read(reg_scanner *s)
{
    struct stat st;
    if (lstat(s->cache_path, &st) != 0) {
        s->dirty = errno != ENOENT;
        return;
    }
    /* a cache someone else could have written could vouch for anything */
    if (!S_ISREG(st.st_mode) || st.st_uid != geteuid() || (st.st_mode & (S_IWGRP | S_IWOTH)) ||
        (uintmax_t)st.st_size > CACHE_MAX_BYTES) {
        s->dirty = 1;
        return;
    }
    char *text = NULL;
    size_t len = 0;
    pr_error err = {0};
    if (fileio_read_all(s->cache_path, CACHE_MAX_BYTES, &text, &len, &err) != PR_OK) {
        s->dirty = 1;
        return;
    }
    json_error_t je;
    json_t *root = json_loadb(text, len, JSON_REJECT_DUPLICATES, &je);
    free(text);
    json_t *entries = json_object_get(root, "entries");
    const char *fmt = json_string_value(json_object_get(root, "format"));
    if (!root || !fmt || strcmp(fmt, CACHE_FORMAT) != 0 ||
        json_integer_value(json_object_get(root, "version")) != CACHE_VERSION || !json_is_array(entries)) {
        json_decref(root);
        s->dirty = 1;
        return;
    }
    for (size_t i = 0; i < json_array_size(entries) && i < CACHE_MAX_ENTRIES; i++) {
        json_t *x = json_array_get(entries, i);
        const char *host = json_string_value(json_object_get(x, "host"));
        const char *path = json_string_value(json_object_get(x, "path"));
        const char *reason = json_string_value(json_object_get(x, "reason"));
        json_t *size = json_object_get(x, "size"), *mt = json_object_get(x, "mtime_ns");
        json_t *acc = json_object_get(x, "accepted");
        if (!host || !path || path[0] != '/' || !reason || !json_is_integer(size) || !json_is_integer(mt) ||
            !json_is_boolean(acc) || strlen(reason) >= VERDICT_MAX) {
            s->dirty = 1;       /* a damaged entry: drop it, keep the rest */
            continue;
        }
        if (push(s, host, path, (long long)json_integer_value(size), (long long)json_integer_value(mt),
                 json_is_true(acc), reason, 0)) {
            s->dirty = 1;
            break;
        }
    }
    json_decref(root);
}

/* 1 when entry x still describes the file at its path. */
static int still_current(const scan_entry *x)
{
    struct stat st;
    return stat(x->path, &st) == 0 && (long long)st.st_size == x->size && mtime_ns(&st) == x->mtime_ns;
}

static void cache_write(reg_scanner *s)
{
    free(s->cache_path);
    s->cache_path = cache_location(1);      /* make the default directories now */
    if (!s->cache_path)
        return;
    json_t *root = json_object(), *arr = json_array();
    if (!root || !arr) {
        json_decref(root);
        json_decref(arr);
        return;
    }
    json_object_set_new(root, "format", json_string(CACHE_FORMAT));
    json_object_set_new(root, "version", json_integer(CACHE_VERSION));
    json_object_set_new(root, "entries", arr);
    /* this host's entries first, so the cap drops other hosts' oldest */
    int kept = 0;
    for (int pass = 0; pass < 2; pass++)
        for (int i = 0; i < s->n && kept < CACHE_MAX_ENTRIES; i++) {
            const scan_entry *x = &s->e[i];
            if ((strcmp(x->host, s->host) == 0) != (pass == 0))
                continue;
            if (!x->fresh && !still_current(x))
                continue;
            json_t *o = json_pack("{s:s, s:s, s:I, s:I, s:b, s:s}", "host", x->host, "path", x->path, "size",
                                  (json_int_t)x->size, "mtime_ns", (json_int_t)x->mtime_ns, "accepted",
                                  x->accepted, "reason", x->reason);
            if (o && json_array_append_new(arr, o) == 0)
                kept++;
        }
    char *text = json_dumps(root, JSON_INDENT(1));
    json_decref(root);
    if (!text)
        return;
    pr_error err = {0};
    /* a cache that cannot be written costs time, nothing else */
    (void)fileio_write_atomic(s->cache_path, text, strlen(text), &err);
    free(text);
}

/* ---- the child ---------------------------------------------------------------------------- */

static int scan_timeout(void)
{
    const char *e = getenv("PEFTREF_SCAN_TIMEOUT");
    if (e && e[0]) {
        char *end = NULL;
        long v = strtol(e, &end, 10);
        if (end && *end == '\0' && v >= 1 && v <= 3600)
            return (int)v;
    }
    return REG_SCAN_TIMEOUT;
}

static void child(reg_probe_fn probe, const char *path, int fd, int timeout)
{
    /* a crash must end this process, whatever handlers the caller
     * installed (a test framework's longjmp would carry on in the child) */
    static const int fatal[] = {SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGABRT, SIGTRAP, SIGSYS, SIGALRM, SIGPIPE};
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = SIG_DFL;
    sigemptyset(&sa.sa_mask);
    for (size_t k = 0; k < sizeof fatal / sizeof fatal[0]; k++)
        sigaction(fatal[k], &sa, NULL);
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    /* the parent kills a hung child; this ends one whose parent died */
    alarm((unsigned)timeout + 5);
    /* what the library prints on load appears once, from the host */
    int dn = open("/dev/null", O_RDWR);
    if (dn >= 0) {
        dup2(dn, STDIN_FILENO);
        dup2(dn, STDOUT_FILENO);
        if (dn > STDERR_FILENO)
            close(dn);
    }
    char msg[VERDICT_MAX + 8];
    char reason[VERDICT_MAX] = "";
    int ok = probe(path, reason, sizeof reason) == 0;
    for (char *q = reason; *q; q++)
        if (*q == '\n' || *q == '\r')
            *q = ' ';
    int n = snprintf(msg, sizeof msg, "%c %s\n", ok ? 'A' : 'R', ok ? "" : reason);
    if (n > (int)sizeof msg - 1)
        n = (int)sizeof msg - 1;
    for (int off = 0; off < n;) {
        ssize_t w = write(fd, msg + off, (size_t)(n - off));
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            break;
        off += (int)w;
    }
    _exit(0);
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* Scan path in a child: 0 accepted, 1 refused (why filled), and in
 * *cacheable whether the verdict may be reused. */
static int scan_in_child(reg_scanner *s, const char *path, char *why, size_t len, int *cacheable)
{
    *cacheable = 0;
    int fds[2];
    if (pipe2(fds, O_CLOEXEC) != 0) {
        snprintf(why, len, "cannot scan it: cannot create a pipe: %s", strerror(errno));
        return 1;
    }
    fflush(NULL);
    pid_t pid = fork();
    if (pid < 0) {
        int e = errno;
        close(fds[0]);
        close(fds[1]);
        snprintf(why, len, "cannot scan it: cannot fork: %s", strerror(e));
        return 1;
    }
    if (pid == 0) {
        close(fds[0]);
        child(s->probe, path, fds[1], s->timeout);
    }
    s->forks++;
    close(fds[1]);
    char buf[VERDICT_MAX + 8];
    size_t got = 0;
    int timed_out = 0;
    const double deadline = now_s() + s->timeout;
    for (;;) {
        double left = deadline - now_s();
        if (left <= 0) {
            timed_out = 1;
            break;
        }
        struct pollfd pfd = {.fd = fds[0], .events = POLLIN};
        int pr = poll(&pfd, 1, (int)(left * 1000) + 1);
        if (pr < 0 && errno == EINTR)
            continue;
        if (pr < 0)
            break;
        if (pr == 0)
            continue;                   /* the deadline check ends the loop */
        ssize_t n = read(fds[0], buf + got, sizeof buf - 1 - got);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        got += (size_t)n;
        if (got == sizeof buf - 1)
            break;
    }
    close(fds[0]);
    buf[got] = '\0';
    if (timed_out)
        kill(pid, SIGKILL);
    int status = 0;
    pid_t w;
    while ((w = waitpid(pid, &status, 0)) < 0 && errno == EINTR)
        ;
    int complete = got >= 2 && buf[got - 1] == '\n' && (buf[0] == 'A' || buf[0] == 'R') && buf[1] == ' ';
    if (timed_out) {
        snprintf(why, len, "did not finish loading within %d s (killed; PEFTREF_SCAN_TIMEOUT sets the limit)",
                 s->timeout);
        return 1;
    }
    if (w == pid && WIFSIGNALED(status)) {
        int sig = WTERMSIG(status);
        snprintf(why, len, "crashed while loading: signal %d (%s)", sig, strsignal(sig));
        *cacheable = 1;
        return 1;
    }
    if (w == pid && WIFEXITED(status) && (WEXITSTATUS(status) != 0 || !complete)) {
        snprintf(why, len, "crashed while loading: the library ended the process (exit status %d) before it was "
                 "described", WEXITSTATUS(status));
        *cacheable = 1;
        return 1;
    }
    if (!complete) {
        /* no exit status (SIGCHLD ignored by the caller) and no verdict */
        snprintf(why, len, "crashed while loading (the scanner process ended without describing it)");
        return 1;
    }
    buf[got - 1] = '\0';
    *cacheable = 1;
    if (buf[0] == 'A')
        return 0;
    snprintf(why, len, "%s", buf + 2);
    return 1;
}

/* ---- the interface ---------------------------------------------------------------------------- */

reg_scanner *reg_scanner_open(reg_probe_fn probe)
{
    reg_scanner *s = calloc(1, sizeof *s);
    if (!s)
        return NULL;
    s->probe = probe;
    s->timeout = scan_timeout();
    host_key(s->host, sizeof s->host);
    s->cache_path = cache_location(0);
    if (s->cache_path)
        cache_read(s);
    return s;
}

int reg_scanner_verdict(reg_scanner *s, const char *path, char *why, size_t len)
{
    char *real = realpath(path, NULL);
    struct stat st;
    if (!real || stat(real, &st) != 0) {
        snprintf(why, len, "cannot resolve %s: %s", path, strerror(errno));
        free(real);
        return 1;
    }
    for (int i = 0; i < s->n; i++) {
        const scan_entry *x = &s->e[i];
        if (x->size == (long long)st.st_size && x->mtime_ns == mtime_ns(&st) && strcmp(x->path, real) == 0 &&
            strcmp(x->host, s->host) == 0) {
            free(real);
            if (x->accepted)
                return 0;
            snprintf(why, len, "%s", x->reason);
            return 1;
        }
    }
    int cacheable = 0;
    int refused = scan_in_child(s, path, why, len, &cacheable);
    if (cacheable && s->cache_path) {
        /* the new verdict replaces this host's older ones for the file */
        for (int i = 0; i < s->n; i++)
            if (strcmp(s->e[i].path, real) == 0 && strcmp(s->e[i].host, s->host) == 0) {
                entry_free(&s->e[i]);
                s->e[i--] = s->e[--s->n];
            }
        if (push(s, s->host, real, (long long)st.st_size, mtime_ns(&st), !refused, refused ? why : "", 1) == 0)
            s->dirty = 1;
    }
    free(real);
    return refused;
}

int reg_scanner_forks(const reg_scanner *s)
{
    return s ? s->forks : 0;
}

void reg_scanner_close(reg_scanner *s)
{
    if (!s)
        return;
    if (s->dirty && s->cache_path)
        cache_write(s);
    for (int i = 0; i < s->n; i++)
        entry_free(&s->e[i]);
    free(s->e);
    free(s->cache_path);
    free(s);
}
