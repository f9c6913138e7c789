/* Tests of the Compacter pack (plugins/compacter.c: compacter and
 * compacter_pp) and of the tiny-attention adapter
 * (plugins/tiny_attention.c), loaded as shared objects with dlopen.
 *
 *  - descriptors: identity, typology, sites, options, parameter
 *    declarations, only the entry symbol exported, pr_technique_validate;
 *  - the callbacks driven directly through the host's services table:
 *    Compacter's forward against W = sum_i A_i (x) s_i t_i built from the
 *    definition element by element, tiny attention's forward against a
 *    causal attention computed in double, and its causality (changing a
 *    later position changes no earlier one);
 *  - trainable-parameter counts from pr_module_plan_for and from attaching
 *    against the formulas computed here, on two model shapes, with
 *    default and explicit options; the shared phm_rule is one tensor;
 *  - identity at initialisation: logits with the module equal the base
 *    model's (up_W_right = 0, o_weight = 0);
 *  - finite-difference checks through the whole model's loss of every
 *    module tensor (all 64 entries of the shared phm_rule, whose gradient
 *    gathers every insertion's) and of the upstream LayerNorm gains, which
 *    are right only when the module's input gradient is;
 *  - the model stays causal with tiny attention attached;
 *  - setup() rejects d or m not divisible by n with a clear message;
 *  - both shared objects pass the conformance checker (core/plugins/check.h).
 *
 * Finite differences as test_lora.c and test_module.c: eps 3e-3 on the
 * mean cross-entropy recomputed in double from the logits; an entry passes
 * when |fd - g| <= 1e-4 + 5e-2 * max(|g|, |fd|). */
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
#include "host.h"

#define COMPACTER_SO TEST_BUILDDIR "/plugins/.libs/compacter.so"
#define TINY_SO TEST_BUILDDIR "/plugins/.libs/tiny_attention.so"

#define FD_EPS 3e-3
#define FD_RTOL 5e-2
#define FD_ATOL 1e-4
#define FD_PROBES 6

static void *so_compacter, *so_tiny;
static const pr_technique *compacter, *compacter_pp, *tiny;

static int setup_plugins(void **state)
{
    (void)state;
    const pr_plugin *pc = th_plugin_open(COMPACTER_SO, &so_compacter);
    const pr_plugin *pt = th_plugin_open(TINY_SO, &so_tiny);
    if (!pc || pc->n_techniques != 2 || !pt || pt->n_techniques != 1)
        return -1;
    compacter = pc->techniques[0];
    compacter_pp = pc->techniques[1];
    tiny = pt->techniques[0];
    return 0;
}

static int teardown_plugins(void **state)
{
    (void)state;
    if (so_compacter)
        dlclose(so_compacter);
    if (so_tiny)
        dlclose(so_tiny);
    return 0;
}

static int param_index(const pr_technique *t, const char *name)
{
    for (uint32_t i = 0; i < t->n_params; i++)
        if (strcmp(t->params[i].name, name) == 0)
            return (int)i;
    return -1;
}

/* ---- descriptors --------------------------------------------------------- */

