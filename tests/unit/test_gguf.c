/*
 * test_gguf.c - the checked GGUF reader (engine/gguf.h) on files built byte
 * by byte in memory, and the model-level checks of engine_open on files
 * written to /tmp.
 *
 * The builder takes a description (metadata of every value type, tensor
 * infos, alignment) and records where each field landed, so malformed cases
 * are a valid file with one field patched.  Every malformed file must give
 * NULL and a one-line reason naming the problem; a prefix of a valid file
 * of any length must fail cleanly (the copies are exactly that long, so an
 * overread shows under AddressSanitizer).
 */
#include <check.h>
#include <fcntl.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "engine.h"
#include "enginetest.h"
#include "gguf.h"
#include "ops.h"

/* ==== Builder ========================================================== */

typedef struct {
    uint8_t *p;
    size_t n, cap;
} bytes;

static void put(bytes *b, const void *d, size_t n) {
    if (b->n + n > b->cap) {
        b->cap = (b->n + n) * 2 + 64;
        b->p = realloc(b->p, b->cap);
        ck_assert_ptr_nonnull(b->p);
    }
    if (n) memcpy(b->p + b->n, d, n);
    b->n += n;
}
static void put_u8(bytes *b, uint8_t v) { put(b, &v, 1); }
static void put_u16(bytes *b, uint16_t v) { put(b, &v, 2); }
static void put_u32(bytes *b, uint32_t v) { put(b, &v, 4); }
static void put_u64(bytes *b, uint64_t v) { put(b, &v, 8); }
static void put_str(bytes *b, const char *s) {
    put_u64(b, strlen(s));
    put(b, s, strlen(s));
}

typedef struct {
    const char *key;
    uint32_t type;
    uint64_t u;       /* unsigned / bool values */
    int64_t i;        /* signed values */
    double f;         /* float values */
    const char *s;    /* string value */
    uint32_t arr_type;
    int arr_n;
    const void *arr;  /* numeric array elements (packed, arr_type) */
    const char *const *strs; /* string array */
} kv_spec;

typedef struct {
    const char *name;
    uint32_t n_dims;
    uint64_t ne[6];
    uint32_t type;
    int64_t offset; /* -1: next aligned offset */
} tensor_spec;

#define MAX_KV 64
#define MAX_T 32

typedef struct {
    const char *magic;
    uint32_t version;
    kv_spec kv[MAX_KV];
    int n_kv;
    tensor_spec t[MAX_T];
    int n_t;
    uint64_t align; /* for laying out the data; general.alignment is a kv like any other */
    /* Tensor data: byte j of tensor k is (31k + 7j) & 0xff unless fill_f32
     * gives each F32 element a value. */
    float (*fill_f32)(int tensor, size_t elem);
} file_spec;

/* Where each field of the built file is. */
typedef struct {
    size_t version, n_tensors, n_kv;
    size_t kv_key[MAX_KV], kv_type[MAX_KV], kv_value[MAX_KV]; /* kv_value: first byte of the value */
    size_t t_name[MAX_T], t_ndims[MAX_T], t_dims[MAX_T], t_type[MAX_T], t_offset[MAX_T];
    uint64_t t_off[MAX_T], t_nbytes[MAX_T]; /* data offset and size of each tensor */
    size_t data_start;
} layout;

static size_t scalar_bytes(uint32_t t) {
    switch (t) {
    case GGUF_T_UINT8: case GGUF_T_INT8: case GGUF_T_BOOL: return 1;
    case GGUF_T_UINT16: case GGUF_T_INT16: return 2;
    case GGUF_T_UINT32: case GGUF_T_INT32: case GGUF_T_FLOAT32: return 4;
    default: return 8;
    }
}

static void put_scalar(bytes *b, uint32_t type, const kv_spec *k) {
    switch (type) {
    case GGUF_T_UINT8: put_u8(b, (uint8_t)k->u); break;
    case GGUF_T_INT8: put_u8(b, (uint8_t)(int8_t)k->i); break;
    case GGUF_T_BOOL: put_u8(b, (uint8_t)(k->u != 0)); break;
    case GGUF_T_UINT16: put_u16(b, (uint16_t)k->u); break;
    case GGUF_T_INT16: put_u16(b, (uint16_t)(int16_t)k->i); break;
    case GGUF_T_UINT32: put_u32(b, (uint32_t)k->u); break;
    case GGUF_T_INT32: put_u32(b, (uint32_t)(int32_t)k->i); break;
    case GGUF_T_FLOAT32: { float f = (float)k->f; put(b, &f, 4); break; }
    case GGUF_T_UINT64: put_u64(b, k->u); break;
    case GGUF_T_INT64: put_u64(b, (uint64_t)k->i); break;
    case GGUF_T_FLOAT64: put(b, &k->f, 8); break;
    default: put_u64(b, k->u); break; /* unknown types: 8 arbitrary bytes */
    }
}

static uint64_t tensor_bytes(const tensor_spec *t) {
    uint64_t n = 1;
    for (uint32_t d = 1; d < t->n_dims && d < 6; d++) n *= t->ne[d];
    size_t rb = t->n_dims ? ggml_row_bytes(t->type, t->ne[0]) : 0;
    return (uint64_t)rb * n;
}

static bytes build(const file_spec *fs, layout *lo) {
    bytes b = {0};
    layout l;
    memset(&l, 0, sizeof l);
    put(&b, fs->magic ? fs->magic : "GGUF", 4);
    l.version = b.n;
    put_u32(&b, fs->version ? fs->version : 3);
    l.n_tensors = b.n;
    put_u64(&b, (uint64_t)fs->n_t);
    l.n_kv = b.n;
    put_u64(&b, (uint64_t)fs->n_kv);
    for (int i = 0; i < fs->n_kv; i++) {
        const kv_spec *k = &fs->kv[i];
        l.kv_key[i] = b.n;
        put_str(&b, k->key);
        l.kv_type[i] = b.n;
        put_u32(&b, k->type);
        l.kv_value[i] = b.n;
        if (k->type == GGUF_T_STRING) {
            put_str(&b, k->s);
        } else if (k->type == GGUF_T_ARRAY) {
            put_u32(&b, k->arr_type);
            put_u64(&b, (uint64_t)k->arr_n);
            if (k->arr_type == GGUF_T_STRING)
                for (int j = 0; j < k->arr_n; j++) put_str(&b, k->strs[j]);
            else
                put(&b, k->arr, (size_t)k->arr_n * scalar_bytes(k->arr_type));
        } else {
            put_scalar(&b, k->type, k);
        }
    }
    uint64_t align = fs->align ? fs->align : 32, next = 0, data_size = 0;
    for (int i = 0; i < fs->n_t; i++) {
        const tensor_spec *t = &fs->t[i];
        l.t_name[i] = b.n;
        put_str(&b, t->name);
        l.t_ndims[i] = b.n;
        put_u32(&b, t->n_dims);
        l.t_dims[i] = b.n;
        for (uint32_t d = 0; d < t->n_dims && d < 6; d++) put_u64(&b, t->ne[d]);
        l.t_type[i] = b.n;
        put_u32(&b, t->type);
        l.t_offset[i] = b.n;
        uint64_t nb = tensor_bytes(t);
        uint64_t off = t->offset >= 0 ? (uint64_t)t->offset : next;
        put_u64(&b, off);
        l.t_off[i] = off;
        l.t_nbytes[i] = nb;
        if (off + nb > data_size) data_size = off + nb;
        next = (off + nb + align - 1) / align * align;
    }
    while (fs->n_t > 0 && b.n % align) put_u8(&b, 0);
    l.data_start = b.n;
    if (data_size > (1u << 24)) data_size = 0; /* absurd offsets: no data */
    uint8_t *data = calloc(data_size ? data_size : 1, 1);
    for (int i = 0; i < fs->n_t; i++) {
        if (l.t_off[i] + l.t_nbytes[i] > data_size) continue;
        uint8_t *d = data + l.t_off[i];
        if (fs->fill_f32 && fs->t[i].type == GGML_F32) {
            for (uint64_t e = 0; e < l.t_nbytes[i] / 4; e++) {
                float v = fs->fill_f32(i, e);
                memcpy(d + 4 * e, &v, 4);
            }
        } else {
            for (uint64_t j = 0; j < l.t_nbytes[i]; j++) d[j] = (uint8_t)((31 * i + 7 * j) & 0xff);
        }
    }
    put(&b, data, data_size);
    free(data);
    if (lo) *lo = l;
    return b;
}

