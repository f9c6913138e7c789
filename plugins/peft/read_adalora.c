/* peftref built-in plugins: a Hugging Face PEFT ADALORA adapter read into
 * an adalora module.
 *
 * PEFT saves per adapted module only the triplets its rank_pattern keeps
 * (AdaLoraModel.resize_state_dict_by_rank_pattern): lora_A (k, in), lora_B
 * (out, k), lora_E (k, 1), k the number of true entries of the module's
 * init_r booleans under "<module>.lora_E"; a module without an entry keeps
 * all init_r.  peftref's adalora holds init_r triplets per insertion and
 * every insertion's lora_E as one (insertions, init_r) tensor
 * (plugins/adalora.c), so the tensors are rebuilt under peftref's own
 * names: the kept triplets at their positions, the pruned ones zero
 * (lora_E 0 contributes nothing, as PEFT's pruned triplet), and the
 * plugin's rank_pattern buffer from the booleans.  PEFT's scaling is
 * lora_alpha / (ranknum + 1e-5) with ranknum init_r kept through the
 * resize, which is peftref's.  License: MIT */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <peftref/ext/peft_config.h>

#include "codecs.h"
#include "read_common.h"

/* AdaLoraConfig: LoraConfig's fields (peft_lora_fields) and these. */
static const pr_peft_field adalora_fields[] = {
    { "target_r", PR_PEFT_READ, NULL }, { "init_r", PR_PEFT_READ, NULL }, { "tinit", PR_PEFT_READ, NULL },
    { "tfinal", PR_PEFT_READ, NULL }, { "deltaT", PR_PEFT_READ, NULL }, { "beta1", PR_PEFT_READ, NULL },
    { "beta2", PR_PEFT_READ, NULL }, { "orth_reg_weight", PR_PEFT_READ, NULL }, { "total_step", PR_PEFT_READ, NULL },
};

/* What this reader fills, by PEFT's names: lora_A and lora_B per
 * insertion, lora_E and rank_pattern as one (insertions, init_r) tensor
 * each, a row per insertion.  A technique reading ADALORA here must hold
 * them so. */
static int params_declared(const pr_peft_reader *h, pr_peft_in *in)
{
    static const struct {
        const char *name;
        int scope;
    } need[] = { { "lora_A", PR_SCOPE_INSERTION }, { "lora_B", PR_SCOPE_INSERTION },
                 { "lora_E", PR_SCOPE_GLOBAL }, { "rank_pattern", PR_SCOPE_GLOBAL } };
    for (uint32_t k = 0; k < PEFT_NELEM(need); k++)
        if (!h->declares(in, need[k].name, need[k].scope))
            return h->fail(in, PR_PEFT_ERR_UNSUPPORTED, "%s: technique %s declares PEFT type ADALORA but no %s "
                           "parameter '%s', which the ADALORA reader fills", h->where(in, PR_PEFT_DIR),
                           h->technique(in),
                           need[k].scope == PR_SCOPE_INSERTION ? "per-insertion" : "global (a row per insertion)",
                           need[k].name);
    return PR_PEFT_OK;
}

/* One adapted module's tensor in the file, as f32. */
static int ada_tensor(const pr_peft_reader *h, pr_peft_in *in, const char *key, int64_t rows, int64_t cols,
                      pr_peft_tensor *t)
{
    int i = h->find_tensor(in, key);
    if (i < 0)
        return h->fail(in, PR_PEFT_ERR_INVALID, "%s: no tensor '%s'", h->where(in, PR_PEFT_WEIGHTS_FILE), key);
    int rc = h->tensor(in, i, t);
    if (rc)
        return rc;
    if (t->ndim != 2 || t->shape[0] != rows || t->shape[1] != cols) {
        char a[96] = "[";
        for (uint32_t d = 0; d < t->ndim && d < 4; d++) {
            size_t k = strlen(a);
            snprintf(a + k, sizeof a - k, "%s%lld", d ? ", " : "", (long long)t->shape[d]);
        }
        strncat(a, "]", sizeof a - strlen(a) - 1);
        return h->fail(in, PR_PEFT_ERR_INVALID, "%s: tensor '%s' is %s but rank_pattern and the base model need "
                       "[%lld, %lld]", h->where(in, PR_PEFT_WEIGHTS_FILE), key, a, (long long)rows, (long long)cols);
    }
    return h->tensor_data(in, i, t);
}

