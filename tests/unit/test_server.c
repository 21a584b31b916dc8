/*
 * test_server.c - the HTTP server end to end: a real saserve process on a
 * free 127.0.0.1 port, driven over sockets.
 *
 * The reference cases need ../shared (sa-tiny's f16 model and reference
 * outputs) and skip without it; the rest use the bundled model.
 */
#include <check.h>
#include <arpa/inet.h>
#include <jansson.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "httpc.h"
#include "testutil.h"

#define BUNDLED "models/sa-tiny-sa-q8_0.gguf"

int test_connect(int port);

static srv_proc srv;       /* started once per TCase (unchecked fixture) */
static bool srv_ok;
static json_t *ref;        /* sa-tiny ref-none.json, or NULL */

static json_t *post_json(int port, const char *path, const char *body, int *status) {
    http_resp r;
    if (http_do(port, "POST", path, NULL, body, &r) != 0) return NULL;
    *status = r.status;
    json_t *j = json_loads(r.body, 0, NULL);
    http_resp_free(&r);
    return j;
}

static void start(const char *const *args) {
    srv_ok = srv_start(&srv, args) == 0;
    if (!srv_ok) {
        char *log = srv_log(&srv);
        fprintf(stderr, "server did not start:\n%s\n", log ? log : "(no log)");
        free(log);
    }
}

static void stop(void) {
    if (srv_ok) srv_stop(&srv);
    srv_ok = false;
}

/* ==== Bundled model: API behaviour ===================================== */

static void setup_bundled(void) {
    const char *args[] = {"--model", BUNDLED, "--max-running", "4", NULL};
    start(args);
}

START_TEST(test_health_models) {
    ck_assert(srv_ok);
    http_resp r;
    ck_assert_int_eq(http_do(srv.port, "GET", "/health", NULL, NULL, &r), 0);
    ck_assert_int_eq(r.status, 200);
    ck_assert_ptr_nonnull(strstr(r.body, "\"ok\""));
    http_resp_free(&r);
    ck_assert_int_eq(http_do(srv.port, "GET", "/v1/models", NULL, NULL, &r), 0);
    ck_assert_int_eq(r.status, 200);
    json_t *j = json_loads(r.body, 0, NULL);
    ck_assert_ptr_nonnull(j);
    json_t *m = json_array_get(json_object_get(j, "data"), 0);
    ck_assert_str_eq(json_string_value(json_object_get(m, "id")), "sa-tiny-sa-q8_0");
    ck_assert_str_eq(json_string_value(json_object_get(m, "object")), "model");
    json_t *sa = json_object_get(m, "shared_attention");
    ck_assert_str_eq(json_string_value(json_object_get(sa, "shared_layers")), "4-11");
    json_t *src = json_object_get(sa, "layer_source");
    for (int l = 0; l < 12; l++) ck_assert_int_eq(json_integer_value(json_array_get(src, (size_t)l)), l < 4 ? l : 3);
    ck_assert_int_eq(json_integer_value(json_object_get(sa, "kv_bytes_per_token")) * 3,
                     json_integer_value(json_object_get(sa, "kv_bytes_per_token_unshared")) * 2);
    json_decref(j);
    http_resp_free(&r);
}
END_TEST

static void expect_400(const char *body, const char *param, const char *msg_part) {
    int st = 0;
    json_t *j = post_json(srv.port, "/v1/completions", body, &st);
    ck_assert_msg(j != NULL, "no JSON for %s", body);
    ck_assert_msg(st == 400, "status %d for %s", st, body);
    json_t *err = json_object_get(j, "error");
    ck_assert_msg(json_is_object(err), "no error object for %s", body);
    ck_assert_str_eq(json_string_value(json_object_get(err, "type")), "invalid_request_error");
    const char *msg = json_string_value(json_object_get(err, "message"));
    ck_assert_ptr_nonnull(msg);
    if (msg_part) ck_assert_msg(strstr(msg, msg_part) != NULL, "'%s' lacks '%s'", msg, msg_part);
    json_t *p = json_object_get(err, "param");
    if (param) ck_assert_str_eq(json_string_value(p), param);
    else ck_assert(json_is_null(p));
    json_decref(j);
}

START_TEST(test_bad_requests) {
    ck_assert(srv_ok);
    expect_400("{not json", NULL, "parse");
    expect_400("[1,2]", NULL, "object");
    expect_400("{}", "prompt", "required");
    expect_400("{\"prompt\": 5}", "prompt", NULL);
    expect_400("{\"prompt\": \"x\", \"temperature\": 5}", "temperature", "between 0 and 2");
    expect_400("{\"prompt\": \"x\", \"temperature\": \"hot\"}", "temperature", "number");
    expect_400("{\"prompt\": \"x\", \"max_tokens\": \"many\"}", "max_tokens", "integer");
    expect_400("{\"prompt\": \"x\", \"max_tokens\": -1}", "max_tokens", NULL);
    expect_400("{\"prompt\": \"x\", \"n\": 0}", "n", NULL);
    expect_400("{\"prompt\": [\"a\", \"b\", \"c\"], \"n\": 2}", "n", "exceed"); /* 6 > --max-running 4 */
    expect_400("{\"prompt\": \"x\", \"top_p\": 1.5}", "top_p", NULL);
    expect_400("{\"prompt\": \"x\", \"stop\": [\"a\",\"b\",\"c\",\"d\",\"e\"]}", "stop", "4");
    expect_400("{\"prompt\": \"x\", \"stop\": 3}", "stop", NULL);
    expect_400("{\"prompt\": \"x\", \"logprobs\": 9}", "logprobs", NULL);
    expect_400("{\"prompt\": \"x\", \"logit_bias\": {\"99999\": 1}}", "logit_bias", NULL);
    expect_400("{\"prompt\": [1, 2, 99999]}", "prompt", NULL);
    expect_400("{\"prompt\": \"x\", \"stream_options\": {\"include_usage\": true}}", "stream_options", NULL);
    /* A prompt longer than the context: both numbers in the message. */
    char *big = malloc(20000);
    size_t o = (size_t)sprintf(big, "{\"prompt\": [1");
    for (int i = 0; i < 1500; i++) o += (size_t)sprintf(big + o, ",%d", 300 + i % 100);
    sprintf(big + o, "]}");
    expect_400(big, "prompt", "1024");
    expect_400(big, "prompt", "1501");
    free(big);
    expect_400("{\"prompt\": \"x\", \"max_tokens\": 1023}", "max_tokens", "1024");

    http_resp r;
    ck_assert_int_eq(http_do(srv.port, "GET", "/nope", NULL, NULL, &r), 0);
    ck_assert_int_eq(r.status, 404);
    http_resp_free(&r);
    ck_assert_int_eq(http_do(srv.port, "GET", "/v1/completions", NULL, NULL, &r), 0);
    ck_assert_int_eq(r.status, 405);
    http_resp_free(&r);
    /* Still healthy. */
    ck_assert_int_eq(http_do(srv.port, "GET", "/health", NULL, NULL, &r), 0);
    ck_assert_int_eq(r.status, 200);
    http_resp_free(&r);
}
END_TEST

