/* peftref tests: activation recomputation (pr_model_set_recompute,
 * core/model/passes.c and the families' layouts).
 *
 * With recompute the blocks share one activation area and the backward
 * reruns each block's forward from its kept input.  The rerun does the
 * same operations in the same order on the same inputs, so the reference
 * is the model without it, and the tolerance is none: the loss and every
 * gradient must be equal bit for bit (memcmp), for
 *  - GPT-2 tiny and LLaMA tiny (4 layers) with LoRA on q and v;
 *  - LoRA with dropout 0.3 in training mode (masks keyed by step and
 *    sample: the rerun must draw the forward's masks);
 *  - prefix tuning (per-layer prefix keys and values from a provider) and
 *    its MLP reparameterisation (one provider's computation shared by all
 *    layers);
 *  - (IA)^3 and a Houlsby adapter with LoRA (stream-site buffers in the
 *    shared area: attn.k, attn.v, ffn.act, attn_out, ffn_out);
 *  - a test hook at block_out (outside the block: its backward reads the
 *    block's output, which the rerun must have rewritten);
 *  - LoRA on layers 2 and 3 only (the backward stops at layer 2: layer 3
 *    is the top, layer 2 alone is rerun);
 *  - full finetuning (every base tensor trains: the embedding's gradient
 *    needs every block rerun);
 *  - two backwards of one forward (the area holds the lowest block after
 *    the first: the second must rerun the top one first);
 *  - precision bf16 (oneDNN products), when the build has oneDNN.
 * The LoRA gradients under recompute also pass finite differences of the
 * loss (test_bf16's tolerances), and the reservation shrinks by exactly
 * (L-1) blocks' activations less (L-1) kept inputs, counted here from
 * GPT-2's layout. */
#include "config.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <dlfcn.h>
#include <cmocka.h>

#include "peftref/peftref.h"
#include "peftref/module.h"
#include "peftref/plugin.h"
#include "bf16.h"
#include "family.h"
#include "gradcheck.h"
#include "harness.h"
#include "module_internal.h"

#define PLUGINS TEST_BUILDDIR "/plugins/.libs"

enum { B = 2, T = 8, L = 4 };

static void *so[4];
static const pr_technique *lora, *prefix, *prefix_mlp, *ia3, *houlsby;

static const pr_technique *technique_of(const pr_plugin *p, const char *name)
{
    for (uint32_t i = 0; p && i < p->n_techniques; i++)
        if (strcmp(p->techniques[i]->name, name) == 0)
            return p->techniques[i];
    return NULL;
}

static int group_setup(void **state)
{
    (void)state;
    lora = th_plugin_technique(PLUGINS "/lora.so", &so[0]);
    const pr_plugin *px = th_plugin_open(PLUGINS "/prefix_tuning.so", &so[1]);
    ia3 = th_plugin_technique(PLUGINS "/ia3.so", &so[2]);
    const pr_plugin *ad = th_plugin_open(PLUGINS "/adapters.so", &so[3]);
    prefix = technique_of(px, "prefix_tuning");
    prefix_mlp = technique_of(px, "prefix_tuning_mlp");
    houlsby = technique_of(ad, "adapter_houlsby");
    return lora && prefix && prefix_mlp && ia3 && houlsby ? 0 : -1;
}

static int group_teardown(void **state)
{
    (void)state;
    for (int i = 0; i < 4; i++)
        if (so[i])
            dlclose(so[i]);
    bf16_shutdown();
    return 0;
}

/* preset's model with L layers, init_std 0.1, reserved for B x T */
static pr_model *tiny(const char *preset)
{
    pr_model_config cfg;
    assert_int_equal(pr_config_preset(preset, &cfg), PR_OK);
    cfg.init_std = 0.1f;
    cfg.n_layers = L;
    cfg.seed = 11;
    return th_model_new(&cfg, B, T);
}

/* Every trainable module tensor drawn at random, so that zero-initialised
 * factors (LoRA's B, an adapter's up projection) pass gradients on. */
