/* peftref built-in plugins: a Hugging Face PEFT IA3 adapter read into an
 * ia3 module.  PEFT scales a feed-forward module's input
 * (feedforward_modules) and the other modules' outputs; peftref's ia3
 * scales the streams: ffn.act, and the keys and values (GPT-2's c_attn,
 * whose vector must leave the queries at one).  License: MIT */
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <peftref/ext/peft_config.h>

#include "codecs.h"

static const pr_peft_field ia3_fields[] = {
    { "target_modules", PR_PEFT_READ, NULL }, { "exclude_modules", PR_PEFT_READ, NULL },
    { "feedforward_modules", PR_PEFT_READ, NULL }, { "fan_in_fan_out", PR_PEFT_READ, NULL },
    { "init_ia3_weights", PR_PEFT_TRUE, "peftref's {tech} starts at ones" },
};

static int ia3_site_of(const pr_peft_reader *h, pr_peft_in *in, const char *module, int layer, const char *path,
                       uint32_t *sites)
{
    int is_ff = h->names_match(in, "feedforward_modules", module);
    if (is_ff < 0 || layer < 0)
        return is_ff < 0 ? -1 : 0;
    if (is_ff) {
        const char *down = h->site_path(in, PR_SITE_FFN_DOWN);
        return down && !strcmp(path, down) ? (*sites = PR_SITE_BIT(PR_SITE_FFN_ACT), 1) : 0;
    }
    const char *qkv = h->site_path(in, PR_SITE_QKV);
    if (h->model(in)->conv1d && h->model(in)->fused_qkv && qkv && !strcmp(path, qkv)) {
        *sites = PR_SITE_BIT(PR_SITE_ATTN_K) | PR_SITE_BIT(PR_SITE_ATTN_V);
        return 1;
    }
    for (int s = PR_SITE_K; s <= PR_SITE_V; s++) {
        const char *p = h->site_path(in, s);
        if (p && !strcmp(p, path)) {
            *sites = PR_SITE_BIT(s);
            return 1;
        }
    }
    return 0;
}

/* GPT-2's (IA)^3 vector on c_attn is q, k, v wide; peftref scales keys and
 * values only, so the queries' part must be ones. */
static int check_queries(const pr_peft_reader *h, pr_peft_in *in)
{
    const pr_peft_model *m = h->model(in);
    const char *qkv = h->site_path(in, PR_SITE_QKV);
    if (!m->conv1d || !qkv)
        return PR_PEFT_OK;
    char tail[128];
    snprintf(tail, sizeof tail, ".%s.ia3_l", qkv);
    size_t tl = strlen(tail);
    int64_t d_q = (int64_t)m->n_heads * m->d_head;
    for (int i = 0; i < h->n_tensors(in); i++) {
        pr_peft_tensor t;
        int rc = h->tensor(in, i, &t);
        size_t L = rc ? 0 : strlen(t.name);
        if (rc || L < tl || strcmp(t.name + L - tl, tail))
            continue;
        int64_t numel = 1;
        for (uint32_t d = 0; d < t.ndim; d++)
            numel *= t.shape[d];
        if (numel < d_q)
            continue;
        if ((rc = h->tensor_data(in, i, &t)))
            return rc;
        for (int64_t k = 0; k < d_q; k++)
            if (t.data[k] != 1.0f)
                return h->fail(in, PR_PEFT_ERR_UNSUPPORTED, "%s: tensor '%s' scales the queries (element %lld is "
                               "%.9g, not 1); peftref's %s scales keys and values", h->where(in, PR_PEFT_WEIGHTS_FILE),
                               t.name, (long long)k, (double)t.data[k], h->technique(in));
    }
    return PR_PEFT_OK;
}

int peft_read_ia3(const pr_peft_reader *h, pr_peft_in *in)
{
    int rc = h->check_fields(in, ia3_fields, PEFT_NELEM(ia3_fields));
    if (rc || (rc = h->check_fan_in_fan_out(in)) || (rc = h->match_targets(in, ia3_site_of, NULL, 0)))
        return rc;
    return check_queries(h, in);
}
