/* peftref core: a run's fingerprint (see run_fingerprint.h). */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "peftref/module.h"
#include "peftref/plugin.h"
#include "module_file.h"
#include "run_fingerprint.h"

void run_fp_init(run_fp *f)
{
    memset(f, 0, sizeof *f);
}

void run_fp_free(run_fp *f)
{
    for (int i = 0; i < f->n; i++) {
        free(f->key[i]);
        free(f->val[i]);
    }
    free(f->key);
    free(f->val);
    memset(f, 0, sizeof *f);
}

const char *run_fp_get(const run_fp *f, const char *key)
{
    for (int i = 0; i < f->n; i++)
        if (strcmp(f->key[i], key) == 0)
            return f->val[i];
    return NULL;
}

static int put(run_fp *f, const char *key, char *val)
{
    for (int i = 0; i < f->n; i++)
        if (strcmp(f->key[i], key) == 0) {
            free(f->val[i]);
            f->val[i] = val;
            return PR_OK;
        }
    if (f->n == f->cap) {
        int cap = f->cap ? 2 * f->cap : 32;
        char **k = realloc(f->key, (size_t)cap * sizeof *k);
        if (k)
            f->key = k;
        char **v = k ? realloc(f->val, (size_t)cap * sizeof *v) : NULL;
        if (!v) {
            free(val);
            return PR_ERR_NOMEM;
        }
        f->val = v;
        f->cap = cap;
    }
    f->key[f->n] = strdup(key);
    if (!f->key[f->n]) {
        free(val);
        return PR_ERR_NOMEM;
    }
    f->val[f->n++] = val;
    return PR_OK;
}

int run_fp_set(run_fp *f, const char *key, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    char *val = NULL;
    int n = vasprintf(&val, fmt, ap);
    va_end(ap);
    if (n < 0)
        return PR_ERR_NOMEM;
    return put(f, key, val);
}

/* 64-bit FNV-1a, continued from h. */
static uint64_t fnv1a(uint64_t h, const unsigned char *p, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        h ^= p[i];
        h *= 0x100000001b3ull;
    }
    return h;
}

#define FNV_BASIS 0xcbf29ce484222325ull

int run_fp_add_file(run_fp *f, const char *key, const char *path, pr_error *err)
{
    if (!path)
        return run_fp_set(f, key, "none") ? pr_errorf(err, PR_ERR_NOMEM, "out of memory") : PR_OK;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return pr_errorf(err, errno == ENOENT ? PR_ERR_NOTFOUND : PR_ERR_IO, "%s: cannot open: %s", path,
                         strerror(errno));
    unsigned char buf[1 << 16];
    uint64_t h = FNV_BASIS, size = 0;
    for (;;) {
        ssize_t r = read(fd, buf, sizeof buf);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0) {
            int e = errno;
            close(fd);
            return pr_errorf(err, PR_ERR_IO, "%s: read failed: %s", path, strerror(e));
        }
        if (r == 0)
            break;
        h = fnv1a(h, buf, (size_t)r);
        size += (uint64_t)r;
    }
    close(fd);
    if (run_fp_set(f, key, "size=%llu fnv1a64=%016llx", (unsigned long long)size, (unsigned long long)h))
        return pr_errorf(err, PR_ERR_NOMEM, "out of memory");
    return PR_OK;
}

static const char *layers_text(const pr_module *mod, char *buf, size_t len)
{
    int n = 0;
    const int *ls = pr_module_layers(mod, &n);
    size_t k = 0;
    buf[0] = '\0';
    if (!ls)
        return "all";
    for (int i = 0; i < n && k < len; i++)
        k += (size_t)snprintf(buf + k, len - k, "%s%d", i ? "," : "", ls[i]);
    return n ? buf : "all";
}

static const char *sites_text(const pr_module *mod, char *buf, size_t len)
{
    size_t k = 0;
    buf[0] = '\0';
    for (int s = 0; s < PR_SITE_COUNT && k < len; s++)
        if (pr_module_sites(mod) & PR_SITE_BIT(s))
            k += (size_t)snprintf(buf + k, len - k, "%s%s", k ? "," : "", pr_site_name(s));
    return buf;
}

