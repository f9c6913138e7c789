/* libFuzzer harness: tokenizer files (core/tokenize/).  The input is four
 * parts split at FUZZ_SEP: a model directory's config.json (which may
 * name "peftref_tokenizer"), the GPT-2 BPE vocab.json and merges.txt, and
 * a text that a loaded tokenizer encodes and decodes again (a vocabulary
 * may give two strings one id, so the round trip is not asserted).  Empty
 * config.json or vocab parts leave those files out of the directory. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz_util.h"
#include "peftref/tokenizer.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size > FUZZ_MAX_INPUT)
        return -1;
    fuzz_part part[4];
    fuzz_split(data, size, part, 4);
    char dir[4200], cfg[4300], vocab[4300], merges[4300];
    fuzz_path("tok", dir, sizeof dir);
    fuzz_mkdir(dir);
    snprintf(cfg, sizeof cfg, "%s/config.json", dir);
    snprintf(vocab, sizeof vocab, "%s/vocab.json", dir);
    snprintf(merges, sizeof merges, "%s/merges.txt", dir);
    const char *files[3] = {cfg, vocab, merges};
    for (int i = 0; i < 3; i++) {
        if (part[i].size)
            fuzz_write(files[i], part[i].data, part[i].size);
        else
            fuzz_unlink(files[i]);
    }
    pr_tokenizer *tok = NULL;
    pr_error err = {0};
    if (pr_tokenizer_load(dir, &tok, &err) != PR_OK)
        return 0;
    int *ids = NULL;
    size_t n_ids = 0;
    if (pr_tokenizer_encode(tok, (const char *)part[3].data, part[3].size, &ids, &n_ids, &err) == PR_OK) {
        char *text = NULL;
        size_t len = 0;
        if (pr_tokenizer_decode(tok, ids, n_ids, &text, &len, &err) == PR_OK)
            free(text);
        free(ids);
    }
    /* ids outside the vocabulary must be refused, not read */
    int bad[2] = {-1, pr_tokenizer_vocab_size(tok)};
    char *text = NULL;
    size_t len = 0;
    if (pr_tokenizer_decode(tok, bad, 2, &text, &len, &err) == PR_OK)
        free(text);
    pr_tokenizer_free(tok);
    return 0;
}
