/* peftref core: modules: small helpers the other files share, the per-model list of
 * modules, freeing, and the accessors of include/peftref/module.h that read a
 * module's identity and counts. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "module_internal.h"
#include "host.h"

/* ---- small helpers --------------------------------------------------------- */

size_t mod_round_up(size_t n)
{
    return (n + ALIGN_FLOATS - 1) / ALIGN_FLOATS * ALIGN_FLOATS;
}

float *mod_alloc_floats(size_t n)
{
    void *p = NULL;
    if (posix_memalign(&p, 64, (n ? n : 1) * sizeof(float)) != 0)
        return NULL;
    memset(p, 0, (n ? n : 1) * sizeof(float));
    return p;
}

char *mod_dup_str(const char *s)
{
    size_t n = strlen(s) + 1;
    char *d = malloc(n);
    if (d)
        memcpy(d, s, n);
    return d;
}

pr_tensor mod_view(float *data, int ndim, const int64_t *shape)
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
pr_tensor mod_view2(const float *data, int64_t rows, int64_t cols, int64_t ld)
{
    int64_t shape[2] = { rows, cols };
    pr_tensor v = mod_view((float *)data, 2, shape);
    v.stride[0] = ld;
    return v;
}

/* dst (rows, cols; ldd) += a * src (rows, cols; lds) */
void mod_axpy_rows(float *dst, int ldd, const float *src, int lds, int rows, int cols, float a)
{
    for (int r = 0; r < rows; r++) {
        float *d = dst + (size_t)r * ldd;
        const float *s = src + (size_t)r * lds;
        for (int j = 0; j < cols; j++)
            d[j] += a * s[j];
    }
}

void mod_copy_rows(float *dst, int ldd, const float *src, int lds, int rows, int cols)
{
    for (int r = 0; r < rows; r++)
        memcpy(dst + (size_t)r * ldd, src + (size_t)r * lds, (size_t)cols * sizeof(float));
}

/* The fields of element i of a plugin array whose elements are
 * first->struct_size bytes apart, copied into a zeroed host struct. */
void mod_read_elem(void *dst, size_t host_size, const void *base, uint32_t i)
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

const char *mod_name(const pr_module *mod)
{
    return mod->name ? mod->name : (mod->t.name ? mod->t.name : "?");
}

/* Make the module's shared scratch area hold at least need floats (never
 * shrinks; called from reserve, not inside a step). */
int mod_grow_scratch(pr_module *mod, size_t need, const char *kind, pr_error *err)
{
    if (need <= mod->scratch_cap)
        return PR_OK;
    float *s = mod_alloc_floats(need);
    if (!s)
        return pr_errorf(err, PR_ERR_NOMEM, "%s '%s': out of memory for %zu floats of scratch", kind,
                         mod_name(mod), need);
    free(mod->scratch);
    mod->scratch = s;
    mod->scratch_cap = need;
    return PR_OK;
}
/* ---- the model's list of modules ---------------------------------------------- */

int mod_list_add(pr_model *m, pr_module *mod)
{
    model_modules *l = model_modules_of(m);
    if (l->n == l->cap) {
        int cap = l->cap ? 2 * l->cap : 4;
        pr_module **nm = realloc(l->mods, (size_t)cap * sizeof *nm);
        if (!nm)
            return -1;
        l->mods = nm;
        l->cap = cap;
    }
    l->mods[l->n++] = mod;
    return 0;
}

void mod_list_remove(pr_model *m, const pr_module *mod)
{
    model_modules *l = model_modules_of(m);
    for (int i = 0; i < l->n; i++)
        if (l->mods[i] == mod) {
            memmove(l->mods + i, l->mods + i + 1, (size_t)(l->n - i - 1) * sizeof *l->mods);
            l->n--;
            break;
        }
}

/* Free the list's memory once it is empty. */
static void list_release(pr_model *m)
{
    model_modules *l = model_modules_of(m);
    free(l->mods);
    memset(l, 0, sizeof *l);
}

/* ---- building and freeing -------------------------------------------------------------------- */

void mod_free(pr_module *mod)
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
        free(in->ptrs);
        free(in->block);
        free(in->orig_w);
        free(in->orig_b);
        free(in->cm_t);
        free(in->cm_p);
        if (mod_form(mod)->release)
            mod_form(mod)->release(in);
    }
    free(mod->ins);
    for (int i = 0; i < mod->n_members; i++)
        mod_free(mod->members[i]);
    free(mod->members);
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
/* ---- the model's modules ---------------------------------------------------------------------------- */

/* Everything but the memory: unmerge, teardown(), the module's tensors
 * and selections; a composite module's members first. */
static void module_release(pr_model *m, pr_module *mod)
{
    for (int i = mod->n_members - 1; i >= 0; i--)
        module_release(m, mod->members[i]);
    if (mod->merged)
        pr_module_unmerge(mod, NULL);
    for (int k = 0; k < mod->n_ins && mod->t.teardown; k++) {
        pr_ctx c;
        mod_ctx_init(&mod->ins[k], &c, 0, 0, 0, 0);
        host_call hc;
        host_call_begin(&hc);
        mod->t.teardown(&c);
        host_call_end(&hc);
    }
    char prefix[256];
    mod_prefix_of(mod, prefix, sizeof prefix);
    pr_model_remove_tensors(m, prefix);
    mod_undo_selection(mod);
}

void pr_model_detach_modules(pr_model *m)
{
    model_modules *e = model_modules_of(m);
    if (!e || e->n == 0)
        return;
    for (int i = e->n - 1; i >= 0; i--)
        module_release(m, e->mods[i]);
    pr_model_detach_hooks(m);
    for (int i = 0; i < e->n; i++)
        mod_free(e->mods[i]);
    list_release(m);
}

int pr_model_n_modules(const pr_model *m)
{
    const model_modules *e = model_modules_of(m);
    return e ? e->n : 0;
}

pr_module *pr_model_module(const pr_model *m, int i)
{
    const model_modules *e = model_modules_of(m);
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
pr_model *pr_module_model(const pr_module *mod)
{
    return mod ? mod->model : NULL;
}

void pr_module_detach(pr_module *mod)
{
    /* a member goes with its composite module */
    if (!mod || mod->composed_by)
        return;
    pr_model *m = mod->model;
    module_release(m, mod);
    mod_list_remove(m, mod);
    if (mod->hooks_attached || mod->n_members)
        mod_reattach_others(m, mod);
    mod_free(mod);
    if (model_modules_of(m)->n == 0)
        list_release(m);
}

uint64_t pr_module_seed(const pr_module *mod)
{
    return mod ? mod->seed : 0;
}
