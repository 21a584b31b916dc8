/*
 * test_perplexity.c - `saserve perplexity` and `saserve calibrate`, run as
 * the built binary (saserve_bin()) and checked through their --json output:
 *
 *   reference  sa-tiny f16 on validation.bin, 324 windows of 512 tokens,
 *              shared layers none and 5-7, against span_perplexity.json
 *              (within 0.5%); the two runs go in parallel, one thread each
 *   similarity calibrate's similarity matrix over 64 windows of 256 tokens
 *              against layer_similarity.json (within 0.01 per entry)
 *   calibrate  a small end-to-end calibration: candidates, the choice within
 *              the limit, its perplexity equal to `perplexity`'s, the SVG
 *   text       --file: one BOS + the text; tokens scored = whole windows
 *   errors     usage errors (exit 2) and runtime errors (exit 1)
 *
 * Cases skip when ../shared (SASERVE_SHARED) is absent.  The reference case
 * takes minutes on a small machine; it is tagged "slow".
 */
#include <check.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "engine.h"
#include "testutil.h"

#define MODEL "models/sa-tiny/model-f16.gguf"
#define VAL_BIN "models/sa-tiny/data/validation.bin"
#define VAL_TXT "models/sa-tiny/data/validation.txt"

/* ---- running the binary ------------------------------------------------ */

typedef struct {
    FILE *pipe;
    char errpath[64];
} child;

/* Starts `saserve ARGS` with stdout to a pipe and stderr to a temporary
 * file. */
static void child_start(child *c, const char *args) {
    snprintf(c->errpath, sizeof c->errpath, "/tmp/saserve-ppl-XXXXXX");
    int fd = mkstemp(c->errpath);
    ck_assert_int_ge(fd, 0);
    close(fd);
    char cmd[4096];
    snprintf(cmd, sizeof cmd, "'%s' %s 2>'%s'", saserve_bin(), args, c->errpath);
    c->pipe = popen(cmd, "r");
    ck_assert_msg(c->pipe != NULL, "cannot run %s", cmd);
}

/* Waits for the child: its exit status, stdout in *out and stderr in *err
 * (both malloc'd, NUL-terminated). */
static int child_finish(child *c, char **out, char **err) {
    size_t cap = 4096, n = 0;
    char *buf = malloc(cap);
    ck_assert_ptr_nonnull(buf);
    size_t got;
    while ((got = fread(buf + n, 1, cap - n - 1, c->pipe)) > 0) {
        n += got;
        if (cap - n < 2) {
            cap *= 2;
            buf = realloc(buf, cap);
            ck_assert_ptr_nonnull(buf);
        }
    }
    buf[n] = 0;
    int st = pclose(c->pipe);
    *out = buf;
    *err = read_file(c->errpath, NULL);
    if (!*err) *err = strdup("");
    unlink(c->errpath);
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128;
}

static int run(const char *args, char **out, char **err) {
    child c;
    child_start(&c, args);
    return child_finish(&c, out, err);
}

/* The last 600 bytes of a log, for failure messages. */
static const char *tail(const char *s) {
    size_t n = strlen(s);
    return n > 600 ? s + n - 600 : s;
}

static json_t *parse(const char *out, const char *err) {
    json_error_t je;
    json_t *j = json_loads(out, 0, &je);
    ck_assert_msg(j != NULL, "output is not JSON (%s): %.300s\nstderr: %s", je.text, out, tail(err));
    return j;
}

static double num(const json_t *o, const char *key) {
    json_t *v = json_object_get(o, key);
    ck_assert_msg(json_is_number(v), "key '%s' missing or not a number", key);
    return json_number_value(v);
}

/* ppl of one variant in span_perplexity.json. */
static double reference_ppl(const char *variant) {
    char path[512];
    snprintf(path, sizeof path, "%s/models/sa-tiny/reference/span_perplexity.json", shared_dir());
    json_error_t je;
    json_t *ref = json_load_file(path, 0, &je);
    ck_assert_msg(ref != NULL, "cannot read %s: %s", path, je.text);
    double v = num(json_object_get(json_object_get(ref, "results"), variant), "ppl");
    json_decref(ref);
    return v;
}

/* ---- reference ----------------------------------------------------------- */

