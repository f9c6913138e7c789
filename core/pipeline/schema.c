/* peftref pipelines: the schema's typed values and its model, train and
 * task sections (docs/pipeline.md).
 *
 * Every reader takes a node and its dotted path, and on a bad value adds a
 * located diagnostic and returns -1, so validation goes on and reports
 * every problem at once.  The model section also builds the model's shape
 * (its tensor table, or the loaded model) that module sites are checked
 * against. */
#include "config.h"

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

#include "model_internal.h"
#include "pipeline_internal.h"

/* ---- validation helpers ------------------------------------------------------------------- */

static const char *kind_name(const ynode *n)
{
    if (pl_is_null(n))
        return "nothing";
    return n->kind == Y_MAP ? "a mapping" : n->kind == Y_SEQ ? "a list" : "a quoted string";
}

/* "got 'abc'" for a plain scalar, otherwise "got a list" ... */
void pl_got(char *buf, size_t len, const ynode *n)
{
    if (n->kind == Y_SCALAR && n->plain && !pl_is_null(n))
        snprintf(buf, len, "'%s'", n->text);
    else if (n->kind == Y_SCALAR && !n->plain)
        snprintf(buf, len, "the quoted string \"%s\"", n->text);
    else
        snprintf(buf, len, "%s", kind_name(n));
}

int pl_want_scalar(loader *L, const ynode *n, const char *path, const char *what)
{
    if (n->kind == Y_SCALAR && !pl_is_null(n))
        return 0;
    char g[200];
    pl_got(g, sizeof g, n);
    pl_diag_at(&L->d, n, "%s: expected %s, got %s", path, what, g);
    return -1;
}

int pl_parse_ll(const char *s, long long *out)
{
    char *end = NULL;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (end == s || *end || errno)
        return -1;
    *out = v;
    return 0;
}

int pl_get_int(loader *L, const ynode *n, const char *path, long long lo, long long hi, long long *out)
{
    long long v;
    if (n->kind != Y_SCALAR || !n->plain || pl_is_null(n) || pl_parse_ll(n->text, &v)) {
        char g[200];
        pl_got(g, sizeof g, n);
        pl_diag_at(&L->d, n, "%s: expected an integer, got %s", path, g);
        return -1;
    }
    if (v < lo || v > hi) {
        if (hi >= (1LL << 30))
            pl_diag_at(&L->d, n, "%s: %lld is out of range (at least %lld)", path, v, lo);
        else
            pl_diag_at(&L->d, n, "%s: %lld is out of range [%lld, %lld]", path, v, lo, hi);
        return -1;
    }
    *out = v;
    return 0;
}

/* lo_open / hi_open: exclusive bounds. */
int pl_get_float(loader *L, const ynode *n, const char *path, double lo, int lo_open, double hi, int hi_open,
                 double *out)
{
    char *end = NULL;
    double v = 0;
    if (n->kind == Y_SCALAR && n->plain && !pl_is_null(n))
        v = strtod(n->text, &end);
    if (!end || end == n->text || *end || !isfinite(v)) {
        char g[200];
        pl_got(g, sizeof g, n);
        pl_diag_at(&L->d, n, "%s: expected a number, got %s", path, g);
        return -1;
    }
    if (lo_open ? !(v > lo) : !(v >= lo)) {
        if (isinf(hi))
            pl_diag_at(&L->d, n, "%s: %s is out of range (%s %g)", path, n->text, lo_open ? "above" : "at least", lo);
        else
            pl_diag_at(&L->d, n, "%s: %s is out of range %c%g, %g%c", path, n->text, lo_open ? '(' : '[', lo, hi,
                       hi_open ? ')' : ']');
        return -1;
    }
    if (hi_open ? !(v < hi) : !(v <= hi)) {
        pl_diag_at(&L->d, n, "%s: %s is out of range %c%g, %g%c", path, n->text, lo_open ? '(' : '[', lo, hi,
                   hi_open ? ')' : ']');
        return -1;
    }
    *out = v;
    return 0;
}

