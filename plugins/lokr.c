/* LoKr: Kronecker-product update of a frozen projection (LyCORIS; Yeh,
 * Hsieh, Gao, Yang, Oh, Gong 2024, "Navigating Text-To-Image Customization:
 * From LyCORIS Fine-Tuning to Model Evaluation", ICLR 2024, arXiv
 * 2309.14859), as Hugging Face PEFT's LoKrLayer implements it for an
 * nn.Linear (W in PEFT's [d_out, d_in] orientation):
 *
 *     (l, k) = factorization(d_out, -1),  (m, n) = factorization(d_in, -1)
 *     lokr_w1   (l, m)  zeros (so dW = 0: the module starts as the identity)
 *     lokr_w2_a (k, r)  kaiming_uniform(a = sqrt(5))
 *     lokr_w2_b (r, n)  kaiming_uniform(a = sqrt(5))
 *
 *     dW = s * lokr_w1 (x) (lokr_w2_a . lokr_w2_b)     [d_out, d_in], s = alpha / r
 *     dW[a k + b, c n + d] = s * w1[a, c] * w2[b, d]
 *
 * factorization(D, -1) is PEFT's (LyCORIS') loop, which for factor -1 ends
 * at (g, D / g), g the largest divisor of D with g*g <= D (768 -> (24, 32),
 * 2304 -> (48, 48), 3072 -> (48, 64)).  The shape expressions below compute
 * g as max over k = 1..128 of k * [D % k == 0] * [k*k <= D] (ABI 1's shape
 * language has no loops); setup() checks each shape against the loop
 * itself, so a width whose g would exceed 128 (D > 16641 with no divisor
 * pair below 128) is refused with a message instead of being mis-shaped.
 *
 * Branches of PEFT's LoKrLayer.update_layer implemented (the default path
 * for r = 8 on every GPT-2-small and TinyLlama projection):
 *   - decompose_factor = -1 (the only value accepted);
 *   - decompose_both = False: use_w1 is true, lokr_w1 is one full (l, m)
 *     matrix (lokr_w1_a / lokr_w1_b are never created);
 *   - use_w2 = False, the r < max(k, n) / 2 case: lokr_w2_a, lokr_w2_b.
 *     When r >= max(k, n) / 2 PEFT would instead create one full lokr_w2
 *     (k, n).  ABI 1 cannot declare a parameter conditionally (every shape
 *     dimension is >= 1), so this plugin keeps the factorised pair there
 *     too and setup() logs a warning that the count and the PEFT names then
 *     differ from PEFT's.  This happens only on small layers (the checker's
 *     32-wide test model at r = 8), never on GPT-2 small at r <= 15.
 *   - init_weights = True (PEFT's reset_adapter_parameters); rank_dropout,
 *     module_dropout (PEFT defaults 0.0), rank_dropout_scale and
 *     use_effective_conv2d (convolutions only) are not implemented.
 *
 * Integration: PR_INTEGRATE_WEIGHT_DELTA, like PEFT's forward (build dW,
 * F.linear(x, dW)): merge() gives dW^T [d_in, d_out] at every forward,
 * backward() receives G = x^T dy [d_in, d_out].
 *
 * This file includes only peftref's public plugin headers (plugin.h,
 * ext/peft_config.h), its PEFT codecs (peft/codecs.h) and libc. */
#include <stdint.h>

#include <string.h>

#include <peftref/plugin.h>
#include <peftref/ext/peft_config.h>

#include "peft/codecs.h"

PR_PLUGIN_EXPORT const pr_plugin *peftref_plugin_entry(const pr_entry_args *args);

/* g(D): the largest divisor of D with g*g <= D, for g <= 128, as a shape
 * expression over the name D. */
#define LK_T(D, k) "(" #k ")*(1-min(1," D "%(" #k ")))*min(1," D "/((" #k ")*(" #k ")))"
#define LK_M(a, b) "max(" a "," b ")"
#define LK_R8(D, i)                                                                          \
    LK_M(LK_M(LK_M(LK_T(D, i * 8 + 1), LK_T(D, i * 8 + 2)), LK_M(LK_T(D, i * 8 + 3), LK_T(D, i * 8 + 4))), \
         LK_M(LK_M(LK_T(D, i * 8 + 5), LK_T(D, i * 8 + 6)), LK_M(LK_T(D, i * 8 + 7), LK_T(D, i * 8 + 8))))
