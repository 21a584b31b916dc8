/*
 * scheduler.c - continuous batching; see scheduler.h.
 *
 * Lists: `waiting` (FIFO; preempted requests are put back at its head) is
 * shared with submitters under mu; `running` is the scheduler's own, in
 * admission order (its tail is the newest, the first to be preempted).
 *
 * A choice's tokens are prompt + generated; n_cached of them are in the KV
 * cache.  A step feeds the uncached ones: exactly one while decoding, many
 * while prefilling or recomputing after preemption.  When a choice's last
 * token has been fed, its logits give the next token.
 */
#include "scheduler.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "metrics.h"

struct scheduler {
    sched_engine eng;
    sched_config cfg;
    metrics *m;
    sched_notify_fn notify;
    void *notify_ud;

    pthread_mutex_t mu;
    pthread_cond_t cv;
    request *wait_head, *wait_tail;
    int n_waiting;
    bool draining, stop, started;
    bool cancel_all; /* sched_cancel_all() asked; the scheduler applies it */
    pthread_t thread;

    request *running; /* admission order */
    int running_seqs, running_reqs;
    uint64_t preemptions;
    int kv_used; /* last seen, for snapshots */

    /* Per-step buffers, sized at creation: the hot path does not allocate. */
    engine_batch_item *items;
    request **item_req;
    int *item_choice;
    request **touched;
    int n_touched;
    void *sample_scratch;
    float *top_lps;
    int32_t *top_ids;
    char piece[256];
    buf released;
};

/* ==== Real engine adapter ============================================== */

static int re_seq_create(void *c) { return engine_seq_create(c); }
static void re_seq_free(void *c, int s) { engine_seq_free(c, s); }
static int re_seq_fork(void *c, int a, int b) { return engine_seq_fork(c, a, b); }
static int re_prefix(void *c, int s, const int32_t *t, int n) { return engine_seq_prefix_attach(c, s, t, n); }
static int re_blocks_needed(void *c, int s, int n) { return engine_seq_blocks_needed(c, s, n); }
static int re_free_blocks(void *c) { return engine_kv_free_blocks(c); }
static int re_used_blocks(void *c) { return engine_kv_used_blocks(c); }
static int re_step(void *c, engine_batch_item *it, int n) { return engine_step(c, it, n); }
static bool re_is_eog(void *c, int32_t t) { return engine_token_is_eog(c, t); }
static int re_token_bytes(void *c, int32_t t, char *b, size_t cap) { return engine_token_bytes(c, t, b, cap); }

sched_engine sched_engine_real(engine *e) {
    const engine_info *in = engine_get_info(e);
    return (sched_engine){.ctx = e, .n_vocab = in->n_vocab, .n_ctx = in->n_ctx,
                          .max_batch_tokens = in->max_batch_tokens, .total_blocks = in->kv_blocks,
                          .seq_create = re_seq_create, .seq_free = re_seq_free, .seq_fork = re_seq_fork,
                          .prefix_attach = re_prefix, .blocks_needed = re_blocks_needed,
                          .free_blocks = re_free_blocks, .used_blocks = re_used_blocks, .step = re_step,
                          .is_eog = re_is_eog, .token_bytes = re_token_bytes};
}

/* ==== Set-up =========================================================== */

