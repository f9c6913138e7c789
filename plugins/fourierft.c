/* FourierFT: parameter-efficient finetuning with the discrete Fourier
 * transform (Gao, Wang, Chen, Ma, Chen, Yang, Zhang 2024, "Parameter-
 * Efficient Fine-Tuning with Discrete Fourier Transform", arXiv 2405.03003).
 *
 * The weight update of a frozen projection y = x.W (W [d_in, d_out]) is
 * learned in the frequency domain: n = n_frequency spectral coefficients c_k
 * sit at fixed random entries (a_k, b_k) of an otherwise zero spectrum F of
 * the projection's (out, in) shape (M = d_out, N = d_in, as Hugging Face
 * PEFT lays it out), and
 *
 *     dW_peft = scaling * real(IDFT2(F))                    (M x N)
 *     dW[q, p] = kappa * sum_k c_k cos(2 pi (p a_k / M + q b_k / N))
 *                                                           [d_in, d_out]
 *     kappa = scaling / (M N)   (ifft2_norm "backward", torch's default;
 *             scaling / sqrt(M N) for "ortho", scaling for "forward")
 *     y <- y + x.dW
 *
 *     fourierft_spectrum (n_frequency)   standard normal (PEFT's default,
 *                                        init_weights = false, the paper's
 *                                        Algorithm 1), or zeros with
 *                                        init_weights = true (identity)
 *
 * The entry positions are not a parameter: every callback recomputes them
 * from random_loc_seed (PEFT's default 777) exactly as PEFT draws them,
 * torch.randperm(M * N, generator=torch.Generator().manual_seed(seed))
 * [:n] with a_k = idx / N, b_k = idx % N: torch's CPU generator is MT19937
 * (init_genrand seeding) and its randperm for n < 2^32 / 20 is the
 * Fisher-Yates loop "z = random() % (n - i); swap(r[i], r[i + z])", of
 * which only the first n_frequency steps are run here (with a small hash
 * map for the swapped entries).  The same seed gives the same positions at
 * every layer of one shape, as in the paper and PEFT.
 *
 * Integration is a weight delta (PR_INTEGRATE_WEIGHT_DELTA): merge() builds
 * dW, the host adds x.dW and hands backward G = x^T dy = dL/d(dW), from
 * which backward takes the adjoint of the same transform:
 *
 *     dc_k += kappa * sum_{q,p} G[q, p] cos(2 pi (p a_k / M + q b_k / N))
 *
 * Both go through separable real DFT factors (no FFT library): with
 * CB[q,k] = cos(2 pi q b_k / N), SB likewise with sin, CA[p,k] =
 * cos(2 pi p a_k / M), SA,
 *
 *     dW  = kappa * (CB diag(c) CA^T - SB diag(c) SA^T)      two GEMMs
 *     dc  = kappa * (diag(CB^T G CA) - diag(SB^T G SA))      two GEMMs
 *
 * i.e. 4 n d_in d_out FLOP per call and insertion, independent of the batch,
 * then the host's x.dW.  forward() computes h = x.dW itself (the module's
 * output in the parallel form) for callers that want it.
 *
 * This file includes only peftref's public plugin headers (plugin.h,
 * ext/peft_config.h), its PEFT codecs (peft/codecs.h) and libc/libm, and links
 * against nothing of peftref. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include <peftref/plugin.h>
#include <peftref/ext/peft_config.h>

#include "peft/codecs.h"

PR_PLUGIN_EXPORT const pr_plugin *peftref_plugin_entry(const pr_entry_args *args);

enum { OPT_N, OPT_SCALING, OPT_SEED, OPT_INIT, OPT_NORM, N_OPTS };
enum { PARAM_SPECTRUM, N_PARAMS };
enum { SCRATCH_DW, SCRATCH_CB, SCRATCH_SB, SCRATCH_CA, SCRATCH_SA, SCRATCH_U, SCRATCH_POS, SCRATCH_HASH,
       SCRATCH_TRIG, N_SCRATCH };
enum { NORM_BACKWARD, NORM_ORTHO, NORM_FORWARD };

static const char *const norm_choices[] = { "backward", "ortho", "forward", NULL };

static const pr_option_decl ff_options[N_OPTS] = {
    [OPT_N] = {
        .struct_size = sizeof(pr_option_decl), .name = "n_frequency", .type = PR_OPT_INT,
        .def = 1000, .min = 1, .max = 100000000, .per_site = 1,
        .help = "number of trainable spectral coefficients per adapted matrix; default 1000 as "
                "Hugging Face PEFT's FourierFTConfig.  At a matrix with d_in * d_out <= n_frequency "
                "(where PEFT refuses) d_in * d_out - 1 are used, with a warning",
    },
    [OPT_SCALING] = {
        .struct_size = sizeof(pr_option_decl), .name = "scaling", .type = PR_OPT_FLOAT,
        .def = 150, .min = 0, .max = 1e9, .per_site = 0,
        .help = "factor on real(IDFT2(F)); default 150 as Hugging Face PEFT (the paper uses 100-150 "
                "for RoBERTa, 300 for LLaMA)",
    },
    [OPT_SEED] = {
        .struct_size = sizeof(pr_option_decl), .name = "random_loc_seed", .type = PR_OPT_INT,
        .def = 777, .min = 0, .max = 4294967295.0, .per_site = 0,
        .help = "seed of the spectral entry positions (torch.randperm with a generator seeded by "
                "it); default 777 as Hugging Face PEFT",
    },
    [OPT_INIT] = {
        .struct_size = sizeof(pr_option_decl), .name = "init_weights", .type = PR_OPT_BOOL,
        .def = 0, .per_site = 0,
        .help = "false (default, as Hugging Face PEFT and the paper): the spectrum starts standard "
                "normal, so the model does NOT start as the base model; true: zeros (identity)",
    },
    [OPT_NORM] = {
        .struct_size = sizeof(pr_option_decl), .name = "ifft2_norm", .type = PR_OPT_ENUM,
        .def = NORM_BACKWARD, .choices = norm_choices, .per_site = 0,
        .help = "normalisation of the inverse DFT as torch.fft.ifft2's norm: backward (1/(d_in "
                "d_out), default), ortho (1/sqrt(d_in d_out)) or forward (none)",
    },
};

static const pr_param_decl ff_params[N_PARAMS] = {
    [PARAM_SPECTRUM] = {
        .struct_size = sizeof(pr_param_decl), .name = "fourierft_spectrum",
        .shape = "min(n_frequency, d_in * d_out - 1)",
        .init = PR_INIT_CUSTOM, .scope = PR_SCOPE_INSERTION,
        .peft_key = "{prefix}.fourierft_spectrum", .peft_layout = PR_PEFT_AS_IS,
        .help = "spectral coefficients at the fixed entries; standard normal, or zeros with "
                "init_weights",
    },
};

static const pr_buffer_decl ff_scratch[N_SCRATCH] = {
    [SCRATCH_DW] = { .struct_size = sizeof(pr_buffer_decl), .name = "dw", .shape = "d_in, d_out" },
    [SCRATCH_CB] = { .struct_size = sizeof(pr_buffer_decl), .name = "cos_in", .shape = "d_in, min(n_frequency, d_in * d_out - 1)" },
    [SCRATCH_SB] = { .struct_size = sizeof(pr_buffer_decl), .name = "sin_in", .shape = "d_in, min(n_frequency, d_in * d_out - 1)" },
    [SCRATCH_CA] = { .struct_size = sizeof(pr_buffer_decl), .name = "cos_out", .shape = "d_out, min(n_frequency, d_in * d_out - 1)" },
    [SCRATCH_SA] = { .struct_size = sizeof(pr_buffer_decl), .name = "sin_out", .shape = "d_out, min(n_frequency, d_in * d_out - 1)" },
    [SCRATCH_U] = { .struct_size = sizeof(pr_buffer_decl), .name = "u", .shape = "d_in, min(n_frequency, d_in * d_out - 1)" },
    /* uint32 (a_k, b_k) pairs, and the partial shuffle's hash map */
    [SCRATCH_POS] = { .struct_size = sizeof(pr_buffer_decl), .name = "positions", .shape = "2 * n_frequency" },
    [SCRATCH_HASH] = { .struct_size = sizeof(pr_buffer_decl), .name = "shuffle_map",
                       .shape = "16 * n_frequency + 16" },
    [SCRATCH_TRIG] = { .struct_size = sizeof(pr_buffer_decl), .name = "trig",
                       .shape = "2 * (d_in + d_out)" },
};

