/*
 * test_ops.c - numeric kernels (engine/ops.h): f16/bf16 conversion, Q8_0
 * dequantisation against the format definition, every SIMD kernel family
 * this CPU has against the scalar reference (and all of them against double
 * precision), the batch-shape invariance of gemm, and rmsnorm / softmax /
 * silu against double-precision computations.
 */
#include <check.h>
#include <immintrin.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cpu.h"
#include "gguf.h"
#include "ops.h"

static void restore_ops(void) { ops_init(NULL); }

static uint32_t rng_state;
static float frand(void) { /* uniform in [-1, 1) */
    rng_state = rng_state * 1664525u + 1013904223u;
    return (float)(rng_state >> 8) / 8388608.0f - 1.0f;
}

static uint32_t f32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static float bits_f32(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static bool f16_is_nan(uint16_t h) { return (h & 0x7c00) == 0x7c00 && (h & 0x3ff) != 0; }

/* Kernel families to compare against scalar: those the CPU has. */
static const char *const simd_families[] = {"avx512", "avx2"};

static bool family_available(const char *fam) {
    const char *best = cpu_kernel_family();
    if (strcmp(fam, "avx512") == 0) return strcmp(best, "avx512") == 0;
    if (strcmp(fam, "avx2") == 0) return strcmp(best, "scalar") != 0;
    return true;
}

/* ==== Conversions ====================================================== */

START_TEST(test_f16_known_values) {
    static const struct {
        uint16_t h;
        float f;
    } v[] = {
        {0x0000, 0.0f},           {0x3c00, 1.0f},          {0xbc00, -1.0f},         {0x4000, 2.0f},
        {0xc000, -2.0f},          {0x3800, 0.5f},          {0x3555, 0.333251953125f}, {0x7bff, 65504.0f},
        {0xfbff, -65504.0f},      {0x0400, 6.103515625e-05f}, /* smallest normal 2^-14 */
        {0x03ff, 6.097555160522461e-05f},                  /* largest subnormal 1023 * 2^-24 */
        {0x0001, 5.960464477539063e-08f},                  /* smallest subnormal 2^-24 */
        {0x8001, -5.960464477539063e-08f}, {0x0200, 3.0517578125e-05f}, {0x5640, 100.0f},
    };
    for (size_t i = 0; i < sizeof v / sizeof v[0]; i++) {
        ck_assert_msg(f32_bits(f16_to_f32(v[i].h)) == f32_bits(v[i].f), "f16 %04x -> %.10g, expected %.10g", v[i].h,
                      f16_to_f32(v[i].h), v[i].f);
        ck_assert_msg(f32_to_f16(v[i].f) == v[i].h, "%.10g -> f16 %04x, expected %04x", v[i].f, f32_to_f16(v[i].f),
                      v[i].h);
    }
    /* Signed zero, infinities, NaN. */
    ck_assert_uint_eq(f32_bits(f16_to_f32(0x8000)), 0x80000000u);
    ck_assert_uint_eq(f32_to_f16(-0.0f), 0x8000);
    ck_assert(isinf(f16_to_f32(0x7c00)) && f16_to_f32(0x7c00) > 0);
    ck_assert(isinf(f16_to_f32(0xfc00)) && f16_to_f32(0xfc00) < 0);
    ck_assert(isnan(f16_to_f32(0x7e00)));
    ck_assert(isnan(f16_to_f32(0x7c01)));
    ck_assert(isnan(f16_to_f32(0xfe00)));
    ck_assert_uint_eq(f32_to_f16(INFINITY), 0x7c00);
    ck_assert_uint_eq(f32_to_f16(-INFINITY), 0xfc00);
    ck_assert(f16_is_nan(f32_to_f16(NAN)));
    ck_assert(f16_is_nan(f32_to_f16(bits_f32(0x7f800001u)))); /* a NaN with only low mantissa bits */
    ck_assert(f16_is_nan(f32_to_f16(-NAN)));
}
END_TEST

START_TEST(test_f16_roundtrip_all) {
    for (uint32_t h = 0; h < 65536; h++) {
        float f = f16_to_f32((uint16_t)h);
        if (f16_is_nan((uint16_t)h)) {
            ck_assert_msg(isnan(f), "f16 %04x is NaN but converts to %g", h, f);
            ck_assert(f16_is_nan(f32_to_f16(f)));
            continue;
        }
        ck_assert_msg(f32_to_f16(f) == h, "f16 %04x -> %.10g -> %04x", h, f, f32_to_f16(f));
    }
}
END_TEST

START_TEST(test_f16_round_to_nearest_even) {
    static const struct {
        float f;
        uint16_t h;
    } v[] = {
        {1.0f + 0x1p-11f, 0x3c00},           /* half an ulp above 1: tie, to even */
        {1.0f + 3 * 0x1p-11f, 0x3c02},       /* tie between 0x3c01 and 0x3c02: even */
        {1.0f + 0x1p-11f + 0x1p-20f, 0x3c01}, /* just above the tie */
        {1.0f + 0x1p-11f - 0x1p-23f, 0x3c00}, /* just below */
        {65519.0f, 0x7bff},                  /* below the tie with infinity */
        {65520.0f, 0x7c00},                  /* the tie: 0x7bff is odd, so infinity */
        {1e6f, 0x7c00},
        {-1e6f, 0xfc00},
        {0x1p-25f, 0x0000},                  /* half the smallest subnormal: tie, to even 0 */
        {-0x1p-25f, 0x8000},
        {0x1p-25f + 0x1p-40f, 0x0001},       /* above the tie */
        {3 * 0x1p-25f, 0x0002},              /* 1.5 ulp: tie, to even 2 */
        {5 * 0x1p-25f, 0x0002},              /* 2.5 ulp: tie, to even 2 */
        {7 * 0x1p-25f, 0x0004},              /* 3.5 ulp: tie, to even 4 */
        {0x1p-14f - 0x1p-25f, 0x0400},       /* tie between the largest subnormal and 2^-14 */
        {0x1p-14f - 0x1p-24f, 0x03ff},
        {1e-10f, 0x0000},
        {2049.0f, 0x6800},                   /* 2048 + 1: tie (ulp 2), to even 2048 */
        {2051.0f, 0x6802},                   /* 2050 + 1: tie, to even 2052 */
    };
    for (size_t i = 0; i < sizeof v / sizeof v[0]; i++)
        ck_assert_msg(f32_to_f16(v[i].f) == v[i].h, "%a -> %04x, expected %04x", (double)v[i].f, f32_to_f16(v[i].f),
                      v[i].h);
}
END_TEST

__attribute__((target("f16c"))) static uint16_t hw_f32_to_f16(float f) {
    return (uint16_t)_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
}

/* The hardware conversion (F16C, round to nearest even) is a second,
 * independent reference: compare over a sweep of float bit patterns. */
START_TEST(test_f16_matches_hardware) {
    if (!cpu_get()->f16c) return;
    for (uint64_t u = 0; u <= 0xffffffffu; u += 0x1003) {
        float f = bits_f32((uint32_t)u);
        uint16_t ours = f32_to_f16(f), hw = hw_f32_to_f16(f);
        if (isnan(f)) {
            ck_assert(f16_is_nan(ours));
            continue;
        }
        ck_assert_msg(ours == hw, "%a (0x%08x): ours %04x, F16C %04x", (double)f, (unsigned)u, ours, hw);
    }
}
END_TEST

START_TEST(test_bf16) {
    static const struct {
        uint16_t h;
        float f;
    } v[] = {
        {0x3f80, 1.0f}, {0xc000, -2.0f}, {0x4049, 3.140625f}, {0x0000, 0.0f}, {0x3f00, 0.5f},
        {0x7f7f, 3.3895313892515355e38f}, {0x0080, 1.1754943508222875e-38f},
        {0x0001, 9.183549615799121e-41f}, /* subnormal 2^-133 */
    };
    for (size_t i = 0; i < sizeof v / sizeof v[0]; i++)
        ck_assert_msg(f32_bits(bf16_to_f32(v[i].h)) == f32_bits(v[i].f), "bf16 %04x -> %.10g", v[i].h,
                      bf16_to_f32(v[i].h));
    ck_assert_uint_eq(f32_bits(bf16_to_f32(0x8000)), 0x80000000u);
    ck_assert(isinf(bf16_to_f32(0x7f80)) && bf16_to_f32(0x7f80) > 0);
    ck_assert(isinf(bf16_to_f32(0xff80)) && bf16_to_f32(0xff80) < 0);
    ck_assert(isnan(bf16_to_f32(0x7fc0)));
    ck_assert(isnan(bf16_to_f32(0x7f81)));
    /* bf16 is the top half of a float. */
    for (uint32_t h = 0; h < 65536; h += 7)
        if (!isnan(bf16_to_f32((uint16_t)h))) ck_assert_uint_eq(f32_bits(bf16_to_f32((uint16_t)h)), h << 16);
}
END_TEST

/* ==== Q8_0 and dequant_row ============================================= */

START_TEST(test_q8_0_dequant) {
    ck_assert_uint_eq(sizeof(block_q8_0), 34);
    ck_assert_uint_eq(ggml_block_bytes(GGML_Q8_0), sizeof(block_q8_0));
    ck_assert_uint_eq(ggml_block_elems(GGML_Q8_0), QK8_0);
    enum { NBLK = 4, N = NBLK * QK8_0 };
    block_q8_0 b[NBLK];
    const float scales[NBLK] = {0.0123f, -0.5f, 0.0f, 3.0e-5f};
    rng_state = 7;
    for (int i = 0; i < NBLK; i++) {
        b[i].d = f32_to_f16(scales[i]);
        for (int j = 0; j < QK8_0; j++) b[i].qs[j] = (int8_t)(j == 0 ? -128 : j == 1 ? 127 : (int)(frand() * 127));
    }
    /* The format definition: x = d * q, d an f16. */
    float expect[N];
    for (int i = 0; i < NBLK; i++)
        for (int j = 0; j < QK8_0; j++) expect[i * QK8_0 + j] = f16_to_f32(b[i].d) * (float)b[i].qs[j];
    ck_assert(expect[0] == f16_to_f32(b[0].d) * -128.0f);
    const char *fams[] = {"scalar", "avx2", "avx512"};
    for (size_t f = 0; f < 3; f++) {
        if (!family_available(fams[f])) continue;
        ck_assert_str_eq(ops_init(fams[f]), fams[f]);
        float out[N];
        ops.dequant_row(GGML_Q8_0, b, out, N);
        for (int i = 0; i < N; i++)
            ck_assert_msg(f32_bits(out[i]) == f32_bits(expect[i]), "%s: element %d = %g, expected %g", fams[f], i,
                          out[i], expect[i]);
    }
}
END_TEST

/* dequant_row of F32 / F16 / BF16, including lengths with SIMD tails. */
START_TEST(test_dequant_row_plain_types) {
    enum { N = 77 };
    float src[N];
    uint16_t h[N], bf[N];
    rng_state = 9;
    for (int i = 0; i < N; i++) {
        src[i] = frand() * 100.0f;
        h[i] = f32_to_f16(src[i]);
        bf[i] = (uint16_t)(f32_bits(src[i]) >> 16);
    }
    h[3] = 0x0001; /* a subnormal */
    const char *fams[] = {"scalar", "avx2", "avx512"};
    for (size_t f = 0; f < 3; f++) {
        if (!family_available(fams[f])) continue;
        ops_init(fams[f]);
        for (int n = 1; n <= N; n++) {
            float out[N];
            ops.dequant_row(GGML_F32, src, out, n);
            ck_assert_mem_eq(out, src, (size_t)n * 4);
            ops.dequant_row(GGML_F16, h, out, n);
            for (int i = 0; i < n; i++) ck_assert_uint_eq(f32_bits(out[i]), f32_bits(f16_to_f32(h[i])));
            ops.dequant_row(GGML_BF16, bf, out, n);
            for (int i = 0; i < n; i++) ck_assert_uint_eq(f32_bits(out[i]), f32_bits(bf16_to_f32(bf[i])));
        }
    }
}
END_TEST

/* ==== gemm ============================================================= */

/* A weight matrix of `rows` rows of n elements in type, rows rb bytes apart
 * (rb > the row size, to check the stride is honoured), plus its values as
 * float. */
typedef struct {
    uint8_t *data;
    size_t rb;
    float *values; /* [rows][n] */
} wbuf;

static wbuf make_weights(uint32_t type, int rows, int n) {
    wbuf w;
    w.rb = ggml_row_bytes(type, (uint64_t)n) + 8;
    w.data = calloc((size_t)rows, w.rb);
    w.values = malloc((size_t)rows * (size_t)n * sizeof(float));
    ck_assert_ptr_nonnull(w.data);
    ck_assert_ptr_nonnull(w.values);
    for (int r = 0; r < rows; r++) {
        uint8_t *row = w.data + (size_t)r * w.rb;
        float *vals = w.values + (size_t)r * (size_t)n;
        switch (type) {
        case GGML_F32:
            for (int i = 0; i < n; i++) vals[i] = frand();
            memcpy(row, vals, (size_t)n * 4);
            break;
        case GGML_F16:
            for (int i = 0; i < n; i++) {
                uint16_t h = f32_to_f16(frand());
                memcpy(row + 2 * i, &h, 2);
                vals[i] = f16_to_f32(h);
            }
            break;
        case GGML_BF16:
            for (int i = 0; i < n; i++) {
                uint16_t h = (uint16_t)(f32_bits(frand()) >> 16);
                memcpy(row + 2 * i, &h, 2);
                vals[i] = bf16_to_f32(h);
            }
            break;
        case GGML_Q8_0: {
            block_q8_0 *b = (block_q8_0 *)row;
            for (int k = 0; k < n / QK8_0; k++) {
                block_q8_0 blk;
                blk.d = f32_to_f16(0.01f + 0.02f * fabsf(frand()));
                for (int j = 0; j < QK8_0; j++) blk.qs[j] = (int8_t)(frand() * 127.0f);
                memcpy(&b[k], &blk, sizeof blk);
                for (int j = 0; j < QK8_0; j++) vals[k * QK8_0 + j] = f16_to_f32(blk.d) * (float)blk.qs[j];
            }
            break;
        }
        }
    }
    return w;
}

static void free_weights(wbuf *w) {
    free(w->data);
    free(w->values);
}

static const uint32_t gemm_types[] = {GGML_F32, GGML_F16, GGML_BF16, GGML_Q8_0};
static const int plain_ns[] = {16, 32, 48, 384, 8, 24, 40, 7, 13, 33, 1};
static const int q8_ns[] = {32, 64, 96, 160, 384};

#define LDX_PAD 5
#define LDY_PAD 3

/* y = gemm over rows x T with padded strides; returns the y buffer
 * ([T][ldy], untouched elements set to a sentinel). */
static float *run_gemm(uint32_t type, const wbuf *w, int rows, const float *x, size_t ldx, int T, int n, size_t *ldy) {
    *ldy = (size_t)rows + LDY_PAD;
    float *y = malloc((size_t)T * *ldy * sizeof(float));
    ck_assert_ptr_nonnull(y);
    for (size_t i = 0; i < (size_t)T * *ldy; i++) y[i] = -12345.0f;
    ops.gemm(type, w->data, w->rb, rows, x, ldx, T, y, *ldy, n);
    return y;
}

START_TEST(test_gemm_families_vs_scalar) {
    rng_state = 11;
    int compared = 0;
    for (size_t ti = 0; ti < 4; ti++) {
        uint32_t type = gemm_types[ti];
        const int *ns = type == GGML_Q8_0 ? q8_ns : plain_ns;
        size_t n_ns = type == GGML_Q8_0 ? sizeof q8_ns / sizeof q8_ns[0] : sizeof plain_ns / sizeof plain_ns[0];
        for (size_t ni = 0; ni < n_ns; ni++) {
            int n = ns[ni];
            wbuf w = make_weights(type, 9, n);
            size_t ldx = (size_t)n + LDX_PAD;
            float *x = malloc(9 * ldx * sizeof(float));
            for (size_t i = 0; i < 9 * ldx; i++) x[i] = frand();
            for (int rows = 1; rows <= 9; rows++)
                for (int T = 1; T <= 9; T++) {
                    size_t ldy;
                    ops_init("scalar");
                    float *ref = run_gemm(type, &w, rows, x, ldx, T, n, &ldy);
                    /* The scalar kernel against double precision. */
                    for (int t = 0; t < T; t++)
                        for (int r = 0; r < rows; r++) {
                            double d = 0, mag = 0, qerr = 0;
                            for (int k = 0; k < n; k++) {
                                double wv = w.values[(size_t)r * (size_t)n + (size_t)k];
                                double p = wv * x[(size_t)t * ldx + (size_t)k];
                                d += p;
                                mag += fabs(p);
                                if (type == GGML_Q8_0) {
                                    /* Q8_0 runs on activations quantised to int8 per
                                     * block of 32: each off by at most amax/254. */
                                    double amax = 0;
                                    for (int j = k / 32 * 32; j < k / 32 * 32 + 32; j++)
                                        amax = fmax(amax, fabs(x[(size_t)t * ldx + (size_t)j]));
                                    qerr += fabs(wv) * amax / 254.0;
                                }
                            }
                            ck_assert_msg(fabs(ref[(size_t)t * ldy + (size_t)r] - d) <= 1e-5 * mag + 1.0001 * qerr + 1e-30,
                                          "scalar %s n=%d: %g vs double %g", ggml_type_name(type), n,
                                          ref[(size_t)t * ldy + (size_t)r], d);
                        }
                    for (size_t f = 0; f < 2; f++) {
                        if (!family_available(simd_families[f])) continue;
                        ops_init(simd_families[f]);
                        size_t ldy2;
                        float *y = run_gemm(type, &w, rows, x, ldx, T, n, &ldy2);
                        for (int t = 0; t < T; t++)
                            for (int r = 0; r < (int)ldy; r++) {
                                float a = y[(size_t)t * ldy + (size_t)r], b = ref[(size_t)t * ldy + (size_t)r];
                                if (r >= rows) { /* padding: untouched */
                                    ck_assert(a == -12345.0f);
                                    continue;
                                }
                                double mag = 0;
                                for (int k = 0; k < n; k++)
                                    mag += fabs((double)w.values[(size_t)r * (size_t)n + (size_t)k] *
                                                x[(size_t)t * ldx + (size_t)k]);
                                ck_assert_msg(fabs((double)a - (double)b) <= 1e-5 * mag,
                                              "%s %s n=%d rows=%d T=%d [%d,%d]: %.9g vs scalar %.9g",
                                              simd_families[f], ggml_type_name(type), n, rows, T, t, r, a, b);
                                compared++;
                            }
                        free(y);
                    }
                    free(ref);
                }
            free(x);
            free_weights(&w);
        }
    }
    if (family_available("avx2")) ck_assert_int_gt(compared, 10000);
}
END_TEST

/* Each element of gemm has the same bits whatever the batch shape: one
 * token or seven, all rows or a subset (engine.h relies on this for batch
 * invariance of the engine's own kernels). */
START_TEST(test_gemm_batch_invariance) {
    enum { R = 13, T = 7 };
    const char *fams[] = {"scalar", "avx2", "avx512"};
    rng_state = 13;
    for (size_t f = 0; f < 3; f++) {
        if (!family_available(fams[f])) continue;
        ops_init(fams[f]);
        for (size_t ti = 0; ti < 4; ti++) {
            uint32_t type = gemm_types[ti];
            const int ns_plain[] = {64, 40, 13}, ns_q8[] = {64, 96, 32};
            for (int ni = 0; ni < 3; ni++) {
                int n = type == GGML_Q8_0 ? ns_q8[ni] : ns_plain[ni];
                wbuf w = make_weights(type, R, n);
                size_t ldx = (size_t)n + LDX_PAD, ldy;
                float *x = malloc(T * ldx * sizeof(float));
                for (size_t i = 0; i < T * ldx; i++) x[i] = frand();
                float *full = run_gemm(type, &w, R, x, ldx, T, n, &ldy);
                /* Token by token. */
                for (int t = 0; t < T; t++) {
                    size_t ld1;
                    float *one = run_gemm(type, &w, R, x + (size_t)t * ldx, ldx, 1, n, &ld1);
                    ck_assert_msg(memcmp(one, full + (size_t)t * ldy, R * sizeof(float)) == 0,
                                  "%s %s n=%d: token %d alone differs from T=%d", fams[f], ggml_type_name(type), n, t,
                                  T);
                    free(one);
                }
                /* Tokens 2..6 (T=5), and row subsets [r0, r1). */
                size_t ld5;
                float *five = run_gemm(type, &w, R, x + 2 * ldx, ldx, 5, n, &ld5);
                for (int t = 0; t < 5; t++)
                    ck_assert(memcmp(five + (size_t)t * ld5, full + (size_t)(t + 2) * ldy, R * sizeof(float)) == 0);
                free(five);
                const int subsets[][2] = {{0, 1}, {3, 12}, {5, 13}, {1, 9}, {12, 13}};
                for (int s = 0; s < 5; s++) {
                    int r0 = subsets[s][0], r1 = subsets[s][1];
                    wbuf sub = w;
                    sub.data = w.data + (size_t)r0 * w.rb;
                    size_t lds;
                    float *part = run_gemm(type, &sub, r1 - r0, x, ldx, T, n, &lds);
                    for (int t = 0; t < T; t++)
                        ck_assert_msg(memcmp(part + (size_t)t * lds, full + (size_t)t * ldy + r0,
                                             (size_t)(r1 - r0) * sizeof(float)) == 0,
                                      "%s %s n=%d: rows [%d,%d) differ from the full matrix", fams[f],
                                      ggml_type_name(type), n, r0, r1);
                    free(part);
                }
                free(full);
                free(x);
                free_weights(&w);
            }
        }
    }
}
END_TEST

/* ==== dot, axpy, f32 -> f16 rows ======================================= */

/* Attention block kernels: m cached positions `step` elements apart, f32 or
 * f16, nq query heads of one KV head, head sizes with and without a SIMD
 * tail, against double precision. */
START_TEST(test_kv_kernels) {
    enum { M = 19, STEP = 200, NQ = 11 };
    static float kf[M * STEP], q[NQ * 128], p[NQ * M];
    static uint16_t kh[M * STEP];
    rng_state = 17;
    for (int i = 0; i < M * STEP; i++) {
        kf[i] = frand() * 2.0f;
        kh[i] = f32_to_f16(frand() * 2.0f);
    }
    for (int i = 0; i < NQ * 128; i++) q[i] = frand() * 3.0f;
    for (int i = 0; i < NQ * M; i++) p[i] = frand();
    const char *fams[] = {"scalar", "avx2", "avx512"};
    const int hds[] = {8, 16, 24, 32, 64, 128, 7, 33};
    const int nqs[] = {1, 3, 11};
    for (size_t f = 0; f < 3; f++) {
        if (!family_available(fams[f])) continue;
        ops_init(fams[f]);
        for (size_t hi = 0; hi < sizeof hds / sizeof hds[0]; hi++)
            for (size_t qi = 0; qi < 3; qi++)
                for (int half = 0; half < 2; half++) {
                    int hd = hds[hi], nq = nqs[qi];
                    if (hd * nq > NQ * 128) continue;
                    const void *k = half ? (const void *)kh : (const void *)kf;
                    float out[NQ * (M + 3)], acc[NQ * 128];
                    const float scale = 0.125f;
                    ops.kv_dots(q, nq, k, STEP, M, hd, half, scale, out, M + 3);
                    for (int d = 0; d < nq * hd; d++) acc[d] = 0.5f;
                    ops.kv_accum(acc, nq, p, M, k, STEP, M, hd, half);
                    for (int j = 0; j < nq; j++) {
                        for (int i = 0; i < M; i++) {
                            double s = 0, mag = 0;
                            for (int d = 0; d < hd; d++) {
                                double kv = half ? f16_to_f32(kh[i * STEP + d]) : kf[i * STEP + d];
                                s += q[j * hd + d] * kv;
                                mag += fabs(q[j * hd + d] * kv);
                            }
                            ck_assert_msg(fabs(out[j * (M + 3) + i] - s * scale) <= 1e-5 * mag * scale + 1e-30,
                                          "%s kv_dots hd=%d nq=%d f16=%d", fams[f], hd, nq, half);
                        }
                        for (int d = 0; d < hd; d++) {
                            double s = 0.5, mag = 0.5;
                            for (int i = 0; i < M; i++) {
                                double kv = half ? f16_to_f32(kh[i * STEP + d]) : kf[i * STEP + d];
                                s += p[j * M + i] * kv;
                                mag += fabs(p[j * M + i] * kv);
                            }
                            ck_assert_msg(fabs(acc[j * hd + d] - s) <= 1e-5 * mag, "%s kv_accum hd=%d nq=%d f16=%d",
                                          fams[f], hd, nq, half);
                        }
                    }
                }
    }
}
END_TEST

/* The SIMD f32 -> f16 row conversion rounds exactly as f32_to_f16. */
START_TEST(test_f32_to_f16_row) {
    enum { N = 1000 };
    float src[N];
    rng_state = 19;
    for (int i = 0; i < N; i++) {
        switch (i % 5) {
        case 0: src[i] = frand() * 70000.0f; break;           /* incl. overflow to inf */
        case 1: src[i] = frand() * 1e-5f; break;              /* subnormal range */
        case 2: src[i] = 1.0f + (float)(i % 64) * 0x1p-11f; break; /* ties */
        case 3: src[i] = (float)(i % 7) * 0x1p-25f; break;    /* subnormal ties */
        default: src[i] = frand(); break;
        }
    }
    src[4] = INFINITY;
    src[9] = -INFINITY;
    src[14] = -0.0f;
    const char *fams[] = {"scalar", "avx2", "avx512"};
    for (size_t f = 0; f < 3; f++) {
        if (!family_available(fams[f])) continue;
        ops_init(fams[f]);
        for (int n = 1; n <= N; n = n < 50 ? n + 1 : n * 2 + 1) {
            uint16_t out[N];
            memset(out, 0xee, sizeof out);
            ops.f32_to_f16_row(out, src, n);
            for (int i = 0; i < n; i++)
                ck_assert_msg(out[i] == f32_to_f16(src[i]), "%s n=%d: %a -> %04x, expected %04x", fams[f], n,
                              (double)src[i], out[i], f32_to_f16(src[i]));
            if (n < N) ck_assert_uint_eq(out[n], 0xeeee);
        }
    }
}
END_TEST

/* ==== Elementwise ====================================================== */

START_TEST(test_rmsnorm) {
    enum { N = 384 };
    float x[N], w[N], out[N];
    rng_state = 23;
    for (int i = 0; i < N; i++) {
        x[i] = frand() * 4.0f;
        w[i] = 0.5f + frand();
    }
    const float eps = 1e-5f;
    rmsnorm(out, x, w, N, eps);
    double ss = 0;
    for (int i = 0; i < N; i++) ss += (double)x[i] * x[i];
    double scale = 1.0 / sqrt(ss / N + eps);
    for (int i = 0; i < N; i++) {
        double e = x[i] * scale * w[i];
        ck_assert_msg(fabs(out[i] - e) <= 1e-5 * fabs(e) + 1e-7, "rmsnorm[%d] %.9g vs %.9g", i, out[i], e);
    }
    /* In place, and zeros stay finite zeros. */
    float z[8] = {0}, wz[8] = {1, 1, 1, 1, 1, 1, 1, 1};
    rmsnorm(z, z, wz, 8, eps);
    for (int i = 0; i < 8; i++) ck_assert(z[i] == 0.0f);
    memcpy(z, x, sizeof z);
    rmsnorm(z, z, w, 8, eps);
    float o8[8];
    rmsnorm(o8, x, w, 8, eps);
    ck_assert_mem_eq(z, o8, sizeof z);
}
END_TEST

static void check_softmax(const float *in, int n) {
    float *x = malloc((size_t)n * sizeof(float));
    memcpy(x, in, (size_t)n * sizeof(float));
    softmax(x, n);
    double m = -INFINITY;
    for (int i = 0; i < n; i++) m = fmax(m, in[i]);
    double s = 0;
    for (int i = 0; i < n; i++) s += exp((double)in[i] - m);
    double sum = 0;
    for (int i = 0; i < n; i++) {
        double e = exp((double)in[i] - m) / s;
        ck_assert_msg(isfinite(x[i]), "softmax[%d] not finite", i);
        ck_assert_msg(fabs(x[i] - e) <= 1e-5 * e + 1e-9, "softmax n=%d [%d]: %.9g vs %.9g", n, i, x[i], e);
        if (isinf(in[i])) ck_assert(x[i] == 0.0f);
        sum += x[i];
    }
    ck_assert_double_eq_tol(sum, 1.0, 1e-5);
    free(x);
}

START_TEST(test_softmax) {
    float v[1000];
    rng_state = 29;
    for (int i = 0; i < 1000; i++) v[i] = frand() * 10.0f;
    check_softmax(v, 1);
    check_softmax(v, 7);
    check_softmax(v, 1000);
    const float big[] = {1000.0f, 999.0f, -1000.0f, 998.5f};
    check_softmax(big, 4);
    const float masked[] = {0.5f, -INFINITY, 1.5f, -INFINITY};
    check_softmax(masked, 4);
    float same[16];
    for (int i = 0; i < 16; i++) same[i] = 3.0f;
    softmax(same, 16);
    for (int i = 0; i < 16; i++) ck_assert(same[i] == 0.0625f);
}
END_TEST

START_TEST(test_silu) {
    for (int i = -400; i <= 400; i++) {
        float x = (float)i * 0.05f;
        double e = (double)x / (1.0 + exp(-(double)x));
        ck_assert_msg(fabs(silu(x) - e) <= 1e-6 * fabs(e) + 1e-12, "silu(%g) = %.9g vs %.9g", x, silu(x), e);
    }
    ck_assert(silu(0.0f) == 0.0f);
}
END_TEST

/* ==== Dispatch ========================================================= */

START_TEST(test_dispatch) {
    ck_assert(ops_type_supported(GGML_F32));
    ck_assert(ops_type_supported(GGML_F16));
    ck_assert(ops_type_supported(GGML_BF16));
    ck_assert(ops_type_supported(GGML_Q8_0));
    ck_assert(ops_type_supported(GGML_Q4_0));
    ck_assert(ops_type_supported(GGML_Q4_K));
    ck_assert(ops_type_supported(GGML_Q5_K));
    ck_assert(ops_type_supported(GGML_Q6_K));
    ck_assert(!ops_type_supported(GGML_Q4_1)); /* known to the reader, not computed */
    ck_assert(!ops_type_supported(GGML_Q2_K));
    ck_assert_str_eq(ops_init(NULL), cpu_kernel_family());
    ck_assert_str_eq(ops_init("scalar"), "scalar");
    /* Never more than the CPU has. */
    const char *best = cpu_kernel_family();
    ck_assert_str_eq(ops_init("avx512"), strcmp(best, "avx512") == 0 ? "avx512" : best);
    ck_assert_str_eq(ops_init("avx2"), strcmp(best, "scalar") == 0 ? "scalar" : "avx2");
}
END_TEST

Suite *ops_suite(void) {
    Suite *s = suite_create("ops");
    TCase *tc = tcase_create("conversion");
    tcase_add_checked_fixture(tc, NULL, restore_ops);
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_f16_known_values);
    tcase_add_test(tc, test_f16_roundtrip_all);
    tcase_add_test(tc, test_f16_round_to_nearest_even);
    tcase_add_test(tc, test_f16_matches_hardware);
    tcase_add_test(tc, test_bf16);
    tcase_add_test(tc, test_q8_0_dequant);
    tcase_add_test(tc, test_dequant_row_plain_types);
    suite_add_tcase(s, tc);

    tc = tcase_create("gemm");
    tcase_add_checked_fixture(tc, NULL, restore_ops);
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, test_gemm_families_vs_scalar);
    tcase_add_test(tc, test_gemm_batch_invariance);
    suite_add_tcase(s, tc);

    tc = tcase_create("vector");
    tcase_add_checked_fixture(tc, NULL, restore_ops);
    tcase_add_test(tc, test_kv_kernels);
    tcase_add_test(tc, test_f32_to_f16_row);
    suite_add_tcase(s, tc);

    tc = tcase_create("elementwise");
    tcase_add_test(tc, test_rmsnorm);
    tcase_add_test(tc, test_softmax);
    tcase_add_test(tc, test_silu);
    tcase_add_test(tc, test_dispatch);
    tcase_add_checked_fixture(tc, NULL, restore_ops);
    suite_add_tcase(s, tc);
    return s;
}
