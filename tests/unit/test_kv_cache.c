/*
 * test_kv_cache.c - the paged KV cache (engine/kv_cache.h), driven directly:
 * block accounting, reservation failures that change nothing, the per-
 * sequence block limit, prefix caching, LRU eviction of cached blocks,
 * reference counts of shared blocks, fork, and the missing K plane of
 * shared layers.
 *
 * The cache under test: 3 layers of which layer 1 shares (no K plane),
 * 2 KV heads of 4 floats, blocks of 4 tokens, 8 blocks, n_ctx 32 (so at most
 * 8 blocks per sequence), 4 sequences.
 */
#include <check.h>
#include <stdlib.h>
#include <string.h>

#include "kv_cache.h"

#define BT 4
#define NB 8
#define NL 3
#define NKV 2
#define HD 4

static const bool has_k[NL] = {true, false, true};
static kv_cache C;

static kv_cache_params params(int n_blocks, int n_ctx, bool f16, bool prefix_cache) {
    return (kv_cache_params){.n_layer = NL, .n_head_kv = NKV, .head_dim = HD, .block_tokens = BT,
                             .n_blocks = n_blocks, .n_ctx = n_ctx, .max_seqs = 4, .f16 = f16,
                             .prefix_cache = prefix_cache, .has_k = has_k};
}

static void setup(void) {
    kv_cache_params p = params(NB, 32, false, true);
    ck_assert_int_eq(kv_init(&C, &p), 0);
}

static void teardown(void) { kv_free(&C); }

/* tokens[i] = base + i */
static void seq_tokens(int32_t *t, int n, int32_t base) {
    for (int i = 0; i < n; i++) t[i] = base + i;
}

/* Creates a sequence holding tokens[0..n) (reserve + commit). */
static int seq_with(kv_cache *c, const int32_t *tokens, int n) {
    int s = kv_seq_create(c);
    ck_assert_int_ge(s, 0);
    ck_assert_int_eq(kv_reserve(c, s, n), 0);
    kv_commit(c, s, tokens, n);
    ck_assert_int_eq(c->seqs[s].n_tokens, n);
    return s;
}

static void check_counts(const kv_cache *c, int used) {
    ck_assert_int_eq(kv_used(c), used);
    ck_assert_int_eq(kv_available(c), c->n_blocks - used);
}

/* ==== Accounting ======================================================= */

START_TEST(test_block_accounting) {
    check_counts(&C, 0);
    int s = kv_seq_create(&C);
    ck_assert_int_ge(s, 0);
    ck_assert_int_eq(kv_blocks_needed(&C, s, 0), 0);
    ck_assert_int_eq(kv_blocks_needed(&C, s, 1), 1);
    ck_assert_int_eq(kv_blocks_needed(&C, s, 4), 1);
    ck_assert_int_eq(kv_blocks_needed(&C, s, 5), 2);
    ck_assert_int_eq(kv_reserve(&C, s, 5), 0);
    check_counts(&C, 2);
    ck_assert_int_eq(C.seqs[s].n_blocks, 2);
    ck_assert_int_eq(C.seqs[s].n_tokens, 0); /* reserving does not fill */
    ck_assert_int_ne(C.seqs[s].blocks[0], C.seqs[s].blocks[1]);
    ck_assert_int_eq(kv_reserve(&C, s, 5), 0); /* already held */
    check_counts(&C, 2);

    int32_t t[12];
    seq_tokens(t, 12, 100);
    kv_commit(&C, s, t, 5);
    ck_assert_int_eq(C.seqs[s].n_tokens, 5);
    ck_assert_int_eq(kv_blocks_needed(&C, s, 3), 0);
    ck_assert_int_eq(kv_blocks_needed(&C, s, 4), 1);
    ck_assert_int_eq(kv_reserve(&C, s, 3), 0);
    kv_commit(&C, s, t + 5, 3);
    check_counts(&C, 2);
    ck_assert_int_eq(kv_blocks_needed(&C, s, 1), 1);

    int s2 = seq_with(&C, t, 9);
    ck_assert_int_ne(s2, s);
    check_counts(&C, 5);
    kv_seq_free(&C, s);
    check_counts(&C, 3); /* cached, unreferenced blocks count as available */
    kv_seq_free(&C, s2);
    check_counts(&C, 0);
    kv_seq_free(&C, s2); /* freeing twice is harmless */
    check_counts(&C, 0);
}
END_TEST

