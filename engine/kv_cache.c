/*
 * kv_cache.c - paged KV cache with prefix caching; see kv_cache.h.
 */
#include "kv_cache.h"

#include <errno.h>
#include <unistd.h>

#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#define EMPTY (-1)

/* ==== Hashing ========================================================== */

static uint64_t mix64(uint64_t x) { /* splitmix64 finaliser */
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ull;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebull;
    x ^= x >> 31;
    return x;
}

#define HASH_ROOT 0x5a5e5e7e00000001ull

/* Hash of a full block given the hash of everything before it. */
static uint64_t chain_hash(uint64_t parent, const int32_t *tokens, int n) {
    uint64_t h = mix64(parent ^ 0x9e3779b97f4a7c15ull);
    for (int i = 0; i < n; i++) h = mix64(h ^ (uint32_t)tokens[i]);
    return h;
}

static uint32_t slot_of(const kv_cache *c, uint64_t h) { return (uint32_t)(h ^ (h >> 32)) & c->table_mask; }

static int table_find(const kv_cache *c, uint64_t h) {
    for (uint32_t i = slot_of(c, h);; i = (i + 1) & c->table_mask) {
        int32_t b = c->table[i];
        if (b == EMPTY) return -1;
        if (c->hash[b] == h) return b;
    }
}

static void table_insert(kv_cache *c, int b) {
    uint32_t i = slot_of(c, c->hash[b]);
    while (c->table[i] != EMPTY) i = (i + 1) & c->table_mask;
    c->table[i] = b;
}

/* Linear-probing delete with backward shift, so no tombstones build up. */
static void table_remove(kv_cache *c, int b) {
    uint32_t i = slot_of(c, c->hash[b]);
    while (c->table[i] != b) {
        if (c->table[i] == EMPTY) return;
        i = (i + 1) & c->table_mask;
    }
    uint32_t j = i;
    for (;;) {
        c->table[i] = EMPTY;
        for (;;) {
            j = (j + 1) & c->table_mask;
            if (c->table[j] == EMPTY) return;
            uint32_t k = slot_of(c, c->hash[c->table[j]]);
            /* Move table[j] back to i unless its home k lies cyclically in (i, j]. */
            if (i <= j ? (i < k && k <= j) : (i < k || k <= j)) continue;
            break;
        }
        c->table[i] = c->table[j];
        i = j;
    }
}

/* ==== Block lists ====================================================== */

static void lru_remove(kv_cache *c, int b) {
    int p = c->lru_prev[b], n = c->lru_next[b];
    if (p >= 0) c->lru_next[p] = n; else c->lru_head = n;
    if (n >= 0) c->lru_prev[n] = p; else c->lru_tail = p;
    c->lru_prev[b] = c->lru_next[b] = EMPTY;
    c->n_lru--;
}

static void lru_push(kv_cache *c, int b) {
    c->lru_prev[b] = c->lru_tail;
    c->lru_next[b] = EMPTY;
    if (c->lru_tail >= 0) c->lru_next[c->lru_tail] = b; else c->lru_head = b;
    c->lru_tail = b;
    c->n_lru++;
}

static int alloc_block(kv_cache *c) {
    int b;
    if (c->n_free > 0) {
        b = c->free_stack[--c->n_free];
    } else if (c->lru_head >= 0) {
        b = c->lru_head; /* evict the least recently used cached prefix */
        lru_remove(c, b);
        table_remove(c, b);
        c->hashed[b] = false;
    } else {
        return -1;
    }
    c->ref[b] = 1;
    return b;
}

static void release_block(kv_cache *c, int b) {
    if (--c->ref[b] > 0) return;
    if (c->hashed[b]) lru_push(c, b);
    else c->free_stack[c->n_free++] = b;
}

/* ==== Set-up =========================================================== */

size_t kv_block_bytes(const kv_cache_params *p) {
    size_t per_layer = (size_t)p->block_tokens * (size_t)p->n_head_kv * (size_t)p->head_dim * (p->f16 ? 2 : 4);
    size_t total = 0;
    for (int l = 0; l < p->n_layer; l++) total += per_layer * (p->has_k[l] ? 2 : 1);
    return total;
}

/* Backs n bytes of a fresh anonymous mapping with memory now.  The pool is
 * all the server will ever use for KV, so it is committed at start-up, as
 * inference servers do: a machine that cannot hold it fails here, not under
 * load, and the process's RSS is what it will stay (lazily backed pages
 * would make it creep up as the prefix cache spreads over the pool). */
static int populate(void *p, size_t n) {
    if (madvise(p, n, MADV_POPULATE_WRITE) == 0) return 0;
    if (errno != EINVAL) return -1; /* ENOMEM, EFAULT (cgroup limit), ... */
    /* Kernels before 5.14 lack MADV_POPULATE_WRITE: touch every page. */
    long page = sysconf(_SC_PAGESIZE);
    for (size_t o = 0; o < n; o += page > 0 ? (size_t)page : 4096) ((volatile char *)p)[o] = 0;
    return 0;
}

