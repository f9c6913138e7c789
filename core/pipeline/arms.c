/* peftref pipelines: the compare section's arms (docs/pipeline.md,
 * "Compare arms").
 *
 * An arm is the file with the arm's modules in place of the file's and
 * its set: entries applied (as overrides, located in the file); what an
 * arm may set is limited so that every arm trains the same base model on
 * the same data with the same seed and budget. */
#include "config.h"

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
    static const char *const keys[] = { "arms" };
    static const char *const arm_keys[] = { "name", "modules", "set" };
    pr_pipeline *p = L->p;
    *ok = NULL;
    if (pl_want_map(L, c, "compare"))
        return NULL;
    pl_check_keys(L, c, "compare", keys, 1);
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
    if (!p->arm_names || !name_nodes || !*ok) {
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
        pl_check_keys(L, a, path, arm_keys, 3);
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
ynode *pl_arm_tree(loader *L, const ynode *root, const ynode *arm)
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
    return t;
}
