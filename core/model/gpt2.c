/* peftref core: the GPT-2 family (Radford et al. 2019).
 *
 * Pre-norm blocks with learned positions, LayerNorm and GELU(tanh):
 *   resid2 = x + c_proj(attention(c_attn(ln_1(x))))
 *   resid3 = resid2 + mlp.c_proj(gelu(mlp.c_fc(ln_2(resid2))))
 * and a final ln_f before the LM head.  Tensors carry Hugging Face GPT-2
 * names without "transformer." and Conv1D layouts [in, out], so a
 * checkpoint's f32 tensors are used in place.
 *
 * Shapes: B batch, T internal time, N = B*T rows, C = d_model, Q = H*hd
 * (query width), KV = Hkv*hd (key/value width), QKV = Q + 2*KV, F = d_ff.
 * Prefix keys/values (concat.c) add P columns to a layer's attention:
 * att is (B,H,T,P+T). */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "family.h"
#include "kernels.h"

typedef struct layer_params {
    pr_tensor_info *ln1w, *ln1b;
    pr_tensor_info *qkvw, *qkvb;           /* attn.c_attn  (C, QKV), (QKV) */
    pr_tensor_info *attprojw, *attprojb;   /* attn.c_proj  (Q, C), (C) */
    pr_tensor_info *ln2w, *ln2b;
    pr_tensor_info *fcw, *fcb;             /* mlp.c_fc     (C, F), (F) */
    pr_tensor_info *fcprojw, *fcprojb;     /* mlp.c_proj   (F, C), (C) */
} layer_params;

/* Saved activations of one block.  The stream-site buffers (katt, vatt,
 * aout, act, fout) exist only where hooks are attached; without hooks the
 * state leaving the site is the state entering it. */
typedef struct layer_acts {
    float *ln1, *ln1_mean, *ln1_rstd;  /* (N,C), (N), (N) */
    float *qkv;                        /* (N,QKV) after qkv/q/k/v hooks */
    float *katt, *vatt;                /* (N,KV) attn.k / attn.v outputs */
    float *att;                        /* (B,H,T,P+T) softmax probabilities */
    float *atty;                       /* (N,Q) attention output */
    float *attproj;                    /* (N,C) c_proj output after o hooks */
    float *aout;                       /* (N,C) attn_out output */
    float *resid2;                     /* (N,C) residual after attention */
    float *ln2, *ln2_mean, *ln2_rstd;  /* (N,C), (N), (N) */
    float *fch;                        /* (N,F) c_fc output after ffn.up hooks */
    float *fch_gelu;                   /* (N,F) */
    float *act;                        /* (N,F) ffn.act output */
    float *fcproj;                     /* (N,C) c_proj output after ffn.down hooks */
    float *fout;                       /* (N,C) ffn_out output */
    float *resid3;                     /* (N,C) residual after the FFN */
} layer_acts;

typedef struct gpt2 {
    layer_params *lp;            /* (L) */
    layer_acts *la;              /* (L) */
    pr_tensor_info *lnfw, *lnfb;
    float *lnf_mean, *lnf_rstd;  /* (N) */
    /* backward scratch */
    float *dqkv;                 /* (N,QKV) */
    float *dkatt, *dvatt;        /* (N,KV), only with attn.k / attn.v hooks */
    float *datty;                /* (N,Q) */
    float *dattproj, *dfcproj;   /* (N,C) */
    float *dffa, *dffb;          /* (N,F) */
    float *att_scratch;          /* (T,Pmax+T) */
} gpt2;

/* GPT-2 runs any head layout, but only its own norm, activation, position
 * encoding and fused c_attn. */
static int check_config(const pr_model_config *c, pr_error *err)
{
    if (c->norm != PR_NORM_LAYERNORM)
        return pr_errorf(err, PR_ERR_UNSUPPORTED, "config: norm must be LayerNorm for the GPT-2 family");
    if (c->act != PR_ACT_GELU_TANH)
        return pr_errorf(err, PR_ERR_UNSUPPORTED, "config: act must be GELU (tanh) for the GPT-2 family");
    if (c->pos != PR_POS_LEARNED)
        return pr_errorf(err, PR_ERR_UNSUPPORTED,
                         "config: pos must be learned positions for the GPT-2 family");
    if (!c->fused_qkv)
        return pr_errorf(err, PR_ERR_UNSUPPORTED,
                         "config: fused_qkv must be 1 for the GPT-2 family (attn.c_attn is one matrix)");
    return PR_OK;
}

