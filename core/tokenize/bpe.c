/* peftref: GPT-2 byte-level BPE (Radford et al. 2019, "Language Models
 * are Unsupervised Multitask Learners", sec. 2.2; openai/gpt-2 encoder.py):
 * its hash tables, loading vocab.json and merges.txt, and merging the
 * symbols of one pre-token.
 *  - text is split into pre-tokens by the pattern of pretokenize.c;
 *  - each byte of a pre-token is one initial symbol; the adjacent pair
 *    with the lowest merge rank is merged everywhere (left to right, not
 *    overlapping) until no ranked pair remains;
 *  - vocab.json and merges.txt spell tokens in the byte-to-unicode alphabet
 *    (printable Latin-1 bytes stand for themselves, the other 68 bytes for
 *    U+0100 + n in byte order).  Tokens are held here as raw bytes.
 * Nothing special is done with <|endoftext|> in text: it is encoded as
 * ordinary characters, like GPT-2's encoder does. */
#include "config.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "peftref/tokenizer.h"
#include "fileio.h"
#include "tokenizer_internal.h"

/* Longest pre-token whose ids are cached during one encode call. */
#define CACHE_MAX_WORD 1024
/* Ids index a dense decode table: keep them sane. */
#define VOCAB_MAX_ID (1 << 24)
#define MERGES_MAX_BYTES ((size_t)1 << 28)

/* ---- hashing ---------------------------------------------------------- */

uint64_t tok_hash_bytes(const unsigned char *s, size_t n)
{
    uint64_t h = 0xcbf29ce484222325ULL; /* FNV-1a, then a final mix */
    for (size_t i = 0; i < n; i++) {
        h ^= s[i];
        h *= 0x100000001b3ULL;
    }
    h ^= h >> 29;
    h *= 0xbf58476d1ce4e5b9ULL;
    h ^= h >> 32;
    return h;
}

static uint64_t hash_u64(uint64_t x)
{
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ULL;
    x ^= x >> 33;
    return x;
}

int tok_grow(void **p, size_t *cap, size_t need, size_t elem)
{
    if (need <= *cap)
        return 0;
    size_t nc = *cap ? *cap : 16;
    while (nc < need)
        nc *= 2;
    void *np = realloc(*p, nc * elem);
    if (!np)
        return -1;
    *p = np;
    *cap = nc;
    return 0;
}

/* ---- byte string -> int map; entry i keeps its key in the map's arena -- */

void tok_strmap_free(strmap *m)
{
    free(m->slots);
    free(m->ents);
    free(m->arena);
    memset(m, 0, sizeof *m);
}

static const unsigned char *strmap_key(const strmap *m, size_t i)
{
    return m->arena + m->ents[i].off;
}

long tok_strmap_find(const strmap *m, const unsigned char *key, size_t len, uint64_t h)
{
    if (!m->n_slots)
        return -1;
    size_t mask = m->n_slots - 1;
    for (size_t s = (size_t)h & mask;; s = (s + 1) & mask) {
        uint32_t e = m->slots[s];
        if (!e)
            return -1;
        const strmap_entry *en = &m->ents[e - 1];
        if (en->hash == h && en->len == len && memcmp(m->arena + en->off, key, len) == 0)
            return (long)(e - 1);
    }
}

static int strmap_rehash(strmap *m, size_t n_slots)
{
    uint32_t *slots = calloc(n_slots, sizeof *slots);
    if (!slots)
        return -1;
    for (size_t i = 0; i < m->n; i++) {
        size_t s = (size_t)m->ents[i].hash & (n_slots - 1);
        while (slots[s])
            s = (s + 1) & (n_slots - 1);
        slots[s] = (uint32_t)(i + 1);
    }
    free(m->slots);
    m->slots = slots;
    m->n_slots = n_slots;
    return 0;
}

long tok_strmap_add(strmap *m, const unsigned char *key, size_t len, uint64_t h, int32_t val)
{
    if (len > UINT32_MAX || m->n >= UINT32_MAX - 1)
        return -1;
    if ((m->n + 1) * 2 > m->n_slots && strmap_rehash(m, m->n_slots ? m->n_slots * 2 : 64))
        return -1;
    if (tok_grow((void **)&m->ents, &m->ents_cap, m->n + 1, sizeof *m->ents) ||
        tok_grow((void **)&m->arena, &m->arena_cap, m->arena_n + len + 1, 1))
        return -1;
    if (len)
        memcpy(m->arena + m->arena_n, key, len);
    strmap_entry *en = &m->ents[m->n];
    en->hash = h;
    en->off = m->arena_n;
    en->len = (uint32_t)len;
    en->val = val;
    m->arena_n += len;
    size_t mask = m->n_slots - 1, s = (size_t)h & mask;
    while (m->slots[s])
        s = (s + 1) & mask;
    m->slots[s] = (uint32_t)(m->n + 1);
    return (long)m->n++;
}

