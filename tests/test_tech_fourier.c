/* Tests of FourierFT (plugins/fourierft.c; Gao et al. 2024, arXiv
 * 2405.03003) and HRA (plugins/hra.c; Yuan et al. 2024, arXiv 2405.17484),
 * loaded as shared objects with dlopen.
 *
 * Model shapes (GPT-2 family, fused QKV, init_std 0.1, vocabulary 64,
 * batch 2 x 6, eval mode):  A: L=2, C=32, H=4, F=128;  B: L=3, C=48, H=6, F=96.
 *
 *  - descriptors: typology, options with PEFT's names and defaults,
 *    parameter names and PEFT keys, pr_technique_validate;
 *  - FourierFT's entry positions: this file's own MT19937 (checked against
 *    the two published reference outputs) and a full-array torch-style
 *    randperm give the positions; the plugin's merged dW equals
 *    scaling * real(IDFT2(F)) computed here in double by the direct formula
 *    dW[q, p] = kappa sum_k c_k cos(2 pi (p a_k / d_out + q b_k / d_in)),
 *    within 1e-5 (absolute, and relative to max |dW|), for every ifft2_norm, at qkv and at the q slice
 *    (a strided column slice of c_attn);
 *  - HRA's merged weight equals W_io' = H^T W_io, H = H_1 ... H_r
 *    (PEFT's W' = W H), the product formed here explicitly in double, within
 *    1e-5; the plugin's transform is orthogonal: W'^T W' = W^T W (1e-5);
 *  - identity at init: HRA's paired init (logits within 1e-6 of the base
 *    model's; an odd r or init_weights = false are not the identity);
 *    FourierFT with init_weights = true (bit-identical logits; PEFT's
 *    default init_weights = false draws the spectrum standard normal, as
 *    the paper's Algorithm 1, and does not start as the base model);
 *  - merge / unmerge: merged logits equal unmerged ones within 1e-5 of the
 *    largest logit, a second merge fails and changes nothing, unmerge
 *    restores every base tensor bit for bit;
 *  - counts from pr_module_plan_for, the attached module and the tensor
 *    table on both shapes, and at GPT-2 small with default options against
 *    Hugging Face PEFT's numbers (derivations at test_counts);
 *  - both plugins pass the conformance checker (core/plugins/check.h). */
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

#include "peftref/peftref.h"
#include "peftref/module.h"
#include "peftref/plugin.h"
#include "check.h"
#include "gradcheck.h"
#include "harness.h"

#define FOURIER_SO TEST_BUILDDIR "/plugins/.libs/fourierft.so"
#define HRA_SO TEST_BUILDDIR "/plugins/.libs/hra.so"

static void *ff_so, *hra_so;
static const pr_technique *ff, *hra;

static int setup_plugins(void **state)
{
    (void)state;
    ff = th_plugin_technique(FOURIER_SO, &ff_so);
    hra = th_plugin_technique(HRA_SO, &hra_so);
    return ff && hra ? 0 : -1;
}

static int teardown_plugins(void **state)
{
    (void)state;
    if (ff_so)
        dlclose(ff_so);
    if (hra_so)
        dlclose(hra_so);
    return 0;
}

/* ---- models ------------------------------------------------------------------ */

enum { MB = 2, MT = 6, MV = 64 };

typedef struct shape {
    int L, C, H, F;
} shape;

static const shape SHAPES[2] = { { 2, 32, 4, 128 }, { 3, 48, 6, 96 } };

static void shape_config(const shape *s, pr_model_config *c)
{
    *c = th_config(&(th_shape){ s->L, s->C, s->H, s->H, s->C / s->H, s->F, MV, 16 }, 7);
}

typedef struct run {
    pr_model *m;
    int tokens[MB * MT], targets[MB * MT];
} run;

static run *run_new(const shape *s)
{
    run *r = calloc(1, sizeof *r);
    assert_non_null(r);
    pr_model_config c;
    shape_config(s, &c);
    pr_error err = { 0 };
    if (pr_model_create(&c, &r->m, &err) || pr_model_reserve(r->m, MB, MT, &err))
        fail_msg("model: %s", err.msg);
    for (int i = 0; i < MB * MT; i++) {
        r->tokens[i] = (i * 17 + 5) % MV;
        r->targets[i] = (i * 29 + 3) % MV;
    }
    return r;
}

