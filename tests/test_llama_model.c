/* peftref tests: the LLaMA family end to end on tiny models.
 *
 * Gradients of every base tensor (full finetuning) and of LoRA on all
 * seven projections are checked against central finite differences for
 * each variant the family runs: grouped-, multi- and multi-head
 * attention, tied and untied heads, d_head != d_model / H, rope_scaling
 * linear and llama3, attention and MLP biases, Qwen2's q/k/v biases,
 * Qwen3's q/k norms, Mistral's window.  Stream and sub-layer sites get
 * IA3-style rescaling hooks.  Numbers against an independent reference
 * are test_llama_parity's. */
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
#include "gradcheck.h"
#include "harness.h"

#define LORA_SO TEST_BUILDDIR "/plugins/.libs/lora.so"
#define IA3_SO TEST_BUILDDIR "/plugins/.libs/ia3.so"
#define PREFIX_SO TEST_BUILDDIR "/plugins/.libs/prefix_tuning.so"

/* Central differences as test_model.c argues them (eps 3e-3 on float
 * parameters, the loss recomputed in double from the logits): 1e-4
 * absolute plus 5% relative. */
static const th_fd fd = { .eps = 3e-3, .rtol = 5e-2, .atol = 1e-4, .probes = 6, .gmin = 1e-6 };

enum { TB = 2, TT = 8 };

/* llama-tiny, shrunk: L=2, C=32, H=4 over Hkv=2 heads of 8, F=48, V=64 */
static pr_model_config tiny(void)
{
    pr_model_config c;
    assert_int_equal(pr_config_preset("llama-tiny", &c), PR_OK);
    c.d_model = 32;
    c.d_head = 8;
    c.d_ff = 48;
    c.vocab_size = 64;
    c.max_seq = 16;
    c.init_std = 0.2f; /* attention and SiLU far from linear */
    c.seed = 7;
    return c;
}

typedef struct variant {
    const char *name;
    void (*apply)(pr_model_config *c);
} variant;

static void v_gqa(pr_model_config *c) { (void)c; }
static void v_mqa_tied_linear(pr_model_config *c)
{
    c->n_kv_heads = 1;
    c->tied_head = 1;
    c->rope_scaling = PR_ROPE_LINEAR;
    c->rope_factor = 2.0f;
}
static void v_mha_hd_llama3_bias(pr_model_config *c)
{
    c->n_kv_heads = 4;
    c->d_head = 12; /* Q = 48 != C = 32 */
    c->rope_scaling = PR_ROPE_LLAMA3;
    c->rope_factor = 8.0f;
    c->rope_low_freq_factor = 1.0f;
    c->rope_high_freq_factor = 4.0f;
    c->rope_orig_max_pos = 64;
    c->qkv_bias = c->o_bias = c->mlp_bias = 1;
}
static void v_qwen2(pr_model_config *c)
{
    c->variant = PR_VARIANT_QWEN2;
    c->qkv_bias = 1;
    c->tied_head = 1;
}
static void v_qwen3(pr_model_config *c)
{
    c->variant = PR_VARIANT_QWEN3;
    c->qk_norm = 1;
    c->d_head = 10;
}
static void v_mistral(pr_model_config *c)
{
    c->variant = PR_VARIANT_MISTRAL;
    c->sliding_window = 12; /* more than TT: changes nothing */
}

static const variant variants[] = {
    { "gqa", v_gqa },
    { "mqa, tied, rope linear", v_mqa_tied_linear },
    { "mha, d_head 12, rope llama3, biases", v_mha_hd_llama3_bias },
    { "qwen2", v_qwen2 },
    { "qwen3", v_qwen3 },
    { "mistral", v_mistral },
};
#define N_VARIANTS ((int)(sizeof variants / sizeof variants[0]))

static pr_model *variant_model(int i)
{
    pr_model_config c = tiny();
    variants[i].apply(&c);
    return th_model_new(&c, TB, TT);
}

/* Gains of RMSNorm start at 1 and biases at 0; move them so their
 * gradients are generic and the layers they scale are not symmetric. */
