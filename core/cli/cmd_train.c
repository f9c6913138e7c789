/* peftref train: train a model's tensors on text or JSONL data. */
#include "config.h"

#include <fnmatch.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "cli.h"
#include "compare.h"
#include "dist.h"
#include "fileio.h"
#include "loss_plot.h"
#include "runtime.h"

static const char train_usage[] =
    "usage: peftref train PIPELINE.yaml [--set KEY=VALUE ...] [--arm NAME [--arm-setting K]]\n"
    "                     [--resume [--resume-changed]] [--force] [--out DIR] [--result-json FILE]\n"
    "                     [--progress MODE] [--quiet]\n"
    "       peftref train (--model DIR | --preset NAME [model options]) --data FILE --out DIR\n"
    "                     [training options]\n"
    "\n"
    "With a pipeline (docs/pipeline.md): build its model, attach its modules\n"
    "with the base model frozen, print the trainable-parameter line, and train\n"
    "the modules (and any base tensors a selection technique chose) with the\n"
    "pipeline's settings.  --set overrides a value by its dotted path\n"
    "(train.steps=10, modules.0.options.r=4) before the pipeline is checked.\n"
    "A pipeline with a compare section trains one of its arms, --arm NAME,\n"
    "into train.output/NAME (peftref compare trains them all); --arm-setting K\n"
    "takes the K-th setting (0-based, the last key varying fastest) of its sweep.\n"
    "--out DIR trains into DIR in place of train.output (and an arm's /NAME).\n"
    "--result-json FILE: rank 0 writes the run's result there atomically when\n"
    "training ends (peftref compare's per-arm result: losses, accuracy,\n"
    "steps, tokens, step seconds, trainable count, rank 0's peak resident\n"
    "memory peak_kib and the sum over ranks peak_kib_all_ranks).\n"
    "Besides checkpoint.safetensors and metrics.jsonl, train.output gets\n"
    "modules/NAME.safetensors for every module not loaded frozen, pipeline.yaml\n"
    "(the run as a pipeline of frozen modules: peftref eval --pipeline RUN)\n"
    "and loss.svg (training and validation loss per step).\n"
    "\n"
    "Train the selected tensors of a model (default: all of them, i.e. full\n"
    "finetuning) with AdamW.  A checkpoint (trainable tensors, optimizer state,\n"
    "step, RNG and data position) is written atomically to DIR every\n"
    "--ckpt-every steps, at the end, and on SIGINT/SIGTERM; --resume continues\n"
    "from it.  Metrics go to DIR/metrics.jsonl.\n"
    "\n"
    "The output directory is locked while a run writes (DIR/.lock, the holder's\n"
    "pid and host: a second run into it is refused), temporary files of dead\n"
    "runs are removed on start, and on resume metrics.jsonl is cut back to the\n"
    "checkpoint's step.  --resume checks that the checkpoint was written with\n"
    "this run's settings (optimiser and schedule, steps, batch, data files'\n"
    "sizes and content hashes, base model fingerprint, modules and their\n"
    "options) and names every difference; a checkpoint at the last step is a\n"
    "finished run: nothing is trained or rewritten.  An earlier run in DIR\n"
    "without a checkpoint (its metrics, modules or pipeline.yaml) is replaced\n"
    "only with --force.\n"
    "\n"
    "Under mpirun -np N (docs/distributed.md) the N ranks split every batch\n"
    "(train.batch is the global batch, a multiple of N) and sum their gradients\n"
    "with one all-reduce a step; the losses are one process's, and rank 0 alone\n"
    "writes and prints.\n"
    "\n"
    "model:\n"
    "  --model DIR          Hugging Face directory (GPT-2, Llama, Mistral, Qwen2, Qwen3)\n"
    "  --preset NAME        built-in shape with seeded random init (gpt2-tiny, gpt2-small,\n"
    "                       gpt2-medium, gpt2-large, gpt2-xl, llama-tiny, smollm-135m,\n"
    "                       tinyllama-1.1b, llama-3.2-1b)\n"
    "  --init-seed N        seed of the preset's random init\n"
    "  --layers N --d-model N --heads N --d-ff N --max-seq N --vocab N\n"
    "                       inline overrides of the preset's dimensions\n"
    "  --tokenizer DIR      tokenizer directory for a preset whose vocabulary is not 256\n"
    "  --trainable LIST     comma-separated tensor names or globs to train\n"
    "                       (default '*'; e.g. '*.bias' or '*ln_*')\n"
    "data:\n"
    "  --data FILE          training data: text, or JSONL with text | prompt+completion |\n"
    "                       text+label records (see docs/data.md)\n"
    "  --val FILE           validation data (default: hold out --val-fraction of --data)\n"
    "  --val-fraction F     default 0.1\n"
    "  --format F           auto (default), text, jsonl\n"
    "  --task T             lm (default) or classification\n"
    "training:\n"
    "  --steps N            optimizer steps (default 100)\n"
    "  --batch N            sequences per micro-batch (default 8)\n"
    "  --seq-len T          positions per sequence (default 64)\n"
    "  --accum N            micro-batches per step (default 1)\n"
    "  --lr X               peak learning rate (default 1e-3)\n"
    "  --min-lr-ratio X     final lr as a fraction of the peak (default 0.1)\n"
    "  --warmup N           linear warmup steps (default 0)\n"
    "  --schedule S         cosine (default), linear, constant\n"
    "  --weight-decay X     AdamW decoupled decay on matrices (default 0.01)\n"
    "  --decay-all          also decay biases, norm gains and vectors\n"
    "  --clip X             global gradient-norm clip, 0 = off (default 1.0)\n"
    "  --seed N             data order and head init (default 1)\n"
    "  --eval-every N       steps between validations (default: only at the end)\n"
    "  --eval-batches N     validation batches per evaluation (default: all)\n"
    "  --log-every N        steps between log lines (default 10)\n"
    "  --ckpt-every N       steps between checkpoints (default: only at the end)\n"
    "  --out DIR            output directory (required)\n"
    "  --resume             continue from DIR/checkpoint.safetensors\n"
    "  --resume-changed     resume although settings differ from the checkpoint's\n"
    "                       (each change is recorded in metrics.jsonl)\n"
    "  --force              start afresh in a DIR holding an earlier run (its\n"
    "                       checkpoint is removed, its outputs replaced)\n"
    "  --save DIR           after training, write the model as a Hugging Face directory\n"
    "                       (one that already holds a model is refused before training\n"
    "                       unless --force)\n"
    "  --save-dtype T       weights stored by --save: f32 (default), f16, bf16\n"
    "  --progress MODE      auto (default): a bar redrawn in place when stderr is a\n"
    "                       terminal, log lines otherwise; bar, plain (log lines), none\n"
    "  --quiet              no progress lines (--progress none)\n"
    "  -h, --help           show this help\n"
    "\n"
    "Exit status: 0 done, 1 error (including a NaN loss), 2 usage, 130 interrupted.\n";

