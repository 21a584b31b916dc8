/*
 * ops_kquants.c - Q4_0, Q4_K, Q5_K and Q6_K weights: dequantisation and
 * integer gemm kernels.
 *
 * ==== Block layouts (GGUF format definition, as ggml writes them) ====
 *
 * Q4_0, 32 weights in 18 bytes: f16 d, qs[16].  For j < 16,
 *   w[j] = (float)((qs[j] & 15) - 8) * d,  w[j + 16] = (float)((qs[j] >> 4) - 8) * d.
 *
 * Q4_K, 256 weights in 144 bytes: f16 d, f16 dmin, scales[12], qs[128].
 *   Eight sub-blocks of 32 weights, each with a 6-bit scale sc and 6-bit
 *   min m packed in scales[]: for j < 4, sc = scales[j] & 63 and
 *   m = scales[j + 4] & 63; for j >= 4, sc = (scales[j + 4] & 15) |
 *   (scales[j - 4] >> 6) << 4 and m = (scales[j + 4] >> 4) | (scales[j] >> 6) << 4.
 *   Group g < 4 of 64 weights reads qs[32g .. 32g + 32): the low nibbles are
 *   sub-block 2g (weights 64g + l), the high nibbles sub-block 2g + 1
 *   (weights 64g + 32 + l).  w = (d * sc) * q - dmin * m: the two products
 *   are rounded to float first, then subtracted (ggml's dequantize_row_q4_K).
 *
 * Q5_K, 256 weights in 176 bytes: d, dmin, scales[12] as Q4_K, qh[32],
 *   qs[128] as Q4_K's nibbles; weight l of sub-block s adds 16 to q when
 *   bit s of qh[l] is set.  Same formula as Q4_K.
 *
 * Q6_K, 256 weights in 210 bytes: ql[128], qh[64], int8 scales[16], f16 d.
 *   Half h < 2 (weights 128h ..) reads ql[64h ..] and qh[32h ..]: for
 *   l < 32 and k < 4, weight 128h + 32k + l takes its low four bits from
 *   ql[64h + 32(k & 1) + l] (the low nibble for k < 2, the high one for
 *   k >= 2) and its high two bits from bits 2k, 2k + 1 of qh[32h + l].
 *   Weight i: w = (d * scales[i / 16]) * (q - 32), in that order.
 *
 * Every product above is exact in float32 (an f16 significand has 11 bits,
 * a scale at most 7, a quant at most 6: at most 24 together), so the only
 * rounding is Q4_K/Q5_K's final subtraction.  The SIMD dequantisation gives
 * the same bits as ggml's dequantize_row_* whether or not a compiler fuses
 * the multiply and subtract.
 *
 * ==== Decode kernels ====
 *
 * As in ops_q8.c, each activation row is quantised once per call to int8
 * and the dot products are integer.  For the K-quants the activation blocks
 * are 256 wide (ggml's Q8_K): one float scale amax/127 per block, plus the
 * sums of each 16 and 32 quantised values; Q4_0 uses blocks of 32 like
 * Q8_0.  The int8 values are stored in the order each kernel reads them
 * (see quant_act).  The weights' quants are unsigned (0..15, 0..31, 0..63),
 * so the unsigned-by-signed byte multiply (vpmaddubsw) takes them as they
 * are; Q4_0's -8, Q6_K's -32 and the K-quant mins come in through the
 * activation sums.
 * Within a 256-block everything is int32 and exact:
 *   isum = sum_j sc_j * (q_j . x_j)   (vpmaddubsw, then vpmaddwd / vpdpwssd with the scales)
 *   msum = sum_j m_j * xsum_j
 * and the float work is one or two multiply-adds per block and token:
 *   acc += (d * dx) * isum - (dmin * dx) * msum.
 *
 * Batch invariance: a (row, token) element runs the same instructions in
 * every tile shape (tokens are the inner loop, each with its own integer
 * and float accumulators), so its result does not depend on T or rows.
 * The float accumulators' lane layout differs between families, so families
 * agree to rounding, not bit for bit.
 */
#include <immintrin.h>
#include <math.h>
#include <string.h>

#include "cpu.h"
#include "gguf.h"
#include "ops.h"

_Static_assert(sizeof(block_q4_0) == 18, "Q4_0 block is 18 bytes");
_Static_assert(sizeof(block_q4_K) == 144, "Q4_K block is 144 bytes");
_Static_assert(sizeof(block_q5_K) == 176, "Q5_K block is 176 bytes");
_Static_assert(sizeof(block_q6_K) == 210, "Q6_K block is 210 bytes");

/* Prefetch distance of the one-token kernels (ops_kquants_512.inc): three
 * lines this far ahead of each block.  On a 1B Q4_K_M model, decode on two
 * cores went 14.7 -> 23.4 tok/s (256: 17.4, 512: 19.6, 1024: 22.4, 1536 and
 * up: 23.4); the row is read once, from DRAM, and the hardware prefetcher
 * alone does not keep enough lines in flight while the kernel unpacks. */
#define KQ_PREFETCH 2048
#define MAX_TOK 8 /* tokens quantised per chunk (stack buffers) */

bool ops_kq_type(uint32_t type) {
    return type == GGML_Q4_0 || type == GGML_Q4_K || type == GGML_Q5_K || type == GGML_Q6_K;
}

/* ==== Scalar dequantisation (the format definition) ==================== */

