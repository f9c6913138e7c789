#include <peftref/ext/peft_config.h>

#include "codecs.h"

int peft_read_fourierft(const pr_peft_reader *h, pr_peft_in *in)
{
    return h->fail(in, PR_PEFT_ERR_UNSUPPORTED, "not built");
}