static void run_free(run *r)
{
    pr_model_free(r->m);
    free(r);
}

static double model_loss(void *arg)
{
    run *r = arg;
    return th_forward_ce(r->m, r->tokens, r->targets, MB, MT);
}

static float *logits_now(run *r)
{
    (void)model_loss(r);
    float *l = malloc((size_t)MB * MT * MV * sizeof(float));
    assert_non_null(l);
    memcpy(l, pr_model_logits(r->m), (size_t)MB * MT * MV * sizeof(float));
    return l;
}

static double logits_diff(const float *a, const float *b, double *scale)
{
    double worst = 0.0, s = 0.0;
    for (size_t i = 0; i < (size_t)MB * MT * MV; i++) {
        worst = fmax(worst, fabs((double)a[i] - b[i]));
        s = fmax(s, fabs((double)a[i]));
    }
    if (scale)
        *scale = s;
    return worst;
}

static pr_module *attach(run *r, const pr_technique *t, uint32_t sites, const pr_option_setting *o, int n)
{
    pr_module_spec spec = { .technique = t, .sites = sites, .options = o, .n_options = n, .trainable = 1,
                            .seed = 11 };
    return th_attach(r->m, &spec);
}

/* Fill every module tensor whose name ends with suffix. */
static int fill_module(run *r, const char *suffix, unsigned seed, float scale)
{
    size_t ls = strlen(suffix);
    int n = 0;
    for (int i = 0; i < pr_model_n_tensors(r->m); i++) {
        const pr_tensor_info *t = pr_model_tensor(r->m, i);
        size_t ln = strlen(t->name);
        if (t->kind == PR_TENSOR_MODULE && ln >= ls && strcmp(t->name + ln - ls, suffix) == 0)
            gc_fill(t->data, (size_t)t->numel, seed + (unsigned)n++, scale);
    }
    return n;
}

/* The module tensor "<module>/h.<layer>.<site>.<param>". */
static const pr_tensor_info *mtensor(const run *r, const char *mod, int layer, const char *site,
                                     const char *param)
{
    char name[128];
    snprintf(name, sizeof name, "%s/h.%d.%s.%s", mod, layer, site, param);
    const pr_tensor_info *t = pr_model_find_tensor(r->m, name);
    if (!t)
        fail_msg("no tensor %s", name);
    return t;
}

/* A site's frozen weight [d_in, d_out] copied out packed, in double. */
static double *site_weight(run *r, int site, int layer, int *d_in, int *d_out)
{
    float *w, *b;
    int ld;
    pr_error err = { 0 };
    assert_int_equal(pr_model_site_weight(r->m, site, layer, &w, &ld, &b, &err), PR_OK);
    assert_int_equal(pr_model_site_dims(r->m, site, d_in, d_out), PR_OK);
    double *c = malloc((size_t)*d_in * *d_out * sizeof(double));
    assert_non_null(c);
    for (int k = 0; k < *d_in; k++)
        for (int j = 0; j < *d_out; j++)
            c[(size_t)k * *d_out + j] = w[(size_t)k * ld + j];
    return c;
}

/* ---- merge cycle (as test_tech_lora.c) ------------------------------------------ */

typedef struct snapshot {
    int n;
    float **data;
} snapshot;

static snapshot snap_base(const run *r)
{
    snapshot s = { pr_model_n_tensors(r->m), NULL };
    s.data = calloc((size_t)s.n, sizeof *s.data);
    assert_non_null(s.data);
    for (int i = 0; i < s.n; i++) {
        const pr_tensor_info *t = pr_model_tensor(r->m, i);
        if (t->kind == PR_TENSOR_MODULE)
            continue;
        s.data[i] = malloc((size_t)t->numel * sizeof(float));
        assert_non_null(s.data[i]);
        memcpy(s.data[i], t->data, (size_t)t->numel * sizeof(float));
    }
    return s;
}

static int snap_changed(const run *r, const snapshot *s)
{
    int changed = 0;
    for (int i = 0; i < s->n; i++) {
        const pr_tensor_info *t = pr_model_tensor(r->m, i);
        if (s->data[i] && memcmp(s->data[i], t->data, (size_t)t->numel * sizeof(float)) != 0)
            changed++;
    }
    return changed;
}