START_TEST(test_reference_ppl) {
    char model[512], bin[512];
    if (!shared_path(model, sizeof model, MODEL, "reference_ppl") ||
        !shared_path(bin, sizeof bin, VAL_BIN, "reference_ppl"))
        return;
    static const char *variants[2] = {"none", "5-7"};
    child c[2];
    /* One thread each, both at once: on a small machine this beats one
     * run after the other with two threads each. */
    for (int i = 0; i < 2; i++) {
        char args[2048];
        snprintf(args, sizeof args, "perplexity -t 1 --model '%s' --tokens '%s' --ctx 512 --shared-layers %s --json",
                 model, bin, variants[i]);
        child_start(&c[i], args);
    }
    for (int i = 0; i < 2; i++) {
        char *out, *err;
        int rc = child_finish(&c[i], &out, &err);
        ck_assert_msg(rc == 0, "perplexity %s exited %d: %s", variants[i], rc, tail(err));
        json_t *j = parse(out, err);
        double ppl = num(j, "ppl"), want = reference_ppl(variants[i]);
        ck_assert_msg(fabs(ppl / want - 1) < 0.005, "%s: ppl %.4f, reference %.4f", variants[i], ppl, want);
        ck_assert_int_eq((long)num(j, "tokens"), 324L * 512);
        ck_assert_int_eq((long)num(j, "windows"), 324);
        ck_assert_double_eq_tol(num(j, "nll_mean"), log(ppl), 1e-9);
        ck_assert_str_eq(json_string_value(json_object_get(j, "shared_layers")), variants[i]);
        /* 12 layers of K and V (2 KV heads x 64, f16); 5-7 drops 3 K planes. */
        long kv = (long)num(j, "kv_bytes_per_token");
        ck_assert_int_eq(kv, i == 0 ? 6144 : 6144 - 3 * 256);
        ck_assert_double_eq_tol(num(j, "kv_saving_ratio"), i == 0 ? 0.0 : 3.0 / 24, 1e-9);
        fprintf(stderr, "reference_ppl: %s ppl %.4f (reference %.4f) in %.1f s\n", variants[i], ppl, want,
                num(j, "seconds"));
        json_decref(j);
        free(out);
        free(err);
    }
}
END_TEST

/* ---- similarity ------------------------------------------------------------ */

START_TEST(test_similarity) {
    char model[512], bin[512], refpath[512];
    if (!shared_path(model, sizeof model, MODEL, "similarity") ||
        !shared_path(bin, sizeof bin, VAL_BIN, "similarity") ||
        !shared_path(refpath, sizeof refpath, "models/sa-tiny/reference/layer_similarity.json", "similarity"))
        return;
    char args[2048], *out, *err;
    snprintf(args, sizeof args,
             "calibrate --model '%s' --tokens '%s' --ctx 256 --max-seqs 64 --similarity-only --json", model, bin);
    int rc = run(args, &out, &err);
    ck_assert_msg(rc == 0, "calibrate exited %d: %s", rc, tail(err));
    json_t *j = parse(out, err);
    json_error_t je;
    json_t *ref = json_load_file(refpath, 0, &je);
    ck_assert_ptr_nonnull(ref);
    ck_assert_int_eq((long)num(j, "tokens"), 16384);
    json_t *S = json_object_get(j, "similarity"), *R = json_object_get(ref, "mean");
    json_t *SH = json_object_get(j, "similarity_per_head"), *RH = json_object_get(ref, "per_head");
    ck_assert_int_eq(json_array_size(S), 12);
    ck_assert_int_eq(json_array_size(SH), 6);
    double worst = 0, worst_head = 0;
    for (size_t a = 0; a < 12; a++)
        for (size_t b = 0; b < 12; b++) {
            double got = json_number_value(json_array_get(json_array_get(S, a), b));
            double want = json_number_value(json_array_get(json_array_get(R, a), b));
            ck_assert_msg(fabs(got - want) <= 0.01, "S[%zu][%zu] = %.5f, reference %.5f", a, b, got, want);
            if (fabs(got - want) > worst) worst = fabs(got - want);
            for (size_t h = 0; h < 6; h++) {
                double gh = json_number_value(json_array_get(json_array_get(json_array_get(SH, h), a), b));
                double wh = json_number_value(json_array_get(json_array_get(json_array_get(RH, h), a), b));
                ck_assert_msg(fabs(gh - wh) <= 0.01, "head %zu S[%zu][%zu] = %.5f, reference %.5f", h, a, b, gh, wh);
                if (fabs(gh - wh) > worst_head) worst_head = fabs(gh - wh);
            }
        }
    /* Similarity only: no candidates, no choice. */
    ck_assert_int_eq(json_array_size(json_object_get(j, "candidates")), 0);
    ck_assert(json_is_null(json_object_get(j, "choice")));
    fprintf(stderr, "similarity: max abs error %.2g (per head %.2g)\n", worst, worst_head);
    json_decref(ref);
    json_decref(j);
    free(out);
    free(err);
}
END_TEST

