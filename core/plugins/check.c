/* peftref core: the plugin conformance checker (see check.h for what each
 * check verifies and its tolerances).
 *
 * The parent process loads the plugin (after a child has loaded it once
 * without crashing), then forks one child per check.  A child builds its
 * own tiny model, attaches the technique, runs the check and writes its
 * outcome to a pipe:
 *     "    detail"      zero or more verbose lines (--verbose)
 *     "PASS detail" or "FAIL detail"
 *     "END"
 * A child that ends without "END" crashed, aborted, was stopped by its
 * alarm or exited early; the parent reports that as the check failing.
 * The parent itself never runs a model step, so no BLAS or OpenMP thread
 * state is ever inherited across fork. */
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include "peftref/module.h"
#include "check.h"
#include "rng.h"
#include "safetensors.h"

enum { CK_B = 2, CK_T = 6, CK_LAYER = 1 };

#define FD_EPS 3e-3
#define FD_RTOL 5e-2
#define FD_ATOL 1e-4
#define PERTURB 0.25f        /* module parameters move by uniform(-PERTURB, PERTURB) */
#define SAME_RTOL 1e-4       /* module gradients with and without an input gradient */
#define ACC_RTOL 1e-5        /* two accumulated backward passes vs twice one */
#define LABEL_MAX 160
#define DETAIL_MAX 1024

/* ---- test models --------------------------------------------------------------------------- */

/* A: 2 layers, C 32, H 4, F 64, V 64 (init_std 0.1 so that the loss
 * depends visibly on every tensor, as in the model tests). */
static pr_model_config shape_a(void)
{
    pr_model_config c;
    memset(&c, 0, sizeof c);
    pr_config_preset("gpt2-tiny", &c);
    c.n_layers = 2;
    c.d_model = 32;
    c.n_heads = 4;
    c.n_kv_heads = 4;
    c.d_head = 8;
    c.d_ff = 64;
    c.vocab_size = 64;
    c.max_seq = 64;
    c.init_std = 0.1f;
    c.seed = 11;
    return c;
}

/* B: 3 layers, grouped-query attention (Hkv < H) and d_head != C/H, so
 * widths that a technique derives wrongly from d_model show up. */
static pr_model_config shape_b(void)
{
    pr_model_config c = shape_a();
    c.n_layers = 3;
    c.d_model = 24;
    c.n_heads = 4;
    c.n_kv_heads = 2;
    c.d_head = 5;
    c.d_ff = 40;
    c.vocab_size = 50;
    return c;
}

typedef struct bench {
    pr_model *m;
    pr_batch batch;
    int tokens[CK_B * CK_T], targets[CK_B * CK_T];
} bench;

static int bench_open(bench *b, const pr_model_config *cfg, pr_error *err)
{
    memset(b, 0, sizeof *b);
    int rc = pr_model_create(cfg, &b->m, err);
    if (rc == PR_OK)
        rc = pr_model_reserve(b->m, CK_B, CK_T, err);
    if (rc)
        return rc;
    pr_rng r;
    rng_seed(&r, 1234);
    for (int i = 0; i < CK_B * CK_T; i++) {
        b->tokens[i] = (int)(rng_next(&r) % (uint64_t)cfg->vocab_size);
        b->targets[i] = (int)(rng_next(&r) % (uint64_t)cfg->vocab_size);
    }
    b->batch.tokens = b->tokens;
    b->batch.targets = b->targets;
    b->batch.B = CK_B;
    b->batch.T = CK_T;
    return PR_OK;
}

static void bench_close(bench *b)
{
    if (b->m) {
        pr_model_detach_modules(b->m);
        pr_model_free(b->m);
    }
    b->m = NULL;
}

static size_t bench_logits_n(const bench *b)
{
    return (size_t)CK_B * CK_T * (size_t)pr_model_get_config(b->m)->vocab_size;
}

/* Mean cross-entropy of the last forward, recomputed in double from the
 * logits so that finite differences are not limited by a float sum. */
static double bench_ce(const bench *b)
{
    const float *logits = pr_model_logits(b->m);
    int V = pr_model_get_config(b->m)->vocab_size;
    double sum = 0;
    for (int i = 0; i < CK_B * CK_T; i++) {
        const float *row = logits + (size_t)i * V;
        double mx = row[0], z = 0;
        for (int v = 1; v < V; v++)
            mx = fmax(mx, row[v]);
        for (int v = 0; v < V; v++)
            z += exp(row[v] - mx);
        sum += mx + log(z) - row[b->targets[i]];
    }
    return sum / (CK_B * CK_T);
}

static int bench_loss(bench *b, double *loss, pr_error *err)
{
    int rc = pr_model_forward(b->m, &b->batch, NULL, err);
    if (rc)
        return rc;
    *loss = bench_ce(b);
    return PR_OK;
}

/* Forward with targets and backward, accumulating (no zeroing). */
static int bench_fwd_bwd(bench *b, float *loss, pr_error *err)
{
    float l = 0;
    int rc = pr_model_forward(b->m, &b->batch, &l, err);
    if (rc == PR_OK)
        rc = pr_model_backward(b->m, err);
    if (loss)
        *loss = l;
    return rc;
}

static int bench_step(bench *b, float *loss, pr_error *err)
{
    pr_model_zero_grad(b->m);
    return bench_fwd_bwd(b, loss, err);
}

/* ---- a module and its tensors ------------------------------------------------------------------ */

static int site_exists(const pr_model *m, int site)
{
    return pr_model_site_dims(m, site, NULL, NULL) == 0;
}

static int is_select(const pr_technique *t)
{
    return t->integration == PR_INTEGRATE_SELECT || t->adaptation == PR_ADAPT_SELECTION;
}

static void site_label(int site, char *buf, size_t len)
{
    if (site < 0)
        snprintf(buf, len, "default sites");
    else if (pr_site_is_per_layer(site))
        snprintf(buf, len, "h.%d.%s", CK_LAYER, pr_site_name(site));
    else
        snprintf(buf, len, "%s", pr_site_name(site));
}

/* The module's tensors: those registered under "<module>/" and the base
 * tensors its attach made trainable (selection). */
typedef struct tset {
    const pr_tensor_info **v;
    int *selected;           /* 1 for a selected base tensor */
    int n;
} tset;

static void tset_free(tset *s)
{
    free(s->v);
    free(s->selected);
    memset(s, 0, sizeof *s);
}

static int tset_push(tset *s, const pr_tensor_info *t, int selected)
{
    const pr_tensor_info **v = realloc(s->v, (size_t)(s->n + 1) * sizeof *v);
    if (!v)
        return -1;
    s->v = v;
    int *sel = realloc(s->selected, (size_t)(s->n + 1) * sizeof *sel);
    if (!sel)
        return -1;
    s->selected = sel;
    s->v[s->n] = t;
    s->selected[s->n++] = selected;
    return 0;
}