START_TEST(test_completion_shape) {
    ck_assert(srv_ok);
    int st;
    json_t *j = post_json(srv.port, "/v1/completions",
                          "{\"model\": \"whatever\", \"prompt\": \"The kernel\", \"max_tokens\": 5, \"temperature\": 0}",
                          &st);
    ck_assert_int_eq(st, 200);
    ck_assert_str_eq(json_string_value(json_object_get(j, "object")), "text_completion");
    ck_assert(!strncmp(json_string_value(json_object_get(j, "id")), "cmpl-", 5));
    ck_assert(json_integer_value(json_object_get(j, "created")) > 1600000000);
    json_t *c = json_array_get(json_object_get(j, "choices"), 0);
    ck_assert_int_eq(json_integer_value(json_object_get(c, "index")), 0);
    ck_assert_str_eq(json_string_value(json_object_get(c, "finish_reason")), "length");
    json_t *u = json_object_get(j, "usage");
    ck_assert_int_eq(json_integer_value(json_object_get(u, "completion_tokens")), 5);
    ck_assert_int_eq(json_integer_value(json_object_get(u, "prompt_tokens")), 3); /* <s> The kernel */
    ck_assert_int_eq(json_integer_value(json_object_get(u, "total_tokens")), 8);
    json_decref(j);
}
END_TEST

/* Stop strings never appear; the text ends before the first one. */
START_TEST(test_stop_string) {
    ck_assert(srv_ok);
    int st;
    json_t *full = post_json(srv.port, "/v1/completions",
                             "{\"prompt\": \"You will be\", \"max_tokens\": 20, \"temperature\": 0, \"ignore_eos\": true}",
                             &st);
    const char *text = json_string_value(json_object_get(json_array_get(json_object_get(full, "choices"), 0), "text"));
    ck_assert(strlen(text) > 6);
    /* Stop on a word from the middle of the greedy text. */
    char stop[8];
    memcpy(stop, text + 4, 3);
    stop[3] = 0;
    char body[256];
    snprintf(body, sizeof body,
             "{\"prompt\": \"You will be\", \"max_tokens\": 20, \"temperature\": 0, \"stop\": [\"%s\"], \"stream\": %s}",
             stop, "false");
    json_t *j = post_json(srv.port, "/v1/completions", body, &st);
    json_t *c = json_array_get(json_object_get(j, "choices"), 0);
    const char *t2 = json_string_value(json_object_get(c, "text"));
    const char *at = strstr(text, stop);
    ck_assert_ptr_nonnull(at);
    ck_assert_int_eq(strlen(t2), at - text);
    ck_assert(!strncmp(t2, text, strlen(t2)));
    ck_assert_str_eq(json_string_value(json_object_get(c, "finish_reason")), "stop");
    /* Streamed: the same text, never the stop string. */
    snprintf(body, sizeof body,
             "{\"prompt\": \"You will be\", \"max_tokens\": 20, \"temperature\": 0, \"stop\": \"%s\", \"stream\": true}",
             stop);
    http_resp r;
    ck_assert_int_eq(http_do(srv.port, "POST", "/v1/completions", NULL, body, &r), 0);
    char acc[1024] = "";
    for (char *p = strstr(r.body, "data: {"); p; p = strstr(p + 1, "data: {")) {
        char *e = strstr(p, "\n\n");
        json_t *ch = json_loadb(p + 6, (size_t)(e - p - 6), 0, NULL);
        ck_assert_ptr_nonnull(ch);
        const char *piece = json_string_value(json_object_get(json_array_get(json_object_get(ch, "choices"), 0), "text"));
        if (piece) strncat(acc, piece, sizeof acc - strlen(acc) - 1);
        json_decref(ch);
    }
    ck_assert_str_eq(acc, t2);
    ck_assert(strstr(r.body, "data: [DONE]\n\n"));
    http_resp_free(&r);
    json_decref(j);
    json_decref(full);
}
END_TEST

