/* libFuzzer harness: a safetensors file (core/io/safetensors.c st_open),
 * then every accessor and every convertible tensor's conversion to f32. */
#include <stdint.h>
#include <stdlib.h>

#include "fuzz_util.h"
#include "safetensors.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size > FUZZ_MAX_INPUT)
        return -1;
    char path[4200];
    fuzz_path("in.safetensors", path, sizeof path);
    fuzz_write(path, data, size);
    /* the first byte picks the open mode, so both mappings are exercised */
    int flags = size > 0 && (data[0] & 1) ? ST_OPEN_WRITABLE : 0;
    st_file *f = NULL;
    pr_error err = {0};
    if (st_open(path, flags, &f, &err) != PR_OK)
        return 0;
    volatile size_t sink = 0;
    for (int i = 0; i < st_count(f); i++) {
        const st_tensor *t = st_tensor_at(f, i);
        char shape[256];
        st_format_shape(t->ndim, t->shape, shape, sizeof shape);
        sink += (size_t)shape[0];
        if (st_find(f, t->name) != t)
            abort();  /* lookup must find what listing gives */
        if (t->dtype == ST_DTYPE_OTHER || t->numel <= 0)
            continue;
        float *dst = malloc((size_t)t->numel * sizeof *dst);
        if (!dst)
            continue;
        if (st_to_f32(f, t, dst, &err) == PR_OK)
            sink += (size_t)(dst[0] == dst[0]);
        free(dst);
    }
    for (int i = 0; i < st_metadata_count(f); i++) {
        const char *k, *v;
        st_metadata_at(f, i, &k, &v);
        if (st_metadata(f, k) == NULL)
            abort();
        sink += (size_t)v[0];
    }
    (void)sink;
    st_close(f);
    return 0;
}
