/*
 * test_sampler.c - engine_sample, the RNG and the log-probability helpers
 * (engine.h): greedy, seeds, top_k / top_p / min_p, logit_bias, the three
 * penalties exactly as engine.h defines them, the empirical distribution
 * against softmax, and engine_logprob / engine_top_logprobs against a
 * double-precision log-softmax.
 */
#include <check.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "engine.h"

static void *scratch_for(int n) {
    void *s = malloc(engine_sample_scratch_bytes(n));
    ck_assert_ptr_nonnull(s);
    return s;
}

static engine_sampling plain(float temperature) {
    return (engine_sampling){.temperature = temperature, .top_k = 0, .top_p = 1.0f, .min_p = 0.0f,
                             .repetition_penalty = 1.0f};
}

static int32_t sample1(const float *logits, int n, const engine_sampling *p, uint64_t seed, const int32_t *hist,
                       int n_hist) {
    engine_rng rng;
    engine_rng_seed(&rng, seed);
    void *scratch = scratch_for(n);
    int32_t t = engine_sample(logits, n, p, &rng, hist, n_hist, scratch);
    free(scratch);
    return t;
}

/* Draws n samples; counts[] receives how often each id came up. */
static void draw(const float *logits, int n_vocab, const engine_sampling *p, uint64_t seed, int n, int *counts) {
    engine_rng rng;
    engine_rng_seed(&rng, seed);
    void *scratch = scratch_for(n_vocab);
    memset(counts, 0, (size_t)n_vocab * sizeof(int));
    for (int i = 0; i < n; i++) {
        int32_t t = engine_sample(logits, n_vocab, p, &rng, NULL, 0, scratch);
        ck_assert_int_ge(t, 0);
        ck_assert_int_lt(t, n_vocab);
        counts[t]++;
    }
    free(scratch);
}

/* Deterministic pseudo-random logits in [-a, a). */
static void fill_logits(float *v, int n, uint32_t seed, float a) {
    uint32_t x = seed * 2654435761u + 1;
    for (int i = 0; i < n; i++) {
        x = x * 1664525u + 1013904223u;
        v[i] = ((float)(x >> 8) / 16777216.0f * 2.0f - 1.0f) * a;
    }
}

/* ==== Greedy and seeds ================================================= */

START_TEST(test_greedy_argmax_lowest_tie) {
    const float l[] = {1.0f, 3.0f, 3.0f, 2.0f, -INFINITY};
    engine_sampling p = plain(0.0f);
    ck_assert_int_eq(sample1(l, 5, &p, 1, NULL, 0), 1);
    /* The same through the path that copies logits (a penalty on an
     * unrelated token, and a zero bias). */
    int32_t hist[] = {3};
    p.presence_penalty = 0.5f;
    ck_assert_int_eq(sample1(l, 5, &p, 1, hist, 1), 1);
    int32_t bid = 0;
    float bval = 0.0f;
    p = plain(0.0f);
    p.bias_ids = &bid;
    p.bias_values = &bval;
    p.n_bias = 1;
    ck_assert_int_eq(sample1(l, 5, &p, 1, NULL, 0), 1);
    /* Greedy ignores the RNG. */
    float big[1000];
    fill_logits(big, 1000, 7, 5.0f);
    int best = 0;
    for (int i = 1; i < 1000; i++)
        if (big[i] > big[best]) best = i;
    p = plain(0.0f);
    for (uint64_t s = 0; s < 20; s++) ck_assert_int_eq(sample1(big, 1000, &p, s, NULL, 0), best);
}
END_TEST

