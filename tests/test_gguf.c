/* GGUF for llama.cpp (core/io/gguf.c, gguf_export.c): files written here
 * are parsed back by the reader and checked field by field against what
 * llama.cpp's loader reads (header, every key, tensor offsets and
 * alignment, shapes, values, the RoPE row order undone), and the
 * refusals.  llama.cpp itself runs in tests/llamacpp/check.sh. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <dirent.h>
#include <cmocka.h>

#include "peftref/peftref.h"
#include "core/io/gguf.h"
#include "core/io/gguf_export.h"
#include "core/io/safetensors.h"

static char tmpdir[256];

static int setup(void **state)
{
    (void)state;
    snprintf(tmpdir, sizeof tmpdir, "/tmp/peftref-test-gguf-XXXXXX");
    return mkdtemp(tmpdir) ? 0 : -1;
}

static int teardown(void **state)
{
    (void)state;
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmpdir);
    return system(cmd) == 0 ? 0 : -1;
}

static const char *tmp(const char *name)
{
    static char buf[4][400];
    static int k;
    k = (k + 1) % 4;
    snprintf(buf[k], sizeof buf[k], "%s/%s", tmpdir, name);
    return buf[k];
}

/* Files in tmpdir whose names start with prefix (temporaries left behind). */
static int count_files(const char *prefix)
{
    DIR *d = opendir(tmpdir);
    int n = 0;
    struct dirent *e;
    while (d && (e = readdir(d)))
        n += strncmp(e->d_name, prefix, strlen(prefix)) == 0;
    if (d)
        closedir(d);
    return n;
}

static gguf_file *read_ok(const char *path)
{
    gguf_file *f = NULL;
    pr_error err = {0};
    if (gguf_file_read(path, &f, &err))
        fail_msg("%s", err.msg);
    return f;
}

static uint32_t kv_u32(const gguf_file *f, const char *key)
{
    uint32_t v;
    if (!gguf_kv_get_u32(gguf_file_find_kv(f, key), &v))
        fail_msg("no u32 %s", key);
    return v;
}

static float kv_f32(const gguf_file *f, const char *key)
{
    float v;
    if (!gguf_kv_get_f32(gguf_file_find_kv(f, key), &v))
        fail_msg("no f32 %s", key);
    return v;
}

static void assert_kv_str(const gguf_file *f, const char *key, const char *want)
{
    const char *s;
    size_t n;
    if (!gguf_kv_get_str(gguf_file_find_kv(f, key), &s, &n))
        fail_msg("no string %s", key);
    if (n != strlen(want) || memcmp(s, want, n) != 0)
        fail_msg("%s = '%.*s', expected '%s'", key, (int)n, s, want);
}

/* The tensor's values as f32 (fresh buffer), checking its shape. */
static float *tensor_f32(const gguf_file *f, const char *name, int n_dims, int64_t ne0, int64_t ne1)
{
    const gguf_tensor_info *t = gguf_file_find_tensor(f, name);
    if (!t)
        fail_msg("no tensor %s", name);
    assert_int_equal(t->n_dims, n_dims);
    assert_int_equal(t->ne[0], ne0);
    if (n_dims > 1)
        assert_int_equal(t->ne[1], ne1);
    assert_int_equal(t->offset % f->alignment, 0);
    size_t n = (size_t)ne0 * (size_t)(n_dims > 1 ? ne1 : 1);
    float *p = malloc(n * sizeof *p);
    assert_non_null(p);
    assert_true(gguf_tensor_to_f32(t, p, n));
    return p;
}

/* ---- the container ------------------------------------------------------- */