static void patch_u32(bytes *b, size_t at, uint32_t v) { memcpy(b->p + at, &v, 4); }
static void patch_u64(bytes *b, size_t at, uint64_t v) { memcpy(b->p + at, &v, 8); }

/* A parse of an exact-size copy of the first len bytes (so reading past
 * the end is an ASan error); the copy lives until parsed_free. */
typedef struct {
    gguf *g;
    uint8_t *copy;
} parsed;

static parsed parse_copy(const bytes *b, size_t len, char *err, size_t errlen) {
    parsed r = {NULL, malloc(len ? len : 1)};
    ck_assert_ptr_nonnull(r.copy);
    if (len) memcpy(r.copy, b->p, len);
    err[0] = 0;
    r.g = gguf_parse(r.copy, len, err, errlen);
    return r;
}

static void parsed_free(parsed *r) {
    gguf_close(r->g);
    free(r->copy);
    r->g = NULL;
    r->copy = NULL;
}

/* Asserts that b fails to parse with a one-line message containing each of
 * the NULL-terminated substrings. */
static void expect_fail(const bytes *b, const char *what, ...) {
    char err[512];
    parsed r = parse_copy(b, b->n, err, sizeof err);
    bool failed = r.g == NULL;
    parsed_free(&r);
    ck_assert_msg(failed, "%s: parsed a malformed file", what);
    ck_assert_msg(err[0] != 0, "%s: no error message", what);
    ck_assert_msg(strchr(err, '\n') == NULL, "%s: message is not one line: %s", what, err);
    va_list ap;
    va_start(ap, what);
    for (const char *s; (s = va_arg(ap, const char *)) != NULL;)
        ck_assert_msg(strstr(err, s) != NULL, "%s: message lacks '%s': %s", what, s, err);
    va_end(ap);
}

/* ==== The valid file =================================================== */

static const int32_t arr_i32[] = {1, -2, 3};
static const float arr_f32[] = {0.5f, -1.25f};
static const char *const arr_strs[] = {"x", "yz", ""};

enum { KV_ARCH, KV_U8, KV_I8, KV_U16, KV_I16, KV_U32, KV_I32, KV_F32, KV_BOOL, KV_U64, KV_I64, KV_F64, KV_STR,
       KV_ARR_I32, KV_ARR_F32, KV_ARR_STR, KV_ARR_EMPTY, N_KV };
enum { T0, T1, T2, T3, N_T };

static file_spec valid_spec(void) {
    file_spec fs;
    memset(&fs, 0, sizeof fs);
    fs.kv[KV_ARCH] = (kv_spec){.key = "general.architecture", .type = GGUF_T_STRING, .s = "llama"};
    fs.kv[KV_U8] = (kv_spec){.key = "t.u8", .type = GGUF_T_UINT8, .u = 200};
    fs.kv[KV_I8] = (kv_spec){.key = "t.i8", .type = GGUF_T_INT8, .i = -100};
    fs.kv[KV_U16] = (kv_spec){.key = "t.u16", .type = GGUF_T_UINT16, .u = 60000};
    fs.kv[KV_I16] = (kv_spec){.key = "t.i16", .type = GGUF_T_INT16, .i = -30000};
    fs.kv[KV_U32] = (kv_spec){.key = "t.u32", .type = GGUF_T_UINT32, .u = 4000000000u};
    fs.kv[KV_I32] = (kv_spec){.key = "t.i32", .type = GGUF_T_INT32, .i = -2000000000};
    fs.kv[KV_F32] = (kv_spec){.key = "t.f32", .type = GGUF_T_FLOAT32, .f = 1.5};
    fs.kv[KV_BOOL] = (kv_spec){.key = "t.bool", .type = GGUF_T_BOOL, .u = 1};
    fs.kv[KV_U64] = (kv_spec){.key = "t.u64", .type = GGUF_T_UINT64, .u = (1ull << 40) + 3};
    fs.kv[KV_I64] = (kv_spec){.key = "t.i64", .type = GGUF_T_INT64, .i = -(1ll << 40)};
    fs.kv[KV_F64] = (kv_spec){.key = "t.f64", .type = GGUF_T_FLOAT64, .f = 3.25};
    fs.kv[KV_STR] = (kv_spec){.key = "t.str", .type = GGUF_T_STRING, .s = "h\xc3\xa9llo"};
    fs.kv[KV_ARR_I32] = (kv_spec){.key = "t.arr_i32", .type = GGUF_T_ARRAY, .arr_type = GGUF_T_INT32, .arr_n = 3,
                                  .arr = arr_i32};
    fs.kv[KV_ARR_F32] = (kv_spec){.key = "t.arr_f32", .type = GGUF_T_ARRAY, .arr_type = GGUF_T_FLOAT32, .arr_n = 2,
                                  .arr = arr_f32};
    fs.kv[KV_ARR_STR] = (kv_spec){.key = "t.arr_str", .type = GGUF_T_ARRAY, .arr_type = GGUF_T_STRING, .arr_n = 3,
                                  .strs = arr_strs};
    fs.kv[KV_ARR_EMPTY] = (kv_spec){.key = "t.arr_empty", .type = GGUF_T_ARRAY, .arr_type = GGUF_T_UINT8, .arr_n = 0,
                                    .arr = arr_i32};
    fs.n_kv = N_KV;
    fs.t[T0] = (tensor_spec){"t0", 2, {4, 2}, GGML_F32, -1};       /* 32 bytes at 0 */
    fs.t[T1] = (tensor_spec){"t1", 1, {8}, GGML_F16, -1};          /* 16 bytes at 32 */
    fs.t[T2] = (tensor_spec){"t2", 2, {32, 2}, GGML_Q8_0, -1};     /* 68 bytes at 64 */
    fs.t[T3] = (tensor_spec){"t3", 3, {2, 3, 2}, GGML_BF16, -1};   /* 24 bytes at 160 */
    fs.n_t = N_T;
    return fs;
}

