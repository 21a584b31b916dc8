/*
 * soak.c - a bounded soak test of saserve serve (make soak).
 *
 *   build/tools/soak --bin build/saserve --model M.gguf [--requests 10000]
 *                    [--clients 16] [--seed 1] [--max-running 8] [--max-queue 4]
 *                    [-- more saserve serve flags]
 *
 * Starts its own server on a free 127.0.0.1 port (it never talks to anything
 * else), drives it with a fixed number of requests from a fixed number of
 * client threads, then checks:
 *   - no crash: the server stays up and exits 0 on SIGTERM at the end;
 *   - every response is well-formed: 200 JSON bodies and SSE streams of the
 *     OpenAI shapes (streams end with [DONE]), 400/429 error objects (429
 *     with Retry-After);
 *   - accounting: /metrics success (per choice; n is 1) + cancelled + timeout
 *     + internal failures = the requests accepted (200), bad_request = the
 *     400s, queue_full = the 429s, and all of it = the requests sent;
 *   - KV blocks back to zero, nothing running or waiting;
 *   - RSS growth under 1% and no file-descriptor growth between the end of
 *     the first thousand requests and the end of the last (read from
 *     /proc/PID/status and /proc/PID/fd, with the server idle).
 * The mix (per request, from a seeded generator): 5% malformed, 10% streams
 * the client drops after the first event, the rest completions and chat,
 * streaming or not, mostly short (2-6 tokens) and some long (16-32), a few
 * with stop strings or logprobs.  More clients than the server's
 * max_running + max_queue makes some requests go over the queue limit.
 * Prints the figures; exits 0 when every check holds.
 */
#include <dirent.h>
#include <jansson.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "httpc.h"

/* ==== Options ========================================================== */

static struct {
    const char *bin, *model;
    int requests, clients, max_running, max_queue;
    uint64_t seed;
} opt = {"build/saserve", "models/sa-tiny-sa-q8_0.gguf", 10000, 16, 8, 4, 1};

