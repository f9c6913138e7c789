/* peftref pipelines: the modules section (docs/pipeline.md, "Modules").
 *
 * A technique entry's sites, layers and options are checked against the
 * technique's descriptor and the model; entries made from saved module
 * files are saved_modules.c's.  Then over the whole list: explicit names
 * must be unique, the others default to the technique's name (then _2,
 * _3 ...), and each module is planned (pr_module_plan_for) on the model. */
#include "config.h"

#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "names.h"
#include "pipeline_internal.h"

#define MAX_LAYERS 4096

/* ---- sites, layers and options ------------------------------------------------ */

static void option_decl(const pr_technique *t, uint32_t i, pr_option_decl *d)
{
    memset(d, 0, sizeof *d);
    if (!t->options)
        return;
    uint32_t stride = t->options[0].struct_size ? t->options[0].struct_size : (uint32_t)sizeof *d;
    const char *src = (const char *)t->options + (size_t)i * stride;
    uint32_t own = *(const uint32_t *)src;
    memcpy(d, src, own < sizeof *d ? own : sizeof *d);
}

/* Every site name and alias users may write, for suggestions. */
static const char *const site_words[] = { "embed", "qkv", "q", "k", "v", "o", "attn.k", "attn.v", "attn_out",
                                          "ffn.up", "ffn.gate", "ffn.act", "ffn.down", "ffn_out", "block_out",
                                          "c_attn", "attn.c_attn", "attn.c_proj", "c_fc", "mlp.c_fc",
                                          "mlp.c_proj", "q_proj", "k_proj", "v_proj", "o_proj", "up_proj",
                                          "gate_proj", "down_proj", "wte" };
#define N_SITE_WORDS ((int)(sizeof site_words / sizeof site_words[0]))

/* One site name at (line, col): parse and check it against the technique
 * and the model.  Returns the site or -1. */
static int check_site(loader *L, const char *word, const char *src, int line, int col, const char *path,
                      const pr_technique *t)
{
    int s = pr_site_parse(word);
    char buf[256];
    if (s < 0) {
        char h[128];
        pl_hint(h, sizeof h, word, site_words, N_SITE_WORDS);
        if (!strcmp(word, "c_proj"))
            snprintf(h, sizeof h, " (GPT-2 has two: say attn.c_proj for o or mlp.c_proj for ffn.down)");
        pl_diag_loc(&L->d, src, line, col, "%s: unknown site '%s'%s", path, word, h);
        return -1;
    }
    if (t && !(t->sites & PR_SITE_BIT(s))) {
        names_site_mask(t->sites, "none", buf, sizeof buf);
        pl_diag_loc(&L->d, src, line, col, "%s: technique '%s' cannot attach at site '%s' (allowed: %s)", path,
                    t->name, pr_site_name(s), buf);
        return -1;
    }
    if (L->shape && pr_model_site_dims(L->shape, s, NULL, NULL) != 0) {
        pl_diag_loc(&L->d, src, line, col, "%s: site '%s' does not exist in this model", path, pr_site_name(s));
        return -1;
    }
    return s;
}

