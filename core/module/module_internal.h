/* peftref core: modules, i.e. techniques attached to a model; the
 * declarations the files of core/module/ share (none is public).
 *
 * Attaching a module (pr_module_attach) runs in stages, each of which can
 * fail with a message that names the module and the field:
 *   1. resolve: options (defaults, text values parsed by type, bounds,
 *      per-site overrides), sites, layers, the list of insertions (one per
 *      chosen site and layer; model-level sites once), every parameter's
 *      shape evaluated per insertion and grouped into copies by scope;
 *   2. allocate: one flat f32 block for all parameters of the module and
 *      one for the gradients of its trained ones; register each copy in
 *      the model's tensor table;
 *   3. initialise every copy deterministically from (spec seed, parameter
 *      name, copy index), then the setup() callback per insertion;
 *   4. integrate: a site hook (or a concatenation provider) per insertion
 *      that implements the technique's integration form, or, for
 *      selection, base tensors made trainable.
 * pr_module_plan_for runs stage 1 alone on a tensor table without
 * storage.
 *
 * Integration forms (plugin.h); h is the module output, k a coefficient:
 *   DIRECT_ADD  y += h           SCALED_ADD y += s*h (s from scale_expr
 *   GATED_ADD   y += sigmoid(g)*h              or scale())
 *     g is a host-owned scalar per insertion, registered as the trainable
 *     tensor "<...>.gate" and initialised to 0, so the module starts at
 *     half strength; it counts among the module's parameters.  Any
 *     other form gets the same gate with spec->gate (below).
 *   RESCALE     y *= h, h one row (1, d_out) broadcast over rows;
 *               backward dh = sum_rows(dy * y_old), dy_old = dy * h.
 *   WEIGHT_DELTA y += x . dW, dW (d_in, d_out) from merge() at every
 *               forward; backward hands backward() d_out = x^T dy, the
 *               gradient of merge()'s output, and adds dy . dW^T to dx.
 *   CUSTOM      integrate_forward/backward on x, y, dy, dx directly.
 *   CONCAT      a provider at embed, attn.k or attn.v: forward() fills the
 *               (n_virtual, d_out) rows, backward() receives their gradient.
 *   SELECT      no hook: base tensors of the chosen kinds and workspaces
 *               become trainable.
 * Module input: x for parallel insertion, the site output y (kept in a
 * host buffer) for sequential.  Backward of a sequential form: the
 * plugin accumulates J^T dy into a host buffer that is then added to dy;
 * of a parallel form: into dx (or a scratch when the site input needs no
 * gradient, so the parameters still get theirs).
 *
 * Composition.  Every insertion is a site hook (or a concatenation
 * provider), and the model runs the hooks of one site in attach order
 * (backward in reverse), so modules compose in the order they were
 * attached: a sequential module reads y as the modules before it left it
 * (they stack), a parallel one reads the site input x, which no hook
 * changes (parallel modules sum), and concatenations append their rows
 * in attach order.
 *
 * Gates (spec->gate; UniPELT, Mao et al. 2022, arXiv 2110.07577): with
 * s = sigmoid(g), g the insertion's host-owned scalar (starting at 0):
 *   DIRECT/SCALED_ADD  y += s*k*h (k = 1 or the scale)
 *   WEIGHT_DELTA       y += s * x.dW
 *   RESCALE            y *= 1 + s*(h - 1): s = 0 is the identity, s = 1
 *                      the plain rescaling
 *   CUSTOM             y <- y + s*(F(x, y) - y), F the technique's
 *                      integrate_forward
 *   CONCAT             the rows are s*P: prefix keys and values (or
 *                      prompt vectors) scaled by s, as UniPELT gates
 *                      prefix tuning
 * Merging a gated module folds s times its delta (not for RESCALE).
 *
 * Composite modules (pr_module_compose, pr_technique.composite;
 * composite.c): an additive module whose hook runs its members' forward()
 * and backward() itself (the members' own hooks are detached): the
 * members' contributions h_i feed compose_forward instead of y, and the
 * composite's output is integrated by its addition form; in backward
 * compose_backward's d_members[i] feed the members' backward.
 *
 * The model's tensor table and hooks do not know modules; the model holds
 * the list of modules attached to it (model_modules_of), module.c fills
 * it, and pr_model_free calls pr_model_detach_modules first so none
 * outlives its model. */
