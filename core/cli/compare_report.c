/* peftref compare: rendering the comparison table (text, Markdown, CSV,
 * JSON) and the validation-loss curves (SVG).  See compare.h. */
#include "config.h"

#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "compare.h"

/* ---- cells ------------------------------------------------------------------------------------------ */

enum {
    C_ARM, C_TECH, C_TRAINABLE, C_PCT, C_PEAK, C_MS, C_TPS, C_POS, C_FLOPS, C_FLOPS_MERGED, C_LOSS, C_METRIC,
    C_STATUS, N_COLS
};

int compare_format_parse(const char *s)
{
    if (!s)
        return -1;
    if (!strcmp(s, "text"))
        return COMPARE_TEXT;
    if (!strcmp(s, "markdown") || !strcmp(s, "md"))
        return COMPARE_MARKDOWN;
    if (!strcmp(s, "csv"))
        return COMPARE_CSV;
    if (!strcmp(s, "json"))
        return COMPARE_JSON;
    return -1;
}

static int is_cls(const compare_table *t)
{
    return t->task && !strcmp(t->task, "classification");
}

static const char *col_title(const compare_table *t, int c)
{
    static const char *const titles[N_COLS] = { "arm", "techniques", "trainable", "trainable%", "peak MiB",
                                                "ms/step", "tokens/s", "+positions", "+FLOP/tok",
                                                "+FLOP/tok (merged)", "val loss", "val ppl", "status" };
    if (c == C_METRIC && is_cls(t))
        return "val acc";
    return titles[c];
}

static const char *csv_title(const compare_table *t, int c)
{
    static const char *const titles[N_COLS] = {
        "arm", "techniques", "trainable_params", "trainable_percent", "peak_memory_mib", "ms_per_step",
        "tokens_per_second", "extra_positions", "extra_flops_per_token", "extra_flops_per_token_merged", "val_loss",
        "val_perplexity", "status"
    };
    if (c == C_METRIC && is_cls(t))
        return "val_accuracy";
    return titles[c];
}

/* 1234567 -> "1,234,567" */
static void grouped(int64_t v, char *buf, size_t len)
{
    char d[32];
    snprintf(d, sizeof d, "%lld", (long long)(v < 0 ? -v : v));
    size_t n = strlen(d), o = 0;
    if (v < 0 && o + 1 < len)
        buf[o++] = '-';
    for (size_t i = 0; i < n && o + 2 < len; i++) {
        if (i > 0 && (n - i) % 3 == 0)
            buf[o++] = ',';
        buf[o++] = d[i];
    }
    buf[o] = '\0';
}

static int64_t row_trainable(const compare_row *r, int *known)
{
    *known = r->have_result || r->have_plan || r->is_base;
    return r->have_result ? r->trainable : r->have_plan ? r->trainable_plan : 0;
}

/* The text table's columns without --wide: within 100 columns. */
static const int narrow_cols[] = { C_ARM, C_TRAINABLE, C_PCT, C_PEAK, C_TPS, C_FLOPS, C_LOSS, C_METRIC };
#define N_NARROW ((int)(sizeof narrow_cols / sizeof narrow_cols[0]))

/* Spread over seeds: shown when the row was trained with more than one. */
static int spread(const compare_row *r, const compare_stat *s)
{
    return r->seeds > 1 && s->n > 0;
}

/* 181234 -> "181k", 1234567 -> "1.2M" (narrow cells). */
static void compact(double v, char *buf, size_t len)
{
    double a = fabs(v);
    if (a >= 1e9)
        snprintf(buf, len, "%.3gG", v / 1e9);
    else if (a >= 1e6)
        snprintf(buf, len, "%.3gM", v / 1e6);
    else if (a >= 1e5)
        snprintf(buf, len, "%.3gk", v / 1e3);
    else
        grouped((int64_t)llround(v), buf, len);
}

