/* peftref pipelines: the compare section's arms (docs/pipeline.md,
 * "Compare arms").
 *
 * An arm is the file with the arm's modules in place of the file's and
 * its set: entries applied (as overrides, located in the file); what an
 * arm may set is limited so that every arm trains the same base model on
 * the same data with the same seed and budget. */
#include "config.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pipeline_internal.h"

/* What an arm's set: may change.  Every arm trains the same base model on
 * the same data with the same seed and budget, so model, task and the
 * budget keys of train (steps, batch, seq_len, accum, seed, evaluation,
 * output) stay the base pipeline's. */
static const char *const arm_train_keys[] = { "lr", "min_lr_ratio", "schedule", "warmup", "weight_decay",
                                              "decay_all", "clip", "beta1", "beta2", "eps", "head_lr_mult",
                                              "log_every", "progress" };
#define N_ARM_TRAIN_KEYS ((int)(sizeof arm_train_keys / sizeof arm_train_keys[0]))

static int arm_set_key_ok(const char *k)
{
    if (!strcmp(k, "modules") || !strncmp(k, "modules.", 8))
        return 1;
    if (strncmp(k, "train.", 6) != 0)
        return 0;
    for (int i = 0; i < N_ARM_TRAIN_KEYS; i++)
        if (!strcmp(k + 6, arm_train_keys[i]))
            return 1;
    return 0;
}

#define PL_MAX_SWEEP_POINTS 256

static int64_t product_capped(int64_t a, int64_t b)
{
    return a > PL_MAX_SWEEP_POINTS || b > PL_MAX_SWEEP_POINTS ? PL_MAX_SWEEP_POINTS + 1 : a * b;
}

int pl_arm_points(const ynode *arm)
{
    const ynode *sw = arm && arm->kind == Y_MAP ? pl_map_get(arm, "sweep") : NULL;
    if (!sw || pl_is_null(sw))
        return 1;
    if (sw->kind != Y_MAP || sw->n == 0)
        return 0;
    int64_t n = 1;
    for (int k = 0; k < sw->n; k++) {
        const ynode *v = sw->vals[k];
        if (v->kind != Y_SEQ || v->n == 0)
            return 0;
        for (int j = 0; j < v->n; j++)
            if (v->vals[j]->kind != Y_SCALAR)
                return 0;
        n = product_capped(n, v->n);
    }
    return n > PL_MAX_SWEEP_POINTS ? 0 : (int)n;
}

/* The value index of key k at grid point `point` (the last key fastest). */
static int sweep_index(const ynode *sw, int k, int point)
{
    int stride = 1;
    for (int j = k + 1; j < sw->n; j++)
        stride *= sw->vals[j]->n;
    return (point / stride) % sw->vals[k]->n;
}

/* Checks an arm's sweep: a mapping of keys its set: may hold (and does
 * not) to non-empty lists of scalars, at most PL_MAX_SWEEP_POINTS settings
 * in all (a key it may not hold is reported and left out, so that the
 * values of the others are still checked).  Fills p->arm_n_points[i] and p->arm_labels[i]. */
