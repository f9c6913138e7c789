/* peftref core: loading one plugin library -- dlopen, the entry, the
 * checks of the pr_plugin it returns and host-side copies of its
 * descriptors (validated by validate.c) -- for the registry, and the same
 * done and undone as the scanner's probe (scanner.c) in its child.
 *
 * A library is loaded with dlopen(RTLD_NOW | RTLD_LOCAL) and refused with a
 * one-line reason when it does not load, lacks peftref_plugin_entry, its
 * entry returns NULL or no techniques, its pr_plugin is too small or built
 * for another ABI major, or any descriptor fails pr_technique_validate. */
#include <dlfcn.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "peftref/module.h"
#include "host.h"
#include "registry_internal.h"

void reg_candidate_drop(reg_candidate *k)
{
    for (uint32_t i = 0; i < k->n; i++)
        reg_tech_copy_free(&k->techs[i]);
    free(k->techs);
    if (k->handle)
        dlclose(k->handle);
    free(k->path);
    memset(k, 0, sizeof *k);
}

int reg_load_library(const char *path, reg_scanner *scan, reg_candidate *k, char *reason, size_t len)
{
    memset(k, 0, sizeof *k);
    /* nothing of the library runs here before a child has run it all */
    if (scan && reg_scanner_verdict(scan, path, reason, len))
        return -1;
    k->path = strdup(path);
    if (!k->path) {
        snprintf(reason, len, "out of memory");
        return -1;
    }
    dlerror();
    k->handle = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!k->handle) {
        const char *e = dlerror();
        if (!e)
            e = "unknown error";
        /* dlerror usually starts with the path, which the report shows already. */
        size_t pl = strlen(path);
        if (strncmp(e, path, pl) == 0 && e[pl] == ':')
            e += pl + 1 + (e[pl + 1] == ' ');
        snprintf(reason, len, "cannot load: %s", e);
        goto refused;
    }
    dlerror();
    void *sym = dlsym(k->handle, PR_PLUGIN_ENTRY_NAME);
    if (!sym) {
        snprintf(reason, len, "no entry symbol %s (not a peftref plugin?)", PR_PLUGIN_ENTRY_NAME);
        goto refused;
    }
    pr_plugin_entry_fn entry;
    memcpy(&entry, &sym, sizeof entry);
    /* The plugin's bundle: the directory the library lives in. */
    char bundle[PATH_MAX], why[PR_ERROR_MSG_MAX] = "";
    snprintf(bundle, sizeof bundle, "%s", path);
    char *slash = strrchr(bundle, '/');
    if (slash)
        *(slash == bundle ? slash + 1 : slash) = '\0';
    else
        snprintf(bundle, sizeof bundle, ".");
    const pr_entry_args args = {
        .struct_size = sizeof args, .abi_major = PR_ABI_MAJOR, .abi_minor = PR_ABI_MINOR,
        .host = host_services(), .bundle_path = bundle, .error = why, .error_size = sizeof why,
    };
    const pr_plugin *pl = entry(&args);
    if (!pl) {
        why[sizeof why - 1] = '\0';
        if (why[0])
            snprintf(reason, len, "%s refused to load: %s", PR_PLUGIN_ENTRY_NAME, why);
        else
            snprintf(reason, len, "%s returned NULL", PR_PLUGIN_ENTRY_NAME);
        goto refused;
    }
    if (pl->struct_size < 2 * sizeof(uint32_t)) {
        snprintf(reason, len, "pr_plugin struct_size %u is smaller than the %zu bytes of ABI %d.0", pl->struct_size,
                 (size_t)PLUGIN_MIN_SIZE, PR_ABI_MAJOR);
        goto refused;
    }
    if (pl->abi_major != PR_ABI_MAJOR) {
        snprintf(reason, len, "built for ABI %u, this host speaks ABI %d", pl->abi_major, PR_ABI_MAJOR);
        goto refused;
    }
    if (pl->struct_size < PLUGIN_MIN_SIZE || pl->struct_size > STRUCT_MAX_SIZE) {
        snprintf(reason, len, "pr_plugin struct_size %u is %s the %zu bytes of ABI %d.0", pl->struct_size,
                 pl->struct_size < PLUGIN_MIN_SIZE ? "smaller than" : "absurdly larger than",
                 (size_t)PLUGIN_MIN_SIZE, PR_ABI_MAJOR);
        goto refused;
    }
    pr_plugin p;
    memset(&p, 0, sizeof p);
    memcpy(&p, pl, pl->struct_size < sizeof p ? pl->struct_size : sizeof p);
    if (p.n_techniques == 0 || !p.techniques) {
        snprintf(reason, len, "declares no techniques");
        goto refused;
    }
    if (p.n_techniques > MAX_TECHNIQUES) {
        snprintf(reason, len, "declares %u techniques, absurdly many", p.n_techniques);
        goto refused;
    }
    k->techs = calloc(p.n_techniques, sizeof *k->techs);
    if (!k->techs) {
        snprintf(reason, len, "out of memory");
        goto refused;
    }
    for (uint32_t i = 0; i < p.n_techniques; i++) {
        pr_error err = {0};
        if (!p.techniques[i]) {
            snprintf(reason, len, "technique %u of %u is NULL", i + 1, p.n_techniques);
            goto refused;
        }
        if (reg_tech_copy_make(p.techniques[i], &k->techs[i], &err)) {
            snprintf(reason, len, "%s", err.msg);
            goto refused;
        }
        k->n = i + 1;
        if (reg_validate_copy(&k->techs[i], &err)) {
            snprintf(reason, len, "%s", err.msg);
            goto refused;
        }
        for (uint32_t j = 0; j < i; j++)
            if (strcmp(k->techs[j].t.name, k->techs[i].t.name) == 0) {
                snprintf(reason, len, "declares technique '%s' twice", k->techs[i].t.name);
                goto refused;
            }
    }
    return 0;
refused:
    reg_candidate_drop(k);
    return -1;
}

int reg_probe_library(const char *path, char *reason, size_t len)
{
    reg_candidate k;
    if (reg_load_library(path, NULL, &k, reason, len))
        return -1;
    /* unloading runs the library's destructors: part of what is probed */
    reg_candidate_drop(&k);
    return 0;
}