static void perturb_norms_and_biases(pr_model *m, unsigned seed)
{
    for (int i = 0; i < pr_model_n_tensors(m); i++) {
        const pr_tensor_info *t = pr_model_tensor(m, i);
        if (t->kind == PR_TENSOR_NORM_GAIN) {
            gc_fill(t->data, (size_t)t->numel, seed + (unsigned)i, 0.3f);
            for (int64_t j = 0; j < t->numel; j++)
                t->data[j] += 1.0f;
        } else if (t->kind == PR_TENSOR_BIAS) {
            gc_fill(t->data, (size_t)t->numel, seed + (unsigned)i, 0.2f);
        }
    }
}

static void test_counts_and_names(void **state)
{
    (void)state;
    for (int i = 0; i < N_VARIANTS; i++) {
        pr_model *m = variant_model(i);
        const pr_model_config *c = pr_model_get_config(m);
        assert_true(pr_model_param_count(m) == pr_config_param_count(c));
        int Q = c->n_heads * c->d_head, KV = c->n_kv_heads * c->d_head;
        const pr_tensor_info *t = pr_model_find_tensor(m, "model.layers.1.self_attn.q_proj.weight");
        assert_non_null(t);
        assert_true(t->shape[0] == Q && t->shape[1] == c->d_model);
        t = pr_model_find_tensor(m, "model.layers.0.self_attn.k_proj.weight");
        assert_true(t->shape[0] == KV && t->shape[1] == c->d_model);
        t = pr_model_find_tensor(m, "model.layers.0.self_attn.o_proj.weight");
        assert_true(t->shape[0] == c->d_model && t->shape[1] == Q);
        assert_true((pr_model_find_tensor(m, "model.layers.0.self_attn.q_proj.bias") != NULL) == c->qkv_bias);
        assert_true((pr_model_find_tensor(m, "model.layers.0.self_attn.o_proj.bias") != NULL) == c->o_bias);
        assert_true((pr_model_find_tensor(m, "model.layers.0.mlp.down_proj.bias") != NULL) == c->mlp_bias);
        assert_true((pr_model_find_tensor(m, "model.layers.1.self_attn.k_norm.weight") != NULL) == c->qk_norm);
        assert_true((pr_model_find_tensor(m, "lm_head.weight") != NULL) == !c->tied_head);
        assert_non_null(pr_model_find_tensor(m, "model.norm.weight"));
        int din, dout;
        assert_int_equal(pr_model_site_dims(m, PR_SITE_FFN_GATE, &din, &dout), 0);
        assert_true(din == c->d_model && dout == c->d_ff);
        assert_int_equal(pr_model_site_dims(m, PR_SITE_QKV, NULL, NULL), -1);
        /* the [d_in, d_out] public view does not exist for nn.Linear weights */
        float *w;
        int ld;
        pr_error err = { 0 };
        assert_int_equal(pr_model_site_weight(m, PR_SITE_Q, 0, &w, &ld, NULL, &err), PR_ERR_UNSUPPORTED);
        assert_int_equal(pr_model_site_weight(m, PR_SITE_ATTN_K, 0, &w, &ld, NULL, &err), PR_ERR_UNSUPPORTED);
        assert_non_null(strstr(err.msg, "RoPE"));
        pr_model_free(m);
    }
}

/* Full finetuning: every base tensor's gradient by finite differences. */
static void test_grad_full(void **state)
{
    (void)state;
    for (int i = 0; i < N_VARIANTS; i++) {
        print_message("variant %s\n", variants[i].name);
        pr_model *m = variant_model(i);
        perturb_norms_and_biases(m, 100 + (unsigned)i);
        pr_error err = { 0 };
        assert_int_equal(pr_model_set_trainable(m, "*", 1, &err), PR_OK);
        th_loss_ctx lc;
        th_loss_init_rng(&lc, m, TB, TT, 11 + (unsigned)i);
        lc.targets[5] = -1;
        const char *all[] = { "" };
        int n = th_check_grads(&lc, all, 1, 1, &fd);
        assert_true(n == pr_model_n_tensors(m));
        pr_model_free(m);
    }
}

/* LoRA (the plugin) on q, k, v, o, gate, up, down with lora_B nonzero;
 * the base frozen. */
