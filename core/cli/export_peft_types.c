/* peftref export --format peft: adapter_config.json of the PEFT types
 * beyond LORA, IA3 and the prompt types' common fields (LOHA, LOKR, VERA,
 * OFT, BOFT, HRA, FOURIERFT, TRAINABLE_TOKENS, the prompt types, IA3) and
 * AdaLoRA's per-module tensors; export_peft.c calls them. */
#include "config.h"

#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "export.h"
#include "module_file.h"
#include "peft_adapter.h"
#include "peftref/pipeline.h"

#include "export_peft.h"

/* ---- the further weight types: LOHA, LOKR, VERA, OFT, HRA, FOURIERFT ----------------------------------- */

/* A per-site option that PEFT's config has one value for: the module's, or
 * an error naming the site whose value differs. */
static int one_value(const job *j, const char *opt, const char *field, double *out)
{
    double v = xp_opt_num(j, opt, -1, 0);
    uint32_t sites = pr_module_sites(j->mod);
    for (int s = 0; s < PR_SITE_COUNT; s++)
        if ((sites & PR_SITE_BIT(s)) && xp_opt_num(j, opt, s, v) != v)
            return ERR("module '%s' (technique %s) sets %s per site (%g at %s, %g for the module); PEFT's %s has "
                       "one value for every module; use --format peftref", pr_module_name(j->mod), j->t->name, opt,
                       xp_opt_num(j, opt, s, v), pr_site_name(s), v, field);
    *out = v;
    return 0;
}

/* The sites whose option opt differs from the module's, as PEFT's
 * *_pattern object (module name -> value). */
static json_t *site_pattern(const job *j, const char *opt, double def)
{
    json_t *p = json_object();
    uint32_t sites = pr_module_sites(j->mod);
    for (int s = 0; s < PR_SITE_COUNT; s++) {
        const char *path = (sites & PR_SITE_BIT(s)) ? peft_site_path(j->cfg, s) : NULL;
        if (!path)
            continue;
        double v = xp_opt_num(j, opt, s, def);
        if (v != def)
            json_object_set_new(p, j->cfg->family == PR_FAMILY_GPT2 ? path : strrchr(path, '.') + 1, xp_num_json(v));
    }
    return p;
}

/* PEFT adapts these types only in nn.Linear (and convolution) layers; GPT-2's
 * projections are transformers' Conv1D, which their _create_new_module
 * refuses ("Target module ... is not supported"). */
static int linear_only(const job *j)
{
    if (j->cfg->family != PR_FAMILY_GPT2)
        return 0;
    return ERR("module '%s' (technique %s): Hugging Face PEFT's %s adapts torch.nn.Linear layers only, and GPT-2's "
               "projections are transformers' Conv1D, which it refuses; use --format peftref",
               pr_module_name(j->mod), j->t->name, j->t->peft_type);
}

static void target_fields(const job *j, json_t *c, int has_exclude, int has_fifo)
{
    json_object_set_new(c, "target_modules", xp_site_names(j, pr_module_sites(j->mod), 1));
    if (has_exclude)
        json_object_set_new(c, "exclude_modules", json_null());
    if (has_fifo)
        json_object_set_new(c, "fan_in_fan_out", json_boolean(j->cfg->family == PR_FAMILY_GPT2));
    xp_set_layers(j, c);
}

/* LoKr's factorised lokr_w2 exists in PEFT only when r < max(k, n) / 2 (else
 * it is one full lokr_w2 (k, n), LoKrLayer.update_layer's use_w2). */