/* sites: [a, b] or "a, b" or a. */
static int load_sites(loader *L, const ynode *n, const char *path, const pr_technique *t, uint32_t *mask)
{
    int bad = 0;
    *mask = 0;
    if (n->kind == Y_SEQ) {
        if (n->n == 0) {
            pl_diag_at(&L->d, n, "%s: an empty list (leave the key out for the technique's default sites)", path);
            return -1;
        }
        for (int i = 0; i < n->n; i++) {
            const ynode *e = n->vals[i];
            if (pl_want_scalar(L, e, path, "a site name")) {
                bad = 1;
                continue;
            }
            int s = check_site(L, e->text, e->src, e->line, e->col, path, t);
            if (s < 0)
                bad = 1;
            else if (*mask & PR_SITE_BIT(s)) {
                pl_diag_at(&L->d, e, "%s: site '%s' is listed twice", path, pr_site_name(s));
                bad = 1;
            } else
                *mask |= PR_SITE_BIT(s);
        }
        return bad ? -1 : 0;
    }
    if (pl_want_scalar(L, n, path, "a site name or a list of them"))
        return -1;
    /* "q, v": columns of each name inside the scalar (+1 for a quote) */
    const char *s = n->text;
    int quote = !n->plain;
    size_t i = 0, len = strlen(s);
    while (i <= len) {
        while (i < len && (s[i] == ' ' || s[i] == ','))
            i++;
        if (i >= len)
            break;
        size_t j = i;
        while (j < len && s[j] != ',' && s[j] != ' ')
            j++;
        char word[128];
        snprintf(word, sizeof word, "%.*s", (int)(j - i), s + i);
        int site = check_site(L, word, n->src, n->line, n->col + quote + (int)i, path, t);
        if (site < 0)
            bad = 1;
        else if (*mask & PR_SITE_BIT(site)) {
            pl_diag_loc(&L->d, n->src, n->line, n->col + quote + (int)i, "%s: site '%s' is listed twice", path,
                        pr_site_name(site));
            bad = 1;
        } else
            *mask |= PR_SITE_BIT(site);
        i = j;
    }
    if (!bad && !*mask) {
        pl_diag_at(&L->d, n, "%s: no site named", path);
        bad = 1;
    }
    return bad ? -1 : 0;
}

/* Add layer l (checked against the model) to the list. */
static int add_layer(loader *L, int *layers, int *n, long long l, const char *src, int line, int col,
                     const char *path)
{
    int nl = L->p->have_cfg ? L->p->cfg.n_layers : MAX_LAYERS;
    if (l < 0 || l >= nl) {
        if (L->p->have_cfg)
            pl_diag_loc(&L->d, src, line, col, "%s: layer %lld is out of range: the model has %d layers (0-%d)", path,
                        l, nl, nl - 1);
        else
            pl_diag_loc(&L->d, src, line, col, "%s: layer %lld is out of range", path, l);
        return -1;
    }
    for (int i = 0; i < *n; i++)
        if (layers[i] == l) {
            pl_diag_loc(&L->d, src, line, col, "%s: layer %lld is listed twice", path, l);
            return -1;
        }
    layers[(*n)++] = (int)l;
    return 0;
}

/* "0-5", "0-2, 7" */
static int layer_ranges(loader *L, const ynode *n, const char *path, int *layers, int *count)
{
    const char *s = n->text;
    int quote = !n->plain, bad = 0;
    size_t i = 0, len = strlen(s);
    while (i < len) {
        while (i < len && (s[i] == ' ' || s[i] == ','))
            i++;
        if (i >= len)
            break;
        size_t j = i;
        while (j < len && s[j] != ',')
            j++;
        size_t e = j;
        while (e > i && s[e - 1] == ' ')
            e--;
        char item[64];
        snprintf(item, sizeof item, "%.*s", (int)(e - i), s + i);
        int col = n->col + quote + (int)i;
        long long a, b;
        char *dash = strchr(item + 1, '-');
        int ok;
        if (dash) {
            *dash = '\0';
            ok = !pl_parse_ll(item, &a) && !pl_parse_ll(dash + 1, &b);
            *dash = '-';
        } else {
            ok = !pl_parse_ll(item, &a);
            b = a;
        }
        if (!ok) {
            pl_diag_loc(&L->d, n->src, n->line, col,
                        "%s: bad layer range '%s' (expected all, a list of layers, or ranges like \"0-5, 7\")", path,
                        item);
            bad = 1;
        } else if (b < a) {
            pl_diag_loc(&L->d, n->src, n->line, col, "%s: bad layer range '%s': it ends before it starts", path, item);
            bad = 1;
        } else if (b - a >= MAX_LAYERS) {
            pl_diag_loc(&L->d, n->src, n->line, col, "%s: layer range '%s' is longer than %d", path, item, MAX_LAYERS);
            bad = 1;
        } else {
            for (long long l = a; l <= b; l++)
                if (*count >= MAX_LAYERS || add_layer(L, layers, count, l, n->src, n->line, col, path)) {
                    bad = 1;
                    break;
                }
        }
        i = j;
    }
    if (!bad && *count == 0) {
        pl_diag_at(&L->d, n, "%s: no layer named", path);
        bad = 1;
    }
    return bad ? -1 : 0;
}

