/*
 * unicode.h - the little of Unicode the tokenizers need: UTF-8 decoding, the
 * character classes of the pre-tokenizer regexes (\p{L}, \p{N}, \s) and NFC.
 *
 * The data comes from engine/unicode_tables.h, generated from Python's
 * unicodedata by tests/tools/gen_unicode_tables.py (see there for the table
 * layouts and how to regenerate).  Everything here is pure and thread-safe.
 */
#ifndef SASERVE_UNICODE_H
#define SASERVE_UNICODE_H

#include <stddef.h>
#include <stdint.h>

/* Character classes as the pre-tokenizer regexes see them. */
enum {
    UNICODE_OTHER = 0,
    UNICODE_LETTER = 1, /* \p{L}: Lu Ll Lt Lm Lo */
    UNICODE_NUMBER = 2, /* \p{N}: Nd Nl No */
    UNICODE_SPACE = 3,  /* \s: Unicode White_Space (Zs Zl Zp, U+0009..U+000D, U+0085) */
};

/* Stands for a byte that does not start a valid UTF-8 sequence. */
#define UNICODE_INVALID 0xFFFFFFFFu

/* Decodes the code point at s[0..n) (n > 0) and stores its byte length in
 * *len.  Invalid, overlong, surrogate or truncated sequences give
 * UNICODE_INVALID with *len = 1, so every byte is consumed exactly once. */
uint32_t unicode_decode(const char *s, size_t n, size_t *len);
/* Writes cp as UTF-8 (1..4 bytes) to out; returns the length. */
int unicode_encode(uint32_t cp, char *out);

/* UNICODE_OTHER .. UNICODE_SPACE; UNICODE_INVALID is OTHER. */
int unicode_class(uint32_t cp);

/* NFC of s[0..n).  Returns 0 and sets *out = NULL when s is already in NFC
 * (the common case; nothing is allocated), else a malloc'ed copy in *out of
 * *out_len bytes that the caller frees.  Invalid UTF-8 bytes are kept as
 * they are.  Returns -1 when out of memory. */
int unicode_nfc(const char *s, size_t n, char **out, size_t *out_len);

/* Unicode version of the tables, e.g. "14.0.0". */
const char *unicode_version(void);

#endif