START_TEST(test_sequence_slots) {
    int s[4];
    for (int i = 0; i < 4; i++) ck_assert_int_ge(s[i] = kv_seq_create(&C), 0);
    ck_assert_int_eq(kv_seq_create(&C), -1);
    kv_seq_free(&C, s[2]);
    int again = kv_seq_create(&C);
    ck_assert_int_eq(again, s[2]);
    ck_assert_int_eq(C.seqs[again].n_tokens, 0);
    ck_assert_int_eq(C.seqs[again].n_blocks, 0);
}
END_TEST

/* A reservation the pool cannot supply fails and changes nothing. */
START_TEST(test_reserve_short) {
    int32_t t[32];
    seq_tokens(t, 32, 1);
    int a = kv_seq_create(&C), b = kv_seq_create(&C);
    ck_assert_int_eq(kv_reserve(&C, a, 22), 0); /* 6 blocks */
    kv_commit(&C, a, t, 22);
    check_counts(&C, 6);
    ck_assert_int_eq(kv_reserve(&C, b, 12), -1); /* 3 blocks, 2 available */
    ck_assert_int_eq(C.seqs[b].n_blocks, 0);
    check_counts(&C, 6);
    ck_assert_int_eq(kv_reserve(&C, b, 8), 0);
    check_counts(&C, 8);
    /* a is partly filled: 22 + 3 needs a 7th block, and none is left. */
    ck_assert_int_eq(kv_reserve(&C, a, 3), -1);
    ck_assert_int_eq(C.seqs[a].n_blocks, 6);
    ck_assert_int_eq(C.seqs[a].n_tokens, 22);
    ck_assert_int_eq(kv_reserve(&C, a, 2), 0); /* fits in its last block */
    check_counts(&C, 8);
}
END_TEST

START_TEST(test_max_blocks_per_seq) {
    kv_cache c;
    kv_cache_params p = params(16, 30, false, true);
    ck_assert_int_eq(kv_init(&c, &p), 0);
    ck_assert_int_eq(c.max_blocks_per_seq, 8); /* ceil(30 / 4) */
    int s = kv_seq_create(&c);
    ck_assert_int_eq(kv_reserve(&c, s, 33), -1);
    ck_assert_int_eq(c.seqs[s].n_blocks, 0);
    check_counts(&c, 0);
    ck_assert_int_eq(kv_reserve(&c, s, 32), 0);
    check_counts(&c, 8);
    int32_t t[32];
    seq_tokens(t, 32, 5);
    kv_commit(&c, s, t, 32);
    ck_assert_int_eq(kv_reserve(&c, s, 1), -1);
    check_counts(&c, 8);
    kv_free(&c);
}
END_TEST

/* ==== Prefix caching =================================================== */

