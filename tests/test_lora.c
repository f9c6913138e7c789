/* Tests of the LoRA plugin (plugins/lora.c) as the host sees it: a shared
 * object loaded with dlopen.
 *
 *  - the descriptor: identity, typology, options with their defaults,
 *    sites, parameter declarations, and that only the entry is exported;
 *  - the callbacks driven directly through the tests' host table
 *    (harness.h, a reference GEMM in double): forward equals x.A^T.B^T, backward
 *    matches central differences of L = sum(w * h) for lora_A, lora_B and
 *    x, with and without dropout, merge's delta reproduces s*h, and the
 *    scale is alpha/r or alpha/sqrt(r);
 *  - the module attached to a tiny GPT-2 with pr_module_attach at q, v
 *    (column slices of the fused qkv) and ffn.down: its parameter count,
 *    lora_A / lora_B and an upstream LayerNorm gain against central
 *    differences of the model's loss, and merged == unmerged logits.
 *
 * L is linear in each of A, B, x separately, so central differences are
 * exact up to float rounding: with values O(1), eps = 1e-2 and sums of a
 * few dozen terms the rounding is ~1e-5, so a probe passes when
 * |fd - g| <= 1e-4 + 1e-3 * max(|g|, |fd|). */
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
#include "gradcheck.h"
#include "harness.h"

#define LORA_SO TEST_BUILDDIR "/plugins/.libs/lora.so"

static void *so_handle;
static const pr_technique *lora;

static int setup_plugin(void **state)
{
    (void)state;
    lora = th_plugin_technique(LORA_SO, &so_handle);
    return lora ? 0 : -1;
}

static int teardown_plugin(void **state)
{
    (void)state;
    if (so_handle)
        dlclose(so_handle);
    return 0;
}

/* ---- the descriptor ---------------------------------------------------- */

static const pr_option_decl *find_option(const char *name, int *index)
{
    for (uint32_t i = 0; i < lora->n_options; i++)
        if (strcmp(lora->options[i].name, name) == 0) {
            if (index)
                *index = (int)i;
            return &lora->options[i];
        }
    return NULL;
}

static void test_descriptor(void **state)
{
    (void)state;
    const pr_technique *t = lora;
    assert_true(t->struct_size >= sizeof(pr_technique));
    assert_int_equal(t->abi_major, PR_ABI_MAJOR);
    assert_string_equal(t->name, "lora");
    assert_string_equal(t->version, "1.0.0");
    assert_non_null(strstr(t->citation, "2106.09685"));
    assert_non_null(t->license);

    assert_int_equal(t->intra, PR_INTRA_FACTORISED);
    assert_int_equal(t->inter, PR_INTER_FIXED);
    assert_int_equal(t->adaptation, PR_ADAPT_REPARAMETERISATION);
    assert_int_equal(t->sharing, PR_SHARE_NONE);
    assert_int_equal(t->input, PR_INPUT_HIDDEN);
    assert_int_equal(t->insertion, PR_INSERT_PARALLEL);
    assert_int_equal(t->insertions, PR_INSERTIONS_PER_SITE_LAYER);
    assert_int_equal(t->integration, PR_INTEGRATE_SCALED_ADD);
    assert_int_equal(t->workspace, PR_WS_ATTENTION | PR_WS_FFN);

    const int sites[] = { PR_SITE_QKV, PR_SITE_Q, PR_SITE_K, PR_SITE_V, PR_SITE_O,
                          PR_SITE_FFN_UP, PR_SITE_FFN_DOWN };
    for (size_t i = 0; i < sizeof sites / sizeof sites[0]; i++)
        assert_true(t->sites & PR_SITE_BIT(sites[i]));
    assert_false(t->sites & PR_SITE_BIT(PR_SITE_EMBED));
    assert_int_equal(t->default_sites, PR_SITE_BIT(PR_SITE_QKV));
    assert_int_equal(t->default_sites & ~t->sites, 0);

    const pr_option_decl *o;
    assert_non_null(o = find_option("r", NULL));
    assert_int_equal(o->type, PR_OPT_INT);
    assert_true(o->def == 8 && o->min == 1 && o->max == 4096 && o->per_site);
    assert_non_null(o = find_option("alpha", NULL));
    assert_int_equal(o->type, PR_OPT_FLOAT);
    assert_true(o->def == 8 && o->per_site);
    assert_non_null(o = find_option("dropout", NULL));
    assert_int_equal(o->type, PR_OPT_FLOAT);
    assert_true(o->def == 0 && o->min == 0 && o->max < 1);
    assert_non_null(o = find_option("use_rslora", NULL));
    assert_int_equal(o->type, PR_OPT_BOOL);
    assert_true(o->def == 0);

    /* lora_A0 / lora_B0: frozen copies, 0 rows unless init_lora_weights is pissa or olora */
    assert_int_equal(t->n_params, 4);
    assert_string_equal(t->params[2].name, "lora_A0");
    assert_true(t->params[2].flags & PR_PARAM_FROZEN);
    assert_string_equal(t->params[3].name, "lora_B0");
    assert_true(t->params[3].flags & PR_PARAM_FROZEN);
    assert_string_equal(t->params[0].name, "lora_A");
    assert_string_equal(t->params[0].shape, "r, d_in");
    assert_int_equal(t->params[0].init, PR_INIT_KAIMING_UNIFORM);
    assert_string_equal(t->params[0].init_arg, "sqrt(5)");
    assert_int_equal(t->params[0].scope, PR_SCOPE_INSERTION);
    assert_string_equal(t->params[1].name, "lora_B");
    assert_string_equal(t->params[1].shape, "d_out, r");
    assert_int_equal(t->params[1].init, PR_INIT_ZEROS);
    assert_int_equal(t->params[1].scope, PR_SCOPE_INSERTION);
    assert_non_null(strstr(t->param_formula, "per insertion: r * (d_in + d_out)"));

    assert_non_null(t->forward);
    assert_non_null(t->backward);
    assert_non_null(t->merge);
    assert_non_null(t->scale);
    assert_null(t->integrate_forward);

    /* -fvisibility=hidden: the callbacks are not exported */
    assert_null(dlsym(so_handle, "lora_forward"));
    assert_null(dlsym(so_handle, "lora_technique"));
}

