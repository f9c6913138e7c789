/* peftref core: the components of the LLaMA family (Touvron et al. 2023,
 * arXiv 2302.13971) as forward/backward pairs: RMSNorm, rotary position
 * embeddings and the SwiGLU gate.  The behaviour matched is Hugging Face
 * transformers' modeling_llama.py (LlamaRMSNorm, LlamaRotaryEmbedding with
 * apply_rotary_pos_emb, LlamaMLP's act_fn(gate) * up).
 *
 * Same conventions as kernels.h: raw float arrays with explicit dimensions,
 * shapes in the comments; backward functions ACCUMULATE (+=) into every
 * gradient they are given, a NULL gradient skips that work; nothing
 * allocates. */
#ifndef PEFTREF_CORE_LLAMA_KERNELS_H
#define PEFTREF_CORE_LLAMA_KERNELS_H

#include <stddef.h>

/* RMSNorm (Zhang & Sennrich 2019) as LlamaRMSNorm, in f32:
 *   rstd[i] = 1/sqrt(mean_j x[i,j]^2 + eps),  out (N,C) = (x * rstd) * w.
 * The mean of squares is accumulated in double.  Rows contiguous; C >= 1
 * (qwen3's per-head q/k norm calls this with N*H rows of C = hd).
 * out may not alias x.  rstd (N) is saved for backward; it may be NULL when
 * no backward follows. */
void rmsnorm_forward(float *out, float *rstd, const float *x, const float *w, int N, int C, float eps);
/* With xhat = x * rstd and g = dout * w:
 *   dx (N,C) += rstd (g - xhat mean_j(g xhat)),  dw (C) += sum_i dout xhat.
 * Either may be NULL. */
void rmsnorm_backward(float *dx, float *dw, const float *dout, const float *x, const float *w,
                      const float *rstd, int N, int C);

/* Rotary position embeddings (Su et al. 2021, arXiv 2104.09864) in Hugging
 * Face's layout: dimension i of a head is paired with i + hd/2 (rotate_half),
 * not with its neighbour as in the paper. */
enum { ROPE_SCALING_NONE = 0, ROPE_SCALING_LINEAR = 1, ROPE_SCALING_LLAMA3 = 2 };
typedef struct rope_params {
    double theta;          /* rope_theta */
    int scaling;           /* ROPE_SCALING_* */
    double factor;         /* linear and llama3 */
    double low_freq_factor, high_freq_factor;  /* llama3 */
    int original_max_pos;  /* llama3: original_max_position_embeddings */
} rope_params;
/* inv_freq (hd/2), hd even: inv_freq[i] = theta^(-2i/hd), in double, then
 * scaled as transformers' rope init functions do:
 *   linear: inv_freq / factor;
 *   llama3 (Llama 3.1): with wavelen = 2 pi / inv_freq, L = original_max_pos,
 *     wavelen < L / high_freq_factor: kept;
 *     wavelen > L / low_freq_factor:  inv_freq / factor;
 *     otherwise, s = (L / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor):
 *       (1 - s) inv_freq / factor + s inv_freq.
 *   llama3 needs high_freq_factor > low_freq_factor (transformers' validation
 *   warns otherwise).  Any other scaling value is taken as NONE; the caller
 *   validates the configuration. */
void rope_inv_freq(double *inv_freq, int hd, const rope_params *p);
/* cos, sin (n_pos, hd/2): angle of row t = (pos0 + t) * inv_freq[i],
 * computed in double, stored f32. */
void rope_tables(float *cos, float *sin, const double *inv_freq, int hd, int pos0, int n_pos);
/* x (B,T,nh*hd) with row stride ldx -> out (row stride ldo); out may equal x
 * (in place).  Row (b,t) uses table row t.  Per head, for i < hd/2 with
 * x1 = x[i], x2 = x[i + hd/2]:
 *   out[i] = x1*cos - x2*sin,  out[i + hd/2] = x2*cos + x1*sin. */
void rope_forward(float *out, int ldo, const float *x, int ldx, const float *cos, const float *sin,
                  int B, int T, int nh, int hd);
/* dx (row stride lddx) += R^T dout (row stride lddo), i.e. per pair
 *   dx1 += d1*cos + d2*sin,  dx2 += d2*cos - d1*sin.
 * dx may NOT alias dout. */
void rope_backward(float *dx, int lddx, const float *dout, int lddo, const float *cos, const float *sin,
                   int B, int T, int nh, int hd);

/* SwiGLU (Shazeer 2020, arXiv 2002.05202): out (n) = silu(g) * u,
 * silu(z) = z / (1 + exp(-z)) = z sigmoid(z), the logistic evaluated from
 * exp(-|z|) so that no |z| overflows.  out may alias g or u. */
void swiglu_forward(float *out, const float *g, const float *u, size_t n);
/* dg += dout * u * silu'(g), silu'(z) = s (1 + z (1 - s)) with s = sigmoid(z);
 * du += dout * silu(g); either may be NULL. */
void swiglu_backward(float *dg, float *du, const float *dout, const float *g, const float *u, size_t n);

#endif
