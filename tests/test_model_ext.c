/* Tests of what the model offers modules beyond site hooks: positions
 * concatenated at the embedding (prompt tuning) and to a layer's keys and
 * values (prefix tuning), hook reservations, the training flag, tensors
 * added to the table, and views of the frozen projection weights.
 *
 * Model: L=2, C=32, H=4, F=128, V=64, max_seq=16, init_std 0.1 (as in
 * test_model.c); B=2 sequences of T=6 real tokens.  Finite differences
 * use the settings test_model.c justifies: eps 3e-3, a probe fails when
 * |fd - g| > 1e-4 + 5% of max(|g|, |fd|). */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "peftref/peftref.h"
#include "rng.h"
#include "gradcheck.h"
#include "harness.h"

#define FD_EPS 3e-3
#define FD_RTOL 5e-2
#define FD_ATOL 1e-4
#define FD_PROBES 6

enum { TB = 2, TT = 6, TV = 64, TC = 32 };

static pr_model_config small_config(uint64_t seed)
{
    return th_config(&(th_shape){ .L = 2, .C = TC, .H = 4, .Hkv = 4, .hd = 8, .F = 128, .V = TV, .max_seq = 16 }, seed);
}

static pr_model *model_from(const pr_model_config *c, int B, int T)
{
    pr_model *m = NULL;
    pr_error err = { 0 };
    int rc = pr_model_create(c, &m, &err);
    if (rc) fprintf(stderr, "create: %s\n", err.msg);
    assert_int_equal(rc, PR_OK);
    if (B > 0) {
        rc = pr_model_reserve(m, B, T, &err);
        if (rc) fprintf(stderr, "reserve: %s\n", err.msg);
        assert_int_equal(rc, PR_OK);
    }
    return m;
}

static pr_model *small_model(uint64_t seed)
{
    pr_model_config c = small_config(seed);
    return model_from(&c, TB, TT);
}

static void loss_ctx_init(th_loss_ctx *lc, pr_model *m, unsigned seed)
{
    th_loss_init_rng(lc, m, TB, TT, seed);
}

static void forward_backward(th_loss_ctx *lc)
{
    assert_true(isfinite(th_forward_backward(lc)));
}

/* ---- a concatenation provider: n free vectors of one width ---------------- */

typedef struct vecs {
    int n, width;
    float *v, *dv;
    int calls_fwd, calls_bwd;
    int site, layer;   /* as the last call saw them */
} vecs;

static void vecs_init(vecs *p, int n, int width, unsigned seed)
{
    memset(p, 0, sizeof *p);
    p->n = n;
    p->width = width;
    p->v = calloc((size_t)n * width, sizeof(float));
    p->dv = calloc((size_t)n * width, sizeof(float));
    assert_non_null(p->v);
    assert_non_null(p->dv);
    gc_fill(p->v, (size_t)n * width, seed, 0.3f);
}

static void vecs_free(vecs *p)
{
    free(p->v);
    free(p->dv);
}

static int vecs_forward(void *self, int site, int layer, float *out, pr_error *err)
{
    (void)err;
    vecs *p = self;
    memcpy(out, p->v, (size_t)p->n * p->width * sizeof(float));
    p->site = site;
    p->layer = layer;
    p->calls_fwd++;
    return PR_OK;
}

static int vecs_backward(void *self, int site, int layer, const float *dout, pr_error *err)
{
    (void)err; (void)site; (void)layer;
    vecs *p = self;
    for (size_t i = 0; i < (size_t)p->n * p->width; i++)
        p->dv[i] += dout[i];
    p->calls_bwd++;
    return PR_OK;
}

static pr_concat_provider vecs_provider(vecs *p)
{
    pr_concat_provider cp = {.n = p->n, .forward = vecs_forward, .backward = vecs_backward, .self = p};
    return cp;
}

static void attach_concat(pr_model *m, int site, int layer, vecs *p)
{
    pr_error err = { 0 };
    pr_concat_provider cp = vecs_provider(p);
    int rc = pr_model_attach_concat(m, site, layer, &cp, &err);
    if (rc) fprintf(stderr, "attach_concat: %s\n", err.msg);
    assert_int_equal(rc, PR_OK);
}

static void attach_hook(pr_model *m, int site, int layer, pr_site_hook h)
{
    pr_error err = { 0 };
    int rc = pr_model_attach_hook(m, site, layer, &h, &err);
    if (rc) fprintf(stderr, "attach_hook: %s\n", err.msg);
    assert_int_equal(rc, PR_OK);
}

/* ---- a recording hook: what a site showed, and its reservations ---------- */

typedef struct probe {
    int B, T, rows, training, calls;
    int x_dim, x_ld, y_dim, y_ld;
    float *x, *y;          /* copies of the rows of the last forward */
    size_t cap;            /* floats each buffer holds */
    int res_B, res_T, res_calls, res_fail;
} probe;

static void probe_init(probe *p, size_t cap)
{
    memset(p, 0, sizeof *p);
    p->cap = cap;
    p->x = calloc(cap, sizeof(float));
    p->y = calloc(cap, sizeof(float));
    assert_non_null(p->x);
    assert_non_null(p->y);
}

static void probe_free(probe *p)
{
    free(p->x);
    free(p->y);
}

