/* peftref: what hf_load.c and hf_added.c share while a tokenizer.json
 * loads.  Not installed. */
#ifndef PEFTREF_CORE_TOKENIZE_HF_LOAD_INTERNAL_H
#define PEFTREF_CORE_TOKENIZE_HF_LOAD_INTERNAL_H

#include <stdint.h>

#include <jansson.h>

#include "peftref/tokenizer.h"
#include "tokenizer_internal.h"
#include "hf_internal.h"

#include "peftref/tokenizer.h"
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

/* the decoder steps a tokenizer.json names (decoder_conf.seen bits) */
enum { DEC_BYTELEVEL = 1, DEC_REPLACE = 2, DEC_BYTEFALLBACK = 4, DEC_FUSE = 8, DEC_STRIP = 16 };

typedef struct decoder_conf {
    int seen;
    const char *rep_from[HF_MAX_STEPS], *rep_to[HF_MAX_STEPS];
    int n_rep;
} decoder_conf;

int hfl_get_bool(ld *L, const json_t *o, const char *where, const char *key, int def, int *out);
int hfl_token_key(ld *L, const char *tok, size_t n, tok_buf *b, int *in_alphabet);
const char *hfl_type_name(const json_t *v);
int32_t hfl_vocab_id(const tok_hf *h, const unsigned char *k, size_t n);
int hfl_build_decode(ld *L, const json_t *vocab, const decoder_conf *d);
int hfl_load_added(ld *L, const json_t *list, long *max_id);
int hfl_load_config(ld *L, const char *cfg, const json_t *post_processor);

#endif
