/* peftref: loading Hugging Face tokenizer.json (the `tokenizers` library's
 * format) and tokenizer_config.json.  What is supported is listed in
 * docs/tokenizer.md; anything else is refused with the file and the JSON
 * path of the part (e.g. "model.type 'Unigram' is not supported").
 *
 * The model is BPE over vocabulary ids: symbol i is id i (sym_id is the
 * identity), merges map (id, id) -> (rank, id).  With a ByteLevel
 * pre-tokenizer the vocabulary is spelled in GPT-2's byte alphabet and is
 * held as raw bytes, as for GPT-2 (bpe.c); otherwise tokens are UTF-8 text
 * (SentencePiece's "▁" for a space) and BPE starts from characters. */
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







void tok_hf_free(tok_hf *h)
{
    if (!h)
        return;
    free(h->added);
    free(h->added_text);
    free(h->raw.nodes);
    free(h->norm.nodes);
    for (int i = 0; i < h->n_norm; i++) {
        free(h->norms[i].a);
        free(h->norms[i].b);
    }
    tok_strmap_free(&h->vocab);
    free(h);
}

/* ---- small JSON helpers ------------------------------------------------ */

const char *hfl_type_name(const json_t *v)
{
    switch (json_typeof(v)) {
    case JSON_OBJECT: return "an object";
    case JSON_ARRAY: return "an array";
    case JSON_STRING: return "a string";
    case JSON_INTEGER: return "an integer";
    case JSON_REAL: return "a number";
    case JSON_TRUE:
    case JSON_FALSE: return "a boolean";
    default: return "null";
    }
}

/* Boolean member key of o (absent or null: def). */
int hfl_get_bool(ld *L, const json_t *o, const char *where, const char *key, int def, int *out)
{
    json_t *v = json_object_get(o, key);
    if (!v || json_is_null(v)) {
        *out = def;
        return PR_OK;
    }
    if (!json_is_boolean(v))
        return FAIL(L, PR_ERR_FORMAT, "%s: %s.%s must be a boolean, not %s", L->path, where, key, hfl_type_name(v));
    *out = json_is_true(v);
    return PR_OK;
}

/* String member key of o, or NULL when absent or null (*out). */
static int get_str(ld *L, const json_t *o, const char *where, const char *key, const char **out)
{
    json_t *v = json_object_get(o, key);
    *out = NULL;
    if (!v || json_is_null(v))
        return PR_OK;
    if (!json_is_string(v))
        return FAIL(L, PR_ERR_FORMAT, "%s: %s.%s must be a string, not %s", L->path, where, key, hfl_type_name(v));
    *out = json_string_value(v);
    return PR_OK;
}

static int get_type(ld *L, const json_t *o, const char *where, const char **out)
{
    if (!json_is_object(o))
        return FAIL(L, PR_ERR_FORMAT, "%s: %s must be an object, not %s", L->path, where, hfl_type_name(o));
    int rc = get_str(L, o, where, "type", out);
    if (rc == PR_OK && !*out)
        rc = FAIL(L, PR_ERR_FORMAT, "%s: %s.type is missing", L->path, where);
    return rc;
}

/* {"String": s} pattern member; refuses {"Regex": ...}. */
static int get_string_pattern(ld *L, const json_t *o, const char *where, const char **out)
{
    json_t *p = json_object_get(o, "pattern");
    json_t *s = json_is_object(p) ? json_object_get(p, "String") : NULL;
    if (json_is_object(p) && json_object_get(p, "Regex"))
        return FAIL(L, PR_ERR_UNSUPPORTED, "%s: %s.pattern: a Regex pattern is not supported here (String only)",
                    L->path, where);
    if (!json_is_string(s))
        return FAIL(L, PR_ERR_FORMAT, "%s: %s.pattern must be {\"String\": ...}", L->path, where);
    *out = json_string_value(s);
    return PR_OK;
}

static char *dup_bytes(const char *s, size_t n)
{
    char *p = malloc(n + 1);
    if (p) {
        memcpy(p, s, n);
        p[n] = '\0';
    }
    return p;
}

/* ---- normalizer -------------------------------------------------------- */

