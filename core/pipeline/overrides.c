/* peftref pipelines: `--set key.path=value` overrides, which edit the
 * YAML tree before validation (docs/pipeline.md, "Overrides").
 *
 * A path walks mappings by key and lists by index (the next index adds an
 * item); a key may itself contain dots (site names such as attn.k).  The
 * nodes an override creates are located "--set:N:COL", N its ordinal. */
#include "config.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pipeline_internal.h"

/* The key of map that the path segments seg[i..] start with: the longest
 * run of segments joined by '.' that is an existing key (site names such
 * as attn.k contain dots), else a new key: a site name under
 * site_options, otherwise one segment.  Returns how many segments it
 * takes and the key in buf. */
static int match_key(const ynode *map, char **seg, int i, int n_seg, const char *parent, char *buf, size_t len)
{
    for (int j = n_seg; j > i; j--) {
        buf[0] = '\0';
        size_t off = 0;
        for (int k = i; k < j; k++) {
            int w = snprintf(buf + off, len - off, "%s%s", k > i ? "." : "", seg[k]);
            if (w < 0 || (size_t)w >= len - off)
                break;
            off += (size_t)w;
        }
        if (pl_map_find(map, buf) >= 0 || (parent && !strcmp(parent, "site_options") && pr_site_parse(buf) >= 0))
            return j - i;
    }
    snprintf(buf, len, "%s", seg[i]);
    return 1;
}

/* Set the value at the dotted key path text[0..klen) (train.steps,
 * modules.0.options.r) in *root: val, taken over, or else value_text
 * parsed as YAML (an override's VALUE).  What this reports and the nodes
 * it creates are located at (src, line), a segment of the path at column
 * col0 + its 1-based offset in the path. */
void pl_apply_path(loader *L, ynode **root, const char *text, size_t klen, const char *value_text, ynode *val,
                   const char *src, int line, int col0)
{
    char *key = strndup(text, klen);
    char **seg = calloc(klen + 1, sizeof *seg);
    int *segcol = calloc(klen + 1, sizeof *segcol);
    if (!key || !seg || !segcol) {
        L->oom = 1;
        goto done;
    }
    int n_seg = 0;
    for (char *s = key, *save = NULL, *t = strtok_r(s, ".", &save); t; t = strtok_r(NULL, ".", &save)) {
        segcol[n_seg] = (int)(t - key) + 1;
        seg[n_seg++] = t;
    }
    /* strtok_r skips empty segments: compare lengths to catch "a..b" */
    size_t joined = 0;
    for (int i = 0; i < n_seg; i++)
        joined += strlen(seg[i]) + (i > 0);
    if (n_seg == 0 || joined != klen) {
        pl_diag_loc(&L->d, src, line, col0 + 1, "'%.*s' is not a key path (names joined by '.', e.g. train.steps)",
                    (int)klen, text);
        goto done;
    }
    if (value_text && pl_parse_yaml(value_text, strlen(value_text), src, line, col0 + (int)klen + 1, &L->d, &val))
        goto done;
    if (!val && !(val = pl_ynode_scalar("", 1, src, line, col0 + (int)klen + 2))) {
        L->oom = 1;
        goto done;
    }
    if (!*root || pl_is_null(*root)) {
        pl_ynode_free(*root);
        if (!(*root = pl_ynode_new(Y_MAP, src, line, col0 + 1))) {
            L->oom = 1;
            goto done;
        }
    }
    ynode *cur = *root;
    const char *parent = NULL;
    char sofar[512] = "";
    for (int i = 0; i < n_seg;) {
        if (cur->kind == Y_SCALAR) {
            pl_diag_loc(&L->d, src, line, col0 + segcol[i], "%.*s: '%s' holds a value, not a mapping or a list",
                        (int)klen, text, sofar);
            goto done;
        }
        char kbuf[256];
        int take = 1;
        ynode **slot = NULL;
        if (cur->kind == Y_SEQ) {
            long long idx;
            if (pl_parse_ll(seg[i], &idx) || idx < 0 || idx > cur->n) {
                pl_diag_loc(&L->d, src, line, col0 + segcol[i],
                            "%.*s: '%s' is not an index of '%s', which has %d item%s (0-%d, or %d to add one)",
                            (int)klen, text, seg[i], sofar, cur->n, cur->n == 1 ? "" : "s", cur->n - 1, cur->n);
                goto done;
            }
            snprintf(kbuf, sizeof kbuf, "%s", seg[i]);
            if (idx == cur->n) {
                ynode *fresh = pl_ynode_new(Y_MAP, src, line, col0 + segcol[i]);
                if (!fresh || pl_ynode_push(cur, NULL, fresh)) {
                    pl_ynode_free(fresh);
                    L->oom = 1;
                    goto done;
                }
            }
            slot = &cur->vals[idx];
        } else {
            take = match_key(cur, seg, i, n_seg, parent, kbuf, sizeof kbuf);
            int at = pl_map_find(cur, kbuf);
            if (at < 0) {
                ynode *k = pl_ynode_scalar(kbuf, 1, src, line, col0 + segcol[i]);
                ynode *fresh = pl_ynode_new(Y_MAP, src, line, col0 + segcol[i]);
                if (!k || !fresh || pl_ynode_push(cur, k, fresh)) {
                    pl_ynode_free(k);
                    pl_ynode_free(fresh);
                    L->oom = 1;
                    goto done;
                }
                at = cur->n - 1;
            }
            /* a model has one source: setting one replaces the others */
            if (i + take == n_seg && parent && !strcmp(parent, "model") &&
                (!strcmp(kbuf, "path") || !strcmp(kbuf, "preset") || !strcmp(kbuf, "config"))) {
                /* a directory has its own weights: no init seed either */
                static const char *const srcs[] = { "path", "preset", "config", "seed" };
                for (int q = 0; q < 4; q++) {
                    int x = pl_map_find(cur, srcs[q]);
                    if (x >= 0 && strcmp(srcs[q], kbuf) && (q < 3 || !strcmp(kbuf, "path"))) {
                        pl_map_remove(cur, x);
                        if (x < at)
                            at--;
                    }
                }
            }
            slot = &cur->vals[at];
        }
        size_t off = strlen(sofar);
        snprintf(sofar + off, sizeof sofar - off, "%s%s", off ? "." : "", kbuf);
        i += take;
        if (i == n_seg) {
            pl_ynode_free(*slot);
            *slot = val;
            val = NULL;
            break;
        }
        if (pl_is_null(*slot)) {
            ynode *fresh = pl_ynode_new(Y_MAP, src, line, col0 + segcol[i]);
            if (!fresh) {
                L->oom = 1;
                goto done;
            }
            pl_ynode_free(*slot);
            *slot = fresh;
        }
        parent = cur->kind == Y_MAP ? cur->keys[slot - cur->vals]->text : parent;
        cur = *slot;
    }
done:
    pl_ynode_free(val);
    free(segcol);
    free(seg);
    free(key);
}

void pl_apply_override(loader *L, ynode **root, const char *text, int ordinal)
{
    const char *eq = strchr(text, '=');
    if (!eq || eq == text) {
        pl_diag_loc(&L->d, pl_set_src, ordinal, 1, "expected KEY=VALUE (e.g. train.steps=10), got '%s'", text);
        return;
    }
    pl_apply_path(L, root, text, (size_t)(eq - text), eq + 1, NULL, pl_set_src, ordinal, 0);
}