scheduler *sched_create(const sched_engine *eng, const sched_config *cfg, metrics *m, sched_notify_fn notify,
                        void *notify_ud) {
    scheduler *s = calloc(1, sizeof *s);
    if (!s) return NULL;
    s->eng = *eng;
    s->cfg = *cfg;
    if (s->cfg.max_batch_tokens <= 0 || s->cfg.max_batch_tokens > eng->max_batch_tokens)
        s->cfg.max_batch_tokens = eng->max_batch_tokens;
    if (s->cfg.max_running < 1) s->cfg.max_running = 1;
    s->m = m;
    s->notify = notify;
    s->notify_ud = notify_ud;
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->cv, NULL);
    /* A batch has at most one item per sequence. */
    int n = s->cfg.max_running;
    s->items = calloc((size_t)n, sizeof *s->items);
    s->item_req = calloc((size_t)n, sizeof *s->item_req);
    s->item_choice = calloc((size_t)n, sizeof *s->item_choice);
    s->touched = calloc((size_t)n + 1, sizeof *s->touched);
    s->sample_scratch = malloc(engine_sample_scratch_bytes(eng->n_vocab));
    s->top_lps = calloc(REQ_MAX_TOP_LOGPROBS, sizeof(float));
    s->top_ids = calloc(REQ_MAX_TOP_LOGPROBS, sizeof(int32_t));
    if (!s->items || !s->item_req || !s->item_choice || !s->touched || !s->sample_scratch || !s->top_lps ||
        !s->top_ids) {
        sched_destroy(s);
        return NULL;
    }
    return s;
}

static void *thread_main(void *arg);

int sched_start(scheduler *s) {
    if (pthread_create(&s->thread, NULL, thread_main, s) != 0) return -1;
    s->started = true;
    return 0;
}

void sched_stop(scheduler *s) {
    if (!s->started) return;
    pthread_mutex_lock(&s->mu);
    s->stop = true;
    pthread_cond_broadcast(&s->cv);
    pthread_mutex_unlock(&s->mu);
    pthread_join(s->thread, NULL);
    s->started = false;
}

static void release_request(scheduler *s, request *r);

void sched_destroy(scheduler *s) {
    if (!s) return;
    sched_stop(s);
    /* Whatever is left is dropped; the loop keeps its own references. */
    while (s->running) {
        request *r = s->running;
        s->running = r->sched_next;
        release_request(s, r);
    }
    while (s->wait_head) {
        request *r = s->wait_head;
        s->wait_head = r->sched_next;
        request_unref(r);
    }
    pthread_mutex_destroy(&s->mu);
    pthread_cond_destroy(&s->cv);
    free(s->items);
    free(s->item_req);
    free(s->item_choice);
    free(s->touched);
    free(s->sample_scratch);
    free(s->top_lps);
    free(s->top_ids);
    buf_free(&s->released);
    free(s);
}

/* ==== Submission (any thread) ========================================== */

int sched_submit(scheduler *s, request *r) {
    pthread_mutex_lock(&s->mu);
    int rc = 0;
    if (s->draining) rc = SCHED_EDRAINING;
    else if (s->n_waiting >= s->cfg.max_queue) rc = SCHED_EFULL;
    if (rc == 0) {
        request_ref(r);
        r->sched_next = NULL;
        if (s->wait_tail) s->wait_tail->sched_next = r; else s->wait_head = r;
        s->wait_tail = r;
        s->n_waiting++;
        pthread_cond_signal(&s->cv);
    }
    pthread_mutex_unlock(&s->mu);
    return rc;
}

void sched_drain(scheduler *s) {
    pthread_mutex_lock(&s->mu);
    s->draining = true;
    pthread_mutex_unlock(&s->mu);
}

void sched_wake(scheduler *s) {
    pthread_mutex_lock(&s->mu);
    pthread_cond_signal(&s->cv);
    pthread_mutex_unlock(&s->mu);
}

void sched_cancel_all(scheduler *s) {
    pthread_mutex_lock(&s->mu);
    for (request *r = s->wait_head; r; r = r->sched_next) atomic_store(&r->cancel, true);
    /* running is the scheduler thread's own list (it links and unlinks
     * without the lock), so it is not walked here: the scheduler flags its
     * running requests itself at the start of its next iteration. */
    s->cancel_all = true;
    pthread_cond_signal(&s->cv);
    pthread_mutex_unlock(&s->mu);
}

void sched_snapshot(scheduler *s, sched_stats *out) {
    pthread_mutex_lock(&s->mu);
    out->running_requests = s->running_reqs;
    out->running_seqs = s->running_seqs;
    out->waiting = s->n_waiting;
    out->kv_used_blocks = s->kv_used;
    out->kv_total_blocks = s->eng.total_blocks;
    out->preemptions = s->preemptions;
    pthread_mutex_unlock(&s->mu);
}

