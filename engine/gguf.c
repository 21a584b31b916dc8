/*
 * gguf.c - checked GGUF v3 reader.  See gguf.h.
 *
 * Every read goes through the cursor functions below, which check the
 * remaining length first; nothing is dereferenced that was not checked.
 * Counts are bounded by what the remaining bytes could possibly hold, so a
 * header that claims 2^60 tensors fails cleanly instead of allocating.
 */
#include "gguf.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define GGUF_MAGIC "GGUF"
#define GGUF_DEFAULT_ALIGNMENT 32
#define GGUF_MAX_NAME 256

struct gguf {
    const uint8_t *base;
    size_t size;
    bool mapped;
    uint32_t version;
    uint64_t n_kv, n_tensors;
    gguf_kv *kvs;
    gguf_tensor *tensors;
    uint64_t alignment;
    uint64_t data_offset;
};

/* ==== Element types ==================================================== */

static const struct {
    uint32_t type;
    const char *name;
    uint32_t block_elems, block_bytes;
} type_table[] = {
    {GGML_F32, "F32", 1, 4},        {GGML_F16, "F16", 1, 2},
    {GGML_Q4_0, "Q4_0", 32, 18},    {GGML_Q4_1, "Q4_1", 32, 20},
    {GGML_Q5_0, "Q5_0", 32, 22},    {GGML_Q5_1, "Q5_1", 32, 24},
    {GGML_Q8_0, "Q8_0", 32, 34},    {GGML_Q8_1, "Q8_1", 32, 36},
    {GGML_Q2_K, "Q2_K", 256, 84},   {GGML_Q3_K, "Q3_K", 256, 110},
    {GGML_Q4_K, "Q4_K", 256, 144},  {GGML_Q5_K, "Q5_K", 256, 176},
    {GGML_Q6_K, "Q6_K", 256, 210},  {GGML_Q8_K, "Q8_K", 256, 292},
    {GGML_BF16, "BF16", 1, 2},
};

static int type_index(uint32_t type) {
    for (size_t i = 0; i < sizeof type_table / sizeof type_table[0]; i++)
        if (type_table[i].type == type) return (int)i;
    return -1;
}

const char *ggml_type_name(uint32_t type) {
    int i = type_index(type);
    return i < 0 ? NULL : type_table[i].name;
}

uint32_t ggml_block_elems(uint32_t type) {
    int i = type_index(type);
    return i < 0 ? 0 : type_table[i].block_elems;
}

uint32_t ggml_block_bytes(uint32_t type) {
    int i = type_index(type);
    return i < 0 ? 0 : type_table[i].block_bytes;
}

size_t ggml_row_bytes(uint32_t type, uint64_t n) {
    uint32_t be = ggml_block_elems(type);
    if (be == 0 || n % be != 0) return 0;
    return (size_t)(n / be) * ggml_block_bytes(type);
}

/* ==== Cursor =========================================================== */

typedef struct {
    const uint8_t *p;
    size_t left;
    size_t size; /* whole buffer, for offsets in messages */
    char *err;
    size_t errlen;
} cursor;

static bool fail(cursor *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static bool fail(cursor *c, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->err, c->errlen, fmt, ap);
    va_end(ap);
    return false;
}

static size_t pos(const cursor *c) { return c->size - c->left; }

static bool take(cursor *c, void *out, size_t n, const char *what) {
    if (c->left < n)
        return fail(c, "file truncated: %s at offset %zu needs %zu bytes, %zu left", what, pos(c), n,
                    c->left);
    memcpy(out, c->p, n);
    c->p += n;
    c->left -= n;
    return true;
}

static bool take_u32(cursor *c, uint32_t *v, const char *what) { return take(c, v, 4, what); }
static bool take_u64(cursor *c, uint64_t *v, const char *what) { return take(c, v, 8, what); }

