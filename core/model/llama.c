/* peftref core: the LLaMA family (Touvron et al. 2023, arXiv 2302.13971)
 * and its relatives Mistral, Qwen2 and Qwen3.
 *
 * Pre-norm blocks with RMSNorm, rotary positions and a SwiGLU MLP:
 *   h   = x + o_proj(attention(rope(q_proj(n1)), rope(k_proj(n1)), v_proj(n1))),  n1 = rmsnorm_1(x)
 *   out = h + down_proj(silu(gate_proj(n2)) * up_proj(n2)),                     n2 = rmsnorm_2(h)
 * and a final RMSNorm before the LM head.  Grouped-query attention: H
 * query heads over Hkv key/value heads of d_head each (d_head need not be
 * d_model / H).  Qwen2 adds q/k/v biases, Qwen3 a per-head RMSNorm of q
 * and k before RoPE; Llama's attention_bias and mlp_bias add biases to
 * q/k/v/o and gate/up/down.  Tensors carry Hugging Face names
 * ("model.layers.{i}.self_attn.q_proj.weight") and nn.Linear's [out, in]
 * layout.
 *
 * Sites: q, k, v, o, ffn.gate, ffn.up, ffn.down are the projections'
 * outputs (their hooks see the projection input); attn.k and attn.v are
 * the keys after RoPE and the values entering attention (prefix tuning
 * prepends there, as Hugging Face PEFT's past_key_values do); ffn.act is
 * silu(gate) * up entering down_proj.
 *
 * Shapes: B batch, T internal time, N = B*T rows, C = d_model, Q = H*hd,
 * KV = Hkv*hd, F = d_ff, P prefix columns. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "family.h"
#include "kernels.h"
#include "llama_kernels.h"

typedef struct layer_params {
    pr_tensor_info *ln1w, *ln2w;               /* input_layernorm, post_attention_layernorm (C) */
    pr_tensor_info *qw, *qb, *kw, *kb, *vw, *vb; /* (Q,C) (Q), (KV,C) (KV) */
    pr_tensor_info *qnw, *knw;                 /* q_norm, k_norm (hd), qwen3 */
    pr_tensor_info *ow, *ob;                   /* (C,Q), (C) */
    pr_tensor_info *gw, *gb, *uw, *ub;         /* (F,C), (F) */
    pr_tensor_info *dw, *db;                   /* (C,F), (C) */
} layer_params;

/* Saved activations of one block; stream-site buffers only with hooks. */
typedef struct layer_acts {
    float *ln1, *rstd1;          /* (N,C), (N) */
    float *q, *k, *v;            /* (N,Q), (N,KV), (N,KV) projection outputs after their hooks */
    float *qn, *kn;              /* (N,Q), (N,KV) after q_norm / k_norm (qwen3) */
    float *qrstd, *krstd;        /* (N*H), (N*Hkv) */
    float *qr, *kr;              /* (N,Q), (N,KV) after RoPE */
    float *katt, *vatt;          /* (N,KV) attn.k / attn.v outputs */
    float *att;                  /* (B,H,T,P+T) */
    float *atty;                 /* (N,Q) */
    float *attproj;              /* (N,C) o_proj output after o hooks */
    float *aout;                 /* (N,C) attn_out output */
    float *resid2;               /* (N,C) */
    float *ln2, *rstd2;          /* (N,C), (N) */
    float *gate, *up;            /* (N,F) after their hooks */
    float *swi;                  /* (N,F) silu(gate) * up */
    float *act;                  /* (N,F) ffn.act output */
    float *down;                 /* (N,C) down_proj output after ffn.down hooks */
    float *fout;                 /* (N,C) ffn_out output */
    float *resid3;               /* (N,C) */
} layer_acts;

typedef struct llama {
    layer_params *lp;            /* (L) */
    layer_acts *la;              /* (L) */
    pr_tensor_info *normw;       /* model.norm (C) */
    float *rstdf;                /* (N) */
    double *inv_freq;            /* (hd/2) */
    float *cos, *sin;            /* (T, hd/2) for positions 0 .. T-1 */
    int rope_T, rope_P;          /* rows of cos/sin filled (0 = none yet), from position rope_P */
    /* backward scratch */
    float *dq, *dqr, *dk, *dkr, *dv; /* (N,Q) (N,Q) (N,KV) x3 */
    float *dkatt, *dvatt;        /* (N,KV), only with attn.k / attn.v hooks */
    float *dqn, *dkn;            /* (N,Q), (N,KV) with q/k norms */
    float *datty;                /* (N,Q) */
    float *dattproj, *ddown;     /* (N,C) */
    float *dact, *dswi, *dgate, *dup; /* (N,F) */
    float *att_scratch;          /* (T, Pmax+T) */
    /* incremental decoding (pr_model_decode_begin): per layer the keys
     * after RoPE and attn.k hooks, the values after attn.v hooks */
    float *cache;                /* one block: L x 2 x (ctx, KV) */
    float **kc, **vc;            /* (L) views of it */
    float *dec_scores;           /* (Pmax + ctx) */
    int ctx;
} llama;

