/* Tests of the plugin conformance checker (core/plugins/check.h and `peftref
 * plugins check`).
 *
 * The built LoRA plugin must pass every check.  Fixtures, each a LoRA with
 * one deliberate defect (tests/plugins/lora_like.h), must fail the check
 * that targets that defect, with a message naming the tensor and the site:
 *   bad_backward   lora_B's gradient scaled by 1.1   -> gradient/h.1.qkv
 *   bad_dx         d_in scaled by 1.3                -> an upstream base tensor
 *   crash_forward  null dereference in forward       -> reported, not fatal
 *   bad_seed       init() ignores ctx->seed          -> determinism
 *   nan_forward    forward writes NaN everywhere     -> finite (and nothing else)
 * A file the loader refuses is one failed "load" check.  The command line
 * exits 0 when every check passes, 1 when one fails, 2 on usage errors.
 * Four probes per tensor keep the suite quick under sanitizers. */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>

#include "peftref/config.h"
#include "check.h"

#define PLUGIN_DIR TEST_BUILDDIR "/plugins/.libs"
#define FIXTURE_DIR TEST_BUILDDIR "/tests/plugins/.libs"

typedef struct run {
    int rc, n_checks, n_failed;
    char *text;
} run;

static run check_family(const char *path, const char *technique, int family)
{
    run r = { 0, 0, 0, NULL };
    size_t len = 0;
    FILE *out = open_memstream(&r.text, &len);
    assert_non_null(out);
    check_options o = { 0 };
    o.probes = 4;
    o.timeout = 120;
    o.technique = technique;
    o.family = family;
    pr_error err = { 0 };
    r.rc = check_plugin_file(path, &o, out, &r.n_checks, &r.n_failed, &err);
    fclose(out);
    if (r.rc)
        fprintf(stderr, "check %s: %s\n", path, err.msg);
    return r;
}

static run check(const char *path, const char *technique)
{
    return check_family(path, technique, 0);
}

/* The output line that starts with start (e.g. "FAIL x/gradient/h.1.qkv:"),
 * copied into buf; NULL when there is none. */
static const char *line_of(const char *text, const char *start, char *buf, size_t len)
{
    size_t n = strlen(start);
    for (const char *p = text; p && *p;) {
        const char *e = strchr(p, '\n');
        size_t l = e ? (size_t)(e - p) : strlen(p);
        if (l >= n && strncmp(p, start, n) == 0) {
            snprintf(buf, len, "%.*s", (int)l, p);
            return buf;
        }
        p = e ? e + 1 : NULL;
    }
    return NULL;
}

static void expect_line(const run *r, const char *start, const char *needle)
{
    char buf[2048];
    const char *l = line_of(r->text, start, buf, sizeof buf);
    if (!l || (needle && !strstr(l, needle)))
        fprintf(stderr, "expected a line starting '%s'%s%s in:\n%s", start, needle ? " with " : "",
                needle ? needle : "", r->text);
    assert_non_null(l);
    if (needle)
        assert_non_null(strstr(l, needle));
}

static void test_lora_passes(void **state)
{
    (void)state;
    run r = check(PLUGIN_DIR "/lora.so", NULL);
    assert_int_equal(r.rc, PR_OK);
    if (r.n_failed)
        fprintf(stderr, "%s", r.text);
    assert_int_equal(r.n_failed, 0);
    /* load, 7 sites GPT-2 has (qkv q k v o ffn.up ffn.down), 6 more checks */
    assert_int_equal(r.n_checks, 1 + 7 + 6);
    expect_line(&r, "PASS lora.so/load:", "lora");
    expect_line(&r, "PASS lora/gradient/h.1.qkv:", "2 module tensors and 4 upstream");
    expect_line(&r, "PASS lora/gradient/h.1.ffn.down:", NULL);
    expect_line(&r, "SKIP lora/gradient/h.1.ffn.gate:", NULL);
    expect_line(&r, "PASS lora/params:", NULL);
    expect_line(&r, "PASS lora/determinism:", NULL);
    expect_line(&r, "PASS lora/accumulation:", NULL);
    expect_line(&r, "PASS lora/save-load:", NULL);
    expect_line(&r, "PASS lora/options:", NULL);
    expect_line(&r, "PASS lora/finite:", "at 7 sites");
    assert_null(strstr(r.text, "FAIL"));
    free(r.text);
}

