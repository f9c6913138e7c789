/* peftref benchmark: the real training path against PyTorch.
 *
 *   bench/bench_train --srcdir DIR --peftref PATH [--workdir DIR] [--quick]
 *                     [--python PATH] [--no-torch] [--only SUBSTRING] [--timeout S]
 *                     [--raw-env]
 *
 * For every workload of the table below it writes a pipeline, runs
 * `peftref train PIPELINE --force --progress none` as a child process and
 * reads the step times the trainer itself writes to train.output/metrics.jsonl
 * (each step line carries "seconds", the wall time since the first step
 * began, taken after the optimizer update; evaluations and checkpoints fall
 * outside the steps), so process start-up, model initialisation, the
 * evaluations and the checkpoint are not timed.  The same workload then runs
 * in PyTorch (bench/torch_train.py, float32 and again under
 * torch.autocast("cpu", dtype=torch.bfloat16)), each in its own process.
 * Peak resident sets are each child's ru_maxrss from wait4().
 *
 * Rows marked bf16 run peftref a second time with train.precision: bf16
 * (eval: --precision bf16).  Before/after rows (AB_SWITCHES) run peftref
 * twice with a change off and on: an environment switch set to 1 for the
 * before run and unset for the after run, or a train: key of the after
 * pipeline; a switch whose name is not in the peftref program, or a key
 * that `peftref plan` calls unknown, makes both cells "n/a: not in this
 * build".
 *
 * Evaluation rows run `peftref eval --pipeline P --json` twice, on a text of
 * B windows (one batch) and of B*(1+S) windows; the time of one batch is the
 * difference of the two runs' "seconds" divided by S (the mean of S batches;
 * start-up cancels).
 *
 * FLOPs (matmuls and attention scores only; norms, activations, softmax and
 * cross-entropy are not counted; attention counted in full T x T), with
 * N = B*T tokens, q = H*dh, kv = Hkv*dh:
 *   Nm   = L*(C*q + 2*C*kv + q*C + f*C*F) + V*C   weights in matmuls (f = 2 GELU, 3 SwiGLU;
 *                                                  the head counts once, tied or not)
 *   fwd  = 2*Nm*N + 4*L*T^2*q*B                   projections + QK^T and att.V
 *   full = 3*fwd                                  = 6*Nm*N + 12*L*T^2*q*B
 *   lora = fwd + 2*Nm*N + 8*L*T^2*q*B             frozen base: input gradients only
 *        + 6*N*r*sum(d_in + d_out)                 each adapted projection: 2Nr(d_in+d_out)
 *                                                  forward, 4Nr(d_in+d_out) backward
 *   eval = fwd + 2*N*r*sum(d_in + d_out)
 * The ceilings are the FLOP-weighted rates of the workload's forward
 * projection shapes ((N, d_in) x (d_in, d_out) for each projection and the
 * head): OpenBLAS cblas_sgemm measured here, and torch.matmul on bfloat16
 * tensors measured by torch_train.py ceiling.
 */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cblas.h>
#include <jansson.h>
#include <limits.h>

#include "peftref/peftref.h"
#include "runtime.h"

/* ---- the workloads ------------------------------------------------------- */

typedef enum { K_LORA, K_FULL, K_EVAL } work_kind;

/* Before/after pairs: the same workload run twice by peftref, once with a
 * change switched off ("before") and once as the build runs by default or
 * with a pipeline key ("after"); no PyTorch side. */
typedef enum { AB_NONE = 0, AB_SKIP_BACKWARD, AB_ATTN_FULL, AB_CE_FULL, AB_RECOMPUTE, N_AB } ab_kind;

typedef struct ab_switch {
    const char *env;          /* set to 1 for the before run, unset for the after run; NULL: none */
    const char *after_train;  /* a train: key of the after run's pipeline; NULL: none */
    const char *before_impl, *after_impl;   /* the impl column */
    const char *what;         /* the label's work part */
} ab_switch;

static const ab_switch AB_SWITCHES[N_AB] = {
    [AB_SKIP_BACKWARD] = { "PEFTREF_BACKWARD_ALL", NULL, "backward all blocks", "backward to lowest trainable",
                           "skip-backward" },
    [AB_ATTN_FULL] = { "PEFTREF_ATTN_FULL", NULL, "attention full TxT", "attention causal blocks", "causal-attn" },
    [AB_CE_FULL] = { "PEFTREF_CE_FULL", NULL, "cross-entropy full logits", "cross-entropy chunked", "ce-chunked" },
    [AB_RECOMPUTE] = { NULL, "recompute: true", "activations stored", "train.recompute: true", "recompute" },
};

typedef struct workload {
    const char *id;      /* directory name under --workdir */
    const char *group;   /* main, seq (sequence-length scaling), size (model scaling), llama, ab */
    const char *preset;  /* a built-in preset, as a pipeline's model.preset names it */
    work_kind kind;
    const char *sites;   /* peftref site names of the LoRA module */
    int rank;
    int B, T;
    int warmup, steps;   /* untimed and timed steps (eval: batches) */
    int bf16;            /* also run peftref with train.precision bf16 (eval: --precision bf16) */
    int top_layers;      /* LoRA on the top this many layers only; 0: every layer */
    ab_kind ab;          /* a before/after pair instead of peftref f32 against torch */
} workload;

static const workload WORKLOADS[] = {
    { "small-lora-T256", "main", "gpt2-small", K_LORA, "qkv", 8, 4, 256, 1, 3, 1, 0, AB_NONE },
    { "small-full-T256", "main", "gpt2-small", K_FULL, NULL, 0, 4, 256, 1, 3, 1, 0, AB_NONE },
    { "small-eval-T256", "main", "gpt2-small", K_EVAL, "qkv", 8, 4, 256, 1, 3, 1, 0, AB_NONE },
    { "small-lora-T128", "seq", "gpt2-small", K_LORA, "qkv", 8, 4, 128, 1, 2, 0, 0, AB_NONE },
    { "small-lora-T512", "seq", "gpt2-small", K_LORA, "qkv", 8, 4, 512, 1, 2, 0, 0, AB_NONE },
    { "small-lora-T1024", "seq", "gpt2-small", K_LORA, "qkv", 8, 4, 1024, 1, 2, 0, 0, AB_NONE },
    { "tiny-lora-T256", "size", "gpt2-tiny", K_LORA, "qkv", 8, 4, 256, 2, 20, 0, 0, AB_NONE },
    { "medium-lora-T256", "size", "gpt2-medium", K_LORA, "qkv", 8, 4, 256, 1, 2, 0, 0, AB_NONE },
    { "tinyllama-lora-T256", "llama", "tinyllama-1.1b", K_LORA, "q_proj, v_proj", 8, 1, 256, 1, 3, 1, 0, AB_NONE },
    /* before/after: GPT-2-small, B=4 */
    { "small-skipbw-T256", "ab", "gpt2-small", K_LORA, "qkv", 8, 4, 256, 1, 3, 0, 4, AB_SKIP_BACKWARD },
    { "small-attnfull-T1024", "ab", "gpt2-small", K_LORA, "qkv", 8, 4, 1024, 1, 2, 0, 0, AB_ATTN_FULL },
    { "small-cefull-T256", "ab", "gpt2-small", K_LORA, "qkv", 8, 4, 256, 1, 3, 0, 0, AB_CE_FULL },
    { "small-recompute-T1024", "ab", "gpt2-small", K_LORA, "qkv", 8, 4, 1024, 1, 2, 0, 0, AB_RECOMPUTE },
};
#define N_WORK ((int)(sizeof WORKLOADS / sizeof *WORKLOADS))

/* Shapes for the PyTorch side of a preset this build does not have (from the
 * model's published config.json), so the torch row can still run. */
typedef struct known_shape {
    const char *preset;
    int family, L, C, H, Hkv, dh, F, V, P, tied, bias;
} known_shape;
static const known_shape KNOWN[] = {
    /* TinyLlama-1.1B (Zhang et al. 2024): hidden 2048, 22 layers, 32 heads,
     * 4 key-value heads, intermediate 5632, vocabulary 32000, 2048 positions */
    { "tinyllama-1.1b", PR_FAMILY_LLAMA, 22, 2048, 32, 4, 64, 5632, 32000, 2048, 0, 0 },
};

/* IMPL_PEFTREF is peftref f32, or the "after" run of a before/after pair */
enum { IMPL_PEFTREF, IMPL_PEFTREF_BF16, IMPL_BEFORE, IMPL_TORCH_F32, IMPL_TORCH_BF16, N_IMPL };
static const char *const IMPL_NAMES[N_IMPL] = { "peftref f32", "peftref bf16", "before", "torch f32", "torch bf16" };

typedef struct dims {
    int family, L, C, H, Hkv, dh, F, V, P, tied, bias, swiglu;
} dims;

typedef enum { ST_NONE = 0, ST_OK, ST_NA, ST_FAIL } res_state;

typedef struct result {
    res_state state;
    char note[320];
    double med_s, min_s;
    int n_timed;
    int mean_only;       /* eval by difference: a mean, no minimum */
    long rss_kb;
    double loss_first, loss_last;
    long long trainable;
    double calib_ms;     /* the load probe just before this run (calibrate) */
    char remark[320];    /* printed under the table (the trainer's note on a bf16 run that changes nothing) */
} result;

typedef struct job {
    const workload *w;
    workload run;        /* as run (quick mode shrinks it) */
    dims d;
    int have_dims;
    int available;       /* peftref plan accepted the pipeline */
    int inline_config;   /* write model.config (the preset's dimensions, changed) */
    char na[320];        /* why peftref cannot run it */
    char label[128];
    char tokdir[1024];   /* "" = byte tokenizer */
    char corpus[1024];
    char ids[1024];      /* the corpus as token ids, for torch */
    double gflop;        /* per step (eval: per batch) */
    double gflop_after;  /* a pair's after run when it does less work (skip-backward); 0: gflop */
    double ceil_sgemm, ceil_bf16;
    result r[N_IMPL];
    int impls[N_IMPL];   /* the rows printed for this job, in order */
    int n_impl;
    char pair_note[400]; /* before/after: how their results compare */
} job;

typedef struct opts {
    const char *srcdir, *peftref, *workdir, *python, *only;
    int quick, no_torch, raw_env, plan_only;
    double timeout;
} opts;

/* ---- small helpers -------------------------------------------------------- */

/* snprintf into buf; paths and notes that do not fit are cut, which only
 * shortens a message or makes a path fail to open. */
static int textf(char *buf, size_t size, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int textf(char *buf, size_t size, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, size, fmt, ap);
    va_end(ap);
    return n;
}

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

static int mkdir_p(const char *path)
{
    char buf[1024];
    textf(buf, sizeof buf, "%s", path);
    for (char *p = buf + 1; *p; p++) {
        if (*p != '/')
            continue;
        *p = '\0';
        if (mkdir(buf, 0777) != 0 && errno != EEXIST)
            return -1;
        *p = '/';
    }
    return mkdir(buf, 0777) != 0 && errno != EEXIST ? -1 : 0;
}

/* The whole file, NUL-terminated; NULL if unreadable. */
static char *read_text(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    size_t cap = 4096, n = 0;
    char *s = malloc(cap);
    while (s) {
        size_t got = fread(s + n, 1, cap - n - 1, f);
        n += got;
        if (got == 0)
            break;
        if (cap - n - 1 == 0) {
            char *t = realloc(s, cap * 2);
            if (!t) {
                free(s);
                s = NULL;
                break;
            }
            s = t;
            cap *= 2;
        }
    }
    fclose(f);
    if (s)
        s[n] = '\0';
    return s;
}

