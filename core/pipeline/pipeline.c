/* peftref: YAML pipelines (see include/peftref/pipeline.h, docs/pipeline.md).
 *
 * Three stages:
 *  1. libyaml's event parser builds a small tree of scalars, lists and
 *     mappings in which every node keeps its 1-based line and column;
 *  2. `--set key.path=value` overrides edit that tree (their nodes carry
 *     the location "--set:N:COL");
 *  3. the validator walks the tree against the schema below, collecting
 *     every problem as "FILE:LINE:COL: message" instead of stopping at the
 *     first, and fills the pipeline: model shape, module specs (checked
 *     against each technique's descriptor and planned with
 *     pr_module_plan_for), task and training settings. */
#include "config.h"

#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>
#include <yaml.h>

#include "peftref/peftref.h"
#include "peftref/pipeline.h"
#include "data.h"
#include "fileio.h"
#include "model_internal.h"
#include "names.h"
#include "pipeline_internal.h"

#define MAX_DEPTH 64
#define MAX_LAYERS 4096

/* ---- the pipeline ---------------------------------------------------------------------- */


const char *pl_keep(pr_pipeline *p, const char *s)
{
    if (!s)
        return NULL;
    if (p->n_strs == p->cap_strs) {
        int cap = p->cap_strs ? 2 * p->cap_strs : 32;
        char **v = realloc(p->strs, (size_t)cap * sizeof *v);
        if (!v)
            return NULL;
        p->strs = v;
        p->cap_strs = cap;
    }
    char *c = strdup(s);
    if (c)
        p->strs[p->n_strs++] = c;
    return c;
}

void pr_pipeline_free(pr_pipeline *p)
{
    if (!p)
        return;
    for (int i = 0; i < p->n_mods; i++) {
        free(p->mods[i].layers);
        free(p->mods[i].opts);
        for (int k = 0; k < p->mods[i].n_files; k++)
            pr_module_file_close(p->mods[i].files[k]);
        free(p->mods[i].files);
        free(p->mods[i].weights);
    }
    free(p->mods);
    for (int i = 0; i < p->n_strs; i++)
        free(p->strs[i]);
    free(p->strs);
    free(p->arm_names);
    pr_model_free(p->loaded);
    free(p->path);
    free(p);
}

/* ---- overrides ------------------------------------------------------------------------------------ */

/* The key of map that the path segments seg[i..] start with: the longest
 * run of segments joined by '.' that is an existing key (site names such
 * as attn.k contain dots), else a new key: a site name under
 * site_options, otherwise one segment.  Returns how many segments it
 * takes and the key in buf. */
static int match_key(const ynode *map, char **seg, int i, int n_seg, const char *parent, char *buf, size_t len)
{
    for (int j = n_seg; j > i; j--) {
        buf[0] = '\0';
        size_t off = 0;
        for (int k = i; k < j; k++) {
            int w = snprintf(buf + off, len - off, "%s%s", k > i ? "." : "", seg[k]);
            if (w < 0 || (size_t)w >= len - off)
                break;
            off += (size_t)w;
        }
        if (pl_map_find(map, buf) >= 0 || (parent && !strcmp(parent, "site_options") && pr_site_parse(buf) >= 0))
            return j - i;
    }
    snprintf(buf, len, "%s", seg[i]);
    return 1;
}

/* Set the value at the dotted key path text[0..klen) (train.steps,
 * modules.0.options.r) in *root: val, taken over, or else value_text
 * parsed as YAML (an override's VALUE).  What this reports and the nodes
 * it creates are located at (src, line), a segment of the path at column
 * col0 + its 1-based offset in the path. */
