/* peftref: a training run's checkpoint on disk (train.c's loop calls
 * these): writing it with the losses and the best-so-far state it carries,
 * and continuing one, its settings checked against this run's. */
#include "config.h"

#include <dirent.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "fileio.h"
#include "trainer.h"

int train_save_checkpoint(trainer *t, int64_t step, pr_error *err)
{
    float *m, *v;
    size_t n;
    optim_state_block(&t->opt, &m, &v, &n);
    trainstate_moments mom = {.m = m, .v = v, .n = n, .t = optim_get_t(&t->opt)};
    trainstate_progress prog = {.step = step, .shuffle_seed = t->cfg->seed};
    memcpy(prog.rng, t->rng.s, sizeof prog.rng);
    uint64_t epoch, cursor;
    data_sampler_get_position(&t->sampler, &epoch, &cursor);
    prog.epoch = (int64_t)epoch;
    prog.cursor = (int64_t)cursor;
    char val[11][40];
    snprintf(val[0], sizeof val[0], "%.17g", t->have_loss ? t->last_loss : NAN);
    snprintf(val[1], sizeof val[1], "%.17g", t->have_loss ? t->first_loss : NAN);
    snprintf(val[2], sizeof val[2], "%.17g", t->have_loss ? t->min_loss : NAN);
    snprintf(val[3], sizeof val[3], "%.17g", t->last_val);
    snprintf(val[4], sizeof val[4], "%.17g", t->last_acc);
    /* the best evaluations so far and early stopping's count, so a resumed
     * run keeps or stops as an uninterrupted one would */
    snprintf(val[5], sizeof val[5], "%.17g", t->keep.best);
    snprintf(val[6], sizeof val[6], "%lld", (long long)t->keep.best_step);
    snprintf(val[7], sizeof val[7], "%.17g", t->stop.best);
    snprintf(val[8], sizeof val[8], "%lld", (long long)t->stop.best_step);
    snprintf(val[9], sizeof val[9], "%d", t->stop.bad);
    snprintf(val[10], sizeof val[10], "%lld", (long long)t->stopped_at);
    st_kv extra[] = {{"train_loss", val[0]}, {"first_train_loss", val[1]}, {"min_train_loss", val[2]},
                     {"val_loss", val[3]}, {"val_accuracy", val[4]}, {"best", val[5]}, {"best_step", val[6]},
                     {"stop_best", val[7]}, {"stop_best_step", val[8]}, {"stop_bad", val[9]},
                     {"stopped_at", val[10]}};
    int rc = trainstate_save_extra(t->ckpt_path, t->fp_json, t->ts, t->n_ts, &mom, &prog, extra,
                                   (int)(sizeof extra / sizeof extra[0]), err);
    if (rc == PR_OK)
        t->ckpt_step = step;
    return rc;
}

/* Where the last good checkpoint is, for a message. */
const char *train_ckpt_note(const trainer *t, char *buf, size_t len)
{
    if (t->ckpt_step >= 0)
        snprintf(buf, len, "the last good checkpoint is %s (step %lld)", t->ckpt_path, (long long)t->ckpt_step);
    else
        snprintf(buf, len, "no checkpoint has been written yet (%s does not exist)", t->ckpt_path);
    return buf;
}

static int load_checkpoint(trainer *t, const char *fingerprint, int64_t *step, pr_error *err)
{
    float *m, *v;
    size_t n;
    optim_state_block(&t->opt, &m, &v, &n);
    trainstate_moments mom = {.m = m, .v = v, .n = n};
    trainstate_progress prog;
    int rc = trainstate_load(t->ckpt_path, fingerprint, t->ts, t->n_ts, &mom, &prog, err);
    if (rc)
        return rc;
    if ((rc = optim_set_t(&t->opt, mom.t, err)))
        return rc;
    memcpy(t->rng.s, prog.rng, sizeof prog.rng);
    if ((rc = data_sampler_set_position(&t->sampler, (uint64_t)prog.epoch, (uint64_t)prog.cursor, err)))
        return rc;
    *step = prog.step;
    t->ckpt_step = prog.step;
    return PR_OK;
}