/* ---- the callbacks driven directly through th_host (harness.h) --------- */

/* One insertion with its own memory: rows x d_in -> rows x d_out at rank r.
 * x and h sit in wider rows (stride) as q/k/v slices of a fused model do. */
enum { ROWS = 6, D_IN = 37, D_OUT = 7, R = 3, LDX = D_IN + 3, LDH = D_OUT + 5 };

typedef struct fixture {
    pr_option_value opts[4];
    float A[R * D_IN], B[D_OUT * R], dA[R * D_IN], dB[D_OUT * R];
    float x[ROWS * LDX], dx[ROWS * LDX], h[ROWS * LDH], w[ROWS * LDH];
    float xa[ROWS * R], mask[ROWS * ((D_IN + 31) / 32)], dropout_on[1];
    float xd[ROWS * D_IN], dxa[ROWS * R];
    pr_dims dims;
    th_ctx t; /* the context and its tensors (harness.h) */
} fixture;

static fixture *fixture_new(double alpha, double dropout, int rslora, int training)
{
    fixture *f = calloc(1, sizeof *f);
    assert_non_null(f);
    f->opts[0].num = R;
    f->opts[1].num = alpha;
    f->opts[2].num = dropout;
    f->opts[3].num = rslora;
    gc_fill(f->A, R * D_IN, 1, 0.5f);
    gc_fill(f->B, D_OUT * R, 2, 0.5f);
    gc_fill(f->x, ROWS * LDX, 3, 1.0f);
    gc_fill(f->w, ROWS * LDH, 4, 1.0f);
    th_ctx *t = &f->t;
    t->params[0] = th_view2(f->A, R, D_IN, D_IN);
    t->params[1] = th_view2(f->B, D_OUT, R, R);
    t->grads[0] = th_view2(f->dA, R, D_IN, D_IN);
    t->grads[1] = th_view2(f->dB, D_OUT, R, R);
    t->saved[0] = th_view2(f->xa, ROWS, R, R);
    t->saved[1] = th_view2(f->mask, ROWS, (D_IN + 31) / 32, (D_IN + 31) / 32);
    t->saved[2] = th_view2(f->dropout_on, 1, 1, 1);
    t->saved[2].ndim = 1;
    t->scratch[0] = th_view2(f->xd, ROWS, D_IN, D_IN);
    t->scratch[1] = th_view2(f->dxa, ROWS, R, R);
    f->dims = (pr_dims){ .struct_size = sizeof(pr_dims), .d_model = D_IN, .n_heads = 1,
                         .n_kv_heads = 1, .d_head = D_IN, .d_ff = D_OUT, .n_layers = 1,
                         .vocab = 8, .d_in = D_IN, .d_out = D_OUT, .family = 1 };
    pr_ctx *c = th_ctx_bind(t);
    c->technique = lora;
    c->dims = &f->dims;
    c->site = PR_SITE_Q;
    c->B = 1;
    c->T = ROWS;
    c->rows = ROWS;
    c->training = training;
    c->seed = 12345;
    c->module_seed = 12345; /* the dropout key (with step 0 and sample_index NULL: row / T) */
    c->options = f->opts;
    c->n_options = 4;
    c->n_params = 2;
    c->n_saved = 3;
    c->n_scratch = 2;
    t->in = th_view2(f->x, ROWS, D_IN, LDX);
    t->out = th_view2(f->h, ROWS, D_OUT, LDH);
    c->scale = lora->scale(c);
    return f;
}