static void randomise_modules(pr_model *m)
{
    unsigned seed = 40;
    for (int i = 0; i < pr_model_n_tensors(m); i++) {
        const pr_tensor_info *t = pr_model_tensor(m, i);
        if (t->kind == PR_TENSOR_MODULE && t->trainable && t->data)
            gc_fill(t->data, (size_t)t->numel, seed++, 0.3f);
    }
}

static pr_module *attach(pr_model *m, const pr_technique *t, uint32_t sites, const int *layers, int n_layers,
                         const pr_option_setting *opts, int n_opts, const char *name)
{
    pr_module_spec spec = {.technique = t, .name = name, .sites = sites, .layers = layers, .n_layers = n_layers,
                           .options = opts, .n_options = n_opts, .trainable = 1, .seed = 9};
    return th_attach(m, &spec);
}

static void attach_lora(pr_model *m, const int *layers, int n_layers, const char *dropout)
{
    pr_option_setting o[] = {{"r", "4", -1}, {"alpha", "8", -1}, {"dropout", dropout ? dropout : "0", -1}};
    (void)attach(m, lora, PR_SITE_BIT(PR_SITE_Q) | PR_SITE_BIT(PR_SITE_V), layers, n_layers, o, 3, "lora");
}

/* ---- one step, with and without recompute ---------------------------------------------------- */

typedef struct snap {
    float loss;
    int n;                 /* tensors with a gradient */
    float **g;
    int64_t *numel;
    double norm;           /* sum of squares of every gradient */
} snap;

static void take(pr_model *m, float loss, snap *s)
{
    memset(s, 0, sizeof *s);
    s->loss = loss;
    int nt = pr_model_n_tensors(m);
    s->g = calloc((size_t)nt, sizeof *s->g);
    s->numel = calloc((size_t)nt, sizeof *s->numel);
    assert_non_null(s->g);
    assert_non_null(s->numel);
    for (int i = 0; i < nt; i++) {
        const pr_tensor_info *t = pr_model_tensor(m, i);
        if (!t->grad)
            continue;
        s->g[s->n] = malloc((size_t)t->numel * sizeof(float));
        assert_non_null(s->g[s->n]);
        memcpy(s->g[s->n], t->grad, (size_t)t->numel * sizeof(float));
        for (int64_t j = 0; j < t->numel; j++)
            s->norm += (double)t->grad[j] * t->grad[j];
        s->numel[s->n++] = t->numel;
    }
}

static void drop(snap *s)
{
    for (int i = 0; i < s->n; i++)
        free(s->g[i]);
    free(s->g);
    free(s->numel);
}

/* Zero the gradients, forward, backward (n_backward times) at step 7
 * with fixed sample indices. */
static float step(th_loss_ctx *lc, int n_backward)
{
    static const int64_t samples[B] = {5, 12};
    pr_error err = {0};
    float loss = 0;
    pr_model_set_step(lc->m, 7);
    pr_model_set_samples(lc->m, samples);
    pr_model_zero_grad(lc->m);
    int rc = pr_model_forward(lc->m, &lc->batch, &loss, &err);
    if (rc)
        fprintf(stderr, "forward: %s\n", err.msg);
    assert_int_equal(rc, PR_OK);
    for (int k = 0; k < n_backward; k++) {
        rc = pr_model_backward(lc->m, &err);
        if (rc)
            fprintf(stderr, "backward: %s\n", err.msg);
        assert_int_equal(rc, PR_OK);
    }
    return loss;
}

static void set_recompute(pr_model *m, int on)
{
    pr_error err = {0};
    int rc = pr_model_set_recompute(m, on, &err);
    if (rc)
        fprintf(stderr, "set_recompute: %s\n", err.msg);
    assert_int_equal(rc, PR_OK);
    assert_int_equal(pr_model_get_recompute(m), on);
}

/* The step without recompute, then with it, on the same model: the loss
 * and every gradient equal bit for bit, at least min_tensors gradients,
 * not all zero.  Leaves recompute on. */
