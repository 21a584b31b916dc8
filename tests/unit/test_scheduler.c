/*
 * test_scheduler.c - the batching scheduler against a deterministic fake
 * engine: admission order, chunking, decode-first batches, preemption and
 * recomputation, cancellation, prefix reuse, forks for n > 1, queue limits.
 *
 * The fake's "model" makes the next token a pure function of the sequence's
 * tokens, so a request's output must not depend on how it was scheduled.
 */
#include <check.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "scheduler.h"

#define V 50
#define BT 4 /* tokens per block */
#define MAXS 16
#define MAXT 256

typedef struct {
    bool active;
    int32_t tok[MAXT];
    int n;      /* tokens "cached" */
    int blocks; /* blocks held (shared prefix blocks count for each holder) */
    int shared_blocks; /* of those, attached from the prefix cache */
} fake_seq;

typedef struct {
    int total_blocks, used;
    fake_seq seq[MAXS];
    /* Prefix cache: prompts of freed sequences (whole blocks). */
    int32_t cached[8][MAXT];
    int cached_n[8], n_cached;
    int prefix_hits; /* tokens */
    /* Recorded batches. */
    int steps;
    int batch_sizes[512];
    int batch_tokens[512];
    int first_item_seq[512];
    bool first_item_prompt[512];
    int forks;
    float logits[MAXS][V];
} fake;

static fake F;

static int f_seq_create(void *c) {
    (void)c;
    for (int i = 0; i < MAXS; i++)
        if (!F.seq[i].active) {
            memset(&F.seq[i], 0, sizeof F.seq[i]);
            F.seq[i].active = true;
            return i;
        }
    return -1;
}

static void f_seq_free(void *c, int s) {
    (void)c;
    fake_seq *q = &F.seq[s];
    if (!q->active) return;
    F.used -= q->blocks - q->shared_blocks;
    int full = q->n / BT * BT;
    if (full > 0 && F.n_cached < 8) {
        memcpy(F.cached[F.n_cached], q->tok, (size_t)full * sizeof(int32_t));
        F.cached_n[F.n_cached++] = full;
    }
    q->active = false;
}

static int f_fork(void *c, int a, int b) {
    (void)c;
    F.seq[b] = F.seq[a];
    F.seq[b].active = true;
    F.forks++;
    /* Full blocks shared, the partial one copied. */
    int partial = F.seq[a].n % BT ? 1 : 0;
    F.seq[b].shared_blocks = F.seq[a].blocks - partial;
    F.used += partial;
    return 0;
}

static int f_prefix(void *c, int s, const int32_t *t, int n) {
    (void)c;
    int best = 0;
    for (int k = 0; k < F.n_cached; k++) {
        int m = 0;
        while (m < F.cached_n[k] && m < n - 1 && F.cached[k][m] == t[m]) m++;
        m = m / BT * BT;
        if (m > best) best = m;
    }
    fake_seq *q = &F.seq[s];
    memcpy(q->tok, t, (size_t)best * sizeof(int32_t));
    q->n = best;
    q->blocks = q->shared_blocks = best / BT;
    F.prefix_hits += best;
    return best;
}

static int f_needed(void *c, int s, int n) {
    (void)c;
    int want = (F.seq[s].n + n + BT - 1) / BT;
    return want > F.seq[s].blocks ? want - F.seq[s].blocks : 0;
}

static int f_free(void *c) {
    (void)c;
    return F.total_blocks - F.used;
}

static int f_used(void *c) {
    (void)c;
    return F.used;
}

/* Next token: a hash of the whole sequence, never 0 (EOS). */
static int32_t next_of(const int32_t *t, int n) {
    uint32_t h = 7;
    for (int i = 0; i < n; i++) h = h * 31 + (uint32_t)t[i];
    return (int32_t)(1 + h % (V - 1));
}