enum {
    O_MODEL = 256, O_PRESET, O_INIT_SEED, O_LAYERS, O_DMODEL, O_HEADS, O_DFF, O_MAXSEQ, O_VOCAB,
    O_TOKENIZER, O_TRAINABLE, O_DATA, O_VAL, O_VALFRAC, O_FORMAT, O_TASK, O_STEPS, O_BATCH,
    O_SEQLEN, O_ACCUM, O_LR, O_MINLR, O_WARMUP, O_SCHEDULE, O_WD, O_DECAYALL, O_CLIP, O_SEED,
    O_EVALEVERY, O_EVALBATCHES, O_LOGEVERY, O_CKPTEVERY, O_OUT, O_RESUME, O_SAVE, O_QUIET, O_PROGRESS,
    O_RESUME_CHANGED, O_FORCE
};

/* --progress MODE -> pr_progress, or -1 after a usage message. */
static int parse_progress(const char *s)
{
    int mode = pr_progress_parse(s);
    if (mode < 0)
        fprintf(stderr, "peftref train: --progress expects auto, bar, plain or none, got '%s'\n", s);
    return mode;
}

static int parse_float(const char *opt, const char *s, double lo, double hi, float *out)
{
    char *end = NULL;
    double v = strtod(s, &end);
    if (end == s || *end || !(v >= lo && v <= hi)) {
        fprintf(stderr, "peftref train: %s expects a number in [%g, %g], got '%s'\n", opt, lo, hi, s);
        return 2;
    }
    *out = (float)v;
    return 0;
}