static void snap_free(snapshot *s)
{
    for (int i = 0; i < s->n; i++)
        free(s->data[i]);
    free(s->data);
}

static void check_merge_cycle(run *r, pr_module *mod)
{
    snapshot base = snap_base(r);
    float *before = logits_now(r);
    pr_error err = { 0 };
    if (pr_module_merge(mod, &err))
        fail_msg("merge: %s", err.msg);
    assert_true(snap_changed(r, &base) > 0);
    float *merged = logits_now(r);
    double scale, worst = logits_diff(merged, before, &scale);
    printf("%s merge: max |merged - unmerged| = %.3e (max |logit| %.3e)\n", pr_module_name(mod), worst, scale);
    assert_true(scale > 0.1);
    assert_true(worst <= 1e-5 * scale);
    snapshot once = snap_base(r);
    assert_int_equal(pr_module_merge(mod, &err), PR_ERR_INVALID);
    assert_int_equal(snap_changed(r, &once), 0);
    if (pr_module_unmerge(mod, &err))
        fail_msg("unmerge: %s", err.msg);
    assert_int_equal(snap_changed(r, &base), 0);
    float *after = logits_now(r);
    assert_memory_equal(after, before, (size_t)MB * MT * MV * sizeof(float));
    assert_int_equal(pr_module_unmerge(mod, &err), PR_ERR_INVALID);
    snap_free(&base);
    snap_free(&once);
    free(before);
    free(merged);
    free(after);
}

/* ---- descriptors ------------------------------------------------------------------ */

static void test_descriptors(void **state)
{
    (void)state;
    pr_error err = { 0 };
    assert_int_equal(pr_technique_validate(ff, &err), PR_OK);
    assert_int_equal(pr_technique_validate(hra, &err), PR_OK);
    assert_string_equal(ff->name, "fourierft");
    assert_string_equal(hra->name, "hra");
    assert_non_null(strstr(ff->citation, "2405.03003"));
    assert_non_null(strstr(hra->citation, "2405.17484"));
    assert_string_equal(ff->peft_type, "FOURIERFT");
    assert_string_equal(hra->peft_type, "HRA");

    assert_int_equal(ff->intra, PR_INTRA_FACTORISED);
    assert_int_equal(ff->adaptation, PR_ADAPT_REPARAMETERISATION);
    assert_int_equal(ff->input, PR_INPUT_HIDDEN);
    assert_int_equal(ff->insertion, PR_INSERT_PARALLEL);
    assert_int_equal(ff->integration, PR_INTEGRATE_WEIGHT_DELTA);
    assert_int_equal(ff->default_sites, PR_SITE_BIT(PR_SITE_QKV));
    assert_true(th_option(ff, "n_frequency")->def == 1000);
    assert_true(th_option(ff, "scaling")->def == 150.0);
    assert_true(th_option(ff, "random_loc_seed")->def == 777);
    assert_true(th_option(ff, "init_weights")->def == 0);
    assert_true(th_option(ff, "ifft2_norm")->def == 0);
    assert_string_equal(th_option(ff, "ifft2_norm")->choices[0], "backward");
    assert_string_equal(ff->params[0].name, "fourierft_spectrum");
    assert_string_equal(ff->params[0].peft_key, "{prefix}.fourierft_spectrum");

    assert_int_equal(hra->intra, PR_INTRA_FACTORISED);
    assert_int_equal(hra->adaptation, PR_ADAPT_REPARAMETERISATION);
    assert_int_equal(hra->input, PR_INPUT_WEIGHTS);
    assert_int_equal(hra->integration, PR_INTEGRATE_CUSTOM);
    assert_int_equal(hra->default_sites, PR_SITE_BIT(PR_SITE_QKV));
    assert_true(th_option(hra, "r")->def == 8);
    assert_true(th_option(hra, "init_weights")->def == 1);
    assert_string_equal(hra->params[0].name, "hra_u");
    assert_string_equal(hra->params[0].shape, "d_in, r");
    assert_string_equal(hra->params[0].peft_key, "{prefix}.hra_u");
    assert_non_null(hra->merge);
    assert_non_null(ff->merge);
    assert_null(dlsym(ff_so, "ff_merge"));
    assert_null(dlsym(hra_so, "hra_merge"));
}

