/* Full finetuning: every base tensor is trained.  The reference row of
 * every PEFT comparison (Sabry and Belz 2023, PEFT-Ref, arXiv 2304.12410),
 * and the usual way a pretrained language model is adapted (Howard and
 * Ruder 2018, "Universal Language Model Fine-tuning for Text
 * Classification", arXiv 1801.06146; Radford et al. 2018, GPT).
 *
 * A selection technique over all five kinds of base tensor (plugin.h,
 * select_kinds) in all five workspaces: projection weights and biases,
 * normalisation gains and biases, the token and position embeddings, and
 * an untied output head.  Per-layer tensors of the chosen layers;
 * model-level ones (embeddings, ln_f, head) only when every layer is
 * chosen.  A tied head is the token embedding, counted once.
 *
 * Trainable parameters: every base parameter of the model, e.g. GPT-2
 *     V*C + P*C + L*(C*(Q+2KV) + (Q+2KV) + Q*C + C + C*F + F + F*C + C + 4C) + 2C
 *     (+ V*C for an untied head),
 * with P the learned positions (max_seq).
 *
 * No callbacks: the base model's own forward and backward serve. */
#include <peftref/plugin.h>

PR_PLUGIN_EXPORT const pr_plugin *peftref_plugin_entry(const pr_entry_args *args);

static const pr_technique full_technique = {
    .struct_size = sizeof(pr_technique),
    .abi_major = PR_ABI_MAJOR,
    .name = "full",
    .version = "1.0.0",
    .summary = "Full finetuning: every base tensor (projection weights and biases, norm gains "
               "and biases, token and position embeddings, an untied head) is trained; the "
               "reference row of every comparison.",
    .citation = "Howard, Ruder (2018). Universal Language Model Fine-tuning for Text "
                "Classification. arXiv:1801.06146. As the baseline of PEFT comparisons: Sabry, "
                "Belz (2023). PEFT-Ref. arXiv:2304.12410",
    .license = "MIT",
    .intra = PR_INTRA_NONE,
    .inter = PR_INTER_FIXED,
    .adaptation = PR_ADAPT_SELECTION,
    .sharing = PR_SHARE_NONE,
    .input = PR_INPUT_NONE,
    .insertion = PR_INSERT_IN_PLACE,
    .insertions = PR_INSERTIONS_NONE,
    .integration = PR_INTEGRATE_SELECT,
    .workspace = PR_WS_EMBEDDING | PR_WS_ATTENTION | PR_WS_FFN | PR_WS_NORM | PR_WS_HEAD,
    .select_kinds = PR_BASE_WEIGHT | PR_BASE_BIAS | PR_BASE_NORM_GAIN | PR_BASE_NORM_BIAS |
                    PR_BASE_EMBEDDING,
    .param_formula = "every base parameter of the model (all of it when every layer is chosen; "
                     "else the chosen layers' tensors)",
};

static const pr_technique *const full_techniques[] = { &full_technique };

static const pr_plugin full_plugin = {
    .struct_size = sizeof(pr_plugin),
    .abi_major = PR_ABI_MAJOR,
    .name = "full",
    .version = "1.0.0",
    .n_techniques = 1,
    .techniques = full_techniques,
};

PR_PLUGIN_EXPORT const pr_plugin *peftref_plugin_entry(const pr_entry_args *args)
{
    (void)args; /* a built-in plugin needs none of the host's entry arguments */
    return &full_plugin;
}
