/* peftref plugin: X-LoRA (Buehler & Buehler 2024, arXiv 2402.07148), a
 * mixture of low-rank adapter experts: several LoRA modules trained
 * before, loaded FROZEN, mixed per token by a trainable scaling head.  A
 * composite technique (plugin.h, pr_technique.composite), attached over
 * its members like adapter_fusion (pr_module_compose, or a pipeline's
 * `fuse:` entry with `technique: xlora`); the members are any frozen
 * additive modules at the same sites and layers, LoRA in the method.
 *
 * At each insertion (site, layer), x the site input (rows, d_in), h_k
 * the contribution of member k (what it would add to y alone, scale
 * included: for LoRA (alpha/r) x A_k^T B_k^T), n = n_members:
 *     z   = x W^T + b                      (W: n x d_in, b: n; depth 1)
 *     p   = softmax(z / softmax_temperature)     (z when enable_softmax false)
 *     s   = p masked to its top_k_lora largest  (top_k_lora 0 = all; with
 *           enable_softmax_topk the kept entries are softmaxed again)
 *     y  <- y + global_scaling_weight * sum_k s_k h_k
 * global_scaling_weight is the host's scale (SCALED_ADD, scale_expr).
 *
 * How this differs from the original two-pass X-LoRA (and PEFT's
 * XLoraModel): there, a first forward pass runs the whole model with the
 * adapters' scalings set to scaling_pass_value, the classifier reads that
 * pass's LAST hidden state (hidden_size = d_model) and outputs, per token,
 * the scalings of every expert at every adapted layer (one set broadcast
 * to all layers unless layerwise_scalings); the second pass applies them.
 * Here there is ONE pass: each insertion's head reads its own site input
 * x (d_in of that site, so hidden_size is the site's width and is not an
 * option) and produces that insertion's scalings.  So the scalings of
 * layer l depend on the hidden states below l (causal in depth), not on
 * the final hidden state of a dry run; there is no scaling pass, so
 * scaling_pass_value has no role and is not declared.  The cost is one
 * forward instead of two.  X-LoRA scales the expert's INPUT
 * (B_k A_k (s_k x)); scaling its output h_k is the same for LoRA (linear
 * in x; member dropout aside: PEFT drops s_k x, here x), and is what the
 * composite interface hands (members' outputs).
 *
 * Sharing: layerwise_scalings false (PEFT's default): one head per site
 * shared by all layers (X-LoRA: one classifier output shared by every
 * layer).  layerwise_scalings true: the site's head tensor holds one head
 * per MODEL layer (PEFT: a last layer of n_classes * n_layers outputs),
 * the head of layer l in rows [l n, (l + 1) n); rows of layers the module
 * does not cover stay unused (the parameter shapes know n_layers and
 * n_chosen_layers, not a layer's rank among the chosen ones).
 *
 * Parameters per site, H = 1 + layerwise_scalings (n_layers - 1) heads:
 *     head.weight  H n x d_in,  head.bias  H n      -> H n (d_in + 1)
 * i.e. per insertion n (d_in + 1) with layerwise_scalings and every layer.
 * The member count n must be given as the option n_experts (parameter
 * shapes cannot use n_members, which only saved and scratch buffers see);
 * compose_forward refuses a composite whose member count differs.
 *
 * Not implemented: xlora_depth > 1 (hidden layers of xlora_size with ReLU
 * and xlora_dropout_p), so xlora_size and xlora_dropout_p are not
 * declared; use_trainable_adapters (members are frozen by the composite
 * mechanism).  Init: the head as torch.nn.Linear's default (weight
 * kaiming_uniform(a = sqrt(5)) = U(+-1/sqrt(d_in)), bias U(+-1/sqrt(d_in))),
 * PEFT's XLoraClassifier's. */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "peftref/plugin.h"

PR_PLUGIN_EXPORT const pr_plugin *peftref_plugin_entry(const pr_entry_args *args);

