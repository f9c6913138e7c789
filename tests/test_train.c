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
    tc.resume_changed = 1; /* steps 3 -> 6 is a changed setting (issue 17) */
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

/* ---- issue 17: resume checks, output directories, data and divergence ---------- */

static pr_model *trainable_tiny(pr_tokenizer **tok)
{
    pr_model *m = tiny(1, 32);
    pr_error err = {0};
    assert_int_equal(pr_tokenizer_byte(tok, &err), PR_OK);
    assert_int_equal(pr_model_set_trainable(m, "*", 1, &err), PR_OK);
    return m;
}

static int count_lines_with(const char *path, const char *needle)
{
    char *buf;
    size_t len;
    if (read_file(path, &buf, &len) != 0)
        return -1;
    buf[len] = '\0';
    int n = 0;
    for (const char *p = buf; (p = strstr(p, needle)); p++)
        n++;
    free(buf);
    return n;
}

/* Defect 7: a checkpoint beyond train.steps is an error naming both
 * numbers; a finished run resumed reports its real losses, trains nothing
 * and writes nothing. */
static void test_resume_beyond_steps_and_finished(void **state)
{
    (void)state;
    pr_tokenizer *tok = NULL;
    pr_model *m = trainable_tiny(&tok);
    pr_error err = {0};
    char out[300], metrics[400];
    snprintf(out, sizeof out, "%s/finished", workdir);
    snprintf(metrics, sizeof metrics, "%s/metrics.jsonl", out);
    pr_train_config tc;
    base_config(&tc, out, 6);
    pr_train_result r;
    assert_int_equal(pr_train(m, tok, &tc, &r, &err), PR_OK);
    double final = r.final_train_loss, final_val = r.final_val_loss;
    char *before, *after;
    size_t nb, na;
    assert_int_equal(read_file(metrics, &before, &nb), 0);

    /* a fresh copy of the base model, as a new process would build */
    pr_model_free(m);
    pr_tokenizer_free(tok);
    m = trainable_tiny(&tok);
    tc.resume = 1;
    tc.steps = 4;
    assert_int_equal(pr_train(m, tok, &tc, &r, &err), PR_ERR_INVALID);
    assert_non_null(strstr(err.msg, "step 6"));
    assert_non_null(strstr(err.msg, "train.steps 4"));

    tc.steps = 6;
    assert_int_equal(pr_train(m, tok, &tc, &r, &err), PR_OK);
    assert_true(r.complete);
    assert_int_equal(r.steps_done, 6);
    assert_true(r.final_train_loss == final); /* not a made-up 0.0 */
    assert_true(r.final_val_loss == final_val);
    assert_int_equal(read_file(metrics, &after, &na), 0);
    assert_int_equal(na, nb);
    assert_memory_equal(before, after, nb);
    free(before);
    free(after);
    pr_tokenizer_free(tok);
    pr_model_free(m);
}

/* Defect 8: a NaN before any checkpoint names none. */
static void test_nan_before_first_checkpoint(void **state)
{
    (void)state;
    pr_tokenizer *tok = NULL;
    pr_model *m = tiny(1, 32);
    pr_error err = {0};
    assert_int_equal(pr_tokenizer_byte(&tok, &err), PR_OK);
    assert_int_equal(pr_model_set_trainable(m, "ln_f.weight", 1, &err), PR_OK);
    pr_model_find_tensor(m, "wpe.weight")->data[3] = NAN;
    char out[300];
    snprintf(out, sizeof out, "%s/nan_early", workdir);
    pr_train_config tc;
    base_config(&tc, out, 4);
    pr_train_result r;
    assert_int_equal(pr_train(m, tok, &tc, &r, &err), PR_ERR_NUMERIC);
    assert_null(strstr(err.msg, "last good checkpoint is"));
    assert_non_null(strstr(err.msg, "no checkpoint has been written yet"));
    pr_tokenizer_free(tok);
    pr_model_free(m);
}

/* Defect 9: a changed optimiser setting or data file is an error naming the
 * setting with both values; resume_changed accepts it and records it. */
