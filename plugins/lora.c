/* LoRA: low-rank adaptation of a frozen projection (Hu et al. 2021,
 * "LoRA: Low-Rank Adaptation of Large Language Models", arXiv 2106.09685).
 *
 * Beside a frozen projection y = x.W (W [d_in, d_out]) LoRA adds a rank-r
 * update through two small matrices, named and shaped as in Hugging Face
 * PEFT:
 *
 *     lora_A (r, d_in)    kaiming_uniform(a = sqrt(5)), as PEFT initialises it
 *     lora_B (d_out, r)   zeros, so the module starts as the identity
 *
 *     h = dropout(x) . A^T . B^T            (rows, d_out)
 *     y <- y + s * h,   s = alpha / r  (or alpha / sqrt(r) with rsLoRA,
 *                                        Kalajdzievski 2023, arXiv 2312.03732)
 *
 * The host integrates (PR_INTEGRATE_SCALED_ADD): forward returns h without
 * s, the host adds s*h, and backward receives d_out = s*dy.  s itself comes
 * from scale() below.  merge() folds the update into the frozen weight as
 * dW = s * (B.A)^T = s * A^T.B^T, shaped [d_in, d_out].
 *
 * LoRA+ (Hayou, Ghosh, Yu 2024, "LoRA+: Efficient Low Rank Adaptation of
 * Large Models", arXiv 2402.12354): option loraplus_lr_ratio, lora_B's
 * learning rate over lora_A's (pr_param_decl.lr_scale; the host's
 * optimizer applies it).  The default 1 is plain LoRA.
 *
 * Initialisation, option init_lora_weights (Hugging Face PEFT's name and
 * values): true (default: kaiming-uniform A, zero B), false (B also
 * kaiming-uniform, fan-in r: not the identity), gaussian (A ~ normal(0,
 * 1/r), PEFT's std = 1/r; zero B), pissa (Meng, Wang, Zhang 2024, "PiSSA:
 * Principal Singular Values and Singular Vectors Adaptation of Large
 * Language Models", arXiv 2404.02948) and olora (Buyukakyuz 2024, "OLoRA:
 * Orthonormal Low-Rank Adaptation of Large Language Models", arXiv
 * 2406.01775).  With W the frozen weight as PEFT holds it (d_out, d_in):
 *   pissa: W = U S V^T,  A = sqrt(S_r/s) V_r^T,  B = U_r sqrt(S_r/s)
 *   olora: W = Q R,      A = R[:r, :],           B = Q[:, :r]   (unscaled)
 * PEFT then overwrites W with W_res = W - s B A.  peftref's base weights may
 * be mapped read-only and shared, so this module never writes W: it keeps
 * frozen copies A0 = A, B0 = B of the initial factors and computes
 *     y = x.W + s * x.(A^T B^T - A0^T B0^T)
 * which equals x.W_res + s * x.A^T B^T exactly in exact arithmetic, with
 * the same gradients for A and B (the A0/B0 term is constant in them).
 * The frozen term sees the undropped x, as W_res does; merge() adds
 * s (A^T B^T - A0^T B0^T).  This is PEFT's conversion of a PiSSA / OLoRA
 * adapter to plain LoRA (path_initial_model_for_weight_conversion): rank
 * 2r, A' = [A; A0], B' = [B, -B0], lora_alpha' = 2 alpha (s unchanged).
 * The decompositions (one-sided Jacobi SVD, Householder QR, in double) are
 * in this file, since a plugin links only libm.  They run in setup() at
 * every attach; A0 and B0 are frozen and regenerated (not saved): a loaded
 * module recomputes them from the same base weight.  loftq is refused: it
 * needs a quantised base.
 *
 * Saved for backward, per insertion:
 *   xa            (rows, r)              x_dropped . A^T
 *   dropout_mask  (rows, ceil(d_in/32))  kept-element bits of the dropout
 *                                        mask, 32 per float slot (a full
 *                                        f32 mask would cost as much as x),
 *                                        drawn by host->dropout_mask, keyed
 *                                        by sample so that it does not
 *                                        depend on the micro-batch split
 *   dropout_on    (1)                    1 when forward applied dropout, so
 *                                        backward follows forward exactly
 * Scratch (lent per call): x_dropped (rows, d_in), d_xa (rows, r).
 *
 * This file includes only peftref's public plugin headers (plugin.h,
 * ext/peft_config.h), its PEFT codecs (peft/codecs.h) and libc/libm, and links
 * against nothing of peftref: the matrix products go through host->gemm,
 * the dropout through host->dropout_mask / dropout_apply / dropout_backward. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include <peftref/plugin.h>
#include <peftref/ext/peft_config.h>

#include "peft/codecs.h"

PR_PLUGIN_EXPORT const pr_plugin *peftref_plugin_entry(const pr_entry_args *args);

/* Indices into the declaration arrays below (and so into ctx->options,
 * ctx->params, ctx->saved and ctx->scratch).  The callbacks read the first
 * N_CB_OPTS options; loraplus_lr_ratio is read by the host only (lora_B's
 * lr_scale). */
