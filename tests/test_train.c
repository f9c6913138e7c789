/* Tests of the training engine: loss masking and padding, classification,
 * NaN handling, and exact resume after SIGKILL. */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <fcntl.h>
#include <unistd.h>

#include "peftref/peftref.h"

#define DATA_TEXT TEST_SRCDIR "/data/train/corpus.txt"

static pr_model *tiny(int layers, int seq)
{
    pr_model_config cfg;
    assert_int_equal(pr_config_preset("gpt2-tiny", &cfg), PR_OK);
    cfg.n_layers = layers;
    cfg.d_model = 32;
    cfg.n_heads = cfg.n_kv_heads = 2;
    cfg.d_head = 16;
    cfg.d_ff = 128;
    cfg.max_seq = seq;
    cfg.seed = 11;
    pr_model *m = NULL;
    pr_error err = {0};
    assert_int_equal(pr_model_create(&cfg, &m, &err), PR_OK);
    return m;
}

/* Padding and masked (-1) targets must not count: a padded batch of two
 * rows gives the same loss and gradients as the rows' scored tokens alone,
 * whatever the padding tokens are. */
static void test_padding_and_masking_do_not_score(void **state)
{
    (void)state;
    enum { T = 12 };
    pr_model *m = tiny(1, T);
    pr_error err = {0};
    assert_int_equal(pr_model_set_trainable(m, "*", 1, &err), PR_OK);
    assert_int_equal(pr_model_reserve(m, 2, T, &err), PR_OK);
    int tokens[2 * T], targets[2 * T];
    for (int i = 0; i < 2 * T; i++) {
        tokens[i] = (i * 29 + 5) % 256;
        targets[i] = (i * 31 + 7) % 256;
    }
    /* row 0: 4 prompt positions masked; row 1: 5 real tokens then padding */
    for (int t = 0; t < 4; t++)
        targets[t] = -1;
    for (int t = 5; t < T; t++)
        targets[T + t] = -1;
    pr_batch b = {.tokens = tokens, .targets = targets, .B = 2, .T = T};
    float loss1;
    assert_int_equal(pr_model_forward(m, &b, &loss1, &err), PR_OK);
    assert_int_equal(pr_model_scored_tokens(m), (T - 4) + 5);
    pr_model_zero_grad(m);
    assert_int_equal(pr_model_backward(m, &err), PR_OK);
    const pr_tensor_info *wte = pr_model_find_tensor(m, "wte.weight");
    size_t n = (size_t)wte->numel;
    float *g1 = malloc(n * sizeof(float));
    memcpy(g1, wte->grad, n * sizeof(float));

    /* change every padding token and every masked target's value */
    for (int t = 5; t < T; t++) {
        tokens[T + t] = (tokens[T + t] + 100) % 256;
        targets[T + t] = -1;
    }
    for (int t = 0; t < 4; t++)
        targets[t] = -1;
    float loss2;
    assert_int_equal(pr_model_forward(m, &b, &loss2, &err), PR_OK);
    pr_model_zero_grad(m);
    assert_int_equal(pr_model_backward(m, &err), PR_OK);
    /* causal attention: right padding cannot reach earlier positions, so
     * the result is bit-identical */
    assert_true(loss1 == loss2);
    assert_memory_equal(g1, wte->grad, n * sizeof(float));

    /* the loss equals the mean of per-position cross-entropies over the
     * scored positions only, recomputed from the logits in double */
    const float *logits = pr_model_logits(m);
    int V = pr_model_get_config(m)->vocab_size;
    double sum = 0.0;
    int cnt = 0;
    for (int i = 0; i < 2 * T; i++) {
        if (targets[i] < 0)
            continue;
        const float *row = logits + (size_t)i * V;
        double mx = row[0], z = 0.0;
        for (int v = 1; v < V; v++)
            mx = row[v] > mx ? row[v] : mx;
        for (int v = 0; v < V; v++)
            z += exp(row[v] - mx);
        sum += -(row[targets[i]] - mx - log(z));
        cnt++;
    }
    assert_int_equal(cnt, 13);
    assert_true(fabs(sum / cnt - loss2) <= 1e-5 * fabs(loss2)); /* float vs double: 1e-5 rel */

    /* scoring a masked position would change the loss */
    targets[0] = 3;
    float loss3;
    assert_int_equal(pr_model_forward(m, &b, &loss3, &err), PR_OK);
    assert_true(loss3 != loss2);
    free(g1);
    pr_model_free(m);
}

static char workdir[256];

static int setup_dir(void **state)
{
    (void)state;
    snprintf(workdir, sizeof workdir, "/tmp/peftref-train-XXXXXX");
    return mkdtemp(workdir) ? 0 : -1;
}

static int teardown_dir(void **state)
{
    (void)state;
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf %s", workdir);
    return system(cmd) == 0 ? 0 : -1;
}

