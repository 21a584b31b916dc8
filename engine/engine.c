/*
 * engine.c - model open/close, the batched forward pass, and the public
 * engine API; see engine.h.
 *
 * A step runs every token of every item as one batch: each weight matrix is
 * read once for all rows.  Rows are ordered decode-first, prompt-last, so the
 * prompt rows form one contiguous block that can go through OpenBLAS.
 * Attention then runs per token over its own sequence's blocks.
 */
#include "engine.h"

#include <cblas.h>
#include <math.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stdatomic.h>
#include <unistd.h>

#include "attention.h"
#include "cpu.h"
#include "kv_cache.h"
#include "log.h"
#include "model.h"
#include "ops.h"
#include "pool.h"
#include "tokenizer.h"

/* Cap on the f32 buffer that holds dequantised weight rows for sgemm. */
#define BLAS_TILE_BYTES (32u << 20)
/* Rows per OpenBLAS call (see matmul_blas).  A multiple of OpenBLAS's
 * largest M unroll (16 on SkylakeX, 8 or less elsewhere). */
#define BLAS_M 64
#define WO_CHUNK 32  /* least output rows per chunk of the fused step (see wo_chunk) */
#define FFN_CHUNK 64
/* Phases per layer in the fused path (see there). */
enum { PH_QKV, PH_ATTN, PH_WO, PH_FFN, PH_DOWN, PH_PER_LAYER };

typedef struct phase_ctl {
    atomic_int next;  /* next chunk to hand out */
    atomic_uint done; /* chunks finished */
    int n;
} phase_ctl;

struct engine {
    engine_params params;
    model m;
    tokenizer *tok;
    pool *pool;
    kv_cache kv;
    engine_info info;
    char shared_str[256];

    bool *shared;     /* [n_layer] layer reuses its source's probabilities */
    int *source;      /* [n_layer] */
    bool *has_k;      /* [n_layer] computes attention: has a K plane */
    bool *keep_probs; /* [n_layer] write probabilities to the scratch */

    int n_ctx, max_T;
    int wo_chunk, ffn_chunk; /* output rows per chunk of the fused step's phases */
    int q_group;             /* query heads per chunk of the QKV phase */
    float *rope_cos, *rope_sin; /* [n_ctx][n_rot/2] */

    /* Activations, [max_T][width] each. */
    float *x, *xn, *q, *k, *v, *att, *tmp, *gate, *up;
    float *hid;    /* [max_T][n_embd] final hidden rows that need logits */
    float *logits; /* [max_T][n_vocab] */
    float *probs;  /* [max_T][n_head][n_ctx] when any layer keeps them */
    float *tile;   /* dequantised weight rows for sgemm */
    float *xn_t;   /* [n_threads][rows][n_embd]: per-thread normed rows (fused path) */
    struct phase_ctl *phases; /* [n_layer * 5 + 2] fused-path phases */
    size_t tile_floats;

    /* Row bookkeeping for the current step. */
    int *row_seq, *row_pos, *row_item;
    int32_t *row_tok;
    int *out_row;       /* [max_T] rows whose logits are computed */
    int *item_first;    /* [max_T] first row of each item */

    /* Counters: written by the engine thread, read from any thread. */
    _Atomic uint64_t tokens_processed;
    _Atomic double flops_saved;
    engine_attn_observer observer;
    void *observer_ud;
};

static const struct {
    int code;
    const char *msg;
} err_table[] = {
#define ENGINE_ERR_ROW(name, val, msg) {val, msg},
    ENGINE_ERRNO_MAP(ENGINE_ERR_ROW)
#undef ENGINE_ERR_ROW
};

const char *engine_strerror(int err) {
    for (size_t i = 0; i < sizeof err_table / sizeof err_table[0]; i++)
        if (err_table[i].code == err) return err_table[i].msg;
    return "unknown error";
}

engine_params engine_default_params(void) {
    return (engine_params){
        .model_path = NULL,
        .shared_layers = NULL,
        .n_threads = 0,
        .n_ctx = 0,
        .kv_cache_bytes = 0,
        .kv_type = ENGINE_KV_F16,
        .kv_block_tokens = 16,
        .max_batch_tokens = 512,
        .max_seqs = 64,
        .prefix_cache = true,
        .capture_attention = false,
        .kernels = NULL,
        .blas_prompt = true,
    };
}

/* ==== Open / close ===================================================== */

static size_t mem_available(void) {
    FILE *f = fopen("/proc/meminfo", "r");
    if (!f) return 0;
    char line[256];
    size_t kb = 0;
    while (fgets(line, sizeof line, f))
        if (sscanf(line, "MemAvailable: %zu kB", &kb) == 1) break;
    fclose(f);
    return kb * 1024;
}

/* Memory this process may use at most: MemTotal, or less under a cgroup
 * memory limit (v2 memory.max, v1 memory.limit_in_bytes).  0 if unknown. */
static size_t mem_limit(void) {
    size_t limit = 0, kb = 0;
    char line[256];
    FILE *f = fopen("/proc/meminfo", "r");
    if (f) {
        while (fgets(line, sizeof line, f))
            if (sscanf(line, "MemTotal: %zu kB", &kb) == 1) break;
        fclose(f);
        limit = kb * 1024;
    }
    static const char *const cg[] = {"/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"};
    for (size_t i = 0; i < sizeof cg / sizeof cg[0]; i++) {
        unsigned long long v;
        f = fopen(cg[i], "r");
        if (!f) continue;
        if (fgets(line, sizeof line, f) && sscanf(line, "%llu", &v) == 1 && v > 0 && (!limit || v < limit))
            limit = (size_t)v;
        fclose(f);
    }
    return limit;
}

void engine_guard_sigbus(void) {
    _Static_assert(ENGINE_SIGBUS_EXIT == GGUF_SIGBUS_EXIT, "exit codes differ");
    gguf_guard_sigbus();
}

static const char *human_bytes(size_t n, char *buf, size_t cap) {
    static const char *const units[] = {"bytes", "KiB", "MiB", "GiB", "TiB", "PiB"};
    double v = (double)n;
    int u = 0;
    while (v >= 1024 && u < 5) v /= 1024, u++;
    if (u == 0) snprintf(buf, cap, "%zu bytes", n);
    else snprintf(buf, cap, "%.1f %s", v, units[u]);
    return buf;
}

static void *xcalloc(size_t n, size_t size, bool *ok) {
    void *p = calloc(n ? n : 1, size);
    if (!p) *ok = false;
    return p;
}

