/* peftref: model-shape presets, validation and parameter counting. */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "peftref/config.h"
#include "family.h"

/* GPT-2 sizes from Radford et al. 2019, "Language Models are Unsupervised
 * Multitask Learners", Table 2 (as released in the Hugging Face configs). */
static void gpt2_defaults(pr_model_config *c, int L, int C, int H)
{
    memset(c, 0, sizeof *c);
    c->family = PR_FAMILY_GPT2;
    c->n_layers = L;
    c->d_model = C;
    c->n_heads = H;
    c->n_kv_heads = H;
    c->d_head = C / H;
    c->d_ff = 4 * C;
    c->vocab_size = 50257;
    c->max_seq = 1024;
    c->norm_eps = 1e-5f;
    c->bias = 1;
    c->tied_head = 1;
    c->fused_qkv = 1;
    c->norm = PR_NORM_LAYERNORM;
    c->act = PR_ACT_GELU_TANH;
    c->pos = PR_POS_LEARNED;
    c->rope_theta = 0.0f;
    c->init_std = 0.02f;
    c->seed = 1337;
}

/* A LLaMA-family shape: RMSNorm, RoPE, SwiGLU, separate q/k/v, no biases. */
static void llama_defaults(pr_model_config *c, int L, int C, int H, int Hkv, int F, int V, int max_seq,
                           float theta, int tied)
{
    memset(c, 0, sizeof *c);
    c->family = PR_FAMILY_LLAMA;
    c->variant = PR_VARIANT_LLAMA;
    c->n_layers = L;
    c->d_model = C;
    c->n_heads = H;
    c->n_kv_heads = Hkv;
    c->d_head = C / H;
    c->d_ff = F;
    c->vocab_size = V;
    c->max_seq = max_seq;
    c->norm_eps = 1e-5f;
    c->tied_head = tied;
    c->norm = PR_NORM_RMSNORM;
    c->act = PR_ACT_SWIGLU;
    c->pos = PR_POS_ROPE;
    c->rope_theta = theta;
    c->init_std = 0.02f;
    c->seed = 1337;
}

static const char preset_list[] =
    "gpt2-tiny, gpt2-small, gpt2-medium, gpt2-large, gpt2-xl, llama-tiny, smollm-135m, tinyllama-1.1b, "
    "llama-3.2-1b";

const char *pr_config_preset_names(void)
{
    return preset_list;
}

int pr_config_preset(const char *name, pr_model_config *cfg)
{
    if (!name || !cfg)
        return PR_ERR_INVALID;
    /* LLaMA-family shapes from the released config.json files:
     * HuggingFaceTB/SmolLM-135M, TinyLlama/TinyLlama-1.1B-intermediate-
     * step-1431k-3T (and its Chat v1.0), meta-llama/Llama-3.2-1B. */
    if (!strcmp(name, "llama-tiny")) {
        /* a test-sized LLaMA over the 256 byte values (~107k parameters):
         * grouped-query attention (4 query heads over 2 key/value heads),
         * an untied head */
        llama_defaults(cfg, 2, 64, 4, 2, 128, 256, 64, 10000.0f, 0);
        return PR_OK;
    }
    if (!strcmp(name, "smollm-135m")) {
        llama_defaults(cfg, 30, 576, 9, 3, 1536, 49152, 2048, 10000.0f, 1);
        return PR_OK;
    }
    if (!strcmp(name, "tinyllama-1.1b")) {
        llama_defaults(cfg, 22, 2048, 32, 4, 5632, 32000, 2048, 10000.0f, 0);
        return PR_OK;
    }
    if (!strcmp(name, "llama-3.2-1b")) {
        llama_defaults(cfg, 16, 2048, 32, 8, 8192, 128256, 131072, 500000.0f, 1);
        cfg->rope_scaling = PR_ROPE_LLAMA3;
        cfg->rope_factor = 32.0f;
        cfg->rope_low_freq_factor = 1.0f;
        cfg->rope_high_freq_factor = 4.0f;
        cfg->rope_orig_max_pos = 8192;
        return PR_OK;
    }
    if (!strcmp(name, "gpt2-small") || !strcmp(name, "gpt2"))
        gpt2_defaults(cfg, 12, 768, 12);
    else if (!strcmp(name, "gpt2-medium"))
        gpt2_defaults(cfg, 24, 1024, 16);
    else if (!strcmp(name, "gpt2-large"))
        gpt2_defaults(cfg, 36, 1280, 20);
    else if (!strcmp(name, "gpt2-xl"))
        gpt2_defaults(cfg, 48, 1600, 25);
    else if (!strcmp(name, "gpt2-tiny")) {
        /* a test-sized GPT-2 over the 256 byte values (~120k parameters) */
        gpt2_defaults(cfg, 2, 64, 4);
        cfg->vocab_size = 256;
        cfg->max_seq = 64;
    } else
        return PR_ERR_NOTFOUND;
    return PR_OK;
}

