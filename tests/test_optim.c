/* AdamW (core/train/optim.h) against a double-precision scalar reference, and the
 * learning-rate schedules (core/train/schedule.h) against their formulas. */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <math.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "optim.h"
#include "rng.h"
#include "schedule.h"

/* ---- reference ------------------------------------------------------------ */

/* One AdamW step on n scalars in double, written from the paper's
 * Algorithm 2 with the decay scaled by lr (as documented in optim.h). */
static void ref_adamw(double *p, double *m, double *v, const double *g, size_t n, long t,
                      double lr, double b1, double b2, double eps, double wd)
{
    for (size_t i = 0; i < n; i++) {
        m[i] = b1 * m[i] + (1.0 - b1) * g[i];
        v[i] = b2 * v[i] + (1.0 - b2) * g[i] * g[i];
        double mhat = m[i] / (1.0 - pow(b1, (double)t));
        double vhat = v[i] / (1.0 - pow(b2, (double)t));
        double decay = lr * wd * p[i];
        p[i] = p[i] - lr * mhat / (sqrt(vhat) + eps) - decay;
    }
}

static void assert_close(double got, double want, double abs_tol, double rel_tol)
{
    double tol = abs_tol + rel_tol * fabs(want);
    if (!(fabs(got - want) <= tol))
        fail_msg("got %.9g, want %.9g (tolerance %.3g)", got, want, tol);
}

static double naive_norm(float *const *grads, const size_t *ns, int k)
{
    double s = 0.0;
    for (int j = 0; j < k; j++)
        for (size_t i = 0; i < ns[j]; i++)
            s += (double)grads[j][i] * (double)grads[j][i];
    return sqrt(s);
}

/* ---- AdamW ---------------------------------------------------------------- */

/* Five steps on a decayed matrix and an undecayed vector, compared element
 * by element with the double reference: params within 1e-6 absolute (they
 * are O(1)), moments within 1e-5 relative. */
static void test_adamw_matches_reference(void **state)
{
    (void)state;
    enum { NW = 6, NB = 3, STEPS = 5 };
    float w[NW], gw[NW], b[NB], gb[NB];
    double rw[NW], rmw[NW] = {0}, rvw[NW] = {0}, rb[NB], rmb[NB] = {0}, rvb[NB] = {0};
    double dgw[NW], dgb[NB];
    for (int i = 0; i < NW; i++)
        rw[i] = w[i] = 0.5f - 0.17f * (float)i;
    for (int i = 0; i < NB; i++)
        rb[i] = b[i] = 0.25f * (float)i - 0.3f;

    optim_config cfg = {.beta1 = 0.9f, .beta2 = 0.95f, .eps = 1e-8f, .weight_decay = 0.1f};
    optim_segment segs[2] = {{"w", w, gw, NW, 1}, {"b", b, gb, NB, 0}};
    optim_group grp = {segs, 2, 1.0f, OPTIM_WD_DEFAULT};
    optim o;
    pr_error err;
    assert_int_equal(optim_init(&o, &cfg, &grp, 1, &err), PR_OK);

    const float lr = 1e-2f;
    for (int t = 1; t <= STEPS; t++) {
        for (int i = 0; i < NW; i++)
            dgw[i] = gw[i] = sinf(0.7f * (float)i + (float)t);
        for (int i = 0; i < NB; i++)
            dgb[i] = gb[i] = 0.1f * cosf(1.3f * (float)i - (float)t);
        assert_int_equal(optim_step(&o, lr, &err), PR_OK);
        ref_adamw(rw, rmw, rvw, dgw, NW, t, lr, 0.9f, 0.95f, 1e-8f, 0.1f);
        ref_adamw(rb, rmb, rvb, dgb, NB, t, lr, 0.9f, 0.95f, 1e-8f, 0.0);
    }
    assert_int_equal(optim_get_t(&o), STEPS);
    for (int i = 0; i < NW; i++) {
        assert_close(w[i], rw[i], 1e-6, 0);
        assert_close(o.segs[0].m[i], rmw[i], 1e-9, 1e-5);
        assert_close(o.segs[0].v[i], rvw[i], 1e-12, 1e-5);
    }
    for (int i = 0; i < NB; i++) {
        assert_close(b[i], rb[i], 1e-6, 0);
        assert_close(o.segs[1].m[i], rmb[i], 1e-9, 1e-5);
        assert_close(o.segs[1].v[i], rvb[i], 1e-12, 1e-5);
    }
    optim_free(&o);
}

