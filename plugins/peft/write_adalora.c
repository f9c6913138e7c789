/* peftref built-in plugins: an ADALORA adapter (AdaLoraConfig, LoraConfig's
 * fields and the budget schedule's) and its tensors from an adalora module.
 *
 * peftref's adalora keeps init_r triplets per insertion, lora_E of every
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
 * training as it would in peftref.  The extension's own_tensors is set:
 * every tensor is made here from the module's parameters.  License: MIT */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <peftref/plugin.h>
#include <peftref/ext/peft_config.h>

#include "codecs.h"
#include "write_common.h"

static int adalora_config(const pr_peft_writer *h, pr_peft_out *out)
{
    int rc = peft_write_lora_config(h, out, 0);
    /* LoraConfig's r, which AdaLoRA does not use */
    if (rc || (rc = h->put_num(out, "r", 8)) || (rc = h->del(out, "rank_pattern")))
        return rc;
    static const char *const ints[][2] = { { "target_r", "target_r" }, { "init_r", "init_r" }, { "tinit", "tinit" },
                                           { "tfinal", "tfinal" }, { "deltaT", "delta_t" } };
    for (size_t i = 0; !rc && i < sizeof ints / sizeof ints[0]; i++)
        rc = h->put_num(out, ints[i][0], h->opt_num(out, ints[i][1], -1, 0));
    if (rc || (rc = h->put_real(out, "beta1", h->opt_num(out, "beta1", -1, 0.85))) ||
        (rc = h->put_real(out, "beta2", h->opt_num(out, "beta2", -1, 0.85))) ||
        (rc = h->put_real(out, "orth_reg_weight", h->opt_num(out, "orth_reg_weight", -1, 0.5))))
        return rc;
    double total = h->opt_num(out, "total_step", -1, 0);
    return total > 0 ? h->put_num(out, "total_step", total) : h->put_json(out, "total_step", "null");
}

/* One lora_A or lora_B parameter's kept triplets (and lora_E with lora_A)
 * into the adapter; ek, pk: its row of lora_E and of the mask. */
static int split_param(const pr_peft_writer *h, pr_peft_out *out, const pr_peft_param *p, int is_a, const float *ek,
                       const float *pk, int64_t r, int resize)
{
    const char *path = h->site_path(out, p->site);
    if (!path)
        return h->fail(out, PR_PEFT_ERR_UNSUPPORTED, "module '%s' (technique %s) adapts %s, which has no Hugging Face "
                       "module name; use --format peftref", h->module_name(out), h->technique(out),
                       h->site_name(out, p->site));
    if (p->ndim != 2 || p->shape[is_a ? 0 : 1] != r)
        return h->fail(out, PR_PEFT_ERR_FORMAT, "module '%s': %s at layer %d is not %s", h->module_name(out), p->name,
                       p->layer, is_a ? "(init_r, d_in)" : "(d_out, init_r)");
    int64_t kept = 0;
    for (int64_t q = 0; q < r; q++)
        kept += !resize || (ek[q] != 0.0f && (!pk || pk[q] != 0.0f));
    char mod[200], key[256];
    snprintf(mod, sizeof mod, "%s.%d.%s", h->blocks_path(out), p->layer, path);
    int64_t shape[2] = { is_a ? kept : p->shape[0], is_a ? p->shape[1] : kept };
    snprintf(key, sizeof key, "base_model.model.%s.lora_%c", mod, is_a ? 'A' : 'B');
    float *o = h->add_tensor(out, key, 2, shape), *oe = NULL;
    if (o && is_a) {
        int64_t es[2] = { kept, 1 };
        snprintf(key, sizeof key, "base_model.model.%s.lora_E", mod);
        oe = h->add_tensor(out, key, 2, es);
    }
    if (!o || (is_a && !oe))
        return h->fail(out, PR_PEFT_ERR_NOMEM, "out of memory");
    /* rank_pattern's booleans: "[true, false, ...]" */
    char *bools = is_a && resize ? malloc((size_t)r * 7 + 3) : NULL;
    if (is_a && resize && !bools)
        return h->fail(out, PR_PEFT_ERR_NOMEM, "out of memory");
    size_t bl = 0;
    if (bools)
        bools[bl++] = '[';
    int64_t q = 0;
    for (int64_t t = 0; t < r; t++) {
        int keep = !resize || (ek[t] != 0.0f && (!pk || pk[t] != 0.0f));
        if (bools)
            bl += (size_t)sprintf(bools + bl, "%s%s", t ? ", " : "", keep ? "true" : "false");
        if (!keep)
            continue;
        if (is_a) {
            memcpy(o + q * p->shape[1], p->data + t * p->shape[1], (size_t)p->shape[1] * sizeof(float));
            oe[q] = ek[t];
        } else {
            for (int64_t row = 0; row < p->shape[0]; row++)
                o[row * kept + q] = p->data[row * r + t];
        }
        q++;
    }
    int rc = PR_PEFT_OK;
    if (bools) {
        bools[bl++] = ']';
        bools[bl] = '\0';
        snprintf(key, sizeof key, "%s.lora_E", mod);
        rc = h->put_item(out, "rank_pattern", key, bools);
        free(bools);
    }
    return rc;
}