void pl_apply_path(loader *L, ynode **root, const char *text, size_t klen, const char *value_text, ynode *val,
                   const char *src, int line, int col0)
{
    char *key = strndup(text, klen);
    char **seg = calloc(klen + 1, sizeof *seg);
    int *segcol = calloc(klen + 1, sizeof *segcol);
    if (!key || !seg || !segcol) {
        L->oom = 1;
        goto done;
    }
    int n_seg = 0;
    for (char *s = key, *save = NULL, *t = strtok_r(s, ".", &save); t; t = strtok_r(NULL, ".", &save)) {
        segcol[n_seg] = (int)(t - key) + 1;
        seg[n_seg++] = t;
    }
    /* strtok_r skips empty segments: compare lengths to catch "a..b" */
    size_t joined = 0;
    for (int i = 0; i < n_seg; i++)
        joined += strlen(seg[i]) + (i > 0);
    if (n_seg == 0 || joined != klen) {
        pl_diag_loc(&L->d, src, line, col0 + 1, "'%.*s' is not a key path (names joined by '.', e.g. train.steps)",
                    (int)klen, text);
        goto done;
    }
    if (value_text && pl_parse_yaml(value_text, strlen(value_text), src, line, col0 + (int)klen + 1, &L->d, &val))
        goto done;
    if (!val && !(val = pl_ynode_scalar("", 1, src, line, col0 + (int)klen + 2))) {
        L->oom = 1;
        goto done;
    }
    if (!*root || pl_is_null(*root)) {
        pl_ynode_free(*root);
        if (!(*root = pl_ynode_new(Y_MAP, src, line, col0 + 1))) {
            L->oom = 1;
            goto done;
        }
    }
    ynode *cur = *root;
    const char *parent = NULL;
    char sofar[512] = "";
    for (int i = 0; i < n_seg;) {
        if (cur->kind == Y_SCALAR) {
            pl_diag_loc(&L->d, src, line, col0 + segcol[i], "%.*s: '%s' holds a value, not a mapping or a list",
                        (int)klen, text, sofar);
            goto done;
        }
        char kbuf[256];
        int take = 1;
        ynode **slot = NULL;
        if (cur->kind == Y_SEQ) {
            long long idx;
            if (pl_parse_ll(seg[i], &idx) || idx < 0 || idx > cur->n) {
                pl_diag_loc(&L->d, src, line, col0 + segcol[i],
                            "%.*s: '%s' is not an index of '%s', which has %d item%s (0-%d, or %d to add one)",
                            (int)klen, text, seg[i], sofar, cur->n, cur->n == 1 ? "" : "s", cur->n - 1, cur->n);
                goto done;
            }
            snprintf(kbuf, sizeof kbuf, "%s", seg[i]);
            if (idx == cur->n) {
                ynode *fresh = pl_ynode_new(Y_MAP, src, line, col0 + segcol[i]);
                if (!fresh || pl_ynode_push(cur, NULL, fresh)) {
                    pl_ynode_free(fresh);
                    L->oom = 1;
                    goto done;
                }
            }
            slot = &cur->vals[idx];
        } else {
            take = match_key(cur, seg, i, n_seg, parent, kbuf, sizeof kbuf);
            int at = pl_map_find(cur, kbuf);
            if (at < 0) {
                ynode *k = pl_ynode_scalar(kbuf, 1, src, line, col0 + segcol[i]);
                ynode *fresh = pl_ynode_new(Y_MAP, src, line, col0 + segcol[i]);
                if (!k || !fresh || pl_ynode_push(cur, k, fresh)) {
                    pl_ynode_free(k);
                    pl_ynode_free(fresh);
                    L->oom = 1;
                    goto done;
                }
                at = cur->n - 1;
            }
            /* a model has one source: setting one replaces the others */
            if (i + take == n_seg && parent && !strcmp(parent, "model") &&
                (!strcmp(kbuf, "path") || !strcmp(kbuf, "preset") || !strcmp(kbuf, "config"))) {
                /* a directory has its own weights: no init seed either */
                static const char *const srcs[] = { "path", "preset", "config", "seed" };
                for (int q = 0; q < 4; q++) {
                    int x = pl_map_find(cur, srcs[q]);
                    if (x >= 0 && strcmp(srcs[q], kbuf) && (q < 3 || !strcmp(kbuf, "path"))) {
                        pl_map_remove(cur, x);
                        if (x < at)
                            at--;
                    }
                }
            }
            slot = &cur->vals[at];
        }
        size_t off = strlen(sofar);
        snprintf(sofar + off, sizeof sofar - off, "%s%s", off ? "." : "", kbuf);
        i += take;
        if (i == n_seg) {
            pl_ynode_free(*slot);
            *slot = val;
            val = NULL;
            break;
        }
        if (pl_is_null(*slot)) {
            ynode *fresh = pl_ynode_new(Y_MAP, src, line, col0 + segcol[i]);
            if (!fresh) {
                L->oom = 1;
                goto done;
            }
            pl_ynode_free(*slot);
            *slot = fresh;
        }
        parent = cur->kind == Y_MAP ? cur->keys[slot - cur->vals]->text : parent;
        cur = *slot;
    }
done:
    pl_ynode_free(val);
    free(segcol);
    free(seg);
    free(key);
}

void pl_apply_override(loader *L, ynode **root, const char *text, int ordinal)
{
    const char *eq = strchr(text, '=');
    if (!eq || eq == text) {
        pl_diag_loc(&L->d, pl_set_src, ordinal, 1, "expected KEY=VALUE (e.g. train.steps=10), got '%s'", text);
        return;
    }
    pl_apply_path(L, root, text, (size_t)(eq - text), eq + 1, NULL, pl_set_src, ordinal, 0);
}

/* ---- load ---------------------------------------------------------------------------------------------- */

static char *dir_of(const char *path)
{
    const char *slash = strrchr(path, '/');
    if (!slash)
        return strdup("");
    if (slash == path)
        return strdup("/");
    return strndup(path, (size_t)(slash - path));
}

/* runs/<file name without its extension> */
static const char *default_output(pr_pipeline *p)
{
    const char *base = strrchr(p->path, '/');
    base = base ? base + 1 : p->path;
    char buf[512];
    snprintf(buf, sizeof buf, "runs/%s", base);
    char *dot = strrchr(buf + 5, '.');
    if (dot && dot != buf + 5)
        *dot = '\0';
    return pl_keep(p, buf);
}