static int add_norm(ld *L, const char *where, int kind, const char *a, const char *b)
{
    tok_hf *h = L->h;
    if (h->n_norm == HF_MAX_STEPS)
        return FAIL(L, PR_ERR_UNSUPPORTED, "%s: %s: more than %d normalizers", L->path, where, HF_MAX_STEPS);
    tok_norm *nm = &h->norms[h->n_norm++];
    memset(nm, 0, sizeof *nm);
    nm->kind = kind;
    if (a && !(nm->a = dup_bytes(a, nm->an = strlen(a))))
        return FAIL(L, PR_ERR_NOMEM, "%s: out of memory", L->path);
    if (b && !(nm->b = dup_bytes(b, nm->bn = strlen(b))))
        return FAIL(L, PR_ERR_NOMEM, "%s: out of memory", L->path);
    return PR_OK;
}

static int load_normalizer(ld *L, const json_t *o, const char *where, int depth)
{
    const char *type, *s, *c;
    int rc = get_type(L, o, where, &type);
    if (rc != PR_OK)
        return rc;
    if (strcmp(type, "Sequence") == 0) {
        json_t *list = json_object_get(o, "normalizers");
        if (!json_is_array(list))
            return FAIL(L, PR_ERR_FORMAT, "%s: %s.normalizers must be an array", L->path, where);
        if (depth > 4)
            return FAIL(L, PR_ERR_UNSUPPORTED, "%s: %s: Sequence nested too deeply", L->path, where);
        for (size_t i = 0; i < json_array_size(list); i++) {
            char w[256];
            snprintf(w, sizeof w, "%s.normalizers[%zu]", where, i);
            if ((rc = load_normalizer(L, json_array_get(list, i), w, depth + 1)) != PR_OK)
                return rc;
        }
        return PR_OK;
    }
    if (strcmp(type, "NFC") == 0)
        return add_norm(L, where, NORM_NFC, NULL, NULL);
    if (strcmp(type, "Prepend") == 0) {
        if ((rc = get_str(L, o, where, "prepend", &s)) != PR_OK)
            return rc;
        if (!s)
            return FAIL(L, PR_ERR_FORMAT, "%s: %s.prepend is missing", L->path, where);
        return add_norm(L, where, NORM_PREPEND, s, NULL);
    }
    if (strcmp(type, "Replace") == 0) {
        if ((rc = get_string_pattern(L, o, where, &s)) != PR_OK || (rc = get_str(L, o, where, "content", &c)) != PR_OK)
            return rc;
        if (!c)
            return FAIL(L, PR_ERR_FORMAT, "%s: %s.content is missing", L->path, where);
        if (!*s)
            return FAIL(L, PR_ERR_UNSUPPORTED, "%s: %s.pattern: an empty String is not supported", L->path, where);
        return add_norm(L, where, NORM_REPLACE, s, c);
    }
    return FAIL(L, PR_ERR_UNSUPPORTED,
                "%s: %s.type '%s' is not supported (supported: NFC, Prepend, Replace with a String pattern, Sequence)",
                L->path, where, type);
}

/* ---- pre-tokenizer ----------------------------------------------------- */

static int add_pre(ld *L, const char *where, tok_pre **out)
{
    tok_hf *h = L->h;
    if (h->n_pre == HF_MAX_STEPS)
        return FAIL(L, PR_ERR_UNSUPPORTED, "%s: %s: more than %d pre-tokenizers", L->path, where, HF_MAX_STEPS);
    *out = &h->pre[h->n_pre++];
    memset(*out, 0, sizeof **out);
    return PR_OK;
}