/* Sub-block j's 6-bit scale and min (Q4_K, Q5_K). */
static inline void k4_scale_min(const uint8_t *s, int j, int *sc, int *m) {
    if (j < 4) {
        *sc = s[j] & 63;
        *m = s[j + 4] & 63;
    } else {
        *sc = (s[j + 4] & 15) | ((s[j - 4] >> 6) << 4);
        *m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

static void dequant_q4_0(const void *row, float *y, int n) {
    const block_q4_0 *b = row;
    for (int i = 0; i < n / QK4_0; i++, y += QK4_0) {
        float d = f16_to_f32(b[i].d);
        for (int j = 0; j < QK4_0 / 2; j++) {
            y[j] = (float)((b[i].qs[j] & 15) - 8) * d;
            y[j + 16] = (float)((b[i].qs[j] >> 4) - 8) * d;
        }
    }
}

/* Q4_K and Q5_K share everything but the fifth bit (qh NULL for Q4_K). */
static void dequant_k45_block(uint16_t hd, uint16_t hdmin, const uint8_t *scales, const uint8_t *qh,
                              const uint8_t *qs, float *y) {
    float d = f16_to_f32(hd), dmin = f16_to_f32(hdmin);
    for (int g = 0; g < 4; g++) {
        int sc, m;
        k4_scale_min(scales, 2 * g, &sc, &m);
        float d1 = d * (float)sc, m1 = dmin * (float)m;
        k4_scale_min(scales, 2 * g + 1, &sc, &m);
        float d2 = d * (float)sc, m2 = dmin * (float)m;
        for (int l = 0; l < 32; l++) {
            int q1 = qs[32 * g + l] & 15, q2 = qs[32 * g + l] >> 4;
            if (qh) {
                q1 += ((qh[l] >> (2 * g)) & 1) << 4;
                q2 += ((qh[l] >> (2 * g + 1)) & 1) << 4;
            }
            y[64 * g + l] = d1 * (float)q1 - m1;
            y[64 * g + 32 + l] = d2 * (float)q2 - m2;
        }
    }
}

static void dequant_q4_K(const void *row, float *y, int n) {
    const block_q4_K *b = row;
    for (int i = 0; i < n / QK_K; i++) dequant_k45_block(b[i].d, b[i].dmin, b[i].scales, NULL, b[i].qs, y + i * QK_K);
}

static void dequant_q5_K(const void *row, float *y, int n) {
    const block_q5_K *b = row;
    for (int i = 0; i < n / QK_K; i++)
        dequant_k45_block(b[i].d, b[i].dmin, b[i].scales, b[i].qh, b[i].qs, y + i * QK_K);
}

static void dequant_q6_K(const void *row, float *y, int n) {
    const block_q6_K *b = row;
    for (int i = 0; i < n / QK_K; i++, y += QK_K) {
        float d = f16_to_f32(b[i].d);
        for (int h = 0; h < 2; h++) {
            const uint8_t *ql = b[i].ql + 64 * h, *qh = b[i].qh + 32 * h;
            for (int k = 0; k < 4; k++) {
                for (int l = 0; l < 32; l++) {
                    int lo = ql[32 * (k & 1) + l], q = (k < 2 ? lo & 15 : lo >> 4) | (((qh[l] >> (2 * k)) & 3) << 4);
                    int e = 128 * h + 32 * k + l;
                    y[e] = d * (float)b[i].scales[e / 16] * (float)(q - 32);
                }
            }
        }
    }
}

static void dequant_kq_scalar(uint32_t type, const void *row, float *y, int n) {
    switch (type) {
    case GGML_Q4_0: dequant_q4_0(row, y, n); break;
    case GGML_Q4_K: dequant_q4_K(row, y, n); break;
    case GGML_Q5_K: dequant_q5_K(row, y, n); break;
    case GGML_Q6_K: dequant_q6_K(row, y, n); break;
    }
}

/* ==== Activation quantisation ========================================== */

typedef enum { FAM_SCALAR, FAM_AVX2, FAM_512_BW, FAM_512_VNNI } kq_family;
static kq_family fam = FAM_SCALAR;

/* One activation row quantised to int8 in blocks of qb (256 or 32). */
typedef struct {
    int8_t *q;    /* [n], in the order the kernels read (see quant_act) */
    float *d;     /* [n / qb] block scales */
    int16_t *s16; /* [n / 16] sums of 16 consecutive q, in element order */
    int16_t *s32; /* [n / 32] sums of 32 */
    /* Q4_0 only, for the SIMD kernels: -8 * s32 of each block placed in the
     * int32 lane the kernel adds it to, and (ORDER_Q4_0_X2, _X4) the block scales
     * spread over the block's lanes.  Computed once per token, not per row. */
    int32_t *corr; /* [n / 8] */
    float *dl;     /* [n / 8] */
} act;

/* Orders of q: element order; the 512-bit K-quant kernels read each 256-block's
 * 32-wide chunks as 0,2,1,3,4,6,5,7 (one 64-byte load of Q4_K nibbles holds
 * sub-blocks 0 and 2 in its low nibbles); the SIMD Q4_0 kernels unpack the
 * nibbles of two (AVX2) or four (AVX-512) blocks at once and read each
 * group's 16-wide halves as b0.lo b1.lo .. b0.hi b1.hi .. (a short last group
 * likewise). */
enum { ORDER_NATURAL, ORDER_K512, ORDER_Q4_0_X2, ORDER_Q4_0_X4 };

/* One block of qb floats to int8: d = max|x| / 127, q = round-to-even(x *
 * (1/d)) clamped to +-127; returns d. */
static float quant_block_scalar(const float *xb, int qb, int8_t *q) {
    float amax = 0;
    for (int i = 0; i < qb; i++) amax = fmaxf(amax, fabsf(xb[i]));
    float d = amax / 127.0f, id = d > 0 ? 1.0f / d : 0.0f;
    for (int i = 0; i < qb; i++) {
        long v = lrintf(xb[i] * id);
        q[i] = (int8_t)(v > 127 ? 127 : v < -127 ? -127 : v);
    }
    return d;
}

/* The same numbers, 32 at a time (qb is 32 or 256).  The scalar loop with
 * its fmaxf and lrintf calls was a third of K-quant decode time on a 1B
 * model, being run for every chunk of rows a thread takes. */
__attribute__((target("avx2,fma"))) static float quant_block_avx2(const float *xb, int qb, int8_t *q) {
    const __m256 signbit = _mm256_set1_ps(-0.0f);
    __m256 m = _mm256_setzero_ps();
    for (int i = 0; i < qb; i += 8) m = _mm256_max_ps(m, _mm256_andnot_ps(signbit, _mm256_loadu_ps(xb + i)));
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_movehdup_ps(h));
    float d = _mm_cvtss_f32(h) / 127.0f, id = d > 0 ? 1.0f / d : 0.0f;
    const __m256 vid = _mm256_set1_ps(id);
    const __m256i lim = _mm256_set1_epi32(127), nlim = _mm256_set1_epi32(-127);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int i = 0; i < qb; i += 32) {
        __m256i v[4];
        for (int k = 0; k < 4; k++) {
            __m256i t = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb + i + 8 * k), vid));
            v[k] = _mm256_max_epi32(_mm256_min_epi32(t, lim), nlim);
        }
        /* packs work within 128-bit lanes: dwords come out as 0-3 of v0,
         * v1, v2, v3, then 4-7 of each; the permutation restores order. */
        __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3]));
        _mm256_storeu_si256((__m256i *)(q + i), _mm256_permutevar8x32_epi32(p, order));
    }
    return d;
}

