/* peftref: command-line entry point and subcommand dispatch. */
#include "config.h"

#include <stdio.h>
#include <string.h>

#include "cli.h"
#include "dist.h"
#include "runtime.h"

typedef struct subcommand {
    const char *name;
    int (*run)(int argc, char **argv);
    const char *summary;
} subcommand;

static const subcommand commands[] = {
    {"eval", cmd_eval, "perplexity of a model on a text file; a classification run's accuracy"},
    {"predict", cmd_predict, "labels and probabilities from a classification run"},
    {"tokenize", cmd_tokenize, "print a text's token ids"},
    {"train", cmd_train, "train a model's tensors, or a YAML pipeline's modules"},
    {"plan", cmd_plan, "check a YAML pipeline and count what it would train"},
    {"plugins", cmd_plugins, "list and inspect the PEFT techniques found as plugins"},
    {"typology", cmd_typology, "the PEFT-Ref typology table of every technique found"},
    {"compare", cmd_compare, "train several pipelines or arms and print the PEFT-Ref comparison table"},
    {"merge", cmd_merge, "fold a pipeline's or run's modules into a Hugging Face model"},
    {"export", cmd_export, "write a run's module for Hugging Face PEFT or llama.cpp (GGUF)"},
    {"generate", cmd_generate, "sample text from a model, pipeline or run"},
};

static void usage(FILE *f)
{
    fprintf(f, "usage: peftref [--version] [--help] COMMAND [ARGS]\n\ncommands:\n");
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
        fprintf(f, "  %-10s %s\n", commands[i].name, commands[i].summary);
    fprintf(f, "  %-10s %s\n", "runtime", "print the BLAS kernel, thread and MPI settings in use");
    fprintf(f, "\n'peftref COMMAND --help' describes each command.\n");
}

int main(int argc, char **argv)
{
    runtime_reexec_if_needed(argv);
    /* under mpirun: one rank of a data-parallel job (dist.h) */
    if (dist_init(&argc, &argv))
        return 1;
    if (argc < 2) {
        usage(stderr);
        return 2;
    }
    const char *cmd = argv[1];
    if (strcmp(cmd, "--help") == 0 || strcmp(cmd, "-h") == 0 || strcmp(cmd, "help") == 0) {
        usage(stdout);
        return 0;
    }
    if (strcmp(cmd, "--version") == 0 || strcmp(cmd, "version") == 0) {
        printf("peftref %s\n", pr_version());
        return 0;
    }
    if (strcmp(cmd, "runtime") == 0) {
        char line[256];
        runtime_describe(line, sizeof line);
        if (dist_rank() == 0)
            printf("%s\n", line);
        dist_describe(line, sizeof line);
        if (dist_rank() == 0) {
            printf("%s\n", line);
            cli_runtime_bf16();
        }
        return dist_finish(0);
    }
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
        if (strcmp(cmd, commands[i].name) == 0)
            return dist_finish(commands[i].run(argc - 1, argv + 1));
    fprintf(stderr, "peftref: unknown command '%s'\n", cmd);
    usage(stderr);
    return 2;
}