/* ---- compare arms ------------------------------------------------------------------------------------ */

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

/* ---- load ------------------------------------------------------------------------------------------------ */

/* Check root as a pipeline into L->p.  With arms, `modules` may be left
 * out (each arm brings its own). */
static void validate(loader *L, const ynode *root, int has_arms)
{
    pr_pipeline *p = L->p;
    static const char *const top[] = { "model", "modules", "task", "train", "compare" };
    if (pl_is_null(root)) {
        pl_diag_loc(&L->d, p->path, 1, 1, "empty pipeline: expected a mapping with keys model, modules, task "
                    "and train (see docs/pipeline.md)");
        return;
    }
    if (root->kind != Y_MAP) {
        char g[200];
        pl_got(g, sizeof g, root);
        pl_diag_at(&L->d, root, "a pipeline is a mapping with keys model, modules, task and train, got %s", g);
        return;
    }
    pl_check_keys(L, root, "", top, 5);
    for (int i = 0; i < 3; i++)
        if (!pl_map_get(root, top[i]) && !(i == 1 && has_arms))
            pl_diag_at(&L->d, root, "missing required key '%s'%s", top[i],
                       i == 1 ? " (write 'modules: []' for none)" : "");
    const ynode *n;
    if ((n = pl_map_get(root, "model")))
        pl_load_model(L, n);
    pl_load_train(L, pl_map_get(root, "train"));
    if ((n = pl_map_get(root, "task")))
        pl_load_task(L, n);
    if ((n = pl_map_get(root, "modules")))
        pl_load_modules(L, n);
    if (!p->tc.out_dir)
        p->tc.out_dir = default_output(p);
}

static void loader_done(loader *L)
{
    if (L->shape_owned)
        pr_model_free(L->shape);
    L->shape = NULL;
    L->shape_owned = 0;
}

/* Check arm i as its own pipeline and add what it reports to L's
 * diagnostics (the base's own problems, reported once). */
static void check_arm(loader *L, const ynode *root, const ynode *arm, int i)
{
    loader A;
    memset(&A, 0, sizeof A);
    A.reg = L->reg;
    A.dir = L->dir;
    char prefix[48];
    snprintf(prefix, sizeof prefix, "compare.arms.%d.", i);
    A.mod_prefix = prefix;
    A.p = calloc(1, sizeof *A.p);
    if (!A.p || !(A.p->path = strdup(L->p->path))) {
        pr_pipeline_free(A.p);
        L->oom = 1;
        return;
    }
    A.p->reg = L->reg;
    pr_train_config_default(&A.p->tc);
    ynode *t = pl_arm_tree(&A, root, arm);
    if (t)
        validate(&A, t, 0);
    for (int k = 0; k < A.d.n && !L->d.oom; k++) {
        int seen = 0;
        for (int j = 0; j < L->d.n && !seen; j++)
            seen = !strcmp(L->d.v[j].text, A.d.v[k].text);
        if (seen)
            continue;
        if (L->d.n == L->d.cap) {
            int cap = L->d.cap ? 2 * L->d.cap : 16;
            diag *v = realloc(L->d.v, (size_t)cap * sizeof *v);
            if (!v) {
                L->d.oom = 1;
                break;
            }
            L->d.v = v;
            L->d.cap = cap;
        }
        L->d.v[L->d.n] = A.d.v[k];
        L->d.v[L->d.n].seq = L->d.n;
        L->d.n++;
        A.d.v[k].text = NULL;   /* moved */
    }
    L->oom |= A.oom || A.d.oom;
    pl_ynode_free(t);
    loader_done(&A);
    pl_diags_free(&A.d);
    pr_pipeline_free(A.p);
}

enum { ARMS_ALL = -2 };   /* the base pipeline and every arm checked */