/* ---- (symbol, symbol) -> (rank, merged symbol) ------------------------- */

uint64_t tok_pair_key(int32_t a, int32_t b)
{
    return (uint64_t)(uint32_t)a << 32 | (uint32_t)b;
}

static const pair_slot *pairmap_find(const pairmap *m, uint64_t key)
{
    size_t mask = m->n_slots - 1;
    for (size_t s = (size_t)hash_u64(key) & mask;; s = (s + 1) & mask) {
        if (m->slots[s].key == key)
            return &m->slots[s];
        if (m->slots[s].key == PAIR_EMPTY)
            return NULL;
    }
}

/* Set key's rank and merged symbol (a later duplicate merge line wins, as
 * in GPT-2's dict of ranks).  n_slots is sized once for all merges. */
void tok_pairmap_put(pairmap *m, uint64_t key, int32_t rank, int32_t merged)
{
    size_t mask = m->n_slots - 1, s = (size_t)hash_u64(key) & mask;
    while (m->slots[s].key != PAIR_EMPTY && m->slots[s].key != key)
        s = (s + 1) & mask;
    if (m->slots[s].key == PAIR_EMPTY)
        m->n++;
    m->slots[s].key = key;
    m->slots[s].rank = rank;
    m->slots[s].merged = merged;
}

int tok_pairmap_init(pairmap *m, size_t n)
{
    size_t n_slots = 64;
    while (n_slots < 2 * n)
        n_slots *= 2;
    m->slots = malloc(n_slots * sizeof *m->slots);
    if (!m->slots)
        return -1;
    m->n_slots = n_slots;
    m->n = 0;
    for (size_t i = 0; i < n_slots; i++)
        m->slots[i].key = PAIR_EMPTY;
    return 0;
}

/* ---- the byte alphabet ---------------------------------------------- */

/* GPT-2's byte-to-unicode alphabet: byte b <-> code point. */
static void byte_alphabet(uint32_t byte_to_cp[256])
{
    int n = 0;
    for (int b = 0; b < 256; b++) {
        int printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
        byte_to_cp[b] = printable ? (uint32_t)b : (uint32_t)(256 + n++);
    }
}

void tok_cp_alphabet(int cp_to_byte[324])
{
    uint32_t b2c[256];
    byte_alphabet(b2c);
    for (int i = 0; i < 324; i++)
        cp_to_byte[i] = -1;
    for (int b = 0; b < 256; b++)
        cp_to_byte[b2c[b]] = b;
}

/* ---- loading vocab.json and merges.txt --------------------------------- */

/* Decoding a token outside the alphabet yields its UTF-8 as is. */
int tok_token_to_bytes(const int cp_to_byte[324], const char *tokstr, size_t n, unsigned char *out, size_t *out_n)
{
    const unsigned char *s = (const unsigned char *)tokstr;
    size_t i = 0, k = 0;
    while (i < n) {
        uint32_t cp;
        size_t l = tok_utf8_decode(s + i, n - i, &cp);
        if (!l || cp >= 324 || cp_to_byte[cp] < 0) {
            memcpy(out, s, n);
            *out_n = n;
            return 0;
        }
        out[k++] = (unsigned char)cp_to_byte[cp];
        i += l;
    }
    *out_n = k;
    return 1;
}

/* vocab.json -> decode table, eot, and raw bytes -> id for tokens in the
 * byte alphabet (into vocab). */
