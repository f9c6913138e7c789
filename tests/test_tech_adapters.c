/* Tests of the bottleneck-adapter technique pack (plugins/adapters/):
 * adapter_houlsby (Houlsby et al. 2019), adapter_pfeiffer (Pfeiffer et al.
 * 2021) and adapter_parallel (He et al. 2022), found as a pack by the
 * registry in the build tree (plugins/.libs/adapters/ with its manifest)
 * and attached to tiny GPT-2 models.
 *
 *  - the pack: the registry finds the three techniques in the pack
 *    directory and refuses nothing of it; only the entry is exported;
 *  - descriptors: typology, sites, option defaults, parameter inits;
 *  - sub-layer sites: at attn_out / ffn_out a hook sees as x the
 *    normalised sub-layer input (rows of mean 0 and variance 1 with unit
 *    gains), unchanged when the sub-layer's weights change;
 *  - the module's function: the change a module makes at its site is
 *    f(y) (sequential) or s*f(x) (parallel), recomputed here in double
 *    from its parameters and the site tensors a probe hook recorded
 *    (|diff| <= 1e-5 + 1e-4 |ref|);
 *  - parameter counts: plan and attach equal 2*m*d + m + d per insertion
 *    times the insertions, on two model shapes (exact);
 *  - identity at step 0: logits bit-identical to the bare model's at the
 *    default init; the paper's init (init: normal) moves them a little;
 *  - gradients: central differences of the mean cross-entropy against the
 *    analytic gradient of every module tensor, and of the layer norm gains
 *    upstream of the modules, which are right only when the module's input
 *    gradient is (tolerances of test_module.c: eps 3e-3, pass when
 *    |fd - g| <= 1e-4 + 5e-2 max(|fd|, |g|));
 *  - the conformance checker (core/plugins/check.h) on the built .so.
 * None of the three is mergeable (the nonlinearity keeps the module out of
 * the frozen weights), so there is no merge test. */
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
#include "rng.h"
#include "gradcheck.h"
#include "harness.h"

#define LIBS_DIR TEST_BUILDDIR "/plugins/.libs"
#define PACK_SO TEST_BUILDDIR "/plugins/.libs/adapters/adapters.so"

#define FD_EPS 3e-3
#define FD_RTOL 5e-2
#define FD_ATOL 1e-4
#define FD_PROBES 6

/* a checked gradient must not vanish everywhere */
static const th_fd FD_CHECK = { FD_EPS, FD_RTOL, FD_ATOL, FD_PROBES, 1e-6 };

enum { TB = 2, TT = 5 };

static pr_registry *reg;
static const pr_technique *houlsby, *pfeiffer, *parallel;

static int setup_registry(void **state)
{
    (void)state;
    static const char *const need[] = { "adapter_houlsby", "adapter_pfeiffer", "adapter_parallel" };
    if (th_registry_open(LIBS_DIR, need, 3, &reg))
        return -1;
    houlsby = pr_registry_find(reg, need[0]);
    pfeiffer = pr_registry_find(reg, need[1]);
    parallel = pr_registry_find(reg, need[2]);
    return 0;
}

static int teardown_registry(void **state)
{
    (void)state;
    pr_registry_free(reg);
    return 0;
}

/* ---- the pack ---------------------------------------------------------------- */

static void test_pack_found_in_build_tree(void **state)
{
    (void)state;
    const char *names[] = { "adapter_houlsby", "adapter_pfeiffer", "adapter_parallel" };
    int found = 0;
    for (int i = 0; i < pr_registry_count(reg); i++) {
        const pr_technique *t = pr_registry_technique(reg, i);
        for (int k = 0; k < 3; k++)
            if (strcmp(t->name, names[k]) == 0) {
                /* loaded through the pack directory, not as a loose .so */
                const char *origin = pr_registry_origin(reg, i);
                assert_non_null(strstr(origin, "/adapters/adapters.so"));
                found++;
            }
    }
    assert_int_equal(found, 3);
    for (int i = 0; i < pr_registry_refused_count(reg); i++) {
        const char *p, *why;
        pr_registry_refused(reg, i, &p, &why);
        if (strstr(p, "adapters")) {
            fprintf(stderr, "refused %s: %s\n", p, why);
            fail();
        }
    }
    /* -fvisibility=hidden: only the entry is exported */
    void *h = dlopen(PACK_SO, RTLD_NOW | RTLD_LOCAL);
    assert_non_null(h);
    assert_non_null(dlsym(h, PR_PLUGIN_ENTRY_NAME));
    assert_null(dlsym(h, "bn_forward"));
    assert_null(dlsym(h, "houlsby_technique"));
    dlclose(h);
}

