/*
 * pool.c - persistent worker threads; see pool.h.
 *
 * Every wait (for a job, for the job's end, at a barrier) spins briefly and
 * then sleeps on a futex.  Spinning alone is fastest on an idle machine but
 * disastrous on a busy one: a thread that spins while the thread it waits for
 * is descheduled burns its whole time slice.  The futex word is always the
 * counter being waited on, and a waiter announces itself before sleeping so
 * the releasing side only pays for a wake-up system call when someone sleeps.
 */
#include "pool.h"

#include <linux/futex.h>
#include <limits.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <unistd.h>

/* About 10-50 microseconds of spinning before going to sleep. */
#define SPIN_ITERS 2000

struct pool {
    int n;
    pthread_t *threads;
    atomic_uint gen;      /* job generation: bumped to publish a job */
    atomic_uint done;     /* workers finished with the current job */
    atomic_int sleepers;  /* threads asleep on gen, done or bar_gen */
    atomic_bool stop;
    pool_fn fn;
    void *arg;
    atomic_uint bar_count; /* arrivals at the current barrier */
    atomic_uint bar_gen;   /* barrier generation */
};

typedef struct {
    pool *p;
    int ith;
} worker_arg;

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static void futex_wait(atomic_uint *addr, unsigned val) {
    syscall(SYS_futex, (unsigned *)addr, FUTEX_WAIT_PRIVATE, val, NULL, NULL, 0);
}

static void futex_wake_all(atomic_uint *addr) {
    syscall(SYS_futex, (unsigned *)addr, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
}

/* Waits until *addr != val.  seq_cst throughout: the waiter's sleepers++
 * and the releaser's store-then-load of sleepers pair up (Dekker), so a wake
 * is never lost. */
static void wait_change(pool *p, atomic_uint *addr, unsigned val) {
    for (int i = 0; i < SPIN_ITERS; i++) {
        if (atomic_load(addr) != val) return;
        cpu_relax();
    }
    atomic_fetch_add(&p->sleepers, 1);
    while (atomic_load(addr) == val) futex_wait(addr, val);
    atomic_fetch_sub(&p->sleepers, 1);
}

static void wake(pool *p, atomic_uint *addr) {
    if (atomic_load(&p->sleepers) > 0) futex_wake_all(addr);
}

static void *worker(void *v) {
    worker_arg *wa = v;
    pool *p = wa->p;
    int ith = wa->ith;
    free(wa);
    /* Not atomic_load(&p->gen): a job published before this thread got
     * going would then look already done. */
    unsigned seen = 0;
    for (;;) {
        wait_change(p, &p->gen, seen);
        seen = atomic_load(&p->gen);
        if (atomic_load(&p->stop)) return NULL;
        p->fn(p->arg, ith, p->n);
        atomic_fetch_add(&p->done, 1);
        wake(p, &p->done);
    }
}

pool *pool_create(int n_threads) {
    if (n_threads < 1) n_threads = 1;
    pool *p = calloc(1, sizeof *p);
    if (!p) return NULL;
    p->n = n_threads;
    p->threads = calloc((size_t)n_threads, sizeof(pthread_t));
    if (!p->threads) {
        free(p);
        return NULL;
    }
    for (int i = 1; i < n_threads; i++) {
        worker_arg *wa = malloc(sizeof *wa);
        if (!wa) {
            p->n = i;
            break;
        }
        wa->p = p;
        wa->ith = i;
        if (pthread_create(&p->threads[i], NULL, worker, wa) != 0) {
            free(wa);
            p->n = i;
            break;
        }
    }
    return p;
}

int pool_size(const pool *p) { return p->n; }

void pool_run(pool *p, pool_fn fn, void *arg) {
    if (p->n == 1) {
        fn(arg, 0, 1);
        return;
    }
    p->fn = fn;
    p->arg = arg;
    atomic_store(&p->done, 0);
    atomic_fetch_add(&p->gen, 1);
    wake(p, &p->gen);
    fn(arg, 0, p->n);
    for (unsigned d; (d = atomic_load(&p->done)) != (unsigned)(p->n - 1);) wait_change(p, &p->done, d);
}

void pool_wait_equal(pool *p, atomic_uint *word, unsigned target) {
    for (unsigned v; (v = atomic_load(word)) != target;) wait_change(p, word, v);
}

void pool_notify(pool *p, atomic_uint *word) { wake(p, word); }

void pool_barrier(pool *p) {
    if (p->n == 1) return;
    unsigned gen = atomic_load(&p->bar_gen);
    if (atomic_fetch_add(&p->bar_count, 1) == (unsigned)(p->n - 1)) {
        atomic_store(&p->bar_count, 0);
        atomic_fetch_add(&p->bar_gen, 1);
        wake(p, &p->bar_gen);
        return;
    }
    wait_change(p, &p->bar_gen, gen);
}

void pool_destroy(pool *p) {
    if (!p) return;
    atomic_store(&p->stop, true);
    atomic_fetch_add(&p->gen, 1);
    futex_wake_all(&p->gen);
    for (int i = 1; i < p->n; i++) pthread_join(p->threads[i], NULL);
    free(p->threads);
    free(p);
}