#define LK_G(D)                                                                                 \
    LK_M(LK_M(LK_M(LK_M(LK_R8(D, 0), LK_R8(D, 1)), LK_M(LK_R8(D, 2), LK_R8(D, 3))),            \
              LK_M(LK_M(LK_R8(D, 4), LK_R8(D, 5)), LK_M(LK_R8(D, 6), LK_R8(D, 7)))),           \
         LK_M(LK_M(LK_M(LK_R8(D, 8), LK_R8(D, 9)), LK_M(LK_R8(D, 10), LK_R8(D, 11))),          \
              LK_M(LK_M(LK_R8(D, 12), LK_R8(D, 13)), LK_M(LK_R8(D, 14), LK_R8(D, 15)))))
#define LK_MAX_G 128
#define LK_L LK_G("d_out")              /* l */
#define LK_K "d_out/(" LK_G("d_out") ")" /* k */
#define LK_MM LK_G("d_in")              /* m */
#define LK_N "d_in/(" LK_G("d_in") ")"   /* n */

enum { OPT_R, OPT_ALPHA, OPT_FACTOR, N_OPTS };
enum { PARAM_W1, PARAM_W2A, PARAM_W2B, N_PARAMS };
enum { SCRATCH_W2, SCRATCH_DW2, SCRATCH_T, N_SCRATCH };

static const pr_option_decl lokr_options[N_OPTS] = {
    [OPT_R] = {
        .struct_size = sizeof(pr_option_decl), .name = "r", .type = PR_OPT_INT,
        .def = 8, .min = 1, .max = 4096, .per_site = 1,
        .help = "rank of lokr_w2 = lokr_w2_a . lokr_w2_b; default 8 as Hugging Face PEFT's LoKrConfig r",
    },
    [OPT_ALPHA] = {
        .struct_size = sizeof(pr_option_decl), .name = "alpha", .type = PR_OPT_FLOAT,
        .def = 8, .min = 0, .max = 1e6, .per_site = 1,
        .help = "scaling numerator: dW is scaled by alpha/r; default 8 as PEFT's LoKrConfig alpha",
    },
    [OPT_FACTOR] = {
        .struct_size = sizeof(pr_option_decl), .name = "decompose_factor", .type = PR_OPT_INT,
        .def = -1, .min = -1, .max = -1, .per_site = 0,
        .help = "PEFT's decompose_factor; only -1 (factor each width near its square root, PEFT's "
                "default) is implemented",
    },
};

static const pr_param_decl lokr_params[N_PARAMS] = {
    [PARAM_W1] = {
        .struct_size = sizeof(pr_param_decl), .name = "lokr_w1", .shape = LK_L ", " LK_MM,
        .init = PR_INIT_ZEROS, .scope = PR_SCOPE_INSERTION,
        .peft_key = "{prefix}.lokr_w1", .peft_layout = PR_PEFT_AS_IS,
        .help = "left Kronecker factor (l, m), (l, k) and (m, n) PEFT's factorization of d_out and "
                "d_in; zeros as PEFT, so the module starts as the identity",
    },
    [PARAM_W2A] = {
        .struct_size = sizeof(pr_param_decl), .name = "lokr_w2_a", .shape = LK_K ", r",
        .init = PR_INIT_KAIMING_UNIFORM, .init_arg = "sqrt(5)", .scope = PR_SCOPE_INSERTION,
        .peft_key = "{prefix}.lokr_w2_a", .peft_layout = PR_PEFT_AS_IS,
        .help = "right factor's left low-rank part (k, r); kaiming_uniform(a=sqrt(5)) as PEFT",
    },
    [PARAM_W2B] = {
        .struct_size = sizeof(pr_param_decl), .name = "lokr_w2_b", .shape = "r, " LK_N,
        .init = PR_INIT_KAIMING_UNIFORM, .init_arg = "sqrt(5)", .scope = PR_SCOPE_INSERTION,
        .peft_key = "{prefix}.lokr_w2_b", .peft_layout = PR_PEFT_AS_IS,
        .help = "right factor's right low-rank part (r, n); kaiming_uniform(a=sqrt(5)) as PEFT",
    },
};

static const pr_buffer_decl lokr_scratch[N_SCRATCH] = {
    [SCRATCH_W2] = { .struct_size = sizeof(pr_buffer_decl), .name = "w2", .shape = LK_K ", " LK_N },
    [SCRATCH_DW2] = { .struct_size = sizeof(pr_buffer_decl), .name = "d_w2", .shape = LK_K ", " LK_N },
    [SCRATCH_T] = { .struct_size = sizeof(pr_buffer_decl), .name = "t", .shape = LK_MM ", " LK_K },
};

