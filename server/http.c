/*
 * http.c - libmicrohttpd driven by the libuv loop; see server.h.
 *
 * MHD runs with MHD_USE_EPOLL and no threads of its own: a uv_poll_t on its
 * epoll descriptor calls MHD_run(), and a uv_timer_t follows
 * MHD_get_timeout().  Every MHD call therefore happens on the loop thread.
 *
 * Responses that must wait for the scheduler suspend their connection:
 * non-streaming requests in the access handler, streams in the content reader
 * whenever no bytes are ready.  The scheduler posts events and pokes the loop
 * through a uv_async_t; its callback drains every pending request (sends
 * coalesce) and resumes the connections that have something to say.
 *
 * A suspended connection is not polled by MHD, so a client that hangs up
 * would go unnoticed; a periodic check peeks at each suspended socket and
 * cancels the request when the peer has closed it.
 */
#include <errno.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include <jansson.h>

#include "log.h"
#include "server.h"

#define CHECK_INTERVAL_MS 200

typedef struct {
    server *s;
    buf body;
    bool too_large;
    bool rejected;      /* a response was queued before the body */
    request *req;       /* set once dispatched to the scheduler */
} conn_ctx;

/* ==== Responses ======================================================== */

void http_add_common_headers(server *s, struct MHD_Connection *conn, struct MHD_Response *resp) {
    MHD_add_response_header(resp, "Server", "saserve/" SASERVE_VERSION);
    const char *origins = s->cfg->cors_origins;
    if (origins && origins[0]) {
        const char *origin = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "Origin");
        const char *allow = NULL;
        if (!strcmp(origins, "*")) {
            allow = "*";
        } else if (origin) {
            /* Comma-separated list: echo the origin when it is listed. */
            size_t ol = strlen(origin);
            for (const char *p = origins; *p;) {
                const char *e = strchr(p, ',');
                size_t n = e ? (size_t)(e - p) : strlen(p);
                while (n && *p == ' ') p++, n--;
                while (n && p[n - 1] == ' ') n--;
                if (n == ol && !memcmp(p, origin, n)) allow = origin;
                if (!e) break;
                p = e + 1;
            }
        }
        if (allow) {
            MHD_add_response_header(resp, "Access-Control-Allow-Origin", allow);
            if (strcmp(allow, "*")) MHD_add_response_header(resp, "Vary", "Origin");
        }
    }
}

enum MHD_Result http_respond(server *s, struct MHD_Connection *conn, unsigned status, const char *content_type,
                             const char *body, size_t len) {
    struct MHD_Response *resp = MHD_create_response_from_buffer(len, (void *)body, MHD_RESPMEM_MUST_COPY);
    if (!resp) return MHD_NO;
    MHD_add_response_header(resp, "Content-Type", content_type);
    http_add_common_headers(s, conn, resp);
    if (status == 429 || status == 503) MHD_add_response_header(resp, "Retry-After", "1");
    if (status == 401) MHD_add_response_header(resp, "WWW-Authenticate", "Bearer");
    enum MHD_Result rc = MHD_queue_response(conn, status, resp);
    MHD_destroy_response(resp);
    return rc;
}

enum MHD_Result http_error(server *s, struct MHD_Connection *conn, unsigned status, const char *type,
                           const char *message, const char *param, const char *code) {
    json_t *err = json_pack("{s:s, s:s, s:o, s:o}", "message", message, "type", type, "param",
                            param ? json_string(param) : json_null(), "code", code ? json_string(code) : json_null());
    json_t *o = json_pack("{s:o}", "error", err);
    char *text = json_dumps(o, JSON_COMPACT);
    json_decref(o);
    enum MHD_Result rc = http_respond(s, conn, status, "application/json", text ? text : "{}", text ? strlen(text) : 2);
    free(text);
    return rc;
}

/* ==== Streams ========================================================== */

static ssize_t stream_reader(void *cls, uint64_t pos, char *out, size_t max) {
    (void)pos;
    request *r = cls;
    if (r->sse.len > 0) {
        size_t n = r->sse.len < max ? r->sse.len : max;
        memcpy(out, r->sse.p, n);
        buf_consume(&r->sse, n);
        return (ssize_t)n;
    }
    if (r->loop_done) return MHD_CONTENT_READER_END_OF_STREAM;
    if (r->conn_closed) return MHD_CONTENT_READER_END_WITH_ERROR;
    /* Nothing yet: park the connection until the scheduler has more. */
    MHD_suspend_connection(r->conn);
    r->suspended = true;
    return 0;
}

