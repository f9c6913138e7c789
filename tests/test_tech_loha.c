/* Tests of LoHa (plugins/loha.c; Hyeon-Woo et al. 2022, arXiv 2108.06098)
 * and LoKr (plugins/lokr.c; LyCORIS, Yeh et al. 2024, arXiv 2309.14859),
 * loaded as shared objects.
 *
 *  - parameter counts at GPT-2 small (L 12, d 768, F 3072) with default
 *    options from pr_module_plan_for, against Hugging Face PEFT's for an
 *    nn.Linear of c_attn's shape (PEFT's LoHa/LoKr accept no Conv1D):
 *      LoHa r=8 on c_attn (768 -> 2304): 12 * 2*8*(2304 + 768) = 589,824.
 *      LoKr r=8 on c_attn: PEFT's factorization(2304, -1) = (48, 48),
 *        factorization(768, -1) = (24, 32); use_w1 (decompose_both False);
 *        r = 8 < max(48, 32)/2 = 24, so lokr_w2_a (48, 8) and lokr_w2_b
 *        (8, 32): 48*24 + 48*8 + 8*32 = 1152 + 384 + 256 = 1,792 per layer,
 *        12 * 1,792 = 21,504.
 *      LoKr r=8 on every projection site (q, k, v 768 -> 768 as one each,
 *        o, ffn.up 768 -> 3072 = (48, 64), ffn.down 3072 -> 768):
 *        768x768: 24*24 + 32*8 + 8*32 = 1,088; up: 48*24 + 64*8 + 8*32 = 1,920;
 *        down: 24*48 + 32*8 + 8*64 = 1,920; per layer qkv + o + up + down =
 *        1,792 + 1,088 + 1,920 + 1,920 = 6,720, total 80,640.
 *  - the weight delta merge() folds equals the formula computed here in
 *    double from the factors: LoHa (alpha/r) (w1_a w1_b) (.) (w2_a w2_b),
 *    LoKr (alpha/r) w1 (x) (w2_a w2_b), transposed to [d_in, d_out]
 *    (1e-6 + 1e-4 of the largest delta), on a tiny model at q and ffn.up;
 *  - merged logits equal unmerged within 1e-5 of the largest logit; unmerge
 *    restores the base tensors and the logits bit for bit;
 *  - identity at init (hada_w2_b = 0, lokr_w1 = 0): bit-identical logits;
 *  - both plugins pass the conformance checker (core/plugins/check.h). */
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
#include "gradcheck.h"
#include "harness.h"

#define LOHA_SO TEST_BUILDDIR "/plugins/.libs/loha.so"
#define LOKR_SO TEST_BUILDDIR "/plugins/.libs/lokr.so"

static void *loha_so, *lokr_so;
static const pr_technique *loha, *lokr;

static int setup_plugins(void **state)
{
    (void)state;
    loha = th_plugin_technique(LOHA_SO, &loha_so);
    lokr = th_plugin_technique(LOKR_SO, &lokr_so);
    return loha && lokr ? 0 : -1;
}

static int teardown_plugins(void **state)
{
    (void)state;
    if (loha_so)
        dlclose(loha_so);
    if (lokr_so)
        dlclose(lokr_so);
    return 0;
}

static const uint32_t ALL_SITES = PR_SITE_BIT(PR_SITE_QKV) | PR_SITE_BIT(PR_SITE_O) |
                                  PR_SITE_BIT(PR_SITE_FFN_UP) | PR_SITE_BIT(PR_SITE_FFN_DOWN);

static int64_t plan_count(const pr_technique *t, uint32_t sites, int *insertions)
{
    pr_model_config cfg = th_config(&(th_shape){ 12, 768, 12, 12, 64, 3072, 50257, 1024 }, 7);
    pr_module_spec spec = { .technique = t, .sites = sites, .trainable = 1, .seed = 11 };
    pr_module_plan plan;
    pr_error err = { 0 };
    if (pr_module_plan_for(&cfg, &spec, &plan, &err))
        fail_msg("plan %s: %s", t->name, err.msg);
    assert_int_equal(plan.params, plan.trainable);
    *insertions = plan.insertions;
    return plan.params;
}

