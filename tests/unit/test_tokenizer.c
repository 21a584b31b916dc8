/*
 * test_tokenizer.c - the SentencePiece BPE tokenizer read from the bundled
 * GGUF (sa-tiny-sa, the same vocabulary as sa-tiny), against the reference:
 * the 205 test vectors of tokenizer_vectors.json (ids exact, decode exact),
 * the prompt ids and greedy texts of every reference file, engine_token_bytes,
 * and decoding of invalid UTF-8 (one U+FFFD per bad byte).
 */
#include <check.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine.h"
#include "enginetest.h"

#define REPL "\xef\xbf\xbd" /* U+FFFD */
#define BYTE_TOKEN(b) (3 + (b)) /* <0x00> is id 3 */

static engine *E;

static void setup(void) {
    engine_params p = engine_default_params();
    p.model_path = BUNDLED_MODEL;
    p.max_seqs = 1;
    p.n_ctx = 64;
    p.n_threads = 1;
    E = open_engine_params(&p);
}

static void teardown(void) {
    engine_close(E);
    E = NULL;
}

static const char *const ref_files[] = {"ref-none.json", "ref-sa5-7.json", "ref-sa3-5_9-11.json",
                                        "sa-tiny-sa-ref-sa4-11.json", "sa-tiny-sa-ref-none.json"};

/* Formats ids for a failure message. */
static const char *ids_str(const int32_t *ids, int n) {
    static char buf[2048];
    size_t o = 0;
    buf[0] = 0;
    for (int i = 0; i < n && o + 16 < sizeof buf; i++) o += (size_t)snprintf(buf + o, sizeof buf - o, "%s%d", i ? "," : "", ids[i]);
    return buf;
}

static void check_encode(const char *text, size_t len, bool add_bos, const int32_t *expect, int n_expect,
                         const char *what) {
    int32_t ids[4096];
    int n = engine_tokenize(E, text, len, add_bos, ids, 4096);
    ck_assert_int_le(n, 4096);
    bool same = n == n_expect && memcmp(ids, expect, (size_t)n * sizeof(int32_t)) == 0;
    if (!same) {
        char ours[2048];
        snprintf(ours, sizeof ours, "%s", ids_str(ids, n));
        ck_abort_msg("%s: '%.60s' -> [%s], expected [%s]", what, text, ours, ids_str(expect, n_expect));
    }
}

static void check_decode(const int32_t *ids, int n, const char *expect, size_t expect_len, const char *what) {
    size_t need = engine_detokenize(E, ids, n, NULL, 0);
    char *buf = malloc(need + 1);
    ck_assert_ptr_nonnull(buf);
    size_t got = engine_detokenize(E, ids, n, buf, need + 1);
    ck_assert_uint_eq(got, need);
    ck_assert_msg(got == expect_len && memcmp(buf, expect, got) == 0, "%s: [%s] decodes to '%.80s', expected '%.80s'",
                  what, ids_str(ids, n), buf, expect);
    ck_assert_int_eq(buf[got], 0);
    free(buf);
}

/* ==== Reference vectors ================================================ */

START_TEST(test_vectors) {
    json_t *v = fixture_json("tokenizer_vectors.json");
    const json_t *cases = json_need(v, "cases");
    ck_assert_uint_eq(json_array_size(cases), 205);
    for (size_t i = 0; i < json_array_size(cases); i++) {
        const json_t *c = json_array_get(cases, i);
        const json_t *jt = json_need(c, "text");
        const char *text = json_string_value(jt);
        size_t len = json_string_length(jt);
        int n;
        int32_t *ids = json_ids(json_need(c, "ids"), &n);
        char what[64];
        snprintf(what, sizeof what, "vector %zu", i);
        check_encode(text, len, false, ids, n, what);
        /* With BOS: the same ids after <s>. */
        int32_t *with_bos = malloc((size_t)(n + 1) * sizeof(int32_t));
        with_bos[0] = 1;
        memcpy(with_bos + 1, ids, (size_t)n * sizeof(int32_t));
        check_encode(text, len, true, with_bos, n + 1, what);
        /* decode(ids) == text holds for every vector (decode_note). */
        ck_assert(json_is_true(json_need(c, "roundtrip")));
        check_decode(ids, n, text, len, what);
        check_decode(with_bos, n + 1, text, len, what); /* <s> decodes to nothing */
        free(with_bos);
        free(ids);
    }
    json_decref(v);
}
END_TEST

START_TEST(test_prompt_ids) {
    for (size_t f = 0; f < sizeof ref_files / sizeof ref_files[0]; f++) {
        json_t *ref = fixture_json(ref_files[f]);
        const json_t *prompts = json_need(ref, "prompts");
        ck_assert_uint_eq(json_array_size(prompts), 8);
        for (size_t i = 0; i < json_array_size(prompts); i++) {
            const json_t *p = json_array_get(prompts, i);
            const json_t *jt = json_need(p, "text");
            int n;
            int32_t *ids = json_ids(json_need(p, "ids"), &n);
            ck_assert_int_eq(ids[0], 1);
            char what[96];
            snprintf(what, sizeof what, "%s prompt %zu", ref_files[f], i);
            check_encode(json_string_value(jt), json_string_length(jt), true, ids, n, what);
            free(ids);
        }
        json_decref(ref);
    }
}
END_TEST

