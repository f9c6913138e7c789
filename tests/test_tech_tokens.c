/* Tests of plugins/trainable_tokens.c (Hugging Face PEFT's TRAINABLE_TOKENS)
 * on the real host and model, through the host extension
 * urn:peftref:ext:embed-tokens:1 (peftref/ext/embed_tokens.h).
 *
 *  - the host serves the extension, and its services refuse calls that
 *    have no token ids (outside the embed site's hooks);
 *  - forward: what leaves the embed site equals E' [token] + wpe [t],
 *    E' the token table with the chosen rows replaced by the module's,
 *    computed here from the model's tensors; with prompt-tuning rows
 *    prepended those virtual rows (token id -1) are left alone even when
 *    token 0 is chosen;
 *  - identity at init (init_weights = true): bit-identical logits;
 *  - the gradient of trainable_tokens_delta by finite differences, zero
 *    for a chosen token absent from the batch;
 *  - parameter count at GPT-2 small: n_token_indices * d_model;
 *  - end to end: `peftref train` on a tiny byte-level pipeline lowers the
 *    validation loss, saves exactly the n rows as trainable_tokens_delta,
 *    the rows changed while sequences without a chosen token give the
 *    base model's logits, and reloading the saved module reproduces the
 *    final validation loss; `peftref eval` and `peftref generate` run it;
 *  - the conformance checker (check_plugin_file). */
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
#include "peftref/pipeline.h"
#include "peftref/plugin.h"
#include "peftref/ext/embed_tokens.h"
#include "check.h"
#include "gradcheck.h"
#include "harness.h"
#include "host.h"

#define PLUGIN_DIR TEST_BUILDDIR "/plugins/.libs"
#define TT_SO PLUGIN_DIR "/trainable_tokens.so"
#define PROMPT_SO PLUGIN_DIR "/prompt_tuning.so"
#define CORPUS TEST_SRCDIR "/data/train/corpus.txt"

static void *tt_so, *prompt_so;
static const pr_technique *tt, *prompt;

static int setup_plugins(void **state)
{
    (void)state;
    tt = th_plugin_technique(TT_SO, &tt_so);
    prompt = th_plugin_technique(PROMPT_SO, &prompt_so);
    return !tt || !prompt || strcmp(tt->name, "trainable_tokens") || strcmp(prompt->name, "prompt_tuning");
}

