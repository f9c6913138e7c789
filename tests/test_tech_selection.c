/* Tests of the rescaling and selection techniques as the host sees them:
 * plugins/ia3.so, bitfit.so, lnfit.so and full.so loaded with dlopen and
 * attached to tiny GPT-2 models with pr_module_attach.
 *
 *  - descriptors: the typology of DESIGN.md §1 and the parameter
 *    declarations;
 *  - counts: pr_module_plan_for and the attached module agree with each
 *    paper's formula computed here from the config, on two shapes
 *    (A: L=2, C=32, H=4, F=128; B: L=3, C=48, H=6, F=96; d_head 8, no
 *    grouped-query attention):
 *      ia3     L * (2 * n_kv_heads * d_head + d_ff), 3L insertions
 *      bitfit  L * ((Q + 2KV) + C + F + C + 2C) + C   (biases + LN biases)
 *      lnfit   2 * C * (2L + 1)
 *      full    every base parameter;
 *  - identity at init: every technique leaves the logits of the base model
 *    unchanged (<= 1e-6; (IA)^3 multiplies by ones);
 *  - finite differences of the model's loss for every ia3_l and for every
 *    tensor a selection makes trainable, and for upstream tensors reached
 *    through (IA)^3's input gradient (eps 3e-3; a probe passes when
 *    |fd - g| <= 1e-4 + 5e-2 * max(|g|, |fd|), test_module's tolerances);
 *  - (IA)^3 merge: merged logits equal unmerged ones within 1e-5 of the
 *    largest logit, the folded weights are W diag(l) / diag(l) W to 1e-6
 *    relative, unmerge restores weights and biases bit for bit, with and
 *    without biases; pr_model_site_weight's views at the stream sites;
 *  - the conformance checker (core/plugins/check.h) passes every technique.
 *
 * Model: init_std 0.1 as test_model.c, B=2, T=6, eval mode. */
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

#define PLUGIN_DIR TEST_BUILDDIR "/plugins/.libs/"

#define FD_EPS 3e-3
#define FD_RTOL 5e-2
#define FD_ATOL 1e-4
#define FD_PROBES 6

/* a checked gradient must not vanish everywhere */
static const th_fd FD_CHECK = { FD_EPS, FD_RTOL, FD_ATOL, FD_PROBES, 1e-7 };

enum { TB = 2, TT = 6 };
enum { T_IA3, T_BITFIT, T_LNFIT, T_FULL, N_TECH };

static const char *const so_names[N_TECH] = { "ia3", "bitfit", "lnfit", "full" };
static void *so_handle[N_TECH];
static const pr_technique *tech[N_TECH];

static int setup_plugins(void **state)
{
    (void)state;
    for (int i = 0; i < N_TECH; i++) {
        char path[512];
        snprintf(path, sizeof path, PLUGIN_DIR "%s.so", so_names[i]);
        tech[i] = th_plugin_technique(path, &so_handle[i]);
        if (!tech[i])
            return -1;
        pr_error err = { 0 };
        if (pr_technique_validate(tech[i], &err) != PR_OK) {
            fprintf(stderr, "%s: %s\n", so_names[i], err.msg);
            return -1;
        }
    }
    return 0;
}

static int teardown_plugins(void **state)
{
    (void)state;
    for (int i = 0; i < N_TECH; i++)
        if (so_handle[i])
            dlclose(so_handle[i]);
    return 0;
}

/* ---- models and the loss ----------------------------------------------------- */

static pr_model_config config_a(void)
{
    return th_config(&(th_shape){ .L = 2, .C = 32, .H = 4, .Hkv = 4, .hd = 8, .F = 128, .V = 64, .max_seq = 16 }, 11);
}

static pr_model_config config_b(void)
{
    return th_config(&(th_shape){ .L = 3, .C = 48, .H = 6, .Hkv = 6, .hd = 8, .F = 96, .V = 50, .max_seq = 16 }, 12);
}

static pr_model *make_model(const pr_model_config *c)
{
    pr_model *m = th_model_new(c, TB, TT);
    /* non-zero biases, so folding into them is visible */
    for (int i = 0; i < pr_model_n_tensors(m); i++) {
        const pr_tensor_info *t = pr_model_tensor(m, i);
        if (t->kind == PR_TENSOR_BIAS || t->kind == PR_TENSOR_NORM_BIAS)
            gc_fill(t->data, (size_t)t->numel, 500u + (unsigned)i, 0.1f);
    }
    return m;
}

