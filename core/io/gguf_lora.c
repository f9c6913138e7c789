/* peftref core: LoRA modules as llama.cpp adapters (GGUF), the half of
 * gguf_export.h that writes adapters; gguf_export.c writes models.  The
 * layout is llama-adapter.cpp's: lora_a = A (r, in), ne {in, r}, lora_b =
 * B (out, r), ne {r, out}, scaled by adapter.lora.alpha / r. */
#include "config.h"

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/io/gguf.h"
#include "core/io/gguf_export.h"
#include "core/io/peft_adapter.h"
#include "peftref/site.h"

/* ---- LoRA adapters -------------------------------------------------------- */

/* One site's update in a target tensor: rows [row0, row0 + d_out) of it
 * get scale * B.A (B (d_out, r), A (r, d_in)). */
typedef struct lora_part {
    const float *A, *B;
    int r, d_in, d_out;
    int64_t row0;
    double scale;
} lora_part;

/* The llama.cpp tensor a site's update lands in, and where. */
typedef struct lora_target {
    const char *name;     /* after "blk.N." */
    int64_t rows;         /* the target's output rows */
    int64_t row0;         /* the site's first row in it */
    int rope_heads;       /* > 0: permute lora_b's rows over this many heads */
} lora_target;

static int site_target(const pr_model_config *c, int site, lora_target *t)
{
    int64_t C = c->d_model, Q = (int64_t)c->n_heads * c->d_head, KV = (int64_t)c->n_kv_heads * c->d_head;
    int rope = c->family == PR_FAMILY_LLAMA && (c->variant == PR_VARIANT_LLAMA || c->variant == PR_VARIANT_MISTRAL);
    memset(t, 0, sizeof *t);
    if (c->family == PR_FAMILY_GPT2) {
        switch (site) {
        case PR_SITE_QKV: *t = (lora_target){"attn_qkv.weight", Q + 2 * KV, 0, 0}; return 1;
        case PR_SITE_Q: *t = (lora_target){"attn_qkv.weight", Q + 2 * KV, 0, 0}; return 1;
        case PR_SITE_K: *t = (lora_target){"attn_qkv.weight", Q + 2 * KV, Q, 0}; return 1;
        case PR_SITE_V: *t = (lora_target){"attn_qkv.weight", Q + 2 * KV, Q + KV, 0}; return 1;
        case PR_SITE_O: *t = (lora_target){"attn_output.weight", C, 0, 0}; return 1;
        case PR_SITE_FFN_UP: *t = (lora_target){"ffn_up.weight", c->d_ff, 0, 0}; return 1;
        case PR_SITE_FFN_DOWN: *t = (lora_target){"ffn_down.weight", C, 0, 0}; return 1;
        default: return 0;
        }
    }
    switch (site) {
    case PR_SITE_Q: *t = (lora_target){"attn_q.weight", Q, 0, rope ? c->n_heads : 0}; return 1;
    case PR_SITE_K: *t = (lora_target){"attn_k.weight", KV, 0, rope ? c->n_kv_heads : 0}; return 1;
    case PR_SITE_V: *t = (lora_target){"attn_v.weight", KV, 0, 0}; return 1;
    case PR_SITE_O: *t = (lora_target){"attn_output.weight", C, 0, 0}; return 1;
    case PR_SITE_FFN_UP: *t = (lora_target){"ffn_up.weight", c->d_ff, 0, 0}; return 1;
    case PR_SITE_FFN_GATE: *t = (lora_target){"ffn_gate.weight", c->d_ff, 0, 0}; return 1;
    case PR_SITE_FFN_DOWN: *t = (lora_target){"ffn_down.weight", C, 0, 0}; return 1;
    default: return 0;
    }
}

/* One (layer, target) with its parts. */
typedef struct lora_group {
    int layer;
    lora_target target;
    lora_part part[8];
    int n_parts;
    int rank;
} lora_group;

static int add_part(lora_group **g, int *n_g, int *cap, int layer, const lora_target *t, const lora_part *p,
                    pr_error *err)
{
    lora_group *grp = NULL;
    for (int i = 0; i < *n_g; i++)
        if ((*g)[i].layer == layer && strcmp((*g)[i].target.name, t->name) == 0)
            grp = &(*g)[i];
    if (!grp) {
        if (*n_g == *cap) {
            int nc = *cap ? 2 * *cap : 16;
            lora_group *ng = realloc(*g, (size_t)nc * sizeof *ng);
            if (!ng)
                return pr_errorf(err, PR_ERR_NOMEM, "gguf: out of memory");
            *g = ng;
            *cap = nc;
        }
        grp = &(*g)[(*n_g)++];
        memset(grp, 0, sizeof *grp);
        grp->layer = layer;
        grp->target = *t;
        grp->target.row0 = 0;
    }
    if (grp->n_parts == (int)(sizeof grp->part / sizeof grp->part[0]))
        return pr_errorf(err, PR_ERR_UNSUPPORTED, "gguf: too many low-rank updates meet in blk.%d.%s", layer, t->name);
    grp->part[grp->n_parts] = *p;
    grp->part[grp->n_parts].row0 = t->row0;
    grp->n_parts++;
    grp->rank += p->r;
    return PR_OK;
}

