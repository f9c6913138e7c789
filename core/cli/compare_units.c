/* peftref compare: the runs of one comparison: their directories, the
 * sweep tables, and the JSON rows that MPI ranks gather (cmd_compare.c
 * drives them). */
#include "config.h"
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>
#include <jansson.h>
#include "cli.h"
#include "compare.h"
#include "dist.h"
#include "fileio.h"
#include "runtime.h"

int compare_write_file(const char *dir, const char *name, const char *text)
{
    pr_error err = { 0 };
    char *path = fileio_join(dir, name);
    int rc = path ? fileio_write_atomic(path, text, strlen(text), &err)
                  : (int)pr_errorf(&err, PR_ERR_NOMEM, "out of memory");
    if (rc)
        fprintf(stderr, "peftref compare: %s\n", err.msg);
    free(path);
    return rc;
}



/* The directory of run (pt, s) of an arm: NAME alone for one run, else
 * NAME/seedS, NAME/pPT or NAME/pPT-seedS. */
char *compare_unit_dir(const char *arms_root, const char *name, const compare_group *g, int pt, int s)
{
    char sub[64] = "";
    if (g->n_points > 1 && g->n_seeds > 1)
        snprintf(sub, sizeof sub, "/p%d-seed%d", pt, s);
    else if (g->n_points > 1)
        snprintf(sub, sizeof sub, "/p%d", pt);
    else if (g->n_seeds > 1)
        snprintf(sub, sizeof sub, "/seed%d", s);
    char rel[512];
    snprintf(rel, sizeof rel, "%s%s", name, sub);
    return fileio_join(arms_root, rel);
}

/* An earlier comparison in out: its table or its runs. */
int compare_holds_comparison(const char *out)
{
    static const char *const marks[] = { "table.json", "arms", "base" };
    for (int i = 0; i < 3; i++) {
        char *p = fileio_join(out, marks[i]);
        struct stat st;
        int there = p && stat(p, &st) == 0;
        free(p);
        if (there)
            return 1;
    }
    return 0;
}

/* Plan run u (counts, overhead) into its row and set what its child trains
 * with; 0, or -1 with the row's error set and u->pipe freed. */
int compare_prepare_unit(compare_arm *u, int is_base, int eval_every, int progress, int resume, const char *dir,
                        int mine)
{
    compare_row *r = u->row;
    if (!is_base)
        compare_technique_list(u->pipe, r->techniques, sizeof r->techniques);
    pr_pipeline_counts counts;
    pr_error e = { 0 };
    if (pr_pipeline_counts_get(u->pipe, &counts, &e) != PR_OK || overhead_of_pipeline(u->pipe, &r->cost, &e) != PR_OK) {
        snprintf(r->error, sizeof r->error, "%s", e.msg);
        pr_pipeline_free(u->pipe);
        u->pipe = NULL;
        return -1;
    }
    r->have_plan = 1;
    r->trainable_plan = is_base ? 0 : counts.trainable;
    r->all_params = counts.all;
    pr_pipeline_train_config(u->pipe, &u->tc);
    u->tc.eval_every = is_base ? 0 : eval_every;
    u->tc.progress = is_base ? PR_PROGRESS_NONE : progress;
    u->tc.quiet = u->tc.progress == PR_PROGRESS_NONE;
    u->resume = resume;
    u->tc.resume = resume;
    u->tc.force = !resume;   /* afresh, unless continuing this comparison */
    /* a single process checkpoints when a signal stops it; ranks under
     * mpirun end at once, so an MPI arm keeps train.checkpoint_every */
    if (!resume && u->mpi_ranks <= 1)
        u->tc.ckpt_every = 0;
    u->out_dir = dir ? strdup(dir) : NULL;
    if (!u->out_dir) {
        snprintf(r->error, sizeof r->error, "out of memory");
        pr_pipeline_free(u->pipe);
        u->pipe = NULL;
        return -1;
    }
    if (!resume && mine) {   /* another rank's runs are its own to clear */
        char *ck = fileio_join(u->out_dir, "checkpoint.safetensors");
        if (ck)
            unlink(ck);
        free(ck);
        char *res = fileio_join(u->out_dir, COMPARE_RESULT_FILE);
        if (res)
            unlink(res);
        free(res);
    }
    u->tc.out_dir = u->out_dir;
    return 0;
}

void compare_empty_row(compare_row *r, const compare_row *like)
{
    memset(r, 0, sizeof *r);
    r->val_loss = r->initial_val_loss = NAN;
    r->val_accuracy = -1;
    snprintf(r->name, sizeof r->name, "%s", like->name);
    snprintf(r->techniques, sizeof r->techniques, "%s", like->techniques);
}

/* Write DIR/sweeps/ARM.{md,csv,json}. */
int compare_write_sweep(const char *out, const compare_arm *a, const compare_group *g, int cls)
{
    char *dir = fileio_join(out, "sweeps");
    if (!dir || compare_make_dirs(dir) != 0) {
        fprintf(stderr, "peftref compare: cannot create %s/sweeps: %s\n", out, strerror(errno));
        free(dir);
        return 1;
    }
    const char **labels = calloc((size_t)g->n_points, sizeof *labels);
    int rc = labels ? 0 : 1;
    for (int p = 0; labels && p < g->n_points; p++) {
        labels[p] = pr_pipeline_arm_point_label(a->pipe, a->arm_index, p);
        if (!labels[p])
            labels[p] = "?";
    }
    static const char *const ext[] = { "md", "csv", "json" };
    static const int fmts[] = { COMPARE_MARKDOWN, COMPARE_CSV, COMPARE_JSON };
    for (int f = 0; labels && f < 3; f++) {
        char name[300];
        snprintf(name, sizeof name, "%s.%s", a->row->name, ext[f]);
        char *s = compare_sweep_render(a->row->name, g->points, labels, g->n_points, g->best, cls, fmts[f]);
        if (!s || compare_write_file(dir, name, s))
            rc = 1;
        free(s);
    }
    free(labels);
    free(dir);
    return rc;
}