START_TEST(test_chat_shape) {
    ck_assert(srv_ok);
    int st;
    json_t *j = post_json(srv.port, "/v1/chat/completions",
                          "{\"messages\": [{\"role\": \"system\", \"content\": \"Be brief.\"}, {\"role\": \"user\", "
                          "\"content\": [{\"type\": \"text\", \"text\": \"Hello\"}]}], \"max_tokens\": 4, \"n\": 2}",
                          &st);
    ck_assert_int_eq(st, 200);
    ck_assert_str_eq(json_string_value(json_object_get(j, "object")), "chat.completion");
    json_t *cs = json_object_get(j, "choices");
    ck_assert_int_eq(json_array_size(cs), 2);
    for (size_t i = 0; i < 2; i++) {
        json_t *m = json_object_get(json_array_get(cs, i), "message");
        ck_assert_str_eq(json_string_value(json_object_get(m, "role")), "assistant");
        ck_assert(json_is_string(json_object_get(m, "content")));
    }
    ck_assert_int_eq(json_integer_value(json_object_get(json_object_get(j, "usage"), "completion_tokens")) <= 8, 1);
    json_decref(j);
}
END_TEST

/* A client that disconnects mid-stream: its sequence is freed. */
START_TEST(test_disconnect_frees) {
    ck_assert(srv_ok);
    int fd;
    {
        /* Raw socket: send a long streaming request, read a little, close. */
        const char *body = "{\"prompt\": \"You will be\", \"max_tokens\": 900, \"ignore_eos\": true, \"stream\": true}";
        char req[512];
        int n = snprintf(req, sizeof req,
                         "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         "Content-Length: %zu\r\n\r\n%s", strlen(body), body);
        fd = test_connect(srv.port);
        ck_assert_int_ge(fd, 0);
        ck_assert_int_eq(write(fd, req, (size_t)n), n);
        char buf[512];
        ck_assert_int_gt(read(fd, buf, sizeof buf), 0);
        close(fd);
    }
    /* Within a second or so the request is cancelled and KV usage is 0. */
    bool freed = false;
    for (int i = 0; i < 100 && !freed; i++) {
        usleep(100 * 1000);
        http_resp r;
        ck_assert_int_eq(http_do(srv.port, "GET", "/metrics", NULL, NULL, &r), 0);
        freed = strstr(r.body, "saserve_kv_cache_usage_ratio 0\n") &&
                strstr(r.body, "saserve_num_requests_running 0\n") &&
                !strstr(r.body, "saserve_request_failure_total{reason=\"cancelled\"} 0\n");
        http_resp_free(&r);
    }
    ck_assert_msg(freed, "the disconnected request was not cancelled and freed");
}
END_TEST

START_TEST(test_tokenize_detokenize) {
    ck_assert(srv_ok);
    int st;
    json_t *j = post_json(srv.port, "/tokenize", "{\"content\": \"Hello world\"}", &st);
    ck_assert_int_eq(st, 200);
    /* sa-tiny's vocabulary: "Hello world" -> 534 5072 3058 (no BOS by default). */
    json_t *t = json_object_get(j, "tokens");
    ck_assert_int_eq(json_array_size(t), 3);
    ck_assert_int_eq(json_integer_value(json_array_get(t, 0)), 534);
    ck_assert_int_eq(json_integer_value(json_array_get(t, 2)), 3058);
    json_decref(j);
    j = post_json(srv.port, "/tokenize", "{\"content\": \"Hello\", \"add_special\": true, \"with_pieces\": true}", &st);
    t = json_object_get(j, "tokens");
    ck_assert_int_eq(json_integer_value(json_object_get(json_array_get(t, 0), "id")), 1);
    ck_assert_str_eq(json_string_value(json_object_get(json_array_get(t, 2), "piece")), "ello");
    json_decref(j);
    j = post_json(srv.port, "/detokenize", "{\"tokens\": [534, 5072, 3058]}", &st);
    ck_assert_int_eq(st, 200);
    ck_assert_str_eq(json_string_value(json_object_get(j, "content")), " Hello world");
    json_decref(j);
    j = post_json(srv.port, "/detokenize", "{\"tokens\": [-1]}", &st);
    ck_assert_int_eq(st, 400);
    json_decref(j);
}
END_TEST

/* Invalid UTF-8 in a request body is a 400, not a crash. */
START_TEST(test_invalid_utf8) {
    ck_assert(srv_ok);
    int st;
    json_t *j = post_json(srv.port, "/v1/completions", "{\"prompt\": \"bad \xff\xfe byte\"}", &st);
    ck_assert_int_eq(st, 400);
    ck_assert(json_is_object(json_object_get(j, "error")));
    json_decref(j);
    /* A lone surrogate escape. */
    j = post_json(srv.port, "/v1/completions", "{\"prompt\": \"x \\ud800 y\"}", &st);
    ck_assert_int_eq(st, 400);
    json_decref(j);
}
END_TEST

/* The API and `saserve run` give the same greedy text. */
START_TEST(test_api_equals_run) {
    ck_assert(srv_ok);
    const char *prompt = "In computer science, a linked list is";
    char cmd[1024];
    snprintf(cmd, sizeof cmd, "%s run -m %s -p '%s' --temperature 0 -n 24 --ignore-eos 2>/dev/null", saserve_bin(),
             BUNDLED, prompt);
    FILE *p = popen(cmd, "r");
    ck_assert_ptr_nonnull(p);
    char run_out[4096];
    size_t n = fread(run_out, 1, sizeof run_out - 1, p);
    run_out[n] = 0;
    ck_assert_int_eq(pclose(p), 0);
    char body[512];
    snprintf(body, sizeof body, "{\"prompt\": \"%s\", \"max_tokens\": 24, \"temperature\": 0, \"ignore_eos\": true}",
             prompt);
    int st;
    json_t *j = post_json(srv.port, "/v1/completions", body, &st);
    ck_assert_int_eq(st, 200);
    const char *api = json_string_value(json_object_get(json_array_get(json_object_get(j, "choices"), 0), "text"));
    ck_assert_ptr_nonnull(api);
    ck_assert(n > 0);
    ck_assert_str_eq(api, run_out);
    json_decref(j);
}
END_TEST

/* The official OpenAI SDK (npm "openai", pinned in tests/integration). */
START_TEST(test_openai_sdk) {
    if (system("node --version >/dev/null 2>&1") != 0) {
        skip_msg("openai sdk", "node is not installed");
        return;
    }
    if (access("tests/integration/node_modules/openai/package.json", R_OK) != 0) {
        skip_msg("openai sdk", "tests/integration/node_modules missing (npm ci in tests/integration)");
        return;
    }
    srv_proc p;
    const char *args[] = {"--model", BUNDLED, "--api-key", "test-key-123", NULL};
    ck_assert_int_eq(srv_start(&p, args), 0);
    char cmd[512];
    snprintf(cmd, sizeof cmd, "node tests/integration/openai_sdk.mjs http://127.0.0.1:%d/v1 test-key-123 > %s.sdk 2>&1",
             p.port, p.log_path);
    int rc = system(cmd);
    char path[128];
    snprintf(path, sizeof path, "%s.sdk", p.log_path);
    char *out = read_file(path, NULL);
    ck_assert_msg(rc == 0, "openai SDK checks failed:\n%s", out ? out : "(no output)");
    /* The summary line proves the script ran its checks. */
    ck_assert_ptr_nonnull(out);
    ck_assert_ptr_nonnull(strstr(out, " passed, 0 failed"));
    free(out);
    unlink(path);
    ck_assert_int_eq(srv_stop(&p), 0);
}
END_TEST

typedef struct {
    int port;
    int status;
} bg_stream;

static void *long_stream(void *v) {
    bg_stream *b = v;
    http_resp r;
    if (http_do(b->port, "POST", "/v1/completions", NULL,
                "{\"prompt\": \"You will be\", \"max_tokens\": 300, \"ignore_eos\": true, \"stream\": true}",
                &r) == 0)
        b->status = r.status;
    http_resp_free(&r);
    return NULL;
}

/* /metrics scraped while the scheduler steps: the engine's counters
 * (tokens, attention work saved, prefix-cache stats) are read by the loop
 * thread as the engine thread updates them.  They were plain fields, a data
 * race ThreadSanitizer reported in the server; they are atomics now (this
 * test makes the overlap certain under make tsan). */
START_TEST(test_scrape_during_generation) {
    ck_assert(srv_ok);
    bg_stream b = {srv.port, 0};
    pthread_t th;
    pthread_create(&th, NULL, long_stream, &b);
    double last = -1;
    for (int i = 0; i < 30; i++) {
        http_resp r;
        ck_assert_int_eq(http_do(srv.port, "GET", "/metrics", NULL, NULL, &r), 0);
        ck_assert_int_eq(r.status, 200);
        const char *p = strstr(r.body, "\nsaserve_attention_flops_saved_total ");
        ck_assert_ptr_nonnull(p);
        double v = strtod(p + strlen("\nsaserve_attention_flops_saved_total "), NULL);
        ck_assert(v >= last); /* a counter never goes back */
        last = v;
        http_resp_free(&r);
        usleep(20 * 1000);
    }
    pthread_join(th, NULL);
    ck_assert_int_eq(b.status, 200);
}
END_TEST

/* API keys (constant-time compare; /health exempt), CORS, body limit. */
START_TEST(test_access) {
    srv_proc p;
    const char *args[] = {"--model", BUNDLED, "--api-key", "k1", "--cors-origins", "https://a.example, https://b.example",
                          "--max-body-bytes", "2K", NULL};
    ck_assert_int_eq(srv_start(&p, args), 0);
    http_resp r;
    const char *body = "{\"prompt\": \"x\", \"max_tokens\": 1}";
    ck_assert_int_eq(http_do(p.port, "POST", "/v1/completions", NULL, body, &r), 0);
    ck_assert_int_eq(r.status, 401);
    ck_assert_ptr_nonnull(strstr(r.body, "\"invalid_api_key\""));
    http_resp_free(&r);
    ck_assert_int_eq(http_do(p.port, "POST", "/v1/completions", "Authorization: Bearer k2\r\n", body, &r), 0);
    ck_assert_int_eq(r.status, 401);
    http_resp_free(&r);
    ck_assert_int_eq(http_do(p.port, "POST", "/v1/completions", "Authorization: Bearer k1\r\n", body, &r), 0);
    ck_assert_int_eq(r.status, 200);
    http_resp_free(&r);
    ck_assert_int_eq(http_do(p.port, "GET", "/health", NULL, NULL, &r), 0);
    ck_assert_int_eq(r.status, 200);
    http_resp_free(&r);
    ck_assert_int_eq(http_do(p.port, "GET", "/metrics", NULL, NULL, &r), 0);
    ck_assert_int_eq(r.status, 200);
    http_resp_free(&r);
    /* CORS: a listed origin is echoed, others get no header; preflight. */
    ck_assert_int_eq(http_do(p.port, "OPTIONS", "/v1/completions", "Origin: https://b.example\r\n", NULL, &r), 0);
    ck_assert_int_eq(r.status, 204);
    char h[128];
    ck_assert(http_header(&r, "Access-Control-Allow-Origin", h, sizeof h));
    ck_assert_str_eq(h, "https://b.example");
    ck_assert(http_header(&r, "Access-Control-Allow-Methods", h, sizeof h));
    ck_assert(http_header(&r, "Access-Control-Allow-Headers", h, sizeof h));
    ck_assert_ptr_nonnull(strstr(h, "Authorization"));
    http_resp_free(&r);
    ck_assert_int_eq(http_do(p.port, "GET", "/health", "Origin: https://evil.example\r\n", NULL, &r), 0);
    ck_assert(!http_header(&r, "Access-Control-Allow-Origin", h, sizeof h));
    http_resp_free(&r);
    /* Body over 2 KiB: 413. */
    char *big = malloc(4096);
    memset(big, 'a', 4095);
    big[4095] = 0;
    memcpy(big, "{\"prompt\": \"", 12);
    memcpy(big + 4093, "\"}", 2);
    ck_assert_int_eq(http_do(p.port, "POST", "/v1/completions", "Authorization: Bearer k1\r\n", big, &r), 0);
    ck_assert_int_eq(r.status, 413);
    ck_assert_ptr_nonnull(strstr(r.body, "\"error\""));
    http_resp_free(&r);
    free(big);
    ck_assert_int_eq(srv_stop(&p), 0);
    /* The key never appears in the log. */
    char *log = srv_log(&p);
    ck_assert_ptr_nonnull(log);
    ck_assert_ptr_null(strstr(log, "k1\n"));
    ck_assert_ptr_null(strstr(log, "Bearer"));
    free(log);
}
END_TEST

/* ==== Security: limits, caps, no filesystem, keys, bind ================ */

#define KEY "sk-soak-SECRET-1234567890"
#define WRONG_KEY "sk-wrong-9876543210"

static srv_proc sec;
static bool sec_ok;

static void setup_security(void) {
    const char *args[] = {"--model", BUNDLED, "--api-key", KEY, "--log-level", "debug", "--max-tokens-limit", "8",
                          "--max-n", "2", "--ctx-size", "64", "--max-body-bytes", "64K", NULL};
    sec_ok = srv_start(&sec, args) == 0;
}

static void teardown_security(void) {
    if (sec_ok) srv_stop(&sec);
    sec_ok = false;
}

/* Raw request; returns the status of the reply (0 if none). */
static int raw_status(int port, const char *head, size_t head_len) {
    int fd = test_connect(port);
    ck_assert_int_ge(fd, 0);
    size_t off = 0;
    while (off < head_len) {
        ssize_t w = write(fd, head + off, head_len - off);
        if (w <= 0) break; /* the server may answer (and close) early */
        off += (size_t)w;
    }
    char buf[512];
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0) return 0;
    buf[n] = 0;
    int st = 0;
    sscanf(buf, "HTTP/1.%*d %d", &st);
    return st;
}

