/*
 * test_request.c - request lifetime pieces shared by the scheduler and the
 * HTTP loop: the wake queue (scheduler -> loop hand-off).
 */
#include <check.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>

#include "request.h"

static int walk(request *list, request **seen, int cap) {
    int n = 0;
    for (request *r = list; r; r = r->wake_next)
        if (n < cap) seen[n++] = r;
    return n;
}

/* The soak test hung a response now and then: the loop took the queue,
 * cleared in_pending, released the lock and then followed pending_next; the
 * scheduler, free to queue a request again, rewrote that link, so the rest
 * of the taken list was skipped: those requests' events were never
 * delivered (and their queue references leaked).  The list the loop takes
 * is now linked through wake_next, which pushes never touch. */
START_TEST(test_repush_while_walking) {
    req_wakeq q;
    req_wakeq_init(&q);
    request *r[4];
    for (int i = 0; i < 4; i++) r[i] = request_new(REQ_COMPLETION);
    ck_assert(req_wakeq_push(&q, r[0]));
    ck_assert(req_wakeq_push(&q, r[1]));
    ck_assert(req_wakeq_push(&q, r[2]));
    ck_assert(!req_wakeq_push(&q, r[1])); /* queued once */
    ck_assert_int_eq(atomic_load(&r[1]->refs), 2);
    request *list = req_wakeq_take(&q);
    /* While the loop works on the first request, the scheduler queues two
     * of the taken ones again, and a new one. */
    int visited = 0;
    bool seen[3] = {false};
    for (request *x = list, *next; x; x = next) {
        next = x->wake_next;
        if (visited == 0) {
            ck_assert(req_wakeq_push(&q, r[2]));
            ck_assert(req_wakeq_push(&q, r[0]));
            ck_assert(req_wakeq_push(&q, r[3]));
        }
        for (int i = 0; i < 3; i++) seen[i] |= x == r[i];
        visited++;
        request_unref(x);
    }
    ck_assert_int_eq(visited, 3);
    ck_assert(seen[0] && seen[1] && seen[2]);
    request *again[8];
    ck_assert_int_eq(walk(req_wakeq_take(&q), again, 8), 3);
    for (int i = 0; i < 3; i++) request_unref(again[i]);
    ck_assert_ptr_null(req_wakeq_take(&q));
    for (int i = 0; i < 4; i++) {
        ck_assert_int_eq(atomic_load(&r[i]->refs), 1);
        request_unref(r[i]);
    }
}
END_TEST

/* The same under contention (a ThreadSanitizer target): pushers queue
 * requests over and over while the taker drains; every push that queued is
 * taken exactly once. */
#define WQ_REQS 8
#define WQ_ROUNDS 20000

static req_wakeq WQ;
static request *WR[WQ_REQS];
static atomic_int pushed, done_pushers;

static void *pusher(void *arg) {
    int t = (int)(intptr_t)arg;
    for (int k = 0; k < WQ_ROUNDS; k++)
        if (req_wakeq_push(&WQ, WR[(k + t) % WQ_REQS])) atomic_fetch_add(&pushed, 1);
    atomic_fetch_add(&done_pushers, 1);
    return NULL;
}

START_TEST(test_threaded_push_take) {
    req_wakeq_init(&WQ);
    for (int i = 0; i < WQ_REQS; i++) WR[i] = request_new(REQ_COMPLETION);
    atomic_store(&pushed, 0);
    atomic_store(&done_pushers, 0);
    pthread_t th[2];
    for (int t = 0; t < 2; t++) pthread_create(&th[t], NULL, pusher, (void *)(intptr_t)t);
    long taken = 0;
    for (;;) {
        bool last = atomic_load(&done_pushers) == 2;
        for (request *x = req_wakeq_take(&WQ), *next; x; x = next) {
            next = x->wake_next;
            taken++;
            request_unref(x);
        }
        if (last) break;
    }
    for (int t = 0; t < 2; t++) pthread_join(th[t], NULL);
    for (request *x = req_wakeq_take(&WQ), *next; x; x = next) {
        next = x->wake_next;
        taken++;
        request_unref(x);
    }
    ck_assert_int_eq(taken, atomic_load(&pushed));
    for (int i = 0; i < WQ_REQS; i++) {
        ck_assert_int_eq(atomic_load(&WR[i]->refs), 1);
        request_unref(WR[i]);
    }
}
END_TEST

Suite *request_suite(void) {
    Suite *s = suite_create("request");
    TCase *tc = tcase_create("wakeq");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_repush_while_walking);
    tcase_add_test(tc, test_threaded_push_take);
    suite_add_tcase(s, tc);
    return s;
}
