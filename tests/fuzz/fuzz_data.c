/* libFuzzer harness: training data (core/train/data.c data_load), JSON
 * Lines and plain text.  The first input byte picks the settings, the rest
 * is the file:
 *   bit 0      format: 0 jsonl, 1 text ("auto" by extension either way)
 *   bit 1      task: 0 lm, 1 classification
 *   bit 2      lm: no end-of-text id
 *   bit 3      classification: given the label set {neg, pos} (else built)
 *   bit 4      tokenizer: 0 byte, 1 the small GPT-2 BPE of tests/data
 *   bits 5-7   seq_len = 2 + 9 * value (2..65); bit 6 also passes format
 *              "auto" instead of the one bit 0 names
 * A loaded dataset with two examples or more is also split. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "data.h"
#include "fuzz_util.h"
#include "peftref/tokenizer.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerInitialize(int *argc, char ***argv);

static pr_tokenizer *tok_byte, *tok_bpe;

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    pr_error err = {0};
    if (pr_tokenizer_byte(&tok_byte, &err) != PR_OK ||
        pr_tokenizer_load_bpe(FUZZ_SRCDIR "/tests/data/train/bytes-bpe/vocab.json",
                              FUZZ_SRCDIR "/tests/data/train/bytes-bpe/merges.txt", &tok_bpe, &err) != PR_OK) {
        fprintf(stderr, "fuzz_data: %s\n", err.msg);
        abort();
    }
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1 || size > FUZZ_MAX_INPUT)
        return -1;
    unsigned sel = data[0];
    int text = sel & 1, cls = (sel >> 1) & 1;
    char path[4200];
    fuzz_path(text ? "data.txt" : "data.jsonl", path, sizeof path);
    fuzz_write(path, data + 1, size - 1);

    static char neg[] = "neg", pos[] = "pos";
    static char *names[] = {neg, pos};
    data_labels given = {.n = 2, .is_int = 0, .names = names};
    data_options opt = {0};
    opt.no_eot = (sel >> 2) & 1;
    if (cls && ((sel >> 3) & 1))
        opt.labels = &given;
    const pr_tokenizer *tok = (sel >> 4) & 1 ? tok_bpe : tok_byte;
    int seq_len = 2 + 9 * (int)(sel >> 5);

    data_dataset ds = {0};
    pr_error err = {0};
    if (data_load(path, (sel >> 6) & 1 ? "auto" : text ? "text" : "jsonl", cls ? "classification" : "lm", tok,
                  seq_len, &opt, &ds, &err) != PR_OK)
        return 0;
    if (ds.n >= 2) {
        data_dataset tr = {0}, va = {0};
        if (data_split(&ds, 0.25, sel, &tr, &va, &err) == PR_OK) {
            data_dataset_free(&tr);
            data_dataset_free(&va);
        }
    }
    data_dataset_free(&ds);
    return 0;
}
