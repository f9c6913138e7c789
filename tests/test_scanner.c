/* Tests of the plugin scanner (core/plugins/scanner.c): every plugin is
 * loaded and described in a child process first, so a plugin that crashes
 * in its constructor or its entry, or hangs, is refused with the reason and
 * every command keeps working; the verdicts are cached by real path, size
 * and mtime.
 *
 * One directory mixes good plugins (test-alpha and test-beta, LoRA) with
 * one that crashes in its constructor, one that crashes in its entry, one
 * that hangs in its constructor, a world-writable one and one symlinked
 * into a world-writable directory.  `peftref plugins list` and `peftref
 * train` run on it, and the scanner is driven directly to show that a warm
 * cache starts no child.  Every run uses a cache file in the temporary
 * directory. */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <fcntl.h>
#include <ftw.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "peftref/module.h"
#include "registry_internal.h"

#define FIXTURES TEST_BUILDDIR "/tests/plugins/.libs/"
/* How the crashing fixtures are refused.  In the sanitizer build UBSan
 * (halt_on_error) stops their null dereference before it faults, and the
 * child exits with status 1 instead of dying of SIGSEGV. */
#if defined(__SANITIZE_ADDRESS__)
#define CRASHED "crashed while loading: "
#else
#define CRASHED "crashed while loading: signal 11 (Segmentation fault)"
#endif
#define LORA_SO TEST_BUILDDIR "/plugins/.libs/lora.so"

static char root[PATH_MAX / 2], mix[PATH_MAX], ww[PATH_MAX], cache[PATH_MAX];

static void must(int ok, const char *what, const char *path)
{
    if (!ok)
        fail_msg("%s %s failed", what, path);
}

static void fixture(const char *name, char *out, size_t len)
{
    snprintf(out, len, FIXTURES "%s.so", name);
    if (access(out, R_OK) != 0)
        fail_msg("test plugin %s is missing: build it with 'make check'", out);
}

static void write_file(const char *path, const void *data, size_t len)
{
    FILE *f = fopen(path, "wb");
    must(f != NULL, "fopen", path);
    must(fwrite(data, 1, len, f) == len, "fwrite", path);
    must(fclose(f) == 0, "fclose", path);
}

static char *read_text(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    static char buf[1 << 18];
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = '\0';
    return strdup(buf);
}

/* dir/name: a copy of the built fixture plugin */
static void copy_fixture(const char *dir, const char *name, const char *plugin)
{
    char src[PATH_MAX], dst[2 * PATH_MAX];
    fixture(plugin, src, sizeof src);
    FILE *f = fopen(src, "rb");
    must(f != NULL, "fopen", src);
    static char buf[1 << 20];
    size_t n = fread(buf, 1, sizeof buf, f);
    fclose(f);
    must(n > 0 && n < sizeof buf, "read", src);
    snprintf(dst, sizeof dst, "%s/%s", dir, name);
    write_file(dst, buf, n);
}

static void link_to(const char *target, const char *dir, const char *name)
{
    char link[2 * PATH_MAX];
    snprintf(link, sizeof link, "%s/%s", dir, name);
    must(symlink(target, link) == 0, "symlink", link);
}

/* root/mix: the mixed directory; root/ww: a world-writable directory. */
static int setup(void **state)
{
    (void)state;
    snprintf(root, sizeof root, "/tmp/peftref-scanner-XXXXXX");
    must(mkdtemp(root) != NULL, "mkdtemp", root);
    snprintf(mix, sizeof mix, "%s/mix", root);
    snprintf(ww, sizeof ww, "%s/ww", root);
    snprintf(cache, sizeof cache, "%s/registry-cache.json", root);
    must(mkdir(mix, 0755) == 0, "mkdir", mix);
    must(mkdir(ww, 0755) == 0, "mkdir", ww);
    must(chmod(ww, 0777) == 0, "chmod", ww);
    char path[2 * PATH_MAX];
    fixture("good_a", path, sizeof path);
    link_to(path, mix, "good.so");
    must(access(LORA_SO, R_OK) == 0, "access", LORA_SO);
    link_to(LORA_SO, mix, "lora.so");
    copy_fixture(mix, "crash_ctor.so", "crash_ctor");
    copy_fixture(mix, "crash_entry.so", "crash_entry");
    fixture("hang_ctor", path, sizeof path);
    link_to(path, mix, "hang.so");
    copy_fixture(mix, "world.so", "good_a");
    snprintf(path, sizeof path, "%s/world.so", mix);
    must(chmod(path, 0666) == 0, "chmod", path);
    copy_fixture(ww, "in_ww.so", "good_a");
    snprintf(path, sizeof path, "%s/in_ww.so", ww);
    link_to(path, mix, "via_ww.so");
    /* the tests drive the registry in this process too */
    setenv("PEFTREF_REGISTRY_CACHE", cache, 1);
    setenv("PEFTREF_SCAN_TIMEOUT", "1", 1);
    return 0;
}