START_TEST(test_prefix_reuse) {
    int32_t t[10], u[10], mid[10], first[10];
    seq_tokens(t, 10, 100);
    seq_tokens(u, 10, 500);
    memcpy(mid, t, sizeof t);
    mid[5] = 9999; /* second block differs */
    memcpy(first, t, sizeof t);
    first[1] = 9999; /* first block differs, second equal */

    int a = seq_with(&C, t, 10);
    int32_t a_blocks[3];
    memcpy(a_blocks, C.seqs[a].blocks, sizeof a_blocks);
    kv_seq_free(&C, a);
    ck_assert_uint_eq(C.prefix_queries, 0);

    /* Whole blocks, and fewer than n tokens: the last token is computed. */
    int b = kv_seq_create(&C);
    ck_assert_int_eq(kv_prefix_attach(&C, b, t, 10), 8);
    ck_assert_int_eq(C.seqs[b].n_tokens, 8);
    ck_assert_int_eq(C.seqs[b].n_blocks, 2);
    ck_assert_int_eq(C.seqs[b].blocks[0], a_blocks[0]);
    ck_assert_int_eq(C.seqs[b].blocks[1], a_blocks[1]);
    ck_assert_uint_eq(C.prefix_queries, 8);
    ck_assert_uint_eq(C.prefix_hits, 8);
    check_counts(&C, 2);

    /* n = 8 exactly: only the first block, so token 8 is still computed. */
    int c = kv_seq_create(&C);
    ck_assert_int_eq(kv_prefix_attach(&C, c, t, 8), 4);
    ck_assert_int_eq(C.ref[a_blocks[0]], 2);
    ck_assert_uint_eq(C.prefix_queries, 12);
    ck_assert_uint_eq(C.prefix_hits, 12);
    check_counts(&C, 2);

    /* Different tokens: a query, no hit. */
    int d = kv_seq_create(&C);
    ck_assert_int_eq(kv_prefix_attach(&C, d, u, 10), 0);
    ck_assert_int_eq(C.seqs[d].n_tokens, 0);
    ck_assert_uint_eq(C.prefix_queries, 20);
    ck_assert_uint_eq(C.prefix_hits, 12);
    /* A mismatch in the second block stops reuse there. */
    ck_assert_int_eq(kv_prefix_attach(&C, d, mid, 10), 4);
    kv_seq_free(&C, d);
    d = kv_seq_create(&C);
    /* A mismatch in the first block: nothing, even though the second
     * block's tokens are equal (blocks are keyed by their whole prefix). */
    ck_assert_int_eq(kv_prefix_attach(&C, d, first, 10), 0);
    ck_assert_uint_eq(C.prefix_hits, 16);

    /* Too short, or a sequence that is not empty: nothing. */
    ck_assert_int_eq(kv_prefix_attach(&C, d, t, 1), 0);
    ck_assert_int_eq(kv_prefix_attach(&C, b, t, 10), 0); /* b is not empty: nothing attached */
    ck_assert_int_eq(C.seqs[b].n_blocks, 2);
    ck_assert_int_eq(C.seqs[b].n_tokens, 8);

    /* b continues after the attached prefix in a block of its own. */
    ck_assert_int_eq(kv_reserve(&C, b, 2), 0);
    kv_commit(&C, b, t + 8, 2);
    ck_assert_int_eq(C.seqs[b].n_tokens, 10);
    ck_assert_int_ne(C.seqs[b].blocks[2], a_blocks[0]);
    ck_assert_int_ne(C.seqs[b].blocks[2], a_blocks[1]);
}
END_TEST

START_TEST(test_prefix_cache_off) {
    kv_cache c;
    kv_cache_params p = params(NB, 32, false, false);
    ck_assert_int_eq(kv_init(&c, &p), 0);
    int32_t t[10];
    seq_tokens(t, 10, 100);
    int a = seq_with(&c, t, 10);
    kv_seq_free(&c, a);
    check_counts(&c, 0);
    int b = kv_seq_create(&c);
    ck_assert_int_eq(kv_prefix_attach(&c, b, t, 10), 0);
    ck_assert_uint_eq(c.prefix_queries, 0);
    kv_free(&c);
}
END_TEST

/* The same prefix computed twice (no attach) is cached once. */
START_TEST(test_prefix_duplicate_blocks) {
    int32_t t[8];
    seq_tokens(t, 8, 100);
    int a = seq_with(&C, t, 8), b = seq_with(&C, t, 8);
    kv_seq_free(&C, a);
    kv_seq_free(&C, b);
    check_counts(&C, 0);
    ck_assert_int_eq(C.n_lru, 2);
    int c = kv_seq_create(&C);
    ck_assert_int_eq(kv_prefix_attach(&C, c, t, 8), 4);
}
END_TEST

/* ==== LRU eviction ===================================================== */

/* One full cached block per sequence (5 tokens: 1 full block + 1 partial). */
START_TEST(test_lru_eviction_oldest_first) {
    int32_t a[5], b[5], x[28];
    seq_tokens(a, 5, 100);
    seq_tokens(b, 5, 200);
    seq_tokens(x, 28, 300);
    int sa = seq_with(&C, a, 5), sb = seq_with(&C, b, 5);
    /* Released b first, so b's block is the least recently used. */
    kv_seq_free(&C, sb);
    kv_seq_free(&C, sa);
    check_counts(&C, 0);
    ck_assert_int_eq(C.n_lru, 2);
    ck_assert_int_eq(C.n_free, 6);

    /* 7 blocks: the 6 free ones, then one evicted: b's. */
    int sx = kv_seq_create(&C);
    ck_assert_int_eq(kv_reserve(&C, sx, 28), 0);
    kv_commit(&C, sx, x, 28);
    check_counts(&C, 7);
    int s1 = kv_seq_create(&C);
    ck_assert_int_eq(kv_prefix_attach(&C, s1, b, 5), 0);
    ck_assert_int_eq(kv_prefix_attach(&C, s1, a, 5), 4);
    check_counts(&C, 8);
    /* The only cached block is in use now: nothing can be evicted. */
    int s2 = kv_seq_create(&C);
    ck_assert_int_eq(kv_reserve(&C, s2, 1), -1);
    check_counts(&C, 8);
}
END_TEST

