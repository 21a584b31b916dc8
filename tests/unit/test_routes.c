/*
 * test_routes.c - request parsing (routes_parse_request) with the bundled
 * model's engine and no HTTP: regressions found by fuzzing the request
 * parser and the chat renderer (tests/fuzz), and the request caps.
 */
#include <check.h>
#include <string.h>

#include "config.h"
#include "server.h"

#define BUNDLED "models/sa-tiny-sa-q8_0.gguf"

static server S;
static saserve_config cfg;

static void quiet(engine_log_level level, const char *msg, void *ud) {
    (void)level, (void)msg, (void)ud;
}

static void setup(void) {
    char err[512];
    engine_set_log(quiet, NULL);
    ck_assert_int_eq(config_defaults(&cfg, err, sizeof err), 0);
    engine_params p = engine_default_params();
    p.model_path = BUNDLED;
    p.n_threads = 1;
    p.max_seqs = 1;
    p.max_batch_tokens = 16;
    p.kv_cache_bytes = 4 << 20;
    memset(&S, 0, sizeof S);
    ck_assert_msg(engine_open(&p, &S.eng, err, sizeof err) == 0, "%s", err);
    S.cfg = &cfg;
    S.info = engine_get_info(S.eng);
    S.chat_family = "chatml";
    snprintf(S.model_id, sizeof S.model_id, "sa-tiny-sa-q8_0");
}

static void teardown(void) {
    engine_close(S.eng);
    config_free(&cfg);
}

/* Parses body; returns the request (caller unrefs) or NULL with *e set. */
static request *parse(req_kind kind, const char *body, routes_verr *e) {
    request *r = NULL;
    int rc = routes_parse_request(&S, kind, body, strlen(body), &r, e);
    ck_assert_int_eq(rc == 0, r != NULL);
    return r;
}

static void expect_refused(req_kind kind, const char *body, const char *param, const char *msg_part) {
    routes_verr e;
    request *r = parse(kind, body, &e);
    ck_assert_msg(r == NULL, "accepted: %s", body);
    ck_assert_msg(e.status == 0 || e.status == 400, "status %d for %s", e.status, body);
    if (param) ck_assert_str_eq(e.param ? e.param : "(null)", param);
    if (msg_part) ck_assert_msg(strstr(e.msg, msg_part) != NULL, "'%s' lacks '%s'", e.msg, msg_part);
}

/* Fuzzing (chat_template): Llama 2's template renders a conversation of
 * only system messages to nothing; the request used to be queued with an
 * empty prompt and failed in the scheduler ("needs more KV cache than the
 * server has").  It is a 400 naming messages now. */
START_TEST(test_empty_chat_render) {
    S.chat_family = "llama2";
    expect_refused(REQ_CHAT, "{\"messages\": [{\"role\": \"system\", \"content\": \"Be brief.\"}]}", "messages",
                   "empty prompt");
    routes_verr e;
    request *r = parse(REQ_CHAT, "{\"messages\": [{\"role\": \"system\", \"content\": \"x\"}, {\"role\": \"user\", "
                                 "\"content\": \"Hi\"}]}", &e);
    ck_assert_ptr_nonnull(r);
    ck_assert_int_gt(r->prompt_len[0], 0);
    request_unref(r);
    S.chat_family = "chatml";
    r = parse(REQ_CHAT, "{\"messages\": [{\"role\": \"system\", \"content\": \"x\"}]}", &e);
    ck_assert_ptr_nonnull(r);
    request_unref(r);
}
END_TEST

Suite *routes_suite(void) {
    Suite *s = suite_create("routes");
    TCase *tc = tcase_create("parse");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, test_empty_chat_render);
    suite_add_tcase(s, tc);
    return s;
}