static int load_pre(ld *L, const json_t *o, const char *where, int depth)
{
    const char *type, *s;
    tok_pre *p = NULL;
    int rc = get_type(L, o, where, &type);
    if (rc != PR_OK)
        return rc;
    if (strcmp(type, "Sequence") == 0) {
        json_t *list = json_object_get(o, "pretokenizers");
        if (!json_is_array(list))
            return FAIL(L, PR_ERR_FORMAT, "%s: %s.pretokenizers must be an array", L->path, where);
        if (depth > 4)
            return FAIL(L, PR_ERR_UNSUPPORTED, "%s: %s: Sequence nested too deeply", L->path, where);
        for (size_t i = 0; i < json_array_size(list); i++) {
            char w[256];
            snprintf(w, sizeof w, "%s.pretokenizers[%zu]", where, i);
            if ((rc = load_pre(L, json_array_get(list, i), w, depth + 1)) != PR_OK)
                return rc;
        }
        return PR_OK;
    }
    if (strcmp(type, "ByteLevel") == 0) {
        if ((rc = add_pre(L, where, &p)) != PR_OK)
            return rc;
        p->kind = PRE_BYTELEVEL;
        L->h->byte_level = 1;
        if ((rc = hfl_get_bool(L, o, where, "add_prefix_space", 1, &p->add_prefix_space)) != PR_OK ||
            (rc = hfl_get_bool(L, o, where, "use_regex", 1, &p->use_regex)) != PR_OK)
            return rc;
        p->regex = TOK_RE_GPT2;
        return PR_OK;
    }
    if (strcmp(type, "Split") == 0) {
        json_t *pat = json_object_get(o, "pattern");
        json_t *re = json_is_object(pat) ? json_object_get(pat, "Regex") : NULL;
        int invert;
        if ((rc = get_str(L, o, where, "behavior", &s)) != PR_OK || (rc = hfl_get_bool(L, o, where, "invert", 0, &invert)) != PR_OK)
            return rc;
        if (!json_is_string(re))
            return FAIL(L, PR_ERR_UNSUPPORTED, "%s: %s.pattern: only {\"Regex\": ...} patterns are supported", L->path, where);
        int id = tok_hf_regex_id(json_string_value(re));
        if (id < 0)
            return FAIL(L, PR_ERR_UNSUPPORTED,
                        "%s: %s.pattern.Regex \"%.200s\" is not supported (known: the GPT-2, Llama 3 and Qwen2 patterns)",
                        L->path, where, json_string_value(re));
        if (!s || strcmp(s, "Isolated") != 0)
            return FAIL(L, PR_ERR_UNSUPPORTED, "%s: %s.behavior '%s' is not supported (Isolated only)", L->path, where,
                        s ? s : "(missing)");
        if (invert)
            return FAIL(L, PR_ERR_UNSUPPORTED, "%s: %s.invert true is not supported", L->path, where);
        if ((rc = add_pre(L, where, &p)) != PR_OK)
            return rc;
        p->kind = PRE_SPLIT;
        p->regex = id;
        return PR_OK;
    }
    if (strcmp(type, "Metaspace") == 0) {
        const char *rep, *scheme;
        if ((rc = add_pre(L, where, &p)) != PR_OK || (rc = get_str(L, o, where, "replacement", &rep)) != PR_OK ||
            (rc = get_str(L, o, where, "prepend_scheme", &scheme)) != PR_OK ||
            (rc = hfl_get_bool(L, o, where, "split", 1, &p->split)) != PR_OK)
            return rc;
        p->kind = PRE_METASPACE;
        if (!rep)
            rep = "\xe2\x96\x81";
        uint32_t cp;
        size_t rl = strlen(rep);
        if (rl == 0 || rl > 4 || tok_utf8_decode((const unsigned char *)rep, rl, &cp) != rl)
            return FAIL(L, PR_ERR_FORMAT, "%s: %s.replacement must be one character", L->path, where);
        memcpy(p->rep, rep, rl);
        p->rep_n = rl;
        if (!scheme || strcmp(scheme, "always") == 0)
            p->scheme = PREPEND_ALWAYS;
        else if (strcmp(scheme, "first") == 0)
            p->scheme = PREPEND_FIRST;
        else if (strcmp(scheme, "never") == 0)
            p->scheme = PREPEND_NEVER;
        else
            return FAIL(L, PR_ERR_FORMAT, "%s: %s.prepend_scheme '%s' is not one of always, first, never", L->path, where,
                        scheme);
        return PR_OK;
    }
    return FAIL(L, PR_ERR_UNSUPPORTED,
                "%s: %s.type '%s' is not supported (supported: ByteLevel, Split, Metaspace, Sequence)", L->path, where,
                type);
}