/* Reuse refreshes a block: after a's block is attached and released again,
 * b's is the older one and goes first. */
START_TEST(test_lru_reuse_refreshes) {
    int32_t a[5], b[5], x[28];
    seq_tokens(a, 5, 100);
    seq_tokens(b, 5, 200);
    seq_tokens(x, 28, 300);
    int sa = seq_with(&C, a, 5), sb = seq_with(&C, b, 5);
    kv_seq_free(&C, sa);
    kv_seq_free(&C, sb); /* a older than b */
    int s = kv_seq_create(&C);
    ck_assert_int_eq(kv_prefix_attach(&C, s, a, 5), 4);
    kv_seq_free(&C, s); /* now b older than a */
    int sx = kv_seq_create(&C);
    ck_assert_int_eq(kv_reserve(&C, sx, 28), 0);
    kv_commit(&C, sx, x, 28);
    int s1 = kv_seq_create(&C);
    ck_assert_int_eq(kv_prefix_attach(&C, s1, a, 5), 4);
    kv_seq_free(&C, s1);
    s1 = kv_seq_create(&C);
    ck_assert_int_eq(kv_prefix_attach(&C, s1, b, 5), 0);
}
END_TEST

/* Eviction of a cached block that other cached blocks chain from: later
 * blocks stay findable only through their whole prefix, which is gone. */
START_TEST(test_lru_evicted_block_reused_clean) {
    int32_t a[9], x[28];
    seq_tokens(a, 9, 100);
    seq_tokens(x, 28, 300);
    int sa = seq_with(&C, a, 9);
    kv_seq_free(&C, sa); /* blocks 0 and 1 of a cached; a's block 0 released last */
    int sx = kv_seq_create(&C);
    ck_assert_int_eq(kv_reserve(&C, sx, 28), 0); /* 6 free + evicts one */
    kv_commit(&C, sx, x, 28);
    int s = kv_seq_create(&C);
    /* Releasing in reverse keeps a prompt's earlier block longest: block 1
     * was evicted, block 0 is still there. */
    ck_assert_int_eq(kv_prefix_attach(&C, s, a, 9), 4);
    /* The evicted block was recycled by x and now holds x's tokens: x's
     * prefix is found in it. */
    kv_seq_free(&C, s);
    kv_seq_free(&C, sx);
    s = kv_seq_create(&C);
    ck_assert_int_eq(kv_prefix_attach(&C, s, x, 28), 24);
}
END_TEST

/* ==== Sharing: refcounts and fork ====================================== */

START_TEST(test_refcount_two_sequences) {
    int32_t t[9];
    seq_tokens(t, 9, 100);
    int a = seq_with(&C, t, 9);
    check_counts(&C, 3);
    int b = kv_seq_create(&C);
    ck_assert_int_eq(kv_prefix_attach(&C, b, t, 9), 8);
    ck_assert_int_eq(C.seqs[b].blocks[0], C.seqs[a].blocks[0]);
    ck_assert_int_eq(C.seqs[b].blocks[1], C.seqs[a].blocks[1]);
    ck_assert_int_eq(C.ref[C.seqs[a].blocks[0]], 2);
    ck_assert_int_eq(C.ref[C.seqs[a].blocks[1]], 2);
    ck_assert_int_eq(C.ref[C.seqs[a].blocks[2]], 1);
    check_counts(&C, 3); /* shared blocks are counted once */
    int b0 = C.seqs[b].blocks[0];
    kv_seq_free(&C, a);
    check_counts(&C, 2); /* a's partial block is free, the shared ones held by b */
    ck_assert_int_eq(C.ref[b0], 1);
    ck_assert_int_eq(C.n_lru, 0);
    kv_seq_free(&C, b);
    check_counts(&C, 0);
    ck_assert_int_eq(C.ref[b0], 0);
    ck_assert_int_eq(C.n_lru, 2);
}
END_TEST

