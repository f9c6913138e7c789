/* peftref: the training loop (see include/peftref/train.h): setup,
 * checkpoints, resume, metrics lines and the step loop; one batch and the
 * validation pass are in batch.c, the run's state in trainer.h, its
 * progress report on stderr in progress.c. */
#include "config.h"

#include <dirent.h>
#include <errno.h>
#include <stdarg.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "peftref/train.h"
#include "bf16.h"
#include "peftref/module.h"
#include "data.h"
#include "dist.h"
#include "fileio.h"
#include "optim.h"
#include "progress.h"
#include "rng.h"
#include "run_dir.h"
#include "run_fingerprint.h"
#include "schedule.h"
#include "train_state.h"
#include "trainer.h"

/* consecutive steps a loss must stay past the diverging rule before the warning */
#define DIVERGING_STEPS 3

/* ---- signals --------------------------------------------------------------
 * SIGINT/SIGTERM only raise a flag; the loop finishes the step in flight,
 * writes a checkpoint and returns PR_ERR_INTERRUPTED. */
static volatile sig_atomic_t stop_signal;

static void on_signal(int sig)
{
    /* several ranks: a peer may be gone, and the next collective would wait
     * for it forever; rank 0 says where the last checkpoint is */
    if (dist_size() > 1)
        dist_signal_exit(sig);
    stop_signal = sig;
}

void pr_train_config_default(pr_train_config *c)
{
    memset(c, 0, sizeof *c);
    c->task = "lm";
    c->format = "auto";
    c->val_fraction = 0.1;
    c->steps = 100;
    c->batch = 8;
    c->seq_len = 64;
    c->accum = 1;
    c->lr = 1e-3f;
    c->min_lr_ratio = 0.1f;
    c->warmup = 0;
    c->schedule = "cosine";
    c->weight_decay = 0.01f;
    c->clip = 1.0f;
    c->beta1 = 0.9f;
    c->beta2 = 0.999f;
    c->eps = 1e-8f;
    c->head_lr_mult = 1.0f;
    c->seed = 1;
    c->eval_every = 0;
    c->eval_batches = 0;
    c->log_every = 10;
    c->ckpt_every = 0;
}


static void trainer_free(trainer *t)
{
    data_dataset_free(&t->train);
    data_dataset_free(&t->val);
    data_sampler_free(&t->sampler);
    free(t->tokens);
    free(t->targets);
    free(t->lengths);
    free(t->labels);
    free(t->samples);
    free(t->idx);
    free(t->idx_step);
    free(t->red_buf);
    free(t->head);
    free(t->head_grad);
    free(t->pooled);
    free(t->cls_logits);
    free(t->dhidden);
    if (t->opt_ready)
        optim_free(&t->opt);
    free(t->ts);
    free(t->ckpt_path);
    free(t->metrics_path);
    if (t->metrics)
        fclose(t->metrics);
    run_fp_free(&t->fp);
    free(t->fp_json);
    if (t->locked)
        run_dir_unlock(t->cfg->out_dir);
}

int pr_train_lock(const char *out_dir, pr_error *err)
{
    if (!out_dir)
        return pr_errorf(err, PR_ERR_INVALID, "an output directory is required");
    return run_dir_lock(out_dir, err);
}

void pr_train_unlock(const char *out_dir)
{
    if (out_dir)
        run_dir_unlock(out_dir);
}


/* The learning-rate multiplier a tensor asks for (0 in the table means 1). */
static float tensor_lr_mult(const pr_tensor_info *ti)
{
    return ti->lr_mult > 0.0f ? ti->lr_mult : 1.0f;
}

/* Trainable tensors and the head become optimizer segments and checkpoint
 * tensors, in the same order, so the optimizer's flat moment block lines
 * up with them.  Base and module tensors form one group per learning-rate
 * multiplier they declare (LoRA+), in order of first appearance, keeping
 * table order within each (one group, table order, when none declares
 * one); the head is a group of its own.  A tensor is weight-decayed by the
 * usual rule (optim_default_decay) unless it declares PR_PARAM_NO_DECAY. */
