/* Tests of X-LoRA (Buehler & Buehler 2024, arXiv 2402.07148) as a loaded
 * composite plugin (plugins/xlora.c): frozen LoRA experts at qkv mixed per
 * token by a trainable scaling head on the site input.
 *
 * Model: the tiny GPT-2 of test_compose.c (L=2, C=32, H=4, F=64, V=64,
 * init_std 0.1), batch 2 x 6; experts: LoRA r=4 alpha=8 at qkv on every
 * layer, frozen, their tensors filled with values seeded by name.
 *
 *  - counts at GPT-2 small, experts LoRA r=8 at qkv (PEFT's default
 *    target c_attn, 12 layers), against PEFT's XLoraClassifier at
 *    xlora_depth 1 (one nn.Linear(hidden_size = 768, n_classes) with bias;
 *    our head reads the qkv input, whose width is also 768):
 *      default (layerwise_scalings false, 2 experts): 2 x 768 + 2 = 1,538
 *      layerwise_scalings true: nn.Linear(768, 2 x 12): 24 x 768 + 24 = 18,456
 *      3 experts, layerwise: 36 x 768 + 36 = 27,684
 *    and on the tiny model, attached: 2 x (32 + 1) = 66, layerwise 132;
 *  - the output: at layer 0 (whose site input is the same in every model)
 *    y_mix - y_0 = sum_k s_k (y_k - y_0), y_k the site output with expert
 *    k alone, s = softmax((x W^T + b) / T) computed here in double from
 *    the head's tensors (2e-5 of the largest contribution), also with
 *    top_k_lora 2 of 3 (and enable_softmax_topk), and without softmax;
 *  - one-hot scalings (W = 0, b = e_k without softmax; b = +-40 with it):
 *    the logits equal those of expert k alone (1e-6);
 *  - finite differences (test_compose's eps 3e-3, |g - fd| <= 1e-4 +
 *    5e-2 max(|g|, |fd|), 6 probes) of the head, for the default options,
 *    layerwise, top-k with softmax_topk, and of ln_1 of layer 0 (upstream:
 *    through the head's input and the experts'); the experts get no
 *    gradient;
 *  - a member count other than n_experts is refused at forward;
 *  - the conformance checker: loads the plugin and skips it as every
 *    composite (it does not drive compositions), no failure;
 *  - peftref train, end to end: tests/data/pipelines/xlora/expert_a.yaml
 *    and expert_b.yaml train two LoRA experts, xlora_mix.yaml mixes them
 *    (loaded frozen, fuse: with technique: xlora); 66 trainable, the
 *    validation loss falls, the experts' files are unchanged. */
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
#include "peftref/module.h"
#include "peftref/plugin.h"
#include "check.h"
#include "gradcheck.h"
#include "harness.h"

#define PLUGINS TEST_BUILDDIR "/plugins/.libs"
#define XLORA_SO PLUGINS "/xlora.so"
#define PIPES TEST_SRCDIR "/data/pipelines/xlora"
#define CORPUS TEST_SRCDIR "/data/train/corpus.txt"

static const th_fd FD_CHECK = { 3e-3, 5e-2, 1e-4, 6, 1e-7 };

enum { TB = 2, TT = 6, C = 32, QKV = 3 * C, V = 64 };

static pr_registry *reg;
static const pr_technique *lora, *xlora;

static pr_model *make_model(void)
{
    pr_model_config c = th_config(&(th_shape){ .L = 2, .C = C, .H = 4, .Hkv = 4, .hd = 8, .F = 64, .V = V,
                                               .max_seq = 16 }, 11);
    return th_model_new(&c, TB, TT);
}

static void loss_ctx_init(th_loss_ctx *lc, pr_model *m)
{
    th_loss_bind(lc, m, TB, TT);
    for (int i = 0; i < TB * TT; i++) {
        lc->tokens[i] = (7 * i + 3) % V;
        lc->targets[i] = (11 * i + 5) % V;
    }
}

static float *logits_of(pr_model *m)
{
    th_loss_ctx lc;
    loss_ctx_init(&lc, m);
    return th_logits_copy(&lc);
}

