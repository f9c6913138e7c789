/* peftref core, plugin conformance checker: the checks of what a
 * technique declares.
 *
 * params: declared, counted and registered parameter counts agree on two
 * model shapes.  options: out-of-range, unknown and malformed option
 * values are rejected by attach, and every default given as text is
 * accepted. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check_internal.h"

/* ---- params -------------------------------------------------------------------------------------- */

/* plan vs module vs table for one attach; returns the parameter count or -1 */
static int64_t params_case(const pr_technique *t, const pr_model_config *cfg, const char *shape, uint32_t sites,
                           int trainable, report *r)
{
    pr_error err = { 0 };
    bench b;
    attached a;
    memset(&a, 0, sizeof a);
    int64_t result = -1;
    char what[128];
    snprintf(what, sizeof what, "shape %s, %s sites%s", shape, sites ? "all supported" : "default",
             trainable ? "" : ", frozen");
    pr_module_spec s;
    memset(&s, 0, sizeof s);
    s.technique = t;
    s.sites = sites;
    s.trainable = trainable;
    s.seed = 1;
    pr_module_plan plan;
    if (pr_module_plan_for(cfg, &s, &plan, &err)) {
        chk_problem(r, "pr_module_plan_for (%s) failed: %s", what, err.msg);
        return -1;
    }
    if (chk_bench_open(&b, cfg, &err)) {
        chk_problem(r, "cannot build the test model: %s", err.msg);
        goto done;
    }
    if (chk_attach(&b, t, sites, -1, 1, trainable, NULL, 0, &a, &err)) {
        chk_problem(r, "attach (%s) failed: %s", what, err.msg);
        goto done;
    }
    int64_t reg = 0, reg_train = 0, selected = 0;
    for (int k = 0; k < a.set.n; k++) {
        const pr_tensor_info *ti = a.set.v[k];
        if (a.set.selected[k]) {
            selected += ti->numel;
            continue;
        }
        reg += ti->numel;
        if (ti->trainable && ti->grad)
            reg_train += ti->numel;
    }
    int64_t count = pr_module_param_count(a.mod), train = pr_module_trainable_count(a.mod);
    chk_note(r, "%s: declared %lld (trainable %lld, base %lld, %d insertions), module %lld (trainable %lld, %d "
         "insertions), table %lld (trainable %lld, base %lld)",
         what, (long long)plan.params, (long long)plan.trainable, (long long)plan.base_selected, plan.insertions,
         (long long)count, (long long)train, pr_module_insertions(a.mod), (long long)reg, (long long)reg_train,
         (long long)selected);
    int bad = r->n_fail;
    if (plan.params != count || count != reg)
        chk_problem(r, "%s: parameter counts disagree: declared %lld, module %lld, registered tensors %lld", what,
                    (long long)plan.params, (long long)count, (long long)reg);
    if (plan.trainable != train || train != reg_train)
        chk_problem(r, "%s: trainable counts disagree: declared %lld, module %lld, registered trainable tensors %lld",
                    what, (long long)plan.trainable, (long long)train, (long long)reg_train);
    if (!trainable && (train != 0 || reg_train != 0))
        chk_problem(r, "%s: a frozen module trains %lld parameters", what, (long long)(train ? train : reg_train));
    if (plan.insertions != pr_module_insertions(a.mod))
        chk_problem(r, "%s: %d insertions declared, %d made", what, plan.insertions, pr_module_insertions(a.mod));
    if (plan.base_selected != selected)
        chk_problem(r, "%s: %lld base elements declared selected, %lld made trainable", what,
                    (long long)plan.base_selected, (long long)selected);
    if (plan.sites != pr_module_sites(a.mod))
        chk_problem(r, "%s: declared sites 0x%x, used 0x%x", what, plan.sites, pr_module_sites(a.mod));
    if (r->n_fail == bad)
        result = chk_is_select(t) ? selected : count;
done:
    chk_tset_free(&a.set);
    chk_bench_close(&b);
    return result;
}

void chk_params(const pr_technique *t, const check_options *o, report *r)
{
    (void)o;
    char detail[DETAIL_MAX] = "";
    size_t off = 0;
    for (int k = 0; k < 2; k++) {
        pr_model_config cfg = k == 0 ? chk_shape_a() : chk_shape_b();
        const char *shape = k == 0 ? "A" : "B";
        int64_t n = params_case(t, &cfg, shape, 0, 1, r);
        if (n >= 0 && off < sizeof detail)
            off += (size_t)snprintf(detail + off, sizeof detail - off, "%s%lld %s on shape %s (%d layers, d_model %d)",
                                    k ? ", " : "", (long long)n, chk_is_select(t) ? "base elements" : "parameters",
                                    shape, cfg.n_layers, cfg.d_model);
        if (!chk_is_select(t)) {
            params_case(t, &cfg, shape, 0, 0, r);
            /* every supported site this shape has */
            pr_model *m = NULL;
            pr_error err = { 0 };
            uint32_t all = 0;
            if (pr_model_create(&cfg, &m, &err) == PR_OK) {
                for (int s = 0; s < PR_SITE_COUNT; s++)
                    if ((t->sites & PR_SITE_BIT(s)) && chk_site_exists(m, s))
                        all |= PR_SITE_BIT(s);
                pr_model_free(m);
            }
            if (all && all != t->default_sites)
                params_case(t, &cfg, shape, all, 1, r);
        }
    }
    if (off < sizeof detail)
        snprintf(detail + off, sizeof detail - off, "; declared = allocated = registered");
    chk_finish(r, detail);
}


