/* peftref generate: sample a continuation of a prompt from a model and its
 * modules.
 *
 * Each new token is predicted from the context, at most its last W =
 * max_seq - (virtual positions) tokens.  LLaMA-family models keep a
 * key/value cache (pr_model_decode), so a token costs one position; when
 * the cache is full it restarts from the last W/2 tokens.  GPT-2 models
 * run one forward pass over the context per token.  The logits
 * z of the last position are divided by the temperature, cut to the k
 * largest (top-k; ties keep the lower id), and a token is drawn from
 * softmax(z) with one uniform number of the seeded generator (core/base/rng.h),
 * so a seed gives the same text on every run and platform.  Temperature 0
 * is greedy: the largest logit, the lowest id on ties. */
#include "config.h"

#include <getopt.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "rng.h"

static const char generate_usage[] =
    "usage: peftref generate (--model DIR | PIPELINE.yaml | RUN) --prompt TEXT [--tokens N]\n"
    "                        [--temperature T] [--top-k K] [--seed S] [--set KEY=VALUE ...]\n"
    "\n"
    "Print TEXT followed by N sampled tokens.  The model is a Hugging Face\n"
    "directory (--model), or a pipeline's model with its modules attached (a run\n"
    "directory RUN stands for RUN/pipeline.yaml, the run's trained modules loaded\n"
    "frozen).  Every token is predicted from at most the last max_seq - (virtual\n"
    "positions) tokens of the context.  LLaMA-family models keep a key/value\n"
    "cache (one position per new token; when it is full it restarts from the\n"
    "last half of the window); GPT-2 models recompute the context per token.\n"
    "\n"
    "  --model DIR          Hugging Face directory (GPT-2, Llama, Mistral, Qwen2, Qwen3)\n"
    "  --prompt TEXT        the text to continue (required)\n"
    "  --tokens N           tokens to generate (default 50)\n"
    "  --temperature T      softmax temperature; 0 = greedy (default 1.0)\n"
    "  --top-k K            sample among the K most likely tokens; 0 = all (default 0)\n"
    "  --seed S             sampling seed: same seed, same text (default 1)\n"
    "  --set KEY=VALUE      override a pipeline value\n"
    "  --precision P        f32 (default) or bf16: frozen weights stored in bf16 and\n"
    "                       their products on oneDNN (needs a build with oneDNN)\n"
    "  -h, --help           show this help\n"
    "\n"
    "Exit status: 0 done, 1 error, 2 usage.\n";

typedef struct cand {
    float z;
    int id;
} cand;

static int cand_desc(const void *a, const void *b)
{
    const cand *x = a, *y = b;
    if (x->z != y->z)
        return x->z < y->z ? 1 : -1;
    return (x->id > y->id) - (x->id < y->id);
}

/* The next token from the logits z (V) of the last position. */
static int next_token(const float *z, int V, double temperature, int top_k, pr_rng *rng, cand *c)
{
    if (temperature <= 0.0) {
        int best = 0;
        for (int i = 1; i < V; i++)
            if (z[i] > z[best])
                best = i;
        return best;
    }
    for (int i = 0; i < V; i++)
        c[i] = (cand){ z[i], i };
    int n = V;
    if (top_k > 0 && top_k < V) {
        qsort(c, (size_t)V, sizeof *c, cand_desc);
        n = top_k;
    }
    double mx = -INFINITY;
    for (int i = 0; i < n; i++)
        mx = c[i].z > mx ? c[i].z : mx;
    double sum = 0.0;
    for (int i = 0; i < n; i++)
        sum += exp((c[i].z - mx) / temperature);
    double u = (double)rng_uniform(rng) * sum, acc = 0.0;
    for (int i = 0; i < n; i++) {
        acc += exp((c[i].z - mx) / temperature);
        if (u < acc)
            return c[i].id;
    }
    return c[n - 1].id;
}