static int lokr_check(const job *j, const adapter *a)
{
    for (int i = 0; i < a->n; i++) {
        const tensor_out *w2a = &a->t[i];
        size_t L = strlen(w2a->name);
        if (L < 10 || strcmp(w2a->name + L - 10, ".lokr_w2_a"))
            continue;
        char bname[256];
        snprintf(bname, sizeof bname, "%.*s.lokr_w2_b", (int)(L - 10), w2a->name);
        const tensor_out *w2b = xp_find_tensor((adapter *)a, bname);
        if (!w2b)
            continue;
        int64_t k = w2a->shape[0], r = w2a->shape[1], n = w2b->shape[1], mx = k > n ? k : n;
        if (2 * r >= mx)
            return ERR("module '%s' (technique %s): at %.*s, r = %lld is not below max(k, n) / 2 = %lld / 2, "
                       "where Hugging Face PEFT's LoKr keeps one full lokr_w2 (%lld, %lld) instead of lokr_w2_a and "
                       "lokr_w2_b; use --format peftref (or a smaller r)", pr_module_name(j->mod), j->t->name, (int)(L - 10),
                       w2a->name, (long long)r, (long long)mx, (long long)k, (long long)n);
    }
    return 0;
}

int xp_lycoris_config(const job *j, json_t *c, const adapter *a, int lokr)
{
    int rc = linear_only(j);
    if (rc || (lokr && (rc = lokr_check(j, a))))
        return rc;
    double r = xp_opt_num(j, "r", -1, 8), alpha = xp_opt_num(j, "alpha", -1, 8);
    json_object_set_new(c, "r", xp_num_json(r));
    json_object_set_new(c, "alpha", xp_num_json(alpha));
    json_object_set_new(c, "rank_pattern", site_pattern(j, "r", r));
    json_object_set_new(c, "alpha_pattern", site_pattern(j, "alpha", alpha));
    json_object_set_new(c, "rank_dropout", json_real(0.0));
    json_object_set_new(c, "module_dropout", json_real(0.0));
    json_object_set_new(c, "use_effective_conv2d", json_false());
    json_object_set_new(c, "init_weights", json_true());
    if (lokr) {
        json_object_set_new(c, "decompose_both", json_false());
        json_object_set_new(c, "decompose_factor", json_integer(-1));
        json_object_set_new(c, "rank_dropout_scale", json_false());
    }
    target_fields(j, c, 1, 0);
    return 0;
}

int xp_vera_config(const job *j, json_t *c)
{
    if (xp_opt_num(j, "save_projection", -1, 1) == 0)
        return ERR("module '%s' (technique %s) regenerates vera_A and vera_B from peftref's seed, which Hugging Face "
                   "PEFT (projection_prng_key through torch's generator) does not reproduce; train with technique "
                   "vera (save_projection true) or use --format peftref", pr_module_name(j->mod), j->t->name);
    double d_initial;
    int rc = one_value(j, "d_initial", "d_initial", &d_initial);
    if (rc)
        return rc;
    json_object_set_new(c, "r", xp_num_json(xp_opt_num(j, "r", -1, 256)));
    json_object_set_new(c, "projection_prng_key", json_integer(0));
    json_object_set_new(c, "save_projection", json_true());
    json_object_set_new(c, "vera_dropout", json_real(xp_opt_num(j, "dropout", -1, 0)));
    json_object_set_new(c, "d_initial", json_real(d_initial));
    json_object_set_new(c, "bias", json_string("none"));
    json_object_set_new(c, "init_weights", json_true());
    target_fields(j, c, 0, 1);
    return 0;
}

int xp_oft_config(const job *j, json_t *c)
{
    double r, bs;
    int rc = linear_only(j);
    if (rc || (rc = one_value(j, "r", "r", &r)) || (rc = one_value(j, "oft_block_size", "oft_block_size", &bs)))
        return rc;
    json_object_set_new(c, "r", xp_num_json(r));
    json_object_set_new(c, "oft_block_size", xp_num_json(r ? 0 : bs));
    json_object_set_new(c, "module_dropout", json_real(0.0));
    json_object_set_new(c, "bias", json_string("none"));
    json_object_set_new(c, "init_weights", json_true());
    json_object_set_new(c, "coft", json_false());
    json_object_set_new(c, "eps", json_real(6e-05));
    json_object_set_new(c, "block_share", json_false());
    /* peftref computes the exact Cayley transform (plugins/oft.c) */
    json_object_set_new(c, "use_cayley_neumann", json_false());
    json_object_set_new(c, "num_cayley_neumann_terms", json_integer(5));
    target_fields(j, c, 1, 1);
    return 0;
}