/* ==== Request bookkeeping ============================================== */

static void touch(scheduler *s, request *r) {
    for (int i = 0; i < s->n_touched; i++)
        if (s->touched[i] == r) return;
    if (s->n_touched <= s->cfg.max_running) s->touched[s->n_touched++] = r;
}

static int unfinished_choices(const request *r) { return r->n_choices - r->n_done; }

/* Frees every sequence the request holds. */
static void free_seqs(scheduler *s, request *r) {
    for (int i = 0; i < r->n_choices; i++) {
        req_choice *c = &r->choices[i];
        if (c->seq >= 0) {
            s->eng.seq_free(s->eng.ctx, c->seq);
            c->seq = -1;
        }
    }
}

/* Unlinks r from running (it must be there). */
static void unlink_running(scheduler *s, request *r) {
    request **pp = &s->running;
    while (*pp && *pp != r) pp = &(*pp)->sched_next;
    if (*pp) *pp = r->sched_next;
    r->sched_next = NULL;
    pthread_mutex_lock(&s->mu);
    s->running_reqs--;
    s->running_seqs -= unfinished_choices(r);
    pthread_mutex_unlock(&s->mu);
}

/* Drops the scheduler's reference after freeing the sequences. */
static void release_request(scheduler *s, request *r) {
    free_seqs(s, r);
    request_unref(r);
}

static void finish_choice(scheduler *s, request *r, int ci, const char *reason) {
    req_choice *c = &r->choices[ci];
    if (c->done) return;
    buf_reset(&s->released);
    textstream_finish(&c->ts, &s->released);
    if (s->released.len) request_post_token(r, ci, -1, 0, 0, NULL, NULL, s->released.p, s->released.len);
    c->done = true;
    if (c->seq >= 0) {
        s->eng.seq_free(s->eng.ctx, c->seq);
        c->seq = -1;
    }
    r->n_done++;
    pthread_mutex_lock(&s->mu);
    s->running_seqs--;
    pthread_mutex_unlock(&s->mu);
    request_post_finish(r, ci, reason);
    metrics_request_success(s->m, strcmp(reason, "length") == 0 ? FIN_LENGTH : FIN_STOP);
    touch(s, r);
}

/* Ends a request early: cancelled (the client went away, or shutdown) or
 * failed.  Either way an error event tells the loop, which drops it if the
 * connection is already gone. */
static void abort_request(scheduler *s, request *r, bool running, int status, const char *msg, metrics_failure why) {
    if (running) unlink_running(s, r); /* running_seqs counted its unfinished choices */
    atomic_store(&r->state, why == FAIL_CANCELLED ? REQ_CANCELLED : REQ_FINISHED);
    request_post_error(r, status, msg);
    metrics_request_failure(s->m, why);
    LOG_INFO(r->id, "%s", msg);
    for (int i = 0; i < s->n_touched; i++)
        if (s->touched[i] == r) s->touched[i] = s->touched[--s->n_touched];
    free_seqs(s, r);
    if (s->notify) s->notify(r, s->notify_ud);
    request_unref(r); /* the scheduler's reference: r may be gone now */
}

/* ==== Admission ======================================================== */

/* The last admitted running request: the first to be preempted. */
static request *newest_running(scheduler *s) {
    request *r = s->running;
    while (r && r->sched_next) r = r->sched_next;
    return r;
}

/* Puts r back at the head of the waiting list, freeing its blocks.  Its
 * choices will recompute prompt + generated tokens. */
