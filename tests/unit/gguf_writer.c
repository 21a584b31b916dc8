/*
 * gguf_writer.c - see gguf_writer.h.
 */
#include "gguf_writer.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gguf.h"

#define ALIGN 32

typedef struct {
    char *p;
    size_t n, cap;
} bytes;

typedef struct {
    const void *data;
    size_t nbytes;
} tensor_data;

struct gguf_writer {
    bytes kv, info;
    uint64_t n_kv, n_tensors;
    tensor_data *tensors;
    size_t data_size; /* data section so far, aligned */
    bool failed;
};

static void put(gguf_writer *w, bytes *b, const void *p, size_t n) {
    if (w->failed || n == 0) return;
    if (b->n + n > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->n + n) cap *= 2;
        char *q = realloc(b->p, cap);
        if (!q) {
            w->failed = true;
            return;
        }
        b->p = q;
        b->cap = cap;
    }
    memcpy(b->p + b->n, p, n);
    b->n += n;
}

/* Little-endian hosts only, like the engine's reader. */
static void put_u32(gguf_writer *w, bytes *b, uint32_t v) { put(w, b, &v, 4); }
static void put_u64(gguf_writer *w, bytes *b, uint64_t v) { put(w, b, &v, 8); }
static void put_str(gguf_writer *w, bytes *b, const char *s, size_t n) {
    put_u64(w, b, n);
    put(w, b, s, n);
}

static void key(gguf_writer *w, const char *k, uint32_t type) {
    put_str(w, &w->kv, k, strlen(k));
    put_u32(w, &w->kv, type);
    w->n_kv++;
}

gguf_writer *gguf_writer_new(void) { return calloc(1, sizeof(gguf_writer)); }

void gguf_writer_free(gguf_writer *w) {
    if (!w) return;
    free(w->kv.p);
    free(w->info.p);
    free(w->tensors);
    free(w);
}

void gguf_writer_str(gguf_writer *w, const char *k, const char *value) {
    key(w, k, GGUF_T_STRING);
    put_str(w, &w->kv, value, strlen(value));
}

void gguf_writer_u32(gguf_writer *w, const char *k, uint32_t value) {
    key(w, k, GGUF_T_UINT32);
    put_u32(w, &w->kv, value);
}

void gguf_writer_f32(gguf_writer *w, const char *k, float value) {
    key(w, k, GGUF_T_FLOAT32);
    put(w, &w->kv, &value, 4);
}

void gguf_writer_bool(gguf_writer *w, const char *k, bool value) {
    key(w, k, GGUF_T_BOOL);
    uint8_t b = value;
    put(w, &w->kv, &b, 1);
}

void gguf_writer_strs(gguf_writer *w, const char *k, const char *const *values, const size_t *lens, size_t n) {
    key(w, k, GGUF_T_ARRAY);
    put_u32(w, &w->kv, GGUF_T_STRING);
    put_u64(w, &w->kv, n);
    for (size_t i = 0; i < n; i++) put_str(w, &w->kv, values[i], lens ? lens[i] : strlen(values[i]));
}

void gguf_writer_i32s(gguf_writer *w, const char *k, const int32_t *values, size_t n) {
    key(w, k, GGUF_T_ARRAY);
    put_u32(w, &w->kv, GGUF_T_INT32);
    put_u64(w, &w->kv, n);
    put(w, &w->kv, values, n * 4);
}

void gguf_writer_tensor(gguf_writer *w, const char *name, uint32_t type, int n_dims, const uint64_t *ne,
                        const void *data, size_t nbytes) {
    tensor_data *t = realloc(w->tensors, (size_t)(w->n_tensors + 1) * sizeof *t);
    if (!t) {
        w->failed = true;
        return;
    }
    w->tensors = t;
    w->tensors[w->n_tensors++] = (tensor_data){data, nbytes};
    put_str(w, &w->info, name, strlen(name));
    put_u32(w, &w->info, (uint32_t)n_dims);
    for (int d = 0; d < n_dims; d++) put_u64(w, &w->info, ne[d]);
    put_u32(w, &w->info, type);
    put_u64(w, &w->info, w->data_size);
    w->data_size += (nbytes + ALIGN - 1) / ALIGN * ALIGN;
}

int gguf_writer_save(gguf_writer *w, const char *path) {
    if (w->failed) {
        errno = ENOMEM;
        return -1;
    }
    char tmp[4096];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    FILE *f = fopen(tmp, "wb");
    if (!f) return -1;
    static const char zeros[ALIGN] = {0};
    uint32_t version = 3;
    bool ok = fwrite("GGUF", 1, 4, f) == 4 && fwrite(&version, 4, 1, f) == 1 &&
              fwrite(&w->n_tensors, 8, 1, f) == 1 && fwrite(&w->n_kv, 8, 1, f) == 1 &&
              fwrite(w->kv.p, 1, w->kv.n, f) == w->kv.n && fwrite(w->info.p, 1, w->info.n, f) == w->info.n;
    size_t off = 24 + w->kv.n + w->info.n;
    if (ok && off % ALIGN) ok = fwrite(zeros, 1, ALIGN - off % ALIGN, f) == ALIGN - off % ALIGN;
    for (uint64_t i = 0; ok && i < w->n_tensors; i++) {
        const tensor_data *t = &w->tensors[i];
        ok = fwrite(t->data, 1, t->nbytes, f) == t->nbytes;
        if (ok && t->nbytes % ALIGN) ok = fwrite(zeros, 1, ALIGN - t->nbytes % ALIGN, f) == ALIGN - t->nbytes % ALIGN;
    }
    if (fclose(f) != 0) ok = false;
    if (!ok || rename(tmp, path) != 0) {
        int e = errno;
        remove(tmp);
        errno = e ? e : EIO;
        return -1;
    }
    return 0;
}
