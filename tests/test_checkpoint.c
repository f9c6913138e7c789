/* Tests of Hugging Face checkpoint loading and saving (config.json +
 * safetensors, single file or sharded). */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <dirent.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "peftref/peftref.h"
#include "fileio.h"
#include "safetensors.h"
#include "harness.h"

enum { L = 2, C = 16, H = 2, V = 64, P = 16, B = 2, T = 8 };

/* ---- helpers ------------------------------------------------------------------ */

static char *make_tmpdir(void)
{
    return th_scratch_dir("peftref-ckpt");
}

static char *path_in(const char *dir, const char *name)
{
    char *p = fileio_join(dir, name);
    assert_non_null(p);
    return p;
}

static pr_model_config tiny_config(void)
{
    pr_model_config c;
    memset(&c, 0, sizeof c);
    c.family = PR_FAMILY_GPT2;
    c.n_layers = L;
    c.d_model = C;
    c.n_heads = H;
    c.n_kv_heads = H;
    c.d_head = C / H;
    c.d_ff = 4 * C;
    c.vocab_size = V;
    c.max_seq = P;
    c.norm_eps = 1e-5f;
    c.bias = 1;
    c.tied_head = 1;
    c.fused_qkv = 1;
    c.norm = PR_NORM_LAYERNORM;
    c.act = PR_ACT_GELU_TANH;
    c.pos = PR_POS_LEARNED;
    c.init_std = 0.02f;
    c.seed = 20240611;
    return c;
}

static pr_model *tiny_model(const pr_model_config *c)
{
    pr_model *m = NULL;
    pr_error err = {0};
    int rc = pr_model_create(c, &m, &err);
    if (rc != PR_OK)
        fail_msg("pr_model_create: %s", err.msg);
    /* biases and norm parameters start at 0/1; make every value distinct so
     * a tensor swapped for another cannot go unnoticed */
    for (int i = 0; i < pr_model_n_tensors(m); i++) {
        const pr_tensor_info *t = pr_model_tensor(m, i);
        if (t->kind != PR_TENSOR_WEIGHT)
            for (int64_t j = 0; j < t->numel; j++)
                t->data[j] += 0.01f * (float)sin(1.0 + (double)i * 7.0 + (double)j);
    }
    return m;
}

/* config.json as transformers writes it for GPT2Config. */
static json_t *config_json(const pr_model_config *c)
{
    json_t *j = json_pack("{s:s, s:[s], s:i, s:i, s:i, s:i, s:i, s:i, s:n, s:f, s:s, s:b, s:f,"
                          " s:f, s:b, s:b}",
                          "model_type", "gpt2", "architectures", "GPT2LMHeadModel",
                          "n_layer", c->n_layers, "n_embd", c->d_model, "n_head", c->n_heads,
                          "vocab_size", c->vocab_size, "n_positions", c->max_seq, "n_ctx",
                          c->max_seq, "n_inner", "layer_norm_epsilon", 1e-5,
                          "activation_function", "gelu_new", "tie_word_embeddings",
                          c->tied_head, "initializer_range", 0.02, "attn_pdrop", 0.1,
                          "scale_attn_weights", 1, "use_cache", 1);
    assert_non_null(j);
    return j;
}

static void write_config(const char *dir, json_t *j)
{
    char *p = path_in(dir, "config.json");
    assert_int_equal(json_dump_file(j, p, JSON_INDENT(2)), 0);
    json_decref(j);
    free(p);
}

/* Save m as model.safetensors + config.json in dir. */
static void save_checkpoint(const pr_model *m, const char *dir)
{
    char *p = path_in(dir, "model.safetensors");
    pr_error err = {0};
    int rc = pr_model_save_safetensors(m, p, &err);
    if (rc != PR_OK)
        fail_msg("save: %s", err.msg);
    free(p);
    write_config(dir, config_json(pr_model_get_config(m)));
}

static pr_model *load_ok(const char *dir)
{
    pr_model *m = NULL;
    pr_error err = {0};
    int rc = pr_model_load_hf(dir, &m, &err);
    if (rc != PR_OK)
        fail_msg("load %s: %s", dir, err.msg);
    assert_non_null(m);
    return m;
}

