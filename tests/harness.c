/* peftref tests: the shared harness (see harness.h). */
#include "harness.h"

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <dlfcn.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <dirent.h>
#include <sys/wait.h>
#include <unistd.h>

#include "host.h"
#include "rng.h"
#include "gradcheck.h"

const pr_plugin *th_plugin_open(const char *path, void **handle)
{
    *handle = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!*handle) {
        fprintf(stderr, "dlopen %s: %s\n", path, dlerror());
        return NULL;
    }
    pr_plugin_entry_fn entry;
    void *sym = dlsym(*handle, PR_PLUGIN_ENTRY_NAME);
    memcpy(&entry, &sym, sizeof entry);
    static char why[256];
    const pr_entry_args args = { .struct_size = sizeof args, .abi_major = PR_ABI_MAJOR, .abi_minor = PR_ABI_MINOR,
                                 .host = &th_host, .bundle_path = ".", .error = why, .error_size = sizeof why };
    return entry ? entry(&args) : NULL;
}

const pr_technique *th_plugin_technique(const char *path, void **handle)
{
    const pr_plugin *p = th_plugin_open(path, handle);
    return p && p->n_techniques == 1 ? p->techniques[0] : NULL;
}

int th_registry_open(const char *dir, const char *const *need, int n_need, pr_registry **reg)
{
    pr_error err = { 0 };
    if (pr_registry_open(dir, reg, &err) != PR_OK) {
        fprintf(stderr, "registry: %s\n", err.msg);
        return -1;
    }
    for (int k = 0; k < n_need; k++)
        if (!pr_registry_find(*reg, need[k])) {
            fprintf(stderr, "registry: no '%s' technique in %s\n", need[k], dir);
            for (int i = 0; i < pr_registry_refused_count(*reg); i++) {
                const char *p, *why;
                pr_registry_refused(*reg, i, &p, &why);
                fprintf(stderr, "refused %s: %s\n", p, why);
            }
            return -1;
        }
    return 0;
}

int th_run_cli(const char *bin, const char *plugin_dir, const char *const *args, const char *out_path,
               const char *err_path)
{
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        setenv("PEFTREF_PLUGIN_PATH", plugin_dir, 1);
        if (!freopen(out_path, "w", stdout) || !freopen(err_path ? err_path : "/dev/null", "w", stderr))
            _exit(99);
        execv(bin, (char *const *)args);
        _exit(98);
    }
    int status = 0;
    assert_int_equal(waitpid(pid, &status, 0), pid);
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

char *th_temp_dir(const char *template_path)
{
    char *d = strdup(template_path);
    assert_non_null(d);
    assert_non_null(mkdtemp(d));
    return d;
}

char *th_scratch_dir(const char *prefix)
{
    const char *base = getenv("TMPDIR");
    char tmpl[512];
    snprintf(tmpl, sizeof tmpl, "%s/%s-XXXXXX", base && *base ? base : "/tmp", prefix);
    char *d = mkdtemp(tmpl);
    assert_non_null(d);
    return strdup(d);
}

void th_scratch_dir_free(char *dir)
{
    DIR *d = opendir(dir);
    if (d) {
        struct dirent *e;
        while ((e = readdir(d)) != NULL) {
            if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
                continue;
            char p[1024];
            snprintf(p, sizeof p, "%s/%s", dir, e->d_name);
            unlink(p);
        }
        closedir(d);
    }
    rmdir(dir);
    free(dir);
}

void th_remove_tree(const char *dir)
{
    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    assert_int_equal(system(cmd), 0);
}

pr_model_config th_config(const th_shape *s, uint64_t seed)
{
    pr_model_config c;
    assert_int_equal(pr_config_preset("gpt2-tiny", &c), PR_OK);
    c.n_layers = s->L;
    c.d_model = s->C;
    c.n_heads = s->H;
    c.n_kv_heads = s->Hkv;
    c.d_head = s->hd;
    c.d_ff = s->F;
    c.vocab_size = s->V;
    c.max_seq = s->max_seq;
    c.init_std = 0.1f;
    c.seed = seed;
    return c;
}