/* ---- FourierFT: positions and the inverse DFT ------------------------------------ */

/* MT19937 (Matsumoto & Nishimura 1998) with init_genrand seeding, written
 * here independently of the plugin. */
typedef struct mt_ref {
    uint32_t mt[624];
    int mti;
} mt_ref;

static void mt_ref_seed(mt_ref *g, uint32_t s)
{
    g->mt[0] = s;
    for (int i = 1; i < 624; i++)
        g->mt[i] = 1812433253u * (g->mt[i - 1] ^ (g->mt[i - 1] >> 30)) + (uint32_t)i;
    g->mti = 624;
}

static uint32_t mt_ref_next(mt_ref *g)
{
    static const uint32_t mag01[2] = { 0u, 0x9908b0dfu };
    uint32_t y;
    if (g->mti >= 624) {
        int kk;
        for (kk = 0; kk < 624 - 397; kk++) {
            y = (g->mt[kk] & 0x80000000u) | (g->mt[kk + 1] & 0x7fffffffu);
            g->mt[kk] = g->mt[kk + 397] ^ (y >> 1) ^ mag01[y & 1u];
        }
        for (; kk < 623; kk++) {
            y = (g->mt[kk] & 0x80000000u) | (g->mt[kk + 1] & 0x7fffffffu);
            g->mt[kk] = g->mt[kk + (397 - 624)] ^ (y >> 1) ^ mag01[y & 1u];
        }
        y = (g->mt[623] & 0x80000000u) | (g->mt[0] & 0x7fffffffu);
        g->mt[623] = g->mt[396] ^ (y >> 1) ^ mag01[y & 1u];
        g->mti = 0;
    }
    y = g->mt[g->mti++];
    y ^= (y >> 11);
    y ^= (y << 7) & 0x9d2c5680u;
    y ^= (y << 15) & 0xefc60000u;
    y ^= (y >> 18);
    return y;
}

/* torch.randperm(total, generator seeded with seed)[:n] (CPU, total < 2^32/20):
 * the full array, r[i] <-> r[i + random() % (total - i)]. */
static uint32_t *randperm_ref(uint32_t seed, uint32_t total, int n)
{
    uint32_t *r = malloc((size_t)total * sizeof *r);
    assert_non_null(r);
    for (uint32_t i = 0; i < total; i++)
        r[i] = i;
    mt_ref g;
    mt_ref_seed(&g, seed);
    for (uint32_t i = 0; i + 1 < total; i++) {
        uint32_t z = mt_ref_next(&g) % (total - i), t = r[i];
        r[i] = r[i + z];
        r[i + z] = t;
    }
    uint32_t *out = malloc((size_t)n * sizeof *out);
    assert_non_null(out);
    memcpy(out, r, (size_t)n * sizeof *out);
    free(r);
    return out;
}

static void test_mt19937_reference(void **state)
{
    (void)state;
    mt_ref g;
    mt_ref_seed(&g, 5489u);
    /* the first output for the reference seed 5489, and the 10000th, which
     * C++11 requires of std::mt19937 ([rand.predef]) */
    uint32_t first = mt_ref_next(&g), v = first;
    for (int i = 1; i < 10000; i++)
        v = mt_ref_next(&g);
    assert_int_equal(first, 3499211612u);
    assert_int_equal(v, 4123659995u);
    /* the positions are distinct */
    uint32_t *p = randperm_ref(777, 3072, 1000);
    char *seen = calloc(3072, 1);
    assert_non_null(seen);
    for (int k = 0; k < 1000; k++) {
        assert_true(p[k] < 3072);
        assert_int_equal(seen[p[k]], 0);
        seen[p[k]] = 1;
    }
    free(seen);
    free(p);
}