/* Mark every tensor matching one of the comma-separated globs trainable. */
static int select_trainable(pr_model *m, const char *list, pr_error *err)
{
    char *copy = strdup(list);
    if (!copy)
        return pr_errorf(err, PR_ERR_NOMEM, "out of memory");
    int rc = PR_OK;
    for (char *save = NULL, *pat = strtok_r(copy, ",", &save); pat && !rc; pat = strtok_r(NULL, ",", &save)) {
        int hits = 0;
        for (int i = 0; i < pr_model_n_tensors(m) && !rc; i++) {
            const char *name = pr_model_tensor(m, i)->name;
            if (fnmatch(pat, name, 0) == 0) {
                rc = pr_model_set_trainable(m, name, 1, err);
                hits++;
            }
        }
        if (!rc && hits == 0)
            rc = pr_errorf(err, PR_ERR_NOTFOUND, "--trainable: '%s' matches no tensor (names look like "
                           "'h.0.attn.c_attn.weight', 'ln_f.bias', 'wte.weight')", pat);
    }
    free(copy);
    return rc;
}

/* Report a finished (or interrupted) run; returns the exit status. */
static int report_result(int trc, const pr_train_result *res, const pr_error *err, int quiet)
{
    if (dist_rank() != 0)   /* every rank has rank 0's result and message: it alone says them */
        return trc == PR_ERR_INTERRUPTED ? 130 : trc ? 1 : 0;
    if (trc == PR_ERR_INTERRUPTED) {
        fprintf(stderr, "peftref train: %s\n", err->msg);
        return 130;
    }
    if (trc) {
        fprintf(stderr, "peftref train: %s\n", err->msg);
        return 1;
    }
    if (res->complete) {
        fprintf(stderr, "peftref train: the run is complete (its checkpoint is at step %lld of %lld, train_loss "
                "%.6f, val_loss %.6f): nothing to do\n", (long long)res->steps_done, (long long)res->steps_done,
                res->final_train_loss, res->final_val_loss);
        return 0;
    }
    printf("steps %lld  train_loss %.6f -> %.6f  val_loss %.6f -> %.6f", (long long)res->steps_done,
           res->first_train_loss, res->final_train_loss, res->initial_val_loss, res->final_val_loss);
    if (res->final_val_accuracy >= 0)
        printf("  val_accuracy %.4f", res->final_val_accuracy);
    printf("\n");
    if (dist_size() > 1 && res->step_seconds > 0 && !quiet)
        fprintf(stderr, "peftref train: %d ranks: %.0f tokens/s; the gradient all-reduce took %.3f s of %.3f s "
                "in steps (%.1f%%)\n", dist_size(), (double)res->tokens_trained / res->step_seconds,
                res->allreduce_seconds, res->step_seconds, 100.0 * res->allreduce_seconds / res->step_seconds);
    return 0;
}

static void print_diag(void *arg, const char *line)
{
    (void)arg;
    fprintf(stderr, "%s\n", line);
}

/* --result-json FILE: every rank adds its peak memory to the sum, rank 0
 * writes the file (collective: every rank calls it with the agreed trc). */
static int write_result_json(const char *path, int trc, const pr_train_result *res, const pr_error *err)
{
    long peak = compare_peak_kib();
    double sum = (double)peak;
    pr_error e = { 0 };
    if (dist_sum_doubles(&sum, 1, &e)) {
        fprintf(stderr, "peftref train: --result-json: %s\n", e.msg);
        return 1;
    }
    if (dist_rank() != 0)
        return 0;
    char *s = compare_result_json(trc, trc ? err->msg : "", res, peak, dist_size(), sum);
    int rc = s ? fileio_write_atomic(path, s, strlen(s), &e) : (int)pr_errorf(&e, PR_ERR_NOMEM, "out of memory");
    free(s);
    if (rc)
        fprintf(stderr, "peftref train: --result-json %s: %s\n", path, e.msg);
    return rc ? 1 : 0;
}

/* What a pipeline run leaves in train.output besides checkpoint.safetensors
 * and metrics.jsonl: modules/NAME.safetensors, pipeline.yaml, loss.svg. */