/* Every built-in plugin at every site it supports on a llama-tiny model
 * (and a Qwen2 for the second shape of `params`). */
static void test_all_plugins_on_llama(void **state)
{
    (void)state;
    run r = check_family(PLUGIN_DIR, NULL, PR_FAMILY_LLAMA);
    assert_int_equal(r.rc, PR_OK);
    if (r.n_failed)
        fprintf(stderr, "%s", r.text);
    assert_int_equal(r.n_failed, 0);
    assert_true(r.n_checks > 250);
    expect_line(&r, "PASS lora/gradient/h.1.ffn.gate:", "2 module tensors");
    expect_line(&r, "SKIP lora/gradient/h.1.qkv:", "LLaMA test model has no qkv site");
    expect_line(&r, "PASS ia3/gradient/h.1.k:", NULL);
    expect_line(&r, "PASS ia3/gradient/h.1.attn.k:", NULL);
    expect_line(&r, "PASS prefix_tuning/gradient/h.1.attn.k:", NULL);
    expect_line(&r, "PASS prompt_tuning/gradient/embed:", NULL);
    expect_line(&r, "PASS bitfit/gradient:", NULL);
    expect_line(&r, "PASS lnfit/gradient:", NULL);
    expect_line(&r, "PASS dora/save-load:", NULL);
    expect_line(&r, "PASS adapter_houlsby/gradient/h.1.ffn_out:", NULL);
    assert_null(strstr(r.text, "FAIL"));
    free(r.text);
}

static void test_bad_backward_named(void **state)
{
    (void)state;
    run r = check(FIXTURE_DIR "/bad_backward.so", NULL);
    assert_int_equal(r.rc, PR_OK);
    assert_int_equal(r.n_checks, 1 + 2 + 6);
    /* both sites fail, naming lora_B and the site; nothing else fails */
    expect_line(&r, "FAIL bad-backward/gradient/h.1.qkv:", "gradient of 'bad-backward/h.1.qkv.lora_B' off by");
    expect_line(&r, "FAIL bad-backward/gradient/h.1.ffn.down:", "'bad-backward/h.1.ffn.down.lora_B'");
    assert_null(strstr(r.text, "lora_A' off"));
    assert_int_equal(r.n_failed, 2);
    expect_line(&r, "PASS bad-backward/determinism:", NULL);
    expect_line(&r, "PASS bad-backward/save-load:", NULL);
    free(r.text);
}

static void test_bad_input_gradient_upstream(void **state)
{
    (void)state;
    run r = check(FIXTURE_DIR "/bad_dx.so", NULL);
    assert_int_equal(r.rc, PR_OK);
    /* the module's own tensors are right; an upstream base tensor is not */
    expect_line(&r, "FAIL bad-dx/gradient/h.1.qkv:", "upstream of the module at h.1.qkv");
    expect_line(&r, "FAIL bad-dx/gradient/h.1.ffn.down:", "input gradient d_in is wrong");
    assert_null(strstr(r.text, "lora_A' off"));
    assert_null(strstr(r.text, "lora_B' off"));
    assert_int_equal(r.n_failed, 2);
    free(r.text);
}

static void test_crash_survived(void **state)
{
    (void)state;
    run r = check(FIXTURE_DIR "/crash_forward.so", NULL);
    assert_int_equal(r.rc, PR_OK);
    assert_int_equal(r.n_checks, 1 + 2 + 6);
    /* every check that runs forward fails as a crash; the others still run and pass */
    expect_line(&r, "FAIL crash-forward/gradient/h.1.qkv:", "crashed");
    expect_line(&r, "FAIL crash-forward/gradient/h.1.ffn.down:", "crashed");
    expect_line(&r, "FAIL crash-forward/determinism:", "crashed");
    expect_line(&r, "FAIL crash-forward/accumulation:", "crashed");
    expect_line(&r, "FAIL crash-forward/save-load:", "crashed");
    expect_line(&r, "FAIL crash-forward/finite:", "crashed");
    expect_line(&r, "PASS crash-forward/params:", NULL);
    expect_line(&r, "PASS crash-forward/options:", NULL);
    assert_int_equal(r.n_failed, 6);
    free(r.text);
}