#ifndef PEFTREF_CORE_MODULE_INTERNAL_H
#define PEFTREF_CORE_MODULE_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

#include "peftref/module.h"
#include "expr.h"
#include "model_internal.h"

#define MAX_OPTIONS 64
#define MAX_VARS (16 + MAX_OPTIONS)
#define ALIGN_FLOATS 16
#define WHERE_LEN 48

/* The site tensor f of a host-built pr_ctx as an lvalue: pr_ctx points at
 * its tensors (ABI 1), and mod_ctx_init points them at storage the
 * insertion keeps for the call in progress. */
#define CT(c, f) (*(pr_tensor *)(uintptr_t)(c)->f)

/* ---- structures ------------------------------------------------------------ */

/* One allocated copy of a parameter (or the gate of one insertion). */
typedef struct param_copy {
    int decl;                /* index in params[], -1 for a gate */
    int key_layer, key_site; /* scope key; INT32_MIN / -1 when not part of the key */
    int ndim;
    int64_t shape[4];
    int64_t numel;
    int ordinal;             /* index among the copies of this decl */
    int first_ins;           /* first insertion that uses it */
    int trained;
    size_t off, goff;        /* offsets into the param and grad blocks */
    char *name;              /* tensor name in the model's table */
} param_copy;

typedef struct insertion {
    struct pr_module *mod;
    int index, site, layer;
    pr_dims dims;
    int w_in, w_out;           /* module input and output widths */
    int n_virtual;             /* CONCAT */
    float scale;
    const pr_option_value *opts;
    int *copy;                 /* n_params copy indices */
    int gate;                  /* copy index of the gate, or -1 */
    pr_tensor *params, *grads; /* n_params views each */
    pr_tensor *saved, *scratch;
    /* what pr_ctx points at: pointer arrays over the four view arrays
     * (one block: params, grads, saved, scratch) and the site tensors of
     * the call in progress (in, out, d_in, d_out) */
    pr_tensor **ptrs;
    pr_tensor site_t[4];
    pr_tensor bw, bb;          /* base weight / bias views at projection sites */
    int has_bw, has_bb;
    int bw_layout;             /* pr_weight_layout of bw (0: IN_OUT) */
    /* host buffers, planned by reserve */
    float *block;              /* saved buffers, y_old, h_keep */
    size_t block_floats;
    float *y_old;              /* (rows, d_out) sequential and rescale */
    float *h_keep;             /* gated (rows, w_out), rescale (1, w_out) */
    float *dw;                 /* WEIGHT_DELTA (d_in, d_out) */
    float *mh, *mdh;           /* composite: member outputs h_i and their gradients
                                * (n_members x rows x d_out each, in the block) */
    pr_tensor *cm_t;           /* composite: 2 n_members views (h_i, dh_i), site_y, d_site_y */
    const pr_tensor **cm_p;    /* composite: pointers to the 2 n_members views */
    int res_B, res_T;
    uint64_t n_fwd;            /* forwards so far: the step part of ctx->seed */
    /* merge */
    float *orig_w, *orig_b;
    char where[WHERE_LEN];     /* "h.3.q" / "embed" */
} insertion;

