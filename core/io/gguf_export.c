/* peftref core: models and LoRA modules as GGUF files for llama.cpp.
 *
 * The names, shapes and keys are those llama.cpp's loader reads (its
 * llama-arch.cpp names, llama-model.cpp hyperparameters, llama-vocab.cpp
 * tokenizer keys and llama-adapter.cpp's LoRA loader), and the layout its
 * converters (convert_hf_to_gguf.py, convert_lora_to_gguf.py) write:
 *  - a matrix [out, in] (nn.Linear) is stored as is, ne = {in, out};
 *    GPT-2's Conv1D [in, out] is transposed to that;
 *  - LLaMA's q and k rows go from Hugging Face's rotate-half order to the
 *    interleaved pairs of llama.cpp's RoPE (gguf_rope_permute_rows);
 *  - a LoRA pair is lora_a = A (r, in), ne {in, r}, and lora_b = B (out, r),
 *    ne {r, out}; llama.cpp scales B.A.x by adapter.lora.alpha / r with r
 *    the pair's own rank (alpha 0 or absent means scale 1). */
#include "config.h"

#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/io/gguf.h"
#include "core/io/gguf_export.h"
#include "core/model/llama_kernels.h"
#include "peftref/site.h"

const char *gguf_arch_for(const pr_model_config *cfg, int adapter, pr_error *err)
{
    if (cfg->family == PR_FAMILY_GPT2)
        return "gpt2";
    switch (cfg->variant) {
    case PR_VARIANT_LLAMA:
    case PR_VARIANT_MISTRAL:
        return "llama";   /* llama.cpp converts MistralForCausalLM to its llama architecture */
    case PR_VARIANT_QWEN2:
        if (adapter)
            return "qwen2";
        break;
    case PR_VARIANT_QWEN3:
        if (adapter)
            return "qwen3";
        break;
    default:
        break;
    }
    pr_errorf(err, PR_ERR_UNSUPPORTED, "gguf --base writes llama.cpp's llama (model_type llama, mistral) and gpt2 "
              "architectures; model_type %s is not one of them (its adapters can be exported)",
              cfg->variant == PR_VARIANT_QWEN2 ? "qwen2" : cfg->variant == PR_VARIANT_QWEN3 ? "qwen3" : "?");
    return NULL;
}

/* Rows h*D + s*D/2 + i (Hugging Face) <-> h*D + 2i + s (llama.cpp). */
static int64_t rope_row(int64_t r, int d_head)
{
    int64_t h = r / d_head, k = r % d_head, half = d_head / 2;
    int64_t s = k / half, i = k % half;
    return h * d_head + 2 * i + s;
}

void gguf_rope_permute_rows(const float *src, float *dst, int n_head, int d_head, int64_t cols)
{
    for (int64_t r = 0; r < (int64_t)n_head * d_head; r++)
        memcpy(dst + rope_row(r, d_head) * cols, src + r * cols, (size_t)cols * sizeof *src);
}

void gguf_rope_unpermute_rows(const float *src, float *dst, int n_head, int d_head, int64_t cols)
{
    for (int64_t r = 0; r < (int64_t)n_head * d_head; r++)
        memcpy(dst + r * cols, src + rope_row(r, d_head) * cols, (size_t)cols * sizeof *src);
}

/* ---- base tensors -------------------------------------------------------- */

typedef struct exporter {
    const pr_model *m;
    gguf_writer *w;
    int type;          /* of matrices */
    pr_error *err;
    int failed;
} exporter;

static const pr_tensor_info *need_tensor(exporter *x, const char *name)
{
    const pr_tensor_info *t = pr_model_find_tensor(x->m, name);
    if (!t && !x->failed) {
        pr_errorf(x->err, PR_ERR_NOTFOUND, "gguf: the model has no tensor '%s'", name);
        x->failed = 1;
    }
    return t;
}

static float *dup_floats(exporter *x, const float *src, int64_t n)
{
    float *p = malloc((size_t)n * sizeof *p);
    if (!p) {
        if (!x->failed)
            pr_errorf(x->err, PR_ERR_NOMEM, "gguf: out of memory for %lld values", (long long)n);
        x->failed = 1;
        return NULL;
    }
    if (src)
        memcpy(p, src, (size_t)n * sizeof *p);
    else
        memset(p, 0, (size_t)n * sizeof *p);
    return p;
}