START_TEST(test_valid_roundtrip) {
    file_spec fs = valid_spec();
    layout lo;
    bytes b = build(&fs, &lo);
    char err[512];
    parsed r = parse_copy(&b, b.n, err, sizeof err);
    gguf *g = r.g;
    ck_assert_msg(g != NULL, "valid file rejected: %s", err);
    const uint8_t *base = r.copy;

    ck_assert_uint_eq(gguf_version(g), 3);
    ck_assert_uint_eq(gguf_file_size(g), b.n);
    ck_assert_uint_eq(gguf_n_kv(g), N_KV);
    ck_assert_uint_eq(gguf_n_tensors(g), N_T);
    for (int i = 0; i < N_KV; i++) ck_assert(gguf_str_eq(gguf_kv_at(g, (uint64_t)i)->key, fs.kv[i].key));
    ck_assert_ptr_null(gguf_kv_at(g, N_KV));
    ck_assert_ptr_null(gguf_tensor_at(g, N_T));
    ck_assert_ptr_null(gguf_find(g, "t.missing"));
    ck_assert_ptr_null(gguf_find_tensor(g, "t9"));

    /* Typed getters. */
    uint64_t u;
    double f;
    bool bv, bad;
    gguf_str s;
    ck_assert(gguf_get_u64(g, "t.u8", &u, NULL) && u == 200);
    ck_assert(gguf_get_u64(g, "t.u16", &u, NULL) && u == 60000);
    ck_assert(gguf_get_u64(g, "t.u32", &u, NULL) && u == 4000000000u);
    ck_assert(gguf_get_u64(g, "t.u64", &u, NULL) && u == (1ull << 40) + 3);
    bad = false;
    ck_assert(!gguf_get_u64(g, "t.i32", &u, &bad) && bad); /* negative */
    bad = false;
    ck_assert(!gguf_get_u64(g, "t.str", &u, &bad) && bad);
    bad = false;
    ck_assert(!gguf_get_u64(g, "t.missing", &u, &bad) && !bad);
    ck_assert_int_eq(gguf_find(g, "t.i8")->v.i, -100);
    ck_assert_int_eq(gguf_find(g, "t.i16")->v.i, -30000);
    ck_assert_int_eq(gguf_find(g, "t.i32")->v.i, -2000000000);
    ck_assert_int_eq(gguf_find(g, "t.i64")->v.i, -(1ll << 40));
    ck_assert(gguf_get_f64(g, "t.f32", &f, NULL) && f == 1.5);
    ck_assert(gguf_get_f64(g, "t.f64", &f, NULL) && f == 3.25);
    ck_assert(gguf_get_f64(g, "t.i16", &f, NULL) && f == -30000.0);
    ck_assert(gguf_get_f64(g, "t.u32", &f, NULL) && f == 4000000000.0);
    bad = false;
    ck_assert(!gguf_get_f64(g, "t.bool", &f, &bad) && bad);
    ck_assert(gguf_get_bool(g, "t.bool", &bv, NULL) && bv);
    bad = false;
    ck_assert(!gguf_get_bool(g, "t.u8", &bv, &bad) && bad);
    ck_assert(gguf_get_str(g, "t.str", &s, NULL) && gguf_str_eq(s, "h\xc3\xa9llo"));
    ck_assert(gguf_get_str(g, "general.architecture", &s, NULL) && gguf_str_eq(s, "llama"));
    bad = false;
    ck_assert(!gguf_get_str(g, "t.arr_str", &s, &bad) && bad);

    /* Arrays. */
    const gguf_kv *a = gguf_find(g, "t.arr_i32");
    ck_assert_uint_eq(a->type, GGUF_T_ARRAY);
    ck_assert_uint_eq(a->v.arr.type, GGUF_T_INT32);
    ck_assert_uint_eq(a->v.arr.n, 3);
    for (int i = 0; i < 3; i++) {
        ck_assert_int_eq(gguf_arr_i64(a, (uint64_t)i), arr_i32[i]);
        ck_assert(gguf_arr_f64(a, (uint64_t)i) == arr_i32[i]);
    }
    a = gguf_find(g, "t.arr_f32");
    ck_assert(gguf_arr_f64(a, 0) == 0.5 && gguf_arr_f64(a, 1) == -1.25);
    ck_assert_int_eq(gguf_arr_i64(a, 1), -1);
    a = gguf_find(g, "t.arr_str");
    ck_assert_uint_eq(a->v.arr.type, GGUF_T_STRING);
    ck_assert_uint_eq(a->v.arr.n, 3);
    ck_assert_ptr_nonnull(a->v.arr.strs);
    for (int i = 0; i < 3; i++) ck_assert(gguf_str_eq(a->v.arr.strs[i], arr_strs[i]));
    a = gguf_find(g, "t.arr_empty");
    ck_assert_uint_eq(a->v.arr.n, 0);

    /* Strings point into the buffer. */
    ck_assert_ptr_eq(gguf_find(g, "t.str")->v.s.p, (const char *)base + lo.kv_value[KV_STR] + 8);

    /* Tensors. */
    static const uint64_t nbytes[N_T] = {32, 16, 68, 24}, offs[N_T] = {0, 32, 64, 160};
    for (int i = 0; i < N_T; i++) {
        const gguf_tensor *t = gguf_find_tensor(g, fs.t[i].name);
        ck_assert_ptr_eq(t, gguf_tensor_at(g, (uint64_t)i));
        ck_assert_uint_eq(t->n_dims, fs.t[i].n_dims);
        for (uint32_t d = 0; d < GGUF_MAX_DIMS; d++) ck_assert_uint_eq(t->ne[d], d < t->n_dims ? fs.t[i].ne[d] : 1);
        ck_assert_uint_eq(t->type, fs.t[i].type);
        ck_assert_uint_eq(t->offset, offs[i]);
        ck_assert_uint_eq(t->nbytes, nbytes[i]);
        ck_assert_ptr_eq(t->data, base + lo.data_start + offs[i]);
        for (uint64_t j = 0; j < t->nbytes; j++)
            ck_assert_uint_eq(((const uint8_t *)t->data)[j], (31 * i + 7 * j) & 0xff);
    }
    ck_assert_uint_eq(lo.data_start % 32, 0);
    ck_assert_uint_eq(b.n, lo.data_start + 160 + 24); /* the file ends with the last tensor */
    parsed_free(&r);
    free(b.p);
}
END_TEST

START_TEST(test_valid_alignment_and_empty) {
    /* general.alignment = 64 moves the data section and every offset. */
    file_spec fs = valid_spec();
    fs.kv[fs.n_kv++] = (kv_spec){.key = "general.alignment", .type = GGUF_T_UINT32, .u = 64};
    fs.align = 64;
    layout lo;
    bytes b = build(&fs, &lo);
    char err[512];
    parsed r = parse_copy(&b, b.n, err, sizeof err);
    gguf *g = r.g;
    ck_assert_msg(g != NULL, "%s", err);
    ck_assert_uint_eq(lo.data_start % 64, 0);
    const uint8_t *base = r.copy;
    static const uint64_t offs[N_T] = {0, 64, 128, 256};
    for (int i = 0; i < N_T; i++) {
        ck_assert_uint_eq(gguf_tensor_at(g, (uint64_t)i)->offset, offs[i]);
        ck_assert_ptr_eq(gguf_tensor_at(g, (uint64_t)i)->data, base + lo.data_start + offs[i]);
    }
    /* With alignment 64, offset 32 is misaligned. */
    patch_u64(&b, lo.t_offset[T1], 32);
    expect_fail(&b, "offset 32 at alignment 64", "'t1'", "not aligned to 64", NULL);
    parsed_free(&r);
    free(b.p);

    /* No tensors, no metadata: a 24-byte header is a valid file. */
    file_spec empty;
    memset(&empty, 0, sizeof empty);
    b = build(&empty, NULL);
    ck_assert_uint_eq(b.n, 24);
    r = parse_copy(&b, b.n, err, sizeof err);
    ck_assert_msg(r.g != NULL, "%s", err);
    ck_assert_uint_eq(gguf_n_kv(r.g), 0);
    ck_assert_uint_eq(gguf_n_tensors(r.g), 0);
    parsed_free(&r);
    free(b.p);
}
END_TEST