static void assert_healthy(int port) {
    http_resp r;
    ck_assert_int_eq(http_do(port, "GET", "/health", NULL, NULL, &r), 0);
    ck_assert_int_eq(r.status, 200);
    http_resp_free(&r);
}

/* Headers beyond libmicrohttpd's per-connection memory (64 KiB) get 431,
 * as do very many headers and a huge request line; the server stays up. */
START_TEST(test_header_limits) {
    ck_assert(sec_ok);
    size_t big = 100 * 1024;
    char *req = malloc(big + 512);
    int n = sprintf(req, "GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ");
    memset(req + n, 'a', big);
    n += (int)big;
    n += sprintf(req + n, "\r\n\r\n");
    int st = raw_status(sec.port, req, (size_t)n);
    ck_assert_msg(st == 431 || st == 413, "one huge header: status %d", st);
    n = sprintf(req, "GET /health HTTP/1.1\r\nHost: x\r\n");
    for (int i = 0; i < 8000; i++) n += sprintf(req + n, "X-H%d: v\r\n", i);
    n += sprintf(req + n, "\r\n");
    st = raw_status(sec.port, req, (size_t)n);
    ck_assert_msg(st == 431 || st == 413, "8000 headers: status %d", st);
    n = sprintf(req, "GET /");
    memset(req + n, 'a', big);
    n += (int)big;
    n += sprintf(req + n, " HTTP/1.1\r\nHost: x\r\n\r\n");
    st = raw_status(sec.port, req, (size_t)n);
    ck_assert_msg(st == 414 || st == 431 || st == 413, "huge request line: status %d", st);
    free(req);
    assert_healthy(sec.port);
}
END_TEST

