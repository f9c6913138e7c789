/* peftref pipelines: YAML text -> a tree of ynodes (pipeline_internal.h).
 *
 * libyaml's event parser feeds a recursive builder; every node keeps its
 * 1-based line and column (an override's: its ordinal and the column in
 * "--set KEY=VALUE"), so that the validator can say where a problem is.
 * Anchors and aliases are resolved here (an alias is a copy of its
 * anchor's node); a stream holds at most one document.
 *
 * The expanded tree is held to PL_YAML_MAX_NODES nodes, PL_YAML_MAX_TEXT
 * scalar bytes and PL_YAML_MAX_DEPTH levels (pipeline_internal.h): every
 * anchor remembers how many nodes and bytes its node holds and how deep it
 * goes, so an alias that would pass a limit is refused, at the alias,
 * before anything is copied. */
#include "config.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <yaml.h>

#include "pipeline_internal.h"

/* ---- the YAML tree --------------------------------------------------------- */

void pl_ynode_free(ynode *n)
{
    if (!n)
        return;
    for (int i = 0; i < n->n; i++) {
        if (n->keys)
            pl_ynode_free(n->keys[i]);
        pl_ynode_free(n->vals[i]);
    }
    free(n->keys);
    free(n->vals);
    free(n->text);
    free(n);
}

ynode *pl_ynode_new(int kind, const char *src, int line, int col)
{
    ynode *n = calloc(1, sizeof *n);
    if (n) {
        n->kind = kind;
        n->src = src;
        n->line = line;
        n->col = col;
    }
    return n;
}

ynode *pl_ynode_scalar(const char *text, int plain, const char *src, int line, int col)
{
    ynode *n = pl_ynode_new(Y_SCALAR, src, line, col);
    if (n) {
        n->text = strdup(text);
        n->plain = plain;
        if (!n->text) {
            free(n);
            n = NULL;
        }
    }
    return n;
}

/* Append (key, val) to a map or val to a list; takes ownership. */
int pl_ynode_push(ynode *n, ynode *key, ynode *val)
{
    if (n->n == n->cap) {
        int cap = n->cap ? 2 * n->cap : 8;
        ynode **v = realloc(n->vals, (size_t)cap * sizeof *v);
        if (!v)
            return -1;
        n->vals = v;
        if (n->kind == Y_MAP) {
            ynode **k = realloc(n->keys, (size_t)cap * sizeof *k);
            if (!k)
                return -1;
            n->keys = k;
        }
        n->cap = cap;
    }
    if (n->kind == Y_MAP)
        n->keys[n->n] = key;
    n->vals[n->n++] = val;
    return 0;
}

ynode *pl_ynode_copy(const ynode *s)
{
    ynode *n = pl_ynode_new(s->kind, s->src, s->line, s->col);
    if (!n)
        return NULL;
    n->plain = s->plain;
    if (s->text && !(n->text = strdup(s->text))) {
        free(n);
        return NULL;
    }
    for (int i = 0; i < s->n; i++) {
        ynode *k = s->kind == Y_MAP ? pl_ynode_copy(s->keys[i]) : NULL;
        ynode *v = pl_ynode_copy(s->vals[i]);
        if ((s->kind == Y_MAP && !k) || !v || pl_ynode_push(n, k, v)) {
            pl_ynode_free(k);
            pl_ynode_free(v);
            pl_ynode_free(n);
            return NULL;
        }
    }
    return n;
}

int pl_map_find(const ynode *m, const char *key)
{
    if (!m || m->kind != Y_MAP)
        return -1;
    for (int i = 0; i < m->n; i++)
        if (strcmp(m->keys[i]->text, key) == 0)
            return i;
    return -1;
}

const ynode *pl_map_get(const ynode *m, const char *key)
{
    int i = pl_map_find(m, key);
    return i < 0 ? NULL : m->vals[i];
}

void pl_map_remove(ynode *m, int i)
{
    pl_ynode_free(m->keys[i]);
    pl_ynode_free(m->vals[i]);
    memmove(m->keys + i, m->keys + i + 1, (size_t)(m->n - i - 1) * sizeof *m->keys);
    memmove(m->vals + i, m->vals + i + 1, (size_t)(m->n - i - 1) * sizeof *m->vals);
    m->n--;
}