/* The GGUF adapter type of a plain low-rank update llama.cpp's adapters
 * express, or NULL: a technique whose peft-config extension names the type
 * (gguf_adapter), added with a scale, whose parameters are the pairs and
 * their frozen initial copies, nothing more (a magnitude vector is not an
 * adapter term).  Known by what the technique declares, not by its name; an
 * extension built against the shorter first pr_ext_peft_config has none. */
static const char *adapter_type(const pr_module *mod)
{
    const pr_technique *t = pr_module_technique(mod);
    const pr_ext_peft_config *v = peft_technique_variant(t);
    if (!v || v->struct_size < offsetof(pr_ext_peft_config, gguf_adapter) + sizeof v->gguf_adapter ||
        !v->gguf_adapter || !*v->gguf_adapter || strlen(v->gguf_adapter) > 32 ||
        t->integration != PR_INTEGRATE_SCALED_ADD)
        return NULL;
    static const char *const ok[] = { "lora_A", "lora_B", "lora_A0", "lora_B0" };
    int n = pr_module_n_params(mod);
    for (int i = 0; i < n; i++) {
        pr_module_param pa;
        int known = 0;
        if (pr_module_param_at(mod, i, &pa) != PR_OK)
            return NULL;
        for (size_t k = 0; k < sizeof ok / sizeof ok[0]; k++)
            known |= strcmp(pa.param, ok[k]) == 0;
        if (!known)
            return NULL;
    }
    return n > 0 ? v->gguf_adapter : NULL;
}