static int exists(const char *dir, const char *name)
{
    char *p = fileio_join(dir, name);
    struct stat st;
    int r = p && stat(p, &st) == 0;
    free(p);
    return r;
}

void train_remove_in(const char *dir, const char *name)
{
    char *p = fileio_join(dir, name);
    if (p)
        unlink(p);
    free(p);
}

/* Whether dir holds an earlier run's outputs (what a pipeline run writes
 * after training); names them in buf. */
int train_has_outputs(const char *dir, char *buf, size_t len)
{
    size_t k = 0;
    buf[0] = '\0';
    static const char *const names[] = {"pipeline.yaml", "loss.svg"};
    for (int i = 0; i < 2; i++)
        if (exists(dir, names[i]) && k < len)
            k += (size_t)snprintf(buf + k, len - k, "%s%s", k ? ", " : "", names[i]);
    char *mods = fileio_join(dir, "modules");
    DIR *d = mods ? opendir(mods) : NULL;
    struct dirent *de;
    while (d && (de = readdir(d)))
        if (strstr(de->d_name, ".safetensors") && !strstr(de->d_name, ".tmp.")) {
            if (k < len)
                k += (size_t)snprintf(buf + k, len - k, "%smodules/%s", k ? ", " : "", de->d_name);
            break;
        }
    if (d)
        closedir(d);
    free(mods);
    return k > 0;
}

static double meta_num(const char *s)
{
    return s ? strtod(s, NULL) : NAN;
}

/* A checkpoint to continue: its step within train.steps, its settings
 * this run's (or accepted with resume_changed: *changed gets them as
 * JSON), then its values loaded. */
int train_resume_checkpoint(trainer *t, int64_t *step, char **changed, pr_error *err)
{
    const pr_train_config *cfg = t->cfg;
    static const char *const keys[] = {"fingerprint", "step", "train_loss", "first_train_loss",
                                       "min_train_loss", "val_loss", "val_accuracy", "best", "best_step",
                                       "stop_best", "stop_best_step", "stop_bad", "stopped_at"};
    enum { NK = (int)(sizeof keys / sizeof keys[0]) };
    char *v[NK];
    int rc = trainstate_read_meta(t->ckpt_path, keys, v, NK, err);
    if (rc)
        return rc;
    char *end = NULL;
    long long ck_step = v[1] ? strtoll(v[1], &end, 10) : -1;
    if (!v[0] || !v[1] || *end || ck_step < 0) {
        rc = pr_errorf(err, PR_ERR_FORMAT, "%s: checkpoint metadata lacks a fingerprint or a step", t->ckpt_path);
    } else if (ck_step > cfg->steps) {
        rc = pr_errorf(err, PR_ERR_INVALID,
                       "%s is at step %lld, beyond train.steps %d: it belongs to a longer run (raise the steps "
                       "to at least %lld to continue it, or use another output directory)",
                       t->ckpt_path, ck_step, cfg->steps, ck_step);
    } else {
        run_fp old;
        pr_error perr = {0};
        char msg[2048];
        if (run_fp_parse(v[0], &old, &perr) != PR_OK) {
            if (!cfg->resume_changed)
                rc = pr_errorf(err, PR_ERR_INVALID,
                               "%s was written by an earlier peftref whose fingerprint ('%.200s') records shapes "
                               "and seed only, so its other settings cannot be checked: resume it anyway with "
                               "--resume-changed (train.resume_changed)", t->ckpt_path, v[0]);
            else if (!(*changed = strdup("{\"fingerprint\": {\"old\": \"(shapes and seed only)\", \"new\": "
                                         "\"(this run)\"}}")))
                rc = pr_errorf(err, PR_ERR_NOMEM, "out of memory");
        } else {
            int n = run_fp_diff(&old, &t->fp, msg, sizeof msg, changed);
            run_fp_free(&old);
            if (n > 0 && !cfg->resume_changed)
                rc = pr_errorf(err, PR_ERR_INVALID,
                               "%s was written with different settings (%d changed: %s): resume anyway with "
                               "--resume-changed (train.resume_changed; recorded in metrics.jsonl), restore the "
                               "settings, or use another output directory", t->ckpt_path, n, msg);
            if (n == 0) {
                free(*changed);
                *changed = NULL;
            }
        }
    }
    if (rc == PR_OK)
        rc = load_checkpoint(t, v[0], step, err);
    if (rc == PR_OK && v[2]) {
        t->last_loss = meta_num(v[2]);
        t->first_loss = meta_num(v[3]);
        t->min_loss = meta_num(v[4]);
        t->have_loss = isfinite(t->last_loss);
        t->last_val = meta_num(v[5]);
        t->last_acc = meta_num(v[6]);
    }
    if (rc == PR_OK && v[7] && v[12]) {
        t->keep.best = meta_num(v[7]);
        t->keep.best_step = strtoll(v[8], NULL, 10);
        t->stop.best = meta_num(v[9]);
        t->stop.best_step = strtoll(v[10], NULL, 10);
        t->stop.bad = (int)strtol(v[11], NULL, 10);
        t->stopped_at = strtoll(v[12], NULL, 10);
    }
    for (int i = 0; i < NK; i++)
        free(v[i]);
    return rc;
}


