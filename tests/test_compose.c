/* Tests of composition (docs/pipeline.md, "Composition"): several modules
 * of different techniques in one model, learned gates (UniPELT) and
 * AdapterFusion, through the C API on a tiny GPT-2 and through pipelines.
 *
 *  - order: at one site sequential modules stack (the second reads what
 *    the first left), parallel modules sum (each reads the site input),
 *    concatenations append in attach order;
 *  - gates: every integration form with gate on, finite-difference checks
 *    of the gate and the module's parameters, the plan counts the gates,
 *    a gated rescaling starts as the identity, a gated merge folds s*delta;
 *  - fusion: errors for modules that cannot be fused, the fusion starts at
 *    the mean of the fused contributions, finite-difference checks of
 *    W_Q, W_K, W_V and of base tensors upstream (the input gradients
 *    through the fused modules), save and fill;
 *  - pipelines: prompt tuning + LoRA + Houlsby adapter, MAM (prefix +
 *    parallel adapter), the UniPELT gated union and a fuse entry (its
 *    frozen inputs unchanged bit for bit) all train and lower the
 *    validation loss, and the last two runs' pipeline.yaml rebuild the
 *    trained model (gates and fusion saved and loaded); a pipeline run
 *    with module dropout killed with SIGKILL after a checkpoint and resumed
 *    ends with the uninterrupted run's losses to the printed digit.
 *
 * Tolerances: finite differences as the other module tests (eps 3e-3,
 * |g - fd| <= 1e-4 + 5e-2 max(|g|, |fd|), 6 probes per tensor); float
 * identities between differently ordered sums 2e-5 absolute. */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <fcntl.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "peftref/peftref.h"
#include "peftref/module.h"
#include "peftref/pipeline.h"
#include "peftref/plugin.h"
#include "gradcheck.h"
#include "harness.h"
#include "runtime.h"

#define PLUGINS TEST_BUILDDIR "/plugins/.libs"
#define CORPUS TEST_SRCDIR "/data/train/corpus.txt"

#define FD_EPS 3e-3
#define FD_RTOL 5e-2
#define FD_ATOL 1e-4
#define FD_PROBES 6

/* a checked gradient must not vanish everywhere */
static const th_fd FD_CHECK = { FD_EPS, FD_RTOL, FD_ATOL, FD_PROBES, 1e-7 };

enum { TB = 2, TT = 6 };

static pr_registry *reg;
static char workdir[256];

/* ---- a weight-delta technique (no built-in one integrates so) ---------------- */

/* dW = A^T B^T (d_in, d_out), A (r, d_in), B (d_out, r); y += x.dW. */
static int wd_merge(const pr_ctx *c)
{
    const pr_tensor *a = c->params[0], *b = c->params[1];
    int r = (int)a->shape[0], din = (int)a->shape[1], dout = (int)b->shape[0];
    c->host->gemm(1, 1, din, dout, r, 1.0f, a->data, din, b->data, r, 1.0f, c->out->data, (int)c->out->stride[0]);
    return 0;
}

/* d_out = G = dL/d(dW): dA += (G B)^T = B^T G^T, dB += G^T A^T */
static int wd_backward(const pr_ctx *c)
{
    const pr_tensor *a = c->params[0], *b = c->params[1];
    int r = (int)a->shape[0], din = (int)a->shape[1], dout = (int)b->shape[0];
    const float *g = c->d_out->data;
    if (c->grads[0]->data)
        c->host->gemm(1, 1, r, din, dout, 1.0f, b->data, r, g, dout, 1.0f, c->grads[0]->data, din);
    if (c->grads[1]->data)
        c->host->gemm(1, 1, dout, r, din, 1.0f, g, dout, a->data, din, 1.0f, c->grads[1]->data, r);
    return 0;
}

static const pr_param_decl wd_params[] = {
    { .struct_size = sizeof(pr_param_decl), .name = "wd_A", .shape = "2, d_in", .init = PR_INIT_NORMAL,
      .init_arg = "0.1", .scope = PR_SCOPE_INSERTION, .help = "A" },
    { .struct_size = sizeof(pr_param_decl), .name = "wd_B", .shape = "d_out, 2", .init = PR_INIT_NORMAL,
      .init_arg = "0.1", .scope = PR_SCOPE_INSERTION, .help = "B" },
};

static const pr_technique twd = {
    .struct_size = sizeof(pr_technique),
    .abi_major = PR_ABI_MAJOR,
    .name = "wd_stub",
    .version = "1.0.0",
    .summary = "a rank-2 weight delta",
    .citation = "test",
    .license = "MIT",
    .intra = PR_INTRA_FACTORISED,
    .inter = PR_INTER_FIXED,
    .adaptation = PR_ADAPT_REPARAMETERISATION,
    .sharing = PR_SHARE_NONE,
    .input = PR_INPUT_WEIGHTS,
    .insertion = PR_INSERT_PARALLEL,
    .insertions = PR_INSERTIONS_PER_SITE_LAYER,
    .integration = PR_INTEGRATE_WEIGHT_DELTA,
    .workspace = PR_WS_ATTENTION,
    .sites = PR_SITE_BIT(PR_SITE_Q) | PR_SITE_BIT(PR_SITE_V),
    .default_sites = PR_SITE_BIT(PR_SITE_Q) | PR_SITE_BIT(PR_SITE_V),
    .params = wd_params,
    .n_params = 2,
    .backward = wd_backward,
    .merge = wd_merge,
};

/* ---- the model and the loss ---------------------------------------------------------------- */

static pr_model_config tiny_config(void)
{
    return th_config(&(th_shape){ .L = 2, .C = 32, .H = 4, .Hkv = 4, .hd = 8, .F = 64, .V = 64, .max_seq = 16 }, 11);
}

static pr_model *make_model(void)
{
    pr_model_config c = tiny_config();
    return th_model_new(&c, TB, TT);
}

static void loss_ctx_init(th_loss_ctx *lc, pr_model *m)
{
    th_loss_bind(lc, m, TB, TT);
    int V = pr_model_get_config(m)->vocab_size;
    for (int i = 0; i < TB * TT; i++) {
        lc->tokens[i] = (7 * i + 3) % V;
        lc->targets[i] = (11 * i + 5) % V;
    }
}

