/*
 * ops_q8.c - Q8_0 weights times activations quantised to 8 bits.
 *
 * Converting every int8 weight to float costs several instructions per
 * weight and made decode compute-bound.  As llama.cpp does, each activation
 * row is instead quantised once per call to blocks of 32 int8 with one float
 * scale, and the block dot products are integer: sum(w*x) * d_w * d_x.
 *
 * The unsigned-by-signed byte multiply (vpdpbusd / vpmaddubsw) wants one
 * unsigned operand: |x| is used as that operand and x's sign is moved onto w.
 * Both |x| and the sign mask are computed once per row when quantising.
 *
 * Every (row, token) element accumulates over blocks in the same order in
 * every tile shape, so results do not depend on the batch.
 */
#include <immintrin.h>
#include <math.h>
#include <string.h>

#include "cpu.h"
#include "ops.h"

#define QK 32
#define MAX_TOK 8 /* tokens quantised per chunk (stack buffers) */

/* One activation row: n/32 blocks of |x| bytes, the sign-flipped-zero mask
 * (as bytes: 0xff where x < 0) and the block scales. */
typedef struct {
    uint8_t *absq;  /* [n] */
    uint8_t *neg;   /* [n] 0xff where negative */
    int8_t *q;      /* [n] signed values (scalar path) */
    float *d;       /* [n/32] */
} qrow;

static void quantize_row_scalar(const float *x, int n, qrow *out) {
    for (int b = 0; b < n / QK; b++) {
        const float *xb = x + b * QK;
        float amax = 0;
        for (int i = 0; i < QK; i++) amax = fmaxf(amax, fabsf(xb[i]));
        float d = amax / 127.0f, id = d > 0 ? 1.0f / d : 0.0f;
        out->d[b] = d;
        for (int i = 0; i < QK; i++) {
            int v = (int)lrintf(xb[i] * id);
            v = v > 127 ? 127 : v < -127 ? -127 : v;
            out->q[b * QK + i] = (int8_t)v;
            out->absq[b * QK + i] = (uint8_t)(v < 0 ? -v : v);
            out->neg[b * QK + i] = v < 0 ? 0xff : 0;
        }
    }
}

/* The same numbers as the scalar version (max, one division, a product and
 * round-to-nearest-even), 32 at a time; it was a tenth of decode time. */
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))
static void quantize_row_avx512(const float *x, int n, qrow *out) {
    const __m512 signbit = _mm512_set1_ps(-0.0f);
    for (int b = 0; b < n / QK; b++) {
        __m512 x0 = _mm512_loadu_ps(x + b * QK), x1 = _mm512_loadu_ps(x + b * QK + 16);
        __m512 a = _mm512_max_ps(_mm512_andnot_ps(signbit, x0), _mm512_andnot_ps(signbit, x1));
        float amax = _mm512_reduce_max_ps(a);
        float d = amax / 127.0f, id = d > 0 ? 1.0f / d : 0.0f;
        out->d[b] = d;
        __m512 vid = _mm512_set1_ps(id);
        __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(x0, vid)), q1 = _mm512_cvtps_epi32(_mm512_mul_ps(x1, vid));
        const __m512i lim = _mm512_set1_epi32(127), nlim = _mm512_set1_epi32(-127);
        q0 = _mm512_max_epi32(_mm512_min_epi32(q0, lim), nlim);
        q1 = _mm512_max_epi32(_mm512_min_epi32(q1, lim), nlim);
        __m128i p0 = _mm512_cvtepi32_epi8(q0), p1 = _mm512_cvtepi32_epi8(q1);
        __m256i q = _mm256_inserti128_si256(_mm256_castsi128_si256(p0), p1, 1);
        _mm256_storeu_si256((__m256i *)(out->q + b * QK), q);
        _mm256_storeu_si256((__m256i *)(out->absq + b * QK), _mm256_abs_epi8(q));
        _mm256_storeu_si256((__m256i *)(out->neg + b * QK), _mm256_cmpgt_epi8(_mm256_setzero_si256(), q));
    }
}

static void (*quantize_row)(const float *x, int n, qrow *out) = quantize_row_scalar;

/* ==== Scalar =========================================================== */

