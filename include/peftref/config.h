/* peftref: family-neutral model dimensions.
 *
 * One struct describes every supported family.  GPT-2 uses learned
 * positions, LayerNorm, GELU(tanh) and a fused QKV projection; LLaMA-style
 * models (RMSNorm, RoPE, SwiGLU, grouped-query attention) fill the same
 * fields with other values.  n_kv_heads and d_head are explicit so that
 * grouped-query attention (n_kv_heads < n_heads) and d_head != d_model /
 * n_heads need no new fields. */
#ifndef PEFTREF_CONFIG_H
#define PEFTREF_CONFIG_H

#include <stdint.h>
#include "peftref/status.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum pr_family { PR_FAMILY_GPT2 = 1, PR_FAMILY_LLAMA = 2 } pr_family;
typedef enum pr_norm_kind { PR_NORM_LAYERNORM = 1, PR_NORM_RMSNORM = 2 } pr_norm_kind;
typedef enum pr_act_kind { PR_ACT_GELU_TANH = 1, PR_ACT_SWIGLU = 2 } pr_act_kind;
typedef enum pr_pos_kind { PR_POS_LEARNED = 1, PR_POS_ROPE = 2 } pr_pos_kind;
/* Which Hugging Face model_type a LLaMA-family model is (its config.json
 * and tensor names); 0 for GPT-2. */
typedef enum pr_variant {
    PR_VARIANT_LLAMA = 1,   /* llama: Llama 2/3/3.1/3.2, TinyLlama, SmolLM */
    PR_VARIANT_MISTRAL = 2, /* mistral */
    PR_VARIANT_QWEN2 = 3,   /* qwen2 (q/k/v biases) */
    PR_VARIANT_QWEN3 = 4    /* qwen3 (per-head RMSNorm of q and k) */
} pr_variant;
/* rope_scaling of a RoPE model (Hugging Face's rope_type). */
typedef enum pr_rope_scaling {
    PR_ROPE_NONE = 0,
    PR_ROPE_LINEAR = 1,     /* positions divided by rope_factor */
    PR_ROPE_LLAMA3 = 2      /* Llama 3.1's frequency-dependent scaling */
} pr_rope_scaling;

typedef struct pr_model_config {
    int family;        /* pr_family */
    int n_layers;      /* L */
    int d_model;       /* C */
    int n_heads;       /* H */
    int n_kv_heads;    /* Hkv; equals H without grouped-query attention */
    int d_head;        /* hd; C / H for GPT-2 */
    int d_ff;          /* FFN hidden width; 4C for GPT-2 */
    int vocab_size;    /* V */
    int max_seq;       /* learned-position table size, or RoPE context */
    float norm_eps;    /* 1e-5 for GPT-2 */
    int bias;          /* projections and norms carry biases */
    int tied_head;     /* LM head shares the token embedding */
    int fused_qkv;     /* one [C, (H+2Hkv)hd] projection instead of three */
    int norm;          /* pr_norm_kind */
    int act;           /* pr_act_kind */
    int pos;           /* pr_pos_kind */
    float rope_theta;  /* RoPE base, unused by GPT-2 */
    float init_std;    /* random init std, 0.02 for GPT-2 */
    uint64_t seed;     /* seed for random init */
    /* LLaMA family (all 0 for GPT-2, whose biases `bias` covers) */
    int variant;       /* pr_variant */
    int qkv_bias;      /* q, k, v projections carry biases (attention_bias; qwen2) */
    int o_bias;        /* o projection carries a bias (attention_bias) */
    int mlp_bias;      /* gate, up and down projections carry biases (mlp_bias) */
    int qk_norm;       /* per-head RMSNorm of q and k before RoPE (qwen3) */
    int rope_scaling;  /* pr_rope_scaling */
    float rope_factor; /* linear and llama3 */
    float rope_low_freq_factor, rope_high_freq_factor; /* llama3 */
    int rope_orig_max_pos; /* llama3: original_max_position_embeddings */
    int sliding_window;    /* mistral: keys within this many positions, 0 = none */
} pr_model_config;

/* Upper bounds on each dimension, which pr_config_validate enforces
 * (docs/security.md, "Limits on outside input"): a config.json or a
 * pipeline is outside input, and a model's tensor table and plans grow
 * with these numbers.  They admit the largest released dense shapes
 * (405B-class: 126 layers, d_model 16384, d_ff 53248, 128k vocabulary,
 * 128k context) with room to spare; every weight matrix must also stay
 * below 2^31 elements, and the parameter count, with its gradients and
 * optimiser moments, must fit in int64 and in size_t bytes. */
#define PR_MAX_N_LAYERS 1024
#define PR_MAX_D_MODEL 65536
#define PR_MAX_N_HEADS 1024       /* n_heads and n_kv_heads */
#define PR_MAX_D_HEAD 4096
#define PR_MAX_D_FF 262144
#define PR_MAX_VOCAB 4194304      /* 4 Mi tokens */
#define PR_MAX_SEQ 1048576        /* 1 Mi positions */

/* Fill cfg with a named preset: "gpt2-small", "gpt2-medium", "gpt2-large",
 * "gpt2-xl", "gpt2-tiny" (tests), "llama-tiny" (tests), "smollm-135m",
 * "tinyllama-1.1b", "llama-3.2-1b" (the shapes of those released models).
 * Returns PR_ERR_NOTFOUND for an unknown name. */
int pr_config_preset(const char *name, pr_model_config *cfg);
/* The preset names, comma-separated, for messages ("gpt2-tiny, ..."). */
const char *pr_config_preset_names(void);

/* Check internal consistency (H*hd, H % Hkv, positive sizes ...) and the
 * bounds above; the message names the field and the bound. */
int pr_config_validate(const pr_model_config *cfg, pr_error *err);

/* Number of parameters a model of this shape holds (tied head counted once);
 * -1 for a dimension that is not positive or passes its PR_MAX_ bound. */
int64_t pr_config_param_count(const pr_model_config *cfg);

#ifdef __cplusplus
}
#endif
#endif
