/* peftref core: a Hugging Face PEFT adapter directory opened as a saved
 * module (docs/modules.md, "Interoperability").
 *
 * The directory holds adapter_config.json (a PEFT config: peft_type and the
 * type's fields) and adapter_model.safetensors (the state dict under PEFT's
 * keys, the adapter name removed).  Saved modules already use those keys
 * where the technique exists in PEFT (peft_names.c), so opening is a
 * translation of the config into a technique, sites, layers and options;
 * the tensors are then filled exactly as a module file's with PEFT names.
 *
 * Which modules an adapter adapts follows PEFT's rules
 * (peft.tuners.tuners_utils.check_target_module_exists), applied to the
 * base model's own module names ("transformer.h.3.attn.c_attn",
 * "model.layers.3.self_attn.q_proj"):
 *   target_modules a list   a name equal to an entry or ending in "." + entry
 *                           (GPT-2's "c_proj" is attn.c_proj and mlp.c_proj)
 *   target_modules a string a regular expression matching the whole name
 *   exclude_modules         the same rules, taking names out
 *   layers_to_transform     the block index (after layers_pattern, or any
 *                           ".<name>.<index>." in the name) in the list
 *   rank_pattern, alpha_pattern   the first key k (in file order) for which
 *                           "(.*\.)?(k)$" matches the name from its start
 *                           gives that module's r / lora_alpha
 * A peftref module attaches at one set of sites on one set of layers with
 * options per site, so the matched modules must form such a product and the
 * resolved ranks and alphas must not vary along the layers; otherwise the
 * adapter is refused, naming the field.  Regular expressions are POSIX
 * extended ones, which agree with Python's re on the usual patterns
 * (alternation, classes, ".*", escaped dots) but know no \d or (?:...).
 *
 * Fields.  Every field PEFT writes for the type is known: a field at its
 * default, or at a value peftref honours, is accepted; any other value is an
 * error naming the field and the value; an unknown field is an error naming
 * it unless the caller allows unknown fields. */
#include "config.h"

#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <regex.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "peft_adapter.h"

#define CONFIG_NAME "adapter_config.json"
#define WEIGHTS_NAME "adapter_model.safetensors"

int peft_is_adapter_dir(const char *path)
{
    struct stat st;
    char p[4096];
    if (!path || stat(path, &st) != 0 || !S_ISDIR(st.st_mode))
        return 0;
    snprintf(p, sizeof p, "%s/%s", path, CONFIG_NAME);
    return stat(p, &st) == 0 && S_ISREG(st.st_mode);
}

/* ---- what the config says ------------------------------------------------------------------------ */

typedef struct reader {
    const char *dir;
    json_t *root;
    const char *type;
    unsigned flags;
    pr_error *err;
    pr_module_file *f;
} reader;

static const char *keep(pr_module_file *f, const char *s)
{
    char **v = realloc(f->strs, (size_t)(f->n_strs + 1) * sizeof *v);
    if (!v)
        return NULL;
    f->strs = v;
    char *d = strdup(s);
    if (d)
        f->strs[f->n_strs++] = d;
    return d;
}

/* A JSON value as compact text, in buf. */
static const char *json_text(const json_t *v, char *buf, size_t len)
{
    char *s = v ? json_dumps(v, JSON_COMPACT | JSON_ENCODE_ANY) : NULL;
    snprintf(buf, len, "%s", s ? s : "null");
    free(s);
    return buf;
}

static int bad_value(reader *R, const char *field, const json_t *v, const char *why)
{
    char b[256];
    return pr_errorf(R->err, PR_ERR_UNSUPPORTED, "%s/" CONFIG_NAME ": %s = %s is not supported: %s", R->dir, field,
                     json_text(v, b, sizeof b), why);
}

static const json_t *get(const reader *R, const char *field)
{
    const json_t *v = json_object_get(R->root, field);
    return v && !json_is_null(v) ? v : NULL;
}

/* A field absent, null or an empty list or object: its default. */
static int is_empty(const json_t *v)
{
    return !v || json_is_null(v) || (json_is_array(v) && json_array_size(v) == 0) ||
           (json_is_object(v) && json_object_size(v) == 0);
}

/* How a known field's value is checked. */
enum {
    F_INFO = 1,    /* informational, any value (names, versions, modes) */
    F_EMPTY,       /* only its default: absent, null, [] or {} */
    F_FALSE,       /* only false (or absent) */
    F_TRUE,        /* only true (or absent) */
    F_READ,        /* read by the type's own code */
    F_ZERO         /* only 0 (or absent) */
};

typedef struct cfg_field {
    const char *name;
    int check;
    const char *why;   /* F_EMPTY, F_FALSE, F_TRUE: what peftref does instead */
} cfg_field;

/* PeftConfig's own fields, common to every type. */
static const cfg_field common_fields[] = {
    { "peft_type", F_READ, NULL },
    { "task_type", F_READ, NULL },
    { "base_model_name_or_path", F_INFO, NULL },
    { "revision", F_INFO, NULL },
    { "inference_mode", F_INFO, NULL },
    { "auto_mapping", F_INFO, NULL },
    { "peft_version", F_INFO, NULL },
    { "modules_to_save", F_EMPTY, "peftref imports adapters without modules_to_save (a classification head loads "
                                  "through the pipeline's task.head)" },
};

/* LoraConfig (PEFT 0.14 to 0.18). */
static const cfg_field lora_fields[] = {
    { "r", F_READ, NULL }, { "lora_alpha", F_READ, NULL }, { "lora_dropout", F_READ, NULL },
    { "target_modules", F_READ, NULL }, { "exclude_modules", F_READ, NULL },
    { "fan_in_fan_out", F_READ, NULL }, { "bias", F_READ, NULL }, { "use_rslora", F_READ, NULL },
    { "init_lora_weights", F_READ, NULL }, { "layers_to_transform", F_READ, NULL },
    { "layers_pattern", F_READ, NULL }, { "rank_pattern", F_READ, NULL }, { "alpha_pattern", F_READ, NULL },
    { "use_dora", F_READ, NULL },
    { "megatron_config", F_EMPTY, "peftref has no Megatron parallel layers" },
    { "megatron_core", F_INFO, NULL },   /* used only with megatron_config */
    { "loftq_config", F_EMPTY, "LoftQ needs a quantised base model" },
    { "eva_config", F_EMPTY, "EVA initialisation is not offered" },
    { "corda_config", F_EMPTY, "CorDA initialisation is not offered" },
    { "layer_replication", F_EMPTY, "peftref does not replicate layers" },
    { "trainable_token_indices", F_EMPTY, "trainable tokens are a module of their own (trainable_tokens)" },
    { "target_parameters", F_EMPTY, "peftref's lora adapts modules, not bare parameters" },
    { "lora_bias", F_FALSE, "peftref's lora has no bias of its own" },
    { "use_qalora", F_FALSE, "QALoRA needs a quantised base model" },
    { "qalora_group_size", F_INFO, NULL },   /* used only with use_qalora */
    { "alora_invocation_tokens", F_EMPTY, "activated LoRA is not offered" },
    { "arrow_config", F_EMPTY, "Arrow routing is not offered" },
    { "ensure_weight_tying", F_FALSE, "peftref's lora does not adapt tied embeddings" },
    { "runtime_config", F_INFO, NULL },      /* device placement only */
};

/* AdaLoraConfig: LoraConfig's fields (lora_fields) and these. */
static const cfg_field adalora_fields[] = {
    { "target_r", F_READ, NULL }, { "init_r", F_READ, NULL }, { "tinit", F_READ, NULL }, { "tfinal", F_READ, NULL },
    { "deltaT", F_READ, NULL }, { "beta1", F_READ, NULL }, { "beta2", F_READ, NULL },
    { "orth_reg_weight", F_READ, NULL }, { "total_step", F_READ, NULL },
};

static const cfg_field ia3_fields[] = {
    { "target_modules", F_READ, NULL }, { "exclude_modules", F_READ, NULL },
    { "feedforward_modules", F_READ, NULL }, { "fan_in_fan_out", F_READ, NULL },
    { "init_ia3_weights", F_TRUE, "peftref's ia3 starts at ones" },
};

/* PromptTuningConfig and PrefixTuningConfig (PromptLearningConfig's fields). */
static const cfg_field prompt_fields[] = {
    { "num_virtual_tokens", F_READ, NULL }, { "token_dim", F_READ, NULL },
    { "num_transformer_submodules", F_READ, NULL }, { "num_attention_heads", F_READ, NULL },
    { "num_layers", F_READ, NULL }, { "prompt_tuning_init", F_READ, NULL },
    { "prompt_tuning_init_text", F_READ, NULL }, { "tokenizer_name_or_path", F_INFO, NULL },
    { "tokenizer_kwargs", F_INFO, NULL },
};

static const cfg_field prefix_fields[] = {
    { "num_virtual_tokens", F_READ, NULL }, { "token_dim", F_READ, NULL },
    { "num_transformer_submodules", F_READ, NULL }, { "num_attention_heads", F_READ, NULL },
    { "num_layers", F_READ, NULL }, { "encoder_hidden_size", F_INFO, NULL },
    { "prefix_projection", F_FALSE, "the file holds the prefixes themselves (peftref's prefix_tuning_mlp folds "
                                    "its MLP away when saving)" },
};

/* The further types (PEFT 0.17 to 0.20 field sets). */
#define TARGET_FIELDS                                                                                          \
    { "target_modules", F_READ, NULL }, { "exclude_modules", F_READ, NULL },                                  \
        { "layers_to_transform", F_READ, NULL }, { "layers_pattern", F_READ, NULL }

static const cfg_field loha_fields[] = {
    TARGET_FIELDS, { "r", F_READ, NULL }, { "alpha", F_READ, NULL }, { "rank_pattern", F_READ, NULL },
    { "alpha_pattern", F_READ, NULL },
    { "rank_dropout", F_ZERO, "peftref's loha has no rank dropout" },
    { "module_dropout", F_ZERO, "peftref's loha has no module dropout" },
    { "use_effective_conv2d", F_INFO, NULL },   /* convolutions only */
    { "init_weights", F_TRUE, "peftref's loha starts with hada_w2_b at zero, PEFT's true" },
};

