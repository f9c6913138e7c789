/* Tests of plugins/p_tuning.c (Liu et al. 2021, PEFT's P_TUNING with the
 * MLP prompt encoder) and plugins/trainable_tokens.c (PEFT's
 * TRAINABLE_TOKENS), loaded with dlopen from the build tree.
 *
 *  - descriptors: typology, options, fold fields equal to prompt_tuning's
 *    declaration of 'prompt';
 *  - parameter counts at GPT-2 small with PEFT's defaults (derivations at
 *    test_counts_gpt2_small);
 *  - p_tuning's virtual tokens equal the MLP formula computed here in double
 *    from its parameters (forward and fold, called directly);
 *  - the module saved (folded) loads as prompt_tuning and gives a
 *    bit-identical loss;
 *  - trainable_tokens, called directly with a test host serving the
 *    extension urn:peftref:ext:embed-tokens:1 from test data: its
 *    callbacks replace exactly the chosen rows, start as the identity, and
 *    an SGD step changes only those rows of the effective token table (on
 *    the real host and model: tests/test_tech_tokens.c);
 *  - the conformance checker on p_tuning. */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <dlfcn.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "peftref/peftref.h"
#include "peftref/module.h"
#include "peftref/plugin.h"
#include "peftref/ext/embed_tokens.h"
#include "check.h"
#include "gradcheck.h"
#include "harness.h"

#define PLUGIN_DIR TEST_BUILDDIR "/plugins/.libs"
#define PTUNE_SO PLUGIN_DIR "/p_tuning.so"
#define TT_SO PLUGIN_DIR "/trainable_tokens.so"
#define PROMPT_SO PLUGIN_DIR "/prompt_tuning.so"

static void *ptune_so, *tt_so, *prompt_so;
static const pr_technique *ptune, *tt, *prompt;

static int setup_plugins(void **state)
{
    (void)state;
    const pr_plugin *a = th_plugin_open(PTUNE_SO, &ptune_so);
    const pr_plugin *b = th_plugin_open(TT_SO, &tt_so);
    const pr_plugin *c = th_plugin_open(PROMPT_SO, &prompt_so);
    if (!a || !b || !c)
        return -1;
    ptune = a->techniques[0];
    tt = b->techniques[0];
    prompt = c->techniques[0];
    return strcmp(ptune->name, "p_tuning") || strcmp(tt->name, "trainable_tokens") ||
           strcmp(prompt->name, "prompt_tuning");
}

static int teardown_plugins(void **state)
{
    (void)state;
    if (ptune_so)
        dlclose(ptune_so);
    if (tt_so)
        dlclose(tt_so);
    if (prompt_so)
        dlclose(prompt_so);
    return 0;
}

enum { MB = 2, MT = 6, MV = 64, MC = 32 };

static pr_model_config tiny(void)
{
    return th_config(&(th_shape){ 2, MC, 4, 4, 8, 128, MV, 32 }, 7);
}

/* ---- descriptors ------------------------------------------------------------------------------- */

