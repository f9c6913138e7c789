/* Tests of the concatenation techniques: prompt tuning (plugins/
 * prompt_tuning.c, Lester et al. 2021) and prefix tuning with and without
 * its MLP reparameterisation (plugins/prefix_tuning.c, Li and Liang 2021),
 * loaded with dlopen from the build tree and attached to tiny GPT-2 models.
 *
 *  - descriptors: typology, options and defaults, parameters, fold fields,
 *    and the loader's own validation (pr_technique_validate);
 *  - parameter counts from pr_module_plan_for and from attaching, against
 *    the formulas computed here, on two GPT-2 shapes (L=2,C=32,H=4,F=128
 *    and L=3,C=48,H=6,F=96) and, for prefix tuning, a grouped-query shape
 *    where d_kv = n_kv_heads * d_head differs from d_model;
 *  - prompt initialisation by option init: normal(0, init_std), rows of the
 *    token embedding, and the embeddings of init_text's tokens, cycled;
 *  - neither technique is the identity at initialisation, so instead: with
 *    the module attached the model runs on the virtual positions, the real
 *    tokens' logits are finite, differ from the base model's, and change
 *    when the prompt / prefix changes;
 *  - finite differences of the mean cross-entropy (recomputed in double
 *    from the logits) against the analytic gradient of every trainable
 *    tensor, through the whole model, parameters moved to random values
 *    first: eps 3e-3, an entry passes when |fd - g| <= 1e-4 + 5e-2 *
 *    max(|fd|, |g|) (test_lora's tolerances, on the same kind of model);
 *  - fold: the plain prefixes prefix_tuning_mlp's fold() makes (called
 *    directly, from either insertion of a layer), loaded into a
 *    prefix_tuning module of the same name, reproduce the MLP module's
 *    logits to 1e-5 of the largest logit;
 *  - the conformance checker (core/plugins/check.c) on both shared objects. */
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

#define PROMPT_SO TEST_BUILDDIR "/plugins/.libs/prompt_tuning.so"
#define PREFIX_SO TEST_BUILDDIR "/plugins/.libs/prefix_tuning.so"

#define FD_EPS 3e-3
#define FD_RTOL 5e-2
#define FD_ATOL 1e-4
#define FD_PROBES 6

static void *prompt_so, *prefix_so;
static const pr_technique *prompt, *prefix, *prefix_mlp;

static const pr_technique *technique_of(const pr_plugin *p, const char *name)
{
    for (uint32_t i = 0; p && i < p->n_techniques; i++)
        if (strcmp(p->techniques[i]->name, name) == 0)
            return p->techniques[i];
    return NULL;
}

static int setup_plugins(void **state)
{
    (void)state;
    const pr_plugin *pp = th_plugin_open(PROMPT_SO, &prompt_so);
    const pr_plugin *px = th_plugin_open(PREFIX_SO, &prefix_so);
    if (!prompt_so || !prefix_so)
        return -1;
    prompt = technique_of(pp, "prompt_tuning");
    prefix = technique_of(px, "prefix_tuning");
    prefix_mlp = technique_of(px, "prefix_tuning_mlp");
    return prompt && prefix && prefix_mlp ? 0 : -1;
}

static int teardown_plugins(void **state)
{
    (void)state;
    if (prompt_so)
        dlclose(prompt_so);
    if (prefix_so)
        dlclose(prefix_so);
    return 0;
}

/* ---- models ------------------------------------------------------------------------------------ */

typedef struct shape {
    int L, C, H, Hkv, hd, F;
} shape;

static const shape SHAPE_A = { 2, 32, 4, 4, 8, 128 };
static const shape SHAPE_B = { 3, 48, 6, 6, 8, 96 };
static const shape SHAPE_GQA = { 3, 24, 4, 2, 5, 40 };

enum { MB = 2, MT = 6, MV = 64 };

static pr_model_config config_of(shape s)
{
    return th_config(&(th_shape){ s.L, s.C, s.H, s.Hkv, s.hd, s.F, MV, 32 }, 7);
}

typedef struct fixture {
    pr_model *m;
    int tokens[MB * MT], targets[MB * MT];
} fixture;

static fixture *fixture_new(shape s)
{
    fixture *f = calloc(1, sizeof *f);
    assert_non_null(f);
    pr_model_config c = config_of(s);
    pr_error err = { 0 };
    if (pr_model_create(&c, &f->m, &err) || pr_model_reserve(f->m, MB, MT, &err))
        fail_msg("model: %s", err.msg);
    for (int i = 0; i < MB * MT; i++) {
        f->tokens[i] = (i * 17 + 5) % MV;
        f->targets[i] = (i * 29 + 3) % MV;
    }
    return f;
}