static int load_vocab(pr_tokenizer *t, const char *path, const int cp_to_byte[324], strmap *vocab, pr_error *err)
{
    if (!tok_file_exists(path))
        return pr_errorf(err, PR_ERR_NOTFOUND, "%s: no such file", path);
    json_error_t jerr;
    json_t *root = json_load_file(path, 0, &jerr);
    if (!root) {
        if (jerr.line < 0)
            return pr_errorf(err, PR_ERR_IO, "%s: %s", path, jerr.text);
        return pr_errorf(err, PR_ERR_FORMAT, "%s:%d: bad JSON: %s", path, jerr.line, jerr.text);
    }
    int rc = PR_OK;
    unsigned char *buf = NULL;
    size_t buf_cap = 0, total = 0;
    long max_id = -1;
    const char *key;
    json_t *val;
    if (!json_is_object(root)) {
        rc = pr_errorf(err, PR_ERR_FORMAT, "%s: expected a JSON object mapping tokens to ids", path);
        goto done;
    }
    if (json_object_size(root) == 0) {
        rc = pr_errorf(err, PR_ERR_FORMAT, "%s: empty vocabulary", path);
        goto done;
    }
    json_object_foreach(root, key, val) {
        if (!json_is_integer(val) || json_integer_value(val) < 0 || json_integer_value(val) >= INT32_MAX) {
            rc = pr_errorf(err, PR_ERR_FORMAT, "%s: token \"%s\": id must be a non-negative integer", path, key);
            goto done;
        }
        if (json_integer_value(val) > max_id)
            max_id = (long)json_integer_value(val);
        total += strlen(key);
    }
    if (max_id >= VOCAB_MAX_ID) {
        rc = pr_errorf(err, PR_ERR_FORMAT, "%s: id %ld is too large (ids must be below %d)", path, max_id, VOCAB_MAX_ID);
        goto done;
    }
    t->vocab_size = (int)(max_id + 1);
    t->dec_off = malloc((size_t)t->vocab_size * sizeof *t->dec_off);
    t->dec_len = malloc((size_t)t->vocab_size * sizeof *t->dec_len);
    t->dec_bytes = malloc(total + 1);
    if (!t->dec_off || !t->dec_len || !t->dec_bytes) {
        rc = pr_errorf(err, PR_ERR_NOMEM, "%s: out of memory", path);
        goto done;
    }
    for (int i = 0; i < t->vocab_size; i++)
        t->dec_len[i] = UINT32_MAX;
    size_t pos = 0;
    json_object_foreach(root, key, val) {
        size_t n = strlen(key), nb;
        int id = (int)json_integer_value(val);
        if (tok_grow((void **)&buf, &buf_cap, n + 1, 1)) {
            rc = pr_errorf(err, PR_ERR_NOMEM, "%s: out of memory", path);
            goto done;
        }
        int in_alphabet = tok_token_to_bytes(cp_to_byte, key, n, buf, &nb);
        if (t->dec_len[id] != UINT32_MAX) {
            rc = pr_errorf(err, PR_ERR_FORMAT, "%s: id %d is given to two tokens (one is \"%s\")", path, id, key);
            goto done;
        }
        memcpy(t->dec_bytes + pos, buf, nb);
        t->dec_off[id] = pos;
        t->dec_len[id] = (uint32_t)nb;
        pos += nb;
        if (strcmp(key, "<|endoftext|>") == 0)
            t->eot = id;
        if (in_alphabet && nb > 0) {
            uint64_t h = tok_hash_bytes(buf, nb);
            /* distinct keys in the alphabet have distinct bytes */
            if (tok_strmap_find(vocab, buf, nb, h) < 0 && tok_strmap_add(vocab, buf, nb, h, id) < 0) {
                rc = pr_errorf(err, PR_ERR_NOMEM, "%s: out of memory", path);
                goto done;
            }
        }
    }
done:
    free(buf);
    json_decref(root);
    return rc;
}

/* Symbol index of raw bytes s[0..n), interning it. */
static long intern_sym(pr_tokenizer *t, const unsigned char *s, size_t n)
{
    uint64_t h = tok_hash_bytes(s, n);
    long i = tok_strmap_find(&t->syms, s, n, h);
    return i >= 0 ? i : tok_strmap_add(&t->syms, s, n, h, 0);
}

/* Vocabulary id of symbol i's bytes, or -1. */
static int32_t sym_vocab_id(const pr_tokenizer *t, const strmap *vocab, long i)
{
    const unsigned char *k = strmap_key(&t->syms, (size_t)i);
    size_t n = t->syms.ents[i].len;
    long v = tok_strmap_find(vocab, k, n, tok_hash_bytes(k, n));
    return v < 0 ? -1 : vocab->ents[v].val;
}

static int is_field_space(char c)
{
    return c == ' ' || c == '\t';
}