#define MAX_LR_GROUPS 8
static int plan_optimizer(trainer *t, pr_error *err)
{
    const pr_train_config *cfg = t->cfg;
    int nt = pr_model_n_tensors(t->m), n_base = 0;
    float mults[MAX_LR_GROUPS];
    int n_mults = 0, per_mult[MAX_LR_GROUPS] = {0};
    for (int i = 0; i < nt; i++) {
        const pr_tensor_info *ti = pr_model_tensor(t->m, i);
        if (!ti->trainable)
            continue;
        n_base++;
        float lm = tensor_lr_mult(ti);
        int g = 0;
        while (g < n_mults && mults[g] != lm)
            g++;
        if (g == n_mults) {
            if (n_mults == MAX_LR_GROUPS)
                return pr_errorf(err, PR_ERR_UNSUPPORTED, "tensor '%s': more than %d distinct learning-rate "
                                 "multipliers", ti->name, MAX_LR_GROUPS);
            mults[n_mults++] = lm;
        }
        per_mult[g]++;
    }
    int n_head = t->is_cls ? 2 : 0;
    if (n_base + n_head == 0) {
        if (cfg->steps == 0)
            return PR_OK;   /* evaluation only: no optimizer */
        return pr_errorf(err, PR_ERR_INVALID, "nothing to train: no tensor is trainable");
    }
    optim_segment *segs = calloc((size_t)(n_base + n_head), sizeof *segs);
    t->ts = calloc((size_t)(n_base + n_head), sizeof *t->ts);
    if (!segs || !t->ts) {
        free(segs);
        return pr_errorf(err, PR_ERR_NOMEM, "out of memory planning the optimizer");
    }
    optim_group groups[MAX_LR_GROUPS + 1];
    int k = 0, n_groups = 0;
    for (int g = 0; g < n_mults; g++) {
        groups[n_groups++] = (optim_group){.segs = segs + k, .n_segs = per_mult[g], .lr_mult = mults[g],
                                           .weight_decay = OPTIM_WD_DEFAULT};
        for (int i = 0; i < nt; i++) {
            const pr_tensor_info *ti = pr_model_tensor(t->m, i);
            if (!ti->trainable || tensor_lr_mult(ti) != mults[g])
                continue;
            segs[k] = (optim_segment){.name = ti->name, .param = ti->data, .grad = ti->grad,
                                      .n = (size_t)ti->numel,
                                      .decay = !ti->no_decay &&
                                               (cfg->decay_all || optim_default_decay(ti->name, ti->ndim))};
            t->ts[k] = (trainstate_tensor){.name = ti->name, .data = ti->data, .n = (size_t)ti->numel,
                                           .ndim = ti->ndim};
            for (int d = 0; d < ti->ndim; d++)
                t->ts[k].shape[d] = ti->shape[d];
            k++;
        }
    }
    if (t->is_cls) {
        size_t CK = (size_t)t->C * t->K;
        segs[k] = (optim_segment){.name = "cls_head.weight", .param = t->head, .grad = t->head_grad,
                                  .n = CK, .decay = 1};
        segs[k + 1] = (optim_segment){.name = "cls_head.bias", .param = t->head + CK,
                                      .grad = t->head_grad + CK, .n = (size_t)t->K,
                                      .decay = cfg->decay_all};
        t->ts[k] = (trainstate_tensor){.name = "cls_head.weight", .data = t->head, .n = CK, .ndim = 2,
                                       .shape = {t->C, t->K}};
        t->ts[k + 1] = (trainstate_tensor){.name = "cls_head.bias", .data = t->head + CK,
                                           .n = (size_t)t->K, .ndim = 1, .shape = {t->K}};
        groups[n_groups++] = (optim_group){.segs = segs + k, .n_segs = n_head, .lr_mult = cfg->head_lr_mult,
                                           .weight_decay = OPTIM_WD_DEFAULT};
    }
    t->n_ts = n_base + n_head;
    optim_config oc;
    optim_config_default(&oc);
    oc.beta1 = cfg->beta1;
    oc.beta2 = cfg->beta2;
    oc.eps = cfg->eps;
    oc.weight_decay = cfg->weight_decay;
    int rc = optim_init(&t->opt, &oc, groups, n_groups, err);
    free(segs);
    if (rc == PR_OK)
        t->opt_ready = 1;
    return rc;
}