/* ---- tensors ------------------------------------------------------------- */

static int count_tensors(const pr_model_config *c)
{
    int per_layer = c->bias ? 12 : 6;
    return 2 + c->n_layers * per_layer + (c->bias ? 2 : 1) + (c->tied_head ? 0 : 1);
}

static void destroy(pr_model *m)
{
    gpt2 *g = m->fam;
    if (!g)
        return;
    free(g->lp);
    free(g->la);
    free(g);
    m->fam = NULL;
}

/* Hugging Face GPT-2 order: wte, wpe, blocks, ln_f (lm_head when untied). */
static int build(pr_model *m, pr_error *err)
{
    const pr_model_config *c = &m->cfg;
    gpt2 *g = calloc(1, sizeof *g);
    if (g) {
        g->lp = calloc((size_t)c->n_layers, sizeof *g->lp);
        g->la = calloc((size_t)c->n_layers, sizeof *g->la);
    }
    m->fam = g;
    if (!g || !g->lp || !g->la)
        return pr_errorf(err, PR_ERR_NOMEM, "model: out of memory for the tensor table");

    int64_t C = c->d_model, F = c->d_ff, V = c->vocab_size;
    int64_t Q = (int64_t)c->n_heads * c->d_head, KV = (int64_t)c->n_kv_heads * c->d_head;
    int64_t QKV = Q + 2 * KV;
    int b = c->bias;

    m->wte = model_add_base_tensor(m, PR_TENSOR_EMBEDDING, -1, 2, V, C, "wte.weight");
    m->wpe = model_add_base_tensor(m, PR_TENSOR_EMBEDDING, -1, 2, c->max_seq, C, "wpe.weight");
    for (int l = 0; l < c->n_layers; l++) {
        layer_params *p = &g->lp[l];
        p->ln1w = model_add_layer_tensor(m, PR_TENSOR_NORM_GAIN, l, 1, C, 0, "ln_1.weight");
        if (b) p->ln1b = model_add_layer_tensor(m, PR_TENSOR_NORM_BIAS, l, 1, C, 0, "ln_1.bias");
        p->qkvw = model_add_layer_tensor(m, PR_TENSOR_WEIGHT, l, 2, C, QKV, "attn.c_attn.weight");
        if (b) p->qkvb = model_add_layer_tensor(m, PR_TENSOR_BIAS, l, 1, QKV, 0, "attn.c_attn.bias");
        p->attprojw = model_add_layer_tensor(m, PR_TENSOR_WEIGHT, l, 2, Q, C, "attn.c_proj.weight");
        if (b) p->attprojb = model_add_layer_tensor(m, PR_TENSOR_BIAS, l, 1, C, 0, "attn.c_proj.bias");
        p->ln2w = model_add_layer_tensor(m, PR_TENSOR_NORM_GAIN, l, 1, C, 0, "ln_2.weight");
        if (b) p->ln2b = model_add_layer_tensor(m, PR_TENSOR_NORM_BIAS, l, 1, C, 0, "ln_2.bias");
        p->fcw = model_add_layer_tensor(m, PR_TENSOR_WEIGHT, l, 2, C, F, "mlp.c_fc.weight");
        if (b) p->fcb = model_add_layer_tensor(m, PR_TENSOR_BIAS, l, 1, F, 0, "mlp.c_fc.bias");
        p->fcprojw = model_add_layer_tensor(m, PR_TENSOR_WEIGHT, l, 2, F, C, "mlp.c_proj.weight");
        if (b) p->fcprojb = model_add_layer_tensor(m, PR_TENSOR_BIAS, l, 1, C, 0, "mlp.c_proj.bias");
    }
    g->lnfw = model_add_base_tensor(m, PR_TENSOR_NORM_GAIN, -1, 1, C, 0, "ln_f.weight");
    if (b) g->lnfb = model_add_base_tensor(m, PR_TENSOR_NORM_BIAS, -1, 1, C, 0, "ln_f.bias");
    m->head = c->tied_head ? m->wte : model_add_base_tensor(m, PR_TENSOR_WEIGHT, -1, 2, V, C, "lm_head.weight");
    /* the PEFT-Ref workspace of every tensor, which selection techniques choose by */
    model_set_workspace(m->wte, PR_WS_EMBEDDING);
    model_set_workspace(m->wpe, PR_WS_EMBEDDING);
    for (int l = 0; l < c->n_layers; l++) {
        layer_params *p = &g->lp[l];
        pr_tensor_info *norms[] = { p->ln1w, p->ln1b, p->ln2w, p->ln2b };
        pr_tensor_info *attn[] = { p->qkvw, p->qkvb, p->attprojw, p->attprojb };
        pr_tensor_info *ffn[] = { p->fcw, p->fcb, p->fcprojw, p->fcprojb };
        for (int i = 0; i < 4; i++) {
            model_set_workspace(norms[i], PR_WS_NORM);
            model_set_workspace(attn[i], PR_WS_ATTENTION);
            model_set_workspace(ffn[i], PR_WS_FFN);
        }
    }
    model_set_workspace(g->lnfw, PR_WS_NORM);
    model_set_workspace(g->lnfb, PR_WS_NORM);
    if (m->head != m->wte)
        model_set_workspace(m->head, PR_WS_HEAD);
    return PR_OK;
}