/* The config's options; *init_r for the tensors. */
static int read_options(const pr_peft_reader *h, pr_peft_in *in, long long *init_r_out)
{
    pr_peft_field all[64];
    uint32_t n = 0;
    for (uint32_t i = 0; i < peft_n_lora_fields && n < 64; i++)
        all[n++] = peft_lora_fields[i];
    for (uint32_t i = 0; i < PEFT_NELEM(adalora_fields) && n < 64; i++)
        all[n++] = adalora_fields[i];
    int rc = h->check_fields(in, all, n);
    if (rc || (rc = h->check_fan_in_fan_out(in)) || (rc = peft_check_bias(h, in)) || (rc = params_declared(h, in)))
        return rc;
    int flag;
    if ((rc = h->get_bool(in, "use_dora", 0, &flag)))
        return rc;
    if (flag)
        return h->bad_value(in, "use_dora", "PEFT's AdaLoRA has no DoRA either");
    pr_peft_value v;
    h->value(in, "init_lora_weights", NULL, -1, &v);
    if (v.kind != PR_PEFT_ABSENT && !(v.kind == PR_PEFT_BOOL && v.i))
        return h->bad_value(in, "init_lora_weights", "peftref's {tech} initialises as PEFT's true");
    h->value(in, "alpha_pattern", NULL, -1, &v);
    if ((v.kind == PR_PEFT_ARRAY || v.kind == PR_PEFT_OBJECT) ? v.len > 0 : v.kind != PR_PEFT_ABSENT)
        return h->bad_value(in, "alpha_pattern", "PEFT's AdaLoRA scales every module by lora_alpha; peftref's {tech} "
                            "too");
    long long init_r = 12, target_r = 8, tinit = 0, tfinal = 0, dt = 1, total = 0;
    double alpha, dropout, b1, b2, orth;
    if ((rc = h->get_int(in, "init_r", 0, 1, &init_r)) > PR_PEFT_OK ||
        (rc = h->get_int(in, "target_r", 0, 1, &target_r)) > PR_PEFT_OK ||
        (rc = h->get_int(in, "tinit", 0, 0, &tinit)) > PR_PEFT_OK ||
        (rc = h->get_int(in, "tfinal", 0, 0, &tfinal)) > PR_PEFT_OK ||
        (rc = h->get_int(in, "deltaT", 0, 1, &dt)) > PR_PEFT_OK ||
        (rc = h->get_int(in, "total_step", 0, 1, &total)) > PR_PEFT_OK)
        return rc;
    if ((rc = h->get_num(in, "lora_alpha", 8, -INFINITY, &alpha)) ||
        (rc = h->get_num(in, "lora_dropout", 0, 0, &dropout)) || (rc = h->get_num(in, "beta1", 0.85, -INFINITY, &b1)) ||
        (rc = h->get_num(in, "beta2", 0.85, -INFINITY, &b2)) ||
        (rc = h->get_num(in, "orth_reg_weight", 0.5, 0, &orth)))
        return rc;
    pr_peft_value pat;
    h->value(in, "rank_pattern", NULL, -1, &pat);
    if (pat.kind != PR_PEFT_ABSENT && pat.kind != PR_PEFT_OBJECT)
        return h->bad_value(in, "rank_pattern", "expected an object of module name -> list of kept ranks");
    /* after the resize PEFT's update_layer makes scaling = float(k) when lora_alpha <= 0, a per-module value */
    if (alpha <= 0 && pat.kind == PR_PEFT_OBJECT && pat.len > 0)
        return h->bad_value(in, "lora_alpha", "with a rank_pattern, PEFT scales each module by its kept rank when "
                            "lora_alpha <= 0, and peftref's {tech} by init_r; give lora_alpha > 0");
    if (target_r > init_r)
        return h->bad_value(in, "target_r", "target_r must not exceed init_r");
    if ((rc = h->set_num(in, "init_r", (double)init_r, -1)) ||
        (rc = h->set_num(in, "target_r", (double)target_r, -1)) || (rc = h->set_num(in, "tinit", (double)tinit, -1)) ||
        (rc = h->set_num(in, "tfinal", (double)tfinal, -1)) || (rc = h->set_num(in, "delta_t", (double)dt, -1)) ||
        (rc = h->set_num(in, "beta1", b1, -1)) || (rc = h->set_num(in, "beta2", b2, -1)) ||
        (rc = h->set_num(in, "orth_reg_weight", orth, -1)) || (rc = h->set_num(in, "total_step", (double)total, -1)) ||
        (rc = h->set_num(in, "alpha", alpha, -1)) || (rc = h->set_num(in, "dropout", dropout, -1)))
        return rc;
    *init_r_out = init_r;
    return PR_PEFT_OK;
}

