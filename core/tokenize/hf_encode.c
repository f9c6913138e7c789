/* peftref: encoding with a Hugging Face tokenizer.json, in the order of the
 * `tokenizers` library (tokenizer/mod.rs, added_vocabulary.rs):
 *  1. added tokens whose "normalized" is false are found in the raw text,
 *     leftmost-longest (an "lstrip" token takes the whitespace before it,
 *     "rstrip" the whitespace after); they become their ids;
 *  2. each stretch between them is normalized (NFC, Prepend, Replace), then
 *     searched for the added tokens whose "normalized" is true;
 *  3. each remaining stretch is split by the pre-tokenizers (Split patterns,
 *     ByteLevel, Metaspace), and each piece is one BPE word (models/bpe).
 * No post-processor runs: no special tokens are added.  Bytes that are not
 * valid UTF-8 (the library accepts only valid text) are one character each:
 * with a byte-level vocabulary they are their byte's symbol, otherwise
 * they take byte fallback's <0xHH> tokens (or unk).
 * Every stage is linear in the text: the added-token search walks a trie
 * at most as deep as the longest added token from each position. */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "peftref/tokenizer.h"
#include "tokenizer_internal.h"
#include "hf_internal.h"

typedef struct hf_ws {
    tok_buf nb[2]; /* normalizer output, alternately */
    tok_cpbuf cps;
    tok_buf pre[HF_MAX_STEPS]; /* one per pre-tokenizer step */
} hf_ws;

static void hf_ws_free(hf_ws *x)
{
    free(x->nb[0].p);
    free(x->nb[1].p);
    free(x->cps.p);
    for (int i = 0; i < HF_MAX_STEPS; i++)
        free(x->pre[i].p);
}

static int32_t vocab_id(const tok_hf *h, const unsigned char *k, size_t n)
{
    long e = tok_strmap_find(&h->vocab, k, n, tok_hash_bytes(k, n));
    return e < 0 ? -1 : h->vocab.ents[e].val;
}

/* Length of the character at s[0..n) (n >= 1); an invalid byte is one. */
static size_t char_len(const unsigned char *s, size_t n)
{
    uint32_t cp;
    size_t l = s[0] < 0x80 ? 1 : tok_utf8_decode(s, n, &cp);
    return l ? l : 1;
}

/* ---- the model: one BPE word ------------------------------------------- */

int tok_hf_word(const pr_tokenizer *t, enc_ws *w, const unsigned char *s, size_t n)
{
    const tok_hf *h = t->hf;
    if (h->ignore_merges) { /* a word in the vocabulary is not merged */
        int32_t id = vocab_id(h, s, n);
        if (id >= 0)
            return tok_push_id(w, id);
    }
    if (tok_word_reserve(w, n))
        return -1;
    size_t ns = 0;
    int unk = 0; /* an unk symbol is pending (fuse_unk extends it) */
    for (size_t i = 0; i < n;) {
        size_t l = h->byte_level ? 1 : char_len(s + i, n - i);
        int32_t id = h->byte_level ? t->byte_sym[s[i]] : vocab_id(h, s + i, l);
        if (id >= 0) {
            if (unk)
                w->sym[ns++] = h->unk_id;
            unk = 0;
            w->sym[ns++] = id;
            i += l;
            continue;
        }
        int fb = h->byte_fallback;
        for (size_t k = 0; fb && k < l; k++)
            fb = h->byte_fb[s[i + k]] >= 0;
        if (fb) { /* as the library does, a pending unk waits */
            for (size_t k = 0; k < l; k++)
                w->sym[ns++] = h->byte_fb[s[i + k]];
        } else if (h->unk_id >= 0) {
            if (unk && !h->fuse_unk)
                w->sym[ns++] = h->unk_id;
            unk = 1;
        } /* else: no unk token, the character yields nothing */
        i += l;
    }
    if (unk)
        w->sym[ns++] = h->unk_id;
    if (ns == 0)
        return 0;
    return tok_bpe_merge(t, w, ns, 0);
}

/* ---- pre-tokenizers ---------------------------------------------------- */