/* The greedy texts are decode(greedy_ids), including the 'naive cafe'
 * prompt's continuation, which ends in an incomplete UTF-8 character. */
START_TEST(test_greedy_texts) {
    int repl_seen = 0;
    for (size_t f = 0; f < sizeof ref_files / sizeof ref_files[0]; f++) {
        json_t *ref = fixture_json(ref_files[f]);
        const json_t *prompts = json_need(ref, "prompts");
        for (size_t i = 0; i < json_array_size(prompts); i++) {
            const json_t *p = json_array_get(prompts, i);
            const json_t *jt = json_need(p, "greedy_text");
            int n;
            int32_t *ids = json_ids(json_need(p, "greedy_ids"), &n);
            char what[96];
            snprintf(what, sizeof what, "%s prompt %zu greedy", ref_files[f], i);
            check_decode(ids, n, json_string_value(jt), json_string_length(jt), what);
            repl_seen += strstr(json_string_value(jt), REPL) != NULL;
            free(ids);
        }
        json_decref(ref);
    }
    ck_assert_int_gt(repl_seen, 0);
    /* ref-none.json's 'naive cafe' prompt: ends with two U+FFFD. */
    json_t *ref = fixture_json("ref-none.json");
    const char *t = json_string_value(json_need(json_array_get(json_need(ref, "prompts"), 6), "greedy_text"));
    size_t len = strlen(t);
    ck_assert_uint_ge(len, 6);
    ck_assert_str_eq(t + len - 6, REPL REPL);
    json_decref(ref);
}
END_TEST

/* ==== Token bytes ====================================================== */

static void bytes_are(int32_t id, const char *expect, int expect_len) {
    char buf[64];
    memset(buf, 0x55, sizeof buf);
    int n = engine_token_bytes(E, id, buf, sizeof buf);
    ck_assert_msg(n == expect_len && memcmp(buf, expect, (size_t)n) == 0, "token %d: %d bytes '%.*s'", id, n,
                  n > 0 ? n : 0, buf);
}

START_TEST(test_token_bytes) {
    bytes_are(7020, " ", 1);      /* "▁" */
    bytes_are(259, "  ", 2);      /* "▁▁" */
    bytes_are(268, " the", 4);    /* "▁the" */
    bytes_are(361, " The", 4);
    bytes_are(261, "in", 2);
    bytes_are(BYTE_TOKEN(0x00), "\0", 1);
    bytes_are(BYTE_TOKEN(0x0a), "\n", 1);
    bytes_are(BYTE_TOKEN('A'), "A", 1);
    bytes_are(BYTE_TOKEN(0xff), "\xff", 1);
    bytes_are(1, "", 0); /* <s> */
    bytes_are(2, "", 0); /* </s> */
    bytes_are(0, " \xe2\x81\x87 ", 5); /* <unk>: sentencepiece's " ⁇ " */
    char buf[8];
    ck_assert_int_eq(engine_token_bytes(E, -1, buf, sizeof buf), -1);
    ck_assert_int_eq(engine_token_bytes(E, 8192, buf, sizeof buf), -1);
    /* A short buffer: the full length is returned, only cap bytes written. */
    memset(buf, 0x55, sizeof buf);
    ck_assert_int_eq(engine_token_bytes(E, 1486, buf, 3), 9); /* "▁provides" */
    ck_assert_mem_eq(buf, " pr", 3);
    ck_assert_int_eq((unsigned char)buf[3], 0x55);
    ck_assert_int_eq(engine_token_bytes(E, 1486, NULL, 0), 9);

    ck_assert(engine_token_is_eog(E, 2));
    ck_assert(!engine_token_is_eog(E, 1));
    ck_assert(!engine_token_is_eog(E, 0));
    const engine_info *in = engine_get_info(E);
    ck_assert_int_eq(in->bos, 1);
    ck_assert_int_eq(in->eos, 2);
    ck_assert(in->add_bos);
    ck_assert_int_eq(in->n_vocab, 8192);
}
END_TEST

/* ==== Decoding ========================================================= */

static void decode_bytes_is(const unsigned char *bytes, int n, const char *expect) {
    int32_t ids[16];
    for (int i = 0; i < n; i++) ids[i] = BYTE_TOKEN(bytes[i]);
    check_decode(ids, n, expect, strlen(expect), "byte tokens");
}