static int row_stride(const pr_tensor *t)
{
    return (int)(t->stride[0] ? t->stride[0] : t->shape[1]);
}

/* ---- torch's MT19937 and randperm ------------------------------------- */

enum { MT_N = 624, MT_M = 397 };

typedef struct mt19937 {
    uint32_t s[MT_N];
    int i;
} mt19937;

static void mt_seed(mt19937 *m, uint32_t seed)
{
    m->s[0] = seed;
    for (int j = 1; j < MT_N; j++)
        m->s[j] = 1812433253u * (m->s[j - 1] ^ (m->s[j - 1] >> 30)) + (uint32_t)j;
    m->i = MT_N;
}

static uint32_t mt_next(mt19937 *m)
{
    if (m->i >= MT_N) {
        for (int k = 0; k < MT_N; k++) {
            uint32_t y = (m->s[k] & 0x80000000u) | (m->s[(k + 1) % MT_N] & 0x7fffffffu);
            m->s[k] = m->s[(k + MT_M) % MT_N] ^ (y >> 1) ^ ((y & 1u) ? 0x9908b0dfu : 0u);
        }
        m->i = 0;
    }
    uint32_t y = m->s[m->i++];
    y ^= y >> 11;
    y ^= (y << 7) & 0x9d2c5680u;
    y ^= (y << 15) & 0xefc60000u;
    y ^= y >> 18;
    return y;
}

