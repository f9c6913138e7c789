/* peftref core: config.json of Hugging Face checkpoints, read and written.
 *
 * model_type chooses the family: "gpt2" (or no model_type: GPT-2's own
 * configs predate the key) maps GPT2Config; "llama", "mistral", "qwen2"
 * and "qwen3" map LlamaConfig, MistralConfig, Qwen2Config and
 * Qwen3Config with transformers' defaults for absent keys.  Keys that
 * change the computation in ways peftref does not implement are refused
 * with the key named, never ignored. */
#include <jansson.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "hf_config.h"


/* A required positive integer key. */
static int cfg_int(const json_t *root, const char *path, const char *key, int *out, pr_error *err)
{
    const json_t *v = json_object_get(root, key);
    if (!v)
        return pr_errorf(err, PR_ERR_NOTFOUND, "%s: missing key '%s'", path, key);
    if (!json_is_integer(v) || json_integer_value(v) <= 0 || json_integer_value(v) > INT_MAX)
        return pr_errorf(err, PR_ERR_FORMAT, "%s: key '%s' must be a positive integer", path, key);
    *out = (int)json_integer_value(v);
    return PR_OK;
}

/* An optional boolean key; *out keeps its default when absent or null. */
static int cfg_bool(const json_t *root, const char *path, const char *key, int *out, pr_error *err)
{
    const json_t *v = json_object_get(root, key);
    if (!v || json_is_null(v))
        return PR_OK;
    if (!json_is_boolean(v))
        return pr_errorf(err, PR_ERR_FORMAT, "%s: key '%s' must be true or false", path, key);
    *out = json_is_true(v);
    return PR_OK;
}

/* Optional positive number; *out keeps its default when absent. */
static int cfg_number(const json_t *root, const char *path, const char *key, float *out,
                      pr_error *err)
{
    const json_t *v = json_object_get(root, key);
    if (!v)
        return PR_OK;
    if (!json_is_number(v) || !(json_number_value(v) > 0.0))
        return pr_errorf(err, PR_ERR_FORMAT, "%s: key '%s' must be a positive number", path, key);
    *out = (float)json_number_value(v);
    return PR_OK;
}

/* Map a transformers GPT2Config onto pr_model_config.  Keys that change the
 * computation in ways peftref does not implement are refused rather than
 * ignored. */