static void check_equal(pr_model *m, const char *what, int training, int n_backward, int min_tensors)
{
    th_loss_ctx lc;
    th_loss_init_rng(&lc, m, B, T, 21);
    pr_model_set_training(m, training);
    snap off, on;
    set_recompute(m, 0);
    take(m, step(&lc, n_backward), &off);
    set_recompute(m, 1);
    take(m, step(&lc, n_backward), &on);
    assert_true(isfinite(off.loss) && off.loss > 0);
    assert_memory_equal(&off.loss, &on.loss, sizeof(float));
    assert_int_equal(off.n, on.n);
    assert_true(off.n >= min_tensors);
    assert_true(off.norm > 0);
    int64_t values = 0;
    for (int i = 0; i < off.n; i++) {
        assert_int_equal(off.numel[i], on.numel[i]);
        if (memcmp(off.g[i], on.g[i], (size_t)off.numel[i] * sizeof(float)) != 0) {
            int64_t j = 0;
            while (off.g[i][j] == on.g[i][j] || (isnan(off.g[i][j]) && isnan(on.g[i][j])))
                j++;
            fail_msg("%s: gradient %d differs at element %lld: %.9g without recompute, %.9g with", what, i,
                     (long long)j, off.g[i][j], on.g[i][j]);
        }
        values += off.numel[i];
    }
    printf("%s: loss %.9g and %d gradients (%lld values, |g| %.3g) equal bit for bit\n", what, off.loss, off.n,
           (long long)values, sqrt(off.norm));
    pr_model_set_training(m, 0);
    drop(&off);
    drop(&on);
}

/* ---- the cases ------------------------------------------------------------------------------- */

/* After one forward and backward at step 7 every insertion has counted
 * one forward call (step 7 * 2^24 + 1), rerun or not: a rerun repeats the
 * call's context (pr_ctx.seed, .step) instead of drawing the next. */
static void check_calls(const pr_module *mod, const char *what)
{
    for (int k = 0; k < mod->n_ins; k++)
        if (mod->ins[k].n_fwd != (7ull << 24) + 1)
            fail_msg("%s: insertion %d counted %llu forward calls in step 7 (want 1)", what, k,
                     (unsigned long long)(mod->ins[k].n_fwd - (7ull << 24)));
}

static void lora_case(const char *preset)
{
    pr_model *m = tiny(preset);
    pr_option_setting o[] = {{"r", "4", -1}, {"alpha", "8", -1}};
    pr_module *mod = attach(m, lora, PR_SITE_BIT(PR_SITE_Q) | PR_SITE_BIT(PR_SITE_V), NULL, 0, o, 2, "lora");
    randomise_modules(m);
    char what[64];
    snprintf(what, sizeof what, "%s LoRA", preset);
    check_equal(m, what, 0, 1, 2 * 2 * L);
    check_calls(mod, what);
    /* the gradients under recompute against finite differences of the loss */
    th_loss_ctx lc;
    th_loss_init_rng(&lc, m, B, T, 21);
    const char *pfx[] = {"lora"};
    const th_fd fd = {3e-3, 5e-2, 1e-4, 6, 1e-7};
    assert_int_equal(th_check_grads(&lc, pfx, 1, 1, &fd), 2 * 2 * L);
    pr_model_free(m);
}

static void test_lora(void **state)
{
    (void)state;
    lora_case("gpt2-tiny");
    lora_case("llama-tiny");
}

static void test_lora_dropout(void **state)
{
    (void)state;
    const char *presets[] = {"gpt2-tiny", "llama-tiny"};
    for (int p = 0; p < 2; p++) {
        pr_model *m = tiny(presets[p]);
        attach_lora(m, NULL, 0, "0.3");
        randomise_modules(m);
        /* dropout is on: training mode changes the loss */
        th_loss_ctx lc;
        th_loss_init_rng(&lc, m, B, T, 21);
        float eval_loss = step(&lc, 0);
        pr_model_set_training(m, 1);
        float train_loss = step(&lc, 0);
        pr_model_set_training(m, 0);
        assert_true(fabsf(eval_loss - train_loss) > 1e-6f);
        char what[64];
        snprintf(what, sizeof what, "%s LoRA dropout 0.3, training", presets[p]);
        check_equal(m, what, 1, 1, 2 * 2 * L);
        pr_model_free(m);
    }
}

