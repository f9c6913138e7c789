/* peftref core, plugin conformance checker: the checks that repeat a
 * pass and compare.
 *
 * determinism: same seed, same bits across attaches, passes and models;
 * accumulation: two backward passes add up to twice one;
 * save-load: tensors written and read back reproduce the logits. */
#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "check_internal.h"
#include "safetensors.h"

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
    if (snap_add(s, "the loss", &loss, 1) || snap_add(s, "the logits", pr_model_logits(b->m), chk_bench_logits_n(b)))
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
        chk_problem(r, "%s: different sets of trainable tensors (%d vs %d)", how, x->nseg, y->nseg);
        return 1;
    }
    for (int k = 0; k < x->nseg; k++) {
        size_t a = x->off[k], n = x->off[k + 1] - a;
        if (memcmp(x->v + a, y->v + a, n * sizeof(float)) == 0)
            continue;
        size_t i = 0;
        while (i < n && memcmp(&x->v[a + i], &y->v[a + i], sizeof(float)) == 0)
            i++;
        chk_problem(r, "%s: %s differs (first at element %zu: %.9g vs %.9g)", how, x->name[k], i, x->v[a + i],
                    y->v[a + i]);
        return 1;
    }
    return 0;
}

void chk_determinism(const pr_technique *t, const check_options *o, report *r)
{
    (void)o;
    pr_error err = { 0 };
    pr_model_config cfg = chk_shape_a();
    bench b[2];
    attached a[2];
    snap s[2][3];
    memset(b, 0, sizeof b);
    memset(a, 0, sizeof a);
    memset(s, 0, sizeof s);
    for (int j = 0; j < 2; j++) {
        if (chk_bench_open(&b[j], &cfg, &err)) {
            chk_problem(r, "cannot build the test model: %s", err.msg);
            goto done;
        }
        if (chk_attach(&b[j], t, 0, -1, 7, 1, NULL, 0, &a[j], &err)) {
            chk_problem(r, "attach failed: %s", err.msg);
            goto done;
        }
    }
    if (a[0].set.n != a[1].set.n) {
        chk_problem(r, "two attaches with seed 7 register %d and %d tensors", a[0].set.n, a[1].set.n);
        goto done;
    }
    for (int k = 0; k < a[0].set.n; k++) {
        const pr_tensor_info *x = a[0].set.v[k], *y = a[1].set.v[k];
        if (strcmp(x->name, y->name) != 0 || x->numel != y->numel) {
            chk_problem(r, "two attaches with seed 7 register '%s' and '%s'", x->name, y->name);
            goto done;
        }
        if (memcmp(x->data, y->data, (size_t)x->numel * sizeof(float)) != 0) {
            int64_t i = 0;
            while (i < x->numel && memcmp(&x->data[i], &y->data[i], sizeof(float)) == 0)
                i++;
            char ix[64];
            chk_format_index(x, i, ix, sizeof ix);
            chk_problem(r, "parameter '%s' differs between two attaches with seed 7 (at %s: %.9g vs %.9g)", x->name, ix,
                        x->data[i], y->data[i]);
        }
    }
    if (r->n_fail)
        goto done;
    for (int j = 0; j < 2; j++) {
        chk_perturb(&a[j].set, 5, PERTURB, 0);
        const pr_tensor_info *wte = pr_model_find_tensor(b[j].m, "wte.weight");
        if (wte && !wte->trainable && pr_model_set_trainable(b[j].m, wte->name, 1, &err)) {
            chk_problem(r, "cannot make '%s' trainable: %s", wte->name, err.msg);
            goto done;
        }
        /* two eval passes, then one in training mode (dropout and the like) */
        for (int p = 0; p < 3; p++) {
            float loss = 0;
            pr_model_set_training(b[j].m, p == 2);
            if (chk_bench_step(&b[j], &loss, &err)) {
                chk_problem(r, "forward/backward failed: %s", err.msg);
                goto done;
            }
            if (snap_take(&b[j], loss, &s[j][p])) {
                chk_problem(r, "out of memory");
                goto done;
            }
        }
    }
    if (!snap_compare(&s[0][0], &s[1][0], "two attaches with seed 7, one forward+backward each", r) &&
        !snap_compare(&s[0][0], &s[0][1], "two forward+backward passes on one model", r))
        snap_compare(&s[0][2], &s[1][2], "two attaches with seed 7, forward+backward in training mode", r);
done:
    chk_finish(r, "same seed, same parameters; bit-identical loss, logits and gradients across two attaches, two "
              "passes and training mode");
    for (int j = 0; j < 2; j++) {
        for (int p = 0; p < 3; p++)
            snap_free(&s[j][p]);
        chk_tset_free(&a[j].set);
        chk_bench_close(&b[j]);
    }
}

/* ---- accumulation --------------------------------------------------------------------------------- */

