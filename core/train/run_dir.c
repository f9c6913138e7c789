/* peftref core: a run's output directory (see run_dir.h). */
#include "config.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "fileio.h"
#include "run_dir.h"

int run_dir_make(const char *dir, pr_error *err)
{
    char *buf = strdup(dir);
    if (!buf)
        return pr_errorf(err, PR_ERR_NOMEM, "out of memory");
    for (char *s = buf + 1;; s++) {
        if (*s != '/' && *s != '\0')
            continue;
        char c = *s;
        *s = '\0';
        if (mkdir(buf, 0777) != 0 && errno != EEXIST) {
            int e = errno;
            free(buf);
            return pr_errorf(err, PR_ERR_IO, "%s: cannot create output directory: %s", dir, strerror(e));
        }
        *s = c;
        if (c == '\0')
            break;
    }
    free(buf);
    return PR_OK;
}

/* ---- the lock -------------------------------------------------------------- */

/* Locks this process holds: the lock file's path and a count. */
typedef struct held_lock {
    char *path;
    int count;
} held_lock;
static held_lock *held;
static int n_held;

static held_lock *find_held(const char *path)
{
    for (int i = 0; i < n_held; i++)
        if (strcmp(held[i].path, path) == 0)
            return &held[i];
    return NULL;
}

static void host_name(char *buf, size_t len)
{
    if (gethostname(buf, len) != 0)
        snprintf(buf, len, "unknown");
    buf[len - 1] = '\0';
    for (char *p = buf; *p; p++)
        if (*p == ' ' || *p == '\n')
            *p = '_';
}

/* A zombie has ended (a killed MPI rank whose parent mpirun is gone stays
 * one where nothing reaps orphans, as in a container without an init):
 * state Z in /proc/PID/stat, after the parenthesised command name. */
static int pid_zombie(long pid)
{
    char path[64], buf[512];
    snprintf(path, sizeof path, "/proc/%ld/stat", pid);
    FILE *f = fopen(path, "r");
    if (!f)
        return 0;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = '\0';
    const char *close = strrchr(buf, ')');
    return close && close[1] == ' ' && (close[2] == 'Z' || close[2] == 'X');
}

/* A live process: kill(pid, 0) succeeds or is refused for permission, and
 * it is no zombie. */
static int pid_alive(long pid)
{
    if (pid <= 0 || pid > INT_MAX)
        return 0;
    return (kill((pid_t)pid, 0) == 0 || errno == EPERM) && !pid_zombie(pid);
}

/* Create path holding text, failing with EEXIST when it exists. */
static int create_whole(const char *path, const char *text)
{
    size_t n = strlen(path) + 48;
    char *tmp = malloc(n);
    if (!tmp)
        return ENOMEM;
    snprintf(tmp, n, "%s.tmp.%ld.%016llx", path, (long)getpid(), (unsigned long long)(uintptr_t)tmp ^
             ((unsigned long long)getpid() << 32));
    int fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0644);
    int e = 0;
    if (fd >= 0) {
        size_t len = strlen(text);
        if (write(fd, text, len) != (ssize_t)len)
            e = errno ? errno : EIO;
        close(fd);
        if (!e && link(tmp, path) != 0)
            e = errno;
        unlink(tmp);
        if (e != EPERM && e != ENOTSUP && e != EOPNOTSUPP && e != ENOSYS)
            goto done;
    }
    /* no hard links here: O_EXCL on the lock itself */
    fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0644);
    if (fd < 0) {
        e = errno;
    } else {
        size_t len = strlen(text);
        e = write(fd, text, len) == (ssize_t)len ? 0 : EIO;
        close(fd);
    }
done:
    free(tmp);
    return e;
}