static void test_prefix(void **state)
{
    (void)state;
    const char *presets[] = {"gpt2-tiny", "llama-tiny"};
    pr_option_setting o[] = {{"n_tokens", "3", -1}};
    for (int p = 0; p < 2; p++) {
        for (int mlp = 0; mlp < 2; mlp++) {
            pr_model *m = tiny(presets[p]);
            (void)attach(m, mlp ? prefix_mlp : prefix, 0, NULL, 0, o, 1, "prefix");
            char what[64];
            snprintf(what, sizeof what, "%s %s", presets[p], mlp ? "prefix tuning (MLP)" : "prefix tuning");
            check_equal(m, what, 1, 1, 1);
            pr_model_free(m);
        }
    }
}

static void test_stream_sites(void **state)
{
    (void)state;
    const char *presets[] = {"gpt2-tiny", "llama-tiny"};
    for (int p = 0; p < 2; p++) {
        pr_model *m = tiny(presets[p]);
        (void)attach(m, ia3, 0, NULL, 0, NULL, 0, "ia3");
        (void)attach(m, houlsby, 0, NULL, 0, NULL, 0, "houlsby");
        attach_lora(m, NULL, 0, NULL);
        randomise_modules(m);
        char what[64];
        snprintf(what, sizeof what, "%s (IA)3 + Houlsby adapter + LoRA", presets[p]);
        check_equal(m, what, 0, 1, 3 * L);
        pr_model_free(m);
    }
}

/* block_out test hook: y = x + 0.5 tanh(x); its backward reads x, the
 * block's output. */
static int bo_forward(void *self, const pr_site_io *io, pr_error *err)
{
    (void)self;
    (void)err;
    for (int r = 0; r < io->rows; r++)
        for (int j = 0; j < io->x_dim; j++)
            io->y[(size_t)r * io->y_ld + j] += 0.5f * tanhf(io->x[(size_t)r * io->x_ld + j]);
    return PR_OK;
}

static int bo_backward(void *self, const pr_site_io *io, pr_error *err)
{
    (void)self;
    (void)err;
    for (int r = 0; r < io->rows; r++)
        for (int j = 0; j < io->x_dim; j++) {
            float t = tanhf(io->x[(size_t)r * io->x_ld + j]);
            io->dx[(size_t)r * io->x_ld + j] += 0.5f * (1.0f - t * t) * io->dy[(size_t)r * io->y_ld + j];
        }
    return PR_OK;
}

static void test_block_out(void **state)
{
    (void)state;
    const char *presets[] = {"gpt2-tiny", "llama-tiny"};
    for (int p = 0; p < 2; p++) {
        pr_model *m = tiny(presets[p]);
        attach_lora(m, NULL, 0, NULL);
        randomise_modules(m);
        pr_site_hook h = {.forward = bo_forward, .backward = bo_backward};
        pr_error err = {0};
        for (int l = 0; l < L; l++)
            assert_int_equal(pr_model_attach_hook(m, PR_SITE_BLOCK_OUT, l, &h, &err), PR_OK);
        char what[64];
        snprintf(what, sizeof what, "%s LoRA + block_out hooks", presets[p]);
        check_equal(m, what, 0, 1, 2 * 2 * L);
        pr_model_free(m);
    }
}

static void test_top_layers(void **state)
{
    (void)state;
    const char *presets[] = {"gpt2-tiny", "llama-tiny"};
    const int layers[] = {2, 3};
    for (int p = 0; p < 2; p++) {
        pr_model *m = tiny(presets[p]);
        attach_lora(m, layers, 2, "0.1");
        randomise_modules(m);
        char what[64];
        snprintf(what, sizeof what, "%s LoRA on layers 2, 3", presets[p]);
        check_equal(m, what, 1, 1, 2 * 2 * 2);
        pr_model_free(m);
    }
}