static void test_descriptors(void **state)
{
    (void)state;
    pr_error err = { 0 };
    if (pr_technique_validate(ptune, &err) || pr_technique_validate(tt, &err))
        fail_msg("validate: %s", err.msg);
    const pr_technique *t = ptune;
    assert_non_null(strstr(t->citation, "2103.10385"));
    assert_int_equal(t->intra, PR_INTRA_DENSE);
    assert_int_equal(t->inter, PR_INTER_DYNAMIC);
    assert_int_equal(t->adaptation, PR_ADAPT_ADDITION);
    assert_int_equal(t->input, PR_INPUT_EMBEDDINGS);
    assert_int_equal(t->insertion, PR_INSERT_CONCATENATIVE);
    assert_int_equal(t->insertions, PR_INSERTIONS_ONCE);
    assert_int_equal(t->integration, PR_INTEGRATE_CONCAT);
    assert_int_equal(t->sites, PR_SITE_BIT(PR_SITE_EMBED));
    assert_string_equal(t->peft_type, "P_TUNING");
    assert_string_equal(t->folds_to, "prompt_tuning");
    const pr_option_decl *o;
    assert_non_null(o = th_option(t, "n_tokens"));
    assert_true(o->def == 20 && !strcmp(o->peft_name, "num_virtual_tokens"));
    assert_non_null(o = th_option(t, "encoder_hidden_size"));
    assert_true(o->def == 0 && o->min == 0);
    assert_non_null(o = th_option(t, "encoder_reparameterization_type"));
    assert_string_equal(o->choices[(int)o->def], "MLP");
    /* every option of prompt_tuning exists here: the folded file loads as it */
    for (uint32_t i = 0; i < prompt->n_options; i++)
        assert_non_null(th_option(t, prompt->options[i].name));
    const char *names[] = { "embedding",         "mlp_head_0_weight", "mlp_head_0_bias", "mlp_head_2_weight",
                            "mlp_head_2_bias",   "mlp_head_4_weight", "mlp_head_4_bias" };
    assert_int_equal(t->n_params, 7);
    for (int i = 0; i < 7; i++) {
        assert_string_equal(t->params[i].name, names[i]);
        assert_int_equal(t->params[i].scope, PR_SCOPE_GLOBAL);
        assert_true(t->params[i].flags & PR_PARAM_TRAINING_ONLY);
    }
    assert_int_equal(t->n_fold_params, 1);
    assert_int_equal(prompt->n_params, 1);
    assert_string_equal(t->fold_params[0].name, prompt->params[0].name);
    assert_string_equal(t->fold_params[0].shape, prompt->params[0].shape);
    assert_int_equal(t->fold_params[0].scope, prompt->params[0].scope);
    assert_string_equal(t->fold_params[0].peft_key, prompt->params[0].peft_key);

    t = tt;
    assert_string_equal(t->peft_type, "TRAINABLE_TOKENS");
    assert_int_equal(t->integration, PR_INTEGRATE_CUSTOM);
    assert_int_equal(t->insertion, PR_INSERT_IN_PLACE);
    assert_int_equal(t->workspace, PR_WS_EMBEDDING);
    assert_non_null(o = th_option(t, "token_indices"));
    assert_int_equal(o->type, PR_OPT_STRING);
    assert_non_null(o = th_option(t, "init_weights"));
    assert_true(o->type == PR_OPT_BOOL && o->def == 1);
    assert_string_equal(t->params[0].name, "trainable_tokens_delta");
    assert_null(dlsym(ptune_so, "pt_forward"));
    assert_null(dlsym(tt_so, "tt_init"));
}

/* ---- counts ------------------------------------------------------------------------------------ */

static int64_t plan_count(const pr_model_config *c, const pr_technique *t, const pr_option_setting *o, int no,
                          int *ins)
{
    pr_module_spec spec = { .technique = t, .options = o, .n_options = no, .trainable = 1, .seed = 1 };
    pr_module_plan plan;
    pr_error err = { 0 };
    if (pr_module_plan_for(c, &spec, &plan, &err))
        fail_msg("plan %s: %s", t->name, err.msg);
    assert_int_equal(plan.params, plan.trainable);
    *ins = plan.insertions;
    return plan.trainable;
}

/* GPT-2 small (d = 768), PEFT's defaults.
 *
 * p_tuning, num_virtual_tokens = 20, encoder_hidden_size = None -> token_dim
 * = 768 (peft/utils/other.py _prepare_prompt_learning_config), MLP:
 * PromptEncoder = embedding Embedding(20, 768) + mlp_head Sequential(
 * Linear(768, 768), ReLU, Linear(768, 768), ReLU, Linear(768, 768)):
 *     20 * 768 + 3 * (768 * 768 + 768) = 15,360 + 3 * 590,592 = 1,787,136
 * trainable (print_trainable_parameters counts the prompt encoder).  Saved
 * after fold (PEFT's prompt_embeddings): 20 * 768 = 15,360.
 *
 * trainable_tokens, token_indices of 3 ids: trainable_tokens_delta (3, 768)
 * = 2,304 (the embedding and its trainable_tokens_original buffer frozen). */
