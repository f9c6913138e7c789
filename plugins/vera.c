/* VeRA: vector-based random matrix adaptation (Kopiczko, Blankevoort, Asano
 * 2024, "VeRA: Vector-based Random Matrix Adaptation", arXiv 2310.11454).
 *
 * One pair of frozen random matrices serves every adapted projection of the
 * model, across layers AND sites; each insertion trains only two vectors
 * that scale them.  Names, shapes and inits as Hugging Face PEFT's VeRA:
 *
 *     vera_A        (r, max_d_in)   frozen, global; kaiming_uniform (a = 0,
 *                                   fan_in = max_d_in) as PEFT's _kaiming_init
 *     vera_B        (max_d_out, r)  frozen, global; kaiming_uniform (a = 0,
 *                                   fan_in = r)
 *     vera_lambda_d (r)             trained, per insertion; d_initial (0.1)
 *     vera_lambda_b (d_out)         trained, per insertion; zeros, so the
 *                                   module starts as the identity
 *
 * max_d_in / max_d_out are the largest widths over the module's chosen
 * sites (PEFT sizes vera_A / vera_B by the largest targeted layer); a site
 * of widths (d_in, d_out) uses the slices A[:, :d_in] and B[:d_out, :]:
 *
 *     h = lambda_b * ( (lambda_d * (dropout(x) . A[:, :d_in]^T)) . B[:d_out]^T )
 *     y <- y + s * h,   s = 1 (PEFT's VeRA has no scaling factor)
 *
 * merge() folds dW = A[:, :d_in]^T diag(lambda_d) B[:d_out]^T diag(lambda_b)
 * (times s) into the frozen weight, shaped [d_in, d_out].
 *
 * Two techniques, one per value of PEFT's save_projection (a parameter's
 * flags are static data, so an option cannot switch them):
 *   vera        save_projection = true (PEFT's default): vera_A and vera_B
 *               are frozen buffers written into module files
 *               ("base_model.vera_A" / "base_model.vera_B" under PEFT names),
 *               so PEFT loads the very same projections;
 *   vera_regen  save_projection = false: they are regenerated from the
 *               module's saved seed on load (PR_PARAM_REGENERATE) and never
 *               written.  The seed is peftref's, not PEFT's
 *               projection_prng_key through torch's generator, so only
 *               peftref reproduces them.
 * Each declares the option save_projection with its own value as default
 * and refuses the other value at attach, naming the technique that has it.
 *
 * Saved for backward, per insertion: xa = x_dropped . A^T (rows, r), the
 * dropout mask bits and whether forward applied dropout.  Scratch:
 * x_dropped (rows, d_in), z (rows, r), u (rows, d_out), and bd (d_out, r)
 * for merge.
 *
 * Includes only <peftref/plugin.h> and libc/libm; the products go through
 * host->gemm and the dropout through the host's keyed masks. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include <peftref/ext/peft_config.h>
#include <peftref/plugin.h>

#include "peft/codecs.h"

PR_PLUGIN_EXPORT const pr_plugin *peftref_plugin_entry(const pr_entry_args *args);

enum { OPT_R, OPT_DROPOUT, OPT_D_INITIAL, OPT_SAVE_PROJECTION, N_OPTS };
enum { PARAM_A, PARAM_B, PARAM_LD, PARAM_LB, N_PARAMS };
enum { SAVED_XA, SAVED_MASK, SAVED_DROPOUT_ON, N_SAVED };
enum { SCRATCH_XD, SCRATCH_Z, SCRATCH_U, SCRATCH_BD, N_SCRATCH };

#define VERA_OPTIONS(SAVE_DEF, SAVE_HELP)                                                                     \
    {                                                                                                         \
        [OPT_R] = {                                                                                           \
            .struct_size = sizeof(pr_option_decl), .name = "r", .type = PR_OPT_INT,                           \
            .def = 256, .min = 1, .max = 16384, .per_site = 0,                                                \
            .help = "rank of the shared random projections; default 256 as Hugging Face PEFT's "             \
                    "VeraConfig r (one value for the module: vera_A and vera_B are shared by every site)",   \
        },                                                                                                    \
        [OPT_DROPOUT] = {                                                                                     \
            .struct_size = sizeof(pr_option_decl), .name = "dropout", .peft_name = "vera_dropout",           \
            .type = PR_OPT_FLOAT, .def = 0, .min = 0, .max = 0.999, .per_site = 0,                            \
            .help = "dropout probability on the module input in training, in [0, 1); default 0 as "          \
                    "Hugging Face PEFT's vera_dropout",                                                       \
        },                                                                                                    \
        [OPT_D_INITIAL] = {                                                                                   \
            .struct_size = sizeof(pr_option_decl), .name = "d_initial", .type = PR_OPT_FLOAT,                 \
            .def = 0.1, .min = -1e6, .max = 1e6, .per_site = 1,                                               \
            .help = "initial value of every element of vera_lambda_d; default 0.1 as Hugging Face "          \
                    "PEFT's d_initial",                                                                       \
        },                                                                                                    \
        [OPT_SAVE_PROJECTION] = {                                                                             \
            .struct_size = sizeof(pr_option_decl), .name = "save_projection", .type = PR_OPT_BOOL,            \
            .def = SAVE_DEF, .per_site = 0, .help = SAVE_HELP,                                                \
        },                                                                                                    \
    }

static const pr_option_decl vera_options[N_OPTS] = VERA_OPTIONS(
    1, "Hugging Face PEFT's save_projection: technique vera writes vera_A and vera_B into module files "
       "(true, PEFT's default); for false use technique vera_regen");
static const pr_option_decl vera_regen_options[N_OPTS] = VERA_OPTIONS(
    0, "Hugging Face PEFT's save_projection: technique vera_regen never writes vera_A and vera_B and "
       "regenerates them from the module's seed on load (false); for true use technique vera");

#define VERA_PARAMS(AB_FLAGS)                                                                                 \
    {                                                                                                         \
        [PARAM_A] = {                                                                                         \
            .struct_size = sizeof(pr_param_decl), .name = "vera_A", .shape = "r, max_d_in",                   \
            .init = PR_INIT_KAIMING_UNIFORM, .init_arg = "0", .scope = PR_SCOPE_GLOBAL,                       \
            .flags = AB_FLAGS, .peft_key = "base_model.vera_A", .peft_layout = PR_PEFT_AS_IS,                 \
            .help = "frozen random down projection shared by every insertion; uniform(-b, b), "              \
                    "b = sqrt(6 / max_d_in), as Hugging Face PEFT's _kaiming_init",                           \
        },                                                                                                    \
        [PARAM_B] = {                                                                                         \
            .struct_size = sizeof(pr_param_decl), .name = "vera_B", .shape = "max_d_out, r",                  \
            .init = PR_INIT_KAIMING_UNIFORM, .init_arg = "0", .scope = PR_SCOPE_GLOBAL,                       \
            .flags = AB_FLAGS, .peft_key = "base_model.vera_B", .peft_layout = PR_PEFT_AS_IS,                 \
            .help = "frozen random up projection shared by every insertion; uniform(-b, b), "                \
                    "b = sqrt(6 / r), as Hugging Face PEFT's _kaiming_init",                                  \
        },                                                                                                    \
        [PARAM_LD] = {                                                                                        \
            .struct_size = sizeof(pr_param_decl), .name = "vera_lambda_d", .shape = "r",                      \
            .init = PR_INIT_CONSTANT, .init_arg = "d_initial", .scope = PR_SCOPE_INSERTION,                   \
            .peft_key = "{prefix}.vera_lambda_d", .peft_layout = PR_PEFT_AS_IS,                               \
            .help = "trained scaling of the r hidden units; every element d_initial",                        \
        },                                                                                                    \
        [PARAM_LB] = {                                                                                        \
            .struct_size = sizeof(pr_param_decl), .name = "vera_lambda_b", .shape = "d_out",                  \
            .init = PR_INIT_ZEROS, .scope = PR_SCOPE_INSERTION,                                               \
            .peft_key = "{prefix}.vera_lambda_b", .peft_layout = PR_PEFT_AS_IS,                               \
            .help = "trained scaling of the d_out outputs; zeros, so the module starts as the identity",     \
        },                                                                                                    \
    }

static const pr_param_decl vera_params[N_PARAMS] = VERA_PARAMS(PR_PARAM_FROZEN);
static const pr_param_decl vera_regen_params[N_PARAMS] = VERA_PARAMS(PR_PARAM_FROZEN | PR_PARAM_REGENERATE);

static const pr_buffer_decl vera_saved[N_SAVED] = {
    [SAVED_XA] = { .struct_size = sizeof(pr_buffer_decl), .name = "xa", .shape = "rows, r" },
    [SAVED_MASK] = { .struct_size = sizeof(pr_buffer_decl), .name = "dropout_mask",
                     .shape = "rows, (d_in + 31) / 32" },
    [SAVED_DROPOUT_ON] = { .struct_size = sizeof(pr_buffer_decl), .name = "dropout_on", .shape = "1" },
};

static const pr_buffer_decl vera_scratch[N_SCRATCH] = {
    [SCRATCH_XD] = { .struct_size = sizeof(pr_buffer_decl), .name = "x_dropped", .shape = "rows, d_in" },
    [SCRATCH_Z] = { .struct_size = sizeof(pr_buffer_decl), .name = "z", .shape = "rows, r" },
    [SCRATCH_U] = { .struct_size = sizeof(pr_buffer_decl), .name = "u", .shape = "rows, d_out" },
    [SCRATCH_BD] = { .struct_size = sizeof(pr_buffer_decl), .name = "bd", .shape = "d_out, r" },
};

static int row_stride(const pr_tensor *t)
{
    return (int)(t->stride[0] ? t->stride[0] : t->shape[1]);
}

/* The shapes of one call.  lda is vera_A's row length (max_d_in): the
 * slice A[:, :d_in] is a strided view of it; B[:d_out] is its first rows. */