/* logits of one forward, copied */
static float *logits_of(pr_model *m)
{
    th_loss_ctx lc;
    loss_ctx_init(&lc, m);
    return th_logits_copy(&lc);
}

static const pr_technique *tech(const char *name)
{
    const pr_technique *t = pr_registry_find(reg, name);
    if (!t)
        fprintf(stderr, "no technique '%s' in %s\n", name, PLUGINS);
    assert_non_null(t);
    return t;
}

typedef struct attach_args {
    const char *name;
    uint32_t sites;           /* 0: defaults */
    const int *layers;
    int n_layers;
    const pr_option_setting *opts;
    int n_opts;
    int gate;
    int frozen;
    uint64_t seed;
} attach_args;

static pr_module *attach_t(pr_model *m, const pr_technique *t, const attach_args *a)
{
    pr_module_spec s;
    memset(&s, 0, sizeof s);
    s.technique = t;
    s.name = a->name;
    s.sites = a->sites;
    s.layers = a->layers;
    s.n_layers = a->n_layers;
    s.options = a->opts;
    s.n_options = a->n_opts;
    s.trainable = !a->frozen;
    s.seed = a->seed ? a->seed : 5;
    s.gate = a->gate;
    return th_attach(m, &s);
}

static pr_module *attach(pr_model *m, const char *technique, const attach_args *a)
{
    return attach_t(m, tech(technique), a);
}

/* Every tensor named prefix* gets values from a generator seeded by its
 * name, so two models holding a module of one name get equal values. */
static void randomise(pr_model *m, const char *prefix, float scale)
{
    size_t len = strlen(prefix);
    for (int i = 0; i < pr_model_n_tensors(m); i++) {
        const pr_tensor_info *t = pr_model_tensor(m, i);
        if (strncmp(t->name, prefix, len) != 0)
            continue;
        unsigned seed = 2166136261u;
        for (const char *c = t->name; *c; c++)
            seed = (seed ^ (unsigned char)*c) * 16777619u;
        gc_fill(t->data, (size_t)t->numel, seed, scale);
    }
}

/* Finite-difference check of every trained tensor named prefix*;
 * returns how many were checked. */
static int check_grads(pr_model *m, const char *prefix)
{
    th_loss_ctx lc;
    loss_ctx_init(&lc, m);
    return th_check_grads(&lc, &prefix, 1, 1, &FD_CHECK);
}

static int count_suffix(const pr_model *m, const char *prefix, const char *suffix)
{
    int n = 0;
    size_t lp = strlen(prefix), ls = strlen(suffix);
    for (int i = 0; i < pr_model_n_tensors(m); i++) {
        const char *s = pr_model_tensor(m, i)->name;
        size_t l = strlen(s);
        n += strncmp(s, prefix, lp) == 0 && l >= ls && strcmp(s + l - ls, suffix) == 0;
    }
    return n;
}

/* ---- a probe: a site hook that copies the site output as it passes ------------------ */

typedef struct probe {
    float *y;
    int rows, dim;
} probe;

static int probe_forward(void *self, const pr_site_io *io, pr_error *err)
{
    (void)err;
    probe *p = self;
    p->rows = io->rows;
    p->dim = io->y_dim;
    for (int r = 0; r < io->rows; r++)
        memcpy(p->y + (size_t)r * io->y_dim, io->y + (size_t)r * io->y_ld, (size_t)io->y_dim * sizeof(float));
    return PR_OK;
}

static int probe_backward(void *self, const pr_site_io *io, pr_error *err)
{
    (void)self;
    (void)io;
    (void)err;
    return PR_OK;
}

static void probe_at(pr_model *m, probe *p, int site, int layer)
{
    p->y = calloc((size_t)TB * TT * 64, sizeof(float));
    assert_non_null(p->y);
    pr_site_hook h = { probe_forward, probe_backward, p, NULL };
    pr_error err = { 0 };
    assert_int_equal(pr_model_attach_hook(m, site, layer, &h, &err), PR_OK);
}

static size_t probe_n(const probe *p)
{
    return (size_t)p->rows * p->dim;
}

/* ---- order ---------------------------------------------------------------------------------- */

static const pr_option_setting houlsby_identity[] = { { "m", "4", -1 }, { "activation", "identity", -1 } };
static const pr_option_setting small_m[] = { { "m", "4", -1 } };
static const int layer0[] = { 0 };

/* Parallel modules sum: each reads the site input, so what the second
 * adds after the first equals what it adds alone. */
static void test_parallel_modules_sum(void **state)
{
    (void)state;
    pr_model *both = make_model(), *alone = make_model();
    probe p1, p2, q0, q1;
    attach_args a = { .name = "par1", .sites = PR_SITE_BIT(PR_SITE_FFN_OUT), .layers = layer0, .n_layers = 1,
                      .opts = small_m, .n_opts = 1 };
    attach_args b = a;
    b.name = "par2";
    attach(both, "adapter_parallel", &a);
    probe_at(both, &p1, PR_SITE_FFN_OUT, 0);
    attach(both, "adapter_parallel", &b);
    probe_at(both, &p2, PR_SITE_FFN_OUT, 0);
    probe_at(alone, &q0, PR_SITE_FFN_OUT, 0);
    attach(alone, "adapter_parallel", &b);
    probe_at(alone, &q1, PR_SITE_FFN_OUT, 0);
    randomise(both, "par", 0.3f);
    randomise(alone, "par", 0.3f);
    free(logits_of(both));
    free(logits_of(alone));
    size_t n = probe_n(&p1);
    assert_true(n > 0);
    double added = 0.0, dev = 0.0;
    for (size_t i = 0; i < n; i++) {
        double d2 = (double)p2.y[i] - p1.y[i], d1 = (double)q1.y[i] - q0.y[i];
        added = fmax(added, fabs(d1));
        dev = fmax(dev, fabs(d2 - d1));
    }
    assert_true(added > 1e-2);   /* the module really adds something */
    assert_true(dev < 2e-5);
    free(p1.y), free(p2.y), free(q0.y), free(q1.y);
    pr_model_free(both);
    pr_model_free(alone);
}

