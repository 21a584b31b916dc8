/*
 * httpc.c - see httpc.h.
 */
#include "httpc.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "testutil.h"

static int connect_port(int port) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return -1;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(fd, (struct sockaddr *)&a, sizeof a) != 0) {
        close(fd);
        return -1;
    }
    struct timeval tv = {120, 0};
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

/* Decodes a chunked body in place; returns the new length, or -1 when
 * strict and the body is malformed (lenient: keeps what is there). */
static long dechunk(char *b, size_t n, bool strict) {
    size_t in = 0, out = 0;
    for (;;) {
        if (in >= n) {
            if (strict) return -1; /* no terminating chunk */
            break;
        }
        char *end;
        unsigned long len = strtoul(b + in, &end, 16);
        char *nl = strstr(end, "\r\n");
        if (!nl || end == b + in) {
            if (strict) return -1;
            break;
        }
        in = (size_t)(nl - b) + 2;
        if (len == 0) break;
        if (in + len + 2 > n) {
            if (strict) return -1;
            if (in + len > n) len = n - in;
        }
        memmove(b + out, b + in, len);
        out += len;
        in += len + 2;
    }
    b[out] = 0;
    return (long)out;
}

int http_do(int port, const char *method, const char *path, const char *extra, const char *body, http_resp *out) {
    return http_do_flags(port, method, path, extra, body, 0, out);
}

int http_do_flags(int port, const char *method, const char *path, const char *extra, const char *body,
                  unsigned flags, http_resp *out) {
    memset(out, 0, sizeof *out);
    int fd = connect_port(port);
    if (fd < 0) return -1;
    size_t bl = body ? strlen(body) : 0;
    char head[2048];
    int hn = snprintf(head, sizeof head, "%s %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nConnection: close\r\n%s%s", method,
                      path, port, extra ? extra : "", body ? "Content-Type: application/json\r\n" : "");
    if (body) hn += snprintf(head + hn, sizeof head - (size_t)hn, "Content-Length: %zu\r\n", bl);
    hn += snprintf(head + hn, sizeof head - (size_t)hn, "\r\n");
    if (write_all(fd, head, (size_t)hn) || (bl && write_all(fd, body, bl))) {
        close(fd);
        return -1;
    }
    size_t cap = 65536, len = 0;
    char *buf = malloc(cap);
    for (;;) {
        if (len + 4096 > cap) buf = realloc(buf, cap *= 2);
        ssize_t r = read(fd, buf + len, cap - len - 1);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) break;
        len += (size_t)r;
        buf[len] = 0;
        if (flags & HTTP_DROP_AFTER_FIRST_EVENT) {
            const char *sep = strstr(buf, "\r\n\r\n");
            if (sep && strstr(sep, "data: ")) break;
        }
    }
    close(fd);
    buf[len] = 0;
    char *sep = strstr(buf, "\r\n\r\n");
    if (!sep || sscanf(buf, "HTTP/1.%*d %d", &out->status) != 1) {
        free(buf);
        return -1;
    }
    size_t hl = (size_t)(sep - buf);
    out->headers = strndup(buf, hl);
    size_t body_len = len - hl - 4;
    out->body = malloc(body_len + 1);
    memcpy(out->body, sep + 4, body_len);
    out->body[body_len] = 0;
    free(buf);
    char te[64];
    if (!(flags & HTTP_DROP_AFTER_FIRST_EVENT) && http_header(out, "Transfer-Encoding", te, sizeof te) &&
        strcasestr(te, "chunked")) {
        long n = dechunk(out->body, body_len, flags & HTTP_STRICT);
        if (n < 0) {
            http_resp_free(out);
            return -1;
        }
        body_len = (size_t)n;
    }
    out->body_len = body_len;
    return 0;
}

char *http_metrics(int port) {
    http_resp r;
    if (http_do(port, "GET", "/metrics", NULL, NULL, &r) != 0) return NULL;
    char *b = r.body;
    r.body = NULL;
    http_resp_free(&r);
    return b;
}

double metrics_sample(const char *text, const char *series) {
    size_t n = strlen(series);
    for (const char *p = text; p && *p;) {
        if (!strncmp(p, series, n) && p[n] == ' ') return strtod(p + n + 1, NULL);
        p = strchr(p, '\n');
        if (p) p++;
    }
    return NAN;
}

void http_resp_free(http_resp *r) {
    free(r->headers);
    free(r->body);
    memset(r, 0, sizeof *r);
}

bool http_header(const http_resp *r, const char *name, char *buf, size_t cap) {
    size_t nl = strlen(name);
    for (const char *p = r->headers; p && *p;) {
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

/* ==== Server process =================================================== */

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

char *srv_log(const srv_proc *s) { return read_file(s->log_path, NULL); }

int srv_start(srv_proc *s, const char *const *args) {
    s->port = free_port();
    snprintf(s->log_path, sizeof s->log_path, "/tmp/saserve-test-XXXXXX");
    int lfd = mkstemp(s->log_path);
    if (lfd < 0) return -1;
    char port[16];
    snprintf(port, sizeof port, "%d", s->port);
    const char *argv[64];
    int n = 0;
    argv[n++] = saserve_bin();
    argv[n++] = "serve";
    argv[n++] = "--port";
    argv[n++] = port;
    for (int i = 0; args && args[i] && n < 62; i++) argv[n++] = args[i];
    argv[n] = NULL;
    s->pid = fork();
    if (s->pid == 0) {
        dup2(lfd, 2);
        dup2(lfd, 1);
        execv(argv[0], (char *const *)argv);
        _exit(127);
    }
    close(lfd);
    /* Wait for /health (model load can take a while under sanitizers). */
    for (int i = 0; i < 600; i++) {
        http_resp r;
        if (http_do(s->port, "GET", "/health", NULL, NULL, &r) == 0) {
            int st = r.status;
            http_resp_free(&r);
            if (st == 200) return 0;
        }
        int status;
        if (waitpid(s->pid, &status, WNOHANG) == s->pid) {
            s->pid = 0;
            return -1;
        }
        struct timespec ts = {0, 100 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    return -1;
}

int srv_stop(srv_proc *s) {
    if (s->pid <= 0) return -1;
    kill(s->pid, SIGTERM);
    int status = 0;
    for (int i = 0; i < 600; i++) {
        if (waitpid(s->pid, &status, WNOHANG) == s->pid) {
            s->pid = 0;
            return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
        }
        struct timespec ts = {0, 100 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    kill(s->pid, SIGKILL);
    waitpid(s->pid, &status, 0);
    s->pid = 0;
    return -1;
}