typedef struct vera_dims {
    int r, d_in, d_out, lda, rows;
    const float *A, *B, *ld, *lb;
} vera_dims;

static int vera_get_dims(const pr_ctx *ctx, vera_dims *d)
{
    if (ctx->n_params < N_PARAMS || ctx->n_options < N_OPTS)
        return ctx->host->error(ctx, "vera: expected %d parameters and %d options, got %u and %u", N_PARAMS,
                                N_OPTS, ctx->n_params, ctx->n_options);
    const pr_tensor *a = ctx->params[PARAM_A], *b = ctx->params[PARAM_B];
    const pr_tensor *ld = ctx->params[PARAM_LD], *lb = ctx->params[PARAM_LB];
    if (a->ndim != 2 || b->ndim != 2 || ld->ndim != 1 || lb->ndim != 1 || !a->data || !b->data || !ld->data ||
        !lb->data)
        return ctx->host->error(ctx, "vera: vera_A, vera_B must be 2-D and vera_lambda_d, vera_lambda_b 1-D");
    d->r = (int)a->shape[0];
    d->lda = (int)a->shape[1];
    d->d_out = (int)lb->shape[0];
    d->d_in = ctx->dims ? ctx->dims->d_in : 0;
    d->rows = ctx->rows;
    if (b->shape[1] != d->r || ld->shape[0] != d->r || d->d_in < 1 || d->d_in > d->lda || d->d_out > b->shape[0])
        return ctx->host->error(ctx,
                                "vera: the site (%d -> %d) does not fit vera_A (%d, %d), vera_B (%lld, %lld) and "
                                "vera_lambda_d (%lld)",
                                d->d_in, d->d_out, d->r, d->lda, (long long)b->shape[0], (long long)b->shape[1],
                                (long long)ld->shape[0]);
    d->A = a->data;
    d->B = b->data;
    d->ld = ld->data;
    d->lb = lb->data;
    return 0;
}

