/* Shared pieces of the libFuzzer harnesses (tests/fuzz/README.md).
 *
 * Most readers take paths, so a harness writes its input to files in a
 * scratch directory made once per process (removed at exit).  Inputs that
 * stand for several files are split at FUZZ_SEP; seeds are built that way
 * by tests/fuzz/make_seeds. */
#ifndef PEFTREF_FUZZ_UTIL_H
#define PEFTREF_FUZZ_UTIL_H
#include <stddef.h>
#include <stdint.h>
#include "peftref/config.h"

/* Separator between the files of one input. */
#define FUZZ_SEP "\n--8<--\n"
#define FUZZ_SEP_LEN (sizeof FUZZ_SEP - 1)

/* Largest input a harness passes on (libFuzzer's -max_len is smaller in
 * `make fuzz`; this guards runs given bigger files by hand). */
#define FUZZ_MAX_INPUT ((size_t)1 << 20)

typedef struct fuzz_part {
    const uint8_t *data;
    size_t size;
} fuzz_part;

/* Split data at FUZZ_SEP into at most max parts (the last takes the
 * rest); returns the number of parts (>= 1). */
int fuzz_split(const uint8_t *data, size_t size, fuzz_part *parts, int max);

/* The process's scratch directory (made on first call, removed at exit). */
const char *fuzz_dir(void);
/* fuzz_dir()/name, in a static buffer per call site's own copy: the
 * caller copies it if it keeps it. */
const char *fuzz_path(const char *name, char *buf, size_t len);
/* Write size bytes to path (replacing it); aborts on I/O failure, which is
 * the harness's fault, not the reader's. */
void fuzz_write(const char *path, const void *data, size_t size);
/* Remove path if it exists (file or empty directory). */
void fuzz_unlink(const char *path);
/* mkdir -p of one level; aborts on failure other than EEXIST. */
void fuzz_mkdir(const char *path);

/* The model shape the module harness and make_seeds share: tiny GPT-2. */
void fuzz_tiny_config(pr_model_config *cfg);

/* The trainable tensors the checkpoint harness and make_seeds share. */
#define FUZZ_TS_FINGERPRINT "fuzz-fingerprint"
#define FUZZ_TS_N 2

#endif