/* The last non-empty line of a file (for error notes), in buf. */
static void last_line(const char *path, char *buf, size_t size)
{
    char *s = read_text(path);
    buf[0] = '\0';
    if (!s)
        return;
    size_t n = strlen(s);
    while (n > 0 && (s[n - 1] == '\n' || s[n - 1] == '\r'))
        s[--n] = '\0';
    char *p = strrchr(s, '\n');
    textf(buf, size, "%s", p ? p + 1 : s);
    free(s);
}

static void first_line(const char *path, char *buf, size_t size)
{
    char *s = read_text(path);
    buf[0] = '\0';
    if (!s)
        return;
    char *p = strchr(s, '\n');
    if (p)
        *p = '\0';
    textf(buf, size, "%s", s);
    free(s);
}

/* ---- child processes ---------------------------------------------------------- */

/* Run argv (argv[0] a path) with stdout and stderr sent to files (NULL: to
 * /dev/null); wait for it, killing it after timeout seconds.  Returns the
 * exit status (128 + signal when killed), -1 if it could not start; its peak
 * resident set in kB goes to *rss_kb. */
static int run_child(char *const argv[], const char *out_path, const char *err_path, double timeout,
                     long *rss_kb, int *timed_out)
{
    fflush(stdout);
    fflush(stderr);
    pid_t pid = fork();
    if (pid < 0)
        return -1;
    if (pid == 0) {
        int fo = open(out_path ? out_path : "/dev/null", O_WRONLY | O_CREAT | O_TRUNC, 0644);
        int fe = open(err_path ? err_path : "/dev/null", O_WRONLY | O_CREAT | O_TRUNC, 0644);
        int fi = open("/dev/null", O_RDONLY);
        if (fo < 0 || fe < 0 || fi < 0)
            _exit(126);
        dup2(fi, 0);
        dup2(fo, 1);
        dup2(fe, 2);
        execv(argv[0], argv);
        dprintf(2, "cannot run %s: %s\n", argv[0], strerror(errno));
        _exit(127);
    }
    double t0 = now_s();
    int status = 0, killed = 0;
    struct rusage ru;
    memset(&ru, 0, sizeof ru);
    for (;;) {
        pid_t r = wait4(pid, &status, WNOHANG, &ru);
        if (r == pid)
            break;
        if (r < 0 && errno != EINTR)
            return -1;
        if (!killed && timeout > 0 && now_s() - t0 > timeout) {
            kill(pid, SIGKILL);
            killed = 1;
        }
        struct timespec ts = { 0, 20 * 1000 * 1000 };
        nanosleep(&ts, NULL);
    }
    if (rss_kb)
        *rss_kb = ru.ru_maxrss;
    if (timed_out)
        *timed_out = killed;
    if (WIFEXITED(status))
        return WEXITSTATUS(status);
    return 128 + (WIFSIGNALED(status) ? WTERMSIG(status) : 0);
}

/* Run fn in a forked child and copy size bytes of its result back. */
static int in_child(void (*fn)(const void *arg, void *out), const void *arg, void *out, size_t size)
{
    int fd[2];
    if (pipe(fd) != 0)
        return -1;
    fflush(stdout);
    pid_t pid = fork();
    if (pid < 0) {
        close(fd[0]);
        close(fd[1]);
        return -1;
    }
    if (pid == 0) {
        close(fd[0]);
        char *buf = calloc(1, size);
        if (!buf)
            _exit(2);
        fn(arg, buf);
        size_t done = 0;
        while (done < size) {
            ssize_t w = write(fd[1], buf + done, size - done);
            if (w <= 0)
                _exit(2);
            done += (size_t)w;
        }
        _exit(0);
    }
    close(fd[1]);
    size_t got = 0;
    while (got < size) {
        ssize_t r = read(fd[0], (char *)out + got, size - got);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            break;
        got += (size_t)r;
    }
    close(fd[0]);
    int status;
    waitpid(pid, &status, 0);
    return got == size ? 0 : -1;
}

/* ---- machine description -------------------------------------------------------- */

typedef struct machine {
    char model[256], family[32], model_no[32];
    int avx512f, avx512_bf16, amx_bf16, amx_tile, amx_int8;
    int ncpu;
    char runtime_line[256];
    char torch_line[256];
    int torch_ok;
} machine;

static int has_flag(const char *flags, const char *f)
{
    size_t n = strlen(f);
    for (const char *p = flags; (p = strstr(p, f)) != NULL; p += n)
        if ((p == flags || p[-1] == ' ') && (p[n] == ' ' || p[n] == '\0' || p[n] == '\n'))
            return 1;
    return 0;
}

static void trim(char *s)
{
    size_t n = strlen(s);
    while (n > 0 && (s[n - 1] == '\n' || s[n - 1] == ' '))
        s[--n] = '\0';
    char *p = s;
    while (*p == ' ' || *p == '\t')
        p++;
    memmove(s, p, strlen(p) + 1);
}

/* The CPU as lscpu names it (its "Model name", "CPU family", "Model" and
 * "Flags"), read from /proc/cpuinfo when lscpu is not installed. */
static void describe_cpu(machine *mc)
{
    static char line[8192];
    FILE *f = popen("lscpu 2>/dev/null", "r");
    int got = 0;
    textf(mc->model, sizeof mc->model, "unknown");
    mc->ncpu = (int)sysconf(_SC_NPROCESSORS_ONLN);
    while (f && fgets(line, sizeof line, f)) {
        char *colon = strchr(line, ':');
        if (!colon)
            continue;
        *colon = '\0';
        char *val = colon + 1;
        trim(val);
        if (!strcmp(line, "Model name"))
            textf(mc->model, sizeof mc->model, "%s", val), got = 1;
        else if (!strcmp(line, "CPU family"))
            textf(mc->family, sizeof mc->family, "%s", val);
        else if (!strcmp(line, "Model"))
            textf(mc->model_no, sizeof mc->model_no, "%s", val);
        else if (!strcmp(line, "Flags")) {
            mc->avx512f = has_flag(val, "avx512f");
            mc->avx512_bf16 = has_flag(val, "avx512_bf16");
            mc->amx_bf16 = has_flag(val, "amx_bf16");
            mc->amx_tile = has_flag(val, "amx_tile");
            mc->amx_int8 = has_flag(val, "amx_int8");
        }
    }
    if (f)
        pclose(f);
    if (got)
        return;
    f = fopen("/proc/cpuinfo", "r");
    while (f && fgets(line, sizeof line, f)) {
        char *colon = strchr(line, ':');
        if (!colon)
            continue;
        *colon = '\0';
        char *val = colon + 1;
        trim(line);
        trim(val);
        if (!strcmp(line, "model name") && !got)
            textf(mc->model, sizeof mc->model, "%s", val), got = 1;
        else if (!strcmp(line, "cpu family") && !mc->family[0])
            textf(mc->family, sizeof mc->family, "%s", val);
        else if (!strcmp(line, "model") && !mc->model_no[0])
            textf(mc->model_no, sizeof mc->model_no, "%s", val);
        else if (!strcmp(line, "flags") && !mc->avx512f) {
            mc->avx512f = has_flag(val, "avx512f");
            mc->avx512_bf16 = has_flag(val, "avx512_bf16");
            mc->amx_bf16 = has_flag(val, "amx_bf16");
            mc->amx_tile = has_flag(val, "amx_tile");
            mc->amx_int8 = has_flag(val, "amx_int8");
        }
    }
    if (f)
        fclose(f);
}

/* ---- model shapes and FLOPs ------------------------------------------------------- */

static void dims_from_config(const pr_model_config *c, dims *d)
{
    d->family = c->family;
    d->L = c->n_layers;
    d->C = c->d_model;
    d->H = c->n_heads;
    d->Hkv = c->n_kv_heads > 0 ? c->n_kv_heads : c->n_heads;
    d->dh = c->d_head > 0 ? c->d_head : c->d_model / c->n_heads;
    d->F = c->d_ff;
    d->V = c->vocab_size;
    d->P = c->max_seq;
    d->tied = c->tied_head;
    d->bias = c->bias;
    d->swiglu = c->act == PR_ACT_SWIGLU;
}

/* d_in and d_out of a projection site, by its canonical name or alias; 0 if
 * it is not a projection. */
static int site_dims(const dims *d, const char *site, int *din, int *dout)
{
    int q = d->H * d->dh, kv = d->Hkv * d->dh;
    if (!strcmp(site, "qkv") || !strcmp(site, "c_attn")) { *din = d->C; *dout = q + 2 * kv; }
    else if (!strcmp(site, "q") || !strcmp(site, "q_proj")) { *din = d->C; *dout = q; }
    else if (!strcmp(site, "k") || !strcmp(site, "k_proj") ||
             !strcmp(site, "v") || !strcmp(site, "v_proj")) { *din = d->C; *dout = kv; }
    else if (!strcmp(site, "o") || !strcmp(site, "o_proj")) { *din = q; *dout = d->C; }
    else if (!strcmp(site, "ffn.up") || !strcmp(site, "c_fc") || !strcmp(site, "up_proj") ||
             !strcmp(site, "ffn.gate") || !strcmp(site, "gate_proj")) { *din = d->C; *dout = d->F; }
    else if (!strcmp(site, "ffn.down") || !strcmp(site, "down_proj")) { *din = d->F; *dout = d->C; }
    else
        return 0;
    return 1;
}

/* sum over the LoRA sites (comma-separated) of d_in + d_out, times the
 * adapted layers (top_layers of them, or all L) */
static double lora_width(const dims *d, const char *sites, int top_layers)
{
    char buf[256];
    double sum = 0.0;
    textf(buf, sizeof buf, "%s", sites ? sites : "");
    for (char *tok = strtok(buf, ", "); tok; tok = strtok(NULL, ", ")) {
        int din = 0, dout = 0;
        if (site_dims(d, tok, &din, &dout))
            sum += din + dout;
    }
    return sum * (top_layers > 0 && top_layers < d->L ? top_layers : d->L);
}

static double matmul_weights(const dims *d)
{
    double q = (double)d->H * d->dh, kv = (double)d->Hkv * d->dh, C = d->C;
    double per_layer = C * q + 2.0 * C * kv + q * C + (d->swiglu ? 3.0 : 2.0) * C * d->F;
    return d->L * per_layer + (double)d->V * C;
}

/* back_layers: the blocks a LoRA step's backward runs through (the top
 * ones; L for all): the frozen input gradients of the others are not taken */
static double work_gflop_back(const dims *d, const workload *w, int back_layers)
{
    double N = (double)w->B * w->T, T = w->T, q = (double)d->H * d->dh;
    double nm = matmul_weights(d);
    double attn = 4.0 * d->L * T * T * q * w->B;
    double fwd = 2.0 * nm * N + attn;
    double lw = lora_width(d, w->sites, w->top_layers);
    double share = d->L > 0 ? (double)back_layers / d->L : 1.0;
    double nm_back = (nm - (double)d->V * d->C) * share + (double)d->V * d->C;
    switch (w->kind) {
    case K_FULL: return 3.0 * fwd * 1e-9;
    case K_EVAL: return (fwd + 2.0 * N * w->rank * lw) * 1e-9;
    case K_LORA: break;
    }
    return (fwd + 2.0 * nm_back * N + 2.0 * attn * share + 6.0 * N * w->rank * lw) * 1e-9;
}

static double work_gflop(const dims *d, const workload *w)
{
    return work_gflop_back(d, w, d->L);
}

