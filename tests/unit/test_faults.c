/*
 * test_faults.c - saserve under faults, each against a real server process
 * on loopback: memory that is not there at start-up, a model file that is
 * truncated (before start, and while mapped), a client that never reads its
 * stream, a request that hits its timeout, and SIGTERM while requests run.
 */
#include <check.h>
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <netinet/in.h>
#include <arpa/inet.h>

#include "engine.h"
#include "httpc.h"
#include "testutil.h"

#define BUNDLED "models/sa-tiny-sa-q8_0.gguf"

/* ==== Helpers ========================================================== */

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* Runs saserve with args (NULL-ended) to completion (at most limit_s
 * seconds), output in *out (caller frees).  Returns the exit status, 128 +
 * signal, or -1 on timeout. */
static int run_saserve(const char *const *args, double limit_s, char **out) {
    char path[] = "/tmp/saserve-fault-XXXXXX";
    int fd = mkstemp(path);
    ck_assert_int_ge(fd, 0);
    const char *argv[32];
    int n = 0;
    argv[n++] = saserve_bin();
    for (int i = 0; args[i] && n < 31; i++) argv[n++] = args[i];
    argv[n] = NULL;
    pid_t pid = fork();
    if (pid == 0) {
        dup2(fd, 1);
        dup2(fd, 2);
        execv(argv[0], (char *const *)argv);
        _exit(127);
    }
    close(fd);
    int status = 0, rc = -1;
    for (double t0 = now_s(); now_s() - t0 < limit_s;) {
        if (waitpid(pid, &status, WNOHANG) == pid) {
            rc = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
            break;
        }
        usleep(20 * 1000);
    }
    if (rc == -1) {
        kill(pid, SIGKILL);
        waitpid(pid, &status, 0);
    }
    *out = read_file(path, NULL);
    unlink(path);
    return rc;
}

/* Copies the first `bytes` bytes of the bundled model (all: 0) to a temp file. */
static void copy_model(char *path, size_t cap, size_t bytes) {
    snprintf(path, cap, "/tmp/saserve-model-XXXXXX");
    int out = mkstemp(path);
    ck_assert_int_ge(out, 0);
    int in = open(BUNDLED, O_RDONLY);
    ck_assert_int_ge(in, 0);
    char buf[1 << 16];
    size_t done = 0;
    for (;;) {
        size_t want = sizeof buf;
        if (bytes && bytes - done < want) want = bytes - done;
        if (want == 0) break;
        ssize_t r = read(in, buf, want);
        if (r <= 0) break;
        ck_assert_int_eq(write(out, buf, (size_t)r), r);
        done += (size_t)r;
    }
    close(in);
    close(out);
}

/* Waits (up to limit_s) until no request runs or waits and the KV cache is
 * empty. */
static bool wait_idle(int port, double limit_s) {
    for (double t0 = now_s(); now_s() - t0 < limit_s; usleep(50 * 1000)) {
        char *m = http_metrics(port);
        if (!m) continue;
        bool idle = metrics_sample(m, "saserve_num_requests_running") == 0 && metrics_sample(m, "saserve_num_requests_waiting") == 0 &&
                    metrics_sample(m, "saserve_kv_cache_usage_ratio") == 0;
        free(m);
        if (idle) return true;
    }
    return false;
}

static int connect_raw(int port, int rcvbuf) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    ck_assert_int_ge(fd, 0);
    if (rcvbuf > 0) setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ck_assert_int_eq(connect(fd, (struct sockaddr *)&a, sizeof a), 0);
    return fd;
}

static void send_post(int fd, const char *path, const char *body) {
    char head[512];
    int n = snprintf(head, sizeof head,
                     "POST %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\n"
                     "Content-Length: %zu\r\n\r\n",
                     path,
                     strlen(body));
    ck_assert_int_eq(write(fd, head, (size_t)n), n);
    ck_assert_int_eq(write(fd, body, strlen(body)), (ssize_t)strlen(body));
}