static int load_impl(const char *path, int arm, const char *const *overrides, int n_overrides,
                     const pr_registry *reg, pr_pipeline **out, pr_pipeline_report_fn report, void *arg,
                     pr_error *err)
{
    if (!out)
        return pr_errorf(err, PR_ERR_INVALID, "pipeline: NULL output pointer");
    *out = NULL;
    if (!path || !reg || (n_overrides > 0 && !overrides) || arm < ARMS_ALL)
        return pr_errorf(err, PR_ERR_INVALID, "pipeline: NULL path, registry or overrides, or a bad arm");
    char *text = NULL;
    size_t len = 0;
    int rc = fileio_read_all(path, (size_t)16 << 20, &text, &len, err);
    if (rc)
        return rc;
    loader L;
    memset(&L, 0, sizeof L);
    L.reg = reg;
    pr_pipeline *p = calloc(1, sizeof *p);
    L.p = p;
    L.dir = dir_of(path);
    ynode *root = NULL;
    if (!p || !L.dir || !(p->path = strdup(path))) {
        free(text);
        free(L.dir);
        pr_pipeline_free(p);
        return pr_errorf(err, PR_ERR_NOMEM, "%s: out of memory", path);
    }
    p->reg = reg;
    pr_train_config_default(&p->tc);
    /* the file's name as written locates its diagnostics */
    int parse_failed = pl_parse_yaml(text, len, p->path, 1, 0, &L.d, &root) != 0;
    free(text);
    if (!parse_failed) {
        for (int i = 0; i < n_overrides; i++)
            pl_apply_override(&L, &root, overrides[i] ? overrides[i] : "", i + 1);
        const ynode *c = root && root->kind == Y_MAP ? pl_map_get(root, "compare") : NULL, *arms = NULL;
        int *arm_ok = NULL;
        if (c && !pl_is_null(c))
            arms = pl_load_compare(&L, c, &arm_ok);
        else
            c = NULL;
        if (arm >= 0) {
            char where[64];
            snprintf(where, sizeof where, "compare.arms.%d.", arm);
            if (!c)
                pl_diag_loc(&L.d, p->path, 1, 1,
                            "no compare section, so no arm %d (see docs/pipeline.md, compare arms)", arm);
            else if (arms && arm >= arms->n)
                pl_diag_at(&L.d, arms, "compare.arms: no arm %d (the file has %d)", arm, arms->n);
            else if (arms && arm_ok[arm]) {
                L.mod_prefix = where;
                ynode *t = pl_arm_tree(&L, root, arms->vals[arm]);
                if (t)
                    validate(&L, t, 0);
                pl_ynode_free(t);
                p->arm = p->arm_names[arm];
                /* the arm's output: the file's (or its default) / arm name */
                char *o = p->tc.out_dir && p->arm ? fileio_join(p->tc.out_dir, p->arm) : NULL;
                if (!o || !(p->tc.out_dir = pl_keep(p, o)))
                    L.oom = 1;
                free(o);
            }
        } else {
            validate(&L, root, c != NULL);
            for (int i = 0; arm == ARMS_ALL && arms && i < arms->n; i++)
                if (arm_ok[i])
                    check_arm(&L, root, arms->vals[i], i);
        }
        free(arm_ok);
    }
    pl_ynode_free(root);
    loader_done(&L);
    free(L.dir);
    if (L.oom || L.d.oom) {
        pl_diags_free(&L.d);
        pr_pipeline_free(p);
        return pr_errorf(err, PR_ERR_NOMEM, "%s: out of memory", path);
    }
    if (L.d.n) {
        pl_report_all(&L.d, report, arg, err);
        pl_diags_free(&L.d);
        pr_pipeline_free(p);
        return PR_ERR_INVALID;
    }
    pl_diags_free(&L.d);
    *out = p;
    return PR_OK;
}

int pr_pipeline_load_report(const char *path, const char *const *overrides, int n_overrides,
                            const pr_registry *reg, pr_pipeline **out, pr_pipeline_report_fn report, void *arg,
                            pr_error *err)
{
    return load_impl(path, ARMS_ALL, overrides, n_overrides, reg, out, report, arg, err);
}

int pr_pipeline_load(const char *path, const char *const *overrides, int n_overrides, const pr_registry *reg,
                     pr_pipeline **out, pr_error *err)
{
    return pr_pipeline_load_report(path, overrides, n_overrides, reg, out, NULL, NULL, err);
}

int pr_pipeline_load_arm(const char *path, int arm, const char *const *overrides, int n_overrides,
                         const pr_registry *reg, pr_pipeline **out, pr_pipeline_report_fn report, void *arg,
                         pr_error *err)
{
    if (arm < PR_PIPELINE_BASE) {
        if (out)
            *out = NULL;
        return pr_errorf(err, PR_ERR_INVALID, "pipeline: arm %d: expected an index or PR_PIPELINE_BASE", arm);
    }
    return load_impl(path, arm, overrides, n_overrides, reg, out, report, arg, err);
}

int pr_pipeline_n_arms(const pr_pipeline *p)
{
    return p ? p->n_arms : 0;
}

const char *pr_pipeline_arm_name(const pr_pipeline *p, int i)
{
    return p && i >= 0 && i < p->n_arms ? p->arm_names[i] : NULL;
}

int pr_pipeline_find_arm(const pr_pipeline *p, const char *name)
{
    for (int i = 0; p && name && i < p->n_arms; i++)
        if (p->arm_names[i] && !strcmp(p->arm_names[i], name))
            return i;
    return -1;
}

const char *pr_pipeline_arm(const pr_pipeline *p)
{
    return p ? p->arm : NULL;
}

/* ---- accessors --------------------------------------------------------------------------------------- */

const char *pr_pipeline_path(const pr_pipeline *p)
{
    return p ? p->path : NULL;
}

int pr_pipeline_model_source(const pr_pipeline *p)
{
    return p ? p->source : 0;
}