/* The forward projection shapes (M, K, N) of one step and how often each
 * occurs; returns their number. */
typedef struct gemm_shape { int M, K, N; double count; } gemm_shape;

static int work_shapes(const dims *d, const workload *w, gemm_shape *out)
{
    int M = w->B * w->T, q = d->H * d->dh, kv = d->Hkv * d->dh, n = 0;
    if (d->family == PR_FAMILY_GPT2) {
        out[n++] = (gemm_shape){ M, d->C, q + 2 * kv, d->L };
    } else {
        out[n++] = (gemm_shape){ M, d->C, q, d->L };
        out[n++] = (gemm_shape){ M, d->C, kv, 2.0 * d->L };
    }
    out[n++] = (gemm_shape){ M, q, d->C, d->L };
    out[n++] = (gemm_shape){ M, d->C, d->F, (d->swiglu ? 2.0 : 1.0) * d->L };
    out[n++] = (gemm_shape){ M, d->F, d->C, d->L };
    out[n++] = (gemm_shape){ M, d->C, d->V, 1 };
    return n;
}

/* ---- the ceilings: sgemm here, bf16 matmul in torch --------------------------------- */

#define MAX_SHAPES 64

typedef struct shape_set {
    int n;
    int MKN[MAX_SHAPES][3];
    double sgemm[MAX_SHAPES], t_bf16[MAX_SHAPES];
} shape_set;

static int shape_index(shape_set *s, int M, int K, int N, int add)
{
    for (int i = 0; i < s->n; i++)
        if (s->MKN[i][0] == M && s->MKN[i][1] == K && s->MKN[i][2] == N)
            return i;
    if (!add || s->n == MAX_SHAPES)
        return -1;
    s->MKN[s->n][0] = M;
    s->MKN[s->n][1] = K;
    s->MKN[s->n][2] = N;
    return s->n++;
}

static double sgemm_gflops(int M, int K, int N)
{
    float *a = malloc(sizeof(float) * (size_t)M * K);
    float *b = malloc(sizeof(float) * (size_t)K * N);
    float *c = malloc(sizeof(float) * (size_t)M * N);
    double t[50], g = 0.0, spent = 0.0;
    int reps = 0;
    if (!a || !b || !c)
        goto out;
    for (size_t i = 0; i < (size_t)M * K; i++)
        a[i] = (float)(i % 7) * 0.1f - 0.3f;
    for (size_t i = 0; i < (size_t)K * N; i++)
        b[i] = (float)(i % 5) * 0.1f - 0.2f;
    /* one untimed product, then at least 2 and until 0.3 s */
    for (int r = -1; r < 50 && (r < 2 || spent < 0.3); r++) {
        double t0 = now_s();
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, M, N, K, 1.0f, a, K, b, N, 0.0f, c, N);
        double dt = now_s() - t0;
        if (r >= 0) {
            t[reps++] = dt;
            spent += dt;
        }
    }
    g = 2.0 * M * K * N * 1e-9 / median(t, reps);
out:
    free(a);
    free(b);
    free(c);
    return g;
}

/* The load probe: a fixed 512^3 sgemm on every BLAS thread, median of 5
 * after one untimed, in ms.  Taken in a child before and after each run; when
 * another process holds a core it grows (OpenBLAS's threads wait for each
 * other), so rows whose probe differs were measured under different load. */
static void child_calib(const void *arg, void *out)
{
    (void)arg;
    const int n = 512;
    float *a = malloc(sizeof(float) * (size_t)n * n), *b = malloc(sizeof(float) * (size_t)n * n);
    float *c = malloc(sizeof(float) * (size_t)n * n);
    double t[5], *ms = out;
    *ms = 0.0;
    if (a && b && c) {
        for (size_t i = 0; i < (size_t)n * n; i++) {
            a[i] = (float)(i % 7) * 0.1f;
            b[i] = (float)(i % 5) * 0.1f;
        }
        for (int r = -1; r < 5; r++) {
            double t0 = now_s();
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, n, n, 1.0f, a, n, b, n, 0.0f, c, n);
            if (r >= 0)
                t[r] = now_s() - t0;
        }
        *ms = 1e3 * median(t, 5);
    }
    free(a);
    free(b);
    free(c);
}

static double calibrate(void)
{
    double ms = 0.0;
    return in_child(child_calib, NULL, &ms, sizeof ms) == 0 ? ms : 0.0;
}

static void child_sgemm(const void *arg, void *out)
{
    const shape_set *s = arg;
    double *g = out;
    for (int i = 0; i < s->n; i++)
        g[i] = sgemm_gflops(s->MKN[i][0], s->MKN[i][1], s->MKN[i][2]);
    g[s->n] = sgemm_gflops(1024, 1024, 1024);
    g[s->n + 1] = (double)openblas_get_num_threads();
}

/* FLOP-weighted rate: total FLOPs / total time at each shape's rate. */
static double weighted_ceiling(const shape_set *s, const double *rate, const gemm_shape *sh, int n)
{
    double flop = 0.0, time = 0.0;
    for (int i = 0; i < n; i++) {
        int k = shape_index((shape_set *)s, sh[i].M, sh[i].K, sh[i].N, 0);
        if (k < 0 || rate[k] <= 0)
            return 0.0;
        double f = 2.0 * sh[i].M * sh[i].K * sh[i].N * sh[i].count;
        flop += f;
        time += f / rate[k];
    }
    return time > 0 ? flop / time : 0.0;
}

/* ---- data ---------------------------------------------------------------------------- */

/* A deterministic English-like text: words drawn from a fixed list with a
 * xorshift64* generator of a fixed seed, sentences of 5 to 16 words, a
 * newline after every third sentence. */
static int write_corpus(const char *path, size_t n_words)
{
    static const char *const words[] = {
        "the", "of", "and", "to", "in", "a", "is", "that", "for", "it", "as", "was", "with", "be",
        "by", "on", "not", "he", "this", "are", "or", "his", "from", "at", "which", "but", "have",
        "an", "had", "they", "you", "were", "their", "one", "all", "we", "can", "her", "has",
        "there", "been", "if", "more", "when", "will", "would", "who", "so", "no", "time", "people",
        "year", "way", "day", "man", "thing", "woman", "life", "child", "world", "school", "state",
        "family", "student", "group", "country", "problem", "hand", "part", "place", "case", "week",
        "company", "system", "program", "question", "work", "government", "number", "night",
        "point", "home", "water", "room", "mother", "area", "money", "story", "fact", "month",
        "lot", "right", "study", "book", "eye", "job", "word", "business", "issue", "side", "kind",
        "head", "house", "service", "friend", "father", "power", "hour", "game", "line", "end",
        "member", "law", "car", "city", "community", "name", "president", "team", "minute", "idea",
        "kid", "body", "information", "back", "parent", "face", "others", "level", "office",
        "door", "health", "person", "art", "war", "history", "party", "result", "change",
        "morning", "reason", "research", "girl", "guy", "moment", "air", "teacher", "force",
        "education", "small", "large", "old", "new", "good", "great", "little", "long", "high",
        "different", "early", "young", "important", "public", "bad", "same", "able", "says",
        "made", "went", "found", "gave", "told", "became", "left", "felt", "brought", "began",
    };
    const size_t nw = sizeof words / sizeof *words;
    FILE *f = fopen(path, "w");
    if (!f)
        return -1;
    uint64_t x = 0x9E3779B97F4A7C15ull;
    size_t in_sentence = 0, sentence_len = 0, sentences = 0;
    for (size_t i = 0; i < n_words; i++) {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        uint64_t r = x * 0x2545F4914F6CDD1Dull;
        if (in_sentence == 0)
            sentence_len = 5 + (size_t)(r >> 60) % 12;
        const char *wd = words[(r >> 20) % nw];
        if (in_sentence == 0)
            fprintf(f, "%c%s", wd[0] - 'a' + 'A', wd + 1);
        else
            fprintf(f, " %s", wd);
        if (++in_sentence == sentence_len) {
            in_sentence = 0;
            fputs(++sentences % 3 == 0 ? ".\n" : ". ", f);
        }
    }
    fputs(".\n", f);
    return fclose(f) == 0 ? 0 : -1;
}

/* A tokenizer directory of vocabulary V for a preset whose vocabulary is
 * neither 256 (the byte tokenizer) nor GPT-2's 50257: the first V ids of
 * GPT-2's vocabulary and its first V - 256 merges.  GPT-2's merge i makes
 * token 256 + i (its ids 0-255 are the bytes), so every kept merge's parts
 * and result are kept ids and the vocabulary is exactly 0 .. V-1. */
static int write_subset_tokenizer(const char *gpt2dir, int V, const char *outdir, char *why, size_t whysz)
{
    char path[1200];
    textf(path, sizeof path, "%s/vocab.json", gpt2dir);
    json_error_t je;
    json_t *vocab = json_load_file(path, 0, &je);
    if (!json_is_object(vocab)) {
        textf(why, whysz, "%s: %s", path, je.text);
        json_decref(vocab);
        return -1;
    }
    json_t *sub = json_object();
    const char *key;
    json_t *val;
    int kept = 0;
    json_object_foreach(vocab, key, val) {
        if (json_is_integer(val) && json_integer_value(val) < V) {
            json_object_set(sub, key, val);
            kept++;
        }
    }
    json_decref(vocab);
    mkdir_p(outdir);
    textf(path, sizeof path, "%s/vocab.json", outdir);
    int rc = json_dump_file(sub, path, JSON_COMPACT);
    json_decref(sub);
    if (rc != 0 || kept != V) {
        textf(why, whysz, "writing %s (%d of %d ids)", path, kept, V);
        return -1;
    }
    textf(path, sizeof path, "%s/merges.txt", gpt2dir);
    FILE *in = fopen(path, "r");
    textf(path, sizeof path, "%s/merges.txt", outdir);
    FILE *out = fopen(path, "w");
    char line[1024];
    int merges = 0;
    while (in && out && fgets(line, sizeof line, in)) {
        if (!strncmp(line, "#version", 8)) {
            fputs(line, out);
            continue;
        }
        if (line[0] == '\n')
            continue;
        if (merges >= V - 256)
            break;
        fputs(line, out);
        merges++;
    }
    int ok = in && out;
    if (in)
        fclose(in);
    if (out && fclose(out) != 0)
        ok = 0;
    if (!ok) {
        textf(why, whysz, "writing %s", path);
        return -1;
    }
    return 0;
}

/* ---- pipelines --------------------------------------------------------------------------- */

static int preset_dims(const char *preset, dims *d)
{
    pr_model_config cfg;
    if (pr_config_preset(preset, &cfg) == PR_OK) {
        dims_from_config(&cfg, d);
        return 1;
    }
    for (size_t i = 0; i < sizeof KNOWN / sizeof *KNOWN; i++)
        if (!strcmp(KNOWN[i].preset, preset)) {
            const known_shape *k = &KNOWN[i];
            *d = (dims){ k->family, k->L, k->C, k->H, k->Hkv, k->dh, k->F, k->V, k->P, k->tied, k->bias,
                         k->family == PR_FAMILY_LLAMA };
            return 1;
        }
    return 0;
}

/* The pipeline for a job; for eval the LoRA pipeline whose model it scores.
 * train_extra: one more `train:` key ("precision: bf16"), or NULL. */
