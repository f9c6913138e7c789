/* OFT and BOFT: orthogonal finetuning, a multiplicative rotation of the
 * frozen weight, in one technique pack.
 *
 *   oft   Qiu, Liu, Feng, Xue, Feng, Liu, Zhang, Weller, Schoelkopf (2023),
 *         "Controlling Text-to-Image Diffusion by Orthogonal Finetuning",
 *         arXiv 2306.07280.
 *   boft  Liu, Qiu, Feng, Xiu, Xue, Yu, Feng, Liu, Heo, Peng, Wen, Black,
 *         Weller, Schoelkopf (2024), "Parameter-Efficient Orthogonal
 *         Finetuning via Butterfly Factorization", arXiv 2311.06243 (ICLR).
 *
 * A frozen projection y = x.W + b, W [d_in, d_out] (peftref's orientation,
 * GPT-2's Conv1D), becomes
 *
 *     oft:   y' = x.(R W) + b                    R [d_in, d_in] orthogonal
 *     boft:  y' = (x.(M W)) * s + b              M = M_{m-1} ... M_1 M_0, s (d_out)
 *
 * Which side is rotated: the INPUT side, W' = R W in [d_in, d_out].  This is
 * the paper's W = R W0 with W0 [d, n] (d the input width: OFT rotates the
 * neurons' weight vectors in input space, which keeps their pairwise
 * angles, the hyperspherical energy), and it is what Hugging Face PEFT
 * does (peft/tuners/oft/layer.py, PEFT >= 0.14; BOFT likewise): the
 * OFTRotationModule rotates x in blocks of in_features before the base
 * layer, y = base(x R), and merge computes R @ W^T^T, i.e. for nn.Linear's
 * weight [out, in] the update W_lin' = W_lin R^T rotates the weight's
 * input columns.  (PEFT's OFT before 0.14 rotated the output blocks; its
 * saved adapters do not load in current PEFT either.)
 *
 * The rotation blocks.  R is block-diagonal with nb blocks R_k of size
 * b x b (b nb = d_in), each the Cayley transform of a skew-symmetric S_k:
 *
 *     R_k = (I - S_k)(I + S_k)^{-1}
 *
 * exactly as PEFT computes it (torch.linalg.solve(I + S, I - S,
 * left=False)); the paper writes R = (I + S)(I - S)^{-1}, the same map with
 * S -> -S, so with this sign a tensor saved here means the same rotation
 * in PEFT.  S is never singular in I + S (its eigenvalues are imaginary),
 * and the inverse of each block is a Gauss-Jordan elimination with partial
 * pivoting in double in this file (no LAPACK).
 *
 *   oft:  oft_R (nb, b (b - 1) / 2): per block the strictly upper triangle
 *         of S in row-major order (torch.triu_indices(b, b, 1)), S = U - U^T.
 *         PEFT's OFTConfig: oft_block_size = 32 and r = 0 by default (r and
 *         oft_block_size are exclusive, r x oft_block_size = in_features);
 *         with r, b = d_in / r.  A block size that does not divide d_in is
 *         adjusted as PEFT's adjust_oft_parameters does (to d_in when it is
 *         larger, else to the nearest divisor of d_in, the lower one on a
 *         tie); the shape expression finds it among b-3..b+3, 1 and d_in,
 *         and setup() refuses, naming PEFT's value, a case that window
 *         misses (never a silent difference).
 *   boft: boft_R (m, nb, b, b), a full matrix per block, S = (A - A^T) / 2
 *         as PEFT's cayley_batch; boft_s (d_out, 1) a trained scale of the
 *         outputs (PEFT's boft_s, ones at init).  PEFT's BOFTConfig:
 *         boft_block_size = 4, boft_block_num = 0 (exclusive: one of them
 *         is 0), boft_n_butterfly_factor = 1, i.e. m = 1 factor: one
 *         block-diagonal rotation, no butterfly.  With m > 1, factor i
 *         (i = 0..m-1) is M_i = P_i B_i P_i^T, B_i block-diagonal and P_i
 *         PEFT's block_butterfly_perm(d_in, nb / 2^i, b / 2, m - 1) as a
 *         matrix (P[k, p[k]] = 1; P_0 = I): inside each group of b 2^i
 *         indices, chunks of b/2 are reordered even chunks first, then odd
 *         ones.  The product applies M_0 first to W (PEFT: mat_i @ mat).
 *
 * Both start as the identity: oft_R = 0 and boft_R = 0 give R = I, boft_s = 1.
 *
 * Integration is custom: the module reads the frozen weight (host->
 * base_weight_f32 into scratch base_w), builds
 *
 *     dW = R W - W      (oft)        dW = (M W) * s - W      (boft)
 *
 * and integrate_forward adds x.dW to y, which turns the site's y = x.W + b
 * into y' above (the module replaces x.W by x.(R W)).  forward()/backward()
 * give the same change h = x.dW as a parallel branch.  merge() returns dW,
 * so the merged weight is R W (M W * s).  The weight is rotated block by
 * block (d_in b d_out multiply-adds per factor), then one product with x.
 *
 * Backward, with G = x^T dy (the gradient of dW) and dx += dy.dW^T; dy
 * itself passes unchanged to the old y (y' = y + x.dW):
 *   boft: ds_j += sum_k G[k, j] (M W)[k, j];  G <- G * s  (the gradient of M W)
 *   through the chain W_{i+1} = M_i W_i (W_0 = W), i = m-1 .. 0:
 *     with Z = P_i^T W_i and H = P_i^T G_{i+1} (rows permuted),
 *     dR_k = H_k Z_k^T                           (b x b, block k's rows)
 *     G_i = P_i B_i^T H                          (when i > 0)
 *   through the Cayley transform, with Q = (I + S)^{-1}, R = (I - S) Q:
 *     dQ = -Q dS Q,  dR = -dS Q - (I - S) Q dS Q = -(I + R) dS Q,
 *     dL/dS = -(I + R)^T dR_L Q^T              (dR_L the gradient of R)
 *   onto the parameters: oft  dU_ac += dS[a, c] - dS[c, a] (a < c);
 *                        boft dA    += (dS - dS^T) / 2.
 *
 * Omitted PEFT options (each defaults to off in PEFT except the first):
 *   use_cayley_neumann (PEFT's OFT default True, 5 terms): a truncated
 *     series I + 2S + 2S^2 + 2S^3 + S^4 instead of the exact transform,
 *     approximately orthogonal and of the opposite sign convention
 *     ((I + S)(I - S)^{-1}); this file computes the exact transform, which
 *     is PEFT's use_cayley_neumann = False, so a saved oft_R loads there
 *     bit-compatibly in meaning.
 *   coft / eps (constrained OFT: project S into an eps-ball each step), and
 *   block_share: not provided.
 *   module_dropout / boft_dropout (multiplicative dropout replacing random
 *     blocks by I, drawn with torch.randperm): not provided.
 *
 * PEFT names: oft_R is saved as {prefix}.oft_R.weight (PEFT's
 * OFTRotationModule.weight, adapter name removed), peft_type OFT; boft_R
 * and boft_s as {prefix}.boft_R (m, nb, b, b) and {prefix}.boft_s
 * (d_out, 1), PEFT's BOFTLayer parameters (nn.ParameterDict, so no
 * ".weight"), peft_type BOFT, in the same element order.  PEFT's BOFT on
 * a machine without its CUDA extension (fbd_cuda) builds every layer with
 * one factor whatever boft_n_butterfly_factor says; an adapter with m > 1
 * loads there only on a GPU (peftref computes the m factors on any
 * machine).
 *
 * This file includes only peftref's public plugin headers (plugin.h,
 * ext/peft_config.h), its PEFT codecs (peft/codecs.h) and libc/libm, and links
 * against nothing of peftref. */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <peftref/plugin.h>