/* Writes a recognisable K (where the layer has one) and V for position pos. */
static void write_pos(kv_cache *c, int seq, int pos, float tag) {
    for (int l = 0; l < NL; l++)
        for (int g = 0; g < NKV; g++)
            for (int i = 0; i < HD; i++) {
                float v = tag + (float)(l * 1000 + pos * 10 + g) + (float)i * 0.25f;
                if (c->k[l]) ((float *)kv_k_at(c, l, &c->seqs[seq], pos, g))[i] = -v;
                ((float *)kv_v_at(c, l, &c->seqs[seq], pos, g))[i] = v;
            }
}

static bool same_pos(const kv_cache *c, int s1, int s2, int pos) {
    size_t n = HD * sizeof(float);
    for (int l = 0; l < NL; l++)
        for (int g = 0; g < NKV; g++) {
            if (c->k[l] && memcmp(kv_k_at(c, l, &c->seqs[s1], pos, g), kv_k_at(c, l, &c->seqs[s2], pos, g), n))
                return false;
            if (memcmp(kv_v_at(c, l, &c->seqs[s1], pos, g), kv_v_at(c, l, &c->seqs[s2], pos, g), n)) return false;
        }
    return true;
}

START_TEST(test_fork) {
    int32_t t[12];
    seq_tokens(t, 12, 100);
    int a = kv_seq_create(&C);
    ck_assert_int_eq(kv_reserve(&C, a, 6), 0);
    for (int p = 0; p < 6; p++) write_pos(&C, a, p, 0.0f);
    kv_commit(&C, a, t, 6);
    check_counts(&C, 2);

    int b = kv_seq_create(&C);
    ck_assert_int_eq(kv_fork(&C, a, b), 0);
    ck_assert_int_eq(C.seqs[b].n_tokens, 6);
    ck_assert_int_eq(C.seqs[b].n_blocks, 2);
    ck_assert_int_eq(C.seqs[b].blocks[0], C.seqs[a].blocks[0]); /* full: shared */
    ck_assert_int_eq(C.ref[C.seqs[a].blocks[0]], 2);
    ck_assert_int_ne(C.seqs[b].blocks[1], C.seqs[a].blocks[1]); /* partial: copied */
    ck_assert_int_eq(C.ref[C.seqs[a].blocks[1]], 1);
    ck_assert_int_eq(C.ref[C.seqs[b].blocks[1]], 1);
    check_counts(&C, 3);
    for (int p = 0; p < 6; p++) ck_assert_msg(same_pos(&C, a, b, p), "position %d differs after fork", p);

    /* b writes on in its own copy; a is untouched. */
    ck_assert_int_eq(kv_reserve(&C, b, 2), 0);
    write_pos(&C, b, 6, 0.5f);
    write_pos(&C, b, 7, 0.5f);
    kv_commit(&C, b, t + 6, 2);
    ck_assert_int_eq(C.seqs[a].n_tokens, 6);
    for (int p = 0; p < 6; p++) ck_assert(same_pos(&C, a, b, p));
    const float *a_slot6 = (const float *)kv_v_at(&C, 0, &C.seqs[a], 6, 0);
    ck_assert(a_slot6[0] == 0.0f); /* a's own block never saw position 6 */

    /* Into a sequence that is not empty: refused. */
    ck_assert_int_eq(kv_fork(&C, a, b), -1);

    /* b's block 1 was registered with the chain of a's block 0: the whole
     * 8-token prefix is found after both are gone. */
    kv_seq_free(&C, a);
    kv_seq_free(&C, b);
    int c = kv_seq_create(&C);
    ck_assert_int_eq(kv_prefix_attach(&C, c, t, 9), 8);
}
END_TEST

START_TEST(test_fork_block_boundary_and_full_pool) {
    int32_t t[32];
    seq_tokens(t, 32, 100);
    /* At a block boundary nothing is copied. */
    int a = seq_with(&C, t, 8);
    int b = kv_seq_create(&C);
    ck_assert_int_eq(kv_fork(&C, a, b), 0);
    check_counts(&C, 2);
    ck_assert_int_eq(C.ref[C.seqs[a].blocks[1]], 2);
    kv_seq_free(&C, b);
    /* With a partial block and no block to copy it into: refused, and
     * nothing changes. */
    int x = seq_with(&C, t, 22); /* 6 more blocks: pool full */
    kv_seq_free(&C, a);
    ck_assert_int_eq(kv_reserve(&C, x, 8), 0); /* evicts a's cached blocks */
    check_counts(&C, 8);
    int y = kv_seq_create(&C);
    ck_assert_int_eq(kv_fork(&C, x, y), -1);
    ck_assert_int_eq(C.seqs[y].n_blocks, 0);
    ck_assert_int_eq(C.ref[C.seqs[x].blocks[0]], 1);
    check_counts(&C, 8);
}
END_TEST