/* BOFTConfig: boft_block_size and boft_block_num are exclusive (one is 0);
 * peftref's boft takes boft_block_size when it is set. */
int xp_boft_config(const job *j, json_t *c)
{
    double bs, bn, m;
    int rc = linear_only(j);
    if (rc || (rc = one_value(j, "boft_block_size", "boft_block_size", &bs)) ||
        (rc = one_value(j, "boft_block_num", "boft_block_num", &bn)) ||
        (rc = one_value(j, "boft_n_butterfly_factor", "boft_n_butterfly_factor", &m)))
        return rc;
    json_object_set_new(c, "boft_block_size", xp_num_json(bs));
    json_object_set_new(c, "boft_block_num", xp_num_json(bs ? 0 : bn));
    json_object_set_new(c, "boft_n_butterfly_factor", xp_num_json(m));
    json_object_set_new(c, "boft_dropout", json_real(0.0));
    json_object_set_new(c, "bias", json_string("none"));
    json_object_set_new(c, "init_weights", json_true());
    target_fields(j, c, 1, 1);
    return 0;
}

int xp_hra_config(const job *j, json_t *c)
{
    double r;
    int rc = linear_only(j);
    if (rc || (rc = one_value(j, "r", "r", &r)))
        return rc;
    json_object_set_new(c, "r", xp_num_json(r));
    json_object_set_new(c, "apply_GS", json_false());
    json_object_set_new(c, "init_weights", json_boolean(xp_opt_num(j, "init_weights", -1, 1) != 0));
    json_object_set_new(c, "bias", json_string("none"));
    target_fields(j, c, 1, 0);
    return 0;
}

int xp_fourierft_config(const job *j, json_t *c)
{
    const char *norm = xp_opt_str(j, "ifft2_norm");
    if (norm && strcmp(norm, "backward"))
        return ERR("module '%s' (technique %s) uses ifft2_norm %s; Hugging Face PEFT's FourierFT uses "
                   "torch.fft.ifft2's default (backward) and has no field for another; use --format peftref",
                   pr_module_name(j->mod), j->t->name, norm);
    double n = xp_opt_num(j, "n_frequency", -1, 1000);
    json_object_set_new(c, "n_frequency", xp_num_json(n));
    json_object_set_new(c, "n_frequency_pattern", site_pattern(j, "n_frequency", n));
    json_object_set_new(c, "scaling", json_real(xp_opt_num(j, "scaling", -1, 150)));
    json_object_set_new(c, "random_loc_seed", xp_num_json(xp_opt_num(j, "random_loc_seed", -1, 777)));
    json_object_set_new(c, "init_weights", json_boolean(xp_opt_num(j, "init_weights", -1, 0) != 0));
    json_object_set_new(c, "bias", json_string("none"));
    target_fields(j, c, 1, 1);
    return 0;
}

/* TrainableTokensConfig: the embedding's rows token_indices.  PEFT ties the
 * same rows of a tied output head to them; peftref's trainable_tokens
 * changes the input side only. */