static const char *variant_name(int v)
{
    switch (v) {
    case PR_VARIANT_MISTRAL: return "Mistral";
    case PR_VARIANT_QWEN2: return "Qwen2";
    case PR_VARIANT_QWEN3: return "Qwen3";
    default: return "LLaMA";
    }
}

static int check_config(const pr_model_config *c, pr_error *err)
{
    const char *v = variant_name(c->variant);
    if (c->norm != PR_NORM_RMSNORM)
        return pr_errorf(err, PR_ERR_UNSUPPORTED, "config: norm must be RMSNorm for the %s family", v);
    if (c->act != PR_ACT_SWIGLU)
        return pr_errorf(err, PR_ERR_UNSUPPORTED, "config: act must be SwiGLU for the %s family", v);
    if (c->pos != PR_POS_ROPE)
        return pr_errorf(err, PR_ERR_UNSUPPORTED, "config: pos must be RoPE for the %s family", v);
    if (c->fused_qkv)
        return pr_errorf(err, PR_ERR_UNSUPPORTED,
                         "config: fused_qkv must be 0 for the %s family (q_proj, k_proj, v_proj are separate)", v);
    if (c->bias)
        return pr_errorf(err, PR_ERR_UNSUPPORTED,
                         "config: bias must be 0 for the %s family (qkv_bias, o_bias, mlp_bias say which "
                         "projections carry one; RMSNorm has none)", v);
    return PR_OK;
}

/* ---- tensors ------------------------------------------------------------- */

static int count_tensors(const pr_model_config *c)
{
    int per_layer = 2 + 7 + (c->qkv_bias ? 3 : 0) + (c->o_bias ? 1 : 0) + (c->mlp_bias ? 3 : 0) +
                    (c->qk_norm ? 2 : 0);
    return 1 + c->n_layers * per_layer + 1 + (c->tied_head ? 0 : 1);
}

static void decode_free(pr_model *m)
{
    llama *g = m->fam;
    free(g->cache);
    free(g->kc);
    free(g->vc);
    free(g->dec_scores);
    g->cache = g->dec_scores = NULL;
    g->kc = g->vc = NULL;
    g->ctx = 0;
}

static void destroy(pr_model *m)
{
    llama *g = m->fam;
    if (!g)
        return;
    decode_free(m);
    free(g->lp);
    free(g->la);
    free(g->inv_freq);
    free(g);
    m->fam = NULL;
}

/* Hugging Face order: embed_tokens, per layer the attention then the MLP
 * and the two norms, model.norm, lm_head when untied. */
