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

#define VOCAB_MAX_ID (1 << 24)
#define ADDED_MAX 100000

typedef struct ld {
    const char *path; /* tokenizer.json */
    pr_tokenizer *t;
    tok_hf *h;
    int cp_to_byte[324];
    pr_error *err;
} ld;

#define FAIL(L, code, ...) pr_errorf((L)->err, code, __VA_ARGS__)

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

static const char *type_name(const json_t *v)
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
static int get_bool(ld *L, const json_t *o, const char *where, const char *key, int def, int *out)
{
    json_t *v = json_object_get(o, key);
    if (!v || json_is_null(v)) {
        *out = def;
        return PR_OK;
    }
    if (!json_is_boolean(v))
        return FAIL(L, PR_ERR_FORMAT, "%s: %s.%s must be a boolean, not %s", L->path, where, key, type_name(v));
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
        return FAIL(L, PR_ERR_FORMAT, "%s: %s.%s must be a string, not %s", L->path, where, key, type_name(v));
    *out = json_string_value(v);
    return PR_OK;
}

static int get_type(ld *L, const json_t *o, const char *where, const char **out)
{
    if (!json_is_object(o))
        return FAIL(L, PR_ERR_FORMAT, "%s: %s must be an object, not %s", L->path, where, type_name(o));
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
        if ((rc = get_bool(L, o, where, "add_prefix_space", 1, &p->add_prefix_space)) != PR_OK ||
            (rc = get_bool(L, o, where, "use_regex", 1, &p->use_regex)) != PR_OK)
            return rc;
        p->regex = TOK_RE_GPT2;
        return PR_OK;
    }
    if (strcmp(type, "Split") == 0) {
        json_t *pat = json_object_get(o, "pattern");
        json_t *re = json_is_object(pat) ? json_object_get(pat, "Regex") : NULL;
        int invert;
        if ((rc = get_str(L, o, where, "behavior", &s)) != PR_OK || (rc = get_bool(L, o, where, "invert", 0, &invert)) != PR_OK)
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
            (rc = get_bool(L, o, where, "split", 1, &p->split)) != PR_OK)
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

enum { DEC_BYTELEVEL = 1, DEC_REPLACE = 2, DEC_BYTEFALLBACK = 4, DEC_FUSE = 8, DEC_STRIP = 16 };

typedef struct decoder_conf {
    int seen;
    const char *rep_from[HF_MAX_STEPS], *rep_to[HF_MAX_STEPS];
    int n_rep;
} decoder_conf;

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
static int token_key(ld *L, const char *tok, size_t n, tok_buf *b, int *in_alphabet)
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

static int32_t vocab_id(const tok_hf *h, const unsigned char *k, size_t n)
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
        if (token_key(L, key, n, &b, &in)) {
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
                      L->path, i, type_name(m));
            goto done;
        }
        int ia, ib;
        if (token_key(L, sa, na, &a, &ia) || token_key(L, sb, nb, &b, &ib) ||
            tok_grow((void **)&ab.p, &ab.cap, a.n + b.n + 1, 1)) {
            rc = FAIL(L, PR_ERR_NOMEM, "%s: out of memory", L->path);
            goto done;
        }
        if (!ia || !ib)
            continue; /* outside the byte alphabet: never applies */
        memcpy(ab.p, a.p, a.n);
        memcpy(ab.p + a.n, b.p, b.n);
        int32_t ida = vocab_id(L->h, a.p, a.n), idb = vocab_id(L->h, b.p, b.n), idm = vocab_id(L->h, ab.p, a.n + b.n);
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
    if ((rc = get_bool(L, m, "model", "fuse_unk", 0, &h->fuse_unk)) != PR_OK ||
        (rc = get_bool(L, m, "model", "byte_fallback", 0, &h->byte_fallback)) != PR_OK ||
        (rc = get_bool(L, m, "model", "ignore_merges", 0, &h->ignore_merges)) != PR_OK ||
        (rc = get_str(L, m, "model", "unk_token", &s)) != PR_OK)
        return rc;
    if ((rc = load_vocab(L, json_object_get(m, "vocab"), max_id)) != PR_OK)
        return rc;
    h->unk_id = -1;
    if (s) {
        h->unk_id = vocab_id(h, (const unsigned char *)s, strlen(s));
        if (h->unk_id < 0)
            return FAIL(L, PR_ERR_FORMAT, "%s: model.unk_token \"%s\" is not in model.vocab", L->path, s);
    }
    for (int b = 0; b < 256; b++) {
        char fb[8];
        snprintf(fb, sizeof fb, "<0x%02X>", b);
        h->byte_fb[b] = vocab_id(h, (const unsigned char *)fb, 6);
        unsigned char c = (unsigned char)b;
        L->t->byte_sym[b] = h->byte_level ? vocab_id(h, &c, 1) : -1;
    }
    return load_merges(L, json_object_get(m, "merges"));
}

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

static int load_added(ld *L, const json_t *list, long *max_id)
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
            return FAIL(L, PR_ERR_FORMAT, "%s: %s must be an object, not %s", L->path, w, type_name(o));
        if (!json_is_integer(id) || json_integer_value(id) < 0 || json_integer_value(id) >= VOCAB_MAX_ID)
            return FAIL(L, PR_ERR_FORMAT, "%s: %s.id must be an integer in [0, %d)", L->path, w, VOCAB_MAX_ID);
        if (!json_is_string(c) || json_string_length(c) == 0 || json_string_length(c) > 4096)
            return FAIL(L, PR_ERR_FORMAT, "%s: %s.content must be a string of 1 to 4096 bytes", L->path, w);
        tok_added *a = &h->added[h->n_added];
        int sw, special, lstrip, rstrip, normalized;
        int rc;
        if ((rc = get_bool(L, o, w, "special", 0, &special)) != PR_OK ||
            (rc = get_bool(L, o, w, "single_word", 0, &sw)) != PR_OK ||
            (rc = get_bool(L, o, w, "lstrip", 0, &lstrip)) != PR_OK ||
            (rc = get_bool(L, o, w, "rstrip", 0, &rstrip)) != PR_OK ||
            (rc = get_bool(L, o, w, "normalized", !special, &normalized)) != PR_OK)
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
        return token_key(L, tok, n, b, &in);
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

static int build_decode(ld *L, const json_t *vocab, const decoder_conf *d)
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
    return vocab_id(h, (const unsigned char *)s, n);
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

static int load_config(ld *L, const char *cfg, const json_t *post_processor)
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
        (rc = load_added(&L, json_object_get(root, "added_tokens"), &max_id)) != PR_OK)
        goto done;
    if (max_id < 0) {
        rc = FAIL(&L, PR_ERR_FORMAT, "%s: model.vocab is empty", json_path);
        goto done;
    }
    L.t->vocab_size = (int)(max_id + 1);
    if ((rc = build_decode(&L, json_object_get(model, "vocab"), &dc)) != PR_OK)
        goto done;
    rc = load_config(&L, cfg_path, json_object_get(root, "post_processor"));
done:
    json_decref(root);
    if (rc != PR_OK) {
        pr_tokenizer_free(L.t);
        return rc;
    }
    *out = L.t;
    return PR_OK;
}
