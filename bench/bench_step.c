/* peftref benchmark: one training step of a GPT-2-small-shaped model.
 *
 *   bench/bench_step [--warmup N] [--steps N] [--B N] [--T N] [--preset NAME]
 *                    [--rank R] [--mode lora|full] [--lr LR] [--torch-script PATH] [--no-torch]
 *                    [--raw-env]
 *
 * A step is: zero gradients, forward with targets (mean cross-entropy),
 * backward, and a plain SGD update (p -= lr * g) of every trainable tensor.
 * There is no other optimizer in the step.  Two modes:
 *
 *   lora-qkv  base frozen; a rank-R parallel low-rank branch on the fused QKV
 *             projection of every layer, y += (x.A).B * alpha/R, attached
 *             as a site hook at PR_SITE_QKV (LoRA, Hu et al. 2021, in its
 *             fused-projection form).  A is C x R, B is R x 3C; both start
 *             nonzero so every product does real work.
 *   full      full finetuning: every base tensor trainable.
 *
 * Each mode runs in its own forked child so that its peak resident set
 * (VmHWM) is its own; the child pipes its numbers back.  The parent does
 * no BLAS or OpenMP work itself (libgomp's pool does not survive fork).
 *
 * FLOP count (matmuls and attention only; LayerNorm, GELU, softmax and
 * cross-entropy are not counted), following the convention of Chowdhery et
 * al. 2022 (PaLM), Appendix B, with attention counted in full (T x T, not
 * the causal half):
 *   Nm      = L * (3C^2 + C^2 + 4C^2 + 4C^2) + V*C       matmul weights
 *   fwd     = 2 * Nm * B*T  +  4 * L * T^2 * C * B       (QK^T and att.V)
 *   full    = 3 * fwd                 backward = weight grads + input grads
 *   lora    = fwd                                         forward
 *           + 2 * Nm * B*T            input grads of every matmul
 *           + 8 * L * T^2 * C * B     attention backward (dQ, dK, dV, datt)
 *           + 24 * L * B*T * R * C    branch: fwd 8NRC, bwd 16NRC per layer
 */
#include "config.h"

#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cblas.h>
#include <omp.h>

#include "peftref/peftref.h"
#include "rng.h"
#include "runtime.h"

/* ---- options ------------------------------------------------------------ */

typedef struct bench_opts {
    int warmup, steps;
    int B, T, rank;
    const char *preset;
    const char *torch_script;
    int no_torch;
    int only_mode;      /* -1: both */
    int raw_env;        /* skip runtime_reexec_if_needed */
    float lr;           /* SGD learning rate */
} bench_opts;

/* What a child reports back through its pipe. */
typedef struct bench_result {
    int ok;
    double median_s, min_s;
    double tokens_per_s;
    double gflop, gflops;
    long peak_rss_kb;
    double loss_first, loss_last;
    long long trainable;
    char msg[PR_ERROR_MSG_MAX + 64];
} bench_result;

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double median(double *v, int n)
{
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

/* Peak resident set of this process in kB (VmHWM), -1 if unknown. */
static long peak_rss_kb(void)
{
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    long kb = -1;
    if (!f)
        return -1;
    while (fgets(line, sizeof line, f))
        if (sscanf(line, "VmHWM: %ld kB", &kb) == 1)
            break;
    fclose(f);
    return kb;
}

/* ---- the low-rank QKV branch (mode lora-qkv) ----------------------------- */

typedef struct lora_branch {
    int C, OC, r;
    float scale;        /* alpha / r */
    float *A, *dA;      /* (C, r) */
    float *Bm, *dB;     /* (r, OC) */
    float *xa;          /* (rows, r): x.A saved for backward */
    float *dxa;         /* (rows, r) scratch */
} lora_branch;

/* y (rows, OC; ld y_ld) += scale * (x . A) . B */
static int lora_forward(void *self, const pr_site_io *io, pr_error *err)
{
    lora_branch *b = self;
    (void)err;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, io->rows, b->r, b->C,
                1.0f, io->x, io->x_ld, b->A, b->r, 0.0f, b->xa, b->r);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, io->rows, b->OC, b->r,
                b->scale, b->xa, b->r, b->Bm, b->OC, 1.0f, io->y, io->y_ld);
    return PR_OK;
}

/* dB += scale * xa^T . dy;  dxa = scale * dy . B^T;
 * dA += x^T . dxa;          dx += dxa . A^T */
