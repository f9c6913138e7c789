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
 * Stability rules (the promise to plugin authors):
 *  - Every struct a plugin fills or reads starts with struct_size; fields
 *    are only ever appended.  The host reads only the fields a plugin's
 *    struct_size covers and treats missing ones as zero/NULL; a plugin must
 *    check ctx->struct_size before reading a field added after its build.
 *  - The host refuses a plugin whose abi_major differs from PR_ABI_MAJOR.
 *  - Enum values are never renumbered; new values are appended.
 *  - A plugin links against nothing of peftref: every service it needs
 *    (memory, errors, logging, RNG, GEMM and fused kernels, parallel-for)
 *    comes through the pr_host table it is handed in each call.
 *  - All parameter, gradient, optimizer and saved-activation memory belongs
 *    to the host.  A plugin keeps no state between calls except what it
 *    declared (parameters, saved buffers) and the scratch it is lent.
 *
 * Conventions: tensors are row-major f32 on the CPU today (dtype/device say
 * so explicitly, for bf16 and GPU later).  Site tensors are (rows, cols)
 * with a row stride; rows = B*T.  Backward callbacks ACCUMULATE (+=) into
 * every gradient they are given; a NULL gradient means "not needed". */
#ifndef PEFTREF_PLUGIN_H
#define PEFTREF_PLUGIN_H

#include <stddef.h>
#include <stdint.h>

#include "peftref/site_ids.h"

#ifdef __cplusplus
extern "C" {
#endif

#define PR_ABI_MAJOR 1
#define PR_ABI_MINOR 0

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
 * stride[0] is the row stride (>= shape[1]) and stride[1] is 1. */
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
    const char *name;     /* [a-z][a-z0-9_]*; usable in shape expressions if numeric */
    int32_t type;         /* pr_option_type */
    double def;           /* default for numeric, bool (0/1) and enum (index) */
    double min, max;      /* inclusive bounds for INT and FLOAT */
    const char *def_str;  /* default for STRING */
    const char *const *choices; /* NULL-terminated, for ENUM */
    const char *help;
    int32_t per_site;     /* may be overridden per site in a pipeline */
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
    PR_INIT_TEXT = 7,            /* embeddings of the tokens of option init_text, cycled */
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
    PR_PARAM_NO_DECAY = 1u << 0,      /* never weight-decayed */
    PR_PARAM_TRAINING_ONLY = 1u << 1, /* folded away by fold() at save time */
    PR_PARAM_FROZEN = 1u << 2         /* a buffer: saved, never trained */
};

/* shape: comma-separated integer expressions, e.g. "r, d_in".  Variables:
 * d_model, n_heads, n_kv_heads, d_head, d_ff, n_layers, vocab, d_in, d_out
 * (the site's widths), rows, B, T (saved buffers only), and the numeric
 * options by name.  Operators + - * / (integer division) % and
 * parentheses; functions min(a,b), max(a,b).  init_arg is a float
 * expression over the same names plus sqrt(). */
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
} pr_param_decl;

/* Activation memory kept from forward for backward (per insertion), or
 * scratch (lent per call, contents undefined on entry). */
typedef struct pr_buffer_decl {
    uint32_t struct_size;
    const char *name;
    const char *shape;       /* may use rows, B, T */
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
    int32_t family;          /* pr_family */
} pr_dims;

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
 *             tensors of fold_params[] to fill (prefix MLP -> prefixes). */
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
    const pr_option_value *options; /* in options[] order, resolved for this site */
    uint32_t n_options;
    pr_tensor *params;             /* in params[] order, this insertion's copies */
    pr_tensor *grads;              /* same order; data NULL when not trained */
    uint32_t n_params;
    pr_tensor *saved;              /* in saved[] order */
    uint32_t n_saved;
    pr_tensor *scratch;            /* in scratch[] order */
    uint32_t n_scratch;
    pr_tensor in, out, d_in, d_out;
    const pr_tensor *base_weight;  /* the frozen weight at a projection site, [d_in, d_out] view */
    const pr_tensor *base_bias;    /* (d_out) or NULL */
    pr_tensor *out_params;         /* fold: in fold_params[] order */
    uint32_t n_out_params;
    float scale;                   /* SCALED_ADD: the resolved scale */
    /* merge: the bias delta (d_out), when base_bias is non-NULL; the
     * host adds it like the weight delta and restores it on unmerge. */
    pr_tensor *bias_delta;
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

typedef const pr_plugin *(*pr_plugin_entry_fn)(void);

#ifdef __cplusplus
}
#endif
#endif