static int probe_forward(void *self, const pr_site_io *io, pr_error *err)
{
    probe *p = self;
    if ((size_t)io->rows * io->x_dim > p->cap || (size_t)io->rows * io->y_dim > p->cap)
        return pr_errorf(err, PR_ERR_INVALID, "probe: %d rows do not fit", io->rows);
    p->B = io->B;
    p->T = io->T;
    p->rows = io->rows;
    p->training = io->training;
    p->x_dim = io->x_dim;
    p->x_ld = io->x_ld;
    p->y_dim = io->y_dim;
    p->y_ld = io->y_ld;
    for (int r = 0; r < io->rows; r++) {
        memcpy(p->x + (size_t)r * io->x_dim, io->x + (size_t)r * io->x_ld, (size_t)io->x_dim * sizeof(float));
        memcpy(p->y + (size_t)r * io->y_dim, io->y + (size_t)r * io->y_ld, (size_t)io->y_dim * sizeof(float));
    }
    p->calls++;
    return PR_OK;
}

static int probe_backward(void *self, const pr_site_io *io, pr_error *err)
{
    (void)self; (void)io; (void)err;
    return PR_OK;   /* identity: dy passes on unchanged */
}

static int probe_reserve(void *self, int B, int T, pr_error *err)
{
    probe *p = self;
    p->res_calls++;
    if (p->res_fail)
        return pr_errorf(err, PR_ERR_NOMEM, "probe cannot plan");
    p->res_B = B;
    p->res_T = T;
    return PR_OK;
}

static pr_site_hook probe_hook(probe *p)
{
    pr_site_hook h = {.forward = probe_forward, .backward = probe_backward, .self = p, .reserve = probe_reserve};
    return h;
}

/* ---- prompt tuning: virtual positions at the embedding ------------------- */

/* With virtual vectors equal to the embeddings of tokens u_0..u_{n-1},
 * the real positions compute exactly what a plain model computes for
 * those positions of the sequence u, x: the vectors come first, position
 * embeddings run over all n+T positions, and only real rows are scored. */
static void test_prompt_matches_plain_prefix_tokens(void **state)
{
    (void)state;
    enum { NV = 3, TP = NV + TT };
    pr_model_config c = small_config(101);
    pr_model *plain = model_from(&c, TB, TP);
    pr_model *m = model_from(&c, TB, TT);
    const int u[NV] = { 5, 17, 42 };
    const float *wte = pr_model_find_tensor(m, "wte.weight")->data;

    /* two providers concatenate in attach order: rows 0-1, then row 2 */
    vecs p1, p2;
    vecs_init(&p1, 2, TC, 1);
    vecs_init(&p2, 1, TC, 2);
    memcpy(p1.v, wte + (size_t)u[0] * TC, TC * sizeof(float));
    memcpy(p1.v + TC, wte + (size_t)u[1] * TC, TC * sizeof(float));
    memcpy(p2.v, wte + (size_t)u[2] * TC, TC * sizeof(float));
    assert_int_equal(pr_model_virtual_positions(m), 0);
    attach_concat(m, PR_SITE_EMBED, -1, &p1);
    attach_concat(m, PR_SITE_EMBED, -1, &p2);
    assert_int_equal(pr_model_virtual_positions(m), NV);

    th_loss_ctx lc;
    loss_ctx_init(&lc, m, 102);
    lc.targets[4] = -1;
    int ptok[TB * TP], ptgt[TB * TP];
    for (int b = 0; b < TB; b++)
        for (int t = 0; t < TP; t++) {
            ptok[b * TP + t] = t < NV ? u[t] : lc.tokens[b * TT + t - NV];
            ptgt[b * TP + t] = t < NV ? -1 : lc.targets[b * TT + t - NV];
        }
    pr_batch pb = {.tokens = ptok, .targets = ptgt, .B = TB, .T = TP};
    pr_error err = { 0 };
    float lp = 0, lv = 0;
    assert_int_equal(pr_model_forward(plain, &pb, &lp, &err), PR_OK);
    assert_int_equal(pr_model_forward(m, &lc.batch, &lv, &err), PR_OK);
    assert_int_equal(p1.calls_fwd, 1);
    assert_int_equal(p2.calls_fwd, 1);
    assert_int_equal(p1.site, PR_SITE_EMBED);
    assert_int_equal(p1.layer, -1);

    /* logits and hidden states (B,T,.) of the real rows; same scored
     * count and loss.  Same float operations up to BLAS blocking: 1e-5. */
    assert_true(pr_model_scored_tokens(m) == TB * TT - 1);
    assert_true(pr_model_scored_tokens(plain) == pr_model_scored_tokens(m));
    const float *lg = pr_model_logits(m), *lpl = pr_model_logits(plain);
    const float *hv = pr_model_hidden(m), *hp = pr_model_hidden(plain);
    double dl = 0, dh = 0;
    for (int b = 0; b < TB; b++) {
        dl = fmax(dl, th_max_abs_diff(lg + (size_t)b * TT * TV, lpl + ((size_t)b * TP + NV) * TV, (size_t)TT * TV));
        dh = fmax(dh, th_max_abs_diff(hv + (size_t)b * TT * TC, hp + ((size_t)b * TP + NV) * TC, (size_t)TT * TC));
    }
    assert_true(dl < 1e-5);
    assert_true(dh < 1e-5);
    assert_true(fabsf(lp - lv) < 1e-5f);
    assert_true(fabs(lv - th_mean_ce(lg, lc.targets, TB * TT, TV)) < 1e-5);

    /* a different virtual vector changes every real logit row's values */
    float *saved = malloc((size_t)TB * TT * TV * sizeof(float));
    memcpy(saved, lg, (size_t)TB * TT * TV * sizeof(float));
    p2.v[7] += 0.5f;
    assert_int_equal(pr_model_forward(m, &lc.batch, &lv, &err), PR_OK);
    for (int r = 0; r < TB * TT; r++)
        assert_true(th_max_abs_diff(saved + (size_t)r * TV, pr_model_logits(m) + (size_t)r * TV, TV) > 1e-6);
    free(saved);

    /* detaching returns to the plain model of T positions */
    pr_model_detach_hooks(m);
    assert_int_equal(pr_model_virtual_positions(m), 0);
    pr_model *ref = model_from(&c, TB, TT);
    float l0, l1;
    assert_int_equal(pr_model_forward(ref, &lc.batch, &l0, &err), PR_OK);
    assert_int_equal(pr_model_forward(m, &lc.batch, &l1, &err), PR_OK);
    assert_true(l0 == l1);
    assert_memory_equal(pr_model_logits(ref), pr_model_logits(m), (size_t)TB * TT * TV * sizeof(float));

    vecs_free(&p1);
    vecs_free(&p2);
    pr_model_free(ref);
    pr_model_free(plain);
    pr_model_free(m);
}

