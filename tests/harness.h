/* peftref tests: the harness the model and module tests share.
 *
 *  - th_plugin_open: a plugin built in the tree, opened with dlopen and its
 *    entry point called, as a host does;
 *  - th_model_new: a model created from a config and reserved for B x T;
 *  - th_loss_ctx: a fixed batch on a model, and th_loss, the mean
 *    cross-entropy recomputed in double from the logits (the function the
 *    finite-difference checks of gradcheck.h differentiate);
 *  - th_check_tensor_fd / th_check_grads: finite differences of th_loss for
 *    one tensor, or for every tensor whose name starts with a prefix;
 *  - th_host: a host table for driving a technique's callbacks directly;
 *  - th_registry_open, th_run_cli, th_temp_dir, th_remove_tree: the plugin
 *    registry of the build tree and the CLI run as a child process.
 * Every helper asserts with cmocka and prints the library's message first. */
#ifndef PEFTREF_TESTS_HARNESS_H
#define PEFTREF_TESTS_HARNESS_H

#include <stddef.h>
#include <stdint.h>

#include "peftref/peftref.h"
#include "peftref/module.h"
#include "peftref/plugin.h"

/* dlopen path (RTLD_NOW | RTLD_LOCAL) into *handle and return what the plugin's entry point
 * returns; NULL (with the dlerror on stderr) when it cannot be opened or has no entry point. */
const pr_plugin *th_plugin_open(const char *path, void **handle);

/* As th_plugin_open for a plugin that must carry exactly one technique: that technique, or NULL. */
const pr_technique *th_plugin_technique(const char *path, void **handle);

/* pr_registry_open(dir) into *reg, then require each of the n_need techniques in need. On failure
 * prints why (with the plugins the registry refused) and returns -1; 0 on success. For group
 * setups. */
int th_registry_open(const char *dir, const char *const *need, int n_need, pr_registry **reg);

/* Run the CLI bin with argv args (args[0] included, NULL-terminated) and PEFTREF_PLUGIN_PATH set to
 * plugin_dir; its stdout goes to out_path, its stderr to err_path (NULL: discarded). Returns the
 * exit status, -1 if it did not exit. */
int th_run_cli(const char *bin, const char *plugin_dir, const char *const *args, const char *out_path,
               const char *err_path);

/* A fresh directory from a mkdtemp template such as "/tmp/peftref-x-XXXXXX" (malloc'ed; asserted). */
char *th_temp_dir(const char *template_path);

/* A fresh directory $TMPDIR/<prefix>-XXXXXX (/tmp when TMPDIR is unset or empty), malloc'ed;
 * asserted. */
char *th_scratch_dir(const char *prefix);

/* Remove the plain files in dir and dir itself, then free(dir). */
void th_scratch_dir_free(char *dir);

/* rm -rf dir (asserted). */
void th_remove_tree(const char *dir);

/* The dimensions of a tiny GPT-2 test model: layers, d_model, heads, kv heads, d_head, d_ff,
 * vocabulary and maximum sequence length. */
typedef struct th_shape {
    int L, C, H, Hkv, hd, F, V, max_seq;
} th_shape;

/* The gpt2-tiny preset (asserted) with shape s, init_std 0.1 and the given seed. */
pr_model_config th_config(const th_shape *s, uint64_t seed);

/* The index of t's option called name, or -1; the option's declaration, or NULL. */
int th_option_index(const pr_technique *t, const char *name);
const pr_option_decl *th_option(const pr_technique *t, const char *name);

/* pr_module_attach(m, s) asserted to succeed (the message printed first); the module. */
pr_module *th_attach(pr_model *m, const pr_module_spec *s);

/* pr_model_create + pr_model_reserve(B, T); asserts both succeed. */
pr_model *th_model_new(const pr_model_config *c, int B, int T);

enum { TH_MAX_TOKENS = 64 };

/* A batch of B x T tokens and targets (B*T <= TH_MAX_TOKENS) on model m. */
typedef struct th_loss_ctx {
    pr_model *m;
    pr_batch batch;
    int tokens[TH_MAX_TOKENS], targets[TH_MAX_TOKENS];
} th_loss_ctx;

/* Zero lc and point its batch at its own arrays (B x T); the caller fills tokens and targets. */
void th_loss_bind(th_loss_ctx *lc, pr_model *m, int B, int T);

/* th_loss_bind with tokens and targets drawn alternately from rng_seed(seed), modulo V. */
void th_loss_init_rng(th_loss_ctx *lc, pr_model *m, int B, int T, unsigned seed);

/* Mean cross-entropy of logits (n,V) against targets, in double; rows with a negative target are
 * not scored (0 when none is). */
double th_mean_ce(const float *logits, const int *targets, int n, int V);