static void fixture_free(fixture *f)
{
    pr_model_free(f->m);
    free(f);
}

static pr_module *attach(fixture *f, const pr_technique *t, const char *name, const pr_option_setting *o, int no,
                         const int *layers, int nl, uint64_t seed)
{
    pr_module_spec s = { .technique = t, .name = name, .options = o, .n_options = no, .layers = layers,
                         .n_layers = nl, .trainable = 1, .seed = seed };
    return th_attach(f->m, &s);
}

/* Mean cross-entropy of a forward, recomputed in double from the logits. */
static double model_loss(void *arg)
{
    fixture *f = arg;
    return th_forward_ce(f->m, f->tokens, f->targets, MB, MT);
}

/* The logits of one forward, copied. */
static float *logits_of(fixture *f)
{
    (void)model_loss(f);
    size_t n = (size_t)MB * MT * MV;
    float *l = malloc(n * sizeof *l);
    assert_non_null(l);
    memcpy(l, pr_model_logits(f->m), n * sizeof *l);
    return l;
}

static double max_abs(const float *a, size_t n)
{
    double m = 0.0;
    for (size_t i = 0; i < n; i++)
        m = fmax(m, fabs((double)a[i]));
    return m;
}

static int all_finite(const float *a, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (!isfinite(a[i]))
            return 0;
    return 1;
}

/* Every tensor of the table whose name starts with prefix, in table order. */
static int module_tensors(const pr_model *m, const char *pre, const pr_tensor_info **out, int cap)
{
    int n = 0;
    for (int i = 0; i < pr_model_n_tensors(m); i++) {
        const pr_tensor_info *t = pr_model_tensor(m, i);
        if (strncmp(t->name, pre, strlen(pre)) == 0 && n < cap)
            out[n++] = t;
    }
    return n;
}

/* Finite differences of every tensor named pre* after one backward. */
static int grad_check_module(fixture *f, const char *pre, int expect_tensors)
{
    const pr_tensor_info *ts[64];
    int n = module_tensors(f->m, pre, ts, 64);
    assert_int_equal(n, expect_tensors);
    pr_error err = { 0 };
    pr_model_zero_grad(f->m);
    (void)model_loss(f);
    if (pr_model_backward(f->m, &err))
        fail_msg("backward: %s", err.msg);
    int fails = 0;
    for (int k = 0; k < n; k++) {
        assert_non_null(ts[k]->grad);
        assert_true(ts[k]->trainable);
        float *g = malloc((size_t)ts[k]->numel * sizeof *g);
        assert_non_null(g);
        memcpy(g, ts[k]->grad, (size_t)ts[k]->numel * sizeof *g);
        double gmax = max_abs(g, (size_t)ts[k]->numel);
        if (gmax == 0.0)
            fail_msg("%s: the gradient is all zeros", ts[k]->name);
        fails += gc_check(ts[k]->name, ts[k]->data, g, (size_t)ts[k]->numel, model_loss, f, FD_EPS, FD_RTOL,
                          FD_ATOL, FD_PROBES);
        free(g);
    }
    return fails;
}

/* ---- descriptors --------------------------------------------------------------------------------- */