/* Bias correction: at t = 1, m_hat = g and v_hat = g^2, so each element
 * moves by lr against its gradient whatever the gradient's scale (within
 * 1e-4 relative; eps = 1e-8 contributes at most 1e-5 for |g| >= 1e-3). */
static void test_first_step_moves_by_lr(void **state)
{
    (void)state;
    enum { N = 6 };
    const float g0[N] = {1e-3f, -2e-2f, 0.5f, -3.0f, 40.0f, -100.0f};
    float p[N] = {0}, g[N];
    memcpy(g, g0, sizeof g);
    optim_config cfg;
    optim_config_default(&cfg);
    optim_segment seg = {"x", p, g, N, 0};
    optim_group grp = {&seg, 1, 1.0f, OPTIM_WD_DEFAULT};
    optim o;
    assert_int_equal(optim_init(&o, &cfg, &grp, 1, NULL), PR_OK);
    const float lr = 3e-4f;
    assert_int_equal(optim_step(&o, lr, NULL), PR_OK);
    for (int i = 0; i < N; i++)
        assert_close(p[i], g0[i] > 0 ? -lr : lr, 0, 1e-4);
    /* gradients are read, not cleared */
    assert_memory_equal(g, g0, sizeof g);
    optim_free(&o);
}

/* With zero gradients the Adam term is exactly 0, leaving only the decay:
 * p *= 1 - lr*mult*lambda for decay = 1 segments (1e-7 relative), and
 * decay = 0 segments bit-for-bit unchanged.  The second group overrides
 * the config's lambda. */
static void test_decay_only_where_flagged(void **state)
{
    (void)state;
    float w[4] = {1.0f, -2.0f, 0.5f, 3.0f}, bias[4], w2[4], g[4] = {0}, g2[4] = {0}, g3[4] = {0};
    memcpy(bias, w, sizeof w);
    memcpy(w2, w, sizeof w);
    optim_config cfg;
    optim_config_default(&cfg);
    cfg.weight_decay = 0.5f;
    optim_segment s1[2] = {{"w", w, g, 4, 1}, {"bias", bias, g2, 4, 0}};
    optim_segment s2[1] = {{"w2", w2, g3, 4, 1}};
    optim_group grp[2] = {{s1, 2, 1.0f, OPTIM_WD_DEFAULT}, {s2, 1, 2.0f, 0.25f}};
    optim o;
    assert_int_equal(optim_init(&o, &cfg, grp, 2, NULL), PR_OK);
    const float lr = 0.1f;
    const float w0[4] = {1.0f, -2.0f, 0.5f, 3.0f};
    for (int step = 1; step <= 3; step++) {
        assert_int_equal(optim_step(&o, lr, NULL), PR_OK);
        for (int i = 0; i < 4; i++) {
            assert_close(w[i], w0[i] * pow(1.0 - 0.1 * 0.5, step), 0, 1e-6);
            assert_close(w2[i], w0[i] * pow(1.0 - 0.1 * 2.0 * 0.25, step), 0, 1e-6);
        }
        assert_memory_equal(bias, w0, sizeof w0);
    }
    optim_free(&o);
}

/* Per-group learning rate: identical params and gradients in two groups
 * with multipliers 1 and 0.25 move 4:1 (1e-5 relative) and each matches
 * the reference at its own rate. */
