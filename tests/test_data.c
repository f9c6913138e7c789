/* Tests for core/train/data.c: loading, chunking, masks, padding, labels, split,
 * sampler resume, error messages.  The byte tokenizer (id = byte value)
 * makes every expected id computable by hand; tests/data/train/bytes-bpe
 * is a GPT-2 BPE vocabulary with no merges (id = byte value too) plus
 * <|endoftext|> = 256, for the end-of-text rules. */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "data.h"

#define TRAIN_DIR TEST_SRCDIR "/data/train/"
#define EOT 256

static pr_tokenizer *byte_tok(void)
{
    pr_tokenizer *tok = NULL;
    pr_error err = {0};
    assert_int_equal(pr_tokenizer_byte(&tok, &err), PR_OK);
    return tok;
}

static pr_tokenizer *eot_tok(void)
{
    pr_tokenizer *tok = NULL;
    pr_error err = {0};
    int rc = pr_tokenizer_load_bpe(TRAIN_DIR "bytes-bpe/vocab.json", TRAIN_DIR "bytes-bpe/merges.txt", &tok, &err);
    if (rc)
        fail_msg("%s", err.msg);
    assert_int_equal(pr_tokenizer_eot(tok), EOT);
    return tok;
}

static void load_ok(const char *path, const char *format, const char *task, const pr_tokenizer *tok, int T,
                    const data_options *o, data_dataset *ds)
{
    pr_error err = {0};
    int rc = data_load(path, format, task, tok, T, o, ds, &err);
    if (rc)
        fail_msg("data_load(%s): %s", path, err.msg);
}

/* example i's tokens equal the bytes of s (plus EOT when eot) */
static void assert_example(const data_dataset *ds, size_t i, const char *s, int eot, int n_prompt)
{
    assert_true(i < ds->n);
    const data_example *e = &ds->ex[i];
    int n = (int)strlen(s) + (eot ? 1 : 0);
    assert_int_equal(e->n, n);
    assert_int_equal(e->n_prompt, n_prompt);
    for (int t = 0; t < (int)strlen(s); t++)
        assert_int_equal(ds->tokens[e->off + (size_t)t], (unsigned char)s[t]);
    if (eot)
        assert_int_equal(ds->tokens[e->off + (size_t)n - 1], EOT);
}

/* a temporary file holding text; returns its path (caller unlinks, frees) */
static char *temp_file(const char *text, const char *suffix)
{
    char *path = malloc(64);
    assert_non_null(path);
    snprintf(path, 64, "/tmp/peftref-data-XXXXXX%s", suffix);
    int fd = mkstemps(path, (int)strlen(suffix));
    assert_true(fd >= 0);
    size_t n = strlen(text);
    assert_int_equal(write(fd, text, n), (ssize_t)n);
    close(fd);
    return path;
}

/* ---- loading ---------------------------------------------------------------- */

/* "abcdefghij", T = 4: windows start every 4 tokens, each up to 5 tokens:
 * abcde, efghi, ij (a 2-token remainder). */