int th_option_index(const pr_technique *t, const char *name)
{
    for (uint32_t i = 0; i < t->n_options; i++)
        if (strcmp(t->options[i].name, name) == 0)
            return (int)i;
    return -1;
}

const pr_option_decl *th_option(const pr_technique *t, const char *name)
{
    int i = th_option_index(t, name);
    return i < 0 ? NULL : &t->options[i];
}

pr_module *th_attach(pr_model *m, const pr_module_spec *s)
{
    pr_module *mod = NULL;
    pr_error err = { 0 };
    int rc = pr_module_attach(m, s, &mod, &err);
    if (rc)
        fprintf(stderr, "attach %s: %s\n", s->technique ? s->technique->name : "(none)", err.msg);
    assert_int_equal(rc, PR_OK);
    return mod;
}

pr_model *th_model_new(const pr_model_config *c, int B, int T)
{
    pr_model *m = NULL;
    pr_error err = { 0 };
    int rc = pr_model_create(c, &m, &err);
    if (rc)
        fprintf(stderr, "create: %s\n", err.msg);
    assert_int_equal(rc, PR_OK);
    rc = pr_model_reserve(m, B, T, &err);
    if (rc)
        fprintf(stderr, "reserve: %s\n", err.msg);
    assert_int_equal(rc, PR_OK);
    return m;
}

void th_loss_bind(th_loss_ctx *lc, pr_model *m, int B, int T)
{
    assert_true(B > 0 && T > 0 && B * T <= TH_MAX_TOKENS);
    memset(lc, 0, sizeof *lc);
    lc->m = m;
    lc->batch.tokens = lc->tokens;
    lc->batch.targets = lc->targets;
    lc->batch.B = B;
    lc->batch.T = T;
}

void th_loss_init_rng(th_loss_ctx *lc, pr_model *m, int B, int T, unsigned seed)
{
    th_loss_bind(lc, m, B, T);
    pr_rng r;
    rng_seed(&r, seed);
    int V = pr_model_get_config(m)->vocab_size;
    for (int i = 0; i < B * T; i++) {
        lc->tokens[i] = (int)(rng_next(&r) % (uint64_t)V);
        lc->targets[i] = (int)(rng_next(&r) % (uint64_t)V);
    }
}

double th_mean_ce(const float *logits, const int *targets, int n, int V)
{
    double sum = 0;
    int scored = 0;
    for (int i = 0; i < n; i++) {
        if (targets[i] < 0)
            continue;
        const float *row = logits + (size_t)i * V;
        double mx = row[0], z = 0;
        for (int v = 1; v < V; v++)
            mx = fmax(mx, row[v]);
        for (int v = 0; v < V; v++)
            z += exp(row[v] - mx);
        sum += mx + log(z) - row[targets[i]];
        scored++;
    }
    return scored ? sum / scored : 0.0;
}

double th_loss(void *p)
{
    th_loss_ctx *lc = p;
    pr_error err = { 0 };
    if (pr_model_forward(lc->m, &lc->batch, NULL, &err) != PR_OK) {
        fprintf(stderr, "forward: %s\n", err.msg);
        return NAN;
    }
    return th_mean_ce(pr_model_logits(lc->m), lc->batch.targets, lc->batch.B * lc->batch.T,
                      pr_model_get_config(lc->m)->vocab_size);
}

double th_forward_ce(pr_model *m, const int *tokens, const int *targets, int B, int T)
{
    pr_batch b = { .tokens = tokens, .targets = targets, .B = B, .T = T };
    pr_error err = { 0 };
    if (pr_model_forward(m, &b, NULL, &err) != PR_OK)
        fail_msg("forward: %s", err.msg);
    return th_mean_ce(pr_model_logits(m), targets, B * T, pr_model_get_config(m)->vocab_size);
}

