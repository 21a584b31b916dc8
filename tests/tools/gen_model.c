/*
 * gen_model.c - writes Llama-shaped GGUF v3 files with random weights, for
 * benchmarks and tests: any size, F32, F16, BF16, Q8_0, Q4_0, Q4_K, Q5_K,
 * Q6_K or the Q4_K_M mix, loadable by saserve and by llama.cpp.
 *
 *   gen_model --preset 1b --type q8_0 -o build/bench/llama-1b-q8_0.gguf
 *   gen_model --preset 1b --type q4_k_m -o build/bench/llama-1b-q4_k_m.gguf
 *   gen_model --preset sa-tiny-shape --type f16 -o /tmp/t.gguf
 *   gen_model --preset llama3-test --type q4_k_m -o tests/fixtures/arch/llama3w-q4_k_m.gguf
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
 * writes them.  The 4-bit and K-quant types are written by the simple
 * quantisers below (per-block or per-sub-block min/max scales, rounded to
 * the nearest level), laid out as the GGUF format defines each block; they
 * make no attempt at llama.cpp's error-minimising scale search, which only
 * changes how close the file is to the float weights, not how it is read.
 * q4_k_m mixes them as llama.cpp's Q4_K_M does: Q6_K for the output matrix
 * (the token embedding when it is tied) and for attn_v and ffn_down of the
 * layers where llama.cpp spends more bits (the first and last eighth and
 * every third layer between), Q4_K elsewhere.
 *
 * The llama3-test preset is the Llama-3-style architecture of the
 * architecture tests made 256 wide (K-quant rows are multiples of 256):
 * Llama 3's RoPE frequency scaling as a rope_freqs.weight tensor (factor 8,
 * low/high frequency factors 1 and 4, original context 256, theta 500000),
 * tied embeddings (no output.weight), weights ~ N(0, (1.5/sqrt(n_in))^2) so
 * the logits have clear winners.
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

enum { T_F32 = 0, T_F16 = 1, T_Q4_0 = 2, T_Q8_0 = 8, T_Q4_K = 12, T_Q5_K = 13, T_Q6_K = 14, T_BF16 = 30 };
#define QK_K 256
enum { V_UINT32 = 4, V_FLOAT32 = 6, V_STRING = 8, V_ARRAY = 9 };

typedef struct {
    int n_layer, n_embd, n_head, n_head_kv, n_ff, n_ctx;
    float rope_base, norm_eps;
    bool llama3_rope, tied; /* rope_freqs.weight with Llama 3 scaling; no output.weight */
    float sd_scale;         /* > 0: weights ~ N(0, (sd_scale / sqrt(n_in))^2); 0: N(0, 0.02^2) */
} shape;

static const struct {
    const char *name;
    shape s;
} presets[] = {
    /* The bundled model's shape (12 layers, d 384, 6 heads / 2 KV, ff 1024). */
    {"sa-tiny-shape", {12, 384, 6, 2, 1024, 1024, 10000.0f, 1e-5f, false, false, 0}},
    /* TinyLlama-1.1B's shape; with the 8192-token vocabulary, 1.0B parameters. */
    {"1b", {22, 2048, 32, 4, 5632, 2048, 10000.0f, 1e-5f, false, false, 0}},
    /* The architecture tests' Llama-3-style model, 256 wide (see the top). */
    {"llama3-test", {4, 256, 4, 2, 768, 2048, 500000.0f, 1e-5f, true, true, 1.5f}},
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

/* Exact half -> float (the quantisers round with the stored scale). */
static float from_f16(uint16_t h) {
    uint32_t e = (h >> 10) & 31, m = h & 1023;
    float v = e == 0 ? ldexpf((float)m, -24) : e == 31 ? INFINITY : ldexpf((float)(m | 1024), (int)e - 25);
    return h & 0x8000 ? -v : v;
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
    case T_Q4_0: return n / 32 * 18;
    case T_Q4_K: return n / QK_K * 144;
    case T_Q5_K: return n / QK_K * 176;
    case T_Q6_K: return n / QK_K * 210;
    }
    return 0;
}

