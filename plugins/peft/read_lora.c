/* peftref built-in plugins: a Hugging Face PEFT LORA adapter read into a
 * lora or dora module (LoraConfig's fields, PEFT 0.14 to 0.18).
 * License: MIT */
#include <math.h>
#include <string.h>

#include <peftref/ext/peft_config.h>

#include "codecs.h"
#include "read_common.h"

const pr_peft_field peft_lora_fields[] = {
    { "r", PR_PEFT_READ, NULL }, { "lora_alpha", PR_PEFT_READ, NULL }, { "lora_dropout", PR_PEFT_READ, NULL },
    { "target_modules", PR_PEFT_READ, NULL }, { "exclude_modules", PR_PEFT_READ, NULL },
    { "fan_in_fan_out", PR_PEFT_READ, NULL }, { "bias", PR_PEFT_READ, NULL }, { "use_rslora", PR_PEFT_READ, NULL },
    { "init_lora_weights", PR_PEFT_READ, NULL }, { "layers_to_transform", PR_PEFT_READ, NULL },
    { "layers_pattern", PR_PEFT_READ, NULL }, { "rank_pattern", PR_PEFT_READ, NULL },
    { "alpha_pattern", PR_PEFT_READ, NULL }, { "use_dora", PR_PEFT_READ, NULL },
    { "megatron_config", PR_PEFT_EMPTY, "peftref has no Megatron parallel layers" },
    { "megatron_core", PR_PEFT_INFO, NULL },   /* used only with megatron_config */
    { "loftq_config", PR_PEFT_EMPTY, "LoftQ needs a quantised base model" },
    { "eva_config", PR_PEFT_EMPTY, "EVA initialisation is not offered" },
    { "corda_config", PR_PEFT_EMPTY, "CorDA initialisation is not offered" },
    { "layer_replication", PR_PEFT_EMPTY, "peftref does not replicate layers" },
    { "trainable_token_indices", PR_PEFT_EMPTY,
      "trainable tokens are a module of their own (PEFT's TRAINABLE_TOKENS type)" },
    { "target_parameters", PR_PEFT_EMPTY, "peftref's {tech} adapts modules, not bare parameters" },
    { "lora_bias", PR_PEFT_FALSE, "peftref's {tech} has no bias of its own" },
    { "use_qalora", PR_PEFT_FALSE, "QALoRA needs a quantised base model" },
    { "qalora_group_size", PR_PEFT_INFO, NULL },   /* used only with use_qalora */
    { "alora_invocation_tokens", PR_PEFT_EMPTY, "activated LoRA is not offered" },
    { "arrow_config", PR_PEFT_EMPTY, "Arrow routing is not offered" },
    { "ensure_weight_tying", PR_PEFT_FALSE, "peftref's {tech} does not adapt tied embeddings" },
    { "runtime_config", PR_PEFT_INFO, NULL },      /* device placement only */
};
const uint32_t peft_n_lora_fields = PEFT_NELEM(peft_lora_fields);

/* dora: the technique is PEFT's use_dora variant, which has no
 * init_lora_weights option. */
static int read_lora(const pr_peft_reader *h, pr_peft_in *in, int dora)
{
    int rc = h->check_fields(in, peft_lora_fields, peft_n_lora_fields);
    if (rc)
        return rc;
    int use_dora = 0, rslora = 0;
    if ((rc = h->get_bool(in, "use_dora", 0, &use_dora)) || (rc = h->get_bool(in, "use_rslora", 0, &rslora)) ||
        (rc = h->check_fan_in_fan_out(in)) || (rc = peft_check_bias(h, in)))
        return rc;
    if (use_dora && !dora)
        return h->bad_value(in, "use_dora",
                            "no technique found declares PEFT's LORA with use_dora (peftref plugins lists them)");
    long long r;
    double alpha, dropout;
    if ((rc = h->get_int(in, "r", 0, 1, &r)) > PR_PEFT_OK)
        return rc;
    if (rc < 0)
        r = 8;
    if ((rc = h->get_num(in, "lora_alpha", 8, -INFINITY, &alpha)) ||
        (rc = h->get_num(in, "lora_dropout", 0, -INFINITY, &dropout)))
        return rc;
    pr_peft_value init;
    h->value(in, "init_lora_weights", NULL, -1, &init);
    const char *init_name = "true";
    if (init.kind == PR_PEFT_BOOL && !init.i)
        init_name = "false";
    else if (init.kind == PR_PEFT_STRING &&
             (!strcmp(init.str, "gaussian") || !strcmp(init.str, "pissa") || !strcmp(init.str, "olora")))
        init_name = init.str;
    else if (init.kind != PR_PEFT_ABSENT && !(init.kind == PR_PEFT_BOOL && init.i))
        return h->bad_value(in, "init_lora_weights", "peftref's {tech} offers true, false, gaussian, pissa and olora");
    if (strcmp(init_name, "true") && dora)
        return h->bad_value(in, "init_lora_weights", "peftref's {tech} initialises as PEFT's true");
    if ((rc = h->set_num(in, "r", (double)r, -1)) || (rc = h->set_num(in, "alpha", alpha, -1)) ||
        (rc = h->set_num(in, "dropout", dropout, -1)) ||
        (rc = h->set_option(in, "use_rslora", rslora ? "true" : "false", -1)))
        return rc;
    if (!dora && (rc = h->set_option(in, "init_lora_weights", init_name, -1)))
        return rc;
    /* per-site rank and alpha: every layer's module of a site must agree */
    const pr_peft_pattern pats[] = { { "rank_pattern", "r", (double)r, 1 }, { "alpha_pattern", "alpha", alpha, 0 } };
    return h->match_targets(in, NULL, pats, PEFT_NELEM(pats));
}

int peft_read_lora(const pr_peft_reader *h, pr_peft_in *in)
{
    return read_lora(h, in, 0);
}

int peft_read_dora(const pr_peft_reader *h, pr_peft_in *in)
{
    return read_lora(h, in, 1);
}
