/* peftref plugin ABI: how a PEFT technique describes itself to the host.
 *
 * A plugin is a shared object that exports one symbol, peftref_plugin_entry,
 * returning a pr_plugin: a list of technique descriptors (a technique pack
 * may carry several).  A descriptor is DATA the host reads, prints and
 * checks without running anything: identity, the nine PEFT-Ref typology
 * dimensions (Sabry & Belz 2023, arXiv 2304.12410), an options schema, the
 * sites it may attach to, its parameter declarations (shapes as expressions
 * over model dimensions and options), activation memory it keeps for
 * backward, and callbacks.
 *
 * ABI 1: what is stable (the promise to plugin authors).  A plugin built
 * against any 1.x header loads in every 1.y host, y >= x:
 *  - The entry: one exported symbol, PR_PLUGIN_ENTRY_NAME, of type
 *    pr_plugin_entry_fn.  It receives a pr_entry_args (the host's services,
 *    the plugin's bundle directory and an error buffer) and returns a
 *    pr_plugin or NULL (with a reason written into args->error).
 *  - Growth: every struct that crosses the boundary starts with
 *    struct_size, and fields are only ever appended.  The host reads only
 *    the fields a plugin's struct_size covers (zero/NULL past them) and
 *    walks a plugin's declaration arrays with the plugin's element size; a
 *    plugin must check ctx->struct_size / host->struct_size before reading
 *    a field added after the minor version it was built for (the comment
 *    of each field added after 1.0 says "since 1.N").
 *  - Tensors are never embedded by value in a struct the host passes
 *    (pr_ctx holds pointers to them), so pr_tensor can grow as well.
 *  - Enum values are never renumbered; new values are appended.  A host
 *    refuses a descriptor with a value it does not know.
 *  - abi_major: a host refuses a plugin whose abi_major differs from its
 *    PR_ABI_MAJOR.
 *  - Linking: a plugin links against nothing of peftref; every service
 *    (memory, errors, logging, RNG, GEMM and fused kernels, dropout, base
 *    weights in f32, parallel-for) comes through the pr_host table it is
 *    handed at entry and in every call.  This header declares no function
 *    a plugin could link against.
 *
 * Ownership and lifetimes of every pointer:
 *  - The descriptor (pr_plugin, pr_technique and everything they point
 *    to: strings, declaration arrays, callbacks) belongs to the plugin and
 *    must stay valid and unchanged until the library is unloaded; the host
 *    keeps copies of the structs but not of the strings.
 *  - pr_entry_args and its strings are valid only during the entry call;
 *    args->host stays valid until the library is unloaded.
 *  - pr_ctx, every pr_tensor it points to and the tensors' memory are
 *    valid only during the callback they are passed to.  Parameter,
 *    gradient, optimizer and saved-buffer memory belongs to the host (it
 *    checkpoints, averages, all-reduces and saves it); scratch is lent per
 *    call with undefined contents on entry.
 *  - host->alloc'd memory belongs to the plugin until it passes it to
 *    host->free; the host never frees it.  It is for the plugin's own
 *    bookkeeping (never for parameters) and must be released in teardown.
 *  - A plugin keeps no state between calls except what it declared
 *    (parameters, frozen buffers, saved buffers).
 *
 * Conventions: tensors are row-major f32 on the CPU (dtype/device say so
 * explicitly).  Site tensors are (rows, cols) with a row stride; rows =
 * B*T.  Backward callbacks ACCUMULATE (+=) into every gradient they are
 * given; a tensor whose data is NULL means "absent" / "not needed". */
#ifndef PEFTREF_PLUGIN_H
#define PEFTREF_PLUGIN_H

#include <stddef.h>
#include <stdint.h>

#include "peftref/site_ids.h"

