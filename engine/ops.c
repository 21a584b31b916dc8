/*
 * ops.c - numeric kernels; see ops.h.
 *
 * The SIMD variants are compiled with target attributes rather than -m
 * flags, so the rest of the binary stays baseline x86-64 and ops_init()
 * chooses at run time.
 */
#include "ops.h"

#include <immintrin.h>
#include <math.h>
#include <string.h>

#include "cpu.h"
#include "gguf.h"

ops_table ops;

/* ==== Scalar conversions =============================================== */

float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f;
    uint32_t man = h & 0x3ff;
    uint32_t bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else { /* subnormal: normalise */
            int e = -1;
            do {
                e++;
                man <<= 1;
            } while (!(man & 0x400));
            bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3ff) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (man << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

uint16_t f32_to_f16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000;
    uint32_t absx = x & 0x7fffffff;
    if (absx >= 0x7f800000) /* inf or nan */
        return (uint16_t)(sign | 0x7c00 | (absx > 0x7f800000 ? 0x200 : 0));
    if (absx >= 0x477ff000) return (uint16_t)(sign | 0x7c00); /* rounds to inf */
    if (absx < 0x38800000) { /* subnormal or zero in f16 */
        if (absx < 0x33000000) return (uint16_t)sign;
        uint32_t man = (absx & 0x7fffff) | 0x800000;
        int shift = 126 - (int)(absx >> 23); /* 14..24 */
        uint32_t r = man >> shift;
        uint32_t rem = man & ((1u << shift) - 1);
        uint32_t half = 1u << (shift - 1);
        if (rem > half || (rem == half && (r & 1))) r++;
        return (uint16_t)(sign | r);
    }
    uint32_t r = ((absx >> 13) - ((127 - 15) << 10));
    uint32_t rem = absx & 0x1fff;
    if (rem > 0x1000 || (rem == 0x1000 && (r & 1))) r++;
    return (uint16_t)(sign | r);
}

