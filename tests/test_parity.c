/* Parity of the GPT-2 forward and backward passes with an independent
 * reference.
 *
 * tests/ref/make_parity_fixtures.py (plain PyTorch, float64) wrote a tiny
 * Hugging Face GPT-2 checkpoint (2 layers, C=48, H=4, V=320) and, for one
 * 2x16 batch with some unscored targets, the logits, the mean loss and the
 * gradient of that loss with respect to every parameter.  Here peftref
 * loads the checkpoint through pr_model_load_hf, runs the same batch in
 * float32 and must match:
 *
 *   logits, loss:  |a - b| <= 1e-4 * max(|b|, 0.1)          (elementwise;
 *                  logits here are O(1), at most ~4)
 *   gradients:     |a - b| <= 1e-4 * max_i |b_i| + 1e-8     (per tensor:
 *                  relative to the tensor's largest reference gradient)
 *
 * float32 rounding stays near 2e-6 absolute on the logits and 1e-6 of the
 * largest gradient, so the bounds leave an order of magnitude for other
 * BLAS kernels and thread counts, while a wrong formula (a missing scale, a
 * transposed weight, an off-by-one mask, erf GELU for tanh GELU, a dropped
 * tied-head term) is off by far more.  Set PEFTREF_PARITY_VERBOSE=1 to
 * print the worst element of every compared tensor. */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "peftref/peftref.h"
#include "safetensors.h"

#define MODEL_DIR TEST_SRCDIR "/ref/gpt2-parity/model"
#define EXPECTED TEST_SRCDIR "/ref/gpt2-parity/expected.safetensors"

#define OUT_RTOL 1e-4
#define OUT_FLOOR 1e-1
#define GRAD_RTOL 1e-4
#define GRAD_ATOL 1e-8

typedef struct fixture {
    st_file *ref;
    int B, T;
    int *tokens, *targets;
} fixture;

/* Reference tensor name as f32 (caller frees); asserts it exists with numel n
 * (n < 0: any). */
static float *ref_f32(const fixture *fx, const char *name, int64_t n)
{
    pr_error err = { 0 };
    const st_tensor *t = st_find(fx->ref, name);
    if (!t)
        fail_msg("%s: no tensor \"%s\"", EXPECTED, name);
    if (n >= 0 && t->numel != n)
        fail_msg("%s: tensor \"%s\" has %lld values, expected %lld", EXPECTED, name,
                 (long long)t->numel, (long long)n);
    float *v = malloc(sizeof(float) * (size_t)(t->numel ? t->numel : 1));
    assert_non_null(v);
    if (st_to_f32(fx->ref, t, v, &err) != PR_OK)
        fail_msg("%s", err.msg);
    return v;
}

static int setup(void **state)
{
    pr_error err = { 0 };
    fixture *fx = calloc(1, sizeof *fx);
    if (!fx)
        return -1;
    if (st_open(EXPECTED, 0, &fx->ref, &err) != PR_OK) {
        fprintf(stderr, "%s\n", err.msg);
        free(fx);
        return -1;
    }
    const st_tensor *tk = st_find(fx->ref, "tokens");
    if (!tk || tk->ndim != 2) {
        fprintf(stderr, "%s: no (B,T) tensor \"tokens\"\n", EXPECTED);
        st_close(fx->ref);
        free(fx);
        return -1;
    }
    fx->B = (int)tk->shape[0];
    fx->T = (int)tk->shape[1];
    size_t n = (size_t)fx->B * fx->T;
    float *tok = ref_f32(fx, "tokens", (int64_t)n);
    float *tgt = ref_f32(fx, "targets", (int64_t)n);
    fx->tokens = malloc(n * sizeof(int));
    fx->targets = malloc(n * sizeof(int));
    if (!fx->tokens || !fx->targets)
        return -1;
    for (size_t i = 0; i < n; i++) {
        fx->tokens[i] = (int)lrintf(tok[i]);
        fx->targets[i] = (int)lrintf(tgt[i]);
    }
    free(tok);
    free(tgt);
    *state = fx;
    return 0;
}

static int teardown(void **state)
{
    fixture *fx = *state;
    st_close(fx->ref);
    free(fx->tokens);
    free(fx->targets);
    free(fx);
    return 0;
}

