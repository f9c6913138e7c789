/* peftref core: bf16 storage of frozen base weights and the product
 * dispatch keyed on it.
 *
 * pr_model_set_precision(m, PR_PRECISION_BF16) gives every frozen matrix
 * that feeds a product (the family's projection weights of every layer,
 * and the LM head, which is the token table when tied) a bf16 copy owned
 * by the model (m->lowp, one slot per base tensor), and releases the f32
 * pages: the tensor keeps its name, shape and place in the table, its
 * data becomes NULL.  From then on:
 *   - model_matmul_forward/backward run a tensor with a bf16 copy on
 *     oneDNN (activations cast to bf16, f32 accumulation) and every other
 *     tensor on OpenBLAS exactly as before;
 *   - views of a site's weight carry the bf16 copy (dtype BF16), so a
 *     module's ctx->base_weight is the bf16 storage and
 *     host->base_weight_f32 converts from it;
 *   - f32 readers (saving, the fingerprint, a token row for prompt
 *     tuning) go through model_tensor_f32 / the samples kept here.
 * Trainable tensors, biases, norms and position tables stay f32, and so
 * does everything a module owns.  With precision f32 (the default) none
 * of this runs and every product is the sgemm it always was. */
#include "config.h"

#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "bf16.h"
#include "family.h"
#include "kernels.h"
#include "peftref/module.h"

struct model_lowp {
    uint16_t **w;          /* (n_base) bf16 copy of base tensor i, or NULL */
    float **fp;            /* (n_base) the f32 values at the fingerprint's sample positions */
    int n;
    size_t bytes;          /* bf16 bytes held */
};

int pr_precision_parse(const char *s)
{
    if (!s) return -1;
    if (strcmp(s, "f32") == 0) return PR_PRECISION_F32;
    if (strcmp(s, "bf16") == 0) return PR_PRECISION_BF16;
    return -1;
}

const char *pr_precision_name(int p)
{
    return p == PR_PRECISION_BF16 ? "bf16" : p == PR_PRECISION_F32 ? "f32" : "?";
}

int pr_precision_available(int p, pr_error *err)
{
    if (p == PR_PRECISION_F32)
        return PR_OK;
    if (p != PR_PRECISION_BF16)
        return pr_errorf(err, PR_ERR_INVALID, "precision %d: expected f32 or bf16", p);
    if (!bf16_available())
        return pr_errorf(err, PR_ERR_UNSUPPORTED,
                         "precision bf16 needs oneDNN, and this peftref was built without it (configure found no "
                         "oneapi/dnnl/dnnl.h or libdnnl): install libdnnl-dev and rebuild, or use precision f32");
    return PR_OK;
}

int pr_model_get_precision(const pr_model *m)
{
    return m && m->lowp ? PR_PRECISION_BF16 : PR_PRECISION_F32;
}

static int base_index(const pr_model *m, const pr_tensor_info *t)
{
    if (!m || !t || t < m->tensors || t >= m->tensors + m->n_base)
        return -1;
    return (int)(t - m->tensors);
}

const uint16_t *model_tensor_bf16(const pr_model *m, const pr_tensor_info *t)
{
    int i = m && m->lowp ? base_index(m, t) : -1;
    return i >= 0 ? m->lowp->w[i] : NULL;
}

int pr_model_tensor_is_bf16(const pr_model *m, const pr_tensor_info *t)
{
    return model_tensor_bf16(m, t) != NULL;
}

size_t pr_model_bf16_bytes(const pr_model *m)
{
    return m && m->lowp ? m->lowp->bytes : 0;
}

const float *model_tensor_fp_samples(const pr_model *m, const pr_tensor_info *t)
{
    int i = m && m->lowp ? base_index(m, t) : -1;
    return i >= 0 ? m->lowp->fp[i] : NULL;
}

int64_t model_fp_sample_count(int64_t numel)
{
    return numel <= MODEL_FP_SAMPLES ? numel : MODEL_FP_SAMPLES;
}

int64_t model_fp_sample_at(int64_t numel, int64_t k)
{
    return numel <= MODEL_FP_SAMPLES ? k : (int64_t)((__int128)k * numel / MODEL_FP_SAMPLES);
}

int pr_model_tensor_f32(const pr_model *m, const pr_tensor_info *t, float *dst, pr_error *err)
{
    if (!m || !t || !dst)
        return pr_errorf(err, PR_ERR_INVALID, "tensor_f32: NULL model, tensor or output");
    if (t->data) {
        memcpy(dst, t->data, (size_t)t->numel * sizeof(float));
        return PR_OK;
    }
    const uint16_t *w = model_tensor_bf16(m, t);
    if (!w)
        return pr_errorf(err, PR_ERR_INVALID, "tensor '%s' has no data", t->name);
    bf16_to_f32(dst, w, (size_t)t->numel);
    return PR_OK;
}

