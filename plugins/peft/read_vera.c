/* peftref built-in plugins: a Hugging Face PEFT VERA adapter read into a
 * vera module (the projections saved with it).  License: MIT */
#include <math.h>

#include <peftref/ext/peft_config.h>

#include "codecs.h"
#include "read_common.h"

static const pr_peft_field vera_fields[] = {
    PEFT_TARGET_FIELDS,
    { "r", PR_PEFT_READ, NULL }, { "fan_in_fan_out", PR_PEFT_READ, NULL }, { "bias", PR_PEFT_READ, NULL },
    { "vera_dropout", PR_PEFT_READ, NULL }, { "d_initial", PR_PEFT_READ, NULL },
    { "projection_prng_key", PR_PEFT_INFO, NULL },   /* the projections are in the file */
    { "save_projection", PR_PEFT_TRUE, "peftref cannot regenerate PEFT's vera_A and vera_B from "
                                       "projection_prng_key; save them with the adapter" },
    { "init_weights", PR_PEFT_TRUE, "peftref's {tech} initialises as PEFT's true" },
};

int peft_read_vera(const pr_peft_reader *h, pr_peft_in *in)
{
    double r, dropout, d_initial;
    int rc;
    if ((rc = h->check_fields(in, vera_fields, PEFT_NELEM(vera_fields))) || (rc = h->check_fan_in_fan_out(in)) ||
        (rc = peft_check_bias(h, in)) || (rc = h->get_num(in, "r", 256, 1, &r)) ||
        (rc = h->get_num(in, "vera_dropout", 0, 0, &dropout)) ||
        (rc = h->get_num(in, "d_initial", 0.1, -INFINITY, &d_initial)))
        return rc;
    if ((rc = h->set_num(in, "r", r, -1)) || (rc = h->set_num(in, "dropout", dropout, -1)) ||
        (rc = h->set_num(in, "d_initial", d_initial, -1)) || (rc = h->set_option(in, "save_projection", "true", -1)))
        return rc;
    return h->match_targets(in, NULL, NULL, 0);
}