/* PEFT's factorization(D, -1), the loop itself: (small, large). */
static void lokr_factorization(int dim, int *small, int *large)
{
    int m = 1, n = dim, length = m + n;
    while (m < n) {
        int nm = m + 1;
        while (dim % nm != 0)
            nm++;
        int nn = dim / nm;
        if (nm + nn > length || nm > dim)
            break;
        m = nm;
        n = nn;
    }
    if (m > n) {
        int t = m;
        m = n;
        n = t;
    }
    *small = m;
    *large = n;
}

static int row_stride(const pr_tensor *t)
{
    return (int)(t->stride[0] ? t->stride[0] : t->shape[1]);
}

typedef struct lokr_dims {
    int r, l, k, m, n; /* d_out = l k, d_in = m n */
    const float *w1, *a, *b;
    float *w2, *dw2, *t;
} lokr_dims;

/* Reads the shapes and builds w2 = lokr_w2_a . lokr_w2_b in scratch. */
static int lokr_build(const pr_ctx *ctx, lokr_dims *d)
{
    const pr_host *host = ctx->host;
    if (ctx->n_params < N_PARAMS || ctx->n_scratch < N_SCRATCH)
        return host->error(ctx, "lokr: expected %d parameters and %d scratch buffers, got %u and %u",
                           N_PARAMS, N_SCRATCH, ctx->n_params, ctx->n_scratch);
    const pr_tensor *w1 = ctx->params[PARAM_W1], *a = ctx->params[PARAM_W2A], *b = ctx->params[PARAM_W2B];
    if (w1->ndim != 2 || a->ndim != 2 || b->ndim != 2 || !w1->data || !a->data || !b->data ||
        a->shape[1] != b->shape[0])
        return host->error(ctx, "lokr: lokr_w1 must be (l, m), lokr_w2_a (k, r) and lokr_w2_b (r, n)");
    d->l = (int)w1->shape[0];
    d->m = (int)w1->shape[1];
    d->k = (int)a->shape[0];
    d->r = (int)a->shape[1];
    d->n = (int)b->shape[1];
    d->w1 = w1->data;
    d->a = a->data;
    d->b = b->data;
    d->w2 = ctx->scratch[SCRATCH_W2]->data;
    d->dw2 = ctx->scratch[SCRATCH_DW2]->data;
    d->t = ctx->scratch[SCRATCH_T]->data;
    if (!d->w2 || !d->dw2 || !d->t)
        return host->error(ctx, "lokr: a scratch buffer is missing");
    /* w2 (k, n) = a (k, r) . b (r, n) */
    host->gemm(0, 0, d->k, d->n, d->r, 1.0f, d->a, d->r, d->b, d->n, 0.0f, d->w2, d->n);
    return 0;
}

/* setup: the declared shapes are PEFT's factorization of the site's widths. */
static int lokr_setup(const pr_ctx *ctx)
{
    const pr_host *host = ctx->host;
    if (ctx->n_params < N_PARAMS || !ctx->dims)
        return host->error(ctx, "lokr: setup needs the parameters and the model dimensions");
    int l, k, m, n;
    lokr_factorization(ctx->dims->d_out, &l, &k);
    lokr_factorization(ctx->dims->d_in, &m, &n);
    const pr_tensor *w1 = ctx->params[PARAM_W1], *a = ctx->params[PARAM_W2A], *b = ctx->params[PARAM_W2B];
    if (w1->shape[0] != l || w1->shape[1] != m || a->shape[0] != k || b->shape[1] != n)
        return host->error(ctx,
                           "lokr: widths %d -> %d factor as (%d x %d) and (%d x %d), but the parameters are "
                           "(%lld, %lld), (%lld, r), (r, %lld): a factor above %d is past what the shape "
                           "expressions compute",
                           ctx->dims->d_in, ctx->dims->d_out, m, n, l, k, (long long)w1->shape[0],
                           (long long)w1->shape[1], (long long)a->shape[0], (long long)b->shape[1], LK_MAX_G);
    int r = (int)a->shape[1];
    if (2 * r >= (k > n ? k : n))
        host->log(ctx, PR_LOG_WARN,
                  "lokr: r = %d >= max(%d, %d) / 2, where Hugging Face PEFT creates one full lokr_w2 "
                  "(%d x %d) instead of lokr_w2_a/lokr_w2_b; kept factorised here (ABI 1 has no "
                  "conditional parameters), so this insertion's count and PEFT names differ from PEFT's",
                  r, k, n, k, n);
    return 0;
}

