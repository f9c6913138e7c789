/* Tests of AdaLoRA (plugins/adalora.c), loaded as a shared object:
 *
 *  - the descriptor: identity, typology, Hugging Face PEFT's option names
 *    and defaults (AdaLoraConfig);
 *  - trainable-parameter counts at GPT-2 small with default options equal
 *    Hugging Face PEFT's: init_r = 12 on c_attn (768 -> 2304) of each of the
 *    12 layers, lora_A 12 x 768 + lora_B 2304 x 12 + lora_E 12 x 1 =
 *    12 * (768 + 2304) + 12 = 36,876 per layer, 12 * 36,876 = 442,512;
 *    the module also owns the RankAllocator's frozen statistics
 *    (exp_avg_ipt and exp_avg_unc of A and B: 2 * 36,864 per layer; of E,
 *    the triplet scores and the rank pattern: 4 * 144), 1,327,824 in all;
 *  - identity at initialisation (lora_E = 0): logits equal the base model's;
 *  - the output equals the independent formula: merge() adds
 *    s (A*E)^T B^T, s = lora_alpha / (init_r + 1e-5), computed here in
 *    double, the merged model's logits equal the unmerged module's, and
 *    unmerge restores the weights bit for bit;
 *  - the orthogonality regulariser's value (aux loss) equals
 *    w / (2N) * sum ||A A^T - I||_F + ||B^T B - I||_F computed here, and the
 *    gradient after_backward adds matches finite differences of that value;
 *  - the rank budget: a few steps of SGD on a tiny model with a short
 *    schedule; after every step the number of nonzero lora_E entries
 *    equals PEFT's budget_schedule computed here, and the rank pattern is
 *    fixed after total_step - tfinal;
 *  - the conformance checker passes at every site. */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <dlfcn.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "peftref/peftref.h"
#include "peftref/module.h"
#include "peftref/plugin.h"
#include "check.h"
#include "harness.h"

#define ADALORA_SO TEST_BUILDDIR "/plugins/.libs/adalora.so"

static void *so;
static const pr_technique *ada;

static int setup_plugin(void **state)
{
    (void)state;
    ada = th_plugin_technique(ADALORA_SO, &so);
    return ada ? 0 : -1;
}

static int teardown_plugin(void **state)
{
    (void)state;
    if (so)
        dlclose(so);
    return 0;
}

enum { MB = 2, MT = 6, MV = 64, ML = 2, MC = 32, MH = 4, MF = 128 };

static pr_model *tiny_model(void)
{
    pr_model_config c = th_config(&(th_shape){ ML, MC, MH, MH, MC / MH, MF, MV, 16 }, 7);
    return th_model_new(&c, MB, MT);
}

static void tiny_batch(int *tokens, int *targets)
{
    for (int i = 0; i < MB * MT; i++) {
        tokens[i] = (i * 17 + 5) % MV;
        targets[i] = (i * 29 + 3) % MV;
    }
}

static pr_module *attach(pr_model *m, const pr_option_setting *o, int n)
{
    pr_module_spec spec = { .technique = ada, .options = o, .n_options = n, .trainable = 1, .seed = 11 };
    return th_attach(m, &spec);
}

/* The module's copy of parameter `param` at layer `layer` (-1: any), or asserts. */
static pr_module_param mparam(const pr_module *mod, const char *param, int layer)
{
    pr_module_param p;
    for (int i = 0; i < pr_module_n_params(mod); i++) {
        assert_int_equal(pr_module_param_at(mod, i, &p), PR_OK);
        if (!strcmp(p.param, param) && (layer < 0 || p.layer == layer))
            return p;
    }
    fail_msg("no parameter %s at layer %d", param, layer);
    return p;
}

static const float *grad_of(pr_model *m, const pr_module_param *p)
{
    const pr_tensor_info *t = pr_model_find_tensor(m, p->name);
    assert_non_null(t);
    return t->grad;
}

static float *logits_now(pr_model *m)
{
    int tok[MB * MT], tgt[MB * MT];
    tiny_batch(tok, tgt);
    (void)th_forward_ce(m, tok, tgt, MB, MT);
    float *l = malloc((size_t)MB * MT * MV * sizeof(float));
    assert_non_null(l);
    memcpy(l, pr_model_logits(m), (size_t)MB * MT * MV * sizeof(float));
    return l;
}