static int setup_sharing(engine *e, char *err, size_t errlen) {
    model *m = &e->m;
    const char *setting = e->params.shared_layers;
    const char *origin = "config";
    if (!setting) {
        setting = m->shared_layers_key[0] ? m->shared_layers_key : "none";
        origin = m->shared_layers_key[0] ? "model" : "none";
    }
    int rc = engine_parse_shared_layers(setting, m->n_layer, e->shared, err, errlen);
    if (rc && strcmp(origin, "model") == 0) {
        /* Say where the bad setting came from: the file, not the user. */
        char why[256];
        snprintf(why, sizeof why, "%s", err);
        snprintf(err, errlen, "metadata key 'saserve.shared_layers' = '%s': %s", setting, why);
    }
    if (rc) return rc;
    if (strcmp(origin, "config") == 0 && m->shared_layers_key[0]) {
        /* Compare the layer sets, not the text: "4-5,6-11" is the model's "4-11". */
        bool model_mask[1024];
        char a[256];
        if (engine_parse_shared_layers(m->shared_layers_key, m->n_layer, model_mask, a, sizeof a) == 0 &&
            memcmp(model_mask, e->shared, (size_t)m->n_layer * sizeof(bool)) != 0) {
            engine_format_shared_layers(model_mask, m->n_layer, a, sizeof a);
            ELOG_WARN("shared layers set to '%s', overriding the model's own setting '%s': this model was trained "
                      "with its setting and is only correct with it", setting, a);
        }
    }
    engine_format_shared_layers(e->shared, m->n_layer, e->shared_str, sizeof e->shared_str);
    e->info.shared_origin = strcmp(e->shared_str, "none") == 0 ? "none" : origin;
    int n_shared = 0;
    for (int l = 0; l < m->n_layer; l++) {
        e->source[l] = e->shared[l] ? e->source[l - 1] : l;
        e->has_k[l] = !e->shared[l];
        n_shared += e->shared[l];
    }
    for (int l = 0; l < m->n_layer; l++) {
        e->keep_probs[l] = false;
        if (e->params.capture_attention && !e->shared[l]) e->keep_probs[l] = true;
    }
    for (int l = 0; l < m->n_layer; l++)
        if (e->shared[l]) e->keep_probs[e->source[l]] = true;
    e->info.n_shared = n_shared;
    return 0;
}

