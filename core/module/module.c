/* peftref core: modules, i.e. techniques attached to a model.
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
 * Fusion (pr_module_fuse; AdapterFusion, Pfeiffer et al. 2021, arXiv
 * 2005.00247): a module whose hooks run its fused modules' forward()
 * calls themselves (the fused modules' own hooks are detached) and add
 * the attention-weighted sum of their contributions; see fusion_forward.
 *
 * The model's tensor table and hooks do not know modules: this file
 * keeps, per model, the list of modules attached to it, and
 * pr_model_free calls pr_model_detach_modules first so none outlives its
 * model. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "peftref/module.h"
#include "expr.h"
#include "host.h"
#include "names.h"
#include "model_internal.h"
#include "safetensors.h"

#define MAX_OPTIONS 64
#define MAX_VARS (16 + MAX_OPTIONS)
#define ALIGN_FLOATS 16
#define WHERE_LEN 48

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
    pr_tensor bw, bb;          /* base weight / bias views at projection sites */
    int has_bw, has_bb;
    /* host buffers, planned by reserve */
    float *block;              /* saved buffers, y_old, h_keep */
    size_t block_floats;
    float *y_old;              /* (rows, d_out) sequential and rescale */
    float *h_keep;             /* gated (rows, w_out), rescale (1, w_out) */
    float *dw;                 /* WEIGHT_DELTA (d_in, d_out) */
    float *fu;                 /* fusion: yq, H, Q, K, V, A (fusion_forward) */
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
    struct pr_module **kids;       /* a fusion module's fused modules */
    int n_kids;
    struct pr_module *fused_by;    /* the fusion module this one belongs to */
};

/* ---- small helpers --------------------------------------------------------- */

static size_t round_up(size_t n)
{
    return (n + ALIGN_FLOATS - 1) / ALIGN_FLOATS * ALIGN_FLOATS;
}

static float *alloc_floats(size_t n)
{
    void *p = NULL;
    if (posix_memalign(&p, 64, (n ? n : 1) * sizeof(float)) != 0)
        return NULL;
    memset(p, 0, (n ? n : 1) * sizeof(float));
    return p;
}

static char *dup_str(const char *s)
{
    size_t n = strlen(s) + 1;
    char *d = malloc(n);
    if (d)
        memcpy(d, s, n);
    return d;
}

static pr_tensor view(float *data, int ndim, const int64_t *shape)
{
    pr_tensor v;
    memset(&v, 0, sizeof v);
    v.struct_size = sizeof v;
    v.dtype = PR_DTYPE_F32;
    v.device = PR_DEVICE_CPU;
    v.ndim = ndim;
    int64_t st = 1;
    for (int d = ndim - 1; d >= 0; d--) {
        v.shape[d] = shape[d];
        v.stride[d] = st;
        st *= shape[d];
    }
    v.data = data;
    return v;
}

/* (rows, cols) with row stride ld */
static pr_tensor view2(const float *data, int64_t rows, int64_t cols, int64_t ld)
{
    int64_t shape[2] = { rows, cols };
    pr_tensor v = view((float *)data, 2, shape);
    v.stride[0] = ld;
    return v;
}

/* dst (rows, cols; ldd) += a * src (rows, cols; lds) */
static void axpy_rows(float *dst, int ldd, const float *src, int lds, int rows, int cols, float a)
{
    for (int r = 0; r < rows; r++) {
        float *d = dst + (size_t)r * ldd;
        const float *s = src + (size_t)r * lds;
        for (int j = 0; j < cols; j++)
            d[j] += a * s[j];
    }
}

static void copy_rows(float *dst, int ldd, const float *src, int lds, int rows, int cols)
{
    for (int r = 0; r < rows; r++)
        memcpy(dst + (size_t)r * ldd, src + (size_t)r * lds, (size_t)cols * sizeof(float));
}

static float sigmoid(float g)
{
    return 1.0f / (1.0f + expf(-g));
}

/* The fields of element i of a plugin array whose elements are
 * first->struct_size bytes apart, copied into a zeroed host struct. */
static void read_elem(void *dst, size_t host_size, const void *base, uint32_t i)
{
    memset(dst, 0, host_size);
    if (!base)
        return;
    uint32_t stride = *(const uint32_t *)base;
    if (stride == 0)
        stride = (uint32_t)host_size;
    const char *src = (const char *)base + (size_t)i * stride;
    uint32_t own = *(const uint32_t *)src;
    size_t n = own < host_size ? own : host_size;
    memcpy(dst, src, n);
}

static const char *mod_name(const pr_module *mod)
{
    return mod->name ? mod->name : (mod->t.name ? mod->t.name : "?");
}

/* Make the module's shared scratch area hold at least need floats (never
 * shrinks; called from reserve, not inside a step). */
static int grow_scratch(pr_module *mod, size_t need, const char *kind, pr_error *err)
{
    if (need <= mod->scratch_cap)
        return PR_OK;
    float *s = alloc_floats(need);
    if (!s)
        return pr_errorf(err, PR_ERR_NOMEM, "%s '%s': out of memory for %zu floats of scratch", kind,
                         mod_name(mod), need);
    free(mod->scratch);
    mod->scratch = s;
    mod->scratch_cap = need;
    return PR_OK;
}


static void where_of(int site, int layer, char *buf, size_t len)
{
    if (layer >= 0)
        snprintf(buf, len, "h.%d.%s", layer, pr_site_name(site));
    else
        snprintf(buf, len, "%s", pr_site_name(site));
}

/* ---- the per-model list of modules ---------------------------------------------- */

typedef struct model_entry {
    const pr_model *m;
    pr_module **mods;
    int n, cap;
} model_entry;

static model_entry *registry;
static int n_registry, cap_registry;

static model_entry *entry_of(const pr_model *m, int create)
{
    for (int i = 0; i < n_registry; i++)
        if (registry[i].m == m)
            return &registry[i];
    if (!create)
        return NULL;
    if (n_registry == cap_registry) {
        int cap = cap_registry ? 2 * cap_registry : 4;
        model_entry *r = realloc(registry, (size_t)cap * sizeof *r);
        if (!r)
            return NULL;
        registry = r;
        cap_registry = cap;
    }
    model_entry *e = &registry[n_registry++];
    memset(e, 0, sizeof *e);
    e->m = m;
    return e;
}

static int entry_add(const pr_model *m, pr_module *mod)
{
    model_entry *e = entry_of(m, 1);
    if (!e)
        return -1;
    if (e->n == e->cap) {
        int cap = e->cap ? 2 * e->cap : 4;
        pr_module **nm = realloc(e->mods, (size_t)cap * sizeof *nm);
        if (!nm)
            return -1;
        e->mods = nm;
        e->cap = cap;
    }
    e->mods[e->n++] = mod;
    return 0;
}

static void entry_drop(const pr_model *m)
{
    for (int i = 0; i < n_registry; i++)
        if (registry[i].m == m) {
            free(registry[i].mods);
            registry[i] = registry[--n_registry];
            break;
        }
    if (n_registry == 0) {
        free(registry);
        registry = NULL;
        cap_registry = 0;
    }
}

/* ---- expression variables ------------------------------------------------------ */

static int model_vars(const pr_module *mod, const pr_dims *d, const pr_option_value *opts, expr_var *v)
{
    int n = 0;
    v[n++] = (expr_var){ "d_model", d->d_model };
    v[n++] = (expr_var){ "n_heads", d->n_heads };
    v[n++] = (expr_var){ "n_kv_heads", d->n_kv_heads };
    v[n++] = (expr_var){ "d_head", d->d_head };
    v[n++] = (expr_var){ "d_ff", d->d_ff };
    v[n++] = (expr_var){ "n_layers", d->n_layers };
    v[n++] = (expr_var){ "vocab", d->vocab };
    v[n++] = (expr_var){ "d_in", d->d_in };
    v[n++] = (expr_var){ "d_out", d->d_out };
    for (uint32_t i = 0; i < mod->t.n_options; i++) {
        const pr_option_decl *o = &mod->opt[i];
        if (o->type == PR_OPT_STRING || !o->name)
            continue;
        v[n++] = (expr_var){ o->name, opts[i].num };
    }
    return n;
}

/* Variables for saved and scratch buffer shapes: model ones plus rows, B, T. */
static int buffer_vars(const insertion *ins, int B, int T, expr_var *v)
{
    int n = model_vars(ins->mod, &ins->dims, ins->opts, v);
    v[n++] = (expr_var){ "rows", (double)B * T };
    v[n++] = (expr_var){ "B", B };
    v[n++] = (expr_var){ "T", T };
    return n;
}

static int64_t shape_numel(const int64_t *dims, int ndim)
{
    int64_t n = 1;
    for (int d = 0; d < ndim; d++)
        n *= dims[d];
    return n;
}

/* ---- options --------------------------------------------------------------------- */

static const char *keep_str(pr_module *mod, const char *s)
{
    char **ns = realloc(mod->strs, (size_t)(mod->n_strs + 1) * sizeof *ns);
    if (!ns)
        return NULL;
    mod->strs = ns;
    char *d = dup_str(s);
    if (!d)
        return NULL;
    mod->strs[mod->n_strs++] = d;
    return d;
}

static int option_index(const pr_module *mod, const char *name)
{
    for (uint32_t i = 0; i < mod->t.n_options; i++)
        if (mod->opt[i].name && strcmp(mod->opt[i].name, name) == 0)
            return (int)i;
    return -1;
}

static int parse_bool(const char *s, int *out)
{
    static const char *const yes[] = { "true", "1", "yes", "on" };
    static const char *const no[] = { "false", "0", "no", "off" };
    for (int i = 0; i < 4; i++) {
        if (strcasecmp(s, yes[i]) == 0) { *out = 1; return 0; }
        if (strcasecmp(s, no[i]) == 0) { *out = 0; return 0; }
    }
    return -1;
}

static int option_defaults(pr_module *mod, pr_error *err)
{
    for (uint32_t i = 0; i < mod->t.n_options; i++) {
        const pr_option_decl *o = &mod->opt[i];
        pr_option_value *v = &mod->base_opts[i];
        v->num = o->def;
        v->str = NULL;
        if (o->type == PR_OPT_STRING) {
            v->str = keep_str(mod, o->def_str ? o->def_str : "");
            if (!v->str)
                return pr_errorf(err, PR_ERR_NOMEM, "module '%s': out of memory", mod_name(mod));
        } else if (o->type == PR_OPT_ENUM) {
            int n = 0;
            while (o->choices && o->choices[n])
                n++;
            int k = (int)o->def;
            v->str = (k >= 0 && k < n) ? o->choices[k] : NULL;
        }
    }
    return PR_OK;
}

/* Parse text for option i into *v, checking type and bounds. */
static int option_parse(pr_module *mod, int i, const char *text, int site, pr_option_value *v, pr_error *err)
{
    const pr_option_decl *o = &mod->opt[i];
    char at[48] = "";
    if (site >= 0)
        snprintf(at, sizeof at, " at site '%s'", pr_site_name(site));
    if (!text)
        return pr_errorf(err, PR_ERR_INVALID, "module '%s': option '%s'%s has no value", mod_name(mod), o->name, at);
    char *end = NULL;
    switch (o->type) {
    case PR_OPT_INT: {
        long long x = strtoll(text, &end, 10);
        if (end == text || *end)
            return pr_errorf(err, PR_ERR_INVALID, "module '%s': option '%s'%s = '%s' is not an integer",
                             mod_name(mod), o->name, at, text);
        v->num = (double)x;
        break;
    }
    case PR_OPT_FLOAT: {
        double x = strtod(text, &end);
        if (end == text || *end || !isfinite(x))
            return pr_errorf(err, PR_ERR_INVALID, "module '%s': option '%s'%s = '%s' is not a finite number",
                             mod_name(mod), o->name, at, text);
        v->num = x;
        break;
    }
    case PR_OPT_BOOL: {
        int b;
        if (parse_bool(text, &b))
            return pr_errorf(err, PR_ERR_INVALID, "module '%s': option '%s'%s = '%s' is not a boolean (true/false)",
                             mod_name(mod), o->name, at, text);
        v->num = b;
        break;
    }
    case PR_OPT_ENUM: {
        char known[256] = "";
        size_t off = 0;
        for (int k = 0; o->choices && o->choices[k]; k++) {
            if (strcmp(o->choices[k], text) == 0) {
                v->num = k;
                v->str = o->choices[k];
                return PR_OK;
            }
            int w = snprintf(known + off, sizeof known - off, "%s%s", k ? ", " : "", o->choices[k]);
            if (w > 0 && (size_t)w < sizeof known - off)
                off += (size_t)w;
        }
        return pr_errorf(err, PR_ERR_INVALID, "module '%s': option '%s'%s = '%s' is not one of: %s",
                         mod_name(mod), o->name, at, text, known);
    }
    case PR_OPT_STRING:
        v->str = keep_str(mod, text);
        if (!v->str)
            return pr_errorf(err, PR_ERR_NOMEM, "module '%s': out of memory", mod_name(mod));
        return PR_OK;
    default:
        return pr_errorf(err, PR_ERR_INVALID, "module '%s': option '%s' has unknown type %d", mod_name(mod),
                         o->name, o->type);
    }
    if ((o->type == PR_OPT_INT || o->type == PR_OPT_FLOAT) && !(o->min == 0.0 && o->max == 0.0) &&
        (v->num < o->min || v->num > o->max))
        return pr_errorf(err, PR_ERR_INVALID, "module '%s': option '%s'%s = %s is out of range [%g, %g]",
                         mod_name(mod), o->name, at, text, o->min, o->max);
    return PR_OK;
}

static int resolve_options(pr_module *mod, const pr_module_spec *spec, pr_error *err)
{
    if (mod->t.n_options > MAX_OPTIONS)
        return pr_errorf(err, PR_ERR_UNSUPPORTED, "module '%s': technique '%s' declares %u options (at most %d)",
                         mod_name(mod), mod->t.name, mod->t.n_options, MAX_OPTIONS);
    for (uint32_t i = 0; i < mod->t.n_options; i++)
        read_elem(&mod->opt[i], sizeof mod->opt[i], mod->t.options, i);
    int rc = option_defaults(mod, err);
    if (rc)
        return rc;
    /* every-site settings first, then per-site overrides */
    for (int pass = 0; pass < 2; pass++)
        for (int k = 0; k < spec->n_options; k++) {
            const pr_option_setting *s = &spec->options[k];
            if ((pass == 0) != (s->site < 0))
                continue;
            if (!s->name)
                return pr_errorf(err, PR_ERR_INVALID, "module '%s': option %d has no name", mod_name(mod), k);
            int i = option_index(mod, s->name);
            if (i < 0) {
                char known[512] = "";
                size_t off = 0;
                for (uint32_t j = 0; j < mod->t.n_options; j++) {
                    int w = snprintf(known + off, sizeof known - off, "%s%s", j ? ", " : "", mod->opt[j].name);
                    if (w > 0 && (size_t)w < sizeof known - off)
                        off += (size_t)w;
                }
                return pr_errorf(err, PR_ERR_INVALID, "module '%s': unknown option '%s' (technique '%s' has: %s)",
                                 mod_name(mod), s->name, mod->t.name, off ? known : "no options");
            }
            if (s->site < 0) {
                if ((rc = option_parse(mod, i, s->value, -1, &mod->base_opts[i], err)))
                    return rc;
                continue;
            }
            if (!mod->opt[i].per_site)
                return pr_errorf(err, PR_ERR_INVALID, "module '%s': option '%s' cannot be set per site (site '%s')",
                                 mod_name(mod), s->name, pr_site_name(s->site));
            if (s->site >= PR_SITE_COUNT || !(mod->sites & PR_SITE_BIT(s->site)))
                return pr_errorf(err, PR_ERR_INVALID,
                                 "module '%s': option '%s' is set for site '%s', which the module does not use",
                                 mod_name(mod), s->name, pr_site_name(s->site));
        }
    /* resolved values per site */
    size_t n = mod->t.n_options ? mod->t.n_options : 1;
    mod->site_opts = calloc((size_t)PR_SITE_COUNT * n, sizeof *mod->site_opts);
    if (!mod->site_opts)
        return pr_errorf(err, PR_ERR_NOMEM, "module '%s': out of memory", mod_name(mod));
    for (int s = 0; s < PR_SITE_COUNT; s++)
        memcpy(mod->site_opts + (size_t)s * n, mod->base_opts, mod->t.n_options * sizeof *mod->base_opts);
    for (int k = 0; k < spec->n_options; k++) {
        const pr_option_setting *s = &spec->options[k];
        if (s->site < 0)
            continue;
        int i = option_index(mod, s->name);
        if ((rc = option_parse(mod, i, s->value, s->site, mod->site_opts + (size_t)s->site * n + i, err)))
            return rc;
    }
    return PR_OK;
}