const char *pr_pipeline_model_name(const pr_pipeline *p)
{
    return p && p->source != PR_PIPELINE_MODEL_CONFIG ? p->model_name : NULL;
}

const pr_model_config *pr_pipeline_model_config(const pr_pipeline *p)
{
    return p ? &p->cfg : NULL;
}

const char *pr_pipeline_tokenizer_dir(const pr_pipeline *p)
{
    return p ? p->tok_dir : NULL;
}

int pr_pipeline_n_modules(const pr_pipeline *p)
{
    return p ? p->n_mods : 0;
}

int pr_pipeline_module_spec(const pr_pipeline *p, int i, pr_module_spec *spec)
{
    if (!p || !spec || i < 0 || i >= p->n_mods)
        return PR_ERR_INVALID;
    pl_fill_spec(p, &p->mods[i], spec);
    return PR_OK;
}

const pr_module_plan *pr_pipeline_module_plan(const pr_pipeline *p, int i)
{
    if (!p || i < 0 || i >= p->n_mods || !p->mods[i].planned)
        return NULL;
    return &p->mods[i].plan;
}

const int *pr_pipeline_module_layers(const pr_pipeline *p, int i, int *n)
{
    if (!p || i < 0 || i >= p->n_mods) {
        if (n)
            *n = 0;
        return NULL;
    }
    if (n)
        *n = p->mods[i].layers ? p->mods[i].n_layers : p->cfg.n_layers;
    return p->mods[i].layers;
}

/* ---- counts ------------------------------------------------------------------------------------------ */

static int open_tokenizer(const pr_pipeline *p, pr_tokenizer **tok, pr_error *err)
{
    if (p->tok_dir)
        return pr_tokenizer_load(p->tok_dir, tok, err);
    if (p->cfg.vocab_size == 256)
        return pr_tokenizer_byte(tok, err);
    return pr_errorf(err, PR_ERR_INVALID,
                     "%s: model: a vocabulary of %d needs model.tokenizer (a directory with vocab.json and "
                     "merges.txt); only a 256-entry vocabulary uses the byte tokenizer", p->model_where,
                     p->cfg.vocab_size);
}

int pr_pipeline_counts_get(const pr_pipeline *p, pr_pipeline_counts *out, pr_error *err)
{
    if (!p || !out)
        return pr_errorf(err, PR_ERR_INVALID, "pipeline: NULL pipeline or output");
    memset(out, 0, sizeof *out);
    out->base = pr_config_param_count(&p->cfg);
    int64_t trainable = 0;
    for (int i = 0; i < p->n_mods; i++) {
        out->modules += p->mods[i].plan.params;
        trainable += p->mods[i].plan.trainable + p->mods[i].plan.base_selected;
    }
    if (p->tc.task && !strcmp(p->tc.task, "classification")) {
        pr_tokenizer *tok = NULL;
        int rc = open_tokenizer(p, &tok, err);
        if (rc)
            return rc;
        data_dataset ds;
        memset(&ds, 0, sizeof ds);
        rc = data_load(p->tc.train_path, p->tc.format, "classification", tok, p->tc.seq_len, NULL, &ds, err);
        pr_tokenizer_free(tok);
        if (rc)
            return rc;
        out->classes = ds.labels.n;
        data_dataset_free(&ds);
        out->head = (int64_t)p->cfg.d_model * out->classes + out->classes;
        trainable += out->head;
    }
    out->all = out->base + out->modules + out->head;
    out->trainable = trainable;
    return PR_OK;
}

static void thousands(int64_t v, char *buf, size_t len)
{
    char digits[32];
    snprintf(digits, sizeof digits, "%lld", (long long)(v < 0 ? -v : v));
    size_t n = strlen(digits), o = 0;
    if (v < 0 && o + 1 < len)
        buf[o++] = '-';
    for (size_t i = 0; i < n && o + 1 < len; i++) {
        if (i > 0 && (n - i) % 3 == 0 && o + 1 < len)
            buf[o++] = ',';
        if (o + 1 < len)
            buf[o++] = digits[i];
    }
    buf[o] = '\0';
}

void pr_pipeline_format_counts(const pr_pipeline_counts *c, char *buf, size_t len)
{
    char t[32], a[32];
    thousands(c->trainable, t, sizeof t);
    thousands(c->all, a, sizeof a);
    snprintf(buf, len, "trainable params: %s || all params: %s || trainable%%: %.4f", t, a,
             c->all > 0 ? 100.0 * (double)c->trainable / (double)c->all : 0.0);
}

/* ---- build ------------------------------------------------------------------------------------------- */

/* A fuse entry: each file attached frozen as "<name>.<k>" (k its place in
 * the list), then the fusion module over them, from `load:` if given. */