/* merges.txt: an optional "#version" first line, then "A B" per line in
 * rank order (rank = position among the merge lines).  Blank lines are
 * skipped. */
static int load_merges(pr_tokenizer *t, const char *path, const int cp_to_byte[324], const strmap *vocab, pr_error *err)
{
    char *text = NULL;
    size_t len = 0;
    int rc = fileio_read_all(path, MERGES_MAX_BYTES, &text, &len, err);
    if (rc != PR_OK)
        return rc;
    unsigned char *buf = malloc(len + 1);
    size_t n_lines = 1;
    for (size_t i = 0; i < len; i++)
        n_lines += text[i] == '\n';
    if (!buf || tok_pairmap_init(&t->merges, n_lines)) {
        rc = pr_errorf(err, PR_ERR_NOMEM, "%s: out of memory", path);
        goto done;
    }

    for (int b = 0; b < 256; b++) {
        unsigned char c = (unsigned char)b;
        long s = intern_sym(t, &c, 1);
        if (s < 0) {
            rc = pr_errorf(err, PR_ERR_NOMEM, "%s: out of memory", path);
            goto done;
        }
        t->byte_sym[b] = (int32_t)s;
    }

    int32_t rank = 0;
    size_t line_no = 0;
    for (size_t p = 0; p < len;) {
        size_t e = p;
        while (e < len && text[e] != '\n')
            e++;
        size_t next = e + 1;
        line_no++;
        if (e > p && text[e - 1] == '\r')
            e--;
        char *line = text + p;
        size_t ll = e - p;
        p = next;
        if (line_no == 1 && ll >= 8 && memcmp(line, "#version", 8) == 0)
            continue;
        size_t i = 0;
        while (i < ll && is_field_space(line[i]))
            i++;
        if (i == ll)
            continue;
        size_t a0 = i;
        while (i < ll && !is_field_space(line[i]))
            i++;
        size_t a1 = i;
        while (i < ll && is_field_space(line[i]))
            i++;
        size_t b0 = i;
        while (i < ll && !is_field_space(line[i]))
            i++;
        size_t b1 = i;
        while (i < ll && is_field_space(line[i]))
            i++;
        if (b0 == b1 || i != ll) {
            rc = pr_errorf(err, PR_ERR_FORMAT, "%s:%zu: malformed merge line (expected two tokens separated by a space): \"%.*s\"",
                           path, line_no, (int)(ll > 80 ? 80 : ll), line);
            goto done;
        }
        size_t na, nb;
        unsigned char *ab = buf;
        int ok_a = tok_token_to_bytes(cp_to_byte, line + a0, a1 - a0, ab, &na);
        int ok_b = tok_token_to_bytes(cp_to_byte, line + b0, b1 - b0, ab + na, &nb);
        if (!ok_a || !ok_b) {
            rc = pr_errorf(err, PR_ERR_FORMAT, "%s:%zu: token \"%.*s\" has a character outside GPT-2's byte alphabet",
                           path, line_no, ok_a ? (int)(b1 - b0) : (int)(a1 - a0), ok_a ? line + b0 : line + a0);
            goto done;
        }
        long sa = intern_sym(t, ab, na), sb = intern_sym(t, ab + na, nb), sm = intern_sym(t, ab, na + nb);
        if (sa < 0 || sb < 0 || sm < 0) {
            rc = pr_errorf(err, PR_ERR_NOMEM, "%s: out of memory", path);
            goto done;
        }
        long v = tok_strmap_find(vocab, ab, na + nb, tok_hash_bytes(ab, na + nb));
        if (v < 0) {
            rc = pr_errorf(err, PR_ERR_FORMAT, "%s:%zu: merged token \"%.*s%.*s\" is not in the vocabulary",
                           path, line_no, (int)(a1 - a0), line + a0, (int)(b1 - b0), line + b0);
            goto done;
        }
        tok_pairmap_put(&t->merges, tok_pair_key((int32_t)sa, (int32_t)sb), rank++, (int32_t)sm);
    }

    t->sym_id = malloc(t->syms.n * sizeof *t->sym_id);
    if (!t->sym_id) {
        rc = pr_errorf(err, PR_ERR_NOMEM, "%s: out of memory", path);
        goto done;
    }
    /* Merge results are vocabulary tokens (checked above), and so must be
     * the bytes (checked by the caller); merge operands need not be, being
     * bytes or results themselves. */
    for (size_t i = 0; i < t->syms.n; i++)
        t->sym_id[i] = sym_vocab_id(t, vocab, (long)i);
done:
    free(buf);
    free(text);
    return rc;
}