/* YAML's null: an empty or ~/null plain scalar. */
int pl_is_null(const ynode *n)
{
    return !n || (n->kind == Y_SCALAR && n->plain &&
                  (!n->text[0] || !strcmp(n->text, "~") || !strcasecmp(n->text, "null")));
}

/* ---- parsing ----------------------------------------------------------------------- */

typedef struct anchor {
    char *name;
    ynode *node;      /* borrowed from the tree */
    long nodes;       /* what a copy of node adds to the tree: nodes, */
    size_t text;      /* scalar bytes */
    int height;       /* and levels (1: a scalar or an empty list) */
} anchor;

typedef struct yparse {
    yaml_parser_t p;
    const char *src;
    int line_base, col_base;   /* file: 1, 0; an override: its ordinal, the column before its value */
    int set_len;               /* an override's value length */
    anchor *anchors;
    int n_anchors, cap_anchors;
    diags *d;
    int failed;
    long nodes;       /* in the tree so far, aliases expanded */
    size_t text;      /* scalar bytes so far */
    int deepest;      /* the deepest level reached so far in the node being built */
} yparse;

static void mark_pos(const yparse *y, yaml_mark_t m, int *line, int *col)
{
    if (y->src == pl_set_src) {
        /* an override is one line of KEY=VALUE: a mark past the value's
         * first line (the end of a truncated "[1") points at its end */
        *line = y->line_base;
        *col = y->col_base + (m.line == 0 ? (int)m.column : y->set_len) + 1;
        return;
    }
    *line = y->line_base + (int)m.line;
    *col = (int)m.column + 1;
}

static int next_event(yparse *y, yaml_event_t *e)
{
    if (yaml_parser_parse(&y->p, e))
        return 0;
    int line, col;
    mark_pos(y, y->p.problem_mark, &line, &col);
    const char *problem = y->p.problem ? y->p.problem : "malformed YAML";
    const char *extra = "";
    if (strstr(problem, "expected key") || strstr(problem, "mapping values are not allowed") ||
        strstr(problem, "expected <block end>"))
        extra = "; check the indentation";
    else if (strstr(problem, "tab character"))
        extra = "; indent with spaces";
    if (y->p.context) {
        int cl, cc;
        mark_pos(y, y->p.context_mark, &cl, &cc);
        pl_diag_loc(y->d, y->src, line, col, "YAML syntax error: %s (%s that starts at %d:%d)%s", problem,
                    y->p.context, cl, cc, extra);
    } else {
        pl_diag_loc(y->d, y->src, line, col, "YAML syntax error: %s%s", problem, extra);
    }
    y->failed = 1;
    return -1;
}

static int add_anchor(yparse *y, const char *name, ynode *n, long nodes, size_t text, int height)
{
    if (y->n_anchors == y->cap_anchors) {
        int cap = y->cap_anchors ? 2 * y->cap_anchors : 8;
        anchor *a = realloc(y->anchors, (size_t)cap * sizeof *a);
        if (!a)
            return -1;
        y->anchors = a;
        y->cap_anchors = cap;
    }
    char *s = strdup(name);
    if (!s)
        return -1;
    y->anchors[y->n_anchors++] = (anchor){ s, n, nodes, text, height };
    return 0;
}

/* Forget the anchors from the first'th on: they point into a node about to
 * be freed (a duplicate key's value), which a later alias must not copy. */
static void drop_anchors(yparse *y, int first)
{
    while (y->n_anchors > first)
        free(y->anchors[--y->n_anchors].name);
}

/* Account for nodes more nodes and text more scalar bytes at line:col (an
 * alias names itself in what); -1 after reporting the limit passed. */