static bool take_str(cursor *c, gguf_str *s, const char *what) {
    uint64_t n = 0;
    if (!take_u64(c, &n, what)) return false;
    if (n > c->left)
        return fail(c, "%s at offset %zu has length %llu but only %zu bytes remain", what, pos(c) - 8,
                    (unsigned long long)n, c->left);
    s->p = (const char *)c->p;
    s->len = n;
    c->p += n;
    c->left -= (size_t)n;
    return true;
}

static size_t scalar_size(uint32_t t) {
    switch (t) {
    case GGUF_T_UINT8: case GGUF_T_INT8: case GGUF_T_BOOL: return 1;
    case GGUF_T_UINT16: case GGUF_T_INT16: return 2;
    case GGUF_T_UINT32: case GGUF_T_INT32: case GGUF_T_FLOAT32: return 4;
    case GGUF_T_UINT64: case GGUF_T_INT64: case GGUF_T_FLOAT64: return 8;
    default: return 0;
    }
}

/* Reads a little-endian scalar of type t at p into the kv union. */
static void decode_scalar(uint32_t t, const uint8_t *p, gguf_kv *kv) {
    switch (t) {
    case GGUF_T_UINT8: kv->v.u = p[0]; break;
    case GGUF_T_INT8: kv->v.i = (int8_t)p[0]; break;
    case GGUF_T_BOOL: kv->v.b = p[0] != 0; break;
    case GGUF_T_UINT16: { uint16_t x; memcpy(&x, p, 2); kv->v.u = x; break; }
    case GGUF_T_INT16: { int16_t x; memcpy(&x, p, 2); kv->v.i = x; break; }
    case GGUF_T_UINT32: { uint32_t x; memcpy(&x, p, 4); kv->v.u = x; break; }
    case GGUF_T_INT32: { int32_t x; memcpy(&x, p, 4); kv->v.i = x; break; }
    case GGUF_T_FLOAT32: { float x; memcpy(&x, p, 4); kv->v.f = x; break; }
    case GGUF_T_UINT64: { uint64_t x; memcpy(&x, p, 8); kv->v.u = x; break; }
    case GGUF_T_INT64: { int64_t x; memcpy(&x, p, 8); kv->v.i = x; break; }
    case GGUF_T_FLOAT64: { double x; memcpy(&x, p, 8); kv->v.f = x; break; }
    }
}

static bool read_value(cursor *c, gguf_kv *kv) {
    const char *key = "metadata value";
    if (kv->type == GGUF_T_STRING) return take_str(c, &kv->v.s, key);
    if (kv->type == GGUF_T_ARRAY) {
        uint32_t et = 0;
        uint64_t n = 0;
        if (!take_u32(c, &et, "array element type") || !take_u64(c, &n, "array length")) return false;
        kv->v.arr.type = et;
        kv->v.arr.n = n;
        kv->v.arr.data = NULL;
        kv->v.arr.strs = NULL;
        if (et == GGUF_T_STRING) {
            /* Each string needs at least its 8-byte length. */
            if (n > c->left / 8)
                return fail(c, "key '%.*s': string array of %llu entries cannot fit in %zu bytes",
                            (int)kv->key.len, kv->key.p, (unsigned long long)n, c->left);
            kv->v.arr.strs = malloc(n ? n * sizeof(gguf_str) : 1);
            if (!kv->v.arr.strs) return fail(c, "out of memory reading key '%.*s'", (int)kv->key.len, kv->key.p);
            for (uint64_t i = 0; i < n; i++)
                if (!take_str(c, &kv->v.arr.strs[i], "array string")) return false;
            return true;
        }
        size_t es = scalar_size(et);
        if (es == 0)
            return fail(c, "key '%.*s': unsupported array element type %u", (int)kv->key.len, kv->key.p, et);
        if (n > c->left / es)
            return fail(c, "key '%.*s': array of %llu elements of %zu bytes exceeds the %zu bytes left",
                        (int)kv->key.len, kv->key.p, (unsigned long long)n, es, c->left);
        kv->v.arr.data = c->p;
        c->p += n * es;
        c->left -= n * es;
        return true;
    }
    size_t es = scalar_size(kv->type);
    if (es == 0) return fail(c, "key '%.*s': unknown value type %u", (int)kv->key.len, kv->key.p, kv->type);
    if (c->left < es) return fail(c, "file truncated in the value of key '%.*s'", (int)kv->key.len, kv->key.p);
    decode_scalar(kv->type, c->p, kv);
    c->p += es;
    c->left -= es;
    return true;
}