#include <peftref/ext/peft_config.h>

#include "peft/codecs.h"

PR_PLUGIN_EXPORT const pr_plugin *peftref_plugin_entry(const pr_entry_args *args);

enum { KIND_OFT, KIND_BOFT };

enum { OFT_OPT_R, OFT_OPT_BS, OFT_N_OPTS };
enum { BOFT_OPT_BS, BOFT_OPT_BN, BOFT_OPT_NBF, BOFT_N_OPTS };
enum { P_ROT, P_SCALE };
enum { SC_W, SC_CHAIN, SC_DELTA, SC_G, SC_G2, SC_Z, SC_H, SC_Y, SC_ROT, SC_INV, SC_WORK, N_SCRATCH };

/* ---- block sizes as shape expressions ------------------------------------------------------ */

/* oft: the requested block size P (d_in / r with r, else oft_block_size),
 * at most d_in; then PEFT's adjustment to a divisor of d_in: the nearest
 * among P-3..P (lower) and P..P+3 (higher), with 1 and d_in as the
 * fall-backs; the lower one when it is at least as near. */
#define OFT_P "min(max(min(r, 1) * (d_in / max(r, 1)) + (1 - min(r, 1)) * oft_block_size, 1), d_in)"
#define OFT_DIV(m) "(1 - min(d_in % (" m "), 1))"
#define OFT_LO_(k) "max(" OFT_P " - " k ", 1)"
#define OFT_LOT(k) "(" OFT_LO_(k) ") * " OFT_DIV(OFT_LO_(k))
#define OFT_LO "max(max(max(" OFT_LOT("0") ", " OFT_LOT("1") "), max(" OFT_LOT("2") ", " OFT_LOT("3") ")), 1)"
#define OFT_HI_(k) "min(" OFT_P " + " k ", d_in)"
#define OFT_HIT(k) "(" OFT_HI_(k) ") + (1 - " OFT_DIV(OFT_HI_(k)) ") * d_in"
#define OFT_HI "min(min(min(" OFT_HIT("0") ", " OFT_HIT("1") "), min(" OFT_HIT("2") ", " OFT_HIT("3") ")), d_in)"
#define OFT_C "min(max((" OFT_HI ") - (" OFT_P ") - ((" OFT_P ") - (" OFT_LO ")) + 1, 0), 1)"
#define OFT_B "((" OFT_C ") * (" OFT_LO ") + (1 - (" OFT_C ")) * (" OFT_HI "))"

/* boft: boft_block_size, or d_in / boft_block_num when the size is 0 */
#define BOFT_B "(min(boft_block_size, 1) * boft_block_size + (1 - min(boft_block_size, 1)) * (d_in / max(boft_block_num, 1)))"
#define BOFT_M "boft_n_butterfly_factor"

/* ---- options ---------------------------------------------------------------------------------- */

static const pr_option_decl oft_options[OFT_N_OPTS] = {
    [OFT_OPT_R] = {
        .struct_size = sizeof(pr_option_decl), .name = "r", .type = PR_OPT_INT,
        .def = 0, .min = 0, .max = 65536, .per_site = 1,
        .help = "number of rotation blocks per adapted weight (b = d_in / r); exclusive with "
                "oft_block_size (set that to 0 with r); default 0 as Hugging Face PEFT's OFTConfig",
    },
    [OFT_OPT_BS] = {
        .struct_size = sizeof(pr_option_decl), .name = "oft_block_size", .type = PR_OPT_INT,
        .def = 32, .min = 0, .max = 65536, .per_site = 1,
        .help = "size b of each rotation block (oft_R holds b (b - 1) / 2 values per block); "
                "adjusted to a divisor of d_in as PEFT does; default 32 as Hugging Face PEFT's "
                "OFTConfig",
    },
};

