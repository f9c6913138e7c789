/* Prompt tuning: p trainable "soft tokens" prepended to the input
 * embeddings of a frozen model (Lester, Al-Rfou and Constant 2021, "The
 * Power of Scale for Parameter-Efficient Prompt Tuning", arXiv 2104.08691).
 *
 *     prompt (n_tokens, d_model)      the only parameter, global (one copy)
 *
 * The host integrates by concatenation (PR_INTEGRATE_CONCAT at the embed
 * site, n_virtual = n_tokens): forward writes the n_tokens virtual rows,
 * the model gives virtual position i the vector prompt[i] plus the
 * position embedding of i, and the real tokens move to positions
 * n_tokens + t; logits and loss cover the real positions only.  Backward
 * receives the gradient of those rows summed over the batch and adds it to
 * the prompt's gradient.  The module is never the identity: the prompt
 * shifts every real token's position and is attended to by every query.
 *
 * Initialisation (option init, through the parameter's init_option):
 *   normal      normal(0, init_std); Hugging Face PEFT's RANDOM init is
 *               torch.nn.Embedding's normal(0, 1)
 *   embed_rows  rows of the token embedding at token ids sampled from the
 *               vocabulary: the paper's "sampled vocab" (§3.2)
 *   text        the embeddings of the tokens of init_text, cycled to
 *               n_tokens rows: the paper's "class label" init when the text
 *               holds the label words; PEFT's TEXT init (the parameter's
 *               init_source names the option init_text)
 *
 * Trainable parameters: n_tokens * d_model.
 *
 * This file includes only peftref's public plugin headers (plugin.h,
 * ext/peft_config.h), its PEFT codecs (peft/codecs.h) and libc, and links against
 * nothing of peftref. */
#include <stdint.h>
#include <string.h>

#include <peftref/plugin.h>
#include <peftref/ext/peft_config.h>

#include "peft/codecs.h"

PR_PLUGIN_EXPORT const pr_plugin *peftref_plugin_entry(const pr_entry_args *args);

enum { OPT_N_TOKENS, OPT_INIT, OPT_INIT_TEXT, OPT_INIT_STD, N_OPTS };
enum { PARAM_PROMPT, N_PARAMS };

/* pr_init names (plugin.h, init_option): the host maps the choice to the init. */
static const char *const init_choices[] = { "normal", "embed_rows", "text", NULL };

static const pr_option_decl prompt_options[N_OPTS] = {
    [OPT_N_TOKENS] = {
        .struct_size = sizeof(pr_option_decl), .name = "n_tokens", .type = PR_OPT_INT,
        .def = 20, .min = 1, .max = 4096,
        .help = "soft tokens prepended to the input (Hugging Face PEFT: num_virtual_tokens, which has "
                "no default); 20 from Lester et al. 2021 §3.2, Fig. 3a: longer prompts give only "
                "marginal gains.  Virtual plus real positions must fit the model's max_seq",
    },
    [OPT_INIT] = {
        .struct_size = sizeof(pr_option_decl), .name = "init", .type = PR_OPT_ENUM,
        .def = 1, .choices = init_choices,
        .help = "prompt initialisation: normal = random normal(0, init_std) (PEFT's RANDOM), "
                "embed_rows = embeddings of tokens sampled from the vocabulary (the paper's sampled "
                "vocab, which it found better than random init; PEFT's SAMPLE_VOCAB), text = "
                "embeddings of init_text's tokens, cycled (the paper's class-label init; PEFT's TEXT)",
    },
    [OPT_INIT_TEXT] = {
        .struct_size = sizeof(pr_option_decl), .name = "init_text", .type = PR_OPT_STRING,
        .def_str = "",
        .help = "text whose token embeddings (with the pipeline's tokenizer), cycled to n_tokens rows, "
                "initialise the prompt; required when init = text (PEFT: prompt_tuning_init_text)",
    },
    [OPT_INIT_STD] = {
        .struct_size = sizeof(pr_option_decl), .name = "init_std", .type = PR_OPT_FLOAT,
        .def = 1.0, .min = 0, .max = 100,
        .help = "standard deviation of the normal init; default 1, torch.nn.Embedding's init that "
                "Hugging Face PEFT's RANDOM prompt init uses",
    },
};

static const pr_param_decl prompt_params[N_PARAMS] = {
    [PARAM_PROMPT] = {
        .struct_size = sizeof(pr_param_decl), .name = "prompt", .shape = "n_tokens, d_model",
        .init = PR_INIT_EMBED_ROWS, .init_arg = "init_std", .scope = PR_SCOPE_GLOBAL,
        .init_option = "init",
        /* init = text: the STRING option holding the text */
        .init_source = "init_text",
        /* Hugging Face PEFT's PromptEmbedding weight, saved as it is */
        .peft_key = "prompt_embeddings",
        .peft_layout = PR_PEFT_AS_IS,
        .help = "the soft prompt, one d_model row per virtual token; initialised as option init says",
    },
};

