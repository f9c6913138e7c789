/* peftref: Unicode Normalization Form C (UAX #15) for the tokenizer's NFC
 * normalizer: canonical decomposition, canonical ordering of combining
 * marks, then canonical composition, with the tables of nfc_tables.h and nfc_comp.h, and
 * Hangul syllables by formula (UAX #15 / Unicode ch. 3.12).
 *
 * Bytes that are not valid UTF-8 pass through unchanged: each is a starter
 * that composes with nothing.  Linear in the input: a run of combining
 * marks is ordered by a counting sort on the combining class. */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "tokenizer_internal.h"
#include "nfc_comp.h"
#include "nfc_tables.h"

#define INVALID_BYTE 0x80000000u /* | byte: a byte that is not UTF-8 */

enum { S_BASE = 0xAC00, L_BASE = 0x1100, V_BASE = 0x1161, T_BASE = 0x11A7,
       L_COUNT = 19, V_COUNT = 21, T_COUNT = 28, N_COUNT = V_COUNT * T_COUNT, S_COUNT = L_COUNT * N_COUNT };

static unsigned ccc_of(uint32_t cp)
{
    if (cp < 0x300 || (cp & INVALID_BYTE))
        return 0;
    size_t lo = 0, hi = PR_NFC_CCC_N;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (cp < pr_nfc_ccc[mid][0])
            hi = mid;
        else if (cp > pr_nfc_ccc[mid][1])
            lo = mid + 1;
        else
            return pr_nfc_ccc[mid][2];
    }
    return 0;
}

/* Index into pr_nfc_decomp of cp's decomposition, or -1. */
static long decomp_of(uint32_t cp)
{
    if (cp < 0xC0 || (cp & INVALID_BYTE))
        return -1;
    size_t lo = 0, hi = PR_NFC_DECOMP_N;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (cp < pr_nfc_decomp[mid][0])
            hi = mid;
        else if (cp > pr_nfc_decomp[mid][0])
            lo = mid + 1;
        else
            return (long)mid;
    }
    return -1;
}

/* The primary composite of a + b, or 0. */
static uint32_t compose(uint32_t a, uint32_t b)
{
    if ((a | b) & INVALID_BYTE)
        return 0;
    if (a >= L_BASE && a < L_BASE + L_COUNT && b >= V_BASE && b < V_BASE + V_COUNT)
        return S_BASE + ((a - L_BASE) * V_COUNT + (b - V_BASE)) * T_COUNT;
    if (a >= S_BASE && a < S_BASE + S_COUNT && (a - S_BASE) % T_COUNT == 0 && b > T_BASE && b < T_BASE + T_COUNT)
        return a + (b - T_BASE);
    uint64_t key = (uint64_t)a << 21 | b;
    size_t lo = 0, hi = PR_NFC_COMP_N;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (key < pr_nfc_comp[mid][0])
            hi = mid;
        else if (key > pr_nfc_comp[mid][0])
            lo = mid + 1;
        else
            return (uint32_t)pr_nfc_comp[mid][1];
    }
    return 0;
}

static size_t utf8_put(unsigned char *o, uint32_t cp)
{
    if (cp & INVALID_BYTE) {
        o[0] = (unsigned char)(cp & 0xFF);
        return 1;
    }
    if (cp < 0x80) {
        o[0] = (unsigned char)cp;
        return 1;
    }
    if (cp < 0x800) {
        o[0] = (unsigned char)(0xC0 | cp >> 6);
        o[1] = (unsigned char)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        o[0] = (unsigned char)(0xE0 | cp >> 12);
        o[1] = (unsigned char)(0x80 | (cp >> 6 & 0x3F));
        o[2] = (unsigned char)(0x80 | (cp & 0x3F));
        return 3;
    }
    o[0] = (unsigned char)(0xF0 | cp >> 18);
    o[1] = (unsigned char)(0x80 | (cp >> 12 & 0x3F));
    o[2] = (unsigned char)(0x80 | (cp >> 6 & 0x3F));
    o[3] = (unsigned char)(0x80 | (cp & 0x3F));
    return 4;
}