/* mean ± sd in f (narrow: no spaces; raw: the mean alone). */
static void with_sd(char *buf, size_t len, const compare_stat *s, const char *f, int raw, int narrow, int compact_n)
{
    char m[48], d[48];
    if (compact_n == 1) {
        compact(s->mean, m, sizeof m);
        compact(s->sd, d, sizeof d);
    } else if (compact_n == 2) {
        grouped((int64_t)llround(s->mean), m, sizeof m);
        grouped((int64_t)llround(s->sd), d, sizeof d);
    } else {
        snprintf(m, sizeof m, f, s->mean);
        snprintf(d, sizeof d, f, s->sd);
    }
    if (raw)
        snprintf(buf, len, "%s", m);
    else
        snprintf(buf, len, "%s%s%s", m, narrow ? "±" : " ± ", d);
}

/* The text of cell (r, c): human (thousands separators, units) or raw for
 * CSV.  Unknown values are "-" (human) or "" (raw). */
static void cell(const compare_table *t, const compare_row *r, int c, int raw, char *buf, size_t len)
{
    const char *none = raw ? "" : "-";
    int narrow = !raw && !t->wide;
    int known;
    int64_t tr = row_trainable(r, &known);
    int cls = is_cls(t);
    buf[0] = '\0';
    switch (c) {
    case C_ARM:
        snprintf(buf, len, "%s", r->name);
        return;
    case C_TECH:
        snprintf(buf, len, "%s", r->techniques);
        return;
    case C_TRAINABLE:
        if (!known)
            snprintf(buf, len, "%s", none);
        else if (raw)
            snprintf(buf, len, "%lld", (long long)tr);
        else if (narrow && tr >= 10000000)
            compact((double)tr, buf, len);
        else
            grouped(tr, buf, len);
        return;
    case C_PCT:
        if (!known || !r->have_plan || r->all_params <= 0)
            snprintf(buf, len, "%s", none);
        else
            snprintf(buf, len, raw ? "%.6f" : "%.4f%%", 100.0 * (double)tr / (double)r->all_params);
        return;
    case C_PEAK:
        if (!r->have_result || r->peak_mib <= 0)
            snprintf(buf, len, "%s", none);
        else
            snprintf(buf, len, raw ? "%.3f" : "%.1f", r->peak_mib);
        return;
    case C_MS:
        if (spread(r, &r->s_ms))
            with_sd(buf, len, &r->s_ms, raw ? "%.4f" : "%.2f", raw, narrow, 0);
        else if (!r->have_result || r->steps_timed <= 0 || r->step_seconds <= 0)
            snprintf(buf, len, "%s", none);
        else
            snprintf(buf, len, raw ? "%.4f" : "%.2f", 1000.0 * r->step_seconds / (double)r->steps_timed);
        return;
    case C_TPS:
        if (spread(r, &r->s_tps))
            with_sd(buf, len, &r->s_tps, "%.1f", raw, narrow, raw ? 0 : narrow ? 1 : 2);
        else if (!r->have_result || r->steps_timed <= 0 || r->step_seconds <= 0)
            snprintf(buf, len, "%s", none);
        else if (narrow)
            compact((double)r->tokens / r->step_seconds, buf, len);
        else if (raw)
            snprintf(buf, len, "%.1f", (double)r->tokens / r->step_seconds);
        else
            grouped((int64_t)llround((double)r->tokens / r->step_seconds), buf, len);
        return;
    case C_POS:
        if (!r->have_plan && !r->is_base)
            snprintf(buf, len, "%s", none);
        else
            snprintf(buf, len, "%d", r->cost.positions + r->cost.prefix);
        return;
    case C_FLOPS:
    case C_FLOPS_MERGED: {
        if (!r->have_plan && !r->is_base) {
            snprintf(buf, len, "%s", none);
            return;
        }
        int64_t f = c == C_FLOPS ? r->cost.flops : r->cost.flops_merged;
        if (raw) {
            snprintf(buf, len, "%lld", (long long)f);
        } else {
            char g[40];
            if (narrow)
                compact((double)f, g, sizeof g);
            else
                grouped(f, g, sizeof g);
            int pos = r->cost.positions + r->cost.prefix;
            if (narrow && pos > 0)
                snprintf(buf, len, "%s%s +%d pos", r->cost.flops_lower_bound && f > 0 ? ">=" : "", g, pos);
            else
                snprintf(buf, len, "%s%s", r->cost.flops_lower_bound && f > 0 ? ">=" : "", g);
        }
        return;
    }
    case C_LOSS:
        if (narrow && !r->ok)
            snprintf(buf, len, "failed");
        else if (!r->have_result || !r->ok || !isfinite(r->val_loss))
            snprintf(buf, len, "%s", none);
        else if (spread(r, &r->s_loss))
            with_sd(buf, len, &r->s_loss, raw ? "%.6f" : narrow ? "%.3f" : "%.4f", raw, narrow, 0);
        else
            snprintf(buf, len, raw ? "%.6f" : "%.4f", r->val_loss);
        return;
    case C_METRIC:
        if (!r->have_result || !r->ok || !isfinite(r->val_loss) || (cls && r->val_accuracy < 0))
            snprintf(buf, len, "%s", none);
        else if (spread(r, &r->s_metric))
            with_sd(buf, len, &r->s_metric, raw ? "%.6f" : cls ? (narrow ? "%.3f" : "%.4f") : (narrow ? "%.1f" : "%.2f"),
                    raw, narrow, 0);
        else if (cls)
            snprintf(buf, len, raw ? "%.6f" : "%.4f", r->val_accuracy);
        else
            snprintf(buf, len, raw ? "%.6f" : "%.2f", exp(r->val_loss));
        return;
    case C_STATUS:
        if (raw)
            snprintf(buf, len, "%s", r->ok ? "ok" : "failed");
        else if (r->ok)
            snprintf(buf, len, "ok");
        else
            snprintf(buf, len, "failed: %s", r->error[0] ? r->error : "unknown error");
        return;
    default:
        return;
    }
}

