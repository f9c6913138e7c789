/* Training checkpoints (core/io/train_state.h): bit-exact round trip, resume
 * equivalence with AdamW, and every refusal: fingerprint, truncation,
 * missing/extra/reshaped tensors, malformed metadata, failed writes. */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <dirent.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include "fileio.h"
#include "optim.h"
#include "rng.h"
#include "safetensors.h"
#include "train_state.h"

#define FP "gpt2-tiny/lora:r=4/seed=1"
#define NT 4
#define N_STATE ((size_t)(32 + 32 + 5 + 1))

/* A scratch directory and four tensors of every rank from 0 to 2, with
 * moments and progress. */
typedef struct fixture {
    char dir[64];
    char path[128];
    float a[4 * 8], b[8 * 4], s[5], gate[1];
    float m[N_STATE], v[N_STATE];
    trainstate_tensor params[NT];
    trainstate_moments mom;
    trainstate_progress prog;
} fixture;

static int setup(void **state)
{
    fixture *f = calloc(1, sizeof *f);
    if (!f)
        return -1;
    snprintf(f->dir, sizeof f->dir, "/tmp/peftref-trainstate-XXXXXX");
    if (!mkdtemp(f->dir)) {
        free(f);
        return -1;
    }
    snprintf(f->path, sizeof f->path, "%s/run.ckpt", f->dir);
    pr_rng r;
    rng_seed(&r, 2024);
    for (int i = 0; i < 32; i++) {
        f->a[i] = rng_normal(&r);
        f->b[i] = rng_normal(&r) * 1e-3f;
    }
    for (int i = 0; i < 5; i++)
        f->s[i] = 1.0f + rng_normal(&r);
    f->gate[0] = 0.5f;
    /* values a lossy path would alter: -0, a subnormal, NaN with payload */
    f->a[3] = -0.0f;
    f->b[5] = 1e-40f;
    uint32_t nan_bits = 0x7fc01234u;
    memcpy(&f->s[2], &nan_bits, 4);
    for (size_t i = 0; i < N_STATE; i++) {
        f->m[i] = rng_normal(&r) * 1e-2f;
        f->v[i] = rng_uniform(&r) * 1e-4f;
    }
    f->params[0] = (trainstate_tensor){"h.0.attn.lora_A", f->a, 32, 2, {4, 8}};
    f->params[1] = (trainstate_tensor){"h.0.attn.lora_B", f->b, 32, 2, {8, 4}};
    f->params[2] = (trainstate_tensor){"ia3.scale", f->s, 5, 1, {5}};
    f->params[3] = (trainstate_tensor){"gate", f->gate, 1, 0, {0}};
    f->mom = (trainstate_moments){f->m, f->v, N_STATE, 123};
    f->prog = (trainstate_progress){
        .step = 123,
        .rng = {0x0123456789abcdefULL, 0xfedcba9876543210ULL, 0, UINT64_MAX},
        .epoch = 2,
        .cursor = 4567,
        .shuffle_seed = 0x8000000000000001ULL,
    };
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    fixture *f = *state;
    DIR *d = opendir(f->dir);
    if (d) {
        struct dirent *e;
        while ((e = readdir(d)) != NULL) {
            if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
                continue;
            char *p = fileio_join(f->dir, e->d_name);
            if (p)
                unlink(p);
            free(p);
        }
        closedir(d);
    }
    rmdir(f->dir);
    free(f);
    return 0;
}

/* Files in the fixture directory whose name contains ".tmp.". */
static int count_temp_files(const fixture *f)
{
    int n = 0;
    DIR *d = opendir(f->dir);
    assert_non_null(d);
    struct dirent *e;
    while ((e = readdir(d)) != NULL)
        if (strstr(e->d_name, ".tmp."))
            n++;
    closedir(d);
    return n;
}

static void save_fixture(fixture *f)
{
    pr_error err;
    int rc = trainstate_save(f->path, FP, f->params, NT, &f->mom, &f->prog, &err);
    if (rc != PR_OK)
        fail_msg("save failed: %s", err.msg);
}

/* Zeroed buffers shaped like the fixture's, for loading into. */
typedef struct sink {
    float a[32], b[32], s[5], gate[1], m[N_STATE], v[N_STATE];
    trainstate_tensor params[NT];
    trainstate_moments mom;
    trainstate_progress prog;
} sink;

static void sink_init(sink *k, const fixture *f)
{
    memset(k, 0, sizeof *k);
    float *bufs[NT] = {k->a, k->b, k->s, k->gate};
    for (int i = 0; i < NT; i++) {
        k->params[i] = f->params[i];
        k->params[i].data = bufs[i];
    }
    k->mom = (trainstate_moments){k->m, k->v, N_STATE, 0};
}