int engine_open(const engine_params *params, engine **out, char *err, size_t errlen) {
    *out = NULL;
    if (!params || !params->model_path) {
        snprintf(err, errlen, "no model path given");
        return ENGINE_EINVAL;
    }
    engine *e = calloc(1, sizeof *e);
    if (!e) {
        snprintf(err, errlen, "out of memory");
        return ENGINE_ENOMEM;
    }
    e->params = *params;
    engine_params *p = &e->params;
    const char *kernels = ops_init(p->kernels);
    int rc = model_load(&e->m, p->model_path, err, errlen);
    if (rc) goto fail;
    model *m = &e->m;
    rc = tokenizer_load(&e->tok, m->g, err, errlen);
    if (rc) goto fail;
    if (tokenizer_n_vocab(e->tok) != m->n_vocab) {
        snprintf(err, errlen, "vocabulary has %d tokens but token_embd.weight has %d rows", tokenizer_n_vocab(e->tok),
                 m->n_vocab);
        rc = ENGINE_EFORMAT;
        goto fail;
    }

    /* Limits. */
    e->n_ctx = p->n_ctx > 0 ? p->n_ctx : m->n_ctx_train;
    if (p->kv_block_tokens < 1 || p->kv_block_tokens > 1024) p->kv_block_tokens = 16;
    if (p->max_batch_tokens < 1) p->max_batch_tokens = 512;
    if (p->max_seqs < 1) p->max_seqs = 1;
    if (p->max_seqs > 4096) p->max_seqs = 4096;
    e->max_T = p->max_batch_tokens;
    if (p->n_threads <= 0) {
        long n = sysconf(_SC_NPROCESSORS_ONLN);
        p->n_threads = n > 0 ? (int)n : 1;
    }

    bool ok = true;
    int L = m->n_layer;
    e->shared = xcalloc((size_t)L, sizeof *e->shared, &ok);
    e->source = xcalloc((size_t)L, sizeof *e->source, &ok);
    e->has_k = xcalloc((size_t)L, sizeof *e->has_k, &ok);
    e->keep_probs = xcalloc((size_t)L, sizeof *e->keep_probs, &ok);
    if (!ok) goto oom;
    rc = setup_sharing(e, err, errlen);
    if (rc) goto fail;

    /* KV pool. */
    kv_cache_params kp = {.n_layer = L, .n_head_kv = m->n_head_kv, .head_dim = m->head_dim,
                          .block_tokens = p->kv_block_tokens, .n_ctx = e->n_ctx, .max_seqs = p->max_seqs,
                          .f16 = p->kv_type == ENGINE_KV_F16, .prefix_cache = p->prefix_cache, .has_k = e->has_k};
    size_t block_bytes = kv_block_bytes(&kp);
    size_t blocks_per_ctx = (size_t)((e->n_ctx + p->kv_block_tokens - 1) / p->kv_block_tokens);
    size_t want = p->kv_cache_bytes;
    if (want == 0) {
        want = (size_t)p->max_seqs * blocks_per_ctx * block_bytes;
        size_t avail = mem_available();
        if (avail && want > avail / 4) want = avail / 4;
        if (want < blocks_per_ctx * block_bytes) want = blocks_per_ctx * block_bytes;
    }
    size_t n_blocks = want / block_bytes;
    if (n_blocks < 1 || n_blocks > (1u << 30)) {
        snprintf(err, errlen, "KV cache of %zu bytes holds %zu blocks of %zu bytes; need at least one", want, n_blocks,
                 block_bytes);
        rc = ENGINE_EINVAL;
        goto fail;
    }
    kp.n_blocks = (int)n_blocks;
    /* A pool beyond the machine's memory would not fail cleanly when it is
     * backed (the kernel's OOM killer would end the process instead): refuse
     * it now, with the numbers. */
    size_t limit = mem_limit(), pool_bytes = n_blocks * block_bytes;
    char hb[32], hl[32];
    if (limit && pool_bytes > limit) {
        snprintf(err, errlen,
                 "KV cache of %s does not fit in memory (%s for this process, model not counted); lower "
                 "--kv-cache-bytes (0 sizes it automatically)",
                 human_bytes(pool_bytes, hb, sizeof hb), human_bytes(limit, hl, sizeof hl));
        rc = ENGINE_ENOMEM;
        goto fail;
    }
    if (kv_init(&e->kv, &kp) != 0) {
        snprintf(err, errlen, "cannot allocate a KV cache of %s: out of memory; lower --kv-cache-bytes",
                 human_bytes(pool_bytes, hb, sizeof hb));
        rc = ENGINE_ENOMEM;
        goto fail;
    }

    /* RoPE tables, computed as the float32 reference does: inv_freq and the
     * angle pos * inv_freq are rounded to float before cos/sin. */
    int half = m->n_rot / 2;
    e->rope_cos = xcalloc((size_t)e->n_ctx * (size_t)half, sizeof(float), &ok);
    e->rope_sin = xcalloc((size_t)e->n_ctx * (size_t)half, sizeof(float), &ok);
    if (!ok) goto oom;
    for (int i = 0; i < half; i++) {
        float inv = 1.0f / powf(m->rope_base, (float)(2 * i) / (float)m->n_rot);
        if (m->rope_freqs) inv /= m->rope_freqs[i];
        if (m->rope_linear > 1.0f) inv /= m->rope_linear;
        for (int pos = 0; pos < e->n_ctx; pos++) {
            float ang = (float)pos * inv;
            e->rope_cos[(size_t)pos * (size_t)half + (size_t)i] = (float)cos((double)ang);
            e->rope_sin[(size_t)pos * (size_t)half + (size_t)i] = (float)sin((double)ang);
        }
    }

    /* Activations.  Row buffers get BLAS_M - 1 spare rows: OpenBLAS calls
     * always take BLAS_M rows, the last group padded (see matmul_blas). */
    size_t T = (size_t)e->max_T + BLAS_M - 1;
    int qd = m->n_head * m->head_dim, kvd = m->n_head_kv * m->head_dim;
    e->x = xcalloc(T * (size_t)m->n_embd, sizeof(float), &ok);
    e->xn = xcalloc(T * (size_t)m->n_embd, sizeof(float), &ok);
    e->tmp = xcalloc(T * (size_t)m->n_embd, sizeof(float), &ok);
    e->hid = xcalloc(T * (size_t)m->n_embd, sizeof(float), &ok);
    e->q = xcalloc(T * (size_t)qd, sizeof(float), &ok);
    e->att = xcalloc(T * (size_t)qd, sizeof(float), &ok);
    e->k = xcalloc(T * (size_t)kvd, sizeof(float), &ok);
    e->v = xcalloc(T * (size_t)kvd, sizeof(float), &ok);
    e->gate = xcalloc(T * (size_t)m->n_ff, sizeof(float), &ok);
    e->up = xcalloc(T * (size_t)m->n_ff, sizeof(float), &ok);
    e->logits = xcalloc(T * (size_t)m->n_vocab, sizeof(float), &ok);
    e->xn_t = xcalloc((size_t)p->n_threads * T * (size_t)m->n_embd, sizeof(float), &ok);
    e->phases = xcalloc((size_t)L * PH_PER_LAYER + 2, sizeof *e->phases, &ok);
    e->row_seq = xcalloc(T, sizeof(int), &ok);
    e->row_pos = xcalloc(T, sizeof(int), &ok);
    e->row_item = xcalloc(T, sizeof(int), &ok);
    e->row_tok = xcalloc(T, sizeof(int32_t), &ok);
    e->out_row = xcalloc(T, sizeof(int), &ok);
    e->item_first = xcalloc(T, sizeof(int), &ok);
    bool any_probs = false;
    for (int l = 0; l < L; l++) any_probs |= e->keep_probs[l];
    if (any_probs) {
        size_t n = T * (size_t)m->n_head * (size_t)e->n_ctx;
        e->probs = xcalloc(n, sizeof(float), &ok);
    }
    if (p->blas_prompt) {
        size_t max_cols = (size_t)(m->n_ff > qd ? m->n_ff : qd);
        if ((size_t)m->n_embd > max_cols) max_cols = (size_t)m->n_embd;
        e->tile_floats = BLAS_TILE_BYTES / sizeof(float);
        if (e->tile_floats < max_cols * 16) e->tile_floats = max_cols * 16;
        e->tile = xcalloc(e->tile_floats, sizeof(float), &ok);
    }
    if (!ok) goto oom;

    /* Chunk sizes of the fused step: at least WO_CHUNK / FFN_CHUNK rows, and
     * about eight chunks per thread.  Every chunk quantises the step's
     * activation rows again; with 16 sequences on a 1B model the fixed
     * 32- and 64-row chunks made that 13% of the step. */
    {
        int nth8 = 8 * (p->n_threads > 0 ? p->n_threads : 1);
        int wo = ((m->n_embd + nth8 - 1) / nth8 + 15) & ~15, ff = ((m->n_ff + nth8 - 1) / nth8 + 15) & ~15;
        e->wo_chunk = wo > WO_CHUNK ? wo : WO_CHUNK;
        e->ffn_chunk = ff > FFN_CHUNK ? ff : FFN_CHUNK;
        e->q_group = m->n_head / nth8 > 1 ? m->n_head / nth8 : 1;
    }
    e->pool = pool_create(p->n_threads);
    if (!e->pool) goto oom;
    openblas_set_num_threads(p->n_threads);

    /* Info. */
    engine_info *in = &e->info;
    in->arch = m->arch_name;
    in->name = m->name;
    in->weight_type = ggml_type_name(m->main_type);
    in->n_layer = L;
    in->n_embd = m->n_embd;
    in->n_head = m->n_head;
    in->n_head_kv = m->n_head_kv;
    in->head_dim = m->head_dim;
    in->n_ff = m->n_ff;
    in->n_vocab = m->n_vocab;
    in->n_ctx_train = m->n_ctx_train;
    in->n_ctx = e->n_ctx;
    in->bos = tokenizer_bos(e->tok);
    in->eos = tokenizer_eos(e->tok);
    in->add_bos = tokenizer_add_bos(e->tok);
    in->model_bytes = m->weight_bytes;
    in->n_params = m->n_params;
    in->layer_source = e->source;
    in->shared_layers = e->shared_str;
    size_t per_kv = (size_t)m->n_head_kv * (size_t)m->head_dim * (p->kv_type == ENGINE_KV_F16 ? 2 : 4);
    in->kv_bytes_per_token_unshared = per_kv * 2 * (size_t)L;
    in->kv_bytes_per_token = per_kv * (size_t)(2 * L - in->n_shared);
    in->kv_block_tokens = p->kv_block_tokens;
    in->kv_blocks = (int)n_blocks;
    in->kv_k_bytes = e->kv.k_bytes;
    in->kv_v_bytes = e->kv.v_bytes;
    in->kv_saved_bytes = e->kv.v_bytes - e->kv.k_bytes; /* V planes exist for every layer */
    in->max_batch_tokens = e->max_T;
    in->max_seqs = p->max_seqs;
    in->n_threads = pool_size(e->pool);

    ELOG_INFO("model %s: %s, %d layers, %d heads (%d KV), d_head %d, vocab %d, %s, %.1f MiB", m->name, m->arch_name,
              L, m->n_head, m->n_head_kv, m->head_dim, m->n_vocab, in->weight_type,
              (double)m->weight_bytes / (1 << 20));
    ELOG_INFO("kernels %s, %d threads, OpenBLAS core %s", kernels, in->n_threads, cpu_blas_core());
    ELOG_INFO("KV cache: %d blocks of %d tokens (%.1f MiB, %s), %zu bytes/token", in->kv_blocks, in->kv_block_tokens,
              (double)(in->kv_k_bytes + in->kv_v_bytes) / (1 << 20), p->kv_type == ENGINE_KV_F16 ? "f16" : "f32",
              in->kv_bytes_per_token);
    *out = e;
    return 0;
oom:
    snprintf(err, errlen, "out of memory allocating engine buffers (activations for --max-batch-tokens %d, context "
             "%d); lower them", p->max_batch_tokens, e->n_ctx);
    rc = ENGINE_ENOMEM;
fail:
    engine_close(e);
    return rc;
}