static int right_aligned(int c)
{
    return c != C_ARM && c != C_TECH && c != C_STATUS;
}

/* ---- text and Markdown ----------------------------------------------------------------------------- */

#define CELL_MAX 1200

/* Display width: UTF-8 continuation bytes take no column. */
static int width_of(const char *s)
{
    int w = 0;
    for (; *s; s++)
        w += ((unsigned char)*s & 0xC0) != 0x80;
    return w;
}

static void pad(FILE *o, int n)
{
    for (; n > 0; n--)
        fputc(' ', o);
}

/* Lines under the text table: what the figures are over, each sweep's
 * choice, failures (narrow), and a change of machine load. */
static void render_notes(const compare_table *t, FILE *o, int narrow)
{
    if (t->seeds > 1)
        fprintf(o, "mean ± sample sd over %d seeds per arm (seed i = train.seed + 1000003*i)\n", t->seeds);
    for (int i = 0; i < t->n_rows; i++) {
        const compare_row *r = &t->rows[i];
        if (r->setting[0])
            fprintf(o, "%s: best on validation: %s (sweeps/%s.md)\n", r->name, r->setting, r->name);
        if (r->seeds > 1 && r->ok && r->s_loss.n < r->seeds)
            fprintf(o, "%s: %d of %d seeds finished\n", r->name, r->s_loss.n, r->seeds);
    }
    for (int i = 0; narrow && i < t->n_rows; i++)
        if (!t->rows[i].ok)
            fprintf(o, "%s: failed: %s\n", t->rows[i].name, t->rows[i].error[0] ? t->rows[i].error : "unknown error");
    if (t->calib_lo > 0 && t->calib_hi > 1.2 * t->calib_lo)
        fprintf(o, "note: machine load changed between runs (calibration loop %.1f-%.1f ms, %.0f%% apart): "
                "timings vary\n", 1e3 * t->calib_lo, 1e3 * t->calib_hi, 100.0 * (t->calib_hi / t->calib_lo - 1.0));
}