static void preempt(scheduler *s, request *r) {
    unlink_running(s, r);
    for (int i = 0; i < r->n_choices; i++) {
        req_choice *c = &r->choices[i];
        if (c->seq >= 0) {
            s->eng.seq_free(s->eng.ctx, c->seq);
            c->seq = -1;
        }
        c->n_cached = 0;
        /* A choice that has not forked yet still waits for its leader;
         * one that has generated tokens recomputes its own sequence. */
    }
    atomic_store(&r->state, REQ_QUEUED);
    r->preempted = true;
    pthread_mutex_lock(&s->mu);
    r->sched_next = s->wait_head;
    s->wait_head = r;
    if (!s->wait_tail) s->wait_tail = r;
    s->n_waiting++;
    s->preemptions++;
    pthread_mutex_unlock(&s->mu);
    metrics_add_preemption(s->m);
    LOG_DEBUG(r->id, "preempted: KV cache full");
}

/* A leader is the choice that feeds a prompt; the others of the same prompt
 * fork from it once the prompt is cached.  After preemption every choice
 * with generated tokens leads its own recomputation. */
static bool is_leader(const req_choice *c) { return !c->waiting_fork; }

/* Blocks that admitted requests still need for the tokens they have yet to
 * prefill (prompts, or recomputation after preemption): free blocks are
 * only taken in the step, so without this every request admitted in one
 * pass would count the same free blocks, and the batch would start with
 * more prompts than fit and preempt them again. */
static int pending_prefill_blocks(scheduler *s) {
    int pending = 0;
    for (request *q = s->running; q; q = q->sched_next)
        for (int i = 0; i < q->n_choices; i++) {
            req_choice *c = &q->choices[i];
            int todo = c->n_tokens - c->n_cached;
            if (!c->done && c->seq >= 0 && todo > 1) pending += s->eng.blocks_needed(s->eng.ctx, c->seq, todo);
        }
    return pending;
}

/* Tries to start r: sequences for its leaders, prefix blocks attached.
 * Returns false (and leaves nothing allocated) if it does not fit now. */
static bool try_admit(scheduler *s, request *r) {
    int need_seqs = unfinished_choices(r);
    if (s->running_seqs + need_seqs > s->cfg.max_running) return false;
    int blocks = 0;
    for (int i = 0; i < r->n_choices; i++) {
        req_choice *c = &r->choices[i];
        if (c->done || !is_leader(c)) continue;
        c->seq = s->eng.seq_create(s->eng.ctx);
        if (c->seq < 0) {
            free_seqs(s, r);
            return false;
        }
        /* Scoring the prompt needs its logits: no cached prefix then. */
        c->n_cached = r->prompt_logprobs ? 0 : s->eng.prefix_attach(s->eng.ctx, c->seq, c->tokens, c->n_tokens);
        if (c->n_cached < 0) c->n_cached = 0;
        blocks += s->eng.blocks_needed(s->eng.ctx, c->seq, c->n_tokens - c->n_cached);
    }
    /* Room for the prompt plus one block of growth per sequence; a request
     * that could never fit is admitted alone and fails in the step with a
     * clear error rather than waiting forever. */
    int avail = s->eng.free_blocks(s->eng.ctx) - pending_prefill_blocks(s);
    if (blocks + need_seqs + s->running_seqs > avail && s->running) {
        for (int i = 0; i < r->n_choices; i++) r->choices[i].n_cached = 0;
        free_seqs(s, r);
        return false;
    }
    return true;
}

static void admit(scheduler *s, double now) {
    for (;;) {
        pthread_mutex_lock(&s->mu);
        request *r = s->wait_head;
        pthread_mutex_unlock(&s->mu);
        if (!r) return;
        if (atomic_load(&r->cancel)) {
            pthread_mutex_lock(&s->mu);
            s->wait_head = r->sched_next;
            if (!s->wait_head) s->wait_tail = NULL;
            s->n_waiting--;
            pthread_mutex_unlock(&s->mu);
            abort_request(s, r, false, 499, "cancelled while queued", FAIL_CANCELLED);
            continue;
        }
        if (!try_admit(s, r)) return; /* FIFO: nobody overtakes the head */
        pthread_mutex_lock(&s->mu);
        s->wait_head = r->sched_next;
        if (!s->wait_head) s->wait_tail = NULL;
        s->n_waiting--;
        s->running_reqs++;
        s->running_seqs += unfinished_choices(r);
        pthread_mutex_unlock(&s->mu);
        r->sched_next = NULL;
        request **pp = &s->running;
        while (*pp) pp = &(*pp)->sched_next;
        *pp = r;
        atomic_store(&r->state, REQ_PREFILL);
        if (!r->preempted) {
            r->t_admitted = now;
            metrics_observe(s->m, H_QUEUE, now - r->t_arrival);
            metrics_add_prompt_tokens(s->m, (uint64_t)r->total_prompt_tokens);
        }
    }
}