static int lora_backward(void *self, const pr_site_io *io, pr_error *err)
{
    lora_branch *b = self;
    (void)err;
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, b->r, b->OC, io->rows,
                b->scale, b->xa, b->r, io->dy, io->y_ld, 1.0f, b->dB, b->OC);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, io->rows, b->r, b->OC,
                b->scale, io->dy, io->y_ld, b->Bm, b->OC, 0.0f, b->dxa, b->r);
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, b->C, b->r, io->rows,
                1.0f, io->x, io->x_ld, b->dxa, b->r, 1.0f, b->dA, b->r);
    if (io->dx)
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, io->rows, b->C, b->r,
                    1.0f, b->dxa, b->r, b->A, b->r, 1.0f, io->dx, io->x_ld);
    return PR_OK;
}

static void lora_free(lora_branch *b)
{
    free(b->A); free(b->dA); free(b->Bm); free(b->dB); free(b->xa); free(b->dxa);
}

static int lora_init(lora_branch *b, int C, int OC, int r, int rows, pr_rng *rng)
{
    memset(b, 0, sizeof *b);
    b->C = C; b->OC = OC; b->r = r;
    b->scale = 16.0f / (float)r;           /* alpha = 16 */
    b->A = malloc(sizeof(float) * (size_t)C * r);
    b->dA = calloc((size_t)C * r, sizeof(float));
    b->Bm = malloc(sizeof(float) * (size_t)r * OC);
    b->dB = calloc((size_t)r * OC, sizeof(float));
    b->xa = malloc(sizeof(float) * (size_t)rows * r);
    b->dxa = malloc(sizeof(float) * (size_t)rows * r);
    if (!b->A || !b->dA || !b->Bm || !b->dB || !b->xa || !b->dxa)
        return -1;
    for (size_t i = 0; i < (size_t)C * r; i++)
        b->A[i] = rng_normal(rng) / sqrtf((float)C);
    for (size_t i = 0; i < (size_t)r * OC; i++)
        b->Bm[i] = 0.01f * rng_normal(rng);
    return 0;
}

static void sgd(float *p, const float *g, size_t n, float lr)
{
    for (size_t i = 0; i < n; i++)
        p[i] -= lr * g[i];
}

/* ---- one mode, run inside the child --------------------------------------- */

enum { MODE_LORA = 0, MODE_FULL = 1 };
static const char *const mode_names[] = { "lora-qkv r8", "full" };

static double mode_gflop(const pr_model_config *c, int mode, int B, int T, int r)
{
    double L = c->n_layers, C = c->d_model, V = c->vocab_size;
    double N = (double)B * T;
    double nm = L * 12.0 * C * C + V * C;
    double attn = 4.0 * L * (double)T * T * C * B;
    double fwd = 2.0 * nm * N + attn;
    if (mode == MODE_FULL)
        return 3.0 * fwd * 1e-9;
    return (fwd + 2.0 * nm * N + 2.0 * attn + 24.0 * L * N * r * C) * 1e-9;
}