static int f_step(void *c, engine_batch_item *it, int n) {
    (void)c;
    int need = 0, tokens = 0;
    for (int i = 0; i < n; i++) need += f_needed(NULL, it[i].seq, it[i].n_tokens), tokens += it[i].n_tokens;
    ck_assert_int_le(need, f_free(NULL)); /* the scheduler checks blocks first */
    if (F.steps < 512) {
        F.batch_sizes[F.steps] = n;
        F.batch_tokens[F.steps] = tokens;
        F.first_item_seq[F.steps] = it[0].seq;
        F.first_item_prompt[F.steps] = it[0].prompt;
    }
    F.steps++;
    for (int i = 0; i < n; i++) {
        fake_seq *q = &F.seq[it[i].seq];
        ck_assert(q->active);
        int nb = f_needed(NULL, it[i].seq, it[i].n_tokens);
        q->blocks += nb;
        F.used += nb;
        memcpy(q->tok + q->n, it[i].tokens, (size_t)it[i].n_tokens * sizeof(int32_t));
        q->n += it[i].n_tokens;
        float *lg = F.logits[it[i].seq];
        for (int v = 0; v < V; v++) lg[v] = 0;
        lg[next_of(q->tok, q->n)] = 10;
        it[i].logits = lg;
    }
    return 0;
}

static bool f_eog(void *c, int32_t t) {
    (void)c;
    return t == 0;
}

static int f_bytes(void *c, int32_t t, char *b, size_t cap) {
    (void)c;
    if (cap > 0) b[0] = (char)('a' + t % 26);
    return 1;
}

static sched_engine fake_engine(int total_blocks, int max_batch) {
    memset(&F, 0, sizeof F);
    F.total_blocks = total_blocks;
    return (sched_engine){.ctx = &F, .n_vocab = V, .n_ctx = MAXT, .max_batch_tokens = max_batch,
                          .total_blocks = total_blocks, .seq_create = f_seq_create, .seq_free = f_seq_free,
                          .seq_fork = f_fork, .prefix_attach = f_prefix, .blocks_needed = f_needed,
                          .free_blocks = f_free, .used_blocks = f_used, .step = f_step, .is_eog = f_eog,
                          .token_bytes = f_bytes};
}

static request *make_req(int prompt_len, int first_tok, int max_tokens, int n) {
    request *r = request_new(REQ_COMPLETION);
    r->n = n;
    r->max_tokens = max_tokens;
    r->sampling.temperature = 0;
    r->n_prompts = 1;
    r->prompt_tokens = arena_alloc(&r->mem, sizeof *r->prompt_tokens);
    r->prompt_len = arena_alloc(&r->mem, sizeof *r->prompt_len);
    r->prompt_tokens[0] = arena_alloc(&r->mem, (size_t)prompt_len * sizeof(int32_t));
    for (int i = 0; i < prompt_len; i++) r->prompt_tokens[0][i] = (int32_t)(1 + (first_tok + i) % (V - 1));
    r->prompt_len[0] = prompt_len;
    r->total_prompt_tokens = prompt_len;
    ck_assert_int_eq(request_alloc_choices(r), 0);
    return r;
}

/* The tokens a request must produce, computed without any scheduler. */
static void expected(const request *r, int ci, int32_t *out, int n) {
    int32_t seq[MAXT];
    int len = r->prompt_len[0];
    memcpy(seq, r->prompt_tokens[0], (size_t)len * sizeof(int32_t));
    for (int i = 0; i < n; i++) {
        out[i] = next_of(seq, len);
        seq[len++] = out[i];
    }
    (void)ci;
}

static int run_until_idle(scheduler *s, int max_iter) {
    int it = 0;
    sched_stats st;
    do {
        sched_iterate(s);
        sched_snapshot(s, &st);
    } while ((st.running_requests || st.waiting) && ++it < max_iter);
    return it;
}

/* Collects a choice's generated tokens from the outbox. */
static int outbox_tokens(request *r, int ci, int32_t *out, int cap, const char **finish, bool *error) {
    req_outbox o;
    request_take_outbox(r, &o);
    int n = 0;
    *error = false;
    for (int i = 0; i < o.n; i++) {
        if (o.ev[i].type == EV_ERROR) *error = true;
        if (o.ev[i].choice != ci) continue;
        if (o.ev[i].type == EV_TOKEN && o.ev[i].token >= 0 && n < cap) out[n++] = o.ev[i].token;
        if (o.ev[i].type == EV_FINISH) *finish = o.ev[i].finish_reason;
    }
    request_outbox_free(&o);
    return n;
}

