/* peftref compare: train several pipelines, or the arms of one pipeline's
 * compare section, each in its own child process, on the same data with
 * the same seed and budget, and print the PEFT-Ref comparison table.
 *
 * A child process per arm isolates the arms from one another (a crash or
 * a NaN fails that arm only) and makes peak memory a per-arm number: the
 * child reads its own high-water mark (VmHWM, /proc/self/status) when its
 * training ends and sends it back with the training result, one JSON
 * object over a pipe.  The parent runs nothing heavy itself: it checks the
 * pipelines, plans them (parameter counts, inference overhead), forks, and
 * reads each arm's validation-loss curve from its metrics.jsonl; both
 * sides of the fork are core/cli/compare_run.c's. */
#include "config.h"

#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <math.h>
#include <signal.h>
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

static const char compare_usage[] =
    "usage: peftref compare PIPELINE.yaml [PIPELINE.yaml ...] [--set KEY=VALUE ...] [--seeds N]\n"
    "                       [--format text|markdown|csv|json] [--wide] [--out DIR [--resume|--force]]\n"
    "                       [--progress MODE] [--quiet]\n"
    "\n"
    "Train every arm on the same data with the same seed and budget, each run in\n"
    "its own process, evaluate the untrained base model once, and print one row\n"
    "per arm.  The arms are the entries of one pipeline's compare section, or the\n"
    "pipelines given (each one arm, or its own arms when it has a compare section);\n"
    "pipelines given together must agree on the model, data, seed and budget.\n"
    "With seeds (compare.seeds, --seeds) each arm trains N times, seed i being\n"
    "train.seed + 1000003*i, and its figures are mean ± sample sd over the N; an\n"
    "arm with a sweep (sweep: {train.lr: [...]}) shows its best setting on\n"
    "validation, its full sweep in DIR/sweeps/ARM.{md,csv,json}.\n"
    "\n"
    "Columns (the text table shows the first eight; --wide, markdown, csv and\n"
    "json all of them):\n"
    "  arm                 the arm's name (its setting below it for a sweep)\n"
    "  trainable           parameters the optimizer updated\n"
    "  trainable%          100 * trainable / all parameters (base, modules, head)\n"
    "  peak MiB            the arm's process's peak resident memory (VmHWM)\n"
    "  tokens/s            real tokens trained per second of training steps\n"
    "                      (forward, backward, update; evaluations excluded)\n"
    "  +FLOP/tok           extra floating-point operations per token at inference,\n"
    "                      modules unmerged (>= a lower bound; \"+N pos\": extra positions)\n"
    "  val loss            final validation loss\n"
    "  val ppl / val acc   exp(val loss), or classification accuracy\n"
    "  techniques          (--wide) the arm's techniques\n"
    "  ms/step             (--wide) milliseconds per optimizer step, same clock\n"
    "  +positions          (--wide) sequence positions the modules add\n"
    "  +FLOP/tok (merged)  (--wide) the extra FLOP left once mergeable modules are\n"
    "                      merged into the weights\n"
    "  status              (--wide) ok, or failed: REASON\n"
    "docs/pipeline.md, \"Compare arms\", says how each is measured.\n"
    "\n"
    "  --set KEY=VALUE   override a value in every pipeline (as peftref train)\n"
    "  --seeds N         train each arm N times (overrides compare.seeds)\n"
    "  --format F        text (aligned, the default), markdown, csv or json\n"
    "  --wide            text: every column\n"
    "  --out DIR         write DIR/table.{txt,md,csv,json}, DIR/table_wide.txt and\n"
    "                    DIR/curves.svg; runs train in DIR/arms/NAME.  A DIR holding\n"
    "                    an earlier comparison needs --resume or --force.  Without\n"
    "                    --out they train in a temporary directory\n"
    "  --resume          continue the comparison in DIR: finished runs whose pipeline,\n"
    "                    data and program are unchanged are reused, unfinished ones\n"
    "                    continue from their checkpoints\n"
    "  --force           start afresh in DIR (its earlier runs are removed)\n"
    "  --progress MODE   each arm's training progress: auto (a bar when stderr is a\n"
    "                    terminal, else only the per-arm lines), bar, plain, none\n"
    "  --quiet           no progress on stderr at all\n"
    "  -h, --help        show this help\n"
    "\n"
    "MPI (docs/distributed.md): compare.mpi_ranks: N trains each arm with\n"
    "mpirun -np N peftref train (the launcher: mpirun, or $PEFTREF_MPIRUN);\n"
    "mpirun -np N peftref compare ... runs run r on rank r mod N, one process\n"
    "each, and rank 0 prints and writes the table.\n"
    "\n"
    "Arms that fail (a bad configuration, a NaN loss, a crash) are reported in\n"
    "the table with the reason; the others still run.  SIGINT or SIGTERM stops\n"
    "the run in flight at a checkpoint (then --resume continues it).\n"
    "Exit status: 0 every arm finished, 1 an arm failed or nothing could run,\n"
    "2 usage, 130 interrupted.\n";

