/* peftref core: training checkpoints (layout in trainstate.h). */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "train_state.h"

static const char *const prefixes[3] = {"param.", "adam_m.", "adam_v."};

/* Shape as "[a, b, c]" into buf. */
static const char *shape_str(char *buf, size_t size, int ndim, const int64_t *shape)
{
    size_t k = 0;
    k += (size_t)snprintf(buf + k, size - k, "[");
    for (int d = 0; d < ndim && k < size; d++)
        k += (size_t)snprintf(buf + k, size - k, "%s%lld", d ? ", " : "", (long long)shape[d]);
    if (k < size)
        snprintf(buf + k, size - k, "]");
    return buf;
}

/* Caller-side consistency of the tensor list and moments. */
static int check_params(const char *path, const trainstate_tensor *params, int n_params,
                        const trainstate_moments *mom, pr_error *err)
{
    if (n_params < 0 || (n_params > 0 && !params))
        return pr_errorf(err, PR_ERR_INVALID, "%s: bad tensor list", path);
    size_t total = 0;
    for (int i = 0; i < n_params; i++) {
        const trainstate_tensor *t = &params[i];
        if (!t->name || !t->name[0])
            return pr_errorf(err, PR_ERR_INVALID, "%s: trainable tensor %d has no name", path, i);
        if (t->ndim < 0 || t->ndim > ST_MAX_DIMS)
            return pr_errorf(err, PR_ERR_INVALID, "%s: tensor '%s': %d dimensions", path, t->name,
                             t->ndim);
        size_t numel = 1;
        for (int d = 0; d < t->ndim; d++) {
            if (t->shape[d] < 0 || (t->shape[d] > 0 && numel > SIZE_MAX / (size_t)t->shape[d]))
                return pr_errorf(err, PR_ERR_INVALID, "%s: tensor '%s': bad shape", path, t->name);
            numel *= (size_t)t->shape[d];
        }
        if (numel != t->n)
            return pr_errorf(err, PR_ERR_INVALID,
                             "%s: tensor '%s': %zu elements given for a shape of %zu", path,
                             t->name, t->n, numel);
        if (t->n > 0 && !t->data)
            return pr_errorf(err, PR_ERR_INVALID, "%s: tensor '%s' has no data", path, t->name);
        for (int j = 0; j < i; j++)
            if (strcmp(params[j].name, t->name) == 0)
                return pr_errorf(err, PR_ERR_INVALID, "%s: tensor '%s' given twice", path,
                                 t->name);
        total += t->n;
    }
    if (mom) {
        if (mom->n != total)
            return pr_errorf(err, PR_ERR_INVALID,
                             "%s: optimizer state holds %zu values per moment but the trainable "
                             "tensors hold %zu", path, mom->n, total);
        if (total > 0 && (!mom->m || !mom->v))
            return pr_errorf(err, PR_ERR_INVALID, "%s: optimizer state has no data", path);
        if (mom->t < 0)
            return pr_errorf(err, PR_ERR_INVALID, "%s: optimizer step count is negative", path);
    }
    return PR_OK;
}

static char *prefixed(const char *prefix, const char *name)
{
    size_t a = strlen(prefix), b = strlen(name);
    char *s = malloc(a + b + 1);
    if (s) {
        memcpy(s, prefix, a);
        memcpy(s + a, name, b + 1);
    }
    return s;
}

int trainstate_save(const char *path, const char *fingerprint, const trainstate_tensor *params,
                    int n_params, const trainstate_moments *moments,
                    const trainstate_progress *progress, pr_error *err)
{
    return trainstate_save_extra(path, fingerprint, params, n_params, moments, progress, NULL, 0, err);
}