static void loss_ctx_init(th_loss_ctx *lc, pr_model *m, unsigned seed)
{
    th_loss_bind(lc, m, TB, TT);
    int V = pr_model_get_config(m)->vocab_size;
    for (int i = 0; i < TB * TT; i++) {
        lc->tokens[i] = (int)((i * 17u + seed * 7u + 5u) % (unsigned)V);
        lc->targets[i] = (int)((i * 29u + seed * 3u + 3u) % (unsigned)V);
    }
}

static pr_module *attach(pr_model *m, const pr_technique *t, const int *layers, int n_layers)
{
    pr_module_spec s = { 0 };
    s.technique = t;
    s.layers = layers;
    s.n_layers = n_layers;
    s.trainable = 1;
    s.seed = 5;
    pr_module *mod = th_attach(m, &s);
    assert_non_null(mod);
    return mod;
}

/* ---- descriptors ------------------------------------------------------------------ */

static void test_descriptors(void **state)
{
    (void)state;
    const pr_technique *t = tech[T_IA3];
    assert_string_equal(t->name, "ia3");
    assert_non_null(strstr(t->citation, "2205.05638"));
    assert_int_equal(t->intra, PR_INTRA_NONE);
    assert_int_equal(t->inter, PR_INTER_FIXED);
    assert_int_equal(t->adaptation, PR_ADAPT_RESCALING);
    assert_int_equal(t->sharing, PR_SHARE_NONE);
    assert_int_equal(t->input, PR_INPUT_HIDDEN);
    assert_int_equal(t->insertion, PR_INSERT_SEQUENTIAL);
    assert_int_equal(t->insertions, PR_INSERTIONS_PER_SITE_LAYER);
    assert_int_equal(t->integration, PR_INTEGRATE_RESCALE);
    assert_int_equal(t->workspace, PR_WS_ATTENTION | PR_WS_FFN);
    uint32_t sites = PR_SITE_BIT(PR_SITE_ATTN_K) | PR_SITE_BIT(PR_SITE_ATTN_V) | PR_SITE_BIT(PR_SITE_FFN_ACT);
    uint32_t kv = PR_SITE_BIT(PR_SITE_K) | PR_SITE_BIT(PR_SITE_V);
    assert_int_equal(t->sites, sites | kv);
    assert_int_equal(t->default_sites, sites);
    /* Hugging Face PEFT's LLaMA defaults: k_proj, v_proj and down_proj's input */
    assert_int_equal(t->default_sites_llama, kv | PR_SITE_BIT(PR_SITE_FFN_ACT));
    assert_int_equal(t->n_params, 1);
    assert_string_equal(t->params[0].name, "ia3_l");
    assert_string_equal(t->params[0].shape, "d_out");
    assert_int_equal(t->params[0].init, PR_INIT_ONES);
    assert_int_equal(t->params[0].scope, PR_SCOPE_INSERTION);
    assert_non_null(t->forward);
    assert_non_null(t->backward);
    assert_non_null(t->merge);
    assert_non_null(t->param_formula);
    assert_null(dlsym(so_handle[T_IA3], "ia3_forward"));

    const struct {
        int i;
        const char *arxiv;
        uint32_t kinds, ws;
    } sel[] = {
        { T_BITFIT, "2106.10199", PR_BASE_BIAS | PR_BASE_NORM_BIAS, PR_WS_ATTENTION | PR_WS_FFN | PR_WS_NORM },
        { T_LNFIT, "2312.11420", PR_BASE_NORM_GAIN | PR_BASE_NORM_BIAS, PR_WS_NORM },
        { T_FULL, "1801.06146",
          PR_BASE_WEIGHT | PR_BASE_BIAS | PR_BASE_NORM_GAIN | PR_BASE_NORM_BIAS | PR_BASE_EMBEDDING,
          PR_WS_EMBEDDING | PR_WS_ATTENTION | PR_WS_FFN | PR_WS_NORM | PR_WS_HEAD },
    };
    for (size_t k = 0; k < sizeof sel / sizeof sel[0]; k++) {
        t = tech[sel[k].i];
        assert_string_equal(t->name, so_names[sel[k].i]);
        assert_non_null(strstr(t->citation, sel[k].arxiv));
        assert_int_equal(t->intra, PR_INTRA_NONE);
        assert_int_equal(t->inter, PR_INTER_FIXED);
        assert_int_equal(t->adaptation, PR_ADAPT_SELECTION);
        assert_int_equal(t->sharing, PR_SHARE_NONE);
        assert_int_equal(t->input, PR_INPUT_NONE);
        assert_int_equal(t->insertion, PR_INSERT_IN_PLACE);
        assert_int_equal(t->insertions, PR_INSERTIONS_NONE);
        assert_int_equal(t->integration, PR_INTEGRATE_SELECT);
        assert_int_equal(t->select_kinds, sel[k].kinds);
        assert_int_equal(t->workspace, sel[k].ws);
        assert_int_equal(t->n_params, 0);
        assert_int_equal(t->sites, 0);
        assert_null(t->forward);
        assert_null(t->merge);
        assert_non_null(t->param_formula);
    }
}