float bf16_to_f32(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* ==== Scalar kernels (reference) ======================================= */

static void dequant_row_scalar(uint32_t type, const void *row, float *dst, int n) {
    switch (type) {
    case GGML_F32:
        memcpy(dst, row, (size_t)n * 4);
        break;
    case GGML_F16: {
        const uint16_t *h = row;
        for (int i = 0; i < n; i++) dst[i] = f16_to_f32(h[i]);
        break;
    }
    case GGML_BF16: {
        const uint16_t *h = row;
        for (int i = 0; i < n; i++) dst[i] = bf16_to_f32(h[i]);
        break;
    }
    case GGML_Q8_0: {
        const block_q8_0 *b = row;
        for (int i = 0; i < n / QK8_0; i++) {
            float d = f16_to_f32(b[i].d);
            for (int j = 0; j < QK8_0; j++) dst[i * QK8_0 + j] = d * (float)b[i].qs[j];
        }
        break;
    }
    case GGML_Q4_0:
    case GGML_Q4_K:
    case GGML_Q5_K:
    case GGML_Q6_K:
        dequant_kq(type, row, dst, n);
        break;
    }
}

static float dot_f32_scalar(const float *a, const float *b, int n) {
    float s = 0;
    for (int i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

static void gemm_scalar(uint32_t type, const void *w, size_t rb, int rows, const float *x, size_t ldx, int T,
                        float *y, size_t ldy, int n) {
    if (type == GGML_Q8_0) {
        gemm_q8_0(w, rb, rows, x, ldx, T, y, ldy, n);
        return;
    }
    if (ops_kq_type(type)) {
        gemm_kq(type, w, rb, rows, x, ldx, T, y, ldy, n);
        return;
    }
    float tmp[n];
    for (int r = 0; r < rows; r++) {
        dequant_row_scalar(type, (const uint8_t *)w + (size_t)r * rb, tmp, n);
        for (int t = 0; t < T; t++) y[(size_t)t * ldy + r] = dot_f32_scalar(tmp, x + (size_t)t * ldx, n);
    }
}

static float dot_f32_f16_scalar(const float *a, const uint16_t *b, int n) {
    float s = 0;
    for (int i = 0; i < n; i++) s += a[i] * f16_to_f32(b[i]);
    return s;
}

static void axpy_f32_scalar(float *y, float a, const float *x, int n) {
    for (int i = 0; i < n; i++) y[i] += a * x[i];
}

static void axpy_f16_scalar(float *y, float a, const uint16_t *x, int n) {
    for (int i = 0; i < n; i++) y[i] += a * f16_to_f32(x[i]);
}

/* Attention over m cached positions for nq query heads that read the same
 * KV head (a GQA group): each K/V element is converted once for all nq. */
static void kv_dots_scalar(const float *q, int nq, const void *k, size_t step, int m, int hd, bool f16, float scale,
                           float *out, size_t ostride) {
    for (int j = 0; j < nq; j++)
        for (int i = 0; i < m; i++)
            out[(size_t)j * ostride + (size_t)i] =
                (f16 ? dot_f32_f16_scalar(q + (size_t)j * (size_t)hd, (const uint16_t *)k + (size_t)i * step, hd)
                     : dot_f32_scalar(q + (size_t)j * (size_t)hd, (const float *)k + (size_t)i * step, hd)) * scale;
}

static void kv_accum_scalar(float *out, int nq, const float *p, size_t pstride, const void *v, size_t step, int m,
                            int hd, bool f16) {
    for (int j = 0; j < nq; j++)
        for (int i = 0; i < m; i++) {
            float pi = p[(size_t)j * pstride + (size_t)i];
            float *o = out + (size_t)j * (size_t)hd;
            if (f16) axpy_f16_scalar(o, pi, (const uint16_t *)v + (size_t)i * step, hd);
            else axpy_f32_scalar(o, pi, (const float *)v + (size_t)i * step, hd);
        }
}

static void f32_to_f16_row_scalar(uint16_t *dst, const float *src, int n) {
    for (int i = 0; i < n; i++) dst[i] = f32_to_f16(src[i]);
}

/* ==== AVX2 ============================================================= */

#define AVX2_ATTR __attribute__((target("avx2,fma,f16c")))

AVX2_ATTR static inline float hsum256(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
    return _mm_cvtss_f32(lo);
}

/* Loads 8 weights of the given type starting at element k as float32. */
AVX2_ATTR static inline __m256 load8_avx2(uint32_t type, const void *row, int k) {
    switch (type) {
    case GGML_F16:
        return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)row + k)));
    case GGML_BF16: {
        __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)row + k)));
        return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
    }
    case GGML_Q8_0: {
        const block_q8_0 *b = (const block_q8_0 *)row + k / QK8_0;
        __m128i q = _mm_loadl_epi64((const __m128i *)(b->qs + k % QK8_0));
        __m256 f = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
        return _mm256_mul_ps(f, _mm256_set1_ps(_cvtsh_ss(b->d))); /* F16C: no call out of AVX code */
    }
    default:
        return _mm256_loadu_ps((const float *)row + k);
    }
}

AVX2_ATTR static void dequant_row_avx2(uint32_t type, const void *row, float *dst, int n) {
    if (ops_kq_type(type)) {
        dequant_kq(type, row, dst, n);
        return;
    }
    int k = 0;
    for (; k + 8 <= n; k += 8) _mm256_storeu_ps(dst + k, load8_avx2(type, row, k));
    if (k < n) {
        float tmp[QK8_0];
        /* Only F32/F16/BF16 can have a tail (Q8_0 rows are whole blocks). */
        for (; k < n; k++) {
            dequant_row_scalar(type, (const char *)row + (size_t)k * (type == GGML_F32 ? 4 : 2), tmp, 1);
            dst[k] = tmp[0];
        }
    }
}

/* One accumulator per (row, token) element, k ascending: every tile shape
 * below gives an element bit-identical results, so a token's result does not
 * depend on what else is in the batch. */
#define GEMM_TILE_AVX2(NAME, RB, TB)                                                                     \
    AVX2_ATTR static inline void NAME(uint32_t type, const uint8_t *w, size_t rb, const float *x, size_t ldx, \
                                      float *y, size_t ldy, int n) {                                     \
        __m256 acc[RB][TB];                                                                              \
        _Pragma("GCC unroll 16") for (int i = 0; i < RB; i++)                                            \
            _Pragma("GCC unroll 16") for (int t = 0; t < TB; t++) acc[i][t] = _mm256_setzero_ps();       \
        for (int k = 0; k < n; k += 8) {                                                                 \
            __m256 xv[TB];                                                                               \
            _Pragma("GCC unroll 16") for (int t = 0; t < TB; t++) xv[t] = _mm256_loadu_ps(x + (size_t)t * ldx + k); \
            _Pragma("GCC unroll 16") for (int i = 0; i < RB; i++) {                                      \
                __m256 wv = load8_avx2(type, w + (size_t)i * rb, k);                                     \
                _Pragma("GCC unroll 16") for (int t = 0; t < TB; t++) acc[i][t] = _mm256_fmadd_ps(wv, xv[t], acc[i][t]); \
            }                                                                                            \
        }                                                                                                \
        _Pragma("GCC unroll 16") for (int i = 0; i < RB; i++)                                            \
            _Pragma("GCC unroll 16") for (int t = 0; t < TB; t++) y[(size_t)t * ldy + i] = hsum256(acc[i][t]); \
    }