/* every tensor named prefix* from a generator seeded by its name */
static void randomise(pr_model *m, const char *prefix, float scale)
{
    size_t len = strlen(prefix);
    for (int i = 0; i < pr_model_n_tensors(m); i++) {
        const pr_tensor_info *t = pr_model_tensor(m, i);
        if (strncmp(t->name, prefix, len) != 0)
            continue;
        unsigned seed = 2166136261u;
        for (const char *c = t->name; *c; c++)
            seed = (seed ^ (unsigned char)*c) * 16777619u;
        gc_fill(t->data, (size_t)t->numel, seed, scale);
    }
}

static const char *const EXPERT[] = { "ea", "eb", "ec" };
static const pr_option_setting lora_opts[] = { { "r", "4", -1 }, { "alpha", "8", -1 } };

static pr_module *expert(pr_model *m, int k)
{
    pr_module_spec s = { .technique = lora, .name = EXPERT[k], .sites = PR_SITE_BIT(PR_SITE_QKV),
                         .options = lora_opts, .n_options = 2, .trainable = 0, .seed = 5 };
    pr_module *mod = th_attach(m, &s);
    randomise(m, EXPERT[k], 0.3f);
    return mod;
}

static pr_module *mix(pr_model *m, int n, const pr_option_setting *o, int n_o)
{
    pr_module *kids[3];
    for (int k = 0; k < n; k++)
        kids[k] = expert(m, k);
    pr_module_spec fs = { .technique = xlora, .name = "xl", .options = o, .n_options = n_o, .trainable = 1,
                          .seed = 9 };
    pr_module *f = NULL;
    pr_error err = { 0 };
    int rc = pr_module_compose(m, &fs, kids, n, &f, &err);
    if (rc)
        fprintf(stderr, "compose: %s\n", err.msg);
    assert_int_equal(rc, PR_OK);
    return f;
}

static const pr_tensor_info *tensor_with(const pr_model *m, const char *prefix, const char *part)
{
    for (int i = 0; i < pr_model_n_tensors(m); i++) {
        const pr_tensor_info *t = pr_model_tensor(m, i);
        if (strncmp(t->name, prefix, strlen(prefix)) == 0 && strstr(t->name, part))
            return t;
    }
    fail_msg("no tensor %s*%s*", prefix, part);
    return NULL;
}

/* ---- a probe: the qkv site's input and output at layer 0 ------------------------------------------ */

typedef struct probe {
    float x[TB * TT * C], y[TB * TT * QKV];
} probe;

static int probe_forward(void *self, const pr_site_io *io, pr_error *err)
{
    (void)err;
    probe *p = self;
    for (int r = 0; r < io->rows; r++) {
        memcpy(p->x + (size_t)r * C, io->x + (size_t)r * io->x_ld, C * sizeof(float));
        memcpy(p->y + (size_t)r * QKV, io->y + (size_t)r * io->y_ld, QKV * sizeof(float));
    }
    return PR_OK;
}

static int probe_backward(void *self, const pr_site_io *io, pr_error *err)
{
    (void)self, (void)io, (void)err;
    return PR_OK;
}

static void probe_at(pr_model *m, probe *p)
{
    pr_site_hook h = { probe_forward, probe_backward, p, NULL };
    pr_error err = { 0 };
    assert_int_equal(pr_model_attach_hook(m, PR_SITE_QKV, 0, &h, &err), PR_OK);
}

/* ---- counts ------------------------------------------------------------------------------------- */

static int64_t plan_gpt2_small(const pr_option_setting *o, int n_o)
{
    pr_model_config cfg;
    assert_int_equal(pr_config_preset("gpt2-small", &cfg), PR_OK);
    pr_module_spec ks = { .technique = lora, .sites = PR_SITE_BIT(PR_SITE_QKV), .trainable = 0 };
    pr_module_spec cs = { .technique = xlora, .options = o, .n_options = n_o, .trainable = 1 };
    pr_module_plan plan;
    pr_error err = { 0 };
    int rc = pr_composite_plan_for(&cfg, &cs, &ks, &plan, &err);
    if (rc)
        fprintf(stderr, "%s\n", err.msg);
    assert_int_equal(rc, PR_OK);
    assert_int_equal(plan.insertions, 12);
    assert_int_equal(plan.params, plan.trainable);
    return plan.trainable;
}

