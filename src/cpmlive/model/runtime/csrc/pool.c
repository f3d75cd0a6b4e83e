/* The threads of the decoding products (gemv.c) and of the decoding step (decode.c).
 *
 * A parallel loop under OpenMP ends at a barrier: the calling thread waits until every thread of
 * the team has arrived, so a helper that the kernel has not scheduled (a machine busy with other
 * work) stalls the whole step for a time slice, many times a token. Here the caller never waits
 * for a helper that has not started: units of work are claimed in chunks from one atomic counter
 * by the caller and by whichever helpers are running, and the caller returns once every unit is
 * done. A helper that wakes late finds nothing left to claim. Which thread computes a unit does
 * not change its result.
 *
 * Helpers are created on first use, spin a short while for the next loop after each one, then
 * sleep on a futex (Linux; elsewhere they yield). One caller uses them at a time; a concurrent
 * caller computes its loop alone.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <time.h>
#ifdef __linux__
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "gemv.h"

#define MAX_HELPERS 63
#define SPIN_NANOSECONDS 200000 /* a helper's wait for the next loop before it sleeps */

static inline void relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

static struct {
    pthread_mutex_t caller;         /* one caller at a time */
    _Atomic uint32_t generation;    /* bumped to publish a loop (the futex word) */
    _Atomic uint64_t claim;         /* generation << 32 | the next unclaimed unit */
    _Atomic int64_t done;           /* units finished of the current loop */
    _Atomic int sleepers;
    PoolWork work;
    void *context;
    int64_t units, chunk;
    int helpers_wanted;             /* helpers 0 .. helpers_wanted - 1 take part */
    int helpers_started;
} pool = {.caller = PTHREAD_MUTEX_INITIALIZER};

#define READ(field) __atomic_load_n(&pool.field, __ATOMIC_RELAXED)
#define WRITE(field, value) __atomic_store_n(&pool.field, value, __ATOMIC_RELAXED)

/* Claim and compute chunks of loop `generation` until none is left. The loop's fields are read
 * after its open claim counter and before the claim: a claim that succeeds shows the loop was
 * still open, and its caller writes the next loop's fields only after every unit is done, so
 * what was read is this loop's. */
static void take_part(uint32_t generation) {
    uint64_t claim = atomic_load(&pool.claim);
    for (;;) {
        if ((uint32_t)(claim >> 32) != generation) return;
        PoolWork work = READ(work);
        void *context = READ(context);
        int64_t units = READ(units), chunk = READ(chunk);
        int64_t first = (int64_t)(claim & 0xffffffffu);
        if (first >= units) return;
        int64_t end = first + chunk < units ? first + chunk : units;
        if (!atomic_compare_exchange_weak(&pool.claim, &claim, claim + (uint64_t)(end - first))) continue;
        work(context, first, end);
        atomic_fetch_add(&pool.done, end - first);
        claim = atomic_load(&pool.claim);
    }
}

static uint32_t wait_for_loop(uint32_t seen) {
    int64_t start = now_ns();
    for (int spins = 0;; spins++) {
        uint32_t generation = atomic_load(&pool.generation);
        if (generation != seen) return generation;
        relax();
        if ((spins & 255) == 255 && now_ns() - start > SPIN_NANOSECONDS) break;
    }
    for (;;) {
        atomic_fetch_add(&pool.sleepers, 1);
        uint32_t generation = atomic_load(&pool.generation);
        if (generation == seen) {
#ifdef __linux__
            syscall(SYS_futex, &pool.generation, FUTEX_WAIT_PRIVATE, seen, NULL, NULL, 0);
#else
            sched_yield();
#endif
            generation = atomic_load(&pool.generation);
        }
        atomic_fetch_sub(&pool.sleepers, 1);
        if (generation != seen) return generation;
    }
}

static void *helper(void *argument) {
    int index = (int)(intptr_t)argument;
    uint32_t seen = atomic_load(&pool.generation);
    for (;;) {
        seen = wait_for_loop(seen);
        if (index < READ(helpers_wanted)) take_part(seen);
    }
    return NULL;
}

static void start_helpers(int wanted) {
    while (pool.helpers_started < wanted && pool.helpers_started < MAX_HELPERS) {
        pthread_t thread;
        pthread_attr_t attributes;
        pthread_attr_init(&attributes);
        pthread_attr_setdetachstate(&attributes, PTHREAD_CREATE_DETACHED);
        int failed = pthread_create(&thread, &attributes, helper, (void *)(intptr_t)pool.helpers_started);
        pthread_attr_destroy(&attributes);
        if (failed) return;
        pool.helpers_started++;
    }
}

void pool_run(PoolWork work, void *context, int64_t units, int64_t chunk, int threads) {
    if (chunk < 1) chunk = 1;
    if (threads <= 1 || units <= chunk || pthread_mutex_trylock(&pool.caller) != 0) {
        work(context, 0, units);
        return;
    }
    start_helpers(threads - 1);
    uint32_t generation = atomic_load(&pool.generation) + 1;
    atomic_store(&pool.claim, (uint64_t)generation << 32 | 0xffffffffu); /* closed while its fields change */
    WRITE(work, work);
    WRITE(context, context);
    WRITE(units, units);
    WRITE(chunk, chunk);
    WRITE(helpers_wanted, threads - 1);
    atomic_store(&pool.done, 0);
    atomic_store(&pool.claim, (uint64_t)generation << 32);
    atomic_store(&pool.generation, generation);
#ifdef __linux__
    if (atomic_load(&pool.sleepers) > 0) syscall(SYS_futex, &pool.generation, FUTEX_WAKE_PRIVATE, MAX_HELPERS, NULL, NULL, 0);
#endif
    take_part(generation);
    /* What is left is being computed by helpers that claimed it. */
    for (int spins = 0; atomic_load(&pool.done) < units; spins++) {
        relax();
        if (spins > 4096) sched_yield();
    }
    pthread_mutex_unlock(&pool.caller);
}