static void stream_free(void *cls) { request_unref(cls); }

enum MHD_Result http_start_stream(server *s, struct MHD_Connection *conn, request *r) {
    request_ref(r); /* the response's reference, dropped in stream_free */
    struct MHD_Response *resp = MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, 16 * 1024, stream_reader, r,
                                                                  stream_free);
    if (!resp) {
        request_unref(r);
        return MHD_NO;
    }
    MHD_add_response_header(resp, "Content-Type", "text/event-stream");
    MHD_add_response_header(resp, "Cache-Control", "no-cache");
    MHD_add_response_header(resp, "X-Accel-Buffering", "no");
    http_add_common_headers(s, conn, resp);
    enum MHD_Result rc = MHD_queue_response(conn, MHD_HTTP_OK, resp);
    MHD_destroy_response(resp);
    return rc;
}

/* ==== Live requests ==================================================== */

void http_track(server *s, request *r) {
    if (s->n_live == s->cap_live) {
        int cap = s->cap_live ? s->cap_live * 2 : 64;
        request **l = realloc(s->live, (size_t)cap * sizeof *l);
        if (!l) return;
        s->live = l;
        s->cap_live = cap;
    }
    request_ref(r);
    s->live[s->n_live++] = r;
}

static void untrack(server *s, request *r) {
    for (int i = 0; i < s->n_live; i++)
        if (s->live[i] == r) {
            s->live[i] = s->live[--s->n_live];
            request_unref(r);
            return;
        }
}

static void resume(request *r) {
    if (r->suspended && r->conn) {
        r->suspended = false;
        MHD_resume_connection(r->conn);
    }
}

/* ==== MHD callbacks ==================================================== */

static bool authorized(server *s, struct MHD_Connection *conn, const char *url) {
    if (s->n_api_keys == 0) return true;
    if (!s->cfg->auth_health && (!strcmp(url, "/health") || !strcmp(url, "/metrics"))) return true;
    const char *h = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "Authorization");
    if (!h || strncasecmp(h, "Bearer ", 7) != 0) return false;
    const char *key = h + 7;
    size_t kl = strlen(key);
    /* Constant time in the key's content: every configured key is compared
     * over its full length, and the result is only looked at afterwards. */
    unsigned ok = 0;
    for (int i = 0; i < s->n_api_keys; i++) {
        const char *k = s->api_keys[i];
        size_t n = strlen(k);
        unsigned diff = (unsigned)(n ^ kl);
        for (size_t j = 0; j < n; j++) diff |= (unsigned char)k[j] ^ (unsigned char)(j < kl ? key[j] : 0);
        ok |= diff == 0;
    }
    return ok != 0;
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *conn, const char *url, const char *method,
                                  const char *version, const char *upload_data, size_t *upload_data_size,
                                  void **con_cls) {
    (void)version;
    server *s = cls;
    conn_ctx *ctx = *con_cls;
    if (!ctx) {
        ctx = calloc(1, sizeof *ctx);
        if (!ctx) return MHD_NO;
        ctx->s = s;
        *con_cls = ctx;
        /* Decisions that need no body are made before reading it. */
        if (strcmp(method, "OPTIONS") != 0 && !authorized(s, conn, url)) {
            ctx->rejected = true;
            metrics_request_failure(s->m, FAIL_UNAUTHORIZED);
            return http_error(s, conn, 401, "invalid_request_error", "Incorrect API key provided.", NULL,
                              "invalid_api_key");
        }
        const char *cl = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "Content-Length");
        if (cl && strtoull(cl, NULL, 10) > (unsigned long long)s->cfg->max_body_bytes) {
            ctx->rejected = true;
            metrics_request_failure(s->m, FAIL_TOO_LARGE);
            char msg[160];
            snprintf(msg, sizeof msg, "Request body of %s bytes exceeds the limit of %lld bytes.", cl,
                     (long long)s->cfg->max_body_bytes);
            return http_error(s, conn, 413, "invalid_request_error", msg, NULL, "request_too_large");
        }
        return MHD_YES;
    }
    if (ctx->rejected) {
        *upload_data_size = 0; /* discard */
        return MHD_YES;
    }
    if (*upload_data_size > 0) {
        if (!ctx->too_large) {
            if (ctx->body.len + *upload_data_size > (size_t)s->cfg->max_body_bytes) {
                ctx->too_large = true;
                buf_free(&ctx->body);
            } else if (!buf_append(&ctx->body, upload_data, *upload_data_size)) {
                return MHD_NO;
            }
        }
        *upload_data_size = 0;
        return MHD_YES;
    }
    if (ctx->req) {
        /* Resumed after suspension: the scheduler finished this request. */
        request *r = ctx->req;
        if (r->conn_closed) return MHD_NO;
        if (!r->loop_done) {
            MHD_suspend_connection(conn);
            r->suspended = true;
            return MHD_YES;
        }
        return routes_respond_final(s, conn, r);
    }
    if (ctx->too_large) {
        metrics_request_failure(s->m, FAIL_TOO_LARGE);
        char msg[128];
        snprintf(msg, sizeof msg, "Request body exceeds the limit of %lld bytes.", (long long)s->cfg->max_body_bytes);
        return http_error(s, conn, 413, "invalid_request_error", msg, NULL, "request_too_large");
    }
    request *r = NULL;
    enum MHD_Result rc = routes_dispatch(s, conn, method, url, ctx->body.p ? ctx->body.p : "", ctx->body.len, &r);
    buf_free(&ctx->body);
    if (r) {
        ctx->req = r; /* the context's reference, dropped on completion */
        r->conn = conn;
        http_track(s, r);
        if (!r->stream) {
            MHD_suspend_connection(conn);
            r->suspended = true;
        }
    }
    return rc;
}

