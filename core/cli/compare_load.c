/* peftref compare: loading the arms (every pipeline given, or the arms of
 * one pipeline's compare section), checking that they share model, data,
 * seed and budget, and the directories they train in.  See compare.h. */
#include "config.h"

#include <errno.h>
#include <ftw.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>

#include "cli.h"
#include "compare.h"

/* ---- loading ------------------------------------------------------------------------------------------ */

/* Diagnostics of a pipeline that does not load: printed as they come, and
 * the first few kept for the table. */

void compare_collect(void *arg, const char *line)
{
    compare_diags *s = arg;
    if (!s->quiet)
        fprintf(stderr, "%s\n", line);
    if (s->n < 3) {
        size_t o = strlen(s->text);
        snprintf(s->text + o, sizeof s->text - o, "%s%s", o ? "; " : "", line);
    }
    s->n++;
}

void compare_sink_finish(compare_diags *s, const pr_error *err)
{
    if (s->n > 3) {
        size_t o = strlen(s->text);
        snprintf(s->text + o, sizeof s->text - o, "; (%d more)", s->n - 3);
    }
    if (!s->text[0])
        snprintf(s->text, sizeof s->text, "%s", err->msg[0] ? err->msg : "the pipeline does not load");
}

/* The file name without directory and extension. */
static void stem_of(const char *path, char *buf, size_t len)
{
    const char *b = strrchr(path, '/');
    snprintf(buf, len, "%s", b ? b + 1 : path);
    char *dot = strrchr(buf, '.');
    if (dot && dot != buf)
        *dot = '\0';
}

/* "lora+bitfit", or "none". */
void compare_technique_list(const pr_pipeline *p, char *buf, size_t len)
{
    size_t o = 0;
    buf[0] = '\0';
    for (int i = 0; i < pr_pipeline_n_modules(p); i++) {
        pr_module_spec s;
        if (pr_pipeline_module_spec(p, i, &s) || !s.technique)
            continue;
        int w = snprintf(buf + o, len - o, "%s%s", o ? "+" : "", s.technique->name);
        if (w < 0 || (size_t)w >= len - o)
            break;
        o += (size_t)w;
    }
    if (!buf[0])
        snprintf(buf, len, "none");
}

static int str_differs(const char *a, const char *b)
{
    return (a == NULL) != (b == NULL) || (a && strcmp(a, b) != 0);
}

/* Every arm must train the same base model on the same data with the same
 * seed and budget.  Returns 0, or 1 with what differs in why. */
int compare_budget_differs(const pr_pipeline *ref, const pr_pipeline *p, char *why, size_t len)
{
    const pr_model_config *a = pr_pipeline_model_config(ref), *b = pr_pipeline_model_config(p);
    pr_train_config x, y;
    pr_pipeline_train_config(ref, &x);
    pr_pipeline_train_config(p, &y);
#define DIFF_INT(what, u, v)                                                                                   \
    if ((u) != (v)) {                                                                                          \
        snprintf(why, len, "%s is %lld here but %lld in %s", what, (long long)(v), (long long)(u),               \
                 pr_pipeline_path(ref));                                                                       \
        return 1;                                                                                              \
    }
#define DIFF_STR(what, u, v)                                                                                   \
    if (str_differs(u, v)) {                                                                                   \
        snprintf(why, len, "%s is '%s' here but '%s' in %s", what, (v) ? (v) : "(none)", (u) ? (u) : "(none)",  \
                 pr_pipeline_path(ref));                                                                       \
        return 1;                                                                                              \
    }
    DIFF_INT("the model source", pr_pipeline_model_source(ref), pr_pipeline_model_source(p))
    DIFF_STR("model", pr_pipeline_model_name(ref), pr_pipeline_model_name(p))
    DIFF_STR("model.tokenizer", pr_pipeline_tokenizer_dir(ref), pr_pipeline_tokenizer_dir(p))
    DIFF_INT("model n_layers", a->n_layers, b->n_layers)
    DIFF_INT("model d_model", a->d_model, b->d_model)
    DIFF_INT("model n_heads", a->n_heads, b->n_heads)
    DIFF_INT("model n_kv_heads", a->n_kv_heads, b->n_kv_heads)
    DIFF_INT("model d_head", a->d_head, b->d_head)
    DIFF_INT("model d_ff", a->d_ff, b->d_ff)
    DIFF_INT("model vocab", a->vocab_size, b->vocab_size)
    DIFF_INT("model max_seq", a->max_seq, b->max_seq)
    DIFF_INT("model bias", a->bias, b->bias)
    DIFF_INT("model tied_head", a->tied_head, b->tied_head)
    DIFF_INT("model.seed", (long long)a->seed, (long long)b->seed)
    DIFF_STR("task.type", x.task, y.task)
    DIFF_STR("task.train", x.train_path, y.train_path)
    DIFF_STR("task.validation", x.val_path, y.val_path)
    DIFF_STR("task.format", x.format, y.format)
    if (x.val_fraction != y.val_fraction) {
        snprintf(why, len, "task.val_fraction is %g here but %g in %s", y.val_fraction, x.val_fraction,
                 pr_pipeline_path(ref));
        return 1;
    }
    DIFF_INT("train.steps", x.steps, y.steps)
    DIFF_INT("train.batch", x.batch, y.batch)
    DIFF_INT("train.seq_len", x.seq_len, y.seq_len)
    DIFF_INT("train.accum", x.accum, y.accum)
    DIFF_INT("train.seed", (long long)x.seed, (long long)y.seed)
    DIFF_INT("train.eval_every", x.eval_every, y.eval_every)
    DIFF_INT("train.eval_batches", x.eval_batches, y.eval_batches)
#undef DIFF_INT
#undef DIFF_STR
    return 0;
}