static void test_descriptors(void **state)
{
    (void)state;
    pr_error err = { 0 };
    const pr_technique *all[] = { compacter, compacter_pp, tiny };
    for (int i = 0; i < 3; i++) {
        int rc = pr_technique_validate(all[i], &err);
        if (rc)
            fail_msg("%s: %s", all[i]->name, err.msg);
        assert_int_equal(all[i]->abi_major, PR_ABI_MAJOR);
        assert_non_null(all[i]->param_formula);
        assert_non_null(all[i]->forward);
        assert_non_null(all[i]->backward);
        assert_null(all[i]->merge);
    }
    assert_string_equal(compacter->name, "compacter");
    assert_string_equal(compacter_pp->name, "compacter_pp");
    assert_string_equal(tiny->name, "tiny_attention");
    assert_non_null(strstr(compacter->citation, "2106.04647"));
    assert_non_null(strstr(tiny->citation, "2211.01979"));

    for (int i = 0; i < 2; i++) {
        const pr_technique *t = i ? compacter_pp : compacter;
        assert_int_equal(t->intra, PR_INTRA_FACTORISED);
        assert_int_equal(t->inter, PR_INTER_FIXED);
        assert_int_equal(t->adaptation, PR_ADAPT_ADDITION);
        assert_int_equal(t->sharing, PR_SHARE_ACROSS_LAYERS);
        assert_int_equal(t->input, PR_INPUT_HIDDEN);
        assert_int_equal(t->insertion, PR_INSERT_SEQUENTIAL);
        assert_int_equal(t->insertions, PR_INSERTIONS_PER_SITE_LAYER);
        assert_int_equal(t->integration, PR_INTEGRATE_DIRECT_ADD);
        /* defaults from the paper */
        assert_true(t->options[th_option_index(t, "n")].def == 4);
        assert_true(t->options[th_option_index(t, "reduction_factor")].def == 32);
        assert_true(t->options[th_option_index(t, "rank")].def == 1);
        assert_true(t->options[th_option_index(t, "m")].def == 0);
        int r = param_index(t, "phm_rule");
        assert_true(r >= 0);
        assert_int_equal(t->params[r].scope, PR_SCOPE_GLOBAL);
        assert_string_equal(t->params[r].shape, "n, n, n");
        int ut = param_index(t, "up_W_right");
        assert_true(ut >= 0);
        assert_int_equal(t->params[ut].init, PR_INIT_ZEROS);
        assert_int_equal(t->n_params, 7);
        assert_non_null(t->setup);
    }
    uint32_t both = PR_SITE_BIT(PR_SITE_ATTN_OUT) | PR_SITE_BIT(PR_SITE_FFN_OUT);
    assert_int_equal(compacter->default_sites, both);
    assert_int_equal(compacter->workspace, PR_WS_ATTENTION | PR_WS_FFN);
    assert_int_equal(compacter_pp->default_sites, PR_SITE_BIT(PR_SITE_FFN_OUT));
    assert_int_equal(compacter_pp->sites, PR_SITE_BIT(PR_SITE_FFN_OUT));
    assert_int_equal(compacter_pp->workspace, PR_WS_FFN);

    assert_int_equal(tiny->intra, PR_INTRA_ATTENTION);
    assert_int_equal(tiny->inter, PR_INTER_FIXED);
    assert_int_equal(tiny->adaptation, PR_ADAPT_ADDITION);
    assert_int_equal(tiny->sharing, PR_SHARE_NONE);
    assert_int_equal(tiny->insertion, PR_INSERT_PARALLEL);
    assert_int_equal(tiny->integration, PR_INTEGRATE_SCALED_ADD);
    assert_int_equal(tiny->default_sites, PR_SITE_BIT(PR_SITE_ATTN_OUT));
    assert_string_equal(tiny->scale_expr, "scale");
    assert_true(tiny->options[th_option_index(tiny, "heads")].def == 1);
    assert_true(tiny->options[th_option_index(tiny, "head_dim")].def == 1);
    assert_true(tiny->options[th_option_index(tiny, "scale")].def == 1);
    assert_int_equal(tiny->n_params, 7);
    assert_int_equal(tiny->params[param_index(tiny, "o_weight")].init, PR_INIT_ZEROS);
    assert_int_equal(param_index(tiny, "k_bias"), -1);
    /* the probabilities are saved per sequence and head */
    int found = 0;
    for (uint32_t i = 0; i < tiny->n_saved; i++)
        found |= strcmp(tiny->saved[i].shape, "B, heads, T, T") == 0;
    assert_true(found);

    /* -fvisibility=hidden: only the entry is exported */
    assert_null(dlsym(so_compacter, "compacter_forward"));
    assert_null(dlsym(so_compacter, "kron_build"));
    assert_null(dlsym(so_tiny, "ta_forward"));
}

/* ---- callbacks driven directly ------------------------------------------- */

static pr_tensor tview(float *data, int ndim, int64_t d0, int64_t d1, int64_t d2, int64_t d3)
{
    const int64_t d[4] = { d0, d1, d2, d3 };
    return th_view(data, ndim, d);
}

static double gelu_ref(double x)
{
    return 0.5 * x * (1.0 + tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)));
}

/* Compacter with n = 2, d = 6, m = 4, rank 2 on 5 rows whose input has a
 * row stride of 9: forward equals the definition computed in double. */
enum { CN = 2, CD = 6, CM = 4, CR = 2, CROWS = 5, CLD = 9 };

