/*
 * httpc.h - a minimal HTTP/1.1 client and a saserve process fixture for the
 * server tests (loopback only).
 */
#ifndef SASERVE_HTTPC_H
#define SASERVE_HTTPC_H

#include <stdbool.h>
#include <stddef.h>
#include <sys/types.h>

typedef struct {
    int status;
    char *headers; /* raw header block */
    char *body;    /* de-chunked, NUL-terminated */
    size_t body_len;
} http_resp;

/* Sends one request (Connection: close) and reads the whole response.
 * extra_headers: NULL or "Name: value\r\n..." lines.  Returns 0 or -1. */
int http_do(int port, const char *method, const char *path, const char *extra_headers, const char *body,
            http_resp *out);

/* http_do's options.  HTTP_STRICT: a chunked body that is malformed (a chunk
 * past the end, no terminating chunk) is an error (-1) rather than kept as
 * far as it goes.  HTTP_DROP_AFTER_FIRST_EVENT: close the connection as soon
 * as the first SSE event has arrived (a client going away mid-stream); the
 * body is returned as read, not de-chunked. */
enum { HTTP_STRICT = 1, HTTP_DROP_AFTER_FIRST_EVENT = 2 };
int http_do_flags(int port, const char *method, const char *path, const char *extra_headers, const char *body,
                  unsigned flags, http_resp *out);

/* GET /metrics: the body (caller frees), or NULL. */
char *http_metrics(int port);
/* The value of the sample whose line starts with `series ` (name and
 * labels) in a Prometheus text page; NAN when there is none. */
double metrics_sample(const char *text, const char *series);
void http_resp_free(http_resp *r);
/* Header value (case-insensitive name), copied into buf; false if absent. */
bool http_header(const http_resp *r, const char *name, char *buf, size_t cap);

typedef struct {
    pid_t pid;
    int port;
    char log_path[64];
} srv_proc;

/* Starts build/saserve serve with the given extra arguments (NULL-ended)
 * on a free port; waits until it listens.  Returns 0 or -1 (log kept). */
int srv_start(srv_proc *s, const char *const *args);
/* SIGTERM, wait; returns the exit status (or -1). */
int srv_stop(srv_proc *s);
/* The server's log so far (caller frees). */
char *srv_log(const srv_proc *s);

#endif
