/* A compact LoRA (Hu et al. 2021, arXiv 2106.09685) for the conformance
 * checker's tests: h = x A^T B^T, y <- y + (alpha/r) h, with lora_A (r, d_in)
 * and lora_B (d_out, r).  Each fixture that includes this file defines
 * LL_NAME and breaks one thing on purpose:
 *   LL_DB_SCALE      factor applied to lora_B's gradient (1 when correct)
 *   LL_DX_SCALE      factor applied to the input gradient d_in
 *   LL_CRASH_FORWARD forward reads ctx->out_params, which is NULL there
 *   LL_STATIC_SEED   lora_A is initialised by init() from a static RNG
 *                    state instead of ctx->seed, so two attaches with one
 *                    seed differ
 *   LL_NAN_FORWARD   forward writes NaN into every output element
 *   LL_PEFT_TYPE     its pr_technique.peft_type (none when undefined)
 *   LL_PEFT_IMPLIES  the implies text of its peft-config extension
 *                    (include/peftref/ext/peft_config.h)
 *   LL_PEFT_READ     that extension has a read() of PEFT's LORA adapters
 *                    (r, lora_alpha, target_modules; LoraConfig's other
 *                    fields at their defaults)
 * Like every plugin it includes only peftref's public plugin headers. */
#ifndef PEFTREF_TEST_LORA_LIKE_H
#define PEFTREF_TEST_LORA_LIKE_H

#include <stdint.h>
#include <string.h>

#include <peftref/ext/peft_config.h>
#include <peftref/plugin.h>

#ifndef LL_DB_SCALE
#define LL_DB_SCALE 1.0f
#endif
#ifndef LL_DX_SCALE
#define LL_DX_SCALE 1.0f
#endif

PR_PLUGIN_EXPORT const pr_plugin *peftref_plugin_entry(const pr_entry_args *args);

enum { LL_A, LL_B };

static int ll_ld(const pr_tensor *t)
{
    return (int)(t->stride[0] ? t->stride[0] : t->shape[1]);
}

/* out (rows, d_out) = (x A^T) B^T; xa saved for backward */
static int ll_forward(const pr_ctx *c)
{
    const pr_host *h = c->host;
    int r = (int)c->params[LL_A]->shape[0], din = (int)c->params[LL_A]->shape[1];
    int dout = (int)c->params[LL_B]->shape[0];
    float *xa = c->saved[0]->data;
#ifdef LL_CRASH_FORWARD
    /* the bug: out_params belongs to fold() and is NULL in forward */
    xa = c->out_params[0]->data;
#endif
    h->gemm(0, 1, c->rows, r, din, 1.0f, c->in->data, ll_ld(c->in), c->params[LL_A]->data, din, 0.0f, xa, r);
    h->gemm(0, 1, c->rows, dout, r, 1.0f, xa, r, c->params[LL_B]->data, r, 0.0f, c->out->data, ll_ld(c->out));
#ifdef LL_NAN_FORWARD
    /* the bug: a result that is not a number, whatever the input */
    for (int i = 0; i < c->rows; i++)
        for (int j = 0; j < dout; j++)
            ((float *)c->out->data)[(int64_t)i * ll_ld(c->out) + j] = __builtin_nanf("");
#endif
    return 0;
}

/* d_out = s dy: dB += d_out^T xa; dxa = d_out B; dA += dxa^T x; dx += dxa A */
static int ll_backward(const pr_ctx *c)
{
    const pr_host *h = c->host;
    int r = (int)c->params[LL_A]->shape[0], din = (int)c->params[LL_A]->shape[1];
    int dout = (int)c->params[LL_B]->shape[0], rows = c->rows;
    const float *xa = c->saved[0]->data;
    float *dxa = c->scratch[0]->data;
    float *dA = c->grads ? c->grads[LL_A]->data : NULL, *dB = c->grads ? c->grads[LL_B]->data : NULL;
    if (dB)
        h->gemm(1, 0, dout, r, rows, LL_DB_SCALE, c->d_out->data, ll_ld(c->d_out), xa, r, 1.0f, dB, r);
    h->gemm(0, 0, rows, r, dout, 1.0f, c->d_out->data, ll_ld(c->d_out), c->params[LL_B]->data, r, 0.0f, dxa, r);
    if (dA)
        h->gemm(1, 0, r, din, rows, 1.0f, dxa, r, c->in->data, ll_ld(c->in), 1.0f, dA, din);
    if (c->d_in->data)
        h->gemm(0, 0, rows, din, r, LL_DX_SCALE, dxa, r, c->params[LL_A]->data, din, 1.0f, c->d_in->data,
                ll_ld(c->d_in));
    return 0;
}

