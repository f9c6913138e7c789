/* peftref pipelines: module entries made from saved module files
 * (docs/pipeline.md, "Saved modules" and "Composition").
 *
 *   load: FILE           one module, with its technique, sites, layers and
 *                        options, used frozen, trained further or anew;
 *   average: [FILE ...]  the weighted mean of compatible modules;
 *   fuse: [FILE ...]     the files attached frozen and combined by a
 *                        composite module (a plugin technique declaring
 *                        pr_technique.composite): the one named by
 *                        technique:, or the only composite installed;
 *                        its plan counts them all. */
#include "config.h"

#include <limits.h>
#include <stddef.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "pipeline_internal.h"

static int is_composite(const pr_technique *t)
{
    return t->struct_size >= offsetof(pr_technique, composite) + sizeof t->composite && t->composite;
}

/* The composite technique of a `fuse:` entry: technique: when given, else
 * the one composite technique installed.  NULL after a diagnostic. */
static const pr_technique *fuse_technique(loader *L, const ynode *m, const char *path)
{
    const ynode *n = pl_map_get(m, "technique");
    char kp[112];
    snprintf(kp, sizeof kp, "%s.technique", path);
    if (n) {
        const char *name;
        if (pl_get_string(L, n, kp, &name))
            return NULL;
        const pr_technique *t = L->reg ? pr_registry_find(L->reg, name) : NULL;
        if (!t)
            pl_diag_at(&L->d, n, "%s: technique '%s' is not installed ('peftref plugins' lists what was found)", kp,
                       name);
        else if (!is_composite(t))
            pl_diag_at(&L->d, n, "%s: technique '%s' is not a composite technique, so it cannot fuse modules", kp,
                       name);
        return t && is_composite(t) ? t : NULL;
    }
    const pr_technique *found = NULL;
    int n_found = 0;
    char names[256] = "";
    for (int i = 0; L->reg && i < pr_registry_count(L->reg); i++) {
        const pr_technique *t = pr_registry_technique(L->reg, i);
        if (!is_composite(t))
            continue;
        size_t k = strlen(names);
        snprintf(names + k, sizeof names - k, "%s'%s'", k ? ", " : "", t->name);
        found = t;
        n_found++;
    }
    if (n_found == 1)
        return found;
    if (n_found == 0)
        pl_diag_at(&L->d, m, "%s: fuse needs a composite technique, and none is installed ('peftref plugins' "
                   "lists what was found)", path);
    else
        pl_diag_at(&L->d, m, "%s: several composite techniques are installed (%s): say which with technique:", path,
                   names);
    return NULL;
}

/* A saved module file named at n: resolved, readable, opened (its
 * technique found, its metadata parsed).  NULL after a diagnostic. */
static pr_module_file *open_saved(loader *L, const ynode *n, const char *path, unsigned flags)
{
    const char *s;
    if (pl_get_string(L, n, path, &s))
        return NULL;
    const char *file = pl_resolve_path(L, n, s);
    if (!file)
        return NULL;
    int before = L->d.n;
    struct stat st;
    int is_dir = stat(file, &st) == 0 && S_ISDIR(st.st_mode);   /* a PEFT adapter directory */
    pl_check_exists(L, n, path, file, is_dir);
    if (L->d.n > before)
        return NULL;
    pr_module_file *f = NULL;
    pr_error e = { 0 };
    /* a Hugging Face PEFT adapter directory is read against the base model */
    if (pr_module_file_open_ex(file, L->reg, L->p->have_cfg ? &L->p->cfg : NULL, flags, &f, &e)) {
        pl_diag_at(&L->d, n, "%s: %s", path, e.msg);
        return NULL;
    }
    return f;
}

static int push_file(loader *L, pipe_module *pm, pr_module_file *f)
{
    pr_module_file **v = realloc(pm->files, (size_t)(pm->n_files + 1) * sizeof *v);
    if (!v) {
        pr_module_file_close(f);
        L->oom = 1;
        return -1;
    }
    pm->files = v;
    pm->files[pm->n_files++] = f;
    return 0;
}

/* `load: FILE` or `average: [FILE, ...]` with a required mode: the
 * technique, options, sites and layers come from the (first) file. */