int trainstate_save_extra(const char *path, const char *fingerprint, const trainstate_tensor *params,
                          int n_params, const trainstate_moments *moments,
                          const trainstate_progress *progress, const st_kv *extra, int n_extra,
                          pr_error *err)
{
    if (!fingerprint || !progress)
        return pr_errorf(err, PR_ERR_INVALID, "%s: checkpoint needs a fingerprint and progress",
                         path);
    if (progress->step < 0 || progress->epoch < 0 || progress->cursor < 0)
        return pr_errorf(err, PR_ERR_INVALID, "%s: negative step or data position", path);
    int rc = check_params(path, params, n_params, moments, err);
    if (rc != PR_OK)
        return rc;

    int kinds = moments ? 3 : 1;
    int n = n_params * kinds;
    st_entry *entries = calloc(n > 0 ? (size_t)n : 1, sizeof *entries);
    if (!entries)
        return pr_errorf(err, PR_ERR_NOMEM, "%s: out of memory", path);
    size_t off = 0;
    for (int i = 0; i < n_params && rc == PR_OK; i++) {
        const trainstate_tensor *t = &params[i];
        const float *src[3] = {t->data, moments ? moments->m + off : NULL,
                               moments ? moments->v + off : NULL};
        for (int k = 0; k < kinds; k++) {
            st_entry *e = &entries[k * n_params + i];
            e->name = prefixed(prefixes[k], t->name);
            if (!e->name) {
                rc = pr_errorf(err, PR_ERR_NOMEM, "%s: out of memory", path);
                break;
            }
            e->ndim = t->ndim;
            memcpy(e->shape, t->shape, sizeof e->shape);
            e->data = src[k];
            e->dtype = ST_F32;
        }
        off += t->n;
    }

    char version[16], step[24], optim_t[24], rng[80], epoch[24], cursor[24], seed[24];
    snprintf(version, sizeof version, "%d", TRAINSTATE_VERSION);
    snprintf(step, sizeof step, "%" PRId64, progress->step);
    snprintf(optim_t, sizeof optim_t, "%" PRId64, moments ? moments->t : 0);
    snprintf(rng, sizeof rng, "%016" PRIx64 " %016" PRIx64 " %016" PRIx64 " %016" PRIx64,
             progress->rng[0], progress->rng[1], progress->rng[2], progress->rng[3]);
    snprintf(epoch, sizeof epoch, "%" PRId64, progress->epoch);
    snprintf(cursor, sizeof cursor, "%" PRId64, progress->cursor);
    snprintf(seed, sizeof seed, "%016" PRIx64, progress->shuffle_seed);
    st_kv meta[] = {
        {"format", TRAINSTATE_FORMAT},
        {"format_version", version},
        {"fingerprint", fingerprint},
        {"step", step},
        {"rng", rng},
        {"data_epoch", epoch},
        {"data_cursor", cursor},
        {"data_shuffle_seed", seed},
        {"optim_t", optim_t}, /* last: left out without moments */
    };
    int n_meta = (int)(sizeof meta / sizeof meta[0]) - (moments ? 0 : 1);
    st_kv *all = calloc((size_t)(n_meta + (n_extra > 0 ? n_extra : 0)), sizeof *all);
    if (!all && rc == PR_OK)
        rc = pr_errorf(err, PR_ERR_NOMEM, "%s: out of memory", path);
    if (all) {
        memcpy(all, meta, (size_t)n_meta * sizeof *all);
        for (int i = 0; i < n_extra; i++)
            all[n_meta + i] = extra[i];
    }

    if (rc == PR_OK)
        rc = st_write(path, entries, n, all, n_meta + (n_extra > 0 ? n_extra : 0), err);
    free(all);
    for (int i = 0; i < n; i++)
        free((char *)entries[i].name);
    free(entries);
    return rc;
}

/* ---- loading -------------------------------------------------------------- */

static int meta_get(const st_file *f, const char *key, const char **value, pr_error *err)
{
    *value = st_metadata(f, key);
    if (!*value)
        return pr_errorf(err, PR_ERR_FORMAT, "%s: checkpoint metadata lacks '%s'", st_path(f),
                         key);
    return PR_OK;
}

/* A non-negative decimal integer that fills the whole string. */
static int meta_int(const st_file *f, const char *key, int64_t *out, pr_error *err)
{
    const char *s;
    int rc = meta_get(f, key, &s, err);
    if (rc != PR_OK)
        return rc;
    char *end;
    errno = 0;
    long long v = (s[0] >= '0' && s[0] <= '9') ? strtoll(s, &end, 10) : -1;
    if (v < 0 || errno != 0 || *end != '\0')
        return pr_errorf(err, PR_ERR_FORMAT,
                         "%s: checkpoint metadata '%s' = '%s' is not a non-negative integer",
                         st_path(f), key, s);
    *out = (int64_t)v;
    return PR_OK;
}