struct pr_module {
    pr_model *model;
    const pr_technique *tech_ptr;  /* the plugin's descriptor, handed to callbacks */
    pr_technique t;                /* the fields its struct_size covers, rest zero */
    pr_option_decl opt[MAX_OPTIONS];
    pr_param_decl *pd;
    pr_buffer_decl *sd, *xd;       /* saved, scratch */
    char *name;
    int trainable;
    uint64_t seed;
    uint32_t sites;
    int layers_all;
    int *layers;
    int n_layers;
    /* options: base (every site) and per site */
    pr_option_value base_opts[MAX_OPTIONS];
    pr_option_value *site_opts;    /* PR_SITE_COUNT x n_options */
    char **strs;
    int n_strs;
    /* insertions and parameter copies */
    insertion *ins;
    int n_ins;
    param_copy *copies;
    int n_copies, cap_copies;
    float *params, *grads;
    size_t n_param_floats, n_grad_floats;
    int64_t param_count, trainable_count;
    /* shared scratch */
    float *scratch;
    size_t scratch_cap;
    /* selection */
    char **selected;
    int n_selected;
    int64_t base_selected;
    int merged;
    int hooks_attached;
    /* composition */
    int gated;                     /* a gate per insertion (spec->gate or GATED_ADD) */
    struct pr_module **members;    /* a composite module's members, in order */
    int n_members;
    struct pr_module *composed_by; /* the composite module this one is a member of */
};

/* ---- integration forms (integrate.c) ------------------------------------------------ */

/* What reserve plans for one insertion and `rows` positions, in floats
 * (each rounded up): host temporary A (module output, scaled dy, dh, the
 * gradient of dW), y_old (the site output as it entered the hook) and
 * what a gate's gradient keeps (h, the rows, or F - y_old). */
typedef struct form_need {
    size_t area_a, y_old, keep;
} form_need;

/* One integration form: mod_forms[pr_integration]. */
typedef struct integration_form {
    const char *name;            /* as messages say it: "addition", "rescaling", ... */
    int additive;                /* y += k*h: what a composite combines, and is */
    int scaled;                  /* k includes the insertion's scale */
    int gated;                   /* gated always (GATED_ADD), not only with spec->gate */
    int fixed_in, fixed_out;     /* module_in / module_out must be the site's widths */
    int merges_gated;            /* merging a gated module folds s times its delta */
    /* the site hook's part; dx is io->dx or a zeroed area B */
    int (*forward)(insertion *in, const pr_site_io *io, pr_ctx *c, float *area_a, pr_error *err);
    int (*backward)(insertion *in, const pr_site_io *io, pr_ctx *c, float *dx, int dx_ld, float *area_a,
                    float *area_b, pr_error *err);
    void (*reserve)(const insertion *in, size_t rows, form_need *need);
    /* host memory an insertion keeps from attach to free; alloc -1: out of memory */
    int (*alloc)(insertion *in);
    void (*release)(insertion *in);
    /* the insertion's hook or provider into the model; NULL for selection */
    int (*install)(insertion *in, pr_error *err);
} integration_form;

extern const integration_form mod_forms[PR_INTEGRATE_SELECT + 1];
/* The module's row (an empty one for an unknown form; mod_resolve rejects those). */
const integration_form *mod_form(const pr_module *mod);

/* ---- the model's list of modules (module.c; model_modules_of, model_internal.h) --- */

/* Append mod to m's list; -1 when out of memory. */
int mod_list_add(pr_model *m, pr_module *mod);
/* Take mod out of m's list (no-op when it is not there). */
void mod_list_remove(pr_model *m, const pr_module *mod);

const char *mod_name(const pr_module *mod);

/* concat.c */
int mod_concat_forward(void *self, int site, int layer, float *out, pr_error *err);
int mod_concat_backward(void *self, int site, int layer, const float *dout, pr_error *err);
void mod_concat_reserve(const insertion *in, size_t rows, form_need *need);
int mod_concat_install(insertion *in, pr_error *err);

/* integrate.c */
float mod_add_coefficient(const insertion *in);
int mod_hook_forward(void *self, const pr_site_io *io, pr_error *err);
int mod_hook_backward(void *self, const pr_site_io *io, pr_error *err);

/* init.c */
int mod_init_params(pr_module *mod, const pr_module_spec *spec, pr_error *err);