static void test_counts_gpt2_small(void **state)
{
    (void)state;
    pr_model_config c;
    assert_int_equal(pr_config_preset("gpt2-small", &c), PR_OK);
    assert_int_equal(c.d_model, 768);
    int ins = 0;
    assert_int_equal(plan_count(&c, ptune, NULL, 0, &ins), 1787136);
    assert_int_equal(ins, 1);
    const pr_option_setting o20[] = { { "n_tokens", "20", -1 }, { "encoder_hidden_size", "768", -1 } };
    assert_int_equal(plan_count(&c, ptune, o20, 2, &ins), 20 * 768 + 3 * (768 * 768 + 768));
    /* h = 128: 20*768 + (768*128 + 128) + (128*128 + 128) + (128*768 + 768) */
    const pr_option_setting o128[] = { { "encoder_hidden_size", "128", -1 } };
    assert_int_equal(plan_count(&c, ptune, o128, 1, &ins),
                     20 * 768 + (768 * 128 + 128) + (128 * 128 + 128) + (128 * 768 + 768));
    const pr_option_setting t3[] = { { "token_indices", "50256, 17, 42", -1 }, { "n_token_indices", "3", -1 } };
    assert_int_equal(plan_count(&c, tt, t3, 2, &ins), 3 * 768);
    assert_int_equal(ins, 1);
}

/* ---- p_tuning: the MLP formula ----------------------------------------------------------------- */

/* out (n, d) = relu(relu(E W0^T + b0) W2^T + b2) W4^T + b4, in double */
static void mlp_ref(const float *const *p, int n, int d, int h, double *out)
{
    double *h1 = calloc((size_t)n * h, sizeof *h1), *h2 = calloc((size_t)n * h, sizeof *h2);
    assert_non_null(h1);
    assert_non_null(h2);
    for (int i = 0; i < n; i++)
        for (int j = 0; j < h; j++) {
            double s = p[2][j];
            for (int k = 0; k < d; k++)
                s += (double)p[0][i * d + k] * p[1][j * d + k];
            h1[i * h + j] = s > 0 ? s : 0;
        }
    for (int i = 0; i < n; i++)
        for (int j = 0; j < h; j++) {
            double s = p[4][j];
            for (int k = 0; k < h; k++)
                s += h1[i * h + k] * p[3][j * h + k];
            h2[i * h + j] = s > 0 ? s : 0;
        }
    for (int i = 0; i < n; i++)
        for (int j = 0; j < d; j++) {
            double s = p[6][j];
            for (int k = 0; k < h; k++)
                s += h2[i * h + k] * p[5][j * h + k];
            out[i * d + j] = s;
        }
    free(h1);
    free(h2);
}

static void test_ptune_formula(void **state)
{
    (void)state;
    pr_model_config c = tiny();
    pr_model *m = NULL;
    pr_error err = { 0 };
    if (pr_model_create(&c, &m, &err))
        fail_msg("model: %s", err.msg);
    const int n = 3, h = 8, d = MC;
    const pr_option_setting o[] = { { "n_tokens", "3", -1 }, { "encoder_hidden_size", "8", -1 } };
    pr_module_spec s = { .technique = ptune, .name = "pt", .options = o, .n_options = 2, .trainable = 1, .seed = 4 };
    th_attach(m, &s);
    const char *names[] = { "embedding",       "mlp_head_0_weight", "mlp_head_0_bias", "mlp_head_2_weight",
                            "mlp_head_2_bias", "mlp_head_4_weight", "mlp_head_4_bias" };
    th_ctx t;
    pr_ctx *cx = th_ctx_init(&t);
    const float *p[7];
    for (int i = 0; i < 7; i++) {
        char nm[64];
        snprintf(nm, sizeof nm, "pt/%s", names[i]);
        const pr_tensor_info *ti = pr_model_find_tensor(m, nm);
        assert_non_null(ti);
        gc_fill(ti->data, (size_t)ti->numel, 50u + (unsigned)i, 0.6f);
        t.params[i] = th_view(ti->data, ti->ndim, ti->shape);
        p[i] = ti->data;
    }
    double *want = calloc((size_t)n * d, sizeof *want);
    float *out = calloc((size_t)n * d, sizeof *out), *folded = calloc((size_t)n * d, sizeof *folded);
    float *h1 = calloc((size_t)n * h, sizeof *h1), *h2 = calloc((size_t)n * h, sizeof *h2);
    assert_true(want && out && folded && h1 && h2);
    mlp_ref(p, n, d, h, want);
    /* some hidden units must be cut by the ReLUs, or the test would not see them */
    pr_dims dims = { .struct_size = sizeof(pr_dims), .d_model = d, .n_heads = 4, .n_kv_heads = 4, .d_head = 8,
                     .d_ff = 128, .n_layers = 2, .vocab = MV, .d_in = d, .d_out = d, .family = PR_FAMILY_GPT2 };
    cx->technique = ptune;
    cx->dims = &dims;
    cx->site = PR_SITE_EMBED;
    cx->layer = -1;
    cx->n_params = 7;
    t.out = th_view2(out, n, d, d);
    t.saved[0] = th_view2(h1, n, h, h);
    t.saved[1] = th_view2(h2, n, h, h);
    cx->n_saved = 2;
    th_last_error[0] = 0;
    if (ptune->forward(cx))
        fail_msg("forward: %s", th_last_error);
    int cut = 0;
    for (int i = 0; i < n * h; i++)
        cut += h1[i] == 0.0f || h2[i] == 0.0f;
    assert_true(cut > 0 && cut < n * h);
    const int64_t shp[2] = { n, d };
    t.out_params[0] = th_view(folded, 2, shp);
    cx->n_out_params = 1;
    if (ptune->fold(cx))
        fail_msg("fold: %s", th_last_error);
    double worst = 0, big = 0;
    for (int i = 0; i < n * d; i++) {
        worst = fmax(worst, fabs(out[i] - want[i]));
        big = fmax(big, fabs(want[i]));
    }
    printf("p_tuning: max |virtual token - MLP formula| = %.3e (max |value| %.3e)\n", worst, big);
    assert_true(big > 0.1);
    assert_true(worst <= 1e-5 * big);
    assert_memory_equal(out, folded, (size_t)n * d * sizeof(float)); /* fold writes what forward writes */
    free(want);
    free(out);
    free(folded);
    free(h1);
    free(h2);
    pr_model_free(m);
}