static void check_output(request *r, int ci, int want_n) {
    int32_t got[MAXT], want[MAXT];
    const char *fin = NULL;
    bool err;
    int n = outbox_tokens(r, ci, got, MAXT, &fin, &err);
    ck_assert(!err);
    ck_assert_int_eq(n, want_n);
    expected(r, ci, want, want_n);
    for (int i = 0; i < n; i++) ck_assert_int_eq(got[i], want[i]);
    ck_assert_str_eq(fin, "length");
}

START_TEST(test_fifo_admission) {
    sched_engine e = fake_engine(100, 64);
    sched_config cfg = {.max_running = 1, .max_queue = 8, .max_batch_tokens = 64};
    scheduler *s = sched_create(&e, &cfg, NULL, NULL, NULL);
    request *r[3];
    for (int i = 0; i < 3; i++) {
        r[i] = make_req(5, 10 * i, 3, 1);
        ck_assert_int_eq(sched_submit(s, r[i]), 0);
    }
    sched_iterate(s);
    ck_assert_int_eq(atomic_load(&r[0]->state), REQ_DECODE);
    ck_assert_int_eq(atomic_load(&r[1]->state), REQ_QUEUED);
    run_until_idle(s, 100);
    /* One at a time: each request's prompt step starts after the previous
     * request's last decode step, and outputs are right. */
    for (int i = 0; i < 3; i++) check_output(r[i], 0, 3);
    ck_assert_int_eq(F.steps, 9); /* (1 prompt + 2 decode) x 3 */
    for (int i = 0; i < 9; i++) ck_assert_int_eq(F.batch_sizes[i], 1);
    sched_destroy(s);
    for (int i = 0; i < 3; i++) request_unref(r[i]);
}
END_TEST

START_TEST(test_chunking_decode_first) {
    sched_engine e = fake_engine(100, 8);
    sched_config cfg = {.max_running = 4, .max_queue = 8, .max_batch_tokens = 8};
    scheduler *s = sched_create(&e, &cfg, NULL, NULL, NULL);
    request *a = make_req(3, 1, 10, 1);
    sched_submit(s, a);
    sched_iterate(s); /* a's prompt */
    request *b = make_req(20, 5, 2, 1);
    sched_submit(s, b);
    sched_iterate(s);
    /* a decodes (1 token, first item) and b's prompt takes the other 7. */
    ck_assert_int_eq(F.batch_sizes[1], 2);
    ck_assert_int_eq(F.batch_tokens[1], 8);
    ck_assert(!F.first_item_prompt[1]);
    sched_iterate(s);
    ck_assert_int_eq(F.batch_tokens[2], 8);
    sched_iterate(s);
    ck_assert_int_eq(F.batch_tokens[3], 7); /* 1 + the last 6 of b's 20 */
    run_until_idle(s, 100);
    check_output(a, 0, 10);
    check_output(b, 0, 2);
    sched_destroy(s);
    request_unref(a);
    request_unref(b);
}
END_TEST

START_TEST(test_preemption_recompute) {
    /* 12 blocks of 4 tokens: two requests of 8 + 30 tokens cannot both fit. */
    sched_engine e = fake_engine(12, 64);
    sched_config cfg = {.max_running = 4, .max_queue = 8, .max_batch_tokens = 64};
    scheduler *s = sched_create(&e, &cfg, NULL, NULL, NULL);
    request *a = make_req(8, 1, 30, 1), *b = make_req(8, 20, 30, 1);
    sched_submit(s, a);
    sched_submit(s, b);
    run_until_idle(s, 500);
    sched_stats st;
    sched_snapshot(s, &st);
    ck_assert_int_gt(st.preemptions, 0);
    /* Both complete with exactly the tokens they would produce alone. */
    check_output(a, 0, 30);
    check_output(b, 0, 30);
    ck_assert_int_eq(F.used, 0);
    sched_destroy(s);
    request_unref(a);
    request_unref(b);
}
END_TEST

/* A small pool under mixed load: every batch must fit the free blocks as a
 * whole (decode tokens and prompt chunks together; f_step asserts it), and
 * every request still gets exactly its own tokens. */
