/* AdaLoRA: adaptive budget allocation for low-rank adaptation (Zhang, Chen,
 * Bukharin, Karampatziakis, He, Cheng, Chen, Zhao 2023, "Adaptive Budget
 * Allocation for Parameter-Efficient Fine-Tuning", ICLR 2023,
 * arXiv 2303.10512), as Hugging Face PEFT's AdaLoraModel / SVDLinear /
 * RankAllocator implement it.
 *
 * Beside a frozen projection y = x.W (W [d_in, d_out]) the update is kept in
 * SVD form dW^T = P diag(lambda) Q, with PEFT's names:
 *
 *     lora_A (init_r, d_in)   Q, right singular vectors, normal(0, 0.02)
 *     lora_B (d_out, init_r)  P, left singular vectors,  normal(0, 0.02)
 *     lora_E                  lambda, the singular values, zeros (identity at init)
 *
 *     h = dropout(x) . (A * E)^T . B^T,   y <- y + s * h,
 *     s = lora_alpha / (ranknum + 1e-5),  ranknum = init_r (PEFT's scaling;
 *         lora_alpha <= 0 means init_r), a constant: PEFT never updates ranknum.
 *
 * Orthogonality regulariser (host->add_aux_loss, in after_backward), as PEFT's
 * AdaLoraModel.forward computes it: the mean over every lora_A and lora_B of
 * the module of ||A A^T - I||_F and ||B^T B - I||_F (Frobenius norms, not
 * squared as the paper's eq. 4 writes them), times orth_reg_weight.  Each
 * insertion adds its two terms divided by 2N (N insertions) and their
 * gradient 2 w/(2N) M A / ||M|| (M = A A^T - I) and 2 w/(2N) B M / ||M||
 * (M = B^T B - I) to dA and dB.
 *
 * Rank budget (on_step, after each optimizer step, PEFT's update_and_allocate
 * with global_step = ctx->step - 1, the 0-based index of the step just taken,
 * as PEFT's example loop passes it): sensitivity I = |p * grad| of every
 * element of A, B and E, smoothed Ibar = b1 Ibar + (1-b1) I and uncertainty
 * U = b2 U + (1-b2) |I - Ibar|; element score s = Ibar * U; triplet score
 * S_i = s(E_i) + mean_j s(A_ij) + mean_o s(B_oi).  Budget (PEFT's
 * budget_schedule): global_step <= tinit: init_r * N, no masking; up to
 * total_step - tfinal: target + (init - target) (1 - (t - tinit) /
 * (total_step - tfinal - tinit))^3 (truncated to an integer), masking every
 * deltaT steps; at t = total_step - tfinal a last masking to target_r * N
 * fixes the rank pattern, applied at every later step.  Masking zeroes the
 * entries of lora_E whose triplet score is <= the (init_bgt - budget)-th
 * smallest over the WHOLE module, as PEFT's mask_to_budget (masked_fill on
 * lora_E; the entries keep training and may regrow until the next masking).
 *
 * Why lora_E is one module-wide tensor (PR_SCOPE_GLOBAL, row i = insertion
 * i's singular values) and not PEFT's (r, 1) per insertion: the budget is a
 * global top-k, and PEFT masks right after scoring every triplet of the
 * step.  The host calls on_step insertion by insertion, and a call may write
 * only the parameters it is handed; with a per-insertion lora_E, insertion k
 * would have to mask before insertions k+1.. had scored this step.  With
 * one lora_E, every insertion's on_step scores its own A and B into a shared
 * buffer, and the last insertion's on_step scores lora_E, takes the global
 * threshold and masks every row in the same step, exactly as PEFT.  The cost:
 * the generic placer names a global tensor only as one key, so lora_E has no
 * PEFT key and a saved module uses peftref's tensor names (lora_A and lora_B
 * carry PEFT's keys).  Trainable counts are unchanged (init_r per insertion).
 * `peftref export --format peft` splits lora_E per module and writes the
 * kept triplets with PEFT's rank_pattern (core/cli/export_peft.c); a PEFT
 * ADALORA adapter is rebuilt into this layout on import
 * (core/io/peft_adapter.c).
 *
 * The RankAllocator's statistics are frozen buffers (PR_PARAM_FROZEN |
 * PR_PARAM_REGENERATE, zeros): not trained, not written into module files
 * (PEFT does not save them either), regenerated as zeros on load.
 *
 * total_step: PEFT requires it; the ABI does not tell a plugin how many steps
 * the run has, so the option must be set (on_step fails while it is 0).
 *
 * This file includes only peftref's public plugin headers (plugin.h,
 * ext/peft_config.h), its PEFT codecs (peft/codecs.h) and libc/libm and links nothing
 * of peftref: products through host->gemm, dropout through the host. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <peftref/plugin.h>
#include <peftref/ext/peft_config.h>

#include "peft/codecs.h"

PR_PLUGIN_EXPORT const pr_plugin *peftref_plugin_entry(const pr_entry_args *args);

enum {
    OPT_TARGET_R, OPT_INIT_R, OPT_TINIT, OPT_TFINAL, OPT_DELTA_T, OPT_BETA1, OPT_BETA2, OPT_ORTH,
    OPT_TOTAL_STEP, OPT_ALPHA, OPT_DROPOUT, N_OPTS
};
enum {
    PARAM_A, PARAM_B, PARAM_E, /* trained */
    PARAM_IPT_A, PARAM_UNC_A, PARAM_IPT_B, PARAM_UNC_B, /* per insertion, frozen */
    PARAM_IPT_E, PARAM_UNC_E, PARAM_AB_SCORE, PARAM_PATTERN, /* module-wide, frozen */
    N_PARAMS
};
enum { SAVED_XA, SAVED_MASK, SAVED_DROPOUT_ON, N_SAVED };
enum { SCRATCH_XD, SCRATCH_XE, SCRATCH_G, SCRATCH_AE, SCRATCH_COV, SCRATCH_SORT, N_SCRATCH };

