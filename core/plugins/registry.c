/* peftref core: finding, loading and checking technique plugins.
 *
 * Search order (the first technique of a name wins; a later file offering
 * the same name is refused, naming the file that provided it first):
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
 * targets held to the same rule.  What fails it is refused with the reason.
 *
 * A library is loaded with dlopen(RTLD_NOW | RTLD_LOCAL) and refused with a
 * one-line reason when it does not load, lacks peftref_plugin_entry, its
 * entry returns NULL or no techniques, its pr_plugin is too small or built
 * for another ABI major, or any descriptor fails pr_technique_validate.
 * A refused library is dlclosed at once; accepted ones stay open until
 * pr_registry_free.
 *
 * Descriptors are read only as far as their struct_size covers (LV2 and
 * SQLite's rule): the registry keeps host-side copies of every technique
 * and of its option, parameter and buffer declarations, zero-filled past
 * what the plugin provided, with struct_size set to the host's size.
 * Arrays are walked with the plugin's element size, so a plugin built
 * against a later ABI 1.x with larger declarations still reads correctly.
 * Strings and callbacks in the copies point into the library. */
#include "config.h"

#include <dirent.h>
#include <dlfcn.h>
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <jansson.h>

#include "peftref/module.h"
#include "expr.h"
#include "names.h"

#ifndef PEFTREF_PLUGINSDIR
#define PEFTREF_PLUGINSDIR "/usr/local/lib/peftref/plugins"
#endif

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

/* ---- host-side copies of descriptors -------------------------------------- */

typedef struct tech_copy {
    pr_technique t;              /* options/params/... point at the arrays below */
    pr_option_decl *options;
    pr_param_decl *params;
    pr_buffer_decl *saved;
    pr_buffer_decl *scratch;
    pr_param_decl *fold_params;
} tech_copy;

static void tech_copy_free(tech_copy *c)
{
    free(c->options);
    free(c->params);
    free(c->saved);
    free(c->scratch);
    free(c->fold_params);
    memset(c, 0, sizeof *c);
}

/* Copy n declarations of the plugin's element size (its struct_size) into
 * a zeroed array of the host's size. */
static int copy_decls(const void *src, uint32_t n, size_t host_size, size_t min_size, const char *what,
                      void **out, pr_error *err)
{
    *out = NULL;
    if (n == 0)
        return PR_OK;
    if (n > MAX_DECLS)
        return pr_errorf(err, PR_ERR_FORMAT, "n_%s %u is absurdly large (at most %u)", what, n, MAX_DECLS);
    if (!src)
        return pr_errorf(err, PR_ERR_FORMAT, "n_%s is %u but %s is NULL", what, n, what);
    uint32_t stride = *(const uint32_t *)src;
    if (stride < min_size)
        return pr_errorf(err, PR_ERR_FORMAT, "%s[0]: struct_size %u is smaller than the %zu bytes of ABI %d.0",
                         what, stride, min_size, PR_ABI_MAJOR);
    if (stride > STRUCT_MAX_SIZE || stride % sizeof(void *) != 0)
        return pr_errorf(err, PR_ERR_FORMAT, "%s[0]: struct_size %u is not a plausible size", what, stride);
    unsigned char *dst = calloc(n, host_size);
    if (!dst)
        return pr_errorf(err, PR_ERR_NOMEM, "out of memory");
    for (uint32_t i = 0; i < n; i++) {
        const unsigned char *e = (const unsigned char *)src + (size_t)i * stride;
        uint32_t sz = *(const uint32_t *)e;
        if (sz != stride) {
            free(dst);
            return pr_errorf(err, PR_ERR_FORMAT, "%s[%u]: struct_size %u differs from %s[0]'s %u", what, i, sz,
                             what, stride);
        }
        memcpy(dst + (size_t)i * host_size, e, stride < host_size ? stride : host_size);
        *(uint32_t *)(dst + (size_t)i * host_size) = (uint32_t)host_size;
    }
    *out = dst;
    return PR_OK;
}

