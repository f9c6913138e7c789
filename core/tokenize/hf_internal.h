/* peftref core: the parts of a Hugging Face tokenizer.json that peftref
 * runs (hf_load.c fills them, hf_encode.c runs them).  Not installed. */
#ifndef PEFTREF_CORE_HF_INTERNAL_H
#define PEFTREF_CORE_HF_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

#include "tokenizer_internal.h"

/* One entry of added_tokens. */
typedef struct tok_added {
    size_t off;   /* content: h->added_text[off .. off + len) */
    uint32_t len;
    int32_t id;
    unsigned char special, lstrip, rstrip, normalized;
} tok_added;

/* A trie of added-token contents: children of a node are a sibling list,
 * the root's a table by first byte. */
typedef struct trie_node {
    int32_t child, sibling;
    int32_t token; /* index into added, or -1 */
    unsigned char byte;
} trie_node;

typedef struct tok_trie {
    int32_t root[256]; /* node index, or -1 */
    trie_node *nodes;
    size_t n_nodes, cap;
    size_t n_tokens;
} tok_trie;

enum { NORM_NFC = 0, NORM_PREPEND, NORM_REPLACE };

typedef struct tok_norm {
    int kind;
    char *a, *b; /* Prepend: a; Replace: a -> b */
    size_t an, bn;
} tok_norm;

enum { PRE_SPLIT = 0, PRE_BYTELEVEL, PRE_METASPACE };
enum { PREPEND_ALWAYS = 0, PREPEND_FIRST, PREPEND_NEVER };

typedef struct tok_pre {
    int kind;
    int regex;                       /* PRE_SPLIT: TOK_RE_* */
    int add_prefix_space, use_regex; /* PRE_BYTELEVEL */
    unsigned char rep[8];            /* PRE_METASPACE: replacement's UTF-8 */
    size_t rep_n;
    int scheme, split;
} tok_pre;

#define HF_MAX_STEPS 16

struct tok_hf {
    tok_added *added;
    size_t n_added;
    char *added_text;
    tok_trie raw, norm; /* added tokens with normalized false / true */
    tok_norm norms[HF_MAX_STEPS];
    int n_norm;
    tok_pre pre[HF_MAX_STEPS];
    int n_pre;
    int byte_level;      /* the model's alphabet is GPT-2's bytes */
    strmap vocab;        /* the model's tokens as raw bytes -> id */
    int unk_id;          /* -1: none */
    int fuse_unk, byte_fallback, ignore_merges;
    int32_t byte_fb[256]; /* id of <0xHH>, or -1 */
    int strip_start, strip_stop; /* decoder Strip of ' ' */
};

#endif