int run_dir_lock(const char *dir, pr_error *err)
{
    int rc = run_dir_make(dir, err);
    if (rc)
        return rc;
    char *path = fileio_join(dir, ".lock");
    if (!path)
        return pr_errorf(err, PR_ERR_NOMEM, "out of memory");
    held_lock *h = find_held(path);
    if (h) {
        h->count++;
        free(path);
        return PR_OK;
    }
    char host[256], text[320];
    host_name(host, sizeof host);
    snprintf(text, sizeof text, "%ld %s\n", (long)getpid(), host);
    for (int attempt = 0; attempt < 8; attempt++) {
        int e = create_whole(path, text);
        if (e == 0) {
            held_lock *nh = realloc(held, (size_t)(n_held + 1) * sizeof *held);
            if (!nh) {
                unlink(path);
                free(path);
                return pr_errorf(err, PR_ERR_NOMEM, "out of memory");
            }
            held = nh;
            held[n_held++] = (held_lock){.path = path, .count = 1};
            return PR_OK;
        }
        if (e != EEXIST) {
            rc = pr_errorf(err, PR_ERR_IO, "%s: cannot create the run's lock: %s", path, strerror(e));
            break;
        }
        char *cur = NULL;
        size_t len = 0;
        pr_error e2 = {0};
        if (fileio_read_all(path, 4096, &cur, &len, &e2) != PR_OK)
            continue; /* removed meanwhile: try again */
        long pid = 0;
        char who[256] = "";
        int got = sscanf(cur, "%ld %255s", &pid, who);
        int ours = got == 2 && strcmp(who, host) == 0;
        if (got == 2 && !(ours && (pid == (long)getpid() || !pid_alive(pid)))) {
            rc = pr_errorf(err, PR_ERR_INVALID,
                           "%s is in use by another run: pid %ld on %s holds %s (if that run is gone, "
                           "remove the file)", dir, pid, who, path);
            free(cur);
            break;
        }
        if (got != 2) {
            /* written by something else, or its writer died between create and write */
            rc = pr_errorf(err, PR_ERR_INVALID, "%s is locked by %s, which names no pid and host: remove it if "
                           "no run is writing to %s", dir, path, dir);
            free(cur);
            break;
        }
        /* stale: the holder is dead on this host; remove it only if unchanged */
        char *again = NULL;
        if (fileio_read_all(path, 4096, &again, &len, &e2) == PR_OK && strcmp(again, cur) == 0)
            unlink(path);
        free(again);
        free(cur);
    }
    if (!rc)
        rc = pr_errorf(err, PR_ERR_INVALID, "%s: cannot take the run's lock %s", dir, path);
    free(path);
    return rc;
}

void run_dir_unlock(const char *dir)
{
    char *path = fileio_join(dir, ".lock");
    if (!path)
        return;
    held_lock *h = find_held(path);
    if (h && --h->count == 0) {
        unlink(h->path);
        free(h->path);
        *h = held[--n_held];
        if (n_held == 0) {
            free(held);
            held = NULL;
        }
    }
    free(path);
}

/* ---- stale temporary files --------------------------------------------------- */

/* The pid of NAME.tmp.<pid>.<16 hex>, or -1 when name is not such a name. */
static long temp_pid(const char *name)
{
    size_t n = strlen(name);
    if (n < 22)
        return -1;
    const char *hex = name + n - 16;
    for (int i = 0; i < 16; i++) {
        char c = hex[i];
        if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f')))
            return -1;
    }
    if (hex[-1] != '.')
        return -1;
    const char *e = hex - 1, *s = e;
    while (s > name && s[-1] >= '0' && s[-1] <= '9')
        s--;
    if (s == e || e - s > 10 || s - name < 5 || strncmp(s - 5, ".tmp.", 5) != 0)
        return -1;
    return strtol(s, NULL, 10);
}

static int clean_in(const char *dir)
{
    DIR *d = opendir(dir);
    if (!d)
        return 0;
    int removed = 0;
    struct dirent *de;
    while ((de = readdir(d))) {
        long pid = temp_pid(de->d_name);
        if (pid < 0 || (pid != (long)getpid() && pid_alive(pid)))
            continue;
        char *p = fileio_join(dir, de->d_name);
        struct stat st;
        if (p && lstat(p, &st) == 0 && (S_ISREG(st.st_mode) || S_ISLNK(st.st_mode)) && unlink(p) == 0)
            removed++;
        free(p);
    }
    closedir(d);
    return removed;
}

int run_dir_clean_temps(const char *dir)
{
    int n = clean_in(dir);
    char *mods = fileio_join(dir, "modules");
    if (mods)
        n += clean_in(mods);
    free(mods);
    return n;
}

/* ---- metrics ----------------------------------------------------------------- */

/* The "step" of a metrics line, or -1 when it has none. */
static long long line_step(const char *s, const char *e)
{
    static const char key[] = "\"step\":";
    for (const char *p = s; p + sizeof key - 1 <= e; p++)
        if (memcmp(p, key, sizeof key - 1) == 0) {
            p += sizeof key - 1;
            while (p < e && *p == ' ')
                p++;
            return p < e && *p >= '0' && *p <= '9' ? strtoll(p, NULL, 10) : -1;
        }
    return -1;
}

int run_dir_truncate_metrics(const char *path, int64_t step, pr_error *err)
{
    char *buf = NULL;
    size_t len = 0;
    int rc = fileio_read_all(path, (size_t)1 << 32, &buf, &len, err);
    if (rc == PR_ERR_NOTFOUND)
        return PR_OK;
    if (rc)
        return rc;
    size_t keep = 0;
    for (size_t p = 0; p < len;) {
        const char *nl = memchr(buf + p, '\n', len - p);
        if (!nl)
            break; /* a line cut short by a kill */
        size_t e = (size_t)(nl - buf);
        if (line_step(buf + p, buf + e) > step)
            break;
        p = e + 1;
        keep = p;
    }
    if (keep != len)
        rc = fileio_write_atomic(path, buf, keep, err);
    free(buf);
    return rc;
}
