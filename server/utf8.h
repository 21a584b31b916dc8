/*
 * utf8.h - UTF-8 checks for streaming text and validating requests.
 */
#ifndef SASERVE_UTF8_H
#define SASERVE_UTF8_H

#include <stdbool.h>
#include <stddef.h>

/* Length of the longest prefix of s[0..n) that does not end inside a
 * multi-byte character that the following bytes could still complete.
 * Invalid bytes count as complete (they are replaced on output). */
size_t utf8_complete_prefix(const char *s, size_t n);
/* True if s[0..n) is valid UTF-8 (no overlongs, surrogates or values past
 * U+10FFFF). */
bool utf8_valid(const char *s, size_t n);
/* Copies s[0..n) to out replacing each invalid byte with U+FFFD; out needs
 * 3n bytes.  Returns the bytes written. */
size_t utf8_sanitize(const char *s, size_t n, char *out);

#endif
