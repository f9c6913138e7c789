/* Evaluate a token sequence in llama.cpp and compare its logits with
 * peftref's (tests/llamacpp/check.sh builds this against the llama.h of
 * the installed node-llama-cpp package and links its prebuilt libllama):
 *
 *   llamacpp_check LIBDIR MODEL.gguf ADAPTER.gguf|- TOKENS REF.bin TOL
 *
 * LIBDIR holds the ggml CPU backends to load.  The K/V cache is F32 and
 * flash attention off, so llama.cpp's arithmetic stays in f32; every
 * position's logits are read.  Prints max |llama - ref| / max |ref| and
 * exits 1 when it exceeds TOL (also when the adapter's adapter.lora.alpha
 * is missing, since llama.cpp would then silently use scale 1). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ggml-backend.h"
#include "llama.h"

static void quiet(enum ggml_log_level level, const char *text, void *user)
{
    (void)user;
    if (level >= GGML_LOG_LEVEL_WARN)
        fputs(text, stderr);
}

int main(int argc, char **argv)
{
    if (argc != 7) {
        fprintf(stderr, "usage: llamacpp_check LIBDIR MODEL.gguf ADAPTER.gguf|- TOKENS REF.bin TOL\n");
        return 2;
    }
    const char *adapter_path = strcmp(argv[3], "-") ? argv[3] : NULL;
    double tol = atof(argv[6]);
    llama_token tokens[4096];
    int n = 0;
    for (char *s = argv[4], *end; *s && n < 4096; s = *end ? end + 1 : end) {
        tokens[n++] = (llama_token)strtol(s, &end, 10);
        if (end == s)
            break;
    }
    llama_log_set(quiet, NULL);
    ggml_backend_load_all_from_path(argv[1]);
    llama_backend_init();

    struct llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = 0;
    struct llama_model *model = llama_model_load_from_file(argv[2], mp);
    if (!model) {
        fprintf(stderr, "llamacpp_check: llama.cpp cannot load %s\n", argv[2]);
        return 1;
    }
    const struct llama_vocab *vocab = llama_model_get_vocab(model);
    int V = llama_vocab_n_tokens(vocab);

    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = (uint32_t)(n < 64 ? 64 : n);
    cp.n_batch = cp.n_ubatch = cp.n_ctx;
    cp.n_seq_max = 1;
    cp.n_threads = cp.n_threads_batch = 2;
    cp.type_k = GGML_TYPE_F32;
    cp.type_v = GGML_TYPE_F32;
    cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
    struct llama_context *ctx = llama_init_from_model(model, cp);
    if (!ctx) {
        fprintf(stderr, "llamacpp_check: cannot make a context for %s\n", argv[2]);
        return 1;
    }
    if (adapter_path) {
        struct llama_adapter_lora *ad = llama_adapter_lora_init(model, adapter_path);
        if (!ad) {
            fprintf(stderr, "llamacpp_check: llama.cpp refuses the adapter %s\n", adapter_path);
            return 1;
        }
        char alpha[64];
        if (llama_adapter_meta_val_str(ad, "adapter.lora.alpha", alpha, sizeof alpha) < 0) {
            fprintf(stderr, "llamacpp_check: %s has no adapter.lora.alpha\n", adapter_path);
            return 1;
        }
        float scale = 1.0f;
        if (llama_set_adapters_lora(ctx, &ad, 1, &scale) != 0) {
            fprintf(stderr, "llamacpp_check: cannot apply %s\n", adapter_path);
            return 1;
        }
        printf("adapter %s: adapter.lora.alpha = %s as llama.cpp reads it\n", adapter_path, alpha);
    }
    struct llama_batch b = llama_batch_init(n, 0, 1);
    for (int i = 0; i < n; i++) {
        b.token[i] = tokens[i];
        b.pos[i] = i;
        b.n_seq_id[i] = 1;
        b.seq_id[i][0] = 0;
        b.logits[i] = 1;
    }
    b.n_tokens = n;
    if (llama_decode(ctx, b) != 0) {
        fprintf(stderr, "llamacpp_check: llama_decode failed\n");
        return 1;
    }
    FILE *f = fopen(argv[5], "rb");
    float *ref = malloc((size_t)n * V * sizeof *ref);
    if (!f || !ref || fread(ref, sizeof *ref, (size_t)n * V, f) != (size_t)n * V) {
        fprintf(stderr, "llamacpp_check: %s does not hold %d x %d logits\n", argv[5], n, V);
        return 1;
    }
    fclose(f);
    double d = 0, s = 0;
    for (int i = 0; i < n; i++) {
        const float *lg = llama_get_logits_ith(ctx, i);
        for (int v = 0; v < V; v++) {
            d = fmax(d, fabs((double)lg[v] - ref[(size_t)i * V + v]));
            s = fmax(s, fabs((double)ref[(size_t)i * V + v]));
        }
    }
    double rel = d / s;
    printf("%s%s%s: %d tokens x %d logits, max |llama.cpp - peftref| = %.3e, max |peftref| = %.3e, "
           "relative %.3e (tolerance %.0e) %s\n", argv[2], adapter_path ? " + " : "", adapter_path ? adapter_path : "",
           n, V, d, s, rel, tol, rel <= tol ? "ok" : "FAIL");
    free(ref);
    llama_batch_free(b);
    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
    return rel <= tol ? 0 : 1;
}