static void quant_act(const float *x, int n, int qb, int order, act *a) {
    int8_t tmp[QK_K];
    int nb = n / qb;
    for (int b = 0; b < nb; b++) {
        const float *xb = x + (size_t)b * (size_t)qb;
        int8_t *q = order == ORDER_NATURAL ? a->q + (size_t)b * (size_t)qb : tmp;
        float d = fam == FAM_SCALAR ? quant_block_scalar(xb, qb, q) : quant_block_avx2(xb, qb, q);
        a->d[b] = d;
        for (int k = 0; k < qb / 16; k++) {
            int s = 0;
            for (int i = 0; i < 16; i++) s += q[16 * k + i];
            a->s16[b * qb / 16 + k] = (int16_t)s;
            if (k & 1) a->s32[b * qb / 32 + k / 2] = (int16_t)(a->s16[b * qb / 16 + k - 1] + s);
        }
        if (order == ORDER_Q4_0_X2 || order == ORDER_Q4_0_X4) {
            /* int32 lanes 4k .. 4k+3 of a group's dot products are its block k. */
            memset(a->corr + 4 * b, 0, 16);
            a->corr[4 * b] = -8 * a->s32[b];
            for (int i = 0; i < 4; i++) a->dl[4 * b + i] = d;
            int gs = order == ORDER_Q4_0_X4 ? 4 : 2, g0 = b / gs * gs, m = nb - g0 < gs ? nb - g0 : gs;
            int8_t *g = a->q + (size_t)g0 * QK4_0;
            memcpy(g + 16 * (b - g0), tmp, 16);
            memcpy(g + 16 * m + 16 * (b - g0), tmp + 16, 16);
        }
        if (order == ORDER_K512) {
            static const int chunk[8] = {0, 2, 1, 3, 4, 6, 5, 7};
            for (int p = 0; p < 8; p++) memcpy(a->q + (size_t)b * QK_K + 32 * p, tmp + 32 * chunk[p], 32);
        }
    }
}

/* ==== Scalar gemm ====================================================== */

static float dot_q4_0_scalar(const uint8_t *wrow, const act *a, int n) {
    const block_q4_0 *w = (const block_q4_0 *)wrow;
    float acc = 0;
    for (int b = 0; b < n / QK4_0; b++) {
        const int8_t *x = a->q + b * QK4_0;
        int s = 0;
        for (int j = 0; j < 16; j++) s += (w[b].qs[j] & 15) * x[j] + (w[b].qs[j] >> 4) * x[j + 16];
        s -= 8 * a->s32[b];
        acc += (float)s * (f16_to_f32(w[b].d) * a->d[b]);
    }
    return acc;
}

/* Q4_K (qh NULL) and Q5_K: the contribution of one block. */
static float dot_k45_block_scalar(uint16_t hd, uint16_t hdmin, const uint8_t *scales, const uint8_t *qh,
                                  const uint8_t *qs, const act *a, int b) {
    const int8_t *x = a->q + b * QK_K;
    int isum = 0, msum = 0;
    for (int j = 0; j < 8; j++) {
        int sc, m, s = 0;
        k4_scale_min(scales, j, &sc, &m);
        const uint8_t *q = qs + 32 * (j / 2);
        for (int l = 0; l < 32; l++) {
            int v = j & 1 ? q[l] >> 4 : q[l] & 15;
            if (qh) v += ((qh[l] >> j) & 1) << 4;
            s += v * x[32 * j + l];
        }
        isum += sc * s;
        msum += m * a->s32[8 * b + j];
    }
    float dx = a->d[b];
    return (float)isum * (f16_to_f32(hd) * dx) - (float)msum * (f16_to_f32(hdmin) * dx);
}