static const pr_option_decl boft_options[BOFT_N_OPTS] = {
    [BOFT_OPT_BS] = {
        .struct_size = sizeof(pr_option_decl), .name = "boft_block_size", .type = PR_OPT_INT,
        .def = 4, .min = 0, .max = 65536, .per_site = 1,
        .help = "size b of each rotation block (d_in must be divisible by it); exclusive with "
                "boft_block_num; default 4 as Hugging Face PEFT's BOFTConfig",
    },
    [BOFT_OPT_BN] = {
        .struct_size = sizeof(pr_option_decl), .name = "boft_block_num", .type = PR_OPT_INT,
        .def = 0, .min = 0, .max = 65536, .per_site = 1,
        .help = "number of rotation blocks per factor (b = d_in / boft_block_num) when "
                "boft_block_size is 0; default 0 as Hugging Face PEFT's BOFTConfig",
    },
    [BOFT_OPT_NBF] = {
        .struct_size = sizeof(pr_option_decl), .name = "boft_n_butterfly_factor", .type = PR_OPT_INT,
        .def = 1, .min = 1, .max = 16, .per_site = 1,
        .help = "number m of block-diagonal factors of the butterfly product (1: one block-diagonal "
                "rotation, no permutation); default 1 as Hugging Face PEFT's BOFTConfig",
    },
};

/* ---- parameters and buffers ------------------------------------------------------------------ */

static const pr_param_decl oft_params[] = {
    [P_ROT] = {
        .struct_size = sizeof(pr_param_decl), .name = "oft_R",
        .shape = "d_in / " OFT_B ", " OFT_B " * (" OFT_B " - 1) / 2",
        .init = PR_INIT_ZEROS, .scope = PR_SCOPE_INSERTION,
        .peft_key = "{prefix}.oft_R.weight", .peft_layout = PR_PEFT_AS_IS,
        .help = "per rotation block, the strictly upper triangle of the skew-symmetric S (row-major); "
                "zeros: R = I",
    },
};

static const pr_param_decl boft_params[] = {
    [P_ROT] = {
        .struct_size = sizeof(pr_param_decl), .name = "boft_R",
        .shape = BOFT_M ", d_in / max(" BOFT_B ", 1), " BOFT_B ", " BOFT_B,
        .init = PR_INIT_ZEROS, .scope = PR_SCOPE_INSERTION,
        .peft_key = "{prefix}.boft_R", .peft_layout = PR_PEFT_AS_IS,
        .help = "per butterfly factor and block, a b x b matrix A; S = (A - A^T) / 2; zeros: M = I",
    },
    [P_SCALE] = {
        .struct_size = sizeof(pr_param_decl), .name = "boft_s", .shape = "d_out, 1",
        .init = PR_INIT_ONES, .scope = PR_SCOPE_INSERTION, .flags = PR_PARAM_NO_DECAY,
        .peft_key = "{prefix}.boft_s", .peft_layout = PR_PEFT_AS_IS,
        .help = "scale of each output column of the rotated weight; ones",
    },
};

#define SCRATCH_DECLS(M_, B_)                                                                              \
    {                                                                                                      \
        [SC_W] = { .struct_size = sizeof(pr_buffer_decl), .name = "base_w", .shape = "d_in, d_out" },      \
        [SC_CHAIN] = { .struct_size = sizeof(pr_buffer_decl), .name = "chain",                             \
                       .shape = M_ " * d_in, d_out" },                                                     \
        [SC_DELTA] = { .struct_size = sizeof(pr_buffer_decl), .name = "delta", .shape = "d_in, d_out" },   \
        [SC_G] = { .struct_size = sizeof(pr_buffer_decl), .name = "grad_w", .shape = "d_in, d_out" },      \
        [SC_G2] = { .struct_size = sizeof(pr_buffer_decl), .name = "grad_w2", .shape = "d_in, d_out" },    \
        [SC_Z] = { .struct_size = sizeof(pr_buffer_decl), .name = "perm_w", .shape = "d_in, d_out" },      \
        [SC_H] = { .struct_size = sizeof(pr_buffer_decl), .name = "perm_g", .shape = "d_in, d_out" },      \
        [SC_Y] = { .struct_size = sizeof(pr_buffer_decl), .name = "block_out", .shape = "d_in, d_out" },   \
        [SC_ROT] = { .struct_size = sizeof(pr_buffer_decl), .name = "rot", .shape = M_ " * d_in, " B_ },   \
        [SC_INV] = { .struct_size = sizeof(pr_buffer_decl), .name = "inv", .shape = M_ " * d_in, " B_ },   \
        [SC_WORK] = { .struct_size = sizeof(pr_buffer_decl), .name = "work", .shape = B_ ", 8 * " B_ },    \
    }

static const pr_buffer_decl oft_scratch[N_SCRATCH] = SCRATCH_DECLS("1", OFT_B);
static const pr_buffer_decl boft_scratch[N_SCRATCH] = SCRATCH_DECLS(BOFT_M, BOFT_B);

/* ---- one call ----------------------------------------------------------------------------------- */

typedef struct rot_call {
    int kind;
    int d_in, d_out, b, nb, m;
    const float *par;   /* oft (nb, b(b-1)/2); boft (m, nb, b, b) */
    float *gpar;        /* or NULL */
    const float *s;     /* boft (d_out) */
    float *gs;          /* or NULL */
    const float *W;     /* base_w, packed [d_in, d_out] */
    float *chain, *delta, *g, *g2, *z, *h, *y, *rot, *inv;
    double *work;
} rot_call;

static int row_stride(const pr_tensor *t)
{
    return (int)(t->stride[0] ? t->stride[0] : t->shape[1]);
}

static int64_t numel(const pr_tensor *t)
{
    int64_t n = 1;
    for (int k = 0; k < t->ndim; k++)
        n *= t->shape[k];
    return n;
}

/* PEFT's adjust_oft_parameters: p adjusted to a divisor of n. */
static int peft_adjust(int n, int p)
{
    if (p >= n)
        return n;
    int hi = p;
    while (hi <= n && n % hi != 0)
        hi++;
    int lo = p;
    while (lo > 1 && n % lo != 0)
        lo--;
    return p - lo <= hi - p ? lo : hi;
}