static void run_mode(const bench_opts *o, int mode, bench_result *res)
{
    pr_error err = { 0 };
    pr_model_config cfg;
    pr_model *m = NULL;
    lora_branch *br = NULL;
    int *tokens = NULL, *targets = NULL;
    double *times = NULL;
    int L = 0;
    const float lr = o->lr;

    memset(res, 0, sizeof *res);
    if (pr_config_preset(o->preset, &cfg) != PR_OK) {
        snprintf(res->msg, sizeof res->msg, "unknown preset %s", o->preset);
        return;
    }
    if (pr_model_create(&cfg, &m, &err) != PR_OK ||
        pr_model_reserve(m, o->B, o->T, &err) != PR_OK) {
        snprintf(res->msg, sizeof res->msg, "%s", err.msg);
        goto done;
    }
    L = cfg.n_layers;

    pr_rng rng;
    rng_seed(&rng, 1234);
    size_t n = (size_t)o->B * o->T;
    tokens = malloc(n * sizeof(int));
    targets = malloc(n * sizeof(int));
    times = malloc((size_t)o->steps * sizeof(double));
    if (!tokens || !targets || !times) {
        snprintf(res->msg, sizeof res->msg, "out of memory");
        goto done;
    }
    for (size_t i = 0; i < n; i++) {
        tokens[i] = (int)(rng_next(&rng) % (uint64_t)cfg.vocab_size);
        targets[i] = (int)(rng_next(&rng) % (uint64_t)cfg.vocab_size);
    }

    if (mode == MODE_FULL) {
        if (pr_model_set_trainable(m, "*", 1, &err) != PR_OK) {
            snprintf(res->msg, sizeof res->msg, "%s", err.msg);
            goto done;
        }
        res->trainable = pr_model_param_count(m);
    } else {
        int d_in = 0, d_out = 0;
        if (pr_model_site_dims(m, PR_SITE_QKV, &d_in, &d_out) != 0 || d_in <= 0) {
            snprintf(res->msg, sizeof res->msg, "model has no qkv site");
            goto done;
        }
        br = calloc((size_t)L, sizeof *br);
        if (!br) {
            snprintf(res->msg, sizeof res->msg, "out of memory");
            goto done;
        }
        for (int l = 0; l < L; l++) {
            if (lora_init(&br[l], d_in, d_out, o->rank, (int)n, &rng) != 0) {
                snprintf(res->msg, sizeof res->msg, "out of memory");
                goto done;
            }
            pr_site_hook h = { .forward = lora_forward, .backward = lora_backward,
                               .self = &br[l], .reserve = NULL };
            if (pr_model_attach_hook(m, PR_SITE_QKV, l, &h, &err) != PR_OK) {
                snprintf(res->msg, sizeof res->msg, "%s", err.msg);
                goto done;
            }
            res->trainable += (long long)o->rank * (d_in + d_out);
        }
    }

    pr_batch batch = {.tokens = tokens, .targets = targets, .B = o->B, .T = o->T};
    int nt = pr_model_n_tensors(m);
    for (int s = 0; s < o->warmup + o->steps; s++) {
        float loss = 0.0f;
        double t0 = now_s();
        pr_model_zero_grad(m);
        for (int l = 0; br && l < L; l++) {
            memset(br[l].dA, 0, sizeof(float) * (size_t)br[l].C * br[l].r);
            memset(br[l].dB, 0, sizeof(float) * (size_t)br[l].r * br[l].OC);
        }
        if (pr_model_forward(m, &batch, &loss, &err) != PR_OK ||
            pr_model_backward(m, &err) != PR_OK) {
            snprintf(res->msg, sizeof res->msg, "%s", err.msg);
            goto done;
        }
        if (mode == MODE_FULL) {
            for (int i = 0; i < nt; i++) {
                const pr_tensor_info *ti = pr_model_tensor(m, i);
                if (ti->grad)
                    sgd(ti->data, ti->grad, (size_t)ti->numel, lr);
            }
        } else {
            for (int l = 0; l < L; l++) {
                sgd(br[l].A, br[l].dA, (size_t)br[l].C * br[l].r, lr);
                sgd(br[l].Bm, br[l].dB, (size_t)br[l].r * br[l].OC, lr);
            }
        }
        double dt = now_s() - t0;
        if (s == 0)
            res->loss_first = loss;
        res->loss_last = loss;
        if (s >= o->warmup)
            times[s - o->warmup] = dt;
    }
    res->min_s = times[0];
    for (int s = 1; s < o->steps; s++)
        if (times[s] < res->min_s)
            res->min_s = times[s];
    res->median_s = median(times, o->steps);
    res->tokens_per_s = (double)n / res->median_s;
    res->gflop = mode_gflop(&cfg, mode, o->B, o->T, o->rank);
    res->gflops = res->gflop / res->median_s;
    res->ok = 1;
done:
    for (int l = 0; br && l < L; l++)
        lora_free(&br[l]);
    free(br);
    free(tokens);
    free(targets);
    free(times);
    pr_model_free(m);
    res->peak_rss_kb = peak_rss_kb();
}

/* ---- raw sgemm speed -------------------------------------------------------- */

typedef struct gemm_result { double gflops[2]; } gemm_result;

static double sgemm_gflops(int M, int K, int N, int reps)
{
    float *a = malloc(sizeof(float) * (size_t)M * K);
    float *b = malloc(sizeof(float) * (size_t)K * N);
    float *c = malloc(sizeof(float) * (size_t)M * N);
    double *t = malloc(sizeof(double) * (size_t)reps);
    double g = 0.0;
    if (!a || !b || !c || !t)
        goto out;
    for (size_t i = 0; i < (size_t)M * K; i++)
        a[i] = (float)(i % 7) * 0.1f - 0.3f;
    for (size_t i = 0; i < (size_t)K * N; i++)
        b[i] = (float)(i % 5) * 0.1f - 0.2f;
    for (int r = -1; r < reps; r++) {
        double t0 = now_s();
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, M, N, K,
                    1.0f, a, K, b, N, 0.0f, c, N);
        if (r >= 0)
            t[r] = now_s() - t0;
    }
    g = 2.0 * M * K * N * 1e-9 / median(t, reps);
out:
    free(a); free(b); free(c); free(t);
    return g;
}

/* ---- fork plumbing ------------------------------------------------------------ */