static int write_pipeline(const job *j, const char *path, const char *outdir, int inline_config,
                          const char *train_extra)
{
    const workload *w = &j->run;
    FILE *f = fopen(path, "w");
    if (!f)
        return -1;
    fprintf(f, "# bench_train: %s\nmodel:\n", j->label);
    if (inline_config)
        fprintf(f, "  config: {n_layers: %d, d_model: %d, n_heads: %d, d_ff: %d, vocab: %d, max_seq: %d}\n",
                j->d.L, j->d.C, j->d.H, j->d.F, j->d.V, j->d.P);
    else
        fprintf(f, "  preset: %s\n", w->preset);
    if (j->tokdir[0])
        fprintf(f, "  tokenizer: %s\n", j->tokdir);
    fprintf(f, "modules:\n");
    if (w->kind == K_FULL)
        fprintf(f, "  - technique: full\n");
    else
    {
        fprintf(f, "  - technique: lora\n    sites: \"%s\"\n    options: {r: %d, alpha: 16}\n", w->sites,
                w->rank);
        if (w->top_layers > 0 && w->top_layers < j->d.L) {
            fprintf(f, "    layers: [");
            for (int l = j->d.L - w->top_layers; l < j->d.L; l++)
                fprintf(f, "%s%d", l > j->d.L - w->top_layers ? ", " : "", l);
            fprintf(f, "]\n");
        }
    }
    fprintf(f, "task:\n  type: lm\n  train: %s\n", j->corpus);
    fprintf(f, "train:\n  steps: %d\n  batch: %d\n  seq_len: %d\n  eval_batches: 1\n  output: %s\n",
            w->warmup + w->steps, w->B, w->T, outdir);
    if (train_extra)
        fprintf(f, "  %s\n", train_extra);
    return fclose(f) == 0 ? 0 : -1;
}

/* ---- running one job ---------------------------------------------------------------------- */

static void set_result(result *r, res_state st, const char *fmt, const char *arg)
{
    r->state = st;
    textf(r->note, sizeof r->note, fmt, arg ? arg : "");
}

/* Step times from train.output/metrics.jsonl: step k's "seconds" minus step
 * k-1's (0 for the first).  Returns the number of steps read. */
static int read_step_times(const char *metrics, double *dt, int max, double *loss_first, double *loss_last)
{
    FILE *f = fopen(metrics, "r");
    char line[4096];
    double prev = 0.0;
    int n = 0;
    while (f && fgets(line, sizeof line, f)) {
        json_error_t je;
        json_t *o = json_loads(line, 0, &je);
        json_t *sec = json_object_get(o, "seconds"), *loss = json_object_get(o, "loss");
        if (json_is_number(sec) && json_is_number(loss) && n < max) {
            double s = json_number_value(sec);
            dt[n] = s - prev;
            prev = s;
            if (n == 0)
                *loss_first = json_number_value(loss);
            *loss_last = json_number_value(loss);
            n++;
        }
        json_decref(o);
    }
    if (f)
        fclose(f);
    return n;
}

/* One `peftref train` run of a job into r; tag names its files in dir
 * (train-TAG.out, .err; "" for train.out), run_dir is the pipeline's
 * train.output. */
static void run_peftref_train(const opts *o, job *j, result *r, const char *dir, const char *tag,
                              const char *pipeline, const char *run_dir)
{
    char out[1200], err[1200], metrics[1300], note[300];
    textf(out, sizeof out, "%s/train%s%s.out", dir, *tag ? "-" : "", tag);
    textf(err, sizeof err, "%s/train%s%s.err", dir, *tag ? "-" : "", tag);
    char *argv[] = { (char *)o->peftref, "train", (char *)pipeline, "--force", "--progress", "none", NULL };
    int to = 0;
    int rc = run_child(argv, out, err, o->timeout, &r->rss_kb, &to);
    textf(metrics, sizeof metrics, "%s/metrics.jsonl", run_dir);
    if (rc != 0) {
        last_line(err, note, sizeof note);
        set_result(r, ST_FAIL, to ? "timed out" : "failed: %s", note);
        return;
    }
    int total = j->run.warmup + j->run.steps;
    double *dt = calloc((size_t)total + 1, sizeof *dt);
    int n = dt ? read_step_times(metrics, dt, total, &r->loss_first, &r->loss_last) : 0;
    if (n != total) {
        textf(note, sizeof note, "%s has %d step lines, expected %d", metrics, n, total);
        set_result(r, ST_FAIL, "%s", note);
        free(dt);
        return;
    }
    double *timed = dt + j->run.warmup;
    r->n_timed = j->run.steps;
    r->min_s = timed[0];
    for (int i = 1; i < r->n_timed; i++)
        if (timed[i] < r->min_s)
            r->min_s = timed[i];
    r->med_s = median(timed, r->n_timed);
    r->state = r->med_s > 0 ? ST_OK : ST_FAIL;
    if (r->state != ST_OK)
        textf(r->note, sizeof r->note, "step times of 0 s in %s", metrics);
    free(dt);
    /* the trainer's own word when a setting had nothing to act on */
    char *e = read_text(err);
    const char *nothing = e ? strstr(e, "changes nothing here") : NULL;
    if (nothing) {
        const char *b = nothing, *eol = strchr(nothing, '\n');
        while (b > e && b[-1] != '\n')
            b--;
        textf(r->remark, sizeof r->remark, "%.*s", (int)(eol ? eol - b : (long)strlen(b)), b);
    }
    free(e);
    /* the checkpoint holds the trainable tensors and AdamW state: up to
     * 3 x 4 bytes per parameter in full finetuning */
    char ckpt[1300];
    textf(ckpt, sizeof ckpt, "%s/checkpoint.safetensors", run_dir);
    unlink(ckpt);
}

/* Text of exactly n tokens: the unit repeated (one token each: GPT-2's " the"
 * is id 262 and kept by every subset of 263 ids or more; one byte for the
 * byte tokenizer). */
static int write_repeated(const char *path, const char *unit, long n)
{
    FILE *f = fopen(path, "w");
    if (!f)
        return -1;
    for (long i = 0; i < n; i++)
        fputs(unit, f);
    return fclose(f) == 0 ? 0 : -1;
}

typedef struct eval_out { int ok; double seconds, loss; long windows; long rss_kb; char note[300]; } eval_out;

static void run_eval_once(const opts *o, const job *j, const char *dir, const char *pipeline, long windows,
                          const char *tag, const char *precision, eval_out *e)
{
    char data[1200], out[1200], err[1200], Ts[32], Bs[32];
    const char *unit = j->tokdir[0] ? " the" : "a";
    memset(e, 0, sizeof *e);
    textf(data, sizeof data, "%s/eval-%s.txt", dir, tag);
    textf(out, sizeof out, "%s/eval-%s.out", dir, tag);
    textf(err, sizeof err, "%s/eval-%s.err", dir, tag);
    if (write_repeated(data, unit, windows * j->run.T + 1) != 0) {
        textf(e->note, sizeof e->note, "cannot write %s", data);
        return;
    }
    textf(Ts, sizeof Ts, "%d", j->run.T);
    textf(Bs, sizeof Bs, "%d", j->run.B);
    char *argv[] = { (char *)o->peftref, "eval", "--pipeline", (char *)pipeline, "--data", data,
                     "--seq-len", Ts, "--batch", Bs, "--json", "--precision", (char *)precision, NULL };
    int to = 0;
    int rc = run_child(argv, out, err, o->timeout, &e->rss_kb, &to);
    if (rc != 0) {
        char l[256];
        last_line(err, l, sizeof l);
        textf(e->note, sizeof e->note, "%s", to ? "timed out" : l);
        return;
    }
    char *text = read_text(out);
    json_error_t je;
    json_t *js = text ? json_loads(text, 0, &je) : NULL;
    free(text);
    json_t *sec = json_object_get(js, "seconds"), *win = json_object_get(js, "windows");
    if (!json_is_number(sec) || !json_is_integer(win)) {
        textf(e->note, sizeof e->note, "%s: no \"seconds\" and \"windows\" in peftref eval --json", out);
        json_decref(js);
        return;
    }
    e->seconds = json_number_value(sec);
    e->windows = (long)json_integer_value(win);
    e->loss = json_number_value(json_object_get(js, "loss"));
    json_decref(js);
    if (e->windows != windows) {
        textf(e->note, sizeof e->note, "%s: %ld windows, expected %ld", data, e->windows, windows);
        return;
    }
    e->ok = 1;
}

/* eval of the job's pipeline at precision "f32" or "bf16" (--precision) into r */
static void run_peftref_eval(const opts *o, job *j, result *r, const char *dir, const char *pipeline,
                             const char *precision)
{
    eval_out a, b;
    long B = j->run.B, S = j->run.steps;
    char t1[32], tn[32];
    int f32 = !strcmp(precision, "f32");
    textf(t1, sizeof t1, "%s1", f32 ? "" : "bf16-");
    textf(tn, sizeof tn, "%sn", f32 ? "" : "bf16-");
    run_eval_once(o, j, dir, pipeline, B, t1, precision, &a);
    if (a.ok)
        run_eval_once(o, j, dir, pipeline, B * (1 + S), tn, precision, &b);
    if (!a.ok || !b.ok) {
        set_result(r, ST_FAIL, "eval failed: %s", a.ok ? b.note : a.note);
        return;
    }
    r->med_s = (b.seconds - a.seconds) / (double)S;
    r->min_s = r->med_s;
    r->n_timed = (int)S;
    r->mean_only = 1;
    r->rss_kb = b.rss_kb;
    r->loss_first = a.loss;
    r->loss_last = b.loss;
    r->state = r->med_s > 0 ? ST_OK : ST_FAIL;
    if (r->state != ST_OK)
        textf(r->note, sizeof r->note, "eval of %ld batches took no longer than of 1 (%.3f vs %.3f s)",
                 1 + S, b.seconds, a.seconds);
}

static void run_torch(const opts *o, job *j, int impl, const char *dir)
{
    result *r = &j->r[impl];
    const workload *w = &j->run;
    char out[1200], err[1200], llama_ref[1200];
    char a[24][48];
    const char *dtype = impl == IMPL_TORCH_BF16 ? "bf16" : "f32";
    textf(out, sizeof out, "%s/torch-%s.out", dir, dtype);
    textf(err, sizeof err, "%s/torch-%s.err", dir, dtype);
    textf(llama_ref, sizeof llama_ref, "%s/tests/ref/llama_ref.py", o->srcdir);
    char script[1200];
    textf(script, sizeof script, "%s/bench/torch_train.py", o->srcdir);
    int vals[] = { j->d.L, j->d.C, j->d.H, j->d.Hkv, j->d.dh, j->d.F, j->d.V, j->d.P, j->d.bias,
                   j->d.tied, w->rank, w->B, w->T, w->warmup, w->steps, runtime_omp_threads() };
    const char *keys[] = { "--L", "--C", "--H", "--Hkv", "--dh", "--F", "--V", "--P", "--bias",
                           "--tied", "--rank", "--B", "--T", "--warmup", "--steps", "--threads" };
    char *argv[64];
    int n = 0;
    argv[n++] = (char *)o->python;
    argv[n++] = script;
    argv[n++] = "run";
    for (size_t i = 0; i < sizeof vals / sizeof *vals; i++) {
        textf(a[i], sizeof a[i], "%d", vals[i]);
        argv[n++] = (char *)keys[i];
        argv[n++] = a[i];
    }
    argv[n++] = "--family";
    argv[n++] = j->d.family == PR_FAMILY_LLAMA ? "llama" : "gpt2";
    argv[n++] = "--mode";
    argv[n++] = w->kind == K_FULL ? "full" : w->kind == K_EVAL ? "eval" : "lora";
    argv[n++] = "--sites";
    argv[n++] = (char *)(w->sites ? w->sites : "qkv");
    argv[n++] = "--dtype";
    argv[n++] = (char *)dtype;
    argv[n++] = "--llama-ref";
    argv[n++] = llama_ref;
    if (j->ids[0]) {
        argv[n++] = "--ids";
        argv[n++] = j->ids;
    }
    argv[n] = NULL;
    int to = 0;
    int rc = run_child(argv, out, err, o->timeout, &r->rss_kb, &to);
    char note[300];
    if (rc != 0) {
        last_line(err, note, sizeof note);
        set_result(r, ST_FAIL, to ? "timed out" : "failed: %s", note);
        return;
    }
    char *text = read_text(out);
    json_error_t je;
    json_t *js = text ? json_loads(text, 0, &je) : NULL;
    free(text);
    json_t *na = json_object_get(js, "na");
    if (json_is_string(na)) {
        set_result(r, ST_NA, "n/a: %s", json_string_value(na));
    } else if (json_is_number(json_object_get(js, "median"))) {
        r->med_s = json_number_value(json_object_get(js, "median"));
        r->min_s = json_number_value(json_object_get(js, "min"));
        r->n_timed = (int)json_array_size(json_object_get(js, "times"));
        r->trainable = (long long)json_integer_value(json_object_get(js, "trainable"));
        r->loss_first = json_number_value(json_object_get(js, "loss_first"));
        r->loss_last = json_number_value(json_object_get(js, "loss_last"));
        r->state = ST_OK;
    } else {
        set_result(r, ST_FAIL, "failed: no result in %s", out);
    }
    json_decref(js);
}