/* Shapes, options and PEFT's constraints (setup() reports them at attach). */
static int rot_check(const pr_ctx *ctx, int kind, rot_call *c)
{
    const pr_host *host = ctx->host;
    const char *nm = kind == KIND_OFT ? "oft" : "boft";
    const uint32_t n_opts = kind == KIND_OFT ? OFT_N_OPTS : BOFT_N_OPTS;
    const uint32_t n_params = kind == KIND_OFT ? 1 : 2;
    if (ctx->n_params < n_params || ctx->n_options < n_opts)
        return host->error(ctx, "%s: expected %u parameters and %u options, got %u and %u", nm, n_params,
                           n_opts, ctx->n_params, ctx->n_options);
    memset(c, 0, sizeof *c);
    c->kind = kind;
    c->d_in = ctx->dims->d_in;
    c->d_out = ctx->dims->d_out;
    const pr_tensor *p = ctx->params[P_ROT];
    if (!p->data)
        return host->error(ctx, "%s: the rotation parameter has no data", nm);
    if (kind == KIND_OFT) {
        const int r = (int)ctx->options[OFT_OPT_R].num, bs = (int)ctx->options[OFT_OPT_BS].num;
        if ((r != 0) == (bs != 0))
            return host->error(ctx, "oft: set exactly one of r (%d) and oft_block_size (%d): r x "
                                    "oft_block_size = d_in, as Hugging Face PEFT's OFTConfig "
                                    "(oft_block_size = 0 with r)", r, bs);
        if (r != 0 && c->d_in % r != 0)
            return host->error(ctx, "oft: d_in = %d is not divisible by r = %d", c->d_in, r);
        if (p->ndim != 2)
            return host->error(ctx, "oft: oft_R must be 2-D (blocks, b (b - 1) / 2)");
        c->nb = (int)p->shape[0];
        int64_t ne = p->shape[1];
        int b = (int)((1.0 + sqrt(1.0 + 8.0 * (double)ne)) / 2.0 + 0.5);
        c->b = b;
        c->m = 1;
        int want = r ? c->d_in / r : peft_adjust(c->d_in, bs);
        if ((int64_t)b * (b - 1) / 2 != ne || (int64_t)b * c->nb != c->d_in || b != want)
            return host->error(ctx, "oft: d_in = %d: Hugging Face PEFT would use block size %d here, "
                                    "the shape rule gave %d x %d; set oft_block_size = %d explicitly",
                               c->d_in, want, c->nb, b, want);
    } else {
        const int bs = (int)ctx->options[BOFT_OPT_BS].num, bn = (int)ctx->options[BOFT_OPT_BN].num;
        const int m = (int)ctx->options[BOFT_OPT_NBF].num;
        if ((bs != 0) == (bn != 0))
            return host->error(ctx, "boft: set exactly one of boft_block_size (%d) and boft_block_num "
                                    "(%d), as Hugging Face PEFT's BOFTConfig", bs, bn);
        if (bs && c->d_in % bs != 0)
            return host->error(ctx, "boft: d_in = %d is not divisible by boft_block_size = %d", c->d_in, bs);
        if (bn && c->d_in % bn != 0)
            return host->error(ctx, "boft: d_in = %d is not divisible by boft_block_num = %d", c->d_in, bn);
        c->b = bs ? bs : c->d_in / bn;
        c->nb = c->d_in / c->b;
        c->m = m;
        if (m > 1) {
            /* PEFT: b and nb even, and the widest group b 2^(m-1) divides d_in */
            int64_t group = (int64_t)c->b << (m - 1);
            if (c->b % 2 || c->nb % 2 || group > c->d_in || c->d_in % group)
                return host->error(ctx, "boft: %d butterfly factors need an even block size (%d) and "
                                        "block count (%d) and d_in = %d divisible by b x 2^(m-1) = %lld",
                                   m, c->b, c->nb, c->d_in, (long long)group);
        }
        if (p->ndim != 4 || p->shape[0] != m || p->shape[1] != c->nb || p->shape[2] != c->b ||
            p->shape[3] != c->b)
            return host->error(ctx, "boft: boft_R must be (%d, %d, %d, %d)", m, c->nb, c->b, c->b);
        const pr_tensor *s = ctx->params[P_SCALE];
        if (!s->data || numel(s) != c->d_out)
            return host->error(ctx, "boft: boft_s must hold d_out = %d values", c->d_out);
        c->s = s->data;
        c->gs = ctx->grads && ctx->grads[P_SCALE]->data ? ctx->grads[P_SCALE]->data : NULL;
    }
    c->par = p->data;
    c->gpar = ctx->grads && ctx->grads[P_ROT]->data ? ctx->grads[P_ROT]->data : NULL;
    return 0;
}

