/*
 * scheduler.h - continuous batching on its own thread.
 *
 * Requests wait in one bounded FIFO (the admission queue).  Each iteration
 * the scheduler:
 *   1. drops cancelled and timed-out requests (their sequences and KV blocks
 *      are freed at once);
 *   2. admits waiting requests in order while sequences and KV blocks allow
 *      (prefix-cached blocks are attached first, so only the rest counts);
 *   3. builds one batch: a decode token for every running choice first, then
 *      prompt chunks up to max_batch_tokens.  When a decode token needs a KV
 *      block and none is free, the newest request is preempted: its blocks
 *      are freed and it goes back to the front of the queue, to be recomputed
 *      later (prompt and already generated tokens; nothing is re-sent);
 *   4. runs the batch as one engine step, samples, and posts each choice's
 *      events to its request, then calls on_events so the HTTP loop wakes.
 *
 * The engine is reached through sched_engine so that tests can run the
 * scheduler against a deterministic fake.  Threads: sched_submit(),
 * sched_cancel_all(), sched_snapshot() are safe from any thread; the rest
 * belongs to whoever created the scheduler.
 */
#ifndef SASERVE_SCHEDULER_H
#define SASERVE_SCHEDULER_H

#include <pthread.h>
#include <stdbool.h>

#include "engine.h"
#include "request.h"

struct metrics;

typedef struct {
    void *ctx;
    int n_vocab, n_ctx, max_batch_tokens, total_blocks;
    int (*seq_create)(void *ctx);
    void (*seq_free)(void *ctx, int seq);
    int (*seq_fork)(void *ctx, int src, int dst);
    int (*prefix_attach)(void *ctx, int seq, const int32_t *tokens, int n);
    int (*blocks_needed)(void *ctx, int seq, int n);
    int (*free_blocks)(void *ctx);
    int (*used_blocks)(void *ctx);
    int (*step)(void *ctx, engine_batch_item *items, int n);
    bool (*is_eog)(void *ctx, int32_t token);
    int (*token_bytes)(void *ctx, int32_t token, char *buf, size_t cap);
} sched_engine;

/* Wraps a real engine. */
sched_engine sched_engine_real(engine *e);

typedef struct {
    int max_running;      /* sequences in the batch at once */
    int max_queue;        /* waiting requests; beyond: SCHED_EFULL */
    int max_batch_tokens; /* tokens per step (<= the engine's) */
    double request_timeout; /* seconds; 0 = none */
} sched_config;

typedef void (*sched_notify_fn)(request *r, void *ud);

typedef struct scheduler scheduler;

enum { SCHED_EFULL = -1, SCHED_EDRAINING = -2 };

scheduler *sched_create(const sched_engine *eng, const sched_config *cfg, struct metrics *m, sched_notify_fn notify,
                        void *notify_ud);
void sched_destroy(scheduler *s); /* stops the thread first */

/* Starts the scheduler thread. */
int sched_start(scheduler *s);
/* Stops the thread after the current iteration; pending requests stay. */
void sched_stop(scheduler *s);

/* Queues r (takes a reference).  Returns 0, SCHED_EFULL when max_queue
 * requests already wait, or SCHED_EDRAINING after sched_drain(). */
int sched_submit(scheduler *s, request *r);
/* Refuses new requests from now on. */
void sched_drain(scheduler *s);
/* Marks every queued and running request cancelled. */
void sched_cancel_all(scheduler *s);
/* Wakes the scheduler (after setting a request's cancel flag). */
void sched_wake(scheduler *s);

typedef struct {
    int running_requests, running_seqs, waiting;
    int kv_used_blocks, kv_total_blocks;
    uint64_t preemptions;
} sched_stats;
void sched_snapshot(scheduler *s, sched_stats *out);

/* One iteration on the caller's thread (tests): returns the number of tokens
 * the engine processed (0 when idle). */
int sched_iterate(scheduler *s);

#endif