enum { OPT_N_EXPERTS, OPT_DEPTH, OPT_LAYERWISE, OPT_SOFTMAX, OPT_TEMPERATURE, OPT_TOPK, OPT_SOFTMAX_TOPK,
       OPT_GLOBAL_WEIGHT, N_OPTS };
enum { P_WEIGHT, P_BIAS, N_PARAMS };
enum { S_LOGITS, N_SAVED };
enum { X_DZ, N_SCRATCH };

#define MAX_EXPERTS 64

static float *fdata(const pr_tensor *t)
{
    return (float *)t->data;
}

static int ld(const pr_tensor *t)
{
    return (int)t->stride[0];
}

typedef struct mix_opts {
    int n, top_k, softmax, softmax_topk;
    float temperature;
} mix_opts;

static mix_opts opts_of(const pr_ctx *c)
{
    mix_opts o;
    o.n = (int)c->n_members;
    o.softmax = c->options[OPT_SOFTMAX].num != 0.0;
    o.temperature = (float)c->options[OPT_TEMPERATURE].num;
    o.top_k = (int)c->options[OPT_TOPK].num;
    o.softmax_topk = c->options[OPT_SOFTMAX_TOPK].num != 0.0;
    if (o.top_k <= 0 || o.top_k > o.n)
        o.top_k = 0;
    return o;
}

/* One row: p from the logits z, keep (1 kept, 0 masked) and s, the
 * scalings. */
static void scalings(const mix_opts *o, const float *z, float *p, float *keep, float *s)
{
    int n = o->n;
    if (o->softmax) {
        float m = z[0] / o->temperature;
        for (int k = 1; k < n; k++)
            m = fmaxf(m, z[k] / o->temperature);
        double sum = 0.0;
        for (int k = 0; k < n; k++) {
            p[k] = expf(z[k] / o->temperature - m);
            sum += p[k];
        }
        for (int k = 0; k < n; k++)
            p[k] = (float)(p[k] / sum);
    } else {
        memcpy(p, z, (size_t)n * sizeof *p);
    }
    for (int k = 0; k < n; k++)
        keep[k] = 1.0f;
    if (o->top_k) {
        /* an entry is kept when fewer than top_k entries beat it (ties
         * go to the lower index, as torch.topk's first occurrence) */
        for (int k = 0; k < n; k++) {
            int above = 0;
            for (int j = 0; j < n; j++)
                above += p[j] > p[k] || (p[j] == p[k] && j < k);
            keep[k] = above < o->top_k ? 1.0f : 0.0f;
        }
    }
    for (int k = 0; k < n; k++)
        s[k] = p[k] * keep[k];
    if (o->top_k && o->softmax_topk) {
        float m = -INFINITY;
        for (int k = 0; k < n; k++)
            if (keep[k] != 0.0f)
                m = fmaxf(m, s[k]);
        double sum = 0.0;
        for (int k = 0; k < n; k++)
            if (keep[k] != 0.0f)
                sum += expf(s[k] - m);
        for (int k = 0; k < n; k++)
            s[k] = keep[k] != 0.0f ? (float)(expf(s[k] - m) / sum) : 0.0f;
    }
}

/* The head of this insertion: the rows of its layer when layerwise. */
static int head_offset(const pr_ctx *c)
{
    int layerwise = c->options[OPT_LAYERWISE].num != 0.0;
    return layerwise && c->layer > 0 ? c->layer * (int)c->n_members : 0;
}

static int check_members(const pr_ctx *c, int backward)
{
    const pr_host *host = c->host;
    if (c->n_members < 2 || !c->members || (backward && !c->d_members))
        return host->error(c, "xlora: called without members (attach it over frozen LoRA modules with "
                              "pr_module_compose, or a pipeline's fuse: entry with technique: xlora)");
    int want = (int)c->options[OPT_N_EXPERTS].num;
    if ((int)c->n_members != want)
        return host->error(c, "xlora: %u members but n_experts is %d; the scaling head has one output per "
                              "expert, so set n_experts to the number of modules it mixes",
                           c->n_members, want);
    if (c->n_members > MAX_EXPERTS)
        return host->error(c, "xlora: at most %d experts", MAX_EXPERTS);
    return 0;
}