static int save_outputs(const pr_pipeline *pipe, pr_model *m, const pr_train_config *tc, const pr_train_result *res)
{
    pr_error err = {0};
    char *metrics = fileio_join(tc->out_dir, "metrics.jsonl"), *svg = fileio_join(tc->out_dir, "loss.svg");
    char title[512];
    const char *base = strrchr(pr_pipeline_path(pipe), '/');
    snprintf(title, sizeof title, "%s: loss per step", base ? base + 1 : pr_pipeline_path(pipe));
    int rc = 0;
    if (!metrics || !svg)
        rc = pr_errorf(&err, PR_ERR_NOMEM, "out of memory");
    else if (pr_pipeline_save_run(pipe, m, res, &err) == PR_OK)
        rc = run_loss_svg(metrics, svg, title, &err);
    else
        rc = 1;
    if (rc)
        fprintf(stderr, "peftref train: %s\n", err.msg);
    else if (!tc->quiet)
        fprintf(stderr, "peftref train: wrote %s/modules, %s/pipeline.yaml and %s\n", tc->out_dir, tc->out_dir, svg);
    free(metrics);
    free(svg);
    return rc ? 1 : 0;
}

/* A finished run's outputs are current when pipeline.yaml and loss.svg (the
 * last written, after the modules) are not older than its checkpoint; if
 * they are missing or older, the run was stopped between its last
 * checkpoint and its outputs, which are then written from the checkpoint. */
/* --save DIR must not replace a model written before unless --force: say
 * so before training rather than after.  1 when DIR may be written. */
static int save_dir_free(const char *dir, int force)
{
    if (!dir || force)
        return 1;
    static const char *const files[] = { "model.safetensors", "model.safetensors.index.json", "config.json" };
    for (size_t i = 0; i < sizeof files / sizeof files[0]; i++) {
        char path[4096];
        struct stat st;
        snprintf(path, sizeof path, "%s/%s", dir, files[i]);
        if (stat(path, &st) == 0) {
            fprintf(stderr, "peftref train: --save %s already holds a model (%s): choose another directory, or "
                    "replace it with --force\n", dir, path);
            return 0;
        }
    }
    return 1;
}

static int outputs_current(const char *out)
{
    char *ck = fileio_join(out, "checkpoint.safetensors"), *py = fileio_join(out, "pipeline.yaml"),
         *svg = fileio_join(out, "loss.svg");
    struct stat a, b, c;
    int ok = ck && py && svg && stat(ck, &a) == 0 && stat(py, &b) == 0 && stat(svg, &c) == 0;
#define NOT_OLDER(x, y) ((x).st_mtim.tv_sec > (y).st_mtim.tv_sec || \
                         ((x).st_mtim.tv_sec == (y).st_mtim.tv_sec && (x).st_mtim.tv_nsec >= (y).st_mtim.tv_nsec))
    ok = ok && NOT_OLDER(b, a) && NOT_OLDER(c, a);
#undef NOT_OLDER
    free(ck);
    free(py);
    free(svg);
    return ok;
}