/* L = sum over the (rows, d_out) view of w * h, recomputed by forward. */
static double loss_of(void *arg)
{
    fixture *f = arg;
    th_ctx c;
    if (lora->forward(th_ctx_copy(&c, &f->t)) != 0)
        fail_msg("forward: %s", th_last_error);
    double l = 0.0;
    for (int i = 0; i < ROWS; i++)
        for (int j = 0; j < D_OUT; j++)
            l += (double)f->w[i * LDH + j] * f->h[i * LDH + j];
    return l;
}

static void backward_of(fixture *f)
{
    memset(f->dA, 0, sizeof f->dA);
    memset(f->dB, 0, sizeof f->dB);
    memset(f->dx, 0, sizeof f->dx);
    (void)loss_of(f);
    th_ctx c;
    th_ctx_copy(&c, &f->t);
    c.out = (pr_tensor){ 0 };
    c.d_out = th_view2(f->w, ROWS, D_OUT, LDH);
    c.d_in = th_view2(f->dx, ROWS, D_IN, LDX);
    assert_int_equal(lora->backward(&c.c), 0);
}

static void check_gradients(fixture *f)
{
    /* lora_B's gradient needs A != 0 and lora_A's needs B != 0: both are
     * random here (the zeros init is the host's business). */
    backward_of(f);
    int fails = 0;
    fails += gc_check("lora_A", f->A, f->dA, R * D_IN, loss_of, f, 1e-2, 1e-3, 1e-4, 0);
    fails += gc_check("lora_B", f->B, f->dB, D_OUT * R, loss_of, f, 1e-2, 1e-3, 1e-4, 0);
    /* x: only the (rows, d_in) view inside the wider rows has a gradient */
    float g[ROWS * LDX];
    memcpy(g, f->dx, sizeof g);
    fails += gc_check("x", f->x, g, ROWS * LDX, loss_of, f, 1e-2, 1e-3, 1e-4, 0);
    assert_int_equal(fails, 0);
}

static void test_forward_reference(void **state)
{
    (void)state;
    fixture *f = fixture_new(8, 0, 0, 0);
    (void)loss_of(f);
    double worst = 0.0;
    for (int i = 0; i < ROWS; i++)
        for (int o = 0; o < D_OUT; o++) {
            double h = 0.0;
            for (int k = 0; k < R; k++) {
                double xa = 0.0;
                for (int j = 0; j < D_IN; j++)
                    xa += (double)f->x[i * LDX + j] * f->A[k * D_IN + j];
                h += xa * f->B[o * R + k];
            }
            worst = fmax(worst, fabs(h - f->h[i * LDH + o]));
        }
    assert_true(worst < 1e-5);
    /* the padding between rows of h is not written */
    assert_true(f->h[LDH - 1] == 0.0f);
    free(f);
}

static void test_gradients(void **state)
{
    (void)state;
    fixture *f = fixture_new(8, 0, 0, 1);
    check_gradients(f);
    free(f);
}

/* With dropout the mask is a deterministic function of the context's key
 * (module_seed, step, sample, position, site, layer), so the forward probed
 * by finite differences is one fixed function.  The plugin must use the
 * host's keyed mask: the one th_host.dropout_mask draws for the context. */