static int vera_check_call(const pr_ctx *ctx, const vera_dims *d)
{
    if (ctx->n_saved < N_SAVED || ctx->n_scratch < N_SCRATCH)
        return ctx->host->error(ctx, "vera: expected %d saved and %d scratch buffers, got %u and %u", N_SAVED,
                                N_SCRATCH, ctx->n_saved, ctx->n_scratch);
    for (int i = 0; i < N_SAVED; i++)
        if (!ctx->saved[i]->data)
            return ctx->host->error(ctx, "vera: saved buffer '%s' is missing", vera_saved[i].name);
    if (!ctx->scratch[SCRATCH_Z]->data || !ctx->scratch[SCRATCH_U]->data)
        return ctx->host->error(ctx, "vera: scratch buffers 'z' and 'u' are missing");
    if (ctx->saved[SAVED_XA]->shape[0] < d->rows)
        return ctx->host->error(ctx, "vera: saved buffer 'xa' holds %lld rows, the call has %d",
                                (long long)ctx->saved[SAVED_XA]->shape[0], d->rows);
    if (!ctx->in->data || ctx->in->shape[1] != d->d_in)
        return ctx->host->error(ctx, "vera: the module input must be (rows, %d)", d->d_in);
    return 0;
}

/* z (rows, r) = xa * lambda_d, column-wise */
static void scale_cols(float *z, const float *xa, const float *v, int rows, int cols)
{
    for (int i = 0; i < rows; i++)
        for (int k = 0; k < cols; k++)
            z[(size_t)i * cols + k] = xa[(size_t)i * cols + k] * v[k];
}