/* Gradients of the virtual vectors (summed over the batch) and of the
 * position table, whose first rows now serve the virtual positions. */
static void test_prompt_gradients(void **state)
{
    (void)state;
    pr_model *m = small_model(111);
    pr_error err = { 0 };
    vecs p1, p2;
    vecs_init(&p1, 2, TC, 11);
    vecs_init(&p2, 2, TC, 12);
    attach_concat(m, PR_SITE_EMBED, -1, &p1);  /* after reserve: planned again */
    attach_concat(m, PR_SITE_EMBED, -1, &p2);
    assert_int_equal(pr_model_set_trainable(m, "wpe.weight", 1, &err), PR_OK);
    assert_int_equal(pr_model_set_trainable(m, "wte.weight", 1, &err), PR_OK);
    probe bo;
    probe_init(&bo, (size_t)TB * 16 * TC);
    attach_hook(m, PR_SITE_BLOCK_OUT, 0, probe_hook(&bo));

    th_loss_ctx lc;
    loss_ctx_init(&lc, m, 112);
    lc.targets[1] = -1;
    forward_backward(&lc);
    assert_int_equal(p1.calls_bwd, 1);
    assert_int_equal(p2.calls_bwd, 1);
    /* other sites run on the internal length */
    assert_int_equal(bo.B, TB);
    assert_int_equal(bo.T, TT + 4);
    assert_int_equal(bo.rows, TB * (TT + 4));

    int f = 0;
    f += gc_check("p1.v", p1.v, p1.dv, 2 * TC, th_loss, &lc, FD_EPS, FD_RTOL, FD_ATOL, 16);
    f += gc_check("p2.v", p2.v, p2.dv, 2 * TC, th_loss, &lc, FD_EPS, FD_RTOL, FD_ATOL, 16);
    /* wpe rows 0..3 (virtual) and 4..9 (real tokens), probed densely */
    const pr_tensor_info *wpe = pr_model_find_tensor(m, "wpe.weight");
    float *g = malloc(10 * TC * sizeof(float));
    memcpy(g, wpe->grad, 10 * TC * sizeof(float));
    f += gc_check("wpe[0:4]", wpe->data, g, 4 * TC, th_loss, &lc, FD_EPS, FD_RTOL, FD_ATOL, 16);
    f += gc_check("wpe[4:10]", wpe->data + 4 * TC, g + 4 * TC, 6 * TC, th_loss, &lc, FD_EPS, FD_RTOL,
                  FD_ATOL, 16);
    free(g);
    /* rows past n+T are not used */
    for (int i = 10 * TC; i < 16 * TC; i++)
        assert_true(wpe->grad[i] == 0.0f);
    const pr_tensor_info *wte = pr_model_find_tensor(m, "wte.weight");
    size_t row = (size_t)lc.tokens[3] * TC;
    float gw[TC];
    memcpy(gw, wte->grad + row, sizeof gw);
    f += gc_check("wte[tokens[3]]", wte->data + row, gw, TC, th_loss, &lc, FD_EPS, FD_RTOL, FD_ATOL, 0);
    assert_int_equal(f, 0);

    probe_free(&bo);
    vecs_free(&p1);
    vecs_free(&p2);
    pr_model_free(m);
}

/* A task head reads the real hidden states; its gradient reaches the
 * virtual vectors through pr_model_backward_hidden. */
typedef struct hidden_ctx {
    th_loss_ctx lc;
    float w[TB * TT * TC];
} hidden_ctx;

static double hidden_loss(void *ctx)
{
    hidden_ctx *hc = ctx;
    pr_error err = { 0 };
    if (pr_model_forward(hc->lc.m, &hc->lc.batch, NULL, &err)) {
        fprintf(stderr, "forward: %s\n", err.msg);
        return NAN;
    }
    const float *h = pr_model_hidden(hc->lc.m);
    double s = 0;
    for (int i = 0; i < TB * TT * TC; i++)
        s += (double)hc->w[i] * h[i];
    return s;
}

static void test_prompt_backward_hidden(void **state)
{
    (void)state;
    pr_model *m = small_model(121);
    vecs p;
    vecs_init(&p, 3, TC, 13);
    attach_concat(m, PR_SITE_EMBED, -1, &p);
    hidden_ctx hc;
    loss_ctx_init(&hc.lc, m, 122);
    hc.lc.batch.targets = NULL;
    hc.lc.batch.hidden_only = 1;
    gc_fill(hc.w, TB * TT * TC, 123, 1.0f);
    pr_error err = { 0 };
    assert_int_equal(pr_model_forward(m, &hc.lc.batch, NULL, &err), PR_OK);
    assert_null(pr_model_logits(m));
    assert_int_equal(pr_model_backward_hidden(m, hc.w, &err), PR_OK);
    int f = gc_check("p.v (hidden)", p.v, p.dv, 3 * TC, hidden_loss, &hc, FD_EPS, FD_RTOL, FD_ATOL, 16);
    assert_int_equal(f, 0);
    vecs_free(&p);
    pr_model_free(m);
}