static void test_text_chunking(void **state)
{
    (void)state;
    pr_tokenizer *tok = byte_tok();
    data_dataset ds;
    load_ok(TRAIN_DIR "lm.txt", "auto", "lm", tok, 4, NULL, &ds);
    assert_int_equal(ds.task, DATA_TASK_LM);
    assert_int_equal(ds.n, 3);
    assert_example(&ds, 0, "abcde", 0, 0);
    assert_example(&ds, 1, "efghi", 0, 0);
    assert_example(&ds, 2, "ij", 0, 0);
    assert_int_equal(data_count_scored(&ds, NULL, 0), 4 + 4 + 1);

    /* inputs are the first T tokens, targets the next tokens */
    size_t idx[3] = {0, 1, 2};
    int tokens[12], targets[12], lengths[3], labels[3];
    pr_error err = {0};
    assert_int_equal(data_make_batch(&ds, idx, 3, 3, 4, tokens, targets, lengths, labels, 0, &err), PR_OK);
    const int want_tok[12] = {'a', 'b', 'c', 'd', 'e', 'f', 'g', 'h', 'i', 0, 0, 0};
    const int want_tgt[12] = {'b', 'c', 'd', 'e', 'f', 'g', 'h', 'i', 'j', -1, -1, -1};
    for (int i = 0; i < 12; i++) {
        assert_int_equal(tokens[i], want_tok[i]);
        assert_int_equal(targets[i], want_tgt[i]);
    }
    assert_int_equal(lengths[0], 4);
    assert_int_equal(lengths[1], 4);
    assert_int_equal(lengths[2], 1);
    for (int b = 0; b < 3; b++)
        assert_int_equal(labels[b], -1);
    data_dataset_free(&ds);

    /* 9 tokens: the 1-token remainder "i" has nothing to predict */
    char *path = temp_file("abcdefghi", ".txt");
    load_ok(path, NULL, NULL, tok, 4, NULL, &ds);
    assert_int_equal(ds.n, 2);
    assert_example(&ds, 1, "efghi", 0, 0);
    data_dataset_free(&ds);
    unlink(path);
    free(path);
    pr_tokenizer_free(tok);
}

/* forced text format on a .jsonl name reads the bytes as text */
static void test_format_override(void **state)
{
    (void)state;
    pr_tokenizer *tok = byte_tok();
    data_dataset ds;
    load_ok(TRAIN_DIR "cls_int.jsonl", "text", "lm", tok, 64, NULL, &ds);
    assert_int_equal(ds.n, 1);
    assert_int_equal(ds.tokens[0], '{');
    data_dataset_free(&ds);
    pr_tokenizer_free(tok);
}

/* lm.jsonl: "hello", blank line, "", "x", "abcdefg"; T = 4 */
static void test_jsonl_text_no_eot(void **state)
{
    (void)state;
    pr_tokenizer *tok = byte_tok();
    data_dataset ds;
    load_ok(TRAIN_DIR "lm.jsonl", "auto", "lm", tok, 4, NULL, &ds);
    assert_int_equal(ds.n_records, 4);
    assert_int_equal(ds.n_skipped, 2); /* "" and "x" give fewer than 2 tokens */
    assert_int_equal(ds.n, 3);
    assert_example(&ds, 0, "hello", 0, 0);
    assert_example(&ds, 1, "abcde", 0, 0);
    assert_example(&ds, 2, "efg", 0, 0);
    data_dataset_free(&ds);

    /* a byte-order mark and CRLF line ends; ".json" is JSON Lines too */
    char *path = temp_file("\xEF\xBB\xBF{\"text\": \"ab\"}\r\n\r\n{\"text\": \"cd\"}\r\n", ".json");
    load_ok(path, NULL, NULL, tok, 4, NULL, &ds);
    assert_int_equal(ds.n, 2);
    assert_example(&ds, 0, "ab", 0, 0);
    assert_example(&ds, 1, "cd", 0, 0);
    data_dataset_free(&ds);
    unlink(path);
    free(path);
    pr_tokenizer_free(tok);
}

static void test_jsonl_text_eot(void **state)
{
    (void)state;
    pr_tokenizer *tok = eot_tok();
    data_dataset ds;
    load_ok(TRAIN_DIR "lm.jsonl", "jsonl", "lm", tok, 4, NULL, &ds);
    assert_int_equal(ds.n_skipped, 1); /* "" is EOT alone */
    assert_int_equal(ds.n, 5);
    assert_example(&ds, 0, "hello", 0, 0);
    assert_example(&ds, 1, "o", 1, 0);
    assert_example(&ds, 2, "x", 1, 0);
    assert_example(&ds, 3, "abcde", 0, 0);
    assert_example(&ds, 4, "efg", 1, 0);
    assert_int_equal(data_pad_id(tok), EOT);
    data_dataset_free(&ds);

    /* no_eot turns it off */
    data_options o = {.no_eot = 1};
    load_ok(TRAIN_DIR "lm.jsonl", "jsonl", "lm", tok, 4, &o, &ds);
    assert_int_equal(ds.n, 3);
    assert_example(&ds, 2, "efg", 0, 0);
    data_dataset_free(&ds);
    pr_tokenizer_free(tok);
}

