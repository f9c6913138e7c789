/* peftref: techniques found as plugins, and modules attached to a model.
 *
 * A *technique* is a plugin's descriptor (peftref/plugin.h).  A *module* is
 * one use of a technique on one model: the chosen sites and layers, the
 * resolved options, and the parameters the host allocated for it in one
 * flat block.  Attaching a module registers its parameters in the model's
 * tensor table (names "<module>/<param>" for global scope,
 * "<module>/h.<layer>.<site>.<param>" per insertion), so training,
 * checkpoints and parameter counts treat them like any other tensor. */
#ifndef PEFTREF_MODULE_H
#define PEFTREF_MODULE_H

#include <stdint.h>
#include "peftref/status.h"
#include "peftref/model.h"
#include "peftref/plugin.h"
#include "peftref/tokenizer.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ---- discovery ----------------------------------------------------------- */

typedef struct pr_registry pr_registry;

/* Search the directories of search_path (colon-separated; NULL means
 * $PEFTREF_PLUGIN_PATH followed by the installed plugin directory), and
 * each directory's immediate subdirectories that hold a manifest.json
 * (technique packs).  Files that fail to load are recorded with a
 * one-line reason, never fatal.  Returns an error only when nothing could
 * be searched at all (e.g. out of memory). */
int pr_registry_open(const char *search_path, pr_registry **out, pr_error *err);
void pr_registry_free(pr_registry *r);

int pr_registry_count(const pr_registry *r);
const pr_technique *pr_registry_technique(const pr_registry *r, int i);
/* Shared object the i-th technique came from. */
const char *pr_registry_origin(const pr_registry *r, int i);
/* NULL when no technique has that name. */
const pr_technique *pr_registry_find(const pr_registry *r, const char *name);
/* The technique whose name is closest to name (for "did you mean"), or NULL. */
const char *pr_registry_suggest(const pr_registry *r, const char *name);

int pr_registry_refused_count(const pr_registry *r);
/* path and one-line reason of the i-th refused file. */
void pr_registry_refused(const pr_registry *r, int i, const char **path, const char **reason);
/* The files that offered technique name after another file had provided
 * it (each was refused as a whole, see pr_registry_refused).  For the i-th
 * such file (0-based, in search order) returns 1 with the path of the file
 * whose technique is used in *winner_path and the later file's path in
 * *loser_path; 0, both NULL, when there are fewer.  Either pointer may be
 * NULL. */
int pr_registry_shadowed(const pr_registry *r, const char *name, int i, const char **winner_path,
                         const char **loser_path);

/* Check a descriptor as the loader does; err says what is wrong. */
int pr_technique_validate(const pr_technique *t, pr_error *err);

/* ---- modules ------------------------------------------------------------- */

typedef struct pr_module pr_module;

/* An option value given as text ("8", "0.1", "true", "gelu"), optionally
 * for one site only (site >= 0: a per-site override). */
typedef struct pr_option_setting {
    const char *name;
    const char *value;
    int site;            /* -1: every site */
} pr_option_setting;

typedef struct pr_module_spec {
    const pr_technique *technique;
    const char *name;            /* module name, unique in the model; NULL = technique name */
    uint32_t sites;              /* PR_SITE_BIT mask; 0 = the technique's default sites */
    const int *layers;           /* NULL = every layer */
    int n_layers;
    const pr_option_setting *options;
    int n_options;
    int trainable;               /* 0: frozen (a loaded module used as is) */
    uint64_t seed;               /* parameter init */
    const pr_tokenizer *tokenizer; /* for PR_INIT_TEXT */
    /* 1: put the module behind a learned gate, sigmoid(g) with g a
     * host-owned scalar per insertion, registered as the trainable tensor
     * "<module>/h.<layer>.<site>.gate" and starting at g = 0 (half
     * strength), as UniPELT (Mao et al. 2022) gates its submodules
     * (docs/pipeline.md, "Composition").  Implied by GATED_ADD. */
    int gate;
} pr_module_spec;