static int build(pr_model *m, pr_error *err)
{
    const pr_model_config *c = &m->cfg;
    llama *g = calloc(1, sizeof *g);
    if (g) {
        g->lp = calloc((size_t)c->n_layers, sizeof *g->lp);
        g->la = calloc((size_t)c->n_layers, sizeof *g->la);
        g->inv_freq = calloc((size_t)c->d_head / 2 + 1, sizeof *g->inv_freq);
    }
    m->fam = g;
    if (!g || !g->lp || !g->la || !g->inv_freq)
        return pr_errorf(err, PR_ERR_NOMEM, "model: out of memory for the tensor table");
    rope_params rp = {
        .theta = c->rope_theta,
        .scaling = c->rope_scaling == PR_ROPE_LINEAR ? ROPE_SCALING_LINEAR
                   : c->rope_scaling == PR_ROPE_LLAMA3 ? ROPE_SCALING_LLAMA3 : ROPE_SCALING_NONE,
        .factor = c->rope_factor,
        .low_freq_factor = c->rope_low_freq_factor,
        .high_freq_factor = c->rope_high_freq_factor,
        .original_max_pos = c->rope_orig_max_pos,
    };
    rope_inv_freq(g->inv_freq, c->d_head, &rp);

    int64_t C = c->d_model, F = c->d_ff, V = c->vocab_size, hd = c->d_head;
    int64_t Q = (int64_t)c->n_heads * hd, KV = (int64_t)c->n_kv_heads * hd;
    m->wte = model_add_base_tensor(m, PR_TENSOR_EMBEDDING, -1, 2, V, C, "model.embed_tokens.weight");
    m->wpe = NULL;
    for (int l = 0; l < c->n_layers; l++) {
        layer_params *p = &g->lp[l];
        p->qw = model_add_layer_tensor(m, PR_TENSOR_WEIGHT, l, 2, Q, C, "self_attn.q_proj.weight");
        if (c->qkv_bias) p->qb = model_add_layer_tensor(m, PR_TENSOR_BIAS, l, 1, Q, 0, "self_attn.q_proj.bias");
        p->kw = model_add_layer_tensor(m, PR_TENSOR_WEIGHT, l, 2, KV, C, "self_attn.k_proj.weight");
        if (c->qkv_bias) p->kb = model_add_layer_tensor(m, PR_TENSOR_BIAS, l, 1, KV, 0, "self_attn.k_proj.bias");
        p->vw = model_add_layer_tensor(m, PR_TENSOR_WEIGHT, l, 2, KV, C, "self_attn.v_proj.weight");
        if (c->qkv_bias) p->vb = model_add_layer_tensor(m, PR_TENSOR_BIAS, l, 1, KV, 0, "self_attn.v_proj.bias");
        p->ow = model_add_layer_tensor(m, PR_TENSOR_WEIGHT, l, 2, C, Q, "self_attn.o_proj.weight");
        if (c->o_bias) p->ob = model_add_layer_tensor(m, PR_TENSOR_BIAS, l, 1, C, 0, "self_attn.o_proj.bias");
        if (c->qk_norm) {
            p->qnw = model_add_layer_tensor(m, PR_TENSOR_NORM_GAIN, l, 1, hd, 0, "self_attn.q_norm.weight");
            p->knw = model_add_layer_tensor(m, PR_TENSOR_NORM_GAIN, l, 1, hd, 0, "self_attn.k_norm.weight");
        }
        p->gw = model_add_layer_tensor(m, PR_TENSOR_WEIGHT, l, 2, F, C, "mlp.gate_proj.weight");
        if (c->mlp_bias) p->gb = model_add_layer_tensor(m, PR_TENSOR_BIAS, l, 1, F, 0, "mlp.gate_proj.bias");
        p->uw = model_add_layer_tensor(m, PR_TENSOR_WEIGHT, l, 2, F, C, "mlp.up_proj.weight");
        if (c->mlp_bias) p->ub = model_add_layer_tensor(m, PR_TENSOR_BIAS, l, 1, F, 0, "mlp.up_proj.bias");
        p->dw = model_add_layer_tensor(m, PR_TENSOR_WEIGHT, l, 2, C, F, "mlp.down_proj.weight");
        if (c->mlp_bias) p->db = model_add_layer_tensor(m, PR_TENSOR_BIAS, l, 1, C, 0, "mlp.down_proj.bias");
        p->ln1w = model_add_layer_tensor(m, PR_TENSOR_NORM_GAIN, l, 1, C, 0, "input_layernorm.weight");
        p->ln2w = model_add_layer_tensor(m, PR_TENSOR_NORM_GAIN, l, 1, C, 0, "post_attention_layernorm.weight");
    }
    g->normw = model_add_base_tensor(m, PR_TENSOR_NORM_GAIN, -1, 1, C, 0, "model.norm.weight");
    m->head = c->tied_head ? m->wte : model_add_base_tensor(m, PR_TENSOR_WEIGHT, -1, 2, V, C, "lm_head.weight");

    model_set_workspace(m->wte, PR_WS_EMBEDDING);
    for (int l = 0; l < c->n_layers; l++) {
        layer_params *p = &g->lp[l];
        pr_tensor_info *norms[] = { p->ln1w, p->ln2w };
        pr_tensor_info *attn[] = { p->qw, p->qb, p->kw, p->kb, p->vw, p->vb, p->ow, p->ob, p->qnw, p->knw };
        pr_tensor_info *ffn[] = { p->gw, p->gb, p->uw, p->ub, p->dw, p->db };
        for (size_t i = 0; i < sizeof norms / sizeof norms[0]; i++)
            model_set_workspace(norms[i], PR_WS_NORM);
        for (size_t i = 0; i < sizeof attn / sizeof attn[0]; i++)
            model_set_workspace(attn[i], PR_WS_ATTENTION);
        for (size_t i = 0; i < sizeof ffn / sizeof ffn[0]; i++)
            model_set_workspace(ffn[i], PR_WS_FFN);
    }
    model_set_workspace(g->normw, PR_WS_NORM);
    if (m->head != m->wte)
        model_set_workspace(m->head, PR_WS_HEAD);
    return PR_OK;
}

/* transformers' LlamaPreTrainedModel init: every Linear and Embedding
 * normal(0, initializer_range), no residual scaling. */
static float init_std(const pr_model *m, const pr_tensor_info *t)
{
    (void)t;
    return m->cfg.init_std;
}

/* [d_out, d_in] views of the nn.Linear weights.  attn.v folds into
 * v_proj (a per-channel rescaling of the values is one of v_proj's rows
 * and bias), ffn.act into down_proj's columns.  attn.k follows RoPE,
 * which mixes channel i with i + d_head/2, so a change there has no
 * equivalent in k_proj: it has no weight. */
