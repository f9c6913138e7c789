/* peftref built-in plugins: a VERA adapter's adapter_config.json
 * (VeraConfig) from a vera module.  PEFT regenerates vera_A and vera_B from
 * projection_prng_key through torch's generator when save_projection is
 * false, which peftref's seed does not reproduce: only a module that saves
 * them (technique vera) is written.  License: MIT */
#include <peftref/plugin.h>
#include <peftref/ext/peft_config.h>

#include "codecs.h"
#include "write_common.h"

int peft_write_vera(const pr_peft_writer *h, pr_peft_out *out)
{
    if (h->opt_num(out, "save_projection", -1, 1) == 0)
        return h->fail(out, PR_PEFT_ERR_UNSUPPORTED, "module '%s' (technique %s) regenerates vera_A and vera_B from "
                       "peftref's seed, which Hugging Face PEFT (projection_prng_key through torch's generator) does "
                       "not reproduce; train with technique vera (save_projection true) or use --format peftref",
                       h->module_name(out), h->technique(out));
    double d_initial;
    int rc = h->one_value(out, "d_initial", "d_initial", &d_initial);
    if (rc || (rc = h->put_num(out, "r", h->opt_num(out, "r", -1, 256))) ||
        (rc = h->put_num(out, "projection_prng_key", 0)) || (rc = h->put_json(out, "save_projection", "true")) ||
        (rc = h->put_real(out, "vera_dropout", h->opt_num(out, "dropout", -1, 0))) ||
        (rc = h->put_real(out, "d_initial", d_initial)) || (rc = h->put_str(out, "bias", "none")) ||
        (rc = h->put_json(out, "init_weights", "true")))
        return rc;
    return peft_target_fields(h, out, 0, 1);
}