/* saved: z (rows, n).  out = sum_k s_k h_k. */
static int xlora_forward(const pr_ctx *c)
{
    int rc = check_members(c, 0);
    if (rc)
        return rc;
    const pr_host *host = c->host;
    int rows = c->rows, din = c->dims->d_in, d = c->dims->d_out, n = (int)c->n_members;
    int off = head_offset(c);
    const float *w = fdata(c->params[P_WEIGHT]) + (size_t)off * din, *b = fdata(c->params[P_BIAS]) + off;
    float *z = fdata(c->saved[S_LOGITS]);
    host->gemm(0, 1, rows, n, din, 1.0f, fdata(c->in), ld(c->in), w, din, 0.0f, z, n);
    host->add_bias_rows(z, n, b, rows, n);
    mix_opts o = opts_of(c);
    float *out = fdata(c->out);
    int lo = ld(c->out);
    for (int r = 0; r < rows; r++) {
        float p[MAX_EXPERTS], keep[MAX_EXPERTS], s[MAX_EXPERTS];
        scalings(&o, z + (size_t)r * n, p, keep, s);
        float *orow = out + (size_t)r * lo;
        for (int k = 0; k < n; k++) {
            const pr_tensor *h = c->members[k];
            const float *hr = fdata(h) + (size_t)r * ld(h);
            for (int j = 0; j < d; j++)
                orow[j] += s[k] * hr[j];
        }
    }
    return 0;
}

/* dy = d_out (the host's global_scaling_weight already in it):
 *   d_members[k] += s_k dy;   ds_k = dy . h_k
 *   top-k softmax:  dq = q (ds - sum_kept q ds) on kept, 0 elsewhere;
 *   mask:           dp = keep * dq
 *   softmax / T:    dz = p (dp - sum p dp) / T     (dz = dp without it)
 *   dW += dz^T x;  db += sum_rows dz;  dx += dz W */
static int xlora_backward(const pr_ctx *c)
{
    int rc = check_members(c, 1);
    if (rc)
        return rc;
    const pr_host *host = c->host;
    int rows = c->rows, din = c->dims->d_in, d = c->dims->d_out, n = (int)c->n_members;
    int off = head_offset(c);
    const float *w = fdata(c->params[P_WEIGHT]) + (size_t)off * din;
    float *gw = fdata(c->grads[P_WEIGHT]), *gb = fdata(c->grads[P_BIAS]);
    const float *z = fdata(c->saved[S_LOGITS]), *dy = fdata(c->d_out);
    float *dz = fdata(c->scratch[X_DZ]);
    int ldy = ld(c->d_out);
    mix_opts o = opts_of(c);
    for (int r = 0; r < rows; r++) {
        float p[MAX_EXPERTS], keep[MAX_EXPERTS], s[MAX_EXPERTS], ds[MAX_EXPERTS];
        scalings(&o, z + (size_t)r * n, p, keep, s);
        const float *dyr = dy + (size_t)r * ldy;
        for (int k = 0; k < n; k++) {
            const pr_tensor *h = c->members[k], *dh = c->d_members[k];
            const float *hr = fdata(h) + (size_t)r * ld(h);
            float *dhr = fdata(dh) + (size_t)r * ld(dh);
            double acc = 0.0;
            for (int j = 0; j < d; j++) {
                acc += (double)dyr[j] * hr[j];
                dhr[j] += s[k] * dyr[j];
            }
            ds[k] = (float)acc;
        }
        if (o.top_k && o.softmax_topk) {
            double m = 0.0;
            for (int k = 0; k < n; k++)
                m += (double)s[k] * ds[k];
            for (int k = 0; k < n; k++)
                ds[k] = keep[k] != 0.0f ? s[k] * (float)(ds[k] - m) : 0.0f;
        }
        for (int k = 0; k < n; k++)
            ds[k] *= keep[k];
        float *dzr = dz + (size_t)r * n;
        if (o.softmax) {
            double m = 0.0;
            for (int k = 0; k < n; k++)
                m += (double)p[k] * ds[k];
            for (int k = 0; k < n; k++)
                dzr[k] = p[k] * (float)(ds[k] - m) / o.temperature;
        } else {
            memcpy(dzr, ds, (size_t)n * sizeof *dzr);
        }
    }
    if (gw)
        host->gemm(1, 0, n, din, rows, 1.0f, dz, n, fdata(c->in), ld(c->in), 1.0f, gw + (size_t)off * din, din);
    if (gb)
        host->col_sums(gb + off, dz, n, rows, n);
    if (c->d_in && c->d_in->data)
        host->gemm(0, 0, rows, din, n, 1.0f, dz, n, w, din, 1.0f, fdata(c->d_in), ld(c->d_in));
    return 0;
}

