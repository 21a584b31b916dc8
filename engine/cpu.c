/*
 * cpu.c - feature detection and the OpenBLAS core fix.  See cpu.h.
 */
#include "cpu.h"

#include <cblas.h>
#include <cpuid.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "log.h"

static cpu_features features;
static bool features_read;

static unsigned long long xgetbv0(void) {
    unsigned lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((unsigned long long)hi << 32) | lo;
}

const cpu_features *cpu_get(void) {
    if (features_read) return &features;
    unsigned a, b, c, d;
    cpu_features f = {0};
    if (__get_cpuid(1, &a, &b, &c, &d)) {
        bool osxsave = c & (1u << 27);
        f.fma = c & (1u << 12);
        f.f16c = c & (1u << 29);
        unsigned long long xcr0 = osxsave ? xgetbv0() : 0;
        bool ymm = (xcr0 & 0x6) == 0x6;
        bool zmm = (xcr0 & 0xe6) == 0xe6;
        if (!ymm) f.fma = f.f16c = false;
        if (__get_cpuid_count(7, 0, &a, &b, &c, &d)) {
            f.avx2 = ymm && (b & (1u << 5));
            f.avx512f = zmm && (b & (1u << 16));
            f.avx512dq = zmm && (b & (1u << 17));
            f.avx512bw = zmm && (b & (1u << 30));
            f.avx512vl = zmm && (b & (1u << 31));
            f.avx512vnni = zmm && (c & (1u << 11));
            f.amx = (d & (1u << 24)) != 0;
            if (__get_cpuid_count(7, 1, &a, &b, &c, &d)) f.avx512bf16 = zmm && (a & (1u << 5));
        }
    }
    features = f;
    features_read = true;
    return &features;
}

const char *cpu_kernel_family(void) {
    const cpu_features *f = cpu_get();
    if (f->avx512f && f->avx512bw && f->avx512vl && f->avx512dq && f->f16c && f->fma) return "avx512";
    if (f->avx2 && f->fma && f->f16c) return "avx2";
    return "scalar";
}

/* Cores OpenBLAS falls back to when it does not know the CPU model. */
static const char *const weak_cores[] = {"Prescott", "Core2", "Penryn", "Dunnington", "Nehalem",
                                         "Atom", "Sandybridge", "Barcelona", "Opteron", "Opteron_SSE3"};

const char *cpu_blas_better_core(const char *reported, const cpu_features *f) {
    if (!reported) return NULL;
    bool weak = false;
    for (size_t i = 0; i < sizeof weak_cores / sizeof weak_cores[0]; i++)
        if (strcasecmp(reported, weak_cores[i]) == 0) weak = true;
    bool avx512 = f->avx512f && f->avx512bw && f->avx512vl && f->avx512dq;
    if (!weak) {
        /* Haswell kernels on an AVX-512 machine leave half the width unused. */
        if (avx512 && strcasecmp(reported, "Haswell") == 0) return "SkylakeX";
        return NULL;
    }
    if (avx512) return "SkylakeX";
    if (f->avx2 && f->fma) return "Haswell";
    if (strcasecmp(reported, "Sandybridge") != 0 && f->f16c) return "Sandybridge";
    return NULL;
}

const char *cpu_blas_core(void) { return openblas_get_corename(); }

void cpu_fix_blas_core(int argc, char **argv) {
    (void)argc;
    const char *off = getenv("SASERVE_BLAS_FIX");
    if (off && strcmp(off, "0") == 0) return;
    /* SASERVE_TEST_BLAS_CORE pretends OpenBLAS reported that core, so the
     * re-exec path can be exercised on machines OpenBLAS does recognise. */
    const char *pretend = getenv("SASERVE_TEST_BLAS_CORE");
    const char *reported = pretend ? pretend : openblas_get_corename();
    const char *better = cpu_blas_better_core(reported, cpu_get());
    const char *user = getenv("OPENBLAS_CORETYPE");
    const char *fixed = getenv("SASERVE_BLAS_FIXED");
    if (fixed) {
        ELOG_INFO("OpenBLAS: core set to %s (it had picked %s for this CPU)", openblas_get_corename(), fixed);
        unsetenv("SASERVE_BLAS_FIXED");
        return;
    }
    if (!better) return;
    if (user && !pretend) {
        ELOG_WARN("OpenBLAS runs its %s kernels because OPENBLAS_CORETYPE=%s; this CPU supports %s "
                  "(unset it or set OPENBLAS_CORETYPE=%s for several times faster prompt processing)",
                  reported, user, better, better);
        return;
    }
    setenv("OPENBLAS_CORETYPE", better, 1);
    setenv("SASERVE_BLAS_FIXED", reported, 1);
    unsetenv("SASERVE_TEST_BLAS_CORE");
    execv("/proc/self/exe", argv);
    /* Still here: exec failed (no /proc?).  The library is already loaded
     * with the weak core, so say how to fix it by hand. */
    unsetenv("OPENBLAS_CORETYPE");
    unsetenv("SASERVE_BLAS_FIXED");
    ELOG_WARN("OpenBLAS picked its generic %s kernels for this CPU (sgemm several times slower); "
              "start saserve with OPENBLAS_CORETYPE=%s to fix this", reported, better);
}