static int has_prefix(const char *s, const char *prefix)
{
    return strncmp(s, prefix, strlen(prefix)) == 0;
}

/* trainable flags of the table before an attach */
static unsigned char *trainable_flags(const pr_model *m, int *n)
{
    *n = pr_model_n_tensors(m);
    unsigned char *f = calloc((size_t)*n + 1, 1);
    for (int i = 0; f && i < *n; i++)
        f[i] = (unsigned char)(pr_model_tensor(m, i)->trainable != 0);
    return f;
}

typedef struct attached {
    pr_module *mod;
    char prefix[256];
    tset set;
} attached;

static int attach(bench *b, const pr_technique *t, uint32_t sites, int layer, uint64_t seed, int trainable,
                  const pr_option_setting *opts, int n_opts, attached *a, pr_error *err)
{
    memset(a, 0, sizeof *a);
    int n_before = 0;
    unsigned char *before = trainable_flags(b->m, &n_before);
    if (!before)
        return pr_errorf(err, PR_ERR_NOMEM, "out of memory");
    pr_module_spec s;
    memset(&s, 0, sizeof s);
    s.technique = t;
    s.sites = sites;
    s.layers = layer >= 0 ? &layer : NULL;
    s.n_layers = layer >= 0 ? 1 : 0;
    s.options = opts;
    s.n_options = n_opts;
    s.trainable = trainable;
    s.seed = seed;
    int rc = pr_module_attach(b->m, &s, &a->mod, err);
    if (rc) {
        free(before);
        return rc;
    }
    snprintf(a->prefix, sizeof a->prefix, "%s/", pr_module_name(a->mod));
    for (int i = 0; i < pr_model_n_tensors(b->m) && rc == PR_OK; i++) {
        const pr_tensor_info *ti = pr_model_tensor(b->m, i);
        int mine = has_prefix(ti->name, a->prefix);
        int sel = !mine && i < n_before && ti->trainable && !before[i];
        if ((mine || sel) && tset_push(&a->set, ti, sel))
            rc = pr_errorf(err, PR_ERR_NOMEM, "out of memory");
    }
    free(before);
    return rc;
}

/* Move the module's own tensors (not selected base tensors unless asked)
 * off their initial values: x += uniform(-scale, scale). */
static void perturb(const tset *s, uint64_t seed, float scale, int with_selected)
{
    pr_rng r;
    rng_seed(&r, seed);
    for (int k = 0; k < s->n; k++) {
        if (s->selected[k] && !with_selected)
            continue;
        float *x = s->v[k]->data;
        for (int64_t i = 0; i < s->v[k]->numel; i++)
            x[i] += scale * (2.0f * rng_uniform(&r) - 1.0f);
    }
}

static float *copy_floats(const float *x, int64_t n)
{
    float *c = malloc((size_t)(n > 0 ? n : 1) * sizeof *c);
    if (c && n > 0)
        memcpy(c, x, (size_t)n * sizeof *c);
    return c;
}

/* "[i, j]" of flat index i in a tensor of that shape */
static void format_index(const pr_tensor_info *t, int64_t flat, char *buf, size_t len)
{
    int64_t idx[4] = { 0 };
    for (int d = t->ndim - 1; d >= 0; d--) {
        int64_t n = t->shape[d] > 0 ? t->shape[d] : 1;
        idx[d] = flat % n;
        flat /= n;
    }
    size_t o = 0;
    o += (size_t)snprintf(buf, len, "[");
    for (int d = 0; d < t->ndim && o < len; d++)
        o += (size_t)snprintf(buf + o, len - o, "%s%lld", d ? ", " : "", (long long)idx[d]);
    if (o < len)
        snprintf(buf + o, len - o, "]");
}

/* ---- what a child reports ----------------------------------------------------------------------- */

typedef struct report {
    FILE *f;
    int verbose;
    int n_fail;
    char first[DETAIL_MAX];
} report;