#define OPT_INT(nm, pn, d, lo, hi, h) \
    { .struct_size = sizeof(pr_option_decl), .name = nm, .peft_name = pn, .type = PR_OPT_INT, \
      .def = d, .min = lo, .max = hi, .help = h }
#define OPT_FLT(nm, pn, d, lo, hi, h) \
    { .struct_size = sizeof(pr_option_decl), .name = nm, .peft_name = pn, .type = PR_OPT_FLOAT, \
      .def = d, .min = lo, .max = hi, .help = h }

static const pr_option_decl adalora_options[N_OPTS] = {
    [OPT_TARGET_R] = OPT_INT("target_r", NULL, 8, 1, 4096,
                             "target average rank per adapted matrix after the budget schedule; "
                             "Hugging Face PEFT's AdaLoraConfig target_r, default 8"),
    [OPT_INIT_R] = OPT_INT("init_r", NULL, 12, 1, 4096,
                           "initial rank of every adapted matrix (the size of lora_A, lora_B, lora_E); "
                           "PEFT's init_r, default 12; must be >= target_r"),
    [OPT_TINIT] = OPT_INT("tinit", NULL, 0, 0, 1e12,
                          "steps of initial warm-up at the full budget before any masking; PEFT's tinit, default 0"),
    [OPT_TFINAL] = OPT_INT("tfinal", NULL, 0, 0, 1e12,
                           "final steps trained with the rank pattern fixed at the target budget; PEFT's "
                           "tfinal, default 0"),
    [OPT_DELTA_T] = OPT_INT("delta_t", "deltaT", 1, 1, 1e12,
                            "steps between two budget allocations (maskings); PEFT's deltaT, default 1"),
    [OPT_BETA1] = OPT_FLT("beta1", NULL, 0.85, 1e-9, 1 - 1e-9,
                          "EMA coefficient of the sensitivity smoothing, in (0, 1); PEFT's beta1, default 0.85"),
    [OPT_BETA2] = OPT_FLT("beta2", NULL, 0.85, 1e-9, 1 - 1e-9,
                          "EMA coefficient of the uncertainty quantification, in (0, 1); PEFT's beta2, "
                          "default 0.85"),
    [OPT_ORTH] = OPT_FLT("orth_reg_weight", NULL, 0.5, 0, 1e6,
                         "weight of the orthogonality regulariser (mean of ||A A^T - I||_F and "
                         "||B^T B - I||_F over the module), reported as aux_loss; PEFT's orth_reg_weight, "
                         "default 0.5 (0 turns it off; PEFT refuses 0)"),
    [OPT_TOTAL_STEP] = OPT_INT("total_step", NULL, 0, 0, 1e12,
                               "total training steps the budget schedule spans; PEFT's total_step, which it "
                               "requires: set it to the run's step count (0 = unset: training fails at the "
                               "first step)"),
    [OPT_ALPHA] = OPT_FLT("alpha", "lora_alpha", 8, 0, 1e6,
                          "scaling numerator: the update is scaled by alpha / (init_r + 1e-5) (alpha 0: "
                          "init_r); PEFT's lora_alpha, default 8"),
    [OPT_DROPOUT] = OPT_FLT("dropout", "lora_dropout", 0, 0, 0.999,
                            "dropout probability on the module input in training; PEFT's lora_dropout, default 0"),
};

#define STAT(nm, shp, scp, ini, h) \
    { .struct_size = sizeof(pr_param_decl), .name = nm, .shape = shp, .init = ini, .scope = scp, \
      .flags = PR_PARAM_FROZEN | PR_PARAM_REGENERATE | PR_PARAM_NO_DECAY, .help = h }