/* Loading must fail with code want and a message containing each of the
 * given fragments (NULL-terminated). */
static void expect_load_fails(const char *dir, int want, ...)
{
    pr_model *m = NULL;
    pr_error err = {0};
    int rc = pr_model_load_hf(dir, &m, &err);
    if (rc == PR_OK)
        fail_msg("%s loaded although it is broken", dir);
    assert_null(m);
    assert_int_equal(rc, want);
    va_list ap;
    va_start(ap, want);
    const char *frag;
    while ((frag = va_arg(ap, const char *)) != NULL)
        if (!strstr(err.msg, frag))
            fail_msg("message lacks '%s': %s", frag, err.msg);
    va_end(ap);
}

/* A loaded model equals the original: config, tensor table, values bit-exact
 * (tol 0) or within rel_tol*|x| + abs_tol. */
static void expect_same_tensors(const pr_model *a, const pr_model *b, float rel_tol, float abs_tol)
{
    const pr_model_config *ca = pr_model_get_config(a), *cb = pr_model_get_config(b);
    assert_int_equal(ca->n_layers, cb->n_layers);
    assert_int_equal(ca->d_model, cb->d_model);
    assert_int_equal(ca->n_heads, cb->n_heads);
    assert_int_equal(ca->n_kv_heads, cb->n_kv_heads);
    assert_int_equal(ca->d_head, cb->d_head);
    assert_int_equal(ca->d_ff, cb->d_ff);
    assert_int_equal(ca->vocab_size, cb->vocab_size);
    assert_int_equal(ca->max_seq, cb->max_seq);
    assert_true(ca->norm_eps == cb->norm_eps);
    assert_int_equal(ca->tied_head, cb->tied_head);
    assert_int_equal(cb->family, PR_FAMILY_GPT2);
    assert_int_equal(cb->bias, 1);
    assert_int_equal(cb->fused_qkv, 1);
    assert_int_equal(cb->norm, PR_NORM_LAYERNORM);
    assert_int_equal(cb->act, PR_ACT_GELU_TANH);
    assert_int_equal(cb->pos, PR_POS_LEARNED);
    assert_int_equal(pr_model_n_tensors(a), pr_model_n_tensors(b));
    for (int i = 0; i < pr_model_n_tensors(a); i++) {
        const pr_tensor_info *x = pr_model_tensor(a, i), *y = pr_model_tensor(b, i);
        assert_string_equal(x->name, y->name);
        assert_int_equal(x->ndim, y->ndim);
        for (int d = 0; d < x->ndim; d++)
            assert_int_equal(x->shape[d], y->shape[d]);
        assert_int_equal(x->numel, y->numel);
        assert_int_equal((uintptr_t)y->data % sizeof(float), 0);
        if (rel_tol == 0.0f && abs_tol == 0.0f) {
            if (memcmp(x->data, y->data, (size_t)x->numel * sizeof(float)) != 0)
                fail_msg("tensor %s differs after loading", x->name);
            continue;
        }
        for (int64_t j = 0; j < x->numel; j++)
            if (fabsf(x->data[j] - y->data[j]) > rel_tol * fabsf(x->data[j]) + abs_tol)
                fail_msg("tensor %s[%lld]: %.9g vs %.9g", x->name, (long long)j, x->data[j],
                         y->data[j]);
    }
}

/* Logits (B,T,V) and loss of one fixed batch. */
static float forward_logits(pr_model *m, float *logits)
{
    int tokens[B * T], targets[B * T];
    for (int i = 0; i < B * T; i++) {
        tokens[i] = (i * 37 + 11) % V;
        targets[i] = (i * 53 + 5) % V;
    }
    pr_batch batch = {.tokens = tokens, .targets = targets, .B = B, .T = T};
    pr_error err = {0};
    float loss = 0;
    if (pr_model_reserve(m, B, T, &err) != PR_OK || pr_model_forward(m, &batch, &loss, &err) != PR_OK)
        fail_msg("forward: %s", err.msg);
    memcpy(logits, pr_model_logits(m), sizeof(float) * B * T * V);
    assert_true(isfinite(loss));
    return loss;
}

