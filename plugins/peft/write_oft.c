/* peftref built-in plugins: OFT and BOFT adapters' adapter_config.json
 * (OFTConfig, BOFTConfig) from oft and boft modules.  Their block sizes
 * are one value per module in PEFT, and PEFT adapts torch.nn.Linear only,
 * never GPT-2's Conv1D.  boft_R (m, nb, b, b) is written as saved.
 * License: MIT */
#include <peftref/plugin.h>
#include <peftref/ext/peft_config.h>

#include "codecs.h"
#include "write_common.h"

int peft_write_oft(const pr_peft_writer *h, pr_peft_out *out)
{
    double r, bs;
    int rc = peft_linear_only(h, out, "OFT");
    if (rc || (rc = h->one_value(out, "r", "r", &r)) ||
        (rc = h->one_value(out, "oft_block_size", "oft_block_size", &bs)))
        return rc;
    if ((rc = h->put_num(out, "r", r)) || (rc = h->put_num(out, "oft_block_size", r ? 0 : bs)) ||
        (rc = h->put_real(out, "module_dropout", 0.0)) || (rc = h->put_str(out, "bias", "none")) ||
        (rc = h->put_json(out, "init_weights", "true")) || (rc = h->put_json(out, "coft", "false")) ||
        (rc = h->put_real(out, "eps", 6e-05)) || (rc = h->put_json(out, "block_share", "false")) ||
        /* peftref computes the exact Cayley transform (plugins/oft.c) */
        (rc = h->put_json(out, "use_cayley_neumann", "false")) ||
        (rc = h->put_num(out, "num_cayley_neumann_terms", 5)))
        return rc;
    return peft_target_fields(h, out, 1, 1);
}

/* BOFTConfig: boft_block_size and boft_block_num are exclusive (one is 0);
 * peftref's boft takes boft_block_size when it is set. */
int peft_write_boft(const pr_peft_writer *h, pr_peft_out *out)
{
    double bs, bn, m;
    int rc = peft_linear_only(h, out, "BOFT");
    if (rc || (rc = h->one_value(out, "boft_block_size", "boft_block_size", &bs)) ||
        (rc = h->one_value(out, "boft_block_num", "boft_block_num", &bn)) ||
        (rc = h->one_value(out, "boft_n_butterfly_factor", "boft_n_butterfly_factor", &m)))
        return rc;
    if ((rc = h->put_num(out, "boft_block_size", bs)) || (rc = h->put_num(out, "boft_block_num", bs ? 0 : bn)) ||
        (rc = h->put_num(out, "boft_n_butterfly_factor", m)) || (rc = h->put_real(out, "boft_dropout", 0.0)) ||
        (rc = h->put_str(out, "bias", "none")) || (rc = h->put_json(out, "init_weights", "true")))
        return rc;
    return peft_target_fields(h, out, 1, 1);
}