static void load_sweep(loader *L, const ynode *a, const char *path, int i)
{
    pr_pipeline *p = L->p;
    const ynode *sw = pl_map_get(a, "sweep"), *set = pl_map_get(a, "set");
    char kp[128];
    snprintf(kp, sizeof kp, "%s.sweep", path);
    p->arm_n_points[i] = 1;
    if (!sw || pl_is_null(sw))
        return;
    if (pl_want_map(L, sw, kp))
        return;
    int bad = sw->n == 0;
    if (sw->n == 0)
        pl_diag_at(&L->d, sw, "%s: expected keys with lists of values, e.g. {train.lr: [1e-4, 3e-4, 1e-3]}", kp);
    int64_t n = 1;
    for (int k = 0; k < sw->n; k++) {
        const ynode *key = sw->keys[k], *v = sw->vals[k];
        if (!arm_set_key_ok(key->text)) {
            pl_diag_at(&L->d, key, "%s: '%s' cannot be swept: a sweep takes the keys an arm's set: may change "
                       "(modules.* and train.lr, min_lr_ratio, schedule, warmup, weight_decay, decay_all, clip, "
                       "beta1, beta2, eps, head_lr_mult)", kp, key->text);
        } else if (set && set->kind == Y_MAP && pl_map_find(set, key->text) >= 0) {
            pl_diag_at(&L->d, key, "%s: '%s' is also in the arm's set: (line %d); give it in one place", kp,
                       key->text, set->keys[pl_map_find(set, key->text)]->line);
        }
        if (v->kind != Y_SEQ || v->n == 0) {
            char g[200];
            pl_got(g, sizeof g, v);
            pl_diag_at(&L->d, v, "%s.%s: expected a non-empty list of values, e.g. [1e-4, 3e-4], got %s", kp,
                       key->text, v->kind == Y_SEQ ? "an empty list" : g);
            bad = 1;
            continue;
        }
        for (int j = 0; j < v->n; j++)
            if (v->vals[j]->kind != Y_SCALAR) {
                char g[200];
                pl_got(g, sizeof g, v->vals[j]);
                pl_diag_at(&L->d, v->vals[j], "%s.%s.%d: a swept value is a scalar, got %s", kp, key->text, j, g);
                bad = 1;
            }
        n = product_capped(n, v->n);
    }
    if (!bad && n > PL_MAX_SWEEP_POINTS) {
        pl_diag_at(&L->d, sw, "%s: more than %d settings (PL_MAX_SWEEP_POINTS)", kp, PL_MAX_SWEEP_POINTS);
        bad = 1;
    }
    if (bad) {
        p->arm_n_points[i] = 0;
        return;
    }
    p->arm_n_points[i] = (int)n;
    if (!(p->arm_labels[i] = calloc((size_t)n, sizeof *p->arm_labels[i]))) {
        L->oom = 1;
        return;
    }
    for (int pt = 0; pt < n; pt++) {
        char label[512];
        size_t o = 0;
        label[0] = '\0';
        for (int k = 0; k < sw->n && o < sizeof label; k++) {
            int w = snprintf(label + o, sizeof label - o, "%s%s=%s", k ? ", " : "", sw->keys[k]->text,
                             sw->vals[k]->vals[sweep_index(sw, k, pt)]->text);
            o += w > 0 ? (size_t)w : 0;
        }
        if (!(p->arm_labels[i][pt] = pl_keep(p, label)))
            L->oom = 1;
    }
}

/* An arm's default name: its modules' techniques (or loaded files) joined
 * by '+', "none" for an arm without modules. */
static void arm_default_name(const ynode *mods, char *buf, size_t len)
{
    size_t o = 0;
    buf[0] = '\0';
    for (int i = 0; mods && mods->kind == Y_SEQ && i < mods->n; i++) {
        const ynode *m = mods->vals[i], *t = pl_map_get(m, "technique");
        const char *w = t && t->kind == Y_SCALAR ? t->text : pl_map_get(m, "load") ? "load" : "module";
        int n = snprintf(buf + o, len - o, "%s%s", o ? "+" : "", w);
        if (n < 0 || (size_t)n >= len - o)
            break;
        o += (size_t)n;
    }
    if (!buf[0])
        snprintf(buf, len, "none");
    for (char *c = buf; *c; c++)
        if (*c == '/' || (unsigned char)*c <= 0x20)
            *c = '_';
}

/* compare: {arms: [{name, modules, set}, ...]}.  Checks the section, names
 * every arm (p->arm_names) and returns the arms list, with ok[i] = 1 for
 * each arm whose own keys are well formed (*ok is the caller's to free). */
