/* peftref core: the model frame and the family-operations table.
 *
 * The frame (model.c, tensors.c, grads.c, hooks.c, concat.c,
 * activations.c, passes.c) owns what every architecture shares: the
 * tensor table, gradients of trainable tensors, site hooks and
 * concatenation providers, activation memory, the embedding (token table
 * plus an optional learned position table, virtual positions), the LM
 * head and the forward/backward driver.  A family (gpt2.c, ...) owns what
 * differs: which base tensors exist with which names and shapes, how a
 * block runs forward and backward, the final norm, and where a
 * projection site's frozen weight lives.  A new architecture is one
 * family file behind a family_ops plus its kernels.
 *
 * Shapes: B batch, T internal time (virtual positions included), Tr real
 * tokens, N = B*T, Nr = B*Tr, C = d_model, KV = Hkv*hd, V = vocab. */
#ifndef PEFTREF_CORE_MODEL_FAMILY_H
#define PEFTREF_CORE_MODEL_FAMILY_H

#include <stddef.h>
#include <stdint.h>
#include "peftref/model.h"
#include "model_internal.h"

#define TENSOR_NAME_LEN 64

/* ---- activation memory: a bump over one block -------------------------- */

typedef struct bump {
    float *base;   /* NULL while sizing */
    size_t off;
    int overflow;  /* set when the total would pass BUMP_MAX_FLOATS (off then stops growing) */
} bump;

/* The most floats one activation block may hold: its size in bytes fits
 * in ptrdiff_t with room for rounding.  Each view's n is a product of at
 * most a batch of rows (B*T < 2^31) and two bounded dimensions
 * (include/peftref/config.h), so it fits in 64 bits; the sum over layers
 * is what could wrap. */
#define BUMP_MAX_FLOATS ((size_t)PTRDIFF_MAX / sizeof(float) / 2)

/* n floats at a 64-byte aligned offset; NULL while sizing. */
float *bump_take(bump *b, size_t n);
/* bump_take(b, n) if cond, else NULL and nothing taken. */
float *bump_take_if(bump *b, int cond, size_t n);

/* ---- the family-operations table --------------------------------------- */

typedef struct family_ops {
    const char *name;      /* "GPT-2", in messages */
    const char *layer_prefix; /* of per-layer tensor names: "h.", "model.layers." */
    /* cfg is consistent (config.c); can this family run it? */
    int (*check_config)(const pr_model_config *c, pr_error *err);
    /* Base tensors of cfg: how many, then (build) the family's state in
     * m->fam and every base tensor through model_add_base_tensor, in
     * checkpoint order; sets m->wte, m->wpe (NULL without learned
     * positions) and m->head. */
    int (*count_tensors)(const pr_model_config *c);
    int (*build)(pr_model *m, pr_error *err);
    void (*destroy)(pr_model *m);
    /* Standard deviation of the random init of a weight or embedding. */
    float (*init_std)(const pr_model *m, const pr_tensor_info *t);
    /* The frozen weight a projection site (or attn.k, attn.v, ffn.act)
     * folds into; site and layer are checked, the site has a weight. */
    int (*site_weight)(pr_model *m, int site, int layer, model_weight_view *v, pr_error *err);
    /* Views of the family's activations and backward scratch for B
     * sequences of T internal positions (sized once, then assigned). */
    void (*layout)(pr_model *m, bump *b, int B, int T);
    /* out (N,C) = final norm of x (N,C); backward accumulates into dx. */
    void (*final_norm_forward)(pr_model *m, const float *x, float *out);
    void (*final_norm_backward)(pr_model *m, float *dx, const float *dout, const float *x);
    /* Block l from its input x (N,C) to *out (N,C), running the hooks of
     * every site inside the block (block_out is the frame's).  Backward:
     * m->dres holds dLoss/d(block output) on entry and dLoss/dx on return. */
    int (*block_forward)(pr_model *m, int l, const float *x, const float **out, pr_error *err);
    int (*block_backward)(pr_model *m, int l, const float *x, pr_error *err);
    /* Incremental decoding (NULL without a cached path): plan the
     * key/value cache for ctx positions, and free it.  While m->decode_pos
     * >= 0, block_forward runs B = 1 sequence of T new positions starting
     * at m->decode_pos, attending to the cached ones, and caches its own. */
    int (*decode_reserve)(pr_model *m, int ctx, pr_error *err);
    void (*decode_free)(pr_model *m);
} family_ops;

