/* Tests of VeRA (plugins/vera.c: vera and vera_regen), LoRA-FA
 * (plugins/lora_fa.c) and LoRA+ (plugins/lora.c's loraplus_lr_ratio),
 * loaded as shared objects with dlopen.
 *
 * VeRA (Kopiczko, Blankevoort, Asano 2024, arXiv 2310.11454):
 *  - descriptors: typology (sharing across layers and sites as a set),
 *    PEFT's defaults (r 256, vera_dropout 0, d_initial 0.1,
 *    save_projection true for vera / false for vera_regen), vera_A and
 *    vera_B global and frozen (vera_regen: and regenerated), PEFT's keys;
 *  - counts at GPT-2 small (pr_module_plan_for on the gpt2-small preset)
 *    equal Hugging Face PEFT's, derived here:
 *      vera, default (r = 256 at c_attn, 768 -> 2304, 12 layers):
 *        trainable 12 * (256 + 2304) = 30,720 (vera_lambda_d r,
 *        vera_lambda_b d_out); buffers vera_A 256 x 768 = 196,608 and
 *        vera_B 2304 x 256 = 589,824, so 817,152 owned in all;
 *      vera at c_attn and mlp.c_proj (3072 -> 768): vera_A (256, 3072),
 *        vera_B (2304, 256) sized by the largest widths; trainable
 *        12 * ((256 + 2304) + (256 + 768)) = 43,008, buffers
 *        256 * (3072 + 2304) = 1,376,256;
 *    and on the tiny model the attached module registers one vera_A and
 *    one vera_B, (r, max_d_in) and (max_d_out, r);
 *  - init: vera_A within +-sqrt(6 / max_d_in), vera_B within
 *    +-sqrt(6 / r) (PEFT's _kaiming_init), vera_lambda_d all d_initial,
 *    vera_lambda_b zeros; identity at init: logits bit-identical to the
 *    base model's;
 *  - the formula: at qkv, ffn.up and ffn.down (three widths, so the slices
 *    A[:, :d_in] and B[:d_out] differ per site), with the lambdas moved
 *    off their init, merge adds exactly
 *      dW[i, j] = sum_k A[k, i] lambda_d[k] B[j, k] lambda_b[j]
 *    computed here in double from the module's tensors; merged logits
 *    equal the unmerged forward's (1e-5 of the largest logit), unmerge
 *    restores every weight bit for bit;
 *  - finite differences through the whole model of every lambda at those
 *    three sites at once (the shared, sliced A and B) and of the upstream
 *    LayerNorm gains;
 *  - save_projection: vera's module file holds vera_A and vera_B, vera_regen's
 *    does not (it is smaller by exactly their bytes, give or take the
 *    header); the other value of save_projection is refused, naming the
 *    other technique.
 *
 * LoRA-FA (Zhang et al. 2023, arXiv 2308.03303):
 *  - lora_A frozen but saved (no REGENERATE), PEFT LoRA keys; counts at
 *    GPT-2 small, r = 8 at c_attn: trainable 12 * 8 * 2304 = 221,184,
 *    frozen 12 * 8 * 768 = 73,728, owned 294,912 (= LoRA's);
 *  - identity at init; lora_A gets no gradient; merge adds
 *    (alpha / r) A^T.B^T exactly.
 *
 * LoRA+ (Hayou, Ghosh, Yu 2024, arXiv 2402.12354):
 *  - lora's option loraplus_lr_ratio (default 1) is lora_B's learning-rate
 *    multiplier in the tensor table (lr_mult 16 with 16; 1 by default),
 *    lora_A keeps the optimizer's rate; LoRA's count is unchanged.
 *
 * All three shared objects pass the conformance checker. */
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
#include <sys/stat.h>

#include "peftref/peftref.h"
#include "peftref/module.h"
#include "peftref/plugin.h"
#include "check.h"
#include "gradcheck.h"
#include "harness.h"

#define VERA_SO TEST_BUILDDIR "/plugins/.libs/vera.so"
#define LORA_FA_SO TEST_BUILDDIR "/plugins/.libs/lora_fa.so"
#define LORA_SO TEST_BUILDDIR "/plugins/.libs/lora.so"

static void *so_vera, *so_fa, *so_lora;
static const pr_technique *vera, *vera_regen, *lora_fa, *lora;