/* ---- descriptors ------------------------------------------------------------- */

static void check_params(const pr_technique *t, int down_init)
{
    assert_int_equal(t->n_params, 4);
    const char *names[] = { "down_weight", "down_bias", "up_weight", "up_bias" };
    for (int i = 0; i < 4; i++) {
        assert_string_equal(t->params[i].name, names[i]);
        assert_int_equal(t->params[i].scope, PR_SCOPE_INSERTION);
    }
    assert_int_equal(t->params[0].init, down_init);
    assert_int_equal(t->params[1].init, PR_INIT_ZEROS);
    assert_int_equal(t->params[2].init, PR_INIT_ZEROS);
    assert_int_equal(t->params[3].init, PR_INIT_ZEROS);
    assert_true(t->params[1].flags & PR_PARAM_NO_DECAY);
    assert_true(t->params[3].flags & PR_PARAM_NO_DECAY);
    assert_non_null(t->forward);
    assert_non_null(t->backward);
    assert_null(t->merge);
    assert_non_null(t->param_formula);
    assert_non_null(strstr(t->param_formula, "2*m*d + m + d"));
}

static void check_enum_default(const pr_option_decl *o, const char *choice)
{
    assert_non_null(o);
    assert_int_equal(o->type, PR_OPT_ENUM);
    assert_string_equal(o->choices[(int)o->def], choice);
}

static void test_descriptors(void **state)
{
    (void)state;
    const uint32_t sub = PR_SITE_BIT(PR_SITE_ATTN_OUT) | PR_SITE_BIT(PR_SITE_FFN_OUT);
    const pr_technique *all[] = { houlsby, pfeiffer, parallel };
    for (int i = 0; i < 3; i++) {
        const pr_technique *t = all[i];
        assert_int_equal(t->intra, PR_INTRA_DENSE);
        assert_int_equal(t->inter, PR_INTER_FIXED);
        assert_int_equal(t->adaptation, PR_ADAPT_ADDITION);
        assert_int_equal(t->sharing, PR_SHARE_NONE);
        assert_int_equal(t->input, PR_INPUT_HIDDEN);
        /* the activation enum lists the pr_activation names in order */
        const pr_option_decl *a = th_option(t, "activation");
        assert_non_null(a);
        assert_string_equal(a->choices[PR_ACT_IDENTITY], "identity");
        assert_string_equal(a->choices[PR_ACT_GELU], "gelu");
        assert_string_equal(a->choices[PR_ACT_SIGMOID], "sigmoid");
        assert_null(a->choices[PR_ACT_SIGMOID + 1]);
    }

    assert_non_null(strstr(houlsby->citation, "1902.00751"));
    assert_int_equal(houlsby->insertion, PR_INSERT_SEQUENTIAL);
    assert_int_equal(houlsby->insertions, PR_INSERTIONS_PER_SITE_LAYER);
    assert_int_equal(houlsby->integration, PR_INTEGRATE_DIRECT_ADD);
    assert_int_equal(houlsby->workspace, PR_WS_ATTENTION | PR_WS_FFN);
    assert_int_equal(houlsby->sites, sub);
    assert_int_equal(houlsby->default_sites, sub);
    assert_true(th_option(houlsby, "m")->def == 64);
    check_enum_default(th_option(houlsby, "activation"), "gelu");
    check_enum_default(th_option(houlsby, "init"), "zeros");
    assert_true(th_option(houlsby, "init_std")->def == 1e-2);
    check_params(houlsby, PR_INIT_NORMAL);
    assert_string_equal(houlsby->params[2].init_option, "init");

    assert_non_null(strstr(pfeiffer->citation, "2005.00247"));
    assert_int_equal(pfeiffer->insertion, PR_INSERT_SEQUENTIAL);
    assert_int_equal(pfeiffer->insertions, PR_INSERTIONS_PER_LAYER);
    assert_int_equal(pfeiffer->integration, PR_INTEGRATE_DIRECT_ADD);
    assert_int_equal(pfeiffer->workspace, PR_WS_FFN);
    assert_int_equal(pfeiffer->sites, PR_SITE_BIT(PR_SITE_FFN_OUT));
    assert_int_equal(pfeiffer->default_sites, PR_SITE_BIT(PR_SITE_FFN_OUT));
    assert_true(th_option(pfeiffer, "reduction_factor")->def == 16);
    assert_null(th_option(pfeiffer, "m"));
    check_enum_default(th_option(pfeiffer, "activation"), "relu");
    check_params(pfeiffer, PR_INIT_NORMAL);
    assert_string_equal(pfeiffer->params[0].shape, "d_model, max(1, d_model / reduction_factor)");

    assert_non_null(strstr(parallel->citation, "2110.04366"));
    assert_int_equal(parallel->insertion, PR_INSERT_PARALLEL);
    assert_int_equal(parallel->insertions, PR_INSERTIONS_PER_SITE_LAYER);
    assert_int_equal(parallel->integration, PR_INTEGRATE_SCALED_ADD);
    assert_int_equal(parallel->workspace, PR_WS_ATTENTION | PR_WS_FFN);
    assert_int_equal(parallel->sites, sub);
    assert_int_equal(parallel->default_sites, PR_SITE_BIT(PR_SITE_FFN_OUT));
    assert_true(th_option(parallel, "scaling")->def == 4);
    assert_string_equal(parallel->scale_expr, "scaling");
    check_enum_default(th_option(parallel, "activation"), "relu");
    check_params(parallel, PR_INIT_UNIFORM);
}

