/* peftref plugins check: the conformance checker for a plugin file. */
#include "config.h"

#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "check.h"

static const char check_usage[] =
    "usage: peftref plugins check PATH [--family gpt2|llama] [--verbose] [--technique NAME]\n"
    "                              [--probes N] [--timeout S]\n"
    "\n"
    "Check that every technique in plugin file PATH (a directory: every plugin\n"
    "in it) keeps the plugin ABI's promises, on a tiny random model (2 layers,\n"
    "d_model 32, 4 heads, vocabulary 64, batch 2 x 6): GPT-2, or with --family\n"
    "llama a llama-tiny (RMSNorm, RoPE, SwiGLU, 4 query heads over 2 key/value\n"
    "heads, attention and MLP biases; the second shape of `params` a Qwen2):\n"
    "  gradient/SITE  at each site it supports, one at a time: the gradients of\n"
    "                 its parameters, and of the base tensors upstream of the\n"
    "                 site (which need its input gradient), against central\n"
    "                 finite differences: |fd - g| <= 1e-4 + 5e-2 max(|fd|,|g|)\n"
    "  params         declared, allocated and registered parameter counts agree\n"
    "                 on two model shapes\n"
    "  determinism    one seed gives bit-identical parameters, losses and\n"
    "                 gradients, attach after attach and pass after pass\n"
    "  accumulation   backward adds into gradients (two passes = twice one)\n"
    "  save-load      saved and reloaded parameters give bit-identical logits\n"
    "  options        out-of-range and malformed option values are rejected,\n"
    "                 the defaults accepted\n"
    "  finite         from finite inputs, forward writes only finite values at\n"
    "                 every site (eval and training); a failure names the site\n"
    "                 and the first non-finite output element\n"
    "Each check runs in its own process: a crash, abort or hang fails that\n"
    "check only.  One line per check, PASS or FAIL, then a summary.\n"
    "\n"
    "  --family F           gpt2 (default) or llama: the test models' family\n"
    "  -v, --verbose        per-tensor and per-option details\n"
    "  --technique NAME     check only technique NAME\n"
    "  --probes N           entries probed per tensor (default 6)\n"
    "  --timeout S          seconds allowed per check (default 60)\n"
    "  -h, --help           show this help\n"
    "\n"
    "Exit status: 0 when every check passes, 1 when one fails, 2 on a usage\n"
    "error.\n";

int cmd_plugins_check(int argc, char **argv)
{
    static const struct option opts[] = {{"verbose", no_argument, 0, 'v'},
                                         {"technique", required_argument, 0, 't'},
                                         {"probes", required_argument, 0, 'p'},
                                         {"timeout", required_argument, 0, 'T'},
                                         {"family", required_argument, 0, 'f'},
                                         {"help", no_argument, 0, 'h'},
                                         {0, 0, 0, 0}};
    check_options o;
    memset(&o, 0, sizeof o);
    optind = 1;
    opterr = 0;
    int c;
    while ((c = getopt_long(argc, argv, ":vh", opts, NULL)) != -1) {
        switch (c) {
        case 'v': o.verbose = 1; break;
        case 't': o.technique = optarg; break;
        case 'f':
            if (strcmp(optarg, "gpt2") == 0) {
                o.family = PR_FAMILY_GPT2;
            } else if (strcmp(optarg, "llama") == 0) {
                o.family = PR_FAMILY_LLAMA;
            } else {
                fprintf(stderr, "peftref plugins check: --family is gpt2 or llama, not '%s'\n", optarg);
                return 2;
            }
            break;
        case 'p':
            if (cli_parse_int("plugins check", "--probes", optarg, 1, 1000, &o.probes))
                return 2;
            break;
        case 'T':
            if (cli_parse_int("plugins check", "--timeout", optarg, 1, 86400, &o.timeout))
                return 2;
            break;
        case 'h': fputs(check_usage, stdout); return 0;
        case ':':
            fprintf(stderr, "peftref plugins check: option '%s' needs a value\n%s", argv[optind - 1], check_usage);
            return 2;
        default:
            fprintf(stderr, "peftref plugins check: unknown option '%s'\n%s", argv[optind - 1], check_usage);
            return 2;
        }
    }
    if (argc - optind != 1) {
        if (argc - optind > 1)
            fprintf(stderr, "peftref plugins check: unexpected argument '%s'\n%s", argv[optind + 1], check_usage);
        else
            fprintf(stderr, "peftref plugins check: give one plugin file PATH\n%s", check_usage);
        return 2;
    }
    pr_error err = {0};
    int n_checks = 0, n_failed = 0;
    if (check_plugin_file(argv[optind], &o, stdout, &n_checks, &n_failed, &err) != PR_OK) {
        fprintf(stderr, "peftref plugins check: %s\n", err.msg);
        return 1;
    }
    if (fflush(stdout) != 0 || ferror(stdout)) {
        fprintf(stderr, "peftref plugins check: writing to standard output failed\n");
        return 1;
    }
    return n_failed ? 1 : 0;
}