/* ==== Parse ============================================================ */

static bool parse(gguf *g, char *err, size_t errlen) {
    cursor c = {g->base, g->size, g->size, err, errlen};
    char magic[4];
    if (!take(&c, magic, 4, "magic")) return false;
    if (memcmp(magic, GGUF_MAGIC, 4) != 0) return fail(&c, "not a GGUF file (bad magic)");
    if (!take_u32(&c, &g->version, "version")) return false;
    if (g->version != 3)
        return fail(&c, "unsupported GGUF version %u (only version 3 is supported)", g->version);
    if (!take_u64(&c, &g->n_tensors, "tensor count") || !take_u64(&c, &g->n_kv, "metadata count"))
        return false;
    /* A key needs >= 12 bytes (length + type), a tensor info >= 28. */
    if (g->n_kv > c.left / 12)
        return fail(&c, "metadata count %llu is impossible for a file of %zu bytes",
                    (unsigned long long)g->n_kv, g->size);
    if (g->n_tensors > c.left / 28)
        return fail(&c, "tensor count %llu is impossible for a file of %zu bytes",
                    (unsigned long long)g->n_tensors, g->size);
    g->kvs = calloc(g->n_kv ? g->n_kv : 1, sizeof(gguf_kv));
    g->tensors = calloc(g->n_tensors ? g->n_tensors : 1, sizeof(gguf_tensor));
    if (!g->kvs || !g->tensors) return fail(&c, "out of memory");

    g->alignment = GGUF_DEFAULT_ALIGNMENT;
    for (uint64_t i = 0; i < g->n_kv; i++) {
        gguf_kv *kv = &g->kvs[i];
        if (!take_str(&c, &kv->key, "metadata key")) return false;
        if (kv->key.len == 0 || kv->key.len > GGUF_MAX_NAME)
            return fail(&c, "metadata key %llu has invalid length %llu", (unsigned long long)i,
                        (unsigned long long)kv->key.len);
        if (!take_u32(&c, &kv->type, "metadata type")) return false;
        if (!read_value(&c, kv)) return false;
        for (uint64_t j = 0; j < i; j++)
            if (g->kvs[j].key.len == kv->key.len && !memcmp(g->kvs[j].key.p, kv->key.p, kv->key.len))
                return fail(&c, "duplicate metadata key '%.*s'", (int)kv->key.len, kv->key.p);
        if (gguf_str_eq(kv->key, "general.alignment")) {
            if (kv->type != GGUF_T_UINT32 || kv->v.u == 0 || (kv->v.u & (kv->v.u - 1)) || kv->v.u > 65536)
                return fail(&c, "general.alignment must be a power of two uint32 up to 65536");
            g->alignment = kv->v.u;
        }
    }

    for (uint64_t i = 0; i < g->n_tensors; i++) {
        gguf_tensor *t = &g->tensors[i];
        if (!take_str(&c, &t->name, "tensor name")) return false;
        if (t->name.len == 0 || t->name.len > GGUF_MAX_NAME)
            return fail(&c, "tensor %llu has an invalid name length %llu", (unsigned long long)i,
                        (unsigned long long)t->name.len);
        if (!take_u32(&c, &t->n_dims, "tensor dimension count")) return false;
        if (t->n_dims == 0 || t->n_dims > GGUF_MAX_DIMS)
            return fail(&c, "tensor '%.*s' has %u dimensions (1..%d allowed)", (int)t->name.len, t->name.p,
                        t->n_dims, GGUF_MAX_DIMS);
        uint64_t count = 1;
        for (uint32_t d = 0; d < GGUF_MAX_DIMS; d++) t->ne[d] = 1;
        for (uint32_t d = 0; d < t->n_dims; d++) {
            if (!take_u64(&c, &t->ne[d], "tensor dimension")) return false;
            if (t->ne[d] == 0 || t->ne[d] > ((uint64_t)1 << 40) || count > UINT64_MAX / t->ne[d] ||
                count * t->ne[d] > ((uint64_t)1 << 40))
                return fail(&c, "tensor '%.*s' has an absurd shape (dimension %u = %llu)", (int)t->name.len,
                            t->name.p, d, (unsigned long long)t->ne[d]);
            count *= t->ne[d];
        }
        if (!take_u32(&c, &t->type, "tensor type") || !take_u64(&c, &t->offset, "tensor offset")) return false;
        if (!ggml_type_name(t->type))
            return fail(&c, "tensor '%.*s' has unknown type %u", (int)t->name.len, t->name.p, t->type);
        size_t rb = ggml_row_bytes(t->type, t->ne[0]);
        if (rb == 0)
            return fail(&c, "tensor '%.*s': row of %llu elements is not a whole number of %s blocks",
                        (int)t->name.len, t->name.p, (unsigned long long)t->ne[0], ggml_type_name(t->type));
        t->nbytes = (uint64_t)rb * (count / t->ne[0]);
        if (t->offset % g->alignment)
            return fail(&c, "tensor '%.*s' offset %llu is not aligned to %llu", (int)t->name.len, t->name.p,
                        (unsigned long long)t->offset, (unsigned long long)g->alignment);
        for (uint64_t j = 0; j < i; j++)
            if (g->tensors[j].name.len == t->name.len && !memcmp(g->tensors[j].name.p, t->name.p, t->name.len))
                return fail(&c, "duplicate tensor name '%.*s'", (int)t->name.len, t->name.p);
    }

    uint64_t off = pos(&c);
    g->data_offset = (off + g->alignment - 1) / g->alignment * g->alignment;
    if (g->n_tensors > 0 && g->data_offset > g->size)
        return fail(&c, "file truncated: tensor data section would start at %llu, past the end (%zu)",
                    (unsigned long long)g->data_offset, g->size);
    uint64_t data_size = g->data_offset <= g->size ? g->size - g->data_offset : 0;
    for (uint64_t i = 0; i < g->n_tensors; i++) {
        gguf_tensor *t = &g->tensors[i];
        if (t->offset > data_size || t->nbytes > data_size - t->offset)
            return fail(&c, "tensor '%.*s' (%llu bytes at data offset %llu) extends past the end of the file "
                        "(%llu data bytes)",
                        (int)t->name.len, t->name.p, (unsigned long long)t->nbytes,
                        (unsigned long long)t->offset, (unsigned long long)data_size);
        t->data = g->base + g->data_offset + t->offset;
    }
    return true;
}