/* Sequential modules stack: with an affine adapter h(y) = y W + c
 * (activation identity, W = down.up), the second adapter reads the first
 * one's output, so y_12 - y_2 = (y_1 - y_0)(I + W_2). */
static void test_sequential_modules_stack(void **state)
{
    (void)state;
    pr_model *both = make_model(), *alone = make_model();
    probe p0, p1, p2, q1;
    attach_args a = { .name = "seq1", .sites = PR_SITE_BIT(PR_SITE_FFN_OUT), .layers = layer0, .n_layers = 1,
                      .opts = houlsby_identity, .n_opts = 2 };
    attach_args b = a;
    b.name = "seq2";
    probe_at(both, &p0, PR_SITE_FFN_OUT, 0);
    attach(both, "adapter_houlsby", &a);
    probe_at(both, &p1, PR_SITE_FFN_OUT, 0);
    attach(both, "adapter_houlsby", &b);
    probe_at(both, &p2, PR_SITE_FFN_OUT, 0);
    attach(alone, "adapter_houlsby", &b);
    probe_at(alone, &q1, PR_SITE_FFN_OUT, 0);
    randomise(both, "seq", 0.3f);
    randomise(alone, "seq", 0.3f);
    free(logits_of(both));
    free(logits_of(alone));
    const pr_tensor_info *down = pr_model_find_tensor(both, "seq2/h.0.ffn_out.down_weight");
    const pr_tensor_info *up = pr_model_find_tensor(both, "seq2/h.0.ffn_out.up_weight");
    assert_non_null(down);
    assert_non_null(up);
    int d = p0.dim, mm = (int)down->shape[1], rows = p0.rows;
    assert_int_equal(d, 32);
    /* W = down (d, m) . up (m, d) */
    double w[32][32];
    for (int i = 0; i < d; i++)
        for (int j = 0; j < d; j++) {
            double s = 0.0;
            for (int k = 0; k < mm; k++)
                s += (double)down->data[i * mm + k] * up->data[k * d + j];
            w[i][j] = s + (i == j);
        }
    double dev = 0.0, size = 0.0;
    for (int r = 0; r < rows; r++)
        for (int j = 0; j < d; j++) {
            double want = 0.0;
            for (int i = 0; i < d; i++)
                want += ((double)p1.y[r * d + i] - p0.y[r * d + i]) * w[i][j];
            double got = (double)p2.y[r * d + j] - q1.y[r * d + j];
            size = fmax(size, fabs(want));
            dev = fmax(dev, fabs(got - want));
        }
    assert_true(size > 1e-2);
    assert_true(dev < 2e-5);
    free(p0.y), free(p1.y), free(p2.y), free(q1.y);
    pr_model_free(both);
    pr_model_free(alone);
}

/* Concatenations append in attach order: prompts of 2 and 3 vectors are
 * one prompt of 5 (the first's rows first); the other order differs. */
static void test_concatenations_append(void **state)
{
    (void)state;
    static const pr_option_setting two[] = { { "n_tokens", "2", -1 }, { "init", "normal", -1 } };
    static const pr_option_setting three[] = { { "n_tokens", "3", -1 }, { "init", "normal", -1 } };
    static const pr_option_setting five[] = { { "n_tokens", "5", -1 }, { "init", "normal", -1 } };
    pr_model *ab = make_model(), *ba = make_model(), *one = make_model();
    attach_args a = { .name = "pa", .opts = two, .n_opts = 2, .seed = 1 };
    attach_args b = { .name = "pb", .opts = three, .n_opts = 2, .seed = 2 };
    attach_args c = { .name = "pc", .opts = five, .n_opts = 2 };
    attach(ab, "prompt_tuning", &a);
    attach(ab, "prompt_tuning", &b);
    attach(ba, "prompt_tuning", &b);
    attach(ba, "prompt_tuning", &a);
    attach(one, "prompt_tuning", &c);
    assert_int_equal(pr_model_virtual_positions(ab), 5);
    const pr_tensor_info *ta = pr_model_find_tensor(ab, "pa/prompt"), *tb = pr_model_find_tensor(ab, "pb/prompt");
    const pr_tensor_info *tc = pr_model_find_tensor(one, "pc/prompt");
    assert_non_null(ta);
    assert_non_null(tb);
    assert_non_null(tc);
    memcpy(tc->data, ta->data, (size_t)ta->numel * sizeof(float));
    memcpy(tc->data + ta->numel, tb->data, (size_t)tb->numel * sizeof(float));
    float *lab = logits_of(ab), *lba = logits_of(ba), *lone = logits_of(one);
    size_t n = (size_t)TB * TT * 64;
    assert_true(th_max_abs_diff(lab, lone, n) < 1e-6);
    assert_true(th_max_abs_diff(lab, lba, n) > 1e-4);
    free(lab), free(lba), free(lone);
    pr_model_free(ab);
    pr_model_free(ba);
    pr_model_free(one);
}

/* ---- gates ----------------------------------------------------------------------------------- */

/* One gated module: gates registered per insertion at 0, its tensors and
 * gates pass finite differences. */
static void gated_case(const pr_technique *t, const char *name, uint32_t sites, const pr_option_setting *opts,
                       int n_opts, float scale, int expect_gates)
{
    pr_model *m = make_model();
    attach_args a = { .name = name, .sites = sites, .opts = opts, .n_opts = n_opts, .gate = 1 };
    pr_module *mod = attach_t(m, t, &a);
    assert_true(pr_module_is_gated(mod));
    char prefix[64];
    snprintf(prefix, sizeof prefix, "%s/", name);
    assert_int_equal(count_suffix(m, prefix, ".gate"), expect_gates);
    for (int i = 0; i < pr_model_n_tensors(m); i++) {
        const pr_tensor_info *ti = pr_model_tensor(m, i);
        size_t l = strlen(ti->name);
        if (l > 5 && strcmp(ti->name + l - 5, ".gate") == 0 && strncmp(ti->name, prefix, strlen(prefix)) == 0) {
            assert_int_equal(ti->numel, 1);
            assert_true(ti->data[0] == 0.0f);
            assert_true(ti->trainable);
        }
    }
    randomise(m, prefix, scale);
    int checked = check_grads(m, prefix);
    assert_true(checked >= expect_gates + 1);
    pr_model_free(m);
}