static int teardown_plugins(void **state)
{
    (void)state;
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

static pr_module *attach_tt(pr_model *m, const char *ids, const char *n, const char *init_weights)
{
    const pr_option_setting o[] = { { "token_indices", ids, -1 }, { "n_token_indices", n, -1 },
                                    { "init_weights", init_weights, -1 } };
    pr_module_spec s = { .technique = tt, .options = o, .n_options = 3, .trainable = 1, .seed = 5 };
    return th_attach(m, &s);
}

static const float *param_data(const pr_module *mod, const char *param, int64_t *shape)
{
    for (int i = 0; i < pr_module_n_params(mod); i++) {
        pr_module_param p;
        assert_int_equal(pr_module_param_at(mod, i, &p), PR_OK);
        if (!strcmp(p.param, param)) {
            if (shape)
                memcpy(shape, p.shape, sizeof p.shape);
            return p.data;
        }
    }
    fail_msg("no parameter '%s'", param);
    return NULL;
}

/* ---- the extension on the host ------------------------------------------------------------------ */

static void test_extension_served(void **state)
{
    (void)state;
    const pr_host *h = host_services();
    assert_null(h->extension_data("urn:peftref:ext:no-such-thing:1"));
    const pr_ext_embed_tokens *e = h->extension_data(PR_EXT_EMBED_TOKENS_URI);
    assert_non_null(e);
    assert_true(e->struct_size >= sizeof(pr_ext_embed_tokens));
    assert_non_null(e->token_ids);
    assert_non_null(e->token_row_f32);
    /* a context that is no call in progress: no ids, no rows */
    pr_ctx c = { .struct_size = sizeof c, .site = PR_SITE_EMBED, .rows = 4 };
    int32_t ids[4] = { 7, 7, 7, 7 };
    float row[MC];
    assert_int_not_equal(e->token_ids(&c, ids), 0);
    assert_int_equal(ids[0], 7);
    assert_int_not_equal(e->token_row_f32(&c, 0, row), 0);
}

/* ---- forward: exactly the chosen rows replaced ---------------------------------------------------- */

/* A hook attached after the modules: copies what leaves the embed site. */
typedef struct probe {
    float y[MB * 40 * MC];
    int rows, T, calls;
} probe;

static int probe_forward(void *self, const pr_site_io *io, pr_error *err)
{
    (void)err;
    probe *p = self;
    assert_true(io->rows * io->y_dim <= (int)(sizeof p->y / sizeof p->y[0]));
    for (int r = 0; r < io->rows; r++)
        memcpy(p->y + (size_t)r * io->y_dim, io->y + (size_t)r * io->y_ld, (size_t)io->y_dim * sizeof(float));
    p->rows = io->rows;
    p->T = io->T;
    p->calls++;
    return PR_OK;
}

static int probe_backward(void *self, const pr_site_io *io, pr_error *err)
{
    (void)self, (void)io, (void)err;
    return PR_OK;
}

static void attach_probe(pr_model *m, probe *p)
{
    pr_error err = { 0 };
    pr_site_hook h = { probe_forward, probe_backward, p, NULL };
    if (pr_model_attach_hook(m, PR_SITE_EMBED, -1, &h, &err))
        fail_msg("probe: %s", err.msg);
}

static const int toks[MB * MT] = { 5, 9, 17, 5, 0, 33, 17, 2, 61, 5, 0, 12 };

/* y[b, t] = E'[tok] + wpe[t], E' = wte with rows idx[k] replaced by V[k];
 * nv virtual rows first, each vrow[p] + wpe[p] */
static void check_rows(const pr_model *m, const probe *p, const int64_t *idx, int n, const float *V, int nv,
                       const float *vrow)
{
    const float *wte = pr_model_find_tensor(m, "wte.weight")->data;
    const float *wpe = pr_model_find_tensor(m, "wpe.weight")->data;
    const int T = nv + MT;
    assert_int_equal(p->T, T);
    assert_int_equal(p->rows, MB * T);
    double worst = 0;
    int replaced = 0;
    for (int b = 0; b < MB; b++)
        for (int t = 0; t < T; t++) {
            const float *row;
            if (t < nv) {
                row = vrow + (size_t)t * MC;
            } else {
                int tok = toks[b * MT + t - nv], k = -1;
                for (int q = 0; q < n; q++)
                    k = idx[q] == tok ? q : k;
                row = k >= 0 ? V + (size_t)k * MC : wte + (size_t)tok * MC;
                replaced += k >= 0;
            }
            for (int j = 0; j < MC; j++) {
                double want = (double)row[j] + wpe[(size_t)t * MC + j];
                double d = fabs(p->y[((size_t)b * T + t) * MC + j] - want);
                worst = d > worst ? d : worst;
            }
        }
    printf("trainable_tokens: %d of %d rows replaced (nv = %d), max |y - (E'[tok] + wpe)| = %.3g\n", replaced,
           MB * MT, nv, worst);
    assert_true(replaced > 0);
    assert_true(worst <= 1e-5);
}

static void test_forward_replaces_rows(void **state)
{
    (void)state;
    pr_model_config c = tiny();
    pr_model *m = th_model_new(&c, MB, MT);
    /* init_weights = false: the rows start at normal(0, 1), far from E's */
    pr_module *mod = attach_tt(m, "5, 17, 40", "3", "false");
    static probe p;
    memset(&p, 0, sizeof p);
    attach_probe(m, &p);
    int64_t shape[4];
    const float *V = param_data(mod, "trainable_tokens_delta", shape);
    assert_true(shape[0] == 3 && shape[1] == MC);
    pr_batch b = { .tokens = toks, .B = MB, .T = MT };
    pr_error err = { 0 };
    pr_model_set_training(m, 1);
    if (pr_model_forward(m, &b, NULL, &err))
        fail_msg("forward: %s", err.msg);
    const int64_t idx[3] = { 5, 17, 40 };
    check_rows(m, &p, idx, 3, V, 0, NULL);
    pr_model_set_training(m, 0);
    if (pr_model_forward(m, &b, NULL, &err))
        fail_msg("forward (eval): %s", err.msg);
    check_rows(m, &p, idx, 3, V, 0, NULL);
    pr_model_free(m);
}

/* Prompt-tuning rows come first and carry id -1: never replaced, even with token 0 chosen. */
static void test_virtual_rows_untouched(void **state)
{
    (void)state;
    pr_model_config c = tiny();
    pr_model *m = th_model_new(&c, MB, MT);
    const pr_option_setting po[] = { { "n_tokens", "3", -1 } };
    pr_module_spec ps = { .technique = prompt, .options = po, .n_options = 1, .trainable = 1, .seed = 2 };
    pr_module *pm = th_attach(m, &ps);
    pr_module *mod = attach_tt(m, "0, 5, 17", "3", "false");
    static probe p;
    memset(&p, 0, sizeof p);
    attach_probe(m, &p);
    const float *V = param_data(mod, "trainable_tokens_delta", NULL);
    const float *P = param_data(pm, "prompt", NULL);
    pr_batch b = { .tokens = toks, .B = MB, .T = MT };
    pr_error err = { 0 };
    if (pr_model_forward(m, &b, NULL, &err))
        fail_msg("forward: %s", err.msg);
    const int64_t idx[3] = { 0, 5, 17 };
    check_rows(m, &p, idx, 3, V, 3, P);
    pr_model_free(m);
}

/* ---- identity at init ------------------------------------------------------------------------------- */

static void test_identity_at_init(void **state)
{
    (void)state;
    pr_model_config c = tiny();
    pr_model *base = th_model_new(&c, MB, MT), *m = th_model_new(&c, MB, MT);
    pr_module *mod = attach_tt(m, "5, 17, 40", "3", "true");
    const float *V = param_data(mod, "trainable_tokens_delta", NULL);
    const float *wte = pr_model_find_tensor(m, "wte.weight")->data;
    const int64_t idx[3] = { 5, 17, 40 };
    for (int k = 0; k < 3; k++) /* init_weights: the embedding's own rows */
        assert_memory_equal(V + k * MC, wte + idx[k] * MC, MC * sizeof(float));
    pr_batch b = { .tokens = toks, .B = MB, .T = MT };
    pr_error err = { 0 };
    if (pr_model_forward(base, &b, NULL, &err) || pr_model_forward(m, &b, NULL, &err))
        fail_msg("forward: %s", err.msg);
    assert_memory_equal(pr_model_logits(base), pr_model_logits(m), (size_t)MB * MT * MV * sizeof(float));
    pr_model_free(base);
    pr_model_free(m);
}

/* ---- gradient ---------------------------------------------------------------------------------------- */

static void test_gradient_fd(void **state)
{
    (void)state;
    pr_model_config c = tiny();
    pr_model *m = th_model_new(&c, MB, MT);
    static th_loss_ctx lc;
    th_loss_init_rng(&lc, m, MB, MT, 21u);
    /* two tokens of the batch, one absent from it */
    int absent = 0;
    for (int v = MV - 1; v >= 0 && !absent; v--) {
        int seen = 0;
        for (int i = 0; i < MB * MT; i++)
            seen |= lc.tokens[i] == v;
        absent = seen ? 0 : v;
    }
    assert_true(absent > 0 && lc.tokens[0] != lc.tokens[3]);
    char ids[64];
    snprintf(ids, sizeof ids, "%d, %d, %d", lc.tokens[0], absent, lc.tokens[3]);
    pr_module *mod = attach_tt(m, ids, "3", "false");
    pr_model_set_training(m, 1);
    const char *const prefixes[] = { "trainable_tokens/" };
    const th_fd fd = { 3e-3, 5e-2, 1e-4, 0, 1e-6 };
    assert_int_equal(th_check_grads(&lc, prefixes, 1, 1, &fd), 1);
    /* the absent token's row gets no gradient */
    const pr_tensor_info *t = NULL;
    for (int i = 0; i < pr_model_n_tensors(m); i++)
        if (strstr(pr_model_tensor(m, i)->name, "trainable_tokens_delta"))
            t = pr_model_tensor(m, i);
    assert_non_null(t);
    th_forward_backward(&lc);
    for (int j = 0; j < MC; j++)
        assert_true(t->grad[MC + j] == 0.0f);
    (void)mod;
    pr_model_free(m);
}

/* ---- counts ------------------------------------------------------------------------------------------ */

/* GPT-2 small (d = 768): PEFT's TrainableTokensLayer trains
 * trainable_tokens_delta (len(token_indices), 768); the embedding (and
 * PEFT's trainable_tokens_original buffer) stay frozen.  Three ids:
 * 3 * 768 = 2,304 trainable; 100 ids: 76,800. */
static void test_counts_gpt2_small(void **state)
{
    (void)state;
    pr_model_config c;
    assert_int_equal(pr_config_preset("gpt2-small", &c), PR_OK);
    const pr_option_setting o[] = { { "token_indices", "50256, 17, 42", -1 }, { "n_token_indices", "3", -1 } };
    pr_module_spec spec = { .technique = tt, .options = o, .n_options = 2, .trainable = 1, .seed = 1 };
    pr_module_plan plan;
    pr_error err = { 0 };
    if (pr_module_plan_for(&c, &spec, &plan, &err))
        fail_msg("plan: %s", err.msg);
    assert_int_equal(plan.trainable, 3 * 768);
    assert_int_equal(plan.params, 3 * 768);
    assert_int_equal(plan.insertions, 1);
}

/* ---- end to end: peftref train, save, reload ---------------------------------------------------------- */

static int run(const char *const *args, const char *out, const char *errf)
{
    fflush(stdout); /* the child must not write this process's buffer again */
    return th_run_cli(PEFTREF_BIN, PLUGIN_DIR, args, out, errf);
}

static char *slurp(const char *path)
{
    FILE *f = fopen(path, "rb");
    assert_non_null(f);
    static char buf[1 << 16];
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    buf[n] = '\0';
    fclose(f);
    return buf;
}

/* "steps N  train_loss a -> b  val_loss c -> d" of peftref train's stdout */
static void final_losses(const char *path, double *v0, double *v1)
{
    const char *s = strstr(slurp(path), "\nsteps ");
    assert_non_null(s);
    const char *v = strstr(s, "val_loss ");
    assert_non_null(v);
    assert_int_equal(sscanf(v, "val_loss %lf -> %lf", v0, v1), 2);
}

static void test_train_save_reload(void **state)
{
    (void)state;
    char *dir = th_scratch_dir("peftref-tokens");
    char yaml[600], runp[600], out[600], errf[600], val[600], run2[600];
    snprintf(yaml, sizeof yaml, "%s/tt.yaml", dir);
    snprintf(runp, sizeof runp, "%s/run", dir);
    snprintf(run2, sizeof run2, "%s/run2", dir);
    snprintf(out, sizeof out, "%s/out.txt", dir);
    snprintf(errf, sizeof errf, "%s/err.txt", dir);
    snprintf(val, sizeof val, "%s/val.txt", dir);
    { /* validation text: the corpus's first 3000 bytes */
        FILE *in = fopen(CORPUS, "rb"), *o = fopen(val, "wb");
        assert_true(in && o);
        char b[3000];
        size_t n = fread(b, 1, sizeof b, in);
        assert_true(n == sizeof b);
        fwrite(b, 1, n, o);
        fclose(in);
        fclose(o);
    }
    FILE *f = fopen(yaml, "w");
    assert_non_null(f);
    /* 'e', ' ' and 't' are frequent bytes of the corpus */
    fprintf(f,
            "model:\n"
            "  config: {n_layers: 2, d_model: 32, n_heads: 2, d_ff: 64, vocab: 256, max_seq: 64}\n"
            "  seed: 3\n"
            "modules:\n"
            "  - technique: trainable_tokens\n"
            "    name: tt\n"
            "    options: {token_indices: \"101, 32, 116\", n_token_indices: 3}\n"
            "task:\n"
            "  type: lm\n"
            "  train: %s\n"
            "  validation: %s\n"
            "train: {steps: 30, batch: 4, seq_len: 32, lr: 5e-2, warmup: 0, schedule: constant, seed: 1,\n"
            "        log_every: 0, output: %s}\n",
            CORPUS, val, runp);
    fclose(f);

    const char *plan[] = { "peftref", "plan", yaml, NULL };
    assert_int_equal(run(plan, out, errf), 0);
    assert_non_null(strstr(slurp(out), "trainable params: 96 ")); /* 3 * 32 */

    const char *train[] = { "peftref", "train", yaml, "--quiet", NULL };
    if (run(train, out, errf))
        fail_msg("peftref train: %s", slurp(errf));
    double v0, v1;
    final_losses(out, &v0, &v1);
    printf("trainable_tokens: val_loss %.6f -> %.6f\n", v0, v1);
    assert_true(v1 < v0 - 1e-3);

    /* the saved module: one tensor, trainable_tokens_delta (3, 32) */
    char mpath[700];
    snprintf(mpath, sizeof mpath, "%s/modules/tt.safetensors", runp);
    f = fopen(mpath, "rb");
    assert_non_null(f);
    uint64_t hn = 0;
    assert_int_equal(fread(&hn, 8, 1, f), 1);
    assert_true(hn > 0 && hn < 60000);
    static char hdr[60001];
    assert_int_equal(fread(hdr, 1, hn, f), hn);
    hdr[hn] = '\0';
    fclose(f);
    int n_tensors = 0;
    for (const char *s = hdr; (s = strstr(s, "\"dtype\"")); s++)
        n_tensors++;
    assert_int_equal(n_tensors, 1);
    const char *tn = strstr(hdr, "trainable_tokens_delta\"");
    assert_non_null(tn);
    assert_non_null(strstr(tn, "\"shape\":[3,32]"));

    /* reloaded (the run's pipeline, module frozen): the trained rows differ
     * from the embedding's, sequences without a chosen token give the base
     * model's logits, and the final validation loss comes back */
    pr_registry *reg = NULL;
    const char *need[] = { "trainable_tokens" };
    assert_int_equal(th_registry_open(PLUGIN_DIR, need, 1, &reg), 0);
    char rp[700];
    snprintf(rp, sizeof rp, "%s/pipeline.yaml", runp);
    pr_pipeline *pl = NULL;
    pr_error err = { 0 };
    pr_model *m = NULL, *base = NULL;
    pr_tokenizer *tok = NULL;
    if (pr_pipeline_load(rp, NULL, 0, reg, &pl, &err) || pr_pipeline_build(pl, &m, &tok, &err))
        fail_msg("reload: %s", err.msg);
    const pr_model_config *mc = pr_model_get_config(m);
    if (pr_model_create(mc, &base, &err) || pr_model_reserve(base, 1, 8, &err) || pr_model_reserve(m, 1, 8, &err))
        fail_msg("model: %s", err.msg);
    const pr_tensor_info *wte = pr_model_find_tensor(base, "wte.weight"), *d = NULL;
    for (int i = 0; i < pr_model_n_tensors(m); i++)
        if (strstr(pr_model_tensor(m, i)->name, "trainable_tokens_delta"))
            d = pr_model_tensor(m, i);
    assert_non_null(d);
    assert_int_equal(d->numel, 3 * 32);
    const int idx[3] = { 101, 32, 116 };
    for (int k = 0; k < 3; k++)
        assert_memory_not_equal(d->data + k * 32, wte->data + idx[k] * 32, 32 * sizeof(float));
    assert_memory_equal(pr_model_find_tensor(m, "wte.weight")->data, wte->data, (size_t)wte->numel * sizeof(float));
    const int plain[8] = { 72, 73, 74, 10, 44, 46, 65, 66 }; /* none of 101, 32, 116 */
    pr_batch b = { .tokens = plain, .B = 1, .T = 8 };
    if (pr_model_forward(m, &b, NULL, &err) || pr_model_forward(base, &b, NULL, &err))
        fail_msg("forward: %s", err.msg);
    assert_memory_equal(pr_model_logits(m), pr_model_logits(base), 8 * 256 * sizeof(float));
    const int with[8] = { 72, 101, 32, 116, 44, 46, 65, 66 };
    b.tokens = with;
    float *lm = malloc(8 * 256 * sizeof(float));
    assert_non_null(lm);
    if (pr_model_forward(m, &b, NULL, &err))
        fail_msg("forward: %s", err.msg);
    memcpy(lm, pr_model_logits(m), 8 * 256 * sizeof(float));
    if (pr_model_forward(base, &b, NULL, &err))
        fail_msg("forward: %s", err.msg);
    assert_memory_equal(lm, pr_model_logits(base), 256 * sizeof(float)); /* position 0 precedes them */
    assert_memory_not_equal(lm + 256, pr_model_logits(base) + 256, 256 * sizeof(float));
    free(lm);
    pr_model_free(base);
    pr_model_free(m);
    pr_tokenizer_free(tok);
    pr_pipeline_free(pl);
    pr_registry_free(reg);

    /* the run's pipeline with no steps: the same validation loss as the trained module's */
    char set_out[700];
    snprintf(set_out, sizeof set_out, "train.output=%s", run2);
    const char *again[] = { "peftref", "train", rp, "--set", "train.steps=0", "--set", set_out, "--quiet", NULL };
    if (run(again, out, errf))
        fail_msg("peftref train (reload): %s", slurp(errf));
    double r0, r1;
    final_losses(out, &r0, &r1);
    printf("trainable_tokens: reloaded val_loss %.6f (trained %.6f)\n", r1, v1);
    assert_true(r1 == v1);

    /* eval and generate on the run */
    const char *ev[] = { "peftref", "eval", "--pipeline", runp, "--data", val, "--json", NULL };
    if (run(ev, out, errf))
        fail_msg("peftref eval: %s", slurp(errf));
    assert_non_null(strstr(slurp(out), "\"loss\""));
    const char *gen[] = { "peftref", "generate", runp, "--prompt", "the ", "--tokens", "8", NULL };
    if (run(gen, out, errf))
        fail_msg("peftref generate: %s", slurp(errf));
    th_remove_tree(dir);
    free(dir);
}

/* ---- the conformance checker ------------------------------------------------------------------------- */

static void test_conformance(void **state)
{
    (void)state;
    check_options co = { 0 };
    FILE *out = tmpfile();
    assert_non_null(out);
    pr_error err = { 0 };
    int n = 0, failed = 0;
    int rc = check_plugin_file(TT_SO, &co, out, &n, &failed, &err);
    rewind(out);
    char line[2048];
    while (fgets(line, sizeof line, out))
        if (rc || strncmp(line, "PASS", 4) != 0)
            fputs(line, stderr);
    fclose(out);
    if (rc)
        fail_msg("check: %s", err.msg);
    assert_true(n >= 8);
    assert_int_equal(failed, 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_extension_served),
        cmocka_unit_test(test_forward_replaces_rows),
        cmocka_unit_test(test_virtual_rows_untouched),
        cmocka_unit_test(test_identity_at_init),
        cmocka_unit_test(test_gradient_fd),
        cmocka_unit_test(test_counts_gpt2_small),
        cmocka_unit_test(test_train_save_reload),
        cmocka_unit_test(test_conformance),
    };
    return cmocka_run_group_tests(tests, setup_plugins, teardown_plugins);
}