static void test_descriptors(void **state)
{
    (void)state;
    pr_error err = { 0 };
    const pr_technique *all[] = { prompt, prefix, prefix_mlp };
    for (int i = 0; i < 3; i++) {
        if (pr_technique_validate(all[i], &err))
            fail_msg("%s: %s", all[i]->name, err.msg);
        assert_int_equal(all[i]->abi_major, PR_ABI_MAJOR);
        assert_int_equal(all[i]->inter, PR_INTER_DYNAMIC);
        assert_int_equal(all[i]->adaptation, PR_ADAPT_ADDITION);
        assert_int_equal(all[i]->insertion, PR_INSERT_CONCATENATIVE);
        assert_int_equal(all[i]->integration, PR_INTEGRATE_CONCAT);
        assert_string_equal(all[i]->n_virtual, "n_tokens");
        assert_non_null(all[i]->param_formula);
        assert_non_null(all[i]->forward);
        assert_non_null(all[i]->backward);
        assert_null(all[i]->merge);
        assert_int_equal(all[i]->default_sites & ~all[i]->sites, 0);
    }

    /* prompt tuning (Lester et al. 2021) */
    const pr_technique *t = prompt;
    assert_non_null(strstr(t->citation, "2104.08691"));
    assert_int_equal(t->intra, PR_INTRA_NONE);
    assert_int_equal(t->sharing, PR_SHARE_NONE);
    assert_int_equal(t->input, PR_INPUT_EMBEDDINGS);
    assert_int_equal(t->insertions, PR_INSERTIONS_ONCE);
    assert_int_equal(t->workspace, PR_WS_EMBEDDING);
    assert_int_equal(t->sites, PR_SITE_BIT(PR_SITE_EMBED));
    assert_int_equal(t->default_sites, PR_SITE_BIT(PR_SITE_EMBED));
    const pr_option_decl *o;
    assert_non_null(o = th_option(t, "n_tokens"));
    assert_true(o->type == PR_OPT_INT && o->def == 20 && o->min == 1);
    assert_non_null(o = th_option(t, "init"));
    assert_int_equal(o->type, PR_OPT_ENUM);
    assert_string_equal(o->choices[0], "normal");
    assert_string_equal(o->choices[1], "embed_rows");
    assert_string_equal(o->choices[2], "text");
    assert_null(o->choices[3]);
    assert_string_equal(o->choices[(int)o->def], "embed_rows");
    assert_non_null(o = th_option(t, "init_text"));
    assert_int_equal(o->type, PR_OPT_STRING);
    assert_non_null(o = th_option(t, "init_std"));
    assert_true(o->type == PR_OPT_FLOAT && o->def == 1.0);
    assert_int_equal(t->n_params, 1);
    assert_string_equal(t->params[0].name, "prompt");
    assert_string_equal(t->params[0].shape, "n_tokens, d_model");
    assert_string_equal(t->params[0].init_option, "init");
    assert_int_equal(t->params[0].scope, PR_SCOPE_GLOBAL);

    /* prefix tuning (Li and Liang 2021), plain prefixes */
    t = prefix;
    assert_non_null(strstr(t->citation, "2101.00190"));
    assert_int_equal(t->intra, PR_INTRA_NONE);
    assert_int_equal(t->sharing, PR_SHARE_NONE);
    assert_int_equal(t->input, PR_INPUT_NONE);
    assert_int_equal(t->insertions, PR_INSERTIONS_PER_LAYER);
    assert_int_equal(t->workspace, PR_WS_ATTENTION);
    assert_int_equal(t->sites, PR_SITE_BIT(PR_SITE_ATTN_K) | PR_SITE_BIT(PR_SITE_ATTN_V));
    assert_int_equal(t->default_sites, t->sites);
    assert_non_null(o = th_option(t, "n_tokens"));
    assert_true(o->type == PR_OPT_INT && o->def == 10 && !o->per_site);
    assert_int_equal(t->n_params, 1);
    assert_string_equal(t->params[0].name, "prefix");
    assert_string_equal(t->params[0].shape, "2, n_tokens, d_out");
    assert_int_equal(t->params[0].scope, PR_SCOPE_LAYER);
    assert_null(t->fold);

    /* with the MLP: global, training-only parameters and fold() into prefix_tuning's tensors */
    t = prefix_mlp;
    assert_int_equal(t->intra, PR_INTRA_DENSE);
    assert_int_equal(t->sharing, PR_SHARE_ACROSS_LAYERS);
    assert_int_equal(t->insertions, PR_INSERTIONS_PER_LAYER);
    assert_int_equal(t->sites, prefix->sites);
    assert_non_null(o = th_option(t, "encoder_hidden_size"));
    assert_true(o->type == PR_OPT_INT && o->def == 512);
    assert_non_null(o = th_option(t, "n_tokens"));
    assert_true(o->def == 10);
    assert_int_equal(t->n_params, 5);
    const char *names[] = { "embedding", "transform_0_weight", "transform_0_bias", "transform_2_weight",
                            "transform_2_bias" };
    for (int i = 0; i < 5; i++) {
        assert_string_equal(t->params[i].name, names[i]);
        assert_int_equal(t->params[i].scope, PR_SCOPE_GLOBAL);
        assert_true(t->params[i].flags & PR_PARAM_TRAINING_ONLY);
    }
    assert_non_null(t->fold);
    assert_int_equal(t->n_fold_params, 1);
    assert_string_equal(t->fold_params[0].name, prefix->params[0].name);
    assert_string_equal(t->fold_params[0].shape, prefix->params[0].shape);
    assert_int_equal(t->fold_params[0].scope, prefix->params[0].scope);

    /* -fvisibility=hidden: only the entry is exported */
    assert_null(dlsym(prefix_so, "mlp_forward"));
    assert_null(dlsym(prompt_so, "prompt_forward"));
}