/* plan.c */
int mod_model_vars(const pr_module *mod, const pr_dims *d, const pr_option_value *opts, expr_var *v);
int64_t mod_shape_numel(const int64_t *dims, int ndim);
int mod_count_bits(uint32_t x);
int mod_option_index(const pr_module *mod, const char *name);
int mod_is_concat(const pr_module *mod);
int mod_is_select(const pr_module *mod);
/* Base tensors a selection module makes trainable (select.c). */
int mod_resolve_selection(pr_module *mod, const pr_model *m, pr_error *err);
char *mod_copy_name(const pr_module *mod, const char *param, int scope, int site, int layer);
int mod_resolve(const pr_model *m, const pr_module_spec *spec, pr_module **out, pr_error *err);

/* module.c */
size_t mod_round_up(size_t n);
float *mod_alloc_floats(size_t n);
char *mod_dup_str(const char *s);
pr_tensor mod_view(float *data, int ndim, const int64_t *shape);
pr_tensor mod_view2(const float *data, int64_t rows, int64_t cols, int64_t ld);
void mod_axpy_rows(float *dst, int ldd, const float *src, int lds, int rows, int cols, float a);
void mod_copy_rows(float *dst, int ldd, const float *src, int lds, int rows, int cols);
void mod_read_elem(void *dst, size_t host_size, const void *base, uint32_t i);
int mod_grow_scratch(pr_module *mod, size_t need, const char *kind, pr_error *err);
void mod_free(pr_module *mod);

/* composite.c */
/* The per-insertion views of a composite's members; -1: out of memory. */
int mod_composite_alloc(pr_module *mod);
/* Floats of the insertion's block for member outputs and their gradients. */
size_t mod_composite_floats(const insertion *in, size_t rows);
/* Reserve the members' insertions that this composite insertion runs. */
int mod_composite_reserve(insertion *in, int B, int T, pr_error *err);
/* The composite's part of add_forward / add_backward: run the members,
 * then compose_forward into c->out; compose_backward (c->d_out given,
 * d_site_y the zeroed area site_dy), then the members' backward (input
 * gradients into dx, or site_dy for sequential members). */
int mod_composite_forward(insertion *in, const pr_site_io *io, pr_ctx *c, pr_error *err);
int mod_composite_backward(insertion *in, const pr_site_io *io, pr_ctx *c, float *dx, int dx_ld, float *site_dy,
                           pr_error *err);

/* call.c */
int mod_call(const pr_module *mod, const insertion *in, pr_callback cb, const char *what, const pr_ctx *c,
    pr_error *err);
void mod_ctx_init(const insertion *in, pr_ctx *c, int B, int T, int training, uint64_t step);
/* The counter (mod_ctx_init's step) of a forward call at in: the next
 * one, or while the model reruns a block forward for its backward
 * (recompute) the last one again, so the rerun sees the context the first
 * forward saw and the backward after it finds the counter where one
 * forward leaves it. */
uint64_t mod_forward_call(insertion *in);
int mod_lend_scratch(insertion *in, pr_error *err);
/* training.c */
const int64_t *mod_samples(const pr_model *m);
void mod_add_aux_loss(const pr_model *m, double value);
int mod_prepare_views(insertion *in, int B, int T, float **area_a, float **area_b, pr_error *err);
int mod_reserve_insertion(insertion *in, int B, int T, pr_error *err);
int mod_hook_reserve(void *self, int B, int T, pr_error *err);

/* attach.c */
void mod_undo_selection(pr_module *mod);
void mod_reattach_others(pr_model *m, const pr_module *except);
void mod_prefix_of(const pr_module *mod, char *buf, size_t len);
int mod_attach_impl(pr_model *m, const pr_module_spec *spec, pr_module *const *members, int n_members, pr_module **out,
    pr_error *err);

/* compose.c */
float mod_gate_value(const insertion *in);
float *mod_gate_grad(const insertion *in);

#endif
