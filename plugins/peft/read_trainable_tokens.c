/* peftref built-in plugins: a Hugging Face PEFT TRAINABLE_TOKENS adapter
 * (rows of the token embedding) read into a trainable_tokens module.
 * License: MIT */
#include <stdio.h>
#include <stdlib.h>

#include <peftref/ext/peft_config.h>

#include "codecs.h"
#include "read_common.h"

static const pr_peft_field tt_fields[] = {
    { "token_indices", PR_PEFT_READ, NULL }, { "target_modules", PR_PEFT_READ, NULL },
    { "init_weights", PR_PEFT_READ, NULL },
};

int peft_read_trainable_tokens(const pr_peft_reader *h, pr_peft_in *in)
{
    int rc = h->check_fields(in, tt_fields, PEFT_NELEM(tt_fields));
    if (rc)
        return rc;
    const pr_peft_model *m = h->model(in);
    if (m->tied_head)
        return h->fail(in, PR_PEFT_ERR_UNSUPPORTED, "%s: the base model ties its output head to the token "
                       "embedding; PEFT's TRAINABLE_TOKENS then replaces the head's rows too, and peftref's %s "
                       "replaces the input rows only", h->where(in, PR_PEFT_CONFIG_FILE), h->technique(in));
    pr_peft_value tm, ids;
    h->value(in, "target_modules", NULL, -1, &tm);
    int hit = tm.kind == PR_PEFT_ABSENT ? 1 : h->names_match(in, "target_modules", m->embed);
    if (hit < 0)
        return PR_PEFT_ERR_UNSUPPORTED;
    if (!hit)
        return h->bad_value(in, "target_modules", "peftref's {tech} works on the token embedding only");
    h->value(in, "token_indices", NULL, -1, &ids);
    if (ids.kind != PR_PEFT_ARRAY || ids.len == 0)
        return h->bad_value(in, "token_indices", "expected a non-empty list of token ids");
    size_t len = 0, cap = 16 * ids.len + 1;
    char *text = malloc(cap);
    if (!text)
        return h->fail(in, PR_PEFT_ERR_NOMEM, "%s: out of memory", h->where(in, PR_PEFT_DIR));
    for (size_t i = 0; i < ids.len; i++) {
        pr_peft_value e;
        h->value(in, "token_indices", NULL, (long)i, &e);
        long long id = e.kind == PR_PEFT_INT ? (long long)e.i : -1;
        if (id < 0 || id >= m->vocab_size) {
            free(text);
            char why[96];
            snprintf(why, sizeof why, "expected token ids below the vocabulary size %d", m->vocab_size);
            return h->bad_value(in, "token_indices", why);
        }
        len += (size_t)snprintf(text + len, cap - len, "%s%lld", i ? ", " : "", id);
    }
    rc = h->set_option(in, "token_indices", text, -1);
    free(text);
    if (rc || (rc = h->set_num(in, "n_token_indices", (double)ids.len, -1)) ||
        (rc = peft_bool_option(h, in, "init_weights", 1, "init_weights")))
        return rc;
    return h->set_sites(in, PR_SITE_BIT(PR_SITE_EMBED));
}