static int setup_plugins(void **state)
{
    (void)state;
    const pr_plugin *pv = th_plugin_open(VERA_SO, &so_vera);
    lora_fa = th_plugin_technique(LORA_FA_SO, &so_fa);
    lora = th_plugin_technique(LORA_SO, &so_lora);
    if (!pv || pv->n_techniques != 2 || !lora_fa || !lora)
        return -1;
    vera = pv->techniques[0];
    vera_regen = pv->techniques[1];
    return 0;
}

static int teardown_plugins(void **state)
{
    (void)state;
    if (so_vera)
        dlclose(so_vera);
    if (so_fa)
        dlclose(so_fa);
    if (so_lora)
        dlclose(so_lora);
    return 0;
}

static const pr_param_decl *param(const pr_technique *t, const char *name)
{
    for (uint32_t i = 0; i < t->n_params; i++)
        if (strcmp(t->params[i].name, name) == 0)
            return &t->params[i];
    return NULL;
}

/* ---- descriptors ------------------------------------------------------------ */

static void test_descriptors(void **state)
{
    (void)state;
    pr_error err = { 0 };
    const pr_technique *all[] = { vera, vera_regen, lora_fa, lora };
    for (int i = 0; i < 4; i++) {
        if (pr_technique_validate(all[i], &err))
            fail_msg("%s: %s", all[i]->name, err.msg);
        assert_non_null(all[i]->merge);
    }
    assert_string_equal(vera->name, "vera");
    assert_string_equal(vera_regen->name, "vera_regen");
    for (int i = 0; i < 2; i++) {
        const pr_technique *t = i ? vera_regen : vera;
        assert_non_null(strstr(t->citation, "2310.11454"));
        assert_int_equal(t->intra, PR_INTRA_FACTORISED);
        assert_int_equal(t->inter, PR_INTER_FIXED);
        assert_int_equal(t->adaptation, PR_ADAPT_REPARAMETERISATION);
        assert_int_equal(t->sharing, PR_SHARE_ACROSS_LAYERS);
        assert_int_equal(t->sharing_set,
                         PR_SHARE_BIT(PR_SHARE_ACROSS_LAYERS) | PR_SHARE_BIT(PR_SHARE_ACROSS_SITES));
        assert_int_equal(t->input, PR_INPUT_HIDDEN);
        assert_int_equal(t->insertion, PR_INSERT_PARALLEL);
        assert_int_equal(t->insertions, PR_INSERTIONS_PER_SITE_LAYER);
        assert_int_equal(t->integration, PR_INTEGRATE_SCALED_ADD);
        assert_string_equal(t->scale_expr, "1");
        assert_string_equal(t->peft_type, "VERA");
        assert_int_equal(t->default_sites, PR_SITE_BIT(PR_SITE_QKV));
        assert_non_null(t->flops_per_token);
        assert_true(th_option(t, "r")->def == 256);
        assert_true(th_option(t, "dropout")->def == 0);
        assert_string_equal(th_option(t, "dropout")->peft_name, "vera_dropout");
        assert_true(fabs(th_option(t, "d_initial")->def - 0.1) < 1e-12);
        assert_true(th_option(t, "save_projection")->def == (i ? 0 : 1));
        const uint32_t ab = PR_PARAM_FROZEN | (i ? PR_PARAM_REGENERATE : 0);
        const pr_param_decl *a = param(t, "vera_A"), *b = param(t, "vera_B");
        const pr_param_decl *ld = param(t, "vera_lambda_d"), *lb = param(t, "vera_lambda_b");
        assert_non_null(a);
        assert_non_null(b);
        assert_non_null(ld);
        assert_non_null(lb);
        assert_string_equal(a->shape, "r, max_d_in");
        assert_string_equal(b->shape, "max_d_out, r");
        assert_int_equal(a->scope, PR_SCOPE_GLOBAL);
        assert_int_equal(b->scope, PR_SCOPE_GLOBAL);
        assert_int_equal(a->flags, ab);
        assert_int_equal(b->flags, ab);
        assert_int_equal(a->init, PR_INIT_KAIMING_UNIFORM);
        assert_string_equal(a->peft_key, "base_model.vera_A");
        assert_string_equal(b->peft_key, "base_model.vera_B");
        assert_int_equal(ld->scope, PR_SCOPE_INSERTION);
        assert_int_equal(ld->flags & PR_PARAM_FROZEN, 0);
        assert_int_equal(ld->init, PR_INIT_CONSTANT);
        assert_string_equal(ld->init_arg, "d_initial");
        assert_int_equal(lb->init, PR_INIT_ZEROS);
        assert_string_equal(ld->peft_key, "{prefix}.vera_lambda_d");
        assert_string_equal(lb->peft_key, "{prefix}.vera_lambda_b");
    }

    assert_non_null(strstr(lora_fa->citation, "2308.03303"));
    assert_string_equal(lora_fa->peft_type, "LORA");
    assert_int_equal(param(lora_fa, "lora_A")->flags, PR_PARAM_FROZEN);
    assert_int_equal(param(lora_fa, "lora_B")->flags, 0);
    assert_string_equal(param(lora_fa, "lora_A")->peft_key, "{prefix}.lora_A.weight");
    assert_true(th_option(lora_fa, "r")->def == 8);
    assert_true(th_option(lora_fa, "alpha")->def == 8);
    assert_non_null(th_option(lora_fa, "use_rslora"));

    const pr_option_decl *lp = th_option(lora, "loraplus_lr_ratio");
    assert_non_null(lp);
    assert_int_equal(lp->type, PR_OPT_FLOAT);
    assert_true(lp->def == 1);
    assert_string_equal(param(lora, "lora_B")->lr_scale, "loraplus_lr_ratio");
    assert_null(param(lora, "lora_A")->lr_scale);

    assert_null(dlsym(so_vera, "vera_forward"));
    assert_null(dlsym(so_fa, "fa_forward"));
}