float th_forward_backward(th_loss_ctx *lc)
{
    pr_error err = { 0 };
    float loss = 0.0f;
    pr_model_zero_grad(lc->m);
    int rc = pr_model_forward(lc->m, &lc->batch, &loss, &err);
    if (rc)
        fprintf(stderr, "forward: %s\n", err.msg);
    assert_int_equal(rc, PR_OK);
    rc = pr_model_backward(lc->m, &err);
    if (rc)
        fprintf(stderr, "backward: %s\n", err.msg);
    assert_int_equal(rc, PR_OK);
    return loss;
}

float *th_logits_copy(th_loss_ctx *lc)
{
    assert_false(isnan(th_loss(lc)));
    size_t n = (size_t)lc->batch.B * lc->batch.T * pr_model_get_config(lc->m)->vocab_size;
    float *c = malloc(n * sizeof *c);
    assert_non_null(c);
    memcpy(c, pr_model_logits(lc->m), n * sizeof *c);
    return c;
}

double th_max_abs_diff(const float *a, const float *b, size_t n)
{
    double d = 0;
    for (size_t i = 0; i < n; i++)
        d = fmax(d, fabs((double)a[i] - b[i]));
    return d;
}

void th_check_tensor_fd(th_loss_ctx *lc, const pr_tensor_info *t, const th_fd *fd)
{
    assert_non_null(t);
    assert_non_null(t->grad);
    /* a copy: the probes run forward passes only, but keep the gradient safe from them */
    float *g = malloc((size_t)t->numel * sizeof *g);
    assert_non_null(g);
    memcpy(g, t->grad, (size_t)t->numel * sizeof *g);
    double gmax = 0;
    for (int64_t j = 0; j < t->numel; j++)
        gmax = fmax(gmax, fabs(g[j]));
    if (!(gmax > fd->gmin))
        fprintf(stderr, "%s: gradient is zero everywhere\n", t->name);
    assert_true(gmax > fd->gmin);
    int bad = gc_check(t->name, t->data, g, (size_t)t->numel, th_loss, lc, fd->eps, fd->rtol, fd->atol, fd->probes);
    assert_int_equal(bad, 0);
    free(g);
}

int th_check_grads(th_loss_ctx *lc, const char *const *prefixes, int n_prefixes, int trainable_only,
                   const th_fd *fd)
{
    th_forward_backward(lc);
    int checked = 0;
    for (int i = 0; i < pr_model_n_tensors(lc->m); i++) {
        const pr_tensor_info *t = pr_model_tensor(lc->m, i);
        int match = 0;
        for (int k = 0; k < n_prefixes && !match; k++)
            match = strncmp(t->name, prefixes[k], strlen(prefixes[k])) == 0;
        if (!match || !t->grad || (trainable_only && !t->trainable))
            continue;
        th_check_tensor_fd(lc, t, fd);
        checked++;
    }
    return checked;
}

pr_tensor th_view2(float *data, int64_t r, int64_t c, int64_t ld)
{
    pr_tensor t = { .struct_size = sizeof(pr_tensor), .dtype = PR_DTYPE_F32, .device = PR_DEVICE_CPU, .ndim = 2,
                    .data = data };
    t.shape[0] = r;
    t.shape[1] = c;
    t.stride[0] = ld;
    t.stride[1] = 1;
    return t;
}

pr_tensor th_view1(float *data, int64_t n)
{
    pr_tensor t = { .struct_size = sizeof(pr_tensor), .dtype = PR_DTYPE_F32, .device = PR_DEVICE_CPU, .ndim = 1,
                    .data = data };
    t.shape[0] = n;
    t.stride[0] = 1;
    return t;
}

pr_tensor th_view(float *data, int ndim, const int64_t *shape)
{
    pr_tensor t = { .struct_size = sizeof(pr_tensor), .dtype = PR_DTYPE_F32, .device = PR_DEVICE_CPU, .ndim = ndim,
                    .data = data };
    int64_t st = 1;
    for (int d = ndim - 1; d >= 0; d--) {
        t.shape[d] = shape[d];
        t.stride[d] = st;
        st *= shape[d];
    }
    return t;
}