/* pc.jsonl with T = 4 (at most 5 tokens):
 *   ab|cd       -> a b c d,   2 prompt tokens
 *   abcdef|xy   -> d e f x y, prompt cut from the left to 3
 *   ab|vwxyz    -> b v w x y, the prompt's last token kept, completion cut */
static void test_prompt_completion_masks(void **state)
{
    (void)state;
    pr_tokenizer *tok = byte_tok();
    data_dataset ds;
    load_ok(TRAIN_DIR "pc.jsonl", "auto", "lm", tok, 4, NULL, &ds);
    assert_int_equal(ds.n, 3);
    assert_int_equal(ds.n_truncated, 2);
    assert_example(&ds, 0, "abcd", 0, 2);
    assert_example(&ds, 1, "defxy", 0, 3);
    assert_example(&ds, 2, "bvwxy", 0, 1);

    size_t idx[3] = {0, 1, 2};
    int tokens[12], targets[12], lengths[3];
    pr_error err = {0};
    assert_int_equal(data_make_batch(&ds, idx, 3, 3, 4, tokens, targets, lengths, NULL, 7, &err), PR_OK);
    /* position t predicts token t+1; positions before the prompt's last are
     * not scored; the prompt's last position (predicting the first
     * completion token) is */
    const int want_tok[12] = {'a', 'b', 'c', 7, 'd', 'e', 'f', 'x', 'b', 'v', 'w', 'x'};
    const int want_tgt[12] = {-1, 'c', 'd', -1, -1, -1, 'x', 'y', 'v', 'w', 'x', 'y'};
    for (int i = 0; i < 12; i++) {
        assert_int_equal(tokens[i], want_tok[i]);
        assert_int_equal(targets[i], want_tgt[i]);
    }
    assert_int_equal(lengths[0], 3);
    assert_int_equal(lengths[1], 4);
    assert_int_equal(lengths[2], 4);
    int64_t scored = 0;
    for (int i = 0; i < 12; i++)
        scored += targets[i] >= 0;
    assert_int_equal(data_count_scored(&ds, idx, 3), scored);
    assert_int_equal(scored, 2 + 2 + 4);
    data_dataset_free(&ds);
    pr_tokenizer_free(tok);
}

static void test_prompt_completion_eot(void **state)
{
    (void)state;
    pr_tokenizer *tok = eot_tok();
    data_dataset ds;
    load_ok(TRAIN_DIR "pc.jsonl", "auto", "lm", tok, 4, NULL, &ds);
    /* ab|cd+EOT fits; abcdef|xy+EOT keeps 2 prompt tokens; ab|vwxyz+EOT
     * keeps b and cuts the completion (and its EOT) */
    assert_example(&ds, 0, "abcd", 1, 2);
    assert_example(&ds, 1, "efxy", 1, 2);
    assert_example(&ds, 2, "bvwxy", 0, 1);
    size_t idx[1] = {1};
    int tokens[4], targets[4];
    pr_error err = {0};
    assert_int_equal(data_make_batch(&ds, idx, 1, 1, 4, tokens, targets, NULL, NULL, EOT, &err), PR_OK);
    const int want_tgt[4] = {-1, 'x', 'y', EOT};
    for (int i = 0; i < 4; i++)
        assert_int_equal(targets[i], want_tgt[i]);
    data_dataset_free(&ds);
    pr_tokenizer_free(tok);
}

/* ---- batches ---------------------------------------------------------------- */