int pr_tokenizer_load_bpe(const char *vocab_json, const char *merges_txt, pr_tokenizer **out, pr_error *err)
{
    int cp_to_byte[324];
    tok_cp_alphabet(cp_to_byte);
    pr_tokenizer *t = calloc(1, sizeof *t);
    if (!t)
        return pr_errorf(err, PR_ERR_NOMEM, "%s: out of memory", vocab_json);
    t->kind = TOK_BPE;
    t->eot = -1;
    strmap vocab;
    memset(&vocab, 0, sizeof vocab);
    int rc = load_vocab(t, vocab_json, cp_to_byte, &vocab, err);
    if (rc == PR_OK)
        rc = load_merges(t, merges_txt, cp_to_byte, &vocab, err);
    for (int b = 0; rc == PR_OK && b < 256; b++)
        if (t->sym_id[t->byte_sym[b]] < 0)
            rc = pr_errorf(err, PR_ERR_FORMAT, "%s: no token for byte 0x%02X (every byte needs one)", vocab_json, b);
    tok_strmap_free(&vocab);
    if (rc != PR_OK) {
        pr_tokenizer_free(t);
        return rc;
    }
    *out = t;
    return PR_OK;
}

/* ---- BPE on one pre-token ---------------------------------------------- */

void tok_enc_ws_free(enc_ws *w)
{
    free(w->sym);
    free(w->next);
    free(w->prev);
    free(w->heap);
    free(w->pend);
    tok_strmap_free(&w->cache);
    free(w->pool);
}

static int heap_less(const heap_ent *a, const heap_ent *b)
{
    return a->rank < b->rank || (a->rank == b->rank && a->pos < b->pos);
}

static void heap_push(enc_ws *w, heap_ent e)
{
    size_t i = w->n_heap++;
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (!heap_less(&e, &w->heap[p]))
            break;
        w->heap[i] = w->heap[p];
        i = p;
    }
    w->heap[i] = e;
}

static heap_ent heap_pop(enc_ws *w)
{
    heap_ent top = w->heap[0], last = w->heap[--w->n_heap];
    size_t i = 0, n = w->n_heap;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= n)
            break;
        if (c + 1 < n && heap_less(&w->heap[c + 1], &w->heap[c]))
            c++;
        if (!heap_less(&w->heap[c], &last))
            break;
        w->heap[i] = w->heap[c];
        i = c;
    }
    if (n)
        w->heap[i] = last;
    return top;
}

/* Queue the pair starting at symbol p, if it has a rank. */
static void queue_pair(const pr_tokenizer *t, enc_ws *w, int32_t p, int pending)
{
    int32_t q = w->next[p];
    if (q < 0)
        return;
    const pair_slot *ps = pairmap_find(&t->merges, tok_pair_key(w->sym[p], w->sym[q]));
    if (!ps)
        return;
    heap_ent e = {ps->rank, p, w->sym[p], w->sym[q], ps->merged};
    if (pending)
        w->pend[w->n_pend++] = e;
    else
        heap_push(w, e);
}

int tok_push_id(enc_ws *w, int id)
{
    if (tok_grow((void **)&w->ids, &w->ids_cap, w->n_ids + 1, sizeof *w->ids))
        return -1;
    w->ids[w->n_ids++] = id;
    return 0;
}

int tok_word_reserve(enc_ws *w, size_t n)
{
    if (n > INT32_MAX / 4)
        return -1;
    if (n > w->word_cap) {
        size_t cap = n < 64 ? 64 : 2 * n;
        free(w->sym);
        free(w->next);
        free(w->prev);
        w->sym = malloc(cap * sizeof *w->sym);
        w->next = malloc(cap * sizeof *w->next);
        w->prev = malloc(cap * sizeof *w->prev);
        w->word_cap = w->sym && w->next && w->prev ? cap : 0;
        if (!w->word_cap)
            return -1;
    }
    /* at most n-1 initial pairs and 2 new pairs per merge (n-1 merges) */
    if (tok_grow((void **)&w->heap, &w->heap_cap, 3 * n, sizeof *w->heap) ||
        tok_grow((void **)&w->pend, &w->pend_cap, 2 * n, sizeof *w->pend))
        return -1;
    return 0;
}

