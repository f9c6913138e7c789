/* peftref core: checking saved modules are compatible and filling a module
 * with their weighted average. */
#include "config.h"

#include <jansson.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "module_file.h"

static void json_diff(const char *a, const char *b, char *buf, size_t len)
{
    json_error_t je;
    json_t *x = json_loads(a ? a : "null", JSON_DECODE_ANY, &je), *y = json_loads(b ? b : "null", JSON_DECODE_ANY, &je);
    buf[0] = '\0';
    if (json_is_object(x) && json_is_object(y)) {
        const char *k;
        json_t *v;
        json_object_foreach(x, k, v) {
            json_t *w = json_object_get(y, k);
            if (!w || !json_equal(v, w)) {
                char *sv = json_dumps(v, JSON_ENCODE_ANY | JSON_COMPACT | JSON_SORT_KEYS);
                char *sw = w ? json_dumps(w, JSON_ENCODE_ANY | JSON_COMPACT | JSON_SORT_KEYS) : NULL;
                snprintf(buf, len, "'%s' is %s in one and %s in the other", k, sv ? sv : "?", sw ? sw : "absent");
                free(sv);
                free(sw);
                break;
            }
        }
        json_object_foreach(y, k, v) {
            if (!buf[0] && !json_object_get(x, k))
                snprintf(buf, len, "'%s' is absent in one", k);
        }
    }
    if (!buf[0])
        snprintf(buf, len, "%s vs %s", a ? a : "(none)", b ? b : "(none)");
    json_decref(x);
    json_decref(y);
}

/* name past "MODULE/", or name itself when it does not start so. */
static const char *after_module_name(const char *name, const char *module)
{
    size_t n = strlen(module);
    return strncmp(name, module, n) == 0 && name[n] == '/' ? name + n + 1 : name;
}

int pr_module_files_compatible(pr_module_file *const *f, int n, pr_error *err)
{
    static const char *const keys[] = { "technique", "options", "site_options", "sites", "layers", "tensor_names",
                                        "gated" };
    for (int k = 1; k < n; k++) {
        for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++) {
            const char *a = st_metadata(f[0]->st, keys[i]), *b = st_metadata(f[k]->st, keys[i]);
            if ((a == NULL) != (b == NULL) || (a && strcmp(a, b))) {
                char d[400];
                json_diff(a, b, d, sizeof d);
                return pr_errorf(err, PR_ERR_INVALID, "average: %s and %s differ in %s: %s", f[0]->path, f[k]->path,
                                 keys[i], d);
            }
        }
        if (st_count(f[0]->st) != st_count(f[k]->st))
            return pr_errorf(err, PR_ERR_INVALID, "average: %s holds %d tensors and %s %d", f[0]->path,
                             st_count(f[0]->st), f[k]->path, st_count(f[k]->st));
        for (int i = 0; i < st_count(f[0]->st); i++) {
            const st_tensor *a = st_tensor_at(f[0]->st, i), *b = st_tensor_at(f[k]->st, i);
            const char *an = a->name, *bn = b->name;
            /* host names carry the saved module name; compare what follows it
             * (a file may not hold to that: then the whole name is compared) */
            if (!f[0]->peft) {
                an = after_module_name(an, f[0]->saved_name);
                bn = after_module_name(bn, f[k]->saved_name);
            }
            int same = !strcmp(an, bn) && a->ndim == b->ndim;
            for (int d = 0; same && d < a->ndim; d++)
                same = a->shape[d] == b->shape[d];
            if (!same) {
                char sa[64], sb[64];
                mf_shape_text(a->ndim, a->shape, sa, sizeof sa);
                mf_shape_text(b->ndim, b->shape, sb, sizeof sb);
                return pr_errorf(err, PR_ERR_INVALID, "average: %s and %s differ in tensors: '%s' %s vs '%s' %s",
                                 f[0]->path, f[k]->path, a->name, sa, b->name, sb);
            }
        }
    }
    return PR_OK;
}

int pr_module_files_fill_average(pr_module_file *const *f, const double *weights, int n, pr_module *mod,
                                 pr_error *err)
{
    if (n < 1)
        return pr_errorf(err, PR_ERR_INVALID, "average: no files");
    int rc = pr_module_files_compatible(f, n, err);
    if (rc)
        return rc;
    if (n == 1)
        return pr_module_file_fill(f[0], mod, err);
    /* tensors are looked up by f[0]'s names: host names differ only in the
     * module-name prefix, so other files are read through their own */
    if (!f[0]->peft) {
        for (int k = 1; k < n; k++)
            if (strcmp(f[k]->saved_name, f[0]->saved_name))
                return pr_errorf(err, PR_ERR_INVALID, "average: %s saved module '%s' and %s module '%s'; modules "
                                 "with host tensor names average only under one name", f[0]->path, f[0]->saved_name,
                                 f[k]->path, f[k]->saved_name);
    }
    source s = { f, weights, n };
    return mf_fill_from(&s, mod, err);
}
