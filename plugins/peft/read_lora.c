#include <peftref/ext/peft_config.h>

#include "codecs.h"

const pr_peft_field peft_lora_fields[] = { { "r", PR_PEFT_READ, NULL } };
const uint32_t peft_n_lora_fields = 1;

int peft_read_lora(const pr_peft_reader *h, pr_peft_in *in)
{
    return h->fail(in, PR_PEFT_ERR_UNSUPPORTED, "not built");
}

int peft_read_dora(const pr_peft_reader *h, pr_peft_in *in)
{
    return h->fail(in, PR_PEFT_ERR_UNSUPPORTED, "not built");
}