/* ---- calibrate end to end ------------------------------------------------- */

START_TEST(test_calibrate_small) {
    char model[512], bin[512];
    if (!shared_path(model, sizeof model, MODEL, "calibrate_small") ||
        !shared_path(bin, sizeof bin, VAL_BIN, "calibrate_small"))
        return;
    char svg[64] = "/tmp/saserve-cal-XXXXXX";
    int fd = mkstemp(svg);
    ck_assert_int_ge(fd, 0);
    close(fd);
    char args[2048], *out, *err;
    snprintf(args, sizeof args,
             "calibrate --model '%s' --tokens '%s' --ctx 64 --max-seqs 4 --max-span 2 --max-ppl-increase 5%% "
             "--svg %s --json",
             model, bin, svg);
    int rc = run(args, &out, &err);
    ck_assert_msg(rc == 0, "calibrate exited %d: %s", rc, tail(err));
    json_t *j = parse(out, err);
    /* Runs of 1 and 2 layers among layers 1..11. */
    json_t *cands = json_object_get(j, "candidates");
    ck_assert_int_eq(json_array_size(cands), 11 + 10);
    double base = num(json_object_get(j, "baseline"), "ppl");
    ck_assert_double_eq_tol(num(j, "max_ppl_increase"), 0.05, 1e-12);
    json_t *choice = json_object_get(j, "choice");
    ck_assert(json_is_object(choice));
    const char *chosen = json_string_value(json_object_get(choice, "shared_layers"));
    ck_assert_ptr_nonnull(chosen);
    double ppl = num(choice, "ppl");
    ck_assert_msg(ppl <= base * 1.05 + 1e-9, "choice %s: ppl %.4f over the limit (baseline %.4f)", chosen, ppl, base);
    /* Largest: no candidate within the limit shares more layers. */
    long n_chosen = (long)num(choice, "n_shared");
    for (size_t i = 0; i < json_array_size(cands); i++) {
        json_t *c = json_array_get(cands, i);
        if (json_is_true(json_object_get(c, "within_limit"))) ck_assert_int_le((long)num(c, "n_shared"), n_chosen);
    }
    /* The choice's perplexity is a measurement of exactly that setting. */
    if (strcmp(chosen, "none") != 0) {
        char *out2, *err2;
        snprintf(args, sizeof args,
                 "perplexity --model '%s' --tokens '%s' --ctx 64 --max-windows 4 --shared-layers %s --json", model,
                 bin, chosen);
        rc = run(args, &out2, &err2);
        ck_assert_msg(rc == 0, "perplexity exited %d: %s", rc, tail(err2));
        json_t *p = parse(out2, err2);
        ck_assert_double_eq_tol(num(p, "ppl"), ppl, 1e-4 * ppl);
        ck_assert_double_eq_tol(num(p, "kv_saving_ratio"), num(choice, "kv_saving_ratio"), 1e-9);
        json_decref(p);
        free(out2);
        free(err2);
    }
    /* The SVG is well-formed enough to be read back: one root, closed. */
    char *s = read_file(svg, NULL);
    ck_assert_ptr_nonnull(s);
    ck_assert(strstr(s, "<svg ") != NULL);
    ck_assert(strstr(s, "</svg>\n") != NULL);
    ck_assert(strstr(s, "linearGradient") != NULL);
    if (strcmp(chosen, "none") != 0) ck_assert(strstr(s, "id=\"shared\"") != NULL);
    free(s);
    unlink(svg);
    json_decref(j);
    free(out);
    free(err);
}
END_TEST

/* ---- text input ----------------------------------------------------------- */