/* Exactly 16 hex digits at s; returns the character after them or NULL. */
static const char *hex64(const char *s, uint64_t *out)
{
    uint64_t v = 0;
    for (int i = 0; i < 16; i++) {
        char c = s[i];
        int d;
        if (c >= '0' && c <= '9')
            d = c - '0';
        else if (c >= 'a' && c <= 'f')
            d = c - 'a' + 10;
        else if (c >= 'A' && c <= 'F')
            d = c - 'A' + 10;
        else
            return NULL;
        v = (v << 4) | (uint64_t)d;
    }
    *out = v;
    return s + 16;
}

/* n words of 16 hex digits separated by single spaces. */
static int meta_hex(const st_file *f, const char *key, uint64_t *out, int n, pr_error *err)
{
    const char *s;
    int rc = meta_get(f, key, &s, err);
    if (rc != PR_OK)
        return rc;
    const char *p = s;
    for (int i = 0; i < n && p; i++) {
        if (i > 0)
            p = *p == ' ' ? p + 1 : NULL;
        if (p)
            p = hex64(p, &out[i]);
    }
    if (!p || *p != '\0')
        return pr_errorf(err, PR_ERR_FORMAT,
                         "%s: checkpoint metadata '%s' = '%s' is not %d word%s of 16 hex digits",
                         st_path(f), key, s, n, n == 1 ? "" : "s");
    return PR_OK;
}

/* Index k*n_params + i of the expected tensor a file tensor name denotes,
 * or -1. */
static int expected_index(const char *name, const trainstate_tensor *params, int n_params,
                          int kinds)
{
    for (int k = 0; k < kinds; k++) {
        size_t pl = strlen(prefixes[k]);
        if (strncmp(name, prefixes[k], pl) != 0)
            continue;
        for (int i = 0; i < n_params; i++)
            if (strcmp(name + pl, params[i].name) == 0)
                return k * n_params + i;
    }
    return -1;
}

/* Everything about f the load needs, checked before any buffer is written. */
static int validate(const st_file *f, const char *fingerprint, const trainstate_tensor *params,
                    int n_params, int kinds, const st_tensor **found, trainstate_progress *prog,
                    int64_t *optim_t, pr_error *err)
{
    const char *path = st_path(f);
    const char *s = st_metadata(f, "format");
    if (!s || strcmp(s, TRAINSTATE_FORMAT) != 0)
        return pr_errorf(err, PR_ERR_FORMAT, "%s: not a peftref training checkpoint "
                         "(metadata 'format' is %s%s%s, expected '%s')", path, s ? "'" : "",
                         s ? s : "absent", s ? "'" : "", TRAINSTATE_FORMAT);
    int64_t version;
    int rc = meta_int(f, "format_version", &version, err);
    if (rc != PR_OK)
        return rc;
    if (version != TRAINSTATE_VERSION)
        return pr_errorf(err, PR_ERR_UNSUPPORTED,
                         "%s: checkpoint format version %lld; this peftref reads version %d",
                         path, (long long)version, TRAINSTATE_VERSION);
    if ((rc = meta_get(f, "fingerprint", &s, err)) != PR_OK)
        return rc;
    if (strcmp(s, fingerprint) != 0)
        return pr_errorf(err, PR_ERR_INVALID,
                         "%s: checkpoint fingerprint '%s' does not match this run's '%s': it "
                         "was written under a different configuration", path, s, fingerprint);
    if ((rc = meta_int(f, "step", &prog->step, err)) != PR_OK ||
        (rc = meta_hex(f, "rng", prog->rng, 4, err)) != PR_OK ||
        (rc = meta_int(f, "data_epoch", &prog->epoch, err)) != PR_OK ||
        (rc = meta_int(f, "data_cursor", &prog->cursor, err)) != PR_OK ||
        (rc = meta_hex(f, "data_shuffle_seed", &prog->shuffle_seed, 1, err)) != PR_OK)
        return rc;
    if (kinds == 3 && (rc = meta_int(f, "optim_t", optim_t, err)) != PR_OK)
        return rc;

    char a[160], b[160];
    for (int k = 0; k < kinds; k++)
        for (int i = 0; i < n_params; i++) {
            const trainstate_tensor *t = &params[i];
            char *name = prefixed(prefixes[k], t->name);
            if (!name)
                return pr_errorf(err, PR_ERR_NOMEM, "%s: out of memory", path);
            const st_tensor *st = st_find(f, name);
            if (!st)
                rc = pr_errorf(err, PR_ERR_NOTFOUND, "%s: tensor '%s' is missing from the "
                               "checkpoint", path, name);
            else if (st->dtype != ST_F32)
                rc = pr_errorf(err, PR_ERR_FORMAT, "%s: tensor '%s' is %s, expected F32", path,
                               name, st->dtype_name);
            else if (st->ndim != t->ndim ||
                     memcmp(st->shape, t->shape, (size_t)t->ndim * sizeof t->shape[0]) != 0)
                rc = pr_errorf(err, PR_ERR_INVALID,
                               "%s: tensor '%s' has shape %s in the checkpoint but %s here",
                               path, name, shape_str(a, sizeof a, st->ndim, st->shape),
                               shape_str(b, sizeof b, t->ndim, t->shape));
            free(name);
            if (rc != PR_OK)
                return rc;
            found[k * n_params + i] = st;
        }
    /* Every expected name was found once, so any further tensor is extra. */
    int n_file = st_count(f);
    if (n_file != kinds * n_params) {
        for (int j = 0; j < n_file; j++) {
            const st_tensor *st = st_tensor_at(f, j);
            if (expected_index(st->name, params, n_params, kinds) < 0)
                return pr_errorf(err, PR_ERR_INVALID,
                                 "%s: tensor '%s' in the checkpoint is not a trainable tensor "
                                 "of this run (%d unexpected tensor%s)", path, st->name,
                                 n_file - kinds * n_params,
                                 n_file - kinds * n_params == 1 ? "" : "s");
        }
    }
    return PR_OK;
}

