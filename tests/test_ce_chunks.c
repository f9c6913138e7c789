/* peftref tests: the LM head's cross-entropy in chunks of rows against
 * the full (Nr,V) path (PEFTREF_CE_FULL=1).
 *
 * The two paths run the same model (same config, seed, modules and batch)
 * and must give the same loss, logits and gradient of every trainable
 * tensor, for GPT-2 and LLaMA tiny models, with LoRA (frozen head), full
 * finetuning (trainable head, tied and untied), prompt tuning (virtual
 * rows gathered into the head's input) and chunks of 4 and 1 rows that
 * do not divide Nr = 21, with a whole chunk of unscored rows.  The chunks
 * are row slices of the same products; the BLAS may still pick other
 * kernels for other row counts, and the head's gradient sums the rows in
 * another order, so what is asserted is max |a - b| <= 1e-5 * max |full|
 * per tensor and the loss within 1e-6 relative; which results came out
 * bit for bit is printed (here: loss and logits, no gradient; the worst
 * gradient 6e-7 of its tensor's largest element).  Each case runs in
 * eval and in training mode: in training a frozen head's dh is taken in
 * the forward at scale 1 and scaled in the backward, another rounding
 * of the same sums.  The chunked gradients are
 * also checked against finite differences, and the training and
 * loss-only paths are checked to hold no (Nr,V) buffer. */
#include <dlfcn.h>
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "peftref/peftref.h"
#include "family.h"
#include "gradcheck.h"
#include "rng.h"
#include "harness.h"

#define LORA_SO TEST_BUILDDIR "/plugins/.libs/lora.so"
#define PROMPT_SO TEST_BUILDDIR "/plugins/.libs/prompt_tuning.so"

enum { CB = 3, CT = 7, CN = CB * CT, CV = 96, NV = 3 };

static const double GRAD_TOL = 1e-5, LOSS_TOL = 1e-6;

typedef struct ce_case {
    const char *name;
    int llama;   /* else GPT-2 */
    int tied;    /* head tied to the token table */
    int lora;    /* LoRA on the attention projections, base frozen */
    int full;    /* every base tensor trainable */
    int prompt;  /* prompt tuning, NV virtual rows */
    int head;    /* the untied head trainable (with prompt tuning) */
} ce_case;

static const ce_case CASES[] = {
    { "gpt2 lora", 0, 1, 1, 0, 0, 0 },
    { "gpt2 full tied", 0, 1, 0, 1, 0, 0 },
    { "gpt2 full untied", 0, 0, 0, 1, 0, 0 },
    { "gpt2 prompt + lora", 0, 1, 1, 0, 1, 0 },
    { "llama lora", 1, 0, 1, 0, 0, 0 },
    { "llama full tied", 1, 1, 0, 1, 0, 0 },
    { "llama full untied", 1, 0, 0, 1, 0, 0 },
    { "llama prompt + head", 1, 0, 0, 0, 1, 1 },
};
#define N_CASES (int)(sizeof CASES / sizeof CASES[0])

static const pr_technique *lora, *prompt;
static void *lora_so, *prompt_so;

static int setup_plugins(void **state)
{
    (void)state;
    lora = th_plugin_technique(LORA_SO, &lora_so);
    prompt = th_plugin_technique(PROMPT_SO, &prompt_so);
    return lora && prompt ? 0 : -1;
}

static int teardown_plugins(void **state)
{
    (void)state;
    if (lora_so)
        dlclose(lora_so);
    if (prompt_so)
        dlclose(prompt_so);
    return 0;
}

/* PEFTREF_CE_FULL and PEFTREF_CE_CHUNK_ROWS as the next reserve reads them;
 * rows NULL: the default chunk. */
static void ce_mode(int full, const char *rows)
{
    if (full)
        setenv("PEFTREF_CE_FULL", "1", 1);
    else
        unsetenv("PEFTREF_CE_FULL");
    if (rows)
        setenv("PEFTREF_CE_CHUNK_ROWS", rows, 1);
    else
        unsetenv("PEFTREF_CE_CHUNK_ROWS");
}