/* Reads until EOF (or limit_s); returns the bytes (caller frees). */
static char *read_all(int fd, size_t *len, double limit_s) {
    struct timeval tv = {1, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    size_t cap = 1 << 16, n = 0;
    char *b = malloc(cap);
    for (double t0 = now_s(); now_s() - t0 < limit_s;) {
        if (cap - n < 65536) b = realloc(b, cap *= 2);
        ssize_t r = read(fd, b + n, cap - n - 1);
        if (r == 0) break;
        if (r < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) continue;
            break;
        }
        n += (size_t)r;
    }
    b[n] = 0;
    *len = n;
    return b;
}

/* ==== Start-up ========================================================= */

/* A KV cache the machine cannot hold: a clear error naming the setting and
 * exit status 1, before listening (it used to be mapped lazily and "work"
 * until the kernel killed the server under load). */
START_TEST(test_oom_at_start) {
    static const char *const sizes[] = {"16T", "10T"};
    for (int i = 0; i < 2; i++) {
        const char *args[] = {"serve", "--model", BUNDLED, "--port", "0", "--kv-cache-bytes", sizes[i], NULL};
        char *out = NULL;
        int rc = run_saserve(args, 60, &out);
        ck_assert_msg(rc == 1, "exit status %d for --kv-cache-bytes %s:\n%s", rc, sizes[i], out ? out : "");
        ck_assert_msg(out && strstr(out, "KV cache of") && strstr(out, "does not fit in memory") &&
                          strstr(out, "--kv-cache-bytes") && !strstr(out, "listening"),
                      "unclear message:\n%s", out ? out : "");
        free(out);
    }
}
END_TEST

/* A model file cut short: exit status 1 and a message naming the file and
 * what is missing; nothing is read past the end. */
START_TEST(test_truncated_model_at_start) {
    static const size_t cuts[] = {1 << 20, 100, 10};
    for (int i = 0; i < 3; i++) {
        char path[64];
        copy_model(path, sizeof path, cuts[i]);
        const char *args[] = {"serve", "--model", path, "--port", "0", NULL};
        char *out = NULL;
        int rc = run_saserve(args, 60, &out);
        ck_assert_msg(rc == 1, "exit status %d for a model cut at %zu bytes:\n%s", rc, cuts[i], out ? out : "");
        ck_assert_msg(out && strstr(out, path) && !strstr(out, "listening"), "message lacks the file:\n%s",
                      out ? out : "");
        ck_assert_msg(strstr(out, "past the end") || strstr(out, "impossible") || strstr(out, "too small"),
                      "unclear message:\n%s", out);
        free(out);
        unlink(path);
    }
}
END_TEST

/* The KV pool is backed with memory at start-up: the process's RSS holds
 * it before any request (it used to be backed lazily, so RSS crept up under
 * load as the prefix cache spread over the pool: +5 MB per 1000 requests in
 * the soak test). */
START_TEST(test_kv_pool_committed) {
    srv_proc p;
    const char *args[] = {"--model", BUNDLED, "--kv-cache-bytes", "256M", NULL};
    ck_assert_int_eq(srv_start(&p, args), 0);
    char *m = http_metrics(p.port);
    ck_assert_ptr_nonnull(m);
    double kv = metrics_sample(m, "saserve_kv_cache_bytes{tensor=\"k\"}") + metrics_sample(m, "saserve_kv_cache_bytes{tensor=\"v\"}");
    free(m);
    ck_assert(kv > 200e6);
    char path[64], line[256];
    snprintf(path, sizeof path, "/proc/%d/status", (int)p.pid);
    FILE *f = fopen(path, "r"); /* /proc files have no size: read by line */
    ck_assert_ptr_nonnull(f);
    double rss = -1;
    while (fgets(line, sizeof line, f))
        if (!strncmp(line, "VmRSS:", 6)) rss = strtod(line + 6, NULL) * 1024;
    fclose(f);
    ck_assert_msg(rss >= kv, "RSS %.0f bytes with a KV pool of %.0f bytes", rss, kv);
    ck_assert_int_eq(srv_stop(&p), 0);
}
END_TEST

/* ==== While running ==================================================== */

/* The model file truncated on disk while the server has it mapped: the
 * next forward pass reads a page past the new end and gets SIGBUS.  The
 * server says which file and why, and exits with ENGINE_SIGBUS_EXIT (not
 * a bare "Bus error"). */
