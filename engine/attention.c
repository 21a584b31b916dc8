/*
 * attention.c - attention and Shared Attention over the paged cache; see
 * attention.h.
 *
 * Work is split over threads by (token, head) rows, interleaved so that the
 * long causal rows of a prefill chunk spread evenly.  Within a row, positions
 * are walked block by block so each block-table lookup covers block_tokens
 * positions.
 */
#include "attention.h"

#include <math.h>
#include <string.h>

#include "ops.h"

/* Scores for one query row over positions [0, n): s[j] = q . K_j * scale. */
static void row_scores(const attn_job *j, const kv_seq *s, int g, const float *q, float *out, int n, float scale) {
    const kv_cache *c = j->kv;
    int bt = c->block_tokens, hd = j->head_dim;
    size_t step = (size_t)c->n_head_kv * (size_t)hd; /* elements between positions of one block */
    for (int p0 = 0; p0 < n; p0 += bt) {
        int m = n - p0 < bt ? n - p0 : bt;
        ops.kv_dots(q, kv_k_at(c, j->layer, s, p0, g), step, m, hd, c->f16, scale, out + p0);
    }
}

/* out = sum_j p[j] V_j over positions [0, n) of layer j->layer. */
static void row_weighted_v(const attn_job *j, const kv_seq *s, int g, const float *p, float *out, int n) {
    const kv_cache *c = j->kv;
    int bt = c->block_tokens, hd = j->head_dim;
    size_t step = (size_t)c->n_head_kv * (size_t)hd;
    memset(out, 0, (size_t)hd * sizeof(float));
    for (int p0 = 0; p0 < n; p0 += bt) {
        int m = n - p0 < bt ? n - p0 : bt;
        ops.kv_accum(out, p + p0, kv_v_at(c, j->layer, s, p0, g), step, m, hd, c->f16);
    }
}

/* One pass over K and V with a running maximum (online softmax): for layers
 * whose probabilities nobody reuses, each block's scores are turned into
 * weights and applied to V right away, rescaling what was accumulated when
 * the maximum grows.  out = sum_j softmax(s)_j V_j. */
static void row_online(const attn_job *j, const kv_seq *s, int g, const float *q, float *out, int n, float scale) {
    const kv_cache *c = j->kv;
    int bt = c->block_tokens, hd = j->head_dim;
    size_t step = (size_t)c->n_head_kv * (size_t)hd;
    float sc[bt];
    float m = -INFINITY, sum = 0;
    memset(out, 0, (size_t)hd * sizeof(float));
    for (int p0 = 0; p0 < n; p0 += bt) {
        int cnt = n - p0 < bt ? n - p0 : bt;
        ops.kv_dots(q, kv_k_at(c, j->layer, s, p0, g), step, cnt, hd, c->f16, scale, sc);
        float bm = sc[0];
        for (int i = 1; i < cnt; i++) bm = sc[i] > bm ? sc[i] : bm;
        if (bm > m) {
            float r = expf(m - bm); /* 0 on the first block */
            for (int d = 0; d < hd; d++) out[d] *= r;
            sum *= r;
            m = bm;
        }
        for (int i = 0; i < cnt; i++) {
            sc[i] = expf(sc[i] - m);
            sum += sc[i];
        }
        ops.kv_accum(out, sc, kv_v_at(c, j->layer, s, p0, g), step, cnt, hd, c->f16);
    }
    float inv = 1.0f / sum;
    for (int d = 0; d < hd; d++) out[d] *= inv;
}

void attention_rows(attn_job *j, int ith, int nth) {
    int H = j->n_head, hd = j->head_dim, group = j->n_head / j->n_head_kv;
    float scale = 1.0f / sqrtf((float)hd);
    long total = (long)j->n_rows * H;
    for (long u = ith; u < total; u += nth) {
        int r = (int)(u / H), h = (int)(u % H), g = h / group;
        const kv_seq *s = &j->kv->seqs[j->row_seq[r]];
        int n = j->row_pos[r] + 1; /* causal: positions 0..pos */
        float *out = j->out + (size_t)r * (size_t)(H * hd) + (size_t)h * (size_t)hd;
        float *pr = j->probs ? j->probs + ((size_t)r * (size_t)H + (size_t)h) * (size_t)j->probs_stride : NULL;
        if (j->shared) {
            row_weighted_v(j, s, g, pr, out, n);
            continue;
        }
        const float *q = j->q + (size_t)r * (size_t)(H * hd) + (size_t)h * (size_t)hd;
        if (!j->store_probs) {
            row_online(j, s, g, q, out, n, scale);
            continue;
        }
        /* Probabilities that shared layers (or an observer) will read are
         * computed whole, exactly as the reference defines them. */
        row_scores(j, s, g, q, pr, n, scale);
        softmax(pr, n);
        row_weighted_v(j, s, g, pr, out, n);
    }
}

static void attention_worker(void *arg, int ith, int nth) { attention_rows(arg, ith, nth); }

void attention_run(pool *p, attn_job *job) { pool_run(p, attention_worker, job); }