static void test_gradients_dropout(void **state)
{
    (void)state;
    fixture *f = fixture_new(8, 0.4, 0, 1);
    check_gradients(f);
    assert_true(f->dropout_on[0] == 1.0f);
    /* roughly 40% of the inputs dropped, and the same mask twice */
    int dropped = 0;
    for (int i = 0; i < ROWS; i++)
        for (int j = 0; j < D_IN; j++)
            dropped += f->xd[i * D_IN + j] == 0.0f;
    assert_in_range(dropped, ROWS * D_IN / 5, ROWS * D_IN * 3 / 5);
    float h1[ROWS * LDH];
    (void)loss_of(f);
    memcpy(h1, f->h, sizeof h1);
    (void)loss_of(f);
    assert_memory_equal(h1, f->h, sizeof h1);
    /* exactly the host's mask for this context (stream 0): saved, and applied to x */
    enum { W = (D_IN + 31) / 32 };
    uint32_t want[ROWS * W];
    th_host.dropout_mask(&f->t.c, 0, 0.4f, D_IN, want);
    assert_memory_equal(f->mask, want, sizeof want);
    for (int i = 0; i < ROWS; i++)
        for (int j = 0; j < D_IN; j++) {
            int keep = (want[i * W + j / 32] >> (j % 32)) & 1u;
            float x = f->x[i * LDX + j];
            if (keep)
                assert_float_equal(f->xd[i * D_IN + j], x / 0.6f, 1e-6 * (1 + fabs(x)));
            else
                assert_true(f->xd[i * D_IN + j] == 0.0f);
        }
    /* in eval the same module applies no dropout */
    f->t.c.training = 0;
    (void)loss_of(f);
    assert_true(f->dropout_on[0] == 0.0f);
    assert_memory_not_equal(h1, f->h, sizeof h1);
    free(f);
}

/* x . merge() == s * h (eval), to 1e-5 relative. */
static void test_merge(void **state)
{
    (void)state;
    fixture *f = fixture_new(6, 0.2, 0, 0);
    (void)loss_of(f);
    float dW[D_IN * D_OUT];
    th_ctx c;
    th_ctx_copy(&c, &f->t);
    c.in = (pr_tensor){ 0 };
    c.out = th_view2(dW, D_IN, D_OUT, D_OUT);
    assert_int_equal(lora->merge(&c.c), 0);
    assert_float_equal(c.c.scale, 2.0f, 1e-7);
    double worst = 0.0, norm = 0.0;
    for (int i = 0; i < ROWS; i++)
        for (int o = 0; o < D_OUT; o++) {
            double y = 0.0;
            for (int j = 0; j < D_IN; j++)
                y += (double)f->x[i * LDX + j] * dW[j * D_OUT + o];
            double sh = (double)c.c.scale * f->h[i * LDH + o];
            worst = fmax(worst, fabs(y - sh));
            norm = fmax(norm, fabs(sh));
        }
    assert_true(norm > 0.1);
    assert_true(worst <= 1e-5 * norm);
    free(f);
}

static void test_scale(void **state)
{
    (void)state;
    pr_option_value o[4] = { { .num = 4 }, { .num = 8 }, { .num = 0 }, { .num = 0 } };
    th_ctx t;
    pr_ctx *c = th_ctx_init(&t); /* site tensors present (data NULL), as a host passes them */
    c->options = o;
    c->n_options = 4;
    assert_float_equal(lora->scale(c), 2.0f, 1e-7);
    o[3].num = 1;
    assert_float_equal(lora->scale(c), 4.0f, 1e-7);
    o[0].num = 16;
    o[1].num = 32;
    assert_float_equal(lora->scale(c), 8.0f, 1e-6);
}

static void test_errors(void **state)
{
    (void)state;
    fixture *f = fixture_new(8, 0, 0, 0);
    th_ctx c;
    th_ctx_copy(&c, &f->t);
    c.in = th_view2(f->x, ROWS, D_IN - 1, LDX);
    th_last_error[0] = 0;
    assert_int_not_equal(lora->forward(&c.c), 0);
    assert_non_null(strstr(th_last_error, "width"));
    th_ctx_copy(&c, &f->t);
    c.c.n_saved = 1;
    assert_int_not_equal(lora->forward(&c.c), 0);
    assert_non_null(strstr(th_last_error, "saved"));
    free(f);
}

/* ---- attached to a model ----------------------------------------------------
 *
 * Model: L=2, C=32, H=4, F=128, V=64, B=2, T=8, init_std 0.1 (as
 * test_model), in eval mode (no dropout).  LoRA r=4, alpha=8 (s=2) at q, v
 * and ffn.down, lora_B filled with random values (its zeros init would
 * make lora_A's gradient vanish).  The probed loss is the mean
 * cross-entropy recomputed in double from the logits; with eps = 3e-3 the
 * float rounding inside the network stays below 3e-5 (test_model's
 * measurement on the same shape), so a probe passes when
 * |fd - g| <= 1e-4 + 5e-2 * max(|g|, |fd|). */