/* What attaching spec to a model of shape cfg would create, computed
 * without allocating the model or the module (for `peftref plan` and the
 * inspect page).  Selection techniques report the base elements they make
 * trainable in base_selected. */
typedef struct pr_module_plan {
    int insertions;
    int64_t params;          /* parameters the module would own */
    int64_t trainable;       /* of those, trained (0 for a frozen module) */
    int64_t base_selected;   /* base-tensor elements made trainable */
    uint32_t sites;          /* PR_SITE_BIT mask actually used */
    int layers_used;
} pr_module_plan;

/* The sites t attaches to when a spec names none, on a model of family
 * `family` (pr_family): default_sites_llama on LLaMA-family models where
 * the technique declares it (ABI 1.1), default_sites otherwise. */
uint32_t pr_technique_default_sites(const pr_technique *t, int family);

int pr_module_plan_for(const pr_model_config *cfg, const pr_module_spec *spec, pr_module_plan *out,
                       pr_error *err);

/* Validate spec against the technique and the model (unknown or out-of-
 * range options, sites the technique cannot use or the model lacks), then
 * allocate, initialise and attach.  Errors name the module and field. */
int pr_module_attach(pr_model *m, const pr_module_spec *spec, pr_module **out, pr_error *err);

/* Detach every module and free them (the model keeps only base tensors). */
void pr_model_detach_modules(pr_model *m);

int pr_model_n_modules(const pr_model *m);
pr_module *pr_model_module(const pr_model *m, int i);

const char *pr_module_name(const pr_module *mod);
const pr_technique *pr_module_technique(const pr_module *mod);
int pr_module_insertions(const pr_module *mod);
/* Parameters the module owns (including frozen ones), and of those, trained. */
int64_t pr_module_param_count(const pr_module *mod);
int64_t pr_module_trainable_count(const pr_module *mod);
/* Sites actually used (PR_SITE_BIT mask) and the resolved value of option i. */
uint32_t pr_module_sites(const pr_module *mod);
const pr_option_value *pr_module_option(const pr_module *mod, int i);
/* The index of the module's option called name (for pr_module_option), or -1. */
int pr_module_option_index(const pr_module *mod, const char *name);

/* Fold a mergeable module into the frozen weights (keeping the originals,
 * so unmerge restores them bit-exactly) and stop applying it. */
int pr_module_merge(pr_module *mod, pr_error *err);
int pr_module_unmerge(pr_module *mod, pr_error *err);

/* ---- what a module holds, for saving (docs/modules.md) --------------------- */

/* The model the module is attached to. */
pr_model *pr_module_model(const pr_module *mod);
/* Detach one module and free it (the others stay, in their order). */
void pr_module_detach(pr_module *mod);
/* 1 when the module's parameters train (0: frozen). */
int pr_module_is_trainable(const pr_module *mod);
/* The chosen layers, ascending; NULL (with *n the model's layer count)
 * when every layer was chosen. */
const int *pr_module_layers(const pr_module *mod, int *n);
/* Option i as resolved at site (per-site overrides applied). */
const pr_option_value *pr_module_site_option(const pr_module *mod, int site, int i);
/* Base tensors a trainable selection module made trainable, by name. */
int pr_module_n_selected(const pr_module *mod);
const char *pr_module_selected(const pr_module *mod, int i);

/* One allocated parameter copy (or the host's gate of a gated insertion,
 * param "gate"). */
typedef struct pr_module_param {
    const char *name;    /* tensor name in the model's table, "<module>/..." */
    const char *param;   /* the declaration's name, e.g. "lora_A" */
    uint32_t flags;      /* pr_param_flags */
    int scope;           /* pr_scope */
    int site, layer;     /* of the (first) insertion using it; layer -1 when not per layer */
    int ndim;
    int64_t shape[4];
    int64_t numel;
    float *data;
    int trained;
} pr_module_param;

int pr_module_n_params(const pr_module *mod);
int pr_module_param_at(const pr_module *mod, int i, pr_module_param *out);

