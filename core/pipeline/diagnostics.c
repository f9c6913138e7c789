/* peftref pipelines: the problems a load finds, and the names it suggests.
 *
 * A diagnostic is "FILE:LINE:COL: message" (or "FILE: message"); they are
 * collected, not printed, and reported sorted: the file's first, in file
 * order, then the overrides', then those without a location.  Suggestions
 * map names users bring from other trainers to this schema's keys, or pick
 * the closest name by edit distance. */
#include "config.h"

#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "names.h"
#include "pipeline_internal.h"

/* ---- diagnostics --------------------------------------------------------------- */

static void diag_vadd(diags *d, const char *src, int rank, int line, int col, const char *fmt, va_list ap)
{
    char msg[900], text[1100];
    vsnprintf(msg, sizeof msg, fmt, ap);
    if (line > 0)
        snprintf(text, sizeof text, "%s:%d:%d: %s", src, line, col, msg);
    else
        snprintf(text, sizeof text, "%s: %s", src, msg);
    if (d->n == d->cap) {
        int cap = d->cap ? 2 * d->cap : 16;
        diag *v = realloc(d->v, (size_t)cap * sizeof *v);
        if (!v) {
            d->oom = 1;
            return;
        }
        d->v = v;
        d->cap = cap;
    }
    char *s = strdup(text);
    if (!s) {
        d->oom = 1;
        return;
    }
    d->v[d->n] = (diag){ .rank = rank, .line = line, .col = col, .seq = d->n, .text = s };
    d->n++;
}

const char pl_set_src[] = "--set";

__attribute__((format(printf, 3, 4))) void pl_diag_at(diags *d, const ynode *at, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    diag_vadd(d, at->src, at->src == pl_set_src ? 1 : 0, at->line, at->col, fmt, ap);
    va_end(ap);
}

/* At an explicit location (col may point inside a scalar). */
__attribute__((format(printf, 5, 6))) void pl_diag_loc(diags *d, const char *src, int line, int col,
                                                       const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    diag_vadd(d, src, src == pl_set_src ? 1 : 0, line, col, fmt, ap);
    va_end(ap);
}

static int diag_cmp(const void *a, const void *b)
{
    const diag *x = a, *y = b;
    if (x->rank != y->rank)
        return x->rank - y->rank;
    if (x->line != y->line)
        return x->line - y->line;
    if (x->col != y->col)
        return x->col - y->col;
    return x->seq - y->seq;
}

void pl_diags_free(diags *d)
{
    for (int i = 0; i < d->n; i++)
        free(d->v[i].text);
    free(d->v);
    memset(d, 0, sizeof *d);
}

void pl_report_all(diags *d, pr_pipeline_report_fn report, void *arg, pr_error *err)
{
    qsort(d->v, (size_t)d->n, sizeof *d->v, diag_cmp);
    if (report)
        for (int i = 0; i < d->n; i++)
            report(arg, d->v[i].text);
    if (!err)
        return;
    err->code = PR_ERR_INVALID;
    size_t off = 0, cap = sizeof err->msg;
    err->msg[0] = '\0';
    for (int i = 0; i < d->n; i++) {
        size_t len = strlen(d->v[i].text);
        size_t reserve = i + 1 < d->n ? 48 : 0;   /* room for the "more" line */
        if (off + (off ? 1 : 0) + len + reserve >= cap) {
            snprintf(err->msg + off, cap - off, "%s(%d more error%s)", off ? "\n" : "", d->n - i,
                     d->n - i == 1 ? "" : "s");
            return;
        }
        off += (size_t)snprintf(err->msg + off, cap - off, "%s%s", off ? "\n" : "", d->v[i].text);
    }
}

/* ---- suggestions ------------------------------------------------------------------ */

/* Names users bring from Hugging Face transformers/PEFT and other
 * trainers, mapped to this schema's keys (hints only). */
static const struct { const char *from, *to; } synonyms[] = {
    { "learning_rate", "lr" }, { "max_steps", "steps" }, { "num_steps", "steps" },
    { "train_steps", "steps" }, { "batch_size", "batch" }, { "per_device_train_batch_size", "batch" },
    { "gradient_accumulation_steps", "accum" }, { "warmup_steps", "warmup" },
    { "lr_scheduler_type", "schedule" }, { "scheduler", "schedule" }, { "max_grad_norm", "clip" },
    { "grad_clip", "clip" }, { "output_dir", "output" }, { "out", "output" }, { "eval_steps", "eval_every" },
    { "logging_steps", "log_every" }, { "save_steps", "checkpoint_every" }, { "ckpt_every", "checkpoint_every" },
    { "seq_length", "seq_len" }, { "max_seq_length", "seq_len" }, { "block_size", "seq_len" },
    { "context_length", "seq_len" }, { "model_name_or_path", "path" }, { "dir", "path" },
    { "target_modules", "sites" }, { "layers_to_transform", "layers" }, { "rank", "r" }, { "peft_type", "technique" }, { "method", "technique" },
    { "type", "technique" }, { "val", "validation" }, { "valid", "validation" }, { "eval", "validation" },
    { "data", "train" }, { "task_type", "type" }, { "n_layer", "n_layers" }, { "n_embd", "d_model" },
    { "n_head", "n_heads" }, { "n_inner", "d_ff" }, { "vocab_size", "vocab" }, { "n_positions", "max_seq" },
    { "n_ctx", "max_seq" },
};

/* The closest of names[0..n) to s, or NULL when none is close. */
static const char *suggest(const char *s, const char *const *names, int n)
{
    for (size_t i = 0; i < sizeof synonyms / sizeof synonyms[0]; i++)
        if (strcasecmp(s, synonyms[i].from) == 0)
            for (int j = 0; j < n; j++)
                if (strcmp(names[j], synonyms[i].to) == 0)
                    return names[j];
    size_t len = strlen(s);
    int limit = len <= 3 ? 1 : len <= 6 ? 2 : 3, best_d = INT_MAX;
    const char *best = NULL;
    for (int j = 0; j < n; j++) {
        int d = names_edit_distance(s, names[j]);
        if (d < best_d) {
            best_d = d;
            best = names[j];
        }
    }
    return best_d <= limit ? best : NULL;
}

/* " (did you mean 'x'?)" or "". */
void pl_hint(char *buf, size_t len, const char *s, const char *const *names, int n)
{
    const char *h = suggest(s, names, n);
    if (h)
        snprintf(buf, len, " (did you mean '%s'?)", h);
    else
        buf[0] = '\0';
}
