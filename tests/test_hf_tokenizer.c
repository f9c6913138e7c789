/* Hugging Face tokenizer.json tests: for three real files (Llama 3, Qwen3
 * and a Llama 2 / SentencePiece-style BPE, tests/data/tokenizer/hf/NOTICE)
 * peftref's ids equal those of the Hugging Face tokenizers library for
 * every case of tests/data/tokenizer/hf/NAME/cases.json (exact), its decode
 * equals the library's, decode(encode(x)) == x wherever the library
 * round-trips too, the ~1 MB text gives the library's id count, hash and
 * ends (timed, printed only); bos/eos/add_bos come from
 * tokenizer_config.json as the library's post-processor adds them; invalid
 * UTF-8 bytes encode to byte tokens and decode back; malformed files give
 * errors naming the file and JSON path.  The files are decompressed into
 * the build tree by make (HF_TOK_DIR). */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <jansson.h>

#include "peftref/tokenizer.h"

#define CASES_DIR TEST_SRCDIR "/data/tokenizer/hf"

typedef struct model {
    const char *name;
    pr_tokenizer *tok;
    json_t *doc;
} model;

static model models[] = {{"llama3", NULL, NULL}, {"qwen3", NULL, NULL}, {"llama2", NULL, NULL}};
enum { LLAMA3 = 0, QWEN3, LLAMA2 };

static int setup(void **state)
{
    for (int i = 0; i < 3; i++) {
        char dir[1024], path[1100];
        snprintf(dir, sizeof dir, "%s/%s", HF_TOK_DIR, models[i].name);
        pr_error err = {0};
        if (pr_tokenizer_load(dir, &models[i].tok, &err) != PR_OK) {
            fprintf(stderr, "load %s: %s\n", dir, err.msg);
            return -1;
        }
        snprintf(path, sizeof path, "%s/%s/cases.json", CASES_DIR, models[i].name);
        json_error_t jerr;
        models[i].doc = json_load_file(path, 0, &jerr);
        if (!models[i].doc) {
            fprintf(stderr, "%s:%d: %s\n", path, jerr.line, jerr.text);
            return -1;
        }
    }
    *state = models;
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    for (int i = 0; i < 3; i++) {
        pr_tokenizer_free(models[i].tok);
        json_decref(models[i].doc);
        models[i].tok = NULL;
        models[i].doc = NULL;
    }
    return 0;
}

static void print_ids(const char *what, const int *ids, size_t n)
{
    fprintf(stderr, "  %s (%zu):", what, n);
    for (size_t i = 0; i < n && i < 80; i++)
        fprintf(stderr, " %d", ids[i]);
    fprintf(stderr, "%s\n", n > 80 ? " ..." : "");
}

static int hexval(char c)
{
    return c >= '0' && c <= '9' ? c - '0' : c - 'a' + 10;
}

/* Every case: ids equal to the library's, decode equal to its decode, and
 * decode(encode(x)) == x whenever the library's decode gives x back. */
