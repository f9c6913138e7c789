/* LayerNorm tuning: train only the gains and biases of the normalisation
 * layers (Zhao, Tu, Wei, Mei, Xie 2023, "Tuning LayerNorm in Attention:
 * Towards Efficient Multi-Modal LLM Finetuning", ICLR 2024,
 * arXiv 2312.11420; the gain g and bias b are those of Ba, Kiros, Hinton
 * 2016, "Layer Normalization", arXiv 1607.06450).
 *
 * Zhao et al. train the LayerNorms of every attention block and, in their
 * default setting, also the word embedding and output head; their
 * "LayerNorm-simple" variant trains the LayerNorms alone.  This technique
 * is that norms-only variant (embeddings and head stay frozen; combine it
 * with a selection of them for the other).  It selects, by kind and
 * workspace (plugin.h, select_kinds):
 *   PR_BASE_NORM_GAIN | PR_BASE_NORM_BIAS in the norm workspace:
 *   ln_1 and ln_2 of each chosen layer, and ln_f when every layer is
 *   chosen (model-level tensors go with the whole model).
 *
 * Trainable parameters on a GPT-2 model: 2 * d_model * (2L + 1)
 * (gains only, d_model * (2L + 1), for a model without biases or with
 * RMSNorm).
 *
 * No callbacks: the base model's own forward and backward serve. */
#include <peftref/plugin.h>

PR_PLUGIN_EXPORT const pr_plugin *peftref_plugin_entry(const pr_entry_args *args);

static const pr_technique lnfit_technique = {
    .struct_size = sizeof(pr_technique),
    .abi_major = PR_ABI_MAJOR,
    .name = "lnfit",
    .version = "1.0.0",
    .summary = "LayerNorm tuning: train the gains and biases of every LayerNorm (ln_1, ln_2 of "
               "each layer and the final ln_f), everything else frozen; Zhao et al.'s "
               "norms-only 'LayerNorm-simple' setting.",
    .citation = "Zhao, Tu, Wei, Mei, Xie (2023). Tuning LayerNorm in Attention: Towards "
                "Efficient Multi-Modal LLM Finetuning. ICLR 2024. arXiv:2312.11420. LayerNorm: "
                "Ba, Kiros, Hinton (2016). Layer Normalization. arXiv:1607.06450",
    .license = "MIT",
    .intra = PR_INTRA_NONE,
    .inter = PR_INTER_FIXED,
    .adaptation = PR_ADAPT_SELECTION,
    .sharing = PR_SHARE_NONE,
    .input = PR_INPUT_NONE,
    .insertion = PR_INSERT_IN_PLACE,
    .insertions = PR_INSERTIONS_NONE,
    .integration = PR_INTEGRATE_SELECT,
    .workspace = PR_WS_NORM,
    .select_kinds = PR_BASE_NORM_GAIN | PR_BASE_NORM_BIAS,
    .param_formula = "the selected norm tensors: 2*d_model per LayerNorm (gain and bias); "
                     "2 per chosen layer plus ln_f when every layer is chosen: "
                     "2 * d_model * (2L + 1) (d_model * (2L + 1) without norm biases)",
};

static const pr_technique *const lnfit_techniques[] = { &lnfit_technique };

static const pr_plugin lnfit_plugin = {
    .struct_size = sizeof(pr_plugin),
    .abi_major = PR_ABI_MAJOR,
    .name = "lnfit",
    .version = "1.0.0",
    .n_techniques = 1,
    .techniques = lnfit_techniques,
};

PR_PLUGIN_EXPORT const pr_plugin *peftref_plugin_entry(const pr_entry_args *args)
{
    (void)args; /* a built-in plugin needs none of the host's entry arguments */
    return &lnfit_plugin;
}
