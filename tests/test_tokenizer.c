/* Tokenizer tests: GPT-2 BPE ids equal to the reference encoder's for every
 * case of tests/data/tokenizer/cases.json (exact), decode inverts encode
 * byte for byte (also for invalid UTF-8 and random bytes), merge order on
 * tiny hand-made vocabularies, the byte tokenizer, the model-directory rule
 * and error messages that name the file and line. */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <jansson.h>

#include "peftref/tokenizer.h"

#define GPT2_DIR TEST_SRCDIR "/data/tokenizer/gpt2"
#define CASES_JSON TEST_SRCDIR "/data/tokenizer/cases.json"

static pr_tokenizer *gpt2_tok;

static int setup_gpt2(void **state)
{
    (void)state;
    pr_error err = {0};
    if (pr_tokenizer_load_bpe(GPT2_DIR "/vocab.json", GPT2_DIR "/merges.txt", &gpt2_tok, &err) != PR_OK) {
        fprintf(stderr, "load: %s\n", err.msg);
        return -1;
    }
    return 0;
}

static int teardown_gpt2(void **state)
{
    (void)state;
    pr_tokenizer_free(gpt2_tok);
    gpt2_tok = NULL;
    return 0;
}

/* Encode then decode; asserts the decode gives text back exactly. */
static void encode_roundtrip(const pr_tokenizer *tok, const char *text, size_t len, int **ids, size_t *n)
{
    pr_error err = {0};
    assert_int_equal(pr_tokenizer_encode(tok, text, len, ids, n, &err), PR_OK);
    char *back = NULL;
    size_t blen = 0;
    assert_int_equal(pr_tokenizer_decode(tok, *ids, *n, &back, &blen, &err), PR_OK);
    assert_int_equal(blen, len);
    assert_memory_equal(back, text, len);
    assert_int_equal(back[blen], '\0');
    free(back);
}

static void test_gpt2_properties(void **state)
{
    (void)state;
    assert_string_equal(pr_tokenizer_kind(gpt2_tok), "gpt2-bpe");
    assert_int_equal(pr_tokenizer_vocab_size(gpt2_tok), 50257);
    assert_int_equal(pr_tokenizer_eot(gpt2_tok), 50256);
    int eot = 50256;
    char *text = NULL;
    size_t len = 0;
    pr_error err = {0};
    assert_int_equal(pr_tokenizer_decode(gpt2_tok, &eot, 1, &text, &len, &err), PR_OK);
    assert_string_equal(text, "<|endoftext|>");
    free(text);
}

/* Every reference case: identical ids, identical bytes after decoding. */
static void test_gpt2_reference_cases(void **state)
{
    (void)state;
    json_error_t jerr;
    json_t *root = json_load_file(CASES_JSON, JSON_ALLOW_NUL, &jerr);
    if (!root)
        fail_msg("%s:%d: %s", CASES_JSON, jerr.line, jerr.text);
    json_t *cases = json_object_get(root, "cases");
    assert_true(json_is_array(cases));
    assert_true(json_array_size(cases) >= 100);
    size_t i, total_ids = 0;
    json_t *c;
    json_array_foreach(cases, i, c) {
        const char *name = json_string_value(json_object_get(c, "name"));
        json_t *jt = json_object_get(c, "text"), *jids = json_object_get(c, "ids");
        assert_non_null(name);
        assert_true(json_is_string(jt) && json_is_array(jids));
        int *ids = NULL;
        size_t n = 0;
        encode_roundtrip(gpt2_tok, json_string_value(jt), json_string_length(jt), &ids, &n);
        if (n != json_array_size(jids))
            fail_msg("case \"%s\": %zu ids, reference has %zu", name, n, json_array_size(jids));
        for (size_t k = 0; k < n; k++) {
            int want = (int)json_integer_value(json_array_get(jids, k));
            if (ids[k] != want)
                fail_msg("case \"%s\": id %zu is %d, reference has %d", name, k, ids[k], want);
        }
        total_ids += n;
        free(ids);
    }
    assert_true(total_ids > 1000);
    json_decref(root);
}

/* Bytes that are not UTF-8 still encode, each as one "other" character,
 * and decode back. */