/* ==== Malformed files ================================================== */

START_TEST(test_truncated_everywhere) {
    file_spec fs = valid_spec();
    bytes b = build(&fs, NULL);
    char err[512];
    for (size_t len = 0; len < b.n; len++) {
        parsed r = parse_copy(&b, len, err, sizeof err);
        bool failed = r.g == NULL;
        parsed_free(&r);
        ck_assert_msg(failed, "prefix of %zu of %zu bytes parsed", len, b.n);
        ck_assert_msg(err[0] != 0 && strchr(err, '\n') == NULL, "prefix %zu: bad message '%s'", len, err);
    }
    /* Some prefixes, by what they cut. */
    const struct {
        size_t len;
        const char *a, *b;
    } cuts[] = {{2, "truncated", "magic"}, {6, "truncated", "version"}, {20, "truncated", "metadata count"},
                {b.n - 1, "'t3'", "past the end"}};
    for (size_t i = 0; i < sizeof cuts / sizeof cuts[0]; i++) {
        parsed r = parse_copy(&b, cuts[i].len, err, sizeof err);
        ck_assert_ptr_null(r.g);
        parsed_free(&r);
        ck_assert_msg(strstr(err, cuts[i].a) && strstr(err, cuts[i].b), "prefix %zu: %s", cuts[i].len, err);
    }
    free(b.p);
}
END_TEST

START_TEST(test_bad_header) {
    file_spec fs = valid_spec();
    layout lo;
    fs.magic = "GGUX";
    bytes b = build(&fs, &lo);
    expect_fail(&b, "magic", "magic", NULL);
    free(b.p);
    fs.magic = "FUGG";
    b = build(&fs, &lo);
    expect_fail(&b, "byte-swapped magic", "magic", NULL);
    free(b.p);
    fs.magic = NULL;
    fs.version = 2;
    b = build(&fs, &lo);
    expect_fail(&b, "version 2", "version 2", NULL);
    patch_u32(&b, lo.version, 4);
    expect_fail(&b, "version 4", "version 4", NULL);
    patch_u32(&b, lo.version, 0x03000000); /* a big-endian file's 3 */
    expect_fail(&b, "big-endian version", "version", NULL);
    patch_u32(&b, lo.version, 3);
    patch_u64(&b, lo.n_kv, 1ull << 40);
    expect_fail(&b, "absurd kv count", "metadata count", NULL);
    patch_u64(&b, lo.n_kv, UINT64_MAX);
    expect_fail(&b, "kv count 2^64-1", "metadata count", NULL);
    patch_u64(&b, lo.n_kv, N_KV);
    patch_u64(&b, lo.n_tensors, 1ull << 40);
    expect_fail(&b, "absurd tensor count", "tensor count", NULL);
    patch_u64(&b, lo.n_tensors, UINT64_MAX / 2);
    expect_fail(&b, "tensor count 2^63", "tensor count", NULL);
    /* Plausible but wrong counts: parsing runs into the next section and
     * must still fail cleanly. */
    patch_u64(&b, lo.n_tensors, N_T);
    patch_u64(&b, lo.n_kv, N_KV + 1);
    expect_fail(&b, "one kv too many", NULL);
    patch_u64(&b, lo.n_kv, N_KV);
    patch_u64(&b, lo.n_tensors, N_T + 1);
    expect_fail(&b, "one tensor too many", NULL);
    free(b.p);
}
END_TEST

START_TEST(test_bad_lengths) {
    file_spec fs = valid_spec();
    layout lo;
    bytes b = build(&fs, &lo);
    /* A key length past the end. */
    patch_u64(&b, lo.kv_key[KV_U16], 1ull << 40);
    expect_fail(&b, "key length", "metadata key", "has length", NULL);
    patch_u64(&b, lo.kv_key[KV_U16], strlen("t.u16"));
    /* A key of length 0, and an absurdly long one that fits. */
    patch_u64(&b, lo.kv_key[KV_U16], 0);
    expect_fail(&b, "empty key", "invalid length", NULL);
    patch_u64(&b, lo.kv_key[KV_U16], strlen("t.u16"));
    /* A string value past the end. */
    patch_u64(&b, lo.kv_value[KV_STR], b.n);
    expect_fail(&b, "string value length", "metadata value", "has length", NULL);
    patch_u64(&b, lo.kv_value[KV_STR], strlen("h\xc3\xa9llo"));
    /* A numeric array longer than the file. */
    patch_u64(&b, lo.kv_value[KV_ARR_I32] + 4, 1ull << 40);
    expect_fail(&b, "numeric array length", "'t.arr_i32'", "exceeds", NULL);
    patch_u64(&b, lo.kv_value[KV_ARR_I32] + 4, UINT64_MAX / 2); /* n * 4 would overflow */
    expect_fail(&b, "numeric array length overflow", "'t.arr_i32'", NULL);
    patch_u64(&b, lo.kv_value[KV_ARR_I32] + 4, 3);
    /* A string array longer than the file, and one whose last string runs
     * past the end. */
    patch_u64(&b, lo.kv_value[KV_ARR_STR] + 4, 1ull << 40);
    expect_fail(&b, "string array length", "'t.arr_str'", "string array", NULL);
    patch_u64(&b, lo.kv_value[KV_ARR_STR] + 4, 3);
    patch_u64(&b, lo.kv_value[KV_ARR_STR] + 12, 1ull << 30);
    expect_fail(&b, "array string length", "array string", "has length", NULL);
    patch_u64(&b, lo.kv_value[KV_ARR_STR] + 12, 1);
    /* A tensor name past the end, and an empty one. */
    patch_u64(&b, lo.t_name[T2], 1ull << 40);
    expect_fail(&b, "tensor name length", "tensor name", "has length", NULL);
    patch_u64(&b, lo.t_name[T2], 0);
    expect_fail(&b, "empty tensor name", "tensor 2", "name length", NULL);
    patch_u64(&b, lo.t_name[T2], 2);
    char err[512];
    parsed r = parse_copy(&b, b.n, err, sizeof err); /* every patch undone */
    ck_assert_msg(r.g != NULL, "%s", err);
    parsed_free(&r);
    free(b.p);
}
END_TEST

