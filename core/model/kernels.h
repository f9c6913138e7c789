/* peftref core: the standard components as forward/backward pairs.
 *
 * Raw float arrays with explicit dimensions; shapes in the comments.
 * Backward functions ACCUMULATE (+=) into every gradient they are given;
 * a NULL gradient pointer means "not needed" (frozen weight, or an input
 * whose gradient nobody uses) and skips that work.  Nothing allocates
 * except where a scratch argument says so.  N = B*T rows. */
#ifndef PEFTREF_CORE_KERNELS_H
#define PEFTREF_CORE_KERNELS_H

#include <stddef.h>

/* out (B,T,C) = wte[tokens] + wpe[pos0 + t]; wpe may be NULL (RoPE models). */
void encoder_forward(float *out, const int *tokens, const float *wte, const float *wpe,
                     int B, int T, int C);
/* dwte/dwpe (may be NULL) += scatter of dout (B,T,C). */
void encoder_backward(float *dwte, float *dwpe, const float *dout, const int *tokens,
                      int B, int T, int C);

/* LayerNorm over the last dim: inp (N,C) -> out (N,C); mean, rstd (N) saved.
 * b may be NULL (no bias). */
void layernorm_forward(float *out, float *mean, float *rstd, const float *inp,
                       const float *w, const float *b, int N, int C, float eps);
/* dinp (N,C), dw (C), db (C) accumulate; any may be NULL. */
void layernorm_backward(float *dinp, float *dw, float *db, const float *dout,
                        const float *inp, const float *w, const float *mean,
                        const float *rstd, int N, int C);

/* Linear layer through BLAS sgemm.
 * out (N,OC) (row stride ldo) = inp (N,C) (row stride ldi) . W + b
 * W is stored [C, OC] when w_in_out (GPT-2 Conv1D) or [OC, C] otherwise
 * (nn.Linear).  b (OC) may be NULL.  Overwrites out. */
void matmul_forward(float *out, int ldo, const float *inp, int ldi, const float *w,
                    int w_in_out, const float *b, int N, int C, int OC);
/* dinp (N,C) += dout . W^T ; dw += inp^T . dout (in W's layout); db += sum dout.
 * Any of dinp, dw, db may be NULL. */
void matmul_backward(float *dinp, int lddi, float *dw, float *db, const float *dout, int lddo,
                     const float *inp, int ldi, const float *w, int w_in_out,
                     int N, int C, int OC);

/* GELU, tanh approximation (GPT-2): inp (N) -> out (N). */
void gelu_forward(float *out, const float *inp, size_t n);
/* dinp (N) += gelu'(inp) * dout. */
void gelu_backward(float *dinp, const float *inp, const float *dout, size_t n);

/* out (N) = a + b (out may alias a or b). */
void residual_forward(float *out, const float *a, const float *b, size_t n);
/* da += dout; db += dout. */
void residual_backward(float *da, float *db, const float *dout, size_t n);

/* Causal multi-head attention with grouped-query heads.
 *   q (B,T,H*hd) row stride ldq; k, v (B,T,Hkv*hd) strides ldk, ldv
 *   (q, k, v may be column slices of one fused QKV buffer).
 *   Optional prefix keys/values pk, pv (Hkv,P,hd) are seen by every query
 *   before the causal keys (prefix tuning); P = 0 and NULL for none.
 *   out (B,T,H*hd) contiguous.
 *   att (B,H,T,P+T) holds the softmax probabilities, saved for backward.
 *   Query head h reads key/value head h / (H/Hkv).  Scale 1/sqrt(hd).
 *   Cost O(T^2 hd) per head, through BLAS. */
void attention_forward(float *out, float *att,
                       const float *q, int ldq, const float *k, int ldk,
                       const float *v, int ldv, const float *pk, const float *pv, int P,
                       int B, int T, int H, int Hkv, int hd);
/* dq, dk, dv accumulate with the same strides as q, k, v; dpk, dpv
 * (Hkv,P,hd) accumulate; any may be NULL.  scratch needs T*(P+T) floats. */
void attention_backward(float *dq, float *dk, float *dv, float *dpk, float *dpv,
                        const float *dout, const float *att,
                        const float *q, int ldq, const float *k, int ldk,
                        const float *v, int ldv, const float *pk, const float *pv, int P,
                        int B, int T, int H, int Hkv, int hd, float *scratch);
/* on != 0: attention_forward/backward compute every query's scores against
 * all T keys and zero the masked ones (the full score matrix) instead of
 * only the keys each block of queries sees; the default comes from
 * PEFTREF_ATTN_FULL at the first call.  For measuring and tests. */
void attention_set_full_scores(int on);

/* Softmax cross-entropy over logits (N,V).  targets[i] < 0 is not scored.
 * losses (N) gets per-row loss (0 for unscored); returns the number of
 * scored rows.  probs (N,V) must not alias logits. */
long crossentropy_forward(float *losses, float *probs, const float *logits,
                          const int *targets, int N, int V);
/* dlogits (N,V) += (probs - onehot) * scale for scored rows.
 * With mean loss over S scored rows, scale = 1/S. */
void crossentropy_backward(float *dlogits, const float *probs, const int *targets,
                           int N, int V, float scale);
/* g (N,V) holds probs on entry and dlogits on return: (probs - onehot) *
 * scale for scored rows, 0 for the others, bit for bit what
 * crossentropy_backward adds to a zeroed dlogits. */
void crossentropy_backward_inplace(float *g, const int *targets, int N, int V, float scale);

#endif
