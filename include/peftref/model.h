/* peftref: the frozen base model and its forward/backward passes.
 *
 * A model owns its base tensors (memory-mapped from a checkpoint where the
 * dtype allows, otherwise converted to f32), the gradients of the tensors
 * made trainable, and activation buffers planned once by pr_model_reserve
 * for a maximum batch shape.  No step allocates. */
#ifndef PEFTREF_MODEL_H
#define PEFTREF_MODEL_H

#include <stddef.h>
#include <stdint.h>
#include "peftref/status.h"
#include "peftref/config.h"
#include "peftref/site.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct pr_model pr_model;

/* One named base tensor.  Names follow Hugging Face GPT-2 without the
 * "transformer." prefix ("wte.weight", "h.3.attn.c_attn.weight", ...), and
 * shapes follow the checkpoint layout (GPT-2 Conv1D weights are [in, out]). */
typedef struct pr_tensor_info {
    const char *name;
    int ndim;
    int64_t shape[4];
    int64_t numel;
    float *data;       /* f32 values */
    float *grad;       /* NULL unless the tensor is trainable */
    int trainable;
    int kind;          /* pr_tensor_kind */
    int layer;         /* -1 for model-level tensors */
    uint32_t workspace; /* the PEFT-Ref workspace it belongs to (pr_workspace bits; 0 for added tensors) */
    /* what the optimizer applies to it (module parameters declare both) */
    int no_decay;      /* 1: never weight-decayed (PR_PARAM_NO_DECAY) */
    float lr_mult;     /* learning-rate multiplier; 0 means 1 */
} pr_tensor_info;

typedef enum pr_tensor_kind {
    PR_TENSOR_WEIGHT = 1,   /* matrices and embedding tables */
    PR_TENSOR_BIAS = 2,     /* projection biases */
    PR_TENSOR_NORM_GAIN = 3,
    PR_TENSOR_NORM_BIAS = 4,
    PR_TENSOR_EMBEDDING = 5,  /* token and position tables */
    PR_TENSOR_MODULE = 6      /* added by pr_model_add_tensor */
} pr_tensor_kind;

/* Build a model from a config with GPT-2's seeded random init:
 * normal(0, init_std), residual output projections scaled by
 * 1/sqrt(2*n_layers), biases zero, norm gains one. */
int pr_model_create(const pr_model_config *cfg, pr_model **out, pr_error *err);

/* Load a Hugging Face checkpoint directory: config.json plus
 * model.safetensors, or model.safetensors.index.json with its shards. */
int pr_model_load_hf(const char *dir, pr_model **out, pr_error *err);

/* Write all base tensors as one safetensors file (F32), HF names. */
int pr_model_save_safetensors(const pr_model *m, const char *path, pr_error *err);
/* The same, storing dtype "f32", "f16" or "bf16" (round to nearest even). */
int pr_model_save_safetensors_as(const pr_model *m, const char *path, const char *dtype, pr_error *err);

/* Write dir/config.json (GPT2Config keys) and dir/model.safetensors, and
 * copy the tokenizer files of tokenizer_dir (NULL: the byte tokenizer),
 * so that pr_model_load_hf and Hugging Face transformers read it back. */
int pr_model_save_hf(const pr_model *m, const char *dir, const char *tokenizer_dir, pr_error *err);
/* The same with the weights stored as dtype ("f32", "f16", "bf16"). */
int pr_model_save_hf_as(const pr_model *m, const char *dir, const char *tokenizer_dir, const char *dtype,
                        pr_error *err);

void pr_model_free(pr_model *m);

const pr_model_config *pr_model_get_config(const pr_model *m);
int pr_model_n_tensors(const pr_model *m);
const pr_tensor_info *pr_model_tensor(const pr_model *m, int i);
const pr_tensor_info *pr_model_find_tensor(const pr_model *m, const char *name);
/* Set what the optimizer applies to an added tensor (module parameters). */
int pr_model_set_tensor_optim(pr_model *m, const char *name, int no_decay, float lr_mult, pr_error *err);
int64_t pr_model_param_count(const pr_model *m);