static void test_counts(void **state)
{
    (void)state;
    pr_error err = { 0 };
    assert_int_equal(pr_technique_validate(xlora, &err), PR_OK);
    const pr_option_setting lw[] = { { "layerwise_scalings", "true", -1 } };
    const pr_option_setting lw3[] = { { "layerwise_scalings", "true", -1 }, { "n_experts", "3", -1 } };
    assert_int_equal(plan_gpt2_small(NULL, 0), 2 * 768 + 2);
    assert_int_equal(plan_gpt2_small(lw, 1), 24 * 768 + 24);
    assert_int_equal(plan_gpt2_small(lw3, 2), 36 * 768 + 36);

    pr_model *m = make_model();
    pr_module *f = mix(m, 2, NULL, 0);
    assert_int_equal(pr_module_trainable_count(f), 2 * (C + 1));
    pr_model_free(m);
    m = make_model();
    f = mix(m, 2, lw, 1);
    assert_int_equal(pr_module_trainable_count(f), 2 * 2 * (C + 1));
    /* the experts stay frozen */
    assert_false(pr_model_find_tensor(m, "ea/h.0.qkv.lora_B")->trainable);
    pr_model_free(m);
}

/* ---- the output against the formula ------------------------------------------------------------------ */

typedef struct mix_case {
    int n, top_k, softmax_topk, softmax;
    double temperature;
    const pr_option_setting *o;
    int n_o;
} mix_case;

/* s from logits z, in double, as plugins/xlora.c's comment states */
static void want_scalings(const mix_case *mc, const double *z, double *s)
{
    int n = mc->n;
    double p[3] = { 0, 0, 0 }, keep[3] = { 1, 1, 1 };
    if (mc->softmax) {
        double mx = -INFINITY, sum = 0;
        for (int k = 0; k < n; k++)
            mx = fmax(mx, z[k] / mc->temperature);
        for (int k = 0; k < n; k++)
            sum += (p[k] = exp(z[k] / mc->temperature - mx));
        for (int k = 0; k < n; k++)
            p[k] /= sum;
    } else {
        memcpy(p, z, sizeof p);
    }
    if (mc->top_k) {
        /* the smallest of 3 is masked (top 2 of 3) */
        int lo = 0;
        for (int k = 1; k < n; k++)
            lo = p[k] < p[lo] ? k : lo;
        keep[lo] = 0;
    }
    double sum = 0;
    for (int k = 0; k < n; k++) {
        s[k] = p[k] * keep[k];
        sum += keep[k] ? exp(s[k]) : 0.0;
    }
    if (mc->top_k && mc->softmax_topk)
        for (int k = 0; k < n; k++)
            s[k] = keep[k] ? exp(s[k]) / sum : 0.0;
}

static void check_mixture(const mix_case *mc)
{
    probe *p0 = calloc(1, sizeof *p0), *pm = calloc(1, sizeof *pm), *pk = calloc(3, sizeof *pk);
    assert_non_null(p0), assert_non_null(pm), assert_non_null(pk);
    pr_model *base = make_model();
    probe_at(base, p0);
    free(logits_of(base));
    for (int k = 0; k < mc->n; k++) {
        pr_model *alone = make_model();
        expert(alone, k);
        probe_at(alone, &pk[k]);
        free(logits_of(alone));
        pr_model_free(alone);
    }
    pr_model *m = make_model();
    mix(m, mc->n, mc->o, mc->n_o);
    probe_at(m, pm);
    randomise(m, "xl/", 0.5f);
    free(logits_of(m));
    const float *w = tensor_with(m, "xl/", "head_weight")->data, *b = tensor_with(m, "xl/", "head_bias")->data;
    double dev = 0, size = 0;
    for (int r = 0; r < TB * TT; r++) {
        /* the layer-0 input is the same in every model */
        for (int j = 0; j < C; j++)
            assert_true(p0->x[r * C + j] == pm->x[r * C + j]);
        double z[3] = { 0, 0, 0 }, s[3];
        for (int k = 0; k < mc->n; k++) {
            z[k] = b[k];
            for (int j = 0; j < C; j++)
                z[k] += (double)w[k * C + j] * p0->x[r * C + j];
        }
        want_scalings(mc, z, s);
        for (int j = 0; j < QKV; j++) {
            double want = 0;
            for (int k = 0; k < mc->n; k++) {
                double hk = (double)pk[k].y[r * QKV + j] - p0->y[r * QKV + j];
                want += s[k] * hk;
                size = fmax(size, fabs(hk));
            }
            dev = fmax(dev, fabs(((double)pm->y[r * QKV + j] - p0->y[r * QKV + j]) - want));
        }
    }
    fprintf(stderr, "mixture n=%d top_k=%d: max |dev| %.3g of contributions up to %.3g\n", mc->n, mc->top_k, dev,
            size);
    assert_true(size > 1e-2);
    assert_true(dev <= 2e-5 * size);
    pr_model_free(m);
    pr_model_free(base);
    free(p0), free(pm), free(pk);
}