/* ---- sites, layers, insertions ----------------------------------------------------- */

static int is_concat(const pr_module *mod)
{
    return mod->t.integration == PR_INTEGRATE_CONCAT;
}

static int is_select(const pr_module *mod)
{
    return mod->t.integration == PR_INTEGRATE_SELECT;
}

static int resolve_sites(pr_module *mod, const pr_model *m, const pr_module_spec *spec, pr_error *err)
{
    uint32_t all = (1u << PR_SITE_COUNT) - 1;
    uint32_t mask = spec->sites ? spec->sites : mod->t.default_sites;
    char buf[256];
    if (mask & ~all)
        return pr_errorf(err, PR_ERR_INVALID, "module '%s': site mask 0x%x names sites beyond the %d known ones",
                         mod_name(mod), mask, PR_SITE_COUNT);
    for (int s = 0; s < PR_SITE_COUNT; s++) {
        if (!(mask & PR_SITE_BIT(s)))
            continue;
        if (!(mod->t.sites & PR_SITE_BIT(s))) {
            names_site_mask(mod->t.sites, "none", buf, sizeof buf);
            return pr_errorf(err, PR_ERR_INVALID, "module '%s': technique '%s' cannot attach at site '%s' (allowed: %s)",
                             mod_name(mod), mod->t.name, pr_site_name(s), buf);
        }
        if (pr_model_site_dims(m, s, NULL, NULL) != 0)
            return pr_errorf(err, PR_ERR_INVALID, "module '%s': site '%s' does not exist in this model (%s family%s)",
                             mod_name(mod), pr_site_name(s),
                             pr_model_get_config(m)->family == PR_FAMILY_GPT2 ? "GPT-2" : "LLaMA",
                             s == PR_SITE_QKV ? ", separate q/k/v projections" : "");
        if (is_concat(mod) && s != PR_SITE_EMBED && s != PR_SITE_ATTN_K && s != PR_SITE_ATTN_V)
            return pr_errorf(err, PR_ERR_INVALID,
                             "module '%s': concatenation attaches only at embed, attn.k and attn.v (not '%s')",
                             mod_name(mod), pr_site_name(s));
    }
    if (!mask && !is_select(mod))
        return pr_errorf(err, PR_ERR_INVALID, "module '%s': no sites chosen and technique '%s' has no default sites",
                         mod_name(mod), mod->t.name);
    mod->sites = mask;
    return PR_OK;
}

static int cmp_int(const void *a, const void *b)
{
    int x = *(const int *)a, y = *(const int *)b;
    return (x > y) - (x < y);
}

static int resolve_layers(pr_module *mod, const pr_model *m, const pr_module_spec *spec, pr_error *err)
{
    int L = pr_model_get_config(m)->n_layers;
    mod->layers_all = spec->layers == NULL;
    int n = mod->layers_all ? L : spec->n_layers;
    if (!mod->layers_all && n <= 0)
        return pr_errorf(err, PR_ERR_INVALID, "module '%s': an empty layer list", mod_name(mod));
    mod->layers = malloc((size_t)(n ? n : 1) * sizeof *mod->layers);
    if (!mod->layers)
        return pr_errorf(err, PR_ERR_NOMEM, "module '%s': out of memory", mod_name(mod));
    for (int i = 0; i < n; i++) {
        int l = mod->layers_all ? i : spec->layers[i];
        if (l < 0 || l >= L)
            return pr_errorf(err, PR_ERR_INVALID, "module '%s': layer %d is out of range [0, %d)", mod_name(mod), l, L);
        mod->layers[i] = l;
    }
    qsort(mod->layers, (size_t)n, sizeof *mod->layers, cmp_int);
    for (int i = 1; i < n; i++)
        if (mod->layers[i] == mod->layers[i - 1])
            return pr_errorf(err, PR_ERR_INVALID, "module '%s': layer %d is listed twice", mod_name(mod),
                             mod->layers[i]);
    mod->n_layers = n;
    return PR_OK;
}

static int build_insertions(pr_module *mod, const pr_model *m, pr_error *err)
{
    if (is_select(mod))
        return PR_OK;
    int n_model = 0, n_layer = 0;
    for (int s = 0; s < PR_SITE_COUNT; s++)
        if (mod->sites & PR_SITE_BIT(s))
            *(pr_site_is_per_layer(s) ? &n_layer : &n_model) += 1;
    int n = n_model + n_layer * mod->n_layers;
    mod->ins = calloc((size_t)(n ? n : 1), sizeof *mod->ins);
    if (!mod->ins)
        return pr_errorf(err, PR_ERR_NOMEM, "module '%s': out of memory", mod_name(mod));
    const pr_model_config *c = pr_model_get_config(m);
    size_t no = mod->t.n_options ? mod->t.n_options : 1;
    int k = 0;
    /* model-level sites first, then layer by layer in site order */
    for (int pass = 0; pass < 1 + mod->n_layers; pass++)
        for (int s = 0; s < PR_SITE_COUNT; s++) {
            if (!(mod->sites & PR_SITE_BIT(s)) || pr_site_is_per_layer(s) != (pass > 0))
                continue;
            insertion *in = &mod->ins[k];
            in->mod = mod;
            in->index = k;
            in->site = s;
            in->layer = pass > 0 ? mod->layers[pass - 1] : -1;
            in->gate = -1;
            in->opts = mod->site_opts + (size_t)s * no;
            pr_dims *d = &in->dims;
            d->struct_size = sizeof *d;
            d->d_model = c->d_model;
            d->n_heads = c->n_heads;
            d->n_kv_heads = c->n_kv_heads;
            d->d_head = c->d_head;
            d->d_ff = c->d_ff;
            d->n_layers = c->n_layers;
            d->vocab = c->vocab_size;
            d->family = c->family;
            pr_model_site_dims(m, s, &d->d_in, &d->d_out);
            where_of(s, in->layer, in->where, sizeof in->where);
            k++;
        }
    mod->n_ins = k;
    return PR_OK;
}

/* Module widths, n_virtual and the scale-expression of each insertion. */
static int resolve_widths(pr_module *mod, pr_error *err)
{
    expr_var v[MAX_VARS];
    char e[256];
    for (int k = 0; k < mod->n_ins; k++) {
        insertion *in = &mod->ins[k];
        int nv = model_vars(mod, &in->dims, in->opts, v);
        int seq = mod->t.insertion == PR_INSERT_SEQUENTIAL;
        int have_in = in->dims.d_in, have_out = in->dims.d_out;
        int expect_in = seq ? have_out : have_in;
        int64_t w;
        const char *src_in = mod->t.module_in ? mod->t.module_in : (seq ? "d_out" : "d_in");
        const char *src_out = mod->t.module_out ? mod->t.module_out : "d_out";
        if (expr_eval_int(src_in, v, nv, &w, e, sizeof e))
            return pr_errorf(err, PR_ERR_INVALID, "module '%s': module_in '%s' at %s: %s", mod_name(mod), src_in,
                             in->where, e);
        in->w_in = (int)w;
        if (expr_eval_int(src_out, v, nv, &w, e, sizeof e))
            return pr_errorf(err, PR_ERR_INVALID, "module '%s': module_out '%s' at %s: %s", mod_name(mod), src_out,
                             in->where, e);
        in->w_out = (int)w;
        int integ = mod->t.integration;
        if (integ != PR_INTEGRATE_CUSTOM && integ != PR_INTEGRATE_CONCAT && integ != PR_INTEGRATE_WEIGHT_DELTA &&
            in->w_in != expect_in)
            return pr_errorf(err, PR_ERR_INVALID,
                             "module '%s': module_in = %d at %s, but the %s insertion gives the module %d columns",
                             mod_name(mod), in->w_in, in->where, seq ? "sequential" : "parallel", expect_in);
        if (integ != PR_INTEGRATE_CUSTOM && in->w_out != have_out)
            return pr_errorf(err, PR_ERR_INVALID, "module '%s': module_out = %d at %s, but the site output has %d columns",
                             mod_name(mod), in->w_out, in->where, have_out);
        if (integ == PR_INTEGRATE_CONCAT) {
            if (!mod->t.n_virtual)
                return pr_errorf(err, PR_ERR_INVALID, "module '%s': concatenation without an n_virtual expression",
                                 mod_name(mod));
            if (expr_eval_int(mod->t.n_virtual, v, nv, &w, e, sizeof e) || w < 1)
                return pr_errorf(err, PR_ERR_INVALID, "module '%s': n_virtual '%s' at %s: %s", mod_name(mod),
                                 mod->t.n_virtual, in->where, w < 1 ? "must be >= 1" : e);
            in->n_virtual = (int)w;
        }
        in->scale = 1.0f;
        if (mod->t.scale_expr && !mod->t.scale) {
            double s;
            if (expr_eval(mod->t.scale_expr, v, nv, &s, e, sizeof e))
                return pr_errorf(err, PR_ERR_INVALID, "module '%s': scale_expr '%s' at %s: %s", mod_name(mod),
                                 mod->t.scale_expr, in->where, e);
            in->scale = (float)s;
        }
    }
    /* prefix rows of one layer's k and v must agree */
    for (int a = 0; is_concat(mod) && a < mod->n_ins; a++)
        for (int b = a + 1; b < mod->n_ins; b++)
            if (mod->ins[a].layer == mod->ins[b].layer && mod->ins[a].layer >= 0 &&
                mod->ins[a].n_virtual != mod->ins[b].n_virtual)
                return pr_errorf(err, PR_ERR_INVALID, "module '%s': n_virtual is %d at %s but %d at %s",
                                 mod_name(mod), mod->ins[a].n_virtual, mod->ins[a].where, mod->ins[b].n_virtual,
                                 mod->ins[b].where);
    return PR_OK;
}

/* ---- parameter copies ----------------------------------------------------------------- */

static const char *scope_name(int scope)
{
    switch (scope) {
    case PR_SCOPE_INSERTION: return "insertion";
    case PR_SCOPE_LAYER: return "layer";
    case PR_SCOPE_SITE: return "site";
    case PR_SCOPE_GLOBAL: return "global";
    default: return "?";
    }
}

static int add_copy(pr_module *mod, pr_error *err)
{
    if (mod->n_copies == mod->cap_copies) {
        int cap = mod->cap_copies ? 2 * mod->cap_copies : 16;
        param_copy *nc = realloc(mod->copies, (size_t)cap * sizeof *nc);
        if (!nc)
            return pr_errorf(err, PR_ERR_NOMEM, "module '%s': out of memory", mod_name(mod));
        mod->copies = nc;
        mod->cap_copies = cap;
    }
    memset(&mod->copies[mod->n_copies], 0, sizeof mod->copies[0]);
    mod->n_copies++;
    return PR_OK;
}

/* Tensor name of a copy: "<module>/<param>" (global), "<module>/h.L.<param>"
 * (layer), "<module>/<site>.<param>" (site), "<module>/h.L.<site>.<param>"
 * (insertion); model-level sites drop the "h.L." part. */
static char *copy_name(const pr_module *mod, const char *param, int scope, int site, int layer)
{
    char buf[256];
    const char *mn = mod_name(mod);
    if ((scope == PR_SCOPE_LAYER && layer >= 0))
        snprintf(buf, sizeof buf, "%s/h.%d.%s", mn, layer, param);
    else if (scope == PR_SCOPE_SITE || (scope == PR_SCOPE_INSERTION && layer < 0))
        snprintf(buf, sizeof buf, "%s/%s.%s", mn, pr_site_name(site), param);
    else if (scope == PR_SCOPE_INSERTION)
        snprintf(buf, sizeof buf, "%s/h.%d.%s.%s", mn, layer, pr_site_name(site), param);
    else
        snprintf(buf, sizeof buf, "%s/%s", mn, param);
    return dup_str(buf);
}

static int resolve_params(pr_module *mod, pr_error *err)
{
    uint32_t np = mod->t.n_params;
    mod->pd = calloc(np ? np : 1, sizeof *mod->pd);
    if (!mod->pd)
        return pr_errorf(err, PR_ERR_NOMEM, "module '%s': out of memory", mod_name(mod));
    for (uint32_t i = 0; i < np; i++) {
        read_elem(&mod->pd[i], sizeof mod->pd[i], mod->t.params, i);
        const pr_param_decl *p = &mod->pd[i];
        if (!p->name || !p->shape)
            return pr_errorf(err, PR_ERR_INVALID, "module '%s': parameter %u has no name or shape", mod_name(mod), i);
        if (p->scope < PR_SCOPE_INSERTION || p->scope > PR_SCOPE_GLOBAL)
            return pr_errorf(err, PR_ERR_INVALID, "module '%s': parameter '%s' has unknown scope %d", mod_name(mod),
                             p->name, p->scope);
        if (mod->gated && strcmp(p->name, "gate") == 0)
            return pr_errorf(err, PR_ERR_INVALID, "module '%s': parameter name 'gate' is reserved for the host's gate",
                             mod_name(mod));
    }
    expr_var v[MAX_VARS];
    char e[256];
    for (int k = 0; k < mod->n_ins; k++) {
        insertion *in = &mod->ins[k];
        in->copy = calloc(np ? np : 1, sizeof *in->copy);
        if (!in->copy)
            return pr_errorf(err, PR_ERR_NOMEM, "module '%s': out of memory", mod_name(mod));
        int nv = model_vars(mod, &in->dims, in->opts, v);
        for (uint32_t i = 0; i < np; i++) {
            const pr_param_decl *p = &mod->pd[i];
            int64_t dims[4];
            int nd = 0;
            if (expr_eval_shape(p->shape, v, nv, dims, &nd, e, sizeof e))
                return pr_errorf(err, PR_ERR_INVALID, "module '%s': parameter '%s' shape '%s' at %s: %s", mod_name(mod),
                                 p->name, p->shape, in->where, e);
            int kl = (p->scope == PR_SCOPE_INSERTION || p->scope == PR_SCOPE_LAYER) ? in->layer : INT32_MIN;
            int ks = (p->scope == PR_SCOPE_INSERTION || p->scope == PR_SCOPE_SITE) ? in->site : -1;
            int found = -1, ordinal = 0;
            for (int c = 0; c < mod->n_copies; c++) {
                const param_copy *pc = &mod->copies[c];
                if (pc->decl != (int)i)
                    continue;
                if (pc->key_layer == kl && pc->key_site == ks) {
                    found = c;
                    break;
                }
                ordinal++;
            }
            if (found >= 0) {
                const param_copy *pc = &mod->copies[found];
                int same = pc->ndim == nd;
                for (int d = 0; same && d < nd; d++)
                    same = pc->shape[d] == dims[d];
                if (!same)
                    return pr_errorf(err, PR_ERR_INVALID,
                                     "module '%s': parameter '%s' (%s scope) has shape '%s' = %lld elements at %s "
                                     "but %lld at %s; a shared copy needs one shape",
                                     mod_name(mod), p->name, scope_name(p->scope), p->shape,
                                     (long long)shape_numel(dims, nd), in->where, (long long)pc->numel,
                                     mod->ins[pc->first_ins].where);
                in->copy[i] = found;
                continue;
            }
            int rc = add_copy(mod, err);
            if (rc)
                return rc;
            param_copy *pc = &mod->copies[mod->n_copies - 1];
            pc->decl = (int)i;
            pc->key_layer = kl;
            pc->key_site = ks;
            pc->ndim = nd;
            memcpy(pc->shape, dims, sizeof dims);
            pc->numel = shape_numel(dims, nd);
            pc->ordinal = ordinal;
            pc->first_ins = k;
            pc->trained = mod->trainable && !(p->flags & PR_PARAM_FROZEN);
            pc->name = copy_name(mod, p->name, p->scope, in->site, in->layer);
            if (!pc->name)
                return pr_errorf(err, PR_ERR_NOMEM, "module '%s': out of memory", mod_name(mod));
            in->copy[i] = mod->n_copies - 1;
        }
        if (mod->gated) {
            int rc = add_copy(mod, err);
            if (rc)
                return rc;
            param_copy *pc = &mod->copies[mod->n_copies - 1];
            pc->decl = -1;
            pc->key_layer = in->layer;
            pc->key_site = in->site;
            pc->ndim = 1;
            pc->shape[0] = 1;
            pc->numel = 1;
            pc->first_ins = k;
            pc->trained = mod->trainable;
            pc->name = copy_name(mod, "gate", PR_SCOPE_INSERTION, in->site, in->layer);
            if (!pc->name)
                return pr_errorf(err, PR_ERR_NOMEM, "module '%s': out of memory", mod_name(mod));
            in->gate = mod->n_copies - 1;
        }
    }
    size_t off = 0, goff = 0;
    for (int c = 0; c < mod->n_copies; c++) {
        param_copy *pc = &mod->copies[c];
        pc->off = off;
        off += round_up((size_t)pc->numel);
        mod->param_count += pc->numel;
        if (pc->trained) {
            pc->goff = goff;
            goff += round_up((size_t)pc->numel);
            mod->trainable_count += pc->numel;
        }
    }
    mod->n_param_floats = off;
    mod->n_grad_floats = goff;
    return PR_OK;
}

