/* peftref: the added tokens, the decode table and tokenizer_config.json of
 * a Hugging Face tokenizer (hf_load.c loads the rest of tokenizer.json). */
#include "config.h"
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <jansson.h>
#include "peftref/tokenizer.h"
#include "fileio.h"
#include "tokenizer_internal.h"
#include "hf_internal.h"
#include "hf_load_internal.h"

/* ---- added tokens ------------------------------------------------------ */

static int trie_add(tok_trie *tr, const unsigned char *s, size_t n, int32_t token)
{
    int32_t node = tr->root[s[0]];
    if (node < 0) {
        if (tok_grow((void **)&tr->nodes, &tr->cap, tr->n_nodes + 1, sizeof *tr->nodes))
            return -1;
        node = (int32_t)tr->n_nodes++;
        tr->nodes[node] = (trie_node){-1, -1, -1, s[0]};
        tr->root[s[0]] = node;
    }
    for (size_t i = 1; i < n; i++) {
        int32_t c = tr->nodes[node].child, last = -1;
        while (c >= 0 && tr->nodes[c].byte != s[i]) {
            last = c;
            c = tr->nodes[c].sibling;
        }
        if (c < 0) {
            if (tr->n_nodes >= INT32_MAX - 1 ||
                tok_grow((void **)&tr->nodes, &tr->cap, tr->n_nodes + 1, sizeof *tr->nodes))
                return -1;
            c = (int32_t)tr->n_nodes++;
            tr->nodes[c] = (trie_node){-1, -1, -1, s[i]};
            if (last < 0)
                tr->nodes[node].child = c;
            else
                tr->nodes[last].sibling = c;
        }
        node = c;
    }
    if (tr->nodes[node].token < 0) /* the first of two equal contents wins */
        tr->nodes[node].token = token;
    tr->n_tokens++;
    return 0;
}

int hfl_load_added(ld *L, const json_t *list, long *max_id)
{
    if (!list || json_is_null(list))
        return PR_OK;
    if (!json_is_array(list))
        return FAIL(L, PR_ERR_FORMAT, "%s: added_tokens must be an array", L->path);
    size_t n = json_array_size(list), total = 0;
    if (n > ADDED_MAX)
        return FAIL(L, PR_ERR_UNSUPPORTED, "%s: added_tokens: more than %d", L->path, ADDED_MAX);
    tok_hf *h = L->h;
    for (size_t i = 0; i < n; i++) {
        json_t *c = json_object_get(json_array_get(list, i), "content");
        if (json_is_string(c))
            total += json_string_length(c);
    }
    h->added = calloc(n ? n : 1, sizeof *h->added);
    h->added_text = malloc(total + 1);
    if (!h->added || !h->added_text)
        return FAIL(L, PR_ERR_NOMEM, "%s: out of memory", L->path);
    size_t pos = 0;
    for (size_t i = 0; i < n; i++) {
        json_t *o = json_array_get(list, i), *id = json_object_get(o, "id"), *c = json_object_get(o, "content");
        char w[64];
        snprintf(w, sizeof w, "added_tokens[%zu]", i);
        if (!json_is_object(o))
            return FAIL(L, PR_ERR_FORMAT, "%s: %s must be an object, not %s", L->path, w, hfl_type_name(o));
        if (!json_is_integer(id) || json_integer_value(id) < 0 || json_integer_value(id) >= VOCAB_MAX_ID)
            return FAIL(L, PR_ERR_FORMAT, "%s: %s.id must be an integer in [0, %d)", L->path, w, VOCAB_MAX_ID);
        if (!json_is_string(c) || json_string_length(c) == 0 || json_string_length(c) > 4096)
            return FAIL(L, PR_ERR_FORMAT, "%s: %s.content must be a string of 1 to 4096 bytes", L->path, w);
        tok_added *a = &h->added[h->n_added];
        int sw, special, lstrip, rstrip, normalized;
        int rc;
        if ((rc = hfl_get_bool(L, o, w, "special", 0, &special)) != PR_OK ||
            (rc = hfl_get_bool(L, o, w, "single_word", 0, &sw)) != PR_OK ||
            (rc = hfl_get_bool(L, o, w, "lstrip", 0, &lstrip)) != PR_OK ||
            (rc = hfl_get_bool(L, o, w, "rstrip", 0, &rstrip)) != PR_OK ||
            (rc = hfl_get_bool(L, o, w, "normalized", !special, &normalized)) != PR_OK)
            return rc;
        if (sw)
            return FAIL(L, PR_ERR_UNSUPPORTED, "%s: %s.single_word true is not supported", L->path, w);
        a->special = (unsigned char)special;
        a->lstrip = (unsigned char)lstrip;
        a->rstrip = (unsigned char)rstrip;
        a->normalized = (unsigned char)normalized;
        a->id = (int32_t)json_integer_value(id);
        a->off = pos;
        a->len = (uint32_t)json_string_length(c);
        memcpy(h->added_text + pos, json_string_value(c), a->len);
        pos += a->len;
        if (a->id > *max_id)
            *max_id = a->id;
        tok_trie *tr = normalized ? &h->norm : &h->raw;
        if (trie_add(tr, (const unsigned char *)json_string_value(c), a->len, (int32_t)h->n_added))
            return FAIL(L, PR_ERR_NOMEM, "%s: out of memory", L->path);
        h->n_added++;
    }
    return PR_OK;
}

