/* peftref: the Split patterns of Hugging Face tokenizer.json files,
 * matched by hand.  A pattern is recognised by its exact string; any other
 * is refused by the loader.  Hugging Face tokenizers runs them with
 * Oniguruma, so \s is Unicode White_Space and \p{L}, \p{N} the general
 * categories L* and N* (core/tokenize/unicode_tables.h).  Each match is
 * the first alternative that matches at the position, as a backtracking
 * engine picks it; every pattern here matches at every position, so the
 * text splits into consecutive matches (Split behaviour "Isolated").
 * Every matcher looks only at the characters it consumes and the one after,
 * except a whitespace run, which is scanned once and then consumed whole or
 * but its last character: linear in the text. */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "tokenizer_internal.h"

static const char *const patterns[TOK_RE_N] = {
    /* GPT-2 (ByteLevel with use_regex) */
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+",
    /* Llama 3 */
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
    "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
    /* Qwen2 / Qwen3: Llama 3's with single digits */
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
    "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
};

static const char *const names[TOK_RE_N] = {"GPT-2", "Llama 3", "Qwen2"};

int tok_hf_regex_id(const char *pattern)
{
    for (int i = 0; i < TOK_RE_N; i++)
        if (strcmp(pattern, patterns[i]) == 0)
            return i;
    return -1;
}

const char *tok_hf_regex_name(int id)
{
    return id >= 0 && id < TOK_RE_N ? names[id] : "?";
}

static int cls(const unsigned char *s, size_t n, size_t i, size_t *w)
{
    return tok_char_class(s, n, i, w, 1);
}

static int is_crlf(unsigned char c)
{
    return c == '\r' || c == '\n';
}

/* Length of a letter matching ASCII letter lc (lower case) under
 * Oniguruma's (?i) at s[i], or 0: the letter in either case, and U+017F
 * LATIN SMALL LETTER LONG S, which case-folds to s. */
static size_t fold_letter(const unsigned char *s, size_t n, size_t i, char lc)
{
    if (i >= n)
        return 0;
    if ((s[i] | 0x20) == (unsigned char)lc && ((s[i] >= 'a' && s[i] <= 'z') || (s[i] >= 'A' && s[i] <= 'Z')))
        return 1;
    if (lc == 's' && i + 1 < n && s[i] == 0xC5 && s[i + 1] == 0xBF)
        return 2;
    return 0;
}

/* (?i:'s|'t|'re|'ve|'m|'ll|'d) at i: its end, or 0. */
static size_t contraction_ci(const unsigned char *s, size_t n, size_t i)
{
    if (s[i] != '\'')
        return 0;
    size_t l;
    static const char one[] = "stmd";
    for (int k = 0; one[k]; k++)
        if ((l = fold_letter(s, n, i + 1, one[k])))
            return i + 1 + l;
    static const char two[][3] = {"re", "ve", "ll"};
    for (int k = 0; k < 3; k++) {
        size_t a = fold_letter(s, n, i + 1, two[k][0]);
        size_t b = a ? fold_letter(s, n, i + 1 + a, two[k][1]) : 0;
        if (b)
            return i + 1 + a + b;
    }
    return 0;
}

static size_t run_of(const unsigned char *s, size_t n, size_t i, int cl)
{
    size_t w;
    while (i < n && cls(s, n, i, &w) == cl)
        i += w;
    return i;
}

/* Llama 3's pattern (max_digits 3) and Qwen2's (max_digits 1). */
static size_t llama3_next(const unsigned char *s, size_t n, size_t i, int max_digits)
{
    size_t e = contraction_ci(s, n, i), w0, w;
    if (e)
        return e;
    int c0 = cls(s, n, i, &w0);
    /* [^\r\n\p{L}\p{N}]?\p{L}+ */
    if (c0 == TOK_CL_LETTER)
        return run_of(s, n, i + w0, TOK_CL_LETTER);
    if (c0 != TOK_CL_NUMBER && !is_crlf(s[i]) && i + w0 < n && cls(s, n, i + w0, &w) == TOK_CL_LETTER)
        return run_of(s, n, i + w0 + w, TOK_CL_LETTER);
    /* \p{N}{1,max} */
    if (c0 == TOK_CL_NUMBER) {
        e = i + w0;
        for (int k = 1; k < max_digits && e < n && cls(s, n, e, &w) == TOK_CL_NUMBER; k++)
            e += w;
        return e;
    }
    /*  ?[^\s\p{L}\p{N}]+[\r\n]* */
    size_t j = i;
    if (s[i] == ' ' && i + 1 < n && cls(s, n, i + 1, &w) == TOK_CL_OTHER)
        j = i + 1;
    if (j > i || c0 == TOK_CL_OTHER) {
        e = run_of(s, n, j, TOK_CL_OTHER);
        while (e < n && is_crlf(s[e]))
            e++;
        return e;
    }
    /* c0 is whitespace.  \s*[\r\n]+ ends after the run's last CR or LF;
     * \s+(?!\S) keeps the run but its last character when a non-space
     * follows; a one-character run then falls to \s+ */
    size_t k = i, last = i, crlf_end = 0;
    while (k < n && cls(s, n, k, &w) == TOK_CL_SPACE) {
        if (is_crlf(s[k]))
            crlf_end = k + 1;
        last = k;
        k += w;
    }
    if (crlf_end)
        return crlf_end;
    if (k == n || last == i)
        return k;
    return last;
}

size_t tok_hf_regex_next(int id, const unsigned char *s, size_t n, size_t i)
{
    switch (id) {
    case TOK_RE_LLAMA3: return llama3_next(s, n, i, 3);
    case TOK_RE_QWEN2: return llama3_next(s, n, i, 1);
    default: return tok_gpt2_next(s, n, i, 1);
    }
}
