/* libFuzzer harness: a technique pack's manifest.json
 * (core/plugins/registry.c, read when pr_registry_open finds a
 * subdirectory holding one).  The pack directory DIR/pack holds a copy of
 * the built adapters pack's library, so a manifest is checked against
 * the techniques a real pack provides.  The copy is opened once with
 * RTLD_NODELETE: the library carries coverage counters libFuzzer keeps
 * writing to, so the registry's dlclose must not unmap it. */
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "fuzz_util.h"
#include "peftref/module.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerInitialize(int *argc, char ***argv);

static char manifest[4200];

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    const char *lib = FUZZ_BUILDDIR "/plugins/.libs/adapters.so";
    FILE *in = fopen(lib, "rb");
    if (!in) {
        perror(lib);
        abort();
    }
    char *buf = NULL;
    size_t len = 0, cap = 0;
    for (;;) {
        if (len == cap) {
            cap = cap ? 2 * cap : 1 << 16;
            buf = realloc(buf, cap);
            if (!buf)
                abort();
        }
        size_t r = fread(buf + len, 1, cap - len, in);
        if (r == 0)
            break;
        len += r;
    }
    fclose(in);
    char path[4200];
    fuzz_mkdir(fuzz_path("pack", path, sizeof path));
    fuzz_write(fuzz_path("pack/adapters.so", path, sizeof path), buf, len);
    free(buf);
    if (!dlopen(path, RTLD_NOW | RTLD_NODELETE)) {
        fprintf(stderr, "fuzz_manifest: %s\n", dlerror());
        abort();
    }
    fuzz_path("pack/manifest.json", manifest, sizeof manifest);
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size > FUZZ_MAX_INPUT)
        return -1;
    fuzz_write(manifest, data, size);
    pr_registry *reg = NULL;
    pr_error err = {0};
    if (pr_registry_open(fuzz_dir(), &reg, &err) != PR_OK)
        return 0;
    volatile int sink = pr_registry_count(reg);
    for (int i = 0; i < pr_registry_refused_count(reg); i++) {
        const char *path, *reason;
        pr_registry_refused(reg, i, &path, &reason);
        sink += reason[0];
    }
    (void)sink;
    pr_registry_free(reg);
    return 0;
}