static void note(report *r, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void note(report *r, const char *fmt, ...)
{
    if (!r->verbose)
        return;
    va_list ap;
    va_start(ap, fmt);
    fputs("    ", r->f);
    vfprintf(r->f, fmt, ap);
    fputc('\n', r->f);
    va_end(ap);
    fflush(r->f);
}

/* A problem: the first one becomes the check's detail line. */
static void problem(report *r, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void problem(report *r, const char *fmt, ...)
{
    char buf[DETAIL_MAX];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    if (r->n_fail++ == 0)
        snprintf(r->first, sizeof r->first, "%s", buf);
    note(r, "problem: %s", buf);
}

/* The outcome line: FAIL with the first problem, or PASS with detail. */
static void finish(report *r, const char *pass_detail)
{
    if (r->n_fail == 0)
        fprintf(r->f, "PASS %s\n", pass_detail);
    else if (r->n_fail == 1)
        fprintf(r->f, "FAIL %s\n", r->first);
    else
        fprintf(r->f, "FAIL %s (and %d more problem%s)\n", r->first, r->n_fail - 1, r->n_fail > 2 ? "s" : "");
    fputs("END\n", r->f);
    fflush(r->f);
}

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
    int rc = bench_loss(b, loss, err);
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
            if ((rc = bench_loss(b, &l0, err)) ||
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
        if (pick && tset_push(up, t, 0))
            return -1;
    }
    return 0;
}

static void check_gradient(const pr_technique *t, int site, const check_options *o, report *r)
{
    char where[64];
    site_label(site, where, sizeof where);
    pr_error err = { 0 };
    bench b;
    pr_model_config cfg = shape_a();
    attached a;
    memset(&a, 0, sizeof a);
    tset up = { 0 };
    float **g1 = NULL, **g2 = NULL, **gu = NULL;
    int n_mod = 0, n_up = 0, entries = 0;
    const int probes = o->probes > 0 ? o->probes : CHECK_DEFAULT_PROBES;

    if (bench_open(&b, &cfg, &err)) {
        problem(r, "cannot build the test model: %s", err.msg);
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
    if (attach(&b, t, sites, layer, 1, 1, NULL, 0, &a, &err)) {
        problem(r, "attach at %s failed: %s", where, err.msg);
        goto done;
    }
    perturb(&a.set, 99, PERTURB, 0);
    g1 = calloc((size_t)a.set.n + 1, sizeof *g1);
    g2 = calloc((size_t)a.set.n + 1, sizeof *g2);
    if (!g1 || !g2) {
        problem(r, "out of memory");
        goto done;
    }
    /* 1: only the module trains, so the site input may need no gradient */
    if (bench_step(&b, NULL, &err)) {
        problem(r, "forward/backward failed: %s", err.msg);
        goto done;
    }
    for (int k = 0; k < a.set.n; k++)
        if (a.set.v[k]->grad && a.set.v[k]->trainable)
            g1[k] = copy_floats(a.set.v[k]->grad, a.set.v[k]->numel);
    /* 2: upstream base tensors train too, so the module's d_in is used */
    if (!is_select(t)) {
        if (upstream_of(b.m, site, &a.set, &up)) {
            problem(r, "out of memory");
            goto done;
        }
        for (int k = 0; k < up.n; k++)
            if (pr_model_set_trainable(b.m, up.v[k]->name, 1, &err)) {
                problem(r, "cannot make '%s' trainable: %s", up.v[k]->name, err.msg);
                goto done;
            }
    }
    if (bench_step(&b, NULL, &err)) {
        problem(r, "forward/backward with upstream tensors trainable failed: %s", err.msg);
        goto done;
    }
    for (int k = 0; k < a.set.n; k++)
        if (g1[k])
            g2[k] = copy_floats(a.set.v[k]->grad, a.set.v[k]->numel);
    gu = calloc((size_t)up.n + 1, sizeof *gu);
    if (!gu) {
        problem(r, "out of memory");
        goto done;
    }
    for (int k = 0; k < up.n; k++)
        gu[k] = copy_floats(up.v[k]->grad, up.v[k]->numel);

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
            format_index(ti, wi, ix, sizeof ix);
            problem(r, "gradient of '%s' at %s changes when the site input needs a gradient: %.6g vs %.6g at %s",
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
                problem(r, "forward failed while probing '%s': %s", ti->name, err.msg);
                goto done;
            }
            entries += st.probed;
            if (pass == 0)
                n_mod++;
            else
                n_up++;
            char ix[64];
            format_index(ti, st.worst_i, ix, sizeof ix);
            note(r, "%s%s: %d entries, worst |fd-g| / tolerance %.3g at %s (analytic %.6g vs numeric %.6g)",
                 ti->name, pass ? " (upstream)" : s->selected[k] ? " (selected)" : "", st.probed, st.worst, ix,
                 st.worst_g, st.worst_fd);
            if (st.bad) {
                double off = fabs(st.worst_g - st.worst_fd);
                if (pass == 0)
                    problem(r, "gradient of '%s' off by %.3g at %s (analytic %.6g vs numeric %.6g); %d of %d "
                            "probed entries outside tolerance",
                            ti->name, off, ix, st.worst_g, st.worst_fd, st.bad, st.probed);
                else
                    problem(r, "gradient of base tensor '%s', upstream of the module at %s, off by %.3g at %s "
                            "(analytic %.6g vs numeric %.6g): the module's input gradient d_in is wrong",
                            ti->name, where, off, ix, st.worst_g, st.worst_fd);
            }
        }
    }
    if (n_mod == 0 && !is_select(t))
        note(r, "the module registered no trainable tensor at %s", where);
done:;
    char detail[DETAIL_MAX];
    char ups[48] = "";
    if (!is_select(t))
        snprintf(ups, sizeof ups, " and %d upstream", n_up);
    snprintf(detail, sizeof detail, "%d %s tensor%s%s, %d entries within |fd-g| <= %g + %g*max(|fd|,|g|)", n_mod,
             is_select(t) ? "selected" : "module", n_mod == 1 ? "" : "s", ups, entries, FD_ATOL, FD_RTOL);
    finish(r, detail);
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
    tset_free(&up);
    tset_free(&a.set);
    bench_close(&b);
}

/* ---- params -------------------------------------------------------------------------------------- */

/* plan vs module vs table for one attach; returns the parameter count or -1 */
static int64_t params_case(const pr_technique *t, const pr_model_config *cfg, const char *shape, uint32_t sites,
                           int trainable, report *r)
{
    pr_error err = { 0 };
    bench b;
    attached a;
    memset(&a, 0, sizeof a);
    int64_t result = -1;
    char what[128];
    snprintf(what, sizeof what, "shape %s, %s sites%s", shape, sites ? "all supported" : "default",
             trainable ? "" : ", frozen");
    pr_module_spec s;
    memset(&s, 0, sizeof s);
    s.technique = t;
    s.sites = sites;
    s.trainable = trainable;
    s.seed = 1;
    pr_module_plan plan;
    if (pr_module_plan_for(cfg, &s, &plan, &err)) {
        problem(r, "pr_module_plan_for (%s) failed: %s", what, err.msg);
        return -1;
    }
    if (bench_open(&b, cfg, &err)) {
        problem(r, "cannot build the test model: %s", err.msg);
        goto done;
    }
    if (attach(&b, t, sites, -1, 1, trainable, NULL, 0, &a, &err)) {
        problem(r, "attach (%s) failed: %s", what, err.msg);
        goto done;
    }
    int64_t reg = 0, reg_train = 0, selected = 0;
    for (int k = 0; k < a.set.n; k++) {
        const pr_tensor_info *ti = a.set.v[k];
        if (a.set.selected[k]) {
            selected += ti->numel;
            continue;
        }
        reg += ti->numel;
        if (ti->trainable && ti->grad)
            reg_train += ti->numel;
    }
    int64_t count = pr_module_param_count(a.mod), train = pr_module_trainable_count(a.mod);
    note(r, "%s: declared %lld (trainable %lld, base %lld, %d insertions), module %lld (trainable %lld, %d "
         "insertions), table %lld (trainable %lld, base %lld)",
         what, (long long)plan.params, (long long)plan.trainable, (long long)plan.base_selected, plan.insertions,
         (long long)count, (long long)train, pr_module_insertions(a.mod), (long long)reg, (long long)reg_train,
         (long long)selected);
    int bad = r->n_fail;
    if (plan.params != count || count != reg)
        problem(r, "%s: parameter counts disagree: declared %lld, module %lld, registered tensors %lld", what,
                (long long)plan.params, (long long)count, (long long)reg);
    if (plan.trainable != train || train != reg_train)
        problem(r, "%s: trainable counts disagree: declared %lld, module %lld, registered trainable tensors %lld",
                what, (long long)plan.trainable, (long long)train, (long long)reg_train);
    if (!trainable && (train != 0 || reg_train != 0))
        problem(r, "%s: a frozen module trains %lld parameters", what, (long long)(train ? train : reg_train));
    if (plan.insertions != pr_module_insertions(a.mod))
        problem(r, "%s: %d insertions declared, %d made", what, plan.insertions, pr_module_insertions(a.mod));
    if (plan.base_selected != selected)
        problem(r, "%s: %lld base elements declared selected, %lld made trainable", what,
                (long long)plan.base_selected, (long long)selected);
    if (plan.sites != pr_module_sites(a.mod))
        problem(r, "%s: declared sites 0x%x, used 0x%x", what, plan.sites, pr_module_sites(a.mod));
    if (r->n_fail == bad)
        result = is_select(t) ? selected : count;
done:
    tset_free(&a.set);
    bench_close(&b);
    return result;
}