static float dot_q4_K_scalar(const uint8_t *wrow, const act *a, int n) {
    const block_q4_K *w = (const block_q4_K *)wrow;
    float acc = 0;
    for (int b = 0; b < n / QK_K; b++) acc += dot_k45_block_scalar(w[b].d, w[b].dmin, w[b].scales, NULL, w[b].qs, a, b);
    return acc;
}

static float dot_q5_K_scalar(const uint8_t *wrow, const act *a, int n) {
    const block_q5_K *w = (const block_q5_K *)wrow;
    float acc = 0;
    for (int b = 0; b < n / QK_K; b++)
        acc += dot_k45_block_scalar(w[b].d, w[b].dmin, w[b].scales, w[b].qh, w[b].qs, a, b);
    return acc;
}

static float dot_q6_K_scalar(const uint8_t *wrow, const act *a, int n) {
    const block_q6_K *w = (const block_q6_K *)wrow;
    float acc = 0;
    for (int b = 0; b < n / QK_K; b++) {
        const int8_t *x = a->q + b * QK_K;
        int isum = 0;
        for (int h = 0; h < 2; h++) {
            const uint8_t *ql = w[b].ql + 64 * h, *qh = w[b].qh + 32 * h;
            for (int k = 0; k < 4; k++) {
                int s[2] = {0, 0};
                for (int l = 0; l < 32; l++) {
                    int lo = ql[32 * (k & 1) + l], q = (k < 2 ? lo & 15 : lo >> 4) | (((qh[l] >> (2 * k)) & 3) << 4);
                    s[l / 16] += q * x[128 * h + 32 * k + l];
                }
                for (int u = 0; u < 2; u++) {
                    int sb = 8 * h + 2 * k + u; /* sub-block of 16 */
                    isum += w[b].scales[sb] * (s[u] - 32 * a->s16[16 * b + sb]);
                }
            }
        }
        acc += (float)isum * (f16_to_f32(w[b].d) * a->d[b]);
    }
    return acc;
}

typedef float (*dot_scalar_fn)(const uint8_t *, const act *, int);

static void kq_scalar_rows(uint32_t type, const uint8_t *w, size_t rb, int rows, const act *xa, int T, float *y,
                           size_t ldy, int n) {
    dot_scalar_fn dot = type == GGML_Q4_0   ? dot_q4_0_scalar
                        : type == GGML_Q4_K ? dot_q4_K_scalar
                        : type == GGML_Q5_K ? dot_q5_K_scalar
                                            : dot_q6_K_scalar;
    for (int r = 0; r < rows; r++)
        for (int t = 0; t < T; t++) y[(size_t)t * ldy + (size_t)r] = dot(w + (size_t)r * rb, &xa[t], n);
}

/* ==== AVX2 ============================================================= */

#define AVX2_ATTR __attribute__((target("avx2,fma,f16c")))
#define AVX2_INLINE AVX2_ATTR __attribute__((always_inline)) static inline

AVX2_INLINE float hsum256(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
    return _mm_cvtss_f32(lo);
}

/* The 12 packed scale bytes as eight scale bytes and eight min bytes (byte j
 * of *sc is sub-block j's scale).  General-purpose registers: on cores whose
 * vector ports are busy with the dot products these operations are free. */
static inline void k4_unpack(const uint8_t *s, uint64_t *sc, uint64_t *m) {
    uint32_t u0, u1, u2;
    memcpy(&u0, s, 4);
    memcpy(&u1, s + 4, 4);
    memcpy(&u2, s + 8, 4);
    uint32_t sc_hi = (u2 & 0x0f0f0f0fu) | ((u0 >> 2) & 0x30303030u); /* bits 6-7 of s[j-4] to 4-5 */
    uint32_t m_hi = ((u2 >> 4) & 0x0f0f0f0fu) | ((u1 >> 2) & 0x30303030u);
    *sc = (u0 & 0x3f3f3f3fu) | (uint64_t)sc_hi << 32;
    *m = (u1 & 0x3f3f3f3fu) | (uint64_t)m_hi << 32;
}

/* 32 int8 values to floats y = a * q - c (c NULL: y = a * q), products rounded
 * before the subtraction as in the scalar definition. */
AVX2_INLINE void store32(float *y, __m256i q, __m256 a, const __m256 *c) {
    __m128i h[2] = {_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1)};
    for (int i = 0; i < 4; i++) {
        __m128i part = i & 1 ? _mm_srli_si128(h[i / 2], 8) : h[i / 2];
        __m256 f = _mm256_mul_ps(a, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(part)));
        _mm256_storeu_ps(y + 8 * i, c ? _mm256_sub_ps(f, *c) : f);
    }
}