/* ==== Shared layers have no K plane ==================================== */

START_TEST(test_no_k_plane_for_shared_layers) {
    size_t plane = (size_t)NB * BT * NKV * HD * sizeof(float);
    ck_assert_ptr_nonnull(C.k[0]);
    ck_assert_ptr_null(C.k[1]);
    ck_assert_ptr_nonnull(C.k[2]);
    for (int l = 0; l < NL; l++) ck_assert_ptr_nonnull(C.v[l]);
    ck_assert_uint_eq(C.k_bytes, 2 * plane);
    ck_assert_uint_eq(C.v_bytes, 3 * plane);

    /* Bytes per block: (K? + V) * block_tokens * n_head_kv * head_dim * elt. */
    kv_cache_params p = params(NB, 32, false, true);
    ck_assert_uint_eq(kv_block_bytes(&p), (size_t)(2 + 3) * BT * NKV * HD * 4);
    ck_assert_uint_eq(C.k_bytes + C.v_bytes, (size_t)NB * kv_block_bytes(&p));
    p.f16 = true;
    ck_assert_uint_eq(kv_block_bytes(&p), (size_t)(2 + 3) * BT * NKV * HD * 2);
    static const bool all_k[NL] = {true, true, true};
    p.has_k = all_k;
    ck_assert_uint_eq(kv_block_bytes(&p), (size_t)(3 + 3) * BT * NKV * HD * 2);

    /* An f16 cache has the same geometry at half the bytes. */
    kv_cache c;
    kv_cache_params q = params(NB, 32, true, true);
    ck_assert_int_eq(kv_init(&c, &q), 0);
    ck_assert_uint_eq(c.elt, 2);
    ck_assert_uint_eq(c.k_bytes, plane);
    ck_assert_uint_eq(c.v_bytes, 3 * plane / 2);
    kv_free(&c);

    /* Addressing: [block][slot][kv head][head_dim]. */
    int32_t t[6];
    seq_tokens(t, 6, 1);
    int s = seq_with(&C, t, 6);
    const kv_seq *sq = &C.seqs[s];
    int b1 = sq->blocks[1];
    size_t off = (((size_t)b1 * BT + 1) * NKV + 1) * HD * sizeof(float);
    ck_assert_ptr_eq(kv_v_at(&C, 1, sq, 5, 1), C.v[1] + off);
    ck_assert_ptr_eq(kv_k_at(&C, 2, sq, 5, 1), C.k[2] + off);
    /* The V plane of the shared layer is written like any other. */
    write_pos(&C, s, 5, 0.0f);
    ck_assert(((float *)kv_v_at(&C, 1, sq, 5, 1))[2] == 1000.0f + 51.0f + 0.5f);
}
END_TEST

/* ==== Random workload against a shadow model =========================== */

/* Every position's K/V carries a tag derived from the whole token prefix up
 * to it (as real K/V depend on the prefix), so a block handed out by prefix
 * lookup or fork must hold exactly the tags the shadow expects.  After every
 * operation the structures are checked for consistency. */

#define RW_BLOCKS 12
#define RW_SEQS 4
#define RW_CTX 32

typedef struct {
    bool active;
    int n;
    int32_t tok[RW_CTX];
    float tag[RW_CTX];
} shadow_seq;

static uint32_t rw_state;
static uint32_t rnd(uint32_t n) {
    rw_state = rw_state * 1664525u + 1013904223u;
    return (rw_state >> 8) % n;
}

static float tag_after(float prev, int32_t tok, int pos) {
    uint32_t h = (uint32_t)prev * 2654435761u ^ (uint32_t)tok * 40503u ^ (uint32_t)pos;
    return (float)(h & 0xffffff);
}

static void write_tag(kv_cache *c, int seq, int pos, float tag) {
    const kv_seq *s = &c->seqs[seq];
    ck_assert_msg(c->ref[s->blocks[pos / BT]] == 1, "writing position %d into a shared block", pos);
    for (int l = 0; l < NL; l++)
        for (int g = 0; g < NKV; g++) {
            if (c->k[l]) ((float *)kv_k_at(c, l, s, pos, g))[0] = -tag;
            ((float *)kv_v_at(c, l, s, pos, g))[0] = tag + (float)g;
        }
}