static void test_gate_scaled_add(void **state)
{
    (void)state;
    static const pr_option_setting r4[] = { { "r", "4", -1 } };
    gated_case(tech("lora"), "lg", PR_SITE_BIT(PR_SITE_Q) | PR_SITE_BIT(PR_SITE_V), r4, 1, 0.3f, 4);
}

static void test_gate_direct_add_sequential(void **state)
{
    (void)state;
    gated_case(tech("adapter_houlsby"), "hg", 0, small_m, 1, 0.3f, 4);
}

static void test_gate_parallel_adapter(void **state)
{
    (void)state;
    gated_case(tech("adapter_parallel"), "pg", 0, small_m, 1, 0.3f, 2);
}

static void test_gate_rescale(void **state)
{
    (void)state;
    gated_case(tech("ia3"), "ig", 0, NULL, 0, 0.5f, 6);
}

static void test_gate_prefix(void **state)
{
    (void)state;
    static const pr_option_setting n3[] = { { "n_tokens", "3", -1 } };
    gated_case(tech("prefix_tuning"), "xg", 0, n3, 1, 0.5f, 4);
}

static void test_gate_prompt(void **state)
{
    (void)state;
    static const pr_option_setting n3[] = { { "n_tokens", "3", -1 }, { "init", "normal", -1 } };
    gated_case(tech("prompt_tuning"), "tg", 0, n3, 2, 0.5f, 1);
}

static void test_gate_custom(void **state)
{
    (void)state;
    static const pr_option_setting r2[] = { { "r", "2", -1 } };
    gated_case(tech("dora"), "dg", PR_SITE_BIT(PR_SITE_Q), r2, 1, 0.3f, 2);
}

static void test_gate_weight_delta(void **state)
{
    (void)state;
    gated_case(&twd, "wg", 0, NULL, 0, 0.3f, 4);
}

/* The plan counts one gate per insertion; a gated rescaling at its init
 * (h = 1) is the identity; a gated merge folds s * delta; selection has
 * nothing to gate. */
static void test_gate_plan_identity_merge(void **state)
{
    (void)state;
    pr_model_config cfg = tiny_config();
    static const pr_option_setting r4[] = { { "r", "4", -1 } };
    pr_module_spec s;
    memset(&s, 0, sizeof s);
    s.technique = tech("lora");
    s.sites = PR_SITE_BIT(PR_SITE_Q) | PR_SITE_BIT(PR_SITE_V);
    s.options = r4;
    s.n_options = 1;
    s.trainable = 1;
    pr_module_plan plain, gated;
    pr_error err = { 0 };
    assert_int_equal(pr_module_plan_for(&cfg, &s, &plain, &err), PR_OK);
    s.gate = 1;
    assert_int_equal(pr_module_plan_for(&cfg, &s, &gated, &err), PR_OK);
    assert_int_equal(gated.params, plain.params + 4);
    assert_int_equal(gated.trainable, plain.trainable + 4);

    /* (IA)^3 starts at ones: gated, still the identity */
    pr_model *base = make_model(), *m = make_model();
    attach_args a = { .name = "ia", .gate = 1 };
    attach(m, "ia3", &a);
    float *lb = logits_of(base), *lm = logits_of(m);
    size_t n = (size_t)TB * TT * 64;
    assert_true(th_max_abs_diff(lb, lm, n) == 0.0);
    free(lm);
    pr_model_free(m);

    /* merge: a gated LoRA folds s * delta, so merged logits match */
    m = make_model();
    attach_args l = { .name = "lm", .sites = PR_SITE_BIT(PR_SITE_QKV), .opts = r4, .n_opts = 1, .gate = 1 };
    pr_module *mod = attach(m, "lora", &l);
    randomise(m, "lm/", 0.3f);
    float *before = logits_of(m);
    assert_int_equal(pr_module_merge(mod, &err), PR_OK);
    float *after = logits_of(m);
    assert_true(th_max_abs_diff(before, after, n) < 1e-4);
    assert_true(th_max_abs_diff(before, lb, n) > 1e-3);
    assert_int_equal(pr_module_unmerge(mod, &err), PR_OK);
    free(before), free(after), free(lb);
    pr_model_free(m);

    /* selection cannot be gated */
    s.technique = tech("bitfit");
    s.sites = 0;
    s.options = NULL;
    s.n_options = 0;
    pr_module *bad = NULL;
    assert_int_not_equal(pr_module_attach(base, &s, &bad, &err), PR_OK);
    assert_non_null(strstr(err.msg, "gate"));
    assert_null(bad);
    pr_model_free(base);
}

/* ---- fusion ---------------------------------------------------------------------------------- */

static pr_module *frozen(pr_model *m, const char *technique, const char *name, const int *layers, int n_layers)
{
    attach_args a = { .name = name, .sites = PR_SITE_BIT(PR_SITE_FFN_OUT), .layers = layers, .n_layers = n_layers,
                      .opts = small_m, .n_opts = 1, .frozen = 1 };
    return attach(m, technique, &a);
}

static pr_module *fuse(pr_model *m, const char *name, pr_module **mods, int n, pr_error *err)
{
    const pr_technique *t = pr_registry_find(reg, "adapter_fusion");
    assert_non_null(t);
    pr_module_spec fs = { .technique = t, .name = name, .trainable = 1, .seed = 9 };
    pr_module *f = NULL;
    int rc = pr_module_compose(m, &fs, mods, n, &f, err);
    if (rc)
        return NULL;
    return f;
}