START_TEST(test_bad_types) {
    file_spec fs = valid_spec();
    layout lo;
    bytes b = build(&fs, &lo);
    patch_u32(&b, lo.kv_type[KV_U8], 13);
    expect_fail(&b, "unknown value type", "'t.u8'", "unknown value type 13", NULL);
    patch_u32(&b, lo.kv_type[KV_U8], 0xffffffffu);
    expect_fail(&b, "value type 2^32-1", "'t.u8'", "unknown value type", NULL);
    patch_u32(&b, lo.kv_type[KV_U8], GGUF_T_UINT8);
    patch_u32(&b, lo.kv_value[KV_ARR_I32], 13);
    expect_fail(&b, "unknown array element type", "'t.arr_i32'", "array element type 13", NULL);
    patch_u32(&b, lo.kv_value[KV_ARR_I32], GGUF_T_ARRAY); /* arrays of arrays */
    expect_fail(&b, "nested array", "'t.arr_i32'", "array element type 9", NULL);
    patch_u32(&b, lo.kv_value[KV_ARR_I32], GGUF_T_INT32);
    patch_u32(&b, lo.t_type[T1], 99);
    expect_fail(&b, "unknown tensor type", "'t1'", "unknown type 99", NULL);
    patch_u32(&b, lo.t_type[T1], 4); /* the removed Q4_2 */
    expect_fail(&b, "removed tensor type", "'t1'", "unknown type 4", NULL);
    free(b.p);
}
END_TEST

START_TEST(test_bad_shapes) {
    file_spec fs = valid_spec();
    layout lo;
    bytes b = build(&fs, &lo);
    patch_u64(&b, lo.t_dims[T0], 0);
    expect_fail(&b, "zero dimension", "'t0'", "shape", NULL);
    patch_u64(&b, lo.t_dims[T0], 1ull << 41);
    expect_fail(&b, "absurd dimension", "'t0'", "shape", NULL);
    patch_u64(&b, lo.t_dims[T0], 4);
    /* Each dimension plausible, the product absurd. */
    patch_u64(&b, lo.t_dims[T3], 1ull << 20);
    patch_u64(&b, lo.t_dims[T3] + 8, 1ull << 20);
    patch_u64(&b, lo.t_dims[T3] + 16, 1ull << 20);
    expect_fail(&b, "absurd element count", "'t3'", "shape", NULL);
    patch_u64(&b, lo.t_dims[T3], 2);
    patch_u64(&b, lo.t_dims[T3] + 8, 3);
    patch_u64(&b, lo.t_dims[T3] + 16, 2);
    patch_u32(&b, lo.t_ndims[T1], 0);
    expect_fail(&b, "no dimensions", "'t1'", "0 dimensions", NULL);
    free(b.p);

    fs.t[T1].n_dims = 5;
    fs.t[T1].ne[1] = fs.t[T1].ne[2] = fs.t[T1].ne[3] = fs.t[T1].ne[4] = 1;
    b = build(&fs, &lo);
    expect_fail(&b, "five dimensions", "'t1'", "5 dimensions", NULL);
    free(b.p);

    /* A Q8_0 row must be whole blocks of 32. */
    fs = valid_spec();
    b = build(&fs, &lo);
    patch_u64(&b, lo.t_dims[T2], 33);
    expect_fail(&b, "Q8_0 row of 33", "'t2'", "not a whole number of Q8_0 blocks", NULL);
    patch_u64(&b, lo.t_dims[T2], 16);
    expect_fail(&b, "Q8_0 row of 16", "'t2'", "Q8_0 blocks", NULL);
    free(b.p);
}
END_TEST

START_TEST(test_bad_offsets) {
    file_spec fs = valid_spec();
    layout lo;
    bytes b = build(&fs, &lo);
    patch_u64(&b, lo.t_offset[T1], 33);
    expect_fail(&b, "misaligned offset", "'t1'", "not aligned to 32", NULL);
    patch_u64(&b, lo.t_offset[T1], 32);
    patch_u64(&b, lo.t_offset[T3], 1u << 20);
    expect_fail(&b, "tensor past the end", "'t3'", "past the end", NULL);
    patch_u64(&b, lo.t_offset[T3], UINT64_MAX - 31); /* aligned; offset + size overflows */
    expect_fail(&b, "offset near 2^64", "'t3'", "past the end", NULL);
    patch_u64(&b, lo.t_offset[T3], 160);
    /* The offset is fine but the size is not: t0 grows to 4 x 1000 floats. */
    patch_u64(&b, lo.t_dims[T0] + 8, 1000);
    expect_fail(&b, "tensor too large", "'t0'", "past the end", NULL);
    free(b.p);
}
END_TEST

START_TEST(test_duplicates) {
    file_spec fs = valid_spec();
    fs.kv[fs.n_kv++] = (kv_spec){.key = "t.u8", .type = GGUF_T_UINT8, .u = 1};
    bytes b = build(&fs, NULL);
    expect_fail(&b, "duplicate key", "duplicate metadata key 't.u8'", NULL);
    free(b.p);
    fs = valid_spec();
    fs.t[fs.n_t++] = (tensor_spec){"t1", 1, {8}, GGML_F16, -1};
    b = build(&fs, NULL);
    expect_fail(&b, "duplicate tensor", "duplicate tensor name 't1'", NULL);
    free(b.p);
}
END_TEST

START_TEST(test_bad_alignment) {
    const struct {
        uint32_t type;
        uint64_t v;
    } bad[] = {{GGUF_T_UINT32, 0}, {GGUF_T_UINT32, 3}, {GGUF_T_UINT32, 48}, {GGUF_T_UINT32, 131072},
               {GGUF_T_UINT64, 32}, {GGUF_T_INT32, 32}, {GGUF_T_STRING, 0}};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        file_spec fs = valid_spec();
        fs.kv[fs.n_kv++] = (kv_spec){.key = "general.alignment", .type = bad[i].type, .u = bad[i].v, .i = (int64_t)bad[i].v,
                                     .s = "32"};
        bytes b = build(&fs, NULL);
        expect_fail(&b, "bad alignment", "general.alignment", NULL);
        free(b.p);
    }
}
END_TEST

/* ==== gguf_open and the real file ====================================== */

START_TEST(test_open_errors) {
    char err[512];
    ck_assert_ptr_null(gguf_open("/nonexistent/model.gguf", err, sizeof err));
    ck_assert_msg(strstr(err, "cannot open") && strstr(err, "/nonexistent/model.gguf"), "%s", err);
    ck_assert_ptr_null(gguf_open("/tmp", err, sizeof err));
    ck_assert_msg(strstr(err, "not a regular file"), "%s", err);
    char path[] = "/tmp/saserve-gguf-XXXXXX";
    int fd = mkstemp(path);
    ck_assert_int_ge(fd, 0);
    ck_assert_int_eq(write(fd, "GGUF\3\0\0\0", 8), 8);
    close(fd);
    ck_assert_ptr_null(gguf_open(path, err, sizeof err));
    ck_assert_msg(strstr(err, "too small"), "%s", err);
    /* A malformed file's message starts with the path. */
    file_spec fs = valid_spec();
    bytes b = build(&fs, NULL);
    fd = open(path, O_WRONLY | O_TRUNC);
    ck_assert_int_eq(write(fd, b.p, b.n - 1), (ssize_t)(b.n - 1));
    close(fd);
    ck_assert_ptr_null(gguf_open(path, err, sizeof err));
    ck_assert_msg(strncmp(err, path, strlen(path)) == 0 && strstr(err, "'t3'"), "%s", err);
    fd = open(path, O_WRONLY | O_TRUNC);
    ck_assert_int_eq(write(fd, b.p, b.n), (ssize_t)b.n);
    close(fd);
    gguf *g = gguf_open(path, err, sizeof err);
    ck_assert_msg(g != NULL, "%s", err);
    ck_assert_uint_eq(gguf_n_tensors(g), N_T);
    gguf_close(g);
    unlink(path);
    free(b.p);
}
END_TEST