START_TEST(test_seed_reproducible) {
    float l[64];
    fill_logits(l, 64, 3, 1.0f);
    engine_sampling p = plain(1.0f);
    void *scratch = scratch_for(64);
    int32_t a[200], b[200], c[200];
    engine_rng r1, r2, r3;
    engine_rng_seed(&r1, 42);
    engine_rng_seed(&r2, 42);
    engine_rng_seed(&r3, 43);
    for (int i = 0; i < 200; i++) {
        a[i] = engine_sample(l, 64, &p, &r1, NULL, 0, scratch);
        b[i] = engine_sample(l, 64, &p, &r2, NULL, 0, scratch);
        c[i] = engine_sample(l, 64, &p, &r3, NULL, 0, scratch);
    }
    ck_assert_mem_eq(a, b, sizeof a);
    int differ = 0, distinct = 0;
    for (int i = 0; i < 200; i++) differ += a[i] != c[i];
    for (int i = 1; i < 200; i++) distinct += a[i] != a[0];
    ck_assert_msg(differ > 100, "seeds 42 and 43 agree on %d of 200 draws", 200 - differ);
    ck_assert_int_gt(distinct, 100); /* the state advances */
    free(scratch);
}
END_TEST

/* ==== Truncation ======================================================= */

START_TEST(test_top_k_one_is_greedy) {
    float l[300];
    fill_logits(l, 300, 11, 2.0f);
    l[123] = 2.5f;
    engine_sampling p = plain(5.0f);
    p.top_k = 1;
    int counts[300];
    draw(l, 300, &p, 5, 500, counts);
    ck_assert_int_eq(counts[123], 500);
    /* Ties at the top: the lowest id, as greedy. */
    const float t[] = {2.0f, 5.0f, 5.0f, 1.0f};
    draw(t, 4, &p, 6, 200, counts);
    ck_assert_int_eq(counts[1], 200);
}
END_TEST

START_TEST(test_top_k_two_renormalises) {
    const float l[] = {0.0f, 1.0f, 2.0f, -1.0f};
    engine_sampling p = plain(1.0f);
    p.top_k = 2;
    int counts[4];
    draw(l, 4, &p, 8, 20000, counts);
    double p2 = 1.0 / (1.0 + exp(-1.0)); /* id 2 vs id 1 */
    ck_assert_int_eq(counts[0] + counts[3], 0);
    ck_assert_double_eq_tol(counts[2] / 20000.0, p2, 0.015);
}
END_TEST

START_TEST(test_top_p) {
    const float l[] = {0.0f, 0.1f, 0.2f, 0.05f};
    engine_sampling p = plain(1.0f);
    p.top_p = 1e-6f;
    int counts[4];
    draw(l, 4, &p, 9, 500, counts);
    ck_assert_int_eq(counts[2], 500);
    /* p = 0.4, 0.3, 0.2, 0.1: top_p 0.5 keeps the first two (0.4 < 0.5 <= 0.7). */
    const float q[] = {logf(0.4f), logf(0.3f), logf(0.2f), logf(0.1f)};
    p.top_p = 0.5f;
    draw(q, 4, &p, 10, 20000, counts);
    ck_assert_int_eq(counts[2] + counts[3], 0);
    ck_assert_double_eq_tol(counts[0] / 20000.0, 0.4 / 0.7, 0.015);
    /* top_p 0.75 keeps three. */
    p.top_p = 0.75f;
    draw(q, 4, &p, 11, 20000, counts);
    ck_assert_int_eq(counts[3], 0);
    ck_assert_double_eq_tol(counts[2] / 20000.0, 0.2 / 0.9, 0.015);
}
END_TEST

START_TEST(test_min_p) {
    /* p = 0.5, 0.3, 0.15, 0.05. */
    const float l[] = {logf(0.5f), logf(0.3f), logf(0.15f), logf(0.05f)};
    engine_sampling p = plain(1.0f);
    p.min_p = 0.5f; /* keep p >= 0.25 */
    int counts[4];
    draw(l, 4, &p, 12, 20000, counts);
    ck_assert_int_eq(counts[2] + counts[3], 0);
    ck_assert_double_eq_tol(counts[0] / 20000.0, 0.5 / 0.8, 0.015);
    p.min_p = 0.2f; /* keep p >= 0.1 */
    draw(l, 4, &p, 13, 20000, counts);
    ck_assert_int_eq(counts[3], 0);
    ck_assert_int_gt(counts[2], 0);
    ck_assert_double_eq_tol(counts[2] / 20000.0, 0.15 / 0.95, 0.015);
}
END_TEST