static const pr_param_decl adalora_params[N_PARAMS] = {
    [PARAM_A] = {
        .struct_size = sizeof(pr_param_decl), .name = "lora_A", .shape = "init_r, d_in",
        .init = PR_INIT_NORMAL, .init_arg = "0.02", .scope = PR_SCOPE_INSERTION,
        .peft_key = "{prefix}.lora_A", .peft_layout = PR_PEFT_AS_IS,
        .help = "right singular vectors Q (init_r, d_in); normal(0, 0.02) as Hugging Face PEFT",
    },
    [PARAM_B] = {
        .struct_size = sizeof(pr_param_decl), .name = "lora_B", .shape = "d_out, init_r",
        .init = PR_INIT_NORMAL, .init_arg = "0.02", .scope = PR_SCOPE_INSERTION,
        .peft_key = "{prefix}.lora_B", .peft_layout = PR_PEFT_AS_IS,
        .help = "left singular vectors P (d_out, init_r); normal(0, 0.02) as Hugging Face PEFT",
    },
    [PARAM_E] = {
        .struct_size = sizeof(pr_param_decl), .name = "lora_E", .shape = "n_sites * n_chosen_layers, init_r",
        .init = PR_INIT_ZEROS, .scope = PR_SCOPE_GLOBAL,
        .help = "singular values, row i for insertion i (PEFT's per-layer lora_E (init_r, 1) stacked: "
                "the budget masks them all in one call); zeros, so the module starts as the identity",
    },
    [PARAM_IPT_A] = STAT("exp_avg_ipt_A", "init_r, d_in", PR_SCOPE_INSERTION, PR_INIT_ZEROS,
                         "smoothed sensitivity of lora_A (RankAllocator.exp_avg_ipt)"),
    [PARAM_UNC_A] = STAT("exp_avg_unc_A", "init_r, d_in", PR_SCOPE_INSERTION, PR_INIT_ZEROS,
                         "uncertainty of lora_A's sensitivity (RankAllocator.exp_avg_unc)"),
    [PARAM_IPT_B] = STAT("exp_avg_ipt_B", "d_out, init_r", PR_SCOPE_INSERTION, PR_INIT_ZEROS,
                         "smoothed sensitivity of lora_B"),
    [PARAM_UNC_B] = STAT("exp_avg_unc_B", "d_out, init_r", PR_SCOPE_INSERTION, PR_INIT_ZEROS,
                         "uncertainty of lora_B's sensitivity"),
    [PARAM_IPT_E] = STAT("exp_avg_ipt_E", "n_sites * n_chosen_layers, init_r", PR_SCOPE_GLOBAL, PR_INIT_ZEROS,
                         "smoothed sensitivity of lora_E"),
    [PARAM_UNC_E] = STAT("exp_avg_unc_E", "n_sites * n_chosen_layers, init_r", PR_SCOPE_GLOBAL, PR_INIT_ZEROS,
                         "uncertainty of lora_E's sensitivity"),
    [PARAM_AB_SCORE] = STAT("ab_score", "n_sites * n_chosen_layers, init_r", PR_SCOPE_GLOBAL, PR_INIT_ZEROS,
                            "this step's mean A-row plus mean B-column score of each triplet, written by "
                            "each insertion's on_step for the last one's global ranking"),
    [PARAM_PATTERN] = STAT("rank_pattern", "n_sites * n_chosen_layers, init_r", PR_SCOPE_GLOBAL, PR_INIT_ONES,
                           "1 where a triplet is kept (PEFT's rank_pattern), fixed at total_step - tfinal"),
};

static const pr_buffer_decl adalora_saved[N_SAVED] = {
    [SAVED_XA] = { .struct_size = sizeof(pr_buffer_decl), .name = "xa", .shape = "rows, init_r" },
    [SAVED_MASK] = { .struct_size = sizeof(pr_buffer_decl), .name = "dropout_mask",
                     .shape = "rows, (d_in + 31) / 32" },
    [SAVED_DROPOUT_ON] = { .struct_size = sizeof(pr_buffer_decl), .name = "dropout_on", .shape = "1" },
};

static const pr_buffer_decl adalora_scratch[N_SCRATCH] = {
    [SCRATCH_XD] = { .struct_size = sizeof(pr_buffer_decl), .name = "x_dropped", .shape = "rows, d_in" },
    [SCRATCH_XE] = { .struct_size = sizeof(pr_buffer_decl), .name = "xe", .shape = "rows, init_r" },
    [SCRATCH_G] = { .struct_size = sizeof(pr_buffer_decl), .name = "g", .shape = "rows, init_r" },
    [SCRATCH_AE] = { .struct_size = sizeof(pr_buffer_decl), .name = "ae", .shape = "init_r, d_in" },
    [SCRATCH_COV] = { .struct_size = sizeof(pr_buffer_decl), .name = "cov", .shape = "init_r, init_r" },
    [SCRATCH_SORT] = { .struct_size = sizeof(pr_buffer_decl), .name = "sort",
                       .shape = "n_sites * n_chosen_layers * init_r" },
};