START_TEST(test_real_file) {
    char err[512];
    gguf *g = gguf_open(BUNDLED_MODEL, err, sizeof err);
    ck_assert_msg(g != NULL, "%s", err);
    ck_assert_uint_eq(gguf_version(g), 3);
    ck_assert_uint_eq(gguf_n_tensors(g), 111); /* 12 layers x 9 + embeddings, output, output norm */
    ck_assert_uint_eq(gguf_n_kv(g), 29);
    struct stat st;
    ck_assert_int_eq(stat(BUNDLED_MODEL, &st), 0);
    ck_assert_uint_eq(gguf_file_size(g), (size_t)st.st_size);
    gguf_str s;
    uint64_t u;
    double f;
    bool bv;
    ck_assert(gguf_get_str(g, "general.architecture", &s, NULL) && gguf_str_eq(s, "llama"));
    ck_assert(gguf_get_str(g, "general.name", &s, NULL) && gguf_str_eq(s, "sa-tiny-sa"));
    ck_assert(gguf_get_str(g, "saserve.shared_layers", &s, NULL) && gguf_str_eq(s, "4-11"));
    ck_assert(gguf_str_eq(gguf_kv_at(g, 28)->key, "saserve.shared_layers")); /* added last */
    ck_assert(gguf_get_str(g, "tokenizer.ggml.model", &s, NULL) && gguf_str_eq(s, "llama"));
    ck_assert(gguf_get_u64(g, "llama.block_count", &u, NULL) && u == 12);
    ck_assert(gguf_get_u64(g, "llama.embedding_length", &u, NULL) && u == 384);
    ck_assert(gguf_get_u64(g, "llama.feed_forward_length", &u, NULL) && u == 1024);
    ck_assert(gguf_get_u64(g, "llama.attention.head_count", &u, NULL) && u == 6);
    ck_assert(gguf_get_u64(g, "llama.attention.head_count_kv", &u, NULL) && u == 2);
    ck_assert(gguf_get_u64(g, "llama.context_length", &u, NULL) && u == 1024);
    ck_assert(gguf_get_u64(g, "tokenizer.ggml.bos_token_id", &u, NULL) && u == 1);
    ck_assert(gguf_get_u64(g, "tokenizer.ggml.eos_token_id", &u, NULL) && u == 2);
    ck_assert(gguf_get_u64(g, "general.file_type", &u, NULL) && u == 7); /* MOSTLY_Q8_0 */
    ck_assert(gguf_get_f64(g, "llama.rope.freq_base", &f, NULL) && f == 10000.0);
    ck_assert(gguf_get_f64(g, "llama.attention.layer_norm_rms_epsilon", &f, NULL) && fabs(f - 1e-5) < 1e-12);
    ck_assert(gguf_get_bool(g, "tokenizer.ggml.add_bos_token", &bv, NULL) && bv);
    const gguf_kv *toks = gguf_find(g, "tokenizer.ggml.tokens");
    ck_assert_uint_eq(toks->v.arr.type, GGUF_T_STRING);
    ck_assert_uint_eq(toks->v.arr.n, 8192);
    ck_assert(gguf_str_eq(toks->v.arr.strs[1], "<s>"));
    ck_assert(gguf_str_eq(toks->v.arr.strs[3], "<0x00>"));
    ck_assert(gguf_str_eq(toks->v.arr.strs[361], "\xe2\x96\x81The"));
    const gguf_kv *scores = gguf_find(g, "tokenizer.ggml.scores");
    ck_assert_uint_eq(scores->v.arr.type, GGUF_T_FLOAT32);
    ck_assert_uint_eq(scores->v.arr.n, 8192);

    const gguf_tensor *q = gguf_find_tensor(g, "blk.0.attn_q.weight");
    ck_assert_ptr_nonnull(q);
    ck_assert_uint_eq(q->type, GGML_Q8_0);
    ck_assert_uint_eq(q->n_dims, 2);
    ck_assert_uint_eq(q->ne[0], 384);
    ck_assert_uint_eq(q->ne[1], 384);
    ck_assert_uint_eq(q->nbytes, 384 * 12 * 34);
    const gguf_tensor *k = gguf_find_tensor(g, "blk.11.attn_k.weight");
    ck_assert_uint_eq(k->ne[1], 128);
    const gguf_tensor *n = gguf_find_tensor(g, "output_norm.weight");
    ck_assert_uint_eq(n->type, GGML_F32);
    ck_assert_uint_eq(n->n_dims, 1);
    ck_assert_uint_eq(n->ne[0], 384);
    /* Data pointers are aligned and inside the file; norms are sane. */
    size_t total = 0;
    for (uint64_t i = 0; i < gguf_n_tensors(g); i++) {
        const gguf_tensor *t = gguf_tensor_at(g, i);
        ck_assert_uint_eq(t->offset % 32, 0);
        total += t->nbytes;
    }
    ck_assert_uint_le(total, gguf_file_size(g));
    const float *w = n->data;
    for (int i = 0; i < 384; i++) ck_assert(isfinite(w[i]) && fabsf(w[i]) < 100.0f);
    gguf_close(g);
}
END_TEST

/* ==== Model-level errors through engine_open =========================== */

/* A 2-layer llama: n_embd 32, 4 heads of 8 (2 KV heads), n_ff 64, vocab 8. */
#define TM_EMBD 32
#define TM_FF 64
#define TM_VOCAB 8

static const char *const tm_tokens[TM_VOCAB] = {"<unk>", "<s>", "</s>", "\xe2\x96\x81" "a", "a", "b",
                                                "\xe2\x96\x81" "b", "\xe2\x96\x81"};
static const float tm_scores[TM_VOCAB] = {0, 0, 0, -1, -2, -3, -4, -5};
static const int32_t tm_types[TM_VOCAB] = {2, 3, 3, 1, 1, 1, 1, 1};

static float tm_fill(int tensor, size_t e) {
    return 0.05f * sinf((float)(tensor * 131 + (int)e) * 0.37f) + (tensor % 3 == 0 ? 0.0f : 0.01f);
}

/* Norm weights 1; everything else small and varied. */
static float tm_fill_norms(int tensor, size_t e);
static file_spec *tm_current;
static float tm_fill_norms(int tensor, size_t e) {
    const char *name = tm_current->t[tensor].name;
    if (strstr(name, "norm")) return 1.0f;
    return tm_fill(tensor, e);
}

static void add_t(file_spec *fs, const char *name, uint64_t ne0, uint64_t ne1) {
    static char names[MAX_T][48];
    ck_assert_int_lt(fs->n_t, MAX_T);
    snprintf(names[fs->n_t], sizeof names[0], "%s", name);
    fs->t[fs->n_t] = (tensor_spec){names[fs->n_t], ne1 ? 2u : 1u, {ne0, ne1 ? ne1 : 1}, GGML_F32, -1};
    fs->n_t++;
}