static void test_compacter_forward_reference(void **state)
{
    (void)state;
    const int a = CD / CN, b = CM / CN;
    float A[CN * CN * CN], ds[CN * (CD / CN) * CR], dt[CN * CR * (CM / CN)], db[CM];
    float us[CN * (CM / CN) * CR], ut[CN * CR * (CD / CN)], ub[CD];
    float y[CROWS * CLD], h[CROWS * CD], z[CROWS * CM], act[CROWS * CM];
    float wd[CD * CM], wu[CM * CD], g[CD * CM], bi[2 * (CD / CN) * (CM / CN)], da[CROWS * CM],
        dz[CROWS * CM];
    gc_fill(A, sizeof A / sizeof *A, 1, 0.8f);
    gc_fill(ds, sizeof ds / sizeof *ds, 2, 0.8f);
    gc_fill(dt, sizeof dt / sizeof *dt, 3, 0.8f);
    gc_fill(db, CM, 4, 0.3f);
    gc_fill(us, sizeof us / sizeof *us, 5, 0.8f);
    gc_fill(ut, sizeof ut / sizeof *ut, 6, 0.8f);
    gc_fill(ub, CD, 7, 0.3f);
    gc_fill(y, sizeof y / sizeof *y, 8, 1.0f);

    pr_option_value opts[5] = { { .num = CN }, { .num = 32 }, { .num = CM }, { .num = CR }, { .num = 1e-4 } };
    th_ctx t;
    th_ctx_init(&t);
    const pr_tensor params[7] = {
        tview(A, 3, CN, CN, CN, 0),     tview(ds, 3, CN, a, CR, 0), tview(dt, 3, CN, CR, b, 0),
        tview(db, 1, CM, 0, 0, 0),      tview(us, 3, CN, b, CR, 0), tview(ut, 3, CN, CR, a, 0),
        tview(ub, 1, CD, 0, 0, 0),
    };
    const pr_tensor saved[2] = { tview(z, 2, CROWS, CM, 0, 0), tview(act, 2, CROWS, CM, 0, 0) };
    const pr_tensor scratch[6] = { tview(wd, 2, CD, CM, 0, 0), tview(wu, 2, CM, CD, 0, 0),
                                   tview(g, 2, CD, CM, 0, 0),  tview(bi, 2, 2, a * b, 0, 0),
                                   tview(da, 2, CROWS, CM, 0, 0), tview(dz, 2, CROWS, CM, 0, 0) };
    memcpy(t.params, params, sizeof params);
    memcpy(t.saved, saved, sizeof saved);
    memcpy(t.scratch, scratch, sizeof scratch);
    pr_dims dims = { .struct_size = sizeof(pr_dims), .d_model = CD, .n_heads = 1, .n_kv_heads = 1,
                     .d_head = CD, .d_ff = 4 * CD, .n_layers = 1, .vocab = 8, .d_in = CD, .d_out = CD };
    pr_ctx *c = &t.c;
    c->host = host_services();
    c->technique = compacter;
    c->dims = &dims;
    c->site = PR_SITE_FFN_OUT;
    c->B = 1;
    c->T = CROWS;
    c->rows = CROWS;
    c->options = opts;
    c->n_options = 5;
    c->n_params = 7;
    c->n_saved = 2;
    c->n_scratch = 6;
    t.in = tview(y, 2, CROWS, CD, 0, 0);
    t.in.stride[0] = CLD;
    t.out = tview(h, 2, CROWS, CD, 0, 0);
    assert_int_equal(compacter->setup(c), 0);
    assert_int_equal(compacter->forward(c), 0);

    /* W[p*a + u, q*b + v] = sum_i A_i[p, q] (s_i t_i)[u, v] */
    double Wd[CD][CM], Wu[CM][CD];
    for (int p = 0; p < CN; p++)
        for (int q = 0; q < CN; q++) {
            for (int u = 0; u < a; u++)
                for (int v = 0; v < b; v++) {
                    double w = 0;
                    for (int i = 0; i < CN; i++) {
                        double bv = 0;
                        for (int k = 0; k < CR; k++)
                            bv += (double)ds[(i * a + u) * CR + k] * dt[(i * CR + k) * b + v];
                        w += (double)A[(i * CN + p) * CN + q] * bv;
                    }
                    Wd[p * a + u][q * b + v] = w;
                }
            for (int u = 0; u < b; u++)
                for (int v = 0; v < a; v++) {
                    double w = 0;
                    for (int i = 0; i < CN; i++) {
                        double bv = 0;
                        for (int k = 0; k < CR; k++)
                            bv += (double)us[(i * b + u) * CR + k] * ut[(i * CR + k) * a + v];
                        w += (double)A[(i * CN + p) * CN + q] * bv;
                    }
                    Wu[p * b + u][q * a + v] = w;
                }
        }
    double worst = 0, norm = 0;
    for (int r = 0; r < CROWS; r++) {
        double ar[CM];
        for (int j = 0; j < CM; j++) {
            double zz = db[j];
            for (int k = 0; k < CD; k++)
                zz += (double)y[r * CLD + k] * Wd[k][j];
            ar[j] = gelu_ref(zz);
        }
        for (int j = 0; j < CD; j++) {
            double hh = ub[j];
            for (int k = 0; k < CM; k++)
                hh += ar[k] * Wu[k][j];
            worst = fmax(worst, fabs(hh - h[r * CD + j]));
            norm = fmax(norm, fabs(hh));
        }
    }
    printf("compacter forward: max |h - reference| = %.3e (max |h| %.3e)\n", worst, norm);
    assert_true(norm > 0.1);
    assert_true(worst <= 1e-5 * norm);

    /* d not divisible by n: the factor shapes cannot be right */
    opts[0].num = 4;
    host_call hc;
    host_call_begin(&hc);
    t.params[0] = tview(A, 3, 4, 4, 4, 0);
    int rc = compacter->setup(c);
    host_call_end(&hc);
    assert_int_not_equal(rc, 0);
    assert_non_null(strstr(hc.msg, "divisible"));
}