/* A vector (F32), or zeros of length n when src is NULL. */
static void put_vector(exporter *x, const char *gname, const pr_tensor_info *t, int64_t n)
{
    if (x->failed)
        return;
    int64_t ne[1] = {t ? t->numel : n};
    if (t) {
        gguf_add_tensor(x->w, gname, 1, ne, GGUF_TENSOR_F32, t->data, 0);
        return;
    }
    float *z = dup_floats(x, NULL, n);
    if (z)
        gguf_add_tensor(x->w, gname, 1, ne, GGUF_TENSOR_F32, z, 1);
}

/* A [rows, cols] row-major matrix as is: ne = {cols, rows}. */
static void put_matrix(exporter *x, const char *gname, const pr_tensor_info *t)
{
    if (x->failed || !t)
        return;
    int64_t ne[2] = {t->shape[1], t->shape[0]};
    gguf_add_tensor(x->w, gname, 2, ne, x->type, t->data, 0);
}

/* A Conv1D [in, out] transposed to [out, in]: ne = {in, out}. */
static void put_transposed(exporter *x, const char *gname, const pr_tensor_info *t)
{
    if (x->failed || !t)
        return;
    int64_t in = t->shape[0], out = t->shape[1];
    float *p = dup_floats(x, NULL, in * out);
    if (!p)
        return;
    for (int64_t i = 0; i < in; i++)
        for (int64_t o = 0; o < out; o++)
            p[o * in + i] = t->data[i * out + o];
    int64_t ne[2] = {in, out};
    gguf_add_tensor(x->w, gname, 2, ne, x->type, p, 1);
}

/* q or k rows (weight [rows, cols] or bias [rows]) in llama.cpp's RoPE order. */
static void put_rope_permuted(exporter *x, const char *gname, const pr_tensor_info *t, int n_head, int d_head)
{
    if (x->failed || !t)
        return;
    float *p = dup_floats(x, NULL, t->numel);
    if (!p)
        return;
    int64_t cols = t->ndim == 2 ? t->shape[1] : 1;
    gguf_rope_permute_rows(t->data, p, n_head, d_head, cols);
    int64_t ne[2] = {cols, t->shape[0]};
    if (t->ndim == 2)
        gguf_add_tensor(x->w, gname, 2, ne, x->type, p, 1);
    else
        gguf_add_tensor(x->w, gname, 1, ne + 1, GGUF_TENSOR_F32, p, 1);
}