char th_last_error[512];

int th_host_error(const pr_ctx *ctx, const char *fmt, ...)
{
    (void)ctx;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(th_last_error, sizeof th_last_error, fmt, ap);
    va_end(ap);
    return 1;
}

/* splitmix64 (Steele, Lea & Flood 2014) */
static uint64_t th_rng_next(uint64_t *s)
{
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* 24 random bits -> [0, 1) */
static float th_rng_uniform(uint64_t *s)
{
    return (float)(th_rng_next(s) >> 40) / 16777216.0f;
}

void th_gemm(int ta, int tb, int M, int N, int K, float alpha, const float *A, int lda, const float *B, int ldb,
             float beta, float *C, int ldc)
{
    for (int i = 0; i < M; i++)
        for (int j = 0; j < N; j++) {
            double acc = 0.0;
            for (int k = 0; k < K; k++) {
                double a = ta ? A[(size_t)k * lda + i] : A[(size_t)i * lda + k];
                double b = tb ? B[(size_t)j * ldb + k] : B[(size_t)k * ldb + j];
                acc += a * b;
            }
            float *c = &C[(size_t)i * ldc + j];
            *c = (float)(alpha * acc + (beta == 0.0f ? 0.0 : (double)beta * *c));
        }
}

pr_host th_host = {
    .struct_size = sizeof(pr_host),
    .abi_major = PR_ABI_MAJOR,
    .abi_minor = PR_ABI_MINOR,
    .alloc = malloc,
    .free = free,
    .error = th_host_error,
    .rng_next = th_rng_next,
    .rng_uniform = th_rng_uniform,
    .gemm = th_gemm,
};

/* The services th_host does not replace come from the host's own table
 * (dropout, column sums, bias rows, base weights in f32, ...). */
__attribute__((constructor)) static void th_host_fill(void)
{
    const pr_host *h = host_services();
    th_host.log = h->log;
    th_host.rng_normal = h->rng_normal;
    th_host.act_forward = h->act_forward;
    th_host.act_backward = h->act_backward;
    th_host.softmax_rows = h->softmax_rows;
    th_host.softmax_rows_backward = h->softmax_rows_backward;
    th_host.parallel_for = h->parallel_for;
    th_host.dropout_mask = h->dropout_mask;
    th_host.dropout_apply = h->dropout_apply;
    th_host.dropout_backward = h->dropout_backward;
    th_host.col_sums = h->col_sums;
    th_host.add_bias_rows = h->add_bias_rows;
    th_host.base_weight_f32 = h->base_weight_f32;
    th_host.add_aux_loss = h->add_aux_loss;
    th_host.extension_data = h->extension_data;
}

pr_ctx *th_ctx_bind(th_ctx *t)
{
    for (int i = 0; i < TH_CTX_MAX; i++) {
        t->params_p[i] = &t->params[i];
        t->grads_p[i] = &t->grads[i];
        t->saved_p[i] = &t->saved[i];
        t->scratch_p[i] = &t->scratch[i];
        t->out_params_p[i] = &t->out_params[i];
    }
    pr_ctx *c = &t->c;
    c->struct_size = sizeof(pr_ctx);
    if (!c->host)
        c->host = &th_host;
    c->in = &t->in;
    c->out = &t->out;
    c->d_in = &t->d_in;
    c->d_out = &t->d_out;
    c->params = t->params_p;
    c->grads = t->grads_p;
    c->saved = t->saved_p;
    c->scratch = t->scratch_p;
    c->out_params = t->out_params_p;
    return c;
}

pr_ctx *th_ctx_init(th_ctx *t)
{
    memset(t, 0, sizeof *t);
    return th_ctx_bind(t);
}

pr_ctx *th_ctx_copy(th_ctx *dst, const th_ctx *src)
{
    if (dst != src)
        memcpy(dst, src, sizeof *dst);
    return th_ctx_bind(dst);
}