enum { MB = 2, MT = 8, MV = 64 };

typedef struct model_fixture {
    pr_model *m;
    pr_module *mod;
    int tokens[MB * MT], targets[MB * MT];
} model_fixture;

static double model_loss(void *arg)
{
    model_fixture *f = arg;
    return th_forward_ce(f->m, f->tokens, f->targets, MB, MT);
}

static model_fixture *model_fixture_new(void)
{
    model_fixture *f = calloc(1, sizeof *f);
    assert_non_null(f);
    pr_model_config c =
        th_config(&(th_shape){ .L = 2, .C = 32, .H = 4, .Hkv = 4, .hd = 8, .F = 128, .V = MV, .max_seq = 16 }, 7);
    pr_error err = { 0 };
    int rc = pr_model_create(&c, &f->m, &err);
    if (rc)
        fail_msg("create: %s", err.msg);
    rc = pr_model_reserve(f->m, MB, MT, &err);
    if (rc)
        fail_msg("reserve: %s", err.msg);
    for (int i = 0; i < MB * MT; i++) {
        f->tokens[i] = (i * 17 + 5) % MV;
        f->targets[i] = (i * 29 + 3) % MV;
    }

    const pr_option_setting opts[] = { { "r", "4", -1 }, { "alpha", "8", -1 } };
    pr_module_spec spec = {
        .technique = lora,
        .name = "lora",
        .sites = PR_SITE_BIT(PR_SITE_Q) | PR_SITE_BIT(PR_SITE_V) | PR_SITE_BIT(PR_SITE_FFN_DOWN),
        .options = opts,
        .n_options = 2,
        .trainable = 1,
        .seed = 11,
    };
    rc = pr_module_attach(f->m, &spec, &f->mod, &err);
    if (rc)
        fail_msg("attach: %s", err.msg);
    return f;
}

static void model_fixture_free(model_fixture *f)
{
    pr_model_detach_modules(f->m);
    pr_model_free(f->m);
    free(f);
}

/* The i-th module tensor whose name ends with suffix, or NULL. */
static const pr_tensor_info *module_tensor(const pr_model *m, const char *suffix, int nth)
{
    size_t ls = strlen(suffix);
    for (int i = 0; i < pr_model_n_tensors(m); i++) {
        const pr_tensor_info *t = pr_model_tensor(m, i);
        size_t ln = strlen(t->name);
        if (t->kind == PR_TENSOR_MODULE && ln >= ls && strcmp(t->name + ln - ls, suffix) == 0 &&
            nth-- == 0)
            return t;
    }
    return NULL;
}

static void test_attach_counts(void **state)
{
    (void)state;
    model_fixture *f = model_fixture_new();
    /* q, v: 4 * (32 + 32); ffn.down: 4 * (128 + 32); two layers */
    const int64_t want = 2 * (2 * 4 * (32 + 32) + 4 * (128 + 32));
    assert_int_equal(pr_module_insertions(f->mod), 6);
    assert_int_equal(pr_module_param_count(f->mod), want);
    assert_int_equal(pr_module_trainable_count(f->mod), want);
    /* the scale the host resolved through scale(): alpha / r */
    const pr_tensor_info *a = module_tensor(f->m, "lora_A", 0);
    const pr_tensor_info *b = module_tensor(f->m, "lora_B", 0);
    assert_non_null(a);
    assert_non_null(b);
    assert_int_equal(a->ndim, 2);
    assert_int_equal(a->shape[0], 4);
    assert_int_equal(b->shape[1], 4);
    /* init: B zeros, A within +-1/sqrt(d_in) and not all zero */
    float bound = 1.0f / sqrtf((float)a->shape[1]);
    int nonzero = 0;
    for (int64_t i = 0; i < a->numel; i++) {
        assert_true(fabsf(a->data[i]) <= bound);
        nonzero += a->data[i] != 0.0f;
    }
    assert_true(nonzero > a->numel / 2);
    for (int64_t i = 0; i < b->numel; i++)
        assert_true(b->data[i] == 0.0f);
    /* B = 0: the model's loss is the base model's */
    double with = model_loss(f);
    pr_model_detach_modules(f->m);
    double without = model_loss(f);
    assert_true(fabs(with - without) < 1e-6);
    model_fixture_free(f);
}