/* Bodies over max_body_bytes get 413 whether announced (Content-Length) or
 * chunked; chunked ones are read and discarded, never stored. */
START_TEST(test_body_limits) {
    ck_assert(sec_ok);
    char head[256];
    int n = snprintf(head, sizeof head,
                     "POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer " KEY
                     "\r\nContent-Length: 999999999\r\n\r\n");
    ck_assert_int_eq(raw_status(sec.port, head, (size_t)n), 413);
    /* Chunked, 128 KiB in 8 KiB chunks. */
    size_t cap = 200 * 1024, o = 0;
    char *req = malloc(cap);
    o += (size_t)sprintf(req, "POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: "
                              "Bearer " KEY "\r\nTransfer-Encoding: chunked\r\n\r\n");
    for (int i = 0; i < 16; i++) {
        o += (size_t)sprintf(req + o, "2000\r\n");
        memset(req + o, ' ', 8192);
        o += 8192;
        o += (size_t)sprintf(req + o, "\r\n");
    }
    o += (size_t)sprintf(req + o, "0\r\n\r\n");
    ck_assert_int_eq(raw_status(sec.port, req, o), 413);
    free(req);
    assert_healthy(sec.port);
}
END_TEST

static void expect_refused(const char *path, const char *body, const char *param) {
    http_resp r;
    ck_assert_int_eq(http_do(sec.port, "POST", path, "Authorization: Bearer " KEY "\r\n", body, &r), 0);
    ck_assert_msg(r.status == 400, "%s: status %d %s", body, r.status, r.body);
    json_t *j = json_loads(r.body, 0, NULL);
    const char *p = json_string_value(json_object_get(json_object_get(j, "error"), "param"));
    ck_assert_msg(p && !strcmp(p, param), "%s: param %s", body, p ? p : "(null)");
    json_decref(j);
    http_resp_free(&r);
}

/* The caps: max_tokens (max_tokens_limit), n (max_n), the prompt (the
 * context), prompts per request, messages, stop strings, logprobs. */