static void base_config(pr_train_config *tc, const char *out, int steps)
{
    pr_train_config_default(tc);
    tc->train_path = DATA_TEXT;
    tc->steps = steps;
    tc->batch = 4;
    tc->seq_len = 32;
    tc->lr = 3e-3f;
    tc->warmup = 2;
    tc->eval_batches = 4;
    tc->out_dir = out;
    tc->quiet = 1;
}

static void test_full_finetuning_lowers_val_loss(void **state)
{
    (void)state;
    pr_model *m = tiny(2, 32);
    pr_tokenizer *tok = NULL;
    pr_error err = {0};
    assert_int_equal(pr_tokenizer_byte(&tok, &err), PR_OK);
    assert_int_equal(pr_model_set_trainable(m, "*", 1, &err), PR_OK);
    char out[300];
    snprintf(out, sizeof out, "%s/full", workdir);
    pr_train_config tc;
    base_config(&tc, out, 30);
    pr_train_result r;
    int rc = pr_train(m, tok, &tc, &r, &err);
    if (rc)
        fprintf(stderr, "%s\n", err.msg);
    assert_int_equal(rc, PR_OK);
    assert_int_equal(r.steps_done, 30);
    /* random init scores ~ln 256 = 5.55; 30 steps must learn byte statistics */
    assert_true(r.initial_val_loss > 5.0);
    assert_true(r.final_val_loss < r.initial_val_loss - 1.0);
    assert_int_equal(r.trainable_params, pr_model_param_count(m));
    /* a second run into the same directory without resume is refused */
    assert_int_equal(pr_train(m, tok, &tc, &r, &err), PR_ERR_INVALID);
    assert_non_null(strstr(err.msg, "resume"));
    pr_tokenizer_free(tok);
    pr_model_free(m);
}

static void test_classification_head_learns(void **state)
{
    (void)state;
    char path[300], val[300];
    snprintf(path, sizeof path, "%s/cls.jsonl", workdir);
    snprintf(val, sizeof val, "%s/cls_val.jsonl", workdir);
    FILE *f = fopen(path, "w"), *g = fopen(val, "w");
    assert_non_null(f);
    assert_non_null(g);
    /* label = which letter the text repeats, after a shared prefix */
    for (int i = 0; i < 120; i++) {
        FILE *o = i < 96 ? f : g;
        int lab = (i * 7) % 3;
        char c = (char)("xyz"[lab]);
        fprintf(o, "{\"text\": \"item %d: %c%c%c%c\", \"label\": \"%c\"}\n", i % 10, c, c, c, c, c);
    }
    fclose(f);
    fclose(g);
    pr_model *m = tiny(1, 32);
    pr_tokenizer *tok = NULL;
    pr_error err = {0};
    assert_int_equal(pr_tokenizer_byte(&tok, &err), PR_OK);
    assert_int_equal(pr_model_set_trainable(m, "*", 1, &err), PR_OK);
    char out[300];
    snprintf(out, sizeof out, "%s/cls", workdir);
    pr_train_config tc;
    base_config(&tc, out, 40);
    tc.task = "classification";
    tc.train_path = path;
    tc.val_path = val;
    tc.batch = 8;
    tc.eval_batches = 0;
    pr_train_result r;
    int rc = pr_train(m, tok, &tc, &r, &err);
    if (rc)
        fprintf(stderr, "%s\n", err.msg);
    assert_int_equal(rc, PR_OK);
    assert_true(r.final_val_loss < r.initial_val_loss);
    assert_true(r.final_val_accuracy >= 0.9); /* chance is 1/3 */
    pr_tokenizer_free(tok);
    pr_model_free(m);
}

static int read_file(const char *path, char **buf, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return -1;
    fseek(f, 0, SEEK_END);
    *len = (size_t)ftell(f);
    fseek(f, 0, SEEK_SET);
    *buf = malloc(*len + 1);
    size_t got = fread(*buf, 1, *len, f);
    fclose(f);
    return got == *len ? 0 : -1;
}

/* A NaN stops training before any update and leaves the last good
 * checkpoint byte-identical. */
static void test_nan_keeps_last_good_checkpoint(void **state)
{
    (void)state;
    pr_model *m = tiny(1, 32);
    pr_tokenizer *tok = NULL;
    pr_error err = {0};
    assert_int_equal(pr_tokenizer_byte(&tok, &err), PR_OK);
    /* BitFit-like: a checkpoint restores only these, so a NaN planted in a
     * frozen tensor survives the resume */
    assert_int_equal(pr_model_set_trainable(m, "h.0.mlp.c_fc.bias", 1, &err), PR_OK);
    assert_int_equal(pr_model_set_trainable(m, "ln_f.weight", 1, &err), PR_OK);
    char out[300], ckpt[400];
    snprintf(out, sizeof out, "%s/nan", workdir);
    snprintf(ckpt, sizeof ckpt, "%s/checkpoint.safetensors", out);
    pr_train_config tc;
    base_config(&tc, out, 3);
    pr_train_result r;
    assert_int_equal(pr_train(m, tok, &tc, &r, &err), PR_OK);
    char *before, *after;
    size_t nb, na;
    assert_int_equal(read_file(ckpt, &before, &nb), 0);

    pr_model_find_tensor(m, "wpe.weight")->data[5] = NAN;
    tc.steps = 6;
    tc.resume = 1;
    int rc = pr_train(m, tok, &tc, &r, &err);
    assert_int_equal(rc, PR_ERR_NUMERIC);
    assert_non_null(strstr(err.msg, "NaN"));
    assert_non_null(strstr(err.msg, "checkpoint"));
    assert_int_equal(read_file(ckpt, &after, &na), 0);
    assert_int_equal(na, nb);
    assert_memory_equal(before, after, nb);
    free(before);
    free(after);
    pr_tokenizer_free(tok);
    pr_model_free(m);
}