static void test_prompt_limits(void **state)
{
    (void)state;
    pr_model_config c = small_config(131);
    pr_model *m = model_from(&c, 0, 0);
    pr_error err = { 0 };
    vecs p, big;
    vecs_init(&p, 4, TC, 14);
    vecs_init(&big, 16, TC, 15);
    pr_concat_provider cp = vecs_provider(&big);
    /* no room left for a token */
    assert_int_equal(pr_model_attach_concat(m, PR_SITE_EMBED, -1, &cp, &err), PR_ERR_INVALID);
    assert_non_null(strstr(err.msg, "max_seq"));
    cp = vecs_provider(&p);
    cp.n = 0;
    assert_int_equal(pr_model_attach_concat(m, PR_SITE_EMBED, -1, &cp, &err), PR_ERR_INVALID);
    cp.n = 4;
    assert_int_equal(pr_model_attach_concat(m, PR_SITE_EMBED, 0, &cp, &err), PR_ERR_INVALID);
    assert_int_equal(pr_model_attach_concat(m, PR_SITE_O, 0, &cp, &err), PR_ERR_UNSUPPORTED);
    assert_non_null(strstr(err.msg, "'o'"));
    assert_int_equal(pr_model_attach_concat(m, PR_SITE_EMBED, -1, &cp, &err), PR_OK);

    /* reserve plans for T + n <= max_seq = 16 */
    assert_int_equal(pr_model_reserve(m, TB, 13, &err), PR_ERR_INVALID);
    assert_non_null(strstr(err.msg, "virtual"));
    assert_non_null(strstr(err.msg, "max_seq"));
    assert_int_equal(pr_model_reserve(m, TB, 12, &err), PR_OK);
    /* a second provider would push the reserved 12 + 8 past 16 */
    assert_int_equal(pr_model_attach_concat(m, PR_SITE_EMBED, -1, &cp, &err), PR_ERR_INVALID);
    assert_non_null(strstr(err.msg, "max_seq"));
    assert_int_equal(pr_model_virtual_positions(m), 4);

    int tokens[TB * 13] = { 0 }, targets[TB * 13] = { 0 };
    pr_batch b = {.tokens = tokens, .targets = targets, .B = TB, .T = 13};
    float loss;
    assert_int_equal(pr_model_forward(m, &b, &loss, &err), PR_ERR_INVALID);
    assert_non_null(strstr(err.msg, "max_seq"));
    b.T = 12;
    assert_int_equal(pr_model_forward(m, &b, &loss, &err), PR_OK);
    assert_true(isfinite(loss));
    vecs_free(&p);
    vecs_free(&big);
    pr_model_free(m);
}

/* ---- prefix tuning: keys and values prepended in one layer -------------- */

/* Identity hook that keeps the first n rows of sequence 0's keys or
 * values: what a virtual position contributes to a layer. */
typedef struct kv_capture {
    int n, width;
    float rows[4 * 32];
} kv_capture;

static int capture_forward(void *self, const pr_site_io *io, pr_error *err)
{
    (void)err;
    kv_capture *k = self;
    k->width = io->x_dim;
    for (int p = 0; p < k->n; p++)
        memcpy(k->rows + (size_t)p * io->x_dim, io->x + (size_t)p * io->x_ld, (size_t)io->x_dim * sizeof(float));
    return PR_OK;
}

/* Prompt tuning is prefix tuning whose prefixes are the keys and values of
 * the virtual positions in every layer (Li & Liang 2021, sec. 4).  With
 * the position table zeroed, so that real tokens sit at the same
 * positions in both models, a model given those keys and values as
 * prefixes computes the prompted model's logits.  Grouped-query heads
 * (Hkv = 2) check the (Hkv,P,hd) layout against the providers' rows. */
static void test_prefix_matches_prompt(void **state)
{
    (void)state;
    enum { NV = 3 };
    pr_model_config c = small_config(141);
    c.n_kv_heads = 2;           /* KV = 16 */
    int KV = 16, L = 2;
    pr_model *a = model_from(&c, TB, TT), *b = model_from(&c, TB, TT);
    pr_tensor_info *wa = (pr_tensor_info *)pr_model_find_tensor(a, "wpe.weight");
    pr_tensor_info *wb = (pr_tensor_info *)pr_model_find_tensor(b, "wpe.weight");
    memset(wa->data, 0, (size_t)wa->numel * sizeof(float));
    memset(wb->data, 0, (size_t)wb->numel * sizeof(float));

    vecs prompt;
    vecs_init(&prompt, NV, TC, 16);
    attach_concat(a, PR_SITE_EMBED, -1, &prompt);
    kv_capture capk[2], capv[2];
    for (int l = 0; l < L; l++) {
        capk[l].n = capv[l].n = NV;
        pr_site_hook hk = {.forward = capture_forward, .backward = probe_backward, .self = &capk[l]};
        pr_site_hook hv = {.forward = capture_forward, .backward = probe_backward, .self = &capv[l]};
        attach_hook(a, PR_SITE_ATTN_K, l, hk);
        attach_hook(a, PR_SITE_ATTN_V, l, hv);
    }
    th_loss_ctx la, lb;
    loss_ctx_init(&la, a, 142);
    loss_ctx_init(&lb, b, 142);
    double loss_a = th_loss(&la);
    assert_int_equal(capk[1].width, KV);

    vecs pk[2], pv[2];
    for (int l = 0; l < L; l++) {
        vecs_init(&pk[l], NV, KV, 0);
        vecs_init(&pv[l], NV, KV, 0);
        memcpy(pk[l].v, capk[l].rows, (size_t)NV * KV * sizeof(float));
        memcpy(pv[l].v, capv[l].rows, (size_t)NV * KV * sizeof(float));
        attach_concat(b, PR_SITE_ATTN_K, l, &pk[l]);
        attach_concat(b, PR_SITE_ATTN_V, l, &pv[l]);
    }
    assert_int_equal(pr_model_virtual_positions(b), 0);
    double loss_b = th_loss(&lb);
    assert_int_equal(pk[1].site, PR_SITE_ATTN_K);
    assert_int_equal(pk[1].layer, 1);
    assert_int_equal(pv[0].site, PR_SITE_ATTN_V);
    double d = th_max_abs_diff(pr_model_logits(a), pr_model_logits(b), (size_t)TB * TT * TV);
    assert_true(d < 1e-5);
    assert_true(fabs(loss_a - loss_b) < 1e-5);
    for (int l = 0; l < L; l++) {
        vecs_free(&pk[l]);
        vecs_free(&pv[l]);
    }
    vecs_free(&prompt);
    pr_model_free(a);
    pr_model_free(b);
}