static void on_completed(void *cls, struct MHD_Connection *conn, void **con_cls, enum MHD_RequestTerminationCode toe) {
    (void)conn;
    server *s = cls;
    conn_ctx *ctx = *con_cls;
    if (!ctx) return;
    if (ctx->req) {
        request *r = ctx->req;
        r->conn = NULL;
        r->conn_closed = true;
        if (!r->loop_done || toe != MHD_REQUEST_TERMINATED_COMPLETED_OK) {
            if (atomic_load(&r->state) != REQ_FINISHED) {
                atomic_store(&r->cancel, true);
                sched_wake(s->sched);
            }
        }
        untrack(s, r);
        request_unref(r);
    }
    buf_free(&ctx->body);
    free(ctx);
    *con_cls = NULL;
}

/* ==== Loop glue ======================================================== */

static void on_mhd_timer(uv_timer_t *h);

static void schedule_mhd_timer(server *s) {
    MHD_UNSIGNED_LONG_LONG ms;
    if (MHD_get_timeout(s->mhd, &ms) != MHD_YES || ms > 1000) ms = 1000;
    uv_timer_start(&s->mhd_timer, on_mhd_timer, ms, 0);
}

static void run_mhd(server *s) {
    MHD_run(s->mhd);
    schedule_mhd_timer(s);
}

static void on_mhd_poll(uv_poll_t *h, int status, int events) {
    (void)status;
    (void)events;
    run_mhd(h->data);
}

static void on_mhd_timer(uv_timer_t *h) { run_mhd(h->data); }


/* Scheduler -> loop: called on the scheduler thread. */
static void notify_pending(request *r, void *ud) {
    server *s = ud;
    req_wakeq_push(&s->wakeq, r);
    uv_async_send(&s->wake);
}

static void maybe_finish_drain(server *s);

/* uv_async_send coalesces: drain everything that is pending. */
static void on_wake(uv_async_t *h) {
    server *s = h->data;
    request *list = req_wakeq_take(&s->wakeq);
    while (list) {
        request *r = list;
        list = r->wake_next;
        req_outbox out;
        request_take_outbox(r, &out);
        if (out.n) routes_consume_events(s, r, &out);
        request_outbox_free(&out);
        /* A non-stream response waits until it is complete. */
        if (r->stream || r->loop_done) resume(r);
        request_unref(r);
    }
    run_mhd(s);
    if (s->draining) maybe_finish_drain(s);
}