/* dW[q, p] = kappa sum_k c_k cos(2 pi (p a_k / M + q b_k / N)), M = d_out, N = d_in */
static void fourier_case(const shape *s, int site, const char *site_name, int n, double scaling, const char *norm,
                         unsigned seed)
{
    run *r = run_new(s);
    int d_in, d_out;
    double *w0 = site_weight(r, site, 0, &d_in, &d_out);
    char nbuf[16], sbuf[32];
    snprintf(nbuf, sizeof nbuf, "%d", n);
    snprintf(sbuf, sizeof sbuf, "%g", scaling);
    const pr_option_setting o[] = { { "n_frequency", nbuf, -1 }, { "scaling", sbuf, -1 },
                                    { "ifft2_norm", norm, -1 }, { "random_loc_seed", "4242", -1 } };
    pr_module *mod = attach(r, ff, PR_SITE_BIT(site), o, 4);
    assert_true(fill_module(r, "fourierft_spectrum", seed, 1.0f) > 0);
    const pr_tensor_info *sp = mtensor(r, "fourierft", 0, site_name, "fourierft_spectrum");
    assert_int_equal(sp->numel, n);
    pr_error err = { 0 };
    if (pr_module_merge(mod, &err))
        fail_msg("merge: %s", err.msg);
    double *w1 = site_weight(r, site, 0, &d_in, &d_out);

    const double M = d_out, N = d_in, mn = M * N;
    const double kappa = strcmp(norm, "ortho") == 0 ? scaling / sqrt(mn)
                         : strcmp(norm, "forward") == 0 ? scaling : scaling / mn;
    uint32_t *pos = randperm_ref(4242, (uint32_t)(d_in * d_out), n);
    double worst = 0.0, big = 0.0;
    for (int q = 0; q < d_in; q++)
        for (int p = 0; p < d_out; p++) {
            double ref = 0.0;
            for (int k = 0; k < n; k++) {
                double a = pos[k] / (uint32_t)d_in, b = pos[k] % (uint32_t)d_in;
                ref += (double)sp->data[k] * cos(2.0 * M_PI * (p * a / M + q * b / N));
            }
            ref *= kappa;
            double got = w1[(size_t)q * d_out + p] - w0[(size_t)q * d_out + p];
            worst = fmax(worst, fabs(got - ref));
            big = fmax(big, fabs(ref));
        }
    printf("fourierft %s (%d x %d, n %d, %s): max |dW - IDFT2 reference| = %.3e (max |dW| %.3e)\n", site_name, d_in,
           d_out, n, norm, worst, big);
    assert_true(big > 1e-3);
    assert_true(worst <= 1e-5 * big);
    assert_true(worst <= 1e-5);
    assert_int_equal(pr_module_unmerge(mod, &err), PR_OK);
    free(pos);
    free(w0);
    free(w1);
    run_free(r);
}

static void test_fourier_idft(void **state)
{
    (void)state;
    fourier_case(&SHAPES[0], PR_SITE_QKV, "qkv", 200, 150.0, "backward", 10);
    fourier_case(&SHAPES[0], PR_SITE_Q, "q", 60, 150.0, "ortho", 20);
    fourier_case(&SHAPES[1], PR_SITE_FFN_DOWN, "ffn.down", 300, 0.2, "forward", 30);
    fourier_case(&SHAPES[1], PR_SITE_O, "o", 1000, 150.0, "backward", 40);
}

/* ---- HRA: the explicit product ---------------------------------------------------- */