#define SLOT_EMPTY 0xffffffffu

/* A linear-probing map of the shuffled array's changed entries. */
typedef struct perm_map {
    uint32_t *keys, *vals;
    uint32_t mask;
} perm_map;

static uint32_t *map_slot(const perm_map *h, uint32_t key)
{
    uint32_t i = (key * 2654435761u) & h->mask;
    while (h->keys[i] != SLOT_EMPTY && h->keys[i] != key)
        i = (i + 1) & h->mask;
    return &h->keys[i];
}

static uint32_t map_get(const perm_map *h, uint32_t key)
{
    uint32_t *k = map_slot(h, key);
    return *k == key ? h->vals[k - h->keys] : key;
}

static void map_set(perm_map *h, uint32_t key, uint32_t val)
{
    uint32_t *k = map_slot(h, key);
    *k = key;
    h->vals[k - h->keys] = val;
}

/* pos[2k], pos[2k+1] = (a_k, b_k), k < n: the first n entries of
 * torch.randperm(M * N) from a generator seeded with seed, as row (out)
 * and column (in) indices.  map holds at least 16 n + 16 uint32. */
static void spectral_positions(uint32_t seed, int M, int N, int n, uint32_t *map_mem, uint32_t *pos)
{
    uint32_t cap = 16;
    while (cap < 4u * (uint32_t)n)
        cap <<= 1;
    perm_map h = { map_mem, map_mem + cap, cap - 1 };
    for (uint32_t i = 0; i < cap; i++)
        h.keys[i] = SLOT_EMPTY;
    mt19937 mt;
    mt_seed(&mt, seed);
    const uint64_t total = (uint64_t)M * (uint64_t)N;
    for (int i = 0; i < n; i++) {
        uint32_t z = (uint32_t)((uint64_t)mt_next(&mt) % (total - (uint64_t)i));
        uint32_t j = (uint32_t)i + z;
        uint32_t vi = map_get(&h, (uint32_t)i), vj = map_get(&h, j);
        map_set(&h, (uint32_t)i, vj);
        map_set(&h, j, vi);
        pos[2 * i] = vj / (uint32_t)N;
        pos[2 * i + 1] = vj % (uint32_t)N;
    }
}

/* ---- one call ----------------------------------------------------------- */

typedef struct ff_call {
    int n, d_in, d_out;
    double kappa;
    const float *c;
    float *cb, *sb, *ca, *sa, *u;
} ff_call;