/* Run fn in a child; copy its result (size bytes) back through a pipe. */
static int in_child(void (*fn)(const void *arg, void *out), const void *arg,
                    void *out, size_t size, long *child_rss_kb)
{
    int fd[2];
    if (pipe(fd) != 0)
        return -1;
    fflush(stdout);
    pid_t pid = fork();
    if (pid < 0) {
        close(fd[0]); close(fd[1]);
        return -1;
    }
    if (pid == 0) {
        close(fd[0]);
        char *buf = calloc(1, size + sizeof(long));
        fn(arg, buf);
        long rss = peak_rss_kb();
        memcpy(buf + size, &rss, sizeof rss);
        size_t done = 0, total = size + sizeof(long);
        while (done < total) {
            ssize_t w = write(fd[1], buf + done, total - done);
            if (w <= 0)
                _exit(2);
            done += (size_t)w;
        }
        _exit(0);
    }
    close(fd[1]);
    char *buf = calloc(1, size + sizeof(long));
    size_t got = 0, total = size + sizeof(long);
    while (buf && got < total) {
        ssize_t r = read(fd[0], buf + got, total - got);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            break;
        got += (size_t)r;
    }
    close(fd[0]);
    int status = 0;
    waitpid(pid, &status, 0);
    if (!buf || got != total) {
        free(buf);
        return -1;
    }
    memcpy(out, buf, size);
    if (child_rss_kb)
        memcpy(child_rss_kb, buf + size, sizeof(long));
    free(buf);
    return 0;
}

static void child_gemm(const void *arg, void *out)
{
    (void)arg;
    gemm_result *g = out;
    g->gflops[0] = sgemm_gflops(1024, 1024, 1024, 10);
    g->gflops[1] = sgemm_gflops(1024, 768, 2304, 10);   /* (B*T) x C -> 3C */
}

typedef struct mode_arg { const bench_opts *o; int mode; } mode_arg;

static void child_mode(const void *arg, void *out)
{
    const mode_arg *ma = arg;
    run_mode(ma->o, ma->mode, out);
}

/* ---- the PyTorch comparison ---------------------------------------------------- */

static void run_torch(const bench_opts *o)
{
    static const char *const pythons[] = { "python3", "/usr/bin/python3" };
    const char *py = getenv("PYTHON");
    char cmd[1024];

    if (o->no_torch) {
        printf("torch: skipped (--no-torch)\n");
        return;
    }
    if (!o->torch_script || access(o->torch_script, R_OK) != 0) {
        printf("torch: skipped (no torch_step.py given; use --torch-script PATH)\n");
        return;
    }
    if (!py) {
        for (size_t i = 0; i < sizeof pythons / sizeof *pythons; i++) {
            snprintf(cmd, sizeof cmd, "%s -c 'import torch' >/dev/null 2>&1", pythons[i]);
            if (system(cmd) == 0) {
                py = pythons[i];
                break;
            }
        }
    } else {
        snprintf(cmd, sizeof cmd, "%s -c 'import torch' >/dev/null 2>&1", py);
        if (system(cmd) != 0)
            py = NULL;
    }
    if (!py) {
        printf("torch: skipped (no python3 that can import torch)\n");
        return;
    }
    snprintf(cmd, sizeof cmd, "%s %s --warmup %d --steps %d --B %d --T %d --rank %d",
             py, o->torch_script, o->warmup, o->steps, o->B, o->T, o->rank);
    fflush(stdout);
    int rc = system(cmd);
    if (rc != 0)
        printf("torch: %s exited with status %d\n", o->torch_script, rc);
}

/* ---- main ------------------------------------------------------------------------ */

static int parse_int(const char *s, int lo, int *out)
{
    char *end;
    long v = strtol(s, &end, 10);
    if (*s == '\0' || *end != '\0' || v < lo || v > 1 << 20)
        return -1;
    *out = (int)v;
    return 0;
}

static void usage(void)
{
    fprintf(stderr, "usage: bench_step [--warmup N] [--steps N] [--B N] [--T N] [--rank R]\n"
                    "                  [--preset NAME] [--mode lora|full] [--lr LR] [--torch-script PATH]\n"
                    "                  [--no-torch] [--raw-env]\n");
}