static int row_stride(const pr_tensor *t)
{
    return (int)(t->stride[0] ? t->stride[0] : t->shape[1]);
}

typedef struct ada_dims {
    int r, d_in, d_out, rows, n_ins;
    const float *A, *B, *E; /* E: this insertion's row */
} ada_dims;

static int ada_get_dims(const pr_ctx *ctx, ada_dims *d)
{
    if (ctx->n_params < N_PARAMS || ctx->n_options < N_OPTS)
        return ctx->host->error(ctx, "adalora: expected %d parameters and %d options, got %u and %u", N_PARAMS,
                                N_OPTS, ctx->n_params, ctx->n_options);
    const pr_tensor *a = ctx->params[PARAM_A], *b = ctx->params[PARAM_B], *e = ctx->params[PARAM_E];
    if (a->ndim != 2 || b->ndim != 2 || e->ndim != 2 || !a->data || !b->data || !e->data ||
        b->shape[1] != a->shape[0] || e->shape[1] != a->shape[0])
        return ctx->host->error(ctx, "adalora: lora_A, lora_B and lora_E must be (r, d_in), (d_out, r) and "
                                     "(insertions, r)");
    if (ctx->insertion < 0 || ctx->insertion >= e->shape[0])
        return ctx->host->error(ctx, "adalora: insertion %d has no row in lora_E (%lld rows)", ctx->insertion,
                                (long long)e->shape[0]);
    d->r = (int)a->shape[0];
    d->d_in = (int)a->shape[1];
    d->d_out = (int)b->shape[0];
    d->rows = ctx->rows;
    d->n_ins = (int)e->shape[0];
    d->A = a->data;
    d->B = b->data;
    d->E = (const float *)e->data + (size_t)ctx->insertion * d->r;
    return 0;
}

static int ada_check_buffers(const pr_ctx *ctx, const ada_dims *d)
{
    if (ctx->n_saved < N_SAVED || ctx->n_scratch < N_SCRATCH)
        return ctx->host->error(ctx, "adalora: expected %d saved and %d scratch buffers", N_SAVED, N_SCRATCH);
    for (int i = 0; i < N_SAVED; i++)
        if (!ctx->saved[i]->data)
            return ctx->host->error(ctx, "adalora: saved buffer '%s' is missing", adalora_saved[i].name);
    for (int i = SCRATCH_XE; i <= SCRATCH_G; i++)
        if (!ctx->scratch[i]->data)
            return ctx->host->error(ctx, "adalora: scratch buffer '%s' is missing", adalora_scratch[i].name);
    if (ctx->saved[SAVED_XA]->shape[0] < d->rows)
        return ctx->host->error(ctx, "adalora: saved buffer 'xa' holds %lld rows, the call has %d",
                                (long long)ctx->saved[SAVED_XA]->shape[0], d->rows);
    return 0;
}

/* dst (rows, r) = src (rows, r) with column i times E[i] */
static void scale_cols(float *dst, const float *src, const float *E, int rows, int r)
{
    for (int i = 0; i < rows; i++)
        for (int k = 0; k < r; k++)
            dst[(size_t)i * r + k] = src[(size_t)i * r + k] * E[k];
}

/* forward: h (rows, d_out) = x_d . A^T . diag(E) . B^T, unscaled. */
static int adalora_forward(const pr_ctx *ctx)
{
    const pr_host *host = ctx->host;
    ada_dims d;
    int rc = ada_get_dims(ctx, &d);
    if (rc || (rc = ada_check_buffers(ctx, &d)))
        return rc;
    if (!ctx->in->data || !ctx->out->data)
        return host->error(ctx, "adalora: forward needs its input and output tensors");
    if (ctx->in->shape[1] != d.d_in || ctx->out->shape[1] != d.d_out)
        return host->error(ctx, "adalora: site widths %lld -> %lld, parameters expect %d -> %d",
                           (long long)ctx->in->shape[1], (long long)ctx->out->shape[1], d.d_in, d.d_out);
    const float p = (float)ctx->options[OPT_DROPOUT].num;
    const int drop = ctx->training && p > 0.0f;
    float *xa = ctx->saved[SAVED_XA]->data, *xe = ctx->scratch[SCRATCH_XE]->data;
    ((float *)ctx->saved[SAVED_DROPOUT_ON]->data)[0] = drop ? 1.0f : 0.0f;
    const float *x = ctx->in->data;
    int ldx = row_stride(ctx->in);
    if (drop) {
        void *mask = ctx->saved[SAVED_MASK]->data;
        float *xd = ctx->scratch[SCRATCH_XD]->data;
        if (!xd)
            return host->error(ctx, "adalora: scratch buffer 'x_dropped' is missing");
        host->dropout_mask(ctx, 0, p, d.d_in, mask);
        host->dropout_apply(xd, d.d_in, x, ldx, mask, d.rows, d.d_in, p);
        x = xd;
        ldx = d.d_in;
    }
    host->gemm(0, 1, d.rows, d.r, d.d_in, 1.0f, x, ldx, d.A, d.d_in, 0.0f, xa, d.r);
    scale_cols(xe, xa, d.E, d.rows, d.r);
    host->gemm(0, 1, d.rows, d.d_out, d.r, 1.0f, xe, d.r, d.B, d.r, 0.0f, ctx->out->data, row_stride(ctx->out));
    return 0;
}