/* ---- directories ------------------------------------------------------------------------------------------------- */

int compare_make_dirs(const char *dir)
{
    char buf[4096];
    snprintf(buf, sizeof buf, "%s", dir);
    for (char *s = buf + 1; *s; s++)
        if (*s == '/') {
            *s = '\0';
            if (mkdir(buf, 0777) != 0 && errno != EEXIST)
                return -1;
            *s = '/';
        }
    return mkdir(buf, 0777) != 0 && errno != EEXIST ? -1 : 0;
}

static int remove_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st;
    (void)flag;
    (void)ftw;
    remove(path);
    return 0;
}

void compare_remove_tree(const char *dir)
{
    nftw(dir, remove_entry, 16, FTW_DEPTH | FTW_PHYS);
}



static compare_arm *new_arm(compare_list *R, const char *name, const char *path)
{
    if (R->n_arms == R->cap_arms) {
        int cap = R->cap_arms ? 2 * R->cap_arms : 8;
        compare_arm *a = realloc(R->arms, (size_t)cap * sizeof *a);
        if (!a)
            return NULL;
        R->arms = a;
        compare_row *r = realloc(R->rows, (size_t)cap * sizeof *r);
        if (!r)
            return NULL;
        R->rows = r;
        R->cap_arms = cap;
    }
    compare_arm *a = &R->arms[R->n_arms];
    compare_row *r = &R->rows[R->n_arms];
    memset(a, 0, sizeof *a);
    memset(r, 0, sizeof *r);
    r->val_loss = r->initial_val_loss = NAN;
    r->val_accuracy = -1;
    snprintf(r->name, sizeof r->name, "%s", name);
    snprintf(r->techniques, sizeof r->techniques, "-");
    a->path = path;
    a->arm_index = -1;
    R->n_arms++;
    return a;
}

/* Load every arm (rows stay in order; arms[i].row is set at the end, once
 * the arrays stop moving). */
/* A technique offered by two files is named once, whichever arms use it. */
void compare_warn_shadowed(const compare_list *R, const pr_registry *reg)
{
    for (int t = 0; t < pr_registry_count(reg); t++) {
        const pr_technique *tech = pr_registry_technique(reg, t);
        int used = 0;
        for (int i = 0; i < R->n_arms && !used; i++)
            for (int k = 0; R->arms[i].pipe && k < pr_pipeline_n_modules(R->arms[i].pipe) && !used; k++) {
                pr_module_spec spec;
                used = pr_pipeline_module_spec(R->arms[i].pipe, k, &spec) == PR_OK && spec.technique == tech;
            }
        if (used)
            cli_warn_shadowed("compare", reg, tech->name);
    }
}

int compare_load_arms(compare_list *R, char **files, int n_files, const char *const *sets, int n_sets, const pr_registry *reg,
                     int quiet)
{
    if (!new_arm(R, "base (untrained)", NULL))
        return -1;
    for (int f = 0; f < n_files; f++) {
        char stem[128];
        stem_of(files[f], stem, sizeof stem);
        compare_diags sink = { .quiet = quiet };
        pr_error err = { 0 };
        pr_pipeline *base = NULL;
        if (pr_pipeline_load_arm(files[f], PR_PIPELINE_BASE, sets, n_sets, reg, &base, compare_collect, &sink, &err)) {
            if (n_files == 1) {
                if (!sink.n)
                    fprintf(stderr, "peftref compare: %s\n", err.msg);
                return 1;   /* nothing to compare */
            }
            compare_sink_finish(&sink, &err);
            compare_arm *a = new_arm(R, stem, files[f]);
            if (!a)
                return -1;
            snprintf(R->rows[R->n_arms - 1].error, sizeof R->rows[0].error, "%s", sink.text);
            continue;
        }
        int n = pr_pipeline_n_arms(base);
        if (n == 0) {
            compare_arm *a = new_arm(R, stem, files[f]);
            if (!a)
                return -1;
            a->pipe = base;
            continue;
        }
        for (int i = 0; i < n; i++) {
            char name[256];
            if (n_files > 1)
                snprintf(name, sizeof name, "%s:%s", stem, pr_pipeline_arm_name(base, i));
            else
                snprintf(name, sizeof name, "%s", pr_pipeline_arm_name(base, i));
            compare_arm *a = new_arm(R, name, files[f]);
            if (!a)
                return -1;
            compare_diags s2 = { .quiet = quiet };
            pr_error e2 = { 0 };
            a->arm_index = i;
            if (pr_pipeline_load_arm(files[f], i, sets, n_sets, reg, &a->pipe, compare_collect, &s2, &e2)) {
                compare_sink_finish(&s2, &e2);
                snprintf(R->rows[R->n_arms - 1].error, sizeof R->rows[0].error, "%s", s2.text);
            }
        }
        pr_pipeline_free(base);
    }
    return 0;
}

