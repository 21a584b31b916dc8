/*
 * test_engine.c - the engine API around the forward pass (engine.h), on the
 * bundled model: engine_step's error codes and its promise to change nothing
 * on ENGINE_ENOKV / ENGINE_ECTX, prefix caching and fork giving the same
 * logits as computing everything, thread-count invariance of the engine's
 * own kernels, and the attention observer.
 */
#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine.h"
#include "enginetest.h"

/* 40 tokens of validation text (ref-none.json, sequence 0). */
static int32_t *val_tokens(int n) {
    json_t *ref = fixture_json("ref-none.json");
    int len;
    int32_t *ids = json_ids(
        json_need(json_array_get(json_need(json_need(ref, "validation_nll"), "sequences"), 0), "ids"), &len);
    ck_assert_int_ge(len, n);
    json_decref(ref);
    return ids;
}

static engine *open_bundled(bool blas, int threads, int max_batch, int n_ctx, size_t kv_bytes) {
    engine_params p = engine_default_params();
    p.model_path = BUNDLED_MODEL;
    p.blas_prompt = blas;
    p.n_threads = threads;
    p.max_seqs = 4;
    p.max_batch_tokens = max_batch;
    p.n_ctx = n_ctx;
    p.kv_cache_bytes = kv_bytes;
    return open_engine_params(&p);
}

/* ==== Errors =========================================================== */

START_TEST(test_step_errors) {
    /* 4 blocks of 16 tokens (4096 bytes per token with 4-11 shared). */
    engine *e = open_bundled(true, 1, 32, 48, 4 * 16 * 4096);
    const engine_info *in = engine_get_info(e);
    ck_assert_int_eq(in->kv_blocks, 4);
    ck_assert_int_eq(in->max_batch_tokens, 32);
    int32_t *t = val_tokens(64);
    int a = engine_seq_create(e), b = engine_seq_create(e);
    ck_assert_int_ge(a, 0);
    ck_assert_int_ge(b, 0);

    engine_batch_item it = {.seq = a, .tokens = t, .n_tokens = 20, .prompt = true};
    ck_assert_int_eq(engine_step(e, &it, 1), 0);
    ck_assert_int_eq(engine_seq_len(e, a), 20);
    ck_assert_int_eq(engine_kv_used_blocks(e), 2);
    ck_assert_int_eq(engine_kv_free_blocks(e), 2);
    ck_assert_int_eq(engine_seq_blocks_needed(e, a, 12), 0);
    ck_assert_int_eq(engine_seq_blocks_needed(e, a, 13), 1);

    /* Invalid items. */
    ck_assert_int_eq(engine_step(e, &it, 0), ENGINE_EINVAL);
    engine_batch_item bad = {.seq = b, .tokens = t, .n_tokens = 0};
    ck_assert_int_eq(engine_step(e, &bad, 1), ENGINE_EINVAL);
    int32_t oob[2] = {5, 8192};
    bad = (engine_batch_item){.seq = b, .tokens = oob, .n_tokens = 2};
    ck_assert_int_eq(engine_step(e, &bad, 1), ENGINE_EINVAL);
    oob[1] = -1;
    ck_assert_int_eq(engine_step(e, &bad, 1), ENGINE_EINVAL);
    bad = (engine_batch_item){.seq = 3, .tokens = t, .n_tokens = 1}; /* never created */
    ck_assert_int_eq(engine_step(e, &bad, 1), ENGINE_EINVAL);
    engine_batch_item dup[2] = {{.seq = a, .tokens = t, .n_tokens = 1}, {.seq = a, .tokens = t, .n_tokens = 1}};
    ck_assert_int_eq(engine_step(e, dup, 2), ENGINE_EINVAL);

    /* Over the batch limit. */
    bad = (engine_batch_item){.seq = b, .tokens = t, .n_tokens = 33, .prompt = true};
    ck_assert_int_eq(engine_step(e, &bad, 1), ENGINE_EBATCH);
    engine_batch_item two[2] = {{.seq = a, .tokens = t, .n_tokens = 1},
                                {.seq = b, .tokens = t, .n_tokens = 32, .prompt = true}};
    ck_assert_int_eq(engine_step(e, two, 2), ENGINE_EBATCH);

    /* Past n_ctx (48): nothing changes. */
    bad = (engine_batch_item){.seq = a, .tokens = t, .n_tokens = 29, .prompt = true};
    ck_assert_int_eq(engine_step(e, &bad, 1), ENGINE_ECTX);
    ck_assert_int_eq(engine_seq_len(e, a), 20);
    ck_assert_int_eq(engine_kv_used_blocks(e), 2);

    /* More blocks than are free: nothing changes, for any item. */
    engine_batch_item need3[2] = {{.seq = a, .tokens = t + 20, .n_tokens = 13, .prompt = true},
                                  {.seq = b, .tokens = t, .n_tokens = 17, .prompt = true}};
    ck_assert_int_eq(engine_step(e, need3, 2), ENGINE_ENOKV);
    ck_assert_int_eq(engine_seq_len(e, a), 20);
    ck_assert_int_eq(engine_seq_len(e, b), 0);
    ck_assert_int_eq(engine_kv_used_blocks(e), 2);
    ck_assert_int_eq(engine_kv_free_blocks(e), 2);
    /* The sequence still works, and gives what it would have. */
    engine_batch_item next = {.seq = a, .tokens = t + 20, .n_tokens = 1};
    ck_assert_int_eq(engine_step(e, &next, 1), 0);
    ck_assert_int_eq(engine_seq_len(e, a), 21);

    /* Sequences: slots run out, freed ones are gone. */
    ck_assert_int_ge(engine_seq_create(e), 0);
    ck_assert_int_ge(engine_seq_create(e), 0);
    ck_assert_int_eq(engine_seq_create(e), ENGINE_ENOKV);
    engine_seq_free(e, b);
    ck_assert_int_eq(engine_seq_len(e, b), ENGINE_ESEQ);
    ck_assert_int_eq(engine_seq_fork(e, b, a), ENGINE_ESEQ);
    ck_assert_int_eq(engine_seq_prefix_attach(e, b, t, 20), ENGINE_ESEQ);
    ck_assert_int_eq(engine_seq_blocks_needed(e, b, 1), ENGINE_ESEQ);
    engine_seq_free(e, b); /* harmless */
    engine_seq_free(e, 99);
    ck_assert_str_eq(engine_strerror(ENGINE_ENOKV), "KV cache has no free blocks");
    ck_assert_str_eq(engine_strerror(12345), "unknown error");
    free(t);
    engine_close(e);
}
END_TEST