/* GPT-2 init (Radford et al. 2019, sec. 2.3): normal(0, std), projections
 * into the residual stream scaled by 1/sqrt(2L) because L blocks each add
 * two of them. */
static float init_std(const pr_model *m, const pr_tensor_info *t)
{
    const gpt2 *g = m->fam;
    float std = m->cfg.init_std;
    if (t->layer >= 0 && (t == g->lp[t->layer].attprojw || t == g->lp[t->layer].fcprojw))
        return std / sqrtf(2.0f * (float)m->cfg.n_layers);
    return std;
}

/* [d_in, d_out] views of the Conv1D weights; q, k and v are column slices
 * of the fused c_attn weight [C, Q + 2KV] at offsets 0, Q, Q + KV.  The
 * stream sites attn.k and attn.v fold into the k and v slices (the
 * projection their values come from) and ffn.act into the whole
 * mlp.c_proj weight [F, C] (the projection its values go to), without a
 * bias: a per-channel rescaling of those values is a rescaling of the
 * slice's columns and bias, or of c_proj's rows. */
static int site_weight(pr_model *m, int site, int layer, model_weight_view *v, pr_error *err)
{
    const pr_model_config *c = &m->cfg;
    const layer_params *p = &((gpt2 *)m->fam)->lp[layer];
    int C = c->d_model, F = c->d_ff, Q = c->n_heads * c->d_head, KV = c->n_kv_heads * c->d_head;
    pr_tensor_info *wt = NULL, *bt = NULL;
    int off = 0, stride = 0, din = C, dout = 0;
    switch (site) {
    case PR_SITE_QKV: wt = p->qkvw; bt = p->qkvb; stride = Q + 2 * KV; dout = Q + 2 * KV; break;
    case PR_SITE_Q: wt = p->qkvw; bt = p->qkvb; stride = Q + 2 * KV; dout = Q; break;
    case PR_SITE_K: wt = p->qkvw; bt = p->qkvb; stride = Q + 2 * KV; off = Q; dout = KV; break;
    case PR_SITE_V: wt = p->qkvw; bt = p->qkvb; stride = Q + 2 * KV; off = Q + KV; dout = KV; break;
    case PR_SITE_O: wt = p->attprojw; bt = p->attprojb; stride = C; din = Q; dout = C; break;
    case PR_SITE_FFN_UP: wt = p->fcw; bt = p->fcb; stride = F; dout = F; break;
    case PR_SITE_FFN_DOWN: wt = p->fcprojw; bt = p->fcprojb; stride = C; din = F; dout = C; break;
    case PR_SITE_ATTN_K: wt = p->qkvw; bt = p->qkvb; stride = Q + 2 * KV; off = Q; dout = KV; break;
    case PR_SITE_ATTN_V: wt = p->qkvw; bt = p->qkvb; stride = Q + 2 * KV; off = Q + KV; dout = KV; break;
    case PR_SITE_FFN_ACT: wt = p->fcprojw; stride = C; din = F; dout = C; break;
    default:
        return pr_errorf(err, PR_ERR_UNSUPPORTED, "site_weight: site '%s' has no weight in GPT-2 models",
                         pr_site_name(site));
    }
    if (!wt->data && !model_tensor_bf16(m, wt))
        return pr_errorf(err, PR_ERR_INVALID, "site_weight: tensor '%s' has no data", wt->name);
    v->tensor = wt;
    v->off = off;
    v->w = wt->data ? wt->data + off : NULL;
    v->ld = stride;
    v->b = bt && bt->data ? bt->data + off : NULL;
    v->d_in = din;
    v->d_out = dout;
    v->layout = PR_WEIGHT_IN_OUT;
    return PR_OK;
}