static pr_model_config config_of(const ce_case *k)
{
    pr_model_config c;
    if (k->llama) {
        assert_int_equal(pr_config_preset("llama-tiny", &c), PR_OK);
        c.d_model = 32;
        c.d_head = 8;
        c.d_ff = 48;
        c.vocab_size = CV;
        c.max_seq = 16;
        c.init_std = 0.2f;
        c.seed = 7;
    } else {
        c = th_config(&(th_shape){ 2, 32, 4, 4, 8, 64, CV, 16 }, 5);
    }
    c.tied_head = k->tied;
    return c;
}

/* The model of case k, reserved for CB x CT under the current mode, with
 * its modules and trainable tensors. */
static pr_model *case_model(const ce_case *k)
{
    pr_model_config c = config_of(k);
    pr_model *m = th_model_new(&c, CB, CT);
    pr_error err = { 0 };
    if (k->prompt) {
        const pr_option_setting o[] = { { "n_tokens", "3", -1 } };
        pr_module_spec s = { .technique = prompt, .options = o, .n_options = 1, .trainable = 1, .seed = 4 };
        th_attach(m, &s);
        assert_int_equal(pr_model_virtual_positions(m), NV);
    }
    if (k->lora) {
        uint32_t sites = k->llama ? PR_SITE_BIT(PR_SITE_Q) | PR_SITE_BIT(PR_SITE_V) : PR_SITE_BIT(PR_SITE_QKV);
        const pr_option_setting o[] = { { "r", "2", -1 }, { "alpha", "4", -1 } };
        pr_module_spec s = { .technique = lora, .sites = sites, .options = o, .n_options = 2, .trainable = 1,
                             .seed = 3 };
        th_attach(m, &s);
        /* lora_B nonzero, so that lora_A has a gradient too */
        for (int t = 0; t < pr_model_n_tensors(m); t++) {
            const pr_tensor_info *ti = pr_model_tensor(m, t);
            if (ti->kind == PR_TENSOR_MODULE && strstr(ti->name, "lora_B"))
                gc_fill(ti->data, (size_t)ti->numel, 40 + (unsigned)t, 0.3f);
        }
    }
    if (k->full)
        assert_int_equal(pr_model_set_trainable(m, "*", 1, &err), PR_OK);
    if (k->head)
        assert_int_equal(pr_model_set_trainable(m, "lm_head.weight", 1, &err), PR_OK);
    return m;
}

/* Tokens and targets of the batch: rows 8..11 (a whole chunk of 4) and
 * row 2 are not scored. */
static void case_batch(int *tokens, int *targets, unsigned seed)
{
    pr_rng r;
    rng_seed(&r, seed);
    for (int i = 0; i < CN; i++) {
        tokens[i] = (int)(rng_next(&r) % CV);
        targets[i] = (int)(rng_next(&r) % CV);
    }
    for (int i = 8; i < 12; i++)
        targets[i] = -1;
    targets[2] = -1;
}

typedef struct result {
    float loss;
    float *logits;      /* (CN, CV) */
    int n;              /* tensors with a gradient */
    float *grad[64];
    size_t numel[64];
} result;

static void result_free(result *r)
{
    free(r->logits);
    for (int i = 0; i < r->n; i++)
        free(r->grad[i]);
    memset(r, 0, sizeof *r);
}

/* One forward and backward of case k under the mode (full, rows). */
static int training_mode;   /* the model's training flag in run_case */