enum { OPT_R, OPT_ALPHA, OPT_DROPOUT, OPT_RSLORA, OPT_INIT, N_CB_OPTS, OPT_LORAPLUS = N_CB_OPTS, N_OPTS };
enum { PARAM_A, PARAM_B, PARAM_A0, PARAM_B0, N_PARAMS };
/* The frozen copies' rank: r under pissa and olora (choices 3 and 4 of
 * init_choices[]), 0 otherwise, so a plain LoRA module carries no copy. */
#define LORA0_ROWS "r * (min(max(init_lora_weights - 2, 0), 1) - min(max(init_lora_weights - 4, 0), 1))"

/* init_lora_weights, in the order of init_choices[] */
enum { INIT_TRUE, INIT_FALSE, INIT_GAUSSIAN, INIT_PISSA, INIT_OLORA, INIT_LOFTQ };
static const char *const init_choices[] = { "true", "false", "gaussian", "pissa", "olora", "loftq", NULL };
enum { SAVED_XA, SAVED_MASK, SAVED_DROPOUT_ON, N_SAVED };
enum { SCRATCH_XD, SCRATCH_DXA, N_SCRATCH };

static const pr_option_decl lora_options[N_OPTS] = {
    [OPT_R] = {
        .struct_size = sizeof(pr_option_decl), .name = "r", .type = PR_OPT_INT,
        .def = 8, .min = 1, .max = 4096, .per_site = 1,
        .help = "rank of the update B.A; default 8 as Hugging Face PEFT's LoraConfig r",
    },
    [OPT_ALPHA] = {
        .struct_size = sizeof(pr_option_decl), .name = "alpha", .peft_name = "lora_alpha", .type = PR_OPT_FLOAT,
        .def = 8, .min = 0, .max = 1e6, .per_site = 1,
        .help = "scaling numerator: the update is scaled by alpha/r (alpha/sqrt(r) with "
                "use_rslora); Hugging Face PEFT's lora_alpha, default 8",
    },
    [OPT_DROPOUT] = {
        .struct_size = sizeof(pr_option_decl), .name = "dropout", .peft_name = "lora_dropout", .type = PR_OPT_FLOAT,
        .def = 0, .min = 0, .max = 0.999, .per_site = 0,
        .help = "dropout probability on the module input in training, in [0, 1); default 0 "
                "as Hugging Face PEFT's lora_dropout (the paper's GPT-2 runs used 0.1)",
    },
    [OPT_RSLORA] = {
        .struct_size = sizeof(pr_option_decl), .name = "use_rslora", .type = PR_OPT_BOOL,
        .def = 0, .per_site = 0,
        .help = "rank-stabilised scale alpha/sqrt(r) instead of alpha/r (Kalajdzievski 2023, "
                "arXiv 2312.03732)",
    },
    [OPT_INIT] = {
        .struct_size = sizeof(pr_option_decl), .name = "init_lora_weights", .type = PR_OPT_ENUM,
        .def = INIT_TRUE, .choices = init_choices, .per_site = 1,
        .help = "initialisation, as Hugging Face PEFT's init_lora_weights: true = kaiming-uniform A, "
                "zero B; false = kaiming-uniform A and B (not the identity); gaussian = A ~ normal(0, "
                "1/r), zero B; pissa = principal singular triplets of W (Meng et al. 2024, arXiv "
                "2404.02948); olora = QR of W (Buyukakyuz 2024, arXiv 2406.01775); loftq is refused "
                "(it needs a quantised base)",
    },
    [OPT_LORAPLUS] = {
        .struct_size = sizeof(pr_option_decl), .name = "loraplus_lr_ratio", .type = PR_OPT_FLOAT,
        .def = 1, .min = 1e-6, .max = 1e6, .per_site = 0,
        .help = "LoRA+ (Hayou, Ghosh, Yu 2024, arXiv 2402.12354): lora_B learns at this multiple of "
                "the learning rate of lora_A; 1 = plain LoRA (off); the paper recommends about 16. "
                "Hugging Face PEFT's create_loraplus_optimizer argument of the same name",
    },
};

