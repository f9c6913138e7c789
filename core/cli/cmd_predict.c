/* peftref predict, and peftref eval on a classification pipeline or run:
 * the task head's labels for JSONL records (include/peftref/head.h). */
#include "config.h"

#include <getopt.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "cli.h"
#include "fileio.h"

/* A JSON string. */
static void jstr(FILE *o, const char *s)
{
    fputc('"', o);
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\')
            fprintf(o, "\\%c", c);
        else if (c < 0x20)
            fprintf(o, "\\u%04x", c);
        else
            fputc(c, o);
    }
    fputc('"', o);
}

/* The pipeline's head, or a message saying why there is none. */
static const pr_head *head_of(const char *cmd, const char *arg, const pr_pipeline *p)
{
    const pr_head *h = pr_pipeline_head(p);
    if (!h)
        fprintf(stderr, "peftref %s: warning: %s names no classification head (task.head): a run saved before "
                "heads were saved with the modules keeps its head in checkpoint.safetensors only, so it would "
                "score with a fresh head; train it again to save modules/head.safetensors\n", cmd, arg);
    return h;
}

int cli_eval_classification(const char *arg, pr_pipeline *p, pr_model *m, pr_tokenizer *tok, const char *data,
                            int T, int batch, int json)
{
    const pr_head *h = head_of("eval", arg, p);
    if (!h)
        return 1;
    pr_train_config tc;
    pr_pipeline_train_config(p, &tc);
    pr_cls_predictions pred;
    pr_error err = {0};
    int rc = data ? pr_classify_file(m, tok, h, data, T, batch, 0, &pred, &err)
                  : pr_classify_split(m, tok, h, tc.train_path, tc.val_path, tc.val_fraction, tc.seed, T, batch,
                                      &pred, &err);
    if (rc) {
        fprintf(stderr, "peftref eval: %s\n", err.msg);
        return 1;
    }
    int K = h->n_labels;
    int *per = calloc(2 * (size_t)K, sizeof(int));
    if (!per) {
        pr_cls_predictions_free(&pred);
        fprintf(stderr, "peftref eval: out of memory\n");
        return 1;
    }
    pr_cls_scores s;
    pr_cls_score(&pred, &s, per, per + K);
    if (json) {
        printf("{\"loss\": %.9g, \"accuracy\": %.9g, \"macro_f1\": %.9g, \"n\": %d, \"per_class\": {", s.loss,
               s.accuracy, s.macro_f1, s.n);
        for (int k = 0; k < K; k++) {
            printf("%s", k ? ", " : "");
            jstr(stdout, h->labels[k]);
            printf(": {\"n\": %d, \"correct\": %d}", per[k], per[K + k]);
        }
        printf("}}\n");
    } else {
        printf("%s: %d examples  loss %.6f  accuracy %.4f  macro-F1 %.4f\n", data ? data : "validation split",
               s.n, s.loss, s.accuracy, s.macro_f1);
        for (int k = 0; k < K; k++)
            printf("  %-20s %6d / %-6d correct\n", h->labels[k], per[K + k], per[k]);
    }
    free(per);
    pr_cls_predictions_free(&pred);
    return 0;
}

static const char predict_usage[] =
    "usage: peftref predict RUN --data FILE.jsonl [--out FILE [--force]] [--batch N] [--set KEY=VALUE ...]\n"
    "\n"
    "Label JSON Lines records with a classification run's head.  RUN is a run\n"
    "directory (RUN/pipeline.yaml) or a pipeline naming task.head.  Each record\n"
    "is {\"text\": ...} (a \"label\" may be present and is ignored); one line\n"
    "  {\"label\": L, \"probs\": {LABEL: p, ...}}\n"
    "is written per record, in input order, L the most probable label (the first\n"
    "in label order on a tie), probabilities the softmax over the head's logits.\n"
    "\n"
    "  --data FILE     the records (JSON Lines); a bad record is named by file and line\n"
    "  --out FILE      write there (atomically) instead of standard output\n"
    "  --force         replace an existing --out FILE\n"
    "  --batch N       records per forward pass (default: the run's train.batch)\n"
    "  --set KEY=VALUE override a value of the pipeline\n"
    "  -h, --help      show this help\n";