int pl_load_saved(loader *L, const ynode *m, const char *path, pipe_module *pm, const ynode **name_node)
{
    static const char *const load_keys[] = { "load", "mode", "name", "seed", "force", "allow_unknown_fields" };
    static const char *const avg_keys[] = { "average", "weights", "mode", "name", "force" };
    static const char *const modes[] = { "frozen", "continue", "new" };
    int errors_before = L->d.n, avg = pl_map_get(m, "average") != NULL;
    char kp[96];
    if (avg && pl_map_get(m, "load")) {
        pl_diag_at(&L->d, m->keys[pl_map_find(m, "average")], "%s: give one of load or average, not both", path);
        return -1;
    }
    pm->kind = avg ? MOD_AVERAGE : MOD_LOAD;
    for (int i = 0; i < m->n; i++) {
        const char *k = m->keys[i]->text;
        const char *const *known = avg ? avg_keys : load_keys;
        int ok = 0, n_known = avg ? 5 : 6;
        for (int j = 0; j < n_known && !ok; j++)
            ok = !strcmp(k, known[j]);
        if (ok)
            continue;
        if (!strcmp(k, "technique") || !strcmp(k, "sites") || !strcmp(k, "layers") || !strcmp(k, "options") ||
            !strcmp(k, "site_options") || !strcmp(k, "trainable"))
            pl_diag_at(&L->d, m->keys[i], "%s.%s: a saved module brings its own technique, sites, layers and options; "
                       "say how to use it with mode (frozen, continue or new)", path, k);
        else {
            char h[128];
            pl_hint(h, sizeof h, k, known, n_known);
            pl_diag_at(&L->d, m->keys[i], "unknown key '%s.%s'%s", path, k, h);
        }
    }
    const ynode *n = pl_map_get(m, "mode");
    const char *mode = NULL;
    if (!n)
        pl_diag_at(&L->d, m, "%s: missing required key 'mode': frozen (attached, not trained), continue (trained "
                   "further from the saved values) or new (a fresh module of the same configuration)%s", path,
                   avg ? "; an average is frozen or continue" : "");
    else if (!pl_get_choice(L, n, (snprintf(kp, sizeof kp, "%s.mode", path), kp), modes, avg ? 2 : 3, &mode))
        pm->mode = !strcmp(mode, "frozen") ? MODE_FROZEN : !strcmp(mode, "continue") ? MODE_CONTINUE : MODE_NEW;
    int b;
    if ((n = pl_map_get(m, "force")) && !pl_get_bool(L, n, (snprintf(kp, sizeof kp, "%s.force", path), kp), &b))
        pm->force = b;
    long long v;
    if ((n = pl_map_get(m, "seed")) &&
        !pl_get_int(L, n, (snprintf(kp, sizeof kp, "%s.seed", path), kp), 0, LLONG_MAX, &v)) {
        pm->seed = (uint64_t)v;
        pm->has_seed = 1;
    }
    if ((n = pl_map_get(m, "name"))) {
        snprintf(kp, sizeof kp, "%s.name", path);
        if (!pl_get_string(L, n, kp, &pm->name)) {
            if (!pl_name_ok(pm->name))
                pl_diag_at(&L->d, n, "%s: '%s' is not a module name (no '/', spaces or control characters)", kp,
                           pm->name);
            else
                *name_node = n;
        }
    }
    unsigned open_flags = 0;
    if ((n = pl_map_get(m, "allow_unknown_fields")) &&
        !pl_get_bool(L, n, (snprintf(kp, sizeof kp, "%s.allow_unknown_fields", path), kp), &b) && b)
        open_flags |= PR_MODULE_FILE_ALLOW_UNKNOWN_FIELDS;
    if (!avg) {
        n = pl_map_get(m, "load");
        pr_module_file *f = open_saved(L, n, (snprintf(kp, sizeof kp, "%s.load", path), kp), open_flags);
        if (f)
            push_file(L, pm, f);
    } else {
        n = pl_map_get(m, "average");
        snprintf(kp, sizeof kp, "%s.average", path);
        if (n->kind != Y_SEQ || n->n < 2) {
            char g[200];
            pl_got(g, sizeof g, n);
            pl_diag_at(&L->d, n, "%s: expected a list of at least two saved module files, got %s", kp,
                       n->kind == Y_SEQ ? "a shorter list" : g);
        } else {
            int bad = 0;
            for (int i = 0; i < n->n; i++) {
                char ip[112];
                snprintf(ip, sizeof ip, "%s.%d", kp, i);
                pr_module_file *f = open_saved(L, n->vals[i], ip, 0);
                if (!f || push_file(L, pm, f))
                    bad = 1;
            }
            pr_error e = { 0 };
            if (!bad && pr_module_files_compatible(pm->files, pm->n_files, &e))
                pl_diag_at(&L->d, n, "%s: %s", kp, e.msg);
        }
        pm->weights = calloc((size_t)(n->n > 0 ? n->n : 1), sizeof *pm->weights);
        if (!pm->weights) {
            L->oom = 1;
            return -1;
        }
        const ynode *w = pl_map_get(m, "weights");
        double sum = 0.0;
        if (w && (w->kind != Y_SEQ || w->n != n->n)) {
            pl_diag_at(&L->d, w, "%s.weights: expected a list of %d numbers, one per file", path, n->n);
        } else {
            for (int i = 0; i < n->n; i++) {
                double x = 1.0;
                char wp[112];
                snprintf(wp, sizeof wp, "%s.weights.%d", path, i);
                if (w && pl_get_float(L, w->vals[i], wp, 0, 0, INFINITY, 0, &x))
                    x = 1.0;
                pm->weights[i] = x;
                sum += x;
            }
            if (w && !(sum > 0))
                pl_diag_at(&L->d, w, "%s.weights: the weights sum to 0", path);
            for (int i = 0; i < n->n && sum > 0; i++)
                pm->weights[i] /= sum;
        }
    }
    if (L->d.n > errors_before || pm->n_files == 0 || !pm->mode)
        return -1;
    pr_module_spec spec;
    pr_module_file_spec(pm->files[0], &spec);
    pm->t = spec.technique;
    pm->sites = spec.sites;
    pm->gate = spec.gate;
    pm->base_name = pl_keep(L->p, spec.name);
    if (spec.layers) {
        pm->layers = malloc((size_t)spec.n_layers * sizeof *pm->layers);
        if (!pm->layers) {
            L->oom = 1;
            return -1;
        }
        memcpy(pm->layers, spec.layers, (size_t)spec.n_layers * sizeof *pm->layers);
        pm->n_layers = spec.n_layers;
        for (int i = 0; L->p->have_cfg && i < pm->n_layers; i++)
            if (pm->layers[i] < 0 || pm->layers[i] >= L->p->cfg.n_layers) {
                pl_diag_at(&L->d, m, "%s: the saved module uses layer %d; this model has %d layers", path,
                           pm->layers[i], L->p->cfg.n_layers);
                return -1;
            }
    }
    pm->opts = malloc((size_t)(spec.n_options ? spec.n_options : 1) * sizeof *pm->opts);
    if (!pm->opts) {
        L->oom = 1;
        return -1;
    }
    if (spec.n_options)
        memcpy(pm->opts, spec.options, (size_t)spec.n_options * sizeof *pm->opts);
    pm->n_opts = spec.n_options;
    pm->trainable = pm->mode != MODE_FROZEN;
    return 0;
}

