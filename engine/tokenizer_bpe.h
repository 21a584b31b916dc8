/*
 * tokenizer_bpe.h - GPT-2 byte-level BPE ("tokenizer.ggml.model" = "gpt2"):
 * the parts of such a tokenizer that differ from SentencePiece's.  The
 * vocabulary, special tokens, BOS/EOS and end-of-generation set stay in
 * tokenizer.c, which calls in here for plain text and token bytes.
 *
 * Encoding a piece of plain text:
 *   1. NFC, for the families whose Hugging Face tokenizer.json normalises so
 *      (Qwen2: "normalizer": {"type": "NFC"}); GGUF has no key for it.
 *   2. Pre-tokenization: the family's split regex ("tokenizer.ggml.pre"),
 *      implemented as a hand-written matcher over code points (below).
 *   3. Each pre-token's bytes become GPT-2's printable stand-ins (byte 0x20
 *      is "Ġ", ...), one symbol per byte, and pairs are merged by rank from
 *      "tokenizer.ggml.merges" (lowest rank first, leftmost on ties), as
 *      Hugging Face tokenizers does.  Llama 3 sets ignore_merges: a pre-token
 *      that is itself in the vocabulary is taken whole.
 * Decoding maps a token's stand-in characters back to bytes, so one token
 * may hold part of a UTF-8 character; callers that stream hold such bytes
 * back until the character is complete.
 *
 * A bpe_model is immutable after bpe_model_load(); thread-safe to use.
 */
#ifndef SASERVE_TOKENIZER_BPE_H
#define SASERVE_TOKENIZER_BPE_H

#include <stddef.h>
#include <stdint.h>

#include "gguf.h"
#include "tokenizer.h"

/* Pre-tokenizer families (the split regex each one stands for):
 *   GPT2    's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
 *   LLAMA3  (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|
 *            ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
 *   QWEN2   as LLAMA3 with \p{N} (one digit per pre-token) instead of \p{N}{1,3} */
typedef enum { BPE_PRE_GPT2, BPE_PRE_LLAMA3, BPE_PRE_QWEN2 } bpe_pre;

/* End (byte offset into s) of the pre-token that starts at pos < len.  Never
 * returns pos: every byte belongs to exactly one pre-token.  Bytes that are
 * not valid UTF-8 count as one "other" character each. */
size_t bpe_pre_next(bpe_pre pre, const char *s, size_t len, size_t pos);

typedef struct bpe_model bpe_model;

/* Reads the merges and "tokenizer.ggml.pre" of g; t must already hold the
 * vocabulary (tokenizer_lookup, tokenizer_token_type work).  On failure
 * returns a negative ENGINE_E* code and writes a reason naming the key. */
int bpe_model_load(bpe_model **out, const tokenizer *t, const gguf *g, char *err, size_t errlen);
void bpe_model_free(bpe_model *m);
bpe_pre bpe_model_pre(const bpe_model *m);

/* Encodes plain text (no special tokens), calling emit(ud, id) for each id in
 * order.  Returns 0 or a negative ENGINE_E* code. */
int bpe_encode(const bpe_model *m, const tokenizer *t, const char *text, size_t len,
               void (*emit)(void *ud, int32_t id), void *ud);

/* The bytes a normal token's text stands for (the inverse of GPT-2's byte
 * map); characters outside the map are copied as UTF-8.  Writes at most cap
 * bytes and returns the full length. */
size_t bpe_token_bytes(const char *text, size_t len, char *buf, size_t cap);

#endif
