/* Tests of modules: techniques attached to a model through the host's
 * integration forms.
 *
 * Each technique below is a static pr_technique descriptor with its
 * callbacks, built into the test exactly as a plugin would fill one (no
 * loader involved):
 *   tlora     parallel, scaled addition  alpha/r * x A^T B^T   (Hu et al. 2021)
 *   tlora_wd  the same low-rank delta through the weight-delta form
 *   tadapter  sequential bottleneck, direct addition           (Houlsby et al. 2019)
 *   tgated    parallel bottleneck, gated addition
 *   tia3      rescaling of keys and FFN activations            (Liu et al. 2022)
 *   tprompt   concatenation at the embedding                   (Lester et al. 2021)
 *   tprompt_text  the same, initialised from the embeddings of a text
 *   tprefix   concatenation to K and V in every layer          (Li and Liang 2021)
 *   tcustom   custom integration y <- y (1 + g) + x U
 *   tbitfit   selection of the biases                          (Ben Zaken et al. 2022)
 *   tshared   global, per-layer and per-site parameter copies
 *   tfail     a forward that reports an error
 *
 * For each: finite-difference checks of every module parameter's gradient
 * through the whole model's loss, parameter counts against the papers'
 * formulas on two model shapes (plan and attach agree), identity at
 * initialisation where the init makes the module a no-op, merge/unmerge,
 * and the errors for bad options and sites.
 *
 * Model: L=2, C=32, H=4, F=64, V=64, B=2, T=6, init_std 0.1 (see
 * test_model.c for why not 0.02).  Tolerances for the finite differences
 * are test_model.c's (FD_*): central differences with eps 3e-3 of the
 * mean cross-entropy recomputed in double from the logits. */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "peftref/peftref.h"
#include "peftref/module.h"
#include "peftref/plugin.h"
#include "rng.h"
#include "gradcheck.h"
#include "harness.h"

#define FD_EPS 3e-3
#define FD_RTOL 5e-2
#define FD_ATOL 1e-4
#define FD_PROBES 6

/* a checked module gradient must not vanish everywhere */
static const th_fd FD_CHECK = { FD_EPS, FD_RTOL, FD_ATOL, FD_PROBES, 1e-6 };

enum { TB = 2, TT = 6 };

/* ---- helpers for the techniques' callbacks ------------------------------------ */

#define PD(c, i) ((float *)(c)->params[i]->data)
#define GD(c, i) ((float *)(c)->grads[i]->data)
#define LD(t) ((int)(t)->stride[0])
#define FD(t) ((float *)(t)->data)

/* g (cols) += column sums of a (rows, cols; ld) */
static void colsum_acc(float *g, const float *a, int ld, int rows, int cols)
{
    for (int r = 0; r < rows; r++)
        for (int j = 0; j < cols; j++)
            g[j] += a[(size_t)r * ld + j];
}

/* ---- tlora: h = x A^T B^T, y += (alpha/r) h --------------------------------------- */

enum { L_A = 0, L_B = 1 };

static int lora_forward(const pr_ctx *c)
{
    const pr_host *h = c->host;
    int r = (int)c->params[L_A]->shape[0], din = (int)c->params[L_A]->shape[1];
    int dout = (int)c->params[L_B]->shape[0];
    float *xa = FD(c->saved[0]);
    h->gemm(0, 1, c->rows, r, din, 1.0f, FD(c->in), LD(c->in), PD(c, L_A), din, 0.0f, xa, r);
    h->gemm(0, 1, c->rows, dout, r, 1.0f, xa, r, PD(c, L_B), r, 0.0f, FD(c->out), LD(c->out));
    return 0;
}

static int lora_backward(const pr_ctx *c)
{
    const pr_host *h = c->host;
    int r = (int)c->params[L_A]->shape[0], din = (int)c->params[L_A]->shape[1];
    int dout = (int)c->params[L_B]->shape[0], rows = c->rows;
    const float *xa = FD(c->saved[0]);
    float *dxa = FD(c->scratch[0]);
    if (GD(c, L_B))
        h->gemm(1, 0, dout, r, rows, 1.0f, FD(c->d_out), LD(c->d_out), xa, r, 1.0f, GD(c, L_B), r);
    h->gemm(0, 0, rows, r, dout, 1.0f, FD(c->d_out), LD(c->d_out), PD(c, L_B), r, 0.0f, dxa, r);
    if (GD(c, L_A))
        h->gemm(1, 0, r, din, rows, 1.0f, dxa, r, FD(c->in), LD(c->in), 1.0f, GD(c, L_A), din);
    if (c->d_in->data)
        h->gemm(0, 0, rows, din, r, 1.0f, dxa, r, PD(c, L_A), din, 1.0f, FD(c->d_in), LD(c->d_in));
    return 0;
}

/* delta (d_in, d_out) = s A^T B^T */
static int lora_merge(const pr_ctx *c)
{
    int r = (int)c->params[L_A]->shape[0], din = (int)c->params[L_A]->shape[1];
    int dout = (int)c->params[L_B]->shape[0];
    c->host->gemm(1, 1, din, dout, r, c->scale, PD(c, L_A), din, PD(c, L_B), r, 0.0f, FD(c->out), LD(c->out));
    return 0;
}

/* weight-delta form: d_out is G = dL/d(delta) (d_in, d_out);
 * dA += s B^T G^T, dB += s G^T A^T */
static int lora_wd_backward(const pr_ctx *c)
{
    int r = (int)c->params[L_A]->shape[0], din = (int)c->params[L_A]->shape[1];
    int dout = (int)c->params[L_B]->shape[0];
    const float *G = FD(c->d_out);
    if (GD(c, L_A))
        c->host->gemm(1, 1, r, din, dout, c->scale, PD(c, L_B), r, G, LD(c->d_out), 1.0f, GD(c, L_A), din);
    if (GD(c, L_B))
        c->host->gemm(1, 1, dout, r, din, c->scale, G, LD(c->d_out), PD(c, L_A), din, 1.0f, GD(c, L_B), r);
    return 0;
}

static const pr_option_decl lora_options[] = {
    { .struct_size = sizeof(pr_option_decl), .name = "r", .type = PR_OPT_INT, .def = 4, .min = 1, .max = 4096,
      .help = "rank", .per_site = 1 },
    { .struct_size = sizeof(pr_option_decl), .name = "alpha", .type = PR_OPT_FLOAT, .def = 8, .min = 0, .max = 1e6,
      .help = "scale numerator" },
    { .struct_size = sizeof(pr_option_decl), .name = "act", .type = PR_OPT_ENUM, .def = 0,
      .choices = (const char *const[]){ "none", "relu", NULL }, .help = "unused" },
};

static const pr_param_decl lora_params[] = {
    { .struct_size = sizeof(pr_param_decl), .name = "lora_A", .shape = "r, d_in", .init = PR_INIT_KAIMING_UNIFORM,
      .init_arg = "sqrt(5)", .scope = PR_SCOPE_INSERTION },
    { .struct_size = sizeof(pr_param_decl), .name = "lora_B", .shape = "d_out, r", .init = PR_INIT_ZEROS,
      .scope = PR_SCOPE_INSERTION },
};

static const pr_buffer_decl lora_saved[] = { { sizeof(pr_buffer_decl), "xa", "rows, r" } };
static const pr_buffer_decl lora_scratch[] = { { sizeof(pr_buffer_decl), "dxa", "rows, r" } };

#define LORA_SITES                                                                                          \
    (PR_SITE_BIT(PR_SITE_QKV) | PR_SITE_BIT(PR_SITE_Q) | PR_SITE_BIT(PR_SITE_K) | PR_SITE_BIT(PR_SITE_V) | \
     PR_SITE_BIT(PR_SITE_O) | PR_SITE_BIT(PR_SITE_FFN_UP) | PR_SITE_BIT(PR_SITE_FFN_GATE) |                \
     PR_SITE_BIT(PR_SITE_FFN_DOWN))

static const pr_technique tlora = {
    .struct_size = sizeof(pr_technique), .abi_major = PR_ABI_MAJOR, .name = "tlora", .version = "0.1.0",
    .intra = PR_INTRA_FACTORISED, .inter = PR_INTER_FIXED, .adaptation = PR_ADAPT_REPARAMETERISATION,
    .sharing = PR_SHARE_NONE, .input = PR_INPUT_HIDDEN, .insertion = PR_INSERT_PARALLEL,
    .insertions = PR_INSERTIONS_PER_SITE_LAYER, .integration = PR_INTEGRATE_SCALED_ADD, .workspace = PR_WS_ATTENTION,
    .options = lora_options, .n_options = 3, .sites = LORA_SITES,
    .default_sites = PR_SITE_BIT(PR_SITE_Q) | PR_SITE_BIT(PR_SITE_V), .params = lora_params, .n_params = 2,
    .saved = lora_saved, .n_saved = 1, .scratch = lora_scratch, .n_scratch = 1, .scale_expr = "alpha / r",
    .forward = lora_forward, .backward = lora_backward, .merge = lora_merge,
};