static int block_elems(int type) {
    return type == T_Q8_0 || type == T_Q4_0 ? 32 : type == T_Q4_K || type == T_Q5_K || type == T_Q6_K ? QK_K : 1;
}

static void put_f16(unsigned char *p, float f) {
    uint16_t h = to_f16(f);
    memcpy(p, &h, 2);
}

static int clampi(int v, int lo, int hi) { return v < lo ? lo : v > hi ? hi : v; }

/* Q4_0: 32 weights, d = (the value of largest magnitude) / -8 as f16, then
 * 16 bytes: weight i in the low nibble of byte i, weight i+16 in its high
 * nibble, each q = round(x / d) + 8 in 0..15. */
static void quant_q4_0(const float *x, unsigned char *blk) {
    float amax = 0, max = 0;
    for (int i = 0; i < 32; i++)
        if (fabsf(x[i]) > amax) amax = fabsf(x[i]), max = x[i];
    float d = max / -8.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
    put_f16(blk, d);
    for (int i = 0; i < 16; i++) {
        int a = clampi((int)lrintf(x[i] * id) + 8, 0, 15), b = clampi((int)lrintf(x[i + 16] * id) + 8, 0, 15);
        blk[2 + i] = (unsigned char)(a | (b << 4));
    }
}

/* Q4_K and Q5_K: 256 weights in 8 sub-blocks of 32, each x ~ d*sc*q - dmin*m
 * with 6-bit sc, m and q in 0..nq (15 or 31).  Layout: f16 d, f16 dmin, 12
 * bytes of scales (sc and m of sub-blocks 0-3 in the low 6 bits of bytes
 * 0-3 and 4-7; sub-blocks 4-7 as low nibbles in bytes 8-11 with their top
 * two bits in bits 6-7 of bytes 0-7), [Q5_K: 32 bytes of fifth bits, bit
 * 2k/2k+1 of byte i for weights 64k+i / 64k+32+i], then 128 bytes of low
 * nibbles, 64 weights per 32 bytes (first 32 low, next 32 high). */
static void quant_k45(int type, const float *x, unsigned char *blk) {
    int nq = type == T_Q5_K ? 31 : 15;
    float scale[8], minv[8], smax = 0, mmax = 0;
    for (int j = 0; j < 8; j++) {
        float lo = x[32 * j], hi = x[32 * j];
        for (int i = 1; i < 32; i++) lo = fminf(lo, x[32 * j + i]), hi = fmaxf(hi, x[32 * j + i]);
        if (lo > 0) lo = 0;
        scale[j] = (hi - lo) / (float)nq;
        minv[j] = -lo;
        smax = fmaxf(smax, scale[j]);
        mmax = fmaxf(mmax, minv[j]);
    }
    float d = smax / 63.0f, dmin = mmax / 63.0f;
    uint16_t dh = to_f16(d), mh = to_f16(dmin);
    memcpy(blk, &dh, 2);
    memcpy(blk + 2, &mh, 2);
    d = from_f16(dh);
    dmin = from_f16(mh);
    int sc[8], m[8];
    for (int j = 0; j < 8; j++) {
        sc[j] = d > 0 ? clampi((int)lrintf(scale[j] / d), 0, 63) : 0;
        m[j] = dmin > 0 ? clampi((int)lrintf(minv[j] / dmin), 0, 63) : 0;
    }
    unsigned char *s = blk + 4;
    memset(s, 0, 12);
    for (int j = 0; j < 4; j++) {
        s[j] = (unsigned char)(sc[j] | ((sc[j + 4] >> 4) << 6));
        s[j + 4] = (unsigned char)(m[j] | ((m[j + 4] >> 4) << 6));
        s[j + 8] = (unsigned char)((sc[j + 4] & 15) | ((m[j + 4] & 15) << 4));
    }
    unsigned char q[QK_K];
    for (int j = 0; j < 8; j++) {
        float step = d * (float)sc[j], off = dmin * (float)m[j];
        for (int i = 0; i < 32; i++)
            q[32 * j + i] = (unsigned char)(step > 0 ? clampi((int)lrintf((x[32 * j + i] + off) / step), 0, nq) : 0);
    }
    unsigned char *qs = blk + 16;
    if (type == T_Q5_K) {
        unsigned char *qh = blk + 16;
        qs = blk + 48;
        memset(qh, 0, 32);
        for (int k = 0; k < 4; k++)
            for (int i = 0; i < 32; i++) {
                qh[i] |= (unsigned char)(((q[64 * k + i] >> 4) & 1) << (2 * k));
                qh[i] |= (unsigned char)(((q[64 * k + 32 + i] >> 4) & 1) << (2 * k + 1));
            }
    }
    for (int k = 0; k < 4; k++)
        for (int i = 0; i < 32; i++)
            qs[32 * k + i] = (unsigned char)((q[64 * k + i] & 15) | ((q[64 * k + 32 + i] & 15) << 4));
}

