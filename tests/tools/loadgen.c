/*
 * loadgen.c - a bounded load generator for `make bench`: N concurrent
 * clients, each sending R streaming /v1/completions requests one after the
 * other to a server on loopback, timed client-side from SSE chunk arrival.
 *
 *   loadgen --port 8080 --clients 16 --requests 2 [--prompt-tokens 128] [--max-tokens 128]
 *           [--vocab 8192] [--host 127.0.0.1] [--poll-metrics] [--timeout 120]
 *
 * Each request: a prompt of pseudo-random token ids in [3, vocab) (different
 * per request, so the prefix cache does not help), max_tokens, temperature 0,
 * ignore_eos true, stream true with include_usage.  Prints one JSON line:
 * aggregate generated tokens/s (usage.completion_tokens summed, over the wall
 * time from the first request to the last byte), p50/p99 time to first token
 * (request written -> first chunk with text) and inter-token latency (gaps
 * between chunks with text), errors.  --poll-metrics scrapes /metrics every
 * 20 ms meanwhile and adds the largest saserve_num_requests_running and
 * saserve_kv_cache_usage_ratio seen.  A response that sends nothing for
 * --timeout seconds (120) is closed and counted as failed, so a run always
 * ends.
 *
 * Loopback only: the host must be 127.0.0.1 or localhost.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

typedef struct {
    int port, clients, requests, prompt_tokens, max_tokens, vocab, timeout;
    bool poll;
} opts;

static opts O = {8080, 1, 1, 128, 128, 8192, 120, false};

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* ==== Samples ============================================================ */

typedef struct {
    double *v;
    size_t n, cap;
} samples;

static void add_sample(samples *s, double x) {
    if (s->n == s->cap) {
        size_t c = s->cap ? 2 * s->cap : 256;
        double *p = realloc(s->v, c * sizeof *p);
        if (!p) return;
        s->v = p;
        s->cap = c;
    }
    s->v[s->n++] = x;
}

static int cmp_d(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Nearest-rank percentile of sorted samples. */
static double pct(const samples *s, double p) {
    if (!s->n) return 0;
    size_t k = (size_t)(p / 100.0 * (double)s->n + 0.999999);
    if (k < 1) k = 1;
    if (k > s->n) k = s->n;
    return s->v[k - 1];
}

/* ==== HTTP =============================================================== */

static int connect_loopback(void) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) return -1;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)O.port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    /* A response that stops sending counts as failed after --timeout. */
    struct timeval tv = {.tv_sec = O.timeout};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    if (connect(fd, (struct sockaddr *)&a, sizeof a) != 0) {
        close(fd);
        return -1;
    }
    return fd;
}

static bool write_all(int fd, const char *p, size_t n) {
    while (n) {
        ssize_t k = write(fd, p, n);
        if (k < 0 && errno == EINTR) continue;
        if (k <= 0) return false;
        p += k;
        n -= (size_t)k;
    }
    return true;
}

/* Result of one streaming request. */
typedef struct {
    int status;
    long completion_tokens;
    bool done;          /* saw data: [DONE] */
    bool got_text;
    bool timed_out;     /* no bytes for --timeout seconds */
    char error[200];    /* an error sent inside the stream */
    double t_sent, t_prev;
    samples *ttft, *itl;
    /* SSE line assembly */
    char line[65536];
    size_t line_len;
} stream_state;

static void on_line(stream_state *st, const char *line, size_t len, double t) {
    if (len < 6 || strncmp(line, "data: ", 6) != 0) return;
    const char *d = line + 6;
    if (!strncmp(d, "[DONE]", 6)) {
        st->done = true;
        return;
    }
    if (!strncmp(d, "{\"error\"", 8)) {
        snprintf(st->error, sizeof st->error, "%.*s", (int)(len - 6 < 190 ? len - 6 : 190), d);
        return;
    }
    const char *u = strstr(d, "\"completion_tokens\":");
    if (u) st->completion_tokens = strtol(u + 20, NULL, 10);
    /* A chunk with text: "text":"<something>" (not the empty string). */
    const char *tx = strstr(d, "\"text\":\"");
    if (tx && tx[8] != '"') {
        if (!st->got_text) add_sample(st->ttft, t - st->t_sent);
        else add_sample(st->itl, t - st->t_prev);
        st->got_text = true;
        st->t_prev = t;
    }
}