static const cfg_field lokr_fields[] = {
    TARGET_FIELDS, { "r", F_READ, NULL }, { "alpha", F_READ, NULL }, { "rank_pattern", F_READ, NULL },
    { "alpha_pattern", F_READ, NULL },
    { "rank_dropout", F_ZERO, "peftref's lokr has no rank dropout" },
    { "module_dropout", F_ZERO, "peftref's lokr has no module dropout" },
    { "use_effective_conv2d", F_INFO, NULL },   /* convolutions only */
    { "decompose_both", F_FALSE, "peftref's lokr keeps lokr_w1 whole (lokr_w1_a / lokr_w1_b are not offered)" },
    { "decompose_factor", F_READ, NULL },
    { "rank_dropout_scale", F_INFO, NULL },     /* used only with rank_dropout */
    { "init_weights", F_TRUE, "peftref's lokr starts with lokr_w1 at zero, PEFT's true" },
};

static const cfg_field vera_fields[] = {
    TARGET_FIELDS, { "r", F_READ, NULL }, { "fan_in_fan_out", F_READ, NULL }, { "bias", F_READ, NULL },
    { "vera_dropout", F_READ, NULL }, { "d_initial", F_READ, NULL },
    { "projection_prng_key", F_INFO, NULL },   /* the projections are in the file */
    { "save_projection", F_TRUE, "peftref cannot regenerate PEFT's vera_A and vera_B from projection_prng_key; "
                                 "save them with the adapter" },
    { "init_weights", F_TRUE, "peftref's vera initialises as PEFT's true" },
};

static const cfg_field oft_fields[] = {
    TARGET_FIELDS, { "r", F_READ, NULL }, { "oft_block_size", F_READ, NULL }, { "fan_in_fan_out", F_READ, NULL },
    { "bias", F_READ, NULL },
    { "module_dropout", F_ZERO, "peftref's oft has no module dropout" },
    { "init_weights", F_TRUE, "peftref's oft starts as the identity, PEFT's true" },
    { "coft", F_FALSE, "constrained OFT is not offered" },
    { "eps", F_INFO, NULL },   /* used only with coft */
    { "block_share", F_FALSE, "peftref's oft has one rotation per block" },
    { "use_cayley_neumann", F_FALSE, "peftref computes the exact Cayley transform (I - S)(I + S)^-1, not PEFT's "
                                     "truncated Neumann series, which gives another rotation" },
    { "num_cayley_neumann_terms", F_INFO, NULL },   /* used only with use_cayley_neumann */
};

static const cfg_field boft_fields[] = {
    TARGET_FIELDS, { "boft_block_size", F_READ, NULL }, { "boft_block_num", F_READ, NULL },
    { "boft_n_butterfly_factor", F_READ, NULL }, { "fan_in_fan_out", F_READ, NULL }, { "bias", F_READ, NULL },
    { "boft_dropout", F_ZERO, "peftref's boft has no multiplicative dropout (blocks replaced by the identity)" },
    { "init_weights", F_TRUE, "peftref's boft starts as the identity (boft_R zeros, boft_s ones), PEFT's true" },
};

static const cfg_field hra_fields[] = {
    TARGET_FIELDS, { "r", F_READ, NULL }, { "init_weights", F_READ, NULL }, { "bias", F_READ, NULL },
    { "apply_GS", F_FALSE, "peftref's hra reflects along the vectors themselves (Gram-Schmidt is not offered)" },
};

static const cfg_field fourierft_fields[] = {
    TARGET_FIELDS, { "n_frequency", F_READ, NULL }, { "n_frequency_pattern", F_READ, NULL },
    { "scaling", F_READ, NULL }, { "random_loc_seed", F_READ, NULL }, { "init_weights", F_READ, NULL },
    { "fan_in_fan_out", F_READ, NULL }, { "bias", F_READ, NULL },
};

/* PromptEncoderConfig: the file holds the encoder's output (PEFT's
 * inference mode uses it as the prompt), so the encoder's shape is
 * informational. */
static const cfg_field ptuning_fields[] = {
    { "num_virtual_tokens", F_READ, NULL }, { "token_dim", F_READ, NULL },
    { "num_transformer_submodules", F_READ, NULL }, { "num_attention_heads", F_READ, NULL },
    { "num_layers", F_READ, NULL }, { "encoder_reparameterization_type", F_READ, NULL },
    { "encoder_hidden_size", F_INFO, NULL }, { "encoder_num_layers", F_INFO, NULL },
    { "encoder_dropout", F_INFO, NULL },
};

static const cfg_field tt_fields[] = {
    { "token_indices", F_READ, NULL }, { "target_modules", F_READ, NULL }, { "init_weights", F_READ, NULL },
};

static const cfg_field *find_field(const cfg_field *t, int n, const char *name)
{
    for (int i = 0; i < n; i++)
        if (!strcmp(t[i].name, name))
            return &t[i];
    return NULL;
}

static int check_fields2(reader *R, const cfg_field *own, int n_own, const cfg_field *own2, int n_own2)
{
    const char *k;
    json_t *v;
    int n_common = (int)(sizeof common_fields / sizeof common_fields[0]);
    json_object_foreach(R->root, k, v) {
        const cfg_field *fd = find_field(common_fields, n_common, k);
        if (!fd)
            fd = find_field(own, n_own, k);
        if (!fd && own2)
            fd = find_field(own2, n_own2, k);
        if (!fd) {
            if (R->flags & PR_MODULE_FILE_ALLOW_UNKNOWN_FIELDS)
                continue;
            return pr_errorf(R->err, PR_ERR_UNSUPPORTED, "%s/" CONFIG_NAME ": unknown field '%s' for peft_type %s "
                             "(allow_unknown_fields: true in the load entry accepts it)", R->dir, k, R->type);
        }
        if (fd->check == F_EMPTY && !is_empty(v))
            return bad_value(R, k, v, fd->why);
        if (fd->check == F_FALSE && !json_is_null(v) && !json_is_false(v))
            return bad_value(R, k, v, fd->why);
        if (fd->check == F_TRUE && !json_is_null(v) && !json_is_true(v))
            return bad_value(R, k, v, fd->why);
        if (fd->check == F_ZERO && !json_is_null(v) && !(json_is_number(v) && json_number_value(v) == 0))
            return bad_value(R, k, v, fd->why);
    }
    return PR_OK;
}

static int check_fields(reader *R, const cfg_field *own, int n_own)
{
    return check_fields2(R, own, n_own, NULL, 0);
}

static int get_int(reader *R, const char *field, int required, long long min, long long *out)
{
    const json_t *v = get(R, field);
    if (!v) {
        if (required)
            return pr_errorf(R->err, PR_ERR_FORMAT, "%s/" CONFIG_NAME ": missing field '%s'", R->dir, field);
        return -1;   /* absent */
    }
    if (!json_is_integer(v) || json_integer_value(v) < min) {
        char b[128];
        return pr_errorf(R->err, PR_ERR_FORMAT, "%s/" CONFIG_NAME ": %s = %s is not an integer >= %lld", R->dir, field,
                         json_text(v, b, sizeof b), min);
    }
    *out = json_integer_value(v);
    return PR_OK;
}

static int get_num(reader *R, const char *field, double def, double *out)
{
    const json_t *v = get(R, field);
    *out = def;
    if (!v)
        return PR_OK;
    if (!json_is_number(v)) {
        char b[128];
        return pr_errorf(R->err, PR_ERR_FORMAT, "%s/" CONFIG_NAME ": %s = %s is not a number", R->dir, field,
                         json_text(v, b, sizeof b));
    }
    *out = json_number_value(v);
    return PR_OK;
}

static int get_bool(reader *R, const char *field, int *out)
{
    const json_t *v = get(R, field);
    *out = 0;
    if (!v)
        return PR_OK;
    if (!json_is_boolean(v)) {
        char b[128];
        return pr_errorf(R->err, PR_ERR_FORMAT, "%s/" CONFIG_NAME ": %s = %s is not true or false", R->dir, field,
                         json_text(v, b, sizeof b));
    }
    *out = json_is_true(v);
    return PR_OK;
}

static int push_opt(reader *R, const char *name, const char *value, int site)
{
    pr_module_file *f = R->f;
    const char *n = keep(f, name), *v = keep(f, value);
    pr_option_setting *o = n && v ? realloc(f->opts, (size_t)(f->n_opts + 1) * sizeof *o) : NULL;
    if (!o)
        return pr_errorf(R->err, PR_ERR_NOMEM, "%s: out of memory", R->dir);
    f->opts = o;
    o[f->n_opts++] = (pr_option_setting){ n, v, site };
    return PR_OK;
}

static int push_num(reader *R, const char *name, double v, int site)
{
    char b[64];
    snprintf(b, sizeof b, "%.17g", v);
    return push_opt(R, name, b, site);
}

/* ---- the base model's modules and PEFT's matching ----------------------------------------------- */

/* A module of the base model as Hugging Face names it. */
typedef struct hf_module {
    char name[160];
    int layer;           /* -1 outside the blocks */
    const char *path;    /* below the layer ("attn.c_attn"), or the whole name outside the blocks */
} hf_module;

static const char *const gpt2_block_paths[] = { "", "ln_1", "attn", "attn.c_attn", "attn.c_proj", "ln_2", "mlp",
                                                "mlp.c_fc", "mlp.c_proj", "mlp.act" };
static const char *const gpt2_top[] = { "transformer", "transformer.wte", "transformer.wpe", "transformer.h",
                                        "transformer.ln_f", "lm_head" };
static const char *const llama_block_paths[] = { "", "input_layernorm", "self_attn", "self_attn.q_proj",
                                                 "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                                 "post_attention_layernorm", "mlp", "mlp.gate_proj", "mlp.up_proj",
                                                 "mlp.down_proj", "mlp.act_fn" };
static const char *const llama_top[] = { "model", "model.embed_tokens", "model.layers", "model.norm",
                                         "model.rotary_emb", "lm_head" };
#define NELEM(a) ((int)(sizeof(a) / sizeof((a)[0])))