/* `fuse: [FILE, ...]`: saved modules attached frozen and combined by a
 * composite module (fuse_technique), the entry's module (docs/pipeline.md,
 * "Composition"); load: starts the composite from its saved weights. */
int pl_load_fuse(loader *L, const ynode *m, const char *path, pipe_module *pm, const ynode **name_node)
{
    static const char *const keys[] = { "fuse", "technique", "name", "seed", "trainable", "force", "load", "options" };
    int errors_before = L->d.n;
    char kp[96];
    pm->kind = MOD_FUSE;
    pm->trainable = 1;
    pl_check_keys(L, m, path, keys, (int)(sizeof keys / sizeof keys[0]));
    const ynode *n;
    int b;
    long long v;
    if ((n = pl_map_get(m, "trainable")) && !pl_get_bool(L, n, (snprintf(kp, sizeof kp, "%s.trainable", path), kp), &b))
        pm->trainable = b;
    if ((n = pl_map_get(m, "force")) && !pl_get_bool(L, n, (snprintf(kp, sizeof kp, "%s.force", path), kp), &b))
        pm->force = b;
    if ((n = pl_map_get(m, "seed")) &&
        !pl_get_int(L, n, (snprintf(kp, sizeof kp, "%s.seed", path), kp), 0, LLONG_MAX, &v)) {
        pm->seed = (uint64_t)v;
        pm->has_seed = 1;
    }
    if ((n = pl_map_get(m, "name"))) {
        snprintf(kp, sizeof kp, "%s.name", path);
        if (!pl_get_string(L, n, kp, &pm->name)) {
            if (!pl_name_ok(pm->name))
                pl_diag_at(&L->d, n, "%s: '%s' is not a module name (no '/', spaces or control characters)", kp,
                           pm->name);
            else
                *name_node = n;
        }
    }
    if ((n = pl_map_get(m, "load"))) {
        const char *s;
        snprintf(kp, sizeof kp, "%s.load", path);
        if (!pl_get_string(L, n, kp, &s) && (pm->composite_load = pl_resolve_path(L, n, s)))
            pl_check_exists(L, n, kp, pm->composite_load, 0);
    }
    n = pl_map_get(m, "fuse");
    snprintf(kp, sizeof kp, "%s.fuse", path);
    if (n->kind != Y_SEQ || n->n < 2) {
        char g[200];
        pl_got(g, sizeof g, n);
        pl_diag_at(&L->d, n, "%s: expected a list of at least two saved module files to fuse, got %s", kp,
                   n->kind == Y_SEQ ? "a shorter list" : g);
        return -1;
    }
    for (int i = 0; i < n->n; i++) {
        char ip[112];
        snprintf(ip, sizeof ip, "%s.%d", kp, i);
        pr_module_file *f = open_saved(L, n->vals[i], ip, 0);
        if (f)
            push_file(L, pm, f);
    }
    if (L->d.n > errors_before || pm->n_files != n->n)
        return -1;
    if (!(pm->t = fuse_technique(L, m, path)))
        return -1;
    if ((n = pl_map_get(m, "options")) &&
        pl_load_module_options(L, n, (snprintf(kp, sizeof kp, "%s.options", path), kp), pm))
        return -1;
    /* the composite attaches where its members do */
    pr_module_spec spec;
    pr_module_file_spec(pm->files[0], &spec);
    pm->sites = spec.sites;
    if (spec.layers) {
        pm->layers = malloc((size_t)spec.n_layers * sizeof *pm->layers);
        if (!pm->layers) {
            L->oom = 1;
            return -1;
        }
        memcpy(pm->layers, spec.layers, (size_t)spec.n_layers * sizeof *pm->layers);
        pm->n_layers = spec.n_layers;
    }
    return 0;
}

