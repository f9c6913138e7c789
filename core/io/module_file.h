/* peftref core: saved modules (include/peftref/module.h, docs/modules.md);
 * the declarations module_save.c, module_open.c, module_load.c,
 * module_average.c and peft_names.c share.
 *
 * A saved module is one safetensors file.  Its __metadata__ strings say
 * what to attach again (technique, technique_version, options,
 * site_options, sites, layers), on what (base_fingerprint, base_config),
 * how it came to be (training, peftref_version) and how its tensors are
 * named (tensor_names: "peft" or "peftref").
 *
 * Tensor names.  Where the technique exists in Hugging Face PEFT
 * (pr_technique.peft_type) the file uses PEFT's state-dict names and
 * shapes, so a converter is a renaming: each parameter's peft_key and
 * peft_layout (plugin.h) say its key and how its copies lie in it, e.g.
 *   {prefix}.lora_A.weight     base_model.model.transformer.h.L.<module>.lora_A.weight
 *   FOLD_VECTOR                (d_out, 1) at the projection a stream site folds
 *                              into, GPT-2's fused attn.c_attn holding k and v in
 *                              one (d_q + 2 d_kv, 1) vector whose q third is the
 *                              identity; (1, d_ff) at the down projection's input
 *   LAYERS_CONCAT              (n_tokens, 2 L d_kv), layer l's two blocks in
 *                              columns 2l d_kv .. and (2l+1) d_kv ..
 * A module copy therefore lands in a file tensor as nb blocks of
 * (br, bc) elements at row r0 and columns c0 + b*cstep (or transposed).
 * Anything else (sites PEFT cannot name, such as GPT-2's q slice, a
 * module on some layers only where PEFT needs all, techniques without a
 * peft_type) keeps the host's names
 * "<module>/h.<layer>.<site>.<param>" for the whole module. */
#ifndef PEFTREF_CORE_MODULE_FILE_H
#define PEFTREF_CORE_MODULE_FILE_H

#include <stdint.h>

#include "peftref/peftref.h"
#include "peftref/module.h"
#include "safetensors.h"

/* An opened module file (module_open.c). */
struct pr_module_file {
    st_file *st;
    char *path;
    const pr_technique *t;      /* what to attach: the saved technique or its folded form */
    const char *saved_name;
    int peft;
    int peft_dir;               /* a Hugging Face PEFT adapter directory (peft_adapter.c) */
    int folded;
    int gated;                  /* saved behind learned gates (spec gate) */
    int has_seed;               /* the file carries the module's seed (regenerated buffers) */
    uint64_t seed;
    int all_layers;
    int *layers;
    int n_layers;
    uint32_t sites;
    pr_option_setting *opts;
    int n_opts;
    char **strs;
    int n_strs;
};

/* One file, or the weighted mean of several compatible ones. */
typedef struct source {
    pr_module_file *const *f;
    const double *w;
    int n;
} source;

/* Where a module copy lands in a file tensor of PEFT's layout (peft_names.c). */
typedef struct placement {
    char name[256];
    int ndim;
    int64_t full[ST_MAX_DIMS]; /* the file tensor's shape (ndim entries) */
    int64_t shape[2];          /* the file tensor, viewed as (R, C): an N-D
                                * one as (prod of the leading dims, last dim) */
    int64_t r0, c0, cstep;
    int64_t nb, br, bc;        /* the copy as nb blocks of (br, bc) */
    float fill;                /* elements no copy covers */
    int transposed;            /* the (br, bc) copy is stored as (bc, br) at (r0, c0) */
} placement;

/* peft_names.c */
/* Where copy p of a module of technique t goes in PEFT's layout, from the
 * declaration of p's parameter (fold: p is fold() output, declared in
 * t->fold_params); 0 when PEFT has no name for it.  all_layers: the module
 * uses every layer. */
int peft_place(const pr_technique *t, int fold, const pr_module_param *p, const pr_model_config *c, int all_layers,
               placement *pl);
void peft_place_values(const placement *pl, float *f, float *x, int to_file);
/* module_save.c */
void mf_read_decl(void *dst, size_t host_size, const void *base, uint32_t i);
/* 1 when technique t declares an option of that name. */
int mf_has_option(const pr_technique *t, const char *name);
char *mf_module_options_json(const pr_module *mod);
/* module_load.c */
void mf_shape_text(int ndim, const int64_t *shape, char *buf, size_t len);
int mf_fill_from(const source *s, pr_module *mod, pr_error *err);

#endif
