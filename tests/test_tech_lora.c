/* Tests of the LoRA family as loaded plugins: LoRA's options end to end
 * (plugins/lora.c) and DoRA (plugins/dora.c).
 *
 * Model shapes (GPT-2 family, fused QKV, no grouped-query attention,
 * init_std 0.1 as test_model.c, vocabulary 64, batch 2 x 6, eval mode
 * unless stated):  A: L=2, C=32, H=4, F=128;  B: L=3, C=48, H=6, F=96.
 *
 * LoRA (Hu et al. 2021, arXiv 2106.09685):
 *  - per-site options: r=4 at q, r=8 (alpha 32) at v, r=2 at ffn.down;
 *    pr_module_plan_for and the attached module count
 *    L * sum_sites r_site * (d_in + d_out), and each tensor has its site's
 *    rank, on both shapes;
 *  - identity at step 0 (B = 0): logits bit-identical to the model without
 *    the module, in eval and in training with dropout;
 *  - merge folds s_site * A^T.B^T into each site's weight slice with
 *    s = alpha/r, or alpha/sqrt(r) with use_rslora (to 1e-6 + 1e-4 of the
 *    largest delta); merged logits equal unmerged ones within 1e-5 of the
 *    largest logit; a second merge fails with PR_ERR_INVALID and changes
 *    nothing; unmerge restores every base tensor and the logits bit for
 *    bit; a second unmerge fails;
 *  - finite differences through the whole model (dropout 0) for every
 *    lora_A / lora_B and the upstream LayerNorm gains;
 *  - dropout: in eval a module with dropout 0.5 gives the logits of the
 *    same module with dropout 0 bit for bit, in training it changes them;
 *    driven directly, forward drops 30% +- 5% of a 64 x 100 input (a
 *    10-sigma band), scales the kept ones by 1/(1-p), uses exactly the
 *    host's keyed mask (th_host.dropout_mask for the context), draws the
 *    same mask from the same key and another from another module_seed.
 *
 * DoRA (Liu et al. 2024, arXiv 2402.09353):
 *  - callbacks driven through the tests' host table (harness.h, a
 *    reference GEMM in double): setup() sets m to W's column norms; with B = 0 the site
 *    output is unchanged bit for bit; integrate_forward equals
 *    x.W' + b, W' = m * V / ||V||_c, V = W + s * A^T.B^T, computed here in
 *    double (1e-5 relative); forward()'s h is the same change; central
 *    differences (eps 1e-2, |fd - g| <= 1e-4 + 2e-3 max(|g|, |fd|)) of
 *    L = sum(w * y') for lora_A, lora_B, the magnitude and x, through
 *    forward/backward and through integrate_forward/backward (x reaching
 *    y' both directly and through y = x.W + b), without and with dropout;
 *    detach_norm keeps dm and dx and drops the norm's share of dA, dB;
 *    merge's delta reproduces y' - y (1e-5 relative);
 *  - attached: counts L * sum_sites (r * (d_in + d_out) + d_out) on both
 *    shapes; identity at init (bit-identical logits); finite differences
 *    of the model's loss for every lora_A, lora_B, magnitude and upstream
 *    LayerNorm gains (eps 3e-3, |fd - g| <= 1e-4 + 5e-2 max(|g|, |fd|),
 *    test_lora's tolerances); merge / unmerge as LoRA's.
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

#define LORA_SO TEST_BUILDDIR "/plugins/.libs/lora.so"
#define DORA_SO TEST_BUILDDIR "/plugins/.libs/dora.so"

static void *lora_so, *dora_so;
static const pr_technique *lora, *dora;

static int setup_plugins(void **state)
{
    (void)state;
    lora = th_plugin_technique(LORA_SO, &lora_so);
    dora = th_plugin_technique(DORA_SO, &dora_so);
    return lora && dora ? 0 : -1;
}

static int teardown_plugins(void **state)
{
    (void)state;
    if (lora_so)
        dlclose(lora_so);
    if (dora_so)
        dlclose(dora_so);
    return 0;
}

/* ---- tensor views and option lookup for driving the callbacks directly ------- */

/* ---- models ------------------------------------------------------------------ */

enum { MB = 2, MT = 6, MV = 64 };

typedef struct shape {
    int L, C, H, F;
} shape;

static const shape SHAPES[2] = { { 2, 32, 4, 128 }, { 3, 48, 6, 96 } };

static void shape_config(const shape *s, pr_model_config *c)
{
    *c = th_config(&(th_shape){ s->L, s->C, s->H, s->H, s->C / s->H, s->F, MV, 16 }, 7);
}

typedef struct run {
    pr_model *m;
    int tokens[MB * MT], targets[MB * MT];
} run;