static void run_case(const ce_case *k, int full, const char *rows, result *out)
{
    memset(out, 0, sizeof *out);
    ce_mode(full, rows);
    pr_model *m = case_model(k);
    pr_model_set_training(m, training_mode);
    int tokens[CN], targets[CN];
    case_batch(tokens, targets, 11);
    pr_batch b = { .tokens = tokens, .targets = targets, .B = CB, .T = CT };
    pr_error err = { 0 };
    pr_model_zero_grad(m);
    if (pr_model_forward(m, &b, &out->loss, &err) || pr_model_backward(m, &err))
        fail_msg("%s: %s", k->name, err.msg);
    assert_int_equal(pr_model_scored_tokens(m), CN - 5);
    assert_int_equal(m->ce_full, full);
    /* a frozen head in training takes dh in the forward, once (ce_dh) */
    assert_int_equal(m->ce_dh_ready, !full && training_mode && !k->full && !k->head);
    if (!full) {
        /* training holds no (Nr,V) buffer: only the chunk pair */
        assert_null(m->logits_own);
        assert_null(m->probs);
        assert_null(m->dlogits);
        assert_non_null(m->ce_logits);
        assert_int_equal(m->ce_rows, rows ? (atoi(rows) < CN ? atoi(rows) : CN) : CN);
    }
    const float *lg = pr_model_logits(m); /* made on request after the backward */
    assert_non_null(lg);
    out->logits = malloc((size_t)CN * CV * sizeof(float));
    assert_non_null(out->logits);
    memcpy(out->logits, lg, (size_t)CN * CV * sizeof(float));
    for (int t = 0; t < pr_model_n_tensors(m); t++) {
        const pr_tensor_info *ti = pr_model_tensor(m, t);
        if (!ti->grad)
            continue;
        assert_true(out->n < 64);
        out->numel[out->n] = (size_t)ti->numel;
        out->grad[out->n] = malloc((size_t)ti->numel * sizeof(float));
        assert_non_null(out->grad[out->n]);
        memcpy(out->grad[out->n], ti->grad, (size_t)ti->numel * sizeof(float));
        out->n++;
    }
    pr_model_free(m);
}

static double max_abs(const float *a, size_t n)
{
    double mx = 0;
    for (size_t i = 0; i < n; i++)
        mx = fmax(mx, fabs((double)a[i]));
    return mx;
}

/* Chunked (rows) against full for every case, in eval and in training
 * mode (where a frozen head's dh comes from the forward). */
static void compare_modes(const char *rows)
{
    for (int c = 0; c < 2 * N_CASES; c++) {
        training_mode = c >= N_CASES;
        const ce_case *k = &CASES[c % N_CASES];
        result f, ch;
        run_case(k, 1, NULL, &f);
        run_case(k, 0, rows, &ch);
        assert_true(isfinite(f.loss) && f.loss > 0);
        assert_true(fabs((double)ch.loss - f.loss) <= LOSS_TOL * fabs((double)f.loss));
        double lscale = max_abs(f.logits, (size_t)CN * CV);
        assert_true(lscale > 0);
        assert_true(th_max_abs_diff(ch.logits, f.logits, (size_t)CN * CV) <= GRAD_TOL * lscale);
        assert_int_equal(ch.n, f.n);
        assert_true(f.n > 0);
        int exact = 0;
        double worst = 0;
        for (int i = 0; i < f.n; i++) {
            assert_int_equal(ch.numel[i], f.numel[i]);
            double scale = max_abs(f.grad[i], f.numel[i]);
            assert_true(scale > 0); /* every trainable tensor gets a gradient */
            double d = th_max_abs_diff(ch.grad[i], f.grad[i], f.numel[i]);
            if (d > GRAD_TOL * scale)
                fail_msg("%s, chunk %s: gradient %d of %d differs by %g (scale %g)", k->name, rows ? rows : "default",
                         i, f.n, d, scale);
            worst = fmax(worst, d / scale);
            exact += memcmp(ch.grad[i], f.grad[i], f.numel[i] * sizeof(float)) == 0;
        }
        print_message("%-20s %-5s chunk %-7s loss %s, logits %s, %d of %d gradients bit for bit, worst %.2g "
                      "rel\n", k->name, training_mode ? "train" : "eval", rows ? rows : "default",
                      ch.loss == f.loss ? "exact" : "close",
                      memcmp(ch.logits, f.logits, (size_t)CN * CV * sizeof(float)) == 0 ? "exact" : "close", exact,
                      f.n, worst);
        result_free(&f);
        result_free(&ch);
    }
    training_mode = 0;
    ce_mode(0, NULL);
}

static void test_chunks_of_4(void **state)
{
    (void)state;
    compare_modes("4"); /* 21 = 5 x 4 + 1; rows 8..11 one unscored chunk */
}

static void test_chunks_of_1(void **state)
{
    (void)state;
    compare_modes("1");
}

static void test_default_chunk(void **state)
{
    (void)state;
    compare_modes(NULL); /* 16 MiB of a 96-token vocabulary: the whole batch */
}

/* The chunked gradients against central differences of the loss
 * recomputed in double from the logits (test_llama_model.c's settings). */