static void test_writer_roundtrip(void **state)
{
    (void)state;
    gguf_writer *w = gguf_writer_new();
    gguf_set_str(w, "general.architecture", "llama");
    gguf_set_u32(w, "general.alignment", 64);
    gguf_set_f32(w, "x.f", 0.25f);
    gguf_set_bool(w, "x.b", 1);
    gguf_set_i32(w, "x.i", -7);
    const char *strs[] = {"a", "", "h\xc3\xa9llo"};
    size_t lens[] = {1, 0, 6};
    gguf_set_arr_str(w, "x.s", strs, lens, 3);
    int32_t iv[] = {1, -2, 3};
    gguf_set_arr_i32(w, "x.ai", iv, 3);
    float a[6] = {1, 2, 3, 4, 5, 6}, b[5] = {0.1f, -0.2f, 65504.0f, 1e-8f, 3.14159f};
    int64_t ne_a[2] = {3, 2}, ne_b[1] = {5};
    gguf_add_tensor(w, "a", 2, ne_a, GGUF_TENSOR_F32, a, 0);
    gguf_add_tensor(w, "b", 1, ne_b, GGUF_TENSOR_F16, b, 0);
    pr_error err = {0};
    assert_int_equal(gguf_writer_save(w, tmp("c.gguf"), &err), PR_OK);
    gguf_writer_free(w);

    gguf_file *f = read_ok(tmp("c.gguf"));
    assert_memory_equal(f->buf, "GGUF", 4);
    assert_int_equal(f->version, 3);
    assert_int_equal(f->n_kv, 7);
    assert_int_equal(f->n_tensors, 2);
    assert_int_equal(f->alignment, 64);
    assert_int_equal(f->data_start % 64, 0);
    assert_kv_str(f, "general.architecture", "llama");
    assert_true(kv_f32(f, "x.f") == 0.25f);
    const gguf_kv *kb = gguf_file_find_kv(f, "x.b"), *ki = gguf_file_find_kv(f, "x.i");
    assert_int_equal(kb->type, GGUF_T_BOOL);
    assert_int_equal(kb->data[0], 1);
    assert_int_equal(ki->type, GGUF_T_INT32);
    assert_int_equal((int32_t)(ki->data[0] | ki->data[1] << 8 | ki->data[2] << 16 | (uint32_t)ki->data[3] << 24), -7);
    const gguf_kv *ks = gguf_file_find_kv(f, "x.s");
    assert_int_equal(ks->arr_type, GGUF_T_STRING);
    assert_int_equal(ks->n, 3);
    for (int i = 0; i < 3; i++) {
        const char *s;
        size_t n;
        assert_true(gguf_kv_arr_str(ks, (uint64_t)i, &s, &n));
        assert_int_equal(n, lens[i]);
        assert_memory_equal(s, strs[i], n);
    }
    const gguf_kv *kai = gguf_file_find_kv(f, "x.ai");
    assert_int_equal(kai->arr_type, GGUF_T_INT32);
    assert_int_equal(kai->size, 12);
    /* offsets: a at 0 (24 bytes), b at the next multiple of 64 */
    const gguf_tensor_info *ta = gguf_file_find_tensor(f, "a"), *tb = gguf_file_find_tensor(f, "b");
    assert_int_equal(ta->offset, 0);
    assert_int_equal(tb->offset, 64);
    assert_int_equal(tb->type, GGUF_TENSOR_F16);
    assert_int_equal(tb->size, 10);
    float back[6];
    assert_true(gguf_tensor_to_f32(ta, back, 6));
    assert_memory_equal(back, a, sizeof a);
    assert_true(gguf_tensor_to_f32(tb, back, 5));
    for (int i = 0; i < 5; i++)
        assert_true(back[i] == st_f16_to_f32(st_f32_to_f16(b[i])));
    /* the file ends after b's data padded to the alignment */
    assert_int_equal(f->len, f->data_start + 128);
    gguf_file_free(f);
}