GEMM_TILE_AVX2(tile_avx2_2x4, 2, 4)
GEMM_TILE_AVX2(tile_avx2_4x1, 4, 1)
GEMM_TILE_AVX2(tile_avx2_1x4, 1, 4)
GEMM_TILE_AVX2(tile_avx2_1x1, 1, 1)

static void gemm_scalar(uint32_t type, const void *w, size_t rb, int rows, const float *x, size_t ldx, int T,
                        float *y, size_t ldy, int n);

AVX2_ATTR static void gemm_avx2(uint32_t type, const void *w, size_t rb, int rows, const float *x, size_t ldx,
                                int T, float *y, size_t ldy, int n) {
    if (type == GGML_Q8_0) {
        gemm_q8_0(w, rb, rows, x, ldx, T, y, ldy, n);
        return;
    }
    if (ops_kq_type(type)) {
        gemm_kq(type, w, rb, rows, x, ldx, T, y, ldy, n);
        return;
    }
    if (n % 8) {
        gemm_scalar(type, w, rb, rows, x, ldx, T, y, ldy, n);
        return;
    }
    const uint8_t *W = w;
    int t = 0;
    for (; t + 4 <= T; t += 4) {
        int r = 0;
        for (; r + 2 <= rows; r += 2)
            tile_avx2_2x4(type, W + (size_t)r * rb, rb, x + (size_t)t * ldx, ldx, y + (size_t)t * ldy + r, ldy, n);
        for (; r < rows; r++)
            tile_avx2_1x4(type, W + (size_t)r * rb, rb, x + (size_t)t * ldx, ldx, y + (size_t)t * ldy + r, ldy, n);
    }
    for (; t < T; t++) {
        int r = 0;
        for (; r + 4 <= rows; r += 4)
            tile_avx2_4x1(type, W + (size_t)r * rb, rb, x + (size_t)t * ldx, ldx, y + (size_t)t * ldy + r, ldy, n);
        for (; r < rows; r++)
            tile_avx2_1x1(type, W + (size_t)r * rb, rb, x + (size_t)t * ldx, ldx, y + (size_t)t * ldy + r, ldy, n);
    }
}





AVX2_ATTR static void f32_to_f16_row_avx2(uint16_t *dst, const float *src, int n) {
    int k = 0;
    for (; k + 8 <= n; k += 8)
        _mm_storeu_si128((__m128i *)(dst + k), _mm256_cvtps_ph(_mm256_loadu_ps(src + k), _MM_FROUND_TO_NEAREST_INT));
    for (; k < n; k++) dst[k] = f32_to_f16(src[k]);
}


AVX2_ATTR static inline __m256 kv_load8(const void *base, size_t off, bool f16) {
    return f16 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)base + off)))
               : _mm256_loadu_ps((const float *)base + off);
}

#define KV_MAX_GROUP 8 /* query heads handled together; larger groups loop */

AVX2_ATTR static void kv_dots_avx2(const float *q, int nq, const void *k, size_t step, int m, int hd, bool f16,
                                   float scale, float *out, size_t ostride) {
    if (hd % 8) {
        kv_dots_scalar(q, nq, k, step, m, hd, f16, scale, out, ostride);
        return;
    }
    for (int j0 = 0; j0 < nq; j0 += KV_MAX_GROUP) {
        int g = nq - j0 < KV_MAX_GROUP ? nq - j0 : KV_MAX_GROUP;
        for (int i = 0; i < m; i++) {
            __m256 acc[KV_MAX_GROUP];
            for (int j = 0; j < g; j++) acc[j] = _mm256_setzero_ps();
            for (int c = 0; c < hd; c += 8) {
                __m256 kc = kv_load8(k, (size_t)i * step + (size_t)c, f16);
                for (int j = 0; j < g; j++)
                    acc[j] = _mm256_fmadd_ps(_mm256_loadu_ps(q + (size_t)(j0 + j) * (size_t)hd + c), kc, acc[j]);
            }
            for (int j = 0; j < g; j++) out[(size_t)(j0 + j) * ostride + (size_t)i] = hsum256(acc[j]) * scale;
        }
    }
}