static run *run_new(const shape *s)
{
    run *r = calloc(1, sizeof *r);
    assert_non_null(r);
    pr_model_config c;
    shape_config(s, &c);
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

/* Mean cross-entropy recomputed in double from the logits. */
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

/* max |a - b| over the logits, and max |a| in *scale */
static double logits_diff(const float *a, const float *b, double *scale)
{
    double worst = 0.0, s = 0.0;
    for (size_t i = 0; i < (size_t)MB * MT * MV; i++) {
        worst = fmax(worst, fabs((double)a[i] - b[i]));
        s = fmax(s, fabs((double)a[i]));
    }
    if (scale)
        *scale = s;
    return worst;
}

static pr_module *attach(run *r, const pr_technique *t, uint32_t sites, const pr_option_setting *o,
                         int n)
{
    pr_module_spec spec = { .technique = t, .sites = sites, .options = o, .n_options = n,
                            .trainable = 1, .seed = 11 };
    return th_attach(r->m, &spec);
}

/* The module tensor "<module>/h.<layer>.<site>.<param>", or NULL. */
static const pr_tensor_info *mtensor(const run *r, const char *mod, int layer, const char *site,
                                     const char *param)
{
    char name[128];
    snprintf(name, sizeof name, "%s/h.%d.%s.%s", mod, layer, site, param);
    return pr_model_find_tensor(r->m, name);
}

/* Fill every module tensor whose name ends with suffix. */
static int fill_module(run *r, const char *suffix, unsigned seed, float scale)
{
    size_t ls = strlen(suffix);
    int n = 0;
    for (int i = 0; i < pr_model_n_tensors(r->m); i++) {
        const pr_tensor_info *t = pr_model_tensor(r->m, i);
        size_t ln = strlen(t->name);
        if (t->kind == PR_TENSOR_MODULE && ln >= ls && strcmp(t->name + ln - ls, suffix) == 0)
            gc_fill(t->data, (size_t)t->numel, seed + (unsigned)n++, scale);
    }
    return n;
}

/* Copies of every base tensor, to check that unmerge restores them. */
typedef struct snapshot {
    int n;
    float **data;
} snapshot;

static snapshot snap_base(const run *r)
{
    snapshot s = { pr_model_n_tensors(r->m), NULL };
    s.data = calloc((size_t)s.n, sizeof *s.data);
    assert_non_null(s.data);
    for (int i = 0; i < s.n; i++) {
        const pr_tensor_info *t = pr_model_tensor(r->m, i);
        if (t->kind == PR_TENSOR_MODULE)
            continue;
        s.data[i] = malloc((size_t)t->numel * sizeof(float));
        assert_non_null(s.data[i]);
        memcpy(s.data[i], t->data, (size_t)t->numel * sizeof(float));
    }
    return s;
}

/* Number of base tensors that differ from the snapshot (bitwise). */
static int snap_changed(const run *r, const snapshot *s)
{
    int changed = 0;
    for (int i = 0; i < s->n; i++) {
        const pr_tensor_info *t = pr_model_tensor(r->m, i);
        if (s->data[i] && memcmp(s->data[i], t->data, (size_t)t->numel * sizeof(float)) != 0)
            changed++;
    }
    return changed;
}

static void snap_free(snapshot *s)
{
    for (int i = 0; i < s->n; i++)
        free(s->data[i]);
    free(s->data);
}

/* A site's frozen weight [d_in, d_out] copied out packed. */
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

/* Merge, compare, merge again (an error that changes nothing), unmerge
 * (bit-exact), unmerge again (an error). */
static void check_merge_cycle(run *r, pr_module *mod)
{
    snapshot base = snap_base(r);
    float *before = logits_now(r);
    pr_error err = { 0 };
    if (pr_module_merge(mod, &err))
        fail_msg("merge: %s", err.msg);
    assert_true(snap_changed(r, &base) > 0);
    float *merged = logits_now(r);
    double scale, worst = logits_diff(merged, before, &scale);
    printf("%s merge: max |merged - unmerged| = %.3e (max |logit| %.3e)\n", pr_module_name(mod),
           worst, scale);
    assert_true(scale > 0.1);
    assert_true(worst <= 1e-5 * scale);

    /* the host refuses a second merge and leaves the merged weights alone */
    snapshot once = snap_base(r);
    err.msg[0] = 0;
    assert_int_equal(pr_module_merge(mod, &err), PR_ERR_INVALID);
    assert_non_null(strstr(err.msg, "already merged"));
    assert_int_equal(snap_changed(r, &once), 0);
    float *again = logits_now(r);
    assert_memory_equal(again, merged, (size_t)MB * MT * MV * sizeof(float));

    if (pr_module_unmerge(mod, &err))
        fail_msg("unmerge: %s", err.msg);
    assert_int_equal(snap_changed(r, &base), 0);
    float *after = logits_now(r);
    assert_memory_equal(after, before, (size_t)MB * MT * MV * sizeof(float));
    assert_int_equal(pr_module_unmerge(mod, &err), PR_ERR_INVALID);
    snap_free(&base);
    snap_free(&once);
    free(before);
    free(merged);
    free(again);
    free(after);
}

/* ======================================================================== LoRA */

static const pr_option_setting lora_site_opts[] = {
    { "r", "4", PR_SITE_Q },
    { "r", "8", PR_SITE_V },
    { "alpha", "32", PR_SITE_V },
    { "r", "2", PR_SITE_FFN_DOWN },
};
static const uint32_t LORA_SITES =
    PR_SITE_BIT(PR_SITE_Q) | PR_SITE_BIT(PR_SITE_V) | PR_SITE_BIT(PR_SITE_FFN_DOWN);

static void test_lora_descriptor(void **state)
{
    (void)state;
    const pr_option_decl *o;
    assert_non_null(o = th_option(lora, "r"));
    assert_true(o->per_site && o->def == 8);
    assert_non_null(o = th_option(lora, "alpha"));
    assert_true(o->per_site && o->def == 8);
    assert_non_null(o = th_option(lora, "dropout"));
    assert_true(o->def == 0 && !o->per_site);
    assert_non_null(o = th_option(lora, "use_rslora"));
    assert_true(o->def == 0 && o->type == PR_OPT_BOOL);
    assert_non_null(strstr(lora->param_formula, "per insertion: r * (d_in + d_out)"));
    assert_non_null(strstr(lora->param_formula, "insertions = chosen sites x chosen layers"));
    pr_error err = { 0 };
    assert_int_equal(pr_technique_validate(lora, &err), PR_OK);
}

/* r * (d_in + d_out) per site, with the site's own r. */
/* Plan and attach technique t at sites with options o on shape s: the
 * plan, the module and the model's tensor table must all count `want`
 * parameters (all trainable) in `insertions` insertions.  Returns the run
 * with the module attached, for per-tensor checks; run_free it. */
static run *check_counts(const shape *s, const pr_technique *t, uint32_t sites, const pr_option_setting *o,
                         int n_o, int64_t want, int64_t frozen, int insertions)
{
    pr_model_config cfg;
    shape_config(s, &cfg);
    pr_module_spec spec = { .technique = t, .sites = sites, .options = o, .n_options = n_o, .trainable = 1,
                            .seed = 11 };
    pr_module_plan plan;
    pr_error err = { 0 };
    assert_int_equal(pr_module_plan_for(&cfg, &spec, &plan, &err), PR_OK);
    assert_int_equal(plan.params, want + frozen);
    assert_int_equal(plan.trainable, want);
    assert_int_equal(plan.insertions, insertions);

    run *r = run_new(s);
    pr_module *mod = attach(r, t, sites, o, n_o);
    assert_int_equal(pr_module_param_count(mod), want + frozen);
    assert_int_equal(pr_module_trainable_count(mod), want);
    int64_t in_table = 0;
    for (int i = 0; i < pr_model_n_tensors(r->m); i++) {
        const pr_tensor_info *ti = pr_model_tensor(r->m, i);
        if (ti->kind == PR_TENSOR_MODULE)
            in_table += ti->numel;
    }
    assert_int_equal(in_table, want + frozen);
    return r;
}

static void test_lora_per_site_counts(void **state)
{
    (void)state;
    for (int k = 0; k < 2; k++) {
        const shape *s = &SHAPES[k];
        const int64_t want = (int64_t)s->L * (4 * (s->C + s->C) + 8 * (s->C + s->C) +
                                              2 * (s->F + s->C));
        /* lora_A0 / lora_B0: frozen, as many as the trainable factors */
        run *r = check_counts(s, lora, LORA_SITES, lora_site_opts, 4, want, 0, 3 * s->L);
        for (int l = 0; l < s->L; l++) {
            const pr_tensor_info *qa = mtensor(r, "lora", l, "q", "lora_A");
            const pr_tensor_info *vb = mtensor(r, "lora", l, "v", "lora_B");
            const pr_tensor_info *da = mtensor(r, "lora", l, "ffn.down", "lora_A");
            assert_non_null(qa);
            assert_non_null(vb);
            assert_non_null(da);
            assert_true(qa->shape[0] == 4 && qa->shape[1] == s->C);
            assert_true(vb->shape[0] == s->C && vb->shape[1] == 8);
            assert_true(da->shape[0] == 2 && da->shape[1] == s->F);
        }
        run_free(r);
    }
}

/* B = 0: the logits are the base model's, bit for bit, in eval and in
 * training with dropout. */
static void test_lora_identity(void **state)
{
    (void)state;
    for (int k = 0; k < 2; k++) {
        run *r = run_new(&SHAPES[k]);
        float *base = logits_now(r);
        const pr_option_setting o[] = { { "r", "4", PR_SITE_Q }, { "dropout", "0.3", -1 } };
        (void)attach(r, lora, LORA_SITES, o, 2);
        float *with = logits_now(r);
        assert_memory_equal(with, base, (size_t)MB * MT * MV * sizeof(float));
        pr_model_set_training(r->m, 1);
        float *train = logits_now(r);
        pr_model_detach_modules(r->m);
        float *train_base = logits_now(r);
        assert_memory_equal(train, train_base, (size_t)MB * MT * MV * sizeof(float));
        free(base);
        free(with);
        free(train);
        free(train_base);
        run_free(r);
    }
}

/* merge adds s_site * A^T.B^T to each site's slice of the weight. */
static void check_lora_deltas(run *r, int rslora)
{
    const struct {
        int site;
        const char *name;
        double r, alpha;
    } sites[] = { { PR_SITE_Q, "q", 4, 8 }, { PR_SITE_V, "v", 8, 32 }, { PR_SITE_FFN_DOWN, "ffn.down", 2, 8 } };
    const int L = pr_model_get_config(r->m)->n_layers;
    pr_module *mod = pr_model_module(r->m, 0);
    float *orig[3][3];
    int din[3], dout[3];
    for (int l = 0; l < L; l++)
        for (int s = 0; s < 3; s++)
            orig[l][s] = site_weight_copy(r, sites[s].site, l, &din[s], &dout[s]);
    pr_error err = { 0 };
    if (pr_module_merge(mod, &err))
        fail_msg("merge: %s", err.msg);
    for (int l = 0; l < L; l++)
        for (int s = 0; s < 3; s++) {
            double sc = rslora ? sites[s].alpha / sqrt(sites[s].r) : sites[s].alpha / sites[s].r;
            const pr_tensor_info *a = mtensor(r, "lora", l, sites[s].name, "lora_A");
            const pr_tensor_info *b = mtensor(r, "lora", l, sites[s].name, "lora_B");
            int rank = (int)a->shape[0];
            assert_int_equal(rank, (int)sites[s].r);
            int d1, d2;
            float *now = site_weight_copy(r, sites[s].site, l, &d1, &d2);
            double worst = 0.0, big = 0.0;
            for (int i = 0; i < din[s]; i++)
                for (int j = 0; j < dout[s]; j++) {
                    double want = 0.0;
                    for (int t = 0; t < rank; t++)
                        want += (double)a->data[t * din[s] + i] * b->data[j * rank + t];
                    want *= sc;
                    double got = (double)now[i * dout[s] + j] - orig[l][s][i * dout[s] + j];
                    worst = fmax(worst, fabs(got - want));
                    big = fmax(big, fabs(want));
                }
            assert_true(big > 1e-2);
            assert_true(worst <= 1e-6 + 1e-4 * big);
            free(now);
            free(orig[l][s]);
        }
    assert_int_equal(pr_module_unmerge(mod, &err), PR_OK);
}

static void test_lora_scales_merge(void **state)
{
    (void)state;
    for (int rs = 0; rs < 2; rs++) {
        run *r = run_new(&SHAPES[0]);
        pr_option_setting o[5];
        memcpy(o, lora_site_opts, sizeof lora_site_opts);
        o[4] = (pr_option_setting){ "use_rslora", rs ? "true" : "false", -1 };
        pr_module *mod = attach(r, lora, LORA_SITES, o, 5);
        assert_int_equal(fill_module(r, "lora_B", 300, 0.3f), 6);
        check_lora_deltas(r, rs);
        check_merge_cycle(r, mod);
        run_free(r);
    }
    /* shape B with the default site (the fused qkv) */
    run *r = run_new(&SHAPES[1]);
    pr_module *mod = attach(r, lora, 0, NULL, 0);
    assert_int_equal(pr_module_insertions(mod), 3);
    assert_int_equal(fill_module(r, "lora_B", 400, 0.3f), 3);
    check_merge_cycle(r, mod);
    run_free(r);
}

static void test_lora_gradients(void **state)
{
    (void)state;
    run *r = run_new(&SHAPES[0]);
    pr_option_setting o[5];
    memcpy(o, lora_site_opts, sizeof lora_site_opts);
    o[4] = (pr_option_setting){ "use_rslora", "true", -1 };
    (void)attach(r, lora, LORA_SITES, o, 5);
    pr_error err = { 0 };
    assert_int_equal(pr_model_set_trainable(r->m, "h.0.ln_1.weight", 1, &err), PR_OK);
    assert_int_equal(pr_model_set_trainable(r->m, "h.1.ln_2.weight", 1, &err), PR_OK);
    assert_int_equal(fill_module(r, "lora_A", 500, 0.2f), 6);
    assert_int_equal(fill_module(r, "lora_B", 600, 0.2f), 6);
    pr_model_zero_grad(r->m);
    (void)model_loss(r);
    if (pr_model_backward(r->m, &err))
        fail_msg("backward: %s", err.msg);
    int fails = 0, n = 0;
    for (int i = 0; i < pr_model_n_tensors(r->m); i++) {
        const pr_tensor_info *t = pr_model_tensor(r->m, i);
        if (!t->trainable)
            continue;
        assert_non_null(t->grad);
        fails += gc_check(t->name, t->data, t->grad, (size_t)t->numel, model_loss, r, 3e-3, 5e-2,
                          1e-4, 4);
        n++;
    }
    assert_int_equal(n, 12 + 2);
    assert_int_equal(fails, 0);
    run_free(r);
}

/* One LoRA insertion driven directly, to look at its dropout mask. */
enum { DR_ROWS = 64, DR_IN = 100, DR_OUT = 5, DR_R = 2, DR_WORDS = (DR_IN + 31) / 32 };

typedef struct drop_fixture {
    pr_option_value opts[4];
    float A[DR_R * DR_IN], B[DR_OUT * DR_R];
    float x[DR_ROWS * DR_IN], h[DR_ROWS * DR_OUT];
    float xa[DR_ROWS * DR_R], mask[DR_ROWS * DR_WORDS], on[1];
    float xd[DR_ROWS * DR_IN], dxa[DR_ROWS * DR_R];
    pr_dims dims;
    th_ctx t; /* the context and its tensors (harness.h) */
} drop_fixture;

static drop_fixture *drop_fixture_new(double p)
{
    drop_fixture *f = calloc(1, sizeof *f);
    assert_non_null(f);
    f->opts[0].num = DR_R;
    f->opts[1].num = 4;
    f->opts[2].num = p;
    gc_fill(f->A, DR_R * DR_IN, 1, 0.5f);
    gc_fill(f->B, DR_OUT * DR_R, 2, 0.5f);
    for (int i = 0; i < DR_ROWS * DR_IN; i++)
        f->x[i] = 1.0f;
    th_ctx *t = &f->t;
    t->params[0] = th_view2(f->A, DR_R, DR_IN, DR_IN);
    t->params[1] = th_view2(f->B, DR_OUT, DR_R, DR_R);
    t->saved[0] = th_view2(f->xa, DR_ROWS, DR_R, DR_R);
    t->saved[1] = th_view2(f->mask, DR_ROWS, DR_WORDS, DR_WORDS);
    t->saved[2] = th_view1(f->on, 1);
    t->scratch[0] = th_view2(f->xd, DR_ROWS, DR_IN, DR_IN);
    t->scratch[1] = th_view2(f->dxa, DR_ROWS, DR_R, DR_R);
    f->dims = (pr_dims){ .struct_size = sizeof(pr_dims), .d_model = DR_IN, .n_heads = 1,
                         .n_kv_heads = 1, .d_head = DR_IN, .d_ff = DR_OUT, .n_layers = 1,
                         .vocab = 8, .d_in = DR_IN, .d_out = DR_OUT, .family = 1 };
    pr_ctx *c = th_ctx_bind(t);
    c->technique = lora;
    c->dims = &f->dims;
    c->site = PR_SITE_Q;
    c->B = 1;
    c->T = DR_ROWS;
    c->rows = DR_ROWS;
    c->training = 1;
    c->seed = 99;
    c->module_seed = 99; /* the dropout key, with step 0 and sample_index NULL (row / T) */
    c->options = f->opts;
    c->n_options = 4;
    c->n_params = 2;
    c->n_saved = 3;
    c->n_scratch = 2;
    t->in = th_view2(f->x, DR_ROWS, DR_IN, DR_IN);
    t->out = th_view2(f->h, DR_ROWS, DR_OUT, DR_OUT);
    return f;
}

static void test_lora_dropout(void **state)
{
    (void)state;
    /* driven directly: ~p dropped, kept ones scaled, the mask a function of the key
     * (module_seed, step, sample, position, site, layer): the host's keyed mask */
    drop_fixture *f = drop_fixture_new(0.3);
    pr_ctx *c = &f->t.c;
    assert_int_equal(lora->forward(c), 0);
    assert_true(f->on[0] == 1.0f);
    int dropped = 0;
    for (int i = 0; i < DR_ROWS * DR_IN; i++) {
        if (f->xd[i] == 0.0f)
            dropped++;
        else
            assert_float_equal(f->xd[i], 1.0f / 0.7f, 1e-6);
    }
    double frac = (double)dropped / (DR_ROWS * DR_IN);
    printf("lora dropout p=0.3: dropped %.4f of %d inputs\n", frac, DR_ROWS * DR_IN);
    assert_true(fabs(frac - 0.3) <= 0.05);
    /* the mask is exactly the one the host draws for this context (stream 0), and x_dropped
     * drops exactly its cleared bits */
    uint32_t want[DR_ROWS * DR_WORDS];
    th_host.dropout_mask(c, 0, 0.3f, DR_IN, want);
    assert_memory_equal(f->mask, want, sizeof want);
    for (int i = 0; i < DR_ROWS; i++)
        for (int j = 0; j < DR_IN; j++)
            assert_int_equal(f->xd[i * DR_IN + j] != 0.0f, (want[i * DR_WORDS + j / 32] >> (j % 32)) & 1u);
    float mask1[DR_ROWS * DR_WORDS], h1[DR_ROWS * DR_OUT];
    memcpy(mask1, f->mask, sizeof mask1);
    memcpy(h1, f->h, sizeof h1);
    assert_int_equal(lora->forward(c), 0);
    assert_memory_equal(mask1, f->mask, sizeof mask1);
    assert_memory_equal(h1, f->h, sizeof h1);
    c->module_seed = 100;
    assert_int_equal(lora->forward(c), 0);
    assert_memory_not_equal(mask1, f->mask, sizeof mask1);
    /* eval: no dropout, the output of p = 0 */
    c->training = 0;
    assert_int_equal(lora->forward(c), 0);
    assert_true(f->on[0] == 0.0f);
    memcpy(h1, f->h, sizeof h1);
    f->opts[2].num = 0;
    c->training = 1;
    assert_int_equal(lora->forward(c), 0);
    assert_memory_equal(h1, f->h, sizeof h1);
    free(f);

    /* attached: eval with dropout 0.5 == dropout 0; training changes the logits */
    float *logits[2];
    for (int k = 0; k < 2; k++) {
        run *r = run_new(&SHAPES[0]);
        const pr_option_setting o[] = { { "dropout", k ? "0.5" : "0", -1 } };
        (void)attach(r, lora, LORA_SITES, o, 1);
        assert_int_equal(fill_module(r, "lora_B", 700, 0.3f), 6);
        logits[k] = logits_now(r);
        if (k) {
            pr_model_set_training(r->m, 1);
            float *train = logits_now(r);
            double worst = logits_diff(train, logits[k], NULL);
            assert_true(worst > 1e-3);
            free(train);
        }
        run_free(r);
    }
    assert_memory_equal(logits[0], logits[1], (size_t)MB * MT * MV * sizeof(float));
    free(logits[0]);
    free(logits[1]);
}

/* ======================================================================== DoRA */

static void test_dora_descriptor(void **state)
{
    (void)state;
    const pr_technique *t = dora;
    pr_error err = { 0 };
    assert_int_equal(pr_technique_validate(t, &err), PR_OK);
    assert_string_equal(t->name, "dora");
    assert_non_null(strstr(t->citation, "2402.09353"));
    assert_int_equal(t->intra, PR_INTRA_FACTORISED);
    assert_int_equal(t->inter, PR_INTER_FIXED);
    assert_int_equal(t->adaptation, PR_ADAPT_REPARAMETERISATION);
    assert_int_equal(t->sharing, PR_SHARE_NONE);
    assert_int_equal(t->input, PR_INPUT_WEIGHTS);
    assert_int_equal(t->insertion, PR_INSERT_PARALLEL);
    assert_int_equal(t->insertions, PR_INSERTIONS_PER_SITE_LAYER);
    assert_int_equal(t->integration, PR_INTEGRATE_CUSTOM);
    assert_int_equal(t->workspace, PR_WS_ATTENTION | PR_WS_FFN);
    assert_int_equal(t->default_sites, PR_SITE_BIT(PR_SITE_QKV));
    assert_false(t->sites & PR_SITE_BIT(PR_SITE_ATTN_K));
    const pr_option_decl *o;
    assert_non_null(o = th_option(t, "r"));
    assert_true(o->def == 8 && o->per_site);
    assert_non_null(o = th_option(t, "alpha"));
    assert_true(o->def == 8 && o->per_site);
    assert_non_null(o = th_option(t, "dropout"));
    assert_true(o->def == 0);
    assert_non_null(o = th_option(t, "use_rslora"));
    assert_true(o->def == 0);
    assert_non_null(o = th_option(t, "detach_norm"));
    assert_true(o->def == 0 && o->type == PR_OPT_BOOL);
    assert_int_equal(t->n_params, 3);
    assert_string_equal(t->params[0].name, "lora_A");
    assert_string_equal(t->params[1].name, "lora_B");
    assert_string_equal(t->params[2].name, "lora_magnitude_vector");
    assert_string_equal(t->params[2].shape, "d_out");
    assert_int_equal(t->params[1].init, PR_INIT_ZEROS);
    assert_non_null(strstr(t->param_formula, "per insertion: r * (d_in + d_out) + d_out"));
    assert_non_null(t->integrate_forward);
    assert_non_null(t->integrate_backward);
    assert_non_null(t->merge);
    assert_non_null(t->setup);
    assert_null(dlsym(dora_so, "dora_forward"));
}

/* One DoRA insertion with its own memory; x, y and W in wider rows. */
enum { D_ROWS = 5, D_IN = 9, D_OUT = 7, D_R = 3, LDX = D_IN + 2, LDY = D_OUT + 3, LDW = D_OUT + 4,
       D_WORDS = (D_IN + 31) / 32 };

typedef struct dfix {
    pr_option_value opts[5];
    float A[D_R * D_IN], B[D_OUT * D_R], m[D_OUT];
    float dA[D_R * D_IN], dB[D_OUT * D_R], dm[D_OUT];
    float W[D_IN * LDW], bias[D_OUT];
    float x[D_ROWS * LDX], dx[D_ROWS * LDX], y[D_ROWS * LDY], dy[D_ROWS * LDY], w[D_ROWS * LDY];
    float xa[D_ROWS * D_R], u[D_ROWS * D_OUT], norm[D_OUT], mask[D_ROWS * D_WORDS], flags[2];
    float xd[D_ROWS * D_IN], v[D_IN * D_OUT], tmp[D_ROWS * D_OUT], dxa[D_ROWS * D_R], col[D_OUT];
    float wf[D_IN * D_OUT];
    pr_tensor bw, bb;
    pr_dims dims;
    th_ctx t; /* the context and its tensors (harness.h) */
    int integrate;
} dfix;

static dfix *dfix_new(double dropout, int training, int detach)
{
    dfix *f = calloc(1, sizeof *f);
    assert_non_null(f);
    f->opts[0].num = D_R;
    f->opts[1].num = 6;   /* s = 2 */
    f->opts[2].num = dropout;
    f->opts[3].num = 0;
    f->opts[4].num = detach;
    gc_fill(f->A, D_R * D_IN, 1, 0.5f);
    gc_fill(f->B, D_OUT * D_R, 2, 0.5f);
    gc_fill(f->W, D_IN * LDW, 3, 0.5f);
    gc_fill(f->bias, D_OUT, 4, 0.5f);
    gc_fill(f->x, D_ROWS * LDX, 5, 1.0f);
    gc_fill(f->w, D_ROWS * LDY, 6, 1.0f);
    for (int j = 0; j < D_OUT; j++)
        f->m[j] = 1.0f + 0.1f * (float)j;
    th_ctx *t = &f->t;
    t->params[0] = th_view2(f->A, D_R, D_IN, D_IN);
    t->params[1] = th_view2(f->B, D_OUT, D_R, D_R);
    t->params[2] = th_view1(f->m, D_OUT);
    t->grads[0] = th_view2(f->dA, D_R, D_IN, D_IN);
    t->grads[1] = th_view2(f->dB, D_OUT, D_R, D_R);
    t->grads[2] = th_view1(f->dm, D_OUT);
    t->saved[0] = th_view2(f->xa, D_ROWS, D_R, D_R);
    t->saved[1] = th_view2(f->u, D_ROWS, D_OUT, D_OUT);
    t->saved[2] = th_view1(f->norm, D_OUT);
    t->saved[3] = th_view2(f->mask, D_ROWS, D_WORDS, D_WORDS);
    t->saved[4] = th_view1(f->flags, 2);
    t->scratch[0] = th_view2(f->xd, D_ROWS, D_IN, D_IN);
    t->scratch[1] = th_view2(f->v, D_IN, D_OUT, D_OUT);
    t->scratch[2] = th_view2(f->tmp, D_ROWS, D_OUT, D_OUT);
    t->scratch[3] = th_view2(f->dxa, D_ROWS, D_R, D_R);
    t->scratch[4] = th_view1(f->col, D_OUT);
    /* ABI 1: the frozen weight in f32 [d_in, d_out], through host->base_weight_f32 */
    t->scratch[5] = th_view2(f->wf, D_IN, D_OUT, D_OUT);
    f->bw = th_view2(f->W, D_IN, D_OUT, LDW);
    f->bb = th_view1(f->bias, D_OUT);
    f->dims = (pr_dims){ .struct_size = sizeof(pr_dims), .d_model = D_IN, .n_heads = 1,
                         .n_kv_heads = 1, .d_head = D_IN, .d_ff = D_OUT, .n_layers = 1,
                         .vocab = 8, .d_in = D_IN, .d_out = D_OUT, .family = 1 };
    pr_ctx *c = th_ctx_bind(t);
    c->technique = dora;
    c->dims = &f->dims;
    c->site = PR_SITE_Q;
    c->B = 1;
    c->T = D_ROWS;
    c->rows = D_ROWS;
    c->training = training;
    c->seed = 4242;
    c->module_seed = 4242;
    c->options = f->opts;
    c->n_options = 5;
    c->n_params = 3;
    c->n_saved = 5;
    c->n_scratch = 6;
    t->in = th_view2(f->x, D_ROWS, D_IN, LDX);
    c->base_weight = &f->bw;
    c->base_layout = PR_WEIGHT_IN_OUT;
    c->base_bias = &f->bb;
    return f;
}

/* y (rows, d_out; LDY) = x.W + b, in double rounded once. */
static void base_output(dfix *f)
{
    for (int i = 0; i < D_ROWS; i++)
        for (int j = 0; j < D_OUT; j++) {
            double acc = f->bias[j];
            for (int k = 0; k < D_IN; k++)
                acc += (double)f->x[i * LDX + k] * f->W[k * LDW + j];
            f->y[i * LDY + j] = (float)acc;
        }
}

/* W' in double: m * V / ||V||_c, V = W + s * A^T.B^T. */
static void reference_weight(const dfix *f, double s, double *wp)
{
    for (int j = 0; j < D_OUT; j++) {
        double n2 = 0.0;
        for (int k = 0; k < D_IN; k++) {
            double v = f->W[k * LDW + j];
            for (int t = 0; t < D_R; t++)
                v += s * (double)f->A[t * D_IN + k] * f->B[j * D_R + t];
            wp[k * D_OUT + j] = v;
            n2 += v * v;
        }
        for (int k = 0; k < D_IN; k++)
            wp[k * D_OUT + j] *= f->m[j] / sqrt(n2);
    }
}

/* L = sum(w * out): integrate mode runs y = x.W + b then integrate_forward
 * (out = y'), otherwise forward (out = h). */
static double dora_loss(void *arg)
{
    dfix *f = arg;
    th_ctx c;
    th_ctx_copy(&c, &f->t);
    int rc;
    if (f->integrate) {
        base_output(f);
        c.out = th_view2(f->y, D_ROWS, D_OUT, LDY);
        rc = dora->integrate_forward(&c.c);
    } else {
        memset(f->y, 0, sizeof f->y);
        c.out = th_view2(f->y, D_ROWS, D_OUT, LDY);
        rc = dora->forward(&c.c);
    }
    if (rc)
        fail_msg("dora forward: %s", th_last_error);
    double l = 0.0;
    for (int i = 0; i < D_ROWS; i++)
        for (int j = 0; j < D_OUT; j++)
            l += (double)f->w[i * LDY + j] * f->y[i * LDY + j];
    return l;
}

/* Gradients of dora_loss; in integrate mode dx includes dy_old . W^T, the
 * frozen path's share, as the model would add it. */
static void dora_grads(dfix *f)
{
    memset(f->dA, 0, sizeof f->dA);
    memset(f->dB, 0, sizeof f->dB);
    memset(f->dm, 0, sizeof f->dm);
    memset(f->dx, 0, sizeof f->dx);
    (void)dora_loss(f);
    memcpy(f->dy, f->w, sizeof f->dy);
    th_ctx c;
    th_ctx_copy(&c, &f->t);
    c.out = th_view2(f->y, D_ROWS, D_OUT, LDY);
    c.d_out = th_view2(f->dy, D_ROWS, D_OUT, LDY);
    c.d_in = th_view2(f->dx, D_ROWS, D_IN, LDX);
    int rc = f->integrate ? dora->integrate_backward(&c.c) : dora->backward(&c.c);
    if (rc)
        fail_msg("dora backward: %s", th_last_error);
    if (f->integrate)
        for (int i = 0; i < D_ROWS; i++)
            for (int k = 0; k < D_IN; k++) {
                double acc = 0.0;
                for (int j = 0; j < D_OUT; j++)
                    acc += (double)f->dy[i * LDY + j] * f->W[k * LDW + j];
                f->dx[i * LDX + k] += (float)acc;
            }
}

static int dora_fd(dfix *f)
{
    dora_grads(f);
    int fails = 0;
    fails += gc_check("dora lora_A", f->A, f->dA, D_R * D_IN, dora_loss, f, 1e-2, 2e-3, 1e-4, 0);
    fails += gc_check("dora lora_B", f->B, f->dB, D_OUT * D_R, dora_loss, f, 1e-2, 2e-3, 1e-4, 0);
    fails += gc_check("dora magnitude", f->m, f->dm, D_OUT, dora_loss, f, 1e-2, 2e-3, 1e-4, 0);
    float g[D_ROWS * LDX];
    memcpy(g, f->dx, sizeof g);
    fails += gc_check("dora x", f->x, g, D_ROWS * LDX, dora_loss, f, 1e-2, 2e-3, 1e-4, 0);
    return fails;
}

static void test_dora_setup_identity(void **state)
{
    (void)state;
    dfix *f = dfix_new(0.3, 1, 0);
    assert_int_equal(dora->setup(&f->t.c), 0);
    for (int j = 0; j < D_OUT; j++) {
        double n2 = 0.0;
        for (int k = 0; k < D_IN; k++)
            n2 += (double)f->W[k * LDW + j] * f->W[k * LDW + j];
        assert_true(fabs(f->m[j] - sqrt(n2)) <= 1e-6 * sqrt(n2));
    }
    /* B = 0: y unchanged bit for bit, in eval and with dropout in training */
    memset(f->B, 0, sizeof f->B);
    for (int training = 0; training < 2; training++) {
        f->t.c.training = training;
        f->integrate = 1;
        base_output(f);
        float y0[D_ROWS * LDY];
        memcpy(y0, f->y, sizeof y0);
        (void)dora_loss(f);
        assert_memory_equal(y0, f->y, sizeof y0);
        assert_true(f->flags[0] == (float)training);
        f->integrate = 0;
        (void)dora_loss(f);
        for (int i = 0; i < D_ROWS; i++)
            for (int j = 0; j < D_OUT; j++)
                assert_true(f->y[i * LDY + j] == 0.0f);
    }
    free(f);
}

static void test_dora_reference(void **state)
{
    (void)state;
    dfix *f = dfix_new(0, 0, 0);
    double wp[D_IN * D_OUT];
    reference_weight(f, 2.0, wp);
    f->integrate = 1;
    (void)dora_loss(f);
    float yi[D_ROWS * LDY];
    memcpy(yi, f->y, sizeof yi);
    /* forward()'s h, then the base output x.W + b beside it */
    f->integrate = 0;
    (void)dora_loss(f);
    float h[D_ROWS * LDY];
    memcpy(h, f->y, sizeof h);
    base_output(f);
    double worst = 0.0, worst_h = 0.0, big = 0.0;
    for (int i = 0; i < D_ROWS; i++)
        for (int j = 0; j < D_OUT; j++) {
            double want = f->bias[j];
            for (int k = 0; k < D_IN; k++)
                want += (double)f->x[i * LDX + k] * wp[k * D_OUT + j];
            worst = fmax(worst, fabs(yi[i * LDY + j] - want));
            worst_h = fmax(worst_h, fabs((double)f->y[i * LDY + j] + h[i * LDY + j] - want));
            big = fmax(big, fabs(want));
        }
    assert_true(big > 0.5);
    assert_true(worst <= 1e-5 * big);
    assert_true(worst_h <= 1e-5 * big);

    /* merge: x.(W + delta) + b = y' */
    float delta[D_IN * D_OUT], bd[D_OUT] = { 0 };
    pr_tensor bdt = th_view1(bd, D_OUT);
    th_ctx c;
    th_ctx_copy(&c, &f->t);
    c.in = (pr_tensor){ 0 };
    c.c.rows = c.c.B = c.c.T = 0;
    c.out = th_view2(delta, D_IN, D_OUT, D_OUT);
    c.c.bias_delta = &bdt;
    assert_int_equal(dora->merge(&c.c), 0);
    worst = 0.0;
    for (int k = 0; k < D_IN; k++)
        for (int j = 0; j < D_OUT; j++)
            worst = fmax(worst, fabs((double)f->W[k * LDW + j] + delta[k * D_OUT + j] - wp[k * D_OUT + j]));
    assert_true(worst <= 1e-6);
    for (int j = 0; j < D_OUT; j++)
        assert_true(bd[j] == 0.0f);

    /* errors: no frozen weight, wrong widths */
    th_ctx_copy(&c, &f->t);
    c.c.base_weight = NULL;
    c.out = th_view2(f->y, D_ROWS, D_OUT, LDY);
    th_last_error[0] = 0;
    assert_int_not_equal(dora->integrate_forward(&c.c), 0);
    assert_non_null(strstr(th_last_error, "frozen weight"));
    th_ctx_copy(&c, &f->t);
    c.out = th_view2(f->y, D_ROWS, D_OUT - 1, LDY);
    assert_int_not_equal(dora->integrate_forward(&c.c), 0);
    assert_non_null(strstr(th_last_error, "width"));
    free(f);
}

static void test_dora_callback_gradients(void **state)
{
    (void)state;
    /* exact mode: the parallel form, the integrated form, and both with dropout */
    for (int drop = 0; drop < 2; drop++)
        for (int integ = 0; integ < 2; integ++) {
            dfix *f = dfix_new(drop ? 0.3 : 0.0, drop, 0);
            f->integrate = integ;
            int fails = dora_fd(f);
            printf("dora callbacks: %s, dropout %s: %d failing entries\n",
                   integ ? "integrate" : "forward", drop ? "0.3" : "off", fails);
            assert_true(f->flags[0] == (float)drop);
            assert_int_equal(fails, 0);
            free(f);
        }
    /* detach_norm: the magnitude's and the input's gradients are the exact
     * ones; lora_A's and lora_B's lose the norm's share */
    dfix *e = dfix_new(0, 0, 0), *d = dfix_new(0, 0, 1);
    e->integrate = d->integrate = 1;
    dora_grads(e);
    dora_grads(d);
    assert_memory_equal(e->dm, d->dm, sizeof e->dm);
    assert_memory_equal(e->dx, d->dx, sizeof e->dx);
    assert_memory_equal(e->dy, d->dy, sizeof e->dy);
    double diff = 0.0;
    for (int i = 0; i < D_R * D_IN; i++)
        diff = fmax(diff, fabs((double)e->dA[i] - d->dA[i]));
    assert_true(diff > 1e-3);
    free(e);
    free(d);
}

/* ---- DoRA attached ------------------------------------------------------------- */

static const pr_option_setting dora_site_opts[] = {
    { "r", "4", PR_SITE_Q },
    { "r", "8", PR_SITE_V },
    { "alpha", "16", PR_SITE_V },
};
static const uint32_t DORA_SITES =
    PR_SITE_BIT(PR_SITE_Q) | PR_SITE_BIT(PR_SITE_V) | PR_SITE_BIT(PR_SITE_FFN_UP);

static void test_dora_counts(void **state)
{
    (void)state;
    for (int k = 0; k < 2; k++) {
        const shape *s = &SHAPES[k];
        /* q: r 4; v: r 8; ffn.up: the default r 8, d_in C, d_out F */
        const int64_t want = (int64_t)s->L * ((4 * (s->C + s->C) + s->C) + (8 * (s->C + s->C) + s->C) +
                                              (8 * (s->C + s->F) + s->F));
        run *r = check_counts(s, dora, DORA_SITES, dora_site_opts, 3, want, 0, 3 * s->L);
        /* the default site: qkv, C -> 3C, r 8 */
        pr_model_config cfg;
        shape_config(s, &cfg);
        pr_module_plan plan;
        pr_error err = { 0 };
        pr_module_spec dspec = { .technique = dora, .trainable = 1, .seed = 1 };
        assert_int_equal(pr_module_plan_for(&cfg, &dspec, &plan, &err), PR_OK);
        assert_int_equal(plan.params, (int64_t)s->L * (8 * (s->C + 3 * s->C) + 3 * s->C));
        run_free(r);
    }
}

static void test_dora_identity(void **state)
{
    (void)state;
    for (int k = 0; k < 2; k++) {
        run *r = run_new(&SHAPES[k]);
        float *base = logits_now(r);
        const pr_option_setting o[] = { { "r", "4", PR_SITE_Q }, { "dropout", "0.2", -1 } };
        (void)attach(r, dora, DORA_SITES, o, 2);
        /* the magnitude is the column norms of the site's weight slice */
        for (int l = 0; l < SHAPES[k].L; l++) {
            int din, dout;
            float *w = site_weight_copy(r, PR_SITE_V, l, &din, &dout);
            const pr_tensor_info *m = mtensor(r, "dora", l, "v", "lora_magnitude_vector");
            assert_non_null(m);
            assert_int_equal(m->numel, dout);
            for (int j = 0; j < dout; j++) {
                double n2 = 0.0;
                for (int i = 0; i < din; i++)
                    n2 += (double)w[i * dout + j] * w[i * dout + j];
                assert_true(fabs(m->data[j] - sqrt(n2)) <= 1e-6 * sqrt(n2));
            }
            free(w);
        }
        float *with = logits_now(r);
        assert_memory_equal(with, base, (size_t)MB * MT * MV * sizeof(float));
        pr_model_set_training(r->m, 1);
        float *train = logits_now(r);
        pr_model_detach_modules(r->m);
        float *train_base = logits_now(r);
        assert_memory_equal(train, train_base, (size_t)MB * MT * MV * sizeof(float));
        free(base);
        free(with);
        free(train);
        free(train_base);
        run_free(r);
    }
}

/* Move every DoRA parameter off its initial value: A, B random, the
 * magnitude scaled by 1 +- 0.2. */
static void dora_perturb(run *r, unsigned seed)
{
    assert_true(fill_module(r, "lora_A", seed, 0.2f) > 0);
    assert_true(fill_module(r, "lora_B", seed + 100, 0.2f) > 0);
    for (int i = 0; i < pr_model_n_tensors(r->m); i++) {
        const pr_tensor_info *t = pr_model_tensor(r->m, i);
        size_t ln = strlen(t->name);
        if (t->kind != PR_TENSOR_MODULE || ln < 21 || strcmp(t->name + ln - 21, "lora_magnitude_vector"))
            continue;
        float *noise = malloc((size_t)t->numel * sizeof(float));
        assert_non_null(noise);
        gc_fill(noise, (size_t)t->numel, seed + 200 + (unsigned)i, 0.2f);
        for (int64_t j = 0; j < t->numel; j++)
            t->data[j] *= 1.0f + noise[j];
        free(noise);
    }
}

static void test_dora_model_gradients(void **state)
{
    (void)state;
    run *r = run_new(&SHAPES[0]);
    (void)attach(r, dora, DORA_SITES, dora_site_opts, 3);
    pr_error err = { 0 };
    assert_int_equal(pr_model_set_trainable(r->m, "h.0.ln_1.weight", 1, &err), PR_OK);
    assert_int_equal(pr_model_set_trainable(r->m, "h.1.ln_2.weight", 1, &err), PR_OK);
    dora_perturb(r, 800);
    pr_model_zero_grad(r->m);
    (void)model_loss(r);
    if (pr_model_backward(r->m, &err))
        fail_msg("backward: %s", err.msg);
    int fails = 0, n = 0;
    for (int i = 0; i < pr_model_n_tensors(r->m); i++) {
        const pr_tensor_info *t = pr_model_tensor(r->m, i);
        if (!t->trainable)
            continue;
        assert_non_null(t->grad);
        fails += gc_check(t->name, t->data, t->grad, (size_t)t->numel, model_loss, r, 3e-3, 5e-2,
                          1e-4, 4);
        n++;
    }
    assert_int_equal(n, 3 * 3 * 2 + 2);
    assert_int_equal(fails, 0);
    run_free(r);
}

static void test_dora_merge(void **state)
{
    (void)state;
    for (int k = 0; k < 2; k++) {
        run *r = run_new(&SHAPES[k]);
        pr_module *mod = k ? attach(r, dora, 0, NULL, 0) : attach(r, dora, DORA_SITES, dora_site_opts, 3);
        dora_perturb(r, 900);
        check_merge_cycle(r, mod);
        run_free(r);
    }
}

/* ---- the conformance checker ------------------------------------------------------ */

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
    run_checker(DORA_SO);
    run_checker(LORA_SO);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_lora_descriptor),
        cmocka_unit_test(test_lora_per_site_counts),
        cmocka_unit_test(test_lora_identity),
        cmocka_unit_test(test_lora_scales_merge),
        cmocka_unit_test(test_lora_gradients),
        cmocka_unit_test(test_lora_dropout),
        cmocka_unit_test(test_dora_descriptor),
        cmocka_unit_test(test_dora_setup_identity),
        cmocka_unit_test(test_dora_reference),
        cmocka_unit_test(test_dora_callback_gradients),
        cmocka_unit_test(test_dora_counts),
        cmocka_unit_test(test_dora_identity),
        cmocka_unit_test(test_dora_model_gradients),
        cmocka_unit_test(test_dora_merge),
        cmocka_unit_test(test_checker),
    };
    return cmocka_run_group_tests(tests, setup_plugins, teardown_plugins);
}
