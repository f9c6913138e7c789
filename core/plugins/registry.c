/* peftref core: finding, loading and checking technique plugins.
 *
 * Search order (the first technique of a name wins; a later file offering
 * the same name is refused, naming the file that provided it first, and
 * remembered for pr_registry_shadowed):
 *   1. the directories of search_path, when the caller gives one; otherwise
 *   2. the directories of $PEFTREF_PLUGIN_PATH (colon-separated), then
 *   3. <directory of the running program>/plugins/.libs, only when it
 *      exists, i.e. when the program runs from a build tree, then
 *   4. the installed directory PEFTREF_PLUGINSDIR ($(libdir)/peftref/plugins).
 * A directory or file reached twice (by the same path or through a
 * symbolic link) is searched once.  A directory named in 1 or 2 that cannot
 * be opened is reported as refused; 3 and 4 are skipped quietly when absent.
 *
 * In each directory, in byte order of the names: every regular file "*.so"
 * is a plugin, and every immediate subdirectory holding a manifest.json is
 * a technique pack:
 *   {"name": "...", "version": "...", "abi_major": 1,
 *    "techniques": ["a", "b"], "license": "..."}
 * whose own *.so files are loaded and must agree with the manifest (same
 * ABI major, same set of technique names); otherwise every library of the
 * pack is refused with the disagreement as its reason.
 *
 * Nothing is loaded or searched that someone else could have changed: a
 * plugin directory, a pack directory, a plugin file and the directory that
 * file really lives in must each be owned by this user or by root and not
 * be writable by group or others.  Symbolic links are resolved and their
 * targets held to the same rule.  What fails it is refused with the reason
 * (the rule itself is in trust.c).
 *
 * Every library that passes the trust rule is first loaded, checked and
 * unloaded in a child process by the scanner (scanner.c), whose verdicts
 * are cached per user by real path, size and mtime: a library that
 * crashes or hangs while loading is refused with the reason ("crashed
 * while loading: signal 11 (Segmentation fault)") and the host goes on.
 * Only a library the scanner accepted is loaded here, by load.c: with
 * dlopen(RTLD_NOW | RTLD_LOCAL), refused with a one-line reason when it
 * does not load, lacks peftref_plugin_entry, its entry returns NULL or no
 * techniques, its pr_plugin is too small or built for another ABI major,
 * or any descriptor fails pr_technique_validate.  Because the scan forks,
 * pr_registry_open must come before anything that forbids fork (MPI_Init)
 * or makes it unsafe (threads of the caller's own).
 * A refused library is dlclosed at once; accepted ones stay open until
 * pr_registry_free.  The registry keeps host-side copies of the
 * descriptors, made and validated by validate.c. */
#include "config.h"

#include <dirent.h>
#include <dlfcn.h>
#include <errno.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <jansson.h>

#include "peftref/module.h"
#include "names.h"
#include "registry_internal.h"

#ifndef PEFTREF_PLUGINSDIR
#define PEFTREF_PLUGINSDIR "/usr/local/lib/peftref/plugins"
#endif

/* ---- the registry ---------------------------------------------------------- */

typedef struct reg_lib {
    void *handle;
    char *path;
} reg_lib;

typedef struct reg_tech {
    tech_copy c;
    int lib;
} reg_tech;

typedef struct reg_refusal {
    char *path;
    char *reason;
} reg_refusal;

/* A technique offered again by a later file, which was refused for it. */
typedef struct reg_shadow {
    char *name;
    int lib;                     /* the library whose technique is used */
    char *path;                  /* the later file */
} reg_shadow;

struct pr_registry {
    reg_tech *techs;
    int n_techs, cap_techs;
    reg_lib *libs;
    int n_libs, cap_libs;
    reg_refusal *refused;
    int n_refused, cap_refused;
    reg_shadow *shadows;
    int n_shadows, cap_shadows;
    char **seen;                 /* real paths of directories and files already searched */
    int n_seen, cap_seen;
    reg_scanner *scan;           /* while pr_registry_open searches */
    int oom;
};

static int grow(void **arr, int *cap, int need, size_t elem)
{
    if (need <= *cap)
        return 0;
    int nc = *cap ? 2 * *cap : 8;
    while (nc < need)
        nc *= 2;
    void *p = realloc(*arr, (size_t)nc * elem);
    if (!p)
        return -1;
    *arr = p;
    *cap = nc;
    return 0;
}