static void llama_tensors(exporter *x)
{
    const pr_model_config *c = pr_model_get_config(x->m);
    char src[160], dst[160];
    put_matrix(x, "token_embd.weight", need_tensor(x, "model.embed_tokens.weight"));
    put_vector(x, "output_norm.weight", need_tensor(x, "model.norm.weight"), 0);
    if (!c->tied_head)
        put_matrix(x, "output.weight", need_tensor(x, "lm_head.weight"));
    if (c->rope_scaling == PR_ROPE_LLAMA3) {
        /* llama.cpp divides each frequency by rope_freqs[i]: the ratio of the
         * unscaled to the llama3-scaled inverse frequency */
        int half = c->d_head / 2;
        double *base = malloc(2 * (size_t)half * sizeof *base);
        float *f = dup_floats(x, NULL, half);
        if (!base || !f) {
            free(base);
            free(f);
            if (!x->failed)
                pr_errorf(x->err, PR_ERR_NOMEM, "gguf: out of memory");
            x->failed = 1;
            return;
        }
        rope_params none = {.theta = c->rope_theta, .scaling = ROPE_SCALING_NONE};
        rope_params l3 = {.theta = c->rope_theta, .scaling = ROPE_SCALING_LLAMA3, .factor = c->rope_factor,
                          .low_freq_factor = c->rope_low_freq_factor, .high_freq_factor = c->rope_high_freq_factor,
                          .original_max_pos = c->rope_orig_max_pos};
        rope_inv_freq(base, c->d_head, &none);
        rope_inv_freq(base + half, c->d_head, &l3);
        for (int i = 0; i < half; i++)
            f[i] = (float)(base[i] / base[half + i]);
        free(base);
        int64_t ne[1] = {half};
        gguf_add_tensor(x->w, "rope_freqs.weight", 1, ne, GGUF_TENSOR_F32, f, 1);
    }
    static const struct { const char *hf, *gg; int rope; /* 1 q, 2 k */ int vec; } map[] = {
        {"input_layernorm.weight", "attn_norm.weight", 0, 1},
        {"self_attn.q_proj.weight", "attn_q.weight", 1, 0},
        {"self_attn.k_proj.weight", "attn_k.weight", 2, 0},
        {"self_attn.v_proj.weight", "attn_v.weight", 0, 0},
        {"self_attn.o_proj.weight", "attn_output.weight", 0, 0},
        {"post_attention_layernorm.weight", "ffn_norm.weight", 0, 1},
        {"mlp.gate_proj.weight", "ffn_gate.weight", 0, 0},
        {"mlp.up_proj.weight", "ffn_up.weight", 0, 0},
        {"mlp.down_proj.weight", "ffn_down.weight", 0, 0},
        {"self_attn.q_proj.bias", "attn_q.bias", 1, 1},
        {"self_attn.k_proj.bias", "attn_k.bias", 2, 1},
        {"self_attn.v_proj.bias", "attn_v.bias", 0, 1},
        {"self_attn.o_proj.bias", "attn_output.bias", 0, 1},
        {"mlp.gate_proj.bias", "ffn_gate.bias", 0, 1},
        {"mlp.up_proj.bias", "ffn_up.bias", 0, 1},
        {"mlp.down_proj.bias", "ffn_down.bias", 0, 1},
    };
    for (int l = 0; l < c->n_layers && !x->failed; l++)
        for (size_t k = 0; k < sizeof map / sizeof map[0]; k++) {
            snprintf(src, sizeof src, "model.layers.%d.%s", l, map[k].hf);
            snprintf(dst, sizeof dst, "blk.%d.%s", l, map[k].gg);
            const pr_tensor_info *t = pr_model_find_tensor(x->m, src);
            if (!t) {
                if (!map[k].vec)   /* every matrix is there; biases are optional */
                    need_tensor(x, src);
                continue;
            }
            if (map[k].rope)
                put_rope_permuted(x, dst, t, map[k].rope == 1 ? c->n_heads : c->n_kv_heads, c->d_head);
            else if (map[k].vec)
                put_vector(x, dst, t, 0);
            else
                put_matrix(x, dst, t);
        }
}

static void gpt2_tensors(exporter *x)
{
    const pr_model_config *c = pr_model_get_config(x->m);
    int64_t C = c->d_model, F = c->d_ff, QKV = (int64_t)(c->n_heads + 2 * c->n_kv_heads) * c->d_head;
    char src[160], dst[160];
    put_matrix(x, "token_embd.weight", need_tensor(x, "wte.weight"));
    put_matrix(x, "position_embd.weight", need_tensor(x, "wpe.weight"));
    put_vector(x, "output_norm.weight", need_tensor(x, "ln_f.weight"), 0);
    /* llama.cpp's gpt2 requires every bias; a bias-free model gets zeros */
    put_vector(x, "output_norm.bias", pr_model_find_tensor(x->m, "ln_f.bias"), C);
    if (!c->tied_head)
        put_matrix(x, "output.weight", need_tensor(x, "lm_head.weight"));
    static const struct { const char *hf, *gg; int conv; } map[] = {
        {"ln_1.weight", "attn_norm.weight", 0},       {"attn.c_attn.weight", "attn_qkv.weight", 1},
        {"attn.c_proj.weight", "attn_output.weight", 1}, {"ln_2.weight", "ffn_norm.weight", 0},
        {"mlp.c_fc.weight", "ffn_up.weight", 1},      {"mlp.c_proj.weight", "ffn_down.weight", 1},
    };
    static const struct { const char *hf, *gg; } bias[] = {
        {"ln_1.bias", "attn_norm.bias"}, {"attn.c_attn.bias", "attn_qkv.bias"},
        {"attn.c_proj.bias", "attn_output.bias"}, {"ln_2.bias", "ffn_norm.bias"},
        {"mlp.c_fc.bias", "ffn_up.bias"}, {"mlp.c_proj.bias", "ffn_down.bias"},
    };
    const int64_t bias_len[] = {C, QKV, C, C, F, C};
    for (int l = 0; l < c->n_layers && !x->failed; l++) {
        for (size_t k = 0; k < sizeof map / sizeof map[0]; k++) {
            snprintf(src, sizeof src, "h.%d.%s", l, map[k].hf);
            snprintf(dst, sizeof dst, "blk.%d.%s", l, map[k].gg);
            if (map[k].conv)
                put_transposed(x, dst, need_tensor(x, src));
            else
                put_vector(x, dst, need_tensor(x, src), 0);
        }
        for (size_t k = 0; k < sizeof bias / sizeof bias[0]; k++) {
            snprintf(src, sizeof src, "h.%d.%s", l, bias[k].hf);
            snprintf(dst, sizeof dst, "blk.%d.%s", l, bias[k].gg);
            put_vector(x, dst, pr_model_find_tensor(x->m, src), bias_len[k]);
        }
    }
}