static void test_group_lr_multiplier(void **state)
{
    (void)state;
    enum { N = 5 };
    float a[N], b[N], ga[N], gb[N];
    double ra[N], rb[N], ma[N] = {0}, va[N] = {0}, mb[N] = {0}, vb[N] = {0}, dg[N];
    for (int i = 0; i < N; i++) {
        ra[i] = rb[i] = a[i] = b[i] = 0.1f * (float)(i + 1);
        dg[i] = ga[i] = gb[i] = 0.3f - 0.2f * (float)i;
    }
    optim_config cfg;
    optim_config_default(&cfg);
    optim_segment sa = {"a", a, ga, N, 1}, sb = {"b", b, gb, N, 1};
    optim_group grp[2] = {{&sa, 1, 1.0f, OPTIM_WD_DEFAULT}, {&sb, 1, 0.25f, OPTIM_WD_DEFAULT}};
    optim o;
    assert_int_equal(optim_init(&o, &cfg, grp, 2, NULL), PR_OK);
    const float lr = 1e-3f;
    assert_int_equal(optim_step(&o, lr, NULL), PR_OK);
    ref_adamw(ra, ma, va, dg, N, 1, lr, 0.9f, 0.999f, 1e-8f, 0.01f);
    ref_adamw(rb, mb, vb, dg, N, 1, 0.25 * lr, 0.9f, 0.999f, 1e-8f, 0.01f);
    for (int i = 0; i < N; i++) {
        double p0 = 0.1f * (float)(i + 1);
        assert_close(a[i], ra[i], 1e-7, 0);
        assert_close(b[i], rb[i], 1e-7, 0);
        assert_close((double)b[i] - p0, 0.25 * ((double)a[i] - p0), 0, 1e-4);
    }
    optim_free(&o);
}

/* Global norm over segments of several chunks (one larger than the
 * parallel threshold) equals a naive double sum within 1e-12 relative;
 * with OpenMP, 1 and 2 threads give bit-identical norms. */
static void test_grad_norm(void **state)
{
    (void)state;
    size_t ns[3] = {7, 70001, 16384 * 2 + 5};
    float *p[3], *g[3];
    optim_segment segs[3];
    pr_rng r;
    rng_seed(&r, 42);
    const char *names[3] = {"s0", "s1", "s2"};
    for (int j = 0; j < 3; j++) {
        p[j] = calloc(ns[j], sizeof(float));
        g[j] = malloc(ns[j] * sizeof(float));
        assert_non_null(p[j]);
        assert_non_null(g[j]);
        for (size_t i = 0; i < ns[j]; i++)
            g[j][i] = rng_normal(&r) * (j == 0 ? 100.0f : 1e-2f);
        segs[j] = (optim_segment){names[j], p[j], g[j], ns[j], 1};
    }
    optim_config cfg;
    optim_config_default(&cfg);
    optim_group grp = {segs, 3, 1.0f, OPTIM_WD_DEFAULT};
    optim o;
    assert_int_equal(optim_init(&o, &cfg, &grp, 1, NULL), PR_OK);
    double want = naive_norm(g, ns, 3);
    double got = optim_grad_norm(&o);
    assert_close(got, want, 0, 1e-12);
#ifdef _OPENMP
    int saved = omp_get_max_threads();
    omp_set_num_threads(1);
    double one = optim_grad_norm(&o);
    omp_set_num_threads(2);
    double two = optim_grad_norm(&o);
    omp_set_num_threads(saved);
    assert_memory_equal(&one, &two, sizeof one);
#endif
    optim_zero_grad(&o);
    assert_true(optim_grad_norm(&o) == 0.0);
    optim_free(&o);
    for (int j = 0; j < 3; j++) {
        free(p[j]);
        free(g[j]);
    }
}

/* Clipping: above max the returned value is the pre-clip norm and the
 * norm afterwards equals max within 1e-6 relative; at or below max the
 * gradients are bit-for-bit unchanged. */
static void test_clip(void **state)
{
    (void)state;
    enum { NA = 100, NB = 37 };
    float pa[NA] = {0}, pb[NB] = {0}, ga[NA], gb[NB], keep_a[NA], keep_b[NB];
    pr_rng r;
    rng_seed(&r, 7);
    for (int i = 0; i < NA; i++)
        ga[i] = rng_normal(&r);
    for (int i = 0; i < NB; i++)
        gb[i] = 5.0f * rng_normal(&r);
    optim_segment segs[2] = {{"a", pa, ga, NA, 1}, {"b", pb, gb, NB, 0}};
    optim_config cfg;
    optim_config_default(&cfg);
    optim_group grp = {segs, 2, 1.0f, OPTIM_WD_DEFAULT};
    optim o;
    assert_int_equal(optim_init(&o, &cfg, &grp, 1, NULL), PR_OK);
    float *gs[2] = {ga, gb};
    size_t ns[2] = {NA, NB};
    double norm0 = naive_norm(gs, ns, 2);
    assert_true(norm0 > 10.0);

    memcpy(keep_a, ga, sizeof ga);
    memcpy(keep_b, gb, sizeof gb);
    double ret = optim_clip(&o, 2.0 * norm0);
    assert_close(ret, norm0, 0, 1e-12);
    assert_close(o.last_norm, norm0, 0, 1e-12);
    assert_memory_equal(ga, keep_a, sizeof ga);
    assert_memory_equal(gb, keep_b, sizeof gb);

    const double max = 1.0;
    ret = optim_clip(&o, max);
    assert_close(ret, norm0, 0, 1e-12);
    assert_close(naive_norm(gs, ns, 2), max, 0, 1e-6);
    /* direction kept: every element scaled by the same factor */
    for (int i = 0; i < NA; i++)
        assert_close(ga[i], keep_a[i] * (max / norm0), 1e-12, 1e-6);
    optim_free(&o);
}