START_TEST(test_batch_fits_pool) {
    sched_engine e = fake_engine(12, 64);
    sched_config cfg = {.max_running = 6, .max_queue = 8, .max_batch_tokens = 64};
    scheduler *s = sched_create(&e, &cfg, NULL, NULL, NULL);
    static const int plen[6] = {3, 5, 7, 9, 6, 10};
    request *r[6];
    for (int i = 0; i < 6; i++) sched_submit(s, r[i] = make_req(plen[i], 7 * i + 1, 14, 1));
    run_until_idle(s, 2000);
    for (int i = 0; i < 6; i++) check_output(r[i], 0, 14);
    ck_assert_int_eq(F.used, 0);
    sched_destroy(s);
    for (int i = 0; i < 6; i++) request_unref(r[i]);
}
END_TEST

/* Admission counts the blocks that admitted prompts have yet to fill: four
 * 16-token prompts (4 blocks each, plus one of growth) and 12 free blocks:
 * the first pass admits two, not all four (each alone would fit). */
START_TEST(test_admission_reserves_prompts) {
    sched_engine e = fake_engine(12, 8);
    sched_config cfg = {.max_running = 8, .max_queue = 8, .max_batch_tokens = 8};
    scheduler *s = sched_create(&e, &cfg, NULL, NULL, NULL);
    request *r[4];
    for (int i = 0; i < 4; i++) sched_submit(s, r[i] = make_req(16, 9 * i + 2, 6, 1));
    sched_iterate(s);
    sched_stats st;
    sched_snapshot(s, &st);
    ck_assert_int_eq(st.running_requests, 2);
    run_until_idle(s, 2000);
    for (int i = 0; i < 4; i++) check_output(r[i], 0, 6);
    sched_snapshot(s, &st);
    ck_assert_int_eq((int)st.preemptions, 0);
    ck_assert_int_eq(F.used, 0);
    sched_destroy(s);
    for (int i = 0; i < 4; i++) request_unref(r[i]);
}
END_TEST

START_TEST(test_cancel_frees) {
    sched_engine e = fake_engine(100, 64);
    sched_config cfg = {.max_running = 4, .max_queue = 8, .max_batch_tokens = 64};
    scheduler *s = sched_create(&e, &cfg, NULL, NULL, NULL);
    request *a = make_req(10, 1, 100, 1), *b = make_req(10, 3, 100, 1);
    sched_submit(s, a);
    sched_submit(s, b);
    sched_iterate(s);
    sched_iterate(s);
    ck_assert_int_gt(F.used, 0);
    atomic_store(&a->cancel, true);
    atomic_store(&b->cancel, true);
    sched_iterate(s);
    ck_assert_int_eq(F.used, 0);
    sched_stats st;
    sched_snapshot(s, &st);
    ck_assert_int_eq(st.running_requests, 0);
    ck_assert_int_eq(st.running_seqs, 0);
    ck_assert_int_eq(atomic_load(&a->state), REQ_CANCELLED);
    for (int i = 0; i < MAXS; i++) ck_assert(!F.seq[i].active);
    sched_destroy(s);
    request_unref(a);
    request_unref(b);
}
END_TEST

START_TEST(test_prefix_reuse) {
    sched_engine e = fake_engine(100, 64);
    sched_config cfg = {.max_running = 4, .max_queue = 8, .max_batch_tokens = 64};
    scheduler *s = sched_create(&e, &cfg, NULL, NULL, NULL);
    request *a = make_req(18, 1, 2, 1);
    sched_submit(s, a);
    run_until_idle(s, 50);
    int tokens_a = F.batch_tokens[0];
    ck_assert_int_eq(tokens_a, 18);
    ck_assert_int_eq(F.prefix_hits, 0);
    request *b = make_req(18, 1, 2, 1); /* same prompt */
    sched_submit(s, b);
    int before = F.steps;
    run_until_idle(s, 50);
    ck_assert_int_eq(F.prefix_hits, 16);       /* 4 full blocks of the 18 */
    ck_assert_int_eq(F.batch_tokens[before], 2); /* only the rest is computed */
    check_output(a, 0, 2);
    check_output(b, 0, 2);
    sched_destroy(s);
    request_unref(a);
    request_unref(b);
}
END_TEST

