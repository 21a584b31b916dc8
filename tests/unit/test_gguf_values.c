/*
 * test_gguf_values.c - the checked GGUF reader on hand-built buffers: regressions
 * found by fuzzing it (tests/fuzz/fuzz_gguf.c).
 */
#include <check.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "engine.h"
#include "gguf.h"
#include "tokenizer.h"

/* ==== A tiny GGUF builder ============================================== */

typedef struct {
    uint8_t b[8192];
    size_t n;
} gbuf;

static void put(gbuf *g, const void *p, size_t n) {
    ck_assert(g->n + n <= sizeof g->b);
    memcpy(g->b + g->n, p, n);
    g->n += n;
}
static void put_u32(gbuf *g, uint32_t v) { put(g, &v, 4); }
static void put_u64(gbuf *g, uint64_t v) { put(g, &v, 8); }
static void put_str(gbuf *g, const char *s) {
    put_u64(g, strlen(s));
    put(g, s, strlen(s));
}
static void header(gbuf *g, uint64_t n_tensors, uint64_t n_kv) {
    g->n = 0;
    put(g, "GGUF", 4);
    put_u32(g, 3);
    put_u64(g, n_tensors);
    put_u64(g, n_kv);
}

/* Fuzzing (gguf): gguf_arr_i64 converted float array elements with a plain
 * cast, undefined for NaN and out-of-range values; a float
 * tokenizer.ggml.token_type array reached it from tokenizer_load.  It
 * saturates now (NaN gives 0), and large unsigned values saturate too. */
START_TEST(test_arr_i64_saturates) {
    gbuf g;
    header(&g, 0, 2);
    put_str(&g, "f");
    put_u32(&g, GGUF_T_ARRAY);
    put_u32(&g, GGUF_T_FLOAT32);
    float fs[] = {NAN, 1e30f, -1e30f, 3.7f, -2.5f, INFINITY};
    put_u64(&g, 6);
    put(&g, fs, sizeof fs);
    put_str(&g, "u");
    put_u32(&g, GGUF_T_ARRAY);
    put_u32(&g, GGUF_T_UINT64);
    uint64_t us[] = {((uint64_t)1 << 63) + 5, 42};
    put_u64(&g, 2);
    put(&g, us, sizeof us);
    char err[256];
    gguf *p = gguf_parse(g.b, g.n, err, sizeof err);
    ck_assert_msg(p != NULL, "%s", err);
    const gguf_kv *f = gguf_find(p, "f"), *u = gguf_find(p, "u");
    ck_assert_int_eq(gguf_arr_i64(f, 0), 0);
    ck_assert(gguf_arr_i64(f, 1) == INT64_MAX);
    ck_assert(gguf_arr_i64(f, 2) == INT64_MIN);
    ck_assert_int_eq(gguf_arr_i64(f, 3), 3);
    ck_assert_int_eq(gguf_arr_i64(f, 4), -2);
    ck_assert(gguf_arr_i64(f, 5) == INT64_MAX);
    ck_assert(gguf_arr_i64(u, 0) == INT64_MAX);
    ck_assert_int_eq(gguf_arr_i64(u, 1), 42);
    gguf_close(p);
}
END_TEST

/* The same through the tokenizer loader: a float token_type array with NaN
 * loads (the NaN token is type 0, plain text) instead of undefined
 * behaviour; the sanitizer build traps on the old code. */
START_TEST(test_float_token_types) {
    gbuf g;
    header(&g, 0, 3);
    put_str(&g, "tokenizer.ggml.model");
    put_u32(&g, GGUF_T_STRING);
    put_str(&g, "llama");
    put_str(&g, "tokenizer.ggml.tokens");
    put_u32(&g, GGUF_T_ARRAY);
    put_u32(&g, GGUF_T_STRING);
    put_u64(&g, 3);
    put_str(&g, "<s>");
    put_str(&g, "a");
    put_str(&g, "\xe2\x96\x81" "a");
    put_str(&g, "tokenizer.ggml.token_type");
    put_u32(&g, GGUF_T_ARRAY);
    put_u32(&g, GGUF_T_FLOAT32);
    float types[] = {3.0f, NAN, 1e30f};
    put_u64(&g, 3);
    put(&g, types, sizeof types);
    char err[256];
    gguf *p = gguf_parse(g.b, g.n, err, sizeof err);
    ck_assert_msg(p != NULL, "%s", err);
    tokenizer *t = NULL;
    /* No BOS id: the loader refuses (adds BOS by default) or loads; either
     * way without undefined behaviour. */
    int rc = tokenizer_load(&t, p, err, sizeof err);
    if (rc == 0) tokenizer_free(t);
    else ck_assert(err[0] != 0);
    gguf_close(p);
}
END_TEST

Suite *gguf_values_suite(void) {
    Suite *s = suite_create("gguf_values");
    TCase *tc = tcase_create("fuzz_regressions");
    tcase_add_test(tc, test_arr_i64_saturates);
    tcase_add_test(tc, test_float_token_types);
    suite_add_tcase(s, tc);
    return s;
}