static pr_model *load_model(void)
{
    pr_error err = { 0 };
    pr_model *m = NULL;
    if (pr_model_load_hf(MODEL_DIR, &m, &err) != PR_OK)
        fail_msg("pr_model_load_hf(%s): %s", MODEL_DIR, err.msg);
    return m;
}

/* Forward (with targets) and backward of the fixture batch. */
static float run_step(pr_model *m, const fixture *fx, int backward)
{
    pr_error err = { 0 };
    pr_batch batch = {.tokens = fx->tokens, .targets = fx->targets, .B = fx->B, .T = fx->T};
    float loss = NAN;
    if (pr_model_reserve(m, fx->B, fx->T, &err) != PR_OK)
        fail_msg("reserve: %s", err.msg);
    if (pr_model_forward(m, &batch, &loss, &err) != PR_OK)
        fail_msg("forward: %s", err.msg);
    if (backward && pr_model_backward(m, &err) != PR_OK)
        fail_msg("backward: %s", err.msg);
    return loss;
}

/* Number of elements of got outside |got - want| <= rtol * max(|want|, floor);
 * reports the worst one. */
static long count_bad(const char *what, const float *got, const float *want, int64_t n,
                      double rtol, double floor)
{
    long bad = 0;
    double worst = 0.0;
    int64_t wi = 0;
    for (int64_t i = 0; i < n; i++) {
        double d = fabs((double)got[i] - (double)want[i]);
        double tol = rtol * fmax(fabs((double)want[i]), floor);
        if (!(d <= tol))
            bad++;
        double ratio = isnan(d) ? INFINITY : d / tol;
        if (ratio > worst) {
            worst = ratio;
            wi = i;
        }
    }
    if (bad || getenv("PEFTREF_PARITY_VERBOSE"))
        fprintf(stderr, "  %-28s %ld of %lld outside tolerance; worst [%lld] got %.8g want %.8g "
                "(%.3fx tolerance)\n", what, bad, (long long)n, (long long)wi,
                (double)got[wi], (double)want[wi], worst);
    return bad;
}

/* Compares every trainable tensor's gradient with "grad.<name>"; returns the
 * number of tensors that differ.  Gradients of non-trainable tensors are not
 * looked at. */
static int compare_grads(const pr_model *m, const fixture *fx, int *n_checked)
{
    int bad_tensors = 0;
    *n_checked = 0;
    for (int i = 0; i < pr_model_n_tensors(m); i++) {
        const pr_tensor_info *ti = pr_model_tensor(m, i);
        if (!ti->trainable)
            continue;
        assert_non_null(ti->grad);
        char name[256];
        snprintf(name, sizeof name, "grad.%s", ti->name);
        const st_tensor *rt = st_find(fx->ref, name);
        if (!rt)
            fail_msg("model tensor %s has no reference \"%s\"", ti->name, name);
        if (rt->ndim != ti->ndim)
            fail_msg("%s: model ndim %d, reference %d", ti->name, ti->ndim, rt->ndim);
        for (int d = 0; d < ti->ndim; d++)
            if (rt->shape[d] != ti->shape[d])
                fail_msg("%s: dim %d is %lld in the model, %lld in the reference", ti->name, d,
                         (long long)ti->shape[d], (long long)rt->shape[d]);
        float *want = ref_f32(fx, name, ti->numel);
        double gmax = 0.0;
        for (int64_t j = 0; j < ti->numel; j++)
            gmax = fmax(gmax, fabs((double)want[j]));
        /* tolerance rtol*|b| floored at rtol*max|b| + atol, in count_bad's form */
        double floor = gmax + GRAD_ATOL / GRAD_RTOL;
        if (count_bad(ti->name, ti->grad, want, ti->numel, GRAD_RTOL, floor) != 0)
            bad_tensors++;
        free(want);
        (*n_checked)++;
    }
    return bad_tensors;
}

