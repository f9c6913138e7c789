/* Writes the fuzz targets' seed corpora (tests/fuzz/corpus/NAME/) from the
 * test fixtures and tiny models made here: `make fuzz-seeds` in a build
 * configured with --enable-fuzzers.  Each seed also gets a truncated copy
 * (its first half).  Inputs holding several files join them with
 * FUZZ_SEP, as the harnesses split them. */
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <jansson.h>

#include "fuzz_util.h"
#include "peftref/model.h"
#include "peftref/module.h"
#include "peftref/tokenizer.h"
#include "safetensors.h"
#include "train_state.h"

static const char *out_root;

static void die(const char *what, const pr_error *err)
{
    fprintf(stderr, "make_seeds: %s: %s\n", what, err ? err->msg : "failed");
    exit(1);
}

static char *slurp(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        die(path, NULL);
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *buf = malloc((size_t)n + 1);
    if (!buf || fread(buf, 1, (size_t)n, f) != (size_t)n)
        die(path, NULL);
    fclose(f);
    buf[n] = '\0';
    *len = (size_t)n;
    return buf;
}

/* A growing byte buffer: the parts of one input. */
typedef struct buf {
    char *p;
    size_t n, cap;
} buf;

static void put(buf *b, const void *data, size_t n)
{
    if (b->n + n + 1 > b->cap) {
        b->cap = 2 * (b->n + n + 1);
        b->p = realloc(b->p, b->cap);
        if (!b->p)
            die("out of memory", NULL);
    }
    memcpy(b->p + b->n, data, n);
    b->n += n;
}

static void put_str(buf *b, const char *s) { put(b, s, strlen(s)); }
static void put_sep(buf *b) { put(b, FUZZ_SEP, FUZZ_SEP_LEN); }

static void put_file(buf *b, const char *path)
{
    size_t n;
    char *d = slurp(path, &n);
    put(b, d, n);
    free(d);
}

/* corpus/TARGET/NAME and corpus/TARGET/NAME.trunc (the first half). */
static void seed(const char *target, const char *name, const void *data, size_t n)
{
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", out_root, target);
    mkdir(path, 0755);
    snprintf(path, sizeof path, "%s/%s/%s", out_root, target, name);
    FILE *f = fopen(path, "wb");
    if (!f || fwrite(data, 1, n, f) != n || fclose(f) != 0)
        die(path, NULL);
    if (n >= 2) {
        snprintf(path, sizeof path, "%s/%s/%s.trunc", out_root, target, name);
        f = fopen(path, "wb");
        if (!f || fwrite(data, 1, n / 2, f) != n / 2 || fclose(f) != 0)
            die(path, NULL);
    }
}

static void seed_buf(const char *target, const char *name, buf *b)
{
    seed(target, name, b->p, b->n);
    free(b->p);
    memset(b, 0, sizeof *b);
}

static void seed_file(const char *target, const char *name, const char *path)
{
    buf b = {0};
    put_file(&b, path);
    seed_buf(target, name, &b);
}

/* Every NAME.EXT file of dir, as seeds named PREFIX-NAME.EXT. */
static void seed_dir(const char *target, const char *prefix, const char *dir, const char *ext)
{
    DIR *d = opendir(dir);
    if (!d)
        die(dir, NULL);
    struct dirent *e;
    while ((e = readdir(d))) {
        size_t l = strlen(e->d_name), le = strlen(ext);
        if (l <= le || strcmp(e->d_name + l - le, ext) != 0)
            continue;
        char path[4096], name[512];
        snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
        snprintf(name, sizeof name, "%s-%s", prefix, e->d_name);
        seed_file(target, name, path);
    }
    closedir(d);
}

static pr_model *tiny_model(void)
{
    pr_model_config cfg;
    fuzz_tiny_config(&cfg);
    pr_model *m = NULL;
    pr_error err = {0};
    if (pr_model_create(&cfg, &m, &err) != PR_OK)
        die("pr_model_create", &err);
    return m;
}

