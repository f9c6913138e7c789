/* BitFit: train only the bias terms (Ben Zaken, Ravfogel, Goldberg 2022,
 * "BitFit: Simple Parameter-efficient Fine-tuning for Transformer-based
 * Masked Language-models", ACL 2022, arXiv 2106.10199).
 *
 * A selection technique: nothing is inserted; the host makes existing base
 * tensors trainable, chosen by kind and workspace (plugin.h, select_kinds).
 * The paper trains "all bias terms" of the encoder, and its equations
 * (§2) list among them the LayerNorm biases b_LN1, b_LN2 beside the
 * projection biases b_q, b_k, b_v, b_m1, b_m2, b_m3; so BitFit here
 * selects
 *   - every projection bias (PR_BASE_BIAS) of the attention and FFN
 *     workspaces: GPT-2's attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj;
 *   - every normalisation bias (PR_BASE_NORM_BIAS, the norm workspace):
 *     ln_1 and ln_2 of each chosen layer, and ln_f when every layer is
 *     chosen (model-level tensors go with the whole model).
 * The LayerNorm gains stay frozen.  Embedding tables have no biases.
 *
 * Trainable parameters on a GPT-2 model (d_model C, Q = n_heads*d_head,
 * KV = n_kv_heads*d_head, F = d_ff, L layers, with biases):
 *     L * ((Q + 2 KV) + C + F + C + 2 C) + C
 * (= L * (3C + C + 4C + C + 2C) + C with Q = KV = C, F = 4C).
 * A model built without biases (bias: false drops the LayerNorm biases
 * too) leaves BitFit nothing to train.
 *
 * No callbacks: the base model's own forward and backward serve. */
#include <peftref/plugin.h>

PR_PLUGIN_EXPORT const pr_plugin *peftref_plugin_entry(const pr_entry_args *args);

static const pr_technique bitfit_technique = {
    .struct_size = sizeof(pr_technique),
    .abi_major = PR_ABI_MAJOR,
    .name = "bitfit",
    .version = "1.0.0",
    .summary = "BitFit: train every bias term of the frozen model, the projection biases of "
               "attention and FFN and the LayerNorm biases (as the paper's 'all bias terms'); "
               "LayerNorm gains, weights and embeddings stay frozen.",
    .citation = "Ben Zaken, Ravfogel, Goldberg (2022). BitFit: Simple Parameter-efficient "
                "Fine-tuning for Transformer-based Masked Language-models. ACL 2022. "
                "arXiv:2106.10199",
    .license = "MIT",
    .intra = PR_INTRA_NONE,
    .inter = PR_INTER_FIXED,
    .adaptation = PR_ADAPT_SELECTION,
    .sharing = PR_SHARE_NONE,
    .input = PR_INPUT_NONE,
    .insertion = PR_INSERT_IN_PLACE,
    .insertions = PR_INSERTIONS_NONE,
    .integration = PR_INTEGRATE_SELECT,
    .workspace = PR_WS_ATTENTION | PR_WS_FFN | PR_WS_NORM,
    .select_kinds = PR_BASE_BIAS | PR_BASE_NORM_BIAS,
    .param_formula = "the selected base biases: per layer (Q + 2*KV) + d_model (attention) + "
                     "d_ff + d_model (FFN) + 2*d_model (LayerNorm biases), plus d_model (ln_f "
                     "bias) when every layer is chosen; GPT-2: L*(3C + C + 4C + C + 2C) + C",
};

static const pr_technique *const bitfit_techniques[] = { &bitfit_technique };

static const pr_plugin bitfit_plugin = {
    .struct_size = sizeof(pr_plugin),
    .abi_major = PR_ABI_MAJOR,
    .name = "bitfit",
    .version = "1.0.0",
    .n_techniques = 1,
    .techniques = bitfit_techniques,
};

PR_PLUGIN_EXPORT const pr_plugin *peftref_plugin_entry(const pr_entry_args *args)
{
    (void)args; /* a built-in plugin needs none of the host's entry arguments */
    return &bitfit_plugin;
}