/* ---- tokenizer ----------------------------------------------------------- */

/* GPT-2's byte-level alphabet: byte b -> the code point that spells it
 * (printable Latin-1 bytes map to themselves, the other 68 to 256 + k). */
static void byte_alphabet(int cp[256])
{
    int k = 0;
    for (int b = 0; b < 256; b++) {
        int printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
        cp[b] = printable ? b : 256 + k++;
    }
}

static size_t utf8_put(char *out, int cp)
{
    if (cp < 0x80) {
        out[0] = (char)cp;
        return 1;
    }
    out[0] = (char)(0xC0 | (cp >> 6));
    out[1] = (char)(0x80 | (cp & 0x3F));
    return 2;   /* the alphabet stays below U+0800 */
}

typedef struct vocab {
    char **tok;
    size_t *len;
    int32_t *type;     /* llama.cpp's token types: 1 normal, 3 control, 5 unused */
    int n;
    char **merge;
    size_t *merge_len;
    size_t n_merges;
    const char *pre;
    int bos, eos, add_bos;
} vocab;

static void vocab_free(vocab *v)
{
    for (int i = 0; v->tok && i < v->n; i++)
        free(v->tok[i]);
    for (size_t i = 0; v->merge && i < v->n_merges; i++)
        free(v->merge[i]);
    free(v->tok);
    free(v->len);
    free(v->type);
    free(v->merge);
    free(v->merge_len);
}

static int vocab_alloc(vocab *v, int n, pr_error *err)
{
    v->n = n;
    v->tok = calloc((size_t)n, sizeof *v->tok);
    v->len = calloc((size_t)n, sizeof *v->len);
    v->type = calloc((size_t)n, sizeof *v->type);
    if (!v->tok || !v->len || !v->type)
        return pr_errorf(err, PR_ERR_NOMEM, "gguf: out of memory for the vocabulary");
    return PR_OK;
}

static int vocab_set(vocab *v, int id, const char *s, size_t len, int type, pr_error *err)
{
    free(v->tok[id]);
    v->tok[id] = malloc(len + 1);
    if (!v->tok[id])
        return pr_errorf(err, PR_ERR_NOMEM, "gguf: out of memory for the vocabulary");
    memcpy(v->tok[id], s, len);
    v->tok[id][len] = '\0';
    v->len[id] = len;
    v->type[id] = type;
    return PR_OK;
}

/* Ids the tokenizer leaves unnamed up to the model's vocabulary (padding
 * rows of the embedding) become unused "[PADn]" tokens. */
static int vocab_pad(vocab *v, pr_error *err)
{
    char name[32];
    for (int i = 0; i < v->n; i++)
        if (!v->tok[i]) {
            int k = snprintf(name, sizeof name, "[PAD%d]", i);
            if (vocab_set(v, i, name, (size_t)k, 5, err))
                return err->code;
        }
    return PR_OK;
}

static int vocab_add_merge(vocab *v, const char *s, size_t len, size_t cap, pr_error *err)
{
    if (!v->merge) {
        v->merge = calloc(cap ? cap : 1, sizeof *v->merge);
        v->merge_len = calloc(cap ? cap : 1, sizeof *v->merge_len);
        if (!v->merge || !v->merge_len)
            return pr_errorf(err, PR_ERR_NOMEM, "gguf: out of memory for the merges");
    }
    char *p = malloc(len + 1);
    if (!p)
        return pr_errorf(err, PR_ERR_NOMEM, "gguf: out of memory for the merges");
    memcpy(p, s, len);
    p[len] = '\0';
    v->merge[v->n_merges] = p;
    v->merge_len[v->n_merges++] = len;
    return PR_OK;
}