static file_spec tiny_model(void) {
    file_spec fs;
    memset(&fs, 0, sizeof fs);
    kv_spec *k = fs.kv;
    k[fs.n_kv++] = (kv_spec){.key = "general.architecture", .type = GGUF_T_STRING, .s = "llama"};
    k[fs.n_kv++] = (kv_spec){.key = "general.name", .type = GGUF_T_STRING, .s = "tiny-test"};
    k[fs.n_kv++] = (kv_spec){.key = "llama.block_count", .type = GGUF_T_UINT32, .u = 2};
    k[fs.n_kv++] = (kv_spec){.key = "llama.context_length", .type = GGUF_T_UINT32, .u = 64};
    k[fs.n_kv++] = (kv_spec){.key = "llama.embedding_length", .type = GGUF_T_UINT32, .u = TM_EMBD};
    k[fs.n_kv++] = (kv_spec){.key = "llama.feed_forward_length", .type = GGUF_T_UINT32, .u = TM_FF};
    k[fs.n_kv++] = (kv_spec){.key = "llama.attention.head_count", .type = GGUF_T_UINT32, .u = 4};
    k[fs.n_kv++] = (kv_spec){.key = "llama.attention.head_count_kv", .type = GGUF_T_UINT32, .u = 2};
    k[fs.n_kv++] = (kv_spec){.key = "llama.rope.freq_base", .type = GGUF_T_FLOAT32, .f = 10000.0};
    k[fs.n_kv++] = (kv_spec){.key = "llama.attention.layer_norm_rms_epsilon", .type = GGUF_T_FLOAT32, .f = 1e-5};
    k[fs.n_kv++] = (kv_spec){.key = "tokenizer.ggml.model", .type = GGUF_T_STRING, .s = "llama"};
    k[fs.n_kv++] = (kv_spec){.key = "tokenizer.ggml.tokens", .type = GGUF_T_ARRAY, .arr_type = GGUF_T_STRING,
                             .arr_n = TM_VOCAB, .strs = tm_tokens};
    k[fs.n_kv++] = (kv_spec){.key = "tokenizer.ggml.scores", .type = GGUF_T_ARRAY, .arr_type = GGUF_T_FLOAT32,
                             .arr_n = TM_VOCAB, .arr = tm_scores};
    k[fs.n_kv++] = (kv_spec){.key = "tokenizer.ggml.token_type", .type = GGUF_T_ARRAY, .arr_type = GGUF_T_INT32,
                             .arr_n = TM_VOCAB, .arr = tm_types};
    k[fs.n_kv++] = (kv_spec){.key = "tokenizer.ggml.bos_token_id", .type = GGUF_T_UINT32, .u = 1};
    k[fs.n_kv++] = (kv_spec){.key = "tokenizer.ggml.eos_token_id", .type = GGUF_T_UINT32, .u = 2};
    add_t(&fs, "token_embd.weight", TM_EMBD, TM_VOCAB);
    add_t(&fs, "output_norm.weight", TM_EMBD, 0);
    add_t(&fs, "output.weight", TM_EMBD, TM_VOCAB);
    for (int l = 0; l < 2; l++) {
        char n[48];
#define T(x, a, b) (snprintf(n, sizeof n, "blk.%d." x, l), add_t(&fs, n, a, b))
        T("attn_norm.weight", TM_EMBD, 0);
        T("ffn_norm.weight", TM_EMBD, 0);
        T("attn_q.weight", TM_EMBD, 32);
        T("attn_k.weight", TM_EMBD, 16);
        T("attn_v.weight", TM_EMBD, 16);
        T("attn_output.weight", 32, TM_EMBD);
        T("ffn_gate.weight", TM_EMBD, TM_FF);
        T("ffn_up.weight", TM_EMBD, TM_FF);
        T("ffn_down.weight", TM_FF, TM_EMBD);
#undef T
    }
    fs.fill_f32 = tm_fill_norms;
    return fs;
}

static int find_kv(const file_spec *fs, const char *key) {
    for (int i = 0; i < fs->n_kv; i++)
        if (strcmp(fs->kv[i].key, key) == 0) return i;
    ck_abort_msg("no key %s", key);
    return -1;
}

static int find_t(const file_spec *fs, const char *name) {
    for (int i = 0; i < fs->n_t; i++)
        if (strcmp(fs->t[i].name, name) == 0) return i;
    ck_abort_msg("no tensor %s", name);
    return -1;
}

static void drop_kv(file_spec *fs, const char *key) {
    int i = find_kv(fs, key);
    memmove(&fs->kv[i], &fs->kv[i + 1], (size_t)(fs->n_kv - i - 1) * sizeof fs->kv[0]);
    fs->n_kv--;
}

static void drop_t(file_spec *fs, const char *name) {
    int i = find_t(fs, name);
    memmove(&fs->t[i], &fs->t[i + 1], (size_t)(fs->n_t - i - 1) * sizeof fs->t[0]);
    fs->n_t--;
}

/* Writes fs to a temporary file and opens an engine on it.  Returns the
 * engine_open code; err receives the message; *out the engine (or NULL). */
static int open_spec(file_spec *fs, const char *shared, engine **out, char *err, size_t errlen) {
    tm_current = fs;
    bytes b = build(fs, NULL);
    char path[] = "/tmp/saserve-model-XXXXXX";
    int fd = mkstemp(path);
    ck_assert_int_ge(fd, 0);
    ck_assert_int_eq(write(fd, b.p, b.n), (ssize_t)b.n);
    close(fd);
    free(b.p);
    engine_params p = engine_default_params();
    p.model_path = path;
    p.shared_layers = shared;
    p.max_seqs = 1;
    p.n_threads = 1;
    quiet_engine_log();
    err[0] = 0;
    engine *e = NULL;
    int rc = engine_open(&p, &e, err, errlen);
    unlink(path); /* the mapping outlives the name */
    if (out) *out = e;
    else engine_close(e);
    return rc;
}

START_TEST(test_tiny_model_opens) {
    file_spec fs = tiny_model();
    engine *e;
    char err[512];
    int rc = open_spec(&fs, NULL, &e, err, sizeof err);
    ck_assert_msg(rc == 0, "%s", err);
    const engine_info *in = engine_get_info(e);
    ck_assert_str_eq(in->arch, "llama");
    ck_assert_str_eq(in->name, "tiny-test");
    ck_assert_str_eq(in->weight_type, "F32");
    ck_assert_int_eq(in->n_layer, 2);
    ck_assert_int_eq(in->n_embd, TM_EMBD);
    ck_assert_int_eq(in->n_head, 4);
    ck_assert_int_eq(in->n_head_kv, 2);
    ck_assert_int_eq(in->head_dim, 8);
    ck_assert_int_eq(in->n_ff, TM_FF);
    ck_assert_int_eq(in->n_vocab, TM_VOCAB);
    ck_assert_int_eq(in->n_ctx_train, 64);
    ck_assert_uint_eq(in->n_params, (size_t)TM_EMBD * TM_VOCAB * 2 + TM_EMBD +
                                        2 * ((size_t)2 * TM_EMBD + TM_EMBD * (32 + 16 + 16 + 32) + 3 * TM_EMBD * TM_FF));
    ck_assert_str_eq(in->shared_layers, "none");
    int32_t ids[8];
    ck_assert_int_eq(engine_tokenize(e, "a b", 3, true, ids, 8), 3);
    ck_assert_int_eq(ids[1], 3);
    ck_assert_int_eq(ids[2], 6);
    int seq = engine_seq_create(e);
    engine_batch_item it = {.seq = seq, .tokens = ids, .n_tokens = 3, .prompt = true};
    ck_assert_int_eq(engine_step(e, &it, 1), 0);
    for (int i = 0; i < TM_VOCAB; i++) ck_assert(isfinite(it.logits[i]));
    engine_close(e);
}
END_TEST