int pl_text_bool(const char *s, int *out)
{
    static const char *const yes[] = { "true", "yes", "on" }, *const no[] = { "false", "no", "off" };
    for (int i = 0; i < 3; i++) {
        if (!strcasecmp(s, yes[i])) {
            *out = 1;
            return 0;
        }
        if (!strcasecmp(s, no[i])) {
            *out = 0;
            return 0;
        }
    }
    return -1;
}

int pl_get_bool(loader *L, const ynode *n, const char *path, int *out)
{
    if (n->kind != Y_SCALAR || !n->plain || pl_text_bool(n->text, out)) {
        char g[200];
        pl_got(g, sizeof g, n);
        pl_diag_at(&L->d, n, "%s: expected true or false, got %s", path, g);
        return -1;
    }
    return 0;
}

int pl_get_string(loader *L, const ynode *n, const char *path, const char **out)
{
    if (pl_want_scalar(L, n, path, "a string"))
        return -1;
    *out = pl_keep(L->p, n->text);
    if (!*out)
        L->oom = 1;
    return *out ? 0 : -1;
}

int pl_get_choice(loader *L, const ynode *n, const char *path, const char *const *choices, int n_choices,
                  const char **out)
{
    if (pl_want_scalar(L, n, path, "a name"))
        return -1;
    for (int i = 0; i < n_choices; i++)
        if (strcmp(n->text, choices[i]) == 0) {
            *out = choices[i];
            return 0;
        }
    char list[256] = "", h[128];
    size_t off = 0;
    for (int i = 0; i < n_choices; i++) {
        int w = snprintf(list + off, sizeof list - off, "%s%s", i ? ", " : "", choices[i]);
        if (w > 0 && (size_t)w < sizeof list - off)
            off += (size_t)w;
    }
    pl_hint(h, sizeof h, n->text, choices, n_choices);
    pl_diag_at(&L->d, n, "%s: '%s' is not one of %s%s", path, n->text, list, h);
    return -1;
}

int pl_want_map(loader *L, const ynode *n, const char *path)
{
    if (n->kind == Y_MAP)
        return 0;
    char g[200];
    pl_got(g, sizeof g, n);
    pl_diag_at(&L->d, n, "%s: expected a mapping, got %s", path, g);
    return -1;
}

/* Report keys of map not in known[]. */
void pl_check_keys(loader *L, const ynode *map, const char *path, const char *const *known, int n_known)
{
    for (int i = 0; i < map->n; i++) {
        const char *k = map->keys[i]->text;
        /* top-level "x-..." keys are the file's own (e.g. to hold YAML
         * anchors), as in Compose files */
        int ok = !*path && strncmp(k, "x-", 2) == 0;
        for (int j = 0; j < n_known && !ok; j++)
            ok = strcmp(k, known[j]) == 0;
        if (ok)
            continue;
        char h[128];
        pl_hint(h, sizeof h, k, known, n_known);
        pl_diag_at(&L->d, map->keys[i], "unknown key '%s%s%s'%s", path, *path ? "." : "", k, h);
    }
}

/* Resolve a path from the file against its directory (overrides are
 * typed at a shell: they stay relative to the working directory). */
const char *pl_resolve_path(loader *L, const ynode *n, const char *s)
{
    const char *r;
    if (s[0] == '/' || n->src == pl_set_src || !L->dir[0]) {
        r = pl_keep(L->p, s);
    } else {
        size_t len = strlen(L->dir) + strlen(s) + 2;
        char *buf = malloc(len);
        if (!buf) {
            L->oom = 1;
            return NULL;
        }
        snprintf(buf, len, "%s/%s", L->dir, s);
        r = pl_keep(L->p, buf);
        free(buf);
    }
    if (!r)
        L->oom = 1;
    return r;
}

/* A readable file (dir = 0) or directory (dir = 1). */
void pl_check_exists(loader *L, const ynode *n, const char *path, const char *resolved, int dir)
{
    struct stat st;
    const char *why = NULL;
    char rel[64] = "";
    if (strcmp(resolved, n->text) != 0)
        snprintf(rel, sizeof rel, " (relative to the pipeline's directory)");
    if (stat(resolved, &st) != 0)
        why = strerror(errno);
    else if (dir && !S_ISDIR(st.st_mode))
        why = "not a directory";
    else if (!dir && S_ISDIR(st.st_mode))
        why = "a directory, not a file";
    else if (access(resolved, R_OK) != 0)
        why = strerror(errno);
    if (why)
        pl_diag_at(&L->d, n, "%s: cannot read '%s'%s: %s", path, resolved, rel, why);
}