/* ---- parameter counts ---------------------------------------------------------------------------- */

/* plan and attach agree with want; returns the insertions */
static void expect_count(shape s, const pr_technique *t, const pr_option_setting *o, int no, const int *layers,
                         int nl, int64_t want, int want_ins)
{
    pr_model_config c = config_of(s);
    pr_module_spec spec = { .technique = t, .options = o, .n_options = no, .layers = layers, .n_layers = nl,
                            .trainable = 1, .seed = 3 };
    pr_module_plan plan;
    pr_error err = { 0 };
    if (pr_module_plan_for(&c, &spec, &plan, &err))
        fail_msg("plan %s: %s", t->name, err.msg);
    assert_int_equal(plan.params, want);
    assert_int_equal(plan.trainable, want);
    assert_int_equal(plan.insertions, want_ins);
    fixture *f = fixture_new(s);
    pr_module *mod = attach(f, t, NULL, o, no, layers, nl, 3);
    assert_int_equal(pr_module_param_count(mod), want);
    assert_int_equal(pr_module_trainable_count(mod), want);
    assert_int_equal(pr_module_insertions(mod), want_ins);
    /* and what the tensor table holds */
    char pre[64];
    snprintf(pre, sizeof pre, "%s/", t->name);
    const pr_tensor_info *ts[64];
    int n = module_tensors(f->m, pre, ts, 64);
    int64_t sum = 0;
    for (int k = 0; k < n; k++)
        sum += ts[k]->numel;
    assert_int_equal(sum, want);
    fixture_free(f);
}

static void test_counts_prompt(void **state)
{
    (void)state;
    const shape shapes[] = { SHAPE_A, SHAPE_B };
    for (int k = 0; k < 2; k++) {
        shape s = shapes[k];
        const pr_option_setting o[] = { { "n_tokens", "5", -1 } };
        expect_count(s, prompt, o, 1, NULL, 0, 5 * s.C, 1);
        /* the default n_tokens = 20 */
        expect_count(s, prompt, NULL, 0, NULL, 0, 20 * s.C, 1);
    }
}

static void test_counts_prefix(void **state)
{
    (void)state;
    const shape shapes[] = { SHAPE_A, SHAPE_B, SHAPE_GQA };
    for (int k = 0; k < 3; k++) {
        shape s = shapes[k];
        const int64_t p = 4, dkv = (int64_t)s.Hkv * s.hd, C = s.C, L = s.L, h = 6;
        const pr_option_setting o[] = { { "n_tokens", "4", -1 }, { "encoder_hidden_size", "6", -1 } };
        /* plain: 2 * p * d_kv per layer; 2L insertions (k and v of each layer) */
        expect_count(s, prefix, o, 1, NULL, 0, 2 * p * dkv * L, (int)(2 * L));
        const int two[] = { 0, 1 };
        expect_count(s, prefix, o, 1, two, 2, 2 * p * dkv * 2, 4);
        expect_count(s, prefix, NULL, 0, NULL, 0, 2 * 10 * dkv * L, (int)(2 * L));
        /* MLP: embedding, transform_0 (weight, bias), transform_2 (weight, bias), once */
        int64_t mlp = p * C + h * C + h + 2 * L * dkv * h + 2 * L * dkv;
        expect_count(s, prefix_mlp, o, 2, NULL, 0, mlp, (int)(2 * L));
        /* defaults: n_tokens 10, h 512 */
        int64_t mlp_def = 10 * C + 512 * C + 512 + 2 * L * dkv * 512 + 2 * L * dkv;
        expect_count(s, prefix_mlp, NULL, 0, NULL, 0, mlp_def, (int)(2 * L));
    }
}

/* ---- prompt tuning -------------------------------------------------------------------------------- */