/* rot_check, then the frozen weight into base_w and the scratch pointers. */
static int rot_begin(const pr_ctx *ctx, int kind, rot_call *c)
{
    const pr_host *host = ctx->host;
    const char *nm = kind == KIND_OFT ? "oft" : "boft";
    int rc = rot_check(ctx, kind, c);
    if (rc)
        return rc;
    if (ctx->n_scratch < N_SCRATCH)
        return host->error(ctx, "%s: expected %d scratch buffers, got %u", nm, N_SCRATCH, ctx->n_scratch);
    const int64_t wn = (int64_t)c->d_in * c->d_out, bb = (int64_t)c->m * c->d_in * c->b;
    const int64_t need[N_SCRATCH] = { wn, c->m * wn, wn, wn, wn, wn, wn, wn, bb, bb, 8LL * c->b * c->b };
    for (int i = 0; i < N_SCRATCH; i++)
        if (!ctx->scratch[i]->data || numel(ctx->scratch[i]) < need[i])
            return host->error(ctx, "%s: scratch buffer %d must hold %lld floats", nm, i, (long long)need[i]);
    const pr_tensor *w = ctx->base_weight;
    if (!w || !w->data)
        return host->error(ctx, "%s: the site has no frozen weight to rotate (projection sites only)", nm);
    const int out_in = ctx->base_layout == PR_WEIGHT_OUT_IN;
    if (w->ndim != 2 || w->shape[out_in ? 1 : 0] != c->d_in || w->shape[out_in ? 0 : 1] != c->d_out)
        return host->error(ctx, "%s: the frozen weight is [%lld, %lld], the site is %d -> %d", nm,
                           (long long)w->shape[0], (long long)w->shape[1], c->d_in, c->d_out);
    float *wf = ctx->scratch[SC_W]->data;
    if (host->base_weight_f32(ctx, wf) != 0)
        return host->error(ctx, "%s: the host gave no frozen weight in f32", nm);
    c->W = wf;
    c->chain = ctx->scratch[SC_CHAIN]->data;
    c->delta = ctx->scratch[SC_DELTA]->data;
    c->g = ctx->scratch[SC_G]->data;
    c->g2 = ctx->scratch[SC_G2]->data;
    c->z = ctx->scratch[SC_Z]->data;
    c->h = ctx->scratch[SC_H]->data;
    c->y = ctx->scratch[SC_Y]->data;
    c->rot = ctx->scratch[SC_ROT]->data;
    c->inv = ctx->scratch[SC_INV]->data;
    c->work = (double *)ctx->scratch[SC_WORK]->data;
    return 0;
}

/* ---- the Cayley transform ------------------------------------------------------------------ */

/* S (b x b, double) of block k of factor f from the parameters. */
static void skew_of(const rot_call *c, int f, int k, double *S)
{
    const int b = c->b;
    if (c->kind == KIND_OFT) {
        const float *v = c->par + (size_t)k * ((size_t)b * (b - 1) / 2);
        for (int a = 0; a < b; a++)
            S[a * b + a] = 0.0;
        for (int a = 0; a < b; a++)
            for (int e = a + 1; e < b; e++) {
                double x = *v++;
                S[a * b + e] = x;
                S[e * b + a] = -x;
            }
    } else {
        const float *A = c->par + ((size_t)f * c->nb + k) * (size_t)b * b;
        for (int a = 0; a < b; a++)
            for (int e = 0; e < b; e++)
                S[a * b + e] = 0.5 * ((double)A[a * b + e] - A[e * b + a]);
    }
}

/* Q = (I + S)^{-1} and R = (I - S) Q of every block, into c->inv and c->rot
 * (float, block (f, k) at ((f nb + k) b^2)).  Gauss-Jordan with partial
 * pivoting in double on [I + S | I]. */
static int cayley_all(const pr_ctx *ctx, const rot_call *c)
{
    const int b = c->b, w2 = 2 * b;
    double *S = c->work, *aug = c->work + (size_t)b * b;
    for (int f = 0; f < c->m; f++)
        for (int k = 0; k < c->nb; k++) {
            skew_of(c, f, k, S);
            for (int a = 0; a < b; a++)
                for (int e = 0; e < w2; e++)
                    aug[a * w2 + e] = e < b ? (a == e) + S[a * b + e] : (double)(e - b == a);
            for (int col = 0; col < b; col++) {
                int piv = col;
                for (int a = col + 1; a < b; a++)
                    if (fabs(aug[a * w2 + col]) > fabs(aug[piv * w2 + col]))
                        piv = a;
                if (!(fabs(aug[piv * w2 + col]) > 1e-300))
                    return ctx->host->error(ctx, "%s: I + S of block %d is singular (non-finite parameters?)",
                                            c->kind == KIND_OFT ? "oft" : "boft", k);
                if (piv != col)
                    for (int e = 0; e < w2; e++) {
                        double t = aug[col * w2 + e];
                        aug[col * w2 + e] = aug[piv * w2 + e];
                        aug[piv * w2 + e] = t;
                    }
                const double inv_p = 1.0 / aug[col * w2 + col];
                for (int e = 0; e < w2; e++)
                    aug[col * w2 + e] *= inv_p;
                for (int a = 0; a < b; a++) {
                    if (a == col)
                        continue;
                    const double fct = aug[a * w2 + col];
                    if (fct != 0.0)
                        for (int e = 0; e < w2; e++)
                            aug[a * w2 + e] -= fct * aug[col * w2 + e];
                }
            }
            float *Q = c->inv + ((size_t)f * c->nb + k) * (size_t)b * b;
            float *R = c->rot + ((size_t)f * c->nb + k) * (size_t)b * b;
            for (int a = 0; a < b; a++)
                for (int e = 0; e < b; e++) {
                    Q[a * b + e] = (float)aug[a * w2 + b + e];
                    double acc = 0.0;
                    for (int t = 0; t < b; t++)
                        acc += ((a == t) - S[a * b + t]) * aug[t * w2 + b + e];
                    R[a * b + e] = (float)acc;
                }
        }
    return 0;
}

/* ---- the butterfly permutations ------------------------------------------------------------- */

/* p[k] of factor f: PEFT's block_butterfly_perm(d_in, nb / 2^f, b / 2, m - 1). */
static int perm_at(const rot_call *c, int f, int k)
{
    if (c->m == 1 || f == 0)
        return k;
    const int r = c->b / 2, group = c->b << f, step = 2 << f;
    const int q = k % group, base = k - q, t = q / r, off = q % r;
    const int pos = t < step / 2 ? 2 * t : 2 * (t - step / 2) + 1;
    return base + pos * r + off;
}

/* dst[p[k]] = src[k] (dst = P^T src), rows of d_out floats */
static void rows_to_perm(const rot_call *c, int f, float *dst, const float *src)
{
    const size_t n = (size_t)c->d_out;
    for (int k = 0; k < c->d_in; k++)
        memcpy(dst + (size_t)perm_at(c, f, k) * n, src + (size_t)k * n, n * sizeof(float));
}

