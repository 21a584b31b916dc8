/*
 * enginetest.c - see enginetest.h.
 */
#include "enginetest.h"

#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

json_t *fixture_json(const char *name) {
    const char *dir = getenv("SASERVE_FIXTURES");
    char path[512];
    snprintf(path, sizeof path, "%s/%s", dir ? dir : "tests/fixtures", name);
    json_error_t jerr;
    json_t *j = json_load_file(path, 0, &jerr);
    if (!j) ck_abort_msg("fixture %s: %s (line %d); run the tests from the repository root", path, jerr.text,
                         jerr.line);
    return j;
}

json_t *json_need(const json_t *obj, const char *key) {
    json_t *v = json_object_get(obj, key);
    if (!v) ck_abort_msg("fixture: member '%s' missing", key);
    return v;
}

int32_t *json_ids(const json_t *arr, int *n) {
    ck_assert_msg(json_is_array(arr), "fixture: expected an array of ids");
    size_t len = json_array_size(arr);
    int32_t *out = malloc((len ? len : 1) * sizeof *out);
    ck_assert_ptr_nonnull(out);
    for (size_t i = 0; i < len; i++) {
        json_t *v = json_array_get(arr, i);
        ck_assert_msg(json_is_integer(v), "fixture: id %zu is not an integer", i);
        out[i] = (int32_t)json_integer_value(v);
    }
    *n = (int)len;
    return out;
}

float *json_floats(const json_t *arr, int *n) {
    ck_assert_msg(json_is_array(arr), "fixture: expected an array of numbers");
    size_t len = json_array_size(arr);
    float *out = malloc((len ? len : 1) * sizeof *out);
    ck_assert_ptr_nonnull(out);
    for (size_t i = 0; i < len; i++) {
        json_t *v = json_array_get(arr, i);
        ck_assert_msg(json_is_number(v), "fixture: value %zu is not a number", i);
        out[i] = (float)json_number_value(v);
    }
    *n = (int)len;
    return out;
}

static void quiet_sink(engine_log_level level, const char *msg, void *ud) {
    (void)ud;
    if (level >= ENGINE_LOG_WARN) fprintf(stderr, "saserve(engine): %s\n", msg);
}

void quiet_engine_log(void) { engine_set_log(quiet_sink, NULL); }

engine *open_engine_params(const engine_params *p) {
    quiet_engine_log();
    engine *e = NULL;
    char err[512] = "";
    int rc = engine_open(p, &e, err, sizeof err);
    if (rc != 0) ck_abort_msg("engine_open(%s): %s (%s)", p->model_path, err, engine_strerror(rc));
    return e;
}

int test_threads(void) {
    const char *v = getenv("SASERVE_TEST_THREADS");
    int n = v ? atoi(v) : 0;
    return n > 0 ? n : 1;
}

engine *open_engine_cfg(const char *path, const char *shared_layers, engine_kv_type kv, bool blas_prompt) {
    engine_params p = engine_default_params();
    p.model_path = path;
    p.shared_layers = shared_layers;
    p.kv_type = kv;
    p.blas_prompt = blas_prompt;
    p.max_seqs = 8;
    p.n_ctx = 512;
    p.n_threads = test_threads();
    return open_engine_params(&p);
}

int argmax_f(const float *v, int n) {
    int best = 0;
    for (int i = 1; i < n; i++)
        if (v[i] > v[best]) best = i;
    return best;
}

double nll_of(const float *logits, int n, int target) {
    double m = logits[0];
    for (int i = 1; i < n; i++)
        if (logits[i] > m) m = logits[i];
    double s = 0;
    for (int i = 0; i < n; i++) s += exp((double)logits[i] - m);
    return m + log(s) - (double)logits[target];
}