static const pr_param_decl lora_params[N_PARAMS] = {
    [PARAM_A] = {
        .struct_size = sizeof(pr_param_decl), .name = "lora_A", .shape = "r, d_in",
        .init = PR_INIT_KAIMING_UNIFORM, .init_arg = "sqrt(5)", .scope = PR_SCOPE_INSERTION,
        .peft_key = "{prefix}.lora_A.weight", .peft_layout = PR_PEFT_AS_IS,
        .help = "down projection; uniform(-1/sqrt(d_in), 1/sqrt(d_in)) as Hugging Face PEFT",
    },
    [PARAM_B] = {
        .struct_size = sizeof(pr_param_decl), .name = "lora_B", .shape = "d_out, r",
        .init = PR_INIT_ZEROS, .scope = PR_SCOPE_INSERTION,
        .peft_key = "{prefix}.lora_B.weight", .peft_layout = PR_PEFT_AS_IS,
        .lr_scale = "loraplus_lr_ratio",
        .help = "up projection; zeros, so the adapted model starts equal to the base model; its "
                "learning rate is loraplus_lr_ratio times lora_A's (LoRA+)",
    },
    /* The initial factors of pissa / olora, frozen: the module computes
     * y = x.W + s * x.(A^T.B^T - A0^T.B0^T).  Zero (and unused) for the
     * other inits.  Regenerated, not saved: setup() recomputes them from the
     * frozen weight at every attach, a loaded module included (the file
     * records the base fingerprint).  Their keys are never written; they let
     * a module saved under PEFT names load back. */
    [PARAM_A0] = {
        .struct_size = sizeof(pr_param_decl), .name = "lora_A0", .shape = LORA0_ROWS ", d_in",
        .init = PR_INIT_ZEROS, .scope = PR_SCOPE_INSERTION,
        .flags = PR_PARAM_FROZEN | PR_PARAM_REGENERATE,
        .peft_key = "{prefix}.lora_A0.weight", .peft_layout = PR_PEFT_AS_IS,
        .help = "frozen copy of lora_A at init (pissa, olora), recomputed from the frozen weight; zeros "
                "for the other inits",
    },
    [PARAM_B0] = {
        .struct_size = sizeof(pr_param_decl), .name = "lora_B0", .shape = "d_out, " LORA0_ROWS,
        .init = PR_INIT_ZEROS, .scope = PR_SCOPE_INSERTION,
        .flags = PR_PARAM_FROZEN | PR_PARAM_REGENERATE,
        .peft_key = "{prefix}.lora_B0.weight", .peft_layout = PR_PEFT_AS_IS,
        .help = "frozen copy of lora_B at init (pissa, olora), recomputed from the frozen weight; zeros "
                "for the other inits",
    },
};

static const pr_buffer_decl lora_saved[N_SAVED] = {
    [SAVED_XA] = { .struct_size = sizeof(pr_buffer_decl), .name = "xa", .shape = "rows, r" },
    [SAVED_MASK] = { .struct_size = sizeof(pr_buffer_decl), .name = "dropout_mask",
                     .shape = "rows, (d_in + 31) / 32" },
    [SAVED_DROPOUT_ON] = { .struct_size = sizeof(pr_buffer_decl), .name = "dropout_on",
                           .shape = "1" },
};

static const pr_buffer_decl lora_scratch[N_SCRATCH] = {
    [SCRATCH_XD] = { .struct_size = sizeof(pr_buffer_decl), .name = "x_dropped",
                     .shape = "rows, d_in" },
    [SCRATCH_DXA] = { .struct_size = sizeof(pr_buffer_decl), .name = "d_xa", .shape = "rows, r" },
};

/* Row stride of a 2-D tensor (0 in an unfilled stride means packed rows). */
static int row_stride(const pr_tensor *t)
{
    return (int)(t->stride[0] ? t->stride[0] : t->shape[1]);
}

/* The shapes of one call, read from the parameters the host allocated. */
typedef struct lora_dims {
    int r, d_in, d_out, rows;
    const float *A, *B;
    const float *A0, *B0; /* the frozen initial factors; NULL unless pissa / olora */
} lora_dims;

/* 1 when the init leaves a residual term: pissa and olora. */
static int init_has_residual(const pr_ctx *ctx)
{
    if (ctx->n_options <= OPT_INIT || ctx->n_params < N_PARAMS)
        return 0;
    int init = (int)ctx->options[OPT_INIT].num;
    return init == INIT_PISSA || init == INIT_OLORA;
}

static int lora_get_dims(const pr_ctx *ctx, lora_dims *d)
{
    /* lora_A0 / lora_B0 and init_lora_weights are read only when given (a
     * caller driving the callbacks with the first two parameters and four
     * options gets plain LoRA) */
    if (ctx->n_params < PARAM_B + 1 || ctx->n_options < OPT_RSLORA + 1)
        return ctx->host->error(ctx, "lora: expected %d parameters and %d options, got %u and %u",
                                N_PARAMS, N_CB_OPTS, ctx->n_params, ctx->n_options);
    const pr_tensor *a = ctx->params[PARAM_A], *b = ctx->params[PARAM_B];
    if (a->ndim != 2 || b->ndim != 2 || !a->data || !b->data || b->shape[1] != a->shape[0])
        return ctx->host->error(ctx, "lora: lora_A and lora_B must be (r, d_in) and (d_out, r)");
    d->r = (int)a->shape[0];
    d->d_in = (int)a->shape[1];
    d->d_out = (int)b->shape[0];
    d->rows = ctx->rows;
    d->A = a->data;
    d->B = b->data;
    d->A0 = d->B0 = NULL;
    if (init_has_residual(ctx)) {
        const pr_tensor *a0 = ctx->params[PARAM_A0], *b0 = ctx->params[PARAM_B0];
        if (!a0->data || !b0->data || a0->shape[0] != d->r || a0->shape[1] != d->d_in ||
            b0->shape[0] != d->d_out || b0->shape[1] != d->r)
            return ctx->host->error(ctx, "lora: lora_A0 and lora_B0 must be (r, d_in) and (d_out, r)");
        d->A0 = a0->data;
        d->B0 = b0->data;
    }
    return 0;
}

