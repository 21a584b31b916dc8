/*
 * test_shared.c - the shared-layers setting: parsing and normalising
 * (engine_parse_shared_layers / engine_format_shared_layers), and what
 * engine_open makes of it on the bundled model, whose GGUF carries
 * saserve.shared_layers = "4-11" (DESIGN.md section 4).
 */
#include <check.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine.h"
#include "enginetest.h"

#define NL 12

/* ==== Parsing ========================================================== */

static void parse_ok(const char *text, const char *expect_mask) {
    bool shared[NL];
    char err[256] = "";
    memset(shared, 0xaa, sizeof shared); /* garbage: every entry must be written */
    int rc = engine_parse_shared_layers(text, NL, shared, err, sizeof err);
    ck_assert_msg(rc == 0, "'%s' rejected: %s", text, err);
    for (int l = 0; l < NL; l++)
        ck_assert_msg(shared[l] == (expect_mask[l] == '1'), "'%s': layer %d shared=%d, expected %c", text, l,
                      shared[l], expect_mask[l]);
}

START_TEST(test_parse_valid) {
    /*               layer 0..11 */
    parse_ok("none", "000000000000");
    parse_ok("", "000000000000");
    parse_ok(NULL, "000000000000");
    parse_ok("4-11", "000011111111");
    parse_ok("5-7,9-11", "000001110111");
    parse_ok("3", "000100000000");
    parse_ok("1", "010000000000");
    parse_ok("11", "000000000001");
    parse_ok("3-5,9-11", "000111000111");
    parse_ok("5,6,7", "000001110000");
    parse_ok("9-11,5-7", "000001110111"); /* order does not matter */
    parse_ok("6-6", "000000100000");
}
END_TEST

/* Each bad entry fails with ENGINE_ESHARED and a message that quotes it. */
static void parse_bad(const char *text, int n_layer, const char *entry, const char *why) {
    bool shared[NL];
    char err[256] = "";
    int rc = engine_parse_shared_layers(text, n_layer, shared, err, sizeof err);
    ck_assert_msg(rc == ENGINE_ESHARED, "'%s' accepted (rc %d)", text, rc);
    char quoted[64];
    snprintf(quoted, sizeof quoted, "'%s'", entry);
    ck_assert_msg(strstr(err, quoted) != NULL, "'%s': message does not name the entry %s: %s", text, quoted, err);
    if (why) ck_assert_msg(strstr(err, why) != NULL, "'%s': message lacks '%s': %s", text, why, err);
    ck_assert_msg(strchr(err, '\n') == NULL, "message is not one line: %s", err);
}

START_TEST(test_parse_errors) {
    parse_bad("0-3", NL, "0-3", "layer 0");
    parse_bad("0", NL, "0", "layer 0");
    parse_bad("5-12", NL, "5-12", "layers 0-11");
    parse_bad("12", NL, "12", "layers 0-11");
    parse_bad("a", NL, "a", NULL);
    parse_bad("5-", NL, "5-", NULL);
    parse_bad("-5", NL, "-5", NULL);
    parse_bad("7-5", NL, "7-5", NULL);
    parse_bad("5-7,6-8", NL, "6-8", "overlap");
    parse_bad("5,,6", NL, "", NULL);
    parse_bad("5,6,", NL, "", NULL);
    parse_bad("5 ", NL, "5 ", NULL);
    parse_bad("4-11", 8, "4-11", "layers 0-7");
    parse_bad("99999999999", NL, "99999999999", NULL);
}
END_TEST

static void format_is(const char *text, const char *expect) {
    bool shared[NL];
    char err[256], out[64];
    ck_assert_int_eq(engine_parse_shared_layers(text, NL, shared, err, sizeof err), 0);
    engine_format_shared_layers(shared, NL, out, sizeof out);
    ck_assert_msg(strcmp(out, expect) == 0, "'%s' normalises to '%s', expected '%s'", text, out, expect);
}

START_TEST(test_format_normalises) {
    format_is("5,6,7", "5-7");
    format_is("none", "none");
    format_is("", "none");
    format_is("4-11", "4-11");
    format_is("9-11,5-7", "5-7,9-11");
    format_is("1-2,3-4", "1-4");
    format_is("3,5", "3,5");
    format_is("11", "11");
    format_is("1-11", "1-11");
}
END_TEST