static const pr_technique tlora_wd = {
    .struct_size = sizeof(pr_technique), .abi_major = PR_ABI_MAJOR, .name = "tlora_wd", .version = "0.1.0",
    .intra = PR_INTRA_FACTORISED, .inter = PR_INTER_FIXED, .adaptation = PR_ADAPT_REPARAMETERISATION,
    .sharing = PR_SHARE_NONE, .input = PR_INPUT_WEIGHTS, .insertion = PR_INSERT_PARALLEL,
    .insertions = PR_INSERTIONS_PER_SITE_LAYER, .integration = PR_INTEGRATE_WEIGHT_DELTA,
    .workspace = PR_WS_ATTENTION, .options = lora_options, .n_options = 3, .sites = LORA_SITES,
    .default_sites = PR_SITE_BIT(PR_SITE_Q) | PR_SITE_BIT(PR_SITE_V), .params = lora_params, .n_params = 2,
    .scale_expr = "alpha / r", .backward = lora_wd_backward, .merge = lora_merge,
};

/* ---- tadapter / tgated: h = act(in Wd + bd) Wu + bu --------------------------------- */

enum { A_DW = 0, A_DB = 1, A_UW = 2, A_UB = 3 };

static int adapter_forward(const pr_ctx *c)
{
    const pr_host *h = c->host;
    int din = (int)c->params[A_DW]->shape[0], m = (int)c->params[A_DW]->shape[1];
    int dout = (int)c->params[A_UW]->shape[1], rows = c->rows;
    float *z = FD(c->saved[0]), *a = FD(c->saved[1]);
    h->gemm(0, 0, rows, m, din, 1.0f, FD(c->in), LD(c->in), PD(c, A_DW), m, 0.0f, z, m);
    for (int r = 0; r < rows; r++)
        for (int j = 0; j < m; j++)
            z[(size_t)r * m + j] += PD(c, A_DB)[j];
    h->act_forward(PR_ACT_GELU, a, z, (size_t)rows * m);
    h->gemm(0, 0, rows, dout, m, 1.0f, a, m, PD(c, A_UW), dout, 0.0f, FD(c->out), LD(c->out));
    float *out = FD(c->out);
    for (int r = 0; r < rows; r++)
        for (int j = 0; j < dout; j++)
            out[(size_t)r * LD(c->out) + j] += PD(c, A_UB)[j];
    return 0;
}

static int adapter_backward(const pr_ctx *c)
{
    const pr_host *h = c->host;
    int din = (int)c->params[A_DW]->shape[0], m = (int)c->params[A_DW]->shape[1];
    int dout = (int)c->params[A_UW]->shape[1], rows = c->rows;
    const float *z = FD(c->saved[0]), *a = FD(c->saved[1]);
    float *da = FD(c->scratch[0]), *dz = FD(c->scratch[1]);
    const float *dy = FD(c->d_out);
    if (GD(c, A_UW))
        h->gemm(1, 0, m, dout, rows, 1.0f, a, m, dy, LD(c->d_out), 1.0f, GD(c, A_UW), dout);
    if (GD(c, A_UB))
        colsum_acc(GD(c, A_UB), dy, LD(c->d_out), rows, dout);
    h->gemm(0, 1, rows, m, dout, 1.0f, dy, LD(c->d_out), PD(c, A_UW), dout, 0.0f, da, m);
    memset(dz, 0, (size_t)rows * m * sizeof(float));
    h->act_backward(PR_ACT_GELU, dz, z, da, (size_t)rows * m);
    if (GD(c, A_DW))
        h->gemm(1, 0, din, m, rows, 1.0f, FD(c->in), LD(c->in), dz, m, 1.0f, GD(c, A_DW), m);
    if (GD(c, A_DB))
        colsum_acc(GD(c, A_DB), dz, m, rows, m);
    if (c->d_in->data)
        h->gemm(0, 1, rows, din, m, 1.0f, dz, m, PD(c, A_DW), m, 1.0f, FD(c->d_in), LD(c->d_in));
    return 0;
}

static const pr_option_decl adapter_options[] = {
    { .struct_size = sizeof(pr_option_decl), .name = "m", .type = PR_OPT_INT, .def = 4, .min = 1, .max = 1 << 20,
      .help = "bottleneck width" },
};

static const pr_param_decl adapter_params[] = {
    { .struct_size = sizeof(pr_param_decl), .name = "down.weight", .shape = "d_in, m", .init = PR_INIT_NORMAL,
      .init_arg = "0.1", .scope = PR_SCOPE_INSERTION },
    { .struct_size = sizeof(pr_param_decl), .name = "down.bias", .shape = "m", .init = PR_INIT_ZEROS,
      .scope = PR_SCOPE_INSERTION },
    { .struct_size = sizeof(pr_param_decl), .name = "up.weight", .shape = "m, d_out", .init = PR_INIT_ZEROS,
      .scope = PR_SCOPE_INSERTION },
    { .struct_size = sizeof(pr_param_decl), .name = "up.bias", .shape = "d_out", .init = PR_INIT_ZEROS,
      .scope = PR_SCOPE_INSERTION },
};

static const pr_buffer_decl adapter_saved[] = { { sizeof(pr_buffer_decl), "z", "rows, m" },
                                                { sizeof(pr_buffer_decl), "a", "rows, m" } };
static const pr_buffer_decl adapter_scratch[] = { { sizeof(pr_buffer_decl), "da", "rows, m" },
                                                  { sizeof(pr_buffer_decl), "dz", "rows, m" } };

#define STREAM_SITES \
    (PR_SITE_BIT(PR_SITE_ATTN_OUT) | PR_SITE_BIT(PR_SITE_FFN_OUT) | PR_SITE_BIT(PR_SITE_BLOCK_OUT))

static const pr_technique tadapter = {
    .struct_size = sizeof(pr_technique), .abi_major = PR_ABI_MAJOR, .name = "tadapter", .version = "0.1.0",
    .intra = PR_INTRA_DENSE, .inter = PR_INTER_FIXED, .adaptation = PR_ADAPT_ADDITION, .sharing = PR_SHARE_NONE,
    .input = PR_INPUT_HIDDEN, .insertion = PR_INSERT_SEQUENTIAL, .insertions = PR_INSERTIONS_PER_SITE_LAYER,
    .integration = PR_INTEGRATE_DIRECT_ADD, .workspace = PR_WS_ATTENTION | PR_WS_FFN, .options = adapter_options,
    .n_options = 1, .sites = STREAM_SITES,
    .default_sites = PR_SITE_BIT(PR_SITE_ATTN_OUT) | PR_SITE_BIT(PR_SITE_FFN_OUT), .params = adapter_params,
    .n_params = 4, .saved = adapter_saved, .n_saved = 2, .scratch = adapter_scratch, .n_scratch = 2,
    .forward = adapter_forward, .backward = adapter_backward,
};

static const pr_technique tgated = {
    .struct_size = sizeof(pr_technique), .abi_major = PR_ABI_MAJOR, .name = "tgated", .version = "0.1.0",
    .intra = PR_INTRA_DENSE, .inter = PR_INTER_FIXED, .adaptation = PR_ADAPT_ADDITION, .sharing = PR_SHARE_NONE,
    .input = PR_INPUT_HIDDEN, .insertion = PR_INSERT_PARALLEL, .insertions = PR_INSERTIONS_PER_SITE_LAYER,
    .integration = PR_INTEGRATE_GATED_ADD, .workspace = PR_WS_ATTENTION | PR_WS_FFN, .options = adapter_options,
    .n_options = 1, .sites = STREAM_SITES | PR_SITE_BIT(PR_SITE_FFN_UP),
    .default_sites = PR_SITE_BIT(PR_SITE_ATTN_OUT) | PR_SITE_BIT(PR_SITE_FFN_OUT), .params = adapter_params,
    .n_params = 4, .saved = adapter_saved, .n_saved = 2, .scratch = adapter_scratch, .n_scratch = 2,
    .forward = adapter_forward, .backward = adapter_backward,
};

/* ---- tia3: y *= l (one row) ------------------------------------------------------------ */

static int ia3_forward(const pr_ctx *c)
{
    memcpy(FD(c->out), PD(c, 0), (size_t)c->params[0]->shape[0] * sizeof(float));
    return 0;
}

static int ia3_backward(const pr_ctx *c)
{
    if (GD(c, 0))
        colsum_acc(GD(c, 0), FD(c->d_out), LD(c->d_out), 1, (int)c->params[0]->shape[0]);
    return 0;
}

static const pr_param_decl ia3_params[] = {
    { .struct_size = sizeof(pr_param_decl), .name = "ia3_l", .shape = "d_out", .init = PR_INIT_ONES,
      .scope = PR_SCOPE_INSERTION },
};