int main(int argc, char **argv)
{
    bench_opts o = { 1, 3, 4, 256, 8, "gpt2-small", NULL, 0, -1, 0, 1e-4f };
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        int bad = 0;
        if (!strcmp(a, "--no-torch")) { o.no_torch = 1; continue; }
        if (!strcmp(a, "--raw-env")) { o.raw_env = 1; continue; }
        if (!v) { usage(); return 2; }
        if (!strcmp(a, "--warmup")) bad = parse_int(v, 0, &o.warmup);
        else if (!strcmp(a, "--steps")) bad = parse_int(v, 1, &o.steps);
        else if (!strcmp(a, "--B")) bad = parse_int(v, 1, &o.B);
        else if (!strcmp(a, "--T")) bad = parse_int(v, 1, &o.T);
        else if (!strcmp(a, "--rank")) bad = parse_int(v, 1, &o.rank);
        else if (!strcmp(a, "--preset")) o.preset = v;
        else if (!strcmp(a, "--lr")) {
            char *end;
            o.lr = strtof(v, &end);
            bad = *end != '\0' || !(o.lr >= 0.0f);
        }
        else if (!strcmp(a, "--mode")) {
            if (!strcmp(v, "lora")) o.only_mode = MODE_LORA;
            else if (!strcmp(v, "full")) o.only_mode = MODE_FULL;
            else bad = -1;
        }
        else if (!strcmp(a, "--torch-script")) o.torch_script = v;
        else { usage(); return 2; }
        if (bad) { usage(); return 2; }
        i++;
    }

    /* Measure what the peftref program runs with: the same runtime policy
     * (OMP_WAIT_POLICY=passive unless set; a real OpenBLAS kernel set when
     * it fell back to a generic one), applied by re-executing once.
     * --raw-env measures the environment exactly as given. */
    if (!o.raw_env)
        runtime_reexec_if_needed(argv);

    const char *ct = getenv("OPENBLAS_CORETYPE");
    const char *wp = getenv("OMP_WAIT_POLICY");
    const char *on = getenv("OMP_NUM_THREADS");
    const char *bn = getenv("OPENBLAS_NUM_THREADS");
    printf("peftref %s bench: %s, B=%d T=%d, %d warm-up + %d timed steps (median)\n",
           pr_version(), o.preset, o.B, o.T, o.warmup, o.steps);
    printf("step = zero grads + forward + backward + SGD update of trainable tensors\n");
    printf("blas: OpenBLAS core %s, %d threads | omp: %d threads\n",
           openblas_get_corename(), openblas_get_num_threads(), omp_get_max_threads());
    printf("env:  OPENBLAS_CORETYPE=%s OMP_WAIT_POLICY=%s OMP_NUM_THREADS=%s "
           "OPENBLAS_NUM_THREADS=%s%s\n\n",
           ct ? ct : "(unset)", wp ? wp : "(unset)", on ? on : "(unset)", bn ? bn : "(unset)",
           getenv("PEFTREF_RUNTIME_SET") ? " (runtime policy applied)" :
           o.raw_env ? " (--raw-env)" : "");

    gemm_result g = { { 0, 0 } };
    if (in_child(child_gemm, NULL, &g, sizeof g, NULL) == 0) {
        printf("sgemm 1024x1024x1024            %8.1f GFLOP/s\n", g.gflops[0]);
        printf("sgemm 1024x768x2304 (qkv shape) %8.1f GFLOP/s\n\n", g.gflops[1]);
    } else {
        printf("sgemm: child failed\n\n");
    }

    printf("%-8s %-12s %12s %10s %10s %10s %10s %10s\n", "impl", "mode", "trainable",
           "step ms", "min ms", "tok/s", "GFLOP/s", "peak MiB");
    int failed = 0;
    char notes[2][160];
    notes[0][0] = notes[1][0] = '\0';
    for (int mode = 0; mode < 2; mode++) {
        if (o.only_mode >= 0 && mode != o.only_mode)
            continue;
        bench_result r;
        mode_arg ma = { &o, mode };
        memset(&r, 0, sizeof r);
        if (in_child(child_mode, &ma, &r, sizeof r, NULL) != 0) {
            printf("%-8s %-12s child failed\n", "peftref", mode_names[mode]);
            failed = 1;
            continue;
        }
        if (!r.ok) {
            printf("%-8s %-12s error: %s\n", "peftref", mode_names[mode], r.msg);
            failed = 1;
            continue;
        }
        printf("%-8s %-12s %12lld %10.1f %10.1f %10.0f %10.1f %10.0f\n", "peftref",
               mode_names[mode], r.trainable, 1e3 * r.median_s, 1e3 * r.min_s,
               r.tokens_per_s, r.gflops, (double)r.peak_rss_kb / 1024.0);
        snprintf(notes[mode], sizeof notes[mode], "  peftref %s: %.1f GFLOP per step; "
                 "loss %.4f -> %.4f\n", mode_names[mode], r.gflop, r.loss_first, r.loss_last);
    }
    fflush(stdout);
    run_torch(&o);
    printf("%s%s", notes[0], notes[1]);
    return failed;
}
