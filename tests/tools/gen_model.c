/*
 * gen_model.c - writes Llama-shaped GGUF v3 files with random weights, for
 * benchmarks: any size, F32, F16, BF16 or Q8_0, loadable by saserve and by
 * llama.cpp.
 *
 *   gen_model --preset 1b --type q8_0 -o build/bench/llama-1b-q8_0.gguf
 *   gen_model --preset sa-tiny-shape --type f16 -o /tmp/t.gguf
 *   gen_model --n-layer 4 --n-embd 256 --n-head 4 --n-head-kv 2 --n-ff 512 -o small.gguf
 *
 * The vocabulary (8192 tokens) and every tokenizer.* metadata key are copied
 * byte for byte from a tokenizer donor, by default the bundled
 * models/sa-tiny-sa-q8_0.gguf.  Weights: matrices ~ N(0, 0.02) (Box-Muller
 * on xoshiro256**), norm weights 1.  Each tensor has its own stream seeded
 * from --seed and the tensor's name, so the same seed gives the same
 * underlying float weights in every --type (only the rounding differs).
 * Q8_0 follows the GGUF format definition as ggml's reference quantiser does:
 * blocks of 32, d = max|x| / 127 stored as f16, q = round(x / d) (computed as
 * x * (1/d)).  Norm vectors are F32 in every type, as llama.cpp's converter
 * writes them.
 *
 * Self-contained on purpose (no engine headers): it must keep producing the
 * same files while the engine changes.
 */
#include <errno.h>
#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define ALIGN 32

enum { T_F32 = 0, T_F16 = 1, T_Q8_0 = 8, T_BF16 = 30 };
enum { V_UINT32 = 4, V_FLOAT32 = 6, V_STRING = 8, V_ARRAY = 9 };

typedef struct {
    int n_layer, n_embd, n_head, n_head_kv, n_ff, n_ctx;
    float rope_base, norm_eps;
} shape;

static const struct {
    const char *name;
    shape s;
} presets[] = {
    /* The bundled model's shape (12 layers, d 384, 6 heads / 2 KV, ff 1024). */
    {"sa-tiny-shape", {12, 384, 6, 2, 1024, 1024, 10000.0f, 1e-5f}},
    /* TinyLlama-1.1B's shape; with the 8192-token vocabulary, 1.0B parameters. */
    {"1b", {22, 2048, 32, 4, 5632, 2048, 10000.0f, 1e-5f}},
};

/* ==== Random numbers ===================================================== */

typedef struct {
    uint64_t s[4];
} rng;