static void test_round_trip_bit_exact(void **state)
{
    fixture *f = *state;
    save_fixture(f);
    assert_int_equal(count_temp_files(f), 0);
    sink k;
    sink_init(&k, f);
    pr_error err;
    int rc = trainstate_load(f->path, FP, k.params, NT, &k.mom, &k.prog, &err);
    if (rc != PR_OK)
        fail_msg("load failed: %s", err.msg);
    assert_memory_equal(k.a, f->a, sizeof k.a);
    assert_memory_equal(k.b, f->b, sizeof k.b);
    assert_memory_equal(k.s, f->s, sizeof k.s);
    assert_memory_equal(k.gate, f->gate, sizeof k.gate);
    assert_memory_equal(k.m, f->m, sizeof k.m);
    assert_memory_equal(k.v, f->v, sizeof k.v);
    assert_int_equal(k.mom.t, 123);
    assert_int_equal(k.prog.step, 123);
    assert_memory_equal(k.prog.rng, f->prog.rng, sizeof k.prog.rng);
    assert_int_equal(k.prog.epoch, 2);
    assert_int_equal(k.prog.cursor, 4567);
    assert_true(k.prog.shuffle_seed == f->prog.shuffle_seed);

    /* the file is plain safetensors with the documented names and keys */
    st_file *sf;
    assert_int_equal(st_open(f->path, 0, &sf, &err), PR_OK);
    assert_int_equal(st_count(sf), 3 * NT);
    const st_tensor *t = st_find(sf, "adam_v.h.0.attn.lora_B");
    assert_non_null(t);
    assert_int_equal(t->ndim, 2);
    assert_int_equal(t->shape[0], 8);
    assert_non_null(st_find(sf, "param.gate"));
    assert_string_equal(st_metadata(sf, "format"), "peftref.trainstate");
    assert_string_equal(st_metadata(sf, "fingerprint"), FP);
    assert_string_equal(st_metadata(sf, "rng"),
                        "0123456789abcdef fedcba9876543210 0000000000000000 ffffffffffffffff");
    st_close(sf);
}

/* Without moments only param.* is written and read. */
static void test_round_trip_without_moments(void **state)
{
    fixture *f = *state;
    pr_error err;
    assert_int_equal(trainstate_save(f->path, FP, f->params, NT, NULL, &f->prog, &err), PR_OK);
    sink k;
    sink_init(&k, f);
    assert_int_equal(trainstate_load(f->path, FP, k.params, NT, NULL, &k.prog, &err), PR_OK);
    assert_memory_equal(k.a, f->a, sizeof k.a);
    assert_int_equal(k.prog.cursor, 4567);
    /* asking for moments a file lacks is refused */
    assert_int_not_equal(trainstate_load(f->path, FP, k.params, NT, &k.mom, &k.prog, &err),
                         PR_OK);
    assert_non_null(strstr(err.msg, "optim_t"));
}

static void test_fingerprint_mismatch(void **state)
{
    fixture *f = *state;
    save_fixture(f);
    sink k;
    sink_init(&k, f);
    pr_error err;
    int rc = trainstate_load(f->path, "gpt2-tiny/lora:r=8/seed=1", k.params, NT, &k.mom, &k.prog,
                             &err);
    assert_int_equal(rc, PR_ERR_INVALID);
    assert_non_null(strstr(err.msg, f->path));
    assert_non_null(strstr(err.msg, "'" FP "'"));
    assert_non_null(strstr(err.msg, "'gpt2-tiny/lora:r=8/seed=1'"));
    /* nothing was written into the buffers */
    float zero[32] = {0};
    assert_memory_equal(k.a, zero, sizeof zero);
    assert_int_equal(k.prog.step, 0);
}

static void test_truncated_file(void **state)
{
    fixture *f = *state;
    save_fixture(f);
    char *buf;
    size_t len;
    pr_error err;
    assert_int_equal(fileio_read_all(f->path, 1 << 20, &buf, &len, &err), PR_OK);
    sink k;
    sink_init(&k, f);
    const size_t cuts[3] = {len - 4, len / 2, 5};
    for (int c = 0; c < 3; c++) {
        assert_int_equal(fileio_write_atomic(f->path, buf, cuts[c], &err), PR_OK);
        int rc = trainstate_load(f->path, FP, k.params, NT, &k.mom, &k.prog, &err);
        assert_int_equal(rc, PR_ERR_FORMAT);
        assert_non_null(strstr(err.msg, f->path));
    }
    free(buf);
    float zero[32] = {0};
    assert_memory_equal(k.a, zero, sizeof zero);
}