static void check_params(const pr_technique *t, const check_options *o, report *r)
{
    (void)o;
    char detail[DETAIL_MAX] = "";
    size_t off = 0;
    for (int k = 0; k < 2; k++) {
        pr_model_config cfg = k == 0 ? shape_a() : shape_b();
        const char *shape = k == 0 ? "A" : "B";
        int64_t n = params_case(t, &cfg, shape, 0, 1, r);
        if (n >= 0 && off < sizeof detail)
            off += (size_t)snprintf(detail + off, sizeof detail - off, "%s%lld %s on shape %s (%d layers, d_model %d)",
                                    k ? ", " : "", (long long)n, is_select(t) ? "base elements" : "parameters",
                                    shape, cfg.n_layers, cfg.d_model);
        if (!is_select(t)) {
            params_case(t, &cfg, shape, 0, 0, r);
            /* every supported site this shape has */
            pr_model *m = NULL;
            pr_error err = { 0 };
            uint32_t all = 0;
            if (pr_model_create(&cfg, &m, &err) == PR_OK) {
                for (int s = 0; s < PR_SITE_COUNT; s++)
                    if ((t->sites & PR_SITE_BIT(s)) && site_exists(m, s))
                        all |= PR_SITE_BIT(s);
                pr_model_free(m);
            }
            if (all && all != t->default_sites)
                params_case(t, &cfg, shape, all, 1, r);
        }
    }
    if (off < sizeof detail)
        snprintf(detail + off, sizeof detail - off, "; declared = allocated = registered");
    finish(r, detail);
}

/* ---- determinism ---------------------------------------------------------------------------------- */

/* Everything one pass produces: loss, logits, then each trainable tensor's
 * gradient, as named segments of one array. */
typedef struct snap {
    float *v;
    size_t n;
    int nseg;
    size_t *off;       /* nseg + 1 */
    char **name;
} snap;

static void snap_free(snap *s)
{
    for (int i = 0; i < s->nseg; i++)
        free(s->name[i]);
    free(s->name);
    free(s->off);
    free(s->v);
    memset(s, 0, sizeof *s);
}

static int snap_add(snap *s, const char *name, const float *x, size_t n)
{
    float *v = realloc(s->v, (s->n + n + 1) * sizeof *v);
    size_t *off = realloc(s->off, (size_t)(s->nseg + 2) * sizeof *off);
    char **nm = realloc(s->name, (size_t)(s->nseg + 1) * sizeof *nm);
    if (v)
        s->v = v;
    if (off)
        s->off = off;
    if (nm)
        s->name = nm;
    if (!v || !off || !nm)
        return -1;
    char *copy = strdup(name);
    if (!copy)
        return -1;
    if (n)
        memcpy(s->v + s->n, x, n * sizeof *x);
    s->off[s->nseg] = s->n;
    s->n += n;
    s->off[s->nseg + 1] = s->n;
    s->name[s->nseg++] = copy;
    return 0;
}

static int snap_take(bench *b, float loss, snap *s)
{
    memset(s, 0, sizeof *s);
    if (snap_add(s, "the loss", &loss, 1) || snap_add(s, "the logits", pr_model_logits(b->m), bench_logits_n(b)))
        return -1;
    for (int i = 0; i < pr_model_n_tensors(b->m); i++) {
        const pr_tensor_info *t = pr_model_tensor(b->m, i);
        if (!t->trainable || !t->grad)
            continue;
        char name[300];
        snprintf(name, sizeof name, "the gradient of '%s'", t->name);
        if (snap_add(s, name, t->grad, (size_t)t->numel))
            return -1;
    }
    return 0;
}

/* 0 when bit-identical; otherwise a problem naming the first difference */
static int snap_compare(const snap *x, const snap *y, const char *how, report *r)
{
    if (x->nseg != y->nseg || x->n != y->n) {
        problem(r, "%s: different sets of trainable tensors (%d vs %d)", how, x->nseg, y->nseg);
        return 1;
    }
    for (int k = 0; k < x->nseg; k++) {
        size_t a = x->off[k], n = x->off[k + 1] - a;
        if (memcmp(x->v + a, y->v + a, n * sizeof(float)) == 0)
            continue;
        size_t i = 0;
        while (i < n && memcmp(&x->v[a + i], &y->v[a + i], sizeof(float)) == 0)
            i++;
        problem(r, "%s: %s differs (first at element %zu: %.9g vs %.9g)", how, x->name[k], i, x->v[a + i],
                y->v[a + i]);
        return 1;
    }
    return 0;
}

static void check_determinism(const pr_technique *t, const check_options *o, report *r)
{
    (void)o;
    pr_error err = { 0 };
    pr_model_config cfg = shape_a();
    bench b[2];
    attached a[2];
    snap s[2][3];
    memset(b, 0, sizeof b);
    memset(a, 0, sizeof a);
    memset(s, 0, sizeof s);
    for (int j = 0; j < 2; j++) {
        if (bench_open(&b[j], &cfg, &err)) {
            problem(r, "cannot build the test model: %s", err.msg);
            goto done;
        }
        if (attach(&b[j], t, 0, -1, 7, 1, NULL, 0, &a[j], &err)) {
            problem(r, "attach failed: %s", err.msg);
            goto done;
        }
    }
    if (a[0].set.n != a[1].set.n) {
        problem(r, "two attaches with seed 7 register %d and %d tensors", a[0].set.n, a[1].set.n);
        goto done;
    }
    for (int k = 0; k < a[0].set.n; k++) {
        const pr_tensor_info *x = a[0].set.v[k], *y = a[1].set.v[k];
        if (strcmp(x->name, y->name) != 0 || x->numel != y->numel) {
            problem(r, "two attaches with seed 7 register '%s' and '%s'", x->name, y->name);
            goto done;
        }
        if (memcmp(x->data, y->data, (size_t)x->numel * sizeof(float)) != 0) {
            int64_t i = 0;
            while (i < x->numel && memcmp(&x->data[i], &y->data[i], sizeof(float)) == 0)
                i++;
            char ix[64];
            format_index(x, i, ix, sizeof ix);
            problem(r, "parameter '%s' differs between two attaches with seed 7 (at %s: %.9g vs %.9g)", x->name, ix,
                    x->data[i], y->data[i]);
        }
    }
    if (r->n_fail)
        goto done;
    for (int j = 0; j < 2; j++) {
        perturb(&a[j].set, 5, PERTURB, 0);
        const pr_tensor_info *wte = pr_model_find_tensor(b[j].m, "wte.weight");
        if (wte && !wte->trainable && pr_model_set_trainable(b[j].m, wte->name, 1, &err)) {
            problem(r, "cannot make '%s' trainable: %s", wte->name, err.msg);
            goto done;
        }
        /* two eval passes, then one in training mode (dropout and the like) */
        for (int p = 0; p < 3; p++) {
            float loss = 0;
            pr_model_set_training(b[j].m, p == 2);
            if (bench_step(&b[j], &loss, &err)) {
                problem(r, "forward/backward failed: %s", err.msg);
                goto done;
            }
            if (snap_take(&b[j], loss, &s[j][p])) {
                problem(r, "out of memory");
                goto done;
            }
        }
    }
    if (!snap_compare(&s[0][0], &s[1][0], "two attaches with seed 7, one forward+backward each", r) &&
        !snap_compare(&s[0][0], &s[0][1], "two forward+backward passes on one model", r))
        snap_compare(&s[0][2], &s[1][2], "two attaches with seed 7, forward+backward in training mode", r);
done:
    finish(r, "same seed, same parameters; bit-identical loss, logits and gradients across two attaches, two "
              "passes and training mode");
    for (int j = 0; j < 2; j++) {
        for (int p = 0; p < 3; p++)
            snap_free(&s[j][p]);
        tset_free(&a[j].set);
        bench_close(&b[j]);
    }
}