static hf_module *list_modules(const pr_model_config *c, int *n)
{
    int gpt2 = c->family == PR_FAMILY_GPT2;
    const char *const *bp = gpt2 ? gpt2_block_paths : llama_block_paths;
    const char *const *top = gpt2 ? gpt2_top : llama_top;
    int nb = gpt2 ? NELEM(gpt2_block_paths) : NELEM(llama_block_paths), nt = gpt2 ? NELEM(gpt2_top) : NELEM(llama_top);
    hf_module *m = calloc((size_t)(nt + nb * c->n_layers), sizeof *m);
    if (!m)
        return NULL;
    int k = 0;
    for (int i = 0; i < nt; i++, k++) {
        snprintf(m[k].name, sizeof m[k].name, "%s", top[i]);
        m[k].layer = -1;
        m[k].path = top[i];
    }
    for (int l = 0; l < c->n_layers; l++)
        for (int i = 0; i < nb; i++, k++) {
            snprintf(m[k].name, sizeof m[k].name, "%s.%d%s%s", peft_blocks_path(c), l, *bp[i] ? "." : "", bp[i]);
            m[k].layer = l;
            m[k].path = bp[i];
        }
    *n = k;
    return m;
}

/* Python's re.fullmatch(pattern, s) (anchor: "^(%s)$") or re.match(rf"(.*\.)?({key})$", s)
 * (anchor "^(.*\\.)?(%s)$"), with POSIX extended syntax; -1 when pattern
 * does not compile. */
static int regex_match(const char *anchor, const char *pattern, const char *s)
{
    size_t len = strlen(anchor) + strlen(pattern) + 1;
    char *full = malloc(len);
    if (!full)
        return -1;
    snprintf(full, len, anchor, pattern);
    regex_t re;
    int rc = regcomp(&re, full, REG_EXTENDED | REG_NOSUB);
    free(full);
    if (rc)
        return -1;
    rc = regexec(&re, s, 0, NULL, 0) == 0;
    regfree(&re);
    return rc;
}

/* PEFT's target_modules / exclude_modules / feedforward_modules test on a
 * module name: 1 matches, 0 not, -1 bad pattern (after an error). */
static int names_match(reader *R, const char *field, const json_t *v, const char *name)
{
    if (json_is_string(v)) {
        int m = regex_match("^(%s)$", json_string_value(v), name);
        if (m < 0)
            return bad_value(R, field, v, "not a POSIX extended regular expression"), -1;
        return m;
    }
    size_t i, nlen = strlen(name);
    json_t *e;
    json_array_foreach(v, i, e) {
        const char *t = json_string_value(e);
        size_t tl = t ? strlen(t) : 0;
        if (!t)
            continue;
        if (!strcmp(name, t) || (nlen > tl && name[nlen - tl - 1] == '.' && !strcmp(name + nlen - tl, t)))
            return 1;
    }
    return 0;
}

static int check_name_list(reader *R, const char *field, const json_t *v, int required)
{
    if (!v) {
        if (required)
            return pr_errorf(R->err, PR_ERR_UNSUPPORTED, "%s/" CONFIG_NAME ": %s is missing or null: peftref does "
                             "not guess PEFT's per-model defaults; name the modules", R->dir, field);
        return PR_OK;
    }
    if (json_is_string(v))
        return PR_OK;
    if (json_is_array(v)) {
        size_t i;
        json_t *e;
        json_array_foreach(v, i, e)
            if (!json_is_string(e))
                return bad_value(R, field, v, "expected a list of module names or one regular expression");
        return PR_OK;
    }
    return bad_value(R, field, v, "expected a list of module names or one regular expression");
}

/* The layers_to_transform list (NULL: every layer), as a mask over layers. */
static int read_layers(reader *R, const pr_model_config *c, unsigned char *want, int *restricted)
{
    const json_t *v = get(R, "layers_to_transform");
    *restricted = v != NULL;
    for (int l = 0; l < c->n_layers; l++)
        want[l] = !v;
    if (!v)
        return PR_OK;
    if (json_is_integer(v)) {
        long long l = json_integer_value(v);
        if (l < 0 || l >= c->n_layers)
            return bad_value(R, "layers_to_transform", v, "the base model has fewer layers");
        want[l] = 1;
    } else if (json_is_array(v)) {
        size_t i;
        json_t *e;
        json_array_foreach(v, i, e) {
            long long l = json_is_integer(e) ? json_integer_value(e) : -1;
            if (l < 0 || l >= c->n_layers)
                return bad_value(R, "layers_to_transform", v, "a layer index of the base model was expected");
            want[l] = 1;
        }
    } else {
        return bad_value(R, "layers_to_transform", v, "expected a layer index or a list of them");
    }
    const json_t *p = get(R, "layers_pattern");
    const char *own = c->family == PR_FAMILY_GPT2 ? "h" : "layers";
    if (p && !(json_is_string(p) && !strcmp(json_string_value(p), own)) &&
        !(json_is_array(p) && json_array_size(p) == 1 && json_is_string(json_array_get(p, 0)) &&
          !strcmp(json_string_value(json_array_get(p, 0)), own))) {
        char why[96];
        snprintf(why, sizeof why, "this model's blocks are '%s'", own);
        return bad_value(R, "layers_pattern", p, why);
    }
    return PR_OK;
}

/* What a matched module becomes: the site(s) of the technique class. */
typedef int (*site_of_fn)(reader *R, const pr_model_config *c, const hf_module *m, uint32_t *sites);

static int lora_site_of(reader *R, const pr_model_config *c, const hf_module *m, uint32_t *sites)
{
    (void)R;
    static const int cand[] = { PR_SITE_QKV, PR_SITE_Q, PR_SITE_K, PR_SITE_V, PR_SITE_O, PR_SITE_FFN_UP,
                                PR_SITE_FFN_GATE, PR_SITE_FFN_DOWN };
    for (int i = 0; m->layer >= 0 && i < NELEM(cand); i++) {
        const char *p = peft_site_path(c, cand[i]);
        if (p && !strcmp(p, m->path)) {
            *sites = PR_SITE_BIT(cand[i]);
            return 1;
        }
    }
    return 0;
}

static int ia3_site_of(reader *R, const pr_model_config *c, const hf_module *m, uint32_t *sites)
{
    const json_t *ff = get(R, "feedforward_modules");
    int is_ff = ff ? names_match(R, "feedforward_modules", ff, m->name) : 0;
    if (is_ff < 0 || m->layer < 0)
        return is_ff < 0 ? -1 : 0;
    const char *down = peft_site_path(c, PR_SITE_FFN_DOWN);
    if (is_ff)
        return !strcmp(m->path, down) ? (*sites = PR_SITE_BIT(PR_SITE_FFN_ACT), 1) : 0;
    if (c->family == PR_FAMILY_GPT2 && c->fused_qkv && !strcmp(m->path, peft_site_path(c, PR_SITE_QKV))) {
        *sites = PR_SITE_BIT(PR_SITE_ATTN_K) | PR_SITE_BIT(PR_SITE_ATTN_V);
        return 1;
    }
    for (int s = PR_SITE_K; s <= PR_SITE_V; s++) {
        const char *p = peft_site_path(c, s);
        if (p && !strcmp(p, m->path)) {
            *sites = PR_SITE_BIT(s);
            return 1;
        }
    }
    return 0;
}

/* The modules target_modules (less exclude_modules, within
 * layers_to_transform) selects: sites and layers, which must form a
 * product.  matched[k] says which of mods did. */
static int match_modules(reader *R, const pr_model_config *c, const char *tech, site_of_fn site_of,
                         const hf_module *mods, int n, unsigned char *matched, uint32_t *sites_out,
                         unsigned char *layers_out)
{
    const json_t *tm = get(R, "target_modules"), *ex = get(R, "exclude_modules");
    int rc = check_name_list(R, "target_modules", tm, 1);
    if (!rc)
        rc = check_name_list(R, "exclude_modules", ex, 0);
    if (rc)
        return rc;
    unsigned char *want = calloc((size_t)c->n_layers + 1, 1);
    uint32_t *per_layer = calloc((size_t)c->n_layers + 1, sizeof *per_layer);
    if (!want || !per_layer) {
        free(want);
        free(per_layer);
        return pr_errorf(R->err, PR_ERR_NOMEM, "%s: out of memory", R->dir);
    }
    int restricted = 0;
    rc = read_layers(R, c, want, &restricted);
    int all_linear = json_is_string(tm) && !strcmp(json_string_value(tm), "all-linear");
    uint32_t sites = 0;
    for (int k = 0; k < n && !rc; k++) {
        const hf_module *m = &mods[k];
        matched[k] = 0;
        int hit;
        if (all_linear) {   /* PEFT: every linear layer but the output head */
            uint32_t s;
            hit = m->layer >= 0 && lora_site_of(R, c, m, &s) == 1;
        } else {
            hit = names_match(R, "target_modules", tm, m->name);
        }
        if (hit > 0 && ex)
            hit = names_match(R, "exclude_modules", ex, m->name) > 0 ? 0 : hit;
        if (hit < 0) {
            rc = PR_ERR_UNSUPPORTED;
            break;
        }
        if (!hit || (restricted && (m->layer < 0 || !want[m->layer])))
            continue;
        uint32_t s = 0;
        int ok = site_of(R, c, m, &s);
        if (ok < 0) {
            rc = PR_ERR_UNSUPPORTED;
            break;
        }
        if (!ok) {
            char b[256];
            rc = pr_errorf(R->err, PR_ERR_UNSUPPORTED, "%s/" CONFIG_NAME ": target_modules = %s selects '%s', where "
                           "peftref's %s cannot attach", R->dir, json_text(tm, b, sizeof b), m->name, tech);
            break;
        }
        matched[k] = 1;
        per_layer[m->layer] |= s;
        sites |= s;
    }
    if (!rc && !sites) {
        char b[256];
        rc = pr_errorf(R->err, PR_ERR_INVALID, "%s/" CONFIG_NAME ": target_modules = %s selects no module of this "
                       "%s base model (is the adapter for another model?)", R->dir, json_text(tm, b, sizeof b),
                       c->family == PR_FAMILY_GPT2 ? "GPT-2" : "LLaMA-family");
    }
    for (int l = 0; l < c->n_layers && !rc; l++) {
        layers_out[l] = per_layer[l] != 0;
        if (per_layer[l] && per_layer[l] != sites) {
            char b[256];
            rc = pr_errorf(R->err, PR_ERR_UNSUPPORTED, "%s/" CONFIG_NAME ": target_modules = %s selects other modules "
                           "on layer %d than on others; a peftref module uses the same sites on every layer it "
                           "adapts", R->dir, json_text(tm, b, sizeof b), l);
        }
    }
    *sites_out = sites;
    free(want);
    free(per_layer);
    return rc;
}

