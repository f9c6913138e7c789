/* peftref tests: parameter counts of the built-in techniques on TinyLlama
 * (the tinyllama-1.1b preset, planned without allocating), with default
 * options and Hugging Face PEFT's LLaMA default sites, against the counts
 * PEFT's own formulas give.
 *
 * TinyLlama-1.1B: L = 22, d_model 2048, 32 query heads over 4 key/value
 * heads of 64, so q_proj is 2048 -> 2048 and v_proj, k_proj 2048 -> 256;
 * d_ff 5632.  Sums are over L layers of q_proj and v_proj unless said. */
#include <dlfcn.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <cmocka.h>

#include "peftref/peftref.h"
#include "harness.h"

typedef struct want {
    const char *so, *name;
    int64_t trainable, params; /* params: owned in all, frozen buffers included */
    const char *why;
} want;

static const want table[] = {
    { "lora", "lora", 1126400, 1126400, "r=8: 22 * 8 * (2048 + 2048 + 2048 + 256)" },
    { "dora", "dora", 1177088, 1177088, "LoRA + lora_magnitude_vector (d_out): 1,126,400 + 22 * (2048 + 256)" },
    { "lora_fa", "lora_fa", 405504, 1126400, "only lora_B trains: 22 * 8 * (2048 + 256); lora_A frozen" },
    { "vera", "vera", 61952, 1110528,
      "r=256: lambda_d (r) + lambda_b (d_out) per site: 22 * ((256 + 2048) + (256 + 256)); shared frozen "
      "vera_A (256, 2048) and vera_B (2048, 256) counted once in params" },
    { "loha", "loha", 2252800, 2252800, "r=8: 2 * r * (d_in + d_out) per site: 22 * 16 * (4096 + 2304)" },
    { "lokr", "lokr", 70400, 70400,
      "r=8, factor -1: q 2048 = 32 x 64 both ways: w1 32*32 + w2_a 64*8 + w2_b 8*64 = 2048; v out 256 = "
      "16 x 16: w1 16*32 + w2_a 16*8 + w2_b 8*64 = 1152; 22 * 3200" },
    { "oft", "oft", 1396736, 1396736,
      "oft_block_size 32: d_in / 32 = 64 blocks of 32*31/2 = 496 skew entries per site: 22 * 2 * 31,744" },
    { "oft", "boft", 411136, 411136,
      "boft_block_size 4, one butterfly factor: 512 blocks of 4x4 + boft_s (d_out): 22 * ((8192 + 2048) + "
      "(8192 + 256))" },
    { "hra", "hra", 720896, 720896, "r=8: hra_u (d_in, r) per site: 22 * 2 * 2048 * 8" },
    { "fourierft", "fourierft", 44000, 44000, "n_frequency 1000 spectral coefficients per site: 22 * 2 * 1000" },
    { "adalora", "adalora", 1690128, 5071440,
      "init_r=12: lora_A (r, d_in) + lora_B (d_out, r) + lora_E (r): 22 * (12*4096 + 12 + 12*2304 + 12); "
      "params add the frozen importance statistics" },
    { "ia3", "ia3", 135168, 135168, "k_proj, v_proj outputs (256 each) and down_proj's input (5632): 22 * 6144" },
};

static void test_counts(void **state)
{
    (void)state;
    pr_model_config cfg;
    assert_int_equal(pr_config_preset("tinyllama-1.1b", &cfg), PR_OK);
    assert_true(pr_config_param_count(&cfg) == 1100048384);
    for (size_t i = 0; i < sizeof table / sizeof table[0]; i++) {
        char path[512];
        snprintf(path, sizeof path, "%s/plugins/.libs/%s.so", TEST_BUILDDIR, table[i].so);
        void *h = NULL;
        const pr_plugin *pl = th_plugin_open(path, &h);
        assert_non_null(pl);
        const pr_technique *t = NULL;
        for (uint32_t k = 0; k < pl->n_techniques; k++)
            if (strcmp(pl->techniques[k]->name, table[i].name) == 0)
                t = pl->techniques[k];
        assert_non_null(t);
        pr_module_spec spec = { .technique = t, .trainable = 1, .seed = 1 };
        pr_module_plan plan;
        pr_error err = { 0 };
        if (pr_module_plan_for(&cfg, &spec, &plan, &err) != PR_OK)
            fail_msg("%s: %s", table[i].name, err.msg);
        print_message("%-10s trainable %10lld  params %10lld  (%s)\n", table[i].name, (long long)plan.trainable,
                      (long long)plan.params, table[i].why);
        assert_int_equal(plan.trainable, table[i].trainable);
        assert_int_equal(plan.params, table[i].params);
        assert_int_equal(plan.insertions, strcmp(table[i].name, "ia3") == 0 ? 66 : 44);
        dlclose(h);
    }
}

/* BitFit has nothing to train in a model without biases, and says so. */
static void test_bitfit_refused(void **state)
{
    (void)state;
    pr_model_config cfg;
    assert_int_equal(pr_config_preset("tinyllama-1.1b", &cfg), PR_OK);
    void *h = NULL;
    const pr_technique *t = th_plugin_technique(TEST_BUILDDIR "/plugins/.libs/bitfit.so", &h);
    assert_non_null(t);
    pr_module_spec spec = { .technique = t, .trainable = 1, .seed = 1 };
    pr_module_plan plan;
    pr_error err = { 0 };
    assert_int_equal(pr_module_plan_for(&cfg, &spec, &plan, &err), PR_ERR_UNSUPPORTED);
    assert_non_null(strstr(err.msg, "bitfit"));
    assert_non_null(strstr(err.msg, "biases"));
    assert_non_null(strstr(err.msg, "LLaMA"));
    /* a Qwen2 has q/k/v biases: 22 * (2048 + 256 + 256) */
    cfg.variant = PR_VARIANT_QWEN2;
    cfg.qkv_bias = 1;
    assert_int_equal(pr_module_plan_for(&cfg, &spec, &plan, &err), PR_OK);
    assert_int_equal(plan.base_selected, 22 * (2048 + 256 + 256));
    dlclose(h);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_counts),
        cmocka_unit_test(test_bitfit_refused),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