/* ---- models, loss ---------------------------------------------------------- */

/* L=2, C=32, H=4, F=128 */
static pr_model_config config_a(void)
{
    return th_config(&(th_shape){ .L = 2, .C = 32, .H = 4, .Hkv = 4, .hd = 8, .F = 128, .V = 64, .max_seq = 16 }, 21);
}

/* L=3, C=48, H=6, F=96, no grouped-query attention */
static pr_model_config config_b(void)
{
    return th_config(&(th_shape){ .L = 3, .C = 48, .H = 6, .Hkv = 6, .hd = 8, .F = 96, .V = 64, .max_seq = 16 }, 21);
}

static pr_model *make_model(const pr_model_config *c)
{
    return th_model_new(c, TB, TT);
}

static void loss_ctx_init(th_loss_ctx *lc, pr_model *m, unsigned seed)
{
    th_loss_init_rng(lc, m, TB, TT, seed);
}

static pr_module *attach(pr_model *m, const pr_technique *t, const pr_option_setting *opts, int n_opts,
                         uint32_t sites)
{
    pr_module_spec s = { 0 };
    s.technique = t;
    s.sites = sites;
    s.options = opts;
    s.n_options = n_opts;
    s.trainable = 1;
    s.seed = 9;
    return th_attach(m, &s);
}

static const pr_tensor_info *tensor(const pr_model *m, const char *name)
{
    const pr_tensor_info *t = pr_model_find_tensor(m, name);
    if (!t)
        fprintf(stderr, "no tensor '%s'\n", name);
    assert_non_null(t);
    return t;
}

/* ---- parameter counts ------------------------------------------------------------ */

static int64_t per_insertion(int64_t m, int64_t d)
{
    return 2 * m * d + m + d;
}

static void expect_count(const pr_model_config *c, const pr_technique *t, const pr_option_setting *o, int n,
                         uint32_t sites, int insertions, int64_t expect)
{
    pr_module_spec s = { 0 };
    s.technique = t;
    s.sites = sites;
    s.options = o;
    s.n_options = n;
    s.trainable = 1;
    pr_module_plan plan;
    pr_error err = { 0 };
    int rc = pr_module_plan_for(c, &s, &plan, &err);
    if (rc)
        fprintf(stderr, "plan %s: %s\n", t->name, err.msg);
    assert_int_equal(rc, PR_OK);
    assert_int_equal(plan.insertions, insertions);
    assert_int_equal(plan.params, expect);
    assert_int_equal(plan.trainable, expect);

    pr_model *m = make_model(c);
    int64_t base = pr_model_param_count(m);
    pr_module *mod = attach(m, t, o, n, sites);
    assert_int_equal(pr_module_insertions(mod), insertions);
    assert_int_equal(pr_module_param_count(mod), expect);
    assert_int_equal(pr_module_trainable_count(mod), expect);
    assert_int_equal(pr_model_param_count(m) - base, expect);
    pr_model_free(m);
}

