/* libFuzzer harness: a saved module (core/io/module_open.c
 * pr_module_file_open, core/io/module_load.c pr_module_load) with the
 * techniques of the built plugins, attached to the tiny model make_seeds
 * saved its modules for (fuzz_tiny_config), made afresh for each input
 * (a selection module's values go into the base tensors). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "fuzz_util.h"
#include "peftref/model.h"
#include "peftref/module.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerInitialize(int *argc, char ***argv);

static pr_registry *reg;

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    pr_error err = {0};
    if (pr_registry_open(FUZZ_BUILDDIR "/plugins/.libs", &reg, &err) != PR_OK) {
        fprintf(stderr, "fuzz_module: %s\n", err.msg);
        abort();
    }
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size > FUZZ_MAX_INPUT)
        return -1;
    char path[4200];
    fuzz_path("module.safetensors", path, sizeof path);
    fuzz_write(path, data, size);
    pr_error err = {0};
    pr_module_file *f = NULL;
    if (pr_module_file_open(path, reg, &f, &err) != PR_OK)
        return 0;
    pr_model_config cfg;
    fuzz_tiny_config(&cfg);
    pr_model *model = NULL;
    if (pr_model_create(&cfg, &model, &err) != PR_OK) {
        fprintf(stderr, "fuzz_module: %s\n", err.msg);
        abort();
    }
    char fingerprint[256];
    pr_model_fingerprint(model, fingerprint, sizeof fingerprint);
    pr_module_spec spec;
    pr_module_file_spec(f, &spec);
    pr_module_file_check_base(f, fingerprint, &err);
    pr_module_file *two[2] = {f, f};
    pr_module_files_compatible(two, 2, &err);
    pr_module_file_close(f);

    pr_module_load_options opt = {.name = NULL, .trainable = (int)(size & 1), .force = 1};
    pr_module *mod = NULL;
    pr_module_load(model, path, reg, &opt, &mod, &err);
    pr_model_detach_modules(model);
    pr_model_free(model);
    return 0;
}