/* ---- activations --------------------------------------------------------- */

static void layout(pr_model *m, bump *b, int B, int Ti)
{
    const pr_model_config *c = &m->cfg;
    gpt2 *g = m->fam;
    size_t N = (size_t)B * (size_t)Ti, T = (size_t)Ti;
    size_t C = (size_t)c->d_model, F = (size_t)c->d_ff;
    size_t H = (size_t)c->n_heads, Hkv = (size_t)c->n_kv_heads;
    size_t hd = (size_t)c->d_head, Q = H * hd, KV = Hkv * hd, QKV = Q + 2 * KV;
    size_t Pmax = (size_t)model_max_prefix_room(m);

    /* one area per layer, or one for them all with recompute (family.h) */
    int areas = model_act_areas(m);
    for (int l = 0; l < areas; l++) {
        layer_acts *a = &g->la[l];
        size_t P = (size_t)model_act_prefix_room(m, l);
        a->ln1 = bump_take(b, N * C);
        a->ln1_mean = bump_take(b, N);
        a->ln1_rstd = bump_take(b, N);
        a->qkv = bump_take(b, N * QKV);
        a->katt = bump_take_if(b, model_act_has_hooks(m, PR_SITE_ATTN_K, l), N * KV);
        a->vatt = bump_take_if(b, model_act_has_hooks(m, PR_SITE_ATTN_V, l), N * KV);
        a->att = bump_take(b, (size_t)B * H * T * (P + T));
        a->atty = bump_take(b, N * Q);
        a->attproj = bump_take(b, N * C);
        a->aout = bump_take_if(b, model_act_has_hooks(m, PR_SITE_ATTN_OUT, l), N * C);
        a->resid2 = bump_take(b, N * C);
        a->ln2 = bump_take(b, N * C);
        a->ln2_mean = bump_take(b, N);
        a->ln2_rstd = bump_take(b, N);
        a->fch = bump_take(b, N * F);
        a->fch_gelu = bump_take(b, N * F);
        a->act = bump_take_if(b, model_act_has_hooks(m, PR_SITE_FFN_ACT, l), N * F);
        a->fcproj = bump_take(b, N * C);
        a->fout = bump_take_if(b, model_act_has_hooks(m, PR_SITE_FFN_OUT, l), N * C);
        a->resid3 = bump_take(b, N * C);
    }
    for (int l = areas; l < c->n_layers; l++)
        g->la[l] = g->la[0];
    g->lnf_mean = bump_take(b, N);
    g->lnf_rstd = bump_take(b, N);

    g->dqkv = bump_take(b, N * QKV);
    g->dkatt = bump_take_if(b, model_any_layer_has_hooks(m, PR_SITE_ATTN_K), N * KV);
    g->dvatt = bump_take_if(b, model_any_layer_has_hooks(m, PR_SITE_ATTN_V), N * KV);
    g->datty = bump_take(b, N * Q);
    g->dattproj = bump_take(b, N * C);
    g->dfcproj = bump_take(b, N * C);
    g->dffa = bump_take(b, N * F);
    g->dffb = bump_take(b, N * F);
    g->att_scratch = bump_take(b, T * (Pmax + T));
}

/* ---- final norm ---------------------------------------------------------- */

static void final_norm_forward(pr_model *m, const float *x, float *out)
{
    gpt2 *g = m->fam;
    int N = m->B * m->T, C = m->cfg.d_model;
    layernorm_forward(out, g->lnf_mean, g->lnf_rstd, x, g->lnfw->data, data_of(g->lnfb), N, C, m->cfg.norm_eps);
}