typedef int (*pr_module_param_fn)(void *arg, const pr_module_param *p, pr_error *err);
/* Run the technique's fold() (plugin.h) and hand each tensor of its
 * fold_params to fn (copies grouped by scope like parameters, named like
 * them).  Nothing happens for a technique without fold_params. */
int pr_module_fold(pr_module *mod, pr_module_param_fn fn, void *arg, pr_error *err);

/* ---- saved modules (core/io/module_file.c, docs/modules.md) --------------------
 *
 * A saved module is one safetensors file: its parameters (folded when the
 * technique has training-only ones; Hugging Face PEFT's tensor names where
 * the technique exists in PEFT) and __metadata__ strings naming the
 * technique and its version, the resolved options, sites and layers, the
 * base model's fingerprint, a training summary and the peftref version. */

/* Fingerprint of a model's base tensors and shape: "fp1:" + 16 hex digits
 * of a 64-bit FNV-1a hash over the config and every base tensor's name,
 * shape and values (all of a tensor up to 65536 elements, 65536 evenly
 * spaced ones of a larger one).  Module tensors are left out.  Call it
 * before a selection module trains or a module is merged. */
void pr_model_fingerprint(const pr_model *m, char *buf, size_t len);

typedef struct pr_module_save_info {
    const char *base_fingerprint;  /* NULL: pr_model_fingerprint of the model now */
    int64_t steps;                 /* training steps behind the values (0: none) */
    double final_train_loss;       /* NaN when unknown */
    double final_val_loss;         /* NaN when unknown */
} pr_module_save_info;

/* Write mod to path (atomically).  info may be NULL. */
int pr_module_save(pr_module *mod, const char *path, const pr_module_save_info *info, pr_error *err);

/* An opened saved module (memory-mapped). */
typedef struct pr_module_file pr_module_file;

/* Open path and check its metadata: the technique exists in reg and its
 * version's major matches the file's, options, sites and layers parse. */
int pr_module_file_open(const char *path, const pr_registry *reg, pr_module_file **out, pr_error *err);
/* The same, also for a Hugging Face PEFT adapter directory (one holding
 * adapter_config.json; docs/modules.md, "Interoperability"), which needs
 * the base model's shape cfg to resolve PEFT's target_modules (NULL: such
 * a directory is an error).  flags: PR_MODULE_FILE_ALLOW_UNKNOWN_FIELDS
 * accepts adapter_config.json fields peftref does not know. */
enum { PR_MODULE_FILE_ALLOW_UNKNOWN_FIELDS = 1u << 0 };
int pr_module_file_open_ex(const char *path, const pr_registry *reg, const pr_model_config *cfg, unsigned flags,
                           pr_module_file **out, pr_error *err);
void pr_module_file_close(pr_module_file *f);
const char *pr_module_file_path(const pr_module_file *f);
/* A __metadata__ value, or NULL. */
const char *pr_module_file_meta(const pr_module_file *f, const char *key);
/* The saved configuration as a spec (technique, name, sites, layers,
 * options; trainable 1, seed 0, no tokenizer); pointers live as long as f. */
void pr_module_file_spec(const pr_module_file *f, pr_module_spec *spec);
/* PR_OK when fingerprint (pr_model_fingerprint) equals the file's; an
 * error naming both otherwise. */
int pr_module_file_check_base(const pr_module_file *f, const char *fingerprint, pr_error *err);
/* Copy the file's values into mod (attached with the file's spec): every
 * parameter, or for a selection module the base tensors it saved.  Shapes
 * must match exactly. */
int pr_module_file_fill(const pr_module_file *f, pr_module *mod, pr_error *err);
/* The same for the weighted mean of n files (weights sum to 1): files
 * must hold one technique with identical options, sites, layers and
 * tensors; an error names two files and what differs. */
int pr_module_files_fill_average(pr_module_file *const *f, const double *weights, int n, pr_module *mod,
                                 pr_error *err);
int pr_module_files_compatible(pr_module_file *const *f, int n, pr_error *err);