/* Q6_K: 256 weights in 16 sub-blocks of 16, x ~ d*sc*(q - 32) with int8 sc
 * and q in 0..63.  Layout: 128 bytes of low nibbles, 64 bytes of high bit
 * pairs, 16 int8 scales, f16 d; per half of 128 weights, byte i of the low
 * nibbles holds weights i (low) and 64+i (high), byte 32+i weights 32+i and
 * 96+i, and high-bit byte i the top two bits of weights i, 32+i, 64+i, 96+i
 * in bits 0-1, 2-3, 4-5, 6-7. */
static void quant_q6_k(const float *x, unsigned char *blk) {
    float scale[16], smax = 0;
    for (int j = 0; j < 16; j++) {
        float amax = 0;
        for (int i = 0; i < 16; i++) amax = fmaxf(amax, fabsf(x[16 * j + i]));
        scale[j] = amax / 31.0f;
        smax = fmaxf(smax, scale[j]);
    }
    float d = smax / 127.0f;
    uint16_t dh = to_f16(d);
    d = from_f16(dh);
    unsigned char q[QK_K];
    signed char sc[16];
    for (int j = 0; j < 16; j++) {
        sc[j] = (signed char)(d > 0 ? clampi((int)lrintf(scale[j] / d), 0, 127) : 0);
        float step = d * (float)sc[j];
        for (int i = 0; i < 16; i++)
            q[16 * j + i] = (unsigned char)(step > 0 ? clampi((int)lrintf(x[16 * j + i] / step) + 32, 0, 63) : 32);
    }
    unsigned char *ql = blk, *qh = blk + 128;
    for (int h = 0; h < 2; h++) {
        const unsigned char *L = q + 128 * h;
        for (int i = 0; i < 32; i++) {
            ql[64 * h + i] = (unsigned char)((L[i] & 15) | ((L[64 + i] & 15) << 4));
            ql[64 * h + 32 + i] = (unsigned char)((L[32 + i] & 15) | ((L[96 + i] & 15) << 4));
            qh[32 * h + i] =
                (unsigned char)((L[i] >> 4) | ((L[32 + i] >> 4) << 2) | ((L[64 + i] >> 4) << 4) | ((L[96 + i] >> 4) << 6));
        }
    }
    memcpy(blk + 192, sc, 16);
    memcpy(blk + 208, &dh, 2);
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
    case T_Q4_0:
    case T_Q4_K:
    case T_Q5_K:
    case T_Q6_K: {
        size_t be = (size_t)block_elems(type), bb = type_row_bytes(type, be);
        for (size_t b = 0; b < n / be; b++) {
            if (type == T_Q4_0) quant_q4_0(x + be * b, out + bb * b);
            else if (type == T_Q6_K) quant_q6_k(x + be * b, out + bb * b);
            else quant_k45(type, x + be * b, out + bb * b);
        }
        return n / be * bb;
    }
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

/* A type whose blocks do not tile a row of ne0 falls back as llama.cpp's
 * quantiser falls back (to types saserve reads): 4/5-bit K-quants to Q4_0,
 * Q6_K to Q8_0, anything else to F16. */
static int fit_type(int type, uint64_t ne0) {
    if (ne0 % (uint64_t)block_elems(type) == 0) return type;
    if (ne0 % 32 == 0) return type == T_Q6_K ? T_Q8_0 : T_Q4_0;
    return T_F16;
}

static int add(tensor *t, int n, const char *name, uint64_t ne0, uint64_t ne1, int type, bool norm) {
    snprintf(t[n].name, sizeof t[n].name, "%s", name);
    t[n].ne0 = ne0;
    t[n].ne1 = ne1;
    t[n].type = norm ? T_F32 : fit_type(type, ne0);
    t[n].norm = norm;
    t[n].nbytes = type_row_bytes(t[n].type, ne0) * ne1;
    return n + 1;
}

/* ---- Weights from another GGUF (--weights) ------------------------------ */

typedef struct {
    const unsigned char *name;
    uint64_t name_len, ne0, ne1, offset;
    uint32_t type;
} src_tensor;

typedef struct {
    unsigned char *data;
    size_t len, base;
    src_tensor *t;
    uint64_t n;
} source;

/* Reads a whole GGUF v3 file and its tensor table; every size and offset is
 * checked against the file. */
static bool source_open(const char *path, source *src) {
    memset(src, 0, sizeof *src);
    FILE *f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "gen_model: cannot open %s: %s\n", path, strerror(errno));
        return false;
    }
    bool ok = fseek(f, 0, SEEK_END) == 0;
    long size = ok ? ftell(f) : -1;
    ok = ok && size > 24 && fseek(f, 0, SEEK_SET) == 0;
    src->data = ok ? malloc((size_t)size) : NULL;
    ok = src->data && fread(src->data, 1, (size_t)size, f) == (size_t)size;
    fclose(f);
    if (!ok) {
        fprintf(stderr, "gen_model: cannot read %s\n", path);
        return false;
    }
    src->len = (size_t)size;
    rd r = {src->data, src->data + src->len, false};
    r.p += 4;
    if (memcmp(src->data, "GGUF", 4) != 0 || rd_u32(&r) != 3) goto bad;
    src->n = rd_u64(&r);
    uint64_t n_kv = rd_u64(&r), align = 32;
    if (src->n > src->len / 24) goto bad;
    for (uint64_t i = 0; i < n_kv && !r.bad; i++) {
        uint64_t klen = rd_u64(&r);
        if (!need(&r, klen)) break;
        bool is_align = klen == 17 && memcmp(r.p, "general.alignment", 17) == 0;
        r.p += klen;
        uint32_t type = rd_u32(&r);
        if (is_align && type == V_UINT32 && need(&r, 4)) {
            uint32_t a;
            memcpy(&a, r.p, 4);
            if (a == 0 || (a & (a - 1))) goto bad;
            align = a;
        }
        skip_value(&r, type, 0);
    }
    src->t = calloc(src->n ? src->n : 1, sizeof *src->t);
    if (!src->t) goto bad;
    for (uint64_t i = 0; i < src->n && !r.bad; i++) {
        src_tensor *t = &src->t[i];
        t->name_len = rd_u64(&r);
        if (!need(&r, t->name_len)) break;
        t->name = r.p;
        r.p += t->name_len;
        uint32_t nd = rd_u32(&r);
        if (nd < 1 || nd > 4) goto bad;
        t->ne1 = 1;
        for (uint32_t k = 0; k < nd; k++) {
            uint64_t ne = rd_u64(&r);
            if (k == 0) t->ne0 = ne;
            else t->ne1 *= ne;
        }
        t->type = rd_u32(&r);
        t->offset = rd_u64(&r);
    }
    if (r.bad) goto bad;
    src->base = ((size_t)(r.p - src->data) + align - 1) / align * align;
    for (uint64_t i = 0; i < src->n; i++) {
        src_tensor *t = &src->t[i];
        size_t rb = t->type == T_F32 ? 4 : t->type == T_F16 || t->type == T_BF16 ? 2 : t->type == T_Q8_0 ? 0 : SIZE_MAX;
        if (rb == SIZE_MAX || (t->type == T_Q8_0 && t->ne0 % 32) || t->ne0 == 0 || t->ne0 > (1u << 24) ||
            t->ne1 > (1u << 24))
            continue; /* not usable as a source; refused if asked for */
        uint64_t bytes = t->type == T_Q8_0 ? t->ne0 / 32 * 34 * t->ne1 : t->ne0 * rb * t->ne1;
        if (src->base > src->len || t->offset > src->len - src->base || bytes > src->len - src->base - t->offset) goto bad;
    }
    return true;