static void test_gpt2_invalid_utf8(void **state)
{
    (void)state;
    static const char *const texts[] = {
        "\xff\xfe", "abc\x80" "def", "trunc \xc3", "\xc3(", "surrogate \xed\xa0\x80!", "overlong \xc0\xaf \xe0\x80\xaf",
        "big \xf4\x90\x80\x80", "caf\xc3\xa9 \xe9t\xe9 \xa0\xa0 ok", " \x80\x81\x82 \xff's", "\xf0\x9f\x98", "\n\xfe\n",
    };
    for (size_t t = 0; t < sizeof texts / sizeof texts[0]; t++) {
        int *ids = NULL;
        size_t n = 0;
        encode_roundtrip(gpt2_tok, texts[t], strlen(texts[t]), &ids, &n);
        assert_true(n >= 1);
        free(ids);
    }
    /* "a\xffb": the invalid byte is its own pre-token, the token of byte
     * 0xFF, which GPT-2's alphabet spells U+00FF ("\xc3\xbf" in vocab.json). */
    json_error_t jerr;
    json_t *vocab = json_load_file(GPT2_DIR "/vocab.json", 0, &jerr);
    assert_non_null(vocab);
    int ff = (int)json_integer_value(json_object_get(vocab, "\xc3\xbf"));
    json_decref(vocab);
    assert_true(ff > 0);
    int *ids = NULL;
    size_t n = 0;
    encode_roundtrip(gpt2_tok, "a\xff" "b", 3, &ids, &n);
    assert_int_equal(n, 3);
    assert_int_equal(ids[0], 64);
    assert_int_equal(ids[1], ff);
    assert_int_equal(ids[2], 65);
    free(ids);
}

static uint32_t lcg(uint32_t *s)
{
    *s = *s * 1664525u + 1013904223u;
    return *s >> 8;
}

static void test_gpt2_random_bytes(void **state)
{
    (void)state;
    uint32_t seed = 7;
    enum { LEN = 8192 };
    char *buf = malloc(LEN);
    assert_non_null(buf);
    for (int round = 0; round < 3; round++) {
        for (size_t i = 0; i < LEN; i++) {
            uint32_t r = lcg(&seed);
            /* round 0: any byte; 1: mostly ASCII; 2: mostly high bytes */
            buf[i] = (char)(round == 0 ? r & 0xFF : round == 1 ? (r % 7 ? 32 + r % 95 : r & 0xFF) : 0x80 | (r & 0x7F));
        }
        int *ids = NULL;
        size_t n = 0;
        encode_roundtrip(gpt2_tok, buf, LEN, &ids, &n);
        for (size_t k = 0; k < n; k++)
            assert_true(ids[k] >= 0 && ids[k] < 50257);
        free(ids);
    }
    free(buf);
}

static void test_gpt2_decode_errors(void **state)
{
    (void)state;
    int bad[] = {15496, 50257};
    char *text = NULL;
    size_t len = 0;
    pr_error err = {0};
    assert_int_equal(pr_tokenizer_decode(gpt2_tok, bad, 2, &text, &len, &err), PR_ERR_INVALID);
    assert_non_null(strstr(err.msg, "50257"));
    assert_null(text);
    bad[1] = -1;
    assert_int_equal(pr_tokenizer_decode(gpt2_tok, bad, 2, &text, &len, &err), PR_ERR_INVALID);
    /* decoding nothing gives an empty string */
    assert_int_equal(pr_tokenizer_decode(gpt2_tok, bad, 0, &text, &len, &err), PR_OK);
    assert_int_equal(len, 0);
    assert_string_equal(text, "");
    free(text);
}

static void test_byte_tokenizer(void **state)
{
    (void)state;
    pr_tokenizer *tok = NULL;
    pr_error err = {0};
    assert_int_equal(pr_tokenizer_byte(&tok, &err), PR_OK);
    assert_string_equal(pr_tokenizer_kind(tok), "byte");
    assert_int_equal(pr_tokenizer_vocab_size(tok), 256);
    assert_int_equal(pr_tokenizer_eot(tok), -1);
    char all[256];
    for (int b = 0; b < 256; b++)
        all[b] = (char)b;
    int *ids = NULL;
    size_t n = 0;
    encode_roundtrip(tok, all, 256, &ids, &n);
    assert_int_equal(n, 256);
    for (int b = 0; b < 256; b++)
        assert_int_equal(ids[b], b);
    free(ids);
    encode_roundtrip(tok, "", 0, &ids, &n);
    assert_int_equal(n, 0);
    free(ids);
    int bad = 256;
    char *text = NULL;
    size_t len = 0;
    assert_int_equal(pr_tokenizer_decode(tok, &bad, 1, &text, &len, &err), PR_ERR_INVALID);
    pr_tokenizer_free(tok);
}