/* The byte tokenizer: token b is byte b spelled in the byte alphabet, and
 * no merges, so llama.cpp's BPE splits any text into its bytes, ids equal
 * to the byte values, as peftref encodes it. */
static int vocab_bytes(vocab *v, int n_vocab, pr_error *err)
{
    if (vocab_alloc(v, n_vocab, err))
        return err->code;
    int cp[256];
    byte_alphabet(cp);
    for (int b = 0; b < 256 && b < n_vocab; b++) {
        char s[4];
        if (vocab_set(v, b, s, utf8_put(s, cp[b]), 1, err))
            return err->code;
    }
    v->pre = "default";
    v->bos = v->eos = -1;
    return vocab_pad(v, err);
}

/* One merges.txt line or tokenizer.json merge: "left right". */
static int merges_from_txt(vocab *v, const char *path, pr_error *err)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return pr_errorf(err, PR_ERR_IO, "gguf: cannot open %s", path);
    char *line = NULL;
    size_t cap = 0, n_alloc = 1024;
    ssize_t len;
    int rc = PR_OK;
    while (rc == PR_OK && (len = getline(&line, &cap, f)) >= 0) {
        while (len > 0 && (line[len - 1] == '\n' || line[len - 1] == '\r'))
            line[--len] = '\0';
        if (len == 0 || strncmp(line, "#version", 8) == 0)
            continue;
        if (v->n_merges == n_alloc || !v->merge) {
            size_t cap2 = v->merge ? 2 * n_alloc : n_alloc;
            char **m = realloc(v->merge, cap2 * sizeof *m);
            size_t *ml = m ? realloc(v->merge_len, cap2 * sizeof *ml) : NULL;
            if (m)
                v->merge = m;
            if (!m || !ml) {
                rc = pr_errorf(err, PR_ERR_NOMEM, "gguf: out of memory for the merges of %s", path);
                break;
            }
            v->merge_len = ml;
            n_alloc = cap2;
        }
        rc = vocab_add_merge(v, line, (size_t)len, 0, err);
    }
    free(line);
    fclose(f);
    return rc;
}

/* GPT-2 BPE from vocab.json (token -> id) and merges.txt. */
static int vocab_gpt2(vocab *v, const pr_tokenizer *tok, const char *dir, int n_vocab, pr_error *err)
{
    char path[4096];
    snprintf(path, sizeof path, "%s/vocab.json", dir);
    json_error_t je;
    json_t *root = json_load_file(path, 0, &je);
    if (!root || !json_is_object(root)) {
        json_decref(root);
        return pr_errorf(err, PR_ERR_FORMAT, "gguf: %s:%d: %s", path, je.line, root ? "not an object" : je.text);
    }
    int rc = vocab_alloc(v, n_vocab, err);
    const char *key;
    json_t *val;
    json_object_foreach(root, key, val) {
        if (rc)
            break;
        json_int_t id = json_integer_value(val);
        if (!json_is_integer(val) || id < 0 || id >= n_vocab) {
            rc = pr_errorf(err, PR_ERR_FORMAT, "gguf: %s: token '%s' has id outside 0..%d", path, key, n_vocab - 1);
            break;
        }
        rc = vocab_set(v, (int)id, key, strlen(key), id == pr_tokenizer_eot(tok) ? 3 : 1, err);
    }
    json_decref(root);
    if (rc == PR_OK) {
        snprintf(path, sizeof path, "%s/merges.txt", dir);
        rc = merges_from_txt(v, path, err);
    }
    v->pre = "gpt2";
    v->bos = v->eos = pr_tokenizer_eot(tok);
    return rc ? rc : vocab_pad(v, err);
}

/* Hugging Face tokenizer.json BPE: model.vocab, model.merges (strings or
 * pairs) and added_tokens (special ones are control tokens). */