/* ==== Prefix cache and fork ============================================ */

static void same_or_close(const float *a, const float *b, int n, bool exact, const char *what) {
    if (exact) {
        ck_assert_msg(memcmp(a, b, (size_t)n * sizeof(float)) == 0, "%s: logits differ", what);
        return;
    }
    double max_ref = 0, max_diff = 0;
    for (int i = 0; i < n; i++) {
        max_ref = fmax(max_ref, fabs(b[i]));
        max_diff = fmax(max_diff, fabs((double)a[i] - b[i]));
    }
    ck_assert_msg(max_diff <= 1e-4 * max_ref, "%s: max diff %g (max |logit| %g)", what, max_diff, max_ref);
}

/* A prompt whose first 32 tokens come from the prefix cache gives the logits
 * of the whole prompt computed from scratch, bit for bit, through the
 * engine's kernels and through OpenBLAS (whose calls always have the same
 * row count, so a row's result does not depend on how the prompt was cut). */
static void prefix_cache_check(bool blas) {
    engine *e = open_bundled(blas, 1, 64, 128, 0);
    int V = engine_get_info(e)->n_vocab;
    int32_t *t = val_tokens(40);
    float *full = malloc((size_t)V * sizeof(float));
    int a = engine_seq_create(e);
    engine_batch_item it = {.seq = a, .tokens = t, .n_tokens = 40, .prompt = true};
    ck_assert_int_eq(engine_step(e, &it, 1), 0);
    memcpy(full, it.logits, (size_t)V * sizeof(float));
    engine_seq_free(e, a);

    engine_prefix_stats st0, st1;
    engine_get_prefix_stats(e, &st0);
    int b = engine_seq_create(e);
    int cached = engine_seq_prefix_attach(e, b, t, 40);
    ck_assert_int_eq(cached, 32);
    ck_assert_int_eq(engine_seq_len(e, b), 32);
    engine_get_prefix_stats(e, &st1);
    ck_assert_uint_eq(st1.queries - st0.queries, 32);
    ck_assert_uint_eq(st1.hits - st0.hits, 32);
    it = (engine_batch_item){.seq = b, .tokens = t + 32, .n_tokens = 8, .prompt = true};
    ck_assert_int_eq(engine_step(e, &it, 1), 0);
    same_or_close(it.logits, full, V, true, blas ? "prefix cache, blas" : "prefix cache, kernels");

    /* The same prompt in uneven chunks (3 + 29 + 8) gives the same bits. */
    int d = engine_seq_create(e);
    int cuts[] = {0, 3, 32, 40};
    for (int k = 0; k < 3; k++) {
        it = (engine_batch_item){.seq = d, .tokens = t + cuts[k], .n_tokens = cuts[k + 1] - cuts[k], .prompt = true};
        ck_assert_int_eq(engine_step(e, &it, 1), 0);
    }
    same_or_close(it.logits, full, V, true, blas ? "chunked, blas" : "chunked, kernels");
    engine_seq_free(e, d);

    /* A different prompt finds nothing. */
    int c = engine_seq_create(e);
    int32_t other[20];
    for (int i = 0; i < 20; i++) other[i] = 100 + i;
    ck_assert_int_eq(engine_seq_prefix_attach(e, c, other, 20), 0);
    free(full);
    free(t);
    engine_close(e);
}