static void test_descriptor(void **state)
{
    (void)state;
    assert_string_equal(ada->name, "adalora");
    assert_string_equal(ada->peft_type, "ADALORA");
    assert_non_null(strstr(ada->citation, "2303.10512"));
    assert_int_equal(ada->intra, PR_INTRA_FACTORISED);
    assert_int_equal(ada->adaptation, PR_ADAPT_REPARAMETERISATION);
    assert_int_equal(ada->insertion, PR_INSERT_PARALLEL);
    assert_int_equal(ada->integration, PR_INTEGRATE_SCALED_ADD);
    const struct {
        const char *name, *peft;
        double def;
    } want[] = { { "target_r", NULL, 8 },   { "init_r", NULL, 12 },         { "tinit", NULL, 0 },
                 { "tfinal", NULL, 0 },     { "delta_t", "deltaT", 1 },     { "beta1", NULL, 0.85 },
                 { "beta2", NULL, 0.85 },   { "orth_reg_weight", NULL, 0.5 }, { "total_step", NULL, 0 },
                 { "alpha", "lora_alpha", 8 }, { "dropout", "lora_dropout", 0 } };
    for (size_t i = 0; i < sizeof want / sizeof want[0]; i++) {
        const pr_option_decl *o = th_option(ada, want[i].name);
        assert_non_null(o);
        assert_true(fabs(o->def - want[i].def) < 1e-12);
        if (want[i].peft)
            assert_string_equal(o->peft_name, want[i].peft);
    }
}

static void test_counts_gpt2_small(void **state)
{
    (void)state;
    pr_model_config cfg;
    assert_int_equal(pr_config_preset("gpt2", &cfg), PR_OK);
    assert_int_equal(cfg.n_layers, 12);
    assert_int_equal(cfg.d_model, 768);
    pr_module_spec spec = { .technique = ada, .trainable = 1, .seed = 1 };
    pr_module_plan plan;
    pr_error err = { 0 };
    if (pr_module_plan_for(&cfg, &spec, &plan, &err))
        fail_msg("plan: %s", err.msg);
    const int64_t per_layer = 12 * (768 + 2304) + 12;
    assert_int_equal(per_layer, 36876);
    assert_int_equal(plan.insertions, 12);
    assert_int_equal(plan.trainable, 12 * per_layer);
    assert_int_equal(plan.trainable, 442512);
    assert_int_equal(plan.params, 442512 + 12 * 2 * 12 * (768 + 2304) + 4 * 144);
    assert_int_equal(plan.params, 1327824);
}

/* lora_E = 0: the logits are the base model's, bit for bit. */
static void test_identity(void **state)
{
    (void)state;
    pr_model *m = tiny_model();
    float *base = logits_now(m);
    (void)attach(m, NULL, 0);
    float *with = logits_now(m);
    assert_memory_equal(with, base, (size_t)MB * MT * MV * sizeof(float));
    free(base);
    free(with);
    pr_model_free(m);
}

/* Fill lora_E with values away from zero (uniform in [0.5, 1.5], alternating sign). */
static void randomise_e(pr_module *mod)
{
    pr_module_param e = mparam(mod, "lora_E", -1);
    for (int64_t i = 0; i < e.numel; i++)
        e.data[i] = (float)((0.5 + (double)((i * 37) % 11) / 10.0) * (i % 2 ? -1 : 1));
}

static void test_formula_merge(void **state)
{
    (void)state;
    pr_model *m = tiny_model();
    const pr_option_setting o[] = { { "init_r", "5", -1 }, { "target_r", "3", -1 }, { "alpha", "16", -1 } };
    pr_module *mod = attach(m, o, 3);
    randomise_e(mod);
    const double s = 16.0 / ((double)5.0f + 1e-5);
    float *orig[ML];
    int din = 0, dout = 0, ld;
    for (int l = 0; l < ML; l++) {
        float *w, *b;
        pr_error err = { 0 };
        assert_int_equal(pr_model_site_weight(m, PR_SITE_QKV, l, &w, &ld, &b, &err), PR_OK);
        assert_int_equal(pr_model_site_dims(m, PR_SITE_QKV, &din, &dout), PR_OK);
        orig[l] = malloc((size_t)din * dout * sizeof(float));
        for (int k = 0; k < din; k++)
            memcpy(orig[l] + (size_t)k * dout, w + (size_t)k * ld, (size_t)dout * sizeof(float));
    }
    float *unmerged = logits_now(m);
    pr_error err = { 0 };
    if (pr_module_merge(mod, &err))
        fail_msg("merge: %s", err.msg);
    pr_module_param E = mparam(mod, "lora_E", -1);
    assert_int_equal(E.shape[0], ML);
    assert_int_equal(E.shape[1], 5);
    for (int l = 0; l < ML; l++) {
        pr_module_param A = mparam(mod, "lora_A", l), B = mparam(mod, "lora_B", l);
        assert_int_equal(A.shape[0], 5);
        assert_int_equal(A.shape[1], din);
        assert_int_equal(B.shape[0], dout);
        float *w, *b;
        assert_int_equal(pr_model_site_weight(m, PR_SITE_QKV, l, &w, &ld, &b, &err), PR_OK);
        double worst = 0.0, big = 0.0;
        for (int i = 0; i < din; i++)
            for (int j = 0; j < dout; j++) {
                double want = 0.0;
                for (int k = 0; k < 5; k++)
                    want += (double)A.data[k * din + i] * E.data[l * 5 + k] * B.data[j * 5 + k];
                want *= s;
                double got = (double)w[(size_t)i * ld + j] - orig[l][(size_t)i * dout + j];
                worst = fmax(worst, fabs(got - want));
                big = fmax(big, fabs(want));
            }
        assert_true(big > 1e-3);
        assert_true(worst <= 1e-6 + 1e-4 * big);
    }
    float *merged = logits_now(m);
    double diff = th_max_abs_diff(merged, unmerged, (size_t)MB * MT * MV);
    assert_true(diff < 1e-4);
    assert_int_equal(pr_module_unmerge(mod, &err), PR_OK);
    for (int l = 0; l < ML; l++) {
        float *w, *b;
        assert_int_equal(pr_model_site_weight(m, PR_SITE_QKV, l, &w, &ld, &b, &err), PR_OK);
        for (int k = 0; k < din; k++)
            assert_memory_equal(w + (size_t)k * ld, orig[l] + (size_t)k * dout, (size_t)dout * sizeof(float));
        free(orig[l]);
    }
    float *again = logits_now(m);
    assert_memory_equal(again, unmerged, (size_t)MB * MT * MV * sizeof(float));
    free(unmerged);
    free(merged);
    free(again);
    pr_model_free(m);
}