static uint64_t splitmix(uint64_t *x) {
    uint64_t z = (*x += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static void rng_seed(rng *r, uint64_t seed, const char *name) {
    uint64_t h = 1469598103934665603ULL; /* FNV-1a of the tensor name */
    for (const char *p = name; *p; p++) h = (h ^ (unsigned char)*p) * 1099511628211ULL;
    uint64_t x = seed ^ h;
    for (int i = 0; i < 4; i++) r->s[i] = splitmix(&x);
}

static inline uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

static inline uint64_t rng_next(rng *r) {
    uint64_t *s = r->s;
    uint64_t out = rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return out;
}

/* n values ~ N(0, sd), Box-Muller. */
static void rng_normal(rng *r, float *out, size_t n, float sd) {
    for (size_t i = 0; i < n; i += 2) {
        uint64_t v = rng_next(r);
        float u1 = ((float)(v >> 40) + 1.0f) * (1.0f / 16777217.0f); /* (0, 1] */
        float u2 = (float)((v >> 16) & 0xffffff) * (1.0f / 16777216.0f);
        float rad = sd * sqrtf(-2.0f * logf(u1));
        float a = 6.2831853f * u2;
        out[i] = rad * cosf(a);
        if (i + 1 < n) out[i + 1] = rad * sinf(a);
    }
}

/* ==== Conversions ======================================================== */

static uint32_t f_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

/* IEEE half, round to nearest even (finite inputs of any size). */
static uint16_t to_f16(float f) {
    uint32_t x = f_bits(f);
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000);
    uint32_t ax = x & 0x7fffffff;
    if (ax >= 0x7f800000) return sign | 0x7c00 | (ax > 0x7f800000 ? 0x200 : 0);
    if (ax >= 0x477ff000) return sign | 0x7c00; /* rounds to >= 65520: inf */
    if (ax < 0x38800000) {                      /* below the smallest normal half */
        if (ax < 0x33000000) return sign;       /* rounds to 0 */
        uint32_t m = (ax & 0x7fffff) | 0x800000;
        int shift = 126 - (int)(ax >> 23); /* 14..24: the value is q * 2^-24 */
        uint32_t q = m >> shift, rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
        if (rem > half || (rem == half && (q & 1))) q++;
        return sign | (uint16_t)q;
    }
    uint32_t e = (ax >> 23) - 112, m = ax & 0x7fffff;
    uint32_t h = (e << 10) | (m >> 13), rem = m & 0x1fff;
    if (rem > 0x1000 || (rem == 0x1000 && (h & 1))) h++;
    return sign | (uint16_t)h;
}

static uint16_t to_bf16(float f) {
    uint32_t x = f_bits(f);
    return (uint16_t)((x + 0x7fff + ((x >> 16) & 1)) >> 16);
}

static size_t type_row_bytes(int type, size_t n) {
    switch (type) {
    case T_F32: return n * 4;
    case T_F16:
    case T_BF16: return n * 2;
    case T_Q8_0: return n / 32 * 34;
    }
    return 0;
}

/* Converts n floats (n % 32 == 0 for Q8_0) to type; returns bytes written. */
static size_t convert(int type, const float *x, size_t n, unsigned char *out) {
    switch (type) {
    case T_F32: memcpy(out, x, n * 4); return n * 4;
    case T_F16:
        for (size_t i = 0; i < n; i++) {
            uint16_t h = to_f16(x[i]);
            memcpy(out + 2 * i, &h, 2);
        }
        return n * 2;
    case T_BF16:
        for (size_t i = 0; i < n; i++) {
            uint16_t h = to_bf16(x[i]);
            memcpy(out + 2 * i, &h, 2);
        }
        return n * 2;
    case T_Q8_0:
        for (size_t b = 0; b < n / 32; b++) {
            const float *v = x + 32 * b;
            unsigned char *blk = out + 34 * b;
            float amax = 0;
            for (int j = 0; j < 32; j++) amax = fmaxf(amax, fabsf(v[j]));
            float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
            uint16_t dh = to_f16(d);
            memcpy(blk, &dh, 2);
            for (int j = 0; j < 32; j++) blk[2 + j] = (unsigned char)(int8_t)roundf(v[j] * id);
        }
        return n / 32 * 34;
    }
    return 0;
}

/* ==== GGUF writing ====================================================== */

typedef struct {
    unsigned char *p;
    size_t len, cap;
} buf;

static void put(buf *b, const void *d, size_t n) {
    if (b->len + n > b->cap) {
        size_t c = b->cap ? b->cap * 2 : 1 << 16;
        while (c < b->len + n) c *= 2;
        unsigned char *q = realloc(b->p, c);
        if (!q) {
            fprintf(stderr, "gen_model: out of memory\n");
            exit(1);
        }
        b->p = q;
        b->cap = c;
    }
    memcpy(b->p + b->len, d, n);
    b->len += n;
}
static void put_u32(buf *b, uint32_t v) { put(b, &v, 4); }
static void put_u64(buf *b, uint64_t v) { put(b, &v, 8); }
static void put_str(buf *b, const char *s) {
    put_u64(b, strlen(s));
    put(b, s, strlen(s));
}
static void kv_u32(buf *b, const char *k, uint32_t v) {
    put_str(b, k);
    put_u32(b, V_UINT32);
    put_u32(b, v);
}
static void kv_f32(buf *b, const char *k, float v) {
    put_str(b, k);
    put_u32(b, V_FLOAT32);
    put(b, &v, 4);
}
static void kv_str(buf *b, const char *k, const char *v) {
    put_str(b, k);
    put_u32(b, V_STRING);
    put_str(b, v);
}

/* ---- Reading the donor's tokenizer.* keys, copied raw ------------------- */

typedef struct {
    const unsigned char *p, *end;
    bool bad;
} rd;

static bool need(rd *r, uint64_t n) {
    if (r->bad || (uint64_t)(r->end - r->p) < n) return !(r->bad = true);
    return true;
}
static uint64_t rd_u64(rd *r) {
    uint64_t v = 0;
    if (need(r, 8)) memcpy(&v, r->p, 8), r->p += 8;
    return v;
}
static uint32_t rd_u32(rd *r) {
    uint32_t v = 0;
    if (need(r, 4)) memcpy(&v, r->p, 4), r->p += 4;
    return v;
}
static void rd_skip(rd *r, uint64_t n) {
    if (need(r, n)) r->p += n;
}

static const uint64_t scalar_size[13] = {1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8};

static void skip_value(rd *r, uint32_t type, int depth) {
    if (type == V_STRING) {
        rd_skip(r, rd_u64(r));
    } else if (type == V_ARRAY) {
        uint32_t et = rd_u32(r);
        uint64_t n = rd_u64(r);
        if (depth > 2 || et > 12) {
            r->bad = true;
            return;
        }
        if (et == V_STRING || et == V_ARRAY) {
            for (uint64_t i = 0; i < n && !r->bad; i++) skip_value(r, et, depth + 1);
        } else if (n > UINT64_MAX / 8) {
            r->bad = true;
        } else {
            rd_skip(r, n * scalar_size[et]);
        }
    } else if (type <= 12) {
        rd_skip(r, scalar_size[type]);
    } else {
        r->bad = true;
    }
}

/* Appends every tokenizer.* key/value of the donor to out; returns the count
 * and the vocabulary size (length of tokenizer.ggml.tokens). */
static int copy_tokenizer(const char *path, buf *out, int *n_vocab) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "gen_model: cannot open tokenizer donor %s: %s\n", path, strerror(errno));
        return -1;
    }
    /* The metadata sits at the front; 8 MiB covers any tokenizer we copy. */
    size_t cap = 8u << 20;
    unsigned char *data = malloc(cap);
    size_t n = data ? fread(data, 1, cap, f) : 0;
    fclose(f);
    rd r = {data, data + n, false};
    int count = -1;
    if (!data || !need(&r, 24) || memcmp(data, "GGUF", 4) != 0) goto done;
    r.p += 4;
    if (rd_u32(&r) != 3) goto done;
    rd_u64(&r); /* tensors */
    uint64_t n_kv = rd_u64(&r);
    count = 0;
    *n_vocab = 0;
    for (uint64_t i = 0; i < n_kv && !r.bad; i++) {
        const unsigned char *start = r.p;
        uint64_t klen = rd_u64(&r);
        if (!need(&r, klen)) break;
        const char *key = (const char *)r.p;
        r.p += klen;
        uint32_t type = rd_u32(&r);
        const unsigned char *val = r.p;
        skip_value(&r, type, 0);
        if (r.bad) break;
        if (klen > 10 && memcmp(key, "tokenizer.", 10) == 0) {
            put(out, start, (size_t)(r.p - start));
            count++;
            if (klen == 21 && memcmp(key, "tokenizer.ggml.tokens", 21) == 0 && type == V_ARRAY) {
                uint64_t nt;
                memcpy(&nt, val + 4, 8);
                *n_vocab = (int)nt;
            }
        }
    }
    if (r.bad) count = -1;