/* ==== engine_open on the bundled model ================================= */

typedef struct {
    int warnings;
    char last[512];
} log_capture;

static void capture_log(engine_log_level level, const char *msg, void *ud) {
    log_capture *c = ud;
    if (level >= ENGINE_LOG_WARN) {
        c->warnings++;
        snprintf(c->last, sizeof c->last, "%s", msg);
    }
}

static engine *open_bundled(const char *shared, log_capture *cap) {
    engine_params p = engine_default_params();
    p.model_path = BUNDLED_MODEL;
    p.shared_layers = shared;
    p.max_seqs = 2;
    p.n_ctx = 256;
    p.n_threads = test_threads();
    engine_set_log(capture_log, cap);
    engine *e = NULL;
    char err[512] = "";
    int rc = engine_open(&p, &e, err, sizeof err);
    quiet_engine_log();
    ck_assert_msg(rc == 0, "engine_open: %s", err);
    return e;
}

/* K bytes not allocated, from the block geometry: shared layers have no K
 * plane, i.e. one plane's worth per shared layer. */
static void check_kv_geometry(const engine_info *in) {
    size_t per_layer_token = (size_t)in->n_head_kv * (size_t)in->head_dim * 2; /* f16 */
    size_t tokens = (size_t)in->kv_blocks * (size_t)in->kv_block_tokens;
    ck_assert_uint_eq(in->kv_bytes_per_token_unshared, per_layer_token * 2 * (size_t)in->n_layer);
    ck_assert_uint_eq(in->kv_bytes_per_token, per_layer_token * (size_t)(2 * in->n_layer - in->n_shared));
    ck_assert_uint_eq(in->kv_v_bytes, tokens * per_layer_token * (size_t)in->n_layer);
    ck_assert_uint_eq(in->kv_k_bytes, tokens * per_layer_token * (size_t)(in->n_layer - in->n_shared));
    ck_assert_uint_eq(in->kv_k_bytes + in->kv_v_bytes, tokens * in->kv_bytes_per_token);
    ck_assert_uint_eq(in->kv_saved_bytes, tokens * per_layer_token * (size_t)in->n_shared);
    ck_assert_uint_eq(in->kv_saved_bytes + in->kv_k_bytes + in->kv_v_bytes, tokens * in->kv_bytes_per_token_unshared);
}

START_TEST(test_open_model_default) {
    log_capture cap = {0};
    engine *e = open_bundled(NULL, &cap);
    const engine_info *in = engine_get_info(e);
    ck_assert_int_eq(cap.warnings, 0);
    ck_assert_int_eq(in->n_layer, 12);
    ck_assert_str_eq(in->shared_layers, "4-11");
    ck_assert_str_eq(in->shared_origin, "model");
    ck_assert_int_eq(in->n_shared, 8);
    for (int l = 0; l < in->n_layer; l++) ck_assert_int_eq(in->layer_source[l], l < 4 ? l : 3);
    /* 16 of 24 K/V tensors per token: 4 K + 12 V. */
    ck_assert_uint_eq(in->kv_bytes_per_token * 24, in->kv_bytes_per_token_unshared * 16);
    ck_assert_uint_eq(in->kv_bytes_per_token, 4096);
    ck_assert_uint_eq(in->kv_bytes_per_token_unshared, 6144);
    ck_assert_uint_gt(in->kv_saved_bytes, 0);
    check_kv_geometry(in);

    /* Sharing skips attention work, and the counters say so. */
    int32_t toks[5] = {1, 361, 567, 1486, 262};
    int seq = engine_seq_create(e);
    engine_batch_item it = {.seq = seq, .tokens = toks, .n_tokens = 5, .prompt = true};
    ck_assert_int_eq(engine_step(e, &it, 1), 0);
    engine_counters ct;
    engine_get_counters(e, &ct);
    ck_assert_uint_eq(ct.tokens_processed, 5);
    ck_assert(ct.attention_flops_saved > 0);
    engine_close(e);
}
END_TEST