static int load_layers(loader *L, const ynode *n, const char *path, pipe_module *pm)
{
    int *layers = malloc(MAX_LAYERS * sizeof *layers), count = 0, bad = 0;
    if (!layers) {
        L->oom = 1;
        return -1;
    }
    long long l;
    if (n->kind == Y_SCALAR && !strcmp(n->text, "all")) {
        free(layers);
        return 0;
    } else if (n->kind == Y_SEQ) {
        if (n->n == 0) {
            pl_diag_at(&L->d, n, "%s: an empty list (write all, or leave the key out, for every layer)", path);
            bad = 1;
        }
        for (int i = 0; i < n->n && count < MAX_LAYERS; i++) {
            const ynode *e = n->vals[i];
            if (pl_get_int(L, e, path, LLONG_MIN, LLONG_MAX, &l) ||
                add_layer(L, layers, &count, l, e->src, e->line, e->col, path))
                bad = 1;
        }
    } else if (n->kind == Y_SCALAR && n->plain && !pl_parse_ll(n->text, &l)) {
        bad = add_layer(L, layers, &count, l, n->src, n->line, n->col, path) != 0;
    } else if (n->kind == Y_SCALAR && !pl_is_null(n)) {
        bad = layer_ranges(L, n, path, layers, &count) != 0;
    } else {
        char g[200];
        pl_got(g, sizeof g, n);
        pl_diag_at(&L->d, n, "%s: expected all, a list of layers or a string of ranges, got %s", path, g);
        bad = 1;
    }
    if (bad) {
        free(layers);
        return -1;
    }
    pm->layers = layers;
    pm->n_layers = count;
    return 0;
}

/* One option value checked against its declaration. */
static int check_option(loader *L, const ynode *v, const char *path, const pr_option_decl *o)
{
    char g[200];
    if (v->kind != Y_SCALAR || pl_is_null(v)) {
        pl_got(g, sizeof g, v);
        pl_diag_at(&L->d, v, "%s: expected a value, got %s", path, g);
        return -1;
    }
    double x;
    long long i;
    int b;
    switch (o->type) {
    case PR_OPT_INT:
        if (!v->plain || pl_parse_ll(v->text, &i)) {
            pl_got(g, sizeof g, v);
            pl_diag_at(&L->d, v, "%s: expected an integer, got %s", path, g);
            return -1;
        }
        x = (double)i;
        break;
    case PR_OPT_FLOAT: {
        char *end = NULL;
        x = v->plain ? strtod(v->text, &end) : 0;
        if (!v->plain || end == v->text || *end || !isfinite(x)) {
            pl_got(g, sizeof g, v);
            pl_diag_at(&L->d, v, "%s: expected a number, got %s", path, g);
            return -1;
        }
        break;
    }
    case PR_OPT_BOOL:
        if (!v->plain || (pl_text_bool(v->text, &b) && strcmp(v->text, "0") && strcmp(v->text, "1"))) {
            pl_got(g, sizeof g, v);
            pl_diag_at(&L->d, v, "%s: expected true or false, got %s", path, g);
            return -1;
        }
        return 0;
    case PR_OPT_ENUM: {
        const char *names[64];
        int n = 0;
        for (; o->choices && o->choices[n] && n < 64; n++)
            names[n] = o->choices[n];
        const char *dummy;
        return pl_get_choice(L, v, path, names, n, &dummy);
    }
    default:
        return 0;
    }
    if (!(o->min == 0.0 && o->max == 0.0) && (x < o->min || x > o->max)) {
        pl_diag_at(&L->d, v, "%s: %s is out of range [%g, %g]", path, v->text, o->min, o->max);
        return -1;
    }
    return 0;
}

