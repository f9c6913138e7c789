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

/* Fold a mergeable module into the frozen weights (keeping the originals,
 * so unmerge restores them bit-exactly) and stop applying it. */
int pr_module_merge(pr_module *mod, pr_error *err);
int pr_module_unmerge(pr_module *mod, pr_error *err);

#ifdef __cplusplus
}
#endif
#endif