#ifdef LL_STATIC_SEED
/* The bug: a state kept across calls, never seeded from ctx->seed. */
static uint64_t ll_state = 42;

static int ll_init(const pr_ctx *c)
{
    float *a = c->params[LL_A]->data;
    int64_t n = c->params[LL_A]->shape[0] * c->params[LL_A]->shape[1];
    for (int64_t i = 0; i < n; i++)
        a[i] = 0.2f * (2.0f * c->host->rng_uniform(&ll_state) - 1.0f);
    return 0;
}
#define LL_A_INIT PR_INIT_CUSTOM
#else
#define LL_A_INIT PR_INIT_KAIMING_UNIFORM
#endif

static const pr_option_decl ll_options[] = {
    {.struct_size = sizeof(pr_option_decl), .name = "r", .type = PR_OPT_INT, .def = 4, .min = 1, .max = 64,
     .per_site = 1, .help = "rank"},
    {.struct_size = sizeof(pr_option_decl), .name = "alpha", .type = PR_OPT_FLOAT, .def = 8, .min = 0, .max = 1e3,
     .help = "scale numerator"},
};

#ifdef LL_PEFT_READ
#define LL_PEFT_KEY(n) .peft_key = "{prefix}." n ".weight", .peft_layout = PR_PEFT_AS_IS
#else
#define LL_PEFT_KEY(n) .peft_key = NULL
#endif

static const pr_param_decl ll_params[] = {
    {.struct_size = sizeof(pr_param_decl), .name = "lora_A", .shape = "r, d_in", .init = LL_A_INIT,
     .init_arg = "sqrt(5)", .scope = PR_SCOPE_INSERTION, .help = "down projection", LL_PEFT_KEY("lora_A")},
    {.struct_size = sizeof(pr_param_decl), .name = "lora_B", .shape = "d_out, r", .init = PR_INIT_ZEROS,
     .scope = PR_SCOPE_INSERTION, .help = "up projection", LL_PEFT_KEY("lora_B")},
};

static const pr_buffer_decl ll_saved[] = {{sizeof(pr_buffer_decl), "xa", "rows, r"}};
static const pr_buffer_decl ll_scratch[] = {{sizeof(pr_buffer_decl), "d_xa", "rows, r"}};

#ifdef LL_PEFT_READ
/* A reader of the LORA fields this technique has, as an outside plugin
 * writes one: every other field must be at its default. */
static int ll_read(const pr_peft_reader *h, pr_peft_in *in)
{
    static const pr_peft_field fields[] = {
        { "r", PR_PEFT_READ, NULL }, { "lora_alpha", PR_PEFT_READ, NULL }, { "target_modules", PR_PEFT_READ, NULL },
        { "exclude_modules", PR_PEFT_READ, NULL }, { "layers_to_transform", PR_PEFT_READ, NULL },
        { "layers_pattern", PR_PEFT_READ, NULL }, { "fan_in_fan_out", PR_PEFT_READ, NULL },
        { "megatron_core", PR_PEFT_INFO, NULL }, { "qalora_group_size", PR_PEFT_INFO, NULL },
        { "lora_dropout", PR_PEFT_ZERO, "{tech} has no dropout" },
        { "use_rslora", PR_PEFT_FALSE, "{tech} scales by alpha / r" },
        { "use_dora", PR_PEFT_FALSE, "{tech} is a plain LoRA" },
        { "use_qalora", PR_PEFT_FALSE, NULL }, { "lora_bias", PR_PEFT_FALSE, NULL },
        { "init_lora_weights", PR_PEFT_TRUE, NULL },
        { "bias", PR_PEFT_INFO, NULL },
        { "rank_pattern", PR_PEFT_READ, NULL },
        { "alpha_pattern", PR_PEFT_EMPTY, "{tech}'s alpha is one value for every module" },
        { "megatron_config", PR_PEFT_EMPTY, NULL }, { "loftq_config", PR_PEFT_EMPTY, NULL },
        { "eva_config", PR_PEFT_EMPTY, NULL }, { "corda_config", PR_PEFT_EMPTY, NULL },
        { "layer_replication", PR_PEFT_EMPTY, NULL }, { "trainable_token_indices", PR_PEFT_EMPTY, NULL },
        { "target_parameters", PR_PEFT_EMPTY, NULL },
    };
    double r, alpha;
    int rc;
    if ((rc = h->check_fields(in, fields, sizeof fields / sizeof fields[0])) || (rc = h->check_fan_in_fan_out(in)) ||
        (rc = h->get_num(in, "r", 8, 1, &r)) || (rc = h->get_num(in, "lora_alpha", 8, 0, &alpha)) ||
        (rc = h->set_num(in, "r", r, -1)) || (rc = h->set_num(in, "alpha", alpha, -1)))
        return rc;
    const pr_peft_pattern pats[] = { { "rank_pattern", "r", r, 1 } };
    return h->match_targets(in, NULL, pats, 1);
}
#endif