static void test_chunked_fd(void **state)
{
    (void)state;
    static const th_fd fd = { .eps = 3e-3, .rtol = 5e-2, .atol = 1e-4, .probes = 6, .gmin = 1e-6 };
    /* gpt2 full untied, llama prompt + head; gpt2 and llama lora in
     * training mode (a frozen head: dh from the forward) */
    const int pick[] = { 2, 7, 0, 4 };
    for (int p = 0; p < 4; p++) {
        const ce_case *k = &CASES[pick[p]];
        ce_mode(0, "4");
        pr_model *m = case_model(k);
        pr_model_set_training(m, p >= 2);
        th_loss_ctx lc;
        th_loss_bind(&lc, m, CB, CT);
        case_batch(lc.tokens, lc.targets, 23);
        const char *all[] = { "" };
        int n = th_check_grads(&lc, all, 1, 1, &fd);
        assert_true(n > 0);
        print_message("%s%s: %d tensors against finite differences\n", k->name, p >= 2 ? " (training)" : "", n);
        pr_model_free(m);
    }
    ce_mode(0, NULL);
}

/* Loss-only evaluation and generation: a forward with targets keeps no
 * logits; one without targets makes them on request, equal to the full
 * path's; a changed batch drops them. */
static void test_eval_and_logits(void **state)
{
    (void)state;
    const ce_case *k = &CASES[4];
    int tokens[CN], targets[CN];
    case_batch(tokens, targets, 31);
    pr_error err = { 0 };

    ce_mode(1, NULL);
    pr_model *mf = case_model(k);
    pr_batch nb = { .tokens = tokens, .targets = NULL, .B = CB, .T = CT };
    assert_int_equal(pr_model_forward(mf, &nb, NULL, &err), PR_OK);
    float *want = malloc((size_t)CN * CV * sizeof(float));
    assert_non_null(want);
    memcpy(want, pr_model_logits(mf), (size_t)CN * CV * sizeof(float));
    pr_model_free(mf);

    ce_mode(0, "4");
    pr_model *m = case_model(k);
    pr_batch tb = { .tokens = tokens, .targets = targets, .B = CB, .T = CT };
    float loss = 0;
    assert_int_equal(pr_model_forward(m, &tb, &loss, &err), PR_OK);
    assert_true(isfinite(loss));
    assert_null(m->logits_own);
    assert_int_equal(pr_model_forward(m, &nb, NULL, &err), PR_OK);
    assert_null(m->logits_own); /* not made until asked for */
    const float *got = pr_model_logits(m);
    assert_non_null(got);
    assert_true(th_max_abs_diff(got, want, (size_t)CN * CV) <= GRAD_TOL * max_abs(want, (size_t)CN * CV));
    assert_ptr_equal(pr_model_logits(m), got); /* the second request reuses them */
    /* a smaller batch: its own logits, the first rows of the same model's */
    pr_batch one = { .tokens = tokens, .targets = NULL, .B = 1, .T = CT };
    assert_int_equal(pr_model_forward(m, &one, NULL, &err), PR_OK);
    got = pr_model_logits(m);
    assert_true(th_max_abs_diff(got, want, (size_t)CT * CV) <= GRAD_TOL * max_abs(want, (size_t)CT * CV));
    /* hidden_only: no logits at all */
    pr_batch ho = { .tokens = tokens, .targets = NULL, .B = CB, .T = CT, .hidden_only = 1 };
    assert_int_equal(pr_model_forward(m, &ho, NULL, &err), PR_OK);
    assert_null(pr_model_logits(m));
    free(want);
    pr_model_free(m);

    /* a malformed chunk size is refused at reserve, naming the variable */
    ce_mode(0, "0x");
    pr_model_config c = config_of(k);
    pr_model *bad = NULL;
    assert_int_equal(pr_model_create(&c, &bad, &err), PR_OK);
    assert_int_equal(pr_model_reserve(bad, CB, CT, &err), PR_ERR_INVALID);
    assert_non_null(strstr(err.msg, "PEFTREF_CE_CHUNK_ROWS"));
    pr_model_free(bad);
    ce_mode(0, NULL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_chunks_of_4),
        cmocka_unit_test(test_chunks_of_1),
        cmocka_unit_test(test_default_chunk),
        cmocka_unit_test(test_chunked_fd),
        cmocka_unit_test(test_eval_and_logits),
    };
    return cmocka_run_group_tests(tests, setup_plugins, teardown_plugins);
}