/* forward: in = x (rows, d_in) -> out = h (rows, d_out), unscaled. */
static int vera_forward(const pr_ctx *ctx)
{
    const pr_host *host = ctx->host;
    vera_dims d;
    int rc = vera_get_dims(ctx, &d);
    if (rc || (rc = vera_check_call(ctx, &d)))
        return rc;
    if (!ctx->out->data || ctx->out->shape[1] != d.d_out)
        return host->error(ctx, "vera: forward needs an output of (rows, %d)", d.d_out);

    const float p = (float)ctx->options[OPT_DROPOUT].num;
    const int drop = ctx->training && p > 0.0f;
    ((float *)ctx->saved[SAVED_DROPOUT_ON]->data)[0] = drop ? 1.0f : 0.0f;
    const float *x = ctx->in->data;
    int ldx = row_stride(ctx->in);
    if (drop) {
        void *mask = ctx->saved[SAVED_MASK]->data;
        float *xd = ctx->scratch[SCRATCH_XD]->data;
        if (!xd)
            return host->error(ctx, "vera: scratch buffer 'x_dropped' is missing");
        host->dropout_mask(ctx, 0, p, d.d_in, mask);
        host->dropout_apply(xd, d.d_in, x, ldx, mask, d.rows, d.d_in, p);
        x = xd;
        ldx = d.d_in;
    }
    float *xa = ctx->saved[SAVED_XA]->data, *z = ctx->scratch[SCRATCH_Z]->data;
    /* xa (rows, r) = x . A[:, :d_in]^T */
    host->gemm(0, 1, d.rows, d.r, d.d_in, 1.0f, x, ldx, d.A, d.lda, 0.0f, xa, d.r);
    scale_cols(z, xa, d.ld, d.rows, d.r);
    /* u (rows, d_out) = z . B[:d_out]^T, then h = u * lambda_b */
    float *h = ctx->out->data;
    const int ldh = row_stride(ctx->out);
    host->gemm(0, 1, d.rows, d.d_out, d.r, 1.0f, z, d.r, d.B, d.r, 0.0f, h, ldh);
    for (int i = 0; i < d.rows; i++)
        for (int j = 0; j < d.d_out; j++)
            h[(size_t)i * ldh + j] *= d.lb[j];
    return 0;
}