static void check_cases(int m)
{
    model *md = &models[m];
    json_t *cases = json_object_get(md->doc, "cases");
    assert_true(json_array_size(cases) > 150);
    size_t bad = 0, n_round = 0;
    for (size_t c = 0; c < json_array_size(cases); c++) {
        json_t *cs = json_array_get(cases, c);
        const char *name = json_string_value(json_object_get(cs, "name"));
        json_t *text = json_object_get(cs, "text"), *want = json_object_get(cs, "ids");
        const char *dec_want = json_string_value(json_object_get(cs, "decoded"));
        pr_error err = {0};
        int *ids = NULL;
        size_t n = 0;
        assert_int_equal(pr_tokenizer_encode(md->tok, json_string_value(text), json_string_length(text), &ids, &n, &err),
                         PR_OK);
        int same = n == json_array_size(want);
        for (size_t i = 0; same && i < n; i++)
            same = ids[i] == json_integer_value(json_array_get(want, i));
        if (!same) {
            fprintf(stderr, "%s: case '%s': ids differ from the library's\n", md->name, name);
            print_ids("peftref", ids, n);
            int *w = malloc((json_array_size(want) + 1) * sizeof *w);
            for (size_t i = 0; i < json_array_size(want); i++)
                w[i] = (int)json_integer_value(json_array_get(want, i));
            print_ids("library", w, json_array_size(want));
            free(w);
            bad++;
        }
        char *back = NULL;
        size_t blen = 0;
        assert_int_equal(pr_tokenizer_decode(md->tok, ids, n, &back, &blen, &err), PR_OK);
        if (blen != strlen(dec_want) || memcmp(back, dec_want, blen) != 0) {
            fprintf(stderr, "%s: case '%s': decode differs from the library's: \"%s\" vs \"%s\"\n", md->name, name, back,
                    dec_want);
            bad++;
        }
        if (strcmp(dec_want, json_string_value(text)) == 0) {
            n_round++;
            assert_int_equal(blen, json_string_length(text));
            assert_memory_equal(back, json_string_value(text), blen);
        }
        free(back);
        free(ids);
    }
    fprintf(stderr, "%s: %zu cases, %zu round-trip in the library and in peftref\n", md->name, json_array_size(cases),
            n_round);
    assert_int_equal(bad, 0);
    assert_true(n_round > 100);
}

static void test_cases_llama3(void **state)
{
    (void)state;
    check_cases(LLAMA3);
}

static void test_cases_qwen3(void **state)
{
    (void)state;
    check_cases(QWEN3);
}

static void test_cases_llama2(void **state)
{
    (void)state;
    check_cases(LLAMA2);
}

/* Raw invalid UTF-8 (the library cannot take it): each invalid byte is one
 * character; it encodes to its byte's token (byte-level vocabularies) or
 * its <0xHH> byte-fallback token (Llama 2), and decodes back exactly. */
static void test_invalid_bytes(void **state)
{
    (void)state;
    for (int m = 0; m < 3; m++) {
        json_t *cases = json_object_get(models[m].doc, "cases");
        size_t seen = 0;
        for (size_t c = 0; c < json_array_size(cases); c++) {
            const char *hex = json_string_value(json_object_get(json_array_get(cases, c), "bytes_hex"));
            if (!hex)
                continue;
            seen++;
            size_t len = strlen(hex) / 2;
            char *raw = malloc(len + 1);
            for (size_t i = 0; i < len; i++)
                raw[i] = (char)(hexval(hex[2 * i]) << 4 | hexval(hex[2 * i + 1]));
            pr_error err = {0};
            int *ids = NULL;
            size_t n = 0;
            assert_int_equal(pr_tokenizer_encode(models[m].tok, raw, len, &ids, &n, &err), PR_OK);
            char *back = NULL;
            size_t blen = 0;
            assert_int_equal(pr_tokenizer_decode(models[m].tok, ids, n, &back, &blen, &err), PR_OK);
            assert_int_equal(blen, len);
            assert_memory_equal(back, raw, len);
            free(back);
            free(ids);
            free(raw);
        }
        assert_int_equal(seen, 8);
    }
    /* a lone 0xFF: Llama 2 gives <0xFF> after its "▁" */
    int *ids = NULL;
    size_t n = 0;
    pr_error err = {0};
    assert_int_equal(pr_tokenizer_encode(models[LLAMA2].tok, "\xff", 1, &ids, &n, &err), PR_OK);
    assert_int_equal(n, 2);
    char *s = NULL;
    size_t sl = 0;
    assert_int_equal(pr_tokenizer_decode(models[LLAMA2].tok, ids + 1, 1, &s, &sl, &err), PR_OK);
    assert_int_equal(sl, 1);
    assert_int_equal((unsigned char)s[0], 0xFF);
    free(s);
    free(ids);
}

