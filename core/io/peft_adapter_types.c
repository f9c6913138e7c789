/* peftref core: PEFT adapter types read into peftref modules: LORA (and
 * DoRA), IA3, the prompt types, the further weight types (LOHA, LOKR, VERA,
 * OFT, BOFT, HRA, FOURIERFT) and TRAINABLE_TOKENS, with their config
 * fields; peft_adapter.c opens the directory. */
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
#include "peft_adapter_internal.h"



/* LoraConfig (PEFT 0.14 to 0.18). */
const cfg_field pa_lora_fields[] = {
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
    { "trainable_token_indices", F_EMPTY, "trainable tokens are a module of their own (PEFT's TRAINABLE_TOKENS type)" },
    { "target_parameters", F_EMPTY, "peftref's {tech} adapts modules, not bare parameters" },
    { "lora_bias", F_FALSE, "peftref's {tech} has no bias of its own" },
    { "use_qalora", F_FALSE, "QALoRA needs a quantised base model" },
    { "qalora_group_size", F_INFO, NULL },   /* used only with use_qalora */
    { "alora_invocation_tokens", F_EMPTY, "activated LoRA is not offered" },
    { "arrow_config", F_EMPTY, "Arrow routing is not offered" },
    { "ensure_weight_tying", F_FALSE, "peftref's {tech} does not adapt tied embeddings" },
    { "runtime_config", F_INFO, NULL },      /* device placement only */
};
const int pa_n_lora_fields = NELEM(pa_lora_fields);

static const cfg_field ia3_fields[] = {
    { "target_modules", F_READ, NULL }, { "exclude_modules", F_READ, NULL },
    { "feedforward_modules", F_READ, NULL }, { "fan_in_fan_out", F_READ, NULL },
    { "init_ia3_weights", F_TRUE, "peftref's {tech} starts at ones" },
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
    { "prefix_projection", F_FALSE, "the file holds the prefixes themselves (a prefix MLP is folded away "
                                    "when saving)" },
};



static const cfg_field loha_fields[] = {
    TARGET_FIELDS, { "r", F_READ, NULL }, { "alpha", F_READ, NULL }, { "rank_pattern", F_READ, NULL },
    { "alpha_pattern", F_READ, NULL },
    { "rank_dropout", F_ZERO, "peftref's {tech} has no rank dropout" },
    { "module_dropout", F_ZERO, "peftref's {tech} has no module dropout" },
    { "use_effective_conv2d", F_INFO, NULL },   /* convolutions only */
    { "init_weights", F_TRUE, "peftref's {tech} starts with hada_w2_b at zero, PEFT's true" },
};

static const cfg_field lokr_fields[] = {
    TARGET_FIELDS, { "r", F_READ, NULL }, { "alpha", F_READ, NULL }, { "rank_pattern", F_READ, NULL },
    { "alpha_pattern", F_READ, NULL },
    { "rank_dropout", F_ZERO, "peftref's {tech} has no rank dropout" },
    { "module_dropout", F_ZERO, "peftref's {tech} has no module dropout" },
    { "use_effective_conv2d", F_INFO, NULL },   /* convolutions only */
    { "decompose_both", F_FALSE, "peftref's {tech} keeps lokr_w1 whole (lokr_w1_a / lokr_w1_b are not offered)" },
    { "decompose_factor", F_READ, NULL },
    { "rank_dropout_scale", F_INFO, NULL },     /* used only with rank_dropout */
    { "init_weights", F_TRUE, "peftref's {tech} starts with lokr_w1 at zero, PEFT's true" },
};

static const cfg_field vera_fields[] = {
    TARGET_FIELDS, { "r", F_READ, NULL }, { "fan_in_fan_out", F_READ, NULL }, { "bias", F_READ, NULL },
    { "vera_dropout", F_READ, NULL }, { "d_initial", F_READ, NULL },
    { "projection_prng_key", F_INFO, NULL },   /* the projections are in the file */
    { "save_projection", F_TRUE, "peftref cannot regenerate PEFT's vera_A and vera_B from projection_prng_key; "
                                 "save them with the adapter" },
    { "init_weights", F_TRUE, "peftref's {tech} initialises as PEFT's true" },
};