/* A tensor the run expects but the file lacks, one the file holds but the
 * run does not expect, and a reshaped one: each named with the file. */
static void test_missing_extra_reshaped(void **state)
{
    fixture *f = *state;
    pr_error err;
    /* file without "gate" */
    float *m3 = f->m, *v3 = f->v;
    trainstate_moments mom3 = {m3, v3, N_STATE - 1, 5};
    assert_int_equal(trainstate_save(f->path, FP, f->params, NT - 1, &mom3, &f->prog, &err),
                     PR_OK);
    sink k;
    sink_init(&k, f);
    int rc = trainstate_load(f->path, FP, k.params, NT, &k.mom, &k.prog, &err);
    assert_int_equal(rc, PR_ERR_NOTFOUND);
    assert_non_null(strstr(err.msg, f->path));
    assert_non_null(strstr(err.msg, "'param.gate'"));

    /* file with all four, run expecting three */
    save_fixture(f);
    k.mom.n = N_STATE - 1;
    rc = trainstate_load(f->path, FP, k.params, NT - 1, &k.mom, &k.prog, &err);
    assert_int_equal(rc, PR_ERR_INVALID);
    assert_non_null(strstr(err.msg, f->path));
    assert_non_null(strstr(err.msg, "gate'"));
    assert_non_null(strstr(err.msg, "3 unexpected"));

    /* lora_A saved as [4, 8], expected as [8, 4] */
    sink_init(&k, f);
    k.params[0].shape[0] = 8;
    k.params[0].shape[1] = 4;
    rc = trainstate_load(f->path, FP, k.params, NT, &k.mom, &k.prog, &err);
    assert_int_equal(rc, PR_ERR_INVALID);
    assert_non_null(strstr(err.msg, "'param.h.0.attn.lora_A'"));
    assert_non_null(strstr(err.msg, "[4, 8]"));
    assert_non_null(strstr(err.msg, "[8, 4]"));

    /* inconsistent arguments are refused before touching the disk */
    sink_init(&k, f);
    k.params[2].n = 6;
    rc = trainstate_save(f->path, FP, k.params, NT, &k.mom, &k.prog, &err);
    assert_int_equal(rc, PR_ERR_INVALID);
    assert_non_null(strstr(err.msg, "ia3.scale"));
}

/* Metadata that parses as safetensors but not as a checkpoint. */
static void test_bad_metadata(void **state)
{
    fixture *f = *state;
    pr_error err;
    st_entry e = {"param.x", 1, {2}, f->a, ST_F32};
    trainstate_tensor x = {"x", f->a, 2, 1, {2}};
    sink k;
    sink_init(&k, f);
    x.data = k.a;

    st_kv not_ours[] = {{"format", "pt"}};
    assert_int_equal(st_write(f->path, &e, 1, not_ours, 1, &err), PR_OK);
    assert_int_equal(trainstate_load(f->path, FP, &x, 1, NULL, &k.prog, &err), PR_ERR_FORMAT);
    assert_non_null(strstr(err.msg, "not a peftref training checkpoint"));

    st_kv bad_rng[] = {{"format", TRAINSTATE_FORMAT}, {"format_version", "1"},
                       {"fingerprint", FP}, {"step", "3"}, {"rng", "0123 4567"},
                       {"data_epoch", "0"}, {"data_cursor", "0"},
                       {"data_shuffle_seed", "0000000000000001"}};
    assert_int_equal(st_write(f->path, &e, 1, bad_rng, 8, &err), PR_OK);
    assert_int_equal(trainstate_load(f->path, FP, &x, 1, NULL, &k.prog, &err), PR_ERR_FORMAT);
    assert_non_null(strstr(err.msg, "'rng'"));

    bad_rng[4].value = "0000000000000001 0000000000000002 0000000000000003 0000000000000004";
    bad_rng[3].value = "-3";
    assert_int_equal(st_write(f->path, &e, 1, bad_rng, 8, &err), PR_OK);
    assert_int_equal(trainstate_load(f->path, FP, &x, 1, NULL, &k.prog, &err), PR_ERR_FORMAT);
    assert_non_null(strstr(err.msg, "'step'"));

    bad_rng[3].value = "3";
    bad_rng[1].value = "2";
    assert_int_equal(st_write(f->path, &e, 1, bad_rng, 8, &err), PR_OK);
    assert_int_equal(trainstate_load(f->path, FP, &x, 1, NULL, &k.prog, &err),
                     PR_ERR_UNSUPPORTED);

    bad_rng[1].value = "1";
    assert_int_equal(st_write(f->path, &e, 1, bad_rng, 8, &err), PR_OK);
    assert_int_equal(trainstate_load(f->path, FP, &x, 1, NULL, &k.prog, &err), PR_OK);
    assert_true(k.prog.rng[3] == 4);
    assert_int_equal(k.prog.step, 3);
}