/* ||X X^T - I||_F (rows = 0: X (r, n)) or ||X^T X - I||_F (X (n, r)), in double. */
static double orth_norm(const float *X, int r, int n, int transposed)
{
    double s = 0.0;
    for (int i = 0; i < r; i++)
        for (int j = 0; j < r; j++) {
            double v = 0.0;
            for (int k = 0; k < n; k++)
                v += transposed ? (double)X[k * r + i] * X[k * r + j] : (double)X[i * n + k] * X[j * n + k];
            v -= i == j;
            s += v * v;
        }
    return sqrt(s);
}

static double reg_now(pr_model *m)
{
    pr_error err = { 0 };
    (void)pr_model_take_aux_loss(m);
    if (pr_model_after_backward(m, &err))
        fail_msg("after_backward: %s", err.msg);
    return pr_model_take_aux_loss(m);
}

static void test_orth_reg(void **state)
{
    (void)state;
    pr_model *m = tiny_model();
    const pr_option_setting o[] = { { "init_r", "4", -1 }, { "target_r", "2", -1 }, { "orth_reg_weight", "0.7", -1 } };
    pr_module *mod = attach(m, o, 3);
    /* the independent value */
    double want = 0.0;
    for (int l = 0; l < ML; l++) {
        pr_module_param A = mparam(mod, "lora_A", l), B = mparam(mod, "lora_B", l);
        want += orth_norm(A.data, 4, (int)A.shape[1], 0) + orth_norm(B.data, 4, (int)B.shape[0], 1);
    }
    want *= 0.7 / (2.0 * ML);
    pr_model_zero_grad(m);
    double got = reg_now(m);
    assert_true(fabs(got - want) <= 1e-5 * fabs(want));
    /* the gradient after_backward added, against central differences of the aux value */
    const double eps = 1e-3;
    int checked = 0;
    for (int l = 0; l < ML; l++)
        for (int which = 0; which < 2; which++) {
            pr_module_param P = mparam(mod, which ? "lora_B" : "lora_A", l);
            pr_model_zero_grad(m);
            (void)reg_now(m);
            const float *g = grad_of(m, &P);
            assert_non_null(g);
            float *gc = malloc((size_t)P.numel * sizeof(float));
            memcpy(gc, g, (size_t)P.numel * sizeof(float));
            for (int64_t i = 0; i < P.numel; i += P.numel / 7 + 1) {
                float keep = P.data[i];
                P.data[i] = (float)(keep + eps);
                double up = reg_now(m);
                P.data[i] = (float)(keep - eps);
                double dn = reg_now(m);
                P.data[i] = keep;
                double fd = (up - dn) / (2 * eps);
                assert_true(fabs(fd - gc[i]) <= 1e-4 + 2e-2 * fmax(fabs(fd), fabs(gc[i])));
                checked++;
            }
            free(gc);
        }
    assert_true(checked >= 16);
    pr_model_free(m);
}

/* PEFT's budget_schedule, written again here. */
static int64_t want_budget(int64_t step, int64_t init, int64_t target, int64_t tinit, int64_t tfinal, int64_t total)
{
    if (step <= tinit)
        return init;
    if (step >= total - tfinal)
        return target;
    double mul = 1.0 - (double)(step - tinit) / (double)(total - tfinal - tinit);
    return (int64_t)((double)(init - target) * mul * mul * mul + (double)target);
}