static void test_attach_gradients(void **state)
{
    (void)state;
    model_fixture *f = model_fixture_new();
    pr_error err = { 0 };
    assert_int_equal(pr_model_set_trainable(f->m, "h.0.ln_1.weight", 1, &err), PR_OK);
    for (int k = 0; k < 6; k++) {
        const pr_tensor_info *b = module_tensor(f->m, "lora_B", k);
        assert_non_null(b);
        gc_fill(b->data, (size_t)b->numel, 100u + (unsigned)k, 0.3f);
    }
    pr_model_zero_grad(f->m);
    (void)model_loss(f);
    int rc = pr_model_backward(f->m, &err);
    if (rc)
        fail_msg("backward: %s", err.msg);

    int fails = 0;
    for (int k = 0; k < 6; k++) {
        const pr_tensor_info *a = module_tensor(f->m, "lora_A", k);
        const pr_tensor_info *b = module_tensor(f->m, "lora_B", k);
        assert_non_null(a->grad);
        assert_non_null(b->grad);
        fails += gc_check(a->name, a->data, a->grad, (size_t)a->numel, model_loss, f, 3e-3, 5e-2,
                          1e-4, 6);
        fails += gc_check(b->name, b->data, b->grad, (size_t)b->numel, model_loss, f, 3e-3, 5e-2,
                          1e-4, 6);
    }
    /* upstream of q and v: LoRA's input gradient reaches ln_1 */
    const pr_tensor_info *g = pr_model_find_tensor(f->m, "h.0.ln_1.weight");
    assert_non_null(g);
    fails += gc_check(g->name, g->data, g->grad, (size_t)g->numel, model_loss, f, 3e-3, 5e-2, 1e-4,
                      8);
    assert_int_equal(fails, 0);
    model_fixture_free(f);
}

static void test_attach_merge(void **state)
{
    (void)state;
    model_fixture *f = model_fixture_new();
    for (int k = 0; k < 6; k++) {
        const pr_tensor_info *b = module_tensor(f->m, "lora_B", k);
        gc_fill(b->data, (size_t)b->numel, 200u + (unsigned)k, 0.3f);
    }
    const size_t n = (size_t)MB * MT * MV;
    float *before = malloc(n * sizeof(float)), *merged = malloc(n * sizeof(float));
    assert_non_null(before);
    assert_non_null(merged);
    (void)model_loss(f);
    memcpy(before, pr_model_logits(f->m), n * sizeof(float));

    const pr_tensor_info *w = pr_model_find_tensor(f->m, "h.0.attn.c_attn.weight");
    assert_non_null(w);
    float *w0 = malloc((size_t)w->numel * sizeof(float));
    assert_non_null(w0);
    memcpy(w0, w->data, (size_t)w->numel * sizeof(float));

    pr_error err = { 0 };
    int rc = pr_module_merge(f->mod, &err);
    if (rc)
        fail_msg("merge: %s", err.msg);
    (void)model_loss(f);
    memcpy(merged, pr_model_logits(f->m), n * sizeof(float));
    double worst = 0.0, norm = 0.0, moved = 0.0;
    for (size_t i = 0; i < n; i++) {
        worst = fmax(worst, fabs((double)merged[i] - before[i]));
        norm = fmax(norm, fabs((double)before[i]));
    }
    for (int64_t i = 0; i < w->numel; i++)
        moved = fmax(moved, fabs((double)w->data[i] - w0[i]));
    printf("merge: max |merged - unmerged| = %.3e (max |logit| %.3e), weight moved by %.3e\n",
           worst, norm, moved);
    assert_true(moved > 1e-3);          /* the delta went into the fused weight */
    assert_true(worst <= 1e-5 * norm);  /* and gives the same outputs */

    rc = pr_module_unmerge(f->mod, &err);
    if (rc)
        fail_msg("unmerge: %s", err.msg);
    assert_memory_equal(w->data, w0, (size_t)w->numel * sizeof(float));
    (void)model_loss(f);
    assert_memory_equal(pr_model_logits(f->m), before, n * sizeof(float));
    free(w0);
    free(before);
    free(merged);
    model_fixture_free(f);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_descriptor),
        cmocka_unit_test(test_forward_reference),
        cmocka_unit_test(test_gradients),
        cmocka_unit_test(test_gradients_dropout),
        cmocka_unit_test(test_merge),
        cmocka_unit_test(test_scale),
        cmocka_unit_test(test_errors),
        cmocka_unit_test(test_attach_counts),
        cmocka_unit_test(test_attach_gradients),
        cmocka_unit_test(test_attach_merge),
    };
    return cmocka_run_group_tests(tests, setup_plugin, teardown_plugin);
}
