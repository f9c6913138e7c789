/* Shared pieces of the libFuzzer harnesses: see fuzz_util.h. */
#include "fuzz_util.h"

#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

int fuzz_split(const uint8_t *data, size_t size, fuzz_part *parts, int max)
{
    int n = 0;
    const uint8_t *p = data;
    size_t left = size;
    while (n < max - 1) {
        const uint8_t *q = left >= FUZZ_SEP_LEN ? memmem(p, left, FUZZ_SEP, FUZZ_SEP_LEN) : NULL;
        if (!q)
            break;
        parts[n].data = p;
        parts[n].size = (size_t)(q - p);
        n++;
        left -= (size_t)(q - p) + FUZZ_SEP_LEN;
        p = q + FUZZ_SEP_LEN;
    }
    parts[n].data = p;
    parts[n].size = left;
    n++;
    for (int i = n; i < max; i++) {
        parts[i].data = NULL;
        parts[i].size = 0;
    }
    return n;
}

static char scratch[4096];

static int rm_one(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st;
    (void)flag;
    (void)ftw;
    remove(path);
    return 0;
}

static void scratch_remove(void)
{
    if (scratch[0])
        nftw(scratch, rm_one, 16, FTW_DEPTH | FTW_PHYS);
}

const char *fuzz_dir(void)
{
    if (!scratch[0]) {
        const char *tmp = getenv("TMPDIR");
        snprintf(scratch, sizeof scratch, "%s/peftref-fuzz-XXXXXX", tmp && *tmp ? tmp : "/tmp");
        if (!mkdtemp(scratch)) {
            perror("fuzz: mkdtemp");
            abort();
        }
        atexit(scratch_remove);
    }
    return scratch;
}

const char *fuzz_path(const char *name, char *buf, size_t len)
{
    snprintf(buf, len, "%s/%s", fuzz_dir(), name);
    return buf;
}

void fuzz_write(const char *path, const void *data, size_t size)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    if (fd < 0) {
        perror(path);
        abort();
    }
    const char *p = data;
    while (size > 0) {
        ssize_t w = write(fd, p, size);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            perror(path);
            abort();
        }
        p += w;
        size -= (size_t)w;
    }
    close(fd);
}

void fuzz_unlink(const char *path)
{
    if (remove(path) != 0 && errno != ENOENT) {
        perror(path);
        abort();
    }
}

void fuzz_mkdir(const char *path)
{
    if (mkdir(path, 0700) != 0 && errno != EEXIST) {
        perror(path);
        abort();
    }
}

void fuzz_tiny_config(pr_model_config *cfg)
{
    pr_config_preset("gpt2-tiny", cfg);
    cfg->n_layers = 2;
    cfg->d_model = 8;
    cfg->n_heads = 2;
    cfg->n_kv_heads = 2;
    cfg->d_head = 4;
    cfg->d_ff = 16;
    cfg->vocab_size = 16;
    cfg->max_seq = 8;
    cfg->seed = 7;
}