static int push_setting(loader *L, pipe_module *pm, const char *name, const char *value, int site)
{
    pr_option_setting *o = realloc(pm->opts, (size_t)(pm->n_opts + 1) * sizeof *o);
    if (!o) {
        L->oom = 1;
        return -1;
    }
    pm->opts = o;
    o[pm->n_opts] = (pr_option_setting){ pl_keep(L->p, name), pl_keep(L->p, value), site };
    if (!o[pm->n_opts].name || !o[pm->n_opts].value) {
        L->oom = 1;
        return -1;
    }
    pm->n_opts++;
    return 0;
}

/* options: {name: value} (site < 0) or one site's overrides. */
static int load_options(loader *L, const ynode *n, const char *path, pipe_module *pm, int site)
{
    const pr_technique *t = pm->t;
    if (pl_want_map(L, n, path))
        return -1;
    const char *names[64];
    pr_option_decl decl[64];
    int nd = 0, bad = 0;
    for (uint32_t i = 0; i < t->n_options && nd < 64; i++, nd++) {
        option_decl(t, i, &decl[nd]);
        names[nd] = decl[nd].name ? decl[nd].name : "";
    }
    for (int k = 0; k < n->n; k++) {
        const ynode *key = n->keys[k], *val = n->vals[k];
        char opath[320];
        snprintf(opath, sizeof opath, "%s.%s", path, key->text);
        int j = 0;
        while (j < nd && strcmp(names[j], key->text))
            j++;
        if (j == nd) {
            char h[128], list[400] = "";
            size_t off = 0;
            pl_hint(h, sizeof h, key->text, names, nd);
            for (int q = 0; q < nd; q++)   /* a Hugging Face PEFT config name the technique declares */
                if (decl[q].peft_name && strcmp(decl[q].peft_name, key->text) == 0)
                    snprintf(h, sizeof h, " (did you mean '%s'? '%s' is its name in Hugging Face PEFT)", names[q],
                             key->text);
            for (int q = 0; q < nd; q++) {
                int w = snprintf(list + off, sizeof list - off, "%s%s", q ? ", " : "", names[q]);
                if (w > 0 && (size_t)w < sizeof list - off)
                    off += (size_t)w;
            }
            if (h[0])
                pl_diag_at(&L->d, key, "%s: technique '%s' has no option '%s'%s", path, t->name, key->text, h);
            else
                pl_diag_at(&L->d, key, "%s: technique '%s' has no option '%s' (its options: %s)", path, t->name,
                           key->text, nd ? list : "none");
            bad = 1;
            continue;
        }
        if (site >= 0 && !decl[j].per_site) {
            pl_diag_at(&L->d, key, "%s: option '%s' cannot be set per site (set it under options)", opath,
                       key->text);
            bad = 1;
            continue;
        }
        if (check_option(L, val, opath, &decl[j]) || push_setting(L, pm, key->text, val->text, site))
            bad = 1;
    }
    return bad ? -1 : 0;
}

/* A fuse entry's `options:` (docs/pipeline.md, "Composition"): the
 * composite technique's own options, checked like a technique entry's. */
int pl_load_module_options(loader *L, const ynode *n, const char *path, pipe_module *pm)
{
    return load_options(L, n, path, pm, -1);
}

static void load_site_options(loader *L, const ynode *n, const char *path, pipe_module *pm)
{
    if (pl_want_map(L, n, path))
        return;
    uint32_t used = pm->sites ? pm->sites : pr_technique_default_sites(pm->t, L->p->cfg.family);
    for (int k = 0; k < n->n; k++) {
        const ynode *key = n->keys[k], *val = n->vals[k];
        char spath[300];
        snprintf(spath, sizeof spath, "%s.%s", path, key->text);
        int s = check_site(L, key->text, key->src, key->line, key->col, path, pm->t);
        if (s < 0)
            continue;
        if (!(used & PR_SITE_BIT(s))) {
            char buf[256];
            names_site_mask(used, "none", buf, sizeof buf);
            pl_diag_at(&L->d, key, "%s: site '%s' is not one of the module's sites (%s)", path, pr_site_name(s), buf);
            continue;
        }
        load_options(L, val, spath, pm, s);
    }
}