void engine_close(engine *e) {
    if (!e) return;
    pool_destroy(e->pool);
    kv_free(&e->kv);
    tokenizer_free(e->tok);
    model_free(&e->m);
    free(e->shared); free(e->source); free(e->has_k); free(e->keep_probs);
    free(e->rope_cos); free(e->rope_sin);
    free(e->x); free(e->xn); free(e->tmp); free(e->hid); free(e->q); free(e->att); free(e->k); free(e->v);
    free(e->gate); free(e->up); free(e->logits); free(e->probs); free(e->tile); free(e->xn_t); free(e->phases);
    free(e->row_seq); free(e->row_pos); free(e->row_item); free(e->row_tok); free(e->out_row); free(e->item_first);
    free(e);
}

const engine_info *engine_get_info(const engine *e) { return &e->info; }

/* ==== Tokenizer ======================================================== */

int engine_tokenize(const engine *e, const char *text, size_t len, bool add_bos, int32_t *ids, int max_ids) {
    return tokenizer_encode(e->tok, text, len, add_bos, ids, max_ids);
}

int engine_token_bytes(const engine *e, int32_t id, char *buf, size_t cap) {
    return tokenizer_token_bytes(e->tok, id, buf, cap);
}

size_t engine_detokenize(const engine *e, const int32_t *ids, int n, char *buf, size_t cap) {
    return tokenizer_decode(e->tok, ids, n, buf, cap);
}

bool engine_token_is_eog(const engine *e, int32_t id) { return tokenizer_is_eog(e->tok, id); }

int engine_tokenize_fragments(const engine *e, const engine_fragment *frags, int n_frags, bool add_bos, int32_t *ids,
                              int max_ids) {
    /* engine_fragment and tokenizer_fragment have the same layout. */
    _Static_assert(sizeof(engine_fragment) == sizeof(tokenizer_fragment), "fragment layouts differ");
    return tokenizer_encode_fragments(e->tok, (const tokenizer_fragment *)frags, n_frags, add_bos, ids, max_ids);
}

int32_t engine_token_lookup(const engine *e, const char *s) { return tokenizer_lookup(e->tok, s, strlen(s)); }

bool engine_meta_str(const engine *e, const char *key, char *buf, size_t cap) {
    gguf_str v;
    if (!gguf_get_str(e->m.g, key, &v, NULL) || cap == 0) return false;
    size_t n = v.len < cap - 1 ? v.len : cap - 1;
    memcpy(buf, v.p, n);
    buf[n] = 0;
    return true;
}

/* ==== Sequences ======================================================== */

static bool seq_ok(const engine *e, int seq) {
    return seq >= 0 && seq < e->kv.max_seqs && e->kv.seqs[seq].active;
}

int engine_seq_create(engine *e) {
    int s = kv_seq_create(&e->kv);
    return s < 0 ? ENGINE_ENOKV : s;
}

void engine_seq_free(engine *e, int seq) {
    if (seq_ok(e, seq)) kv_seq_free(&e->kv, seq);
}

int engine_seq_len(const engine *e, int seq) { return seq_ok(e, seq) ? e->kv.seqs[seq].n_tokens : ENGINE_ESEQ; }

int engine_seq_fork(engine *e, int src, int dst) {
    if (!seq_ok(e, src) || !seq_ok(e, dst)) return ENGINE_ESEQ;
    /* kv_fork fails for a non-empty dst too: that is a caller error, not a
     * full cache. */
    if (src == dst || e->kv.seqs[dst].n_tokens != 0 || e->kv.seqs[dst].n_blocks != 0) return ENGINE_EINVAL;
    return kv_fork(&e->kv, src, dst) == 0 ? 0 : ENGINE_ENOKV;
}

int engine_seq_prefix_attach(engine *e, int seq, const int32_t *tokens, int n) {
    if (!seq_ok(e, seq)) return ENGINE_ESEQ;
    return kv_prefix_attach(&e->kv, seq, tokens, n);
}

int engine_seq_blocks_needed(const engine *e, int seq, int n_more) {
    if (!seq_ok(e, seq)) return ENGINE_ESEQ;
    return kv_blocks_needed(&e->kv, seq, n_more);
}

int engine_kv_free_blocks(const engine *e) { return kv_available(&e->kv); }
int engine_kv_used_blocks(const engine *e) { return kv_used(&e->kv); }

void engine_get_prefix_stats(const engine *e, engine_prefix_stats *out) {
    out->queries = atomic_load_explicit(&e->kv.prefix_queries, memory_order_relaxed);
    out->hits = atomic_load_explicit(&e->kv.prefix_hits, memory_order_relaxed);
}

void engine_set_attn_observer(engine *e, engine_attn_observer fn, void *ud) {
    e->observer = fn;
    e->observer_ud = ud;
}

