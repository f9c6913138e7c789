/* peftref core: private declarations shared by the plugin registry
 * (registry.c: search, packs, admission, listing), its trust rule
 * (trust.c) and the descriptor copies and validation it relies on
 * (validate.c).  Not installed. */
#ifndef PEFTREF_CORE_REGISTRY_INTERNAL_H
#define PEFTREF_CORE_REGISTRY_INTERNAL_H

#include <stddef.h>

#include "peftref/module.h"

/* The sizes of the ABI 1.0 structs: offset of the last field plus its
 * size.  A struct_size below these lacks fields the host needs. */
#define MEMBER_END(type, field) (offsetof(type, field) + sizeof(((type *)0)->field))
#define TECHNIQUE_MIN_SIZE MEMBER_END(pr_technique, teardown)
#define PLUGIN_MIN_SIZE MEMBER_END(pr_plugin, techniques)
#define OPTION_MIN_SIZE MEMBER_END(pr_option_decl, per_site)
/* init_option, appended to pr_param_decl later, is optional: NULL when a
 * plugin's struct ends before it. */
#define PARAM_MIN_SIZE MEMBER_END(pr_param_decl, help)
#define BUFFER_MIN_SIZE MEMBER_END(pr_buffer_decl, shape)
/* Beyond these a size or count is garbage, not a later ABI minor. */
#define STRUCT_MAX_SIZE 65536u
#define MAX_DECLS 256u
#define MAX_TECHNIQUES 256u
#define MAX_NAME 64

/* A host-side copy of a technique descriptor and its declaration arrays. */
typedef struct tech_copy {
    pr_technique t;              /* options/params/... point at the arrays below */
    pr_option_decl *options;
    pr_param_decl *params;
    pr_buffer_decl *saved;
    pr_buffer_decl *scratch;
    pr_param_decl *fold_params;
} tech_copy;

/* Copy src into c after checking its size and ABI, everything that must
 * hold before any other field may be read; c is zeroed on failure. */
int reg_tech_copy_make(const pr_technique *src, tech_copy *c, pr_error *err);
void reg_tech_copy_free(tech_copy *c);
/* The checks of pr_technique_validate, on a copy. */
int reg_validate_copy(const tech_copy *c, pr_error *err);

/* The trust rule (trust.c): 0 when path -- a plugin file, or with is_dir
 * a plugin or pack directory -- may be loaded or searched; else 1 with
 * the one-line reason in why. */
int reg_untrusted(const char *path, int is_dir, char *why, size_t size);

#endif
