/*
 * cpu.h - what the processor can do, and the OpenBLAS core check.
 */
#ifndef SASERVE_CPU_H
#define SASERVE_CPU_H

#include <stdbool.h>

typedef struct {
    bool avx2, fma, f16c;
    bool avx512f, avx512bw, avx512vl, avx512dq, avx512vnni, avx512bf16;
    bool amx;
} cpu_features;

/* Read once (cpuid + xgetbv: the OS must also save the wide registers). */
const cpu_features *cpu_get(void);
/* "avx512", "avx2" or "scalar": the kernel family the engine uses. */
const char *cpu_kernel_family(void);

/* OpenBLAS picks its kernels when the library loads, by CPU model.  Releases
 * older than the CPU fall back to a generic core (Debian 12's 0.3.21 picks
 * "Prescott" on some current Xeons, at a fifth of the sgemm speed).  Given the
 * core name OpenBLAS reports, returns the OPENBLAS_CORETYPE the CPU supports,
 * or NULL when the reported core is already right. */
const char *cpu_blas_better_core(const char *reported, const cpu_features *f);

/* Called first thing in main(): when OpenBLAS runs a fallback core and the
 * user has not set OPENBLAS_CORETYPE, sets it and re-executes the program
 * (OpenBLAS reads it only at load time).  When the user did set it to a weak
 * core, or re-exec is not possible, logs a warning naming the fix.  Set
 * SASERVE_BLAS_FIX=0 to skip.  Returns only if no re-exec happened. */
void cpu_fix_blas_core(int argc, char **argv);

/* The core OpenBLAS is using now. */
const char *cpu_blas_core(void);

#endif