void engine_get_counters(const engine *e, engine_counters *out) {
    out->tokens_processed = atomic_load_explicit(&e->tokens_processed, memory_order_relaxed);
    out->attention_flops_saved = atomic_load_explicit(&e->flops_saved, memory_order_relaxed);
}

/* ==== Forward pass ===================================================== */

typedef struct {
    engine *e;
    const wmat *w;
    const float *x; /* [T][w->cols] */
    int T;
    float *y;       /* [T][w->rows] */
} mm_job;

/* Rows split over threads in multiples of 16 (cache lines of y). */
static void mm_worker(void *arg, int ith, int nth) {
    mm_job *j = arg;
    int rows = j->w->rows;
    int chunk = ((rows + nth - 1) / nth + 15) & ~15;
    int r0 = ith * chunk, r1 = r0 + chunk < rows ? r0 + chunk : rows;
    if (r0 >= r1) return;
    ops.gemm(j->w->type, j->w->data + (size_t)r0 * j->w->row_bytes, j->w->row_bytes, r1 - r0, j->x,
             (size_t)j->w->cols, j->T, j->y + r0, (size_t)rows, j->w->cols);
}

typedef struct {
    const wmat *w;
    int r0, n;
    float *tile;
} dq_job;

static void dq_worker(void *arg, int ith, int nth) {
    dq_job *j = arg;
    for (int r = ith; r < j->n; r += nth)
        ops.dequant_row(j->w->type, j->w->data + (size_t)(j->r0 + r) * j->w->row_bytes,
                        j->tile + (size_t)r * (size_t)j->w->cols, j->w->cols);
}

/* y[T][rows] = x[T][cols] W^T through OpenBLAS; other weight types are
 * dequantised a tile of rows at a time.
 *
 * OpenBLAS's result for a row depends on the call's row count M when M is
 * small: 0.3.21 switches to other kernels for small matrices (on SkylakeX
 * results differ for M < 4 at 384 x 384, M < 10 at 384 -> 128).  Then a
 * prompt's logits would depend on how it was chunked and on what else was
 * in the batch.  So every call takes a multiple of BLAS_M rows: T is padded
 * up to one with the spare rows every buffer has (whatever they hold is
 * computed and ignored).  With at least BLAS_M rows per call (and weight
 * tiles split evenly, so none is thin) each output element came out as one
 * fixed FMA chain over k whatever M was: a row's result depends only on
 * that row.  The batch-invariance cases of the reference and engine suites
 * check exactly that, bit for bit, for prompts split and batched in
 * different ways.  One call for all the rows, rather than one per BLAS_M of
 * them, packs each weight tile once instead of once per group. */
static void matmul_blas(engine *e, const wmat *w, const float *x, int T, float *y) {
    int M = (T + BLAS_M - 1) / BLAS_M * BLAS_M;
    if (w->type == GGML_F32) {
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, M, w->rows, w->cols, 1.0f, x, w->cols,
                    (const float *)w->data, w->cols, 0.0f, y, w->rows);
        return;
    }
    int max_rows = (int)(e->tile_floats / (size_t)w->cols);
    int n_tiles = (w->rows + max_rows - 1) / max_rows;
    int tile_rows = ((w->rows + n_tiles - 1) / n_tiles + 15) & ~15;
    if (tile_rows > max_rows) tile_rows = max_rows;
    for (int r0 = 0; r0 < w->rows; r0 += tile_rows) {
        int n = w->rows - r0 < tile_rows ? w->rows - r0 : tile_rows;
        dq_job dj = {w, r0, n, e->tile};
        pool_run(e->pool, dq_worker, &dj);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, M, n, w->cols, 1.0f, x, w->cols, e->tile, w->cols, 0.0f,
                    y + r0, w->rows);
    }
}

/* y = x W^T for the step's rows: rows [0, n_plain) through the engine's
 * kernels, rows [n_plain, T) (prompt rows) through OpenBLAS. */
static void matmul(engine *e, const wmat *w, const float *x, int T, int n_plain, float *y) {
    if (n_plain > 0) {
        mm_job j = {e, w, x, n_plain, y};
        pool_run(e->pool, mm_worker, &j);
    }
    if (T > n_plain)
        matmul_blas(e, w, x + (size_t)n_plain * (size_t)w->cols, T - n_plain, y + (size_t)n_plain * (size_t)w->rows);
}

static void rope_one(const engine *e, float *v, int pos);

/* RoPE in place on n_heads heads of each row. */
static void rope_rows(engine *e, float *x, int T, int n_heads) {
    int hd = e->m.head_dim;
    for (int r = 0; r < T; r++)
        for (int h = 0; h < n_heads; h++) rope_one(e, x + ((size_t)r * (size_t)n_heads + (size_t)h) * (size_t)hd, e->row_pos[r]);
}

static void add_bias(const engine *e, const float *b, float *x, int r, int h, int n_heads) {
    int hd = e->m.head_dim;
    float *v = x + ((size_t)r * (size_t)n_heads + (size_t)h) * (size_t)hd;
    const float *bb = b + (size_t)h * (size_t)hd;
    for (int i = 0; i < hd; i++) v[i] += bb[i];
}

/* Q or K head h of row r before RoPE: Qwen2's bias, Qwen3's per-head norm. */
static void qk_prep(const engine *e, const float *bias, const float *norm, float *x, int r, int h, int n_heads) {
    if (bias) add_bias(e, bias, x, r, h, n_heads);
    if (norm) {
        int hd = e->m.head_dim;
        float *v = x + ((size_t)r * (size_t)n_heads + (size_t)h) * (size_t)hd;
        rmsnorm(v, v, norm, hd, e->m.norm_eps);
    }
}

/* Writes the step's K (unless shared) and V rows into the cache. */
static void store_kv(engine *e, int l, int T) {
    const model *m = &e->m;
    kv_cache *c = &e->kv;
    int hd = m->head_dim, G = m->n_head_kv;
    for (int r = 0; r < T; r++) {
        const kv_seq *s = &c->seqs[e->row_seq[r]];
        for (int g = 0; g < G; g++) {
            const float *vs = e->v + ((size_t)r * (size_t)G + (size_t)g) * (size_t)hd;
            const float *ks = e->k + ((size_t)r * (size_t)G + (size_t)g) * (size_t)hd;
            void *vd = kv_v_at(c, l, s, e->row_pos[r], g);
            if (c->f16) ops.f32_to_f16_row(vd, vs, hd); else memcpy(vd, vs, (size_t)hd * sizeof(float));
            if (e->has_k[l]) {
                void *kd = kv_k_at(c, l, s, e->row_pos[r], g);
                if (c->f16) ops.f32_to_f16_row(kd, ks, hd); else memcpy(kd, ks, (size_t)hd * sizeof(float));
            }
        }
    }
}