static void test_mixture_formula(void **state)
{
    (void)state;
    const pr_option_setting t07[] = { { "n_experts", "3", -1 }, { "softmax_temperature", "0.7", -1 } };
    check_mixture(&(mix_case){ .n = 2, .softmax = 1, .temperature = 1.0 });
    check_mixture(&(mix_case){ .n = 3, .softmax = 1, .temperature = 0.7, .o = t07, .n_o = 2 });
    const pr_option_setting top[] = { { "n_experts", "3", -1 }, { "top_k_lora", "2", -1 } };
    check_mixture(&(mix_case){ .n = 3, .top_k = 2, .softmax = 1, .temperature = 1.0, .o = top, .n_o = 2 });
    const pr_option_setting topsm[] = { { "n_experts", "3", -1 }, { "top_k_lora", "2", -1 },
                                        { "enable_softmax_topk", "true", -1 } };
    check_mixture(&(mix_case){ .n = 3, .top_k = 2, .softmax_topk = 1, .softmax = 1, .temperature = 1.0,
                               .o = topsm, .n_o = 3 });
    const pr_option_setting nosm[] = { { "enable_softmax", "false", -1 } };
    check_mixture(&(mix_case){ .n = 2, .softmax = 0, .temperature = 1.0, .o = nosm, .n_o = 1 });
}

/* ---- one-hot scalings give one expert alone ------------------------------------------------------------ */

static void set_head(pr_model *m, int k, float hi, float lo)
{
    for (int i = 0; i < pr_model_n_tensors(m); i++) {
        const pr_tensor_info *t = pr_model_tensor(m, i);
        if (strncmp(t->name, "xl/", 3) != 0)
            continue;
        if (strstr(t->name, "head_weight"))
            memset(t->data, 0, (size_t)t->numel * sizeof(float));
        else
            for (int64_t j = 0; j < t->numel; j++)
                t->data[j] = j % 2 == k ? hi : lo;
    }
}

static void test_one_hot(void **state)
{
    (void)state;
    const pr_option_setting nosm[] = { { "enable_softmax", "false", -1 } };
    for (int k = 0; k < 2; k++) {
        pr_model *alone = make_model();
        expert(alone, k);
        float *want = logits_of(alone);
        for (int softmax = 0; softmax < 2; softmax++) {
            pr_model *m = make_model();
            mix(m, 2, softmax ? NULL : nosm, softmax ? 0 : 1);
            set_head(m, k, softmax ? 40.0f : 1.0f, softmax ? -40.0f : 0.0f);
            float *got = logits_of(m);
            double d = th_max_abs_diff(want, got, (size_t)TB * TT * V);
            fprintf(stderr, "one-hot on expert %d (softmax %d): max |logit diff| %.3g\n", k, softmax, d);
            assert_true(d <= 1e-6);
            free(got);
            pr_model_free(m);
        }
        free(want);
        pr_model_free(alone);
    }
}

/* ---- gradients ---------------------------------------------------------------------------------------- */

static int check_grads(pr_model *m, const char *prefix)
{
    th_loss_ctx lc;
    loss_ctx_init(&lc, m);
    return th_check_grads(&lc, &prefix, 1, 1, &FD_CHECK);
}