static void final_norm_backward(pr_model *m, float *dx, const float *dout, const float *x)
{
    gpt2 *g = m->fam;
    int N = m->B * m->T, C = m->cfg.d_model;
    layernorm_backward(dx, grad_of(g->lnfw), grad_of(g->lnfb), dout, x, g->lnfw->data, g->lnf_mean, g->lnf_rstd,
                       N, C);
}

/* ---- blocks -------------------------------------------------------------- */

/* x (N,C) -> *out (N,C): x + attn(ln1(x)) = resid2, resid2 + ffn(ln2(resid2)) = resid3. */
static int block_forward(pr_model *m, int l, const float *x, const float **out, pr_error *err)
{
    const pr_model_config *c = &m->cfg;
    gpt2 *g = m->fam;
    const layer_params *p = &g->lp[l];
    layer_acts *a = &g->la[l];
    const layer_frame *f = &m->lf[l];
    int B = m->B, T = m->T, N = B * T, C = c->d_model, F = c->d_ff;
    int H = c->n_heads, Hkv = c->n_kv_heads, hd = c->d_head;
    int Q = H * hd, KV = Hkv * hd, QKV = Q + 2 * KV;
    float eps = c->norm_eps;
    int rc;

    /* attention: x -> ln1 -> qkv -> attention -> c_proj */
    layernorm_forward(a->ln1, a->ln1_mean, a->ln1_rstd, x, p->ln1w->data, data_of(p->ln1b), N, C, eps);
    if ((rc = model_matmul_forward(m, a->qkv, QKV, a->ln1, C, p->qkvw, 1, data_of(p->qkvb), N, C, QKV, err)))
        return rc;
    if ((rc = model_proj_forward(m, PR_SITE_QKV, l, a->ln1, C, a->qkv, QKV, QKV, err)) ||
        (rc = model_proj_forward(m, PR_SITE_Q, l, a->ln1, C, a->qkv, Q, QKV, err)) ||
        (rc = model_proj_forward(m, PR_SITE_K, l, a->ln1, C, a->qkv + Q, KV, QKV, err)) ||
        (rc = model_proj_forward(m, PR_SITE_V, l, a->ln1, C, a->qkv + Q + KV, KV, QKV, err)))
        return rc;
    const float *k, *v;
    int ldk, ldv;
    if ((rc = model_stream_forward(m, PR_SITE_ATTN_K, l, a->qkv + Q, QKV, a->katt, KV, &k, &ldk, err)) ||
        (rc = model_stream_forward(m, PR_SITE_ATTN_V, l, a->qkv + Q + KV, QKV, a->vatt, KV, &v, &ldv, err)) ||
        (rc = model_prefix_forward(m, l, err)))
        return rc;
    attention_forward(a->atty, a->att, a->qkv, QKV, k, ldk, v, ldv, f->pk, f->pv, f->P, B, T, H, Hkv, hd);
    if ((rc = model_matmul_forward(m, a->attproj, C, a->atty, Q, p->attprojw, 1, data_of(p->attprojb), N, Q, C, err)))
        return rc;
    if ((rc = model_proj_forward(m, PR_SITE_O, l, a->atty, Q, a->attproj, C, C, err)))
        return rc;
    const float *aout;
    if ((rc = model_sublayer_forward(m, PR_SITE_ATTN_OUT, l, a->ln1, a->attproj, a->aout, C, &aout, err)))
        return rc;
    residual_forward(a->resid2, x, aout, (size_t)N * C);

    /* FFN: resid2 -> ln2 -> c_fc -> GELU -> c_proj */
    layernorm_forward(a->ln2, a->ln2_mean, a->ln2_rstd, a->resid2, p->ln2w->data, data_of(p->ln2b), N, C, eps);
    if ((rc = model_matmul_forward(m, a->fch, F, a->ln2, C, p->fcw, 1, data_of(p->fcb), N, C, F, err)))
        return rc;
    if ((rc = model_proj_forward(m, PR_SITE_FFN_UP, l, a->ln2, C, a->fch, F, F, err)))
        return rc;
    gelu_forward(a->fch_gelu, a->fch, (size_t)N * F);
    const float *act;
    if ((rc = model_stream_forward(m, PR_SITE_FFN_ACT, l, a->fch_gelu, F, a->act, F, &act, NULL, err)))
        return rc;
    if ((rc = model_matmul_forward(m, a->fcproj, C, act, F, p->fcprojw, 1, data_of(p->fcprojb), N, F, C, err)))
        return rc;
    if ((rc = model_proj_forward(m, PR_SITE_FFN_DOWN, l, act, F, a->fcproj, C, C, err)))
        return rc;
    const float *fout;
    if ((rc = model_sublayer_forward(m, PR_SITE_FFN_OUT, l, a->ln2, a->fcproj, a->fout, C, &fout, err)))
        return rc;
    residual_forward(a->resid3, a->resid2, fout, (size_t)N * C);
    *out = a->resid3;
    return PR_OK;
}

