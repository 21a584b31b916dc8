/*
 * engine.h - the saserve inference engine: the only engine header the server
 * includes.
 *
 * The engine owns a model (mmapped GGUF weights), its tokenizer, a paged KV
 * cache and every activation buffer.  All memory is allocated by engine_open();
 * engine_step() never allocates.
 *
 * Threads: an engine is driven by one thread at a time (the scheduler thread
 * in the server, the main thread in the CLI tools).  Internally engine_step()
 * spreads its work over a persistent pool of n_threads - 1 worker threads.
 * The read-only accessors marked "any thread" may be called concurrently with
 * engine_step() (the HTTP loop tokenizes while the scheduler steps).
 *
 * Errors are negative ENGINE_E* values; engine_strerror() names them.
 */
#ifndef SASERVE_ENGINE_H
#define SASERVE_ENGINE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define SASERVE_VERSION "0.1.0"

/* One table gives the codes and their messages. */
#define ENGINE_ERRNO_MAP(X)                                                  \
    X(OK, 0, "success")                                                      \
    X(EINVAL, -1, "invalid argument")                                        \
    X(EIO, -2, "cannot read model file")                                     \
    X(EFORMAT, -3, "malformed model file")                                   \
    X(EUNSUPPORTED, -4, "unsupported model")                                 \
    X(ENOMEM, -5, "out of memory")                                           \
    X(ENOKV, -6, "KV cache has no free blocks")                              \
    X(ECTX, -7, "context length exceeded")                                   \
    X(ESEQ, -8, "no such sequence")                                          \
    X(EBATCH, -9, "batch exceeds the engine's limits")                       \
    X(ESHARED, -10, "invalid shared layers setting")

enum {
#define ENGINE_ERR_ENUM(name, val, msg) ENGINE_##name = (val),
    ENGINE_ERRNO_MAP(ENGINE_ERR_ENUM)
#undef ENGINE_ERR_ENUM
};

const char *engine_strerror(int err);

typedef enum { ENGINE_KV_F16 = 0, ENGINE_KV_F32 = 1 } engine_kv_type;

typedef enum {
    ENGINE_LOG_DEBUG = 0,
    ENGINE_LOG_INFO = 1,
    ENGINE_LOG_WARN = 2,
    ENGINE_LOG_ERROR = 3,
} engine_log_level;

typedef void (*engine_log_fn)(engine_log_level level, const char *msg, void *ud);

/* Route the engine's log lines (default: stderr, level >= INFO).  Process-wide;
 * call before engine_open(). */
void engine_set_log(engine_log_fn fn, void *ud);

/* Weights are read from a mapping of the model file.  If the file is
 * truncated on disk while mapped, the next read past its new end raises
 * SIGBUS.  engine_guard_sigbus() turns that into a message naming the file on
 * stderr and exit status ENGINE_SIGBUS_EXIT instead of a bare "Bus error".
 * Process-wide; call once at start-up, before engine_open(). */
#define ENGINE_SIGBUS_EXIT 70
void engine_guard_sigbus(void);

typedef struct engine engine;

/* Copy engine_default_params() and change what you need. */
typedef struct {
    const char *model_path;
    /* Layers that share attention, e.g. "4-11" or "5-7,9-11".  NULL: use the
     * model's saserve.shared_layers key if it has one; "none": no sharing. */
    const char *shared_layers;
    int n_threads;          /* 0: one per online CPU */
    int n_ctx;              /* max tokens per sequence; 0: the model's */
    size_t kv_cache_bytes;  /* KV pool size; 0: enough for max_seqs full contexts, capped */
    engine_kv_type kv_type; /* element type of cached K and V */
    int kv_block_tokens;    /* tokens per KV block (16) */
    int max_batch_tokens;   /* tokens per engine_step(), all sequences together */
    int max_seqs;           /* sequences that may exist at once */
    bool prefix_cache;      /* reuse full blocks of identical prompt prefixes */
    bool capture_attention; /* keep every layer's probabilities (for the observer) */
    const char *kernels;    /* "avx512", "avx2", "scalar"; NULL: best for this CPU */
    bool blas_prompt;       /* prompt items through OpenBLAS sgemm (default true) */
} engine_params;

engine_params engine_default_params(void);

/* Opens the model and allocates everything.  On failure returns a negative
 * code and writes a one-line reason (naming the tensor or key) to err. */
int engine_open(const engine_params *params, engine **out, char *err, size_t errlen);
void engine_close(engine *e);

