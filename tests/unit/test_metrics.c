/*
 * test_metrics.c - /metrics on a live server: the exposition passes
 * promtool, values move as they should after requests, the Shared Attention
 * gauges match the configuration, and a real Prometheus server scrapes it.
 */
#include <check.h>
#include <jansson.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "httpc.h"
#include "testutil.h"

#define BUNDLED "models/sa-tiny-sa-q8_0.gguf"

static srv_proc srv;
static bool srv_ok;

static void setup(void) {
    const char *args[] = {"--model", BUNDLED, "--kv-cache-bytes", "8M", NULL};
    srv_ok = srv_start(&srv, args) == 0;
}

static void teardown(void) {
    if (srv_ok) srv_stop(&srv);
}

START_TEST(test_promtool) {
    ck_assert(srv_ok);
    if (system("promtool --version >/dev/null 2>&1") != 0) {
        skip_msg("promtool", "promtool not installed (Debian package prometheus)");
        return;
    }
    /* Some traffic first so histograms have samples. */
    http_resp r;
    http_do(srv.port, "POST", "/v1/completions", NULL, "{\"prompt\": \"You will be\", \"max_tokens\": 5}", &r);
    http_resp_free(&r);
    char *m = http_metrics(srv.port);
    ck_assert_ptr_nonnull(m);
    char path[] = "/tmp/saserve-metrics-XXXXXX";
    int fd = mkstemp(path);
    ck_assert_int_eq(write(fd, m, strlen(m)), (ssize_t)strlen(m));
    close(fd);
    char cmd[256];
    snprintf(cmd, sizeof cmd, "promtool check metrics < %s > %s.out 2>&1", path, path);
    int rc = system(cmd);
    char out[300];
    snprintf(out, sizeof out, "%s.out", path);
    char *msg = read_file(out, NULL);
    ck_assert_msg(rc == 0, "promtool check metrics failed:\n%s", msg ? msg : "");
    free(msg);
    unlink(out);
    unlink(path);
    /* Histograms: cumulative buckets ending in +Inf equal to _count. */
    double inf = metrics_sample(m, "saserve_e2e_request_latency_seconds_bucket{le=\"+Inf\"}");
    ck_assert(inf >= 1);
    ck_assert(inf == metrics_sample(m, "saserve_e2e_request_latency_seconds_count"));
    double prev = 0;
    for (const char *p = strstr(m, "saserve_e2e_request_latency_seconds_bucket"); p;
         p = strstr(p + 1, "saserve_e2e_request_latency_seconds_bucket")) {
        double v = strtod(strchr(p, ' ') + 1, NULL);
        ck_assert(v >= prev);
        prev = v;
    }
    free(m);
}
END_TEST

START_TEST(test_shared_attention_gauges) {
    ck_assert(srv_ok);
    char *m = http_metrics(srv.port);
    ck_assert_ptr_nonnull(m);
    /* sa-tiny-sa: layers 4-11 share layer 3's attention. */
    for (int l = 0; l < 12; l++) {
        char s[96];
        snprintf(s, sizeof s, "saserve_shared_attention_layer_source{layer=\"%d\"}", l);
        ck_assert_msg(metrics_sample(m, s) == (l < 4 ? l : 3), "layer %d source %g", l, metrics_sample(m, s));
    }
    double k = metrics_sample(m, "saserve_kv_cache_bytes{tensor=\"k\"}");
    double v = metrics_sample(m, "saserve_kv_cache_bytes{tensor=\"v\"}");
    double saved = metrics_sample(m, "saserve_kv_cache_saved_bytes");
    /* V planes exist for all 12 layers, K for 4: the 8 missing K planes
     * are what was saved, and each plane is V/12. */
    ck_assert(v > 0);
    ck_assert_double_eq_tol(k, v * 4 / 12, 1);
    ck_assert_double_eq_tol(saved, v * 8 / 12, 1);
    /* 2 KV heads x 64 dims x f16 = 256 bytes per plane and token: 16 planes. */
    ck_assert_double_eq(metrics_sample(m, "saserve_kv_cache_bytes_per_token"), 16 * 256);
    ck_assert_ptr_nonnull(strstr(m, "saserve_model_info{model=\"sa-tiny-sa-q8_0\",arch=\"llama\""));
    ck_assert_ptr_nonnull(strstr(m, "shared_layers=\"4-11\"} 1\n"));
    free(m);
}
END_TEST