/* The first non-finite gradient is named with its index; none -> NULL;
 * the norm is then non-finite and clipping leaves gradients alone. */
static void test_nonfinite(void **state)
{
    (void)state;
    float p1[3] = {0}, g1[3] = {1, 2, 3}, p2[20000] = {0}, *g2 = calloc(20000, sizeof(float));
    float p3[2] = {0}, g3[2] = {0};
    assert_non_null(g2);
    optim_segment segs[3] = {{"first", p1, g1, 3, 1}, {"second", p2, g2, 20000, 1},
                             {"third", p3, g3, 2, 0}};
    optim_config cfg;
    optim_config_default(&cfg);
    optim_group grp = {segs, 3, 1.0f, OPTIM_WD_DEFAULT};
    optim o;
    assert_int_equal(optim_init(&o, &cfg, &grp, 1, NULL), PR_OK);
    size_t idx = 99;
    assert_null(optim_nonfinite_grad(&o, &idx));
    g2[17000] = INFINITY;
    g3[1] = NAN;
    const char *name = optim_nonfinite_grad(&o, &idx);
    assert_non_null(name);
    assert_string_equal(name, "second");
    assert_int_equal(idx, 17000);
    assert_false(isfinite(optim_grad_norm(&o)));
    optim_clip(&o, 1.0);
    assert_true(g1[2] == 3.0f);
    g2[17000] = 0.0f;
    name = optim_nonfinite_grad(&o, &idx);
    assert_non_null(name);
    assert_string_equal(name, "third");
    assert_int_equal(idx, 1);
    optim_free(&o);
    free(g2);
}

/* The state block is m of every segment in order, then v; segment views
 * point into it. */
static void test_state_block_layout(void **state)
{
    (void)state;
    float a[3], b[5], c[2], ga[3] = {1, 1, 1}, gb[5] = {2, 2, 2, 2, 2}, gc[2] = {3, 3};
    optim_segment s1[2] = {{"a", a, ga, 3, 1}, {"b", b, gb, 5, 0}};
    optim_segment s2[1] = {{"c", c, gc, 2, 1}};
    optim_group grp[2] = {{s1, 2, 1.0f, OPTIM_WD_DEFAULT}, {s2, 1, 1.0f, OPTIM_WD_DEFAULT}};
    optim_config cfg;
    optim_config_default(&cfg);
    optim o;
    assert_int_equal(optim_init(&o, &cfg, grp, 2, NULL), PR_OK);
    float *m, *v;
    size_t n;
    optim_state_block(&o, &m, &v, &n);
    assert_int_equal(n, 10);
    assert_ptr_equal(v, m + 10);
    assert_ptr_equal(o.segs[1].m, m + 3);
    assert_ptr_equal(o.segs[2].v, v + 8);
    assert_int_equal(o.segs[2].group, 1);
    assert_int_equal(optim_step(&o, 1e-3f, NULL), PR_OK);
    /* after one step m = (1 - beta1) g */
    assert_close(m[4], (1.0 - (double)0.9f) * 2.0, 0, 1e-6);
    assert_close(m[9], (1.0 - (double)0.9f) * 3.0, 0, 1e-6);
    assert_close(v[9], (1.0 - (double)0.999f) * 9.0, 0, 1e-6);
    assert_int_equal(optim_set_t(&o, 41, NULL), PR_OK);
    assert_int_equal(optim_get_t(&o), 41);
    assert_int_equal(optim_set_t(&o, -1, NULL), PR_ERR_INVALID);
    optim_free(&o);
}