static void seeds_safetensors(pr_model *m)
{
    const char *dtypes[] = {"f32", "f16", "bf16"};
    char path[4200], name[64];
    pr_error err = {0};
    for (int i = 0; i < 3; i++) {
        fuzz_path("model.safetensors", path, sizeof path);
        if (pr_model_save_safetensors_as(m, path, dtypes[i], &err) != PR_OK)
            die(path, &err);
        snprintf(name, sizeof name, "tiny-%s", dtypes[i]);
        seed_file("safetensors", name, path);
    }
    /* a scalar, a 3-d tensor and metadata */
    float v[24];
    for (int i = 0; i < 24; i++)
        v[i] = (float)i - 11.5f;
    st_entry e[3] = {
        {.name = "scalar", .ndim = 0, .data = v, .dtype = ST_F32},
        {.name = "cube", .ndim = 3, .shape = {2, 3, 4}, .data = v, .dtype = ST_BF16},
        {.name = "row", .ndim = 1, .shape = {5}, .data = v, .dtype = ST_F16},
    };
    st_kv kv[2] = {{"format", "pt"}, {"note", "fuzz seed"}};
    fuzz_path("small.safetensors", path, sizeof path);
    if (st_write(path, e, 3, kv, 2, &err) != PR_OK)
        die(path, &err);
    seed_file("safetensors", "small", path);
    /* a dtype peftref lists but does not convert */
    const char hdr[] = "{\"ids\":{\"dtype\":\"I64\",\"shape\":[2],\"data_offsets\":[0,16]}}      ";
    buf b = {0};
    uint64_t n = sizeof hdr - 1;
    unsigned char le[8];
    for (int i = 0; i < 8; i++)
        le[i] = (unsigned char)(n >> (8 * i));
    put(&b, le, 8);
    put(&b, hdr, (size_t)n);
    put(&b, "\1\0\0\0\0\0\0\0\2\0\0\0\0\0\0\0", 16);
    seed_buf("safetensors", "i64", &b);
}

static void seeds_hf(pr_model *m)
{
    char dir[4200], cfg[4300], st[4300];
    pr_error err = {0};
    fuzz_path("hf", dir, sizeof dir);
    if (pr_model_save_hf(m, dir, NULL, &err) != PR_OK)
        die(dir, &err);
    snprintf(cfg, sizeof cfg, "%s/config.json", dir);
    snprintf(st, sizeof st, "%s/model.safetensors", dir);
    buf b = {0};
    put_file(&b, cfg);
    put_sep(&b);
    put_file(&b, st);
    seed_buf("hf", "tiny", &b);

    /* the same as one shard of an index */
    st_file *f = NULL;
    if (st_open(st, 0, &f, &err) != PR_OK)
        die(st, &err);
    json_t *map = json_object();
    for (int i = 0; i < st_count(f); i++)
        json_object_set_new(map, st_tensor_at(f, i)->name, json_string("model.safetensors"));
    st_close(f);
    json_t *idx = json_pack("{s:{s:i},s:o}", "metadata", "total_size", 0, "weight_map", map);
    char *idx_text = json_dumps(idx, JSON_INDENT(1));
    json_decref(idx);
    put_file(&b, cfg);
    put_sep(&b);
    put_file(&b, st);
    put_sep(&b);
    put_str(&b, idx_text);
    free(idx_text);
    seed_buf("hf", "tiny-index", &b);

    /* the parity fixture's config.json (a real transformers one) with an
     * empty weights file */
    put_file(&b, FUZZ_SRCDIR "/tests/ref/gpt2-parity/model/config.json");
    put_sep(&b);
    seed_buf("hf", "parity-config", &b);

    /* a LLaMA-family checkpoint (the gqa parity case) */
    put_file(&b, FUZZ_SRCDIR "/tests/ref/llama-parity/gqa/model/config.json");
    put_sep(&b);
    put_file(&b, FUZZ_SRCDIR "/tests/ref/llama-parity/gqa/model/model.safetensors");
    seed_buf("hf", "llama-gqa", &b);
    put_file(&b, FUZZ_SRCDIR "/tests/ref/llama-parity/qwen3/model/config.json");
    put_sep(&b);
    seed_buf("hf", "qwen3-config", &b);
}