/* Counters agree with the usage the API returned. */
START_TEST(test_counters_follow_usage) {
    ck_assert(srv_ok);
    char *before = http_metrics(srv.port);
    double p0 = metrics_sample(before, "saserve_prompt_tokens_total"), g0 = metrics_sample(before, "saserve_generation_tokens_total");
    double ok0 = metrics_sample(before, "saserve_request_success_total{finished_reason=\"length\"}");
    double bad0 = metrics_sample(before, "saserve_request_failure_total{reason=\"bad_request\"}");
    free(before);
    int prompt = 0, gen = 0;
    for (int i = 0; i < 3; i++) {
        http_resp r;
        ck_assert_int_eq(http_do(srv.port, "POST", "/v1/completions", NULL,
                                 "{\"prompt\": \"The kernel provides\", \"max_tokens\": 7, \"ignore_eos\": true}", &r),
                         0);
        json_t *j = json_loads(r.body, 0, NULL);
        json_t *u = json_object_get(j, "usage");
        prompt += (int)json_integer_value(json_object_get(u, "prompt_tokens"));
        gen += (int)json_integer_value(json_object_get(u, "completion_tokens"));
        json_decref(j);
        http_resp_free(&r);
    }
    http_resp r;
    http_do(srv.port, "POST", "/v1/completions", NULL, "{\"prompt\": 1}", &r);
    http_resp_free(&r);
    char *after = http_metrics(srv.port);
    ck_assert_double_eq(metrics_sample(after, "saserve_prompt_tokens_total") - p0, prompt);
    ck_assert_double_eq(metrics_sample(after, "saserve_generation_tokens_total") - g0, gen);
    ck_assert_double_eq(metrics_sample(after, "saserve_request_success_total{finished_reason=\"length\"}") - ok0, 3);
    ck_assert_double_eq(metrics_sample(after, "saserve_request_failure_total{reason=\"bad_request\"}") - bad0, 1);
    free(after);
}
END_TEST

/* Every answered generation request is counted once per choice, including
 * those that never reach the scheduler (max_tokens 0 with echo: they used
 * to be missing from saserve_request_success_total and the prompt tokens). */
START_TEST(test_every_request_counted) {
    ck_assert(srv_ok);
    char *before = http_metrics(srv.port);
    double p0 = metrics_sample(before, "saserve_prompt_tokens_total");
    double ok0 = metrics_sample(before, "saserve_request_success_total{finished_reason=\"length\"}") +
                 metrics_sample(before, "saserve_request_success_total{finished_reason=\"stop\"}");
    free(before);
    static const char *const bodies[] = {
        "{\"prompt\": \"The kernel provides\", \"max_tokens\": 0, \"echo\": true}",
        "{\"prompt\": \"The kernel provides\", \"max_tokens\": 0, \"echo\": true, \"logprobs\": 1, \"n\": 2}",
        "{\"prompt\": [\"a b\", \"c d e\"], \"max_tokens\": 0}",
        "{\"prompt\": \"You will be\", \"max_tokens\": 3, \"n\": 2}",
    };
    int prompt = 0, choices = 0;
    for (size_t i = 0; i < sizeof bodies / sizeof bodies[0]; i++) {
        http_resp r;
        ck_assert_int_eq(http_do(srv.port, "POST", "/v1/completions", NULL, bodies[i], &r), 0);
        ck_assert_msg(r.status == 200, "%s: %d %s", bodies[i], r.status, r.body);
        json_t *j = json_loads(r.body, 0, NULL);
        prompt += (int)json_integer_value(json_object_get(json_object_get(j, "usage"), "prompt_tokens"));
        choices += (int)json_array_size(json_object_get(j, "choices"));
        json_decref(j);
        http_resp_free(&r);
    }
    ck_assert_int_eq(choices, 1 + 2 + 2 + 2);
    char *after = http_metrics(srv.port);
    double ok1 = metrics_sample(after, "saserve_request_success_total{finished_reason=\"length\"}") +
                 metrics_sample(after, "saserve_request_success_total{finished_reason=\"stop\"}");
    ck_assert_double_eq(ok1 - ok0, choices);
    ck_assert_double_eq(metrics_sample(after, "saserve_prompt_tokens_total") - p0, prompt);
    free(after);
}
END_TEST

typedef struct {
    int port;
    int status;
} bg_req;

static void *long_stream(void *v) {
    bg_req *b = v;
    http_resp r;
    if (http_do(b->port, "POST", "/v1/completions", NULL,
                "{\"prompt\": \"You will be\", \"max_tokens\": 1000, \"ignore_eos\": true, \"stream\": true}", &r) == 0)
        b->status = r.status;
    http_resp_free(&r);
    return NULL;
}

/* During a long stream: one running request, KV usage above 0; after it:
 * 0 and 0 again. */