static void feed_body(stream_state *st, const char *p, size_t n, double t) {
    for (size_t i = 0; i < n; i++) {
        char c = p[i];
        if (c == '\n') {
            size_t l = st->line_len;
            if (l && st->line[l - 1] == '\r') l--;
            on_line(st, st->line, l, t);
            st->line_len = 0;
        } else if (st->line_len < sizeof st->line - 1) {
            st->line[st->line_len++] = c;
        }
    }
}

/* Sends one request and reads the whole response; returns false on a
 * transport or HTTP error. */
static bool http_request(const char *req, size_t req_len, stream_state *st, char *body_out, size_t body_cap) {
    int fd = connect_loopback();
    if (fd < 0) return false;
    st->t_sent = now();
    if (!write_all(fd, req, req_len)) {
        close(fd);
        return false;
    }
    char buf[16384];
    char hdr[8192];
    size_t hdr_len = 0, out_len = 0;
    bool in_body = false, chunked = false;
    /* chunked decoding state */
    size_t chunk_left = 0;
    int cstate = 0; /* 0: size line, 1: data, 2: CRLF after data, 3: trailer */
    char size_line[32];
    size_t size_len = 0;
    for (;;) {
        ssize_t k = read(fd, buf, sizeof buf);
        if (k < 0 && errno == EINTR) continue;
        if (k < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) st->timed_out = true;
        if (k <= 0) break;
        double t = now();
        size_t i = 0;
        if (!in_body) {
            while (i < (size_t)k && !in_body) {
                if (hdr_len < sizeof hdr - 1) hdr[hdr_len++] = buf[i];
                i++;
                if (hdr_len >= 4 && !memcmp(hdr + hdr_len - 4, "\r\n\r\n", 4)) {
                    hdr[hdr_len] = 0;
                    in_body = true;
                    st->status = atoi(hdr + 9);
                    for (char *h = strstr(hdr, "\r\n"); h; h = strstr(h + 2, "\r\n"))
                        if (!strncasecmp(h + 2, "transfer-encoding:", 18) && strstr(h + 2, "chunked") &&
                            strstr(h + 2, "chunked") < strstr(h + 2, "\r\n"))
                            chunked = true;
                }
            }
        }
        while (i < (size_t)k) {
            if (!chunked) {
                size_t n = (size_t)k - i;
                feed_body(st, buf + i, n, t);
                if (body_out && out_len + n < body_cap) memcpy(body_out + out_len, buf + i, n), out_len += n;
                i += n;
                continue;
            }
            char c = buf[i];
            if (cstate == 0) {
                i++;
                if (c == '\n') {
                    size_line[size_len] = 0;
                    chunk_left = strtoul(size_line, NULL, 16);
                    size_len = 0;
                    cstate = chunk_left ? 1 : 3;
                } else if (c != '\r' && size_len < sizeof size_line - 1) {
                    size_line[size_len++] = c;
                }
            } else if (cstate == 1) {
                size_t n = (size_t)k - i < chunk_left ? (size_t)k - i : chunk_left;
                feed_body(st, buf + i, n, t);
                if (body_out && out_len + n < body_cap) memcpy(body_out + out_len, buf + i, n), out_len += n;
                i += n;
                chunk_left -= n;
                if (!chunk_left) cstate = 2;
            } else if (cstate == 2) {
                i++;
                if (c == '\n') cstate = 0;
            } else {
                i = (size_t)k; /* trailer: ignore */
            }
        }
    }
    close(fd);
    if (body_out) body_out[out_len < body_cap ? out_len : body_cap - 1] = 0;
    return st->status == 200;
}

/* ==== Clients ============================================================ */

typedef struct {
    int id;
    samples ttft, itl;
    long tokens;
    int errors, ok, timeouts;
    char last_error[256];
} client;

static pthread_barrier_t start_bar;

