/*
 * ops.h - numeric kernels: type conversion, dot products over quantised rows,
 * norms, softmax, RoPE.
 *
 * Each kernel with a SIMD form has AVX-512, AVX2 and scalar versions;
 * ops_init() picks one set from cpuid, so one binary runs on any x86-64.
 * All arithmetic is float32.  The scalar versions are the reference the
 * tests compare the SIMD ones against.
 */
#ifndef SASERVE_OPS_H
#define SASERVE_OPS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Q8_0: 32 weights sharing one f16 scale (GGUF format definition). */
#define QK8_0 32
typedef struct {
    uint16_t d;
    int8_t qs[QK8_0];
} block_q8_0;

/* Q4_0 and the K-quants, byte for byte as the GGUF format definition (ggml)
 * lays them out; the element order inside a block is spelled out in
 * ops_kquants.c.  Sizes: 18, 144, 176 and 210 bytes. */
#define QK4_0 32
typedef struct {
    uint16_t d;              /* f16 scale */
    uint8_t qs[QK4_0 / 2];   /* element j: low nibble of qs[j], j+16: high nibble */
} block_q4_0;

#define QK_K 256
#define K_SCALE_SIZE 12
typedef struct {
    uint16_t d, dmin;                /* f16 super-block scales */
    uint8_t scales[K_SCALE_SIZE];    /* 8 six-bit scales and 8 six-bit mins */
    uint8_t qs[QK_K / 2];            /* nibbles */
} block_q4_K;
typedef struct {
    uint16_t d, dmin;
    uint8_t scales[K_SCALE_SIZE];
    uint8_t qh[QK_K / 8];            /* fifth bits */
    uint8_t qs[QK_K / 2];            /* low four bits */
} block_q5_K;
typedef struct {
    uint8_t ql[QK_K / 2];            /* low four bits */
    uint8_t qh[QK_K / 4];            /* high two bits */
    int8_t scales[QK_K / 16];        /* one per 16 weights */
    uint16_t d;                      /* f16 super-block scale */
} block_q6_K;

float f16_to_f32(uint16_t h);
uint16_t f32_to_f16(float f); /* round to nearest even */
float bf16_to_f32(uint16_t h);

typedef struct {
    /* y[t * ldy + r] = W[r] . x[t * ldx .. + n] for r < rows, t < T; rows of W
     * are rb bytes apart.  Each element's sum runs over k in the same order
     * whatever rows and T are, so results do not depend on batch shape. */
    void (*gemm)(uint32_t type, const void *w, size_t rb, int rows, const float *x, size_t ldx, int T, float *y,
                 size_t ldy, int n);
    /* dst[0..n) = row as float32. */
    void (*dequant_row)(uint32_t type, const void *row, float *dst, int n);
    void (*f32_to_f16_row)(uint16_t *dst, const float *src, int n);
    /* Attention over m cached positions `step` elements apart (f16 or f32),
     * for nq query heads that share one KV head (stored one after another,
     * hd apart): out[j*ostride + i] = scale * q_j . k_i, and
     * out_j += sum_i p[j*pstride + i] v_i. */
    void (*kv_dots)(const float *q, int nq, const void *k, size_t step, int m, int hd, bool f16, float scale,
                    float *out, size_t ostride);
    void (*kv_accum)(float *out, int nq, const float *p, size_t pstride, const void *v, size_t step, int m, int hd,
                     bool f16);
} ops_table;

extern ops_table ops;

/* Selects kernels for this CPU; family is "avx512", "avx2", "scalar" or NULL
 * for the best available.  Returns the family chosen. */
const char *ops_init(const char *family);

/* Q8_0 weights times activations quantised to 8 bits per block of 32
 * (ops_q8.c); what ops.gemm uses for Q8_0.  ops_q8_init picks the kernel. */
void ops_q8_init(const char *family);
void gemm_q8_0(const void *w, size_t rb, int rows, const float *x, size_t ldx, int T, float *y, size_t ldy, int n);

/* Q4_0, Q4_K, Q5_K, Q6_K (ops_kquants.c).  ops_kq_init picks the kernels of
 * a family (ops_init calls it; "avx512bw" after ops_init("avx512") forces
 * the kernels for AVX-512 CPUs without VNNI, so tests can run them on any
 * AVX-512 CPU); ops_kq_type says whether a type is one of these.  dequant_kq is
 * bit-exact with the format definition in every family; gemm_kq quantises
 * the activations to int8 and takes integer dot products, with the same
 * batch-invariance guarantee as ops.gemm. */
void ops_kq_init(const char *family);
bool ops_kq_type(uint32_t type);
void dequant_kq(uint32_t type, const void *row, float *dst, int n);
void gemm_kq(uint32_t type, const void *w, size_t rb, int rows, const float *x, size_t ldx, int T, float *y,
             size_t ldy, int n);

/* True when gemm/dequant_row handle this tensor type. */
int ops_type_supported(uint32_t type);

void rmsnorm(float *out, const float *x, const float *w, int n, float eps);
/* In place; returns nothing, max-subtracted, float32 like torch.softmax. */
void softmax(float *x, int n);
float silu(float x);

#endif