static void test_padding_rows(void **state)
{
    (void)state;
    pr_tokenizer *tok = byte_tok();
    data_dataset ds;
    load_ok(TRAIN_DIR "lm.txt", NULL, "lm", tok, 4, NULL, &ds);
    /* T = 6 > every example: rows are right-padded; rows 2 and 3 are empty */
    size_t idx[2] = {2, 0};
    int tokens[24], targets[24], lengths[4], labels[4];
    pr_error err = {0};
    assert_int_equal(data_make_batch(&ds, idx, 2, 4, 6, tokens, targets, lengths, labels, 9, &err), PR_OK);
    const int want_tok[24] = {'i', 9, 9, 9, 9, 9, 'a', 'b', 'c', 'd', 9, 9,
                              9,   9, 9, 9, 9, 9, 9,   9,   9,   9,   9, 9};
    const int want_tgt[24] = {'j', -1, -1, -1, -1, -1, 'b', 'c', 'd', 'e', -1, -1,
                              -1,  -1, -1, -1, -1, -1, -1,  -1,  -1,  -1,  -1, -1};
    for (int i = 0; i < 24; i++) {
        assert_int_equal(tokens[i], want_tok[i]);
        assert_int_equal(targets[i], want_tgt[i]);
    }
    assert_int_equal(lengths[0], 1);
    assert_int_equal(lengths[1], 4);
    assert_int_equal(lengths[2], 0);
    assert_int_equal(lengths[3], 0);

    /* T smaller than an example, a bad index, n_idx > B: errors */
    assert_int_equal(data_make_batch(&ds, idx, 2, 2, 3, tokens, targets, lengths, labels, 0, &err), PR_ERR_INVALID);
    assert_non_null(strstr(err.msg, "T = 3"));
    size_t bad[1] = {3};
    assert_int_equal(data_make_batch(&ds, bad, 1, 1, 4, tokens, targets, NULL, NULL, 0, &err), PR_ERR_INVALID);
    assert_int_equal(data_make_batch(&ds, idx, 2, 1, 4, tokens, targets, NULL, NULL, 0, &err), PR_ERR_INVALID);
    data_dataset_free(&ds);
    pr_tokenizer_free(tok);
}

/* ---- classification ------------------------------------------------------- */

static void test_labels_strings(void **state)
{
    (void)state;
    pr_tokenizer *tok = byte_tok();
    data_dataset ds;
    load_ok(TRAIN_DIR "cls.jsonl", NULL, "classification", tok, 4, NULL, &ds);
    assert_int_equal(ds.task, DATA_TASK_CLASSIFICATION);
    assert_int_equal(ds.labels.n, 3);
    assert_int_equal(ds.labels.is_int, 0);
    assert_string_equal(ds.labels.names[0], "neg");
    assert_string_equal(ds.labels.names[1], "neutral");
    assert_string_equal(ds.labels.names[2], "pos");
    assert_int_equal(ds.n, 4);
    const int want_label[4] = {2, 0, 1, 2};
    for (int i = 0; i < 4; i++)
        assert_int_equal(ds.ex[i].label, want_label[i]);
    /* "good film" keeps its first 4 tokens; "bad" is whole */
    assert_example(&ds, 0, "good", 0, 0);
    assert_example(&ds, 1, "bad", 0, 0);
    assert_int_equal(ds.n_truncated, 3); /* "good film", "so so", "great" */
    assert_int_equal(data_count_scored(&ds, NULL, 0), 4);

    size_t idx[2] = {1, 3};
    int tokens[12], targets[12], lengths[3], labels[3];
    pr_error err = {0};
    assert_int_equal(data_make_batch(&ds, idx, 2, 3, 4, tokens, targets, lengths, labels, 0, &err), PR_OK);
    for (int i = 0; i < 12; i++)
        assert_int_equal(targets[i], -1);
    const int want_tok[8] = {'b', 'a', 'd', 0, 'g', 'r', 'e', 'a'};
    for (int i = 0; i < 8; i++)
        assert_int_equal(tokens[i], want_tok[i]);
    /* the pooled position is lengths[b] - 1: the last real token */
    assert_int_equal(lengths[0], 3);
    assert_int_equal(lengths[1], 4);
    assert_int_equal(lengths[2], 0);
    assert_int_equal(labels[0], 0);
    assert_int_equal(labels[1], 2);
    assert_int_equal(labels[2], -1);

    /* validation with the training label set: a known label maps to the
     * training index, an unknown one is an error naming file:line */
    data_options o = {.labels = &ds.labels};
    data_dataset val;
    char *path = temp_file("{\"text\": \"meh\", \"label\": \"neutral\"}\n{\"text\": \"ok\", \"label\": \"pos\"}\n",
                           ".jsonl");
    load_ok(path, NULL, "classification", tok, 4, &o, &val);
    assert_int_equal(val.labels.n, 3);
    assert_int_equal(val.ex[0].label, 1);
    assert_int_equal(val.ex[1].label, 2);
    data_dataset_free(&val);
    unlink(path);
    free(path);

    assert_int_equal(data_load(TRAIN_DIR "cls_val.jsonl", NULL, "classification", tok, 4, &o, &val, &err),
                     PR_ERR_FORMAT);
    assert_non_null(strstr(err.msg, "cls_val.jsonl:2:"));
    assert_non_null(strstr(err.msg, "\"label\""));
    assert_non_null(strstr(err.msg, "terrible"));
    assert_int_equal(val.n, 0);
    data_dataset_free(&ds);
    pr_tokenizer_free(tok);
}