/* Tiny attention, B = 2 sequences of T = 4, d = 5, H = 2 heads of dh = 3,
 * against causal attention in double; then causality. */
enum { TB_ = 2, TT_ = 4, TD = 5, TH = 2, TDH = 3, THD = TH * TDH, TROWS = TB_ * TT_ };

typedef struct ta_fix {
    float qw[THD * TD], qb[THD], kw[THD * TD], vw[THD * TD], vb[THD], ow[TD * THD], ob[TD];
    float x[TROWS * TD], h[TROWS * TD], qkv[TROWS * 3 * THD], P[TB_ * TH * TT_ * TT_], u[TROWS * THD];
    float du[TROWS * THD], dqkv[TROWS * 3 * THD], dp[TT_];
    pr_option_value opts[3];
    pr_dims dims;
    th_ctx t; /* the context and its tensors (harness.h) */
} ta_fix;

static void ta_fix_init(ta_fix *f)
{
    memset(f, 0, sizeof *f);
    float *w[] = { f->qw, f->qb, f->kw, f->vw, f->vb, f->ow, f->ob };
    const int64_t n[] = { THD * TD, THD, THD * TD, THD * TD, THD, TD * THD, TD };
    for (int i = 0; i < 7; i++)
        gc_fill(w[i], (size_t)n[i], 20u + (unsigned)i, 0.7f);
    gc_fill(f->x, TROWS * TD, 30, 1.0f);
    f->opts[0].num = TH;
    f->opts[1].num = TDH;
    f->opts[2].num = 1;
    f->t.params[0] = tview(f->qw, 2, THD, TD, 0, 0);
    f->t.params[1] = tview(f->qb, 1, THD, 0, 0, 0);
    f->t.params[2] = tview(f->kw, 2, THD, TD, 0, 0);
    f->t.params[3] = tview(f->vw, 2, THD, TD, 0, 0);
    f->t.params[4] = tview(f->vb, 1, THD, 0, 0, 0);
    f->t.params[5] = tview(f->ow, 2, TD, THD, 0, 0);
    f->t.params[6] = tview(f->ob, 1, TD, 0, 0, 0);
    f->t.saved[0] = tview(f->qkv, 2, TROWS, 3 * THD, 0, 0);
    f->t.saved[1] = tview(f->P, 4, TB_, TH, TT_, TT_);
    f->t.saved[2] = tview(f->u, 2, TROWS, THD, 0, 0);
    f->t.scratch[0] = tview(f->du, 2, TROWS, THD, 0, 0);
    f->t.scratch[1] = tview(f->dqkv, 2, TROWS, 3 * THD, 0, 0);
    f->t.scratch[2] = tview(f->dp, 1, TT_, 0, 0, 0);
    f->dims = (pr_dims){ .struct_size = sizeof(pr_dims), .d_model = TD, .n_heads = 1, .n_kv_heads = 1,
                         .d_head = TD, .d_ff = 4 * TD, .n_layers = 1, .vocab = 8, .d_in = TD, .d_out = TD };
    pr_ctx *c = &f->t.c;
    c->host = host_services();
    c->technique = tiny;
    c->dims = &f->dims;
    c->site = PR_SITE_ATTN_OUT;
    c->B = TB_;
    c->T = TT_;
    c->rows = TROWS;
    c->options = f->opts;
    c->n_options = 3;
    c->n_params = 7;
    c->n_saved = 3;
    c->n_scratch = 3;
    f->t.in = tview(f->x, 2, TROWS, TD, 0, 0);
    f->t.out = tview(f->h, 2, TROWS, TD, 0, 0);
    th_ctx_bind(&f->t);
}