/* The shortest %g form of a float that reads back as the same float. */
static const char *flt(char *buf, size_t len, float v)
{
    for (int prec = 1; prec <= 9; prec++) {
        snprintf(buf, len, "%.*g", prec, (double)v);
        /* 10 rather than 1e+01 */
        if ((float)strtod(buf, NULL) == v && !(strstr(buf, "e+") && v < 1e9f && v > -1e9f))
            break;
    }
    return buf;
}

int run_fp_of_run(run_fp *f, const pr_model *m, const pr_train_config *c, pr_error *err)
{
    int rc = 0;
    rc |= run_fp_set(f, "task", "%s", c->task ? c->task : "lm");
    rc |= run_fp_set(f, "data.format", "%s", c->format ? c->format : "auto");
    rc |= run_fp_set(f, "data.val_fraction", "%.9g", c->val_path ? 0.0 : c->val_fraction);
    if (rc)
        return pr_errorf(err, PR_ERR_NOMEM, "out of memory");
    if ((rc = run_fp_add_file(f, "data.train", c->train_path, err)) ||
        (rc = run_fp_add_file(f, "data.validation", c->val_path, err)))
        return rc;
    const pr_model_config *mc = pr_model_get_config(m);
    char fp[64], b[32];
    pr_model_fingerprint(m, fp, sizeof fp);
    rc |= run_fp_set(f, "model.shape", "layers=%d d_model=%d heads=%d kv_heads=%d d_head=%d d_ff=%d vocab=%d "
                     "max_seq=%d", mc->n_layers, mc->d_model, mc->n_heads, mc->n_kv_heads, mc->d_head, mc->d_ff,
                     mc->vocab_size, mc->max_seq);
    rc |= run_fp_set(f, "model.fingerprint", "%s", fp);
    rc |= run_fp_set(f, "train.steps", "%d", c->steps);
    rc |= run_fp_set(f, "train.batch", "%d", c->batch);
    rc |= run_fp_set(f, "train.seq_len", "%d", c->seq_len);
    rc |= run_fp_set(f, "train.accum", "%d", c->accum);
    rc |= run_fp_set(f, "train.lr", "%s", flt(b, sizeof b, c->lr));
    rc |= run_fp_set(f, "train.min_lr_ratio", "%s", flt(b, sizeof b, c->min_lr_ratio));
    rc |= run_fp_set(f, "train.warmup", "%d", c->warmup);
    rc |= run_fp_set(f, "train.schedule", "%s", c->schedule ? c->schedule : "cosine");
    rc |= run_fp_set(f, "train.weight_decay", "%s", flt(b, sizeof b, c->weight_decay));
    rc |= run_fp_set(f, "train.decay_all", "%s", c->decay_all ? "true" : "false");
    rc |= run_fp_set(f, "train.clip", "%s", flt(b, sizeof b, c->clip));
    rc |= run_fp_set(f, "train.beta1", "%s", flt(b, sizeof b, c->beta1));
    rc |= run_fp_set(f, "train.beta2", "%s", flt(b, sizeof b, c->beta2));
    rc |= run_fp_set(f, "train.eps", "%s", flt(b, sizeof b, c->eps));
    rc |= run_fp_set(f, "train.head_lr_mult", "%s", flt(b, sizeof b, c->head_lr_mult));
    rc |= run_fp_set(f, "train.seed", "%llu", (unsigned long long)c->seed);
    /* set only when on, so the checkpoints of runs without them still match */
    if (c->keep_best)
        rc |= run_fp_set(f, "train.keep_best", "%s", c->keep_best);
    if (c->precision != PR_PRECISION_F32)
        rc |= run_fp_set(f, "train.precision", "%s", pr_precision_name(c->precision));
    if (c->early_stop_patience > 0)
        rc |= run_fp_set(f, "train.early_stop", "patience=%d min_delta=%.9g metric=%s", c->early_stop_patience,
                         c->early_stop_min_delta, c->early_stop_metric ? c->early_stop_metric : "val_loss");
    /* the trainable base tensors (modules' own tensors come with the modules) */
    uint64_t h = FNV_BASIS;
    int n_tr = 0;
    for (int i = 0; i < pr_model_n_tensors(m); i++) {
        const pr_tensor_info *ti = pr_model_tensor(m, i);
        if (!ti->trainable || ti->kind == PR_TENSOR_MODULE)
            continue;
        h = fnv1a(h, (const unsigned char *)ti->name, strlen(ti->name) + 1);
        n_tr++;
    }
    rc |= run_fp_set(f, "trainable", "%d base tensors, names fnv1a64=%016llx", n_tr, (unsigned long long)h);
    for (int i = 0; i < pr_model_n_modules(m) && !rc; i++) {
        pr_module *mod = pr_model_module(m, i);
        const pr_technique *t = pr_module_technique(mod);
        char key[300], sites[512], layers[512];
        snprintf(key, sizeof key, "module.%s", pr_module_name(mod));
        char *opts = mf_module_options_json(mod);
        if (!opts)
            return pr_errorf(err, PR_ERR_NOMEM, "out of memory");
        rc |= run_fp_set(f, key, "%s@%s trainable=%d sites=%s layers=%s seed=%016llx options=%s",
                         t && t->name ? t->name : "?", t && t->version ? t->version : "0",
                         pr_module_is_trainable(mod), sites_text(mod, sites, sizeof sites),
                         layers_text(mod, layers, sizeof layers), (unsigned long long)pr_module_seed(mod), opts);
        free(opts);
    }
    return rc ? pr_errorf(err, PR_ERR_NOMEM, "out of memory") : PR_OK;
}