static void gemm_q8_scalar_rows(const uint8_t *w, size_t rb, int rows, const qrow *xq, int T, float *y, size_t ldy,
                                int n) {
    for (int r = 0; r < rows; r++) {
        const block_q8_0 *wb = (const block_q8_0 *)(w + (size_t)r * rb);
        for (int t = 0; t < T; t++) {
            float acc = 0;
            for (int b = 0; b < n / QK; b++) {
                int s = 0;
                for (int i = 0; i < QK; i++) s += wb[b].qs[i] * xq[t].q[b * QK + i];
                acc += (float)s * (f16_to_f32(wb[b].d) * xq[t].d[b]);
            }
            y[(size_t)t * ldy + (size_t)r] = acc;
        }
    }
}

/* Decode (one token) streams each weight row once from DRAM, several rows
 * side by side; the hardware prefetcher alone left each core at about half
 * of its sequential read rate on that pattern.  Prefetching 512 bytes
 * (about 15 blocks) ahead in every row measured best on a 1B Q8_0 model:
 * 11.7 -> 15.6 tok/s on two cores (256: 14.3, 1024: 13.9, 2048: 11.6); a
 * model that fits the cache is unaffected. */
#define Q8_PREFETCH 512

/* ==== AVX2 ============================================================= */

#define AVX2_ATTR __attribute__((target("avx2,fma,f16c")))

AVX2_ATTR static inline float hsum8(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
    return _mm_cvtss_f32(lo);
}

/* One block: 8 int32 lanes of sum(|x| * w*sign(x)). */
AVX2_ATTR static inline __m256i block_dot_avx2(__m256i w, __m256i absx, __m256i negx) {
    /* w * sign(x): negate w where x < 0 (x == 0 is harmless: |x| = 0). */
    __m256i ws = _mm256_sub_epi8(_mm256_xor_si256(w, negx), negx);
    __m256i p16 = _mm256_maddubs_epi16(absx, ws); /* |x|<=127, |w|<=127: no saturation */
    return _mm256_madd_epi16(p16, _mm256_set1_epi16(1));
}

#define Q8_TILE_AVX2(NAME, RB, TB)                                                                         \
    AVX2_ATTR static inline void NAME(const uint8_t *w, size_t rb, const qrow *xq, float *y, size_t ldy, int n) { \
        __m256 acc[RB][TB];                                                                                \
        _Pragma("GCC unroll 8") for (int i = 0; i < RB; i++)                                               \
            _Pragma("GCC unroll 8") for (int t = 0; t < TB; t++) acc[i][t] = _mm256_setzero_ps();          \
        for (int b = 0; b < n / QK; b++) {                                                                 \
            __m256i ax[TB], nx[TB];                                                                        \
            _Pragma("GCC unroll 8") for (int t = 0; t < TB; t++) {                                         \
                ax[t] = _mm256_loadu_si256((const __m256i *)(xq[t].absq + b * QK));                        \
                nx[t] = _mm256_loadu_si256((const __m256i *)(xq[t].neg + b * QK));                         \
            }                                                                                              \
            _Pragma("GCC unroll 8") for (int i = 0; i < RB; i++) {                                         \
                const block_q8_0 *wb = (const block_q8_0 *)(w + (size_t)i * rb) + b;                       \
                if (TB == 1) _mm_prefetch((const char *)wb + Q8_PREFETCH, _MM_HINT_T0);                    \
                __m256i wv = _mm256_loadu_si256((const __m256i *)wb->qs);                                  \
                float dw = _cvtsh_ss(wb->d);                                                               \
                _Pragma("GCC unroll 8") for (int t = 0; t < TB; t++) {                                     \
                    __m256 s = _mm256_cvtepi32_ps(block_dot_avx2(wv, ax[t], nx[t]));                       \
                    acc[i][t] = _mm256_fmadd_ps(s, _mm256_set1_ps(dw * xq[t].d[b]), acc[i][t]);            \
                }                                                                                          \
            }                                                                                              \
        }                                                                                                  \
        _Pragma("GCC unroll 8") for (int i = 0; i < RB; i++)                                               \
            _Pragma("GCC unroll 8") for (int t = 0; t < TB; t++) y[(size_t)t * ldy + i] = hsum8(acc[i][t]); \
    }

Q8_TILE_AVX2(q8t_avx2_2x4, 2, 4)
Q8_TILE_AVX2(q8t_avx2_4x1, 4, 1)
Q8_TILE_AVX2(q8t_avx2_1x4, 1, 4)
Q8_TILE_AVX2(q8t_avx2_1x1, 1, 1)