static int vocab_hf(vocab *v, const pr_tokenizer *tok, const char *dir, int n_vocab, pr_error *err)
{
    char path[4096];
    snprintf(path, sizeof path, "%s/tokenizer.json", dir);
    json_error_t je;
    json_t *root = json_load_file(path, 0, &je);
    if (!root)
        return pr_errorf(err, PR_ERR_FORMAT, "gguf: %s:%d: %s", path, je.line, je.text);
    json_t *model = json_object_get(root, "model");
    json_t *jv = json_object_get(model, "vocab"), *jm = json_object_get(model, "merges");
    int rc = PR_OK;
    if (!json_is_object(jv) || !json_is_array(jm))
        rc = pr_errorf(err, PR_ERR_FORMAT, "gguf: %s: model.vocab or model.merges missing", path);
    if (rc == PR_OK)
        rc = vocab_alloc(v, n_vocab, err);
    const char *key;
    json_t *val;
    json_object_foreach(jv, key, val) {
        if (rc)
            break;
        json_int_t id = json_integer_value(val);
        if (!json_is_integer(val) || id < 0 || id >= n_vocab) {
            rc = pr_errorf(err, PR_ERR_FORMAT, "gguf: %s: token '%s' has id outside 0..%d", path, key, n_vocab - 1);
            break;
        }
        rc = vocab_set(v, (int)id, key, strlen(key), 1, err);
    }
    size_t i;
    json_array_foreach(json_object_get(root, "added_tokens"), i, val) {
        if (rc)
            break;
        json_int_t id = json_integer_value(json_object_get(val, "id"));
        const char *s = json_string_value(json_object_get(val, "content"));
        if (s && id >= 0 && id < n_vocab)
            rc = vocab_set(v, (int)id, s, strlen(s), json_is_true(json_object_get(val, "special")) ? 3 : 4, err);
    }
    json_array_foreach(jm, i, val) {
        if (rc)
            break;
        char buf[1024];
        const char *s = json_string_value(val);
        size_t len;
        if (s)
            len = strlen(s);
        else if (json_is_array(val) && json_array_size(val) == 2 && json_is_string(json_array_get(val, 0)) &&
                 json_is_string(json_array_get(val, 1))) {
            int k = snprintf(buf, sizeof buf, "%s %s", json_string_value(json_array_get(val, 0)),
                             json_string_value(json_array_get(val, 1)));
            if (k < 0 || (size_t)k >= sizeof buf) {
                rc = pr_errorf(err, PR_ERR_FORMAT, "gguf: %s: merge %zu is too long", path, i);
                break;
            }
            s = buf;
            len = (size_t)k;
        } else {
            rc = pr_errorf(err, PR_ERR_FORMAT, "gguf: %s: merge %zu is neither \"a b\" nor [a, b]", path, i);
            break;
        }
        rc = vocab_add_merge(v, s, len, json_array_size(jm), err);
    }
    json_decref(root);
    /* llama.cpp picks its pre-tokenizer regex by name and knows no way to
     * read tokenizer.json's; "default" is its GPT-2-like split */
    v->pre = "default";
    v->bos = pr_tokenizer_bos(tok);
    v->eos = pr_tokenizer_eot(tok);
    v->add_bos = pr_tokenizer_add_bos(tok);
    return rc ? rc : vocab_pad(v, err);
}

static int put_tokenizer(gguf_writer *w, const pr_tokenizer *tok, const char *dir, int n_vocab, pr_error *err)
{
    vocab v;
    memset(&v, 0, sizeof v);
    const char *kind = tok ? pr_tokenizer_kind(tok) : "byte";
    int rc;
    if (strcmp(kind, "byte") == 0)
        rc = vocab_bytes(&v, n_vocab, err);
    else if (!dir)
        rc = pr_errorf(err, PR_ERR_INVALID, "gguf: the %s tokenizer's directory is not known", kind);
    else if (strcmp(kind, "gpt2-bpe") == 0)
        rc = vocab_gpt2(&v, tok, dir, n_vocab, err);
    else if (strcmp(kind, "hf-bpe") == 0)
        rc = vocab_hf(&v, tok, dir, n_vocab, err);
    else
        rc = pr_errorf(err, PR_ERR_UNSUPPORTED, "gguf: tokenizer kind '%s' has no GGUF form", kind);
    if (rc == PR_OK && tok && pr_tokenizer_vocab_size(tok) > n_vocab)
        rc = pr_errorf(err, PR_ERR_INVALID, "gguf: the tokenizer has %d tokens, the model's vocabulary %d",
                       pr_tokenizer_vocab_size(tok), n_vocab);
    if (rc == PR_OK) {
        gguf_set_str(w, "tokenizer.ggml.model", "gpt2");
        gguf_set_str(w, "tokenizer.ggml.pre", v.pre);
        gguf_set_arr_str(w, "tokenizer.ggml.tokens", (const char *const *)v.tok, v.len, (size_t)v.n);
        gguf_set_arr_i32(w, "tokenizer.ggml.token_type", v.type, (size_t)v.n);
        gguf_set_arr_str(w, "tokenizer.ggml.merges", (const char *const *)v.merge, v.merge_len, v.n_merges);
        if (v.bos >= 0)
            gguf_set_u32(w, "tokenizer.ggml.bos_token_id", (uint32_t)v.bos);
        if (v.eos >= 0)
            gguf_set_u32(w, "tokenizer.ggml.eos_token_id", (uint32_t)v.eos);
        gguf_set_bool(w, "tokenizer.ggml.add_bos_token", v.add_bos);
    }
    vocab_free(&v);
    return rc;
}