/* ---- output --------------------------------------------------------------------------------- */

static void fmt_num(char *buf, size_t n, double v, const char *f)
{
    if (v > 0 && isfinite(v))
        textf(buf, n, f, v);
    else
        textf(buf, n, "-");
}

static double tok_s(const job *j, int impl)
{
    const result *r = &j->r[impl];
    return r->state == ST_OK ? (double)j->run.B * j->run.T / r->med_s : 0.0;
}

static void put_cell(FILE *f, int md, int width, const char *text)
{
    if (md)
        fprintf(f, "| %s ", text);
    else
        fprintf(f, "%*s ", width, text);
}

static const char *impl_name(const job *j, int impl)
{
    if (j->run.ab != AB_NONE && impl == IMPL_BEFORE)
        return AB_SWITCHES[j->run.ab].before_impl;
    if (j->run.ab != AB_NONE && impl == IMPL_PEFTREF)
        return AB_SWITCHES[j->run.ab].after_impl;
    return IMPL_NAMES[impl];
}

/* "1.23x": this row's tokens/s over the reference row's, "-" without both */
static void ratio_cell(char *buf, size_t n, const job *j, int impl, int ref)
{
    double a = tok_s(j, impl), b = tok_s(j, ref);
    if (impl != ref && a > 0 && b > 0)
        textf(buf, n, "%.2fx", a / b);
    else
        textf(buf, n, "-");
}

/* One table: a row per workload and implementation.  md: Markdown.  The
 * ratio columns stand on peftref's rows: its tokens/s over torch f32's,
 * torch bf16's, and (the after row of a pair) the before row's. */
static void print_table(FILE *f, job *jobs, int n, int md)
{
    static const char *const hdr[] = { "workload", "impl", "GFLOP/step", "steps", "step ms", "min ms",
                                       "tok/s", "GFLOP/s", "sgemm ceil", "bf16 ceil", "of ceil",
                                       "peak MiB", "x torch f32", "x torch bf16", "x before", "probe ms" };
    int wid[] = { -8, -11, 10, 5, 9, 9, 8, 8, 10, 9, 7, 8, 11, 12, 8, 8 };
    enum { NC = sizeof hdr / sizeof *hdr };
    for (int i = 0; i < n; i++) {
        if ((int)strlen(jobs[i].label) > -wid[0])
            wid[0] = -(int)strlen(jobs[i].label);
        for (int k = 0; k < jobs[i].n_impl; k++)
            if ((int)strlen(impl_name(&jobs[i], jobs[i].impls[k])) + 2 > -wid[1])
                wid[1] = -(int)strlen(impl_name(&jobs[i], jobs[i].impls[k])) - 2;
    }
    for (int c = 0; c < NC; c++)
        put_cell(f, md, wid[c], hdr[c]);
    fprintf(f, md ? "|\n" : "\n");
    if (md) {
        for (int c = 0; c < NC; c++)
            fprintf(f, c < 2 ? "|---" : "|---:");
        fprintf(f, "|\n");
    }
    for (int i = 0; i < n; i++) {
        job *j = &jobs[i];
        for (int k = 0; k < j->n_impl; k++) {
            int impl = j->impls[k];
            const result *r = &j->r[impl];
            int peftref = impl == IMPL_PEFTREF || impl == IMPL_PEFTREF_BF16 || impl == IMPL_BEFORE;
            char cell[NC][96];
            textf(cell[0], sizeof cell[0], "%s", k == 0 ? j->label : "");
            textf(cell[1], sizeof cell[1], "%s%s", impl_name(j, impl), r->remark[0] ? " ^" : "");
            double gflop = impl == IMPL_PEFTREF && j->gflop_after > 0 ? j->gflop_after : j->gflop;
            fmt_num(cell[2], sizeof cell[2], k == 0 || gflop != j->gflop ? gflop : 0, "%.1f");
            if (r->state == ST_OK) {
                int bf16 = impl == IMPL_TORCH_BF16 || impl == IMPL_PEFTREF_BF16;
                double ceil = bf16 ? j->ceil_bf16 : j->ceil_sgemm;
                double gf = gflop / r->med_s;
                textf(cell[3], sizeof cell[3], "%d", r->n_timed);
                fmt_num(cell[4], sizeof cell[4], 1e3 * r->med_s, r->mean_only ? "%.1f*" : "%.1f");
                fmt_num(cell[5], sizeof cell[5], r->mean_only ? 0 : 1e3 * r->min_s, "%.1f");
                fmt_num(cell[6], sizeof cell[6], tok_s(j, impl), "%.0f");
                fmt_num(cell[7], sizeof cell[7], gf, "%.1f");
                fmt_num(cell[10], sizeof cell[10], ceil > 0 ? 100.0 * gf / ceil : 0, "%.0f%%");
                fmt_num(cell[11], sizeof cell[11], r->rss_kb / 1024.0, "%.0f");
                if (peftref) {
                    ratio_cell(cell[12], sizeof cell[12], j, impl, IMPL_TORCH_F32);
                    ratio_cell(cell[13], sizeof cell[13], j, impl, IMPL_TORCH_BF16);
                } else {
                    textf(cell[12], sizeof cell[12], "-");
                    textf(cell[13], sizeof cell[13], "-");
                }
                if (j->run.ab != AB_NONE && impl == IMPL_PEFTREF)
                    ratio_cell(cell[14], sizeof cell[14], j, impl, IMPL_BEFORE);
                else
                    textf(cell[14], sizeof cell[14], "-");
                fmt_num(cell[15], sizeof cell[15], r->calib_ms, "%.1f");
            } else {
                for (int c = 3; c < NC; c++)
                    textf(cell[c], sizeof cell[c], "%s", "");
            }
            fmt_num(cell[8], sizeof cell[8], k == 0 ? j->ceil_sgemm : 0, "%.1f");
            fmt_num(cell[9], sizeof cell[9], k == 0 ? j->ceil_bf16 : 0, "%.1f");
            if (k != 0) {
                textf(cell[8], sizeof cell[8], "%s", "");
                textf(cell[9], sizeof cell[9], "%s", "");
                if (gflop == j->gflop)
                    textf(cell[2], sizeof cell[2], "%s", "");
            }
            if (r->state != ST_OK) {
                /* the note takes the measurement columns */
                for (int c = 0; c < 3; c++)
                    put_cell(f, md, wid[c], cell[c]);
                if (md) {
                    fprintf(f, "| %s |", r->state == ST_NONE ? "not run" : r->note);
                    for (int c = 4; c < NC; c++)
                        fprintf(f, " %s |", c == 8 ? cell[8] : c == 9 ? cell[9] : "");
                    fprintf(f, "\n");
                } else {
                    fprintf(f, "%s\n", r->state == ST_NONE ? "not run" : r->note);
                }
                continue;
            }
            for (int c = 0; c < NC; c++)
                put_cell(f, md, wid[c], cell[c]);
            fprintf(f, md ? "|\n" : "\n");
        }
    }
}

static void scaling_cell(char *buf, size_t n, const job *j, int impl)
{
    const result *r = &j->r[impl];
    if (r->state == ST_OK)
        textf(buf, n, "%.0f tok/s %.0f MiB", tok_s(j, impl), r->rss_kb / 1024.0);
    else
        textf(buf, n, "%s", r->state == ST_NA ? "n/a" : r->state == ST_FAIL ? "failed" : "not run");
}

/* tokens/s and peak RSS of the given jobs, one line each */
static void print_scaling(FILE *f, job *const *order, int n, const char *title, int md)
{
    if (n == 0)
        return;
    int lw = 8;
    for (int i = 0; i < n; i++)
        if ((int)strlen(order[i]->label) > lw)
            lw = (int)strlen(order[i]->label);
    fprintf(f, md ? "\n**%s**\n\n" : "\n%s\n", title);
    if (md)
        fprintf(f, "| workload | %s | %s | %s | peftref/f32 | peftref/bf16 |\n|---|---:|---:|---:|---:|---:|\n",
                IMPL_NAMES[IMPL_PEFTREF], IMPL_NAMES[IMPL_TORCH_F32], IMPL_NAMES[IMPL_TORCH_BF16]);
    else
        fprintf(f, "%-*s %22s %22s %22s %12s %12s\n", lw, "workload", IMPL_NAMES[IMPL_PEFTREF],
                IMPL_NAMES[IMPL_TORCH_F32], IMPL_NAMES[IMPL_TORCH_BF16], "peftref/f32", "peftref/bf16");
    static const int cols[3] = { IMPL_PEFTREF, IMPL_TORCH_F32, IMPL_TORCH_BF16 };
    for (int i = 0; i < n; i++) {
        char c[3][64], ra[2][32];
        for (int k = 0; k < 3; k++)
            scaling_cell(c[k], sizeof c[k], order[i], cols[k]);
        for (int k = 0; k < 2; k++)
            ratio_cell(ra[k], sizeof ra[k], order[i], IMPL_PEFTREF, cols[k + 1]);
        if (md)
            fprintf(f, "| %s | %s | %s | %s | %s | %s |\n", order[i]->label, c[0], c[1], c[2], ra[0], ra[1]);
        else
            fprintf(f, "%-*s %22s %22s %22s %12s %12s\n", lw, order[i]->label, c[0], c[1], c[2], ra[0], ra[1]);
    }
}

static int pick_seq(const job *j)
{
    return j->run.kind == K_LORA && (!strcmp(j->w->group, "seq") || !strcmp(j->w->id, "small-lora-T256"));
}

static int pick_size(const job *j)
{
    return j->run.kind == K_LORA && (!strcmp(j->w->group, "size") || !strcmp(j->w->id, "small-lora-T256"));
}

/* 1 when both files exist with the same bytes, 0 when they differ, -1 when
 * either cannot be read */
