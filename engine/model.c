/*
 * model.c - hyperparameters and weights from GGUF metadata; see model.h.
 */
#include "model.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine.h"
#include "ops.h"

typedef struct {
    model *m;
    char *err;
    size_t errlen;
    size_t owned_used, owned_cap;
} loader;

static int lfail(loader *l, int code, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int lfail(loader *l, int code, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(l->err, l->errlen, fmt, ap);
    va_end(ap);
    return code;
}

/* Reads "<arch>.<suffix>" as an integer in [lo, hi]. */
static int get_int(loader *l, const char *suffix, bool required, int def, int lo, int hi, int *out) {
    char key[160];
    snprintf(key, sizeof key, "%s.%s", l->m->arch_name, suffix);
    uint64_t v;
    bool bad = false;
    if (!gguf_get_u64(l->m->g, key, &v, &bad)) {
        if (bad) return lfail(l, ENGINE_EFORMAT, "metadata key '%s' has the wrong type", key);
        if (required) return lfail(l, ENGINE_EFORMAT, "metadata key '%s' is missing", key);
        *out = def;
        return 0;
    }
    if (v < (uint64_t)lo || v > (uint64_t)hi)
        return lfail(l, ENGINE_EFORMAT, "metadata key '%s' = %llu is out of range [%d, %d]", key,
                     (unsigned long long)v, lo, hi);
    *out = (int)v;
    return 0;
}

static int get_float(loader *l, const char *suffix, float def, float *out) {
    char key[160];
    snprintf(key, sizeof key, "%s.%s", l->m->arch_name, suffix);
    double v;
    bool bad = false;
    if (!gguf_get_f64(l->m->g, key, &v, &bad)) {
        if (bad) return lfail(l, ENGINE_EFORMAT, "metadata key '%s' has the wrong type", key);
        *out = def;
        return 0;
    }
    if (!(v == v) || v < 0 || v > 1e12) return lfail(l, ENGINE_EFORMAT, "metadata key '%s' = %g is out of range", key, v);
    *out = (float)v;
    return 0;
}

/* Finds a 2-D matrix named name with ne = [cols, rows]. */
static int get_mat(loader *l, const char *name, int rows, int cols, bool required, wmat *out) {
    const gguf_tensor *t = gguf_find_tensor(l->m->g, name);
    memset(out, 0, sizeof *out);
    if (!t) {
        if (!required) return 0;
        return lfail(l, ENGINE_EFORMAT, "tensor '%s' is missing", name);
    }
    if (t->n_dims != 2 || t->ne[0] != (uint64_t)cols || t->ne[1] != (uint64_t)rows)
        return lfail(l, ENGINE_EFORMAT, "tensor '%s' has shape [%llu, %llu], expected [%d, %d]", name,
                     (unsigned long long)t->ne[0], (unsigned long long)(t->n_dims > 1 ? t->ne[1] : 1), cols, rows);
    if (!ops_type_supported(t->type))
        return lfail(l, ENGINE_EUNSUPPORTED, "tensor '%s' has type %s, which this engine cannot compute with", name,
                     ggml_type_name(t->type));
    out->type = t->type;
    out->rows = rows;
    out->cols = cols;
    out->row_bytes = ggml_row_bytes(t->type, (uint64_t)cols);
    out->data = t->data;
    l->m->weight_bytes += t->nbytes;
    l->m->n_params += (size_t)rows * (size_t)cols;
    return 0;
}

/* Finds a 1-D vector of n floats; converts it to f32 if stored otherwise. */
static int get_vec(loader *l, const char *name, int n, bool required, const float **out) {
    const gguf_tensor *t = gguf_find_tensor(l->m->g, name);
    *out = NULL;
    if (!t) {
        if (!required) return 0;
        return lfail(l, ENGINE_EFORMAT, "tensor '%s' is missing", name);
    }
    if (t->n_dims != 1 || t->ne[0] != (uint64_t)n)
        return lfail(l, ENGINE_EFORMAT, "tensor '%s' has %u dimensions of first size %llu, expected [%d]", name,
                     t->n_dims, (unsigned long long)t->ne[0], n);
    if (!ops_type_supported(t->type))
        return lfail(l, ENGINE_EUNSUPPORTED, "tensor '%s' has unsupported type %s", name, ggml_type_name(t->type));
    l->m->weight_bytes += t->nbytes;
    l->m->n_params += (size_t)n;
    if (t->type == GGML_F32 && ((uintptr_t)t->data % 4) == 0) {
        *out = t->data;
        return 0;
    }
    if (l->owned_used + (size_t)n > l->owned_cap)
        return lfail(l, ENGINE_EFORMAT, "too many non-f32 vectors");
    float *dst = l->m->owned + l->owned_used;
    l->owned_used += (size_t)n;
    ops.dequant_row(t->type, t->data, dst, n);
    *out = dst;
    return 0;
}

static int load_hparams(loader *l) {
    model *m = l->m;
    gguf_str s;
    bool bad = false;
    if (!gguf_get_str(m->g, "general.architecture", &s, &bad))
        return lfail(l, ENGINE_EFORMAT, "metadata key 'general.architecture' is %s", bad ? "not a string" : "missing");
    if (s.len >= sizeof m->arch_name) return lfail(l, ENGINE_EUNSUPPORTED, "architecture name too long");
    memcpy(m->arch_name, s.p, s.len);
    m->arch_name[s.len] = 0;
    /* GGUF files of architecture llama have Q/K rows permuted so RoPE
     * rotates adjacent pairs; Qwen files are not permuted and rotate halves. */
    if (strcmp(m->arch_name, "llama") == 0) {
        m->arch = ARCH_LLAMA;
        m->rope = ROPE_NORM;
    } else if (strcmp(m->arch_name, "qwen2") == 0) {
        m->arch = ARCH_QWEN2;
        m->rope = ROPE_NEOX;
    } else if (strcmp(m->arch_name, "qwen3") == 0) {
        m->arch = ARCH_QWEN3;
        m->rope = ROPE_NEOX;
    } else {
        return lfail(l, ENGINE_EUNSUPPORTED, "architecture '%s' is not supported (supported: llama, qwen2, qwen3)",
                     m->arch_name);
    }
    if (gguf_get_str(m->g, "general.name", &s, NULL) && s.len < sizeof m->name) {
        memcpy(m->name, s.p, s.len);
        m->name[s.len] = 0;
    }
    int rc;
    if ((rc = get_int(l, "block_count", true, 0, 1, 1024, &m->n_layer)) ||
        (rc = get_int(l, "embedding_length", true, 0, 1, 1 << 16, &m->n_embd)) ||
        (rc = get_int(l, "feed_forward_length", true, 0, 1, 1 << 18, &m->n_ff)) ||
        (rc = get_int(l, "attention.head_count", true, 0, 1, 1024, &m->n_head)) ||
        (rc = get_int(l, "attention.head_count_kv", false, m->n_head, 1, 1024, &m->n_head_kv)) ||
        (rc = get_int(l, "context_length", false, 2048, 1, 1 << 24, &m->n_ctx_train)))
        return rc;
    if (m->n_head % m->n_head_kv)
        return lfail(l, ENGINE_EFORMAT, "head_count %d is not a multiple of head_count_kv %d", m->n_head, m->n_head_kv);
    if (m->n_head / m->n_head_kv > 64)
        return lfail(l, ENGINE_EUNSUPPORTED, "%d query heads per KV head is more than the 64 supported",
                     m->n_head / m->n_head_kv);
    int def_hd = m->n_embd / m->n_head;
    if ((rc = get_int(l, "attention.key_length", false, def_hd, 1, 1024, &m->head_dim))) return rc;
    int vlen;
    if ((rc = get_int(l, "attention.value_length", false, m->head_dim, 1, 1024, &vlen))) return rc;
    if (vlen != m->head_dim)
        return lfail(l, ENGINE_EUNSUPPORTED, "key_length %d != value_length %d is not supported", m->head_dim, vlen);
    if (m->head_dim % 2) return lfail(l, ENGINE_EFORMAT, "head dimension %d is odd", m->head_dim);
    if ((rc = get_int(l, "rope.dimension_count", false, m->head_dim, 2, m->head_dim, &m->n_rot))) return rc;
    if (m->n_rot % 2) return lfail(l, ENGINE_EFORMAT, "rope.dimension_count %d is odd", m->n_rot);
    if ((rc = get_float(l, "rope.freq_base", 10000.0f, &m->rope_base))) return rc;
    if ((rc = get_float(l, "attention.layer_norm_rms_epsilon", 1e-5f, &m->norm_eps))) return rc;
    if (m->rope_base <= 0) return lfail(l, ENGINE_EFORMAT, "rope.freq_base must be positive");
    m->rope_linear = 1.0f;
    char key[160];
    snprintf(key, sizeof key, "%s.rope.scaling.type", m->arch_name);
    gguf_str st;
    if (gguf_get_str(m->g, key, &st, NULL) && gguf_str_eq(st, "linear")) {
        if ((rc = get_float(l, "rope.scaling.factor", 1.0f, &m->rope_linear))) return rc;
        if (m->rope_linear < 1.0f) return lfail(l, ENGINE_EFORMAT, "%s: scaling factor below 1", key);
    }

    if (gguf_get_str(m->g, "saserve.shared_layers", &s, &bad)) {
        if (s.len >= sizeof m->shared_layers_key)
            return lfail(l, ENGINE_EFORMAT, "metadata key 'saserve.shared_layers' is too long");
        memcpy(m->shared_layers_key, s.p, s.len);
        m->shared_layers_key[s.len] = 0;
    } else if (bad) {
        return lfail(l, ENGINE_EFORMAT, "metadata key 'saserve.shared_layers' is not a string");
    }
    return 0;
}

static int load_weights(loader *l) {
    model *m = l->m;
    const gguf_tensor *te = gguf_find_tensor(m->g, "token_embd.weight");
    if (!te) return lfail(l, ENGINE_EFORMAT, "tensor 'token_embd.weight' is missing");
    if (te->n_dims != 2 || te->ne[0] != (uint64_t)m->n_embd || te->ne[1] > (1u << 22))
        return lfail(l, ENGINE_EFORMAT, "tensor 'token_embd.weight' has shape [%llu, %llu], expected [%d, n_vocab]",
                     (unsigned long long)te->ne[0], (unsigned long long)(te->n_dims > 1 ? te->ne[1] : 1), m->n_embd);
    m->n_vocab = (int)te->ne[1];
    int rc;
    int q_dim = m->n_head * m->head_dim, kv_dim = m->n_head_kv * m->head_dim;
    if ((rc = get_mat(l, "token_embd.weight", m->n_vocab, m->n_embd, true, &m->tok_embd))) return rc;
    if ((rc = get_mat(l, "output.weight", m->n_vocab, m->n_embd, false, &m->output))) return rc;
    if (!m->output.data) m->output = m->tok_embd; /* tied embeddings */
    if ((rc = get_vec(l, "output_norm.weight", m->n_embd, true, &m->output_norm))) return rc;
    if ((rc = get_vec(l, "rope_freqs.weight", m->n_rot / 2, false, &m->rope_freqs))) return rc;
    m->layers = calloc((size_t)m->n_layer, sizeof *m->layers);
    if (!m->layers) return lfail(l, ENGINE_ENOMEM, "out of memory");
    for (int i = 0; i < m->n_layer; i++) {
        layer_weights *L = &m->layers[i];
        char n[64];
#define NAME(x) (snprintf(n, sizeof n, "blk.%d." x, i), n)
        if ((rc = get_vec(l, NAME("attn_norm.weight"), m->n_embd, true, &L->attn_norm)) ||
            (rc = get_vec(l, NAME("ffn_norm.weight"), m->n_embd, true, &L->ffn_norm)) ||
            (rc = get_mat(l, NAME("attn_q.weight"), q_dim, m->n_embd, true, &L->wq)) ||
            (rc = get_mat(l, NAME("attn_k.weight"), kv_dim, m->n_embd, true, &L->wk)) ||
            (rc = get_mat(l, NAME("attn_v.weight"), kv_dim, m->n_embd, true, &L->wv)) ||
            (rc = get_mat(l, NAME("attn_output.weight"), m->n_embd, q_dim, true, &L->wo)) ||
            (rc = get_mat(l, NAME("ffn_gate.weight"), m->n_ff, m->n_embd, true, &L->w_gate)) ||
            (rc = get_mat(l, NAME("ffn_up.weight"), m->n_ff, m->n_embd, true, &L->w_up)) ||
            (rc = get_mat(l, NAME("ffn_down.weight"), m->n_embd, m->n_ff, true, &L->w_down)))
            return rc;
        /* Qwen2: Q/K/V biases.  Qwen3: per-head RMSNorm of Q and K. */
        bool qwen2 = m->arch == ARCH_QWEN2, qwen3 = m->arch == ARCH_QWEN3;
        if ((rc = get_vec(l, NAME("attn_q.bias"), q_dim, qwen2, &L->bq)) ||
            (rc = get_vec(l, NAME("attn_k.bias"), kv_dim, qwen2, &L->bk)) ||
            (rc = get_vec(l, NAME("attn_v.bias"), kv_dim, qwen2, &L->bv)) ||
            (rc = get_vec(l, NAME("attn_q_norm.weight"), m->head_dim, qwen3, &L->q_norm)) ||
            (rc = get_vec(l, NAME("attn_k_norm.weight"), m->head_dim, qwen3, &L->k_norm)))
            return rc;
#undef NAME
    }
    /* The type holding most matrix bytes names the model's weight type. */
    size_t bytes_by_type[32] = {0};
    for (int i = 0; i < m->n_layer; i++) {
        const wmat *ws[] = {&m->layers[i].wq, &m->layers[i].wk, &m->layers[i].wv, &m->layers[i].wo,
                            &m->layers[i].w_gate, &m->layers[i].w_up, &m->layers[i].w_down};
        for (size_t j = 0; j < sizeof ws / sizeof ws[0]; j++)
            if (ws[j]->type < 32) bytes_by_type[ws[j]->type] += ws[j]->row_bytes * (size_t)ws[j]->rows;
    }
    m->main_type = 0;
    for (uint32_t t = 0; t < 32; t++)
        if (bytes_by_type[t] > bytes_by_type[m->main_type]) m->main_type = t;
    return 0;
}

int model_load(model *m, const char *path, char *err, size_t errlen) {
    memset(m, 0, sizeof *m);
    gguf *g = gguf_open(path, err, errlen);
    if (!g) return ENGINE_EFORMAT;
    return model_load_gguf(m, g, path, err, errlen);
}

int model_load_gguf(model *m, gguf *g, const char *path, char *err, size_t errlen) {
    memset(m, 0, sizeof *m);
    loader l = {m, err, errlen, 0, 0};
    m->g = g;
    int rc = load_hparams(&l);
    if (rc == 0) {
        /* Room for every 1-D tensor converted to f32. */
        l.owned_cap = (size_t)m->n_embd * (size_t)(2 * m->n_layer + 1) + (size_t)m->n_layer * (size_t)(2 * m->head_dim +
                       (m->n_head + 2 * m->n_head_kv) * m->head_dim) + (size_t)m->n_rot;
        m->owned = malloc(l.owned_cap * sizeof(float));
        if (!m->owned) rc = lfail(&l, ENGINE_ENOMEM, "out of memory");
    }
    if (rc == 0) rc = load_weights(&l);
    if (rc != 0) {
        model_free(m);
        return rc;
    }
    if (!m->name[0]) {
        const char *b = strrchr(path, '/');
        snprintf(m->name, sizeof m->name, "%s", b ? b + 1 : path);
    }
    return 0;
}

void model_free(model *m) {
    gguf_close(m->g);
    free(m->layers);
    free(m->owned);
    memset(m, 0, sizeof *m);
}