static void render_text(const compare_table *t, FILE *o, int markdown)
{
    int narrow = !markdown && !t->wide;
    int cols[N_COLS], n_cols = 0;
    if (narrow)
        for (int c = 0; c < N_NARROW; c++)
            cols[n_cols++] = narrow_cols[c];
    else
        for (int c = 0; c < N_COLS; c++)
            cols[n_cols++] = c;
    compare_table tt = *t;
    tt.wide = !narrow;
    t = &tt;
    int w[N_COLS];
    char buf[CELL_MAX];
    for (int k = 0; k < n_cols; k++) {
        int c = cols[k];
        w[k] = width_of(col_title(t, c));
        for (int i = 0; i < t->n_rows; i++) {
            cell(t, &t->rows[i], c, 0, buf, sizeof buf);
            if (width_of(buf) > w[k])
                w[k] = width_of(buf);
        }
    }
    for (int i = -1; i < t->n_rows; i++) {
        for (int k = 0; k < n_cols; k++) {
            int c = cols[k];
            if (i < 0)
                snprintf(buf, sizeof buf, "%s", col_title(t, c));
            else
                cell(t, &t->rows[i], c, 0, buf, sizeof buf);
            if (markdown) {
                fputs(k == 0 ? "| " : " | ", o);
                for (const char *s = buf; *s; s++) {
                    if (*s == '|')
                        fputc('\\', o);
                    fputc(*s, o);
                }
                if (k == n_cols - 1)
                    fputs(" |", o);
            } else if (k == n_cols - 1 && !right_aligned(c)) {
                fputs(buf, o);   /* the last column is not padded */
            } else {
                int gap = w[k] - width_of(buf);
                if (right_aligned(c))
                    pad(o, gap);
                fputs(buf, o);
                if (!right_aligned(c))
                    pad(o, gap);
                if (k < n_cols - 1)
                    fputs("  ", o);
            }
        }
        fputc('\n', o);
        if (i < 0) {
            for (int k = 0; k < n_cols; k++) {
                int c = cols[k];
                if (markdown)
                    fputs("|", o);
                int n = markdown ? 3 : w[k];
                for (int j = 0; j < n; j++)
                    fputc('-', o);
                if (markdown && right_aligned(c))
                    fputc(':', o);
                if (!markdown && k < n_cols - 1)
                    fputs("  ", o);
            }
            fputs(markdown ? "|\n" : "\n", o);
        }
    }
    if (!markdown)
        render_notes(t, o, narrow);
}

/* ---- CSV (RFC 4180) ---------------------------------------------------------------------------------------- */

static void csv_field(FILE *o, const char *s, int last)
{
    if (strpbrk(s, ",\"\r\n")) {
        fputc('"', o);
        for (; *s; s++) {
            if (*s == '"')
                fputc('"', o);
            fputc(*s, o);
        }
        fputc('"', o);
    } else {
        fputs(s, o);
    }
    fputs(last ? "\r\n" : ",", o);
}

static void render_csv(const compare_table *t, FILE *o)
{
    char buf[CELL_MAX];
    for (int c = 0; c < N_COLS; c++)
        csv_field(o, csv_title(t, c), 0);
    static const char *const extra[] = { "flops_lower_bound", "n_seeds", "val_loss_sd", "val_metric_sd",
                                         "ms_per_step_sd", "tokens_per_second_sd", "setting", "reused" };
    for (int k = 0; k < 8; k++)
        csv_field(o, extra[k], 0);
    csv_field(o, "error", 1);
    for (int i = 0; i < t->n_rows; i++) {
        const compare_row *r = &t->rows[i];
        for (int c = 0; c < N_COLS; c++) {
            cell(t, r, c, 1, buf, sizeof buf);
            csv_field(o, buf, 0);
        }
        csv_field(o, r->cost.flops_lower_bound ? "true" : "false", 0);
        snprintf(buf, sizeof buf, "%d", r->s_loss.n);
        csv_field(o, buf, 0);
        const compare_stat *sds[] = { &r->s_loss, &r->s_metric, &r->s_ms, &r->s_tps };
        for (int k = 0; k < 4; k++) {
            if (sds[k]->n > 0 && isfinite(sds[k]->sd))
                snprintf(buf, sizeof buf, "%.6g", sds[k]->sd);
            else
                buf[0] = '\0';
            csv_field(o, buf, 0);
        }
        csv_field(o, r->setting, 0);
        csv_field(o, r->reused ? "true" : "false", 0);
        csv_field(o, r->ok ? "" : r->error, 1);
    }
}

/* ---- JSON ------------------------------------------------------------------------------------------------------- */

static json_t *num_or_null(int known, double v)
{
    return known && isfinite(v) ? json_real(v) : json_null();
}