static void test_init_errors(void **state)
{
    (void)state;
    float p[2], g[2];
    optim_config cfg;
    optim_config_default(&cfg);
    pr_error err;
    optim o;

    optim_segment dup[2] = {{"x", p, g, 2, 1}, {"x", p, g, 2, 1}};
    optim_group grp = {dup, 2, 1.0f, OPTIM_WD_DEFAULT};
    assert_int_equal(optim_init(&o, &cfg, &grp, 1, &err), PR_ERR_INVALID);
    assert_non_null(strstr(err.msg, "'x'"));
    optim_free(&o);

    optim_segment dup2a = {"y", p, g, 2, 1}, dup2b = {"y", p, g, 2, 0};
    optim_group grp2[2] = {{&dup2a, 1, 1.0f, OPTIM_WD_DEFAULT}, {&dup2b, 1, 1.0f, 0.0f}};
    assert_int_equal(optim_init(&o, &cfg, grp2, 2, &err), PR_ERR_INVALID);
    assert_non_null(strstr(err.msg, "'y'"));

    optim_segment empty = {"e", p, g, 0, 1};
    grp = (optim_group){&empty, 1, 1.0f, OPTIM_WD_DEFAULT};
    assert_int_equal(optim_init(&o, &cfg, &grp, 1, &err), PR_ERR_INVALID);
    assert_non_null(strstr(err.msg, "'e'"));

    optim_segment ok = {"ok", p, g, 2, 1};
    grp = (optim_group){&ok, 1, -1.0f, OPTIM_WD_DEFAULT};
    assert_int_equal(optim_init(&o, &cfg, &grp, 1, &err), PR_ERR_INVALID);

    grp = (optim_group){&ok, 1, 1.0f, OPTIM_WD_DEFAULT};
    cfg.beta2 = 1.0f;
    assert_int_equal(optim_init(&o, &cfg, &grp, 1, &err), PR_ERR_INVALID);
    assert_non_null(strstr(err.msg, "beta2"));
    optim_config_default(&cfg);

    assert_int_equal(optim_init(&o, &cfg, &grp, 1, &err), PR_OK);
    assert_int_equal(optim_step(&o, NAN, &err), PR_ERR_INVALID);
    assert_int_equal(optim_step(&o, -1e-3f, &err), PR_ERR_INVALID);
    assert_int_equal(optim_get_t(&o), 0);
    optim_free(&o);
}

static void test_default_decay(void **state)
{
    (void)state;
    assert_int_equal(optim_default_decay("h.0.attn.c_attn.bias", 1), 0);
    assert_int_equal(optim_default_decay("ln_f.weight", 1), 0);
    assert_int_equal(optim_default_decay("ia3.scale", 1), 0);
    assert_int_equal(optim_default_decay("gate", 0), 0);
    assert_int_equal(optim_default_decay("lora_A", 2), 1);
    assert_int_equal(optim_default_decay("wte", 2), 1);
    assert_int_equal(optim_default_decay("phm", 3), 1);
}

/* ---- schedules -------------------------------------------------------------- */

/* lr 1e-3, W = 10, S = 110, floor 1e-4: values at chosen steps against
 * the formulas in schedule.h, within float rounding (1e-6 relative). */