/* Attach a saved module to m: a new attach with the file's spec, then its
 * values.  name NULL keeps the saved name; trainable 0 freezes it;
 * force 1 accepts a base-model fingerprint that differs. */
typedef struct pr_module_load_options {
    const char *name;
    int trainable;
    int force;
    const char *base_fingerprint;  /* NULL: pr_model_fingerprint(m) now */
} pr_module_load_options;

int pr_module_load(pr_model *m, const char *path, const pr_registry *reg, const pr_module_load_options *opt,
                   pr_module **out, pr_error *err);

/* ---- composition: gates and composite modules (docs/pipeline.md, "Composition") */

/* Start optimizer step `step`: the per-call seeds modules are handed
 * (pr_ctx.seed, e.g. dropout masks) restart from a function of the step
 * and count the calls within it, so a run resumed from a checkpoint draws
 * the masks an uninterrupted run draws.  The training loop calls it. */
void pr_model_set_step(pr_model *m, uint64_t step);

/* The global sample index of each of the next batch's B rows (pointer
 * kept until the next call; NULL: the row number).  Modules key their
 * randomness (dropout) by it, so results do not depend on how a global
 * batch is split into micro-batches or processes (pr_ctx.sample_index). */
void pr_model_set_samples(pr_model *m, const int64_t *sample_index);

/* Every trainable module's after_backward callbacks (after the backward of
 * each micro-batch) and on_step callbacks (after each optimizer step). */
int pr_model_after_backward(pr_model *m, pr_error *err);
int pr_model_after_step(pr_model *m, pr_error *err);

/* The auxiliary losses callbacks reported (host->add_aux_loss) since the
 * last call, which resets the sum. */
double pr_model_take_aux_loss(pr_model *m);

/* 1 when the module sits behind a learned gate (spec gate, or GATED_ADD). */
int pr_module_is_gated(const pr_module *mod);

/* The seed the module's parameters were initialised from (saved with
 * modules that regenerate frozen buffers, PR_PARAM_REGENERATE). */
uint64_t pr_module_seed(const pr_module *mod);

/* Composite modules (pr_technique.composite; plugin.h says what the host
 * runs and in which order): one module of a composite technique over
 * n >= 2 members, attached, frozen modules of additive integration
 * (direct, scaled or gated addition) that share their sites and layers.
 * The composite attaches where its members do (spec->sites and
 * spec->layers are ignored); at each insertion the members' own
 * integration stops and the composite combines what each would have added
 * (AdapterFusion, Pfeiffer et al. 2021, is the plugin adapter_fusion).
 * The members leave the model's module list and belong to the composite:
 * detaching it detaches them.  pr_module_attach refuses a composite
 * technique. */
int pr_module_compose(pr_model *m, const pr_module_spec *spec, pr_module *const *members, int n_members,
                      pr_module **out, pr_error *err);

/* What a composite module of spec `composite` over members attached with
 * spec `member` would add to a model of shape cfg (its own parameters;
 * spec->trainable 0 for a frozen composite). */
int pr_composite_plan_for(const pr_model_config *cfg, const pr_module_spec *composite,
                          const pr_module_spec *member, pr_module_plan *out, pr_error *err);

/* The members of a composite module (0 for any other module), and the
 * composite a member belongs to (NULL when it is none's member). */
int pr_module_n_members(const pr_module *mod);
pr_module *pr_module_member(const pr_module *mod, int i);
pr_module *pr_module_composed_by(const pr_module *mod);

/* A composite module's own parameters as one safetensors file (metadata
 * format "peftref-composite", technique, technique_version, members;
 * tensors named without the "<module>/" prefix, "h.0.ffn_out.query"), and
 * back into a composite of the same technique over the same sites and
 * layers.  Filling reads any "peftref-*" format whose technique metadata
 * names the module's technique, so files written before composites were
 * generic load too. */
int pr_composite_save(const pr_module *mod, const char *path, pr_error *err);
int pr_composite_fill(pr_module *mod, const char *path, pr_error *err);

#ifdef __cplusplus
}
#endif
#endif
