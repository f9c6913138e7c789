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
} pr_tensor_info;

typedef enum pr_tensor_kind {
    PR_TENSOR_WEIGHT = 1,   /* matrices and embedding tables */
    PR_TENSOR_BIAS = 2,     /* projection biases */
    PR_TENSOR_NORM_GAIN = 3,
    PR_TENSOR_NORM_BIAS = 4
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

/* Write dir/config.json (GPT2Config keys) and dir/model.safetensors, and
 * copy the tokenizer files of tokenizer_dir (NULL: the byte tokenizer),
 * so that pr_model_load_hf and Hugging Face transformers read it back. */
int pr_model_save_hf(const pr_model *m, const char *dir, const char *tokenizer_dir, pr_error *err);

void pr_model_free(pr_model *m);

const pr_model_config *pr_model_get_config(const pr_model *m);
int pr_model_n_tensors(const pr_model *m);
const pr_tensor_info *pr_model_tensor(const pr_model *m, int i);
const pr_tensor_info *pr_model_find_tensor(const pr_model *m, const char *name);
int64_t pr_model_param_count(const pr_model *m);

/* Make a base tensor trainable (allocates its gradient once). */
int pr_model_set_trainable(pr_model *m, const char *name, int on, pr_error *err);

/* Plan activation memory for batches up to B x T.  Must precede forward. */
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

/* Final normalised hidden states of the last forward, (B,T,C). */
const float *pr_model_hidden(const pr_model *m);

/* Backward of the last forward from a gradient on its final hidden states
 * dhidden (B,T,C) instead of the LM loss (task heads). */
int pr_model_backward_hidden(pr_model *m, const float *dhidden, pr_error *err);

/* Zero the gradients of trainable base tensors. */
void pr_model_zero_grad(pr_model *m);

/* Logits of the last forward, (B,T,V) row-major. */
const float *pr_model_logits(const pr_model *m);

/* Scored-target count of the last forward. */
int64_t pr_model_scored_tokens(const pr_model *m);

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
 * gradient.  rows = B*T. */
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
} pr_site_hook;

/* Attach a hook at (site, layer); layer is -1 for model-level sites.
 * Fails for a site the model's family lacks. */
int pr_model_attach_hook(pr_model *m, int site, int layer, const pr_site_hook *hook, pr_error *err);
void pr_model_detach_hooks(pr_model *m);

/* Input and output widths of a site in this model (-1 if absent). */
int pr_model_site_dims(const pr_model *m, int site, int *d_in, int *d_out);

#ifdef __cplusplus
}
#endif
#endif