static int site_weight(pr_model *m, int site, int layer, model_weight_view *v, pr_error *err)
{
    const pr_model_config *c = &m->cfg;
    const layer_params *p = &((llama *)m->fam)->lp[layer];
    int C = c->d_model, F = c->d_ff, Q = c->n_heads * c->d_head, KV = c->n_kv_heads * c->d_head;
    pr_tensor_info *wt = NULL, *bt = NULL;
    int din = C, dout = 0;
    switch (site) {
    case PR_SITE_Q: wt = p->qw; bt = p->qb; dout = Q; break;
    case PR_SITE_K: wt = p->kw; bt = p->kb; dout = KV; break;
    case PR_SITE_V:
    case PR_SITE_ATTN_V: wt = p->vw; bt = p->vb; dout = KV; break;
    case PR_SITE_O: wt = p->ow; bt = p->ob; din = Q; dout = C; break;
    case PR_SITE_FFN_GATE: wt = p->gw; bt = p->gb; dout = F; break;
    case PR_SITE_FFN_UP: wt = p->uw; bt = p->ub; dout = F; break;
    case PR_SITE_FFN_DOWN: wt = p->dw; bt = p->db; din = F; dout = C; break;
    case PR_SITE_FFN_ACT: wt = p->dw; din = F; dout = C; break;
    case PR_SITE_ATTN_K:
        return pr_errorf(err, PR_ERR_UNSUPPORTED,
                         "site_weight: attn.k follows RoPE in %s models; a change there does not fold into "
                         "k_proj (use site k for the projection's output)", variant_name(c->variant));
    default:
        return pr_errorf(err, PR_ERR_UNSUPPORTED, "site_weight: site '%s' has no weight in %s models",
                         pr_site_name(site), variant_name(c->variant));
    }
    if (!wt->data && !model_tensor_bf16(m, wt))
        return pr_errorf(err, PR_ERR_INVALID, "site_weight: tensor '%s' has no data", wt->name);
    v->tensor = wt;
    v->off = 0;
    v->w = wt->data;
    v->ld = din;
    v->b = bt && bt->data ? bt->data : NULL;
    v->d_in = din;
    v->d_out = dout;
    v->layout = PR_WEIGHT_OUT_IN;
    return PR_OK;
}

/* ---- activations --------------------------------------------------------- */

static void layout(pr_model *m, bump *b, int B, int Ti)
{
    const pr_model_config *c = &m->cfg;
    llama *g = m->fam;
    size_t N = (size_t)B * (size_t)Ti, T = (size_t)Ti;
    size_t C = (size_t)c->d_model, F = (size_t)c->d_ff;
    size_t H = (size_t)c->n_heads, Hkv = (size_t)c->n_kv_heads;
    size_t hd = (size_t)c->d_head, Q = H * hd, KV = Hkv * hd;
    size_t Pmax = (size_t)model_max_prefix_room(m);
    int qkn = c->qk_norm;

    /* one area per layer, or one for them all with recompute (family.h) */
    int areas = model_act_areas(m);
    for (int l = 0; l < areas; l++) {
        layer_acts *a = &g->la[l];
        size_t P = (size_t)model_act_prefix_room(m, l);
        a->ln1 = bump_take(b, N * C);
        a->rstd1 = bump_take(b, N);
        a->q = bump_take(b, N * Q);
        a->k = bump_take(b, N * KV);
        a->v = bump_take(b, N * KV);
        a->qn = bump_take_if(b, qkn, N * Q);
        a->kn = bump_take_if(b, qkn, N * KV);
        a->qrstd = bump_take_if(b, qkn, N * H);
        a->krstd = bump_take_if(b, qkn, N * Hkv);
        a->qr = bump_take(b, N * Q);
        a->kr = bump_take(b, N * KV);
        a->katt = bump_take_if(b, model_act_has_hooks(m, PR_SITE_ATTN_K, l), N * KV);
        a->vatt = bump_take_if(b, model_act_has_hooks(m, PR_SITE_ATTN_V, l), N * KV);
        a->att = bump_take(b, (size_t)B * H * T * (P + T));
        a->atty = bump_take(b, N * Q);
        a->attproj = bump_take(b, N * C);
        a->aout = bump_take_if(b, model_act_has_hooks(m, PR_SITE_ATTN_OUT, l), N * C);
        a->resid2 = bump_take(b, N * C);
        a->ln2 = bump_take(b, N * C);
        a->rstd2 = bump_take(b, N);
        a->gate = bump_take(b, N * F);
        a->up = bump_take(b, N * F);
        a->swi = bump_take(b, N * F);
        a->act = bump_take_if(b, model_act_has_hooks(m, PR_SITE_FFN_ACT, l), N * F);
        a->down = bump_take(b, N * C);
        a->fout = bump_take_if(b, model_act_has_hooks(m, PR_SITE_FFN_OUT, l), N * C);
        a->resid3 = bump_take(b, N * C);
    }
    for (int l = areas; l < c->n_layers; l++)
        g->la[l] = g->la[0];
    g->rstdf = bump_take(b, N);
    g->cos = bump_take(b, T * (hd / 2));
    g->sin = bump_take(b, T * (hd / 2));
    g->rope_T = 0;

    int any_k = model_any_layer_has_hooks(m, PR_SITE_ATTN_K), any_v = model_any_layer_has_hooks(m, PR_SITE_ATTN_V);
    g->dq = bump_take(b, N * Q);
    g->dqr = bump_take(b, N * Q);
    g->dk = bump_take(b, N * KV);
    g->dkr = bump_take(b, N * KV);
    g->dv = bump_take(b, N * KV);
    g->dkatt = bump_take_if(b, any_k, N * KV);
    g->dvatt = bump_take_if(b, any_v, N * KV);
    g->dqn = bump_take_if(b, qkn, N * Q);
    g->dkn = bump_take_if(b, qkn, N * KV);
    g->datty = bump_take(b, N * Q);
    g->dattproj = bump_take(b, N * C);
    g->ddown = bump_take(b, N * C);
    g->dact = bump_take(b, N * F);
    g->dswi = bump_take(b, N * F);
    g->dgate = bump_take(b, N * F);
    g->dup = bump_take(b, N * F);
    g->att_scratch = bump_take(b, T * (Pmax + T));
}