/* Suspended sockets are not polled by MHD: look for a peer that hung up. */
static void on_check(uv_timer_t *h) {
    server *s = h->data;
    bool any = false;
    for (int i = 0; i < s->n_live; i++) {
        request *r = s->live[i];
        if (!r->suspended || !r->conn || r->conn_closed) continue;
        const union MHD_ConnectionInfo *ci = MHD_get_connection_info(r->conn, MHD_CONNECTION_INFO_CONNECTION_FD);
        if (!ci) continue;
        char c;
        ssize_t n = recv(ci->connect_fd, &c, 1, MSG_PEEK | MSG_DONTWAIT);
        if (n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) {
            LOG_INFO(r->id, "client disconnected");
            r->conn_closed = true;
            atomic_store(&r->cancel, true);
            sched_wake(s->sched);
            resume(r); /* MHD then closes it and calls on_completed */
            any = true;
        }
    }
    if (any) run_mhd(s);
}

/* ==== Shutdown ========================================================= */

static void stop_loop(server *s) {
    uv_timer_stop(&s->check_timer);
    uv_timer_stop(&s->mhd_timer);
    uv_timer_stop(&s->drain_timer);
    uv_poll_stop(&s->mhd_poll);
    uv_signal_stop(&s->sig_term);
    uv_signal_stop(&s->sig_int);
    uv_close((uv_handle_t *)&s->wake, NULL);
    uv_stop(s->loop);
    /* Exiting anyway: a late signal must not kill us mid-cleanup (libuv
     * restores the default action when its watchers stop). */
    signal(SIGTERM, SIG_IGN);
    signal(SIGINT, SIG_IGN);
}

static void maybe_finish_drain(server *s) {
    sched_stats st;
    sched_snapshot(s->sched, &st);
    if (st.running_requests == 0 && st.waiting == 0 && s->n_live == 0) {
        LOG_INFO(NULL, "drained: all requests finished, exiting");
        stop_loop(s);
    }
}

static void on_drain_timer(uv_timer_t *h) {
    server *s = h->data;
    if (now_seconds() >= s->drain_deadline) {
        sched_stats st;
        sched_snapshot(s->sched, &st);
        if (st.running_requests || st.waiting) {
            LOG_WARN(NULL, "shutdown grace period over: cancelling %d running and %d waiting requests",
                     st.running_requests, st.waiting);
            sched_cancel_all(s->sched);
        }
        s->drain_deadline = now_seconds() + 5; /* then give the cancellations a moment */
        if (s->n_live == 0 && !st.running_requests && !st.waiting) stop_loop(s);
        else if (s->signals > 2) stop_loop(s);
        s->signals++;
    }
    maybe_finish_drain(s);
}

static void on_signal(uv_signal_t *h, int signum) {
    server *s = h->data;
    if (s->draining) {
        LOG_WARN(NULL, "second signal: exiting now");
        sched_cancel_all(s->sched);
        stop_loop(s);
        return;
    }
    LOG_INFO(NULL, "%s: draining (new requests get 503; up to %.0f s for running ones)",
             signum == SIGTERM ? "SIGTERM" : "SIGINT", s->cfg->shutdown_grace);
    s->draining = true;
    sched_drain(s->sched);
    s->drain_deadline = now_seconds() + s->cfg->shutdown_grace;
    uv_timer_start(&s->drain_timer, on_drain_timer, 100, 100);
    maybe_finish_drain(s);
}

/* ==== Start ============================================================ */

static void mhd_logger(void *cls, const char *fmt, va_list ap) {
    (void)cls;
    char msg[512];
    vsnprintf(msg, sizeof msg, fmt, ap);
    size_t n = strlen(msg);
    while (n && msg[n - 1] == '\n') msg[--n] = 0;
    LOG_DEBUG(NULL, "http: %s", msg);
}