/* ---- decode table ------------------------------------------------------ */

/* Bytes of token text tok[0..n) as the decoder makes them, into b. */
static int decode_bytes(ld *L, const decoder_conf *d, const char *tok, size_t n, tok_buf *b, tok_buf *tmp)
{
    if (d->seen & DEC_BYTELEVEL) {
        int in;
        return hfl_token_key(L, tok, n, b, &in);
    }
    if (tok_grow((void **)&b->p, &b->cap, n + 1, 1))
        return -1;
    memcpy(b->p, tok, n);
    b->n = n;
    for (int r = 0; r < d->n_rep; r++) { /* Replace: left to right, no overlaps */
        const char *from = d->rep_from[r], *to = d->rep_to[r];
        size_t fl = strlen(from), tl = strlen(to);
        tmp->n = 0;
        for (size_t i = 0; i < b->n;) {
            int hit = i + fl <= b->n && memcmp(b->p + i, from, fl) == 0;
            size_t add = hit ? tl : 1;
            if (tok_grow((void **)&tmp->p, &tmp->cap, tmp->n + add + 1, 1))
                return -1;
            memcpy(tmp->p + tmp->n, hit ? (const unsigned char *)to : b->p + i, add);
            tmp->n += add;
            i += hit ? fl : 1;
        }
        tok_buf sw = *b;
        *b = *tmp;
        *tmp = sw;
    }
    if ((d->seen & DEC_BYTEFALLBACK) && b->n == 6 && memcmp(b->p, "<0x", 3) == 0 && b->p[5] == '>') {
        unsigned v = 0;
        int ok = 1;
        for (int k = 3; k < 5; k++) {
            unsigned char c = b->p[k];
            unsigned x = c >= '0' && c <= '9' ? c - '0' : (c | 0x20) >= 'a' && (c | 0x20) <= 'f' ? (c | 0x20) - 'a' + 10 : 16;
            ok &= x < 16;
            v = v << 4 | (x & 15);
        }
        if (ok) {
            b->p[0] = (unsigned char)v;
            b->n = 1;
        }
    }
    return 0;
}

int hfl_build_decode(ld *L, const json_t *vocab, const decoder_conf *d)
{
    pr_tokenizer *t = L->t;
    tok_hf *h = L->h;
    size_t V = (size_t)t->vocab_size;
    /* each id's text: from the added tokens, else from the vocabulary */
    const char **text = calloc(V, sizeof *text);
    size_t *tlen = calloc(V, sizeof *tlen);
    tok_buf b = {0}, tmp = {0};
    int rc = PR_OK;
    t->dec_off = malloc(V * sizeof *t->dec_off);
    t->dec_len = malloc(V * sizeof *t->dec_len);
    t->sym_id = malloc(V * sizeof *t->sym_id);
    if (!text || !tlen || !t->dec_off || !t->dec_len || !t->sym_id)
        goto nomem;
    const char *key;
    json_t *val;
    json_object_foreach((json_t *)vocab, key, val) {
        size_t id = (size_t)json_integer_value(val);
        if (text[id]) {
            rc = FAIL(L, PR_ERR_FORMAT, "%s: model.vocab: id %zu is given to two tokens (one is \"%.80s\")", L->path, id,
                      key);
            goto done;
        }
        text[id] = key;
        tlen[id] = strlen(key);
    }
    for (size_t i = 0; i < h->n_added; i++) {
        text[h->added[i].id] = h->added_text + h->added[i].off;
        tlen[h->added[i].id] = h->added[i].len;
    }
    size_t total = 0, cap = 0;
    for (size_t id = 0; id < V; id++) {
        t->sym_id[id] = (int32_t)id;
        t->dec_len[id] = UINT32_MAX;
        if (!text[id])
            continue;
        if (decode_bytes(L, d, text[id], tlen[id], &b, &tmp) ||
            tok_grow((void **)&t->dec_bytes, &cap, total + b.n + 1, 1))
            goto nomem;
        memcpy(t->dec_bytes + total, b.p, b.n);
        t->dec_off[id] = total;
        t->dec_len[id] = (uint32_t)b.n;
        total += b.n;
    }
    if (!t->dec_bytes && !(t->dec_bytes = malloc(1)))
        goto nomem;
    goto done;
nomem:
    rc = FAIL(L, PR_ERR_NOMEM, "%s: out of memory", L->path);
done:
    free(text);
    free(tlen);
    free(b.p);
    free(tmp.p);
    return rc;
}