gguf *gguf_parse(const void *data, size_t size, char *err, size_t errlen) {
    gguf *g = calloc(1, sizeof *g);
    if (!g) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    g->base = data;
    g->size = size;
    if (!parse(g, err, errlen)) {
        gguf_close(g);
        return NULL;
    }
    return g;
}

/* ==== SIGBUS guard ===================================================== */

/* Reading a page of a mapped file past its current end raises SIGBUS: the
 * model file was truncated (or rewritten shorter) on disk while mapped.
 * Mappings are registered here so a handler can say which file it was,
 * instead of the process dying with "Bus error".  The messages are built
 * when the file is opened; the handler only calls write(2) and _exit(2). */

#define GUARD_SLOTS 8

static struct {
    _Atomic(const uint8_t *) base; /* NULL: free slot */
    size_t size;
    char msg[512];
    size_t msg_len;
} guard[GUARD_SLOTS];

static void guard_add(const uint8_t *base, size_t size, const char *path) {
    for (int i = 0; i < GUARD_SLOTS; i++) {
        const uint8_t *expect = NULL;
        if (atomic_load(&guard[i].base) != NULL) continue;
        int n = snprintf(guard[i].msg, sizeof guard[i].msg,
                         "saserve: fatal: SIGBUS reading the model file '%s': it was truncated or rewritten on disk "
                         "while the server had it mapped. Restore the file and restart; replace model files by "
                         "renaming a new file over the old one, never by writing into it.\n",
                         path);
        guard[i].msg_len = n < 0 ? 0 : (size_t)n < sizeof guard[i].msg ? (size_t)n : sizeof guard[i].msg - 1;
        guard[i].size = size;
        /* Publish last: the handler reads size and msg after base. */
        if (atomic_compare_exchange_strong(&guard[i].base, &expect, base)) return;
    }
}