/* dst[k] = src[p[k]] (dst = P src) */
static void rows_from_perm(const rot_call *c, int f, float *dst, const float *src)
{
    const size_t n = (size_t)c->d_out;
    for (int k = 0; k < c->d_in; k++)
        memcpy(dst + (size_t)k * n, src + (size_t)perm_at(c, f, k) * n, n * sizeof(float));
}

static int permuted(const rot_call *c, int f)
{
    return c->m > 1 && f > 0;
}

/* out = B_f in (or B_f^T in), block rows of in (d_in x d_out, packed). */
static void blocks_apply(const pr_host *host, const rot_call *c, int f, int trans, const float *in, float *out)
{
    const int b = c->b, n = c->d_out;
    for (int k = 0; k < c->nb; k++) {
        const float *R = c->rot + ((size_t)f * c->nb + k) * (size_t)b * b;
        host->gemm(trans, 0, b, n, b, 1.0f, R, b, in + (size_t)k * b * n, n, 0.0f, out + (size_t)k * b * n, n);
    }
}

/* chain[f] = W_{f+1} = M_f W_f; delta = W_m (* s) - W. */
static void build_delta(const pr_host *host, const rot_call *c)
{
    const size_t wn = (size_t)c->d_in * c->d_out;
    for (int f = 0; f < c->m; f++) {
        const float *src = f ? c->chain + (size_t)(f - 1) * wn : c->W;
        float *dst = c->chain + (size_t)f * wn;
        if (permuted(c, f)) {
            rows_to_perm(c, f, c->z, src);
            blocks_apply(host, c, f, 0, c->z, c->y);
            rows_from_perm(c, f, dst, c->y);
        } else {
            blocks_apply(host, c, f, 0, src, dst);
        }
    }
    const float *wm = c->chain + (size_t)(c->m - 1) * wn;
    for (int k = 0; k < c->d_in; k++)
        for (int j = 0; j < c->d_out; j++) {
            size_t i = (size_t)k * c->d_out + j;
            c->delta[i] = (c->s ? wm[i] * c->s[j] : wm[i]) - c->W[i];
        }
}

/* The gradients of the parameters from G = dL/d(delta) in c->g. */
static void params_backward(const pr_host *host, const rot_call *c)
{
    const size_t wn = (size_t)c->d_in * c->d_out;
    const int b = c->b, n = c->d_out;
    const float *wm = c->chain + (size_t)(c->m - 1) * wn;
    if (c->s) {
        for (int k = 0; k < c->d_in; k++)
            for (int j = 0; j < n; j++) {
                size_t i = (size_t)k * n + j;
                if (c->gs)
                    c->gs[j] += c->g[i] * wm[i];
                c->g[i] *= c->s[j];
            }
    }
    if (!c->gpar)
        return;
    double *S = c->work, *dR = c->work + (size_t)b * b, *T = dR + (size_t)b * b, *dS = T + (size_t)b * b;
    float *gcur = c->g, *gnext = c->g2;
    for (int f = c->m - 1; f >= 0; f--) {
        const float *wf = f ? c->chain + (size_t)(f - 1) * wn : c->W;
        const float *Z = wf, *H = gcur;
        if (permuted(c, f)) {
            rows_to_perm(c, f, c->z, wf);
            rows_to_perm(c, f, c->h, gcur);
            Z = c->z;
            H = c->h;
        }
        for (int k = 0; k < c->nb; k++) {
            const float *Hk = H + (size_t)k * b * n, *Zk = Z + (size_t)k * b * n;
            const float *R = c->rot + ((size_t)f * c->nb + k) * (size_t)b * b;
            const float *Q = c->inv + ((size_t)f * c->nb + k) * (size_t)b * b;
            /* dR = H_k Z_k^T, in double */
            for (int a = 0; a < b; a++)
                for (int e = 0; e < b; e++) {
                    double acc = 0.0;
                    const float *ha = Hk + (size_t)a * n, *ze = Zk + (size_t)e * n;
                    for (int j = 0; j < n; j++)
                        acc += (double)ha[j] * ze[j];
                    dR[a * b + e] = acc;
                }
            /* T = (I + R)^T dR;  dS = -T Q^T */
            for (int a = 0; a < b; a++)
                for (int e = 0; e < b; e++) {
                    double acc = dR[a * b + e];
                    for (int t = 0; t < b; t++)
                        acc += (double)R[t * b + a] * dR[t * b + e];
                    T[a * b + e] = acc;
                }
            for (int a = 0; a < b; a++)
                for (int e = 0; e < b; e++) {
                    double acc = 0.0;
                    for (int t = 0; t < b; t++)
                        acc += T[a * b + t] * Q[e * b + t];
                    dS[a * b + e] = -acc;
                }
            if (c->kind == KIND_OFT) {
                float *gv = c->gpar + (size_t)k * ((size_t)b * (b - 1) / 2);
                for (int a = 0; a < b; a++)
                    for (int e = a + 1; e < b; e++)
                        *gv++ += (float)(dS[a * b + e] - dS[e * b + a]);
            } else {
                float *gA = c->gpar + ((size_t)f * c->nb + k) * (size_t)b * b;
                for (int a = 0; a < b; a++)
                    for (int e = 0; e < b; e++)
                        gA[a * b + e] += (float)(0.5 * (dS[a * b + e] - dS[e * b + a]));
            }
        }
        (void)S;
        if (f > 0) {
            /* G_f = P B^T P^T G_{f+1} */
            if (permuted(c, f)) {
                blocks_apply(host, c, f, 1, H, c->y);
                rows_from_perm(c, f, gnext, c->y);
            } else {
                blocks_apply(host, c, f, 1, H, gnext);
            }
            float *t = gcur;
            gcur = gnext;
            gnext = t;
        }
    }
}