static int ff_get_call(const pr_ctx *ctx, ff_call *f, int need_dims)
{
    const pr_host *host = ctx->host;
    if (ctx->n_params < N_PARAMS || ctx->n_options < N_OPTS)
        return host->error(ctx, "fourierft: expected %d parameter and %d options, got %u and %u", N_PARAMS,
                           N_OPTS, ctx->n_params, ctx->n_options);
    const pr_tensor *sp = ctx->params[PARAM_SPECTRUM];
    if (sp->ndim != 1 || !sp->data)
        return host->error(ctx, "fourierft: fourierft_spectrum must be a vector (n_frequency)");
    f->n = (int)sp->shape[0];
    f->d_in = ctx->dims->d_in;
    f->d_out = ctx->dims->d_out;
    f->c = sp->data;
    const double mn = (double)f->d_in * (double)f->d_out;
    if ((double)f->n >= mn)
        return host->error(ctx, "fourierft: n_frequency = %d must be less than d_in * d_out = %d * %d = %.0f "
                                "(as Hugging Face PEFT requires)",
                           f->n, f->d_in, f->d_out, mn);
    if (mn >= 4294967295.0 / 20.0)
        return host->error(ctx, "fourierft: d_in * d_out = %.0f is beyond the positions this plugin "
                                "reproduces (torch's randperm below 2^32 / 20)",
                           mn);
    const double s = ctx->options[OPT_SCALING].num;
    switch ((int)ctx->options[OPT_NORM].num) {
    case NORM_ORTHO: f->kappa = s / sqrt(mn); break;
    case NORM_FORWARD: f->kappa = s; break;
    default: f->kappa = s / mn; break;
    }
    if (!need_dims)
        return 0;
    if (ctx->n_scratch < N_SCRATCH)
        return host->error(ctx, "fourierft: expected %d scratch buffers, got %u", N_SCRATCH, ctx->n_scratch);
    for (int i = SCRATCH_CB; i < N_SCRATCH; i++)
        if (!ctx->scratch[i]->data)
            return host->error(ctx, "fourierft: scratch buffer '%s' is missing", ff_scratch[i].name);
    if (ctx->scratch[SCRATCH_POS]->shape[0] < 2 * (int64_t)f->n ||
        ctx->scratch[SCRATCH_HASH]->shape[0] < 16 * (int64_t)f->n + 16)
        return host->error(ctx, "fourierft: scratch buffers are too small for n_frequency = %d", f->n);
    f->cb = ctx->scratch[SCRATCH_CB]->data;
    f->sb = ctx->scratch[SCRATCH_SB]->data;
    f->ca = ctx->scratch[SCRATCH_CA]->data;
    f->sa = ctx->scratch[SCRATCH_SA]->data;
    f->u = ctx->scratch[SCRATCH_U]->data;

    /* the positions, then the DFT factors through one table per length */
    uint32_t *pos = (uint32_t *)ctx->scratch[SCRATCH_POS]->data;
    spectral_positions((uint32_t)ctx->options[OPT_SEED].num, f->d_out, f->d_in, f->n,
                       (uint32_t *)ctx->scratch[SCRATCH_HASH]->data, pos);
    float *cosN = ctx->scratch[SCRATCH_TRIG]->data, *sinN = cosN + f->d_in;
    float *cosM = sinN + f->d_in, *sinM = cosM + f->d_out;
    const double two_pi = 6.283185307179586476925286766559;
    for (int j = 0; j < f->d_in; j++) {
        cosN[j] = (float)cos(two_pi * j / f->d_in);
        sinN[j] = (float)sin(two_pi * j / f->d_in);
    }
    for (int j = 0; j < f->d_out; j++) {
        cosM[j] = (float)cos(two_pi * j / f->d_out);
        sinM[j] = (float)sin(two_pi * j / f->d_out);
    }
    for (int q = 0; q < f->d_in; q++)
        for (int k = 0; k < f->n; k++) {
            uint32_t t = (uint32_t)(((uint64_t)q * pos[2 * k + 1]) % (uint64_t)f->d_in);
            f->cb[(size_t)q * f->n + k] = cosN[t];
            f->sb[(size_t)q * f->n + k] = sinN[t];
        }
    for (int p = 0; p < f->d_out; p++)
        for (int k = 0; k < f->n; k++) {
            uint32_t t = (uint32_t)(((uint64_t)p * pos[2 * k]) % (uint64_t)f->d_out);
            f->ca[(size_t)p * f->n + k] = cosM[t];
            f->sa[(size_t)p * f->n + k] = sinM[t];
        }
    return 0;
}