/* GPT-2 merges, in rounds, every occurrence of the lowest-ranked pair,
 * left to right, before looking at the pairs those merges create.  The
 * heap (rank, position) yields one round's occurrences in that order;
 * pairs created during a round wait in pend until the round ends, since
 * they may rank lower than the pair being merged.  Hugging Face tokenizers
 * (models/bpe/word.rs, merge_all) pushes them at once instead: the same
 * ids whenever a merge ranks below the merges that make its parts, as in
 * every trained merge list.  O(n log n) per word. */
int tok_bpe_merge(const pr_tokenizer *t, enc_ws *w, size_t n, int rounds)
{
    for (size_t i = 0; i < n; i++) {
        w->next[i] = i + 1 < n ? (int32_t)(i + 1) : -1;
        w->prev[i] = (int32_t)i - 1;
    }
    w->n_heap = w->n_pend = 0;
    for (size_t i = 0; i + 1 < n; i++)
        queue_pair(t, w, (int32_t)i, 0);
    int32_t round = -1;
    for (;;) {
        if (w->n_pend && (w->n_heap == 0 || w->heap[0].rank != round)) {
            for (size_t k = 0; k < w->n_pend; k++)
                heap_push(w, w->pend[k]);
            w->n_pend = 0;
        }
        if (w->n_heap == 0)
            break;
        heap_ent e = heap_pop(w);
        int32_t p = e.pos, q = w->next[p];
        /* stale: p was merged into its left neighbour (sym -1), or a side
         * has grown since the entry was queued */
        if (w->sym[p] != e.left || q < 0 || w->sym[q] != e.right)
            continue;
        round = e.rank;
        w->sym[p] = e.merged;
        w->next[p] = w->next[q];
        if (w->next[q] >= 0)
            w->prev[w->next[q]] = p;
        w->sym[q] = -1; /* dead */
        if (w->prev[p] >= 0)
            queue_pair(t, w, w->prev[p], rounds);
        queue_pair(t, w, p, rounds);
    }
    for (int32_t p = n ? 0 : -1; p >= 0; p = w->next[p])
        if (tok_push_id(w, t->sym_id[w->sym[p]]))
            return -1;
    return 0;
}

/* Append the ids of GPT-2 pre-token s[0..n) to w->ids: its bytes are the
 * initial symbols. */
static int bpe_word(const pr_tokenizer *t, enc_ws *w, const unsigned char *s, size_t n)
{
    if (n == 1)
        return tok_push_id(w, t->sym_id[t->byte_sym[s[0]]]);
    if (tok_word_reserve(w, n))
        return -1;
    for (size_t i = 0; i < n; i++)
        w->sym[i] = t->byte_sym[s[i]];
    return tok_bpe_merge(t, w, n, 1);
}

/* The ids of one pre-token, by the tokenizer's kind. */
static int word_ids(const pr_tokenizer *t, enc_ws *w, const unsigned char *s, size_t n)
{
    return t->kind == TOK_HF ? tok_hf_word(t, w, s, n) : bpe_word(t, w, s, n);
}

/* word_ids through the per-call cache. */
int tok_encode_word(const pr_tokenizer *t, enc_ws *w, const unsigned char *s, size_t n)
{
    if (n > CACHE_MAX_WORD || n == 1)
        return word_ids(t, w, s, n);
    uint64_t h = tok_hash_bytes(s, n);
    long c = tok_strmap_find(&w->cache, s, n, h);
    if (c >= 0) {
        const int32_t *e = w->pool + w->cache.ents[c].val;
        for (int32_t k = 0; k < e[0]; k++)
            if (tok_push_id(w, e[1 + k]))
                return -1;
        return 0;
    }
    size_t start = w->n_ids;
    if (word_ids(t, w, s, n))
        return -1;
    size_t cnt = w->n_ids - start;
    if (w->n_pool + cnt + 1 > INT32_MAX)
        return 0; /* cache full: still correct, just uncached */
    if (tok_grow((void **)&w->pool, &w->pool_cap, w->n_pool + cnt + 1, sizeof *w->pool))
        return -1;
    if (tok_strmap_add(&w->cache, s, n, h, (int32_t)w->n_pool) < 0)
        return -1;
    w->pool[w->n_pool] = (int32_t)cnt;
    for (size_t k = 0; k < cnt; k++)
        w->pool[w->n_pool + 1 + k] = w->ids[start + k];
    w->n_pool += cnt + 1;
    return 0;
}
