/* peftref built-in plugins: LOHA and LOKR adapters' adapter_config.json
 * (LoHaConfig, LoKrConfig) from loha and lokr modules.  PEFT's LyCORIS
 * layers adapt torch.nn.Linear only, never GPT-2's Conv1D.  License: MIT */
#include <stdint.h>
#include <string.h>

#include <peftref/plugin.h>
#include <peftref/ext/peft_config.h>

#include "codecs.h"
#include "write_common.h"

/* LoKr's factorised lokr_w2 exists in PEFT only when r < max(k, n) / 2 (else
 * it is one full lokr_w2 (k, n), LoKrLayer.update_layer's use_w2). */
static int lokr_check(const pr_peft_writer *h, pr_peft_out *out)
{
    int n = h->n_tensors(out);
    for (int i = 0; i < n; i++) {
        pr_peft_tensor w2a, w2b;
        int rc = h->tensor(out, i, &w2a);
        if (rc)
            return rc;
        size_t L = strlen(w2a.name);
        if (L < 10 || strcmp(w2a.name + L - 10, ".lokr_w2_a"))
            continue;
        char bname[256];
        snprintf(bname, sizeof bname, "%.*s.lokr_w2_b", (int)(L - 10), w2a.name);
        int b = h->find_tensor(out, bname);
        if (b < 0)
            continue;
        if ((rc = h->tensor(out, b, &w2b)))
            return rc;
        int64_t k = w2a.shape[0], r = w2a.shape[1], nn = w2b.shape[1], mx = k > nn ? k : nn;
        if (2 * r >= mx)
            return h->fail(out, PR_PEFT_ERR_UNSUPPORTED, "module '%s' (technique %s): at %.*s, r = %lld is not below "
                           "max(k, n) / 2 = %lld / 2, where Hugging Face PEFT's LoKr keeps one full lokr_w2 (%lld, "
                           "%lld) instead of lokr_w2_a and lokr_w2_b; use --format peftref (or a smaller r)",
                           h->module_name(out), h->technique(out), (int)(L - 10), w2a.name, (long long)r,
                           (long long)mx, (long long)k, (long long)nn);
    }
    return PR_PEFT_OK;
}

static int lycoris(const pr_peft_writer *h, pr_peft_out *out, int lokr)
{
    int rc = peft_linear_only(h, out, lokr ? "LOKR" : "LOHA");
    if (rc || (lokr && (rc = lokr_check(h, out))))
        return rc;
    double r = h->opt_num(out, "r", -1, 8), alpha = h->opt_num(out, "alpha", -1, 8);
    if ((rc = h->put_num(out, "r", r)) || (rc = h->put_num(out, "alpha", alpha)) ||
        (rc = h->put_pattern(out, "rank_pattern", "r", r)) ||
        (rc = h->put_pattern(out, "alpha_pattern", "alpha", alpha)) ||
        (rc = h->put_real(out, "rank_dropout", 0.0)) || (rc = h->put_real(out, "module_dropout", 0.0)) ||
        (rc = h->put_json(out, "use_effective_conv2d", "false")) || (rc = h->put_json(out, "init_weights", "true")))
        return rc;
    if (lokr && ((rc = h->put_json(out, "decompose_both", "false")) || (rc = h->put_num(out, "decompose_factor", -1)) ||
                 (rc = h->put_json(out, "rank_dropout_scale", "false"))))
        return rc;
    return peft_target_fields(h, out, 1, 0);
}

int peft_write_loha(const pr_peft_writer *h, pr_peft_out *out)
{
    return lycoris(h, out, 0);
}

int peft_write_lokr(const pr_peft_writer *h, pr_peft_out *out)
{
    return lycoris(h, out, 1);
}