/* ---- callbacks -------------------------------------------------------------------------------- */

/* h = x.delta: into y (integrate: y += h) or the module output. */
static int run_forward(const pr_ctx *ctx, int kind, int integrate)
{
    const pr_host *host = ctx->host;
    rot_call c;
    int rc = rot_begin(ctx, kind, &c);
    if (rc || (rc = cayley_all(ctx, &c)))
        return rc;
    if (!ctx->in->data || !ctx->out->data || ctx->in->shape[1] != c.d_in || ctx->out->shape[1] != c.d_out)
        return host->error(ctx, "%s: forward needs x (rows, %d) and y (rows, %d); site widths %lld -> %lld",
                           kind == KIND_OFT ? "oft" : "boft", c.d_in, c.d_out, (long long)ctx->in->shape[1],
                           (long long)ctx->out->shape[1]);
    build_delta(host, &c);
    if (ctx->rows > 0)
        host->gemm(0, 0, ctx->rows, c.d_out, c.d_in, 1.0f, ctx->in->data, row_stride(ctx->in), c.delta, c.d_out,
                   integrate ? 1.0f : 0.0f, ctx->out->data, row_stride(ctx->out));
    return 0;
}

/* d_out = dh (= dy when integrating: y' = y + h passes dy to the old y unchanged). */
static int run_backward(const pr_ctx *ctx, int kind)
{
    const pr_host *host = ctx->host;
    rot_call c;
    int rc = rot_begin(ctx, kind, &c);
    if (rc || (rc = cayley_all(ctx, &c)))
        return rc;
    if (!ctx->d_out->data || ctx->d_out->shape[1] != c.d_out)
        return host->error(ctx, "%s: backward needs d_out (rows, %d)", kind == KIND_OFT ? "oft" : "boft", c.d_out);
    build_delta(host, &c);
    const float *dy = ctx->d_out->data;
    const int lddy = row_stride(ctx->d_out);
    if (ctx->d_in->data && ctx->rows > 0)
        host->gemm(0, 1, ctx->rows, c.d_in, c.d_out, 1.0f, dy, lddy, c.delta, c.d_out, 1.0f, ctx->d_in->data,
                   row_stride(ctx->d_in));
    if (!c.gpar && !c.gs)
        return 0;
    if (!ctx->in->data)
        return host->error(ctx, "%s: backward needs the site input x for the parameters' gradients",
                           kind == KIND_OFT ? "oft" : "boft");
    if (ctx->rows > 0)
        host->gemm(1, 0, c.d_in, c.d_out, ctx->rows, 1.0f, ctx->in->data, row_stride(ctx->in), dy, lddy, 0.0f, c.g,
                   c.d_out);
    else
        memset(c.g, 0, (size_t)c.d_in * c.d_out * sizeof(float));
    params_backward(host, &c);
    return 0;
}

static int run_merge(const pr_ctx *ctx, int kind)
{
    const pr_host *host = ctx->host;
    rot_call c;
    int rc = rot_begin(ctx, kind, &c);
    if (rc || (rc = cayley_all(ctx, &c)))
        return rc;
    if (!ctx->out->data || ctx->out->shape[0] != c.d_in || ctx->out->shape[1] != c.d_out)
        return host->error(ctx, "%s: merge output must be [%d, %d]", kind == KIND_OFT ? "oft" : "boft", c.d_in,
                           c.d_out);
    build_delta(host, &c);
    const int ld = row_stride(ctx->out);
    float *out = ctx->out->data;
    for (int k = 0; k < c.d_in; k++)
        memcpy(out + (size_t)k * ld, c.delta + (size_t)k * c.d_out, (size_t)c.d_out * sizeof(float));
    return 0;
}

static int run_setup(const pr_ctx *ctx, int kind)
{
    rot_call c;
    return rot_check(ctx, kind, &c);
}

static int oft_forward(const pr_ctx *ctx) { return run_forward(ctx, KIND_OFT, 0); }
static int oft_integrate_forward(const pr_ctx *ctx) { return run_forward(ctx, KIND_OFT, 1); }
static int oft_backward(const pr_ctx *ctx) { return run_backward(ctx, KIND_OFT); }
static int oft_merge(const pr_ctx *ctx) { return run_merge(ctx, KIND_OFT); }
static int oft_setup(const pr_ctx *ctx) { return run_setup(ctx, KIND_OFT); }
static int boft_forward(const pr_ctx *ctx) { return run_forward(ctx, KIND_BOFT, 0); }
static int boft_integrate_forward(const pr_ctx *ctx) { return run_forward(ctx, KIND_BOFT, 1); }
static int boft_backward(const pr_ctx *ctx) { return run_backward(ctx, KIND_BOFT); }
static int boft_merge(const pr_ctx *ctx) { return run_merge(ctx, KIND_BOFT); }
static int boft_setup(const pr_ctx *ctx) { return run_setup(ctx, KIND_BOFT); }

/* ---- descriptors ---------------------------------------------------------------------------- */

#define ROT_SITES                                                                                          \
    (PR_SITE_BIT(PR_SITE_QKV) | PR_SITE_BIT(PR_SITE_Q) | PR_SITE_BIT(PR_SITE_K) | PR_SITE_BIT(PR_SITE_V) | \
     PR_SITE_BIT(PR_SITE_O) | PR_SITE_BIT(PR_SITE_FFN_UP) | PR_SITE_BIT(PR_SITE_FFN_GATE) |                \
     PR_SITE_BIT(PR_SITE_FFN_DOWN))

static const pr_ext_peft_config peft_oft = {
    .struct_size = sizeof(pr_ext_peft_config),
    .read = peft_read_oft,
    .write = peft_write_oft,
};

static const void *peft_oft_extension(const char *uri)
{
    return strcmp(uri, PR_EXT_PEFT_CONFIG_URI) ? NULL : &peft_oft;
}

