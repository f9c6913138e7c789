/* libFuzzer harness: Hugging Face tokenizer files (core/tokenize/hf_*.c).
 * The input is three parts split at FUZZ_SEP: tokenizer.json,
 * tokenizer_config.json (left out when empty) and a text that a loaded
 * tokenizer encodes and decodes again; decode(encode(text)) must give the
 * text's bytes back whenever the tokenizer has no normaliser that changes
 * them, which the harness does not know, so only memory safety and the
 * refusal of out-of-range ids are checked. */
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
    fuzz_part part[3];
    fuzz_split(data, size, part, 3);
    char dir[4200], tj[4300], tc[4300];
    fuzz_path("hftok", dir, sizeof dir);
    fuzz_mkdir(dir);
    snprintf(tj, sizeof tj, "%s/tokenizer.json", dir);
    snprintf(tc, sizeof tc, "%s/tokenizer_config.json", dir);
    fuzz_write(tj, part[0].data, part[0].size);
    if (part[1].size)
        fuzz_write(tc, part[1].data, part[1].size);
    else
        fuzz_unlink(tc);
    pr_tokenizer *tok = NULL;
    pr_error err = {0};
    if (pr_tokenizer_load(dir, &tok, &err) != PR_OK)
        return 0;
    (void)pr_tokenizer_bos(tok);
    (void)pr_tokenizer_eot(tok);
    (void)pr_tokenizer_add_bos(tok);
    int *ids = NULL;
    size_t n_ids = 0;
    if (pr_tokenizer_encode(tok, (const char *)part[2].data, part[2].size, &ids, &n_ids, &err) == PR_OK) {
        for (size_t i = 0; i < n_ids; i++)
            if (ids[i] < 0 || ids[i] >= pr_tokenizer_vocab_size(tok))
                abort(); /* encode gave an id outside its own vocabulary */
        char *text = NULL;
        size_t len = 0;
        if (pr_tokenizer_decode(tok, ids, n_ids, &text, &len, &err) == PR_OK)
            free(text);
        free(ids);
    }
    int bad[2] = {-1, pr_tokenizer_vocab_size(tok)};
    char *text = NULL;
    size_t len = 0;
    if (pr_tokenizer_decode(tok, bad, 2, &text, &len, &err) == PR_OK)
        abort(); /* ids outside the vocabulary must be refused */
    pr_tokenizer_free(tok);
    return 0;
}