AVX2_ATTR static void dequant_kq_avx2(uint32_t type, const void *row, float *y, int n) {
    const __m256i m4 = _mm256_set1_epi8(15);
    switch (type) {
    case GGML_Q4_0: {
        const block_q4_0 *b = row;
        for (int i = 0; i < n / QK4_0; i++) {
            __m128i v = _mm_loadu_si128((const __m128i *)b[i].qs);
            __m256i q = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(v, 4), v), m4);
            store32(y + 32 * i, _mm256_sub_epi8(q, _mm256_set1_epi8(8)), _mm256_set1_ps(_cvtsh_ss(b[i].d)), NULL);
        }
        break;
    }
    case GGML_Q4_K:
    case GGML_Q5_K: {
        size_t bsz = type == GGML_Q4_K ? sizeof(block_q4_K) : sizeof(block_q5_K);
        for (int i = 0; i < n / QK_K; i++) {
            const uint8_t *blk = (const uint8_t *)row + (size_t)i * bsz;
            const block_q4_K *b4 = (const block_q4_K *)blk; /* d, dmin, scales: same offsets in both */
            const uint8_t *qs = type == GGML_Q4_K ? b4->qs : ((const block_q5_K *)blk)->qs;
            __m256i qh = type == GGML_Q5_K ? _mm256_loadu_si256((const __m256i *)((const block_q5_K *)blk)->qh)
                                           : _mm256_setzero_si256();
            float d = _cvtsh_ss(b4->d), dmin = _cvtsh_ss(b4->dmin);
            uint64_t sc8, m8;
            uint8_t sm[16];
            k4_unpack(b4->scales, &sc8, &m8);
            memcpy(sm, &sc8, 8);
            memcpy(sm + 8, &m8, 8);
            for (int g = 0; g < 4; g++) {
                __m256i v = _mm256_loadu_si256((const __m256i *)(qs + 32 * g));
                __m256i q1 = _mm256_and_si256(v, m4), q2 = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
                /* qh >> 2g: bits 0 and 1 of each byte are the fifth bits of sub-blocks 2g, 2g+1. */
                __m256i h = _mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * g));
                q1 = _mm256_or_si256(q1, _mm256_and_si256(_mm256_slli_epi16(h, 4), _mm256_set1_epi8(16)));
                q2 = _mm256_or_si256(q2, _mm256_and_si256(_mm256_slli_epi16(h, 3), _mm256_set1_epi8(16)));
                __m256 m1 = _mm256_set1_ps(dmin * (float)sm[8 + 2 * g]), m2 = _mm256_set1_ps(dmin * (float)sm[9 + 2 * g]);
                store32(y + 256 * i + 64 * g, q1, _mm256_set1_ps(d * (float)sm[2 * g]), &m1);
                store32(y + 256 * i + 64 * g + 32, q2, _mm256_set1_ps(d * (float)sm[2 * g + 1]), &m2);
            }
        }
        break;
    }
    case GGML_Q6_K: {
        const block_q6_K *b = row;
        for (int i = 0; i < n / QK_K; i++) {
            float d = _cvtsh_ss(b[i].d);
            for (int h = 0; h < 2; h++) {
                __m256i A = _mm256_loadu_si256((const __m256i *)(b[i].ql + 64 * h));
                __m256i B = _mm256_loadu_si256((const __m256i *)(b[i].ql + 64 * h + 32));
                __m256i Q = _mm256_loadu_si256((const __m256i *)(b[i].qh + 32 * h));
                const __m256i m30 = _mm256_set1_epi8(0x30);
                __m256i q[4] = {
                    _mm256_or_si256(_mm256_and_si256(A, m4), _mm256_and_si256(_mm256_slli_epi16(Q, 4), m30)),
                    _mm256_or_si256(_mm256_and_si256(B, m4), _mm256_and_si256(_mm256_slli_epi16(Q, 2), m30)),
                    _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(A, 4), m4), _mm256_and_si256(Q, m30)),
                    _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(B, 4), m4),
                                    _mm256_and_si256(_mm256_srli_epi16(Q, 2), m30)),
                };
                for (int k = 0; k < 4; k++) {
                    __m256i qs = _mm256_sub_epi8(q[k], _mm256_set1_epi8(32));
                    float *yk = y + 256 * i + 128 * h + 32 * k;
                    int sb = 8 * h + 2 * k;
                    /* Two sub-blocks of 16 with their own scales: convert each half. */
                    float tmp[32];
                    store32(tmp, qs, _mm256_set1_ps(1.0f), NULL); /* exact: |q| <= 32 */
                    for (int u = 0; u < 2; u++) {
                        __m256 s = _mm256_set1_ps(d * (float)b[i].scales[sb + u]);
                        _mm256_storeu_ps(yk + 16 * u, _mm256_mul_ps(s, _mm256_loadu_ps(tmp + 16 * u)));
                        _mm256_storeu_ps(yk + 16 * u + 8, _mm256_mul_ps(s, _mm256_loadu_ps(tmp + 16 * u + 8)));
                    }
                }
            }
        }
        break;
    }
    }
}

/* Each *_avx2_block adds block b of one weight row, against tb tokens, into
 * acc[0..tb).  The tokens are the inner loop over unpacked weights. */

/* Blocks b, b+1 (ORDER_Q4_0_X2): int32 lanes 0-3 are block b, 4-7 block b+1. */
AVX2_INLINE void q4_0_avx2_pair(const uint8_t *wrow, int b, const act *xa, int tb, __m256 *acc) {
    const block_q4_0 *w = (const block_q4_0 *)wrow + b;
    const __m256i m4 = _mm256_set1_epi8(15);
    __m256i v = _mm256_loadu2_m128i((const __m128i *)w[1].qs, (const __m128i *)w[0].qs);
    __m256i lo = _mm256_and_si256(v, m4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
    __m256 dw = _mm256_set_m128(_mm_set1_ps(_cvtsh_ss(w[1].d)), _mm_set1_ps(_cvtsh_ss(w[0].d)));
    _Pragma("GCC unroll 4") for (int t = 0; t < tb; t++) {
        const int8_t *x = xa[t].q + 32 * b;
        __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i *)x)),
                                     _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i *)(x + 32))));
        __m256i s = _mm256_madd_epi16(p, _mm256_set1_epi16(1)); /* |p| <= 7620: no overflow above */
        s = _mm256_add_epi32(s, _mm256_loadu_si256((const __m256i *)(xa[t].corr + 4 * b)));
        acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(dw, _mm256_loadu_ps(xa[t].dl + 4 * b)), acc[t]);
    }
}

