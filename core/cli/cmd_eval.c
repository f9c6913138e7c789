/* peftref eval: perplexity of a model on a text file (windows as in eval.h). */
#include "config.h"

#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cli.h"
#include "runtime.h"

static const char eval_usage[] =
    "usage: peftref eval (--model DIR | --preset NAME [--seed N] [--tokenizer DIR] |\n"
    "                     --pipeline (PIPELINE.yaml | RUN) [--set KEY=VALUE ...])\n"
    "                    --data FILE --seq-len T [--batch N] [--json]\n"
    "\n"
    "Evaluate a causal language model on a text file.  FILE's bytes (\"-\" for\n"
    "stdin) are tokenized as one string by the model's tokenizer, adding no\n"
    "special tokens.  With N tokens there are W = floor((N-1)/T) windows; window\n"
    "k feeds tokens k*T..k*T+T-1 and scores the next token at each position.\n"
    "Prints the mean cross-entropy (nats) over the W*T targets and e^loss.\n"
    "\n"
    "On a classification pipeline or run, scores its head instead: over the\n"
    "run's validation split, or the JSONL records of --data FILE, the loss,\n"
    "accuracy, macro-F1 and per-label counts (--json: {\"loss\", \"accuracy\",\n"
    "\"macro_f1\", \"n\", \"per_class\": {LABEL: {\"n\", \"correct\"}}}).\n"
    "\n"
    "  --model DIR       Hugging Face GPT-2 directory (config.json, model.safetensors\n"
    "                    or model.safetensors.index.json, tokenizer files)\n"
    "  --preset NAME     a built-in shape with seeded random init (gpt2-tiny,\n"
    "                    gpt2-small, llama-tiny, tinyllama-1.1b, ...)\n"
    "  --seed N          seed for --preset's random init (default: the preset's)\n"
    "  --tokenizer DIR   directory with the tokenizer for --preset (vocab.json, merges.txt)\n"
    "  --pipeline P      a pipeline's model with its modules attached; a run directory\n"
    "                    RUN stands for RUN/pipeline.yaml (its modules loaded frozen);\n"
    "                    --seq-len defaults to the pipeline's train.seq_len\n"
    "  --set KEY=VALUE   override a value of --pipeline\n"
    "  --data FILE       text to evaluate on (\"-\" = stdin)\n"
    "  --seq-len T       window length in tokens (required)\n"
    "  --batch N         windows per forward pass (default 4)\n"
    "  --json            print one JSON object: loss, perplexity, tokens, windows, seq_len\n"
    "  --precision P     f32 (default) or bf16: frozen weights stored in bf16 and\n"
    "                    their products on oneDNN (needs a build with oneDNN)\n"
    "  -h, --help        show this help\n";

