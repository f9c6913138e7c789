/* peftref core: models and LoRA modules as GGUF files for llama.cpp
 * (gguf_export.c; docs/gguf.md says what goes where and what is folded). */
#ifndef PEFTREF_CORE_IO_GGUF_EXPORT_H
#define PEFTREF_CORE_IO_GGUF_EXPORT_H

#include <stdint.h>

#include "peftref/model.h"
#include "peftref/module.h"
#include "peftref/tokenizer.h"

/* llama.cpp's architecture name for a model: "llama" (model_type llama and
 * mistral), "gpt2"; for adapters also "qwen2" and "qwen3" (their bases are
 * converted by llama.cpp's own converter).  NULL with err naming the
 * model_type when there is none. */
const char *gguf_arch_for(const pr_model_config *cfg, int adapter, pr_error *err);

/* The row order llama.cpp's LLaMA architecture wants for a query or key
 * projection: within each of n_head heads of d_head rows, Hugging Face's
 * rotate-half halves (row s*d_head/2 + i, s = 0, 1) become interleaved
 * pairs (row 2i + s).  dst[perm(r)] = src[r] for rows of cols floats
 * (cols 1 for a bias); gguf_rope_unpermute_rows undoes it. */
void gguf_rope_permute_rows(const float *src, float *dst, int n_head, int d_head, int64_t cols);
void gguf_rope_unpermute_rows(const float *src, float *dst, int n_head, int d_head, int64_t cols);

/* Write m (its current base tensors: merge modules first) as a llama.cpp
 * model: weights as type (GGUF_TENSOR_F32 or GGUF_TENSOR_F16; vectors
 * stay F32), the hyperparameters llama.cpp reads and the tokenizer tok,
 * whose files are read from tokenizer_dir (NULL for the byte tokenizer). */
int gguf_export_model(const pr_model *m, const pr_tokenizer *tok, const char *tokenizer_dir, const char *path,
                      int type, pr_error *err);

/* What gguf_export_lora folded on the way (for the command's summary). */
typedef struct gguf_lora_summary {
    int tensors;          /* lora_a/lora_b pairs */
    float alpha;          /* the alpha written, under alpha_key */
    char alpha_key[64];   /* adapter.<type>.alpha */
    int folded_into_b;    /* pairs whose lora_b carries a scale factor */
    int permuted;         /* pairs whose lora_b rows were put in llama.cpp's RoPE order */
    int stacked;          /* pairs that stack several site updates (fused qkv, a frozen copy of the initial factors) */
} gguf_lora_summary;

/* Write a module whose technique declares a GGUF adapter type (peft-config
 * extension, gguf_adapter) as a llama.cpp adapter.  Other techniques are
 * refused by name.  summary may be NULL. */
int gguf_export_lora(pr_module *mod, const char *path, gguf_lora_summary *summary, pr_error *err);

#endif