int cmd_predict(int argc, char **argv)
{
    static const struct option opts[] = {{"data", required_argument, 0, 'd'}, {"out", required_argument, 0, 'o'},
                                         {"force", no_argument, 0, 'f'},      {"batch", required_argument, 0, 'b'},
                                         {"set", required_argument, 0, 'S'},  {"help", no_argument, 0, 'h'},
                                         {0, 0, 0, 0}};
    const char *data = NULL, *out = NULL, *sets[64];
    int force = 0, batch = 0, n_sets = 0, c;
    optind = 1;
    opterr = 0;
    while ((c = getopt_long(argc, argv, ":h", opts, NULL)) != -1) {
        switch (c) {
        case 'd': data = optarg; break;
        case 'o': out = optarg; break;
        case 'f': force = 1; break;
        case 'b': if (cli_parse_int("predict", "--batch", optarg, 1, 4096, &batch)) return 2; break;
        case 'S':
            if (n_sets == 64) {
                fprintf(stderr, "peftref predict: at most 64 --set options\n");
                return 2;
            }
            sets[n_sets++] = optarg;
            break;
        case 'h': fputs(predict_usage, stdout); return 0;
        case ':':
            fprintf(stderr, "peftref predict: option '%s' needs a value\n%s", argv[optind - 1], predict_usage);
            return 2;
        default:
            fprintf(stderr, "peftref predict: unknown option '%s'\n%s", argv[optind - 1], predict_usage);
            return 2;
        }
    }
    if (optind != argc - 1 || !data) {
        fprintf(stderr, "peftref predict: give one RUN and --data FILE\n%s", predict_usage);
        return 2;
    }
    const char *run = argv[optind];
    struct stat st;
    if (out && !force && stat(out, &st) == 0) {
        fprintf(stderr, "peftref predict: %s exists: replace it with --force, or choose another --out\n", out);
        return 1;
    }
    pr_registry *reg = NULL;
    pr_pipeline *p = NULL;
    pr_model *m = NULL;
    pr_tokenizer *tok = NULL;
    int rc = cli_pipeline_build("predict", run, sets, n_sets, &reg, &p, &m, &tok);
    const pr_head *h = rc ? NULL : head_of("predict", run, p);
    pr_cls_predictions pred = {0};
    pr_error err = {0};
    char *text = NULL;
    size_t len = 0;
    FILE *o = NULL;
    if (!h) {
        rc = 1;
        goto done;
    }
    pr_train_config tc;
    pr_pipeline_train_config(p, &tc);
    if (pr_classify_file(m, tok, h, data, tc.seq_len, batch ? batch : tc.batch, 1, &pred, &err)) {
        fprintf(stderr, "peftref predict: %s\n", err.msg);
        rc = 1;
        goto done;
    }
    o = out ? open_memstream(&text, &len) : stdout;
    if (!o) {
        fprintf(stderr, "peftref predict: out of memory\n");
        rc = 1;
        goto done;
    }
    int K = pred.K;
    for (int i = 0; i < pred.n; i++) {
        const float *pr = pred.probs + (size_t)i * K;
        int a = 0;
        for (int k = 1; k < K; k++)
            if (pr[k] > pr[a])
                a = k;
        fputs("{\"label\": ", o);
        jstr(o, h->labels[a]);
        fputs(", \"probs\": {", o);
        for (int k = 0; k < K; k++) {
            fputs(k ? ", " : "", o);
            jstr(o, h->labels[k]);
            fprintf(o, ": %.9g", (double)pr[k]);
        }
        fputs("}}\n", o);
    }
    rc = 0;
    if (out) {
        if (fclose(o) != 0 || fileio_write_atomic(out, text, len, &err)) {
            fprintf(stderr, "peftref predict: %s\n", err.msg[0] ? err.msg : "out of memory");
            rc = 1;
        }
    } else if (fflush(stdout) != 0) {
        rc = 1;
    }
done:
    free(text);
    pr_cls_predictions_free(&pred);
    pr_tokenizer_free(tok);
    pr_model_free(m);
    pr_pipeline_free(p);
    pr_registry_free(reg);
    return rc;
}