static int files_equal(const char *a, const char *b)
{
    FILE *fa = fopen(a, "rb"), *fb = fopen(b, "rb");
    int eq = fa && fb ? 1 : -1;
    char x[65536], y[65536];
    while (eq == 1) {
        size_t na = fread(x, 1, sizeof x, fa), nb = fread(y, 1, sizeof y, fb);
        if (na != nb || memcmp(x, y, na))
            eq = 0;
        else if (na == 0)
            break;
    }
    if (fa)
        fclose(fa);
    if (fb)
        fclose(fb);
    return eq;
}

static int is_peftref(int impl)
{
    return impl == IMPL_PEFTREF || impl == IMPL_PEFTREF_BF16 || impl == IMPL_BEFORE;
}

/* Write, plan and run every peftref row of a job: f32 (or a pair's after
 * run), bf16 (train.precision: bf16; eval: --precision bf16 on the f32
 * pipeline) and a pair's before run.  A pair runs only when both of its
 * pipelines plan; the before run sets the pair's environment switch to 1,
 * the after run unsets it, and the caller's value is restored after. */
static void run_peftref_variants(const opts *o, job *j, const char *dir)
{
    const ab_switch *ab = &AB_SWITCHES[j->run.ab];
    char pipes[N_IMPL][1300], runs[N_IMPL][1300];
    int planned[N_IMPL] = { 0 };
    for (int k = 0; k < j->n_impl; k++) {
        int impl = j->impls[k];
        if (!is_peftref(impl))
            continue;
        result *r = &j->r[impl];
        if (j->run.kind == K_EVAL && impl == IMPL_PEFTREF_BF16) {
            /* the f32 pipeline, evaluated with --precision bf16 */
            textf(pipes[impl], sizeof pipes[impl], "%s", pipes[IMPL_PEFTREF]);
            planned[impl] = planned[IMPL_PEFTREF];
            if (!planned[impl])
                *r = j->r[IMPL_PEFTREF];
            continue;
        }
        const char *tag = impl == IMPL_PEFTREF_BF16 ? "-bf16" : impl == IMPL_BEFORE ? "-before" : "";
        const char *extra = impl == IMPL_PEFTREF_BF16 ? "precision: bf16" : impl == IMPL_PEFTREF ? ab->after_train : NULL;
        char perr[1400];
        textf(pipes[impl], sizeof pipes[impl], "%s/pipeline%s.yaml", dir, tag);
        textf(runs[impl], sizeof runs[impl], "%s/run%s", dir, tag);
        textf(perr, sizeof perr, "%s/plan-pipeline%s.err", dir, tag);
        if (write_pipeline(j, pipes[impl], runs[impl], j->inline_config, extra) != 0) {
            set_result(r, ST_FAIL, "cannot write %s", pipes[impl]);
            continue;
        }
        char *av[] = { (char *)o->peftref, "plan", pipes[impl], NULL };
        if (run_child(av, NULL, perr, 120, NULL, NULL) != 0) {
            char l[256];
            first_line(perr, l, sizeof l);
            if (extra && impl == IMPL_PEFTREF && strstr(l, "unknown key"))
                set_result(r, ST_NA, "n/a: not in this build (peftref plan: %s)", l);
            else
                set_result(r, ST_NA, "n/a: peftref plan refused it: %s", l);
        } else if (o->plan_only) {
            set_result(r, ST_NA, "planned: %s (--plan-only)", pipes[impl]);
        } else {
            planned[impl] = 1;
        }
    }
    if (j->run.ab != AB_NONE && planned[IMPL_BEFORE] != planned[IMPL_PEFTREF]) {
        /* one run of a pair alone compares nothing: it takes the other's note */
        int bad = planned[IMPL_BEFORE] ? IMPL_PEFTREF : IMPL_BEFORE;
        j->r[bad == IMPL_BEFORE ? IMPL_PEFTREF : IMPL_BEFORE] = j->r[bad];
        planned[IMPL_BEFORE] = planned[IMPL_PEFTREF] = 0;
    }
    const char *given = ab->env ? getenv(ab->env) : NULL;
    char *saved = given ? strdup(given) : NULL;
    for (int k = 0; k < j->n_impl; k++) {
        int impl = j->impls[k];
        if (!is_peftref(impl) || !planned[impl])
            continue;
        result *r = &j->r[impl];
        if (ab->env) {
            if (impl == IMPL_BEFORE)
                setenv(ab->env, "1", 1);
            else
                unsetenv(ab->env);
        }
        double c0 = calibrate();
        if (j->run.kind == K_EVAL) {
            run_peftref_eval(o, j, r, dir, pipes[impl], impl == IMPL_PEFTREF_BF16 ? "bf16" : "f32");
            if (r->state == ST_FAIL && impl == IMPL_PEFTREF_BF16 && strstr(r->note, "oneDNN"))
                r->state = ST_NA;    /* a build without the bf16 backend */
        } else {
            run_peftref_train(o, j, r, dir, impl == IMPL_PEFTREF_BF16 ? "bf16" : impl == IMPL_BEFORE ? "before" : "",
                              pipes[impl], runs[impl]);
        }
        r->calib_ms = fmax(c0, calibrate());
    }
    if (ab->env) {
        if (saved)
            setenv(ab->env, saved, 1);
        else
            unsetenv(ab->env);
    }
    free(saved);
    const result *rb = &j->r[IMPL_BEFORE], *ra = &j->r[IMPL_PEFTREF];
    if (j->run.ab != AB_NONE && rb->state == ST_OK && ra->state == ST_OK) {
        /* the trained LoRA tensors (train.output/modules/lora.safetensors) */
        char fb[1400], fa[1400];
        textf(fb, sizeof fb, "%s/modules/lora.safetensors", runs[IMPL_BEFORE]);
        textf(fa, sizeof fa, "%s/modules/lora.safetensors", runs[IMPL_PEFTREF]);
        int same = files_equal(fb, fa);
        double dl = fmax(fabs(ra->loss_first - rb->loss_first), fabs(ra->loss_last - rb->loss_last));
        textf(j->pair_note, sizeof j->pair_note,
              "loss %.6f -> %.6f before, %.6f -> %.6f after (max |difference| %.2g); trained LoRA tensors %s; "
              "peak RSS %.1f -> %.1f MiB",
              rb->loss_first, rb->loss_last, ra->loss_first, ra->loss_last, dl,
              same > 0 ? "bit-identical" : same == 0 ? "differ" : "not compared (no modules/lora.safetensors)",
              rb->rss_kb / 1024.0, ra->rss_kb / 1024.0);
    }
}

/* ---- main ------------------------------------------------------------------------------------- */

static void usage(void)
{
    fprintf(stderr,
            "usage: bench_train --srcdir DIR --peftref PATH [--workdir DIR] [--quick] [--python PATH]\n"
            "                   [--no-torch] [--only SUBSTRING] [--timeout SECONDS] [--raw-env] [--plan-only]\n");
}

static void label_job(job *j, int inline_config, int quick)
{
    const workload *w = &j->run;
    char what[64], sites[64];
    size_t k = 0;
    for (const char *p = w->sites ? w->sites : ""; *p && k + 1 < sizeof sites; p++)
        if (*p != ' ')
            sites[k++] = *p;
    sites[k] = '\0';
    if (w->kind == K_FULL)
        textf(what, sizeof what, "full");
    else if (w->kind == K_EVAL)
        textf(what, sizeof what, "eval LoRA-%s", sites);
    else if (w->top_layers > 0 && w->top_layers < j->d.L)
        textf(what, sizeof what, "LoRA r%d %s top%d", w->rank, sites, w->top_layers);
    else
        textf(what, sizeof what, "LoRA r%d %s", w->rank, sites);
    textf(j->label, sizeof j->label, "%s%s %s B%d T%d%s%s", w->preset, quick ? "~tiny" : inline_config ? "*" : "",
             what, w->B, w->T, w->ab != AB_NONE ? " " : "", w->ab != AB_NONE ? AB_SWITCHES[w->ab].what : "");
}

/* Does the file (or, for a libtool wrapper script, the program it runs)
 * contain the bytes of name?  An environment switch that the code reads
 * with getenv("NAME") has its name in the program's read-only data. */
static int program_mentions(const char *path, const char *name)
{
    char real[1400];
    textf(real, sizeof real, "%s", path);
    char head[2] = { 0, 0 };
    FILE *h = fopen(path, "rb");
    if (h) {
        if (fread(head, 1, 2, h) != 2)
            head[0] = '\0';
        fclose(h);
    }
    if (head[0] == '#' && head[1] == '!') {
        /* libtool: DIR/.libs/lt-NAME or DIR/.libs/NAME */
        const char *slash = strrchr(path, '/');
        int dl = slash ? (int)(slash - path) : 0;
        const char *base = slash ? slash + 1 : path;
        textf(real, sizeof real, "%.*s%s.libs/lt-%s", dl, path, dl ? "/" : "", base);
        if (access(real, R_OK) != 0)
            textf(real, sizeof real, "%.*s%s.libs/%s", dl, path, dl ? "/" : "", base);
    }
    FILE *f = fopen(real, "rb");
    if (!f)
        return 0;
    size_t n = strlen(name), have = 0, cap = 1 << 16;
    char *buf = malloc(cap + n);
    int found = 0;
    while (buf && !found) {
        size_t got = fread(buf + have, 1, cap, f);
        if (got == 0)
            break;
        have += got;
        for (size_t i = 0; i + n <= have && !found; i++)
            found = buf[i] == name[0] && !memcmp(buf + i, name, n);
        /* keep the last n-1 bytes: a name across the boundary */
        size_t keep = have < n ? have : n - 1;
        memmove(buf, buf + have - keep, keep);
        have = keep;
    }
    free(buf);
    fclose(f);
    return found;
}