static void test_writer_errors(void **state)
{
    (void)state;
    gguf_writer *w = gguf_writer_new();
    gguf_set_u32(w, "k", 1);
    gguf_set_u32(w, "k", 2);
    pr_error err = {0};
    assert_int_equal(gguf_writer_save(w, tmp("dup.gguf"), &err), PR_ERR_INVALID);
    assert_string_equal(err.msg + strlen(tmpdir) + 1, "dup.gguf: key 'k' given twice");
    gguf_writer_free(w);
    assert_int_equal(access(tmp("dup.gguf"), F_OK), -1);
    assert_int_equal(count_files("dup.gguf"), 0);

    /* a truncated file names the byte where it ends */
    FILE *fp = fopen(tmp("trunc.gguf"), "wb");
    fwrite("GGUF\3\0\0\0\1\0\0\0\0\0\0\0", 1, 16, fp);
    fclose(fp);
    gguf_file *f = NULL;
    assert_int_equal(gguf_file_read(tmp("trunc.gguf"), &f, &err), PR_ERR_FORMAT);
    assert_non_null(strstr(err.msg, "truncated at byte 16 reading the key/value count"));
}

/* ---- the RoPE row order ---------------------------------------------------- */

static void test_rope_permutation(void **state)
{
    (void)state;
    enum { H = 3, D = 8, COLS = 5 };
    float src[H * D * COLS], dst[H * D * COLS], back[H * D * COLS];
    for (int i = 0; i < H * D * COLS; i++)
        src[i] = (float)i;
    gguf_rope_permute_rows(src, dst, H, D, COLS);
    /* llama.cpp's converter: reshape (H, 2, D/2, COLS), swap axes 1 and 2:
     * new row h*D + 2i + s holds old row h*D + s*D/2 + i */
    for (int h = 0; h < H; h++)
        for (int i = 0; i < D / 2; i++)
            for (int s = 0; s < 2; s++)
                for (int c = 0; c < COLS; c++)
                    assert_true(dst[((h * D) + 2 * i + s) * COLS + c] == src[((h * D) + s * D / 2 + i) * COLS + c]);
    gguf_rope_unpermute_rows(dst, back, H, D, COLS);
    assert_memory_equal(back, src, sizeof src);
}

/* ---- models and adapters --------------------------------------------------- */

static pr_registry *registry(void)
{
    pr_registry *reg = NULL;
    pr_error err = {0};
    if (pr_registry_open(TEST_BUILDDIR "/plugins/.libs", &reg, &err))
        fail_msg("%s", err.msg);
    return reg;
}

static pr_model *preset(const char *name)
{
    pr_model_config cfg;
    assert_int_equal(pr_config_preset(name, &cfg), PR_OK);
    pr_model *m = NULL;
    pr_error err = {0};
    if (pr_model_create(&cfg, &m, &err))
        fail_msg("%s", err.msg);
    return m;
}