/* The site of module m's kind, for the per-site options. */
static int site_index(uint32_t bits)
{
    for (int s = 0; s < PR_SITE_COUNT; s++)
        if (bits & PR_SITE_BIT(s))
            return s;
    return -1;
}

/* rank_pattern / alpha_pattern for module name: the first key whose
 * "(.*\.)?(key)$" matches; 0 none, 1 found (*v), -1 error. */
static int pattern_value(reader *R, const char *field, const char *name, double *v)
{
    const json_t *p = get(R, field);
    if (!p)
        return 0;
    if (!json_is_object(p))
        return bad_value(R, field, p, "expected an object of module patterns"), -1;
    const char *k;
    json_t *e;
    json_object_foreach((json_t *)p, k, e) {
        int m = regex_match("^(.*\\.)?(%s)$", k, name);
        if (m < 0) {
            pr_errorf(R->err, PR_ERR_UNSUPPORTED, "%s/" CONFIG_NAME ": %s key '%s' is not a POSIX extended regular "
                      "expression", R->dir, field, k);
            return -1;
        }
        if (!m)
            continue;
        if (!json_is_number(e)) {
            char b[64];
            pr_errorf(R->err, PR_ERR_FORMAT, "%s/" CONFIG_NAME ": %s.%s = %s is not a number", R->dir, field, k,
                      json_text(e, b, sizeof b));
            return -1;
        }
        *v = json_number_value(e);
        return 1;
    }
    return 0;
}

static int set_sites_layers(reader *R, const pr_model_config *c, uint32_t sites, const unsigned char *layers)
{
    pr_module_file *f = R->f;
    f->sites = sites;
    int n = 0;
    for (int l = 0; l < c->n_layers; l++)
        n += layers[l];
    f->all_layers = n == c->n_layers;
    if (f->all_layers)
        return PR_OK;
    f->layers = malloc((size_t)n * sizeof *f->layers);
    if (!f->layers)
        return pr_errorf(R->err, PR_ERR_NOMEM, "%s: out of memory", R->dir);
    f->n_layers = 0;
    for (int l = 0; l < c->n_layers; l++)
        if (layers[l])
            f->layers[f->n_layers++] = l;
    return PR_OK;
}

static int check_fan_in_fan_out(reader *R, const pr_model_config *c)
{
    const json_t *v = get(R, "fan_in_fan_out");
    if (!v || json_is_false(v))
        return PR_OK;
    /* PEFT sets it for GPT-2's Conv1D itself; an nn.Linear model's weights are [out, in] */
    if (json_is_true(v) && c->family == PR_FAMILY_GPT2)
        return PR_OK;
    return bad_value(R, "fan_in_fan_out", v, "the LLaMA family's projections are nn.Linear [out, in]");
}

/* ---- the types --------------------------------------------------------------------------------- */

static int open_lora(reader *R, const pr_model_config *c, const pr_registry *reg)
{
    int rc = check_fields(R, lora_fields, NELEM(lora_fields));
    if (rc)
        return rc;
    int dora = 0, rslora = 0;
    if ((rc = get_bool(R, "use_dora", &dora)) || (rc = get_bool(R, "use_rslora", &rslora)) ||
        (rc = check_fan_in_fan_out(R, c)))
        return rc;
    const json_t *bias = get(R, "bias");
    if (bias && !(json_is_string(bias) && !strcmp(json_string_value(bias), "none")))
        return bad_value(R, "bias", bias, "peftref's lora trains no biases (BitFit is a module of its own)");
    const char *tech = dora ? "dora" : "lora";
    const pr_technique *t = pr_registry_find(reg, tech);
    if (!t)
        return pr_errorf(R->err, PR_ERR_NOTFOUND, "%s: technique '%s' is not installed (peftref plugins lists the "
                         "techniques found)", R->dir, tech);
    R->f->t = t;
    long long r;
    double alpha, dropout;
    if ((rc = get_int(R, "r", 0, 1, &r)) > PR_OK)
        return rc;
    if (rc < 0)
        r = 8;
    if ((rc = get_num(R, "lora_alpha", 8, &alpha)) || (rc = get_num(R, "lora_dropout", 0, &dropout)))
        return rc;
    const json_t *init = json_object_get(R->root, "init_lora_weights");
    const char *init_name = "true";
    if (init && json_is_false(init))
        init_name = "false";
    else if (init && json_is_string(init) &&
             (!strcmp(json_string_value(init), "gaussian") || !strcmp(json_string_value(init), "pissa") ||
              !strcmp(json_string_value(init), "olora")))
        init_name = json_string_value(init);
    else if (init && !json_is_null(init) && !json_is_true(init))
        return bad_value(R, "init_lora_weights", init, "peftref's lora offers true, false, gaussian, pissa and olora");
    if (dora && strcmp(init_name, "true"))
        return bad_value(R, "init_lora_weights", init, "peftref's dora initialises as PEFT's true");
    int n = 0;
    hf_module *mods = list_modules(c, &n);
    unsigned char *matched = mods ? calloc((size_t)n, 1) : NULL, *layers = calloc((size_t)c->n_layers + 1, 1);
    if (!mods || !matched || !layers) {
        free(mods);
        free(matched);
        free(layers);
        return pr_errorf(R->err, PR_ERR_NOMEM, "%s: out of memory", R->dir);
    }
    uint32_t sites = 0;
    rc = match_modules(R, c, tech, lora_site_of, mods, n, matched, &sites, layers);
    /* per-site rank and alpha: every layer's module of a site must agree */
    double site_r[PR_SITE_COUNT], site_a[PR_SITE_COUNT];
    const char *site_first[PR_SITE_COUNT] = { 0 };
    for (int k = 0; k < n && !rc; k++) {
        if (!matched[k])
            continue;
        uint32_t bits = 0;
        lora_site_of(R, c, &mods[k], &bits);
        int s = site_index(bits);
        double rv = (double)r, av = alpha;
        if (pattern_value(R, "rank_pattern", mods[k].name, &rv) < 0 ||
            pattern_value(R, "alpha_pattern", mods[k].name, &av) < 0) {
            rc = PR_ERR_UNSUPPORTED;
            break;
        }
        if (rv < 1 || rv != floor(rv)) {
            rc = pr_errorf(R->err, PR_ERR_UNSUPPORTED, "%s/" CONFIG_NAME ": rank_pattern gives '%s' rank %g, not a "
                           "positive integer", R->dir, mods[k].name, rv);
            break;
        }
        if (!site_first[s]) {
            site_first[s] = mods[k].name;
            site_r[s] = rv;
            site_a[s] = av;
        } else if (site_r[s] != rv || site_a[s] != av) {
            const char *fld = site_r[s] != rv ? "rank_pattern" : "alpha_pattern";
            char b[256];
            rc = pr_errorf(R->err, PR_ERR_UNSUPPORTED, "%s/" CONFIG_NAME ": %s = %s gives '%s' %s %g but '%s' %g; "
                           "peftref's ranks and alphas are per site, the same on every layer", R->dir, fld,
                           json_text(get(R, fld), b, sizeof b), site_first[s], site_r[s] != rv ? "rank" : "alpha",
                           site_r[s] != rv ? site_r[s] : site_a[s], mods[k].name, site_r[s] != rv ? rv : av);
        }
    }
    free(mods);
    free(matched);
    if (!rc)
        rc = set_sites_layers(R, c, sites, layers);
    free(layers);
    if (rc)
        return rc;
    if ((rc = push_num(R, "r", (double)r, -1)) || (rc = push_num(R, "alpha", alpha, -1)) ||
        (rc = push_num(R, "dropout", dropout, -1)) || (rc = push_opt(R, "use_rslora", rslora ? "true" : "false", -1)))
        return rc;
    if (!dora && (rc = push_opt(R, "init_lora_weights", init_name, -1)))
        return rc;
    for (int s = 0; s < PR_SITE_COUNT && !rc; s++) {
        if (!site_first[s])
            continue;
        if (site_r[s] != (double)r)
            rc = push_num(R, "r", site_r[s], s);
        if (!rc && site_a[s] != alpha)
            rc = push_num(R, "alpha", site_a[s], s);
    }
    return rc;
}

static int open_ia3(reader *R, const pr_model_config *c, const pr_registry *reg)
{
    int rc = check_fields(R, ia3_fields, NELEM(ia3_fields));
    if (rc || (rc = check_fan_in_fan_out(R, c)))
        return rc;
    const pr_technique *t = pr_registry_find(reg, "ia3");
    if (!t)
        return pr_errorf(R->err, PR_ERR_NOTFOUND, "%s: technique 'ia3' is not installed (peftref plugins lists the "
                         "techniques found)", R->dir);
    R->f->t = t;
    const json_t *ff = get(R, "feedforward_modules");
    if ((rc = check_name_list(R, "feedforward_modules", ff, 0)))
        return rc;
    int n = 0;
    hf_module *mods = list_modules(c, &n);
    unsigned char *matched = mods ? calloc((size_t)n, 1) : NULL, *layers = calloc((size_t)c->n_layers + 1, 1);
    if (!mods || !matched || !layers) {
        free(mods);
        free(matched);
        free(layers);
        return pr_errorf(R->err, PR_ERR_NOMEM, "%s: out of memory", R->dir);
    }
    uint32_t sites = 0;
    rc = match_modules(R, c, "ia3", ia3_site_of, mods, n, matched, &sites, layers);
    free(mods);
    free(matched);
    if (!rc)
        rc = set_sites_layers(R, c, sites, layers);
    free(layers);
    return rc;
}

/* ---- the further weight types ------------------------------------------------------------------ */

static int need_technique(reader *R, const pr_registry *reg, const char *tech)
{
    const pr_technique *t = pr_registry_find(reg, tech);
    if (!t)
        return pr_errorf(R->err, PR_ERR_NOTFOUND, "%s: technique '%s' is not installed (peftref plugins lists the "
                         "techniques found)", R->dir, tech);
    R->f->t = t;
    return PR_OK;
}

static int check_bias(reader *R, const char *tech)
{
    const json_t *bias = get(R, "bias");
    if (bias && !(json_is_string(bias) && !strcmp(json_string_value(bias), "none"))) {
        char why[128];
        snprintf(why, sizeof why, "peftref's %s trains no biases (BitFit is a module of its own)", tech);
        return bad_value(R, "bias", bias, why);
    }
    return PR_OK;
}