static void test_budget_schedule(void **state)
{
    (void)state;
    enum { INIT_R = 6, TARGET_R = 2, TINIT = 2, TFINAL = 2, TOTAL = 10, STEPS = 13 };
    pr_model *m = tiny_model();
    const pr_option_setting o[] = { { "init_r", "6", -1 },  { "target_r", "2", -1 }, { "tinit", "2", -1 },
                                    { "tfinal", "2", -1 },  { "total_step", "10", -1 } };
    pr_module *mod = attach(m, o, 5);
    pr_module_param E = mparam(mod, "lora_E", -1);
    const int64_t n = E.numel, init = ML * INIT_R, target = ML * TARGET_R;
    assert_int_equal(n, init);
    int tok[MB * MT], tgt[MB * MT];
    tiny_batch(tok, tgt);
    pr_batch batch = { .tokens = tok, .targets = tgt, .B = MB, .T = MT };
    float pattern[ML * INIT_R];
    int have_pattern = 0, saw_shrink = 0;
    pr_model_set_training(m, 1);
    for (int step = 0; step < STEPS; step++) {
        pr_error err = { 0 };
        float loss;
        pr_model_set_step(m, (uint64_t)step);
        pr_model_zero_grad(m);
        if (pr_model_forward(m, &batch, &loss, &err) || pr_model_backward(m, &err) ||
            pr_model_after_backward(m, &err))
            fail_msg("step %d: %s", step, err.msg);
        for (int i = 0; i < pr_model_n_tensors(m); i++) {
            const pr_tensor_info *t = pr_model_tensor(m, i);
            if (t->kind == PR_TENSOR_MODULE && t->trainable && t->grad)
                for (int64_t j = 0; j < t->numel; j++)
                    t->data[j] -= 0.05f * t->grad[j];
        }
        pr_model_set_step(m, (uint64_t)step); /* as the trainer: on_step sees step + 1 steps taken */
        if (pr_model_after_step(m, &err))
            fail_msg("on_step at step %d: %s", step, err.msg);
        int64_t nonzero = 0;
        for (int64_t i = 0; i < n; i++)
            nonzero += E.data[i] != 0.0f;
        int64_t want = want_budget(step, init, target, TINIT, TFINAL, TOTAL);
        printf("step %d: %lld nonzero singular values, budget %lld\n", step, (long long)nonzero, (long long)want);
        assert_int_equal(nonzero, want);
        saw_shrink |= want < init && want > target;
        if (step == TOTAL - TFINAL) {
            for (int64_t i = 0; i < n; i++)
                pattern[i] = E.data[i] != 0.0f;
            have_pattern = 1;
        } else if (step > TOTAL - TFINAL) {
            for (int64_t i = 0; i < n; i++)
                assert_int_equal(E.data[i] != 0.0f, pattern[i] != 0.0f);
        }
    }
    assert_true(have_pattern && saw_shrink);
    pr_model_free(m);
}

/* total_step unset: the first on_step says so. */
static void test_total_step_required(void **state)
{
    (void)state;
    pr_model *m = tiny_model();
    (void)attach(m, NULL, 0);
    pr_error err = { 0 };
    pr_model_set_step(m, 0);
    assert_int_not_equal(pr_model_after_step(m, &err), PR_OK);
    assert_non_null(strstr(err.msg, "total_step"));
    pr_model_free(m);
}

static void test_checker(void **state)
{
    (void)state;
    check_options o = { 0 };
    int n_checks = 0, n_failed = 0;
    pr_error err = { 0 };
    FILE *out = tmpfile();
    assert_non_null(out);
    int rc = check_plugin_file(ADALORA_SO, &o, out, &n_checks, &n_failed, &err);
    if (rc || n_failed) {
        char line[512];
        rewind(out);
        while (fgets(line, sizeof line, out))
            fputs(line, stderr);
        if (rc)
            fprintf(stderr, "%s: %s\n", ADALORA_SO, err.msg);
    }
    fclose(out);
    printf("checker: %d checks, %d failed\n", n_checks, n_failed);
    assert_int_equal(rc, PR_OK);
    assert_true(n_checks >= 5);
    assert_int_equal(n_failed, 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_descriptor),
        cmocka_unit_test(test_counts_gpt2_small),
        cmocka_unit_test(test_identity),
        cmocka_unit_test(test_formula_merge),
        cmocka_unit_test(test_orth_reg),
        cmocka_unit_test(test_budget_schedule),
        cmocka_unit_test(test_total_step_required),
        cmocka_unit_test(test_checker),
    };
    return cmocka_run_group_tests(tests, setup_plugin, teardown_plugin);
}
