/* peftref built-in plugins: a Hugging Face PEFT FOURIERFT adapter read
 * into a fourierft module.  License: MIT */
#include <math.h>

#include <peftref/ext/peft_config.h>

#include "codecs.h"
#include "read_common.h"

static const pr_peft_field fourierft_fields[] = {
    PEFT_TARGET_FIELDS,
    { "n_frequency", PR_PEFT_READ, NULL }, { "n_frequency_pattern", PR_PEFT_READ, NULL },
    { "scaling", PR_PEFT_READ, NULL }, { "random_loc_seed", PR_PEFT_READ, NULL },
    { "init_weights", PR_PEFT_READ, NULL },
    { "fan_in_fan_out", PR_PEFT_READ, NULL }, { "bias", PR_PEFT_READ, NULL },
};

int peft_read_fourierft(const pr_peft_reader *h, pr_peft_in *in)
{
    double n, scaling, seed;
    int rc;
    if ((rc = h->check_fields(in, fourierft_fields, PEFT_NELEM(fourierft_fields))) ||
        (rc = h->check_fan_in_fan_out(in)) || (rc = peft_check_bias(h, in)) ||
        (rc = h->get_num(in, "n_frequency", 1000, 1, &n)) || (rc = h->get_num(in, "scaling", 150, 0, &scaling)) ||
        (rc = h->get_num(in, "random_loc_seed", 777, 0, &seed)))
        return rc;
    if (seed != floor(seed) || seed > 4294967295.0)
        return h->bad_value(in, "random_loc_seed", "expected a seed in 0 .. 2^32 - 1");
    const pr_peft_pattern pats[] = { { "n_frequency_pattern", "n_frequency", n, 1 } };
    if ((rc = h->set_num(in, "n_frequency", n, -1)) || (rc = h->set_num(in, "scaling", scaling, -1)) ||
        (rc = h->set_num(in, "random_loc_seed", seed, -1)) ||
        (rc = peft_bool_option(h, in, "init_weights", 0, "init_weights")) ||
        (rc = h->set_option(in, "ifft2_norm", "backward", -1)))
        return rc;
    return h->match_targets(in, NULL, pats, PEFT_NELEM(pats));
}