static uint64_t fnv1a64(const int *ids, size_t n)
{
    uint64_t h = 0xcbf29ce484222325ULL;
    for (size_t i = 0; i < n; i++)
        for (int k = 0; k < 4; k++) {
            h ^= (uint32_t)ids[i] >> (8 * k) & 0xFF;
            h *= 0x100000001b3ULL;
        }
    return h;
}

static char *read_file(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    fseek(f, 0, SEEK_END);
    long sz = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *buf = malloc((size_t)sz + 1);
    if (buf && fread(buf, 1, (size_t)sz, f) != (size_t)sz) {
        free(buf);
        buf = NULL;
    }
    fclose(f);
    *len = (size_t)sz;
    return buf;
}

/* The ~1 MB text: id count, hash and both ends as the library's.  The time
 * is printed, not asserted. */
static void test_big_text(void **state)
{
    (void)state;
    size_t len = 0;
    char *text = read_file(HF_TOK_DIR "/big.txt", &len);
    assert_non_null(text);
    for (int m = 0; m < 3; m++) {
        json_t *big = json_object_get(models[m].doc, "big");
        assert_int_equal(len, json_integer_value(json_object_get(big, "bytes")));
        pr_error err = {0};
        int *ids = NULL;
        size_t n = 0;
        struct timespec t0, t1;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        assert_int_equal(pr_tokenizer_encode(models[m].tok, text, len, &ids, &n, &err), PR_OK);
        clock_gettime(CLOCK_MONOTONIC, &t1);
        double secs = (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec);
        fprintf(stderr, "%s: %zu bytes -> %zu ids in %.3f s (%.2f MB/s)\n", models[m].name, len, n, secs,
                (double)len / 1e6 / secs);
        assert_int_equal(n, json_integer_value(json_object_get(big, "n_ids")));
        json_t *first = json_object_get(big, "first"), *last = json_object_get(big, "last");
        assert_int_equal(json_array_size(first), 200);
        for (size_t i = 0; i < 200; i++) {
            assert_int_equal(ids[i], json_integer_value(json_array_get(first, i)));
            assert_int_equal(ids[n - 200 + i], json_integer_value(json_array_get(last, i)));
        }
        char hex[17];
        snprintf(hex, sizeof hex, "%016llx", (unsigned long long)fnv1a64(ids, n));
        assert_string_equal(hex, json_string_value(json_object_get(big, "fnv1a64")));
        free(ids);
    }
    free(text);
}

/* bos/eos/add_bos: from tokenizer_config.json; add_bos agrees with what
 * the library's post-processor adds to "Hello". */
static void test_special_ids(void **state)
{
    (void)state;
    const int bos[3] = {128000, -1, 1}, eos[3] = {128001, 151645, 2};
    for (int m = 0; m < 3; m++) {
        const pr_tokenizer *t = models[m].tok;
        assert_string_equal(pr_tokenizer_kind(t), "hf-bpe");
        assert_int_equal(pr_tokenizer_bos(t), bos[m]);
        assert_int_equal(pr_tokenizer_eot(t), eos[m]);
        json_t *with = json_object_get(models[m].doc, "hello_with_special_tokens");
        json_t *without = json_object_get(models[m].doc, "hello_without_special_tokens");
        int lib_adds_bos = json_array_size(with) == json_array_size(without) + 1 &&
                           json_integer_value(json_array_get(with, 0)) == bos[m];
        assert_int_equal(pr_tokenizer_add_bos(t), lib_adds_bos);
    }
    assert_int_equal(pr_tokenizer_add_bos(models[LLAMA2].tok), 1);
    assert_int_equal(pr_tokenizer_vocab_size(models[LLAMA3].tok), 128256);
    assert_int_equal(pr_tokenizer_vocab_size(models[QWEN3].tok), 151669);
    assert_int_equal(pr_tokenizer_vocab_size(models[LLAMA2].tok), 32000);
}

/* ---- malformed files ---------------------------------------------------- */