static const pr_technique oft_technique = {
    .struct_size = sizeof(pr_technique),
    .abi_major = PR_ABI_MAJOR,
    .name = "oft",
    .version = "1.0.0",
    .summary = "Orthogonal finetuning: the frozen projection W [d_in, d_out] becomes R W, R a "
               "block-diagonal orthogonal matrix (blocks of oft_block_size, each the Cayley transform "
               "of a trained skew-symmetric matrix) rotating the input side. Default site qkv (Hugging "
               "Face PEFT's GPT-2 target c_attn).",
    .citation = "Qiu, Liu, Feng, Xue, Feng, Liu, Zhang, Weller, Schoelkopf (2023). Controlling "
                "Text-to-Image Diffusion by Orthogonal Finetuning. NeurIPS 2023. arXiv:2306.07280",
    .license = "MIT",
    .intra = PR_INTRA_FACTORISED,
    .inter = PR_INTER_FIXED,
    .adaptation = PR_ADAPT_REPARAMETERISATION,
    .sharing = PR_SHARE_NONE,
    .input = PR_INPUT_WEIGHTS,
    .insertion = PR_INSERT_PARALLEL,
    .insertions = PR_INSERTIONS_PER_SITE_LAYER,
    .integration = PR_INTEGRATE_CUSTOM,
    .workspace = PR_WS_ATTENTION | PR_WS_FFN,
    .options = oft_options,
    .n_options = OFT_N_OPTS,
    .sites = ROT_SITES,
    .default_sites = PR_SITE_BIT(PR_SITE_QKV),
    .default_sites_llama = PR_SITE_BIT(PR_SITE_Q) | PR_SITE_BIT(PR_SITE_V),
    .params = oft_params,
    .n_params = 1,
    .scratch = oft_scratch,
    .n_scratch = N_SCRATCH,
    .param_formula = "per insertion: (d_in / b) * b (b - 1) / 2 (oft_R: the upper triangles of d_in / b "
                     "skew-symmetric b x b blocks), b = oft_block_size (default 32) or d_in / r; "
                     "insertions = chosen sites x chosen layers (default qkv: L)",
    .forward = oft_forward,
    .backward = oft_backward,
    .integrate_forward = oft_integrate_forward,
    .integrate_backward = oft_backward,
    .merge = oft_merge,
    .setup = oft_setup,
    /* one product x.(R W - W) per token; the rotation of W is per call */
    .flops_per_token = "2 * d_in * d_out",
    .peft_type = "OFT",
    .extension_data = peft_oft_extension,
};

static const pr_ext_peft_config peft_boft = {
    .struct_size = sizeof(pr_ext_peft_config),
    .read = peft_read_boft,
    .write = peft_write_boft,
};

static const void *peft_boft_extension(const char *uri)
{
    return strcmp(uri, PR_EXT_PEFT_CONFIG_URI) ? NULL : &peft_boft;
}

static const pr_technique boft_technique = {
    .struct_size = sizeof(pr_technique),
    .abi_major = PR_ABI_MAJOR,
    .name = "boft",
    .version = "1.0.0",
    .summary = "Butterfly orthogonal finetuning: the frozen projection W becomes (M W) * s, M a product "
               "of boft_n_butterfly_factor permuted block-diagonal orthogonal matrices (Cayley "
               "transforms) rotating the input side, s a trained output scale. Default site qkv "
               "(Hugging Face PEFT's GPT-2 target c_attn).",
    .citation = "Liu, Qiu, Feng, Xiu, Xue, Yu, Feng, Liu, Heo, Peng, Wen, Black, Weller, Schoelkopf "
                "(2024). Parameter-Efficient Orthogonal Finetuning via Butterfly Factorization. ICLR "
                "2024. arXiv:2311.06243",
    .license = "MIT",
    .intra = PR_INTRA_FACTORISED,
    .inter = PR_INTER_FIXED,
    .adaptation = PR_ADAPT_REPARAMETERISATION,
    .sharing = PR_SHARE_NONE,
    .input = PR_INPUT_WEIGHTS,
    .insertion = PR_INSERT_PARALLEL,
    .insertions = PR_INSERTIONS_PER_SITE_LAYER,
    .integration = PR_INTEGRATE_CUSTOM,
    .workspace = PR_WS_ATTENTION | PR_WS_FFN,
    .options = boft_options,
    .n_options = BOFT_N_OPTS,
    .sites = ROT_SITES,
    .default_sites = PR_SITE_BIT(PR_SITE_QKV),
    .default_sites_llama = PR_SITE_BIT(PR_SITE_Q) | PR_SITE_BIT(PR_SITE_V),
    .params = boft_params,
    .n_params = 2,
    .scratch = boft_scratch,
    .n_scratch = N_SCRATCH,
    .param_formula = "per insertion: m * d_in * b + d_out (boft_R: m factors of d_in / b full b x b "
                     "blocks; boft_s: d_out), b = boft_block_size (default 4) or d_in / "
                     "boft_block_num, m = boft_n_butterfly_factor (default 1); insertions = chosen "
                     "sites x chosen layers (default qkv: L)",
    .forward = boft_forward,
    .backward = boft_backward,
    .integrate_forward = boft_integrate_forward,
    .integrate_backward = boft_backward,
    .merge = boft_merge,
    .setup = boft_setup,
    .flops_per_token = "2 * d_in * d_out",
    .peft_type = "BOFT",
    .extension_data = peft_boft_extension,
};

static const pr_technique *const oft_techniques[] = { &oft_technique, &boft_technique };

static const pr_plugin oft_plugin = {
    .struct_size = sizeof(pr_plugin),
    .abi_major = PR_ABI_MAJOR,
    .name = "oft",
    .version = "1.0.0",
    .n_techniques = 2,
    .techniques = oft_techniques,
};

PR_PLUGIN_EXPORT const pr_plugin *peftref_plugin_entry(const pr_entry_args *args)
{
    (void)args;
    return &oft_plugin;
}