/* ---- counts at GPT-2 small --------------------------------------------------- */

static void plan_small(const pr_technique *t, uint32_t sites, const pr_option_setting *o, int n,
                       int64_t trainable, int64_t params, int insertions)
{
    pr_model_config c;
    assert_int_equal(pr_config_preset("gpt2-small", &c), PR_OK);
    pr_module_spec spec = { .technique = t, .sites = sites, .options = o, .n_options = n, .trainable = 1,
                            .seed = 3 };
    pr_module_plan plan;
    pr_error err = { 0 };
    if (pr_module_plan_for(&c, &spec, &plan, &err))
        fail_msg("plan %s: %s", t->name, err.msg);
    printf("%-10s GPT-2 small: %lld trainable of %lld, %d insertions\n", t->name, (long long)plan.trainable,
           (long long)plan.params, plan.insertions);
    assert_int_equal(plan.trainable, trainable);
    assert_int_equal(plan.params, params);
    assert_int_equal(plan.insertions, insertions);
}

static void test_counts_gpt2_small(void **state)
{
    (void)state;
    /* VeRA r = 256 at c_attn: 12 * (256 + 2304) trained; A 256 x 768, B 2304 x 256 */
    assert_int_equal(12 * (256 + 2304), 30720);
    plan_small(vera, 0, NULL, 0, 30720, 30720 + 256 * 768 + 2304 * 256, 12);
    plan_small(vera_regen, 0, NULL, 0, 30720, 817152, 12);
    /* c_attn and mlp.c_proj: A (256, 3072), B (2304, 256) */
    const uint32_t two = PR_SITE_BIT(PR_SITE_QKV) | PR_SITE_BIT(PR_SITE_FFN_DOWN);
    plan_small(vera, two, NULL, 0, 43008, 43008 + 256 * (3072 + 2304), 24);
    /* LoRA-FA r = 8 at c_attn: 12 * 8 * 2304 trained, 12 * 8 * 768 frozen */
    plan_small(lora_fa, 0, NULL, 0, 221184, 294912, 12);
    /* LoRA, with and without LoRA+: the count does not change */
    plan_small(lora, 0, NULL, 0, 294912, 294912, 12);
    const pr_option_setting lp[] = { { "loraplus_lr_ratio", "16", -1 } };
    plan_small(lora, 0, lp, 1, 294912, 294912, 12);
}

/* ---- the tiny model ------------------------------------------------------------ */

enum { MB = 2, MT = 6, MV = 64 };

typedef struct run {
    pr_model *m;
    pr_module *mod;
    int tokens[MB * MT], targets[MB * MT];
} run;

