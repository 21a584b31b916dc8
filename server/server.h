/*
 * server.h - the HTTP side of saserve serve: one libuv loop thread that
 * drives libmicrohttpd (no MHD threads), parses requests, hands them to the
 * scheduler, and writes responses as the scheduler's events arrive.
 */
#ifndef SASERVE_SERVER_H
#define SASERVE_SERVER_H

#include <microhttpd.h>
#include <pthread.h>
#include <stdatomic.h>
#include <uv.h>

#include "config.h"
#include "engine.h"
#include "metrics.h"
#include "request.h"
#include "scheduler.h"

typedef struct server {
    const saserve_config *cfg;
    engine *eng;
    const engine_info *info;
    scheduler *sched;
    metrics *m;
    char model_id[256];
    long long created;
    char **api_keys;
    int n_api_keys;
    const char *chat_family; /* chat template family in use */

    uv_loop_t *loop;
    uv_poll_t mhd_poll;
    uv_timer_t mhd_timer, check_timer, drain_timer;
    uv_async_t wake;
    uv_signal_t sig_term, sig_int;
    struct MHD_Daemon *mhd;
    int port; /* actually bound */

    /* Requests with events for the loop (scheduler -> loop). */
    req_wakeq wakeq;

    /* Loop-owned: requests with an open response, for disconnect checks. */
    request **live;
    int n_live, cap_live;

    bool draining;
    double drain_deadline;
    int signals;
    atomic_uint_fast64_t next_id;
} server;

/* Starts listening, runs the loop until shutdown.  Returns the exit code. */
int server_run(server *s);

/* routes.c: why a request body was refused.  status 0 means 400; 500 is an
 * allocation failure.  param names the offending field (or NULL). */
typedef struct {
    const char *param;
    char msg[256];
    int status;
    const char *code;
} routes_verr;

/* routes.c: parses and validates the JSON body of a /v1/completions
 * (REQ_COMPLETION) or /v1/chat/completions (REQ_CHAT) request: parameters,
 * prompt or chat rendering, tokens, length checks, choices.  Touches neither
 * the connection, the scheduler nor the metrics, so it can be called without
 * a running server (fuzzing needs cfg, eng, info, chat_family and model_id).
 * Returns 0 and *out (one reference, the caller's; not queued), or -1 with
 * *e filled.  Loop thread (or any one thread with its own server). */
int routes_parse_request(server *s, req_kind kind, const char *body, size_t len, request **out, routes_verr *e);

/* routes.c: the handler for a complete request (body read).  Returns an MHD
 * result; either queues a response or suspends the connection. */
enum MHD_Result routes_dispatch(server *s, struct MHD_Connection *conn, const char *method, const char *url,
                                const char *body, size_t body_len, request **req_out);
/* routes.c: a suspended non-stream request is done (or failed): queue its
 * response. */
enum MHD_Result routes_respond_final(server *s, struct MHD_Connection *conn, request *r);
/* routes.c: turns drained events into response bytes (stream) or
 * accumulated state (non-stream). */
void routes_consume_events(server *s, request *r, req_outbox *out);

/* http.c helpers used by routes.c */
enum MHD_Result http_respond(server *s, struct MHD_Connection *conn, unsigned status, const char *content_type,
                             const char *body, size_t len);
enum MHD_Result http_error(server *s, struct MHD_Connection *conn, unsigned status, const char *type,
                           const char *message, const char *param, const char *code);
void http_add_common_headers(server *s, struct MHD_Connection *conn, struct MHD_Response *resp);
enum MHD_Result http_start_stream(server *s, struct MHD_Connection *conn, request *r);
void http_track(server *s, request *r);

#endif