static void test_tiny_forward_reference(void **state)
{
    (void)state;
    ta_fix *f = malloc(sizeof *f);
    assert_non_null(f);
    ta_fix_init(f);
    assert_int_equal(tiny->forward(&f->t.c), 0);

    double worst = 0, norm = 0;
    for (int b = 0; b < TB_; b++) {
        double q[TT_][THD], k[TT_][THD], v[TT_][THD];
        for (int t = 0; t < TT_; t++)
            for (int j = 0; j < THD; j++) {
                const float *xr = f->x + (b * TT_ + t) * TD;
                double aq = f->qb[j], ak = 0, av = f->vb[j];
                for (int i = 0; i < TD; i++) {
                    aq += (double)xr[i] * f->qw[j * TD + i];
                    ak += (double)xr[i] * f->kw[j * TD + i];
                    av += (double)xr[i] * f->vw[j * TD + i];
                }
                q[t][j] = aq;
                k[t][j] = ak;
                v[t][j] = av;
            }
        for (int t = 0; t < TT_; t++) {
            double u[THD] = { 0 };
            for (int hh = 0; hh < TH; hh++) {
                double s[TT_], mx = -INFINITY, sum = 0;
                for (int j = 0; j <= t; j++) {
                    s[j] = 0;
                    for (int e = 0; e < TDH; e++)
                        s[j] += q[t][hh * TDH + e] * k[j][hh * TDH + e];
                    s[j] /= sqrt((double)TDH);
                    mx = fmax(mx, s[j]);
                }
                for (int j = 0; j <= t; j++)
                    sum += (s[j] = exp(s[j] - mx));
                for (int j = 0; j <= t; j++)
                    for (int e = 0; e < TDH; e++)
                        u[hh * TDH + e] += s[j] / sum * v[j][hh * TDH + e];
            }
            for (int o = 0; o < TD; o++) {
                double hv = f->ob[o];
                for (int j = 0; j < THD; j++)
                    hv += u[j] * f->ow[o * THD + j];
                worst = fmax(worst, fabs(hv - f->h[(b * TT_ + t) * TD + o]));
                norm = fmax(norm, fabs(hv));
            }
        }
    }
    printf("tiny attention forward: max |h - reference| = %.3e (max |h| %.3e)\n", worst, norm);
    assert_true(norm > 0.1);
    assert_true(worst <= 1e-5 * norm);
    /* probabilities above the diagonal are zero, rows sum to one */
    for (int r = 0; r < TB_ * TH * TT_; r++) {
        int t = r % TT_;
        double s = 0;
        for (int j = 0; j < TT_; j++) {
            if (j > t)
                assert_true(f->P[r * TT_ + j] == 0.0f);
            s += f->P[r * TT_ + j];
        }
        assert_true(fabs(s - 1.0) < 1e-6);
    }

    /* causality: a change at position 2 of sequence 0 leaves positions 0
     * and 1 of that sequence and all of sequence 1 bit-identical */
    float h0[TROWS * TD];
    memcpy(h0, f->h, sizeof h0);
    for (int i = 0; i < TD; i++)
        f->x[2 * TD + i] += 0.5f;
    assert_int_equal(tiny->forward(&f->t.c), 0);
    assert_memory_equal(h0, f->h, 2 * TD * sizeof(float));
    assert_memory_equal(h0 + TT_ * TD, f->h + TT_ * TD, TT_ * TD * sizeof(float));
    assert_memory_not_equal(h0 + 2 * TD, f->h + 2 * TD, TD * sizeof(float));

    /* rows must be B x T */
    host_call hc;
    host_call_begin(&hc);
    f->t.c.rows = TROWS - 1;
    int rc = tiny->forward(&f->t.c);
    host_call_end(&hc);
    assert_int_not_equal(rc, 0);
    assert_non_null(strstr(hc.msg, "B x T"));
    free(f);
}

/* ---- the model ------------------------------------------------------------- */

enum { MB = 2, MT = 6 };

/* shape A: L=2, C=32, H=4, F=128; shape B: L=3, C=48, H=6, F=96 (no GQA) */
static pr_model_config shape(int which)
{
    const th_shape a = { .L = 2, .C = 32, .H = 4, .Hkv = 4, .hd = 8, .F = 128, .V = 64, .max_seq = 16 };
    const th_shape b = { .L = 3, .C = 48, .H = 6, .Hkv = 6, .hd = 8, .F = 96, .V = 64, .max_seq = 16 };
    return th_config(which ? &b : &a, 7);
}

typedef struct fixture {
    pr_model *m;
    pr_module *mod;
    int tokens[MB * MT], targets[MB * MT];
} fixture;

static double model_loss(void *arg)
{
    fixture *f = arg;
    return th_forward_ce(f->m, f->tokens, f->targets, MB, MT);
}

static fixture *fixture_new(int which)
{
    fixture *f = calloc(1, sizeof *f);
    assert_non_null(f);
    pr_model_config c = shape(which);
    pr_error err = { 0 };
    if (pr_model_create(&c, &f->m, &err) || pr_model_reserve(f->m, MB, MT, &err))
        fail_msg("model: %s", err.msg);
    for (int i = 0; i < MB * MT; i++) {
        f->tokens[i] = (i * 17 + 5) % 64;
        f->targets[i] = (i * 29 + 3) % 64;
    }
    return f;
}