/* peftref train PIPELINE.yaml [--set KEY=VALUE ...] [--resume] [--quiet] [--save DIR] */
static int train_pipeline(int argc, char **argv)
{
    static const struct option opts[] = {
        {"set", required_argument, 0, 's'}, {"resume", no_argument, 0, 'r'},
        {"resume-changed", no_argument, 0, 'R'}, {"force", no_argument, 0, 'F'},
        {"quiet", no_argument, 0, 'q'}, {"save", required_argument, 0, 'S'},
        {"save-dtype", required_argument, 0, 'D'},
        {"progress", required_argument, 0, 'p'}, {"arm", required_argument, 0, 'a'},
        {"arm-setting", required_argument, 0, 'P'}, {"out", required_argument, 0, 'o'},
        {"result-json", required_argument, 0, 'J'},
        {"help", no_argument, 0, 'h'}, {0, 0, 0, 0}};
    const char *save_dir = NULL, *save_dtype = "f32", *out_dir = NULL, *result_json = NULL;
    int arm_setting = -1;
    const char **sets = calloc((size_t)argc + 1, sizeof *sets);
    if (!sets) {
        fprintf(stderr, "peftref train: out of memory\n");
        return 1;
    }
    int n_sets = 0, resume = 0, resume_changed = 0, force = 0, quiet = 0, progress = -1, c;
    const char *arm = NULL;
    optind = 1;
    opterr = 0;
    while ((c = getopt_long(argc, argv, ":h", opts, NULL)) != -1) {
        switch (c) {
        case 's': sets[n_sets++] = optarg; break;
        case 'r': resume = 1; break;
        case 'R': resume_changed = 1; break;
        case 'F': force = 1; break;
        case 'a': arm = optarg; break;
        case 'o': out_dir = optarg; break;
        case 'J': result_json = optarg; break;
        case 'P':
            if (cli_parse_int("train", "--arm-setting", optarg, 0, 1 << 20, &arm_setting)) {
                free(sets);
                return 2;
            }
            break;
        case 'q': quiet = 1; break;
        case 'S': save_dir = optarg; break;
        case 'D': save_dtype = optarg; break;
        case 'p':
            if ((progress = parse_progress(optarg)) < 0) {
                free(sets);
                return 2;
            }
            break;
        case 'h': fputs(train_usage, stdout); free(sets); return 0;
        case ':':
            fprintf(stderr, "peftref train: option '%s' needs a value\n", argv[optind - 1]);
            free(sets);
            return 2;
        default:
            fprintf(stderr, "peftref train: with a pipeline only --set, --arm, --arm-setting, --resume, --resume-changed, "
                    "--force, --out, --result-json, --progress, --quiet, --save and --save-dtype apply "
                    "(got '%s'; set other values in the YAML or with --set)\n", argv[optind - 1]);
            free(sets);
            return 2;
        }
    }
    if (argc - optind != 1) {
        fprintf(stderr, "peftref train: expected one pipeline file, got %d arguments\n", argc - optind);
        free(sets);
        return 2;
    }
    pr_registry *reg = NULL;
    pr_pipeline *pipe = NULL;
    pr_model *m = NULL;
    pr_tokenizer *tok = NULL;
    pr_error err = {0};
    if (arm_setting >= 0 && !arm) {
        fprintf(stderr, "peftref train: --arm-setting K picks a setting of an arm's sweep: give --arm NAME too\n");
        free(sets);
        return 2;
    }
    int rc = cli_pipeline_open_arm("train", argv[optind], sets, n_sets, arm, &reg, &pipe);
    if (rc == 0 && arm_setting >= 0) {
        int ai = pr_pipeline_find_arm(pipe, arm), np = pr_pipeline_arm_points(pipe, ai);
        if (arm_setting >= np) {
            fprintf(stderr, "peftref train: --arm-setting %d: arm %s has %d setting%s\n", arm_setting, arm, np,
                    np == 1 ? " (no sweep)" : "s");
            rc = 2;
        } else if (arm_setting > 0) {
            pr_pipeline_free(pipe);
            pipe = NULL;
            if (pr_pipeline_load_arm_point(argv[optind], ai, arm_setting, sets, n_sets, reg, &pipe, print_diag, NULL,
                                           &err)) {
                if (err.code != PR_ERR_INVALID)
                    fprintf(stderr, "peftref train: %s\n", err.msg);
                rc = 1;
            }
        }
    }
    if (rc == 0 && pr_pipeline_n_arms(pipe) > 0 && !pr_pipeline_arm(pipe)) {
        char names[512];
        cli_arm_list(pipe, names, sizeof names);
        fprintf(stderr, "peftref train: %s compares %d arms (%s): train one with --arm NAME, or all of them "
                "with peftref compare %s\n", argv[optind], pr_pipeline_n_arms(pipe), names, argv[optind]);
        rc = 2;
    }
    if (rc == 0 && out_dir && pr_pipeline_set_output(pipe, out_dir, &err)) {
        fprintf(stderr, "peftref train: %s\n", err.msg);
        rc = 1;
    }
    if (rc == 0)
        rc = cli_pipeline_print_counts("train", pipe, stdout);
    if (rc == 0) {
        fflush(stdout);
        runtime_warn_generic_blas();
        if (pr_pipeline_build(pipe, &m, &tok, &err)) {
            fprintf(stderr, "peftref train: %s\n", err.msg);
            rc = 1;
        }
    }
    if (rc == 0 && !save_dir_free(save_dir, force))
        rc = 1;
    if (rc == 0) {
        pr_train_config tc;
        pr_pipeline_train_config(pipe, &tc);
        tc.resume |= resume;
        tc.resume_changed |= resume_changed;
        tc.force |= force;
        tc.quiet |= quiet;
        if (progress >= 0)
            tc.progress = progress;
        if (!tc.quiet && tc.progress != PR_PROGRESS_NONE && dist_rank() == 0) {
            char line[256];
            runtime_describe_layout(line, sizeof line);
            fprintf(stderr, "peftref train: %s\n", line);
        }
        pr_train_result res;
        memset(&res, 0, sizeof res);
        /* held until the outputs are written, so no other run mixes files in */
        /* under MPI rank 0 alone writes: the lock, the outputs, --save */
        int rank0 = dist_rank() == 0;
        int trc = dist_agree(rank0 ? pr_train_lock(tc.out_dir, &err) : PR_OK, &err);
        if (trc == 0) {
            trc = pr_train(m, tok, &tc, &res, &err);
            rc = report_result(trc, &res, &err, tc.quiet);
            if (trc == 0 && rank0 && !(res.complete && outputs_current(tc.out_dir)))
                rc = save_outputs(pipe, m, &tc, &res);
            if (rank0)
                pr_train_unlock(tc.out_dir);
        } else {
            rc = report_result(trc, &res, &err, tc.quiet);
        }
        if (result_json && write_result_json(result_json, trc, &res, &err))
            rc = rc ? rc : 1;
        /* the base model as trained (full finetuning, selection), without modules */
        if (rc == 0 && save_dir && rank0 &&
            pr_model_save_hf_as(m, save_dir, pr_pipeline_tokenizer_dir(pipe), save_dtype, &err)) {
            fprintf(stderr, "peftref train: %s\n", err.msg);
            rc = 1;
        }
    }
    pr_tokenizer_free(tok);
    pr_model_free(m);
    pr_pipeline_free(pipe);
    pr_registry_free(reg);
    free(sets);
    return rc;
}