bad:
    fprintf(stderr, "gen_model: %s is not a readable GGUF v3 file\n", path);
    return false;
}

/* Row r of the source tensor called name (ne0 x ne1 of F32, F16, BF16 or
 * Q8_0) as floats; false when it is missing or shaped otherwise. */
static const src_tensor *source_find(const source *src, const char *name, uint64_t ne0, uint64_t ne1) {
    for (uint64_t i = 0; i < src->n; i++) {
        const src_tensor *t = &src->t[i];
        if (t->name_len == strlen(name) && !memcmp(t->name, name, t->name_len))
            return t->ne0 == ne0 && t->ne1 == ne1 &&
                           (t->type == T_F32 || t->type == T_F16 || t->type == T_BF16 || t->type == T_Q8_0)
                       ? t
                       : NULL;
    }
    return NULL;
}

static void source_rows(const source *src, const src_tensor *t, uint64_t row, size_t rows, float *x) {
    const unsigned char *p = src->data + src->base + t->offset;
    size_t n = (size_t)t->ne0;
    for (size_t r = 0; r < rows; r++) {
        float *y = x + r * n;
        uint64_t rr = row + r;
        if (t->type == T_F32) {
            memcpy(y, p + rr * n * 4, n * 4);
        } else if (t->type == T_Q8_0) {
            const unsigned char *b = p + rr * (n / 32 * 34);
            for (size_t k = 0; k < n / 32; k++, b += 34) {
                uint16_t h;
                memcpy(&h, b, 2);
                float d = from_f16(h);
                for (int j = 0; j < 32; j++) y[32 * k + (size_t)j] = d * (float)(int8_t)b[2 + j];
            }
        } else {
            for (size_t k = 0; k < n; k++) {
                uint16_t h;
                memcpy(&h, p + (rr * n + k) * 2, 2);
                if (t->type == T_F16) {
                    y[k] = from_f16(h);
                } else {
                    uint32_t u = (uint32_t)h << 16;
                    memcpy(&y[k], &u, 4);
                }
            }
        }
    }
}