static int parse_gpt2_config(const json_t *root, const char *path, pr_model_config *c,
                             pr_error *err)
{
    int rc;
    if (!json_is_object(root))
        return pr_errorf(err, PR_ERR_FORMAT, "%s: not a JSON object", path);
    memset(c, 0, sizeof *c);
    c->family = PR_FAMILY_GPT2;
    if ((rc = cfg_int(root, path, "n_layer", &c->n_layers, err)) ||
        (rc = cfg_int(root, path, "n_embd", &c->d_model, err)) ||
        (rc = cfg_int(root, path, "n_head", &c->n_heads, err)) ||
        (rc = cfg_int(root, path, "vocab_size", &c->vocab_size, err)))
        return rc;
    if (!json_object_get(root, "n_positions") && !json_object_get(root, "n_ctx"))
        return pr_errorf(err, PR_ERR_NOTFOUND, "%s: missing key 'n_positions' (or 'n_ctx')", path);
    if (json_object_get(root, "n_positions")) {
        if ((rc = cfg_int(root, path, "n_positions", &c->max_seq, err)))
            return rc;
    } else if ((rc = cfg_int(root, path, "n_ctx", &c->max_seq, err))) {
        return rc;
    }
    if (c->d_model % c->n_heads != 0)
        return pr_errorf(err, PR_ERR_FORMAT, "%s: key 'n_embd' (%d) is not a multiple of 'n_head' (%d)",
                         path, c->d_model, c->n_heads);

    const json_t *inner = json_object_get(root, "n_inner");
    if (!inner || json_is_null(inner)) {
        if (c->d_model > INT_MAX / 4)
            return pr_errorf(err, PR_ERR_FORMAT, "%s: key 'n_embd' is too large", path);
        c->d_ff = 4 * c->d_model;
    } else if ((rc = cfg_int(root, path, "n_inner", &c->d_ff, err))) {
        return rc;
    }

    c->norm_eps = 1e-5f; /* GPT2Config's default */
    if ((rc = cfg_number(root, path, "layer_norm_epsilon", &c->norm_eps, err)))
        return rc;
    c->init_std = 0.02f;
    if ((rc = cfg_number(root, path, "initializer_range", &c->init_std, err)))
        return rc;

    const json_t *act = json_object_get(root, "activation_function");
    if (act) {
        const char *a = json_is_string(act) ? json_string_value(act) : NULL;
        if (!a)
            return pr_errorf(err, PR_ERR_FORMAT, "%s: key 'activation_function' must be a string", path);
        if (strcmp(a, "gelu_new") != 0 && strcmp(a, "gelu_pytorch_tanh") != 0)
            return pr_errorf(err, PR_ERR_UNSUPPORTED,
                             "%s: key 'activation_function' is \"%s\"; peftref implements the tanh "
                             "approximation of GELU only (\"gelu_new\", \"gelu_pytorch_tanh\")",
                             path, a);
    }

    c->tied_head = 1;
    if ((rc = cfg_bool(root, path, "tie_word_embeddings", &c->tied_head, err)))
        return rc;
    int scale = 1, inverse_layer = 0, cross = 0;
    if ((rc = cfg_bool(root, path, "scale_attn_weights", &scale, err)) ||
        (rc = cfg_bool(root, path, "scale_attn_by_inverse_layer_idx", &inverse_layer, err)) ||
        (rc = cfg_bool(root, path, "add_cross_attention", &cross, err)))
        return rc;
    if (!scale)
        return pr_errorf(err, PR_ERR_UNSUPPORTED,
                         "%s: key 'scale_attn_weights' is false; attention is always scaled by 1/sqrt(d_head)",
                         path);
    if (inverse_layer)
        return pr_errorf(err, PR_ERR_UNSUPPORTED,
                         "%s: key 'scale_attn_by_inverse_layer_idx' true is not supported", path);
    if (cross)
        return pr_errorf(err, PR_ERR_UNSUPPORTED,
                         "%s: key 'add_cross_attention' true is not supported", path);

    c->n_kv_heads = c->n_heads;
    c->d_head = c->d_model / c->n_heads;
    c->bias = 1;
    c->fused_qkv = 1;
    c->norm = PR_NORM_LAYERNORM;
    c->act = PR_ACT_GELU_TANH;
    c->pos = PR_POS_LEARNED;
    c->rope_theta = 0.0f;
    c->seed = 1337;
    return PR_OK;
}


/* An optional positive integer; *out keeps its default when absent or null. */
static int cfg_int_opt(const json_t *root, const char *path, const char *key, int *out, pr_error *err)
{
    const json_t *v = json_object_get(root, key);
    if (!v || json_is_null(v))
        return PR_OK;
    return cfg_int(root, path, key, out, err);
}

static const char *const llama_types[] = { "llama", "mistral", "qwen2", "qwen3" };

/* rope_scaling: null, {"rope_type" (or the older "type"): "default" |
 * "linear" | "llama3", ...}. */
static int parse_rope_scaling(const json_t *root, const char *path, pr_model_config *c, pr_error *err)
{
    const json_t *rs = json_object_get(root, "rope_scaling");
    if (!rs || json_is_null(rs))
        return PR_OK;
    if (!json_is_object(rs))
        return pr_errorf(err, PR_ERR_FORMAT, "%s: key 'rope_scaling' must be null or an object", path);
    const json_t *t = json_object_get(rs, "rope_type");
    if (!t)
        t = json_object_get(rs, "type");
    if (!json_is_string(t))
        return pr_errorf(err, PR_ERR_FORMAT, "%s: key 'rope_scaling' needs a string 'rope_type'", path);
    const char *type = json_string_value(t);
    if (!strcmp(type, "default"))
        return PR_OK;
    int rc;
    if (!strcmp(type, "linear")) {
        c->rope_scaling = PR_ROPE_LINEAR;
    } else if (!strcmp(type, "llama3")) {
        c->rope_scaling = PR_ROPE_LLAMA3;
        c->rope_low_freq_factor = 1.0f;
        c->rope_high_freq_factor = 4.0f;
        c->rope_orig_max_pos = 8192;
        if ((rc = cfg_number(rs, path, "low_freq_factor", &c->rope_low_freq_factor, err)) ||
            (rc = cfg_number(rs, path, "high_freq_factor", &c->rope_high_freq_factor, err)) ||
            (rc = cfg_int_opt(rs, path, "original_max_position_embeddings", &c->rope_orig_max_pos, err)))
            return rc;
    } else {
        return pr_errorf(err, PR_ERR_UNSUPPORTED,
                         "%s: rope_scaling type \"%s\" is not supported (null, \"default\", \"linear\", "
                         "\"llama3\")", path, type);
    }
    if (!json_object_get(rs, "factor"))
        return pr_errorf(err, PR_ERR_FORMAT, "%s: rope_scaling \"%s\" needs a 'factor'", path, type);
    return cfg_number(rs, path, "factor", &c->rope_factor, err);
}

