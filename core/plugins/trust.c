/* peftref core: the plugin registry's trust rule -- whether a plugin
 * file, plugin directory or pack directory may be loaded or searched,
 * judged by who owns it and who may write to it. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "registry_internal.h"

/* The trust rule for code the host will run (GStreamer's registry makes
 * the same demand): a plugin file, and the directory it really lives in,
 * must be owned by this user or by root and writable by no one else.
 * Symbolic links are resolved first and the target is held to the rule,
 * so a link cannot lend a trusted name to a file another user can change.
 * Returns 0 when path may be loaded or searched, else 1 with why filled. */
static int st_untrusted(const struct stat *st, const char *real, const char *what, char *why, size_t size)
{
    uid_t me = geteuid();
    if (st->st_uid != me && st->st_uid != 0) {
        snprintf(why, size, "not trusted: %s %s is owned by uid %ld, neither this user (uid %ld) nor root",
                 what, real, (long)st->st_uid, (long)me);
        return 1;
    }
    if (st->st_mode & (S_IWGRP | S_IWOTH)) {
        snprintf(why, size, "not trusted: %s %s is writable by %s (mode %04o); "
                 "run 'chmod go-w' on it to load it", what, real,
                 (st->st_mode & S_IWOTH) ? "everyone" : "its group", (unsigned)(st->st_mode & 07777));
        return 1;
    }
    return 0;
}

int reg_untrusted(const char *path, int is_dir, char *why, size_t size)
{
    char *real = realpath(path, NULL);
    if (!real) {
        snprintf(why, size, "cannot resolve %s: %s", path, strerror(errno));
        return 1;
    }
    struct stat st;
    int bad = 0;
    if (lstat(real, &st) != 0) {
        snprintf(why, size, "cannot stat %s: %s", real, strerror(errno));
        bad = 1;
    } else {
        bad = st_untrusted(&st, real, is_dir ? "directory" : "file", why, size);
    }
    /* the directory the file really lives in decides who can replace it */
    if (!bad && !is_dir) {
        char *slash = strrchr(real, '/');
        if (slash) {
            if (slash == real)
                slash[1] = '\0';
            else
                *slash = '\0';
            if (lstat(real, &st) != 0) {
                snprintf(why, size, "cannot stat %s: %s", real, strerror(errno));
                bad = 1;
            } else {
                bad = st_untrusted(&st, real, "directory", why, size);
            }
        }
    }
    if (bad && strcmp(real, path) != 0) {
        /* name the link the user gave as well as where it leads */
        size_t k = strlen(why);
        snprintf(why + k, size - k, " (reached through %s)", path);
    }
    free(real);
    return bad;
}
