/* peftref: GPT-2's pre-tokenisation, and the UTF-8 decoding it rests on.
 *
 * Text is split into pre-tokens by the pattern
 *     's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
 * matched here by hand (tok_pretok_next) with ECMAScript's \s and the
 * Unicode classes of core/tokenize/unicode_tables.h.  Bytes that are not
 * valid UTF-8 count as one "other" code point each, so any byte string
 * encodes and decodes back to itself. */
#include <stddef.h>
#include <stdint.h>

#include "tokenizer_internal.h"
#include "unicode_tables.h"

/* Decode one UTF-8 code point at s[0..n) (n >= 1).  Returns its length, or
 * 0 when s does not start a valid (shortest-form, non-surrogate) sequence. */
size_t tok_utf8_decode(const unsigned char *s, size_t n, uint32_t *cp)
{
    unsigned c = s[0];
    if (c < 0x80) {
        *cp = c;
        return 1;
    }
    size_t len;
    uint32_t v, min;
    if (c >= 0xC2 && c <= 0xDF) {
        len = 2;
        v = c & 0x1F;
        min = 0x80;
    } else if (c >= 0xE0 && c <= 0xEF) {
        len = 3;
        v = c & 0x0F;
        min = 0x800;
    } else if (c >= 0xF0 && c <= 0xF4) {
        len = 4;
        v = c & 0x07;
        min = 0x10000;
    } else {
        return 0;
    }
    if (n < len)
        return 0;
    for (size_t i = 1; i < len; i++) {
        if ((s[i] & 0xC0) != 0x80)
            return 0;
        v = v << 6 | (s[i] & 0x3F);
    }
    if (v < min || v > 0x10FFFF || (v >= 0xD800 && v <= 0xDFFF))
        return 0;
    *cp = v;
    return len;
}

/* ---- pre-tokenisation -------------------------------------------------- */

enum { CL_OTHER = TOK_CL_OTHER, CL_LETTER = TOK_CL_LETTER, CL_NUMBER = TOK_CL_NUMBER, CL_SPACE = TOK_CL_SPACE };

/* Unicode's White_Space property (PropList.txt, unchanged since Unicode
 * 6.3): Oniguruma's \s, which Hugging Face tokenizers' patterns use.  It
 * has U+0085 and not U+FEFF, unlike ECMAScript's \s. */
static const uint32_t white_space[][2] = {
    {0x0009, 0x000D}, {0x0020, 0x0020}, {0x0085, 0x0085}, {0x00A0, 0x00A0}, {0x1680, 0x1680},
    {0x2000, 0x200A}, {0x2028, 0x2029}, {0x202F, 0x202F}, {0x205F, 0x205F}, {0x3000, 0x3000},
};

static int in_ranges(const uint32_t (*r)[2], size_t n, uint32_t cp)
{
    size_t lo = 0, hi = n;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (cp < r[mid][0])
            hi = mid;
        else if (cp > r[mid][1])
            lo = mid + 1;
        else
            return 1;
    }
    return 0;
}

static int classify(uint32_t cp, int ws)
{
    if (cp < 0x80) {
        if ((cp | 0x20) >= 'a' && (cp | 0x20) <= 'z')
            return CL_LETTER;
        if (cp >= '0' && cp <= '9')
            return CL_NUMBER;
        if (cp == ' ' || (cp >= 0x09 && cp <= 0x0D))
            return CL_SPACE;
        return CL_OTHER;
    }
    if (in_ranges(pr_uc_letter, PR_UC_LETTER_N, cp))
        return CL_LETTER;
    if (in_ranges(pr_uc_number, PR_UC_NUMBER_N, cp))
        return CL_NUMBER;
    if (ws ? in_ranges(white_space, sizeof white_space / sizeof white_space[0], cp)
           : in_ranges(pr_uc_space, PR_UC_SPACE_N, cp))
        return CL_SPACE;
    return CL_OTHER;
}

/* Class of the character at s[i] and its byte length (*w).  A byte that
 * does not start valid UTF-8 is one CL_OTHER character. */
int tok_char_class(const unsigned char *s, size_t n, size_t i, size_t *w, int ws)
{
    if (s[i] < 0x80) {
        *w = 1;
        return classify(s[i], ws);
    }
    uint32_t cp;
    size_t l = tok_utf8_decode(s + i, n - i, &cp);
    if (!l) {
        *w = 1;
        return CL_OTHER;
    }
    *w = l;
    return classify(cp, ws);
}

/* End of the run of class cl starting at i. */
static size_t run_end(const unsigned char *s, size_t n, size_t i, int cl, int ws)
{
    size_t w;
    while (i < n && tok_char_class(s, n, i, &w, ws) == cl)
        i += w;
    return i;
}

/* End of the pre-token starting at i < n: the first alternative of the
 * pattern that matches at i, as a backtracking regex engine picks it. */
size_t tok_gpt2_next(const unsigned char *s, size_t n, size_t i, int ws)
{
    if (s[i] == '\'' && i + 1 < n) { /* 's 't 're 've 'm 'll 'd */
        unsigned char c = s[i + 1];
        if (c == 's' || c == 't' || c == 'm' || c == 'd')
            return i + 2;
        if (i + 2 < n && ((c == 'r' && s[i + 2] == 'e') || (c == 'v' && s[i + 2] == 'e') ||
                          (c == 'l' && s[i + 2] == 'l')))
            return i + 3;
    }
    size_t w;
    size_t j = (s[i] == ' ' && i + 1 < n) ? i + 1 : i; /* " ?" */
    int cl = tok_char_class(s, n, j, &w, ws);
    if (cl != CL_SPACE)             /*  ?\p{L}+ |  ?\p{N}+ |  ?[^\s\p{L}\p{N}]+ */
        return run_end(s, n, j + w, cl, ws);
    /* whitespace at i: \s+(?!\S) keeps the run but its last character when
     * a non-space follows; a one-character run then falls to \s+ */
    size_t last = i, k = i;
    while (k < n && tok_char_class(s, n, k, &w, ws) == CL_SPACE) {
        last = k;
        k += w;
    }
    if (k == n || last == i)
        return k;
    return last;
}

size_t tok_pretok_next(const unsigned char *s, size_t n, size_t i)
{
    return tok_gpt2_next(s, n, i, 0);
}