static void expect_open_fail(file_spec *fs, int code, const char *what, const char *must1, const char *must2) {
    char err[512];
    int rc = open_spec(fs, NULL, NULL, err, sizeof err);
    ck_assert_msg(rc == code, "%s: engine_open gave %d (%s), expected %d: %s", what, rc, engine_strerror(rc), code,
                  err);
    ck_assert_msg(strchr(err, '\n') == NULL, "%s: message is not one line", what);
    if (must1) ck_assert_msg(strstr(err, must1) != NULL, "%s: message lacks '%s': %s", what, must1, err);
    if (must2) ck_assert_msg(strstr(err, must2) != NULL, "%s: message lacks '%s': %s", what, must2, err);
}

START_TEST(test_model_errors) {
    file_spec fs = tiny_model();
    drop_t(&fs, "blk.1.attn_v.weight");
    expect_open_fail(&fs, ENGINE_EFORMAT, "missing tensor", "'blk.1.attn_v.weight'", "missing");

    fs = tiny_model();
    fs.t[find_t(&fs, "blk.0.ffn_up.weight")].ne[1] = 63;
    expect_open_fail(&fs, ENGINE_EFORMAT, "wrong shape", "'blk.0.ffn_up.weight'", "shape");

    fs = tiny_model();
    fs.t[find_t(&fs, "blk.1.attn_q.weight")].ne[0] = 16; /* transposed-ish: [16, 32] */
    expect_open_fail(&fs, ENGINE_EFORMAT, "wrong inner size", "'blk.1.attn_q.weight'", "expected [32, 32]");

    fs = tiny_model();
    fs.t[find_t(&fs, "output_norm.weight")].ne[0] = 31;
    expect_open_fail(&fs, ENGINE_EFORMAT, "wrong vector size", "'output_norm.weight'", NULL);

    fs = tiny_model();
    fs.kv[find_kv(&fs, "general.architecture")].s = "gpt2";
    expect_open_fail(&fs, ENGINE_EUNSUPPORTED, "unsupported architecture", "'gpt2'", "not supported");

    fs = tiny_model();
    drop_kv(&fs, "general.architecture");
    expect_open_fail(&fs, ENGINE_EFORMAT, "no architecture", "'general.architecture'", "missing");

    fs = tiny_model();
    drop_kv(&fs, "llama.embedding_length");
    expect_open_fail(&fs, ENGINE_EFORMAT, "missing key", "'llama.embedding_length'", "missing");

    fs = tiny_model();
    drop_kv(&fs, "llama.block_count");
    expect_open_fail(&fs, ENGINE_EFORMAT, "missing key", "'llama.block_count'", "missing");

    fs = tiny_model();
    fs.kv[find_kv(&fs, "llama.block_count")] = (kv_spec){.key = "llama.block_count", .type = GGUF_T_STRING, .s = "2"};
    expect_open_fail(&fs, ENGINE_EFORMAT, "key of the wrong type", "'llama.block_count'", "wrong type");

    fs = tiny_model();
    fs.kv[find_kv(&fs, "llama.attention.head_count_kv")].u = 3; /* 4 heads are not a multiple of 3 */
    expect_open_fail(&fs, ENGINE_EFORMAT, "bad GQA", "head_count", NULL);

    fs = tiny_model();
    drop_kv(&fs, "tokenizer.ggml.tokens");
    expect_open_fail(&fs, ENGINE_EFORMAT, "no vocabulary", "'tokenizer.ggml.tokens'", NULL);

    fs = tiny_model();
    fs.kv[find_kv(&fs, "tokenizer.ggml.model")].s = "bert";
    expect_open_fail(&fs, ENGINE_EUNSUPPORTED, "unsupported tokenizer", "'bert'", NULL);

    fs = tiny_model();
    fs.kv[find_kv(&fs, "tokenizer.ggml.tokens")].arr_n = TM_VOCAB - 1;
    fs.kv[find_kv(&fs, "tokenizer.ggml.scores")].arr_n = TM_VOCAB - 1;
    fs.kv[find_kv(&fs, "tokenizer.ggml.token_type")].arr_n = TM_VOCAB - 1;
    expect_open_fail(&fs, ENGINE_EFORMAT, "vocabulary size mismatch", "7 tokens", "token_embd.weight");

    fs = tiny_model();
    fs.kv[find_kv(&fs, "tokenizer.ggml.scores")].arr_n = TM_VOCAB - 1;
    expect_open_fail(&fs, ENGINE_EFORMAT, "scores size mismatch", "'tokenizer.ggml.scores'", NULL);

    /* A matrix in a type the engine cannot compute with. */
    fs = tiny_model();
    fs.t[find_t(&fs, "blk.0.attn_q.weight")].type = GGML_Q4_1;
    expect_open_fail(&fs, ENGINE_EUNSUPPORTED, "unsupported weight type", "'blk.0.attn_q.weight'", "Q4_1");

    /* The model's own shared-layers key is checked like a configured one. */
    fs = tiny_model();
    fs.kv[fs.n_kv++] = (kv_spec){.key = "saserve.shared_layers", .type = GGUF_T_STRING, .s = "0-1"};
    expect_open_fail(&fs, ENGINE_ESHARED, "bad model key", "'0-1'", "'saserve.shared_layers'");
    fs.kv[fs.n_kv - 1] = (kv_spec){.key = "saserve.shared_layers", .type = GGUF_T_UINT32, .u = 1};
    expect_open_fail(&fs, ENGINE_EFORMAT, "model key not a string", "'saserve.shared_layers'", NULL);

    /* A file that is not GGUF at all. */
    fs = tiny_model();
    fs.magic = "GGML";
    expect_open_fail(&fs, ENGINE_EFORMAT, "not GGUF", "magic", NULL);
}
END_TEST

START_TEST(test_model_shared_key) {
    file_spec fs = tiny_model();
    fs.kv[fs.n_kv++] = (kv_spec){.key = "saserve.shared_layers", .type = GGUF_T_STRING, .s = "1"};
    engine *e;
    char err[512];
    ck_assert_msg(open_spec(&fs, NULL, &e, err, sizeof err) == 0, "%s", err);
    const engine_info *in = engine_get_info(e);
    ck_assert_str_eq(in->shared_layers, "1");
    ck_assert_str_eq(in->shared_origin, "model");
    ck_assert_int_eq(in->layer_source[1], 0);
    engine_close(e);
}
END_TEST

Suite *gguf_suite(void) {
    Suite *s = suite_create("gguf");
    TCase *tc = tcase_create("valid");
    tcase_add_test(tc, test_valid_roundtrip);
    tcase_add_test(tc, test_valid_alignment_and_empty);
    suite_add_tcase(s, tc);

    tc = tcase_create("malformed");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_truncated_everywhere);
    tcase_add_test(tc, test_bad_header);
    tcase_add_test(tc, test_bad_lengths);
    tcase_add_test(tc, test_bad_types);
    tcase_add_test(tc, test_bad_shapes);
    tcase_add_test(tc, test_bad_offsets);
    tcase_add_test(tc, test_duplicates);
    tcase_add_test(tc, test_bad_alignment);
    suite_add_tcase(s, tc);

    tc = tcase_create("files");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_open_errors);
    tcase_add_test(tc, test_real_file);
    suite_add_tcase(s, tc);

    tc = tcase_create("model");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_tiny_model_opens);
    tcase_add_test(tc, test_model_errors);
    tcase_add_test(tc, test_model_shared_key);
    suite_add_tcase(s, tc);
    return s;
}
