/* peftref: tokenizers.
 *
 * A model directory declares its tokenizer (see docs/tokenizer.md):
 *  - Hugging Face tokenizers' BPE when it holds tokenizer.json (with
 *    tokenizer_config.json for bos/eos), whatever else it holds;
 *  - GPT-2 byte-level BPE when it holds vocab.json and merges.txt;
 *  - the plain byte tokenizer (ids 0..255 are the bytes) when config.json
 *    says "peftref_tokenizer": "byte", or when the directory holds neither.
 * Encoding adds no special tokens. */
#ifndef PEFTREF_TOKENIZER_H
#define PEFTREF_TOKENIZER_H

#include <stddef.h>
#include "peftref/status.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct pr_tokenizer pr_tokenizer;

/* Open the tokenizer a model directory declares. */
int pr_tokenizer_load(const char *model_dir, pr_tokenizer **out, pr_error *err);
/* GPT-2 BPE from explicit files. */
int pr_tokenizer_load_bpe(const char *vocab_json, const char *merges_txt, pr_tokenizer **out, pr_error *err);
/* The byte tokenizer (vocabulary 256). */
int pr_tokenizer_byte(pr_tokenizer **out, pr_error *err);
void pr_tokenizer_free(pr_tokenizer *tok);

int pr_tokenizer_vocab_size(const pr_tokenizer *tok);
/* End-of-text id (GPT-2's <|endoftext|> is 50256), or -1 when none. */
int pr_tokenizer_eot(const pr_tokenizer *tok);
const char *pr_tokenizer_kind(const pr_tokenizer *tok); /* "hf-bpe", "gpt2-bpe" or "byte" */
/* For "hf-bpe" the end-of-text id above is tokenizer_config.json's
 * eos_token.  Its bos_token's id, or -1 when none (and for other kinds): */
int pr_tokenizer_bos(const pr_tokenizer *tok);
/* 1 when the model expects bos before each text: tokenizer_config.json's
 * add_bos_token, or when absent whether the post_processor's template
 * starts with bos.  Encoding never adds it; a data loader may. */
int pr_tokenizer_add_bos(const pr_tokenizer *tok);

/* Encode len bytes of text.  *ids is allocated (free() it); *n_ids set. */
int pr_tokenizer_encode(const pr_tokenizer *tok, const char *text, size_t len, int **ids, size_t *n_ids, pr_error *err);
/* Decode ids to bytes.  *text is allocated and NUL-terminated; *len set. */
int pr_tokenizer_decode(const pr_tokenizer *tok, const int *ids, size_t n, char **text, size_t *len, pr_error *err);

#ifdef __cplusplus
}
#endif
#endif
