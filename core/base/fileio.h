/* peftref core: whole-file reads and atomic, streamed file writes.
 *
 * An atomic write goes to "PATH.tmp.<pid>.<random>" in PATH's directory,
 * created new (O_EXCL, so a symlink planted at that name is never followed)
 * under a name nobody can predict; commit
 * fsyncs it, renames it over PATH and fsyncs the directory, so a reader
 * (or a crash) sees either the old PATH or the complete new one, never a
 * mix.  Any failure up to the rename removes the temporary file and leaves
 * PATH untouched; a failed directory fsync after it is still reported
 * (PATH then holds the new contents, which may not survive a crash).
 * Memory-mapped readers of the old PATH keep seeing the old contents,
 * because the rename replaces the directory entry, not the file. */
#ifndef PEFTREF_CORE_FILEIO_H
#define PEFTREF_CORE_FILEIO_H

#include <stddef.h>
#include "peftref/status.h"

/* Read all of path into a fresh buffer (*out, caller frees) with a NUL
 * appended after the *len bytes.  Files larger than max_size fail with
 * PR_ERR_FORMAT; a missing file fails with PR_ERR_NOTFOUND. */
int fileio_read_all(const char *path, size_t max_size, char **out, size_t *len, pr_error *err);

/* A streamed atomic write: open, write any number of chunks, then commit
 * or abort.  Both commit and abort release the writer; commit aborts on
 * failure.  After a failed write the writer only accepts abort (commit
 * reports the first error again and aborts). */
typedef struct fileio_writer {
    int fd;              /* -1 once closed */
    char *path;          /* final destination */
    char *tmp_path;      /* PATH.tmp.<pid>.<16 hex digits> */
    size_t written;      /* bytes written so far */
    int failed;          /* a write already failed */
} fileio_writer;

int fileio_writer_open(fileio_writer *w, const char *path, pr_error *err);
int fileio_writer_write(fileio_writer *w, const void *buf, size_t len, pr_error *err);
int fileio_writer_commit(fileio_writer *w, pr_error *err);
void fileio_writer_abort(fileio_writer *w);

/* Atomically replace path with len bytes of buf. */
int fileio_write_atomic(const char *path, const void *buf, size_t len, pr_error *err);

/* "dir/name" in a fresh string (caller frees), or NULL when out of memory. */
char *fileio_join(const char *dir, const char *name);

#endif
