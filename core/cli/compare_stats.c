/* peftref compare: statistics over an arm's seeds, the choice among the
 * settings of its sweep, and the sweep's own table.  See compare.h. */
#include "config.h"

#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "compare.h"

/* Mean and sample standard deviation of v[0..n). */
static compare_stat stat_of(const double *v, int n)
{
    compare_stat s = { NAN, NAN, n };
    if (n <= 0)
        return s;
    double sum = 0;
    for (int i = 0; i < n; i++)
        sum += v[i];
    s.mean = sum / n;
    double ss = 0;
    for (int i = 0; i < n; i++)
        ss += (v[i] - s.mean) * (v[i] - s.mean);
    s.sd = n > 1 ? sqrt(ss / (n - 1)) : 0.0;
    return s;
}

/* The seeds' curves as one: the mean at each step every seed evaluated,
 * with the lowest and highest seed's value. */
static void merge_curves(compare_row *dst, compare_row *const *runs, int n)
{
    const compare_row *first = NULL;
    for (int i = 0; i < n && !first; i++)
        if (runs[i]->ok && runs[i]->n_curve > 0)
            first = runs[i];
    if (!first || !(dst->curve = calloc((size_t)first->n_curve, sizeof *dst->curve)))
        return;
    for (int k = 0; k < first->n_curve; k++) {
        int64_t step = first->curve[k].step;
        double sum = 0, lo = INFINITY, hi = -INFINITY;
        int m = 0, all = 1;
        for (int i = 0; i < n && all; i++) {
            if (!runs[i]->ok)
                continue;
            int found = 0;
            for (int j = 0; j < runs[i]->n_curve && !found; j++)
                if (runs[i]->curve[j].step == step) {
                    double v = runs[i]->curve[j].loss;
                    sum += v;
                    lo = v < lo ? v : lo;
                    hi = v > hi ? v : hi;
                    m++;
                    found = 1;
                }
            all = found;
        }
        if (all && m > 0)
            dst->curve[dst->n_curve++] = (compare_point){ step, sum / m, lo, hi };
    }
}

void compare_aggregate(compare_row *dst, compare_row *const *runs, int n, int cls)
{
    if (n <= 0)
        return;
    const compare_row *r0 = runs[0];
    /* the plan and identity of the setting: the first run's */
    memcpy(dst->name, r0->name, sizeof dst->name);
    memcpy(dst->techniques, r0->techniques, sizeof dst->techniques);
    dst->is_base = r0->is_base;
    dst->have_plan = r0->have_plan;
    dst->trainable_plan = r0->trainable_plan;
    dst->all_params = r0->all_params;
    dst->cost = r0->cost;
    dst->seeds = n;
    double *v[5];
    for (int k = 0; k < 5; k++)
        v[k] = calloc((size_t)n, sizeof *v[k]);
    int n_ok = 0, n_timed = 0, failed = -1;
    dst->seconds = 0;
    for (int i = 0; i < n; i++) {
        const compare_row *r = runs[i];
        dst->seconds += r->seconds;
        if (!r->ok) {
            if (failed < 0)
                failed = i;
            continue;
        }
        if (!dst->have_result) {
            /* counts are the same for every seed: the first finished one's */
            dst->have_result = 1;
            dst->trainable = r->trainable;
            dst->steps = r->steps;
            dst->initial_val_loss = r->initial_val_loss;
        }
        dst->tokens += r->tokens;
        dst->step_seconds += r->step_seconds;
        dst->steps_timed += r->steps_timed;
        if (r->peak_mib > dst->peak_mib)
            dst->peak_mib = r->peak_mib;
        dst->reused += r->reused;
        if (v[0] && v[1] && v[4]) {
            v[0][n_ok] = r->val_loss;
            v[1][n_ok] = cls ? r->val_accuracy : exp(r->val_loss);
            v[4][n_ok] = r->peak_mib;
        }
        n_ok++;
        if (r->steps_timed > 0 && r->step_seconds > 0 && v[2] && v[3]) {
            v[2][n_timed] = 1000.0 * r->step_seconds / (double)r->steps_timed;
            v[3][n_timed] = (double)r->tokens / r->step_seconds;
            n_timed++;
        }
    }
    if (v[0] && v[1] && v[2] && v[3] && v[4]) {
        dst->s_loss = stat_of(v[0], n_ok);
        dst->s_metric = stat_of(v[1], n_ok);
        dst->s_ms = stat_of(v[2], n_timed);
        dst->s_tps = stat_of(v[3], n_timed);
        dst->s_peak = stat_of(v[4], n_ok);
    }
    for (int k = 0; k < 5; k++)
        free(v[k]);
    if (n_ok > 0) {
        dst->val_loss = dst->s_loss.mean;
        dst->val_accuracy = cls ? dst->s_metric.mean : -1;
    }
    if (failed < 0 && n_ok == n) {
        dst->ok = 1;
    } else if (failed >= 0) {
        if (n > 1)
            snprintf(dst->error, sizeof dst->error, "seed %d: %.*s", failed, 900, runs[failed]->error);
        else
            memcpy(dst->error, runs[failed]->error, sizeof dst->error);
    }
    merge_curves(dst, runs, n);
}