/* Forward results agree within tol (0: bit-exact). */
static void expect_same_forward(pr_model *a, pr_model *b, float tol)
{
    static float la[B * T * V], lb[B * T * V];
    float loss_a = forward_logits(a, la), loss_b = forward_logits(b, lb);
    if (tol == 0.0f) {
        assert_memory_equal(la, lb, sizeof la);
        assert_true(loss_a == loss_b);
        return;
    }
    for (int i = 0; i < B * T * V; i++)
        if (fabsf(la[i] - lb[i]) > tol)
            fail_msg("logit %d: %.9g vs %.9g (tol %g)", i, la[i], lb[i], (double)tol);
    assert_true(fabsf(loss_a - loss_b) <= tol);
}

/* Model tensors as safetensors entries, optionally renamed with the
 * "transformer." prefix and stored as dtype. */
typedef struct entry_set {
    st_entry e[64];
    char names[64][96];
    int n;
} entry_set;

static void model_entries(const pr_model *m, const char *prefix, int dtype, entry_set *s)
{
    s->n = 0;
    for (int i = 0; i < pr_model_n_tensors(m); i++) {
        const pr_tensor_info *t = pr_model_tensor(m, i);
        assert_true(s->n < 64);
        snprintf(s->names[s->n], sizeof s->names[0], "%s%s", prefix, t->name);
        st_entry *e = &s->e[s->n++];
        memset(e, 0, sizeof *e);
        e->name = s->names[s->n - 1];
        e->ndim = t->ndim;
        for (int d = 0; d < t->ndim; d++)
            e->shape[d] = t->shape[d];
        e->data = t->data;
        e->dtype = dtype;
    }
}

static void drop_entry(entry_set *s, const char *name)
{
    for (int i = 0; i < s->n; i++)
        if (strcmp(s->e[i].name, name) == 0) {
            memmove(&s->e[i], &s->e[i + 1], (size_t)(s->n - i - 1) * sizeof s->e[0]);
            s->n--;
            return;
        }
    fail_msg("no entry %s", name);
}

static void write_entries(const char *dir, const char *file, const st_entry *e, int n)
{
    char *p = path_in(dir, file);
    pr_error err = {0};
    static const st_kv meta[] = {{"format", "pt"}};
    if (st_write(p, e, n, meta, 1, &err) != PR_OK)
        fail_msg("st_write: %s", err.msg);
    free(p);
}

/* ---- loading what we saved ----------------------------------------------------------- */

static void test_save_load_roundtrip(void **state)
{
    (void)state;
    char *dir = make_tmpdir();
    pr_model_config c = tiny_config();
    pr_model *a = tiny_model(&c);
    save_checkpoint(a, dir);

    /* the saved file: F32, HF names, "format": "pt" */
    char *p = path_in(dir, "model.safetensors");
    st_file *f = NULL;
    pr_error err = {0};
    assert_int_equal(st_open(p, 0, &f, &err), PR_OK);
    assert_int_equal(st_count(f), pr_model_n_tensors(a));
    assert_string_equal(st_metadata(f, "format"), "pt");
    const st_tensor *t = st_find(f, "h.1.attn.c_attn.weight");
    assert_non_null(t);
    assert_int_equal(t->dtype, ST_F32);
    assert_int_equal(t->shape[0], C);
    assert_int_equal(t->shape[1], 3 * C);
    assert_null(st_find(f, "lm_head.weight")); /* tied: wte serves */
    st_close(f);

    pr_model *b = load_ok(dir);
    expect_same_tensors(a, b, 0, 0);
    assert_int_equal(pr_model_param_count(a), pr_model_param_count(b));
    expect_same_forward(a, b, 0);

    /* a loaded F32 tensor made trainable and changed in memory leaves the
     * file alone (private copy-on-write mapping) */
    assert_int_equal(pr_model_set_trainable(b, "ln_f.bias", 1, &err), PR_OK);
    const pr_tensor_info *lb = pr_model_find_tensor(b, "ln_f.bias");
    assert_non_null(lb);
    float orig = lb->data[3];
    lb->data[3] = 123.0f;
    pr_model *c2 = load_ok(dir);
    assert_true(pr_model_find_tensor(c2, "ln_f.bias")->data[3] == orig);
    pr_model_free(c2);

    pr_model_free(b);
    pr_model_free(a);
    free(p);
    th_scratch_dir_free(dir);
}