static void test_descriptors(void **state)
{
    (void)state;
    pr_error err = { 0 };
    assert_int_equal(pr_technique_validate(loha, &err), PR_OK);
    assert_int_equal(pr_technique_validate(lokr, &err), PR_OK);
    assert_string_equal(loha->name, "loha");
    assert_string_equal(lokr->name, "lokr");
    assert_string_equal(loha->peft_type, "LOHA");
    assert_string_equal(lokr->peft_type, "LOKR");
    assert_non_null(strstr(loha->citation, "2108.06098"));
    assert_non_null(strstr(lokr->citation, "2309.14859"));
    const pr_technique *both[] = { loha, lokr };
    for (int i = 0; i < 2; i++) {
        assert_int_equal(both[i]->integration, PR_INTEGRATE_WEIGHT_DELTA);
        assert_int_equal(both[i]->adaptation, PR_ADAPT_REPARAMETERISATION);
        assert_int_equal(both[i]->intra, PR_INTRA_FACTORISED);
        assert_true(th_option(both[i], "r")->def == 8);
        assert_true(th_option(both[i], "alpha")->def == 8);
        assert_string_equal(both[i]->scale_expr, "alpha / r");
        assert_non_null(both[i]->merge);
    }
    assert_true(th_option(lokr, "decompose_factor")->def == -1);
    const char *names[] = { "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b" };
    for (int i = 0; i < 4; i++)
        assert_string_equal(loha->params[i].name, names[i]);
    assert_int_equal(loha->params[3].init, PR_INIT_ZEROS);
    assert_string_equal(lokr->params[0].name, "lokr_w1");
    assert_int_equal(lokr->params[0].init, PR_INIT_ZEROS);
    assert_string_equal(lokr->params[1].name, "lokr_w2_a");
    assert_string_equal(lokr->params[2].name, "lokr_w2_b");
}

static void test_counts_gpt2_small(void **state)
{
    (void)state;
    int ins;
    assert_int_equal(plan_count(loha, PR_SITE_BIT(PR_SITE_QKV), &ins), 589824);
    assert_int_equal(ins, 12);
    assert_int_equal(plan_count(lokr, PR_SITE_BIT(PR_SITE_QKV), &ins), 21504);
    assert_int_equal(ins, 12);
    assert_int_equal(plan_count(lokr, ALL_SITES, &ins), 80640);
    assert_int_equal(ins, 48);
    /* LoHa on every site: 12 * 2*8 * ((768+2304) + (768+768) + 2 * (768+3072)) */
    assert_int_equal(plan_count(loha, ALL_SITES, &ins), (int64_t)12 * 16 * (3072 + 1536 + 2 * 3840));
}

/* ---- a tiny model -------------------------------------------------------- */

enum { MB = 2, MT = 6, MV = 64, TL = 2, TC = 32, TF = 128 };

typedef struct run {
    pr_model *m;
    int tokens[MB * MT], targets[MB * MT];
} run;

static run *run_new(void)
{
    run *r = calloc(1, sizeof *r);
    assert_non_null(r);
    pr_model_config c = th_config(&(th_shape){ TL, TC, 4, 4, 8, TF, MV, 16 }, 7);
    pr_error err = { 0 };
    if (pr_model_create(&c, &r->m, &err) || pr_model_reserve(r->m, MB, MT, &err))
        fail_msg("model: %s", err.msg);
    for (int i = 0; i < MB * MT; i++) {
        r->tokens[i] = (i * 17 + 5) % MV;
        r->targets[i] = (i * 29 + 3) % MV;
    }
    return r;
}

static void run_free(run *r)
{
    pr_model_free(r->m);
    free(r);
}

static float *logits_now(run *r)
{
    (void)th_forward_ce(r->m, r->tokens, r->targets, MB, MT);
    float *l = malloc((size_t)MB * MT * MV * sizeof(float));
    assert_non_null(l);
    memcpy(l, pr_model_logits(r->m), (size_t)MB * MT * MV * sizeof(float));
    return l;
}

static const pr_option_setting tiny_opts[] = { { "r", "2", -1 }, { "alpha", "5", -1 } };
static const uint32_t TINY_SITES = PR_SITE_BIT(PR_SITE_Q) | PR_SITE_BIT(PR_SITE_FFN_UP);

static pr_module *attach(run *r, const pr_technique *t)
{
    pr_module_spec spec = { .technique = t, .sites = TINY_SITES, .options = tiny_opts, .n_options = 2,
                            .trainable = 1, .seed = 11 };
    return th_attach(r->m, &spec);
}

