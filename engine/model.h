/*
 * model.h - hyperparameters and weights of a loaded GGUF model.
 *
 * Weight matrices point into the GGUF mapping (nothing is copied); only
 * small 1-D tensors stored in a non-f32 type are converted into owned f32
 * buffers.  Loading checks that every tensor the architecture needs exists
 * and has the shape the hyperparameters imply, and names the first that does
 * not.
 */
#ifndef SASERVE_MODEL_H
#define SASERVE_MODEL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "gguf.h"

typedef enum { ARCH_LLAMA, ARCH_QWEN2, ARCH_QWEN3 } model_arch;
typedef enum { ROPE_NORM, ROPE_NEOX } rope_style; /* adjacent pairs / halves */

/* A weight matrix: rows x cols, row-major, each row row_bytes of `type`.
 * y = W x means y[r] = row r . x. */
typedef struct {
    uint32_t type;
    int rows, cols;
    size_t row_bytes;
    const uint8_t *data;
} wmat;

typedef struct {
    const float *attn_norm; /* [n_embd] */
    const float *ffn_norm;  /* [n_embd] */
    wmat wq;     /* (n_head * head_dim, n_embd) */
    wmat wk;     /* (n_head_kv * head_dim, n_embd) */
    wmat wv;     /* (n_head_kv * head_dim, n_embd) */
    wmat wo;     /* (n_embd, n_head * head_dim) */
    wmat w_gate; /* (n_ff, n_embd) */
    wmat w_up;   /* (n_ff, n_embd) */
    wmat w_down; /* (n_embd, n_ff) */
    const float *bq, *bk, *bv;     /* qwen2 biases, else NULL */
    const float *q_norm, *k_norm;  /* qwen3 per-head norms [head_dim], else NULL */
} layer_weights;

typedef struct {
    gguf *g;
    char arch_name[32];
    char name[128];
    model_arch arch;
    int n_layer, n_embd, n_head, n_head_kv, head_dim, n_ff, n_vocab, n_ctx_train;
    int n_rot;
    float rope_base;
    rope_style rope;
    float norm_eps;
    /* RoPE frequency factors (Llama 3 scaling, as GGUF stores it: the
     * rope_freqs.weight tensor, [n_rot/2]; each frequency is divided by its
     * factor), or NULL.  Linear scaling divides positions by rope_linear. */
    const float *rope_freqs;
    float rope_linear;
    char shared_layers_key[128]; /* saserve.shared_layers, "" if absent */

    wmat tok_embd;            /* (n_vocab, n_embd) */
    wmat output;              /* (n_vocab, n_embd); tok_embd when tied */
    const float *output_norm; /* [n_embd] */
    layer_weights *layers;
    uint32_t main_type;       /* type of most matrix bytes */
    size_t weight_bytes, n_params;

    float *owned;             /* f32 copies of non-f32 1-D tensors */
} model;

/* Loads hyperparameters and weights from path.  Returns 0 or a negative
 * ENGINE_E* code with a one-line reason in err. */
int model_load(model *m, const char *path, char *err, size_t errlen);
/* The same from a parsed GGUF (gguf_parse on a buffer: tests, fuzzing).  The
 * model takes g over (model_free closes it, also on failure); path names the
 * model when it has no general.name. */
int model_load_gguf(model *m, gguf *g, const char *path, char *err, size_t errlen);
void model_free(model *m);

#endif