/* ---- hand-made vocabularies in a temporary directory ---------------------- */

static void write_file(const char *dir, const char *name, const char *text)
{
    char path[512];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(text, 1, strlen(text), f), strlen(text));
    assert_int_equal(fclose(f), 0);
}

static void remove_file(const char *dir, const char *name)
{
    char path[512];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    unlink(path);
}

/* vocab.json with the 256 byte tokens (id = byte, spelled in GPT-2's byte
 * alphabet) followed by extra (NULL-terminated), ids 256, 257, ... */
static void write_byte_vocab(const char *dir, const char *const *extra)
{
    json_t *v = json_object();
    int n = 0;
    for (int b = 0; b < 256; b++) {
        int printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
        unsigned cp = printable ? (unsigned)b : 256u + (unsigned)n++;
        char key[3] = {0};
        if (cp < 0x80) {
            key[0] = (char)cp;
        } else {
            key[0] = (char)(0xC0 | cp >> 6);
            key[1] = (char)(0x80 | (cp & 0x3F));
        }
        json_object_set_new(v, key, json_integer(b));
    }
    for (int i = 0; extra && extra[i]; i++)
        json_object_set_new(v, extra[i], json_integer(256 + i));
    char path[512];
    snprintf(path, sizeof path, "%s/vocab.json", dir);
    assert_int_equal(json_dump_file(v, path, 0), 0);
    json_decref(v);
}

static char tmpdir[64];

static int setup_tmpdir(void **state)
{
    (void)state;
    strcpy(tmpdir, "/tmp/peftref-tok-XXXXXX");
    return mkdtemp(tmpdir) ? 0 : -1;
}

static int teardown_tmpdir(void **state)
{
    (void)state;
    remove_file(tmpdir, "vocab.json");
    remove_file(tmpdir, "merges.txt");
    remove_file(tmpdir, "config.json");
    return rmdir(tmpdir);
}

static void expect_ids(const pr_tokenizer *tok, const char *text, const int *want, size_t n_want)
{
    int *ids = NULL;
    size_t n = 0;
    encode_roundtrip(tok, text, strlen(text), &ids, &n);
    assert_int_equal(n, n_want);
    for (size_t k = 0; k < n; k++)
        if (ids[k] != want[k])
            fail_msg("\"%s\": id %zu is %d, expected %d", text, k, ids[k], want[k]);
    free(ids);
}

/* GPT-2 merges every occurrence of the best pair, left to right, before it
 * considers the pairs those merges create, even better-ranked ones. */
static void test_merge_order(void **state)
{
    (void)state;
    static const char *const extra[] = {"ab", "aba", "aa", "aaaa", NULL}; /* 256..259 */
    write_byte_vocab(tmpdir, extra);
    write_file(tmpdir, "merges.txt", "#version: 0.2\nab a\na b\r\na a\naa aa\n\n");
    pr_tokenizer *tok = NULL;
    pr_error err = {0};
    if (pr_tokenizer_load(tmpdir, &tok, &err) != PR_OK)
        fail_msg("%s", err.msg);
    assert_string_equal(pr_tokenizer_kind(tok), "gpt2-bpe");
    assert_int_equal(pr_tokenizer_vocab_size(tok), 260);
    assert_int_equal(pr_tokenizer_eot(tok), -1);
    /* "abab": (a,b) is merged twice -> ab ab; (ab,a) would rank better but
     * only appears mid-round */
    expect_ids(tok, "abab", (const int[]){256, 256}, 2);
    /* "aba": (a,b) -> ab a -> (ab,a) -> aba */
    expect_ids(tok, "aba", (const int[]){257}, 1);
    /* left to right without overlap: aaa -> aa a; aaaa -> aa aa -> aaaa */
    expect_ids(tok, "aaa", (const int[]){258, 'a'}, 2);
    expect_ids(tok, "aaaaa", (const int[]){259, 'a'}, 2);
    /* " ab" is one pre-token; its space has no merge */
    expect_ids(tok, "a ab", (const int[]){'a', ' ', 256}, 3);
    pr_tokenizer_free(tok);
}