AVX2_ATTR static void kv_accum_avx2(float *out, int nq, const float *p, size_t pstride, const void *v, size_t step,
                                   int m, int hd, bool f16) {
    if (hd % 8) {
        kv_accum_scalar(out, nq, p, pstride, v, step, m, hd, f16);
        return;
    }
    for (int j0 = 0; j0 < nq; j0 += KV_MAX_GROUP) {
        int g = nq - j0 < KV_MAX_GROUP ? nq - j0 : KV_MAX_GROUP;
        for (int c = 0; c < hd; c += 8) {
            __m256 acc[KV_MAX_GROUP];
            for (int j = 0; j < g; j++) acc[j] = _mm256_loadu_ps(out + (size_t)(j0 + j) * (size_t)hd + c);
            for (int i = 0; i < m; i++) {
                __m256 vc = kv_load8(v, (size_t)i * step + (size_t)c, f16);
                for (int j = 0; j < g; j++)
                    acc[j] = _mm256_fmadd_ps(_mm256_set1_ps(p[(size_t)(j0 + j) * pstride + (size_t)i]), vc, acc[j]);
            }
            for (int j = 0; j < g; j++) _mm256_storeu_ps(out + (size_t)(j0 + j) * (size_t)hd + c, acc[j]);
        }
    }
}

/* ==== AVX-512 ========================================================== */

#define AVX512_ATTR __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))

AVX512_ATTR static inline __m512 load16_avx512(uint32_t type, const void *row, int k) {
    switch (type) {
    case GGML_F16:
        return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)row + k)));
    case GGML_BF16: {
        __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)row + k)));
        return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
    }
    case GGML_Q8_0: {
        const block_q8_0 *b = (const block_q8_0 *)row + k / QK8_0;
        __m128i q = _mm_loadu_si128((const __m128i *)(b->qs + k % QK8_0));
        __m512 f = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q));
        return _mm512_mul_ps(f, _mm512_set1_ps(_cvtsh_ss(b->d)));
    }
    default:
        return _mm512_loadu_ps((const float *)row + k);
    }
}

AVX512_ATTR static void dequant_row_avx512(uint32_t type, const void *row, float *dst, int n) {
    if (ops_kq_type(type)) {
        dequant_kq(type, row, dst, n);
        return;
    }
    int k = 0;
    for (; k + 16 <= n; k += 16) _mm512_storeu_ps(dst + k, load16_avx512(type, row, k));
    if (k < n) dequant_row_avx2(type, (const char *)row + (size_t)k * (type == GGML_F32 ? 4 : 2), dst + k, n - k);
}

/* As GEMM_TILE_AVX2, 16 lanes wide; specialised per type so the type
 * switch folds out of the inner loop. */
#define GEMM_TILE_512(NAME, TYPE, RB, TB)                                                                \
    AVX512_ATTR static inline void NAME(const uint8_t *w, size_t rb, const float *x, size_t ldx, float *y, \
                                        size_t ldy, int n) {                                             \
        __m512 acc[RB][TB];                                                                              \
        _Pragma("GCC unroll 16") for (int i = 0; i < RB; i++)                                            \
            _Pragma("GCC unroll 16") for (int t = 0; t < TB; t++) acc[i][t] = _mm512_setzero_ps();       \
        for (int k = 0; k < n; k += 16) {                                                                \
            __m512 xv[TB];                                                                               \
            _Pragma("GCC unroll 16") for (int t = 0; t < TB; t++) xv[t] = _mm512_loadu_ps(x + (size_t)t * ldx + k); \
            _Pragma("GCC unroll 16") for (int i = 0; i < RB; i++) {                                      \
                __m512 wv = load16_avx512(TYPE, w + (size_t)i * rb, k);                                  \
                _Pragma("GCC unroll 16") for (int t = 0; t < TB; t++) acc[i][t] = _mm512_fmadd_ps(wv, xv[t], acc[i][t]); \
            }                                                                                            \
        }                                                                                                \
        _Pragma("GCC unroll 16") for (int i = 0; i < RB; i++)                                            \
            _Pragma("GCC unroll 16") for (int t = 0; t < TB; t++) y[(size_t)t * ldy + i] = _mm512_reduce_add_ps(acc[i][t]); \
    }