/* ---- model ------------------------------------------------------------------------------------ */

static const char *const preset_names[] = { "gpt2-tiny", "gpt2-small", "gpt2", "gpt2-medium", "gpt2-large",
                                            "gpt2-xl", "llama-tiny", "smollm-135m", "tinyllama-1.1b",
                                            "llama-3.2-1b" };
#define N_PRESETS ((int)(sizeof preset_names / sizeof preset_names[0]))

static void load_model_config(loader *L, const ynode *c)
{
    static const char *const keys[] = { "n_layers", "d_model", "n_heads", "n_kv_heads", "d_head", "d_ff",
                                        "vocab", "max_seq", "bias", "tied_head" };
    pr_model_config *cfg = &L->p->cfg;
    if (pl_want_map(L, c, "model.config"))
        return;
    pl_check_keys(L, c, "model.config", keys, (int)(sizeof keys / sizeof keys[0]));
    /* start from the small test shape; d_head, n_kv_heads and d_ff follow
     * d_model and n_heads unless given */
    pr_config_preset("gpt2-tiny", cfg);
    /* each dimension's bound (include/peftref/config.h), checked here to
     * locate the value; pr_config_validate checks their products */
    static const struct { long long max; const char *name; } bound[8] = {
        { PR_MAX_N_LAYERS, "PR_MAX_N_LAYERS" }, { PR_MAX_D_MODEL, "PR_MAX_D_MODEL" },
        { PR_MAX_N_HEADS, "PR_MAX_N_HEADS" }, { PR_MAX_N_HEADS, "PR_MAX_N_HEADS" },
        { PR_MAX_D_HEAD, "PR_MAX_D_HEAD" }, { PR_MAX_D_FF, "PR_MAX_D_FF" },
        { PR_MAX_VOCAB, "PR_MAX_VOCAB" }, { PR_MAX_SEQ, "PR_MAX_SEQ" },
    };
    int bad = 0;
    long long v[8] = { 0 };
    for (int i = 0; i < 8; i++) {
        const ynode *n = pl_map_get(c, keys[i]);
        char path[64];
        snprintf(path, sizeof path, "model.config.%s", keys[i]);
        if (n && pl_get_int(L, n, path, 1, LLONG_MAX, &v[i])) {
            bad = 1;
        } else if (v[i] > bound[i].max) {
            pl_diag_at(&L->d, n, "%s: %lld is more than %lld (%s)", path, v[i], bound[i].max, bound[i].name);
            v[i] = 0;
            bad = 1;
        }
    }
    if (v[0]) cfg->n_layers = (int)v[0];
    if (v[1]) cfg->d_model = (int)v[1];
    if (v[2]) cfg->n_heads = (int)v[2];
    cfg->n_kv_heads = v[3] ? (int)v[3] : cfg->n_heads;
    cfg->d_head = v[4] ? (int)v[4] : cfg->n_heads > 0 ? cfg->d_model / cfg->n_heads : 0;
    cfg->d_ff = v[5] ? (int)v[5] : 4 * cfg->d_model;
    if (v[6]) cfg->vocab_size = (int)v[6];
    if (v[7]) cfg->max_seq = (int)v[7];
    for (int i = 8; i < 10; i++) {
        const ynode *n = pl_map_get(c, keys[i]);
        int b;
        char path[64];
        snprintf(path, sizeof path, "model.config.%s", keys[i]);
        if (n && pl_get_bool(L, n, path, &b))
            bad = 1;
        else if (n)
            *(i == 8 ? &cfg->bias : &cfg->tied_head) = b;
    }
    if (!v[4] && cfg->n_heads > 0 && cfg->d_model % cfg->n_heads != 0) {
        pl_diag_at(&L->d, c, "model.config: d_model (%d) must be a multiple of n_heads (%d), or give d_head",
                   cfg->d_model, cfg->n_heads);
        bad = 1;
    }
    pr_error e = { 0 };
    if (!bad && pr_config_validate(cfg, &e)) {
        pl_diag_at(&L->d, c, "model.config: %s", e.msg);
        bad = 1;
    }
    L->p->have_cfg = !bad;
}