/* PEFT's LoHa, LoKr, OFT, BOFT and HRA adapt torch.nn.Linear (and convolutions),
 * not transformers' Conv1D: such an adapter is never for GPT-2. */
static int linear_only(reader *R, const pr_model_config *c)
{
    if (c->family != PR_FAMILY_GPT2)
        return PR_OK;
    return pr_errorf(R->err, PR_ERR_INVALID, "%s/" CONFIG_NAME ": peft_type %s adapts torch.nn.Linear layers, and "
                     "this GPT-2 base model's projections are Conv1D, which PEFT's %s refuses (is the adapter for "
                     "another model?)", R->dir, R->type, R->type);
}

/* A *_pattern field giving a per-site option. */
typedef struct site_pattern {
    const char *field, *opt;
    double def;          /* the module's value */
    int integer;         /* the value must be a positive integer */
} site_pattern;

/* target_modules etc. matched as for LoRA (projection modules), and the
 * *_pattern fields resolved per module: they must agree along the layers
 * of a site; values that differ from the module's become site options. */
static int open_targets(reader *R, const pr_model_config *c, const char *tech, const site_pattern *pats, int n_pats)
{
    int n = 0;
    hf_module *mods = list_modules(c, &n);
    unsigned char *matched = mods ? calloc((size_t)n, 1) : NULL, *layers = calloc((size_t)c->n_layers + 1, 1);
    double(*val)[4] = calloc(PR_SITE_COUNT, sizeof *val);
    const char **first = calloc(PR_SITE_COUNT, sizeof *first);
    int rc = PR_OK;
    if (!mods || !matched || !layers || !val || !first || n_pats > 4)
        rc = pr_errorf(R->err, PR_ERR_NOMEM, "%s: out of memory", R->dir);
    uint32_t sites = 0;
    if (!rc)
        rc = match_modules(R, c, tech, lora_site_of, mods, n, matched, &sites, layers);
    for (int k = 0; k < n && !rc; k++) {
        uint32_t bits = 0;
        if (!matched[k] || lora_site_of(R, c, &mods[k], &bits) != 1)
            continue;
        int s = site_index(bits);
        for (int q = 0; q < n_pats && !rc; q++) {
            double v = pats[q].def;
            if (pattern_value(R, pats[q].field, mods[k].name, &v) < 0) {
                rc = PR_ERR_UNSUPPORTED;
                break;
            }
            if (pats[q].integer && (v < 1 || v != floor(v))) {
                rc = pr_errorf(R->err, PR_ERR_UNSUPPORTED, "%s/" CONFIG_NAME ": %s gives '%s' %g, not a positive "
                               "integer", R->dir, pats[q].field, mods[k].name, v);
                break;
            }
            if (!first[s]) {
                val[s][q] = v;
            } else if (val[s][q] != v) {
                char b[256];
                rc = pr_errorf(R->err, PR_ERR_UNSUPPORTED, "%s/" CONFIG_NAME ": %s = %s gives '%s' %g but '%s' %g; "
                               "peftref's %s is per site, the same on every layer", R->dir, pats[q].field,
                               json_text(get(R, pats[q].field), b, sizeof b), first[s], val[s][q], mods[k].name, v,
                               pats[q].opt);
            }
        }
        if (!first[s])
            first[s] = mods[k].name;
    }
    if (!rc)
        rc = set_sites_layers(R, c, sites, layers);
    for (int s = 0; s < PR_SITE_COUNT && !rc; s++)
        for (int q = 0; first[s] && q < n_pats && !rc; q++)
            if (val[s][q] != pats[q].def)
                rc = push_num(R, pats[q].opt, val[s][q], s);
    free(mods);
    free(matched);
    free(layers);
    free(val);
    free(first);
    return rc;
}

static int num_field(reader *R, const char *field, double def, double min, double *out)
{
    int rc = get_num(R, field, def, out);
    if (!rc && *out < min) {
        char why[64];
        snprintf(why, sizeof why, "expected a value >= %g", min);
        return bad_value(R, field, get(R, field), why);
    }
    return rc;
}

static int bool_field(reader *R, const char *field, int def, const char *opt)
{
    int v = def, rc = PR_OK;
    if (get(R, field))
        rc = get_bool(R, field, &v);
    return rc ? rc : push_opt(R, opt, v ? "true" : "false", -1);
}

/* Tensors PEFT makes in branches peftref's lokr does not take. */
static int lokr_tensors(reader *R)
{
    for (int i = 0; i < st_count(R->f->st); i++) {
        const char *nm = st_tensor_at(R->f->st, i)->name;
        const char *d = strrchr(nm, '.');
        if (d && (!strcmp(d, ".lokr_w2") || !strcmp(d, ".lokr_w1_a") || !strcmp(d, ".lokr_w1_b") ||
                  !strcmp(d, ".lokr_t2")))
            return pr_errorf(R->err, PR_ERR_UNSUPPORTED, "%s/" WEIGHTS_NAME ": tensor '%s' is PEFT's %s, which "
                             "peftref's lokr does not have (it keeps lokr_w1 whole and lokr_w2 as lokr_w2_a . "
                             "lokr_w2_b, PEFT's choice for r < max(k, n) / 2)", R->dir, nm, d + 1);
    }
    return PR_OK;
}

static int open_weight_type(reader *R, const pr_model_config *c, const pr_registry *reg)
{
    const char *T = R->type;
    int rc;
    double r, alpha, v;
    if (!strcmp(T, "LOHA") || !strcmp(T, "LOKR")) {
        int lokr = !strcmp(T, "LOKR");
        const char *tech = lokr ? "lokr" : "loha";
        if ((rc = lokr ? check_fields(R, lokr_fields, NELEM(lokr_fields)) : check_fields(R, loha_fields,
                                                                                         NELEM(loha_fields))) ||
            (rc = linear_only(R, c)) || (rc = need_technique(R, reg, tech)))
            return rc;
        if (lokr) {
            long long f;
            if ((rc = get_int(R, "decompose_factor", 0, -1000000, &f)) > PR_OK)
                return rc;
            if (rc == PR_OK && f != -1)
                return bad_value(R, "decompose_factor", get(R, "decompose_factor"),
                                 "peftref's lokr factors each width near its square root (-1)");
            if ((rc = lokr_tensors(R)))
                return rc;
        }
        if ((rc = num_field(R, "r", 8, 1, &r)) || (rc = num_field(R, "alpha", 8, 0, &alpha)))
            return rc;
        if (r != floor(r))
            return bad_value(R, "r", get(R, "r"), "expected an integer");
        site_pattern pats[] = { { "rank_pattern", "r", r, 1 }, { "alpha_pattern", "alpha", alpha, 0 } };
        if ((rc = push_num(R, "r", r, -1)) || (rc = push_num(R, "alpha", alpha, -1)))
            return rc;
        return open_targets(R, c, tech, pats, NELEM(pats));
    }
    if (!strcmp(T, "VERA")) {
        double dropout, d_initial;
        if ((rc = check_fields(R, vera_fields, NELEM(vera_fields))) || (rc = check_fan_in_fan_out(R, c)) ||
            (rc = check_bias(R, "vera")) || (rc = need_technique(R, reg, "vera")) ||
            (rc = num_field(R, "r", 256, 1, &r)) || (rc = num_field(R, "vera_dropout", 0, 0, &dropout)) ||
            (rc = get_num(R, "d_initial", 0.1, &d_initial)))
            return rc;
        if ((rc = push_num(R, "r", r, -1)) || (rc = push_num(R, "dropout", dropout, -1)) ||
            (rc = push_num(R, "d_initial", d_initial, -1)) || (rc = push_opt(R, "save_projection", "true", -1)))
            return rc;
        return open_targets(R, c, "vera", NULL, 0);
    }
    if (!strcmp(T, "OFT")) {
        double bs;
        if ((rc = check_fields(R, oft_fields, NELEM(oft_fields))) || (rc = linear_only(R, c)) ||
            (rc = check_fan_in_fan_out(R, c)) || (rc = check_bias(R, "oft")) ||
            (rc = need_technique(R, reg, "oft")) || (rc = num_field(R, "r", 0, 0, &r)) ||
            (rc = num_field(R, "oft_block_size", 32, 0, &bs)))
            return rc;
        if ((r == 0) == (bs == 0))
            return bad_value(R, r ? "r" : "oft_block_size", get(R, r ? "r" : "oft_block_size"),
                             "PEFT's OFT takes exactly one of r and oft_block_size non-zero");
        if ((rc = push_num(R, "r", r, -1)) || (rc = push_num(R, "oft_block_size", bs, -1)))
            return rc;
        return open_targets(R, c, "oft", NULL, 0);
    }
    if (!strcmp(T, "BOFT")) {
        double bs, bn, m;
        if ((rc = check_fields(R, boft_fields, NELEM(boft_fields))) || (rc = linear_only(R, c)) ||
            (rc = check_fan_in_fan_out(R, c)) || (rc = check_bias(R, "boft")) ||
            (rc = need_technique(R, reg, "boft")) || (rc = num_field(R, "boft_block_size", 4, 0, &bs)) ||
            (rc = num_field(R, "boft_block_num", 0, 0, &bn)) ||
            (rc = num_field(R, "boft_n_butterfly_factor", 1, 1, &m)))
            return rc;
        if ((bs == 0) == (bn == 0))
            return bad_value(R, bs ? "boft_block_size" : "boft_block_num", get(R, bs ? "boft_block_size" : "boft_block_num"),
                             "PEFT's BOFT takes exactly one of boft_block_size and boft_block_num non-zero");
        if ((rc = push_num(R, "boft_block_size", bs, -1)) || (rc = push_num(R, "boft_block_num", bn, -1)) ||
            (rc = push_num(R, "boft_n_butterfly_factor", m, -1)))
            return rc;
        return open_targets(R, c, "boft", NULL, 0);
    }
    if (!strcmp(T, "HRA")) {
        if ((rc = check_fields(R, hra_fields, NELEM(hra_fields))) || (rc = linear_only(R, c)) ||
            (rc = check_bias(R, "hra")) || (rc = need_technique(R, reg, "hra")) ||
            (rc = num_field(R, "r", 8, 1, &r)) || (rc = push_num(R, "r", r, -1)) ||
            (rc = bool_field(R, "init_weights", 1, "init_weights")))
            return rc;
        return open_targets(R, c, "hra", NULL, 0);
    }
    /* FOURIERFT */
    double scaling;
    if ((rc = check_fields(R, fourierft_fields, NELEM(fourierft_fields))) || (rc = check_fan_in_fan_out(R, c)) ||
        (rc = check_bias(R, "fourierft")) || (rc = need_technique(R, reg, "fourierft")) ||
        (rc = num_field(R, "n_frequency", 1000, 1, &v)) || (rc = num_field(R, "scaling", 150, 0, &scaling)) ||
        (rc = num_field(R, "random_loc_seed", 777, 0, &r)))
        return rc;
    if (r != floor(r) || r > 4294967295.0)
        return bad_value(R, "random_loc_seed", get(R, "random_loc_seed"), "expected a seed in 0 .. 2^32 - 1");
    site_pattern pats[] = { { "n_frequency_pattern", "n_frequency", v, 1 } };
    if ((rc = push_num(R, "n_frequency", v, -1)) || (rc = push_num(R, "scaling", scaling, -1)) ||
        (rc = push_num(R, "random_loc_seed", r, -1)) || (rc = bool_field(R, "init_weights", 0, "init_weights")) ||
        (rc = push_opt(R, "ifft2_norm", "backward", -1)))
        return rc;
    return open_targets(R, c, "fourierft", pats, NELEM(pats));
}