static void refuse(pr_registry *r, const char *path, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;

/* Record a refusal; the reason is kept to one line. */
static void refuse(pr_registry *r, const char *path, const char *fmt, ...)
{
    char buf[PR_ERROR_MSG_MAX];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    for (char *q = buf; *q; q++)
        if (*q == '\n' || *q == '\r' || *q == '\t')
            *q = ' ';
    if (grow((void **)&r->refused, &r->cap_refused, r->n_refused + 1, sizeof *r->refused)) {
        r->oom = 1;
        return;
    }
    char *p = strdup(path), *s = strdup(buf);
    if (!p || !s) {
        free(p);
        free(s);
        r->oom = 1;
        return;
    }
    r->refused[r->n_refused].path = p;
    r->refused[r->n_refused].reason = s;
    r->n_refused++;
}

/* 1 when the object at path was searched already (else remember it). */
static int seen_before(pr_registry *r, const char *path)
{
    char *real = realpath(path, NULL);
    if (!real)
        return 0;
    for (int i = 0; i < r->n_seen; i++)
        if (strcmp(r->seen[i], real) == 0) {
            free(real);
            return 1;
        }
    if (grow((void **)&r->seen, &r->cap_seen, r->n_seen + 1, sizeof *r->seen)) {
        free(real);
        r->oom = 1;
        return 0;
    }
    r->seen[r->n_seen++] = real;
    return 0;
}

static char *join_path(const char *dir, const char *name)
{
    size_t n = strlen(dir);
    while (n > 1 && dir[n - 1] == '/')
        n--;
    size_t len = n + 1 + strlen(name) + 1;
    char *p = malloc(len);
    if (p)
        snprintf(p, len, "%.*s/%s", (int)n, dir, name);
    return p;
}

static int load_library(pr_registry *r, const char *path, reg_candidate *k, char *reason, size_t len)
{
    if (!r->scan) {
        memset(k, 0, sizeof *k);
        snprintf(reason, len, "cannot scan it: out of memory");
        return -1;
    }
    return reg_load_library(path, r->scan, k, reason, len);
}

static int find_tech(const pr_registry *r, const char *name)
{
    for (int i = 0; i < r->n_techs; i++)
        if (strcmp(r->techs[i].c.t.name, name) == 0)
            return i;
    return -1;
}

/* Remember that path offered name, which library lib provides. */
static void shadow(pr_registry *r, const char *name, int lib, const char *path)
{
    if (grow((void **)&r->shadows, &r->cap_shadows, r->n_shadows + 1, sizeof *r->shadows)) {
        r->oom = 1;
        return;
    }
    char *n = strdup(name), *p = strdup(path);
    if (!n || !p) {
        free(n);
        free(p);
        r->oom = 1;
        return;
    }
    r->shadows[r->n_shadows].name = n;
    r->shadows[r->n_shadows].lib = lib;
    r->shadows[r->n_shadows].path = p;
    r->n_shadows++;
}

/* Admit a checked library unless one of its names is taken; consumes k.
 * A library offering a taken name is refused, naming the first such
 * technique; every taken name it offered is remembered as shadowed. */
static void admit(pr_registry *r, reg_candidate *k)
{
    int first = -1;
    for (uint32_t i = 0; i < k->n; i++) {
        int j = find_tech(r, k->techs[i].t.name);
        if (j >= 0) {
            shadow(r, k->techs[i].t.name, r->techs[j].lib, k->path);
            if (first < 0) {
                refuse(r, k->path, "technique '%s' is already provided by %s", k->techs[i].t.name,
                       r->libs[r->techs[j].lib].path);
                first = j;
            }
        }
    }
    if (first >= 0) {
        reg_candidate_drop(k);
        return;
    }
    if (grow((void **)&r->libs, &r->cap_libs, r->n_libs + 1, sizeof *r->libs) ||
        grow((void **)&r->techs, &r->cap_techs, r->n_techs + (int)k->n, sizeof *r->techs)) {
        r->oom = 1;
        reg_candidate_drop(k);
        return;
    }
    int lib = r->n_libs++;
    r->libs[lib].handle = k->handle;
    r->libs[lib].path = k->path;
    for (uint32_t i = 0; i < k->n; i++) {
        r->techs[r->n_techs].c = k->techs[i];
        r->techs[r->n_techs].lib = lib;
        r->n_techs++;
    }
    free(k->techs);
    memset(k, 0, sizeof *k);
}

static int name_cmp(const struct dirent **a, const struct dirent **b)
{
    return strcmp((*a)->d_name, (*b)->d_name);
}

static int ends_with(const char *s, const char *suffix)
{
    size_t n = strlen(s), m = strlen(suffix);
    return n > m && strcmp(s + n - m, suffix) == 0;
}

static int is_regular(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0 && S_ISREG(st.st_mode);
}

/* Entries of dir in byte order of their names, hidden ones left out.
 * Returns the count, or -1 with errno. */
static int list_dir(const char *dir, struct dirent ***out)
{
    struct dirent **ents = NULL;
    int n = scandir(dir, &ents, NULL, name_cmp);
    if (n < 0)
        return -1;
    int m = 0;
    for (int i = 0; i < n; i++) {
        if (ents[i]->d_name[0] == '.')
            free(ents[i]);
        else
            ents[m++] = ents[i];
    }
    *out = ents;
    return m;
}

/* The manifest of a technique pack, checked for form; NULL with err set. */
static json_t *read_manifest(const char *path, pr_error *err)
{
    json_error_t je;
    json_t *root = json_load_file(path, 0, &je);
    if (!root) {
        pr_errorf(err, PR_ERR_FORMAT, "line %d: %s", je.line, je.text);
        return NULL;
    }
    const char *why = NULL;
    json_t *techs = json_object_get(root, "techniques");
    if (!json_is_object(root))
        why = "not a JSON object";
    else if (!json_is_string(json_object_get(root, "name")))
        why = "\"name\" must be a string";
    else if (!json_is_string(json_object_get(root, "version")))
        why = "\"version\" must be a string";
    else if (!json_is_integer(json_object_get(root, "abi_major")))
        why = "\"abi_major\" must be an integer";
    else if (json_object_get(root, "license") && !json_is_string(json_object_get(root, "license")))
        why = "\"license\" must be a string";
    else if (!json_is_array(techs) || json_array_size(techs) == 0)
        why = "\"techniques\" must be a non-empty array of names";
    else {
        for (size_t i = 0; i < json_array_size(techs) && !why; i++) {
            json_t *v = json_array_get(techs, i);
            if (!json_is_string(v))
                why = "\"techniques\" must hold strings";
            for (size_t j = 0; j < i && !why; j++)
                if (json_equal(v, json_array_get(techs, j)))
                    why = "\"techniques\" names a technique twice";
        }
    }
    if (why) {
        pr_errorf(err, PR_ERR_FORMAT, "%s", why);
        json_decref(root);
        return NULL;
    }
    return root;
}

static int manifest_lists(const json_t *techs, const char *name)
{
    for (size_t i = 0; i < json_array_size(techs); i++)
        if (strcmp(json_string_value(json_array_get(techs, i)), name) == 0)
            return 1;
    return 0;
}

static void search_pack(pr_registry *r, const char *dir, const char *manifest_path)
{
    struct dirent **ents = NULL;
    int n = list_dir(dir, &ents);
    if (n < 0) {
        refuse(r, dir, "cannot open technique pack: %s", strerror(errno));
        return;
    }
    reg_candidate *ks = calloc((size_t)(n ? n : 1), sizeof *ks);
    if (!ks) {
        r->oom = 1;
        for (int i = 0; i < n; i++)
            free(ents[i]);
        free(ents);
        return;
    }
    int n_so = 0, nk = 0;
    char reason[PR_ERROR_MSG_MAX];
    for (int i = 0; i < n; i++) {
        char *path = ends_with(ents[i]->d_name, ".so") ? join_path(dir, ents[i]->d_name) : NULL;
        if (path && is_regular(path) && !seen_before(r, path)) {
            n_so++;
            if (reg_untrusted(path, 0, reason, sizeof reason))
                refuse(r, path, "%s", reason);
            else if (load_library(r, path, &ks[nk], reason, sizeof reason) == 0)
                nk++;
            else
                refuse(r, path, "%s", reason);
        }
        free(path);
        free(ents[i]);
    }
    free(ents);
    if (n_so == 0)
        refuse(r, dir, "technique pack holds no .so files");

    /* The manifest must describe exactly what the libraries provide. */
    pr_error err = {0};
    json_t *man = read_manifest(manifest_path, &err);
    const char *pack_reason = NULL;
    char missing[PR_ERROR_MSG_MAX] = "";
    if (!man) {
        snprintf(missing, sizeof missing, "technique pack manifest %s: %.400s", manifest_path, err.msg);
        pack_reason = missing;
    } else {
        json_t *techs = json_object_get(man, "techniques");
        json_int_t abi = json_integer_value(json_object_get(man, "abi_major"));
        for (size_t i = 0; i < json_array_size(techs) && !pack_reason; i++) {
            const char *want = json_string_value(json_array_get(techs, i));
            int found = 0;
            for (int k = 0; k < nk && !found; k++)
                for (uint32_t j = 0; j < ks[k].n && !found; j++)
                    found = strcmp(ks[k].techs[j].t.name, want) == 0;
            if (!found) {
                snprintf(missing, sizeof missing,
                         "technique pack manifest %s lists technique '%s', which no library of the pack provides",
                         manifest_path, want);
                pack_reason = missing;
            }
        }
        if (!pack_reason && abi != PR_ABI_MAJOR) {
            snprintf(missing, sizeof missing,
                     "technique pack manifest %s says abi_major %lld, the pack's libraries are built for ABI %d",
                     manifest_path, (long long)abi, PR_ABI_MAJOR);
            pack_reason = missing;
        }
    }
    for (int k = 0; k < nk; k++) {
        const char *extra = NULL;
        if (man) {
            json_t *techs = json_object_get(man, "techniques");
            for (uint32_t j = 0; j < ks[k].n && !extra; j++)
                if (!manifest_lists(techs, ks[k].techs[j].t.name))
                    extra = ks[k].techs[j].t.name;
        }
        if (extra)
            refuse(r, ks[k].path, "provides technique '%s', which the technique pack manifest %s does not list",
                   extra, manifest_path);
        else if (pack_reason)
            refuse(r, ks[k].path, "%s", pack_reason);
        else {
            admit(r, &ks[k]);
            continue;
        }
        reg_candidate_drop(&ks[k]);
    }
    free(ks);
    json_decref(man);
}

static void search_dir(pr_registry *r, const char *dir, int explicit)
{
    struct stat st;
    if (stat(dir, &st) != 0 || !S_ISDIR(st.st_mode)) {
        if (explicit)
            refuse(r, dir, "cannot search plugin directory: %s", stat(dir, &st) ? strerror(errno) : "not a directory");
        return;
    }
    if (seen_before(r, dir))
        return;
    char reason[PR_ERROR_MSG_MAX];
    if (reg_untrusted(dir, 1, reason, sizeof reason)) {
        refuse(r, dir, "%s", reason);
        return;
    }
    struct dirent **ents = NULL;
    int n = list_dir(dir, &ents);
    if (n < 0) {
        if (explicit)
            refuse(r, dir, "cannot search plugin directory: %s", strerror(errno));
        return;
    }
    for (int i = 0; i < n; i++) {
        char *path = join_path(dir, ents[i]->d_name);
        free(ents[i]);
        if (!path) {
            r->oom = 1;
            continue;
        }
        if (stat(path, &st) == 0 && S_ISREG(st.st_mode) && ends_with(path, ".so")) {
            if (!seen_before(r, path)) {
                reg_candidate k;
                if (reg_untrusted(path, 0, reason, sizeof reason))
                    refuse(r, path, "%s", reason);
                else if (load_library(r, path, &k, reason, sizeof reason) == 0)
                    admit(r, &k);
                else
                    refuse(r, path, "%s", reason);
            }
        } else if (stat(path, &st) == 0 && S_ISDIR(st.st_mode)) {
            char *manifest = join_path(path, "manifest.json");
            if (!manifest)
                r->oom = 1;
            else if (is_regular(manifest) && !seen_before(r, path)) {
                if (reg_untrusted(path, 1, reason, sizeof reason))
                    refuse(r, path, "%s", reason);
                else
                    search_pack(r, path, manifest);
            }
            free(manifest);
        }
        free(path);
    }
    free(ents);
}

/* Each non-empty component of a colon-separated list. */
static void search_list(pr_registry *r, const char *list, int explicit)
{
    char *copy = strdup(list);
    if (!copy) {
        r->oom = 1;
        return;
    }
    char *save = NULL;
    for (char *d = strtok_r(copy, ":", &save); d; d = strtok_r(NULL, ":", &save))
        search_dir(r, d, explicit);
    free(copy);
}

/* <dir of the running program>/plugins/.libs when that exists (a build
 * tree; also when the program is libtool's uninstalled binary in .libs). */
static void search_build_tree(pr_registry *r)
{
    char exe[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (n <= 0)
        return;
    exe[n] = '\0';
    char *slash = strrchr(exe, '/');
    if (!slash)
        return;
    *slash = '\0';
    char *dir = join_path(exe[0] ? exe : "/", "plugins/.libs");
    if (dir && access(dir, F_OK) != 0 && ends_with(exe, "/.libs")) {
        free(dir);
        exe[strlen(exe) - strlen("/.libs")] = '\0';
        dir = join_path(exe[0] ? exe : "/", "plugins/.libs");
    }
    if (!dir) {
        r->oom = 1;
        return;
    }
    search_dir(r, dir, 0);
    free(dir);
}

int pr_registry_open(const char *search_path, pr_registry **out, pr_error *err)
{
    *out = NULL;
    pr_registry *r = calloc(1, sizeof *r);
    if (!r)
        return pr_errorf(err, PR_ERR_NOMEM, "plugin registry: out of memory");
    r->scan = reg_scanner_open(reg_probe_library);
    if (search_path) {
        search_list(r, search_path, 1);
    } else {
        const char *env = getenv("PEFTREF_PLUGIN_PATH");
        if (env)
            search_list(r, env, 1);
        search_build_tree(r);
        search_dir(r, PEFTREF_PLUGINSDIR, 0);
    }
    reg_scanner_close(r->scan);
    r->scan = NULL;
    if (r->oom && r->n_techs == 0 && r->n_refused == 0) {
        pr_registry_free(r);
        return pr_errorf(err, PR_ERR_NOMEM, "plugin registry: out of memory while searching for plugins");
    }
    *out = r;
    return PR_OK;
}

void pr_registry_free(pr_registry *r)
{
    if (!r)
        return;
    for (int i = 0; i < r->n_techs; i++)
        reg_tech_copy_free(&r->techs[i].c);
    free(r->techs);
    for (int i = 0; i < r->n_libs; i++) {
        dlclose(r->libs[i].handle);
        free(r->libs[i].path);
    }
    free(r->libs);
    for (int i = 0; i < r->n_refused; i++) {
        free(r->refused[i].path);
        free(r->refused[i].reason);
    }
    free(r->refused);
    for (int i = 0; i < r->n_shadows; i++) {
        free(r->shadows[i].name);
        free(r->shadows[i].path);
    }
    free(r->shadows);
    for (int i = 0; i < r->n_seen; i++)
        free(r->seen[i]);
    free(r->seen);
    free(r);
}

int pr_registry_count(const pr_registry *r)
{
    return r ? r->n_techs : 0;
}

const pr_technique *pr_registry_technique(const pr_registry *r, int i)
{
    if (!r || i < 0 || i >= r->n_techs)
        return NULL;
    return &r->techs[i].c.t;
}

const char *pr_registry_origin(const pr_registry *r, int i)
{
    if (!r || i < 0 || i >= r->n_techs)
        return NULL;
    return r->libs[r->techs[i].lib].path;
}

const pr_technique *pr_registry_find(const pr_registry *r, const char *name)
{
    if (!r || !name)
        return NULL;
    int i = find_tech(r, name);
    return i < 0 ? NULL : &r->techs[i].c.t;
}



const char *pr_registry_suggest(const pr_registry *r, const char *name)
{
    if (!r || !name || !name[0])
        return NULL;
    size_t len = strlen(name);
    /* Allow about one edit per three characters, at least one. */
    int limit = len <= 3 ? 1 : len <= 6 ? 2 : 3;
    const char *best = NULL;
    int best_d = INT_MAX;
    for (int i = 0; i < r->n_techs; i++) {
        const char *t = r->techs[i].c.t.name;
        int d = names_edit_distance(name, t);
        /* A prefix of three or more characters ("prefix" for
         * "prefix-tuning") is as good as one edit. */
        if (d > 1 && len >= 3 && strncmp(t, name, len) == 0)
            d = 1;
        if (d < best_d) {
            best_d = d;
            best = t;
        }
    }
    return best_d <= limit ? best : NULL;
}

int pr_registry_refused_count(const pr_registry *r)
{
    return r ? r->n_refused : 0;
}

void pr_registry_refused(const pr_registry *r, int i, const char **path, const char **reason)
{
    if (!r || i < 0 || i >= r->n_refused) {
        if (path)
            *path = NULL;
        if (reason)
            *reason = NULL;
        return;
    }
    if (path)
        *path = r->refused[i].path;
    if (reason)
        *reason = r->refused[i].reason;
}

int pr_registry_shadowed(const pr_registry *r, const char *name, int i, const char **winner_path,
                         const char **loser_path)
{
    if (winner_path)
        *winner_path = NULL;
    if (loser_path)
        *loser_path = NULL;
    if (!r || !name || i < 0)
        return 0;
    for (int k = 0; k < r->n_shadows; k++) {
        if (strcmp(r->shadows[k].name, name) != 0)
            continue;
        if (i-- > 0)
            continue;
        if (winner_path)
            *winner_path = r->libs[r->shadows[k].lib].path;
        if (loser_path)
            *loser_path = r->shadows[k].path;
        return 1;
    }
    return 0;
}