int main(int argc, char **argv)
{
    opts o = { NULL, NULL, "bench-work", NULL, NULL, 0, 0, 0, 0, 1800.0 };
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--quick")) { o.quick = 1; continue; }
        if (!strcmp(a, "--no-torch")) { o.no_torch = 1; continue; }
        if (!strcmp(a, "--raw-env")) { o.raw_env = 1; continue; }
        if (!strcmp(a, "--plan-only")) { o.plan_only = 1; continue; }
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) { usage(); return 0; }
        if (!v) { usage(); return 2; }
        if (!strcmp(a, "--srcdir")) o.srcdir = v;
        else if (!strcmp(a, "--peftref")) o.peftref = v;
        else if (!strcmp(a, "--workdir")) o.workdir = v;
        else if (!strcmp(a, "--python")) o.python = v;
        else if (!strcmp(a, "--only")) o.only = v;
        else if (!strcmp(a, "--timeout")) o.timeout = atof(v);
        else { usage(); return 2; }
        i++;
    }
    if (!o.srcdir || !o.peftref) {
        usage();
        return 2;
    }
    if (!o.python)
        o.python = getenv("PYTHON") ? getenv("PYTHON") : "/usr/bin/python3";
    if (o.quick && o.timeout > 300)
        o.timeout = 300;

    /* The environment the peftref program gives itself (OMP_WAIT_POLICY
     * passive unless set; a real OpenBLAS kernel set when it fell back to a
     * generic one and OPENBLAS_CORETYPE is unset), so that this process's
     * sgemm, peftref and torch all run under it.  --raw-env: as given. */
    if (!getenv("BENCH_TRAIN_GIVEN_CORETYPE"))     /* what the caller gave, across the re-exec */
        setenv("BENCH_TRAIN_GIVEN_CORETYPE", getenv("OPENBLAS_CORETYPE") ? getenv("OPENBLAS_CORETYPE") : "", 1);
    if (!o.raw_env)
        runtime_reexec_if_needed(argv);
    const char *given_ct = getenv("BENCH_TRAIN_GIVEN_CORETYPE");

    char path[1400];
    if (strlen(o.workdir) > 800 || strlen(o.srcdir) > 800) {
        fprintf(stderr, "bench_train: --workdir and --srcdir must be shorter than 800 bytes\n");
        return 2;
    }
    if (mkdir_p(o.workdir) != 0) {
        fprintf(stderr, "bench_train: cannot create %s: %s\n", o.workdir, strerror(errno));
        return 1;
    }
    /* pipelines name their files by absolute path: relative ones would be
     * read against the pipeline's own directory */
    static char abs_work[PATH_MAX], abs_src[PATH_MAX];
    if (!realpath(o.workdir, abs_work) || !realpath(o.srcdir, abs_src)) {
        fprintf(stderr, "bench_train: %s: %s\n", realpath(o.workdir, abs_work) ? o.srcdir : o.workdir,
                strerror(errno));
        return 1;
    }
    o.workdir = abs_work;
    o.srcdir = abs_src;
    if (!getenv("PEFTREF_REGISTRY_CACHE")) {
        textf(path, sizeof path, "%s/registry-cache.json", o.workdir);
        setenv("PEFTREF_REGISTRY_CACHE", path, 1);
    }
    double t_start = now_s();
    time_t wall = time(NULL);
    char date[64];
    strftime(date, sizeof date, "%Y-%m-%d %H:%M UTC", gmtime(&wall));

    machine mc;
    memset(&mc, 0, sizeof mc);
    describe_cpu(&mc);
    {
        char out[1400];
        textf(out, sizeof out, "%s/runtime.out", o.workdir);
        char *av[] = { (char *)o.peftref, "runtime", NULL };
        if (run_child(av, out, NULL, 60, NULL, NULL) == 0) {
            char l[256];
            first_line(out, l, sizeof l);
            textf(mc.runtime_line, sizeof mc.runtime_line, "%s", strncmp(l, "blas: ", 6) ? l : l + 6);
        }
        else
            textf(mc.runtime_line, sizeof mc.runtime_line, "(peftref runtime failed)");
    }
    if (!o.no_torch) {
        char out[1400], script[1200], th[16];
        textf(out, sizeof out, "%s/torch-info.out", o.workdir);
        textf(script, sizeof script, "%s/bench/torch_train.py", o.srcdir);
        textf(th, sizeof th, "%d", runtime_omp_threads());
        char *av[] = { (char *)o.python, script, "info", "--threads", th, NULL };
        if (run_child(av, out, NULL, 120, NULL, NULL) == 0) {
            char *t = read_text(out);
            json_error_t je;
            json_t *js = t ? json_loads(t, 0, &je) : NULL;
            if (json_is_string(json_object_get(js, "version"))) {
                mc.torch_ok = 1;
                textf(mc.torch_line, sizeof mc.torch_line, "torch %s (%s), %s threads, oneDNN %s, CPU capability %s",
                         json_string_value(json_object_get(js, "version")), o.python, th,
                         json_is_true(json_object_get(js, "mkldnn")) ? "yes" : "no",
                         json_string_value(json_object_get(js, "cpu_capability")));
            }
            json_decref(js);
            free(t);
        }
        if (!mc.torch_ok)
            textf(mc.torch_line, sizeof mc.torch_line, "no torch: %s cannot import torch", o.python);
    } else {
        textf(mc.torch_line, sizeof mc.torch_line, "torch rows skipped (--no-torch)");
    }

    /* ---- the jobs ---- */
    job *jobs = calloc(N_WORK, sizeof *jobs);
    int nj = 0;
    char gpt2tok[1200];
    textf(gpt2tok, sizeof gpt2tok, "%s/tests/data/tokenizer/gpt2", o.srcdir);
    for (int i = 0; i < N_WORK; i++) {
        const workload *w = &WORKLOADS[i];
        if (o.only && !strstr(w->id, o.only))
            continue;
        job *j = &jobs[nj++];
        j->w = w;
        j->run = *w;
        int inline_config = 0;
        dims tiny;
        preset_dims("gpt2-tiny", &tiny);
        if (o.quick) {
            /* harness check: every model at gpt2-tiny's dimensions, T/4, 1+2 steps */
            j->run.T = w->T / 4 < 16 ? 16 : w->T / 4;
            j->run.warmup = 1;
            j->run.steps = 2;
        }
        j->have_dims = preset_dims(w->preset, &j->d);
        textf(path, sizeof path, "%s/%s", o.workdir, w->id);
        mkdir_p(path);
        /* does this build have the preset?  `peftref plan` decides */
        char plan_yaml[1400], plan_err[1400];
        textf(plan_yaml, sizeof plan_yaml, "%s/plan.yaml", path);
        textf(plan_err, sizeof plan_err, "%s/plan.err", path);
        {
            FILE *f = fopen(plan_yaml, "w");
            if (f) {
                fprintf(f, "model:\n  preset: %s\nmodules: []\ntask:\n  type: lm\n  train: %s/data/fortunes/adapt-train.txt\n",
                        w->preset, o.srcdir);
                fclose(f);
            }
            char *av[] = { (char *)o.peftref, "plan", plan_yaml, NULL };
            int rc = run_child(av, NULL, plan_err, 120, NULL, NULL);
            j->available = rc == 0;
            if (!j->available) {
                char l[256];
                first_line(plan_err, l, sizeof l);
                if (strstr(l, "unknown preset"))
                    textf(j->na, sizeof j->na, "n/a: preset not available in this build");
                else
                    textf(j->na, sizeof j->na, "n/a: peftref plan refused it: %s", l);
            }
        }
        if (o.quick && j->have_dims && j->d.family == PR_FAMILY_GPT2) {
            j->d = tiny;
            inline_config = 1;
        } else if (o.quick && j->have_dims) {
            /* a LLaMA-shaped miniature for the torch side; peftref's preset is too big for --quick */
            j->d.L = 2; j->d.C = 64; j->d.H = 4; j->d.Hkv = 2; j->d.dh = 16; j->d.F = 128; j->d.V = 256;
            j->d.P = 256;
            if (j->available)
                textf(j->na, sizeof j->na, "skipped in --quick (the preset is available)");
            j->available = 0;
        }
        if (j->have_dims && j->d.P < j->run.T && j->d.family == PR_FAMILY_GPT2) {
            /* gpt2-tiny has 64 positions: the same model with a longer position table */
            j->d.P = j->run.T;
            inline_config = 1;
        }
        /* the top 4 of 12 layers are the top third; a 2-layer model (--quick) keeps the top one */
        if (j->run.top_layers > 0 && j->have_dims && j->run.top_layers >= j->d.L)
            j->run.top_layers = j->d.L / 2 > 0 ? j->d.L / 2 : 1;
        j->n_impl = 0;
        if (w->ab != AB_NONE) {
            j->impls[j->n_impl++] = IMPL_BEFORE;
            j->impls[j->n_impl++] = IMPL_PEFTREF;
        } else {
            j->impls[j->n_impl++] = IMPL_PEFTREF;
            if (w->bf16)
                j->impls[j->n_impl++] = IMPL_PEFTREF_BF16;
            j->impls[j->n_impl++] = IMPL_TORCH_F32;
            j->impls[j->n_impl++] = IMPL_TORCH_BF16;
        }
        label_job(j, inline_config, o.quick);
        if (!j->have_dims) {
            textf(j->na, sizeof j->na, "n/a: preset not available in this build");
            for (int k = 0; k < N_IMPL; k++)
                set_result(&j->r[k], ST_NA, "%s", j->na);
            continue;
        }
        /* tokenizer of the model's vocabulary */
        if (j->d.V == 256) {
            j->tokdir[0] = '\0';
        } else if (j->d.V == 50257) {
            textf(j->tokdir, sizeof j->tokdir, "%s", gpt2tok);
        } else if (j->d.V > 262 && j->d.V < 50257) {
            char why[300];
            textf(j->tokdir, sizeof j->tokdir, "%s/tokenizer-%d", o.workdir, j->d.V);
            if (write_subset_tokenizer(gpt2tok, j->d.V, j->tokdir, why, sizeof why) != 0) {
                textf(j->na, sizeof j->na, "n/a: tokenizer: %s", why);
                j->available = 0;
            }
        } else {
            textf(j->na, sizeof j->na, "n/a: no tokenizer of vocabulary %d here", j->d.V);
            j->available = 0;
        }
        j->gflop = work_gflop(&j->d, &j->run);
        if (w->ab == AB_SKIP_BACKWARD && j->run.top_layers > 0)
            j->gflop_after = work_gflop_back(&j->d, &j->run, j->run.top_layers);
        j->inline_config = inline_config;
        /* an environment switch this peftref does not read */
        const char *env = AB_SWITCHES[w->ab].env;
        if (j->available && env && !program_mentions(o.peftref, env)) {
            textf(j->na, sizeof j->na, "n/a: not in this build (%s does not occur in %s)", env, o.peftref);
            j->available = 0;
        }
        if (!j->available)
            for (int k = 0; k < 3; k++)    /* IMPL_PEFTREF, IMPL_PEFTREF_BF16, IMPL_BEFORE */
                set_result(&j->r[k], ST_NA, "%s", j->na);
    }

    /* ---- data: one corpus per tokenizer, and its ids for torch ---- */
    char corpus[1400];
    textf(corpus, sizeof corpus, "%s/corpus.txt", o.workdir);
    /* ~1.1 tokens a word: 64k words give ~70k GPT-2 tokens, 68 windows of 1024 */
    if (write_corpus(corpus, o.quick ? 8000 : 64000) != 0) {
        fprintf(stderr, "bench_train: cannot write %s\n", corpus);
        return 1;
    }
    for (int i = 0; i < nj; i++) {
        job *j = &jobs[i];
        textf(j->corpus, sizeof j->corpus, "%s", corpus);
        if (!j->have_dims)
            continue;
        textf(j->ids, sizeof j->ids, "%s/corpus-ids-%d.txt", o.workdir, j->d.V);
        int done = 0;             /* tokenized for an earlier job of this run */
        for (int k = 0; k < i; k++)
            done |= jobs[k].have_dims && !strcmp(jobs[k].ids, j->ids);
        if (done)
            continue;
        char tdir[1200];
        if (j->tokdir[0])
            textf(tdir, sizeof tdir, "%s", j->tokdir);
        else {
            textf(tdir, sizeof tdir, "%s/byte-tokenizer", o.workdir);   /* empty: the byte tokenizer */
            mkdir_p(tdir);
        }
        char *av[] = { (char *)o.peftref, "tokenize", "--model", tdir, corpus, NULL };
        if (run_child(av, j->ids, NULL, 300, NULL, NULL) != 0) {
            unlink(j->ids);
            j->ids[0] = '\0';    /* torch then draws random ids of the same shape */
        }
    }

    /* ---- ceilings ---- */
    shape_set *ss = calloc(1, sizeof *ss);
    for (int i = 0; i < nj; i++) {
        gemm_shape sh[16];
        if (!jobs[i].have_dims)
            continue;
        int n = work_shapes(&jobs[i].d, &jobs[i].run, sh);
        for (int k = 0; k < n; k++)
            shape_index(ss, sh[k].M, sh[k].K, sh[k].N, 1);
    }
    double sg[MAX_SHAPES + 2];
    memset(sg, 0, sizeof sg);
    double sgemm_1024 = 0;
    int blas_threads = 0;
    if (!o.plan_only && in_child(child_sgemm, ss, sg, sizeof(double) * (size_t)(ss->n + 2)) == 0) {
        memcpy(ss->sgemm, sg, sizeof(double) * (size_t)ss->n);
        sgemm_1024 = sg[ss->n];
        blas_threads = (int)sg[ss->n + 1];
    }
    if (!o.plan_only && mc.torch_ok && ss->n > 0) {
        char *shapes = calloc((size_t)ss->n, 40);
        size_t off = 0;
        for (int k = 0; k < ss->n; k++)
            off += (size_t)sprintf(shapes + off, "%s%d,%d,%d", k ? ";" : "", ss->MKN[k][0], ss->MKN[k][1],
                                   ss->MKN[k][2]);
        char out[1400], script[1200], th[16];
        textf(out, sizeof out, "%s/torch-ceiling.out", o.workdir);
        textf(script, sizeof script, "%s/bench/torch_train.py", o.srcdir);
        textf(th, sizeof th, "%d", runtime_omp_threads());
        char *av[] = { (char *)o.python, script, "ceiling", "--shapes", shapes, "--threads", th, NULL };
        if (run_child(av, out, NULL, o.timeout, NULL, NULL) == 0) {
            char *t = read_text(out);
            json_error_t je;
            json_t *js = t ? json_loads(t, 0, &je) : NULL;
            size_t idx;
            json_t *row;
            json_array_foreach(js, idx, row) {
                json_t *s = json_object_get(row, "shape");
                int k = shape_index(ss, (int)json_integer_value(json_array_get(s, 0)),
                                    (int)json_integer_value(json_array_get(s, 1)),
                                    (int)json_integer_value(json_array_get(s, 2)), 0);
                if (k >= 0)
                    ss->t_bf16[k] = json_number_value(json_object_get(row, "bf16"));
            }
            json_decref(js);
            free(t);
        }
        free(shapes);
    }
    for (int i = 0; i < nj; i++) {
        gemm_shape sh[16];
        if (!jobs[i].have_dims)
            continue;
        int n = work_shapes(&jobs[i].d, &jobs[i].run, sh);
        jobs[i].ceil_sgemm = weighted_ceiling(ss, ss->sgemm, sh, n);
        jobs[i].ceil_bf16 = weighted_ceiling(ss, ss->t_bf16, sh, n);
    }

    /* ---- header ---- */
    const char *ct = getenv("OPENBLAS_CORETYPE"), *wp = getenv("OMP_WAIT_POLICY");
    const char *on = getenv("OMP_NUM_THREADS"), *bn = getenv("OPENBLAS_NUM_THREADS");
    char loadavg[64] = "";
    first_line("/proc/loadavg", loadavg, sizeof loadavg);
    char hdr[4096];
    textf(hdr, sizeof hdr,
             "peftref %s bench_train%s: steps of `peftref train` (and batches of `peftref eval`) against PyTorch\n"
             "date:  %s\n"
             "cpu:   %s (family %s, model %s), %d CPUs online; AVX-512F %s, AVX-512 BF16 %s, AMX-BF16 %s, "
             "AMX-TILE %s\n"
             "blas:  %s (`peftref runtime`); sgemm 1024^3 %.1f GFLOP/s on %d threads\n"
             "env:   OPENBLAS_CORETYPE=%s%s OMP_WAIT_POLICY=%s OMP_NUM_THREADS=%s OPENBLAS_NUM_THREADS=%s%s\n"
             "torch: %s\n"
             "load:  %s (at start)\n",
             pr_version(), o.quick ? " --quick" : "", date, mc.model, mc.family[0] ? mc.family : "?",
             mc.model_no[0] ? mc.model_no : "?", mc.ncpu, mc.avx512f ? "yes" : "no",
             mc.avx512_bf16 ? "yes" : "no", mc.amx_bf16 ? "yes" : "no", mc.amx_tile ? "yes" : "no",
             mc.runtime_line, sgemm_1024, blas_threads, ct ? ct : "(unset)",
             !ct ? "" : given_ct && !strcmp(given_ct, ct) ? " (from the environment)"
                                                          : " (set by the runtime policy: OpenBLAS had fallen back to generic kernels)",
             wp ? wp : "(unset)",
             on ? on : "(unset)", bn ? bn : "(unset)",
             getenv("PEFTREF_RUNTIME_SET") ? " (peftref's runtime policy applied)" : o.raw_env ? " (--raw-env)" : "",
             mc.torch_line, loadavg);
    fputs(hdr, stdout);
    printf("\n");

    /* ---- run ---- */
    for (int i = 0; i < nj; i++) {
        job *j = &jobs[i];
        char dir[1200];
        textf(dir, sizeof dir, "%s/%s", o.workdir, j->w->id);
        fprintf(stderr, "bench_train: %s ...\n", j->label);
        double t0 = now_s();
        if (j->have_dims && j->available)
            run_peftref_variants(&o, j, dir);
        for (int impl = IMPL_TORCH_F32; impl <= IMPL_TORCH_BF16 && j->have_dims && j->run.ab == AB_NONE; impl++) {
            if (o.plan_only)
                set_result(&j->r[impl], ST_NA, "not run (--plan-only)", NULL);
            else if (o.no_torch)
                set_result(&j->r[impl], ST_NA, "skipped (--no-torch)", NULL);
            else if (!mc.torch_ok)
                set_result(&j->r[impl], ST_NA, "n/a: %s", mc.torch_line);
            else
            {
                double c0 = calibrate();
                run_torch(&o, j, impl, dir);
                j->r[impl].calib_ms = fmax(c0, calibrate());
            }
        }
        fprintf(stderr, "bench_train: %s done in %.1f s\n", j->label, now_s() - t0);
    }
    double t_total = now_s() - t_start;
    char loadend[64] = "";
    first_line("/proc/loadavg", loadend, sizeof loadend);

    /* ---- report: on stdout, and as Markdown in WORKDIR/results.md ---- */
    textf(path, sizeof path, "%s/results.md", o.workdir);
    FILE *md = fopen(path, "w");
    for (int pass = 0; pass < 2; pass++) {
        FILE *f = pass == 0 ? stdout : md;
        int m = pass == 1;
        if (!f)
            continue;
        if (m)
            fprintf(f, "```\n%s```\n\n", hdr);
        print_table(f, jobs, nj, m);
        job *order[N_WORK];
        int no = 0;
        for (int i = 0; i < nj; i++)
            if (pick_seq(&jobs[i]))
                order[no++] = &jobs[i];
        for (int a = 1; a < no; a++)      /* by T */
            for (int b = a; b > 0 && order[b]->run.T < order[b - 1]->run.T; b--) {
                job *t = order[b];
                order[b] = order[b - 1];
                order[b - 1] = t;
            }
        print_scaling(f, order, no, "scaling with T (tokens/s from the median step, peak RSS)", m);
        no = 0;
        for (int i = 0; i < nj; i++)
            if (pick_size(&jobs[i]))
                order[no++] = &jobs[i];
        for (int a = 1; a < no; a++)      /* by size */
            for (int b = a; b > 0 && order[b]->gflop < order[b - 1]->gflop; b--) {
                job *t = order[b];
                order[b] = order[b - 1];
                order[b - 1] = t;
            }
        print_scaling(f, order, no, "scaling with model size (same columns)", m);
        fprintf(f, "%s", m ? "\n```\n" : "\n");
        fprintf(f, "notes:\n");
        fprintf(f, "  step ms: median of the timed steps after %s warm-up; peftref's from the \"seconds\" of each step line\n"
                   "    of train.output/metrics.jsonl (trainer's own clock, 1 ms resolution), torch's from perf_counter\n"
                   "    around the same step; * = eval by difference of two `peftref eval --json` runs (a mean)\n"
                   "  tok/s = B*T / step time; GFLOP/s = GFLOP/step / step time (formula in bench/README.md)\n"
                   "  ceilings: FLOP-weighted rate of the workload's forward projection shapes, OpenBLAS sgemm (this\n"
                   "    process) and torch.matmul in bfloat16; 'of ceil' against sgemm for f32 rows, bf16 for bf16\n"
                   "  peak MiB: ru_maxrss of the child process (wait4)\n"
                   "  *  after a preset name: run as model.config with the preset's dimensions and max_seq raised to T\n",
                o.quick ? "1 (quick)" : "the listed");
        fprintf(f, "  x torch f32, x torch bf16: this row's tok/s over that row's (above 1: this row is faster);\n"
                   "    x before: a pair's after run over its before run (bench/README.md, before/after rows)\n");
        int lw = 40, iw = 11;
        for (int i = 0; i < nj; i++)
            for (int k = 0; k < jobs[i].n_impl; k++) {
                int impl = jobs[i].impls[k];
                if (jobs[i].r[impl].state == ST_OK) {
                    lw = (int)strlen(jobs[i].label) > lw ? (int)strlen(jobs[i].label) : lw;
                    iw = (int)strlen(impl_name(&jobs[i], impl)) > iw ? (int)strlen(impl_name(&jobs[i], impl)) : iw;
                }
            }
        for (int i = 0; i < nj; i++)
            for (int k = 0; k < jobs[i].n_impl; k++) {
                int impl = jobs[i].impls[k];
                if (jobs[i].r[impl].state == ST_OK)
                    fprintf(f, "  loss %-*s %-*s %.4f -> %.4f%s\n", lw, jobs[i].label, iw, impl_name(&jobs[i], impl),
                            jobs[i].r[impl].loss_first, jobs[i].r[impl].loss_last,
                            jobs[i].run.kind == K_EVAL && is_peftref(impl) ? " (1 batch / all batches)" : "");
            }
        for (int i = 0; i < nj; i++)
            for (int k = 0; k < jobs[i].n_impl; k++) {
                int impl = jobs[i].impls[k];
                if (jobs[i].r[impl].remark[0])
                    fprintf(f, "  ^ %s %s: %s\n", jobs[i].label, impl_name(&jobs[i], impl), jobs[i].r[impl].remark);
            }
        for (int i = 0; i < nj; i++)
            if (jobs[i].run.ab != AB_NONE && jobs[i].r[IMPL_BEFORE].state == ST_OK &&
                jobs[i].r[IMPL_PEFTREF].state == ST_OK)
                fprintf(f, "  pair %s: %s\n", jobs[i].label, jobs[i].pair_note);
        double lo = 0, hi = 0;
        for (int i = 0; i < nj; i++)
            for (int impl = 0; impl < N_IMPL; impl++) {
                double c = jobs[i].r[impl].state == ST_OK ? jobs[i].r[impl].calib_ms : 0;
                if (c > 0 && (lo == 0 || c < lo))
                    lo = c;
                if (c > hi)
                    hi = c;
            }
        if (lo > 0)
            fprintf(f, "  probe ms: 512^3 sgemm on %d BLAS threads, the slower of the probes before and after each run, "
                       "%.1f-%.1f ms%s\n", blas_threads,
                    lo, hi, hi > 1.2 * lo ? ": the machine's load changed during the run (more than 20%), so rows "
                                            "measured at a higher probe had less of the CPU" : "");
        fprintf(f, "total %.0f s; load %s (at end)\n", t_total, loadend);
        if (m)
            fprintf(f, "```\n");
    }
    if (md) {
        fclose(md);
        printf("(also written as Markdown to %s)\n", path);
    }
    int failed = 0;
    for (int i = 0; i < nj; i++)
        for (int impl = 0; impl < N_IMPL; impl++)
            failed |= jobs[i].r[impl].state == ST_FAIL;
    free(ss);
    free(jobs);
    return failed;
}