static void add_rows(float *x, const float *y, size_t n) {
    for (size_t i = 0; i < n; i++) x[i] += y[i];
}

static void layer_forward(engine *e, int l, int T, int n_plain, engine_batch_item *items, int n_items) {
    const model *m = &e->m;
    const layer_weights *L = &m->layers[l];
    int D = m->n_embd;
    for (int r = 0; r < T; r++)
        rmsnorm(e->xn + (size_t)r * (size_t)D, e->x + (size_t)r * (size_t)D, L->attn_norm, D, m->norm_eps);
    /* A shared layer never touches W_q or W_k: only V is projected. */
    if (!e->shared[l]) {
        matmul(e, &L->wq, e->xn, T, n_plain, e->q);
        matmul(e, &L->wk, e->xn, T, n_plain, e->k);
        for (int r = 0; r < T; r++) {
            for (int h = 0; h < m->n_head; h++) qk_prep(e, L->bq, L->q_norm, e->q, r, h, m->n_head);
            for (int g = 0; g < m->n_head_kv; g++) qk_prep(e, L->bk, L->k_norm, e->k, r, g, m->n_head_kv);
        }
        rope_rows(e, e->q, T, m->n_head);
        rope_rows(e, e->k, T, m->n_head_kv);
    }
    matmul(e, &L->wv, e->xn, T, n_plain, e->v);
    if (L->bv)
        for (int r = 0; r < T; r++)
            for (int g = 0; g < m->n_head_kv; g++) add_bias(e, L->bv, e->v, r, g, m->n_head_kv);
    store_kv(e, l, T);

    attn_job aj = {
        .kv = &e->kv, .layer = l, .shared = e->shared[l], .store_probs = e->keep_probs[l], .n_rows = T,
        .row_seq = e->row_seq, .row_pos = e->row_pos, .n_head = m->n_head, .n_head_kv = m->n_head_kv,
        .head_dim = m->head_dim, .q = e->q, .out = e->att, .probs = e->probs, .probs_stride = e->n_ctx,
    };
    attention_run(e->pool, &aj);
    if (e->observer && e->keep_probs[l] && !e->shared[l]) {
        for (int i = 0; i < n_items; i++) {
            int r0 = e->item_first[i];
            e->observer(l, i, m->n_head, items[i].n_tokens, e->row_pos[r0], e->n_ctx,
                        e->probs + (size_t)r0 * (size_t)m->n_head * (size_t)e->n_ctx, e->observer_ud);
        }
    }
    matmul(e, &L->wo, e->att, T, n_plain, e->tmp);
    add_rows(e->x, e->tmp, (size_t)T * (size_t)D);

    for (int r = 0; r < T; r++)
        rmsnorm(e->xn + (size_t)r * (size_t)D, e->x + (size_t)r * (size_t)D, L->ffn_norm, D, m->norm_eps);
    matmul(e, &L->w_gate, e->xn, T, n_plain, e->gate);
    matmul(e, &L->w_up, e->xn, T, n_plain, e->up);
    size_t nf = (size_t)T * (size_t)m->n_ff;
    for (size_t i = 0; i < nf; i++) e->gate[i] = silu(e->gate[i]) * e->up[i];
    matmul(e, &L->w_down, e->gate, T, n_plain, e->tmp);
    add_rows(e->x, e->tmp, (size_t)T * (size_t)D);
}


/* ==== Fused path ======================================================= */
/*
 * When no row of the step goes through OpenBLAS (decode steps, and prompts
 * with blas_prompt off), the whole forward pass runs as ONE pool job: a
 * sequence of phases (five per layer: Q/K/V, attention, output projection,
 * gate/up, down; then the final norm and the logits).  Each phase is cut
 * into small chunks that threads take from a shared counter, and a thread
 * moves on once every chunk of the phase is done.  Unlike a barrier this
 * does not wait for a thread that has not arrived: on a busy machine a
 * descheduled worker simply gets fewer chunks, and only a chunk it holds is
 * waited for.  Each thread normalises the rows it needs privately (cheap:
 * T x n_embd) rather than waiting for a shared copy.  The kernels and their
 * per-element order are the unfused path's, so results are bit-identical
 * to it whatever the chunking.
 */

#define VOCAB_CHUNK 256

typedef struct {
    engine *e;
    int T, n_out;
} fused_job;

/* y[:, r0:r1] = x W[r0:r1]^T, optionally added into y (residual). */
static void gemm_part(const wmat *w, const float *x, int T, float *y, int r0, int r1, float *tmp, bool add) {
    if (r0 >= r1) return;
    if (!add) {
        ops.gemm(w->type, w->data + (size_t)r0 * w->row_bytes, w->row_bytes, r1 - r0, x, (size_t)w->cols, T, y + r0,
                 (size_t)w->rows, w->cols);
        return;
    }
    /* Compute into tmp with the same layout, then add: the sum is the
     * unfused path's x + (x W^T), in the same order. */
    ops.gemm(w->type, w->data + (size_t)r0 * w->row_bytes, w->row_bytes, r1 - r0, x, (size_t)w->cols, T, tmp + r0,
             (size_t)w->rows, w->cols);
    for (int t = 0; t < T; t++)
        for (int r = r0; r < r1; r++) y[(size_t)t * (size_t)w->rows + (size_t)r] += tmp[(size_t)t * (size_t)w->rows + (size_t)r];
}

static void rope_one(const engine *e, float *v, int pos) {
    const model *m = &e->m;
    int half = m->n_rot / 2;
    const float *c = e->rope_cos + (size_t)pos * (size_t)half, *s = e->rope_sin + (size_t)pos * (size_t)half;
    if (m->rope == ROPE_NORM) {
        for (int i = 0; i < half; i++) {
            float a = v[2 * i], b = v[2 * i + 1];
            v[2 * i] = a * c[i] - b * s[i];
            v[2 * i + 1] = a * s[i] + b * c[i];
        }
    } else {
        for (int i = 0; i < half; i++) {
            float a = v[i], b = v[i + half];
            v[i] = a * c[i] - b * s[i];
            v[i + half] = a * s[i] + b * c[i];
        }
    }
}