/* ---- decoder ----------------------------------------------------------- */



/* One decoder; order is the pipeline's Replace*, ByteFallback, Fuse, Strip. */
static int load_decoder_one(ld *L, const json_t *o, const char *where, decoder_conf *d)
{
    const char *type, *s;
    int rc = get_type(L, o, where, &type);
    if (rc != PR_OK)
        return rc;
    int bit = strcmp(type, "ByteLevel") == 0      ? DEC_BYTELEVEL
              : strcmp(type, "Replace") == 0      ? DEC_REPLACE
              : strcmp(type, "ByteFallback") == 0 ? DEC_BYTEFALLBACK
              : strcmp(type, "Fuse") == 0         ? DEC_FUSE
              : strcmp(type, "Strip") == 0        ? DEC_STRIP
                                                  : 0;
    if (!bit)
        return FAIL(L, PR_ERR_UNSUPPORTED,
                    "%s: %s.type '%s' is not supported (supported: ByteLevel, or a Sequence of Replace, ByteFallback, "
                    "Fuse and Strip)", L->path, where, type);
    if (d->seen & ~(bit | (bit - 1)) || (bit != DEC_REPLACE && (d->seen & bit)))
        return FAIL(L, PR_ERR_UNSUPPORTED, "%s: %s: decoder '%s' out of the supported order (Replace, ByteFallback, "
                    "Fuse, Strip)", L->path, where, type);
    if (bit == DEC_BYTELEVEL && d->seen)
        return FAIL(L, PR_ERR_UNSUPPORTED, "%s: %s: ByteLevel must be the only decoder", L->path, where);
    d->seen |= bit;
    if (bit == DEC_REPLACE) {
        const char *c;
        if ((rc = get_string_pattern(L, o, where, &s)) != PR_OK || (rc = get_str(L, o, where, "content", &c)) != PR_OK)
            return rc;
        if (!c || !*s)
            return FAIL(L, PR_ERR_FORMAT, "%s: %s: Replace needs a non-empty pattern and a content", L->path, where);
        if (d->n_rep == HF_MAX_STEPS)
            return FAIL(L, PR_ERR_UNSUPPORTED, "%s: %s: too many Replace decoders", L->path, where);
        d->rep_from[d->n_rep] = s;
        d->rep_to[d->n_rep++] = c;
    } else if (bit == DEC_STRIP) {
        json_t *st = json_object_get(o, "start"), *sp = json_object_get(o, "stop");
        if ((rc = get_str(L, o, where, "content", &s)) != PR_OK)
            return rc;
        if (!s || strcmp(s, " ") != 0)
            return FAIL(L, PR_ERR_UNSUPPORTED, "%s: %s.content: only Strip of \" \" is supported", L->path, where);
        if (!json_is_integer(st) || !json_is_integer(sp) || json_integer_value(st) < 0 || json_integer_value(sp) < 0 ||
            json_integer_value(st) > 1000 || json_integer_value(sp) > 1000)
            return FAIL(L, PR_ERR_FORMAT, "%s: %s.start and .stop must be small non-negative integers", L->path, where);
        if (!(d->seen & DEC_FUSE))
            return FAIL(L, PR_ERR_UNSUPPORTED, "%s: %s: Strip is supported after Fuse only", L->path, where);
        L->h->strip_start = (int)json_integer_value(st);
        L->h->strip_stop = (int)json_integer_value(sp);
    }
    return PR_OK;
}

static int load_decoder(ld *L, const json_t *o, decoder_conf *d)
{
    const char *type;
    if (!o || json_is_null(o))
        return FAIL(L, PR_ERR_UNSUPPORTED, "%s: decoder null is not supported (tokens would be joined by spaces)", L->path);
    int rc = get_type(L, o, "decoder", &type);
    if (rc != PR_OK)
        return rc;
    if (strcmp(type, "Sequence") != 0)
        return load_decoder_one(L, o, "decoder", d);
    json_t *list = json_object_get(o, "decoders");
    if (!json_is_array(list))
        return FAIL(L, PR_ERR_FORMAT, "%s: decoder.decoders must be an array", L->path);
    for (size_t i = 0; i < json_array_size(list); i++) {
        char w[64];
        snprintf(w, sizeof w, "decoder.decoders[%zu]", i);
        if ((rc = load_decoder_one(L, json_array_get(list, i), w, d)) != PR_OK)
            return rc;
    }
    return PR_OK;
}