static run *run_new(void)
{
    run *r = calloc(1, sizeof *r);
    assert_non_null(r);
    pr_model_config c = th_config(&(th_shape){ 2, 32, 4, 4, 8, 128, MV, 16 }, 7);
    r->m = th_model_new(&c, MB, MT);
    for (int i = 0; i < MB * MT; i++) {
        r->tokens[i] = (i * 17 + 5) % MV;
        r->targets[i] = (i * 29 + 3) % MV;
    }
    return r;
}

static void run_free(run *r)
{
    pr_model_detach_modules(r->m);
    pr_model_free(r->m);
    free(r);
}

static double model_loss(void *arg)
{
    run *r = arg;
    return th_forward_ce(r->m, r->tokens, r->targets, MB, MT);
}

static float *logits_now(run *r)
{
    (void)model_loss(r);
    float *l = malloc((size_t)MB * MT * MV * sizeof(float));
    assert_non_null(l);
    memcpy(l, pr_model_logits(r->m), (size_t)MB * MT * MV * sizeof(float));
    return l;
}

static int attach(run *r, const pr_technique *t, uint32_t sites, const pr_option_setting *o, int n,
                  pr_error *err)
{
    pr_module_spec spec = { .technique = t, .sites = sites, .options = o, .n_options = n, .trainable = 1,
                            .seed = 11 };
    return pr_module_attach(r->m, &spec, &r->mod, err);
}