static int setup(trainer *t, pr_model *m, const pr_tokenizer *tok, const pr_train_config *cfg, pr_error *err)
{
    int rc;
    t->m = m;
    t->cfg = cfg;
    t->is_cls = cfg->task && strcmp(cfg->task, "classification") == 0;
    if (cfg->task && !t->is_cls && strcmp(cfg->task, "lm") != 0)
        return pr_errorf(err, PR_ERR_INVALID, "task: expected 'lm' or 'classification', got '%s'", cfg->task);
    static const char *const metrics[] = {"val_loss", "val_accuracy"};
    const char *const which[] = {cfg->keep_best, cfg->early_stop_metric};
    for (int i = 0; i < 2; i++)
        if (which[i] && strcmp(which[i], metrics[0]) != 0 && (strcmp(which[i], metrics[1]) != 0 || !t->is_cls))
            return pr_errorf(err, PR_ERR_INVALID, "%s: expected val_loss%s, got '%s'",
                             i ? "early_stop.metric" : "keep_best", t->is_cls ? " or val_accuracy" : "", which[i]);
    if (cfg->steps < 0 || cfg->batch < 1 || cfg->seq_len < 1 || cfg->accum < 1)
        return pr_errorf(err, PR_ERR_INVALID, "steps >= 0, batch >= 1, seq_len >= 1 and accum >= 1 are required");
    if (!cfg->out_dir)
        return pr_errorf(err, PR_ERR_INVALID, "an output directory is required");
    const pr_model_config *mc = pr_model_get_config(m);
    if (cfg->seq_len > mc->max_seq - pr_model_virtual_positions(m))
        return pr_errorf(err, PR_ERR_INVALID, "seq_len %d exceeds the %d positions the model has for text",
                         cfg->seq_len, mc->max_seq - pr_model_virtual_positions(m));
    if (pr_tokenizer_vocab_size(tok) > mc->vocab_size)
        return pr_errorf(err, PR_ERR_INVALID, "the tokenizer's %d ids do not fit the model's vocabulary of %d",
                         pr_tokenizer_vocab_size(tok), mc->vocab_size);
    t->rank = dist_rank();
    t->ranks = dist_size();
    if (cfg->batch % t->ranks != 0)
        return pr_errorf(err, PR_ERR_INVALID, "train.batch %d does not split evenly over %d ranks: each rank "
                         "takes the same share of every batch (choose a multiple of %d)", cfg->batch, t->ranks,
                         t->ranks);
    t->B_global = cfg->batch;
    t->B = cfg->batch / t->ranks;
    t->T = cfg->seq_len;
    t->C = mc->d_model;
    const char *task = t->is_cls ? "classification" : "lm";
    if ((rc = data_load(cfg->train_path, cfg->format, task, tok, t->T, NULL, &t->train, err)))
        return rc;
    if (cfg->val_path) {
        data_options opt = {.labels = t->is_cls ? &t->train.labels : NULL};
        if ((rc = data_load(cfg->val_path, cfg->format, task, tok, t->T, &opt, &t->val, err)))
            return rc;
    } else {
        data_dataset all = t->train;
        memset(&t->train, 0, sizeof t->train);
        rc = data_split(&all, cfg->val_fraction, cfg->seed, &t->train, &t->val, err);
        data_dataset_free(&all);
        if (rc)
            return rc;
    }
    if (t->train.n == 0 || t->val.n == 0)
        return pr_errorf(err, PR_ERR_INVALID, "%s: too little data for a training and a validation set",
                         cfg->train_path);
    t->K = t->is_cls ? t->train.labels.n : 0;
    if (t->is_cls && t->K < 2)
        return pr_errorf(err, PR_ERR_INVALID, "%s: classification needs at least 2 labels, found %d",
                         cfg->train_path, t->K);
    t->pad_id = data_pad_id(tok);
    if ((rc = data_sampler_init(&t->sampler, t->train.n, cfg->seed, 1, err)))
        return rc;
    size_t BT = (size_t)t->B * t->T;
    t->tokens = malloc(BT * sizeof(int));
    t->targets = malloc(BT * sizeof(int));
    t->lengths = malloc((size_t)t->B * sizeof(int));
    t->labels = malloc((size_t)t->B * sizeof(int));
    t->idx = malloc((size_t)t->B * sizeof(size_t));
    t->samples = malloc((size_t)t->B * sizeof(int64_t));
    t->idx_step = malloc((size_t)cfg->accum * (size_t)t->B_global * sizeof(size_t));
    if (!t->tokens || !t->targets || !t->lengths || !t->labels || !t->idx || !t->samples || !t->idx_step)
        return pr_errorf(err, PR_ERR_NOMEM, "out of memory for batches");
    rng_seed(&t->rng, cfg->seed ^ 0x7065667472656600ull);
    if (t->is_cls) {
        size_t n = (size_t)t->C * t->K + (size_t)t->K;
        t->head = calloc(n, sizeof(float));
        t->head_grad = calloc(n, sizeof(float));
        t->pooled = calloc((size_t)t->B * t->C, sizeof(float));
        t->cls_logits = calloc((size_t)t->B * t->K, sizeof(float));
        t->dhidden = calloc(BT * (size_t)t->C, sizeof(float));
        if (!t->head || !t->head_grad || !t->pooled || !t->cls_logits || !t->dhidden)
            return pr_errorf(err, PR_ERR_NOMEM, "out of memory for the classification head");
        /* small normal init keeps the initial prediction near uniform */
        for (size_t i = 0; i < (size_t)t->C * t->K; i++)
            t->head[i] = 0.02f * rng_normal(&t->rng);
        if ((rc = train_import_head(t, err)))
            return rc;
    }
    /* bf16 storage of the frozen weights, now that modules are attached and
     * what trains is chosen (peftref/model.h, "precision") */
    if (cfg->precision != PR_PRECISION_F32) {
        if ((rc = pr_model_set_precision(m, cfg->precision, err)))
            return rc;
        if (pr_model_bf16_bytes(m) == 0 && !cfg->quiet)
            fprintf(stderr, "peftref: note: precision bf16 changes nothing here: every matrix a product reads "
                    "is trained, and trained tensors stay f32\n");
        if (!bf16_isa_native() && !cfg->quiet) /* decided by ISA; `peftref runtime` measures */
            fprintf(stderr, "peftref: warning: precision bf16 on a CPU without AMX or AVX-512 BF16 (oneDNN ISA %s): "
                    "its products are slower than f32 here\n", bf16_isa());
    }
    /* before the reservation, so the blocks' activations are planned once, shared */
    if ((rc = pr_model_set_recompute(m, cfg->recompute, err)) || (rc = pr_model_reserve(m, t->B, t->T, err)))
        return rc;
    if ((rc = plan_optimizer(t, err)) || (rc = train_plan_reduce(t, err)))
        return rc;
    /* an arm of a comparison trains in OUTPUT/ARM: the lock makes the
     * directories; only rank 0 writes there */
    if (t->rank == 0) {
        if ((rc = run_dir_lock(cfg->out_dir, err)))
            return rc;
        t->locked = 1;
        run_dir_clean_temps(cfg->out_dir);
    }
    t->ckpt_path = fileio_join(cfg->out_dir, "checkpoint.safetensors");
    t->metrics_path = fileio_join(cfg->out_dir, "metrics.jsonl");
    if (!t->ckpt_path || !t->metrics_path)
        return pr_errorf(err, PR_ERR_NOMEM, "out of memory");
    int64_t n_train = 0;
    for (int i = 0; i < t->n_ts; i++)
        n_train += (int64_t)t->ts[i].n;
    /* Everything that must agree for a checkpoint to continue this run
     * (taken before training changes any base tensor). */
    if ((rc = run_fp_of_run(&t->fp, m, cfg, err)))
        return rc;
    if (run_fp_set(&t->fp, "labels", "%d", t->K) || run_fp_set(&t->fp, "params", "%lld", (long long)n_train) ||
        !(t->fp_json = run_fp_json(&t->fp)))
        return pr_errorf(err, PR_ERR_NOMEM, "out of memory");
    t->ckpt_step = -1;
    t->stopped_at = -1;
    best_init(&t->keep, cfg->keep_best, 0.0);
    t->keep.on = cfg->keep_best != NULL;
    best_init(&t->stop, cfg->early_stop_metric, cfg->early_stop_min_delta);
    t->stop.on = cfg->early_stop_patience > 0;
    t->last_val = NAN;
    t->last_acc = NAN;
    return PR_OK;
}