static void check_tags(const kv_cache *c, int seq, const shadow_seq *sh) {
    const kv_seq *s = &c->seqs[seq];
    ck_assert_int_eq(s->n_tokens, sh->n);
    for (int p = 0; p < sh->n; p++) {
        ck_assert_int_eq(c->tokens[(size_t)s->blocks[p / BT] * BT + (size_t)(p % BT)], sh->tok[p]);
        for (int l = 0; l < NL; l++)
            for (int g = 0; g < NKV; g++) {
                if (c->k[l]) ck_assert(((const float *)kv_k_at(c, l, s, p, g))[0] == -sh->tag[p]);
                ck_assert_msg(((const float *)kv_v_at(c, l, s, p, g))[0] == sh->tag[p] + (float)g,
                              "seq %d position %d layer %d: wrong V", seq, p, l);
            }
    }
}

/* Home slot of a hash in the prefix table, as kv_cache.c computes it. */
static uint32_t home_slot(const kv_cache *c, uint64_t h) { return (uint32_t)(h ^ (h >> 32)) & c->table_mask; }

static void check_consistency(const kv_cache *c, const shadow_seq *sh) {
    int refs[RW_BLOCKS] = {0};
    for (int i = 0; i < RW_SEQS; i++) {
        ck_assert(c->seqs[i].active == sh[i].active);
        if (!sh[i].active) continue;
        ck_assert_int_eq(c->seqs[i].n_blocks, (sh[i].n + BT - 1) / BT);
        for (int b = 0; b < c->seqs[i].n_blocks; b++) refs[c->seqs[i].blocks[b]]++;
        check_tags(c, i, &sh[i]);
    }
    int in_use = 0, cached_idle = 0;
    for (int b = 0; b < RW_BLOCKS; b++) {
        ck_assert_int_eq(c->ref[b], refs[b]);
        in_use += refs[b] > 0;
        cached_idle += refs[b] == 0 && c->hashed[b];
    }
    ck_assert_int_eq(kv_used(c), in_use);
    ck_assert_int_eq(c->n_lru, cached_idle);
    ck_assert_int_eq(c->n_free + c->n_lru + in_use, RW_BLOCKS);
    /* The LRU list holds exactly the idle cached blocks. */
    int walked = 0;
    for (int b = c->lru_head; b >= 0; b = c->lru_next[b], walked++) {
        ck_assert(c->hashed[b] && c->ref[b] == 0);
        ck_assert_int_le(walked, RW_BLOCKS);
    }
    ck_assert_int_eq(walked, c->n_lru);
    /* The table holds exactly the hashed blocks, each reachable from its
     * home slot without crossing an empty slot. */
    int in_table = 0;
    for (uint32_t i = 0; i <= c->table_mask; i++) in_table += c->table[i] >= 0;
    int hashed = 0;
    for (int b = 0; b < RW_BLOCKS; b++) {
        if (!c->hashed[b]) continue;
        hashed++;
        uint32_t i = home_slot(c, c->hash[b]);
        while (c->table[i] != b) {
            ck_assert_msg(c->table[i] >= 0, "block %d unreachable in the prefix table", b);
            i = (i + 1) & c->table_mask;
        }
    }
    ck_assert_int_eq(in_table, hashed);
}

/* Appends tokens [from, n) of sh to seq: reserve, write, commit. */
static bool append(kv_cache *c, int seq, shadow_seq *sh, int from, int n) {
    int before = c->seqs[seq].n_blocks, avail = kv_available(c);
    if (kv_reserve(c, seq, n - from) != 0) {
        ck_assert_int_eq(c->seqs[seq].n_blocks, before);
        ck_assert_int_eq(kv_available(c), avail);
        return false;
    }
    for (int p = from; p < n; p++) write_tag(c, seq, p, sh->tag[p]);
    kv_commit(c, seq, sh->tok + from, n - from);
    return true;
}