static void seeds_trainstate(void)
{
    float a[12], bb[5], mm[17], vv[17];
    for (int i = 0; i < 17; i++) {
        mm[i] = 0.01f * (float)i;
        vv[i] = 0.001f * (float)i;
        if (i < 12)
            a[i] = (float)i;
        if (i < 5)
            bb[i] = -(float)i;
    }
    trainstate_tensor params[FUZZ_TS_N] = {
        {.name = "h.0.w", .data = a, .n = 12, .ndim = 2, .shape = {3, 4}},
        {.name = "h.1.b", .data = bb, .n = 5, .ndim = 1, .shape = {5}},
    };
    trainstate_moments mom = {.m = mm, .v = vv, .n = 17, .t = 3};
    trainstate_progress prog = {.step = 3, .rng = {1, 2, 3, 0xfedcba9876543210ull}, .epoch = 1, .cursor = 2,
                                .shuffle_seed = 0x1234};
    char path[4200];
    pr_error err = {0};
    fuzz_path("state.safetensors", path, sizeof path);
    if (trainstate_save(path, FUZZ_TS_FINGERPRINT, params, FUZZ_TS_N, &mom, &prog, &err) != PR_OK)
        die(path, &err);
    seed_file("trainstate", "moments", path);
    if (trainstate_save(path, FUZZ_TS_FINGERPRINT, params, FUZZ_TS_N, NULL, &prog, &err) != PR_OK)
        die(path, &err);
    seed_file("trainstate", "params", path);
}

static void seeds_module(void)
{
    pr_registry *reg = NULL;
    pr_error err = {0};
    if (pr_registry_open(FUZZ_BUILDDIR "/plugins/.libs", &reg, &err) != PR_OK)
        die("registry", &err);
    const char *techs[] = {"lora", "ia3", "bitfit", "lnfit", "adapter_houlsby", "compacter", "dora",
                           "prompt_tuning", "prefix_tuning", "full"};
    int saved = 0;
    for (size_t i = 0; i < sizeof techs / sizeof techs[0]; i++) {
        const pr_technique *t = pr_registry_find(reg, techs[i]);
        if (!t)
            continue;
        pr_model *m = tiny_model();
        pr_module_spec spec = {.technique = t, .trainable = 1, .seed = 5};
        pr_module *mod = NULL;
        char path[4200];
        fuzz_path("module.safetensors", path, sizeof path);
        if (pr_module_attach(m, &spec, &mod, &err) != PR_OK || pr_module_save(mod, path, NULL, &err) != PR_OK) {
            fprintf(stderr, "make_seeds: %s skipped: %s\n", techs[i], err.msg);
        } else {
            seed_file("module", techs[i], path);
            saved++;
        }
        pr_model_free(m);
    }
    pr_registry_free(reg);
    if (saved == 0)
        die("no module saved", NULL);
}

/* The byte-level vocabulary of vocab.json at path plus the results of the
 * merges "Ġ t", "h e", "Ġt he", "i n"; *next is the first free id. */
static json_t *bytes_vocab_with_merges(const char *path, int *next)
{
    size_t n;
    char *vt = slurp(path, &n);
    json_error_t je;
    json_t *vocab = json_loads(vt, 0, &je);
    free(vt);
    if (!vocab)
        die(path, NULL);
    *next = (int)json_object_size(vocab);
    const char *add[] = {"\xc4\xa0t", "he", "\xc4\xa0the", "in"};
    for (int i = 0; i < 4; i++)
        json_object_set_new(vocab, add[i], json_integer((*next)++));
    return vocab;
}

static void seeds_tokenizer(void)
{
    const char *v = FUZZ_SRCDIR "/tests/data/train/bytes-bpe/vocab.json";
    const char *mg = FUZZ_SRCDIR "/tests/data/train/bytes-bpe/merges.txt";
    const char *text = "Hello world, it's 2024!\n\tThe  end. \xc3\xa9t\xc3\xa9 \xe2\x82\xac";
    buf b = {0};
    put_sep(&b);
    put_file(&b, v);
    put_sep(&b);
    put_file(&b, mg);
    put_sep(&b);
    put_str(&b, text);
    seed_buf("tokenizer", "bytes-bpe", &b);

    /* the byte vocabulary with a few merges: "Ġ t", "h e", "Ġt he", "i n" */
    int next;
    json_t *vocab = bytes_vocab_with_merges(v, &next);
    char *vj = json_dumps(vocab, JSON_COMPACT);
    json_decref(vocab);
    put_str(&b, "{\"peftref_tokenizer\": \"gpt2-bpe\"}");
    put_sep(&b);
    put_str(&b, vj);
    put_sep(&b);
    put_str(&b, "#version: 0.2\n\xc4\xa0 t\nh e\n\xc4\xa0t he\ni n\n");
    put_sep(&b);
    put_str(&b, "the thin line in the theatre\n");
    seed_buf("tokenizer", "merges", &b);
    free(vj);

    put_str(&b, "{\"peftref_tokenizer\": \"byte\"}");
    put_sep(&b);
    put_sep(&b);
    put_sep(&b);
    put_str(&b, text);
    seed_buf("tokenizer", "byte", &b);
}