static void test_prompt_init(void **state)
{
    (void)state;
    fixture *f = fixture_new(SHAPE_A);
    const int C = SHAPE_A.C;
    const pr_tensor_info *wte = pr_model_find_tensor(f->m, "wte.weight");
    assert_non_null(wte);

    /* normal(0, init_std): sample std within 15% for 8 x 32 draws */
    const pr_option_setting on[] = { { "n_tokens", "8", -1 }, { "init", "normal", -1 }, { "init_std", "0.5", -1 } };
    attach(f, prompt, "pn", on, 3, NULL, 0, 1);
    const pr_tensor_info *p = pr_model_find_tensor(f->m, "pn/prompt");
    assert_non_null(p);
    assert_int_equal(p->ndim, 2);
    assert_int_equal(p->shape[0], 8);
    assert_int_equal(p->shape[1], C);
    double ss = 0.0;
    for (int64_t i = 0; i < p->numel; i++)
        ss += (double)p->data[i] * p->data[i];
    double sd = sqrt(ss / (double)p->numel);
    assert_true(sd > 0.5 * 0.85 && sd < 0.5 * 1.15);
    pr_model_detach_modules(f->m);

    /* embed_rows (the default): every row is a row of wte */
    const pr_option_setting oe[] = { { "n_tokens", "6", -1 } };
    attach(f, prompt, "pe", oe, 1, NULL, 0, 2);
    p = pr_model_find_tensor(f->m, "pe/prompt");
    assert_non_null(p);
    int distinct = 0;
    for (int r = 0; r < 6; r++) {
        int found = -1;
        for (int v = 0; v < MV && found < 0; v++)
            if (memcmp(p->data + (size_t)r * C, wte->data + (size_t)v * C, (size_t)C * sizeof(float)) == 0)
                found = v;
        assert_true(found >= 0);
        distinct += r == 0 || memcmp(p->data + (size_t)r * C, p->data, (size_t)C * sizeof(float)) != 0;
    }
    assert_true(distinct >= 2);
    pr_model_detach_modules(f->m);

    /* text: the byte tokens of "0?!" (48, 63, 33: inside V = 64), cycled to 5 rows */
    pr_tokenizer *tok = NULL;
    pr_error err = { 0 };
    assert_int_equal(pr_tokenizer_byte(&tok, &err), PR_OK);
    const pr_option_setting ot[] = { { "n_tokens", "5", -1 }, { "init", "text", -1 }, { "init_text", "0?!", -1 } };
    pr_module_spec s = { .technique = prompt, .name = "pt", .options = ot, .n_options = 3, .trainable = 1,
                         .seed = 4, .tokenizer = tok };
    pr_module *mod = NULL;
    if (pr_module_attach(f->m, &s, &mod, &err))
        fail_msg("attach: %s", err.msg);
    p = pr_model_find_tensor(f->m, "pt/prompt");
    assert_non_null(p);
    const int ids[5] = { '0', '?', '!', '0', '?' };
    for (int r = 0; r < 5; r++)
        assert_memory_equal(p->data + (size_t)r * C, wte->data + (size_t)ids[r] * C, (size_t)C * sizeof(float));
    pr_model_detach_modules(f->m);

    /* text without init_text, and an init that is not a choice */
    const pr_option_setting bad1[] = { { "init", "text", -1 } };
    s.options = bad1;
    s.n_options = 1;
    assert_int_not_equal(pr_module_attach(f->m, &s, &mod, &err), PR_OK);
    assert_non_null(strstr(err.msg, "init_text"));
    const pr_option_setting bad2[] = { { "init", "random", -1 } };
    s.options = bad2;
    assert_int_not_equal(pr_module_attach(f->m, &s, &mod, &err), PR_OK);
    assert_non_null(strstr(err.msg, "embed_rows"));
    /* more virtual positions than max_seq leaves room for */
    const pr_option_setting bad3[] = { { "n_tokens", "30", -1 } };
    s.options = bad3;
    assert_int_not_equal(pr_module_attach(f->m, &s, &mod, &err), PR_OK);
    assert_int_equal(pr_model_n_modules(f->m), 0);
    pr_tokenizer_free(tok);
    fixture_free(f);
}