int server_run(server *s) {
    struct sockaddr_storage ss;
    memset(&ss, 0, sizeof ss);
    socklen_t sl;
    unsigned flags = MHD_USE_EPOLL | MHD_ALLOW_SUSPEND_RESUME | MHD_USE_ERROR_LOG;
    struct sockaddr_in *a4 = (struct sockaddr_in *)&ss;
    struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)&ss;
    if (inet_pton(AF_INET, s->cfg->host, &a4->sin_addr) == 1) {
        a4->sin_family = AF_INET;
        a4->sin_port = htons((uint16_t)s->cfg->port);
        sl = sizeof *a4;
    } else if (inet_pton(AF_INET6, s->cfg->host, &a6->sin6_addr) == 1) {
        a6->sin6_family = AF_INET6;
        a6->sin6_port = htons((uint16_t)s->cfg->port);
        sl = sizeof *a6;
        flags |= MHD_USE_IPv6;
    } else {
        LOG_ERROR(NULL, "host '%s' is not an IPv4 or IPv6 address", s->cfg->host);
        return 1;
    }
    (void)sl;
    signal(SIGPIPE, SIG_IGN);
    s->mhd = MHD_start_daemon(flags, (uint16_t)s->cfg->port, NULL, NULL, on_request, s, MHD_OPTION_SOCK_ADDR, &ss,
                              MHD_OPTION_NOTIFY_COMPLETED, on_completed, s, MHD_OPTION_CONNECTION_TIMEOUT,
                              (unsigned)600, MHD_OPTION_CONNECTION_LIMIT, (unsigned)1000,
                              MHD_OPTION_CONNECTION_MEMORY_LIMIT, (size_t)64 * 1024, MHD_OPTION_EXTERNAL_LOGGER,
                              mhd_logger, s, MHD_OPTION_END);
    if (!s->mhd) {
        LOG_ERROR(NULL, "cannot listen on %s:%d (in use, or not allowed)", s->cfg->host, s->cfg->port);
        return 1;
    }
    const union MHD_DaemonInfo *di = MHD_get_daemon_info(s->mhd, MHD_DAEMON_INFO_BIND_PORT);
    s->port = di ? di->port : s->cfg->port;
    di = MHD_get_daemon_info(s->mhd, MHD_DAEMON_INFO_EPOLL_FD);
    if (!di) {
        LOG_ERROR(NULL, "libmicrohttpd has no epoll support");
        MHD_stop_daemon(s->mhd);
        return 1;
    }
    s->loop = uv_default_loop();
    req_wakeq_init(&s->wakeq);
    uv_poll_init(s->loop, &s->mhd_poll, di->epoll_fd);
    s->mhd_poll.data = s;
    uv_poll_start(&s->mhd_poll, UV_READABLE, on_mhd_poll);
    uv_timer_init(s->loop, &s->mhd_timer);
    s->mhd_timer.data = s;
    uv_timer_init(s->loop, &s->check_timer);
    s->check_timer.data = s;
    uv_timer_start(&s->check_timer, on_check, CHECK_INTERVAL_MS, CHECK_INTERVAL_MS);
    uv_timer_init(s->loop, &s->drain_timer);
    s->drain_timer.data = s;
    uv_async_init(s->loop, &s->wake, on_wake);
    s->wake.data = s;
    uv_signal_init(s->loop, &s->sig_term);
    s->sig_term.data = s;
    uv_signal_start(&s->sig_term, on_signal, SIGTERM);
    uv_signal_init(s->loop, &s->sig_int);
    s->sig_int.data = s;
    uv_signal_start(&s->sig_int, on_signal, SIGINT);

    LOG_INFO(NULL, "listening on http://%s%s%s:%d (model %s)", strchr(s->cfg->host, ':') ? "[" : "", s->cfg->host,
             strchr(s->cfg->host, ':') ? "]" : "", s->port, s->model_id);
    run_mhd(s);
    uv_run(s->loop, UV_RUN_DEFAULT);

    /* Close the remaining handles so the loop can be closed cleanly. */
    uv_handle_t *hs[] = {(uv_handle_t *)&s->mhd_poll, (uv_handle_t *)&s->mhd_timer, (uv_handle_t *)&s->check_timer,
                         (uv_handle_t *)&s->drain_timer, (uv_handle_t *)&s->sig_term, (uv_handle_t *)&s->sig_int};
    for (size_t i = 0; i < sizeof hs / sizeof hs[0]; i++)
        if (!uv_is_closing(hs[i])) uv_close(hs[i], NULL);
    uv_run(s->loop, UV_RUN_DEFAULT);
    /* MHD must not be stopped with suspended connections: wake them all;
     * their requests are gone, so they close. */
    for (int i = 0; i < s->n_live; i++) {
        s->live[i]->conn_closed = true;
        resume(s->live[i]);
    }
    MHD_run(s->mhd);
    MHD_stop_daemon(s->mhd);
    s->mhd = NULL;
    for (int i = 0; i < s->n_live; i++) request_unref(s->live[i]);
    free(s->live);
    s->live = NULL;
    s->n_live = 0;
    req_wakeq_clear(&s->wakeq);
    uv_loop_close(s->loop);
    return 0;
}

/* Exposed for cli_serve.c */
sched_notify_fn http_notify_fn(void);
sched_notify_fn http_notify_fn(void) { return notify_pending; }