static const pr_technique tia3 = {
    .struct_size = sizeof(pr_technique), .abi_major = PR_ABI_MAJOR, .name = "tia3", .version = "0.1.0",
    .intra = PR_INTRA_NONE, .inter = PR_INTER_FIXED, .adaptation = PR_ADAPT_RESCALING, .sharing = PR_SHARE_NONE,
    .input = PR_INPUT_NONE, .insertion = PR_INSERT_SEQUENTIAL, .insertions = PR_INSERTIONS_PER_SITE_LAYER,
    .integration = PR_INTEGRATE_RESCALE, .workspace = PR_WS_ATTENTION | PR_WS_FFN,
    .sites = PR_SITE_BIT(PR_SITE_ATTN_K) | PR_SITE_BIT(PR_SITE_ATTN_V) | PR_SITE_BIT(PR_SITE_FFN_ACT) |
             PR_SITE_BIT(PR_SITE_K),
    .default_sites = PR_SITE_BIT(PR_SITE_ATTN_K) | PR_SITE_BIT(PR_SITE_ATTN_V) | PR_SITE_BIT(PR_SITE_FFN_ACT),
    .params = ia3_params, .n_params = 1, .forward = ia3_forward, .backward = ia3_backward,
};

/* tbig: tia3 with a parameter whose shape, at a real model, is far too
 * large (768^4 elements at GPT-2 small): refused when planned */
static const pr_param_decl big_params[] = {
    { .struct_size = sizeof(pr_param_decl), .name = "huge", .shape = "d_model * d_model * d_model * d_model",
      .init = PR_INIT_ONES, .scope = PR_SCOPE_INSERTION },
};

static const pr_technique tbig = {
    .struct_size = sizeof(pr_technique), .abi_major = PR_ABI_MAJOR, .name = "tbig", .version = "0.1.0",
    .intra = PR_INTRA_NONE, .inter = PR_INTER_FIXED, .adaptation = PR_ADAPT_RESCALING, .sharing = PR_SHARE_NONE,
    .input = PR_INPUT_NONE, .insertion = PR_INSERT_SEQUENTIAL, .insertions = PR_INSERTIONS_PER_SITE_LAYER,
    .integration = PR_INTEGRATE_RESCALE, .workspace = PR_WS_ATTENTION | PR_WS_FFN,
    .sites = PR_SITE_BIT(PR_SITE_FFN_ACT), .default_sites = PR_SITE_BIT(PR_SITE_FFN_ACT),
    .params = big_params, .n_params = 1, .forward = ia3_forward, .backward = ia3_backward,
};

/* ---- tprompt / tprefix: the virtual rows are the parameter itself ----------------------------- */

static int rows_forward(const pr_ctx *c)
{
    int n = (int)c->params[0]->shape[0], w = (int)c->params[0]->shape[1];
    for (int r = 0; r < n; r++)
        memcpy(FD(c->out) + (size_t)r * LD(c->out), PD(c, 0) + (size_t)r * w, (size_t)w * sizeof(float));
    return 0;
}

static int rows_backward(const pr_ctx *c)
{
    int n = (int)c->params[0]->shape[0], w = (int)c->params[0]->shape[1];
    if (!GD(c, 0))
        return 0;
    for (int r = 0; r < n; r++)
        for (int j = 0; j < w; j++)
            GD(c, 0)[(size_t)r * w + j] += FD(c->d_out)[(size_t)r * LD(c->d_out) + j];
    return 0;
}

static const pr_option_decl prompt_options[] = {
    { .struct_size = sizeof(pr_option_decl), .name = "n_tokens", .type = PR_OPT_INT, .def = 3, .min = 1, .max = 64,
      .help = "virtual tokens" },
    { .struct_size = sizeof(pr_option_decl), .name = "init_text", .type = PR_OPT_STRING, .def_str = "",
      .help = "text whose embeddings initialise the prompt" },
};

static const pr_param_decl prompt_params[] = {
    { .struct_size = sizeof(pr_param_decl), .name = "prompt", .shape = "n_tokens, d_model",
      .init = PR_INIT_EMBED_ROWS, .scope = PR_SCOPE_INSERTION },
};
static const pr_param_decl prompt_text_params[] = {
    { .struct_size = sizeof(pr_param_decl), .name = "prompt", .shape = "n_tokens, d_model", .init = PR_INIT_TEXT,
      .scope = PR_SCOPE_INSERTION, .init_source = "init_text" },
};
static const pr_param_decl prefix_params[] = {
    { .struct_size = sizeof(pr_param_decl), .name = "prefix", .shape = "n_tokens, d_out", .init = PR_INIT_NORMAL,
      .init_arg = "0.5", .scope = PR_SCOPE_INSERTION },
};

static const pr_technique tprompt = {
    .struct_size = sizeof(pr_technique), .abi_major = PR_ABI_MAJOR, .name = "tprompt", .version = "0.1.0",
    .intra = PR_INTRA_NONE, .inter = PR_INTER_DYNAMIC, .adaptation = PR_ADAPT_ADDITION, .sharing = PR_SHARE_NONE,
    .input = PR_INPUT_EMBEDDINGS, .insertion = PR_INSERT_CONCATENATIVE, .insertions = PR_INSERTIONS_ONCE,
    .integration = PR_INTEGRATE_CONCAT, .workspace = PR_WS_EMBEDDING, .options = prompt_options, .n_options = 2,
    .sites = PR_SITE_BIT(PR_SITE_EMBED), .default_sites = PR_SITE_BIT(PR_SITE_EMBED), .params = prompt_params,
    .n_params = 1, .n_virtual = "n_tokens", .forward = rows_forward, .backward = rows_backward,
};

static const pr_technique tprompt_text = {
    .struct_size = sizeof(pr_technique), .abi_major = PR_ABI_MAJOR, .name = "tprompt_text", .version = "0.1.0",
    .intra = PR_INTRA_NONE, .inter = PR_INTER_DYNAMIC, .adaptation = PR_ADAPT_ADDITION, .sharing = PR_SHARE_NONE,
    .input = PR_INPUT_EMBEDDINGS, .insertion = PR_INSERT_CONCATENATIVE, .insertions = PR_INSERTIONS_ONCE,
    .integration = PR_INTEGRATE_CONCAT, .workspace = PR_WS_EMBEDDING, .options = prompt_options, .n_options = 2,
    .sites = PR_SITE_BIT(PR_SITE_EMBED), .default_sites = PR_SITE_BIT(PR_SITE_EMBED),
    .params = prompt_text_params, .n_params = 1, .n_virtual = "n_tokens", .forward = rows_forward,
    .backward = rows_backward,
};

static const pr_technique tprefix = {
    .struct_size = sizeof(pr_technique), .abi_major = PR_ABI_MAJOR, .name = "tprefix", .version = "0.1.0",
    .intra = PR_INTRA_NONE, .inter = PR_INTER_DYNAMIC, .adaptation = PR_ADAPT_ADDITION, .sharing = PR_SHARE_NONE,
    .input = PR_INPUT_NONE, .insertion = PR_INSERT_CONCATENATIVE, .insertions = PR_INSERTIONS_PER_SITE_LAYER,
    .integration = PR_INTEGRATE_CONCAT, .workspace = PR_WS_ATTENTION, .options = prompt_options, .n_options = 1,
    .sites = PR_SITE_BIT(PR_SITE_ATTN_K) | PR_SITE_BIT(PR_SITE_ATTN_V),
    .default_sites = PR_SITE_BIT(PR_SITE_ATTN_K) | PR_SITE_BIT(PR_SITE_ATTN_V), .params = prefix_params,
    .n_params = 1, .n_virtual = "n_tokens", .forward = rows_forward, .backward = rows_backward,
};

/* ---- tcustom: y <- y (1 + g) + x U ----------------------------------------------------------- */

enum { C_G = 0, C_U = 1 };

static int custom_forward(const pr_ctx *c)
{
    int din = (int)c->params[C_U]->shape[0], dout = (int)c->params[C_U]->shape[1], rows = c->rows;
    float *y = FD(c->out), *yo = FD(c->saved[0]);
    const float *g = PD(c, C_G);
    for (int r = 0; r < rows; r++)
        for (int j = 0; j < dout; j++) {
            float *v = y + (size_t)r * LD(c->out) + j;
            yo[(size_t)r * dout + j] = *v;
            *v *= 1.0f + g[j];
        }
    c->host->gemm(0, 0, rows, dout, din, 1.0f, FD(c->in), LD(c->in), PD(c, C_U), dout, 1.0f, y, LD(c->out));
    return 0;
}

static int custom_backward(const pr_ctx *c)
{
    int din = (int)c->params[C_U]->shape[0], dout = (int)c->params[C_U]->shape[1], rows = c->rows;
    float *dy = FD(c->d_out);
    const float *yo = FD(c->saved[0]), *g = PD(c, C_G);
    int ld = LD(c->d_out);
    if (GD(c, C_U))
        c->host->gemm(1, 0, din, dout, rows, 1.0f, FD(c->in), LD(c->in), dy, ld, 1.0f, GD(c, C_U), dout);
    if (c->d_in->data)
        c->host->gemm(0, 1, rows, din, dout, 1.0f, dy, ld, PD(c, C_U), dout, 1.0f, FD(c->d_in), LD(c->d_in));
    for (int r = 0; r < rows; r++)
        for (int j = 0; j < dout; j++) {
            float *d = dy + (size_t)r * ld + j;
            if (GD(c, C_G))
                GD(c, C_G)[j] += *d * yo[(size_t)r * dout + j];
            *d *= 1.0f + g[j];
        }
    return 0;
}