/* The table for cfg->family, or NULL for a family with no implementation. */
const family_ops *family_find(int family);

extern const family_ops family_gpt2;
extern const family_ops family_llama;

/* ---- the frame's state --------------------------------------------------- */

typedef struct hook_list {
    pr_site_hook *h;
    int n, cap;
} hook_list;

/* Concatenation providers of one site instance, in attach order. */
typedef struct concat_list {
    pr_concat_provider *p;
    int n, cap;
    int total;                   /* positions they prepend together */
} concat_list;

typedef struct mapping {
    void *addr;
    size_t len;
} mapping;

/* What the frame keeps per block. */
typedef struct layer_frame {
    const float *in;             /* (N,C) block input of the last forward */
    const float *pre, *out;      /* (N,C) block output entering and leaving block_out */
    float *bout;                 /* (N,C) block_out output, only with hooks there */
    float *pk, *pv;              /* (Hkv,P,hd) prefix keys/values, only with P > 0 */
    float *xin;                  /* (N,C) the block input kept for its rerun, only with
                                    recompute and l > 0 (layer 0 reads the embedding's) */
    int P;                       /* prefix columns of the last forward */
} layer_frame;

struct pr_model {
    pr_model_config cfg;
    const family_ops *ops;
    void *fam;                   /* the family's state (its tensors per layer, activations) */
    model_modules modules;       /* attached modules (core/module/ fills the list) */

    int n_base;                  /* base tensors, first in the table */
    pr_tensor_info *tensors;     /* (n_base) */
    char *names;                 /* n_base * TENSOR_NAME_LEN */
    pr_tensor_info **tab;        /* (n_tensors) the table: base, then added ones */
    int n_tensors, tab_cap;
    float *storage;              /* owned block for tensors not set elsewhere (anonymous mmap) */
    size_t storage_floats;
    struct model_lowp *lowp;     /* bf16 copies of frozen weights (precision.c), NULL in f32 */
    mapping *maps;
    int n_maps;
    pr_tensor_info *wte, *wpe;   /* token table (V,C); learned positions (max_seq,C) or NULL */
    pr_tensor_info *head;        /* wte when tied, else the LM head (V,C) */

    float *grads;                /* flat gradients of trainable tensors */
    size_t n_grads;

    hook_list *hooks;            /* (L+1) * PR_SITE_COUNT; slot 0.. is layer -1 */
    concat_list *concat;         /* same slots; used at embed, attn.k, attn.v */
    int training;                /* handed to hooks as pr_site_io.training */
    /* set by the frame for the lowest block it differentiates when nothing
     * below it needs a gradient: the block need not make its input gradient
     * (its first norm's, and the base products' dX into it) */
    int bwd_no_input_grad;

