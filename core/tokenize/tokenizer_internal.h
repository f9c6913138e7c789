/* peftref core: private declarations shared by the tokenizer's files:
 * tokenizer.c (front: loading, the byte tokenizer, encode and decode),
 * bpe.c (GPT-2 byte-level BPE: its tables, loading and merging) and
 * pretokenize.c (UTF-8 and the pre-token splitter).  Not installed. */
#ifndef PEFTREF_CORE_TOKENIZER_INTERNAL_H
#define PEFTREF_CORE_TOKENIZER_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

#include "peftref/tokenizer.h"

enum { TOK_BYTE = 0, TOK_BPE = 1 };

/* ---- byte string -> int map; entry i keeps its key in the map's arena -- */

typedef struct strmap_entry {
    uint64_t hash;
    size_t off;
    uint32_t len;
    int32_t val;
} strmap_entry;

typedef struct strmap {
    uint32_t *slots; /* entry index + 1; 0 = empty */
    size_t n_slots;  /* power of two */
    strmap_entry *ents;
    size_t n, ents_cap;
    unsigned char *arena;
    size_t arena_n, arena_cap;
} strmap;

/* ---- (symbol, symbol) -> (rank, merged symbol) ------------------------- */

typedef struct pair_slot {
    uint64_t key; /* left << 32 | right; PAIR_EMPTY when free */
    int32_t rank;
    int32_t merged;
} pair_slot;

#define PAIR_EMPTY UINT64_MAX

typedef struct pairmap {
    pair_slot *slots;
    size_t n_slots, n;
} pairmap;

/* A loaded tokenizer; read-only once loaded. */
struct pr_tokenizer {
    int kind;
    int vocab_size;
    int eot;
    /* decoding: id -> dec_bytes[dec_off[id] .. +dec_len[id]); UINT32_MAX = unused id */
    size_t *dec_off;
    uint32_t *dec_len;
    unsigned char *dec_bytes;
    /* encoding: symbols are the byte strings of merges.txt, interned */
    strmap syms;       /* raw bytes -> symbol index (val unused) */
    int32_t *sym_id;   /* symbol -> vocabulary id */
    int32_t byte_sym[256];
    pairmap merges;
};

/* Scratch space and word cache of one encode call (bpe.c). */
typedef struct heap_ent {
    int32_t rank;
    int32_t pos;   /* index of the left symbol: its first byte */
    int32_t left, right, merged;
} heap_ent;

typedef struct enc_ws {
    int *ids;
    size_t n_ids, ids_cap;
    /* per-word scratch */
    int32_t *sym, *next, *prev;
    size_t word_cap;
    heap_ent *heap, *pend;
    size_t n_heap, heap_cap, n_pend, pend_cap;
    /* word -> ids, for this call */
    strmap cache;    /* val = offset into pool: pool[val] = count, then ids */
    int32_t *pool;
    size_t n_pool, pool_cap;
} enc_ws;

/* ---- tokenizer.c ---- */

/* 1 when path names something that exists and is not a directory. */
int tok_file_exists(const char *path);

/* ---- bpe.c ---- */

/* Make room for need elements of elem bytes in *p (capacity *cap). */
int tok_grow(void **p, size_t *cap, size_t need, size_t elem);
void tok_strmap_free(strmap *m);
void tok_enc_ws_free(enc_ws *w);
/* Append the ids of the pre-token s[0..n) to w->ids, through the per-call
 * cache.  Returns 0, or -1 when out of memory. */
int tok_encode_word(const pr_tokenizer *t, enc_ws *w, const unsigned char *s, size_t n);

/* ---- pretokenize.c ---- */

/* Decode one UTF-8 code point at s[0..n) (n >= 1).  Returns its length, or
 * 0 when s does not start a valid (shortest-form, non-surrogate) sequence. */
size_t tok_utf8_decode(const unsigned char *s, size_t n, uint32_t *cp);
/* End of the pre-token starting at i < n: the first alternative of
 * GPT-2's pattern (see pretokenize.c) that matches at i. */
size_t tok_pretok_next(const unsigned char *s, size_t n, size_t i);

#endif