static json_t *row_json(const compare_table *t, const compare_row *r)
{
    json_t *o = json_object(), *tech = json_array(), *curve = json_array();
    if (!o || !tech || !curve) {
        json_decref(o);
        json_decref(tech);
        json_decref(curve);
        return NULL;
    }
    /* techniques as a list */
    char tbuf[sizeof r->techniques];
    snprintf(tbuf, sizeof tbuf, "%s", r->techniques);
    if (strcmp(tbuf, "none") != 0)
        for (char *save = NULL, *s = strtok_r(tbuf, "+", &save); s; s = strtok_r(NULL, "+", &save))
            json_array_append_new(tech, json_string(s));
    for (int i = 0; i < r->n_curve; i++) {
        json_t *pt = r->seeds > 1 ? json_pack("[I, f, f, f]", (json_int_t)r->curve[i].step, r->curve[i].loss,
                                              r->curve[i].lo, r->curve[i].hi)
                                  : json_pack("[I, f]", (json_int_t)r->curve[i].step, r->curve[i].loss);
        if (pt && isfinite(r->curve[i].loss))
            json_array_append_new(curve, pt);
        else
            json_decref(pt);
    }
    int known;
    int64_t tr = row_trainable(r, &known);
    int timed = r->have_result && r->steps_timed > 0 && r->step_seconds > 0;
    int cls = is_cls(t), plan = r->have_plan || r->is_base;
    int loss_ok = r->have_result && r->ok;
    json_object_set_new(o, "arm", json_string(r->name));
    json_object_set_new(o, "base", json_boolean(r->is_base));
    json_object_set_new(o, "techniques", tech);
    json_object_set_new(o, "status", json_string(r->ok ? "ok" : "failed"));
    json_object_set_new(o, "error", r->ok ? json_null() : json_string(r->error));
    json_object_set_new(o, "trainable_params", known ? json_integer((json_int_t)tr) : json_null());
    json_object_set_new(o, "trainable_params_plan", r->have_plan ? json_integer((json_int_t)r->trainable_plan)
                                                                 : json_null());
    json_object_set_new(o, "all_params", r->have_plan ? json_integer((json_int_t)r->all_params) : json_null());
    json_object_set_new(o, "trainable_percent",
                        num_or_null(known && r->have_plan && r->all_params > 0,
                                    r->all_params > 0 ? 100.0 * (double)tr / (double)r->all_params : 0));
    json_object_set_new(o, "peak_memory_mib", num_or_null(r->have_result && r->peak_mib > 0, r->peak_mib));
    json_object_set_new(o, "steps", r->have_result ? json_integer((json_int_t)r->steps) : json_null());
    json_object_set_new(o, "seconds", num_or_null(r->have_result, r->seconds));
    if (r->seeds > 1) {
        json_object_set_new(o, "ms_per_step", num_or_null(r->s_ms.n > 0, r->s_ms.mean));
        json_object_set_new(o, "tokens_per_second", num_or_null(r->s_tps.n > 0, r->s_tps.mean));
    } else {
        json_object_set_new(o, "ms_per_step",
                            num_or_null(timed, timed ? 1000.0 * r->step_seconds / (double)r->steps_timed : 0));
        json_object_set_new(o, "tokens_per_second", num_or_null(timed, timed ? (double)r->tokens / r->step_seconds : 0));
    }
    json_object_set_new(o, "extra_positions", plan ? json_integer(r->cost.positions) : json_null());
    json_object_set_new(o, "prefix_length", plan ? json_integer(r->cost.prefix) : json_null());
    json_object_set_new(o, "extra_flops_per_token", plan ? json_integer((json_int_t)r->cost.flops) : json_null());
    json_object_set_new(o, "extra_flops_per_token_merged",
                        plan ? json_integer((json_int_t)r->cost.flops_merged) : json_null());
    json_object_set_new(o, "flops_lower_bound", json_boolean(r->cost.flops_lower_bound));
    json_object_set_new(o, "initial_val_loss", num_or_null(r->have_result, r->initial_val_loss));
    json_object_set_new(o, "val_loss", num_or_null(loss_ok, r->val_loss));
    json_object_set_new(o, "val_perplexity", num_or_null(loss_ok && !cls, exp(r->val_loss)));
    json_object_set_new(o, "val_accuracy", num_or_null(loss_ok && cls && r->val_accuracy >= 0, r->val_accuracy));
    json_object_set_new(o, "n_seeds", json_integer(r->s_loss.n));
    json_object_set_new(o, "val_loss_sd", num_or_null(loss_ok && r->s_loss.n > 0, r->s_loss.sd));
    json_object_set_new(o, cls ? "val_accuracy_sd" : "val_perplexity_sd",
                        num_or_null(loss_ok && r->s_metric.n > 0, r->s_metric.sd));
    json_object_set_new(o, "ms_per_step_sd", num_or_null(r->s_ms.n > 0, r->s_ms.sd));
    json_object_set_new(o, "tokens_per_second_sd", num_or_null(r->s_tps.n > 0, r->s_tps.sd));
    json_object_set_new(o, "setting", r->setting[0] ? json_string(r->setting) : json_null());
    json_object_set_new(o, "reused", json_integer(r->reused));
    json_object_set_new(o, "curve", curve);
    return o;
}