static void test_fusion_errors(void **state)
{
    (void)state;
    pr_model *m = make_model();
    pr_error err = { 0 };
    pr_module *a = frozen(m, "adapter_houlsby", "fa", NULL, 0);
    pr_module *b = frozen(m, "adapter_houlsby", "fb", layer0, 1);
    attach_args t = { .name = "ft", .sites = PR_SITE_BIT(PR_SITE_FFN_OUT), .opts = small_m, .n_opts = 1 };
    pr_module *tr = attach(m, "adapter_houlsby", &t);
    attach_args x = { .name = "fx", .frozen = 1 };
    pr_module *px = attach(m, "prefix_tuning", &x);

    pr_module *one[] = { a };
    assert_null(fuse(m, "f", one, 1, &err));
    assert_non_null(strstr(err.msg, "at least two"));
    pr_module *layers[] = { a, b };
    assert_null(fuse(m, "f", layers, 2, &err));
    assert_non_null(strstr(err.msg, "different layers"));
    pr_module *train[] = { a, tr };
    assert_null(fuse(m, "f", train, 2, &err));
    assert_non_null(strstr(err.msg, "trainable"));
    pr_module *concat[] = { a, px };
    assert_null(fuse(m, "f", concat, 2, &err));
    assert_non_null(strstr(err.msg, "concatenation"));
    pr_module *twice[] = { a, a };
    assert_null(fuse(m, "f", twice, 2, &err));
    assert_non_null(strstr(err.msg, "twice"));
    /* nothing changed: four modules, no fusion */
    assert_int_equal(pr_model_n_modules(m), 4);
    assert_null(pr_module_composed_by(a));
    pr_model_free(m);
}

/* At its init (W_Q, W_K ~ 0.02, W_V ~ I) the fusion adds about the mean
 * of what the fused modules would add alone. */
static void test_fusion_starts_at_mean(void **state)
{
    (void)state;
    pr_model *base = make_model(), *only_a = make_model(), *only_b = make_model(), *fused = make_model();
    probe p0, pa, pb, pf;
    probe_at(base, &p0, PR_SITE_FFN_OUT, 0);
    frozen(only_a, "adapter_houlsby", "ka", layer0, 1);
    probe_at(only_a, &pa, PR_SITE_FFN_OUT, 0);
    frozen(only_b, "adapter_parallel", "kb", layer0, 1);
    probe_at(only_b, &pb, PR_SITE_FFN_OUT, 0);
    pr_module *kids[2] = { frozen(fused, "adapter_houlsby", "ka", layer0, 1),
                           frozen(fused, "adapter_parallel", "kb", layer0, 1) };
    pr_error err = { 0 };
    pr_module *f = fuse(fused, "fz", kids, 2, &err);
    if (!f)
        fprintf(stderr, "fuse: %s\n", err.msg);
    assert_non_null(f);
    probe_at(fused, &pf, PR_SITE_FFN_OUT, 0);
    assert_int_equal(pr_model_n_modules(fused), 1);
    assert_int_equal(pr_module_n_members(f), 2);
    assert_ptr_equal(pr_module_member(f, 1), kids[1]);
    assert_ptr_equal(pr_module_composed_by(kids[0]), f);
    assert_string_equal(pr_module_technique(f)->name, "adapter_fusion");
    /* 3 d^2 per insertion, trained; the fused modules stay frozen */
    assert_int_equal(pr_module_trainable_count(f), 3 * 32 * 32);
    for (pr_model *m = only_a; m; m = m == only_a ? only_b : m == only_b ? fused : NULL) {
        randomise(m, "ka/", 0.3f);
        randomise(m, "kb/", 0.3f);
    }
    free(logits_of(base));
    free(logits_of(only_a));
    free(logits_of(only_b));
    free(logits_of(fused));
    size_t n = probe_n(&p0);
    double dev = 0.0, size = 0.0;
    for (size_t i = 0; i < n; i++) {
        double want = 0.5 * (((double)pa.y[i] - p0.y[i]) + ((double)pb.y[i] - p0.y[i]));
        size = fmax(size, fabs(want));
        dev = fmax(dev, fabs(((double)pf.y[i] - p0.y[i]) - want));
    }
    assert_true(size > 1e-2);
    assert_true(dev < 2e-2 * size);
    free(p0.y), free(pa.y), free(pb.y), free(pf.y);
    pr_model_free(base);
    pr_model_free(only_a);
    pr_model_free(only_b);
    pr_model_free(fused);
}

/* W_Q, W_K, W_V pass finite differences, and so do base tensors whose
 * gradient flows through the fusion: ln_2 (the FFN input, which the
 * parallel adapter reads) and the FFN's up projection (the site output,
 * which the query and the sequential adapter read). */
static void test_fusion_gradients(void **state)
{
    (void)state;
    pr_model *m = make_model();
    pr_module *kids[2] = { frozen(m, "adapter_houlsby", "ka", NULL, 0), frozen(m, "adapter_parallel", "kb", NULL, 0) };
    pr_error err = { 0 };
    randomise(m, "ka/", 0.3f);
    randomise(m, "kb/", 0.3f);
    pr_module *f = fuse(m, "fz", kids, 2, &err);
    if (!f)
        fprintf(stderr, "fuse: %s\n", err.msg);
    assert_non_null(f);
    randomise(m, "fz/", 0.4f);
    assert_int_equal(check_grads(m, "fz/"), 6);
    assert_int_equal(pr_model_set_trainable(m, "h.1.ln_2.weight", 1, &err), PR_OK);
    assert_int_equal(pr_model_set_trainable(m, "h.1.mlp.c_fc.weight", 1, &err), PR_OK);
    assert_int_equal(check_grads(m, "h.1.ln_2.weight"), 1);
    assert_int_equal(check_grads(m, "h.1.mlp.c_fc.weight"), 1);
    /* the fused modules' parameters have no gradient */
    assert_null(pr_model_find_tensor(m, "ka/h.0.ffn_out.up_weight")->grad);

    /* saved and filled into a fusion on another model: the same logits */
    char path[400];
    snprintf(path, sizeof path, "%s/fusion.safetensors", workdir);
    assert_int_equal(pr_composite_save(f, path, &err), PR_OK);
    pr_model *m2 = make_model();
    pr_module *kids2[2] = { frozen(m2, "adapter_houlsby", "ka", NULL, 0),
                            frozen(m2, "adapter_parallel", "kb", NULL, 0) };
    randomise(m2, "ka/", 0.3f);
    randomise(m2, "kb/", 0.3f);
    pr_module *f2 = fuse(m2, "other", kids2, 2, &err);
    assert_non_null(f2);
    assert_int_equal(pr_composite_fill(f2, path, &err), PR_OK);
    float *l1 = logits_of(m), *l2 = logits_of(m2);
    assert_true(th_max_abs_diff(l1, l2, (size_t)TB * TT * 64) == 0.0);
    free(l1), free(l2);
    /* detaching the fusion takes its fused modules along */
    pr_module_detach(f2);
    assert_int_equal(pr_model_n_modules(m2), 0);
    assert_null(pr_model_find_tensor(m2, "ka/h.0.ffn_out.up_weight"));
    pr_model_free(m2);
    pr_model_free(m);
}