static int lora_check_buffers(const pr_ctx *ctx, const lora_dims *d)
{
    if (ctx->n_saved < N_SAVED || ctx->n_scratch < N_SCRATCH)
        return ctx->host->error(ctx, "lora: expected %d saved and %d scratch buffers, got %u and %u",
                                N_SAVED, N_SCRATCH, ctx->n_saved, ctx->n_scratch);
    for (int i = 0; i < N_SAVED; i++)
        if (!ctx->saved[i]->data)
            return ctx->host->error(ctx, "lora: saved buffer '%s' is missing", lora_saved[i].name);
    if (ctx->saved[SAVED_XA]->shape[0] < d->rows)
        return ctx->host->error(ctx, "lora: saved buffer 'xa' holds %lld rows, the call has %d",
                                (long long)ctx->saved[SAVED_XA]->shape[0], d->rows);
    return 0;
}

/* forward: in = x (rows, d_in) -> out = h (rows, d_out), unscaled. */
static int lora_forward(const pr_ctx *ctx)
{
    const pr_host *host = ctx->host;
    lora_dims d;
    int rc = lora_get_dims(ctx, &d);
    if (rc || (rc = lora_check_buffers(ctx, &d)))
        return rc;
    if (!ctx->in->data || !ctx->out->data)
        return host->error(ctx, "lora: forward needs its input and output tensors");
    if (ctx->in->shape[1] != d.d_in || ctx->out->shape[1] != d.d_out)
        return host->error(ctx, "lora: site widths %lld -> %lld, parameters expect %d -> %d",
                           (long long)ctx->in->shape[1], (long long)ctx->out->shape[1], d.d_in,
                           d.d_out);

    const float p = (float)ctx->options[OPT_DROPOUT].num;
    const int drop = ctx->training && p > 0.0f;
    float *xa = ctx->saved[SAVED_XA]->data;
    ((float *)ctx->saved[SAVED_DROPOUT_ON]->data)[0] = drop ? 1.0f : 0.0f;

    const float *x = ctx->in->data;
    int ldx = row_stride(ctx->in);
    if (drop) {
        void *mask = ctx->saved[SAVED_MASK]->data;
        float *xd = ctx->scratch[SCRATCH_XD]->data;
        if (!xd)
            return host->error(ctx, "lora: scratch buffer 'x_dropped' is missing");
        host->dropout_mask(ctx, 0, p, d.d_in, mask);
        host->dropout_apply(xd, d.d_in, x, ldx, mask, d.rows, d.d_in, p);
        x = xd;
        ldx = d.d_in;
    }
    /* xa (rows, r) = x (rows, d_in) . A^T */
    host->gemm(0, 1, d.rows, d.r, d.d_in, 1.0f, x, ldx, d.A, d.d_in, 0.0f, xa, d.r);
    /* h (rows, d_out) = xa . B^T */
    host->gemm(0, 1, d.rows, d.d_out, d.r, 1.0f, xa, d.r, d.B, d.r, 0.0f, ctx->out->data,
               row_stride(ctx->out));
    if (d.A0) {
        /* h -= x . A0^T . B0^T on the undropped x: the residual base x.(W - s B0 A0)^T
         * sees the whole input, as PEFT's residual weight does. */
        float *xa0 = ctx->scratch[SCRATCH_DXA]->data;
        if (!xa0)
            return host->error(ctx, "lora: scratch buffer 'd_xa' is missing");
        host->gemm(0, 1, d.rows, d.r, d.d_in, 1.0f, ctx->in->data, row_stride(ctx->in), d.A0, d.d_in,
                   0.0f, xa0, d.r);
        host->gemm(0, 1, d.rows, d.d_out, d.r, -1.0f, xa0, d.r, d.B0, d.r, 1.0f, ctx->out->data,
                   row_stride(ctx->out));
    }
    return 0;
}

/* backward: d_out = dh = s*dy (rows, d_out).  Accumulates
 *   dB += dh^T . xa                 (d_out, r)
 *   dA += (dh . B)^T . x_dropped    (r, d_in)
 *   dx += keep/(1-p) * (dh . B . A) (rows, d_in) */