/* Size, ABI and copy: everything that must hold before any other field of
 * src may be read. */
static int tech_copy_make(const pr_technique *src, tech_copy *c, pr_error *err)
{
    memset(c, 0, sizeof *c);
    if (!src)
        return pr_errorf(err, PR_ERR_INVALID, "technique descriptor is NULL");
    uint32_t sz = src->struct_size;
    if (sz < 2 * sizeof(uint32_t))
        return pr_errorf(err, PR_ERR_FORMAT, "technique struct_size %u is smaller than the %zu bytes of ABI %d.0",
                         sz, (size_t)TECHNIQUE_MIN_SIZE, PR_ABI_MAJOR);
    /* abi_major sits right after struct_size in every ABI, so it can be
     * read before the size is known to fit this host's layout. */
    if (src->abi_major != PR_ABI_MAJOR)
        return pr_errorf(err, PR_ERR_UNSUPPORTED, "technique built for ABI %u, this host speaks ABI %d",
                         src->abi_major, PR_ABI_MAJOR);
    if (sz < TECHNIQUE_MIN_SIZE)
        return pr_errorf(err, PR_ERR_FORMAT, "technique struct_size %u is smaller than the %zu bytes of ABI %d.0",
                         sz, (size_t)TECHNIQUE_MIN_SIZE, PR_ABI_MAJOR);
    if (sz > STRUCT_MAX_SIZE)
        return pr_errorf(err, PR_ERR_FORMAT, "technique struct_size %u is absurdly large", sz);
    memcpy(&c->t, src, sz < sizeof c->t ? sz : sizeof c->t);
    c->t.struct_size = sizeof c->t;
    const char *nm = c->t.name;
    pr_error e = {0};
    int rc;
    void *p = NULL;
    if ((rc = copy_decls(c->t.options, c->t.n_options, sizeof(pr_option_decl), OPTION_MIN_SIZE, "options", &p, &e)))
        goto bad;
    c->options = p;
    if ((rc = copy_decls(c->t.params, c->t.n_params, sizeof(pr_param_decl), PARAM_MIN_SIZE, "params", &p, &e)))
        goto bad;
    c->params = p;
    if ((rc = copy_decls(c->t.saved, c->t.n_saved, sizeof(pr_buffer_decl), BUFFER_MIN_SIZE, "saved", &p, &e)))
        goto bad;
    c->saved = p;
    if ((rc = copy_decls(c->t.scratch, c->t.n_scratch, sizeof(pr_buffer_decl), BUFFER_MIN_SIZE, "scratch", &p,
                         &e)))
        goto bad;
    c->scratch = p;
    if ((rc = copy_decls(c->t.fold_params, c->t.n_fold_params, sizeof(pr_param_decl), PARAM_MIN_SIZE,
                         "fold_params", &p, &e)))
        goto bad;
    c->fold_params = p;
    c->t.options = c->options;
    c->t.params = c->params;
    c->t.saved = c->saved;
    c->t.scratch = c->scratch;
    c->t.fold_params = c->fold_params;
    return PR_OK;
bad:
    tech_copy_free(c);
    /* The name is not validated yet: quote it only when it looks like one. */
    if (nm && strlen(nm) <= MAX_NAME && nm[0] >= 'a' && nm[0] <= 'z')
        return pr_errorf(err, (pr_status)rc, "technique '%s': %s", nm, e.msg);
    return pr_errorf(err, (pr_status)rc, "technique: %s", e.msg);
}

/* ---- descriptor validation ------------------------------------------------ */

static const char *const dim_names[] = {"d_model", "n_heads", "n_kv_heads", "d_head", "d_ff",
                                        "n_layers", "vocab", "d_in", "d_out"};
#define N_DIM_NAMES ((int)(sizeof dim_names / sizeof dim_names[0]))
static const char *const buffer_names[] = {"rows", "B", "T"};