START_TEST(test_n_choices_fork) {
    sched_engine e = fake_engine(100, 64);
    sched_config cfg = {.max_running = 4, .max_queue = 8, .max_batch_tokens = 64};
    scheduler *s = sched_create(&e, &cfg, NULL, NULL, NULL);
    request *a = make_req(9, 1, 4, 3);
    sched_submit(s, a);
    sched_iterate(s);
    ck_assert_int_eq(F.batch_tokens[0], 9); /* the prompt once */
    ck_assert_int_eq(F.forks, 2);
    run_until_idle(s, 50);
    /* Greedy: three identical choices. */
    req_outbox o;
    request_take_outbox(a, &o);
    int per[3] = {0};
    for (int i = 0; i < o.n; i++)
        if (o.ev[i].type == EV_TOKEN && o.ev[i].token >= 0) per[o.ev[i].choice]++;
    request_outbox_free(&o);
    for (int i = 0; i < 3; i++) ck_assert_int_eq(per[i], 4);
    ck_assert_int_eq(F.used, 0);
    sched_destroy(s);
    request_unref(a);
}
END_TEST

START_TEST(test_queue_full_draining) {
    sched_engine e = fake_engine(100, 64);
    sched_config cfg = {.max_running = 1, .max_queue = 2, .max_batch_tokens = 64};
    scheduler *s = sched_create(&e, &cfg, NULL, NULL, NULL);
    request *r[4];
    for (int i = 0; i < 4; i++) r[i] = make_req(4, i, 2, 1);
    ck_assert_int_eq(sched_submit(s, r[0]), 0);
    ck_assert_int_eq(sched_submit(s, r[1]), 0);
    ck_assert_int_eq(sched_submit(s, r[2]), SCHED_EFULL);
    sched_iterate(s); /* r0 admitted: room for one more */
    ck_assert_int_eq(sched_submit(s, r[2]), 0);
    sched_drain(s);
    ck_assert_int_eq(sched_submit(s, r[3]), SCHED_EDRAINING);
    run_until_idle(s, 100);
    for (int i = 0; i < 3; i++) check_output(r[i], 0, 2);
    sched_destroy(s);
    for (int i = 0; i < 4; i++) request_unref(r[i]);
}
END_TEST

START_TEST(test_timeout) {
    sched_engine e = fake_engine(100, 64);
    sched_config cfg = {.max_running = 1, .max_queue = 8, .max_batch_tokens = 64, .request_timeout = 0.05};
    scheduler *s = sched_create(&e, &cfg, NULL, NULL, NULL);
    request *a = make_req(4, 1, 200, 1);
    sched_submit(s, a);
    sched_iterate(s);
    a->t_arrival -= 1.0; /* pretend it has been running for a second */
    sched_iterate(s);
    int32_t got[MAXT];
    const char *fin = NULL;
    bool err;
    outbox_tokens(a, 0, got, MAXT, &fin, &err);
    ck_assert(err);
    ck_assert_int_eq(F.used, 0);
    sched_destroy(s);
    request_unref(a);
}
END_TEST

/* ==== The scheduler thread (for ThreadSanitizer) ======================= */

/* Requests are submitted and cancelled from several threads while the
 * scheduler thread runs them, other threads take snapshots, the notify
 * callback drains outboxes as the HTTP loop does, and sched_cancel_all()
 * lands in the middle.  Every request must end (all choices finished, or an
 * error), and every block must come back.  Under SANITIZE=thread this is
 * the scheduler's race test. */
#define TH_SUBMITTERS 3
#define TH_PER_THREAD 24
#define TH_TOTAL (TH_SUBMITTERS * TH_PER_THREAD)

typedef struct {
    scheduler *s;
    request *reqs[TH_TOTAL];
    atomic_int finished[TH_TOTAL]; /* choices finished */
    atomic_int errors[TH_TOTAL];
    atomic_int accepted, refused;
    atomic_bool stop_snap;
} th_state;

static th_state TS;

static void th_notify(request *r, void *ud) {
    (void)ud;
    req_outbox o;
    request_take_outbox(r, &o);
    for (int i = 0; i < o.n; i++) {
        if (o.ev[i].type == EV_FINISH) atomic_fetch_add(&TS.finished[r->num], 1);
        if (o.ev[i].type == EV_ERROR) atomic_fetch_add(&TS.errors[r->num], 1);
    }
    request_outbox_free(&o);
}