static int parse_llama_config(const json_t *root, const char *path, int variant, pr_model_config *c,
                              pr_error *err)
{
    int rc;
    memset(c, 0, sizeof *c);
    c->family = PR_FAMILY_LLAMA;
    c->variant = variant;
    if ((rc = cfg_int(root, path, "hidden_size", &c->d_model, err)) ||
        (rc = cfg_int(root, path, "intermediate_size", &c->d_ff, err)) ||
        (rc = cfg_int(root, path, "num_hidden_layers", &c->n_layers, err)) ||
        (rc = cfg_int(root, path, "num_attention_heads", &c->n_heads, err)) ||
        (rc = cfg_int(root, path, "vocab_size", &c->vocab_size, err)))
        return rc;
    c->n_kv_heads = c->n_heads;
    c->max_seq = variant == PR_VARIANT_LLAMA ? 2048 : 32768; /* the configs' max_position_embeddings defaults */
    if ((rc = cfg_int_opt(root, path, "num_key_value_heads", &c->n_kv_heads, err)) ||
        (rc = cfg_int_opt(root, path, "max_position_embeddings", &c->max_seq, err)))
        return rc;
    if (c->n_heads % c->n_kv_heads != 0)
        return pr_errorf(err, PR_ERR_FORMAT,
                         "%s: key 'num_attention_heads' (%d) is not a multiple of 'num_key_value_heads' (%d)",
                         path, c->n_heads, c->n_kv_heads);
    if (variant == PR_VARIANT_QWEN3) {
        c->d_head = 128; /* Qwen3Config's default */
    } else {
        if (c->d_model % c->n_heads != 0 && !json_is_integer(json_object_get(root, "head_dim")))
            return pr_errorf(err, PR_ERR_FORMAT,
                             "%s: key 'hidden_size' (%d) is not a multiple of 'num_attention_heads' (%d) and "
                             "there is no 'head_dim'", path, c->d_model, c->n_heads);
        c->d_head = c->d_model / c->n_heads;
    }
    if ((rc = cfg_int_opt(root, path, "head_dim", &c->d_head, err)))
        return rc;

    c->norm_eps = 1e-6f;
    c->rope_theta = variant == PR_VARIANT_QWEN2 || variant == PR_VARIANT_QWEN3 ? 1e6f : 1e4f;
    c->init_std = 0.02f;
    if ((rc = cfg_number(root, path, "rms_norm_eps", &c->norm_eps, err)) ||
        (rc = cfg_number(root, path, "rope_theta", &c->rope_theta, err)) ||
        (rc = cfg_number(root, path, "initializer_range", &c->init_std, err)))
        return rc;
    c->tied_head = 0;
    if ((rc = cfg_bool(root, path, "tie_word_embeddings", &c->tied_head, err)))
        return rc;

    const json_t *act = json_object_get(root, "hidden_act");
    if (act && (!json_is_string(act) || strcmp(json_string_value(act), "silu") != 0))
        return pr_errorf(err, PR_ERR_UNSUPPORTED, "%s: key 'hidden_act' is %s%s%s; peftref implements \"silu\" "
                         "(SwiGLU) only", path, json_is_string(act) ? "\"" : "",
                         json_is_string(act) ? json_string_value(act) : "not a string",
                         json_is_string(act) ? "\"" : "");
    const json_t *drop = json_object_get(root, "attention_dropout");
    if (drop && !json_is_null(drop) && (!json_is_number(drop) || json_number_value(drop) != 0.0))
        return pr_errorf(err, PR_ERR_UNSUPPORTED,
                         "%s: key 'attention_dropout' must be 0; peftref's base model has no dropout", path);

    int attention_bias = 0, mlp_bias = 0;
    if ((rc = cfg_bool(root, path, "attention_bias", &attention_bias, err)) ||
        (rc = cfg_bool(root, path, "mlp_bias", &mlp_bias, err)))
        return rc;
    if (variant == PR_VARIANT_QWEN2) {
        c->qkv_bias = 1; /* Qwen2's q, k, v projections always carry biases, o_proj none */
    } else {
        c->qkv_bias = attention_bias;
        c->o_bias = attention_bias;
    }
    c->mlp_bias = variant == PR_VARIANT_LLAMA ? mlp_bias : 0;
    c->qk_norm = variant == PR_VARIANT_QWEN3;

    /* Mistral's sliding_window (4096 by default) limits every layer's keys;
     * Qwen's applies only with use_sliding_window true. */
    int use_sw = variant == PR_VARIANT_MISTRAL;
    if (variant == PR_VARIANT_QWEN2 || variant == PR_VARIANT_QWEN3) {
        if ((rc = cfg_bool(root, path, "use_sliding_window", &use_sw, err)))
            return rc;
    }
    if (use_sw) {
        c->sliding_window = 4096; /* MistralConfig's and Qwen2Config's default */
        const json_t *sw = json_object_get(root, "sliding_window");
        if (sw && json_is_null(sw))
            c->sliding_window = 0;
        else if ((rc = cfg_int_opt(root, path, "sliding_window", &c->sliding_window, err)))
            return rc;
    }
    if ((rc = parse_rope_scaling(root, path, c, err)))
        return rc;

    c->bias = 0;
    c->fused_qkv = 0;
    c->norm = PR_NORM_RMSNORM;
    c->act = PR_ACT_SWIGLU;
    c->pos = PR_POS_ROPE;
    c->seed = 1337;
    return PR_OK;
}