/* ---- selection ------------------------------------------------------------------------------ */

/* Workspace of a base tensor, from the family's tensor names. */
static uint32_t tensor_workspace(const pr_tensor_info *t)
{
    const char *n = t->name;
    if (t->kind == PR_TENSOR_MODULE)
        return 0;
    if (t->kind == PR_TENSOR_NORM_GAIN || t->kind == PR_TENSOR_NORM_BIAS)
        return PR_WS_NORM;
    if (strncmp(n, "lm_head.", 8) == 0)
        return PR_WS_HEAD;
    if (t->kind == PR_TENSOR_EMBEDDING || strncmp(n, "wte.", 4) == 0 || strncmp(n, "wpe.", 4) == 0 ||
        strstr(n, "embed_tokens"))
        return PR_WS_EMBEDDING;
    if (strstr(n, ".attn.") || strstr(n, ".self_attn."))
        return PR_WS_ATTENTION;
    if (strstr(n, ".mlp."))
        return PR_WS_FFN;
    return 0;
}

static uint32_t tensor_base_kind(const pr_tensor_info *t)
{
    switch (t->kind) {
    case PR_TENSOR_BIAS: return PR_BASE_BIAS;
    case PR_TENSOR_NORM_GAIN: return PR_BASE_NORM_GAIN;
    case PR_TENSOR_NORM_BIAS: return PR_BASE_NORM_BIAS;
    case PR_TENSOR_EMBEDDING: return PR_BASE_EMBEDDING;
    case PR_TENSOR_WEIGHT: return tensor_workspace(t) == PR_WS_EMBEDDING ? PR_BASE_EMBEDDING : PR_BASE_WEIGHT;
    default: return 0;
    }
}

static int layer_chosen(const pr_module *mod, int layer)
{
    if (layer < 0)
        return mod->layers_all;
    for (int i = 0; i < mod->n_layers; i++)
        if (mod->layers[i] == layer)
            return 1;
    return 0;
}

/* Base tensors a selection module makes trainable: kinds in select_kinds,
 * workspaces in workspace, per-layer tensors of the chosen layers, and
 * model-level tensors only when every layer is chosen.  Tensors that are
 * trainable already are left to their owner. */
static int resolve_selection(pr_module *mod, const pr_model *m, pr_error *err)
{
    if (!is_select(mod) || !mod->trainable)
        return PR_OK;
    int n = pr_model_n_tensors(m);
    mod->selected = calloc((size_t)(n ? n : 1), sizeof *mod->selected);
    if (!mod->selected)
        return pr_errorf(err, PR_ERR_NOMEM, "module '%s': out of memory", mod_name(mod));
    for (int i = 0; i < n; i++) {
        const pr_tensor_info *t = pr_model_tensor(m, i);
        if (t->trainable || !(tensor_base_kind(t) & mod->t.select_kinds) ||
            !(tensor_workspace(t) & mod->t.workspace) || !layer_chosen(mod, t->layer))
            continue;
        mod->selected[mod->n_selected] = dup_str(t->name);
        if (!mod->selected[mod->n_selected])
            return pr_errorf(err, PR_ERR_NOMEM, "module '%s': out of memory", mod_name(mod));
        mod->n_selected++;
        mod->base_selected += t->numel;
    }
    return PR_OK;
}

/* ---- building and freeing -------------------------------------------------------------------- */

static void module_free(pr_module *mod)
{
    if (!mod)
        return;
    for (int k = 0; k < mod->n_ins; k++) {
        insertion *in = &mod->ins[k];
        free(in->copy);
        free(in->params);
        free(in->grads);
        free(in->saved);
        free(in->scratch);
        free(in->block);
        free(in->dw);
        free(in->orig_w);
        free(in->orig_b);
        if (mod->t.integration == PR_INTEGRATE_RESCALE)
            free(in->h_keep);
    }
    free(mod->ins);
    for (int i = 0; i < mod->n_kids; i++)
        module_free(mod->kids[i]);
    free(mod->kids);
    for (int c = 0; c < mod->n_copies; c++)
        free(mod->copies[c].name);
    free(mod->copies);
    for (int i = 0; i < mod->n_strs; i++)
        free(mod->strs[i]);
    free(mod->strs);
    for (int i = 0; i < mod->n_selected; i++)
        free(mod->selected[i]);
    free(mod->selected);
    free(mod->site_opts);
    free(mod->layers);
    free(mod->pd);
    free(mod->sd);
    free(mod->xd);
    free(mod->params);
    free(mod->grads);
    free(mod->scratch);
    free(mod->name);
    free(mod);
}

static int name_ok(const char *s)
{
    if (!s || !*s)
        return 0;
    for (; *s; s++)
        if (*s == '/' || *s == ' ' || (unsigned char)*s < 0x21)
            return 0;
    return 1;
}

/* Stage 1, shared by plan and attach. */
static int module_resolve(const pr_model *m, const pr_module_spec *spec, pr_module **out, pr_error *err)
{
    *out = NULL;
    if (!m || !spec || !spec->technique)
        return pr_errorf(err, PR_ERR_INVALID, "module: NULL model, spec or technique");
    const pr_technique *t = spec->technique;
    if (t->abi_major != PR_ABI_MAJOR)
        return pr_errorf(err, PR_ERR_UNSUPPORTED, "module: technique '%s' is built for ABI %u, the host speaks %d",
                         t->name ? t->name : "?", t->abi_major, PR_ABI_MAJOR);
    pr_module *mod = calloc(1, sizeof *mod);
    if (!mod)
        return pr_errorf(err, PR_ERR_NOMEM, "module: out of memory");
    *out = mod;
    mod->tech_ptr = t;
    read_elem(&mod->t, sizeof mod->t, t, 0);
    mod->t.struct_size = t->struct_size;
    if (!mod->t.name)
        return pr_errorf(err, PR_ERR_INVALID, "module: technique without a name");
    const char *nm = spec->name ? spec->name : mod->t.name;
    if (!name_ok(nm))
        return pr_errorf(err, PR_ERR_INVALID, "module: name '%s' must be non-empty without '/' or spaces", nm);
    mod->name = dup_str(nm);
    if (!mod->name)
        return pr_errorf(err, PR_ERR_NOMEM, "module: out of memory");
    mod->model = (pr_model *)m;
    mod->trainable = spec->trainable != 0;
    mod->seed = spec->seed;
    mod->gated = spec->gate != 0 || mod->t.integration == PR_INTEGRATE_GATED_ADD;
    if (spec->gate && is_select(mod))
        return pr_errorf(err, PR_ERR_INVALID, "module '%s': technique '%s' selects base tensors; it has no output a "
                         "gate could scale (gate: true)", mod_name(mod), mod->t.name);
    if (spec->n_options < 0 || (spec->n_options > 0 && !spec->options))
        return pr_errorf(err, PR_ERR_INVALID, "module '%s': bad option list", mod_name(mod));
    int rc;
    if ((rc = resolve_sites(mod, m, spec, err)) || (rc = resolve_options(mod, spec, err)) ||
        (rc = resolve_layers(mod, m, spec, err)) || (rc = build_insertions(mod, m, err)) ||
        (rc = resolve_widths(mod, err)) || (rc = resolve_params(mod, err)) ||
        (rc = resolve_selection(mod, m, err)))
        return rc;
    mod->sd = calloc(mod->t.n_saved ? mod->t.n_saved : 1, sizeof *mod->sd);
    mod->xd = calloc(mod->t.n_scratch ? mod->t.n_scratch : 1, sizeof *mod->xd);
    if (!mod->sd || !mod->xd)
        return pr_errorf(err, PR_ERR_NOMEM, "module '%s': out of memory", mod_name(mod));
    for (uint32_t i = 0; i < mod->t.n_saved; i++)
        read_elem(&mod->sd[i], sizeof mod->sd[i], mod->t.saved, i);
    for (uint32_t i = 0; i < mod->t.n_scratch; i++)
        read_elem(&mod->xd[i], sizeof mod->xd[i], mod->t.scratch, i);
    return PR_OK;
}

int pr_module_plan_for(const pr_model_config *cfg, const pr_module_spec *spec, pr_module_plan *out, pr_error *err)
{
    if (!cfg || !out)
        return pr_errorf(err, PR_ERR_INVALID, "plan: NULL config or output");
    memset(out, 0, sizeof *out);
    pr_model *m = NULL;
    int rc = model_create_empty(cfg, &m, err);
    if (rc)
        return rc;
    pr_module *mod = NULL;
    rc = module_resolve(m, spec, &mod, err);
    if (rc == PR_OK) {
        out->insertions = mod->n_ins;
        out->params = mod->param_count;
        out->trainable = mod->trainable_count;
        out->base_selected = mod->base_selected;
        out->sites = mod->sites;
        int per_layer = is_select(mod);
        for (int s = 0; s < PR_SITE_COUNT; s++)
            per_layer |= (mod->sites & PR_SITE_BIT(s)) && pr_site_is_per_layer(s);
        out->layers_used = per_layer ? mod->n_layers : 0;
    }
    module_free(mod);
    pr_model_free(m);
    return rc;
}

/* ---- calling the plugin ------------------------------------------------------------------------ */

static int call_failed(const pr_module *mod, const insertion *in, const char *what, int rc, const host_call *hc,
                       pr_error *err)
{
    int code = (rc > 0 && rc <= PR_ERR_INTERRUPTED) ? rc : PR_ERR_INVALID;
    char msg[HOST_MSG_MAX + 64];
    if (hc->has_msg)
        snprintf(msg, sizeof msg, "%s", hc->msg);
    else
        snprintf(msg, sizeof msg, "%s() failed with status %d", what, rc);
    return pr_errorf(err, code, "module '%s' (technique %s) at %s: %s", mod_name(mod), mod->t.name,
                     in ? in->where : "(module)", msg);
}

static int call(const pr_module *mod, const insertion *in, pr_callback cb, const char *what, const pr_ctx *c,
                pr_error *err)
{
    if (!cb)
        return pr_errorf(err, PR_ERR_UNSUPPORTED, "module '%s' (technique %s) at %s: the technique has no %s()",
                         mod_name(mod), mod->t.name, in ? in->where : "(module)", what);
    host_call hc;
    host_call_begin(&hc);
    int rc = cb(c);
    host_call_end(&hc);
    return rc ? call_failed(mod, in, what, rc, &hc, err) : PR_OK;
}

static uint64_t call_seed(const pr_module *mod, const insertion *in, uint64_t step)
{
    return host_mix64(mod->seed ^ host_mix64(((uint64_t)(in->index + 1) << 32) ^ host_mix64(step + 1)));
}

/* The context of one call, without site tensors. */
static void ctx_init(const insertion *in, pr_ctx *c, int B, int T, int training, uint64_t step)
{
    const pr_module *mod = in->mod;
    memset(c, 0, sizeof *c);
    c->struct_size = sizeof *c;
    c->host = host_services();
    c->technique = mod->tech_ptr;
    c->dims = &in->dims;
    c->site = in->site;
    c->layer = in->layer;
    c->insertion = in->index;
    c->B = B;
    c->T = T;
    c->rows = B * T;
    c->training = training;
    c->seed = call_seed(mod, in, step);
    c->options = in->opts;
    c->n_options = mod->t.n_options;
    c->params = in->params;
    c->grads = in->grads;
    c->n_params = mod->t.n_params;
    c->saved = in->saved;
    c->n_saved = mod->t.n_saved;
    c->scratch = in->scratch;
    c->n_scratch = mod->t.n_scratch;
    c->base_weight = in->has_bw ? &in->bw : NULL;
    c->base_bias = in->has_bb ? &in->bb : NULL;
    c->scale = in->scale;
}

/* Floats of buffer list decls evaluated for B x T (each rounded up). */
static int buffers_size(const insertion *in, const pr_buffer_decl *d, uint32_t n, int B, int T, pr_tensor *views,
                        float *base, size_t *total, pr_error *err)
{
    expr_var v[MAX_VARS];
    char e[256];
    int nv = buffer_vars(in, B, T, v);
    size_t off = 0;
    for (uint32_t i = 0; i < n; i++) {
        int64_t dims[4];
        int nd = 0;
        if (!d[i].shape || expr_eval_shape(d[i].shape, v, nv, dims, &nd, e, sizeof e))
            return pr_errorf(err, PR_ERR_INVALID, "module '%s': buffer '%s' shape '%s' at %s: %s", mod_name(in->mod),
                             d[i].name ? d[i].name : "?", d[i].shape ? d[i].shape : "", in->where,
                             d[i].shape ? e : "missing");
        if (views)
            views[i] = view(base ? base + off : NULL, nd, dims);
        off += round_up((size_t)shape_numel(dims, nd));
    }
    *total = off;
    return PR_OK;
}

/* Host temporaries after the plugin's scratch: area A (module output,
 * scaled d_out, dh, dW gradient) and area B (d_in of the module input). */
static size_t area_a_floats(const insertion *in, int rows)
{
    size_t a = round_up((size_t)rows * (size_t)in->w_out);
    if (in->mod->t.integration == PR_INTEGRATE_WEIGHT_DELTA) {
        size_t g = round_up((size_t)in->dims.d_in * (size_t)in->dims.d_out);
        a = g > a ? g : a;
    }
    if (in->mod->gated && in->mod->t.integration == PR_INTEGRATE_CUSTOM) {
        size_t g = round_up((size_t)rows * (size_t)in->dims.d_out); /* s * dy */
        a = g > a ? g : a;
    }
    return a;
}