int cmd_eval(int argc, char **argv)
{
    static const struct option opts[] = {
        {"model", required_argument, 0, 'm'},  {"preset", required_argument, 0, 'p'},
        {"seed", required_argument, 0, 's'},   {"tokenizer", required_argument, 0, 'k'},
        {"data", required_argument, 0, 'd'},   {"seq-len", required_argument, 0, 't'},
        {"batch", required_argument, 0, 'b'},  {"json", no_argument, 0, 'j'},
        {"pipeline", required_argument, 0, 'P'}, {"set", required_argument, 0, 'S'},
        {"precision", required_argument, 0, 'r'},
        {"help", no_argument, 0, 'h'},         {0, 0, 0, 0}};
    const char *model_dir = NULL, *preset = NULL, *tok_dir = NULL, *data_path = NULL;
    int T = 0, batch = 4, json = 0, seed = -1, n_sets = 0, precision = PR_PRECISION_F32;
    const char *pipeline = NULL;
    const char *sets[64];
    optind = 1;
    opterr = 0;
    int c;
    while ((c = getopt_long(argc, argv, ":h", opts, NULL)) != -1) {
        switch (c) {
        case 'm': model_dir = optarg; break;
        case 'p': preset = optarg; break;
        case 'k': tok_dir = optarg; break;
        case 'd': data_path = optarg; break;
        case 's': if (cli_parse_int("eval", "--seed", optarg, 0, 2147483647, &seed)) return 2; break;
        case 't': if (cli_parse_int("eval", "--seq-len", optarg, 1, 1 << 20, &T)) return 2; break;
        case 'b': if (cli_parse_int("eval", "--batch", optarg, 1, 4096, &batch)) return 2; break;
        case 'j': json = 1; break;
        case 'r':
            if ((precision = cli_parse_precision("eval", optarg)) < 0) return 2;
            break;
        case 'P': pipeline = optarg; break;
        case 'S':
            if (n_sets == 64) {
                fprintf(stderr, "peftref eval: at most 64 --set options\n");
                return 2;
            }
            sets[n_sets++] = optarg;
            break;
        case 'h': fputs(eval_usage, stdout); return 0;
        case ':':
            fprintf(stderr, "peftref eval: option '%s' needs a value\n%s", argv[optind - 1], eval_usage);
            return 2;
        default:
            fprintf(stderr, "peftref eval: unknown option '%s'\n%s", argv[optind - 1], eval_usage);
            return 2;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "peftref eval: unexpected argument '%s'\n%s", argv[optind], eval_usage);
        return 2;
    }
    if (!!model_dir + !!preset + !!pipeline != 1) {
        fprintf(stderr, "peftref eval: give exactly one of --model DIR, --preset NAME or --pipeline P\n%s",
                eval_usage);
        return 2;
    }
    if ((!data_path && !pipeline) || (T == 0 && !pipeline)) {
        fprintf(stderr, "peftref eval: --data FILE and --seq-len T are required\n%s", eval_usage);
        return 2;
    }
    runtime_warn_generic_blas();

    pr_error err = {0};
    pr_model *m = NULL;
    pr_tokenizer *tok = NULL;
    char *text = NULL;
    int *ids = NULL;
    size_t len = 0, n = 0;
    int rc = 1;
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    pr_registry *reg = NULL;
    pr_pipeline *pipe = NULL;
    if (pipeline) {
        if ((rc = cli_pipeline_build("eval", pipeline, sets, n_sets, &reg, &pipe, &m, &tok)))
            goto done;
        rc = 1;
        if (precision != PR_PRECISION_F32 && pr_model_set_precision(m, precision, &err)) {
            fprintf(stderr, "peftref eval: %s\n", err.msg);
            goto done;
        }
        pr_train_config tc;
        pr_pipeline_train_config(pipe, &tc);
        if (tc.task && strcmp(tc.task, "classification") == 0) {
            /* the run's own sequence length and batch: its validation accuracy, exactly */
            rc = cli_eval_classification(pipeline, pipe, m, tok, data_path, T ? T : tc.seq_len, tc.batch, json);
            goto done;
        }
        if (T == 0)
            T = tc.seq_len;
        if (!data_path) {
            fprintf(stderr, "peftref eval: --data FILE is required for a language-model pipeline\n");
            rc = 2;
            goto done;
        }
    }
    if ((!pipeline && (cli_load_model(model_dir, preset, seed, &m, &err) ||
                       cli_load_tokenizer(model_dir ? model_dir : tok_dir, m, &tok, &err))) ||
        (precision != PR_PRECISION_F32 && pr_model_set_precision(m, precision, &err)) ||
        cli_read_file(data_path, &text, &len, &err) ||
        pr_tokenizer_encode(tok, text, len, &ids, &n, &err)) {
        fprintf(stderr, "peftref eval: %s\n", err.msg);
        goto done;
    }
    pr_eval_result res;
    if (pr_eval_tokens(m, ids, n, T, batch, &res, &err)) {
        fprintf(stderr, "peftref eval: %s: %s\n", data_path, err.msg);
        goto done;
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double secs = (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec);
    if (json)
        printf("{\"loss\": %.6f, \"perplexity\": %.6f, \"tokens\": %lld, \"windows\": %lld, "
               "\"seq_len\": %d, \"seconds\": %.3f}\n",
               res.loss, res.perplexity, (long long)res.tokens, (long long)res.windows, T, secs);
    else
        printf("loss %.6f nats  perplexity %.4f  tokens %lld  windows %lld x %d  (%.2f s)\n", res.loss,
               res.perplexity, (long long)res.tokens, (long long)res.windows, T, secs);
    rc = 0;
done:
    free(ids);
    free(text);
    pr_tokenizer_free(tok);
    pr_model_free(m);
    pr_pipeline_free(pipe);
    pr_registry_free(reg);
    return rc;
}
