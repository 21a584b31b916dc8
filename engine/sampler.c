/*
 * sampler.c - token sampling; see engine.h.
 *
 * Order follows OpenAI and vLLM: bias and penalties change the logits, the
 * temperature scales them, and top_k / top_p / min_p then cut the tempered
 * distribution before one draw.  Everything works in the caller's scratch, so
 * sampling never allocates.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "engine.h"

typedef struct {
    float logit;
    int32_t id;
} cand;

/* ==== RNG: xoshiro256** seeded through splitmix64 ====================== */

static uint64_t splitmix(uint64_t *x) {
    uint64_t z = (*x += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

void engine_rng_seed(engine_rng *r, uint64_t seed) {
    for (int i = 0; i < 4; i++) r->s[i] = splitmix(&seed);
}

static uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

static uint64_t rng_next(engine_rng *r) {
    uint64_t *s = r->s;
    uint64_t out = rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return out;
}

/* Uniform in [0, 1). */
static double rng_uniform(engine_rng *r) { return (double)(rng_next(r) >> 11) * (1.0 / 9007199254740992.0); }

/* ==== Sampling ========================================================= */

size_t engine_sample_scratch_bytes(int n_vocab) { return (size_t)n_vocab * (sizeof(cand) + sizeof(int32_t)); }

static int cmp_desc(const void *a, const void *b) {
    const cand *x = a, *y = b;
    if (x->logit != y->logit) return x->logit < y->logit ? 1 : -1;
    return x->id - y->id;
}

static int32_t argmax(const float *v, int n) {
    int32_t best = 0;
    for (int i = 1; i < n; i++)
        if (v[i] > v[best]) best = i;
    return best;
}

/* Moves the k largest to the front, sorted (partial selection, then qsort). */
static void top_k_sorted(cand *c, int n, int k) {
    if (k < n) {
        /* Quickselect on logit so that c[0..k) are the k largest. */
        int lo = 0, hi = n - 1;
        while (lo < hi) {
            cand pivot = c[(lo + hi) / 2];
            int i = lo, j = hi;
            while (i <= j) {
                while (cmp_desc(&c[i], &pivot) < 0) i++;
                while (cmp_desc(&c[j], &pivot) > 0) j--;
                if (i <= j) {
                    cand t = c[i];
                    c[i] = c[j];
                    c[j] = t;
                    i++;
                    j--;
                }
            }
            if (k - 1 <= j) hi = j;
            else if (k - 1 >= i) lo = i;
            else break;
        }
    }
    qsort(c, (size_t)(k < n ? k : n), sizeof *c, cmp_desc);
}

int32_t engine_sample(const float *logits, int n_vocab, const engine_sampling *p, engine_rng *rng,
                      const int32_t *history, int n_history, void *scratch) {
    cand *c = scratch;
    int32_t *count = (int32_t *)(c + n_vocab);
    bool penalties = p->repetition_penalty != 1.0f || p->presence_penalty != 0 || p->frequency_penalty != 0;
    if (!penalties && p->n_bias == 0 && p->temperature <= 0) return argmax(logits, n_vocab);

    for (int i = 0; i < n_vocab; i++) c[i] = (cand){logits[i], i};
    for (int i = 0; i < p->n_bias; i++)
        if (p->bias_ids[i] >= 0 && p->bias_ids[i] < n_vocab) c[p->bias_ids[i]].logit += p->bias_values[i];
    if (penalties && n_history > 0) {
        for (int i = 0; i < n_history; i++)
            if (history[i] >= 0 && history[i] < n_vocab) count[history[i]] = 0;
        for (int i = 0; i < n_history; i++)
            if (history[i] >= 0 && history[i] < n_vocab) count[history[i]]++;
        for (int i = 0; i < n_history; i++) {
            int32_t id = history[i];
            if (id < 0 || id >= n_vocab || count[id] == 0) continue; /* each id once */
            float *l = &c[id].logit;
            if (p->repetition_penalty != 1.0f) *l = *l > 0 ? *l / p->repetition_penalty : *l * p->repetition_penalty;
            *l -= p->presence_penalty + p->frequency_penalty * (float)count[id];
            count[id] = 0;
        }
    }
    if (p->temperature <= 0) {
        int32_t best = 0;
        for (int i = 1; i < n_vocab; i++)
            if (c[i].logit > c[best].logit) best = i;
        return best;
    }
    float inv_t = 1.0f / p->temperature;
    for (int i = 0; i < n_vocab; i++) c[i].logit *= inv_t;

    int n = n_vocab;
    int k = p->top_k > 0 && p->top_k < n ? p->top_k : n;
    /* Sorting the whole vocabulary is only needed for top_p/min_p; cap the
     * sort at top_k when given. */
    bool need_sort = k < n || p->top_p < 1.0f || p->min_p > 0;
    if (need_sort) {
        top_k_sorted(c, n, k);
        n = k;
    }
    float maxl = c[0].logit;
    if (!need_sort)
        for (int i = 1; i < n; i++) maxl = c[i].logit > maxl ? c[i].logit : maxl;
    double sum = 0;
    for (int i = 0; i < n; i++) sum += exp((double)(c[i].logit - maxl));
    if (need_sort && p->top_p < 1.0f) {
        double acc = 0;
        int keep = n;
        for (int i = 0; i < n; i++) {
            acc += exp((double)(c[i].logit - maxl)) / sum;
            if (acc >= p->top_p) {
                keep = i + 1;
                break;
            }
        }
        n = keep;
    }
    if (need_sort && p->min_p > 0) {
        /* c[0] is the most likely: keep tokens with p >= min_p * p_max. */
        double cut = log(p->min_p);
        int keep = 1;
        while (keep < n && (double)(c[keep].logit - maxl) >= cut) keep++;
        n = keep;
    }
    sum = 0;
    for (int i = 0; i < n; i++) sum += exp((double)(c[i].logit - maxl));
    double u = rng_uniform(rng) * sum, acc = 0;
    for (int i = 0; i < n; i++) {
        acc += exp((double)(c[i].logit - maxl));
        if (u < acc) return c[i].id;
    }
    return c[n - 1].id;
}

/* ==== Log-probabilities ================================================ */

static double log_sum_exp(const float *logits, int n) {
    float m = logits[0];
    for (int i = 1; i < n; i++) m = logits[i] > m ? logits[i] : m;
    double s = 0;
    for (int i = 0; i < n; i++) s += exp((double)(logits[i] - m));
    return (double)m + log(s);
}

float engine_logprob(const float *logits, int n_vocab, int32_t id) {
    if (id < 0 || id >= n_vocab) return -INFINITY;
    return (float)((double)logits[id] - log_sum_exp(logits, n_vocab));
}

int engine_top_logprobs(const float *logits, int n_vocab, int k, int32_t *ids, float *logprobs) {
    if (k > n_vocab) k = n_vocab;
    if (k <= 0) return 0;
    double lse = log_sum_exp(logits, n_vocab);
    /* Insertion into a small sorted list: k is at most 20. */
    int n = 0;
    for (int i = 0; i < n_vocab; i++) {
        float v = logits[i];
        if (n == k && v <= logprobs[k - 1]) continue;
        int j = n < k ? n++ : k - 1;
        while (j > 0 && logprobs[j - 1] < v) {
            logprobs[j] = logprobs[j - 1];
            ids[j] = ids[j - 1];
            j--;
        }
        logprobs[j] = v;
        ids[j] = i;
    }
    for (int i = 0; i < n; i++) logprobs[i] = (float)((double)logprobs[i] - lse);
    return n;
}