/* ---- counts ---------------------------------------------------------------------- */

static int64_t f_ia3(const pr_model_config *c)
{
    int64_t dkv = (int64_t)c->n_kv_heads * c->d_head;
    return (int64_t)c->n_layers * (dkv + dkv + c->d_ff);
}

/* every bias: c_attn (Q + 2KV), attn.c_proj C, mlp.c_fc F, mlp.c_proj C,
 * ln_1 and ln_2 C each, per layer; ln_f C once */
static int64_t f_bitfit(const pr_model_config *c)
{
    int64_t C = c->d_model, F = c->d_ff, Q = (int64_t)c->n_heads * c->d_head,
            KV = (int64_t)c->n_kv_heads * c->d_head;
    return c->n_layers * ((Q + 2 * KV) + C + F + C + 2 * C) + C;
}

static int64_t f_lnfit(const pr_model_config *c)
{
    return 2 * (int64_t)c->d_model * (2 * c->n_layers + 1);
}

/* every base parameter, spelled out for GPT-2 with biases and a tied head */
static int64_t f_full(const pr_model_config *c)
{
    int64_t C = c->d_model, F = c->d_ff, V = c->vocab_size, P = c->max_seq;
    int64_t Q = (int64_t)c->n_heads * c->d_head, KV = (int64_t)c->n_kv_heads * c->d_head;
    int64_t layer = C * (Q + 2 * KV) + (Q + 2 * KV) + Q * C + C + C * F + F + F * C + C + 4 * C;
    return V * C + P * C + c->n_layers * layer + 2 * C + (c->tied_head ? 0 : V * C);
}

static int64_t trainable_base(const pr_model *m)
{
    int64_t n = 0;
    for (int i = 0; i < pr_model_n_tensors(m); i++) {
        const pr_tensor_info *t = pr_model_tensor(m, i);
        if (t->trainable && t->kind != PR_TENSOR_MODULE)
            n += t->numel;
    }
    return n;
}

