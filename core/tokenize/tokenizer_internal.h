/* peftref core: private declarations shared by the tokenizer's files:
 * tokenizer.c (front: loading, the byte tokenizer, encode and decode),
 * bpe.c (GPT-2 byte-level BPE: its tables, loading and merging),
 * pretokenize.c (UTF-8, character classes and the GPT-2 pre-token splitter),
 * hf_load.c (Hugging Face tokenizer.json and tokenizer_config.json),
 * hf_encode.c (their encoding pipeline), hf_pretok.c (their Split
 * patterns) and nfc.c (Unicode NFC).  Not installed. */
#ifndef PEFTREF_CORE_TOKENIZER_INTERNAL_H
#define PEFTREF_CORE_TOKENIZER_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

#include "peftref/tokenizer.h"

enum { TOK_BYTE = 0, TOK_BPE = 1, TOK_HF = 2 };

typedef struct tok_hf tok_hf; /* hf_load.c */

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
    /* TOK_HF: symbols are vocabulary ids (sym_id is the identity) */
    int bos, add_bos;
    tok_hf *hf;
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

/* A growable byte buffer and code point buffer. */
typedef struct tok_buf {
    unsigned char *p;
    size_t n, cap;
} tok_buf;

typedef struct tok_cpbuf {
    uint32_t *p;
    size_t cap;
} tok_cpbuf;

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
uint64_t tok_hash_bytes(const unsigned char *s, size_t n);
/* Append one id to w->ids.  Returns 0 or -1. */
int tok_push_id(enc_ws *w, int id);
/* Index of the entry for key (hash h), or -1. */
long tok_strmap_find(const strmap *m, const unsigned char *key, size_t len, uint64_t h);
/* Add key (absent) with val; returns its index, or -1 when out of memory. */
long tok_strmap_add(strmap *m, const unsigned char *key, size_t len, uint64_t h, int32_t val);
uint64_t tok_pair_key(int32_t a, int32_t b);
/* Size m for n pairs (all slots empty).  Returns 0 or -1. */
int tok_pairmap_init(pairmap *m, size_t n);
void tok_pairmap_put(pairmap *m, uint64_t key, int32_t rank, int32_t merged);
/* GPT-2's byte alphabet: code point (< 324) -> byte, or -1. */
void tok_cp_alphabet(int cp_to_byte[324]);
/* Raw bytes of a token spelled in the byte alphabet into out (room for n
 * bytes).  Returns 1 when every character is in the alphabet; 0 otherwise,
 * and out then holds the token's UTF-8 as it is. */
int tok_token_to_bytes(const int cp_to_byte[324], const char *tok, size_t n, unsigned char *out, size_t *out_n);
/* Room in w for a word of n symbols.  Returns 0 or -1. */
int tok_word_reserve(enc_ws *w, size_t n);
/* Merge the symbols w->sym[0..n) and append their ids to w->ids.
 * rounds: GPT-2's order (all occurrences of the lowest-ranked pair before
 * the pairs they create); 0: Hugging Face tokenizers' (each new pair joins
 * the queue at once).  Returns 0 or -1. */
int tok_bpe_merge(const pr_tokenizer *t, enc_ws *w, size_t n, int rounds);

/* ---- pretokenize.c ---- */

/* Decode one UTF-8 code point at s[0..n) (n >= 1).  Returns its length, or
 * 0 when s does not start a valid (shortest-form, non-surrogate) sequence. */
size_t tok_utf8_decode(const unsigned char *s, size_t n, uint32_t *cp);
/* End of the pre-token starting at i < n: the first alternative of
 * GPT-2's pattern (see pretokenize.c) that matches at i. */
size_t tok_pretok_next(const unsigned char *s, size_t n, size_t i);
/* The same with ECMAScript's \s (ws 0) or Unicode White_Space (ws 1). */
size_t tok_gpt2_next(const unsigned char *s, size_t n, size_t i, int ws);

enum { TOK_CL_OTHER = 0, TOK_CL_LETTER, TOK_CL_NUMBER, TOK_CL_SPACE };
/* Class of the character at s[i] (i < n) and its byte length (*w); a byte
 * that does not start valid UTF-8 is one TOK_CL_OTHER character.  Spaces
 * are ECMAScript's \s (white_space 0) or Unicode White_Space, Oniguruma's
 * \s (white_space 1). */
int tok_char_class(const unsigned char *s, size_t n, size_t i, size_t *w, int white_space);

/* ---- hf_pretok.c ---- */

/* The Split patterns peftref matches (tokenizer.json pre_tokenizer). */
enum { TOK_RE_GPT2 = 0, TOK_RE_LLAMA3, TOK_RE_QWEN2, TOK_RE_N };
/* Pattern id of a regex string, or -1. */
int tok_hf_regex_id(const char *pattern);
const char *tok_hf_regex_name(int id);
/* End of the match of pattern id starting at i < n (always > i: each of
 * these patterns matches at every position). */
size_t tok_hf_regex_next(int id, const unsigned char *s, size_t n, size_t i);

/* ---- nfc.c ---- */

/* out = NFC of s[0..n); cps is scratch.  Returns 0 or -1 (no memory). */
int tok_nfc(tok_buf *out, tok_cpbuf *cps, const unsigned char *s, size_t n);

/* ---- hf_load.c / hf_encode.c ---- */

/* Load dir's tokenizer.json (path json_path) and, when cfg_path is not
 * NULL, its tokenizer_config.json. */
int tok_hf_load(const char *json_path, const char *cfg_path, pr_tokenizer **out, pr_error *err);
void tok_hf_free(tok_hf *h);
/* The ids of one pre-token (the model's part), appended to w->ids. */
int tok_hf_word(const pr_tokenizer *t, enc_ws *w, const unsigned char *s, size_t n);
/* Encode text with t->kind == TOK_HF; w->ids gets the ids. */
int tok_hf_encode(const pr_tokenizer *t, enc_ws *w, const unsigned char *s, size_t n);
/* Bytes to drop from decoded text s[0..n) at its start and end (the
 * decoder's Strip). */
void tok_hf_strip(const pr_tokenizer *t, const char *s, size_t n, size_t *head, size_t *tail);

#endif
