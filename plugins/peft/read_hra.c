/* peftref built-in plugins: a Hugging Face PEFT HRA adapter read into an
 * hra module.  License: MIT */
#include <peftref/ext/peft_config.h>

#include "codecs.h"
#include "read_common.h"

static const pr_peft_field hra_fields[] = {
    PEFT_TARGET_FIELDS,
    { "r", PR_PEFT_READ, NULL }, { "init_weights", PR_PEFT_READ, NULL }, { "bias", PR_PEFT_READ, NULL },
    { "apply_GS", PR_PEFT_FALSE, "peftref's {tech} reflects along the vectors themselves (Gram-Schmidt is not "
                                 "offered)" },
};

int peft_read_hra(const pr_peft_reader *h, pr_peft_in *in)
{
    double r;
    int rc;
    if ((rc = h->check_fields(in, hra_fields, PEFT_NELEM(hra_fields))) || (rc = peft_linear_only(h, in)) ||
        (rc = peft_check_bias(h, in)) || (rc = h->get_num(in, "r", 8, 1, &r)) ||
        (rc = h->set_num(in, "r", r, -1)) || (rc = peft_bool_option(h, in, "init_weights", 1, "init_weights")))
        return rc;
    return h->match_targets(in, NULL, NULL, 0);
}