START_TEST(test_request_caps) {
    ck_assert(sec_ok);
    expect_refused("/v1/completions", "{\"prompt\": \"x\", \"max_tokens\": 9}", "max_tokens");
    expect_refused("/v1/chat/completions",
                   "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"max_completion_tokens\": 9}",
                   "max_completion_tokens");
    expect_refused("/v1/completions", "{\"prompt\": \"x\", \"n\": 3}", "n");
    expect_refused("/v1/completions", "{\"prompt\": \"x\", \"logprobs\": 6}", "logprobs");
    expect_refused("/v1/completions", "{\"prompt\": \"x\", \"stop\": [\"a\", \"b\", \"c\", \"d\", \"e\"]}", "stop");
    /* Over the 64-token context. */
    char body[4096];
    int o = sprintf(body, "{\"prompt\": \"");
    for (int i = 0; i < 100; i++) o += sprintf(body + o, "word%d ", i);
    sprintf(body + o, "\"}");
    expect_refused("/v1/completions", body, "prompt");
    /* 65 prompts (at most 64). */
    o = sprintf(body, "{\"prompt\": [");
    for (int i = 0; i < 65; i++) o += sprintf(body + o, "%s\"p\"", i ? ", " : "");
    sprintf(body + o, "]}");
    expect_refused("/v1/completions", body, "prompt");
    /* 1025 messages (at most 1024). */
    size_t cap = 64 * 1025 + 64;
    char *big = malloc(cap);
    o = sprintf(big, "{\"messages\": [");
    for (int i = 0; i < 1025; i++) o += sprintf(big + o, "%s{\"role\": \"user\", \"content\": \"m\"}", i ? "," : "");
    sprintf(big + o, "]}");
    expect_refused("/v1/chat/completions", big, "messages");
    free(big);
    /* Within the caps: fine. */
    http_resp r;
    ck_assert_int_eq(http_do(sec.port, "POST", "/v1/completions", "Authorization: Bearer " KEY "\r\n",
                             "{\"prompt\": \"You will be\", \"max_tokens\": 8, \"n\": 2}", &r),
                     0);
    ck_assert_int_eq(r.status, 200);
    http_resp_free(&r);
}
END_TEST

/* Nothing in a request names a file: "model" is echoed as the served
 * model's id whatever it says, and paths are matched against a fixed table
 * (traversal attempts are 404s that contain no file content). */
START_TEST(test_no_filesystem_path) {
    ck_assert(sec_ok);
    http_resp r;
    ck_assert_int_eq(http_do(sec.port, "POST", "/v1/completions", "Authorization: Bearer " KEY "\r\n",
                             "{\"model\": \"../../../../etc/passwd\", \"prompt\": \"x\", \"max_tokens\": 1}", &r),
                     0);
    ck_assert_int_eq(r.status, 200);
    json_t *j = json_loads(r.body, 0, NULL);
    ck_assert_str_eq(json_string_value(json_object_get(j, "model")), "sa-tiny-sa-q8_0");
    json_decref(j);
    http_resp_free(&r);
    static const char *const paths[] = {"/../../etc/passwd", "/v1/../../../etc/passwd", "/models/../../etc/passwd",
                                        "/%2e%2e/%2e%2e/etc/passwd"};
    for (size_t i = 0; i < sizeof paths / sizeof paths[0]; i++) {
        ck_assert_int_eq(http_do(sec.port, "GET", paths[i], "Authorization: Bearer " KEY "\r\n", NULL, &r), 0);
        ck_assert_msg(r.status == 404 || r.status == 400, "%s: %d", paths[i], r.status);
        ck_assert_ptr_null(strstr(r.body, "root:"));
        http_resp_free(&r);
    }
}
END_TEST

/* API keys: a wrong or missing key is a 401 (before the body is read); the
 * keys, right or wrong, never reach the log, even at debug level. */
START_TEST(test_keys_never_logged) {
    ck_assert(sec_ok);
    http_resp r;
    const char *body = "{\"prompt\": \"x\", \"max_tokens\": 1}";
    ck_assert_int_eq(http_do(sec.port, "POST", "/v1/completions", "Authorization: Bearer " WRONG_KEY "\r\n", body, &r),
                     0);
    ck_assert_int_eq(r.status, 401);
    ck_assert_ptr_null(strstr(r.body, WRONG_KEY));
    http_resp_free(&r);
    ck_assert_int_eq(http_do(sec.port, "POST", "/v1/completions", "Authorization: Bearer " KEY "x\r\n", body, &r), 0);
    ck_assert_int_eq(r.status, 401); /* a prefix of the given key matching is not enough */
    http_resp_free(&r);
    ck_assert_int_eq(http_do(sec.port, "POST", "/v1/completions", "Authorization: Bearer sk\r\n", body, &r), 0);
    ck_assert_int_eq(r.status, 401);
    http_resp_free(&r);
    ck_assert_int_eq(http_do(sec.port, "POST", "/v1/completions", "Authorization: Bearer " KEY "\r\n", body, &r), 0);
    ck_assert_int_eq(r.status, 200);
    http_resp_free(&r);
    char *log = srv_log(&sec);
    ck_assert_ptr_nonnull(log);
    ck_assert_msg(strstr(log, "queued:") != NULL, "not a debug log");
    ck_assert_ptr_null(strstr(log, KEY));
    ck_assert_ptr_null(strstr(log, WRONG_KEY));
    free(log);
    /* --print-config masks it too. */
    char cmd[512];
    snprintf(cmd, sizeof cmd, "%s serve --api-key %s --print-config", saserve_bin(), KEY);
    FILE *p = popen(cmd, "r");
    char out[16384];
    size_t n = fread(out, 1, sizeof out - 1, p);
    out[n] = 0;
    pclose(p);
    ck_assert_ptr_nonnull(strstr(out, "\"api_key\""));
    ck_assert_ptr_null(strstr(out, KEY));
}
END_TEST

