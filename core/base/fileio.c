/* peftref core: whole-file reads and atomic, streamed file writes. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stdint.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "fileio.h"

int fileio_read_all(const char *path, size_t max_size, char **out, size_t *len, pr_error *err)
{
    *out = NULL;
    if (len)
        *len = 0;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        int e = errno;
        return pr_errorf(err, e == ENOENT ? PR_ERR_NOTFOUND : PR_ERR_IO,
                         "%s: cannot open: %s", path, strerror(e));
    }
    struct stat st;
    if (fstat(fd, &st) != 0) {
        int e = errno;
        close(fd);
        return pr_errorf(err, PR_ERR_IO, "%s: cannot stat: %s", path, strerror(e));
    }
    if (!S_ISREG(st.st_mode)) {
        close(fd);
        return pr_errorf(err, PR_ERR_INVALID, "%s: not a regular file", path);
    }
    if ((unsigned long long)st.st_size > (unsigned long long)max_size) {
        close(fd);
        return pr_errorf(err, PR_ERR_FORMAT, "%s: file is %lld bytes, more than the %zu allowed",
                         path, (long long)st.st_size, max_size);
    }
    size_t size = (size_t)st.st_size;
    char *buf = malloc(size + 1);
    if (!buf) {
        close(fd);
        return pr_errorf(err, PR_ERR_NOMEM, "%s: cannot allocate %zu bytes", path, size + 1);
    }
    size_t got = 0;
    while (got < size) {
        ssize_t r = read(fd, buf + got, size - got);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            int e = errno;
            free(buf);
            close(fd);
            return pr_errorf(err, PR_ERR_IO, "%s: read failed: %s", path, strerror(e));
        }
        if (r == 0)
            break; /* the file shrank while we read it */
        got += (size_t)r;
    }
    close(fd);
    if (got != size) {
        free(buf);
        return pr_errorf(err, PR_ERR_IO, "%s: file changed while being read (%zu of %zu bytes)",
                         path, got, size);
    }
    buf[size] = '\0';
    *out = buf;
    if (len)
        *len = size;
    return PR_OK;
}

char *fileio_join(const char *dir, const char *name)
{
    size_t a = strlen(dir), b = strlen(name);
    char *s = malloc(a + b + 2);
    if (!s)
        return NULL;
    memcpy(s, dir, a);
    size_t k = a;
    if (a > 0 && dir[a - 1] != '/')
        s[k++] = '/';
    memcpy(s + k, name, b + 1);
    return s;
}

/* The directory holding path, as a fresh string. */
static char *dir_of(const char *path)
{
    const char *slash = strrchr(path, '/');
    if (!slash)
        return strdup(".");
    if (slash == path)
        return strdup("/");
    return strndup(path, (size_t)(slash - path));
}

static void writer_release(fileio_writer *w)
{
    free(w->path);
    free(w->tmp_path);
    w->path = NULL;
    w->tmp_path = NULL;
    w->fd = -1;
}

/* 64 random bits for a temporary name nobody else can predict. */
static unsigned long long random_suffix(void)
{
    unsigned long long v = 0;
    if (getrandom(&v, sizeof v, GRND_NONBLOCK) != (ssize_t)sizeof v) {
        /* no entropy yet (early boot): the clock and address still differ per call */
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        v ^= ((unsigned long long)ts.tv_sec << 32) ^ (unsigned long long)ts.tv_nsec ^ (uintptr_t)&v;
    }
    return v;
}