static void test_prompt_effect(void **state)
{
    (void)state;
    fixture *f = fixture_new(SHAPE_A);
    const size_t n = (size_t)MB * MT * MV;
    float *base = logits_of(f);
    const pr_option_setting o[] = { { "n_tokens", "4", -1 } };
    attach(f, prompt, "p", o, 1, NULL, 0, 5);
    assert_int_equal(pr_model_virtual_positions(f->m), 4);
    float *with = logits_of(f);
    assert_true(all_finite(with, n));
    double moved = th_max_abs_diff(with, base, n);
    printf("prompt: max |logits - base logits| = %.3e\n", moved);
    assert_true(moved > 1e-3);

    /* another prompt: other logits for the real tokens */
    const pr_tensor_info *p = pr_model_find_tensor(f->m, "p/prompt");
    assert_non_null(p);
    const float keep = p->data[3];
    p->data[3] += 0.5f;
    float *other = logits_of(f);
    assert_true(all_finite(other, n));
    double changed = th_max_abs_diff(other, with, n);
    printf("prompt: one element +0.5 moves the logits by %.3e\n", changed);
    assert_true(changed > 1e-5);
    p->data[3] = keep;
    float *again = logits_of(f);
    assert_memory_equal(again, with, n * sizeof(float));

    /* detached: the base model again, bit for bit */
    pr_model_detach_modules(f->m);
    assert_int_equal(pr_model_virtual_positions(f->m), 0);
    float *after = logits_of(f);
    assert_memory_equal(after, base, n * sizeof(float));
    free(base);
    free(with);
    free(other);
    free(again);
    free(after);
    fixture_free(f);
}

static void test_prompt_gradients(void **state)
{
    (void)state;
    const shape shapes[] = { SHAPE_A, SHAPE_B };
    for (int k = 0; k < 2; k++) {
        fixture *f = fixture_new(shapes[k]);
        const pr_option_setting o[] = { { "n_tokens", "3", -1 }, { "init", "normal", -1 },
                                        { "init_std", "0.5", -1 } };
        attach(f, prompt, "p", o, 3, NULL, 0, 6);
        assert_int_equal(grad_check_module(f, "p/", 1), 0);
        fixture_free(f);
    }
}

/* ---- prefix tuning ---------------------------------------------------------------------------------- */

static void test_prefix_effect(void **state)
{
    (void)state;
    const pr_technique *ts[] = { prefix, prefix_mlp };
    for (int k = 0; k < 2; k++) {
        fixture *f = fixture_new(SHAPE_A);
        const size_t n = (size_t)MB * MT * MV;
        float *base = logits_of(f);
        const pr_option_setting o[] = { { "n_tokens", "3", -1 }, { "encoder_hidden_size", "8", -1 } };
        attach(f, ts[k], "pf", o, k ? 2 : 1, NULL, 0, 8);
        assert_int_equal(pr_model_virtual_positions(f->m), 0);
        float *with = logits_of(f);
        assert_true(all_finite(with, n));
        double moved = th_max_abs_diff(with, base, n);
        const pr_tensor_info *t[8];
        assert_int_equal(module_tensors(f->m, "pf/", t, 8), k ? 5 : SHAPE_A.L);
        t[0]->data[1] += 0.5f;
        float *other = logits_of(f);
        double changed = th_max_abs_diff(other, with, n);
        printf("%s: max |logits - base| = %.3e; one parameter +0.5 moves them by %.3e\n", ts[k]->name, moved,
               changed);
        assert_true(moved > 1e-3);
        assert_true(changed > 1e-5);
        assert_true(all_finite(other, n));
        free(base);
        free(with);
        free(other);
        fixture_free(f);
    }
}

/* Prefix keys without values in a layer: attach works, the forward says why it cannot run. */
static void test_prefix_needs_k_and_v(void **state)
{
    (void)state;
    fixture *f = fixture_new(SHAPE_A);
    pr_module_spec s = { .technique = prefix, .sites = PR_SITE_BIT(PR_SITE_ATTN_K), .trainable = 1, .seed = 1 };
    pr_module *mod = NULL;
    pr_error err = { 0 };
    assert_int_equal(pr_module_attach(f->m, &s, &mod, &err), PR_OK);
    pr_batch b = { .tokens = f->tokens, .targets = f->targets, .B = MB, .T = MT };
    float loss;
    assert_int_not_equal(pr_model_forward(f->m, &b, &loss, &err), PR_OK);
    assert_non_null(strstr(err.msg, "agree"));
    /* a layer at another site than attn.k / attn.v is refused at attach */
    pr_model_detach_modules(f->m);
    s.sites = PR_SITE_BIT(PR_SITE_Q);
    assert_int_not_equal(pr_module_attach(f->m, &s, &mod, &err), PR_OK);
    fixture_free(f);
}

static void test_prefix_gradients(void **state)
{
    (void)state;
    const shape shapes[] = { SHAPE_A, SHAPE_GQA };
    for (int k = 0; k < 2; k++) {
        fixture *f = fixture_new(shapes[k]);
        const pr_option_setting o[] = { { "n_tokens", "3", -1 }, { "init_std", "0.5", -1 } };
        attach(f, prefix, "pf", o, 2, NULL, 0, 9);
        assert_int_equal(grad_check_module(f, "pf/", shapes[k].L), 0);
        fixture_free(f);
    }
}