/* Gradients of prefix rows at attn.k / attn.v of layer 1 (values from two
 * providers, concatenated), beside a hook at attn.k of the same layer. */
static void test_prefix_gradients(void **state)
{
    (void)state;
    pr_model *m = small_model(151);
    pr_error err = { 0 };
    vecs k, v1, v2;
    vecs_init(&k, 3, TC, 21);
    vecs_init(&v1, 1, TC, 22);
    vecs_init(&v2, 2, TC, 23);
    /* large prefix values make the keys' gradient visible above FD noise */
    gc_fill(v1.v, TC, 24, 3.0f);
    gc_fill(v2.v, 2 * TC, 25, 3.0f);
    gc_fill(k.v, 3 * TC, 26, 1.0f);
    attach_concat(m, PR_SITE_ATTN_K, 1, &k);
    attach_concat(m, PR_SITE_ATTN_V, 1, &v1);
    attach_concat(m, PR_SITE_ATTN_V, 1, &v2);
    probe pk;
    probe_init(&pk, (size_t)TB * TT * TC);
    attach_hook(m, PR_SITE_ATTN_K, 1, probe_hook(&pk));
    assert_int_equal(pr_model_set_trainable(m, "h.1.attn.c_attn.weight", 1, &err), PR_OK);
    th_loss_ctx lc;
    loss_ctx_init(&lc, m, 152);
    forward_backward(&lc);
    /* prefixes are not rows of the sequence: the hook sees B*T rows */
    assert_int_equal(pk.rows, TB * TT);
    assert_int_equal(k.calls_bwd, 1);
    assert_int_equal(v2.calls_bwd, 1);
    double gmax = 0;
    for (int i = 0; i < 3 * TC; i++)
        gmax = fmax(gmax, fabs(k.dv[i]));
    assert_true(gmax > 1e-3);   /* well above FD_ATOL: the check below means something */
    int f = 0;
    f += gc_check("prefix k", k.v, k.dv, 3 * TC, th_loss, &lc, FD_EPS, FD_RTOL, FD_ATOL, 16);
    f += gc_check("prefix v1", v1.v, v1.dv, TC, th_loss, &lc, FD_EPS, FD_RTOL, FD_ATOL, 16);
    f += gc_check("prefix v2", v2.v, v2.dv, 2 * TC, th_loss, &lc, FD_EPS, FD_RTOL, FD_ATOL, 16);
    const pr_tensor_info *w = pr_model_find_tensor(m, "h.1.attn.c_attn.weight");
    float *g = malloc((size_t)w->numel * sizeof(float));
    memcpy(g, w->grad, (size_t)w->numel * sizeof(float));
    f += gc_check(w->name, w->data, g, (size_t)w->numel, th_loss, &lc, FD_EPS, FD_RTOL, FD_ATOL, 12);
    free(g);
    assert_int_equal(f, 0);
    probe_free(&pk);
    vecs_free(&k);
    vecs_free(&v1);
    vecs_free(&v2);
    pr_model_free(m);
}

static void test_prefix_mismatch(void **state)
{
    (void)state;
    pr_model *m = small_model(161);
    pr_error err = { 0 };
    vecs k, v;
    vecs_init(&k, 2, TC, 31);
    vecs_init(&v, 1, TC, 32);
    attach_concat(m, PR_SITE_ATTN_K, 1, &k);
    th_loss_ctx lc;
    loss_ctx_init(&lc, m, 162);
    float loss;
    /* keys without values */
    assert_int_equal(pr_model_forward(m, &lc.batch, &loss, &err), PR_ERR_INVALID);
    assert_non_null(strstr(err.msg, "layer 1"));
    attach_concat(m, PR_SITE_ATTN_V, 1, &v);
    assert_int_equal(pr_model_forward(m, &lc.batch, &loss, &err), PR_ERR_INVALID);
    assert_non_null(strstr(err.msg, "layer 1"));
    assert_null(pr_model_logits(m));
    attach_concat(m, PR_SITE_ATTN_V, 1, &v);   /* 1 + 1 = 2 values */
    assert_int_equal(pr_model_forward(m, &lc.batch, &loss, &err), PR_OK);
    assert_true(isfinite(loss));
    assert_int_equal(v.calls_fwd, 2);
    /* layer out of range */
    pr_concat_provider cp = vecs_provider(&k);
    assert_int_equal(pr_model_attach_concat(m, PR_SITE_ATTN_K, 2, &cp, &err), PR_ERR_INVALID);
    vecs_free(&k);
    vecs_free(&v);
    pr_model_free(m);
}