/* TRAINABLE_TOKENS: rows of the token embedding. */
static int open_trainable_tokens(reader *R, const pr_model_config *c, const pr_registry *reg)
{
    int rc = check_fields(R, tt_fields, NELEM(tt_fields));
    if (rc || (rc = need_technique(R, reg, "trainable_tokens")))
        return rc;
    if (c->tied_head)
        return pr_errorf(R->err, PR_ERR_UNSUPPORTED, "%s/" CONFIG_NAME ": the base model ties its output head to "
                         "the token embedding; PEFT's TRAINABLE_TOKENS then replaces the head's rows too, and "
                         "peftref's trainable_tokens replaces the input rows only", R->dir);
    const char *embed = c->family == PR_FAMILY_GPT2 ? "transformer.wte" : "model.embed_tokens";
    const json_t *tm = get(R, "target_modules");
    if (tm && (rc = check_name_list(R, "target_modules", tm, 0)))
        return rc;
    int hit = tm ? names_match(R, "target_modules", tm, embed) : 1;
    if (hit < 0)
        return PR_ERR_UNSUPPORTED;
    if (!hit)
        return bad_value(R, "target_modules", tm, "peftref's trainable_tokens works on the token embedding only");
    const json_t *ids = get(R, "token_indices");
    if (!ids || !json_is_array(ids) || json_array_size(ids) == 0)
        return bad_value(R, "token_indices", ids, "expected a non-empty list of token ids");
    size_t i, len = 0, cap = 16 * json_array_size(ids) + 1;
    char *text = malloc(cap);
    if (!text)
        return pr_errorf(R->err, PR_ERR_NOMEM, "%s: out of memory", R->dir);
    json_t *e;
    json_array_foreach(ids, i, e) {
        long long id = json_is_integer(e) ? json_integer_value(e) : -1;
        if (id < 0 || id >= c->vocab_size) {
            free(text);
            char why[96];
            snprintf(why, sizeof why, "expected token ids below the vocabulary size %d", c->vocab_size);
            return bad_value(R, "token_indices", ids, why);
        }
        len += (size_t)snprintf(text + len, cap - len, "%s%lld", i ? ", " : "", id);
    }
    rc = push_opt(R, "token_indices", text, -1);
    free(text);
    if (rc || (rc = push_num(R, "n_token_indices", (double)json_array_size(ids), -1)) ||
        (rc = bool_field(R, "init_weights", 1, "init_weights")))
        return rc;
    R->f->sites = PR_SITE_BIT(PR_SITE_EMBED);
    R->f->all_layers = 1;
    return PR_OK;
}

/* The PromptLearningConfig fields every prompt type checks against the base. */
static int check_prompt_shape(reader *R, const pr_model_config *c, int64_t token_dim, const char *token_dim_is,
                              int heads_ok_a, int heads_ok_b)
{
    long long v;
    int rc;
    if ((rc = get_int(R, "token_dim", 0, 1, &v)) > PR_OK)
        return rc;
    if (rc == PR_OK && v != token_dim)
        return pr_errorf(R->err, PR_ERR_INVALID, "%s/" CONFIG_NAME ": token_dim = %lld does not fit the base model, "
                         "whose %s is %lld", R->dir, v, token_dim_is, (long long)token_dim);
    if ((rc = get_int(R, "num_layers", 0, 1, &v)) > PR_OK)
        return rc;
    if (rc == PR_OK && v != c->n_layers)
        return pr_errorf(R->err, PR_ERR_INVALID, "%s/" CONFIG_NAME ": num_layers = %lld, but the base model has %d "
                         "layers", R->dir, v, c->n_layers);
    if ((rc = get_int(R, "num_attention_heads", 0, 1, &v)) > PR_OK)
        return rc;
    if (rc == PR_OK && v != heads_ok_a && v != heads_ok_b)
        return pr_errorf(R->err, PR_ERR_INVALID, "%s/" CONFIG_NAME ": num_attention_heads = %lld, but the base model "
                         "has %d (%d key/value heads)", R->dir, v, c->n_heads, c->n_kv_heads);
    if ((rc = get_int(R, "num_transformer_submodules", 0, 1, &v)) > PR_OK)
        return rc;
    if (rc == PR_OK && v != 1)
        return bad_value(R, "num_transformer_submodules", get(R, "num_transformer_submodules"),
                         "a decoder-only model has one (2 is for encoder-decoder models)");
    return PR_OK;
}

/* prefix: PREFIX_TUNING; ptuning: P_TUNING, whose file holds the prompt
 * encoder's output, a plain prompt (what peftref's p_tuning folds to). */
static int open_prompt(reader *R, const pr_model_config *c, const pr_registry *reg, int prefix, int ptuning)
{
    const char *tech = prefix ? "prefix_tuning" : "prompt_tuning";
    int rc = prefix ? check_fields(R, prefix_fields, NELEM(prefix_fields))
             : ptuning ? check_fields(R, ptuning_fields, NELEM(ptuning_fields))
                       : check_fields(R, prompt_fields, NELEM(prompt_fields));
    if (rc)
        return rc;
    const json_t *ert = ptuning ? get(R, "encoder_reparameterization_type") : NULL;
    if (ert && !(json_is_string(ert) && (!strcmp(json_string_value(ert), "MLP") ||
                                         !strcmp(json_string_value(ert), "LSTM"))))
        return bad_value(R, "encoder_reparameterization_type", ert, "PEFT's prompt encoder is MLP or LSTM");
    const pr_technique *t = pr_registry_find(reg, tech);
    if (!t)
        return pr_errorf(R->err, PR_ERR_NOTFOUND, "%s: technique '%s' is not installed (peftref plugins lists the "
                         "techniques found)", R->dir, tech);
    R->f->t = t;
    long long nv;
    if ((rc = get_int(R, "num_virtual_tokens", 1, 1, &nv)))
        return rc;
    int64_t d_kv = (int64_t)c->n_kv_heads * c->d_head;
    /* prefix tuning: PEFT's past_key_values are num_key_value_heads * head_dim wide */
    rc = prefix ? check_prompt_shape(R, c, d_kv, "key/value width (num_key_value_heads * head_dim)", c->n_kv_heads,
                                     c->n_kv_heads == c->n_heads ? c->n_heads : c->n_kv_heads)
                : check_prompt_shape(R, c, c->d_model, "hidden size", c->n_heads, c->n_kv_heads);
    if (rc || (rc = push_num(R, "n_tokens", (double)nv, -1)))
        return rc;
    if (prefix) {
        R->f->sites = PR_SITE_BIT(PR_SITE_ATTN_K) | PR_SITE_BIT(PR_SITE_ATTN_V);
        R->f->all_layers = 1;
        return PR_OK;
    }
    R->f->sites = PR_SITE_BIT(PR_SITE_EMBED);
    R->f->all_layers = 1;
    if (ptuning)
        return PR_OK;
    const json_t *init = get(R, "prompt_tuning_init"), *text = get(R, "prompt_tuning_init_text");
    const char *how = init && json_is_string(init) ? json_string_value(init) : "RANDOM";
    if (!strcmp(how, "RANDOM"))
        rc = push_opt(R, "init", "normal", -1);
    else if (!strcmp(how, "SAMPLE_VOCAB"))
        rc = push_opt(R, "init", "embed_rows", -1);
    else if (!strcmp(how, "TEXT") && text && json_is_string(text))
        rc = push_opt(R, "init", "text", -1) ? PR_ERR_NOMEM : push_opt(R, "init_text", json_string_value(text), -1);
    else
        return bad_value(R, "prompt_tuning_init", init, "peftref offers RANDOM, SAMPLE_VOCAB and TEXT (with "
                         "prompt_tuning_init_text)");
    if (!rc && text && !json_is_string(text))
        return bad_value(R, "prompt_tuning_init_text", text, "expected a string");
    return rc;
}

/* ---- the tensors against the base --------------------------------------------------------------- */

/* Keys name this family's modules and layers; GPT-2's (IA)^3 vector on
 * c_attn leaves the queries alone (peftref's ia3 scales keys and values). */