static void test_param_counts(void **state)
{
    (void)state;
    const uint32_t attn = PR_SITE_BIT(PR_SITE_ATTN_OUT), ffn = PR_SITE_BIT(PR_SITE_FFN_OUT);
    const pr_option_setting m8[] = { { "m", "8", -1 } };
    const pr_option_setting rf8[] = { { "reduction_factor", "8", -1 } };
    pr_model_config cs[2] = { config_a(), config_b() };
    for (int k = 0; k < 2; k++) {
        const pr_model_config *c = &cs[k];
        int64_t L = c->n_layers, d = c->d_model;
        /* Houlsby: 2L insertions, default m = 64 and m = 8 */
        expect_count(c, houlsby, NULL, 0, 0, (int)(2 * L), 2 * L * per_insertion(64, d));
        expect_count(c, houlsby, m8, 1, 0, (int)(2 * L), 2 * L * per_insertion(8, d));
        expect_count(c, houlsby, m8, 1, ffn, (int)L, L * per_insertion(8, d));
        /* Pfeiffer: L insertions, m = d / 16 (2 and 3), and d / 8 */
        expect_count(c, pfeiffer, NULL, 0, 0, (int)L, L * per_insertion(d / 16, d));
        expect_count(c, pfeiffer, rf8, 1, 0, (int)L, L * per_insertion(d / 8, d));
        /* parallel: beside the FFN by default, or both sub-layers */
        expect_count(c, parallel, NULL, 0, 0, (int)L, L * per_insertion(64, d));
        expect_count(c, parallel, m8, 1, attn | ffn, (int)(2 * L), 2 * L * per_insertion(8, d));
    }
    /* d_model below the reduction factor still gets one bottleneck unit */
    pr_model_config tiny = config_a();
    tiny.d_model = 12;
    tiny.n_heads = 3;
    tiny.n_kv_heads = 3;
    tiny.d_head = 4;
    expect_count(&tiny, pfeiffer, NULL, 0, 0, 2, 2 * per_insertion(1, 12));
}

/* ---- sub-layer sites: what x and y are ---------------------------------------- */

/* A hook that records the x and y it sees (and changes nothing). */
typedef struct probe {
    float *x, *y;
    size_t cap;
    int rows, xd, yd, calls;
} probe;

static int probe_forward(void *self, const pr_site_io *io, pr_error *err)
{
    (void)err;
    probe *p = self;
    if ((size_t)io->rows * (size_t)io->x_dim > p->cap || (size_t)io->rows * (size_t)io->y_dim > p->cap)
        return PR_ERR_INVALID;
    p->rows = io->rows;
    p->xd = io->x_dim;
    p->yd = io->y_dim;
    for (int r = 0; r < io->rows; r++) {
        memcpy(p->x + (size_t)r * io->x_dim, io->x + (size_t)r * io->x_ld, (size_t)io->x_dim * sizeof(float));
        memcpy(p->y + (size_t)r * io->y_dim, io->y + (size_t)r * io->y_ld, (size_t)io->y_dim * sizeof(float));
    }
    p->calls++;
    return PR_OK;
}

static int probe_backward(void *self, const pr_site_io *io, pr_error *err)
{
    (void)self;
    (void)io;
    (void)err;
    return PR_OK;
}

static void probe_attach(pr_model *m, int site, int layer, probe *p)
{
    memset(p, 0, sizeof *p);
    p->cap = (size_t)TB * TT * 256;
    p->x = calloc(p->cap, sizeof(float));
    p->y = calloc(p->cap, sizeof(float));
    assert_true(p->x && p->y);
    pr_site_hook h = { .forward = probe_forward, .backward = probe_backward, .self = p };
    pr_error err = { 0 };
    assert_int_equal(pr_model_attach_hook(m, site, layer, &h, &err), PR_OK);
}

static void probe_free(probe *p)
{
    free(p->x);
    free(p->y);
}