/* backward: d_out = dh = s*dy.  With z = xa * lambda_d and u = z . B^T:
 *   d lambda_b += sum_rows dh * u
 *   du = dh * lambda_b;  dz = du . B[:d_out]
 *   d lambda_d += sum_rows dz * xa
 *   dx += mask((dz * lambda_d) . A[:, :d_in]) / (1 - p)
 * vera_A and vera_B are frozen: the host gives them no gradient. */
static int vera_backward(const pr_ctx *ctx)
{
    const pr_host *host = ctx->host;
    vera_dims d;
    int rc = vera_get_dims(ctx, &d);
    if (rc || (rc = vera_check_call(ctx, &d)))
        return rc;
    if (!ctx->d_out->data)
        return host->error(ctx, "vera: backward needs d_out");
    const float *dh = ctx->d_out->data;
    const int lddh = row_stride(ctx->d_out);
    const float *xa = ctx->saved[SAVED_XA]->data;
    float *z = ctx->scratch[SCRATCH_Z]->data, *u = ctx->scratch[SCRATCH_U]->data;
    float *dld = ctx->grads ? ctx->grads[PARAM_LD]->data : NULL;
    float *dlb = ctx->grads ? ctx->grads[PARAM_LB]->data : NULL;
    float *dx = ctx->d_in->data;

    if (dlb) {
        scale_cols(z, xa, d.ld, d.rows, d.r);
        host->gemm(0, 1, d.rows, d.d_out, d.r, 1.0f, z, d.r, d.B, d.r, 0.0f, u, d.d_out);
        for (int j = 0; j < d.d_out; j++) {
            double s = 0.0;
            for (int i = 0; i < d.rows; i++)
                s += (double)dh[(size_t)i * lddh + j] * u[(size_t)i * d.d_out + j];
            dlb[j] += (float)s;
        }
    }
    if (!dld && !dx)
        return 0;
    /* du (rows, d_out) = dh * lambda_b, into u; dz (rows, r) = du . B, into z */
    for (int i = 0; i < d.rows; i++)
        for (int j = 0; j < d.d_out; j++)
            u[(size_t)i * d.d_out + j] = dh[(size_t)i * lddh + j] * d.lb[j];
    host->gemm(0, 0, d.rows, d.r, d.d_out, 1.0f, u, d.d_out, d.B, d.r, 0.0f, z, d.r);
    if (dld)
        for (int k = 0; k < d.r; k++) {
            double s = 0.0;
            for (int i = 0; i < d.rows; i++)
                s += (double)z[(size_t)i * d.r + k] * xa[(size_t)i * d.r + k];
            dld[k] += (float)s;
        }
    if (!dx)
        return 0;
    /* d xa = dz * lambda_d, in place */
    for (int i = 0; i < d.rows; i++)
        for (int k = 0; k < d.r; k++)
            z[(size_t)i * d.r + k] *= d.ld[k];
    const int lddx = row_stride(ctx->d_in);
    const int drop = ((const float *)ctx->saved[SAVED_DROPOUT_ON]->data)[0] != 0.0f;
    if (!drop) {
        host->gemm(0, 0, d.rows, d.d_in, d.r, 1.0f, z, d.r, d.A, d.lda, 1.0f, dx, lddx);
        return 0;
    }
    float *xd = ctx->scratch[SCRATCH_XD]->data;
    if (!xd)
        return host->error(ctx, "vera: scratch buffer 'x_dropped' is missing");
    const float p = (float)ctx->options[OPT_DROPOUT].num;
    host->gemm(0, 0, d.rows, d.d_in, d.r, 1.0f, z, d.r, d.A, d.lda, 0.0f, xd, d.d_in);
    host->dropout_backward(dx, lddx, xd, d.d_in, ctx->saved[SAVED_MASK]->data, d.rows, d.d_in, p);
    return 0;
}