/* ---- model ------------------------------------------------------------- */

/* A token's key bytes (raw bytes for a byte-level vocabulary). */
int hfl_token_key(ld *L, const char *tok, size_t n, tok_buf *b, int *in_alphabet)
{
    if (tok_grow((void **)&b->p, &b->cap, n + 1, 1))
        return -1;
    if (L->h->byte_level) {
        *in_alphabet = tok_token_to_bytes(L->cp_to_byte, tok, n, b->p, &b->n);
    } else {
        memcpy(b->p, tok, n);
        b->n = n;
        *in_alphabet = 1;
    }
    return 0;
}

int32_t hfl_vocab_id(const tok_hf *h, const unsigned char *k, size_t n)
{
    long e = tok_strmap_find(&h->vocab, k, n, tok_hash_bytes(k, n));
    return e < 0 ? -1 : h->vocab.ents[e].val;
}

static int load_vocab(ld *L, const json_t *vocab, long *max_id)
{
    tok_buf b = {0};
    const char *key;
    json_t *val;
    int rc = PR_OK;
    if (!json_is_object(vocab)) {
        rc = FAIL(L, PR_ERR_FORMAT, "%s: model.vocab must be an object mapping tokens to ids", L->path);
        goto done;
    }
    json_object_foreach((json_t *)vocab, key, val) {
        if (!json_is_integer(val) || json_integer_value(val) < 0 || json_integer_value(val) >= VOCAB_MAX_ID) {
            rc = FAIL(L, PR_ERR_FORMAT, "%s: model.vocab[\"%.80s\"]: id must be an integer in [0, %d)", L->path, key,
                      VOCAB_MAX_ID);
            goto done;
        }
        long id = (long)json_integer_value(val);
        if (id > *max_id)
            *max_id = id;
        int in;
        size_t n = strlen(key);
        if (hfl_token_key(L, key, n, &b, &in)) {
            rc = FAIL(L, PR_ERR_NOMEM, "%s: out of memory", L->path);
            goto done;
        }
        if (!in || b.n == 0)
            continue; /* outside the byte alphabet: BPE never makes it */
        uint64_t hh = tok_hash_bytes(b.p, b.n);
        if (tok_strmap_find(&L->h->vocab, b.p, b.n, hh) >= 0) {
            rc = FAIL(L, PR_ERR_FORMAT, "%s: model.vocab: token \"%.80s\" appears twice", L->path, key);
            goto done;
        }
        if (tok_strmap_add(&L->h->vocab, b.p, b.n, hh, (int32_t)id) < 0) {
            rc = FAIL(L, PR_ERR_NOMEM, "%s: out of memory", L->path);
            goto done;
        }
    }
done:
    free(b.p);
    return rc;
}

