/* peftref: tokenizers -- the front: which tokenizer a model directory
 * declares, the byte tokenizer, and encode/decode for both kinds.  GPT-2
 * BPE itself is in bpe.c, its pre-token splitter in pretokenize.c.
 *
 * Which tokenizer a model directory declares (pr_tokenizer_load):
 *  1. config.json with "peftref_tokenizer": "byte"  -> byte tokenizer;
 *     "peftref_tokenizer": "gpt2-bpe" requires vocab.json and merges.txt,
 *     "hf-bpe" requires tokenizer.json.
 *  2. otherwise tokenizer.json present -> Hugging Face tokenizers' format
 *     (hf_load.c), with tokenizer_config.json when present;
 *  3. otherwise vocab.json and merges.txt both present -> GPT-2 BPE;
 *  4. otherwise neither present                        -> byte tokenizer;
 *     only one of them present is an error naming the missing file.
 * A missing config.json is fine; an unreadable one is an error.
 *
 * A loaded tokenizer is read-only: encode keeps its scratch space and word
 * cache per call, so several threads may share one tokenizer. */
#include "config.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <jansson.h>

#include "peftref/tokenizer.h"
#include "fileio.h"
#include "tokenizer_internal.h"

void pr_tokenizer_free(pr_tokenizer *tok)
{
    if (!tok)
        return;
    free(tok->dec_off);
    free(tok->dec_len);
    free(tok->dec_bytes);
    tok_strmap_free(&tok->syms);
    free(tok->sym_id);
    free(tok->merges.slots);
    tok_hf_free(tok->hf);
    free(tok);
}

int pr_tokenizer_byte(pr_tokenizer **out, pr_error *err)
{
    pr_tokenizer *t = calloc(1, sizeof *t);
    if (!t)
        return pr_errorf(err, PR_ERR_NOMEM, "byte tokenizer: out of memory");
    t->kind = TOK_BYTE;
    t->vocab_size = 256;
    t->eot = -1;
    t->bos = -1;
    *out = t;
    return PR_OK;
}

int pr_tokenizer_vocab_size(const pr_tokenizer *tok)
{
    return tok->vocab_size;
}

int pr_tokenizer_eot(const pr_tokenizer *tok)
{
    return tok->eot;
}

int pr_tokenizer_bos(const pr_tokenizer *tok)
{
    return tok->kind == TOK_HF ? tok->bos : -1;
}

int pr_tokenizer_add_bos(const pr_tokenizer *tok)
{
    return tok->kind == TOK_HF ? tok->add_bos : 0;
}

const char *pr_tokenizer_kind(const pr_tokenizer *tok)
{
    return tok->kind == TOK_HF ? "hf-bpe" : tok->kind == TOK_BPE ? "gpt2-bpe" : "byte";
}

/* ---- loading ----------------------------------------------------------- */

int tok_file_exists(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0 && !S_ISDIR(st.st_mode);
}

/* "peftref_tokenizer" of dir/config.json, or NULL (copied into out). */
static int config_tokenizer_kind(const char *path, char *out, size_t out_n, pr_error *err)
{
    out[0] = '\0';
    if (!tok_file_exists(path))
        return PR_OK;
    json_error_t jerr;
    json_t *root = json_load_file(path, 0, &jerr);
    if (!root)
        return pr_errorf(err, PR_ERR_FORMAT, "%s:%d: bad JSON: %s", path, jerr.line, jerr.text);
    int rc = PR_OK;
    json_t *v = json_is_object(root) ? json_object_get(root, "peftref_tokenizer") : NULL;
    if (!json_is_object(root))
        rc = pr_errorf(err, PR_ERR_FORMAT, "%s: expected a JSON object", path);
    else if (v && !json_is_string(v))
        rc = pr_errorf(err, PR_ERR_FORMAT, "%s: \"peftref_tokenizer\" must be a string", path);
    else if (v)
        snprintf(out, out_n, "%s", json_string_value(v));
    json_decref(root);
    return rc;
}

