/*
 * pool.h - a persistent thread pool for the forward pass.
 *
 * pool_run() runs fn(arg, ith, nth) on every thread (the caller is thread 0)
 * and returns when all are done.  Workers spin briefly between jobs, because
 * a forward step issues hundreds of small jobs back to back, then sleep on a
 * condition variable so an idle server uses no CPU.  Only the thread that
 * created the pool may call pool_run().
 */
#ifndef SASERVE_POOL_H
#define SASERVE_POOL_H

#include <stdatomic.h>

typedef struct pool pool;
typedef void (*pool_fn)(void *arg, int ith, int nth);

pool *pool_create(int n_threads);
void pool_destroy(pool *p);
int pool_size(const pool *p);
void pool_run(pool *p, pool_fn fn, void *arg);
/* Inside a job: waits until all threads of the pool have arrived.  Every
 * thread must call it the same number of times.  It spins: meant for the
 * short phases of one forward step. */
void pool_barrier(pool *p);
/* Waits (spinning briefly, then on a futex) until *word == target; a thread
 * that changes a word others may wait on calls pool_notify afterwards. */
void pool_wait_equal(pool *p, atomic_uint *word, unsigned target);
void pool_notify(pool *p, atomic_uint *word);

#endif