int hf_parse_config(const json_t *root, const char *path, pr_model_config *c, pr_error *err)
{
    if (!json_is_object(root))
        return pr_errorf(err, PR_ERR_FORMAT, "%s: not a JSON object", path);
    const json_t *mt = json_object_get(root, "model_type");
    if (!mt)
        return parse_gpt2_config(root, path, c, err);
    if (!json_is_string(mt))
        return pr_errorf(err, PR_ERR_FORMAT, "%s: key 'model_type' must be a string", path);
    const char *type = json_string_value(mt);
    if (!strcmp(type, "gpt2"))
        return parse_gpt2_config(root, path, c, err);
    for (size_t i = 0; i < sizeof llama_types / sizeof llama_types[0]; i++)
        if (!strcmp(type, llama_types[i]))
            return parse_llama_config(root, path, (int)i + 1, c, err);
    return pr_errorf(err, PR_ERR_UNSUPPORTED,
                     "%s: model_type \"%s\" is not supported; peftref loads \"gpt2\", \"llama\", "
                     "\"mistral\", \"qwen2\" and \"qwen3\" checkpoints", path, type);
}

/* ---- writing --------------------------------------------------------------- */

/* A float's shortest decimal form (1e-05, not 9.9999997473787516e-06). */
static double float_decimal(float f)
{
    char buf[32];
    snprintf(buf, sizeof buf, "%.7g", (double)f);
    return strtod(buf, NULL);
}

static json_t *gpt2_json(const pr_model_config *c)
{
    json_t *o = json_object();
    json_object_set_new(o, "model_type", json_string("gpt2"));
    json_object_set_new(o, "architectures", json_pack("[s]", "GPT2LMHeadModel"));
    json_object_set_new(o, "n_layer", json_integer(c->n_layers));
    json_object_set_new(o, "n_embd", json_integer(c->d_model));
    json_object_set_new(o, "n_head", json_integer(c->n_heads));
    json_object_set_new(o, "n_inner", json_integer(c->d_ff));
    json_object_set_new(o, "vocab_size", json_integer(c->vocab_size));
    json_object_set_new(o, "n_positions", json_integer(c->max_seq));
    json_object_set_new(o, "n_ctx", json_integer(c->max_seq));
    json_object_set_new(o, "layer_norm_epsilon", json_real(float_decimal(c->norm_eps)));
    json_object_set_new(o, "initializer_range", json_real(float_decimal(c->init_std)));
    json_object_set_new(o, "activation_function", json_string("gelu_new"));
    json_object_set_new(o, "tie_word_embeddings", json_boolean(c->tied_head));
    return o;
}