/* out [d_in, d_out] (row stride ld) = dW = kappa (CB diag(c) CA^T - SB diag(c) SA^T) */
static void build_delta(const pr_host *host, const ff_call *f, float *out, int ld)
{
    const int n = f->n;
    for (int q = 0; q < f->d_in; q++)
        for (int k = 0; k < n; k++)
            f->u[(size_t)q * n + k] = f->c[k] * f->cb[(size_t)q * n + k];
    host->gemm(0, 1, f->d_in, f->d_out, n, (float)f->kappa, f->u, n, f->ca, n, 0.0f, out, ld);
    for (int q = 0; q < f->d_in; q++)
        for (int k = 0; k < n; k++)
            f->u[(size_t)q * n + k] = f->c[k] * f->sb[(size_t)q * n + k];
    host->gemm(0, 1, f->d_in, f->d_out, n, (float)-f->kappa, f->u, n, f->sa, n, 1.0f, out, ld);
}

/* merge: out [d_in, d_out] = dW, scaling included (the host's gate, if
 * any, applies on top of it). */
static int ff_merge(const pr_ctx *ctx)
{
    ff_call f;
    int rc = ff_get_call(ctx, &f, 1);
    if (rc)
        return rc;
    if (!ctx->out->data || ctx->out->shape[0] != f.d_in || ctx->out->shape[1] != f.d_out)
        return ctx->host->error(ctx, "fourierft: merge output must be [%d, %d]", f.d_in, f.d_out);
    build_delta(ctx->host, &f, ctx->out->data, row_stride(ctx->out));
    return 0;
}

/* forward: in = x (rows, d_in) -> out = h = x.dW (rows, d_out). */
static int ff_forward(const pr_ctx *ctx)
{
    ff_call f;
    int rc = ff_get_call(ctx, &f, 1);
    if (rc)
        return rc;
    float *dw = ctx->scratch[SCRATCH_DW]->data;
    if (!dw || !ctx->in->data || !ctx->out->data)
        return ctx->host->error(ctx, "fourierft: forward needs its input, output and 'dw' scratch");
    build_delta(ctx->host, &f, dw, f.d_out);
    ctx->host->gemm(0, 0, ctx->rows, f.d_out, f.d_in, 1.0f, ctx->in->data, row_stride(ctx->in), dw, f.d_out,
                    0.0f, ctx->out->data, row_stride(ctx->out));
    return 0;
}

/* backward (weight delta): d_out = G = dL/d(dW) [d_in, d_out];
 * dc_k += kappa (sum_q CB[q,k] (G CA)[q,k] - sum_q SB[q,k] (G SA)[q,k]). */
static int ff_backward(const pr_ctx *ctx)
{
    float *dc = ctx->grads && ctx->n_params ? ctx->grads[PARAM_SPECTRUM]->data : NULL;
    if (!dc)
        return 0;
    ff_call f;
    int rc = ff_get_call(ctx, &f, 1);
    if (rc)
        return rc;
    const pr_tensor *g = ctx->d_out;
    if (!g->data || g->shape[0] != f.d_in || g->shape[1] != f.d_out)
        return ctx->host->error(ctx, "fourierft: backward needs dL/d(dW) shaped [%d, %d]", f.d_in, f.d_out);
    const int n = f.n, ldg = row_stride(g);
    for (int pass = 0; pass < 2; pass++) {
        const float *a = pass ? f.sa : f.ca, *b = pass ? f.sb : f.cb;
        const double sign = pass ? -f.kappa : f.kappa;
        ctx->host->gemm(0, 0, f.d_in, n, f.d_out, 1.0f, g->data, ldg, a, n, 0.0f, f.u, n);
        for (int k = 0; k < n; k++) {
            double acc = 0.0;
            for (int q = 0; q < f.d_in; q++)
                acc += (double)b[(size_t)q * n + k] * f.u[(size_t)q * n + k];
            dc[k] += (float)(sign * acc);
        }
    }
    return 0;
}