static const cfg_field oft_fields[] = {
    TARGET_FIELDS, { "r", F_READ, NULL }, { "oft_block_size", F_READ, NULL }, { "fan_in_fan_out", F_READ, NULL },
    { "bias", F_READ, NULL },
    { "module_dropout", F_ZERO, "peftref's {tech} has no module dropout" },
    { "init_weights", F_TRUE, "peftref's {tech} starts as the identity, PEFT's true" },
    { "coft", F_FALSE, "constrained OFT is not offered" },
    { "eps", F_INFO, NULL },   /* used only with coft */
    { "block_share", F_FALSE, "peftref's {tech} has one rotation per block" },
    { "use_cayley_neumann", F_FALSE, "peftref computes the exact Cayley transform (I - S)(I + S)^-1, not PEFT's "
                                     "truncated Neumann series, which gives another rotation" },
    { "num_cayley_neumann_terms", F_INFO, NULL },   /* used only with use_cayley_neumann */
};

static const cfg_field boft_fields[] = {
    TARGET_FIELDS, { "boft_block_size", F_READ, NULL }, { "boft_block_num", F_READ, NULL },
    { "boft_n_butterfly_factor", F_READ, NULL }, { "fan_in_fan_out", F_READ, NULL }, { "bias", F_READ, NULL },
    { "boft_dropout", F_ZERO, "peftref's {tech} has no multiplicative dropout (blocks replaced by the identity)" },
    { "init_weights", F_TRUE, "peftref's {tech} starts as the identity (boft_R zeros, boft_s ones), PEFT's true" },
};