static const char *family_name(int f)
{
    switch (f) {
    case PR_FAMILY_GPT2: return "GPT-2";
    case PR_FAMILY_LLAMA: return "LLaMA";
    default: return "?";
    }
}

/* Shape consistency: would any family make sense of these numbers? */
static int config_check_consistent(const pr_model_config *c, pr_error *err)
{
    if (c->family != PR_FAMILY_GPT2 && c->family != PR_FAMILY_LLAMA)
        return pr_errorf(err, PR_ERR_INVALID, "config: family %d is not a known model family", c->family);
    const struct { const char *name; int v, max; const char *bound; } pos[] = {
        { "n_layers", c->n_layers, PR_MAX_N_LAYERS, "PR_MAX_N_LAYERS" },
        { "d_model", c->d_model, PR_MAX_D_MODEL, "PR_MAX_D_MODEL" },
        { "n_heads", c->n_heads, PR_MAX_N_HEADS, "PR_MAX_N_HEADS" },
        { "n_kv_heads", c->n_kv_heads, PR_MAX_N_HEADS, "PR_MAX_N_HEADS" },
        { "d_head", c->d_head, PR_MAX_D_HEAD, "PR_MAX_D_HEAD" },
        { "d_ff", c->d_ff, PR_MAX_D_FF, "PR_MAX_D_FF" },
        { "vocab_size", c->vocab_size, PR_MAX_VOCAB, "PR_MAX_VOCAB" },
        { "max_seq", c->max_seq, PR_MAX_SEQ, "PR_MAX_SEQ" },
    };
    for (size_t i = 0; i < sizeof pos / sizeof pos[0]; i++) {
        if (pos[i].v <= 0)
            return pr_errorf(err, PR_ERR_INVALID, "config: %s must be positive (got %d)",
                             pos[i].name, pos[i].v);
        if (pos[i].v > pos[i].max)
            return pr_errorf(err, PR_ERR_INVALID, "config: %s %d is more than %d (%s)", pos[i].name, pos[i].v,
                             pos[i].max, pos[i].bound);
    }
    if (c->n_heads % c->n_kv_heads != 0)
        return pr_errorf(err, PR_ERR_INVALID,
                         "config: n_heads (%d) must be a multiple of n_kv_heads (%d)",
                         c->n_heads, c->n_kv_heads);
    /* keep every per-matrix element count well inside int arithmetic */
    const int64_t big = (int64_t)1 << 31;
    int64_t qkv = (int64_t)(c->n_heads + 2 * c->n_kv_heads) * c->d_head;
    if (qkv >= big || (int64_t)c->d_model * qkv >= big || (int64_t)c->d_model * c->d_ff >= big ||
        (int64_t)c->vocab_size * c->d_model >= big || (int64_t)c->max_seq * c->d_model >= big)
        return pr_errorf(err, PR_ERR_INVALID,
                         "config: a weight matrix of this shape exceeds 2^31 elements");
    /* with the bounds above every product of pr_config_param_count fits
     * in int64 (a layer holds less than 2^41 parameters, the model less
     * than 2^52); the
     * weights, their gradients and two optimiser moments must also fit in
     * size_t bytes (a 32-bit host) */
    int64_t params = pr_config_param_count(c);
    if (params <= 0 || (uint64_t)params > (uint64_t)(SIZE_MAX / (4 * sizeof(float))) ||
        (uint64_t)params > (uint64_t)(PTRDIFF_MAX / (4 * sizeof(float))))
        return pr_errorf(err, PR_ERR_INVALID,
                         "config: %lld parameters: their weights, gradients and optimiser state do not fit in "
                         "this host's address space", (long long)params);
    if (!(c->norm_eps > 0.0f) || !isfinite(c->norm_eps))
        return pr_errorf(err, PR_ERR_INVALID, "config: norm_eps must be a positive finite number (got %g)",
                         (double)c->norm_eps);
    if (!(c->init_std >= 0.0f) || !isfinite(c->init_std))
        return pr_errorf(err, PR_ERR_INVALID, "config: init_std must be finite and >= 0 (got %g)",
                         (double)c->init_std);
    if (c->bias != 0 && c->bias != 1)
        return pr_errorf(err, PR_ERR_INVALID, "config: bias must be 0 or 1 (got %d)", c->bias);
    if (c->tied_head != 0 && c->tied_head != 1)
        return pr_errorf(err, PR_ERR_INVALID, "config: tied_head must be 0 or 1 (got %d)", c->tied_head);
    if (c->fused_qkv != 0 && c->fused_qkv != 1)
        return pr_errorf(err, PR_ERR_INVALID, "config: fused_qkv must be 0 or 1 (got %d)", c->fused_qkv);
    if (c->norm != PR_NORM_LAYERNORM && c->norm != PR_NORM_RMSNORM)
        return pr_errorf(err, PR_ERR_INVALID, "config: norm %d is not a known normalisation", c->norm);
    if (c->act != PR_ACT_GELU_TANH && c->act != PR_ACT_SWIGLU)
        return pr_errorf(err, PR_ERR_INVALID, "config: act %d is not a known activation", c->act);
    if (c->pos != PR_POS_LEARNED && c->pos != PR_POS_ROPE)
        return pr_errorf(err, PR_ERR_INVALID, "config: pos %d is not a known position encoding", c->pos);
    if (c->pos == PR_POS_ROPE) {
        if (!(c->rope_theta > 0.0f) || !isfinite(c->rope_theta))
            return pr_errorf(err, PR_ERR_INVALID, "config: rope_theta must be positive with RoPE (got %g)",
                             (double)c->rope_theta);
        if (c->d_head % 2 != 0)
            return pr_errorf(err, PR_ERR_INVALID, "config: d_head must be even with RoPE (got %d)",
                             c->d_head);
    }
    const struct { const char *name; int v; } flags[] = {
        { "qkv_bias", c->qkv_bias }, { "o_bias", c->o_bias }, { "mlp_bias", c->mlp_bias },
        { "qk_norm", c->qk_norm },
    };
    for (size_t i = 0; i < sizeof flags / sizeof flags[0]; i++)
        if (flags[i].v != 0 && flags[i].v != 1)
            return pr_errorf(err, PR_ERR_INVALID, "config: %s must be 0 or 1 (got %d)", flags[i].name,
                             flags[i].v);
    /* variant 0 is plain Llama: a config written by hand need not set it */
    if (c->family == PR_FAMILY_LLAMA && (c->variant < 0 || c->variant > PR_VARIANT_QWEN3))
        return pr_errorf(err, PR_ERR_INVALID, "config: variant %d is not a known LLaMA-family model type",
                         c->variant);
    if (c->rope_scaling != PR_ROPE_NONE && c->rope_scaling != PR_ROPE_LINEAR &&
        c->rope_scaling != PR_ROPE_LLAMA3)
        return pr_errorf(err, PR_ERR_INVALID, "config: rope_scaling %d is not a known scaling", c->rope_scaling);
    if (c->rope_scaling != PR_ROPE_NONE && (!(c->rope_factor > 0.0f) || !isfinite(c->rope_factor)))
        return pr_errorf(err, PR_ERR_INVALID, "config: rope_scaling needs a positive finite factor (got %g)",
                         (double)c->rope_factor);
    if (c->rope_scaling == PR_ROPE_LLAMA3) {
        if (!(c->rope_low_freq_factor > 0.0f) || !(c->rope_high_freq_factor > c->rope_low_freq_factor) ||
            !isfinite(c->rope_high_freq_factor))
            return pr_errorf(err, PR_ERR_INVALID,
                             "config: llama3 rope_scaling needs 0 < low_freq_factor < high_freq_factor (got %g, %g)",
                             (double)c->rope_low_freq_factor, (double)c->rope_high_freq_factor);
        if (c->rope_orig_max_pos <= 0 || c->rope_orig_max_pos > PR_MAX_SEQ)
            return pr_errorf(err, PR_ERR_INVALID,
                             "config: llama3 rope_scaling needs original_max_position_embeddings in [1, %d] (got %d)",
                             PR_MAX_SEQ, c->rope_orig_max_pos);
    }
    if (c->sliding_window < 0)
        return pr_errorf(err, PR_ERR_INVALID, "config: sliding_window must be >= 0 (got %d)", c->sliding_window);
    return PR_OK;
}