static void test_full_finetuning(void **state)
{
    (void)state;
    const char *presets[] = {"gpt2-tiny", "llama-tiny"};
    for (int p = 0; p < 2; p++) {
        pr_model *m = tiny(presets[p]);
        pr_error err = {0};
        int n = pr_model_n_tensors(m);
        for (int i = 0; i < n; i++)
            assert_int_equal(pr_model_set_trainable(m, pr_model_tensor(m, i)->name, 1, &err), PR_OK);
        char what[64];
        snprintf(what, sizeof what, "%s full finetuning", presets[p]);
        check_equal(m, what, 0, 1, n);
        pr_model_free(m);
    }
}

static void test_two_backwards(void **state)
{
    (void)state;
    const char *presets[] = {"gpt2-tiny", "llama-tiny"};
    for (int p = 0; p < 2; p++) {
        pr_model *m = tiny(presets[p]);
        attach_lora(m, NULL, 0, NULL);
        randomise_modules(m);
        char what[64];
        snprintf(what, sizeof what, "%s LoRA, two backwards of one forward", presets[p]);
        check_equal(m, what, 0, 2, 2 * 2 * L);
        pr_model_free(m);
    }
}

static void test_bf16(void **state)
{
    (void)state;
    if (!bf16_available()) {
        printf("bf16: skipped (built without oneDNN)\n");
        return;
    }
    const char *presets[] = {"gpt2-tiny", "llama-tiny"};
    for (int p = 0; p < 2; p++) {
        pr_model *m = tiny(presets[p]);
        attach_lora(m, NULL, 0, "0.2");
        randomise_modules(m);
        pr_error err = {0};
        assert_int_equal(pr_model_set_precision(m, PR_PRECISION_BF16, &err), PR_OK);
        assert_true(pr_model_bf16_bytes(m) > 0);
        char what[64];
        snprintf(what, sizeof what, "%s LoRA dropout 0.2, bf16", presets[p]);
        check_equal(m, what, 1, 1, 2 * 2 * L);
        pr_model_free(m);
    }
}

/* ---- memory ---------------------------------------------------------------------------------- */

static size_t rounded(size_t n)
{
    return (n + 15) / 16 * 16;   /* activations.c's 64-byte views */
}

/* GPT-2 tiny with LoRA on q and v (projection sites: no stream buffers):
 * one block's views, as gpt2.c lays them out, counted here. */
static void test_memory(void **state)
{
    (void)state;
    pr_model *m = tiny("gpt2-tiny");
    attach_lora(m, NULL, 0, NULL);
    const pr_model_config *c = pr_model_get_config(m);
    size_t N = (size_t)B * T, C = (size_t)c->d_model, F = (size_t)c->d_ff, H = (size_t)c->n_heads;
    size_t Q = H * (size_t)c->d_head, QKV = Q + 2 * (size_t)c->n_kv_heads * (size_t)c->d_head;
    size_t block = 6 * rounded(N * C) + 4 * rounded(N) + rounded(N * QKV) + rounded(B * H * T * T) +
                   rounded(N * Q) + 2 * rounded(N * F);
    size_t expect = ((size_t)L - 1) * (block - rounded(N * C)) * sizeof(float);
    set_recompute(m, 0);
    size_t off = m->act_bytes;
    set_recompute(m, 1);
    size_t on = m->act_bytes;
    printf("gpt2-tiny B=%d T=%d: activations %zu bytes, %zu with recompute (saves %zu = %d x (block %zu - input "
           "%zu floats))\n", B, T, off, on, off - on, L - 1, block, rounded(N * C));
    assert_true(on < off);
    assert_int_equal(off - on, expect);
    /* and back: the plan without recompute is the first one */
    set_recompute(m, 0);
    assert_int_equal(m->act_bytes, off);
    pr_model_free(m);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_memory),
        cmocka_unit_test(test_lora),
        cmocka_unit_test(test_lora_dropout),
        cmocka_unit_test(test_prefix),
        cmocka_unit_test(test_stream_sites),
        cmocka_unit_test(test_block_out),
        cmocka_unit_test(test_top_layers),
        cmocka_unit_test(test_full_finetuning),
        cmocka_unit_test(test_two_backwards),
        cmocka_unit_test(test_bf16),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