/* Llama 3's RoPE scaling as per-pair divisors of the frequencies (the
 * rope_freqs.weight convention): pairs whose wavelength is longer than the
 * original context / low_freq_factor are slowed by factor, those shorter
 * than original / high_freq_factor are kept, and the band between is
 * interpolated.  factor 8, low 1, high 4, original context 256. */
static void llama3_rope_factors(float *out, int n_pairs, float theta) {
    const double factor = 8.0, low = 1.0, high = 4.0, orig = 256.0;
    const double low_wl = orig / low, high_wl = orig / high;
    for (int i = 0; i < n_pairs; i++) {
        double freq = 1.0 / pow(theta, 2.0 * i / (2.0 * n_pairs)), wl = 2.0 * M_PI / freq;
        if (wl < high_wl) out[i] = 1.0f;
        else if (wl > low_wl) out[i] = (float)factor;
        else {
            double smooth = (orig / wl - low) / (high - low);
            out[i] = (float)(1.0 / ((1.0 - smooth) / factor + smooth));
        }
    }
}

static void usage(FILE *f) {
    fprintf(f,
            "usage: gen_model [--preset sa-tiny-shape|1b|llama3-test] [--type TYPE] -o OUT.gguf [options]\n"
            "\n"
            "  --preset NAME        shape preset (default sa-tiny-shape)\n"
            "  --n-layer N --n-embd N --n-head N --n-head-kv N --n-ff N --n-ctx N   override the shape\n"
            "  --type T             weight type of the matrices: f32, f16, bf16, q8_0 (default), q4_0, q4_k,\n"
            "                       q5_k, q6_k or q4_k_m (Q4_K with Q6_K where llama.cpp's Q4_K_M puts it);\n"
            "                       norms are f32\n"
            "  --seed S             weight seed (default 42)\n"
            "  --tokenizer FILE     GGUF to copy tokenizer.* keys from (default models/sa-tiny-sa-q8_0.gguf)\n"
            "  --name NAME          general.name (default: from preset and type)\n"
            "  --weights FILE       take the weights from FILE (a GGUF of the same shape with F32, F16,\n"
            "                       BF16 or Q8_0 tensors of the same names) instead of random ones\n"
            "  --sd-scale X         random weights ~ N(0, (X / sqrt(n_in))^2) instead of N(0, 0.02^2)\n"
            "  --untied 0|1         1: write output.weight even where the preset ties it\n"
            "Rows that a type's blocks do not tile fall back: Q4_K/Q5_K to Q4_0, Q6_K to Q8_0, else F16.\n");
}