/* ==== Sampling ========================================================= */

static void sample_choice(scheduler *s, request *r, int ci, const float *logits, double now) {
    req_choice *c = &r->choices[ci];
    int n_vocab = s->eng.n_vocab;
    int32_t *gen = c->tokens + r->prompt_len[c->prompt];
    int32_t tok = engine_sample(logits, n_vocab, &r->sampling, &c->rng, gen, c->n_gen, s->sample_scratch);
    float lp = 0;
    int n_top = 0;
    if (r->logprobs >= 0) {
        lp = engine_logprob(logits, n_vocab, tok);
        n_top = engine_top_logprobs(logits, n_vocab, r->logprobs, s->top_ids, s->top_lps);
    }
    c->tokens[c->n_tokens++] = tok;
    c->n_gen++;
    metrics_add_generation_tokens(s->m, 1);
    if (c->n_gen == 1) {
        if (r->t_first_token == 0) {
            r->t_first_token = now;
            metrics_observe(s->m, H_TTFT, now - r->t_arrival);
        }
    } else {
        metrics_observe(s->m, H_ITL, now - c->t_last_token);
    }
    c->t_last_token = now;
    atomic_store(&r->state, REQ_DECODE);

    bool eog = !r->ignore_eos && s->eng.is_eog(s->eng.ctx, tok);
    bool stopped = false;
    buf_reset(&s->released);
    if (!eog) {
        int l = s->eng.token_bytes(s->eng.ctx, tok, s->piece, sizeof s->piece);
        if (l > (int)sizeof s->piece) l = (int)sizeof s->piece;
        if (l > 0) stopped = textstream_feed(&c->ts, s->piece, (size_t)l, &s->released);
    }
    request_post_token(r, ci, tok, lp, n_top, s->top_ids, s->top_lps, s->released.p ? s->released.p : "",
                       s->released.len);
    touch(s, r);
    if (eog || stopped) finish_choice(s, r, ci, "stop");
    else if (c->n_gen >= r->max_tokens || c->n_tokens >= s->eng.n_ctx) finish_choice(s, r, ci, "length");
}

/* echo + logprobs: the logprob of each prompt token given the ones before
 * it, posted to every choice of that prompt.  Row t of the chunk predicts the
 * token at position n_cached + t + 1. */
static void score_prompt(scheduler *s, request *r, const req_choice *c, const engine_batch_item *it) {
    int plen = r->prompt_len[c->prompt];
    int n_vocab = s->eng.n_vocab;
    for (int ci = 0; ci < r->n_choices; ci++) {
        if (r->choices[ci].prompt != c->prompt) continue;
        if (c->n_cached == 0) request_post_prompt_token(r, ci, c->tokens[0], NAN, 0, NULL, NULL);
        for (int t = 0; t < it->n_tokens; t++) {
            int pos = c->n_cached + t + 1;
            if (pos >= plen) break;
            const float *lg = it->logits + (size_t)t * (size_t)n_vocab;
            int n_top = engine_top_logprobs(lg, n_vocab, r->logprobs, s->top_ids, s->top_lps);
            request_post_prompt_token(r, ci, c->tokens[pos], engine_logprob(lg, n_vocab, c->tokens[pos]), n_top,
                                      s->top_ids, s->top_lps);
        }
        touch(s, r);
    }
}

/* The leader of a prompt has just been prefilled: give each waiting sibling
 * a sequence that shares its blocks. */