static void test_sublayer_site_input(void **state)
{
    (void)state;
    pr_model_config c = config_a();
    pr_model *m = make_model(&c);
    probe pa, pf;
    probe_attach(m, PR_SITE_ATTN_OUT, 1, &pa);
    probe_attach(m, PR_SITE_FFN_OUT, 1, &pf);
    th_loss_ctx lc;
    loss_ctx_init(&lc, m, 4);
    assert_false(isnan(th_loss(&lc)));
    assert_int_equal(pa.calls, 1);
    assert_int_equal(pf.calls, 1);
    assert_int_equal(pa.rows, TB * TT);
    assert_int_equal(pa.xd, c.d_model);
    assert_int_equal(pf.xd, c.d_model);
    /* with unit gains and zero biases, x is a layer norm's output: every
     * row has mean 0 and variance 1 (up to the norm's eps) */
    const probe *ps[] = { &pa, &pf };
    for (int k = 0; k < 2; k++)
        for (int r = 0; r < ps[k]->rows; r++) {
            const float *x = ps[k]->x + (size_t)r * ps[k]->xd;
            double mean = 0, var = 0;
            for (int j = 0; j < ps[k]->xd; j++)
                mean += x[j];
            mean /= ps[k]->xd;
            for (int j = 0; j < ps[k]->xd; j++)
                var += (x[j] - mean) * (x[j] - mean);
            var /= ps[k]->xd;
            assert_true(fabs(mean) < 1e-5);
            assert_true(fabs(var - 1.0) < 1e-3);
        }
    /* x is the sub-layer's input: scaling the sub-layer's output
     * projection changes its y and leaves its x alone */
    size_t n = (size_t)TB * TT * c.d_model;
    float *x0 = malloc(n * sizeof *x0), *y0 = malloc(n * sizeof *y0);
    assert_true(x0 && y0);
    const char *proj[] = { "h.1.attn.c_proj.weight", "h.1.mlp.c_proj.weight" };
    for (int k = 0; k < 2; k++) {
        memcpy(x0, ps[k]->x, n * sizeof *x0);
        memcpy(y0, ps[k]->y, n * sizeof *y0);
        const pr_tensor_info *w = tensor(m, proj[k]);
        for (int64_t i = 0; i < w->numel; i++)
            w->data[i] *= 1.5f;
        assert_false(isnan(th_loss(&lc)));
        assert_memory_equal(x0, ps[k]->x, n * sizeof *x0);
        assert_true(memcmp(y0, ps[k]->y, n * sizeof *y0) != 0);
    }
    free(x0);
    free(y0);
    probe_free(&pa);
    probe_free(&pf);
    pr_model_free(m);
}

/* ---- the module's function ------------------------------------------------------ */

/* act in double, pr_activation */
static double act_ref(int act, double z)
{
    switch (act) {
    case PR_ACT_RELU: return z > 0 ? z : 0;
    case PR_ACT_GELU: return 0.5 * z * (1 + tanh(sqrt(2 / M_PI) * (z + 0.044715 * z * z * z)));
    case PR_ACT_SILU: return z / (1 + exp(-z));
    case PR_ACT_TANH: return tanh(z);
    case PR_ACT_SIGMOID: return 1 / (1 + exp(-z));
    default: return z;
    }
}

/* Give every tensor of the module (name prefix "name/") values in
 * [-scale, scale], away from its init. */
static void randomise_module(pr_model *m, const char *prefix, float scale)
{
    size_t len = strlen(prefix);
    for (int i = 0; i < pr_model_n_tensors(m); i++) {
        const pr_tensor_info *t = pr_model_tensor(m, i);
        if (strncmp(t->name, prefix, len) == 0)
            gc_fill(t->data, (size_t)t->numel, 300u + (unsigned)i, scale);
    }
}

/* At (site, layer 1), with probes before and after the module: the module
 * changed y by s * f(u), u = y before it (sequential) or x (parallel). */