done:
    if (count < 0) fprintf(stderr, "gen_model: %s is not a readable GGUF v3 file\n", path);
    free(data);
    return count;
}

/* ---- Tensors ------------------------------------------------------------ */

typedef struct {
    char name[64];
    uint64_t ne0, ne1; /* ne1 = 1 for vectors */
    int type;
    bool norm;
    uint64_t offset, nbytes;
} tensor;

static int add(tensor *t, int n, const char *name, uint64_t ne0, uint64_t ne1, int type, bool norm) {
    snprintf(t[n].name, sizeof t[n].name, "%s", name);
    t[n].ne0 = ne0;
    t[n].ne1 = ne1;
    t[n].type = norm ? T_F32 : type;
    t[n].norm = norm;
    t[n].nbytes = type_row_bytes(t[n].type, ne0) * ne1;
    return n + 1;
}

static void usage(FILE *f) {
    fprintf(f,
            "usage: gen_model [--preset sa-tiny-shape|1b] [--type f32|f16|bf16|q8_0] -o OUT.gguf [options]\n"
            "\n"
            "  --preset NAME        shape preset (default sa-tiny-shape)\n"
            "  --n-layer N --n-embd N --n-head N --n-head-kv N --n-ff N --n-ctx N   override the shape\n"
            "  --type T             weight type of the matrices (default q8_0); norms are f32\n"
            "  --seed S             weight seed (default 42)\n"
            "  --tokenizer FILE     GGUF to copy tokenizer.* keys from (default models/sa-tiny-sa-q8_0.gguf)\n"
            "  --name NAME          general.name (default: from preset and type)\n");
}