static void test_grad_lora_seven(void **state)
{
    (void)state;
    void *h = NULL;
    const pr_technique *lora = th_plugin_technique(LORA_SO, &h);
    for (int i = 0; i < N_VARIANTS; i++) {
        print_message("variant %s\n", variants[i].name);
        pr_model *m = variant_model(i);
        perturb_norms_and_biases(m, 200 + (unsigned)i);
        uint32_t sites = PR_SITE_BIT(PR_SITE_Q) | PR_SITE_BIT(PR_SITE_K) | PR_SITE_BIT(PR_SITE_V) |
                         PR_SITE_BIT(PR_SITE_O) | PR_SITE_BIT(PR_SITE_FFN_GATE) |
                         PR_SITE_BIT(PR_SITE_FFN_UP) | PR_SITE_BIT(PR_SITE_FFN_DOWN);
        const pr_option_setting o[] = { { "r", "2", -1 }, { "alpha", "4", -1 } };
        pr_module_spec spec = { .technique = lora, .sites = sites, .options = o, .n_options = 2,
                                .trainable = 1, .seed = 3 };
        th_attach(m, &spec);
        int nb = 0;
        for (int t = 0; t < pr_model_n_tensors(m); t++) {
            const pr_tensor_info *ti = pr_model_tensor(m, t);
            if (ti->kind == PR_TENSOR_MODULE && strstr(ti->name, "lora_B")) {
                gc_fill(ti->data, (size_t)ti->numel, 300 + (unsigned)t, 0.3f);
                nb++;
            }
        }
        assert_int_equal(nb, 7 * 2);
        th_loss_ctx lc;
        th_loss_init_rng(&lc, m, TB, TT, 21 + (unsigned)i);
        const char *mods[] = { "lora/" };
        assert_int_equal(th_check_grads(&lc, mods, 1, 1, &fd), 7 * 2 * 2);
        pr_model_free(m);
    }
    dlclose(h);
}

/* (IA)^3 at its LLaMA defaults (k_proj, v_proj, down_proj as Hugging Face
 * PEFT targets them) and rescaling at the stream and sub-layer sites. */
static void test_grad_ia3_sites(void **state)
{
    (void)state;
    void *h = NULL;
    const pr_technique *ia3 = th_plugin_technique(IA3_SO, &h);
    static const int site_sets[][3] = {
        { PR_SITE_K, PR_SITE_V, PR_SITE_FFN_ACT },
        { PR_SITE_ATTN_K, PR_SITE_ATTN_V, PR_SITE_FFN_ACT },
    };
    for (int s = 0; s < 2; s++) {
        for (int i = 0; i < N_VARIANTS; i++) {
            pr_model *m = variant_model(i);
            uint32_t sites = 0;
            for (int k = 0; k < 3; k++)
                sites |= PR_SITE_BIT(site_sets[s][k]);
            pr_module_spec spec = { .technique = ia3, .sites = sites, .trainable = 1, .seed = 5 };
            pr_module *mod = th_attach(m, &spec);
            (void)mod;
            /* move the vectors away from 1 */
            for (int t = 0; t < pr_model_n_tensors(m); t++) {
                const pr_tensor_info *ti = pr_model_tensor(m, t);
                if (ti->kind == PR_TENSOR_MODULE)
                    for (int64_t j = 0; j < ti->numel; j++)
                        ti->data[j] = 1.0f + 0.3f * sinf((float)(j + 7 * t));
            }
            th_loss_ctx lc;
            th_loss_init_rng(&lc, m, TB, TT, 31 + (unsigned)i);
            const char *mods[] = { "ia3/" };
            assert_true(th_check_grads(&lc, mods, 1, 1, &fd) == 3 * 2);
            pr_model_free(m);
        }
    }
    dlclose(h);
}

/* Rows of a batch do not see each other, and a sequence's logits do not
 * depend on later tokens (causal attention with RoPE). */