/* The last block of an odd count, alone (element order). */
AVX2_INLINE void q4_0_avx2_block(const uint8_t *wrow, int b, const act *xa, int tb, __m256 *acc) {
    const block_q4_0 *w = (const block_q4_0 *)wrow + b;
    __m128i v = _mm_loadu_si128((const __m128i *)w->qs);
    __m256i q = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(v, 4), v), _mm256_set1_epi8(15));
    __m256 dw = _mm256_set1_ps(_cvtsh_ss(w->d));
    _Pragma("GCC unroll 4") for (int t = 0; t < tb; t++) {
        __m256i x = _mm256_loadu_si256((const __m256i *)(xa[t].q + 32 * b));
        __m256i s = _mm256_madd_epi16(_mm256_maddubs_epi16(q, x), _mm256_set1_epi16(1));
        s = _mm256_add_epi32(s, _mm256_zextsi128_si256(_mm_loadu_si128((const __m128i *)(xa[t].corr + 4 * b))));
        acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(dw, _mm256_set1_ps(xa[t].d[b])), acc[t]);
    }
}

/* Pairs, then the odd block. */
AVX2_INLINE void q4_0_avx2_step(const uint8_t *wrow, int step, int nb, const act *xa, int tb, __m256 *acc) {
    if (2 * step + 1 < nb) q4_0_avx2_pair(wrow, 2 * step, xa, tb, acc);
    else q4_0_avx2_block(wrow, 2 * step, xa, tb, acc);
}

/* Shuffle selecting int16 lane k of each 128-bit lane, in every lane. */
AVX2_INLINE __m256i lane16(int k) { return _mm256_set1_epi16((short)((2 * k) | ((2 * k + 1) << 8))); }

/* Q4_K (q5 false) and Q5_K: blk points at d; qh/qs at the block's arrays. */
AVX2_INLINE void k45_avx2_block(const block_q4_K *hdr, const uint8_t *qh, const uint8_t *qs, int b, const act *xa,
                                int tb, __m256 *acc) {
    uint64_t sc8, m8;
    k4_unpack(hdr->scales, &sc8, &m8);
    __m256i sc = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(_mm_cvtsi64_si128((long long)sc8)));
    __m128i mn = _mm_cvtepu8_epi16(_mm_cvtsi64_si128((long long)m8));
    const __m256i m4 = _mm256_set1_epi8(15), m16 = _mm256_set1_epi8(16);
    __m256i hbits = qh ? _mm256_loadu_si256((const __m256i *)qh) : _mm256_setzero_si256();
    __m256i isum[4];
    _Pragma("GCC unroll 4") for (int t = 0; t < tb; t++) isum[t] = _mm256_setzero_si256();
    _Pragma("GCC unroll 4") for (int g = 0; g < 4; g++) {
        __m256i v = _mm256_loadu_si256((const __m256i *)(qs + 32 * g));
        __m256i q1 = _mm256_and_si256(v, m4), q2 = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
        if (qh) {
            q1 = _mm256_or_si256(q1, _mm256_and_si256(_mm256_slli_epi16(hbits, 4), m16));
            q2 = _mm256_or_si256(q2, _mm256_and_si256(_mm256_slli_epi16(hbits, 3), m16));
            hbits = _mm256_srli_epi16(hbits, 2);
        }
        __m256i s1 = _mm256_shuffle_epi8(sc, lane16(2 * g)), s2 = _mm256_shuffle_epi8(sc, lane16(2 * g + 1));
        _Pragma("GCC unroll 4") for (int t = 0; t < tb; t++) {
            const int8_t *x = xa[t].q + QK_K * b + 64 * g;
            __m256i p1 = _mm256_maddubs_epi16(q1, _mm256_loadu_si256((const __m256i *)x));
            __m256i p2 = _mm256_maddubs_epi16(q2, _mm256_loadu_si256((const __m256i *)(x + 32)));
            isum[t] = _mm256_add_epi32(isum[t], _mm256_add_epi32(_mm256_madd_epi16(p1, s1), _mm256_madd_epi16(p2, s2)));
        }
    }
    /* Lanes 0-3: the scaled sums (times d), lanes 4-7: the mins' (times -dmin). */
    __m128 dd = _mm_cvtph_ps(_mm_cvtsi32_si128((int)(hdr->d | (uint32_t)hdr->dmin << 16)));
    __m256 dm = _mm256_set_m128(_mm_xor_ps(_mm_shuffle_ps(dd, dd, 0x55), _mm_set1_ps(-0.0f)),
                                _mm_shuffle_ps(dd, dd, 0x00));
    _Pragma("GCC unroll 4") for (int t = 0; t < tb; t++) {
        __m128i ms = _mm_madd_epi16(mn, _mm_loadu_si128((const __m128i *)(xa[t].s32 + 8 * b)));
        __m128i i4 = _mm_add_epi32(_mm256_castsi256_si128(isum[t]), _mm256_extracti128_si256(isum[t], 1));
        __m256 s = _mm256_cvtepi32_ps(_mm256_set_m128i(ms, i4));
        acc[t] = _mm256_fmadd_ps(s, _mm256_mul_ps(dm, _mm256_set1_ps(xa[t].d[b])), acc[t]);
    }
}