static char tmpdir[256];

static void write_file(const char *path, const char *data, size_t n)
{
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(data, 1, n, f), n);
    fclose(f);
}

/* Load a tokenizer.json made of text; expects failure with a message
 * holding "tokenizer.json" and want. */
static void expect_error(const char *json, const char *want)
{
    char path[400];
    snprintf(path, sizeof path, "%s/tokenizer.json", tmpdir);
    write_file(path, json, strlen(json));
    pr_tokenizer *t = NULL;
    pr_error err = {0};
    int rc = pr_tokenizer_load(tmpdir, &t, &err);
    if (rc == PR_OK || !strstr(err.msg, "tokenizer.json") || !strstr(err.msg, want))
        fprintf(stderr, "for %.100s: rc %d, message \"%s\", wanted \"%s\"\n", json, rc, err.msg, want);
    assert_int_not_equal(rc, PR_OK);
    assert_null(t);
    assert_non_null(strstr(err.msg, "tokenizer.json"));
    assert_non_null(strstr(err.msg, want));
}

#define OK_MODEL "\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0, \"b\": 1, \"ab\": 2}, \"merges\": [\"a b\"]}"
#define OK_DEC "\"decoder\": {\"type\": \"ByteLevel\"}, \"pre_tokenizer\": {\"type\": \"ByteLevel\"}"