static void hra_case(const shape *s, int site, const char *site_name, const char *rank, unsigned seed)
{
    run *r = run_new(s);
    int d_in, d_out;
    double *w0 = site_weight(r, site, 0, &d_in, &d_out);
    const pr_option_setting o[] = { { "r", rank, -1 } };
    pr_module *mod = attach(r, hra, PR_SITE_BIT(site), o, 1);
    assert_true(fill_module(r, "hra_u", seed, 0.5f) > 0);
    const pr_tensor_info *u = mtensor(r, "hra", 0, site_name, "hra_u");
    const int R = atoi(rank);
    assert_int_equal(u->shape[0], d_in);
    assert_int_equal(u->shape[1], R);
    pr_error err = { 0 };
    if (pr_module_merge(mod, &err))
        fail_msg("merge: %s", err.msg);
    double *w1 = site_weight(r, site, 0, &d_in, &d_out);

    /* H = H_1 H_2 ... H_r (d_in x d_in), H_i = I - 2 u_i u_i^T / |u_i|^2 */
    const size_t D = (size_t)d_in;
    double *H = calloc(D * D, sizeof *H), *T = malloc(D * D * sizeof *T);
    assert_non_null(H);
    assert_non_null(T);
    for (size_t i = 0; i < D; i++)
        H[i * D + i] = 1.0;
    for (int i = 0; i < R; i++) {
        double n2 = 0.0;
        for (size_t q = 0; q < D; q++)
            n2 += (double)u->data[q * R + i] * u->data[q * R + i];
        /* H <- H (I - 2 u u^T / n2) */
        for (size_t a = 0; a < D; a++) {
            double hu = 0.0;
            for (size_t q = 0; q < D; q++)
                hu += H[a * D + q] * u->data[q * R + i];
            for (size_t b = 0; b < D; b++)
                T[a * D + b] = H[a * D + b] - 2.0 * hu * u->data[b * R + i] / n2;
        }
        memcpy(H, T, D * D * sizeof *H);
    }
    /* H is orthogonal */
    double orth = 0.0;
    for (size_t a = 0; a < D; a++)
        for (size_t b = 0; b < D; b++) {
            double g = 0.0;
            for (size_t q = 0; q < D; q++)
                g += H[q * D + a] * H[q * D + b];
            orth = fmax(orth, fabs(g - (a == b)));
        }
    assert_true(orth <= 1e-12);
    /* W'_io = H^T W_io */
    double worst = 0.0, big = 0.0;
    for (size_t q = 0; q < D; q++)
        for (int p = 0; p < d_out; p++) {
            double ref = 0.0;
            for (size_t a = 0; a < D; a++)
                ref += H[a * D + q] * w0[a * d_out + p];
            worst = fmax(worst, fabs(w1[q * d_out + p] - ref));
            big = fmax(big, fabs(ref));
        }
    /* the plugin's transform is orthogonal: W'^T W' = W^T W */
    double gram = 0.0, gbig = 0.0;
    for (int a = 0; a < d_out; a++)
        for (int b = a; b < d_out; b++) {
            double g0 = 0.0, g1 = 0.0;
            for (size_t q = 0; q < D; q++) {
                g0 += w0[q * d_out + a] * w0[q * d_out + b];
                g1 += w1[q * d_out + a] * w1[q * d_out + b];
            }
            gram = fmax(gram, fabs(g1 - g0));
            gbig = fmax(gbig, fabs(g0));
        }
    printf("hra %s (d_in %d, r %d): max |W' - H^T W| = %.3e (max %.3e); max |W'^T W' - W^T W| = %.3e (max %.3e)\n",
           site_name, d_in, R, worst, big, gram, gbig);
    assert_true(worst <= 1e-5 * big);
    assert_true(gram <= 1e-5 * gbig);
    /* the reflections moved the weight */
    double moved = 0.0;
    for (size_t i = 0; i < D * (size_t)d_out; i++)
        moved = fmax(moved, fabs(w1[i] - w0[i]));
    assert_true(moved > 1e-2 * big);
    assert_int_equal(pr_module_unmerge(mod, &err), PR_OK);
    free(H);
    free(T);
    free(w0);
    free(w1);
    run_free(r);
}

static void test_hra_product(void **state)
{
    (void)state;
    hra_case(&SHAPES[0], PR_SITE_QKV, "qkv", "4", 50);
    hra_case(&SHAPES[0], PR_SITE_V, "v", "3", 60);
    hra_case(&SHAPES[1], PR_SITE_FFN_DOWN, "ffn.down", "8", 70);
    hra_case(&SHAPES[1], PR_SITE_O, "o", "1", 80);
}

/* ---- identity at init ------------------------------------------------------------ */

static double init_distance(const shape *s, const pr_technique *t, const pr_option_setting *o, int n, int bitwise)
{
    run *r = run_new(s);
    float *base = logits_now(r);
    const uint32_t sites = PR_SITE_BIT(PR_SITE_QKV) | PR_SITE_BIT(PR_SITE_O) | PR_SITE_BIT(PR_SITE_FFN_DOWN);
    (void)attach(r, t, sites, o, n);
    float *with = logits_now(r);
    double scale, worst = logits_diff(with, base, &scale);
    if (bitwise)
        assert_memory_equal(with, base, (size_t)MB * MT * MV * sizeof(float));
    free(base);
    free(with);
    run_free(r);
    return worst / scale;
}