void chk_accumulation(const pr_technique *t, const check_options *o, report *r)
{
    (void)o;
    pr_error err = { 0 };
    pr_model_config cfg = chk_shape_a();
    bench b;
    attached a;
    memset(&a, 0, sizeof a);
    float **g1 = NULL;
    int checked = 0;
    if (chk_bench_open(&b, &cfg, &err)) {
        chk_problem(r, "cannot build the test model: %s", err.msg);
        goto done;
    }
    if (chk_attach(&b, t, 0, -1, 3, 1, NULL, 0, &a, &err)) {
        chk_problem(r, "attach failed: %s", err.msg);
        goto done;
    }
    chk_perturb(&a.set, 8, PERTURB, 0);
    g1 = calloc((size_t)a.set.n + 1, sizeof *g1);
    if (!g1) {
        chk_problem(r, "out of memory");
        goto done;
    }
    if (chk_bench_step(&b, NULL, &err)) {
        chk_problem(r, "forward/backward failed: %s", err.msg);
        goto done;
    }
    for (int k = 0; k < a.set.n; k++)
        if (a.set.v[k]->trainable && a.set.v[k]->grad)
            g1[k] = chk_copy_floats(a.set.v[k]->grad, a.set.v[k]->numel);
    if (chk_bench_step(&b, NULL, &err) || chk_bench_fwd_bwd(&b, NULL, &err)) {
        chk_problem(r, "forward/backward failed: %s", err.msg);
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
            chk_format_index(ti, wi, ix, sizeof ix);
            chk_problem(r, "gradient of '%s' is not accumulated: after two backward passes without zeroing it is %.4g "
                        "times one pass's (at %s: %.6g, one pass %.6g); backward must add (+=) into grads",
                        ti->name, nn > 0 ? dot / nn : 0.0, ix, ti->grad[wi], g1[k][wi]);
        }
    }
done:;
    char detail[DETAIL_MAX];
    snprintf(detail, sizeof detail, "%d tensor%s: two backward passes give twice one pass's gradient", checked,
             checked == 1 ? "" : "s");
    chk_finish(r, detail);
    for (int k = 0; g1 && k < a.set.n; k++)
        free(g1[k]);
    free(g1);
    chk_tset_free(&a.set);
    chk_bench_close(&b);
}

/* ---- save and load -------------------------------------------------------------------------------- */

void chk_save_load(const pr_technique *t, const check_options *o, report *r)
{
    (void)o;
    pr_error err = { 0 };
    pr_model_config cfg = chk_shape_a();
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
        if (chk_bench_open(&b[j], &cfg, &err)) {
            chk_problem(r, "cannot build the test model: %s", err.msg);
            goto done;
        }
        if (chk_attach(&b[j], t, 0, -1, j == 0 ? 21 : 22, 1, NULL, 0, &a[j], &err)) {
            chk_problem(r, "attach failed: %s", err.msg);
            goto done;
        }
    }
    chk_perturb(&a[0].set, 31, PERTURB, 1);
    if (chk_bench_loss(&b[0], &loss[0], &err)) {
        chk_problem(r, "forward failed: %s", err.msg);
        goto done;
    }
    logits = chk_copy_floats(pr_model_logits(b[0].m), (int64_t)chk_bench_logits_n(&b[0]));
    ent = calloc((size_t)a[0].set.n + 1, sizeof *ent);
    if (!logits || !ent) {
        chk_problem(r, "out of memory");
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
        chk_problem(r, "cannot make a temporary directory: %s", strerror(errno));
        goto done;
    }
    have_dir = 1;
    snprintf(path, sizeof path, "%s/module.safetensors", dir);
    st_kv meta[2] = { { "technique", t->name }, { "version", t->version ? t->version : "" } };
    if (st_write(path, ent, a[0].set.n, meta, 2, &err) || st_open(path, 0, &f, &err)) {
        chk_problem(r, "writing and reading back the module's tensors failed: %s", err.msg);
        goto done;
    }
    /* the mapping outlives the name; a crash below leaves nothing behind */
    unlink(path);
    rmdir(dir);
    have_dir = 0;
    if (st_count(f) != a[1].set.n)
        chk_problem(r, "the saved file holds %d tensors, a fresh attach registers %d", st_count(f), a[1].set.n);
    for (int k = 0; k < a[1].set.n; k++) {
        const pr_tensor_info *ti = a[1].set.v[k];
        const st_tensor *st = st_find(f, ti->name);
        if (!st) {
            chk_problem(r, "tensor '%s' of a fresh attach is not in the saved module", ti->name);
            continue;
        }
        int same = st->ndim == ti->ndim && st->numel == ti->numel;
        for (int d = 0; same && d < ti->ndim; d++)
            same = st->shape[d] == ti->shape[d];
        if (!same) {
            chk_problem(r, "tensor '%s' is saved with another shape than a fresh attach gives it", ti->name);
            continue;
        }
        if (st_to_f32(f, st, ti->data, &err))
            chk_problem(r, "reading '%s': %s", ti->name, err.msg);
    }
    if (r->n_fail)
        goto done;
    if (chk_bench_loss(&b[1], &loss[1], &err)) {
        chk_problem(r, "forward after loading failed: %s", err.msg);
        goto done;
    }
    const float *l2 = pr_model_logits(b[1].m);
    size_t nl = chk_bench_logits_n(&b[1]);
    if (memcmp(logits, l2, nl * sizeof(float)) != 0) {
        double worst = 0;
        for (size_t i = 0; i < nl; i++)
            worst = fmax(worst, fabs((double)logits[i] - l2[i]));
        chk_problem(r, "the reloaded module gives another loss: %.9g before saving, %.9g after loading (logits differ "
                "by up to %.3g)", loss[0], loss[1], worst);
    }
done:;
    char detail[DETAIL_MAX];
    snprintf(detail, sizeof detail, "%d tensor%s saved and reloaded into a module attached with another seed; "
             "bit-identical logits (loss %.6f)", a[0].set.n, a[0].set.n == 1 ? "" : "s", loss[0]);
    chk_finish(r, detail);
    if (f)
        st_close(f);
    if (have_dir) {
        unlink(path);
        rmdir(dir);
    }
    free(ent);
    free(logits);
    for (int j = 0; j < 2; j++) {
        chk_tset_free(&a[j].set);
        chk_bench_close(&b[j]);
    }
}