static void test_malformed(void **state)
{
    (void)state;
    snprintf(tmpdir, sizeof tmpdir, "/tmp/peftref-hftok-%ld", (long)getpid());
    mkdir(tmpdir, 0700);
    /* truncated: a real file cut short */
    size_t len = 0;
    char *full = read_file(HF_TOK_DIR "/llama2/tokenizer.json", &len);
    assert_non_null(full);
    char path[400];
    snprintf(path, sizeof path, "%s/tokenizer.json", tmpdir);
    write_file(path, full, len / 2);
    free(full);
    pr_tokenizer *t = NULL;
    pr_error err = {0};
    assert_int_equal(pr_tokenizer_load(tmpdir, &t, &err), PR_ERR_FORMAT);
    assert_non_null(strstr(err.msg, "tokenizer.json:"));
    assert_non_null(strstr(err.msg, "bad JSON"));

    expect_error("[1, 2]", "expected a JSON object");
    expect_error("{\"model\": {\"type\": \"Unigram\", \"vocab\": []}, " OK_DEC "}",
                 "model.type 'Unigram' is not supported (BPE only)");
    expect_error("{\"model\": {\"type\": \"WordPiece\"}, " OK_DEC "}", "model.type 'WordPiece'");
    expect_error("{\"model\": {\"vocab\": {}}, " OK_DEC "}", "model.type is missing");
    expect_error("{\"model\": {\"type\": \"BPE\", \"vocab\": [1], \"merges\": []}, " OK_DEC "}",
                 "model.vocab must be an object");
    expect_error("{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": \"x\"}, \"merges\": []}, " OK_DEC "}",
                 "model.vocab[\"a\"]: id must be an integer");
    expect_error("{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0}, \"merges\": {}}, " OK_DEC "}",
                 "model.merges must be an array");
    expect_error("{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0}, \"merges\": [7]}, " OK_DEC "}",
                 "model.merges[0] must be a string");
    expect_error("{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0, \"b\": 1}, \"merges\": [\"a b\"]}, " OK_DEC "}",
                 "model.merges[0]: merged token \"ab\" is not in model.vocab");
    expect_error("{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0}, \"merges\": [[\"a\", \"c\"]]}, " OK_DEC "}",
                 "model.merges[0]: token \"c\" is not in model.vocab");
    expect_error("{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0}, \"merges\": [], \"dropout\": 0.1}, " OK_DEC "}",
                 "model.dropout must be null");
    expect_error("{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0}, \"merges\": [], \"fuse_unk\": 1}, " OK_DEC "}",
                 "model.fuse_unk must be a boolean");
    expect_error("{" OK_MODEL ", \"normalizer\": {\"type\": \"NFKC\"}, " OK_DEC "}", "normalizer.type 'NFKC' is not supported");
    expect_error("{" OK_MODEL ", \"normalizer\": {\"type\": \"Sequence\", \"normalizers\": [{\"type\": \"Lowercase\"}]}, " OK_DEC "}",
                 "normalizer.normalizers[0].type 'Lowercase' is not supported");
    expect_error("{" OK_MODEL ", \"decoder\": {\"type\": \"ByteLevel\"}, \"pre_tokenizer\": {\"type\": \"Split\", "
                 "\"pattern\": {\"Regex\": \"\\\\w+\"}, \"behavior\": \"Isolated\"}}",
                 "pre_tokenizer.pattern.Regex \"\\w+\" is not supported");
    expect_error("{" OK_MODEL ", \"decoder\": {\"type\": \"ByteLevel\"}, \"pre_tokenizer\": {\"type\": \"Whitespace\"}}",
                 "pre_tokenizer.type 'Whitespace' is not supported");
    expect_error("{" OK_MODEL ", \"pre_tokenizer\": {\"type\": \"ByteLevel\"}, \"decoder\": {\"type\": \"WordPiece\"}}",
                 "decoder.type 'WordPiece' is not supported");
    expect_error("{" OK_MODEL ", \"pre_tokenizer\": {\"type\": \"ByteLevel\"}}", "decoder null is not supported");
    expect_error("{" OK_MODEL ", " OK_DEC ", \"added_tokens\": [{\"id\": \"x\", \"content\": \"<s>\"}]}",
                 "added_tokens[0].id must be an integer");
    expect_error("{" OK_MODEL ", " OK_DEC ", \"added_tokens\": [{\"id\": 5, \"content\": \"<s>\", \"single_word\": true}]}",
                 "added_tokens[0].single_word true is not supported");

    /* tokenizer_config.json: a bos_token that is nowhere */
    snprintf(path, sizeof path, "%s/tokenizer.json", tmpdir);
    const char *ok = "{" OK_MODEL ", " OK_DEC "}";
    write_file(path, ok, strlen(ok));
    snprintf(path, sizeof path, "%s/tokenizer_config.json", tmpdir);
    const char *cfg = "{\"bos_token\": {\"content\": \"<nope>\"}}";
    write_file(path, cfg, strlen(cfg));
    assert_int_equal(pr_tokenizer_load(tmpdir, &t, &err), PR_ERR_FORMAT);
    assert_non_null(strstr(err.msg, "tokenizer_config.json: bos_token \"<nope>\""));
    cfg = "{\"bos_token\": \"ab\", \"eos_token\": null, \"add_bos_token\": true}";
    write_file(path, cfg, strlen(cfg));
    assert_int_equal(pr_tokenizer_load(tmpdir, &t, &err), PR_OK);
    assert_int_equal(pr_tokenizer_bos(t), 2);
    assert_int_equal(pr_tokenizer_eot(t), -1);
    assert_int_equal(pr_tokenizer_add_bos(t), 1);
    int *ids = NULL;
    size_t n = 0;
    assert_int_equal(pr_tokenizer_encode(t, "abab", 4, &ids, &n, &err), PR_OK);
    assert_int_equal(n, 2);
    assert_int_equal(ids[0], 2);
    assert_int_equal(ids[1], 2);
    free(ids);
    pr_tokenizer_free(t);
    unlink(path);
    snprintf(path, sizeof path, "%s/tokenizer.json", tmpdir);
    unlink(path);
    rmdir(tmpdir);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_cases_llama3), cmocka_unit_test(test_cases_qwen3), cmocka_unit_test(test_cases_llama2),
        cmocka_unit_test(test_invalid_bytes), cmocka_unit_test(test_big_text), cmocka_unit_test(test_special_ids),
        cmocka_unit_test(test_malformed),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