/* merge: out [d_in, d_out] = s * dW^T, dW[a k + b, c n + d] = w1[a, c] w2[b, d]. */
static int lokr_merge(const pr_ctx *ctx)
{
    lokr_dims d;
    int rc = lokr_build(ctx, &d);
    if (rc)
        return rc;
    const int din = d.m * d.n, dout = d.l * d.k;
    if (!ctx->out->data || ctx->out->shape[0] != din || ctx->out->shape[1] != dout)
        return ctx->host->error(ctx, "lokr: merge output must be [%d, %d]", din, dout);
    float *out = ctx->out->data;
    const int ld = row_stride(ctx->out);
    const float s = ctx->scale;
    for (int c = 0; c < d.m; c++)
        for (int dd = 0; dd < d.n; dd++) {
            float *row = out + (size_t)(c * d.n + dd) * ld;
            for (int a = 0; a < d.l; a++) {
                const float w = s * d.w1[a * d.m + c];
                for (int b = 0; b < d.k; b++)
                    row[a * d.k + b] = w * d.w2[b * d.n + dd];
            }
        }
    return 0;
}

/* forward (the host calls merge() for a weight delta; for direct use):
 * each row of x as X (m, n) gives h as H (l, k) = s * w1 . X . w2^T. */
static int lokr_forward(const pr_ctx *ctx)
{
    const pr_host *host = ctx->host;
    lokr_dims d;
    int rc = lokr_build(ctx, &d);
    if (rc)
        return rc;
    if (!ctx->in->data || !ctx->out->data || ctx->in->shape[1] != d.m * d.n || ctx->out->shape[1] != d.l * d.k)
        return host->error(ctx, "lokr: forward needs in (rows, %d) and out (rows, %d)", d.m * d.n, d.l * d.k);
    const float *x = ctx->in->data;
    float *h = ctx->out->data;
    const int ldx = row_stride(ctx->in), ldh = row_stride(ctx->out);
    for (int row = 0; row < ctx->rows; row++) {
        /* t (m, k) = X (m, n) . w2^T */
        host->gemm(0, 1, d.m, d.k, d.n, 1.0f, x + (size_t)row * ldx, d.n, d.w2, d.n, 0.0f, d.t, d.k);
        /* H (l, k) = s * w1 (l, m) . t */
        host->gemm(0, 0, d.l, d.k, d.m, ctx->scale, d.w1, d.m, d.t, d.k, 0.0f, h + (size_t)row * ldh, d.k);
    }
    return 0;
}

/* backward: d_out = G [d_in, d_out], the gradient of merge()'s output:
 *   dw1[a, c] += s * sum_{b,d} G[c n + d, a k + b] w2[b, d]
 *   dw2[b, d]  = s * sum_{a,c} G[c n + d, a k + b] w1[a, c]
 *   dw2_a += dw2 . w2_b^T,  dw2_b += w2_a^T . dw2 */
static int lokr_backward(const pr_ctx *ctx)
{
    const pr_host *host = ctx->host;
    lokr_dims d;
    int rc = lokr_build(ctx, &d);
    if (rc)
        return rc;
    const int din = d.m * d.n, dout = d.l * d.k;
    if (!ctx->d_out->data || ctx->d_out->shape[0] != din || ctx->d_out->shape[1] != dout)
        return host->error(ctx, "lokr: backward needs d_out [%d, %d]", din, dout);
    const float *g = ctx->d_out->data;
    const int ldg = row_stride(ctx->d_out);
    const float s = ctx->scale;
    float *dw1 = ctx->grads ? ctx->grads[PARAM_W1]->data : NULL;
    float *da = ctx->grads ? ctx->grads[PARAM_W2A]->data : NULL;
    float *db = ctx->grads ? ctx->grads[PARAM_W2B]->data : NULL;
    const size_t nw2 = (size_t)d.k * d.n;
    for (size_t q = 0; q < nw2; q++)
        d.dw2[q] = 0.0f;
    for (int c = 0; c < d.m; c++)
        for (int dd = 0; dd < d.n; dd++) {
            const float *grow = g + (size_t)(c * d.n + dd) * ldg;
            for (int a = 0; a < d.l; a++) {
                const float w = s * d.w1[a * d.m + c];
                double acc = 0.0;
                for (int b = 0; b < d.k; b++) {
                    const float gv = grow[a * d.k + b];
                    acc += (double)gv * d.w2[b * d.n + dd];
                    d.dw2[b * d.n + dd] += w * gv;
                }
                if (dw1)
                    dw1[a * d.m + c] += s * (float)acc;
            }
        }
    if (da) /* (k, r) += dw2 (k, n) . b^T */
        host->gemm(0, 1, d.k, d.r, d.n, 1.0f, d.dw2, d.n, d.b, d.n, 1.0f, da, d.r);
    if (db) /* (r, n) += a^T (r, k) . dw2 */
        host->gemm(1, 0, d.r, d.n, d.k, 1.0f, d.a, d.r, d.dw2, d.n, 1.0f, db, d.n);
    return 0;
}

