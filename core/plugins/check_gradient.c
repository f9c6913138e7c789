/* peftref core, plugin conformance checker: the gradient check.
 *
 * Central finite differences of the loss against the analytic gradient of
 * the module's tensors and of the upstream base tensors made trainable,
 * with the kink-tolerant second look described in check.h. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check_internal.h"

/* ---- gradient ----------------------------------------------------------------------------------- */

typedef struct fd_stat {
    int probed, bad;
    double worst;             /* max |fd - g| / tolerance */
    int64_t worst_i;
    double worst_g, worst_fd;
} fd_stat;

/* The loss with x[i] moved by delta (*moved: by how much the float
 * actually moved), x[i] restored after. */
static int loss_at(bench *b, float *x, int64_t i, double delta, double *loss, double *moved, pr_error *err)
{
    const float x0 = x[i];
    x[i] = (float)(x0 + delta);
    *moved = (double)x[i] - (double)x0;
    int rc = chk_bench_loss(b, loss, err);
    x[i] = x0;
    return rc;
}

/* Central difference with step eps; lp/lm/hp/hm keep the two sides. */
static int fd_central(bench *b, float *x, int64_t i, double eps, double *fd, double *lp, double *hp, double *lm,
                      double *hm, pr_error *err)
{
    int rc = loss_at(b, x, i, eps, lp, hp, err);
    if (rc == PR_OK)
        rc = loss_at(b, x, i, -eps, lm, hm, err);
    if (rc == PR_OK)
        *fd = (*lp - *lm) / (*hp - *hm);
    return rc;
}

static double fd_tol(double g, double fd)
{
    return FD_ATOL + FD_RTOL * fmax(fabs(g), fabs(fd));
}

static int chosen(const int64_t *idx, int m, int64_t i)
{
    for (int k = 0; k < m; k++)
        if (idx[k] == i)
            return 1;
    return 0;
}

/* Up to k indices: the largest |g| first (where a wrong factor shows
 * most), then a spread over the tensor (where a missing path shows). */
static int pick_probes(const float *g, int64_t n, int k, int64_t *idx)
{
    int m = 0, top = k / 2 > 0 ? k / 2 : 1;
    for (int j = 0; j < top && m < n; j++) {
        int64_t best = -1;
        for (int64_t i = 0; i < n; i++)
            if (!chosen(idx, m, i) && (best < 0 || fabsf(g[i]) > fabsf(g[best])))
                best = i;
        idx[m++] = best;
    }
    int rest = k - m;
    for (int j = 0; j < rest && m < n; j++) {
        int64_t i = (int64_t)(((double)j + 0.5) * (double)n / rest);
        if (i >= n)
            i = n - 1;
        while (chosen(idx, m, i))
            i = (i + 1) % n;
        idx[m++] = i;
    }
    return m;
}

static int fd_tensor(bench *b, const pr_tensor_info *t, const float *g, int probes, fd_stat *st, pr_error *err)
{
    memset(st, 0, sizeof *st);
    int64_t *idx = malloc((size_t)probes * sizeof *idx);
    if (!idx)
        return pr_errorf(err, PR_ERR_NOMEM, "out of memory");
    int m = pick_probes(g, t->numel, probes, idx);
    int rc = PR_OK;
    for (int k = 0; k < m && rc == PR_OK; k++) {
        double fd = 0, lp, hp, lm, hm;
        const double gk = g[idx[k]];
        if ((rc = fd_central(b, t->data, idx[k], FD_EPS, &fd, &lp, &hp, &lm, &hm, err)))
            break;
        double ratio = fabs(fd - gk) / fd_tol(gk, fd);
        if (ratio > 1) {
            /* A kink (ReLU, abs) within eps of the point spoils the central
             * difference.  Look again with a smaller step, and from each
             * side alone: one-sided differences with steps h and h/2,
             * Richardson-extrapolated (2 D(h/2) - D(h), error O(h^2)), are
             * exact enough on the side without the kink. */
            double l0 = 0, cand[3], h2[2], l2[2], dummy;
            if ((rc = chk_bench_loss(b, &l0, err)) ||
                (rc = fd_central(b, t->data, idx[k], FD_EPS / 3, &cand[0], &dummy, &dummy, &dummy, &dummy, err)) ||
                (rc = loss_at(b, t->data, idx[k], FD_EPS / 2, &l2[0], &h2[0], err)) ||
                (rc = loss_at(b, t->data, idx[k], -FD_EPS / 2, &l2[1], &h2[1], err)))
                break;
            cand[1] = 2 * (l2[0] - l0) / h2[0] - (lp - l0) / hp;
            cand[2] = 2 * (l2[1] - l0) / h2[1] - (lm - l0) / hm;
            for (int c = 0; c < 3; c++) {
                double rc2 = fabs(cand[c] - gk) / fd_tol(gk, cand[c]);
                if (rc2 < ratio) {
                    ratio = rc2;
                    fd = cand[c];
                }
            }
        }
        st->probed++;
        st->bad += ratio > 1;
        if (ratio > st->worst || k == 0) {
            st->worst = ratio;
            st->worst_i = idx[k];
            st->worst_g = g[idx[k]];
            st->worst_fd = fd;
        }
    }
    free(idx);
    return rc;
}