/* GPT2LMHeadModel state dicts: "transformer." names, causal-mask buffers,
 * lm_head.weight duplicating wte; n_ctx instead of n_positions. */
static void test_prefixed_names_and_buffers(void **state)
{
    (void)state;
    char *dir = make_tmpdir();
    pr_model_config c = tiny_config();
    pr_model *a = tiny_model(&c);
    entry_set s;
    model_entries(a, "transformer.", ST_F32, &s);
    static float mask[P * P], masked_bias[1] = {-1e4f};
    for (int i = 0; i < P; i++)
        for (int j = 0; j <= i; j++)
            mask[i * P + j] = 1.0f;
    for (int l = 0; l < L; l++) {
        snprintf(s.names[s.n], sizeof s.names[0], "transformer.h.%d.attn.bias", l);
        s.e[s.n] = (st_entry){.name = s.names[s.n], .ndim = 4, .shape = {1, 1, P, P}, .data = mask};
        s.n++;
        snprintf(s.names[s.n], sizeof s.names[0], "transformer.h.%d.attn.masked_bias", l);
        s.e[s.n] = (st_entry){.name = s.names[s.n], .ndim = 0, .data = masked_bias};
        s.n++;
    }
    const pr_tensor_info *wte = pr_model_find_tensor(a, "wte.weight");
    s.e[s.n++] = (st_entry){.name = "lm_head.weight", .ndim = 2, .shape = {V, C}, .data = wte->data};
    write_entries(dir, "model.safetensors", s.e, s.n);
    json_t *j = config_json(&c);
    json_object_del(j, "n_positions");
    write_config(dir, j);

    pr_model *b = load_ok(dir);
    expect_same_tensors(a, b, 0, 0);
    expect_same_forward(a, b, 0);
    pr_model_free(b);

    /* the same tensor under both names is ambiguous */
    s.e[s.n++] = (st_entry){.name = "wte.weight", .ndim = 2, .shape = {V, C}, .data = wte->data};
    write_entries(dir, "model.safetensors", s.e, s.n);
    expect_load_fails(dir, PR_ERR_FORMAT, "model.safetensors", "wte.weight", NULL);

    pr_model_free(a);
    th_scratch_dir_free(dir);
}

/* An untied LM head is its own tensor; n_inner given explicitly. */
static void test_untied_head(void **state)
{
    (void)state;
    char *dir = make_tmpdir();
    pr_model_config c = tiny_config();
    c.tied_head = 0;
    c.d_ff = 3 * C;
    pr_model *a = tiny_model(&c);
    assert_non_null(pr_model_find_tensor(a, "lm_head.weight"));
    char *p = path_in(dir, "model.safetensors");
    pr_error err = {0};
    assert_int_equal(pr_model_save_safetensors(a, p, &err), PR_OK);
    json_t *j = config_json(&c);
    json_object_set_new(j, "n_inner", json_integer(3 * C));
    write_config(dir, j);
    pr_model *b = load_ok(dir);
    assert_int_equal(pr_model_get_config(b)->d_ff, 3 * C);
    expect_same_tensors(a, b, 0, 0);
    expect_same_forward(a, b, 0);
    pr_model_free(b);

    /* without lm_head.weight the untied model is incomplete */
    entry_set s;
    model_entries(a, "", ST_F32, &s);
    drop_entry(&s, "lm_head.weight");
    write_entries(dir, "model.safetensors", s.e, s.n);
    expect_load_fails(dir, PR_ERR_NOTFOUND, "model.safetensors", "'lm_head.weight'", NULL);
    pr_model_free(a);
    free(p);
    th_scratch_dir_free(dir);
}