#define GEMM_512(SUFFIX, TYPE)                                                                           \
    GEMM_TILE_512(tile512_4x4_##SUFFIX, TYPE, 4, 4)                                                      \
    GEMM_TILE_512(tile512_8x1_##SUFFIX, TYPE, 8, 1)                                                      \
    GEMM_TILE_512(tile512_1x4_##SUFFIX, TYPE, 1, 4)                                                      \
    GEMM_TILE_512(tile512_1x1_##SUFFIX, TYPE, 1, 1)                                                      \
    AVX512_ATTR static void gemm512_##SUFFIX(const uint8_t *W, size_t rb, int rows, const float *x, size_t ldx, \
                                             int T, float *y, size_t ldy, int n) {                       \
        int t = 0;                                                                                       \
        for (; t + 4 <= T; t += 4) {                                                                     \
            int r = 0;                                                                                   \
            for (; r + 4 <= rows; r += 4)                                                                \
                tile512_4x4_##SUFFIX(W + (size_t)r * rb, rb, x + (size_t)t * ldx, ldx, y + (size_t)t * ldy + r, ldy, n); \
            for (; r < rows; r++)                                                                        \
                tile512_1x4_##SUFFIX(W + (size_t)r * rb, rb, x + (size_t)t * ldx, ldx, y + (size_t)t * ldy + r, ldy, n); \
        }                                                                                                \
        for (; t < T; t++) {                                                                             \
            int r = 0;                                                                                   \
            for (; r + 8 <= rows; r += 8)                                                                \
                tile512_8x1_##SUFFIX(W + (size_t)r * rb, rb, x + (size_t)t * ldx, ldx, y + (size_t)t * ldy + r, ldy, n); \
            for (; r < rows; r++)                                                                        \
                tile512_1x1_##SUFFIX(W + (size_t)r * rb, rb, x + (size_t)t * ldx, ldx, y + (size_t)t * ldy + r, ldy, n); \
        }                                                                                                \
    }

GEMM_512(f32, GGML_F32)
GEMM_512(f16, GGML_F16)
GEMM_512(bf16, GGML_BF16)

AVX512_ATTR static void gemm_avx512(uint32_t type, const void *w, size_t rb, int rows, const float *x, size_t ldx,
                                    int T, float *y, size_t ldy, int n) {
    if (ops_kq_type(type)) {
        gemm_kq(type, w, rb, rows, x, ldx, T, y, ldy, n);
        return;
    }
    if (n % 16) { /* unusual widths: the AVX2 kernels handle multiples of 8 */
        gemm_avx2(type, w, rb, rows, x, ldx, T, y, ldy, n);
        return;
    }
    switch (type) {
    case GGML_F32: gemm512_f32(w, rb, rows, x, ldx, T, y, ldy, n); break;
    case GGML_F16: gemm512_f16(w, rb, rows, x, ldx, T, y, ldy, n); break;
    case GGML_BF16: gemm512_bf16(w, rb, rows, x, ldx, T, y, ldy, n); break;
    case GGML_Q8_0: gemm_q8_0(w, rb, rows, x, ldx, T, y, ldy, n); break;
    }
}





AVX512_ATTR static void f32_to_f16_row_avx512(uint16_t *dst, const float *src, int n) {
    int k = 0;
    for (; k + 16 <= n; k += 16)
        _mm256_storeu_si256((__m256i *)(dst + k), _mm512_cvtps_ph(_mm512_loadu_ps(src + k), _MM_FROUND_TO_NEAREST_INT));
    for (; k < n; k++) dst[k] = f32_to_f16(src[k]);
}


AVX512_ATTR static inline __m512 kv_load16(const void *base, size_t off, bool f16) {
    return f16 ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)base + off)))
               : _mm512_loadu_ps((const float *)base + off);
}