static const pr_param_decl custom_params[] = {
    { .struct_size = sizeof(pr_param_decl), .name = "g", .shape = "d_out", .init = PR_INIT_ZEROS,
      .scope = PR_SCOPE_INSERTION },
    { .struct_size = sizeof(pr_param_decl), .name = "U", .shape = "d_in, d_out", .init = PR_INIT_ZEROS,
      .scope = PR_SCOPE_INSERTION },
};
static const pr_buffer_decl custom_saved[] = { { sizeof(pr_buffer_decl), "y_old", "rows, d_out" } };

static const pr_technique tcustom = {
    .struct_size = sizeof(pr_technique), .abi_major = PR_ABI_MAJOR, .name = "tcustom", .version = "0.1.0",
    .intra = PR_INTRA_DENSE, .inter = PR_INTER_FIXED, .adaptation = PR_ADAPT_ADDITION, .sharing = PR_SHARE_NONE,
    .input = PR_INPUT_HIDDEN, .insertion = PR_INSERT_PARALLEL, .insertions = PR_INSERTIONS_PER_LAYER,
    .integration = PR_INTEGRATE_CUSTOM, .workspace = PR_WS_ATTENTION | PR_WS_FFN,
    .sites = PR_SITE_BIT(PR_SITE_O) | PR_SITE_BIT(PR_SITE_FFN_DOWN), .default_sites = PR_SITE_BIT(PR_SITE_O),
    .params = custom_params, .n_params = 2, .saved = custom_saved, .n_saved = 1,
    .integrate_forward = custom_forward, .integrate_backward = custom_backward,
};

/* ---- tbitfit: the biases become trainable ------------------------------------------------------- */

static const pr_technique tbitfit = {
    .struct_size = sizeof(pr_technique), .abi_major = PR_ABI_MAJOR, .name = "tbitfit", .version = "0.1.0",
    .intra = PR_INTRA_NONE, .inter = PR_INTER_FIXED, .adaptation = PR_ADAPT_SELECTION, .sharing = PR_SHARE_NONE,
    .input = PR_INPUT_NONE, .insertion = PR_INSERT_IN_PLACE, .insertions = PR_INSERTIONS_NONE,
    .integration = PR_INTEGRATE_SELECT, .workspace = PR_WS_ATTENTION | PR_WS_FFN | PR_WS_NORM,
    .select_kinds = PR_BASE_BIAS | PR_BASE_NORM_BIAS,
};

/* ---- tshared: h = (x A) Bm + c; A global, Bm per layer, c per site ------------------------------ */

enum { S_A = 0, S_B = 1, S_C = 2 };

static int shared_forward(const pr_ctx *c)
{
    const pr_host *h = c->host;
    int din = (int)c->params[S_A]->shape[0], r = (int)c->params[S_A]->shape[1];
    int dout = (int)c->params[S_B]->shape[1], rows = c->rows;
    float *t = FD(c->saved[0]);
    h->gemm(0, 0, rows, r, din, 1.0f, FD(c->in), LD(c->in), PD(c, S_A), r, 0.0f, t, r);
    h->gemm(0, 0, rows, dout, r, 1.0f, t, r, PD(c, S_B), dout, 0.0f, FD(c->out), LD(c->out));
    for (int i = 0; i < rows; i++)
        for (int j = 0; j < dout; j++)
            FD(c->out)[(size_t)i * LD(c->out) + j] += PD(c, S_C)[j];
    return 0;
}

static int shared_backward(const pr_ctx *c)
{
    const pr_host *h = c->host;
    int din = (int)c->params[S_A]->shape[0], r = (int)c->params[S_A]->shape[1];
    int dout = (int)c->params[S_B]->shape[1], rows = c->rows;
    const float *t = FD(c->saved[0]), *dy = FD(c->d_out);
    float *dt = FD(c->scratch[0]);
    if (GD(c, S_B))
        h->gemm(1, 0, r, dout, rows, 1.0f, t, r, dy, LD(c->d_out), 1.0f, GD(c, S_B), dout);
    if (GD(c, S_C))
        colsum_acc(GD(c, S_C), dy, LD(c->d_out), rows, dout);
    h->gemm(0, 1, rows, r, dout, 1.0f, dy, LD(c->d_out), PD(c, S_B), dout, 0.0f, dt, r);
    if (GD(c, S_A))
        h->gemm(1, 0, din, r, rows, 1.0f, FD(c->in), LD(c->in), dt, r, 1.0f, GD(c, S_A), r);
    if (c->d_in->data)
        h->gemm(0, 1, rows, din, r, 1.0f, dt, r, PD(c, S_A), r, 1.0f, FD(c->d_in), LD(c->d_in));
    return 0;
}

static const pr_option_decl shared_options[] = {
    { .struct_size = sizeof(pr_option_decl), .name = "r", .type = PR_OPT_INT, .def = 3, .min = 1, .max = 64,
      .help = "rank" },
};
static const pr_param_decl shared_params[] = {
    { .struct_size = sizeof(pr_param_decl), .name = "A", .shape = "d_in, r", .init = PR_INIT_NORMAL,
      .init_arg = "0.3", .scope = PR_SCOPE_GLOBAL },
    { .struct_size = sizeof(pr_param_decl), .name = "Bm", .shape = "r, d_out", .init = PR_INIT_UNIFORM,
      .init_arg = "0.3", .scope = PR_SCOPE_LAYER },
    { .struct_size = sizeof(pr_param_decl), .name = "c", .shape = "d_out", .init = PR_INIT_CONSTANT,
      .init_arg = "0.05", .scope = PR_SCOPE_SITE },
};
static const pr_buffer_decl shared_saved[] = { { sizeof(pr_buffer_decl), "t", "rows, r" } };
static const pr_buffer_decl shared_scratch[] = { { sizeof(pr_buffer_decl), "dt", "rows, r" } };

static const pr_technique tshared = {
    .struct_size = sizeof(pr_technique), .abi_major = PR_ABI_MAJOR, .name = "tshared", .version = "0.1.0",
    .intra = PR_INTRA_FACTORISED, .inter = PR_INTER_FIXED, .adaptation = PR_ADAPT_ADDITION,
    .sharing = PR_SHARE_ACROSS_LAYERS, .input = PR_INPUT_HIDDEN, .insertion = PR_INSERT_PARALLEL,
    .insertions = PR_INSERTIONS_PER_SITE_LAYER, .integration = PR_INTEGRATE_DIRECT_ADD, .workspace = PR_WS_ATTENTION,
    .options = shared_options, .n_options = 1, .sites = PR_SITE_BIT(PR_SITE_Q) | PR_SITE_BIT(PR_SITE_V),
    .default_sites = PR_SITE_BIT(PR_SITE_Q) | PR_SITE_BIT(PR_SITE_V), .params = shared_params, .n_params = 3,
    .saved = shared_saved, .n_saved = 1, .scratch = shared_scratch, .n_scratch = 1,
    .forward = shared_forward, .backward = shared_backward,
};

/* ---- tfail: forward reports an error ----------------------------------------------------------- */

static int fail_forward(const pr_ctx *c)
{
    return c->host->error(c, "boom %d", 7);
}

static const pr_technique tfail = {
    .struct_size = sizeof(pr_technique), .abi_major = PR_ABI_MAJOR, .name = "tfail", .version = "0.1.0",
    .intra = PR_INTRA_NONE, .inter = PR_INTER_FIXED, .adaptation = PR_ADAPT_ADDITION, .sharing = PR_SHARE_NONE,
    .input = PR_INPUT_HIDDEN, .insertion = PR_INSERT_PARALLEL, .insertions = PR_INSERTIONS_PER_SITE_LAYER,
    .integration = PR_INTEGRATE_DIRECT_ADD, .workspace = PR_WS_ATTENTION, .sites = PR_SITE_BIT(PR_SITE_Q),
    .default_sites = PR_SITE_BIT(PR_SITE_Q), .forward = fail_forward, .backward = fail_forward,
};

/* ---- tbadbuf: a saved buffer whose shape is empty at ffn.up (64 - d_out = 0) ---- */

static const pr_buffer_decl badbuf_saved[] = { { sizeof(pr_buffer_decl), "bad", "rows, 64 - d_out" } };

static const pr_technique tbadbuf = {
    .struct_size = sizeof(pr_technique), .abi_major = PR_ABI_MAJOR, .name = "tbadbuf", .version = "0.1.0",
    .intra = PR_INTRA_NONE, .inter = PR_INTER_FIXED, .adaptation = PR_ADAPT_ADDITION, .sharing = PR_SHARE_NONE,
    .input = PR_INPUT_HIDDEN, .insertion = PR_INSERT_PARALLEL, .insertions = PR_INSERTIONS_PER_SITE_LAYER,
    .integration = PR_INTEGRATE_DIRECT_ADD, .workspace = PR_WS_ATTENTION | PR_WS_FFN,
    .sites = PR_SITE_BIT(PR_SITE_Q) | PR_SITE_BIT(PR_SITE_FFN_UP),
    .default_sites = PR_SITE_BIT(PR_SITE_Q) | PR_SITE_BIT(PR_SITE_FFN_UP), .saved = badbuf_saved, .n_saved = 1,
    .forward = fail_forward, .backward = fail_forward,
};

