/* peftref built-in plugins: Hugging Face PEFT LOHA and LOKR adapters
 * (LyCORIS' LoHa and LoKr, PEFT 0.17 to 0.20 field sets) read into loha and
 * lokr modules.  License: MIT */
#include <math.h>
#include <string.h>

#include <peftref/ext/peft_config.h>

#include "codecs.h"
#include "read_common.h"

/* LycorisConfig's fields, LoHa's and LoKr's */
#define LYCORIS_FIELDS                                                                                         \
    PEFT_TARGET_FIELDS, { "r", PR_PEFT_READ, NULL }, { "alpha", PR_PEFT_READ, NULL },                          \
        { "rank_pattern", PR_PEFT_READ, NULL }, { "alpha_pattern", PR_PEFT_READ, NULL },                      \
        { "rank_dropout", PR_PEFT_ZERO, "peftref's {tech} has no rank dropout" },                             \
        { "module_dropout", PR_PEFT_ZERO, "peftref's {tech} has no module dropout" },                         \
        { "use_effective_conv2d", PR_PEFT_INFO, NULL } /* convolutions only */

static const pr_peft_field loha_fields[] = {
    LYCORIS_FIELDS,
    { "init_weights", PR_PEFT_TRUE, "peftref's {tech} starts with hada_w2_b at zero, PEFT's true" },
};

static const pr_peft_field lokr_fields[] = {
    LYCORIS_FIELDS,
    { "decompose_both", PR_PEFT_FALSE, "peftref's {tech} keeps lokr_w1 whole (lokr_w1_a / lokr_w1_b are not offered)" },
    { "decompose_factor", PR_PEFT_READ, NULL },
    { "rank_dropout_scale", PR_PEFT_INFO, NULL },     /* used only with rank_dropout */
    { "init_weights", PR_PEFT_TRUE, "peftref's {tech} starts with lokr_w1 at zero, PEFT's true" },
};

/* Tensors PEFT's LOKR makes in branches peftref's technique does not take. */
static int lokr_tensors(const pr_peft_reader *h, pr_peft_in *in)
{
    for (int i = 0; i < h->n_tensors(in); i++) {
        pr_peft_tensor t;
        if (h->tensor(in, i, &t))
            continue;
        const char *d = strrchr(t.name, '.');
        if (d && (!strcmp(d, ".lokr_w2") || !strcmp(d, ".lokr_w1_a") || !strcmp(d, ".lokr_w1_b") ||
                  !strcmp(d, ".lokr_t2")))
            return h->fail(in, PR_PEFT_ERR_UNSUPPORTED, "%s: tensor '%s' is PEFT's %s, which peftref's %s does not "
                           "have (it keeps lokr_w1 whole and lokr_w2 as lokr_w2_a . lokr_w2_b, PEFT's choice for "
                           "r < max(k, n) / 2)", h->where(in, PR_PEFT_WEIGHTS_FILE), t.name, d + 1, h->technique(in));
    }
    return PR_PEFT_OK;
}

static int read_lycoris(const pr_peft_reader *h, pr_peft_in *in, int lokr)
{
    int rc = lokr ? h->check_fields(in, lokr_fields, PEFT_NELEM(lokr_fields))
                  : h->check_fields(in, loha_fields, PEFT_NELEM(loha_fields));
    if (rc || (rc = peft_linear_only(h, in)))
        return rc;
    if (lokr) {
        long long f;
        if ((rc = h->get_int(in, "decompose_factor", 0, -1000000, &f)) > PR_PEFT_OK)
            return rc;
        if (rc == PR_PEFT_OK && f != -1)
            return h->bad_value(in, "decompose_factor",
                                "peftref's {tech} factors each width near its square root (-1)");
        if ((rc = lokr_tensors(h, in)))
            return rc;
    }
    double r, alpha;
    if ((rc = h->get_num(in, "r", 8, 1, &r)) || (rc = h->get_num(in, "alpha", 8, 0, &alpha)))
        return rc;
    if (r != floor(r))
        return h->bad_value(in, "r", "expected an integer");
    const pr_peft_pattern pats[] = { { "rank_pattern", "r", r, 1 }, { "alpha_pattern", "alpha", alpha, 0 } };
    if ((rc = h->set_num(in, "r", r, -1)) || (rc = h->set_num(in, "alpha", alpha, -1)))
        return rc;
    return h->match_targets(in, NULL, pats, PEFT_NELEM(pats));
}

int peft_read_loha(const pr_peft_reader *h, pr_peft_in *in)
{
    return read_lycoris(h, in, 0);
}

int peft_read_lokr(const pr_peft_reader *h, pr_peft_in *in)
{
    return read_lycoris(h, in, 1);
}