static int load_merges(ld *L, const json_t *merges)
{
    if (!json_is_array(merges))
        return FAIL(L, PR_ERR_FORMAT, "%s: model.merges must be an array", L->path);
    size_t n = json_array_size(merges);
    if (tok_pairmap_init(&L->t->merges, n))
        return FAIL(L, PR_ERR_NOMEM, "%s: out of memory", L->path);
    tok_buf a = {0}, b = {0}, ab = {0};
    int rc = PR_OK;
    for (size_t i = 0; i < n; i++) {
        json_t *m = json_array_get(merges, i);
        const char *sa, *sb;
        size_t na, nb;
        if (json_is_string(m)) { /* "a b": split at the first space */
            sa = json_string_value(m);
            const char *sp = strchr(sa, ' ');
            if (!sp) {
                rc = FAIL(L, PR_ERR_FORMAT, "%s: model.merges[%zu] \"%.80s\" is not two tokens separated by a space",
                          L->path, i, sa);
                goto done;
            }
            na = (size_t)(sp - sa);
            sb = sp + 1;
            nb = strlen(sb);
        } else if (json_is_array(m) && json_array_size(m) == 2 && json_is_string(json_array_get(m, 0)) &&
                   json_is_string(json_array_get(m, 1))) {
            sa = json_string_value(json_array_get(m, 0));
            sb = json_string_value(json_array_get(m, 1));
            na = strlen(sa);
            nb = strlen(sb);
        } else {
            rc = FAIL(L, PR_ERR_FORMAT, "%s: model.merges[%zu] must be a string \"a b\" or an array [a, b], not %s",
                      L->path, i, hfl_type_name(m));
            goto done;
        }
        int ia, ib;
        if (hfl_token_key(L, sa, na, &a, &ia) || hfl_token_key(L, sb, nb, &b, &ib) ||
            tok_grow((void **)&ab.p, &ab.cap, a.n + b.n + 1, 1)) {
            rc = FAIL(L, PR_ERR_NOMEM, "%s: out of memory", L->path);
            goto done;
        }
        if (!ia || !ib)
            continue; /* outside the byte alphabet: never applies */
        memcpy(ab.p, a.p, a.n);
        memcpy(ab.p + a.n, b.p, b.n);
        int32_t ida = hfl_vocab_id(L->h, a.p, a.n), idb = hfl_vocab_id(L->h, b.p, b.n), idm = hfl_vocab_id(L->h, ab.p, a.n + b.n);
        if (ida < 0 || idb < 0) {
            rc = FAIL(L, PR_ERR_FORMAT, "%s: model.merges[%zu]: token \"%.*s\" is not in model.vocab", L->path, i,
                      ida < 0 ? (int)na : (int)nb, ida < 0 ? sa : sb);
            goto done;
        }
        if (idm < 0) {
            rc = FAIL(L, PR_ERR_FORMAT, "%s: model.merges[%zu]: merged token \"%.*s%.*s\" is not in model.vocab",
                      L->path, i, (int)na, sa, (int)nb, sb);
            goto done;
        }
        tok_pairmap_put(&L->t->merges, tok_pair_key(ida, idb), (int32_t)i, idm);
    }
done:
    free(a.p);
    free(b.p);
    free(ab.p);
    return rc;
}

static int load_model(ld *L, const json_t *m, long *max_id)
{
    const char *type, *s;
    int rc = get_type(L, m, "model", &type);
    if (rc != PR_OK)
        return rc;
    if (strcmp(type, "BPE") != 0)
        return FAIL(L, PR_ERR_UNSUPPORTED, "%s: model.type '%s' is not supported (BPE only)", L->path, type);
    json_t *dropout = json_object_get(m, "dropout");
    if (dropout && !json_is_null(dropout) && !(json_is_number(dropout) && json_number_value(dropout) == 0.0))
        return FAIL(L, PR_ERR_UNSUPPORTED, "%s: model.dropout must be null (BPE dropout is not supported)", L->path);
    static const char *const empty_only[] = {"continuing_subword_prefix", "end_of_word_suffix"};
    for (int i = 0; i < 2; i++) {
        if ((rc = get_str(L, m, "model", empty_only[i], &s)) != PR_OK)
            return rc;
        if (s && *s)
            return FAIL(L, PR_ERR_UNSUPPORTED, "%s: model.%s \"%s\" is not supported (null or \"\" only)", L->path,
                        empty_only[i], s);
    }
    tok_hf *h = L->h;
    if ((rc = hfl_get_bool(L, m, "model", "fuse_unk", 0, &h->fuse_unk)) != PR_OK ||
        (rc = hfl_get_bool(L, m, "model", "byte_fallback", 0, &h->byte_fallback)) != PR_OK ||
        (rc = hfl_get_bool(L, m, "model", "ignore_merges", 0, &h->ignore_merges)) != PR_OK ||
        (rc = get_str(L, m, "model", "unk_token", &s)) != PR_OK)
        return rc;
    if ((rc = load_vocab(L, json_object_get(m, "vocab"), max_id)) != PR_OK)
        return rc;
    h->unk_id = -1;
    if (s) {
        h->unk_id = hfl_vocab_id(h, (const unsigned char *)s, strlen(s));
        if (h->unk_id < 0)
            return FAIL(L, PR_ERR_FORMAT, "%s: model.unk_token \"%s\" is not in model.vocab", L->path, s);
    }
    for (int b = 0; b < 256; b++) {
        char fb[8];
        snprintf(fb, sizeof fb, "<0x%02X>", b);
        h->byte_fb[b] = hfl_vocab_id(h, (const unsigned char *)fb, 6);
        unsigned char c = (unsigned char)b;
        L->t->byte_sym[b] = h->byte_level ? hfl_vocab_id(h, &c, 1) : -1;
    }
    return load_merges(L, json_object_get(m, "merges"));
}