    /* activations, planned for up to resB sequences of resT real tokens
     * and resTi internal positions (resTi >= resT + virtual positions) */
    int resB, resT, resTi;
    /* activation recomputation (pr_model_set_recompute): the blocks share
     * one activation area and the backward reruns each block's forward
     * from its kept input before differentiating it */
    int recompute;
    int area_layer;              /* the block whose activations the shared area holds, -1 none */
    float *act_block;
    size_t act_bytes;            /* of act_block */
    int *tok_block;              /* tokens and targets (resB*resT each) */
    float *vrows, *dvrows;       /* (nv,C) virtual vectors, their batch-summed gradient */
    float *prow;                 /* (Pmax,KV) prefix rows as providers write/read them */
    float *dpk, *dpv;            /* (Hkv,Pmax,hd) prefix gradients of one layer */
    float *encoded, *embed_y;    /* (N,C) */
    layer_frame *lf;             /* (L) */
    float *lnf;                  /* (N,C) final norm output */
    float *hid, *dhid;           /* (Nr,C) real rows of lnf and their gradient, only with nv > 0 */
    int hidden_only;             /* last forward stopped at the final norm */
    /* The head and cross-entropy (passes.c).  Chunked (the default): the
     * loss runs over ce_rows rows at a time in ce_logits and ce_probs
     * (ce_rows,V) and the backward recomputes each chunk's logits, so no
     * (Nr,V) buffer exists unless a caller asks for the logits; logits is
     * then a separate (resB*resT,V) allocation made on that request.
     * Full (PEFTREF_CE_FULL=1 when the activations are planned): logits,
     * probs and dlogits are (Nr,V) views of the activation block. */
    int ce_full, ce_rows;
    float *ce_logits, *ce_probs; /* (ce_rows,V), chunked only */
    /* (Nr,C), chunked only: with a frozen head in training, the forward
     * leaves here dLoss/dh for the sum of the scored losses (scale 1), so
     * the backward scales it instead of recomputing the logits */
    float *ce_dh;
    int ce_dh_ready;
    float *logits, *probs;       /* (Nr,V); probs full only */
    float *logits_own;           /* chunked: the allocation logits points to, or NULL */
    int logits_ready;            /* logits hold the last forward's */
    float *losses;               /* (Nr) */
    /* backward scratch every family uses */
    float *dres, *dtmp;          /* (N,C) residual-stream gradient, ping-pong */
    float *dstream;              /* (N,C) dy of sub-layer site hooks */
    float *dln;                  /* (N,C) gradient of a norm output */
    float *dlogits;              /* (Nr,V), full only */

    /* the last forward: T internal positions = nv virtual + Tr real */
    int B, T, Tr, nv;
    int have_fwd, have_targets;
    /* incremental decoding: cache capacity (0 = none), positions cached,
     * and the first position of the forward in flight (-1 outside one) */
    int decode_ctx, decode_len, decode_pos;
    int embed_live;              /* the embed site's hooks are running (their rows' token ids are served) */
    int64_t scored;
    int *tokens, *targets;
};

/* ---- tensor table (tensors.c) -------------------------------------------- */

/* Append base tensor `name` (copied) of shape (s0) or (s0, s1). */
pr_tensor_info *model_add_base_tensor(pr_model *m, int kind, int layer, int ndim, int64_t s0, int64_t s1,
                                      const char *name);
void model_free_added_tensors(pr_model *m);
/* Base tensor "<layer_prefix><l>.<suffix>" of layer l, the family's
 * layer_prefix ("h." + "3" + "." + "attn.c_attn.weight"). */
pr_tensor_info *model_add_layer_tensor(pr_model *m, int kind, int l, int ndim, int64_t s0, int64_t s1,
                                       const char *suffix);
/* t->workspace = ws; t may be NULL (a tensor the config leaves out). */
void model_set_workspace(pr_tensor_info *t, uint32_t ws);
/* Exact name, or a base name with Hugging Face's "transformer." prefix. */
pr_tensor_info *model_find_tensor(const pr_model *m, const char *name);

/* ---- sites and hooks (hooks.c) ------------------------------------------- */

int model_has_hooks(const pr_model *m, int site, int layer);
int model_any_layer_has_hooks(const pr_model *m, int site);
/* Prefix a callback's message with what failed and where. */
int model_site_failed(int rc, const char *what, int site, int layer, pr_error *err);
int model_check_site_layer(const pr_model *m, int site, int layer, const char *fn, pr_error *err);
int model_reserve_all_hooks(const pr_model *m, pr_error *err);

/* dst (rows, cols; stride ldd) = src (rows, cols; stride lds) */
void model_copy_rows(float *dst, int ldd, const float *src, int lds, int rows, int cols);
/* dst (rows, cols; stride ldd) += src (rows, cols; stride lds) */
void model_add_rows(float *dst, int ldd, const float *src, int lds, int rows, int cols);

/* Projection site: y (rows, y_dim; y_ld) was just computed from x. */
int model_proj_forward(pr_model *m, int site, int layer, const float *x, int x_dim, float *y, int y_dim, int y_ld,
                       pr_error *err);
int model_proj_backward(pr_model *m, int site, int layer, const float *x, int x_dim, float *dx, float *y, int y_dim,
                        int y_ld, float *dy, pr_error *err);
/* Stream site: without hooks *out = x; with hooks ybuf (rows, dim) gets a
 * copy of x that the hooks change. */