/* ---- pipelines ----------------------------------------------------------------------------------- */

static const char model_yaml[] =
    "model:\n"
    "  config: {n_layers: 2, d_model: 32, n_heads: 2, d_ff: 64, vocab: 256, max_seq: 48}\n"
    "  seed: 3\n";

static const char task_yaml[] =
    "task:\n"
    "  type: lm\n"
    "  train: " CORPUS "\n"
    "  val_fraction: 0.1\n";

static void write_pipeline(const char *path, const char *modules, const char *train)
{
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fprintf(f, "%s%s%s%s", model_yaml, modules, task_yaml, train);
    fclose(f);
}

/* The run's pipeline.yaml (pr_pipeline_save_run) rebuilds a model with
 * the trained one's logits, bit for bit. */
static void check_snapshot(const pr_pipeline *p, pr_model *m, const pr_train_result *res, const char *out)
{
    pr_error err = { 0 };
    int rc = pr_pipeline_save_run(p, m, res, &err);
    if (rc)
        fprintf(stderr, "%s\n", err.msg);
    assert_int_equal(rc, PR_OK);
    char snap[500];
    snprintf(snap, sizeof snap, "%s/pipeline.yaml", out);
    pr_pipeline *ps = NULL;
    pr_model *ms = NULL;
    pr_tokenizer *ts = NULL;
    rc = pr_pipeline_load(snap, NULL, 0, reg, &ps, &err);
    if (rc)
        fprintf(stderr, "%s\n", err.msg);
    assert_int_equal(rc, PR_OK);
    rc = pr_pipeline_build(ps, &ms, &ts, &err);
    if (rc)
        fprintf(stderr, "%s\n", err.msg);
    assert_int_equal(rc, PR_OK);
    assert_int_equal(pr_model_n_modules(ms), pr_model_n_modules(m));
    pr_model_set_training(m, 0);
    pr_model_set_training(ms, 0);
    assert_int_equal(pr_model_reserve(m, TB, TT, &err), PR_OK);
    assert_int_equal(pr_model_reserve(ms, TB, TT, &err), PR_OK);
    float *l1 = logits_of(m), *l2 = logits_of(ms);
    assert_true(th_max_abs_diff(l1, l2, (size_t)TB * TT * 256) == 0.0);
    free(l1), free(l2);
    pr_model_free(ms);
    pr_tokenizer_free(ts);
    pr_pipeline_free(ps);
}

static const char train_yaml[] =
    "train:\n"
    "  steps: 40\n"
    "  batch: 4\n"
    "  seq_len: 32\n"
    "  lr: 1e-2\n"
    "  schedule: constant\n"
    "  eval_batches: 4\n"
    "  log_every: 0\n";

/* Load, build, train; the plan counted what was built; the validation
 * loss falls.  Returns the model for more checks (caller frees). */
static pr_model *train_pipeline(const char *file, const char *out, pr_pipeline **pp, pr_tokenizer **tp,
                                pr_train_result *res)
{
    char set_out[512];
    snprintf(set_out, sizeof set_out, "train.output=%s", out);
    const char *sets[] = { set_out };
    pr_pipeline *p = NULL;
    pr_error err = { 0 };
    int rc = pr_pipeline_load(file, sets, 1, reg, &p, &err);
    if (rc)
        fprintf(stderr, "%s\n", err.msg);
    assert_int_equal(rc, PR_OK);
    pr_model *m = NULL;
    pr_tokenizer *tok = NULL;
    rc = pr_pipeline_build(p, &m, &tok, &err);
    if (rc)
        fprintf(stderr, "%s\n", err.msg);
    assert_int_equal(rc, PR_OK);
    int64_t trainable = 0;
    for (int i = 0; i < pr_model_n_tensors(m); i++)
        if (pr_model_tensor(m, i)->trainable)
            trainable += pr_model_tensor(m, i)->numel;
    pr_pipeline_counts c;
    assert_int_equal(pr_pipeline_counts_get(p, &c, &err), PR_OK);
    assert_int_equal(c.trainable, trainable);
    assert_int_equal(c.all, pr_model_param_count(m));
    pr_train_config tc;
    pr_pipeline_train_config(p, &tc);
    tc.quiet = 1;
    rc = pr_train(m, tok, &tc, res, &err);
    if (rc)
        fprintf(stderr, "%s\n", err.msg);
    assert_int_equal(rc, PR_OK);
    fprintf(stderr, "%s: val %.4f -> %.4f, train %.4f -> %.4f\n", strrchr(file, '/') + 1, res->initial_val_loss,
            res->final_val_loss, res->first_train_loss, res->final_train_loss);
    assert_true(res->final_val_loss < res->initial_val_loss - 0.05);
    *pp = p;
    *tp = tok;
    return m;
}

static void train_and_free(const char *name, const char *modules)
{
    char file[400], out[400];
    snprintf(file, sizeof file, "%s/%s.yaml", workdir, name);
    snprintf(out, sizeof out, "%s/run_%s", workdir, name);
    write_pipeline(file, modules, train_yaml);
    pr_pipeline *p;
    pr_tokenizer *tok;
    pr_train_result res;
    pr_model *m = train_pipeline(file, out, &p, &tok, &res);
    pr_model_free(m);
    pr_tokenizer_free(tok);
    pr_pipeline_free(p);
}

/* prompt tuning + LoRA + a Houlsby adapter in one model */
static void test_pipeline_composed(void **state)
{
    (void)state;
    train_and_free("composed", "modules:\n"
                               "  - {technique: prompt_tuning, options: {n_tokens: 4}}\n"
                               "  - {technique: lora, sites: [q, v], options: {r: 4, alpha: 8}}\n"
                               "  - {technique: adapter_houlsby, options: {m: 8}}\n");
}

/* MAM adapter (He et al. 2022): prefix tuning + a parallel adapter */
static void test_pipeline_mam(void **state)
{
    (void)state;
    train_and_free("mam", "modules:\n"
                          "  - {technique: prefix_tuning, options: {n_tokens: 4}}\n"
                          "  - {technique: adapter_parallel, options: {m: 8}}\n");
}

