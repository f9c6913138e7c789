/* peftref tokenize: print the token ids of a file's bytes. */
#include "config.h"

#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"

static const char tokenize_usage[] =
    "usage: peftref tokenize --model DIR FILE\n"
    "\n"
    "Print the token ids of FILE's bytes (\"-\" for stdin) as space-separated\n"
    "decimals on one line.  No special tokens are added (no bos, no eos), but\n"
    "special tokens written in the text, such as <|begin_of_text|> or </s>,\n"
    "become their ids when DIR has a tokenizer.json.  DIR's tokenizer is:\n"
    "  - Hugging Face tokenizers' BPE when it holds tokenizer.json (Llama 3,\n"
    "    Qwen2/Qwen3, Llama 2 / Mistral style files; tokenizer_config.json,\n"
    "    when present, gives bos and eos);\n"
    "  - GPT-2 BPE when it holds vocab.json and merges.txt;\n"
    "  - the byte tokenizer (ids 0..255) when config.json says\n"
    "    \"peftref_tokenizer\": \"byte\" or when none of these files is there.\n"
    "See docs/tokenizer.md.\n"
    "\n"
    "  --model DIR   model or tokenizer directory\n"
    "  -h, --help    show this help\n";

int cmd_tokenize(int argc, char **argv)
{
    static const struct option opts[] = {
        {"model", required_argument, 0, 'm'}, {"help", no_argument, 0, 'h'}, {0, 0, 0, 0}};
    const char *model_dir = NULL;
    optind = 1;
    opterr = 0;
    int c;
    while ((c = getopt_long(argc, argv, ":h", opts, NULL)) != -1) {
        switch (c) {
        case 'm': model_dir = optarg; break;
        case 'h': fputs(tokenize_usage, stdout); return 0;
        case ':':
            fprintf(stderr, "peftref tokenize: option '%s' needs a value\n%s", argv[optind - 1], tokenize_usage);
            return 2;
        default:
            fprintf(stderr, "peftref tokenize: unknown option '%s'\n%s", argv[optind - 1], tokenize_usage);
            return 2;
        }
    }
    if (!model_dir) {
        fprintf(stderr, "peftref tokenize: --model DIR is required\n%s", tokenize_usage);
        return 2;
    }
    if (argc - optind != 1) {
        if (optind < argc)
            fprintf(stderr, "peftref tokenize: unexpected argument '%s'\n%s", argv[optind + 1], tokenize_usage);
        else
            fprintf(stderr, "peftref tokenize: give one FILE (\"-\" for stdin)\n%s", tokenize_usage);
        return 2;
    }
    const char *path = argv[optind];

    pr_error err = {0};
    pr_tokenizer *tok = NULL;
    char *text = NULL;
    int *ids = NULL;
    size_t len = 0, n = 0;
    int rc = 1;
    if (pr_tokenizer_load(model_dir, &tok, &err) || cli_read_file(path, &text, &len, &err)) {
        fprintf(stderr, "peftref tokenize: %s\n", err.msg);
        goto done;
    }
    if (pr_tokenizer_encode(tok, text, len, &ids, &n, &err)) {
        fprintf(stderr, "peftref tokenize: %s: %s\n", path, err.msg);
        goto done;
    }
    for (size_t i = 0; i < n; i++)
        printf(i ? " %d" : "%d", ids[i]);
    putchar('\n');
    if (fflush(stdout) != 0 || ferror(stdout)) {
        fprintf(stderr, "peftref tokenize: writing to standard output: %s\n", strerror(errno));
        goto done;
    }
    rc = 0;
done:
    free(ids);
    free(text);
    pr_tokenizer_free(tok);
    return rc;
}