/* The kept ranks of module mod (booleans under "<mod>.lora_E") into keep;
 * the number kept in *kept. */
static int kept_ranks(const pr_peft_reader *h, pr_peft_in *in, const char *mod, long long init_r, float *keep,
                      int64_t *kept)
{
    char key[256];
    snprintf(key, sizeof key, "%s.lora_E", mod);
    pr_peft_value m;
    h->value(in, "rank_pattern", key, -1, &m);
    *kept = 0;
    if (m.kind == PR_PEFT_ABSENT) {
        for (long long i = 0; i < init_r; i++)
            keep[i] = 1.0f;
        *kept = init_r;
        return PR_PEFT_OK;
    }
    if (m.kind != PR_PEFT_ARRAY || (long long)m.len != init_r) {
        char why[320];
        snprintf(why, sizeof why, "'%s' must be a list of init_r = %lld booleans", key, init_r);
        return h->bad_value(in, "rank_pattern", why);
    }
    for (long long i = 0; i < init_r; i++) {
        pr_peft_value b;
        h->value(in, "rank_pattern", key, (long)i, &b);
        if (b.kind != PR_PEFT_BOOL)
            return h->bad_value(in, "rank_pattern", "expected booleans (PEFT's kept ranks)");
        keep[i] = b.i ? 1.0f : 0.0f;
        *kept += b.i != 0;
    }
    return PR_PEFT_OK;
}