/* ---- reservations and the training flag --------------------------------- */

static void test_reserve_hook(void **state)
{
    (void)state;
    pr_model_config c = small_config(171);
    pr_model *m = model_from(&c, 0, 0);
    pr_error err = { 0 };
    probe a, b, bad;
    probe_init(&a, (size_t)TB * 16 * TC * 4);
    probe_init(&b, (size_t)TB * 16 * TC * 4);
    probe_init(&bad, 1);
    attach_hook(m, PR_SITE_FFN_UP, 0, probe_hook(&a));
    assert_int_equal(a.res_calls, 0);           /* nothing planned yet */
    assert_int_equal(pr_model_reserve(m, TB, TT, &err), PR_OK);
    assert_int_equal(a.res_calls, 1);
    assert_int_equal(a.res_B, TB);
    assert_int_equal(a.res_T, TT);
    /* attached to a reserved model: called at once */
    attach_hook(m, PR_SITE_FFN_OUT, 1, probe_hook(&b));
    assert_int_equal(b.res_calls, 1);
    assert_true(b.res_B == TB && b.res_T == TT);
    /* a smaller request keeps the planned capacity */
    assert_int_equal(pr_model_reserve(m, 1, 3, &err), PR_OK);
    assert_true(a.res_B == TB && a.res_T == TT);
    assert_int_equal(pr_model_reserve(m, 3, TT, &err), PR_OK);
    assert_true(a.res_B == 3 && a.res_T == TT && b.res_B == 3);
    /* virtual positions lengthen what the hooks plan for */
    vecs p;
    vecs_init(&p, 2, TC, 41);
    attach_concat(m, PR_SITE_EMBED, -1, &p);
    assert_true(a.res_B == 3 && a.res_T == TT + 2);
    assert_true(b.res_B == 3 && b.res_T == TT + 2);
    /* never inside a step */
    int calls = a.res_calls;
    th_loss_ctx lc;
    loss_ctx_init(&lc, m, 172);
    forward_backward(&lc);
    assert_int_equal(a.res_calls, calls);
    assert_int_equal(a.calls, 1);
    assert_int_equal(a.T, TT + 2);
    /* a hook whose reserve fails is not attached */
    bad.res_fail = 1;
    pr_site_hook hb = probe_hook(&bad);
    assert_int_equal(pr_model_attach_hook(m, PR_SITE_O, 0, &hb, &err), PR_ERR_NOMEM);
    assert_non_null(strstr(err.msg, "probe cannot plan"));
    assert_non_null(strstr(err.msg, "'o'"));
    forward_backward(&lc);
    assert_int_equal(bad.calls, 0);
    probe_free(&a);
    probe_free(&b);
    probe_free(&bad);
    vecs_free(&p);
    pr_model_free(m);
}

static void test_training_flag(void **state)
{
    (void)state;
    pr_model *m = small_model(181);
    probe p;
    probe_init(&p, (size_t)TB * TT * 4 * TC);
    attach_hook(m, PR_SITE_FFN_ACT, 1, probe_hook(&p));
    th_loss_ctx lc;
    loss_ctx_init(&lc, m, 182);
    pr_error err = { 0 };
    float loss;
    /* eval by default, even with targets */
    p.training = -1;
    assert_int_equal(pr_model_forward(m, &lc.batch, &loss, &err), PR_OK);
    assert_int_equal(p.training, 0);
    pr_model_set_training(m, 1);
    assert_int_equal(pr_model_forward(m, &lc.batch, &loss, &err), PR_OK);
    assert_int_equal(p.training, 1);
    lc.batch.targets = NULL;
    assert_int_equal(pr_model_forward(m, &lc.batch, NULL, &err), PR_OK);
    assert_int_equal(p.training, 1);
    pr_model_set_training(m, 0);
    lc.batch.targets = lc.targets;
    assert_int_equal(pr_model_forward(m, &lc.batch, &loss, &err), PR_OK);
    assert_int_equal(p.training, 0);
    probe_free(&p);
    pr_model_free(m);
}

/* ---- tensors added to the table ----------------------------------------- */