static void test_ia3_counts(void **state)
{
    (void)state;
    pr_model_config cfgs[2] = { config_a(), config_b() };
    /* shape A: 2 * (32 + 32 + 128) = 384; shape B: 3 * (48 + 48 + 96) = 576 */
    const int64_t literal[2] = { 384, 576 };
    for (int k = 0; k < 2; k++) {
        const pr_model_config *c = &cfgs[k];
        int64_t expect = f_ia3(c);
        assert_int_equal(expect, literal[k]);
        pr_module_spec s = { .technique = tech[T_IA3], .trainable = 1, .seed = 1 };
        pr_module_plan plan;
        pr_error err = { 0 };
        assert_int_equal(pr_module_plan_for(c, &s, &plan, &err), PR_OK);
        assert_int_equal(plan.params, expect);
        assert_int_equal(plan.trainable, expect);
        assert_int_equal(plan.insertions, 3 * c->n_layers);
        assert_int_equal(plan.base_selected, 0);
        pr_model *m = make_model(c);
        pr_module *mod = attach(m, tech[T_IA3], NULL, 0);
        assert_int_equal(pr_module_param_count(mod), expect);
        assert_int_equal(pr_module_trainable_count(mod), expect);
        assert_int_equal(pr_module_insertions(mod), 3 * c->n_layers);
        /* the table: one ia3_l per (layer, site), of the site's width, all ones */
        int64_t in_table = 0;
        int n = 0;
        for (int i = 0; i < pr_model_n_tensors(m); i++) {
            const pr_tensor_info *t = pr_model_tensor(m, i);
            if (strncmp(t->name, "ia3/", 4) != 0)
                continue;
            n++;
            in_table += t->numel;
            assert_int_equal(t->ndim, 1);
            for (int64_t j = 0; j < t->numel; j++)
                assert_true(t->data[j] == 1.0f);
        }
        assert_int_equal(n, 3 * c->n_layers);
        assert_int_equal(in_table, expect);
        const pr_tensor_info *lff = pr_model_find_tensor(m, "ia3/h.1.ffn.act.ia3_l");
        const pr_tensor_info *lk = pr_model_find_tensor(m, "ia3/h.0.attn.k.ia3_l");
        assert_non_null(lff);
        assert_non_null(lk);
        assert_int_equal(lff->shape[0], c->d_ff);
        assert_int_equal(lk->shape[0], c->n_kv_heads * c->d_head);
        pr_model_free(m);
    }
}

/* What a selection makes trainable, kind by kind. */
static int selected_kind(int tech_index, const pr_tensor_info *t)
{
    switch (tech_index) {
    case T_BITFIT: return t->kind == PR_TENSOR_BIAS || t->kind == PR_TENSOR_NORM_BIAS;
    case T_LNFIT: return t->kind == PR_TENSOR_NORM_GAIN || t->kind == PR_TENSOR_NORM_BIAS;
    default: return t->kind != PR_TENSOR_MODULE;
    }
}

static void test_selection_counts(void **state)
{
    (void)state;
    pr_model_config cfgs[2] = { config_a(), config_b() };
    int64_t (*const formula[N_TECH])(const pr_model_config *) = { NULL, f_bitfit, f_lnfit, f_full };
    for (int k = 0; k < 2; k++) {
        const pr_model_config *c = &cfgs[k];
        /* the spelled-out full count is the config's own count */
        assert_int_equal(f_full(c), pr_config_param_count(c));
        pr_model *m = make_model(c);
        for (int i = T_BITFIT; i <= T_FULL; i++) {
            int64_t expect = formula[i](c);
            pr_module_spec s = { .technique = tech[i], .trainable = 1, .seed = 1 };
            pr_module_plan plan;
            pr_error err = { 0 };
            assert_int_equal(pr_module_plan_for(c, &s, &plan, &err), PR_OK);
            assert_int_equal(plan.base_selected, expect);
            assert_int_equal(plan.params, 0);
            assert_int_equal(plan.insertions, 0);
            int n_before = pr_model_n_tensors(m);
            assert_int_equal(trainable_base(m), 0);
            pr_module *mod = attach(m, tech[i], NULL, 0);
            assert_int_equal(pr_module_param_count(mod), 0);
            assert_int_equal(pr_model_n_tensors(m), n_before);
            assert_int_equal(trainable_base(m), expect);
            for (int j = 0; j < pr_model_n_tensors(m); j++) {
                const pr_tensor_info *t = pr_model_tensor(m, j);
                if (t->trainable != selected_kind(i, t))
                    fprintf(stderr, "%s: %s trainable %d\n", tech[i]->name, t->name, t->trainable);
                assert_int_equal(t->trainable, selected_kind(i, t));
            }
            pr_model_detach_modules(m);
            assert_int_equal(trainable_base(m), 0);

            /* one layer: its tensors only, no model-level ones */
            int layer1 = 1;
            s.layers = &layer1;
            s.n_layers = 1;
            assert_int_equal(pr_module_plan_for(c, &s, &plan, &err), PR_OK);
            pr_model_config one = *c;
            one.n_layers = 1;
            int64_t model_level = i == T_BITFIT ? c->d_model : i == T_LNFIT ? 2 * c->d_model
                                  : (int64_t)c->vocab_size * c->d_model + (int64_t)c->max_seq * c->d_model +
                                        2 * c->d_model;
            assert_int_equal(plan.base_selected, formula[i](&one) - model_level);
        }
        pr_model_free(m);
    }
}