START_TEST(test_sigbus_truncated_while_mapped) {
    char path[64];
    copy_model(path, sizeof path, 0);
    srv_proc p;
    const char *args[] = {"--model", path, NULL};
    ck_assert_int_eq(srv_start(&p, args), 0);
    ck_assert_int_eq(truncate(path, 1 << 20), 0);
    http_resp r;
    if (http_do(p.port, "POST", "/v1/completions", NULL, "{\"prompt\": \"You will be\", \"max_tokens\": 4}", &r) == 0)
        http_resp_free(&r); /* the connection normally just drops */
    int status = 0;
    bool exited = false;
    for (int i = 0; i < 600 && !exited; i++) {
        if (waitpid(p.pid, &status, WNOHANG) == p.pid) exited = true;
        else usleep(50 * 1000);
    }
    if (!exited) srv_stop(&p);
    char *log = srv_log(&p);
    ck_assert_msg(exited, "the server survived a truncated model:\n%s", log ? log : "");
    ck_assert_msg(WIFEXITED(status) && WEXITSTATUS(status) == ENGINE_SIGBUS_EXIT, "status %#x:\n%s", status,
                  log ? log : "");
    ck_assert_msg(log && strstr(log, "SIGBUS reading the model file") && strstr(log, path), "log:\n%s",
                  log ? log : "");
    free(log);
    unlink(path);
}
END_TEST

/* A client that never reads its stream does not hold up anyone else: the
 * loop keeps serving while that stream's bytes wait in the server.  The
 * stream is made larger than the kernel can buffer (8 choices with 20 top
 * logprobs each: several MB), so the server really is blocked on that
 * socket; other requests must still finish promptly, and the slow stream
 * must still arrive complete once the client reads. */
START_TEST(test_slow_reader) {
    srv_proc p;
    const char *args[] = {"--model", BUNDLED, "--max-running", "16", NULL};
    ck_assert_int_eq(srv_start(&p, args), 0);
    int slow = connect_raw(p.port, 4096);
    send_post(slow, "/v1/chat/completions",
              "{\"messages\": [{\"role\": \"user\", \"content\": \"Tell me a story\"}], \"max_tokens\": 400, "
              "\"ignore_eos\": true, \"n\": 8, \"logprobs\": true, \"top_logprobs\": 20, \"stream\": true}");
    usleep(500 * 1000);
    double worst = 0;
    for (int i = 0; i < 5; i++) {
        double t0 = now_s();
        http_resp r;
        ck_assert_int_eq(http_do(p.port, "POST", "/v1/completions", NULL,
                                 "{\"prompt\": \"The kernel\", \"max_tokens\": 8, \"ignore_eos\": true}", &r),
                         0);
        ck_assert_int_eq(r.status, 200);
        ck_assert_ptr_nonnull(strstr(r.body, "\"finish_reason\":\"length\""));
        http_resp_free(&r);
        ck_assert_int_eq(http_do(p.port, "GET", "/health", NULL, NULL, &r), 0);
        ck_assert_int_eq(r.status, 200);
        http_resp_free(&r);
        double dt = now_s() - t0;
        worst = dt > worst ? dt : worst;
    }
    ck_assert_msg(worst < 10, "a request took %.1f s next to a slow reader", worst);
    /* Generation of the slow stream ends while most of it is still unsent. */
    bool generated = false;
    for (int i = 0; i < 1200 && !generated; i++) {
        char *m = http_metrics(p.port);
        generated = m && metrics_sample(m, "saserve_num_requests_running") == 0;
        free(m);
        if (!generated) usleep(100 * 1000);
    }
    ck_assert(generated);
    size_t len;
    char *all = read_all(slow, &len, 120);
    close(slow);
    /* More than the server's socket can buffer (tcp_wmem's maximum) plus the
     * client's: the server held the rest while it served the others. */
    size_t wmem = 4 << 20;
    char *tw = read_file("/proc/sys/net/ipv4/tcp_wmem", NULL);
    if (tw) {
        unsigned long a, b, c;
        if (sscanf(tw, "%lu %lu %lu", &a, &b, &c) == 3) wmem = c;
        free(tw);
    }
    ck_assert_msg(len > wmem + (256 << 10), "only %zu bytes: the stream fit in the socket buffers (%zu)", len, wmem);
    ck_assert_msg(strstr(all, "200 OK") != NULL, "no 200");
    ck_assert_msg(len > 14 && strstr(all + len - 64, "data: [DONE]") != NULL, "stream incomplete");
    free(all);
    ck_assert(wait_idle(p.port, 10));
    ck_assert_int_eq(srv_stop(&p), 0);
}
END_TEST