static void check_function(const pr_technique *t, const pr_option_setting *o, int n, int site, int seq, double s,
                           int act)
{
    pr_model_config c = config_a();
    pr_model *m = make_model(&c);
    probe before, after;
    probe_attach(m, site, 1, &before);
    attach(m, t, o, n, PR_SITE_BIT(site));
    probe_attach(m, site, 1, &after);
    char prefix[64];
    snprintf(prefix, sizeof prefix, "%s/", t->name);
    randomise_module(m, prefix, 0.3f);
    th_loss_ctx lc;
    loss_ctx_init(&lc, m, 6);
    assert_false(isnan(th_loss(&lc)));
    assert_int_equal(before.calls, 1);
    assert_int_equal(after.calls, 1);

    char name[128];
    const char *sn = pr_site_name(site);
    snprintf(name, sizeof name, "%sh.1.%s.down_weight", prefix, sn);
    const float *wd = tensor(m, name)->data;
    int mm = (int)tensor(m, name)->shape[1];
    snprintf(name, sizeof name, "%sh.1.%s.down_bias", prefix, sn);
    const float *bd = tensor(m, name)->data;
    snprintf(name, sizeof name, "%sh.1.%s.up_weight", prefix, sn);
    const float *wu = tensor(m, name)->data;
    snprintf(name, sizeof name, "%sh.1.%s.up_bias", prefix, sn);
    const float *bu = tensor(m, name)->data;
    int d = c.d_model, bad = 0;
    double *a = malloc((size_t)mm * sizeof *a);
    assert_non_null(a);
    for (int r = 0; r < before.rows; r++) {
        const float *u = (seq ? before.y : before.x) + (size_t)r * d;
        for (int k = 0; k < mm; k++) {
            double z = bd[k];
            for (int i = 0; i < d; i++)
                z += (double)u[i] * wd[(size_t)i * mm + k];
            a[k] = act_ref(act, z);
        }
        for (int j = 0; j < d; j++) {
            double h = bu[j];
            for (int k = 0; k < mm; k++)
                h += a[k] * wu[(size_t)k * d + j];
            double ref = s * h, got = (double)after.y[(size_t)r * d + j] - before.y[(size_t)r * d + j];
            if (fabs(got - ref) > 1e-5 + 1e-4 * fabs(ref))
                bad++;
        }
    }
    free(a);
    assert_int_equal(bad, 0);
    probe_free(&before);
    probe_free(&after);
    pr_model_free(m);
}

static void test_module_function(void **state)
{
    (void)state;
    const pr_option_setting m4[] = { { "m", "4", -1 } };
    const pr_option_setting m4_tanh[] = { { "m", "4", -1 }, { "activation", "tanh", -1 } };
    const pr_option_setting rf8[] = { { "reduction_factor", "8", -1 } };
    const pr_option_setting par[] = { { "m", "4", -1 }, { "scaling", "2.5", -1 } };
    check_function(houlsby, m4, 1, PR_SITE_ATTN_OUT, 1, 1.0, PR_ACT_GELU);
    check_function(houlsby, m4_tanh, 2, PR_SITE_FFN_OUT, 1, 1.0, PR_ACT_TANH);
    check_function(pfeiffer, rf8, 1, PR_SITE_FFN_OUT, 1, 1.0, PR_ACT_RELU);
    check_function(parallel, m4, 1, PR_SITE_FFN_OUT, 0, 4.0, PR_ACT_RELU);
    check_function(parallel, par, 2, PR_SITE_ATTN_OUT, 0, 2.5, PR_ACT_RELU);
}

/* ---- identity at step 0 and the init options ----------------------------------- */

static void identity_case(const pr_technique *t, const pr_option_setting *o, int n, int expect_identity)
{
    pr_model_config c = config_a();
    pr_model *m = make_model(&c);
    th_loss_ctx lc;
    loss_ctx_init(&lc, m, 8);
    float *base = th_logits_copy(&lc);
    attach(m, t, o, n, 0);
    float *with = th_logits_copy(&lc);
    size_t nl = (size_t)TB * TT * c.vocab_size;
    double diff = th_max_abs_diff(with, base, nl);
    if (expect_identity) {
        assert_memory_equal(base, with, nl * sizeof *base);
    } else {
        /* near-identity: moved, but little */
        assert_true(diff > 0);
        assert_true(diff < 1e-2);
    }
    free(base);
    free(with);
    pr_model_free(m);
}

static void test_identity_at_init(void **state)
{
    (void)state;
    const pr_option_setting normal[] = { { "init", "normal", -1 } };
    identity_case(houlsby, NULL, 0, 1);
    identity_case(pfeiffer, NULL, 0, 1);
    identity_case(parallel, NULL, 0, 1);
    identity_case(houlsby, normal, 1, 0);
    identity_case(pfeiffer, normal, 1, 0);
}

