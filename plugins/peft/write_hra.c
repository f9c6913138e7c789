/* peftref built-in plugins: an HRA adapter's adapter_config.json
 * (HRAConfig) from an hra module.  PEFT's r is one value per module, and
 * PEFT adapts torch.nn.Linear only, never GPT-2's Conv1D.  License: MIT */
#include <peftref/plugin.h>
#include <peftref/ext/peft_config.h>

#include "codecs.h"
#include "write_common.h"

int peft_write_hra(const pr_peft_writer *h, pr_peft_out *out)
{
    double r;
    int rc = peft_linear_only(h, out, "HRA");
    if (rc || (rc = h->one_value(out, "r", "r", &r)))
        return rc;
    if ((rc = h->put_num(out, "r", r)) || (rc = h->put_json(out, "apply_GS", "false")) ||
        (rc = peft_put_bool(h, out, "init_weights", h->opt_num(out, "init_weights", -1, 1) != 0)) ||
        (rc = h->put_str(out, "bias", "none")))
        return rc;
    return peft_target_fields(h, out, 1, 0);
}