static void test_labels_integers(void **state)
{
    (void)state;
    pr_tokenizer *tok = byte_tok();
    data_dataset ds;
    load_ok(TRAIN_DIR "cls_int.jsonl", NULL, "classification", tok, 8, NULL, &ds);
    assert_int_equal(ds.labels.n, 3); /* 0..2 as given, 1 unused */
    assert_int_equal(ds.labels.is_int, 1);
    assert_string_equal(ds.labels.names[2], "2");
    assert_int_equal(ds.ex[0].label, 2);
    assert_int_equal(ds.ex[1].label, 0);

    /* validation: 3 is outside 0..2; a string label where integers are used */
    data_options o = {.labels = &ds.labels};
    data_dataset val;
    pr_error err = {0};
    char *path = temp_file("{\"text\": \"a\", \"label\": 1}\n{\"text\": \"a\", \"label\": 3}\n", ".jsonl");
    assert_int_equal(data_load(path, NULL, "classification", tok, 8, &o, &val, &err), PR_ERR_FORMAT);
    assert_non_null(strstr(err.msg, ":2:"));
    assert_non_null(strstr(err.msg, "not in the training label set"));
    unlink(path);
    free(path);
    path = temp_file("{\"text\": \"a\", \"label\": \"1\"}\n", ".jsonl");
    assert_int_equal(data_load(path, NULL, "classification", tok, 8, &o, &val, &err), PR_ERR_FORMAT);
    assert_non_null(strstr(err.msg, ":1:"));
    assert_non_null(strstr(err.msg, "integers"));
    unlink(path);
    free(path);
    data_dataset_free(&ds);
    pr_tokenizer_free(tok);
}

/* ---- errors ------------------------------------------------------------------ */

