/*
 * gguf_writer.h - writes small GGUF v3 files for tests (tokenizer fixtures,
 * tiny models).  Values are gathered in memory, then gguf_writer_save()
 * writes the header, metadata, tensor infos and 32-byte aligned data.
 *
 * Tensor data is not copied: it must stay valid until gguf_writer_save().
 * Allocation failures are remembered and reported by gguf_writer_save().
 */
#ifndef SASERVE_TEST_GGUF_WRITER_H
#define SASERVE_TEST_GGUF_WRITER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct gguf_writer gguf_writer;

gguf_writer *gguf_writer_new(void);
void gguf_writer_free(gguf_writer *w);

void gguf_writer_str(gguf_writer *w, const char *key, const char *value);
void gguf_writer_u32(gguf_writer *w, const char *key, uint32_t value);
void gguf_writer_f32(gguf_writer *w, const char *key, float value);
void gguf_writer_bool(gguf_writer *w, const char *key, bool value);
/* Array of n strings; lens may be NULL for NUL-terminated strings. */
void gguf_writer_strs(gguf_writer *w, const char *key, const char *const *values, const size_t *lens, size_t n);
void gguf_writer_i32s(gguf_writer *w, const char *key, const int32_t *values, size_t n);
/* ne[0] is the contiguous dimension (ggml order). */
void gguf_writer_tensor(gguf_writer *w, const char *name, uint32_t type, int n_dims, const uint64_t *ne,
                        const void *data, size_t nbytes);

/* Writes path (through path.tmp and a rename).  Returns 0, or -1 with errno
 * set (ENOMEM for an earlier allocation failure). */
int gguf_writer_save(gguf_writer *w, const char *path);

#endif