static int generate(pr_model *m, const pr_tokenizer *tok, const char *prompt, int n_new, double temperature,
                    int top_k, uint64_t seed)
{
    pr_error err = {0};
    int *ids = NULL;
    size_t n = 0;
    if (pr_tokenizer_encode(tok, prompt, strlen(prompt), &ids, &n, &err)) {
        fprintf(stderr, "peftref generate: %s\n", err.msg);
        return 1;
    }
    const pr_model_config *cfg = pr_model_get_config(m);
    int W = cfg->max_seq - pr_model_virtual_positions(m), V = cfg->vocab_size;
    int *all = malloc((n + (size_t)n_new + 1) * sizeof *all);
    cand *c = malloc((size_t)V * sizeof *c);
    int rc = 0;
    if (!all || !c) {
        fprintf(stderr, "peftref generate: out of memory\n");
        rc = 1;
        goto done;
    }
    memcpy(all, ids, n * sizeof *all);
    size_t len = n;
    if (len == 0) {
        /* nothing to condition on but the start of a text */
        int eot = pr_tokenizer_eot(tok);
        if (eot < 0) {
            fprintf(stderr, "peftref generate: the prompt is empty and this tokenizer has no end-of-text token "
                    "to start from\n");
            rc = 1;
            goto done;
        }
        all[len++] = eot;
    }
    if (W < 1) {
        fprintf(stderr, "peftref generate: the model has no positions left for text\n");
        rc = 1;
        goto done;
    }
    /* the context never needs more than the prompt and the new tokens */
    if ((size_t)W > len + (size_t)n_new)
        W = (int)(len + (size_t)n_new);
    if (cfg->sliding_window > 0 && W > cfg->sliding_window)
        W = cfg->sliding_window;
    pr_model_set_training(m, 0);
    /* With a key/value cache (LLaMA family) each token costs one position;
     * activations are planned for prefill chunks of at most CHUNK tokens. */
    enum { CHUNK = 128 };
    int chunk = W < CHUNK ? W : CHUNK;
    int cached = pr_model_reserve(m, 1, chunk, &err) == PR_OK && pr_model_decode_begin(m, W, &err) == PR_OK;
    if (!cached && pr_model_reserve(m, 1, W, &err)) {
        fprintf(stderr, "peftref generate: %s\n", err.msg);
        rc = 1;
        goto done;
    }
    pr_rng rng;
    rng_seed(&rng, seed);
    for (int k = 0; k < n_new; k++) {
        const float *z;
        if (cached) {
            int pos = pr_model_decode_pos(m);
            if (pos == W) {
                /* the cache is full: keep the last half of the window */
                if (pr_model_decode_begin(m, W, &err)) {
                    fprintf(stderr, "peftref generate: %s\n", err.msg);
                    rc = 1;
                    goto done;
                }
                pos = 0;
            }
            /* feed what the cache lacks: the newest token, or after a
             * reset the last W/2, or at the start the context's last W */
            int left;
            if (pos > 0)
                left = 1;
            else if (k == 0)
                left = len < (size_t)W ? (int)len : W;
            else
                left = W / 2 > 0 ? W / 2 : 1;
            const int *feed = all + len - (size_t)left;
            int rows = 0;
            while (left > 0) {
                rows = left < chunk ? left : chunk;
                if (pr_model_decode(m, feed, rows, &err)) {
                    fprintf(stderr, "peftref generate: %s\n", err.msg);
                    rc = 1;
                    goto done;
                }
                feed += rows;
                left -= rows;
            }
            z = pr_model_logits(m) + (size_t)(rows - 1) * V;
        } else {
            int T = len < (size_t)W ? (int)len : W;
            pr_batch b = {.tokens = all + len - (size_t)T, .targets = NULL, .B = 1, .T = T};
            if (pr_model_forward(m, &b, NULL, &err)) {
                fprintf(stderr, "peftref generate: %s\n", err.msg);
                rc = 1;
                goto done;
            }
            z = pr_model_logits(m) + (size_t)(T - 1) * V;
        }
        all[len++] = next_token(z, V, temperature, top_k, &rng, c);
    }
    char *text = NULL;
    size_t tlen = 0;
    if (pr_tokenizer_decode(tok, all + (len - (size_t)n_new), (size_t)n_new, &text, &tlen, &err)) {
        fprintf(stderr, "peftref generate: %s\n", err.msg);
        rc = 1;
        goto done;
    }
    fputs(prompt, stdout);
    fwrite(text, 1, tlen, stdout);
    fputc('\n', stdout);
    free(text);
done:
    free(c);
    free(all);
    free(ids);
    return rc;
}