static int check_tensors(reader *R, const pr_model_config *c)
{
    const char *own = c->family == PR_FAMILY_GPT2 ? "base_model.model.transformer.h." : "base_model.model.model.layers.";
    const char *other = c->family == PR_FAMILY_GPT2 ? "base_model.model.model.layers." : "base_model.model.transformer.h.";
    st_file *st = R->f->st;
    for (int i = 0; i < st_count(st); i++) {
        const st_tensor *t = st_tensor_at(st, i);
        if (!strncmp(t->name, other, strlen(other)))
            return pr_errorf(R->err, PR_ERR_INVALID, "%s/" WEIGHTS_NAME ": tensor '%s' names a %s module, but the "
                             "base model is %s", R->dir, t->name, c->family == PR_FAMILY_GPT2 ? "LLaMA-family" : "GPT-2",
                             c->family == PR_FAMILY_GPT2 ? "GPT-2" : "of the LLaMA family");
        if (!strncmp(t->name, own, strlen(own))) {
            char *end = NULL;
            long l = strtol(t->name + strlen(own), &end, 10);
            if (end && *end == '.' && (l < 0 || l >= c->n_layers))
                return pr_errorf(R->err, PR_ERR_INVALID, "%s/" WEIGHTS_NAME ": tensor '%s' is for layer %ld, but the "
                                 "base model has %d layers", R->dir, t->name, l, c->n_layers);
            const char *tail = end && *end == '.' ? end + 1 : "";
            int64_t d_q = (int64_t)c->n_heads * c->d_head;
            if (!strcmp(R->type, "IA3") && !strcmp(tail, "attn.c_attn.ia3_l") && t->numel >= d_q) {
                float *v = malloc((size_t)t->numel * sizeof *v);
                if (!v)
                    return pr_errorf(R->err, PR_ERR_NOMEM, "%s: out of memory", R->dir);
                int rc = st_to_f32(st, t, v, R->err);
                for (int64_t k = 0; !rc && k < d_q; k++)
                    if (v[k] != 1.0f)
                        rc = pr_errorf(R->err, PR_ERR_UNSUPPORTED, "%s/" WEIGHTS_NAME ": tensor '%s' scales the "
                                       "queries (element %lld is %.9g, not 1); peftref's ia3 scales keys and values",
                                       R->dir, t->name, (long long)k, (double)v[k]);
                free(v);
                if (rc)
                    return rc;
            }
        }
    }
    return PR_OK;
}

/* ---- ADALORA ------------------------------------------------------------------------------------ */

/* The module's name: the directory's, when it is one, else the technique's. */
static const char *module_name_of(reader *R)
{
    pr_module_file *f = R->f;
    if (f->saved_name)
        return f->saved_name;
    const char *base = strrchr(R->dir, '/');
    base = base && base[1] ? base + 1 : R->dir;
    int name_ok = *base != '\0' && strcmp(base, ".") && strcmp(base, "..");
    for (const char *s = base; *s && name_ok; s++)
        name_ok = (unsigned char)*s > 0x20 && *s != '/';
    f->saved_name = keep(f, name_ok ? base : f->t->name);
    return f->saved_name;
}

/* One adapted module's tensors in the file, as f32 (malloc'ed). */
static int ada_tensor(reader *R, st_file *st, const char *key, int64_t rows, int64_t cols, float **out)
{
    *out = NULL;
    const st_tensor *t = st_find(st, key);
    if (!t)
        return pr_errorf(R->err, PR_ERR_INVALID, "%s/" WEIGHTS_NAME ": no tensor '%s'", R->dir, key);
    if (t->ndim != 2 || t->shape[0] != rows || t->shape[1] != cols) {
        char a[64];
        st_format_shape(t->ndim, t->shape, a, sizeof a);
        return pr_errorf(R->err, PR_ERR_INVALID, "%s/" WEIGHTS_NAME ": tensor '%s' is %s but rank_pattern and the "
                         "base model need [%lld, %lld]", R->dir, key, a, (long long)rows, (long long)cols);
    }
    float *v = malloc((size_t)(t->numel ? t->numel : 1) * sizeof *v);
    if (!v)
        return pr_errorf(R->err, PR_ERR_NOMEM, "%s: out of memory", R->dir);
    int rc = st_to_f32(st, t, v, R->err);
    if (rc) {
        free(v);
        return rc;
    }
    *out = v;
    return PR_OK;
}

/* ADALORA: PEFT saves per adapted module only the triplets its rank_pattern
 * keeps (AdaLoraModel.resize_state_dict_by_rank_pattern): lora_A (k, in),
 * lora_B (out, k), lora_E (k, 1), k the number of true entries of the
 * module's init_r booleans under "<module>.lora_E"; a module without an
 * entry keeps all init_r.  peftref's adalora holds init_r triplets per
 * insertion and every insertion's lora_E as one (insertions, init_r) tensor
 * (plugins/adalora.c), so the file is rebuilt in peftref's own tensor names:
 * the kept triplets at their positions, the pruned ones zero (lora_E 0
 * contributes nothing, as PEFT's pruned triplet), and the plugin's
 * rank_pattern buffer from the booleans.  PEFT's scaling is
 * lora_alpha / (ranknum + 1e-5) with ranknum init_r kept through the
 * resize, which is peftref's. */
static int open_adalora(reader *R, const pr_model_config *c, const pr_registry *reg)
{
    int rc = check_fields2(R, lora_fields, NELEM(lora_fields), adalora_fields, NELEM(adalora_fields));
    if (rc || (rc = check_fan_in_fan_out(R, c)) || (rc = check_bias(R, "adalora")) ||
        (rc = need_technique(R, reg, "adalora")))
        return rc;
    int flag;
    if ((rc = get_bool(R, "use_dora", &flag)))
        return rc;
    if (flag)
        return bad_value(R, "use_dora", get(R, "use_dora"), "PEFT's AdaLoRA has no DoRA either");
    const json_t *init = get(R, "init_lora_weights");
    if (init && !json_is_true(init))
        return bad_value(R, "init_lora_weights", init, "peftref's adalora initialises as PEFT's true");
    if (get(R, "alpha_pattern") && !is_empty(get(R, "alpha_pattern")))
        return bad_value(R, "alpha_pattern", get(R, "alpha_pattern"), "PEFT's AdaLoRA scales every module by "
                         "lora_alpha; peftref's adalora too");
    long long init_r = 12, target_r = 8, tinit = 0, tfinal = 0, dt = 1, total = 0;
    double alpha, dropout, b1, b2, orth;
    if ((rc = get_int(R, "init_r", 0, 1, &init_r)) > PR_OK || (rc = get_int(R, "target_r", 0, 1, &target_r)) > PR_OK ||
        (rc = get_int(R, "tinit", 0, 0, &tinit)) > PR_OK || (rc = get_int(R, "tfinal", 0, 0, &tfinal)) > PR_OK ||
        (rc = get_int(R, "deltaT", 0, 1, &dt)) > PR_OK || (rc = get_int(R, "total_step", 0, 1, &total)) > PR_OK)
        return rc;
    if ((rc = get_num(R, "lora_alpha", 8, &alpha)) || (rc = num_field(R, "lora_dropout", 0, 0, &dropout)) ||
        (rc = get_num(R, "beta1", 0.85, &b1)) || (rc = get_num(R, "beta2", 0.85, &b2)) ||
        (rc = num_field(R, "orth_reg_weight", 0.5, 0, &orth)))
        return rc;
    const json_t *pat = get(R, "rank_pattern");
    if (pat && !json_is_object(pat))
        return bad_value(R, "rank_pattern", pat, "expected an object of module name -> list of kept ranks");
    /* after the resize PEFT's update_layer makes scaling = float(k) when lora_alpha <= 0, a per-module value */
    if (alpha <= 0 && pat && json_object_size(pat) > 0)
        return bad_value(R, "lora_alpha", get(R, "lora_alpha"), "with a rank_pattern, PEFT scales each module by its "
                         "kept rank when lora_alpha <= 0, and peftref's adalora by init_r; give lora_alpha > 0");
    if (target_r > init_r)
        return bad_value(R, "target_r", get(R, "target_r"), "target_r must not exceed init_r");
    if ((rc = push_num(R, "init_r", (double)init_r, -1)) || (rc = push_num(R, "target_r", (double)target_r, -1)) ||
        (rc = push_num(R, "tinit", (double)tinit, -1)) || (rc = push_num(R, "tfinal", (double)tfinal, -1)) ||
        (rc = push_num(R, "delta_t", (double)dt, -1)) || (rc = push_num(R, "beta1", b1, -1)) ||
        (rc = push_num(R, "beta2", b2, -1)) || (rc = push_num(R, "orth_reg_weight", orth, -1)) ||
        (rc = push_num(R, "total_step", (double)total, -1)) || (rc = push_num(R, "alpha", alpha, -1)) ||
        (rc = push_num(R, "dropout", dropout, -1)))
        return rc;
    if ((rc = open_targets(R, c, "adalora", NULL, 0)) || (rc = check_tensors(R, c)))
        return rc;
    pr_module_file *f = R->f;
    const char *mname = module_name_of(R);
    if (!mname)
        return pr_errorf(R->err, PR_ERR_NOMEM, "%s: out of memory", R->dir);
    int n_sites = 0, n_layers = f->all_layers ? c->n_layers : f->n_layers;
    for (int s = 0; s < PR_SITE_COUNT; s++)
        n_sites += (f->sites & PR_SITE_BIT(s)) != 0;
    int n_ins = n_sites * n_layers, n_ent = 2 * n_ins + 2, n_used = 0;
    st_entry *e = calloc((size_t)n_ent, sizeof *e);
    float *E = calloc((size_t)n_ins * (size_t)init_r + 1, sizeof *E);
    float *P = calloc((size_t)n_ins * (size_t)init_r + 1, sizeof *P);
    char (*names)[192] = calloc((size_t)n_ent, sizeof *names);
    if (!e || !E || !P || !names)
        rc = pr_errorf(R->err, PR_ERR_NOMEM, "%s: out of memory", R->dir);
    int n = 0, k = 0;   /* entries, insertion */
    for (int li = 0; !rc && li < n_layers; li++) {
        int l = f->all_layers ? li : f->layers[li];
        for (int s = 0; !rc && s < PR_SITE_COUNT; s++) {
            if (!(f->sites & PR_SITE_BIT(s)))
                continue;
            const char *path = peft_site_path(c, s);
            char mod[160], key[256];
            snprintf(mod, sizeof mod, "%s.%d.%s", peft_blocks_path(c), l, path);
            /* the kept ranks */
            float *keep = P + (size_t)k * init_r;
            snprintf(key, sizeof key, "%s.lora_E", mod);
            const json_t *m = pat ? json_object_get(pat, key) : NULL;
            int64_t kept = 0;
            if (m && !json_is_null(m)) {
                size_t i;
                json_t *b;
                if (!json_is_array(m) || (long long)json_array_size(m) != init_r) {
                    char why[320];
                    snprintf(why, sizeof why, "'%s' must be a list of init_r = %lld booleans", key, init_r);
                    rc = bad_value(R, "rank_pattern", pat, why);
                    break;
                }
                json_array_foreach(m, i, b) {
                    if (!json_is_boolean(b)) {
                        rc = bad_value(R, "rank_pattern", pat, "expected booleans (PEFT's kept ranks)");
                        break;
                    }
                    keep[i] = json_is_true(b) ? 1.0f : 0.0f;
                    kept += json_is_true(b);
                }
            } else {
                for (long long i = 0; i < init_r; i++)
                    keep[i] = 1.0f;
                kept = init_r;
            }
            float *a = NULL, *bm = NULL, *ev = NULL;
            char ka[256], kb[256], ke[256];
            snprintf(ka, sizeof ka, "base_model.model.%s.lora_A", mod);
            snprintf(kb, sizeof kb, "base_model.model.%s.lora_B", mod);
            snprintf(ke, sizeof ke, "base_model.model.%s.lora_E", mod);
            /* the widths as the file has them (a base mismatch shows when the module is filled) */
            const st_tensor *ta = st_find(f->st, ka), *tb = st_find(f->st, kb);
            int64_t d_in = ta && ta->ndim == 2 ? ta->shape[1] : 1, d_out = tb && tb->ndim == 2 ? tb->shape[0] : 1;
            if (!rc && !(rc = ada_tensor(R, f->st, ka, kept, d_in, &a)) &&
                !(rc = ada_tensor(R, f->st, kb, d_out, kept, &bm)) && !(rc = ada_tensor(R, f->st, ke, kept, 1, &ev))) {
                n_used += 3;
                float *A = calloc((size_t)(init_r * d_in), sizeof *A), *B = calloc((size_t)(d_out * init_r), sizeof *B);
                if (!A || !B) {
                    free(A);
                    free(B);
                    rc = pr_errorf(R->err, PR_ERR_NOMEM, "%s: out of memory", R->dir);
                } else {
                    int64_t q = 0;
                    for (long long i = 0; i < init_r; i++) {
                        if (keep[i] == 0.0f)
                            continue;
                        memcpy(A + i * d_in, a + q * d_in, (size_t)d_in * sizeof *A);
                        for (int64_t o = 0; o < d_out; o++)
                            B[o * init_r + i] = bm[o * kept + q];
                        E[(size_t)k * init_r + i] = ev[q];
                        q++;
                    }
                    snprintf(names[n], sizeof names[n], "%s/h.%d.%s.lora_A", mname, l, pr_site_name(s));
                    e[n] = (st_entry){ .name = names[n], .ndim = 2, .shape = { init_r, d_in }, .data = A };
                    n++;
                    snprintf(names[n], sizeof names[n], "%s/h.%d.%s.lora_B", mname, l, pr_site_name(s));
                    e[n] = (st_entry){ .name = names[n], .ndim = 2, .shape = { d_out, init_r }, .data = B };
                    n++;
                }
            }
            free(a);
            free(bm);
            free(ev);
            k++;
        }
    }
    if (!rc && n_used != st_count(f->st)) {
        for (int i = 0; i < st_count(f->st) && !rc; i++) {
            const char *nm = st_tensor_at(f->st, i)->name;
            const char *d = strrchr(nm, '.');
            if (!d || (strcmp(d, ".lora_A") && strcmp(d, ".lora_B") && strcmp(d, ".lora_E")))
                rc = pr_errorf(R->err, PR_ERR_INVALID, "%s/" WEIGHTS_NAME ": tensor '%s' belongs to no module "
                               "target_modules selects", R->dir, nm);
        }
        if (!rc)
            rc = pr_errorf(R->err, PR_ERR_INVALID, "%s/" WEIGHTS_NAME ": %d tensors, of which target_modules "
                           "selects %d", R->dir, st_count(f->st), n_used);
    }
    if (!rc) {
        snprintf(names[n], sizeof names[n], "%s/lora_E", mname);
        e[n] = (st_entry){ .name = names[n], .ndim = 2, .shape = { n_ins, init_r }, .data = E };
        n++;
        snprintf(names[n], sizeof names[n], "%s/rank_pattern", mname);
        e[n] = (st_entry){ .name = names[n], .ndim = 2, .shape = { n_ins, init_r }, .data = P };
        n++;
        /* written once beside nothing the user sees: a temporary file, unlinked once mapped */
        char tpl[4096];
        const char *td = getenv("TMPDIR");
        snprintf(tpl, sizeof tpl, "%s/peftref-adalora-XXXXXX", td && *td ? td : "/tmp");
        int fd = mkstemp(tpl);
        st_file *nst = NULL;
        if (fd < 0) {
            rc = pr_errorf(R->err, PR_ERR_IO, "%s: cannot create a temporary file %s: %s", R->dir, tpl,
                           strerror(errno));
        } else {
            close(fd);
            st_kv meta[] = { { "tensor_names", "peftref" } };
            rc = st_write(tpl, e, n, meta, 1, R->err);
            if (!rc)
                rc = st_open(tpl, 0, &nst, R->err);
            unlink(tpl);
        }
        if (!rc) {
            st_close(f->st);
            f->st = nst;
        }
    }
    for (int i = 0; e && i < n; i++)
        if (e[i].data != E && e[i].data != P)
            free((void *)e[i].data);
    free(e);
    free(E);
    free(P);
    free(names);
    return rc;
}