static void test_identity_at_init(void **state)
{
    (void)state;
    for (int k = 0; k < 2; k++) {
        /* HRA, PEFT's default init: pairs of equal vectors */
        double d = init_distance(&SHAPES[k], hra, NULL, 0, 0);
        printf("hra r 8 at init: max |logits - base| / max |logit| = %.3e\n", d);
        assert_true(d <= 1e-6);
        const pr_option_setting r6[] = { { "r", "6", -1 } };
        assert_true(init_distance(&SHAPES[k], hra, r6, 1, 0) <= 1e-6);
        /* not the identity: odd r, or init_weights = false */
        const pr_option_setting r5[] = { { "r", "5", -1 } };
        assert_true(init_distance(&SHAPES[k], hra, r5, 1, 0) > 1e-4);
        const pr_option_setting rnd[] = { { "init_weights", "false", -1 } };
        assert_true(init_distance(&SHAPES[k], hra, rnd, 1, 0) > 1e-4);
        /* FourierFT: zeros with init_weights = true, bit for bit */
        const pr_option_setting z[] = { { "init_weights", "true", -1 }, { "n_frequency", "500", -1 } };
        (void)init_distance(&SHAPES[k], ff, z, 2, 1);
        /* PEFT's default spectrum is standard normal: not the base model */
        const pr_option_setting dflt[] = { { "n_frequency", "500", -1 } };
        d = init_distance(&SHAPES[k], ff, dflt, 1, 0);
        printf("fourierft default init (standard normal spectrum): relative logit change %.3e\n", d);
        assert_true(d > 1e-4);
    }
}

/* ---- merge ----------------------------------------------------------------------- */

static void test_merge(void **state)
{
    (void)state;
    const uint32_t sites = PR_SITE_BIT(PR_SITE_Q) | PR_SITE_BIT(PR_SITE_V) | PR_SITE_BIT(PR_SITE_FFN_UP) |
                           PR_SITE_BIT(PR_SITE_O);
    for (int k = 0; k < 2; k++) {
        run *r = run_new(&SHAPES[k]);
        const pr_option_setting fo[] = { { "n_frequency", "300", -1 }, { "scaling", "20", -1 } };
        pr_module *mod = k ? attach(r, ff, 0, fo, 2) : attach(r, ff, sites, fo, 2);
        check_merge_cycle(r, mod);
        pr_model_detach_modules(r->m);
        mod = k ? attach(r, hra, 0, NULL, 0) : attach(r, hra, sites, NULL, 0);
        assert_true(fill_module(r, "hra_u", 900, 0.5f) > 0);
        check_merge_cycle(r, mod);
        run_free(r);
    }
}

/* ---- counts ---------------------------------------------------------------------- */

static void check_counts(const shape *s, const pr_technique *t, uint32_t sites, const pr_option_setting *o, int n_o,
                         int64_t want, int insertions)
{
    pr_model_config cfg;
    shape_config(s, &cfg);
    pr_module_spec spec = { .technique = t, .sites = sites, .options = o, .n_options = n_o, .trainable = 1,
                            .seed = 11 };
    pr_module_plan plan;
    pr_error err = { 0 };
    assert_int_equal(pr_module_plan_for(&cfg, &spec, &plan, &err), PR_OK);
    assert_int_equal(plan.params, want);
    assert_int_equal(plan.trainable, want);
    assert_int_equal(plan.insertions, insertions);
    run *r = run_new(s);
    pr_module *mod = attach(r, t, sites, o, n_o);
    assert_int_equal(pr_module_param_count(mod), want);
    assert_int_equal(pr_module_trainable_count(mod), want);
    int64_t in_table = 0;
    for (int i = 0; i < pr_model_n_tensors(r->m); i++) {
        const pr_tensor_info *ti = pr_model_tensor(r->m, i);
        if (ti->kind == PR_TENSOR_MODULE)
            in_table += ti->numel;
    }
    assert_int_equal(in_table, want);
    run_free(r);
}

static int64_t gpt2_small_plan(const pr_technique *t, uint32_t sites)
{
    pr_model_config cfg;
    assert_int_equal(pr_config_preset("gpt2-small", &cfg), PR_OK);
    pr_module_spec spec = { .technique = t, .sites = sites, .trainable = 1, .seed = 1 };
    pr_module_plan plan;
    pr_error err = { 0 };
    if (pr_module_plan_for(&cfg, &spec, &plan, &err))
        fail_msg("plan %s: %s", t->name, err.msg);
    assert_int_equal(plan.params, plan.trainable);
    return plan.trainable;
}