/* A save that fails part-way (the file-size limit stands in for a full
 * disk) or cannot start (no such directory) leaves the previous checkpoint
 * byte-for-byte intact and no temporary file behind. */
static void test_failed_write_keeps_previous(void **state)
{
    fixture *f = *state;
    save_fixture(f);
    char *before;
    size_t before_len;
    pr_error err;
    assert_int_equal(fileio_read_all(f->path, 1 << 20, &before, &before_len, &err), PR_OK);
    assert_true(before_len > 1024);

    /* Nothing else writes while the limit holds; half the file's size makes
     * the new save fail mid-way. */
    struct rlimit old;
    assert_int_equal(getrlimit(RLIMIT_FSIZE, &old), 0);
    rlim_t cap = (rlim_t)(before_len / 2);
    if (old.rlim_max != RLIM_INFINITY && old.rlim_max < cap) {
        free(before);
        skip();
    }
    void (*old_handler)(int) = signal(SIGXFSZ, SIG_IGN);
    struct rlimit lim = {cap, old.rlim_max};
    assert_int_equal(setrlimit(RLIMIT_FSIZE, &lim), 0);
    trainstate_progress later = f->prog;
    later.step = 999;
    f->a[0] += 1.0f;
    int rc = trainstate_save(f->path, FP, f->params, NT, &f->mom, &later, &err);
    setrlimit(RLIMIT_FSIZE, &old);
    signal(SIGXFSZ, old_handler);
    f->a[0] -= 1.0f;
    assert_int_equal(rc, PR_ERR_IO);
    assert_non_null(strstr(err.msg, f->path));

    char *after;
    size_t after_len;
    assert_int_equal(fileio_read_all(f->path, 1 << 20, &after, &after_len, &err), PR_OK);
    assert_int_equal(after_len, before_len);
    assert_memory_equal(after, before, before_len);
    free(after);
    assert_int_equal(count_temp_files(f), 0);

    char bad[160];
    snprintf(bad, sizeof bad, "%s/no-such-dir/run.ckpt", f->dir);
    rc = trainstate_save(bad, FP, f->params, NT, &f->mom, &f->prog, &err);
    assert_int_equal(rc, PR_ERR_NOTFOUND);
    assert_non_null(strstr(err.msg, bad));
    assert_int_equal(fileio_read_all(f->path, 1 << 20, &after, &after_len, &err), PR_OK);
    assert_memory_equal(after, before, before_len);
    free(after);
    free(before);

    sink k;
    sink_init(&k, f);
    assert_int_equal(trainstate_load(f->path, FP, k.params, NT, &k.mom, &k.prog, &err), PR_OK);
    assert_int_equal(k.prog.step, 123);
}

/* A symlink planted at the temporary name an earlier version used
 * (PATH.tmp.<pid>) must not redirect the write: the file it points at keeps
 * its bytes and the checkpoint still lands at PATH. */
static void test_planted_symlink_not_followed(void **state)
{
    fixture *f = *state;
    char victim[160], link_path[200];
    snprintf(victim, sizeof victim, "%s/victim.txt", f->dir);
    static const char keep[] = "must survive";
    pr_error err;
    assert_int_equal(fileio_write_atomic(victim, keep, sizeof keep - 1, &err), PR_OK);
    snprintf(link_path, sizeof link_path, "%s.tmp.%ld", f->path, (long)getpid());
    assert_int_equal(symlink(victim, link_path), 0);
    save_fixture(f);
    char *back;
    size_t len;
    assert_int_equal(fileio_read_all(victim, 1 << 20, &back, &len, &err), PR_OK);
    assert_int_equal(len, sizeof keep - 1);
    assert_memory_equal(back, keep, len);
    free(back);
    struct stat st;
    assert_int_equal(lstat(link_path, &st), 0);
    assert_true(S_ISLNK(st.st_mode));
    assert_int_equal(lstat(f->path, &st), 0);
    assert_true(S_ISREG(st.st_mode));
    sink k;
    sink_init(&k, f);
    assert_int_equal(trainstate_load(f->path, FP, k.params, NT, &k.mom, &k.prog, &err), PR_OK);
    assert_int_equal(k.prog.step, 123);
    unlink(link_path);
    assert_int_equal(count_temp_files(f), 0);
}