int cmd_generate(int argc, char **argv)
{
    static const struct option opts[] = {
        {"model", required_argument, 0, 'm'},  {"prompt", required_argument, 0, 'p'},
        {"tokens", required_argument, 0, 'n'}, {"temperature", required_argument, 0, 't'},
        {"top-k", required_argument, 0, 'k'},  {"seed", required_argument, 0, 'S'},
        {"set", required_argument, 0, 's'},    {"precision", required_argument, 0, 'r'},
        {"help", no_argument, 0, 'h'}, {0, 0, 0, 0}};
    const char **sets = calloc((size_t)argc + 1, sizeof *sets);
    if (!sets) {
        fprintf(stderr, "peftref generate: out of memory\n");
        return 1;
    }
    const char *model_dir = NULL, *prompt = NULL;
    int n_sets = 0, n_new = 50, top_k = 0, seed = 1, c, rc = 2, precision = PR_PRECISION_F32;
    double temperature = 1.0;
    optind = 1;
    opterr = 0;
    while ((c = getopt_long(argc, argv, ":h", opts, NULL)) != -1) {
        switch (c) {
        case 'm': model_dir = optarg; break;
        case 'p': prompt = optarg; break;
        case 's': sets[n_sets++] = optarg; break;
        case 'r': if ((precision = cli_parse_precision("generate", optarg)) < 0) goto out; break;
        case 'n': if (cli_parse_int("generate", "--tokens", optarg, 0, 1 << 20, &n_new)) goto out; break;
        case 'k': if (cli_parse_int("generate", "--top-k", optarg, 0, 1 << 30, &top_k)) goto out; break;
        case 'S': if (cli_parse_int("generate", "--seed", optarg, 0, 2147483647, &seed)) goto out; break;
        case 't': {
            char *end = NULL;
            temperature = strtod(optarg, &end);
            if (end == optarg || *end || !(temperature >= 0.0 && temperature <= 1000.0)) {
                fprintf(stderr, "peftref generate: --temperature expects a number in [0, 1000], got '%s'\n", optarg);
                goto out;
            }
            break;
        }
        case 'h': fputs(generate_usage, stdout); rc = 0; goto out;
        case ':':
            fprintf(stderr, "peftref generate: option '%s' needs a value\n", argv[optind - 1]);
            goto out;
        default:
            fprintf(stderr, "peftref generate: unknown option '%s' (see peftref generate --help)\n", argv[optind - 1]);
            goto out;
        }
    }
    if (!prompt || (!!model_dir == (argc - optind == 1)) || argc - optind > 1) {
        fprintf(stderr, "peftref generate: give --prompt TEXT and one of --model DIR, a pipeline or a run "
                "directory (see --help)\n");
        goto out;
    }
    pr_registry *reg = NULL;
    pr_pipeline *pipe = NULL;
    pr_model *m = NULL;
    pr_tokenizer *tok = NULL;
    pr_error err = {0};
    if (model_dir) {
        rc = 0;
        if (pr_model_load_hf(model_dir, &m, &err) || cli_load_tokenizer(model_dir, m, &tok, &err)) {
            fprintf(stderr, "peftref generate: %s\n", err.msg);
            rc = 1;
        }
    } else {
        rc = cli_pipeline_build("generate", argv[optind], sets, n_sets, &reg, &pipe, &m, &tok);
    }
    if (rc == 0 && precision != PR_PRECISION_F32 && pr_model_set_precision(m, precision, &err)) {
        fprintf(stderr, "peftref generate: %s\n", err.msg);
        rc = 1;
    }
    if (rc == 0)
        rc = generate(m, tok, prompt, n_new, temperature, top_k, (uint64_t)seed);
    pr_tokenizer_free(tok);
    pr_model_free(m);
    pr_pipeline_free(pipe);
    pr_registry_free(reg);
out:
    free(sets);
    return rc;
}