/* Without --host the server listens on 127.0.0.1 only. */
START_TEST(test_default_bind_loopback) {
    ck_assert(sec_ok);
    char *log = srv_log(&sec);
    ck_assert_ptr_nonnull(log);
    ck_assert_msg(strstr(log, "listening on http://127.0.0.1:") != NULL, "log:\n%s", log);
    free(log);
}
END_TEST

/* ==== Reference: sa-tiny f16 greedy through the API ==================== */

static void setup_ref(void) {
    char path[512], rpath[512];
    ref = NULL;
    srv_ok = false;
    if (!shared_path(path, sizeof path, "models/sa-tiny/model-f16.gguf", "server reference") ||
        !shared_path(rpath, sizeof rpath, "models/sa-tiny/reference/ref-none.json", "server reference"))
        return;
    ref = json_load_file(rpath, 0, NULL);
    const char *args[] = {"--model", path, "--shared-layers", "none", "--max-running", "16", NULL};
    start(args);
}

static void teardown_ref(void) {
    stop();
    json_decref(ref);
    ref = NULL;
}

/* The reference decodes standalone (sentencepiece drops one leading space). */
static bool same_text(const char *api, const char *ref_text) {
    return !strcmp(api, ref_text) || (api[0] == ' ' && !strcmp(api + 1, ref_text));
}

static char *complete(int port, const char *prompt_json, bool stream) {
    char body[2048];
    snprintf(body, sizeof body,
             "{\"prompt\": %s, \"max_tokens\": 32, \"temperature\": 0, \"ignore_eos\": true, \"stream\": %s}",
             prompt_json, stream ? "true" : "false");
    http_resp r;
    if (http_do(port, "POST", "/v1/completions", NULL, body, &r) != 0) return NULL;
    char *out = NULL;
    if (!stream) {
        json_t *j = json_loads(r.body, 0, NULL);
        const char *t = json_string_value(json_object_get(json_array_get(json_object_get(j, "choices"), 0), "text"));
        out = t ? strdup(t) : NULL;
        json_decref(j);
    } else {
        {
            size_t cap = 4096, len = 0;
            out = calloc(1, cap);
            int chunks = 0;
            for (char *p = strstr(r.body, "data: {"); p; p = strstr(p + 1, "data: {")) {
                char *e = strstr(p, "\n\n");
                json_t *ch = json_loadb(p + 6, (size_t)(e - p - 6), 0, NULL);
                const char *t = json_string_value(json_object_get(json_array_get(json_object_get(ch, "choices"), 0), "text"));
                if (t && len + strlen(t) < cap) {
                    strcpy(out + len, t);
                    len += strlen(t);
                }
                chunks++;
                json_decref(ch);
            }
            /* Several chunks, and the stream's last event is [DONE]. */
            size_t bl = r.body_len;
            if (chunks < 2 || bl < 14 || strcmp(r.body + bl - 14, "data: [DONE]\n\n") != 0) {
                free(out);
                out = NULL;
            }
        }
    }
    http_resp_free(&r);
    return out;
}

static char *prompt_json(json_t *p) {
    return json_dumps(json_object_get(p, "text"), JSON_ENCODE_ANY);
}

START_TEST(test_reference_greedy) {
    if (!ref) return;
    ck_assert(srv_ok);
    json_t *prompts = json_object_get(ref, "prompts");
    for (size_t i = 0; i < json_array_size(prompts); i++) {
        json_t *p = json_array_get(prompts, i);
        char *pj = prompt_json(p);
        const char *want = json_string_value(json_object_get(p, "greedy_text"));
        for (int stream = 0; stream < 2; stream++) {
            char *got = complete(srv.port, pj, stream);
            ck_assert_msg(got != NULL, "prompt %zu: no %s response", i, stream ? "stream" : "plain");
            ck_assert_msg(same_text(got, want), "prompt %zu (%s): got '%s' want '%s'", i, stream ? "stream" : "plain",
                          got, want);
            free(got);
        }
        free(pj);
    }
}
END_TEST

typedef struct {
    int port;
    char *prompt;
    char *out;
} conc_arg;

static void *conc_worker(void *v) {
    conc_arg *a = v;
    a->out = complete(a->port, a->prompt, false);
    return NULL;
}

/* 16 concurrent greedy requests give exactly what they give one at a time. */
START_TEST(test_concurrent_equals_sequential) {
    if (!ref) return;
    ck_assert(srv_ok);
    json_t *prompts = json_object_get(ref, "prompts");
    size_t np = json_array_size(prompts);
    conc_arg args[16];
    pthread_t th[16];
    for (int i = 0; i < 16; i++) {
        args[i].port = srv.port;
        args[i].prompt = prompt_json(json_array_get(prompts, (size_t)i % np));
        args[i].out = NULL;
    }
    char *alone[16];
    for (size_t i = 0; i < np; i++) alone[i] = complete(srv.port, args[i].prompt, false);
    for (int i = 0; i < 16; i++) pthread_create(&th[i], NULL, conc_worker, &args[i]);
    for (int i = 0; i < 16; i++) pthread_join(th[i], NULL);
    for (int i = 0; i < 16; i++) {
        ck_assert_ptr_nonnull(args[i].out);
        ck_assert_msg(!strcmp(args[i].out, alone[(size_t)i % np]), "request %d: '%s' vs alone '%s'", i, args[i].out,
                      alone[(size_t)i % np]);
        free(args[i].out);
        free(args[i].prompt);
    }
    for (size_t i = 0; i < np; i++) free(alone[i]);
}
END_TEST

/* ==== Limits and shutdown ============================================== */

static int send_raw(int port, const char *body) {
    char req[512];
    int n = snprintf(req, sizeof req,
                     "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: "
                     "%zu\r\n\r\n%s", strlen(body), body);
    int fd = test_connect(port);
    ck_assert_int_ge(fd, 0);
    ck_assert_int_eq(write(fd, req, (size_t)n), n);
    return fd;
}