/* merge: out [d_in, d_out] = s * A[:, :d_in]^T . bd^T,
 * bd[j, k] = B[j, k] * lambda_d[k] * lambda_b[j]  (d_out, r). */
static int vera_merge(const pr_ctx *ctx)
{
    vera_dims d;
    int rc = vera_get_dims(ctx, &d);
    if (rc)
        return rc;
    if (!ctx->out->data || ctx->out->shape[0] != d.d_in || ctx->out->shape[1] != d.d_out)
        return ctx->host->error(ctx, "vera: merge output must be [%d, %d]", d.d_in, d.d_out);
    if (ctx->n_scratch < N_SCRATCH || !ctx->scratch[SCRATCH_BD]->data)
        return ctx->host->error(ctx, "vera: scratch buffer 'bd' is missing");
    float *bd = ctx->scratch[SCRATCH_BD]->data;
    for (int j = 0; j < d.d_out; j++)
        for (int k = 0; k < d.r; k++)
            bd[(size_t)j * d.r + k] = d.B[(size_t)j * d.r + k] * d.ld[k] * d.lb[j];
    ctx->host->gemm(1, 1, d.d_in, d.d_out, d.r, ctx->scale, d.A, d.lda, bd, d.r, 0.0f, ctx->out->data,
                    row_stride(ctx->out));
    return 0;
}

/* setup: a technique's save_projection is fixed by its declarations (the
 * flags of vera_A and vera_B); the other value names the other technique. */
static int check_save_projection(const pr_ctx *ctx, int regen)
{
    if (ctx->n_options < N_OPTS)
        return ctx->host->error(ctx, "vera: expected %d options, got %u", N_OPTS, ctx->n_options);
    const int save = ctx->options[OPT_SAVE_PROJECTION].num != 0;
    if (save == regen)
        return ctx->host->error(ctx,
                                "vera: save_projection = %s is technique %s (whether vera_A and vera_B are written "
                                "into module files is declared data, one technique per value)",
                                save ? "true" : "false", save ? "vera" : "vera_regen");
    return 0;
}

static int vera_setup(const pr_ctx *ctx)
{
    return check_save_projection(ctx, 0);
}

static int vera_regen_setup(const pr_ctx *ctx)
{
    return check_save_projection(ctx, 1);
}

#define VERA_SITES                                                                                            \
    (PR_SITE_BIT(PR_SITE_QKV) | PR_SITE_BIT(PR_SITE_Q) | PR_SITE_BIT(PR_SITE_K) | PR_SITE_BIT(PR_SITE_V) |    \
     PR_SITE_BIT(PR_SITE_O) | PR_SITE_BIT(PR_SITE_FFN_UP) | PR_SITE_BIT(PR_SITE_FFN_GATE) |                    \
     PR_SITE_BIT(PR_SITE_FFN_DOWN))

