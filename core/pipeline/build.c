/* peftref pipelines: a loaded pipeline's parameter counts and the model
 * it builds.
 *
 * counts: base + modules (+ a classification head, d_model * classes +
 * classes, its classes read from the training data); trainable counts
 * the modules' trainable tensors, selected base tensors and the head.
 * build: the base model, its tokenizer, then each module attached in
 * order (saved ones checked against the base's fingerprint and filled). */
#include "config.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "data.h"
#include "pipeline_internal.h"

/* ---- counts ------------------------------------------------------------------------------------------ */

static int open_tokenizer(const pr_pipeline *p, pr_tokenizer **tok, pr_error *err)
{
    if (p->tok_dir)
        return pr_tokenizer_load(p->tok_dir, tok, err);
    if (p->cfg.vocab_size == 256)
        return pr_tokenizer_byte(tok, err);
    return pr_errorf(err, PR_ERR_INVALID,
                     "%s: model: a vocabulary of %d needs model.tokenizer (a directory with tokenizer.json, or "
                     "vocab.json and merges.txt); only a 256-entry vocabulary uses the byte tokenizer", p->model_where,
                     p->cfg.vocab_size);
}

int pr_pipeline_counts_get(const pr_pipeline *p, pr_pipeline_counts *out, pr_error *err)
{
    if (!p || !out)
        return pr_errorf(err, PR_ERR_INVALID, "pipeline: NULL pipeline or output");
    memset(out, 0, sizeof *out);
    out->base = pr_config_param_count(&p->cfg);
    int64_t trainable = 0;
    for (int i = 0; i < p->n_mods; i++) {
        out->modules += p->mods[i].plan.params;
        trainable += p->mods[i].plan.trainable + p->mods[i].plan.base_selected;
    }
    if (p->tc.task && !strcmp(p->tc.task, "classification")) {
        pr_tokenizer *tok = NULL;
        int rc = open_tokenizer(p, &tok, err);
        if (rc)
            return rc;
        data_dataset ds;
        memset(&ds, 0, sizeof ds);
        rc = data_load(p->tc.train_path, p->tc.format, "classification", tok, p->tc.seq_len, NULL, &ds, err);
        pr_tokenizer_free(tok);
        if (rc)
            return rc;
        out->classes = ds.labels.n;
        data_dataset_free(&ds);
        out->head = (int64_t)p->cfg.d_model * out->classes + out->classes;
        trainable += out->head;
    }
    out->all = out->base + out->modules + out->head;
    out->trainable = trainable;
    return PR_OK;
}

static void thousands(int64_t v, char *buf, size_t len)
{
    char digits[32];
    snprintf(digits, sizeof digits, "%lld", (long long)(v < 0 ? -v : v));
    size_t n = strlen(digits), o = 0;
    if (v < 0 && o + 1 < len)
        buf[o++] = '-';
    for (size_t i = 0; i < n && o + 1 < len; i++) {
        if (i > 0 && (n - i) % 3 == 0 && o + 1 < len)
            buf[o++] = ',';
        if (o + 1 < len)
            buf[o++] = digits[i];
    }
    buf[o] = '\0';
}

void pr_pipeline_format_counts(const pr_pipeline_counts *c, char *buf, size_t len)
{
    char t[32], a[32];
    thousands(c->trainable, t, sizeof t);
    thousands(c->all, a, sizeof a);
    snprintf(buf, len, "trainable params: %s || all params: %s || trainable%%: %.4f", t, a,
             c->all > 0 ? 100.0 * (double)c->trainable / (double)c->all : 0.0);
}

/* ---- build ------------------------------------------------------------------------------------------- */

/* A fuse entry: each file attached frozen as "<name>.<k>" (k its place in
 * the list), then the composite module (pm->t) over them, from `load:`
 * if given. */