/* The plan of a fuse entry: the composite's parameters plus every
 * member's (frozen); the files must be additive modules sharing their
 * sites and layers. */
void pl_plan_fuse(loader *L, const ynode *at, pipe_module *pm)
{
    const pr_pipeline *p = L->p;
    pr_module_plan first = { 0 };
    int64_t kid_params = 0;
    for (int k = 0; k < pm->n_files; k++) {
        pr_module_spec ks;
        pr_module_file_spec(pm->files[k], &ks);
        ks.trainable = 0;
        pr_module_plan kp, fp;
        pr_error e = { 0 };
        pr_module_spec cs = { .technique = pm->t, .name = pm->name, .trainable = pm->trainable,
                              .options = pm->opts, .n_options = pm->n_opts };
        if (pr_composite_plan_for(&p->cfg, &cs, &ks, &fp, &e) || pr_module_plan_for(&p->cfg, &ks, &kp, &e)) {
            pl_diag_at(&L->d, at, "%s: %s", pr_module_file_path(pm->files[k]), e.msg);
            return;
        }
        if (k == 0) {
            first = kp;
            pm->plan = fp;
            pm->sites = kp.sites;
        } else {
            pr_module_spec s0;
            pr_module_file_spec(pm->files[0], &s0);
            int same = kp.sites == first.sites && (ks.layers == NULL) == (s0.layers == NULL) &&
                       (!ks.layers || ks.n_layers == s0.n_layers);
            for (int l = 0; same && ks.layers && l < ks.n_layers; l++)
                same = ks.layers[l] == s0.layers[l];
            if (!same) {
                pl_diag_at(&L->d, at, "%s and %s attach at different sites or layers; members must share them",
                           pr_module_file_path(pm->files[0]), pr_module_file_path(pm->files[k]));
                return;
            }
        }
        kid_params += kp.params;
    }
    pm->plan.params += kid_params;
    pm->planned = 1;
}
