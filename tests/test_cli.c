/* Tests of evaluation windows and of the peftref command-line program. */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "peftref/peftref.h"

static pr_model *tiny_model(void)
{
    pr_model_config cfg;
    assert_int_equal(pr_config_preset("gpt2-tiny", &cfg), PR_OK);
    cfg.n_layers = 1;
    cfg.max_seq = 16;
    cfg.seed = 7;
    pr_model *m = NULL;
    pr_error err = {0};
    assert_int_equal(pr_model_create(&cfg, &m, &err), PR_OK);
    return m;
}

/* Windows per the eval contract, recomputed one window at a time with the
 * cross-entropy taken from the logits in double precision. */
static double reference_loss(pr_model *m, const int *ids, size_t n, int T, int64_t *tokens)
{
    pr_error err = {0};
    int V = pr_model_get_config(m)->vocab_size;
    size_t W = (n - 1) / (size_t)T;
    assert_int_equal(pr_model_reserve(m, 1, T, &err), PR_OK);
    double sum = 0.0;
    for (size_t w = 0; w < W; w++) {
        pr_batch b = {.tokens = ids + w * T, .targets = NULL, .B = 1, .T = T};
        assert_int_equal(pr_model_forward(m, &b, NULL, &err), PR_OK);
        const float *logits = pr_model_logits(m);
        for (int t = 0; t < T; t++) {
            const float *row = logits + (size_t)t * V;
            double mx = row[0];
            for (int v = 1; v < V; v++)
                mx = row[v] > mx ? row[v] : mx;
            double z = 0.0;
            for (int v = 0; v < V; v++)
                z += exp(row[v] - mx);
            int target = ids[w * T + t + 1];
            sum += -(row[target] - mx - log(z));
        }
    }
    *tokens = (int64_t)W * T;
    return sum / (double)(W * T);
}

static void test_eval_windows_match_reference(void **state)
{
    (void)state;
    pr_model *m = tiny_model();
    int ids[83];
    for (int i = 0; i < 83; i++)
        ids[i] = (i * 37 + 11) % 256;
    const int T = 8; /* W = floor(82/8) = 10 windows, last 2 tokens unused */
    int64_t ref_tokens = 0;
    double ref = reference_loss(m, ids, 83, T, &ref_tokens);
    for (int batch = 1; batch <= 4; batch++) {
        pr_eval_result r;
        pr_error err = {0};
        assert_int_equal(pr_eval_tokens(m, ids, 83, T, batch, &r, &err), PR_OK);
        assert_int_equal(r.tokens, 80);
        assert_int_equal(r.windows, 10);
        assert_int_equal(r.tokens, ref_tokens);
        /* float32 model vs double log-softmax over 256 classes: 1e-5 relative */
        assert_true(fabs(r.loss - ref) <= 1e-5 * fabs(ref));
        assert_true(fabs(r.perplexity - exp(r.loss)) <= 1e-9 * r.perplexity);
    }
    pr_model_free(m);
}

static void test_eval_too_few_tokens(void **state)
{
    (void)state;
    pr_model *m = tiny_model();
    int ids[8] = {1, 2, 3, 4, 5, 6, 7, 8};
    pr_eval_result r;
    pr_error err = {0};
    assert_int_not_equal(pr_eval_tokens(m, ids, 8, 8, 1, &r, &err), PR_OK);
    assert_non_null(strstr(err.msg, "need at least 9"));
    assert_int_equal(pr_eval_tokens(m, ids, 8, 7, 1, &r, &err), PR_OK);
    assert_int_equal(r.tokens, 7);
    pr_model_free(m);
}

