/* Test plugin: a valid pack of two techniques, "test-alpha" (bias beside
 * a projection) and "test-beta" ((IA)^3-style rescaling of the FFN
 * activation by a learned vector, ones at init). */
#include "test_plugin.h"

static const pr_param_decl beta_params[] = {
    {.struct_size = sizeof(pr_param_decl), .name = "scale", .shape = "d_out", .init = PR_INIT_ONES,
     .scope = PR_SCOPE_LAYER, .flags = PR_PARAM_NO_DECAY, .help = "per-channel scale"},
};

static const pr_buffer_decl beta_saved[] = {
    {.struct_size = sizeof(pr_buffer_decl), .name = "y_old", .shape = "rows, d_out"},
};

static pr_technique alpha, beta;
static const pr_technique *const list[] = {&alpha, &beta};
static pr_plugin plugin;

const pr_plugin *peftref_plugin_entry(const pr_entry_args *args)
{
    (void)args; /* a fixture: it needs none of the entry arguments */
    tp_fill(&alpha, "test-alpha");
    tp_fill(&beta, "test-beta");
    beta.adaptation = PR_ADAPT_RESCALING;
    beta.insertion = PR_INSERT_SEQUENTIAL;
    beta.integration = PR_INTEGRATE_RESCALE;
    beta.input = PR_INPUT_HIDDEN;
    beta.sharing = PR_SHARE_ACROSS_SITES;
    beta.workspace = PR_WS_FFN;
    beta.sites = PR_SITE_BIT(PR_SITE_FFN_ACT) | PR_SITE_BIT(PR_SITE_ATTN_K) | PR_SITE_BIT(PR_SITE_ATTN_V);
    beta.default_sites = PR_SITE_BIT(PR_SITE_FFN_ACT);
    beta.params = beta_params;
    beta.saved = beta_saved;
    beta.n_saved = 1;
    beta.module_out = "d_out";
    beta.param_formula = "d_out per layer and site";
    tp_plugin(&plugin, "test-good", list, 2);
    return &plugin;
}
