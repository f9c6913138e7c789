/* peftref export: write a run's modules (or a model) in another tool's
 * format: Hugging Face PEFT's adapter directory, peftref's module file,
 * or GGUF for llama.cpp. */
#include "config.h"

#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "export.h"

static const char export_usage[] =
    "usage: peftref export (RUN | PIPELINE.yaml | MODEL_DIR) --format peft|peftref|gguf --out PATH\n"
    "                      [--module NAME] [--base] [--dtype f32|f16] [--force] [--set KEY=VALUE ...]\n"
    "\n"
    "Write a run's trained module where other tools read it (a run directory RUN\n"
    "stands for RUN/pipeline.yaml, its modules loaded frozen):\n"
    "  --format peft     a Hugging Face PEFT adapter directory (adapter_config.json,\n"
    "                    adapter_model.safetensors) that PeftModel.from_pretrained\n"
    "                    loads; techniques PEFT lacks are refused (use peftref)\n"
    "  --format peftref  peftref's own module file (docs/modules.md)\n"
    "  --format gguf     a llama.cpp adapter (FILE.gguf); with --base the base\n"
    "                    model, the run's modules merged into it (or MODEL_DIR as is)\n"
    "docs/modules.md, \"Interoperability\", says which techniques go where and what\n"
    "is folded on the way.\n"
    "\n"
    "  --out PATH        the directory (peft) or file (peftref, gguf) to write\n"
    "  --module NAME     the module to export when the run has several\n"
    "  --base            gguf: write the model rather than an adapter\n"
    "  --dtype D         gguf --base: f32 (default) or f16\n"
    "  --force           replace PATH if it exists\n"
    "  --set KEY=VALUE   override a pipeline value\n"
    "  -h, --help        show this help\n"
    "\n"
    "Exit status: 0 written, 1 error, 2 usage.\n";

int cmd_export(int argc, char **argv)
{
    static const struct option opts[] = {
        {"format", required_argument, 0, 'f'}, {"out", required_argument, 0, 'o'},
        {"module", required_argument, 0, 'm'}, {"base", no_argument, 0, 'b'},
        {"dtype", required_argument, 0, 'd'}, {"force", no_argument, 0, 'F'},
        {"set", required_argument, 0, 's'}, {"help", no_argument, 0, 'h'}, {0, 0, 0, 0}};
    const char **sets = calloc((size_t)argc + 1, sizeof *sets);
    if (!sets) {
        fprintf(stderr, "peftref export: out of memory\n");
        return 1;
    }
    export_request r;
    memset(&r, 0, sizeof r);
    const char *format = NULL;
    int n_sets = 0, c;
    optind = 1;
    opterr = 0;
    while ((c = getopt_long(argc, argv, ":h", opts, NULL)) != -1) {
        switch (c) {
        case 'f': format = optarg; break;
        case 'o': r.out = optarg; break;
        case 'm': r.module = optarg; break;
        case 'b': r.base = 1; break;
        case 'd': r.dtype = optarg; break;
        case 'F': r.force = 1; break;
        case 's': sets[n_sets++] = optarg; break;
        case 'h': fputs(export_usage, stdout); free(sets); return 0;
        case ':':
            fprintf(stderr, "peftref export: option '%s' needs a value\n", argv[optind - 1]);
            free(sets);
            return 2;
        default:
            fprintf(stderr, "peftref export: unknown option '%s' (see peftref export --help)\n", argv[optind - 1]);
            free(sets);
            return 2;
        }
    }
    if (argc - optind != 1 || !r.out || !format) {
        fprintf(stderr, "peftref export: expected one run, pipeline or model directory, --format and --out "
                "(see --help)\n");
        free(sets);
        return 2;
    }
    if (r.dtype && strcmp(r.dtype, "f32") != 0 && strcmp(r.dtype, "f16") != 0) {
        fprintf(stderr, "peftref export: --dtype is f32 or f16, not '%s'\n", r.dtype);
        free(sets);
        return 2;
    }
    if ((r.base || r.dtype) && strcmp(format, "gguf") != 0) {
        fprintf(stderr, "peftref export: --base and --dtype apply to --format gguf only\n");
        free(sets);
        return 2;
    }
    r.src = argv[optind];
    r.sets = sets;
    r.n_sets = n_sets;
    int rc;
    if (strcmp(format, "peft") == 0)
        rc = export_peft(&r);
    else if (strcmp(format, "peftref") == 0)
        rc = export_peftref(&r);
    else if (strcmp(format, "gguf") == 0)
        rc = export_gguf(&r);
    else {
        fprintf(stderr, "peftref export: unknown --format '%s' (peft, peftref or gguf)\n", format);
        rc = 2;
    }
    free(sets);
    return rc;
}