/* Step k of the pre-tokenizers on s[0..n); at_start: s begins the text. */
static int pre_step(const pr_tokenizer *t, enc_ws *w, hf_ws *x, int k, const unsigned char *s, size_t n, int at_start)
{
    const tok_hf *h = t->hf;
    if (n == 0)
        return 0;
    if (k == h->n_pre)
        return tok_encode_word(t, w, s, n);
    const tok_pre *p = &h->pre[k];
    tok_buf *b = &x->pre[k];
    int regex = -1;
    switch (p->kind) {
    case PRE_SPLIT:
        regex = p->regex;
        break;
    case PRE_BYTELEVEL:
        if (p->add_prefix_space && s[0] != ' ') {
            if (tok_grow((void **)&b->p, &b->cap, n + 2, 1))
                return -1;
            b->p[0] = ' ';
            memcpy(b->p + 1, s, n);
            s = b->p;
            n++;
        }
        if (p->use_regex)
            regex = TOK_RE_GPT2;
        break;
    case PRE_METASPACE: {
        size_t spaces = 0;
        for (size_t i = 0; i < n; i++)
            spaces += s[i] == ' ';
        if (tok_grow((void **)&b->p, &b->cap, n + (spaces + 1) * p->rep_n + 1, 1))
            return -1;
        size_t m = 0;
        for (size_t i = 0; i < n; i++) {
            if (s[i] == ' ') {
                memcpy(b->p + m, p->rep, p->rep_n);
                m += p->rep_n;
            } else {
                b->p[m++] = s[i];
            }
        }
        int starts = m >= p->rep_n && memcmp(b->p, p->rep, p->rep_n) == 0;
        if (!starts && (p->scheme == PREPEND_ALWAYS || (p->scheme == PREPEND_FIRST && at_start))) {
            memmove(b->p + p->rep_n, b->p, m);
            memcpy(b->p, p->rep, p->rep_n);
            m += p->rep_n;
        }
        s = b->p;
        n = m;
        if (!p->split)
            break;
        /* split before each replacement character (MergedWithNext) */
        size_t start = 0;
        for (size_t i = 1; i + p->rep_n <= n; i++) {
            if (memcmp(s + i, p->rep, p->rep_n) != 0)
                continue;
            if (pre_step(t, w, x, k + 1, s + start, i - start, at_start && start == 0))
                return -1;
            start = i;
            i += p->rep_n - 1;
        }
        return pre_step(t, w, x, k + 1, s + start, n - start, at_start && start == 0);
    }
    }
    if (regex < 0)
        return pre_step(t, w, x, k + 1, s, n, at_start);
    for (size_t i = 0; i < n;) {
        size_t e = tok_hf_regex_next(regex, s, n, i);
        if (pre_step(t, w, x, k + 1, s + i, e - i, at_start && i == 0))
            return -1;
        i = e;
    }
    return 0;
}

/* ---- added tokens ------------------------------------------------------ */

typedef int (*gap_fn)(const pr_tokenizer *t, enc_ws *w, hf_ws *x, const unsigned char *s, size_t n, int at_start);

static int is_ws_at(const unsigned char *s, size_t n, size_t i, size_t *l)
{
    return tok_char_class(s, n, i, l, 1) == TOK_CL_SPACE;
}

/* Start of the whitespace run that ends at i, not before lo. */
static size_t ws_back(const unsigned char *s, size_t n, size_t lo, size_t i)
{
    while (i > lo) {
        size_t k = i - 1, l;
        while (k > lo && (s[k] & 0xC0) == 0x80 && i - k < 4)
            k--;
        if (!is_ws_at(s, n, k, &l) || k + l != i)
            break;
        i = k;
    }
    return i;
}

/* Split s[0..n) at the added tokens of trie tr: their ids go to w, the
 * stretches between them to gap. */