START_TEST(test_text_file) {
    char model[512], txt[512];
    if (!shared_path(model, sizeof model, MODEL, "text_file") || !shared_path(txt, sizeof txt, VAL_TXT, "text_file"))
        return;
    /* The first 8 KB of the validation text, cut at a line end. */
    size_t len;
    char *all = read_file(txt, &len);
    ck_assert_ptr_nonnull(all);
    size_t n = len < 8192 ? len : 8192;
    while (n > 0 && all[n - 1] != '\n') n--;
    ck_assert_uint_gt(n, 1000);
    char path[64] = "/tmp/saserve-text-XXXXXX";
    int fd = mkstemp(path);
    ck_assert_int_ge(fd, 0);
    ck_assert_int_eq(write(fd, all, n), (ssize_t)n);
    close(fd);

    /* The expected count: the same tokenizer, one BOS. */
    engine_params p = engine_default_params();
    p.model_path = model;
    p.max_seqs = 1;
    p.n_ctx = 16;
    p.max_batch_tokens = 16;
    engine *e;
    char errbuf[256];
    ck_assert_int_eq(engine_open(&p, &e, errbuf, sizeof errbuf), 0);
    int32_t *ids = malloc((n + 16) * sizeof *ids);
    int n_ids = engine_tokenize(e, all, n, true, ids, (int)n + 16);
    ck_assert_int_gt(n_ids, 300);
    ck_assert_int_eq(ids[0], engine_get_info(e)->bos);
    engine_close(e);
    free(ids);
    free(all);

    char args[2048], *out, *err;
    snprintf(args, sizeof args, "perplexity --model '%s' --file %s --ctx 128 --json", model, path);
    int rc = run(args, &out, &err);
    unlink(path);
    ck_assert_msg(rc == 0, "perplexity exited %d: %s", rc, tail(err));
    json_t *j = parse(out, err);
    ck_assert_int_eq((long)num(j, "tokens"), (long)((n_ids - 1) / 128) * 128);
    double ppl = num(j, "ppl");
    ck_assert_msg(isfinite(ppl) && ppl > 1 && ppl < 200, "ppl %.3f", ppl);
    ck_assert_str_eq(json_string_value(json_object_get(j, "shared_layers")), "none");
    json_decref(j);
    free(out);
    free(err);
}
END_TEST

/* ---- errors ---------------------------------------------------------------- */

/* Runs ARGS and expects exit status want and a stderr mentioning needle. */
static void expect_fail(const char *args, int want, const char *needle) {
    char *out, *err;
    int rc = run(args, &out, &err);
    ck_assert_msg(rc == want, "`%s` exited %d, want %d; stderr: %s", args, rc, want, tail(err));
    ck_assert_msg(strstr(err, needle) != NULL, "`%s`: stderr lacks '%s': %s", args, needle, tail(err));
    ck_assert_str_eq(out, "");
    free(out);
    free(err);
}

static void write_bytes(char *path, size_t cap, const unsigned char *b, size_t n) {
    snprintf(path, cap, "/tmp/saserve-tok-XXXXXX");
    int fd = mkstemp(path);
    ck_assert_int_ge(fd, 0);
    ck_assert_int_eq(write(fd, b, n), (ssize_t)n);
    close(fd);
}