/* ---- p_tuning: the folded module is a prompt_tuning module --------------------------------------- */

static void test_ptune_fold_loads_as_prompt(void **state)
{
    (void)state;
    pr_registry *reg = NULL;
    pr_error err = { 0 };
    if (pr_registry_open(PLUGIN_DIR, &reg, &err))
        fail_msg("registry: %s", err.msg);
    const pr_technique *pt = pr_registry_find(reg, "p_tuning");
    assert_non_null(pt);
    pr_model_config c = tiny();
    pr_model *m = NULL, *m2 = NULL;
    if (pr_model_create(&c, &m, &err) || pr_model_reserve(m, MB, MT, &err))
        fail_msg("model: %s", err.msg);
    const pr_option_setting o[] = { { "n_tokens", "4", -1 }, { "encoder_hidden_size", "16", -1 } };
    pr_module_spec s = { .technique = pt, .name = "pt", .options = o, .n_options = 2, .trainable = 1, .seed = 5 };
    pr_module *mod = th_attach(m, &s);
    for (int i = 0; i < pr_model_n_tensors(m); i++) {
        const pr_tensor_info *ti = pr_model_tensor(m, i);
        if (!strncmp(ti->name, "pt/", 3))
            gc_fill(ti->data, (size_t)ti->numel, 70u + (unsigned)i, 0.5f);
    }
    int tokens[MB * MT], targets[MB * MT];
    for (int i = 0; i < MB * MT; i++) {
        tokens[i] = (i * 17 + 5) % MV;
        targets[i] = (i * 29 + 3) % MV;
    }
    pr_batch b = { .tokens = tokens, .targets = targets, .B = MB, .T = MT };
    float la = 0, lb = 0;
    pr_model_set_training(m, 0);
    assert_int_equal(pr_model_forward(m, &b, &la, &err), PR_OK);

    char *dir = th_scratch_dir("peftref-ptune");
    char path[512];
    snprintf(path, sizeof path, "%s/pt.safetensors", dir);
    if (pr_module_save(mod, path, NULL, &err))
        fail_msg("save: %s", err.msg);
    pr_module_file *f = NULL;
    if (pr_module_file_open(path, reg, &f, &err))
        fail_msg("open: %s", err.msg);
    assert_string_equal(pr_module_file_meta(f, "folded"), "true");
    pr_module_spec fs;
    pr_module_file_spec(f, &fs);
    assert_string_equal(fs.technique->name, "prompt_tuning");
    pr_module_file_close(f);

    if (pr_model_create(&c, &m2, &err) || pr_model_reserve(m2, MB, MT, &err))
        fail_msg("model: %s", err.msg);
    pr_module_load_options lo = { .trainable = 0 };
    pr_module *loaded = NULL;
    if (pr_module_load(m2, path, reg, &lo, &loaded, &err))
        fail_msg("load: %s", err.msg);
    assert_string_equal(pr_module_technique(loaded)->name, "prompt_tuning");
    assert_int_equal(pr_module_param_count(loaded), 4 * MC);
    pr_model_set_training(m2, 0);
    assert_int_equal(pr_model_forward(m2, &b, &lb, &err), PR_OK);
    printf("p_tuning: loss %.9g; folded, loaded as prompt_tuning: %.9g\n", la, lb);
    assert_memory_equal(&la, &lb, sizeof la); /* bit-identical */
    unlink(path);
    th_scratch_dir_free(dir);
    pr_model_free(m);
    pr_model_free(m2);
    pr_registry_free(reg);
}