/* ---- the model and the loss ---------------------------------------------------------------------- */

static pr_model_config config_a(void)
{
    return th_config(&(th_shape){ .L = 2, .C = 32, .H = 4, .Hkv = 4, .hd = 8, .F = 64, .V = 64, .max_seq = 16 }, 11);
}

/* a second shape: 3 layers, grouped-query attention (Hkv < H), d_head != C/H */
static pr_model_config config_b(void)
{
    return th_config(&(th_shape){ .L = 3, .C = 24, .H = 4, .Hkv = 2, .hd = 5, .F = 40, .V = 50, .max_seq = 16 }, 11);
}

static pr_model *make_model(const pr_model_config *c)
{
    return th_model_new(c, TB, TT);
}

static void loss_ctx_init(th_loss_ctx *lc, pr_model *m, unsigned seed)
{
    th_loss_init_rng(lc, m, TB, TT, seed);
}

static pr_module *attach(pr_model *m, const pr_technique *t, const pr_option_setting *opts, int n_opts,
                         uint32_t sites)
{
    pr_module_spec s = { 0 };
    s.technique = t;
    s.sites = sites;
    s.options = opts;
    s.n_options = n_opts;
    s.trainable = 1;
    s.seed = 5;
    pr_module *mod = th_attach(m, &s);
    assert_non_null(mod);
    return mod;
}

/* Give every module tensor values away from its init (zeros would hide
 * the gradients of the factors they multiply). */
static void randomise_module(pr_model *m, const char *prefix, float scale)
{
    size_t len = strlen(prefix);
    for (int i = 0; i < pr_model_n_tensors(m); i++) {
        const pr_tensor_info *t = pr_model_tensor(m, i);
        if (strncmp(t->name, prefix, len) == 0)
            gc_fill(t->data, (size_t)t->numel, 100u + (unsigned)i, scale);
    }
}

/* Finite-difference check of every tensor of the module (prefix "name/").
 * Returns the number of tensors checked. */
static int check_module_grads(th_loss_ctx *lc, const char *prefix)
{
    return th_check_grads(lc, &prefix, 1, 0, &FD_CHECK);
}

static int count_prefix(const pr_model *m, const char *prefix)
{
    int n = 0;
    for (int i = 0; i < pr_model_n_tensors(m); i++)
        n += strncmp(pr_model_tensor(m, i)->name, prefix, strlen(prefix)) == 0;
    return n;
}

/* ---- gradients --------------------------------------------------------------------------------- */

static void grad_case(const pr_technique *t, const char *prefix, float scale, int expect_tensors)
{
    pr_model_config c = config_a();
    pr_model *m = make_model(&c);
    attach(m, t, NULL, 0, 0);
    randomise_module(m, prefix, scale);
    th_loss_ctx lc;
    loss_ctx_init(&lc, m, 3);
    assert_int_equal(check_module_grads(&lc, prefix), expect_tensors);
    pr_model_detach_modules(m);
    pr_model_free(m);
}

static void test_grad_lora(void **state)
{
    (void)state;
    grad_case(&tlora, "tlora/", 0.3f, 2 * 2 * 2); /* A, B x q, v x 2 layers */
}

static void test_grad_lora_weight_delta(void **state)
{
    (void)state;
    grad_case(&tlora_wd, "tlora_wd/", 0.3f, 8);
}

static void test_grad_adapter(void **state)
{
    (void)state;
    grad_case(&tadapter, "tadapter/", 0.3f, 4 * 2 * 2);
}

static void test_grad_gated(void **state)
{
    (void)state;
    /* four tensors and a gate per insertion */
    grad_case(&tgated, "tgated/", 0.3f, 5 * 2 * 2);
}

static void test_grad_ia3(void **state)
{
    (void)state;
    pr_model_config c = config_a();
    pr_model *m = make_model(&c);
    attach(m, &tia3, NULL, 0, 0);
    /* around the ones init */
    for (int i = 0; i < pr_model_n_tensors(m); i++) {
        const pr_tensor_info *t = pr_model_tensor(m, i);
        if (strncmp(t->name, "tia3/", 5) != 0)
            continue;
        gc_fill(t->data, (size_t)t->numel, 40u + (unsigned)i, 0.3f);
        for (int64_t j = 0; j < t->numel; j++)
            t->data[j] += 1.0f;
    }
    th_loss_ctx lc;
    loss_ctx_init(&lc, m, 3);
    assert_int_equal(check_module_grads(&lc, "tia3/"), 3 * 2);
    pr_model_detach_modules(m);
    pr_model_free(m);
}

static void test_grad_prompt(void **state)
{
    (void)state;
    grad_case(&tprompt, "tprompt/", 0.5f, 1);
}

static void test_grad_prefix(void **state)
{
    (void)state;
    grad_case(&tprefix, "tprefix/", 0.5f, 2 * 2);
}

static void test_grad_custom(void **state)
{
    (void)state;
    grad_case(&tcustom, "tcustom/", 0.2f, 2 * 2);
}

/* Global and per-layer copies are shared by several insertions: their
 * gradient passes the finite-difference check only if every insertion's
 * contribution accumulates into the one copy. */
static void test_grad_shared_scopes(void **state)
{
    (void)state;
    pr_model_config c = config_a();
    pr_model *m = make_model(&c);
    pr_module *mod = attach(m, &tshared, NULL, 0, 0);
    assert_int_equal(pr_module_insertions(mod), 4);
    assert_non_null(pr_model_find_tensor(m, "tshared/A"));
    assert_non_null(pr_model_find_tensor(m, "tshared/h.0.Bm"));
    assert_non_null(pr_model_find_tensor(m, "tshared/h.1.Bm"));
    assert_non_null(pr_model_find_tensor(m, "tshared/q.c"));
    assert_non_null(pr_model_find_tensor(m, "tshared/v.c"));
    assert_int_equal(count_prefix(m, "tshared/"), 5);
    int C = c.d_model, Q = c.n_heads * c.d_head, r = 3;
    assert_int_equal(pr_module_param_count(mod), (int64_t)C * r + 2 * r * Q + 2 * Q);
    /* shared-scope init: constant 0.05 for c */
    assert_true(pr_model_find_tensor(m, "tshared/q.c")->data[0] == 0.05f);
    th_loss_ctx lc;
    loss_ctx_init(&lc, m, 4);
    assert_int_equal(check_module_grads(&lc, "tshared/"), 5);

    /* the one global copy's gradient is the sum over the 4 insertions:
     * attaching the same technique at q only changes it */
    th_forward_backward(&lc);
    const pr_tensor_info *A = pr_model_find_tensor(m, "tshared/A");
    float g_both = A->grad[0];
    pr_model_detach_modules(m);
    pr_module_spec s = { .technique = &tshared, .sites = PR_SITE_BIT(PR_SITE_Q), .trainable = 1, .seed = 5 };
    pr_error err = { 0 };
    assert_int_equal(pr_module_attach(m, &s, &mod, &err), PR_OK);
    assert_int_equal(pr_module_insertions(mod), 2);
    th_forward_backward(&lc);
    assert_true(fabsf(pr_model_find_tensor(m, "tshared/A")->grad[0] - g_both) > 1e-7f);
    pr_model_detach_modules(m);
    pr_model_free(m);
}

/* With grouped-query attention q and v differ in width: a per-layer copy
 * shared by both cannot have one shape. */
static void test_shared_shape_mismatch(void **state)
{
    (void)state;
    pr_model_config c = config_b();
    pr_module_plan plan;
    pr_module_spec s = { .technique = &tshared, .trainable = 1 };
    pr_error err = { 0 };
    assert_int_equal(pr_module_plan_for(&c, &s, &plan, &err), PR_ERR_INVALID);
    assert_non_null(strstr(err.msg, "'Bm'"));
    assert_non_null(strstr(err.msg, "one shape"));
}

/* A plugin's parameter shape is outside input: one past EXPR_MAX_NUMEL
 * elements is refused by the plan, before anything is allocated (at a
 * small model the same declaration is planned and attached). */
static void test_huge_param_shape(void **state)
{
    (void)state;
    pr_model_config c;
    pr_config_preset("gpt2-small", &c);
    pr_module_plan plan;
    pr_module_spec s = { .technique = &tbig, .trainable = 1 };
    pr_error err = { 0 };
    assert_int_equal(pr_module_plan_for(&c, &s, &plan, &err), PR_ERR_INVALID);
    assert_non_null(strstr(err.msg, "parameter 'huge' shape 'd_model * d_model * d_model * d_model'"));
    assert_non_null(strstr(err.msg, "the shape has more than 2147483647 elements (EXPR_MAX_NUMEL) with dimension 1 "
                                    "(347892350976)"));
    pr_model_config small = th_config(&(th_shape){ .L = 1, .C = 4, .H = 1, .Hkv = 1, .hd = 4, .F = 8, .V = 16,
                                                   .max_seq = 8 }, 11);
    assert_int_equal(pr_module_plan_for(&small, &s, &plan, &err), PR_OK);
    assert_int_equal(plan.params, 256);
}