/* backward: dh = s*dy.  g = dh . B (rows, r);
 *   dB += dh^T . (xa * E);  dE_i += sum_rows g_i xa_i;
 *   dA += (g * E)^T . x_d;  dx += keep/(1-p) (g * E) . A */
static int adalora_backward(const pr_ctx *ctx)
{
    const pr_host *host = ctx->host;
    ada_dims d;
    int rc = ada_get_dims(ctx, &d);
    if (rc || (rc = ada_check_buffers(ctx, &d)))
        return rc;
    if (!ctx->d_out->data)
        return host->error(ctx, "adalora: backward needs d_out");
    const float *dh = ctx->d_out->data;
    const int lddh = row_stride(ctx->d_out);
    const float *xa = ctx->saved[SAVED_XA]->data;
    float *xe = ctx->scratch[SCRATCH_XE]->data, *g = ctx->scratch[SCRATCH_G]->data;
    float *dA = ctx->grads ? ctx->grads[PARAM_A]->data : NULL;
    float *dB = ctx->grads ? ctx->grads[PARAM_B]->data : NULL;
    float *dE = ctx->grads ? ctx->grads[PARAM_E]->data : NULL;
    float *dx = ctx->d_in->data;
    if (dB) {
        scale_cols(xe, xa, d.E, d.rows, d.r);
        host->gemm(1, 0, d.d_out, d.r, d.rows, 1.0f, dh, lddh, xe, d.r, 1.0f, dB, d.r);
    }
    if (!dA && !dx && !dE)
        return 0;
    host->gemm(0, 0, d.rows, d.r, d.d_out, 1.0f, dh, lddh, d.B, d.r, 0.0f, g, d.r);
    if (dE) {
        float *de = dE + (size_t)ctx->insertion * d.r;
        for (int k = 0; k < d.r; k++) {
            double s = 0.0;
            for (int i = 0; i < d.rows; i++)
                s += (double)g[(size_t)i * d.r + k] * xa[(size_t)i * d.r + k];
            de[k] += (float)s;
        }
    }
    if (!dA && !dx)
        return 0;
    scale_cols(g, g, d.E, d.rows, d.r); /* g * E */
    const int drop = ((const float *)ctx->saved[SAVED_DROPOUT_ON]->data)[0] != 0.0f;
    const float p = (float)ctx->options[OPT_DROPOUT].num;
    const void *mask = ctx->saved[SAVED_MASK]->data;
    float *xd = ctx->scratch[SCRATCH_XD]->data;
    if (drop && !xd)
        return host->error(ctx, "adalora: scratch buffer 'x_dropped' is missing");
    if (dA) {
        if (!ctx->in->data)
            return host->error(ctx, "adalora: backward needs the module input for lora_A's gradient");
        const float *x = ctx->in->data;
        int ldx = row_stride(ctx->in);
        if (drop) {
            host->dropout_apply(xd, d.d_in, x, ldx, mask, d.rows, d.d_in, p);
            x = xd;
            ldx = d.d_in;
        }
        host->gemm(1, 0, d.r, d.d_in, d.rows, 1.0f, g, d.r, x, ldx, 1.0f, dA, d.d_in);
    }
    if (dx) {
        const int lddx = row_stride(ctx->d_in);
        if (!drop) {
            host->gemm(0, 0, d.rows, d.d_in, d.r, 1.0f, g, d.r, d.A, d.d_in, 1.0f, dx, lddx);
        } else {
            host->gemm(0, 0, d.rows, d.d_in, d.r, 1.0f, g, d.r, d.A, d.d_in, 0.0f, xd, d.d_in);
            host->dropout_backward(dx, lddx, xd, d.d_in, mask, d.rows, d.d_in, p);
        }
    }
    return 0;
}