static void test_llama_model(void **state)
{
    (void)state;
    pr_model *m = preset("llama-tiny");
    const pr_model_config *c = pr_model_get_config(m);
    pr_tokenizer *tok = NULL;
    pr_error err = {0};
    assert_int_equal(pr_tokenizer_byte(&tok, &err), PR_OK);
    for (int dtype = 0; dtype < 2; dtype++) {
        const char *path = tmp(dtype ? "llama16.gguf" : "llama.gguf");
        if (gguf_export_model(m, tok, NULL, path, dtype ? GGUF_TENSOR_F16 : GGUF_TENSOR_F32, &err))
            fail_msg("%s", err.msg);
        gguf_file *f = read_ok(path);
        assert_kv_str(f, "general.architecture", "llama");
        assert_int_equal(kv_u32(f, "general.alignment"), 32);
        assert_int_equal(kv_u32(f, "general.file_type"), dtype);
        assert_int_equal(kv_u32(f, "llama.context_length"), c->max_seq);
        assert_int_equal(kv_u32(f, "llama.embedding_length"), c->d_model);
        assert_int_equal(kv_u32(f, "llama.feed_forward_length"), c->d_ff);
        assert_int_equal(kv_u32(f, "llama.block_count"), c->n_layers);
        assert_int_equal(kv_u32(f, "llama.attention.head_count"), c->n_heads);
        assert_int_equal(kv_u32(f, "llama.attention.head_count_kv"), c->n_kv_heads);
        assert_int_equal(kv_u32(f, "llama.rope.dimension_count"), c->d_head);
        assert_int_equal(kv_u32(f, "llama.vocab_size"), 256);
        assert_true(kv_f32(f, "llama.attention.layer_norm_rms_epsilon") == c->norm_eps);
        assert_true(kv_f32(f, "llama.rope.freq_base") == c->rope_theta);
        assert_kv_str(f, "tokenizer.ggml.model", "gpt2");
        const gguf_kv *toks = gguf_file_find_kv(f, "tokenizer.ggml.tokens");
        assert_int_equal(toks->n, 256);
        const char *s;
        size_t n;
        assert_true(gguf_kv_arr_str(toks, 'A', &s, &n));      /* printable bytes spell themselves */
        assert_int_equal(n, 1);
        assert_int_equal(s[0], 'A');
        assert_true(gguf_kv_arr_str(toks, ' ', &s, &n));      /* space is U+0120 in the byte alphabet */
        assert_int_equal(n, 2);
        assert_memory_equal(s, "\xc4\xa0", 2);
        assert_int_equal(gguf_file_find_kv(f, "tokenizer.ggml.merges")->n, 0);
        assert_int_equal(gguf_file_find_kv(f, "tokenizer.ggml.token_type")->n, 256);
        /* 1 + 1 + 1 (embed, norm, untied head) + 9 per layer */
        assert_int_equal(f->n_tensors, 3 + 9 * c->n_layers);
        for (uint64_t i = 0; i < f->n_tensors; i++) {
            assert_int_equal(f->tensors[i].offset % 32, 0);
            assert_int_equal(f->tensors[i].type, f->tensors[i].n_dims == 2 ? dtype : 0);
        }
        int Q = c->n_heads * c->d_head, KV = c->n_kv_heads * c->d_head, C = c->d_model;
        for (int l = 0; l < c->n_layers; l++) {
            char g[64], h[96];
            const struct { const char *gg, *hf; int rows, heads; } w[] = {
                {"attn_q", "self_attn.q_proj", Q, c->n_heads}, {"attn_k", "self_attn.k_proj", KV, c->n_kv_heads},
                {"attn_v", "self_attn.v_proj", KV, 0}, {"ffn_down", "mlp.down_proj", C, 0}};
            for (int k = 0; k < 4; k++) {
                snprintf(g, sizeof g, "blk.%d.%s.weight", l, w[k].gg);
                snprintf(h, sizeof h, "model.layers.%d.%s.weight", l, w[k].hf);
                const pr_tensor_info *t = pr_model_find_tensor(m, h);
                float *p = tensor_f32(f, g, 2, t->shape[1], w[k].rows);
                float *back = malloc((size_t)t->numel * sizeof *back);
                if (w[k].heads)
                    gguf_rope_unpermute_rows(p, back, w[k].heads, c->d_head, t->shape[1]);
                else
                    memcpy(back, p, (size_t)t->numel * sizeof *back);
                for (int64_t e = 0; e < t->numel; e++)
                    if (back[e] != (dtype ? st_f16_to_f32(st_f32_to_f16(t->data[e])) : t->data[e]))
                        fail_msg("%s element %lld differs from %s's", g, (long long)e, h);
                if (w[k].heads)   /* the permutation did move rows */
                    assert_true(memcmp(p, t->data, (size_t)t->shape[1] * 2 * sizeof *p) != 0 || dtype);
                free(p);
                free(back);
            }
        }
        gguf_file_free(f);
    }
    pr_tokenizer_free(tok);
    pr_model_free(m);
}