int compare_pick_best(const compare_row *rows, int n, int cls)
{
    int best = -1;
    for (int i = 0; i < n; i++) {
        const compare_row *r = &rows[i];
        if (!r->ok || !isfinite(r->val_loss))
            continue;
        if (best < 0) {
            best = i;
            continue;
        }
        const compare_row *b = &rows[best];
        if (cls && r->val_accuracy != b->val_accuracy) {
            if (r->val_accuracy > b->val_accuracy)
                best = i;
        } else if (r->val_loss < b->val_loss) {
            best = i;
        }
    }
    return best;
}

/* ---- the sweep's table ---- */

static void fmt_stat(char *buf, size_t len, const compare_stat *s, const char *f, int raw)
{
    if (s->n <= 0 || !isfinite(s->mean)) {
        snprintf(buf, len, "%s", raw ? "" : "-");
        return;
    }
    char m[32], d[32];
    snprintf(m, sizeof m, f, s->mean);
    snprintf(d, sizeof d, f, s->sd);
    if (raw || s->n == 1)
        snprintf(buf, len, "%s", m);
    else
        snprintf(buf, len, "%s ± %s", m, d);
}

char *compare_sweep_render(const char *arm, const compare_row *rows, const char *const *labels, int n, int best,
                           int cls, int fmt)
{
    char *text = NULL;
    size_t len = 0;
    FILE *o = open_memstream(&text, &len);
    if (!o)
        return NULL;
    const char *metric = cls ? "val acc" : "val ppl";
    if (fmt == COMPARE_JSON) {
        json_t *j = json_object(), *a = json_array();
        json_object_set_new(j, "arm", json_string(arm));
        json_object_set_new(j, "chosen_on", json_string(cls ? "validation accuracy (ties: validation loss)"
                                                            : "validation loss"));
        json_object_set_new(j, "best", best >= 0 ? json_string(labels[best]) : json_null());
        for (int i = 0; i < n; i++) {
            const compare_row *r = &rows[i];
            json_t *x = json_object();
            json_object_set_new(x, "setting", json_string(labels[i]));
            json_object_set_new(x, "best", json_boolean(i == best));
            json_object_set_new(x, "status", json_string(r->ok ? "ok" : "failed"));
            json_object_set_new(x, "error", json_string(r->ok ? "" : r->error));
            json_object_set_new(x, "n_seeds", json_integer(r->s_loss.n));
#define STAT(key, st)                                                                                          \
    json_object_set_new(x, key, (st).n > 0 && isfinite((st).mean) ? json_real((st).mean) : json_null());        \
    json_object_set_new(x, key "_sd", (st).n > 0 && isfinite((st).sd) ? json_real((st).sd) : json_null());
            STAT("val_loss", r->s_loss)
            if (cls) {
                STAT("val_accuracy", r->s_metric)
            } else {
                STAT("val_perplexity", r->s_metric)
            }
            STAT("tokens_per_second", r->s_tps)
#undef STAT
            json_array_append_new(a, x);
        }
        json_object_set_new(j, "settings", a);
        char *s = json_dumps(j, JSON_INDENT(2));
        if (s)
            fprintf(o, "%s\n", s);
        free(s);
        json_decref(j);
    } else if (fmt == COMPARE_CSV) {
        fprintf(o, "setting,best,status,n_seeds,val_loss,val_loss_sd,%s,%s_sd,tokens_per_second\r\n",
                cls ? "val_accuracy" : "val_perplexity", cls ? "val_accuracy" : "val_perplexity");
        for (int i = 0; i < n; i++) {
            const compare_row *r = &rows[i];
            fputc('"', o);
            for (const char *c = labels[i]; *c; c++)
                fputs(*c == '"' ? "\"\"" : (char[2]){ *c, 0 }, o);
            fprintf(o, "\",%d,%s,%d,", i == best, r->ok ? "ok" : "failed", r->s_loss.n);
            if (r->s_loss.n > 0)
                fprintf(o, "%.6f,%.6f,%.6f,%.6f,", r->s_loss.mean, r->s_loss.sd, r->s_metric.mean, r->s_metric.sd);
            else
                fputs(",,,,", o);
            if (r->s_tps.n > 0)
                fprintf(o, "%.1f", r->s_tps.mean);
            fputs("\r\n", o);
        }
    } else {
        fprintf(o, "Sweep of arm `%s`: the chosen setting (**best**) has the %s.\n\n", arm,
                cls ? "highest mean validation accuracy (ties: lowest validation loss)" : "lowest mean validation loss");
        fprintf(o, "| setting | seeds | val loss | %s | tokens/s | status |\n|---|---:|---:|---:|---:|---|\n",
                metric);
        for (int i = 0; i < n; i++) {
            const compare_row *r = &rows[i];
            char l[96], m[96], t[96];
            fmt_stat(l, sizeof l, &r->s_loss, "%.4f", 0);
            fmt_stat(m, sizeof m, &r->s_metric, cls ? "%.4f" : "%.2f", 0);
            fmt_stat(t, sizeof t, &r->s_tps, "%.0f", 0);
            fprintf(o, "| %s%s%s | %d | %s | %s | %s | %s |\n", i == best ? "**" : "", labels[i], i == best ? "**" : "",
                    r->s_loss.n, l, m, t, r->ok ? "ok" : "failed");
        }
    }
    if (fclose(o) != 0) {
        free(text);
        return NULL;
    }
    return text;
}