int xp_trainable_tokens_config(const job *j, json_t *c)
{
    if (j->cfg->tied_head)
        return ERR("module '%s' (technique %s): the base model ties its output head to the token "
                   "embedding, where Hugging Face PEFT's TRAINABLE_TOKENS replaces the head's rows too and peftref's "
                   "%s only the input rows; use --format peftref", pr_module_name(j->mod), j->t->name, j->t->name);
    const char *ids = xp_opt_str(j, "token_indices");
    json_t *a = json_array();
    for (const char *s = ids ? ids : ""; *s;) {
        char *end;
        long v = strtol(s, &end, 10);
        if (end == s) {
            s++;
            continue;
        }
        json_array_append_new(a, json_integer(v));
        s = end;
    }
    json_object_set_new(c, "token_indices", a);
    json_t *tm = json_array();
    json_array_append_new(tm, json_string(j->cfg->family == PR_FAMILY_GPT2 ? "wte" : "embed_tokens"));
    json_object_set_new(c, "target_modules", tm);
    json_object_set_new(c, "init_weights", json_boolean(xp_opt_num(j, "init_weights", -1, 1) != 0));
    return 0;
}

int xp_ia3_config(const job *j, json_t *c)
{
    uint32_t sites = pr_module_sites(j->mod);
    if (j->cfg->family != PR_FAMILY_GPT2 && (sites & (PR_SITE_BIT(PR_SITE_ATTN_K) | PR_SITE_BIT(PR_SITE_ATTN_V))))
        return ERR("module '%s' (technique %s) scales keys or values after RoPE (attn.k, attn.v), which PEFT's "
                   "k_proj / v_proj vectors do not express on a LLaMA-family model (use sites k and v); use "
                   "--format peftref", pr_module_name(j->mod), j->t->name);
    json_object_set_new(c, "target_modules", xp_site_names(j, sites, 0));
    json_t *ff = json_array();
    if (sites & PR_SITE_BIT(PR_SITE_FFN_ACT)) {
        const char *p = peft_site_path(j->cfg, PR_SITE_FFN_DOWN);
        json_array_append_new(ff, json_string(j->cfg->family == PR_FAMILY_GPT2 ? p : strrchr(p, '.') + 1));
    }
    json_object_set_new(c, "feedforward_modules", ff);
    json_object_set_new(c, "exclude_modules", json_null());
    json_object_set_new(c, "fan_in_fan_out", json_boolean(j->cfg->family == PR_FAMILY_GPT2));
    json_object_set_new(c, "init_ia3_weights", json_true());
    return 0;
}

void xp_prompt_config(const job *j, json_t *c, int prefix, int ptuning)
{
    const pr_model_config *g = j->cfg;
    json_object_set_new(c, "num_virtual_tokens", xp_num_json(xp_opt_num(j, "n_tokens", -1, 0)));
    json_object_set_new(c, "num_layers", json_integer(g->n_layers));
    json_object_set_new(c, "num_transformer_submodules", json_integer(1));
    if (prefix) {
        /* PEFT's past_key_values per layer: num_key_value_heads heads of head_dim */
        json_object_set_new(c, "token_dim", json_integer((json_int_t)g->n_kv_heads * g->d_head));
        json_object_set_new(c, "num_attention_heads", json_integer(g->n_kv_heads));
        json_object_set_new(c, "encoder_hidden_size", json_integer(g->d_model));
        json_object_set_new(c, "prefix_projection", json_false());
        return;
    }
    json_object_set_new(c, "token_dim", json_integer(g->d_model));
    json_object_set_new(c, "num_attention_heads", json_integer(g->n_heads));
    if (ptuning) {
        /* PromptEncoderConfig; the file holds the MLP's output (p_tuning folds
         * to it when saved), which PEFT's PromptEncoder in inference mode
         * uses as its embedding */
        json_object_set_new(c, "encoder_reparameterization_type", json_string("MLP"));
        double h = xp_opt_num(j, "encoder_hidden_size", -1, 0);   /* 0: token_dim, PEFT's None */
        json_object_set_new(c, "encoder_hidden_size", json_integer(h > 0 ? (json_int_t)h : g->d_model));
        json_object_set_new(c, "encoder_num_layers", json_integer(2));
        json_object_set_new(c, "encoder_dropout", json_real(0.0));
        return;
    }
    const char *init = xp_opt_str(j, "init"), *text = xp_opt_str(j, "init_text");
    int is_text = init && !strcmp(init, "text");
    json_object_set_new(c, "prompt_tuning_init",
                        json_string(is_text ? "TEXT" : init && !strcmp(init, "normal") ? "RANDOM" : "SAMPLE_VOCAB"));
    json_object_set_new(c, "prompt_tuning_init_text", is_text && text ? json_string(text) : json_null());
    json_object_set_new(c, "tokenizer_name_or_path", json_null());
    json_object_set_new(c, "tokenizer_kwargs", json_null());
}