static void grads_case(int n, const pr_option_setting *o, int n_o)
{
    pr_model *m = make_model();
    mix(m, n, o, n_o);
    randomise(m, "xl/", 0.5f);
    assert_int_equal(check_grads(m, "xl/"), 2);
    assert_null(pr_model_find_tensor(m, "ea/h.0.qkv.lora_B")->grad);
    pr_error err = { 0 };
    assert_int_equal(pr_model_set_trainable(m, "h.0.ln_1.weight", 1, &err), PR_OK);
    assert_int_equal(check_grads(m, "h.0.ln_1.weight"), 1);
    pr_model_free(m);
}

static void test_gradients(void **state)
{
    (void)state;
    grads_case(2, NULL, 0);
    const pr_option_setting lw[] = { { "layerwise_scalings", "true", -1 }, { "softmax_temperature", "0.5", -1 } };
    grads_case(2, lw, 2);
    const pr_option_setting top[] = { { "n_experts", "3", -1 }, { "top_k_lora", "2", -1 },
                                      { "enable_softmax_topk", "true", -1 } };
    grads_case(3, top, 3);
    const pr_option_setting nosm[] = { { "enable_softmax", "false", -1 }, { "global_scaling_weight", "0.5", -1 } };
    grads_case(2, nosm, 2);
}

/* n_experts must be the member count */
static void test_member_count(void **state)
{
    (void)state;
    const pr_option_setting three[] = { { "n_experts", "3", -1 } };
    pr_model *m = make_model();
    mix(m, 2, three, 1);
    th_loss_ctx lc;
    loss_ctx_init(&lc, m);
    pr_error err = { 0 };
    assert_int_not_equal(pr_model_forward(m, &lc.batch, NULL, &err), PR_OK);
    assert_non_null(strstr(err.msg, "n_experts"));
    pr_model_free(m);
}

/* ---- the conformance checker ------------------------------------------------------------------------- */

static void test_checker(void **state)
{
    (void)state;
    check_options o = { 0 };
    int n_checks = 0, n_failed = 0;
    pr_error err = { 0 };
    FILE *out = tmpfile();
    assert_non_null(out);
    int rc = check_plugin_file(XLORA_SO, &o, out, &n_checks, &n_failed, &err);
    char line[512], text[4096] = "";
    rewind(out);
    while (fgets(line, sizeof line, out))
        if (strlen(text) + strlen(line) < sizeof text)
            strcat(text, line);
    fclose(out);
    fputs(text, stderr);
    assert_int_equal(rc, PR_OK);
    assert_int_equal(n_failed, 0);
    assert_true(n_checks >= 1);
    assert_non_null(strstr(text, "PASS xlora.so/load"));
    assert_non_null(strstr(text, "SKIP xlora: a composite technique"));
}

/* ---- peftref train, end to end --------------------------------------------------------------------------- */

static char *slurp(const char *path, size_t *n)
{
    FILE *f = fopen(path, "rb");
    assert_non_null(f);
    fseek(f, 0, SEEK_END);
    long len = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *buf = malloc((size_t)len + 1);
    assert_non_null(buf);
    assert_int_equal(fread(buf, 1, (size_t)len, f), (size_t)len);
    fclose(f);
    buf[len] = '\0';
    *n = (size_t)len;
    return buf;
}

/* "val_loss A -> B" of the summary line on stdout */
static void val_losses(const char *out_path, double *first, double *last)
{
    size_t n;
    char *text = slurp(out_path, &n);
    const char *s = strstr(text, "val_loss ");
    assert_non_null(s);
    while (strstr(s + 1, "val_loss ") && strstr(s + 1, " -> "))
        s = strstr(s + 1, "val_loss ");
    assert_int_equal(sscanf(s, "val_loss %lf -> %lf", first, last), 2);
    free(text);
}

static void train(const char *pipe, const char *dir, const char *run)
{
    char set_out[600], set_data[600], out_path[600], err_path[600];
    snprintf(set_out, sizeof set_out, "train.output=%s/%s", dir, run);
    snprintf(set_data, sizeof set_data, "task.train=%s", CORPUS);
    snprintf(out_path, sizeof out_path, "%s/%s.out", dir, run);
    snprintf(err_path, sizeof err_path, "%s/%s.err", dir, run);
    const char *args[] = { "peftref", "train", pipe, "--set", set_out, "--set", set_data, NULL };
    int rc = th_run_cli(PEFTREF_BIN, PLUGINS, args, out_path, err_path);
    if (rc) {
        size_t n;
        char *e = slurp(err_path, &n);
        fprintf(stderr, "%s: %s\n", pipe, e);
        free(e);
    }
    assert_int_equal(rc, 0);
}