/* init: the spectrum, standard normal from the call's seed, or zeros. */
static int ff_init(const pr_ctx *ctx)
{
    ff_call f;
    int rc = ff_get_call(ctx, &f, 0);
    if (rc)
        return rc;
    float *c = ctx->params[PARAM_SPECTRUM]->data;
    if (ctx->options[OPT_N].num > f.n)
        ctx->host->log(ctx, PR_LOG_WARN,
                       "fourierft: n_frequency = %.0f is not less than d_in * d_out = %d * %d; using %d "
                       "(Hugging Face PEFT refuses this matrix)",
                       ctx->options[OPT_N].num, f.d_in, f.d_out, f.n);
    if (ctx->options[OPT_INIT].num != 0) {
        memset(c, 0, (size_t)f.n * sizeof(float));
        return 0;
    }
    uint64_t st = ctx->seed;
    for (int k = 0; k < f.n; k++)
        c[k] = ctx->host->rng_normal(&st);
    return 0;
}

static const pr_ext_peft_config peft_ff = {
    .struct_size = sizeof(pr_ext_peft_config),
    .read = peft_read_fourierft,
    .write = peft_write_fourierft,
};

static const void *peft_ff_extension(const char *uri)
{
    return strcmp(uri, PR_EXT_PEFT_CONFIG_URI) ? NULL : &peft_ff;
}

static const pr_technique ff_technique = {
    .struct_size = sizeof(pr_technique),
    .abi_major = PR_ABI_MAJOR,
    .name = "fourierft",
    .version = "1.0.0",
    .summary = "Weight update dW = scaling * real(IDFT2(F)) with n_frequency trainable spectral "
               "coefficients at fixed random entries of F (positions from random_loc_seed, as Hugging "
               "Face PEFT draws them). Default site qkv (PEFT's GPT-2 target c_attn).",
    .citation = "Gao, Wang, Chen, Ma, Chen, Yang, Zhang (2024). Parameter-Efficient Fine-Tuning with "
                "Discrete Fourier Transform. arXiv:2405.03003",
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
    .options = ff_options,
    .n_options = N_OPTS,
    .sites = PR_SITE_BIT(PR_SITE_QKV) | PR_SITE_BIT(PR_SITE_Q) | PR_SITE_BIT(PR_SITE_K) |
             PR_SITE_BIT(PR_SITE_V) | PR_SITE_BIT(PR_SITE_O) | PR_SITE_BIT(PR_SITE_FFN_UP) |
             PR_SITE_BIT(PR_SITE_FFN_GATE) | PR_SITE_BIT(PR_SITE_FFN_DOWN),
    .default_sites = PR_SITE_BIT(PR_SITE_QKV),
    .default_sites_llama = PR_SITE_BIT(PR_SITE_Q) | PR_SITE_BIT(PR_SITE_V),
    .params = ff_params,
    .n_params = N_PARAMS,
    .scratch = ff_scratch,
    .n_scratch = N_SCRATCH,
    .param_formula = "per insertion: n_frequency (fourierft_spectrum; the entry positions are "
                     "recomputed from random_loc_seed, not stored), resolved per site; insertions = "
                     "chosen sites x chosen layers (default qkv: L)",
    /* the host's x.dW; building dW costs 4 n d_in d_out per call, not per token */
    .flops_per_token = "2 * d_in * d_out",
    .forward = ff_forward,
    .backward = ff_backward,
    .merge = ff_merge,
    .init = ff_init,
    .peft_type = "FOURIERFT",
    .extension_data = peft_ff_extension,
};

static const pr_technique *const ff_techniques[] = { &ff_technique };

static const pr_plugin ff_plugin = {
    .struct_size = sizeof(pr_plugin),
    .abi_major = PR_ABI_MAJOR,
    .name = "fourierft",
    .version = "1.0.0",
    .n_techniques = 1,
    .techniques = ff_techniques,
};

PR_PLUGIN_EXPORT const pr_plugin *peftref_plugin_entry(const pr_entry_args *args)
{
    (void)args;
    return &ff_plugin;
}