static size_t area_b_floats(const insertion *in, int rows)
{
    int w = in->w_in > in->dims.d_in ? in->w_in : in->dims.d_in;
    return round_up((size_t)rows * (size_t)w);
}

/* Point the saved and scratch views at B x T and find the host areas. */
static int prepare_views(insertion *in, int B, int T, float **area_a, float **area_b, pr_error *err)
{
    pr_module *mod = in->mod;
    if (B > in->res_B || T > in->res_T || !in->block)
        return pr_errorf(err, PR_ERR_INVALID,
                         "module '%s' at %s: batch B=%d x T=%d exceeds what pr_model_reserve planned (B=%d x T=%d)",
                         mod_name(mod), in->where, B, T, in->res_B, in->res_T);
    size_t ns = 0, nx = 0;
    int rc;
    if ((rc = buffers_size(in, mod->sd, mod->t.n_saved, B, T, in->saved, in->block, &ns, err)) ||
        (rc = buffers_size(in, mod->xd, mod->t.n_scratch, B, T, in->scratch, mod->scratch, &nx, err)))
        return rc;
    size_t need = nx + area_a_floats(in, B * T) + area_b_floats(in, B * T);
    if (need > mod->scratch_cap)
        return pr_errorf(err, PR_ERR_INVALID, "module '%s' at %s: scratch of %zu floats exceeds the %zu reserved",
                         mod_name(mod), in->where, need, mod->scratch_cap);
    *area_a = mod->scratch + nx;
    *area_b = *area_a + area_a_floats(in, B * T);
    return PR_OK;
}

/* ---- reserve ----------------------------------------------------------------------------------- */

static int is_additive(const pr_module *mod)
{
    int integ = mod->t.integration;
    return integ == PR_INTEGRATE_DIRECT_ADD || integ == PR_INTEGRATE_SCALED_ADD || integ == PR_INTEGRATE_GATED_ADD;
}

static int needs_y_old(const pr_module *mod)
{
    int integ = mod->t.integration;
    return integ == PR_INTEGRATE_RESCALE || (mod->t.insertion == PR_INSERT_SEQUENTIAL && is_additive(mod)) ||
           (mod->gated && integ == PR_INTEGRATE_CUSTOM);
}

/* Floats kept per position for a gate's gradient: the module output h of
 * an addition (or the rows of a concatenation), F - y_old of a custom
 * integration; 0 when ungated. */
static size_t gate_keep_width(const insertion *in)
{
    const pr_module *mod = in->mod;
    if (!mod->gated)
        return 0;
    if (is_additive(mod) || is_concat(mod))
        return (size_t)in->w_out;
    if (mod->t.integration == PR_INTEGRATE_CUSTOM)
        return (size_t)in->dims.d_out;
    return 0;
}

static int reserve_insertion(insertion *in, int B, int T, pr_error *err)
{
    pr_module *mod = in->mod;
    if (in->block && B <= in->res_B && T <= in->res_T)
        return PR_OK;
    if (in->block) {
        B = B > in->res_B ? B : in->res_B;
        T = T > in->res_T ? T : in->res_T;
    }
    size_t rows = (size_t)B * (size_t)T, ns = 0, nx = 0;
    int rc;
    if ((rc = buffers_size(in, mod->sd, mod->t.n_saved, B, T, NULL, NULL, &ns, err)) ||
        (rc = buffers_size(in, mod->xd, mod->t.n_scratch, B, T, NULL, NULL, &nx, err)))
        return rc;
    size_t ny = needs_y_old(mod) ? round_up(rows * (size_t)in->dims.d_out) : 0;
    size_t nh = round_up(rows * gate_keep_width(in));
    float *block = alloc_floats(ns + ny + nh);
    if (!block)
        return pr_errorf(err, PR_ERR_NOMEM, "module '%s' at %s: out of memory for saved activations (B=%d, T=%d)",
                         mod_name(mod), in->where, B, T);
    size_t need = nx + area_a_floats(in, (int)rows) + area_b_floats(in, (int)rows);
    if ((rc = grow_scratch(mod, need, "module", err))) {
        free(block);
        return rc;
    }
    free(in->block);
    in->block = block;
    in->block_floats = ns + ny + nh;
    in->y_old = ny ? block + ns : NULL;
    if (nh)
        in->h_keep = block + ns + ny;
    in->res_B = B;
    in->res_T = T;
    return PR_OK;
}

static int hook_reserve(void *self, int B, int T, pr_error *err)
{
    return reserve_insertion(self, B, T, err);
}

/* ---- integration forms ------------------------------------------------------------------------- */

/* s = sigmoid(g) of the insertion's gate, 1 without one. */
static float gate_value(const insertion *in)
{
    return in->gate >= 0 ? sigmoid(in->mod->params[in->mod->copies[in->gate].off]) : 1.0f;
}

/* Where dL/dg accumulates; NULL without a gate or when it is frozen. */
static float *gate_grad(const insertion *in)
{
    if (in->gate < 0)
        return NULL;
    const param_copy *gc = &in->mod->copies[in->gate];
    return gc->trained ? in->mod->grads + gc->goff : NULL;
}

/* k of y += k*h: the scale (SCALED_ADD) or 1, times the gate. */
static float add_coefficient(const insertion *in)
{
    float k = in->mod->t.integration == PR_INTEGRATE_SCALED_ADD ? in->scale : 1.0f;
    return k * gate_value(in);
}

static int hook_forward(void *self, const pr_site_io *io, pr_error *err)
{
    insertion *in = self;
    pr_module *mod = in->mod;
    if (mod->merged || mod->fused_by)
        return PR_OK;
    float *area_a, *area_b;
    int rc = prepare_views(in, io->B, io->T, &area_a, &area_b, err);
    if (rc)
        return rc;
    (void)area_b;
    pr_ctx c;
    ctx_init(in, &c, io->B, io->T, io->training, in->n_fwd++);
    int rows = io->rows, integ = mod->t.integration, seq = mod->t.insertion == PR_INSERT_SEQUENTIAL;
    int d_out = io->y_dim;
    float s = gate_value(in);

    if (integ == PR_INTEGRATE_CUSTOM) {
        if (mod->gated)
            copy_rows(in->y_old, d_out, io->y, io->y_ld, rows, d_out);
        c.in = view2(io->x, rows, io->x_dim, io->x_ld);
        c.out = view2(io->y, rows, io->y_dim, io->y_ld);
        if ((rc = call(mod, in, mod->t.integrate_forward, "integrate_forward", &c, err)) || !mod->gated)
            return rc;
        /* gated: D = F - y_old (kept), y = y_old + s*D */
        for (int r = 0; r < rows; r++) {
            float *y = io->y + (size_t)r * io->y_ld, *dk = in->h_keep + (size_t)r * d_out;
            const float *yo = in->y_old + (size_t)r * d_out;
            for (int j = 0; j < d_out; j++) {
                dk[j] = y[j] - yo[j];
                y[j] = yo[j] + s * dk[j];
            }
        }
        return PR_OK;
    }
    if (integ == PR_INTEGRATE_WEIGHT_DELTA) {
        int din = in->dims.d_in;
        memset(in->dw, 0, (size_t)din * d_out * sizeof(float));
        c.in = view2(io->x, rows, io->x_dim, io->x_ld);
        c.out = view2(in->dw, din, d_out, d_out);
        if ((rc = call(mod, in, mod->t.merge, "merge", &c, err)))
            return rc;
        /* y (rows, d_out) += s * x (rows, d_in) . dW (d_in, d_out) */
        host_services()->gemm(0, 0, rows, d_out, din, s, io->x, io->x_ld, in->dw, d_out, 1.0f, io->y, io->y_ld);
        return PR_OK;
    }
    /* the module input: x, or a copy of y as it enters this hook */
    const float *inp = io->x;
    int in_ld = io->x_ld, in_w = io->x_dim;
    if (needs_y_old(mod)) {
        copy_rows(in->y_old, d_out, io->y, io->y_ld, rows, d_out);
        if (seq) {
            inp = in->y_old;
            in_ld = in_w = d_out;
        }
    }
    c.in = view2(inp, rows, in_w, in_ld);
    if (integ == PR_INTEGRATE_RESCALE) {
        memset(in->h_keep, 0, (size_t)in->w_out * sizeof(float));
        c.out = view2(in->h_keep, 1, in->w_out, in->w_out);
        if ((rc = call(mod, in, mod->t.forward, "forward", &c, err)))
            return rc;
        /* y (rows, d_out) *= h (1, d_out), or 1 + s*(h - 1) when gated */
        for (int r = 0; r < rows; r++) {
            float *y = io->y + (size_t)r * io->y_ld;
            for (int j = 0; j < d_out; j++)
                y[j] *= mod->gated ? 1.0f + s * (in->h_keep[j] - 1.0f) : in->h_keep[j];
        }
        return PR_OK;
    }
    /* addition forms: y += k * h */
    float *h = mod->gated ? in->h_keep : area_a;
    memset(h, 0, (size_t)rows * in->w_out * sizeof(float));
    c.out = view2(h, rows, in->w_out, in->w_out);
    if ((rc = call(mod, in, mod->t.forward, "forward", &c, err)))
        return rc;
    axpy_rows(io->y, io->y_ld, h, in->w_out, rows, d_out, add_coefficient(in));
    return PR_OK;
}

static int hook_backward(void *self, const pr_site_io *io, pr_error *err)
{
    insertion *in = self;
    pr_module *mod = in->mod;
    if (mod->merged || mod->fused_by)
        return PR_OK;
    float *area_a, *area_b;
    int rc = prepare_views(in, io->B, io->T, &area_a, &area_b, err);
    if (rc)
        return rc;
    pr_ctx c;
    ctx_init(in, &c, io->B, io->T, io->training, in->n_fwd ? in->n_fwd - 1 : 0);
    const pr_host *host = host_services();
    int rows = io->rows, integ = mod->t.integration, seq = mod->t.insertion == PR_INSERT_SEQUENTIAL;
    int d_out = io->y_dim, din_w = io->x_dim;
    float s = gate_value(in), *dg = gate_grad(in);

    /* where the module's input gradient goes */
    float *dx = io->dx;
    int dx_ld = io->x_ld;
    if (!dx) {
        memset(area_b, 0, (size_t)rows * din_w * sizeof(float));
        dx = area_b;
        dx_ld = din_w;
    }

    if (integ == PR_INTEGRATE_CUSTOM) {
        c.in = view2(io->x, rows, io->x_dim, io->x_ld);
        c.out = view2(io->y, rows, io->y_dim, io->y_ld);
        c.d_in = view2(dx, rows, din_w, dx_ld);
        if (!mod->gated) {
            c.d_out = view2(io->dy, rows, io->y_dim, io->y_ld);
            return call(mod, in, mod->t.integrate_backward, "integrate_backward", &c, err);
        }
        /* y = y_old + s*(F - y_old): dg += s(1-s) sum(dy * D); the technique
         * gets s*dy and replaces it by its gradient w.r.t. y_old through F;
         * dy_old = (1 - s)*dy + that */
        double acc = 0.0;
        for (int r = 0; r < rows; r++) {
            const float *dy = io->dy + (size_t)r * io->y_ld, *dk = in->h_keep + (size_t)r * d_out;
            float *b = area_a + (size_t)r * d_out;
            for (int j = 0; j < d_out; j++) {
                acc += (double)dy[j] * dk[j];
                b[j] = s * dy[j];
            }
        }
        if (dg)
            *dg += (float)(acc * s * (1.0 - s));
        c.d_out = view2(area_a, rows, d_out, d_out);
        if ((rc = call(mod, in, mod->t.integrate_backward, "integrate_backward", &c, err)))
            return rc;
        for (int r = 0; r < rows; r++) {
            float *dy = io->dy + (size_t)r * io->y_ld;
            const float *b = area_a + (size_t)r * d_out;
            for (int j = 0; j < d_out; j++)
                dy[j] = (1.0f - s) * dy[j] + b[j];
        }
        return PR_OK;
    }
    if (integ == PR_INTEGRATE_WEIGHT_DELTA) {
        int din = in->dims.d_in;
        /* G (d_in, d_out) = x^T dy; dx += s * dy . dW^T */
        host->gemm(1, 0, din, d_out, rows, 1.0f, io->x, io->x_ld, io->dy, io->y_ld, 0.0f, area_a, d_out);
        host->gemm(0, 1, rows, din, d_out, s, io->dy, io->y_ld, in->dw, d_out, 1.0f, dx, dx_ld);
        if (mod->gated) {
            /* dg += s(1-s) <dW, G>; the technique gets s*G */
            double acc = 0.0;
            size_t n = (size_t)din * d_out;
            for (size_t i = 0; i < n; i++) {
                acc += (double)in->dw[i] * area_a[i];
                area_a[i] *= s;
            }
            if (dg)
                *dg += (float)(acc * s * (1.0 - s));
        }
        c.in = view2(io->x, rows, io->x_dim, io->x_ld);
        c.out = view2(in->dw, din, d_out, d_out);
        c.d_out = view2(area_a, din, d_out, d_out);
        return call(mod, in, mod->t.backward, "backward", &c, err);
    }

    /* module input and the buffer its gradient accumulates into */
    const float *inp = io->x;
    int in_ld = io->x_ld, in_w = io->x_dim;
    float *d_inp = dx;
    int d_inp_ld = dx_ld;
    if (seq) {
        inp = in->y_old;
        in_ld = in_w = d_out;
        memset(area_b, 0, (size_t)rows * d_out * sizeof(float));
        d_inp = area_b;
        d_inp_ld = d_out;
    }
    c.in = view2(inp, rows, in_w, in_ld);
    c.d_in = view2(d_inp, rows, in_w, d_inp_ld);

    if (integ == PR_INTEGRATE_RESCALE) {
        /* S (1, d_out) = sum_rows dy * y_old; dy <- dy * h (ungated) or
         * dy * (1 + s(h - 1)) (gated, with dh = s*S and
         * dg += s(1-s) sum_j S_j (h_j - 1)) */
        memset(area_a, 0, (size_t)d_out * sizeof(float));
        for (int r = 0; r < rows; r++) {
            float *dy = io->dy + (size_t)r * io->y_ld;
            const float *yo = in->y_old + (size_t)r * d_out;
            for (int j = 0; j < d_out; j++) {
                area_a[j] += dy[j] * yo[j];
                dy[j] *= mod->gated ? 1.0f + s * (in->h_keep[j] - 1.0f) : in->h_keep[j];
            }
        }
        if (mod->gated) {
            double acc = 0.0;
            for (int j = 0; j < d_out; j++) {
                acc += (double)area_a[j] * (in->h_keep[j] - 1.0f);
                area_a[j] *= s;
            }
            if (dg)
                *dg += (float)(acc * s * (1.0 - s));
        }
        c.out = view2(in->h_keep, 1, in->w_out, in->w_out);
        c.d_out = view2(area_a, 1, in->w_out, in->w_out);
    } else {
        float k = add_coefficient(in);
        if (mod->gated) {
            /* y += k*h with k = c*s: dg += k(1-s) * sum(dy * h) */
            if (dg) {
                double acc = 0.0;
                for (int r = 0; r < rows; r++) {
                    const float *dy = io->dy + (size_t)r * io->y_ld, *h = in->h_keep + (size_t)r * in->w_out;
                    for (int j = 0; j < d_out; j++)
                        acc += (double)dy[j] * h[j];
                }
                *dg += (float)(acc * k * (1.0 - s));
            }
            c.out = view2(in->h_keep, rows, in->w_out, in->w_out);
        }
        if (integ == PR_INTEGRATE_DIRECT_ADD && !mod->gated) {
            c.d_out = view2(io->dy, rows, d_out, io->y_ld);
        } else {
            for (int r = 0; r < rows; r++) {
                const float *dy = io->dy + (size_t)r * io->y_ld;
                float *d = area_a + (size_t)r * d_out;
                for (int j = 0; j < d_out; j++)
                    d[j] = k * dy[j];
            }
            c.d_out = view2(area_a, rows, d_out, d_out);
        }
    }
    if ((rc = call(mod, in, mod->t.backward, "backward", &c, err)))
        return rc;
    if (seq)
        axpy_rows(io->dy, io->y_ld, area_b, d_out, rows, d_out, 1.0f);
    return PR_OK;
}