static void test_prefix_mlp_gradients(void **state)
{
    (void)state;
    const shape shapes[] = { SHAPE_A, SHAPE_GQA };
    for (int k = 0; k < 2; k++) {
        fixture *f = fixture_new(shapes[k]);
        const pr_option_setting o[] = { { "n_tokens", "3", -1 }, { "encoder_hidden_size", "7", -1 } };
        /* a layer subset: the MLP still spans every layer, the unused blocks get no gradient */
        const int layers[] = { 0, shapes[k].L - 1 };
        attach(f, prefix_mlp, "pm", o, 2, layers, 2, 10);
        const pr_tensor_info *ts[8];
        assert_int_equal(module_tensors(f->m, "pm/", ts, 8), 5);
        for (int i = 0; i < 5; i++)
            gc_fill(ts[i]->data, (size_t)ts[i]->numel, 300u + (unsigned)i, 0.4f);
        assert_int_equal(grad_check_module(f, "pm/", 5), 0);
        /* transform_2's rows of the unused middle layer(s) have zero gradient, the others not */
        const pr_tensor_info *w2 = pr_model_find_tensor(f->m, "pm/transform_2_weight");
        assert_non_null(w2);
        int64_t h = w2->shape[1], dkv = w2->shape[0] / (2 * shapes[k].L);
        for (int l = 0; l < shapes[k].L; l++) {
            const float *g = w2->grad + (size_t)(2 * l) * dkv * h;
            double gl = max_abs(g, (size_t)(2 * dkv * h));
            int used = l == 0 || l == shapes[k].L - 1;
            if (used)
                assert_true(gl > 0.0);
            else
                assert_true(gl == 0.0);
        }
        fixture_free(f);
    }
}

/* The prefix (2, n_tokens, d_kv) fold() makes for layer l from the MLP
 * tensors "<name>/...", called as the insertion at site. */
static void fold_layer(const pr_model *m, shape s, int l, int site, float *out, int64_t n_tokens)
{
    static const char *const names[] = { "pm/embedding", "pm/transform_0_weight", "pm/transform_0_bias",
                                         "pm/transform_2_weight", "pm/transform_2_bias" };
    th_ctx t;
    pr_ctx *c = th_ctx_init(&t);
    for (int i = 0; i < 5; i++) {
        const pr_tensor_info *ti = pr_model_find_tensor(m, names[i]);
        assert_non_null(ti);
        t.params[i] = th_view(ti->data, ti->ndim, ti->shape);
    }
    const int64_t dkv = (int64_t)s.Hkv * s.hd, shp[3] = { 2, n_tokens, dkv };
    t.out_params[0] = th_view(out, 3, shp);
    pr_dims dims = { .struct_size = sizeof(pr_dims), .d_model = s.C, .n_heads = s.H, .n_kv_heads = s.Hkv,
                     .d_head = s.hd, .d_ff = s.F, .n_layers = s.L, .vocab = MV, .d_in = (int)dkv,
                     .d_out = (int)dkv, .family = PR_FAMILY_GPT2 };
    c->technique = prefix_mlp;
    c->dims = &dims;
    c->site = site;
    c->layer = l;
    c->n_params = 5;
    c->n_out_params = 1;
    th_last_error[0] = 0;
    if (prefix_mlp->fold(c) != 0)
        fail_msg("fold: %s", th_last_error);
}

/* fold: the plain prefixes fold() makes, in a prefix_tuning module of the
 * same name, give the MLP module's logits. */