static int lora_backward(const pr_ctx *ctx)
{
    const pr_host *host = ctx->host;
    lora_dims d;
    int rc = lora_get_dims(ctx, &d);
    if (rc || (rc = lora_check_buffers(ctx, &d)))
        return rc;
    if (!ctx->d_out->data)
        return host->error(ctx, "lora: backward needs d_out");
    const float *dh = ctx->d_out->data;
    const int lddh = row_stride(ctx->d_out);
    const float *xa = ctx->saved[SAVED_XA]->data;
    float *dA = ctx->n_params && ctx->grads ? ctx->grads[PARAM_A]->data : NULL;
    float *dB = ctx->n_params && ctx->grads ? ctx->grads[PARAM_B]->data : NULL;
    float *dx = ctx->d_in->data;

    if (dB)
        host->gemm(1, 0, d.d_out, d.r, d.rows, 1.0f, dh, lddh, xa, d.r, 1.0f, dB, d.r);
    if (!dA && !dx)
        return 0;

    float *dxa = ctx->scratch[SCRATCH_DXA]->data;
    if (!dxa)
        return host->error(ctx, "lora: scratch buffer 'd_xa' is missing");
    if (dx && d.A0) {
        /* the frozen residual term: dx -= dh . B0 . A0 (no dropout on it) */
        host->gemm(0, 0, d.rows, d.r, d.d_out, 1.0f, dh, lddh, d.B0, d.r, 0.0f, dxa, d.r);
        host->gemm(0, 0, d.rows, d.d_in, d.r, -1.0f, dxa, d.r, d.A0, d.d_in, 1.0f, dx,
                   row_stride(ctx->d_in));
    }
    /* d_xa (rows, r) = dh (rows, d_out) . B (d_out, r) */
    host->gemm(0, 0, d.rows, d.r, d.d_out, 1.0f, dh, lddh, d.B, d.r, 0.0f, dxa, d.r);

    const int drop = ((const float *)ctx->saved[SAVED_DROPOUT_ON]->data)[0] != 0.0f;
    const float p = (float)ctx->options[OPT_DROPOUT].num;
    const void *mask = ctx->saved[SAVED_MASK]->data;
    float *xd = ctx->scratch[SCRATCH_XD]->data;
    if (drop && !xd)
        return host->error(ctx, "lora: scratch buffer 'x_dropped' is missing");

    if (dA) {
        if (!ctx->in->data)
            return host->error(ctx, "lora: backward needs the module input (in) for lora_A's gradient");
        const float *x = ctx->in->data;
        int ldx = row_stride(ctx->in);
        if (drop) {
            host->dropout_apply(xd, d.d_in, x, ldx, mask, d.rows, d.d_in, p);
            x = xd;
            ldx = d.d_in;
        }
        host->gemm(1, 0, d.r, d.d_in, d.rows, 1.0f, dxa, d.r, x, ldx, 1.0f, dA, d.d_in);
    }
    if (dx) {
        const int lddx = row_stride(ctx->d_in);
        if (!drop) {
            host->gemm(0, 0, d.rows, d.d_in, d.r, 1.0f, dxa, d.r, d.A, d.d_in, 1.0f, dx, lddx);
        } else {
            /* x_dropped's scratch is free again: d(x_dropped) goes there,
             * then through the mask into dx. */
            host->gemm(0, 0, d.rows, d.d_in, d.r, 1.0f, dxa, d.r, d.A, d.d_in, 0.0f, xd, d.d_in);
            host->dropout_backward(dx, lddx, xd, d.d_in, mask, d.rows, d.d_in, p);
        }
    }
    return 0;
}

/* merge: out [d_in, d_out] = s * A^T . B^T, s = ctx->scale. */
static int lora_merge(const pr_ctx *ctx)
{
    lora_dims d;
    int rc = lora_get_dims(ctx, &d);
    if (rc)
        return rc;
    if (!ctx->out->data || ctx->out->shape[0] != d.d_in || ctx->out->shape[1] != d.d_out)
        return ctx->host->error(ctx, "lora: merge output must be [%d, %d]", d.d_in, d.d_out);
    ctx->host->gemm(1, 1, d.d_in, d.d_out, d.r, ctx->scale, d.A, d.d_in, d.B, d.r, 0.0f,
                    ctx->out->data, row_stride(ctx->out));
    if (d.A0) /* - s * A0^T . B0^T */
        ctx->host->gemm(1, 1, d.d_in, d.d_out, d.r, -ctx->scale, d.A0, d.d_in, d.B0, d.r, 1.0f,
                        ctx->out->data, row_stride(ctx->out));
    return 0;
}

/* ---- initialisations (init_lora_weights) --------------------------------
 *
 * setup() runs once per insertion after the host drew lora_A (kaiming
 * uniform) and lora_B (zeros), at every attach (a module loaded from a file
 * or a checkpoint is attached first, then its tensors are read over these).
 * The decompositions are computed here in double, in the plugin: a plugin
 * links only libm (sdk/GUIDE.md), so no LAPACK.  W below is the frozen
 * weight in PEFT's orientation, (d_out, d_in); host->base_weight_f32 gives
 * its transpose [d_in, d_out] row-major, which is W column-major. */

/* One-sided Jacobi (Hestenes) SVD of the p x q matrix X, q <= p, stored as
 * q columns of p doubles (x).  On return the columns are orthogonal, x_j =
 * sigma_j u_j, and v (q columns of q) holds the right singular vectors. */