/* ==== Bias and penalties =============================================== */

START_TEST(test_logit_bias) {
    const float l[] = {5.0f, 1.0f, 0.0f, -1.0f};
    int32_t ids[] = {3, 99, -1}; /* out-of-range ids are ignored */
    float vals[] = {100.0f, 100.0f, 100.0f};
    engine_sampling p = plain(1.0f);
    p.bias_ids = ids;
    p.bias_values = vals;
    p.n_bias = 3;
    int counts[4];
    draw(l, 4, &p, 14, 1000, counts);
    ck_assert_int_eq(counts[3], 1000);
    p.temperature = 0.0f;
    ck_assert_int_eq(sample1(l, 4, &p, 1, NULL, 0), 3);
    /* A negative bias removes the argmax. */
    int32_t id0 = 0;
    float neg = -100.0f;
    p.bias_ids = &id0;
    p.bias_values = &neg;
    p.n_bias = 1;
    ck_assert_int_eq(sample1(l, 4, &p, 1, NULL, 0), 1);
    /* Exact: 5 - 4.5 = 0.5 < 1 but 5 - 3.5 = 1.5 > 1. */
    neg = -4.5f;
    ck_assert_int_eq(sample1(l, 4, &p, 1, NULL, 0), 1);
    neg = -3.5f;
    ck_assert_int_eq(sample1(l, 4, &p, 1, NULL, 0), 0);
}
END_TEST

/* Greedy choice between a penalised token 0 and a competitor 1. */
static int32_t penalised_choice(float l0, float l1, const int32_t *hist, int n_hist, float rep, float pres,
                                float freq) {
    const float l[] = {l0, l1, -50.0f};
    engine_sampling p = plain(0.0f);
    p.repetition_penalty = rep;
    p.presence_penalty = pres;
    p.frequency_penalty = freq;
    return sample1(l, 3, &p, 1, hist, n_hist);
}

START_TEST(test_repetition_penalty) {
    int32_t h1[] = {0}, h3[] = {0, 0, 0}, hx[] = {-5, 77, 2};
    /* Positive logits are divided: 2 / 2 = 1. */
    ck_assert_int_eq(penalised_choice(2.0f, 0.999f, h1, 1, 2.0f, 0, 0), 0);
    ck_assert_int_eq(penalised_choice(2.0f, 1.001f, h1, 1, 2.0f, 0, 0), 1);
    /* Negative ones are multiplied: -1 * 2 = -2. */
    ck_assert_int_eq(penalised_choice(-1.0f, -1.999f, h1, 1, 2.0f, 0, 0), 1);
    ck_assert_int_eq(penalised_choice(-1.0f, -2.001f, h1, 1, 2.0f, 0, 0), 0);
    /* Once per token however often it was seen. */
    ck_assert_int_eq(penalised_choice(2.0f, 0.9f, h3, 3, 2.0f, 0, 0), 0);
    /* Only tokens in the history (out-of-range ids ignored). */
    ck_assert_int_eq(penalised_choice(2.0f, 1.5f, hx, 3, 2.0f, 0, 0), 0);
    /* No history, no penalty. */
    ck_assert_int_eq(penalised_choice(2.0f, 1.5f, NULL, 0, 2.0f, 0, 0), 0);
}
END_TEST