int pr_tokenizer_load(const char *model_dir, pr_tokenizer **out, pr_error *err)
{
    struct stat st;
    if (stat(model_dir, &st) != 0 || !S_ISDIR(st.st_mode))
        return pr_errorf(err, PR_ERR_NOTFOUND, "%s: not a directory", model_dir);
    char *cfg = fileio_join(model_dir, "config.json");
    char *vocab = fileio_join(model_dir, "vocab.json");
    char *merges = fileio_join(model_dir, "merges.txt");
    char *hf = fileio_join(model_dir, "tokenizer.json");
    char *hf_cfg = fileio_join(model_dir, "tokenizer_config.json");
    int rc;
    char kind[64];
    if (!cfg || !vocab || !merges || !hf || !hf_cfg) {
        rc = pr_errorf(err, PR_ERR_NOMEM, "%s: out of memory", model_dir);
        goto done;
    }
    rc = config_tokenizer_kind(cfg, kind, sizeof kind, err);
    if (rc != PR_OK)
        goto done;
    if (kind[0] && strcmp(kind, "byte") != 0 && strcmp(kind, "gpt2-bpe") != 0 && strcmp(kind, "hf-bpe") != 0) {
        rc = pr_errorf(err, PR_ERR_INVALID, "%s: unknown \"peftref_tokenizer\" \"%s\" (known: byte, gpt2-bpe, hf-bpe)",
                       cfg, kind);
        goto done;
    }
    if (strcmp(kind, "byte") == 0) {
        rc = pr_tokenizer_byte(out, err);
        goto done;
    }
    if (strcmp(kind, "gpt2-bpe") != 0 && (tok_file_exists(hf) || strcmp(kind, "hf-bpe") == 0)) {
        if (!tok_file_exists(hf))
            rc = pr_errorf(err, PR_ERR_NOTFOUND, "%s: missing (config.json asks for \"hf-bpe\")", hf);
        else
            rc = tok_hf_load(hf, tok_file_exists(hf_cfg) ? hf_cfg : NULL, out, err);
        goto done;
    }
    int hv = tok_file_exists(vocab), hm = tok_file_exists(merges);
    if (hv && hm)
        rc = pr_tokenizer_load_bpe(vocab, merges, out, err);
    else if (!hv && !hm && !kind[0])
        rc = pr_tokenizer_byte(out, err);
    else
        rc = pr_errorf(err, PR_ERR_NOTFOUND, "%s: missing (a GPT-2 BPE tokenizer needs vocab.json and merges.txt)",
                       hv ? merges : vocab);
done:
    free(cfg);
    free(vocab);
    free(merges);
    free(hf);
    free(hf_cfg);
    return rc;
}


/* ---- encode / decode --------------------------------------------------- */

int pr_tokenizer_encode(const pr_tokenizer *tok, const char *text, size_t len, int **ids, size_t *n_ids, pr_error *err)
{
    const unsigned char *s = (const unsigned char *)text;
    if (tok->kind == TOK_BYTE) {
        int *out = malloc((len ? len : 1) * sizeof *out);
        if (!out)
            return pr_errorf(err, PR_ERR_NOMEM, "encode: out of memory for %zu tokens", len);
        for (size_t i = 0; i < len; i++)
            out[i] = s[i];
        *ids = out;
        *n_ids = len;
        return PR_OK;
    }
    enc_ws w;
    memset(&w, 0, sizeof w);
    if (tok_grow((void **)&w.ids, &w.ids_cap, len / 3 + 16, sizeof *w.ids))
        return pr_errorf(err, PR_ERR_NOMEM, "encode: out of memory");
    int fail = 0;
    if (tok->kind == TOK_HF) {
        fail = tok_hf_encode(tok, &w, s, len);
    } else {
        for (size_t i = 0; !fail && i < len;) {
            size_t e = tok_pretok_next(s, len, i);
            fail = tok_encode_word(tok, &w, s + i, e - i);
            i = e;
        }
    }
    if (fail) {
        tok_enc_ws_free(&w);
        free(w.ids);
        return pr_errorf(err, PR_ERR_NOMEM, "encode: out of memory (%zu bytes of text)", len);
    }
    tok_enc_ws_free(&w);
    *ids = w.ids;
    *n_ids = w.n_ids;
    return PR_OK;
}

int pr_tokenizer_decode(const pr_tokenizer *tok, const int *ids, size_t n, char **text, size_t *len, pr_error *err)
{
    size_t total = 0;
    for (size_t i = 0; i < n; i++) {
        int id = ids[i];
        if (id < 0 || id >= tok->vocab_size || (tok->kind != TOK_BYTE && tok->dec_len[id] == UINT32_MAX))
            return pr_errorf(err, PR_ERR_INVALID, "decode: id %d at position %zu is not in the %s vocabulary (size %d)",
                             id, i, pr_tokenizer_kind(tok), tok->vocab_size);
        total += tok->kind != TOK_BYTE ? tok->dec_len[id] : 1;
    }
    char *out = malloc(total + 1);
    if (!out)
        return pr_errorf(err, PR_ERR_NOMEM, "decode: out of memory for %zu bytes", total);
    size_t pos = 0;
    for (size_t i = 0; i < n; i++) {
        if (tok->kind == TOK_BYTE) {
            out[pos++] = (char)(unsigned char)ids[i];
        } else {
            memcpy(out + pos, tok->dec_bytes + tok->dec_off[ids[i]], tok->dec_len[ids[i]]);
            pos += tok->dec_len[ids[i]];
        }
    }
    if (tok->kind == TOK_HF) { /* the decoder's Strip */
        size_t head, tail;
        tok_hf_strip(tok, out, pos, &head, &tail);
        memmove(out, out + head, pos - head - tail);
        pos -= head + tail;
    }
    out[pos] = '\0';
    *text = out;
    *len = pos;
    return PR_OK;
}