static int adalora_tensors(const pr_peft_writer *h, pr_peft_out *out)
{
    const char *mname = h->module_name(out);
    const float *E = NULL, *P = NULL;
    int64_t n_rows = 0, r = 0;
    int n = h->n_params(out), rc;
    for (int i = 0; i < n; i++) {
        pr_peft_param p;
        if ((rc = h->param(out, i, &p)))
            return rc;
        if (!strcmp(p.name, "lora_E") || !strcmp(p.name, "rank_pattern")) {
            if (p.ndim != 2)
                return h->fail(out, PR_PEFT_ERR_FORMAT, "module '%s': %s is not 2-dimensional", mname, p.name);
            *(!strcmp(p.name, "lora_E") ? &E : &P) = p.data;
            n_rows = p.shape[0];
            r = p.shape[1];
        }
    }
    if (!E)
        return h->fail(out, PR_PEFT_ERR_FORMAT, "module '%s' (technique %s, PEFT type ADALORA) has no lora_E", mname,
                       h->technique(out));
    int any = 0, pruned = 0;
    for (int64_t i = 0; i < n_rows * r; i++) {
        any |= E[i] != 0.0f;
        pruned |= E[i] == 0.0f || (P && P[i] == 0.0f);
    }
    int resize = any && pruned;
    uint32_t sites = h->sites(out);
    int n_sites = 0, nl = 0;
    for (int s = 0; s < PR_SITE_COUNT; s++)
        n_sites += (sites & PR_SITE_BIT(s)) != 0;
    const int *ls = h->layers(out, &nl);
    if (!ls)
        nl = h->model(out)->n_layers;
    if ((int64_t)n_sites * nl != n_rows)
        return h->fail(out, PR_PEFT_ERR_FORMAT, "module '%s': lora_E has %lld rows for %d insertions", mname,
                       (long long)n_rows, n_sites * nl);
    if ((rc = h->put_json(out, "rank_pattern", resize ? "{}" : "null")))
        return rc;
    for (int i = 0; i < n; i++) {
        pr_peft_param p;
        if ((rc = h->param(out, i, &p)))
            return rc;
        int is_a = !strcmp(p.name, "lora_A"), is_b = !strcmp(p.name, "lora_B");
        if (!is_a && !is_b)
            continue;
        int li = 0, si = 0;
        while (ls && li < nl && ls[li] != p.layer)
            li++;
        if (!ls)
            li = p.layer;
        for (int s = 0; s < p.site; s++)
            si += (sites & PR_SITE_BIT(s)) != 0;
        int64_t k = (int64_t)li * n_sites + si;
        if (k < 0 || k >= n_rows)
            return h->fail(out, PR_PEFT_ERR_FORMAT, "module '%s': %s at layer %d has no row of lora_E", mname, p.name,
                           p.layer);
        if ((rc = split_param(h, out, &p, is_a, E + k * r, P ? P + k * r : NULL, r, resize)))
            return rc;
    }
    return PR_PEFT_OK;
}

int peft_write_adalora(const pr_peft_writer *h, pr_peft_out *out)
{
    int rc = adalora_config(h, out);
    return rc ? rc : adalora_tensors(h, out);
}