static void test_causal_and_batch_independent(void **state)
{
    (void)state;
    for (int i = 0; i < N_VARIANTS; i++) {
        pr_model *m = variant_model(i);
        th_loss_ctx lc;
        th_loss_init_rng(&lc, m, TB, TT, 41);
        float *a = th_logits_copy(&lc);
        int V = pr_model_get_config(m)->vocab_size;
        /* change the last token of sequence 0 and every token of sequence 1 */
        lc.tokens[TT - 1] = (lc.tokens[TT - 1] + 1) % V;
        for (int t = 0; t < TT; t++)
            lc.tokens[TT + t] = (lc.tokens[TT + t] + 3) % V;
        float *b = th_logits_copy(&lc);
        assert_true(th_max_abs_diff(a, b, (size_t)(TT - 1) * V) == 0.0);
        assert_true(th_max_abs_diff(a + (size_t)(TT - 1) * V, b + (size_t)(TT - 1) * V, (size_t)V) > 0.0);
        free(a);
        free(b);
        pr_model_free(m);
    }
}

/* The key/value cache: a prompt of 3 tokens, then one token at a time,
 * gives the full forward's logits row for row (1e-5 of their max), with
 * prefix tuning's keys and values and ia3 at attn.k, attn.v attached; a
 * cache is refused where the model has virtual positions. */
static void test_decode_matches_forward(void **state)
{
    (void)state;
    void *hp = NULL, *hi = NULL;
    const pr_plugin *pp = th_plugin_open(PREFIX_SO, &hp);
    assert_non_null(pp);
    const pr_technique *prefix = NULL;
    for (uint32_t i = 0; i < pp->n_techniques; i++)
        if (strcmp(pp->techniques[i]->name, "prefix_tuning") == 0)
            prefix = pp->techniques[i];
    assert_non_null(prefix);
    const pr_technique *ia3 = th_plugin_technique(IA3_SO, &hi);
    for (int i = 0; i < N_VARIANTS; i++) {
        pr_model *m = variant_model(i);
        perturb_norms_and_biases(m, 500 + (unsigned)i);
        const pr_option_setting po[] = { { "n_tokens", "3", -1 } };
        pr_module_spec ps = { .technique = prefix, .options = po, .n_options = 1, .trainable = 1, .seed = 9 };
        th_attach(m, &ps);
        pr_module_spec is = { .technique = ia3, .sites = PR_SITE_BIT(PR_SITE_ATTN_K) | PR_SITE_BIT(PR_SITE_ATTN_V),
                              .trainable = 1, .seed = 5 };
        th_attach(m, &is);
        for (int t = 0; t < pr_model_n_tensors(m); t++) {
            const pr_tensor_info *ti = pr_model_tensor(m, t);
            if (ti->kind == PR_TENSOR_MODULE && strncmp(ti->name, "ia3/", 4) == 0)
                for (int64_t j = 0; j < ti->numel; j++)
                    ti->data[j] = 1.0f + 0.3f * sinf((float)(j + 3 * t));
        }
        pr_model_set_training(m, 0);
        th_loss_ctx lc;
        th_loss_init_rng(&lc, m, 1, TT, 61 + (unsigned)i);
        float *full = th_logits_copy(&lc);
        int V = pr_model_get_config(m)->vocab_size;
        pr_error err = { 0 };
        assert_int_equal(pr_model_decode_begin(m, TT, &err), PR_OK);
        assert_int_equal(pr_model_decode(m, lc.tokens, 3, &err), PR_OK);
        double worst = th_max_abs_diff(pr_model_logits(m), full, (size_t)3 * V), scale = 0;
        for (int t = 3; t < TT; t++) {
            assert_int_equal(pr_model_decode(m, lc.tokens + t, 1, &err), PR_OK);
            worst = fmax(worst, th_max_abs_diff(pr_model_logits(m), full + (size_t)t * V, (size_t)V));
        }
        for (size_t j = 0; j < (size_t)TT * V; j++)
            scale = fmax(scale, fabs((double)full[j]));
        print_message("variant %s: cached vs full max|diff| %.3e of max %.3e\n", variants[i].name, worst, scale);
        assert_true(worst <= 1e-5 * scale);
        assert_int_equal(pr_model_decode_pos(m), TT);
        /* attaching drops the cache */
        pr_module_spec is2 = { .technique = ia3, .name = "ia3b", .sites = PR_SITE_BIT(PR_SITE_FFN_ACT), .trainable = 1,
                               .seed = 6 };
        th_attach(m, &is2);
        assert_int_equal(pr_model_decode_pos(m), -1);
        free(full);
        pr_model_free(m);
    }
    dlclose(hp);
    dlclose(hi);
}