char *run_fp_json(const run_fp *f)
{
    json_t *o = json_object();
    if (!o)
        return NULL;
    for (int i = 0; i < f->n; i++)
        json_object_set_new(o, f->key[i], json_string(f->val[i]));
    char *s = json_dumps(o, JSON_COMPACT | JSON_PRESERVE_ORDER);
    json_decref(o);
    return s;
}

int run_fp_parse(const char *text, run_fp *f, pr_error *err)
{
    run_fp_init(f);
    json_error_t je;
    json_t *o = text ? json_loads(text, 0, &je) : NULL;
    if (!json_is_object(o)) {
        json_decref(o);
        return pr_errorf(err, PR_ERR_FORMAT, "not a run fingerprint (a JSON object of settings)");
    }
    const char *k;
    json_t *v;
    int rc = PR_OK;
    json_object_foreach(o, k, v) {
        if (!json_is_string(v)) {
            rc = pr_errorf(err, PR_ERR_FORMAT, "run fingerprint: setting '%s' is not a string", k);
            break;
        }
        if (run_fp_set(f, k, "%s", json_string_value(v))) {
            rc = pr_errorf(err, PR_ERR_NOMEM, "out of memory");
            break;
        }
    }
    json_decref(o);
    if (rc)
        run_fp_free(f);
    return rc;
}

static void note(json_t *changes, char *msg, size_t len, size_t *k, const char *key, const char *a,
                 const char *b)
{
    if (*k < len)
        *k += (size_t)snprintf(msg + *k, len - *k, "%s%s %s -> %s", *k ? ", " : "", key, a, b);
    if (changes) {
        json_t *c = json_object();
        json_object_set_new(c, "old", json_string(a));
        json_object_set_new(c, "new", json_string(b));
        json_object_set_new(changes, key, c);
    }
}

int run_fp_diff(const run_fp *old, const run_fp *now, char *msg, size_t len, char **json)
{
    json_t *changes = json ? json_object() : NULL;
    size_t k = 0;
    int n = 0;
    if (len)
        msg[0] = '\0';
    for (int i = 0; i < now->n; i++) {
        const char *a = run_fp_get(old, now->key[i]);
        if (!a || strcmp(a, now->val[i]) != 0) {
            note(changes, msg, len, &k, now->key[i], a ? a : "(none)", now->val[i]);
            n++;
        }
    }
    for (int i = 0; i < old->n; i++)
        if (!run_fp_get(now, old->key[i])) {
            note(changes, msg, len, &k, old->key[i], old->val[i], "(none)");
            n++;
        }
    if (json) {
        *json = changes ? json_dumps(changes, JSON_COMPACT | JSON_PRESERVE_ORDER) : NULL;
        json_decref(changes);
    }
    return n;
}