static int build_fuse(const pr_pipeline *p, pr_model *m, const pipe_module *pm, pr_error *e)
{
    pr_module **kids = calloc((size_t)pm->n_files, sizeof *kids);
    if (!kids)
        return pr_errorf(e, PR_ERR_NOMEM, "out of memory");
    int rc = PR_OK;
    for (int k = 0; k < pm->n_files && !rc; k++) {
        if (!pm->force && (rc = pr_module_file_check_base(pm->files[k], p->base_fp, e)))
            break;
        pr_module_spec ks;
        pr_module_file_spec(pm->files[k], &ks);
        char name[300];
        snprintf(name, sizeof name, "%s.%d", pm->name, k);
        ks.name = name;
        ks.trainable = 0;
        if (!(rc = pr_module_attach(m, &ks, &kids[k], e)))
            rc = pr_module_file_fill(pm->files[k], kids[k], e);
    }
    pr_fusion_spec fs = { pm->name, kids, pm->n_files, pm->trainable, pm->has_seed ? pm->seed : p->tc.seed };
    pr_module *fusion = NULL;
    if (!rc)
        rc = pr_module_fuse(m, &fs, &fusion, e);
    if (!rc && pm->fusion_load)
        rc = pr_fusion_fill(fusion, pm->fusion_load, e);
    free(kids);
    return rc;
}

int pr_pipeline_build(pr_pipeline *p, pr_model **model, pr_tokenizer **tok, pr_error *err)
{
    if (!p || !model || !tok)
        return pr_errorf(err, PR_ERR_INVALID, "pipeline: NULL pipeline or output");
    *model = NULL;
    *tok = NULL;
    pr_model *m = NULL;
    int rc;
    if (p->loaded) {
        m = p->loaded;
        p->loaded = NULL;
    } else if (p->source == PR_PIPELINE_MODEL_PATH) {
        rc = pr_model_load_hf(p->model_name, &m, err);
    } else {
        rc = pr_model_create(&p->cfg, &m, err);
        if (rc)
            return rc;
    }
    if (!m)
        return rc;
    if ((rc = open_tokenizer(p, tok, err))) {
        pr_model_free(m);
        return rc;
    }
    /* saved modules were saved against this fingerprint of the base */
    pr_model_fingerprint(m, p->base_fp, sizeof p->base_fp);
    for (int i = 0; i < p->n_mods; i++) {
        pipe_module *pm = &p->mods[i];
        pr_module_spec spec;
        pl_fill_spec(p, pm, &spec);
        spec.tokenizer = *tok;
        pr_error e = { 0 };
        pr_module *mod = NULL;
        rc = PR_OK;
        if (pm->kind == MOD_FUSE) {
            if ((rc = build_fuse(p, m, pm, &e))) {
                pr_errorf(err, (pr_status)rc, "%s: %s", pm->where, e.msg);
                pr_model_free(m);
                pr_tokenizer_free(*tok);
                *tok = NULL;
                return rc;
            }
            continue;
        }
        if (pm->kind != MOD_TECHNIQUE && pm->mode != MODE_NEW && !pm->force)
            for (int k = 0; k < pm->n_files && !rc; k++)
                rc = pr_module_file_check_base(pm->files[k], p->base_fp, &e);
        if (!rc)
            rc = pr_module_attach(m, &spec, &mod, &e);
        if (!rc && pm->kind == MOD_LOAD && pm->mode != MODE_NEW)
            rc = pr_module_file_fill(pm->files[0], mod, &e);
        if (!rc && pm->kind == MOD_AVERAGE)
            rc = pr_module_files_fill_average(pm->files, pm->weights, pm->n_files, mod, &e);
        if (rc) {
            pr_errorf(err, (pr_status)rc, "%s: %s", pm->where, e.msg);
            pr_model_free(m);
            pr_tokenizer_free(*tok);
            *tok = NULL;
            return rc;
        }
    }
    *model = m;
    return PR_OK;
}

const char *pr_pipeline_base_fingerprint(const pr_pipeline *p)
{
    return p && p->base_fp[0] ? p->base_fp : NULL;
}

void pr_pipeline_train_config(const pr_pipeline *p, pr_train_config *cfg)
{
    if (!cfg)
        return;
    if (!p) {
        pr_train_config_default(cfg);
        return;
    }
    *cfg = p->tc;
}

/* ---- run outputs ------------------------------------------------------------------------------- */

/* A YAML double-quoted scalar (JSON's escapes are YAML's). */
static void yq(FILE *o, const char *s)
{
    fputc('"', o);
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\')
            fprintf(o, "\\%c", c);
        else if (c == '\n')
            fputs("\\n", o);
        else if (c < 0x20)
            fprintf(o, "\\x%02x", c);
        else
            fputc(c, o);
    }
    fputc('"', o);
}

/* The shortest %g form of v that reads back as the same float (single)
 * or double. */
static const char *short_num(char *buf, size_t len, double v, int single)
{
    for (int prec = 1; prec <= 17; prec++) {
        snprintf(buf, len, "%.*g", prec, v);
        double r = strtod(buf, NULL);
        if (single ? (float)r == (float)v : r == v)
            break;
    }
    return buf;
}