int main(int argc, char **argv) {
    shape s = presets[0].s;
    const char *preset = presets[0].name, *out_path = NULL, *tok_path = "models/sa-tiny-sa-q8_0.gguf";
    const char *type_name = "q8_0", *name = NULL, *weights_path = NULL;
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
                fprintf(stderr, "gen_model: unknown preset '%s' (sa-tiny-shape, 1b, llama3-test)\n", v);
                return 2;
            }
            s = presets[k].s;
            preset = presets[k].name;
        } else if (!strcmp(a, "--sd-scale")) {
            s.sd_scale = strtof(v, NULL);
        } else if (!strcmp(a, "--untied")) {
            s.tied = !strcmp(v, "0");
        } else if (!strcmp(a, "--weights")) {
            weights_path = v;
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
    static const struct {
        const char *name;
        int type, file_type;
    } types[] = {{"f32", T_F32, 0},   {"f16", T_F16, 1},    {"q4_0", T_Q4_0, 2},  {"q8_0", T_Q8_0, 7},
                 {"q4_k", T_Q4_K, 14}, {"q5_k", T_Q5_K, 16}, {"q6_k", T_Q6_K, 18}, {"bf16", T_BF16, 32},
                 {"q4_k_m", T_Q4_K, 15}};
    int type = -1, file_type = 0;
    bool mix_k_m = !strcmp(type_name, "q4_k_m");
    for (size_t k = 0; k < sizeof types / sizeof types[0]; k++)
        if (!strcmp(type_name, types[k].name)) type = types[k].type, file_type = types[k].file_type;
    if (type < 0) {
        fprintf(stderr, "gen_model: --type must be f32, f16, bf16, q8_0, q4_0, q4_k, q5_k, q6_k or q4_k_m, got '%s'\n",
                type_name);
        return 2;
    }
    if (!out_path) {
        fprintf(stderr, "gen_model: -o OUT.gguf is required\n");
        return 2;
    }
    if (s.n_embd % s.n_head || s.n_head % s.n_head_kv || (s.n_embd / s.n_head) % 2) {
        fprintf(stderr, "gen_model: inconsistent shape (n_embd %% n_head, n_head %% n_head_kv, even head size)\n");
        return 2;
    }
    source src = {0};
    if (weights_path && !source_open(weights_path, &src)) return 1;
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

    int max_t = 4 + 9 * s.n_layer;
    tensor *ts = calloc((size_t)max_t, sizeof *ts);
    if (!ts) return 1;
    int nt = 0;
    char tn[64];
    /* Q4_K_M: the output matrix (the embedding when tied) and the "more
     * bits" layers' attn_v and ffn_down are Q6_K. */
    int t_out = mix_k_m ? T_Q6_K : type;
    nt = add(ts, nt, "token_embd.weight", (uint64_t)s.n_embd, (uint64_t)n_vocab, s.tied ? t_out : type, false);
    if (s.llama3_rope) nt = add(ts, nt, "rope_freqs.weight", (uint64_t)head_dim / 2, 1, T_F32, true);
    for (int l = 0; l < s.n_layer; l++) {
        int n = s.n_layer;
        bool more_bits = l < n / 8 || l >= 7 * n / 8 || (l - n / 8) % 3 == 2;
        int t_vd = mix_k_m && more_bits ? T_Q6_K : type;
#define T(suffix, a, b, ty, norm) (snprintf(tn, sizeof tn, "blk.%d." suffix, l), nt = add(ts, nt, tn, a, b, ty, norm))
        T("attn_norm.weight", (uint64_t)s.n_embd, 1, type, true);
        T("attn_q.weight", (uint64_t)s.n_embd, (uint64_t)s.n_embd, type, false);
        T("attn_k.weight", (uint64_t)s.n_embd, (uint64_t)kv_dim, type, false);
        T("attn_v.weight", (uint64_t)s.n_embd, (uint64_t)kv_dim, t_vd, false);
        T("attn_output.weight", (uint64_t)s.n_embd, (uint64_t)s.n_embd, type, false);
        T("ffn_norm.weight", (uint64_t)s.n_embd, 1, type, true);
        T("ffn_gate.weight", (uint64_t)s.n_embd, (uint64_t)s.n_ff, type, false);
        T("ffn_up.weight", (uint64_t)s.n_embd, (uint64_t)s.n_ff, type, false);
        T("ffn_down.weight", (uint64_t)s.n_ff, (uint64_t)s.n_embd, t_vd, false);
#undef T
    }
    nt = add(ts, nt, "output_norm.weight", (uint64_t)s.n_embd, 1, type, true);
    if (!s.tied) nt = add(ts, nt, "output.weight", (uint64_t)s.n_embd, (uint64_t)n_vocab, t_out, false);

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
            if (weights_path) {
                const src_tensor *st = source_find(&src, ts[i].name, ts[i].ne0, ts[i].ne1);
                if (!st) {
                    fprintf(stderr, "gen_model: %s has no usable %s of %llu x %llu (F32, F16, BF16 or Q8_0)\n",
                            weights_path, ts[i].name, (unsigned long long)ts[i].ne0, (unsigned long long)ts[i].ne1);
                    ok = false;
                    break;
                }
                source_rows(&src, st, done, rows, x);
            } else if (!strcmp(ts[i].name, "rope_freqs.weight")) {
                llama3_rope_factors(x, (int)ts[i].ne0, s.rope_base);
            } else if (ts[i].norm) {
                for (size_t k = 0; k < n; k++) x[k] = 1.0f;
            } else {
                rng_normal(&r, x, n, s.sd_scale > 0 ? s.sd_scale / sqrtf((float)ts[i].ne0) : 0.02f);
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
    free(src.data);
    free(src.t);
    free(h.p);
    free(hk.p);
    free(kv.p);
    return 0;
}