/* Make a base tensor trainable (allocates its gradient once).  An added
 * tensor can train only if it was added with a gradient.  "*" means every
 * tensor that can train. */
int pr_model_set_trainable(pr_model *m, const char *name, int on, pr_error *err);

/* Plan activation memory for batches up to B x T (T real tokens; the
 * plan adds the virtual positions of pr_model_virtual_positions, and
 * T + those must fit max_seq).  Must precede forward.  Calls the reserve
 * of every attached hook with the planned capacity. */
int pr_model_reserve(pr_model *m, int B, int T, pr_error *err);

/* One batch.  tokens (B,T); targets (B,T) with -1 for positions that are
 * not scored (padding, prompts), or NULL for logits only. */
typedef struct pr_batch {
    const int *tokens;
    const int *targets;
    int B, T;
    /* Stop after the final norm: no LM-head logits (a task head reads
     * pr_model_hidden instead); targets must be NULL. */
    int hidden_only;
} pr_batch;

/* Forward pass.  With targets, *loss is the mean cross-entropy (nats) over
 * the scored positions; otherwise *loss may be NULL. */
int pr_model_forward(pr_model *m, const pr_batch *batch, float *loss, pr_error *err);

/* Backward pass of the last forward (which must have had targets).
 * Accumulates into the gradients of trainable tensors and calls the
 * backward of every attached site hook. */
int pr_model_backward(pr_model *m, pr_error *err);
/* The same for a loss that divides the sum of this forward's scored token
 * losses by n_scored targets counted over a larger batch (every
 * micro-batch of a step, on every rank) rather than by the forward's own
 * count: the pieces' gradients then add up to the whole batch's mean-loss
 * gradient.  pr_model_backward is n_scored = pr_model_scored_tokens. */
int pr_model_backward_over(pr_model *m, int64_t n_scored, pr_error *err);

/* Final normalised hidden states of the last forward, (B,T,C), at the
 * real positions only. */
const float *pr_model_hidden(const pr_model *m);

/* Backward of the last forward from a gradient on its final hidden states
 * dhidden (B,T,C), real positions, instead of the LM loss (task heads). */
int pr_model_backward_hidden(pr_model *m, const float *dhidden, pr_error *err);

/* Zero the gradients of trainable base tensors and of added tensors. */
void pr_model_zero_grad(pr_model *m);

/* Logits of the last forward, (B,T,V) row-major.  A forward scores its
 * targets in chunks of rows and keeps no logits; the first call after it
 * computes them from the forward's final hidden states and the head as it
 * is then (call it before changing the head), in a buffer the model keeps
 * until the next forward.  NULL without a forward, after a hidden_only one,
 * or when that buffer cannot be allocated. */
const float *pr_model_logits(const pr_model *m);

/* Scored-target count of the last forward. */
int64_t pr_model_scored_tokens(const pr_model *m);

/* ---- incremental decoding with a key/value cache (one sequence) ---------
 *
 * pr_model_decode_begin plans a cache for ctx positions (ctx <= max_seq)
 * and empties it; each pr_model_decode then runs the n tokens that follow
 * the cached ones (positions pos .. pos+n-1), keeps their keys and values,
 * and leaves the logits of those n rows in pr_model_logits.  The result is
 * the full forward's over the whole sequence, computed once per token.
 * The model must be reserved for B = 1 and T >= the largest n.  Families
 * without a cached path (GPT-2) and models with virtual positions (prompt
 * tuning) give PR_ERR_UNSUPPORTED from begin; run full forwards instead.
 * Attaching or detaching modules, or pr_model_decode_end, drops the cache. */
int pr_model_decode_begin(pr_model *m, int ctx, pr_error *err);
int pr_model_decode(pr_model *m, const int *tokens, int n, pr_error *err);
/* Positions in the cache (0 after begin), or -1 when none is planned. */
int pr_model_decode_pos(const pr_model *m);
void pr_model_decode_end(pr_model *m);