static void test_bad_seed_nondeterministic(void **state)
{
    (void)state;
    run r = check(FIXTURE_DIR "/bad_seed.so", NULL);
    assert_int_equal(r.rc, PR_OK);
    expect_line(&r, "FAIL bad-seed/determinism:", "parameter 'bad-seed/h.0.qkv.lora_A' differs");
    expect_line(&r, "PASS bad-seed/gradient/h.1.qkv:", NULL);
    assert_int_equal(r.n_failed, 1);
    free(r.text);
}

/* A forward that returns NaN from finite inputs passes every other check
 * (NaN is within every tolerance and repeats bit for bit); the finite
 * check fails it, naming the site and the first non-finite element. */
static void test_nan_forward_not_finite(void **state)
{
    (void)state;
    run r = check(FIXTURE_DIR "/nan_forward.so", NULL);
    assert_int_equal(r.rc, PR_OK);
    assert_int_equal(r.n_checks, 1 + 2 + 6);
    expect_line(&r, "FAIL nan-forward/finite:",
                "forward at h.1.qkv (eval) produced a non-finite value from finite inputs: out[0, 0] = nan");
    assert_int_equal(r.n_failed, 1);
    free(r.text);
}

static void test_refused_and_filters(void **state)
{
    (void)state;
    run r = check(FIXTURE_DIR "/bad_abi.so", NULL);
    assert_int_equal(r.rc, PR_OK);
    assert_int_equal(r.n_checks, 1);
    assert_int_equal(r.n_failed, 1);
    expect_line(&r, "FAIL bad_abi.so/load: refused:", "ABI");
    free(r.text);

    r = check(PLUGIN_DIR "/lora.so", "no-such-technique");
    assert_int_equal(r.rc, PR_OK);
    assert_int_equal(r.n_failed, 1);
    expect_line(&r, "FAIL lora.so/load:", "no technique named 'no-such-technique'");
    free(r.text);

    pr_error err = { 0 };
    int nc = -1, nf = -1;
    FILE *sink = fopen("/dev/null", "w");
    assert_non_null(sink);
    assert_int_equal(check_plugin_file(FIXTURE_DIR "/no-such-file.so", NULL, sink, &nc, &nf, &err),
                     PR_ERR_NOTFOUND);
    assert_non_null(strstr(err.msg, "no-such-file.so"));
    fclose(sink);
}

/* exit status of the command line with args, its output discarded */
static int cli_status(const char *args)
{
    char cmd[1024];
    snprintf(cmd, sizeof cmd, "'%s' plugins check %s >/dev/null 2>&1", PEFTREF_BIN, args);
    FILE *p = popen(cmd, "r");
    assert_non_null(p);
    int st = pclose(p);
    assert_true(WIFEXITED(st));
    return WEXITSTATUS(st);
}

static void test_cli_exit_codes(void **state)
{
    (void)state;
    assert_int_equal(cli_status("--probes 3 '" FIXTURE_DIR "/bad_seed.so' --technique bad-seed"), 1);
    assert_int_equal(cli_status("--probes 3 '" PLUGIN_DIR "/lora.so'"), 0);
    assert_int_equal(cli_status("--probes 3 '" FIXTURE_DIR "/nan_forward.so'"), 1);
    assert_int_equal(cli_status(""), 2);
    assert_int_equal(cli_status("--probes 0 x.so"), 2);
    assert_int_equal(cli_status("--bogus x.so"), 2);
    assert_int_equal(cli_status("--help"), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_lora_passes),
        cmocka_unit_test(test_all_plugins_on_llama),
        cmocka_unit_test(test_bad_backward_named),
        cmocka_unit_test(test_bad_input_gradient_upstream),
        cmocka_unit_test(test_crash_survived),
        cmocka_unit_test(test_bad_seed_nondeterministic),
        cmocka_unit_test(test_nan_forward_not_finite),
        cmocka_unit_test(test_refused_and_filters),
        cmocka_unit_test(test_cli_exit_codes),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