AVX512_ATTR static void kv_dots_avx512(const float *q, int nq, const void *k, size_t step, int m, int hd, bool f16,
                                       float scale, float *out, size_t ostride) {
    if (hd % 16) {
        kv_dots_avx2(q, nq, k, step, m, hd, f16, scale, out, ostride);
        return;
    }
    for (int j0 = 0; j0 < nq; j0 += KV_MAX_GROUP) {
        int g = nq - j0 < KV_MAX_GROUP ? nq - j0 : KV_MAX_GROUP;
        for (int i = 0; i < m; i++) {
            __m512 acc[KV_MAX_GROUP];
            for (int j = 0; j < g; j++) acc[j] = _mm512_setzero_ps();
            for (int c = 0; c < hd; c += 16) {
                __m512 kc = kv_load16(k, (size_t)i * step + (size_t)c, f16);
                for (int j = 0; j < g; j++)
                    acc[j] = _mm512_fmadd_ps(_mm512_loadu_ps(q + (size_t)(j0 + j) * (size_t)hd + c), kc, acc[j]);
            }
            for (int j = 0; j < g; j++) out[(size_t)(j0 + j) * ostride + (size_t)i] = _mm512_reduce_add_ps(acc[j]) * scale;
        }
    }
}

AVX512_ATTR static void kv_accum_avx512(float *out, int nq, const float *p, size_t pstride, const void *v,
                                        size_t step, int m, int hd, bool f16) {
    if (hd % 16) {
        kv_accum_avx2(out, nq, p, pstride, v, step, m, hd, f16);
        return;
    }
    for (int j0 = 0; j0 < nq; j0 += KV_MAX_GROUP) {
        int g = nq - j0 < KV_MAX_GROUP ? nq - j0 : KV_MAX_GROUP;
        for (int c = 0; c < hd; c += 16) {
            __m512 acc[KV_MAX_GROUP];
            for (int j = 0; j < g; j++) acc[j] = _mm512_loadu_ps(out + (size_t)(j0 + j) * (size_t)hd + c);
            for (int i = 0; i < m; i++) {
                __m512 vc = kv_load16(v, (size_t)i * step + (size_t)c, f16);
                for (int j = 0; j < g; j++)
                    acc[j] = _mm512_fmadd_ps(_mm512_set1_ps(p[(size_t)(j0 + j) * pstride + (size_t)i]), vc, acc[j]);
            }
            for (int j = 0; j < g; j++) _mm512_storeu_ps(out + (size_t)(j0 + j) * (size_t)hd + c, acc[j]);
        }
    }
}

/* ==== Dispatch ========================================================= */

int ops_type_supported(uint32_t type) {
    return type == GGML_F32 || type == GGML_F16 || type == GGML_BF16 || type == GGML_Q8_0 || ops_kq_type(type);
}

const char *ops_init(const char *family) {
    if (!family) family = cpu_kernel_family();
    const char *best = cpu_kernel_family();
    /* Never select more than the CPU has. */
    if (strcmp(family, "avx512") == 0 && strcmp(best, "avx512") != 0) family = best;
    if (strcmp(family, "avx2") == 0 && strcmp(best, "scalar") == 0) family = best;
    ops_q8_init(family);
    ops_kq_init(family);
    if (strcmp(family, "avx512") == 0) {
        ops = (ops_table){gemm_avx512, dequant_row_avx512, f32_to_f16_row_avx512, kv_dots_avx512, kv_accum_avx512};
        return "avx512";
    }
    if (strcmp(family, "avx2") == 0) {
        ops = (ops_table){gemm_avx2, dequant_row_avx2, f32_to_f16_row_avx2, kv_dots_avx2, kv_accum_avx2};
        return "avx2";
    }
    ops = (ops_table){gemm_scalar, dequant_row_scalar, f32_to_f16_row_scalar, kv_dots_scalar, kv_accum_scalar};
    return "scalar";
}

/* ==== Elementwise ====================================================== */

void rmsnorm(float *out, const float *x, const float *w, int n, float eps) {
    float ss = 0;
    for (int i = 0; i < n; i++) ss += x[i] * x[i];
    float scale = 1.0f / sqrtf(ss / (float)n + eps);
    for (int i = 0; i < n; i++) out[i] = x[i] * scale * w[i];
}

void softmax(float *x, int n) {
    float m = -INFINITY;
    for (int i = 0; i < n; i++) m = x[i] > m ? x[i] : m;
    float s = 0;
    for (int i = 0; i < n; i++) {
        x[i] = expf(x[i] - m);
        s += x[i];
    }
    float inv = 1.0f / s;
    for (int i = 0; i < n; i++) x[i] *= inv;
}

float silu(float x) { return x / (1.0f + expf(-x)); }
