/* peftref core: host-side copies of technique descriptors, and their
 * validation (pr_technique_validate), for the plugin registry.
 *
 * Descriptors are read only as far as their struct_size covers (LV2 and
 * SQLite's rule): the registry keeps host-side copies of every technique
 * and of its option, parameter and buffer declarations, zero-filled past
 * what the plugin provided, with struct_size set to the host's size.
 * Arrays are walked with the plugin's element size, so a plugin built
 * against a later ABI 1.x with larger declarations still reads correctly.
 * Strings and callbacks in the copies point into the library.
 *
 * Validation then checks every field the host relies on: names, typology
 * values, option ranges and defaults, parameter and buffer declarations,
 * the expressions they use and the callbacks their integration needs. */
#include <math.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "peftref/ext/peft_config.h"
#include "peftref/module.h"
#include "expr.h"
#include "registry_internal.h"

/* ---- host-side copies of descriptors -------------------------------------- */

void reg_tech_copy_free(tech_copy *c)
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
int reg_tech_copy_make(const pr_technique *src, tech_copy *c, pr_error *err)
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
    reg_tech_copy_free(c);
    /* The name is not validated yet: quote it only when it looks like one. */
    if (nm && strlen(nm) <= MAX_NAME && nm[0] >= 'a' && nm[0] <= 'z')
        return pr_errorf(err, (pr_status)rc, "technique '%s': %s", nm, e.msg);
    return pr_errorf(err, (pr_status)rc, "technique: %s", e.msg);
}

/* ---- descriptor validation ------------------------------------------------ */

static const char *const dim_names[] = {"d_model", "n_heads", "n_kv_heads", "d_head", "d_ff",
                                        "n_layers", "vocab", "d_in", "d_out", "max_d_in", "max_d_out",
                                        "n_sites", "n_chosen_layers"};
#define N_DIM_NAMES ((int)(sizeof dim_names / sizeof dim_names[0]))
static const char *const buffer_names[] = {"rows", "B", "T", "n_members"};
#define N_BUFFER_NAMES ((int)(sizeof buffer_names / sizeof buffer_names[0]))

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
    /* an enum option is its choice's index (core/module/plan.c) */
    return o->type == PR_OPT_INT || o->type == PR_OPT_FLOAT || o->type == PR_OPT_BOOL || o->type == PR_OPT_ENUM;
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
    const char *names[N_DIM_NAMES + N_BUFFER_NAMES + MAX_DECLS];
    int n = 0;
    for (int i = 0; i < N_DIM_NAMES; i++)
        names[n++] = dim_names[i];
    if (buffer)
        for (int i = 0; i < N_BUFFER_NAMES; i++)
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
#define PARAM_FLAGS_ALL (PR_PARAM_NO_DECAY | PR_PARAM_TRAINING_ONLY | PR_PARAM_FROZEN | PR_PARAM_REGENERATE)
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
            const pr_option_decl *txt = p->init_source ? find_option(c, p->init_source) : NULL;
            if (!txt || txt->type != PR_OPT_STRING)
                return bad(c, err, "param '%s': init_option '%s' offers 'text' but init_source names no string "
                           "option", p->name, o->name);
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
            const pr_option_decl *o = p->init_source ? find_option(c, p->init_source) : NULL;
            if (!o || o->type != PR_OPT_STRING)
                return bad(c, err, "param '%s': init is text but init_source names no string option", p->name);
        }
        if (p->lr_scale) {
            snprintf(label, sizeof label, "param '%s' lr_scale", p->name);
            if ((rc = check_expr(c, err, label, p->lr_scale, EXPR_FLOAT, 0)))
                return rc;
        }
        if ((p->flags & PR_PARAM_REGENERATE) && !(p->flags & PR_PARAM_FROZEN))
            return bad(c, err, "param '%s' is regenerated but not frozen: only a frozen buffer can be rebuilt "
                       "from the seed", p->name);
        if ((p->flags & PR_PARAM_REGENERATE) && p->init == PR_INIT_CUSTOM)
            return bad(c, err, "param '%s' is regenerated from the seed, so its init must be one the host draws "
                       "(not custom)", p->name);
        if (p->init_option && (rc = validate_init_option(c, p, err)))
            return rc;
        if (p->scope < PR_SCOPE_INSERTION || p->scope > PR_SCOPE_GLOBAL)
            return bad(c, err, "param '%s': unknown scope value %d (known 1..%d)", p->name, p->scope,
                       PR_SCOPE_GLOBAL);
        if (p->flags & ~(uint32_t)PARAM_FLAGS_ALL)
            return bad(c, err, "param '%s': unknown flag bits 0x%x", p->name, p->flags & ~(uint32_t)PARAM_FLAGS_ALL);
        if ((p->flags & PR_PARAM_TRAINING_ONLY) && !c->t.fold)
            return bad(c, err, "param '%s' is training-only but the technique has no fold callback", p->name);
        if (p->peft_layout < 0 || p->peft_layout > PR_PEFT_FOLD_VECTOR)
            return bad(c, err, "param '%s': unknown peft_layout value %d (known 0..%d)", p->name, p->peft_layout,
                       PR_PEFT_FOLD_VECTOR);
        for (const char *k = p->peft_key ? strchr(p->peft_key, '{') : NULL; k; k = strchr(k + 1, '{'))
            if (strncmp(k, "{prefix}", 8) != 0 && strncmp(k, "{layer}", 7) != 0 && strncmp(k, "{embed}", 7) != 0)
                return bad(c, err, "param '%s': peft_key '%.*s' uses a placeholder other than {prefix}, {layer} and "
                           "{embed}",
                           p->name, MAX_NAME, p->peft_key);
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

