/* peftref core: the loss-curve plot of a run (see run.h).
 *
 * Hand-written SVG 1.1: a plot area of W x H pixels inside margins, the
 * x axis linear in steps from 0 to the last step, the y axis linear in
 * loss over [min, max] of every point widened to "nice" tick values
 * (1, 2 or 5 times a power of ten), the training loss as one polyline and
 * the validation losses as circles. */
#include "config.h"

#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fileio.h"
#include "loss_plot.h"

#define SVG_W 720
#define SVG_H 440
#define M_LEFT 72
#define M_RIGHT 24
#define M_TOP 44
#define M_BOTTOM 56

typedef struct series {
    double *x, *y;
    int n, cap;
} series;

static int series_add(series *s, double x, double y)
{
    if (s->n == s->cap) {
        int cap = s->cap ? 2 * s->cap : 256;
        double *nx = realloc(s->x, (size_t)cap * sizeof *nx);
        if (!nx)
            return -1;
        s->x = nx;
        double *ny = realloc(s->y, (size_t)cap * sizeof *ny);
        if (!ny)
            return -1;
        s->y = ny;
        s->cap = cap;
    }
    s->x[s->n] = x;
    s->y[s->n] = y;
    s->n++;
    return 0;
}

/* A tick step of 1, 2 or 5 x 10^k giving about `want` intervals over span. */
static double nice_step(double span, int want)
{
    double raw = span / want, p = pow(10.0, floor(log10(raw))), f = raw / p;
    return (f <= 1.0 ? 1.0 : f <= 2.0 ? 2.0 : f <= 5.0 ? 5.0 : 10.0) * p;
}

static void xml_text(FILE *o, const char *s)
{
    for (; *s; s++) {
        switch (*s) {
        case '<': fputs("&lt;", o); break;
        case '>': fputs("&gt;", o); break;
        case '&': fputs("&amp;", o); break;
        case '"': fputs("&quot;", o); break;
        default:
            if ((unsigned char)*s >= 0x20 || *s == '\t')
                fputc(*s, o);
        }
    }
}

/* Shortest of %g forms for a tick value at step st. */
static void tick_label(char *buf, size_t len, double v, double st)
{
    int dec = st >= 1.0 ? 0 : (int)ceil(-log10(st) - 1e-9);
    if (fabs(v) < st * 1e-6)
        v = 0.0;
    snprintf(buf, len, "%.*f", dec, v);
}

