/* peftref core: a PEFT ADALORA adapter read into the module of the technique declaring ADALORA
 * (per-module triplets and the rank_pattern masks rebuilt into its one
 * lora_E tensor). */
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



/* AdaLoraConfig: LoraConfig's fields (pa_lora_fields) and these. */
static const cfg_field adalora_fields[] = {
    { "target_r", F_READ, NULL }, { "init_r", F_READ, NULL }, { "tinit", F_READ, NULL }, { "tfinal", F_READ, NULL },
    { "deltaT", F_READ, NULL }, { "beta1", F_READ, NULL }, { "beta2", F_READ, NULL },
    { "orth_reg_weight", F_READ, NULL }, { "total_step", F_READ, NULL },
};

/* ---- ADALORA ------------------------------------------------------------------------------------ */

/* The module's name: the directory's, when it is one, else the technique's. */
const char *pa_module_name_of(reader *R)
{
    pr_module_file *f = R->f;
    if (f->saved_name)
        return f->saved_name;
    const char *base = strrchr(R->dir, '/');
    base = base && base[1] ? base + 1 : R->dir;
    int name_ok = *base != '\0' && strcmp(base, ".") && strcmp(base, "..");
    for (const char *s = base; *s && name_ok; s++)
        name_ok = (unsigned char)*s > 0x20 && *s != '/';
    f->saved_name = pa_keep(f, name_ok ? base : f->t->name);
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
/* What the ADALORA reader fills, by PEFT's names: lora_A and lora_B per
 * insertion, lora_E and rank_pattern as one (insertions, init_r) tensor
 * each, a row per insertion.  A technique declaring ADALORA must hold them
 * so. */
static int adalora_params_declared(reader *R)
{
    static const struct {
        const char *name;
        int scope;
    } need[] = { { "lora_A", PR_SCOPE_INSERTION }, { "lora_B", PR_SCOPE_INSERTION },
                 { "lora_E", PR_SCOPE_GLOBAL }, { "rank_pattern", PR_SCOPE_GLOBAL } };
    const pr_technique *t = R->f->t;
    for (int k = 0; k < NELEM(need); k++) {
        int found = 0;
        for (uint32_t i = 0; i < t->n_params && !found; i++) {
            pr_param_decl d;
            mf_read_decl(&d, sizeof d, t->params, i);
            found = d.name && !strcmp(d.name, need[k].name) && (int)d.scope == need[k].scope;
        }
        if (!found)
            return pr_errorf(R->err, PR_ERR_UNSUPPORTED, "%s: technique %s declares PEFT type ADALORA but no %s "
                             "parameter '%s', which the ADALORA reader fills", R->dir, t->name,
                             need[k].scope == PR_SCOPE_INSERTION ? "per-insertion" : "global (a row per insertion)",
                             need[k].name);
    }
    return PR_OK;
}

int pa_open_adalora(reader *R, const pr_model_config *c)
{
    int rc = pa_check_fields2(R, pa_lora_fields, pa_n_lora_fields, adalora_fields, NELEM(adalora_fields));
    if (rc || (rc = pa_check_fan_in_fan_out(R, c)) || (rc = pa_check_bias(R)) ||
        (rc = adalora_params_declared(R)))
        return rc;
    int flag;
    if ((rc = pa_get_bool(R, "use_dora", &flag)))
        return rc;
    if (flag)
        return pa_bad_value(R, "use_dora", pa_get(R, "use_dora"), "PEFT's AdaLoRA has no DoRA either");
    const json_t *init = pa_get(R, "init_lora_weights");
    if (init && !json_is_true(init))
        return pa_bad_value(R, "init_lora_weights", init, "peftref's {tech} initialises as PEFT's true");
    if (pa_get(R, "alpha_pattern") && !pa_is_empty(pa_get(R, "alpha_pattern")))
        return pa_bad_value(R, "alpha_pattern", pa_get(R, "alpha_pattern"), "PEFT's AdaLoRA scales every module by "
                         "lora_alpha; peftref's {tech} too");
    long long init_r = 12, target_r = 8, tinit = 0, tfinal = 0, dt = 1, total = 0;
    double alpha, dropout, b1, b2, orth;
    if ((rc = pa_get_int(R, "init_r", 0, 1, &init_r)) > PR_OK ||
        (rc = pa_get_int(R, "target_r", 0, 1, &target_r)) > PR_OK ||
        (rc = pa_get_int(R, "tinit", 0, 0, &tinit)) > PR_OK ||
        (rc = pa_get_int(R, "tfinal", 0, 0, &tfinal)) > PR_OK || (rc = pa_get_int(R, "deltaT", 0, 1, &dt)) > PR_OK ||
        (rc = pa_get_int(R, "total_step", 0, 1, &total)) > PR_OK)
        return rc;
    if ((rc = pa_get_num(R, "lora_alpha", 8, &alpha)) || (rc = pa_num_field(R, "lora_dropout", 0, 0, &dropout)) ||
        (rc = pa_get_num(R, "beta1", 0.85, &b1)) || (rc = pa_get_num(R, "beta2", 0.85, &b2)) ||
        (rc = pa_num_field(R, "orth_reg_weight", 0.5, 0, &orth)))
        return rc;
    const json_t *pat = pa_get(R, "rank_pattern");
    if (pat && !json_is_object(pat))
        return pa_bad_value(R, "rank_pattern", pat, "expected an object of module name -> list of kept ranks");
    /* after the resize PEFT's update_layer makes scaling = float(k) when lora_alpha <= 0, a per-module value */
    if (alpha <= 0 && pat && json_object_size(pat) > 0)
        return pa_bad_value(R, "lora_alpha", pa_get(R, "lora_alpha"),
                            "with a rank_pattern, PEFT scales each module by its "
                            "kept rank when lora_alpha <= 0, and peftref's {tech} by init_r; give lora_alpha > 0");
    if (target_r > init_r)
        return pa_bad_value(R, "target_r", pa_get(R, "target_r"), "target_r must not exceed init_r");
    if ((rc = pa_push_num(R, "init_r", (double)init_r, -1)) ||
        (rc = pa_push_num(R, "target_r", (double)target_r, -1)) ||
        (rc = pa_push_num(R, "tinit", (double)tinit, -1)) || (rc = pa_push_num(R, "tfinal", (double)tfinal, -1)) ||
        (rc = pa_push_num(R, "delta_t", (double)dt, -1)) || (rc = pa_push_num(R, "beta1", b1, -1)) ||
        (rc = pa_push_num(R, "beta2", b2, -1)) || (rc = pa_push_num(R, "orth_reg_weight", orth, -1)) ||
        (rc = pa_push_num(R, "total_step", (double)total, -1)) || (rc = pa_push_num(R, "alpha", alpha, -1)) ||
        (rc = pa_push_num(R, "dropout", dropout, -1)))
        return rc;
    if ((rc = pa_open_targets(R, c, NULL, 0)) || (rc = pa_check_tensors(R, c)))
        return rc;
    pr_module_file *f = R->f;
    const char *mname = pa_module_name_of(R);
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
                    rc = pa_bad_value(R, "rank_pattern", pat, why);
                    break;
                }
                json_array_foreach(m, i, b) {
                    if (!json_is_boolean(b)) {
                        rc = pa_bad_value(R, "rank_pattern", pat, "expected booleans (PEFT's kept ranks)");
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
                !(rc = ada_tensor(R, f->st, kb, d_out, kept, &bm)) &&
                !(rc = ada_tensor(R, f->st, ke, kept, 1, &ev))) {
                n_used += 3;
                float *A = calloc((size_t)(init_r * d_in), sizeof *A),
                      *B = calloc((size_t)(d_out * init_r), sizeof *B);
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