int reg_validate_copy(const tech_copy *c, pr_error *err)
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
    const pr_ext_peft_config *pv = t->extension_data ? t->extension_data(PR_EXT_PEFT_CONFIG_URI) : NULL;
    if (pv) {
        if (pv->struct_size < offsetof(pr_ext_peft_config, no_import) + sizeof pv->no_import)
            return bad(c, err, "its peft-config extension is %u bytes, shorter than version 1's %zu", pv->struct_size,
                       offsetof(pr_ext_peft_config, no_import) + sizeof pv->no_import);
        if (!t->peft_type)
            return bad(c, err, "has a peft-config extension but no peft_type");
        json_error_t je;
        json_t *o = pv->implies ? json_loads(pv->implies, 0, &je) : NULL;
        int ok = !pv->implies || (o && json_is_object(o));
        json_decref(o);
        if (!ok)
            return bad(c, err, "peft-config implies is not a JSON object: %s",
                       o ? "another JSON value" : je.text);
    }
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
    if (t->struct_size >= offsetof(pr_technique, default_sites_llama) + sizeof t->default_sites_llama &&
        (t->default_sites_llama & ~t->sites))
        return bad(c, err, "default_sites_llama has sites (0x%x) the technique cannot attach to",
                   t->default_sites_llama & ~t->sites);
    if (t->composite) {
        /* a composite's h comes from its members through compose_forward */
        if (!t->compose_forward || !t->compose_backward)
            return bad(c, err, "composite without compose_forward and compose_backward callbacks");
        if (t->integration != PR_INTEGRATE_DIRECT_ADD && t->integration != PR_INTEGRATE_SCALED_ADD &&
            t->integration != PR_INTEGRATE_GATED_ADD)
            return bad(c, err, "a composite integrates by addition (direct, scaled or gated), not %d",
                       t->integration);
    } else {
        if (!t->forward)
            return bad(c, err, "missing forward callback");
        if (!t->backward)
            return bad(c, err, "missing backward callback");
    }
    if (t->integration == PR_INTEGRATE_CUSTOM && (!t->integrate_forward || !t->integrate_backward))
        return bad(c, err, "custom integration without integrate_forward and integrate_backward");
    if (t->flops_per_token && (rc = check_expr(c, err, "flops_per_token", t->flops_per_token, EXPR_INT, 0)))
        return rc;
    if (t->sharing_set & ~(uint32_t)(PR_SHARE_BIT(PR_SHARE_NONE) | PR_SHARE_BIT(PR_SHARE_ACROSS_LAYERS) |
                                     PR_SHARE_BIT(PR_SHARE_ACROSS_SITES)))
        return bad(c, err, "sharing_set has unknown bits 0x%x", t->sharing_set);
    if (t->composite && (!t->compose_forward || !t->compose_backward))
        return bad(c, err, "composite technique without compose_forward and compose_backward");
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
    int rc = reg_tech_copy_make(t, &c, err);
    if (rc)
        return rc;
    rc = reg_validate_copy(&c, err);
    reg_tech_copy_free(&c);
    return rc;
}