/* ---- accumulation --------------------------------------------------------------------------------- */

static void check_accumulation(const pr_technique *t, const check_options *o, report *r)
{
    (void)o;
    pr_error err = { 0 };
    pr_model_config cfg = shape_a();
    bench b;
    attached a;
    memset(&a, 0, sizeof a);
    float **g1 = NULL;
    int checked = 0;
    if (bench_open(&b, &cfg, &err)) {
        problem(r, "cannot build the test model: %s", err.msg);
        goto done;
    }
    if (attach(&b, t, 0, -1, 3, 1, NULL, 0, &a, &err)) {
        problem(r, "attach failed: %s", err.msg);
        goto done;
    }
    perturb(&a.set, 8, PERTURB, 0);
    g1 = calloc((size_t)a.set.n + 1, sizeof *g1);
    if (!g1) {
        problem(r, "out of memory");
        goto done;
    }
    if (bench_step(&b, NULL, &err)) {
        problem(r, "forward/backward failed: %s", err.msg);
        goto done;
    }
    for (int k = 0; k < a.set.n; k++)
        if (a.set.v[k]->trainable && a.set.v[k]->grad)
            g1[k] = copy_floats(a.set.v[k]->grad, a.set.v[k]->numel);
    if (bench_step(&b, NULL, &err) || bench_fwd_bwd(&b, NULL, &err)) {
        problem(r, "forward/backward failed: %s", err.msg);
        goto done;
    }
    for (int k = 0; k < a.set.n; k++) {
        const pr_tensor_info *ti = a.set.v[k];
        if (!g1[k])
            continue;
        checked++;
        double gmax = 0, dot = 0, nn = 0, worst = 0;
        int64_t wi = 0;
        for (int64_t i = 0; i < ti->numel; i++)
            gmax = fmax(gmax, fabs(g1[k][i]));
        for (int64_t i = 0; i < ti->numel; i++) {
            double want = 2.0 * g1[k][i], got = ti->grad[i];
            dot += got * g1[k][i];
            nn += (double)g1[k][i] * g1[k][i];
            double d = fabs(got - want) / (1e-7 * gmax + ACC_RTOL * fabs(want) + 1e-30);
            if (d > worst) {
                worst = d;
                wi = i;
            }
        }
        if (worst > 1) {
            char ix[64];
            format_index(ti, wi, ix, sizeof ix);
            problem(r, "gradient of '%s' is not accumulated: after two backward passes without zeroing it is %.4g "
                    "times one pass's (at %s: %.6g, one pass %.6g); backward must add (+=) into grads",
                    ti->name, nn > 0 ? dot / nn : 0.0, ix, ti->grad[wi], g1[k][wi]);
        }
    }
done:;
    char detail[DETAIL_MAX];
    snprintf(detail, sizeof detail, "%d tensor%s: two backward passes give twice one pass's gradient", checked,
             checked == 1 ? "" : "s");
    finish(r, detail);
    for (int k = 0; g1 && k < a.set.n; k++)
        free(g1[k]);
    free(g1);
    tset_free(&a.set);
    bench_close(&b);
}

/* ---- save and load -------------------------------------------------------------------------------- */

static void check_save_load(const pr_technique *t, const check_options *o, report *r)
{
    (void)o;
    pr_error err = { 0 };
    pr_model_config cfg = shape_a();
    bench b[2];
    attached a[2];
    memset(b, 0, sizeof b);
    memset(a, 0, sizeof a);
    float *logits = NULL;
    double loss[2] = { 0, 0 };
    st_entry *ent = NULL;
    st_file *f = NULL;
    char dir[] = "/tmp/peftref-check-XXXXXX", path[sizeof dir + 32] = "";
    int have_dir = 0;

    for (int j = 0; j < 2; j++) {
        if (bench_open(&b[j], &cfg, &err)) {
            problem(r, "cannot build the test model: %s", err.msg);
            goto done;
        }
        if (attach(&b[j], t, 0, -1, j == 0 ? 21 : 22, 1, NULL, 0, &a[j], &err)) {
            problem(r, "attach failed: %s", err.msg);
            goto done;
        }
    }
    perturb(&a[0].set, 31, PERTURB, 1);
    if (bench_loss(&b[0], &loss[0], &err)) {
        problem(r, "forward failed: %s", err.msg);
        goto done;
    }
    logits = copy_floats(pr_model_logits(b[0].m), (int64_t)bench_logits_n(&b[0]));
    ent = calloc((size_t)a[0].set.n + 1, sizeof *ent);
    if (!logits || !ent) {
        problem(r, "out of memory");
        goto done;
    }
    for (int k = 0; k < a[0].set.n; k++) {
        const pr_tensor_info *ti = a[0].set.v[k];
        ent[k].name = ti->name;
        ent[k].ndim = ti->ndim;
        for (int d = 0; d < ti->ndim; d++)
            ent[k].shape[d] = ti->shape[d];
        ent[k].data = ti->data;
        ent[k].dtype = ST_F32;
    }
    if (!mkdtemp(dir)) {
        problem(r, "cannot make a temporary directory: %s", strerror(errno));
        goto done;
    }
    have_dir = 1;
    snprintf(path, sizeof path, "%s/module.safetensors", dir);
    st_kv meta[2] = { { "technique", t->name }, { "version", t->version ? t->version : "" } };
    if (st_write(path, ent, a[0].set.n, meta, 2, &err) || st_open(path, 0, &f, &err)) {
        problem(r, "writing and reading back the module's tensors failed: %s", err.msg);
        goto done;
    }
    /* the mapping outlives the name; a crash below leaves nothing behind */
    unlink(path);
    rmdir(dir);
    have_dir = 0;
    if (st_count(f) != a[1].set.n)
        problem(r, "the saved file holds %d tensors, a fresh attach registers %d", st_count(f), a[1].set.n);
    for (int k = 0; k < a[1].set.n; k++) {
        const pr_tensor_info *ti = a[1].set.v[k];
        const st_tensor *st = st_find(f, ti->name);
        if (!st) {
            problem(r, "tensor '%s' of a fresh attach is not in the saved module", ti->name);
            continue;
        }
        int same = st->ndim == ti->ndim && st->numel == ti->numel;
        for (int d = 0; same && d < ti->ndim; d++)
            same = st->shape[d] == ti->shape[d];
        if (!same) {
            problem(r, "tensor '%s' is saved with another shape than a fresh attach gives it", ti->name);
            continue;
        }
        if (st_to_f32(f, st, ti->data, &err))
            problem(r, "reading '%s': %s", ti->name, err.msg);
    }
    if (r->n_fail)
        goto done;
    if (bench_loss(&b[1], &loss[1], &err)) {
        problem(r, "forward after loading failed: %s", err.msg);
        goto done;
    }
    const float *l2 = pr_model_logits(b[1].m);
    size_t nl = bench_logits_n(&b[1]);
    if (memcmp(logits, l2, nl * sizeof(float)) != 0) {
        double worst = 0;
        for (size_t i = 0; i < nl; i++)
            worst = fmax(worst, fabs((double)logits[i] - l2[i]));
        problem(r, "the reloaded module gives another loss: %.9g before saving, %.9g after loading (logits differ "
                "by up to %.3g)", loss[0], loss[1], worst);
    }
done:;
    char detail[DETAIL_MAX];
    snprintf(detail, sizeof detail, "%d tensor%s saved and reloaded into a module attached with another seed; "
             "bit-identical logits (loss %.6f)", a[0].set.n, a[0].set.n == 1 ? "" : "s", loss[0]);
    finish(r, detail);
    if (f)
        st_close(f);
    if (have_dir) {
        unlink(path);
        rmdir(dir);
    }
    free(ent);
    free(logits);
    for (int j = 0; j < 2; j++) {
        tset_free(&a[j].set);
        bench_close(&b[j]);
    }
}