/* ---- identity at init ------------------------------------------------------------ */

static void test_identity_at_init(void **state)
{
    (void)state;
    pr_model_config c = config_a();
    pr_model *m = make_model(&c);
    th_loss_ctx lc;
    loss_ctx_init(&lc, m, 6);
    float *base = th_logits_copy(&lc);
    size_t n = (size_t)TB * TT * c.vocab_size;
    for (int i = 0; i < N_TECH; i++) {
        attach(m, tech[i], NULL, 0);
        float *with = th_logits_copy(&lc);
        double d = th_max_abs_diff(base, with, n);
        if (d > 1e-6)
            fprintf(stderr, "%s changes the logits by %g at init\n", tech[i]->name, d);
        assert_true(d <= 1e-6);
        free(with);
        pr_model_detach_modules(m);
    }
    free(base);
    pr_model_free(m);
}

/* ---- gradients ------------------------------------------------------------------- */

static void test_ia3_gradients(void **state)
{
    (void)state;
    pr_model_config c = config_a();
    pr_model *m = make_model(&c);
    attach(m, tech[T_IA3], NULL, 0);
    /* around the ones init */
    for (int i = 0; i < pr_model_n_tensors(m); i++) {
        const pr_tensor_info *t = pr_model_tensor(m, i);
        if (strncmp(t->name, "ia3/", 4) != 0)
            continue;
        gc_fill(t->data, (size_t)t->numel, 40u + (unsigned)i, 0.3f);
        for (int64_t j = 0; j < t->numel; j++)
            t->data[j] += 1.0f;
    }
    /* upstream tensors, reached only through dy * l at the three sites */
    const char *upstream[] = { "h.0.attn.c_attn.weight", "h.0.attn.c_attn.bias", "h.1.mlp.c_fc.bias",
                               "h.0.ln_1.weight" };
    pr_error err = { 0 };
    for (size_t i = 0; i < sizeof upstream / sizeof upstream[0]; i++)
        assert_int_equal(pr_model_set_trainable(m, upstream[i], 1, &err), PR_OK);
    th_loss_ctx lc;
    loss_ctx_init(&lc, m, 3);
    th_forward_backward(&lc);
    int checked = 0;
    for (int i = 0; i < pr_model_n_tensors(m); i++) {
        const pr_tensor_info *t = pr_model_tensor(m, i);
        if (t->trainable) {
            th_check_tensor_fd(&lc, t, &FD_CHECK);
            checked++;
        }
    }
    assert_int_equal(checked, 3 * c.n_layers + 4);
    pr_model_detach_modules(m);
    pr_model_free(m);
}

static void selection_grad_case(int ti)
{
    pr_model_config c = config_a();
    pr_model *m = make_model(&c);
    attach(m, tech[ti], NULL, 0);
    th_loss_ctx lc;
    loss_ctx_init(&lc, m, 4);
    th_forward_backward(&lc);
    int checked = 0;
    for (int i = 0; i < pr_model_n_tensors(m); i++) {
        const pr_tensor_info *t = pr_model_tensor(m, i);
        if (t->trainable) {
            th_check_tensor_fd(&lc, t, &FD_CHECK);
            checked++;
        }
    }
    /* bitfit: 4 biases + 2 LN biases per layer + ln_f.bias; lnfit: 4 per
     * layer + 2; full: 12 per layer + wte, wpe, ln_f (2) */
    const int expect[N_TECH] = { 0, 6 * c.n_layers + 1, 4 * c.n_layers + 2, 12 * c.n_layers + 4 };
    assert_int_equal(checked, expect[ti]);
    pr_model_detach_modules(m);
    pr_model_free(m);
}

static void test_bitfit_gradients(void **state)
{
    (void)state;
    selection_grad_case(T_BITFIT);
}

static void test_lnfit_gradients(void **state)
{
    (void)state;
    selection_grad_case(T_LNFIT);
}

static void test_full_gradients(void **state)
{
    (void)state;
    selection_grad_case(T_FULL);
}

