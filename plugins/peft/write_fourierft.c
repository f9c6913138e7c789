/* peftref built-in plugins: a FOURIERFT adapter's adapter_config.json
 * (FourierFTConfig) from a fourierft module.  PEFT's FourierFT takes
 * torch.fft.ifft2's default normalisation (backward) and has no field for
 * another.  License: MIT */
#include <string.h>

#include <peftref/plugin.h>
#include <peftref/ext/peft_config.h>

#include "codecs.h"
#include "write_common.h"

int peft_write_fourierft(const pr_peft_writer *h, pr_peft_out *out)
{
    const char *norm = h->opt_str(out, "ifft2_norm");
    if (norm && strcmp(norm, "backward"))
        return h->fail(out, PR_PEFT_ERR_UNSUPPORTED, "module '%s' (technique %s) uses ifft2_norm %s; Hugging Face "
                       "PEFT's FourierFT uses torch.fft.ifft2's default (backward) and has no field for another; use "
                       "--format peftref", h->module_name(out), h->technique(out), norm);
    double n = h->opt_num(out, "n_frequency", -1, 1000);
    int rc;
    if ((rc = h->put_num(out, "n_frequency", n)) ||
        (rc = h->put_pattern(out, "n_frequency_pattern", "n_frequency", n)) ||
        (rc = h->put_real(out, "scaling", h->opt_num(out, "scaling", -1, 150))) ||
        (rc = h->put_num(out, "random_loc_seed", h->opt_num(out, "random_loc_seed", -1, 777))) ||
        (rc = peft_put_bool(h, out, "init_weights", h->opt_num(out, "init_weights", -1, 0) != 0)) ||
        (rc = h->put_str(out, "bias", "none")))
        return rc;
    return peft_target_fields(h, out, 1, 1);
}