static int bad(const tech_copy *c, pr_error *err, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;

static int bad(const tech_copy *c, pr_error *err, const char *fmt, ...)
{
    char msg[PR_ERROR_MSG_MAX - 96];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    return pr_errorf(err, PR_ERR_FORMAT, "technique '%s': %s", c->t.name, msg);
}

/* name matches first[rest]* and is at most MAX_NAME long. */
static int name_ok(const char *s, const char *first, const char *rest)
{
    if (!s || !s[0] || strlen(s) > MAX_NAME || !strchr(first, s[0]))
        return 0;
    for (const char *q = s + 1; *q; q++)
        if (!strchr(rest, *q))
            return 0;
    return 1;
}

#define LOWER "abcdefghijklmnopqrstuvwxyz"
#define UPPER "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
#define DIGITS "0123456789"

static int option_is_numeric(const pr_option_decl *o)
{
    return o->type == PR_OPT_INT || o->type == PR_OPT_FLOAT || o->type == PR_OPT_BOOL;
}

/* 1 when src has a ',' outside parentheses (a list, not one expression). */
static int has_top_level_comma(const char *src)
{
    int depth = 0;
    for (; *src; src++) {
        if (*src == '(')
            depth++;
        else if (*src == ')')
            depth--;
        else if (*src == ',' && depth == 0)
            return 1;
    }
    return 0;
}

enum { EXPR_FLOAT, EXPR_INT, EXPR_SHAPE };

/* Check one expression of the descriptor against the names it may use:
 * model dimensions, numeric options and, for buffers, rows, B and T. */
static int check_expr(const tech_copy *c, pr_error *err, const char *what, const char *src, int kind,
                      int buffer)
{
    const char *names[N_DIM_NAMES + 3 + MAX_DECLS];
    int n = 0;
    for (int i = 0; i < N_DIM_NAMES; i++)
        names[n++] = dim_names[i];
    if (buffer)
        for (int i = 0; i < 3; i++)
            names[n++] = buffer_names[i];
    for (uint32_t i = 0; i < c->t.n_options; i++)
        if (option_is_numeric(&c->options[i]))
            names[n++] = c->options[i].name;
    char msg[256];
    if (expr_check(src, names, n, kind != EXPR_FLOAT, msg, sizeof msg))
        return bad(c, err, "%s '%s': %s", what, src ? src : "(null)", msg);
    if (kind == EXPR_INT && has_top_level_comma(src))
        return bad(c, err, "%s '%s': one integer expression expected, not a list", what, src);
    return PR_OK;
}

typedef struct enum_field {
    const char *name;
    size_t offset;
    int32_t max;
} enum_field;

static const enum_field typology_fields[] = {
    {"intra", offsetof(pr_technique, intra), PR_INTRA_ATTENTION},
    {"inter", offsetof(pr_technique, inter), PR_INTER_DYNAMIC},
    {"adaptation", offsetof(pr_technique, adaptation), PR_ADAPT_SELECTION},
    {"sharing", offsetof(pr_technique, sharing), PR_SHARE_ACROSS_SITES},
    {"input", offsetof(pr_technique, input), PR_INPUT_NONE},
    {"insertion", offsetof(pr_technique, insertion), PR_INSERT_IN_PLACE},
    {"insertions", offsetof(pr_technique, insertions), PR_INSERTIONS_NONE},
    {"integration", offsetof(pr_technique, integration), PR_INTEGRATE_SELECT},
};

#define WORKSPACE_ALL (PR_WS_EMBEDDING | PR_WS_ATTENTION | PR_WS_FFN | PR_WS_NORM | PR_WS_HEAD)
#define BASE_KINDS_ALL (PR_BASE_WEIGHT | PR_BASE_BIAS | PR_BASE_NORM_GAIN | PR_BASE_NORM_BIAS | PR_BASE_EMBEDDING)
#define PARAM_FLAGS_ALL (PR_PARAM_NO_DECAY | PR_PARAM_TRAINING_ONLY | PR_PARAM_FROZEN)
#define SITES_ALL ((uint32_t)((1ull << PR_SITE_COUNT) - 1))

static int validate_option(const tech_copy *c, const pr_option_decl *o, uint32_t i, pr_error *err)
{
    if (!name_ok(o->name, LOWER, LOWER DIGITS "_"))
        return bad(c, err, "options[%u]: name %s%s%s is not [a-z][a-z0-9_]* (at most %d characters)", i,
                   o->name ? "'" : "", o->name ? o->name : "missing", o->name ? "'" : "", MAX_NAME);
    for (int k = 0; k < N_DIM_NAMES; k++)
        if (strcmp(o->name, dim_names[k]) == 0)
            return bad(c, err, "option '%s' has the name of a model dimension", o->name);
    if (strcmp(o->name, "rows") == 0)
        return bad(c, err, "option 'rows' has the name of a buffer dimension");
    for (uint32_t k = 0; k < i; k++)
        if (strcmp(c->options[k].name, o->name) == 0)
            return bad(c, err, "option '%s' is declared twice", o->name);
    switch (o->type) {
    case PR_OPT_INT:
    case PR_OPT_FLOAT:
        if (isnan(o->min) || isnan(o->max) || isnan(o->def) || o->min > o->max)
            return bad(c, err, "option '%s': range [%g, %g] is empty", o->name, o->min, o->max);
        if (o->def < o->min || o->def > o->max)
            return bad(c, err, "option '%s': default %g is outside [%g, %g]", o->name, o->def, o->min, o->max);
        if (o->type == PR_OPT_INT && o->def != floor(o->def))
            return bad(c, err, "option '%s': integer option has default %g", o->name, o->def);
        break;
    case PR_OPT_BOOL:
        if (o->def != 0 && o->def != 1)
            return bad(c, err, "option '%s': boolean default %g is neither 0 nor 1", o->name, o->def);
        break;
    case PR_OPT_ENUM: {
        uint32_t n = 0;
        if (o->choices)
            while (n <= MAX_DECLS && o->choices[n])
                n++;
        if (n == 0)
            return bad(c, err, "option '%s': enum without choices", o->name);
        if (n > MAX_DECLS)
            return bad(c, err, "option '%s': choices are not NULL-terminated", o->name);
        if (o->def < 0 || o->def >= n || o->def != floor(o->def))
            return bad(c, err, "option '%s': default index %g is not one of the %u choices", o->name, o->def, n);
        break;
    }
    case PR_OPT_STRING:
        break;
    default:
        return bad(c, err, "option '%s': unknown type value %d (known 1..%d)", o->name, o->type, PR_OPT_STRING);
    }
    if (o->per_site != 0 && o->per_site != 1)
        return bad(c, err, "option '%s': per_site %d is neither 0 nor 1", o->name, o->per_site);
    return PR_OK;
}

static const pr_option_decl *find_option(const tech_copy *c, const char *name)
{
    for (uint32_t i = 0; i < c->t.n_options; i++)
        if (strcmp(c->options[i].name, name) == 0)
            return &c->options[i];
    return NULL;
}

/* The pr_init names an init_option's choices may use (plugin.h). */
static const char *const init_names[] = {"zeros", "ones", "normal", "uniform", "kaiming_uniform",
                                         "embed_rows", "text", "constant"};

/* init_option names an ENUM option whose every choice is an init name. */
static int validate_init_option(const tech_copy *c, const pr_param_decl *p, pr_error *err)
{
    const pr_option_decl *o = find_option(c, p->init_option);
    if (!o || o->type != PR_OPT_ENUM)
        return bad(c, err, "param '%s': init_option '%.*s' is not an enum option of the technique", p->name,
                   MAX_NAME, p->init_option);
    for (int k = 0; o->choices[k]; k++) {
        size_t j = 0;
        while (j < sizeof init_names / sizeof init_names[0] && strcmp(o->choices[k], init_names[j]) != 0)
            j++;
        if (j == sizeof init_names / sizeof init_names[0])
            return bad(c, err, "param '%s': init_option '%s' offers '%s', which is not an init (zeros, ones, normal, "
                       "uniform, kaiming_uniform, embed_rows, text, constant)", p->name, o->name, o->choices[k]);
        if (strcmp(o->choices[k], "text") == 0) {
            const pr_option_decl *txt = find_option(c, "init_text");
            if (!txt || txt->type != PR_OPT_STRING)
                return bad(c, err, "param '%s': init_option '%s' offers 'text' but there is no string option "
                           "'init_text'", p->name, o->name);
        }
    }
    return PR_OK;
}

static int validate_params(const tech_copy *c, const pr_param_decl *params, uint32_t n, const char *what,
                           pr_error *err)
{
    for (uint32_t i = 0; i < n; i++) {
        const pr_param_decl *p = &params[i];
        if (!name_ok(p->name, LOWER UPPER "_", LOWER UPPER DIGITS "_"))
            return bad(c, err, "%s[%u]: name %s%s%s is not [A-Za-z_][A-Za-z0-9_]* (at most %d characters)", what,
                       i, p->name ? "'" : "", p->name ? p->name : "missing", p->name ? "'" : "", MAX_NAME);
        for (uint32_t k = 0; k < i; k++)
            if (strcmp(params[k].name, p->name) == 0)
                return bad(c, err, "%s: '%s' is declared twice", what, p->name);
        char label[MAX_NAME + 64];
        snprintf(label, sizeof label, "param '%s' shape", p->name);
        int rc = check_expr(c, err, label, p->shape, EXPR_SHAPE, 0);
        if (rc)
            return rc;
        if (p->init < PR_INIT_ZEROS || p->init > PR_INIT_CUSTOM)
            return bad(c, err, "param '%s': unknown init value %d (known 1..%d)", p->name, p->init, PR_INIT_CUSTOM);
        if (p->init_arg) {
            snprintf(label, sizeof label, "param '%s' init_arg", p->name);
            if ((rc = check_expr(c, err, label, p->init_arg, EXPR_FLOAT, 0)))
                return rc;
        }
        if (p->init == PR_INIT_CUSTOM && !c->t.init)
            return bad(c, err, "param '%s': init is custom but the technique has no init callback", p->name);
        if (p->init == PR_INIT_TEXT) {
            const pr_option_decl *o = find_option(c, "init_text");
            if (!o || o->type != PR_OPT_STRING)
                return bad(c, err, "param '%s': init is text but there is no string option 'init_text'", p->name);
        }
        if (p->init_option && (rc = validate_init_option(c, p, err)))
            return rc;
        if (p->scope < PR_SCOPE_INSERTION || p->scope > PR_SCOPE_GLOBAL)
            return bad(c, err, "param '%s': unknown scope value %d (known 1..%d)", p->name, p->scope,
                       PR_SCOPE_GLOBAL);
        if (p->flags & ~(uint32_t)PARAM_FLAGS_ALL)
            return bad(c, err, "param '%s': unknown flag bits 0x%x", p->name, p->flags & ~(uint32_t)PARAM_FLAGS_ALL);
        if ((p->flags & PR_PARAM_TRAINING_ONLY) && !c->t.fold)
            return bad(c, err, "param '%s' is training-only but the technique has no fold callback", p->name);
    }
    return PR_OK;
}

static int validate_buffers(const tech_copy *c, const pr_buffer_decl *b, uint32_t n, const char *what,
                            pr_error *err)
{
    for (uint32_t i = 0; i < n; i++) {
        if (!name_ok(b[i].name, LOWER UPPER "_", LOWER UPPER DIGITS "_"))
            return bad(c, err, "%s[%u]: name %s%s%s is not [A-Za-z_][A-Za-z0-9_]*", what, i, b[i].name ? "'" : "",
                       b[i].name ? b[i].name : "missing", b[i].name ? "'" : "");
        for (uint32_t k = 0; k < i; k++)
            if (strcmp(b[k].name, b[i].name) == 0)
                return bad(c, err, "%s buffer '%s' is declared twice", what, b[i].name);
        char label[MAX_NAME + 64];
        snprintf(label, sizeof label, "%s buffer '%s' shape", what, b[i].name);
        int rc = check_expr(c, err, label, b[i].shape, EXPR_SHAPE, 1);
        if (rc)
            return rc;
    }
    return PR_OK;
}

static int validate_copy(const tech_copy *c, pr_error *err)
{
    const pr_technique *t = &c->t;
    if (!t->name)
        return pr_errorf(err, PR_ERR_FORMAT, "technique has no name");
    if (!name_ok(t->name, LOWER, LOWER DIGITS "_-"))
        return pr_errorf(err, PR_ERR_FORMAT, "technique name '%.*s' is not [a-z][a-z0-9_-]* (at most %d characters)",
                         MAX_NAME, t->name, MAX_NAME);

    for (size_t i = 0; i < sizeof typology_fields / sizeof typology_fields[0]; i++) {
        const enum_field *f = &typology_fields[i];
        int32_t v;
        memcpy(&v, (const char *)t + f->offset, sizeof v);
        if (v < 1 || v > f->max)
            return bad(c, err, "unknown %s value %d (known 1..%d)", f->name, v, f->max);
    }
    if (t->workspace & ~(uint32_t)WORKSPACE_ALL)
        return bad(c, err, "unknown workspace bits 0x%x", t->workspace & ~(uint32_t)WORKSPACE_ALL);

    for (uint32_t i = 0; i < t->n_options; i++) {
        int rc = validate_option(c, &c->options[i], i, err);
        if (rc)
            return rc;
    }

    if (t->sites & ~SITES_ALL)
        return bad(c, err, "sites has bits 0x%x beyond the %d known sites", t->sites & ~SITES_ALL, PR_SITE_COUNT);
    if (t->default_sites & ~SITES_ALL)
        return bad(c, err, "default_sites has bits 0x%x beyond the %d known sites", t->default_sites & ~SITES_ALL,
                   PR_SITE_COUNT);
    if (t->default_sites & ~t->sites) {
        uint32_t extra = t->default_sites & ~t->sites;
        int s = 0;
        while (!(extra & PR_SITE_BIT(s)))
            s++;
        return bad(c, err, "default site '%s' is not among the sites it allows", pr_site_name(s));
    }

    int rc;
    if ((rc = validate_params(c, c->params, t->n_params, "params", err)))
        return rc;
    if ((rc = validate_buffers(c, c->saved, t->n_saved, "saved", err)))
        return rc;
    if ((rc = validate_buffers(c, c->scratch, t->n_scratch, "scratch", err)))
        return rc;
    if ((rc = validate_params(c, c->fold_params, t->n_fold_params, "fold_params", err)))
        return rc;
    if (t->n_fold_params && !t->fold)
        return bad(c, err, "declares fold_params but no fold callback");

    if (t->module_in && (rc = check_expr(c, err, "module_in", t->module_in, EXPR_INT, 0)))
        return rc;
    if (t->module_out && (rc = check_expr(c, err, "module_out", t->module_out, EXPR_INT, 0)))
        return rc;
    if (t->n_virtual && (rc = check_expr(c, err, "n_virtual", t->n_virtual, EXPR_INT, 0)))
        return rc;
    if (t->scale_expr && (rc = check_expr(c, err, "scale_expr", t->scale_expr, EXPR_FLOAT, 0)))
        return rc;

    if (t->select_kinds & ~(uint32_t)BASE_KINDS_ALL)
        return bad(c, err, "unknown select_kinds bits 0x%x", t->select_kinds & ~(uint32_t)BASE_KINDS_ALL);
    int selection = t->integration == PR_INTEGRATE_SELECT;
    if (selection != (t->adaptation == PR_ADAPT_SELECTION))
        return bad(c, err, "selection adaptation and select integration go together (adaptation %d, "
                           "integration %d)", t->adaptation, t->integration);
    if (selection) {
        if (!t->select_kinds)
            return bad(c, err, "a selection technique must name select_kinds");
        return PR_OK;
    }
    if (t->select_kinds)
        return bad(c, err, "select_kinds is set but the technique is not a selection");
    if (!t->sites)
        return bad(c, err, "declares no sites it can attach to");
    if (!t->default_sites)
        return bad(c, err, "declares no default sites");
    if (!t->forward)
        return bad(c, err, "missing forward callback");
    if (!t->backward)
        return bad(c, err, "missing backward callback");
    if (t->integration == PR_INTEGRATE_CUSTOM && (!t->integrate_forward || !t->integrate_backward))
        return bad(c, err, "custom integration without integrate_forward and integrate_backward");
    if (t->integration == PR_INTEGRATE_SCALED_ADD && !t->scale_expr && !t->scale)
        return bad(c, err, "scaled addition without scale_expr or a scale callback");
    if (t->integration == PR_INTEGRATE_CONCAT && !t->n_virtual)
        return bad(c, err, "concatenation without n_virtual");
    if (t->integration == PR_INTEGRATE_WEIGHT_DELTA && !t->merge)
        return bad(c, err, "weight-delta integration without a merge callback");
    return PR_OK;
}

int pr_technique_validate(const pr_technique *t, pr_error *err)
{
    tech_copy c;
    int rc = tech_copy_make(t, &c, err);
    if (rc)
        return rc;
    rc = validate_copy(&c, err);
    tech_copy_free(&c);
    return rc;
}

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

struct pr_registry {
    reg_tech *techs;
    int n_techs, cap_techs;
    reg_lib *libs;
    int n_libs, cap_libs;
    reg_refusal *refused;
    int n_refused, cap_refused;
    char **seen;                 /* real paths of directories and files already searched */
    int n_seen, cap_seen;
    int oom;
};

/* A library loaded and checked, not yet admitted. */
typedef struct candidate {
    void *handle;
    char *path;
    tech_copy *techs;
    uint32_t n;
} candidate;

static void candidate_drop(candidate *k)
{
    for (uint32_t i = 0; i < k->n; i++)
        tech_copy_free(&k->techs[i]);
    free(k->techs);
    if (k->handle)
        dlclose(k->handle);
    free(k->path);
    memset(k, 0, sizeof *k);
}

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

/* The trust rule for code the host will run (GStreamer's registry makes
 * the same demand): a plugin file, and the directory it really lives in,
 * must be owned by this user or by root and writable by no one else.
 * Symbolic links are resolved first and the target is held to the rule,
 * so a link cannot lend a trusted name to a file another user can change.
 * Returns 0 when path may be loaded or searched, else 1 with why filled. */
static int st_untrusted(const struct stat *st, const char *real, const char *what, char *why, size_t size)
{
    uid_t me = geteuid();
    if (st->st_uid != me && st->st_uid != 0) {
        snprintf(why, size, "not trusted: %s %s is owned by uid %ld, neither this user (uid %ld) nor root",
                 what, real, (long)st->st_uid, (long)me);
        return 1;
    }
    if (st->st_mode & (S_IWGRP | S_IWOTH)) {
        snprintf(why, size, "not trusted: %s %s is writable by %s (mode %04o); "
                 "run 'chmod go-w' on it to load it", what, real,
                 (st->st_mode & S_IWOTH) ? "everyone" : "its group", (unsigned)(st->st_mode & 07777));
        return 1;
    }
    return 0;
}

static int untrusted(const char *path, int is_dir, char *why, size_t size)
{
    char *real = realpath(path, NULL);
    if (!real) {
        snprintf(why, size, "cannot resolve %s: %s", path, strerror(errno));
        return 1;
    }
    struct stat st;
    int bad = 0;
    if (lstat(real, &st) != 0) {
        snprintf(why, size, "cannot stat %s: %s", real, strerror(errno));
        bad = 1;
    } else {
        bad = st_untrusted(&st, real, is_dir ? "directory" : "file", why, size);
    }
    /* the directory the file really lives in decides who can replace it */
    if (!bad && !is_dir) {
        char *slash = strrchr(real, '/');
        if (slash) {
            if (slash == real)
                slash[1] = '\0';
            else
                *slash = '\0';
            if (lstat(real, &st) != 0) {
                snprintf(why, size, "cannot stat %s: %s", real, strerror(errno));
                bad = 1;
            } else {
                bad = st_untrusted(&st, real, "directory", why, size);
            }
        }
    }
    if (bad && strcmp(real, path) != 0) {
        /* name the link the user gave as well as where it leads */
        size_t k = strlen(why);
        snprintf(why + k, size - k, " (reached through %s)", path);
    }
    free(real);
    return bad;
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

/* dlopen, find the entry, check the plugin and copy its descriptors. */
static int load_library(const char *path, candidate *k, char *reason, size_t len)
{
    memset(k, 0, sizeof *k);
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
    const pr_plugin *pl = entry();
    if (!pl) {
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
        if (tech_copy_make(p.techniques[i], &k->techs[i], &err)) {
            snprintf(reason, len, "%s", err.msg);
            goto refused;
        }
        k->n = i + 1;
        if (validate_copy(&k->techs[i], &err)) {
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
    candidate_drop(k);
    return -1;
}

static int find_tech(const pr_registry *r, const char *name)
{
    for (int i = 0; i < r->n_techs; i++)
        if (strcmp(r->techs[i].c.t.name, name) == 0)
            return i;
    return -1;
}

/* Admit a checked library unless one of its names is taken; consumes k. */
static void admit(pr_registry *r, candidate *k)
{
    for (uint32_t i = 0; i < k->n; i++) {
        int j = find_tech(r, k->techs[i].t.name);
        if (j >= 0) {
            refuse(r, k->path, "technique '%s' is already provided by %s", k->techs[i].t.name,
                   r->libs[r->techs[j].lib].path);
            candidate_drop(k);
            return;
        }
    }
    if (grow((void **)&r->libs, &r->cap_libs, r->n_libs + 1, sizeof *r->libs) ||
        grow((void **)&r->techs, &r->cap_techs, r->n_techs + (int)k->n, sizeof *r->techs)) {
        r->oom = 1;
        candidate_drop(k);
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
    candidate *ks = calloc((size_t)(n ? n : 1), sizeof *ks);
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
            if (untrusted(path, 0, reason, sizeof reason))
                refuse(r, path, "%s", reason);
            else if (load_library(path, &ks[nk], reason, sizeof reason) == 0)
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
        candidate_drop(&ks[k]);
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
    if (untrusted(dir, 1, reason, sizeof reason)) {
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
                candidate k;
                if (untrusted(path, 0, reason, sizeof reason))
                    refuse(r, path, "%s", reason);
                else if (load_library(path, &k, reason, sizeof reason) == 0)
                    admit(r, &k);
                else
                    refuse(r, path, "%s", reason);
            }
        } else if (stat(path, &st) == 0 && S_ISDIR(st.st_mode)) {
            char *manifest = join_path(path, "manifest.json");
            if (!manifest)
                r->oom = 1;
            else if (is_regular(manifest) && !seen_before(r, path)) {
                if (untrusted(path, 1, reason, sizeof reason))
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
    if (search_path) {
        search_list(r, search_path, 1);
    } else {
        const char *env = getenv("PEFTREF_PLUGIN_PATH");
        if (env)
            search_list(r, env, 1);
        search_build_tree(r);
        search_dir(r, PEFTREF_PLUGINSDIR, 0);
    }
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
        tech_copy_free(&r->techs[i].c);
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