/* ---- (IA)^3 merge ------------------------------------------------------------------ */

/* The stream-site views: k / v column slices of c_attn (and its bias),
 * c_proj whole without a bias for ffn.act. */
static void test_stream_site_weights(void **state)
{
    (void)state;
    pr_model_config c = config_a();
    pr_model *m = make_model(&c);
    pr_error err = { 0 };
    float *w, *b;
    int ld, C = c.d_model, Q = c.n_heads * c.d_head, KV = c.n_kv_heads * c.d_head;
    const pr_tensor_info *cw = pr_model_find_tensor(m, "h.1.attn.c_attn.weight");
    const pr_tensor_info *cb = pr_model_find_tensor(m, "h.1.attn.c_attn.bias");
    assert_int_equal(pr_model_site_weight(m, PR_SITE_ATTN_K, 1, &w, &ld, &b, &err), PR_OK);
    assert_ptr_equal(w, cw->data + Q);
    assert_ptr_equal(b, cb->data + Q);
    assert_int_equal(ld, Q + 2 * KV);
    assert_int_equal(pr_model_site_weight(m, PR_SITE_ATTN_V, 1, &w, &ld, &b, &err), PR_OK);
    assert_ptr_equal(w, cw->data + Q + KV);
    assert_ptr_equal(b, cb->data + Q + KV);
    assert_int_equal(pr_model_site_weight(m, PR_SITE_FFN_ACT, 1, &w, &ld, &b, &err), PR_OK);
    assert_ptr_equal(w, pr_model_find_tensor(m, "h.1.mlp.c_proj.weight")->data);
    assert_null(b);
    assert_int_equal(ld, C);
    /* other stream sites still have none */
    assert_int_equal(pr_model_site_weight(m, PR_SITE_ATTN_OUT, 1, &w, &ld, &b, &err), PR_ERR_INVALID);
    assert_int_equal(pr_model_site_weight(m, PR_SITE_BLOCK_OUT, 0, &w, &ld, &b, &err), PR_ERR_INVALID);
    pr_model_free(m);
}

typedef struct saved_tensor {
    const pr_tensor_info *t;
    float *copy;
} saved_tensor;