#define VERA_TECHNIQUE(NAME, SUMMARY, OPTIONS, PARAMS, SETUP, FORMULA, EXT)                                       \
    {                                                                                                         \
        .struct_size = sizeof(pr_technique), .abi_major = PR_ABI_MAJOR, .name = NAME, .version = "1.0.0",     \
        .summary = SUMMARY,                                                                                   \
        .citation = "Kopiczko, Blankevoort, Asano (2024). VeRA: Vector-based Random Matrix Adaptation. "     \
                    "ICLR 2024. arXiv:2310.11454",                                                            \
        .license = "MIT", .intra = PR_INTRA_FACTORISED, .inter = PR_INTER_FIXED,                              \
        .adaptation = PR_ADAPT_REPARAMETERISATION, .sharing = PR_SHARE_ACROSS_LAYERS,                         \
        .sharing_set = PR_SHARE_BIT(PR_SHARE_ACROSS_LAYERS) | PR_SHARE_BIT(PR_SHARE_ACROSS_SITES),            \
        .input = PR_INPUT_HIDDEN, .insertion = PR_INSERT_PARALLEL, .insertions = PR_INSERTIONS_PER_SITE_LAYER, \
        .integration = PR_INTEGRATE_SCALED_ADD, .workspace = PR_WS_ATTENTION | PR_WS_FFN, .options = OPTIONS,  \
        .n_options = N_OPTS, .sites = VERA_SITES, .default_sites = PR_SITE_BIT(PR_SITE_QKV),                   \
        .default_sites_llama = PR_SITE_BIT(PR_SITE_Q) | PR_SITE_BIT(PR_SITE_V), .params = PARAMS,             \
        .n_params = N_PARAMS, .saved = vera_saved, .n_saved = N_SAVED, .scratch = vera_scratch,                \
        .n_scratch = N_SCRATCH, .scale_expr = "1", .param_formula = FORMULA,                                  \
        .flops_per_token = "2 * r * (d_in + d_out) + r + d_out", .forward = vera_forward,                     \
        .backward = vera_backward, .merge = vera_merge, .setup = SETUP, .peft_type = "VERA",                  \
        .extension_data = EXT,                                                                                \
    }

/* vera_regen's A and B come from peftref's seed, not from PEFT's
 * projection_prng_key, so a PEFT VERA adapter is never read as it. */
static const pr_ext_peft_config vera_regen_peft = { .struct_size = sizeof(pr_ext_peft_config), .no_import = 1,
                                                     .write = peft_write_vera };

static const void *vera_regen_extension(const char *uri)
{
    return strcmp(uri, PR_EXT_PEFT_CONFIG_URI) ? NULL : &vera_regen_peft;
}

static const pr_ext_peft_config vera_peft = { .struct_size = sizeof(pr_ext_peft_config), .read = peft_read_vera,
                                              .write = peft_write_vera };

static const void *vera_extension(const char *uri)
{
    return strcmp(uri, PR_EXT_PEFT_CONFIG_URI) ? NULL : &vera_peft;
}

static const pr_technique vera_technique = VERA_TECHNIQUE(
    "vera",
    "One pair of frozen random matrices A, B shared by every layer and site; each insertion trains "
    "two vectors: y += lambda_b * (B (lambda_d * (A x))). A and B are saved with the module "
    "(PEFT's save_projection = true). Default site qkv, PEFT's c_attn for GPT-2.",
    vera_options, vera_params, vera_setup,
    "trained per insertion: r + d_out (vera_lambda_d, vera_lambda_b); frozen, once for the module: "
    "r * (max_d_in + max_d_out) (vera_A, vera_B; saved); GPT-2 small, r = 256 at c_attn: "
    "12 * (256 + 2304) = 30,720 trained", vera_extension);

static const pr_technique vera_regen_technique = VERA_TECHNIQUE(
    "vera_regen",
    "VeRA with PEFT's save_projection = false: the shared frozen A and B are regenerated from the "
    "module's seed on load and never written; each insertion trains lambda_d and lambda_b.",
    vera_regen_options, vera_regen_params, vera_regen_setup,
    "trained per insertion: r + d_out (vera_lambda_d, vera_lambda_b); frozen, once for the module: "
    "r * (max_d_in + max_d_out) (vera_A, vera_B; regenerated from the seed, not saved)", vera_regen_extension);

static const pr_technique *const vera_techniques[] = { &vera_technique, &vera_regen_technique };

static const pr_plugin vera_plugin = {
    .struct_size = sizeof(pr_plugin),
    .abi_major = PR_ABI_MAJOR,
    .name = "vera",
    .version = "1.0.0",
    .n_techniques = 2,
    .techniques = vera_techniques,
};

PR_PLUGIN_EXPORT const pr_plugin *peftref_plugin_entry(const pr_entry_args *args)
{
    (void)args;
    return &vera_plugin;
}