/* Run peftref train to completion, or until the metrics file has `kill_at`
 * checkpointed steps and then SIGKILL it.  Returns the last stdout line. */
static void run_train(const char *out, int resume, int kill_after_ckpt, char *last, size_t size)
{
    char ckpt[400];
    snprintf(ckpt, sizeof ckpt, "%s/checkpoint.safetensors", out);
    int fds[2];
    assert_int_equal(pipe(fds), 0);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        dup2(fds[1], 1);
        close(fds[0]);
        int devnull = open("/dev/null", O_WRONLY);
        dup2(devnull, 2);
        execl(PEFTREF_BIN, "peftref", "train", "--preset", "gpt2-tiny", "--layers", "1", "--d-model", "32",
              "--heads", "2", "--max-seq", "32", "--data", DATA_TEXT, "--out", out, "--steps", "24",
              "--batch", "4", "--seq-len", "32", "--lr", "3e-3", "--warmup", "2", "--ckpt-every", "4",
              "--eval-every", "8", "--eval-batches", "4", resume ? "--resume" : "--quiet", (char *)NULL);
        _exit(127);
    }
    close(fds[1]);
    if (kill_after_ckpt) {
        /* wait for a checkpoint past the first, then kill without warning */
        struct stat st;
        time_t first = 0;
        for (int i = 0; i < 20000; i++) {
            if (stat(ckpt, &st) == 0) {
                if (!first)
                    first = st.st_mtim.tv_nsec + st.st_mtim.tv_sec;
                else if (st.st_mtim.tv_nsec + st.st_mtim.tv_sec != first)
                    break;
            }
            usleep(500);
        }
        kill(pid, SIGKILL);
    }
    size_t n = 0;
    char buf[4096];
    ssize_t k;
    while ((k = read(fds[0], buf + n, sizeof buf - 1 - n)) > 0)
        n += (size_t)k;
    buf[n] = '\0';
    close(fds[0]);
    int status;
    waitpid(pid, &status, 0);
    if (kill_after_ckpt) {
        assert_true(WIFSIGNALED(status) || WIFEXITED(status));
    } else {
        assert_true(WIFEXITED(status));
        assert_int_equal(WEXITSTATUS(status), 0);
    }
    snprintf(last, size, "%s", buf);
}

/* Kill -9 mid-run, resume: the final losses equal an uninterrupted run's
 * to the last printed digit. */
static void test_sigkill_resume_matches(void **state)
{
    (void)state;
    char a[400], b[400], full[4096], killed[4096], resumed[4096];
    snprintf(a, sizeof a, "%s/straight", workdir);
    snprintf(b, sizeof b, "%s/killed", workdir);
    run_train(a, 0, 0, full, sizeof full);
    run_train(b, 0, 1, killed, sizeof killed);
    assert_null(strstr(killed, "steps 24")); /* it really was killed early */
    run_train(b, 1, 0, resumed, sizeof resumed);
    /* "steps 24  train_loss A -> B  val_loss C -> D": B and D must match */
    const char *fb = strstr(full, "-> "), *rb = strstr(resumed, "-> ");
    assert_non_null(fb);
    assert_non_null(rb);
    const char *fv = strstr(full, "val_loss"), *rv = strstr(resumed, "val_loss");
    assert_non_null(fv);
    assert_non_null(rv);
    char f1[32], r1[32], f2[32], r2[32];
    sscanf(fb + 3, "%31s", f1);
    sscanf(rb + 3, "%31s", r1);
    sscanf(strstr(fv, "-> ") + 3, "%31s", f2);
    sscanf(strstr(rv, "-> ") + 3, "%31s", r2);
    fprintf(stderr, "uninterrupted: %s", full);
    fprintf(stderr, "resumed:       %s", resumed);
    assert_string_equal(f1, r1);
    assert_string_equal(f2, r2);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_padding_and_masking_do_not_score),
        cmocka_unit_test(test_full_finetuning_lowers_val_loss),
        cmocka_unit_test(test_classification_head_learns),
        cmocka_unit_test(test_nan_keeps_last_good_checkpoint),
        cmocka_unit_test(test_sigkill_resume_matches),
    };
    return cmocka_run_group_tests(tests, setup_dir, teardown_dir);
}