static void plot(FILE *o, const series *tr, const series *va, const char *title)
{
    const double pw = SVG_W - M_LEFT - M_RIGHT, ph = SVG_H - M_TOP - M_BOTTOM;
    fprintf(o, "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    fprintf(o, "<svg xmlns=\"http://www.w3.org/2000/svg\" version=\"1.1\" width=\"%d\" height=\"%d\" "
               "viewBox=\"0 0 %d %d\" font-family=\"sans-serif\" font-size=\"12\">\n",
            SVG_W, SVG_H, SVG_W, SVG_H);
    fprintf(o, "<rect x=\"0\" y=\"0\" width=\"%d\" height=\"%d\" fill=\"white\"/>\n", SVG_W, SVG_H);
    fprintf(o, "<text x=\"%d\" y=\"24\" text-anchor=\"middle\" font-size=\"15\">", SVG_W / 2);
    xml_text(o, title);
    fprintf(o, "</text>\n");
    if (tr->n + va->n == 0) {
        fprintf(o, "<text x=\"%d\" y=\"%d\" text-anchor=\"middle\">no loss values in metrics.jsonl</text>\n",
                SVG_W / 2, SVG_H / 2);
        fprintf(o, "</svg>\n");
        return;
    }
    double x_max = 1.0, y_min = INFINITY, y_max = -INFINITY;
    for (int pass = 0; pass < 2; pass++) {
        const series *s = pass ? va : tr;
        for (int i = 0; i < s->n; i++) {
            x_max = s->x[i] > x_max ? s->x[i] : x_max;
            y_min = s->y[i] < y_min ? s->y[i] : y_min;
            y_max = s->y[i] > y_max ? s->y[i] : y_max;
        }
    }
    if (!(y_max > y_min)) {
        y_min -= 0.5;
        y_max += 0.5;
    }
    double ys = nice_step(y_max - y_min, 5);
    y_min = floor(y_min / ys) * ys;
    y_max = ceil(y_max / ys) * ys;
    double xs = nice_step(x_max, 6);
    x_max = ceil(x_max / xs) * xs;
#define PX(x) (M_LEFT + (x) / x_max * pw)
#define PY(y) (M_TOP + (y_max - (y)) / (y_max - y_min) * ph)
    /* grid and ticks */
    fprintf(o, "<g stroke=\"#dddddd\" stroke-width=\"1\">\n");
    for (double y = y_min; y <= y_max + ys * 1e-6; y += ys)
        fprintf(o, "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\"/>\n", (double)M_LEFT, PY(y),
                M_LEFT + pw, PY(y));
    for (double x = 0; x <= x_max + xs * 1e-6; x += xs)
        fprintf(o, "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\"/>\n", PX(x), (double)M_TOP, PX(x),
                M_TOP + ph);
    fprintf(o, "</g>\n");
    fprintf(o, "<g stroke=\"black\" stroke-width=\"1\">\n");
    fprintf(o, "<line x1=\"%d\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\"/>\n", M_LEFT, M_TOP + ph, M_LEFT + pw, M_TOP + ph);
    fprintf(o, "<line x1=\"%d\" y1=\"%d\" x2=\"%d\" y2=\"%.1f\"/>\n", M_LEFT, M_TOP, M_LEFT, M_TOP + ph);
    for (double y = y_min; y <= y_max + ys * 1e-6; y += ys)
        fprintf(o, "<line x1=\"%d\" y1=\"%.1f\" x2=\"%d\" y2=\"%.1f\"/>\n", M_LEFT - 5, PY(y), M_LEFT, PY(y));
    for (double x = 0; x <= x_max + xs * 1e-6; x += xs)
        fprintf(o, "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\"/>\n", PX(x), M_TOP + ph, PX(x),
                M_TOP + ph + 5);
    fprintf(o, "</g>\n");
    char lab[64];
    fprintf(o, "<g class=\"y-ticks\" text-anchor=\"end\">\n");
    for (double y = y_min; y <= y_max + ys * 1e-6; y += ys) {
        tick_label(lab, sizeof lab, y, ys);
        fprintf(o, "<text x=\"%d\" y=\"%.1f\">%s</text>\n", M_LEFT - 8, PY(y) + 4, lab);
    }
    fprintf(o, "</g>\n<g class=\"x-ticks\" text-anchor=\"middle\">\n");
    for (double x = 0; x <= x_max + xs * 1e-6; x += xs) {
        tick_label(lab, sizeof lab, x, xs);
        fprintf(o, "<text x=\"%.1f\" y=\"%.1f\">%s</text>\n", PX(x), M_TOP + ph + 19, lab);
    }
    fprintf(o, "</g>\n");
    fprintf(o, "<text x=\"%.1f\" y=\"%d\" text-anchor=\"middle\">step</text>\n", M_LEFT + pw / 2, SVG_H - 14);
    fprintf(o, "<text x=\"16\" y=\"%.1f\" text-anchor=\"middle\" transform=\"rotate(-90 16 %.1f)\">loss "
               "(nats)</text>\n", M_TOP + ph / 2, M_TOP + ph / 2);
    /* data */
    if (tr->n) {
        fprintf(o, "<polyline class=\"train\" fill=\"none\" stroke=\"#1f77b4\" stroke-width=\"1.5\" points=\"");
        for (int i = 0; i < tr->n; i++)
            fprintf(o, "%s%.2f,%.2f", i ? " " : "", PX(tr->x[i]), PY(tr->y[i]));
        fprintf(o, "\"/>\n");
    }
    if (va->n) {
        fprintf(o, "<g class=\"validation\" fill=\"#d62728\" stroke=\"white\" stroke-width=\"1\">\n");
        for (int i = 0; i < va->n; i++)
            fprintf(o, "<circle cx=\"%.2f\" cy=\"%.2f\" r=\"4\"/>\n", PX(va->x[i]), PY(va->y[i]));
        fprintf(o, "</g>\n");
    }
    /* legend, top right inside the plot */
    double lx = M_LEFT + pw - 150, ly = M_TOP + 10;
    fprintf(o, "<g class=\"legend\">\n<rect x=\"%.1f\" y=\"%.1f\" width=\"140\" height=\"44\" fill=\"white\" "
               "stroke=\"#999999\"/>\n", lx, ly);
    fprintf(o, "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#1f77b4\" stroke-width=\"1.5\"/>\n",
            lx + 8, ly + 14, lx + 30, ly + 14);
    fprintf(o, "<text x=\"%.1f\" y=\"%.1f\">train loss</text>\n", lx + 38, ly + 18);
    fprintf(o, "<circle cx=\"%.1f\" cy=\"%.1f\" r=\"4\" fill=\"#d62728\"/>\n", lx + 19, ly + 32);
    fprintf(o, "<text x=\"%.1f\" y=\"%.1f\">validation loss</text>\n</g>\n", lx + 38, ly + 36);
#undef PX
#undef PY
    fprintf(o, "</svg>\n");
}

int run_loss_svg(const char *metrics_path, const char *svg_path, const char *title, pr_error *err)
{
    char *text = NULL;
    size_t len = 0;
    int rc = fileio_read_all(metrics_path, (size_t)1 << 30, &text, &len, err);
    if (rc)
        return rc;
    series tr = { 0 }, va = { 0 };
    int oom = 0;
    for (char *line = text, *next; line && *line && !oom; line = next) {
        next = strchr(line, '\n');
        if (next)
            *next++ = '\0';
        json_error_t je;
        json_t *j = json_loads(line, 0, &je);
        if (!j)
            continue;
        json_t *st = json_object_get(j, "step"), *l = json_object_get(j, "loss"), *v = json_object_get(j, "val_loss");
        if (json_is_number(st)) {
            double x = json_number_value(st);
            if (json_is_number(l) && isfinite(json_number_value(l)))
                oom |= series_add(&tr, x, json_number_value(l));
            if (json_is_number(v) && isfinite(json_number_value(v)))
                oom |= series_add(&va, x, json_number_value(v));
        }
        json_decref(j);
    }
    free(text);
    char *svg = NULL;
    size_t svg_len = 0;
    FILE *o = oom ? NULL : open_memstream(&svg, &svg_len);
    if (!o) {
        rc = pr_errorf(err, PR_ERR_NOMEM, "%s: out of memory", svg_path);
    } else {
        plot(o, &tr, &va, title ? title : "loss");
        if (fclose(o) != 0)
            rc = pr_errorf(err, PR_ERR_NOMEM, "%s: out of memory", svg_path);
        else
            rc = fileio_write_atomic(svg_path, svg, svg_len, err);
    }
    free(svg);
    free(tr.x);
    free(tr.y);
    free(va.x);
    free(va.y);
    return rc;
}
