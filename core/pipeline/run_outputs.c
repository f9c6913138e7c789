/* peftref pipelines: what a run leaves in its output directory: the
 * trained modules (modules/NAME.safetensors, and a classification run's
 * head, modules/head.safetensors) and pipeline.yaml, the resolved
 * pipeline with every module loaded frozen, to evaluate, sample or merge
 * the run with; with train.keep_best, the best evaluation's modules in
 * modules/best/ and best.yaml, the same pipeline over them. */
#include "config.h"

#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "fileio.h"
#include "pipeline_internal.h"

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

/* An option value as written in a pipeline: plain when it is a number,
 * a boolean or a bare word (so it is read back with its type), else
 * quoted. */
static void yval(FILE *o, const char *s)
{
    int plain = *s != 0;
    for (const char *c = s; *c && plain; c++)
        plain = isalnum((unsigned char)*c) || strchr("._+-", *c);
    if (plain)
        fputs(s, o);
    else
        yq(o, s);
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
 * run (under sub, "modules/" or "modules/best/") are named relative to
 * the run directory, others absolutely. */
static int write_snapshot(const pr_pipeline *p, const pr_model *m, const char *path, const char *sub,
                          pr_error *err)
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
            /* the member files as they were, the composite frozen at its trained weights */
            fprintf(o, "  - fuse: [");
            for (int k = 0; k < pm->n_files; k++) {
                fprintf(o, "%s", k ? ", " : "");
                yq_abs(o, pr_module_file_path(pm->files[k]));
            }
            fprintf(o, "]\n    technique: ");
            yq(o, pm->t->name);
            if (pm->n_opts) {
                fprintf(o, "\n    options: {");
                for (int k = 0; k < pm->n_opts; k++) {
                    fprintf(o, "%s", k ? ", " : "");
                    yq(o, pm->opts[k].name);
                    fprintf(o, ": ");
                    yval(o, pm->opts[k].value);
                }
                fprintf(o, "}");
            }
            if (pm->trainable) {
                char rel[300];
                snprintf(rel, sizeof rel, "%s%s.safetensors", sub, name);
                fprintf(o, "\n    load: ");
                yq(o, rel);
            } else if (pm->composite_load) {
                fprintf(o, "\n    load: ");
                yq_abs(o, pm->composite_load);
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
            snprintf(rel, sizeof rel, "%s%s.safetensors", sub, name);
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
    if (p->head.n_labels > 0) {
        char rel[300];
        snprintf(rel, sizeof rel, "%shead.safetensors", sub);
        fprintf(o, "  head: ");
        yq(o, rel);
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
    if (t->keep_best)
        fprintf(o, "  keep_best: %s\n", t->keep_best);
    if (t->early_stop_patience > 0)
        fprintf(o, "  early_stop: {patience: %d, min_delta: %s, metric: %s}\n", t->early_stop_patience,
                short_num(b[1], 40, t->early_stop_min_delta, 0),
                t->early_stop_metric ? t->early_stop_metric : "val_loss");
    if (fclose(o) != 0) {
        free(text);
        return pr_errorf(err, PR_ERR_NOMEM, "%s: out of memory", path);
    }
    int rc = fileio_write_atomic(path, text, len, err);
    free(text);
    return rc;
}

static int make_dir(const char *dir, pr_error *err)
{
    if (mkdir(dir, 0777) != 0 && errno != EEXIST)
        return pr_errorf(err, PR_ERR_IO, "%s: cannot create it: %s", dir, strerror(errno));
    return PR_OK;
}

/* Into dir: every module not loaded frozen (those are referenced, not
 * copied) and the head. */
static int save_modules(const pr_pipeline *p, pr_model *m, const char *dir, const pr_module_save_info *info,
                        pr_error *err)
{
    int rc = PR_OK;
    for (int i = 0; i < p->n_mods && !rc; i++) {
        const pipe_module *pm = &p->mods[i];
        if (pm->kind != MOD_TECHNIQUE && pm->mode == MODE_FROZEN)
            continue;  /* referenced, not copied */
        pr_module *mod = pr_model_module(m, i);
        char file[512];
        snprintf(file, sizeof file, "%s/%s.safetensors", dir, pr_module_name(mod));
        if (pm->kind == MOD_FUSE) {
            /* the members are referenced; the composite's weights are saved when trained */
            if (pm->trainable)
                rc = pr_composite_save(mod, file, err);
            continue;
        }
        pr_module_save_info mi = *info;
        if (pm->kind != MOD_TECHNIQUE && pm->mode == MODE_CONTINUE) {
            /* steps count from the saved module's own training */
            const char *tr = pr_module_file_meta(pm->files[0], "training");
            const char *st = tr ? strstr(tr, "\"steps\":") : NULL;
            if (st)
                mi.steps += strtoll(st + 8, NULL, 10);
        }
        rc = pr_module_save(mod, file, &mi, err);
    }
    if (!rc && p->head.n_labels > 0) {
        char *file = fileio_join(dir, "head.safetensors");
        rc = file ? pr_head_save(&p->head, file, info->steps, info->final_val_loss, err)
                  : (int)pr_errorf(err, PR_ERR_NOMEM, "out of memory");
        free(file);
    }
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
    int rc = make_dir(out, err);
    if (!rc && (p->n_mods || p->head.n_labels > 0))
        rc = make_dir(dir, err);
    pr_module_save_info info = { .base_fingerprint = pr_pipeline_base_fingerprint(p),
                                 .steps = res ? res->steps_done : 0,
                                 .final_train_loss = res && res->steps_done ? res->final_train_loss : NAN,
                                 .final_val_loss = res ? res->final_val_loss : NAN };
    if (!rc)
        rc = save_modules(p, m, dir, &info, err);
    free(dir);
    if (rc)
        return rc;
    char *snap = fileio_join(out, "pipeline.yaml");
    if (!snap)
        return pr_errorf(err, PR_ERR_NOMEM, "out of memory");
    rc = write_snapshot(p, m, snap, "modules/", err);
    free(snap);
    return rc;
}

/* keep_best's on_best: the modules and head as evaluated at step into
 * OUT/modules/best/, and OUT/best.yaml, the pipeline over them. */
static int save_best(void *arg, int64_t step, double val_loss, double val_accuracy, pr_error *err)
{
    (void)val_accuracy;
    pr_pipeline *p = arg;
    if (!p->built)
        return PR_OK;
    const char *out = p->tc.out_dir;
    char *mods = fileio_join(out, "modules"), *dir = fileio_join(out, "modules/best");
    char *snap = fileio_join(out, "best.yaml");
    int rc = mods && dir && snap ? PR_OK : (int)pr_errorf(err, PR_ERR_NOMEM, "out of memory");
    pr_module_save_info info = { .base_fingerprint = pr_pipeline_base_fingerprint(p), .steps = step,
                                 .final_train_loss = NAN, .final_val_loss = val_loss };
    if (!rc && !(rc = make_dir(out, err)) && !(rc = make_dir(mods, err)) && !(rc = make_dir(dir, err)) &&
        !(rc = save_modules(p, p->built, dir, &info, err)))
        rc = write_snapshot(p, p->built, snap, "modules/best/", err);
    free(mods);
    free(dir);
    free(snap);
    return rc;
}

void pl_tc_init(pr_pipeline *p)
{
    p->tc.head = &p->head;
    p->tc.on_best = save_best;
    p->tc.on_best_arg = p;
}