int kv_init(kv_cache *c, const kv_cache_params *p) {
    memset(c, 0, sizeof *c);
    c->n_layer = p->n_layer;
    c->n_head_kv = p->n_head_kv;
    c->head_dim = p->head_dim;
    c->block_tokens = p->block_tokens;
    c->n_blocks = p->n_blocks;
    c->max_blocks_per_seq = (p->n_ctx + p->block_tokens - 1) / p->block_tokens;
    c->f16 = p->f16;
    c->elt = p->f16 ? 2 : 4;
    c->prefix_cache = p->prefix_cache;
    c->has_k = p->has_k;
    c->max_seqs = p->max_seqs;
    c->lru_head = c->lru_tail = EMPTY;

    size_t plane = (size_t)p->n_blocks * (size_t)p->block_tokens * (size_t)p->n_head_kv * (size_t)p->head_dim * c->elt;
    c->k = calloc((size_t)p->n_layer, sizeof *c->k);
    c->v = calloc((size_t)p->n_layer, sizeof *c->v);
    if (!c->k || !c->v) goto fail;
    for (int l = 0; l < p->n_layer; l++) {
        /* Anonymous mappings, backed with memory at once (populate). */
        c->v[l] = mmap(NULL, plane, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (c->v[l] == MAP_FAILED) { c->v[l] = NULL; goto fail; }
        c->v_bytes += plane;
        if (populate(c->v[l], plane) != 0) goto fail;
        if (p->has_k[l]) {
            c->k[l] = mmap(NULL, plane, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            if (c->k[l] == MAP_FAILED) { c->k[l] = NULL; goto fail; }
            c->k_bytes += plane;
            if (populate(c->k[l], plane) != 0) goto fail;
        }
    }
    size_t nb = (size_t)p->n_blocks;
    uint32_t cap = 1;
    while (cap < 2 * (uint32_t)nb) cap <<= 1;
    c->table_mask = cap - 1;
    c->ref = calloc(nb, sizeof *c->ref);
    c->hash = calloc(nb, sizeof *c->hash);
    c->hashed = calloc(nb, sizeof *c->hashed);
    c->tokens = calloc(nb * (size_t)p->block_tokens, sizeof *c->tokens);
    c->free_stack = malloc(nb * sizeof *c->free_stack);
    c->lru_prev = malloc(nb * sizeof *c->lru_prev);
    c->lru_next = malloc(nb * sizeof *c->lru_next);
    c->table = malloc(cap * sizeof *c->table);
    c->seqs = calloc((size_t)p->max_seqs, sizeof *c->seqs);
    if (!c->ref || !c->hash || !c->hashed || !c->tokens || !c->free_stack || !c->lru_prev || !c->lru_next ||
        !c->table || !c->seqs)
        goto fail;
    for (int i = 0; i < p->max_seqs; i++) {
        c->seqs[i].blocks = malloc((size_t)c->max_blocks_per_seq * sizeof(int32_t));
        if (!c->seqs[i].blocks) goto fail;
    }
    memset(c->table, 0xff, cap * sizeof *c->table);
    for (int b = 0; b < p->n_blocks; b++) {
        c->free_stack[b] = p->n_blocks - 1 - b; /* hand out low ids first */
        c->lru_prev[b] = c->lru_next[b] = EMPTY;
    }
    c->n_free = p->n_blocks;
    return 0;
fail:
    kv_free(c);
    return -1;
}

void kv_free(kv_cache *c) {
    size_t plane = (size_t)c->n_blocks * (size_t)c->block_tokens * (size_t)c->n_head_kv * (size_t)c->head_dim * c->elt;
    for (int l = 0; l < c->n_layer; l++) {
        if (c->k && c->k[l]) munmap(c->k[l], plane);
        if (c->v && c->v[l]) munmap(c->v[l], plane);
    }
    if (c->seqs)
        for (int i = 0; i < c->max_seqs; i++) free(c->seqs[i].blocks);
    free(c->k); free(c->v); free(c->ref); free(c->hash); free(c->hashed); free(c->tokens);
    free(c->free_stack); free(c->lru_prev); free(c->lru_next); free(c->table); free(c->seqs);
    memset(c, 0, sizeof *c);
}

int kv_available(const kv_cache *c) { return c->n_free + c->n_lru; }
int kv_used(const kv_cache *c) { return c->n_blocks - c->n_free - c->n_lru; }

/* ==== Sequences ======================================================== */

int kv_seq_create(kv_cache *c) {
    for (int i = 0; i < c->max_seqs; i++) {
        kv_seq *s = &c->seqs[i];
        if (!s->active) {
            s->active = true;
            s->n_blocks = s->n_tokens = s->n_hashed = 0;
            s->last_hash = HASH_ROOT;
            return i;
        }
    }
    return -1;
}

void kv_seq_free(kv_cache *c, int seq) {
    kv_seq *s = &c->seqs[seq];
    if (!s->active) return;
    /* Release in reverse so a prompt's earlier blocks stay cached longest. */
    for (int i = s->n_blocks - 1; i >= 0; i--) release_block(c, s->blocks[i]);
    s->n_blocks = s->n_tokens = s->n_hashed = 0;
    s->active = false;
}

int kv_blocks_needed(const kv_cache *c, int seq, int n) {
    const kv_seq *s = &c->seqs[seq];
    int want = (s->n_tokens + n + c->block_tokens - 1) / c->block_tokens;
    return want > s->n_blocks ? want - s->n_blocks : 0;
}

int kv_reserve(kv_cache *c, int seq, int n) {
    kv_seq *s = &c->seqs[seq];
    int need = kv_blocks_needed(c, seq, n);
    if (s->n_blocks + need > c->max_blocks_per_seq || need > kv_available(c)) return -1;
    for (int i = 0; i < need; i++) s->blocks[s->n_blocks++] = alloc_block(c);
    return 0;
}

void kv_commit(kv_cache *c, int seq, const int32_t *tokens, int n) {
    kv_seq *s = &c->seqs[seq];
    int bt = c->block_tokens;
    for (int i = 0; i < n; i++) {
        int pos = s->n_tokens + i;
        c->tokens[(size_t)s->blocks[pos / bt] * (size_t)bt + (size_t)(pos % bt)] = tokens[i];
    }
    s->n_tokens += n;
    int full = s->n_tokens / bt;
    while (s->n_hashed < full) {
        int b = s->blocks[s->n_hashed];
        uint64_t h = chain_hash(s->last_hash, c->tokens + (size_t)b * (size_t)bt, bt);
        s->last_hash = h;
        s->n_hashed++;
        if (!c->prefix_cache || c->hashed[b]) continue;
        if (table_find(c, h) >= 0) continue; /* an identical block is cached already */
        c->hash[b] = h;
        c->hashed[b] = true;
        table_insert(c, b);
    }
}

int kv_prefix_attach(kv_cache *c, int seq, const int32_t *tokens, int n) {
    kv_seq *s = &c->seqs[seq];
    if (!c->prefix_cache || s->n_tokens != 0 || n < 2) return 0;
    int bt = c->block_tokens;
    int n_full = (n - 1) / bt; /* keep at least the last token to compute */
    if (n_full > c->max_blocks_per_seq) n_full = c->max_blocks_per_seq;
    atomic_fetch_add_explicit(&c->prefix_queries, (uint64_t)n_full * (uint64_t)bt, memory_order_relaxed);
    uint64_t h = HASH_ROOT;
    for (int i = 0; i < n_full; i++) {
        const int32_t *bt_tokens = tokens + (size_t)i * (size_t)bt;
        uint64_t hi = chain_hash(h, bt_tokens, bt);
        int b = table_find(c, hi);
        if (b < 0 || memcmp(c->tokens + (size_t)b * (size_t)bt, bt_tokens, (size_t)bt * sizeof(int32_t)) != 0) break;
        if (c->ref[b] == 0) lru_remove(c, b);
        c->ref[b]++;
        s->blocks[s->n_blocks++] = b;
        s->n_tokens += bt;
        s->n_hashed++;
        s->last_hash = hi;
        h = hi;
        atomic_fetch_add_explicit(&c->prefix_hits, (uint64_t)bt, memory_order_relaxed);
    }
    return s->n_tokens;
}

int kv_fork(kv_cache *c, int src, int dst) {
    kv_seq *s = &c->seqs[src], *d = &c->seqs[dst];
    if (d->n_tokens != 0 || d->n_blocks != 0) return -1;
    int bt = c->block_tokens;
    int full = s->n_tokens / bt, part = s->n_tokens % bt;
    if (part && kv_available(c) < 1) return -1;
    for (int i = 0; i < full; i++) {
        c->ref[s->blocks[i]]++;
        d->blocks[d->n_blocks++] = s->blocks[i];
    }
    if (part) {
        int from = s->blocks[full], to = alloc_block(c);
        size_t row = (size_t)c->n_head_kv * (size_t)c->head_dim * c->elt;
        for (int l = 0; l < c->n_layer; l++) {
            if (c->k[l]) memcpy(c->k[l] + (size_t)to * (size_t)bt * row, c->k[l] + (size_t)from * (size_t)bt * row, (size_t)part * row);
            memcpy(c->v[l] + (size_t)to * (size_t)bt * row, c->v[l] + (size_t)from * (size_t)bt * row, (size_t)part * row);
        }
        memcpy(c->tokens + (size_t)to * (size_t)bt, c->tokens + (size_t)from * (size_t)bt, (size_t)part * sizeof(int32_t));
        d->blocks[d->n_blocks++] = to;
    }
    d->n_tokens = s->n_tokens;
    d->n_hashed = s->n_hashed < full ? s->n_hashed : full;
    d->last_hash = s->last_hash;
    if (d->n_hashed != s->n_hashed) { /* recompute the chain up to n_hashed */
        d->last_hash = HASH_ROOT;
        for (int i = 0; i < d->n_hashed; i++)
            d->last_hash = chain_hash(d->last_hash, c->tokens + (size_t)d->blocks[i] * (size_t)bt, bt);
    }
    return 0;
}