static void store_head(engine *e, int l, int r, int g, bool k_too) {
    kv_cache *c = &e->kv;
    int hd = e->m.head_dim, G = e->m.n_head_kv;
    const kv_seq *s = &c->seqs[e->row_seq[r]];
    const float *vs = e->v + ((size_t)r * (size_t)G + (size_t)g) * (size_t)hd;
    void *vd = kv_v_at(c, l, s, e->row_pos[r], g);
    if (c->f16) ops.f32_to_f16_row(vd, vs, hd); else memcpy(vd, vs, (size_t)hd * sizeof(float));
    if (k_too) {
        const float *ks = e->k + ((size_t)r * (size_t)G + (size_t)g) * (size_t)hd;
        void *kd = kv_k_at(c, l, s, e->row_pos[r], g);
        if (c->f16) ops.f32_to_f16_row(kd, ks, hd); else memcpy(kd, ks, (size_t)hd * sizeof(float));
    }
}

/* Runs this thread's share of a phase: chunks until none is left, then
 * waits for the chunks other threads hold. */
#define PHASE(e, ph, c, ...)                                                                 \
    do {                                                                                      \
        phase_ctl *ph_ = (ph);                                                                \
        for (int c; (c = atomic_fetch_add(&ph_->next, 1)) < ph_->n;) {                        \
            __VA_ARGS__;                                                                      \
            if ((int)atomic_fetch_add(&ph_->done, 1) + 1 == ph_->n) pool_notify((e)->pool, &ph_->done); \
        }                                                                                     \
        pool_wait_equal((e)->pool, &ph_->done, (unsigned)ph_->n);                             \
    } while (0)

static int div_up(int a, int b) { return (a + b - 1) / b; }

/* Chunks per phase for a step of T rows and n_out output rows. */
static void plan_phases(engine *e, int T, int n_out) {
    const model *m = &e->m;
    for (int l = 0; l < m->n_layer; l++) {
        phase_ctl *p = e->phases + (size_t)l * PH_PER_LAYER;
        p[PH_QKV].n = (e->shared[l] ? 0 : div_up(m->n_head, e->q_group)) + m->n_head_kv;
        p[PH_ATTN].n = T * m->n_head_kv;
        p[PH_WO].n = div_up(m->n_embd, e->wo_chunk);
        p[PH_FFN].n = div_up(m->n_ff, e->ffn_chunk);
        p[PH_DOWN].n = div_up(m->n_embd, e->wo_chunk);
    }
    phase_ctl *f = e->phases + (size_t)m->n_layer * PH_PER_LAYER;
    f[0].n = n_out;
    f[1].n = div_up(m->n_vocab, VOCAB_CHUNK);
    for (int i = 0; i < m->n_layer * PH_PER_LAYER + 2; i++) {
        atomic_store(&e->phases[i].next, 0);
        atomic_store(&e->phases[i].done, 0);
    }
}

static void fused_worker(void *arg, int ith, int nth) {
    (void)nth;
    fused_job *j = arg;
    engine *e = j->e;
    const model *m = &e->m;
    int T = j->T, D = m->n_embd, hd = m->head_dim, H = m->n_head, G = m->n_head_kv;
    float *xn = e->xn_t + (size_t)ith * (size_t)(e->max_T + BLAS_M - 1) * (size_t)D;
    for (int l = 0; l < m->n_layer; l++) {
        const layer_weights *L = &m->layers[l];
        phase_ctl *p = e->phases + (size_t)l * PH_PER_LAYER;
        bool normed = false;
        /* Q heads, then KV heads: each chunk projects, ropes and stores its own. */
        int nq = e->shared[l] ? 0 : div_up(H, e->q_group); /* chunks of query heads */
        PHASE(e, &p[PH_QKV], c, {
            if (!normed) {
                for (int r = 0; r < T; r++)
                    rmsnorm(xn + (size_t)r * (size_t)D, e->x + (size_t)r * (size_t)D, L->attn_norm, D, m->norm_eps);
                normed = true;
            }
            if (c < nq) {
                int h0 = c * e->q_group, h1 = h0 + e->q_group < H ? h0 + e->q_group : H;
                gemm_part(&L->wq, xn, T, e->q, h0 * hd, h1 * hd, NULL, false);
                for (int r = 0; r < T; r++)
                    for (int h = h0; h < h1; h++) {
                        qk_prep(e, L->bq, L->q_norm, e->q, r, h, H);
                        rope_one(e, e->q + ((size_t)r * (size_t)H + (size_t)h) * (size_t)hd, e->row_pos[r]);
                    }
            } else {
                int g = c - nq;
                if (!e->shared[l]) gemm_part(&L->wk, xn, T, e->k, g * hd, (g + 1) * hd, NULL, false);
                gemm_part(&L->wv, xn, T, e->v, g * hd, (g + 1) * hd, NULL, false);
                for (int r = 0; r < T; r++) {
                    if (!e->shared[l]) {
                        qk_prep(e, L->bk, L->k_norm, e->k, r, g, G);
                        rope_one(e, e->k + ((size_t)r * (size_t)G + (size_t)g) * (size_t)hd, e->row_pos[r]);
                    }
                    if (L->bv) add_bias(e, L->bv, e->v, r, g, G);
                    store_head(e, l, r, g, !e->shared[l]);
                }
            }
        });
        attn_job aj = {
            .kv = &e->kv, .layer = l, .shared = e->shared[l], .store_probs = e->keep_probs[l], .n_rows = T,
            .row_seq = e->row_seq, .row_pos = e->row_pos, .n_head = H, .n_head_kv = G, .head_dim = hd, .q = e->q,
            .out = e->att, .probs = e->probs, .probs_stride = e->n_ctx
        };
        PHASE(e, &p[PH_ATTN], c, attention_unit(&aj, c));
        PHASE(e, &p[PH_WO], c, {
            int r0 = c * e->wo_chunk, r1 = r0 + e->wo_chunk < D ? r0 + e->wo_chunk : D;
            gemm_part(&L->wo, e->att, T, e->x, r0, r1, e->tmp, true);
        });
        normed = false;
        PHASE(e, &p[PH_FFN], c, {
            if (!normed) {
                for (int r = 0; r < T; r++)
                    rmsnorm(xn + (size_t)r * (size_t)D, e->x + (size_t)r * (size_t)D, L->ffn_norm, D, m->norm_eps);
                normed = true;
            }
            int r0 = c * e->ffn_chunk, r1 = r0 + e->ffn_chunk < m->n_ff ? r0 + e->ffn_chunk : m->n_ff;
            gemm_part(&L->w_gate, xn, T, e->gate, r0, r1, NULL, false);
            gemm_part(&L->w_up, xn, T, e->up, r0, r1, NULL, false);
            for (int t = 0; t < T; t++)
                for (int r = r0; r < r1; r++) {
                    size_t i = (size_t)t * (size_t)m->n_ff + (size_t)r;
                    e->gate[i] = silu(e->gate[i]) * e->up[i];
                }
        });
        PHASE(e, &p[PH_DOWN], c, {
            int r0 = c * e->wo_chunk, r1 = r0 + e->wo_chunk < D ? r0 + e->wo_chunk : D;
            gemm_part(&L->w_down, e->gate, T, e->x, r0, r1, e->tmp, true);
        });
    }
    /* Output rows (e->out_row) through the final norm, then the logits. */
    phase_ctl *f = e->phases + (size_t)m->n_layer * PH_PER_LAYER;
    PHASE(e, &f[0], o,
          rmsnorm(e->hid + (size_t)o * (size_t)D, e->x + (size_t)e->out_row[o] * (size_t)D, m->output_norm, D,
                  m->norm_eps));
    PHASE(e, &f[1], c, {
        int r0 = c * VOCAB_CHUNK, r1 = r0 + VOCAB_CHUNK < m->n_vocab ? r0 + VOCAB_CHUNK : m->n_vocab;
        gemm_part(&m->output, e->hid, j->n_out, e->logits, r0, r1, NULL, false);
    });
}