START_TEST(test_gauges_move) {
    ck_assert(srv_ok);
    bg_req b = {srv.port, 0};
    pthread_t th;
    pthread_create(&th, NULL, long_stream, &b);
    double running = 0, usage = 0, max_usage = 0;
    for (int i = 0; i < 200; i++) {
        usleep(50 * 1000);
        char *m = http_metrics(srv.port);
        running = metrics_sample(m, "saserve_num_requests_running");
        usage = metrics_sample(m, "saserve_kv_cache_usage_ratio");
        free(m);
        if (usage > max_usage) max_usage = usage;
        if (running == 1 && usage > 0.05) break; /* 8 MiB holds 2048 tokens: 1000 is ~0.5 */
    }
    ck_assert_double_eq(running, 1);
    ck_assert(usage > 0.05);
    pthread_join(th, NULL);
    ck_assert_int_eq(b.status, 200);
    usleep(100 * 1000);
    char *m = http_metrics(srv.port);
    ck_assert_double_eq(metrics_sample(m, "saserve_num_requests_running"), 0);
    ck_assert_double_eq(metrics_sample(m, "saserve_kv_cache_usage_ratio"), 0);
    free(m);
}
END_TEST

/* A real Prometheus server scrapes saserve; the series come back through
 * its HTTP API. */
START_TEST(test_prometheus_scrape) {
    ck_assert(srv_ok);
    if (system("prometheus --version >/dev/null 2>&1") != 0) {
        skip_msg("prometheus scrape", "prometheus not installed (Debian package prometheus)");
        return;
    }
    char dir[] = "/tmp/saserve-prom-XXXXXX";
    ck_assert_ptr_nonnull(mkdtemp(dir));
    char cfg[256], data[256];
    snprintf(cfg, sizeof cfg, "%s/prometheus.yml", dir);
    snprintf(data, sizeof data, "%s/data", dir);
    FILE *f = fopen(cfg, "w");
    fprintf(f,
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: saserve\n    static_configs:\n"
            "      - targets: ['127.0.0.1:%d']\n",
            srv.port);
    fclose(f);
    int prom_port = 0;
    char listen[64];
    pid_t pid = 0;
    /* A port next to saserve's; if it is taken Prometheus exits: try another. */
    for (int attempt = 0; attempt < 5 && !pid; attempt++) {
        prom_port = srv.port + 1 + 7 * attempt;
        snprintf(listen, sizeof listen, "--web.listen-address=127.0.0.1:%d", prom_port);
        char cfgarg[300], dataarg[300];
        snprintf(cfgarg, sizeof cfgarg, "--config.file=%s", cfg);
        snprintf(dataarg, sizeof dataarg, "--storage.tsdb.path=%s", data);
        pid = fork();
        if (pid == 0) {
            char logp[300];
            snprintf(logp, sizeof logp, "%s/prom.log", dir);
            FILE *lf = freopen(logp, "w", stderr);
            (void)lf;
            execlp("prometheus", "prometheus", cfgarg, dataarg, listen, "--web.enable-lifecycle", (char *)NULL);
            _exit(127);
        }
        usleep(500 * 1000);
        int st;
        if (waitpid(pid, &st, WNOHANG) == pid) pid = 0; /* port taken: try another */
    }
    ck_assert_msg(pid > 0, "prometheus did not start");
    double got = NAN, want = 16 * 256;
    for (int i = 0; i < 120 && isnan(got); i++) {
        sleep(1);
        http_resp r;
        if (http_do(prom_port, "GET", "/api/v1/query?query=saserve_kv_cache_bytes_per_token", NULL, NULL, &r) != 0)
            continue;
        json_t *j = json_loads(r.body, 0, NULL);
        json_t *res = json_object_get(json_object_get(j, "data"), "result");
        if (json_array_size(res) == 1) {
            json_t *val = json_array_get(json_object_get(json_array_get(res, 0), "value"), 1);
            got = strtod(json_string_value(val), NULL);
        }
        json_decref(j);
        http_resp_free(&r);
    }
    /* up{job="saserve"} is 1: the scrape itself succeeded. */
    http_resp r;
    ck_assert_int_eq(http_do(prom_port, "GET", "/api/v1/query?query=up%7Bjob%3D%22saserve%22%7D", NULL, NULL, &r), 0);
    bool up = strstr(r.body, "\"1\"") != NULL;
    http_resp_free(&r);
    kill(pid, SIGTERM);
    waitpid(pid, NULL, 0);
    char rm[300];
    snprintf(rm, sizeof rm, "rm -rf %s", dir);
    ck_assert_int_eq(system(rm), 0);
    ck_assert_msg(!isnan(got), "Prometheus never returned saserve_kv_cache_bytes_per_token");
    ck_assert_double_eq(got, want);
    ck_assert(up);
}
END_TEST

Suite *metrics_suite(void) {
    Suite *s = suite_create("metrics");
    TCase *tc = tcase_create("live");
    tcase_add_unchecked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 200);
    tcase_add_test(tc, test_promtool);
    tcase_add_test(tc, test_shared_attention_gauges);
    tcase_add_test(tc, test_counters_follow_usage);
    tcase_add_test(tc, test_every_request_counted);
    tcase_add_test(tc, test_gauges_move);
    tcase_add_test(tc, test_prometheus_scrape);
    suite_add_tcase(s, tc);
    return s;
}