/* Run the program; capture stdout+stderr into out; return exit status. */
static int run(char *out, size_t size, const char *fmt, ...)
{
    char cmd[2048];
    va_list ap;
    va_start(ap, fmt);
    int k = snprintf(cmd, sizeof cmd, "%s ", PEFTREF_BIN);
    vsnprintf(cmd + k, sizeof cmd - (size_t)k, fmt, ap);
    va_end(ap);
    strncat(cmd, " 2>&1", sizeof cmd - strlen(cmd) - 1);
    FILE *p = popen(cmd, "r");
    assert_non_null(p);
    size_t n = fread(out, 1, size - 1, p);
    out[n] = '\0';
    int st = pclose(p);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

static char tmpdir[256];

static int setup_dir(void **state)
{
    (void)state;
    snprintf(tmpdir, sizeof tmpdir, "/tmp/peftref-cli-XXXXXX");
    if (!mkdtemp(tmpdir))
        return -1;
    char path[512];
    snprintf(path, sizeof path, "%s/config.json", tmpdir);
    FILE *f = fopen(path, "w");
    if (!f)
        return -1;
    fputs("{\"peftref_tokenizer\": \"byte\"}\n", f);
    fclose(f);
    snprintf(path, sizeof path, "%s/hi.txt", tmpdir);
    f = fopen(path, "w");
    if (!f)
        return -1;
    fputs("Hi!\n", f);
    fclose(f);
    snprintf(path, sizeof path, "%s/text.txt", tmpdir);
    f = fopen(path, "w");
    if (!f)
        return -1;
    for (int i = 0; i < 40; i++)
        fputs("The quick brown fox jumps over the lazy dog.\n", f);
    fclose(f);
    return 0;
}

static int teardown_dir(void **state)
{
    (void)state;
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf %s", tmpdir);
    return system(cmd) == 0 ? 0 : -1;
}

static void test_cli_help(void **state)
{
    (void)state;
    char out[8192];
    assert_int_equal(run(out, sizeof out, "--help"), 0);
    assert_non_null(strstr(out, "eval"));
    assert_non_null(strstr(out, "tokenize"));
    assert_int_equal(run(out, sizeof out, "eval --help"), 0);
    assert_non_null(strstr(out, "--seq-len"));
    assert_int_equal(run(out, sizeof out, "tokenize --help"), 0);
    assert_int_equal(run(out, sizeof out, "no-such-command"), 2);
    assert_non_null(strstr(out, "unknown command 'no-such-command'"));
    assert_int_equal(run(out, sizeof out, "eval --preset gpt2-tiny"), 2);
    assert_int_equal(run(out, sizeof out, "eval --preset gpt2-tiny --data x --seq-len abc"), 2);
    assert_non_null(strstr(out, "--seq-len expects an integer"));
}

static void test_cli_tokenize_byte(void **state)
{
    (void)state;
    char out[8192];
    assert_int_equal(run(out, sizeof out, "tokenize --model %s - < /dev/null", tmpdir), 0);
    assert_string_equal(out, "\n");
    assert_int_equal(run(out, sizeof out, "tokenize --model %s - < %s/hi.txt", tmpdir, tmpdir), 0);
    assert_string_equal(out, "72 105 33 10\n");
}

static void test_cli_eval_json(void **state)
{
    (void)state;
    char out[8192];
    /* 40 lines of 45 bytes = 1800 tokens; T = 32 -> W = floor(1799/32) = 56 */
    assert_int_equal(run(out, sizeof out, "eval --preset gpt2-tiny --data %s/text.txt --seq-len 32 --json",
                         tmpdir), 0);
    assert_non_null(strstr(out, "\"tokens\": 1792"));
    assert_non_null(strstr(out, "\"windows\": 56"));
    const char *l = strstr(out, "\"loss\": ");
    const char *p = strstr(out, "\"perplexity\": ");
    assert_non_null(l);
    assert_non_null(p);
    double loss = atof(l + 8), ppl = atof(p + 14);
    /* a random 256-way model scores close to uniform: loss near ln 256 */
    assert_true(loss > 0.5 * log(256.0) && loss < 2.0 * log(256.0));
    assert_true(fabs(ppl - exp(loss)) <= 1e-4 * ppl);
    /* too little text for one window */
    assert_int_equal(run(out, sizeof out, "eval --preset gpt2-tiny --data %s/config.json --seq-len 60",
                         tmpdir), 1);
    assert_non_null(strstr(out, "too few"));
    assert_int_equal(run(out, sizeof out, "eval --model %s/missing --data %s/text.txt --seq-len 8",
                         tmpdir, tmpdir), 1);
}

/* --save into a directory that already holds a model is refused before
 * training starts, naming the file; --force replaces it. */
static void test_cli_save_refuses_existing(void **state)
{
    (void)state;
    char out[8192], path[600];
    const char *args = "train --preset gpt2-tiny --layers 1 --d-model 32 --heads 2 --max-seq 32 --data %s/text.txt "
                       "--out %s/run%s --steps 1 --batch 2 --seq-len 16 --quiet --save %s%s";
    assert_int_not_equal(run(out, sizeof out, args, tmpdir, tmpdir, "1", tmpdir, ""), 0);
    assert_non_null(strstr(out, "already holds a model"));
    assert_non_null(strstr(out, "config.json"));
    snprintf(path, sizeof path, "%s/run1/metrics.jsonl", tmpdir);
    assert_int_not_equal(access(path, F_OK), 0);   /* nothing trained */
    int rc = run(out, sizeof out, args, tmpdir, tmpdir, "2", tmpdir, "/saved");
    if (rc)
        fprintf(stderr, "%s\n", out);
    assert_int_equal(rc, 0);
    snprintf(path, sizeof path, "%s/saved/model.safetensors", tmpdir);
    assert_int_equal(access(path, F_OK), 0);
    /* again into it: refused; with --force: replaced */
    assert_int_not_equal(run(out, sizeof out, args, tmpdir, tmpdir, "3", tmpdir, "/saved"), 0);
    assert_non_null(strstr(out, "already holds a model"));
    assert_int_equal(run(out, sizeof out, args, tmpdir, tmpdir, "4", tmpdir, "/saved --force"), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_eval_windows_match_reference),
        cmocka_unit_test(test_eval_too_few_tokens),
        cmocka_unit_test(test_cli_help),
        cmocka_unit_test(test_cli_tokenize_byte),
        cmocka_unit_test(test_cli_eval_json),
        cmocka_unit_test(test_cli_save_refuses_existing),
    };
    return cmocka_run_group_tests(tests, setup_dir, teardown_dir);
}