/* What the engine loaded; valid until engine_close().  Any thread. */
typedef struct {
    const char *arch;        /* general.architecture */
    const char *name;        /* general.name or the file's base name */
    const char *weight_type; /* dominant matrix type, e.g. "Q8_0" */
    int n_layer, n_embd, n_head, n_head_kv, head_dim, n_ff, n_vocab;
    int n_ctx_train, n_ctx;
    int bos, eos;
    bool add_bos;
    size_t model_bytes;         /* bytes of tensor data in the file */
    size_t n_params;
    /* Shared Attention */
    const int *layer_source;    /* [n_layer]: source layer, itself when not shared */
    int n_shared;
    const char *shared_layers;  /* normalised, e.g. "4-11", or "none" */
    const char *shared_origin;  /* "model", "config", "none" */
    size_t kv_bytes_per_token;          /* with this sharing */
    size_t kv_bytes_per_token_unshared; /* the same model without sharing */
    /* KV pool */
    int kv_block_tokens, kv_blocks;
    size_t kv_k_bytes, kv_v_bytes;      /* capacity of the K and V planes */
    size_t kv_saved_bytes;              /* K bytes not allocated because of sharing */
    int max_batch_tokens, max_seqs;
    int n_threads;
} engine_info;

const engine_info *engine_get_info(const engine *e);

/* ---- Tokenizer (any thread) -------------------------------------------- */

/* Encodes text (not NUL-terminated; len bytes) into ids.  Special-token text
 * such as "<s>" is treated as plain text.  Returns the number of ids (which
 * may exceed max_ids: then only max_ids were written), or a negative code. */
int engine_tokenize(const engine *e, const char *text, size_t len, bool add_bos,
                    int32_t *ids, int max_ids);

/* Several pieces of text encoded as one input; pieces with parse_special
 * turn the text of control tokens (e.g. "<|im_start|>") into those tokens,
 * the others never do.  Same return convention as engine_tokenize. */
typedef struct {
    const char *text;
    size_t len;
    bool parse_special;
} engine_fragment;
int engine_tokenize_fragments(const engine *e, const engine_fragment *frags, int n_frags, bool add_bos, int32_t *ids,
                              int max_ids);
/* Id of the token whose text is exactly s (any type), or -1. */
int32_t engine_token_lookup(const engine *e, const char *s);
/* A string metadata value of the model (e.g. "tokenizer.chat_template"),
 * NUL-terminated copy into buf; false if absent or not a string. */
bool engine_meta_str(const engine *e, const char *key, char *buf, size_t cap);

/* The raw bytes a token stands for when it follows other text (SentencePiece
 * "▁" becomes a space; byte tokens give their byte; byte-level BPE tokens
 * give the bytes their characters stand for, which may be part of a UTF-8
 * character; control tokens give nothing).  Returns the length, or -1 for an
 * id out of range. */
int engine_token_bytes(const engine *e, int32_t id, char *buf, size_t cap);

/* Decodes ids into text as a standalone string: like the reference
 * tokenizer, drops the leading space the encoder's dummy prefix added
 * (SentencePiece only; byte-level BPE has none) and replaces each byte of
 * invalid UTF-8 with U+FFFD.  Returns the length written
 * (without the NUL), or the length needed when cap is too small. */
size_t engine_detokenize(const engine *e, const int32_t *ids, int n, char *buf, size_t cap);

/* End-of-generation token (EOS and its kin).  Any thread. */
bool engine_token_is_eog(const engine *e, int32_t id);

/* ---- Sequences and the KV cache (engine thread) ------------------------ */

/* Creates an empty sequence.  Returns its id (>= 0) or a negative code. */
int engine_seq_create(engine *e);
/* Frees a sequence and releases its KV blocks. */
void engine_seq_free(engine *e, int seq);
/* Tokens held in the sequence's cache. */
int engine_seq_len(const engine *e, int seq);
/* Makes dst hold the same cached tokens as src, sharing src's full blocks
 * (copy-on-write for the partial last block).  dst must be empty. */
int engine_seq_fork(engine *e, int src, int dst);
/* Attaches cached blocks whose token prefix equals tokens[0..n); returns the
 * number of tokens now cached (a multiple of the block size, and always < n
 * so the last token is computed).  The sequence must be empty. */
int engine_seq_prefix_attach(engine *e, int seq, const int32_t *tokens, int n);
/* Blocks a sequence would still need to hold n_more further tokens. */
int engine_seq_blocks_needed(const engine *e, int seq, int n_more);
/* Blocks free for allocation (unreferenced cached blocks count as free). */
int engine_kv_free_blocks(const engine *e);
int engine_kv_used_blocks(const engine *e);