static const pr_option_decl xlora_options[N_OPTS] = {
    [OPT_N_EXPERTS] = {
        .struct_size = sizeof(pr_option_decl), .name = "n_experts", .type = PR_OPT_INT,
        .def = 2, .min = 2, .max = MAX_EXPERTS,
        .help = "number of LoRA experts mixed (the members); Hugging Face PEFT's XLoraConfig takes it from "
                "len(adapters). Must equal the number of modules composed; default 2",
    },
    [OPT_DEPTH] = {
        .struct_size = sizeof(pr_option_decl), .name = "xlora_depth", .type = PR_OPT_INT,
        .def = 1, .min = 1, .max = 1,
        .help = "depth of the scaling head; 1 (PEFT's default, a single linear layer) is the only one "
                "implemented",
    },
    [OPT_LAYERWISE] = {
        .struct_size = sizeof(pr_option_decl), .name = "layerwise_scalings", .type = PR_OPT_BOOL,
        .def = 0,
        .help = "false (PEFT's default): one head per site shared by every layer; true: one head per layer",
    },
    [OPT_SOFTMAX] = {
        .struct_size = sizeof(pr_option_decl), .name = "enable_softmax", .type = PR_OPT_BOOL,
        .def = 1,
        .help = "softmax over the experts of the head's logits (PEFT's default true); false uses the logits",
    },
    [OPT_TEMPERATURE] = {
        .struct_size = sizeof(pr_option_decl), .name = "softmax_temperature", .type = PR_OPT_FLOAT,
        .def = 1.0, .min = 1e-6, .max = 1e6,
        .help = "temperature T of the softmax(z / T); PEFT's default 1.0",
    },
    [OPT_TOPK] = {
        .struct_size = sizeof(pr_option_decl), .name = "top_k_lora", .type = PR_OPT_INT,
        .def = 0, .min = 0, .max = MAX_EXPERTS,
        .help = "keep only the k largest scalings per token; 0 = all (PEFT's top_k_lora None)",
    },
    [OPT_SOFTMAX_TOPK] = {
        .struct_size = sizeof(pr_option_decl), .name = "enable_softmax_topk", .type = PR_OPT_BOOL,
        .def = 0,
        .help = "with top_k_lora: softmax over the kept scalings again (PEFT's default false)",
    },
    [OPT_GLOBAL_WEIGHT] = {
        .struct_size = sizeof(pr_option_decl), .name = "global_scaling_weight", .type = PR_OPT_FLOAT,
        .def = 1.0, .min = -1e6, .max = 1e6,
        .help = "weight of the whole mixture, y += w * sum_k s_k h_k; PEFT's default 1.0",
    },
};

#define HEADS "(1 + layerwise_scalings * (n_layers - 1)) * n_experts"