static int count_nodes(yparse *y, long nodes, size_t text, int line, int col, const char *what)
{
    if (nodes > PL_YAML_MAX_NODES - y->nodes) {
        pl_diag_loc(y->d, y->src, line, col, "%s would make the pipeline more than %d YAML nodes "
                    "(PL_YAML_MAX_NODES)", what, PL_YAML_MAX_NODES);
        y->failed = 1;
        return -1;
    }
    if (text > PL_YAML_MAX_TEXT - y->text) {
        pl_diag_loc(y->d, y->src, line, col, "%s would make the pipeline's text more than %zu bytes "
                    "(PL_YAML_MAX_TEXT)", what, PL_YAML_MAX_TEXT);
        y->failed = 1;
        return -1;
    }
    y->nodes += nodes;
    y->text += text;
    return 0;
}

static void oom_at(yparse *y, int line, int col)
{
    if (!y->failed)
        pl_diag_loc(y->d, y->src, line, col, "out of memory");
    y->failed = 1;
}

/* Build the node that event e starts (e is consumed by the caller). */
static ynode *build(yparse *y, yaml_event_t *e, int depth)
{
    int line, col;
    mark_pos(y, e->start_mark, &line, &col);
    if (depth > PL_YAML_MAX_DEPTH) {
        pl_diag_loc(y->d, y->src, line, col, "nesting deeper than %d levels (PL_YAML_MAX_DEPTH)",
                    PL_YAML_MAX_DEPTH);
        y->failed = 1;
        return NULL;
    }
    ynode *n = NULL;
    const yaml_char_t *anchor_name = NULL;
    long nodes0 = y->nodes;
    size_t text0 = y->text;
    int deepest0 = y->deepest;
    y->deepest = depth;
    switch (e->type) {
    case YAML_ALIAS_EVENT: {
        const char *name = (const char *)e->data.alias.anchor;
        y->deepest = deepest0;
        for (int i = y->n_anchors - 1; i >= 0; i--)
            if (strcmp(y->anchors[i].name, name) == 0) {
                const anchor *a = &y->anchors[i];
                char what[160];
                snprintf(what, sizeof what, "alias '*%.100s'", name);
                if (depth + a->height - 1 > PL_YAML_MAX_DEPTH) {
                    pl_diag_loc(y->d, y->src, line, col, "%s would nest the pipeline deeper than %d levels "
                                "(PL_YAML_MAX_DEPTH)", what, PL_YAML_MAX_DEPTH);
                    y->failed = 1;
                    return NULL;
                }
                if (count_nodes(y, a->nodes, a->text, line, col, what))
                    return NULL;
                if (depth + a->height - 1 > y->deepest)
                    y->deepest = depth + a->height - 1;
                n = pl_ynode_copy(a->node);
                if (!n)
                    oom_at(y, line, col);
                return n;
            }
        pl_diag_loc(y->d, y->src, line, col, "unknown alias '*%s'", name);
        y->failed = 1;
        return NULL;
    }
    case YAML_SCALAR_EVENT:
        if (count_nodes(y, 1, e->data.scalar.length, line, col, "this value"))
            return NULL;
        n = pl_ynode_scalar((const char *)e->data.scalar.value, e->data.scalar.style == YAML_PLAIN_SCALAR_STYLE,
                            y->src, line, col);
        anchor_name = e->data.scalar.anchor;
        break;
    case YAML_SEQUENCE_START_EVENT:
    case YAML_MAPPING_START_EVENT: {
        int is_map = e->type == YAML_MAPPING_START_EVENT;
        if (count_nodes(y, 1, 0, line, col, is_map ? "this mapping" : "this list"))
            return NULL;
        n = pl_ynode_new(is_map ? Y_MAP : Y_SEQ, y->src, line, col);
        anchor_name = is_map ? e->data.mapping_start.anchor : e->data.sequence_start.anchor;
        if (!n)
            break;
        for (;;) {
            yaml_event_t k;
            if (next_event(y, &k)) {
                pl_ynode_free(n);
                return NULL;
            }
            if (k.type == YAML_SEQUENCE_END_EVENT || k.type == YAML_MAPPING_END_EVENT) {
                yaml_event_delete(&k);
                break;
            }
            int anchors0 = y->n_anchors;
            ynode *key = build(y, &k, depth + 1);
            yaml_event_delete(&k);
            if (!key) {
                pl_ynode_free(n);
                return NULL;
            }
            ynode *val = NULL;
            if (is_map) {
                yaml_event_t v;
                if (next_event(y, &v)) {
                    pl_ynode_free(key);
                    pl_ynode_free(n);
                    return NULL;
                }
                val = build(y, &v, depth + 1);
                yaml_event_delete(&v);
                if (!val) {
                    pl_ynode_free(key);
                    pl_ynode_free(n);
                    return NULL;
                }
                if (key->kind != Y_SCALAR) {
                    pl_diag_at(y->d, key, "a mapping key must be a name, not a %s",
                               key->kind == Y_MAP ? "mapping" : "list");
                    drop_anchors(y, anchors0);
                    pl_ynode_free(key);
                    pl_ynode_free(val);
                    continue;
                }
                int first = pl_map_find(n, key->text);
                if (first >= 0) {
                    pl_diag_at(y->d, key, "duplicate key '%s' (first at line %d)", key->text, n->keys[first]->line);
                    drop_anchors(y, anchors0);
                    pl_ynode_free(key);
                    pl_ynode_free(val);
                    continue;
                }
            } else {
                val = key;
                key = NULL;
            }
            if (pl_ynode_push(n, key, val)) {
                pl_ynode_free(key);
                pl_ynode_free(val);
                pl_ynode_free(n);
                oom_at(y, line, col);
                return NULL;
            }
        }
        break;
    }
    default:
        pl_diag_loc(y->d, y->src, line, col, "unexpected YAML event");
        y->failed = 1;
        return NULL;
    }
    if (!n) {
        oom_at(y, line, col);
        return NULL;
    }
    /* what this node holds (a duplicate key's dropped value counted too) */
    int height = y->deepest - depth + 1;
    if (deepest0 > y->deepest)
        y->deepest = deepest0;
    if (anchor_name && add_anchor(y, (const char *)anchor_name, n, y->nodes - nodes0, y->text - text0, height)) {
        pl_ynode_free(n);
        oom_at(y, line, col);
        return NULL;
    }
    return n;
}

