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
                                            "gpt2-xl" };
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
    int bad = 0;
    long long v[8] = { 0 };
    for (int i = 0; i < 8; i++) {
        const ynode *n = pl_map_get(c, keys[i]);
        char path[64];
        snprintf(path, sizeof path, "model.config.%s", keys[i]);
        if (n && pl_get_int(L, n, path, 1, 1 << 20, &v[i]))
            bad = 1;
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
            char h[128];
            pl_hint(h, sizeof h, preset->text, preset_names, N_PRESETS);
            pl_diag_at(&L->d, preset, "model.preset: unknown preset '%s'%s", preset->text,
                       h[0] ? h : " (known: gpt2-tiny, gpt2-small, gpt2-medium, gpt2-large, gpt2-xl)");
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
                                        "checkpoint_every", "output", "resume", "progress" };
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
    const char *mode;
    if ((n = pl_map_get(t, "progress")) && !pl_get_choice(L, n, "train.progress", progress_modes, 4, &mode))
        c->progress = pr_progress_parse(mode);
    const char *s;
    if ((n = pl_map_get(t, "output")) && !pl_get_string(L, n, "train.output", &s))
        c->out_dir = pl_resolve_path(L, n, s);
    if ((n = pl_map_get(t, "seq_len")) && L->p->have_cfg && c->seq_len > L->p->cfg.max_seq)
        pl_diag_at(&L->d, n, "train.seq_len: %d exceeds the model's %d positions (max_seq)", c->seq_len,
                   L->p->cfg.max_seq);
}

void pl_load_task(loader *L, const ynode *t)
{
    static const char *const keys[] = { "type", "train", "validation", "val_fraction", "format" };
    static const char *const types[] = { "lm", "classification" }, *const formats[] = { "auto", "text", "jsonl" };
    pr_train_config *c = &L->p->tc;
    if (pl_want_map(L, t, "task"))
        return;
    pl_check_keys(L, t, "task", keys, 5);
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
}

/* ---- modules ----------------------------------------------------------------------------------- */

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

static void load_site_options(loader *L, const ynode *n, const char *path, pipe_module *pm)
{
    if (pl_want_map(L, n, path))
        return;
    uint32_t used = pm->sites ? pm->sites : pm->t->default_sites;
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

int pl_name_ok(const char *s)
{
    if (!*s)
        return 0;
    for (; *s; s++)
        if (*s == '/' || (unsigned char)*s <= 0x20)
            return 0;
    return 1;
}

/* A saved module file named at n: resolved, readable, opened (its
 * technique found, its metadata parsed).  NULL after a diagnostic. */
static pr_module_file *open_saved(loader *L, const ynode *n, const char *path)
{
    const char *s;
    if (pl_get_string(L, n, path, &s))
        return NULL;
    const char *file = pl_resolve_path(L, n, s);
    if (!file)
        return NULL;
    int before = L->d.n;
    pl_check_exists(L, n, path, file, 0);
    if (L->d.n > before)
        return NULL;
    pr_module_file *f = NULL;
    pr_error e = { 0 };
    if (pr_module_file_open(file, L->reg, &f, &e)) {
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
    static const char *const load_keys[] = { "load", "mode", "name", "seed", "force" };
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
        int ok = 0;
        for (int j = 0; j < 5 && !ok; j++)
            ok = !strcmp(k, known[j]);
        if (ok)
            continue;
        if (!strcmp(k, "technique") || !strcmp(k, "sites") || !strcmp(k, "layers") || !strcmp(k, "options") ||
            !strcmp(k, "site_options") || !strcmp(k, "trainable"))
            pl_diag_at(&L->d, m->keys[i], "%s.%s: a saved module brings its own technique, sites, layers and options; "
                       "say how to use it with mode (frozen, continue or new)", path, k);
        else {
            char h[128];
            pl_hint(h, sizeof h, k, known, 5);
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
    if (!avg) {
        n = pl_map_get(m, "load");
        pr_module_file *f = open_saved(L, n, (snprintf(kp, sizeof kp, "%s.load", path), kp));
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
                pr_module_file *f = open_saved(L, n->vals[i], ip);
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

/* `fuse: [FILE, ...]`: saved modules attached frozen and combined by an
 * AdapterFusion module, the entry's module (docs/pipeline.md,
 * "Composition"); load: starts the fusion from saved fusion weights. */
int pl_load_fuse(loader *L, const ynode *m, const char *path, pipe_module *pm, const ynode **name_node)
{
    static const char *const keys[] = { "fuse", "name", "seed", "trainable", "force", "load" };
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
        if (!pl_get_string(L, n, kp, &s) && (pm->fusion_load = pl_resolve_path(L, n, s)))
            pl_check_exists(L, n, kp, pm->fusion_load, 0);
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
        pr_module_file *f = open_saved(L, n->vals[i], ip);
        if (f)
            push_file(L, pm, f);
    }
    if (L->d.n > errors_before || pm->n_files != n->n)
        return -1;
    /* the fusion attaches where the fused modules do */
    pr_module_spec spec;
    pr_module_file_spec(pm->files[0], &spec);
    pm->t = pr_fusion_technique();
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

/* The plan of a fuse entry: the fusion's parameters plus every fused
 * module's (frozen); the files must be additive modules sharing their
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
        if (pr_fusion_plan_for(&p->cfg, &ks, pm->trainable, &fp, &e) || pr_module_plan_for(&p->cfg, &ks, &kp, &e)) {
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
                pl_diag_at(&L->d, at, "%s and %s attach at different sites or layers; fused modules must share them",
                           pr_module_file_path(pm->files[0]), pr_module_file_path(pm->files[k]));
                return;
            }
        }
        kid_params += kp.params;
    }
    pm->plan.params += kid_params;
    pm->planned = 1;
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