/* A request that hits request_timeout: 408 with the timeout error (as an
 * SSE error event on a stream), counted as failure reason timeout, and its
 * sequences and KV blocks freed at once. */
START_TEST(test_timeout_frees) {
    srv_proc p;
    const char *args[] = {"--model", BUNDLED, "--request-timeout", "0.5", NULL};
    ck_assert_int_eq(srv_start(&p, args), 0);
    http_resp r;
    ck_assert_int_eq(http_do(p.port, "POST", "/v1/completions", NULL,
                             "{\"prompt\": \"You will be\", \"max_tokens\": 1000, \"ignore_eos\": true, \"n\": 4}", &r),
                     0);
    ck_assert_msg(r.status == 408, "status %d: %s", r.status, r.body);
    ck_assert_ptr_nonnull(strstr(r.body, "\"timeout_error\""));
    http_resp_free(&r);
    ck_assert_int_eq(http_do(p.port, "POST", "/v1/completions", NULL,
                             "{\"prompt\": \"You will be\", \"max_tokens\": 1000, \"ignore_eos\": true, \"n\": 4, "
                             "\"stream\": true}",
                             &r),
                     0);
    ck_assert_int_eq(r.status, 200);
    ck_assert_msg(strstr(r.body, "data: {\"error\"") && strstr(r.body, "request_timeout") &&
                      strstr(r.body, "data: [DONE]"),
                  "stream: %.300s", r.body);
    http_resp_free(&r);
    ck_assert(wait_idle(p.port, 5));
    char *m = http_metrics(p.port);
    ck_assert_double_eq(metrics_sample(m, "saserve_request_failure_total{reason=\"timeout\"}"), 2);
    ck_assert_double_eq(metrics_sample(m, "saserve_kv_cache_usage_ratio"), 0);
    free(m);
    ck_assert_int_eq(srv_stop(&p), 0);
}
END_TEST

typedef struct {
    int port;
    bool stream;
    int max_tokens;
    int status;
    char *body;
} load_req;

static void *load_worker(void *v) {
    load_req *q = v;
    char body[256];
    snprintf(body, sizeof body, "{\"prompt\": \"You will be\", \"max_tokens\": %d, \"ignore_eos\": true, \"stream\": %s}",
             q->max_tokens, q->stream ? "true" : "false");
    http_resp r;
    if (http_do(q->port, "POST", "/v1/completions", NULL, body, &r) == 0) {
        q->status = r.status;
        q->body = r.body;
        r.body = NULL;
        http_resp_free(&r);
    }
    return NULL;
}

/* SIGTERM while requests run and wait: new requests get 503 at once, every
 * running and queued one still completes in full, and the process exits 0. */