static int attach(fixture *f, const pr_technique *t, const pr_option_setting *opts, int n_opts,
                  pr_error *err)
{
    pr_module_spec spec = { .technique = t, .options = opts, .n_options = n_opts, .trainable = 1,
                            .seed = 11 };
    return pr_module_attach(f->m, &spec, &f->mod, err);
}

static void fixture_free(fixture *f)
{
    pr_model_detach_modules(f->m);
    pr_model_free(f->m);
    free(f);
}

/* ---- counts -------------------------------------------------------------- */

/* Compacter's trainable parameters, computed from the paper's definition:
 * n^3 for the one shared A, per insertion 2*rank*(d + m) (s and t of the
 * down and up projections) plus the biases m + d. */
static int64_t compacter_count(int L, int sites, int d, int n, int rf, int m, int rank)
{
    if (m == 0) {
        m = d / rf / n * n;
        if (m < n)
            m = n;
    }
    int64_t per = 2LL * rank * (d + m) + m + d;
    return (int64_t)n * n * n + (int64_t)L * sites * per;
}

/* tiny attention: 4*d*H*dh weights, 2*H*dh + d biases (q, v, o), per layer */
static int64_t tiny_count(int L, int d, int H, int dh)
{
    return (int64_t)L * (4LL * d * H * dh + 2LL * H * dh + d);
}

static void expect_count(int which, const pr_technique *t, const pr_option_setting *opts, int n_opts,
                         int64_t want, int insertions)
{
    pr_model_config c = shape(which);
    pr_module_spec spec = { .technique = t, .options = opts, .n_options = n_opts, .trainable = 1,
                            .seed = 3 };
    pr_module_plan plan;
    pr_error err = { 0 };
    if (pr_module_plan_for(&c, &spec, &plan, &err))
        fail_msg("plan %s: %s", t->name, err.msg);
    printf("%-14s shape %c: %lld trainable parameters (formula %lld), %d insertions\n", t->name,
           which ? 'B' : 'A', (long long)plan.trainable, (long long)want, plan.insertions);
    assert_int_equal(plan.trainable, want);
    assert_int_equal(plan.params, want);
    assert_int_equal(plan.insertions, insertions);
    fixture *f = fixture_new(which);
    if (attach(f, t, opts, n_opts, &err))
        fail_msg("attach %s: %s", t->name, err.msg);
    assert_int_equal(pr_module_param_count(f->mod), want);
    assert_int_equal(pr_module_trainable_count(f->mod), want);
    assert_int_equal(pr_module_insertions(f->mod), insertions);
    /* the table's module tensors add up to the same number */
    int64_t sum = 0;
    for (int i = 0; i < pr_model_n_tensors(f->m); i++) {
        const pr_tensor_info *ti = pr_model_tensor(f->m, i);
        if (ti->kind == PR_TENSOR_MODULE)
            sum += ti->numel;
    }
    assert_int_equal(sum, want);
    fixture_free(f);
}

static void test_counts(void **state)
{
    (void)state;
    for (int which = 0; which < 2; which++) {
        const int L = which ? 3 : 2, d = which ? 48 : 32;
        /* defaults: n 4, reduction factor 32 (m = max(4, ...) = 4 here), rank 1 */
        expect_count(which, compacter, NULL, 0, compacter_count(L, 2, d, 4, 32, 0, 1), 2 * L);
        expect_count(which, compacter_pp, NULL, 0, compacter_count(L, 1, d, 4, 32, 0, 1), L);
        expect_count(which, tiny, NULL, 0, tiny_count(L, d, 1, 1), L);
    }
    /* explicit options */
    const pr_option_setting c_a[] = { { "m", "8", -1 }, { "rank", "2", -1 } };
    expect_count(0, compacter, c_a, 2, compacter_count(2, 2, 32, 4, 32, 8, 2), 4);
    const pr_option_setting c_b[] = { { "reduction_factor", "4", -1 }, { "n", "2", -1 } };
    expect_count(1, compacter, c_b, 2, compacter_count(3, 2, 48, 2, 4, 0, 1), 6);
    expect_count(1, compacter_pp, c_b, 2, compacter_count(3, 1, 48, 2, 4, 0, 1), 3);
    const pr_option_setting t_a[] = { { "heads", "2", -1 }, { "head_dim", "3", -1 } };
    expect_count(0, tiny, t_a, 2, tiny_count(2, 32, 2, 3), 2);
    expect_count(1, tiny, t_a, 2, tiny_count(3, 48, 2, 3), 3);
    /* GPT-2 small with the paper's defaults: m = 24, 12 layers */
    assert_int_equal(compacter_count(12, 2, 768, 4, 32, 0, 1), 64 + 24 * (2 * (768 + 24) + 24 + 768));

    /* one shared phm_rule, n^3 entries, in the table once */
    fixture *f = fixture_new(0);
    pr_error err = { 0 };
    if (attach(f, compacter, NULL, 0, &err))
        fail_msg("attach: %s", err.msg);
    const pr_tensor_info *rule = pr_model_find_tensor(f->m, "compacter/phm_rule");
    assert_non_null(rule);
    assert_int_equal(rule->numel, 64);
    int rules = 0;
    for (int i = 0; i < pr_model_n_tensors(f->m); i++)
        rules += strstr(pr_model_tensor(f->m, i)->name, "phm_rule") != NULL;
    assert_int_equal(rules, 1);
    assert_non_null(pr_model_find_tensor(f->m, "compacter/h.1.ffn_out.up_W_right"));
    fixture_free(f);
}

