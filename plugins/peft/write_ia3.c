/* peftref built-in plugins: an IA3 adapter's adapter_config.json (IA3Config)
 * from an ia3 module.
 *
 * PEFT's (IA)^3 vectors scale a projection's output, or its input for the
 * feedforward_modules.  peftref's stream sites are those vectors: ffn.act
 * (the FFN hidden activation) is the input of the down projection, a
 * feedforward module; attn.k and attn.v are slices of the fused q, k, v
 * projection's output where the model has one (GPT-2's c_attn).  Without a
 * fused projection (the LLaMA family) the keys pass RoPE after k_proj, so
 * attn.k / attn.v have no PEFT vector, and sites k and v are k_proj's and
 * v_proj's outputs.  License: MIT */
#include <stdio.h>
#include <string.h>

#include <peftref/plugin.h>
#include <peftref/ext/peft_config.h>

#include "codecs.h"
#include "write_common.h"

/* PEFT's module of a site: its own, or the projection a stream site folds into */
static const char *ia3_module(const pr_peft_writer *h, pr_peft_out *out, int site)
{
    const char *name = h->config_name(out, site);
    if (name)
        return name;
    if (site == PR_SITE_FFN_ACT)
        return h->config_name(out, PR_SITE_FFN_DOWN);
    if (site == PR_SITE_ATTN_K || site == PR_SITE_ATTN_V)
        return h->config_name(out, PR_SITE_QKV);
    return NULL;
}

static int put_name(const pr_peft_writer *h, pr_peft_out *out, const char *field, const char *name)
{
    char text[300];
    snprintf(text, sizeof text, "\"%s\"", name);   /* module names need no escaping */
    return h->put_item(out, field, NULL, text);
}

int peft_write_ia3(const pr_peft_writer *h, pr_peft_out *out)
{
    const pr_peft_model *m = h->model(out);
    uint32_t sites = h->sites(out);
    if (!m->fused_qkv && (sites & (PR_SITE_BIT(PR_SITE_ATTN_K) | PR_SITE_BIT(PR_SITE_ATTN_V))))
        return h->fail(out, PR_PEFT_ERR_UNSUPPORTED, "module '%s' (technique %s) scales keys or values after RoPE "
                       "(attn.k, attn.v), which PEFT's k_proj / v_proj vectors do not express on a %s model (use "
                       "sites k and v); use --format peftref", h->module_name(out), h->technique(out), m->family);
    int rc = h->put_json(out, "target_modules", "[]");
    for (int s = 0; !rc && s < PR_SITE_COUNT; s++) {
        const char *name = (sites & PR_SITE_BIT(s)) ? ia3_module(h, out, s) : NULL;
        if (name)
            rc = put_name(h, out, "target_modules", name);
    }
    if (rc || (rc = h->put_json(out, "feedforward_modules", "[]")))
        return rc;
    const char *down = h->config_name(out, PR_SITE_FFN_DOWN);
    if ((sites & PR_SITE_BIT(PR_SITE_FFN_ACT)) && down && (rc = put_name(h, out, "feedforward_modules", down)))
        return rc;
    if ((rc = h->put_json(out, "exclude_modules", "null")) ||
        (rc = peft_put_bool(h, out, "fan_in_fan_out", m->conv1d != 0)))
        return rc;
    return h->put_json(out, "init_ia3_weights", "true");
}