/* the tensors upstream of a site whose gradients need the module's d_in:
 * token and position tables always, the site layer's norm gains */
static int upstream_of(const pr_model *m, int site, const tset *mine, tset *up)
{
    int layer = site >= 0 && pr_site_is_per_layer(site) ? CK_LAYER : -2;
    for (int i = 0; i < pr_model_n_tensors(m); i++) {
        const pr_tensor_info *t = pr_model_tensor(m, i);
        if (t->kind == PR_TENSOR_MODULE || t->trainable)
            continue;
        int pick = t->kind == PR_TENSOR_EMBEDDING || (t->kind == PR_TENSOR_NORM_GAIN && t->layer == layer);
        for (int k = 0; pick && k < mine->n; k++)
            pick = mine->v[k] != t;
        if (pick && chk_tset_push(up, t, 0))
            return -1;
    }
    return 0;
}

void chk_gradient(const pr_technique *t, int site, const check_options *o, report *r)
{
    char where[64];
    chk_site_label(site, where, sizeof where);
    pr_error err = { 0 };
    bench b;
    pr_model_config cfg = chk_shape_a();
    attached a;
    memset(&a, 0, sizeof a);
    tset up = { 0 };
    float **g1 = NULL, **g2 = NULL, **gu = NULL;
    int n_mod = 0, n_up = 0, entries = 0;
    const int probes = o->probes > 0 ? o->probes : CHECK_DEFAULT_PROBES;

    if (chk_bench_open(&b, &cfg, &err)) {
        chk_problem(r, "cannot build the test model: %s", err.msg);
        goto done;
    }
    int layer = site >= 0 && pr_site_is_per_layer(site) ? CK_LAYER : -1;
    uint32_t sites = site >= 0 ? PR_SITE_BIT(site) : 0;
    /* a layer's prefix keys and values go together (the model refuses a
     * layer with one and not the other): attn.k and attn.v are checked as
     * a pair for a technique that concatenates to both */
    const uint32_t kv = PR_SITE_BIT(PR_SITE_ATTN_K) | PR_SITE_BIT(PR_SITE_ATTN_V);
    if (t->integration == PR_INTEGRATE_CONCAT && (sites & kv) && (t->sites & kv) == kv)
        sites = kv;
    if (chk_attach(&b, t, sites, layer, 1, 1, NULL, 0, &a, &err)) {
        chk_problem(r, "attach at %s failed: %s", where, err.msg);
        goto done;
    }
    chk_perturb(&a.set, 99, PERTURB, 0);
    g1 = calloc((size_t)a.set.n + 1, sizeof *g1);
    g2 = calloc((size_t)a.set.n + 1, sizeof *g2);
    if (!g1 || !g2) {
        chk_problem(r, "out of memory");
        goto done;
    }
    /* 1: only the module trains, so the site input may need no gradient */
    if (chk_bench_step(&b, NULL, &err)) {
        chk_problem(r, "forward/backward failed: %s", err.msg);
        goto done;
    }
    for (int k = 0; k < a.set.n; k++)
        if (a.set.v[k]->grad && a.set.v[k]->trainable)
            g1[k] = chk_copy_floats(a.set.v[k]->grad, a.set.v[k]->numel);
    /* 2: upstream base tensors train too, so the module's d_in is used */
    if (!chk_is_select(t)) {
        if (upstream_of(b.m, site, &a.set, &up)) {
            chk_problem(r, "out of memory");
            goto done;
        }
        for (int k = 0; k < up.n; k++)
            if (pr_model_set_trainable(b.m, up.v[k]->name, 1, &err)) {
                chk_problem(r, "cannot make '%s' trainable: %s", up.v[k]->name, err.msg);
                goto done;
            }
    }
    if (chk_bench_step(&b, NULL, &err)) {
        chk_problem(r, "forward/backward with upstream tensors trainable failed: %s", err.msg);
        goto done;
    }
    for (int k = 0; k < a.set.n; k++)
        if (g1[k])
            g2[k] = chk_copy_floats(a.set.v[k]->grad, a.set.v[k]->numel);
    gu = calloc((size_t)up.n + 1, sizeof *gu);
    if (!gu) {
        chk_problem(r, "out of memory");
        goto done;
    }
    for (int k = 0; k < up.n; k++)
        gu[k] = chk_copy_floats(up.v[k]->grad, up.v[k]->numel);

    /* the module's gradients must not depend on whether d_in is wanted */
    for (int k = 0; k < a.set.n; k++) {
        const pr_tensor_info *ti = a.set.v[k];
        if (!g1[k] || !g2[k])
            continue;
        double worst = 0;
        int64_t wi = 0;
        for (int64_t i = 0; i < ti->numel; i++) {
            double d = fabs((double)g1[k][i] - g2[k][i]) /
                       (1e-6 + SAME_RTOL * fmax(fabs(g1[k][i]), fabs(g2[k][i])));
            if (d > worst) {
                worst = d;
                wi = i;
            }
        }
        if (worst > 1) {
            char ix[64];
            chk_format_index(ti, wi, ix, sizeof ix);
            chk_problem(r, "gradient of '%s' at %s changes when the site input needs a gradient: %.6g vs %.6g at %s",
                        ti->name, where, g1[k][wi], g2[k][wi], ix);
        }
    }

    for (int pass = 0; pass < 2; pass++) {
        const tset *s = pass == 0 ? &a.set : &up;
        for (int k = 0; k < s->n; k++) {
            const pr_tensor_info *ti = s->v[k];
            const float *g = pass == 0 ? g2[k] : gu[k];
            if (!g || ti->numel <= 0)
                continue;
            fd_stat st;
            if (fd_tensor(&b, ti, g, probes, &st, &err)) {
                chk_problem(r, "forward failed while probing '%s': %s", ti->name, err.msg);
                goto done;
            }
            entries += st.probed;
            if (pass == 0)
                n_mod++;
            else
                n_up++;
            char ix[64];
            chk_format_index(ti, st.worst_i, ix, sizeof ix);
            chk_note(r, "%s%s: %d entries, worst |fd-g| / tolerance %.3g at %s (analytic %.6g vs numeric %.6g)",
                     ti->name, pass ? " (upstream)" : s->selected[k] ? " (selected)" : "", st.probed, st.worst, ix,
                     st.worst_g, st.worst_fd);
            if (st.bad) {
                double off = fabs(st.worst_g - st.worst_fd);
                if (pass == 0)
                    chk_problem(r, "gradient of '%s' off by %.3g at %s (analytic %.6g vs numeric %.6g); %d of %d "
                                "probed entries outside tolerance",
                                ti->name, off, ix, st.worst_g, st.worst_fd, st.bad, st.probed);
                else
                    chk_problem(r, "gradient of base tensor '%s', upstream of the module at %s, off by %.3g at %s "
                                "(analytic %.6g vs numeric %.6g): the module's input gradient d_in is wrong",
                                ti->name, where, off, ix, st.worst_g, st.worst_fd);
            }
        }
    }
    if (n_mod == 0 && !chk_is_select(t))
        chk_note(r, "the module registered no trainable tensor at %s", where);
done:;
    char detail[DETAIL_MAX];
    char ups[48] = "";
    if (!chk_is_select(t))
        snprintf(ups, sizeof ups, " and %d upstream", n_up);
    snprintf(detail, sizeof detail, "%d %s tensor%s%s, %d entries within |fd-g| <= %g + %g*max(|fd|,|g|)", n_mod,
             chk_is_select(t) ? "selected" : "module", n_mod == 1 ? "" : "s", ups, entries, FD_ATOL, FD_RTOL);
    chk_finish(r, detail);
    for (int k = 0; k < a.set.n; k++) {
        if (g1)
            free(g1[k]);
        if (g2)
            free(g2[k]);
    }
    for (int k = 0; gu && k < up.n; k++)
        free(gu[k]);
    free(g1);
    free(g2);
    free(gu);
    chk_tset_free(&up);
    chk_tset_free(&a.set);
    chk_bench_close(&b);
}