/* ---- site hooks: how modules attach -----------------------------------
 *
 * At one site instance (site, layer) the model calls every attached hook's
 * forward in attach order, and their backward in reverse order.
 *
 * Forward: x (rows x x_dim, row stride x_ld) is the site input and y
 * (rows x y_dim, stride y_ld) the current output, which the hook changes in
 * place.  A parallel hook adds g(x) to y; a sequential hook replaces y by
 * f(y) and keeps what it needs of the old y itself.
 *
 * Backward: dy holds dLoss/dy (same strides as y).  A parallel hook
 * accumulates J_g^T dy into dx and leaves dy alone; a sequential hook
 * replaces dy by J_f^T dy.  dx is NULL when the site input needs no
 * gradient.  rows = B*T, where T is the model's internal sequence length:
 * with n virtual positions at the embedding (prompt tuning) T = n + the
 * batch's T, and the virtual rows come first in every sequence. */
typedef struct pr_site_io {
    int site, layer;
    int B, T, rows;
    const float *x; int x_dim, x_ld;
    float *y;       int y_dim, y_ld;
    float *dx;      /* same layout as x */
    float *dy;      /* same layout as y */
    int training;
} pr_site_io;

typedef struct pr_site_hook {
    int (*forward)(void *self, const pr_site_io *io, pr_error *err);
    int (*backward)(void *self, const pr_site_io *io, pr_error *err);
    void *self;
    /* Optional: called by pr_model_reserve (and at attach when the model is
     * already reserved, and again when virtual positions change the plan)
     * so the hook can plan its saved activations for up to B x T positions,
     * T internal as in pr_site_io; never called inside a step. */
    int (*reserve)(void *self, int B, int T, pr_error *err);
} pr_site_hook;

/* ---- concatenation: positions a module prepends ------------------------
 *
 * At PR_SITE_EMBED a provider prepends n virtual positions to every
 * sequence (prompt tuning): the model runs on n + T positions; virtual
 * position p gets the provider's vector plus the position embedding of p,
 * real token t gets position n + t; logits, targets and the loss cover
 * the T real positions only.  At PR_SITE_ATTN_K / PR_SITE_ATTN_V a provider
 * prepends n key (value) rows that every query attends to (prefix
 * tuning); the k and v providers of one layer must agree on n.
 * Several providers at one site concatenate in attach order.  Values are
 * shared by every sequence in the batch: forward fills out (n, width),
 * width = d_model at embed and n_kv_heads*d_head at attn.k/attn.v;
 * backward receives dout (n, width) summed over the batch (NULL backward:
 * nothing to train).  Prefix rows are not rows of the sequence: hooks at
 * attn.k/attn.v see only the sequence's keys/values.  Attaching at embed
 * to a reserved model plans again for the longer sequences. */
typedef struct pr_concat_provider {
    int n;
    int (*forward)(void *self, int site, int layer, float *out, pr_error *err);
    int (*backward)(void *self, int site, int layer, const float *dout, pr_error *err);
    void *self;
} pr_concat_provider;

int pr_model_attach_concat(pr_model *m, int site, int layer, const pr_concat_provider *p, pr_error *err);
/* Virtual positions currently prepended at the embedding site. */
int pr_model_virtual_positions(const pr_model *m);

/* Train/eval flag handed to hooks (pr_site_io.training); default eval. */
void pr_model_set_training(pr_model *m, int training);
int pr_model_get_training(const pr_model *m);

/* Add a tensor owned by someone else (a module's parameters, a task head)
 * to the tensor table, so counts, training and checkpoints see it.  grad
 * may be NULL (frozen); trainable starts as grad != NULL.  The name must
 * be new and is copied; data and grad stay the caller's.  kind is
 * PR_TENSOR_MODULE, layer -1.  Table entries do not move: pointers from
 * pr_model_tensor/find_tensor stay valid until their tensor is removed. */
