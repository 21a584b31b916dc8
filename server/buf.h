/*
 * buf.h - a growable byte buffer (always NUL-terminated).
 */
#ifndef SASERVE_BUF_H
#define SASERVE_BUF_H

#include <stdbool.h>
#include <stddef.h>

typedef struct {
    char *p;
    size_t len, cap;
} buf;

/* Returns false on allocation failure (the buffer is unchanged). */
bool buf_append(buf *b, const void *data, size_t n);
bool buf_appendf(buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void buf_consume(buf *b, size_t n); /* drops the first n bytes */
void buf_reset(buf *b);
void buf_free(buf *b);

#endif