/* An absolute form of path (as is when it cannot be resolved). */
static void yq_abs(FILE *o, const char *path)
{
    char *r = realpath(path, NULL);
    yq(o, r ? r : path);
    free(r);
}

static const char *mod_name_of(const pr_model *m, int i)
{
    pr_module *mod = pr_model_module(m, i);
    return mod ? pr_module_name(mod) : "?";
}

/* The resolved pipeline, every module loaded frozen: module files of the
 * run are named relative to the run directory, others absolutely. */
static int write_snapshot(const pr_pipeline *p, const pr_model *m, const char *path, pr_error *err)
{
    char *text = NULL;
    size_t len = 0;
    FILE *o = open_memstream(&text, &len);
    if (!o)
        return pr_errorf(err, PR_ERR_NOMEM, "%s: out of memory", path);
    const pr_model_config *c = &p->cfg;
    fprintf(o, "# The resolved pipeline of this run, every module loaded frozen (written by\n"
               "# peftref %s).  Evaluate, sample or merge the run with\n"
               "#   peftref eval --pipeline RUN, peftref generate RUN, peftref merge RUN --out DIR\n"
               "# Relative paths are relative to this file's directory.\n", pr_version());
    fprintf(o, "model:\n");
    if (p->source == PR_PIPELINE_MODEL_PATH) {
        fprintf(o, "  path: ");
        yq_abs(o, p->model_name);
        fputc('\n', o);
    } else if (p->source == PR_PIPELINE_MODEL_PRESET) {
        fprintf(o, "  preset: %s\n  seed: %llu\n", p->model_name, (unsigned long long)c->seed);
    } else {
        fprintf(o, "  config: {n_layers: %d, d_model: %d, n_heads: %d, n_kv_heads: %d, d_head: %d, d_ff: %d, "
                   "vocab: %d, max_seq: %d, bias: %s, tied_head: %s}\n  seed: %llu\n",
                c->n_layers, c->d_model, c->n_heads, c->n_kv_heads, c->d_head, c->d_ff, c->vocab_size, c->max_seq,
                c->bias ? "true" : "false", c->tied_head ? "true" : "false", (unsigned long long)c->seed);
    }
    if (p->tok_dir && !(p->source == PR_PIPELINE_MODEL_PATH && !strcmp(p->tok_dir, p->model_name))) {
        fprintf(o, "  tokenizer: ");
        yq_abs(o, p->tok_dir);
        fputc('\n', o);
    }
    fprintf(o, "modules:%s\n", p->n_mods ? "" : " []");
    for (int i = 0; i < p->n_mods; i++) {
        const pipe_module *pm = &p->mods[i];
        const char *name = mod_name_of(m, i);
        if (pm->kind == MOD_FUSE) {
            /* the fused files as they were, the fusion frozen at its trained weights */
            fprintf(o, "  - fuse: [");
            for (int k = 0; k < pm->n_files; k++) {
                fprintf(o, "%s", k ? ", " : "");
                yq_abs(o, pr_module_file_path(pm->files[k]));
            }
            fprintf(o, "]");
            if (pm->trainable) {
                char rel[300];
                snprintf(rel, sizeof rel, "modules/%s.safetensors", name);
                fprintf(o, "\n    load: ");
                yq(o, rel);
            } else if (pm->fusion_load) {
                fprintf(o, "\n    load: ");
                yq_abs(o, pm->fusion_load);
            }
            fprintf(o, "\n    seed: %llu\n    trainable: false\n    name: ",
                    (unsigned long long)(pm->has_seed ? pm->seed : p->tc.seed));
            yq(o, name);
            fprintf(o, "\n%s", pm->force ? "    force: true\n" : "");
            continue;
        }
        if (pm->kind == MOD_LOAD && pm->mode == MODE_FROZEN) {
            fprintf(o, "  - load: ");
            yq_abs(o, pr_module_file_path(pm->files[0]));
        } else if (pm->kind == MOD_AVERAGE && pm->mode == MODE_FROZEN) {
            fprintf(o, "  - average: [");
            for (int k = 0; k < pm->n_files; k++) {
                fprintf(o, "%s", k ? ", " : "");
                yq_abs(o, pr_module_file_path(pm->files[k]));
            }
            fprintf(o, "]\n    weights: [");
            for (int k = 0; k < pm->n_files; k++) {
                char wb[40];
                fprintf(o, "%s%s", k ? ", " : "", short_num(wb, sizeof wb, pm->weights[k], 0));
            }
            fprintf(o, "]");
        } else {
            fprintf(o, "  - load: ");
            char rel[300];
            snprintf(rel, sizeof rel, "modules/%s.safetensors", name);
            yq(o, rel);
        }
        fprintf(o, "\n    mode: frozen\n    name: ");
        yq(o, name);
        fputc('\n', o);
        if (pm->force)
            fprintf(o, "    force: true\n");
    }
    const pr_train_config *t = &p->tc;
    fprintf(o, "task:\n  type: %s\n  train: ", t->task ? t->task : "lm");
    yq_abs(o, t->train_path);
    fputc('\n', o);
    if (t->val_path) {
        fprintf(o, "  validation: ");
        yq_abs(o, t->val_path);
        fputc('\n', o);
    }
    char b[7][40];
    fprintf(o, "  val_fraction: %s\n  format: %s\n", short_num(b[0], 40, t->val_fraction, 0),
            t->format ? t->format : "auto");
    fprintf(o, "train:\n  steps: %d\n  batch: %d\n  seq_len: %d\n  accum: %d\n  lr: %s\n  min_lr_ratio: %s\n"
               "  schedule: %s\n  warmup: %d\n  weight_decay: %s\n  decay_all: %s\n  clip: %s\n",
            t->steps, t->batch, t->seq_len, t->accum, short_num(b[0], 40, t->lr, 1),
            short_num(b[1], 40, t->min_lr_ratio, 1), t->schedule ? t->schedule : "cosine", t->warmup,
            short_num(b[2], 40, t->weight_decay, 1), t->decay_all ? "true" : "false", short_num(b[3], 40, t->clip, 1));
    fprintf(o, "  beta1: %s\n  beta2: %s\n  eps: %s\n  head_lr_mult: %s\n  seed: %llu\n  eval_every: %d\n"
               "  eval_batches: %d\n  log_every: %d\n  checkpoint_every: %d\n",
            short_num(b[4], 40, t->beta1, 1), short_num(b[5], 40, t->beta2, 1), short_num(b[6], 40, t->eps, 1),
            short_num(b[0], 40, t->head_lr_mult, 1), (unsigned long long)t->seed, t->eval_every, t->eval_batches,
            t->log_every, t->ckpt_every);
    if (fclose(o) != 0) {
        free(text);
        return pr_errorf(err, PR_ERR_NOMEM, "%s: out of memory", path);
    }
    int rc = fileio_write_atomic(path, text, len, err);
    free(text);
    return rc;
}