static void fork_siblings(scheduler *s, request *r, int leader) {
    req_choice *L = &r->choices[leader];
    for (int i = 0; i < r->n_choices; i++) {
        req_choice *c = &r->choices[i];
        if (i == leader || c->prompt != L->prompt || !c->waiting_fork || c->done) continue;
        c->seq = s->eng.seq_create(s->eng.ctx);
        if (c->seq < 0 || s->eng.seq_fork(s->eng.ctx, L->seq, c->seq) != 0) {
            if (c->seq >= 0) s->eng.seq_free(s->eng.ctx, c->seq);
            c->seq = -1;
            continue; /* stays waiting: recomputed as its own leader below */
        }
        c->waiting_fork = false;
        c->n_cached = L->n_cached;
    }
}

/* ==== One iteration ==================================================== */


/* KV usage for snapshots, which other threads take under mu. */
static void set_kv_used(scheduler *s) {
    int used = s->eng.used_blocks(s->eng.ctx);
    pthread_mutex_lock(&s->mu);
    s->kv_used = used;
    pthread_mutex_unlock(&s->mu);
}

/* Every exit of an iteration: the KV gauge, then each touched request hears
 * about its new events, and finished ones are released. */
static int end_iteration(scheduler *s, int tokens) {
    set_kv_used(s);
    for (int i = 0; i < s->n_touched; i++) {
        request *r = s->touched[i];
        if (s->notify) s->notify(r, s->notify_ud);
        if (atomic_load(&r->state) == REQ_FINISHED) release_request(s, r);
    }
    s->n_touched = 0;
    return tokens;
}

