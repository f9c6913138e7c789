/* peftref built-in plugins: a TRAINABLE_TOKENS adapter's
 * adapter_config.json (TrainableTokensConfig) from a trainable_tokens
 * module: the token embedding's rows token_indices.  PEFT ties the same
 * rows of a tied output head to them; peftref's trainable_tokens changes
 * the input side only, so only an untied model is written.  License: MIT */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <peftref/plugin.h>
#include <peftref/ext/peft_config.h>

#include "codecs.h"
#include "write_common.h"

/* option token_indices ("5, 9") as a JSON list "[5, 9]" (malloc'd) */
static char *index_list(const char *ids)
{
    size_t cap = 2 * strlen(ids) + 8, len = 0;
    char *t = malloc(cap);
    if (!t)
        return NULL;
    t[len++] = '[';
    for (const char *s = ids; *s;) {
        char *end;
        long v = strtol(s, &end, 10);
        if (end == s) {
            s++;
            continue;
        }
        /* each number takes at most its own characters plus ", " */
        len += (size_t)snprintf(t + len, cap - len, "%s%ld", len > 1 ? ", " : "", v);
        s = end;
    }
    snprintf(t + len, cap - len, "]");
    return t;
}

int peft_write_trainable_tokens(const pr_peft_writer *h, pr_peft_out *out)
{
    const pr_peft_model *m = h->model(out);
    if (m->tied_head)
        return h->fail(out, PR_PEFT_ERR_UNSUPPORTED, "module '%s' (technique %s): the base model ties its output head "
                       "to the token embedding, where Hugging Face PEFT's TRAINABLE_TOKENS replaces the head's rows "
                       "too and peftref's %s only the input rows; use --format peftref", h->module_name(out),
                       h->technique(out), h->technique(out));
    const char *ids = h->opt_str(out, "token_indices");
    char *list = index_list(ids ? ids : "");
    if (!list)
        return h->fail(out, PR_PEFT_ERR_NOMEM, "out of memory");
    int rc = h->put_json(out, "token_indices", list);
    free(list);
    /* target_modules: the embedding's own name ("wte", "embed_tokens") */
    const char *dot = strrchr(m->embed, '.');
    char name[200];
    snprintf(name, sizeof name, "[\"%s\"]", dot ? dot + 1 : m->embed);
    if (rc || (rc = h->put_json(out, "target_modules", name)))
        return rc;
    return peft_put_bool(h, out, "init_weights", h->opt_num(out, "init_weights", -1, 1) != 0);
}