static void test_dir_rule(void **state)
{
    (void)state;
    pr_tokenizer *tok = NULL;
    pr_error err = {0};
    /* the GPT-2 fixture directory */
    assert_int_equal(pr_tokenizer_load(GPT2_DIR, &tok, &err), PR_OK);
    assert_string_equal(pr_tokenizer_kind(tok), "gpt2-bpe");
    pr_tokenizer_free(tok);
    /* an empty directory: byte tokenizer */
    assert_int_equal(pr_tokenizer_load(tmpdir, &tok, &err), PR_OK);
    assert_string_equal(pr_tokenizer_kind(tok), "byte");
    pr_tokenizer_free(tok);
    /* config.json without the key changes nothing */
    write_file(tmpdir, "config.json", "{\"n_layer\": 2}");
    assert_int_equal(pr_tokenizer_load(tmpdir, &tok, &err), PR_OK);
    assert_string_equal(pr_tokenizer_kind(tok), "byte");
    pr_tokenizer_free(tok);
    /* config.json "byte" wins over present BPE files */
    write_byte_vocab(tmpdir, NULL);
    write_file(tmpdir, "merges.txt", "#version: 0.2\n");
    write_file(tmpdir, "config.json", "{\"peftref_tokenizer\": \"byte\"}");
    assert_int_equal(pr_tokenizer_load(tmpdir, &tok, &err), PR_OK);
    assert_string_equal(pr_tokenizer_kind(tok), "byte");
    pr_tokenizer_free(tok);
    /* "gpt2-bpe" uses them */
    write_file(tmpdir, "config.json", "{\"peftref_tokenizer\": \"gpt2-bpe\"}");
    assert_int_equal(pr_tokenizer_load(tmpdir, &tok, &err), PR_OK);
    assert_string_equal(pr_tokenizer_kind(tok), "gpt2-bpe");
    assert_int_equal(pr_tokenizer_vocab_size(tok), 256);
    pr_tokenizer_free(tok);
    /* ... and needs them */
    remove_file(tmpdir, "merges.txt");
    tok = NULL;
    assert_int_equal(pr_tokenizer_load(tmpdir, &tok, &err), PR_ERR_NOTFOUND);
    assert_non_null(strstr(err.msg, "merges.txt"));
    assert_null(tok);
    /* only one of the two files, no config: an error naming the other */
    remove_file(tmpdir, "config.json");
    assert_int_equal(pr_tokenizer_load(tmpdir, &tok, &err), PR_ERR_NOTFOUND);
    assert_non_null(strstr(err.msg, "merges.txt"));
    remove_file(tmpdir, "vocab.json");
    write_file(tmpdir, "merges.txt", "#version: 0.2\n");
    assert_int_equal(pr_tokenizer_load(tmpdir, &tok, &err), PR_ERR_NOTFOUND);
    assert_non_null(strstr(err.msg, "vocab.json"));
    remove_file(tmpdir, "merges.txt");
    /* an unknown kind, a bad config.json, a missing directory */
    write_file(tmpdir, "config.json", "{\"peftref_tokenizer\": \"sentencepiece\"}");
    assert_int_equal(pr_tokenizer_load(tmpdir, &tok, &err), PR_ERR_INVALID);
    assert_non_null(strstr(err.msg, "config.json"));
    assert_non_null(strstr(err.msg, "sentencepiece"));
    write_file(tmpdir, "config.json", "{\"peftref_tokenizer\": ");
    assert_int_equal(pr_tokenizer_load(tmpdir, &tok, &err), PR_ERR_FORMAT);
    assert_non_null(strstr(err.msg, "config.json"));
    remove_file(tmpdir, "config.json");
    assert_int_equal(pr_tokenizer_load(TEST_SRCDIR "/data/tokenizer/no-such-dir", &tok, &err), PR_ERR_NOTFOUND);
    assert_non_null(strstr(err.msg, "no-such-dir"));
    assert_null(tok);
}