static void jacobi_svd(double *x, int p, int q, double *v)
{
    for (int j = 0; j < q; j++)
        for (int i = 0; i < q; i++)
            v[(size_t)j * q + i] = i == j;
    for (int sweep = 0; sweep < 80; sweep++) {
        int rotated = 0;
        for (int i = 0; i < q - 1; i++)
            for (int j = i + 1; j < q; j++) {
                double *ci = x + (size_t)i * p, *cj = x + (size_t)j * p;
                double a = 0, b = 0, g = 0;
                for (int k = 0; k < p; k++) {
                    a += ci[k] * ci[k];
                    b += cj[k] * cj[k];
                    g += ci[k] * cj[k];
                }
                if (g == 0.0 || fabs(g) <= 1e-15 * sqrt(a * b))
                    continue;
                rotated = 1;
                double zeta = (b - a) / (2.0 * g);
                double t = (zeta >= 0 ? 1.0 : -1.0) / (fabs(zeta) + sqrt(1.0 + zeta * zeta));
                double c = 1.0 / sqrt(1.0 + t * t), s = c * t;
                for (int k = 0; k < p; k++) {
                    double xi = ci[k], xj = cj[k];
                    ci[k] = c * xi - s * xj;
                    cj[k] = s * xi + c * xj;
                }
                double *vi = v + (size_t)i * q, *vj = v + (size_t)j * q;
                for (int k = 0; k < q; k++) {
                    double xi = vi[k], xj = vj[k];
                    vi[k] = c * xi - s * xj;
                    vj[k] = s * xi + c * xj;
                }
            }
        if (!rotated)
            break;
    }
}

/* PiSSA (PEFT's pissa_init): W = U S V^T, A = sqrt(S_r / s) V_r^T,
 * B = U_r sqrt(S_r / s), so s * B.A is the rank-r truncated SVD of W. */
static int init_pissa(const pr_ctx *ctx, const float *wf, int d_in, int d_out, int r, float scale,
                      float *A, float *B)
{
    const pr_host *host = ctx->host;
    /* the smaller side is orthogonalised: X = W (d_out x d_in) when d_in <=
     * d_out, else X = W^T */
    const int tall = d_in <= d_out;
    const int p = tall ? d_out : d_in, q = tall ? d_in : d_out;
    double *x = host->alloc(((size_t)p * q + (size_t)q * q) * sizeof(double) + (size_t)q * (sizeof(double) + sizeof(int)));
    if (!x)
        return host->error(ctx, "lora: out of memory for the SVD of a %d x %d weight", d_out, d_in);
    double *v = x + (size_t)p * q, *sig = v + (size_t)q * q;
    int *order = (int *)(sig + q);
    for (int j = 0; j < q; j++)
        for (int k = 0; k < p; k++) /* column j of X */
            x[(size_t)j * p + k] = tall ? wf[(size_t)j * d_out + k] : wf[(size_t)k * d_out + j];
    jacobi_svd(x, p, q, v);
    for (int j = 0; j < q; j++) {
        double n = 0;
        for (int k = 0; k < p; k++)
            n += x[(size_t)j * p + k] * x[(size_t)j * p + k];
        sig[j] = sqrt(n);
        order[j] = j;
    }
    for (int i = 1; i < q; i++) /* descending singular values */
        for (int j = i; j > 0 && sig[order[j]] > sig[order[j - 1]]; j--) {
            int t = order[j];
            order[j] = order[j - 1];
            order[j - 1] = t;
        }
    for (int k = 0; k < r; k++) {
        int j = order[k];
        double sg = sig[j], f = sqrt(sg / scale), inv = sg > 0 ? 1.0 / sg : 0.0;
        const double *xu = x + (size_t)j * p, *vv = v + (size_t)j * q;
        /* tall: u = x_j / sigma (d_out), right vector v_j (d_in);
         * wide: X = W^T, so W's left vector is v_j (d_out) and its right one x_j / sigma (d_in) */
        for (int i = 0; i < d_out; i++)
            B[(size_t)i * r + k] = (float)(f * (tall ? xu[i] * inv : vv[i]));
        for (int i = 0; i < d_in; i++)
            A[(size_t)k * d_in + i] = (float)(f * (tall ? vv[i] : xu[i] * inv));
    }
    host->free(x);
    return 0;
}

/* OLoRA (PEFT's olora_init): W = Q R (reduced, Householder with LAPACK's
 * sign convention, beta = -sign(alpha) ||x||), B = Q[:, :r], A = R[:r, :],
 * unscaled; s * B.A is what the residual weight loses.  Only the first r
 * reflections are needed: later ones leave Q's first r columns and R's
 * first r rows unchanged. */