/* The first argument that is neither an option nor an option's value. */
static const char *first_operand(int argc, char **argv, const struct option *opts)
{
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--") == 0)
            return i + 1 < argc ? argv[i + 1] : NULL;
        if (a[0] != '-' || a[1] == '\0')
            return a;
        if (a[1] != '-' || strchr(a, '='))
            continue;
        if (strcmp(a + 2, "set") == 0) {
            i++;
            continue;
        }
        for (const struct option *o = opts; o->name; o++)
            if (strcmp(a + 2, o->name) == 0 && o->has_arg == required_argument) {
                i++;
                break;
            }
    }
    return NULL;
}

int cmd_train(int argc, char **argv)
{
    /* under MPI only rank 0 speaks on stdout (counts, the result line) */
    if (dist_rank() != 0 && !freopen("/dev/null", "w", stdout))
        return 1;
    static const struct option opts[] = {
        {"model", required_argument, 0, O_MODEL}, {"preset", required_argument, 0, O_PRESET},
        {"init-seed", required_argument, 0, O_INIT_SEED}, {"layers", required_argument, 0, O_LAYERS},
        {"d-model", required_argument, 0, O_DMODEL}, {"heads", required_argument, 0, O_HEADS},
        {"d-ff", required_argument, 0, O_DFF}, {"max-seq", required_argument, 0, O_MAXSEQ},
        {"vocab", required_argument, 0, O_VOCAB}, {"tokenizer", required_argument, 0, O_TOKENIZER},
        {"trainable", required_argument, 0, O_TRAINABLE}, {"data", required_argument, 0, O_DATA},
        {"val", required_argument, 0, O_VAL}, {"val-fraction", required_argument, 0, O_VALFRAC},
        {"format", required_argument, 0, O_FORMAT}, {"task", required_argument, 0, O_TASK},
        {"steps", required_argument, 0, O_STEPS}, {"batch", required_argument, 0, O_BATCH},
        {"seq-len", required_argument, 0, O_SEQLEN}, {"accum", required_argument, 0, O_ACCUM},
        {"lr", required_argument, 0, O_LR}, {"min-lr-ratio", required_argument, 0, O_MINLR},
        {"warmup", required_argument, 0, O_WARMUP}, {"schedule", required_argument, 0, O_SCHEDULE},
        {"weight-decay", required_argument, 0, O_WD}, {"decay-all", no_argument, 0, O_DECAYALL},
        {"clip", required_argument, 0, O_CLIP}, {"seed", required_argument, 0, O_SEED},
        {"eval-every", required_argument, 0, O_EVALEVERY}, {"eval-batches", required_argument, 0, O_EVALBATCHES},
        {"log-every", required_argument, 0, O_LOGEVERY}, {"ckpt-every", required_argument, 0, O_CKPTEVERY},
        {"out", required_argument, 0, O_OUT}, {"resume", no_argument, 0, O_RESUME},
        {"resume-changed", no_argument, 0, O_RESUME_CHANGED}, {"force", no_argument, 0, O_FORCE},
        {"save", required_argument, 0, O_SAVE}, {"quiet", no_argument, 0, O_QUIET},
        {"progress", required_argument, 0, O_PROGRESS},
        {"help", no_argument, 0, 'h'}, {0, 0, 0, 0}};
    if (cli_is_pipeline(first_operand(argc, argv, opts)))
        return train_pipeline(argc, argv);
    pr_train_config tc;
    pr_train_config_default(&tc);
    const char *model_dir = NULL, *preset = NULL, *tok_dir = NULL, *trainable = "*", *save_dir = NULL;
    int init_seed = -1, layers = 0, dmodel = 0, heads = 0, dff = 0, maxseq = 0, vocab = 0, seed = 1;
    float valfrac = 0.1f;
    const int big = 1 << 30;
    optind = 1;
    opterr = 0;
    int c;
#define INT_OPT(name, var, lo) \
    do { \
        if (cli_parse_int("train", name, optarg, lo, big, &(var))) \
            return 2; \
    } while (0); \
    break
#define FLT_OPT(name, var, lo, hi) \
    do { \
        if (parse_float(name, optarg, lo, hi, &(var))) \
            return 2; \
    } while (0); \
    break
    while ((c = getopt_long(argc, argv, ":h", opts, NULL)) != -1) {
        switch (c) {
        case O_MODEL: model_dir = optarg; break;
        case O_PRESET: preset = optarg; break;
        case O_INIT_SEED: INT_OPT("--init-seed", init_seed, 0);
        case O_LAYERS: INT_OPT("--layers", layers, 1);
        case O_DMODEL: INT_OPT("--d-model", dmodel, 1);
        case O_HEADS: INT_OPT("--heads", heads, 1);
        case O_DFF: INT_OPT("--d-ff", dff, 1);
        case O_MAXSEQ: INT_OPT("--max-seq", maxseq, 1);
        case O_VOCAB: INT_OPT("--vocab", vocab, 1);
        case O_TOKENIZER: tok_dir = optarg; break;
        case O_TRAINABLE: trainable = optarg; break;
        case O_DATA: tc.train_path = optarg; break;
        case O_VAL: tc.val_path = optarg; break;
        case O_VALFRAC: FLT_OPT("--val-fraction", valfrac, 0.0, 0.9);
        case O_FORMAT: tc.format = optarg; break;
        case O_TASK: tc.task = optarg; break;
        case O_STEPS: INT_OPT("--steps", tc.steps, 0);
        case O_BATCH: INT_OPT("--batch", tc.batch, 1);
        case O_SEQLEN: INT_OPT("--seq-len", tc.seq_len, 1);
        case O_ACCUM: INT_OPT("--accum", tc.accum, 1);
        case O_LR: FLT_OPT("--lr", tc.lr, 0.0, 10.0);
        case O_MINLR: FLT_OPT("--min-lr-ratio", tc.min_lr_ratio, 0.0, 1.0);
        case O_WARMUP: INT_OPT("--warmup", tc.warmup, 0);
        case O_SCHEDULE: tc.schedule = optarg; break;
        case O_WD: FLT_OPT("--weight-decay", tc.weight_decay, 0.0, 10.0);
        case O_DECAYALL: tc.decay_all = 1; break;
        case O_CLIP: FLT_OPT("--clip", tc.clip, 0.0, 1e9);
        case O_SEED: INT_OPT("--seed", seed, 0);
        case O_EVALEVERY: INT_OPT("--eval-every", tc.eval_every, 0);
        case O_EVALBATCHES: INT_OPT("--eval-batches", tc.eval_batches, 0);
        case O_LOGEVERY: INT_OPT("--log-every", tc.log_every, 0);
        case O_CKPTEVERY: INT_OPT("--ckpt-every", tc.ckpt_every, 0);
        case O_OUT: tc.out_dir = optarg; break;
        case O_RESUME: tc.resume = 1; break;
        case O_RESUME_CHANGED: tc.resume_changed = 1; break;
        case O_FORCE: tc.force = 1; break;
        case O_SAVE: save_dir = optarg; break;
        case O_QUIET: tc.quiet = 1; break;
        case O_PROGRESS:
            if ((tc.progress = parse_progress(optarg)) < 0)
                return 2;
            break;
        case 'h': fputs(train_usage, stdout); return 0;
        case ':':
            fprintf(stderr, "peftref train: option '%s' needs a value\n", argv[optind - 1]);
            return 2;
        default:
            fprintf(stderr, "peftref train: unknown option '%s' (see peftref train --help)\n", argv[optind - 1]);
            return 2;
        }
    }
#undef INT_OPT
#undef FLT_OPT
    tc.val_fraction = valfrac;
    tc.seed = (uint64_t)seed;
    if (optind < argc) {
        fprintf(stderr, "peftref train: unexpected argument '%s'\n", argv[optind]);
        return 2;
    }
    if (!!model_dir == !!preset) {
        fprintf(stderr, "peftref train: give exactly one of --model DIR or --preset NAME\n");
        return 2;
    }
    if (model_dir && (layers || dmodel || heads || dff || maxseq || vocab || init_seed >= 0)) {
        fprintf(stderr, "peftref train: dimension overrides and --init-seed apply to --preset only\n");
        return 2;
    }
    if (!tc.train_path || !tc.out_dir) {
        fprintf(stderr, "peftref train: --data FILE and --out DIR are required (see --help)\n");
        return 2;
    }
    runtime_warn_generic_blas();

    pr_error err = {0};
    pr_model *m = NULL;
    pr_tokenizer *tok = NULL;
    int rc = 1;
    if (model_dir) {
        if (pr_model_load_hf(model_dir, &m, &err))
            goto fail;
    } else {
        pr_model_config cfg;
        if (pr_config_preset(preset, &cfg) != PR_OK) {
            fprintf(stderr, "peftref train: unknown preset '%s' (known: %s)\n", preset, pr_config_preset_names());
            return 2;
        }
        if (layers) cfg.n_layers = layers;
        if (dmodel) cfg.d_model = dmodel;
        if (heads) cfg.n_heads = cfg.n_kv_heads = heads;
        if (dmodel || heads) cfg.d_head = cfg.d_model / cfg.n_heads;
        if (dff) cfg.d_ff = dff;
        else if (dmodel) cfg.d_ff = 4 * cfg.d_model;
        if (maxseq) cfg.max_seq = maxseq;
        if (vocab) cfg.vocab_size = vocab;
        if (init_seed >= 0) cfg.seed = (uint64_t)init_seed;
        if (pr_config_validate(&cfg, &err) || pr_model_create(&cfg, &m, &err))
            goto fail;
    }
    if (cli_load_tokenizer(model_dir ? model_dir : tok_dir, m, &tok, &err) ||
        select_trainable(m, trainable, &err))
        goto fail;
    if (!tc.quiet && tc.progress != PR_PROGRESS_NONE && dist_rank() == 0) {
        char line[256];
        runtime_describe_layout(line, sizeof line);
        int64_t n_tr = 0;
        for (int i = 0; i < pr_model_n_tensors(m); i++)
            if (pr_model_tensor(m, i)->trainable)
                n_tr += pr_model_tensor(m, i)->numel;
        fprintf(stderr, "peftref train: %lld of %lld parameters trainable; %s\n", (long long)n_tr,
                (long long)pr_model_param_count(m), line);
    }
    if (!save_dir_free(save_dir, tc.force)) {
        rc = 1;
        goto done;
    }
    pr_train_result res;
    int trc = pr_train(m, tok, &tc, &res, &err);
    if (trc) {
        rc = report_result(trc, &res, &err, tc.quiet);
        goto done;
    }
    report_result(trc, &res, &err, tc.quiet);
    if (save_dir && dist_rank() == 0 && pr_model_save_hf(m, save_dir, model_dir ? model_dir : tok_dir, &err))
        goto fail;
    rc = 0;
    goto done;
fail:
    fprintf(stderr, "peftref train: %s\n", err.msg);
done:
    pr_tokenizer_free(tok);
    pr_model_free(m);
    return rc;
}