int gguf_export_model(const pr_model *m, const pr_tokenizer *tok, const char *tokenizer_dir, const char *path,
                      int type, pr_error *err)
{
    const pr_model_config *c = pr_model_get_config(m);
    const char *arch = gguf_arch_for(c, 0, err);
    if (!arch)
        return err->code;
    if (c->family == PR_FAMILY_LLAMA && c->qk_norm)
        return pr_errorf(err, PR_ERR_UNSUPPORTED, "gguf: q/k norms have no place in llama.cpp's llama architecture");
    gguf_writer *w = gguf_writer_new();
    if (!w)
        return pr_errorf(err, PR_ERR_NOMEM, "gguf: out of memory");
    char k[128];
#define KEY(s) (snprintf(k, sizeof k, "%s." s, arch), k)
    gguf_set_str(w, "general.architecture", arch);
    gguf_set_str(w, "general.type", "model");
    gguf_set_str(w, "general.name", "peftref export");
    gguf_set_u32(w, "general.alignment", GGUF_DEFAULT_ALIGNMENT);
    gguf_set_u32(w, "general.file_type", type == GGUF_TENSOR_F16 ? 1u : 0u);   /* llama_ftype ALL_F32 / MOSTLY_F16 */
    gguf_set_u32(w, KEY("vocab_size"), (uint32_t)c->vocab_size);
    gguf_set_u32(w, KEY("context_length"), (uint32_t)c->max_seq);
    gguf_set_u32(w, KEY("embedding_length"), (uint32_t)c->d_model);
    gguf_set_u32(w, KEY("feed_forward_length"), (uint32_t)c->d_ff);
    gguf_set_u32(w, KEY("block_count"), (uint32_t)c->n_layers);
    gguf_set_u32(w, KEY("attention.head_count"), (uint32_t)c->n_heads);
    gguf_set_u32(w, KEY("attention.head_count_kv"), (uint32_t)c->n_kv_heads);
    gguf_set_u32(w, KEY("attention.key_length"), (uint32_t)c->d_head);
    gguf_set_u32(w, KEY("attention.value_length"), (uint32_t)c->d_head);
    if (c->family == PR_FAMILY_GPT2) {
        gguf_set_f32(w, KEY("attention.layer_norm_epsilon"), c->norm_eps);
    } else {
        gguf_set_f32(w, KEY("attention.layer_norm_rms_epsilon"), c->norm_eps);
        gguf_set_u32(w, KEY("rope.dimension_count"), (uint32_t)c->d_head);
        gguf_set_f32(w, KEY("rope.freq_base"), c->rope_theta);
        if (c->rope_scaling == PR_ROPE_LINEAR) {
            gguf_set_str(w, KEY("rope.scaling.type"), "linear");
            gguf_set_f32(w, KEY("rope.scaling.factor"), c->rope_factor);
        }
    }
#undef KEY
    int rc = put_tokenizer(w, tok, tokenizer_dir, c->vocab_size, err);
    if (rc == PR_OK) {
        exporter x = {m, w, type, err, 0};
        if (c->family == PR_FAMILY_GPT2)
            gpt2_tensors(&x);
        else
            llama_tensors(&x);
        rc = x.failed ? (int)err->code : gguf_writer_save(w, path, err);
    }
    gguf_writer_free(w);
    return rc;
}