static void test_resume_changed_settings(void **state)
{
    (void)state;
    pr_tokenizer *tok = NULL;
    pr_model *m = trainable_tiny(&tok);
    pr_error err = {0};
    char out[300], data[300], metrics[400];
    snprintf(out, sizeof out, "%s/changed", workdir);
    snprintf(data, sizeof data, "%s/changed.txt", workdir);
    snprintf(metrics, sizeof metrics, "%s/metrics.jsonl", out);
    char *text;
    size_t len;
    assert_int_equal(read_file(DATA_TEXT, &text, &len), 0);
    FILE *f = fopen(data, "wb");
    fwrite(text, 1, len, f);
    fclose(f);
    pr_train_config tc;
    base_config(&tc, out, 8);
    tc.train_path = data;
    tc.ckpt_every = 2;
    pr_train_result r;
    tc.steps = 8;
    tc.ckpt_every = 2;
    {
        pr_train_config t2 = tc;
        t2.steps = 2;
        assert_int_equal(pr_train(m, tok, &t2, &r, &err), PR_OK);
    }
    pr_model_free(m);
    pr_tokenizer_free(tok);
    m = trainable_tiny(&tok);
    tc.resume = 1;
    /* steps differ (2 -> 8) as well as lr */
    tc.lr = 10.0f;
    assert_int_equal(pr_train(m, tok, &tc, &r, &err), PR_ERR_INVALID);
    fprintf(stderr, "%s\n", err.msg);
    assert_non_null(strstr(err.msg, "train.lr 0.003 -> 10"));
    assert_non_null(strstr(err.msg, "train.steps 2 -> 8"));
    assert_non_null(strstr(err.msg, "--resume-changed"));
    /* same size, one byte different: the content hash sees it */
    tc.lr = 3e-3f;
    text[len / 2] ^= 1;
    f = fopen(data, "wb");
    fwrite(text, 1, len, f);
    fclose(f);
    assert_int_equal(pr_train(m, tok, &tc, &r, &err), PR_ERR_INVALID);
    assert_non_null(strstr(err.msg, "data.train size="));
    tc.resume_changed = 1;
    int rc = pr_train(m, tok, &tc, &r, &err);
    if (rc)
        fprintf(stderr, "%s\n", err.msg);
    assert_int_equal(rc, PR_OK);
    assert_int_equal(r.steps_done, 8);
    assert_int_equal(count_lines_with(metrics, "{\"event\": \"resume_changed\", \"step\": 2, \"settings\": {"), 1);
    assert_int_equal(count_lines_with(metrics, "\"train.steps\":{\"old\":\"2\",\"new\":\"8\"}"), 1);
    free(text);
    pr_tokenizer_free(tok);
    pr_model_free(m);
}

/* Defect 10: the lock refuses a second writer naming its pid, a stale lock
 * and dead runs' temporary files are cleaned, metrics are cut back to the
 * checkpoint, and an earlier run is replaced only with force. */
static void test_output_directory_lock_and_cleanup(void **state)
{
    (void)state;
    pr_tokenizer *tok = NULL;
    pr_model *m = trainable_tiny(&tok);
    pr_error err = {0};
    char out[300], path[600], host[256];
    snprintf(out, sizeof out, "%s/locked", workdir);
    mkdir(out, 0777);
    gethostname(host, sizeof host);
    host[sizeof host - 1] = '\0';
    /* a live holder: a child that waits */
    pid_t live = fork();
    if (live == 0) {
        pause();
        _exit(0);
    }
    snprintf(path, sizeof path, "%s/.lock", out);
    FILE *f = fopen(path, "w");
    fprintf(f, "%ld %s\n", (long)live, host);
    fclose(f);
    pr_train_config tc;
    base_config(&tc, out, 4);
    tc.ckpt_every = 2;
    pr_train_result r;
    assert_int_equal(pr_train(m, tok, &tc, &r, &err), PR_ERR_INVALID);
    char pid_text[32];
    snprintf(pid_text, sizeof pid_text, "pid %ld", (long)live);
    assert_non_null(strstr(err.msg, pid_text));
    kill(live, SIGKILL);
    waitpid(live, NULL, 0);
    /* now stale (its pid is dead), with a dead run's temporary file beside it */
    char tmp[700];
    snprintf(tmp, sizeof tmp, "%s/checkpoint.safetensors.tmp.%ld.0123456789abcdef", out, (long)live);
    f = fopen(tmp, "w");
    fputs("partial", f);
    fclose(f);
    assert_int_equal(pr_train(m, tok, &tc, &r, &err), PR_OK);
    struct stat st;
    assert_int_not_equal(stat(tmp, &st), 0);
    assert_int_not_equal(stat(path, &st), 0); /* released */

    /* metrics beyond the checkpoint (a run killed after logging step 5 and 6,
     * before checkpointing them) are cut on resume: no step twice */
    char metrics[400];
    snprintf(metrics, sizeof metrics, "%s/metrics.jsonl", out);
    f = fopen(metrics, "a");
    fputs("{\"step\": 5, \"loss\": 9.000000, \"lr\": 0.001, \"grad_norm\": 1.0, \"seconds\": 0.1}\n"
          "{\"step\": 6, \"loss\": 9.0000", f);
    fclose(f);
    tc.steps = 6;
    tc.resume = 1;
    tc.resume_changed = 1; /* steps 4 -> 6 */
    pr_model_free(m);
    pr_tokenizer_free(tok);
    m = trainable_tiny(&tok);
    assert_int_equal(pr_train(m, tok, &tc, &r, &err), PR_OK);
    assert_int_equal(count_lines_with(metrics, "{\"step\": 5, \"loss\""), 1);
    assert_int_equal(count_lines_with(metrics, "{\"step\": 6, \"loss\""), 1);
    assert_int_equal(count_lines_with(metrics, "9.0000"), 0);

    /* no checkpoint but an earlier run's files: refused without force */
    char ck[400];
    snprintf(ck, sizeof ck, "%s/checkpoint.safetensors", out);
    unlink(ck);
    tc.resume = 0;
    tc.resume_changed = 0;
    assert_int_equal(pr_train(m, tok, &tc, &r, &err), PR_ERR_INVALID);
    assert_non_null(strstr(err.msg, "--force"));
    snprintf(path, sizeof path, "%s/modules", out);
    mkdir(path, 0777);
    snprintf(path, sizeof path, "%s/modules/a.safetensors", out);
    f = fopen(path, "w");
    fclose(f);
    tc.resume = 1; /* resume has nothing to continue: still refused */
    assert_int_equal(pr_train(m, tok, &tc, &r, &err), PR_ERR_INVALID);
    assert_non_null(strstr(err.msg, "modules/a.safetensors"));
    tc.resume = 0;
    tc.force = 1;
    assert_int_equal(pr_train(m, tok, &tc, &r, &err), PR_OK);
    assert_int_equal(count_lines_with(metrics, "{\"step\": 0, \"val_loss\""), 1); /* a new file */
    assert_int_equal(count_lines_with(metrics, "{\"step\": 5, \"loss\""), 1);
    pr_tokenizer_free(tok);
    pr_model_free(m);
}