static void *client_main(void *arg) {
    client *c = arg;
    size_t cap = (size_t)O.prompt_tokens * 8 + 1024;
    char *body = malloc(cap), *req = malloc(cap + 512);
    stream_state *st = malloc(sizeof *st);
    pthread_barrier_wait(&start_bar);
    for (int r = 0; r < O.requests && body && req && st; r++) {
        uint64_t x = 0x9e3779b97f4a7c15ULL * (uint64_t)(c->id * 100003 + r + 1);
        size_t n = (size_t)snprintf(body, cap, "{\"prompt\":[");
        for (int i = 0; i < O.prompt_tokens; i++) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            n += (size_t)snprintf(body + n, cap - n, "%s%d", i ? "," : "", 3 + (int)(x % (uint64_t)(O.vocab - 3)));
        }
        n += (size_t)snprintf(body + n, cap - n,
                              "],\"max_tokens\":%d,\"temperature\":0,\"ignore_eos\":true,\"stream\":true,"
                              "\"stream_options\":{\"include_usage\":true}}",
                              O.max_tokens);
        int rl = snprintf(req, cap + 512,
                          "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: application/json\r\n"
                          "Content-Length: %zu\r\nConnection: close\r\n\r\n%s",
                          O.port, n, body);
        memset(st, 0, sizeof *st);
        st->ttft = &c->ttft;
        st->itl = &c->itl;
        char err_body[256];
        bool ok = http_request(req, (size_t)rl, st, err_body, sizeof err_body);
        if (ok && st->done && !st->error[0]) {
            c->ok++;
            c->tokens += st->completion_tokens;
        } else {
            c->errors++;
            c->timeouts += st->timed_out;
            char why[64];
            snprintf(why, sizeof why, "no data for %d s, no [DONE]", O.timeout);
            snprintf(c->last_error, sizeof c->last_error, "status %d: %.200s", st->status,
                     st->error[0] ? st->error : st->timed_out ? why : ok ? "no [DONE]" : err_body);
        }
    }
    free(body);
    free(req);
    free(st);
    return NULL;
}

/* ==== Metrics polling ==================================================== */

static atomic_bool stop_poll;
static double max_running, max_kv_usage;

static void *poll_main(void *arg) {
    (void)arg;
    static const char req[] = "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
    char *body = malloc(1 << 20);
    stream_state *st = malloc(sizeof *st);
    while (body && st && !atomic_load(&stop_poll)) {
        memset(st, 0, sizeof *st);
        samples dummy = {0};
        st->ttft = st->itl = &dummy;
        if (http_request(req, sizeof req - 1, st, body, 1 << 20)) {
            for (char *l = body; l && *l; l = strchr(l, '\n') ? strchr(l, '\n') + 1 : NULL) {
                double v;
                if (sscanf(l, "saserve_num_requests_running %lf", &v) == 1 && v > max_running) max_running = v;
                if (sscanf(l, "saserve_kv_cache_usage_ratio %lf", &v) == 1 && v > max_kv_usage) max_kv_usage = v;
            }
        }
        free(dummy.v);
        usleep(20000);
    }
    free(body);
    free(st);
    return NULL;
}

/* ==== Main =============================================================== */

static int int_arg(const char *flag, const char *v, int lo, int hi) {
    char *end;
    long n = strtol(v, &end, 10);
    if (*end || n < lo || n > hi) {
        fprintf(stderr, "loadgen: %s must be in [%d, %d], got '%s'\n", flag, lo, hi, v);
        exit(2);
    }
    return (int)n;
}

