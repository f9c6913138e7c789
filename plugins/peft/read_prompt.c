/* peftref built-in plugins: Hugging Face PEFT PROMPT_TUNING, P_TUNING and
 * PREFIX_TUNING adapters (PromptLearningConfig's fields) read into prompt
 * and prefix modules.  License: MIT */
#include <stdint.h>
#include <string.h>

#include <peftref/ext/peft_config.h>

#include "codecs.h"

/* PromptLearningConfig's fields, every prompt type's */
#define PROMPT_LEARNING_FIELDS                                                                                 \
    { "num_virtual_tokens", PR_PEFT_READ, NULL }, { "token_dim", PR_PEFT_READ, NULL },                        \
        { "num_transformer_submodules", PR_PEFT_READ, NULL }, { "num_attention_heads", PR_PEFT_READ, NULL },  \
        { "num_layers", PR_PEFT_READ, NULL }

/* PromptTuningConfig */
static const pr_peft_field prompt_fields[] = {
    PROMPT_LEARNING_FIELDS, { "prompt_tuning_init", PR_PEFT_READ, NULL },
    { "prompt_tuning_init_text", PR_PEFT_READ, NULL }, { "tokenizer_name_or_path", PR_PEFT_INFO, NULL },
    { "tokenizer_kwargs", PR_PEFT_INFO, NULL },
};

/* PrefixTuningConfig */
static const pr_peft_field prefix_fields[] = {
    PROMPT_LEARNING_FIELDS, { "encoder_hidden_size", PR_PEFT_INFO, NULL },
    { "prefix_projection", PR_PEFT_FALSE, "the file holds the prefixes themselves (a prefix MLP is folded away "
                                          "when saving)" },
};

/* PromptEncoderConfig: the file holds the encoder's output (PEFT's
 * inference mode uses it as the prompt), so the encoder's shape is
 * informational. */
static const pr_peft_field ptuning_fields[] = {
    PROMPT_LEARNING_FIELDS, { "encoder_reparameterization_type", PR_PEFT_READ, NULL },
    { "encoder_hidden_size", PR_PEFT_INFO, NULL }, { "encoder_num_layers", PR_PEFT_INFO, NULL },
    { "encoder_dropout", PR_PEFT_INFO, NULL },
};

/* The PromptLearningConfig fields every prompt type checks against the base. */
static int check_prompt_shape(const pr_peft_reader *h, pr_peft_in *in, int64_t token_dim, const char *token_dim_is,
                              int heads_ok_a, int heads_ok_b)
{
    const pr_peft_model *m = h->model(in);
    const char *cfg = h->where(in, PR_PEFT_CONFIG_FILE);
    long long v;
    int rc;
    if ((rc = h->get_int(in, "token_dim", 0, 1, &v)) > PR_PEFT_OK)
        return rc;
    if (rc == PR_PEFT_OK && v != token_dim)
        return h->fail(in, PR_PEFT_ERR_INVALID, "%s: token_dim = %lld does not fit the base model, whose %s is %lld",
                       cfg, v, token_dim_is, (long long)token_dim);
    if ((rc = h->get_int(in, "num_layers", 0, 1, &v)) > PR_PEFT_OK)
        return rc;
    if (rc == PR_PEFT_OK && v != m->n_layers)
        return h->fail(in, PR_PEFT_ERR_INVALID, "%s: num_layers = %lld, but the base model has %d layers", cfg, v,
                       m->n_layers);
    if ((rc = h->get_int(in, "num_attention_heads", 0, 1, &v)) > PR_PEFT_OK)
        return rc;
    if (rc == PR_PEFT_OK && v != heads_ok_a && v != heads_ok_b)
        return h->fail(in, PR_PEFT_ERR_INVALID, "%s: num_attention_heads = %lld, but the base model has %d (%d "
                       "key/value heads)", cfg, v, m->n_heads, m->n_kv_heads);
    if ((rc = h->get_int(in, "num_transformer_submodules", 0, 1, &v)) > PR_PEFT_OK)
        return rc;
    if (rc == PR_PEFT_OK && v != 1)
        return h->bad_value(in, "num_transformer_submodules",
                            "a decoder-only model has one (2 is for encoder-decoder models)");
    return PR_PEFT_OK;
}