/* ---- options -------------------------------------------------------------------------------------- */

static int finite_bound(double v, int type)
{
    return isfinite(v) && (type != PR_OPT_INT || fabs(v) < 9e15);
}

/* one attach with one option set to text: 0 accepted, else the status */
static int try_option(bench *b, const pr_technique *t, const pr_option_setting *opts, int n, pr_error *err)
{
    attached a;
    int rc = attach(b, t, 0, -1, 1, 1, opts, n, &a, err);
    tset_free(&a.set);
    pr_model_detach_modules(b->m);
    return rc;
}

static void must_reject(bench *b, const pr_technique *t, const pr_option_decl *od, const char *text,
                        const char *why, report *r, int *tried)
{
    pr_error err = { 0 };
    pr_option_setting s = { od->name, text, -1 };
    (*tried)++;
    if (try_option(b, t, &s, 1, &err) == PR_OK)
        problem(r, "option '%s' = '%s' (%s) was accepted", od->name, text, why);
    else
        note(r, "%s = '%s' (%s) rejected: %s", od->name, text, why, err.msg);
}

static void check_options_of(const pr_technique *t, const check_options *o, report *r)
{
    (void)o;
    pr_error err = { 0 };
    pr_model_config cfg = shape_a();
    bench b;
    int tried = 0;
    pr_option_setting *defs = calloc(t->n_options + 1, sizeof *defs);
    char (*text)[64] = calloc(t->n_options + 1, sizeof *text);
    if (!defs || !text) {
        problem(r, "out of memory");
        goto done;
    }
    if (bench_open(&b, &cfg, &err)) {
        problem(r, "cannot build the test model: %s", err.msg);
        goto done;
    }
    for (uint32_t i = 0; i < t->n_options; i++) {
        const pr_option_decl *od = &t->options[i];
        char v[64];
        int bounded = !(od->min == 0.0 && od->max == 0.0);
        defs[i].name = od->name;
        defs[i].site = -1;
        defs[i].value = text[i];
        switch (od->type) {
        case PR_OPT_INT:
            snprintf(text[i], sizeof text[i], "%lld", (long long)od->def);
            if (bounded && finite_bound(od->min, od->type)) {
                snprintf(v, sizeof v, "%lld", (long long)ceil(od->min) - 1);
                must_reject(&b, t, od, v, "below its minimum", r, &tried);
            }
            if (bounded && finite_bound(od->max, od->type)) {
                snprintf(v, sizeof v, "%lld", (long long)floor(od->max) + 1);
                must_reject(&b, t, od, v, "above its maximum", r, &tried);
            }
            break;
        case PR_OPT_FLOAT:
            snprintf(text[i], sizeof text[i], "%.17g", od->def);
            if (bounded && finite_bound(od->min, od->type)) {
                snprintf(v, sizeof v, "%.17g", od->min - fmax(fabs(od->min) * 1e-6, 1e-6));
                must_reject(&b, t, od, v, "below its minimum", r, &tried);
            }
            if (bounded && finite_bound(od->max, od->type)) {
                snprintf(v, sizeof v, "%.17g", od->max + fmax(fabs(od->max) * 1e-6, 1e-6));
                must_reject(&b, t, od, v, "above its maximum", r, &tried);
            }
            break;
        case PR_OPT_BOOL:
            snprintf(text[i], sizeof text[i], "%s", od->def != 0 ? "true" : "false");
            must_reject(&b, t, od, "maybe", "not a boolean", r, &tried);
            break;
        case PR_OPT_ENUM: {
            int n = 0;
            while (od->choices && od->choices[n])
                n++;
            int k = (int)od->def;
            snprintf(text[i], sizeof text[i], "%s", k >= 0 && k < n ? od->choices[k] : "?");
            must_reject(&b, t, od, "no-such-choice", "not one of its choices", r, &tried);
            break;
        }
        default:
            defs[i].value = od->def_str ? od->def_str : "";
            break;
        }
    }
    if (try_option(&b, t, defs, (int)t->n_options, &err) != PR_OK)
        problem(r, "attaching with every option set to its default failed: %s", err.msg);
    bench_close(&b);
done:;
    char detail[DETAIL_MAX];
    snprintf(detail, sizeof detail, "%d out-of-range or malformed value%s rejected; the defaults of %u option%s "
             "accepted", tried, tried == 1 ? "" : "s", t->n_options, t->n_options == 1 ? "" : "s");
    finish(r, detail);
    free(defs);
    free(text);
}

/* ---- running checks in children ----------------------------------------------------------------- */

typedef enum check_kind {
    CHECK_LOAD, CHECK_GRADIENT, CHECK_PARAMS, CHECK_DETERMINISM, CHECK_ACCUMULATION, CHECK_SAVE_LOAD,
    CHECK_OPTIONS
} check_kind;

typedef struct job {
    check_kind kind;
    const pr_technique *t;
    int site;
    const char *search_dir;   /* CHECK_LOAD */
    const check_options *o;
} job;