/* ---- selection ---------------------------------------------------------------------------------- */

static void test_select_biases(void **state)
{
    (void)state;
    pr_model_config c = config_a();
    pr_model *m = make_model(&c);
    int C = c.d_model, F = c.d_ff, L = c.n_layers, Q = c.n_heads * c.d_head, KV = c.n_kv_heads * c.d_head;
    int64_t expect = (int64_t)L * ((Q + 2 * KV) + C + F + C + C + C) + C; /* + ln_f.bias */
    pr_module_plan plan;
    pr_module_spec s = { .technique = &tbitfit, .trainable = 1 };
    pr_error err = { 0 };
    assert_int_equal(pr_module_plan_for(&c, &s, &plan, &err), PR_OK);
    assert_int_equal(plan.base_selected, expect);
    assert_int_equal(plan.params, 0);
    assert_int_equal(plan.insertions, 0);

    int n_before = pr_model_n_tensors(m);
    pr_module *mod = attach(m, &tbitfit, NULL, 0, 0);
    assert_int_equal(pr_module_param_count(mod), 0);
    assert_int_equal(pr_model_n_tensors(m), n_before);
    int64_t trainable = 0;
    for (int i = 0; i < pr_model_n_tensors(m); i++) {
        const pr_tensor_info *t = pr_model_tensor(m, i);
        int is_bias = t->kind == PR_TENSOR_BIAS || t->kind == PR_TENSOR_NORM_BIAS;
        assert_int_equal(t->trainable, is_bias);
        if (t->trainable)
            trainable += t->numel;
    }
    assert_int_equal(trainable, expect);
    /* gradients reach the selected tensors */
    th_loss_ctx lc;
    loss_ctx_init(&lc, m, 5);
    th_forward_backward(&lc);
    const char *names[] = { "h.0.attn.c_attn.bias", "h.1.mlp.c_proj.bias", "h.0.ln_2.bias", "ln_f.bias" };
    for (int i = 0; i < 4; i++) {
        const pr_tensor_info *t = pr_model_find_tensor(m, names[i]);
        float *g = malloc((size_t)t->numel * sizeof *g);
        memcpy(g, t->grad, (size_t)t->numel * sizeof *g);
        assert_int_equal(gc_check(t->name, t->data, g, (size_t)t->numel, th_loss, &lc, FD_EPS, FD_RTOL, FD_ATOL,
                                  FD_PROBES), 0);
        free(g);
    }
    pr_model_detach_modules(m);
    for (int i = 0; i < pr_model_n_tensors(m); i++)
        assert_int_equal(pr_model_tensor(m, i)->trainable, 0);

    /* one layer: only its tensors, no model-level ones */
    int layer1 = 1;
    s.layers = &layer1;
    s.n_layers = 1;
    assert_int_equal(pr_module_plan_for(&c, &s, &plan, &err), PR_OK);
    assert_int_equal(plan.base_selected, (int64_t)(Q + 2 * KV) + C + F + C + C + C);
    pr_model_free(m);
}

/* ---- parameter counts ------------------------------------------------------------------------------ */

typedef struct count_case {
    const pr_technique *t;
    int64_t (*formula)(const pr_model_config *c);
    int insertions_per_layer, model_level;
} count_case;

static int64_t f_lora(const pr_model_config *c)
{
    int64_t r = 4, C = c->d_model, Q = c->n_heads * c->d_head, KV = c->n_kv_heads * c->d_head;
    return c->n_layers * (r * (C + Q) + r * (C + KV));
}

static int64_t f_adapter(const pr_model_config *c)
{
    int64_t m = 4, d = c->d_model;
    return 2 * c->n_layers * (2 * m * d + m + d);
}

static int64_t f_gated(const pr_model_config *c)
{
    return f_adapter(c) + 2 * c->n_layers;
}

static int64_t f_ia3(const pr_model_config *c)
{
    int64_t KV = c->n_kv_heads * c->d_head;
    return c->n_layers * (2 * KV + c->d_ff);
}

static int64_t f_prompt(const pr_model_config *c)
{
    return 3 * (int64_t)c->d_model;
}

static int64_t f_prefix(const pr_model_config *c)
{
    return 2 * 3 * (int64_t)c->n_kv_heads * c->d_head * c->n_layers;
}

static int64_t f_custom(const pr_model_config *c)
{
    int64_t C = c->d_model, Q = c->n_heads * c->d_head;
    return c->n_layers * (C + Q * C);
}

static void test_param_counts(void **state)
{
    (void)state;
    const count_case cases[] = {
        { &tlora, f_lora, 2, 0 },      { &tlora_wd, f_lora, 2, 0 }, { &tadapter, f_adapter, 2, 0 },
        { &tgated, f_gated, 2, 0 },    { &tia3, f_ia3, 3, 0 },      { &tprompt, f_prompt, 0, 1 },
        { &tprefix, f_prefix, 2, 0 },  { &tcustom, f_custom, 1, 0 },
    };
    pr_model_config cfgs[2] = { config_a(), config_b() };
    for (int k = 0; k < 2; k++) {
        pr_model *m = make_model(&cfgs[k]);
        for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
            const count_case *cc = &cases[i];
            pr_module_spec s = { .technique = cc->t, .trainable = 1, .seed = 1 };
            pr_module_plan plan;
            pr_error err = { 0 };
            int rc = pr_module_plan_for(&cfgs[k], &s, &plan, &err);
            if (rc)
                fprintf(stderr, "plan %s: %s\n", cc->t->name, err.msg);
            assert_int_equal(rc, PR_OK);
            int64_t expect = cc->formula(&cfgs[k]);
            assert_int_equal(plan.params, expect);
            assert_int_equal(plan.trainable, expect);
            assert_int_equal(plan.insertions, cc->model_level + cc->insertions_per_layer * cfgs[k].n_layers);
            pr_module *mod = NULL;
            rc = pr_module_attach(m, &s, &mod, &err);
            if (rc)
                fprintf(stderr, "attach %s: %s\n", cc->t->name, err.msg);
            assert_int_equal(rc, PR_OK);
            assert_int_equal(pr_module_param_count(mod), expect);
            assert_int_equal(pr_module_trainable_count(mod), expect);
            assert_int_equal(pr_module_insertions(mod), plan.insertions);
            /* the model's table sees the module's parameters */
            int64_t in_table = 0;
            char prefix[64];
            snprintf(prefix, sizeof prefix, "%s/", cc->t->name);
            for (int j = 0; j < pr_model_n_tensors(m); j++)
                if (strncmp(pr_model_tensor(m, j)->name, prefix, strlen(prefix)) == 0)
                    in_table += pr_model_tensor(m, j)->numel;
            assert_int_equal(in_table, expect);
            pr_model_detach_modules(m);
        }
        pr_model_free(m);
    }
    /* a frozen module owns the same parameters but trains none */
    pr_module_spec s = { .technique = &tlora, .trainable = 0 };
    pr_module_plan plan;
    pr_error err = { 0 };
    assert_int_equal(pr_module_plan_for(&cfgs[0], &s, &plan, &err), PR_OK);
    assert_int_equal(plan.params, f_lora(&cfgs[0]));
    assert_int_equal(plan.trainable, 0);
}

/* Per-site override of a per_site option changes that site's shapes. */
static void test_per_site_option(void **state)
{
    (void)state;
    pr_model_config c = config_a();
    pr_option_setting o[] = { { "r", "8", -1 }, { "r", "2", PR_SITE_V } };
    pr_module_spec s = { .technique = &tlora, .options = o, .n_options = 2, .trainable = 1 };
    pr_module_plan plan;
    pr_error err = { 0 };
    assert_int_equal(pr_module_plan_for(&c, &s, &plan, &err), PR_OK);
    int64_t C = c.d_model, Q = c.n_heads * c.d_head, KV = c.n_kv_heads * c.d_head;
    assert_int_equal(plan.params, c.n_layers * (8 * (C + Q) + 2 * (C + KV)));
    pr_model *m = make_model(&c);
    pr_module *mod = NULL;
    assert_int_equal(pr_module_attach(m, &s, &mod, &err), PR_OK);
    assert_int_equal(pr_model_find_tensor(m, "tlora/h.1.v.lora_A")->shape[0], 2);
    assert_int_equal(pr_model_find_tensor(m, "tlora/h.1.q.lora_A")->shape[0], 8);
    assert_true(pr_module_option(mod, 0)->num == 8.0);
    pr_model_detach_modules(m);
    pr_model_free(m);
}

/* ---- identity at init, merge ----------------------------------------------------------------------- */