/* gc_loss_fn on a th_loss_ctx: forward, then th_mean_ce of the logits; NaN if forward fails. */
double th_loss(void *lc);

/* Forward of a B x T batch of tokens and targets on m (a failed forward fails the test), then
 * th_mean_ce of the logits: the strict counterpart of th_loss for tests that keep their own batch. */
double th_forward_ce(pr_model *m, const int *tokens, const int *targets, int B, int T);

/* Zero the gradients, forward and backward (both asserted); returns the forward's loss. */
float th_forward_backward(th_loss_ctx *lc);

/* The logits of one forward of lc (B*T*V floats, malloc'ed); asserts the loss is not NaN. */
float *th_logits_copy(th_loss_ctx *lc);

/* max_i |a[i] - b[i]| in double. */
double th_max_abs_diff(const float *a, const float *b, size_t n);

/* Finite-difference settings (gc_check's eps, rtol, atol, max_probe) and gmin: a checked gradient
 * must exceed gmin somewhere, since one that is zero everywhere would pass trivially. */
typedef struct th_fd {
    double eps, rtol, atol;
    size_t probes;
    double gmin;
} th_fd;

/* FD check of tensor t's gradient (already computed by the caller) against th_loss(lc): asserts t
 * has a gradient, max |g| > fd->gmin and that no probe fails. */
void th_check_tensor_fd(th_loss_ctx *lc, const pr_tensor_info *t, const th_fd *fd);

/* th_forward_backward(lc), then th_check_tensor_fd for every tensor with a gradient whose name
 * starts with one of the n_prefixes prefixes (and that is trainable, if trainable_only). Returns
 * how many tensors were checked. */
int th_check_grads(th_loss_ctx *lc, const char *const *prefixes, int n_prefixes, int trainable_only,
                   const th_fd *fd);

/* ---- a host table for calling plugin callbacks without a model ---- */

/* f32 CPU tensor views: (r, c) with row stride ld; (n); and contiguous row-major of ndim dims. */
pr_tensor th_view2(float *data, int64_t r, int64_t c, int64_t ld);
pr_tensor th_view1(float *data, int64_t n);
pr_tensor th_view(float *data, int ndim, const int64_t *shape);

/* The last message th_host_error formatted (clear it before a call that must fail). */
extern char th_last_error[512];

/* pr_host.error: formats into th_last_error; returns 1. */
int th_host_error(const pr_ctx *ctx, const char *fmt, ...);

/* pr_host.gemm: C = alpha op(A) op(B) + beta C, row-major, accumulated in double. */
void th_gemm(int ta, int tb, int M, int N, int K, float alpha, const float *A, int lda, const float *B, int ldb,
             float beta, float *C, int ldc);

/* malloc/free, th_host_error, splitmix64 rng_next/rng_uniform and th_gemm;
 * every other service is the host's own. */
extern pr_host th_host;

/* A context for calling a technique's callbacks by hand.  ABI 1's pr_ctx
 * points at its tensors (the site tensors, and arrays of pointers for
 * params, grads, saved, scratch and out_params); th_ctx holds the tensors
 * themselves and th_ctx_bind points c's fields at them, so a test fills
 * t.in = th_view2(...), t.params[0] = ..., sets c's counts and passes &t.c.
 * An unset site tensor has data NULL ("absent"), as the ABI wants.
 * base_weight, base_bias and bias_delta stay the test's own pointers.
 * th_ctx must not be copied with '=': the copy's c would point into the
 * original; th_ctx_copy copies and re-binds. */
enum { TH_CTX_MAX = 16 };

typedef struct th_ctx {
    pr_ctx c;
    pr_tensor in, out, d_in, d_out;
    pr_tensor params[TH_CTX_MAX], grads[TH_CTX_MAX], saved[TH_CTX_MAX], scratch[TH_CTX_MAX],
        out_params[TH_CTX_MAX];
    /* what c's pointer arrays hold: &params[i], ... (rebuilt by th_ctx_bind) */
    pr_tensor *params_p[TH_CTX_MAX], *grads_p[TH_CTX_MAX], *saved_p[TH_CTX_MAX], *scratch_p[TH_CTX_MAX],
        *out_params_p[TH_CTX_MAX];
} th_ctx;

/* Point t->c's tensor fields (in, out, d_in, d_out, params, grads, saved, scratch, out_params) at
 * t's own storage; sets c.struct_size and, when unset, c.host = &th_host.  Keeps every other field
 * of c and every tensor.  Returns &t->c. */
pr_ctx *th_ctx_bind(th_ctx *t);

/* Zero t, then th_ctx_bind(t). */
pr_ctx *th_ctx_init(th_ctx *t);

/* *dst = *src, then th_ctx_bind(dst): a copy whose c points into dst.  Returns &dst->c. */
pr_ctx *th_ctx_copy(th_ctx *dst, const th_ctx *src);

#endif