AVX2_ATTR static void gemm_q8_avx2_rows(const uint8_t *w, size_t rb, int rows, const qrow *xq, int T, float *y,
                                        size_t ldy, int n) {
    int t = 0;
    for (; t + 4 <= T; t += 4) {
        int r = 0;
        for (; r + 2 <= rows; r += 2) q8t_avx2_2x4(w + (size_t)r * rb, rb, xq + t, y + (size_t)t * ldy + r, ldy, n);
        for (; r < rows; r++) q8t_avx2_1x4(w + (size_t)r * rb, rb, xq + t, y + (size_t)t * ldy + r, ldy, n);
    }
    for (; t < T; t++) {
        int r = 0;
        for (; r + 4 <= rows; r += 4) q8t_avx2_4x1(w + (size_t)r * rb, rb, xq + t, y + (size_t)t * ldy + r, ldy, n);
        for (; r < rows; r++) q8t_avx2_1x1(w + (size_t)r * rb, rb, xq + t, y + (size_t)t * ldy + r, ldy, n);
    }
}

/* ==== AVX-512 ========================================================== */

#define AVX512_ATTR __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
#define VNNI_ATTR __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")))

/* The scales of blocks b and b+1 (bytes 0 and 34 of the pair) spread over
 * lanes 0-7 and 8-15, from one 64-byte load, one word permute and one
 * conversion: two scalar conversions, broadcasts and an insert per row were
 * most of the tile's shuffle-port work. */
AVX512_ATTR __attribute__((always_inline)) static inline __m512 q8_pair_scales(const block_q8_0 *wb) {
    const __m512i idx = _mm512_set_epi32(0, 0, 0, 0, 0, 0, 0, 0, 0x00110011, 0x00110011, 0x00110011, 0x00110011, 0,
                                         0, 0, 0);
    __m512i p = _mm512_permutexvar_epi16(idx, _mm512_loadu_si512(wb));
    return _mm512_cvtph_ps(_mm512_castsi512_si256(p));
}

/* Two blocks (64 weights) at once: lanes 0-7 hold block b, 8-15 block b+1. */
#define Q8_TILE_512(NAME, ATTR, DOT, RB, TB)                                                               \
    ATTR static inline void NAME(const uint8_t *w, size_t rb, const qrow *xq, float *y, size_t ldy, int n) { \
        __m512 acc[RB][TB];                                                                                \
        _Pragma("GCC unroll 8") for (int i = 0; i < RB; i++)                                               \
            _Pragma("GCC unroll 8") for (int t = 0; t < TB; t++) acc[i][t] = _mm512_setzero_ps();          \
        for (int b = 0; b < n / QK; b += 2) {                                                              \
            __m512i ax[TB];                                                                                \
            __mmask64 nx[TB];                                                                              \
            __m512 dx[TB];                                                                                 \
            _Pragma("GCC unroll 8") for (int t = 0; t < TB; t++) {                                         \
                ax[t] = _mm512_loadu_si512(xq[t].absq + b * QK);                                           \
                nx[t] = _mm512_movepi8_mask(_mm512_loadu_si512(xq[t].neg + b * QK));                       \
                dx[t] = _mm512_insertf32x8(_mm512_set1_ps(xq[t].d[b]), _mm256_set1_ps(xq[t].d[b + 1]), 1); \
            }                                                                                              \
            _Pragma("GCC unroll 8") for (int i = 0; i < RB; i++) {                                         \
                const block_q8_0 *wb = (const block_q8_0 *)(w + (size_t)i * rb) + b;                       \
                if (TB == 1) _mm_prefetch((const char *)wb + Q8_PREFETCH, _MM_HINT_T0);                    \
                __m512i wv = _mm512_inserti64x4(                                                           \
                    _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)wb[0].qs)),                 \
                    _mm256_loadu_si256((const __m256i *)wb[1].qs), 1);                                     \
                __m512 dw = q8_pair_scales(wb);                                                            \
                _Pragma("GCC unroll 8") for (int t = 0; t < TB; t++) {                                     \
                    __m512i ws = _mm512_mask_sub_epi8(wv, nx[t], _mm512_setzero_si512(), wv);              \
                    __m512 s = _mm512_cvtepi32_ps(DOT(ax[t], ws));                                         \
                    acc[i][t] = _mm512_fmadd_ps(s, _mm512_mul_ps(dw, dx[t]), acc[i][t]);                   \
                }                                                                                          \
            }                                                                                              \
        }                                                                                                  \
        _Pragma("GCC unroll 8") for (int i = 0; i < RB; i++)                                               \
            _Pragma("GCC unroll 8") for (int t = 0; t < TB; t++) y[(size_t)t * ldy + i] =                  \
                _mm512_reduce_add_ps(acc[i][t]);                                                           \
    }