static int remove_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st;
    (void)flag;
    (void)ftw;
    return remove(path);
}

static int teardown(void **state)
{
    (void)state;
    if (root[0])
        nftw(root, remove_entry, 16, FTW_DEPTH | FTW_PHYS);
    return 0;
}

/* Run a shell command; its output (stdout and stderr) into out. */
static int run(const char *cmd, char *out, size_t len)
{
    FILE *p = popen(cmd, "r");
    if (!p)
        fail_msg("popen %s failed", cmd);
    size_t n = fread(out, 1, len - 1, p);
    out[n] = '\0';
    int st = pclose(p);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

static void expect_in(const char *out, const char *want)
{
    if (!strstr(out, want))
        fail_msg("output lacks '%s':\n%s", want, out);
}

/* `peftref ARGS` on the mixed directory with the test's cache. */
static int peftref(const char *args, char *out, size_t len)
{
    char cmd[4 * PATH_MAX];
    snprintf(cmd, sizeof cmd,
             "cd '%s' && PEFTREF_PLUGIN_PATH='%s' PEFTREF_REGISTRY_CACHE='%s' PEFTREF_SCAN_TIMEOUT=1 '%s' %s 2>&1",
             root, mix, cache, PEFTREF_BIN, args);
    return run(cmd, out, len);
}

/* The refusal line of the listing for mix/name, with its reason. */
static void expect_refused(const char *out, const char *name, const char *reason)
{
    char want[2 * PATH_MAX];
    snprintf(want, sizeof want, "%s/%s: %s", mix, name, reason);
    expect_in(out, want);
}

/* Nothing of the mix takes `peftref plugins list` down: it exits 0, lists
 * the good techniques and gives each bad file's reason. */
static void test_list_survives_bad_plugins(void **state)
{
    (void)state;
    static char out[1 << 16];
    unlink(cache);
    assert_int_equal(peftref("plugins list", out, sizeof out), 0);
    expect_in(out, "test-alpha");
    expect_in(out, "test-beta");
    expect_in(out, "lora ");
    char want[2 * PATH_MAX];
    snprintf(want, sizeof want, "%s/good.so\n", mix);
    expect_in(out, want);
    expect_in(out, "\nrefused:\n");
    expect_refused(out, "crash_ctor.so", CRASHED);
    expect_refused(out, "crash_entry.so", CRASHED);
    expect_refused(out, "hang.so", "did not finish loading within 1 s");
    expect_refused(out, "world.so", "not trusted: file ");
    expect_in(out, "world.so is writable by everyone (mode 0666)");
    expect_refused(out, "via_ww.so", "not trusted: directory ");
    snprintf(want, sizeof want, "/ww is writable by everyone (mode 0777); run 'chmod go-w' on it to load it "
             "(reached through %s/via_ww.so)", mix);
    expect_in(out, want);
    /* none of the crashers' techniques is listed */
    assert_null(strstr(out, "test-crash-ctor"));
    assert_null(strstr(out, "test-hang-ctor"));
}

/* The registry in this process: the good plugins load, the bad ones are
 * refused, and the process is still here to count them. */
static void test_registry_survives_bad_plugins(void **state)
{
    (void)state;
    pr_registry *r = NULL;
    pr_error err = {0};
    assert_int_equal(pr_registry_open(mix, &r, &err), PR_OK);
    assert_non_null(pr_registry_find(r, "test-alpha"));
    assert_non_null(pr_registry_find(r, "test-beta"));
    assert_non_null(pr_registry_find(r, "lora"));
    assert_null(pr_registry_find(r, "test-crash-ctor"));
    static const char *const want[][2] = {
        {"/crash_ctor.so", CRASHED},
        {"/crash_entry.so", CRASHED},
        {"/hang.so", "did not finish loading within 1 s"},
        {"/via_ww.so", "is writable by everyone (mode 0777)"},
        {"/world.so", "is writable by everyone (mode 0666)"},
    };
    int n = pr_registry_refused_count(r);
    for (int i = 0; i < n; i++) {
        const char *p, *why;
        pr_registry_refused(r, i, &p, &why);
        print_message("refused %s: %s\n", p, why);
    }
    assert_int_equal(n, 5);
    for (int k = 0; k < 5; k++) {
        const char *p, *why;
        pr_registry_refused(r, k, &p, &why);
        size_t lp = strlen(p), ls = strlen(want[k][0]);
        if (lp < ls || strcmp(p + lp - ls, want[k][0]) != 0 || !strstr(why, want[k][1]))
            fail_msg("refusal %d is %s: '%s', expected ...%s: '%s'", k, p, why, want[k][0], want[k][1]);
    }
    pr_registry_free(r);
}

/* A pipeline that uses only good plugins trains with the crashers in the
 * search path. */
static void test_train_beside_bad_plugins(void **state)
{
    (void)state;
    char yaml[2 * PATH_MAX], text[4 * PATH_MAX];
    snprintf(yaml, sizeof yaml, "%s/pipeline.yaml", root);
    snprintf(text, sizeof text,
             "model:\n  config: {n_layers: 2, d_model: 32, n_heads: 2, d_ff: 64, vocab: 256, max_seq: 64}\n"
             "  seed: 3\n"
             "modules:\n  - technique: lora\n    sites: \"q, v\"\n    options:\n      r: 2\n"
             "task:\n  type: lm\n  train: %s/data/train/corpus.txt\n  val_fraction: 0.1\n"
             "train:\n  steps: 3\n  batch: 2\n  seq_len: 16\n  lr: 0.01\n  seed: 1\n  output: %s/run\n",
             TEST_SRCDIR, root);
    write_file(yaml, text, strlen(text));
    static char out[1 << 16];
    char args[3 * PATH_MAX];
    snprintf(args, sizeof args, "train '%s'", yaml);
    int rc = peftref(args, out, sizeof out);
    if (rc != 0)
        fail_msg("peftref train exited %d:\n%s", rc, out);
    char module[2 * PATH_MAX];
    snprintf(module, sizeof module, "%s/run/modules/lora.safetensors", root);
    if (access(module, R_OK) != 0)
        fail_msg("no module %s after training:\n%s", module, out);
}

static void set_mtime(const char *path, time_t t)
{
    struct timespec ts[2] = {{t, 0}, {t, 0}};
    must(utimensat(AT_FDCWD, path, ts, 0) == 0, "utimensat", path);
}

/* A second run takes the verdicts from the cache: a reason changed in the
 * cache file is what it reports.  A changed mtime makes the file scanned
 * again. */
static void test_second_run_uses_cache(void **state)
{
    (void)state;
    static char out[1 << 16];
    unlink(cache);
    assert_int_equal(peftref("plugins list", out, sizeof out), 0);
    char *text = read_text(cache);
    if (!text)
        fail_msg("no registry cache %s after a run", cache);
    expect_in(text, "\"format\": \"peftref-registry-cache\"");
    expect_in(text, "crash_ctor.so");
    /* the verdicts as the next run will find them */
    static char edited[1 << 18];
    size_t o = 0;
    for (const char *p = text; *p && o < sizeof edited - 32;) {
        if (strncmp(p, "crashed while loading: ", 23) == 0) {
            o += (size_t)snprintf(edited + o, sizeof edited - o, "crashed while loading (cached verdict): ");
            p += 23;
        } else {
            edited[o++] = *p++;
        }
    }
    edited[o] = '\0';
    free(text);
    write_file(cache, edited, o);
    assert_int_equal(peftref("plugins list", out, sizeof out), 0);
    expect_refused(out, "crash_ctor.so", "crashed while loading (cached verdict): ");
    expect_refused(out, "crash_entry.so", "crashed while loading (cached verdict): ");
    expect_in(out, "test-alpha");
    /* a changed mtime: scanned again */
    char path[2 * PATH_MAX];
    snprintf(path, sizeof path, "%s/crash_ctor.so", mix);
    set_mtime(path, time(NULL) - 3600);
    assert_int_equal(peftref("plugins list", out, sizeof out), 0);
    expect_refused(out, "crash_ctor.so", CRASHED);
    expect_refused(out, "crash_entry.so", "crashed while loading (cached verdict): ");
}

/* The scanner itself: a warm cache starts no child; a changed file, a
 * corrupt cache or no cache at all does. */
static void test_warm_cache_forks_nothing(void **state)
{
    (void)state;
    char good[2 * PATH_MAX], crash[2 * PATH_MAX], why[PR_ERROR_MSG_MAX];
    snprintf(good, sizeof good, "%s/good_copy.so", root);
    copy_fixture(root, "good_copy.so", "good_a");
    snprintf(crash, sizeof crash, "%s/crash_entry.so", mix);
    unlink(cache);

    reg_scanner *s = reg_scanner_open(reg_probe_library);
    assert_non_null(s);
    assert_int_equal(reg_scanner_verdict(s, good, why, sizeof why), 0);
    assert_int_equal(reg_scanner_verdict(s, crash, why, sizeof why), 1);
    expect_in(why, CRASHED);
    assert_int_equal(reg_scanner_forks(s), 2);
    reg_scanner_close(s);
    assert_int_equal(access(cache, R_OK), 0);

    /* warm: both verdicts from the cache, no child */
    s = reg_scanner_open(reg_probe_library);
    assert_int_equal(reg_scanner_verdict(s, good, why, sizeof why), 0);
    assert_int_equal(reg_scanner_verdict(s, crash, why, sizeof why), 1);
    expect_in(why, CRASHED);
    assert_int_equal(reg_scanner_forks(s), 0);
    reg_scanner_close(s);

    /* the same file, a new mtime: scanned again, the other one not */
    set_mtime(good, time(NULL) - 7200);
    s = reg_scanner_open(reg_probe_library);
    assert_int_equal(reg_scanner_verdict(s, good, why, sizeof why), 0);
    assert_int_equal(reg_scanner_verdict(s, crash, why, sizeof why), 1);
    assert_int_equal(reg_scanner_forks(s), 1);
    reg_scanner_close(s);

    /* a corrupt cache is ignored, and rewritten */
    write_file(cache, "{\"format\": \"peftref-registry-cache\", \"entr", 42);
    s = reg_scanner_open(reg_probe_library);
    assert_int_equal(reg_scanner_verdict(s, good, why, sizeof why), 0);
    assert_int_equal(reg_scanner_forks(s), 1);
    reg_scanner_close(s);
    char *text = read_text(cache);
    assert_non_null(text);
    expect_in(text, "\"version\": 1");
    expect_in(text, "good_copy.so");
    free(text);
    s = reg_scanner_open(reg_probe_library);
    assert_int_equal(reg_scanner_verdict(s, good, why, sizeof why), 0);
    assert_int_equal(reg_scanner_forks(s), 0);
    reg_scanner_close(s);

    /* off: nothing read, nothing written */
    unlink(cache);
    setenv("PEFTREF_REGISTRY_CACHE", "off", 1);
    for (int k = 0; k < 2; k++) {
        s = reg_scanner_open(reg_probe_library);
        assert_int_equal(reg_scanner_verdict(s, good, why, sizeof why), 0);
        assert_int_equal(reg_scanner_forks(s), 1);
        reg_scanner_close(s);
    }
    assert_int_not_equal(access(cache, F_OK), 0);

    /* unset: the per-user file under $XDG_CACHE_HOME, made private */
    char xdg[2 * PATH_MAX], file[3 * PATH_MAX];
    snprintf(xdg, sizeof xdg, "%s/xdg", root);
    unsetenv("PEFTREF_REGISTRY_CACHE");
    setenv("XDG_CACHE_HOME", xdg, 1);
    s = reg_scanner_open(reg_probe_library);
    assert_int_equal(reg_scanner_verdict(s, good, why, sizeof why), 0);
    reg_scanner_close(s);
    snprintf(file, sizeof file, "%s/peftref/registry-cache.json", xdg);
    assert_int_equal(access(file, R_OK), 0);
    struct stat st;
    snprintf(file, sizeof file, "%s/peftref", xdg);
    assert_int_equal(stat(file, &st), 0);
    assert_int_equal(st.st_mode & 077, 0);
    s = reg_scanner_open(reg_probe_library);
    assert_int_equal(reg_scanner_verdict(s, good, why, sizeof why), 0);
    assert_int_equal(reg_scanner_forks(s), 0);
    reg_scanner_close(s);
    setenv("PEFTREF_REGISTRY_CACHE", cache, 1);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_list_survives_bad_plugins),
        cmocka_unit_test(test_registry_survives_bad_plugins),
        cmocka_unit_test(test_train_beside_bad_plugins),
        cmocka_unit_test(test_second_run_uses_cache),
        cmocka_unit_test(test_warm_cache_forks_nothing),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