static const pr_tensor_info *mtensor(const run *r, const char *mod, int layer, const char *site,
                                     const char *param)
{
    char name[128];
    snprintf(name, sizeof name, "%s/h.%d.%s.%s", mod, layer, site, param);
    const pr_tensor_info *t = pr_model_find_tensor(r->m, name);
    if (!t)
        fail_msg("no tensor %s", name);
    return t;
}

static void fill_all(run *r)
{
    int n = 0;
    for (int i = 0; i < pr_model_n_tensors(r->m); i++) {
        const pr_tensor_info *t = pr_model_tensor(r->m, i);
        if (t->kind == PR_TENSOR_MODULE)
            gc_fill(t->data, (size_t)t->numel, 300u + (unsigned)n++, 0.4f);
    }
    assert_true(n > 0);
}

static float *site_weight_copy(run *r, int site, int layer, int *d_in, int *d_out)
{
    float *w, *b;
    int ld;
    pr_error err = { 0 };
    assert_int_equal(pr_model_site_weight(r->m, site, layer, &w, &ld, &b, &err), PR_OK);
    assert_int_equal(pr_model_site_dims(r->m, site, d_in, d_out), PR_OK);
    float *c = malloc((size_t)*d_in * *d_out * sizeof(float));
    assert_non_null(c);
    for (int k = 0; k < *d_in; k++)
        memcpy(c + (size_t)k * *d_out, w + (size_t)k * ld, (size_t)*d_out * sizeof(float));
    return c;
}

/* The expected delta [d_in, d_out] from the factors, in double. */
static void want_loha(const run *r, int layer, const char *site, int din, int dout, double s, double *want)
{
    const pr_tensor_info *a1 = mtensor(r, "loha", layer, site, "hada_w1_a");
    const pr_tensor_info *b1 = mtensor(r, "loha", layer, site, "hada_w1_b");
    const pr_tensor_info *a2 = mtensor(r, "loha", layer, site, "hada_w2_a");
    const pr_tensor_info *b2 = mtensor(r, "loha", layer, site, "hada_w2_b");
    const int rk = (int)a1->shape[1];
    assert_int_equal(rk, 2);
    assert_true(a1->shape[0] == dout && b1->shape[1] == din);
    for (int o = 0; o < dout; o++)
        for (int i = 0; i < din; i++) {
            double p1 = 0, p2 = 0;
            for (int t = 0; t < rk; t++) {
                p1 += (double)a1->data[o * rk + t] * b1->data[t * din + i];
                p2 += (double)a2->data[o * rk + t] * b2->data[t * din + i];
            }
            want[(size_t)i * dout + o] = s * p1 * p2;
        }
}

/* PEFT's factorization(D, -1), written here from its definition: the
 * largest divisor g with g*g <= D, (g, D/g). */
static void fact(int dim, int *small, int *large)
{
    int g = 1;
    for (int k = 1; k * k <= dim; k++)
        if (dim % k == 0)
            g = k;
    *small = g;
    *large = dim / g;
}

static void want_lokr(const run *r, int layer, const char *site, int din, int dout, double s, double *want)
{
    const pr_tensor_info *w1 = mtensor(r, "lokr", layer, site, "lokr_w1");
    const pr_tensor_info *a = mtensor(r, "lokr", layer, site, "lokr_w2_a");
    const pr_tensor_info *b = mtensor(r, "lokr", layer, site, "lokr_w2_b");
    int l, k, m, n;
    fact(dout, &l, &k);
    fact(din, &m, &n);
    assert_true(w1->shape[0] == l && w1->shape[1] == m && a->shape[0] == k && b->shape[1] == n);
    const int rk = (int)a->shape[1];
    assert_int_equal(rk, 2);
    /* torch.kron(w1, w2)[a k + b, c n + d] = w1[a, c] w2[b, d] */
    for (int o = 0; o < dout; o++)
        for (int i = 0; i < din; i++) {
            int ia = o / k, ib = o % k, ic = i / n, id = i % n;
            double w2 = 0;
            for (int t = 0; t < rk; t++)
                w2 += (double)a->data[ib * rk + t] * b->data[t * n + id];
            want[(size_t)i * dout + o] = s * w1->data[ia * m + ic] * w2;
        }
}

