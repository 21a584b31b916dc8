/*
 * kv_cache.h - the paged KV cache.
 *
 * One pool of fixed-size blocks, allocated at start-up.  A block holds
 * block_tokens positions of every layer: a K plane for layers that compute
 * attention and a V plane for all layers.  Layers that share attention have no
 * K plane at all, so with n of L layers shared the pool holds n / (2L) fewer
 * bytes per token, i.e. more tokens in the same memory.
 *
 * Plane layout, per layer: [n_blocks][block_tokens][n_head_kv][head_dim].
 *
 * Sequences own block tables.  Blocks are reference-counted: prefix caching
 * and forks (n > 1 choices) share full blocks between sequences; a block is
 * written only while its count is 1 (shared blocks are always full, and the
 * partial last block is copied on fork).  Full blocks are keyed by a hash of
 * every token up to their end; when their count drops to 0 they stay cached
 * and are evicted least-recently-used when a new block is needed.
 *
 * Not thread-safe: the engine thread owns it.
 */
#ifndef SASERVE_KV_CACHE_H
#define SASERVE_KV_CACHE_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct {
    int32_t *blocks;   /* block table: blocks[i] holds positions [i*bt, (i+1)*bt) */
    int n_blocks;
    int n_tokens;      /* positions filled */
    int n_hashed;      /* leading full blocks whose hash chain is known */
    uint64_t last_hash;
    bool active;
} kv_seq;

typedef struct {
    int n_layer, n_head_kv, head_dim;
    int block_tokens, n_blocks, max_blocks_per_seq;
    size_t elt;                /* bytes per element: 2 (f16) or 4 (f32) */
    bool f16;
    bool prefix_cache;
    const bool *has_k;         /* [n_layer] */
    uint8_t **k, **v;          /* [n_layer] plane bases; k[l] NULL where shared */
    size_t k_bytes, v_bytes;   /* capacity */

    int32_t *ref;              /* [n_blocks] */
    /* Prefix-cache key of a full block: hash chain, parent hash and tokens. */
    uint64_t *hash;
    bool *hashed;
    int32_t *tokens;           /* [n_blocks][block_tokens] */
    /* Free blocks that hold no cached prefix: a stack.  Cached, unreferenced
     * blocks: a doubly linked LRU list (head = least recently used). */
    int32_t *free_stack;
    int n_free;
    int32_t *lru_prev, *lru_next;
    int lru_head, lru_tail, n_lru;
    /* Hash -> block, open addressing; -1 empty, -2 deleted. */
    int32_t *table;
    uint32_t table_mask;

    kv_seq *seqs;
    int max_seqs;
    /* Written by the engine thread, read from any thread (metrics). */
    _Atomic uint64_t prefix_queries, prefix_hits;
} kv_cache;

typedef struct {
    int n_layer, n_head_kv, head_dim, block_tokens, n_blocks, n_ctx, max_seqs;
    bool f16, prefix_cache;
    const bool *has_k;
} kv_cache_params;

/* Bytes one block takes across all layers. */
size_t kv_block_bytes(const kv_cache_params *p);
int kv_init(kv_cache *c, const kv_cache_params *p);
void kv_free(kv_cache *c);

/* Blocks that can be handed out now (free + evictable cached). */
int kv_available(const kv_cache *c);
int kv_used(const kv_cache *c);

int kv_seq_create(kv_cache *c);
void kv_seq_free(kv_cache *c, int seq);
/* Blocks needed for seq to grow by n tokens. */
int kv_blocks_needed(const kv_cache *c, int seq, int n);
/* Grows seq's table to hold n more tokens (does not change n_tokens).
 * Returns 0, or -1 if the pool cannot supply the blocks (nothing changed). */
int kv_reserve(kv_cache *c, int seq, int n);
/* After tokens [old_len, old_len + n) were written: records n_tokens and
 * registers newly filled blocks in the prefix cache. */
void kv_commit(kv_cache *c, int seq, const int32_t *tokens, int n);
/* Prefix attach / fork; see engine.h. */
int kv_prefix_attach(kv_cache *c, int seq, const int32_t *tokens, int n);
int kv_fork(kv_cache *c, int src, int dst);

/* Address of position pos of kv head g in layer l's K or V plane. */
static inline void *kv_k_at(const kv_cache *c, int l, const kv_seq *s, int pos, int g) {
    int b = s->blocks[pos / c->block_tokens];
    size_t slot = (size_t)b * (size_t)c->block_tokens + (size_t)(pos % c->block_tokens);
    return c->k[l] + ((slot * (size_t)c->n_head_kv + (size_t)g) * (size_t)c->head_dim) * c->elt;
}
static inline void *kv_v_at(const kv_cache *c, int l, const kv_seq *s, int pos, int g) {
    int b = s->blocks[pos / c->block_tokens];
    size_t slot = (size_t)b * (size_t)c->block_tokens + (size_t)(pos % c->block_tokens);
    return c->v[l] + ((slot * (size_t)c->n_head_kv + (size_t)g) * (size_t)c->head_dim) * c->elt;
}

#endif
