/*
 * metrics.h - Prometheus metrics (text format 0.0.4).
 *
 * Counters and histograms are updated from the scheduler and the loop
 * thread: counters are atomics, each histogram has its own lock.  Gauges
 * that describe current state (running, waiting, KV usage) are read at
 * scrape time from a snapshot the caller passes in.
 */
#ifndef SASERVE_METRICS_H
#define SASERVE_METRICS_H

#include <stdint.h>

#include "buf.h"
#include "engine.h"

typedef enum {
    H_TTFT = 0,         /* saserve_time_to_first_token_seconds */
    H_ITL,              /* saserve_inter_token_latency_seconds */
    H_E2E,              /* saserve_e2e_request_latency_seconds */
    H_QUEUE,            /* saserve_request_queue_time_seconds */
    H_ITER_TOKENS,      /* saserve_iteration_tokens */
    H_COUNT
} metrics_hist;

typedef enum { FIN_STOP = 0, FIN_LENGTH, FIN_COUNT } metrics_finish;
typedef enum {
    FAIL_BAD_REQUEST = 0, /* 400 */
    FAIL_UNAUTHORIZED,    /* 401 */
    FAIL_TOO_LARGE,       /* 413 */
    FAIL_QUEUE_FULL,      /* 429 */
    FAIL_UNAVAILABLE,     /* 503 while loading or draining */
    FAIL_TIMEOUT,         /* request_timeout hit */
    FAIL_CANCELLED,       /* client went away */
    FAIL_INTERNAL,        /* 500 */
    FAIL_COUNT
} metrics_failure;

typedef struct metrics metrics;

metrics *metrics_new(void);
void metrics_free(metrics *m);

void metrics_add_prompt_tokens(metrics *m, uint64_t n);
void metrics_add_generation_tokens(metrics *m, uint64_t n);
void metrics_request_success(metrics *m, metrics_finish why);
void metrics_request_failure(metrics *m, metrics_failure why);
void metrics_add_preemption(metrics *m);
void metrics_observe(metrics *m, metrics_hist h, double v);
/* Counts of requests that succeeded, failed (any reason) - for tests. */
uint64_t metrics_success_total(metrics *m);

typedef struct {
    const engine_info *info;
    const char *model_id;
    int running, waiting;
    int kv_used_blocks, kv_total_blocks;
    engine_prefix_stats prefix;
    engine_counters counters;
} metrics_state;

/* Appends the whole exposition to out. */
void metrics_render(metrics *m, const metrics_state *st, buf *out);

#endif
