/* peftref core: the services a technique's PEFT read() gets
 * (pr_peft_reader, include/peftref/ext/peft_config.h), over the reader of
 * peft_adapter.c.  Everything here is PEFT's format, shared by every type;
 * what a type's fields mean is the technique's. */
#include "config.h"

#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "module_file.h"
#include "peft_adapter.h"
#include "peft_adapter_internal.h"

static const pr_peft_model *h_model(pr_peft_in *R)
{
    return &R->pm;
}

static const char *h_technique(pr_peft_in *R)
{
    return R->tech;
}

static const char *h_type(pr_peft_in *R)
{
    return R->type;
}

static const char *h_where(pr_peft_in *R, int file)
{
    if (file == PR_PEFT_CONFIG_FILE || file == PR_PEFT_WEIGHTS_FILE) {
        snprintf(R->where[file], sizeof R->where[file], "%s/%s", R->dir,
                 file == PR_PEFT_CONFIG_FILE ? CONFIG_NAME : WEIGHTS_NAME);
        return R->where[file];
    }
    return R->dir;
}

static const char *h_module_name(pr_peft_in *R)
{
    return pa_module_name_of(R);
}

static const char *h_site_path(pr_peft_in *R, int site)
{
    return site >= 0 && site < PR_SITE_COUNT ? peft_site_path(R->c, site) : NULL;
}

static const char *h_blocks_path(pr_peft_in *R)
{
    return peft_blocks_path(R->c);
}

static int h_fail(pr_peft_in *R, int code, const char *fmt, ...)
{
    char msg[PR_ERROR_MSG_MAX];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    return pr_errorf(R->err, code ? (pr_status)code : PR_ERR_INVALID, "%s", msg);
}

static int h_bad_value(pr_peft_in *R, const char *field, const char *why)
{
    return pa_bad_value(R, field, pa_get(R, field), why);
}

static int h_check_fields(pr_peft_in *R, const pr_peft_field *own, uint32_t n_own)
{
    return pa_check_fields(R, own, (int)n_own);
}

static int h_value(pr_peft_in *R, const char *field, const char *key, long index, pr_peft_value *out)
{
    memset(out, 0, sizeof *out);
    const json_t *v = pa_get(R, field);
    if (v && key)
        v = json_is_object(v) ? json_object_get(v, key) : NULL;
    if (v && index >= 0)
        v = json_is_array(v) ? json_array_get(v, (size_t)index) : NULL;
    if (!v || json_is_null(v))
        out->kind = PR_PEFT_ABSENT;
    else if (json_is_boolean(v))
        out->kind = PR_PEFT_BOOL, out->i = json_is_true(v);
    else if (json_is_integer(v))
        out->kind = PR_PEFT_INT, out->i = json_integer_value(v), out->num = (double)json_integer_value(v);
    else if (json_is_real(v))
        out->kind = PR_PEFT_REAL, out->num = json_real_value(v);
    else if (json_is_string(v))
        out->kind = PR_PEFT_STRING, out->str = json_string_value(v);
    else if (json_is_array(v))
        out->kind = PR_PEFT_ARRAY, out->len = json_array_size(v);
    else
        out->kind = PR_PEFT_OBJECT, out->len = json_object_size(v);
    return PR_OK;
}

static int h_get_int(pr_peft_in *R, const char *field, int required, long long min, long long *out)
{
    return pa_get_int(R, field, required, min, out);
}

static int h_get_num(pr_peft_in *R, const char *field, double def, double min, double *out)
{
    return pa_get_num(R, field, def, min, out);
}

static int h_get_bool(pr_peft_in *R, const char *field, int def, int *out)
{
    return pa_get_bool(R, field, def, out);
}

static int h_check_fan_in_fan_out(pr_peft_in *R)
{
    return pa_check_fan_in_fan_out(R);
}

/* field absent: 0; not a list of names or one expression: -1 */
static int h_names_match(pr_peft_in *R, const char *field, const char *module)
{
    const json_t *v = pa_get(R, field);
    if (!v)
        return 0;
    if (pa_check_name_list(R, field, v, 0))
        return -1;
    return pa_names_match(R, field, v, module);
}

static int h_match_targets(pr_peft_in *R, pr_peft_site_of_fn site_of, const pr_peft_pattern *pats, uint32_t n)
{
    return pa_match_targets(R, site_of, pats, (int)n);
}

static int h_set_sites(pr_peft_in *R, uint32_t sites)
{
    R->f->sites = sites;
    R->f->all_layers = 1;
    return PR_OK;
}

static uint32_t h_sites(pr_peft_in *R)
{
    return R->f->sites;
}

static const int *h_layers(pr_peft_in *R, int *n)
{
    *n = R->f->all_layers ? R->c->n_layers : R->f->n_layers;
    return R->f->all_layers ? NULL : R->f->layers;
}

static int h_set_option(pr_peft_in *R, const char *name, const char *value, int site)
{
    return pa_push_opt(R, name, value, site);
}

static int h_set_num(pr_peft_in *R, const char *name, double value, int site)
{
    return pa_push_num(R, name, value, site);
}

static int h_n_tensors(pr_peft_in *R)
{
    return st_count(R->f->st);
}