#ifdef __cplusplus
extern "C" {
#endif

#define PR_ABI_MAJOR 1
#define PR_ABI_MINOR 1

/* The one exported symbol.  Declare it with PR_PLUGIN_EXPORT. */
#define PR_PLUGIN_ENTRY_NAME "peftref_plugin_entry"
#if defined(__GNUC__)
#define PR_PLUGIN_EXPORT __attribute__((visibility("default")))
#else
#define PR_PLUGIN_EXPORT
#endif

/* ---- tensors ----------------------------------------------------------- */

typedef enum pr_dtype {
    PR_DTYPE_F32 = 1,
    PR_DTYPE_F16 = 2,
    PR_DTYPE_BF16 = 3,
    PR_DTYPE_I8 = 4
} pr_dtype;

typedef enum pr_device {
    PR_DEVICE_CPU = 1,
    PR_DEVICE_GPU = 2
} pr_device;

/* A strided view.  ndim 1..4; stride in elements; for the 2-D site tensors
 * stride[0] is the row stride (>= shape[1]) and stride[1] is 1.  The host
 * passes tensors by pointer only, so later minors may append fields. */
typedef struct pr_tensor {
    uint32_t struct_size;
    int32_t dtype;      /* pr_dtype */
    int32_t device;     /* pr_device */
    int32_t ndim;
    int64_t shape[4];
    int64_t stride[4];
    void *data;         /* NULL for an absent tensor */
} pr_tensor;

/* ---- the PEFT-Ref typology (DESIGN.md §1) ------------------------------ */

typedef enum pr_intra {
    PR_INTRA_NONE = 1,        /* free vectors */
    PR_INTRA_DENSE = 2,
    PR_INTRA_FACTORISED = 3,  /* low-rank, Kronecker */
    PR_INTRA_ATTENTION = 4
} pr_intra;

typedef enum pr_inter {
    PR_INTER_FIXED = 1,
    PR_INTER_DYNAMIC = 2      /* reaches the model through attention weights */
} pr_inter;

typedef enum pr_adaptation {
    PR_ADAPT_ADDITION = 1,
    PR_ADAPT_REPARAMETERISATION = 2,
    PR_ADAPT_RESCALING = 3,
    PR_ADAPT_SELECTION = 4    /* trains existing base tensors */
} pr_adaptation;

typedef enum pr_sharing {
    PR_SHARE_NONE = 1,
    PR_SHARE_ACROSS_LAYERS = 2,
    PR_SHARE_ACROSS_SITES = 3
} pr_sharing;

/* Sharing as a set (pr_technique.sharing_set), for a technique that shares
 * across layers AND sites (VeRA's one pair of random matrices). */
#define PR_SHARE_BIT(s) (1u << (unsigned)(s))

typedef enum pr_input {
    PR_INPUT_HIDDEN = 1,      /* hidden states */
    PR_INPUT_EMBEDDINGS = 2,
    PR_INPUT_WEIGHTS = 3,     /* the frozen weights themselves */
    PR_INPUT_NONE = 4
} pr_input;

typedef enum pr_insertion {
    PR_INSERT_SEQUENTIAL = 1, /* module input: the site output y; y <- y (+) f(y) */
    PR_INSERT_PARALLEL = 2,   /* module input: the site input x;  y <- y (+) f(x) */
    PR_INSERT_CONCATENATIVE = 3, /* module output is prepended to a sequence */
    PR_INSERT_IN_PLACE = 4    /* selection: nothing inserted */
} pr_insertion;

/* Number of insertions, as a rule the host evaluates per model and
 * selection (the paper's 1, L, 2L, 3L ...). */
typedef enum pr_insertions {
    PR_INSERTIONS_ONCE = 1,            /* 1 */
    PR_INSERTIONS_PER_LAYER = 2,       /* L (chosen layers) */
    PR_INSERTIONS_PER_SITE_LAYER = 3,  /* (chosen sites) x (chosen layers) */
    PR_INSERTIONS_NONE = 4             /* selection techniques */
} pr_insertions;

typedef enum pr_integration {
    PR_INTEGRATE_CONCAT = 1,        /* to the input sequence, or to K and V */
    PR_INTEGRATE_DIRECT_ADD = 2,    /* y + h */
    PR_INTEGRATE_SCALED_ADD = 3,    /* y + s*h, s from scale_expr or scale() */
    PR_INTEGRATE_GATED_ADD = 4,     /* y + sigmoid(g)*h, g a host-owned learned gate */
    PR_INTEGRATE_RESCALE = 5,       /* y * h, h one row of d_out broadcast over rows */
    PR_INTEGRATE_WEIGHT_DELTA = 6,  /* y + x.dW, dW from merge() (reparameterisation) */
    PR_INTEGRATE_CUSTOM = 7,        /* the technique's integrate_forward/backward */
    PR_INTEGRATE_SELECT = 8         /* selection: base tensors become trainable */
} pr_integration;

typedef enum pr_workspace {
    PR_WS_EMBEDDING = 1u << 0,
    PR_WS_ATTENTION = 1u << 1,
    PR_WS_FFN = 1u << 2,
    PR_WS_NORM = 1u << 3,
    PR_WS_HEAD = 1u << 4
} pr_workspace;


/* ---- options ----------------------------------------------------------- */

typedef enum pr_option_type {
    PR_OPT_INT = 1,
    PR_OPT_FLOAT = 2,
    PR_OPT_BOOL = 3,
    PR_OPT_ENUM = 4,      /* one of choices[]; value.num is the index */
    PR_OPT_STRING = 5
} pr_option_type;

typedef struct pr_option_decl {
    uint32_t struct_size;
    const char *name;     /* [a-z][a-z0-9_]*; usable in shape expressions unless a string */
    int32_t type;         /* pr_option_type */
    double def;           /* default for numeric, bool (0/1) and enum (index) */
    double min, max;      /* inclusive bounds for INT and FLOAT */
    const char *def_str;  /* default for STRING */
    const char *const *choices; /* NULL-terminated, for ENUM */
    const char *help;
    int32_t per_site;     /* may be overridden per site in a pipeline */
    /* The option's name in Hugging Face PEFT's config (LoRA's alpha is
     * "lora_alpha"), or NULL: a pipeline that uses it is pointed here. */
    const char *peft_name;
} pr_option_decl;

typedef struct pr_option_value {
    double num;           /* INT, FLOAT, BOOL, ENUM index */
    const char *str;      /* STRING (and ENUM's choice name) */
} pr_option_value;

/* ---- parameters and saved buffers -------------------------------------- */

typedef enum pr_init {
    PR_INIT_ZEROS = 1,
    PR_INIT_ONES = 2,
    PR_INIT_NORMAL = 3,          /* normal(0, arg) */
    PR_INIT_UNIFORM = 4,         /* uniform(-arg, arg) */
    PR_INIT_KAIMING_UNIFORM = 5, /* uniform(-b, b), b = sqrt(6/((1+a^2) fan_in)), a = arg, fan_in = last dim */
    PR_INIT_EMBED_ROWS = 6,      /* rows of the token embedding, ids sampled from the vocabulary */
    PR_INIT_TEXT = 7,            /* embeddings of the tokens of the STRING option named by
                                  * init_source (the text), cycled */
    PR_INIT_CONSTANT = 8,        /* every element = arg */
    PR_INIT_CUSTOM = 9           /* the technique's init() callback */
} pr_init;

typedef enum pr_scope {
    PR_SCOPE_INSERTION = 1,      /* one copy per (site, layer) insertion */
    PR_SCOPE_LAYER = 2,          /* one copy per layer, shared by its sites */
    PR_SCOPE_SITE = 3,           /* one copy per site, shared across layers */
    PR_SCOPE_GLOBAL = 4          /* one copy for the whole module */
} pr_scope;

enum pr_param_flags {
    PR_PARAM_NO_DECAY = 1u << 0,      /* never weight-decayed (the optimizer honours it) */
    PR_PARAM_TRAINING_ONLY = 1u << 1, /* folded away by fold() at save time */
    PR_PARAM_FROZEN = 1u << 2,        /* a buffer: never trained */
    /* With FROZEN: not written into module files; a loaded module
     * regenerates it from its saved seed by the declared init (Hugging
     * Face PEFT's VeRA save_projection=False).  Without it a frozen
     * buffer is saved like a parameter. */
    PR_PARAM_REGENERATE = 1u << 3
};

/* How a parameter is laid out under its Hugging Face PEFT key. */
typedef enum pr_peft_layout {
    PR_PEFT_AS_IS = 1,          /* the same shape and order */
    PR_PEFT_TRANSPOSED = 2,     /* a 2-D parameter stored transposed */
    PR_PEFT_LAYERS_CONCAT = 3,  /* per-layer copies concatenated along the last axis,
                                 * one tensor for the whole module (prefix tuning's
                                 * [n_virtual, n_layers * 2 * d]) */
    /* A 1-D vector of one insertion, stored where its values fold (the
     * weight merge() is given as base_weight): {prefix} is that
     * projection's PEFT module path, and the tensor is the vector in the
     * projection's broadcast shape: (D_out, 1) when it scales the
     * projection's outputs, its elements at the site's rows of them (the
     * key and value slices of GPT-2's fused attn.c_attn, so attn.k and
     * attn.v share one tensor), or (1, D_in) when it scales the
     * projection's inputs (ffn.act at the down projection).  Elements no
     * copy covers hold the integration's identity: 1 for
     * PR_INTEGRATE_RESCALE, else 0.  ((IA)^3's ia3_l.) */
    PR_PEFT_FOLD_VECTOR = 4
} pr_peft_layout;

/* shape: comma-separated integer expressions, e.g. "r, d_in".  Variables:
 * d_model, n_heads, n_kv_heads, d_head, d_ff, n_layers, vocab, d_in, d_out
 * (the site's widths), max_d_in, max_d_out (the largest widths over the
 * module's chosen sites, for a tensor shared across sites), n_sites and
 * n_chosen_layers, rows, B, T and n_members (saved and scratch buffers
 * only; n_members: a composite's member count), and the numeric
 * options by name (a bool is 0 or 1, an enum its choice's index).
 * Operators + - * / (integer division) % and parentheses; functions
 * min(a,b), max(a,b).  Every dimension is >= 1, except that a
 * PR_PARAM_FROZEN parameter's may be 0: a buffer the module's options
 * leave out (hosts of ABI 1.0 refuse it), which holds no element and is
 * neither counted nor saved.  init_arg is a float expression over the
 * same names plus sqrt(). */
typedef struct pr_param_decl {
    uint32_t struct_size;
    const char *name;        /* unique in the technique; Hugging Face PEFT's name where one exists */
    const char *shape;
    int32_t init;            /* pr_init */
    const char *init_arg;    /* NULL = "0" */
    int32_t scope;           /* pr_scope */
    uint32_t flags;          /* pr_param_flags */
    const char *help;
    /* Name of an ENUM option whose choice selects this parameter's init
     * among the pr_init names ("zeros", "ones", "normal", "uniform",
     * "kaiming_uniform", "embed_rows", "text", "constant"), overriding
     * init; NULL = always init.  (Prompt tuning: random, vocabulary or
     * text initialisation.) */
    const char *init_option;
    /* PR_INIT_TEXT: the STRING option holding the text whose token
     * embeddings initialise the rows (prompt tuning's prompt_tuning_init_text). */
    const char *init_source;
    /* Learning-rate multiplier, a float expression over the option names
     * (LoRA+'s "loraplus_lr_ratio" on lora_B); NULL = 1. */
    const char *lr_scale;
    /* Hugging Face PEFT key of this tensor, a pattern over {prefix} (the
     * PEFT module path of the site, e.g. "base_model.model.transformer.h.3.
     * attn.c_attn"), {layer} and {embed} (the token embedding's module,
     * "base_model.model.model.embed_tokens"): e.g. "{prefix}.lora_A.weight"; NULL = PEFT
     * has no name for it.  With peft_layout; see pr_technique.peft_type.
     * The key says which copies have a name: with {prefix}, the copies of
     * a PR_SCOPE_INSERTION parameter at (site, layer) insertions whose
     * site has a PEFT module path; with {layer} only, the copies of a
     * PR_SCOPE_LAYER parameter; with neither, a PR_SCOPE_GLOBAL parameter
     * or (PR_PEFT_LAYERS_CONCAT) a PR_SCOPE_LAYER one of a module on every
     * layer.  A module is saved under PEFT names only when every copy
     * has one. */
    const char *peft_key;
    int32_t peft_layout;     /* pr_peft_layout; 0 = AS_IS */
} pr_param_decl;

/* Activation memory kept from forward for backward (per insertion), or
 * scratch (lent per call, contents undefined on entry). */
typedef struct pr_buffer_decl {
    uint32_t struct_size;
    const char *name;
    const char *shape;       /* may use rows, B, T, n_members */
} pr_buffer_decl;

/* Selection: base tensors a technique makes trainable (BitFit, LayerNorm
 * tuning, full finetuning), by kind and workspace, never by name. */
enum pr_base_kind {
    PR_BASE_WEIGHT = 1u << 0,     /* projection matrices */
    PR_BASE_BIAS = 1u << 1,       /* projection biases */
    PR_BASE_NORM_GAIN = 1u << 2,
    PR_BASE_NORM_BIAS = 1u << 3,
    PR_BASE_EMBEDDING = 1u << 4   /* token and position tables */
};

/* ---- model dimensions given to every call ------------------------------- */

typedef struct pr_dims {
    uint32_t struct_size;
    int32_t d_model, n_heads, n_kv_heads, d_head, d_ff, n_layers, vocab;
    int32_t d_in, d_out;     /* this site's input and output widths */
    int32_t family;          /* pr_family (1 GPT-2, 2 LLaMA) */
    int32_t max_d_in, max_d_out; /* over the module's chosen sites */
} pr_dims;

/* Storage orientation of a frozen projection weight (pr_ctx.base_layout).
 * GPT-2's Conv1D stores [d_in, d_out]; LLaMA's nn.Linear [d_out, d_in]. */
typedef enum pr_weight_layout {
    PR_WEIGHT_IN_OUT = 1,
    PR_WEIGHT_OUT_IN = 2
} pr_weight_layout;

/* ---- the host services table ------------------------------------------- */

struct pr_ctx;

typedef enum pr_log_level { PR_LOG_DEBUG = 0, PR_LOG_INFO = 1, PR_LOG_WARN = 2 } pr_log_level;

typedef struct pr_host {
    uint32_t struct_size;
    uint32_t abi_major, abi_minor;
    /* memory for the plugin's own bookkeeping (not parameters) */
    void *(*alloc)(size_t size);
    void (*free)(void *p);
    /* Report an error for the current call; returns the non-zero status to
     * return from the callback.  The host adds technique, site and layer. */
    int (*error)(const struct pr_ctx *ctx, const char *fmt, ...)
#if defined(__GNUC__)
        __attribute__((format(printf, 2, 3)))
#endif
        ;
    void (*log)(const struct pr_ctx *ctx, int level, const char *fmt, ...)
#if defined(__GNUC__)
        __attribute__((format(printf, 3, 4)))
#endif
        ;
    /* Deterministic random numbers from a 64-bit state the caller keeps
     * (seed it from ctx->seed). */
    uint64_t (*rng_next)(uint64_t *state);
    float (*rng_uniform)(uint64_t *state);  /* [0, 1) */
    float (*rng_normal)(uint64_t *state);
    /* C (M,N) = alpha * op(A) op(B) + beta * C, row-major, op = transpose
     * when trans_* is non-zero (BLAS sgemm). */
    void (*gemm)(int trans_a, int trans_b, int M, int N, int K, float alpha, const float *A, int lda,
                 const float *B, int ldb, float beta, float *C, int ldc);
    /* Fused elementwise ops on n floats. act: pr_activation. */
    void (*act_forward)(int act, float *out, const float *in, size_t n);
    void (*act_backward)(int act, float *din, const float *in, const float *dout, size_t n); /* din += */
    /* Row softmax of x (rows, cols) in place, and its backward:
     * dx += y * (dy - sum(dy*y)) per row. */
    void (*softmax_rows)(float *x, int rows, int cols);
    void (*softmax_rows_backward)(float *dx, const float *y, const float *dy, int rows, int cols);
    /* Run fn(arg, begin, end) over [0, n) split across the host's threads.
     * fn must not call gemm (the BLAS has its own threads). */
    void (*parallel_for)(int64_t n, void (*fn)(void *arg, int64_t begin, int64_t end), void *arg);

    /* Dropout, keyed so that a mask does not depend on how a batch is
     * split into micro-batches or processes: the bit of row r, column j is
     * drawn from (ctx->module_seed, ctx->step, ctx->sample_index[r / T],
     * r % T, site, layer, stream, j).  stream tells apart several masks of
     * one call.  mask holds rows x ceil(cols/32) 32-bit words (a saved
     * buffer of shape "rows, (cols + 31) / 32" floats holds it); bit set =
     * kept.  In eval (ctx->training 0) or with p = 0 every bit is set. */
    void (*dropout_mask)(const struct pr_ctx *ctx, uint32_t stream, float p, int cols, void *mask);
    /* out (rows, cols; ld_out) = in * kept / (1 - p).  out may be in. */
    void (*dropout_apply)(float *out, int ld_out, const float *in, int ld_in, const void *mask, int rows,
                          int cols, float p);
    /* d_in (rows, cols; ld) += d_out * kept / (1 - p). */
    void (*dropout_backward)(float *d_in, int ld_in, const float *d_out, int ld_out, const void *mask,
                             int rows, int cols, float p);
    /* sums (cols) += column sums of x (rows, cols; ld): a bias gradient. */
    void (*col_sums)(float *sums, const float *x, int ld, int rows, int cols);
    /* y (rows, cols; ld) += bias (cols) on every row. */
    void (*add_bias_rows)(float *y, int ld, const float *bias, int rows, int cols);
    /* dst (d_in x d_out, packed) = the call's frozen base weight in f32 and
     * IN_OUT orientation, whatever its storage dtype (bf16, f16) or layout.
     * Returns 0, or non-zero when the call has no base weight. */
    int (*base_weight_f32)(const struct pr_ctx *ctx, float *dst);
    /* An auxiliary loss term of this call (an orthogonality regulariser):
     * added to the reported training loss as "aux_loss".  Its gradient is
     * the plugin's to accumulate, in after_backward. */
    void (*add_aux_loss)(const struct pr_ctx *ctx, double value);
    /* An optional host interface by URI (LV2's extension_data), or NULL. */
    const void *(*extension_data)(const char *uri);
} pr_host;

typedef enum pr_activation {
    PR_ACT_IDENTITY = 0,
    PR_ACT_RELU = 1,
    PR_ACT_GELU = 2,     /* tanh approximation */
    PR_ACT_SILU = 3,
    PR_ACT_TANH = 4,
    PR_ACT_SIGMOID = 5
} pr_activation;

/* ---- the call context ---------------------------------------------------
 * One struct for every callback; fields unused by a callback are zero.
 *
 *  forward:   in (rows, d_in_module) -> out (out_rows, d_out_module)
 *             in is x (parallel) or y (sequential); out is the module
 *             output before the host integrates it (for RESCALE and for
 *             CONCAT, out has 1 and n_virtual rows respectively).
 *  backward:  d_out given; accumulate d_in (may be NULL) and grads.
 *  integrate_forward/backward (CUSTOM): in = x, out = y (read/write: the
 *             technique replaces y); backward: d_out = dy (read/write:
 *             replace it by the gradient w.r.t. the old y), d_in = dx
 *             (accumulate).
 *             For SCALED_ADD the host applies the scale: forward returns h
 *             without it, the host adds s*h, and backward receives
 *             d_out = s*dy.  GATED_ADD likewise applies sigmoid(g).
 *  merge:     out = the whole weight delta to add to the frozen weight,
 *             shaped like base_weight [d_in, d_out], scale included
 *             (ctx->scale holds s); the host adds it, keeping the original
 *             to restore on unmerge.  At a stream site, base_weight is the
 *             weight the site's values fold into: attn.k / attn.v the key /
 *             value projection (a rescaling folds into its columns and
 *             bias), ffn.act the down projection (folds into its rows).
 *  setup:     after the host initialised the parameters (e.g. DoRA's
 *             magnitude from base_weight's column norms).
 *  fold:      save time; params hold the training form, out_params the
 *             tensors of fold_params[] to fill (prefix MLP -> prefixes).
 *  after_backward: once per insertion after the model's backward of a
 *             micro-batch; grads hold this insertion's accumulated
 *             gradients (read, and add to them: AdaLoRA's importance
 *             scores, a regulariser's gradient).
 *  on_step:   once per insertion after each optimizer step (ctx->step is
 *             the number of steps taken); params are writable (a rank
 *             budget schedule masks them here).
 *  compose_forward/compose_backward (composite modules, pr_technique.
 *             composite; see there): the host ran the members' forward
 *             first (without integrating them) and hands
 *               members[i]  (rows, d_out) h_i, what member i would have
 *                           added to y on its own (its output times its
 *                           scale and gate), i in member order;
 *               in          (rows, d_in) x, the site input;
 *               site_y      (rows, d_out) y, the site output as the
 *                           composite receives it (before any member or
 *                           the composite adds to it), read-only;
 *               out         (rows, d_out, zeroed) the combined output h,
 *                           which the host integrates like any additive
 *                           module's (y += k*h, k the scale and gate).
 *             compose_backward gets members, in and site_y again (out
 *             only when the composite is gated: h as forward left it), and
 *               d_out       the gradient of h (k*dy, as for backward);
 *               d_members[i] (rows, d_out, zeroed; accumulate) the
 *                           gradient of h_i, which the host hands to
 *                           member i's backward (times its scale and gate);
 *               d_in        dx (accumulate; a host scratch when x needs none);
 *               d_site_y    (rows, d_out, zeroed; accumulate) the gradient
 *                           of site_y through the composite's own use of
 *                           it (a query read from y), added to dy with
 *                           the members' input gradients. */
typedef struct pr_ctx {
    uint32_t struct_size;
    const pr_host *host;
    const struct pr_technique *technique;
    const pr_dims *dims;
    int32_t site, layer;           /* pr_site; layer -1 for model-level sites */
    int32_t insertion;             /* index of this insertion in the module */
    int32_t B, T, rows;            /* rows = B*T (T counts real positions only) */
    int32_t training;              /* 1 in training (dropout on), 0 in eval */
    uint64_t seed;                 /* deterministic per (step, insertion, call) */
    uint64_t module_seed;          /* the module's seed mixed with the insertion; constant */
    int64_t step;                  /* optimizer steps taken before this call */
    const int64_t *sample_index;   /* B entries: the global index of each batch row's sample */
    const pr_option_value *options; /* in options[] order, resolved for this site */
    uint32_t n_options;
    pr_tensor *const *params;      /* in params[] order, this insertion's copies */
    pr_tensor *const *grads;       /* same order; data NULL when not trained */
    uint32_t n_params;
    pr_tensor *const *saved;       /* in saved[] order */
    uint32_t n_saved;
    pr_tensor *const *scratch;     /* in scratch[] order */
    uint32_t n_scratch;
    /* The site tensors: never NULL in the callbacks above; data NULL when
     * the callback has no such tensor. */
    const pr_tensor *in, *out, *d_in, *d_out;
    const pr_tensor *base_weight;  /* frozen weight at a projection site in base_layout, or NULL;
                                    * read it in f32 through host->base_weight_f32 */
    const pr_tensor *base_bias;    /* (d_out) or NULL */
    int32_t base_layout;           /* pr_weight_layout of base_weight */
    pr_tensor *const *out_params;  /* fold: in fold_params[] order */
    uint32_t n_out_params;
    float scale;                   /* SCALED_ADD: the resolved scale */
    /* merge: the bias delta (d_out), when base_bias is non-NULL; the
     * host adds it like the weight delta and restores it on unmerge. */
    const pr_tensor *bias_delta;
    /* composite modules: member outputs and their gradients */
    const pr_tensor *const *members;
    const pr_tensor *const *d_members;
    uint32_t n_members;
    /* composite modules (compose_forward/compose_backward): the site
     * output y as the composite receives it, and its gradient
     * (accumulate); see the call table above.  Part of 1.0, with
     * members. */
    const pr_tensor *site_y;
    const pr_tensor *d_site_y;
} pr_ctx;

typedef int (*pr_callback)(const pr_ctx *ctx);

/* ---- the technique descriptor ------------------------------------------ */

typedef struct pr_technique {
    uint32_t struct_size;
    uint32_t abi_major;            /* PR_ABI_MAJOR */
    /* identity */
    const char *name;              /* [a-z][a-z0-9_-]* */
    const char *version;           /* semantic version of the technique's code */
    const char *summary;
    const char *citation;
    const char *license;
    /* typology */
    int32_t intra, inter, adaptation, sharing, input, insertion, insertions, integration;
    uint32_t workspace;            /* pr_workspace bits */
    /* options */
    const pr_option_decl *options;
    uint32_t n_options;
    /* sites: PR_SITE_BIT masks; default_sites must be a subset of sites */
    uint32_t sites;
    uint32_t default_sites;
    /* parameters, saved activations, scratch */
    const pr_param_decl *params;
    uint32_t n_params;
    const pr_buffer_decl *saved;
    uint32_t n_saved;
    const pr_buffer_decl *scratch;
    uint32_t n_scratch;
    /* module widths at a site (expressions; NULL = "d_in" / "d_out" of the
     * site, i.e. the module maps its input to the site's output width) */
    const char *module_in;
    const char *module_out;
    /* CONCAT: virtual positions added (expression, e.g. "n_tokens") */
    const char *n_virtual;
    /* SCALED_ADD: scale as an expression ("alpha / r"), or the scale()
     * callback when it needs more (rsLoRA's alpha/sqrt(r) fits either). */
    const char *scale_expr;
    float (*scale)(const pr_ctx *ctx);
    /* SELECT: base tensors made trainable, by kind, in the workspaces of
     * `workspace` (PR_WS_* bits) */
    uint32_t select_kinds;
    /* trainable-parameter count as the technique's paper states it, for
     * the inspect page, e.g. "2 * r * (d_in + d_out) per adapted matrix" */
    const char *param_formula;
    /* callbacks (NULL where not applicable) */
    pr_callback forward;
    pr_callback backward;
    pr_callback integrate_forward;   /* CUSTOM */
    pr_callback integrate_backward;  /* CUSTOM */
    pr_callback merge;               /* mergeable techniques */
    pr_callback setup;
    pr_callback init;                /* PR_INIT_CUSTOM parameters */
    pr_callback fold;
    const pr_param_decl *fold_params; /* what fold() produces */
    uint32_t n_fold_params;
    void (*teardown)(const pr_ctx *ctx);
    /* sharing as a set of PR_SHARE_BIT(pr_sharing) values, when more than
     * `sharing` alone (VeRA: across layers and sites); 0 = { sharing } */
    uint32_t sharing_set;
    /* forward FLOP per token of one insertion, an expression over the
     * shape variables (VeRA: "2 * r * (d_in + d_out) + r + d_out"); NULL =
     * the host's rule (2 per element of every 2-D parameter). */
    const char *flops_per_token;
    pr_callback after_backward;
    pr_callback on_step;
    /* Composite: the technique combines the outputs of the other modules
     * attached at its sites (AdapterFusion, a mixture of LoRA experts),
     * through compose_forward/compose_backward; forward and backward are
     * unused (NULL).  Its integration is an addition (DIRECT_ADD,
     * SCALED_ADD or GATED_ADD): the host adds the combined output to y.
     * It attaches over n >= 2 members (pr_module_compose): frozen modules
     * of additive integration already attached at the same sites and
     * layers, listed in order; they leave the model's module list, their
     * own integration stops, and the composite owns them.  At each
     * insertion the host runs, in this order: the members' forward (each
     * on x, or on site_y when sequential), compose_forward, the
     * integration; in backward: compose_backward, each member's backward
     * with d_members[i], then dy += d_site_y and the sequential members'
     * input gradients.  Saved and scratch buffer shapes may use n_members.
     * A composite's own insertion form says what its output is added
     * after (sequential: it reads y); in is x either way. */
    int32_t composite;
    pr_callback compose_forward;
    pr_callback compose_backward;
    /* Hugging Face PEFT identity: its peft_type ("LORA", "IA3", ...), NULL
     * = PEFT has no such type.  Each parameter's peft_key names its tensor. */
    const char *peft_type;
    /* the technique's name for its plain form when fold() folds it into
     * another technique's parameters on save (prefix_tuning_mlp ->
     * "prefix_tuning"); NULL = saved as itself */
    const char *folds_to;
    /* An optional interface of the technique by URI, or NULL. */
    const void *(*extension_data)(const char *uri);
    /* Default sites on LLaMA-family models (separate q/k/v projections,
     * RoPE, SwiGLU), as Hugging Face PEFT's defaults for model_type llama
     * differ from GPT-2's: LoRA q_proj and v_proj where GPT-2 has c_attn,
     * (IA)^3 k_proj, v_proj and down_proj's input.  A subset of sites;
     * 0 = default_sites on every family.  Added in ABI 1.1: a host reads it
     * only when struct_size covers it, and an older host ignores it. */
    uint32_t default_sites_llama;
} pr_technique;

/* What the entry symbol returns. */
typedef struct pr_plugin {
    uint32_t struct_size;
    uint32_t abi_major;
    const char *name;                /* the pack's name */
    const char *version;
    uint32_t n_techniques;
    const pr_technique *const *techniques;
} pr_plugin;

/* What the entry is given. */
typedef struct pr_entry_args {
    uint32_t struct_size;
    uint32_t abi_major, abi_minor;  /* the host's */
    const pr_host *host;            /* valid until the library is unloaded */
    /* The directory the library was loaded from (a pack's directory for a
     * pack), for the plugin's own data files.  Valid during the call. */
    const char *bundle_path;
    /* Where to say why the plugin refuses to load, when it returns NULL. */
    char *error;
    size_t error_size;
} pr_entry_args;

typedef const pr_plugin *(*pr_plugin_entry_fn)(const pr_entry_args *args);

#ifdef __cplusplus
}
#endif
#endif