static void test_add_tensor(void **state)
{
    (void)state;
    pr_model *m = small_model(191);
    pr_error err = { 0 };
    int n0 = pr_model_n_tensors(m);
    int64_t c0 = pr_model_param_count(m);
    float a[6], ga[6], bdat[4], cdat[5], gc[5];
    for (int i = 0; i < 6; i++) ga[i] = 1.0f;
    for (int i = 0; i < 5; i++) gc[i] = 2.0f;
    char name[32] = "mod/a";
    int64_t sa[2] = { 2, 3 }, sb[1] = { 4 }, sc[1] = { 5 };
    assert_int_equal(pr_model_add_tensor(m, name, 2, sa, a, ga, &err), PR_OK);
    strcpy(name, "mod/x");   /* the table keeps its own copy of the name */
    assert_int_equal(pr_model_add_tensor(m, "mod/b", 1, sb, bdat, NULL, &err), PR_OK);
    assert_int_equal(pr_model_add_tensor(m, "other/c", 1, sc, cdat, gc, &err), PR_OK);
    assert_int_equal(pr_model_n_tensors(m), n0 + 3);
    assert_true(pr_model_param_count(m) == c0 + 15);

    const pr_tensor_info *t = pr_model_find_tensor(m, "mod/a");
    assert_non_null(t);
    assert_ptr_equal(pr_model_tensor(m, n0), t);
    assert_int_equal(t->kind, PR_TENSOR_MODULE);
    assert_int_equal(t->layer, -1);
    assert_int_equal(t->ndim, 2);
    assert_true(t->shape[0] == 2 && t->shape[1] == 3 && t->numel == 6);
    assert_ptr_equal(t->data, a);
    assert_ptr_equal(t->grad, ga);
    assert_int_equal(t->trainable, 1);
    const pr_tensor_info *tb = pr_model_find_tensor(m, "mod/b");
    assert_int_equal(tb->trainable, 0);
    assert_null(tb->grad);
    assert_null(pr_model_find_tensor(m, "mod/x"));

    /* names are unique across base and added tensors */
    assert_int_equal(pr_model_add_tensor(m, "mod/a", 1, sb, bdat, NULL, &err), PR_ERR_INVALID);
    assert_non_null(strstr(err.msg, "mod/a"));
    assert_int_equal(pr_model_add_tensor(m, "wte.weight", 1, sb, bdat, NULL, &err), PR_ERR_INVALID);
    int64_t bad[1] = { 0 };
    assert_int_equal(pr_model_add_tensor(m, "mod/z", 1, bad, bdat, NULL, &err), PR_ERR_INVALID);
    assert_int_equal(pr_model_add_tensor(m, "mod/z", 0, sb, bdat, NULL, &err), PR_ERR_INVALID);
    assert_int_equal(pr_model_add_tensor(m, "mod/z", 1, sb, NULL, NULL, &err), PR_ERR_INVALID);
    assert_int_equal(pr_model_n_tensors(m), n0 + 3);

    /* one base tensor trainable too; zero_grad clears both kinds */
    assert_int_equal(pr_model_set_trainable(m, "ln_f.weight", 1, &err), PR_OK);
    const pr_tensor_info *lnf = pr_model_find_tensor(m, "ln_f.weight");
    lnf->grad[0] = 3.0f;
    pr_model_zero_grad(m);
    for (int i = 0; i < 6; i++) assert_true(ga[i] == 0.0f);
    for (int i = 0; i < 5; i++) assert_true(gc[i] == 0.0f);
    assert_true(lnf->grad[0] == 0.0f);
    assert_ptr_equal(t->grad, ga);   /* the base re-layout left it alone */

    /* trainability: only with a gradient */
    assert_int_equal(pr_model_set_trainable(m, "mod/b", 1, &err), PR_ERR_INVALID);
    assert_non_null(strstr(err.msg, "mod/b"));
    assert_int_equal(pr_model_set_trainable(m, "mod/a", 0, &err), PR_OK);
    assert_int_equal(t->trainable, 0);
    assert_ptr_equal(t->grad, ga);
    assert_int_equal(pr_model_set_trainable(m, "*", 1, &err), PR_OK);
    assert_int_equal(t->trainable, 1);
    assert_int_equal(tb->trainable, 0);
    assert_int_equal(pr_model_set_trainable(m, "*", 0, &err), PR_OK);
    assert_int_equal(t->trainable, 0);

    /* a second name for the same memory is counted once; many additions
     * keep earlier entries where they were */
    assert_int_equal(pr_model_add_tensor(m, "mod/alias", 2, sa, a, NULL, &err), PR_OK);
    assert_true(pr_model_param_count(m) == c0 + 15);
    const pr_tensor_info *tc = pr_model_find_tensor(m, "other/c");
    float many[100];
    for (int i = 0; i < 100; i++) {
        char nm[32];
        int64_t one[1] = { 1 };
        snprintf(nm, sizeof nm, "mod/many.%d", i);
        assert_int_equal(pr_model_add_tensor(m, nm, 1, one, &many[i], NULL, &err), PR_OK);
    }
    assert_ptr_equal(pr_model_find_tensor(m, "other/c"), tc);
    assert_ptr_equal(pr_model_find_tensor(m, "mod/many.99")->data, &many[99]);
    assert_true(pr_model_param_count(m) == c0 + 115);

    /* removal by prefix; base tensors and other modules stay */
    pr_model_remove_tensors(m, "mod/");
    assert_int_equal(pr_model_n_tensors(m), n0 + 1);
    assert_null(pr_model_find_tensor(m, "mod/a"));
    assert_null(pr_model_find_tensor(m, "mod/many.5"));
    assert_ptr_equal(pr_model_find_tensor(m, "other/c"), tc);
    assert_true(pr_model_param_count(m) == c0 + 5);
    pr_model_remove_tensors(m, "");
    assert_int_equal(pr_model_n_tensors(m), n0);
    assert_true(pr_model_param_count(m) == c0);
    assert_non_null(pr_model_find_tensor(m, "wte.weight"));
    /* the name is free again */
    assert_int_equal(pr_model_add_tensor(m, "mod/a", 2, sa, a, ga, &err), PR_OK);

    /* the model still trains normally */
    assert_int_equal(pr_model_set_trainable(m, "h.0.ln_1.bias", 1, &err), PR_OK);
    th_loss_ctx lc;
    loss_ctx_init(&lc, m, 192);
    forward_backward(&lc);
    pr_model_free(m);   /* frees the added entries, not their memory */
}

/* ---- frozen weights of projection sites ---------------------------------- */

/* y = x . W_view + b in double, compared with what a hook at the site saw
 * as the projection's output.  Float GEMM against a double reference over
 * d_in <= 128 terms: the worst difference seen is 3.5e-7, so 1e-6. */
static double view_error(const probe *p, const float *w, int ld, const float *b)
{
    double md = 0;
    for (int r = 0; r < p->rows; r++)
        for (int o = 0; o < p->y_dim; o++) {
            double s = b ? b[o] : 0.0;
            for (int i = 0; i < p->x_dim; i++)
                s += (double)p->x[(size_t)r * p->x_dim + i] * w[(size_t)i * ld + o];
            md = fmax(md, fabs(s - p->y[(size_t)r * p->y_dim + o]));
        }
    return md;
}