/* tokenizer.json files: a byte-level BPE with Llama 3's Split regex, and a
 * SentencePiece-style BPE (Prepend/Replace normaliser, byte fallback) as
 * Llama 2 and Mistral write them, each small, with added tokens. */
static void seeds_hftok(void)
{
    int next;
    json_t *vocab = bytes_vocab_with_merges(FUZZ_SRCDIR "/tests/data/train/bytes-bpe/vocab.json", &next);
    json_t *bl = json_pack(
        "{s:s,s:[{s:i,s:s,s:b,s:b}],s:n,s:{s:s,s:[{s:s,s:{s:s},s:s,s:b},{s:s,s:b,s:b,s:b}]},s:{s:s,s:b,s:b,s:b},"
        "s:{s:s,s:n,s:n,s:n,s:n,s:b,s:b,s:b,s:o,s:[s,s,s,s]}}",
        "version", "1.0", "added_tokens", "id", next, "content", "<|begin_of_text|>", "special", 1, "normalized", 0,
        "normalizer", "pre_tokenizer", "type", "Sequence", "pretokenizers", "type", "Split", "pattern", "Regex",
        "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
        "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
        "behavior", "Isolated", "invert", 0, "type", "ByteLevel", "add_prefix_space", 0, "trim_offsets", 1,
        "use_regex", 0, "decoder", "type", "ByteLevel", "add_prefix_space", 1, "trim_offsets", 1, "use_regex", 1,
        "model", "type", "BPE", "dropout", "unk_token", "continuing_subword_prefix", "end_of_word_suffix",
        "fuse_unk", 0, "byte_fallback", 0, "ignore_merges", 1, "vocab", vocab, "merges", "\xc4\xa0 t", "h e",
        "\xc4\xa0t he", "i n");
    char *blj = json_dumps(bl, JSON_COMPACT);
    json_decref(bl);
    if (!blj)
        die("hftok byte-level seed", NULL);
    buf b = {0};
    put_str(&b, blj);
    put_sep(&b);
    put_str(&b, "{\"bos_token\": \"<|begin_of_text|>\", \"eos_token\": {\"content\": \"<|begin_of_text|>\"}}");
    put_sep(&b);
    put_str(&b, "<|begin_of_text|>the thin line, it's  123456 \r\n\tin the theatre \xc3\xa9 \xf0\x9f\x98\x80");
    seed_buf("hftok", "bytelevel", &b);
    free(blj);

    /* <unk> <s> </s>, the 256 byte-fallback tokens, then a few pieces */
    json_t *sp = json_object();
    json_object_set_new(sp, "<unk>", json_integer(0));
    json_object_set_new(sp, "<s>", json_integer(1));
    json_object_set_new(sp, "</s>", json_integer(2));
    for (int i = 0; i < 256; i++) {
        char k[8];
        snprintf(k, sizeof k, "<0x%02X>", i);
        json_object_set_new(sp, k, json_integer(3 + i));
    }
    const char *pieces[] = {"\xe2\x96\x81", "t", "h", "e", "\xe2\x96\x81t", "he", "\xe2\x96\x81the", "i", "n", "in"};
    for (int i = 0; i < 10; i++)
        json_object_set_new(sp, pieces[i], json_integer(259 + i));
    json_t *spj = json_pack(
        "{s:s,s:[{s:i,s:s,s:b,s:b},{s:i,s:s,s:b,s:b}],s:{s:s,s:[{s:s,s:s},{s:s,s:{s:s},s:s}]},s:n,"
        "s:{s:s,s:[{s:s,s:{s:s},s:s},{s:s},{s:s},{s:s,s:s,s:i,s:i}]},"
        "s:{s:s,s:n,s:s,s:n,s:n,s:b,s:b,s:o,s:[s,s,s,s,s]}}",
        "version", "1.0", "added_tokens", "id", 1, "content", "<s>", "special", 1, "normalized", 0, "id", 2, "content",
        "</s>", "special", 1, "normalized", 0, "normalizer", "type", "Sequence", "normalizers", "type", "Prepend",
        "prepend", "\xe2\x96\x81", "type", "Replace", "pattern", "String", " ", "content", "\xe2\x96\x81",
        "pre_tokenizer", "decoder", "type", "Sequence", "decoders", "type", "Replace", "pattern", "String",
        "\xe2\x96\x81", "content", " ", "type", "ByteFallback", "type", "Fuse", "type", "Strip", "content", " ",
        "start", 1, "stop", 0, "model", "type", "BPE", "dropout", "unk_token", "<unk>", "continuing_subword_prefix",
        "end_of_word_suffix", "fuse_unk", 1, "byte_fallback", 1, "vocab", sp, "merges", "\xe2\x96\x81 t", "h e",
        "\xe2\x96\x81t he", "i n", "\xe2\x96\x81 i");
    char *spt = json_dumps(spj, JSON_COMPACT);
    json_decref(spj);
    if (!spt)
        die("hftok sentencepiece seed", NULL);
    put_str(&b, spt);
    put_sep(&b);
    put_str(&b, "{\"bos_token\": \"<s>\", \"eos_token\": \"</s>\", \"add_bos_token\": true}");
    put_sep(&b);
    put_str(&b, "the thin line</s> in  the theatre \xc3\xa9\xff\xfe unknown \xe4\xb8\xad");
    seed_buf("hftok", "sentencepiece", &b);
    free(spt);
}