/* Merge and unmerge of every mergeable technique on the LLaMA family's
 * [out, in] weights: the merged model's logits equal the attached
 * module's (1e-5 of their max), and unmerge restores every base tensor
 * bit for bit (the host keeps the originals).  Parameters are moved off
 * their identity init first. */
static void test_merge_unmerge(void **state)
{
    (void)state;
    static const struct { const char *so, *name; uint32_t sites; } techs[] = {
        { "lora", "lora", 0 }, { "dora", "dora", 0 }, { "lora_fa", "lora_fa", 0 }, { "adalora", "adalora", 0 },
        { "vera", "vera", 0 }, { "loha", "loha", 0 }, { "lokr", "lokr", 0 }, { "oft", "oft", 0 },
        { "oft", "boft", 0 }, { "hra", "hra", 0 }, { "fourierft", "fourierft", 0 },
        { "ia3", "ia3", 0 }, { "ia3", "ia3", PR_SITE_BIT(PR_SITE_ATTN_V) },
        { "lora", "lora", PR_SITE_BIT(PR_SITE_O) | PR_SITE_BIT(PR_SITE_FFN_GATE) | PR_SITE_BIT(PR_SITE_FFN_UP) |
                              PR_SITE_BIT(PR_SITE_FFN_DOWN) | PR_SITE_BIT(PR_SITE_K) },
    };
    for (size_t k = 0; k < sizeof techs / sizeof techs[0]; k++) {
        char path[512];
        snprintf(path, sizeof path, "%s/plugins/.libs/%s.so", TEST_BUILDDIR, techs[k].so);
        void *h = NULL;
        const pr_plugin *pl = th_plugin_open(path, &h);
        assert_non_null(pl);
        const pr_technique *t = NULL;
        for (uint32_t i = 0; i < pl->n_techniques; i++)
            if (strcmp(pl->techniques[i]->name, techs[k].name) == 0)
                t = pl->techniques[i];
        assert_non_null(t);
        for (int v = 0; v < N_VARIANTS; v++) {
            pr_model *m = variant_model(v);
            perturb_norms_and_biases(m, 700 + (unsigned)v);
            int nb = pr_model_n_tensors(m);
            float **orig = calloc((size_t)nb, sizeof *orig);
            assert_non_null(orig);
            for (int i = 0; i < nb; i++) {
                const pr_tensor_info *ti = pr_model_tensor(m, i);
                orig[i] = malloc((size_t)ti->numel * sizeof(float));
                memcpy(orig[i], ti->data, (size_t)ti->numel * sizeof(float));
            }
            pr_module_spec spec = { .technique = t, .sites = techs[k].sites, .trainable = 1, .seed = 13 };
            pr_module *mod = th_attach(m, &spec);
            for (int i = nb; i < pr_model_n_tensors(m); i++) {
                const pr_tensor_info *ti = pr_model_tensor(m, i);
                if (ti->kind == PR_TENSOR_MODULE && ti->trainable)
                    for (int64_t j = 0; j < ti->numel; j++)
                        ti->data[j] += 0.05f * sinf((float)(j + 11 * i));
            }
            pr_model_set_training(m, 0);
            th_loss_ctx lc;
            th_loss_init_rng(&lc, m, TB, TT, 71);
            float *with = th_logits_copy(&lc);
            int V = pr_model_get_config(m)->vocab_size;
            pr_error err = { 0 };
            if (pr_module_merge(mod, &err) != PR_OK)
                fail_msg("%s on %s: merge: %s", techs[k].name, variants[v].name, err.msg);
            float *merged = th_logits_copy(&lc);
            double scale = 0;
            for (size_t j = 0; j < (size_t)TB * TT * V; j++)
                scale = fmax(scale, fabs((double)with[j]));
            double d = th_max_abs_diff(with, merged, (size_t)TB * TT * V);
            double moved = 0;
            for (int i = 0; i < nb; i++) {
                const pr_tensor_info *ti = pr_model_tensor(m, i);
                moved = fmax(moved, th_max_abs_diff(ti->data, orig[i], (size_t)ti->numel));
            }
            if (!(d <= 1e-5 * scale) || !(moved > 0))
                fail_msg("%s on %s: merged logits differ by %.3e of %.3e (base moved %.3e)", techs[k].name,
                         variants[v].name, d, scale, moved);
            if (pr_module_unmerge(mod, &err) != PR_OK)
                fail_msg("%s on %s: unmerge: %s", techs[k].name, variants[v].name, err.msg);
            for (int i = 0; i < nb; i++) {
                const pr_tensor_info *ti = pr_model_tensor(m, i);
                double tmax = 0;
                for (int64_t j = 0; j < ti->numel; j++)
                    tmax = fmax(tmax, fabs((double)orig[i][j]));
                double e = th_max_abs_diff(ti->data, orig[i], (size_t)ti->numel);
                if (e != 0.0)
                    fail_msg("%s on %s: unmerge leaves %s off by %.3e of %.3e", techs[k].name, variants[v].name,
                             ti->name, e, tmax);
                free(orig[i]);
            }
            free(orig);
            float *after = th_logits_copy(&lc);
            assert_true(th_max_abs_diff(after, with, (size_t)TB * TT * V) <= 1e-5 * scale);
            free(with);
            free(merged);
            free(after);
            pr_model_free(m);
        }
        print_message("%s%s: merge and unmerge exact on %d variants\n", techs[k].name,
                      techs[k].sites ? " (other sites)" : "", N_VARIANTS);
        dlclose(h);
    }
}