int model_tensor_row_f32(const pr_model *m, const pr_tensor_info *t, int64_t row, float *dst)
{
    if (!t || t->ndim != 2 || row < 0 || row >= t->shape[0])
        return PR_ERR_INVALID;
    size_t cols = (size_t)t->shape[1];
    if (t->data) {
        memcpy(dst, t->data + (size_t)row * cols, cols * sizeof(float));
        return PR_OK;
    }
    const uint16_t *w = model_tensor_bf16(m, t);
    if (!w)
        return PR_ERR_INVALID;
    for (size_t j = 0; j < cols; j++)
        dst[j] = bf16_to_f32_1(w[(size_t)row * cols + j]);
    return PR_OK;
}

void model_lowp_free(pr_model *m)
{
    if (!m || !m->lowp)
        return;
    for (int i = 0; i < m->lowp->n; i++) {
        free(m->lowp->w[i]);
        free(m->lowp->fp[i]);
    }
    free(m->lowp->w);
    free(m->lowp->fp);
    free(m->lowp);
    m->lowp = NULL;
}

/* A frozen matrix some product reads: the family's layer weights and the head. */
static int bf16_candidate(const pr_model *m, const pr_tensor_info *t)
{
    if (t->ndim != 2 || t->trainable || !t->data || t->numel == 0)
        return 0;
    return (t->kind == PR_TENSOR_WEIGHT && t->layer >= 0) || t == m->head;
}

/* Give the pages wholly inside [p, p + bytes) back to the system: they
 * belong to the anonymous storage block or to a private file mapping
 * (model.c, hf_load.c), and nothing reads them again. */
static void release_pages(void *p, size_t bytes)
{
    long pg = sysconf(_SC_PAGESIZE);
    uintptr_t a = (uintptr_t)p, e = a + bytes;
    uintptr_t a0 = (a + (uintptr_t)pg - 1) & ~((uintptr_t)pg - 1), e0 = e & ~((uintptr_t)pg - 1);
    if (e0 > a0)
        madvise((void *)a0, e0 - a0, MADV_DONTNEED);
}

/* Is p inside memory whose pages we may release? */
static int releasable(const pr_model *m, const float *p)
{
    if (m->storage && p >= m->storage && p < m->storage + m->storage_floats)
        return 1;
    for (int i = 0; i < m->n_maps; i++) {
        const char *a = m->maps[i].addr;
        if ((const char *)p >= a && (const char *)p < a + m->maps[i].len)
            return 1;
    }
    return 0;
}

int pr_model_set_precision(pr_model *m, int precision, pr_error *err)
{
    if (!m)
        return pr_errorf(err, PR_ERR_INVALID, "set_precision: NULL model");
    int rc = pr_precision_available(precision, err);
    if (rc)
        return rc;
    if (precision == pr_model_get_precision(m))
        return PR_OK;
    if (precision == PR_PRECISION_F32)
        return pr_errorf(err, PR_ERR_UNSUPPORTED,
                         "set_precision: the model's frozen weights are stored in bf16 and their f32 values are "
                         "gone; load the model again for precision f32");
    const model_modules *mm = &m->modules;
    for (int i = 0; i < mm->n; i++)
        if (module_is_merged(mm->mods[i]))
            return pr_errorf(err, PR_ERR_INVALID,
                             "set_precision bf16: module '%s' is merged into the f32 weights; unmerge it first",
                             pr_module_name(mm->mods[i]));
    model_lowp *lp = calloc(1, sizeof *lp);
    if (!lp || !(lp->w = calloc((size_t)m->n_base, sizeof *lp->w)) ||
        !(lp->fp = calloc((size_t)m->n_base, sizeof *lp->fp))) {
        if (lp) free(lp->w);
        free(lp);
        return pr_errorf(err, PR_ERR_NOMEM, "set_precision bf16: out of memory");
    }
    lp->n = m->n_base;
    /* One tensor at a time: its bf16 copy, then its f32 pages released, so
     * the peak is the f32 model plus one tensor's copy.  A failure part way
     * leaves a consistent model: what was converted runs in bf16, the rest
     * in f32. */
    m->lowp = lp;
    for (int i = 0; i < m->n_base; i++) {
        pr_tensor_info *t = &m->tensors[i];
        if (!bf16_candidate(m, t))
            continue;
        int64_t ns = model_fp_sample_count(t->numel);
        void *w = NULL;
        if (posix_memalign(&w, 64, (size_t)t->numel * sizeof(uint16_t)) != 0 ||
            !(lp->fp[i] = malloc((size_t)ns * sizeof(float)))) {
            free(w);
            rc = pr_errorf(err, PR_ERR_NOMEM, "set_precision bf16: out of memory for tensor '%s' (%lld values)",
                           t->name, (long long)t->numel);
            break;
        }
        bf16_from_f32(w, t->data, (size_t)t->numel);
        for (int64_t k = 0; k < ns; k++)
            lp->fp[i][k] = t->data[model_fp_sample_at(t->numel, k)];
        lp->bytes += (size_t)t->numel * sizeof(uint16_t);
        if (releasable(m, t->data))
            release_pages(t->data, (size_t)t->numel * sizeof(float));
        t->data = NULL;
        lp->w[i] = w;
    }
    if (rc && lp->bytes == 0)
        model_lowp_free(m);
    m->have_fwd = 0;
    /* the modules' views of the frozen weights now point at bf16 storage */
    for (int i = 0; i < mm->n; i++)
        module_refresh_base_views(mm->mods[i]);
    return rc;
}

