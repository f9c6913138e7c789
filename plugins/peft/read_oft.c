/* peftref built-in plugins: Hugging Face PEFT OFT and BOFT adapters read
 * into oft and boft modules.  License: MIT */
#include <math.h>

#include <peftref/ext/peft_config.h>

#include "codecs.h"
#include "read_common.h"

static const pr_peft_field oft_fields[] = {
    PEFT_TARGET_FIELDS, { "r", PR_PEFT_READ, NULL }, { "oft_block_size", PR_PEFT_READ, NULL },
    { "fan_in_fan_out", PR_PEFT_READ, NULL }, { "bias", PR_PEFT_READ, NULL },
    { "module_dropout", PR_PEFT_ZERO, "peftref's {tech} has no module dropout" },
    { "init_weights", PR_PEFT_TRUE, "peftref's {tech} starts as the identity, PEFT's true" },
    { "coft", PR_PEFT_FALSE, "constrained OFT is not offered" },
    { "eps", PR_PEFT_INFO, NULL },   /* used only with coft */
    { "block_share", PR_PEFT_FALSE, "peftref's {tech} has one rotation per block" },
    { "use_cayley_neumann", PR_PEFT_FALSE, "peftref computes the exact Cayley transform (I - S)(I + S)^-1, not "
                                           "PEFT's truncated Neumann series, which gives another rotation" },
    { "num_cayley_neumann_terms", PR_PEFT_INFO, NULL },   /* used only with use_cayley_neumann */
};

static const pr_peft_field boft_fields[] = {
    PEFT_TARGET_FIELDS, { "boft_block_size", PR_PEFT_READ, NULL }, { "boft_block_num", PR_PEFT_READ, NULL },
    { "boft_n_butterfly_factor", PR_PEFT_READ, NULL }, { "fan_in_fan_out", PR_PEFT_READ, NULL },
    { "bias", PR_PEFT_READ, NULL },
    { "boft_dropout", PR_PEFT_ZERO, "peftref's {tech} has no multiplicative dropout (blocks replaced by the "
                                    "identity)" },
    { "init_weights", PR_PEFT_TRUE, "peftref's {tech} starts as the identity (boft_R zeros, boft_s ones), PEFT's "
                                    "true" },
};

int peft_read_oft(const pr_peft_reader *h, pr_peft_in *in)
{
    double r, bs;
    int rc;
    if ((rc = h->check_fields(in, oft_fields, PEFT_NELEM(oft_fields))) || (rc = peft_linear_only(h, in)) ||
        (rc = h->check_fan_in_fan_out(in)) || (rc = peft_check_bias(h, in)) ||
        (rc = h->get_num(in, "r", 0, 0, &r)) || (rc = h->get_num(in, "oft_block_size", 32, 0, &bs)))
        return rc;
    if ((r == 0) == (bs == 0))
        return h->bad_value(in, r ? "r" : "oft_block_size",
                            "PEFT's OFT takes exactly one of r and oft_block_size non-zero");
    if ((rc = h->set_num(in, "r", r, -1)) || (rc = h->set_num(in, "oft_block_size", bs, -1)))
        return rc;
    return h->match_targets(in, NULL, NULL, 0);
}

int peft_read_boft(const pr_peft_reader *h, pr_peft_in *in)
{
    double bs, bn, m;
    int rc;
    if ((rc = h->check_fields(in, boft_fields, PEFT_NELEM(boft_fields))) || (rc = peft_linear_only(h, in)) ||
        (rc = h->check_fan_in_fan_out(in)) || (rc = peft_check_bias(h, in)) ||
        (rc = h->get_num(in, "boft_block_size", 4, 0, &bs)) || (rc = h->get_num(in, "boft_block_num", 0, 0, &bn)) ||
        (rc = h->get_num(in, "boft_n_butterfly_factor", 1, 1, &m)))
        return rc;
    if ((bs == 0) == (bn == 0))
        return h->bad_value(in, bs ? "boft_block_size" : "boft_block_num",
                            "PEFT's BOFT takes exactly one of boft_block_size and boft_block_num non-zero");
    if ((rc = h->set_num(in, "boft_block_size", bs, -1)) || (rc = h->set_num(in, "boft_block_num", bn, -1)) ||
        (rc = h->set_num(in, "boft_n_butterfly_factor", m, -1)))
        return rc;
    return h->match_targets(in, NULL, NULL, 0);
}