VNNI_ATTR static inline __m512i dot_vnni(__m512i a, __m512i b) {
    return _mm512_dpbusd_epi32(_mm512_setzero_si512(), a, b);
}
AVX512_ATTR static inline __m512i dot_bw(__m512i a, __m512i b) {
    return _mm512_madd_epi16(_mm512_maddubs_epi16(a, b), _mm512_set1_epi16(1));
}

#define Q8_GEMM_512(SUFFIX, ATTR, DOT)                                                                     \
    Q8_TILE_512(q8t512_4x4_##SUFFIX, ATTR, DOT, 4, 4)                                                      \
    Q8_TILE_512(q8t512_8x1_##SUFFIX, ATTR, DOT, 8, 1)                                                      \
    Q8_TILE_512(q8t512_1x4_##SUFFIX, ATTR, DOT, 1, 4)                                                      \
    Q8_TILE_512(q8t512_1x1_##SUFFIX, ATTR, DOT, 1, 1)                                                      \
    ATTR static void gemm_q8_512_##SUFFIX(const uint8_t *w, size_t rb, int rows, const qrow *xq, int T, float *y, \
                                          size_t ldy, int n) {                                             \
        int t = 0;                                                                                         \
        for (; t + 4 <= T; t += 4) {                                                                       \
            int r = 0;                                                                                     \
            for (; r + 4 <= rows; r += 4)                                                                  \
                q8t512_4x4_##SUFFIX(w + (size_t)r * rb, rb, xq + t, y + (size_t)t * ldy + r, ldy, n);      \
            for (; r < rows; r++)                                                                          \
                q8t512_1x4_##SUFFIX(w + (size_t)r * rb, rb, xq + t, y + (size_t)t * ldy + r, ldy, n);      \
        }                                                                                                  \
        for (; t < T; t++) {                                                                               \
            int r = 0;                                                                                     \
            for (; r + 8 <= rows; r += 8)                                                                  \
                q8t512_8x1_##SUFFIX(w + (size_t)r * rb, rb, xq + t, y + (size_t)t * ldy + r, ldy, n);      \
            for (; r < rows; r++)                                                                          \
                q8t512_1x1_##SUFFIX(w + (size_t)r * rb, rb, xq + t, y + (size_t)t * ldy + r, ldy, n);      \
        }                                                                                                  \
    }

Q8_GEMM_512(vnni, VNNI_ATTR, dot_vnni)
Q8_GEMM_512(bw, AVX512_ATTR, dot_bw)

/* ==== Entry ============================================================ */

typedef void (*q8_rows_fn)(const uint8_t *, size_t, int, const qrow *, int, float *, size_t, int);

static q8_rows_fn pick(const char *family) {
    const cpu_features *f = cpu_get();
    if (!strcmp(family, "avx512")) return f->avx512vnni ? gemm_q8_512_vnni : gemm_q8_512_bw;
    if (!strcmp(family, "avx2")) return gemm_q8_avx2_rows;
    return gemm_q8_scalar_rows;
}

static q8_rows_fn q8_fn = gemm_q8_scalar_rows;
static bool q8_pairs; /* the 512-bit kernels take blocks two at a time */

void ops_q8_init(const char *family) {
    q8_fn = pick(family);
    quantize_row = !strcmp(family, "avx512") ? quantize_row_avx512 : quantize_row_scalar;
    q8_pairs = !strcmp(family, "avx512");
}

void gemm_q8_0(const void *w, size_t rb, int rows, const float *x, size_t ldx, int T, float *y, size_t ldy, int n) {
    int nb = n / QK;
    /* The 512-bit kernels read block pairs; an odd block count uses AVX2
     * (whole rows of a matrix always share one kernel). */
    q8_rows_fn fn = q8_fn;
    if (q8_pairs && nb % 2) fn = cpu_get()->avx2 ? gemm_q8_avx2_rows : gemm_q8_scalar_rows;
    uint8_t absq[MAX_TOK][n], neg[MAX_TOK][n];
    int8_t q[MAX_TOK][n];
    float d[MAX_TOK][nb];
    qrow xq[MAX_TOK];
    for (int t0 = 0; t0 < T; t0 += MAX_TOK) {
        int tn = T - t0 < MAX_TOK ? T - t0 : MAX_TOK;
        for (int t = 0; t < tn; t++) {
            xq[t] = (qrow){absq[t], neg[t], q[t], d[t]};
            quantize_row(x + (size_t)(t0 + t) * ldx, n, &xq[t]);
        }
        fn(w, rb, rows, xq, tn, y + (size_t)t0 * ldy, ldy, n);
    }
}