START_TEST(test_presence_frequency_penalty) {
    int32_t h1[] = {0}, h3[] = {0, 0, 0};
    /* Presence: once, whatever the count: 1 - 0.05 = 0.95 > 0.9. */
    ck_assert_int_eq(penalised_choice(1.0f, 0.9f, h3, 3, 1.0f, 0.05f, 0), 0);
    ck_assert_int_eq(penalised_choice(1.0f, 0.9f, h3, 3, 1.0f, 0.15f, 0), 1);
    /* Frequency: times the count: 1 - 3 * 0.03 = 0.91 > 0.9; 1 - 3 * 0.04 = 0.88 < 0.9. */
    ck_assert_int_eq(penalised_choice(1.0f, 0.9f, h3, 3, 1.0f, 0, 0.03f), 0);
    ck_assert_int_eq(penalised_choice(1.0f, 0.9f, h3, 3, 1.0f, 0, 0.04f), 1);
    ck_assert_int_eq(penalised_choice(1.0f, 0.9f, h1, 1, 1.0f, 0, 0.04f), 0);
    /* All three: the repetition penalty first, then presence + frequency:
     * 2 / 2 - 0.1 - 2 * 0.1 = 0.7.  (The other order would give 0.85.) */
    int32_t h2[] = {0, 0};
    ck_assert_int_eq(penalised_choice(2.0f, 0.65f, h2, 2, 2.0f, 0.1f, 0.1f), 0);
    ck_assert_int_eq(penalised_choice(2.0f, 0.75f, h2, 2, 2.0f, 0.1f, 0.1f), 1);
}
END_TEST

/* Penalties and bias change the distribution, not just the argmax: with
 * them, tokens 0 and 1 become equally likely. */
START_TEST(test_penalty_distribution) {
    const float l[] = {1.0f, 0.5f};
    int32_t hist[] = {0};
    engine_sampling p = plain(1.0f);
    p.presence_penalty = 0.5f;
    engine_rng rng;
    engine_rng_seed(&rng, 21);
    void *scratch = scratch_for(2);
    int c0 = 0;
    for (int i = 0; i < 20000; i++) c0 += engine_sample(l, 2, &p, &rng, hist, 1, scratch) == 0;
    ck_assert_double_eq_tol(c0 / 20000.0, 0.5, 0.015);
    free(scratch);
}
END_TEST

/* ==== Distribution ===================================================== */

static void check_distribution(const float *l, int n, float temperature, uint64_t seed) {
    engine_sampling p = plain(temperature);
    int counts[8];
    const int N = 20000;
    draw(l, n, &p, seed, N, counts);
    double z = 0, q[8];
    for (int i = 0; i < n; i++) z += exp((double)l[i] / temperature);
    for (int i = 0; i < n; i++) {
        q[i] = exp((double)l[i] / temperature) / z;
        /* 0.015 is over 4 standard deviations at N = 20000. */
        ck_assert_msg(fabs(counts[i] / (double)N - q[i]) < 0.015, "T=%g id %d: frequency %.4f, softmax %.4f",
                      temperature, i, counts[i] / (double)N, q[i]);
    }
}

START_TEST(test_distribution_matches_softmax) {
    const float l[] = {0.5f, -1.0f, 1.5f, 0.0f};
    check_distribution(l, 4, 1.0f, 31);
    check_distribution(l, 4, 0.5f, 32);
    check_distribution(l, 4, 2.0f, 33);
    const float u[] = {0, 0, 0, 0};
    check_distribution(u, 4, 1.0f, 34);
}
END_TEST

/* ==== Log-probabilities ================================================ */

static void ref_log_softmax(const float *l, int n, double *out) {
    double m = l[0];
    for (int i = 1; i < n; i++) m = fmax(m, l[i]);
    double s = 0;
    for (int i = 0; i < n; i++) s += exp((double)l[i] - m);
    double lse = m + log(s);
    for (int i = 0; i < n; i++) out[i] = (double)l[i] - lse;
}

START_TEST(test_logprob) {
    enum { N = 8192 };
    static float l[N];
    static double ref[N];
    fill_logits(l, N, 41, 12.0f);
    l[77] = 30.0f;
    ref_log_softmax(l, N, ref);
    double total = 0;
    for (int i = 0; i < N; i++) {
        float lp = engine_logprob(l, N, i);
        ck_assert_msg(fabs(lp - ref[i]) <= 1e-6 * fmax(1.0, fabs(ref[i])), "id %d: %.9g vs %.9g", i, lp, ref[i]);
        total += exp((double)lp);
    }
    ck_assert_double_eq_tol(total, 1.0, 1e-5);
    ck_assert(isinf(engine_logprob(l, N, -1)) && engine_logprob(l, N, -1) < 0);
    ck_assert(isinf(engine_logprob(l, N, N)) && engine_logprob(l, N, N) < 0);
}
END_TEST