START_TEST(test_prefix_cache_kernels) { prefix_cache_check(false); }
END_TEST

START_TEST(test_prefix_cache_blas) { prefix_cache_check(true); }
END_TEST

/* n > 1 choices: a fork continues exactly like the original. */
START_TEST(test_fork_continues_identically) {
    engine *e = open_bundled(true, 1, 64, 128, 0);
    int V = engine_get_info(e)->n_vocab;
    int32_t *t = val_tokens(40);
    int a = engine_seq_create(e);
    engine_batch_item it = {.seq = a, .tokens = t, .n_tokens = 21, .prompt = true};
    ck_assert_int_eq(engine_step(e, &it, 1), 0);
    int b = engine_seq_create(e);
    int used = engine_kv_used_blocks(e);
    ck_assert_int_eq(engine_seq_fork(e, a, b), 0);
    ck_assert_int_eq(engine_seq_len(e, b), 21);
    ck_assert_int_eq(engine_kv_used_blocks(e), used + 1); /* only the partial block is copied */
    ck_assert_int_eq(engine_seq_fork(e, a, b), ENGINE_EINVAL); /* b is not empty */
    ck_assert_int_eq(engine_seq_fork(e, a, a), ENGINE_EINVAL);

    /* Both decode the same tokens side by side... */
    float *la = malloc(5 * (size_t)V * sizeof(float)), *lb = malloc(5 * (size_t)V * sizeof(float));
    for (int k = 0; k < 5; k++) {
        engine_batch_item two[2] = {{.seq = a, .tokens = t + 21 + k, .n_tokens = 1},
                                    {.seq = b, .tokens = t + 21 + k, .n_tokens = 1}};
        ck_assert_int_eq(engine_step(e, two, 2), 0);
        memcpy(la + (size_t)k * (size_t)V, two[0].logits, (size_t)V * sizeof(float));
        memcpy(lb + (size_t)k * (size_t)V, two[1].logits, (size_t)V * sizeof(float));
    }
    ck_assert_msg(memcmp(la, lb, 5 * (size_t)V * sizeof(float)) == 0, "fork diverged from its source");
    /* ...and exactly as a sequence that was never forked. */
    engine_seq_free(e, a);
    engine_seq_free(e, b);
    int c = engine_seq_create(e);
    it = (engine_batch_item){.seq = c, .tokens = t, .n_tokens = 21, .prompt = true};
    ck_assert_int_eq(engine_step(e, &it, 1), 0);
    for (int k = 0; k < 5; k++) {
        engine_batch_item d = {.seq = c, .tokens = t + 21 + k, .n_tokens = 1};
        ck_assert_int_eq(engine_step(e, &d, 1), 0);
        ck_assert_msg(memcmp(d.logits, la + (size_t)k * (size_t)V, (size_t)V * sizeof(float)) == 0,
                      "step %d differs from the unforked run", k);
    }
    free(la);
    free(lb);
    free(t);
    engine_close(e);
}
END_TEST