/* ---- concatenation providers --------------------------------------------------------------------- */

/* Gated: the technique fills P (kept), the model gets s*P. */
static int concat_forward(void *self, int site, int layer, float *out, pr_error *err)
{
    (void)site;
    (void)layer;
    insertion *in = self;
    pr_module *mod = in->mod;
    float *a, *b;
    int rc = prepare_views(in, 1, in->n_virtual, &a, &b, err);
    if (rc)
        return rc;
    pr_ctx c;
    ctx_init(in, &c, 1, in->n_virtual, pr_model_get_training(mod->model), in->n_fwd++);
    size_t n = (size_t)in->n_virtual * (size_t)in->w_out;
    c.out = view2(mod->gated ? in->h_keep : out, in->n_virtual, in->w_out, in->w_out);
    if ((rc = call(mod, in, mod->t.forward, "forward", &c, err)) || !mod->gated)
        return rc;
    float s = gate_value(in);
    for (size_t i = 0; i < n; i++)
        out[i] = s * in->h_keep[i];
    return PR_OK;
}

/* Gated: dg += s(1-s) sum(dout * P); the technique gets s*dout. */
static int concat_backward(void *self, int site, int layer, const float *dout, pr_error *err)
{
    (void)site;
    (void)layer;
    insertion *in = self;
    pr_module *mod = in->mod;
    float *a, *b;
    int rc = prepare_views(in, 1, in->n_virtual, &a, &b, err);
    if (rc)
        return rc;
    pr_ctx c;
    ctx_init(in, &c, 1, in->n_virtual, pr_model_get_training(mod->model), in->n_fwd ? in->n_fwd - 1 : 0);
    if (mod->gated) {
        size_t n = (size_t)in->n_virtual * (size_t)in->w_out;
        float s = gate_value(in), *dg = gate_grad(in);
        double acc = 0.0;
        for (size_t i = 0; i < n; i++) {
            acc += (double)dout[i] * in->h_keep[i];
            a[i] = s * dout[i];
        }
        if (dg)
            *dg += (float)(acc * s * (1.0 - s));
        dout = a;
        c.out = view2(in->h_keep, in->n_virtual, in->w_out, in->w_out);
    }
    c.d_out = view2(dout, in->n_virtual, in->w_out, in->w_out);
    return call(mod, in, mod->t.backward, "backward", &c, err);
}

/* ---- fusion (AdapterFusion) -------------------------------------------------------------------- */

/* The fusion module's technique: host code, not a plugin.  W_Q and W_K
 * start as normal(0, 0.02) (the BERT-style init of AdapterFusion's
 * reference implementation, adapter-transformers), W_V as the identity
 * with 1e-6 off the diagonal (Pfeiffer et al. 2021, section 3.2: a
 * diagonal of ones and small weights elsewhere, to keep the adapters'
 * representations), so the fusion starts as the mean of the fused
 * contributions. */
static int fusion_init(const pr_ctx *c)
{
    pr_tensor *v = &c->params[2];
    int64_t d = v->shape[0];
    float *w = v->data;
    for (int64_t i = 0; i < d; i++)
        for (int64_t j = 0; j < d; j++)
            w[i * d + j] = i == j ? 1.0f : 1e-6f;
    return 0;
}

static const pr_param_decl fusion_params[] = {
    { sizeof(pr_param_decl), "query", "d_out, d_out", PR_INIT_NORMAL, "0.02", PR_SCOPE_INSERTION, 0,
      "W_Q: query = y W_Q, y the site output", NULL },
    { sizeof(pr_param_decl), "key", "d_out, d_out", PR_INIT_NORMAL, "0.02", PR_SCOPE_INSERTION, 0,
      "W_K: key_i = h_i W_K, h_i a fused module's contribution", NULL },
    { sizeof(pr_param_decl), "value", "d_out, d_out", PR_INIT_CUSTOM, NULL, PR_SCOPE_INSERTION, 0,
      "W_V: value_i = h_i W_V; identity plus 1e-6 off the diagonal", NULL },
};

static const pr_technique fusion_technique = {
    .struct_size = sizeof(pr_technique),
    .abi_major = PR_ABI_MAJOR,
    .name = "adapter_fusion",
    .version = "1.0.0",
    .summary = "AdapterFusion: attention over the contributions of frozen modules at one site",
    .citation = "Pfeiffer, Kamath, Rueckle, Cho, Gurevych 2021, AdapterFusion: Non-Destructive Task Composition "
                "for Transfer Learning, arXiv 2005.00247",
    .license = "MIT",
    .intra = PR_INTRA_ATTENTION,
    .inter = PR_INTER_FIXED,
    .adaptation = PR_ADAPT_ADDITION,
    .sharing = PR_SHARE_NONE,
    .input = PR_INPUT_HIDDEN,
    .insertion = PR_INSERT_SEQUENTIAL,
    .insertions = PR_INSERTIONS_PER_SITE_LAYER,
    .integration = PR_INTEGRATE_CUSTOM,
    .sites = (1u << PR_SITE_COUNT) - 1,
    .params = fusion_params,
    .n_params = 3,
    .param_formula = "3 * d_out^2 per insertion",
    .init = fusion_init,
};

/* A fusion insertion's saved block for `rows` positions and n fused
 * modules: yq, Q (rows, d); H, K, V (n, rows, d); A (rows, n). */
typedef struct fusion_bufs {
    float *yq, *q, *h, *k, *v, *a;
} fusion_bufs;

static size_t fusion_block_floats(const insertion *in, size_t rows)
{
    size_t rd = round_up(rows * (size_t)in->dims.d_out), n = (size_t)in->mod->n_kids;
    return rd * (2 + 3 * n) + round_up(rows * n);
}

static fusion_bufs fusion_views(const insertion *in, size_t rows)
{
    size_t rd = round_up(rows * (size_t)in->dims.d_out), n = (size_t)in->mod->n_kids;
    fusion_bufs f;
    f.yq = in->fu;
    f.q = f.yq + rd;
    f.h = f.q + rd;
    f.k = f.h + n * rd;
    f.v = f.k + n * rd;
    f.a = f.v + n * rd;
    return f;
}

/* Scratch of a fusion backward: dQ, dK, dV, dH, dyq (rows, d); dS (rows, n);
 * dx when the site input needs no gradient (rows, d_in). */
static size_t fusion_scratch_floats(const insertion *in, size_t rows)
{
    return 5 * round_up(rows * (size_t)in->dims.d_out) + round_up(rows * (size_t)in->mod->n_kids) +
           round_up(rows * (size_t)in->dims.d_in);
}

static int fusion_reserve(void *self, int B, int T, pr_error *err)
{
    insertion *in = self;
    pr_module *mod = in->mod;
    int rc;
    for (int i = 0; i < mod->n_kids; i++)
        if ((rc = reserve_insertion(&mod->kids[i]->ins[in->index], B, T, err)))
            return rc;
    if (in->fu && B <= in->res_B && T <= in->res_T)
        return PR_OK;
    if (in->fu) {
        B = B > in->res_B ? B : in->res_B;
        T = T > in->res_T ? T : in->res_T;
    }
    size_t rows = (size_t)B * (size_t)T, nb = fusion_block_floats(in, rows), ns = fusion_scratch_floats(in, rows);
    float *block = alloc_floats(nb);
    if (!block)
        return pr_errorf(err, PR_ERR_NOMEM, "fusion '%s' at %s: out of memory for saved activations (B=%d, T=%d)",
                         mod_name(mod), in->where, B, T);
    rc = grow_scratch(mod, ns, "fusion", err);
    if (rc) {
        free(block);
        return rc;
    }
    free(in->block);
    in->block = in->fu = block;
    in->block_floats = nb;
    in->res_B = B;
    in->res_T = T;
    return PR_OK;
}

/* The context of fused module `kid`'s call at the fusion insertion's
 * site: its input is the site input x (parallel) or yq, the site output
 * as the fusion received it (sequential). */
static int fusion_kid_ctx(const insertion *ki, const pr_site_io *io, const float *yq, uint64_t step, pr_ctx *c,
                          pr_error *err)
{
    float *a, *b;
    int rc = prepare_views((insertion *)ki, io->B, io->T, &a, &b, err);
    if (rc)
        return rc;
    ctx_init(ki, c, io->B, io->T, io->training, step);
    if (ki->mod->t.insertion == PR_INSERT_SEQUENTIAL)
        c->in = view2(yq, io->rows, io->y_dim, io->y_dim);
    else
        c->in = view2(io->x, io->rows, io->x_dim, io->x_ld);
    return PR_OK;
}

/* Forward at one site, rows r, d = d_out, n fused modules:
 *   h_i = k_i f_i(input_i)          each fused module's contribution
 *   q = y W_Q, key_i = h_i W_K, v_i = h_i W_V
 *   a_i = softmax_i(q . key_i)      per row, no temperature
 *   y <- y + sum_i a_i v_i */
static int fusion_forward(void *self, const pr_site_io *io, pr_error *err)
{
    insertion *in = self;
    pr_module *mod = in->mod;
    if (!in->fu || io->B > in->res_B || io->T > in->res_T)
        return pr_errorf(err, PR_ERR_INVALID,
                         "fusion '%s' at %s: batch B=%d x T=%d exceeds what pr_model_reserve planned (B=%d x T=%d)",
                         mod_name(mod), in->where, io->B, io->T, in->res_B, in->res_T);
    const pr_host *host = host_services();
    int rows = io->rows, d = io->y_dim, n = mod->n_kids, rc;
    size_t rd = (size_t)rows * d, stride = round_up(rd);
    fusion_bufs f = fusion_views(in, (size_t)rows);
    const float *wq = in->params[0].data, *wk = in->params[1].data, *wv = in->params[2].data;
    copy_rows(f.yq, d, io->y, io->y_ld, rows, d);
    for (int i = 0; i < n; i++) {
        insertion *ki = &mod->kids[i]->ins[in->index];
        pr_ctx c;
        if ((rc = fusion_kid_ctx(ki, io, f.yq, ki->n_fwd++, &c, err)))
            return rc;
        float *h = f.h + (size_t)i * stride;
        memset(h, 0, rd * sizeof(float));
        c.out = view2(h, rows, d, d);
        if ((rc = call(ki->mod, ki, ki->mod->t.forward, "forward", &c, err)))
            return rc;
        float k = add_coefficient(ki);
        if (k != 1.0f)
            for (size_t j = 0; j < rd; j++)
                h[j] *= k;
        host->gemm(0, 0, rows, d, d, 1.0f, h, d, wk, d, 0.0f, f.k + (size_t)i * stride, d);
        host->gemm(0, 0, rows, d, d, 1.0f, h, d, wv, d, 0.0f, f.v + (size_t)i * stride, d);
    }
    host->gemm(0, 0, rows, d, d, 1.0f, f.yq, d, wq, d, 0.0f, f.q, d);
    for (int r = 0; r < rows; r++) {
        float *ar = f.a + (size_t)r * n;
        const float *qr = f.q + (size_t)r * d;
        for (int i = 0; i < n; i++) {
            const float *kr = f.k + (size_t)i * stride + (size_t)r * d;
            double sc = 0.0;
            for (int j = 0; j < d; j++)
                sc += (double)qr[j] * kr[j];
            ar[i] = (float)sc;
        }
    }
    host->softmax_rows(f.a, rows, n);
    for (int r = 0; r < rows; r++) {
        float *y = io->y + (size_t)r * io->y_ld;
        for (int i = 0; i < n; i++) {
            const float *vr = f.v + (size_t)i * stride + (size_t)r * d;
            float a = f.a[(size_t)r * n + i];
            for (int j = 0; j < d; j++)
                y[j] += a * vr[j];
        }
    }
    return PR_OK;
}

/* Backward, dy the gradient of the y the fusion left:
 *   dA_i = dy . v_i;  dS = A * (dA - sum_j A_j dA_j)      (softmax)
 *   dq = sum_i dS_i key_i;  dkey_i = dS_i q;  dv_i = A_i dy
 *   dW_Q += yq^T dq;  dW_K += sum_i h_i^T dkey_i;  dW_V += sum_i h_i^T dv_i
 *   dh_i = dkey_i W_K^T + dv_i W_V^T, handed to module i's backward as
 *   k_i dh_i (its input gradient goes to dx, or to dyq when it reads y)
 *   dy <- dy + dq W_Q^T + (sequential modules' input gradients). */
static int fusion_backward(void *self, const pr_site_io *io, pr_error *err)
{
    insertion *in = self;
    pr_module *mod = in->mod;
    if (!in->fu || io->B > in->res_B || io->T > in->res_T)
        return pr_errorf(err, PR_ERR_INVALID, "fusion '%s' at %s: backward without a planned forward", mod_name(mod),
                         in->where);
    const pr_host *host = host_services();
    int rows = io->rows, d = io->y_dim, n = mod->n_kids, rc;
    size_t rd = (size_t)rows * d, stride = round_up(rd);
    fusion_bufs f = fusion_views(in, (size_t)rows);
    const float *wq = in->params[0].data, *wk = in->params[1].data, *wv = in->params[2].data;
    float *gq = in->grads[0].data, *gk = in->grads[1].data, *gv = in->grads[2].data;
    float *dq = mod->scratch, *dk = dq + stride, *dv = dk + stride, *dh = dv + stride, *dyq = dh + stride;
    float *ds = dyq + stride, *dxs = ds + round_up((size_t)rows * n);
    float *dx = io->dx;
    int dx_ld = io->x_ld;
    if (!dx) {
        memset(dxs, 0, (size_t)rows * io->x_dim * sizeof(float));
        dx = dxs;
        dx_ld = io->x_dim;
    }
    /* the softmax */
    for (int r = 0; r < rows; r++) {
        const float *dy = io->dy + (size_t)r * io->y_ld, *ar = f.a + (size_t)r * n;
        float *sr = ds + (size_t)r * n;
        double m = 0.0;
        for (int i = 0; i < n; i++) {
            const float *vr = f.v + (size_t)i * stride + (size_t)r * d;
            double da = 0.0;
            for (int j = 0; j < d; j++)
                da += (double)dy[j] * vr[j];
            sr[i] = (float)da;
            m += ar[i] * da;
        }
        for (int i = 0; i < n; i++)
            sr[i] = ar[i] * (float)(sr[i] - m);
    }
    /* the query path */
    memset(dq, 0, rd * sizeof(float));
    for (int r = 0; r < rows; r++)
        for (int i = 0; i < n; i++)
            axpy_rows(dq + (size_t)r * d, d, f.k + (size_t)i * stride + (size_t)r * d, d, 1, d, ds[(size_t)r * n + i]);
    if (gq)
        host->gemm(1, 0, d, d, rows, 1.0f, f.yq, d, dq, d, 1.0f, gq, d);
    host->gemm(0, 1, rows, d, d, 1.0f, dq, d, wq, d, 0.0f, dyq, d);
    /* keys, values and the fused modules */
    for (int i = 0; i < n; i++) {
        const float *h = f.h + (size_t)i * stride;
        for (int r = 0; r < rows; r++) {
            float sv = ds[(size_t)r * n + i], av = f.a[(size_t)r * n + i];
            const float *qr = f.q + (size_t)r * d, *dy = io->dy + (size_t)r * io->y_ld;
            float *dkr = dk + (size_t)r * d, *dvr = dv + (size_t)r * d;
            for (int j = 0; j < d; j++) {
                dkr[j] = sv * qr[j];
                dvr[j] = av * dy[j];
            }
        }
        if (gk)
            host->gemm(1, 0, d, d, rows, 1.0f, h, d, dk, d, 1.0f, gk, d);
        if (gv)
            host->gemm(1, 0, d, d, rows, 1.0f, h, d, dv, d, 1.0f, gv, d);
        insertion *ki = &mod->kids[i]->ins[in->index];
        float k = add_coefficient(ki);
        host->gemm(0, 1, rows, d, d, k, dk, d, wk, d, 0.0f, dh, d);
        host->gemm(0, 1, rows, d, d, k, dv, d, wv, d, 1.0f, dh, d);
        pr_ctx c;
        if ((rc = fusion_kid_ctx(ki, io, f.yq, ki->n_fwd ? ki->n_fwd - 1 : 0, &c, err)))
            return rc;
        c.d_out = view2(dh, rows, d, d);
        if (ki->mod->t.insertion == PR_INSERT_SEQUENTIAL)
            c.d_in = view2(dyq, rows, d, d);
        else
            c.d_in = view2(dx, rows, io->x_dim, dx_ld);
        if ((rc = call(ki->mod, ki, ki->mod->t.backward, "backward", &c, err)))
            return rc;
    }
    axpy_rows(io->dy, io->y_ld, dyq, d, rows, d, 1.0f);
    return PR_OK;
}