static void test_cli_train(void **state)
{
    (void)state;
    char *dir = th_temp_dir("/tmp/peftref-xlora-XXXXXX");
    char path[600], mixf[600];
    double a0, a1, b0, b1, m0, m1;
    train(PIPES "/expert_a.yaml", dir, "expert_a");
    train(PIPES "/expert_b.yaml", dir, "expert_b");
    snprintf(path, sizeof path, "%s/expert_a.out", dir);
    val_losses(path, &a0, &a1);
    snprintf(path, sizeof path, "%s/expert_b.out", dir);
    val_losses(path, &b0, &b1);
    assert_true(a1 < a0 && b1 < b0);
    /* the mixture's fuse: paths are relative to its file: put it next to the runs */
    size_t n, na, nb;
    char *yaml = slurp(PIPES "/xlora_mix.yaml", &n);
    snprintf(mixf, sizeof mixf, "%s/xlora_mix.yaml", dir);
    FILE *f = fopen(mixf, "w");
    assert_non_null(f);
    assert_int_equal(fwrite(yaml, 1, n, f), n);
    fclose(f);
    free(yaml);
    snprintf(path, sizeof path, "%s/expert_a/modules/expert.safetensors", dir);
    char *ea = slurp(path, &na);
    snprintf(path, sizeof path, "%s/expert_b/modules/expert.safetensors", dir);
    char *eb = slurp(path, &nb);

    char set_data[600], out_path[600];
    snprintf(set_data, sizeof set_data, "task.train=%s", CORPUS);
    snprintf(out_path, sizeof out_path, "%s/plan.out", dir);
    const char *plan_args[] = { "peftref", "plan", mixf, "--set", set_data, NULL };
    assert_int_equal(th_run_cli(PEFTREF_BIN, PLUGINS, plan_args, out_path, NULL), 0);
    char *plan = slurp(out_path, &n);
    assert_non_null(strstr(plan, "trainable params: 66 "));
    free(plan);

    train(mixf, dir, "run_mix");
    snprintf(path, sizeof path, "%s/run_mix.out", dir);
    val_losses(path, &m0, &m1);
    fprintf(stderr, "experts: val %.4f -> %.4f, %.4f -> %.4f; xlora: val %.4f -> %.4f\n", a0, a1, b0, b1, m0, m1);
    assert_true(m1 < m0);
    /* the experts' files are as they were, and the mixture was written */
    size_t na1, nb1;
    snprintf(path, sizeof path, "%s/expert_a/modules/expert.safetensors", dir);
    char *ea1 = slurp(path, &na1);
    snprintf(path, sizeof path, "%s/expert_b/modules/expert.safetensors", dir);
    char *eb1 = slurp(path, &nb1);
    assert_true(na1 == na && memcmp(ea, ea1, na) == 0);
    assert_true(nb1 == nb && memcmp(eb, eb1, nb) == 0);
    snprintf(path, sizeof path, "%s/run_mix/modules/xlora.safetensors", dir);
    FILE *g = fopen(path, "rb");
    assert_non_null(g);
    fclose(g);
    free(ea), free(eb), free(ea1), free(eb1);
    th_remove_tree(dir);
    free(dir);
}

/* ---- setup ------------------------------------------------------------------------------------------- */

static int setup(void **state)
{
    (void)state;
    const char *need[] = { "lora", "xlora" };
    if (th_registry_open(PLUGINS, need, 2, &reg))
        return -1;
    lora = pr_registry_find(reg, "lora");
    xlora = pr_registry_find(reg, "xlora");
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    pr_registry_free(reg);
    return 0;
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_counts),
        cmocka_unit_test(test_mixture_formula),
        cmocka_unit_test(test_one_hot),
        cmocka_unit_test(test_gradients),
        cmocka_unit_test(test_member_count),
        cmocka_unit_test(test_checker),
        cmocka_unit_test(test_cli_train),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