int trainstate_load(const char *path, const char *fingerprint, const trainstate_tensor *params,
                    int n_params, trainstate_moments *moments, trainstate_progress *progress,
                    pr_error *err)
{
    if (!fingerprint || !progress)
        return pr_errorf(err, PR_ERR_INVALID, "%s: loading needs a fingerprint and progress",
                         path);
    int rc = check_params(path, params, n_params, moments, err);
    if (rc != PR_OK)
        return rc;
    int kinds = moments ? 3 : 1;
    const st_tensor **found = calloc(n_params > 0 ? (size_t)(kinds * n_params) : 1,
                                     sizeof *found);
    if (!found)
        return pr_errorf(err, PR_ERR_NOMEM, "%s: out of memory", path);
    st_file *f = NULL;
    rc = st_open(path, 0, &f, err);
    trainstate_progress prog;
    int64_t optim_t = 0;
    if (rc == PR_OK)
        rc = validate(f, fingerprint, params, n_params, kinds, found, &prog, &optim_t, err);
    size_t off = 0;
    for (int i = 0; i < n_params && rc == PR_OK; i++) {
        float *dst[3] = {params[i].data, moments ? moments->m + off : NULL,
                         moments ? moments->v + off : NULL};
        for (int k = 0; k < kinds && rc == PR_OK; k++)
            rc = st_to_f32(f, found[k * n_params + i], dst[k], err);
        off += params[i].n;
    }
    if (rc == PR_OK) {
        *progress = prog;
        if (moments)
            moments->t = optim_t;
    }
    st_close(f);
    free(found);
    return rc;
}

int trainstate_read_meta(const char *path, const char *const *keys, char **values, int n, pr_error *err)
{
    for (int i = 0; i < n; i++)
        values[i] = NULL;
    st_file *f = NULL;
    int rc = st_open(path, 0, &f, err);
    if (rc != PR_OK)
        return rc;
    const char *s = st_metadata(f, "format");
    if (!s || strcmp(s, TRAINSTATE_FORMAT) != 0)
        rc = pr_errorf(err, PR_ERR_FORMAT, "%s: not a peftref training checkpoint", path);
    for (int i = 0; i < n && rc == PR_OK; i++) {
        const char *v = st_metadata(f, keys[i]);
        if (v && !(values[i] = strdup(v)))
            rc = pr_errorf(err, PR_ERR_NOMEM, "%s: out of memory", path);
    }
    st_close(f);
    if (rc != PR_OK)
        for (int i = 0; i < n; i++) {
            free(values[i]);
            values[i] = NULL;
        }
    return rc;
}