static char **extra_args; /* after "--": more saserve serve flags */
static int n_extra;
static srv_proc srv; /* the server (tests/unit/httpc.c) */

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static uint64_t splitmix(uint64_t x) {
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

/* ==== The mix ========================================================== */

typedef enum { K_MALFORMED, K_DROP, K_COMPLETION, K_CHAT } kind;

typedef struct {
    kind k;
    bool stream;
    int max_tokens;
    char body[1024];
    const char *path;
} job;

static const char *const prompts[] = {
    "The kernel provides a simple interface for", "You will be", "In computer science, a linked list is",
    "Once upon a time", "The quick brown fox", "To install the package, run", "Hello", "\u00c9t\u00e9 \u00e0 Paris,",
};
static const char *const malformed[] = {
    "{\"prompt\": \"x\", ",                                   /* truncated JSON */
    "[1, 2, 3]",                                              /* not an object */
    "{\"prompt\": \"x\", \"temperature\": 7}",                /* out of range */
    "{\"prompt\": \"x\", \"max_tokens\": \"many\"}",          /* wrong type */
    "{\"messages\": []}",                                     /* (chat) empty */
    "{\"prompt\": [1, 2, 99999999]}",                         /* bad token id */
    "{\"prompt\": \"x\", \"stop\": [\"a\", \"b\", \"c\", \"d\", \"e\"]}", /* too many stops */
    "{\"prompt\": \"x\", \"max_tokens\": 100000}",            /* over the context */
};

static void make_job(int i, job *j) {
    uint64_t r = splitmix(opt.seed * 1000003u + (uint64_t)i);
    unsigned pct = (unsigned)(r % 100);
    r = splitmix(r);
    memset(j, 0, sizeof *j);
    if (pct < 5) {
        j->k = K_MALFORMED;
        unsigned m = (unsigned)(r % (sizeof malformed / sizeof malformed[0]));
        j->path = m == 4 ? "/v1/chat/completions" : "/v1/completions";
        snprintf(j->body, sizeof j->body, "%s", malformed[m]);
        return;
    }
    const char *prompt = prompts[r % (sizeof prompts / sizeof prompts[0])];
    r = splitmix(r);
    bool chat = r & 1;
    bool long_one = (r >> 1) % 100 < 20;
    j->max_tokens = long_one ? 16 + (int)((r >> 8) % 17) : 2 + (int)((r >> 8) % 5);
    double temp = (r >> 16) & 1 ? 0.0 : 0.8;
    char extra[128] = "";
    unsigned x = (unsigned)((r >> 20) % 20);
    if (x == 0) snprintf(extra, sizeof extra, ", \"stop\": [\"\\n\", \" the\"]");
    else if (x == 1) snprintf(extra, sizeof extra, chat ? ", \"logprobs\": true, \"top_logprobs\": 2" : ", \"logprobs\": 2");
    else if (x == 2) snprintf(extra, sizeof extra, ", \"seed\": %d", i);
    if (pct < 15) {
        j->k = K_DROP;
        j->stream = true;
        j->max_tokens = 48;
    } else {
        j->k = chat ? K_CHAT : K_COMPLETION;
        j->stream = (r >> 24) % 100 < 40;
    }
    if (chat) {
        j->path = "/v1/chat/completions";
        snprintf(j->body, sizeof j->body,
                 "{\"messages\": [{\"role\": \"user\", \"content\": \"%s\"}], \"max_tokens\": %d, \"temperature\": %g, "
                 "\"stream\": %s%s}",
                 prompt, j->max_tokens, temp, j->stream ? "true" : "false", extra);
    } else {
        j->path = "/v1/completions";
        snprintf(j->body, sizeof j->body, "{\"prompt\": \"%s\", \"max_tokens\": %d, \"temperature\": %g, \"stream\": %s%s}",
                 prompt, j->max_tokens, temp, j->stream ? "true" : "false", extra);
    }
}

/* ==== Checking responses =============================================== */

static struct {
    atomic_int sent, transport_errors, malformed_responses;
    atomic_int st200, st400, st429, st503, st_other;
    atomic_int streams, dropped;
    atomic_long completion_tokens;
} C;

static pthread_mutex_t report_mu = PTHREAD_MUTEX_INITIALIZER;
static int reports;

static void bad_response(int i, const job *j, const http_resp *r, const char *why) {
    atomic_fetch_add(&C.malformed_responses, 1);
    pthread_mutex_lock(&report_mu);
    if (reports++ < 10)
        fprintf(stderr, "soak: request %d (%s %s): %s: status %d, body %.300s\n", i, j->path, j->body, why, r->status,
                r->body ? r->body : "");
    pthread_mutex_unlock(&report_mu);
}

static bool is_error_object(const char *body) {
    json_t *o = json_loads(body, 0, NULL);
    json_t *e = json_object_get(o, "error");
    bool ok = json_is_object(e) && json_is_string(json_object_get(e, "message")) &&
              json_is_string(json_object_get(e, "type"));
    json_decref(o);
    return ok;
}

/* A complete choice of a non-stream response. */
static bool check_plain(const job *j, const char *body) {
    json_t *o = json_loads(body, 0, NULL);
    bool chat = j->k == K_CHAT;
    json_t *ch = json_array_get(json_object_get(o, "choices"), 0);
    const char *fin = json_string_value(json_object_get(ch, "finish_reason"));
    json_t *u = json_object_get(o, "usage");
    json_int_t ct = json_integer_value(json_object_get(u, "completion_tokens"));
    bool ok = o && json_array_size(json_object_get(o, "choices")) == 1 &&
              json_is_string(json_object_get(o, "id")) &&
              !strcmp(json_string_value(json_object_get(o, "object")) ? json_string_value(json_object_get(o, "object")) : "",
                      chat ? "chat.completion" : "text_completion") &&
              (chat ? json_is_string(json_object_get(json_object_get(ch, "message"), "content"))
                    : json_is_string(json_object_get(ch, "text"))) &&
              fin && (!strcmp(fin, "stop") || !strcmp(fin, "length")) && json_is_integer(json_object_get(u, "prompt_tokens")) &&
              ct >= 0 && ct <= j->max_tokens;
    if (ok) atomic_fetch_add(&C.completion_tokens, (long)ct);
    json_decref(o);
    return ok;
}

/* Every event of a finished stream: chunks of the right object, one
 * finish_reason, then [DONE] last. */
static bool check_stream(const job *j, const char *body, size_t len) {
    const char *want = j->k == K_CHAT ? "chat.completion.chunk" : "text_completion";
    int events = 0, finishes = 0;
    bool done = false;
    for (const char *p = body; p < body + len;) {
        if (strncmp(p, "data: ", 6)) return false;
        const char *e = strstr(p, "\n\n");
        if (!e || done) return false;
        if (!strncmp(p + 6, "[DONE]", 6)) {
            done = true;
        } else {
            json_t *o = json_loadb(p + 6, (size_t)(e - p - 6), 0, NULL);
            const char *obj = json_string_value(json_object_get(o, "object"));
            json_t *ch = json_array_get(json_object_get(o, "choices"), 0);
            json_t *fin = json_object_get(ch, "finish_reason");
            bool ok = o && obj && !strcmp(obj, want) && json_is_object(ch);
            if (json_is_string(fin)) finishes++;
            json_decref(o);
            if (!ok) return false;
            events++;
        }
        p = e + 2;
    }
    return done && events >= 1 && finishes == 1;
}

static void run_one(int i) {
    job j;
    make_job(i, &j);
    http_resp r;
    atomic_fetch_add(&C.sent, 1);
    /* Strict: a malformed chunked body is an error, not a short answer. */
    unsigned flags = HTTP_STRICT | (j.k == K_DROP ? HTTP_DROP_AFTER_FIRST_EVENT : 0);
    if (http_do_flags(srv.port, "POST", j.path, NULL, j.body, flags, &r) != 0) {
        atomic_fetch_add(&C.transport_errors, 1);
        pthread_mutex_lock(&report_mu);
        if (reports++ < 10) fprintf(stderr, "soak: request %d (%s): no response\n", i, j.path);
        pthread_mutex_unlock(&report_mu);
        return;
    }
    char ra[32];
    switch (r.status) {
    case 200:
        atomic_fetch_add(&C.st200, 1);
        if (j.k == K_MALFORMED) bad_response(i, &j, &r, "malformed request accepted");
        else if (j.k == K_DROP) atomic_fetch_add(&C.dropped, 1);
        else if (j.stream ? !check_stream(&j, r.body, r.body_len) : !check_plain(&j, r.body))
            bad_response(i, &j, &r, "malformed 200 response");
        if (j.stream) atomic_fetch_add(&C.streams, 1);
        break;
    case 400:
        atomic_fetch_add(&C.st400, 1);
        if (j.k != K_MALFORMED) bad_response(i, &j, &r, "valid request refused");
        else if (!is_error_object(r.body)) bad_response(i, &j, &r, "400 without an error object");
        break;
    case 429:
        atomic_fetch_add(&C.st429, 1);
        if (!is_error_object(r.body) || !http_header(&r, "Retry-After", ra, sizeof ra))
            bad_response(i, &j, &r, "429 without an error object or Retry-After");
        /* A polite client waits Retry-After (jittered: half to all of it)
         * before its next request. */
        {
            double wait = atof(ra);
            if (wait <= 0 || wait > 5) wait = 1;
            usleep((useconds_t)(wait * 1e6 * (0.5 + 0.5 * (double)(splitmix((uint64_t)i) % 1000) / 1000.0)));
        }
        break;
    case 503:
        atomic_fetch_add(&C.st503, 1);
        break;
    default:
        atomic_fetch_add(&C.st_other, 1);
        bad_response(i, &j, &r, "unexpected status");
    }
    http_resp_free(&r);
}

static atomic_int next_index;
static int phase_end;

static void *client(void *arg) {
    (void)arg;
    for (;;) {
        int i = atomic_fetch_add(&next_index, 1);
        if (i >= phase_end) return NULL;
        run_one(i);
    }
}

/* ==== The server process =============================================== */

static bool server_alive(void) {
    int status;
    return waitpid(srv.pid, &status, WNOHANG) == 0;
}

static int start_server(void) {
    char mr[16], mq[16];
    snprintf(mr, sizeof mr, "%d", opt.max_running);
    snprintf(mq, sizeof mq, "%d", opt.max_queue);
    const char *args[64] = {"--model", opt.model, "--host", "127.0.0.1", "--max-running", mr, "--max-queue", mq,
                            "--log-level", "warn"};
    int n = 10;
    for (int i = 0; i < n_extra && n < 62; i++) args[n++] = extra_args[i];
    args[n] = NULL;
    setenv("SASERVE_BIN", opt.bin, 1); /* srv_start runs $SASERVE_BIN serve --port P ARGS */
    return srv_start(&srv, args);
}

static long rss_kb(void) {
    char path[64], line[256];
    snprintf(path, sizeof path, "/proc/%d/status", (int)srv.pid);
    FILE *f = fopen(path, "r");
    long kb = -1;
    while (f && fgets(line, sizeof line, f))
        if (sscanf(line, "VmRSS: %ld kB", &kb) == 1) break;
    if (f) fclose(f);
    return kb;
}

static int fd_count(void) {
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/fd", (int)srv.pid);
    DIR *d = opendir(path);
    if (!d) return -1;
    int n = 0;
    for (struct dirent *e; (e = readdir(d));)
        if (e->d_name[0] != '.') n++;
    closedir(d);
    return n;
}

/* Waits until nothing runs or waits, the KV cache is empty and the fd count
 * has settled (dropped connections are noticed within a few hundred ms). */
static bool wait_idle(double limit_s, int *fds) {
    int last = -1, same = 0;
    for (double t0 = now_s(); now_s() - t0 < limit_s; usleep(100 * 1000)) {
        /* Count before scraping: the scrape's own connection is gone by the
         * next round. */
        int n = fd_count();
        char *m = http_metrics(srv.port);
        bool idle = m && metrics_sample(m, "saserve_num_requests_running") == 0 && metrics_sample(m, "saserve_num_requests_waiting") == 0 &&
                    metrics_sample(m, "saserve_kv_cache_usage_ratio") == 0;
        free(m);
        same = n == last ? same + 1 : 0;
        last = n;
        if (idle && same >= 5) {
            *fds = n;
            return true;
        }
    }
    *fds = last;
    return false;
}

/* ==== Main ============================================================= */

static void usage(void) {
    fprintf(stderr, "usage: soak [--bin B] [--model M] [--requests N] [--clients C] [--seed S] [--max-running R] "
                    "[--max-queue Q] [-- more saserve serve flags]\n");
    exit(2);
}

int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--")) {
            extra_args = argv + i + 1;
            n_extra = argc - i - 1;
            break;
        }
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!v) usage();
        if (!strcmp(a, "--bin")) opt.bin = v;
        else if (!strcmp(a, "--model")) opt.model = v;
        else if (!strcmp(a, "--requests")) opt.requests = atoi(v);
        else if (!strcmp(a, "--clients")) opt.clients = atoi(v);
        else if (!strcmp(a, "--seed")) opt.seed = strtoull(v, NULL, 10);
        else if (!strcmp(a, "--max-running")) opt.max_running = atoi(v);
        else if (!strcmp(a, "--max-queue")) opt.max_queue = atoi(v);
        else usage();
        i++;
    }
    /* Bounded by construction: a fixed request count and client count. */
    if (opt.requests < 1 || opt.requests > 1000000 || opt.clients < 1 || opt.clients > 256) usage();
    signal(SIGPIPE, SIG_IGN);
    if (start_server() != 0) {
        fprintf(stderr, "soak: the server did not start (log: %s)\n", srv.log_path);
        return 1;
    }
    printf("soak: %s serve --model %s on 127.0.0.1:%d (pid %d), max_running %d, max_queue %d; %d requests from %d "
           "clients, seed %llu\n",
           opt.bin, opt.model, srv.port, (int)srv.pid, opt.max_running, opt.max_queue, opt.requests, opt.clients,
           (unsigned long long)opt.seed);
    fflush(stdout);
    double t0 = now_s();
    long rss_first = -1, rss_last = -1;
    int fds_first = -1, fds_last = -1;
    bool idle_ok = true, alive = true;
    for (int start = 0; start < opt.requests && alive; start += 1000) {
        phase_end = start + 1000 < opt.requests ? start + 1000 : opt.requests;
        atomic_store(&next_index, start);
        pthread_t th[256];
        for (int c = 0; c < opt.clients; c++) pthread_create(&th[c], NULL, client, NULL);
        for (int c = 0; c < opt.clients; c++) pthread_join(th[c], NULL);
        alive = server_alive();
        int fds = -1;
        bool idle = alive && wait_idle(30, &fds);
        idle_ok &= idle;
        long rss = rss_kb();
        if (rss_first < 0) rss_first = rss, fds_first = fds;
        rss_last = rss, fds_last = fds;
        printf("soak: %6d requests  %6.1f s  200 %d  400 %d  429 %d  dropped %d  bad %d  |  RSS %ld kB  fds %d%s\n",
               phase_end, now_s() - t0, atomic_load(&C.st200), atomic_load(&C.st400), atomic_load(&C.st429),
               atomic_load(&C.dropped), atomic_load(&C.malformed_responses) + atomic_load(&C.transport_errors), rss,
               fds, idle ? "" : "  (NOT IDLE)");
        fflush(stdout);
    }
    double elapsed = now_s() - t0;

    char *m = alive ? http_metrics(srv.port) : NULL;
    double ok_stop = m ? metrics_sample(m, "saserve_request_success_total{finished_reason=\"stop\"}") : -1;
    double ok_len = m ? metrics_sample(m, "saserve_request_success_total{finished_reason=\"length\"}") : -1;
    static const char *const reasons[] = {"bad_request", "unauthorized", "too_large", "queue_full",
                                          "unavailable", "timeout",      "cancelled", "internal"};
    double fail[8], fail_total = 0;
    for (int k = 0; k < 8; k++) {
        char series[128];
        snprintf(series, sizeof series, "saserve_request_failure_total{reason=\"%s\"}", reasons[k]);
        fail[k] = m ? metrics_sample(m, series) : -1;
        fail_total += fail[k];
    }
    double kv = m ? metrics_sample(m, "saserve_kv_cache_usage_ratio") : -1;
    double gen = m ? metrics_sample(m, "saserve_generation_tokens_total") : -1;
    free(m);

    int sent = atomic_load(&C.sent), s200 = atomic_load(&C.st200), s400 = atomic_load(&C.st400),
        s429 = atomic_load(&C.st429), s503 = atomic_load(&C.st503);
    double success = ok_stop + ok_len;
    double accounted = success + fail[5] + fail[6] + fail[7];
    double growth = rss_first > 0 ? 100.0 * (double)(rss_last - rss_first) / (double)rss_first : 100;

    /* The end: SIGTERM, exit status 0. */
    int exit_code = alive ? srv_stop(&srv) : -1; /* -1: killed after 60 s */

    printf("\nsoak: %d requests in %.1f s (%.1f requests/s, %.0f tokens generated)\n", sent, elapsed, sent / elapsed,
           gen);
    printf("  responses   200 %d (streams %d, dropped mid-stream %d), 400 %d, 429 %d, 503 %d, other %d; "
           "malformed responses %d, no response %d\n",
           s200, atomic_load(&C.streams), atomic_load(&C.dropped), s400, s429, s503, atomic_load(&C.st_other),
           atomic_load(&C.malformed_responses), atomic_load(&C.transport_errors));
    printf("  metrics     success %.0f (stop %.0f, length %.0f); failures bad_request %.0f, queue_full %.0f, "
           "cancelled %.0f, timeout %.0f, internal %.0f, unavailable %.0f, other %.0f\n",
           success, ok_stop, ok_len, fail[0], fail[3], fail[6], fail[5], fail[7], fail[4], fail[1] + fail[2]);
    printf("  accounted   success + cancelled + timeout + internal = %.0f, accepted (200) = %d; bad_request %.0f = "
           "400s %d; queue_full %.0f = 429s %d; all outcomes %.0f = sent %d\n",
           accounted, s200, fail[0], s400, fail[3], s429, success + fail_total, sent);
    printf("  KV          usage after the run %.3f\n", kv);
    printf("  RSS         %ld kB after the first 1000 requests, %ld kB after the last (%+.2f%%)\n", rss_first, rss_last,
           growth);
    printf("  fds         %d after the first 1000 requests, %d after the last\n", fds_first, fds_last);
    printf("  exit        status %d after SIGTERM (server log: %s)\n", exit_code, srv.log_path);

    struct {
        bool ok;
        const char *what;
    } checks[] = {
        {alive && exit_code == 0, "no crash; exit 0 on SIGTERM"},
        {atomic_load(&C.malformed_responses) == 0 && atomic_load(&C.transport_errors) == 0 &&
             atomic_load(&C.st_other) == 0 && s503 == 0,
         "every response well-formed"},
        {accounted == s200 && fail[0] == s400 && fail[3] == s429 && success + fail_total == sent,
         "every request accounted for in the metrics"},
        {idle_ok && kv == 0, "KV blocks back to zero, nothing running or waiting"},
        {opt.requests < 2000 || growth < 1.0, "RSS growth under 1% (first vs last thousand)"},
        {opt.requests < 2000 || fds_last <= fds_first, "no file-descriptor growth"},
    };
    bool all = true;
    for (size_t k = 0; k < sizeof checks / sizeof checks[0]; k++) {
        printf("  %s  %s\n", checks[k].ok ? "ok  " : "FAIL", checks[k].what);
        all &= checks[k].ok;
    }
    printf("soak: %s\n", all ? "PASS" : "FAIL");
    if (all) unlink(srv.log_path);
    return all ? 0 : 1;
}