static int split_added(const pr_tokenizer *t, const tok_trie *tr, enc_ws *w, hf_ws *x, const unsigned char *s,
                       size_t n, int at_start, gap_fn gap)
{
    const tok_hf *h = t->hf;
    size_t seg = 0;
    for (size_t i = 0; i < n;) {
        int32_t node = tr->root[s[i]], best = -1;
        size_t j = i + 1, best_end = 0;
        while (node >= 0) { /* the longest token starting at i */
            if (tr->nodes[node].token >= 0) {
                best = tr->nodes[node].token;
                best_end = j;
            }
            if (j >= n)
                break;
            int32_t c = tr->nodes[node].child;
            while (c >= 0 && tr->nodes[c].byte != s[j])
                c = tr->nodes[c].sibling;
            node = c;
            j++;
        }
        if (best < 0) {
            i++;
            continue;
        }
        const tok_added *a = &h->added[best];
        size_t start = i, stop = best_end, l;
        if (a->lstrip)
            start = ws_back(s, n, seg, start);
        if (a->rstrip)
            while (stop < n && is_ws_at(s, n, stop, &l))
                stop += l;
        if (start > seg && gap(t, w, x, s + seg, start - seg, at_start && seg == 0))
            return -1;
        if (tok_push_id(w, a->id))
            return -1;
        seg = i = stop;
    }
    if (seg < n && gap(t, w, x, s + seg, n - seg, at_start && seg == 0))
        return -1;
    return 0;
}

static int pretokenize(const pr_tokenizer *t, enc_ws *w, hf_ws *x, const unsigned char *s, size_t n, int at_start)
{
    return pre_step(t, w, x, 0, s, n, at_start);
}

/* Normalize one stretch, then look for the normalized added tokens in it. */
static int normalize(const pr_tokenizer *t, enc_ws *w, hf_ws *x, const unsigned char *s, size_t n, int at_start)
{
    const tok_hf *h = t->hf;
    int which = 0; /* never write the buffer s is in */
    for (int k = 0; k < h->n_norm; k++) {
        const tok_norm *nm = &h->norms[k];
        tok_buf *o = &x->nb[which];
        o->n = 0;
        if (nm->kind == NORM_NFC) {
            if (tok_nfc(o, &x->cps, s, n))
                return -1;
        } else if (nm->kind == NORM_PREPEND) {
            if (n == 0)
                continue;
            if (tok_grow((void **)&o->p, &o->cap, n + nm->an + 1, 1))
                return -1;
            memcpy(o->p, nm->a, nm->an);
            memcpy(o->p + nm->an, s, n);
            o->n = n + nm->an;
        } else { /* Replace: left to right, without overlaps */
            size_t hits = 0;
            for (size_t i = 0; i + nm->an <= n;) {
                if (memcmp(s + i, nm->a, nm->an) == 0) {
                    hits++;
                    i += nm->an;
                } else {
                    i++;
                }
            }
            if (tok_grow((void **)&o->p, &o->cap, n + hits * nm->bn + 1, 1))
                return -1;
            for (size_t i = 0; i < n;) {
                if (i + nm->an <= n && memcmp(s + i, nm->a, nm->an) == 0) {
                    memcpy(o->p + o->n, nm->b, nm->bn);
                    o->n += nm->bn;
                    i += nm->an;
                } else {
                    o->p[o->n++] = s[i++];
                }
            }
        }
        s = o->p;
        n = o->n;
        which ^= 1;
    }
    if (h->norm.n_tokens)
        return split_added(t, &h->norm, w, x, s, n, at_start, pretokenize);
    return pretokenize(t, w, x, s, n, at_start);
}

int tok_hf_encode(const pr_tokenizer *t, enc_ws *w, const unsigned char *s, size_t n)
{
    hf_ws x;
    memset(&x, 0, sizeof x);
    int rc = split_added(t, &t->hf->raw, w, &x, s, n, 1, normalize);
    hf_ws_free(&x);
    return rc;
}

void tok_hf_strip(const pr_tokenizer *t, const char *s, size_t n, size_t *head, size_t *tail)
{
    const tok_hf *h = t->hf;
    size_t a = 0, b = 0;
    while (a < n && a < (size_t)h->strip_start && s[a] == ' ')
        a++;
    while (b < n - a && b < (size_t)h->strip_stop && s[n - 1 - b] == ' ')
        b++;
    *head = a;
    *tail = b;
}