START_TEST(test_sigterm_under_load) {
    srv_proc p;
    const char *args[] = {"--model", BUNDLED, "--max-running", "3", "--max-queue", "8", "--shutdown-grace", "120",
                          NULL};
    ck_assert_int_eq(srv_start(&p, args), 0);
    enum { N = 6 };
    load_req q[N];
    pthread_t th[N];
    for (int i = 0; i < N; i++) {
        q[i] = (load_req){p.port, i % 2 == 0, 96, 0, NULL};
        pthread_create(&th[i], NULL, load_worker, &q[i]);
    }
    /* All six admitted or queued before the signal. */
    bool busy = false;
    for (int i = 0; i < 100 && !busy; i++) {
        char *m = http_metrics(p.port);
        busy = m && metrics_sample(m, "saserve_num_requests_running") + metrics_sample(m, "saserve_num_requests_waiting") == N;
        free(m);
        if (!busy) usleep(20 * 1000);
    }
    ck_assert_msg(busy, "the load never reached the server");
    kill(p.pid, SIGTERM);
    usleep(200 * 1000);
    http_resp r;
    ck_assert_int_eq(http_do(p.port, "POST", "/v1/completions", NULL, "{\"prompt\": \"x\", \"max_tokens\": 2}", &r), 0);
    ck_assert_int_eq(r.status, 503);
    http_resp_free(&r);
    for (int i = 0; i < N; i++) {
        pthread_join(th[i], NULL);
        ck_assert_msg(q[i].status == 200, "request %d: status %d", i, q[i].status);
        ck_assert_msg(q[i].body && strstr(q[i].body, "\"finish_reason\":\"length\""), "request %d incomplete: %.200s", i,
                      q[i].body ? q[i].body : "");
        if (q[i].stream) ck_assert_ptr_nonnull(strstr(q[i].body, "data: [DONE]"));
        free(q[i].body);
    }
    int status = 0;
    bool exited = false;
    for (int i = 0; i < 600 && !exited; i++) {
        if (waitpid(p.pid, &status, WNOHANG) == p.pid) exited = true;
        else usleep(50 * 1000);
    }
    ck_assert_msg(exited, "still running after draining");
    p.pid = 0;
    ck_assert_msg(WIFEXITED(status) && WEXITSTATUS(status) == 0, "status %#x", status);
}
END_TEST

/* When the grace period runs out, what still runs is cancelled: clients get
 * an error (a 503, or an error event ending the stream), the process exits
 * 0 instead of hanging. */
START_TEST(test_sigterm_grace_expires) {
    srv_proc p;
    const char *args[] = {"--model", BUNDLED, "--shutdown-grace", "0.5", NULL};
    ck_assert_int_eq(srv_start(&p, args), 0);
    load_req q[2];
    pthread_t th[2];
    for (int i = 0; i < 2; i++) q[i] = (load_req){p.port, i == 1, 1000, 0, NULL};
    /* Long ones: they cannot finish within the grace period. */
    for (int i = 0; i < 2; i++) pthread_create(&th[i], NULL, load_worker, &q[i]);
    bool busy = false; /* both running before the signal */
    for (int i = 0; i < 200 && !busy; i++) {
        char *m = http_metrics(p.port);
        busy = m && metrics_sample(m, "saserve_num_requests_running") == 2;
        free(m);
        if (!busy) usleep(20 * 1000);
    }
    ck_assert(busy);
    double t0 = now_s();
    kill(p.pid, SIGTERM);
    for (int i = 0; i < 2; i++) pthread_join(th[i], NULL);
    int status = 0;
    bool exited = false;
    for (int i = 0; i < 400 && !exited; i++) {
        if (waitpid(p.pid, &status, WNOHANG) == p.pid) exited = true;
        else usleep(50 * 1000);
    }
    ck_assert_msg(exited, "still running %.1f s after SIGTERM with a 0.5 s grace period", now_s() - t0);
    p.pid = 0;
    ck_assert_msg(WIFEXITED(status) && WEXITSTATUS(status) == 0, "status %#x", status);
    for (int i = 0; i < 2; i++) {
        /* Either it finished in time, or it was told it did not. */
        bool done = q[i].body && strstr(q[i].body, "\"finish_reason\":\"length\"");
        bool told = q[i].status == 503 || (q[i].body && strstr(q[i].body, "data: {\"error\""));
        ck_assert_msg(done || told, "request %d: status %d body %.200s", i, q[i].status, q[i].body ? q[i].body : "");
        free(q[i].body);
    }
}
END_TEST

Suite *faults_suite(void) {
    Suite *s = suite_create("faults");
    TCase *tc = tcase_create("startup");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, test_oom_at_start);
    tcase_add_test(tc, test_truncated_model_at_start);
    tcase_add_test(tc, test_kv_pool_committed);
    suite_add_tcase(s, tc);
    tc = tcase_create("running");
    tcase_set_timeout(tc, 300);
    tcase_add_test(tc, test_sigbus_truncated_while_mapped);
    tcase_add_test(tc, test_slow_reader);
    tcase_add_test(tc, test_timeout_frees);
    tcase_add_test(tc, test_sigterm_under_load);
    tcase_add_test(tc, test_sigterm_grace_expires);
    suite_add_tcase(s, tc);
    return s;
}