static void guard_remove(const uint8_t *base) {
    for (int i = 0; i < GUARD_SLOTS; i++)
        if (atomic_load(&guard[i].base) == base) atomic_store(&guard[i].base, NULL);
}

static void on_sigbus(int sig, siginfo_t *si, void *uc) {
    (void)uc;
    const uint8_t *a = si ? (const uint8_t *)si->si_addr : NULL;
    for (int i = 0; i < GUARD_SLOTS; i++) {
        const uint8_t *b = atomic_load(&guard[i].base);
        if (b && a >= b && a < b + guard[i].size) {
            ssize_t w = write(STDERR_FILENO, guard[i].msg, guard[i].msg_len);
            (void)w;
            _exit(GGUF_SIGBUS_EXIT);
        }
    }
    /* Not a model mapping: the default action (terminate, core) once the
     * faulting access runs again. */
    signal(sig, SIG_DFL);
}

void gguf_guard_sigbus(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_sigbus;
    sa.sa_flags = SA_SIGINFO;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGBUS, &sa, NULL);
}

gguf *gguf_open(const char *path, char *err, size_t errlen) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        snprintf(err, errlen, "cannot open '%s': %s", path, strerror(errno));
        return NULL;
    }
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        snprintf(err, errlen, "'%s' is not a regular file", path);
        close(fd);
        return NULL;
    }
    if (st.st_size < 24) {
        snprintf(err, errlen, "'%s' is too small to be a GGUF file (%lld bytes)", path, (long long)st.st_size);
        close(fd);
        return NULL;
    }
    void *map = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (map == MAP_FAILED) {
        snprintf(err, errlen, "cannot map '%s': %s", path, strerror(errno));
        return NULL;
    }
    char why[384];
    gguf *g = gguf_parse(map, (size_t)st.st_size, why, sizeof why);
    if (!g) {
        snprintf(err, errlen, "%s: %s", path, why);
        munmap(map, (size_t)st.st_size);
        return NULL;
    }
    g->mapped = true;
    guard_add(g->base, g->size, path);
    return g;
}

void gguf_close(gguf *g) {
    if (!g) return;
    if (g->kvs)
        for (uint64_t i = 0; i < g->n_kv; i++)
            if (g->kvs[i].type == GGUF_T_ARRAY) free(g->kvs[i].v.arr.strs);
    free(g->kvs);
    free(g->tensors);
    if (g->mapped) {
        guard_remove(g->base);
        munmap((void *)g->base, g->size);
    }
    free(g);
}

/* ==== Access =========================================================== */

uint32_t gguf_version(const gguf *g) { return g->version; }
size_t gguf_file_size(const gguf *g) { return g->size; }
uint64_t gguf_n_kv(const gguf *g) { return g->n_kv; }
const gguf_kv *gguf_kv_at(const gguf *g, uint64_t i) { return i < g->n_kv ? &g->kvs[i] : NULL; }
uint64_t gguf_n_tensors(const gguf *g) { return g->n_tensors; }
const gguf_tensor *gguf_tensor_at(const gguf *g, uint64_t i) { return i < g->n_tensors ? &g->tensors[i] : NULL; }

bool gguf_str_eq(gguf_str s, const char *c) {
    size_t n = strlen(c);
    return s.len == n && memcmp(s.p, c, n) == 0;
}

const gguf_kv *gguf_find(const gguf *g, const char *key) {
    for (uint64_t i = 0; i < g->n_kv; i++)
        if (gguf_str_eq(g->kvs[i].key, key)) return &g->kvs[i];
    return NULL;
}