/* ---- identity at initialisation -------------------------------------------- */

static void identity_case(const pr_technique *t)
{
    fixture *f = fixture_new(0);
    const size_t n = (size_t)MB * MT * 64;
    (void)model_loss(f);
    float *base = malloc(n * sizeof(float));
    assert_non_null(base);
    memcpy(base, pr_model_logits(f->m), n * sizeof(float));
    pr_error err = { 0 };
    if (attach(f, t, NULL, 0, &err))
        fail_msg("attach %s: %s", t->name, err.msg);
    (void)model_loss(f);
    const float *with = pr_model_logits(f->m);
    double worst = 0;
    for (size_t i = 0; i < n; i++)
        worst = fmax(worst, fabs((double)with[i] - base[i]));
    printf("%s at init: max |logits - base logits| = %.3e\n", t->name, worst);
    assert_true(worst <= 1e-6);
    free(base);
    fixture_free(f);
}

static void test_identity_at_init(void **state)
{
    (void)state;
    identity_case(compacter);
    identity_case(compacter_pp);
    identity_case(tiny);
}

/* ---- gradients through the model -------------------------------------------- */

static void grad_case(const pr_technique *t, const pr_option_setting *opts, int n_opts, int expect_tensors)
{
    fixture *f = fixture_new(0);
    pr_error err = { 0 };
    if (attach(f, t, opts, n_opts, &err))
        fail_msg("attach %s: %s", t->name, err.msg);
    const char *gains[] = { "h.0.ln_1.weight", "h.0.ln_2.weight", "h.1.ln_1.weight" };
    for (int i = 0; i < 3; i++)
        assert_int_equal(pr_model_set_trainable(f->m, gains[i], 1, &err), PR_OK);
    char prefix[64];
    snprintf(prefix, sizeof prefix, "%s/", pr_module_name(f->mod));
    size_t lp = strlen(prefix);
    /* move every module tensor off its init (zeros would hide gradients) */
    for (int i = 0; i < pr_model_n_tensors(f->m); i++) {
        const pr_tensor_info *ti = pr_model_tensor(f->m, i);
        if (strncmp(ti->name, prefix, lp) == 0)
            gc_fill(ti->data, (size_t)ti->numel, 100u + (unsigned)i,
                    strstr(ti->name, "phm_rule") ? 0.6f : 0.4f);
    }
    pr_model_zero_grad(f->m);
    (void)model_loss(f);
    if (pr_model_backward(f->m, &err))
        fail_msg("backward: %s", err.msg);

    int fails = 0, checked = 0;
    for (int i = 0; i < pr_model_n_tensors(f->m); i++) {
        const pr_tensor_info *ti = pr_model_tensor(f->m, i);
        int mine = strncmp(ti->name, prefix, lp) == 0;
        int gain = 0;
        for (int k = 0; k < 3; k++)
            gain |= strcmp(ti->name, gains[k]) == 0;
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
        /* the shared A: every entry (each gathers all insertions' terms) */
        size_t probes = strstr(ti->name, "phm_rule") ? 0 : FD_PROBES;
        fails += gc_check(ti->name, ti->data, g, (size_t)ti->numel, model_loss, f, FD_EPS, FD_RTOL, FD_ATOL,
                          probes);
        free(g);
        checked += mine;
    }
    assert_int_equal(checked, expect_tensors);
    assert_int_equal(fails, 0);
    fixture_free(f);
}

static void test_gradients_compacter(void **state)
{
    (void)state;
    const pr_option_setting o[] = { { "m", "8", -1 }, { "rank", "2", -1 } };
    /* phm_rule + 6 tensors x 2 sites x 2 layers */
    grad_case(compacter, o, 2, 1 + 6 * 4);
}

static void test_gradients_compacter_pp(void **state)
{
    (void)state;
    grad_case(compacter_pp, NULL, 0, 1 + 6 * 2);
}

