/* peftref: YAML pipelines (see include/peftref/pipeline.h, docs/pipeline.md):
 * the pr_pipeline, its loading and its accessors.
 *
 * A load runs three stages:
 *  1. yaml_tree.c: libyaml's event parser builds a small tree of scalars,
 *     lists and mappings in which every node keeps its 1-based line and
 *     column;
 *  2. overrides.c: `--set key.path=value` overrides edit that tree (their
 *     nodes carry the location "--set:N:COL");
 *  3. validate() walks the tree against the schema (schema.c, modules.c,
 *     saved_modules.c), collecting every problem as "FILE:LINE:COL:
 *     message" (diagnostics.c) instead of stopping at the first, and fills
 *     the pipeline: model shape, module specs (checked against each
 *     technique's descriptor and planned with pr_module_plan_for), task
 *     and training settings.
 * A file with a compare section is also checked arm by arm (arms.c), or
 * loaded as one of its arms. */
#include "config.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fileio.h"
#include "pipeline_internal.h"

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
    pr_head_free(&p->head);
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
    for (int i = 0; p->arm_labels && i < p->n_arms; i++)
        free(p->arm_labels[i]);
    free(p->arm_labels);
    free(p->arm_n_points);
    pr_model_free(p->loaded);
    free(p->path);
    free(p);
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
    pl_check_metrics(L, root);
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
static void check_arm(loader *L, const ynode *root, const ynode *arm, int i, int point)
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
    pl_tc_init(A.p);
    ynode *t = pl_arm_tree(&A, root, arm, point);
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

static int load_impl(const char *path, int arm, int point, const char *const *overrides, int n_overrides,
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
    pr_error re = { 0 };
    int rc = fileio_read_all(path, PL_YAML_MAX_BYTES, &text, &len, &re);
    if (rc == PR_ERR_FORMAT)   /* too large: name the limit */
        return pr_errorf(err, rc, "%s (PL_YAML_MAX_BYTES: a pipeline file is at most %zu bytes)", re.msg,
                         PL_YAML_MAX_BYTES);
    if (rc) {
        if (err)
            *err = re;
        return rc;
    }
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
    pl_tc_init(p);
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
            else if (arms && arm_ok[arm] && (point < 0 || point >= p->arm_n_points[arm]))
                pl_diag_at(&L.d, arms->vals[arm], "compare.arms.%d: no setting %d of its sweep (it has %d)", arm,
                           point, p->arm_n_points[arm]);
            else if (arms && arm_ok[arm]) {
                L.mod_prefix = where;
                ynode *t = pl_arm_tree(&L, root, arms->vals[arm], point);
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
                for (int k = 0; arm_ok[i] && k < p->arm_n_points[i]; k++)
                    check_arm(&L, root, arms->vals[i], i, k);
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
    return load_impl(path, ARMS_ALL, 0, overrides, n_overrides, reg, out, report, arg, err);
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
    return load_impl(path, arm, 0, overrides, n_overrides, reg, out, report, arg, err);
}

int pr_pipeline_load_arm_point(const char *path, int arm, int point, const char *const *overrides,
                               int n_overrides, const pr_registry *reg, pr_pipeline **out,
                               pr_pipeline_report_fn report, void *arg, pr_error *err)
{
    if (arm < 0 || point < 0) {
        if (out)
            *out = NULL;
        return pr_errorf(err, PR_ERR_INVALID, "pipeline: arm %d, setting %d: expected indices", arm, point);
    }
    return load_impl(path, arm, point, overrides, n_overrides, reg, out, report, arg, err);
}

int pr_pipeline_compare_seeds(const pr_pipeline *p)
{
    return p && p->compare_seeds > 0 ? p->compare_seeds : 1;
}

int pr_pipeline_set_output(pr_pipeline *p, const char *dir, pr_error *err)
{
    const char *d = p && dir ? pl_keep(p, dir) : NULL;
    if (!d)
        return pr_errorf(err, PR_ERR_NOMEM, "out of memory");
    p->tc.out_dir = d;
    return PR_OK;
}

int pr_pipeline_compare_mpi_ranks(const pr_pipeline *p, const char **where)
{
    if (where)
        *where = p && p->compare_mpi_ranks_at[0] ? p->compare_mpi_ranks_at : NULL;
    return p && p->compare_mpi_ranks > 0 ? p->compare_mpi_ranks : 1;
}

int pr_pipeline_arm_points(const pr_pipeline *p, int i)
{
    return p && i >= 0 && i < p->n_arms && p->arm_n_points ? p->arm_n_points[i] : 1;
}

const char *pr_pipeline_arm_point_label(const pr_pipeline *p, int i, int point)
{
    if (!p || i < 0 || i >= p->n_arms || !p->arm_labels || !p->arm_labels[i] || point < 0 ||
        point >= p->arm_n_points[i])
        return NULL;
    return p->arm_labels[i][point];
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