/* ---- final norm ---------------------------------------------------------- */

static void final_norm_forward(pr_model *m, const float *x, float *out)
{
    llama *g = m->fam;
    rmsnorm_forward(out, g->rstdf, x, g->normw->data, m->B * m->T, m->cfg.d_model, m->cfg.norm_eps);
}

static void final_norm_backward(pr_model *m, float *dx, const float *dout, const float *x)
{
    llama *g = m->fam;
    rmsnorm_backward(dx, grad_of(g->normw), dout, x, g->normw->data, g->rstdf, m->B * m->T, m->cfg.d_model);
}

/* ---- blocks -------------------------------------------------------------- */

/* A projection nn.Linear y (N,dout) = x (N,din) W^T + b, then its site's hooks. */
static int proj_forward(pr_model *m, int site, int l, const float *x, int din, const pr_tensor_info *w,
                        const pr_tensor_info *bias, float *y, int dout, pr_error *err)
{
    int N = m->B * m->T;
    int rc = model_matmul_forward(m, y, dout, x, din, w, 0, data_of(bias), N, din, dout, err);
    if (rc)
        return rc;
    return model_proj_forward(m, site, l, x, din, y, dout, dout, err);
}

/* The projection's backward: its hooks, then dx (N,din) += dy W, and the
 * weight's and bias's gradients when they are trained.  dy (N,dout). */
/* no_dx: the base product adds nothing to dx (the lowest block run, whose
 * input gradient nothing needs); the site's hooks still get dx. */
static int proj_backward_dx(pr_model *m, int site, int l, const float *x, int din, float *dx, int no_dx,
                            const pr_tensor_info *w, const pr_tensor_info *bias, float *y, int dout, float *dy,
                            pr_error *err)
{
    int N = m->B * m->T;
    int rc = model_proj_backward(m, site, l, x, din, dx, y, dout, dout, dy, err);
    if (rc)
        return rc;
    return model_matmul_backward(m, no_dx ? NULL : dx, din, grad_of(w), grad_of(bias), dy, dout, x, din, w, 0, N,
                                 din, dout, err);
}

static int proj_backward(pr_model *m, int site, int l, const float *x, int din, float *dx, const pr_tensor_info *w,
                         const pr_tensor_info *bias, float *y, int dout, float *dy, pr_error *err)
{
    return proj_backward_dx(m, site, l, x, din, dx, 0, w, bias, y, dout, dy, err);
}

/* cos, sin for positions P .. P+T-1 (P = model_position_offset). */
static void fill_rope(pr_model *m)
{
    llama *g = m->fam;
    int P = model_position_offset(m);
    if (g->rope_T == m->T && g->rope_P == P)
        return;
    rope_tables(g->cos, g->sin, g->inv_freq, m->cfg.d_head, P, m->T);
    g->rope_T = m->T;
    g->rope_P = P;
}

/* Causal attention of T new queries at positions pos0 .. pos0+T-1 over P
 * prefix columns and the cached keys 0 .. pos0+T-1 (the new ones
 * included).  q (T, H*hd); kc, vc (>= pos0+T, Hkv*hd); pk, pv (Hkv, P, hd);
 * out (T, H*hd); scores (P + pos0 + T). */
static void attention_cached(float *out, const float *q, const float *kc, const float *vc, const float *pk,
                             const float *pv, int P, int T, int pos0, int H, int Hkv, int hd, float *scores)
{
    int KV = Hkv * hd, Q = H * hd, group = H / Hkv;
    float scale = 1.0f / sqrtf((float)hd);
    for (int i = 0; i < T; i++) {
        int nk = pos0 + i + 1;
        for (int h = 0; h < H; h++) {
            int gk = h / group;
            const float *qi = q + (size_t)i * Q + (size_t)h * hd;
            float mx = -INFINITY;
            for (int j = 0; j < P + nk; j++) {
                const float *kj = j < P ? pk + ((size_t)gk * P + j) * hd : kc + (size_t)(j - P) * KV + (size_t)gk * hd;
                float sdot = 0.0f;
                for (int d = 0; d < hd; d++)
                    sdot += qi[d] * kj[d];
                scores[j] = sdot * scale;
                mx = fmaxf(mx, scores[j]);
            }
            double sum = 0.0;
            for (int j = 0; j < P + nk; j++) {
                scores[j] = expf(scores[j] - mx);
                sum += scores[j];
            }
            float inv = (float)(1.0 / sum);
            float *o = out + (size_t)i * Q + (size_t)h * hd;
            memset(o, 0, (size_t)hd * sizeof(float));
            for (int j = 0; j < P + nk; j++) {
                const float *vj = j < P ? pv + ((size_t)gk * P + j) * hd : vc + (size_t)(j - P) * KV + (size_t)gk * hd;
                float w = scores[j] * inv;
                for (int d = 0; d < hd; d++)
                    o[d] += w * vj[d];
            }
        }
    }
}