/* UniPELT (Mao et al. 2022): a Houlsby adapter after the FFN, prefix
 * tuning and LoRA on q and v, each behind learned gates that train. */
static void test_pipeline_unipelt(void **state)
{
    (void)state;
    char file[400], out[400];
    snprintf(file, sizeof file, "%s/unipelt.yaml", workdir);
    snprintf(out, sizeof out, "%s/run_unipelt", workdir);
    write_pipeline(file,
                   "modules:\n"
                   "  - {technique: adapter_houlsby, sites: ffn_out, options: {m: 8}, gate: true}\n"
                   "  - {technique: prefix_tuning, options: {n_tokens: 4}, gate: true}\n"
                   "  - {technique: lora, sites: [q, v], options: {r: 4, alpha: 8}, gate: true}\n",
                   train_yaml);
    pr_pipeline *p;
    pr_tokenizer *tok;
    pr_train_result res;
    pr_model *m = train_pipeline(file, out, &p, &tok, &res);
    /* 2 + 4 + 4 gates, every one moved from 0 */
    assert_int_equal(count_suffix(m, "", ".gate"), 10);
    assert_non_null(pr_model_find_tensor(m, "lora/h.1.v.gate"));
    for (int i = 0; i < pr_model_n_tensors(m); i++) {
        const pr_tensor_info *t = pr_model_tensor(m, i);
        size_t l = strlen(t->name);
        if (l > 5 && strcmp(t->name + l - 5, ".gate") == 0) {
            assert_true(t->trainable);
            assert_true(t->data[0] != 0.0f);
        }
    }
    const pr_module_plan *pl = pr_pipeline_module_plan(p, 2);
    assert_non_null(pl);
    assert_int_equal(pl->trainable, 2 * (4 * (32 + 32) * 2) + 4);
    /* saved with their gates, the modules load gated again */
    check_snapshot(p, m, &res, out);
    pr_model_free(m);
    pr_tokenizer_free(tok);
    pr_pipeline_free(p);
}

static float *copy_prefix(const pr_model *m, const char *prefix, size_t *n)
{
    size_t len = strlen(prefix), total = 0, off = 0;
    for (int i = 0; i < pr_model_n_tensors(m); i++)
        if (strncmp(pr_model_tensor(m, i)->name, prefix, len) == 0)
            total += (size_t)pr_model_tensor(m, i)->numel;
    float *c = malloc((total ? total : 1) * sizeof *c);
    assert_non_null(c);
    for (int i = 0; i < pr_model_n_tensors(m); i++) {
        const pr_tensor_info *t = pr_model_tensor(m, i);
        if (strncmp(t->name, prefix, len) == 0) {
            memcpy(c + off, t->data, (size_t)t->numel * sizeof *c);
            off += (size_t)t->numel;
        }
    }
    *n = total;
    return c;
}

/* Two saved adapters fused: the fusion trains, the adapters' values stay
 * bit for bit, and the run's pipeline.yaml rebuilds the same model. */
static void test_pipeline_fuse(void **state)
{
    (void)state;
    char file[400], out[400], a_path[400], b_path[400];
    /* two adapters at ffn_out, saved against the pipeline's base model */
    snprintf(file, sizeof file, "%s/adapters.yaml", workdir);
    write_pipeline(file,
                   "modules:\n"
                   "  - {technique: adapter_houlsby, name: ada, sites: ffn_out, options: {m: 8}, seed: 1}\n"
                   "  - {technique: adapter_parallel, name: adb, options: {m: 8}, seed: 2}\n",
                   train_yaml);
    pr_pipeline *p = NULL;
    pr_error err = { 0 };
    assert_int_equal(pr_pipeline_load(file, NULL, 0, reg, &p, &err), PR_OK);
    pr_model *m = NULL;
    pr_tokenizer *tok = NULL;
    assert_int_equal(pr_pipeline_build(p, &m, &tok, &err), PR_OK);
    randomise(m, "ada/", 0.2f);
    randomise(m, "adb/", 0.2f);
    snprintf(a_path, sizeof a_path, "%s/ada.safetensors", workdir);
    snprintf(b_path, sizeof b_path, "%s/adb.safetensors", workdir);
    assert_int_equal(pr_module_save(pr_model_module(m, 0), a_path, NULL, &err), PR_OK);
    assert_int_equal(pr_module_save(pr_model_module(m, 1), b_path, NULL, &err), PR_OK);
    pr_model_free(m);
    pr_tokenizer_free(tok);
    pr_pipeline_free(p);

    snprintf(file, sizeof file, "%s/fuse.yaml", workdir);
    snprintf(out, sizeof out, "%s/run_fuse", workdir);
    char modules[1200];
    snprintf(modules, sizeof modules, "modules:\n  - {fuse: [%s, %s], name: fz, technique: adapter_fusion}\n", a_path, b_path);
    write_pipeline(file, modules, train_yaml);
    pr_train_result res;
    pr_model *mf = NULL;
    pr_pipeline *pf = NULL;
    pr_pipeline *pl = NULL;
    assert_int_equal(pr_pipeline_load(file, NULL, 0, reg, &pl, &err), PR_OK);
    assert_int_equal(pr_pipeline_build(pl, &mf, &tok, &err), PR_OK);
    size_t na = 0, nb = 0;
    float *a0 = copy_prefix(mf, "fz.0/", &na), *b0 = copy_prefix(mf, "fz.1/", &nb);
    assert_true(na > 0 && nb > 0);
    pr_model_free(mf);
    pr_tokenizer_free(tok);
    pr_pipeline_free(pl);

    mf = train_pipeline(file, out, &pf, &tok, &res);
    assert_int_equal(pr_model_n_modules(mf), 1);
    size_t na1 = 0, nb1 = 0;
    float *a1 = copy_prefix(mf, "fz.0/", &na1), *b1 = copy_prefix(mf, "fz.1/", &nb1);
    assert_int_equal(na1, na);
    assert_int_equal(nb1, nb);
    assert_memory_equal(a0, a1, na * sizeof(float));
    assert_memory_equal(b0, b1, nb * sizeof(float));
    /* the run as a pipeline: the fused files and the trained fusion */
    check_snapshot(pf, mf, &res, out);
    free(a0), free(b0), free(a1), free(b1);
    pr_model_free(mf);
    pr_tokenizer_free(tok);
    pr_pipeline_free(pf);
}

