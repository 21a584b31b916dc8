/*
 * cli_common.c - see cli_common.h.
 */
#include "cli_common.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

const char cli_engine_help[] =
    "  -m, --model FILE         GGUF model (required)\n"
    "  --shared-layers LIST     layers that share attention, e.g. 4-11 or 5-7,9-11;\n"
    "                           'none' turns sharing off (default: the model's own setting)\n"
    "  -t, --threads N          threads (default: one per CPU)\n"
    "  -c, --ctx-size N         context length (default: the model's)\n"
    "  --kv-type f16|f32        KV cache element type (default f16)\n"
    "  --kernels NAME           avx512, avx2 or scalar (default: best for this CPU)\n"
    "  --no-blas                prompt processing without OpenBLAS\n";

const char *cli_value(int argc, char **argv, int *i, const char *prog) {
    if (*i + 1 >= argc) {
        fprintf(stderr, "%s: %s needs a value\n", prog, argv[*i]);
        return NULL;
    }
    return argv[++*i];
}

bool cli_int(const char *s, long lo, long hi, long *out, const char *flag, const char *prog) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < lo || v > hi) {
        fprintf(stderr, "%s: %s must be an integer in [%ld, %ld], got '%s'\n", prog, flag, lo, hi, s);
        return false;
    }
    *out = v;
    return true;
}

bool cli_double(const char *s, double lo, double hi, double *out, const char *flag, const char *prog) {
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end || !isfinite(v) || v < lo || v > hi) {
        fprintf(stderr, "%s: %s must be a number in [%g, %g], got '%s'\n", prog, flag, lo, hi, s);
        return false;
    }
    *out = v;
    return true;
}

int cli_engine_flag(int argc, char **argv, int *i, engine_params *p, const char *prog) {
    const char *a = argv[*i], *v;
    long n;
    if (!strcmp(a, "-m") || !strcmp(a, "--model")) {
        if (!(v = cli_value(argc, argv, i, prog))) return -1;
        p->model_path = v;
    } else if (!strcmp(a, "--shared-layers")) {
        if (!(v = cli_value(argc, argv, i, prog))) return -1;
        p->shared_layers = v;
    } else if (!strcmp(a, "-t") || !strcmp(a, "--threads")) {
        if (!(v = cli_value(argc, argv, i, prog)) || !cli_int(v, 0, 1024, &n, a, prog)) return -1;
        p->n_threads = (int)n;
    } else if (!strcmp(a, "-c") || !strcmp(a, "--ctx-size")) {
        if (!(v = cli_value(argc, argv, i, prog)) || !cli_int(v, 0, 1 << 24, &n, a, prog)) return -1;
        p->n_ctx = (int)n;
    } else if (!strcmp(a, "--kv-type")) {
        if (!(v = cli_value(argc, argv, i, prog))) return -1;
        if (!strcmp(v, "f16")) p->kv_type = ENGINE_KV_F16;
        else if (!strcmp(v, "f32")) p->kv_type = ENGINE_KV_F32;
        else {
            fprintf(stderr, "%s: --kv-type must be f16 or f32, got '%s'\n", prog, v);
            return -1;
        }
    } else if (!strcmp(a, "--kernels")) {
        if (!(v = cli_value(argc, argv, i, prog))) return -1;
        if (strcmp(v, "avx512") && strcmp(v, "avx2") && strcmp(v, "scalar")) {
            fprintf(stderr, "%s: --kernels must be avx512, avx2 or scalar, got '%s'\n", prog, v);
            return -1;
        }
        p->kernels = v;
    } else if (!strcmp(a, "--no-blas")) {
        p->blas_prompt = false;
    } else {
        return 0;
    }
    return 1;
}

engine *cli_open_engine(const engine_params *p, const char *prog) {
    if (!p->model_path) {
        fprintf(stderr, "%s: --model is required\n", prog);
        return NULL;
    }
    engine *e;
    char err[512];
    int rc = engine_open(p, &e, err, sizeof err);
    if (rc) {
        fprintf(stderr, "%s: %s\n", prog, err);
        return NULL;
    }
    return e;
}

double cli_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}