static void test_gpt2_model(void **state)
{
    (void)state;
    pr_model *m = preset("gpt2-tiny");
    const pr_model_config *c = pr_model_get_config(m);
    pr_error err = {0};
    if (gguf_export_model(m, NULL, NULL, tmp("gpt2.gguf"), GGUF_TENSOR_F32, &err))
        fail_msg("%s", err.msg);
    gguf_file *f = read_ok(tmp("gpt2.gguf"));
    assert_kv_str(f, "general.architecture", "gpt2");
    assert_int_equal(kv_u32(f, "gpt2.context_length"), c->max_seq);
    assert_int_equal(kv_u32(f, "gpt2.block_count"), c->n_layers);
    assert_true(kv_f32(f, "gpt2.attention.layer_norm_epsilon") == c->norm_eps);
    /* Conv1D c_attn [C, 3C] is transposed: attn_qkv ne {C, 3C} */
    const pr_tensor_info *t = pr_model_find_tensor(m, "h.1.attn.c_attn.weight");
    int64_t C = t->shape[0], N = t->shape[1];
    float *p = tensor_f32(f, "blk.1.attn_qkv.weight", 2, C, N);
    for (int64_t i = 0; i < C; i++)
        for (int64_t o = 0; o < N; o++)
            assert_true(p[o * C + i] == t->data[i * N + o]);
    free(p);
    assert_non_null(gguf_file_find_tensor(f, "position_embd.weight"));
    assert_non_null(gguf_file_find_tensor(f, "blk.0.ffn_down.bias"));
    gguf_file_free(f);
    pr_model_free(m);
}

/* LoRA on LLaMA q and v, v with its own rank and alpha, rsLoRA: alpha is
 * alpha * sqrt(r) of q, v's lora_b carries its scale ratio, q's lora_b rows
 * are in RoPE order. */
static void test_lora_adapter(void **state)
{
    (void)state;
    pr_registry *reg = registry();
    pr_model *m = preset("llama-tiny");
    const pr_model_config *c = pr_model_get_config(m);
    const pr_option_setting o[] = {{"r", "4", -1}, {"alpha", "6", -1}, {"use_rslora", "true", -1},
                                   {"init_lora_weights", "false", -1}, {"r", "2", PR_SITE_V},
                                   {"alpha", "5", PR_SITE_V}};
    pr_module_spec spec = {.technique = pr_registry_find(reg, "lora"), .sites = PR_SITE_BIT(PR_SITE_Q) |
                           PR_SITE_BIT(PR_SITE_V), .options = o, .n_options = 6, .trainable = 1, .seed = 3};
    pr_module *mod = NULL;
    pr_error err = {0};
    if (pr_module_attach(m, &spec, &mod, &err))
        fail_msg("%s", err.msg);
    gguf_lora_summary s;
    if (gguf_export_lora(mod, tmp("lora.gguf"), &s, &err))
        fail_msg("%s", err.msg);
    assert_int_equal(s.tensors, 2 * c->n_layers);
    assert_int_equal(s.permuted, c->n_layers);
    assert_int_equal(s.folded_into_b, c->n_layers);
    gguf_file *f = read_ok(tmp("lora.gguf"));
    assert_kv_str(f, "general.type", "adapter");
    assert_kv_str(f, "adapter.type", "lora");
    assert_kv_str(f, "general.architecture", "llama");
    float alpha = kv_f32(f, "adapter.lora.alpha");
    assert_float_equal(alpha, 6.0 / sqrt(4.0) * 4, 1e-6);   /* rsLoRA's alpha/sqrt(r), times llama.cpp's r */
    int Q = c->n_heads * c->d_head, KV = c->n_kv_heads * c->d_head, C = c->d_model;
    for (int l = 0; l < c->n_layers; l++) {
        char name[96];
        snprintf(name, sizeof name, "lora/h.%d.q.lora_A", l);
        const pr_tensor_info *qa = pr_model_find_tensor(m, name);
        snprintf(name, sizeof name, "lora/h.%d.q.lora_B", l);
        const pr_tensor_info *qb = pr_model_find_tensor(m, name);
        snprintf(name, sizeof name, "lora/h.%d.v.lora_B", l);
        const pr_tensor_info *vb = pr_model_find_tensor(m, name);
        snprintf(name, sizeof name, "blk.%d.attn_q.weight.lora_a", l);
        float *a = tensor_f32(f, name, 2, C, 4);
        assert_memory_equal(a, qa->data, (size_t)qa->numel * sizeof *a);
        snprintf(name, sizeof name, "blk.%d.attn_q.weight.lora_b", l);
        float *b = tensor_f32(f, name, 2, 4, Q), *back = malloc((size_t)Q * 4 * sizeof *back);
        gguf_rope_unpermute_rows(b, back, c->n_heads, c->d_head, 4);
        assert_memory_equal(back, qb->data, (size_t)qb->numel * sizeof *b);
        free(a);
        free(b);
        free(back);
        /* v: llama.cpp applies alpha / 2; peftref 5 / sqrt(2) */
        snprintf(name, sizeof name, "blk.%d.attn_v.weight.lora_b", l);
        b = tensor_f32(f, name, 2, 2, KV);
        double want = 5.0 / sqrt(2.0) * 2 / alpha;
        for (int64_t e = 0; e < vb->numel; e++)
            assert_float_equal(b[e], vb->data[e] * want, 1e-6 * fabs(vb->data[e] * want) + 1e-12);
        free(b);
    }
    gguf_file_free(f);
    pr_model_free(m);
    pr_registry_free(reg);
}

