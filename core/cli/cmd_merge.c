/* peftref merge: fold a pipeline's modules into its base model and write
 * the result as a Hugging Face directory. */
#include "config.h"

#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"

static const char merge_usage[] =
    "usage: peftref merge (PIPELINE.yaml | RUN) --out DIR [--skip-unmergeable] [--set KEY=VALUE ...]\n"
    "\n"
    "Build the pipeline (a run directory RUN stands for RUN/pipeline.yaml, the\n"
    "run's modules loaded frozen), fold every module into the frozen weights\n"
    "and write the merged model to DIR in Hugging Face layout: config.json,\n"
    "model.safetensors and the tokenizer files.  `peftref eval --model DIR`\n"
    "then gives what `peftref eval --pipeline RUN` gives, without modules.\n"
    "\n"
    "Mergeable: techniques with a merge() callback ('peftref plugins inspect\n"
    "NAME' says whether one has); selection techniques already live in the\n"
    "base tensors.  A module that cannot be merged (concatenation, bottleneck\n"
    "adapters) is an error naming it, unless --skip-unmergeable leaves it out\n"
    "of the written model (with a warning).\n"
    "\n"
    "  --out DIR             output directory (created)\n"
    "  --skip-unmergeable    leave out modules that cannot be merged\n"
    "  --set KEY=VALUE       override a pipeline value (as in peftref train)\n"
    "  -h, --help            show this help\n"
    "\n"
    "Exit status: 0 written, 1 error, 2 usage.\n";

int cmd_merge(int argc, char **argv)
{
    static const struct option opts[] = {
        {"out", required_argument, 0, 'o'}, {"skip-unmergeable", no_argument, 0, 'k'},
        {"set", required_argument, 0, 's'}, {"help", no_argument, 0, 'h'}, {0, 0, 0, 0}};
    const char **sets = calloc((size_t)argc + 1, sizeof *sets);
    if (!sets) {
        fprintf(stderr, "peftref merge: out of memory\n");
        return 1;
    }
    const char *out = NULL;
    int n_sets = 0, skip = 0, c;
    optind = 1;
    opterr = 0;
    while ((c = getopt_long(argc, argv, ":h", opts, NULL)) != -1) {
        switch (c) {
        case 'o': out = optarg; break;
        case 'k': skip = 1; break;
        case 's': sets[n_sets++] = optarg; break;
        case 'h': fputs(merge_usage, stdout); free(sets); return 0;
        case ':':
            fprintf(stderr, "peftref merge: option '%s' needs a value\n", argv[optind - 1]);
            free(sets);
            return 2;
        default:
            fprintf(stderr, "peftref merge: unknown option '%s' (see peftref merge --help)\n", argv[optind - 1]);
            free(sets);
            return 2;
        }
    }
    if (argc - optind != 1 || !out) {
        fprintf(stderr, "peftref merge: expected one pipeline or run directory and --out DIR (see --help)\n");
        free(sets);
        return 2;
    }
    pr_registry *reg = NULL;
    pr_pipeline *pipe = NULL;
    pr_model *m = NULL;
    pr_tokenizer *tok = NULL;
    int rc = cli_pipeline_build("merge", argv[optind], sets, n_sets, &reg, &pipe, &m, &tok);
    free(sets);
    if (rc)
        return rc;
    pr_error err = {0};
    int merged = 0, skipped = 0;
    for (int i = 0; i < pr_model_n_modules(m) && rc == 0; i++) {
        pr_module *mod = pr_model_module(m, i);
        const pr_technique *t = pr_module_technique(mod);
        if (t->integration == PR_INTEGRATE_SELECT) {
            merged++;   /* its values are the base tensors themselves */
            continue;
        }
        if (pr_module_merge(mod, &err) == PR_OK) {
            merged++;
            continue;
        }
        if (skip) {
            fprintf(stderr, "peftref merge: warning: left out module '%s' (technique %s): %s\n", pr_module_name(mod),
                    t->name, err.msg);
            skipped++;
            continue;
        }
        fprintf(stderr, "peftref merge: module '%s' (technique %s) cannot be merged: %s (--skip-unmergeable "
                "leaves it out)\n", pr_module_name(mod), t->name, err.msg);
        rc = 1;
    }
    if (rc == 0 && pr_model_save_hf(m, out, pr_pipeline_tokenizer_dir(pipe), &err)) {
        fprintf(stderr, "peftref merge: %s\n", err.msg);
        rc = 1;
    }
    if (rc == 0)
        printf("merged %d module%s%s into %s\n", merged, merged == 1 ? "" : "s",
               skipped ? " (some left out)" : "", out);
    pr_tokenizer_free(tok);
    pr_model_free(m);
    pr_pipeline_free(pipe);
    pr_registry_free(reg);
    return rc;
}