/* ---- SIGKILL and resume through a pipeline with modules ----------------------------------------- */

/* peftref train PIPE to completion, or killed once a second checkpoint
 * is written; returns the stdout text.  The pipeline's LoRA has dropout:
 * its masks follow the step (pr_model_set_step), across the resume. */
static void run_cli_train(const char *pipe_file, const char *out, int resume, int kill_after_ckpt, char *text,
                          size_t size)
{
    char ckpt[500], set_out[500];
    snprintf(ckpt, sizeof ckpt, "%s/checkpoint.safetensors", out);
    snprintf(set_out, sizeof set_out, "train.output=%s", out);
    int fds[2];
    assert_int_equal(pipe(fds), 0);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        dup2(fds[1], 1);
        close(fds[0]);
        int devnull = open("/dev/null", O_WRONLY);
        dup2(devnull, 2);
        setenv("PEFTREF_PLUGIN_PATH", PLUGINS, 1);
        execl(PEFTREF_BIN, "peftref", "train", pipe_file, "--set", set_out, "--quiet", resume ? "--resume" : NULL,
              (char *)NULL);
        _exit(127);
    }
    close(fds[1]);
    if (kill_after_ckpt) {
        struct stat st;
        long long first = 0;
        for (int i = 0; i < 40000; i++) {
            if (stat(ckpt, &st) == 0) {
                long long t = (long long)st.st_mtim.tv_sec * 1000000000LL + st.st_mtim.tv_nsec;
                if (!first)
                    first = t;
                else if (t != first)
                    break;
            }
            usleep(500);
        }
        kill(pid, SIGKILL);
    }
    size_t n = 0;
    ssize_t k;
    while ((k = read(fds[0], text + n, size - 1 - n)) > 0)
        n += (size_t)k;
    text[n] = '\0';
    close(fds[0]);
    int status;
    waitpid(pid, &status, 0);
    if (!kill_after_ckpt) {
        assert_true(WIFEXITED(status));
        assert_int_equal(WEXITSTATUS(status), 0);
    }
}

static void final_losses(const char *text, char *train, char *val)
{
    const char *s = strstr(text, "steps 24 ");
    assert_non_null(s);
    const char *t = strstr(s, "train_loss"), *v = strstr(s, "val_loss");
    assert_non_null(t);
    assert_non_null(v);
    assert_int_equal(sscanf(strstr(t, "-> ") + 3, "%31s", train), 1);
    assert_int_equal(sscanf(strstr(v, "-> ") + 3, "%31s", val), 1);
}

static void test_pipeline_sigkill_resume(void **state)
{
    (void)state;
    char file[400], a[400], b[400];
    static char full[8192], killed[8192], resumed[8192];
    snprintf(file, sizeof file, "%s/resume.yaml", workdir);
    write_pipeline(file,
                   "modules:\n"
                   "  - {technique: prompt_tuning, options: {n_tokens: 2}}\n"
                   "  - {technique: lora, sites: [q, v], options: {r: 4, alpha: 8, dropout: 0.1}}\n"
                   "  - {technique: adapter_houlsby, options: {m: 8}, gate: true}\n",
                   "train:\n  steps: 24\n  batch: 4\n  seq_len: 32\n  lr: 3e-3\n  warmup: 2\n"
                   "  checkpoint_every: 4\n  eval_every: 8\n  eval_batches: 4\n  log_every: 0\n");
    snprintf(a, sizeof a, "%s/straight", workdir);
    snprintf(b, sizeof b, "%s/killed", workdir);
    run_cli_train(file, a, 0, 0, full, sizeof full);
    run_cli_train(file, b, 0, 1, killed, sizeof killed);
    assert_null(strstr(killed, "steps 24 "));  /* it really was killed early */
    run_cli_train(file, b, 1, 0, resumed, sizeof resumed);
    char ft[32], fv[32], rt[32], rv[32];
    final_losses(full, ft, fv);
    final_losses(resumed, rt, rv);
    fprintf(stderr, "uninterrupted: train %s val %s; resumed: train %s val %s\n", ft, fv, rt, rv);
    assert_string_equal(ft, rt);
    assert_string_equal(fv, rv);
}

/* ---- setup ---------------------------------------------------------------------------------------- */

static void remove_tree(const char *dir)
{
    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    if (system(cmd) != 0)
        fprintf(stderr, "could not remove %s\n", dir);
}

static int setup(void **state)
{
    (void)state;
    if (th_registry_open(PLUGINS, NULL, 0, &reg))
        return -1;
    snprintf(workdir, sizeof workdir, "/tmp/peftref_compose_XXXXXX");
    if (!mkdtemp(workdir))
        return -1;
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    pr_registry_free(reg);
    remove_tree(workdir);
    return 0;
}

int main(int argc, char **argv)
{
    (void)argc;
    /* passive OpenMP waiting, as the program itself runs */
    runtime_reexec_if_needed(argv);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_parallel_modules_sum),
        cmocka_unit_test(test_sequential_modules_stack),
        cmocka_unit_test(test_concatenations_append),
        cmocka_unit_test(test_gate_scaled_add),
        cmocka_unit_test(test_gate_direct_add_sequential),
        cmocka_unit_test(test_gate_parallel_adapter),
        cmocka_unit_test(test_gate_rescale),
        cmocka_unit_test(test_gate_prefix),
        cmocka_unit_test(test_gate_prompt),
        cmocka_unit_test(test_gate_custom),
        cmocka_unit_test(test_gate_weight_delta),
        cmocka_unit_test(test_gate_plan_identity_merge),
        cmocka_unit_test(test_fusion_errors),
        cmocka_unit_test(test_fusion_starts_at_mean),
        cmocka_unit_test(test_fusion_gradients),
        cmocka_unit_test(test_pipeline_composed),
        cmocka_unit_test(test_pipeline_mam),
        cmocka_unit_test(test_pipeline_unipelt),
        cmocka_unit_test(test_pipeline_fuse),
        cmocka_unit_test(test_pipeline_sigkill_resume),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
