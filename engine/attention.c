/*
 * attention.c - attention and Shared Attention over the paged cache; see
 * attention.h.
 *
 * Work is split over threads by (token, KV head): the query heads that read
 * one KV head (a GQA group) are handled together, so each cached K and V
 * element is loaded and converted once for the whole group.  Units are
 * interleaved over threads so the long causal rows of a prefill chunk spread
 * evenly.  Positions are walked block by block: one block-table lookup per
 * block_tokens positions.
 */
#include "attention.h"

#include <math.h>
#include <string.h>

#include "ops.h"

#define MAX_GROUP 64 /* query heads per KV head */

/* Scores of the group's heads over positions [0, n): s_j[p] = q_j . K_p * scale,
 * head j's row at out + j * ostride. */
static void group_scores(const attn_job *j, const kv_seq *s, int g, const float *q, int nq, float *out, size_t ostride,
                         int n, float scale) {
    const kv_cache *c = j->kv;
    int bt = c->block_tokens, hd = j->head_dim;
    size_t step = (size_t)c->n_head_kv * (size_t)hd; /* elements between positions of one block */
    for (int p0 = 0; p0 < n; p0 += bt) {
        int m = n - p0 < bt ? n - p0 : bt;
        ops.kv_dots(q, nq, kv_k_at(c, j->layer, s, p0, g), step, m, hd, c->f16, scale, out + p0, ostride);
    }
}

/* out_j = sum_p P_j[p] V_p over positions [0, n) of layer j->layer. */
static void group_weighted_v(const attn_job *j, const kv_seq *s, int g, const float *p, size_t pstride, int nq,
                             float *out, int n) {
    const kv_cache *c = j->kv;
    int bt = c->block_tokens, hd = j->head_dim;
    size_t step = (size_t)c->n_head_kv * (size_t)hd;
    memset(out, 0, (size_t)nq * (size_t)hd * sizeof(float));
    for (int p0 = 0; p0 < n; p0 += bt) {
        int m = n - p0 < bt ? n - p0 : bt;
        ops.kv_accum(out, nq, p + p0, pstride, kv_v_at(c, j->layer, s, p0, g), step, m, hd, c->f16);
    }
}

/* One pass over K and V with a running maximum per head (online softmax):
 * for layers whose probabilities nobody reuses, each block's scores become
 * weights and are applied to V right away, rescaling what was accumulated
 * when a head's maximum grows.  out_j = sum_p softmax(s_j)_p V_p. */
static void group_online(const attn_job *j, const kv_seq *s, int g, const float *q, int nq, float *out, int n,
                         float scale) {
    const kv_cache *c = j->kv;
    int bt = c->block_tokens, hd = j->head_dim;
    size_t step = (size_t)c->n_head_kv * (size_t)hd;
    float sc[nq * bt], mx[nq], sum[nq];
    for (int h = 0; h < nq; h++) mx[h] = -INFINITY, sum[h] = 0;
    memset(out, 0, (size_t)nq * (size_t)hd * sizeof(float));
    for (int p0 = 0; p0 < n; p0 += bt) {
        int cnt = n - p0 < bt ? n - p0 : bt;
        ops.kv_dots(q, nq, kv_k_at(c, j->layer, s, p0, g), step, cnt, hd, c->f16, scale, sc, (size_t)bt);
        for (int h = 0; h < nq; h++) {
            float *row = sc + (size_t)h * (size_t)bt;
            float bm = row[0];
            for (int i = 1; i < cnt; i++) bm = row[i] > bm ? row[i] : bm;
            if (bm > mx[h]) {
                float r = expf(mx[h] - bm); /* 0 on the first block */
                float *o = out + (size_t)h * (size_t)hd;
                for (int d = 0; d < hd; d++) o[d] *= r;
                sum[h] *= r;
                mx[h] = bm;
            }
            for (int i = 0; i < cnt; i++) {
                row[i] = expf(row[i] - mx[h]);
                sum[h] += row[i];
            }
        }
        ops.kv_accum(out, nq, sc, (size_t)bt, kv_v_at(c, j->layer, s, p0, g), step, cnt, hd, c->f16);
    }
    for (int h = 0; h < nq; h++) {
        float inv = 1.0f / sum[h];
        float *o = out + (size_t)h * (size_t)hd;
        for (int d = 0; d < hd; d++) o[d] *= inv;
    }
}

void attention_unit(attn_job *j, long u) {
    int H = j->n_head, G = j->n_head_kv, hd = j->head_dim, group = H / G;
    if (group > MAX_GROUP) group = MAX_GROUP; /* guarded at model load; keeps the stack bounded */
    float scale = 1.0f / sqrtf((float)hd);
    {
        int r = (int)(u / G), g = (int)(u % G), h0 = g * group;
        const kv_seq *s = &j->kv->seqs[j->row_seq[r]];
        int n = j->row_pos[r] + 1; /* causal: positions 0..pos */
        float *out = j->out + (size_t)r * (size_t)(H * hd) + (size_t)h0 * (size_t)hd;
        size_t pstride = (size_t)j->probs_stride;
        float *pr = j->probs ? j->probs + ((size_t)r * (size_t)H + (size_t)h0) * pstride : NULL;
        if (j->shared) {
            group_weighted_v(j, s, g, pr, pstride, group, out, n);
            return;
        }
        const float *q = j->q + (size_t)r * (size_t)(H * hd) + (size_t)h0 * (size_t)hd;
        if (!j->store_probs) {
            group_online(j, s, g, q, group, out, n, scale);
            return;
        }
        /* Probabilities that shared layers (or an observer) will read are
         * computed whole, exactly as the reference defines them. */
        group_scores(j, s, g, q, group, pr, pstride, n, scale);
        for (int h = 0; h < group; h++) softmax(pr + (size_t)h * pstride, n);
        group_weighted_v(j, s, g, pr, pstride, group, out, n);
    }
}

long attention_units(const attn_job *j) { return (long)j->n_rows * j->n_head_kv; }

void attention_rows(attn_job *j, int ith, int nth) {
    long total = (long)j->n_rows * j->n_head_kv;
    for (long u = ith; u < total; u += nth) attention_unit(j, u);
}

static void attention_worker(void *arg, int ith, int nth) { attention_rows(arg, ith, nth); }

void attention_run(pool *p, attn_job *job) { pool_run(p, attention_worker, job); }