/* ---- initialisation ------------------------------------------------------------------------------ */

/* The init of a parameter: its decl's init, or the pr_init named by the
 * choice of its init_option (plugin.h) in the insertion's options. */
static int param_init(const pr_module *mod, const pr_param_decl *p, const pr_option_value *opts, int *init,
                      pr_error *err)
{
    static const char *const names[] = {
        [PR_INIT_ZEROS] = "zeros", [PR_INIT_ONES] = "ones", [PR_INIT_NORMAL] = "normal",
        [PR_INIT_UNIFORM] = "uniform", [PR_INIT_KAIMING_UNIFORM] = "kaiming_uniform",
        [PR_INIT_EMBED_ROWS] = "embed_rows", [PR_INIT_TEXT] = "text", [PR_INIT_CONSTANT] = "constant",
    };
    *init = p->init;
    if (!p->init_option)
        return PR_OK;
    int oi = option_index(mod, p->init_option);
    if (oi < 0 || mod->opt[oi].type != PR_OPT_ENUM)
        return pr_errorf(err, PR_ERR_INVALID, "module '%s': parameter '%s': init_option '%s' is not an enum option",
                         mod_name(mod), p->name, p->init_option);
    const char *choice = opts[oi].str;
    for (int k = 0; k < (int)(sizeof names / sizeof names[0]); k++)
        if (names[k] && choice && strcmp(names[k], choice) == 0) {
            *init = k;
            return PR_OK;
        }
    return pr_errorf(err, PR_ERR_INVALID, "module '%s': parameter '%s': option '%s' = '%s' is not an init (zeros, ones, "
                     "normal, uniform, kaiming_uniform, embed_rows, text, constant)", mod_name(mod), p->name,
                     p->init_option, choice ? choice : "");
}

static int init_copy(pr_module *mod, const pr_module_spec *spec, param_copy *pc, pr_error *err)
{
    float *x = mod->params + pc->off;
    size_t n = (size_t)pc->numel;
    if (pc->decl < 0) { /* a gate: sigmoid(0) = 1/2 */
        x[0] = 0.0f;
        return PR_OK;
    }
    const pr_param_decl *p = &mod->pd[pc->decl];
    const insertion *in = &mod->ins[pc->first_ins];
    expr_var v[MAX_VARS];
    char e[256];
    int nv = model_vars(mod, &in->dims, in->opts, v);
    double arg = 0.0;
    if (p->init_arg && expr_eval(p->init_arg, v, nv, &arg, e, sizeof e))
        return pr_errorf(err, PR_ERR_INVALID, "module '%s': parameter '%s' init_arg '%s': %s", mod_name(mod), p->name,
                         p->init_arg, e);
    const pr_host *h = host_services();
    uint64_t st = host_hash_str(mod->seed, p->name) ^ host_mix64((uint64_t)pc->ordinal + 1);
    int init, rc0 = param_init(mod, p, in->opts, &init, err);
    if (rc0)
        return rc0;
    switch (init) {
    case PR_INIT_ZEROS:
        memset(x, 0, n * sizeof(float));
        break;
    case PR_INIT_ONES:
    case PR_INIT_CONSTANT: {
        float val = init == PR_INIT_ONES ? 1.0f : (float)arg;
        for (size_t i = 0; i < n; i++)
            x[i] = val;
        break;
    }
    case PR_INIT_NORMAL:
        for (size_t i = 0; i < n; i++)
            x[i] = (float)arg * h->rng_normal(&st);
        break;
    case PR_INIT_UNIFORM:
    case PR_INIT_KAIMING_UNIFORM: {
        double b = arg;
        if (init == PR_INIT_KAIMING_UNIFORM) /* He et al. 2015, PyTorch's kaiming_uniform_ */
            b = sqrt(6.0 / ((1.0 + arg * arg) * (double)pc->shape[pc->ndim - 1]));
        for (size_t i = 0; i < n; i++)
            x[i] = (float)((2.0 * h->rng_uniform(&st) - 1.0) * b);
        break;
    }
    case PR_INIT_EMBED_ROWS:
    case PR_INIT_TEXT: {
        const pr_tensor_info *wte = pr_model_find_tensor(mod->model, "wte.weight");
        int C = in->dims.d_model, V = in->dims.vocab;
        if (!wte || !wte->data)
            return pr_errorf(err, PR_ERR_INVALID, "module '%s': parameter '%s' copies token embeddings, but the model has none",
                             mod_name(mod), p->name);
        if (pc->shape[pc->ndim - 1] != C)
            return pr_errorf(err, PR_ERR_INVALID,
                             "module '%s': parameter '%s' copies embedding rows, so its last dimension must be d_model = %d (got %lld)",
                             mod_name(mod), p->name, C, (long long)pc->shape[pc->ndim - 1]);
        size_t nrows = n / (size_t)C;
        int *ids = NULL;
        size_t n_ids = 0;
        if (init == PR_INIT_TEXT) {
            int oi = option_index(mod, "init_text");
            const char *text = oi >= 0 ? in->opts[oi].str : NULL;
            if (!text || !*text)
                return pr_errorf(err, PR_ERR_INVALID, "module '%s': parameter '%s' is initialised from text, but option "
                                 "'init_text' is %s", mod_name(mod), p->name, oi < 0 ? "not declared" : "empty");
            if (!spec->tokenizer)
                return pr_errorf(err, PR_ERR_INVALID, "module '%s': parameter '%s' is initialised from text; a tokenizer is needed",
                                 mod_name(mod), p->name);
            int rc = pr_tokenizer_encode(spec->tokenizer, text, strlen(text), &ids, &n_ids, err);
            if (rc)
                return rc;
            if (n_ids == 0) {
                free(ids);
                return pr_errorf(err, PR_ERR_INVALID, "module '%s': init_text '%s' encodes to no tokens", mod_name(mod), text);
            }
        }
        for (size_t r = 0; r < nrows; r++) {
            int id = ids ? ids[r % n_ids] : (int)(h->rng_next(&st) % (uint64_t)V);
            if (id < 0 || id >= V) {
                free(ids);
                return pr_errorf(err, PR_ERR_INVALID, "module '%s': init_text token id %d is outside the vocabulary [0, %d)",
                                 mod_name(mod), id, V);
            }
            memcpy(x + r * (size_t)C, wte->data + (size_t)id * C, (size_t)C * sizeof(float));
        }
        free(ids);
        break;
    }
    case PR_INIT_CUSTOM:
        break; /* the init() callback, after every other parameter */
    default:
        return pr_errorf(err, PR_ERR_INVALID, "module '%s': parameter '%s' has unknown init %d", mod_name(mod), p->name,
                         init);
    }
    return PR_OK;
}

/* ---- attach ---------------------------------------------------------------------------------------- */

static void fill_views(pr_module *mod)
{
    for (int k = 0; k < mod->n_ins; k++) {
        insertion *in = &mod->ins[k];
        for (uint32_t i = 0; i < mod->t.n_params; i++) {
            const param_copy *pc = &mod->copies[in->copy[i]];
            in->params[i] = view(mod->params + pc->off, pc->ndim, pc->shape);
            in->grads[i] = view(pc->trained ? mod->grads + pc->goff : NULL, pc->ndim, pc->shape);
        }
    }
}

/* Shape [rows, cols] of the frozen weight a site folds into
 * (pr_model_site_weight): a projection's own [d_in, d_out]; for attn.k and
 * attn.v the key / value projection [d_model, d_out] (a rescaling scales
 * its columns and bias); for ffn.act the down projection [d_ff, d_model]
 * (a rescaling scales its rows).  0 for sites without one. */
static int site_weight_shape(const insertion *in, int64_t *rows, int64_t *cols)
{
    const pr_dims *d = &in->dims;
    if (pr_site_is_projection(in->site)) {
        *rows = d->d_in;
        *cols = d->d_out;
    } else if (in->site == PR_SITE_ATTN_K || in->site == PR_SITE_ATTN_V) {
        *rows = d->d_model;
        *cols = d->d_out;
    } else if (in->site == PR_SITE_FFN_ACT) {
        *rows = d->d_out;
        *cols = d->d_model;
    } else {
        return 0;
    }
    return 1;
}

static int alloc_module(pr_module *mod, pr_error *err)
{
    mod->params = alloc_floats(mod->n_param_floats);
    mod->grads = mod->n_grad_floats ? alloc_floats(mod->n_grad_floats) : NULL;
    if (!mod->params || (mod->n_grad_floats && !mod->grads))
        return pr_errorf(err, PR_ERR_NOMEM, "module '%s': out of memory for %zu parameters", mod_name(mod),
                         mod->n_param_floats);
    uint32_t np = mod->t.n_params ? mod->t.n_params : 1;
    for (int k = 0; k < mod->n_ins; k++) {
        insertion *in = &mod->ins[k];
        in->params = calloc(np, sizeof *in->params);
        in->grads = calloc(np, sizeof *in->grads);
        in->saved = calloc(mod->t.n_saved ? mod->t.n_saved : 1, sizeof *in->saved);
        in->scratch = calloc(mod->t.n_scratch ? mod->t.n_scratch : 1, sizeof *in->scratch);
        if (!in->params || !in->grads || !in->saved || !in->scratch)
            return pr_errorf(err, PR_ERR_NOMEM, "module '%s': out of memory", mod_name(mod));
        if (mod->t.integration == PR_INTEGRATE_RESCALE &&
            !(in->h_keep = alloc_floats((size_t)in->w_out)))
            return pr_errorf(err, PR_ERR_NOMEM, "module '%s': out of memory", mod_name(mod));
        if (mod->t.integration == PR_INTEGRATE_WEIGHT_DELTA &&
            !(in->dw = alloc_floats((size_t)in->dims.d_in * (size_t)in->dims.d_out)))
            return pr_errorf(err, PR_ERR_NOMEM, "module '%s': out of memory", mod_name(mod));
        int64_t wr, wc;
        if (site_weight_shape(in, &wr, &wc)) {
            float *w = NULL, *b = NULL;
            int ld = 0;
            pr_error e2 = { 0 };
            if (pr_model_site_weight(mod->model, in->site, in->layer, &w, &ld, &b, &e2) == PR_OK && w) {
                in->bw = view2(w, wr, wc, ld);
                in->has_bw = 1;
                if (b) {
                    in->bb = view(b, 1, &wc);
                    in->has_bb = 1;
                }
            }
        }
    }
    fill_views(mod);
    return PR_OK;
}

static int register_tensors(pr_module *mod, pr_error *err)
{
    for (int c = 0; c < mod->n_copies; c++) {
        const param_copy *pc = &mod->copies[c];
        int rc = pr_model_add_tensor(mod->model, pc->name, pc->ndim, pc->shape, mod->params + pc->off,
                                     pc->trained ? mod->grads + pc->goff : NULL, err);
        if (rc)
            return rc;
    }
    return PR_OK;
}

static int init_params(pr_module *mod, const pr_module_spec *spec, pr_error *err)
{
    int rc;
    /* the scale() callback first: init() and setup() see ctx->scale */
    for (int k = 0; k < mod->n_ins && mod->t.scale; k++) {
        insertion *in = &mod->ins[k];
        pr_ctx c;
        ctx_init(in, &c, 0, 0, 0, 0);
        in->scale = mod->t.scale(&c);
        if (!isfinite(in->scale))
            return pr_errorf(err, PR_ERR_NUMERIC, "module '%s' at %s: scale() returned a non-finite value",
                             mod_name(mod), in->where);
    }
    for (int c = 0; c < mod->n_copies; c++)
        if ((rc = init_copy(mod, spec, &mod->copies[c], err)))
            return rc;
    /* init(): once per insertion that first uses a PR_INIT_CUSTOM copy */
    for (int k = 0; k < mod->n_ins; k++) {
        insertion *in = &mod->ins[k];
        int owns = 0;
        for (uint32_t i = 0; i < mod->t.n_params && !owns; i++)
            owns = mod->pd[i].init == PR_INIT_CUSTOM && mod->copies[in->copy[i]].first_ins == k;
        if (!owns)
            continue;
        pr_ctx c;
        ctx_init(in, &c, 0, 0, 0, UINT64_MAX - 1);
        if ((rc = call(mod, in, mod->t.init, "init", &c, err)))
            return rc;
    }
    for (int k = 0; k < mod->n_ins && mod->t.setup; k++) {
        insertion *in = &mod->ins[k];
        pr_ctx c;
        ctx_init(in, &c, 0, 0, 0, UINT64_MAX - 2);
        if ((rc = call(mod, in, mod->t.setup, "setup", &c, err)))
            return rc;
    }
    return PR_OK;
}

/* The site hook of an insertion: the integration forms above, or a
 * fusion module's. */
static pr_site_hook hook_of(insertion *in)
{
    pr_site_hook h = { hook_forward, hook_backward, in, hook_reserve };
    if (in->mod->n_kids) {
        h.forward = fusion_forward;
        h.backward = fusion_backward;
        h.reserve = fusion_reserve;
    }
    return h;
}

static int attach_integration(pr_module *mod, pr_error *err)
{
    int rc;
    if (is_select(mod)) {
        for (int i = 0; i < mod->n_selected; i++)
            if ((rc = pr_model_set_trainable(mod->model, mod->selected[i], 1, err)))
                return rc;
        return PR_OK;
    }
    for (int k = 0; k < mod->n_ins; k++) {
        insertion *in = &mod->ins[k];
        if (is_concat(mod)) {
            if ((rc = reserve_insertion(in, 1, in->n_virtual, err)))
                return rc;
            pr_concat_provider p = { in->n_virtual, concat_forward, concat_backward, in };
            rc = pr_model_attach_concat(mod->model, in->site, in->layer, &p, err);
        } else {
            pr_site_hook h = hook_of(in);
            rc = pr_model_attach_hook(mod->model, in->site, in->layer, &h, err);
        }
        if (rc)
            return rc;
        mod->hooks_attached = 1;
    }
    return PR_OK;
}

static void undo_selection(pr_module *mod)
{
    for (int i = 0; i < mod->n_selected; i++)
        pr_model_set_trainable(mod->model, mod->selected[i], 0, NULL);
}

/* Undo a failed attach: the model's hook and concatenation lists cannot
 * drop one entry, so they are rebuilt, in attach order, from the modules
 * that stay. */