static void test_identity_at_init(void **state)
{
    (void)state;
    const pr_technique *ts[] = { &tlora, &tlora_wd, &tadapter, &tgated, &tia3, &tcustom };
    pr_model_config c = config_a();
    pr_model *m = make_model(&c);
    th_loss_ctx lc;
    loss_ctx_init(&lc, m, 6);
    float *base = th_logits_copy(&lc);
    size_t n = (size_t)TB * TT * c.vocab_size;
    for (size_t i = 0; i < sizeof ts / sizeof ts[0]; i++) {
        attach(m, ts[i], NULL, 0, 0);
        float *with = th_logits_copy(&lc);
        double d = th_max_abs_diff(base, with, n);
        if (d > 1e-6)
            fprintf(stderr, "%s changes the logits by %g at init\n", ts[i]->name, d);
        assert_true(d <= 1e-6);
        free(with);
        pr_model_detach_modules(m);
    }
    /* after detaching, the model is its base again */
    float *after = th_logits_copy(&lc);
    assert_memory_equal(base, after, n * sizeof(float));
    free(after);
    free(base);
    pr_model_free(m);
}

static void test_merge_unmerge(void **state)
{
    (void)state;
    pr_model_config c = config_a();
    pr_model *m = make_model(&c);
    const pr_tensor_info *w = pr_model_find_tensor(m, "h.0.attn.c_attn.weight");
    const pr_tensor_info *b = pr_model_find_tensor(m, "h.0.attn.c_attn.bias");
    float *w0 = malloc((size_t)w->numel * sizeof(float)), *b0 = malloc((size_t)b->numel * sizeof(float));
    memcpy(w0, w->data, (size_t)w->numel * sizeof(float));
    memcpy(b0, b->data, (size_t)b->numel * sizeof(float));
    pr_option_setting o[] = { { "r", "3", -1 }, { "alpha", "5", -1 } };
    pr_module *mod = attach(m, &tlora, o, 2, PR_SITE_BIT(PR_SITE_Q) | PR_SITE_BIT(PR_SITE_V) | PR_SITE_BIT(PR_SITE_FFN_DOWN));
    randomise_module(m, "tlora/", 0.3f);
    th_loss_ctx lc;
    loss_ctx_init(&lc, m, 7);
    float *unmerged = th_logits_copy(&lc);
    size_t n = (size_t)TB * TT * c.vocab_size;
    pr_error err = { 0 };
    assert_int_equal(pr_module_merge(mod, &err), PR_OK);
    assert_int_equal(pr_module_merge(mod, &err), PR_ERR_INVALID); /* twice */
    assert_true(memcmp(w0, w->data, (size_t)w->numel * sizeof(float)) != 0);
    float *merged = th_logits_copy(&lc);
    double scale = 0;
    for (size_t i = 0; i < n; i++)
        scale = fmax(scale, fabs(unmerged[i]));
    /* 1e-5 relative to the largest logit */
    assert_true(th_max_abs_diff(unmerged, merged, n) <= 1e-5 * scale);
    assert_int_equal(pr_module_unmerge(mod, &err), PR_OK);
    assert_memory_equal(w0, w->data, (size_t)w->numel * sizeof(float));
    assert_memory_equal(b0, b->data, (size_t)b->numel * sizeof(float));
    float *again = th_logits_copy(&lc);
    assert_memory_equal(unmerged, again, n * sizeof(float));
    assert_int_equal(pr_module_unmerge(mod, &err), PR_ERR_INVALID);

    /* the weight-delta form computes the same function from the same parameters */
    pr_model_detach_modules(m);
    attach(m, &tlora_wd, o, 2, PR_SITE_BIT(PR_SITE_Q) | PR_SITE_BIT(PR_SITE_V) | PR_SITE_BIT(PR_SITE_FFN_DOWN));
    randomise_module(m, "tlora_wd/", 0.3f);
    float *wd = th_logits_copy(&lc);
    assert_true(th_max_abs_diff(unmerged, wd, n) <= 1e-5 * scale);

    /* a module without merge() */
    pr_model_detach_modules(m);
    pr_module *ad = attach(m, &tadapter, NULL, 0, 0);
    assert_int_equal(pr_module_merge(ad, &err), PR_ERR_UNSUPPORTED);
    assert_non_null(strstr(err.msg, "no merge()"));
    pr_model_detach_modules(m);
    free(wd);
    free(again);
    free(merged);
    free(unmerged);
    free(w0);
    free(b0);
    pr_model_free(m);
}

/* ---- initialisation ------------------------------------------------------------------------------- */

static void test_init(void **state)
{
    (void)state;
    pr_model_config c = config_a();
    pr_model *m = make_model(&c);
    const pr_tensor_info *wte = pr_model_find_tensor(m, "wte.weight");
    int C = c.d_model;

    /* embed_rows: every row is some row of wte */
    attach(m, &tprompt, NULL, 0, 0);
    const pr_tensor_info *p = pr_model_find_tensor(m, "tprompt/embed.prompt");
    assert_non_null(p);
    for (int r = 0; r < 3; r++) {
        int found = 0;
        for (int v = 0; v < c.vocab_size && !found; v++)
            found = memcmp(p->data + (size_t)r * C, wte->data + (size_t)v * C, (size_t)C * sizeof(float)) == 0;
        assert_true(found);
    }
    pr_model_detach_modules(m);

    /* text: the embeddings of the text's tokens, cycled */
    pr_tokenizer *tok = NULL;
    pr_error err = { 0 };
    assert_int_equal(pr_tokenizer_byte(&tok, &err), PR_OK);
    int *ids = NULL;
    size_t n_ids = 0;
    assert_int_equal(pr_tokenizer_encode(tok, "01", 2, &ids, &n_ids, &err), PR_OK);
    assert_int_equal(n_ids, 2);
    pr_option_setting o[] = { { "init_text", "01", -1 }, { "n_tokens", "5", -1 } };
    pr_module_spec s = { .technique = &tprompt_text, .options = o, .n_options = 2, .trainable = 1,
                         .tokenizer = tok };
    pr_module *mod = NULL;
    int rc = pr_module_attach(m, &s, &mod, &err);
    if (rc)
        fprintf(stderr, "attach: %s\n", err.msg);
    assert_int_equal(rc, PR_OK);
    p = pr_model_find_tensor(m, "tprompt_text/embed.prompt");
    for (int r = 0; r < 5; r++)
        assert_memory_equal(p->data + (size_t)r * C, wte->data + (size_t)ids[r % 2] * C, (size_t)C * sizeof(float));
    pr_model_detach_modules(m);
    /* no tokenizer */
    s.tokenizer = NULL;
    assert_int_equal(pr_module_attach(m, &s, &mod, &err), PR_ERR_INVALID);
    assert_non_null(strstr(err.msg, "tokenizer"));
    assert_int_equal(pr_model_n_modules(m), 0);
    free(ids);
    pr_tokenizer_free(tok);

    /* kaiming_uniform(a = sqrt 5): |x| <= sqrt(6 / (6 d_in)) = 1/sqrt(d_in);
     * same seed, same values; another seed, other values */
    attach(m, &tlora, NULL, 0, 0);
    const pr_tensor_info *A = pr_model_find_tensor(m, "tlora/h.0.q.lora_A");
    double bound = 1.0 / sqrt((double)C), mx = 0;
    for (int64_t i = 0; i < A->numel; i++)
        mx = fmax(mx, fabs(A->data[i]));
    assert_true(mx <= bound && mx > 0.5 * bound);
    float *a1 = malloc((size_t)A->numel * sizeof(float));
    memcpy(a1, A->data, (size_t)A->numel * sizeof(float));
    /* copies of one parameter differ from each other */
    const pr_tensor_info *A2 = pr_model_find_tensor(m, "tlora/h.1.q.lora_A");
    assert_true(memcmp(a1, A2->data, (size_t)A->numel * sizeof(float)) != 0);
    pr_model_detach_modules(m);
    attach(m, &tlora, NULL, 0, 0);
    A = pr_model_find_tensor(m, "tlora/h.0.q.lora_A");
    assert_memory_equal(a1, A->data, (size_t)A->numel * sizeof(float));
    pr_model_detach_modules(m);
    pr_module_spec s2 = { .technique = &tlora, .trainable = 1, .seed = 99 };
    assert_int_equal(pr_module_attach(m, &s2, &mod, &err), PR_OK);
    A = pr_model_find_tensor(m, "tlora/h.0.q.lora_A");
    assert_true(memcmp(a1, A->data, (size_t)A->numel * sizeof(float)) != 0);
    free(a1);
    pr_model_detach_modules(m);
    pr_model_free(m);
}

/* ---- errors ---------------------------------------------------------------------------------------------- */