/* ==== Threads ========================================================== */

/* The engine's kernels split rows over threads without changing any
 * element's arithmetic: 1 and 2 threads agree bit for bit. */
START_TEST(test_thread_count_invariance) {
    int32_t *t = val_tokens(40);
    float *out[2];
    int V = 0;
    for (int run = 0; run < 2; run++) {
        engine *e = open_bundled(false, run + 1, 64, 128, 0);
        ck_assert_int_eq(engine_get_info(e)->n_threads, run + 1);
        V = engine_get_info(e)->n_vocab;
        out[run] = malloc(4 * (size_t)V * sizeof(float));
        int s = engine_seq_create(e);
        engine_batch_item it = {.seq = s, .tokens = t, .n_tokens = 33, .prompt = true};
        ck_assert_int_eq(engine_step(e, &it, 1), 0);
        memcpy(out[run], it.logits, (size_t)V * sizeof(float));
        for (int k = 0; k < 3; k++) {
            engine_batch_item d = {.seq = s, .tokens = t + 33 + k, .n_tokens = 1};
            ck_assert_int_eq(engine_step(e, &d, 1), 0);
            memcpy(out[run] + (size_t)(k + 1) * (size_t)V, d.logits, (size_t)V * sizeof(float));
        }
        engine_close(e);
    }
    ck_assert_msg(memcmp(out[0], out[1], 4 * (size_t)V * sizeof(float)) == 0, "1 and 2 threads differ");
    free(out[0]);
    free(out[1]);
    free(t);
}
END_TEST

/* ==== Attention observer =============================================== */

typedef struct {
    int calls[16];
    int bad_rows;
    int rows;
} obs_state;

static void observer(int layer, int item, int n_head, int n_tokens, int pos0, int stride, const float *probs,
                     void *ud) {
    obs_state *s = ud;
    s->calls[layer]++;
    for (int t = 0; t < n_tokens; t++)
        for (int h = 0; h < n_head; h++) {
            const float *row = probs + ((size_t)t * (size_t)n_head + (size_t)h) * (size_t)stride;
            double sum = 0;
            bool ok = true;
            for (int j = 0; j <= pos0 + t; j++) {
                ok &= row[j] >= 0.0f && row[j] <= 1.0f;
                sum += row[j];
            }
            s->rows++;
            if (!ok || fabs(sum - 1.0) > 1e-4) s->bad_rows++;
        }
    (void)item;
}

START_TEST(test_attention_observer) {
    engine_params p = engine_default_params();
    p.model_path = BUNDLED_MODEL;
    p.n_threads = 1;
    p.max_seqs = 2;
    p.n_ctx = 64;
    p.capture_attention = true;
    engine *e = open_engine_params(&p);
    obs_state st;
    memset(&st, 0, sizeof st);
    engine_set_attn_observer(e, observer, &st);
    int32_t *t = val_tokens(12);
    int s = engine_seq_create(e);
    engine_batch_item it = {.seq = s, .tokens = t, .n_tokens = 10, .prompt = true};
    ck_assert_int_eq(engine_step(e, &it, 1), 0);
    engine_batch_item d = {.seq = s, .tokens = t + 10, .n_tokens = 1};
    ck_assert_int_eq(engine_step(e, &d, 1), 0);
    /* Layers 0-3 compute attention (twice: prompt and decode); 4-11 share. */
    for (int l = 0; l < 12; l++) ck_assert_int_eq(st.calls[l], l < 4 ? 2 : 0);
    ck_assert_int_eq(st.rows, 4 * 6 * 11);
    ck_assert_int_eq(st.bad_rows, 0);
    free(t);
    engine_close(e);
}
END_TEST

Suite *engine_suite(void) {
    Suite *s = suite_create("engine");
    TCase *tc = tcase_create("errors");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, test_step_errors);
    suite_add_tcase(s, tc);

    tc = tcase_create("cache");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, test_prefix_cache_kernels);
    tcase_add_test(tc, test_prefix_cache_blas);
    tcase_add_test(tc, test_fork_continues_identically);
    suite_add_tcase(s, tc);

    tc = tcase_create("threads");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, test_thread_count_invariance);
    tcase_add_test(tc, test_attention_observer);
    suite_add_tcase(s, tc);
    return s;
}