/* ---- entries and the list ------------------------------------------------------ */

int pl_name_ok(const char *s)
{
    if (!*s)
        return 0;
    for (; *s; s++)
        if (*s == '/' || (unsigned char)*s <= 0x20)
            return 0;
    return 1;
}

static int load_module(loader *L, const ynode *m, int idx, pipe_module *pm, const ynode **name_node)
{
    static const char *const keys[] = { "technique", "name", "sites", "layers", "options", "site_options",
                                        "trainable", "seed", "gate" };
    char path[64];
    snprintf(path, sizeof path, "%smodules.%d", L->mod_prefix ? L->mod_prefix : "", idx);
    snprintf(pm->where, sizeof pm->where, "%s:%d:%d", m->src, m->line, m->col);
    pm->trainable = 1;
    *name_node = NULL;
    if (pl_want_map(L, m, path))
        return -1;
    if (pl_map_get(m, "fuse"))
        return pl_load_fuse(L, m, path, pm, name_node);
    if (pl_map_get(m, "load") || pl_map_get(m, "average"))
        return pl_load_saved(L, m, path, pm, name_node);
    int errors_before = L->d.n;
    pl_check_keys(L, m, path, keys, (int)(sizeof keys / sizeof keys[0]));
    char kp[96];
    const ynode *n = pl_map_get(m, "technique");
    if (!n) {
        pl_diag_at(&L->d, m, "%s: missing required key 'technique'", path);
    } else if (!pl_want_scalar(L, n, (snprintf(kp, sizeof kp, "%s.technique", path), kp), "a technique name")) {
        pm->t = pr_registry_find(L->reg, n->text);
        if (!pm->t) {
            const char *h = pr_registry_suggest(L->reg, n->text);
            char more[300] = "";
            if (h)
                snprintf(more, sizeof more, " (did you mean '%s'?)", h);
            else if (pr_registry_count(L->reg) == 0)
                snprintf(more, sizeof more, " (no techniques were found: see peftref plugins)");
            else
                snprintf(more, sizeof more, " (peftref plugins lists the %d found)", pr_registry_count(L->reg));
            pl_diag_at(&L->d, n, "%s: unknown technique '%s'%s", kp, n->text, more);
        }
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
    long long v;
    if ((n = pl_map_get(m, "seed")) &&
        !pl_get_int(L, n, (snprintf(kp, sizeof kp, "%s.seed", path), kp), 0, LLONG_MAX, &v)) {
        pm->seed = (uint64_t)v;
        pm->has_seed = 1;
    }
    int b;
    if ((n = pl_map_get(m, "trainable")) && !pl_get_bool(L, n, (snprintf(kp, sizeof kp, "%s.trainable", path), kp), &b))
        pm->trainable = b;
    if ((n = pl_map_get(m, "gate")) && !pl_get_bool(L, n, (snprintf(kp, sizeof kp, "%s.gate", path), kp), &b))
        pm->gate = b;
    if ((n = pl_map_get(m, "layers")))
        load_layers(L, n, (snprintf(kp, sizeof kp, "%s.layers", path), kp), pm);
    if (!pm->t)
        return -1;  /* sites and options need the technique */
    /* per-site options are checked against valid sites only */
    int sites_ok = 1;
    if ((n = pl_map_get(m, "sites")))
        sites_ok = load_sites(L, n, (snprintf(kp, sizeof kp, "%s.sites", path), kp), pm->t, &pm->sites) == 0;
    if ((n = pl_map_get(m, "options")))
        load_options(L, n, (snprintf(kp, sizeof kp, "%s.options", path), kp), pm, -1);
    if ((n = pl_map_get(m, "site_options")) && sites_ok)
        load_site_options(L, n, (snprintf(kp, sizeof kp, "%s.site_options", path), kp), pm);
    return L->d.n > errors_before ? -1 : 0;
}

void pl_fill_spec(const pr_pipeline *p, const pipe_module *pm, pr_module_spec *s)
{
    memset(s, 0, sizeof *s);
    s->technique = pm->t;
    s->name = pm->name;
    s->sites = pm->sites;
    s->layers = pm->layers;
    s->n_layers = pm->n_layers;
    s->options = pm->opts;
    s->n_options = pm->n_opts;
    s->trainable = pm->trainable;
    s->seed = pm->has_seed ? pm->seed : p->tc.seed;
    s->gate = pm->gate;
}

void pl_load_modules(loader *L, const ynode *list)
{
    pr_pipeline *p = L->p;
    if (pl_is_null(list))
        return;
    if (list->kind != Y_SEQ) {
        char g[200];
        pl_got(g, sizeof g, list);
        pl_diag_at(&L->d, list, "modules: expected a list of modules (items starting with '- technique:'), got %s", g);
        return;
    }
    p->mods = calloc((size_t)(list->n ? list->n : 1), sizeof *p->mods);
    const ynode **name_nodes = calloc((size_t)(list->n ? list->n : 1), sizeof *name_nodes);
    int *ok = calloc((size_t)(list->n ? list->n : 1), sizeof *ok);
    if (!p->mods || !name_nodes || !ok) {
        free(name_nodes);
        free(ok);
        L->oom = 1;
        return;
    }
    p->n_mods = list->n;
    for (int i = 0; i < list->n; i++)
        ok[i] = load_module(L, list->vals[i], i, &p->mods[i], &name_nodes[i]) == 0;
    /* explicit names must be unique */
    for (int i = 0; i < p->n_mods; i++)
        for (int j = 0; j < i && name_nodes[i]; j++)
            if (name_nodes[j] && !strcmp(p->mods[i].name, p->mods[j].name)) {
                pl_diag_at(&L->d, name_nodes[i], "%smodules.%d.name: duplicate module name '%s' (modules.%d, line %d)",
                           L->mod_prefix ? L->mod_prefix : "", i, p->mods[i].name, j, name_nodes[j]->line);
                ok[i] = 0;
                break;
            }
    /* default names: the technique's, then _2, _3 ... skipping taken ones */
    for (int i = 0; i < p->n_mods; i++) {
        pipe_module *pm = &p->mods[i];
        if (pm->name || !pm->t)
            continue;
        char cand[200];
        const char *base = pm->base_name ? pm->base_name : pm->t->name;
        for (int k = 1;; k++) {
            if (k == 1)
                snprintf(cand, sizeof cand, "%s", base);
            else
                snprintf(cand, sizeof cand, "%s_%d", base, k);
            int taken = 0;
            for (int j = 0; j < p->n_mods && !taken; j++)
                taken = j != i && p->mods[j].name && !strcmp(p->mods[j].name, cand);
            if (!taken)
                break;
        }
        pm->name = pl_keep(p, cand);
        if (!pm->name)
            L->oom = 1;
    }
    /* what each module would create on this model */
    for (int i = 0; i < p->n_mods && p->have_cfg && !L->oom; i++) {
        if (!ok[i])
            continue;
        if (p->mods[i].kind == MOD_FUSE) {
            pl_plan_fuse(L, list->vals[i], &p->mods[i]);
            continue;
        }
        pr_module_spec spec;
        pl_fill_spec(p, &p->mods[i], &spec);
        pr_error e = { 0 };
        if (pr_module_plan_for(&p->cfg, &spec, &p->mods[i].plan, &e))
            pl_diag_at(&L->d, list->vals[i], "%s", e.msg);
        else
            p->mods[i].planned = 1;
    }
    free(name_nodes);
    free(ok);
}