int model_stream_forward(pr_model *m, int site, int layer, const float *x, int x_ld, float *ybuf, int dim,
                         const float **out, int *out_ld, pr_error *err);
/* dy (rows, dim) of the state leaving; dx (rows, dim; x_ld) accumulates
 * that of the state entering, identity path included. */
int model_stream_backward(pr_model *m, int site, int layer, const float *x, int x_ld, float *dx, float *y,
                          float *dy, int dim, pr_error *err);
/* Sub-layer site (attn_out, ffn_out): y0 the sub-layer output before the
 * residual add, x the sub-layer input. */
int model_sublayer_forward(pr_model *m, int site, int layer, const float *x, const float *y0, float *ybuf, int dim,
                           const float **out, pr_error *err);
int model_sublayer_backward(pr_model *m, int site, int layer, const float *x, float *dx, float *y, float *dy,
                            float *dy0, int dim, pr_error *err);

/* ---- concatenation (concat.c) -------------------------------------------- */

/* Prefix columns layer l's attention must hold room for, and the most of any layer. */
int model_prefix_room(const pr_model *m, int l);
int model_max_prefix_room(const pr_model *m);
/* The position of a sequence's first token: the prefix length P with
 * prefix keys and values (positions P .. P+T-1, after them, as Hugging
 * Face places tokens after a past_key_values cache), else 0. */
int model_position_offset(const pr_model *m);
/* The k and v providers of every layer agree on their prefix length. */
int model_check_prefixes(const pr_model *m, pr_error *err);
/* Prefix keys and values of layer l into m->lf[l].pk, .pv; sets .P. */
int model_prefix_forward(pr_model *m, int l, pr_error *err);
/* m->dpk, m->dpv (Hkv,P,hd) hold the prefix gradients of layer l. */
int model_prefix_backward(pr_model *m, int l, pr_error *err);
/* out (total, width) from the providers at (site, layer), attach order;
 * backward hands them dout (total, width). */
int model_concat_forward(const pr_model *m, int site, int layer, float *out, int width, pr_error *err);
int model_concat_backward(const pr_model *m, int site, int layer, const float *dout, int width, pr_error *err);

/* ---- activation memory (activations.c) ----------------------------------- */

int model_plan_activations(pr_model *m, int B, int Tr, int Ti, pr_error *err);
/* How a family lays out its blocks' activations: areas (the first
 * model_act_areas of them, then every layer's view is area 0's with
 * recompute) and, for area l, whether a stream site's buffer is needed
 * and how many prefix columns attention holds.  Without recompute each
 * layer has its own area, sized for that layer; with it the one area
 * serves every layer, so it is sized for the largest. */
int model_act_areas(const pr_model *m);
int model_act_has_hooks(const pr_model *m, int site, int l);
int model_act_prefix_room(const pr_model *m, int l);

/* ---- precision (precision.c) -------------------------------------------- */

typedef struct model_lowp model_lowp;
/* The bf16 copy of base tensor t, or NULL (f32 model, or t stays f32). */
const uint16_t *model_tensor_bf16(const pr_model *m, const pr_tensor_info *t);
void model_lowp_free(pr_model *m);
/* The frozen products: matmul_forward/backward (kernels.h) of weight
 * tensor w, on oneDNN in bf16 when w has a bf16 copy, else on OpenBLAS
 * exactly as matmul_forward/backward.  A bf16 weight has no gradient. */
int model_matmul_forward(pr_model *m, float *out, int ldo, const float *inp, int ldi, const pr_tensor_info *w,
                         int w_in_out, const float *b, int N, int C, int OC, pr_error *err);
int model_matmul_backward(pr_model *m, float *dinp, int lddi, float *dw, float *db, const float *dout, int lddo,
                          const float *inp, int ldi, const pr_tensor_info *w, int w_in_out, int N, int C, int OC,
                          pr_error *err);
/* encoder_forward from the token table, whatever its storage. */
void model_encoder_forward(const pr_model *m, float *out, const int *tokens, const float *wpe, int B, int T, int C);

/* ---- small helpers ------------------------------------------------------- */

static inline float *grad_of(const pr_tensor_info *t)
{
    return t ? t->grad : NULL;
}

static inline const float *data_of(const pr_tensor_info *t)
{
    return t ? t->data : NULL;
}

#endif