int pr_model_add_tensor(pr_model *m, const char *name, int ndim, const int64_t *shape, float *data,
                        float *grad, pr_error *err);
/* Remove every tensor whose name starts with prefix (a module detaching). */
void pr_model_remove_tensors(pr_model *m, const char *prefix);

/* The frozen weight and bias of a projection site as a [d_in, d_out] view
 * with row stride ld (q/k/v of a fused model are column slices of the
 * fused weight).  *b is NULL without biases.  Writable, for merging.
 * Three stream sites have the weight their values fold into: attn.k and
 * attn.v the key / value projection [d_model, d_out] with its bias,
 * ffn.act the down projection [d_ff = d_out, d_model] with *b = NULL. */
int pr_model_site_weight(pr_model *m, int site, int layer, float **w, int *ld, float **b, pr_error *err);

/* Attach a hook at (site, layer); layer is -1 for model-level sites.
 * Fails for a site the model's family lacks. */
int pr_model_attach_hook(pr_model *m, int site, int layer, const pr_site_hook *hook, pr_error *err);
/* Detach every hook and every concatenation provider. */
void pr_model_detach_hooks(pr_model *m);

/* ---- precision -----------------------------------------------------------
 *
 * f32 (the default): every tensor and product in f32 on OpenBLAS.  bf16:
 * the frozen matrices products read (projection weights of every layer,
 * the LM head or tied token table) are stored once in bf16 and their
 * products run on oneDNN (activations cast to bf16, f32 accumulation);
 * trainable tensors, biases, norms, position tables, module parameters,
 * gradients and optimizer state stay f32.  A converted tensor keeps its
 * entry (name, shape) with data NULL: read it with pr_model_tensor_f32.
 * Set it after modules are attached and trainable tensors chosen (a bf16
 * tensor cannot become trainable) and before training; it cannot be
 * undone, and merging into bf16 weights is refused. */
typedef enum pr_precision {
    PR_PRECISION_F32 = 0,
    PR_PRECISION_BF16 = 1
} pr_precision;

/* "f32" / "bf16" -> pr_precision, -1 for anything else. */
int pr_precision_parse(const char *s);
const char *pr_precision_name(int precision);
/* PR_OK when this build can run precision (bf16 needs oneDNN). */
int pr_precision_available(int precision, pr_error *err);
int pr_model_set_precision(pr_model *m, int precision, pr_error *err);
int pr_model_get_precision(const pr_model *m);
/* 1 when base tensor t is stored in bf16 (its data is NULL). */
int pr_model_tensor_is_bf16(const pr_model *m, const pr_tensor_info *t);
/* Bytes of bf16 storage the model holds. */
size_t pr_model_bf16_bytes(const pr_model *m);
/* dst (t->numel) = tensor t in f32, whatever its storage. */
int pr_model_tensor_f32(const pr_model *m, const pr_tensor_info *t, float *dst, pr_error *err);

/* Input and output widths of a site in this model (-1 if absent). */
int pr_model_site_dims(const pr_model *m, int site, int *d_in, int *d_out);

/* ---- activation recomputation ---------------------------------------------
 *
 * Off (the default): the forward keeps every block's activations for the
 * backward.  On: the blocks share one activation area and the forward
 * keeps only each block's input (B,T,C); the backward reruns a block's
 * forward from it (hooks and concatenation providers included) before
 * differentiating the block (Chen et al. 2016, "Training Deep Nets with
 * Sublinear Memory Cost").  That costs one more forward of every block the
 * backward runs except the top one, whose activations the forward left in
 * the area, and gives the loss and gradients of the default bit for bit.
 * Setting it re-plans a reservation already made. */
int pr_model_set_recompute(pr_model *m, int on, pr_error *err);
int pr_model_get_recompute(const pr_model *m);

#ifdef __cplusplus
}
#endif
#endif