static void reattach_others(pr_model *m, const pr_module *except)
{
    pr_model_detach_hooks(m);
    model_entry *e = entry_of(m, 0);
    for (int i = 0; e && i < e->n; i++) {
        pr_module *o = e->mods[i];
        if (o == except || is_select(o))
            continue;
        for (int k = 0; k < o->n_ins; k++) {
            insertion *in = &o->ins[k];
            if (is_concat(o)) {
                pr_concat_provider p = { in->n_virtual, concat_forward, concat_backward, in };
                pr_model_attach_concat(m, in->site, in->layer, &p, NULL);
            } else {
                pr_site_hook h = hook_of(in);
                pr_model_attach_hook(m, in->site, in->layer, &h, NULL);
            }
        }
    }
}

static void prefix_of(const pr_module *mod, char *buf, size_t len)
{
    snprintf(buf, len, "%s/", mod_name(mod));
}

/* 1 when a module of m, or a module a fusion of m combines, is named name. */
static int name_taken(const pr_model *m, const char *name)
{
    const model_entry *e = entry_of(m, 0);
    for (int i = 0; e && i < e->n; i++) {
        if (strcmp(e->mods[i]->name, name) == 0)
            return 1;
        for (int k = 0; k < e->mods[i]->n_kids; k++)
            if (strcmp(e->mods[i]->kids[k]->name, name) == 0)
                return 1;
    }
    return 0;
}

/* A fusion module takes its fused modules out of the model's list and
 * the hook lists are rebuilt without their hooks (the fusion runs them). */
static void adopt_kids(pr_model *m, pr_module *mod)
{
    model_entry *e = entry_of(m, 0);
    for (int k = 0; k < mod->n_kids; k++) {
        mod->kids[k]->fused_by = mod;
        for (int i = 0; e && i < e->n; i++)
            if (e->mods[i] == mod->kids[k]) {
                memmove(e->mods + i, e->mods + i + 1, (size_t)(e->n - i - 1) * sizeof *e->mods);
                e->n--;
                break;
            }
    }
    reattach_others(m, NULL);
}

/* pr_module_attach, and for a fusion module (n_kids > 0) the modules it
 * combines, whose insertions match its own one for one. */
static int attach_impl(pr_model *m, const pr_module_spec *spec, pr_module *const *kids, int n_kids, pr_module **out,
                       pr_error *err)
{
    if (out)
        *out = NULL;
    pr_module *mod = NULL;
    int rc = module_resolve(m, spec, &mod, err);
    if (rc) {
        module_free(mod);
        return rc;
    }
    if (name_taken(m, mod->name)) {
        rc = pr_errorf(err, PR_ERR_INVALID, "module '%s': the model already has a module of that name; give it "
                       "another name", mod->name);
        module_free(mod);
        return rc;
    }
    if (n_kids > 0) {
        mod->kids = malloc((size_t)n_kids * sizeof *mod->kids);
        if (!mod->kids) {
            module_free(mod);
            return pr_errorf(err, PR_ERR_NOMEM, "module: out of memory");
        }
        memcpy(mod->kids, kids, (size_t)n_kids * sizeof *mod->kids);
        mod->n_kids = n_kids;
        for (int i = 0; i < n_kids; i++) {
            int same = kids[i]->n_ins == mod->n_ins;
            for (int k = 0; same && k < mod->n_ins; k++)
                same = kids[i]->ins[k].site == mod->ins[k].site && kids[i]->ins[k].layer == mod->ins[k].layer;
            if (!same) {
                rc = pr_errorf(err, PR_ERR_INVALID, "fusion '%s': module '%s' has other insertions than the fusion",
                               mod->name, kids[i]->name);
                mod->n_kids = 0;
                module_free(mod);
                return rc;
            }
        }
    }
    char prefix[256];
    prefix_of(mod, prefix, sizeof prefix);
    if ((rc = alloc_module(mod, err)) || (rc = register_tensors(mod, err)) || (rc = init_params(mod, spec, err)) ||
        (rc = attach_integration(mod, err))) {
        pr_error keep = { 0 };
        if (err)
            keep = *err;
        pr_model_remove_tensors(m, prefix);
        undo_selection(mod);
        if (mod->hooks_attached)
            reattach_others(m, mod);
        mod->n_kids = 0;
        module_free(mod);
        if (err)
            *err = keep;
        return rc;
    }
    if (entry_add(m, mod)) {
        pr_model_remove_tensors(m, prefix);
        undo_selection(mod);
        reattach_others(m, mod);
        mod->n_kids = 0;
        module_free(mod);
        return pr_errorf(err, PR_ERR_NOMEM, "module: out of memory");
    }
    if (mod->n_kids)
        adopt_kids(m, mod);
    if (out)
        *out = mod;
    return PR_OK;
}

int pr_module_attach(pr_model *m, const pr_module_spec *spec, pr_module **out, pr_error *err)
{
    if (spec && spec->technique == &fusion_technique) {
        if (out)
            *out = NULL;
        return pr_errorf(err, PR_ERR_INVALID, "module '%s': %s combines attached modules; attach it with "
                         "pr_module_fuse", spec->name ? spec->name : fusion_technique.name, fusion_technique.name);
    }
    return attach_impl(m, spec, NULL, 0, out, err);
}

/* ---- merge ---------------------------------------------------------------------------------------- */

/* The weight view is [bw.shape[0], bw.shape[1]] (the site's d_in x d_out
 * at a projection site, see site_weight_shape at a stream site); the
 * bias, when there is one, has bw.shape[1] entries. */
static void restore_insertion(insertion *in)
{
    if (!in->orig_w)
        return;
    int rows = (int)in->bw.shape[0], cols = (int)in->bw.shape[1];
    copy_rows(in->bw.data, (int)in->bw.stride[0], in->orig_w, cols, rows, cols);
    if (in->orig_b)
        memcpy(in->bb.data, in->orig_b, (size_t)cols * sizeof(float));
    free(in->orig_w);
    free(in->orig_b);
    in->orig_w = in->orig_b = NULL;
}

int pr_module_merge(pr_module *mod, pr_error *err)
{
    if (!mod)
        return pr_errorf(err, PR_ERR_INVALID, "merge: NULL module");
    if (!mod->t.merge)
        return pr_errorf(err, PR_ERR_UNSUPPORTED, "module '%s' (technique %s) cannot be merged: the technique has no merge()",
                         mod_name(mod), mod->t.name);
    if (mod->merged)
        return pr_errorf(err, PR_ERR_INVALID, "module '%s' is already merged", mod_name(mod));
    if (mod->gated && mod->t.integration == PR_INTEGRATE_RESCALE)
        return pr_errorf(err, PR_ERR_UNSUPPORTED, "module '%s' (technique %s) cannot be merged: a gated rescaling "
                         "1 + s*(h - 1) is not what merge() folds", mod_name(mod), mod->t.name);
    if (mod->fused_by)
        return pr_errorf(err, PR_ERR_UNSUPPORTED, "module '%s' cannot be merged: fusion '%s' combines it",
                         mod_name(mod), mod_name(mod->fused_by));
    for (int k = 0; k < mod->n_ins; k++)
        if (!mod->ins[k].has_bw)
            return pr_errorf(err, PR_ERR_UNSUPPORTED,
                             "module '%s' (technique %s) cannot be merged at %s: the site has no frozen weight to fold into",
                             mod_name(mod), mod->t.name, mod->ins[k].where);
    size_t maxn = 0, maxb = 0;
    for (int k = 0; k < mod->n_ins; k++) {
        size_t n = (size_t)mod->ins[k].bw.shape[0] * (size_t)mod->ins[k].bw.shape[1];
        maxn = n > maxn ? n : maxn;
        maxb = (size_t)mod->ins[k].bw.shape[1] > maxb ? (size_t)mod->ins[k].bw.shape[1] : maxb;
    }
    /* the weight delta, then the bias delta */
    float *delta = alloc_floats(maxn + maxb);
    if (!delta)
        return pr_errorf(err, PR_ERR_NOMEM, "module '%s': out of memory for merging", mod_name(mod));
    float *bdelta = delta + maxn;
    int rc = PR_OK, k;
    for (k = 0; k < mod->n_ins; k++) {
        insertion *in = &mod->ins[k];
        int din = (int)in->bw.shape[0], dout = (int)in->bw.shape[1], ld = (int)in->bw.stride[0];
        in->orig_w = alloc_floats((size_t)din * dout);
        in->orig_b = in->has_bb ? alloc_floats((size_t)dout) : NULL;
        if (!in->orig_w || (in->has_bb && !in->orig_b)) {
            rc = pr_errorf(err, PR_ERR_NOMEM, "module '%s': out of memory for merging", mod_name(mod));
            free(in->orig_w);
            free(in->orig_b);
            in->orig_w = in->orig_b = NULL;
            break;
        }
        float *w = in->bw.data;
        copy_rows(in->orig_w, dout, w, ld, din, dout);
        if (in->orig_b)
            memcpy(in->orig_b, in->bb.data, (size_t)dout * sizeof(float));
        memset(delta, 0, (size_t)din * dout * sizeof(float));
        memset(bdelta, 0, (size_t)dout * sizeof(float));
        pr_ctx c;
        ctx_init(in, &c, 0, 0, 0, UINT64_MAX - 3);
        c.out = view2(delta, din, dout, dout);
        int64_t nb = dout;
        pr_tensor bd = view(bdelta, 1, &nb);
        c.bias_delta = in->has_bb ? &bd : NULL;
        if ((rc = call(mod, in, mod->t.merge, "merge", &c, err))) {
            free(in->orig_w);
            free(in->orig_b);
            in->orig_w = in->orig_b = NULL;
            break;
        }
        /* a gated module adds s times its delta */
        float s = gate_value(in);
        axpy_rows(w, ld, delta, dout, din, dout, s);
        if (in->has_bb)
            axpy_rows(in->bb.data, dout, bdelta, dout, 1, dout, s);
    }
    free(delta);
    if (rc) {
        while (--k >= 0)
            restore_insertion(&mod->ins[k]);
        return rc;
    }
    mod->merged = 1;
    return PR_OK;
}

int pr_module_unmerge(pr_module *mod, pr_error *err)
{
    if (!mod)
        return pr_errorf(err, PR_ERR_INVALID, "unmerge: NULL module");
    if (!mod->merged)
        return pr_errorf(err, PR_ERR_INVALID, "module '%s' is not merged", mod_name(mod));
    /* reverse order: slices of one fused weight (qkv and q) may overlap */
    for (int k = mod->n_ins - 1; k >= 0; k--)
        restore_insertion(&mod->ins[k]);
    mod->merged = 0;
    return PR_OK;
}

/* ---- the model's modules ---------------------------------------------------------------------------- */

/* Everything but the memory: unmerge, teardown(), the module's tensors
 * and selections; a fusion module's fused modules first. */
static void module_release(pr_model *m, pr_module *mod)
{
    for (int i = mod->n_kids - 1; i >= 0; i--)
        module_release(m, mod->kids[i]);
    if (mod->merged)
        pr_module_unmerge(mod, NULL);
    for (int k = 0; k < mod->n_ins && mod->t.teardown; k++) {
        pr_ctx c;
        ctx_init(&mod->ins[k], &c, 0, 0, 0, 0);
        host_call hc;
        host_call_begin(&hc);
        mod->t.teardown(&c);
        host_call_end(&hc);
    }
    char prefix[256];
    prefix_of(mod, prefix, sizeof prefix);
    pr_model_remove_tensors(m, prefix);
    undo_selection(mod);
}

void pr_model_detach_modules(pr_model *m)
{
    model_entry *e = entry_of(m, 0);
    if (!e)
        return;
    for (int i = e->n - 1; i >= 0; i--)
        module_release(m, e->mods[i]);
    pr_model_detach_hooks(m);
    for (int i = 0; i < e->n; i++)
        module_free(e->mods[i]);
    entry_drop(m);
}

int pr_model_n_modules(const pr_model *m)
{
    const model_entry *e = entry_of(m, 0);
    return e ? e->n : 0;
}

pr_module *pr_model_module(const pr_model *m, int i)
{
    const model_entry *e = entry_of(m, 0);
    return e && i >= 0 && i < e->n ? e->mods[i] : NULL;
}

const char *pr_module_name(const pr_module *mod)
{
    return mod ? mod->name : NULL;
}

const pr_technique *pr_module_technique(const pr_module *mod)
{
    return mod ? mod->tech_ptr : NULL;
}

int pr_module_insertions(const pr_module *mod)
{
    return mod ? mod->n_ins : 0;
}

int64_t pr_module_param_count(const pr_module *mod)
{
    return mod ? mod->param_count : 0;
}

int64_t pr_module_trainable_count(const pr_module *mod)
{
    return mod ? mod->trainable_count : 0;
}

uint32_t pr_module_sites(const pr_module *mod)
{
    return mod ? mod->sites : 0;
}

const pr_option_value *pr_module_option(const pr_module *mod, int i)
{
    if (!mod || i < 0 || (uint32_t)i >= mod->t.n_options)
        return NULL;
    return &mod->base_opts[i];
}

/* ---- what saving a module reads (core/io/module_file.c) ------------------------------------------------ */

int pr_module_is_trainable(const pr_module *mod)
{
    return mod ? mod->trainable : 0;
}

const int *pr_module_layers(const pr_module *mod, int *n)
{
    if (n)
        *n = mod ? mod->n_layers : 0;
    return mod && !mod->layers_all ? mod->layers : NULL;
}

const pr_option_value *pr_module_site_option(const pr_module *mod, int site, int i)
{
    if (!mod || site < 0 || site >= PR_SITE_COUNT || i < 0 || (uint32_t)i >= mod->t.n_options)
        return NULL;
    return mod->site_opts + (size_t)site * mod->t.n_options + i;
}

int pr_module_n_selected(const pr_module *mod)
{
    return mod ? mod->n_selected : 0;
}

const char *pr_module_selected(const pr_module *mod, int i)
{
    return mod && i >= 0 && i < mod->n_selected ? mod->selected[i] : NULL;
}

int pr_module_n_params(const pr_module *mod)
{
    return mod ? mod->n_copies : 0;
}

static void param_info(const pr_module *mod, const param_copy *pc, const char *pname, uint32_t flags, int scope,
                       float *data, pr_module_param *out)
{
    memset(out, 0, sizeof *out);
    out->name = pc->name;
    out->param = pname;
    out->flags = flags;
    out->scope = scope;
    out->site = pc->key_site >= 0 ? pc->key_site : mod->ins[pc->first_ins].site;
    out->layer = pc->key_layer != INT32_MIN ? pc->key_layer : -1;
    out->ndim = pc->ndim;
    memcpy(out->shape, pc->shape, sizeof out->shape);
    out->numel = pc->numel;
    out->data = data;
    out->trained = pc->trained;
}

int pr_module_param_at(const pr_module *mod, int i, pr_module_param *out)
{
    if (!mod || !out || i < 0 || i >= mod->n_copies)
        return PR_ERR_INVALID;
    const param_copy *pc = &mod->copies[i];
    if (pc->decl < 0)
        param_info(mod, pc, "gate", PR_PARAM_NO_DECAY, PR_SCOPE_INSERTION, mod->params + pc->off, out);
    else
        param_info(mod, pc, mod->pd[pc->decl].name, mod->pd[pc->decl].flags, mod->pd[pc->decl].scope,
                   mod->params + pc->off, out);
    return PR_OK;
}

/* fold(): the fold_params copies are grouped by scope exactly as
 * parameters are (resolve_params), each filled by the fold() call of the
 * first insertion that uses it, then handed to fn. */