/* mean and standard deviation of n floats, and the largest |value| */
static void stats(const float *x, int64_t n, double *mean, double *sd, double *amax)
{
    double s = 0, s2 = 0, mx = 0;
    for (int64_t i = 0; i < n; i++) {
        s += x[i];
        s2 += (double)x[i] * x[i];
        mx = fmax(mx, fabs(x[i]));
    }
    *mean = s / n;
    *sd = sqrt(fmax(s2 / n - *mean * *mean, 0));
    *amax = mx;
}

static void test_init(void **state)
{
    (void)state;
    pr_model_config c = config_a();
    pr_model *m = make_model(&c);
    const pr_option_setting normal[] = { { "init", "normal", -1 } };
    pr_module_spec s = { 0 };
    s.technique = houlsby;
    s.name = "hn";
    s.options = normal;
    s.n_options = 1;
    s.trainable = 1;
    s.seed = 3;
    pr_module *mod = NULL;
    pr_error err = { 0 };
    assert_int_equal(pr_module_attach(m, &s, &mod, &err), PR_OK);
    attach(m, houlsby, NULL, 0, 0);
    attach(m, pfeiffer, NULL, 0, 0);
    attach(m, parallel, NULL, 0, 0);
    double mean, sd, amax;
    /* Houlsby: down N(0, 1e-2) (d*m = 32*64 = 2048 draws: sd within 10%) */
    const pr_tensor_info *t = tensor(m, "adapter_houlsby/h.0.attn_out.down_weight");
    stats(t->data, t->numel, &mean, &sd, &amax);
    assert_true(fabs(sd - 1e-2) < 1e-3 && fabs(mean) < 1e-3);
    /* default up projection: zeros; with init: normal, N(0, 1e-2) */
    t = tensor(m, "adapter_houlsby/h.1.ffn_out.up_weight");
    stats(t->data, t->numel, &mean, &sd, &amax);
    assert_true(amax == 0);
    t = tensor(m, "hn/h.1.ffn_out.up_weight");
    stats(t->data, t->numel, &mean, &sd, &amax);
    assert_true(fabs(sd - 1e-2) < 1e-3 && fabs(mean) < 1e-3);
    t = tensor(m, "hn/h.1.ffn_out.up_bias");
    stats(t->data, t->numel, &mean, &sd, &amax);
    assert_true(amax == 0);
    /* Pfeiffer: down N(0, 0.02), m = 32 / 16 = 2 */
    t = tensor(m, "adapter_pfeiffer/h.0.ffn_out.down_weight");
    assert_int_equal(t->shape[0], 32);
    assert_int_equal(t->shape[1], 2);
    stats(t->data, t->numel, &mean, &sd, &amax);
    assert_true(sd > 0.012 && sd < 0.028);
    /* parallel: down uniform(+-1/sqrt(d)), so sd = 1/sqrt(3d) */
    t = tensor(m, "adapter_parallel/h.0.ffn_out.down_weight");
    stats(t->data, t->numel, &mean, &sd, &amax);
    double b = 1 / sqrt(32.0);
    assert_true(amax <= b && amax > 0.95 * b);
    assert_true(fabs(sd - b / sqrt(3.0)) < 0.1 * b / sqrt(3.0));
    t = tensor(m, "adapter_parallel/h.1.ffn_out.up_weight");
    stats(t->data, t->numel, &mean, &sd, &amax);
    assert_true(amax == 0);
    /* an init that is not a choice is refused */
    const pr_option_setting bad[] = { { "init", "ones", -1 } };
    s.name = "hbad";
    s.options = bad;
    assert_int_not_equal(pr_module_attach(m, &s, &mod, &err), PR_OK);
    assert_non_null(strstr(err.msg, "init"));
    pr_model_free(m);
}

/* ---- gradients --------------------------------------------------------------- */

/* Central differences for every tensor whose name starts with one of the
 * prefixes; returns the number checked. */
static int check_grads(th_loss_ctx *lc, const char *const *prefixes, int n_prefixes)
{
    return th_check_grads(lc, prefixes, n_prefixes, 0, &FD_CHECK);
}