/* merge: out [d_in, d_out] = s * (A * E)^T . B^T (PEFT's get_delta_weight). */
static int adalora_merge(const pr_ctx *ctx)
{
    ada_dims d;
    int rc = ada_get_dims(ctx, &d);
    if (rc)
        return rc;
    float *ae = ctx->n_scratch > SCRATCH_AE ? ctx->scratch[SCRATCH_AE]->data : NULL;
    if (!ae)
        return ctx->host->error(ctx, "adalora: scratch buffer 'ae' is missing");
    if (!ctx->out->data || ctx->out->shape[0] != d.d_in || ctx->out->shape[1] != d.d_out)
        return ctx->host->error(ctx, "adalora: merge output must be [%d, %d]", d.d_in, d.d_out);
    for (int k = 0; k < d.r; k++)
        for (int j = 0; j < d.d_in; j++)
            ae[(size_t)k * d.d_in + j] = d.A[(size_t)k * d.d_in + j] * d.E[k];
    ctx->host->gemm(1, 1, d.d_in, d.d_out, d.r, ctx->scale, ae, d.d_in, d.B, d.r, 0.0f, ctx->out->data,
                    row_stride(ctx->out));
    return 0;
}

/* s = lora_alpha / (ranknum + 1e-5), ranknum = init_r; lora_alpha <= 0: init_r. */
static float adalora_scale(const pr_ctx *ctx)
{
    double r = ctx->options[OPT_INIT_R].num, alpha = ctx->options[OPT_ALPHA].num;
    double scaling = alpha > 0 ? alpha : r;
    return (float)(scaling / ((double)(float)r + 1e-5));
}

static int adalora_setup(const pr_ctx *ctx)
{
    if (ctx->options[OPT_TARGET_R].num > ctx->options[OPT_INIT_R].num)
        return ctx->host->error(ctx, "adalora: target_r (%g) must not exceed init_r (%g)",
                                ctx->options[OPT_TARGET_R].num, ctx->options[OPT_INIT_R].num);
    return 0;
}

/* ||M||_F of M = A A^T - I (A (r, n); trans 0) or B^T B - I (B (n, r); trans 1), M into cov. */
static double gram_minus_eye(const pr_host *host, const float *X, int n, int r, int trans, float *cov)
{
    if (!trans)
        host->gemm(0, 1, r, r, n, 1.0f, X, n, X, n, 0.0f, cov, r);
    else
        host->gemm(1, 0, r, r, n, 1.0f, X, r, X, r, 0.0f, cov, r);
    double s = 0.0;
    for (int i = 0; i < r; i++) {
        cov[(size_t)i * r + i] -= 1.0f;
        for (int j = 0; j < r; j++)
            s += (double)cov[(size_t)i * r + j] * cov[(size_t)i * r + j];
    }
    return sqrt(s);
}

/* after_backward: the orthogonality regulariser's value and gradient. */
static int adalora_after_backward(const pr_ctx *ctx)
{
    ada_dims d;
    int rc = ada_get_dims(ctx, &d);
    if (rc)
        return rc;
    const double w = ctx->options[OPT_ORTH].num;
    if (w <= 0.0)
        return 0;
    float *cov = ctx->n_scratch > SCRATCH_COV ? ctx->scratch[SCRATCH_COV]->data : NULL;
    if (!cov)
        return ctx->host->error(ctx, "adalora: scratch buffer 'cov' is missing");
    const double c = w / (2.0 * d.n_ins); /* PEFT divides the sum by the number of matrices */
    float *dA = ctx->grads ? ctx->grads[PARAM_A]->data : NULL;
    float *dB = ctx->grads ? ctx->grads[PARAM_B]->data : NULL;
    double na = gram_minus_eye(ctx->host, d.A, d.d_in, d.r, 0, cov);
    if (dA && na > 0.0) /* dA += 2c/||M|| M A */
        ctx->host->gemm(0, 0, d.r, d.d_in, d.r, (float)(2.0 * c / na), cov, d.r, d.A, d.d_in, 1.0f, dA, d.d_in);
    double nb = gram_minus_eye(ctx->host, d.B, d.d_out, d.r, 1, cov);
    if (dB && nb > 0.0) /* dB += 2c/||M|| B M */
        ctx->host->gemm(0, 0, d.d_out, d.r, d.r, (float)(2.0 * c / nb), d.B, d.r, cov, d.r, 1.0f, dB, d.r);
    ctx->host->add_aux_loss(ctx, c * (na + nb));
    return 0;
}

/* PEFT's budget_schedule(step): the budget, and whether to mask at this step. */
static int64_t budget_at(const pr_option_value *o, int64_t init_bgt, int64_t target_bgt, int64_t step,
                         int *mask)
{
    int64_t tinit = (int64_t)o[OPT_TINIT].num, tfinal = (int64_t)o[OPT_TFINAL].num;
    int64_t total = (int64_t)o[OPT_TOTAL_STEP].num, dt = (int64_t)o[OPT_DELTA_T].num;
    if (step <= tinit) {
        *mask = 0;
        return init_bgt;
    }
    if (step > total - tfinal) {
        *mask = 1;
        return target_bgt;
    }
    double mul = 1.0 - (double)(step - tinit) / (double)(total - tfinal - tinit);
    *mask = step % dt == 0;
    return (int64_t)((double)(init_bgt - target_bgt) * (mul * mul * mul) + (double)target_bgt);
}