/* ---- trainable_tokens -------------------------------------------------------------------------- */

/* The extension the plugin asks for, served from test data. */
static float E[MV * MC];
static int32_t row_ids[MB * MT];

static int ext_ids(const pr_ctx *ctx, int32_t *ids)
{
    memcpy(ids, row_ids, (size_t)ctx->rows * sizeof *ids);
    return 0;
}

static int ext_row(const pr_ctx *ctx, int64_t id, float *dst)
{
    (void)ctx;
    memcpy(dst, E + id * MC, MC * sizeof(float));
    return 0;
}

static const pr_ext_embed_tokens ext = { sizeof(pr_ext_embed_tokens), ext_ids, ext_row };

static const void *ext_data(const char *uri)
{
    return strcmp(uri, PR_EXT_EMBED_TOKENS_URI) ? NULL : &ext;
}

static void test_tt_rows(void **state)
{
    (void)state;
    enum { N = 3, R = MB * MT };
    const int64_t idx[N] = { 5, 17, 40 };
    gc_fill(E, MV * MC, 11u, 1.0f);
    for (int r = 0; r < R; r++)
        row_ids[r] = (int32_t)((r * 7) % MV);
    row_ids[1] = 5;
    row_ids[4] = 17;
    row_ids[9] = 5; /* token 40 not in the batch */
    row_ids[10] = -1; /* a virtual position */
    pr_host host = th_host;
    host.extension_data = ext_data;
    pr_option_value ov[3] = { { 0, "5, 17,40" }, { 3, NULL }, { 1, NULL } };
    pr_dims dims = { .struct_size = sizeof(pr_dims), .d_model = MC, .n_layers = 2, .vocab = MV, .d_in = MC,
                     .d_out = MC };
    float V[N * MC], G[N * MC] = { 0 }, orig[N * MC], idsbuf[R];
    th_ctx t;
    pr_ctx *c = th_ctx_init(&t);
    c->host = &host;
    c->dims = &dims;
    c->site = PR_SITE_EMBED;
    c->layer = -1;
    c->options = ov;
    c->n_options = 3;
    c->rows = R;
    c->B = MB;
    c->T = MT;
    c->n_params = 1;
    t.params[0] = th_view2(V, N, MC, MC);
    t.grads[0] = th_view2(G, N, MC, MC);
    t.scratch[0] = th_view2(orig, N, MC, MC);
    t.scratch[1] = th_view1(idsbuf, R);
    c->n_scratch = 2;
    th_last_error[0] = 0;
    if (tt->init(c))
        fail_msg("init: %s", th_last_error);
    for (int k = 0; k < N; k++) /* init_weights: the embedding's rows */
        assert_memory_equal(V + k * MC, E + idx[k] * MC, MC * sizeof(float));

    /* y = E[ids] + a position part; identity at init */
    float x[R * MC], y[R * MC];
    for (int r = 0; r < R; r++)
        for (int j = 0; j < MC; j++)
            x[r * MC + j] = (row_ids[r] >= 0 ? E[row_ids[r] * MC + j] : 0.0f) + 0.01f * (float)(r % MT);
    memcpy(y, x, sizeof y);
    t.in = th_view2(x, R, MC, MC);
    t.out = th_view2(y, R, MC, MC);
    if (tt->integrate_forward(c))
        fail_msg("forward: %s", th_last_error);
    assert_memory_equal(y, x, sizeof y);

    /* new row values: the rows holding a chosen token get them, the others not */
    gc_fill(V, N * MC, 12u, 1.0f);
    memcpy(y, x, sizeof y);
    if (tt->integrate_forward(c))
        fail_msg("forward: %s", th_last_error);
    for (int r = 0; r < R; r++) {
        int k = -1;
        for (int q = 0; q < N; q++)
            k = row_ids[r] == idx[q] ? q : k;
        for (int j = 0; j < MC; j++) {
            float want = k < 0 ? x[r * MC + j] : V[k * MC + j] + 0.01f * (float)(r % MT);
            assert_true(fabsf(y[r * MC + j] - want) <= 1e-6f);
        }
    }

    /* backward: row k of the gradient is the sum of dy over its rows; dy passes unchanged */
    float dy[R * MC], dy0[R * MC];
    gc_fill(dy, R * MC, 13u, 1.0f);
    memcpy(dy0, dy, sizeof dy);
    t.d_out = th_view2(dy, R, MC, MC);
    if (tt->integrate_backward(c))
        fail_msg("backward: %s", th_last_error);
    assert_memory_equal(dy, dy0, sizeof dy);
    for (int k = 0; k < N; k++)
        for (int j = 0; j < MC; j++) {
            double s = 0;
            for (int r = 0; r < R; r++)
                s += row_ids[r] == idx[k] ? dy0[r * MC + j] : 0.0;
            assert_true(fabs(G[k * MC + j] - s) <= 1e-6);
        }

    /* one SGD step: of the effective table (E with the chosen rows replaced
     * by V) only the chosen rows that occurred in the batch change */
    float before[MV * MC], after[MV * MC];
    memcpy(before, E, sizeof E);
    for (int k = 0; k < N; k++)
        memcpy(before + idx[k] * MC, V + k * MC, MC * sizeof(float));
    for (int i = 0; i < N * MC; i++)
        V[i] -= 0.1f * G[i];
    memcpy(after, E, sizeof E);
    for (int k = 0; k < N; k++)
        memcpy(after + idx[k] * MC, V + k * MC, MC * sizeof(float));
    for (int v = 0; v < MV; v++) {
        int changed = memcmp(before + v * MC, after + v * MC, MC * sizeof(float)) != 0;
        assert_int_equal(changed, v == 5 || v == 17);
    }

    /* a list that disagrees with n_token_indices, and an id outside the vocabulary */
    ov[0].str = "5, 17";
    assert_int_not_equal(tt->integrate_forward(c), 0);
    assert_non_null(strstr(th_last_error, "n_token_indices"));
    ov[0].str = "5, 17, 64";
    assert_int_not_equal(tt->integrate_forward(c), 0);
    assert_non_null(strstr(th_last_error, "vocabulary"));
}