static void child_load(const job *j, report *r)
{
    pr_registry *reg = NULL;
    pr_error err = { 0 };
    if (pr_registry_open(j->search_dir, &reg, &err))
        problem(r, "%s", err.msg);
    pr_registry_free(reg);
    finish(r, "loads");
}

static void run_child(const job *j, FILE *res)
{
    report r;
    memset(&r, 0, sizeof r);
    r.f = res;
    r.verbose = j->o->verbose;
    switch (j->kind) {
    case CHECK_LOAD: child_load(j, &r); break;
    case CHECK_GRADIENT: check_gradient(j->t, j->site, j->o, &r); break;
    case CHECK_PARAMS: check_params(j->t, j->o, &r); break;
    case CHECK_DETERMINISM: check_determinism(j->t, j->o, &r); break;
    case CHECK_ACCUMULATION: check_accumulation(j->t, j->o, &r); break;
    case CHECK_SAVE_LOAD: check_save_load(j->t, j->o, &r); break;
    case CHECK_OPTIONS: check_options_of(j->t, j->o, &r); break;
    }
}

static const char *signal_abbrev(int sig)
{
    switch (sig) {
    case SIGSEGV: return "SIGSEGV";
    case SIGABRT: return "SIGABRT";
    case SIGBUS: return "SIGBUS";
    case SIGFPE: return "SIGFPE";
    case SIGILL: return "SIGILL";
    case SIGALRM: return "SIGALRM";
    case SIGKILL: return "SIGKILL";
    case SIGTERM: return "SIGTERM";
    case SIGTRAP: return "SIGTRAP";
    case SIGSYS: return "SIGSYS";
    case SIGPIPE: return "SIGPIPE";
    default: return "signal";
    }
}

typedef struct tally {
    int checks, failed, skipped;
} tally;

/* Fork, run job in the child, relay its verbose lines and print the
 * outcome line under label.  Returns 0 when the check passed. */
static int run_check(const job *j, const char *label, FILE *out, tally *tl)
{
    int fds[2];
    tl->checks++;
    if (pipe(fds) != 0) {
        fprintf(out, "FAIL %s: cannot create a pipe: %s\n", label, strerror(errno));
        tl->failed++;
        return 1;
    }
    fflush(NULL);
    pid_t pid = fork();
    if (pid < 0) {
        close(fds[0]);
        close(fds[1]);
        fprintf(out, "FAIL %s: cannot fork: %s\n", label, strerror(errno));
        tl->failed++;
        return 1;
    }
    if (pid == 0) {
        close(fds[0]);
        /* the plugin's own output must not mix with the report */
        dup2(STDERR_FILENO, STDOUT_FILENO);
        /* a crash ends this process, whatever handlers the caller installed
         * (a test framework's longjmp would carry on in the child) */
        static const int fatal[] = { SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGABRT, SIGALRM };
        for (size_t k = 0; k < sizeof fatal / sizeof fatal[0]; k++)
            signal(fatal[k], SIG_DFL);
        alarm((unsigned)(j->o->timeout > 0 ? j->o->timeout : CHECK_DEFAULT_TIMEOUT));
        FILE *res = fdopen(fds[1], "w");
        if (res)
            run_child(j, res);
        if (res)
            fclose(res);
        _exit(0);
    }
    close(fds[1]);
    char *buf = NULL;
    size_t len = 0, cap = 0;
    for (;;) {
        if (len + 4096 + 1 > cap) {
            size_t nc = cap ? cap * 2 : 8192;
            char *nb = realloc(buf, nc);
            if (!nb)
                break;
            buf = nb;
            cap = nc;
        }
        ssize_t n = read(fds[0], buf + len, cap - len - 1);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        len += (size_t)n;
    }
    close(fds[0]);
    int status = 0;
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
        ;
    if (buf)
        buf[len] = '\0';

    /* verbose lines, then the outcome */
    char *outcome = NULL;
    int ended = 0;
    for (char *line = buf, *next; line && *line; line = next) {
        next = strchr(line, '\n');
        if (next)
            *next++ = '\0';
        if (strncmp(line, "PASS ", 5) == 0 || strncmp(line, "FAIL ", 5) == 0)
            outcome = line;
        else if (strcmp(line, "END") == 0)
            ended = 1;
        else if (j->o->verbose)
            fprintf(out, "%s\n", line);
    }
    int failed = 1;
    if (ended && outcome && WIFEXITED(status) && WEXITSTATUS(status) == 0) {
        failed = outcome[0] == 'F';
        fprintf(out, "%.4s %s: %s\n", outcome, label, outcome + 5);
    } else if (WIFSIGNALED(status) && WTERMSIG(status) == SIGALRM) {
        fprintf(out, "FAIL %s: timed out after %d s (SIGALRM)\n", label,
                j->o->timeout > 0 ? j->o->timeout : CHECK_DEFAULT_TIMEOUT);
    } else if (WIFSIGNALED(status)) {
        int sig = WTERMSIG(status);
        fprintf(out, "FAIL %s: crashed with %s (%s)\n", label, signal_abbrev(sig), strsignal(sig));
    } else {
        fprintf(out, "FAIL %s: crashed: the check process exited with status %d before reporting a result (its "
                "error output says why)\n", label, WIFEXITED(status) ? WEXITSTATUS(status) : -1);
    }
    free(buf);
    tl->failed += failed;
    return failed;
}

static void check_technique(const pr_technique *t, const check_options *o, FILE *out, tally *tl)
{
    char label[LABEL_MAX];
    job j = { .t = t, .site = -1, .o = o };

    /* the sites of the test model, from a model built here (nothing runs) */
    pr_model_config cfg = shape_a();
    pr_model *m = NULL;
    pr_error err = { 0 };
    int have_model = pr_model_create(&cfg, &m, &err) == PR_OK;
    j.kind = CHECK_GRADIENT;
    if (is_select(t) || t->sites == 0) {
        snprintf(label, sizeof label, "%s/gradient", t->name);
        run_check(&j, label, out, tl);
    } else {
        for (int s = 0; s < PR_SITE_COUNT; s++) {
            if (!(t->sites & PR_SITE_BIT(s)))
                continue;
            char where[64];
            site_label(s, where, sizeof where);
            snprintf(label, sizeof label, "%s/gradient/%s", t->name, where);
            if (have_model && !site_exists(m, s)) {
                fprintf(out, "SKIP %s: the GPT-2 test model has no %s site\n", label, pr_site_name(s));
                tl->skipped++;
                continue;
            }
            j.site = s;
            run_check(&j, label, out, tl);
        }
    }
    pr_model_free(m);
    j.site = -1;
    static const struct { check_kind kind; const char *name; } rest[] = {
        { CHECK_PARAMS, "params" },
        { CHECK_DETERMINISM, "determinism" },
        { CHECK_ACCUMULATION, "accumulation" },
        { CHECK_SAVE_LOAD, "save-load" },
        { CHECK_OPTIONS, "options" },
    };
    for (size_t k = 0; k < sizeof rest / sizeof rest[0]; k++) {
        j.kind = rest[k].kind;
        snprintf(label, sizeof label, "%s/%s", t->name, rest[k].name);
        run_check(&j, label, out, tl);
    }
}

