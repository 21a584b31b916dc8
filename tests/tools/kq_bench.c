/*
 * kq_bench.c - single-thread ops.gemm throughput per weight type, as GB/s of
 * weight bytes read, for the decode shapes T = 1 and T = 4.
 *
 * Time is the thread's CPU time (CLOCK_THREAD_CPUTIME_ID), so other
 * processes sharing the machine do not count against a kernel (they can
 * still slow it through shared caches).  Each figure is the best of five
 * rounds of at least 0.2 s.
 *
 *   build/tools/kq_bench [family] [rows] [cols]     (default: best, 2048, 2048)
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "gguf.h"
#include "ops.h"

static uint64_t rng = 1;
static uint32_t rnd(void) {
    rng = rng * 6364136223846793005ull + 1442695040888963407ull;
    return (uint32_t)(rng >> 33);
}

static double cpu_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* Random blocks with moderate f16 scales. */
static uint8_t *make_matrix(uint32_t type, int rows, int cols, size_t *bytes) {
    size_t rb = ggml_row_bytes(type, (uint64_t)cols), bb = ggml_block_bytes(type);
    size_t nblk = (size_t)rows * rb / bb;
    uint8_t *w = aligned_alloc(64, (size_t)rows * rb + 64);
    for (size_t i = 0; i < (size_t)rows * rb; i++) w[i] = (uint8_t)rnd();
    uint16_t d = f32_to_f16(0.01f);
    for (size_t k = 0; k < nblk; k++) {
        uint8_t *b = w + k * bb;
        switch (type) {
        case GGML_Q8_0:
            for (int i = 2; i < 34; i++)
                if (b[i] == 0x80) b[i] = 0x81; /* -128 is not a Q8_0 value */
            memcpy(b, &d, 2);
            break;
        case GGML_Q6_K: memcpy(b + 208, &d, 2); break;
        case GGML_Q4_0: memcpy(b, &d, 2); break;
        default: memcpy(b, &d, 2); memcpy(b + 2, &d, 2); break; /* Q4_K, Q5_K: d, dmin */
        }
    }
    *bytes = (size_t)rows * rb;
    return w;
}

/* Best GB/s over five rounds. */
static double measure(uint32_t type, const uint8_t *w, size_t bytes, int rows, int cols, const float *x, int T,
                      float *y) {
    size_t rb = ggml_row_bytes(type, (uint64_t)cols);
    ops.gemm(type, w, rb, rows, x, (size_t)cols, T, y, (size_t)rows, cols); /* warm caches and pages */
    double best = 0;
    for (int round = 0; round < 5; round++) {
        int calls = 0;
        double t0 = cpu_now(), t;
        do {
            ops.gemm(type, w, rb, rows, x, (size_t)cols, T, y, (size_t)rows, cols);
            calls++;
        } while ((t = cpu_now() - t0) < 0.2);
        double gbs = (double)bytes * calls / t / 1e9;
        if (gbs > best) best = gbs;
    }
    return best;
}

int main(int argc, char **argv) {
    const char *fam = ops_init(argc > 1 ? argv[1] : NULL);
    int rows = argc > 2 ? atoi(argv[2]) : 2048, cols = argc > 3 ? atoi(argv[3]) : 2048;
    static const uint32_t types[] = {GGML_Q8_0, GGML_Q4_0, GGML_Q4_K, GGML_Q5_K, GGML_Q6_K};
    float *x = malloc(sizeof(float) * 4 * (size_t)cols), *y = malloc(sizeof(float) * 4 * (size_t)rows);
    for (int i = 0; i < 4 * cols; i++) x[i] = (float)((int)(rnd() % 2001) - 1000) / 1000.0f;
    printf("kernels %s, %d x %d, one thread, GB/s of weights (thread CPU time)\n", fam, rows, cols);
    printf("%-6s %11s %9s %9s %13s %13s\n", "type", "bytes/wt", "T=1", "T=4", "T=1 vs Q8_0", "T=4 vs Q8_0");
    double q8[2] = {0, 0};
    for (size_t i = 0; i < sizeof types / sizeof types[0]; i++) {
        size_t bytes;
        uint8_t *w = make_matrix(types[i], rows, cols, &bytes);
        double g1 = measure(types[i], w, bytes, rows, cols, x, 1, y);
        double g4 = measure(types[i], w, bytes, rows, cols, x, 4, y);
        if (types[i] == GGML_Q8_0) {
            q8[0] = g1;
            q8[1] = g4;
        }
        printf("%-6s %11.4f %9.2f %9.2f %12.2fx %12.2fx\n", ggml_type_name(types[i]),
               (double)bytes / ((double)rows * cols), g1, g4, g1 / q8[0], g4 / q8[1]);
        fflush(stdout);
        free(w);
    }
    free(x);
    free(y);
    return 0;
}