static void test_load_errors(void **state)
{
    (void)state;
    char vocab[512], merges[512];
    snprintf(vocab, sizeof vocab, "%s/vocab.json", tmpdir);
    snprintf(merges, sizeof merges, "%s/merges.txt", tmpdir);
    pr_tokenizer *tok = NULL;
    pr_error err = {0};

    /* malformed merge lines name the file and the line */
    static const char *const extra[] = {"ab", NULL};
    write_byte_vocab(tmpdir, extra);
    write_file(tmpdir, "merges.txt", "#version: 0.2\na b\nab\n");
    assert_int_equal(pr_tokenizer_load_bpe(vocab, merges, &tok, &err), PR_ERR_FORMAT);
    assert_non_null(strstr(err.msg, "merges.txt:3:"));
    assert_null(tok);
    write_file(tmpdir, "merges.txt", "a b\n\na b c\n");
    assert_int_equal(pr_tokenizer_load_bpe(vocab, merges, &tok, &err), PR_ERR_FORMAT);
    assert_non_null(strstr(err.msg, "merges.txt:3:"));
    /* a merge whose result is not a token */
    write_file(tmpdir, "merges.txt", "#version: 0.2\na b\nb c\n");
    assert_int_equal(pr_tokenizer_load_bpe(vocab, merges, &tok, &err), PR_ERR_FORMAT);
    assert_non_null(strstr(err.msg, "merges.txt:3:"));
    assert_non_null(strstr(err.msg, "bc"));
    /* a missing merges file */
    remove_file(tmpdir, "merges.txt");
    assert_int_equal(pr_tokenizer_load_bpe(vocab, merges, &tok, &err), PR_ERR_NOTFOUND);
    assert_non_null(strstr(err.msg, "merges.txt"));

    /* vocab.json: bad JSON (with its line), wrong shape, missing bytes */
    write_file(tmpdir, "merges.txt", "#version: 0.2\n");
    write_file(tmpdir, "vocab.json", "{\"a\": 0,\n\"b\": }");
    assert_int_equal(pr_tokenizer_load_bpe(vocab, merges, &tok, &err), PR_ERR_FORMAT);
    assert_non_null(strstr(err.msg, "vocab.json:2:"));
    write_file(tmpdir, "vocab.json", "[1, 2]");
    assert_int_equal(pr_tokenizer_load_bpe(vocab, merges, &tok, &err), PR_ERR_FORMAT);
    assert_non_null(strstr(err.msg, "vocab.json"));
    write_file(tmpdir, "vocab.json", "{\"a\": \"zero\"}");
    assert_int_equal(pr_tokenizer_load_bpe(vocab, merges, &tok, &err), PR_ERR_FORMAT);
    assert_non_null(strstr(err.msg, "vocab.json"));
    write_file(tmpdir, "vocab.json", "{\"a\": 0, \"b\": 0}");
    assert_int_equal(pr_tokenizer_load_bpe(vocab, merges, &tok, &err), PR_ERR_FORMAT);
    assert_non_null(strstr(err.msg, "vocab.json"));
    write_file(tmpdir, "vocab.json", "{\"a\": 0, \"b\": 1}");
    assert_int_equal(pr_tokenizer_load_bpe(vocab, merges, &tok, &err), PR_ERR_FORMAT);
    assert_non_null(strstr(err.msg, "vocab.json"));
    assert_non_null(strstr(err.msg, "byte 0x00"));
    remove_file(tmpdir, "vocab.json");
    assert_int_equal(pr_tokenizer_load_bpe(vocab, merges, &tok, &err), PR_ERR_NOTFOUND);
    assert_non_null(strstr(err.msg, "vocab.json"));
    remove_file(tmpdir, "merges.txt");
    assert_null(tok);
}

int main(void)
{
    const struct CMUnitTest gpt2[] = {
        cmocka_unit_test(test_gpt2_properties),
        cmocka_unit_test(test_gpt2_reference_cases),
        cmocka_unit_test(test_gpt2_invalid_utf8),
        cmocka_unit_test(test_gpt2_random_bytes),
        cmocka_unit_test(test_gpt2_decode_errors),
    };
    const struct CMUnitTest other[] = {
        cmocka_unit_test(test_byte_tokenizer),
        cmocka_unit_test_setup_teardown(test_merge_order, setup_tmpdir, teardown_tmpdir),
        cmocka_unit_test_setup_teardown(test_dir_rule, setup_tmpdir, teardown_tmpdir),
        cmocka_unit_test_setup_teardown(test_load_errors, setup_tmpdir, teardown_tmpdir),
    };
    int failed = cmocka_run_group_tests_name("gpt2 bpe", gpt2, setup_gpt2, teardown_gpt2);
    failed += cmocka_run_group_tests_name("tokenizers", other, NULL, NULL);
    return failed ? 1 : 0;
}
