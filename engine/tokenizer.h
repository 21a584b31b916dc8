/*
 * tokenizer.h - tokenizers read from GGUF metadata.
 *
 * "llama" (SentencePiece BPE): text gets a dummy-prefix space, spaces become
 * U+2581, characters are merged pairwise by highest piece score (leftmost
 * first on ties), and pieces not in the vocabulary fall back to <0xNN> byte
 * tokens.  This is what sentencepiece itself does for BPE models.
 *
 * "gpt2" (byte-level BPE, Llama 3, Qwen2/2.5/3): see tokenizer_bpe.h.  The
 * vocabulary, special tokens and end-of-generation set are handled here for
 * both.
 *
 * A tokenizer is immutable after tokenizer_load(); encode and decode may run
 * on any number of threads at once.
 */
#ifndef SASERVE_TOKENIZER_H
#define SASERVE_TOKENIZER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "gguf.h"

typedef struct tokenizer tokenizer;

enum { TOK_NORMAL = 1, TOK_UNKNOWN = 2, TOK_CONTROL = 3, TOK_USER = 4, TOK_UNUSED = 5, TOK_BYTE = 6 };

int tokenizer_load(tokenizer **out, const gguf *g, char *err, size_t errlen);
void tokenizer_free(tokenizer *t);

int tokenizer_n_vocab(const tokenizer *t);
int tokenizer_bos(const tokenizer *t);
int tokenizer_eos(const tokenizer *t);
bool tokenizer_add_bos(const tokenizer *t);
/* True for end-of-generation tokens (EOS, and e.g. <|eot_id|>). */
bool tokenizer_is_eog(const tokenizer *t, int32_t id);

/* Returns the id count (may exceed max_ids; only max_ids are written) or a
 * negative ENGINE_E* code. */
int tokenizer_encode(const tokenizer *t, const char *text, size_t len, bool add_bos, int32_t *ids, int max_ids);
typedef struct {
    const char *text;
    size_t len;
    bool parse_special; /* control/user-defined token texts become those tokens */
} tokenizer_fragment;

/* Encodes several pieces of text as one input (chat templates: template
 * parts parse special tokens, message contents do not). */
int tokenizer_encode_fragments(const tokenizer *t, const tokenizer_fragment *frags, int n_frags, bool add_bos,
                               int32_t *ids, int max_ids);
/* Id of the token whose text is s[0..n), or -1. */
int32_t tokenizer_lookup(const tokenizer *t, const char *s, size_t n);
/* TOK_* type of a token (id in range). */
int tokenizer_token_type(const tokenizer *t, int32_t id);
/* Bytes of one token in running text; -1 if id is out of range. */
int tokenizer_token_bytes(const tokenizer *t, int32_t id, char *buf, size_t cap);
/* Standalone decode (see engine_detokenize). */
size_t tokenizer_decode(const tokenizer *t, const int32_t *ids, int n, char *buf, size_t cap);

#endif