/* ---- backward ------------------------------------------------------------ */

/* On entry m->dres holds dLoss/d(block l output); on return dLoss/dx, x
 * the block input.  Mirrors block_forward line by line. */
static int block_backward(pr_model *m, int l, const float *x, pr_error *err)
{
    const pr_model_config *c = &m->cfg;
    gpt2 *g = m->fam;
    const layer_params *p = &g->lp[l];
    layer_acts *a = &g->la[l];
    const layer_frame *f = &m->lf[l];
    int B = m->B, T = m->T, N = B * T, C = c->d_model, F = c->d_ff;
    int H = c->n_heads, Hkv = c->n_kv_heads, hd = c->d_head;
    int Q = H * hd, KV = Hkv * hd, QKV = Q + 2 * KV;
    size_t NC = (size_t)N * C, NF = (size_t)N * F;
    int rc;

    /* resid3 = resid2 + fout: dres stays as d resid2's residual path */
    const float *act = model_has_hooks(m, PR_SITE_FFN_ACT, l) ? a->act : a->fch_gelu;
    /* dln gathers d ln2: from ffn_out's hooks (their input) and from ffn.up */
    memset(m->dln, 0, NC * sizeof(float));
    if (model_has_hooks(m, PR_SITE_FFN_OUT, l)) {
        memcpy(m->dstream, m->dres, NC * sizeof(float));
        if ((rc = model_sublayer_backward(m, PR_SITE_FFN_OUT, l, a->ln2, m->dln, a->fout, m->dstream, g->dfcproj, C, err)))
            return rc;
    } else {
        memcpy(g->dfcproj, m->dres, NC * sizeof(float));
    }
    /* ffn.down: fcproj = act . W + b */
    float *dact = g->dffa;
    memset(dact, 0, NF * sizeof(float));
    if ((rc = model_proj_backward(m, PR_SITE_FFN_DOWN, l, act, F, dact, a->fcproj, C, C, g->dfcproj, err)))
        return rc;
    if ((rc = model_matmul_backward(m, dact, F, grad_of(p->fcprojw), grad_of(p->fcprojb), g->dfcproj,
                                        C, act, F, p->fcprojw, 1, N, F, C, err)))
        return rc;
    /* ffn.act */
    float *dgelu_out = dact, *dfch = g->dffb;
    if (model_has_hooks(m, PR_SITE_FFN_ACT, l)) {
        memset(g->dffb, 0, NF * sizeof(float));
        if ((rc = model_stream_backward(m, PR_SITE_FFN_ACT, l, a->fch_gelu, F, g->dffb, a->act, dact, F, err)))
            return rc;
        dgelu_out = g->dffb;
        dfch = g->dffa;
    }
    memset(dfch, 0, NF * sizeof(float));
    gelu_backward(dfch, a->fch, dgelu_out, NF);
    /* ffn.up: fch = ln2 . W + b */
    if ((rc = model_proj_backward(m, PR_SITE_FFN_UP, l, a->ln2, C, m->dln, a->fch, F, F, dfch, err)))
        return rc;
    if ((rc = model_matmul_backward(m, m->dln, C, grad_of(p->fcw), grad_of(p->fcb), dfch,
                                        F, a->ln2, C, p->fcw, 1, N, C, F, err)))
        return rc;
    layernorm_backward(m->dres, grad_of(p->ln2w), grad_of(p->ln2b), m->dln, a->resid2, p->ln2w->data,
                       a->ln2_mean, a->ln2_rstd, N, C);

    /* resid2 = x + aout; dln now gathers d ln1: from attn_out's hooks (their
     * input) and from q, k, v, qkv */
    memset(m->dln, 0, NC * sizeof(float));
    if (model_has_hooks(m, PR_SITE_ATTN_OUT, l)) {
        memcpy(m->dstream, m->dres, NC * sizeof(float));
        if ((rc = model_sublayer_backward(m, PR_SITE_ATTN_OUT, l, a->ln1, m->dln, a->aout, m->dstream, g->dattproj, C,
                                    err)))
            return rc;
    } else {
        memcpy(g->dattproj, m->dres, NC * sizeof(float));
    }
    /* o: attproj = atty . W + b */
    memset(g->datty, 0, (size_t)N * Q * sizeof(float));
    if ((rc = model_proj_backward(m, PR_SITE_O, l, a->atty, Q, g->datty, a->attproj, C, C, g->dattproj, err)))
        return rc;
    if ((rc = model_matmul_backward(m, g->datty, Q, grad_of(p->attprojw), grad_of(p->attprojb), g->dattproj,
                                        C, a->atty, Q, p->attprojw, 1, N, Q, C, err)))
        return rc;
    /* attention */
    int hk = model_has_hooks(m, PR_SITE_ATTN_K, l), hv = model_has_hooks(m, PR_SITE_ATTN_V, l);
    const float *k = hk ? a->katt : a->qkv + Q, *v = hv ? a->vatt : a->qkv + Q + KV;
    int ldk = hk ? KV : QKV, ldv = hv ? KV : QKV;
    float *dk = hk ? g->dkatt : g->dqkv + Q, *dv = hv ? g->dvatt : g->dqkv + Q + KV;
    int P = f->P;
    memset(g->dqkv, 0, (size_t)N * QKV * sizeof(float));
    if (hk) memset(g->dkatt, 0, (size_t)N * KV * sizeof(float));
    if (hv) memset(g->dvatt, 0, (size_t)N * KV * sizeof(float));
    if (P) {
        memset(m->dpk, 0, (size_t)P * KV * sizeof(float));
        memset(m->dpv, 0, (size_t)P * KV * sizeof(float));
    }
    attention_backward(g->dqkv, dk, dv, m->dpk, m->dpv, g->datty, a->att, a->qkv, QKV, k, ldk, v, ldv,
                       f->pk, f->pv, P, B, T, H, Hkv, hd, g->att_scratch);
    if ((rc = model_prefix_backward(m, l, err)))
        return rc;
    if (hv && (rc = model_stream_backward(m, PR_SITE_ATTN_V, l, a->qkv + Q + KV, QKV, g->dqkv + Q + KV,
                                    a->vatt, g->dvatt, KV, err)))
        return rc;
    if (hk && (rc = model_stream_backward(m, PR_SITE_ATTN_K, l, a->qkv + Q, QKV, g->dqkv + Q,
                                    a->katt, g->dkatt, KV, err)))
        return rc;
    /* q, k, v, qkv: qkv = ln1 . W + b */
    if ((rc = model_proj_backward(m, PR_SITE_V, l, a->ln1, C, m->dln, a->qkv + Q + KV, KV, QKV, g->dqkv + Q + KV, err)) ||
        (rc = model_proj_backward(m, PR_SITE_K, l, a->ln1, C, m->dln, a->qkv + Q, KV, QKV, g->dqkv + Q, err)) ||
        (rc = model_proj_backward(m, PR_SITE_Q, l, a->ln1, C, m->dln, a->qkv, Q, QKV, g->dqkv, err)) ||
        (rc = model_proj_backward(m, PR_SITE_QKV, l, a->ln1, C, m->dln, a->qkv, QKV, QKV, g->dqkv, err)))
        return rc;
    /* the lowest block differentiated: no input gradient unless ln1 trains */
    int need_dx = !m->bwd_no_input_grad || grad_of(p->ln1w) || grad_of(p->ln1b);
    if ((rc = model_matmul_backward(m, need_dx ? m->dln : NULL, C, grad_of(p->qkvw), grad_of(p->qkvb), g->dqkv,
                                    QKV, a->ln1, C, p->qkvw, 1, N, C, QKV, err)))
        return rc;
    if (need_dx)
        layernorm_backward(m->dres, grad_of(p->ln1w), grad_of(p->ln1b), m->dln, x, p->ln1w->data, a->ln1_mean,
                           a->ln1_rstd, N, C);
    return PR_OK;
}


const family_ops family_gpt2 = {
    .name = "GPT-2",
    .layer_prefix = "h.",
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
};
