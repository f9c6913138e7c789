#include <peftref/ext/peft_config.h>

#include "codecs.h"

int peft_write_oft(const pr_peft_writer *h, pr_peft_out *out)
{
    return h->fail(out, PR_PEFT_ERR_UNSUPPORTED, "not built");
}

int peft_write_boft(const pr_peft_writer *h, pr_peft_out *out)
{
    return h->fail(out, PR_PEFT_ERR_UNSUPPORTED, "not built");
}