static void write_sharded(const pr_model *a, const char *dir, const char *prefix)
{
    entry_set s;
    model_entries(a, prefix, ST_F32, &s);
    const char *files[2] = {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"};
    int half = s.n / 2;
    write_entries(dir, files[0], s.e, half);
    write_entries(dir, files[1], s.e + half, s.n - half);
    json_t *wm = json_object();
    for (int i = 0; i < s.n; i++)
        json_object_set_new(wm, s.e[i].name, json_string(files[i < half ? 0 : 1]));
    json_t *idx = json_pack("{s:{s:I}, s:o}", "metadata", "total_size",
                            (json_int_t)(pr_model_param_count(a) * 4), "weight_map", wm);
    char *p = path_in(dir, "model.safetensors.index.json");
    assert_int_equal(json_dump_file(idx, p, JSON_INDENT(2)), 0);
    json_decref(idx);
    free(p);
    write_config(dir, config_json(pr_model_get_config(a)));
}

static void test_sharded(void **state)
{
    (void)state;
    char *dir = make_tmpdir();
    pr_model_config c = tiny_config();
    pr_model *a = tiny_model(&c);
    write_sharded(a, dir, "transformer.");
    pr_model *b = load_ok(dir);
    expect_same_tensors(a, b, 0, 0);
    expect_same_forward(a, b, 0);
    pr_model_free(b);

    /* a shard cut short: the error names the shard and a tensor */
    char *shard2 = path_in(dir, "model-00002-of-00002.safetensors");
    char *buf = NULL;
    size_t len = 0;
    pr_error err = {0};
    assert_int_equal(fileio_read_all(shard2, 1 << 24, &buf, &len, &err), PR_OK);
    assert_int_equal(fileio_write_atomic(shard2, buf, len - 6, &err), PR_OK);
    expect_load_fails(dir, PR_ERR_FORMAT, "model-00002-of-00002.safetensors", "tensor '", NULL);
    free(buf);

    /* weight_map pointing at a shard that lacks the tensor */
    write_sharded(a, dir, "");
    char *ip = path_in(dir, "model.safetensors.index.json");
    json_error_t jerr;
    json_t *idx = json_load_file(ip, 0, &jerr);
    assert_non_null(idx);
    json_object_set_new(json_object_get(idx, "weight_map"), "wte.weight",
                        json_string("model-00002-of-00002.safetensors"));
    assert_int_equal(json_dump_file(idx, ip, 0), 0);
    json_decref(idx);
    expect_load_fails(dir, PR_ERR_FORMAT, "model-00002-of-00002.safetensors", "'wte.weight'", NULL);

    /* a missing shard file */
    write_sharded(a, dir, "");
    unlink(shard2);
    expect_load_fails(dir, PR_ERR_NOTFOUND, "model-00002-of-00002.safetensors", NULL);

    free(ip);
    free(shard2);
    pr_model_free(a);
    th_scratch_dir_free(dir);
}

/* F16 / BF16 checkpoints convert to f32 within the dtype's rounding:
 * |x16 - x| <= 2^-11 |x| (+ 2^-25 for f16 subnormals), |xbf - x| <= 2^-8 |x|;
 * and a mix of F16 and F32 tensors loads each correctly. */
static void test_half_precision(void **state)
{
    (void)state;
    char *dir = make_tmpdir();
    pr_model_config c = tiny_config();
    pr_model *a = tiny_model(&c);
    write_config(dir, config_json(&c));
    const int dtypes[2] = {ST_F16, ST_BF16};
    const float rel[2] = {0x1p-11f, 0x1p-8f}, abs_[2] = {0x1p-25f, 0.0f};
    for (int k = 0; k < 2; k++) {
        entry_set s;
        model_entries(a, "", dtypes[k], &s);
        write_entries(dir, "model.safetensors", s.e, s.n);
        pr_model *b = load_ok(dir);
        expect_same_tensors(a, b, rel[k], abs_[k]);
        /* and exactly the dtype's rounding of each value */
        for (int i = 0; i < pr_model_n_tensors(a); i++) {
            const pr_tensor_info *x = pr_model_tensor(a, i), *y = pr_model_tensor(b, i);
            for (int64_t j = 0; j < x->numel; j++) {
                float want = k == 0 ? st_f16_to_f32(st_f32_to_f16(x->data[j]))
                                    : st_bf16_to_f32(st_f32_to_bf16(x->data[j]));
                assert_true(y->data[j] == want);
            }
        }
        /* weights of std 0.02 rounded this finely move logits by far less than 1e-2 */
        expect_same_forward(a, b, 1e-2f);
        pr_model_free(b);
    }
    /* mixed: every other tensor F16 */
    entry_set s;
    model_entries(a, "", ST_F32, &s);
    for (int i = 0; i < s.n; i += 2)
        s.e[i].dtype = ST_F16;
    write_entries(dir, "model.safetensors", s.e, s.n);
    pr_model *b = load_ok(dir);
    for (int i = 0; i < pr_model_n_tensors(a); i++) {
        const pr_tensor_info *x = pr_model_tensor(a, i), *y = pr_model_tensor(b, i);
        for (int64_t j = 0; j < x->numel; j++) {
            float want = i % 2 == 0 ? st_f16_to_f32(st_f32_to_f16(x->data[j])) : x->data[j];
            assert_true(y->data[j] == want);
        }
    }
    pr_model_free(b);
    pr_model_free(a);
    th_scratch_dir_free(dir);
}

/* A file whose F32 data is not 4-byte aligned (header length 2 mod 4) is
 * valid safetensors; its tensors are copied instead of used in place. */
static void test_unaligned_f32(void **state)
{
    (void)state;
    char *dir = make_tmpdir();
    pr_model_config c = tiny_config();
    pr_model *a = tiny_model(&c);
    write_config(dir, config_json(&c));
    json_t *hdr = json_object();
    size_t off = 0;
    for (int i = 0; i < pr_model_n_tensors(a); i++) {
        const pr_tensor_info *t = pr_model_tensor(a, i);
        json_t *shape = t->ndim == 2 ? json_pack("[I, I]", (json_int_t)t->shape[0], (json_int_t)t->shape[1])
                                     : json_pack("[I]", (json_int_t)t->shape[0]);
        size_t nb = (size_t)t->numel * 4;
        json_object_set_new(hdr, t->name,
                            json_pack("{s:s, s:o, s:[I, I]}", "dtype", "F32", "shape", shape,
                                      "data_offsets", (json_int_t)off, (json_int_t)(off + nb)));
        off += nb;
    }
    char *js = json_dumps(hdr, JSON_COMPACT);
    json_decref(hdr);
    size_t jl = strlen(js), n = jl;
    while ((8 + n) % 4 != 2)
        n++;
    unsigned char *buf = malloc(8 + n + off);
    assert_non_null(buf);
    for (int i = 0; i < 8; i++)
        buf[i] = (unsigned char)((uint64_t)n >> (8 * i));
    memcpy(buf + 8, js, jl);
    memset(buf + 8 + jl, ' ', n - jl);
    size_t pos = 8 + n;
    for (int i = 0; i < pr_model_n_tensors(a); i++) {
        const pr_tensor_info *t = pr_model_tensor(a, i);
        memcpy(buf + pos, t->data, (size_t)t->numel * 4);
        pos += (size_t)t->numel * 4;
    }
    char *p = path_in(dir, "model.safetensors");
    pr_error err = {0};
    assert_int_equal(fileio_write_atomic(p, buf, pos, &err), PR_OK);
    pr_model *b = load_ok(dir);
    expect_same_tensors(a, b, 0, 0);
    expect_same_forward(a, b, 0);
    pr_model_free(b);
    free(p);
    free(buf);
    free(js);
    pr_model_free(a);
    th_scratch_dir_free(dir);
}

/* ---- broken checkpoints ---------------------------------------------------------------- */

static void test_missing_and_wrong_tensors(void **state)
{
    (void)state;
    char *dir = make_tmpdir();
    pr_model_config c = tiny_config();
    pr_model *a = tiny_model(&c);
    write_config(dir, config_json(&c));

    expect_load_fails(dir, PR_ERR_NOTFOUND, "model.safetensors", NULL); /* no weights at all */

    entry_set s;
    model_entries(a, "", ST_F32, &s);
    drop_entry(&s, "h.1.mlp.c_fc.bias");
    write_entries(dir, "model.safetensors", s.e, s.n);
    expect_load_fails(dir, PR_ERR_NOTFOUND, "model.safetensors", "'h.1.mlp.c_fc.bias'", NULL);

    /* wpe of a 8-position model under a config that says 16 */
    pr_model_config c8 = tiny_config();
    c8.max_seq = 8;
    pr_model *a8 = tiny_model(&c8);
    char *p = path_in(dir, "model.safetensors");
    pr_error err = {0};
    assert_int_equal(pr_model_save_safetensors(a8, p, &err), PR_OK);
    expect_load_fails(dir, PR_ERR_FORMAT, "model.safetensors", "wpe.weight", "[8, 16]", "[16, 16]",
                      NULL);

    /* a tensor the model does not have */
    model_entries(a, "", ST_F32, &s);
    static float extra[4];
    s.e[s.n++] = (st_entry){.name = "h.1.attn.rotary.weight", .ndim = 1, .shape = {4}, .data = extra};
    write_entries(dir, "model.safetensors", s.e, s.n);
    expect_load_fails(dir, PR_ERR_FORMAT, "model.safetensors", "'h.1.attn.rotary.weight'", NULL);

    /* an integer tensor where a weight belongs */
    model_entries(a, "", ST_F32, &s);
    drop_entry(&s, "ln_f.bias");
    write_entries(dir, "model.safetensors", s.e, s.n);
    {
        /* append ln_f.bias as I32 by rewriting the file by hand */
        st_file *f = NULL;
        assert_int_equal(st_open(p, 0, &f, &err), PR_OK);
        json_t *hdr = json_object();
        size_t off = 0;
        for (int i = 0; i < st_count(f); i++) {
            const st_tensor *t = st_tensor_at(f, i);
            json_t *shape = json_array();
            for (int d = 0; d < t->ndim; d++)
                json_array_append_new(shape, json_integer(t->shape[d]));
            json_object_set_new(hdr, t->name,
                                json_pack("{s:s, s:o, s:[I, I]}", "dtype", "F32", "shape", shape,
                                          "data_offsets", (json_int_t)off,
                                          (json_int_t)(off + t->nbytes)));
            off += t->nbytes;
        }
        json_object_set_new(hdr, "ln_f.bias",
                            json_pack("{s:s, s:[i], s:[I, I]}", "dtype", "I32", "shape", C,
                                      "data_offsets", (json_int_t)off, (json_int_t)(off + 4 * C)));
        char *js = json_dumps(hdr, JSON_COMPACT);
        json_decref(hdr);
        size_t jl = strlen(js), total = 8 + jl + off + 4 * C;
        unsigned char *buf = calloc(1, total);
        for (int i = 0; i < 8; i++)
            buf[i] = (unsigned char)((uint64_t)jl >> (8 * i));
        memcpy(buf + 8, js, jl);
        size_t pos = 8 + jl;
        for (int i = 0; i < st_count(f); i++) {
            const st_tensor *t = st_tensor_at(f, i);
            memcpy(buf + pos, t->data, t->nbytes);
            pos += t->nbytes;
        }
        st_close(f);
        assert_int_equal(fileio_write_atomic(p, buf, total, &err), PR_OK);
        free(buf);
        free(js);
    }
    expect_load_fails(dir, PR_ERR_UNSUPPORTED, "model.safetensors", "'ln_f.bias'", "I32", NULL);

    free(p);
    pr_model_free(a8);
    pr_model_free(a);
    th_scratch_dir_free(dir);
}

static void test_config_errors(void **state)
{
    (void)state;
    char *dir = make_tmpdir();
    pr_model_config c = tiny_config();
    pr_model *a = tiny_model(&c);
    save_checkpoint(a, dir);

    static const char *required[] = {"n_layer", "n_embd", "n_head", "vocab_size"};
    for (size_t i = 0; i < sizeof required / sizeof required[0]; i++) {
        json_t *j = config_json(&c);
        json_object_del(j, required[i]);
        write_config(dir, j);
        expect_load_fails(dir, PR_ERR_NOTFOUND, "config.json", required[i], NULL);
    }
    json_t *j = config_json(&c);
    json_object_del(j, "n_positions");
    json_object_del(j, "n_ctx");
    write_config(dir, j);
    expect_load_fails(dir, PR_ERR_NOTFOUND, "config.json", "n_positions", NULL);

    j = config_json(&c);
    json_object_set_new(j, "n_embd", json_string("16"));
    write_config(dir, j);
    expect_load_fails(dir, PR_ERR_FORMAT, "config.json", "n_embd", NULL);

    j = config_json(&c);
    json_object_set_new(j, "n_head", json_integer(3));
    write_config(dir, j);
    expect_load_fails(dir, PR_ERR_FORMAT, "config.json", "n_head", NULL);

    j = config_json(&c);
    json_object_set_new(j, "activation_function", json_string("relu"));
    write_config(dir, j);
    expect_load_fails(dir, PR_ERR_UNSUPPORTED, "config.json", "activation_function", "relu", NULL);

    j = config_json(&c);
    json_object_set_new(j, "model_type", json_string("gemma"));
    write_config(dir, j);
    expect_load_fails(dir, PR_ERR_UNSUPPORTED, "config.json", "model_type", "gemma", "llama", "qwen3", NULL);

    j = config_json(&c);
    json_object_set_new(j, "scale_attn_by_inverse_layer_idx", json_true());
    write_config(dir, j);
    expect_load_fails(dir, PR_ERR_UNSUPPORTED, "config.json", "scale_attn_by_inverse_layer_idx",
                      NULL);

    j = config_json(&c);
    json_object_set_new(j, "tie_word_embeddings", json_integer(1));
    write_config(dir, j);
    expect_load_fails(dir, PR_ERR_FORMAT, "config.json", "tie_word_embeddings", NULL);

    j = config_json(&c);
    json_object_set_new(j, "layer_norm_epsilon", json_real(-1.0));
    write_config(dir, j);
    expect_load_fails(dir, PR_ERR_FORMAT, "config.json", "layer_norm_epsilon", NULL);

    char *cp = path_in(dir, "config.json");
    pr_error err = {0};
    assert_int_equal(fileio_write_atomic(cp, "{\"n_layer\": 2,", 14, &err), PR_OK);
    expect_load_fails(dir, PR_ERR_FORMAT, "config.json", NULL);
    unlink(cp);
    expect_load_fails(dir, PR_ERR_NOTFOUND, "config.json", NULL);

    /* gelu_pytorch_tanh is the same function as gelu_new; missing optional
     * keys take GPT2Config's defaults */
    j = config_json(&c);
    json_object_set_new(j, "activation_function", json_string("gelu_pytorch_tanh"));
    json_object_del(j, "layer_norm_epsilon");
    json_object_del(j, "tie_word_embeddings");
    json_object_del(j, "n_inner");
    write_config(dir, j);
    pr_model *b = load_ok(dir);
    assert_true(pr_model_get_config(b)->norm_eps == 1e-5f);
    assert_int_equal(pr_model_get_config(b)->tied_head, 1);
    assert_int_equal(pr_model_get_config(b)->d_ff, 4 * C);
    expect_same_tensors(a, b, 0, 0);
    pr_model_free(b);

    free(cp);
    pr_model_free(a);
    th_scratch_dir_free(dir);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_save_load_roundtrip),
        cmocka_unit_test(test_prefixed_names_and_buffers),
        cmocka_unit_test(test_untied_head),
        cmocka_unit_test(test_sharded),
        cmocka_unit_test(test_half_precision),
        cmocka_unit_test(test_unaligned_f32),
        cmocka_unit_test(test_missing_and_wrong_tensors),
        cmocka_unit_test(test_config_errors),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