/* Stable sort of d[0..n) by combining class (all non-zero), in tmp. */
static void order_marks(uint32_t *d, size_t n, uint32_t *tmp)
{
    if (n < 2)
        return;
    if (n <= 16) { /* insertion sort: the usual case */
        for (size_t i = 1; i < n; i++) {
            uint32_t c = d[i];
            unsigned k = ccc_of(c);
            size_t j = i;
            while (j > 0 && ccc_of(d[j - 1]) > k) {
                d[j] = d[j - 1];
                j--;
            }
            d[j] = c;
        }
        return;
    }
    size_t count[257];
    memset(count, 0, sizeof count);
    for (size_t i = 0; i < n; i++)
        count[ccc_of(d[i]) + 1]++;
    for (int c = 1; c < 257; c++)
        count[c] += count[c - 1];
    for (size_t i = 0; i < n; i++)
        tmp[count[ccc_of(d[i])]++] = d[i];
    memcpy(d, tmp, n * sizeof *d);
}

int tok_nfc(tok_buf *out, tok_cpbuf *cps, const unsigned char *s, size_t n)
{
    out->n = 0;
    size_t i0 = 0;
    while (i0 < n && s[i0] < 0x80)
        i0++;
    if (i0 == n) { /* ASCII is NFC */
        if (tok_grow((void **)&out->p, &out->cap, n + 1, 1))
            return -1;
        memcpy(out->p, s, n);
        out->n = n;
        return 0;
    }
    /* decompose: at most 4 code points per input byte (Hangul: 3 per 3 bytes;
     * the longest decomposition is 4 code points of a 2-byte character) */
    size_t need = 4 * n + 1;
    if (tok_grow((void **)&cps->p, &cps->cap, 2 * need, sizeof *cps->p))
        return -1;
    uint32_t *d = cps->p, *tmp = cps->p + need;
    size_t nd = 0;
    for (size_t i = 0; i < n;) {
        uint32_t cp;
        size_t l = tok_utf8_decode(s + i, n - i, &cp);
        if (!l) {
            d[nd++] = INVALID_BYTE | s[i];
            i++;
            continue;
        }
        i += l;
        if (cp >= S_BASE && cp < S_BASE + S_COUNT) {
            uint32_t si = cp - S_BASE;
            d[nd++] = L_BASE + si / N_COUNT;
            d[nd++] = V_BASE + si % N_COUNT / T_COUNT;
            if (si % T_COUNT)
                d[nd++] = T_BASE + si % T_COUNT;
            continue;
        }
        long k = decomp_of(cp);
        if (k < 0) {
            d[nd++] = cp;
            continue;
        }
        for (uint32_t j = 0; j < pr_nfc_decomp[k][2]; j++)
            d[nd++] = pr_nfc_pool[pr_nfc_decomp[k][1] + j];
    }
    for (size_t i = 0; i < nd;) { /* canonical ordering */
        if (!ccc_of(d[i])) {
            i++;
            continue;
        }
        size_t j = i;
        while (j < nd && ccc_of(d[j]))
            j++;
        order_marks(d + i, j - i, tmp);
        i = j;
    }
    /* compose in place: d[0..no) is the output so far */
    size_t no = 0;
    long starter = -1;
    unsigned last = 256;
    for (size_t i = 0; i < nd; i++) {
        uint32_t c = d[i];
        unsigned cc = ccc_of(c);
        if (starter >= 0 && (last < cc || last == 0)) {
            uint32_t m = compose(d[starter], c);
            if (m) {
                d[starter] = m;
                continue;
            }
        }
        if (cc == 0)
            starter = (long)no;
        last = cc;
        d[no++] = c;
    }
    if (tok_grow((void **)&out->p, &out->cap, 4 * no + 1, 1))
        return -1;
    size_t k = 0;
    for (size_t i = 0; i < no; i++)
        k += utf8_put(out->p + k, d[i]);
    out->n = k;
    return 0;
}