const ynode *pl_load_compare(loader *L, const ynode *c, int **ok)
{
    static const char *const keys[] = { "arms", "seeds", "mpi_ranks" };
    static const char *const arm_keys[] = { "name", "modules", "set", "sweep" };
    pr_pipeline *p = L->p;
    *ok = NULL;
    if (pl_want_map(L, c, "compare"))
        return NULL;
    pl_check_keys(L, c, "compare", keys, 3);
    const ynode *sn = pl_map_get(c, "seeds");
    long long seeds = 1;
    if (sn && pl_get_int(L, sn, "compare.seeds", 1, PL_MAX_SEEDS, &seeds))
        seeds = 1;
    p->compare_seeds = (int)seeds;
    /* compare.mpi_ranks: N ranks train each arm (mpirun -np N peftref train) */
    const ynode *rn = pl_map_get(c, "mpi_ranks");
    long long ranks = 1;
    if (rn && pl_get_int(L, rn, "compare.mpi_ranks", 1, PL_MAX_MPI_RANKS, &ranks))
        ranks = 1;
    p->compare_mpi_ranks = (int)ranks;
    if (rn) {
        snprintf(p->compare_mpi_ranks_at, sizeof p->compare_mpi_ranks_at, "%s:%d:%d", rn->src ? rn->src : "?",
                 rn->line, rn->col);
    }
    const ynode *arms = pl_map_get(c, "arms");
    if (!arms) {
        pl_diag_at(&L->d, c, "compare: missing required key 'arms' (a list of arms, each with its modules)");
        return NULL;
    }
    if (arms->kind != Y_SEQ || arms->n == 0) {
        char g[200];
        pl_got(g, sizeof g, arms);
        pl_diag_at(&L->d, arms, "compare.arms: expected a list of arms (items starting with '- modules:'), got %s",
                   arms->kind == Y_SEQ ? "an empty list" : g);
        return NULL;
    }
    if (arms->n > PL_MAX_ARMS) {
        pl_diag_at(&L->d, arms, "compare.arms: %d arms, more than %d (PL_MAX_ARMS)", arms->n, PL_MAX_ARMS);
        return NULL;
    }
    p->arm_names = calloc((size_t)arms->n, sizeof *p->arm_names);
    const ynode **name_nodes = calloc((size_t)arms->n, sizeof *name_nodes);
    *ok = calloc((size_t)arms->n, sizeof **ok);
    p->arm_n_points = calloc((size_t)arms->n, sizeof *p->arm_n_points);
    p->arm_labels = calloc((size_t)arms->n, sizeof *p->arm_labels);
    if (!p->arm_names || !name_nodes || !*ok || !p->arm_n_points || !p->arm_labels) {
        free(name_nodes);
        L->oom = 1;
        return NULL;
    }
    p->n_arms = arms->n;
    for (int i = 0; i < arms->n; i++) {
        const ynode *a = arms->vals[i], *n;
        char path[64], kp[96];
        snprintf(path, sizeof path, "compare.arms.%d", i);
        if (pl_want_map(L, a, path))
            continue;
        pl_check_keys(L, a, path, arm_keys, 4);
        if (!(n = pl_map_get(a, "modules")))
            pl_diag_at(&L->d, a, "%s: missing required key 'modules' (write 'modules: []' for the base model alone)",
                       path);
        (*ok)[i] = n != NULL;
        if ((n = pl_map_get(a, "name"))) {
            snprintf(kp, sizeof kp, "%s.name", path);
            if (!pl_get_string(L, n, kp, &p->arm_names[i])) {
                if (!pl_name_ok(p->arm_names[i]))
                    pl_diag_at(&L->d, n, "%s: '%s' is not an arm name (no '/', spaces or control characters)", kp,
                               p->arm_names[i]);
                else
                    name_nodes[i] = n;
                for (int j = 0; j < i && name_nodes[i]; j++)
                    if (name_nodes[j] && !strcmp(p->arm_names[j], p->arm_names[i])) {
                        pl_diag_at(&L->d, n, "%s: duplicate arm name '%s' (compare.arms.%d, line %d)", kp,
                                   p->arm_names[i], j, name_nodes[j]->line);
                        break;
                    }
            }
        }
        const ynode *set = pl_map_get(a, "set");
        snprintf(kp, sizeof kp, "%s.set", path);
        if (set && !pl_is_null(set) && !pl_want_map(L, set, kp))
            for (int k = 0; k < set->n; k++)
                if (!arm_set_key_ok(set->keys[k]->text))
                    pl_diag_at(&L->d, set->keys[k],
                               "%s: '%s' is the same for every arm (same base model, data, seed and budget); an arm "
                               "may set modules.* and train.lr, min_lr_ratio, schedule, warmup, weight_decay, "
                               "decay_all, clip, beta1, beta2, eps, head_lr_mult, log_every, progress",
                               kp, set->keys[k]->text);
        load_sweep(L, a, path, i);
        if (!p->arm_n_points[i])
            (*ok)[i] = 0;
    }
    /* default names: the techniques, then _2, _3 ... skipping taken ones */
    for (int i = 0; i < arms->n && !L->oom; i++) {
        if (p->arm_names[i] && name_nodes[i])
            continue;
        char base[160], cand[200];
        arm_default_name(arms->vals[i]->kind == Y_MAP ? pl_map_get(arms->vals[i], "modules") : NULL, base,
                         sizeof base);
        for (int k = 1;; k++) {
            if (k == 1)
                snprintf(cand, sizeof cand, "%s", base);
            else
                snprintf(cand, sizeof cand, "%s_%d", base, k);
            int taken = 0;
            for (int j = 0; j < arms->n && !taken; j++)
                taken = j != i && p->arm_names[j] && !strcmp(p->arm_names[j], cand);
            if (!taken)
                break;
        }
        if (!(p->arm_names[i] = pl_keep(p, cand)))
            L->oom = 1;
    }
    free(name_nodes);
    return arms;
}