int train_export_head(trainer *t, pr_error *err)
{
    pr_head *h = t->cfg->head;
    if (!t->is_cls || !h || !t->head)
        return PR_OK;
    if (h->n_labels != t->K || h->d_model != t->C || !h->weight) {
        pr_head_free(h);
        pr_head fresh = {.d_model = t->C, .n_labels = t->K, .int_labels = t->train.labels.is_int};
        fresh.labels = calloc((size_t)t->K, sizeof *fresh.labels);
        fresh.weight = malloc(sizeof(float) * (size_t)t->C * t->K);
        fresh.bias = malloc(sizeof(float) * (size_t)t->K);
        int ok = fresh.labels && fresh.weight && fresh.bias;
        for (int k = 0; ok && k < t->K; k++)
            ok = (fresh.labels[k] = strdup(t->train.labels.names[k])) != NULL;
        if (!ok) {
            pr_head_free(&fresh);
            return pr_errorf(err, PR_ERR_NOMEM, "out of memory for the classification head");
        }
        *h = fresh;
    }
    memcpy(h->weight, t->head, sizeof(float) * (size_t)t->C * t->K);
    memcpy(h->bias, t->head + (size_t)t->C * t->K, sizeof(float) * (size_t)t->K);
    return PR_OK;
}

int train_import_head(trainer *t, pr_error *err)
{
    const pr_head *h = t->cfg->head;
    if (!t->is_cls || !h || h->n_labels == 0)
        return PR_OK;
    if (h->d_model != t->C || h->n_labels != t->K)
        return pr_errorf(err, PR_ERR_INVALID, "the head to start from is %d x %d, this run's %d x %d (d_model x "
                         "labels)", h->d_model, h->n_labels, t->C, t->K);
    for (int k = 0; k < t->K; k++)
        if (strcmp(h->labels[k], t->train.labels.names[k]) != 0)
            return pr_errorf(err, PR_ERR_INVALID, "the head to start from has label %d '%s', the training data "
                             "'%s'", k, h->labels[k], t->train.labels.names[k]);
    memcpy(t->head, h->weight, sizeof(float) * (size_t)t->C * t->K);
    memcpy(t->head + (size_t)t->C * t->K, h->bias, sizeof(float) * (size_t)t->K);
    return PR_OK;
}