static void test_site_weight(void **state)
{
    (void)state;
    pr_model *m = small_model(201);
    pr_error err = { 0 };
    /* non-zero biases, so the bias slice is checked too */
    for (int i = 0; i < pr_model_n_tensors(m); i++) {
        const pr_tensor_info *t = pr_model_tensor(m, i);
        if (t->kind == PR_TENSOR_BIAS)
            gc_fill(t->data, (size_t)t->numel, 300 + (unsigned)i, 0.2f);
    }
    const int sites[] = { PR_SITE_QKV, PR_SITE_Q, PR_SITE_K, PR_SITE_V, PR_SITE_O, PR_SITE_FFN_UP, PR_SITE_FFN_DOWN };
    const int ns = (int)(sizeof sites / sizeof sites[0]);
    probe pr[7];
    for (int i = 0; i < ns; i++) {
        probe_init(&pr[i], (size_t)TB * TT * 128);
        attach_hook(m, sites[i], 1, probe_hook(&pr[i]));
    }
    th_loss_ctx lc;
    loss_ctx_init(&lc, m, 202);
    th_loss(&lc);
    const float *cattn = pr_model_find_tensor(m, "h.1.attn.c_attn.weight")->data;
    const float *cattn_b = pr_model_find_tensor(m, "h.1.attn.c_attn.bias")->data;
    const int off[] = { 0, 0, 32, 64 };
    for (int i = 0; i < ns; i++) {
        float *w = NULL, *b = NULL;
        int ld = 0;
        assert_int_equal(pr_model_site_weight(m, sites[i], 1, &w, &ld, &b, &err), PR_OK);
        int din, dout;
        pr_model_site_dims(m, sites[i], &din, &dout);
        assert_true(pr[i].x_dim == din && pr[i].y_dim == dout && pr[i].rows == TB * TT);
        double e = view_error(&pr[i], w, ld, b);
        if (e >= 1e-6) fprintf(stderr, "site %s: |x.W + b - y| = %.3g\n", pr_site_name(sites[i]), e);
        assert_true(e < 1e-6);
        if (i < 4) {
            assert_int_equal(ld, 96);
            assert_ptr_equal(w, cattn + off[i]);
            assert_ptr_equal(b, cattn_b + off[i]);
        }
    }
    /* the view writes through to the tensor (merging) */
    float *w, *b;
    int ld;
    assert_int_equal(pr_model_site_weight(m, PR_SITE_FFN_DOWN, 0, &w, &ld, &b, &err), PR_OK);
    assert_int_equal(ld, TC);
    assert_ptr_equal(w, pr_model_find_tensor(m, "h.0.mlp.c_proj.weight")->data);
    assert_ptr_equal(b, pr_model_find_tensor(m, "h.0.mlp.c_proj.bias")->data);
    assert_int_equal(pr_model_site_weight(m, PR_SITE_FFN_UP, 0, &w, &ld, NULL, &err), PR_OK);
    assert_int_equal(ld, 128);

    /* stream sites, sites GPT-2 lacks, bad layers */
    assert_int_equal(pr_model_site_weight(m, PR_SITE_BLOCK_OUT, 0, &w, &ld, &b, &err), PR_ERR_INVALID);
    assert_non_null(strstr(err.msg, "block_out"));
    assert_int_equal(pr_model_site_weight(m, PR_SITE_EMBED, -1, &w, &ld, &b, &err), PR_ERR_INVALID);
    assert_int_equal(pr_model_site_weight(m, PR_SITE_FFN_GATE, 0, &w, &ld, &b, &err), PR_ERR_UNSUPPORTED);
    assert_non_null(strstr(err.msg, "ffn.gate"));
    assert_int_equal(pr_model_site_weight(m, PR_SITE_O, 2, &w, &ld, &b, &err), PR_ERR_INVALID);
    for (int i = 0; i < ns; i++)
        probe_free(&pr[i]);
    pr_model_free(m);

    /* grouped-query heads without biases: q, k, v slices at 0, Q, Q+KV */
    pr_model_config c = small_config(203);
    c.bias = 0;
    c.n_kv_heads = 2;
    c.d_head = 6;   /* Q = 24, KV = 12, QKV = 48 */
    m = model_from(&c, 0, 0);
    const float *qkv = pr_model_find_tensor(m, "h.0.attn.c_attn.weight")->data;
    const int gsites[] = { PR_SITE_Q, PR_SITE_K, PR_SITE_V };
    const int goff[] = { 0, 24, 36 };
    static float sentinel;
    for (int i = 0; i < 3; i++) {
        b = &sentinel;   /* must be overwritten with NULL */
        assert_int_equal(pr_model_site_weight(m, gsites[i], 0, &w, &ld, &b, &err), PR_OK);
        assert_int_equal(ld, 48);
        assert_ptr_equal(w, qkv + goff[i]);
        assert_null(b);
    }
    assert_int_equal(pr_model_site_weight(m, PR_SITE_O, 1, &w, &ld, &b, &err), PR_OK);
    assert_int_equal(ld, TC);
    pr_model_free(m);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_prompt_matches_plain_prefix_tokens),
        cmocka_unit_test(test_prompt_gradients),
        cmocka_unit_test(test_prompt_backward_hidden),
        cmocka_unit_test(test_prompt_limits),
        cmocka_unit_test(test_prefix_matches_prompt),
        cmocka_unit_test(test_prefix_gradients),
        cmocka_unit_test(test_prefix_mismatch),
        cmocka_unit_test(test_reserve_hook),
        cmocka_unit_test(test_training_flag),
        cmocka_unit_test(test_add_tensor),
        cmocka_unit_test(test_site_weight),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