/* Parse one YAML document from text (len bytes).  *root is NULL for an
 * empty stream.  Returns -1 after reporting a syntax error. */
int pl_parse_yaml(const char *text, size_t len, const char *src, int line_base, int col_base, diags *d,
                  ynode **root)
{
    yparse y;
    memset(&y, 0, sizeof y);
    y.src = src;
    y.line_base = line_base;
    y.col_base = col_base;
    y.set_len = (int)len;
    y.d = d;
    *root = NULL;
    if (!yaml_parser_initialize(&y.p)) {
        pl_diag_loc(d, src, 0, 0, "cannot initialise the YAML parser");
        return -1;
    }
    yaml_parser_set_input_string(&y.p, (const unsigned char *)text, len);
    ynode *doc = NULL;
    int docs = 0;
    for (;;) {
        yaml_event_t e;
        if (next_event(&y, &e))
            break;
        yaml_event_type_t t = e.type;
        if (t == YAML_STREAM_END_EVENT) {
            yaml_event_delete(&e);
            break;
        }
        if (t == YAML_DOCUMENT_START_EVENT && ++docs > 1) {
            int line, col;
            mark_pos(&y, e.start_mark, &line, &col);
            pl_diag_loc(d, src, line, col, "a second YAML document; a pipeline is one document");
            y.failed = 1;
            yaml_event_delete(&e);
            break;
        }
        if (t != YAML_STREAM_START_EVENT && t != YAML_DOCUMENT_START_EVENT && t != YAML_DOCUMENT_END_EVENT)
            doc = build(&y, &e, 0);
        yaml_event_delete(&e);
        if (y.failed)
            break;
    }
    for (int i = 0; i < y.n_anchors; i++)
        free(y.anchors[i].name);
    free(y.anchors);
    yaml_parser_delete(&y.p);
    if (y.failed) {
        pl_ynode_free(doc);
        return -1;
    }
    *root = doc;
    return 0;
}
