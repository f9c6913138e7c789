/* Tests of plugin discovery (core/plugins/registry.c): a temporary search path
 * holds the test plugins of tests/plugins (built by `make check`), good and
 * deliberately broken; the registry must load the good ones, refuse each
 * broken file with its reason, let the first of two equal names win, and
 * suggest near names.  `peftref plugins` is run on the same path. */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <ftw.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "peftref/module.h"
#include "plugins/test_plugin.h"

#define PLUGIN_LIBS TEST_BUILDDIR "/tests/plugins/.libs/"

static char root[PATH_MAX - 64];
static char d1[PATH_MAX], d2[PATH_MAX], search_path[3 * PATH_MAX];

static void must(int ok, const char *what, const char *path)
{
    if (!ok)
        fail_msg("%s %s failed", what, path);
}

static void built_plugin(const char *name, char *out, size_t len)
{
    snprintf(out, len, "%s%s.so", PLUGIN_LIBS, name);
    if (access(out, R_OK) != 0)
        fail_msg("test plugin %s is missing: build it with 'make check'", out);
}

static void link_plugin(const char *dir, const char *link_name, const char *plugin)
{
    char target[PATH_MAX], link[2 * PATH_MAX];
    built_plugin(plugin, target, sizeof target);
    snprintf(link, sizeof link, "%s/%s", dir, link_name);
    must(symlink(target, link) == 0, "symlink", link);
}

static void write_file(const char *path, const char *text, size_t len)
{
    FILE *f = fopen(path, "wb");
    must(f != NULL, "fopen", path);
    must(fwrite(text, 1, len, f) == len, "fwrite", path);
    must(fclose(f) == 0, "fclose", path);
}

static void copy_plugin(const char *dir, const char *name, const char *plugin)
{
    char src[PATH_MAX], dst[2 * PATH_MAX];
    built_plugin(plugin, src, sizeof src);
    FILE *f = fopen(src, "rb");
    must(f != NULL, "fopen", src);
    static char buf[1 << 20];
    size_t n = fread(buf, 1, sizeof buf, f);
    fclose(f);
    must(n > 0 && n < sizeof buf, "read", src);
    snprintf(dst, sizeof dst, "%s/%s", dir, name);
    write_file(dst, buf, n);
}

static void make_dir(const char *fmt, const char *a, char *out, size_t len)
{
    snprintf(out, len, fmt, root, a);
    must(mkdir(out, 0755) == 0, "mkdir", out);
}

static void write_manifest(const char *pack_dir, const char *json)
{
    char path[2 * PATH_MAX];
    snprintf(path, sizeof path, "%s/manifest.json", pack_dir);
    write_file(path, json, strlen(json));
}

/* root/d1: good and broken plugins, three packs, a subdirectory without a
 * manifest (not searched), a non-plugin file; root/d2: a duplicate. */