/* Each malformed file gives an error naming file:line (and the field). */
static void test_errors(void **state)
{
    (void)state;
    static const struct {
        const char *text, *task, *line, *want;
        int code;
    } cases[] = {
        {"{\"text\": \"ok\"}\n{\"txt\": \"a\"}\n", "lm", ":2:", "field \"text\" is missing", PR_ERR_FORMAT},
        {"{\"text\": 5}\n", "lm", ":1:", "field \"text\" must be a string, not an integer", PR_ERR_FORMAT},
        {"\n\n{\"text\": \"ok\",}\n", "lm", ":3:", "invalid JSON", PR_ERR_FORMAT},
        {"[1, 2]\n", "lm", ":1:", "must be a JSON object", PR_ERR_FORMAT},
        {"{\"prompt\": \"a\"}\n", "lm", ":1:", "field \"completion\" is missing", PR_ERR_FORMAT},
        {"{\"prompt\": null, \"completion\": \"b\"}\n", "lm", ":1:", "field \"prompt\" must be a string, not null",
         PR_ERR_FORMAT},
        {"{\"text\": \"a\", \"label\": \"x\"}\n{\"text\": \"b\"}\n", "classification", ":2:",
         "field \"label\" is missing", PR_ERR_FORMAT},
        {"{\"text\": \"a\", \"label\": 1.5}\n", "classification", ":1:",
         "field \"label\" must be a string or an integer, not a real number", PR_ERR_FORMAT},
        {"{\"text\": \"a\", \"label\": -1}\n", "classification", ":1:", "field \"label\"", PR_ERR_FORMAT},
        {"{\"text\": \"a\", \"label\": 0}\n{\"text\": \"b\", \"label\": \"x\"}\n", "classification", ":2:",
         "earlier records' labels are integers", PR_ERR_FORMAT},
        {"{\"text\": \"\", \"label\": 0}\n", "classification", ":1:", "field \"text\" gives no tokens",
         PR_ERR_FORMAT},
        {"{\"text\": \"\"}\n\n{\"text\": \"a\"}\n", "lm", ": no examples", "2 records", PR_ERR_FORMAT},
        {"\n \n", "lm", ": no examples", "0 records", PR_ERR_FORMAT},
    };
    pr_tokenizer *tok = byte_tok();
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char *path = temp_file(cases[i].text, ".jsonl");
        data_dataset ds;
        pr_error err = {0};
        int rc = data_load(path, NULL, cases[i].task, tok, 8, NULL, &ds, &err);
        char where[128];
        snprintf(where, sizeof where, "%s%s", path, cases[i].line);
        if (rc != cases[i].code || !strstr(err.msg, where) || !strstr(err.msg, cases[i].want))
            fail_msg("case %zu: rc %d, message \"%s\", wanted \"%s\" and \"%s\"", i, rc, err.msg, where,
                     cases[i].want);
        assert_int_equal(ds.n, 0);
        assert_null(ds.tokens);
        unlink(path);
        free(path);
    }

    /* bad JSON reports jansson's column: the stray '}' is character 15 */
    char *path = temp_file("{\"text\": \"ok\",}\n", ".jsonl");
    data_dataset ds;
    pr_error err = {0};
    assert_int_equal(data_load(path, NULL, "lm", tok, 8, NULL, &ds, &err), PR_ERR_FORMAT);
    char where[128];
    snprintf(where, sizeof where, "%s:1:15: invalid JSON", path);
    if (!strstr(err.msg, where))
        fail_msg("message \"%s\", wanted \"%s\"", err.msg, where);
    unlink(path);
    free(path);

    /* arguments and files */
    assert_int_equal(data_load(TRAIN_DIR "nope.txt", NULL, "lm", tok, 8, NULL, &ds, &err), PR_ERR_NOTFOUND);
    assert_non_null(strstr(err.msg, "nope.txt"));
    assert_int_equal(data_load(TRAIN_DIR "lm.txt", "csv", "lm", tok, 8, NULL, &ds, &err), PR_ERR_INVALID);
    assert_non_null(strstr(err.msg, "\"csv\""));
    assert_int_equal(data_load(TRAIN_DIR "lm.txt", NULL, "regression", tok, 8, NULL, &ds, &err), PR_ERR_INVALID);
    assert_int_equal(data_load(TRAIN_DIR "lm.txt", NULL, "classification", tok, 8, NULL, &ds, &err),
                     PR_ERR_UNSUPPORTED);
    assert_int_equal(data_load(TRAIN_DIR "lm.txt", NULL, "lm", tok, 0, NULL, &ds, &err), PR_ERR_INVALID);
    data_options small = {.max_bytes = 4};
    assert_int_equal(data_load(TRAIN_DIR "lm.txt", NULL, "lm", tok, 8, &small, &ds, &err), PR_ERR_FORMAT);
    pr_tokenizer_free(tok);
}

/* ---- split ----------------------------------------------------------------- */

/* 40 examples "aN" ... each distinct: identify them by their tokens */
static void make_distinct(data_dataset *ds, pr_tokenizer *tok)
{
    char text[40 * 2 + 1];
    for (int i = 0; i < 40; i++) {
        text[2 * i] = (char)('A' + i);
        text[2 * i + 1] = (char)('A' + i);
    }
    text[80] = 0;
    char *path = temp_file(text, ".txt");
    load_ok(path, "text", "lm", tok, 2, NULL, ds); /* windows start every 2 tokens */
    assert_int_equal(ds->n, 40);
    unlink(path);
    free(path);
}

