/*
 * attention.h - causal attention over the paged KV cache, including Shared
 * Attention.
 *
 * For a layer that computes its own attention, each (token, query head) row
 * gets P = softmax(q . K^T / sqrt(d)) over the positions up to its own, and
 * out = P V: in one pass with an online softmax, or, when the layer is the
 * source of shared layers (or an observer wants them), with P written whole
 * to the probability scratch, laid out [token][head][n_ctx].
 *
 * A shared layer reads P from the scratch, as its source left it, and forms
 * out = P V with its own V: no Q, no K, no QK^T and no softmax.  Query head h
 * reads KV head h / (n_head / n_head_kv) in both cases (GQA).
 */
#ifndef SASERVE_ATTENTION_H
#define SASERVE_ATTENTION_H

#include <stdbool.h>

#include "kv_cache.h"
#include "pool.h"

typedef struct {
    const kv_cache *kv;
    int layer;
    bool shared;         /* reuse probs instead of computing them */
    bool store_probs;    /* (not shared) write P to probs */
    int n_rows;          /* tokens in the batch */
    const int *row_seq;  /* [n_rows] sequence of each token */
    const int *row_pos;  /* [n_rows] position of each token */
    int n_head, n_head_kv, head_dim;
    const float *q;      /* [n_rows][n_head*head_dim], after RoPE; unused when shared */
    float *out;          /* [n_rows][n_head*head_dim] */
    float *probs;        /* [n_rows][n_head][probs_stride] */
    int probs_stride;
} attn_job;

void attention_run(pool *p, attn_job *job);
/* This thread's share of the rows (for callers already inside a pool job). */
void attention_rows(attn_job *job, int ith, int nth);
/* One unit of work: token u / n_head_kv with the query heads of KV head
 * u % n_head_kv.  There are n_rows * n_head_kv units. */
long attention_units(const attn_job *job);
void attention_unit(attn_job *job, long u);

#endif