START_TEST(test_invalid_utf8) {
    decode_bytes_is((const unsigned char *)"\xc3", 1, REPL);
    decode_bytes_is((const unsigned char *)"\xc3\xa9", 2, "\xc3\xa9"); /* é, valid */
    decode_bytes_is((const unsigned char *)"\xe6\x9d", 2, REPL REPL); /* 東 cut short */
    decode_bytes_is((const unsigned char *)"a\xe6\x9d" "b", 4, "a" REPL REPL "b");
    decode_bytes_is((const unsigned char *)"\xed\xa0\x80", 3, REPL REPL REPL); /* a surrogate */
    decode_bytes_is((const unsigned char *)"\xc0\x80", 2, REPL REPL);         /* overlong NUL */
    decode_bytes_is((const unsigned char *)"\xf4\x90\x80\x80", 4, REPL REPL REPL REPL); /* > U+10FFFF */
    decode_bytes_is((const unsigned char *)"\xff\xfe", 2, REPL REPL);
    decode_bytes_is((const unsigned char *)"\x80", 1, REPL); /* a lone continuation byte */
    decode_bytes_is((const unsigned char *)"\xf0\x9f\x98\x80", 4, "\xf0\x9f\x98\x80"); /* 😀 */
    /* A bad byte between valid text and a valid character. */
    int32_t mixed[] = {361, BYTE_TOKEN(0xe6), BYTE_TOKEN(0xc3), BYTE_TOKEN(0xa9)};
    check_decode(mixed, 4, "The" REPL "\xc3\xa9", strlen("The" REPL "\xc3\xa9"), "mixed");
}
END_TEST

START_TEST(test_decode_dummy_prefix) {
    /* The dummy prefix space is dropped once, at the start only. */
    int32_t a[] = {361, 567};
    check_decode(a, 2, "The kernel", 10, "dummy prefix");
    int32_t b[] = {1, 361, 2, 567}; /* control tokens give nothing */
    check_decode(b, 4, "The kernel", 10, "control tokens");
    int32_t c[] = {7020, 7020};
    check_decode(c, 2, " ", 1, "spaces");
    check_decode(NULL, 0, "", 0, "empty");
}
END_TEST

START_TEST(test_buffer_limits) {
    int32_t ids[] = {361, 567, 1486};
    char buf[32];
    memset(buf, 0x55, sizeof buf);
    /* Too small: the length needed is returned; what fits is written and
     * NUL-terminated. */
    size_t need = engine_detokenize(E, ids, 3, buf, 5);
    ck_assert_uint_eq(need, strlen("The kernel provides"));
    ck_assert_str_eq(buf, "The ");
    ck_assert_int_eq((unsigned char)buf[5], 0x55);
    memset(buf, 0x55, sizeof buf);
    ck_assert_uint_eq(engine_detokenize(E, ids, 3, buf, 0), need);
    ck_assert_int_eq((unsigned char)buf[0], 0x55);

    /* engine_tokenize: the count is returned, only max_ids written. */
    int32_t out[8];
    for (int i = 0; i < 8; i++) out[i] = -7;
    const char *text = "The kernel provides a simple interface for";
    int n = engine_tokenize(E, text, strlen(text), true, out, 3);
    ck_assert_int_eq(n, 8);
    ck_assert_int_eq(out[0], 1);
    ck_assert_int_eq(out[1], 361);
    ck_assert_int_eq(out[2], 567);
    ck_assert_int_eq(out[3], -7);
    ck_assert_int_eq(engine_tokenize(E, text, strlen(text), false, NULL, 0), 7);
    ck_assert_int_eq(engine_tokenize(E, "", 0, true, out, 8), 1);
    ck_assert_int_eq(engine_tokenize(E, "", 0, false, out, 8), 0);
}
END_TEST

/* Special-token text is plain text: "<s>" is not id 1.  The length is
 * honoured (not NUL-terminated input), and embedded NUL bytes are bytes. */
START_TEST(test_plain_text_only) {
    int32_t ids[64];
    const char *t = "<s> x </s>";
    int n = engine_tokenize(E, t, strlen(t), false, ids, 64);
    ck_assert_int_gt(n, 2);
    for (int i = 0; i < n; i++) ck_assert_msg(ids[i] != 1 && ids[i] != 2, "'%s' produced a control token", t);
    check_decode(ids, n, t, strlen(t), "special text");
    int n2 = engine_tokenize(E, "The kernel!!!", 10, false, ids, 64);
    ck_assert_int_eq(n2, 2);
    ck_assert_int_eq(ids[0], 361);
    ck_assert_int_eq(ids[1], 567);
    const char nul[] = {'a', 0, 'b'};
    n = engine_tokenize(E, nul, 3, false, ids, 64);
    bool has_nul_byte = false;
    for (int i = 0; i < n; i++) has_nul_byte |= ids[i] == BYTE_TOKEN(0);
    ck_assert(has_nul_byte);
    check_decode(ids, n, nul, 3, "embedded NUL");
}
END_TEST

Suite *tokenizer_suite(void) {
    Suite *s = suite_create("tokenizer");
    TCase *tc = tcase_create("reference");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, test_vectors);
    tcase_add_test(tc, test_prompt_ids);
    tcase_add_test(tc, test_greedy_texts);
    suite_add_tcase(s, tc);

    tc = tcase_create("bytes");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_token_bytes);
    tcase_add_test(tc, test_invalid_utf8);
    tcase_add_test(tc, test_decode_dummy_prefix);
    tcase_add_test(tc, test_buffer_limits);
    tcase_add_test(tc, test_plain_text_only);
    suite_add_tcase(s, tc);
    return s;
}