static void *th_submit(void *arg) {
    int t = (int)(intptr_t)arg;
    for (int k = 0; k < TH_PER_THREAD; k++) {
        int i = t * TH_PER_THREAD + k;
        request *r = TS.reqs[i];
        if (sched_submit(TS.s, r) == 0) atomic_fetch_add(&TS.accepted, 1);
        else atomic_fetch_add(&TS.refused, 1), atomic_store(&TS.errors[i], -1);
        if (k % 5 == 2) { /* a client that goes away */
            atomic_store(&TS.reqs[i - 1]->cancel, true);
            sched_wake(TS.s);
        }
        if (k % 7 == 0) {
            struct timespec ts = {0, 200 * 1000};
            nanosleep(&ts, NULL);
        }
    }
    return NULL;
}

static void *th_snapshot(void *arg) {
    (void)arg;
    while (!atomic_load(&TS.stop_snap)) {
        sched_stats st;
        sched_snapshot(TS.s, &st);
        ck_assert_int_ge(st.waiting, 0);
        ck_assert_int_le(st.kv_used_blocks, st.kv_total_blocks);
    }
    return NULL;
}

static bool th_ended(int i) {
    const request *r = TS.reqs[i];
    return atomic_load(&TS.errors[i]) != 0 || atomic_load(&TS.finished[i]) == r->n_choices;
}

START_TEST(test_threaded) {
    memset(&TS, 0, sizeof TS);
    sched_engine e = fake_engine(60, 32);
    sched_config cfg = {.max_running = 4, .max_queue = TH_TOTAL, .max_batch_tokens = 32};
    TS.s = sched_create(&e, &cfg, NULL, th_notify, NULL);
    for (int i = 0; i < TH_TOTAL; i++) {
        TS.reqs[i] = make_req(3 + i % 9, i, 4 + i % 13, 1 + (i % 4 == 0));
        TS.reqs[i]->num = (uint64_t)i;
    }
    ck_assert_int_eq(sched_start(TS.s), 0);
    pthread_t sub[TH_SUBMITTERS], snap;
    pthread_create(&snap, NULL, th_snapshot, NULL);
    for (int t = 0; t < TH_SUBMITTERS; t++) pthread_create(&sub[t], NULL, th_submit, (void *)(intptr_t)t);
    for (int t = 0; t < TH_SUBMITTERS; t++) pthread_join(sub[t], NULL);
    sched_cancel_all(TS.s); /* whatever still runs or waits is cancelled */
    bool all = false;
    for (int w = 0; w < 2000 && !all; w++) {
        all = true;
        for (int i = 0; i < TH_TOTAL; i++) all &= th_ended(i);
        if (!all) {
            struct timespec ts = {0, 5 * 1000 * 1000};
            nanosleep(&ts, NULL);
        }
    }
    atomic_store(&TS.stop_snap, true);
    pthread_join(snap, NULL);
    for (int i = 0; i < TH_TOTAL; i++) ck_assert_msg(th_ended(i), "request %d never ended", i);
    ck_assert_int_eq(atomic_load(&TS.accepted) + atomic_load(&TS.refused), TH_TOTAL);
    sched_stats st;
    sched_snapshot(TS.s, &st);
    ck_assert_int_eq(st.running_requests, 0);
    ck_assert_int_eq(st.waiting, 0);
    sched_stop(TS.s);
    ck_assert_int_eq(F.used, 0);
    sched_destroy(TS.s);
    for (int i = 0; i < TH_TOTAL; i++) request_unref(TS.reqs[i]);
}
END_TEST

Suite *scheduler_suite(void) {
    Suite *s = suite_create("scheduler");
    TCase *tc = tcase_create("admission");
    tcase_add_test(tc, test_fifo_admission);
    tcase_add_test(tc, test_queue_full_draining);
    suite_add_tcase(s, tc);
    tc = tcase_create("batching");
    tcase_add_test(tc, test_chunking_decode_first);
    tcase_add_test(tc, test_n_choices_fork);
    suite_add_tcase(s, tc);
    tc = tcase_create("memory");
    tcase_add_test(tc, test_preemption_recompute);
    tcase_add_test(tc, test_batch_fits_pool);
    tcase_add_test(tc, test_admission_reserves_prompts);
    tcase_add_test(tc, test_cancel_frees);
    tcase_add_test(tc, test_prefix_reuse);
    tcase_add_test(tc, test_timeout);
    suite_add_tcase(s, tc);
    tc = tcase_create("threads");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_threaded);
    suite_add_tcase(s, tc);
    return s;
}