/* One "load" check per file: refused with its reason, or the techniques
 * it provides.  label names the file when one was given (the registry
 * sees it under a link), NULL for a directory. */
static void report_load(const pr_registry *reg, const char *label, FILE *out, tally *tl)
{
    char lb[LABEL_MAX];
    int nr = pr_registry_refused_count(reg), nt = pr_registry_count(reg);
    if (label) {
        tl->checks++;
        tl->failed += nr > 0 || nt == 0;
        if (nr == 0 && nt == 0)
            fprintf(out, "FAIL %s: no techniques found\n", label);
    }
    for (int i = 0; i < nr; i++) {
        const char *p, *why;
        pr_registry_refused(reg, i, &p, &why);
        const char *pb = strrchr(p, '/');
        snprintf(lb, sizeof lb, "%s/load", pb ? pb + 1 : p);
        fprintf(out, "FAIL %s: refused: %s\n", label ? label : lb, why);
        if (!label) {
            tl->checks++;
            tl->failed++;
        }
    }
    /* the techniques, grouped by the file they came from */
    for (int i = 0; i < nt && !(label && nr); i++) {
        const char *origin = pr_registry_origin(reg, i);
        int first = 1;
        for (int k = 0; k < i && first; k++)
            first = strcmp(pr_registry_origin(reg, k), origin) != 0;
        if (!first)
            continue;
        const char *ob = strrchr(origin, '/');
        snprintf(lb, sizeof lb, "%s/load", ob ? ob + 1 : origin);
        if (!label)
            tl->checks++;
        fprintf(out, "PASS %s:", label ? label : lb);
        for (int k = i; k < nt; k++)
            if (strcmp(pr_registry_origin(reg, k), origin) == 0) {
                const pr_technique *t = pr_registry_technique(reg, k);
                fprintf(out, " %s %s", t->name, t->version ? t->version : "");
            }
        fputc('\n', out);
    }
}

/* A fresh directory holding one symbolic link to path, named so that the
 * registry's "*.so" rule takes it. */
static int lone_dir(const char *path, char *dir, size_t dlen, char *link, size_t llen, pr_error *err)
{
    char *real = realpath(path, NULL);
    if (!real)
        return pr_errorf(err, PR_ERR_IO, "check: cannot resolve '%s': %s", path, strerror(errno));
    snprintf(dir, dlen, "%s", "/tmp/peftref-check-XXXXXX");
    if (!mkdtemp(dir)) {
        free(real);
        return pr_errorf(err, PR_ERR_IO, "check: cannot make a temporary directory: %s", strerror(errno));
    }
    const char *base = strrchr(path, '/');
    base = base ? base + 1 : path;
    size_t bl = strlen(base);
    int so = bl >= 3 && strcmp(base + bl - 3, ".so") == 0;
    snprintf(link, llen, "%s/%s%s", dir, base, so ? "" : ".so");
    if (symlink(real, link) != 0) {
        int e = errno;
        free(real);
        rmdir(dir);
        return pr_errorf(err, PR_ERR_IO, "check: cannot link '%s' into %s: %s", path, dir, strerror(e));
    }
    free(real);
    return PR_OK;
}

int check_plugin_file(const char *path, const check_options *opts, FILE *out, int *n_checks, int *n_failed,
                      pr_error *err)
{
    check_options o = { 0 };
    if (opts)
        o = *opts;
    if (n_checks)
        *n_checks = 0;
    if (n_failed)
        *n_failed = 0;
    if (!path || !out)
        return pr_errorf(err, PR_ERR_INVALID, "check: NULL path or output");
    struct stat st;
    if (stat(path, &st) != 0)
        return pr_errorf(err, PR_ERR_NOTFOUND, "check: cannot read '%s': %s", path, strerror(errno));
    char dir[64] = "", link[PATH_MAX + 80] = "";
    const char *search = path;
    int is_dir = S_ISDIR(st.st_mode);
    if (!is_dir) {
        int rc = lone_dir(path, dir, sizeof dir, link, sizeof link, err);
        if (rc)
            return rc;
        search = dir;
    }

    tally tl = { 0, 0, 0 };
    char label[LABEL_MAX];
    const char *base = strrchr(path, '/');
    base = base && base[1] ? base + 1 : path;
    snprintf(label, sizeof label, "%s/load", base);
    /* load once in a child: a plugin whose entry crashes fails here only */
    job lj = { .kind = CHECK_LOAD, .site = -1, .search_dir = search, .o = &o };
    int load_failed = 0;
    {
        tally probe = { 0, 0, 0 };
        FILE *sink = tmpfile();
        load_failed = run_check(&lj, label, sink ? sink : out, &probe);
        if (load_failed && sink) {
            rewind(sink);
            char line[4096];
            while (fgets(line, sizeof line, sink))
                fputs(line, out);
        }
        if (sink)
            fclose(sink);
    }
    pr_registry *reg = NULL;
    int rc = PR_OK;
    if (load_failed) {
        tl.checks++;
        tl.failed++;
    } else {
        rc = pr_registry_open(search, &reg, err);
    }
    /* the library stays mapped once loaded: the link is no longer needed
     * (and is gone sooner if the output's reader stops early) */
    if (!is_dir) {
        unlink(link);
        rmdir(dir);
    }
    if (!load_failed && rc == PR_OK) {
        int nt = pr_registry_count(reg);
        report_load(reg, is_dir ? NULL : label, out, &tl);
        int matched = 0;
        for (int i = 0; i < nt; i++) {
            const pr_technique *t = pr_registry_technique(reg, i);
            if (o.technique && strcmp(o.technique, t->name) != 0)
                continue;
            matched++;
            check_technique(t, &o, out, &tl);
        }
        if (o.technique && !matched) {
            fprintf(out, "FAIL %s: the file has no technique named '%s'\n", label, o.technique);
            tl.checks++;
            tl.failed++;
        }
    }
    pr_registry_free(reg);
    if (rc)
        return rc;
    fprintf(out, "%s: %d check%s, %d passed, %d failed", path, tl.checks, tl.checks == 1 ? "" : "s",
            tl.checks - tl.failed, tl.failed);
    if (tl.skipped)
        fprintf(out, ", %d site%s skipped", tl.skipped, tl.skipped == 1 ? "" : "s");
    fputc('\n', out);
    fflush(out);
    if (n_checks)
        *n_checks = tl.checks;
    if (n_failed)
        *n_failed = tl.failed;
    return PR_OK;
}