static json_t *llama_json(const pr_model_config *c)
{
    static const char *const arch[] = { "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                                        "Qwen3ForCausalLM" };
    int v = c->variant >= 1 && c->variant <= 4 ? c->variant : 1;
    json_t *o = json_object();
    json_object_set_new(o, "model_type", json_string(llama_types[v - 1]));
    json_object_set_new(o, "architectures", json_pack("[s]", arch[v - 1]));
    json_object_set_new(o, "hidden_size", json_integer(c->d_model));
    json_object_set_new(o, "intermediate_size", json_integer(c->d_ff));
    json_object_set_new(o, "num_hidden_layers", json_integer(c->n_layers));
    json_object_set_new(o, "num_attention_heads", json_integer(c->n_heads));
    json_object_set_new(o, "num_key_value_heads", json_integer(c->n_kv_heads));
    json_object_set_new(o, "head_dim", json_integer(c->d_head));
    json_object_set_new(o, "vocab_size", json_integer(c->vocab_size));
    json_object_set_new(o, "max_position_embeddings", json_integer(c->max_seq));
    json_object_set_new(o, "rms_norm_eps", json_real(float_decimal(c->norm_eps)));
    json_object_set_new(o, "rope_theta", json_real(float_decimal(c->rope_theta)));
    if (c->rope_scaling == PR_ROPE_LINEAR) {
        json_object_set_new(o, "rope_scaling", json_pack("{s:s,s:f}", "rope_type", "linear", "factor",
                                                         float_decimal(c->rope_factor)));
    } else if (c->rope_scaling == PR_ROPE_LLAMA3) {
        json_object_set_new(o, "rope_scaling",
                            json_pack("{s:s,s:f,s:f,s:f,s:i}", "rope_type", "llama3", "factor",
                                      float_decimal(c->rope_factor), "low_freq_factor",
                                      float_decimal(c->rope_low_freq_factor), "high_freq_factor",
                                      float_decimal(c->rope_high_freq_factor),
                                      "original_max_position_embeddings", c->rope_orig_max_pos));
    } else {
        json_object_set_new(o, "rope_scaling", json_null());
    }
    json_object_set_new(o, "hidden_act", json_string("silu"));
    json_object_set_new(o, "initializer_range", json_real(float_decimal(c->init_std)));
    json_object_set_new(o, "tie_word_embeddings", json_boolean(c->tied_head));
    if (v == PR_VARIANT_LLAMA) {
        json_object_set_new(o, "attention_bias", json_boolean(c->qkv_bias));
        json_object_set_new(o, "mlp_bias", json_boolean(c->mlp_bias));
    } else if (v == PR_VARIANT_QWEN3) {
        json_object_set_new(o, "attention_bias", json_boolean(c->qkv_bias));
    }
    if (v == PR_VARIANT_MISTRAL) {
        json_object_set_new(o, "sliding_window", c->sliding_window ? json_integer(c->sliding_window) : json_null());
    } else if (v == PR_VARIANT_QWEN2 || v == PR_VARIANT_QWEN3) {
        json_object_set_new(o, "use_sliding_window", json_boolean(c->sliding_window > 0));
        if (c->sliding_window)
            json_object_set_new(o, "sliding_window", json_integer(c->sliding_window));
    }
    json_object_set_new(o, "torch_dtype", json_string("float32"));
    return o;
}

json_t *hf_config_json(const pr_model_config *c, pr_error *err)
{
    json_t *o = NULL;
    if (c->family == PR_FAMILY_GPT2)
        o = gpt2_json(c);
    else if (c->family == PR_FAMILY_LLAMA)
        o = llama_json(c);
    else {
        pr_errorf(err, PR_ERR_UNSUPPORTED, "config.json: family %d has no Hugging Face form", c->family);
        return NULL;
    }
    if (!o)
        pr_errorf(err, PR_ERR_NOMEM, "out of memory writing config.json");
    return o;
}