void pl_load_model(loader *L, const ynode *m)
{
    static const char *const keys[] = { "path", "preset", "config", "seed", "tokenizer" };
    pr_pipeline *p = L->p;
    if (pl_want_map(L, m, "model"))
        return;
    snprintf(p->model_where, sizeof p->model_where, "%s:%d:%d", m->src, m->line, m->col);
    pl_check_keys(L, m, "model", keys, 5);
    const ynode *path = pl_map_get(m, "path"), *preset = pl_map_get(m, "preset"), *config = pl_map_get(m, "config");
    int given = !!path + !!preset + !!config;
    if (given != 1) {
        const ynode *at = given ? (path ? path : preset) : m;
        if (given > 1) {
            int i = pl_map_find(m, config ? "config" : "preset");
            at = m->keys[i];
        }
        pl_diag_at(&L->d, at, "model: give exactly one of path, preset or config (%s)",
                   given ? "found more than one" : "found none");
        return;
    }
    long long seed = -1;
    const ynode *sn = pl_map_get(m, "seed");
    if (sn && pl_get_int(L, sn, "model.seed", 0, LLONG_MAX, &seed))
        seed = -1;
    const ynode *tn = pl_map_get(m, "tokenizer");
    const char *tok;
    if (tn && !pl_is_null(tn) && !pl_get_string(L, tn, "model.tokenizer", &tok)) {
        p->tok_dir = pl_resolve_path(L, tn, tok);
        if (p->tok_dir)
            pl_check_exists(L, tn, "model.tokenizer", p->tok_dir, 1);
    }
    if (path) {
        p->source = PR_PIPELINE_MODEL_PATH;
        const char *s;
        if (pl_get_string(L, path, "model.path", &s))
            return;
        if (sn)
            pl_diag_at(&L->d, m->keys[pl_map_find(m, "seed")], "model.seed: applies to preset and config models only");
        p->model_name = pl_resolve_path(L, path, s);
        if (!p->model_name)
            return;
        if (!p->tok_dir)
            p->tok_dir = p->model_name;
        pr_error e = { 0 };
        if (pr_model_load_hf(p->model_name, &p->loaded, &e)) {
            pl_diag_at(&L->d, path, "model.path: %s", e.msg);
            return;
        }
        p->cfg = *pr_model_get_config(p->loaded);
        p->have_cfg = 1;
        L->shape = p->loaded;
        return;
    }
    if (preset) {
        p->source = PR_PIPELINE_MODEL_PRESET;
        if (pl_want_scalar(L, preset, "model.preset", "a preset name"))
            return;
        if (pr_config_preset(preset->text, &p->cfg) != PR_OK) {
            char h[128], known[256];
            pl_hint(h, sizeof h, preset->text, preset_names, N_PRESETS);
            snprintf(known, sizeof known, " (known: %s)", pr_config_preset_names());
            pl_diag_at(&L->d, preset, "model.preset: unknown preset '%s'%s", preset->text, h[0] ? h : known);
            return;
        }
        p->model_name = pl_keep(p, preset->text);
        p->have_cfg = 1;
    } else {
        p->source = PR_PIPELINE_MODEL_CONFIG;
        load_model_config(L, config);
    }
    if (p->have_cfg && seed >= 0)
        p->cfg.seed = (uint64_t)seed;
    if (p->have_cfg) {
        pr_error e = { 0 };
        if (model_create_empty(&p->cfg, &L->shape, &e) == PR_OK)
            L->shape_owned = 1;
        else
            L->oom = 1;
    }
}

/* ---- train and task ------------------------------------------------------------------------------ */

