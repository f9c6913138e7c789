/* peftref built-in plugins: what the Hugging Face PEFT writers
 * (write_<type>.c) share, as static inline functions over the host's
 * pr_peft_writer table (a plugin links nothing of peftref).  License: MIT */
#ifndef PEFTREF_PLUGINS_PEFT_WRITE_COMMON_H
#define PEFTREF_PLUGINS_PEFT_WRITE_COMMON_H

#include <stdio.h>
#include <string.h>

#include <peftref/ext/peft_config.h>

/* v as a JSON text that reads back as the same number: an integer when
 * whole and below 1e15 in magnitude (as put_num writes it), else 17
 * significant digits with a '.' or an exponent so that it stays a real
 * (no libm: not every plugin links it) */
static inline void peft_num_text(char *buf, size_t len, double v)
{
    if (v > -1e15 && v < 1e15 && v == (double)(long long)v) {
        snprintf(buf, len, "%.0f", v);
        return;
    }
    snprintf(buf, len, "%.17g", v);
    if (!strpbrk(buf, ".eEn"))
        snprintf(buf + strlen(buf), len - strlen(buf), ".0");
}

static inline int peft_put_bool(const pr_peft_writer *h, pr_peft_out *out, const char *field, int v)
{
    return h->put_json(out, field, v ? "true" : "false");
}

/* PEFT adapts these types only in torch.nn.Linear (and convolution) layers;
 * GPT-2's projections are transformers' Conv1D, which their
 * _create_new_module refuses ("Target module ... is not supported"). */
static inline int peft_linear_only(const pr_peft_writer *h, pr_peft_out *out, const char *type)
{
    const pr_peft_model *m = h->model(out);
    if (!m->conv1d)
        return PR_PEFT_OK;
    return h->fail(out, PR_PEFT_ERR_UNSUPPORTED, "module '%s' (technique %s): Hugging Face PEFT's %s adapts "
                   "torch.nn.Linear layers only, and %s's projections are transformers' Conv1D, which it refuses; "
                   "use --format peftref", h->module_name(out), h->technique(out), type, m->family);
}

/* target_modules of the module's sites, exclude_modules null (has_exclude),
 * fan_in_fan_out where the projections are Conv1D (has_fifo),
 * layers_to_transform and layers_pattern */
static inline int peft_target_fields(const pr_peft_writer *h, pr_peft_out *out, int has_exclude, int has_fifo)
{
    int rc = h->put_targets(out, "target_modules", h->sites(out));
    if (!rc && has_exclude)
        rc = h->put_json(out, "exclude_modules", "null");
    if (!rc && has_fifo)
        rc = peft_put_bool(h, out, "fan_in_fan_out", h->model(out)->conv1d != 0);
    return rc ? rc : h->put_layers(out);
}

#endif