int gguf_export_lora(pr_module *mod, const char *path, gguf_lora_summary *summary, pr_error *err)
{
    const pr_technique *t = pr_module_technique(mod);
    const pr_model *m = pr_module_model(mod);
    const pr_model_config *c = pr_model_get_config(m);
    if (summary)
        memset(summary, 0, sizeof *summary);
    const char *type = adapter_type(mod);
    if (!type)
        return pr_errorf(err, PR_ERR_UNSUPPORTED,
                         "gguf adapters carry low-rank pairs only; technique %s (module '%s') has no llama.cpp adapter form: "
                         "merge it into the model with --base, or export --format peft or peftref",
                         t->name, pr_module_name(mod));
    if (pr_module_is_gated(mod))
        return pr_errorf(err, PR_ERR_UNSUPPORTED, "gguf: module '%s' sits behind a learned gate, which a llama.cpp "
                         "adapter cannot express: merge it with --base", pr_module_name(mod));
    const char *arch = gguf_arch_for(c, 1, err);
    if (!arch)
        return err->code;
    int o_r = pr_module_option_index(mod, "r"), o_alpha = pr_module_option_index(mod, "alpha"),
        o_rs = pr_module_option_index(mod, "use_rslora");
    if (o_r < 0 || o_alpha < 0)
        return pr_errorf(err, PR_ERR_INVALID, "gguf: technique %s lacks the options r and alpha", t->name);

    lora_group *g = NULL;
    int n_g = 0, cap = 0, rc = PR_OK;
    int n_p = pr_module_n_params(mod);
    for (int i = 0; i < n_p && rc == PR_OK; i++) {
        pr_module_param pa;
        pr_module_param_at(mod, i, &pa);
        int zero_copy = strcmp(pa.param, "lora_A0") == 0;
        if (strcmp(pa.param, "lora_A") != 0 && !zero_copy)
            continue;
        /* its partner B (or B0) of the same insertion */
        const char *bname = zero_copy ? "lora_B0" : "lora_B";
        pr_module_param pb;
        int found = 0;
        for (int j = 0; j < n_p && !found; j++) {
            pr_module_param_at(mod, j, &pb);
            found = strcmp(pb.param, bname) == 0 && pb.site == pa.site && pb.layer == pa.layer;
        }
        if (!found) {
            rc = pr_errorf(err, PR_ERR_FORMAT, "gguf: module '%s' has %s without %s at layer %d",
                           pr_module_name(mod), pa.param, bname, pa.layer);
            break;
        }
        if (pa.ndim != 2 || pb.ndim != 2 || pa.shape[0] != pb.shape[1]) {
            rc = pr_errorf(err, PR_ERR_FORMAT, "gguf: %s and %s of module '%s' do not pair up", pa.name, pb.name,
                           pr_module_name(mod));
            break;
        }
        int nz = 0;   /* a technique's frozen copies (A0, B0) are zeros unless its initialisation made them */
        for (int64_t e = 0; e < pa.numel && !nz; e++)
            nz = pa.data[e] != 0.0f;
        if (zero_copy && !nz)
            continue;
        lora_target tg;
        if (!site_target(c, pa.site, &tg)) {
            rc = pr_errorf(err, PR_ERR_UNSUPPORTED, "gguf: module '%s' adapts site %s, which no llama.cpp %s "
                           "tensor holds", pr_module_name(mod), pr_site_name(pa.site), arch);
            break;
        }
        double r = pr_module_site_option(mod, pa.site, o_r)->num;
        double alpha = pr_module_site_option(mod, pa.site, o_alpha)->num;
        int rs = o_rs >= 0 && pr_module_site_option(mod, pa.site, o_rs)->num != 0;
        lora_part p = {pa.data, pb.data, (int)pa.shape[0], (int)pa.shape[1], (int)pb.shape[0], 0,
                       (rs ? alpha / sqrt(r) : alpha / r) * (zero_copy ? -1.0 : 1.0)};
        rc = add_part(&g, &n_g, &cap, pa.layer, &tg, &p, err);
    }
    if (rc == PR_OK && n_g == 0)
        rc = pr_errorf(err, PR_ERR_INVALID, "gguf: module '%s' has no lora_A/lora_B pairs", pr_module_name(mod));

    /* adapter.lora.alpha: the first pair's scale times its rank, so that
     * when every pair shares rank and scale (plain LoRA, rsLoRA: alpha *
     * sqrt(r)) lora_b is written as trained; other pairs carry
     * scale * rank / alpha in lora_b.  0 would mean "scale 1" to llama.cpp. */
    double galpha = 0;
    if (rc == PR_OK) {
        galpha = g[0].part[0].scale * g[0].rank;
        if (galpha == 0.0)
            galpha = g[0].rank;
    }
    gguf_writer *w = rc == PR_OK ? gguf_writer_new() : NULL;
    if (rc == PR_OK && !w)
        rc = pr_errorf(err, PR_ERR_NOMEM, "gguf: out of memory");
    if (rc == PR_OK) {
        gguf_set_str(w, "general.architecture", arch);
        gguf_set_str(w, "general.type", "adapter");
        gguf_set_str(w, "general.name", pr_module_name(mod));
        gguf_set_u32(w, "general.alignment", GGUF_DEFAULT_ALIGNMENT);
        gguf_set_str(w, "adapter.type", type);
        char key[64];
        snprintf(key, sizeof key, "adapter.%s.alpha", type);
        gguf_set_f32(w, key, (float)galpha);
        if (summary)
            snprintf(summary->alpha_key, sizeof summary->alpha_key, "%s", key);
    }
    for (int i = 0; i < n_g && rc == PR_OK; i++) {
        lora_group *grp = &g[i];
        int R = grp->rank;
        int64_t rows = grp->target.rows, d_in = grp->part[0].d_in;
        float *A = calloc((size_t)R * (size_t)d_in, sizeof *A);
        float *B = calloc((size_t)rows * (size_t)R, sizeof *B);
        float *Bp = grp->target.rope_heads ? calloc((size_t)rows * (size_t)R, sizeof *Bp) : NULL;
        if (!A || !B || (grp->target.rope_heads && !Bp)) {
            free(A);
            free(B);
            free(Bp);
            rc = pr_errorf(err, PR_ERR_NOMEM, "gguf: out of memory");
            break;
        }
        int col = 0, folded = 0;
        for (int k = 0; k < grp->n_parts; k++) {
            const lora_part *p = &grp->part[k];
            double f = p->scale * R / galpha;   /* llama.cpp applies galpha / R */
            folded |= fabs(f - 1.0) > 0;
            memcpy(A + (size_t)col * d_in, p->A, (size_t)p->r * d_in * sizeof *A);
            for (int o = 0; o < p->d_out; o++)
                for (int j = 0; j < p->r; j++)
                    B[(size_t)(p->row0 + o) * R + col + j] = (float)(p->B[(size_t)o * p->r + j] * f);
            col += p->r;
        }
        if (Bp) {
            gguf_rope_permute_rows(B, Bp, grp->target.rope_heads, c->d_head, R);
            free(B);
            B = Bp;
        }
        char name[160];
        int64_t ne_a[2] = {d_in, R}, ne_b[2] = {R, rows};
        snprintf(name, sizeof name, "blk.%d.%s.lora_a", grp->layer, grp->target.name);
        gguf_add_tensor(w, name, 2, ne_a, GGUF_TENSOR_F32, A, 1);
        snprintf(name, sizeof name, "blk.%d.%s.lora_b", grp->layer, grp->target.name);
        gguf_add_tensor(w, name, 2, ne_b, GGUF_TENSOR_F32, B, 1);
        if (summary) {
            summary->tensors++;
            summary->folded_into_b += folded;
            summary->permuted += grp->target.rope_heads > 0;
            summary->stacked += grp->n_parts > 1;
        }
    }
    if (rc == PR_OK)
        rc = gguf_writer_save(w, path, err);
    if (summary)
        summary->alpha = (float)galpha;
    gguf_writer_free(w);
    free(g);
    return rc;
}