static void seeds_data(void)
{
    /* settings byte (fuzz_data.c) + file */
    struct {
        const char *file;
        unsigned sel;
    } d[] = {
        {"lm.jsonl", 0x20}, {"pc.jsonl", 0x40}, {"lm.txt", 0x21}, {"cls.jsonl", 0x22},
        {"cls.jsonl", 0x2a}, {"cls_int.jsonl", 0x32}, {"cls_val.jsonl", 0x6a}, {"lm.jsonl", 0x34},
    };
    for (size_t i = 0; i < sizeof d / sizeof d[0]; i++) {
        char path[4096], name[128];
        snprintf(path, sizeof path, "%s/tests/data/train/%s", FUZZ_SRCDIR, d[i].file);
        snprintf(name, sizeof name, "%02x-%s", d[i].sel, d[i].file);
        buf b = {0};
        unsigned char c = (unsigned char)d[i].sel;
        put(&b, &c, 1);
        put_file(&b, path);
        seed_buf("data", name, &b);
    }
    buf b = {0};
    put_str(&b, "\x21");
    put_str(&b, "A short text, enough for a few examples of four tokens each.\n");
    seed_buf("data", "21-short.txt", &b);
}

static void seeds_pipeline(void)
{
    seed_dir("pipeline", "pipelines", FUZZ_SRCDIR "/tests/data/pipelines", ".yaml");
    seed_dir("pipeline", "compare", FUZZ_SRCDIR "/tests/data/compare", ".yaml");
    buf b = {0};
    put_str(&b, "model: {path: ../model}\n"
                "modules:\n"
                "  - {technique: lora, sites: \"q, v\", layers: [0], options: {r: 2}}\n"
                "  - {technique: bitfit}\n"
                "task: {type: lm, train: ../train/lm.txt}\n"
                "train: {steps: 2, batch: 1, seq_len: 4}\n");
    put_sep(&b);
    put_str(&b, "modules.0.options.r=3\ntrain.lr=1e-3\n");
    seed_buf("pipeline", "model-path-sets", &b);
    put_str(&b, "base: &b {technique: lora, options: {r: 2}}\n"
                "model: {preset: gpt2-tiny}\n"
                "modules: [*b, {<<: *b, name: second}]\n"
                "task: {type: lm, train: ../train/corpus.txt}\n"
                "train: {steps: 1}\n");
    seed_buf("pipeline", "aliases", &b);
}

static void seeds_manifest(void)
{
    seed_file("manifest", "adapters.json", FUZZ_SRCDIR "/plugins/adapters/manifest.json");
    seed_file("manifest", "example.json", FUZZ_SRCDIR "/sdk/manifest.example.json");
    seed_file("manifest", "template-pack.json", FUZZ_SRCDIR "/sdk/template-pack/manifest.json");
    const char *two = "{\"name\": \"adapters\", \"version\": \"1\", \"abi_major\": 1,"
                      " \"techniques\": [\"adapter_houlsby\", \"adapter_houlsby\"]}";
    seed("manifest", "twice.json", two, strlen(two));
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: make_seeds CORPUS_DIR\n");
        return 2;
    }
    out_root = argv[1];
    mkdir(out_root, 0755);
    pr_model *m = tiny_model();
    seeds_safetensors(m);
    seeds_hf(m);
    pr_model_free(m);
    seeds_trainstate();
    seeds_module();
    seeds_tokenizer();
    seeds_hftok();
    seeds_data();
    seeds_pipeline();
    seeds_manifest();
    return 0;
}
