/* peftref core: private declarations shared by the plugin registry
 * (registry.c: search, packs, admission, listing), its trust rule
 * (trust.c), loading one library (load.c), the scanner that loads each
 * library in a child first and caches the verdicts (scanner.c) and the
 * descriptor copies and validation they rely on (validate.c).  Not
 * installed. */
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

/* ---- the scanner (scanner.c) ---- */

/* Seconds a child may take to load and describe one library before it is
 * killed; PEFTREF_SCAN_TIMEOUT (1..3600) overrides it. */
#define REG_SCAN_TIMEOUT 10

/* What the scanner's child runs on a library: load, check and unload it
 * as the registry would; 0 when accepted, else -1 with the reason. */
typedef int (*reg_probe_fn)(const char *path, char *reason, size_t len);

typedef struct reg_scanner reg_scanner;

/* A scanner reading the registry cache (PEFTREF_REGISTRY_CACHE, else the
 * per-user file); NULL when out of memory. */
reg_scanner *reg_scanner_open(reg_probe_fn probe);
/* 0 when the library at path may be dlopened in this process: the cache
 * says so for its real path, size and mtime, or probe succeeded in a
 * child.  Else 1 with the one-line reason in why ("crashed while loading:
 * signal 11 (Segmentation fault)", "did not finish loading within 10 s",
 * or the probe's own reason). */
int reg_scanner_verdict(reg_scanner *s, const char *path, char *why, size_t len);
/* Children started so far (0 when every verdict came from the cache). */
int reg_scanner_forks(const reg_scanner *s);
/* Write the cache when a verdict was added, and free s. */
void reg_scanner_close(reg_scanner *s);

/* ---- loading one library (load.c) ---- */

/* A library loaded and checked, not yet admitted. */
typedef struct reg_candidate {
    void *handle;
    char *path;
    tech_copy *techs;
    uint32_t n;
} reg_candidate;

/* dlclose and free; k is zeroed. */
void reg_candidate_drop(reg_candidate *k);
/* Ask scan (when not NULL) whether path may be loaded, then dlopen it,
 * call its entry, check the plugin and copy and validate its
 * descriptors into k.  0, or -1 with the one-line reason (k zeroed). */
int reg_load_library(const char *path, reg_scanner *scan, reg_candidate *k, char *reason, size_t len);
/* The scanner's probe: reg_load_library without a scanner, then unload. */
int reg_probe_library(const char *path, char *reason, size_t len);

#endif