static int first_token(const data_dataset *ds, size_t i)
{
    return ds->tokens[ds->ex[i].off];
}

static void test_split(void **state)
{
    (void)state;
    pr_tokenizer *tok = byte_tok();
    data_dataset ds, tr, va, tr2, va2, tr3, va3;
    make_distinct(&ds, tok);
    pr_error err = {0};
    assert_int_equal(data_split(&ds, 0.25, 42, &tr, &va, &err), PR_OK);
    assert_int_equal(va.n, 10);
    assert_int_equal(tr.n, 30);
    /* disjoint, together all of ds, each in ds's order */
    int seen[256] = {0};
    for (size_t i = 0; i < tr.n; i++) {
        seen[first_token(&tr, i)]++;
        if (i)
            assert_true(first_token(&tr, i) > first_token(&tr, i - 1));
    }
    for (size_t i = 0; i < va.n; i++) {
        seen[first_token(&va, i)]++;
        if (i)
            assert_true(first_token(&va, i) > first_token(&va, i - 1));
    }
    for (size_t i = 0; i < ds.n; i++)
        assert_int_equal(seen[first_token(&ds, i)], 1);
    /* examples are copied whole (the last window has 2 tokens) */
    assert_int_equal(va.ex[0].n, first_token(&va, 0) == 'A' + 39 ? 2 : 3);
    assert_int_equal(va.tokens[va.ex[0].off + 1], first_token(&va, 0));

    /* same seed, same split; another seed, another split */
    assert_int_equal(data_split(&ds, 0.25, 42, &tr2, &va2, &err), PR_OK);
    assert_int_equal(va2.n, va.n);
    for (size_t i = 0; i < va.n; i++)
        assert_int_equal(first_token(&va2, i), first_token(&va, i));
    assert_int_equal(data_split(&ds, 0.25, 43, &tr3, &va3, &err), PR_OK);
    int differ = 0;
    for (size_t i = 0; i < va.n; i++)
        differ |= first_token(&va3, i) != first_token(&va, i);
    assert_true(differ);

    /* bad fractions */
    data_dataset a, b;
    assert_int_equal(data_split(&ds, 0.0, 1, &a, &b, &err), PR_ERR_INVALID);
    assert_int_equal(data_split(&ds, 1.0, 1, &a, &b, &err), PR_ERR_INVALID);

    data_dataset_free(&ds);
    data_dataset_free(&tr);
    data_dataset_free(&va);
    data_dataset_free(&tr2);
    data_dataset_free(&va2);
    data_dataset_free(&tr3);
    data_dataset_free(&va3);
    pr_tokenizer_free(tok);
}

/* labels travel with a split */
static void test_split_labels(void **state)
{
    (void)state;
    pr_tokenizer *tok = byte_tok();
    data_dataset ds, tr, va;
    load_ok(TRAIN_DIR "cls.jsonl", NULL, "classification", tok, 16, NULL, &ds);
    pr_error err = {0};
    assert_int_equal(data_split(&ds, 0.5, 7, &tr, &va, &err), PR_OK);
    assert_int_equal(tr.n + va.n, 4);
    assert_int_equal(va.labels.n, 3);
    assert_string_equal(tr.labels.names[1], "neutral");
    for (size_t i = 0; i < va.n; i++)
        assert_true(va.ex[i].label >= 0 && va.ex[i].label < 3);
    data_dataset_free(&ds);
    data_dataset_free(&tr);
    data_dataset_free(&va);
    pr_tokenizer_free(tok);
}

/* ---- sampler -------------------------------------------------------------- */