static const pr_param_decl xlora_params[N_PARAMS] = {
    [P_WEIGHT] = { .struct_size = sizeof(pr_param_decl), .name = "head_weight", .shape = HEADS ", d_in",
                   .init = PR_INIT_KAIMING_UNIFORM, .init_arg = "sqrt(5)", .scope = PR_SCOPE_SITE,
                   .help = "W of the scaling head z = x W^T + b, one n_experts x d_in block per head "
                           "(nn.Linear's layout)" },
    [P_BIAS] = { .struct_size = sizeof(pr_param_decl), .name = "head_bias", .shape = HEADS,
                 .init = PR_INIT_UNIFORM, .init_arg = "1 / sqrt(d_in)", .scope = PR_SCOPE_SITE,
                 .help = "b of the scaling head, n_experts per head" },
};

static const pr_buffer_decl xlora_saved[N_SAVED] = {
    [S_LOGITS] = { sizeof(pr_buffer_decl), "logits", "rows, n_members" },
};

static const pr_buffer_decl xlora_scratch[N_SCRATCH] = {
    [X_DZ] = { sizeof(pr_buffer_decl), "d_logits", "rows, n_members" },
};

static const pr_technique xlora_technique = {
    .struct_size = sizeof(pr_technique),
    .abi_major = PR_ABI_MAJOR,
    .name = "xlora",
    .version = "1.0.0",
    .summary = "X-LoRA: a per-token softmax mixture of frozen LoRA experts at each site, the scalings from a "
               "trainable linear head on the site input (one pass, not the paper's two); a composite (attach "
               "it over its experts with pr_module_compose, or a pipeline's fuse: entry with technique: xlora)",
    .citation = "Buehler, Buehler (2024). X-LoRA: Mixture of Low-Rank Adapter Experts, a Flexible Framework "
                "for Large Language Models with Applications in Protein Mechanics and Molecular Design. "
                "arXiv:2402.07148",
    .license = "MIT",
    .intra = PR_INTRA_DENSE,
    .inter = PR_INTER_DYNAMIC,
    .adaptation = PR_ADAPT_ADDITION,
    .sharing = PR_SHARE_ACROSS_LAYERS,
    .input = PR_INPUT_HIDDEN,
    .insertion = PR_INSERT_PARALLEL,
    .insertions = PR_INSERTIONS_PER_SITE_LAYER,
    .integration = PR_INTEGRATE_SCALED_ADD,
    .workspace = PR_WS_ATTENTION | PR_WS_FFN,
    .options = xlora_options,
    .n_options = N_OPTS,
    .sites = (1u << PR_SITE_COUNT) - 1,
    .default_sites = PR_SITE_BIT(PR_SITE_QKV),
    .default_sites_llama = PR_SITE_BIT(PR_SITE_Q) | PR_SITE_BIT(PR_SITE_V),
    .params = xlora_params,
    .n_params = N_PARAMS,
    .saved = xlora_saved,
    .n_saved = N_SAVED,
    .scratch = xlora_scratch,
    .n_scratch = N_SCRATCH,
    .scale_expr = "global_scaling_weight",
    .param_formula = "per site H * n_experts * (d_in + 1) (head weight and bias), H = 1 (layerwise_scalings "
                     "false: shared by the layers) or n_layers (true); the experts' parameters frozen",
    .flops_per_token = "2 * n_experts * d_in + 2 * n_experts * d_out",
    .composite = 1,
    .compose_forward = xlora_forward,
    .compose_backward = xlora_backward,
};

static const pr_technique *const xlora_techniques[] = { &xlora_technique };

static const pr_plugin xlora_plugin = {
    .struct_size = sizeof(pr_plugin),
    .abi_major = PR_ABI_MAJOR,
    .name = "xlora",
    .version = "1.0.0",
    .n_techniques = 1,
    .techniques = xlora_techniques,
};

PR_PLUGIN_EXPORT const pr_plugin *peftref_plugin_entry(const pr_entry_args *args)
{
    (void)args; /* a built-in plugin needs none of the host's entry arguments */
    return &xlora_plugin;
}