static int build_fuse(const pr_pipeline *p, pr_model *m, const pipe_module *pm, pr_error *e)
{
    pr_module **members = calloc((size_t)pm->n_files, sizeof *members);
    if (!members)
        return pr_errorf(e, PR_ERR_NOMEM, "out of memory");
    int rc = PR_OK;
    for (int k = 0; k < pm->n_files && !rc; k++) {
        if (!pm->force && (rc = pr_module_file_check_base(pm->files[k], p->base_fp, e)))
            break;
        pr_module_spec ks;
        pr_module_file_spec(pm->files[k], &ks);
        char name[300];
        snprintf(name, sizeof name, "%s.%d", pm->name, k);
        ks.name = name;
        ks.trainable = 0;
        if (!(rc = pr_module_attach(m, &ks, &members[k], e)))
            rc = pr_module_file_fill(pm->files[k], members[k], e);
    }
    pr_module_spec cs = { .technique = pm->t, .name = pm->name, .trainable = pm->trainable,
                          .options = pm->opts, .n_options = pm->n_opts,
                          .seed = pm->has_seed ? pm->seed : p->tc.seed };
    pr_module *comp = NULL;
    if (!rc)
        rc = pr_module_compose(m, &cs, members, pm->n_files, &comp, e);
    if (!rc && pm->composite_load)
        rc = pr_composite_fill(comp, pm->composite_load, e);
    free(members);
    return rc;
}

int pr_pipeline_build(pr_pipeline *p, pr_model **model, pr_tokenizer **tok, pr_error *err)
{
    if (!p || !model || !tok)
        return pr_errorf(err, PR_ERR_INVALID, "pipeline: NULL pipeline or output");
    *model = NULL;
    *tok = NULL;
    pr_model *m = NULL;
    int rc;
    if (p->loaded) {
        m = p->loaded;
        p->loaded = NULL;
    } else if (p->source == PR_PIPELINE_MODEL_PATH) {
        rc = pr_model_load_hf(p->model_name, &m, err);
    } else {
        rc = pr_model_create(&p->cfg, &m, err);
        if (rc)
            return rc;
    }
    if (!m)
        return rc;
    if ((rc = open_tokenizer(p, tok, err))) {
        pr_model_free(m);
        return rc;
    }
    /* saved modules were saved against this fingerprint of the base */
    pr_model_fingerprint(m, p->base_fp, sizeof p->base_fp);
    for (int i = 0; i < p->n_mods; i++) {
        pipe_module *pm = &p->mods[i];
        pr_module_spec spec;
        pl_fill_spec(p, pm, &spec);
        spec.tokenizer = *tok;
        pr_error e = { 0 };
        pr_module *mod = NULL;
        rc = PR_OK;
        if (pm->kind == MOD_FUSE) {
            if ((rc = build_fuse(p, m, pm, &e))) {
                pr_errorf(err, (pr_status)rc, "%s: %s", pm->where, e.msg);
                pr_model_free(m);
                pr_tokenizer_free(*tok);
                *tok = NULL;
                return rc;
            }
            continue;
        }
        if (pm->kind != MOD_TECHNIQUE && pm->mode != MODE_NEW && !pm->force)
            for (int k = 0; k < pm->n_files && !rc; k++)
                rc = pr_module_file_check_base(pm->files[k], p->base_fp, &e);
        if (!rc)
            rc = pr_module_attach(m, &spec, &mod, &e);
        if (!rc && pm->kind == MOD_LOAD && pm->mode != MODE_NEW)
            rc = pr_module_file_fill(pm->files[0], mod, &e);
        if (!rc && pm->kind == MOD_AVERAGE)
            rc = pr_module_files_fill_average(pm->files, pm->weights, pm->n_files, mod, &e);
        if (rc) {
            pr_errorf(err, (pr_status)rc, "%s: %s", pm->where, e.msg);
            pr_model_free(m);
            pr_tokenizer_free(*tok);
            *tok = NULL;
            return rc;
        }
    }
    *model = m;
    p->built = m;
    return PR_OK;
}

const char *pr_pipeline_base_fingerprint(const pr_pipeline *p)
{
    return p && p->base_fp[0] ? p->base_fp : NULL;
}

void pr_pipeline_train_config(const pr_pipeline *p, pr_train_config *cfg)
{
    if (!cfg)
        return;
    if (!p) {
        pr_train_config_default(cfg);
        return;
    }
    *cfg = p->tc;
}

const pr_head *pr_pipeline_head(const pr_pipeline *p)
{
    return p && p->head.n_labels > 0 ? &p->head : NULL;
}
