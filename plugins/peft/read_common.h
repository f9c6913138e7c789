/* peftref built-in plugins: checks several PEFT readers share.  License: MIT */
#ifndef PEFTREF_PLUGINS_PEFT_READ_COMMON_H
#define PEFTREF_PLUGINS_PEFT_READ_COMMON_H

#include <stdio.h>
#include <string.h>

#include <peftref/ext/peft_config.h>

/* The fields PEFT's module matching reads (the host's match_targets). */
#define PEFT_TARGET_FIELDS                                                                                     \
    { "target_modules", PR_PEFT_READ, NULL }, { "exclude_modules", PR_PEFT_READ, NULL },                      \
        { "layers_to_transform", PR_PEFT_READ, NULL }, { "layers_pattern", PR_PEFT_READ, NULL }

/* bias: "none" only; peftref's weight techniques train no biases. */
static inline int peft_check_bias(const pr_peft_reader *h, pr_peft_in *in)
{
    pr_peft_value v;
    h->value(in, "bias", NULL, -1, &v);
    if (v.kind == PR_PEFT_ABSENT || (v.kind == PR_PEFT_STRING && !strcmp(v.str, "none")))
        return PR_PEFT_OK;
    char why[128];
    snprintf(why, sizeof why, "peftref's %s trains no biases (BitFit is a module of its own)", h->technique(in));
    return h->bad_value(in, "bias", why);
}

/* PEFT's LoHa, LoKr, OFT, BOFT and HRA adapt torch.nn.Linear (and
 * convolutions), not transformers' Conv1D: such an adapter is never for
 * GPT-2. */
static inline int peft_linear_only(const pr_peft_reader *h, pr_peft_in *in)
{
    if (!h->model(in)->conv1d)
        return PR_PEFT_OK;
    const char *T = h->type(in);
    return h->fail(in, PR_PEFT_ERR_INVALID, "%s: peft_type %s adapts torch.nn.Linear layers, and this %s base "
                   "model's projections are Conv1D, which PEFT's %s refuses (is the adapter for another model?)",
                   h->where(in, PR_PEFT_CONFIG_FILE), T, h->model(in)->family, T);
}

/* A boolean field into the option of the same meaning ("true" / "false"). */
static inline int peft_bool_option(const pr_peft_reader *h, pr_peft_in *in, const char *field, int def,
                                   const char *opt)
{
    int v, rc = h->get_bool(in, field, def, &v);
    return rc ? rc : h->set_option(in, opt, v ? "true" : "false", -1);
}

#endif