const gguf_tensor *gguf_find_tensor(const gguf *g, const char *name) {
    for (uint64_t i = 0; i < g->n_tensors; i++)
        if (gguf_str_eq(g->tensors[i].name, name)) return &g->tensors[i];
    return NULL;
}

static bool is_unsigned(uint32_t t) {
    return t == GGUF_T_UINT8 || t == GGUF_T_UINT16 || t == GGUF_T_UINT32 || t == GGUF_T_UINT64;
}
static bool is_signed(uint32_t t) {
    return t == GGUF_T_INT8 || t == GGUF_T_INT16 || t == GGUF_T_INT32 || t == GGUF_T_INT64;
}

bool gguf_get_u64(const gguf *g, const char *key, uint64_t *out, bool *bad) {
    const gguf_kv *kv = gguf_find(g, key);
    if (!kv) return false;
    if (is_unsigned(kv->type)) { *out = kv->v.u; return true; }
    if (is_signed(kv->type) && kv->v.i >= 0) { *out = (uint64_t)kv->v.i; return true; }
    if (bad) *bad = true;
    return false;
}

bool gguf_get_f64(const gguf *g, const char *key, double *out, bool *bad) {
    const gguf_kv *kv = gguf_find(g, key);
    if (!kv) return false;
    if (kv->type == GGUF_T_FLOAT32 || kv->type == GGUF_T_FLOAT64) { *out = kv->v.f; return true; }
    if (is_unsigned(kv->type)) { *out = (double)kv->v.u; return true; }
    if (is_signed(kv->type)) { *out = (double)kv->v.i; return true; }
    if (bad) *bad = true;
    return false;
}

bool gguf_get_bool(const gguf *g, const char *key, bool *out, bool *bad) {
    const gguf_kv *kv = gguf_find(g, key);
    if (!kv) return false;
    if (kv->type == GGUF_T_BOOL) { *out = kv->v.b; return true; }
    if (bad) *bad = true;
    return false;
}

bool gguf_get_str(const gguf *g, const char *key, gguf_str *out, bool *bad) {
    const gguf_kv *kv = gguf_find(g, key);
    if (!kv) return false;
    if (kv->type == GGUF_T_STRING) { *out = kv->v.s; return true; }
    if (bad) *bad = true;
    return false;
}

double gguf_arr_f64(const gguf_kv *kv, uint64_t i) {
    gguf_kv tmp;
    size_t es = scalar_size(kv->v.arr.type);
    decode_scalar(kv->v.arr.type, (const uint8_t *)kv->v.arr.data + i * es, &tmp);
    switch (kv->v.arr.type) {
    case GGUF_T_FLOAT32: case GGUF_T_FLOAT64: return tmp.v.f;
    case GGUF_T_BOOL: return tmp.v.b;
    default: return is_unsigned(kv->v.arr.type) ? (double)tmp.v.u : (double)tmp.v.i;
    }
}

int64_t gguf_arr_i64(const gguf_kv *kv, uint64_t i) {
    gguf_kv tmp;
    size_t es = scalar_size(kv->v.arr.type);
    decode_scalar(kv->v.arr.type, (const uint8_t *)kv->v.arr.data + i * es, &tmp);
    switch (kv->v.arr.type) {
    case GGUF_T_FLOAT32: case GGUF_T_FLOAT64: {
        /* Converting a NaN or an out-of-range float to an integer is
         * undefined: saturate instead (NaN gives 0). */
        double f = tmp.v.f;
        if (!(f == f)) return 0;
        if (f >= 9223372036854775807.0) return INT64_MAX;
        if (f <= -9223372036854775808.0) return INT64_MIN;
        return (int64_t)f;
    }
    case GGUF_T_BOOL: return tmp.v.b;
    default:
        if (is_unsigned(kv->v.arr.type)) return tmp.v.u > (uint64_t)INT64_MAX ? INT64_MAX : (int64_t)tmp.v.u;
        return tmp.v.i;
    }
}