static void check_outputs(const pr_model *m, const fixture *fx, float loss)
{
    const pr_model_config *cfg = pr_model_get_config(m);
    int64_t n = (int64_t)fx->B * fx->T * cfg->vocab_size;
    float *want = ref_f32(fx, "logits", n);
    float *want_loss = ref_f32(fx, "loss", 1);
    const float *logits = pr_model_logits(m);
    assert_non_null(logits);
    long bad = count_bad("logits", logits, want, n, OUT_RTOL, OUT_FLOOR);
    bad += count_bad("loss", &loss, want_loss, 1, OUT_RTOL, OUT_FLOOR);
    free(want);
    free(want_loss);
    assert_int_equal(bad, 0);
}

/* ---- tests -------------------------------------------------------------------- */

static void test_config_from_checkpoint(void **state)
{
    fixture *fx = *state;
    pr_model *m = load_model();
    const pr_model_config *c = pr_model_get_config(m);
    assert_int_equal(c->family, PR_FAMILY_GPT2);
    assert_int_equal(c->n_layers, 2);
    assert_int_equal(c->d_model, 48);
    assert_int_equal(c->n_heads, 4);
    assert_int_equal(c->d_head, 12);
    assert_int_equal(c->d_ff, 192);
    assert_int_equal(c->vocab_size, 320);
    assert_int_equal(c->max_seq, 32);
    assert_true(c->tied_head);
    assert_true(c->fused_qkv);
    assert_float_equal(c->norm_eps, 1e-5f, 1e-9f);
    /* every parameter of the checkpoint, and nothing else (the attn.bias
     * mask buffers are not parameters) */
    int n_grad = 0;
    for (int i = 0; i < st_count(fx->ref); i++)
        n_grad += strncmp(st_tensor_at(fx->ref, i)->name, "grad.", 5) == 0;
    assert_int_equal(pr_model_n_tensors(m), n_grad);
    assert_int_equal(pr_model_param_count(m), 73536);
    pr_model_free(m);
}

static void test_forward_matches_reference(void **state)
{
    fixture *fx = *state;
    pr_model *m = load_model();
    float loss = run_step(m, fx, 0);
    check_outputs(m, fx, loss);
    pr_model_free(m);
}

static void test_backward_matches_reference(void **state)
{
    fixture *fx = *state;
    pr_error err = { 0 };
    pr_model *m = load_model();
    if (pr_model_set_trainable(m, "*", 1, &err) != PR_OK)
        fail_msg("set_trainable *: %s", err.msg);
    pr_model_zero_grad(m);
    float loss = run_step(m, fx, 1);
    check_outputs(m, fx, loss);
    int n_checked = 0;
    int bad = compare_grads(m, fx, &n_checked);
    assert_int_equal(n_checked, pr_model_n_tensors(m));
    assert_int_equal(bad, 0);

    /* a second step after zeroing must reproduce the same gradients (no
     * state leaks from one step's buffers into the next) */
    pr_model_zero_grad(m);
    loss = run_step(m, fx, 1);
    check_outputs(m, fx, loss);
    assert_int_equal(compare_grads(m, fx, &n_checked), 0);
    pr_model_free(m);
}

/* With only a few tensors trainable the frozen ones skip their weight
 * gradients, but the gradient flowing through them must be unchanged. */
static void test_partial_trainable_matches_reference(void **state)
{
    fixture *fx = *state;
    pr_error err = { 0 };
    static const char *const names[] = {
        "h.0.attn.c_attn.weight", "h.0.ln_1.bias", "h.1.mlp.c_fc.bias", "wpe.weight",
    };
    pr_model *m = load_model();
    for (size_t i = 0; i < sizeof names / sizeof *names; i++)
        if (pr_model_set_trainable(m, names[i], 1, &err) != PR_OK)
            fail_msg("set_trainable %s: %s", names[i], err.msg);
    pr_model_zero_grad(m);
    run_step(m, fx, 1);
    int n_checked = 0;
    int bad = compare_grads(m, fx, &n_checked);
    assert_int_equal(n_checked, (int)(sizeof names / sizeof *names));
    assert_int_equal(bad, 0);
    pr_model_free(m);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_config_from_checkpoint),
        cmocka_unit_test(test_forward_matches_reference),
        cmocka_unit_test(test_backward_matches_reference),
        cmocka_unit_test(test_partial_trainable_matches_reference),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