int fileio_writer_open(fileio_writer *w, const char *path, pr_error *err)
{
    memset(w, 0, sizeof *w);
    w->fd = -1;
    size_t n = strlen(path) + 64;
    w->path = strdup(path);
    w->tmp_path = malloc(n);
    if (!w->path || !w->tmp_path) {
        writer_release(w);
        return pr_errorf(err, PR_ERR_NOMEM, "%s: out of memory", path);
    }
    /* The name is unpredictable and the file is created new: O_EXCL never
     * follows a symlink planted at that name, and a name that exists
     * (planted or not) is not reused, so a write cannot be redirected into
     * a file elsewhere through a shared output directory. */
    int e = EEXIST;
    for (int attempt = 0; attempt < 16 && e == EEXIST; attempt++) {
        snprintf(w->tmp_path, n, "%s.tmp.%ld.%016llx", path, (long)getpid(), random_suffix());
        w->fd = open(w->tmp_path, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0666);
        e = w->fd < 0 ? errno : 0;
    }
    if (w->fd < 0) {
        pr_errorf(err, e == ENOENT ? PR_ERR_NOTFOUND : PR_ERR_IO,
                  "%s: cannot create temporary file %s: %s", path, w->tmp_path, strerror(e));
        writer_release(w);
        return e == ENOENT ? PR_ERR_NOTFOUND : PR_ERR_IO;
    }
    return PR_OK;
}

int fileio_writer_write(fileio_writer *w, const void *buf, size_t len, pr_error *err)
{
    if (w->fd < 0 || w->failed)
        return pr_errorf(err, PR_ERR_INVALID, "%s: write after a failed or finished write",
                         w->path ? w->path : "(closed writer)");
    const char *p = buf;
    while (len > 0) {
        ssize_t r = write(w->fd, p, len);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            int e = errno;
            w->failed = 1;
            return pr_errorf(err, PR_ERR_IO, "%s: write failed after %zu bytes: %s", w->path,
                             w->written, strerror(e));
        }
        p += r;
        len -= (size_t)r;
        w->written += (size_t)r;
    }
    return PR_OK;
}

void fileio_writer_abort(fileio_writer *w)
{
    if (w->fd >= 0)
        close(w->fd);
    if (w->tmp_path)
        unlink(w->tmp_path);
    writer_release(w);
}

int fileio_writer_commit(fileio_writer *w, pr_error *err)
{
    if (w->fd < 0)
        return pr_errorf(err, PR_ERR_INVALID, "commit of a closed writer");
    if (w->failed) {
        int rc = pr_errorf(err, PR_ERR_IO, "%s: not written: an earlier write failed", w->path);
        fileio_writer_abort(w);
        return rc;
    }
    if (fsync(w->fd) != 0) {
        int e = errno;
        pr_errorf(err, PR_ERR_IO, "%s: fsync failed: %s", w->path, strerror(e));
        fileio_writer_abort(w);
        return PR_ERR_IO;
    }
    int fd = w->fd;
    w->fd = -1;
    if (close(fd) != 0) {
        int e = errno;
        pr_errorf(err, PR_ERR_IO, "%s: close failed: %s", w->path, strerror(e));
        fileio_writer_abort(w);
        return PR_ERR_IO;
    }
    if (rename(w->tmp_path, w->path) != 0) {
        int e = errno;
        pr_errorf(err, PR_ERR_IO, "%s: cannot rename %s over it: %s", w->path, w->tmp_path,
                  strerror(e));
        fileio_writer_abort(w);
        return PR_ERR_IO;
    }
    /* The rename is durable only once the directory entry is on disk. */
    int rc = PR_OK;
    char *dir = dir_of(w->path);
    if (!dir) {
        rc = pr_errorf(err, PR_ERR_NOMEM, "%s: out of memory", w->path);
    } else {
        int dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (dfd < 0) {
            int e = errno;
            rc = pr_errorf(err, PR_ERR_IO, "%s: cannot open directory %s to sync it: %s",
                           w->path, dir, strerror(e));
        } else {
            if (fsync(dfd) != 0 && errno != EINVAL) {
                int e = errno;
                rc = pr_errorf(err, PR_ERR_IO, "%s: fsync of directory %s failed: %s", w->path,
                               dir, strerror(e));
            }
            close(dfd);
        }
        free(dir);
    }
    writer_release(w);
    return rc;
}

int fileio_write_atomic(const char *path, const void *buf, size_t len, pr_error *err)
{
    fileio_writer w;
    int rc = fileio_writer_open(&w, path, err);
    if (rc != PR_OK)
        return rc;
    rc = fileio_writer_write(&w, buf, len, err);
    if (rc != PR_OK) {
        fileio_writer_abort(&w);
        return rc;
    }
    return fileio_writer_commit(&w, err);
}