static int decode_reserve(pr_model *m, int ctx, pr_error *err)
{
    const pr_model_config *c = &m->cfg;
    llama *g = m->fam;
    decode_free(m);
    size_t KV = (size_t)c->n_kv_heads * c->d_head, L = (size_t)c->n_layers;
    g->cache = malloc(L * 2 * (size_t)ctx * KV * sizeof(float));
    g->kc = calloc(L, sizeof *g->kc);
    g->vc = calloc(L, sizeof *g->vc);
    g->dec_scores = malloc(((size_t)model_max_prefix_room(m) + (size_t)ctx) * sizeof(float));
    if (!g->cache || !g->kc || !g->vc || !g->dec_scores) {
        decode_free(m);
        return pr_errorf(err, PR_ERR_NOMEM, "decode: out of memory for a key/value cache of %d positions", ctx);
    }
    for (size_t l = 0; l < L; l++) {
        g->kc[l] = g->cache + (2 * l) * (size_t)ctx * KV;
        g->vc[l] = g->cache + (2 * l + 1) * (size_t)ctx * KV;
    }
    g->ctx = ctx;
    return PR_OK;
}

static int block_forward(pr_model *m, int l, const float *x, const float **out, pr_error *err)
{
    const pr_model_config *c = &m->cfg;
    llama *g = m->fam;
    const layer_params *p = &g->lp[l];
    layer_acts *a = &g->la[l];
    const layer_frame *f = &m->lf[l];
    int B = m->B, T = m->T, N = B * T, C = c->d_model, F = c->d_ff;
    int H = c->n_heads, Hkv = c->n_kv_heads, hd = c->d_head;
    int Q = H * hd, KV = Hkv * hd;
    float eps = c->norm_eps;
    int rc;

    int dec = m->decode_pos >= 0, pos0 = dec ? m->decode_pos : 0;
    if (c->sliding_window > 0 && pos0 + T + model_prefix_room(m, l) > c->sliding_window)
        return pr_errorf(err, PR_ERR_UNSUPPORTED,
                         "forward: %d positions exceed the model's sliding_window of %d; peftref runs "
                         "sequences within the window only (where the window changes nothing)",
                         pos0 + T + model_prefix_room(m, l), c->sliding_window);
    if (dec && l == 0) {
        /* positions pos0 .. pos0+T-1; the next full forward refills */
        rope_tables(g->cos, g->sin, g->inv_freq, hd, model_position_offset(m) + pos0, T);
        g->rope_T = -1;
    } else if (!dec) {
        fill_rope(m);
    }

    /* attention: x -> rmsnorm -> q, k, v -> (q/k norm) -> RoPE -> attention -> o_proj */
    rmsnorm_forward(a->ln1, a->rstd1, x, p->ln1w->data, N, C, eps);
    if ((rc = proj_forward(m, PR_SITE_Q, l, a->ln1, C, p->qw, p->qb, a->q, Q, err)) ||
        (rc = proj_forward(m, PR_SITE_K, l, a->ln1, C, p->kw, p->kb, a->k, KV, err)) ||
        (rc = proj_forward(m, PR_SITE_V, l, a->ln1, C, p->vw, p->vb, a->v, KV, err)))
        return rc;
    const float *qin = a->q, *kin = a->k;
    if (c->qk_norm) {
        rmsnorm_forward(a->qn, a->qrstd, a->q, p->qnw->data, N * H, hd, eps);
        rmsnorm_forward(a->kn, a->krstd, a->k, p->knw->data, N * Hkv, hd, eps);
        qin = a->qn;
        kin = a->kn;
    }
    rope_forward(a->qr, Q, qin, Q, g->cos, g->sin, B, T, H, hd);
    rope_forward(a->kr, KV, kin, KV, g->cos, g->sin, B, T, Hkv, hd);
    const float *k, *v;
    int ldk, ldv;
    if ((rc = model_stream_forward(m, PR_SITE_ATTN_K, l, a->kr, KV, a->katt, KV, &k, &ldk, err)) ||
        (rc = model_stream_forward(m, PR_SITE_ATTN_V, l, a->v, KV, a->vatt, KV, &v, &ldv, err)) ||
        (rc = model_prefix_forward(m, l, err)))
        return rc;
    if (dec) {
        model_copy_rows(g->kc[l] + (size_t)pos0 * KV, KV, k, ldk, T, KV);
        model_copy_rows(g->vc[l] + (size_t)pos0 * KV, KV, v, ldv, T, KV);
        attention_cached(a->atty, a->qr, g->kc[l], g->vc[l], f->pk, f->pv, f->P, T, pos0, H, Hkv, hd,
                         g->dec_scores);
    } else {
        attention_forward(a->atty, a->att, a->qr, Q, k, ldk, v, ldv, f->pk, f->pv, f->P, B, T, H, Hkv, hd);
    }
    if ((rc = proj_forward(m, PR_SITE_O, l, a->atty, Q, p->ow, p->ob, a->attproj, C, err)))
        return rc;
    const float *aout;
    if ((rc = model_sublayer_forward(m, PR_SITE_ATTN_OUT, l, a->ln1, a->attproj, a->aout, C, &aout, err)))
        return rc;
    residual_forward(a->resid2, x, aout, (size_t)N * C);

    /* MLP: resid2 -> rmsnorm -> gate, up -> silu(gate) * up -> down_proj */
    rmsnorm_forward(a->ln2, a->rstd2, a->resid2, p->ln2w->data, N, C, eps);
    if ((rc = proj_forward(m, PR_SITE_FFN_GATE, l, a->ln2, C, p->gw, p->gb, a->gate, F, err)) ||
        (rc = proj_forward(m, PR_SITE_FFN_UP, l, a->ln2, C, p->uw, p->ub, a->up, F, err)))
        return rc;
    swiglu_forward(a->swi, a->gate, a->up, (size_t)N * F);
    const float *act;
    if ((rc = model_stream_forward(m, PR_SITE_FFN_ACT, l, a->swi, F, a->act, F, &act, NULL, err)))
        return rc;
    if ((rc = proj_forward(m, PR_SITE_FFN_DOWN, l, act, F, p->dw, p->db, a->down, C, err)))
        return rc;
    const float *fout;
    if ((rc = model_sublayer_forward(m, PR_SITE_FFN_OUT, l, a->ln2, a->down, a->fout, C, &fout, err)))
        return rc;
    residual_forward(a->resid3, a->resid2, fout, (size_t)N * C);
    *out = a->resid3;
    return PR_OK;
}