static void log_metrics(trainer *t, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;

static void log_metrics(trainer *t, const char *fmt, ...)
{
    if (!t->metrics)
        return;
    va_list ap;
    va_start(ap, fmt);
    vfprintf(t->metrics, fmt, ap);
    va_end(ap);
    fputc('\n', t->metrics);
    fflush(t->metrics);
}

/* One metrics line for an evaluation: accuracy for classification,
 * perplexity for language modelling. */
static void log_eval(trainer *t, int64_t step, double vloss, double vacc)
{
    if (t->is_cls)
        log_metrics(t, "{\"step\": %lld, \"val_loss\": %.6f, \"val_accuracy\": %.6f}", (long long)step, vloss,
                    vacc);
    else
        log_metrics(t, "{\"step\": %lld, \"val_loss\": %.6f, \"val_ppl\": %.6f}", (long long)step, vloss,
                    exp(vloss));
}

/* After the evaluation at step: keep_best's best modules (on_best, with
 * the head exported first) and early stopping's count, and why it stops. */
static int after_eval(trainer *t, int64_t step, double vloss, double vacc, pr_error *err)
{
    const pr_train_config *cfg = t->cfg;
    int rc = PR_OK;
    if (t->keep.on && best_update(&t->keep, step, t->keep.higher ? vacc : vloss)) {
        log_metrics(t, "{\"event\": \"best\", \"step\": %lld, \"metric\": \"%s\", \"value\": %.6f}",
                    (long long)step, cfg->keep_best, t->keep.best);
        if (cfg->on_best && !(rc = train_export_head(t, err)))
            rc = cfg->on_best(cfg->on_best_arg, step, vloss, vacc, err);
    }
    if (!rc && t->stop.on && !best_update(&t->stop, step, t->stop.higher ? vacc : vloss) &&
        t->stop.bad >= cfg->early_stop_patience) {
        const char *metric = t->stop.higher ? "val_accuracy" : "val_loss";
        t->stopped_at = step;
        log_metrics(t, "{\"event\": \"early_stop\", \"step\": %lld, \"metric\": \"%s\", \"best\": %.6f, "
                    "\"best_step\": %lld, \"patience\": %d, \"min_delta\": %.6g}", (long long)step, metric,
                    t->stop.best, (long long)t->stop.best_step, cfg->early_stop_patience, cfg->early_stop_min_delta);
        if (!cfg->quiet && cfg->progress != PR_PROGRESS_NONE)
            fprintf(stderr, "\nearly stopping at step %lld: %s has not improved by more than %g for %d evaluations "
                    "(best %.6g at step %lld)\n", (long long)step, metric, cfg->early_stop_min_delta,
                    cfg->early_stop_patience, t->stop.best, (long long)t->stop.best_step);
    }
    return rc;
}

static double now_seconds(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

int pr_train(pr_model *m, const pr_tokenizer *tok, const pr_train_config *cfg, pr_train_result *res,
             pr_error *err)
{
    progress pg;
    memset(&pg, 0, sizeof pg);
    trainer t;
    memset(&t, 0, sizeof t);
    memset(res, 0, sizeof *res);
    res->resumed_from = -1;
    res->final_val_accuracy = -1.0;
    res->best_step = res->early_stopped = -1;
    res->best_val_loss = res->best_val_accuracy = NAN;
    /* ranks other than 0 print nothing and write nothing (best modules included) */
    pr_train_config quiet_cfg;
    if (dist_rank() != 0) {
        quiet_cfg = *cfg;
        quiet_cfg.quiet = 1;
        quiet_cfg.progress = PR_PROGRESS_NONE;
        quiet_cfg.on_best = NULL;
        cfg = &quiet_cfg;
    }
    int rc = dist_agree(setup(&t, m, tok, cfg, err), err);
    if (rc) {
        trainer_free(&t);
        return rc;
    }
    res->trainable_params = 0;
    for (int i = 0; i < t.n_ts; i++)
        res->trainable_params += (int64_t)t.ts[i].n;

    char *changed = NULL;   /* settings a resume accepted (freed at out) */
    sched_config sc = {.lr = cfg->lr, .warmup = cfg->warmup, .total = cfg->steps > 0 ? cfg->steps : 1,
                       .min_ratio = cfg->min_lr_ratio};
    /* steps 0 only evaluates: no schedule runs, so its warmup cannot be wrong */
    if ((rc = sched_kind_parse(cfg->schedule ? cfg->schedule : "cosine", &sc.kind, err)) ||
        (cfg->steps > 0 && (rc = sched_validate(&sc, err))))
        goto out;

    int64_t step = 0;
    int talk = !cfg->quiet && cfg->progress != PR_PROGRESS_NONE;
    struct stat sb;
    /* rank 0 decides what is on disk; every rank then reads the same checkpoint */
    int have_ckpt = stat(t.ckpt_path, &sb) == 0;
    if (t.ranks > 1) {
        have_ckpt = train_from_rank0(&t, have_ckpt && !cfg->force, err, &rc);
        if (rc)
            goto out;
    }
    if (cfg->force && t.rank == 0) {
        /* afresh: nothing of the earlier run may pass for this one's */
        unlink(t.ckpt_path);
        train_remove_in(cfg->out_dir, "pipeline.yaml");
        train_remove_in(cfg->out_dir, "loss.svg");
        have_ckpt = 0;
    }
    if (have_ckpt) {
        if (!cfg->resume) {
            rc = pr_errorf(err, PR_ERR_INVALID,
                           "%s exists: resume it (--resume), start over with --force, or choose another "
                           "output directory", t.ckpt_path);
            goto out;
        }
        if ((rc = dist_agree(train_resume_checkpoint(&t, &step, &changed, err), err)))
            goto out;
        res->resumed_from = (int)step;
        if (talk)
            fprintf(stderr, "resumed from %s at step %lld\n", t.ckpt_path, (long long)step);
    } else if (!cfg->force && t.rank == 0) {
        char what[600];
        if (train_has_outputs(cfg->out_dir, what, sizeof what)) {
            rc = pr_errorf(err, PR_ERR_INVALID,
                           "%s holds an earlier run (%s) and no checkpoint to resume from: choose another "
                           "output directory, or replace it with --force", cfg->out_dir, what);
        } else if (stat(t.metrics_path, &sb) == 0 && sb.st_size > 0) {
            if (!cfg->resume)
                rc = pr_errorf(err, PR_ERR_INVALID,
                               "%s holds an earlier run's metrics.jsonl and no checkpoint: start that run again "
                               "with --resume, replace it with --force, or choose another output directory",
                               cfg->out_dir);
            else if (talk)
                fprintf(stderr, "no checkpoint in %s yet: starting from step 0\n", cfg->out_dir);
        }
    }
    if ((rc = dist_agree(rc, err)))
        goto out;
    if (have_ckpt && ((step == cfg->steps && step > 0) || t.stopped_at >= 0)) {
        /* a finished run: nothing to train, nothing to write; its results are the checkpoint's */
        res->complete = 1;
        res->steps_done = step;
        res->first_train_loss = t.have_loss ? t.first_loss : NAN;
        res->final_train_loss = t.have_loss ? t.last_loss : NAN;
        res->initial_val_loss = NAN;
        res->final_val_loss = t.last_val;
        res->final_val_accuracy = t.is_cls && isfinite(t.last_acc) ? t.last_acc : -1.0;
        goto out;
    }
    if (t.rank == 0) {
        if (step > 0)
            rc = run_dir_truncate_metrics(t.metrics_path, step, err);
        if (!rc && !(t.metrics = fopen(t.metrics_path, step > 0 ? "a" : "w")))
            rc = pr_errorf(err, PR_ERR_IO, "%s: %s", t.metrics_path, strerror(errno));
    }
    if ((rc = dist_agree(rc, err)))
        goto out;
    if (changed) {
        log_metrics(&t, "{\"event\": \"resume_changed\", \"step\": %lld, \"settings\": %s}", (long long)step,
                    changed);
        if (talk)
            fprintf(stderr, "resuming with changed settings (--resume-changed), recorded in %s\n", t.metrics_path);
    }

    double vloss, vacc;
    train_progress_init(&pg, t.cfg, t.is_cls, step);
    if ((rc = train_evaluate(&t, &vloss, &vacc, err)))
        goto out;
    res->initial_val_loss = vloss;
    if (step == 0) {
        log_eval(&t, 0, vloss, vacc);
        train_progress_eval(&pg, 0, vloss, vacc, 0, now_seconds());
        if ((rc = dist_agree(after_eval(&t, 0, vloss, vacc, err), err)))
            goto out;
    } else {
        pg.val = vloss;
        pg.acc = vacc;
    }

    struct sigaction sa, old_int, old_term;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    stop_signal = 0;
    sigaction(SIGINT, &sa, &old_int);
    sigaction(SIGTERM, &sa, &old_term);

    double t0 = now_seconds(), t_last = t0;
    int64_t tokens_done = 0, tokens_last = 0;
    int first = 1;
    pg.t_start = t0;
    while (step < cfg->steps) {
        double t_step = now_seconds();
        pr_model_set_training(m, 1);
        pr_model_set_step(m, (uint64_t)step); /* module dropout masks follow the step, across a resume */
        pr_model_zero_grad(m);
        optim_zero_grad(&t.opt);
        (void)pr_model_take_aux_loss(m);   /* this step's only */
        train_update_stop_note(&t, step);
        /* The step's global batch: accum micro-batches of B_global rows, drawn
         * alike on every rank; rank r runs rows [r*B, (r+1)*B) of each.  Every
         * backward divides by the scored targets of the whole step, so the
         * micro-batches' and ranks' gradients sum to the global batch's. */
        int n_rows = cfg->accum * t.B_global;
        data_sampler_next(&t.sampler, t.idx_step, n_rows);
        int64_t n_scored = data_count_scored(&t.train, t.idx_step, (size_t)n_rows);
        /* this rank's sums: loss * scored, scored, tokens, forward aux loss */
        double st[4] = {0.0, 0.0, 0.0, 0.0};
        for (int a = 0; a < cfg->accum && !rc; a++) {
            const size_t *rows = t.idx_step + (size_t)a * t.B_global + (size_t)t.rank * t.B;
            if ((rc = data_make_batch(&t.train, rows, t.B, t.B, t.T, t.tokens, t.targets, t.lengths, t.labels,
                                      t.pad_id, err)))
                break;
            /* Row b of micro-batch a on rank r is sample (step * accum + a) * B_global
             * + r * B + b of the run: the same index however the global batch is
             * split over micro-batches and ranks, so module randomness keyed by it
             * (dropout masks) is too. */
            for (int b = 0; b < t.B; b++)
                t.samples[b] = ((int64_t)step * cfg->accum + a) * t.B_global + (int64_t)t.rank * t.B + b;
            pr_model_set_samples(m, t.samples);
            double l;
            int64_t scored;
            if ((rc = train_run_batch(&t, t.B, 1, n_scored, &l, &scored, NULL, err)))
                break;
            st[0] += l * (double)scored;
            st[1] += (double)scored;
            for (int b = 0; b < t.B; b++)
                st[2] += t.lengths[b];
        }
        st[3] = pr_model_take_aux_loss(m);
        if ((rc = dist_agree(rc, err)) || (rc = dist_sum_doubles(st, 4, err)))
            goto out_signals;
        double loss = st[1] > 0 ? st[0] / st[1] : 0.0;
        tokens_done += (int64_t)st[2];
        if (!isfinite(loss)) {
            char note[600];
            rc = pr_errorf(err, PR_ERR_NUMERIC,
                           "loss is %s at step %lld: training stopped before updating; %s (lower the "
                           "learning rate or check the data)",
                           isnan(loss) ? "NaN" : "infinite", (long long)step + 1, train_ckpt_note(&t, note, sizeof note));
            goto out_signals;
        }
        double t_comm = now_seconds();
        if ((rc = dist_agree(train_reduce_grads(&t, err), err)))
            goto out_signals;
        t_comm = now_seconds() - t_comm;
        res->allreduce_seconds += t_comm;
        /* once per step, on the whole batch's gradient (the same on every rank):
         * a regulariser's gradient, AdaLoRA's importance scores */
        if ((rc = dist_agree(pr_model_after_backward(m, err), err)))
            goto out_signals;
        double aux_bwd = pr_model_take_aux_loss(m);
        size_t bad_index;
        const char *bad = optim_nonfinite_grad(&t.opt, &bad_index);
        if (bad) {
            char note[600];
            rc = pr_errorf(err, PR_ERR_NUMERIC,
                           "gradient of %s[%zu] is not finite at step %lld: training stopped before "
                           "updating; %s",
                           bad, bad_index, (long long)step + 1, train_ckpt_note(&t, note, sizeof note));
            goto out_signals;
        }
        double norm = cfg->clip > 0 ? optim_clip(&t.opt, cfg->clip) : optim_grad_norm(&t.opt);
        float lr = sched_lr(&sc, step);
        if ((rc = optim_step(&t.opt, lr, err)))
            goto out_signals;
        step++;
        pr_model_set_step(m, (uint64_t)step - 1);
        if ((rc = pr_model_after_step(m, err)))
            goto out_signals;
        /* forward terms are per micro-batch: their mean over the step's */
        double aux = st[3] / (double)(cfg->accum * t.ranks) + aux_bwd + pr_model_take_aux_loss(m);
        res->step_seconds += now_seconds() - t_step;
        res->tokens_trained = tokens_done;
        if (first) {
            res->first_train_loss = loss;
            first = 0;
        }
        res->final_train_loss = loss;
        if (!t.have_loss) {
            t.first_loss = t.min_loss = loss;
            t.have_loss = 1;
        }
        /* Diverging: a loss above both the run's first one and three times its
         * running minimum (the lowest loss so far, the first included) on
         * DIVERGING_STEPS consecutive steps, so that one hard batch of a noisy
         * task does not raise it.  Said once per session, naming the step and
         * the peak learning rate. */
        t.diverging_steps = loss > t.first_loss && loss > 3.0 * t.min_loss ? t.diverging_steps + 1 : 0;
        if (!t.warned_diverging && t.diverging_steps >= DIVERGING_STEPS) {
            t.warned_diverging = 1;
            if (t.rank == 0)
                fprintf(stderr, "peftref: warning: training is diverging at step %lld: loss %.4g is above the first "
                    "(%.4g) and more than 3x the lowest so far (%.4g), at lr %.3g (peak %.3g); try a lower "
                    "learning rate (e.g. --lr %.2g)\n", (long long)step, loss, t.first_loss, t.min_loss,
                    (double)lr, (double)cfg->lr, (double)cfg->lr / 10.0);
        }
        if (loss < t.min_loss)
            t.min_loss = loss;
        t.last_loss = loss;
        double now = now_seconds();
        char aux_part[64] = "", mpi_part[96] = "";
        if (aux != 0.0)
            snprintf(aux_part, sizeof aux_part, ", \"aux_loss\": %.6g", aux);
        if (t.ranks > 1)
            snprintf(mpi_part, sizeof mpi_part, ", \"step_seconds\": %.6f, \"allreduce_seconds\": %.6f",
                     now - t_step, t_comm);
        log_metrics(&t, "{\"step\": %lld, \"loss\": %.6f%s, \"lr\": %.6g, \"grad_norm\": %.6f, \"seconds\": %.3f%s}",
                    (long long)step, loss, aux_part, lr, norm, now - t0, mpi_part);
        int last = step == cfg->steps;
        if (pg.mode == PR_PROGRESS_BAR ||
            (pg.mode == PR_PROGRESS_PLAIN && (cfg->log_every <= 0 || step % cfg->log_every == 0 || last))) {
            double tps = (double)(tokens_done - tokens_last) / (now - t_last > 1e-9 ? now - t_last : 1e-9);
            train_progress_step(&pg, cfg, step, loss, lr, norm, tps, tokens_done, now);
            t_last = now;
            tokens_last = tokens_done;
        }
        if ((cfg->eval_every > 0 && step % cfg->eval_every == 0) || last) {
            if ((rc = train_evaluate(&t, &vloss, &vacc, err)))
                goto out_signals;
            log_eval(&t, step, vloss, vacc);
            train_progress_eval(&pg, step, vloss, vacc, tokens_done, now_seconds());
            res->final_val_loss = vloss;
            res->final_val_accuracy = vacc;
            t.last_val = vloss;
            t.last_acc = vacc;
            if ((rc = dist_agree(after_eval(&t, step, vloss, vacc, err), err)))
                goto out_signals;
        }
        if ((cfg->ckpt_every > 0 && step % cfg->ckpt_every == 0) || last || stop_signal || t.stopped_at == step) {
            /* rank 0 writes it; every rank knows its step, for the stop note */
            if ((rc = dist_agree(t.rank == 0 ? train_save_checkpoint(&t, step, err) : PR_OK, err)))
                goto out_signals;
        }
        if (stop_signal) {
            res->interrupted = 1;
            rc = pr_errorf(err, PR_ERR_INTERRUPTED, "interrupted by signal %d at step %lld; checkpoint saved to %s",
                           (int)stop_signal, (long long)step, t.ckpt_path);
            goto out_signals;
        }
        if (t.stopped_at == step)
            break;
    }
    if ((step == cfg->steps || t.stopped_at == step) && res->final_val_loss == 0.0) {
        res->final_val_loss = vloss;
        res->final_val_accuracy = vacc;
    }
    res->seconds = now_seconds() - t0;
    res->tokens_per_second = res->seconds > 0 ? (double)tokens_done / res->seconds : 0.0;
out_signals:
    train_progress_end_line(&pg);
    res->steps_done = step;
    sigaction(SIGINT, &old_int, NULL);
    sigaction(SIGTERM, &old_term, NULL);
out:
    if (rc == PR_OK || rc == PR_ERR_INTERRUPTED) {
        res->early_stopped = t.stopped_at;
        if (t.keep.on && t.keep.best_step >= 0) {
            res->best_step = t.keep.best_step;
            (t.keep.higher ? &res->best_val_accuracy : &res->best_val_loss)[0] = t.keep.best;
        }
        pr_error herr = {0};
        int hr = train_export_head(&t, &herr);
        if (hr && rc == PR_OK) {
            rc = hr;
            *err = herr;
        }
    }
    free(changed);
    trainer_free(&t);
    return rc;
}