static void merge_case(int with_bias)
{
    pr_model_config c = config_a();
    c.bias = with_bias;
    pr_model *m = make_model(&c);
    pr_module *mod = attach(m, tech[T_IA3], NULL, 0);
    for (int i = 0; i < pr_model_n_tensors(m); i++) {
        const pr_tensor_info *t = pr_model_tensor(m, i);
        if (strncmp(t->name, "ia3/", 4) != 0)
            continue;
        gc_fill(t->data, (size_t)t->numel, 70u + (unsigned)i, 0.5f);
        for (int64_t j = 0; j < t->numel; j++)
            t->data[j] += 1.0f;
    }
    /* every base tensor, to compare after unmerge */
    int nt = pr_model_n_tensors(m), ns = 0;
    saved_tensor *sv = calloc((size_t)nt, sizeof *sv);
    assert_non_null(sv);
    for (int i = 0; i < nt; i++) {
        const pr_tensor_info *t = pr_model_tensor(m, i);
        if (t->kind == PR_TENSOR_MODULE)
            continue;
        sv[ns].t = t;
        sv[ns].copy = malloc((size_t)t->numel * sizeof(float));
        assert_non_null(sv[ns].copy);
        memcpy(sv[ns].copy, t->data, (size_t)t->numel * sizeof(float));
        ns++;
    }
    th_loss_ctx lc;
    loss_ctx_init(&lc, m, 8);
    float *unmerged = th_logits_copy(&lc);
    size_t n = (size_t)TB * TT * c.vocab_size;
    pr_error err = { 0 };
    int rc = pr_module_merge(mod, &err);
    if (rc)
        fprintf(stderr, "merge: %s\n", err.msg);
    assert_int_equal(rc, PR_OK);
    float *merged = th_logits_copy(&lc);
    double scale = 0;
    for (size_t i = 0; i < n; i++)
        scale = fmax(scale, fabs(unmerged[i]));
    double d = th_max_abs_diff(unmerged, merged, n);
    printf("ia3 merge (bias %d): max |merged - unmerged| = %.3e, max |logit| = %.3e\n", with_bias, d, scale);
    assert_true(d <= 1e-5 * scale);

    /* the folded weights: W diag(l) in the k / v columns (and bias), diag(l)
     * W in c_proj's rows; the q columns and c_proj's bias untouched */
    int C = c.d_model, F = c.d_ff, Q = c.n_heads * c.d_head, KV = c.n_kv_heads * c.d_head, QKV = Q + 2 * KV;
    for (int l = 0; l < c.n_layers; l++) {
        char name[96];
        snprintf(name, sizeof name, "h.%d.attn.c_attn.weight", l);
        const pr_tensor_info *cw = pr_model_find_tensor(m, name);
        snprintf(name, sizeof name, "h.%d.mlp.c_proj.weight", l);
        const pr_tensor_info *pw = pr_model_find_tensor(m, name);
        snprintf(name, sizeof name, "ia3/h.%d.attn.k.ia3_l", l);
        const float *lk = pr_model_find_tensor(m, name)->data;
        snprintf(name, sizeof name, "ia3/h.%d.attn.v.ia3_l", l);
        const float *lv = pr_model_find_tensor(m, name)->data;
        snprintf(name, sizeof name, "ia3/h.%d.ffn.act.ia3_l", l);
        const float *lf = pr_model_find_tensor(m, name)->data;
        const float *cw0 = NULL, *pw0 = NULL, *cb0 = NULL;
        const pr_tensor_info *cb = NULL, *pb = NULL;
        snprintf(name, sizeof name, "h.%d.attn.c_attn.bias", l);
        cb = pr_model_find_tensor(m, name);
        snprintf(name, sizeof name, "h.%d.mlp.c_proj.bias", l);
        pb = pr_model_find_tensor(m, name);
        assert_true(with_bias ? cb && pb : !cb && !pb);
        for (int s = 0; s < ns; s++) {
            if (sv[s].t == cw)
                cw0 = sv[s].copy;
            if (sv[s].t == pw)
                pw0 = sv[s].copy;
            if (cb && sv[s].t == cb)
                cb0 = sv[s].copy;
            if (pb && sv[s].t == pb)
                assert_memory_equal(pb->data, sv[s].copy, (size_t)C * sizeof(float));
        }
        double worst = 0;
        for (int i = 0; i < C; i++)
            for (int j = 0; j < QKV; j++) {
                double f = j < Q ? 1.0 : j < Q + KV ? lk[j - Q] : lv[j - Q - KV];
                double want = f * cw0[(size_t)i * QKV + j];
                worst = fmax(worst, fabs(cw->data[(size_t)i * QKV + j] - want) / fmax(fabs(want), 1e-3));
                if (j < Q)
                    assert_true(cw->data[(size_t)i * QKV + j] == cw0[(size_t)i * QKV + j]);
            }
        for (int i = 0; i < F; i++)
            for (int j = 0; j < C; j++) {
                double want = (double)lf[i] * pw0[(size_t)i * C + j];
                worst = fmax(worst, fabs(pw->data[(size_t)i * C + j] - want) / fmax(fabs(want), 1e-3));
            }
        for (int j = 0; cb && j < QKV; j++) {
            double f = j < Q ? 1.0 : j < Q + KV ? lk[j - Q] : lv[j - Q - KV];
            double want = f * cb0[j];
            worst = fmax(worst, fabs(cb->data[j] - want) / fmax(fabs(want), 1e-3));
        }
        assert_true(worst <= 1e-6);
    }

    assert_int_equal(pr_module_unmerge(mod, &err), PR_OK);
    for (int s = 0; s < ns; s++)
        assert_memory_equal(sv[s].t->data, sv[s].copy, (size_t)sv[s].t->numel * sizeof(float));
    float *again = th_logits_copy(&lc);
    assert_memory_equal(unmerged, again, n * sizeof(float));
    free(again);
    free(merged);
    free(unmerged);
    for (int s = 0; s < ns; s++)
        free(sv[s].copy);
    free(sv);
    pr_model_detach_modules(m);
    pr_model_free(m);
}

static void test_ia3_merge(void **state)
{
    (void)state;
    merge_case(1);
}