/* ---- the whole file ---------------------------------------------------- */

int tok_hf_load(const char *json_path, const char *cfg_path, pr_tokenizer **out, pr_error *err)
{
    ld L;
    memset(&L, 0, sizeof L);
    L.path = json_path;
    L.err = err;
    tok_cp_alphabet(L.cp_to_byte);
    json_error_t jerr;
    json_t *root = json_load_file(json_path, 0, &jerr);
    if (!root) {
        if (jerr.line < 0)
            return pr_errorf(err, PR_ERR_IO, "%s: %s", json_path, jerr.text);
        return pr_errorf(err, PR_ERR_FORMAT, "%s:%d: bad JSON: %s", json_path, jerr.line, jerr.text);
    }
    int rc = PR_OK;
    L.t = calloc(1, sizeof *L.t);
    L.h = L.t ? calloc(1, sizeof *L.h) : NULL;
    if (!L.h) {
        rc = pr_errorf(err, PR_ERR_NOMEM, "%s: out of memory", json_path);
        goto done;
    }
    L.t->kind = TOK_HF;
    L.t->hf = L.h;
    for (int i = 0; i < 256; i++)
        L.h->raw.root[i] = L.h->norm.root[i] = -1;
    L.t->eot = L.t->bos = -1;
    if (!json_is_object(root)) {
        rc = FAIL(&L, PR_ERR_FORMAT, "%s: expected a JSON object", json_path);
        goto done;
    }
    json_t *norm = json_object_get(root, "normalizer"), *pre = json_object_get(root, "pre_tokenizer");
    if (norm && !json_is_null(norm) && (rc = load_normalizer(&L, norm, "normalizer", 0)) != PR_OK)
        goto done;
    if (pre && !json_is_null(pre) && (rc = load_pre(&L, pre, "pre_tokenizer", 0)) != PR_OK)
        goto done;
    decoder_conf dc;
    memset(&dc, 0, sizeof dc);
    if ((rc = load_decoder(&L, json_object_get(root, "decoder"), &dc)) != PR_OK)
        goto done;
    if (!(dc.seen & DEC_BYTELEVEL) != !L.h->byte_level) {
        rc = FAIL(&L, PR_ERR_UNSUPPORTED, "%s: a ByteLevel decoder needs a ByteLevel pre_tokenizer and the other way "
                  "round (this file has only one of them)", json_path);
        goto done;
    }
    json_t *model = json_object_get(root, "model");
    if (!model) {
        rc = FAIL(&L, PR_ERR_FORMAT, "%s: model is missing", json_path);
        goto done;
    }
    long max_id = -1;
    if ((rc = load_model(&L, model, &max_id)) != PR_OK ||
        (rc = hfl_load_added(&L, json_object_get(root, "added_tokens"), &max_id)) != PR_OK)
        goto done;
    if (max_id < 0) {
        rc = FAIL(&L, PR_ERR_FORMAT, "%s: model.vocab is empty", json_path);
        goto done;
    }
    L.t->vocab_size = (int)(max_id + 1);
    if ((rc = hfl_build_decode(&L, json_object_get(model, "vocab"), &dc)) != PR_OK)
        goto done;
    rc = hfl_load_config(&L, cfg_path, json_object_get(root, "post_processor"));
done:
    json_decref(root);
    if (rc != PR_OK) {
        pr_tokenizer_free(L.t);
        return rc;
    }
    *out = L.t;
    return PR_OK;
}