static void test_prefix_fold(void **state)
{
    (void)state;
    const shape shapes[] = { SHAPE_A, SHAPE_GQA };
    for (int k = 0; k < 2; k++) {
        shape s = shapes[k];
        fixture *f = fixture_new(s);
        const size_t n = (size_t)MB * MT * MV;
        const int64_t p = 4, dkv = (int64_t)s.Hkv * s.hd, per = 2 * p * dkv;
        const pr_option_setting o[] = { { "n_tokens", "4", -1 }, { "encoder_hidden_size", "16", -1 } };
        attach(f, prefix_mlp, "pm", o, 2, NULL, 0, 12);
        const pr_tensor_info *ts[8];
        assert_int_equal(module_tensors(f->m, "pm/", ts, 8), 5);
        for (int i = 0; i < 5; i++)
            gc_fill(ts[i]->data, (size_t)ts[i]->numel, 400u + (unsigned)i, 0.5f);
        pr_model_set_training(f->m, 1);
        float *want = logits_of(f);

        /* fold() from the k and from the v insertion of each layer: the
         * same whole-layer prefix either way */
        float *folded = calloc((size_t)(per * s.L), sizeof(float)), *again = calloc((size_t)per, sizeof(float));
        assert_non_null(folded);
        assert_non_null(again);
        for (int l = 0; l < s.L; l++) {
            fold_layer(f->m, s, l, PR_SITE_ATTN_K, folded + (size_t)l * per, p);
            fold_layer(f->m, s, l, PR_SITE_ATTN_V, again, p);
            assert_memory_equal(again, folded + (size_t)l * per, (size_t)per * sizeof(float));
        }
        /* folding leaves the training form alone */
        float *still = logits_of(f);
        assert_memory_equal(still, want, n * sizeof(float));

        /* the plain module, named like the MLP one, with the folded values */
        pr_model_detach_modules(f->m);
        const pr_option_setting op[] = { { "n_tokens", "4", -1 } };
        attach(f, prefix, "pm", op, 1, NULL, 0, 13);
        for (int l = 0; l < s.L; l++) {
            char name[64];
            snprintf(name, sizeof name, "pm/h.%d.prefix", l);
            const pr_tensor_info *t = pr_model_find_tensor(f->m, name);
            assert_non_null(t);
            assert_int_equal(t->numel, per);
            memcpy(t->data, folded + (size_t)l * per, (size_t)per * sizeof(float));
        }
        float *got = logits_of(f);
        double d = th_max_abs_diff(got, want, n), scale = max_abs(want, n);
        printf("fold (L=%d): max |plain - mlp| = %.3e, max |logit| = %.3e\n", s.L, d, scale);
        assert_true(scale > 0.1);
        assert_true(d <= 1e-5 * scale);

        /* without its parameters fold() refuses, with a message */
        float small[8];
        const int64_t bad[3] = { 2, 1, 4 };
        th_ctx t;
        pr_ctx *c = th_ctx_init(&t);
        t.out_params[0] = th_view(small, 3, bad);
        c->n_out_params = 1;
        c->site = PR_SITE_ATTN_K;
        th_last_error[0] = 0;
        assert_int_not_equal(prefix_mlp->fold(c), 0);
        assert_non_null(strstr(th_last_error, "parameters"));
        free(folded);
        free(again);
        free(want);
        free(still);
        free(got);
        fixture_free(f);
    }
}

/* ---- the conformance checker ------------------------------------------------------------------------ */

static void conformance(const char *path, int min_checks)
{
    check_options co = { 0 };
    FILE *out = tmpfile();
    assert_non_null(out);
    int n_checks = 0, n_failed = 0;
    pr_error err = { 0 };
    int rc = check_plugin_file(path, &co, out, &n_checks, &n_failed, &err);
    if (rc || n_failed) {
        rewind(out);
        char line[1024];
        while (fgets(line, sizeof line, out))
            if (rc || strncmp(line, "PASS", 4) != 0)
                fputs(line, stderr);
        if (rc)
            fprintf(stderr, "check: %s\n", err.msg);
    }
    fclose(out);
    assert_int_equal(rc, PR_OK);
    assert_true(n_checks >= min_checks);
    assert_int_equal(n_failed, 0);
}

static void test_conformance_prompt(void **state)
{
    (void)state;
    conformance(PROMPT_SO, 6);
}

static void test_conformance_prefix(void **state)
{
    (void)state;
    conformance(PREFIX_SO, 2 * 7);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_descriptors),
        cmocka_unit_test(test_counts_prompt),
        cmocka_unit_test(test_counts_prefix),
        cmocka_unit_test(test_prompt_init),
        cmocka_unit_test(test_prompt_effect),
        cmocka_unit_test(test_prompt_gradients),
        cmocka_unit_test(test_prefix_effect),
        cmocka_unit_test(test_prefix_needs_k_and_v),
        cmocka_unit_test(test_prefix_gradients),
        cmocka_unit_test(test_prefix_mlp_gradients),
        cmocka_unit_test(test_prefix_fold),
        cmocka_unit_test(test_conformance_prompt),
        cmocka_unit_test(test_conformance_prefix),
    };
    return cmocka_run_group_tests(tests, setup_plugins, teardown_plugins);
}