static void test_counts(void **state)
{
    (void)state;
    const uint32_t four = PR_SITE_BIT(PR_SITE_QKV) | PR_SITE_BIT(PR_SITE_O) | PR_SITE_BIT(PR_SITE_FFN_UP) |
                          PR_SITE_BIT(PR_SITE_FFN_DOWN);
    /* GPT-2 small, default options, Hugging Face PEFT's numbers:
     *  - FourierFT on c_attn: fourierft_spectrum has n_frequency = 1000
     *    entries per adapted layer (the positions are a plain attribute,
     *    not a parameter or buffer): 12 * 1000 = 12,000.
     *  - HRA r = 8 on c_attn: hra_u is (in_features, r) = (768, 8) per
     *    layer: 12 * 768 * 8 = 73,728.  (PEFT's HRA accepts nn.Linear and
     *    Conv2d only, not GPT-2's Conv1D: this is its formula for an
     *    nn.Linear(768, 2304).)
     *  - on c_attn, attn.c_proj, mlp.c_fc and mlp.c_proj (in features 768,
     *    768, 768, 3072): FourierFT 12 * 4 * 1000 = 48,000; HRA
     *    12 * 8 * (768 + 768 + 768 + 3072) = 516,096. */
    assert_int_equal(gpt2_small_plan(ff, 0), 12000);
    assert_int_equal(gpt2_small_plan(hra, 0), 73728);
    assert_int_equal(gpt2_small_plan(ff, four), 48000);
    assert_int_equal(gpt2_small_plan(hra, four), 516096);

    for (int k = 0; k < 2; k++) {
        const shape *s = &SHAPES[k];
        const int64_t L = s->L, C = s->C, F = s->F;
        /* defaults at qkv (C x 3C > 1000 entries) */
        check_counts(s, ff, 0, NULL, 0, L * 1000, s->L);
        check_counts(s, hra, 0, NULL, 0, L * 8 * C, s->L);
        /* per-site options; n_frequency 2000 at o takes C*C - 1 when C*C <= 2000 */
        const pr_option_setting fo[] = { { "n_frequency", "2000", PR_SITE_O }, { "n_frequency", "100", -1 } };
        const int64_t at_o = C * C <= 2000 ? C * C - 1 : 2000;
        check_counts(s, ff, four, fo, 2, L * (100 + at_o + 100 + 100), 4 * s->L);
        const pr_option_setting ho[] = { { "r", "2", PR_SITE_FFN_DOWN }, { "r", "4", -1 } };
        check_counts(s, hra, four, ho, 2, L * (4 * C + 4 * C + 4 * C + 2 * F), 4 * s->L);
    }
}

/* ---- the conformance checker ------------------------------------------------------ */

static void run_checker(const char *path)
{
    check_options o = { 0 };
    int n_checks = 0, n_failed = 0;
    pr_error err = { 0 };
    FILE *out = tmpfile();
    assert_non_null(out);
    int rc = check_plugin_file(path, &o, out, &n_checks, &n_failed, &err);
    if (rc || n_failed) {
        char line[512];
        rewind(out);
        while (fgets(line, sizeof line, out))
            fputs(line, stderr);
        if (rc)
            fprintf(stderr, "%s: %s\n", path, err.msg);
    }
    fclose(out);
    printf("checker %s: %d checks, %d failed\n", path, n_checks, n_failed);
    assert_int_equal(rc, PR_OK);
    /* load, gradient at 7 GPT-2 sites, params, determinism, accumulation,
     * save-load, options, finite */
    assert_true(n_checks >= 14);
    assert_int_equal(n_failed, 0);
}

static void test_checker(void **state)
{
    (void)state;
    run_checker(FOURIER_SO);
    run_checker(HRA_SO);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_descriptors),
        cmocka_unit_test(test_mt19937_reference),
        cmocka_unit_test(test_fourier_idft),
        cmocka_unit_test(test_hra_product),
        cmocka_unit_test(test_identity_at_init),
        cmocka_unit_test(test_merge),
        cmocka_unit_test(test_counts),
        cmocka_unit_test(test_checker),
    };
    return cmocka_run_group_tests(tests, setup_plugins, teardown_plugins);
}