static void test_ia3_merge_no_bias(void **state)
{
    (void)state;
    merge_case(0);
}

static void test_ia3_merge_direct(void **state)
{
    (void)state;
    enum { R = 3, N = 4 };
    /* a minimal host: errors, and (ABI 1) the frozen weight in f32, which merge reads through
     * base_weight_f32 into its scratch buffer base_w */
    const pr_host host = { .struct_size = sizeof(pr_host), .abi_major = PR_ABI_MAJOR, .error = th_host_error,
                           .base_weight_f32 = th_host.base_weight_f32 };
    float l[N] = { 0.5f, 1.0f, 2.0f, -1.0f }, W[R * N], b[N] = { 1, 2, 3, 4 }, dW[R * N], db[N], wbuf[R * N];
    for (int i = 0; i < R * N; i++)
        W[i] = (float)(i + 1);
    pr_tensor w = th_view2(W, R, N, N), bias = th_view2(b, 1, N, N), bd = th_view2(db, 1, N, N);
    bias.ndim = bd.ndim = 1;
    bias.shape[0] = bd.shape[0] = N;
    th_ctx t;
    pr_ctx *ctx = th_ctx_init(&t);
    ctx->host = &host;
    ctx->site = PR_SITE_ATTN_V;
    t.params[0] = th_view1(l, N);
    ctx->n_params = 1;
    t.scratch[0] = th_view2(wbuf, R, N, N); /* base_w: d_model x d_out floats */
    ctx->n_scratch = 1;
    ctx->base_weight = &w;
    ctx->base_layout = PR_WEIGHT_IN_OUT;
    ctx->base_bias = &bias;
    ctx->bias_delta = &bd;
    t.out = th_view2(dW, R, N, N);
    assert_int_equal(tech[T_IA3]->merge(ctx), 0);
    for (int i = 0; i < R; i++)
        for (int j = 0; j < N; j++)
            assert_float_equal(dW[i * N + j], W[i * N + j] * (l[j] - 1.0f), 0);
    for (int j = 0; j < N; j++)
        assert_float_equal(db[j], b[j] * (l[j] - 1.0f), 0);
    /* without a bias delta to write */
    ctx->bias_delta = NULL;
    th_last_error[0] = 0;
    assert_int_not_equal(tech[T_IA3]->merge(ctx), 0);
    assert_non_null(strstr(th_last_error, "bias"));
    /* ffn.act: rows of a [N, R] weight */
    pr_tensor w2 = th_view2(W, N, R, R);
    ctx->base_weight = &w2;
    ctx->base_bias = NULL;
    ctx->site = PR_SITE_FFN_ACT;
    t.scratch[0] = th_view2(wbuf, N, R, R);
    t.out = th_view2(dW, N, R, R);
    assert_int_equal(tech[T_IA3]->merge(ctx), 0);
    for (int i = 0; i < N; i++)
        for (int j = 0; j < R; j++)
            assert_float_equal(dW[i * R + j], (l[i] - 1.0f) * W[i * R + j], 0);
}

/* ---- the conformance checker ------------------------------------------------------ */

static void test_conformance(void **state)
{
    (void)state;
    for (int i = 0; i < N_TECH; i++) {
        char path[512];
        snprintf(path, sizeof path, PLUGIN_DIR "%s.so", so_names[i]);
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
        assert_int_equal(rc, PR_OK);
        assert_true(n_checks >= 5);
        assert_int_equal(n_failed, 0);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_descriptors),
        cmocka_unit_test(test_ia3_counts),
        cmocka_unit_test(test_selection_counts),
        cmocka_unit_test(test_identity_at_init),
        cmocka_unit_test(test_ia3_gradients),
        cmocka_unit_test(test_bitfit_gradients),
        cmocka_unit_test(test_lnfit_gradients),
        cmocka_unit_test(test_full_gradients),
        cmocka_unit_test(test_stream_site_weights),
        cmocka_unit_test(test_ia3_merge),
        cmocka_unit_test(test_ia3_merge_no_bias),
        cmocka_unit_test(test_ia3_merge_direct),
        cmocka_unit_test(test_conformance),
    };
    return cmocka_run_group_tests(tests, setup_plugins, teardown_plugins);
}