START_TEST(test_open_none) {
    log_capture cap = {0};
    engine *e = open_bundled("none", &cap);
    const engine_info *in = engine_get_info(e);
    /* Overriding a fine-tuned model's own setting is worth a warning. */
    ck_assert_int_eq(cap.warnings, 1);
    ck_assert_msg(strstr(cap.last, "4-11") != NULL, "warning does not name the model's setting: %s", cap.last);
    ck_assert_str_eq(in->shared_layers, "none");
    ck_assert_str_eq(in->shared_origin, "none");
    ck_assert_int_eq(in->n_shared, 0);
    for (int l = 0; l < in->n_layer; l++) ck_assert_int_eq(in->layer_source[l], l);
    ck_assert_uint_eq(in->kv_bytes_per_token, in->kv_bytes_per_token_unshared);
    ck_assert_uint_eq(in->kv_saved_bytes, 0);
    ck_assert_uint_eq(in->kv_k_bytes, in->kv_v_bytes);
    check_kv_geometry(in);
    int32_t toks[3] = {1, 361, 567};
    int seq = engine_seq_create(e);
    engine_batch_item it = {.seq = seq, .tokens = toks, .n_tokens = 3, .prompt = true};
    ck_assert_int_eq(engine_step(e, &it, 1), 0);
    engine_counters ct;
    engine_get_counters(e, &ct);
    ck_assert(ct.attention_flops_saved == 0);
    engine_close(e);
}
END_TEST

START_TEST(test_open_config_override) {
    log_capture cap = {0};
    engine *e = open_bundled("5-7,9-11", &cap);
    const engine_info *in = engine_get_info(e);
    ck_assert_int_eq(cap.warnings, 1);
    ck_assert_str_eq(in->shared_layers, "5-7,9-11");
    ck_assert_str_eq(in->shared_origin, "config");
    ck_assert_int_eq(in->n_shared, 6);
    static const int src[12] = {0, 1, 2, 3, 4, 4, 4, 4, 8, 8, 8, 8};
    for (int l = 0; l < 12; l++) ck_assert_int_eq(in->layer_source[l], src[l]);
    ck_assert_uint_eq(in->kv_bytes_per_token * 24, in->kv_bytes_per_token_unshared * 18);
    check_kv_geometry(in);
    engine_close(e);
}
END_TEST

/* The model's own set, spelled differently, is not an override. */
START_TEST(test_open_same_set_no_warning) {
    log_capture cap = {0};
    engine *e = open_bundled("4-5,6-11", &cap);
    ck_assert_msg(cap.warnings == 0, "warned about an equivalent setting: %s", cap.last);
    ck_assert_str_eq(engine_get_info(e)->shared_layers, "4-11");
    engine_close(e);
}
END_TEST

START_TEST(test_open_bad_setting) {
    const char *bad[][2] = {{"4-12", "'4-12'"}, {"0-3", "'0-3'"}, {"x", "'x'"}, {"5-7,6", "'6'"}};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        engine_params p = engine_default_params();
        p.model_path = BUNDLED_MODEL;
        p.shared_layers = bad[i][0];
        p.max_seqs = 1;
        p.n_threads = 1;
        static char sentinel;
        engine *e = (engine *)&sentinel; /* must be reset to NULL on failure */
        char err[512] = "";
        quiet_engine_log();
        int rc = engine_open(&p, &e, err, sizeof err);
        ck_assert_int_eq(rc, ENGINE_ESHARED);
        ck_assert_ptr_null(e);
        ck_assert_msg(strstr(err, bad[i][1]) != NULL, "'%s': error does not name the entry: %s", bad[i][0], err);
        ck_assert_str_eq(engine_strerror(rc), "invalid shared layers setting");
    }
}
END_TEST

Suite *shared_suite(void) {
    Suite *s = suite_create("shared");
    TCase *tc = tcase_create("parse");
    tcase_add_test(tc, test_parse_valid);
    tcase_add_test(tc, test_parse_errors);
    tcase_add_test(tc, test_format_normalises);
    suite_add_tcase(s, tc);

    tc = tcase_create("open");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, test_open_model_default);
    tcase_add_test(tc, test_open_none);
    tcase_add_test(tc, test_open_config_override);
    tcase_add_test(tc, test_open_same_set_no_warning);
    tcase_add_test(tc, test_open_bad_setting);
    suite_add_tcase(s, tc);
    return s;
}
