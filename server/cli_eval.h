/*
 * cli_eval.h - what `saserve perplexity` and `saserve calibrate` share:
 * reading the evaluation tokens and scoring fixed windows of them.
 *
 * Protocol (the one of sa-tiny's reference/span_perplexity.json): with a
 * window of N tokens, window i feeds tokens [N*i, N*i + N) to a fresh, empty
 * sequence and scores the predictions of tokens [N*i + 1, N*i + N], so every
 * token but the first is scored exactly once.  A stream of n tokens gives
 * (n - 1) / N windows; an incomplete final window is dropped.
 */
#ifndef SASERVE_CLI_EVAL_H
#define SASERVE_CLI_EVAL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "engine.h"

/* Default window length; capped at the model's context. */
#define EVAL_DEFAULT_CTX 512
/* Tokens per engine_step: several windows batched together keep OpenBLAS
 * busy with tall matrices. */
#define EVAL_BATCH_TOKENS 2048

/* An engine log sink that shows only errors: for the extra engines the
 * tools open, whose start-up lines would repeat the first one's. */
void eval_log_quiet(engine_log_level level, const char *msg, void *ud);

/* Opens the engine of p sized for windows of *ctx tokens: n_ctx = the
 * window, as many sequences as windows batched per step (batch_tokens per
 * step; a longer window is fed in chunks), no prefix cache.  *ctx == 0 picks
 * EVAL_DEFAULT_CTX capped at the model's context; a *ctx beyond the model's
 * context is refused.  p is updated to the parameters used, so more engines
 * can be opened alike.  quiet: the engine logs only errors while opening (a
 * first, small open that learns the model's context always does).  Leaves
 * the default log sink installed.  Returns the engine, or NULL with *status
 * set to 1 (runtime) or 2 (usage) and the reason printed. */
engine *eval_open(engine_params *p, long *ctx, int batch_tokens, bool quiet, const char *prog, int *status);

/* The evaluation token stream.  Owned by the caller: eval_stream_free(). */
typedef struct {
    int32_t *ids;
    size_t n;
} eval_stream;

/* Reads exactly one of text_path (tokenized as one text with one leading
 * BOS) or tokens_path (raw little-endian uint16 ids, used as they are; no
 * BOS is added) and checks every id against the model's vocabulary.
 * Returns 0, or 1 with a message naming the file printed to stderr. */
int eval_stream_load(const engine *e, const char *text_path, const char *tokens_path, eval_stream *out,
                     const char *prog);
void eval_stream_free(eval_stream *s);

/* Windows of ctx tokens the stream holds: (n - 1) / ctx, or 0. */
int eval_n_windows(const eval_stream *s, int ctx);

typedef struct {
    double nll_sum; /* sum of -log p(target) over the scored tokens */
    long tokens;    /* scored tokens: windows * ctx */
    int windows;
    double seconds;
} eval_result;

/* Largest window count whose windows go into one engine_step together for
 * an engine with these limits (at least 1: a longer window is fed in chunks
 * of max_batch_tokens). */
int eval_windows_per_step(const engine_info *in, int ctx);

/* Scores windows [0, n_windows) of s with windows of ctx tokens.  Several
 * windows share one engine_step as separate items (at most
 * eval_windows_per_step()); each gets its own sequence, freed afterwards.
 * log-softmax is computed in double precision.  label: progress lines on
 * stderr start with it (NULL: silent).  Returns 0 or a negative engine code
 * (with its message printed). */
int eval_windows(engine *e, const eval_stream *s, int ctx, int n_windows, eval_result *out, const char *label);

/* -log softmax(logits)[target], in double precision. */
double eval_token_nll(const float *logits, int n_vocab, int32_t target);

#endif