/* ---- the conformance checker ------------------------------------------------------------------- */

static int run_check(const char *path, int *n_checks, int *n_failed, int quiet)
{
    check_options co = { 0 };
    FILE *out = tmpfile();
    assert_non_null(out);
    pr_error err = { 0 };
    int rc = check_plugin_file(path, &co, out, n_checks, n_failed, &err);
    rewind(out);
    char line[2048];
    while (fgets(line, sizeof line, out))
        if (!quiet && (rc || strncmp(line, "PASS", 4) != 0))
            fputs(line, stderr);
    if (rc)
        fprintf(stderr, "check: %s\n", err.msg);
    fclose(out);
    return rc;
}

static void test_conformance_ptune(void **state)
{
    (void)state;
    int n = 0, failed = 0;
    assert_int_equal(run_check(PTUNE_SO, &n, &failed, 0), PR_OK);
    assert_true(n >= 8);
    assert_int_equal(failed, 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_descriptors),
        cmocka_unit_test(test_counts_gpt2_small),
        cmocka_unit_test(test_ptune_formula),
        cmocka_unit_test(test_ptune_fold_loads_as_prompt),
        cmocka_unit_test(test_tt_rows),
        cmocka_unit_test(test_conformance_ptune),
    };
    return cmocka_run_group_tests(tests, setup_plugins, teardown_plugins);
}