int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--poll-metrics")) {
            O.poll = true;
            continue;
        }
        if (i + 1 >= argc) {
            fprintf(stderr, "loadgen: unknown option or missing value: %s\n", a);
            return 2;
        }
        const char *v = argv[++i];
        if (!strcmp(a, "--port")) O.port = int_arg(a, v, 1, 65535);
        else if (!strcmp(a, "--clients")) O.clients = int_arg(a, v, 1, 1024);
        else if (!strcmp(a, "--requests")) O.requests = int_arg(a, v, 1, 10000);
        else if (!strcmp(a, "--prompt-tokens")) O.prompt_tokens = int_arg(a, v, 1, 1 << 16);
        else if (!strcmp(a, "--max-tokens")) O.max_tokens = int_arg(a, v, 1, 1 << 16);
        else if (!strcmp(a, "--vocab")) O.vocab = int_arg(a, v, 4, 1 << 22);
        else if (!strcmp(a, "--timeout")) O.timeout = int_arg(a, v, 1, 86400);
        else if (!strcmp(a, "--host")) {
            if (strcmp(v, "127.0.0.1") && strcmp(v, "localhost")) {
                fprintf(stderr, "loadgen: loopback only (127.0.0.1)\n");
                return 2;
            }
        } else {
            fprintf(stderr, "loadgen: unknown option %s\n", a);
            return 2;
        }
    }
    client *cs = calloc((size_t)O.clients, sizeof *cs);
    pthread_t *th = calloc((size_t)O.clients, sizeof *th);
    if (!cs || !th) return 1;
    pthread_barrier_init(&start_bar, NULL, (unsigned)O.clients + 1);
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 256 * 1024);
    for (int i = 0; i < O.clients; i++) {
        cs[i].id = i;
        if (pthread_create(&th[i], &attr, client_main, &cs[i]) != 0) {
            fprintf(stderr, "loadgen: cannot start client threads\n");
            return 1;
        }
    }
    pthread_t poller;
    if (O.poll) pthread_create(&poller, NULL, poll_main, NULL);
    double t0 = now();
    pthread_barrier_wait(&start_bar);
    samples ttft = {0}, itl = {0};
    long tokens = 0;
    int errors = 0, ok = 0, timeouts = 0;
    const char *last_error = "";
    for (int i = 0; i < O.clients; i++) {
        pthread_join(th[i], NULL);
        for (size_t k = 0; k < cs[i].ttft.n; k++) add_sample(&ttft, cs[i].ttft.v[k]);
        for (size_t k = 0; k < cs[i].itl.n; k++) add_sample(&itl, cs[i].itl.v[k]);
        tokens += cs[i].tokens;
        errors += cs[i].errors;
        ok += cs[i].ok;
        timeouts += cs[i].timeouts;
        if (cs[i].errors) last_error = cs[i].last_error;
    }
    double wall = now() - t0;
    if (O.poll) {
        atomic_store(&stop_poll, true);
        pthread_join(poller, NULL);
    }
    qsort(ttft.v, ttft.n, sizeof(double), cmp_d);
    qsort(itl.v, itl.n, sizeof(double), cmp_d);
    printf("{\"clients\":%d,\"requests\":%d,\"ok\":%d,\"errors\":%d,\"timeouts\":%d,\"prompt_tokens\":%d,"
           "\"max_tokens\":%d,"
           "\"gen_tokens\":%ld,\"wall_s\":%.3f,\"tok_s\":%.3f,\"ttft_p50_ms\":%.2f,\"ttft_p99_ms\":%.2f,"
           "\"itl_p50_ms\":%.2f,\"itl_p99_ms\":%.2f",
           O.clients, O.clients * O.requests, ok, errors, timeouts, O.prompt_tokens, O.max_tokens, tokens, wall,
           (double)tokens / wall, 1e3 * pct(&ttft, 50), 1e3 * pct(&ttft, 99), 1e3 * pct(&itl, 50),
           1e3 * pct(&itl, 99));
    if (O.poll) printf(",\"max_running\":%.0f,\"max_kv_usage\":%.4f", max_running, max_kv_usage);
    if (errors) {
        printf(",\"last_error\":\"");
        for (const char *p = last_error; *p; p++)
            if (*p != '"' && *p != '\\' && (unsigned char)*p >= 0x20) putchar(*p);
        printf("\"");
    }
    printf("}\n");
    for (int i = 0; i < O.clients; i++) {
        free(cs[i].ttft.v);
        free(cs[i].itl.v);
    }
    free(cs);
    free(th);
    free(ttft.v);
    free(itl.v);
    return errors ? 1 : 0;
}