START_TEST(test_random_workload) {
    kv_cache c;
    kv_cache_params p = {.n_layer = NL, .n_head_kv = NKV, .head_dim = HD, .block_tokens = BT, .n_blocks = RW_BLOCKS,
                         .n_ctx = RW_CTX, .max_seqs = RW_SEQS, .f16 = false, .prefix_cache = true, .has_k = has_k};
    ck_assert_int_eq(kv_init(&c, &p), 0);
    shadow_seq sh[RW_SEQS] = {0};
    int32_t family[4][RW_CTX];
    for (int f = 0; f < 4; f++)
        for (int i = 0; i < RW_CTX; i++) family[f][i] = 1000 * (f + 1) + i;
    rw_state = 12345;
    int hits = 0, evictions_seen = 0;
    for (int op = 0; op < 4000; op++) {
        int kind = (int)rnd(10);
        int seq = (int)rnd(RW_SEQS);
        if (kind < 4 && !sh[seq].active) {
            /* A new prompt: a family prefix, sometimes with a different tail. */
            int s = kv_seq_create(&c);
            ck_assert_int_ge(s, 0);
            shadow_seq *q = &sh[s];
            *q = (shadow_seq){.active = true};
            int n = 1 + (int)rnd(20), f = (int)rnd(4), keep = (int)rnd(2) ? n : (int)rnd((uint32_t)n + 1);
            for (int i = 0; i < n; i++) {
                q->tok[i] = i < keep ? family[f][i] : (int32_t)(50000 + rnd(3));
                q->tag[i] = tag_after(i ? q->tag[i - 1] : 0.0f, q->tok[i], i);
            }
            int got = kv_prefix_attach(&c, s, q->tok, n);
            ck_assert_int_eq(got % BT, 0);
            ck_assert(got == 0 || got < n);
            hits += got > 0;
            q->n = got; /* the attached positions must already hold the right tags */
            check_tags(&c, s, q);
            q->n = n;
            if (!append(&c, s, q, got, n)) {
                kv_seq_free(&c, s);
                q->active = false;
                evictions_seen++;
            }
        } else if (kind < 7 && sh[seq].active && sh[seq].n < RW_CTX) {
            shadow_seq *q = &sh[seq];
            int pos = q->n;
            q->tok[pos] = (int32_t)(60000 + rnd(2));
            q->tag[pos] = tag_after(pos ? q->tag[pos - 1] : 0.0f, q->tok[pos], pos);
            q->n++;
            if (!append(&c, seq, q, pos, pos + 1)) q->n--;
        } else if (kind < 8 && sh[seq].active) {
            int d = kv_seq_create(&c);
            if (d >= 0) {
                if (kv_fork(&c, seq, d) == 0) {
                    sh[d] = sh[seq];
                } else {
                    ck_assert_int_eq(c.seqs[d].n_blocks, 0);
                    kv_seq_free(&c, d);
                }
            }
        } else if (sh[seq].active) {
            kv_seq_free(&c, seq);
            sh[seq].active = false;
        }
        check_consistency(&c, sh);
    }
    /* The workload did exercise reuse and a full pool. */
    ck_assert_int_gt(hits, 50);
    ck_assert_int_gt(evictions_seen, 0);
    ck_assert_uint_gt(c.prefix_hits, 0);
    kv_free(&c);
}
END_TEST

Suite *kv_cache_suite(void) {
    Suite *s = suite_create("kv_cache");
    TCase *tc = tcase_create("accounting");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, test_block_accounting);
    tcase_add_test(tc, test_sequence_slots);
    tcase_add_test(tc, test_reserve_short);
    tcase_add_test(tc, test_max_blocks_per_seq);
    suite_add_tcase(s, tc);

    tc = tcase_create("prefix");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, test_prefix_reuse);
    tcase_add_test(tc, test_prefix_cache_off);
    tcase_add_test(tc, test_prefix_duplicate_blocks);
    suite_add_tcase(s, tc);

    tc = tcase_create("lru");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, test_lru_eviction_oldest_first);
    tcase_add_test(tc, test_lru_reuse_refreshes);
    tcase_add_test(tc, test_lru_evicted_block_reused_clean);
    suite_add_tcase(s, tc);

    tc = tcase_create("sharing");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, test_refcount_two_sequences);
    tcase_add_test(tc, test_fork);
    tcase_add_test(tc, test_fork_block_boundary_and_full_pool);
    suite_add_tcase(s, tc);

    tc = tcase_create("planes");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, test_no_k_plane_for_shared_layers);
    suite_add_tcase(s, tc);

    tc = tcase_create("random");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_random_workload);
    suite_add_tcase(s, tc);
    return s;
}
