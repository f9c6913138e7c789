/* peftref core: which technique a Hugging Face PEFT adapter is read as,
 * from what the techniques declare: pr_technique.peft_type, folds_to and
 * the peft-config extension (include/peftref/ext/peft_config.h). */
#include "config.h"

#include <jansson.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>

#include "peft_adapter.h"
#include "peft_adapter_internal.h"

/* ---- which technique reads the adapter ----------------------------------------------------------- */

/* t's peft-config extension when it has a read(), else NULL. */
static const pr_ext_peft_config *reader_of(const pr_technique *t)
{
    const pr_ext_peft_config *v = peft_technique_variant(t);
    if (!v || v->struct_size < offsetof(pr_ext_peft_config, read) + sizeof v->read)
        return NULL;
    return v->read ? v : NULL;
}

/* "ADALORA, IA3, LORA": the PEFT types the registry's techniques read, in
 * order, each once. */
static void readable_types(const pr_registry *reg, char *buf, size_t len)
{
    buf[0] = '\0';
    const char *last = "";
    for (;;) {
        const char *next = NULL;
        for (int i = 0; i < pr_registry_count(reg); i++) {
            const pr_technique *t = pr_registry_technique(reg, i);
            if (t->peft_type && reader_of(t) && strcmp(t->peft_type, last) > 0 &&
                (!next || strcmp(t->peft_type, next) < 0))
                next = t->peft_type;
        }
        if (!next)
            return;
        size_t k = strlen(buf);
        snprintf(buf + k, len - k, "%s%s", k ? ", " : "", next);
        last = next;
    }
}

/* How many of t's implied fields the config holds, or -1 when it lacks one
 * (an absent field matches an implied false or null). */
static int implied_match(const reader *R, const json_t *implies)
{
    const char *k;
    const json_t *v;
    int n = 0;
    json_object_foreach((json_t *)implies, k, v) {
        const json_t *have = json_object_get(R->root, k);
        if (have ? !json_equal(have, v) : !(json_is_false(v) || json_is_null(v)))
            return -1;
        n++;
    }
    return n;
}

/* The technique an adapter of peft_type R->type is read as, from what the
 * techniques declare (pr_technique.peft_type and the peft-config
 * extension): the one whose implied fields the config holds, the most
 * such fields winning; a technique with folds_to is read as the technique
 * it folds to and is read by its own read(); techniques without a read(),
 * or no_import, are not candidates.  Sets R->f->t, R->tech, R->decl,
 * R->ext and R->implies. */
int pa_resolve(reader *R, const pr_registry *reg)
{
    const pr_technique *best = NULL, *tie = NULL, *best_decl = NULL;
    json_t *best_implies = NULL;
    int best_n = -1, n_of_type = 0;
    for (int i = 0; i < pr_registry_count(reg); i++) {
        const pr_technique *t = pr_registry_technique(reg, i);
        if (!t->peft_type || strcmp(t->peft_type, R->type))
            continue;
        n_of_type++;
        const pr_ext_peft_config *v = reader_of(t);
        if (!v || v->no_import)
            continue;
        const pr_technique *u = t->folds_to ? pr_registry_find(reg, t->folds_to) : t;
        if (!u)
            continue;
        json_t *imp = peft_technique_implies(t);
        if (!imp)
            continue;   /* the validator refuses such a plugin */
        int n = implied_match(R, imp);
        if (n > best_n) {
            json_decref(best_implies);
            best = u, best_decl = t, tie = NULL, best_n = n, best_implies = imp;
            continue;
        }
        if (n == best_n && u != best)
            tie = u;
        json_decref(imp);
    }
    if (!best) {
        json_decref(best_implies);
        if (n_of_type) {
            char names[512] = "";
            for (int i = 0; i < pr_registry_count(reg); i++) {
                const pr_technique *t = pr_registry_technique(reg, i);
                size_t k = strlen(names);
                if (t->peft_type && !strcmp(t->peft_type, R->type))
                    snprintf(names + k, sizeof names - k, "%s%s", k ? ", " : "", t->name);
            }
            return pr_errorf(R->err, PR_ERR_NOTFOUND, "%s/" CONFIG_NAME ": no technique found reads PEFT %s "
                             "adapters: %s declare%s the type without a read() that imports (peft-config "
                             "extension; peftref plugins inspect lists what each technique declares)",
                             R->dir, R->type, names, n_of_type == 1 ? "s" : "");
        }
        char types[1024];
        readable_types(reg, types, sizeof types);
        return pr_errorf(R->err, PR_ERR_NOTFOUND, "%s: no technique found declares PEFT type %s; those found read %s "
                         "(peftref plugins lists the techniques)", R->dir, R->type, *types ? types : "none");
    }
    if (tie) {
        json_decref(best_implies);
        return pr_errorf(R->err, PR_ERR_INVALID, "%s/" CONFIG_NAME ": techniques %s and %s both read this PEFT %s "
                         "adapter; leave one of them out of the plugin path", R->dir, best->name, tie->name, R->type);
    }
    R->f->t = best;
    R->tech = best->name;
    R->decl = best_decl;
    R->ext = reader_of(best_decl);
    R->implies = best_implies;
    return PR_OK;
}
