/* libFuzzer harness: a Hugging Face checkpoint directory
 * (core/io/hf_load.c pr_model_load_hf).  The input is up to three files
 * split at FUZZ_SEP: config.json, model.safetensors and, when present and
 * non-empty, model.safetensors.index.json (which then names the shards;
 * the one file written is model.safetensors). */
#include <stdint.h>
#include <stdio.h>

#include "fuzz_util.h"
#include "peftref/model.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size > FUZZ_MAX_INPUT)
        return -1;
    fuzz_part part[3];
    fuzz_split(data, size, part, 3);
    char dir[4200], cfg[4300], st[4300], idx[4300];
    fuzz_path("hf", dir, sizeof dir);
    fuzz_mkdir(dir);
    snprintf(cfg, sizeof cfg, "%s/config.json", dir);
    snprintf(st, sizeof st, "%s/model.safetensors", dir);
    snprintf(idx, sizeof idx, "%s/model.safetensors.index.json", dir);
    fuzz_write(cfg, part[0].data, part[0].size);
    fuzz_write(st, part[1].data, part[1].size);
    if (part[2].size)
        fuzz_write(idx, part[2].data, part[2].size);
    else
        fuzz_unlink(idx);
    pr_model *m = NULL;
    pr_error err = {0};
    if (pr_model_load_hf(dir, &m, &err) == PR_OK)
        pr_model_free(m);
    return 0;
}