static void test_schedule_values(void **state)
{
    (void)state;
    const double lr = 1e-3, lo = 1e-4;
    sched_config c = {SCHED_COSINE, 1e-3f, 10, 110, 0.1f};
    pr_error err;
    for (int kind = SCHED_CONSTANT; kind <= SCHED_COSINE; kind++) {
        c.kind = kind;
        assert_int_equal(sched_validate(&c, &err), PR_OK);
        /* warmup is the same for every kind */
        assert_close(sched_lr(&c, 0), lr / 10, 0, 1e-6);
        assert_close(sched_lr(&c, 4), lr * 5 / 10, 0, 1e-6);
        assert_close(sched_lr(&c, 9), lr, 0, 1e-6);
        assert_close(sched_lr(&c, 10), lr, 0, 1e-6);
    }
    c.kind = SCHED_CONSTANT;
    assert_close(sched_lr(&c, 60), lr, 0, 1e-6);
    assert_close(sched_lr(&c, 100000), lr, 0, 1e-6);

    c.kind = SCHED_LINEAR;
    assert_close(sched_lr(&c, 35), lo + (lr - lo) * 0.75, 0, 1e-6);
    assert_close(sched_lr(&c, 60), lo + (lr - lo) * 0.5, 0, 1e-6);
    assert_close(sched_lr(&c, 109), lo + (lr - lo) * 0.01, 0, 1e-6);
    assert_close(sched_lr(&c, 110), lo, 0, 1e-6);
    assert_close(sched_lr(&c, 500), lo, 0, 1e-6);

    c.kind = SCHED_COSINE;
    assert_close(sched_lr(&c, 35), lo + (lr - lo) * (1 + sqrt(0.5)) / 2, 0, 1e-6);
    assert_close(sched_lr(&c, 60), lo + (lr - lo) * 0.5, 0, 1e-6);
    assert_close(sched_lr(&c, 85), lo + (lr - lo) * (1 - sqrt(0.5)) / 2, 0, 1e-6);
    assert_close(sched_lr(&c, 110), lo, 0, 1e-6);
    assert_close(sched_lr(&c, 500), lo, 0, 1e-6);

    /* no warmup: decay starts at lr on step 0; floor 0 reaches 0 */
    sched_config d = {SCHED_COSINE, 2e-4f, 0, 4, 0.0f};
    assert_close(sched_lr(&d, 0), 2e-4, 0, 1e-6);
    assert_close(sched_lr(&d, 2), 1e-4, 0, 1e-6);
    assert_true(sched_lr(&d, 4) == 0.0f);
    /* warmup == total: straight to the floor after warmup */
    sched_config e = {SCHED_LINEAR, 1e-3f, 4, 4, 0.5f};
    assert_int_equal(sched_validate(&e, NULL), PR_OK);
    assert_close(sched_lr(&e, 3), 1e-3, 0, 1e-6);
    assert_close(sched_lr(&e, 4), 5e-4, 0, 1e-6);
}

static void test_schedule_validate(void **state)
{
    (void)state;
    pr_error err;
    sched_config c = {SCHED_COSINE, 1e-3f, 20, 10, 0.0f};
    assert_int_equal(sched_validate(&c, &err), PR_ERR_INVALID);
    assert_non_null(strstr(err.msg, "warmup"));
    c = (sched_config){SCHED_LINEAR, 1e-3f, 0, 0, 0.0f};
    assert_int_equal(sched_validate(&c, &err), PR_ERR_INVALID);
    c = (sched_config){SCHED_CONSTANT, 1e-3f, 5, 0, 0.0f};
    assert_int_equal(sched_validate(&c, &err), PR_OK);
    c = (sched_config){SCHED_COSINE, 1e-3f, 0, 10, 1.5f};
    assert_int_equal(sched_validate(&c, &err), PR_ERR_INVALID);
    assert_non_null(strstr(err.msg, "min_ratio"));

    int kind = -1;
    assert_int_equal(sched_kind_parse("cosine", &kind, &err), PR_OK);
    assert_int_equal(kind, SCHED_COSINE);
    assert_int_equal(sched_kind_parse("linear", &kind, &err), PR_OK);
    assert_int_equal(kind, SCHED_LINEAR);
    assert_int_equal(sched_kind_parse("cosine_with_restarts", &kind, &err), PR_ERR_NOTFOUND);
    assert_non_null(strstr(err.msg, "cosine_with_restarts"));
    assert_string_equal(sched_kind_name(SCHED_CONSTANT), "constant");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_adamw_matches_reference),
        cmocka_unit_test(test_first_step_moves_by_lr),
        cmocka_unit_test(test_decay_only_where_flagged),
        cmocka_unit_test(test_group_lr_multiplier),
        cmocka_unit_test(test_grad_norm),
        cmocka_unit_test(test_clip),
        cmocka_unit_test(test_nonfinite),
        cmocka_unit_test(test_state_block_layout),
        cmocka_unit_test(test_init_errors),
        cmocka_unit_test(test_default_decay),
        cmocka_unit_test(test_schedule_values),
        cmocka_unit_test(test_schedule_validate),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
