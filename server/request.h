/*
 * request.h - one API request as it moves between the HTTP loop and the
 * scheduler.
 *
 * Ownership and threads:
 *  - The loop thread creates a request (refs = 1, its own reference), fills
 *    the immutable part (parameters, prompt tokens), and hands a second
 *    reference to the scheduler through the admission queue.
 *  - The scheduler owns the choices (sequences, generated tokens, text
 *    streams) and reports progress as events in the outbox, under mu.
 *  - The loop drains the outbox, formats JSON/SSE and owns the connection
 *    fields.  `cancel` is the only field the loop writes that the scheduler
 *    reads: set it, and the scheduler frees the sequences at its next step.
 *  - request_unref() frees the request when both sides have let go.
 * Every allocation of the immutable part comes from the request's arena and
 * is freed in one go.
 */
#ifndef SASERVE_REQUEST_H
#define SASERVE_REQUEST_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <time.h>

#include "buf.h"
#include "engine.h"
#include "stream.h"

#define REQ_MAX_TOP_LOGPROBS 20

typedef enum { REQ_COMPLETION, REQ_CHAT } req_kind;
typedef enum { REQ_QUEUED = 0, REQ_PREFILL, REQ_DECODE, REQ_FINISHED, REQ_CANCELLED } req_state;

/* ==== Arena ============================================================ */

typedef struct arena_chunk arena_chunk;
typedef struct {
    arena_chunk *head;
} arena;

void *arena_alloc(arena *a, size_t n);        /* zeroed, 16-byte aligned; NULL on OOM */
char *arena_strndup(arena *a, const char *s, size_t n);
void arena_free(arena *a);

/* ==== Events (scheduler -> loop) ======================================= */

typedef enum { EV_TOKEN, EV_FINISH, EV_ERROR } event_type;

typedef struct {
    event_type type;
    int choice;
    bool prompt;            /* EV_TOKEN of the prompt (echo with logprobs) */
    int32_t token;          /* EV_TOKEN */
    float logprob;
    int n_top;
    int32_t top_ids[REQ_MAX_TOP_LOGPROBS];
    float top_lps[REQ_MAX_TOP_LOGPROBS];
    size_t text_off, text_len; /* released text, in the outbox's text buffer */
    const char *finish_reason; /* EV_FINISH: "stop" or "length" */
    int status;             /* EV_ERROR: HTTP status */
    char message[160];      /* EV_ERROR */
} req_event;

typedef struct {
    req_event *ev;
    int n, cap;
    buf text;
} req_outbox;

/* ==== Choices (scheduler-owned) ======================================== */

typedef struct {
    int prompt;         /* index into the request's prompts */
    int seq;            /* engine sequence, -1 when none */
    int32_t *tokens;    /* prompt + generated */
    int n_tokens;
    int n_cached;       /* tokens in the KV cache */
    int n_gen;
    bool waiting_fork;  /* n > 1: waits for the first choice's prompt */
    bool done;
    engine_rng rng;
    textstream ts;
    double t_last_token;
} req_choice;

/* ==== Request ========================================================== */

typedef struct request request;
struct request {
    atomic_int refs;
    arena mem;
    char id[48];           /* "cmpl-..." / "chatcmpl-..." */
    uint64_t num;          /* for log lines */
    req_kind kind;
    const char *model;     /* id echoed in responses */
    long long created;

    /* Parameters (immutable once queued). */
    bool stream, include_usage, echo, ignore_eos;
    bool prompt_logprobs;  /* echo + logprobs: score the prompt's tokens too */
    int max_tokens;
    int n;                 /* choices per prompt */
    int logprobs;          /* -1: none; else top-k count (0 = chosen token only) */
    engine_sampling sampling;
    uint64_t seed;
    const char *stops[STREAM_MAX_STOPS];
    int n_stops;
    int n_prompts;
    int32_t **prompt_tokens;
    int *prompt_len;
    int total_prompt_tokens;

    /* Scheduler-owned. */
    req_choice *choices;
    int n_choices;
    int n_done;
    atomic_int state;
    atomic_bool cancel;
    double t_arrival, t_admitted, t_first_token, deadline;
    bool preempted;
    request *sched_next;   /* scheduler's waiting/running lists */

    /* Outbox, under mu. */
    pthread_mutex_t mu;
    req_outbox out;
    bool ended;            /* last event posted */
    bool in_pending;       /* on a wake queue (under the queue's lock) */
    request *pending_next; /* wake queue link (under the queue's lock) */
    request *wake_next;    /* link of a list req_wakeq_take() returned (taker only) */

    /* Loop-owned. */
    struct MHD_Connection *conn;
    bool suspended;
    bool conn_closed;
    bool loop_done;        /* response complete (all events consumed) */
    buf sse;               /* stream bytes waiting for the socket */
    buf *texts;            /* [n_choices] accumulated text (non-stream) */
    const char **finish;   /* [n_choices] finish reasons */
    struct json_t **lp;    /* [n_choices] logprobs being built (non-stream) */
    int *text_tokens;      /* [n_choices] tokens whose logprobs were added */
    int n_finished_loop;   /* EV_FINISH events seen by the loop */
    int error_status;      /* EV_ERROR seen: its status, else 0 */
    char error_msg[160];
    int completion_tokens;
};

/* Creates a request with one reference (the caller's).  NULL on OOM. */
request *request_new(req_kind kind);
void request_ref(request *r);
void request_unref(request *r);
/* Allocates the choices (after n_prompts and n are set). */
int request_alloc_choices(request *r);

/* Scheduler side: append an event under mu.  text/len is copied. */
void request_post_token(request *r, int choice, int32_t token, float logprob, int n_top, const int32_t *top_ids,
                        const float *top_lps, const char *text, size_t len);
/* A prompt token's logprob (NAN for the first token, which has none). */
void request_post_prompt_token(request *r, int choice, int32_t token, float logprob, int n_top,
                               const int32_t *top_ids, const float *top_lps);
void request_post_finish(request *r, int choice, const char *reason);
void request_post_error(request *r, int status, const char *msg);

/* Loop side: takes the pending events (the caller frees ev/text with
 * request_outbox_free). */
void request_take_outbox(request *r, req_outbox *out);
void request_outbox_free(req_outbox *o);

/* ==== Wake queue (scheduler -> loop) =================================== */

/* Requests with new events for the loop.  The scheduler pushes (any number
 * of times: a request is queued once, holding one reference); the loop
 * takes everything at once and owns the returned list, linked through
 * wake_next, which later pushes never touch (a request is re-queued for its
 * next events while the loop still works through the list it took). */
typedef struct {
    pthread_mutex_t mu;
    request *head;
} req_wakeq;

void req_wakeq_init(req_wakeq *q);
/* Drops the references of whatever is queued (the queue stays usable: the
 * scheduler may still push while the server shuts down). */
void req_wakeq_clear(req_wakeq *q);
/* Any thread.  Returns true if r was not queued (a reference was taken). */
bool req_wakeq_push(req_wakeq *q, request *r);
/* Takes every queued request; the caller walks the list through wake_next
 * and drops one reference per request. */
request *req_wakeq_take(req_wakeq *q);

double now_seconds(void); /* CLOCK_MONOTONIC */

#endif
