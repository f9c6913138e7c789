/* peftref built-in plugins: PROMPT_TUNING, P_TUNING and PREFIX_TUNING
 * adapters' adapter_config.json (PromptTuningConfig, PromptEncoderConfig,
 * PrefixTuningConfig) from prompt_tuning, p_tuning and prefix_tuning /
 * prefix_tuning_mlp modules.  License: MIT */
#include <string.h>

#include <peftref/plugin.h>
#include <peftref/ext/peft_config.h>

#include "codecs.h"
#include "write_common.h"

enum { PROMPT, PREFIX, PTUNING };

static int prompt_config(const pr_peft_writer *h, pr_peft_out *out, int kind)
{
    const pr_peft_model *g = h->model(out);
    int rc;
    if ((rc = h->put_num(out, "num_virtual_tokens", h->opt_num(out, "n_tokens", -1, 0))) ||
        (rc = h->put_num(out, "num_layers", g->n_layers)) || (rc = h->put_num(out, "num_transformer_submodules", 1)))
        return rc;
    if (kind == PREFIX) {
        /* PEFT's past_key_values per layer: num_key_value_heads heads of head_dim */
        if ((rc = h->put_num(out, "token_dim", (double)g->n_kv_heads * g->d_head)) ||
            (rc = h->put_num(out, "num_attention_heads", g->n_kv_heads)) ||
            (rc = h->put_num(out, "encoder_hidden_size", g->d_model)))
            return rc;
        return h->put_json(out, "prefix_projection", "false");
    }
    if ((rc = h->put_num(out, "token_dim", g->d_model)) || (rc = h->put_num(out, "num_attention_heads", g->n_heads)))
        return rc;
    if (kind == PTUNING) {
        /* PromptEncoderConfig; the file holds the MLP's output (p_tuning folds
         * to it when saved), which PEFT's PromptEncoder in inference mode
         * uses as its embedding */
        double hid = h->opt_num(out, "encoder_hidden_size", -1, 0);   /* 0: token_dim, PEFT's None */
        if ((rc = h->put_str(out, "encoder_reparameterization_type", "MLP")) ||
            (rc = h->put_num(out, "encoder_hidden_size", hid > 0 ? (double)(long long)hid : g->d_model)) ||
            (rc = h->put_num(out, "encoder_num_layers", 2)))
            return rc;
        return h->put_real(out, "encoder_dropout", 0.0);
    }
    const char *init = h->opt_str(out, "init"), *text = h->opt_str(out, "init_text");
    int is_text = init && !strcmp(init, "text");
    if ((rc = h->put_str(out, "prompt_tuning_init",
                         is_text ? "TEXT" : init && !strcmp(init, "normal") ? "RANDOM" : "SAMPLE_VOCAB")) ||
        (rc = h->put_str(out, "prompt_tuning_init_text", is_text ? text : NULL)) ||
        (rc = h->put_json(out, "tokenizer_name_or_path", "null")))
        return rc;
    return h->put_json(out, "tokenizer_kwargs", "null");
}

int peft_write_prompt_tuning(const pr_peft_writer *h, pr_peft_out *out)
{
    return prompt_config(h, out, PROMPT);
}

int peft_write_p_tuning(const pr_peft_writer *h, pr_peft_out *out)
{
    return prompt_config(h, out, PTUNING);
}

int peft_write_prefix_tuning(const pr_peft_writer *h, pr_peft_out *out)
{
    return prompt_config(h, out, PREFIX);
}