AVX2_INLINE void q4_K_avx2_block(const uint8_t *wrow, int b, const act *xa, int tb, __m256 *acc) {
    const block_q4_K *w = (const block_q4_K *)wrow + b;
    k45_avx2_block(w, NULL, w->qs, b, xa, tb, acc);
}

AVX2_INLINE void q5_K_avx2_block(const uint8_t *wrow, int b, const act *xa, int tb, __m256 *acc) {
    const block_q5_K *w = (const block_q5_K *)wrow + b;
    k45_avx2_block((const block_q4_K *)w, w->qh, w->qs, b, xa, tb, acc);
}

AVX2_INLINE void q6_K_avx2_block(const uint8_t *wrow, int b, const act *xa, int tb, __m256 *acc) {
    const block_q6_K *w = (const block_q6_K *)wrow + b;
    const __m256i m4 = _mm256_set1_epi8(15), m30 = _mm256_set1_epi8(0x30);
    __m256i sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)w->scales));
    __m256i isum[4];
    _Pragma("GCC unroll 4") for (int t = 0; t < tb; t++) isum[t] = _mm256_setzero_si256();
    _Pragma("GCC unroll 2") for (int h = 0; h < 2; h++) {
        __m256i A = _mm256_loadu_si256((const __m256i *)(w->ql + 64 * h));
        __m256i B = _mm256_loadu_si256((const __m256i *)(w->ql + 64 * h + 32));
        __m256i Q = _mm256_loadu_si256((const __m256i *)(w->qh + 32 * h));
        /* Scales 8h .. 8h+7 (int16) in both 128-bit lanes. */
        /* An immediate operand: clang insists on a constant. */
        __m256i sch = h ? _mm256_permute2x128_si256(sc16, sc16, 0x11) : _mm256_permute2x128_si256(sc16, sc16, 0x00);
        __m256i q[4] = {
            _mm256_or_si256(_mm256_and_si256(A, m4), _mm256_and_si256(_mm256_slli_epi16(Q, 4), m30)),
            _mm256_or_si256(_mm256_and_si256(B, m4), _mm256_and_si256(_mm256_slli_epi16(Q, 2), m30)),
            _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(A, 4), m4), _mm256_and_si256(Q, m30)),
            _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(B, 4), m4), _mm256_and_si256(_mm256_srli_epi16(Q, 2), m30)),
        };
        _Pragma("GCC unroll 4") for (int k = 0; k < 4; k++) {
            /* Low 128-bit lane: scale 2k (weights 0-15), high lane: 2k+1. */
            __m256i s = _mm256_shuffle_epi8(
                sch, _mm256_setr_m128i(_mm_set1_epi16((short)((4 * k) | ((4 * k + 1) << 8))),
                                       _mm_set1_epi16((short)((4 * k + 2) | ((4 * k + 3) << 8)))));
            _Pragma("GCC unroll 4") for (int t = 0; t < tb; t++) {
                const int8_t *x = xa[t].q + QK_K * b + 128 * h + 32 * k;
                __m256i p = _mm256_maddubs_epi16(q[k], _mm256_loadu_si256((const __m256i *)x));
                isum[t] = _mm256_add_epi32(isum[t], _mm256_madd_epi16(p, s));
            }
        }
    }
    float d = _cvtsh_ss(w->d);
    _Pragma("GCC unroll 4") for (int t = 0; t < tb; t++) {
        /* The -32 offset: 32 * sum_k sc_k * xsum16_k. */
        __m256i off = _mm256_madd_epi16(sc16, _mm256_loadu_si256((const __m256i *)(xa[t].s16 + 16 * b)));
        __m256i s = _mm256_sub_epi32(isum[t], _mm256_slli_epi32(off, 5));
        acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(d * xa[t].d[b]), acc[t]);
    }
}

/* Rows one at a time, tokens four (then one) at a time.  STEP(wrow, i, nb,
 * xa, tb, acc) adds step i of NSTEPS (a block, or Q4_0's pair). */
#define KQ_ROWS_AVX2(TY, STEP, NSTEPS)                                                                     \
    AVX2_ATTR static void TY##_avx2_rows(const uint8_t *w, size_t rb, int rows, const act *xa, int T, float *y, \
                                         size_t ldy, int nb) {                                             \
        int ns = (NSTEPS);                                                                                 \
        for (int r = 0; r < rows; r++) {                                                                   \
            const uint8_t *wr = w + (size_t)r * rb;                                                        \
            int t = 0;                                                                                     \
            for (; t + 4 <= T; t += 4) {                                                                   \
                __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),            \
                                 _mm256_setzero_ps()};                                                     \
                for (int i = 0; i < ns; i++) STEP(wr, i, nb, xa + t, 4, acc);                              \
                for (int u = 0; u < 4; u++) y[(size_t)(t + u) * ldy + (size_t)r] = hsum256(acc[u]);        \
            }                                                                                              \
            for (; t < T; t++) {                                                                           \
                __m256 acc[1] = {_mm256_setzero_ps()};                                                     \
                for (int i = 0; i < ns; i++) STEP(wr, i, nb, xa + t, 1, acc);                              \
                y[(size_t)t * ldy + (size_t)r] = hsum256(acc[0]);                                          \
            }                                                                                              \
        }                                                                                                  \
    }

