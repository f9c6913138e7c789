/* Tests of the classification head as a saved module: a reloaded run
 * reproduces its validation scores, predict agrees with eval, keep_best
 * keeps the best evaluation's modules, early stopping stops. */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "peftref/peftref.h"
#include "best.h"

#define HEADS TEST_SRCDIR "/data/heads/"

static char tmp[256];

/* Run the program, stdout into out (stderr into err when given). */
static int run(char *out, size_t size, const char *fmt, ...)
{
    char cmd[4096];
    va_list ap;
    va_start(ap, fmt);
    int k = snprintf(cmd, sizeof cmd, "%s ", PEFTREF_BIN);
    vsnprintf(cmd + k, sizeof cmd - (size_t)k, fmt, ap);
    va_end(ap);
    FILE *p = popen(cmd, "r");
    assert_non_null(p);
    size_t n = fread(out, 1, size - 1, p);
    out[n] = '\0';
    int st = pclose(p);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

static int setup(void **state)
{
    (void)state;
    snprintf(tmp, sizeof tmp, "/tmp/peftref-heads-XXXXXX");
    return mkdtemp(tmp) ? 0 : -1;
}

static int teardown(void **state)
{
    (void)state;
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf %s", tmp);
    return system(cmd) == 0 ? 0 : -1;
}

/* Train run.yaml into tmp/NAME with extra --set options. */
static void train(const char *name, const char *sets)
{
    char out[8192];
    assert_int_equal(run(out, sizeof out, "train %srun.yaml --set train.output=%s/%s %s --quiet 2>&1", HEADS, tmp,
                         name, sets), 0);
}

/* Every metrics line of a run. */
static json_t *metrics(const char *name)
{
    char path[512];
    snprintf(path, sizeof path, "%s/%s/metrics.jsonl", tmp, name);
    FILE *f = fopen(path, "r");
    assert_non_null(f);
    json_t *a = json_array();
    char line[4096];
    while (fgets(line, sizeof line, f)) {
        json_t *o = json_loads(line, 0, NULL);
        assert_non_null(o);
        json_array_append_new(a, o);
    }
    fclose(f);
    return a;
}

static double num(const json_t *o, const char *k)
{
    const json_t *v = json_object_get(o, k);
    assert_true(json_is_number(v));
    return json_number_value(v);
}

static json_t *eval_json(const char *fmt, const char *a, const char *b)
{
    char out[16384], args[1024];
    snprintf(args, sizeof args, fmt, a, b);
    assert_int_equal(run(out, sizeof out, "eval --pipeline %s --json 2>/dev/null", args), 0);
    json_t *j = json_loads(out, 0, NULL);
    assert_non_null(j);
    return j;
}

/* A reloaded run (its head from modules/head.safetensors) reproduces its
 * last validation accuracy exactly and its loss to float tolerance, and
 * its pipeline.yaml names the head. */
static void test_reload_reproduces_validation(void **state)
{
    (void)state;
    train("r", "");
    json_t *m = metrics("r");
    double last_loss = NAN, last_acc = NAN, first_loss = NAN;
    size_t i;
    json_t *o;
    json_array_foreach(m, i, o) {
        if (!json_object_get(o, "val_loss"))
            continue;
        if (isnan(first_loss))
            first_loss = num(o, "val_loss");
        last_loss = num(o, "val_loss");
        last_acc = num(o, "val_accuracy");
    }
    json_decref(m);
    assert_true(fabs(last_loss - first_loss) > 1e-3); /* training moved the loss: a fresh head would not match */
    char run_dir[300];
    snprintf(run_dir, sizeof run_dir, "%s/r", tmp);
    json_t *e = eval_json("%s%s", run_dir, "");
    assert_true(fabs(num(e, "loss") - last_loss) < 1e-5);
    /* metrics.jsonl prints six decimals; 6 validation examples make the accuracy k/6 */
    int n = (int)num(e, "n");
    assert_int_equal(n, 6);
    assert_int_equal((int)lround(num(e, "accuracy") * n), (int)lround(last_acc * n));
    json_decref(e);
    char path[400], buf[8192];
    snprintf(path, sizeof path, "%s/r/pipeline.yaml", tmp);
    FILE *f = fopen(path, "r");
    assert_non_null(f);
    size_t len = fread(buf, 1, sizeof buf - 1, f);
    buf[len] = '\0';
    fclose(f);
    assert_non_null(strstr(buf, "head: \"modules/head.safetensors\""));
    /* the file itself: labels in order, pooling, d_model */
    snprintf(path, sizeof path, "%s/r/modules/head.safetensors", tmp);
    pr_head h;
    pr_error err = {0};
    assert_int_equal(pr_head_load(path, 16, &h, &err), PR_OK);
    assert_int_equal(h.n_labels, 3);
    assert_string_equal(h.labels[0], "neg");
    assert_string_equal(h.labels[2], "pos");
    pr_head_free(&h);
    assert_int_not_equal(pr_head_load(path, 32, &h, &err), PR_OK);
    assert_non_null(strstr(err.msg, "d_model 16"));
}

/* predict's lines on a labelled file give eval's accuracy, macro-F1 and
 * per-label counts on it, computed here from the lines. */
static void test_predict_agrees_with_eval(void **state)
{
    (void)state;
    char run_dir[300], out[65536];
    snprintf(run_dir, sizeof run_dir, "%s/r", tmp);
    assert_int_equal(run(out, sizeof out, "predict %s --data %strain.jsonl 2>/dev/null", run_dir, HEADS), 0);
    FILE *f = fopen(HEADS "train.jsonl", "r");
    assert_non_null(f);
    const char *labels[3] = {"neg", "neutral", "pos"};
    int per_n[3] = {0}, per_ok[3] = {0}, pred_n[3] = {0}, n = 0, ok = 0;
    char line[1024];
    char *save = NULL, *p = strtok_r(out, "\n", &save);
    while (fgets(line, sizeof line, f)) {
        assert_non_null(p);
        json_t *gold = json_loads(line, 0, NULL), *pr = json_loads(p, 0, NULL);
        assert_non_null(pr);
        const char *g = json_string_value(json_object_get(gold, "label"));
        const char *l = json_string_value(json_object_get(pr, "label"));
        double sum = 0.0;
        const char *k;
        json_t *v;
        json_object_foreach(json_object_get(pr, "probs"), k, v) sum += json_number_value(v);
        assert_true(fabs(sum - 1.0) < 1e-5);
        int gi = -1, li = -1;
        for (int c = 0; c < 3; c++) {
            if (!strcmp(g, labels[c]))
                gi = c;
            if (!strcmp(l, labels[c]))
                li = c;
        }
        assert_true(gi >= 0 && li >= 0);
        per_n[gi]++;
        pred_n[li]++;
        n++;
        if (gi == li) {
            per_ok[gi]++;
            ok++;
        }
        json_decref(gold);
        json_decref(pr);
        p = strtok_r(NULL, "\n", &save);
    }
    fclose(f);
    assert_null(p); /* one line per record */
    double f1 = 0.0;
    int used = 0;
    for (int c = 0; c < 3; c++)
        if (per_n[c] + pred_n[c] > 0) {
            f1 += 2.0 * per_ok[c] / (per_n[c] + pred_n[c]);
            used++;
        }
    f1 /= used;
    json_t *e = eval_json("%s --data %strain.jsonl", run_dir, HEADS);
    assert_int_equal((int)num(e, "n"), n);
    assert_true(fabs(num(e, "accuracy") - (double)ok / n) < 1e-9);
    assert_true(fabs(num(e, "macro_f1") - f1) < 1e-9);
    const json_t *pc = json_object_get(e, "per_class");
    for (int c = 0; c < 3; c++) {
        const json_t *o = json_object_get(pc, labels[c]);
        assert_non_null(o);
        assert_int_equal((int)num(o, "n"), per_n[c]);
        assert_int_equal((int)num(o, "correct"), per_ok[c]);
    }
    json_decref(e);
}

/* --out is written whole and never replaced without --force; a bad record
 * is named by file and line; a record without a label is fine. */
static void test_predict_out_and_errors(void **state)
{
    (void)state;
    char run_dir[300], path[400], bad[400], out[8192];
    snprintf(run_dir, sizeof run_dir, "%s/r", tmp);
    snprintf(path, sizeof path, "%s/p.jsonl", tmp);
    snprintf(bad, sizeof bad, "%s/bad.jsonl", tmp);
    FILE *f = fopen(bad, "w");
    fputs("{\"text\": \"good film\"}\n{\"text\": \"x\", \"label\": \"nope\"}\n", f);
    fclose(f);
    assert_int_equal(run(out, sizeof out, "predict %s --data %s 2>&1", run_dir, bad), 1);
    assert_non_null(strstr(out, "bad.jsonl:2:"));
    f = fopen(bad, "w");
    fputs("{\"text\": \"good film\"}\n{\"text\": \"awful\"}\n", f);
    fclose(f);
    assert_int_equal(run(out, sizeof out, "predict %s --data %s --out %s 2>&1", run_dir, bad, path), 0);
    f = fopen(path, "r");
    assert_non_null(f);
    int lines = 0;
    while (fgets(out, sizeof out, f))
        lines++;
    fclose(f);
    assert_int_equal(lines, 2);
    assert_int_equal(run(out, sizeof out, "predict %s --data %s --out %s 2>&1", run_dir, bad, path), 1);
    assert_non_null(strstr(out, "--force"));
    assert_int_equal(run(out, sizeof out, "predict %s --data %s --out %s --force 2>&1", run_dir, bad, path), 0);
}

/* A run saved before heads were: a clear warning, not a fresh head's scores. */
static void test_run_without_head_warns(void **state)
{
    (void)state;
    char cmd[2048], out[8192];
    snprintf(cmd, sizeof cmd, "cp -r %s/r %s/old && rm %s/old/modules/head.safetensors && "
             "sed -i '/^  head: /d' %s/old/pipeline.yaml", tmp, tmp, tmp, tmp);
    assert_int_equal(system(cmd), 0);
    char old[300];
    snprintf(old, sizeof old, "%s/old", tmp);
    assert_int_equal(run(out, sizeof out, "eval --pipeline %s --json 2>&1", old), 1);
    assert_non_null(strstr(out, "warning"));
    assert_non_null(strstr(out, "no classification head"));
}

/* keep_best: the modules of the best evaluation, reloaded through
 * best.yaml, give the lowest logged validation loss. */
static void test_keep_best(void **state)
{
    (void)state;
    train("kb", "--set train.keep_best=val_loss --set train.lr=0.2");
    json_t *m = metrics("kb");
    double best = INFINITY, last = NAN;
    long long best_step = -1, event_step = -1;
    size_t i;
    json_t *o;
    json_array_foreach(m, i, o) {
        const char *ev = json_string_value(json_object_get(o, "event"));
        if (ev && !strcmp(ev, "best"))
            event_step = (long long)num(o, "step");
        if (!json_object_get(o, "val_loss"))
            continue;
        last = num(o, "val_loss");
        if (last < best) {
            best = last;
            best_step = (long long)num(o, "step");
        }
    }
    json_decref(m);
    assert_int_equal(event_step, best_step);
    char path[400];
    snprintf(path, sizeof path, "%s/kb/best.yaml", tmp);
    json_t *e = eval_json("%s%s", path, "");
    assert_true(fabs(num(e, "loss") - best) < 1e-5);
    json_decref(e);
    /* the run's own modules are the final ones */
    snprintf(path, sizeof path, "%s/kb", tmp);
    e = eval_json("%s%s", path, "");
    assert_true(fabs(num(e, "loss") - last) < 1e-5);
    json_decref(e);
}

/* early_stop: no evaluation improves by 100 nats, so the run stops
 * `patience` evaluations after the first (step 0; evaluations every 2). */
static void test_early_stop_real_run(void **state)
{
    (void)state;
    train("es", "--set 'train.early_stop={patience: 2, min_delta: 100}'");
    json_t *m = metrics("es");
    long long last_step = -1, stop_step = -1;
    size_t i;
    json_t *o;
    json_array_foreach(m, i, o) {
        const char *ev = json_string_value(json_object_get(o, "event"));
        if (ev && !strcmp(ev, "early_stop"))
            stop_step = (long long)num(o, "step");
        else if (json_object_get(o, "loss"))
            last_step = (long long)num(o, "step");
    }
    json_decref(m);
    assert_int_equal(stop_step, 4);
    assert_int_equal(last_step, 4);
}

/* The rule itself on a stub sequence. */
static void test_best_tracker_sequence(void **state)
{
    (void)state;
    best_tracker b;
    best_init(&b, "val_loss", 0.1);
    const double seq[] = {1.0, 0.95, 0.85, 0.9, 0.8, 0.79};
    const int better[] = {1, 0, 1, 0, 0, 0}, bad[] = {0, 1, 0, 1, 2, 3};
    for (int i = 0; i < 6; i++) {
        assert_int_equal(best_update(&b, i, seq[i]), better[i]);
        assert_int_equal(b.bad, bad[i]);
    }
    assert_int_equal(b.best_step, 2);
    best_init(&b, "val_accuracy", 0.0);
    assert_int_equal(best_update(&b, 0, 0.5), 1);
    assert_int_equal(best_update(&b, 1, 0.5), 0);
    assert_int_equal(best_update(&b, 2, NAN), 0);
    assert_int_equal(best_update(&b, 3, 0.6), 1);
    assert_int_equal(b.best_step, 3);
}

/* The schema names the file, line and field of a bad setting. */
static void test_schema_errors(void **state)
{
    (void)state;
    char out[8192];
    assert_int_not_equal(run(out, sizeof out, "plan %srun.yaml --set train.keep_best=val_los 2>&1", HEADS), 0);
    assert_non_null(strstr(out, "train.keep_best"));
    assert_int_not_equal(run(out, sizeof out, "plan %srun.yaml --set 'train.early_stop={min_delta: 1}' 2>&1", HEADS),
                         0);
    assert_non_null(strstr(out, "patience"));
    assert_int_not_equal(run(out, sizeof out, "plan %srun.yaml --set task.type=lm --set train.keep_best=val_accuracy "
                             "2>&1", HEADS), 0);
    assert_non_null(strstr(out, "val_accuracy needs task.type classification"));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_reload_reproduces_validation),
        cmocka_unit_test(test_predict_agrees_with_eval),
        cmocka_unit_test(test_predict_out_and_errors),
        cmocka_unit_test(test_run_without_head_warns),
        cmocka_unit_test(test_keep_best),
        cmocka_unit_test(test_early_stop_real_run),
        cmocka_unit_test(test_best_tracker_sequence),
        cmocka_unit_test(test_schema_errors),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
