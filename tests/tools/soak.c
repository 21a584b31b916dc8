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
#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <jansson.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/* ==== Options ========================================================== */

static struct {
    const char *bin, *model;
    int requests, clients, max_running, max_queue;
    uint64_t seed;
} opt = {"build/saserve", "models/sa-tiny-sa-q8_0.gguf", 10000, 16, 8, 4, 1};

static int port;
static char **extra_args; /* after "--": more saserve serve flags */
static int n_extra;
static pid_t server_pid;
static char log_path[64];

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

/* ==== HTTP over loopback =============================================== */

static int connect_server(void) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return -1;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(fd, (struct sockaddr *)&a, sizeof a) != 0) {
        close(fd);
        return -1;
    }
    struct timeval tv = {60, 0}; /* no request of the mix takes more than seconds */
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    return fd;
}

static int write_all(int fd, const char *p, size_t n) {
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return -1;
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

typedef struct {
    int status;
    char *head; /* header block */
    char *body; /* de-chunked */
    size_t body_len;
} response;

static void response_free(response *r) {
    free(r->head);
    free(r->body);
    memset(r, 0, sizeof *r);
}

/* De-chunks b[0..n) in place; returns the new length, or -1 if malformed. */
static long dechunk(char *b, size_t n) {
    size_t in = 0, out = 0;
    for (;;) {
        if (in >= n) return -1; /* no terminating chunk */
        char *end;
        unsigned long len = strtoul(b + in, &end, 16);
        char *nl = strstr(end, "\r\n");
        if (!nl || end == b + in) return -1;
        in = (size_t)(nl - b) + 2;
        if (len == 0) break;
        if (in + len + 2 > n) return -1;
        memmove(b + out, b + in, len);
        out += len;
        in += len + 2;
    }
    b[out] = 0;
    return (long)out;
}

static bool header_value(const char *head, const char *name, char *buf, size_t cap) {
    size_t nl = strlen(name);
    for (const char *p = head; p && *p;) {
        const char *e = strstr(p, "\r\n");
        if (!strncasecmp(p, name, nl) && p[nl] == ':') {
            const char *v = p + nl + 1;
            while (*v == ' ') v++;
            size_t n = e ? (size_t)(e - v) : strlen(v);
            if (n >= cap) n = cap - 1;
            memcpy(buf, v, n);
            buf[n] = 0;
            return true;
        }
        p = e ? e + 2 : NULL;
    }
    return false;
}

/* One request on its own connection.  drop_after_first_event: close the
 * connection as soon as the first SSE event has arrived (a client that
 * goes away mid-stream).  Returns 0 with *out filled, -1 on a transport
 * error or an unparsable response. */
static int request(const char *method, const char *path, const char *body, bool drop_after_first_event,
                   response *out) {
    memset(out, 0, sizeof *out);
    int fd = connect_server();
    if (fd < 0) return -1;
    char head[512];
    size_t bl = body ? strlen(body) : 0;
    int hn = snprintf(head, sizeof head,
                      "%s %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nConnection: close\r\n%s", method, path, port,
                      body ? "Content-Type: application/json\r\n" : "");
    if (body) hn += snprintf(head + hn, sizeof head - (size_t)hn, "Content-Length: %zu\r\n", bl);
    hn += snprintf(head + hn, sizeof head - (size_t)hn, "\r\n");
    if (write_all(fd, head, (size_t)hn) || (bl && write_all(fd, body, bl))) {
        close(fd);
        return -1;
    }
    size_t cap = 1 << 16, len = 0;
    char *buf = malloc(cap);
    for (;;) {
        if (cap - len < 4096) buf = realloc(buf, cap *= 2);
        ssize_t r = read(fd, buf + len, cap - len - 1);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) break;
        len += (size_t)r;
        buf[len] = 0;
        if (drop_after_first_event && strstr(buf, "\r\n\r\n") && strstr(strstr(buf, "\r\n\r\n"), "data: ")) break;
    }
    close(fd);
    buf[len] = 0;
    char *sep = strstr(buf, "\r\n\r\n");
    if (!sep || sscanf(buf, "HTTP/1.%*d %d", &out->status) != 1) {
        free(buf);
        return -1;
    }
    out->head = strndup(buf, (size_t)(sep - buf));
    size_t body_len = len - (size_t)(sep + 4 - buf);
    out->body = malloc(body_len + 1);
    memcpy(out->body, sep + 4, body_len);
    out->body[body_len] = 0;
    out->body_len = body_len;
    free(buf);
    char te[64];
    if (!drop_after_first_event && header_value(out->head, "Transfer-Encoding", te, sizeof te) &&
        strcasestr(te, "chunked")) {
        long n = dechunk(out->body, body_len);
        if (n < 0) return -1;
        out->body_len = (size_t)n;
    }
    return 0;
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

static void bad_response(int i, const job *j, const response *r, const char *why) {
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
    response r;
    atomic_fetch_add(&C.sent, 1);
    if (request("POST", j.path, j.body, j.k == K_DROP, &r) != 0) {
        atomic_fetch_add(&C.transport_errors, 1);
        pthread_mutex_lock(&report_mu);
        if (reports++ < 10) fprintf(stderr, "soak: request %d (%s): no response\n", i, j.path);
        pthread_mutex_unlock(&report_mu);
        response_free(&r);
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
        if (!is_error_object(r.body) || !header_value(r.head, "Retry-After", ra, sizeof ra))
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
    response_free(&r);
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

static int free_port(void) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    bind(fd, (struct sockaddr *)&a, sizeof a);
    socklen_t l = sizeof a;
    getsockname(fd, (struct sockaddr *)&a, &l);
    close(fd);
    return ntohs(a.sin_port);
}

static bool server_alive(void) {
    int status;
    return waitpid(server_pid, &status, WNOHANG) == 0;
}

static int start_server(void) {
    port = free_port();
    snprintf(log_path, sizeof log_path, "/tmp/saserve-soak-XXXXXX");
    int lfd = mkstemp(log_path);
    if (lfd < 0) return -1;
    char p[16], mr[16], mq[16];
    snprintf(p, sizeof p, "%d", port);
    snprintf(mr, sizeof mr, "%d", opt.max_running);
    snprintf(mq, sizeof mq, "%d", opt.max_queue);
    const char *argv[64] = {opt.bin, "serve", "--model", opt.model, "--host", "127.0.0.1", "--port", p,
                            "--max-running", mr, "--max-queue", mq, "--log-level", "warn"};
    int n = 14;
    for (int i = 0; i < n_extra && n < 62; i++) argv[n++] = extra_args[i];
    argv[n] = NULL;
    server_pid = fork();
    if (server_pid == 0) {
        dup2(lfd, 1);
        dup2(lfd, 2);
        execv(argv[0], (char *const *)argv);
        _exit(127);
    }
    close(lfd);
    for (int i = 0; i < 600; i++) {
        response r;
        if (request("GET", "/health", NULL, false, &r) == 0 && r.status == 200) {
            response_free(&r);
            return 0;
        }
        response_free(&r);
        if (!server_alive()) return -1;
        usleep(100 * 1000);
    }
    return -1;
}

static char *scrape(void) {
    response r;
    if (request("GET", "/metrics", NULL, false, &r) != 0) return NULL;
    char *b = r.body;
    r.body = NULL;
    response_free(&r);
    return b;
}

static double sample(const char *text, const char *series) {
    size_t n = strlen(series);
    for (const char *p = text; p && *p;) {
        if (!strncmp(p, series, n) && p[n] == ' ') return strtod(p + n + 1, NULL);
        p = strchr(p, '\n');
        if (p) p++;
    }
    return -1;
}

static long rss_kb(void) {
    char path[64], line[256];
    snprintf(path, sizeof path, "/proc/%d/status", (int)server_pid);
    FILE *f = fopen(path, "r");
    long kb = -1;
    while (f && fgets(line, sizeof line, f))
        if (sscanf(line, "VmRSS: %ld kB", &kb) == 1) break;
    if (f) fclose(f);
    return kb;
}

static int fd_count(void) {
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/fd", (int)server_pid);
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
        char *m = scrape();
        bool idle = m && sample(m, "saserve_num_requests_running") == 0 && sample(m, "saserve_num_requests_waiting") == 0 &&
                    sample(m, "saserve_kv_cache_usage_ratio") == 0;
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
        fprintf(stderr, "soak: the server did not start (log: %s)\n", log_path);
        return 1;
    }
    printf("soak: %s serve --model %s on 127.0.0.1:%d (pid %d), max_running %d, max_queue %d; %d requests from %d "
           "clients, seed %llu\n",
           opt.bin, opt.model, port, (int)server_pid, opt.max_running, opt.max_queue, opt.requests, opt.clients,
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

    char *m = alive ? scrape() : NULL;
    double ok_stop = m ? sample(m, "saserve_request_success_total{finished_reason=\"stop\"}") : -1;
    double ok_len = m ? sample(m, "saserve_request_success_total{finished_reason=\"length\"}") : -1;
    static const char *const reasons[] = {"bad_request", "unauthorized", "too_large", "queue_full",
                                          "unavailable", "timeout",      "cancelled", "internal"};
    double fail[8], fail_total = 0;
    for (int k = 0; k < 8; k++) {
        char series[128];
        snprintf(series, sizeof series, "saserve_request_failure_total{reason=\"%s\"}", reasons[k]);
        fail[k] = m ? sample(m, series) : -1;
        fail_total += fail[k];
    }
    double kv = m ? sample(m, "saserve_kv_cache_usage_ratio") : -1;
    double gen = m ? sample(m, "saserve_generation_tokens_total") : -1;
    free(m);

    int sent = atomic_load(&C.sent), s200 = atomic_load(&C.st200), s400 = atomic_load(&C.st400),
        s429 = atomic_load(&C.st429), s503 = atomic_load(&C.st503);
    double success = ok_stop + ok_len;
    double accounted = success + fail[5] + fail[6] + fail[7];
    double growth = rss_first > 0 ? 100.0 * (double)(rss_last - rss_first) / (double)rss_first : 100;

    /* The end: SIGTERM, exit status 0. */
    int status = -1, exit_code = -1;
    if (alive) {
        kill(server_pid, SIGTERM);
        for (int i = 0; i < 600; i++) {
            if (waitpid(server_pid, &status, WNOHANG) == server_pid) {
                exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
                break;
            }
            usleep(100 * 1000);
        }
        if (exit_code < 0) kill(server_pid, SIGKILL);
    }

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
    printf("  exit        status %d after SIGTERM (server log: %s)\n", exit_code, log_path);

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
    if (all) unlink(log_path);
    return all ? 0 : 1;
}
