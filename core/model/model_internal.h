/* peftref core: what the checkpoint loader and the module host need from
 * the model beyond its public API. */
#ifndef PEFTREF_CORE_MODEL_INTERNAL_H
#define PEFTREF_CORE_MODEL_INTERNAL_H

#include <stddef.h>
#include <stdint.h>
#include "peftref/model.h"
#include "peftref/plugin.h"

/* Build the tensor table for cfg without base storage: every tensor's data
 * is NULL until model_set_tensor_data or model_alloc_storage. */
int model_create_empty(const pr_model_config *cfg, pr_model **out, pr_error *err);
/* Allocate one f32 block for every tensor whose data is still NULL. */
int model_alloc_storage(pr_model *m, pr_error *err);
/* Point tensor i at data (memory the model does not own, e.g. a mapping). */
void model_set_tensor_data(pr_model *m, int i, float *data);
/* Hand the model a mapping to munmap when it is freed. */
int model_adopt_mapping(pr_model *m, void *addr, size_t len, pr_error *err);
/* Random init (GPT-2 scheme) of every tensor from cfg->seed. */
void model_init_random(pr_model *m);

/* The modules attached to a model, in attach order: the model holds the
 * list, core/module/ fills it, and pr_model_detach_modules (which
 * pr_model_free calls first) empties and frees it. */
typedef struct model_modules {
    struct pr_module **mods;
    int n, cap;
    /* the training position modules see (pr_ctx.step, .sample_index) */
    uint64_t step;
    const int64_t *samples;    /* B global sample indices of the batch in flight, or NULL */
    double aux_loss;           /* what after_backward callbacks added since the last read */
    /* 1 while the model reruns a block's forward for its backward
     * (recompute): a hook's forward there repeats its last call */
    int rerun;
} model_modules;
/* The token embedding table (GPT-2's wte, LLaMA's embed_tokens). */
const pr_tensor_info *model_token_embedding(const pr_model *m);
/* ids (rows) = the token id of each row the embed site's hooks see, in
 * their order (b*T + t, T internal), -1 at a virtual position; only while
 * those hooks run (forward or backward of a step) and rows = B*T.
 * Returns 0, or PR_ERR_INVALID (ids untouched) otherwise.  Serves the
 * host extension urn:peftref:ext:embed-tokens:1 (peftref/ext/embed_tokens.h). */
int model_embed_token_ids(const pr_model *m, int rows, int32_t *ids);
/* m's list; NULL for a NULL m. */
model_modules *model_modules_of(const pr_model *m);

/* How a frozen weight is stored: pr_weight_layout (peftref/plugin.h).
 * GPT-2's Conv1D keeps [d_in, d_out] (element (i, o) at w[i*ld + o]);
 * nn.Linear (LLaMA) keeps [d_out, d_in] (element (i, o) at w[o*ld + i]). */
/* The frozen weight and bias at a site, as stored.  For a projection
 * site d_in/d_out are the site's; attn.k and attn.v view the key / value
 * projection (d_in = d_model), ffn.act the down projection (d_in = d_ff =
 * the site's width, d_out = d_model) with no bias.  Writable, for merging. */
typedef struct model_weight_view {
    float *w;        /* NULL when the weight is stored in bf16: then w16 */
    const uint16_t *w16;
    int ld;          /* row stride of the stored matrix */
    float *b;        /* (d_out) or NULL without biases */
    int d_in, d_out;
    int layout;      /* pr_weight_layout */
    /* set by the family: the tensor viewed and the view's first element */
    const pr_tensor_info *tensor;
    int64_t off;
} model_weight_view;

/* The view at (site, layer); PR_ERR_INVALID for a stream site without a
 * weight, PR_ERR_UNSUPPORTED for a site the family lacks.
 * pr_model_site_weight is this for [d_in, d_out] (IN_OUT) weights. */
int model_site_weight_view(pr_model *m, int site, int layer, model_weight_view *v, pr_error *err);

/* ---- precision (precision.c) ----
 * The base-model fingerprint (pr_model_fingerprint) reads min(numel,
 * MODEL_FP_SAMPLES) values of each base tensor, element
 * model_fp_sample_at(numel, k) for k = 0, 1, ...; for a tensor stored in
 * bf16 those f32 values were kept when it was converted. */
#define MODEL_FP_SAMPLES 65536
int64_t model_fp_sample_count(int64_t numel);
int64_t model_fp_sample_at(int64_t numel, int64_t k);
/* The kept f32 samples of a bf16-stored base tensor, or NULL. */
const float *model_tensor_fp_samples(const pr_model *m, const pr_tensor_info *t);
/* dst (shape[1]) = row `row` of 2-D tensor t in f32, whatever its storage. */
int model_tensor_row_f32(const pr_model *m, const pr_tensor_info *t, int64_t row, float *dst);
/* core/module/attach.c: view the site weights again (storage changed). */
struct pr_module;
void module_refresh_base_views(struct pr_module *mod);
/* 1 when mod is merged into the frozen weights. */
int module_is_merged(const struct pr_module *mod);

#endif