static char *render_json(const compare_table *t)
{
    json_t *root = json_object(), *pipes = json_array(), *rows = json_array();
    if (!root || !pipes || !rows) {
        json_decref(root);
        json_decref(pipes);
        json_decref(rows);
        return NULL;
    }
    for (int i = 0; i < t->n_pipelines; i++)
        json_array_append_new(pipes, json_string(t->pipelines[i]));
    for (int i = 0; i < t->n_rows; i++) {
        json_t *r = row_json(t, &t->rows[i]);
        if (r)
            json_array_append_new(rows, r);
    }
    json_object_set_new(root, "pipelines", pipes);
    json_object_set_new(root, "task", json_string(t->task ? t->task : "lm"));
    json_object_set_new(root, "steps", json_integer(t->steps));
    json_object_set_new(root, "eval_every", json_integer(t->eval_every));
    json_object_set_new(root, "seeds", json_integer(t->seeds > 0 ? t->seeds : 1));
    json_object_set_new(root, "load_changed", json_boolean(t->calib_lo > 0 && t->calib_hi > 1.2 * t->calib_lo));
    json_object_set_new(root, "calibration_ms",
                        t->calib_lo > 0 ? json_pack("[f, f]", 1e3 * t->calib_lo, 1e3 * t->calib_hi) : json_null());
    json_object_set_new(root, "rows", rows);
    char *s = json_dumps(root, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
    json_decref(root);
    if (!s)
        return NULL;
    /* a trailing newline, in memory from malloc like the other formats */
    size_t n = strlen(s);
    char *out = malloc(n + 2);
    if (out) {
        memcpy(out, s, n);
        out[n] = '\n';
        out[n + 1] = '\0';
    }
    free(s);
    return out;
}

char *compare_render(const compare_table *t, int fmt)
{
    if (fmt == COMPARE_JSON)
        return render_json(t);
    char *buf = NULL;
    size_t len = 0;
    FILE *o = open_memstream(&buf, &len);
    if (!o)
        return NULL;
    if (fmt == COMPARE_CSV)
        render_csv(t, o);
    else
        render_text(t, o, fmt == COMPARE_MARKDOWN);
    if (fclose(o) != 0) {
        free(buf);
        return NULL;
    }
    return buf;
}

/* ---- SVG ------------------------------------------------------------------------------------------------------- */

static void xml_text(FILE *o, const char *s)
{
    for (; *s; s++)
        switch (*s) {
        case '<': fputs("&lt;", o); break;
        case '>': fputs("&gt;", o); break;
        case '&': fputs("&amp;", o); break;
        case '"': fputs("&quot;", o); break;
        default: fputc(*s, o);
        }
}

/* A tick step of 1, 2, 2.5 or 5 times a power of ten giving about n
 * intervals over span; for integers (steps) a whole number without 2.5. */
static double tick_step(double span, int n, int integer)
{
    if (!(span > 0))
        return 1.0;
    double raw = span / n, p = pow(10.0, floor(log10(raw))), f = raw / p;
    double s = (f <= 1.0 ? 1.0 : f <= 2.0 ? 2.0 : f <= 2.5 && !integer ? 2.5 : f <= 5.0 ? 5.0 : 10.0) * p;
    return integer && s < 1.0 ? 1.0 : s;
}

/* Ten distinguishable colours (the Tableau 10 palette's values). */
static const char *const palette[] = { "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f",
                                       "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac" };

char *compare_svg(const compare_table *t)
{
    const double W = 800, H = 480, left = 72, right = 230, top = 48, bottom = 56;
    const double pw = W - left - right, ph = H - top - bottom;
    double x_max = 1, y_lo = INFINITY, y_hi = -INFINITY, base = NAN;
    for (int i = 0; i < t->n_rows; i++) {
        const compare_row *r = &t->rows[i];
        if (r->is_base && r->have_result && isfinite(r->val_loss))
            base = r->val_loss;
        for (int k = 0; k < r->n_curve; k++) {
            if (!isfinite(r->curve[k].loss))
                continue;
            if ((double)r->curve[k].step > x_max)
                x_max = (double)r->curve[k].step;
            double lo = fmin(r->curve[k].loss, r->curve[k].lo), hi = fmax(r->curve[k].loss, r->curve[k].hi);
            if (lo < y_lo)
                y_lo = lo;
            if (hi > y_hi)
                y_hi = hi;
        }
    }
    if (t->steps > x_max)
        x_max = t->steps;
    if (isfinite(base)) {
        y_lo = fmin(y_lo, base);
        y_hi = fmax(y_hi, base);
    }
    if (!isfinite(y_lo)) {
        y_lo = 0;
        y_hi = 1;
    }
    if (y_hi - y_lo < 1e-9) {
        y_lo -= 0.5;
        y_hi += 0.5;
    }
    double ys = tick_step(y_hi - y_lo, 6, 0), xs = tick_step(x_max, 8, 1);
    y_lo = floor(y_lo / ys) * ys;
    y_hi = ceil(y_hi / ys) * ys;
    x_max = ceil(x_max / xs) * xs;
#define PX(x) (left + (x) / x_max * pw)
#define PY(y) (top + (y_hi - (y)) / (y_hi - y_lo) * ph)

    char *buf = NULL;
    size_t len = 0;
    FILE *o = open_memstream(&buf, &len);
    if (!o)
        return NULL;
    fprintf(o, "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"
               "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%.0f\" height=\"%.0f\" viewBox=\"0 0 %.0f %.0f\" "
               "font-family=\"sans-serif\" font-size=\"12\">\n", W, H, W, H);
    fprintf(o, "<rect width=\"100%%\" height=\"100%%\" fill=\"white\"/>\n");
    fprintf(o, "<text x=\"%.1f\" y=\"24\" font-size=\"15\" text-anchor=\"middle\">validation loss: ", left + pw / 2);
    for (int i = 0; i < t->n_pipelines; i++) {
        const char *b = strrchr(t->pipelines[i], '/');
        if (i)
            fputs(", ", o);
        xml_text(o, b ? b + 1 : t->pipelines[i]);
    }
    fputs("</text>\n", o);
    /* grid, ticks and labels */
    fprintf(o, "<g stroke=\"#e0e0e0\" stroke-width=\"1\">\n");
    for (double y = y_lo; y <= y_hi + ys * 1e-6; y += ys)
        fprintf(o, "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\"/>\n", left, PY(y), left + pw, PY(y));
    for (double x = 0; x <= x_max + xs * 1e-6; x += xs)
        fprintf(o, "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\"/>\n", PX(x), top, PX(x), top + ph);
    fputs("</g>\n", o);
    fprintf(o, "<g stroke=\"black\" stroke-width=\"1\">\n"
               "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\"/>\n"
               "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\"/>\n",
            left, top + ph, left + pw, top + ph, left, top, left, top + ph);
    for (double y = y_lo; y <= y_hi + ys * 1e-6; y += ys)
        fprintf(o, "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\"/>\n", left - 5, PY(y), left, PY(y));
    for (double x = 0; x <= x_max + xs * 1e-6; x += xs)
        fprintf(o, "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\"/>\n", PX(x), top + ph, PX(x), top + ph + 5);
    fputs("</g>\n", o);
    for (double y = y_lo; y <= y_hi + ys * 1e-6; y += ys)
        fprintf(o, "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"end\">%g</text>\n", left - 8, PY(y) + 4,
                fabs(y) < ys * 1e-6 ? 0.0 : y);
    for (double x = 0; x <= x_max + xs * 1e-6; x += xs)
        fprintf(o, "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\">%g</text>\n", PX(x), top + ph + 19, x);
    fprintf(o, "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\">step</text>\n", left + pw / 2, H - 12);
    fprintf(o, "<text x=\"16\" y=\"%.1f\" text-anchor=\"middle\" transform=\"rotate(-90 16 %.1f)\">validation "
               "loss</text>\n", top + ph / 2, top + ph / 2);
    /* curves, then the legend */
    double ly = top + 8;
    const double lx = left + pw + 16;
    if (isfinite(base)) {
        fprintf(o, "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#555555\" stroke-width=\"1.5\" "
                   "stroke-dasharray=\"6 4\"/>\n", left, PY(base), left + pw, PY(base));
        fprintf(o, "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#555555\" stroke-width=\"1.5\" "
                   "stroke-dasharray=\"6 4\"/>\n", lx, ly, lx + 24, ly);
        fprintf(o, "<text x=\"%.1f\" y=\"%.1f\">base (untrained)</text>\n", lx + 30, ly + 4);
        ly += 20;
    }
    int k = 0;
    for (int i = 0; i < t->n_rows; i++) {
        const compare_row *r = &t->rows[i];
        if (r->is_base)
            continue;
        /* past ten arms the colours repeat with another dash pattern */
        static const char *const dashes[] = { "", " stroke-dasharray=\"8 3\"", " stroke-dasharray=\"2 2\"" };
        int n_pal = (int)(sizeof palette / sizeof palette[0]);
        const char *col = palette[k % n_pal], *dash = dashes[(k / n_pal) % 3];
        k++;
        int n = 0;
        for (int p = 0; p < r->n_curve; p++)
            n += isfinite(r->curve[p].loss) != 0;
        if (n > 1 && r->seeds > 1) {
            /* the band: the lowest to the highest seed at each evaluation */
            fprintf(o, "<polygon class=\"band\" fill=\"%s\" fill-opacity=\"0.18\" stroke=\"none\" points=\"", col);
            for (int p = 0; p < r->n_curve; p++)
                fprintf(o, "%s%.1f,%.1f", p ? " " : "", PX((double)r->curve[p].step), PY(r->curve[p].hi));
            for (int p = r->n_curve - 1; p >= 0; p--)
                fprintf(o, " %.1f,%.1f", PX((double)r->curve[p].step), PY(r->curve[p].lo));
            fputs("\"/>\n", o);
        }
        if (n > 0) {
            fprintf(o, "<polyline fill=\"none\" stroke=\"%s\" stroke-width=\"2\"%s points=\"", col, dash);
            for (int p = 0; p < r->n_curve; p++)
                if (isfinite(r->curve[p].loss))
                    fprintf(o, "%s%.1f,%.1f", p ? " " : "", PX((double)r->curve[p].step), PY(r->curve[p].loss));
            fputs("\"/>\n", o);
            for (int p = 0; p < r->n_curve; p++)
                if (isfinite(r->curve[p].loss))
                    fprintf(o, "<circle cx=\"%.1f\" cy=\"%.1f\" r=\"2.5\" fill=\"%s\"/>\n",
                            PX((double)r->curve[p].step), PY(r->curve[p].loss), col);
        }
        fprintf(o, "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"%s\" stroke-width=\"2\"%s/>\n",
                lx, ly, lx + 24, ly, col, dash);
        fprintf(o, "<text x=\"%.1f\" y=\"%.1f\">", lx + 30, ly + 4);
        xml_text(o, r->name);
        if (!r->ok)
            fputs(" (failed)", o);
        fputs("</text>\n", o);
        ly += 20;
    }
    fputs("</svg>\n", o);
#undef PX
#undef PY
    if (fclose(o) != 0) {
        free(buf);
        return NULL;
    }
    return buf;
}