static void check_deltas_and_merge(const pr_technique *t, int is_lokr)
{
    run *r = run_new();
    float *base = logits_now(r);
    pr_module *mod = attach(r, t);
    float *init = logits_now(r);
    /* identity at init: hada_w2_b = 0 / lokr_w1 = 0 */
    assert_memory_equal(init, base, (size_t)MB * MT * MV * sizeof(float));
    fill_all(r);
    float *unmerged = logits_now(r);

    const struct { int site; const char *name; } sites[] = { { PR_SITE_Q, "q" }, { PR_SITE_FFN_UP, "ffn.up" } };
    float *orig[TL][2];
    int din[2], dout[2];
    for (int l = 0; l < TL; l++)
        for (int s = 0; s < 2; s++)
            orig[l][s] = site_weight_copy(r, sites[s].site, l, &din[s], &dout[s]);
    pr_error err = { 0 };
    if (pr_module_merge(mod, &err))
        fail_msg("merge: %s", err.msg);
    for (int l = 0; l < TL; l++)
        for (int s = 0; s < 2; s++) {
            int d1, d2;
            float *now = site_weight_copy(r, sites[s].site, l, &d1, &d2);
            double *want = malloc((size_t)din[s] * dout[s] * sizeof(double));
            assert_non_null(want);
            if (is_lokr)
                want_lokr(r, l, sites[s].name, din[s], dout[s], 5.0 / 2.0, want);
            else
                want_loha(r, l, sites[s].name, din[s], dout[s], 5.0 / 2.0, want);
            double worst = 0, big = 0;
            for (size_t q = 0; q < (size_t)din[s] * dout[s]; q++) {
                double got = (double)now[q] - orig[l][s][q];
                worst = fmax(worst, fabs(got - want[q]));
                big = fmax(big, fabs(want[q]));
            }
            printf("%s h.%d.%s: max |delta - formula| = %.3e (max |delta| %.3e)\n", t->name, l,
                   sites[s].name, worst, big);
            assert_true(big > 1e-3);
            assert_true(worst <= 1e-6 + 1e-4 * big);
            free(want);
            free(now);
            free(orig[l][s]);
        }
    float *merged = logits_now(r);
    double worst = 0, scale = 0;
    for (size_t q = 0; q < (size_t)MB * MT * MV; q++) {
        worst = fmax(worst, fabs((double)merged[q] - unmerged[q]));
        scale = fmax(scale, fabs((double)unmerged[q]));
    }
    printf("%s merge: max |merged - unmerged| = %.3e (max |logit| %.3e)\n", t->name, worst, scale);
    assert_true(scale > 0.1);
    assert_true(worst <= 1e-5 * scale);
    /* the module changes the output once trained */
    double moved = 0;
    for (size_t q = 0; q < (size_t)MB * MT * MV; q++)
        moved = fmax(moved, fabs((double)unmerged[q] - base[q]));
    assert_true(moved > 1e-4);
    if (pr_module_unmerge(mod, &err))
        fail_msg("unmerge: %s", err.msg);
    float *after = logits_now(r);
    assert_memory_equal(after, unmerged, (size_t)MB * MT * MV * sizeof(float));
    free(base);
    free(init);
    free(unmerged);
    free(merged);
    free(after);
    run_free(r);
}

static void test_loha_formula_merge(void **state)
{
    (void)state;
    check_deltas_and_merge(loha, 0);
}

static void test_lokr_formula_merge(void **state)
{
    (void)state;
    check_deltas_and_merge(lokr, 1);
}

static void run_checker(const char *path)
{
    check_options o = { 0 };
    int n_checks = 0, n_failed = 0;
    pr_error err = { 0 };
    FILE *out = tmpfile();
    assert_non_null(out);
    int rc = check_plugin_file(path, &o, out, &n_checks, &n_failed, &err);
    if (rc || n_failed) {
        char line[512];
        rewind(out);
        while (fgets(line, sizeof line, out))
            fputs(line, stderr);
        if (rc)
            fprintf(stderr, "%s: %s\n", path, err.msg);
    }
    fclose(out);
    printf("checker %s: %d checks, %d failed\n", path, n_checks, n_failed);
    assert_int_equal(rc, PR_OK);
    assert_true(n_checks >= 5);
    assert_int_equal(n_failed, 0);
}

static void test_checker(void **state)
{
    (void)state;
    run_checker(LOHA_SO);
    run_checker(LOKR_SO);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_descriptors),
        cmocka_unit_test(test_counts_gpt2_small),
        cmocka_unit_test(test_loha_formula_merge),
        cmocka_unit_test(test_lokr_formula_merge),
        cmocka_unit_test(test_checker),
    };
    return cmocka_run_group_tests(tests, setup_plugins, teardown_plugins);
}
