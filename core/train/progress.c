/* peftref core: the training loop's progress report on stderr, a plain
 * log or a bar redrawn in place (see progress.h), and pr_progress_parse. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include "peftref/train.h"
#include "progress.h"

int pr_progress_parse(const char *s)
{
    static const char *const names[] = { "auto", "bar", "plain", "none" };
    for (int i = 0; s && i < 4; i++)
        if (strcmp(s, names[i]) == 0)
            return i;   /* the pr_progress values, in order */
    return -1;
}

void train_progress_init(progress *pg, const pr_train_config *cfg, int is_cls, int64_t step)
{
    memset(pg, 0, sizeof *pg);
    pg->mode = cfg->quiet ? PR_PROGRESS_NONE : cfg->progress;
    if (pg->mode == PR_PROGRESS_AUTO) {
        const char *term = getenv("TERM");
        pg->mode = isatty(STDERR_FILENO) && !(term && strcmp(term, "dumb") == 0) ? PR_PROGRESS_BAR
                                                                                 : PR_PROGRESS_PLAIN;
    }
    if (pg->mode < PR_PROGRESS_BAR || pg->mode > PR_PROGRESS_NONE)
        pg->mode = PR_PROGRESS_PLAIN;
    pg->total = cfg->steps;
    pg->is_cls = is_cls;
    pg->step_start = step;
    pg->loss = pg->val = pg->acc = NAN;
}

static int term_columns(void)
{
    struct winsize ws;
    if (ioctl(STDERR_FILENO, TIOCGWINSZ, &ws) == 0 && ws.ws_col >= 20)
        return ws.ws_col;
    const char *c = getenv("COLUMNS");
    int n = c ? atoi(c) : 0;
    return n >= 20 ? n : 80;
}

/* 75 -> "1:15", 4000 -> "1:06:40" */
static void fmt_duration(double s, char *buf, size_t len)
{
    if (!isfinite(s) || s < 0 || s > 1e8) {
        snprintf(buf, len, "--:--");
        return;
    }
    long v = (long)(s + 0.5);
    if (v >= 3600)
        snprintf(buf, len, "%ld:%02ld:%02ld", v / 3600, v / 60 % 60, v % 60);
    else
        snprintf(buf, len, "%ld:%02ld", v / 60, v % 60);
}

/* 950 -> "950", 12345 -> "12.3k", 4.2e6 -> "4.20M" */
static void fmt_rate(double v, char *buf, size_t len)
{
    if (v >= 1e6)
        snprintf(buf, len, "%.2fM", v / 1e6);
    else if (v >= 1e4)
        snprintf(buf, len, "%.1fk", v / 1e3);
    else
        snprintf(buf, len, "%.0f", v);
}

/* Redraw the bar for step (force: even if drawn less than 0.1 s ago). */
static void progress_draw(progress *pg, int64_t step, int64_t tokens, double now, int force)
{
    if (pg->mode != PR_PROGRESS_BAR || (!force && pg->drawn && now - pg->t_drawn < 0.1))
        return;
    pg->t_drawn = now;
    double elapsed = now - pg->t_start;
    double done = (double)(step - pg->step_start);
    char eta[32], rate[32], right[200], left[64];
    fmt_duration(done > 0 ? elapsed / done * (double)(pg->total - step) : NAN, eta, sizeof eta);
    fmt_rate(elapsed > 0 ? (double)tokens / elapsed : 0.0, rate, sizeof rate);
    int o = 0;
    if (isfinite(pg->loss))
        o += snprintf(right + o, sizeof right - (size_t)o, " loss %.4f", pg->loss);
    if (isfinite(pg->val))
        o += snprintf(right + o, sizeof right - (size_t)o, " | val %.4f", pg->val);
    if (pg->is_cls && isfinite(pg->acc))
        o += snprintf(right + o, sizeof right - (size_t)o, " acc %.3f", pg->acc);
    snprintf(right + o, sizeof right - (size_t)o, " | %s tok/s | ETA %s", rate, eta);
    snprintf(left, sizeof left, "step %lld/%d ", (long long)step, pg->total);
    int cols = term_columns() - 1;   /* the last column would wrap on some terminals */
    int pct = pg->total > 0 ? (int)(100 * step / pg->total) : 100;
    int bar = cols - (int)strlen(left) - (int)strlen(right) - 7;   /* "[" "] " "100%" */
    if (bar > 40)
        bar = 40;
    char line[512];
    int n = snprintf(line, sizeof line, "%s", left);
    if (bar >= 5) {
        int fill = pg->total > 0 ? (int)((int64_t)bar * step / pg->total) : bar;
        line[n++] = '[';
        for (int i = 0; i < bar; i++)
            line[n++] = i < fill ? '=' : i == fill ? '>' : ' ';
        n += snprintf(line + n, sizeof line - (size_t)n, "] ");
    }
    snprintf(line + n, sizeof line - (size_t)n, "%3d%%%s", pct, right);
    if (cols > 0 && cols < (int)sizeof line)
        line[cols] = '\0';
    fprintf(stderr, "\r%s\033[K", line);
    fflush(stderr);
    pg->drawn = 1;
}

/* End a drawn bar's line, so what follows starts on a fresh one. */
void train_progress_end_line(progress *pg)
{
    if (pg->drawn) {
        fputc('\n', stderr);
        fflush(stderr);
        pg->drawn = 0;
    }
}

/* After a training step: a plain log line when one is due, or the bar. */
void train_progress_step(progress *pg, const pr_train_config *cfg, int64_t step, double loss, float lr, double norm,
                         double tps_window, int64_t tokens, double now)
{
    pg->loss = loss;
    if (pg->mode == PR_PROGRESS_PLAIN)
        fprintf(stderr, "step %6lld/%d  loss %.6f  lr %.3e  norm %.4f  %.0f tok/s\n", (long long)step, cfg->steps,
                loss, lr, norm, tps_window);
    else
        progress_draw(pg, step, tokens, now, step == pg->total);
}

/* After an evaluation. */
void train_progress_eval(progress *pg, int64_t step, double vloss, double vacc, int64_t tokens, double now)
{
    pg->val = vloss;
    pg->acc = vacc;
    if (pg->mode == PR_PROGRESS_PLAIN) {
        if (step == 0)
            fprintf(stderr, "step %6d  val_loss %.6f\n", 0, vloss);
        else if (pg->is_cls)
            fprintf(stderr, "step %6lld  val_loss %.6f  val_accuracy %.4f\n", (long long)step, vloss, vacc);
        else
            fprintf(stderr, "step %6lld  val_loss %.6f  val_ppl %.4f\n", (long long)step, vloss, exp(vloss));
    } else {
        progress_draw(pg, step, tokens, now, 1);
    }
}