/* ---- tokenizer_config.json --------------------------------------------- */

/* Id of an added token's or vocabulary token's text, or -1. */
static int token_id_of(const tok_hf *h, const char *s)
{
    size_t n = strlen(s);
    for (size_t i = 0; i < h->n_added; i++)
        if (h->added[i].len == n && memcmp(h->added_text + h->added[i].off, s, n) == 0)
            return h->added[i].id;
    return hfl_vocab_id(h, (const unsigned char *)s, n);
}

/* bos_token / eos_token of the config: a string, {"content": s}, or null. */
static int config_token(ld *L, const char *cfg, const json_t *root, const char *key, int *id)
{
    json_t *v = json_object_get(root, key);
    *id = -1;
    if (!v || json_is_null(v))
        return PR_OK;
    if (json_is_object(v))
        v = json_object_get(v, "content");
    if (!json_is_string(v))
        return FAIL(L, PR_ERR_FORMAT, "%s: %s must be a string, {\"content\": string} or null", cfg, key);
    *id = token_id_of(L->h, json_string_value(v));
    if (*id < 0)
        return FAIL(L, PR_ERR_FORMAT, "%s: %s \"%.80s\" is neither an added token nor in the vocabulary of %s", cfg, key,
                    json_string_value(v), L->path);
    return PR_OK;
}

/* 1 when post_processor is (or holds) a TemplateProcessing whose "single"
 * starts with the special token whose first id is bos. */
static int template_adds_bos(const json_t *pp, int bos)
{
    const char *type = json_string_value(json_object_get(pp, "type"));
    if (!type || bos < 0)
        return 0;
    if (strcmp(type, "Sequence") == 0) {
        json_t *list = json_object_get(pp, "processors");
        for (size_t i = 0; i < json_array_size(list); i++)
            if (template_adds_bos(json_array_get(list, i), bos))
                return 1;
        return 0;
    }
    if (strcmp(type, "TemplateProcessing") != 0)
        return 0;
    json_t *first = json_array_get(json_object_get(pp, "single"), 0);
    json_t *name = json_object_get(json_object_get(first, "SpecialToken"), "id");
    if (!json_is_string(name))
        return 0;
    json_t *spec = json_object_get(json_object_get(pp, "special_tokens"), json_string_value(name));
    json_t *id0 = json_array_get(json_object_get(spec, "ids"), 0);
    return json_is_integer(id0) && json_integer_value(id0) == bos;
}

int hfl_load_config(ld *L, const char *cfg, const json_t *post_processor)
{
    L->t->bos = L->t->eot = -1;
    L->t->add_bos = 0;
    if (!cfg)
        return PR_OK;
    json_error_t jerr;
    json_t *root = json_load_file(cfg, JSON_DECODE_INT_AS_REAL, &jerr); /* model_max_length may be 1e30 */
    if (!root)
        return FAIL(L, PR_ERR_FORMAT, "%s:%d: bad JSON: %s", cfg, jerr.line, jerr.text);
    int rc = PR_OK;
    if (!json_is_object(root)) {
        rc = FAIL(L, PR_ERR_FORMAT, "%s: expected a JSON object", cfg);
        goto done;
    }
    if ((rc = config_token(L, cfg, root, "bos_token", &L->t->bos)) != PR_OK ||
        (rc = config_token(L, cfg, root, "eos_token", &L->t->eot)) != PR_OK)
        goto done;
    json_t *ab = json_object_get(root, "add_bos_token");
    if (ab && !json_is_null(ab) && !json_is_boolean(ab)) {
        rc = FAIL(L, PR_ERR_FORMAT, "%s: add_bos_token must be a boolean", cfg);
        goto done;
    }
    if (json_is_boolean(ab))
        L->t->add_bos = json_is_true(ab) && L->t->bos >= 0;
    else
        L->t->add_bos = template_adds_bos(post_processor, L->t->bos);
done:
    json_decref(root);
    return rc;
}