static void test_sampler_epochs(void **state)
{
    (void)state;
    data_sampler s;
    pr_error err = {0};
    enum { N = 10 };
    assert_int_equal(data_sampler_init(&s, N, 5, 1, &err), PR_OK);
    size_t e0[N], e1[N];
    data_sampler_next(&s, e0, N);
    data_sampler_next(&s, e1, N);
    uint64_t epoch, cursor;
    data_sampler_get_position(&s, &epoch, &cursor);
    assert_int_equal(epoch, 1);
    assert_int_equal(cursor, N);
    /* each epoch is a permutation, and the second differs from the first */
    int c0[N] = {0}, c1[N] = {0}, same = 1;
    for (int i = 0; i < N; i++) {
        c0[e0[i]]++;
        c1[e1[i]]++;
        same &= e0[i] == e1[i];
    }
    for (int i = 0; i < N; i++) {
        assert_int_equal(c0[i], 1);
        assert_int_equal(c1[i], 1);
    }
    assert_false(same);
    data_sampler_free(&s);

    /* without shuffling every epoch is file order, across epoch ends */
    assert_int_equal(data_sampler_init(&s, 3, 5, 0, &err), PR_OK);
    size_t idx[7];
    data_sampler_next(&s, idx, 7);
    const size_t want[7] = {0, 1, 2, 0, 1, 2, 0};
    for (int i = 0; i < 7; i++)
        assert_int_equal(idx[i], want[i]);
    assert_int_equal(data_sampler_set_position(&s, 0, 4, &err), PR_ERR_INVALID);
    data_sampler_free(&s);
    assert_int_equal(data_sampler_init(&s, 0, 5, 1, &err), PR_ERR_INVALID);
}

/* A position saved after k batches and restored in a fresh sampler gives
 * the same following batches, including across epoch ends. */
static void test_sampler_resume(void **state)
{
    (void)state;
    enum { N = 7, B = 3, K = 4, MORE = 6 };
    data_sampler a, b;
    pr_error err = {0};
    assert_int_equal(data_sampler_init(&a, N, 1234, 1, &err), PR_OK);
    size_t idx[B], rest_a[MORE][B], rest_b[MORE][B];
    for (int k = 0; k < K; k++)
        data_sampler_next(&a, idx, B);
    uint64_t epoch, cursor;
    data_sampler_get_position(&a, &epoch, &cursor);
    assert_int_equal(epoch, (K * B) / N);
    assert_int_equal(cursor, (K * B) % N);
    for (int k = 0; k < MORE; k++)
        data_sampler_next(&a, rest_a[k], B);

    assert_int_equal(data_sampler_init(&b, N, 1234, 1, &err), PR_OK);
    assert_int_equal(data_sampler_set_position(&b, epoch, cursor, &err), PR_OK);
    for (int k = 0; k < MORE; k++)
        data_sampler_next(&b, rest_b[k], B);
    for (int k = 0; k < MORE; k++)
        for (int i = 0; i < B; i++)
            assert_int_equal(rest_a[k][i], rest_b[k][i]);

    /* a different seed orders differently */
    data_sampler c;
    assert_int_equal(data_sampler_init(&c, N, 1235, 1, &err), PR_OK);
    assert_int_equal(data_sampler_set_position(&c, epoch, cursor, &err), PR_OK);
    int differ = 0;
    for (int k = 0; k < MORE; k++) {
        data_sampler_next(&c, idx, B);
        for (int i = 0; i < B; i++)
            differ |= idx[i] != rest_a[k][i];
    }
    assert_true(differ);
    data_sampler_free(&a);
    data_sampler_free(&b);
    data_sampler_free(&c);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_text_chunking),
        cmocka_unit_test(test_format_override),
        cmocka_unit_test(test_jsonl_text_no_eot),
        cmocka_unit_test(test_jsonl_text_eot),
        cmocka_unit_test(test_prompt_completion_masks),
        cmocka_unit_test(test_prompt_completion_eot),
        cmocka_unit_test(test_padding_rows),
        cmocka_unit_test(test_labels_strings),
        cmocka_unit_test(test_labels_integers),
        cmocka_unit_test(test_errors),
        cmocka_unit_test(test_split),
        cmocka_unit_test(test_split_labels),
        cmocka_unit_test(test_sampler_epochs),
        cmocka_unit_test(test_sampler_resume),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
