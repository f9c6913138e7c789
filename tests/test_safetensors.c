/* Tests of the safetensors reader/writer and the atomic file writer. */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <dirent.h>
#include <errno.h>
#include <float.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

#include "fileio.h"
#include "safetensors.h"
#include "harness.h"

/* ---- helpers ------------------------------------------------------------------ */

static char *make_tmpdir(void)
{
    return th_scratch_dir("peftref-st");
}

static int count_dir_entries(const char *dir)
{
    DIR *d = opendir(dir);
    assert_non_null(d);
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL)
        if (strcmp(e->d_name, ".") != 0 && strcmp(e->d_name, "..") != 0)
            n++;
    closedir(d);
    return n;
}

static void write_bytes(const char *path, const void *buf, size_t len)
{
    FILE *fp = fopen(path, "wb");
    assert_non_null(fp);
    if (len)
        assert_int_equal(fwrite(buf, 1, len, fp), len);
    assert_int_equal(fclose(fp), 0);
}

/* A file with an explicit header length field, header text and data. */
static void write_raw(const char *path, uint64_t hlen, const char *json, const void *data,
                      size_t data_len)
{
    size_t jl = strlen(json);
    unsigned char *buf = malloc(8 + jl + data_len + 1);
    assert_non_null(buf);
    for (int i = 0; i < 8; i++)
        buf[i] = (unsigned char)(hlen >> (8 * i));
    memcpy(buf + 8, json, jl);
    if (data_len)
        memcpy(buf + 8 + jl, data, data_len);
    write_bytes(path, buf, 8 + jl + data_len);
    free(buf);
}

static void write_json_file(const char *path, const char *json, const void *data, size_t data_len)
{
    write_raw(path, strlen(json), json, data, data_len);
}