/* Run pr_train with stderr captured into buf. */
static int train_capturing_stderr(pr_model *m, const pr_tokenizer *tok, const pr_train_config *tc,
                                  pr_train_result *r, pr_error *err, char *buf, size_t size)
{
    char path[300];
    snprintf(path, sizeof path, "%s/stderr.txt", workdir);
    fflush(stderr);
    int saved = dup(2), fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    dup2(fd, 2);
    close(fd);
    int rc = pr_train(m, tok, tc, r, err);
    fflush(stderr);
    dup2(saved, 2);
    close(saved);
    FILE *f = fopen(path, "r");
    size_t n = fread(buf, 1, size - 1, f);
    fclose(f);
    buf[n] = '\0';
    return rc;
}

/* Defect 11: a classification file with an invalid label value names its
 * file and line; a diverging run warns once, naming the step and lr. */
static void test_invalid_label_line_and_divergence(void **state)
{
    (void)state;
    char path[300];
    snprintf(path, sizeof path, "%s/badlabel.jsonl", workdir);
    FILE *f = fopen(path, "w");
    for (int i = 0; i < 6; i++)
        fprintf(f, "{\"text\": \"item %d\", \"label\": \"%s\"}\n", i, i % 2 ? "a" : "b");
    fprintf(f, "{\"text\": \"item x\", \"label\": \"\"}\n");
    fclose(f);
    pr_tokenizer *tok = NULL;
    pr_model *m = trainable_tiny(&tok);
    pr_error err = {0};
    char out[300];
    snprintf(out, sizeof out, "%s/badlabel", workdir);
    pr_train_config tc;
    base_config(&tc, out, 2);
    tc.task = "classification";
    tc.train_path = path;
    pr_train_result r;
    assert_int_equal(pr_train(m, tok, &tc, &r, &err), PR_ERR_FORMAT);
    char where[400];
    snprintf(where, sizeof where, "%s:7:", path);
    assert_non_null(strstr(err.msg, where));

    snprintf(out, sizeof out, "%s/diverge", workdir);
    base_config(&tc, out, 12);
    tc.lr = 10.0f;
    tc.clip = 0.0f;
    tc.warmup = 0;
    tc.schedule = "constant";
    static char buf[8192];
    int rc = train_capturing_stderr(m, tok, &tc, &r, &err, buf, sizeof buf);
    assert_true(rc == PR_OK || rc == PR_ERR_NUMERIC);
    const char *w = strstr(buf, "warning: training is diverging at step ");
    assert_non_null(w);
    assert_null(strstr(w + strlen("warning: training is diverging"), "diverging")); /* once */
    assert_non_null(strstr(w, "lower learning rate"));
    pr_tokenizer_free(tok);
    pr_model_free(m);

    /* an ordinary run does not warn */
    m = trainable_tiny(&tok);
    snprintf(out, sizeof out, "%s/calm", workdir);
    base_config(&tc, out, 12);
    assert_int_equal(train_capturing_stderr(m, tok, &tc, &r, &err, buf, sizeof buf), PR_OK);
    assert_null(strstr(buf, "diverging"));
    pr_tokenizer_free(tok);
    pr_model_free(m);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_padding_and_masking_do_not_score),
        cmocka_unit_test(test_full_finetuning_lowers_val_loss),
        cmocka_unit_test(test_classification_head_learns),
        cmocka_unit_test(test_nan_keeps_last_good_checkpoint),
        cmocka_unit_test(test_sigkill_resume_matches),
        cmocka_unit_test(test_resume_beyond_steps_and_finished),
        cmocka_unit_test(test_nan_before_first_checkpoint),
        cmocka_unit_test(test_resume_changed_settings),
        cmocka_unit_test(test_output_directory_lock_and_cleanup),
        cmocka_unit_test(test_invalid_label_line_and_divergence),
    };
    return cmocka_run_group_tests(tests, setup_dir, teardown_dir);
}