int pr_pipeline_save_run(const pr_pipeline *p, pr_model *m, const pr_train_result *res, pr_error *err)
{
    if (!p || !m)
        return pr_errorf(err, PR_ERR_INVALID, "pipeline: NULL pipeline or model");
    const char *out = p->tc.out_dir;
    if (pr_model_n_modules(m) != p->n_mods)
        return pr_errorf(err, PR_ERR_INVALID, "pipeline: the model has %d modules, the pipeline %d",
                         pr_model_n_modules(m), p->n_mods);
    char *dir = fileio_join(out, "modules");
    if (!dir)
        return pr_errorf(err, PR_ERR_NOMEM, "out of memory");
    int rc = PR_OK;
    if (mkdir(out, 0777) != 0 && errno != EEXIST)
        rc = pr_errorf(err, PR_ERR_IO, "%s: cannot create the output directory: %s", out, strerror(errno));
    if (!rc && p->n_mods && mkdir(dir, 0777) != 0 && errno != EEXIST)
        rc = pr_errorf(err, PR_ERR_IO, "%s: cannot create it: %s", dir, strerror(errno));
    pr_module_save_info info = { .base_fingerprint = pr_pipeline_base_fingerprint(p),
                                 .steps = res ? res->steps_done : 0,
                                 .final_train_loss = res && res->steps_done ? res->final_train_loss : NAN,
                                 .final_val_loss = res ? res->final_val_loss : NAN };
    for (int i = 0; i < p->n_mods && !rc; i++) {
        const pipe_module *pm = &p->mods[i];
        if (pm->kind != MOD_TECHNIQUE && pm->mode == MODE_FROZEN)
            continue;  /* referenced, not copied */
        pr_module *mod = pr_model_module(m, i);
        char file[512];
        snprintf(file, sizeof file, "%s/%s.safetensors", dir, pr_module_name(mod));
        if (pm->kind == MOD_FUSE) {
            /* the fused modules are referenced; the fusion's weights are saved when trained */
            if (pm->trainable)
                rc = pr_fusion_save(mod, file, err);
            continue;
        }
        pr_module_save_info mi = info;
        if (pm->kind != MOD_TECHNIQUE && pm->mode == MODE_CONTINUE) {
            /* steps count from the saved module's own training */
            const char *tr = pr_module_file_meta(pm->files[0], "training");
            const char *st = tr ? strstr(tr, "\"steps\":") : NULL;
            if (st)
                mi.steps += strtoll(st + 8, NULL, 10);
        }
        rc = pr_module_save(mod, file, &mi, err);
    }
    free(dir);
    if (rc)
        return rc;
    char *snap = fileio_join(out, "pipeline.yaml");
    if (!snap)
        return pr_errorf(err, PR_ERR_NOMEM, "out of memory");
    rc = write_snapshot(p, m, snap, err);
    free(snap);
    return rc;
}