static int cmp_float(const void *a, const void *b)
{
    float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

/* Ibar = b1 Ibar + (1-b1) |p g|, U = b2 U + (1-b2) |I - Ibar| over n elements. */
static void update_ipt(const float *p, const float *g, float *ibar, float *unc, size_t n, double b1, double b2)
{
    for (size_t i = 0; i < n; i++) {
        float ipt = fabsf(p[i] * g[i]);
        ibar[i] = (float)(b1 * ibar[i] + (1.0 - b1) * ipt);
        unc[i] = (float)(b2 * unc[i] + (1.0 - b2) * fabsf(ipt - ibar[i]));
    }
}

/* mask_to_budget: zero the entries of E whose score (s(E) + ab_score) is <=
 * the k-th smallest, k = n - budget; record the pattern. */
static int mask_to_budget(const pr_ctx *ctx, int64_t n, int64_t budget)
{
    float *E = ctx->params[PARAM_E]->data, *ie = ctx->params[PARAM_IPT_E]->data;
    float *ue = ctx->params[PARAM_UNC_E]->data, *ab = ctx->params[PARAM_AB_SCORE]->data;
    float *pat = ctx->params[PARAM_PATTERN]->data;
    float *sorted = ctx->n_scratch > SCRATCH_SORT ? ctx->scratch[SCRATCH_SORT]->data : NULL;
    if (!sorted || ctx->scratch[SCRATCH_SORT]->shape[0] < n)
        return ctx->host->error(ctx, "adalora: scratch buffer 'sort' is missing or short");
    int64_t k = n - budget;
    if (k <= 0) /* nothing to mask (torch.kthvalue would refuse k = 0) */
        return 0;
    for (int64_t i = 0; i < n; i++)
        sorted[i] = ie[i] * ue[i] + ab[i];
    qsort(sorted, (size_t)n, sizeof *sorted, cmp_float);
    const float thr = sorted[k - 1];
    for (int64_t i = 0; i < n; i++) {
        int drop = ie[i] * ue[i] + ab[i] <= thr;
        pat[i] = drop ? 0.0f : 1.0f;
        if (drop)
            E[i] = 0.0f;
    }
    return 0;
}

/* on_step: PEFT's update_and_allocate(global_step = ctx->step - 1). */
static int adalora_on_step(const pr_ctx *ctx)
{
    ada_dims d;
    int rc = ada_get_dims(ctx, &d);
    if (rc)
        return rc;
    const pr_option_value *o = ctx->options;
    const int64_t total = (int64_t)o[OPT_TOTAL_STEP].num, tinit = (int64_t)o[OPT_TINIT].num;
    const int64_t tfinal = (int64_t)o[OPT_TFINAL].num;
    if (total <= 0)
        return ctx->host->error(ctx, "adalora: total_step is not set: set it to the run's number of optimizer "
                                     "steps (Hugging Face PEFT requires it too)");
    if (tinit >= total - tfinal)
        return ctx->host->error(ctx, "adalora: tinit (%lld) must be below total_step - tfinal (%lld): the "
                                     "schedule leaves no budgeting phase",
                                (long long)tinit, (long long)(total - tfinal));
    for (int i = PARAM_IPT_A; i < N_PARAMS; i++)
        if (!ctx->params[i]->data)
            return ctx->host->error(ctx, "adalora: buffer '%s' is missing", adalora_params[i].name);
    const int64_t step = ctx->step - 1, n = (int64_t)d.n_ins * d.r;
    const int last = ctx->insertion == d.n_ins - 1;
    const double b1 = o[OPT_BETA1].num, b2 = o[OPT_BETA2].num;
    float *E = ctx->params[PARAM_E]->data;
    if (step < total - tfinal) {
        const float *gA = ctx->grads ? ctx->grads[PARAM_A]->data : NULL;
        const float *gB = ctx->grads ? ctx->grads[PARAM_B]->data : NULL;
        const float *gE = ctx->grads ? ctx->grads[PARAM_E]->data : NULL;
        if (!gA || !gB || !gE)
            return ctx->host->error(ctx, "adalora: on_step needs the gradients of lora_A, lora_B and lora_E");
        float *iA = ctx->params[PARAM_IPT_A]->data, *uA = ctx->params[PARAM_UNC_A]->data;
        float *iB = ctx->params[PARAM_IPT_B]->data, *uB = ctx->params[PARAM_UNC_B]->data;
        update_ipt(d.A, gA, iA, uA, (size_t)d.r * d.d_in, b1, b2);
        update_ipt(d.B, gB, iB, uB, (size_t)d.d_out * d.r, b1, b2);
        float *ab = (float *)ctx->params[PARAM_AB_SCORE]->data + (size_t)ctx->insertion * d.r;
        for (int k = 0; k < d.r; k++) {
            double sa = 0.0, sb = 0.0;
            for (int j = 0; j < d.d_in; j++)
                sa += (double)iA[(size_t)k * d.d_in + j] * uA[(size_t)k * d.d_in + j];
            for (int j = 0; j < d.d_out; j++)
                sb += (double)iB[(size_t)j * d.r + k] * uB[(size_t)j * d.r + k];
            ab[k] = (float)(sa / d.d_in + sb / d.d_out);
        }
        if (!last)
            return 0;
        update_ipt(E, gE, ctx->params[PARAM_IPT_E]->data, ctx->params[PARAM_UNC_E]->data, (size_t)n, b1, b2);
        int mask;
        int64_t budget = budget_at(o, n, (int64_t)o[OPT_TARGET_R].num * d.n_ins, step, &mask);
        return mask ? mask_to_budget(ctx, n, budget) : 0;
    }
    if (!last)
        return 0;
    if (step == total - tfinal) /* the final allocation fixes the rank pattern */
        return mask_to_budget(ctx, n, (int64_t)o[OPT_TARGET_R].num * d.n_ins);
    const float *pat = ctx->params[PARAM_PATTERN]->data;
    for (int64_t i = 0; i < n; i++)
        if (pat[i] == 0.0f)
            E[i] = 0.0f;
    return 0;
}

static const pr_ext_peft_config peft_adalora = {
    .struct_size = sizeof(pr_ext_peft_config),
    .read = peft_read_adalora,
    .write = peft_write_adalora,
    .own_tensors = 1,
};

static const void *peft_adalora_extension(const char *uri)
{
    return strcmp(uri, PR_EXT_PEFT_CONFIG_URI) ? NULL : &peft_adalora;
}

static const pr_technique adalora_technique = {
    .struct_size = sizeof(pr_technique),
    .abi_major = PR_ABI_MAJOR,
    .name = "adalora",
    .version = "1.0.0",
    .summary = "SVD-form low-rank update y += s x.(A*E)^T.B^T whose rank budget is reallocated across all "
               "adapted matrices by importance during training (masking singular values E), with an "
               "orthogonality regulariser on A and B. Set total_step to the run's step count.",
    .citation = "Zhang, Chen, Bukharin, Karampatziakis, He, Cheng, Chen, Zhao (2023). Adaptive Budget "
                "Allocation for Parameter-Efficient Fine-Tuning. ICLR 2023. arXiv:2303.10512",
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
    .options = adalora_options,
    .n_options = N_OPTS,
    .sites = PR_SITE_BIT(PR_SITE_QKV) | PR_SITE_BIT(PR_SITE_Q) | PR_SITE_BIT(PR_SITE_K) |
             PR_SITE_BIT(PR_SITE_V) | PR_SITE_BIT(PR_SITE_O) | PR_SITE_BIT(PR_SITE_FFN_UP) |
             PR_SITE_BIT(PR_SITE_FFN_GATE) | PR_SITE_BIT(PR_SITE_FFN_DOWN),
    .default_sites = PR_SITE_BIT(PR_SITE_QKV),
    .default_sites_llama = PR_SITE_BIT(PR_SITE_Q) | PR_SITE_BIT(PR_SITE_V),
    .params = adalora_params,
    .n_params = N_PARAMS,
    .saved = adalora_saved,
    .n_saved = N_SAVED,
    .scratch = adalora_scratch,
    .n_scratch = N_SCRATCH,
    .scale = adalora_scale,
    .param_formula = "per insertion: init_r * (d_in + d_out) + init_r (lora_A init_r x d_in, lora_B d_out x "
                     "init_r, init_r singular values); the budget masks singular values, it does not "
                     "shrink the tensors",
    .flops_per_token = "2 * init_r * (d_in + d_out) + init_r",
    .forward = adalora_forward,
    .backward = adalora_backward,
    .merge = adalora_merge,
    .setup = adalora_setup,
    .after_backward = adalora_after_backward,
    .on_step = adalora_on_step,
    .peft_type = "ADALORA",
    .extension_data = peft_adalora_extension,
};

static const pr_technique *const adalora_techniques[] = { &adalora_technique };

static const pr_plugin adalora_plugin = {
    .struct_size = sizeof(pr_plugin),
    .abi_major = PR_ABI_MAJOR,
    .name = "adalora",
    .version = "1.0.0",
    .n_techniques = 1,
    .techniques = adalora_techniques,
};

PR_PLUGIN_EXPORT const pr_plugin *peftref_plugin_entry(const pr_entry_args *args)
{
    (void)args;
    return &adalora_plugin;
}