#ifdef LL_PEFT_TYPE
#ifndef LL_PEFT_IMPLIES
#define LL_PEFT_IMPLIES NULL
#endif
static const pr_ext_peft_config ll_peft = { .struct_size = sizeof(pr_ext_peft_config), .implies = LL_PEFT_IMPLIES,
#ifdef LL_PEFT_READ
                                            .read = ll_read
#endif
};

static const void *ll_extension(const char *uri)
{
    return strcmp(uri, PR_EXT_PEFT_CONFIG_URI) ? NULL : &ll_peft;
}
#endif

static const pr_technique ll_technique = {
    .struct_size = sizeof(pr_technique),
    .abi_major = PR_ABI_MAJOR,
    .name = LL_NAME,
    .version = "0.1.0",
    .summary = "LoRA with a deliberate defect (a fixture of the conformance checker's tests).",
    .citation = "none: a test fixture",
    .license = "MIT",
    .intra = PR_INTRA_FACTORISED,
    .inter = PR_INTER_FIXED,
    .adaptation = PR_ADAPT_REPARAMETERISATION,
    .sharing = PR_SHARE_NONE,
    .input = PR_INPUT_HIDDEN,
    .insertion = PR_INSERT_PARALLEL,
    .insertions = PR_INSERTIONS_PER_SITE_LAYER,
    .integration = PR_INTEGRATE_SCALED_ADD,
    .workspace = PR_WS_ATTENTION | PR_WS_FFN,
    .options = ll_options,
    .n_options = 2,
#ifdef LL_PEFT_READ
    .sites = PR_SITE_BIT(PR_SITE_QKV) | PR_SITE_BIT(PR_SITE_O) | PR_SITE_BIT(PR_SITE_FFN_DOWN),
#else
    .sites = PR_SITE_BIT(PR_SITE_QKV) | PR_SITE_BIT(PR_SITE_FFN_DOWN),
#endif
    .default_sites = PR_SITE_BIT(PR_SITE_QKV),
    .params = ll_params,
    .n_params = 2,
    .saved = ll_saved,
    .n_saved = 1,
    .scratch = ll_scratch,
    .n_scratch = 1,
    .scale_expr = "alpha / r",
    .param_formula = "r * (d_in + d_out) per adapted matrix",
    .forward = ll_forward,
    .backward = ll_backward,
#ifdef LL_STATIC_SEED
    .init = ll_init,
#endif
#ifdef LL_PEFT_TYPE
    .peft_type = LL_PEFT_TYPE,
#endif
#ifdef LL_PEFT_TYPE
    .extension_data = ll_extension,
#endif
};

static const pr_technique *const ll_list[] = {&ll_technique};

static const pr_plugin ll_plugin = {
    .struct_size = sizeof(pr_plugin),
    .abi_major = PR_ABI_MAJOR,
    .name = LL_NAME,
    .version = "0.1.0",
    .n_techniques = 1,
    .techniques = ll_list,
};

PR_PLUGIN_EXPORT const pr_plugin *peftref_plugin_entry(const pr_entry_args *args)
{
    (void)args; /* a fixture: it needs none of the entry arguments */
    return &ll_plugin;
}

#endif
