/* peftref built-in plugins: a LORA adapter's adapter_config.json
 * (LoraConfig) from a module of lora, dora or lora_fa, and the conversion
 * of a pissa / olora module to a plain LoRA.
 *
 * A LORA module initialised by pissa or olora (option init_lora_weights)
 * computes x.W + s x.(A^T B^T - A0^T B0^T) with frozen A0, B0 from the base
 * weight (plugins/lora.c).  PEFT's conversion of such an adapter to a
 * plain LoRA on the original base (path_initial_model_for_weight_conversion)
 * is rank 2r with A' = [A; A0], B' = [B, -B0] and the scale kept:
 * lora_alpha' = 2 alpha (alpha sqrt(2) with use_rslora, whose scale is
 * alpha / sqrt(r)), and so for every site's r and alpha.  That is what is
 * written.  License: MIT */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <peftref/plugin.h>
#include <peftref/ext/peft_config.h>

#include "codecs.h"
#include "write_common.h"

/* field = {module: option * k} over the sites whose option differs from def */
static int put_scaled_pattern(const pr_peft_writer *h, pr_peft_out *out, const char *field, const char *option,
                              double def, double k)
{
    int rc = h->put_json(out, field, "{}");
    uint32_t sites = h->sites(out);
    for (int s = 0; !rc && s < PR_SITE_COUNT; s++) {
        const char *name = (sites & PR_SITE_BIT(s)) ? h->config_name(out, s) : NULL;
        if (!name)
            continue;
        double v = h->opt_num(out, option, s, def);
        if (v != def) {
            char num[40];
            peft_num_text(num, sizeof num, v * k);
            rc = h->put_item(out, field, name, num);
        }
    }
    return rc;
}

int peft_write_lora_config(const pr_peft_writer *h, pr_peft_out *out, int doubled)
{
    int rslora = h->opt_num(out, "use_rslora", -1, 0) != 0;
    /* the doubled rank of a converted pissa / olora module keeps s = alpha / r (or / sqrt(r)) */
    double rk = doubled ? 2.0 : 1.0, ak = doubled ? (rslora ? M_SQRT2 : 2.0) : 1.0;
    double r = h->opt_num(out, "r", -1, 8), alpha = h->opt_num(out, "alpha", -1, 8);
    int rc = 0;
    const char *init = h->opt_str(out, "init_lora_weights");
    if ((rc = h->put_num(out, "r", r * rk)) || (rc = h->put_num(out, "lora_alpha", alpha * ak)) ||
        (rc = h->put_real(out, "lora_dropout", h->opt_num(out, "dropout", -1, 0))) ||
        (rc = peft_put_bool(h, out, "use_rslora", rslora)) ||
        (rc = h->put_json(out, "use_dora", "false")) ||   /* a variant's implied fields are set after */
        (rc = peft_target_fields(h, out, 1, 1)) || (rc = h->put_str(out, "bias", "none")))
        return rc;
    if (!init || doubled || !strcmp(init, "true"))
        rc = h->put_json(out, "init_lora_weights", "true");
    else if (!strcmp(init, "false"))
        rc = h->put_json(out, "init_lora_weights", "false");
    else
        rc = h->put_str(out, "init_lora_weights", init);
    if (rc || (rc = put_scaled_pattern(h, out, "rank_pattern", "r", r, rk)) ||
        (rc = put_scaled_pattern(h, out, "alpha_pattern", "alpha", alpha, ak)))
        return rc;
    static const char *const nulls[] = { "megatron_config", "eva_config", "corda_config", "layer_replication",
                                         "trainable_token_indices", "target_parameters" };
    for (size_t i = 0; !rc && i < sizeof nulls / sizeof nulls[0]; i++)
        rc = h->put_json(out, nulls[i], "null");
    if (rc || (rc = h->put_str(out, "megatron_core", "megatron.core")) ||
        (rc = h->put_json(out, "loftq_config", "{}")) || (rc = h->put_json(out, "lora_bias", "false")) ||
        (rc = h->put_json(out, "use_qalora", "false")))
        return rc;
    return h->put_num(out, "qalora_group_size", 16);
}

/* pissa / olora: [A; A0] and [B, -B0] per insertion (see the top) */
static int append_initial_factors(const pr_peft_writer *h, pr_peft_out *out)
{
    const char *mname = h->module_name(out);
    int n = h->n_params(out);
    for (int i = 0; i < n; i++) {
        pr_peft_param p;
        int rc = h->param(out, i, &p);
        if (rc)
            return rc;
        int is_a = !strcmp(p.name, "lora_A0"), is_b = !strcmp(p.name, "lora_B0");
        int64_t numel = 1;
        for (uint32_t d = 0; d < p.ndim; d++)
            numel *= p.shape[d];
        if ((!is_a && !is_b) || numel == 0)
            continue;
        const char *path = h->site_path(out, p.site);
        char key[256], pname[256];
        snprintf(key, sizeof key, "base_model.model.%s.%d.%s.lora_%c.weight", h->blocks_path(out), p.layer,
                 path ? path : "?", is_a ? 'A' : 'B');
        snprintf(pname, sizeof pname, "%s/h.%d.%s.%s", mname, p.layer, h->site_name(out, p.site), p.name);
        int k = h->find_tensor(out, key);
        pr_peft_tensor o;
        if (k < 0 || (rc = h->tensor(out, k, &o)) || o.ndim != 2 || p.ndim != 2)
            return h->fail(out, PR_PEFT_ERR_FORMAT, "module '%s': no tensor '%s' for its initial factor %s", mname, key,
                           pname);
        int64_t R = o.shape[0], C = o.shape[1], shape[2];
        if ((is_a && p.shape[1] != C) || (is_b && p.shape[0] != R))
            return h->fail(out, PR_PEFT_ERR_FORMAT, "module '%s': %s does not fit %s", mname, pname, key);
        float *d;
        if (is_a) {   /* (r, d_in) over (r0, d_in) */
            shape[0] = R + p.shape[0];
            shape[1] = C;
            if (!(d = malloc((size_t)(shape[0] * C) * sizeof *d)))
                return h->fail(out, PR_PEFT_ERR_NOMEM, "out of memory");
            memcpy(d, o.data, (size_t)(R * C) * sizeof *d);
            memcpy(d + R * C, p.data, (size_t)(p.shape[0] * C) * sizeof *d);
        } else {      /* (d_out, r) beside -(d_out, r0) */
            int64_t C2 = C + p.shape[1];
            shape[0] = R;
            shape[1] = C2;
            if (!(d = malloc((size_t)(R * C2) * sizeof *d)))
                return h->fail(out, PR_PEFT_ERR_NOMEM, "out of memory");
            for (int64_t row = 0; row < R; row++) {
                memcpy(d + row * C2, o.data + row * C, (size_t)C * sizeof *d);
                for (int64_t q = 0; q < p.shape[1]; q++)
                    d[row * C2 + C + q] = -p.data[row * p.shape[1] + q];
            }
        }
        rc = h->set_tensor(out, k, 2, shape, d);
        free(d);
        if (rc)
            return rc;
    }
    return PR_PEFT_OK;
}

int peft_write_lora(const pr_peft_writer *h, pr_peft_out *out)
{
    const char *init = h->opt_str(out, "init_lora_weights");
    int doubled = init && (!strcmp(init, "pissa") || !strcmp(init, "olora"));
    int rc = doubled ? append_initial_factors(h, out) : PR_PEFT_OK;
    if (!rc && doubled)
        rc = h->note(out, "converted to a plain LoRA of twice the rank");
    return rc ? rc : peft_write_lora_config(h, out, doubled);
}
