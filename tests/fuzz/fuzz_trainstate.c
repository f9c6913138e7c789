/* libFuzzer harness: a training checkpoint (core/io/train_state.c
 * trainstate_load) read into the two tensors make_seeds saves (FUZZ_TS_*),
 * with and without optimizer moments. */
#include <stdint.h>
#include <string.h>

#include "fuzz_util.h"
#include "train_state.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size > FUZZ_MAX_INPUT)
        return -1;
    char path[4200];
    fuzz_path("state.safetensors", path, sizeof path);
    fuzz_write(path, data, size);

    float a[12], b[5], m[17], v[17];
    trainstate_tensor params[FUZZ_TS_N] = {
        {.name = "h.0.w", .data = a, .n = 12, .ndim = 2, .shape = {3, 4}},
        {.name = "h.1.b", .data = b, .n = 5, .ndim = 1, .shape = {5}},
    };
    trainstate_moments mom = {.m = m, .v = v, .n = 17};
    trainstate_progress prog;
    memset(&prog, 0, sizeof prog);
    pr_error err = {0};
    trainstate_load(path, FUZZ_TS_FINGERPRINT, params, FUZZ_TS_N, &mom, &prog, &err);
    trainstate_load(path, FUZZ_TS_FINGERPRINT, params, FUZZ_TS_N, NULL, &prog, &err);
    return 0;
}