/* Work a shared layer skips for one token at context length ctx: the Q and K
 * projections (2 flops per weight), QK^T (2 * d_head per position and head)
 * and the softmax (about 5 flops per position and head). */
static double flops_saved(const model *m, int ctx) {
    double proj = 2.0 * m->n_embd * (double)(m->n_head + m->n_head_kv) * m->head_dim;
    double attn = (double)m->n_head * ctx * (2.0 * m->head_dim + 5.0);
    return proj + attn;
}

int engine_step(engine *e, engine_batch_item *items, int n_items) {
    const model *m = &e->m;
    if (n_items <= 0) return ENGINE_EINVAL;
    int T = 0, n_out = 0;
    for (int i = 0; i < n_items; i++) {
        engine_batch_item *it = &items[i];
        if (!seq_ok(e, it->seq) || it->n_tokens <= 0 || !it->tokens) return ENGINE_EINVAL;
        for (int j = 0; j < i; j++)
            if (items[j].seq == it->seq) return ENGINE_EINVAL;
        if (e->kv.seqs[it->seq].n_tokens + it->n_tokens > e->n_ctx) return ENGINE_ECTX;
        for (int t = 0; t < it->n_tokens; t++)
            if (it->tokens[t] < 0 || it->tokens[t] >= m->n_vocab) return ENGINE_EINVAL;
        T += it->n_tokens;
        n_out += it->all_logits ? it->n_tokens : 1;
    }
    if (T > e->max_T) return ENGINE_EBATCH;
    int need = 0;
    for (int i = 0; i < n_items; i++) need += kv_blocks_needed(&e->kv, items[i].seq, items[i].n_tokens);
    if (need > kv_available(&e->kv)) return ENGINE_ENOKV;
    for (int i = 0; i < n_items; i++) {
        if (kv_reserve(&e->kv, items[i].seq, items[i].n_tokens) != 0) return ENGINE_ENOKV;
    }

    /* Row layout: non-prompt items first, then prompt items (OpenBLAS). */
    int r = 0, n_plain = 0;
    for (int pass = 0; pass < 2; pass++) {
        for (int i = 0; i < n_items; i++) {
            engine_batch_item *it = &items[i];
            bool blas = it->prompt && e->params.blas_prompt;
            if (blas != (pass == 1)) continue;
            e->item_first[i] = r;
            int p0 = e->kv.seqs[it->seq].n_tokens;
            for (int t = 0; t < it->n_tokens; t++, r++) {
                e->row_seq[r] = it->seq;
                e->row_pos[r] = p0 + t;
                e->row_item[r] = i;
                e->row_tok[r] = it->tokens[t];
            }
        }
        if (pass == 0) n_plain = r;
    }

    int D = m->n_embd;
    for (r = 0; r < T; r++)
        ops.dequant_row(m->tok_embd.type, m->tok_embd.data + (size_t)e->row_tok[r] * m->tok_embd.row_bytes,
                        e->x + (size_t)r * (size_t)D, D);

    /* Logits only for the rows that want them, in item order. */
    int o = 0, o_plain = 0;
    for (int pass = 0; pass < 2; pass++) {
        for (int i = 0; i < n_items; i++) {
            engine_batch_item *it = &items[i];
            bool blas = it->prompt && e->params.blas_prompt;
            if (blas != (pass == 1)) continue;
            int first = e->item_first[i];
            int from = it->all_logits ? first : first + it->n_tokens - 1;
            it->logits = e->logits + (size_t)o * (size_t)m->n_vocab;
            for (int rr = from; rr < first + it->n_tokens; rr++, o++) e->out_row[o] = rr;
        }
        if (pass == 0) o_plain = o;
    }

    if (n_plain == T && !e->observer) {
        fused_job fj = {e, T, n_out};
        plan_phases(e, T, n_out);
        pool_run(e->pool, fused_worker, &fj);
    } else {
        for (int l = 0; l < m->n_layer; l++) layer_forward(e, l, T, n_plain, items, n_items);
        for (o = 0; o < n_out; o++)
            rmsnorm(e->hid + (size_t)o * (size_t)D, e->x + (size_t)e->out_row[o] * (size_t)D, m->output_norm, D,
                    m->norm_eps);
        matmul(e, &m->output, e->hid, n_out, o_plain, e->logits);
    }

    double saved = 0;
    for (int i = 0; i < n_items; i++) {
        kv_seq *s = &e->kv.seqs[items[i].seq];
        int p0 = s->n_tokens;
        kv_commit(&e->kv, items[i].seq, items[i].tokens, items[i].n_tokens);
        if (e->info.n_shared)
            for (int t = 0; t < items[i].n_tokens; t++) saved += e->info.n_shared * flops_saved(m, p0 + t + 1);
    }
    /* One writer (this thread): a relaxed load + store is enough. */
    if (saved > 0)
        atomic_store_explicit(&e->flops_saved, atomic_load_explicit(&e->flops_saved, memory_order_relaxed) + saved,
                              memory_order_relaxed);
    atomic_fetch_add_explicit(&e->tokens_processed, (uint64_t)T, memory_order_relaxed);
    return 0;
}
