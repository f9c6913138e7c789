/* peftref core: merging a module into the frozen weights it adapts (weight delta
 * plus bias delta), and unmerging it. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "module_internal.h"

/* ---- merge ---------------------------------------------------------------------------------------- */

/* The weight view bw is the weight as its family stores it: [d_in, d_out]
 * (PR_WEIGHT_IN_OUT, GPT-2's Conv1D) or [d_out, d_in] (OUT_IN, nn.Linear);
 * merge() always returns its delta as [d_in, d_out].  The bias, when there
 * is one, has d_out entries. */
static int out_in(const insertion *in)
{
    return in->bw_layout == PR_WEIGHT_OUT_IN;
}

static void weight_dims(const insertion *in, int *din, int *dout)
{
    *din = (int)in->bw.shape[out_in(in) ? 1 : 0];
    *dout = (int)in->bw.shape[out_in(in) ? 0 : 1];
}

static void restore_insertion(insertion *in)
{
    if (!in->orig_w)
        return;
    int rows = (int)in->bw.shape[0], cols = (int)in->bw.shape[1], din, dout;
    weight_dims(in, &din, &dout);
    mod_copy_rows(in->bw.data, (int)in->bw.stride[0], in->orig_w, cols, rows, cols);
    if (in->orig_b)
        memcpy(in->bb.data, in->orig_b, (size_t)dout * sizeof(float));
    free(in->orig_w);
    free(in->orig_b);
    in->orig_w = in->orig_b = NULL;
}

int pr_module_merge(pr_module *mod, pr_error *err)
{
    if (!mod)
        return pr_errorf(err, PR_ERR_INVALID, "merge: NULL module");
    if (!mod->t.merge)
        return pr_errorf(err, PR_ERR_UNSUPPORTED, "module '%s' (technique %s) cannot be merged: the technique has no merge()",
                         mod_name(mod), mod->t.name);
    if (mod->merged)
        return pr_errorf(err, PR_ERR_INVALID, "module '%s' is already merged", mod_name(mod));
    if (mod->gated && !mod_form(mod)->merges_gated)
        return pr_errorf(err, PR_ERR_UNSUPPORTED, "module '%s' (technique %s) cannot be merged: a gated rescaling "
                         "1 + s*(h - 1) is not what merge() folds", mod_name(mod), mod->t.name);
    if (mod->composed_by)
        return pr_errorf(err, PR_ERR_UNSUPPORTED, "module '%s' cannot be merged: composite module '%s' combines it",
                         mod_name(mod), mod_name(mod->composed_by));
    for (int k = 0; k < mod->n_ins; k++)
        if (!mod->ins[k].has_bw)
            return pr_errorf(err, PR_ERR_UNSUPPORTED,
                             "module '%s' (technique %s) cannot be merged at %s: the site has no frozen weight to fold into",
                             mod_name(mod), mod->t.name, mod->ins[k].where);
    for (int k = 0; k < mod->n_ins; k++)
        if (mod->ins[k].bw.dtype == PR_DTYPE_BF16)
            return pr_errorf(err, PR_ERR_UNSUPPORTED,
                             "module '%s' cannot be merged at %s: the model stores that weight in bf16 (precision "
                             "bf16), and a merge writes f32 weights; merge into a model loaded in f32 (peftref merge)",
                             mod_name(mod), mod->ins[k].where);
    size_t maxn = 0, maxb = 0;
    for (int k = 0; k < mod->n_ins; k++) {
        int din, dout;
        weight_dims(&mod->ins[k], &din, &dout);
        size_t n = (size_t)din * (size_t)dout;
        maxn = n > maxn ? n : maxn;
        maxb = (size_t)dout > maxb ? (size_t)dout : maxb;
    }
    /* the weight delta, then the bias delta */
    float *delta = mod_alloc_floats(maxn + maxb);
    if (!delta)
        return pr_errorf(err, PR_ERR_NOMEM, "module '%s': out of memory for merging", mod_name(mod));
    float *bdelta = delta + maxn;
    int rc = PR_OK, k;
    for (k = 0; k < mod->n_ins; k++) {
        insertion *in = &mod->ins[k];
        int din, dout, ld = (int)in->bw.stride[0];
        const int rows = (int)in->bw.shape[0], cols = (int)in->bw.shape[1];
        weight_dims(in, &din, &dout);
        in->orig_w = mod_alloc_floats((size_t)din * dout);
        in->orig_b = in->has_bb ? mod_alloc_floats((size_t)dout) : NULL;
        if (!in->orig_w || (in->has_bb && !in->orig_b)) {
            rc = pr_errorf(err, PR_ERR_NOMEM, "module '%s': out of memory for merging", mod_name(mod));
            free(in->orig_w);
            free(in->orig_b);
            in->orig_w = in->orig_b = NULL;
            break;
        }
        float *w = in->bw.data;
        mod_copy_rows(in->orig_w, cols, w, ld, rows, cols);
        if (in->orig_b)
            memcpy(in->orig_b, in->bb.data, (size_t)dout * sizeof(float));
        memset(delta, 0, (size_t)din * dout * sizeof(float));
        memset(bdelta, 0, (size_t)dout * sizeof(float));
        pr_ctx c;
        if ((rc = mod_lend_scratch(in, err))) {
            free(in->orig_w);
            free(in->orig_b);
            in->orig_w = in->orig_b = NULL;
            break;
        }
        mod_ctx_init(in, &c, 0, 0, 0, UINT64_MAX - 3);
        CT(&c, out) = mod_view2(delta, din, dout, dout);
        int64_t nb = dout;
        pr_tensor bd = mod_view(bdelta, 1, &nb);
        c.bias_delta = in->has_bb ? &bd : NULL;
        if ((rc = mod_call(mod, in, mod->t.merge, "merge", &c, err))) {
            free(in->orig_w);
            free(in->orig_b);
            in->orig_w = in->orig_b = NULL;
            break;
        }
        /* a gated module adds s times its delta */
        float s = mod_gate_value(in);
        if (!out_in(in)) {
            mod_axpy_rows(w, ld, delta, dout, din, dout, s);
        } else {   /* the [d_in, d_out] delta into a [d_out, d_in] weight */
            for (int i = 0; i < din; i++)
                for (int o = 0; o < dout; o++)
                    w[(size_t)o * ld + i] += s * delta[(size_t)i * dout + o];
        }
        if (in->has_bb)
            mod_axpy_rows(in->bb.data, dout, bdelta, dout, 1, dout, s);
    }
    free(delta);
    if (rc) {
        while (--k >= 0)
            restore_insertion(&mod->ins[k]);
        return rc;
    }
    mod->merged = 1;
    return PR_OK;
}

int pr_module_unmerge(pr_module *mod, pr_error *err)
{
    if (!mod)
        return pr_errorf(err, PR_ERR_INVALID, "unmerge: NULL module");
    if (!mod->merged)
        return pr_errorf(err, PR_ERR_INVALID, "module '%s' is not merged", mod_name(mod));
    /* reverse order: slices of one fused weight (qkv and q) may overlap */
    for (int k = mod->n_ins - 1; k >= 0; k--)
        restore_insertion(&mod->ins[k]);
    mod->merged = 0;
    return PR_OK;
}