static const pr_tensor_info *mtensor(const run *r, const char *name)
{
    const pr_tensor_info *t = pr_model_find_tensor(r->m, name);
    if (!t)
        fail_msg("no tensor '%s'", name);
    return t;
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

static const struct {
    int site;
    const char *name;
} SITES3[] = { { PR_SITE_QKV, "qkv" }, { PR_SITE_FFN_UP, "ffn.up" }, { PR_SITE_FFN_DOWN, "ffn.down" } };
#define SITES3_MASK (PR_SITE_BIT(PR_SITE_QKV) | PR_SITE_BIT(PR_SITE_FFN_UP) | PR_SITE_BIT(PR_SITE_FFN_DOWN))

/* ---- VeRA: init, identity, sharing --------------------------------------------- */

static void test_vera_init_identity(void **state)
{
    (void)state;
    for (int regen = 0; regen < 2; regen++) {
        const pr_technique *t = regen ? vera_regen : vera;
        run *r = run_new();
        float *base = logits_now(r);
        pr_error err = { 0 };
        const pr_option_setting o[] = { { "r", "16", -1 } };
        if (attach(r, t, SITES3_MASK, o, 1, &err))
            fail_msg("attach %s: %s", t->name, err.msg);
        float *with = logits_now(r);
        assert_memory_equal(with, base, (size_t)MB * MT * MV * sizeof(float));

        char name[96];
        snprintf(name, sizeof name, "%s/vera_A", t->name);
        const pr_tensor_info *a = mtensor(r, name);
        snprintf(name, sizeof name, "%s/vera_B", t->name);
        const pr_tensor_info *b = mtensor(r, name);
        /* max_d_in = d_ff = 128 (ffn.down's input), max_d_out = 128 (ffn.up's output; qkv's is 96) */
        assert_int_equal(a->ndim, 2);
        assert_int_equal(a->shape[0], 16);
        assert_int_equal(a->shape[1], 128);
        assert_int_equal(b->shape[0], 128);
        assert_int_equal(b->shape[1], 16);
        assert_null(a->grad);
        assert_null(b->grad);
        double ba = sqrt(6.0 / 128), bb = sqrt(6.0 / 16), ma = 0, mb = 0;
        for (int64_t i = 0; i < a->numel; i++)
            ma = fmax(ma, fabs(a->data[i]));
        for (int64_t i = 0; i < b->numel; i++)
            mb = fmax(mb, fabs(b->data[i]));
        assert_true(ma <= ba && ma > 0.8 * ba);
        assert_true(mb <= bb && mb > 0.8 * bb);
        /* one A and one B for the module: no other copy in the table */
        int n_a = 0, n_ld = 0;
        for (int i = 0; i < pr_model_n_tensors(r->m); i++) {
            const char *nm = pr_model_tensor(r->m, i)->name;
            n_a += strstr(nm, "vera_A") != NULL || strstr(nm, "vera_B") != NULL;
            n_ld += strstr(nm, "vera_lambda_d") != NULL;
        }
        assert_int_equal(n_a, 2);
        assert_int_equal(n_ld, 6);
        for (int l = 0; l < 2; l++)
            for (int s = 0; s < 3; s++) {
                snprintf(name, sizeof name, "%s/h.%d.%s.vera_lambda_d", t->name, l, SITES3[s].name);
                const pr_tensor_info *ld = mtensor(r, name);
                assert_int_equal(ld->numel, 16);
                for (int k = 0; k < 16; k++)
                    assert_true(ld->data[k] == 0.1f);
                snprintf(name, sizeof name, "%s/h.%d.%s.vera_lambda_b", t->name, l, SITES3[s].name);
                const pr_tensor_info *lb = mtensor(r, name);
                int din, dout;
                assert_int_equal(pr_model_site_dims(r->m, SITES3[s].site, &din, &dout), PR_OK);
                assert_int_equal(lb->numel, dout);
                for (int j = 0; j < dout; j++)
                    assert_true(lb->data[j] == 0.0f);
            }
        /* trainable: 2 layers x (3 x 16 + 96 + 128 + 32); owned adds 16 x (128 + 128) */
        assert_int_equal(pr_module_trainable_count(r->mod), 2 * (3 * 16 + 96 + 128 + 32));
        assert_int_equal(pr_module_param_count(r->mod), 2 * (3 * 16 + 96 + 128 + 32) + 16 * 256);
        free(base);
        free(with);
        run_free(r);
    }
}

/* ---- VeRA: merge against the formula; merged forward = unmerged ---------------- */

static void fill_lambdas(run *r, const char *tech, unsigned seed)
{
    char pre[64];
    snprintf(pre, sizeof pre, "%s/", tech);
    for (int i = 0; i < pr_model_n_tensors(r->m); i++) {
        const pr_tensor_info *ti = pr_model_tensor(r->m, i);
        if (strncmp(ti->name, pre, strlen(pre)) == 0 && strstr(ti->name, "lambda"))
            gc_fill(ti->data, (size_t)ti->numel, seed + (unsigned)i, 0.8f);
    }
}

static void test_vera_formula_merge(void **state)
{
    (void)state;
    run *r = run_new();
    pr_error err = { 0 };
    const pr_option_setting o[] = { { "r", "6", -1 } };
    if (attach(r, vera, SITES3_MASK, o, 1, &err))
        fail_msg("attach: %s", err.msg);
    fill_lambdas(r, "vera", 500);
    const pr_tensor_info *A = mtensor(r, "vera/vera_A"), *B = mtensor(r, "vera/vera_B");
    const int R = 6, lda = (int)A->shape[1];
    float *orig[2][3];
    int din[3], dout[3];
    for (int l = 0; l < 2; l++)
        for (int s = 0; s < 3; s++)
            orig[l][s] = site_weight_copy(r, SITES3[s].site, l, &din[s], &dout[s]);
    float *before = logits_now(r);
    if (pr_module_merge(r->mod, &err))
        fail_msg("merge: %s", err.msg);
    double worst_all = 0;
    for (int l = 0; l < 2; l++)
        for (int s = 0; s < 3; s++) {
            char name[96];
            snprintf(name, sizeof name, "vera/h.%d.%s.vera_lambda_d", l, SITES3[s].name);
            const float *ld = mtensor(r, name)->data;
            snprintf(name, sizeof name, "vera/h.%d.%s.vera_lambda_b", l, SITES3[s].name);
            const float *lb = mtensor(r, name)->data;
            int d1, d2;
            float *now = site_weight_copy(r, SITES3[s].site, l, &d1, &d2);
            double worst = 0, big = 0;
            for (int i = 0; i < din[s]; i++)
                for (int j = 0; j < dout[s]; j++) {
                    double want = 0;
                    for (int k = 0; k < R; k++)
                        want += (double)A->data[k * lda + i] * ld[k] * B->data[j * R + k];
                    want *= lb[j];
                    double got = (double)now[i * dout[s] + j] - orig[l][s][i * dout[s] + j];
                    worst = fmax(worst, fabs(got - want));
                    big = fmax(big, fabs(want));
                }
            assert_true(big > 1e-2);
            assert_true(worst <= 1e-6 + 1e-4 * big);
            worst_all = fmax(worst_all, worst / big);
            free(now);
        }
    printf("vera merge: max |dW - formula| / max |dW| = %.3e over 3 sites x 2 layers\n", worst_all);
    float *merged = logits_now(r);
    double worst = 0, scale = 0;
    for (size_t i = 0; i < (size_t)MB * MT * MV; i++) {
        worst = fmax(worst, fabs((double)merged[i] - before[i]));
        scale = fmax(scale, fabs((double)before[i]));
    }
    printf("vera: max |merged - unmerged logits| = %.3e (max |logit| %.3e)\n", worst, scale);
    assert_true(worst <= 1e-5 * scale);
    assert_int_equal(pr_module_merge(r->mod, &err), PR_ERR_INVALID);
    assert_int_equal(pr_module_unmerge(r->mod, &err), PR_OK);
    for (int l = 0; l < 2; l++)
        for (int s = 0; s < 3; s++) {
            int d1, d2;
            float *now = site_weight_copy(r, SITES3[s].site, l, &d1, &d2);
            assert_memory_equal(now, orig[l][s], (size_t)din[s] * dout[s] * sizeof(float));
            free(now);
            free(orig[l][s]);
        }
    float *after = logits_now(r);
    assert_memory_equal(after, before, (size_t)MB * MT * MV * sizeof(float));
    free(before);
    free(merged);
    free(after);
    run_free(r);
}

/* ---- VeRA: gradients through the model at three widths at once ------------------ */

static void test_vera_gradients(void **state)
{
    (void)state;
    run *r = run_new();
    pr_error err = { 0 };
    const pr_option_setting o[] = { { "r", "5", -1 }, { "d_initial", "0.7", -1 } };
    if (attach(r, vera, SITES3_MASK, o, 2, &err))
        fail_msg("attach: %s", err.msg);
    fill_lambdas(r, "vera", 900);
    const char *gains[] = { "h.0.ln_1.weight", "h.0.ln_2.weight", "h.1.ln_1.weight" };
    for (int i = 0; i < 3; i++)
        assert_int_equal(pr_model_set_trainable(r->m, gains[i], 1, &err), PR_OK);
    pr_model_zero_grad(r->m);
    (void)model_loss(r);
    if (pr_model_backward(r->m, &err))
        fail_msg("backward: %s", err.msg);
    int fails = 0, checked = 0;
    for (int i = 0; i < pr_model_n_tensors(r->m); i++) {
        const pr_tensor_info *ti = pr_model_tensor(r->m, i);
        int mine = strncmp(ti->name, "vera/", 5) == 0, gain = 0;
        for (int k = 0; k < 3; k++)
            gain |= strcmp(ti->name, gains[k]) == 0;
        if (mine && !strstr(ti->name, "lambda")) {
            assert_null(ti->grad);   /* vera_A, vera_B: frozen */
            continue;
        }
        if (!mine && !gain)
            continue;
        assert_non_null(ti->grad);
        float *g = malloc((size_t)ti->numel * sizeof(float));
        assert_non_null(g);
        memcpy(g, ti->grad, (size_t)ti->numel * sizeof(float));
        double gmax = 0;
        for (int64_t j = 0; j < ti->numel; j++)
            gmax = fmax(gmax, fabs(g[j]));
        if (gmax <= 1e-7)
            fail_msg("%s: gradient is zero everywhere", ti->name);
        fails += gc_check(ti->name, ti->data, g, (size_t)ti->numel, model_loss, r, 3e-3, 5e-2, 1e-4, 6);
        free(g);
        checked += mine;
    }
    assert_int_equal(checked, 2 * 3 * 2);
    assert_int_equal(fails, 0);
    run_free(r);
}

/* ---- VeRA: save_projection ------------------------------------------------------ */

static long file_size(const char *path)
{
    struct stat st;
    assert_int_equal(stat(path, &st), 0);
    return (long)st.st_size;
}

static void test_vera_save_projection(void **state)
{
    (void)state;
    char *dir = th_scratch_dir("peftref-vera");
    char path[2][512];
    long size[2];
    for (int regen = 0; regen < 2; regen++) {
        const pr_technique *t = regen ? vera_regen : vera;
        run *r = run_new();
        pr_error err = { 0 };
        const pr_option_setting o[] = { { "r", "8", -1 } };
        if (attach(r, t, SITES3_MASK, o, 1, &err))
            fail_msg("attach %s: %s", t->name, err.msg);
        snprintf(path[regen], sizeof path[regen], "%s/%s.safetensors", dir, t->name);
        if (pr_module_save(r->mod, path[regen], NULL, &err))
            fail_msg("save %s: %s", t->name, err.msg);
        size[regen] = file_size(path[regen]);
        run_free(r);

        /* the other value of save_projection is the other technique */
        r = run_new();
        const pr_option_setting bad[] = { { "save_projection", regen ? "true" : "false", -1 } };
        memset(&err, 0, sizeof err);
        assert_int_not_equal(attach(r, t, 0, bad, 1, &err), PR_OK);
        printf("%s with save_projection=%s: %s\n", t->name, regen ? "true" : "false", err.msg);
        assert_non_null(strstr(err.msg, regen ? "technique vera " : "technique vera_regen"));
        run_free(r);
    }
    /* vera_A 8 x 128 and vera_B 128 x 8 floats are in vera's file only */
    long ab = (8 * 128 + 128 * 8) * 4;
    printf("module files: vera %ld bytes, vera_regen %ld bytes (vera_A + vera_B = %ld)\n", size[0], size[1], ab);
    assert_true(size[0] - size[1] >= ab);
    assert_true(size[0] - size[1] <= ab + 512);
    remove(path[0]);
    remove(path[1]);
    th_scratch_dir_free(dir);
}

/* ---- LoRA-FA ----------------------------------------------------------------------- */

static void test_lora_fa(void **state)
{
    (void)state;
    run *r = run_new();
    float *base = logits_now(r);
    pr_error err = { 0 };
    const pr_option_setting o[] = { { "r", "4", -1 }, { "alpha", "12", -1 } };
    if (attach(r, lora_fa, SITES3_MASK, o, 2, &err))
        fail_msg("attach: %s", err.msg);
    float *with = logits_now(r);
    assert_memory_equal(with, base, (size_t)MB * MT * MV * sizeof(float));
    /* trained: B only, 2 layers x 4 x (96 + 128 + 32); frozen A 2 x 4 x (32 + 32 + 128) */
    assert_int_equal(pr_module_trainable_count(r->mod), 2 * 4 * (96 + 128 + 32));
    assert_int_equal(pr_module_param_count(r->mod), 2 * 4 * (96 + 128 + 32) + 2 * 4 * (32 + 32 + 128));
    const pr_tensor_info *a0 = mtensor(r, "lora_fa/h.0.qkv.lora_A");
    assert_null(a0->grad);
    assert_non_null(mtensor(r, "lora_fa/h.0.qkv.lora_B")->grad);
    for (int i = 0; i < pr_model_n_tensors(r->m); i++) {
        const pr_tensor_info *ti = pr_model_tensor(r->m, i);
        if (strstr(ti->name, "lora_fa/") == ti->name && strstr(ti->name, "lora_B"))
            gc_fill(ti->data, (size_t)ti->numel, 700u + (unsigned)i, 0.5f);
    }
    float *orig[2][3];
    int din[3], dout[3];
    for (int l = 0; l < 2; l++)
        for (int s = 0; s < 3; s++)
            orig[l][s] = site_weight_copy(r, SITES3[s].site, l, &din[s], &dout[s]);
    float *before = logits_now(r);
    if (pr_module_merge(r->mod, &err))
        fail_msg("merge: %s", err.msg);
    for (int l = 0; l < 2; l++)
        for (int s = 0; s < 3; s++) {
            char name[96];
            snprintf(name, sizeof name, "lora_fa/h.%d.%s.lora_A", l, SITES3[s].name);
            const float *A = mtensor(r, name)->data;
            snprintf(name, sizeof name, "lora_fa/h.%d.%s.lora_B", l, SITES3[s].name);
            const float *B = mtensor(r, name)->data;
            int d1, d2;
            float *now = site_weight_copy(r, SITES3[s].site, l, &d1, &d2);
            double worst = 0, big = 0;
            for (int i = 0; i < din[s]; i++)
                for (int j = 0; j < dout[s]; j++) {
                    double want = 0;
                    for (int k = 0; k < 4; k++)
                        want += (double)A[k * din[s] + i] * B[j * 4 + k];
                    want *= 12.0 / 4;
                    worst = fmax(worst, fabs((double)now[i * dout[s] + j] - orig[l][s][i * dout[s] + j] - want));
                    big = fmax(big, fabs(want));
                }
            assert_true(big > 1e-2);
            assert_true(worst <= 1e-6 + 1e-4 * big);
            free(now);
            free(orig[l][s]);
        }
    float *merged = logits_now(r);
    double worst = 0, scale = 0;
    for (size_t i = 0; i < (size_t)MB * MT * MV; i++) {
        worst = fmax(worst, fabs((double)merged[i] - before[i]));
        scale = fmax(scale, fabs((double)before[i]));
    }
    printf("lora_fa: max |merged - unmerged logits| = %.3e (max |logit| %.3e)\n", worst, scale);
    assert_true(worst <= 1e-5 * scale);
    assert_int_equal(pr_module_unmerge(r->mod, &err), PR_OK);
    float *after = logits_now(r);
    assert_memory_equal(after, before, (size_t)MB * MT * MV * sizeof(float));
    free(base);
    free(with);
    free(before);
    free(merged);
    free(after);
    run_free(r);
}

/* ---- LoRA+ --------------------------------------------------------------------------- */

static void test_loraplus_lr_mult(void **state)
{
    (void)state;
    for (int on = 0; on < 2; on++) {
        run *r = run_new();
        pr_error err = { 0 };
        const pr_option_setting o[] = { { "loraplus_lr_ratio", "16", -1 } };
        if (attach(r, lora, 0, o, on, &err))
            fail_msg("attach: %s", err.msg);
        for (int l = 0; l < 2; l++) {
            char name[64];
            snprintf(name, sizeof name, "lora/h.%d.qkv.lora_B", l);
            const pr_tensor_info *b = mtensor(r, name);
            snprintf(name, sizeof name, "lora/h.%d.qkv.lora_A", l);
            const pr_tensor_info *a = mtensor(r, name);
            printf("loraplus_lr_ratio %s: lora_B lr_mult %g, lora_A lr_mult %g\n", on ? "16" : "default",
                   (double)b->lr_mult, (double)a->lr_mult);
            assert_true(b->lr_mult == (on ? 16.0f : 1.0f));
            /* lora_A keeps the optimizer's rate (0 in the table means 1) */
            assert_true(a->lr_mult == 0.0f || a->lr_mult == 1.0f);
        }
        run_free(r);
    }
}

/* ---- the conformance checker ----------------------------------------------------------- */

static void conformance_case(const char *path, int min_checks)
{
    check_options co = { 0 };
    FILE *out = tmpfile();
    assert_non_null(out);
    int n_checks = 0, n_failed = 0;
    pr_error err = { 0 };
    int rc = check_plugin_file(path, &co, out, &n_checks, &n_failed, &err);
    rewind(out);
    char line[1024];
    while (fgets(line, sizeof line, out))
        if ((rc || n_failed) && strncmp(line, "PASS", 4) != 0)
            fputs(line, stderr);
    if (rc)
        fprintf(stderr, "check: %s\n", err.msg);
    fclose(out);
    printf("%s: %d checks, %d failed\n", path, n_checks, n_failed);
    assert_int_equal(rc, PR_OK);
    assert_true(n_checks >= min_checks);
    assert_int_equal(n_failed, 0);
}

static void test_conformance(void **state)
{
    (void)state;
    /* load; per technique gradient at 7 GPT-2 sites, params, determinism,
     * accumulation, save-load, options, finite */
    conformance_case(VERA_SO, 1 + 2 * 13);
    conformance_case(LORA_FA_SO, 1 + 13);
    conformance_case(LORA_SO, 1 + 13);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_descriptors),
        cmocka_unit_test(test_counts_gpt2_small),
        cmocka_unit_test(test_vera_init_identity),
        cmocka_unit_test(test_vera_formula_merge),
        cmocka_unit_test(test_vera_gradients),
        cmocka_unit_test(test_vera_save_projection),
        cmocka_unit_test(test_lora_fa),
        cmocka_unit_test(test_loraplus_lr_mult),
        cmocka_unit_test(test_conformance),
    };
    return cmocka_run_group_tests(tests, setup_plugins, teardown_plugins);
}