START_TEST(test_errors) {
    char model[512], bin[512], args[2048];
    if (!shared_path(model, sizeof model, MODEL, "errors") || !shared_path(bin, sizeof bin, VAL_BIN, "errors"))
        return;
    /* Usage: exit 2. */
    expect_fail("perplexity --tokens x.bin", 2, "--model");
    snprintf(args, sizeof args, "perplexity --model '%s'", model);
    expect_fail(args, 2, "--file or --tokens");
    snprintf(args, sizeof args, "perplexity --model '%s' --file a --tokens b", model);
    expect_fail(args, 2, "exactly one");
    snprintf(args, sizeof args, "perplexity --model '%s' --tokens '%s' --ctx 0", model, bin);
    expect_fail(args, 2, "--ctx");
    snprintf(args, sizeof args, "perplexity --model '%s' --tokens '%s' --ctx abc", model, bin);
    expect_fail(args, 2, "--ctx");
    snprintf(args, sizeof args, "perplexity --model '%s' --tokens '%s' --ctx 4096", model, bin);
    expect_fail(args, 2, "exceeds the model's context");
    snprintf(args, sizeof args, "perplexity --model '%s' --tokens '%s' --bogus", model, bin);
    expect_fail(args, 2, "unknown option");
    snprintf(args, sizeof args, "perplexity --model '%s' --tokens '%s' --shared-layers 0-3", model, bin);
    expect_fail(args, 2, "layer 0");
    snprintf(args, sizeof args, "calibrate --model '%s' --tokens '%s' --max-ppl-increase much", model, bin);
    expect_fail(args, 2, "--max-ppl-increase");
    snprintf(args, sizeof args, "calibrate --model '%s' --tokens '%s' --shared-layers 5-7", model, bin);
    expect_fail(args, 2, "--shared-layers");

    /* Runtime: exit 1. */
    snprintf(args, sizeof args, "perplexity --model '%s' --tokens /nonexistent/val.bin", model);
    expect_fail(args, 1, "/nonexistent/val.bin");
    snprintf(args, sizeof args, "perplexity --model '%s' --file /nonexistent/val.txt", model);
    expect_fail(args, 1, "/nonexistent/val.txt");
    snprintf(args, sizeof args, "calibrate --model '%s' --tokens /nonexistent/val.bin", model);
    expect_fail(args, 1, "/nonexistent/val.bin");
    expect_fail("perplexity --model /nonexistent/m.gguf --tokens x.bin", 1, "/nonexistent/m.gguf");

    char path[64];
    const unsigned char odd[3] = {1, 0, 7};
    write_bytes(path, sizeof path, odd, sizeof odd);
    snprintf(args, sizeof args, "perplexity --model '%s' --tokens %s", model, path);
    expect_fail(args, 1, "odd");
    unlink(path);

    const unsigned char big[8] = {1, 0, 100, 0, 0x00, 0x20, 5, 0}; /* id 8192 = the vocabulary size */
    write_bytes(path, sizeof path, big, sizeof big);
    snprintf(args, sizeof args, "perplexity --model '%s' --tokens %s --ctx 2", model, path);
    expect_fail(args, 1, "8192");
    unlink(path);

    const unsigned char few[8] = {1, 0, 100, 0, 200, 0, 5, 0}; /* 4 tokens: no window of 4 */
    write_bytes(path, sizeof path, few, sizeof few);
    snprintf(args, sizeof args, "perplexity --model '%s' --tokens %s --ctx 4", model, path);
    expect_fail(args, 1, "needs 5");
    /* ... but one window of 3 fits, scoring 3 tokens. */
    char *out, *err;
    snprintf(args, sizeof args, "perplexity --model '%s' --tokens %s --ctx 3 --json", model, path);
    int rc = run(args, &out, &err);
    ck_assert_msg(rc == 0, "exited %d: %s", rc, tail(err));
    json_t *j = parse(out, err);
    ck_assert_int_eq((long)num(j, "tokens"), 3);
    json_decref(j);
    free(out);
    free(err);
    unlink(path);
}
END_TEST

Suite *perplexity_suite(void) {
    Suite *s = suite_create("perplexity");
    /* Generous limits: the reference case is two full passes over the
     * validation stream, and sanitizer builds run several times slower. */
    TCase *tc = tcase_create("reference");
    tcase_set_tags(tc, "slow"); /* CK_EXCLUDE_TAGS=slow leaves it out */
    tcase_set_timeout(tc, 1800);
    tcase_add_test(tc, test_reference_ppl);
    suite_add_tcase(s, tc);
    tc = tcase_create("similarity");
    tcase_set_timeout(tc, 900);
    tcase_add_test(tc, test_similarity);
    suite_add_tcase(s, tc);
    tc = tcase_create("calibrate");
    tcase_set_timeout(tc, 900);
    tcase_add_test(tc, test_calibrate_small);
    suite_add_tcase(s, tc);
    tc = tcase_create("text");
    tcase_set_timeout(tc, 300);
    tcase_add_test(tc, test_text_file);
    suite_add_tcase(s, tc);
    tc = tcase_create("errors");
    tcase_set_timeout(tc, 300);
    tcase_add_test(tc, test_errors);
    suite_add_tcase(s, tc);
    return s;
}