static bool idle(int port) {
    http_resp r;
    if (http_do(port, "GET", "/metrics", NULL, NULL, &r) != 0) return false;
    bool ok = strstr(r.body, "saserve_num_requests_running 0\n") && strstr(r.body, "saserve_num_requests_waiting 0\n");
    http_resp_free(&r);
    return ok;
}

START_TEST(test_queue_full_and_drain) {
    const char *args[] = {"--model", BUNDLED, "--max-running", "1", "--max-queue", "1", "--shutdown-grace", "300", NULL};
    srv_proc p;
    ck_assert_int_eq(srv_start(&p, args), 0);
    /* Two long requests: one runs, one waits; a third is refused. */
    const char *longreq = "{\"prompt\": \"You will be\", \"max_tokens\": 1000, \"ignore_eos\": true}";
    int fds[2];
    for (int i = 0; i < 2; i++) {
        fds[i] = send_raw(p.port, longreq);
        usleep(200 * 1000);
    }
    http_resp r;
    ck_assert_int_eq(http_do(p.port, "POST", "/v1/completions", NULL, longreq, &r), 0);
    ck_assert_int_eq(r.status, 429);
    char ra[32];
    ck_assert(http_header(&r, "Retry-After", ra, sizeof ra));
    ck_assert_ptr_nonnull(strstr(r.body, "\"error\""));
    http_resp_free(&r);
    /* Both clients hang up: both requests go, running and waiting. */
    close(fds[0]);
    close(fds[1]);
    bool gone = false;
    for (int i = 0; i < 300 && !gone; i++) {
        usleep(100 * 1000);
        gone = idle(p.port);
    }
    ck_assert_msg(gone, "disconnected requests still counted");

    /* SIGTERM while a request is in flight: new ones get 503, the running
     * one finishes, the process exits 0. */
    int fd = send_raw(p.port, "{\"prompt\": \"You will be\", \"max_tokens\": 400, \"ignore_eos\": true}");
    /* Signal only once the request runs: a request still unread in the
     * socket when SIGTERM lands is not in flight, and with nothing in flight
     * the server exits at once (a fixed 300 ms was not always enough on a
     * busy machine). */
    bool running = false;
    for (int i = 0; i < 200 && !running; i++) {
        ck_assert_int_eq(http_do(p.port, "GET", "/metrics", NULL, NULL, &r), 0);
        running = strstr(r.body, "saserve_num_requests_running 1\n") != NULL;
        http_resp_free(&r);
        if (!running) usleep(20 * 1000);
    }
    ck_assert(running);
    kill(p.pid, SIGTERM);
    usleep(300 * 1000);
    ck_assert_int_eq(http_do(p.port, "POST", "/v1/completions", NULL, longreq, &r), 0);
    ck_assert_int_eq(r.status, 503);
    http_resp_free(&r);
    ck_assert_int_eq(http_do(p.port, "GET", "/health", NULL, NULL, &r), 0);
    ck_assert_int_eq(r.status, 503);
    http_resp_free(&r);
    char buf[16384];
    size_t got = 0;
    ssize_t k;
    while ((k = read(fd, buf + got, sizeof buf - 1 - got)) > 0) got += (size_t)k;
    buf[got] = 0;
    ck_assert_msg(strstr(buf, "200 OK") && strstr(buf, "\"finish_reason\":\"length\""), "in-flight: %s", buf);
    close(fd);
    ck_assert_int_eq(srv_stop(&p), 0);
}
END_TEST

int test_connect(int port) {
    /* http_do's connect, exposed for raw-socket tests. */
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(fd, (struct sockaddr *)&a, sizeof a) != 0) {
        close(fd);
        return -1;
    }
    return fd;
}

Suite *server_suite(void) {
    Suite *s = suite_create("server");
    TCase *tc = tcase_create("api");
    tcase_add_unchecked_fixture(tc, setup_bundled, stop);
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, test_health_models);
    tcase_add_test(tc, test_bad_requests);
    tcase_add_test(tc, test_completion_shape);
    tcase_add_test(tc, test_stop_string);
    tcase_add_test(tc, test_chat_shape);
    tcase_add_test(tc, test_disconnect_frees);
    tcase_add_test(tc, test_api_equals_run);
    tcase_add_test(tc, test_tokenize_detokenize);
    tcase_add_test(tc, test_invalid_utf8);
    tcase_add_test(tc, test_scrape_during_generation);
    suite_add_tcase(s, tc);

    tc = tcase_create("access");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, test_access);
    suite_add_tcase(s, tc);

    tc = tcase_create("security");
    tcase_add_unchecked_fixture(tc, setup_security, teardown_security);
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, test_header_limits);
    tcase_add_test(tc, test_body_limits);
    tcase_add_test(tc, test_request_caps);
    tcase_add_test(tc, test_no_filesystem_path);
    tcase_add_test(tc, test_keys_never_logged);
    tcase_add_test(tc, test_default_bind_loopback);
    suite_add_tcase(s, tc);

    tc = tcase_create("sdk");
    tcase_set_timeout(tc, 300);
    tcase_add_test(tc, test_openai_sdk);
    suite_add_tcase(s, tc);

    tc = tcase_create("reference");
    tcase_add_unchecked_fixture(tc, setup_ref, teardown_ref);
    tcase_set_timeout(tc, 300);
    tcase_add_test(tc, test_reference_greedy);
    tcase_add_test(tc, test_concurrent_equals_sequential);
    suite_add_tcase(s, tc);

    tc = tcase_create("limits");
    tcase_set_timeout(tc, 400);
    tcase_add_test(tc, test_queue_full_and_drain);
    suite_add_tcase(s, tc);
    return s;
}