static const cfg_field hra_fields[] = {
    TARGET_FIELDS, { "r", F_READ, NULL }, { "init_weights", F_READ, NULL }, { "bias", F_READ, NULL },
    { "apply_GS", F_FALSE, "peftref's {tech} reflects along the vectors themselves (Gram-Schmidt is not offered)" },
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

/* ---- the types --------------------------------------------------------------------------------- */

int pa_open_lora(reader *R, const pr_model_config *c)
{
    int rc = pa_check_fields(R, pa_lora_fields, pa_n_lora_fields);
    if (rc)
        return rc;
    int dora = 0, rslora = 0;
    if ((rc = pa_get_bool(R, "use_dora", &dora)) || (rc = pa_get_bool(R, "use_rslora", &rslora)) ||
        (rc = pa_check_fan_in_fan_out(R, c)))
        return rc;
    if ((rc = pa_check_bias(R)))
        return rc;
    const json_t *variant = pa_implied(R, "use_dora");
    if (dora && !json_is_true(variant))
        return pa_bad_value(R, "use_dora", pa_get(R, "use_dora"),
                            "no technique found declares PEFT's LORA with use_dora (peftref plugins lists them)");
    long long r;
    double alpha, dropout;
    if ((rc = pa_get_int(R, "r", 0, 1, &r)) > PR_OK)
        return rc;
    if (rc < 0)
        r = 8;
    if ((rc = pa_get_num(R, "lora_alpha", 8, &alpha)) || (rc = pa_get_num(R, "lora_dropout", 0, &dropout)))
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
        return pa_bad_value(R, "init_lora_weights", init,
                            "peftref's {tech} offers true, false, gaussian, pissa and olora");
    if (strcmp(init_name, "true") && !mf_has_option(R->f->t, "init_lora_weights"))
        return pa_bad_value(R, "init_lora_weights", init, "peftref's {tech} initialises as PEFT's true");
    int n = 0;
    hf_module *mods = pa_list_modules(c, &n);
    unsigned char *matched = mods ? calloc((size_t)n, 1) : NULL, *layers = calloc((size_t)c->n_layers + 1, 1);
    if (!mods || !matched || !layers) {
        free(mods);
        free(matched);
        free(layers);
        return pr_errorf(R->err, PR_ERR_NOMEM, "%s: out of memory", R->dir);
    }
    uint32_t sites = 0;
    rc = pa_match_modules(R, c, pa_lora_site_of, mods, n, matched, &sites, layers);
    /* per-site rank and alpha: every layer's module of a site must agree */
    double site_r[PR_SITE_COUNT], site_a[PR_SITE_COUNT];
    const char *site_first[PR_SITE_COUNT] = { 0 };
    for (int k = 0; k < n && !rc; k++) {
        if (!matched[k])
            continue;
        uint32_t bits = 0;
        pa_lora_site_of(R, c, &mods[k], &bits);
        int s = pa_site_index(bits);
        double rv = (double)r, av = alpha;
        if (pa_pattern_value(R, "rank_pattern", mods[k].name, &rv) < 0 ||
            pa_pattern_value(R, "alpha_pattern", mods[k].name, &av) < 0) {
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
            rc = pr_errorf(R->err, PR_ERR_UNSUPPORTED,
                           "%s/" CONFIG_NAME ": %s = %s gives '%s' %s %g but '%s' %g; "
                           "peftref's ranks and alphas are per site, the same on every layer",
                           R->dir, fld, pa_json_text(pa_get(R, fld), b, sizeof b), site_first[s],
                           site_r[s] != rv ? "rank" : "alpha", site_r[s] != rv ? site_r[s] : site_a[s], mods[k].name,
                           site_r[s] != rv ? rv : av);
        }
    }
    free(mods);
    free(matched);
    if (!rc)
        rc = pa_set_sites_layers(R, c, sites, layers);
    free(layers);
    if (rc)
        return rc;
    if ((rc = pa_push_num(R, "r", (double)r, -1)) || (rc = pa_push_num(R, "alpha", alpha, -1)) ||
        (rc = pa_push_num(R, "dropout", dropout, -1)) ||
        (rc = pa_push_opt(R, "use_rslora", rslora ? "true" : "false", -1)))
        return rc;
    if (!dora && (rc = pa_push_opt(R, "init_lora_weights", init_name, -1)))
        return rc;
    for (int s = 0; s < PR_SITE_COUNT && !rc; s++) {
        if (!site_first[s])
            continue;
        if (site_r[s] != (double)r)
            rc = pa_push_num(R, "r", site_r[s], s);
        if (!rc && site_a[s] != alpha)
            rc = pa_push_num(R, "alpha", site_a[s], s);
    }
    return rc;
}

int pa_open_ia3(reader *R, const pr_model_config *c)
{
    int rc = pa_check_fields(R, ia3_fields, NELEM(ia3_fields));
    if (rc || (rc = pa_check_fan_in_fan_out(R, c)))
        return rc;
    const json_t *ff = pa_get(R, "feedforward_modules");
    if ((rc = pa_check_name_list(R, "feedforward_modules", ff, 0)))
        return rc;
    int n = 0;
    hf_module *mods = pa_list_modules(c, &n);
    unsigned char *matched = mods ? calloc((size_t)n, 1) : NULL, *layers = calloc((size_t)c->n_layers + 1, 1);
    if (!mods || !matched || !layers) {
        free(mods);
        free(matched);
        free(layers);
        return pr_errorf(R->err, PR_ERR_NOMEM, "%s: out of memory", R->dir);
    }
    uint32_t sites = 0;
    rc = pa_match_modules(R, c, pa_ia3_site_of, mods, n, matched, &sites, layers);
    free(mods);
    free(matched);
    if (!rc)
        rc = pa_set_sites_layers(R, c, sites, layers);
    free(layers);
    return rc;
}

/* ---- the further weight types ------------------------------------------------------------------ */

int pa_check_bias(reader *R)
{
    const json_t *bias = pa_get(R, "bias");
    if (bias && !(json_is_string(bias) && !strcmp(json_string_value(bias), "none"))) {
        char why[128];
        snprintf(why, sizeof why, "peftref's %s trains no biases (BitFit is a module of its own)", R->tech);
        return pa_bad_value(R, "bias", bias, why);
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



/* target_modules etc. matched as for LoRA (projection modules), and the
 * *_pattern fields resolved per module: they must agree along the layers
 * of a site; values that differ from the module's become site options. */
int pa_open_targets(reader *R, const pr_model_config *c, const site_pattern *pats, int n_pats)
{
    int n = 0;
    hf_module *mods = pa_list_modules(c, &n);
    unsigned char *matched = mods ? calloc((size_t)n, 1) : NULL, *layers = calloc((size_t)c->n_layers + 1, 1);
    double(*val)[4] = calloc(PR_SITE_COUNT, sizeof *val);
    const char **first = calloc(PR_SITE_COUNT, sizeof *first);
    int rc = PR_OK;
    if (!mods || !matched || !layers || !val || !first || n_pats > 4)
        rc = pr_errorf(R->err, PR_ERR_NOMEM, "%s: out of memory", R->dir);
    uint32_t sites = 0;
    if (!rc)
        rc = pa_match_modules(R, c, pa_lora_site_of, mods, n, matched, &sites, layers);
    for (int k = 0; k < n && !rc; k++) {
        uint32_t bits = 0;
        if (!matched[k] || pa_lora_site_of(R, c, &mods[k], &bits) != 1)
            continue;
        int s = pa_site_index(bits);
        for (int q = 0; q < n_pats && !rc; q++) {
            double v = pats[q].def;
            if (pa_pattern_value(R, pats[q].field, mods[k].name, &v) < 0) {
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
                rc = pr_errorf(R->err, PR_ERR_UNSUPPORTED,
                               "%s/" CONFIG_NAME ": %s = %s gives '%s' %g but '%s' %g; "
                               "peftref's %s is per site, the same on every layer",
                               R->dir, pats[q].field, pa_json_text(pa_get(R, pats[q].field), b, sizeof b), first[s],
                               val[s][q], mods[k].name, v, pats[q].opt);
            }
        }
        if (!first[s])
            first[s] = mods[k].name;
    }
    if (!rc)
        rc = pa_set_sites_layers(R, c, sites, layers);
    for (int s = 0; s < PR_SITE_COUNT && !rc; s++)
        for (int q = 0; first[s] && q < n_pats && !rc; q++)
            if (val[s][q] != pats[q].def)
                rc = pa_push_num(R, pats[q].opt, val[s][q], s);
    free(mods);
    free(matched);
    free(layers);
    free(val);
    free(first);
    return rc;
}

int pa_num_field(reader *R, const char *field, double def, double min, double *out)
{
    int rc = pa_get_num(R, field, def, out);
    if (!rc && *out < min) {
        char why[64];
        snprintf(why, sizeof why, "expected a value >= %g", min);
        return pa_bad_value(R, field, pa_get(R, field), why);
    }
    return rc;
}

static int bool_field(reader *R, const char *field, int def, const char *opt)
{
    int v = def, rc = PR_OK;
    if (pa_get(R, field))
        rc = pa_get_bool(R, field, &v);
    return rc ? rc : pa_push_opt(R, opt, v ? "true" : "false", -1);
}

/* Tensors PEFT's LOKR makes in branches peftref's technique does not take. */
static int lokr_tensors(reader *R)
{
    for (int i = 0; i < st_count(R->f->st); i++) {
        const char *nm = st_tensor_at(R->f->st, i)->name;
        const char *d = strrchr(nm, '.');
        if (d && (!strcmp(d, ".lokr_w2") || !strcmp(d, ".lokr_w1_a") || !strcmp(d, ".lokr_w1_b") ||
                  !strcmp(d, ".lokr_t2")))
            return pr_errorf(R->err, PR_ERR_UNSUPPORTED, "%s/" WEIGHTS_NAME ": tensor '%s' is PEFT's %s, which "
                             "peftref's %s does not have (it keeps lokr_w1 whole and lokr_w2 as lokr_w2_a . "
                             "lokr_w2_b, PEFT's choice for r < max(k, n) / 2)", R->dir, nm, d + 1, R->tech);
    }
    return PR_OK;
}

int pa_open_weight_type(reader *R, const pr_model_config *c)
{
    const char *T = R->type;
    int rc;
    double r, alpha, v;
    if (!strcmp(T, "LOHA") || !strcmp(T, "LOKR")) {
        int lokr = !strcmp(T, "LOKR");
        if ((rc = lokr ? pa_check_fields(R, lokr_fields, NELEM(lokr_fields)) : pa_check_fields(R, loha_fields,
                                                                                         NELEM(loha_fields))) ||
            (rc = linear_only(R, c)))
            return rc;
        if (lokr) {
            long long f;
            if ((rc = pa_get_int(R, "decompose_factor", 0, -1000000, &f)) > PR_OK)
                return rc;
            if (rc == PR_OK && f != -1)
                return pa_bad_value(R, "decompose_factor", pa_get(R, "decompose_factor"),
                                 "peftref's {tech} factors each width near its square root (-1)");
            if ((rc = lokr_tensors(R)))
                return rc;
        }
        if ((rc = pa_num_field(R, "r", 8, 1, &r)) || (rc = pa_num_field(R, "alpha", 8, 0, &alpha)))
            return rc;
        if (r != floor(r))
            return pa_bad_value(R, "r", pa_get(R, "r"), "expected an integer");
        site_pattern pats[] = { { "rank_pattern", "r", r, 1 }, { "alpha_pattern", "alpha", alpha, 0 } };
        if ((rc = pa_push_num(R, "r", r, -1)) || (rc = pa_push_num(R, "alpha", alpha, -1)))
            return rc;
        return pa_open_targets(R, c, pats, NELEM(pats));
    }
    if (!strcmp(T, "VERA")) {
        double dropout, d_initial;
        if ((rc = pa_check_fields(R, vera_fields, NELEM(vera_fields))) || (rc = pa_check_fan_in_fan_out(R, c)) ||
            (rc = pa_check_bias(R)) ||
            (rc = pa_num_field(R, "r", 256, 1, &r)) || (rc = pa_num_field(R, "vera_dropout", 0, 0, &dropout)) ||
            (rc = pa_get_num(R, "d_initial", 0.1, &d_initial)))
            return rc;
        if ((rc = pa_push_num(R, "r", r, -1)) || (rc = pa_push_num(R, "dropout", dropout, -1)) ||
            (rc = pa_push_num(R, "d_initial", d_initial, -1)) || (rc = pa_push_opt(R, "save_projection", "true", -1)))
            return rc;
        return pa_open_targets(R, c, NULL, 0);
    }
    if (!strcmp(T, "OFT")) {
        double bs;
        if ((rc = pa_check_fields(R, oft_fields, NELEM(oft_fields))) || (rc = linear_only(R, c)) ||
            (rc = pa_check_fan_in_fan_out(R, c)) || (rc = pa_check_bias(R)) ||
            (rc = pa_num_field(R, "r", 0, 0, &r)) ||
            (rc = pa_num_field(R, "oft_block_size", 32, 0, &bs)))
            return rc;
        if ((r == 0) == (bs == 0))
            return pa_bad_value(R, r ? "r" : "oft_block_size", pa_get(R, r ? "r" : "oft_block_size"),
                             "PEFT's OFT takes exactly one of r and oft_block_size non-zero");
        if ((rc = pa_push_num(R, "r", r, -1)) || (rc = pa_push_num(R, "oft_block_size", bs, -1)))
            return rc;
        return pa_open_targets(R, c, NULL, 0);
    }
    if (!strcmp(T, "BOFT")) {
        double bs, bn, m;
        if ((rc = pa_check_fields(R, boft_fields, NELEM(boft_fields))) || (rc = linear_only(R, c)) ||
            (rc = pa_check_fan_in_fan_out(R, c)) || (rc = pa_check_bias(R)) ||
            (rc = pa_num_field(R, "boft_block_size", 4, 0, &bs)) ||
            (rc = pa_num_field(R, "boft_block_num", 0, 0, &bn)) ||
            (rc = pa_num_field(R, "boft_n_butterfly_factor", 1, 1, &m)))
            return rc;
        if ((bs == 0) == (bn == 0))
            return pa_bad_value(R, bs ? "boft_block_size" : "boft_block_num",
                                pa_get(R, bs ? "boft_block_size" : "boft_block_num"),
                                "PEFT's BOFT takes exactly one of boft_block_size and boft_block_num non-zero");
        if ((rc = pa_push_num(R, "boft_block_size", bs, -1)) || (rc = pa_push_num(R, "boft_block_num", bn, -1)) ||
            (rc = pa_push_num(R, "boft_n_butterfly_factor", m, -1)))
            return rc;
        return pa_open_targets(R, c, NULL, 0);
    }
    if (!strcmp(T, "HRA")) {
        if ((rc = pa_check_fields(R, hra_fields, NELEM(hra_fields))) || (rc = linear_only(R, c)) ||
            (rc = pa_check_bias(R)) ||
            (rc = pa_num_field(R, "r", 8, 1, &r)) || (rc = pa_push_num(R, "r", r, -1)) ||
            (rc = bool_field(R, "init_weights", 1, "init_weights")))
            return rc;
        return pa_open_targets(R, c, NULL, 0);
    }
    /* FOURIERFT */
    double scaling;
    if ((rc = pa_check_fields(R, fourierft_fields, NELEM(fourierft_fields))) ||
        (rc = pa_check_fan_in_fan_out(R, c)) || (rc = pa_check_bias(R)) ||
        (rc = pa_num_field(R, "n_frequency", 1000, 1, &v)) ||
        (rc = pa_num_field(R, "scaling", 150, 0, &scaling)) || (rc = pa_num_field(R, "random_loc_seed", 777, 0, &r)))
        return rc;
    if (r != floor(r) || r > 4294967295.0)
        return pa_bad_value(R, "random_loc_seed", pa_get(R, "random_loc_seed"), "expected a seed in 0 .. 2^32 - 1");
    site_pattern pats[] = { { "n_frequency_pattern", "n_frequency", v, 1 } };
    if ((rc = pa_push_num(R, "n_frequency", v, -1)) || (rc = pa_push_num(R, "scaling", scaling, -1)) ||
        (rc = pa_push_num(R, "random_loc_seed", r, -1)) || (rc = bool_field(R, "init_weights", 0, "init_weights")) ||
        (rc = pa_push_opt(R, "ifft2_norm", "backward", -1)))
        return rc;
    return pa_open_targets(R, c, pats, NELEM(pats));
}

/* TRAINABLE_TOKENS: rows of the token embedding. */
int pa_open_trainable_tokens(reader *R, const pr_model_config *c)
{
    int rc = pa_check_fields(R, tt_fields, NELEM(tt_fields));
    if (rc)
        return rc;
    if (c->tied_head)
        return pr_errorf(R->err, PR_ERR_UNSUPPORTED, "%s/" CONFIG_NAME ": the base model ties its output head to "
                         "the token embedding; PEFT's TRAINABLE_TOKENS then replaces the head's rows too, and "
                         "peftref's %s replaces the input rows only", R->dir, R->tech);
    const char *embed = c->family == PR_FAMILY_GPT2 ? "transformer.wte" : "model.embed_tokens";
    const json_t *tm = pa_get(R, "target_modules");
    if (tm && (rc = pa_check_name_list(R, "target_modules", tm, 0)))
        return rc;
    int hit = tm ? pa_names_match(R, "target_modules", tm, embed) : 1;
    if (hit < 0)
        return PR_ERR_UNSUPPORTED;
    if (!hit)
        return pa_bad_value(R, "target_modules", tm, "peftref's {tech} works on the token embedding only");
    const json_t *ids = pa_get(R, "token_indices");
    if (!ids || !json_is_array(ids) || json_array_size(ids) == 0)
        return pa_bad_value(R, "token_indices", ids, "expected a non-empty list of token ids");
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
            return pa_bad_value(R, "token_indices", ids, why);
        }
        len += (size_t)snprintf(text + len, cap - len, "%s%lld", i ? ", " : "", id);
    }
    rc = pa_push_opt(R, "token_indices", text, -1);
    free(text);
    if (rc || (rc = pa_push_num(R, "n_token_indices", (double)json_array_size(ids), -1)) ||
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
    if ((rc = pa_get_int(R, "token_dim", 0, 1, &v)) > PR_OK)
        return rc;
    if (rc == PR_OK && v != token_dim)
        return pr_errorf(R->err, PR_ERR_INVALID, "%s/" CONFIG_NAME ": token_dim = %lld does not fit the base model, "
                         "whose %s is %lld", R->dir, v, token_dim_is, (long long)token_dim);
    if ((rc = pa_get_int(R, "num_layers", 0, 1, &v)) > PR_OK)
        return rc;
    if (rc == PR_OK && v != c->n_layers)
        return pr_errorf(R->err, PR_ERR_INVALID, "%s/" CONFIG_NAME ": num_layers = %lld, but the base model has %d "
                         "layers", R->dir, v, c->n_layers);
    if ((rc = pa_get_int(R, "num_attention_heads", 0, 1, &v)) > PR_OK)
        return rc;
    if (rc == PR_OK && v != heads_ok_a && v != heads_ok_b)
        return pr_errorf(R->err, PR_ERR_INVALID, "%s/" CONFIG_NAME ": num_attention_heads = %lld, but the base model "
                         "has %d (%d key/value heads)", R->dir, v, c->n_heads, c->n_kv_heads);
    if ((rc = pa_get_int(R, "num_transformer_submodules", 0, 1, &v)) > PR_OK)
        return rc;
    if (rc == PR_OK && v != 1)
        return pa_bad_value(R, "num_transformer_submodules", pa_get(R, "num_transformer_submodules"),
                         "a decoder-only model has one (2 is for encoder-decoder models)");
    return PR_OK;
}

/* prefix: PREFIX_TUNING; ptuning: P_TUNING, whose file holds the prompt
 * encoder's output, a plain prompt (what a P_TUNING technique folds to). */
int pa_open_prompt(reader *R, const pr_model_config *c, int prefix, int ptuning)
{
    int rc = prefix ? pa_check_fields(R, prefix_fields, NELEM(prefix_fields))
             : ptuning ? pa_check_fields(R, ptuning_fields, NELEM(ptuning_fields))
                       : pa_check_fields(R, prompt_fields, NELEM(prompt_fields));
    if (rc)
        return rc;
    const json_t *ert = ptuning ? pa_get(R, "encoder_reparameterization_type") : NULL;
    if (ert && !(json_is_string(ert) && (!strcmp(json_string_value(ert), "MLP") ||
                                         !strcmp(json_string_value(ert), "LSTM"))))
        return pa_bad_value(R, "encoder_reparameterization_type", ert, "PEFT's prompt encoder is MLP or LSTM");
    long long nv;
    if ((rc = pa_get_int(R, "num_virtual_tokens", 1, 1, &nv)))
        return rc;
    int64_t d_kv = (int64_t)c->n_kv_heads * c->d_head;
    /* prefix tuning: PEFT's past_key_values are num_key_value_heads * head_dim wide */
    rc = prefix ? check_prompt_shape(R, c, d_kv, "key/value width (num_key_value_heads * head_dim)", c->n_kv_heads,
                                     c->n_kv_heads == c->n_heads ? c->n_heads : c->n_kv_heads)
                : check_prompt_shape(R, c, c->d_model, "hidden size", c->n_heads, c->n_kv_heads);
    if (rc || (rc = pa_push_num(R, "n_tokens", (double)nv, -1)))
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
    const json_t *init = pa_get(R, "prompt_tuning_init"), *text = pa_get(R, "prompt_tuning_init_text");
    const char *how = init && json_is_string(init) ? json_string_value(init) : "RANDOM";
    if (!strcmp(how, "RANDOM"))
        rc = pa_push_opt(R, "init", "normal", -1);
    else if (!strcmp(how, "SAMPLE_VOCAB"))
        rc = pa_push_opt(R, "init", "embed_rows", -1);
    else if (!strcmp(how, "TEXT") && text && json_is_string(text))
        rc = pa_push_opt(R, "init", "text", -1) ? PR_ERR_NOMEM
                                                : pa_push_opt(R, "init_text", json_string_value(text), -1);
    else
        return pa_bad_value(R, "prompt_tuning_init", init, "peftref offers RANDOM, SAMPLE_VOCAB and TEXT (with "
                         "prompt_tuning_init_text)");
    if (!rc && text && !json_is_string(text))
        return pa_bad_value(R, "prompt_tuning_init_text", text, "expected a string");
    return rc;
}