/* The file as an arm sees it: the arm's modules replace the file's, its
 * set: entries apply, and the compare section is gone. */
ynode *pl_arm_tree(loader *L, const ynode *root, const ynode *arm, int point)
{
    ynode *t = pl_ynode_copy(root);
    const ynode *mods = pl_map_get(arm, "modules");
    ynode *mc = mods ? pl_ynode_copy(mods) : NULL;
    if (!t || (mods && !mc)) {
        pl_ynode_free(t);
        pl_ynode_free(mc);
        L->oom = 1;
        return NULL;
    }
    int i = pl_map_find(t, "compare");
    if (i >= 0)
        pl_map_remove(t, i);
    if (mc) {
        if ((i = pl_map_find(t, "modules")) >= 0) {
            pl_ynode_free(t->vals[i]);
            t->vals[i] = mc;
        } else {
            ynode *k = pl_ynode_scalar("modules", 1, mods->src, mods->line, mods->col);
            if (!k || pl_ynode_push(t, k, mc)) {
                pl_ynode_free(k);
                pl_ynode_free(mc);
                pl_ynode_free(t);
                L->oom = 1;
                return NULL;
            }
        }
    }
    const ynode *set = pl_map_get(arm, "set");
    for (int k = 0; set && set->kind == Y_MAP && k < set->n; k++) {
        const ynode *key = set->keys[k];
        if (!arm_set_key_ok(key->text))
            continue;   /* reported by pl_load_compare */
        ynode *v = pl_ynode_copy(set->vals[k]);
        if (!v) {
            L->oom = 1;
            break;
        }
        /* a quoted key's text starts one column after its quote */
        pl_apply_path(L, &t, key->text, strlen(key->text), NULL, v, key->src, key->line, key->col - 1 + !key->plain);
    }
    /* the sweep's setting, as if written in set: (values located where the list gives them) */
    const ynode *sw = pl_map_get(arm, "sweep");
    if (sw && !pl_is_null(sw) && pl_arm_points(arm) > 0)
        for (int k = 0; k < sw->n && !L->oom; k++) {
            const ynode *key = sw->keys[k];
            if (!arm_set_key_ok(key->text))
                continue;
            ynode *v = pl_ynode_copy(sw->vals[k]->vals[sweep_index(sw, k, point)]);
            if (!v) {
                L->oom = 1;
                break;
            }
            pl_apply_path(L, &t, key->text, strlen(key->text), NULL, v, key->src, key->line,
                          key->col - 1 + !key->plain);
        }
    return t;
}
