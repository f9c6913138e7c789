/* peftref core, plugin conformance checker: the finite check.
 *
 * From finite inputs a technique's forward must produce finite outputs.
 * The other checks cannot see it: a NaN loss is within every tolerance
 * (comparisons with NaN are false) and NaN bits repeat exactly.  The check
 * attaches the technique at each site it supports that the test model has,
 * with its parameters moved off their initial values, and runs a forward
 * in eval and in training mode (then a backward) through a copy of the
 * descriptor whose forward -- and integrate_forward, for custom
 * integration -- is wrapped: after each call whose inputs were finite, the
 * output is scanned and the first non-finite element is reported with the
 * site and layer.  A non-finite loss with every output finite fails too. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "check_internal.h"

/* The wrapped technique and what the wrappers found (one check per child
 * process, so file-scope state is private to it). */
static pr_technique fin_tech;
static pr_callback fin_forward_orig, fin_integrate_orig;
static int fin_found, fin_calls;
static char fin_where[DETAIL_MAX];

/* First non-finite element of a tensor (2-D site tensors with their row
 * stride; others contiguous): 1 with its row, column and value. */
static int first_nonfinite(const pr_tensor *x, int64_t *row, int64_t *col, float *val)
{
    if (!x || !x->data || x->ndim < 1 || x->ndim > 4 || (x->dtype && x->dtype != PR_DTYPE_F32))
        return 0;
    int64_t rows = 1, cols = x->shape[x->ndim - 1], ld = cols;
    for (int d = 0; d + 1 < x->ndim; d++)
        rows *= x->shape[d];
    if (x->ndim == 2 && x->stride[0] >= cols)
        ld = x->stride[0];
    const float *v = x->data;
    for (int64_t r = 0; r < rows; r++)
        for (int64_t c = 0; c < cols; c++)
            if (!isfinite(v[r * ld + c])) {
                *row = r;
                *col = c;
                *val = v[r * ld + c];
                return 1;
            }
    return 0;
}

static void site_name(const pr_ctx *c, char *buf, size_t len)
{
    const char *s = c->site >= 0 && c->site < PR_SITE_COUNT ? pr_site_name(c->site) : "?";
    if (c->layer >= 0)
        snprintf(buf, len, "h.%d.%s", c->layer, s);
    else
        snprintf(buf, len, "%s", s);
}

/* Run the callback; note its first non-finite output from finite inputs. */
static int wrapped(pr_callback orig, const char *what, const pr_ctx *c)
{
    int64_t r, k;
    float v;
    /* for custom integration out is y, read as well as written */
    int inputs_bad = first_nonfinite(c->in, &r, &k, &v) ||
                     (orig == fin_integrate_orig && first_nonfinite(c->out, &r, &k, &v));
    int rc = orig(c);
    fin_calls++;
    if (rc == 0 && !inputs_bad && !fin_found && first_nonfinite(c->out, &r, &k, &v)) {
        char where[64];
        site_name(c, where, sizeof where);
        snprintf(fin_where, sizeof fin_where,
                 "%s at %s (%s) produced a non-finite value from finite inputs: out[%lld, %lld] = %g "
                 "(the first of its %lld x %lld outputs)",
                 what, where, c->training ? "training" : "eval", (long long)r, (long long)k, (double)v,
                 (long long)(c->out->ndim >= 2 ? c->out->shape[0] : 1), (long long)c->out->shape[c->out->ndim - 1]);
        fin_found = 1;
    }
    return rc;
}

static int fin_forward(const pr_ctx *c)
{
    return wrapped(fin_forward_orig, "forward", c);
}

static int fin_integrate(const pr_ctx *c)
{
    return wrapped(fin_integrate_orig, "integrate_forward", c);
}

/* Attach at site, run eval and training passes; 1 when a problem was found. */
static int finite_at(const pr_technique *t, int site, int *passes, report *r)
{
    char where[64];
    chk_site_label(site, where, sizeof where);
    pr_error err = { 0 };
    pr_model_config cfg = chk_shape_a();
    bench b;
    attached a;
    memset(&a, 0, sizeof a);
    int bad = 0;
    if (chk_bench_open(&b, &cfg, &err)) {
        chk_problem(r, "cannot build the test model: %s", err.msg);
        return 1;
    }
    if (site >= 0 && !chk_site_exists(b.m, site)) {
        chk_bench_close(&b);
        return 0;
    }
    int layer = site >= 0 && pr_site_is_per_layer(site) ? CK_LAYER : -1;
    uint32_t sites = site >= 0 ? PR_SITE_BIT(site) : 0;
    const uint32_t kv = PR_SITE_BIT(PR_SITE_ATTN_K) | PR_SITE_BIT(PR_SITE_ATTN_V);
    if (t->integration == PR_INTEGRATE_CONCAT && (sites & kv) && (t->sites & kv) == kv)
        sites = kv;
    if (chk_attach(&b, t, sites, layer, 5, 1, NULL, 0, &a, &err)) {
        chk_problem(r, "attach at %s failed: %s", where, err.msg);
        bad = 1;
        goto done;
    }
    chk_perturb(&a.set, 17, PERTURB, 0);
    for (int training = 0; training < 2 && !fin_found; training++) {
        pr_model_set_training(b.m, training);
        float loss = 0;
        if (chk_bench_step(&b, &loss, &err)) {
            chk_problem(r, "forward/backward at %s failed: %s", where, err.msg);
            bad = 1;
            goto done;
        }
        (*passes)++;
        if (fin_found) {
            chk_problem(r, "%s", fin_where);
            bad = 1;
        } else if (!isfinite(loss)) {
            chk_problem(r, "the loss is %g with the module at %s (%s), though every output of its callbacks is "
                        "finite", (double)loss, where, training ? "training" : "eval");
            bad = 1;
        }
    }
done:
    chk_tset_free(&a.set);
    chk_bench_close(&b);
    return bad;
}

void chk_finite(const pr_technique *t, const check_options *o, report *r)
{
    (void)o;
    char detail[DETAIL_MAX];
    if (chk_is_select(t) || !t->forward) {
        /* a selection technique runs no callback on the activations */
        chk_finish(r, "no forward to check (a selection technique)");
        return;
    }
    fin_tech = *t;
    fin_forward_orig = t->forward;
    fin_tech.forward = fin_forward;
    if (t->integration == PR_INTEGRATE_CUSTOM && t->integrate_forward) {
        fin_integrate_orig = t->integrate_forward;
        fin_tech.integrate_forward = fin_integrate;
    }
    int passes = 0, n_sites = 0;
    if (t->sites == 0) {
        finite_at(&fin_tech, -1, &passes, r);
        n_sites = 1;
    }
    for (int s = 0; s < PR_SITE_COUNT && !r->n_fail; s++) {
        if (!(t->sites & PR_SITE_BIT(s)))
            continue;
        int before = passes;
        finite_at(&fin_tech, s, &passes, r);
        n_sites += passes > before;
    }
    snprintf(detail, sizeof detail, "finite outputs from finite inputs in %d callback call%s at %d site%s, eval and "
             "training", fin_calls, fin_calls == 1 ? "" : "s", n_sites, n_sites == 1 ? "" : "s");
    chk_finish(r, detail);
}
