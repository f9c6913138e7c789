/* libFuzzer harness: a pipeline YAML through `peftref plan`
 * (core/pipeline/: pr_pipeline_load_report, every compare arm with
 * pr_pipeline_load_arm, then what plan prints: the model's shape and
 * parameter count, the train settings, each module's spec, plan and
 * layers, and the parameter counts, which read the data and the
 * tokenizer).  The input is the YAML, then optionally FUZZ_SEP and --set
 * overrides, one a line (at most 8).
 *
 * The pipeline is written as DIR/pipelines/p.yaml, with the test data at
 * DIR/train (tests/data/train), DIR/pipelines/cls.jsonl (the compare
 * fixtures' data) and a tiny Hugging Face model at DIR/model, so the seeds'
 * relative paths resolve.  Techniques come from the built plugins. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "fuzz_util.h"
#include "peftref/config.h"
#include "peftref/model.h"
#include "peftref/pipeline.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerInitialize(int *argc, char ***argv);

#define MAX_SETS 8

static pr_registry *reg;
static char yaml_path[4200];

static void link_or_die(const char *target, const char *name)
{
    char path[4200];
    fuzz_path(name, path, sizeof path);
    if (symlink(target, path) != 0) {
        perror(path);
        abort();
    }
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    pr_error err = {0};
    if (pr_registry_open(FUZZ_BUILDDIR "/plugins/.libs", &reg, &err) != PR_OK) {
        fprintf(stderr, "fuzz_pipeline: %s\n", err.msg);
        abort();
    }
    char path[4200];
    fuzz_mkdir(fuzz_path("pipelines", path, sizeof path));
    link_or_die(FUZZ_SRCDIR "/tests/data/train", "train");
    link_or_die(FUZZ_SRCDIR "/tests/data/compare/cls.jsonl", "pipelines/cls.jsonl");
    pr_model_config cfg;
    fuzz_tiny_config(&cfg);
    pr_model *m = NULL;
    if (pr_model_create(&cfg, &m, &err) != PR_OK ||
        pr_model_save_hf(m, fuzz_path("model", path, sizeof path), NULL, &err) != PR_OK) {
        fprintf(stderr, "fuzz_pipeline: %s\n", err.msg);
        abort();
    }
    pr_model_free(m);
    fuzz_path("pipelines/p.yaml", yaml_path, sizeof yaml_path);
    return 0;
}

static void discard(void *arg, const char *line)
{
    (void)arg;
    (void)line;
}

/* What `peftref plan` reads from a loaded pipeline. */
static void plan(const pr_pipeline *p)
{
    volatile int64_t sink = 0;
    const pr_model_config *c = pr_pipeline_model_config(p);
    sink += pr_config_param_count(c);
    sink += pr_pipeline_model_source(p);
    const char *s = pr_pipeline_model_name(p);
    sink += s ? s[0] : 0;
    s = pr_pipeline_tokenizer_dir(p);
    sink += s ? s[0] : 0;
    pr_train_config tc;
    pr_pipeline_train_config(p, &tc);
    sink += tc.steps;
    for (int i = 0; i < pr_pipeline_n_arms(p); i++)
        sink += pr_pipeline_arm_name(p, i)[0];
    for (int i = 0; i < pr_pipeline_n_modules(p); i++) {
        pr_module_spec spec;
        pr_pipeline_module_spec(p, i, &spec);
        const pr_module_plan *pl = pr_pipeline_module_plan(p, i);
        if (pl)
            sink += pl->params + pl->insertions;
        int nl = 0;
        const int *ls = pr_pipeline_module_layers(p, i, &nl);
        for (int k = 0; ls && k < nl; k++)
            sink += ls[k];
        for (int k = 0; k < spec.n_options; k++)
            sink += spec.options[k].value[0];
    }
    pr_pipeline_counts counts;
    pr_error err = {0};
    if (pr_pipeline_counts_get(p, &counts, &err) == PR_OK) {
        char line[256];
        pr_pipeline_format_counts(&counts, line, sizeof line);
        sink += line[0];
    }
    (void)sink;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size > FUZZ_MAX_INPUT)
        return -1;
    fuzz_part part[2];
    fuzz_split(data, size, part, 2);
    fuzz_write(yaml_path, part[0].data, part[0].size);

    /* the overrides, NUL-terminated copies of the second part's lines */
    char *sets_buf = malloc(part[1].size + 1);
    if (!sets_buf)
        abort();
    if (part[1].size)
        memcpy(sets_buf, part[1].data, part[1].size);
    sets_buf[part[1].size] = '\0';
    const char *sets[MAX_SETS];
    int n_sets = 0;
    for (char *line = sets_buf, *next; part[1].data && line && n_sets < MAX_SETS; line = next) {
        next = strchr(line, '\n');
        if (next)
            *next++ = '\0';
        if (*line)
            sets[n_sets++] = line;
    }

    pr_pipeline *p = NULL;
    pr_error err = {0};
    if (pr_pipeline_load_report(yaml_path, sets, n_sets, reg, &p, discard, NULL, &err) == PR_OK) {
        plan(p);
        int arms = pr_pipeline_n_arms(p);
        pr_pipeline_free(p);
        for (int i = 0; i < arms && i < 16; i++) {
            pr_pipeline *a = NULL;
            if (pr_pipeline_load_arm(yaml_path, i, sets, n_sets, reg, &a, discard, NULL, &err) == PR_OK) {
                plan(a);
                pr_pipeline_free(a);
            }
        }
    }
    free(sets_buf);
    return 0;
}