static void grad_case(const pr_technique *t, const pr_option_setting *o, int n, uint32_t sites, int expect_tensors)
{
    pr_model_config c = config_a();
    pr_model *m = make_model(&c);
    attach(m, t, o, n, sites);
    char prefix[64];
    snprintf(prefix, sizeof prefix, "%s/", t->name);
    randomise_module(m, prefix, 0.3f);
    /* the norm gains upstream of every insertion: their gradients pass
     * through the module's input gradient */
    pr_error err = { 0 };
    const char *gains[] = { "h.0.ln_1.weight", "h.0.ln_2.weight", "h.1.ln_1.weight", "h.1.ln_2.weight" };
    for (int i = 0; i < 4; i++)
        assert_int_equal(pr_model_set_trainable(m, gains[i], 1, &err), PR_OK);
    th_loss_ctx lc;
    loss_ctx_init(&lc, m, 10);
    const char *prefixes[] = { prefix, "h.0.ln_", "h.1.ln_" };
    assert_int_equal(check_grads(&lc, prefixes, 3), expect_tensors + 4);
    pr_model_free(m);
}

static void test_grad_houlsby(void **state)
{
    (void)state;
    const pr_option_setting o[] = { { "m", "4", -1 } };
    grad_case(houlsby, o, 1, 0, 4 * 2 * 2); /* 4 tensors x 2 sites x 2 layers */
    const pr_option_setting silu[] = { { "m", "3", -1 }, { "activation", "silu", -1 } };
    grad_case(houlsby, silu, 2, 0, 16);
}

static void test_grad_pfeiffer(void **state)
{
    (void)state;
    const pr_option_setting o[] = { { "reduction_factor", "8", -1 } };
    grad_case(pfeiffer, o, 1, 0, 4 * 2);
}

static void test_grad_parallel(void **state)
{
    (void)state;
    const pr_option_setting o[] = { { "m", "4", -1 } };
    grad_case(parallel, o, 1, 0, 4 * 2);
    const pr_option_setting both[] = { { "m", "4", -1 }, { "activation", "gelu", -1 }, { "scaling", "1.5", -1 } };
    grad_case(parallel, both, 3, PR_SITE_BIT(PR_SITE_ATTN_OUT) | PR_SITE_BIT(PR_SITE_FFN_OUT), 16);
}

/* Two modules at one site: pipeline order, each its own gradient. */
static void test_grad_stacked(void **state)
{
    (void)state;
    pr_model_config c = config_a();
    pr_model *m = make_model(&c);
    /* smooth activations: a ReLU kink inside +-eps would fail a probe */
    const pr_option_setting o[] = { { "m", "3", -1 }, { "activation", "tanh", -1 } };
    attach(m, houlsby, o, 2, PR_SITE_BIT(PR_SITE_FFN_OUT));
    attach(m, parallel, o, 2, 0);
    randomise_module(m, "adapter_houlsby/", 0.3f);
    randomise_module(m, "adapter_parallel/", 0.3f);
    th_loss_ctx lc;
    loss_ctx_init(&lc, m, 12);
    const char *prefixes[] = { "adapter_houlsby/", "adapter_parallel/" };
    assert_int_equal(check_grads(&lc, prefixes, 2), 16);
    pr_model_free(m);
}

/* ---- the conformance checker ---------------------------------------------------- */

static void test_conformance(void **state)
{
    (void)state;
    check_options co = { 0 };
    FILE *out = tmpfile();
    assert_non_null(out);
    int n_checks = 0, n_failed = 0;
    pr_error err = { 0 };
    int rc = check_plugin_file(PACK_SO, &co, out, &n_checks, &n_failed, &err);
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
    assert_true(n_checks >= 3 * 5);
    assert_int_equal(n_failed, 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_pack_found_in_build_tree),
        cmocka_unit_test(test_descriptors),
        cmocka_unit_test(test_param_counts),
        cmocka_unit_test(test_sublayer_site_input),
        cmocka_unit_test(test_module_function),
        cmocka_unit_test(test_identity_at_init),
        cmocka_unit_test(test_init),
        cmocka_unit_test(test_grad_houlsby),
        cmocka_unit_test(test_grad_pfeiffer),
        cmocka_unit_test(test_grad_parallel),
        cmocka_unit_test(test_grad_stacked),
        cmocka_unit_test(test_conformance),
    };
    return cmocka_run_group_tests(tests, setup_registry, teardown_registry);
}