int peft_read_adalora(const pr_peft_reader *h, pr_peft_in *in)
{
    long long init_r = 0;
    int rc = read_options(h, in, &init_r);
    if (rc || (rc = h->match_targets(in, NULL, NULL, 0)) || (rc = h->check_tensors(in)))
        return rc;
    const char *mname = h->module_name(in);
    uint32_t sites = h->sites(in);
    int n_layers = 0, n_sites = 0;
    const int *layers = h->layers(in, &n_layers);
    for (int s = 0; s < PR_SITE_COUNT; s++)
        n_sites += (sites & PR_SITE_BIT(s)) != 0;
    int n_ins = n_sites * n_layers, n_ent = 2 * n_ins + 2, n = 0, n_used = 0, k = 0;
    pr_peft_tensor *e = calloc((size_t)n_ent, sizeof *e);
    float *E = calloc((size_t)n_ins * (size_t)init_r + 1, sizeof *E);
    float *P = calloc((size_t)n_ins * (size_t)init_r + 1, sizeof *P);
    char (*names)[192] = calloc((size_t)n_ent, sizeof *names);
    if (!e || !E || !P || !names)
        rc = h->fail(in, PR_PEFT_ERR_NOMEM, "%s: out of memory", h->where(in, PR_PEFT_DIR));
    for (int li = 0; !rc && li < n_layers; li++) {
        int l = layers ? layers[li] : li;
        for (int s = 0; !rc && s < PR_SITE_COUNT; s++) {
            if (!(sites & PR_SITE_BIT(s)))
                continue;
            char mod[160], ka[256], kb[256], ke[256];
            snprintf(mod, sizeof mod, "%s.%d.%s", h->blocks_path(in), l, h->site_path(in, s));
            float *keep = P + (size_t)k * init_r;
            int64_t kept = 0;
            if ((rc = kept_ranks(h, in, mod, init_r, keep, &kept)))
                break;
            snprintf(ka, sizeof ka, "base_model.model.%s.lora_A", mod);
            snprintf(kb, sizeof kb, "base_model.model.%s.lora_B", mod);
            snprintf(ke, sizeof ke, "base_model.model.%s.lora_E", mod);
            /* the widths as the file has them (a base mismatch shows when the module is filled) */
            pr_peft_tensor ta, tb, tev;
            int ia = h->find_tensor(in, ka), ib = h->find_tensor(in, kb);
            int64_t d_in = 1, d_out = 1;
            if (ia >= 0 && !h->tensor(in, ia, &ta) && ta.ndim == 2)
                d_in = ta.shape[1];
            if (ib >= 0 && !h->tensor(in, ib, &tb) && tb.ndim == 2)
                d_out = tb.shape[0];
            if ((rc = ada_tensor(h, in, ka, kept, d_in, &ta)) || (rc = ada_tensor(h, in, kb, d_out, kept, &tb)) ||
                (rc = ada_tensor(h, in, ke, kept, 1, &tev)))
                break;
            n_used += 3;
            float *A = calloc((size_t)(init_r * d_in), sizeof *A), *B = calloc((size_t)(d_out * init_r), sizeof *B);
            if (!A || !B) {
                free(A);
                free(B);
                rc = h->fail(in, PR_PEFT_ERR_NOMEM, "%s: out of memory", h->where(in, PR_PEFT_DIR));
                break;
            }
            int64_t q = 0;
            for (long long i = 0; i < init_r; i++) {
                if (keep[i] == 0.0f)
                    continue;
                memcpy(A + i * d_in, ta.data + q * d_in, (size_t)d_in * sizeof *A);
                for (int64_t o = 0; o < d_out; o++)
                    B[o * init_r + i] = tb.data[o * kept + q];
                E[(size_t)k * init_r + i] = tev.data[q];
                q++;
            }
            snprintf(names[n], sizeof names[n], "%s/h.%d.%s.lora_A", mname, l, h->site_name(in, s));
            e[n] = (pr_peft_tensor){ .name = names[n], .ndim = 2, .shape = { init_r, d_in }, .data = A };
            n++;
            snprintf(names[n], sizeof names[n], "%s/h.%d.%s.lora_B", mname, l, h->site_name(in, s));
            e[n] = (pr_peft_tensor){ .name = names[n], .ndim = 2, .shape = { d_out, init_r }, .data = B };
            n++;
            k++;
        }
    }
    if (!rc && n_used != h->n_tensors(in)) {
        for (int i = 0; i < h->n_tensors(in) && !rc; i++) {
            pr_peft_tensor t;
            h->tensor(in, i, &t);
            const char *d = strrchr(t.name, '.');
            if (!d || (strcmp(d, ".lora_A") && strcmp(d, ".lora_B") && strcmp(d, ".lora_E")))
                rc = h->fail(in, PR_PEFT_ERR_INVALID, "%s: tensor '%s' belongs to no module target_modules selects",
                             h->where(in, PR_PEFT_WEIGHTS_FILE), t.name);
        }
        if (!rc)
            rc = h->fail(in, PR_PEFT_ERR_INVALID, "%s: %d tensors, of which target_modules selects %d",
                         h->where(in, PR_PEFT_WEIGHTS_FILE), h->n_tensors(in), n_used);
    }
    if (!rc) {
        snprintf(names[n], sizeof names[n], "%s/lora_E", mname);
        e[n] = (pr_peft_tensor){ .name = names[n], .ndim = 2, .shape = { n_ins, init_r }, .data = E };
        n++;
        snprintf(names[n], sizeof names[n], "%s/rank_pattern", mname);
        e[n] = (pr_peft_tensor){ .name = names[n], .ndim = 2, .shape = { n_ins, init_r }, .data = P };
        n++;
        rc = h->replace_tensors(in, e, (uint32_t)n);
    }
    for (int i = 0; e && i < n; i++)
        if (e[i].data != E && e[i].data != P)
            free(e[i].data);
    free(e);
    free(E);
    free(P);
    free(names);
    return rc;
}