static void expect_plan_error(const pr_technique *t, const pr_option_setting *o, int n, uint32_t sites,
                              const char *needle)
{
    pr_model_config c = config_a();
    pr_module_spec s = { .technique = t, .options = o, .n_options = n, .sites = sites, .trainable = 1 };
    pr_module_plan plan;
    pr_error err = { 0 };
    int rc = pr_module_plan_for(&c, &s, &plan, &err);
    if (rc == PR_OK || !strstr(err.msg, needle))
        fprintf(stderr, "expected an error with \"%s\", got rc %d: %s\n", needle, rc, err.msg);
    assert_int_not_equal(rc, PR_OK);
    assert_non_null(strstr(err.msg, needle));
    /* attach says the same and leaves the model untouched */
    pr_model *m = make_model(&c);
    int n_before = pr_model_n_tensors(m);
    pr_module *mod = (pr_module *)1;
    pr_error err2 = { 0 };
    assert_int_not_equal(pr_module_attach(m, &s, &mod, &err2), PR_OK);
    assert_null(mod);
    assert_string_equal(err.msg, err2.msg);
    assert_int_equal(pr_model_n_tensors(m), n_before);
    assert_int_equal(pr_model_n_modules(m), 0);
    pr_model_free(m);
}

static void test_option_errors(void **state)
{
    (void)state;
    pr_option_setting unknown[] = { { "rr", "4", -1 } };
    expect_plan_error(&tlora, unknown, 1, 0, "module 'tlora': unknown option 'rr' (technique 'tlora' has: r, alpha, act)");
    pr_option_setting zero[] = { { "r", "0", -1 } };
    expect_plan_error(&tlora, zero, 1, 0, "module 'tlora': option 'r' = 0 is out of range [1, 4096]");
    pr_option_setting big[] = { { "r", "5000", -1 } };
    expect_plan_error(&tlora, big, 1, 0, "option 'r' = 5000 is out of range [1, 4096]");
    pr_option_setting notint[] = { { "r", "4.5", -1 } };
    expect_plan_error(&tlora, notint, 1, 0, "option 'r' = '4.5' is not an integer");
    pr_option_setting notfloat[] = { { "alpha", "lots", -1 } };
    expect_plan_error(&tlora, notfloat, 1, 0, "option 'alpha' = 'lots' is not a finite number");
    pr_option_setting badenum[] = { { "act", "tanh", -1 } };
    expect_plan_error(&tlora, badenum, 1, 0, "option 'act' = 'tanh' is not one of: none, relu");
    pr_option_setting persite[] = { { "alpha", "2", PR_SITE_Q } };
    expect_plan_error(&tlora, persite, 1, 0, "option 'alpha' cannot be set per site (site 'q')");
    pr_option_setting unused[] = { { "r", "2", PR_SITE_O } };
    expect_plan_error(&tlora, unused, 1, 0, "option 'r' is set for site 'o', which the module does not use");
    pr_option_setting range_site[] = { { "r", "0", PR_SITE_V } };
    expect_plan_error(&tlora, range_site, 1, 0, "option 'r' at site 'v' = 0 is out of range [1, 4096]");
}

static void test_site_errors(void **state)
{
    (void)state;
    expect_plan_error(&tlora, NULL, 0, PR_SITE_BIT(PR_SITE_FFN_OUT),
                      "technique 'tlora' cannot attach at site 'ffn_out' (allowed: qkv, q, k, v, o, ffn.up, ffn.gate, ffn.down)");
    expect_plan_error(&tlora, NULL, 0, PR_SITE_BIT(PR_SITE_FFN_GATE), "site 'ffn.gate' does not exist in this model");
    /* layers out of range, repeated */
    pr_model_config c = config_a();
    int bad[] = { 0, 2 };
    pr_module_spec s = { .technique = &tlora, .layers = bad, .n_layers = 2, .trainable = 1 };
    pr_module_plan plan;
    pr_error err = { 0 };
    assert_int_equal(pr_module_plan_for(&c, &s, &plan, &err), PR_ERR_INVALID);
    assert_non_null(strstr(err.msg, "layer 2 is out of range [0, 2)"));
    int twice[] = { 1, 1 };
    s.layers = twice;
    assert_int_equal(pr_module_plan_for(&c, &s, &plan, &err), PR_ERR_INVALID);
    assert_non_null(strstr(err.msg, "layer 1 is listed twice"));
    /* a chosen layer subset */
    int one[] = { 1 };
    s.layers = one;
    s.n_layers = 1;
    assert_int_equal(pr_module_plan_for(&c, &s, &plan, &err), PR_OK);
    assert_int_equal(plan.insertions, 2);
    assert_int_equal(plan.layers_used, 1);
    assert_int_equal(plan.params, f_lora(&c) / 2);
}

/* A plugin's error() message reaches the caller with the module,
 * technique and site instance prepended; duplicate module names fail. */
static void test_callback_error_and_names(void **state)
{
    (void)state;
    pr_model_config c = config_a();
    pr_model *m = make_model(&c);
    attach(m, &tfail, NULL, 0, 0);
    th_loss_ctx lc;
    loss_ctx_init(&lc, m, 8);
    pr_error err = { 0 };
    assert_int_not_equal(pr_model_forward(m, &lc.batch, NULL, &err), PR_OK);
    assert_non_null(strstr(err.msg, "module 'tfail' (technique tfail) at h.0.q: boom 7"));
    pr_model_detach_modules(m);

    attach(m, &tlora, NULL, 0, 0);
    pr_module_spec s = { .technique = &tlora, .trainable = 1 };
    pr_module *mod = NULL;
    assert_int_equal(pr_module_attach(m, &s, &mod, &err), PR_ERR_INVALID);
    assert_non_null(strstr(err.msg, "already has a module of that name"));
    s.name = "second";
    assert_int_equal(pr_module_attach(m, &s, &mod, &err), PR_OK);
    assert_int_equal(pr_model_n_modules(m), 2);
    assert_ptr_equal(pr_model_module(m, 1), mod);
    assert_string_equal(pr_module_name(mod), "second");
    assert_ptr_equal(pr_module_technique(mod), &tlora);
    assert_int_equal(pr_module_sites(mod), PR_SITE_BIT(PR_SITE_Q) | PR_SITE_BIT(PR_SITE_V));
    assert_non_null(pr_model_find_tensor(m, "second/h.0.v.lora_B"));
    /* two modules at one site: both apply, gradients still check */
    randomise_module(m, "tlora/", 0.3f);
    randomise_module(m, "second/", 0.3f);
    assert_int_equal(check_module_grads(&lc, "second/"), 8);
    int base = pr_model_n_tensors(m) - 16;
    pr_model_detach_modules(m);
    assert_int_equal(pr_model_n_modules(m), 0);
    assert_int_equal(pr_model_n_tensors(m), base);
    pr_model_free(m);
}

/* An attach that fails after some of its hooks went in leaves the model
 * as it was: the other modules' hooks and providers still apply. */
static void test_attach_rollback(void **state)
{
    (void)state;
    pr_model_config c = config_a();
    pr_model *m = make_model(&c);
    attach(m, &tlora, NULL, 0, 0);
    pr_option_setting o[] = { { "n_tokens", "2", -1 } };
    attach(m, &tprompt, o, 1, 0);
    randomise_module(m, "tlora/", 0.3f);
    th_loss_ctx lc;
    loss_ctx_init(&lc, m, 9);
    float *before = th_logits_copy(&lc);
    int n_tensors = pr_model_n_tensors(m);
    pr_module_spec s = { .technique = &tbadbuf, .trainable = 1 };
    pr_module *mod = NULL;
    pr_error err = { 0 };
    assert_int_not_equal(pr_module_attach(m, &s, &mod, &err), PR_OK);
    assert_non_null(strstr(err.msg, "buffer 'bad' shape"));
    assert_non_null(strstr(err.msg, "h.0.ffn.up"));
    assert_int_equal(pr_model_n_modules(m), 2);
    assert_int_equal(pr_model_n_tensors(m), n_tensors);
    float *after = th_logits_copy(&lc);
    size_t n = (size_t)TB * TT * c.vocab_size;
    assert_memory_equal(before, after, n * sizeof(float));
    /* and it still trains */
    assert_int_equal(check_module_grads(&lc, "tlora/"), 8);
    assert_int_equal(check_module_grads(&lc, "tprompt/"), 1);
    free(before);
    free(after);
    pr_model_detach_modules(m);
    pr_model_free(m);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_grad_lora),
        cmocka_unit_test(test_grad_lora_weight_delta),
        cmocka_unit_test(test_grad_adapter),
        cmocka_unit_test(test_grad_gated),
        cmocka_unit_test(test_grad_ia3),
        cmocka_unit_test(test_grad_prompt),
        cmocka_unit_test(test_grad_prefix),
        cmocka_unit_test(test_grad_custom),
        cmocka_unit_test(test_grad_shared_scopes),
        cmocka_unit_test(test_shared_shape_mismatch),
        cmocka_unit_test(test_huge_param_shape),
        cmocka_unit_test(test_select_biases),
        cmocka_unit_test(test_param_counts),
        cmocka_unit_test(test_per_site_option),
        cmocka_unit_test(test_identity_at_init),
        cmocka_unit_test(test_merge_unmerge),
        cmocka_unit_test(test_init),
        cmocka_unit_test(test_option_errors),
        cmocka_unit_test(test_site_errors),
        cmocka_unit_test(test_callback_error_and_names),
        cmocka_unit_test(test_attach_rollback),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