/* prefix: PREFIX_TUNING; ptuning: P_TUNING, whose file holds the prompt
 * encoder's output, a plain prompt (what a P_TUNING technique folds to). */
static int read_prompt(const pr_peft_reader *h, pr_peft_in *in, int prefix, int ptuning)
{
    int rc = prefix ? h->check_fields(in, prefix_fields, PEFT_NELEM(prefix_fields))
             : ptuning ? h->check_fields(in, ptuning_fields, PEFT_NELEM(ptuning_fields))
                       : h->check_fields(in, prompt_fields, PEFT_NELEM(prompt_fields));
    if (rc)
        return rc;
    const pr_peft_model *m = h->model(in);
    pr_peft_value ert;
    h->value(in, "encoder_reparameterization_type", NULL, -1, &ert);
    if (ptuning && ert.kind != PR_PEFT_ABSENT &&
        !(ert.kind == PR_PEFT_STRING && (!strcmp(ert.str, "MLP") || !strcmp(ert.str, "LSTM"))))
        return h->bad_value(in, "encoder_reparameterization_type", "PEFT's prompt encoder is MLP or LSTM");
    long long nv;
    if ((rc = h->get_int(in, "num_virtual_tokens", 1, 1, &nv)))
        return rc;
    int64_t d_kv = (int64_t)m->n_kv_heads * m->d_head;
    /* prefix tuning: PEFT's past_key_values are num_key_value_heads * head_dim wide */
    rc = prefix ? check_prompt_shape(h, in, d_kv, "key/value width (num_key_value_heads * head_dim)", m->n_kv_heads,
                                     m->n_kv_heads == m->n_heads ? m->n_heads : m->n_kv_heads)
                : check_prompt_shape(h, in, m->d_model, "hidden size", m->n_heads, m->n_kv_heads);
    if (rc || (rc = h->set_num(in, "n_tokens", (double)nv, -1)))
        return rc;
    if (prefix)
        return h->set_sites(in, PR_SITE_BIT(PR_SITE_ATTN_K) | PR_SITE_BIT(PR_SITE_ATTN_V));
    if ((rc = h->set_sites(in, PR_SITE_BIT(PR_SITE_EMBED))) || ptuning)
        return rc;
    pr_peft_value init, text;
    h->value(in, "prompt_tuning_init", NULL, -1, &init);
    h->value(in, "prompt_tuning_init_text", NULL, -1, &text);
    const char *how = init.kind == PR_PEFT_STRING ? init.str : "RANDOM";
    if (!strcmp(how, "RANDOM"))
        rc = h->set_option(in, "init", "normal", -1);
    else if (!strcmp(how, "SAMPLE_VOCAB"))
        rc = h->set_option(in, "init", "embed_rows", -1);
    else if (!strcmp(how, "TEXT") && text.kind == PR_PEFT_STRING)
        rc = h->set_option(in, "init", "text", -1) ? PR_PEFT_ERR_NOMEM
                                                   : h->set_option(in, "init_text", text.str, -1);
    else
        return h->bad_value(in, "prompt_tuning_init", "peftref offers RANDOM, SAMPLE_VOCAB and TEXT (with "
                            "prompt_tuning_init_text)");
    if (!rc && text.kind != PR_PEFT_ABSENT && text.kind != PR_PEFT_STRING)
        return h->bad_value(in, "prompt_tuning_init_text", "expected a string");
    return rc;
}

int peft_read_prompt_tuning(const pr_peft_reader *h, pr_peft_in *in)
{
    return read_prompt(h, in, 0, 0);
}

int peft_read_p_tuning(const pr_peft_reader *h, pr_peft_in *in)
{
    return read_prompt(h, in, 0, 1);
}

int peft_read_prefix_tuning(const pr_peft_reader *h, pr_peft_in *in)
{
    return read_prompt(h, in, 1, 0);
}