/* ---- arms side by side on MPI ranks ---------------------------------------
 * `mpirun -np N peftref compare ...`: every rank loads and plans every arm
 * alike, runs the runs r with r mod N == its rank (in the order a single
 * process would: the base, then each arm's settings and seeds), each in a
 * forked child that is a world of one (dist_detach), and sends the rows it
 * filled to rank 0 as one JSON text (dist_gather_text); rank 0 aggregates,
 * prints and writes the table. */

/* A failure every rank agrees on (several ranks), or rc itself; *agreed
 * is set once a failure was agreed, so no rank waits in a later call. */
int compare_collective(int rc, int *agreed)
{
    if (dist_size() == 1 || *agreed)
        return rc;
    pr_error e = { 0 };
    if (rc)
        pr_errorf(&e, rc, "failed");
    int r = dist_agree(rc, &e);
    if (r)
        *agreed = 1;
    return r;
}

static json_t *num_or_null(double v)
{
    return isfinite(v) ? json_real(v) : json_null();
}

double compare_num_of(const json_t *o, const char *key, double def)
{
    const json_t *v = json_object_get(o, key);
    return json_is_number(v) ? json_number_value(v) : def;
}

/* What a run filled in its row (not the plan, which every rank has). */
json_t *compare_row_result_json(int unit, const compare_row *r)
{
    json_t *o = json_object(), *c = json_array();
    if (!o || !c) {
        json_decref(o);
        json_decref(c);
        return NULL;
    }
    json_object_set_new(o, "unit", json_integer(unit));
    json_object_set_new(o, "ok", json_integer(r->ok));
    json_object_set_new(o, "error", json_string(r->error));
    json_object_set_new(o, "have_result", json_integer(r->have_result));
    json_object_set_new(o, "trainable", json_integer((json_int_t)r->trainable));
    json_object_set_new(o, "steps", json_integer((json_int_t)r->steps));
    json_object_set_new(o, "seconds", num_or_null(r->seconds));
    json_object_set_new(o, "step_seconds", num_or_null(r->step_seconds));
    json_object_set_new(o, "tokens", json_integer((json_int_t)r->tokens));
    json_object_set_new(o, "peak_mib", num_or_null(r->peak_mib));
    json_object_set_new(o, "initial_val_loss", num_or_null(r->initial_val_loss));
    json_object_set_new(o, "val_loss", num_or_null(r->val_loss));
    json_object_set_new(o, "val_accuracy", num_or_null(r->val_accuracy));
    json_object_set_new(o, "steps_timed", json_integer((json_int_t)r->steps_timed));
    json_object_set_new(o, "reused", json_integer(r->reused));
    json_object_set_new(o, "calib_seconds", num_or_null(r->calib_seconds));
    for (int i = 0; i < r->n_curve; i++)
        json_array_append_new(c, json_pack("[I,f]", (json_int_t)r->curve[i].step, r->curve[i].loss));
    json_object_set_new(o, "curve", c);
    return o;
}

void compare_row_result_read(compare_row *r, const json_t *o)
{
    r->ok = (int)compare_num_of(o, "ok", 0);
    snprintf(r->error, sizeof r->error, "%s", json_string_value(json_object_get(o, "error")) ?
             json_string_value(json_object_get(o, "error")) : "");
    r->have_result = (int)compare_num_of(o, "have_result", 0);
    r->trainable = (int64_t)compare_num_of(o, "trainable", 0);
    r->steps = (int64_t)compare_num_of(o, "steps", 0);
    r->seconds = compare_num_of(o, "seconds", 0);
    r->step_seconds = compare_num_of(o, "step_seconds", 0);
    r->tokens = (int64_t)compare_num_of(o, "tokens", 0);
    r->peak_mib = compare_num_of(o, "peak_mib", 0);
    r->initial_val_loss = compare_num_of(o, "initial_val_loss", NAN);
    r->val_loss = compare_num_of(o, "val_loss", NAN);
    r->val_accuracy = compare_num_of(o, "val_accuracy", -1);
    r->steps_timed = (int64_t)compare_num_of(o, "steps_timed", 0);
    r->reused = (int)compare_num_of(o, "reused", 0);
    r->calib_seconds = compare_num_of(o, "calib_seconds", 0);
    const json_t *c = json_object_get(o, "curve");
    size_t n = json_array_size(c);
    free(r->curve);
    r->curve = n ? calloc(n, sizeof *r->curve) : NULL;
    r->n_curve = 0;
    for (size_t i = 0; r->curve && i < n; i++) {
        const json_t *pt = json_array_get(c, i);
        double v = json_number_value(json_array_get(pt, 1));
        r->curve[r->n_curve++] = (compare_point){ (int64_t)json_integer_value(json_array_get(pt, 0)), v, v, v };
    }
}