static volatile sig_atomic_t interrupted;

int cmd_compare(int argc, char **argv)
{
    static const struct option opts[] = {
        { "set", required_argument, 0, 's' },      { "format", required_argument, 0, 'f' },
        { "out", required_argument, 0, 'o' },      { "progress", required_argument, 0, 'p' },
        { "quiet", no_argument, 0, 'q' },          { "help", no_argument, 0, 'h' },
        { "seeds", required_argument, 0, 'S' },    { "wide", no_argument, 0, 'w' },
        { "resume", no_argument, 0, 'r' },         { "force", no_argument, 0, 'F' },
        { 0, 0, 0, 0 }
    };
    /* room for the base row's two and a run's seed */
    const char **sets = calloc((size_t)argc + 4, sizeof *sets);
    if (!sets) {
        fprintf(stderr, "peftref compare: out of memory\n");
        return 1;
    }
    int n_sets = 0, fmt = COMPARE_TEXT, progress = PR_PROGRESS_AUTO, quiet = 0, c, seeds_opt = 0, wide = 0;
    int resume = 0, force = 0;
    const char *out = NULL;
    optind = 1;
    opterr = 0;
    while ((c = getopt_long(argc, argv, ":h", opts, NULL)) != -1) {
        switch (c) {
        case 's': sets[n_sets++] = optarg; break;
        case 'o': out = optarg; break;
        case 'q': quiet = 1; break;
        case 'w': wide = 1; break;
        case 'r': resume = 1; break;
        case 'F': force = 1; break;
        case 'S': {
            char *end;
            long v = strtol(optarg, &end, 10);
            if (*end || end == optarg || v < 1 || v > 100) {
                fprintf(stderr, "peftref compare: --seeds expects a whole number from 1 to 100, got '%s'\n", optarg);
                free(sets);
                return 2;
            }
            seeds_opt = (int)v;
            break;
        }
        case 'f':
            if ((fmt = compare_format_parse(optarg)) < 0) {
                fprintf(stderr, "peftref compare: --format expects text, markdown, csv or json, got '%s'\n", optarg);
                free(sets);
                return 2;
            }
            break;
        case 'p':
            if ((progress = pr_progress_parse(optarg)) < 0) {
                fprintf(stderr, "peftref compare: --progress expects auto, bar, plain or none, got '%s'\n", optarg);
                free(sets);
                return 2;
            }
            break;
        case 'h': fputs(compare_usage, stdout); free(sets); return 0;
        case ':':
            fprintf(stderr, "peftref compare: option '%s' needs a value\n", argv[optind - 1]);
            free(sets);
            return 2;
        default:
            fprintf(stderr, "peftref compare: unknown option '%s' (see peftref compare --help)\n", argv[optind - 1]);
            free(sets);
            return 2;
        }
    }
    int n_files = argc - optind;
    char **files = argv + optind;
    const char *usage_error = NULL;
    if (n_files < 1)
        usage_error = "expected one pipeline with a compare section, or several pipelines";
    else if (resume && force)
        usage_error = "--resume continues the comparison in --out, --force starts it afresh: give one";
    else if ((resume || force) && !out)
        usage_error = "--resume and --force apply to an --out directory";
    if (usage_error) {
        fprintf(stderr, "peftref compare: %s (see peftref compare --help)\n", usage_error);
        free(sets);
        return 2;
    }
    for (int i = 0; i < n_files; i++)
        if (!cli_is_pipeline(files[i])) {
            fprintf(stderr, "peftref compare: '%s' is not a pipeline file (.yaml or .yml)\n", files[i]);
            free(sets);
            return 2;
        }
    /* several ranks: every one looks before any creates a file */
    int agreed = 0, me = dist_rank(), n_ranks = dist_size();
    if (compare_collective(out && !resume && !force && compare_holds_comparison(out), &agreed)) {
        if (me == 0)
            fprintf(stderr, "peftref compare: %s holds an earlier comparison: add --resume to continue it (finished "
                    "runs are reused) or --force to start afresh, or choose another --out\n", out);
        free(sets);
        return 1;
    }
    /* loading and planning are every rank's, their messages rank 0's */
    int lquiet = quiet || me != 0;
    /* per-arm lines always (unless quiet); the training's own progress as asked */
    int child_progress = quiet ? PR_PROGRESS_NONE : progress;
    if (child_progress == PR_PROGRESS_AUTO)
        child_progress = isatty(STDERR_FILENO) ? PR_PROGRESS_BAR : PR_PROGRESS_NONE;

    pr_registry *reg = NULL;
    pr_error err = { 0 };
    if (pr_registry_open(NULL, &reg, &err)) {
        fprintf(stderr, "peftref compare: %s\n", err.msg);
        free(sets);
        return 1;
    }
    compare_list R;
    memset(&R, 0, sizeof R);
    compare_group *G = NULL;
    pr_pipeline *base_pipe = NULL;
    char *root = NULL, *arms_root = NULL;
    compare_row **unit_rows = NULL;   /* every run's row, in the order they run */
    int n_units = 0;
    int rc = compare_load_arms(&R, files, n_files, sets, n_sets, reg, lquiet);
    if (rc < 0)
        fprintf(stderr, "peftref compare: out of memory\n");
    if (rc)
        goto done;
    for (int i = 0; i < R.n_arms; i++)
        R.arms[i].row = &R.rows[i];
    if (me == 0)
        compare_warn_shadowed(&R, reg);
    R.rows[0].is_base = 1;
    snprintf(R.rows[0].techniques, sizeof R.rows[0].techniques, "none");

    /* same model, data, seed and budget as the first arm that loaded */
    const pr_pipeline *ref = NULL;
    for (int i = 1; i < R.n_arms; i++) {
        compare_arm *a = &R.arms[i];
        if (!a->pipe)
            continue;
        char why[600];
        if (!ref) {
            ref = a->pipe;
        } else if (compare_budget_differs(ref, a->pipe, why, sizeof why)) {
            snprintf(a->row->error, sizeof a->row->error, "not comparable: %s", why);
            pr_pipeline_free(a->pipe);
            a->pipe = NULL;
        }
    }
    if (!ref) {
        if (me == 0)
            fprintf(stderr, "peftref compare: no arm could be loaded\n");
        rc = 1;
        goto done;
    }
    /* the untrained base: the reference's file without modules, evaluated only */
    {
        const char **bsets = sets;
        bsets[n_sets] = "modules=[]";
        bsets[n_sets + 1] = "train.steps=0";
        compare_diags sink = { .quiet = lquiet };
        if (pr_pipeline_load_arm(pr_pipeline_path(ref), PR_PIPELINE_BASE, bsets, n_sets + 2, reg, &base_pipe,
                                 compare_collect, &sink, &err)) {
            compare_sink_finish(&sink, &err);
            snprintf(R.rows[0].error, sizeof R.rows[0].error, "%s", sink.text);
        }
        R.arms[0].pipe = base_pipe;
        R.arms[0].path = pr_pipeline_path(ref);
    }
    pr_train_config ref_tc;
    pr_pipeline_train_config(ref, &ref_tc);
    /* the reference may fail later and be freed: keep nothing that points into it */
    const char *task = ref_tc.task && !strcmp(ref_tc.task, "classification") ? "classification" : "lm";
    int cls = !strcmp(task, "classification");
    uint64_t train_seed = ref_tc.seed;
    int n_seeds = seeds_opt > 0 ? seeds_opt : pr_pipeline_compare_seeds(ref);
    /* compare.mpi_ranks > 1: each arm under its own mpirun, which needs MPI,
     * and is not nested in a compare whose ranks run the arms side by side */
    for (int i = 1; i < R.n_arms; i++) {
        const char *at = NULL;
        int k = R.arms[i].pipe ? pr_pipeline_compare_mpi_ranks(R.arms[i].pipe, &at) : 1;
        char why[600];
        if (k <= 1)
            continue;
        if (n_ranks > 1)
            snprintf(why, sizeof why, "this compare runs under mpirun with %d ranks, which train the arms side by "
                     "side, one process each: give compare.mpi_ranks: 1, or run peftref compare without mpirun",
                     n_ranks);
        else if (compare_mpi_available(why, sizeof why))
            continue;
        if (me == 0)
            fprintf(stderr, "%s: compare.mpi_ranks: %d trains each arm under mpirun -np %d, but %s\n",
                    at ? at : R.arms[i].path, k, k, why);
        rc = 1;
        goto done;
    }
    /* where the arms train: --out (shared by the ranks), else a temporary
     * directory of each rank's own */
    int st = 0;
    if (out) {
        if (compare_make_dirs(out) != 0) {
            fprintf(stderr, "peftref compare: cannot create %s: %s\n", out, strerror(errno));
            st = 1;
        }
        root = strdup(out);
    } else {
        const char *tmp = getenv("TMPDIR");
        char tmpl[4096];
        snprintf(tmpl, sizeof tmpl, "%s/peftref-compare-XXXXXX", tmp && *tmp ? tmp : "/tmp");
        root = mkdtemp(tmpl) ? strdup(tmpl) : NULL;
        if (!root) {
            fprintf(stderr, "peftref compare: cannot create a temporary directory: %s\n", strerror(errno));
            st = 1;
        }
    }
    arms_root = root ? fileio_join(root, "arms") : NULL;
    /* rank 0 clears and creates the shared directory, then the others create theirs */
    for (int turn = 0; turn < 2 && !rc; turn++) {
        if ((turn == 0) == (me == 0) || !out) {
            if (!st && arms_root && force && out)
                compare_remove_tree(arms_root);
            if (!st && (!arms_root || compare_make_dirs(arms_root) != 0)) {
                fprintf(stderr, "peftref compare: cannot create %s/arms: %s\n", root ? root : "?", strerror(errno));
                st = 1;
            }
        }
        if ((rc = compare_collective(st, &agreed)))
            goto done;
        if (!out)
            break;
    }
    /* plans and settings: every arm's runs, a setting of its sweep times a seed */
    int eval_every = ref_tc.eval_every > 0 ? ref_tc.eval_every : (ref_tc.steps >= 10 ? ref_tc.steps / 10 : 1);
    G = calloc((size_t)R.n_arms, sizeof *G);
    if (!G) {
        fprintf(stderr, "peftref compare: out of memory\n");
        rc = 1;
        goto done;
    }
    int n_runs = 0;
    for (int i = 0; i < R.n_arms; i++)
        if (R.arms[i].pipe)
            n_units += (R.rows[i].is_base || R.arms[i].arm_index < 0 ? 1 : pr_pipeline_arm_points(R.arms[i].pipe,
                        R.arms[i].arm_index)) * (R.rows[i].is_base ? 1 : n_seeds);
    unit_rows = calloc((size_t)n_units + 1, sizeof *unit_rows);
    if (!unit_rows) {
        fprintf(stderr, "peftref compare: out of memory\n");
        rc = 1;
        goto done;
    }
    int n_listed = 0;
    for (int i = 0; i < R.n_arms; i++) {
        compare_arm *a = &R.arms[i];
        compare_row *r = a->row;
        compare_group *g = &G[i];
        /* arm names become directory names */
        for (int j = 1; j < i; j++)
            if (!strcmp(R.rows[j].name, r->name)) {
                size_t l = strlen(r->name);
                snprintf(r->name + l, sizeof r->name - l, "_%d", i);
                break;
            }
        if (!a->pipe)
            continue;
        g->n_points = r->is_base || a->arm_index < 0 ? 1 : pr_pipeline_arm_points(a->pipe, a->arm_index);
        g->n_seeds = r->is_base ? 1 : n_seeds;
        int n = g->n_points * g->n_seeds;
        g->units = calloc((size_t)n, sizeof *g->units);
        g->rows = calloc((size_t)n, sizeof *g->rows);
        g->points = calloc((size_t)g->n_points, sizeof *g->points);
        if (!g->units || !g->rows || !g->points) {
            snprintf(r->error, sizeof r->error, "out of memory");
            continue;
        }
        compare_technique_list(a->pipe, r->techniques, sizeof r->techniques);
        if (r->is_base)
            snprintf(r->techniques, sizeof r->techniques, "none");
        for (int pt = 0; pt < g->n_points; pt++)
            for (int s = 0; s < g->n_seeds; s++) {
                compare_arm *u = &g->units[pt * g->n_seeds + s];
                compare_row *ur = &g->rows[pt * g->n_seeds + s];
                compare_empty_row(ur, r);
                u->row = ur;
                u->path = a->path;
                u->arm_index = a->arm_index;
                u->arm_point = pt;
                u->sets = sets;
                u->n_sets = n_sets;
                if (n > 1)
                    snprintf(u->seed_set, sizeof u->seed_set, "train.seed=%" PRIu64, compare_seed(train_seed, s));
                int unit = n_listed < n_units ? n_listed++ : n_units;
                unit_rows[unit] = ur;
                int mine = unit % n_ranks == me;
                if (n == 1) {
                    u->pipe = a->pipe;   /* lent: freed with the arm */
                } else {
                    char seed_set[64];
                    snprintf(seed_set, sizeof seed_set, "train.seed=%" PRIu64, compare_seed(train_seed, s));
                    sets[n_sets] = seed_set;
                    compare_diags sink = { .quiet = lquiet };
                    pr_error e = { 0 };
                    int lrc = a->arm_index < 0
                                  ? pr_pipeline_load_arm(a->path, PR_PIPELINE_BASE, sets, n_sets + 1, reg, &u->pipe,
                                                         compare_collect, &sink, &e)
                                  : pr_pipeline_load_arm_point(a->path, a->arm_index, pt, sets, n_sets + 1, reg,
                                                               &u->pipe, compare_collect, &sink, &e);
                    if (lrc) {
                        compare_sink_finish(&sink, &e);
                        snprintf(ur->error, sizeof ur->error, "%s", sink.text);
                        continue;
                    }
                }
                char *dir = r->is_base ? fileio_join(root, "base") : compare_unit_dir(arms_root, r->name, g, pt, s);
                u->mpi_ranks = r->is_base ? 1 : pr_pipeline_compare_mpi_ranks(u->pipe, NULL);
                u->arm_name = a->arm_index >= 0 ? pr_pipeline_arm(u->pipe) : NULL;
                if (compare_prepare_unit(u, r->is_base, eval_every, child_progress, resume, dir, mine) == 0)
                    n_runs++;
                else if (n == 1)
                    a->pipe = NULL;   /* freed by prepare_unit */
                free(dir);
            }
    }

    /* run: the base first, then every arm's runs, one process each */
    interrupted = 0;
    compare_signals_install(&interrupted);
    if (!quiet && me == 0) {
        runtime_warn_generic_blas();
        char line[256];
        runtime_describe(line, sizeof line);
        fprintf(stderr, "peftref compare: %d arm%s, %d steps each", R.n_arms - 1, R.n_arms == 2 ? "" : "s",
                ref_tc.steps);
        if (n_seeds > 1)
            fprintf(stderr, ", %d seeds", n_seeds);
        if (n_ranks > 1)
            fprintf(stderr, "; %d runs side by side on %d ranks (run r on rank r mod %d)", n_units, n_ranks, n_ranks);
        fprintf(stderr, "; %s\n", line);
    }
    double calib_lo = 0, calib_hi = 0;
    int unit = 0;
    for (int i = 0; i < R.n_arms; i++) {
        compare_arm *a = &R.arms[i];
        compare_row *r = a->row;
        compare_group *g = &G[i];
        int n = g->n_points * g->n_seeds;
        for (int k = 0; k < n && g->units; k++) {
            compare_arm *u = &g->units[k];
            compare_row *ur = u->row;
            if (unit++ % n_ranks != me)
                continue;   /* another rank's run */
            char label[700] = "";
            if (n_ranks > 1)
                snprintf(label, sizeof label, "rank %d: ", me);
            size_t lp = strlen(label);
            if (r->is_base)
                snprintf(label + lp, sizeof label - lp, "%s", r->name);
            else
                snprintf(label + lp, sizeof label - lp, "arm %d/%d: %s", i, R.n_arms - 1, r->name);
            if (g->n_points > 1) {
                size_t l = strlen(label);
                snprintf(label + l, sizeof label - l, " [%s]",
                         pr_pipeline_arm_point_label(a->pipe ? a->pipe : u->pipe, a->arm_index, k / g->n_seeds));
            }
            if (g->n_seeds > 1) {
                size_t l = strlen(label);
                snprintf(label + l, sizeof label - l, " seed %d/%d", k % g->n_seeds + 1, g->n_seeds);
            }
            if (interrupted) {
                if (!ur->error[0])
                    snprintf(ur->error, sizeof ur->error, "not run: interrupted");
                continue;
            }
            if (!u->pipe) {
                if (!quiet)
                    fprintf(stderr, "%s ... failed: %s\n", label, ur->error);
                continue;
            }
            if (!quiet)
                fprintf(stderr, "%s ...\n", label);
            ur->calib_seconds = compare_calibrate();
            if (compare_run_arm(u))
                interrupted = 1;
            if (r->is_base)
                ur->trainable = 0;   /* evaluated only (a classification head is counted, not trained) */
            else
                compare_read_curve(ur, u->out_dir);
            if (!quiet) {
                if (ur->ok && ur->reused)
                    fprintf(stderr, "%s ... finished earlier: reused\n", label);
                else if (ur->ok)
                    fprintf(stderr, "%s ... done in %.1f s\n", label, ur->seconds);
                else
                    fprintf(stderr, "%s ... failed in %.1f s: %s\n", label, ur->seconds, ur->error);
            }
        }
    }
    /* several ranks: the rows each filled travel to rank 0 */
    if (n_ranks > 1) {
        json_t *msg = json_object(), *list = json_array();
        for (int k = 0; msg && list && k < n_units; k++)
            if (k % n_ranks == me && unit_rows[k])
                json_array_append_new(list, compare_row_result_json(k, unit_rows[k]));
        char *text = NULL;
        if (msg && list) {
            json_object_set_new(msg, "interrupted", json_boolean(interrupted));
            json_object_set(msg, "rows", list);
            text = json_dumps(msg, JSON_COMPACT);
        }
        json_decref(list);
        json_decref(msg);
        char **all = NULL;
        pr_error e = { 0 };
        int grc = dist_gather_text(text ? text : "{}", &all, &e);
        free(text);
        if (grc)
            fprintf(stderr, "peftref compare: %s\n", e.msg);
        for (int q = 0; all && q < n_ranks; q++) {
            json_t *o = json_loads(all[q], 0, NULL);
            if (json_is_true(json_object_get(o, "interrupted")))
                interrupted = 1;
            const json_t *rows = json_object_get(o, "rows");
            for (size_t j = 0; j < json_array_size(rows); j++) {
                const json_t *ro = json_array_get(rows, j);
                int k = (int)compare_num_of(ro, "unit", -1);
                if (k >= 0 && k < n_units && k % n_ranks == q && unit_rows[k])
                    compare_row_result_read(unit_rows[k], ro);
            }
            json_decref(o);
            free(all[q]);
        }
        free(all);
        if ((rc = compare_collective(grc, &agreed)) || me != 0) {
            compare_signals_restore();
            goto done;   /* rank 0 alone aggregates and writes */
        }
        for (int k = 0; k < n_units; k++)
            if (unit_rows[k] && !unit_rows[k]->ok && !unit_rows[k]->error[0])
                snprintf(unit_rows[k]->error, sizeof unit_rows[k]->error, "rank %d sent no result", k % n_ranks);
    }
    for (int k = 0; k < n_units; k++) {
        const compare_row *ur = unit_rows[k];
        if (ur && ur->ok && !ur->reused && ur->steps_timed > 0) {
            if (calib_lo == 0 || ur->calib_seconds < calib_lo)
                calib_lo = ur->calib_seconds;
            if (ur->calib_seconds > calib_hi)
                calib_hi = ur->calib_seconds;
        }
    }
    for (int i = 0; i < R.n_arms; i++) {
        compare_arm *a = &R.arms[i];
        compare_row *r = a->row;
        compare_group *g = &G[i];
        /* per setting over its seeds, then the best setting as the arm's row */
        if (!g->units)
            continue;
        for (int pt = 0; pt < g->n_points; pt++) {
            compare_row *runs[128];
            int m = g->n_seeds < 128 ? g->n_seeds : 128;
            for (int s = 0; s < m; s++)
                runs[s] = &g->rows[pt * g->n_seeds + s];
            compare_empty_row(&g->points[pt], r);
            compare_aggregate(&g->points[pt], runs, m, cls);
        }
        g->best = compare_pick_best(g->points, g->n_points, cls);
        compare_row *chosen = &g->points[g->best >= 0 ? g->best : 0];
        char name[sizeof r->name];
        memcpy(name, r->name, sizeof name);
        free(r->curve);
        *r = *chosen;
        chosen->curve = NULL;
        chosen->n_curve = 0;
        memcpy(r->name, name, sizeof name);
        r->is_base = i == 0;
        if (g->n_points > 1) {
            const char *l = pr_pipeline_arm_point_label(a->pipe ? a->pipe : g->units[0].pipe, a->arm_index,
                                                        g->best >= 0 ? g->best : 0);
            snprintf(r->setting, sizeof r->setting, "%s", l ? l : "");
        }
        if (r->is_base)
            r->trainable = 0;
    }
    compare_signals_restore();

    /* the table */
    compare_table t = { .pipelines = (const char *const *)files, .n_pipelines = n_files, .task = task,
                        .steps = ref_tc.steps, .eval_every = eval_every, .rows = R.rows, .n_rows = R.n_arms,
                        .wide = wide, .seeds = n_seeds, .calib_lo = calib_lo, .calib_hi = calib_hi };
    char *text = compare_render(&t, fmt);
    if (!text) {
        fprintf(stderr, "peftref compare: out of memory\n");
        rc = 1;
        goto done;
    }
    fputs(text, stdout);
    free(text);
    if (fflush(stdout) != 0 || ferror(stdout)) {
        fprintf(stderr, "peftref compare: writing to standard output: %s\n", strerror(errno));
        rc = 1;
    }
    if (out) {
        static const char *const names[] = { "table.txt", "table.md", "table.csv", "table.json" };
        for (int f = 0; f < 4; f++) {
            t.wide = 0;
            char *s = compare_render(&t, f);
            if (!s || compare_write_file(out, names[f], s))
                rc = 1;
            free(s);
        }
        t.wide = 1;
        char *s = compare_render(&t, COMPARE_TEXT);
        if (!s || compare_write_file(out, "table_wide.txt", s))
            rc = 1;
        free(s);
        char *svg = compare_svg(&t);
        if (!svg || compare_write_file(out, "curves.svg", svg))
            rc = 1;
        free(svg);
        int sweeps = 0;
        for (int i = 1; i < R.n_arms; i++)
            if (G[i].n_points > 1 && G[i].points) {
                if (compare_write_sweep(out, &R.arms[i], &G[i], cls))
                    rc = 1;
                sweeps++;
            }
        if (!quiet && rc == 0)
            fprintf(stderr, "peftref compare: wrote %s/table.{txt,md,csv,json}, %s/table_wide.txt and %s/curves.svg%s\n",
                    out, out, out, sweeps ? " and the sweeps in sweeps/" : "");
    } else {
        for (int i = 1; i < R.n_arms; i++)
            if (G[i].n_points > 1 && !quiet)
                fprintf(stderr, "peftref compare: %s: chose %s on validation (with --out, its sweep is written to "
                        "OUT/sweeps/)\n", R.rows[i].name, R.rows[i].setting);
    }
    for (int i = 0; i < R.n_arms; i++)
        if (!R.rows[i].ok)
            rc = rc ? rc : 1;
    if (interrupted) {
        rc = 130;
        if (out) {
            fprintf(stderr, "peftref compare: interrupted; the run in flight saved its checkpoint. Continue with:\n"
                    "  peftref compare");
            for (int i = 0; i < n_files; i++)
                fprintf(stderr, " %s", files[i]);
            for (int i = 0; i < n_sets; i++)
                fprintf(stderr, " --set '%s'", sets[i]);
            if (seeds_opt)
                fprintf(stderr, " --seeds %d", seeds_opt);
            fprintf(stderr, " --out %s --resume\n", out);
        } else {
            fprintf(stderr, "peftref compare: interrupted; without --out nothing is kept to resume (give --out DIR "
                    "to make a comparison resumable)\n");
        }
    }
    (void)n_runs;
done:
    /* every rank ends with rank 0's status (an arm failed, interrupted) */
    if (n_ranks > 1 && !agreed)
        rc = compare_collective(rc, &agreed);
    if (root && !out)
        compare_remove_tree(root);
    free(unit_rows);
    free(root);
    free(arms_root);
    for (int i = 0; G && i < R.n_arms; i++) {
        int n = G[i].n_points * G[i].n_seeds;
        for (int k = 0; G[i].units && k < n; k++) {
            if (G[i].units[k].pipe != R.arms[i].pipe)
                pr_pipeline_free(G[i].units[k].pipe);
            free(G[i].units[k].out_dir);
            free(G[i].rows[k].curve);
        }
        for (int p = 0; G[i].points && p < G[i].n_points; p++)
            free(G[i].points[p].curve);
        free(G[i].units);
        free(G[i].rows);
        free(G[i].points);
    }
    free(G);
    for (int i = 0; i < R.n_arms; i++) {
        pr_pipeline_free(R.arms[i].pipe);
        free(R.arms[i].out_dir);
        free(R.rows[i].curve);
    }
    free(R.arms);
    free(R.rows);
    pr_registry_free(reg);
    free(sets);
    return rc;
}