START_TEST(test_top_logprobs) {
    enum { N = 5000 };
    static float l[N];
    static double ref[N];
    fill_logits(l, N, 43, 8.0f);
    /* A tie in the top five: the lower id comes first. */
    l[4000] = 9.0f;
    l[100] = 9.0f;
    l[2500] = 9.5f;
    ref_log_softmax(l, N, ref);
    int32_t ids[20];
    float lps[20];
    int k = engine_top_logprobs(l, N, 5, ids, lps);
    ck_assert_int_eq(k, 5);
    ck_assert_int_eq(ids[0], 2500);
    ck_assert_int_eq(ids[1], 100);
    ck_assert_int_eq(ids[2], 4000);
    for (int i = 0; i < k; i++) {
        ck_assert_msg(fabs(lps[i] - ref[ids[i]]) <= 1e-6 * fmax(1.0, fabs(ref[ids[i]])), "rank %d", i);
        ck_assert_float_eq(lps[i], engine_logprob(l, N, ids[i]));
        if (i > 0) ck_assert(lps[i] <= lps[i - 1]);
    }
    /* Every other token is less likely than the fifth. */
    for (int i = 0; i < N; i++) {
        bool listed = false;
        for (int j = 0; j < k; j++) listed |= ids[j] == i;
        if (!listed) ck_assert_msg(l[i] <= l[ids[4]], "id %d (%g) beats rank 5 (%g)", i, l[i], l[ids[4]]);
    }
    /* k = 20, k larger than the vocabulary, k = 0. */
    ck_assert_int_eq(engine_top_logprobs(l, N, 20, ids, lps), 20);
    for (int i = 1; i < 20; i++) ck_assert(lps[i] <= lps[i - 1]);
    const float small[] = {0.0f, 2.0f, 1.0f};
    ck_assert_int_eq(engine_top_logprobs(small, 3, 10, ids, lps), 3);
    ck_assert_int_eq(ids[0], 1);
    ck_assert_int_eq(ids[1], 2);
    ck_assert_int_eq(ids[2], 0);
    double sref[3];
    ref_log_softmax(small, 3, sref);
    for (int i = 0; i < 3; i++) ck_assert_double_eq_tol(lps[i], sref[ids[i]], 1e-6);
    ck_assert_int_eq(engine_top_logprobs(small, 3, 0, ids, lps), 0);
}
END_TEST

Suite *sampler_suite(void) {
    Suite *s = suite_create("sampler");
    TCase *tc = tcase_create("greedy-seed");
    tcase_add_test(tc, test_greedy_argmax_lowest_tie);
    tcase_add_test(tc, test_seed_reproducible);
    suite_add_tcase(s, tc);

    tc = tcase_create("truncation");
    tcase_add_test(tc, test_top_k_one_is_greedy);
    tcase_add_test(tc, test_top_k_two_renormalises);
    tcase_add_test(tc, test_top_p);
    tcase_add_test(tc, test_min_p);
    suite_add_tcase(s, tc);

    tc = tcase_create("bias-penalties");
    tcase_add_test(tc, test_logit_bias);
    tcase_add_test(tc, test_repetition_penalty);
    tcase_add_test(tc, test_presence_frequency_penalty);
    tcase_add_test(tc, test_penalty_distribution);
    suite_add_tcase(s, tc);

    tc = tcase_create("distribution");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_distribution_matches_softmax);
    suite_add_tcase(s, tc);

    tc = tcase_create("logprobs");
    tcase_add_test(tc, test_logprob);
    tcase_add_test(tc, test_top_logprobs);
    suite_add_tcase(s, tc);
    return s;
}