int pr_module_fold(pr_module *mod, pr_module_param_fn fn, void *arg, pr_error *err)
{
    if (!mod || !fn)
        return pr_errorf(err, PR_ERR_INVALID, "fold: NULL module or callback");
    uint32_t nf = mod->t.n_fold_params;
    if (!nf)
        return PR_OK;
    if (!mod->t.fold)
        return pr_errorf(err, PR_ERR_UNSUPPORTED, "module '%s' (technique %s) declares fold_params but no fold()",
                         mod_name(mod), mod->t.name);
    pr_param_decl *fd = calloc(nf, sizeof *fd);
    param_copy *cp = calloc((size_t)mod->n_ins * nf + 1, sizeof *cp);
    int *which = calloc((size_t)mod->n_ins * nf + 1, sizeof *which);
    pr_tensor *outs = calloc(nf, sizeof *outs);
    float **data = calloc((size_t)mod->n_ins * nf + 1, sizeof *data);
    int n = 0, rc = PR_OK;
    if (!fd || !cp || !which || !outs || !data) {
        rc = pr_errorf(err, PR_ERR_NOMEM, "module '%s': out of memory for folding", mod_name(mod));
        goto done;
    }
    for (uint32_t i = 0; i < nf; i++)
        read_elem(&fd[i], sizeof fd[i], mod->t.fold_params, i);
    expr_var v[MAX_VARS];
    char e[256];
    for (int k = 0; k < mod->n_ins && !rc; k++) {
        insertion *in = &mod->ins[k];
        int nv = model_vars(mod, &in->dims, in->opts, v);
        for (uint32_t i = 0; i < nf; i++) {
            const pr_param_decl *p = &fd[i];
            int64_t dims[4];
            int nd = 0;
            if (!p->name || !p->shape || expr_eval_shape(p->shape, v, nv, dims, &nd, e, sizeof e)) {
                rc = pr_errorf(err, PR_ERR_INVALID, "module '%s': fold parameter %u shape at %s: %s", mod_name(mod), i,
                               in->where, p->shape ? e : "missing");
                break;
            }
            int kl = (p->scope == PR_SCOPE_INSERTION || p->scope == PR_SCOPE_LAYER) ? in->layer : INT32_MIN;
            int ks = (p->scope == PR_SCOPE_INSERTION || p->scope == PR_SCOPE_SITE) ? in->site : -1;
            int found = -1;
            for (int c = 0; c < n && found < 0; c++)
                if (cp[c].decl == (int)i && cp[c].key_layer == kl && cp[c].key_site == ks)
                    found = c;
            if (found < 0) {
                param_copy *pc = &cp[n];
                pc->decl = (int)i;
                pc->key_layer = kl;
                pc->key_site = ks;
                pc->ndim = nd;
                memcpy(pc->shape, dims, sizeof dims);
                pc->numel = shape_numel(dims, nd);
                pc->first_ins = k;
                pc->name = copy_name(mod, p->name, p->scope, in->site, in->layer);
                data[n] = alloc_floats((size_t)pc->numel);
                if (!pc->name || !data[n]) {
                    rc = pr_errorf(err, PR_ERR_NOMEM, "module '%s': out of memory for folding", mod_name(mod));
                    n++;
                    break;
                }
                found = n++;
            }
            which[(size_t)k * nf + i] = found;
        }
    }
    for (int k = 0; k < mod->n_ins && !rc; k++) {
        insertion *in = &mod->ins[k];
        int owns = 0;
        for (uint32_t i = 0; i < nf; i++) {
            int c = which[(size_t)k * nf + i];
            owns |= cp[c].first_ins == k;
            outs[i] = view(data[c], cp[c].ndim, cp[c].shape);
        }
        if (!owns)
            continue;
        pr_ctx c;
        ctx_init(in, &c, 0, 0, 0, UINT64_MAX - 4);
        c.out_params = outs;
        c.n_out_params = nf;
        rc = call(mod, in, mod->t.fold, "fold", &c, err);
    }
    for (int c = 0; c < n && !rc; c++) {
        pr_module_param info;
        param_info(mod, &cp[c], fd[cp[c].decl].name, fd[cp[c].decl].flags, fd[cp[c].decl].scope, data[c], &info);
        info.trained = 0;
        rc = fn(arg, &info, err);
    }
done:
    for (int c = 0; c < n; c++) {
        free(cp[c].name);
        free(data[c]);
    }
    free(fd);
    free(cp);
    free(which);
    free(outs);
    free(data);
    return rc;
}

pr_model *pr_module_model(const pr_module *mod)
{
    return mod ? mod->model : NULL;
}

void pr_module_detach(pr_module *mod)
{
    /* a fused module goes with its fusion module */
    if (!mod || mod->fused_by)
        return;
    pr_model *m = mod->model;
    module_release(m, mod);
    model_entry *e = entry_of(m, 0);
    for (int i = 0; e && i < e->n; i++)
        if (e->mods[i] == mod) {
            memmove(e->mods + i, e->mods + i + 1, (size_t)(e->n - i - 1) * sizeof *e->mods);
            e->n--;
            break;
        }
    if (mod->hooks_attached || mod->n_kids)
        reattach_others(m, mod);
    module_free(mod);
    if (e && e->n == 0)
        entry_drop(m);
}

/* ---- composition: gates and fusion ------------------------------------------------------------- */

/* n_fwd is the step part of call_seed(): step * 2^24 plus the calls made
 * within the step. */
static void module_set_step(pr_module *mod, uint64_t step)
{
    for (int k = 0; k < mod->n_ins; k++)
        mod->ins[k].n_fwd = step << 24;
    for (int i = 0; i < mod->n_kids; i++)
        module_set_step(mod->kids[i], step);
}

void pr_model_set_step(pr_model *m, uint64_t step)
{
    const model_entry *e = entry_of(m, 0);
    for (int i = 0; e && i < e->n; i++)
        module_set_step(e->mods[i], step);
}

int pr_module_is_gated(const pr_module *mod)
{
    return mod ? mod->gated : 0;
}

int pr_module_n_fused(const pr_module *mod)
{
    return mod ? mod->n_kids : 0;
}

pr_module *pr_module_fused(const pr_module *mod, int i)
{
    return mod && i >= 0 && i < mod->n_kids ? mod->kids[i] : NULL;
}

pr_module *pr_module_fused_by(const pr_module *mod)
{
    return mod ? mod->fused_by : NULL;
}

static const char *integration_name(int integ)
{
    switch (integ) {
    case PR_INTEGRATE_CONCAT: return "concatenation";
    case PR_INTEGRATE_RESCALE: return "rescaling";
    case PR_INTEGRATE_WEIGHT_DELTA: return "a weight delta";
    case PR_INTEGRATE_CUSTOM: return "a custom integration";
    case PR_INTEGRATE_SELECT: return "selection";
    default: return "addition";
    }
}

/* "a, b" of a layer list, or "all" */
static void layer_text(const pr_module *mod, char *buf, size_t len)
{
    size_t o = 0;
    buf[0] = '\0';
    if (mod->layers_all) {
        snprintf(buf, len, "all");
        return;
    }
    for (int i = 0; i < mod->n_layers; i++) {
        int w = snprintf(buf + o, len - o, "%s%d", i ? ", " : "", mod->layers[i]);
        if (w < 0 || (size_t)w >= len - o)
            break;
        o += (size_t)w;
    }
}

int pr_module_fuse(pr_model *m, const pr_fusion_spec *spec, pr_module **out, pr_error *err)
{
    if (out)
        *out = NULL;
    if (!m || !spec || (spec->n_modules > 0 && !spec->modules))
        return pr_errorf(err, PR_ERR_INVALID, "fusion: NULL model, spec or module list");
    const char *nm = spec->name ? spec->name : "fusion";
    if (spec->n_modules < 2)
        return pr_errorf(err, PR_ERR_INVALID, "fusion '%s': fuses at least two modules (got %d)", nm,
                         spec->n_modules);
    const model_entry *e = entry_of(m, 0);
    pr_module *const *kids = spec->modules;
    for (int i = 0; i < spec->n_modules; i++) {
        const pr_module *k = kids[i];
        if (!k)
            return pr_errorf(err, PR_ERR_INVALID, "fusion '%s': module %d is NULL", nm, i);
        int found = 0;
        for (int j = 0; e && j < e->n && !found; j++)
            found = e->mods[j] == k;
        if (k->fused_by)
            return pr_errorf(err, PR_ERR_INVALID, "fusion '%s': module '%s' is fused already, by '%s'", nm,
                             mod_name(k), mod_name(k->fused_by));
        if (!found)
            return pr_errorf(err, PR_ERR_INVALID, "fusion '%s': module '%s' is not attached to this model", nm,
                             mod_name(k));
        for (int j = 0; j < i; j++)
            if (kids[j] == k)
                return pr_errorf(err, PR_ERR_INVALID, "fusion '%s': module '%s' is listed twice", nm, mod_name(k));
        if (k->n_kids)
            return pr_errorf(err, PR_ERR_INVALID, "fusion '%s': module '%s' is a fusion itself; fusions do not nest",
                             nm, mod_name(k));
        if (k->trainable)
            return pr_errorf(err, PR_ERR_INVALID, "fusion '%s': module '%s' is trainable; AdapterFusion combines "
                             "frozen modules (load them with mode: frozen, or attach them with trainable 0)", nm,
                             mod_name(k));
        if (!is_additive(k))
            return pr_errorf(err, PR_ERR_INVALID, "fusion '%s': module '%s' (technique %s) integrates by %s; fusion "
                             "combines modules that add to the site output (direct, scaled or gated addition)", nm,
                             mod_name(k), k->t.name, integration_name(k->t.integration));
        if (k->merged)
            return pr_errorf(err, PR_ERR_INVALID, "fusion '%s': module '%s' is merged; unmerge it first", nm,
                             mod_name(k));
        if (i == 0)
            continue;
        const pr_module *a = kids[0];
        char x[256], y[256];
        if (k->sites != a->sites) {
            names_site_mask(a->sites, "none", x, sizeof x);
            names_site_mask(k->sites, "none", y, sizeof y);
            return pr_errorf(err, PR_ERR_INVALID, "fusion '%s': modules '%s' and '%s' attach at different sites (%s; "
                             "%s); fused modules must share their sites and layers", nm, mod_name(a), mod_name(k),
                             x, y);
        }
        int same = k->n_layers == a->n_layers;
        for (int l = 0; same && l < k->n_layers; l++)
            same = k->layers[l] == a->layers[l];
        if (!same) {
            layer_text(a, x, sizeof x);
            layer_text(k, y, sizeof y);
            return pr_errorf(err, PR_ERR_INVALID, "fusion '%s': modules '%s' and '%s' use different layers (%s; %s); "
                             "fused modules must share their sites and layers", nm, mod_name(a), mod_name(k), x, y);
        }
    }
    const pr_module *a = kids[0];
    pr_module_spec fs;
    memset(&fs, 0, sizeof fs);
    fs.technique = &fusion_technique;
    fs.name = nm;
    fs.sites = a->sites;
    fs.layers = a->layers_all ? NULL : a->layers;
    fs.n_layers = a->layers_all ? 0 : a->n_layers;
    fs.trainable = spec->trainable;
    fs.seed = spec->seed;
    return attach_impl(m, &fs, kids, spec->n_modules, out, err);
}

int pr_fusion_plan_for(const pr_model_config *cfg, const pr_module_spec *fused, int trainable, pr_module_plan *out,
                       pr_error *err)
{
    if (!cfg || !fused || !out)
        return pr_errorf(err, PR_ERR_INVALID, "fusion plan: NULL config, spec or output");
    memset(out, 0, sizeof *out);
    pr_model *m = NULL;
    int rc = model_create_empty(cfg, &m, err);
    if (rc)
        return rc;
    pr_module *k = NULL;
    rc = module_resolve(m, fused, &k, err);
    if (rc == PR_OK && !is_additive(k))
        rc = pr_errorf(err, PR_ERR_INVALID, "fusion: technique '%s' integrates by %s; fusion combines modules that "
                       "add to the site output (direct, scaled or gated addition)", k->t.name,
                       integration_name(k->t.integration));
    if (rc == PR_OK) {
        pr_module_spec fs;
        memset(&fs, 0, sizeof fs);
        fs.technique = &fusion_technique;
        fs.name = "fusion";
        fs.sites = k->sites;
        fs.layers = k->layers_all ? NULL : k->layers;
        fs.n_layers = k->layers_all ? 0 : k->n_layers;
        fs.trainable = trainable;
        rc = pr_module_plan_for(cfg, &fs, out, err);
    }
    module_free(k);
    pr_model_free(m);
    return rc;
}

const pr_technique *pr_fusion_technique(void)
{
    return &fusion_technique;
}

/* A fusion file: every parameter copy under its name without the
 * "<module>/" prefix ("h.0.ffn_out.query"), so a fusion loads under any
 * name. */
int pr_fusion_save(const pr_module *mod, const char *path, pr_error *err)
{
    if (!mod || !path)
        return pr_errorf(err, PR_ERR_INVALID, "fusion save: NULL module or path");
    if (!mod->n_kids)
        return pr_errorf(err, PR_ERR_INVALID, "module '%s' is not a fusion module", mod_name(mod));
    st_entry *e = calloc((size_t)mod->n_copies, sizeof *e);
    if (!e)
        return pr_errorf(err, PR_ERR_NOMEM, "%s: out of memory", path);
    size_t skip = strlen(mod_name(mod)) + 1;
    for (int c = 0; c < mod->n_copies; c++) {
        const param_copy *pc = &mod->copies[c];
        e[c].name = pc->name + skip;
        e[c].ndim = pc->ndim;
        memcpy(e[c].shape, pc->shape, sizeof pc->shape);
        e[c].data = mod->params + pc->off;
        e[c].dtype = ST_F32;
    }
    char n[32];
    snprintf(n, sizeof n, "%d", mod->n_kids);
    st_kv meta[] = { { "format", "peftref-fusion" }, { "technique", fusion_technique.name },
                     { "technique_version", fusion_technique.version }, { "fused_modules", n } };
    int rc = st_write(path, e, mod->n_copies, meta, 4, err);
    free(e);
    return rc;
}

int pr_fusion_fill(pr_module *mod, const char *path, pr_error *err)
{
    if (!mod || !path)
        return pr_errorf(err, PR_ERR_INVALID, "fusion load: NULL module or path");
    if (!mod->n_kids)
        return pr_errorf(err, PR_ERR_INVALID, "module '%s' is not a fusion module", mod_name(mod));
    st_file *f = NULL;
    int rc = st_open(path, 0, &f, err);
    if (rc)
        return rc;
    const char *fmt = st_metadata(f, "format");
    if (!fmt || strcmp(fmt, "peftref-fusion") != 0) {
        st_close(f);
        return pr_errorf(err, PR_ERR_INVALID, "%s: not a fusion file (metadata format is '%s', not 'peftref-fusion')",
                         path, fmt ? fmt : "missing");
    }
    size_t skip = strlen(mod_name(mod)) + 1;
    for (int c = 0; c < mod->n_copies && !rc; c++) {
        const param_copy *pc = &mod->copies[c];
        const st_tensor *t = st_find(f, pc->name + skip);
        char want[64], got[64];
        if (!t) {
            rc = pr_errorf(err, PR_ERR_INVALID, "%s: no tensor '%s' for fusion '%s' (fused at other sites or layers?)",
                           path, pc->name + skip, mod_name(mod));
            break;
        }
        int same = t->ndim == pc->ndim;
        for (int d = 0; same && d < pc->ndim; d++)
            same = t->shape[d] == pc->shape[d];
        if (!same) {
            st_format_shape(pc->ndim, pc->shape, want, sizeof want);
            st_format_shape(t->ndim, t->shape, got, sizeof got);
            rc = pr_errorf(err, PR_ERR_INVALID, "%s: tensor '%s' has shape %s; fusion '%s' needs %s", path,
                           pc->name + skip, got, mod_name(mod), want);
            break;
        }
        rc = st_to_f32(f, t, mod->params + pc->off, err);
    }
    st_close(f);
    return rc;
}