static const pr_ext_peft_config peft_lokr = {
    .struct_size = sizeof(pr_ext_peft_config),
    .read = peft_read_lokr,
    .write = peft_write_lokr,
};

static const void *peft_lokr_extension(const char *uri)
{
    return strcmp(uri, PR_EXT_PEFT_CONFIG_URI) ? NULL : &peft_lokr;
}

static const pr_technique lokr_technique = {
    .struct_size = sizeof(pr_technique),
    .abi_major = PR_ABI_MAJOR,
    .name = "lokr",
    .version = "1.0.0",
    .summary = "Kronecker update dW = (alpha/r) lokr_w1 (x) (lokr_w2_a.lokr_w2_b) of a frozen projection, "
               "factor shapes from PEFT's factorization of the widths, rebuilt every forward and mergeable "
               "(Hugging Face PEFT's LoKr for nn.Linear, default branches). Default site qkv.",
    .citation = "Yeh, Hsieh, Gao, Yang, Oh, Gong (2024). Navigating Text-To-Image Customization: From "
                "LyCORIS Fine-Tuning to Model Evaluation. ICLR 2024. arXiv:2309.14859",
    .license = "MIT",
    .intra = PR_INTRA_FACTORISED,
    .inter = PR_INTER_FIXED,
    .adaptation = PR_ADAPT_REPARAMETERISATION,
    .sharing = PR_SHARE_NONE,
    .input = PR_INPUT_HIDDEN,
    .insertion = PR_INSERT_PARALLEL,
    .insertions = PR_INSERTIONS_PER_SITE_LAYER,
    .integration = PR_INTEGRATE_WEIGHT_DELTA,
    .workspace = PR_WS_ATTENTION | PR_WS_FFN,
    .options = lokr_options,
    .n_options = N_OPTS,
    .sites = PR_SITE_BIT(PR_SITE_QKV) | PR_SITE_BIT(PR_SITE_Q) | PR_SITE_BIT(PR_SITE_K) |
             PR_SITE_BIT(PR_SITE_V) | PR_SITE_BIT(PR_SITE_O) | PR_SITE_BIT(PR_SITE_FFN_UP) |
             PR_SITE_BIT(PR_SITE_FFN_DOWN),
    .default_sites = PR_SITE_BIT(PR_SITE_QKV),
    .default_sites_llama = PR_SITE_BIT(PR_SITE_Q) | PR_SITE_BIT(PR_SITE_V),
    .params = lokr_params,
    .n_params = N_PARAMS,
    .scratch = lokr_scratch,
    .n_scratch = N_SCRATCH,
    .scale_expr = "alpha / r",
    .param_formula = "per insertion: l*m + r*(k + n), (l, k) = PEFT's factorization(d_out, -1), "
                     "(m, n) = factorization(d_in, -1) (lokr_w1 l x m, lokr_w2_a k x r, lokr_w2_b r x n); "
                     "insertions = chosen sites x chosen layers (default qkv: L)",
    .flops_per_token = "2 * d_in * d_out",
    .forward = lokr_forward,
    .backward = lokr_backward,
    .merge = lokr_merge,
    .setup = lokr_setup,
    .peft_type = "LOKR",
    .extension_data = peft_lokr_extension,
};

static const pr_technique *const lokr_techniques[] = { &lokr_technique };

static const pr_plugin lokr_plugin = {
    .struct_size = sizeof(pr_plugin),
    .abi_major = PR_ABI_MAJOR,
    .name = "lokr",
    .version = "1.0.0",
    .n_techniques = 1,
    .techniques = lokr_techniques,
};

PR_PLUGIN_EXPORT const pr_plugin *peftref_plugin_entry(const pr_entry_args *args)
{
    (void)args;
    return &lokr_plugin;
}