int main(int argc, char **argv) {
    shape s = presets[0].s;
    const char *preset = presets[0].name, *out_path = NULL, *tok_path = "models/sa-tiny-sa-q8_0.gguf";
    const char *type_name = "q8_0", *name = NULL;
    unsigned long long seed = 42;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            usage(stdout);
            return 0;
        }
        if (i + 1 >= argc) {
            fprintf(stderr, "gen_model: %s needs a value\n", a);
            return 2;
        }
        const char *v = argv[++i];
        int *field = !strcmp(a, "--n-layer")     ? &s.n_layer
                     : !strcmp(a, "--n-embd")    ? &s.n_embd
                     : !strcmp(a, "--n-head")    ? &s.n_head
                     : !strcmp(a, "--n-head-kv") ? &s.n_head_kv
                     : !strcmp(a, "--n-ff")      ? &s.n_ff
                     : !strcmp(a, "--n-ctx")     ? &s.n_ctx
                                                 : NULL;
        if (field) {
            char *end;
            long n = strtol(v, &end, 10);
            if (*end || n < 1 || n > (1 << 20)) {
                fprintf(stderr, "gen_model: %s must be a positive integer, got '%s'\n", a, v);
                return 2;
            }
            *field = (int)n;
        } else if (!strcmp(a, "--preset")) {
            size_t k = 0;
            while (k < sizeof presets / sizeof presets[0] && strcmp(presets[k].name, v)) k++;
            if (k == sizeof presets / sizeof presets[0]) {
                fprintf(stderr, "gen_model: unknown preset '%s' (sa-tiny-shape, 1b)\n", v);
                return 2;
            }
            s = presets[k].s;
            preset = presets[k].name;
        } else if (!strcmp(a, "--type")) {
            type_name = v;
        } else if (!strcmp(a, "--seed")) {
            seed = strtoull(v, NULL, 10);
        } else if (!strcmp(a, "--tokenizer")) {
            tok_path = v;
        } else if (!strcmp(a, "--name")) {
            name = v;
        } else if (!strcmp(a, "-o") || !strcmp(a, "--output")) {
            out_path = v;
        } else {
            fprintf(stderr, "gen_model: unknown option '%s'\n", a);
            usage(stderr);
            return 2;
        }
    }
    int type, file_type;
    if (!strcmp(type_name, "f32")) type = T_F32, file_type = 0;
    else if (!strcmp(type_name, "f16")) type = T_F16, file_type = 1;
    else if (!strcmp(type_name, "q8_0")) type = T_Q8_0, file_type = 7;
    else if (!strcmp(type_name, "bf16")) type = T_BF16, file_type = 32;
    else {
        fprintf(stderr, "gen_model: --type must be f32, f16, bf16 or q8_0, got '%s'\n", type_name);
        return 2;
    }
    if (!out_path) {
        fprintf(stderr, "gen_model: -o OUT.gguf is required\n");
        return 2;
    }
    if (s.n_embd % s.n_head || s.n_head % s.n_head_kv || (s.n_embd / s.n_head) % 2 ||
        (type == T_Q8_0 && (s.n_embd % 32 || s.n_ff % 32))) {
        fprintf(stderr, "gen_model: inconsistent shape (n_embd %% n_head, n_head %% n_head_kv, even head size, "
                        "and for q8_0 n_embd and n_ff multiples of 32)\n");
        return 2;
    }
    int head_dim = s.n_embd / s.n_head, kv_dim = s.n_head_kv * head_dim;

    buf kv = {0};
    int n_vocab = 0;
    int n_tok = copy_tokenizer(tok_path, &kv, &n_vocab);
    if (n_tok < 0) return 1;
    if (n_vocab < 4) {
        fprintf(stderr, "gen_model: %s has no tokenizer.ggml.tokens\n", tok_path);
        return 1;
    }
    char gname[128];
    snprintf(gname, sizeof gname, "%s", name ? name : "");
    if (!name) snprintf(gname, sizeof gname, "random-%s-%s", preset, type_name);
    buf hk = {0};
    kv_str(&hk, "general.architecture", "llama");
    kv_str(&hk, "general.name", gname);
    kv_u32(&hk, "general.file_type", (uint32_t)file_type);
    kv_u32(&hk, "general.quantization_version", 2);
    kv_u32(&hk, "general.alignment", ALIGN);
    kv_u32(&hk, "llama.block_count", (uint32_t)s.n_layer);
    kv_u32(&hk, "llama.context_length", (uint32_t)s.n_ctx);
    kv_u32(&hk, "llama.embedding_length", (uint32_t)s.n_embd);
    kv_u32(&hk, "llama.feed_forward_length", (uint32_t)s.n_ff);
    kv_u32(&hk, "llama.attention.head_count", (uint32_t)s.n_head);
    kv_u32(&hk, "llama.attention.head_count_kv", (uint32_t)s.n_head_kv);
    kv_f32(&hk, "llama.rope.freq_base", s.rope_base);
    kv_f32(&hk, "llama.attention.layer_norm_rms_epsilon", s.norm_eps);
    kv_u32(&hk, "llama.rope.dimension_count", (uint32_t)head_dim);
    kv_u32(&hk, "llama.vocab_size", (uint32_t)n_vocab);
    int n_kv = 15 + n_tok;

    int max_t = 3 + 9 * s.n_layer;
    tensor *ts = calloc((size_t)max_t, sizeof *ts);
    if (!ts) return 1;
    int nt = 0;
    char tn[64];
    nt = add(ts, nt, "token_embd.weight", (uint64_t)s.n_embd, (uint64_t)n_vocab, type, false);
    for (int l = 0; l < s.n_layer; l++) {
#define T(suffix, a, b, norm) (snprintf(tn, sizeof tn, "blk.%d." suffix, l), nt = add(ts, nt, tn, a, b, type, norm))
        T("attn_norm.weight", (uint64_t)s.n_embd, 1, true);
        T("attn_q.weight", (uint64_t)s.n_embd, (uint64_t)s.n_embd, false);
        T("attn_k.weight", (uint64_t)s.n_embd, (uint64_t)kv_dim, false);
        T("attn_v.weight", (uint64_t)s.n_embd, (uint64_t)kv_dim, false);
        T("attn_output.weight", (uint64_t)s.n_embd, (uint64_t)s.n_embd, false);
        T("ffn_norm.weight", (uint64_t)s.n_embd, 1, true);
        T("ffn_gate.weight", (uint64_t)s.n_embd, (uint64_t)s.n_ff, false);
        T("ffn_up.weight", (uint64_t)s.n_embd, (uint64_t)s.n_ff, false);
        T("ffn_down.weight", (uint64_t)s.n_ff, (uint64_t)s.n_embd, false);
#undef T
    }
    nt = add(ts, nt, "output_norm.weight", (uint64_t)s.n_embd, 1, type, true);
    nt = add(ts, nt, "output.weight", (uint64_t)s.n_embd, (uint64_t)n_vocab, type, false);

    buf h = {0};
    put(&h, "GGUF", 4);
    put_u32(&h, 3);
    put_u64(&h, (uint64_t)nt);
    put_u64(&h, (uint64_t)n_kv);
    put(&h, hk.p, hk.len);
    put(&h, kv.p, kv.len);
    uint64_t off = 0, n_params = 0;
    for (int i = 0; i < nt; i++) {
        ts[i].offset = off;
        off += (ts[i].nbytes + ALIGN - 1) / ALIGN * ALIGN;
        n_params += ts[i].ne0 * ts[i].ne1;
        put_str(&h, ts[i].name);
        put_u32(&h, ts[i].ne1 > 1 ? 2 : 1);
        put_u64(&h, ts[i].ne0);
        if (ts[i].ne1 > 1) put_u64(&h, ts[i].ne1);
        put_u32(&h, (uint32_t)ts[i].type);
        put_u64(&h, ts[i].offset);
    }
    static const unsigned char zeros[ALIGN];
    put(&h, zeros, (ALIGN - h.len % ALIGN) % ALIGN);

    char tmp_path[4096];
    snprintf(tmp_path, sizeof tmp_path, "%s.tmp", out_path);
    FILE *f = fopen(tmp_path, "wb");
    if (!f) {
        fprintf(stderr, "gen_model: cannot create %s: %s\n", tmp_path, strerror(errno));
        return 1;
    }
    bool ok = fwrite(h.p, 1, h.len, f) == h.len;
    size_t max_row = (size_t)(s.n_ff > s.n_embd ? s.n_ff : s.n_embd);
    size_t rows_per = 64;
    float *x = malloc(max_row * rows_per * sizeof *x);
    unsigned char *o = malloc(max_row * rows_per * 4);
    if (!x || !o) return 1;
    for (int i = 0; i < nt && ok; i++) {
        rng r;
        rng_seed(&r, seed, ts[i].name);
        uint64_t done = 0;
        while (done < ts[i].ne1 && ok) {
            size_t rows = ts[i].ne1 - done < rows_per ? (size_t)(ts[i].ne1 - done) : rows_per;
            size_t n = rows * ts[i].ne0;
            if (ts[i].norm) {
                for (size_t k = 0; k < n; k++) x[k] = 1.0f;
            } else {
                rng_normal(&r, x, n, 0.02f);
            }
            size_t nb = convert(ts[i].type, x, n, o);
            ok = fwrite(o, 1, nb, f) == nb;
            done += rows;
        }
        size_t pad = (ALIGN - ts[i].nbytes % ALIGN) % ALIGN;
        if (ok && pad) ok = fwrite(zeros, 1, pad, f) == pad;
    }
    if (fclose(f) != 0) ok = false;
    if (!ok || rename(tmp_path, out_path) != 0) {
        fprintf(stderr, "gen_model: writing %s failed: %s\n", out_path, strerror(errno));
        remove(tmp_path);
        return 1;
    }
    printf("gen_model: wrote %s: %s shape (%d layers, d %d, %d/%d heads, ff %d, ctx %d, vocab %d), %s, "
           "%.3fB parameters, %.1f MiB\n",
           out_path, preset, s.n_layer, s.n_embd, s.n_head, s.n_head_kv, s.n_ff, s.n_ctx, n_vocab, type_name,
           (double)n_params / 1e9, (double)(h.len + off) / (1 << 20));
    free(x);
    free(o);
    free(ts);
    free(h.p);
    free(hk.p);
    free(kv.p);
    return 0;
}