static int setup(void **state)
{
    (void)state;
    snprintf(root, sizeof root, "/tmp/peftref-registry-XXXXXX");
    must(mkdtemp(root) != NULL, "mkdtemp", root);
    char dir[PATH_MAX];
    make_dir("%s/%s", "d1", d1, sizeof d1);
    make_dir("%s/%s", "d2", d2, sizeof d2);
    link_plugin(d1, "good_a.so", "good_a");
    link_plugin(d1, "good_a_link.so", "good_a");  /* the same file again: searched once */
    link_plugin(d1, "future.so", "future_minor");
    link_plugin(d1, "bad_abi.so", "bad_abi");
    link_plugin(d1, "no_entry.so", "no_entry");
    link_plugin(d1, "null_entry.so", "null_entry");
    link_plugin(d1, "zero.so", "zero_techniques");
    link_plugin(d1, "no_name.so", "no_name");
    link_plugin(d1, "bad_size.so", "bad_size");
    link_plugin(d1, "bad_enum.so", "bad_enum");
    link_plugin(d1, "bad_shape.so", "bad_shape");
    char path[2 * PATH_MAX];
    snprintf(path, sizeof path, "%s/garbage.so", d1);
    write_file(path, "not a shared object\n", 20);
    snprintf(path, sizeof path, "%s/README.txt", d1);
    write_file(path, "notes\n", 6);

    make_dir("%s/d1/%s", "misc", dir, sizeof dir);
    link_plugin(dir, "null_entry.so", "null_entry");
    make_dir("%s/d1/%s", "pack_ok", dir, sizeof dir);
    link_plugin(dir, "pack_good.so", "pack_good");
    write_manifest(dir, "{\"name\": \"ok-pack\", \"version\": \"1.0.0\", \"abi_major\": 1,"
                        " \"techniques\": [\"pack-good\"], \"license\": \"MIT\"}");
    make_dir("%s/d1/%s", "pack_bad", dir, sizeof dir);
    link_plugin(dir, "pack_bad.so", "pack_bad");
    write_manifest(dir, "{\"name\": \"bad-pack\", \"version\": \"1.0.0\", \"abi_major\": 1,"
                        " \"techniques\": [\"pack-bad\", \"pack-missing\"], \"license\": \"MIT\"}");
    make_dir("%s/d1/%s", "pack_abi", dir, sizeof dir);
    copy_plugin(dir, "pack_bad_copy.so", "pack_bad");
    write_manifest(dir, "{\"name\": \"abi-pack\", \"version\": \"1.0.0\", \"abi_major\": 2,"
                        " \"techniques\": [\"pack-bad\"]}");

    link_plugin(d2, "dup.so", "dup");
    snprintf(search_path, sizeof search_path, "%s:%s:%s/missing", d1, d2, root);
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

static pr_registry *open_test_registry(void)
{
    pr_registry *r = NULL;
    pr_error err = {0};
    if (pr_registry_open(search_path, &r, &err) != PR_OK)
        fail_msg("pr_registry_open: %s", err.msg);
    assert_non_null(r);
    return r;
}

static int ends_with(const char *s, const char *suffix)
{
    size_t n = strlen(s), m = strlen(suffix);
    return n >= m && strcmp(s + n - m, suffix) == 0;
}

static void test_good_plugins_load(void **state)
{
    (void)state;
    pr_registry *r = open_test_registry();
    /* In search order: d1's files by name, then its packs; d2's duplicate is refused. */
    static const char *const names[] = {"test-future", "test-alpha", "test-beta", "pack-good"};
    static const char *const origins[] = {"/d1/future.so", "/d1/good_a.so", "/d1/good_a.so",
                                          "/d1/pack_ok/pack_good.so"};
    assert_int_equal(pr_registry_count(r), 4);
    for (int i = 0; i < 4; i++) {
        assert_string_equal(pr_registry_technique(r, i)->name, names[i]);
        if (!ends_with(pr_registry_origin(r, i), origins[i]))
            fail_msg("origin of %s is %s", names[i], pr_registry_origin(r, i));
    }
    const pr_technique *a = pr_registry_find(r, "test-alpha");
    assert_ptr_equal(a, pr_registry_technique(r, 1));
    assert_string_equal(a->version, "0.1.0"); /* the first of the two test-alpha files */
    const pr_technique *b = pr_registry_find(r, "test-beta");
    assert_non_null(b);
    assert_int_equal(b->integration, PR_INTEGRATE_RESCALE);
    assert_int_equal(b->n_saved, 1);
    assert_string_equal(b->saved[0].name, "y_old");
    assert_string_equal(b->params[0].name, "scale");
    assert_int_equal(b->default_sites, PR_SITE_BIT(PR_SITE_FFN_ACT));
    assert_non_null(b->forward);
    assert_null(pr_registry_find(r, "pack-bad"));
    assert_null(pr_registry_find(r, "test-bad-abi"));
    assert_null(pr_registry_technique(r, 4));
    assert_null(pr_registry_origin(r, -1));
    pr_registry_free(r);
}

/* A plugin built against a later ABI 1.x: larger technique and option
 * structs.  The host copies what it knows and walks the options with the
 * plugin's element size. */
static void test_later_minor_version(void **state)
{
    (void)state;
    pr_registry *r = open_test_registry();
    const pr_technique *t = pr_registry_find(r, "test-future");
    assert_non_null(t);
    assert_int_equal(t->struct_size, sizeof(pr_technique));
    assert_int_equal(t->n_options, 2);
    assert_string_equal(t->options[0].name, "width");
    assert_string_equal(t->options[1].name, "gain");
    assert_true(t->options[1].def == 0.5);
    assert_int_equal(t->options[1].struct_size, sizeof(pr_option_decl));
    assert_string_equal(t->params[0].shape, "d_out");
    pr_registry_free(r);
}

typedef struct expected_refusal {
    const char *path_suffix;
    const char *reason;
} expected_refusal;

static const expected_refusal refusals[] = {
    {"/d1/bad_abi.so", "built for ABI 2, this host speaks ABI 1"},
    {"/d1/bad_enum.so", "technique 'test-bad-enum': unknown integration value 42"},
    {"/d1/bad_shape.so", "param 'bias' shape 'width, d_outt': unknown name 'd_outt' at column 8"},
    {"/d1/bad_size.so", "technique struct_size 16 is smaller than the"},
    {"/d1/garbage.so", "cannot load: "},
    {"/d1/no_entry.so", "no entry symbol peftref_plugin_entry"},
    {"/d1/no_name.so", "technique has no name"},
    /* ABI 1: the entry writes its reason into args->error and the host relays it */
    {"/d1/null_entry.so", "peftref_plugin_entry refused to load: null_entry: refusing to load (test fixture)"},
    {"/d1/pack_abi/pack_bad_copy.so", "manifest.json says abi_major 2, the pack's libraries are built for ABI 1"},
    {"/d1/pack_bad/pack_bad.so", "manifest.json lists technique 'pack-missing', which no library of the pack"},
    {"/d1/zero.so", "declares no techniques"},
    {"/d2/dup.so", "technique 'test-alpha' is already provided by "},
    {"/missing", "cannot search plugin directory: No such file or directory"},
};
#define N_REFUSALS (sizeof refusals / sizeof refusals[0])

static void test_broken_plugins_refused(void **state)
{
    (void)state;
    pr_registry *r = open_test_registry();
    int n = pr_registry_refused_count(r);
    for (int i = 0; i < n; i++) {
        const char *path, *reason;
        pr_registry_refused(r, i, &path, &reason);
        print_message("refused %s: %s\n", path, reason);
        assert_null(strchr(reason, '\n'));
    }
    /* Exactly these, in search order: good_a_link.so (the same file as
     * good_a.so) and misc/ (no manifest) produce nothing. */
    assert_int_equal(n, (int)N_REFUSALS);
    for (size_t k = 0; k < N_REFUSALS; k++) {
        const char *path, *reason;
        pr_registry_refused(r, (int)k, &path, &reason);
        if (!ends_with(path, refusals[k].path_suffix))
            fail_msg("refusal %zu is %s, expected ...%s", k, path, refusals[k].path_suffix);
        if (!strstr(reason, refusals[k].reason))
            fail_msg("%s refused for '%s', expected '%s'", path, reason, refusals[k].reason);
    }
    const char *path, *reason;
    pr_registry_refused(r, (int)N_REFUSALS, &path, &reason);
    assert_null(path);
    pr_registry_free(r);
}

/* The later file offering a taken name is refused naming both files. */
static void test_duplicate_names_both_files(void **state)
{
    (void)state;
    pr_registry *r = open_test_registry();
    char first[2 * PATH_MAX];
    snprintf(first, sizeof first, "%s/good_a.so", d1);
    int found = 0;
    for (int i = 0; i < pr_registry_refused_count(r); i++) {
        const char *path, *reason;
        pr_registry_refused(r, i, &path, &reason);
        if (!ends_with(path, "/d2/dup.so"))
            continue;
        found = 1;
        assert_non_null(strstr(reason, first));
        assert_non_null(strstr(reason, "'test-alpha'"));
    }
    assert_true(found);
    pr_registry_free(r);

    /* Reversed search order: d2's file comes first and wins. */
    char rev[3 * PATH_MAX];
    snprintf(rev, sizeof rev, "%s:%s", d2, d1);
    pr_error err = {0};
    assert_int_equal(pr_registry_open(rev, &r, &err), PR_OK);
    assert_string_equal(pr_registry_find(r, "test-alpha")->version, "9.9.9");
    assert_true(ends_with(pr_registry_origin(r, 0), "/d2/dup.so"));
    assert_null(pr_registry_find(r, "test-beta")); /* good_a.so is refused as a whole */
    pr_registry_free(r);
}

/* The name offered twice is queryable: the file in use and the later one. */
static void test_shadowed(void **state)
{
    (void)state;
    pr_registry *r = open_test_registry();
    const char *winner = "x", *loser = "x";
    assert_int_equal(pr_registry_shadowed(r, "test-alpha", 0, &winner, &loser), 1);
    assert_true(ends_with(winner, "/d1/good_a.so"));
    assert_true(ends_with(loser, "/d2/dup.so"));
    for (int i = 0; i < pr_registry_count(r); i++)
        if (pr_registry_technique(r, i) == pr_registry_find(r, "test-alpha"))
            assert_string_equal(winner, pr_registry_origin(r, i));
    assert_int_equal(pr_registry_shadowed(r, "test-alpha", 1, &winner, &loser), 0);
    assert_null(winner);
    assert_null(loser);
    /* offered once, or not at all */
    assert_int_equal(pr_registry_shadowed(r, "test-beta", 0, &winner, &loser), 0);
    assert_int_equal(pr_registry_shadowed(r, "no-such", 0, NULL, NULL), 0);
    assert_int_equal(pr_registry_shadowed(r, NULL, 0, NULL, NULL), 0);
    assert_int_equal(pr_registry_shadowed(NULL, "test-alpha", 0, NULL, NULL), 0);
    pr_registry_free(r);

    /* Reversed search order: d2's file is used, d1's is the later one. */
    char rev[3 * PATH_MAX];
    snprintf(rev, sizeof rev, "%s:%s", d2, d1);
    pr_error err = {0};
    assert_int_equal(pr_registry_open(rev, &r, &err), PR_OK);
    assert_int_equal(pr_registry_shadowed(r, "test-alpha", 0, &winner, &loser), 1);
    assert_true(ends_with(winner, "/d2/dup.so"));
    assert_true(ends_with(loser, "/d1/good_a.so"));
    pr_registry_free(r);
}

/* The trust rule: a world-writable directory, a world- or group-writable
 * file, a symlink into a world-writable directory and a symlinked pack
 * that is world-writable are each refused with the reason before anything
 * of theirs runs; the trusted file beside them loads. */
static void test_untrusted_refused(void **state)
{
    (void)state;
    char d3[PATH_MAX], ww[PATH_MAX], wwpack[PATH_MAX], path[2 * PATH_MAX], target[2 * PATH_MAX];
    make_dir("%s/%s", "d3", d3, sizeof d3);
    make_dir("%s/%s", "ww", ww, sizeof ww);
    must(chmod(ww, 0777) == 0, "chmod", ww);
    copy_plugin(ww, "in_ww.so", "good_a");
    copy_plugin(d3, "ok.so", "good_a");
    copy_plugin(d3, "world.so", "dup");
    snprintf(path, sizeof path, "%s/world.so", d3);
    must(chmod(path, 0666) == 0, "chmod", path);
    copy_plugin(d3, "group.so", "dup");
    snprintf(path, sizeof path, "%s/group.so", d3);
    must(chmod(path, 0664) == 0, "chmod", path);
    snprintf(target, sizeof target, "%s/in_ww.so", ww);
    snprintf(path, sizeof path, "%s/via_link.so", d3);
    must(symlink(target, path) == 0, "symlink", path);
    make_dir("%s/%s", "wwpack", wwpack, sizeof wwpack);
    copy_plugin(wwpack, "pack_good.so", "pack_good");
    write_manifest(wwpack, "{\"name\": \"ok-pack\", \"version\": \"1.0.0\", \"abi_major\": 1,"
                           " \"techniques\": [\"pack-good\"], \"license\": \"MIT\"}");
    must(chmod(wwpack, 0777) == 0, "chmod", wwpack);
    snprintf(path, sizeof path, "%s/linked_pack", d3);
    must(symlink(wwpack, path) == 0, "symlink", path);

    char list[3 * PATH_MAX];
    snprintf(list, sizeof list, "%s:%s", d3, ww);
    pr_registry *r = NULL;
    pr_error err = {0};
    assert_int_equal(pr_registry_open(list, &r, &err), PR_OK);
    static const expected_refusal want[] = {
        {"/d3/group.so", "is writable by its group (mode 0664)"},
        {"/d3/linked_pack", "/wwpack is writable by everyone (mode 0777)"},
        {"/d3/via_link.so", "/ww is writable by everyone (mode 0777); run 'chmod go-w' on it to load it "
                            "(reached through "},
        {"/d3/world.so", "is writable by everyone (mode 0666)"},
        {"/ww", "not trusted: directory "},
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
        if (!ends_with(p, want[k].path_suffix) || !strstr(why, want[k].reason))
            fail_msg("refusal %d is %s: '%s', expected ...%s: '%s'", k, p, why, want[k].path_suffix,
                     want[k].reason);
    }
    assert_int_equal(pr_registry_count(r), 2);   /* ok.so: test-alpha and test-beta */
    assert_true(ends_with(pr_registry_origin(r, 0), "/d3/ok.so"));
    assert_null(pr_registry_find(r, "pack-good"));
    pr_registry_free(r);
}

static void test_suggest(void **state)
{
    (void)state;
    pr_registry *r = open_test_registry();
    assert_string_equal(pr_registry_suggest(r, "test-alhpa"), "test-alpha");
    assert_string_equal(pr_registry_suggest(r, "TEST-BETA"), "test-beta");
    assert_string_equal(pr_registry_suggest(r, "test_future"), "test-future");
    assert_string_equal(pr_registry_suggest(r, "pack-god"), "pack-good");
    assert_string_equal(pr_registry_suggest(r, "pack"), "pack-good");
    assert_null(pr_registry_suggest(r, "zzzzzzzz"));
    assert_null(pr_registry_suggest(r, ""));
    assert_null(pr_registry_find(r, "test-alhpa"));
    pr_registry_free(r);

    /* An empty search path finds nothing and suggests nothing. */
    pr_error err = {0};
    assert_int_equal(pr_registry_open("", &r, &err), PR_OK);
    assert_int_equal(pr_registry_count(r), 0);
    assert_int_equal(pr_registry_refused_count(r), 0);
    assert_null(pr_registry_suggest(r, "lora"));
    pr_registry_free(r);
}

/* pr_technique_validate on descriptors built here: one defect each. */
static pr_technique base;

static void expect_invalid(const pr_technique *t, const char *want)
{
    pr_error err = {0};
    if (pr_technique_validate(t, &err) == PR_OK)
        fail_msg("descriptor accepted, expected '%s'", want);
    if (!strstr(err.msg, want))
        fail_msg("error '%s' lacks '%s'", err.msg, want);
}

static void test_validate(void **state)
{
    (void)state;
    pr_error err = {0};
    tp_fill(&base, "check-me");
    if (pr_technique_validate(&base, &err) != PR_OK)
        fail_msg("valid descriptor refused: %s", err.msg);
    expect_invalid(NULL, "NULL");

    pr_technique t = base;
    t.default_sites |= PR_SITE_BIT(PR_SITE_Q);
    expect_invalid(&t, "default site 'q' is not among the sites it allows");
    t = base;
    t.sites |= 1u << 20;
    expect_invalid(&t, "beyond the 15 known sites");
    t = base;
    t.forward = NULL;
    expect_invalid(&t, "missing forward");
    t = base;
    t.integration = PR_INTEGRATE_CUSTOM;
    expect_invalid(&t, "custom integration without integrate_forward and integrate_backward");
    t = base;
    t.intra = 0;
    expect_invalid(&t, "unknown intra value 0");
    t = base;
    t.workspace = 1u << 7;
    expect_invalid(&t, "unknown workspace bits");
    t = base;
    t.name = "Bad Name";
    expect_invalid(&t, "technique name 'Bad Name' is not");
    t = base;
    t.struct_size = 1u << 30;
    expect_invalid(&t, "absurdly large");
    t = base;
    t.abi_major = 2;
    expect_invalid(&t, "built for ABI 2, this host speaks ABI 1");

    pr_option_decl opts[2] = {tp_options[0], tp_options[0]};
    t = base;
    t.options = opts;
    t.n_options = 2;
    expect_invalid(&t, "option 'width' is declared twice");
    opts[1].name = "d_in";
    expect_invalid(&t, "option 'd_in' has the name of a model dimension");
    opts[1].name = "mode";
    opts[1].type = 9;
    expect_invalid(&t, "option 'mode': unknown type value 9");
    opts[1].type = PR_OPT_INT;
    opts[1].def = 100;
    expect_invalid(&t, "option 'mode': default 100 is outside [1, 64]");
    opts[1].def = 2;
    opts[1].struct_size = 8;
    expect_invalid(&t, "options[1]: struct_size 8 differs");
    opts[1].struct_size = sizeof(pr_option_decl);
    opts[1].type = PR_OPT_ENUM;
    expect_invalid(&t, "option 'mode': enum without choices");
    static const char *const choices[] = {"a", "b", NULL};
    opts[1].choices = choices;
    opts[1].def = 1;
    assert_int_equal(pr_technique_validate(&t, &err), PR_OK);

    pr_param_decl params[2] = {tp_params[0], tp_params[0]};
    t = base;
    t.params = params;
    t.n_params = 2;
    expect_invalid(&t, "params: 'bias' is declared twice");
    params[1].name = "w";
    params[1].init = 0;
    expect_invalid(&t, "param 'w': unknown init value 0");
    params[1].init = PR_INIT_NORMAL;
    params[1].init_arg = "0.02 * sqrt(";
    expect_invalid(&t, "param 'w' init_arg '0.02 * sqrt(': ");
    params[1].init_arg = "1 / sqrt(d_model)";
    params[1].scope = 7;
    expect_invalid(&t, "param 'w': unknown scope value 7");
    params[1].scope = PR_SCOPE_GLOBAL;
    params[1].shape = "rows, d_in";
    expect_invalid(&t, "unknown name 'rows'"); /* rows exists for buffers only */
    params[1].shape = "width, d_in / n_heads";
    assert_int_equal(pr_technique_validate(&t, &err), PR_OK);
    params[1].init = PR_INIT_TEXT;
    expect_invalid(&t, "init is text but init_source names no string option");
    params[1].init = PR_INIT_CUSTOM;
    expect_invalid(&t, "no init callback");
    params[1].init = PR_INIT_NORMAL;

    /* init_option: an enum option whose choices are init names. */
    static const char *const inits[] = {"normal", "embed_rows", NULL};
    static const char *const bad_inits[] = {"normal", "random", NULL};
    static const char *const text_inits[] = {"zeros", "text", NULL};
    pr_option_decl iopts[2] = {tp_options[0], tp_options[0]};
    iopts[1].name = "init_from";
    iopts[1].type = PR_OPT_ENUM;
    iopts[1].choices = inits;
    iopts[1].def = 1;
    t.options = iopts;
    t.n_options = 2;
    params[1].init_option = "width";
    expect_invalid(&t, "param 'w': init_option 'width' is not an enum option");
    params[1].init_option = "init_from";
    assert_int_equal(pr_technique_validate(&t, &err), PR_OK);
    iopts[1].choices = bad_inits;
    expect_invalid(&t, "init_option 'init_from' offers 'random', which is not an init");
    iopts[1].choices = text_inits;
    expect_invalid(&t, "offers 'text' but init_source names no string option");

    t = base;
    t.integration = PR_INTEGRATE_SCALED_ADD;
    expect_invalid(&t, "scaled addition without scale_expr");
    t.scale_expr = "alpha / width";
    expect_invalid(&t, "scale_expr 'alpha / width': unknown name 'alpha' at column 1");
    t.scale_expr = "2 / sqrt(width)";
    assert_int_equal(pr_technique_validate(&t, &err), PR_OK);
    t.module_in = "d_in, d_out";
    expect_invalid(&t, "module_in 'd_in, d_out': one integer expression expected");
    t.module_in = "max(d_in, d_out)";
    assert_int_equal(pr_technique_validate(&t, &err), PR_OK);

    t = base;
    t.adaptation = PR_ADAPT_SELECTION;
    expect_invalid(&t, "selection adaptation and select integration go together");
    t.integration = PR_INTEGRATE_SELECT;
    expect_invalid(&t, "must name select_kinds");
    t.select_kinds = PR_BASE_BIAS;
    t.forward = t.backward = NULL;
    t.sites = t.default_sites = 0;
    assert_int_equal(pr_technique_validate(&t, &err), PR_OK);
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

static void test_cli(void **state)
{
    (void)state;
    static char out[1 << 16];
    char cmd[4 * PATH_MAX];
    snprintf(cmd, sizeof cmd, "PEFTREF_PLUGIN_PATH='%s:%s' '%s' plugins 2>&1", d1, d2, PEFTREF_BIN);
    assert_int_equal(run(cmd, out, sizeof out), 0);
    expect_in(out, "NAME");
    expect_in(out, "test-alpha");
    expect_in(out, "direct-addition");
    expect_in(out, "/d1/good_a.so\n");
    expect_in(out, "test-beta");
    expect_in(out, "rescaling");
    expect_in(out, "\nrefused:\n");
    expect_in(out, "/d1/bad_abi.so: built for ABI 2, this host speaks ABI 1\n");
    expect_in(out, "/d2/dup.so: technique 'test-alpha' is already provided by ");

    /* Resolving a name offered twice warns, naming both files. */
    snprintf(cmd, sizeof cmd, "PEFTREF_PLUGIN_PATH='%s:%s' '%s' plugins inspect test-alpha 2>&1 >/dev/null", d1, d2,
             PEFTREF_BIN);
    assert_int_equal(run(cmd, out, sizeof out), 0);
    char want[4 * PATH_MAX];
    snprintf(want, sizeof want,
             "peftref plugins inspect: warning: technique 'test-alpha' is provided by both %s/good_a.so and "
             "%s/dup.so; using %s/good_a.so\n", d1, d2, d1);
    expect_in(out, want);
    snprintf(cmd, sizeof cmd, "PEFTREF_PLUGIN_PATH='%s' '%s' plugins inspect test-alpha 2>&1 >/dev/null", d1,
             PEFTREF_BIN);
    assert_int_equal(run(cmd, out, sizeof out), 0);
    if (strstr(out, "warning"))
        fail_msg("a name offered once warns:\n%s", out);

    snprintf(cmd, sizeof cmd, "PEFTREF_PLUGIN_PATH='%s' '%s' plugins list 2>&1", d1, PEFTREF_BIN);
    assert_int_equal(run(cmd, out, sizeof out), 0);
    expect_in(out, "pack-good");

    snprintf(cmd, sizeof cmd, "PEFTREF_PLUGIN_PATH='%s' '%s' plugins inspect test-beta --preset gpt2-tiny 2>&1", d1,
             PEFTREF_BIN);
    assert_int_equal(run(cmd, out, sizeof out), 0);
    expect_in(out, "test-beta");
    expect_in(out, "parameter adaptation  rescaling");
    expect_in(out, "integration form      rescaling");
    expect_in(out, "attn.k, attn.v, ffn.act");
    expect_in(out, "y_old");
    expect_in(out, "scale            [d_out]");
    expect_in(out, "/d1/good_a.so");
    /* Counted on gpt2-tiny (2 layers, d_ff 256): one scale (d_ff) per layer at ffn.act. */
    expect_in(out, "On gpt2-tiny (2 layers");
    expect_in(out, "insertions            2\n");
    expect_in(out, "module parameters     512 (");

    snprintf(cmd, sizeof cmd, "PEFTREF_PLUGIN_PATH='%s' '%s' plugins inspect test-alhpa 2>&1", d1, PEFTREF_BIN);
    assert_int_equal(run(cmd, out, sizeof out), 1);
    expect_in(out, "did you mean 'test-alpha'?");

    snprintf(cmd, sizeof cmd, "'%s' plugins --help 2>&1", PEFTREF_BIN);
    assert_int_equal(run(cmd, out, sizeof out), 0);
    expect_in(out, "PEFTREF_PLUGIN_PATH");
    snprintf(cmd, sizeof cmd, "'%s' plugins inspect --help 2>&1", PEFTREF_BIN);
    assert_int_equal(run(cmd, out, sizeof out), 0);
    expect_in(out, "--preset");
    snprintf(cmd, sizeof cmd, "'%s' plugins frobnicate 2>&1", PEFTREF_BIN);
    assert_int_equal(run(cmd, out, sizeof out), 2);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_good_plugins_load),  cmocka_unit_test(test_later_minor_version),
        cmocka_unit_test(test_broken_plugins_refused), cmocka_unit_test(test_duplicate_names_both_files),
        cmocka_unit_test(test_shadowed),
        cmocka_unit_test(test_untrusted_refused),  cmocka_unit_test(test_suggest),            cmocka_unit_test(test_validate),
        cmocka_unit_test(test_cli),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