static void test_refusals(void **state)
{
    (void)state;
    pr_registry *reg = registry();
    pr_model *m = preset("llama-tiny");
    pr_module_spec spec = {.technique = pr_registry_find(reg, "dora"), .name = "d", .trainable = 1, .seed = 3};
    assert_non_null(spec.technique);
    pr_module *mod = NULL;
    pr_error err = {0};
    if (pr_module_attach(m, &spec, &mod, &err))
        fail_msg("%s", err.msg);
    assert_int_equal(gguf_export_lora(mod, tmp("dora.gguf"), NULL, &err), PR_ERR_UNSUPPORTED);
    assert_string_equal(err.msg, "gguf adapters carry low-rank pairs only; technique dora (module 'd') has no llama.cpp "
                                 "adapter form: merge it into the model with --base, or export --format peft or "
                                 "peftref");
    assert_int_equal(count_files("dora.gguf"), 0);
    pr_model_free(m);

    /* qwen3's q/k norms have no llama.cpp llama tensor */
    pr_model_config cfg;
    assert_int_equal(pr_config_preset("llama-tiny", &cfg), PR_OK);
    cfg.variant = PR_VARIANT_QWEN3;
    cfg.qk_norm = 1;
    assert_int_equal(pr_model_create(&cfg, &m, &err), PR_OK);
    assert_int_equal(gguf_export_model(m, NULL, NULL, tmp("qwen3.gguf"), GGUF_TENSOR_F32, &err),
                     PR_ERR_UNSUPPORTED);
    assert_string_equal(err.msg, "gguf --base writes llama.cpp's llama (model_type llama, mistral) and gpt2 "
                                 "architectures; model_type qwen3 is not one of them (its adapters can be "
                                 "exported)");
    assert_int_equal(count_files("qwen3.gguf"), 0);
    pr_model_free(m);
    pr_registry_free(reg);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_writer_roundtrip), cmocka_unit_test(test_writer_errors),
        cmocka_unit_test(test_rope_permutation), cmocka_unit_test(test_llama_model),
        cmocka_unit_test(test_gpt2_model),       cmocka_unit_test(test_lora_adapter),
        cmocka_unit_test(test_refusals),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
