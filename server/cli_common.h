/*
 * cli_common.h - argument handling shared by the one-shot tools (run,
 * perplexity, calibrate, bench).
 */
#ifndef SASERVE_CLI_COMMON_H
#define SASERVE_CLI_COMMON_H

#include <stdbool.h>
#include <stdint.h>

#include "engine.h"

/* If argv[*i] is an engine flag (--model/-m, --shared-layers, --threads/-t,
 * --ctx-size/-c, --kv-type, --kernels, --no-blas), consumes it (and its
 * value) into p and returns 1; returns 0 if it is not one, -1 on a bad value
 * (message printed). */
int cli_engine_flag(int argc, char **argv, int *i, engine_params *p, const char *prog);

/* Value of a flag that takes one: argv[++*i], or NULL (message printed). */
const char *cli_value(int argc, char **argv, int *i, const char *prog);
/* Strict number parsing with range checks; false (message printed) on error. */
bool cli_int(const char *s, long lo, long hi, long *out, const char *flag, const char *prog);
bool cli_double(const char *s, double lo, double hi, double *out, const char *flag, const char *prog);

/* Help text for the engine flags. */
extern const char cli_engine_help[];

/* Opens the engine, printing the reason on failure. */
engine *cli_open_engine(const engine_params *p, const char *prog);

/* Seconds since an arbitrary start (CLOCK_MONOTONIC). */
double cli_now(void);

#endif