void pl_load_train(loader *L, const ynode *t)
{
    static const char *const keys[] = { "steps", "batch", "seq_len", "accum", "lr", "min_lr_ratio", "schedule",
                                        "warmup", "weight_decay", "decay_all", "clip", "beta1", "beta2", "eps",
                                        "head_lr_mult", "seed", "eval_every", "eval_batches", "log_every",
                                        "checkpoint_every", "output", "resume", "resume_changed", "progress",
                                        "keep_best", "early_stop", "precision", "recompute" };
    static const char *const metrics[] = { "val_loss", "val_accuracy" };
    static const char *const schedules[] = { "cosine", "linear", "constant" };
    static const char *const progress_modes[] = { "auto", "bar", "plain", "none" };
    pr_train_config *c = &L->p->tc;
    if (!t || pl_is_null(t) || pl_want_map(L, t, "train"))
        return;
    pl_check_keys(L, t, "train", keys, (int)(sizeof keys / sizeof keys[0]));
    const ynode *n;
    long long v;
    double f;
    int b;
    const int big = 1 << 30;
#define INT_KEY(key, field, lo) \
    if ((n = pl_map_get(t, key)) && !pl_get_int(L, n, "train." key, lo, big, &v)) \
        c->field = (int)v;
#define FLT_KEY(key, field, lo, lo_open, hi, hi_open) \
    if ((n = pl_map_get(t, key)) && !pl_get_float(L, n, "train." key, lo, lo_open, hi, hi_open, &f)) \
        c->field = (float)f;
    INT_KEY("steps", steps, 0)
    INT_KEY("batch", batch, 1)
    INT_KEY("seq_len", seq_len, 1)
    INT_KEY("accum", accum, 1)
    FLT_KEY("lr", lr, 0, 0, 10, 0)
    FLT_KEY("min_lr_ratio", min_lr_ratio, 0, 0, 1, 0)
    INT_KEY("warmup", warmup, 0)
    FLT_KEY("weight_decay", weight_decay, 0, 0, 10, 0)
    FLT_KEY("clip", clip, 0, 0, INFINITY, 0)
    FLT_KEY("beta1", beta1, 0, 0, 1, 1)
    FLT_KEY("beta2", beta2, 0, 0, 1, 1)
    FLT_KEY("eps", eps, 0, 1, 1, 0)
    FLT_KEY("head_lr_mult", head_lr_mult, 0, 0, 1e6, 0)
    INT_KEY("eval_every", eval_every, 0)
    INT_KEY("eval_batches", eval_batches, 0)
    INT_KEY("log_every", log_every, 0)
    INT_KEY("checkpoint_every", ckpt_every, 0)
#undef INT_KEY
#undef FLT_KEY
    if ((n = pl_map_get(t, "seed")) && !pl_get_int(L, n, "train.seed", 0, LLONG_MAX, &v))
        c->seed = (uint64_t)v;
    if ((n = pl_map_get(t, "schedule")))
        pl_get_choice(L, n, "train.schedule", schedules, 3, &c->schedule);
    if ((n = pl_map_get(t, "decay_all")) && !pl_get_bool(L, n, "train.decay_all", &b))
        c->decay_all = b;
    if ((n = pl_map_get(t, "resume")) && !pl_get_bool(L, n, "train.resume", &b))
        c->resume = b;
    if ((n = pl_map_get(t, "resume_changed")) && !pl_get_bool(L, n, "train.resume_changed", &b))
        c->resume_changed = b;
    if ((n = pl_map_get(t, "recompute")) && !pl_get_bool(L, n, "train.recompute", &b))
        c->recompute = b;
    const char *mode;
    if ((n = pl_map_get(t, "progress")) && !pl_get_choice(L, n, "train.progress", progress_modes, 4, &mode))
        c->progress = pr_progress_parse(mode);
    static const char *const precisions[] = { "f32", "bf16" };
    const char *prec;
    if ((n = pl_map_get(t, "precision")) && !pl_get_choice(L, n, "train.precision", precisions, 2, &prec)) {
        pr_error pe = { 0 };
        c->precision = pr_precision_parse(prec);
        if (pr_precision_available(c->precision, &pe))
            pl_diag_at(&L->d, n, "train.precision: %s", pe.msg);
    }
    if ((n = pl_map_get(t, "keep_best")) && !pl_is_null(n))
        pl_get_choice(L, n, "train.keep_best", metrics, 2, &c->keep_best);
    if ((n = pl_map_get(t, "early_stop")) && !pl_is_null(n) && !pl_want_map(L, n, "train.early_stop")) {
        static const char *const es_keys[] = { "patience", "min_delta", "metric" };
        pl_check_keys(L, n, "train.early_stop", es_keys, 3);
        const ynode *e;
        if (!(e = pl_map_get(n, "patience")))
            pl_diag_at(&L->d, n, "train.early_stop: missing required key 'patience' (evaluations without "
                       "improvement before stopping)");
        else if (!pl_get_int(L, e, "train.early_stop.patience", 1, big, &v))
            c->early_stop_patience = (int)v;
        if ((e = pl_map_get(n, "min_delta")) &&
            !pl_get_float(L, e, "train.early_stop.min_delta", 0, 0, INFINITY, 0, &f))
            c->early_stop_min_delta = f;
        if ((e = pl_map_get(n, "metric")))
            pl_get_choice(L, e, "train.early_stop.metric", metrics, 2, &c->early_stop_metric);
    }
    const char *s;
    if ((n = pl_map_get(t, "output")) && !pl_get_string(L, n, "train.output", &s))
        c->out_dir = pl_resolve_path(L, n, s);
    if ((n = pl_map_get(t, "seq_len")) && L->p->have_cfg && c->seq_len > L->p->cfg.max_seq)
        pl_diag_at(&L->d, n, "train.seq_len: %d exceeds the model's %d positions (max_seq)", c->seq_len,
                   L->p->cfg.max_seq);
}