/* Steps 1-3, checkpoint, steps 4-5 versus steps 1-3, checkpoint, load into
 * a fresh optimizer and fresh parameters, steps 4-5: bit-identical. */
static void run_steps(optim *o, float *w, float *gw, float *bias, float *gb, int from, int to)
{
    for (int t = from; t <= to; t++) {
        for (int i = 0; i < 12; i++)
            gw[i] = sinf((float)(i * t)) + 0.1f * w[i];
        for (int i = 0; i < 3; i++)
            gb[i] = cosf((float)(i + t)) - bias[i];
        optim_clip(o, 1.0);
        assert_int_equal(optim_step(o, 1e-2f / (float)t, NULL), PR_OK);
    }
}

static void test_resume_equivalence(void **state)
{
    fixture *f = *state;
    optim_config cfg;
    optim_config_default(&cfg);
    float w[12], gw[12], bias[3], gb[3];
    for (int i = 0; i < 12; i++)
        w[i] = 0.1f * (float)i - 0.5f;
    for (int i = 0; i < 3; i++)
        bias[i] = 0.2f * (float)i;
    optim_segment segs[2] = {{"w", w, gw, 12, 1}, {"bias", bias, gb, 3, 0}};
    optim_group grp = {segs, 2, 1.0f, OPTIM_WD_DEFAULT};
    optim o;
    pr_error err;
    assert_int_equal(optim_init(&o, &cfg, &grp, 1, &err), PR_OK);
    run_steps(&o, w, gw, bias, gb, 1, 3);

    trainstate_tensor params[2] = {{"w", w, 12, 2, {3, 4}}, {"bias", bias, 3, 1, {3}}};
    trainstate_moments mom;
    optim_state_block(&o, &mom.m, &mom.v, &mom.n);
    mom.t = optim_get_t(&o);
    trainstate_progress prog = {.step = 3, .rng = {1, 2, 3, 4}};
    assert_int_equal(trainstate_save(f->path, FP, params, 2, &mom, &prog, &err), PR_OK);
    run_steps(&o, w, gw, bias, gb, 4, 5);

    float w2[12] = {0}, gw2[12], bias2[3] = {0}, gb2[3];
    optim_segment segs2[2] = {{"w", w2, gw2, 12, 1}, {"bias", bias2, gb2, 3, 0}};
    optim_group grp2 = {segs2, 2, 1.0f, OPTIM_WD_DEFAULT};
    optim o2;
    assert_int_equal(optim_init(&o2, &cfg, &grp2, 1, &err), PR_OK);
    trainstate_tensor params2[2] = {{"w", w2, 12, 2, {3, 4}}, {"bias", bias2, 3, 1, {3}}};
    trainstate_moments mom2;
    optim_state_block(&o2, &mom2.m, &mom2.v, &mom2.n);
    trainstate_progress prog2;
    assert_int_equal(trainstate_load(f->path, FP, params2, 2, &mom2, &prog2, &err), PR_OK);
    assert_int_equal(optim_set_t(&o2, mom2.t, &err), PR_OK);
    assert_int_equal(prog2.step, 3);
    run_steps(&o2, w2, gw2, bias2, gb2, 4, 5);

    assert_memory_equal(w2, w, sizeof w);
    assert_memory_equal(bias2, bias, sizeof bias);
    float *m1, *m2;
    size_t n;
    optim_state_block(&o, &m1, NULL, &n);
    optim_state_block(&o2, &m2, NULL, NULL);
    assert_memory_equal(m1, m2, 2 * n * sizeof(float));
    assert_int_equal(optim_get_t(&o2), 5);
    optim_free(&o);
    optim_free(&o2);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_round_trip_bit_exact, setup, teardown),
        cmocka_unit_test_setup_teardown(test_round_trip_without_moments, setup, teardown),
        cmocka_unit_test_setup_teardown(test_fingerprint_mismatch, setup, teardown),
        cmocka_unit_test_setup_teardown(test_truncated_file, setup, teardown),
        cmocka_unit_test_setup_teardown(test_missing_extra_reshaped, setup, teardown),
        cmocka_unit_test_setup_teardown(test_bad_metadata, setup, teardown),
        cmocka_unit_test_setup_teardown(test_failed_write_keeps_previous, setup, teardown),
        cmocka_unit_test_setup_teardown(test_planted_symlink_not_followed, setup, teardown),
        cmocka_unit_test_setup_teardown(test_resume_equivalence, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