/* ---- the dispatch ---------------------------------------------------------- */

/* W element (k, n) of the product inp . W at w[k*s0 + n*s1]. */
static void weight_strides(int w_in_out, int C, int OC, int64_t *s0, int64_t *s1)
{
    if (w_in_out) { /* [C, OC] */
        *s0 = OC;
        *s1 = 1;
    } else {        /* [OC, C] */
        *s0 = 1;
        *s1 = C;
    }
}

int model_matmul_forward(pr_model *m, float *out, int ldo, const float *inp, int ldi, const pr_tensor_info *w,
                         int w_in_out, const float *b, int N, int C, int OC, pr_error *err)
{
    const uint16_t *w16 = model_tensor_bf16(m, w);
    if (!w16) {
        matmul_forward(out, ldo, inp, ldi, w->data, w_in_out, b, N, C, OC);
        return PR_OK;
    }
    int64_t s0, s1;
    weight_strides(w_in_out, C, OC, &s0, &s1);
    pr_error e = { 0 };
    int rc = bf16_matmul(out, ldo, inp, ldi, w16, s0, s1, b, N, C, OC, 0, &e);
    return rc ? pr_errorf(err, (pr_status)rc, "tensor '%s': %s", w->name, e.msg) : PR_OK;
}

int model_matmul_backward(pr_model *m, float *dinp, int lddi, float *dw, float *db, const float *dout, int lddo,
                          const float *inp, int ldi, const pr_tensor_info *w, int w_in_out, int N, int C, int OC,
                          pr_error *err)
{
    const uint16_t *w16 = model_tensor_bf16(m, w);
    if (!w16) {
        matmul_backward(dinp, lddi, dw, db, dout, lddo, inp, ldi, w->data, w_in_out, N, C, OC);
        return PR_OK;
    }
    if (dw)
        return pr_errorf(err, PR_ERR_INVALID, "tensor '%s' is stored in bf16 and cannot have a gradient", w->name);
    if (db) /* the bias gradient needs no weight */
        matmul_backward(NULL, 0, NULL, db, dout, lddo, inp, ldi, NULL, w_in_out, N, C, OC);
    if (!dinp || C <= 0)
        return PR_OK;
    /* dinp (N,C) += dout (N,OC) . W^T: W^T element (o, c) is W(c, o) */
    int64_t s0, s1;
    weight_strides(w_in_out, C, OC, &s1, &s0);
    pr_error e = { 0 };
    int rc = bf16_matmul(dinp, lddi, dout, lddo, w16, s0, s1, NULL, N, OC, C, 1, &e);
    return rc ? pr_errorf(err, (pr_status)rc, "tensor '%s' (backward): %s", w->name, e.msg) : PR_OK;
}

void model_encoder_forward(const pr_model *m, float *out, const int *tokens, const float *wpe, int B, int T, int C)
{
    const uint16_t *w16 = model_tensor_bf16(m, m->wte);
    if (!w16) {
        encoder_forward(out, tokens, m->wte->data, wpe, B, T, C);
        return;
    }
    /* out (B,T,C) = f32(wte16[tokens]) + wpe[t], as encoder_forward sums */
#pragma omp parallel for schedule(static) if ((long)B * T * C >= 32768)
    for (int i = 0; i < B * T; i++) {
        const uint16_t *e = w16 + (size_t)tokens[i] * C;
        const float *p = wpe ? wpe + (size_t)(i % T) * C : NULL;
        float *o = out + (size_t)i * C;
        for (int c = 0; c < C; c++)
            o[c] = p ? bf16_to_f32_1(e[c]) + p[c] : bf16_to_f32_1(e[c]);
    }
}