void pl_load_task(loader *L, const ynode *t)
{
    static const char *const keys[] = { "type", "train", "validation", "val_fraction", "format", "head" };
    static const char *const types[] = { "lm", "classification" }, *const formats[] = { "auto", "text", "jsonl" };
    pr_train_config *c = &L->p->tc;
    if (pl_want_map(L, t, "task"))
        return;
    pl_check_keys(L, t, "task", keys, 6);
    const ynode *n;
    if ((n = pl_map_get(t, "type")))
        pl_get_choice(L, n, "task.type", types, 2, &c->task);
    if ((n = pl_map_get(t, "format")))
        pl_get_choice(L, n, "task.format", formats, 3, &c->format);
    double f;
    if ((n = pl_map_get(t, "val_fraction")) && !pl_get_float(L, n, "task.val_fraction", 0, 1, 1, 1, &f))
        c->val_fraction = f;
    const char *s;
    if (!(n = pl_map_get(t, "train")))
        pl_diag_at(&L->d, t, "task: missing required key 'train' (the training data file)");
    else if (!pl_get_string(L, n, "task.train", &s) && (c->train_path = pl_resolve_path(L, n, s)))
        pl_check_exists(L, n, "task.train", c->train_path, 0);
    if ((n = pl_map_get(t, "validation")) && !pl_is_null(n) && !pl_get_string(L, n, "task.validation", &s) &&
        (c->val_path = pl_resolve_path(L, n, s)))
        pl_check_exists(L, n, "task.validation", c->val_path, 0);
    /* a run's trained head (modules/head.safetensors), read now to check it */
    pr_error e = {0};
    if ((n = pl_map_get(t, "head")) && !pl_is_null(n) && !pl_get_string(L, n, "task.head", &s) &&
        (L->p->head_path = pl_resolve_path(L, n, s)) &&
        pr_head_load(L->p->head_path, L->p->have_cfg ? L->p->cfg.d_model : 0, &L->p->head, &e) != PR_OK)
        pl_diag_at(&L->d, n, "task.head: %s", e.msg);
}

/* val_accuracy is a classification metric: train.keep_best and
 * train.early_stop.metric may name it only for that task. */
void pl_check_metrics(loader *L, const ynode *root)
{
    const pr_train_config *c = &L->p->tc;
    if (c->task && strcmp(c->task, "classification") == 0)
        return;
    const ynode *t = pl_map_get(root, "train"), *es = pl_map_get(t, "early_stop");
    const ynode *at[] = { pl_map_get(t, "keep_best"), pl_map_get(es, "metric") };
    const char *val[] = { c->keep_best, c->early_stop_metric };
    const char *path[] = { "train.keep_best", "train.early_stop.metric" };
    for (int i = 0; i < 2; i++)
        if (at[i] && val[i] && strcmp(val[i], "val_accuracy") == 0)
            pl_diag_at(&L->d, at[i], "%s: val_accuracy needs task.type classification (a language-model run has "
                       "val_loss only)", path[i]);
}
