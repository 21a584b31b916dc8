/*
 * gguf.h - a checked reader for GGUF v3 files.
 *
 * The file is mmapped read-only.  gguf_parse() walks the header once and
 * checks every count, length, type, shape, offset and size against the bytes
 * actually present before anything is read; afterwards every pointer it hands
 * out (strings, arrays, tensor data) lies inside the mapping.  Strings are not
 * NUL-terminated: they are (pointer, length) pairs.
 *
 * Ownership: the gguf owns the mapping and its index; everything returned
 * stays valid until gguf_close().
 */
#ifndef SASERVE_GGUF_H
#define SASERVE_GGUF_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Metadata value types (GGUF spec). */
enum {
    GGUF_T_UINT8 = 0, GGUF_T_INT8 = 1, GGUF_T_UINT16 = 2, GGUF_T_INT16 = 3,
    GGUF_T_UINT32 = 4, GGUF_T_INT32 = 5, GGUF_T_FLOAT32 = 6, GGUF_T_BOOL = 7,
    GGUF_T_STRING = 8, GGUF_T_ARRAY = 9, GGUF_T_UINT64 = 10, GGUF_T_INT64 = 11,
    GGUF_T_FLOAT64 = 12,
};

/* Tensor element types (ggml numbering). */
enum {
    GGML_F32 = 0, GGML_F16 = 1, GGML_Q4_0 = 2, GGML_Q4_1 = 3, GGML_Q5_0 = 6,
    GGML_Q5_1 = 7, GGML_Q8_0 = 8, GGML_Q8_1 = 9, GGML_Q2_K = 10, GGML_Q3_K = 11,
    GGML_Q4_K = 12, GGML_Q5_K = 13, GGML_Q6_K = 14, GGML_Q8_K = 15, GGML_BF16 = 30,
};

#define GGUF_MAX_DIMS 4

typedef struct {
    const char *p;
    uint64_t len;
} gguf_str;

typedef struct {
    gguf_str key;
    uint32_t type;
    union {
        uint64_t u;
        int64_t i;
        double f;
        bool b;
        gguf_str s;
        struct {
            uint32_t type;
            uint64_t n;
            const void *data;  /* numeric arrays: n packed little-endian elements */
            gguf_str *strs;    /* string arrays: n entries */
        } arr;
    } v;
} gguf_kv;

typedef struct {
    gguf_str name;
    uint32_t n_dims;
    uint64_t ne[GGUF_MAX_DIMS]; /* ne[0] is the contiguous (row) dimension */
    uint32_t type;
    uint64_t offset;            /* relative to the data section */
    uint64_t nbytes;
    const void *data;
} gguf_tensor;

typedef struct gguf gguf;

/* Opens and maps path, then parses it.  Returns NULL and writes a one-line
 * reason to err on any failure. */
gguf *gguf_open(const char *path, char *err, size_t errlen);
/* Parses a buffer the caller keeps alive (tests, fuzzing). */
gguf *gguf_parse(const void *data, size_t size, char *err, size_t errlen);
void gguf_close(gguf *g);

/* A model file truncated on disk while mapped makes the next read of a page
 * past its new end raise SIGBUS.  gguf_guard_sigbus() installs a handler
 * (process-wide; call once, before other threads start) that, for a fault
 * inside a mapping gguf_open() made, writes a message naming the file to
 * stderr and exits with GGUF_SIGBUS_EXIT (70, EX_SOFTWARE); any other SIGBUS
 * keeps its default action. */
#define GGUF_SIGBUS_EXIT 70
void gguf_guard_sigbus(void);

uint32_t gguf_version(const gguf *g);
size_t gguf_file_size(const gguf *g);
uint64_t gguf_n_kv(const gguf *g);
const gguf_kv *gguf_kv_at(const gguf *g, uint64_t i);
uint64_t gguf_n_tensors(const gguf *g);
const gguf_tensor *gguf_tensor_at(const gguf *g, uint64_t i);

const gguf_kv *gguf_find(const gguf *g, const char *key);
const gguf_tensor *gguf_find_tensor(const gguf *g, const char *name);

/* Typed getters.  They return false when the key is absent; when it is present
 * with a type that cannot represent the request they return false and set
 * *bad (if given) so callers can name the key in an error. */
bool gguf_get_u64(const gguf *g, const char *key, uint64_t *out, bool *bad);
bool gguf_get_f64(const gguf *g, const char *key, double *out, bool *bad);
bool gguf_get_bool(const gguf *g, const char *key, bool *out, bool *bad);
bool gguf_get_str(const gguf *g, const char *key, gguf_str *out, bool *bad);

/* Element i of a numeric array as double / int64 (checked by caller: i < n).
 * gguf_arr_i64 truncates floats toward zero and saturates what int64 cannot
 * hold (NaN gives 0). */
double gguf_arr_f64(const gguf_kv *kv, uint64_t i);
int64_t gguf_arr_i64(const gguf_kv *kv, uint64_t i);

bool gguf_str_eq(gguf_str s, const char *c);

/* Element type facts; name is NULL for unknown types. */
const char *ggml_type_name(uint32_t type);
uint32_t ggml_block_elems(uint32_t type);  /* 0 for unknown */
uint32_t ggml_block_bytes(uint32_t type);
/* Bytes of a row of n elements, or 0 if n is not a whole number of blocks. */
size_t ggml_row_bytes(uint32_t type, uint64_t n);

#endif