/* ---- backward ------------------------------------------------------------ */

static void zero(float *p, size_t n)
{
    memset(p, 0, n * sizeof(float));
}

/* On entry m->dres holds dLoss/d(block l output); on return dLoss/dx.
 * Mirrors block_forward line by line. */
static int block_backward(pr_model *m, int l, const float *x, pr_error *err)
{
    const pr_model_config *c = &m->cfg;
    llama *g = m->fam;
    const layer_params *p = &g->lp[l];
    layer_acts *a = &g->la[l];
    const layer_frame *f = &m->lf[l];
    int B = m->B, T = m->T, N = B * T, C = c->d_model, F = c->d_ff;
    int H = c->n_heads, Hkv = c->n_kv_heads, hd = c->d_head;
    int Q = H * hd, KV = Hkv * hd;
    size_t NC = (size_t)N * C, NF = (size_t)N * F, NQ = (size_t)N * Q, NKV = (size_t)N * KV;
    int rc;

    /* ---- MLP ---- */
    const float *act = model_has_hooks(m, PR_SITE_FFN_ACT, l) ? a->act : a->swi;
    zero(m->dln, NC);
    if (model_has_hooks(m, PR_SITE_FFN_OUT, l)) {
        memcpy(m->dstream, m->dres, NC * sizeof(float));
        if ((rc = model_sublayer_backward(m, PR_SITE_FFN_OUT, l, a->ln2, m->dln, a->fout, m->dstream, g->ddown, C,
                                          err)))
            return rc;
    } else {
        memcpy(g->ddown, m->dres, NC * sizeof(float));
    }
    zero(g->dact, NF);
    if ((rc = proj_backward(m, PR_SITE_FFN_DOWN, l, act, F, g->dact, p->dw, p->db, a->down, C, g->ddown, err)))
        return rc;
    float *dswi = g->dact;
    if (model_has_hooks(m, PR_SITE_FFN_ACT, l)) {
        zero(g->dswi, NF);
        if ((rc = model_stream_backward(m, PR_SITE_FFN_ACT, l, a->swi, F, g->dswi, a->act, g->dact, F, err)))
            return rc;
        dswi = g->dswi;
    }
    zero(g->dgate, NF);
    zero(g->dup, NF);
    swiglu_backward(g->dgate, g->dup, dswi, a->gate, a->up, NF);
    if ((rc = proj_backward(m, PR_SITE_FFN_UP, l, a->ln2, C, m->dln, p->uw, p->ub, a->up, F, g->dup, err)) ||
        (rc = proj_backward(m, PR_SITE_FFN_GATE, l, a->ln2, C, m->dln, p->gw, p->gb, a->gate, F, g->dgate, err)))
        return rc;
    rmsnorm_backward(m->dres, grad_of(p->ln2w), m->dln, a->resid2, p->ln2w->data, a->rstd2, N, C);

    /* ---- attention ---- */
    zero(m->dln, NC);
    if (model_has_hooks(m, PR_SITE_ATTN_OUT, l)) {
        memcpy(m->dstream, m->dres, NC * sizeof(float));
        if ((rc = model_sublayer_backward(m, PR_SITE_ATTN_OUT, l, a->ln1, m->dln, a->aout, m->dstream, g->dattproj,
                                          C, err)))
            return rc;
    } else {
        memcpy(g->dattproj, m->dres, NC * sizeof(float));
    }
    zero(g->datty, NQ);
    if ((rc = proj_backward(m, PR_SITE_O, l, a->atty, Q, g->datty, p->ow, p->ob, a->attproj, C, g->dattproj, err)))
        return rc;
    int hk = model_has_hooks(m, PR_SITE_ATTN_K, l), hv = model_has_hooks(m, PR_SITE_ATTN_V, l);
    const float *k = hk ? a->katt : a->kr, *v = hv ? a->vatt : a->v;
    float *dk_att = hk ? g->dkatt : g->dkr, *dv_att = hv ? g->dvatt : g->dv;
    int P = f->P;
    zero(g->dqr, NQ);
    zero(g->dkr, NKV);
    zero(g->dv, NKV);
    if (hk) zero(g->dkatt, NKV);
    if (hv) zero(g->dvatt, NKV);
    if (P) {
        zero(m->dpk, (size_t)P * KV);
        zero(m->dpv, (size_t)P * KV);
    }
    attention_backward(g->dqr, dk_att, dv_att, m->dpk, m->dpv, g->datty, a->att, a->qr, Q, k, KV, v, KV, f->pk,
                       f->pv, P, B, T, H, Hkv, hd, g->att_scratch);
    if ((rc = model_prefix_backward(m, l, err)))
        return rc;
    if (hv && (rc = model_stream_backward(m, PR_SITE_ATTN_V, l, a->v, KV, g->dv, a->vatt, g->dvatt, KV, err)))
        return rc;
    if (hk && (rc = model_stream_backward(m, PR_SITE_ATTN_K, l, a->kr, KV, g->dkr, a->katt, g->dkatt, KV, err)))
        return rc;
    /* RoPE, then the q/k norms, back to the projections' outputs */
    zero(g->dq, NQ);
    zero(g->dk, NKV);
    if (c->qk_norm) {
        zero(g->dqn, NQ);
        zero(g->dkn, NKV);
        rope_backward(g->dqn, Q, g->dqr, Q, g->cos, g->sin, B, T, H, hd);
        rope_backward(g->dkn, KV, g->dkr, KV, g->cos, g->sin, B, T, Hkv, hd);
        rmsnorm_backward(g->dq, grad_of(p->qnw), g->dqn, a->q, p->qnw->data, a->qrstd, N * H, hd);
        rmsnorm_backward(g->dk, grad_of(p->knw), g->dkn, a->k, p->knw->data, a->krstd, N * Hkv, hd);
    } else {
        rope_backward(g->dq, Q, g->dqr, Q, g->cos, g->sin, B, T, H, hd);
        rope_backward(g->dk, KV, g->dkr, KV, g->cos, g->sin, B, T, Hkv, hd);
    }
    /* the lowest block differentiated: no input gradient unless ln1 trains */
    int no_dx = m->bwd_no_input_grad && !grad_of(p->ln1w);
    if ((rc = proj_backward_dx(m, PR_SITE_V, l, a->ln1, C, m->dln, no_dx, p->vw, p->vb, a->v, KV, g->dv, err)) ||
        (rc = proj_backward_dx(m, PR_SITE_K, l, a->ln1, C, m->dln, no_dx, p->kw, p->kb, a->k, KV, g->dk, err)) ||
        (rc = proj_backward_dx(m, PR_SITE_Q, l, a->ln1, C, m->dln, no_dx, p->qw, p->qb, a->q, Q, g->dq, err)))
        return rc;
    if (!no_dx)
        rmsnorm_backward(m->dres, grad_of(p->ln1w), m->dln, x, p->ln1w->data, a->rstd1, N, C);
    return PR_OK;
}

const family_ops family_llama = {
    .name = "LLaMA",
    .layer_prefix = "model.layers.",
    .check_config = check_config,
    .count_tensors = count_tensors,
    .build = build,
    .destroy = destroy,
    .init_std = init_std,
    .site_weight = site_weight,
    .layout = layout,
    .final_norm_forward = final_norm_forward,
    .final_norm_backward = final_norm_backward,
    .block_forward = block_forward,
    .block_backward = block_backward,
    .decode_reserve = decode_reserve,
    .decode_free = decode_free,
};
