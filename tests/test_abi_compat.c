/* ABI compatibility: a plugin built against the frozen ABI 1.0 header
 * (tests/abi/1.0/peftref/plugin.h, a copy taken when ABI 1 was frozen) is
 * loaded by the current host and must pass the conformance checker
 * (finite-difference gradients, determinism, save/load round trip), be
 * described as it declared itself, and attach and train in a model.  A
 * later change to plugin.h or the host that breaks plugins built for 1.0
 * fails here. */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "check.h"
#include "peftref/module.h"
#include "peftref/model.h"

#define COMPAT_DIR TEST_BUILDDIR "/tests/abi/.libs"
#define COMPAT_SO COMPAT_DIR "/compat_plugin.so"

static void test_checker_passes(void **state)
{
    (void)state;
    char *text = NULL;
    size_t len = 0;
    FILE *out = open_memstream(&text, &len);
    assert_non_null(out);
    check_options o = { 0 };
    o.probes = 4;
    o.timeout = 120;
    int n_checks = 0, n_failed = -1;
    pr_error err = { 0 };
    int rc = check_plugin_file(COMPAT_SO, &o, out, &n_checks, &n_failed, &err);
    fclose(out);
    if (rc || n_failed)
        fprintf(stderr, "%s\n%s\n", err.msg, text);
    assert_int_equal(rc, PR_OK);
    assert_true(n_checks >= 5);
    assert_int_equal(n_failed, 0);
    free(text);
}

static void test_described_as_declared(void **state)
{
    (void)state;
    pr_registry *reg = NULL;
    pr_error err = { 0 };
    assert_int_equal(pr_registry_open(COMPAT_DIR, &reg, &err), PR_OK);
    const pr_technique *t = pr_registry_find(reg, "frozen_a_lora");
    if (!t)
        for (int i = 0; i < pr_registry_refused_count(reg); i++) {
            const char *p, *why;
            pr_registry_refused(reg, i, &p, &why);
            fprintf(stderr, "refused %s: %s\n", p, why);
        }
    assert_non_null(t);
    assert_int_equal(t->abi_major, 1);
    assert_int_equal(t->integration, PR_INTEGRATE_SCALED_ADD);
    assert_int_equal(t->n_params, 2);
    assert_int_equal(t->params[0].flags, PR_PARAM_FROZEN | PR_PARAM_REGENERATE);
    assert_string_equal(t->flops_per_token, "2 * r * (d_in + d_out)");
    assert_int_equal(t->default_sites, PR_SITE_BIT(PR_SITE_Q) | PR_SITE_BIT(PR_SITE_V));
    assert_non_null(t->merge);
    pr_registry_free(reg);
}

/* Attached at q and v of a small model with B random: the loss moves, only
 * B is trainable, and A (frozen) is left alone by an SGD step. */
static void test_attaches_and_trains(void **state)
{
    (void)state;
    pr_registry *reg = NULL;
    pr_error err = { 0 };
    assert_int_equal(pr_registry_open(COMPAT_DIR, &reg, &err), PR_OK);
    pr_model_config c;
    assert_int_equal(pr_config_preset("gpt2-tiny", &c), PR_OK);
    c.n_layers = 2;
    c.d_model = 32;
    c.n_heads = 2;
    c.n_kv_heads = 2;
    c.d_head = 16;
    c.d_ff = 64;
    c.vocab_size = 64;
    c.max_seq = 16;
    c.seed = 7;
    pr_model *m = NULL;
    assert_int_equal(pr_model_create(&c, &m, &err), PR_OK);
    pr_module_spec spec = { .technique = pr_registry_find(reg, "frozen_a_lora"), .name = "fa", .trainable = 1,
                            .seed = 3 };
    pr_module *mod = NULL;
    int rc = pr_module_attach(m, &spec, &mod, &err);
    if (rc)
        fprintf(stderr, "attach: %s\n", err.msg);
    assert_int_equal(rc, PR_OK);
    /* trained: B only, r * d_out per insertion, 2 layers x {q, v} */
    assert_int_equal(pr_module_trainable_count(mod), 2 * (8 * 32 + 8 * 32));
    int tokens[16], targets[16];
    for (int i = 0; i < 16; i++) {
        tokens[i] = (i * 7) % 64;
        targets[i] = (i * 7 + 3) % 64;
    }
    pr_batch b = { .tokens = tokens, .targets = targets, .B = 2, .T = 8 };
    assert_int_equal(pr_model_reserve(m, 2, 8, &err), PR_OK);
    pr_model_set_training(m, 1);
    float l0 = 0, l1 = 0;
    assert_int_equal(pr_model_forward(m, &b, &l0, &err), PR_OK);
    pr_model_zero_grad(m);
    assert_int_equal(pr_model_backward(m, &err), PR_OK);
    double moved = 0.0;
    for (int i = 0; i < pr_model_n_tensors(m); i++) {
        const pr_tensor_info *t = pr_model_tensor(m, i);
        if (strncmp(t->name, "fa/", 3) != 0)
            continue;
        int is_a = strstr(t->name, ".A") != NULL;
        assert_true(is_a ? t->grad == NULL : t->grad != NULL);
        for (int64_t k = 0; t->grad && k < t->numel; k++) {
            t->data[k] -= 0.5f * t->grad[k];
            moved += fabs(t->grad[k]);
        }
    }
    assert_true(moved > 0.0);
    assert_int_equal(pr_model_forward(m, &b, &l1, &err), PR_OK);
    assert_true(l1 < l0);   /* one descent step on the same batch lowers its loss */

    /* Saved, the frozen A is left out (regenerated from the saved seed);
     * loaded into a fresh copy of the base, the module gives the same loss. */
    char dir[] = "/tmp/peftref-abi-XXXXXX";
    assert_non_null(mkdtemp(dir));
    char path[64];
    snprintf(path, sizeof path, "%s/fa.safetensors", dir);
    assert_int_equal(pr_module_save(mod, path, NULL, &err), PR_OK);
    FILE *fp = fopen(path, "rb");
    assert_non_null(fp);
    char head[4096] = { 0 };
    assert_true(fread(head, 1, sizeof head - 1, fp) > 8);
    fclose(fp);
    assert_non_null(strstr(head + 8, "\"seed\":\""));
    assert_non_null(strstr(head + 8, ".B\""));
    assert_null(strstr(head + 8, ".A\""));
    pr_model_set_training(m, 0);
    float la = 0, lb = 0;
    assert_int_equal(pr_model_forward(m, &b, &la, &err), PR_OK);
    pr_model *m2 = NULL;
    assert_int_equal(pr_model_create(&c, &m2, &err), PR_OK);
    pr_module_load_options lo = { 0 };
    rc = pr_module_load(m2, path, reg, &lo, NULL, &err);
    if (rc)
        fprintf(stderr, "load: %s\n", err.msg);
    assert_int_equal(rc, PR_OK);
    assert_int_equal(pr_model_reserve(m2, 2, 8, &err), PR_OK);
    pr_model_set_training(m2, 0);
    assert_int_equal(pr_model_forward(m2, &b, &lb, &err), PR_OK);
    assert_memory_equal(&la, &lb, sizeof la);   /* bit-identical */
    unlink(path);
    rmdir(dir);
    pr_model_free(m2);
    pr_model_free(m);
    pr_registry_free(reg);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_checker_passes),
        cmocka_unit_test(test_described_as_declared),
        cmocka_unit_test(test_attaches_and_trains),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