int sched_iterate(scheduler *s) {
    double now = now_seconds();
    s->n_touched = 0;

    /* 1. Cancellations and timeouts. */
    pthread_mutex_lock(&s->mu);
    bool cancel_all = s->cancel_all;
    s->cancel_all = false;
    pthread_mutex_unlock(&s->mu);
    if (cancel_all)
        for (request *r = s->running; r; r = r->sched_next) atomic_store(&r->cancel, true);
    for (request *r = s->running, *next; r; r = next) {
        next = r->sched_next;
        if (atomic_load(&r->cancel)) abort_request(s, r, true, 499, "cancelled", FAIL_CANCELLED);
        else if (s->cfg.request_timeout > 0 && now - r->t_arrival > s->cfg.request_timeout)
            abort_request(s, r, true, 408, "request timed out", FAIL_TIMEOUT);
    }
    pthread_mutex_lock(&s->mu);
    request *timed_out = NULL;
    if (s->cfg.request_timeout > 0 && s->wait_head && now - s->wait_head->t_arrival > s->cfg.request_timeout) {
        timed_out = s->wait_head;
        s->wait_head = timed_out->sched_next;
        if (!s->wait_head) s->wait_tail = NULL;
        s->n_waiting--;
    }
    pthread_mutex_unlock(&s->mu);
    if (timed_out) abort_request(s, timed_out, false, 408, "request timed out in the queue", FAIL_TIMEOUT);

    /* 2. Admission. */
    admit(s, now);

    /* Siblings whose leader finished prefill but could not fork lead
     * their own recomputation. */
    for (request *r = s->running; r; r = r->sched_next)
        for (int i = 0; i < r->n_choices; i++) {
            req_choice *c = &r->choices[i];
            if (c->waiting_fork && !c->done) {
                const req_choice *L = &r->choices[c->prompt * r->n];
                if (L->done || (L->n_cached >= r->prompt_len[c->prompt] && L->seq >= 0)) {
                    c->seq = s->eng.seq_create(s->eng.ctx);
                    if (c->seq >= 0) {
                        c->waiting_fork = false;
                        c->n_cached = s->eng.prefix_attach(s->eng.ctx, c->seq, c->tokens, c->n_tokens);
                        if (c->n_cached < 0) c->n_cached = 0;
                    }
                }
            }
        }

    /* 3. The batch: decode tokens first. */
    int n_items = 0, budget = s->cfg.max_batch_tokens;
    for (;;) {
        int need = 0;
        for (request *r = s->running; r; r = r->sched_next)
            for (int i = 0; i < r->n_choices; i++) {
                req_choice *c = &r->choices[i];
                if (c->done || c->seq < 0 || c->n_tokens - c->n_cached != 1 || c->n_cached < r->prompt_len[c->prompt])
                    continue;
                need += s->eng.blocks_needed(s->eng.ctx, c->seq, 1);
            }
        if (need <= s->eng.free_blocks(s->eng.ctx) || !s->running || !s->running->sched_next) break;
        preempt(s, newest_running(s)); /* and try again */
    }
    /* The batch as a whole must fit the free blocks, not each item on its
     * own: reserved counts what the items taken so far will claim (blocks
     * are only taken in the step, so the free count does not move here). */
    int free_blocks = s->eng.free_blocks(s->eng.ctx), reserved = 0;
    for (request *r = s->running; r && budget > 0; r = r->sched_next)
        for (int i = 0; i < r->n_choices && budget > 0; i++) {
            req_choice *c = &r->choices[i];
            if (c->done || c->seq < 0 || c->n_tokens - c->n_cached != 1 || c->n_cached < r->prompt_len[c->prompt])
                continue;
            int nb = s->eng.blocks_needed(s->eng.ctx, c->seq, 1);
            if (reserved + nb > free_blocks) continue;
            reserved += nb;
            s->items[n_items] = (engine_batch_item){.seq = c->seq, .tokens = c->tokens + c->n_cached, .n_tokens = 1};
            s->item_req[n_items] = r;
            s->item_choice[n_items] = i;
            n_items++;
            budget--;
        }
    /* Then prompt (and recomputation) chunks, oldest request first.  A
     * chunk never crosses the end of the prompt, so prompt tokens always go
     * through the prompt kernels and generated ones through the decode
     * kernels: a token's numbers do not depend on how it was batched. */
    for (request *r = s->running; r && budget > 0; r = r->sched_next)
        for (int i = 0; i < r->n_choices && budget > 0 && n_items < s->cfg.max_running; i++) {
            req_choice *c = &r->choices[i];
            int todo = c->n_tokens - c->n_cached;
            int plen = r->prompt_len[c->prompt];
            if (c->done || c->seq < 0 || todo <= 0) continue;
            if (todo == 1 && c->n_cached >= plen) continue; /* a decode token, handled above */
            bool in_prompt = c->n_cached < plen;
            int chunk = todo < budget ? todo : budget;
            if (in_prompt && c->n_cached + chunk > plen) chunk = plen - c->n_cached;
            if (!in_prompt && chunk == todo) chunk = todo - 1; /* the last token is fed as a decode token */
            if (chunk <= 0) continue;
            while (chunk > 0 && s->eng.blocks_needed(s->eng.ctx, c->seq, chunk) > free_blocks - reserved) chunk /= 2;
            if (chunk <= 0) continue;
            reserved += s->eng.blocks_needed(s->eng.ctx, c->seq, chunk);
            s->items[n_items] = (engine_batch_item){.seq = c->seq, .tokens = c->tokens + c->n_cached,
                                                    .n_tokens = chunk, .prompt = in_prompt,
                                                    .all_logits = in_prompt && r->prompt_logprobs && c->n_gen == 0};
            s->item_req[n_items] = r;
            s->item_choice[n_items] = i;
            n_items++;
            budget -= chunk;
        }

    if (n_items == 0) {
        /* Running requests that can make no progress at all: the cache is
         * too small for them even alone. */
        if (s->running && !s->running->sched_next) {
            request *r = s->running;
            bool stuck = true;
            for (int i = 0; i < r->n_choices; i++)
                if (!r->choices[i].done && r->choices[i].waiting_fork) stuck = false;
            if (stuck)
                abort_request(s, r, true, 400, "the request needs more KV cache than the server has", FAIL_BAD_REQUEST);
        }
        return end_iteration(s, 0);
    }

    /* 4. One forward pass. */
    int rc = s->eng.step(s->eng.ctx, s->items, n_items);
    now = now_seconds();
    int tokens = 0;
    for (int k = 0; k < n_items; k++) tokens += s->items[k].n_tokens;
    if (rc == ENGINE_ENOKV && s->running && s->running->sched_next) {
        /* The engine changed nothing.  The batch is sized from the block
         * counts, so this should not happen; if it does, make room as for a
         * decode token rather than failing every request in the batch. */
        LOG_WARN(NULL, "engine step: KV cache full after all; preempting the newest request");
        preempt(s, newest_running(s));
        return end_iteration(s, 0);
    }
    if (rc != 0) {
        LOG_ERROR(NULL, "engine step failed: %s", engine_strerror(rc));
        /* Each request once, even with several items in the batch. */
        for (int k = 0; k < n_items; k++) {
            request *r = s->item_req[k];
            bool seen = false;
            for (int j = 0; j < k; j++) seen |= s->item_req[j] == r;
            if (!seen) s->item_req[k] = r; else s->item_req[k] = NULL;
        }
        for (int k = 0; k < n_items; k++)
            if (s->item_req[k]) abort_request(s, s->item_req[k], true, 500, "internal error in the engine step", FAIL_INTERNAL);
        return end_iteration(s, 0);
    }
    metrics_observe(s->m, H_ITER_TOKENS, tokens);

    /* 5. Advance, fork, sample. */
    for (int k = 0; k < n_items; k++) {
        request *r = s->item_req[k];
        req_choice *c = &r->choices[s->item_choice[k]];
        if (s->items[k].all_logits) score_prompt(s, r, c, &s->items[k]);
        c->n_cached += s->items[k].n_tokens;
        if (s->items[k].all_logits) /* sampling below reads the last row */
            s->items[k].logits += (size_t)(s->items[k].n_tokens - 1) * (size_t)s->eng.n_vocab;
        if (c->n_cached < c->n_tokens) continue;
        int ci = s->item_choice[k];
        if (r->n > 1 && c->n_gen == 0) {
            fork_siblings(s, r, ci);
            for (int j = 0; j < r->n_choices; j++) {
                req_choice *sib = &r->choices[j];
                if (j != ci && sib->prompt == c->prompt && !sib->waiting_fork && sib->n_gen == 0 && !sib->done &&
                    sib->n_cached == sib->n_tokens)
                    sample_choice(s, r, j, s->items[k].logits, now);
            }
        }
        sample_choice(s, r, ci, s->items[k].logits, now);
    }

    /* 6. Finished requests leave; everyone touched hears about it. */
    for (request *r = s->running, *next; r; r = next) {
        next = r->sched_next;
        if (r->n_done == r->n_choices) {
            unlink_running(s, r);
            atomic_store(&r->state, REQ_FINISHED);
            metrics_observe(s->m, H_E2E, now - r->t_arrival);
            touch(s, r);
        }
    }
    return end_iteration(s, tokens);
}

static void *thread_main(void *arg) {
    scheduler *s = arg;
    for (;;) {
        pthread_mutex_lock(&s->mu);
        while (!s->stop && !s->running && !s->wait_head) pthread_cond_wait(&s->cv, &s->mu);
        bool stop = s->stop;
        pthread_mutex_unlock(&s->mu);
        if (stop) break;
        int did = sched_iterate(s);
        if (did == 0) {
            /* Nothing could run (waiting for blocks or forks): sleep briefly
             * or until woken, so timeouts and cancellations are still seen. */
            pthread_mutex_lock(&s->mu);
            if (!s->stop) {
                struct timespec ts;
                clock_gettime(CLOCK_REALTIME, &ts);
                ts.tv_nsec += 20 * 1000 * 1000;
                if (ts.tv_nsec >= 1000000000) {
                    ts.tv_sec++;
                    ts.tv_nsec -= 1000000000;
                }
                pthread_cond_timedwait(&s->cv, &s->mu, &ts);
            }
            pthread_mutex_unlock(&s->mu);
        }
    }
    return NULL;
}