#define Q4K_STEP(wr, i, nb, xa, tb, acc) q4_K_avx2_block(wr, i, xa, tb, acc)
#define Q5K_STEP(wr, i, nb, xa, tb, acc) q5_K_avx2_block(wr, i, xa, tb, acc)
#define Q6K_STEP(wr, i, nb, xa, tb, acc) q6_K_avx2_block(wr, i, xa, tb, acc)

KQ_ROWS_AVX2(q4_0, q4_0_avx2_step, (nb + 1) / 2)
KQ_ROWS_AVX2(q4_K, Q4K_STEP, nb)
KQ_ROWS_AVX2(q5_K, Q5K_STEP, nb)
KQ_ROWS_AVX2(q6_K, Q6K_STEP, nb)

/* ==== AVX-512 ========================================================== */

/* The 512-bit kernels twice: with VNNI (vpdpbusd / vpdpwssd) and with
 * AVX512BW only (vpmaddubsw + vpmaddwd + vpaddd).  The integer results are
 * the same; only the instruction count differs. */
#define KQ512_SFX vnni
#define KQ512_VNNI 1
#define KQ512_ATTR __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")))
#include "ops_kquants_512.inc"
#undef KQ512_SFX
#undef KQ512_VNNI
#undef KQ512_ATTR

#define KQ512_SFX bw
#define KQ512_VNNI 0
#define KQ512_ATTR __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
#include "ops_kquants_512.inc"
#undef KQ512_SFX
#undef KQ512_VNNI
#undef KQ512_ATTR

/* ==== Entry ============================================================ */

typedef void (*kq_rows_fn)(const uint8_t *w, size_t rb, int rows, const act *xa, int T, float *y, size_t ldy,
                           int nb);

void ops_kq_init(const char *family) {
    const cpu_features *f = cpu_get();
    if (!strcmp(family, "avx512")) fam = f->avx512vnni ? FAM_512_VNNI : FAM_512_BW;
    else if (!strcmp(family, "avx512bw")) fam = FAM_512_BW;
    else if (!strcmp(family, "avx2")) fam = FAM_AVX2;
    else fam = FAM_SCALAR;
}

void dequant_kq(uint32_t type, const void *row, float *dst, int n) {
    if (fam == FAM_SCALAR) dequant_kq_scalar(type, row, dst, n);
    else dequant_kq_avx2(type, row, dst, n);
}

/* The kernel for a type, family and width, and the activation layout it reads. */
static kq_rows_fn pick(uint32_t type, int n, int *order) {
    *order = ORDER_NATURAL;
    if (fam == FAM_512_VNNI || fam == FAM_512_BW) {
        bool vnni = fam == FAM_512_VNNI;
        switch (type) {
        case GGML_Q4_0:
            /* Groups of four blocks; other widths use AVX2 (a whole matrix
             * always uses one kernel). */
            if (n % 128) {
                *order = ORDER_Q4_0_X2;
                return q4_0_avx2_rows;
            }
            *order = ORDER_Q4_0_X4;
            return vnni ? q4_0_512_rows_vnni : q4_0_512_rows_bw;
        case GGML_Q4_K: *order = ORDER_K512; return vnni ? q4_K_512_rows_vnni : q4_K_512_rows_bw;
        case GGML_Q5_K: *order = ORDER_K512; return vnni ? q5_K_512_rows_vnni : q5_K_512_rows_bw;
        case GGML_Q6_K: return vnni ? q6_K_512_rows_vnni : q6_K_512_rows_bw;
        }
    }
    if (fam != FAM_SCALAR) {
        switch (type) {
        case GGML_Q4_0: *order = ORDER_Q4_0_X2; return q4_0_avx2_rows;
        case GGML_Q4_K: return q4_K_avx2_rows;
        case GGML_Q5_K: return q5_K_avx2_rows;
        case GGML_Q6_K: return q6_K_avx2_rows;
        }
    }
    return NULL;
}

void gemm_kq(uint32_t type, const void *w, size_t rb, int rows, const float *x, size_t ldx, int T, float *y,
             size_t ldy, int n) {
    int qb = type == GGML_Q4_0 ? QK4_0 : QK_K, order;
    kq_rows_fn fn = pick(type, n, &order);
    int8_t q[MAX_TOK][n];
    float d[MAX_TOK][n / qb];
    int16_t s16[MAX_TOK][n / 16], s32[MAX_TOK][n / 32];
    int32_t corr[MAX_TOK][qb == QK4_0 ? n / 8 : 1];
    float dl[MAX_TOK][qb == QK4_0 ? n / 8 : 1];
    act xa[MAX_TOK];
    for (int t0 = 0; t0 < T; t0 += MAX_TOK) {
        int tn = T - t0 < MAX_TOK ? T - t0 : MAX_TOK;
        for (int t = 0; t < tn; t++) {
            xa[t] = (act){q[t], d[t], s16[t], s32[t], corr[t], dl[t]};
            quant_act(x + (size_t)(t0 + t) * ldx, n, qb, order, &xa[t]);
        }
        if (fn) fn(w, rb, rows, xa, tn, y + (size_t)t0 * ldy, ldy, n / qb);
        else kq_scalar_rows(type, w, rb, rows, xa, tn, y + (size_t)t0 * ldy, ldy, n);
    }
}