/* ---- ADALORA ----------------------------------------------------------------------------------------- */

/* An ADALORA technique keeps init_r triplets per insertion, lora_E of every
 * insertion in one (insertions, init_r) tensor (row k: insertion k, layer
 * by layer in site order), and the mask of kept triplets in its
 * rank_pattern buffer, which module files do not carry (it comes back as
 * ones).  What PEFT saves (AdaLoraModel.resize_state_dict_by_rank_pattern)
 * is each module's kept triplets only: lora_A (k, in), lora_B (out, k),
 * lora_E (k, 1), with rank_pattern {"<module>.lora_E": init_r booleans}.
 * A triplet is kept when the buffer keeps it and its singular value is not
 * 0: the budget's masking zeroes lora_E and every step after the final
 * allocation zeroes it again, so a pruned triplet's value is exactly 0
 * where a trained kept one is not.  A module whose lora_E is 0 everywhere
 * (never trained) is written whole with rank_pattern null, so it keeps
 * training as it would in peftref. */
int xp_adalora_tensors(job *j, adapter *a, json_t *c)
{
    const char *mname = pr_module_name(j->mod);
    const float *E = NULL, *P = NULL;
    int64_t n_rows = 0, r = 0;
    for (int i = 0; i < pr_module_n_params(j->mod); i++) {
        pr_module_param p;
        pr_module_param_at(j->mod, i, &p);
        if (!strcmp(p.param, "lora_E") || !strcmp(p.param, "rank_pattern")) {
            if (p.ndim != 2)
                return ERR("module '%s': %s is not 2-dimensional", mname, p.param);
            *(!strcmp(p.param, "lora_E") ? &E : &P) = p.data;
            n_rows = p.shape[0];
            r = p.shape[1];
        }
    }
    if (!E)
        return ERR("module '%s' (technique %s, PEFT type ADALORA) has no lora_E", mname, j->t->name);
    int any = 0, pruned = 0;
    for (int64_t i = 0; i < n_rows * r; i++) {
        any |= E[i] != 0.0f;
        pruned |= E[i] == 0.0f || (P && P[i] == 0.0f);
    }
    int resize = any && pruned;
    uint32_t sites = pr_module_sites(j->mod);
    int n_sites = 0, nl = 0;
    for (int s = 0; s < PR_SITE_COUNT; s++)
        n_sites += (sites & PR_SITE_BIT(s)) != 0;
    const int *ls = pr_module_layers(j->mod, &nl);
    if (!ls)
        nl = j->cfg->n_layers;
    if ((int64_t)n_sites * nl != n_rows)
        return ERR("module '%s': lora_E has %lld rows for %d insertions", mname, (long long)n_rows, n_sites * nl);
    json_t *rp = resize ? json_object() : json_null();
    int rc = 0;
    for (int i = 0; !rc && i < pr_module_n_params(j->mod); i++) {
        pr_module_param p;
        pr_module_param_at(j->mod, i, &p);
        int is_a = !strcmp(p.param, "lora_A"), is_b = !strcmp(p.param, "lora_B");
        if (!is_a && !is_b)
            continue;
        const char *path = peft_site_path(j->cfg, p.site);
        if (!path) {
            rc = ERR("module '%s' (technique %s) adapts %s, which has no Hugging Face module name; use --format "
                     "peftref", mname, j->t->name, pr_site_name(p.site));
            break;
        }
        int li = 0, si = 0;
        while (ls && li < nl && ls[li] != p.layer)
            li++;
        if (!ls)
            li = p.layer;
        for (int s = 0; s < p.site; s++)
            si += (sites & PR_SITE_BIT(s)) != 0;
        int64_t k = (int64_t)li * n_sites + si;
        const float *ek = E + k * r, *pk = P ? P + k * r : NULL;
        int64_t kept = 0;
        for (int64_t q = 0; q < r; q++)
            kept += !resize || (ek[q] != 0.0f && (!pk || pk[q] != 0.0f));
        char mod[200], key[256];
        snprintf(mod, sizeof mod, "%s.%d.%s", peft_blocks_path(j->cfg), p.layer, path);
        int64_t shape[2];
        if (is_a) {
            shape[0] = kept;
            shape[1] = p.shape[1];
        } else {
            shape[0] = p.shape[0];
            shape[1] = kept;
        }
        snprintf(key, sizeof key, "base_model.model.%s.lora_%c", mod, is_a ? 'A' : 'B');
        tensor_out *o = xp_add_tensor(a, key, 2, shape);
        tensor_out *oe = NULL;
        if (o && is_a) {
            int64_t es[2] = { kept, 1 };
            snprintf(key, sizeof key, "base_model.model.%s.lora_E", mod);
            oe = xp_add_tensor(a, key, 2, es);
            o = &a->t[a->n - 2];   /* add_tensor may move the array */
        }
        if (!o || (is_a && !oe)) {
            rc = ERR("out of memory");
            break;
        }
        int64_t q = 0;
        json_t *bools = is_a && resize ? json_array() : NULL;
        for (int64_t t = 0; t < r; t++) {
            int keep = !resize || (ek[t] != 0.0f && (!pk || pk[t] != 0.0f));
            if (bools)
                json_array_append_new(bools, json_boolean(keep));
            if (!keep)
                continue;
            if (is_a) {
                memcpy(o->data + q * p.shape[1], p.data + t * p.shape[1], (size_t)p.shape[1] * sizeof(float));
                oe->data[q] = ek[t];
            } else {
                for (int64_t row = 0; row < p.shape[0]; row++)
                    o->data[row * kept + q] = p.data[row * r + t];
            }
            q++;
        }
        if (bools) {
            snprintf(key, sizeof key, "%s.lora_E", mod);
            json_object_set_new(rp, key, bools);
        }
    }
    if (rc) {
        json_decref(rp);
        return rc;
    }
    json_object_set_new(c, "rank_pattern", rp);
    return 0;
}

int xp_adalora_config(const job *j, json_t *c)
{
    int rc = xp_lora_config(j, c, 0);
    if (rc)
        return rc;
    json_object_set_new(c, "r", json_integer(8));   /* LoraConfig's r, which AdaLoRA does not use */
    json_object_del(c, "rank_pattern");
    static const char *const ints[][2] = { { "target_r", "target_r" }, { "init_r", "init_r" }, { "tinit", "tinit" },
                                           { "tfinal", "tfinal" }, { "deltaT", "delta_t" } };
    for (size_t i = 0; i < sizeof ints / sizeof ints[0]; i++)
        json_object_set_new(c, ints[i][0], xp_num_json(xp_opt_num(j, ints[i][1], -1, 0)));
    json_object_set_new(c, "beta1", json_real(xp_opt_num(j, "beta1", -1, 0.85)));
    json_object_set_new(c, "beta2", json_real(xp_opt_num(j, "beta2", -1, 0.85)));
    json_object_set_new(c, "orth_reg_weight", json_real(xp_opt_num(j, "orth_reg_weight", -1, 0.5)));
    double total = xp_opt_num(j, "total_step", -1, 0);
    json_object_set_new(c, "total_step", total > 0 ? xp_num_json(total) : json_null());
    return 0;
}

