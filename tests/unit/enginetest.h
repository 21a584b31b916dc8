/*
 * enginetest.h - helpers shared by the engine suites: the reference fixtures
 * (tests/fixtures, parsed with jansson), engines opened with quiet logging,
 * and small numeric helpers.
 *
 * The fixtures are copies of the sa-tiny / sa-tiny-sa reference outputs
 * (see tests/fixtures/README.md).  They live in the repository, so a missing
 * fixture is a failure, not a skip; the models they describe live in
 * ../shared and tests skip when those are absent.
 */
#ifndef SASERVE_ENGINETEST_H
#define SASERVE_ENGINETEST_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "engine.h"

/* The model bundled in the repository (sa-tiny-sa, q8_0, shared layers 4-11). */
#define BUNDLED_MODEL "models/sa-tiny-sa-q8_0.gguf"

/* Parses tests/fixtures/<name> (SASERVE_FIXTURES overrides the directory);
 * aborts the test when it is missing or malformed. */
json_t *fixture_json(const char *name);

/* A JSON array of integers / numbers as a malloc'd C array; aborts the test
 * on a type mismatch.  *n receives the length. */
int32_t *json_ids(const json_t *arr, int *n);
float *json_floats(const json_t *arr, int *n);
/* Member key of obj, which must exist (aborts otherwise). */
json_t *json_need(const json_t *obj, const char *key);

/* Engine logging: INFO lines are dropped so test output stays readable;
 * warnings and errors still go to stderr.  Call before engine_open. */
void quiet_engine_log(void);

/* Threads for test engines: SASERVE_TEST_THREADS, else 1.  The engine's
 * workers and OpenBLAS's spin while they wait, which on a small, shared
 * machine costs far more than a second thread gains; tests that are about
 * threading ask for 2 themselves. */
int test_threads(void);

/* Opens path with the given overrides (engine_default_params() otherwise,
 * with max_seqs 8, n_ctx 512 and test_threads() threads).  Aborts the test on failure. */
engine *open_engine_cfg(const char *path, const char *shared_layers, engine_kv_type kv, bool blas_prompt);
engine *open_engine_params(const engine_params *p);

/* Lowest index of the maximum (ties go to the lowest id, as in the sampler
 * and torch.argmax). */
int argmax_f(const float *v, int n);
/* -log softmax(logits)[target], computed in double. */
double nll_of(const float *logits, int n, int target);

#endif