static uint32_t f32_bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static float bits_f32(uint32_t u)
{
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* Open must fail with code want (0: any failure) and a message naming the
 * file and, if tensor is non-NULL, the tensor. */
static void expect_open_fails(const char *path, int want, const char *tensor)
{
    st_file *f = NULL;
    pr_error err = {0};
    int rc = st_open(path, 0, &f, &err);
    if (rc == PR_OK)
        fail_msg("%s opened although it is broken", path);
    assert_null(f);
    if (want)
        assert_int_equal(rc, want);
    assert_int_equal(err.code, rc);
    if (!strstr(err.msg, path))
        fail_msg("message does not name the file: %s", err.msg);
    if (tensor && !strstr(err.msg, tensor))
        fail_msg("message does not name tensor '%s': %s", tensor, err.msg);
}

/* ---- round trip ------------------------------------------------------------------- */

static void test_roundtrip_f32(void **state)
{
    (void)state;
    char *dir = make_tmpdir();
    char *path = fileio_join(dir, "rt.safetensors");
    float a[6] = {1.5f, -0.0f, INFINITY, NAN, 1e-42f /* subnormal */, -3.25e7f};
    float b[5] = {0.1f, 0.2f, 0.3f, 0.4f, 0.5f};
    float s[1] = {42.0f};
    st_entry e[4] = {
        {.name = "h.0.attn.c_attn.weight", .ndim = 2, .shape = {2, 3}, .data = a},
        {.name = "b", .ndim = 1, .shape = {5}, .data = b, .dtype = ST_F32},
        {.name = "scalar", .ndim = 0, .data = s},
        {.name = "empty", .ndim = 2, .shape = {0, 4}, .data = NULL},
    };
    st_kv meta[2] = {{"format", "pt"}, {"note", "round \"trip\" \xc3\xa9"}};
    pr_error err = {0};
    assert_int_equal(st_write(path, e, 4, meta, 2, &err), PR_OK);
    assert_int_equal(count_dir_entries(dir), 1); /* no temporary left behind */

    /* header length is a multiple of 8 so the buffer starts 8-aligned */
    FILE *fp = fopen(path, "rb");
    unsigned char hl[8];
    assert_int_equal(fread(hl, 1, 8, fp), 8);
    fclose(fp);
    uint64_t n = 0;
    for (int i = 7; i >= 0; i--)
        n = (n << 8) | hl[i];
    assert_int_equal(n % 8, 0);

    st_file *f = NULL;
    assert_int_equal(st_open(path, 0, &f, &err), PR_OK);
    assert_int_equal(st_count(f), 4);
    assert_string_equal(st_path(f), path);
    /* sorted by name */
    assert_string_equal(st_tensor_at(f, 0)->name, "b");
    assert_string_equal(st_tensor_at(f, 3)->name, "scalar");
    assert_null(st_tensor_at(f, 4));
    assert_null(st_find(f, "missing"));

    const st_tensor *t = st_find(f, "h.0.attn.c_attn.weight");
    assert_non_null(t);
    assert_int_equal(t->dtype, ST_F32);
    assert_string_equal(t->dtype_name, "F32");
    assert_int_equal(t->ndim, 2);
    assert_int_equal(t->shape[0], 2);
    assert_int_equal(t->shape[1], 3);
    assert_int_equal(t->numel, 6);
    assert_int_equal(t->nbytes, 24);
    assert_int_equal((uintptr_t)t->data % 4, 0);
    assert_memory_equal(t->data, a, sizeof a); /* bit-exact, NaN and -0 included */
    float got[6];
    assert_int_equal(st_to_f32(f, t, got, &err), PR_OK);
    for (int i = 0; i < 6; i++)
        assert_int_equal(f32_bits(got[i]), f32_bits(a[i]));

    t = st_find(f, "b");
    assert_non_null(t);
    assert_int_equal(t->ndim, 1);
    assert_int_equal(t->shape[0], 5);
    assert_memory_equal(t->data, b, sizeof b);

    t = st_find(f, "scalar");
    assert_non_null(t);
    assert_int_equal(t->ndim, 0);
    assert_int_equal(t->numel, 1);
    assert_true(*(const float *)t->data == 42.0f);

    t = st_find(f, "empty");
    assert_non_null(t);
    assert_int_equal(t->numel, 0);
    assert_int_equal(t->nbytes, 0);

    assert_int_equal(st_metadata_count(f), 2);
    assert_string_equal(st_metadata(f, "format"), "pt");
    assert_string_equal(st_metadata(f, "note"), "round \"trip\" \xc3\xa9");
    assert_null(st_metadata(f, "absent"));
    st_close(f);

    /* a file without metadata and without tensors is valid too */
    assert_int_equal(st_write(path, NULL, 0, NULL, 0, &err), PR_OK);
    assert_int_equal(st_open(path, 0, &f, &err), PR_OK);
    assert_int_equal(st_count(f), 0);
    assert_int_equal(st_metadata_count(f), 0);
    st_close(f);

    free(path);
    th_scratch_dir_free(dir);
}

/* A writable open maps copy-on-write: writes are visible through the
 * mapping but never reach the file. */
static void test_writable_mapping_is_private(void **state)
{
    (void)state;
    char *dir = make_tmpdir();
    char *path = fileio_join(dir, "w.safetensors");
    float v[4] = {1, 2, 3, 4};
    st_entry e = {.name = "v", .ndim = 1, .shape = {4}, .data = v};
    pr_error err = {0};
    assert_int_equal(st_write(path, &e, 1, NULL, 0, &err), PR_OK);
    st_file *f = NULL;
    assert_int_equal(st_open(path, ST_OPEN_WRITABLE, &f, &err), PR_OK);
    float *p = st_find(f, "v")->data;
    p[2] = -7.0f;
    assert_true(p[2] == -7.0f);
    st_close(f);
    assert_int_equal(st_open(path, 0, &f, &err), PR_OK);
    assert_true(((const float *)st_find(f, "v")->data)[2] == 3.0f);
    st_close(f);
    free(path);
    th_scratch_dir_free(dir);
}

/* ---- F16 / BF16 ---------------------------------------------------------------------- */

static void test_f16_to_f32_values(void **state)
{
    (void)state;
    struct { uint16_t h; float f; } cases[] = {
        {0x3c00, 1.0f},
        {0xc000, -2.0f},
        {0x7bff, 65504.0f},                 /* largest finite */
        {0x0400, 6.103515625e-05f},         /* 2^-14, smallest normal */
        {0x03ff, 6.097555160522461e-05f},   /* 1023 * 2^-24, largest subnormal */
        {0x0001, 5.960464477539063e-08f},   /* 2^-24, smallest subnormal */
        {0x8001, -5.960464477539063e-08f},
        {0x0200, 3.0517578125e-05f},        /* 2^-15 */
        {0x3555, 0.333251953125f},
        {0x3bff, 0.99951171875f},
        {0x0000, 0.0f},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        float g = st_f16_to_f32(cases[i].h);
        if (f32_bits(g) != f32_bits(cases[i].f))
            fail_msg("f16 0x%04x -> %.10g, want %.10g", cases[i].h, g, cases[i].f);
    }
    assert_true(signbit(st_f16_to_f32(0x8000)) && st_f16_to_f32(0x8000) == 0.0f);
    assert_true(isinf(st_f16_to_f32(0x7c00)) && st_f16_to_f32(0x7c00) > 0);
    assert_true(isinf(st_f16_to_f32(0xfc00)) && st_f16_to_f32(0xfc00) < 0);
    assert_true(isnan(st_f16_to_f32(0x7e00)));
    assert_true(isnan(st_f16_to_f32(0x7c01))); /* signalling NaN stays NaN */
    assert_true(isnan(st_f16_to_f32(0xfe00)));

    /* every finite f16 value v is exactly mant * 2^(e) - compare with ldexp */
    for (uint32_t h = 0; h < 0x10000u; h++) {
        uint32_t e = (h >> 10) & 0x1f, m = h & 0x3ff;
        if (e == 0x1f)
            continue;
        double want = e == 0 ? ldexp((double)m, -24) : ldexp((double)(m | 0x400), (int)e - 25);
        if (h & 0x8000)
            want = -want;
        float g = st_f16_to_f32((uint16_t)h);
        if ((double)g != want || !!signbit(g) != !!(h & 0x8000))
            fail_msg("f16 0x%04x -> %.10g, want %.10g", h, g, want);
    }
}

static void test_f32_to_f16_rounding(void **state)
{
    (void)state;
    struct { float f; uint16_t h; } cases[] = {
        {1.0f, 0x3c00},
        {-2.0f, 0xc000},
        {65504.0f, 0x7bff},
        {65519.0f, 0x7bff},                    /* below the midpoint to 2^16 */
        {65520.0f, 0x7c00},                    /* midpoint: ties to even -> inf */
        {1e6f, 0x7c00},                        /* overflow */
        {-1e6f, 0xfc00},
        {1.0f + 0.00048828125f, 0x3c00},       /* 1 + 2^-11: tie, even stays 1 */
        {1.0f + 3 * 0.00048828125f, 0x3c02},   /* 1 + 3*2^-11: tie, rounds up to even */
        {1.0f + 0.0005f, 0x3c01},              /* above the tie */
        {2.98023223876953125e-08f, 0x0000},    /* 2^-25: half the smallest subnormal, tie -> 0 */
        {2.98023259404089e-08f, 0x0001},       /* just above 2^-25 */
        {8.940696716308594e-08f, 0x0002},      /* 3*2^-25: tie between 1 and 2 units -> 2 */
        {6.100535392761230e-05f, 0x0400},      /* (2047/2) * 2^-24: tie 0x03ff/0x0400 -> even 0x0400 */
        {6.097555160522461e-05f, 0x03ff},
        {1e-10f, 0x0000},
        {-1e-10f, 0x8000},
        {1e-42f, 0x0000},                      /* f32 subnormal */
        {0.333333333f, 0x3555},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        uint16_t g = st_f32_to_f16(cases[i].f);
        if (g != cases[i].h)
            fail_msg("f32 %.12g -> f16 0x%04x, want 0x%04x", cases[i].f, g, cases[i].h);
    }
    assert_int_equal(st_f32_to_f16(INFINITY), 0x7c00);
    assert_int_equal(st_f32_to_f16(-INFINITY), 0xfc00);
    uint16_t n = st_f32_to_f16(NAN);
    assert_int_equal(n & 0x7c00, 0x7c00);
    assert_int_not_equal(n & 0x3ff, 0);
    /* a NaN whose payload lies only in the low bits must not become inf */
    n = st_f32_to_f16(bits_f32(0x7f800001u));
    assert_int_not_equal(n & 0x3ff, 0);

    /* f16 -> f32 -> f16 is the identity on every non-NaN value */
    for (uint32_t h = 0; h < 0x10000u; h++) {
        if ((h & 0x7c00) == 0x7c00 && (h & 0x3ff))
            continue;
        uint16_t back = st_f32_to_f16(st_f16_to_f32((uint16_t)h));
        if (back != h)
            fail_msg("f16 0x%04x round trip gave 0x%04x", h, back);
    }
}

static void test_bf16_values(void **state)
{
    (void)state;
    assert_true(st_bf16_to_f32(0x3f80) == 1.0f);
    assert_true(st_bf16_to_f32(0xc040) == -3.0f);
    assert_true(st_bf16_to_f32(0x4049) == 3.140625f);
    assert_true(st_bf16_to_f32(0x0001) == bits_f32(0x00010000u)); /* subnormal 2^-133 */
    assert_true(st_bf16_to_f32(0x0001) > 0.0f && st_bf16_to_f32(0x0001) < FLT_MIN);
    assert_true(isinf(st_bf16_to_f32(0x7f80)) && st_bf16_to_f32(0x7f80) > 0);
    assert_true(isinf(st_bf16_to_f32(0xff80)) && st_bf16_to_f32(0xff80) < 0);
    assert_true(isnan(st_bf16_to_f32(0x7fc0)));
    assert_true(signbit(st_bf16_to_f32(0x8000)));

    assert_int_equal(st_f32_to_bf16(1.0f), 0x3f80);
    assert_int_equal(st_f32_to_bf16(1.00390625f), 0x3f80);       /* 1 + 2^-8: tie, stays even */
    assert_int_equal(st_f32_to_bf16(1.01171875f), 0x3f82);       /* 1 + 3*2^-8: tie, up to even */
    assert_int_equal(st_f32_to_bf16(1.0040f), 0x3f81);           /* above the tie */
    assert_int_equal(st_f32_to_bf16(3.14159265f), 0x4049);
    assert_int_equal(st_f32_to_bf16(FLT_MAX), 0x7f80);           /* rounds past the largest finite */
    assert_int_equal(st_f32_to_bf16(-INFINITY), 0xff80);
    assert_int_equal(st_f32_to_bf16(bits_f32(0x00018000u)), 0x0002); /* subnormal tie -> even */
    uint16_t n = st_f32_to_bf16(bits_f32(0x7f800001u));          /* low-payload NaN */
    assert_true(isnan(st_bf16_to_f32(n)));
    for (uint32_t b = 0; b < 0x10000u; b++) {
        if ((b & 0x7f80) == 0x7f80 && (b & 0x7f))
            continue;
        if (st_f32_to_bf16(st_bf16_to_f32((uint16_t)b)) != b)
            fail_msg("bf16 0x%04x round trip failed", b);
    }
}

/* F16/BF16 tensors: the writer narrows, the reader widens; F32 tensors stay
 * aligned even when listed after 2-byte ones. */
static void test_half_file(void **state)
{
    (void)state;
    char *dir = make_tmpdir();
    char *path = fileio_join(dir, "half.safetensors");
    enum { N = 37 };
    float x[N];
    for (int i = 0; i < N; i++)
        x[i] = (float)sin(0.7 * i) * powf(2.0f, (float)(i % 9) - 4.0f);
    float one[1] = {0.1f};
    st_entry e[4] = {
        {.name = "h", .ndim = 1, .shape = {N}, .data = x, .dtype = ST_F16},
        {.name = "odd", .ndim = 1, .shape = {1}, .data = one, .dtype = ST_BF16},
        {.name = "bf", .ndim = 2, .shape = {1, N}, .data = x, .dtype = ST_BF16},
        {.name = "f", .ndim = 1, .shape = {N}, .data = x},
    };
    pr_error err = {0};
    assert_int_equal(st_write(path, e, 4, NULL, 0, &err), PR_OK);
    st_file *f = NULL;
    assert_int_equal(st_open(path, 0, &f, &err), PR_OK);
    const st_tensor *th = st_find(f, "h"), *tb = st_find(f, "bf"), *tf = st_find(f, "f");
    assert_int_equal(th->dtype, ST_F16);
    assert_int_equal(th->nbytes, 2 * N);
    assert_int_equal(tb->dtype, ST_BF16);
    assert_string_equal(tb->dtype_name, "BF16");
    assert_int_equal(tf->dtype, ST_F32);
    assert_int_equal((uintptr_t)tf->data % 4, 0);
    float got[N];
    assert_int_equal(st_to_f32(f, th, got, &err), PR_OK);
    for (int i = 0; i < N; i++) {
        /* exactly the rounded value, within half an f16 ulp: |rel| <= 2^-11 */
        assert_true(got[i] == st_f16_to_f32(st_f32_to_f16(x[i])));
        assert_true(fabsf(got[i] - x[i]) <= fabsf(x[i]) * 0x1p-11f);
    }
    assert_int_equal(st_to_f32(f, tb, got, &err), PR_OK);
    for (int i = 0; i < N; i++) {
        assert_true(got[i] == st_bf16_to_f32(st_f32_to_bf16(x[i])));
        assert_true(fabsf(got[i] - x[i]) <= fabsf(x[i]) * 0x1p-8f);
    }
    /* raw little-endian bytes: 0.1 in bf16 is 0x3dcd */
    const unsigned char *raw = st_find(f, "odd")->data;
    assert_int_equal(raw[0], 0xcd);
    assert_int_equal(raw[1], 0x3d);
    st_close(f);
    free(path);
    th_scratch_dir_free(dir);
}

/* ---- broken files ---------------------------------------------------------------------- */

static void test_truncated(void **state)
{
    (void)state;
    char *dir = make_tmpdir();
    char *path = fileio_join(dir, "full.safetensors");
    char *cut = fileio_join(dir, "cut.safetensors");
    float a[64], b[16];
    for (int i = 0; i < 64; i++)
        a[i] = (float)i;
    for (int i = 0; i < 16; i++)
        b[i] = -(float)i;
    st_entry e[2] = {{.name = "a", .ndim = 2, .shape = {8, 8}, .data = a},
                     {.name = "b", .ndim = 1, .shape = {16}, .data = b}};
    pr_error err = {0};
    assert_int_equal(st_write(path, e, 2, NULL, 0, &err), PR_OK);
    char *buf = NULL;
    size_t len = 0;
    assert_int_equal(fileio_read_all(path, 1 << 20, &buf, &len, &err), PR_OK);
    uint64_t hl = 0;
    for (int i = 7; i >= 0; i--)
        hl = (hl << 8) | (unsigned char)buf[i];
    size_t data0 = 8 + (size_t)hl;
    assert_int_equal(len, data0 + sizeof a + sizeof b);

    size_t header_cuts[] = {0, 1, 5, 7, 8, 9, 8 + (size_t)hl / 2, data0 - 1};
    for (size_t i = 0; i < sizeof header_cuts / sizeof header_cuts[0]; i++) {
        write_bytes(cut, buf, header_cuts[i]);
        expect_open_fails(cut, PR_ERR_FORMAT, NULL);
    }
    /* inside the data: the message names the tensor whose bytes are missing
     * ("a" is written first, "b" last) */
    write_bytes(cut, buf, data0);
    expect_open_fails(cut, PR_ERR_FORMAT, NULL);
    write_bytes(cut, buf, data0 + 10);
    expect_open_fails(cut, PR_ERR_FORMAT, "'a'");
    write_bytes(cut, buf, len - 1);
    expect_open_fails(cut, PR_ERR_FORMAT, "'b'");
    /* the complete copy opens */
    write_bytes(cut, buf, len);
    st_file *f = NULL;
    assert_int_equal(st_open(cut, 0, &f, &err), PR_OK);
    st_close(f);
    free(buf);
    free(cut);
    free(path);
    th_scratch_dir_free(dir);
}

static void test_corrupt_headers(void **state)
{
    (void)state;
    char *dir = make_tmpdir();
    char *p = fileio_join(dir, "bad.safetensors");
    float data[4] = {1, 2, 3, 4};

    write_json_file(p, "{\"w\": {\"dtype\": \"F32\",", data, 16);
    expect_open_fails(p, PR_ERR_FORMAT, NULL);

    write_json_file(p, "[1, 2]", data, 16);
    expect_open_fails(p, PR_ERR_FORMAT, NULL);

    write_json_file(p, "{\"w\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [0, 4]}\xff}",
                    data, 16);
    expect_open_fails(p, PR_ERR_FORMAT, NULL); /* not UTF-8 / not JSON */

    /* header length field larger than the file */
    write_raw(p, 1000, "{}", NULL, 0);
    expect_open_fails(p, PR_ERR_FORMAT, NULL);
    write_raw(p, UINT64_MAX, "{}", NULL, 0);
    expect_open_fails(p, PR_ERR_FORMAT, NULL);

    write_json_file(p, "{\"w\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [0, 8]}}",
                    data, 4);
    expect_open_fails(p, PR_ERR_FORMAT, "'w'"); /* offsets beyond the buffer */

    write_json_file(p, "{\"w\": {\"dtype\": \"F32\", \"shape\": [3], \"data_offsets\": [0, 8]}}",
                    data, 16);
    expect_open_fails(p, PR_ERR_FORMAT, "'w'"); /* byte count does not match shape */

    write_json_file(p, "{\"w\": {\"dtype\": \"F16\", \"shape\": [2, 2], \"data_offsets\": [0, 16]}}",
                    data, 16);
    expect_open_fails(p, PR_ERR_FORMAT, "'w'"); /* F16 needs 8 bytes, not 16 */

    write_json_file(p, "{\"w\": {\"dtype\": \"Q4_K\", \"shape\": [2], \"data_offsets\": [0, 8]}}",
                    data, 16);
    expect_open_fails(p, PR_ERR_UNSUPPORTED, "'w'");

    write_json_file(p, "{\"w\": {\"shape\": [2], \"data_offsets\": [0, 8]}}", data, 16);
    expect_open_fails(p, PR_ERR_FORMAT, "'w'");
    write_json_file(p, "{\"w\": {\"dtype\": \"F32\", \"data_offsets\": [0, 8]}}", data, 16);
    expect_open_fails(p, PR_ERR_FORMAT, "shape");
    write_json_file(p, "{\"w\": {\"dtype\": \"F32\", \"shape\": [2]}}", data, 16);
    expect_open_fails(p, PR_ERR_FORMAT, "data_offsets");
    write_json_file(p, "{\"w\": 3}", data, 16);
    expect_open_fails(p, PR_ERR_FORMAT, "'w'");

    write_json_file(p, "{\"w\": {\"dtype\": \"F32\", \"shape\": [-2], \"data_offsets\": [0, 8]}}",
                    data, 16);
    expect_open_fails(p, PR_ERR_FORMAT, "'w'");
    write_json_file(p, "{\"w\": {\"dtype\": \"F32\", \"shape\": [2.0], \"data_offsets\": [0, 8]}}",
                    data, 16);
    expect_open_fails(p, PR_ERR_FORMAT, "'w'");
    write_json_file(p, "{\"w\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [8]}}",
                    data, 16);
    expect_open_fails(p, PR_ERR_FORMAT, "'w'");
    write_json_file(p, "{\"w\": {\"dtype\": \"F32\", \"shape\": [0], \"data_offsets\": [8, 4]}}",
                    data, 16);
    expect_open_fails(p, PR_ERR_FORMAT, "'w'");
    write_json_file(p, "{\"w\": {\"dtype\": 32, \"shape\": [2], \"data_offsets\": [0, 8]}}",
                    data, 16);
    expect_open_fails(p, PR_ERR_FORMAT, "'w'");
    write_json_file(p,
                    "{\"w\": {\"dtype\": \"F32\", \"shape\": [4611686018427387904, 4],"
                    " \"data_offsets\": [0, 8]}}",
                    data, 16);
    expect_open_fails(p, PR_ERR_FORMAT, "'w'"); /* element count overflows */

    write_json_file(p,
                    "{\"u\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [0, 8]},"
                    " \"v\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [4, 12]}}",
                    data, 16);
    expect_open_fails(p, PR_ERR_FORMAT, "overlap");

    write_json_file(p,
                    "{\"u\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [0, 4]},"
                    " \"u\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [4, 8]}}",
                    data, 16);
    expect_open_fails(p, PR_ERR_FORMAT, "u"); /* duplicate name */

    write_json_file(p, "{\"__metadata__\": {\"format\": 1}}", data, 0);
    expect_open_fails(p, PR_ERR_FORMAT, "format");
    write_json_file(p, "{\"__metadata__\": [\"pt\"]}", data, 0);
    expect_open_fails(p, PR_ERR_FORMAT, "__metadata__");

    /* A valid dtype peftref does not convert: listed, but conversion fails
     * naming the tensor and the dtype. */
    write_json_file(p, "{\"ids\": {\"dtype\": \"I64\", \"shape\": [2], \"data_offsets\": [0, 16]}}",
                    data, 16);
    st_file *f = NULL;
    pr_error err = {0};
    assert_int_equal(st_open(p, 0, &f, &err), PR_OK);
    const st_tensor *t = st_find(f, "ids");
    assert_non_null(t);
    assert_int_equal(t->dtype, ST_DTYPE_OTHER);
    float out[2];
    assert_int_equal(st_to_f32(f, t, out, &err), PR_ERR_UNSUPPORTED);
    assert_non_null(strstr(err.msg, "'ids'"));
    assert_non_null(strstr(err.msg, "I64"));
    assert_non_null(strstr(err.msg, p));
    st_close(f);

    /* a header with trailing spaces and a data buffer with unused bytes is fine */
    write_json_file(p, "{\"w\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [4, 12]}}   ",
                    data, 16);
    assert_int_equal(st_open(p, 0, &f, &err), PR_OK);
    t = st_find(f, "w");
    assert_int_equal(st_to_f32(f, t, out, &err), PR_OK);
    assert_true(out[0] == 2.0f && out[1] == 3.0f);
    st_close(f);

    /* a missing file */
    char *missing = fileio_join(dir, "nope.safetensors");
    expect_open_fails(missing, PR_ERR_NOTFOUND, NULL);
    free(missing);

    free(p);
    th_scratch_dir_free(dir);
}

static void test_write_rejects_bad_entries(void **state)
{
    (void)state;
    char *dir = make_tmpdir();
    char *p = fileio_join(dir, "x.safetensors");
    float v[2] = {1, 2};
    pr_error err = {0};
    st_entry dup[2] = {{.name = "a", .ndim = 1, .shape = {2}, .data = v},
                       {.name = "a", .ndim = 1, .shape = {2}, .data = v}};
    assert_int_equal(st_write(p, dup, 2, NULL, 0, &err), PR_ERR_INVALID);
    assert_non_null(strstr(err.msg, "'a'"));
    st_entry meta_name = {.name = "__metadata__", .ndim = 1, .shape = {2}, .data = v};
    assert_int_equal(st_write(p, &meta_name, 1, NULL, 0, &err), PR_ERR_INVALID);
    st_entry neg = {.name = "n", .ndim = 1, .shape = {-1}, .data = v};
    assert_int_equal(st_write(p, &neg, 1, NULL, 0, &err), PR_ERR_INVALID);
    assert_non_null(strstr(err.msg, "'n'"));
    st_entry nodata = {.name = "z", .ndim = 1, .shape = {2}, .data = NULL};
    assert_int_equal(st_write(p, &nodata, 1, NULL, 0, &err), PR_ERR_INVALID);
    assert_int_equal(count_dir_entries(dir), 0);
    free(p);
    th_scratch_dir_free(dir);
}

/* ---- atomic writes ------------------------------------------------------------------------ */

static void test_atomic_abort_keeps_old(void **state)
{
    (void)state;
    char *dir = make_tmpdir();
    char *p = fileio_join(dir, "keep.bin");
    pr_error err = {0};
    assert_int_equal(fileio_write_atomic(p, "old contents", 12, &err), PR_OK);

    fileio_writer w;
    assert_int_equal(fileio_writer_open(&w, p, &err), PR_OK);
    assert_int_equal(fileio_writer_write(&w, "new", 3, &err), PR_OK);
    assert_int_equal(count_dir_entries(dir), 2); /* the temporary exists meanwhile */
    fileio_writer_abort(&w);
    assert_int_equal(count_dir_entries(dir), 1);
    char *buf = NULL;
    size_t len = 0;
    assert_int_equal(fileio_read_all(p, 100, &buf, &len, &err), PR_OK);
    assert_int_equal(len, 12);
    assert_string_equal(buf, "old contents");
    free(buf);

    /* a committed write replaces it */
    assert_int_equal(fileio_writer_open(&w, p, &err), PR_OK);
    assert_int_equal(fileio_writer_write(&w, "new ", 4, &err), PR_OK);
    assert_int_equal(fileio_writer_write(&w, "contents!", 9, &err), PR_OK);
    assert_int_equal(fileio_writer_commit(&w, &err), PR_OK);
    assert_int_equal(fileio_read_all(p, 100, &buf, &len, &err), PR_OK);
    assert_string_equal(buf, "new contents!");
    free(buf);
    assert_int_equal(count_dir_entries(dir), 1);

    /* size limit and missing files */
    assert_int_equal(fileio_read_all(p, 5, &buf, &len, &err), PR_ERR_FORMAT);
    assert_null(buf);
    assert_non_null(strstr(err.msg, p));
    char *missing = fileio_join(dir, "missing");
    assert_int_equal(fileio_read_all(missing, 5, &buf, &len, &err), PR_ERR_NOTFOUND);
    assert_non_null(strstr(err.msg, missing));
    free(missing);

    /* a directory that does not exist */
    char *nodir = fileio_join(dir, "no/such/file");
    assert_int_not_equal(fileio_write_atomic(nodir, "x", 1, &err), PR_OK);
    assert_non_null(strstr(err.msg, nodir));
    free(nodir);

    free(p);
    th_scratch_dir_free(dir);
}

/* A write that fails half-way (here: the file-size limit, standing in for
 * a full disk) leaves the old file and no temporary behind. */
static void test_atomic_failure_keeps_old(void **state)
{
    (void)state;
    char *dir = make_tmpdir();
    char *p = fileio_join(dir, "model.safetensors");
    float small[4] = {1, 2, 3, 4};
    st_entry e = {.name = "w", .ndim = 1, .shape = {4}, .data = small};
    pr_error err = {0};
    assert_int_equal(st_write(p, &e, 1, NULL, 0, &err), PR_OK);
    char *before = NULL;
    size_t before_len = 0;
    assert_int_equal(fileio_read_all(p, 1 << 20, &before, &before_len, &err), PR_OK);

    /* an old reader's mapping survives the replacement */
    st_file *old = NULL;
    assert_int_equal(st_open(p, 0, &old, &err), PR_OK);

    enum { BIG = 1 << 16 };
    float *big = calloc(BIG, sizeof *big);
    assert_non_null(big);
    st_entry be = {.name = "w", .ndim = 1, .shape = {BIG}, .data = big};

    struct rlimit saved;
    assert_int_equal(getrlimit(RLIMIT_FSIZE, &saved), 0);
    void (*prev)(int) = signal(SIGXFSZ, SIG_IGN);
    struct rlimit lim = saved;
    lim.rlim_cur = 4096;
    assert_int_equal(setrlimit(RLIMIT_FSIZE, &lim), 0);
    int rc = st_write(p, &be, 1, NULL, 0, &err);
    assert_int_equal(setrlimit(RLIMIT_FSIZE, &saved), 0);
    signal(SIGXFSZ, prev);

    assert_int_equal(rc, PR_ERR_IO);
    assert_non_null(strstr(err.msg, p));
    assert_non_null(strstr(err.msg, strerror(EFBIG)));
    assert_int_equal(count_dir_entries(dir), 1);
    char *after = NULL;
    size_t after_len = 0;
    assert_int_equal(fileio_read_all(p, 1 << 20, &after, &after_len, &err), PR_OK);
    assert_int_equal(after_len, before_len);
    assert_memory_equal(after, before, before_len);
    free(after);

    /* now replace it for real; the old mapping still reads the old values */
    assert_int_equal(st_write(p, &be, 1, NULL, 0, &err), PR_OK);
    const st_tensor *t = st_find(old, "w");
    assert_int_equal(t->numel, 4);
    assert_memory_equal(t->data, small, sizeof small);
    st_close(old);
    st_file *f = NULL;
    assert_int_equal(st_open(p, 0, &f, &err), PR_OK);
    assert_int_equal(st_find(f, "w")->numel, BIG);
    st_close(f);

    free(big);
    free(before);
    free(p);
    th_scratch_dir_free(dir);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_roundtrip_f32),
        cmocka_unit_test(test_writable_mapping_is_private),
        cmocka_unit_test(test_f16_to_f32_values),
        cmocka_unit_test(test_f32_to_f16_rounding),
        cmocka_unit_test(test_bf16_values),
        cmocka_unit_test(test_half_file),
        cmocka_unit_test(test_truncated),
        cmocka_unit_test(test_corrupt_headers),
        cmocka_unit_test(test_write_rejects_bad_entries),
        cmocka_unit_test(test_atomic_abort_keeps_old),
        cmocka_unit_test(test_atomic_failure_keeps_old),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