static int h_tensor(pr_peft_in *R, int i, pr_peft_tensor *out)
{
    memset(out, 0, sizeof *out);
    if (i < 0 || i >= st_count(R->f->st))
        return pr_errorf(R->err, PR_ERR_INVALID, "%s: no tensor %d", R->dir, i);
    const st_tensor *t = st_tensor_at(R->f->st, i);
    out->name = t->name;
    out->ndim = (uint32_t)t->ndim;
    for (int d = 0; d < t->ndim && d < 4; d++)
        out->shape[d] = t->shape[d];
    return PR_OK;
}

static int h_find_tensor(pr_peft_in *R, const char *name)
{
    const st_tensor *t = name ? st_find(R->f->st, name) : NULL;
    return t ? (int)(t - st_tensor_at(R->f->st, 0)) : -1;
}

static int h_tensor_data(pr_peft_in *R, int i, pr_peft_tensor *out)
{
    int rc = h_tensor(R, i, out);
    if (rc)
        return rc;
    const st_tensor *t = st_tensor_at(R->f->st, i);
    float **b = realloc(R->bufs, (size_t)(R->n_bufs + 1) * sizeof *b);
    float *v = b ? malloc((size_t)(t->numel ? t->numel : 1) * sizeof *v) : NULL;
    if (b)
        R->bufs = b;
    if (!v)
        return pr_errorf(R->err, PR_ERR_NOMEM, "%s: out of memory", R->dir);
    R->bufs[R->n_bufs++] = v;
    if ((rc = st_to_f32(R->f->st, t, v, R->err)))
        return rc;
    out->data = v;
    return PR_OK;
}

static int h_check_tensors(pr_peft_in *R)
{
    return pa_check_tensors(R);
}

static int h_replace_tensors(pr_peft_in *R, const pr_peft_tensor *t, uint32_t n)
{
    return pa_replace_tensors(R, t, n);
}

static int h_declares(pr_peft_in *R, const char *name, int scope)
{
    const pr_technique *t = R->f->t;
    for (uint32_t i = 0; i < t->n_params; i++) {
        pr_param_decl d;
        mf_read_decl(&d, sizeof d, t->params, i);
        if (d.name && !strcmp(d.name, name) && (int)d.scope == scope)
            return 1;
    }
    return 0;
}

static const char *h_site_name(pr_peft_in *R, int site)
{
    (void)R;
    return pr_site_name(site);
}

/* The file's tensors replaced by t (named as module files name them),
 * through a temporary file unlinked once mapped. */
int pa_replace_tensors(reader *R, const pr_peft_tensor *t, uint32_t n)
{
    st_entry *e = calloc(n ? n : 1, sizeof *e);
    if (!e)
        return pr_errorf(R->err, PR_ERR_NOMEM, "%s: out of memory", R->dir);
    for (uint32_t i = 0; i < n; i++) {
        e[i] = (st_entry){ .name = t[i].name, .ndim = (int)t[i].ndim, .data = t[i].data, .dtype = ST_F32 };
        for (uint32_t d = 0; d < t[i].ndim && d < 4; d++)
            e[i].shape[d] = t[i].shape[d];
    }
    char tpl[4096];
    const char *td = getenv("TMPDIR");
    snprintf(tpl, sizeof tpl, "%s/peftref-adapter-XXXXXX", td && *td ? td : "/tmp");
    int fd = mkstemp(tpl), rc;
    st_file *nst = NULL;
    if (fd < 0) {
        rc = pr_errorf(R->err, PR_ERR_IO, "%s: cannot create a temporary file %s: %s", R->dir, tpl, strerror(errno));
    } else {
        close(fd);
        st_kv meta[] = { { "tensor_names", "peftref" } };
        rc = st_write(tpl, e, (int)n, meta, 1, R->err);
        if (!rc)
            rc = st_open(tpl, 0, &nst, R->err);
        unlink(tpl);
    }
    free(e);
    if (!rc) {
        st_close(R->f->st);
        R->f->st = nst;
        R->replaced = 1;
    }
    return rc;
}

const pr_peft_reader pa_host = {
    .struct_size = sizeof(pr_peft_reader),
    .model = h_model,
    .technique = h_technique,
    .type = h_type,
    .where = h_where,
    .module_name = h_module_name,
    .site_path = h_site_path,
    .blocks_path = h_blocks_path,
    .fail = h_fail,
    .bad_value = h_bad_value,
    .check_fields = h_check_fields,
    .value = h_value,
    .get_int = h_get_int,
    .get_num = h_get_num,
    .get_bool = h_get_bool,
    .check_fan_in_fan_out = h_check_fan_in_fan_out,
    .names_match = h_names_match,
    .match_targets = h_match_targets,
    .set_sites = h_set_sites,
    .sites = h_sites,
    .layers = h_layers,
    .set_option = h_set_option,
    .set_num = h_set_num,
    .n_tensors = h_n_tensors,
    .tensor = h_tensor,
    .find_tensor = h_find_tensor,
    .tensor_data = h_tensor_data,
    .check_tensors = h_check_tensors,
    .replace_tensors = h_replace_tensors,
    .declares = h_declares,
    .site_name = h_site_name,
};