/* ---- options -------------------------------------------------------------------------------------- */

static int finite_bound(double v, int type)
{
    return isfinite(v) && (type != PR_OPT_INT || fabs(v) < 9e15);
}

/* one attach with one option set to text: 0 accepted, else the status */
static int try_option(bench *b, const pr_technique *t, const pr_option_setting *opts, int n, pr_error *err)
{
    attached a;
    int rc = chk_attach(b, t, 0, -1, 1, 1, opts, n, &a, err);
    chk_tset_free(&a.set);
    pr_model_detach_modules(b->m);
    return rc;
}

static void must_reject(bench *b, const pr_technique *t, const pr_option_decl *od, const char *text,
                        const char *why, report *r, int *tried)
{
    pr_error err = { 0 };
    pr_option_setting s = { od->name, text, -1 };
    (*tried)++;
    if (try_option(b, t, &s, 1, &err) == PR_OK)
        chk_problem(r, "option '%s' = '%s' (%s) was accepted", od->name, text, why);
    else
        chk_note(r, "%s = '%s' (%s) rejected: %s", od->name, text, why, err.msg);
}

void chk_options(const pr_technique *t, const check_options *o, report *r)
{
    (void)o;
    pr_error err = { 0 };
    pr_model_config cfg = chk_shape_a();
    bench b;
    int tried = 0;
    pr_option_setting *defs = calloc(t->n_options + 1, sizeof *defs);
    char (*text)[64] = calloc(t->n_options + 1, sizeof *text);
    if (!defs || !text) {
        chk_problem(r, "out of memory");
        goto done;
    }
    if (chk_bench_open(&b, &cfg, &err)) {
        chk_problem(r, "cannot build the test model: %s", err.msg);
        goto done;
    }
    for (uint32_t i = 0; i < t->n_options; i++) {
        const pr_option_decl *od = &t->options[i];
        char v[64];
        int bounded = !(od->min == 0.0 && od->max == 0.0);
        defs[i].name = od->name;
        defs[i].site = -1;
        defs[i].value = text[i];
        switch (od->type) {
        case PR_OPT_INT:
            snprintf(text[i], sizeof text[i], "%lld", (long long)od->def);
            if (bounded && finite_bound(od->min, od->type)) {
                snprintf(v, sizeof v, "%lld", (long long)ceil(od->min) - 1);
                must_reject(&b, t, od, v, "below its minimum", r, &tried);
            }
            if (bounded && finite_bound(od->max, od->type)) {
                snprintf(v, sizeof v, "%lld", (long long)floor(od->max) + 1);
                must_reject(&b, t, od, v, "above its maximum", r, &tried);
            }
            break;
        case PR_OPT_FLOAT:
            snprintf(text[i], sizeof text[i], "%.17g", od->def);
            if (bounded && finite_bound(od->min, od->type)) {
                snprintf(v, sizeof v, "%.17g", od->min - fmax(fabs(od->min) * 1e-6, 1e-6));
                must_reject(&b, t, od, v, "below its minimum", r, &tried);
            }
            if (bounded && finite_bound(od->max, od->type)) {
                snprintf(v, sizeof v, "%.17g", od->max + fmax(fabs(od->max) * 1e-6, 1e-6));
                must_reject(&b, t, od, v, "above its maximum", r, &tried);
            }
            break;
        case PR_OPT_BOOL:
            snprintf(text[i], sizeof text[i], "%s", od->def != 0 ? "true" : "false");
            must_reject(&b, t, od, "maybe", "not a boolean", r, &tried);
            break;
        case PR_OPT_ENUM: {
            int n = 0;
            while (od->choices && od->choices[n])
                n++;
            int k = (int)od->def;
            snprintf(text[i], sizeof text[i], "%s", k >= 0 && k < n ? od->choices[k] : "?");
            must_reject(&b, t, od, "no-such-choice", "not one of its choices", r, &tried);
            break;
        }
        default:
            defs[i].value = od->def_str ? od->def_str : "";
            break;
        }
    }
    if (try_option(&b, t, defs, (int)t->n_options, &err) != PR_OK)
        chk_problem(r, "attaching with every option set to its default failed: %s", err.msg);
    chk_bench_close(&b);
done:;
    char detail[DETAIL_MAX];
    snprintf(detail, sizeof detail, "%d out-of-range or malformed value%s rejected; the defaults of %u option%s "
             "accepted", tried, tried == 1 ? "" : "s", t->n_options, t->n_options == 1 ? "" : "s");
    chk_finish(r, detail);
    free(defs);
    free(text);
}