/* ---- opening ------------------------------------------------------------------------------------ */

static const char *const known_types[] = {
    "PROMPT_TUNING", "MULTITASK_PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING", "LORA", "ADALORA", "BOFT",
    "ADAPTION_PROMPT", "IA3", "LOHA", "LOKR", "OFT", "POLY", "LN_TUNING", "VERA", "FOURIERFT", "XLORA", "HRA",
    "VBLORA", "CPT", "BONE", "RANDLORA", "ROAD", "TRAINABLE_TOKENS", "SHIRA", "C3A", "MISS", "WAVEFT", "DELORA",
    "OSF", "GRALORA", "LILY", NULL
};

int peft_adapter_open(const char *dir, const pr_registry *reg, const pr_model_config *cfg, unsigned flags,
                      pr_module_file **out, pr_error *err)
{
    *out = NULL;
    char path[4096];
    pr_module_file *f = calloc(1, sizeof *f);
    if (!f || !(f->path = strdup(dir))) {
        free(f);
        return pr_errorf(err, PR_ERR_NOMEM, "%s: out of memory", dir);
    }
    reader R = { .dir = dir, .flags = flags, .err = err, .f = f };
    snprintf(path, sizeof path, "%s/" CONFIG_NAME, dir);
    json_error_t je;
    int rc = PR_OK;
    R.root = json_load_file(path, 0, &je);
    if (!R.root || !json_is_object(R.root)) {
        rc = pr_errorf(err, PR_ERR_FORMAT, "%s:%d:%d: %s", path, je.line, je.column,
                       R.root ? "not a JSON object" : je.text);
        goto done;
    }
    const json_t *pt = get(&R, "peft_type");
    if (!pt || !json_is_string(pt)) {
        rc = pr_errorf(err, PR_ERR_FORMAT, "%s: no peft_type (a string such as \"LORA\")", path);
        goto done;
    }
    R.type = json_string_value(pt);
    const json_t *task = get(&R, "task_type");
    if (task && !(json_is_string(task) && !strcmp(json_string_value(task), "CAUSAL_LM"))) {
        rc = bad_value(&R, "task_type", task, "peftref imports CAUSAL_LM adapters (or ones without a task_type)");
        goto done;
    }
    snprintf(path, sizeof path, "%s/" WEIGHTS_NAME, dir);
    if ((rc = st_open(path, 0, &f->st, err)))
        goto done;
    if (!strcmp(R.type, "LORA"))
        rc = open_lora(&R, cfg, reg);
    else if (!strcmp(R.type, "IA3"))
        rc = open_ia3(&R, cfg, reg);
    else if (!strcmp(R.type, "PROMPT_TUNING"))
        rc = open_prompt(&R, cfg, reg, 0, 0);
    else if (!strcmp(R.type, "P_TUNING"))
        rc = open_prompt(&R, cfg, reg, 0, 1);
    else if (!strcmp(R.type, "PREFIX_TUNING"))
        rc = open_prompt(&R, cfg, reg, 1, 0);
    else if (!strcmp(R.type, "LOHA") || !strcmp(R.type, "LOKR") || !strcmp(R.type, "VERA") ||
             !strcmp(R.type, "OFT") || !strcmp(R.type, "BOFT") || !strcmp(R.type, "HRA") ||
             !strcmp(R.type, "FOURIERFT"))
        rc = open_weight_type(&R, cfg, reg);
    else if (!strcmp(R.type, "TRAINABLE_TOKENS"))
        rc = open_trainable_tokens(&R, cfg, reg);
    else if (!strcmp(R.type, "ADALORA"))
        rc = open_adalora(&R, cfg, reg);
    else {
        int known = 0;
        for (int i = 0; known_types[i] && !known; i++)
            known = !strcmp(known_types[i], R.type);
        rc = pr_errorf(err, PR_ERR_UNSUPPORTED, "%s/" CONFIG_NAME ": %s peft_type '%s'; peftref imports LORA (with "
                       "use_dora, use_rslora, rank_pattern, alpha_pattern), IA3, PROMPT_TUNING, P_TUNING, "
                       "PREFIX_TUNING, LOHA, LOKR, VERA, OFT, BOFT, HRA, FOURIERFT, TRAINABLE_TOKENS and ADALORA", dir,
                       known ? "cannot import" : "unknown", R.type);
    }
    if (rc || (rc = check_tensors(&R, cfg)))
        goto done;
    module_name_of(&R);
    /* adalora's file was rebuilt under peftref's names (open_adalora) */
    f->peft = strcmp(R.type, "ADALORA") != 0;
    f->peft_dir = 1;
    /* buffers a technique regenerates (lora's pissa / olora factors, from the
     * base weight) are not in the file */
    f->has_seed = 1;
    f->seed = 0x504546544144ull;
    if (!f->saved_name)
        rc = pr_errorf(err, PR_ERR_NOMEM, "%s: out of memory", dir);
done:
    json_decref(R.root);
    if (rc) {
        pr_module_file_close(f);
        return rc;
    }
    *out = f;
    return PR_OK;
}