static int init_olora(const pr_ctx *ctx, const float *wf, int d_in, int d_out, int r, float *A, float *B)
{
    const pr_host *host = ctx->host;
    const int m = d_out, n = d_in;
    double *w = host->alloc(((size_t)m * n + (size_t)m * r + (size_t)m) * sizeof(double));
    if (!w)
        return host->error(ctx, "lora: out of memory for the QR of a %d x %d weight", d_out, d_in);
    double *hv = w + (size_t)m * n, *q = hv + (size_t)m * r; /* reflectors; one column of Q */
    for (size_t i = 0; i < (size_t)m * n; i++) /* W column-major: column j = row j of wf */
        w[i] = wf[i];
    for (int j = 0; j < r; j++) {
        double *cj = w + (size_t)j * m, *vj = hv + (size_t)j * m;
        double nrm = 0;
        for (int i = j; i < m; i++)
            nrm += cj[i] * cj[i];
        nrm = sqrt(nrm);
        memset(vj, 0, (size_t)m * sizeof(double));
        if (nrm == 0.0)
            continue; /* H_j = I */
        double beta = cj[j] >= 0 ? -nrm : nrm;
        for (int i = j; i < m; i++)
            vj[i] = cj[i];
        vj[j] -= beta; /* v = x - beta e_j, H = I - 2 v v^T / v^T v */
        double vv = 0;
        for (int i = j; i < m; i++)
            vv += vj[i] * vj[i];
        for (int c = j; c < n; c++) {
            double *cc = w + (size_t)c * m, dot = 0;
            for (int i = j; i < m; i++)
                dot += vj[i] * cc[i];
            dot *= 2.0 / vv;
            for (int i = j; i < m; i++)
                cc[i] -= dot * vj[i];
        }
        double inv = sqrt(2.0 / vv);
        for (int i = j; i < m; i++)
            vj[i] *= inv; /* now H = I - v v^T */
    }
    for (int k = 0; k < r; k++) {
        for (int c = 0; c < n; c++) /* R's row k: upper triangle of the reduced matrix */
            A[(size_t)k * n + c] = c >= k ? (float)w[(size_t)c * m + k] : 0.0f;
        /* Q e_k = H_0 ... H_{r-1} e_k */
        memset(q, 0, (size_t)m * sizeof(double));
        q[k] = 1.0;
        for (int j = r - 1; j >= 0; j--) {
            const double *vj = hv + (size_t)j * m;
            double dot = 0;
            for (int i = j; i < m; i++)
                dot += vj[i] * q[i];
            for (int i = j; i < m; i++)
                q[i] -= dot * vj[i];
        }
        for (int i = 0; i < m; i++)
            B[(size_t)i * r + k] = (float)q[i];
    }
    host->free(w);
    return 0;
}

/* setup: the inits the host cannot draw.  true needs nothing; false draws
 * lora_B kaiming-uniform(a = sqrt(5)) over its fan-in r, as nn.Linear;
 * gaussian redraws lora_A ~ normal(0, 1/r) (PEFT's std = 1/r); pissa and
 * olora set lora_A, lora_B and their frozen copies from the frozen weight. */
static int lora_setup(const pr_ctx *ctx)
{
    const pr_host *host = ctx->host;
    lora_dims d;
    int rc = lora_get_dims(ctx, &d);
    if (rc)
        return rc;
    float *A = ctx->params[PARAM_A]->data, *B = ctx->params[PARAM_B]->data;
    const size_t na = (size_t)d.r * d.d_in, nb = (size_t)d.d_out * d.r;
    uint64_t st = ctx->seed ^ 0x6c6f7261696e6974ull;
    if (ctx->n_options <= OPT_INIT || ctx->n_params < N_PARAMS)
        return 0;
    switch ((int)ctx->options[OPT_INIT].num) {
    case INIT_TRUE:
        return 0;
    case INIT_FALSE: {
        const float bound = (float)(1.0 / sqrt((double)d.r));
        for (size_t i = 0; i < nb; i++)
            B[i] = (2.0f * host->rng_uniform(&st) - 1.0f) * bound;
        return 0;
    }
    case INIT_GAUSSIAN:
        for (size_t i = 0; i < na; i++)
            A[i] = host->rng_normal(&st) / (float)d.r;
        return 0;
    case INIT_LOFTQ:
        return host->error(ctx, "lora: init_lora_weights = loftq is not supported: LoftQ (Li et al. 2023, "
                           "arXiv 2310.08659) alternates quantising the frozen weight with an SVD of the "
                           "quantisation error; peftref's base weights are not quantised (and the plugin ABI "
                           "has no quantiser), so W - Q(W) = 0 and LoftQ degenerates to zero factors; use "
                           "pissa for an SVD-based init of a full-precision base");
    default:
        break;
    }
    const int k = d.d_in < d.d_out ? d.d_in : d.d_out;
    if (d.r > k)
        return host->error(ctx, "lora: init_lora_weights = %s needs r <= min(d_in, d_out) = %d, r is %d",
                           init_choices[(int)ctx->options[OPT_INIT].num], k, d.r);
    if (!ctx->base_weight)
        return host->error(ctx, "lora: init_lora_weights = %s reads the frozen weight, but the site has none",
                           init_choices[(int)ctx->options[OPT_INIT].num]);
    if (!(ctx->scale > 0.0f))
        return host->error(ctx, "lora: init_lora_weights = pissa / olora need a positive scale (alpha > 0)");
    float *wf = host->alloc((size_t)d.d_in * d.d_out * sizeof(float));
    if (!wf)
        return host->error(ctx, "lora: out of memory for the [%d, %d] frozen weight", d.d_in, d.d_out);
    if (host->base_weight_f32(ctx, wf) != 0) {
        host->free(wf);
        return host->error(ctx, "lora: the frozen weight could not be read");
    }
    if ((int)ctx->options[OPT_INIT].num == INIT_PISSA)
        rc = init_pissa(ctx, wf, d.d_in, d.d_out, d.r, ctx->scale, A, B);
    else
        rc = init_olora(ctx, wf, d.d_in, d.d_out, d.r, A, B);
    host->free(wf);
    if (rc)
        return rc;
    memcpy(ctx->params[PARAM_A0]->data, A, na * sizeof(float));
    memcpy(ctx->params[PARAM_B0]->data, B, nb * sizeof(float));
    return 0;
}