typedef struct {
    uint64_t queries; /* prompt tokens in full blocks looked up */
    uint64_t hits;    /* of those, tokens found cached */
} engine_prefix_stats;
void engine_get_prefix_stats(const engine *e, engine_prefix_stats *out);

/* ---- Forward step (engine thread) -------------------------------------- */

typedef struct {
    int seq;               /* sequence to extend */
    const int32_t *tokens; /* tokens to append at positions seq_len.. */
    int n_tokens;
    bool all_logits;       /* logits for every token, not just the last */
    /* Prompt tokens go through OpenBLAS sgemm on dequantised weights (fast
     * for many rows); others through the engine's own kernels.  Each kernel
     * gives a token the same result whatever else is in the batch, so set
     * this for every prompt chunk and for nothing else. */
    bool prompt;
    /* Set by engine_step: n_tokens (all_logits) or 1 rows of n_vocab floats,
     * valid until the next engine_step. */
    const float *logits;
} engine_batch_item;

/* Runs one forward pass over every item together (each weight matrix is read
 * once for the whole batch).  The total token count must not exceed
 * max_batch_tokens.  KV blocks are taken from the pool as needed; on
 * ENGINE_ENOKV or ENGINE_ECTX nothing is changed.  Returns 0 or a negative
 * code. */
int engine_step(engine *e, engine_batch_item *items, int n_items);

/* Attention-probability observer, for calibration: called on the engine
 * thread during engine_step, once per item for every layer that computes its
 * own attention.  probs is laid out [n_tokens][n_head][stride]; the row of
 * token t holds the post-softmax weights of positions 0..pos0+t. */
typedef void (*engine_attn_observer)(int layer, int item, int n_head, int n_tokens, int pos0, int stride,
                                     const float *probs, void *ud);
void engine_set_attn_observer(engine *e, engine_attn_observer fn, void *ud);

/* Counters since open.  Any thread (engine_get_prefix_stats too). */
typedef struct {
    uint64_t tokens_processed;
    double attention_flops_saved; /* QK^T + softmax + Q/K projection work skipped */
} engine_counters;
void engine_get_counters(const engine *e, engine_counters *out);

/* ---- Shared-layer settings --------------------------------------------- */

/* Normalised text of a shared[] mask ("none", "4-11", "5-7,9-11"). */
void engine_format_shared_layers(const bool *shared, int n_layer, char *out, size_t cap);

/* Parses a shared-layers list ("none", "4-11", "5-7,9-11") for a model of
 * n_layer layers into shared[n_layer] (true where the layer shares).  On error
 * returns ENGINE_ESHARED and writes a reason naming the bad entry. */
int engine_parse_shared_layers(const char *text, int n_layer, bool *shared, char *err,
                               size_t errlen);

/* ---- Sampling (any thread; no allocation) ------------------------------ */

typedef struct {
    float temperature;        /* 0: greedy (argmax, lowest id on ties) */
    int top_k;                /* 0: off */
    float top_p;              /* 1: off */
    float min_p;              /* 0: off */
    float repetition_penalty; /* 1: off; divides positive / multiplies negative logits of seen tokens */
    float presence_penalty;   /* 0: off; minus this once for every seen token */
    float frequency_penalty;  /* 0: off; minus this times the token's count */
    const int32_t *bias_ids;  /* logit_bias: added to those logits */
    const float *bias_values;
    int n_bias;
} engine_sampling;

typedef struct {
    uint64_t s[4];
} engine_rng;

void engine_rng_seed(engine_rng *r, uint64_t seed);

/* Scratch bytes engine_sample needs for a vocabulary of n_vocab. */
size_t engine_sample_scratch_bytes(int n_vocab);

/* Picks the next token from logits.  Order: logit bias, penalties over
 * history (the generated tokens), temperature, top_k, top_p, min_p, then a
 * draw from rng.  scratch: engine_sample_scratch_bytes(n_vocab) bytes. */
int32_t engine_sample(const float *logits, int n_vocab, const engine_sampling *p, engine_rng *rng,
                      const int32_t *history, int n_history, void *scratch);

/* log-softmax of the raw logits at id, and the k most likely tokens with
 * their log-probabilities (descending).  Returns the count written. */
float engine_logprob(const float *logits, int n_vocab, int32_t id);
int engine_top_logprobs(const float *logits, int n_vocab, int k, int32_t *ids, float *logprobs);

#endif