/* Consistent numbers a family can still refuse (a GPT-2 with RoPE). */
static int config_check_supported(const pr_model_config *c, pr_error *err)
{
    const family_ops *ops = family_find(c->family);
    if (!ops)
        return pr_errorf(err, PR_ERR_UNSUPPORTED,
                         "config: family %s is not implemented",
                         family_name(c->family));
    return ops->check_config(c, err);
}

int pr_config_validate(const pr_model_config *cfg, pr_error *err)
{
    if (!cfg)
        return pr_errorf(err, PR_ERR_INVALID, "config: NULL");
    int rc = config_check_consistent(cfg, err);
    if (rc)
        return rc;
    return config_check_supported(cfg, err);
}

int64_t pr_config_param_count(const pr_model_config *c)
{
    /* within the PR_MAX_ bounds nothing below overflows int64 */
    if (!c || c->n_layers <= 0 || c->d_model <= 0 || c->n_heads <= 0 || c->n_kv_heads <= 0 ||
        c->d_head <= 0 || c->d_ff <= 0 || c->vocab_size <= 0 || c->max_seq <= 0 ||
        c->n_layers > PR_MAX_N_LAYERS || c->d_model > PR_MAX_D_MODEL || c->n_heads > PR_MAX_N_HEADS ||
        c->n_kv_heads > PR_MAX_N_HEADS || c->d_head > PR_MAX_D_HEAD || c->d_ff > PR_MAX_D_FF ||
        c->vocab_size > PR_MAX_VOCAB || c->max_seq > PR_MAX_SEQ)
        return -1;
    int64_t C = c->d_model, F = c->d_ff, V = c->vocab_size;
    int64_t dq = (int64_t)c->n_heads * c->d_head, dkv = (int64_t)c->n_kv_heads * c->d_head;
    int64_t b = c->bias ? 1 : 0;
    /* RMSNorm has a gain only; LayerNorm adds a bias when the model has biases */
    int64_t norm = C * ((c->norm == PR_NORM_LAYERNORM && c->bias) ? 2 : 1);

    /* GPT-2's bias covers every projection; LLaMA models say which carry one */
    int64_t bqkv = c->family == PR_FAMILY_LLAMA ? (c->qkv_bias ? 1 : 0) : b;
    int64_t bo = c->family == PR_FAMILY_LLAMA ? (c->o_bias ? 1 : 0) : b;
    int64_t bmlp = c->family == PR_FAMILY_LLAMA ? (c->mlp_bias ? 1 : 0) : b;
    int64_t attn = C * (dq + 2 * dkv) + bqkv * (dq + 2 * dkv) + dq * C + bo * C;
    int64_t ffn = c->act == PR_ACT_SWIGLU ? 3 * C * F + bmlp * (2 * F + C) : 2 * C * F + bmlp * (F + C);
    int64_t qk_norm = c->qk_norm ? 2 * (int64_t)c->d_head : 0;
    int64_t layer = 2 * norm + attn + ffn + qk_norm;

    int64_t n = V * C;                              /* token embedding */
    if (c->pos == PR_POS_LEARNED)
        n += (int64_t)c->max_seq * C;               /* position table */
    n += c->n_layers * layer + norm;                /* blocks, final norm */
    if (!c->tied_head)
        n += V * C;                                 /* separate LM head */
    return n;
}