static int prompt_check(const pr_ctx *ctx, const pr_tensor *rows, const char *what)
{
    if (ctx->n_params < N_PARAMS || !ctx->params[PARAM_PROMPT]->data)
        return ctx->host->error(ctx, "prompt_tuning: expected the 'prompt' parameter, got %u parameters",
                                ctx->n_params);
    const pr_tensor *p = ctx->params[PARAM_PROMPT];
    if (p->ndim != 2)
        return ctx->host->error(ctx, "prompt_tuning: 'prompt' must be (n_tokens, d_model), has %d dimensions",
                                p->ndim);
    if (!rows->data || rows->ndim != 2 || rows->shape[0] != p->shape[0] || rows->shape[1] != p->shape[1])
        return ctx->host->error(ctx, "prompt_tuning: %s must be (%lld, %lld) like 'prompt'%s", what,
                                (long long)p->shape[0], (long long)p->shape[1],
                                rows->data ? "" : " and is missing");
    return 0;
}

static int row_stride(const pr_tensor *t)
{
    return (int)(t->stride[0] ? t->stride[0] : t->shape[1]);
}

/* forward: out (n_tokens, d_model) = prompt */
static int prompt_forward(const pr_ctx *ctx)
{
    int rc = prompt_check(ctx, ctx->out, "the output");
    if (rc)
        return rc;
    const pr_tensor *p = ctx->params[PARAM_PROMPT];
    const int n = (int)p->shape[0], d = (int)p->shape[1], ld = row_stride(ctx->out);
    const float *src = p->data;
    float *out = ctx->out->data;
    for (int i = 0; i < n; i++)
        memcpy(out + (size_t)i * ld, src + (size_t)i * d, (size_t)d * sizeof(float));
    return 0;
}

/* backward: d_prompt (n_tokens, d_model) += d_out (batch-summed by the host) */
static int prompt_backward(const pr_ctx *ctx)
{
    int rc = prompt_check(ctx, ctx->d_out, "d_out");
    if (rc)
        return rc;
    float *g = ctx->grads ? ctx->grads[PARAM_PROMPT]->data : NULL;
    if (!g)
        return 0;
    const pr_tensor *p = ctx->params[PARAM_PROMPT];
    const int n = (int)p->shape[0], d = (int)p->shape[1], ld = row_stride(ctx->d_out);
    const float *dout = ctx->d_out->data;
    for (int i = 0; i < n; i++)
        for (int j = 0; j < d; j++)
            g[(size_t)i * d + j] += dout[(size_t)i * ld + j];
    return 0;
}

static const pr_ext_peft_config peft_prompt = {
    .struct_size = sizeof(pr_ext_peft_config),
    .read = peft_read_prompt_tuning,
    .write = peft_write_prompt_tuning,
};

static const void *peft_prompt_extension(const char *uri)
{
    return strcmp(uri, PR_EXT_PEFT_CONFIG_URI) ? NULL : &peft_prompt;
}

static const pr_technique prompt_technique = {
    .struct_size = sizeof(pr_technique),
    .abi_major = PR_ABI_MAJOR,
    .name = "prompt_tuning",
    .version = "1.0.0",
    .summary = "Soft prompt: n_tokens trainable vectors prepended to the input embeddings; the "
               "frozen model attends to them as to extra tokens.",
    .citation = "Lester, Al-Rfou, Constant (2021). The Power of Scale for Parameter-Efficient Prompt "
                "Tuning. EMNLP 2021. arXiv:2104.08691",
    .license = "MIT",
    /* PEFT-Ref (arXiv 2304.12410): free vectors (intra none) that reach the
     * model only through attention weights (inter dynamic), new parameters
     * (addition), one prompt for the model (no sharing), living in the
     * embedding space (input: embeddings), prepended once to the sequence. */
    .intra = PR_INTRA_NONE,
    .inter = PR_INTER_DYNAMIC,
    .adaptation = PR_ADAPT_ADDITION,
    .sharing = PR_SHARE_NONE,
    .input = PR_INPUT_EMBEDDINGS,
    .insertion = PR_INSERT_CONCATENATIVE,
    .insertions = PR_INSERTIONS_ONCE,
    .integration = PR_INTEGRATE_CONCAT,
    .workspace = PR_WS_EMBEDDING,
    .options = prompt_options,
    .n_options = N_OPTS,
    .sites = PR_SITE_BIT(PR_SITE_EMBED),
    .default_sites = PR_SITE_BIT(PR_SITE_EMBED),
    .params = prompt_params,
    .n_params = N_PARAMS,
    .n_virtual = "n_tokens",
    .param_formula = "n_tokens * d_model (one insertion, at the embedding)",
    .forward = prompt_forward,
    .backward = prompt_backward,
    /* The module does no arithmetic per token: forward copies the prompt
     * rows once per call; what it costs is the n_tokens extra positions the
     * model itself runs.  The host's default rule would count 2 FLOP per
     * element of the (n_tokens, d_model) prompt for every token. */
    .flops_per_token = "0",
    .peft_type = "PROMPT_TUNING",
    .extension_data = peft_prompt_extension,
};

static const pr_technique *const prompt_techniques[] = { &prompt_technique };

static const pr_plugin prompt_plugin = {
    .struct_size = sizeof(pr_plugin),
    .abi_major = PR_ABI_MAJOR,
    .name = "prompt_tuning",
    .version = "1.0.0",
    .n_techniques = 1,
    .techniques = prompt_techniques,
};

PR_PLUGIN_EXPORT const pr_plugin *peftref_plugin_entry(const pr_entry_args *args)
{
    (void)args; /* a built-in plugin needs none of the host's entry arguments */
    return &prompt_plugin;
}