static void test_gradients_tiny(void **state)
{
    (void)state;
    const pr_option_setting o[] = { { "heads", "2", -1 }, { "head_dim", "2", -1 }, { "scale", "1.5", -1 } };
    grad_case(tiny, o, 3, 7 * 2);
    /* the paper's default: one head of dimension 1 */
    grad_case(tiny, NULL, 0, 7 * 2);
}

/* ---- causality through the model ---------------------------------------------- */

static void test_tiny_causal_in_model(void **state)
{
    (void)state;
    fixture *f = fixture_new(1);
    pr_error err = { 0 };
    const pr_option_setting o[] = { { "heads", "3", -1 }, { "head_dim", "2", -1 } };
    if (attach(f, tiny, o, 2, &err))
        fail_msg("attach: %s", err.msg);
    for (int i = 0; i < pr_model_n_tensors(f->m); i++) {
        const pr_tensor_info *ti = pr_model_tensor(f->m, i);
        if (strncmp(ti->name, "tiny_attention/", 15) == 0)
            gc_fill(ti->data, (size_t)ti->numel, 300u + (unsigned)i, 0.5f);
    }
    const size_t n = (size_t)MB * MT * 64;
    (void)model_loss(f);
    float *before = malloc(n * sizeof(float));
    assert_non_null(before);
    memcpy(before, pr_model_logits(f->m), n * sizeof(float));
    f->tokens[MT - 1] = (f->tokens[MT - 1] + 7) % 64; /* the last token of sequence 0 */
    (void)model_loss(f);
    const float *after = pr_model_logits(f->m);
    double earlier = 0, last = 0, other = 0;
    for (size_t i = 0; i < n; i++) {
        size_t row = i / 64;
        double dd = fabs((double)after[i] - before[i]);
        if (row < MT - 1)
            earlier = fmax(earlier, dd);
        else if (row == MT - 1)
            last = fmax(last, dd);
        else
            other = fmax(other, dd);
    }
    printf("causality: earlier positions moved %.3e, the changed one %.3e, the other sequence %.3e\n",
           earlier, last, other);
    assert_true(earlier <= 1e-6);
    assert_true(other <= 1e-6);
    assert_true(last > 1e-3);
    free(before);
    fixture_free(f);
}

/* ---- errors -------------------------------------------------------------------- */

static void test_divisibility_errors(void **state)
{
    (void)state;
    fixture *f = fixture_new(0);
    pr_error err = { 0 };
    const pr_option_setting n3[] = { { "n", "3", -1 }, { "m", "6", -1 } };
    assert_int_not_equal(attach(f, compacter, n3, 2, &err), PR_OK);
    printf("n = 3 on d = 32: %s\n", err.msg);
    assert_non_null(strstr(err.msg, "d = 32 is not divisible by n = 3"));
    memset(&err, 0, sizeof err);
    const pr_option_setting m6[] = { { "m", "6", -1 } };
    assert_int_not_equal(attach(f, compacter_pp, m6, 1, &err), PR_OK);
    printf("m = 6 with n = 4: %s\n", err.msg);
    assert_non_null(strstr(err.msg, "m = 6 is not divisible by n = 4"));
    assert_int_equal(pr_model_n_modules(f->m), 0);
    /* compacter_pp cannot be placed after attention */
    memset(&err, 0, sizeof err);
    pr_module_spec spec = { .technique = compacter_pp, .sites = PR_SITE_BIT(PR_SITE_ATTN_OUT),
                            .trainable = 1 };
    assert_int_not_equal(pr_module_attach(f->m, &spec, &f->mod, &err), PR_OK);
    fixture_free(f);
}

/* ---- the conformance checker ----------------------------------------------------- */

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
    /* load; compacter: gradient at attn_out and ffn_out, params,
     * determinism, accumulation, save-load, options; compacter_pp: the
     * same with ffn_out only */
    conformance_case(COMPACTER_SO, 1 + 7 + 6);
    /* load; gradient at attn_out and ffn_out and the five others */
    conformance_case(TINY_SO, 1 + 7);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_descriptors),
        cmocka_unit_test(test_compacter_forward_reference),
        cmocka_unit_test(test_tiny_forward_reference),
        cmocka_unit_test(test_counts),
        cmocka_unit_test(test_identity_at_init),
        cmocka_unit_test(test_gradients_compacter),
        cmocka_unit_test(test_gradients_compacter_pp),
        cmocka_unit_test(test_gradients_tiny),
        cmocka_unit_test(test_tiny_causal_in_model),
        cmocka_unit_test(test_divisibility_errors),
        cmocka_unit_test(test_conformance),
    };
    return cmocka_run_group_tests(tests, setup_plugins, teardown_plugins);
}