/* s = alpha / r, or alpha / sqrt(r) with use_rslora. */
static float lora_scale(const pr_ctx *ctx)
{
    double r = ctx->options[OPT_R].num, alpha = ctx->options[OPT_ALPHA].num;
    if (r < 1)
        return 0.0f;
    return (float)(ctx->options[OPT_RSLORA].num != 0 ? alpha / sqrt(r) : alpha / r);
}

static const pr_ext_peft_config peft_lora = {
    .struct_size = sizeof(pr_ext_peft_config),
    .read = peft_read_lora,
    .write = peft_write_lora,
    .gguf_adapter = "lora",
};

static const void *peft_lora_extension(const char *uri)
{
    return strcmp(uri, PR_EXT_PEFT_CONFIG_URI) ? NULL : &peft_lora;
}

static const pr_technique lora_technique = {
    .struct_size = sizeof(pr_technique),
    .abi_major = PR_ABI_MAJOR,
    .name = "lora",
    .version = "1.0.0",
    .summary = "Low-rank update y += (alpha/r) x.A^T.B^T beside a frozen projection. Default site "
               "qkv: Hugging Face PEFT's default target for GPT-2 is the fused c_attn (q, k and v "
               "together); the paper's q,v choice is sites [q, v].",
    .citation = "Hu, Shen, Wallis, Allen-Zhu, Li, Wang, Wang, Chen (2021). LoRA: Low-Rank "
                "Adaptation of Large Language Models. arXiv:2106.09685",
    .license = "MIT",
    .intra = PR_INTRA_FACTORISED,
    .inter = PR_INTER_FIXED,
    .adaptation = PR_ADAPT_REPARAMETERISATION,
    .sharing = PR_SHARE_NONE,
    .input = PR_INPUT_HIDDEN,
    .insertion = PR_INSERT_PARALLEL,
    .insertions = PR_INSERTIONS_PER_SITE_LAYER,
    .integration = PR_INTEGRATE_SCALED_ADD,
    .workspace = PR_WS_ATTENTION | PR_WS_FFN,
    .options = lora_options,
    .n_options = N_OPTS,
    .sites = PR_SITE_BIT(PR_SITE_QKV) | PR_SITE_BIT(PR_SITE_Q) | PR_SITE_BIT(PR_SITE_K) |
             PR_SITE_BIT(PR_SITE_V) | PR_SITE_BIT(PR_SITE_O) | PR_SITE_BIT(PR_SITE_FFN_UP) |
             PR_SITE_BIT(PR_SITE_FFN_GATE) | PR_SITE_BIT(PR_SITE_FFN_DOWN),
    .default_sites = PR_SITE_BIT(PR_SITE_QKV),
    .default_sites_llama = PR_SITE_BIT(PR_SITE_Q) | PR_SITE_BIT(PR_SITE_V),
    .params = lora_params,
    .n_params = N_PARAMS,
    .saved = lora_saved,
    .n_saved = N_SAVED,
    .scratch = lora_scratch,
    .n_scratch = N_SCRATCH,
    .scale = lora_scale,
    .param_formula = "per insertion: r * (d_in + d_out) (lora_A r x d_in, lora_B d_out x r; no "
                     "biases), r resolved per site; insertions = chosen sites x chosen layers "
                     "(default qkv: L)",
    .forward = lora_forward,
    .backward = lora_backward,
    .merge = lora_merge,
    .setup = lora_setup,
    .peft_type = "LORA",
    .extension_data = peft_lora_extension,
};

static const pr_technique *const lora_techniques[] = { &lora_technique };

static const pr_plugin lora_plugin = {
    .struct_size = sizeof(pr_plugin),
    .abi_major = PR_ABI_MAJOR,
    .name = "lora",
    .version = "1.0.0",
    .n_techniques = 1,
    .techniques = lora_techniques,
};

PR_PLUGIN_EXPORT const pr_plugin *peftref_plugin_entry(const pr_entry_args *args)
{
    (void)args; /* a built-in plugin needs none of the host's entry arguments */
    return &lora_plugin;
}