/* Mistral's window: within it the model runs; past it the forward says so. */
static void test_sliding_window(void **state)
{
    (void)state;
    pr_model_config c = tiny();
    v_mistral(&c);
    c.sliding_window = 4;
    pr_model *m = th_model_new(&c, TB, TT);
    th_loss_ctx lc;
    th_loss_init_rng(&lc, m, TB, TT, 51);
    pr_error err = { 0 };
    float loss;
    assert_int_equal(pr_model_forward(m, &lc.batch, &loss, &err), PR_ERR_UNSUPPORTED);
    assert_non_null(strstr(err.msg, "sliding_window"));
    lc.batch.T = 4;
    assert_int_equal(pr_model_forward(m, &lc.batch, &loss, &err), PR_OK);
    pr_model_free(m);
}

/* Presets count as the released models do. */
static void test_presets(void **state)
{
    (void)state;
    static const struct { const char *name; int64_t params; } want[] = {
        /* 22 x (2048 x (2048 + 2 x 256) + 2048 x 2048 + 3 x 2048 x 5632 + 2 x 2048) + 2 x 32000 x 2048 + 2048 */
        { "tinyllama-1.1b", 1100048384 },
        /* 30 x (576 x (576 + 2 x 192) + 576 x 576 + 3 x 576 x 1536 + 2 x 576) + 49152 x 576 + 576 (tied) */
        { "smollm-135m", 134515008 },
        /* 16 x (2048 x (2048 + 2 x 512) + 2048 x 2048 + 3 x 2048 x 8192 + 2 x 2048) + 128256 x 2048 + 2048 (tied) */
        { "llama-3.2-1b", 1235814400 },
    };
    for (size_t i = 0; i < sizeof want / sizeof want[0]; i++) {
        pr_model_config c;
        pr_error err = { 0 };
        assert_int_equal(pr_config_preset(want[i].name, &c), PR_OK);
        assert_int_equal(pr_config_validate(&c, &err), PR_OK);
        assert_true(pr_config_param_count(&c) == want[i].params);
    }
    pr_model_config c;
    assert_int_equal(pr_config_preset("llama-tiny", &c), PR_OK);
    int64_t n = pr_config_param_count(&c);
    assert_true(n > 80000 && n < 150000);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_counts_and_names),
        cmocka_unit_test(test_grad_full),
        cmocka_unit_test(test_grad_lora_seven),
        cmocka_unit_test(test_grad_ia3_sites),
        cmocka_unit_test(test_causal_and_batch_independent),
        cmocka_unit_test(test_decode_matches_forward),
        cmocka_unit_test(test_merge_unmerge),
        cmocka_unit_test(test_sliding_window),
        cmocka_unit_test(test_presets),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
