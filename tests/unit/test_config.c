/*
 * test_config.c - the config registry: defaults, the JSON file, the
 * environment, the command line, their precedence, the error messages, and
 * the generated documentation (README table, example file).
 *
 * Each test runs in its own process (Check forks), so the environment a test
 * sets never reaches another; the fixture first removes every SASERVE_*
 * variable the registry reads, so the developer's own settings cannot leak in.
 */
#include <check.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "config.h"
#include "testutil.h"

#define N_KEYS 30
#define ERRLEN 512

extern char **environ;

/* ---- helpers ------------------------------------------------------------ */

/* Removes SASERVE_CONFIG and every registry variable (all SASERVE_* except the
 * test harness's own SASERVE_BIN and SASERVE_SHARED). */
static void clean_env(void) {
    char *names[256];
    int n = 0;
    for (char **e = environ; *e && n < 256; e++) {
        if (strncmp(*e, "SASERVE_", 8) != 0) continue;
        if (!strncmp(*e, "SASERVE_BIN=", 12) || !strncmp(*e, "SASERVE_SHARED=", 15)) continue;
        names[n++] = strndup(*e, strcspn(*e, "="));
    }
    for (int i = 0; i < n; i++) {
        unsetenv(names[i]);
        free(names[i]);
    }
}

static int argc_of(char **argv) {
    int n = 0;
    while (argv[n]) n++;
    return n;
}

/* argv for config_load, with "serve" as argv[0]. */
#define ARGV(...) ((char *[]){"serve", __VA_ARGS__, NULL})
#define NO_ARGS ((char *[]){"serve", NULL})

static int load(saserve_config *c, char **argv, char *err) {
    return config_load(c, argc_of(argv), argv, NULL, NULL, err, ERRLEN);
}

/* Writes text to a new file under /tmp; path receives its name. */
static void write_tmp(char *path, size_t cap, const char *text) {
    snprintf(path, cap, "/tmp/saserve-config-XXXXXX");
    int fd = mkstemp(path);
    ck_assert_int_ge(fd, 0);
    size_t len = strlen(text);
    ck_assert_int_eq(write(fd, text, len), (ssize_t)len);
    close(fd);
}

/* Loads with a config file of the given text (via --config) plus argv. */
static int load_with_file(saserve_config *c, const char *json, char *err) {
    char path[64];
    write_tmp(path, sizeof path, json);
    char **argv = ARGV("--config", path);
    int rc = load(c, argv, err);
    unlink(path);
    return rc;
}

/* Expects config_load to fail with a message containing every given part. */
static void expect_error(int rc, saserve_config *c, const char *err, const char *const *parts) {
    ck_assert_msg(rc == -1, "expected an error, got success");
    for (; *parts; parts++) ck_assert_msg(strstr(err, *parts), "error '%s' lacks '%s'", err, *parts);
    config_free(c); /* harmless after a failure */
}
#define EXPECT_ERROR(rc, c, err, ...) expect_error(rc, c, err, (const char *const[]){__VA_ARGS__, NULL})

/* Output of one of the print functions, as a heap string. */
static char *capture(void (*print)(FILE *)) {
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    ck_assert_ptr_nonnull(f);
    print(f);
    fclose(f);
    return buf;
}

static json_t *print_json_parsed(const saserve_config *c) {
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    config_print_json(c, f);
    fclose(f);
    json_error_t jerr;
    json_t *root = json_loads(buf, 0, &jerr);
    ck_assert_msg(root != NULL, "print_json is not JSON: %s", jerr.text);
    free(buf);
    return root;
}

static const char *src(const saserve_config *c, const char *key) {
    int s = config_key_source(c, key);
    ck_assert_int_ge(s, 0);
    return config_source_name((config_source)s);
}

/* ---- defaults ----------------------------------------------------------- */

static void check_defaults(const saserve_config *c) {
    ck_assert_str_eq(c->model, "");
    ck_assert_str_eq(c->model_alias, "");
    ck_assert_str_eq(c->shared_layers, "");
    ck_assert_str_eq(c->chat_template, "");
    ck_assert_int_eq(c->ctx_size, 0);
    ck_assert_str_eq(c->host, "127.0.0.1");
    ck_assert_int_eq(c->port, 8080);
    ck_assert_int_eq(c->threads, 0);
    ck_assert_int_eq(c->kv_cache_bytes, 0);
    ck_assert_str_eq(c->kv_type, "f16");
    ck_assert_int_eq(c->kv_block_tokens, 16);
    ck_assert(c->prefix_cache);
    ck_assert_int_eq(c->max_batch_tokens, 512);
    ck_assert_int_eq(c->max_running, 16);
    ck_assert_int_eq(c->max_queue, 64);
    ck_assert_double_eq(c->request_timeout, 600);
    ck_assert_double_eq(c->shutdown_grace, 30);
    ck_assert_int_eq(c->max_body_bytes, 1 << 20);
    ck_assert_int_eq(c->max_tokens_limit, 0);
    ck_assert_int_eq(c->max_n, 16);
    ck_assert_int_eq(c->default_max_tokens, 16);
    ck_assert_double_eq(c->default_temperature, 1.0);
    ck_assert_double_eq(c->default_top_p, 1.0);
    ck_assert_str_eq(c->api_key, "");
    ck_assert_str_eq(c->api_key_file, "");
    ck_assert(!c->auth_health);
    ck_assert_str_eq(c->cors_origins, "");
    ck_assert_str_eq(c->log_level, "info");
    ck_assert_str_eq(c->log_format, "text");
    ck_assert(c->metrics);
    for (int i = 0; i < N_KEYS; i++) ck_assert_int_eq(c->source[i], CFG_SRC_DEFAULT);
}

START_TEST(test_defaults_load) {
    saserve_config c;
    char err[ERRLEN] = "untouched";
    ck_assert_int_eq(load(&c, NO_ARGS, err), 0);
    ck_assert_str_eq(err, "");
    check_defaults(&c);
    config_free(&c);
}
END_TEST

START_TEST(test_defaults_function) {
    saserve_config c;
    char err[ERRLEN];
    /* The environment is ignored by config_defaults(). */
    setenv("SASERVE_PORT", "1", 1);
    ck_assert_int_eq(config_defaults(&c, err, sizeof err), 0);
    check_defaults(&c);
    config_free(&c);
    config_free(&c); /* idempotent: pointers are cleared */
}
END_TEST

START_TEST(test_defaults_argc_zero) {
    saserve_config c;
    char err[ERRLEN];
    ck_assert_int_eq(config_load(&c, 0, NULL, NULL, NULL, err, sizeof err), 0);
    check_defaults(&c);
    config_free(&c);
}
END_TEST

/* ---- file --------------------------------------------------------------- */

START_TEST(test_file_values) {
    saserve_config c;
    char err[ERRLEN];
    int rc = load_with_file(&c,
                            "{\"model\": \"m.gguf\", \"port\": 9001, \"kv_cache_bytes\": \"2G\",\n"
                            " \"max_body_bytes\": 4096, \"request_timeout\": 5, \"default_top_p\": 0.5,\n"
                            " \"prefix_cache\": false, \"kv_type\": \"f32\", \"log_format\": \"json\"}\n",
                            err);
    ck_assert_msg(rc == 0, "%s", err);
    ck_assert_str_eq(c.model, "m.gguf");
    ck_assert_int_eq(c.port, 9001);
    ck_assert_int_eq(c.kv_cache_bytes, (int64_t)2 << 30);
    ck_assert_int_eq(c.max_body_bytes, 4096);
    ck_assert_double_eq(c.request_timeout, 5);
    ck_assert_double_eq(c.default_top_p, 0.5);
    ck_assert(!c.prefix_cache);
    ck_assert_str_eq(c.kv_type, "f32");
    ck_assert_str_eq(c.log_format, "json");
    ck_assert_str_eq(src(&c, "port"), "file");
    ck_assert_str_eq(src(&c, "kv_cache_bytes"), "file");
    ck_assert_str_eq(src(&c, "host"), "default");
    config_free(&c);
}
END_TEST

START_TEST(test_file_from_env) {
    saserve_config c;
    char err[ERRLEN], path[64];
    write_tmp(path, sizeof path, "{\"max_n\": 3}");
    setenv("SASERVE_CONFIG", path, 1);
    int rc = load(&c, NO_ARGS, err);
    unlink(path);
    ck_assert_msg(rc == 0, "%s", err);
    ck_assert_int_eq(c.max_n, 3);
    ck_assert_str_eq(src(&c, "max_n"), "file");
    config_free(&c);
}
END_TEST

START_TEST(test_file_cli_beats_env) {
    /* --config on the command line wins over SASERVE_CONFIG. */
    saserve_config c;
    char err[ERRLEN], env_path[64], cli_path[64];
    write_tmp(env_path, sizeof env_path, "{\"max_n\": 3}");
    write_tmp(cli_path, sizeof cli_path, "{\"max_n\": 4}");
    setenv("SASERVE_CONFIG", env_path, 1);
    char opt[80];
    snprintf(opt, sizeof opt, "--config=%s", cli_path);
    int rc = load(&c, ARGV(opt), err);
    unlink(env_path);
    unlink(cli_path);
    ck_assert_msg(rc == 0, "%s", err);
    ck_assert_int_eq(c.max_n, 4);
    config_free(&c);
}
END_TEST

START_TEST(test_file_empty_object) {
    saserve_config c;
    char err[ERRLEN];
    ck_assert_int_eq(load_with_file(&c, "{}", err), 0);
    check_defaults(&c);
    config_free(&c);
}
END_TEST

START_TEST(test_file_example_loads) {
    /* The shipped example is a valid config file that sets every key to its
     * default. */
    saserve_config c;
    char err[ERRLEN];
    int rc = load(&c, ARGV("--config", "config/saserve.example.json"), err);
    ck_assert_msg(rc == 0, "%s", err);
    for (int i = 0; i < N_KEYS; i++) ck_assert_int_eq(c.source[i], CFG_SRC_FILE);
    for (int i = 0; i < N_KEYS; i++) c.source[i] = CFG_SRC_DEFAULT;
    check_defaults(&c);
    config_free(&c);
}
END_TEST

/* ---- environment -------------------------------------------------------- */

START_TEST(test_env_values) {
    saserve_config c;
    char err[ERRLEN];
    setenv("SASERVE_PORT", "9000", 1);
    setenv("SASERVE_KV_CACHE_BYTES", "512M", 1);
    setenv("SASERVE_PREFIX_CACHE", "false", 1);
    setenv("SASERVE_AUTH_HEALTH", "1", 1);
    setenv("SASERVE_DEFAULT_TOP_P", "0.9", 1);
    setenv("SASERVE_LOG_LEVEL", "debug", 1);
    setenv("SASERVE_HOST", "0.0.0.0", 1);
    setenv("SASERVE_CORS_ORIGINS", "", 1); /* set but empty counts as set */
    int rc = load(&c, NO_ARGS, err);
    ck_assert_msg(rc == 0, "%s", err);
    ck_assert_int_eq(c.port, 9000);
    ck_assert_int_eq(c.kv_cache_bytes, (int64_t)512 << 20);
    ck_assert(!c.prefix_cache);
    ck_assert(c.auth_health);
    ck_assert_double_eq_tol(c.default_top_p, 0.9, 1e-12);
    ck_assert_str_eq(c.log_level, "debug");
    ck_assert_str_eq(c.host, "0.0.0.0");
    ck_assert_str_eq(c.cors_origins, "");
    ck_assert_str_eq(src(&c, "port"), "env");
    ck_assert_str_eq(src(&c, "cors_origins"), "env");
    ck_assert_str_eq(src(&c, "threads"), "default");
    config_free(&c);
}
END_TEST

/* Every key's variable is SASERVE_ + the key in upper case, and every default
 * survives a round trip through the environment's text form. */
START_TEST(test_env_every_key) {
    char *example = capture(config_print_example);
    json_t *root = json_loads(example, 0, NULL);
    ck_assert_ptr_nonnull(root);
    ck_assert_int_eq(json_object_size(root), N_KEYS);
    const char *key;
    json_t *v;
    json_object_foreach(root, key, v) {
        char name[128], text[128];
        snprintf(name, sizeof name, "SASERVE_");
        for (size_t i = 0; key[i]; i++) name[8 + i] = (char)(key[i] >= 'a' && key[i] <= 'z' ? key[i] - 32 : key[i]);
        name[8 + strlen(key)] = 0;
        if (json_is_string(v)) snprintf(text, sizeof text, "%s", json_string_value(v));
        else if (json_is_integer(v)) snprintf(text, sizeof text, "%lld", (long long)json_integer_value(v));
        else if (json_is_real(v)) snprintf(text, sizeof text, "%.17g", json_real_value(v));
        else snprintf(text, sizeof text, "%s", json_is_true(v) ? "true" : "false");
        setenv(name, text, 1);
        saserve_config c;
        char err[ERRLEN];
        int rc = load(&c, NO_ARGS, err);
        ck_assert_msg(rc == 0, "%s=%s: %s", name, text, err);
        ck_assert_msg(!strcmp(src(&c, key), "env"), "%s does not set '%s'", name, key);
        config_free(&c);
        unsetenv(name);
    }
    json_decref(root);
    free(example);
}
END_TEST

/* ---- command line ------------------------------------------------------- */

START_TEST(test_cli_values) {
    saserve_config c;
    char err[ERRLEN];
    int rc = load(&c,
                  ARGV("--model", "a.gguf", "--port=9002", "--max-batch-tokens", "1024", "--kv-type=f32",
                       "--shared-layers", "5-7,9-11", "--request-timeout", "2.5", "--max-body-bytes", "64K",
                       "--no-prefix-cache", "--auth-health", "--metrics=false", "--api-key", "sk-1"),
                  err);
    ck_assert_msg(rc == 0, "%s", err);
    ck_assert_str_eq(c.model, "a.gguf");
    ck_assert_int_eq(c.port, 9002);
    ck_assert_int_eq(c.max_batch_tokens, 1024);
    ck_assert_str_eq(c.kv_type, "f32");
    ck_assert_str_eq(c.shared_layers, "5-7,9-11");
    ck_assert_double_eq(c.request_timeout, 2.5);
    ck_assert_int_eq(c.max_body_bytes, 64 << 10);
    ck_assert(!c.prefix_cache);
    ck_assert(c.auth_health);
    ck_assert(!c.metrics);
    ck_assert_str_eq(c.api_key, "sk-1");
    ck_assert_str_eq(src(&c, "port"), "cli");
    ck_assert_str_eq(src(&c, "prefix_cache"), "cli");
    ck_assert_str_eq(src(&c, "host"), "default");
    config_free(&c);
}
END_TEST

START_TEST(test_cli_last_wins) {
    saserve_config c;
    char err[ERRLEN];
    int rc = load(&c, ARGV("--host", "a", "--host=b", "--no-metrics", "--metrics", "--prefix-cache=no",
                           "--prefix-cache"),
                  err);
    ck_assert_msg(rc == 0, "%s", err);
    ck_assert_str_eq(c.host, "b");
    ck_assert(c.metrics);
    ck_assert(c.prefix_cache);
    config_free(&c);
}
END_TEST

START_TEST(test_cli_empty_string_value) {
    /* "--model-alias=" and "--model-alias ''" set an empty string. */
    saserve_config c;
    char err[ERRLEN];
    ck_assert_int_eq(load(&c, ARGV("--model-alias=x", "--model-alias="), err), 0);
    ck_assert_str_eq(c.model_alias, "");
    ck_assert_str_eq(src(&c, "model_alias"), "cli");
    config_free(&c);
}
END_TEST

/* ---- precedence --------------------------------------------------------- */

START_TEST(test_precedence) {
    saserve_config c;
    char err[ERRLEN], path[64];
    write_tmp(path, sizeof path, "{\"port\": 1, \"host\": \"file\", \"max_n\": 2, \"metrics\": false}");
    setenv("SASERVE_PORT", "2", 1);
    setenv("SASERVE_HOST", "env", 1);
    setenv("SASERVE_METRICS", "true", 1);
    /* --config after the flags: the file is still applied first. */
    int rc = load(&c, ARGV("--port", "3", "--no-metrics", "--config", path), err);
    unlink(path);
    ck_assert_msg(rc == 0, "%s", err);
    ck_assert_int_eq(c.port, 3);
    ck_assert_str_eq(src(&c, "port"), "cli");
    ck_assert_str_eq(c.host, "env");
    ck_assert_str_eq(src(&c, "host"), "env");
    ck_assert_int_eq(c.max_n, 2);
    ck_assert_str_eq(src(&c, "max_n"), "file");
    ck_assert(!c.metrics);
    ck_assert_str_eq(src(&c, "metrics"), "cli");
    ck_assert_int_eq(c.threads, 0);
    ck_assert_str_eq(src(&c, "threads"), "default");
    ck_assert_int_eq(config_key_source(&c, "no_such_key"), -1);
    config_free(&c);
}
END_TEST

START_TEST(test_precedence_errors_in_overridden_sources) {
    /* A bad value is an error even when a later source would override it. */
    saserve_config c;
    char err[ERRLEN];
    setenv("SASERVE_PORT", "abc", 1);
    EXPECT_ERROR(load(&c, ARGV("--port", "1"), err), &c, err, "SASERVE_PORT=abc");
}
END_TEST

/* ---- errors ------------------------------------------------------------- */

START_TEST(test_error_unknown_key) {
    saserve_config c;
    char err[ERRLEN];
    EXPECT_ERROR(load_with_file(&c, "{\"prot\": 1}", err), &c, err, "config file /tmp/saserve-config-",
                 "unknown key 'prot'", "did you mean 'port'");
    EXPECT_ERROR(load_with_file(&c, "{\"zzzzzzzzzz\": 1}", err), &c, err, "unknown key 'zzzzzzzzzz'");
    ck_assert_ptr_null(strstr(err, "did you mean"));
}
END_TEST

START_TEST(test_error_wrong_type) {
    saserve_config c;
    char err[ERRLEN];
    EXPECT_ERROR(load_with_file(&c, "{\"port\": \"8080\"}", err), &c, err,
                 "key 'port' must be an integer, got \"8080\"");
    EXPECT_ERROR(load_with_file(&c, "{\"port\": 80.5}", err), &c, err, "key 'port' must be an integer");
    EXPECT_ERROR(load_with_file(&c, "{\"metrics\": 1}", err), &c, err, "key 'metrics' must be true or false");
    EXPECT_ERROR(load_with_file(&c, "{\"host\": null}", err), &c, err, "key 'host' must be a string, got null");
    EXPECT_ERROR(load_with_file(&c, "{\"default_top_p\": \"0.5\"}", err), &c, err,
                 "key 'default_top_p' must be a number");
    EXPECT_ERROR(load_with_file(&c, "{\"max_body_bytes\": 1.5}", err), &c, err,
                 "key 'max_body_bytes' must be an integer or a size string");
}
END_TEST

START_TEST(test_error_out_of_range) {
    saserve_config c;
    char err[ERRLEN];
    EXPECT_ERROR(load_with_file(&c, "{\"port\": 70000}", err), &c, err, "config file /tmp/saserve-config-",
                 "key 'port' = 70000 is out of range [0, 65535]");
    EXPECT_ERROR(load_with_file(&c, "{\"max_body_bytes\": \"2G\"}", err), &c, err,
                 "key 'max_body_bytes' = \"2G\" is out of range [1K, 1G]");
    EXPECT_ERROR(load_with_file(&c, "{\"default_temperature\": 2.5}", err), &c, err,
                 "out of range [0, 2]");
    setenv("SASERVE_MAX_N", "0", 1);
    EXPECT_ERROR(load(&c, NO_ARGS, err), &c, err, "SASERVE_MAX_N=0: out of range [1, 128]");
    unsetenv("SASERVE_MAX_N");
    EXPECT_ERROR(load(&c, ARGV("--default-top-p", "1.5"), err), &c, err,
                 "--default-top-p=1.5: out of range [0, 1]");
    EXPECT_ERROR(load(&c, ARGV("--port=-1"), err), &c, err, "--port=-1: out of range [0, 65535]");
    /* Beyond int: must not wrap around into range. */
    EXPECT_ERROR(load(&c, ARGV("--port=4294975376"), err), &c, err, "out of range");
    EXPECT_ERROR(load(&c, ARGV("--port=99999999999999999999"), err), &c, err, "not an integer");
}
END_TEST

START_TEST(test_error_bad_enum) {
    saserve_config c;
    char err[ERRLEN];
    EXPECT_ERROR(load_with_file(&c, "{\"kv_type\": \"q4_0\"}", err), &c, err,
                 "key 'kv_type' = \"q4_0\" is not one of f16, f32");
    EXPECT_ERROR(load(&c, ARGV("--log-level", "verbose"), err), &c, err,
                 "--log-level=verbose: not one of debug, info, warn, error");
    setenv("SASERVE_LOG_FORMAT", "xml", 1);
    EXPECT_ERROR(load(&c, NO_ARGS, err), &c, err, "SASERVE_LOG_FORMAT=xml: not one of text, json");
}
END_TEST

START_TEST(test_error_bad_values_text) {
    saserve_config c;
    char err[ERRLEN];
    setenv("SASERVE_PORT", "abc", 1);
    EXPECT_ERROR(load(&c, NO_ARGS, err), &c, err, "SASERVE_PORT=abc: not an integer");
    unsetenv("SASERVE_PORT");
    EXPECT_ERROR(load(&c, ARGV("--port", "80x"), err), &c, err, "--port=80x: not an integer");
    EXPECT_ERROR(load(&c, ARGV("--port", ""), err), &c, err, "--port=: not an integer");
    EXPECT_ERROR(load(&c, ARGV("--shutdown-grace", "soon"), err), &c, err, "--shutdown-grace=soon: not a number");
    EXPECT_ERROR(load(&c, ARGV("--shutdown-grace", "nan"), err), &c, err, "not a number");
    EXPECT_ERROR(load(&c, ARGV("--metrics=maybe"), err), &c, err, "--metrics=maybe: not a boolean");
    setenv("SASERVE_PREFIX_CACHE", "", 1);
    EXPECT_ERROR(load(&c, NO_ARGS, err), &c, err, "SASERVE_PREFIX_CACHE=: not a boolean");
}
END_TEST

START_TEST(test_error_bad_size) {
    saserve_config c;
    char err[ERRLEN];
    EXPECT_ERROR(load(&c, ARGV("--max-body-bytes", "12X"), err), &c, err,
                 "--max-body-bytes=12X: not a size (an integer with an optional K, M, G or T suffix)");
    setenv("SASERVE_KV_CACHE_BYTES", "1.5G", 1);
    EXPECT_ERROR(load(&c, NO_ARGS, err), &c, err, "SASERVE_KV_CACHE_BYTES=1.5G: not a size");
    unsetenv("SASERVE_KV_CACHE_BYTES");
    EXPECT_ERROR(load_with_file(&c, "{\"kv_cache_bytes\": \"lots\"}", err), &c, err,
                 "key 'kv_cache_bytes' = \"lots\" is not a size");
}
END_TEST

START_TEST(test_error_unknown_flag) {
    saserve_config c;
    char err[ERRLEN];
    EXPECT_ERROR(load(&c, ARGV("--foo"), err), &c, err, "unknown option '--foo'");
    EXPECT_ERROR(load(&c, ARGV("--prot", "1"), err), &c, err, "unknown option '--prot' (did you mean --port?)");
    /* Flags use dashes; the underscore spelling is pointed at the flag. */
    EXPECT_ERROR(load(&c, ARGV("--max_queue", "1"), err), &c, err, "did you mean --max-queue?");
    /* --no- only for booleans. */
    EXPECT_ERROR(load(&c, ARGV("--no-port"), err), &c, err, "unknown option '--no-port' (--port is not a boolean)");
    EXPECT_ERROR(load(&c, ARGV("-p"), err), &c, err, "unknown option '-p'");
    EXPECT_ERROR(load(&c, ARGV("model.gguf"), err), &c, err, "unexpected argument 'model.gguf'");
}
END_TEST

START_TEST(test_error_missing_value) {
    saserve_config c;
    char err[ERRLEN];
    EXPECT_ERROR(load(&c, ARGV("--port"), err), &c, err, "--port needs a value");
    EXPECT_ERROR(load(&c, ARGV("--host", "h", "--config"), err), &c, err, "--config needs a value");
    EXPECT_ERROR(load(&c, ARGV("--no-metrics=true"), err), &c, err, "--no-metrics takes no value");
}
END_TEST

START_TEST(test_error_file_problems) {
    saserve_config c;
    char err[ERRLEN];
    EXPECT_ERROR(load(&c, ARGV("--config", "/nonexistent/saserve.json"), err), &c, err,
                 "config file /nonexistent/saserve.json: No such file or directory");
    EXPECT_ERROR(load_with_file(&c, "{\"port\": 1,\n \"host\": }", err), &c, err, "line 2");
    EXPECT_ERROR(load_with_file(&c, "[1, 2]", err), &c, err, "must be one JSON object");
    EXPECT_ERROR(load_with_file(&c, "{\"port\": 1, \"port\": 2}", err), &c, err, "duplicate");
}
END_TEST

START_TEST(test_error_frees_strings) {
    /* A failure after strings were set leaves nothing behind (LSan checks). */
    saserve_config c;
    char err[ERRLEN];
    setenv("SASERVE_HOST", "h", 1);
    setenv("SASERVE_MODEL", "m", 1);
    int rc = load(&c, ARGV("--api-key", "k", "--port", "x"), err);
    ck_assert_int_eq(rc, -1);
    ck_assert_ptr_null(c.host);
    ck_assert_ptr_null(c.model);
    ck_assert_ptr_null(c.api_key);
    config_free(&c);
}
END_TEST

START_TEST(test_error_null_err) {
    saserve_config c;
    ck_assert_int_eq(config_load(&c, 2, ARGV("--foo"), NULL, NULL, NULL, 0), -1);
    char tiny[8];
    ck_assert_int_eq(config_load(&c, 2, ARGV("--foo"), NULL, NULL, tiny, sizeof tiny), -1);
    ck_assert_str_eq(tiny, "unknown");
}
END_TEST

/* ---- size suffixes ------------------------------------------------------ */

START_TEST(test_sizes) {
    static const struct {
        const char *text;
        int64_t bytes;
    } ok[] = {
        {"0", 0},
        {"1", 1},
        {"1536", 1536},
        {"1K", 1024},
        {"1k", 1024},
        {"512M", (int64_t)512 << 20},
        {"3G", (int64_t)3 << 30},
        {"2T", (int64_t)2 << 40},
        {"16T", (int64_t)16 << 40},
    };
    for (size_t i = 0; i < sizeof ok / sizeof ok[0]; i++) {
        saserve_config c;
        char err[ERRLEN];
        int rc = load(&c, ARGV("--kv-cache-bytes", (char *)ok[i].text), err);
        ck_assert_msg(rc == 0, "%s: %s", ok[i].text, err);
        ck_assert_int_eq(c.kv_cache_bytes, ok[i].bytes);
        config_free(&c);
    }
    static const char *const bad[] = {"", "K", "1KB", "1KiB", " 1K", "1 K", "1.5K", "0x10", "1P"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        saserve_config c;
        char err[ERRLEN];
        EXPECT_ERROR(load(&c, ARGV("--kv-cache-bytes", (char *)bad[i]), err), &c, err, "not a size");
    }
    static const char *const range[] = {"17T", "-1K", "9999999999T", "99999999999999999T"};
    for (size_t i = 0; i < sizeof range / sizeof range[0]; i++) {
        saserve_config c;
        char err[ERRLEN];
        EXPECT_ERROR(load(&c, ARGV("--kv-cache-bytes", (char *)range[i]), err), &c, err,
                     "out of range [0, 16T]");
    }
    /* File: a number of bytes or a size string. */
    saserve_config c;
    char err[ERRLEN];
    ck_assert_int_eq(load_with_file(&c, "{\"max_body_bytes\": \"8k\", \"kv_cache_bytes\": 1048576}", err), 0);
    ck_assert_int_eq(c.max_body_bytes, 8192);
    ck_assert_int_eq(c.kv_cache_bytes, 1 << 20);
    config_free(&c);
}
END_TEST

/* ---- rest[]: arguments left for the subcommand ------------------------ */

START_TEST(test_rest_collected) {
    saserve_config c;
    char err[ERRLEN], path[64];
    write_tmp(path, sizeof path, "{\"max_n\": 5}");
    char **argv = ARGV("-p", "hello", "--port", "9000", "-n", "64", "--metrics", "--config", path, "text.txt",
                       "--help", "--temperature=0");
    int argc = argc_of(argv);
    int rest[16], n_rest = -1;
    int rc = config_load(&c, argc, argv, rest, &n_rest, err, sizeof err);
    unlink(path);
    ck_assert_msg(rc == 0, "%s", err);
    static const int want[] = {1, 2, 5, 6, 10, 11, 12};
    ck_assert_int_eq(n_rest, (int)(sizeof want / sizeof want[0]));
    for (int i = 0; i < n_rest; i++) ck_assert_int_eq(rest[i], want[i]);
    ck_assert_int_eq(c.port, 9000);
    ck_assert(c.metrics);
    ck_assert_int_eq(c.max_n, 5);
    config_free(&c);
}
END_TEST

START_TEST(test_rest_empty) {
    saserve_config c;
    char err[ERRLEN];
    int rest[4], n_rest = -1;
    ck_assert_int_eq(config_load(&c, 3, ARGV("--port", "1"), rest, &n_rest, err, sizeof err), 0);
    ck_assert_int_eq(n_rest, 0);
    config_free(&c);
}
END_TEST

START_TEST(test_rest_on_error) {
    /* Errors in registry flags are still errors when rest is given. */
    saserve_config c;
    char err[ERRLEN];
    int rest[4], n_rest = -1;
    int rc = config_load(&c, 4, ARGV("-x", "--port", "abc"), rest, &n_rest, err, sizeof err);
    EXPECT_ERROR(rc, &c, err, "--port=abc: not an integer");
    ck_assert_int_eq(n_rest, 0);
}
END_TEST

/* ---- print_json --------------------------------------------------------- */

START_TEST(test_print_json) {
    saserve_config c;
    char err[ERRLEN];
    setenv("SASERVE_HOST", "0.0.0.0", 1);
    ck_assert_int_eq(load(&c, ARGV("--api-key", "sk-secret", "--port", "9003", "--default-top-p", "0.7"), err), 0);
    json_t *root = print_json_parsed(&c);
    ck_assert_int_eq(json_object_size(root), N_KEYS);
    const char *key;
    json_t *v;
    json_object_foreach(root, key, v) {
        ck_assert_msg(json_is_object(v) && json_object_size(v) == 2, "%s", key);
        ck_assert_ptr_nonnull(json_object_get(v, "value"));
        ck_assert_str_eq(json_string_value(json_object_get(v, "source")), src(&c, key));
    }
    json_t *k = json_object_get(root, "api_key");
    ck_assert_str_eq(json_string_value(json_object_get(k, "value")), "***");
    ck_assert_str_eq(json_string_value(json_object_get(k, "source")), "cli");
    json_t *p = json_object_get(root, "port");
    ck_assert_int_eq(json_integer_value(json_object_get(p, "value")), 9003);
    json_t *h = json_object_get(root, "host");
    ck_assert_str_eq(json_string_value(json_object_get(h, "value")), "0.0.0.0");
    ck_assert_str_eq(json_string_value(json_object_get(h, "source")), "env");
    json_t *t = json_object_get(root, "default_top_p");
    ck_assert_double_eq(json_real_value(json_object_get(t, "value")), 0.7);
    json_t *m = json_object_get(root, "metrics");
    ck_assert(json_is_true(json_object_get(m, "value")));
    ck_assert_str_eq(json_string_value(json_object_get(m, "source")), "default");
    json_decref(root);

    /* The secret itself appears nowhere in the output. */
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    config_print_json(&c, f);
    fclose(f);
    ck_assert_ptr_null(strstr(buf, "sk-secret"));
    /* One key per line between the braces. */
    int lines = 0;
    for (char *q = buf; *q; q++) lines += *q == '\n';
    ck_assert_int_eq(lines, N_KEYS + 2);
    free(buf);
    config_free(&c);
}
END_TEST

START_TEST(test_print_json_empty_key_unmasked) {
    saserve_config c;
    char err[ERRLEN];
    ck_assert_int_eq(load(&c, NO_ARGS, err), 0);
    json_t *root = print_json_parsed(&c);
    json_t *k = json_object_get(root, "api_key");
    ck_assert_str_eq(json_string_value(json_object_get(k, "value")), "");
    ck_assert_str_eq(json_string_value(json_object_get(k, "source")), "default");
    json_decref(root);
    config_free(&c);
}
END_TEST

/* ---- generated documentation ------------------------------------------- */

START_TEST(test_docs_example_file) {
    char *want = capture(config_print_example);
    char *have = read_file("config/saserve.example.json", NULL);
    ck_assert_msg(have != NULL, "config/saserve.example.json missing (tests run from the repository root)");
    ck_assert_msg(!strcmp(have, want), "config/saserve.example.json is stale: run 'make config-docs'");
    free(have);
    free(want);
}
END_TEST

START_TEST(test_docs_readme_table) {
    static const char begin[] = "<!-- config-table:begin -->\n", end[] = "<!-- config-table:end -->";
    char *want = capture(config_print_markdown);
    char *readme = read_file("README.md", NULL);
    ck_assert_msg(readme != NULL, "README.md missing (tests run from the repository root)");
    char *b = strstr(readme, begin);
    ck_assert_msg(b != NULL, "README.md lacks %s", begin);
    b += strlen(begin);
    char *e = strstr(b, end);
    ck_assert_msg(e != NULL, "README.md lacks %s", end);
    *e = 0;
    ck_assert_msg(!strcmp(b, want), "README.md's config table is stale: run 'make config-docs'");
    free(readme);
    free(want);
}
END_TEST

START_TEST(test_docs_markdown_shape) {
    char *md = capture(config_print_markdown);
    int lines = 0;
    for (char *p = md; *p; p++) lines += *p == '\n';
    ck_assert_int_eq(lines, N_KEYS + 2);
    ck_assert(!strncmp(md, "| key | flag | env | type | default | range/values | description |\n", 67));
    ck_assert_ptr_nonnull(strstr(md, "| `port` | `--port` | `SASERVE_PORT` | integer | `8080` | [0, 65535] |"));
    ck_assert_ptr_nonnull(strstr(md, "`--metrics`, `--no-metrics`"));
    ck_assert_ptr_nonnull(strstr(md, "| `f16`, `f32` |"));
    ck_assert_ptr_nonnull(strstr(md, "| `1M` | [1K, 1G] |"));
    free(md);
}
END_TEST

START_TEST(test_docs_help) {
    char *help = capture(config_print_help);
    int lines = 0;
    for (char *p = help; *p; p++) lines += *p == '\n';
    ck_assert_int_eq(lines, N_KEYS);
    ck_assert_ptr_nonnull(strstr(help, "--port N"));
    ck_assert_ptr_nonnull(strstr(help, "SASERVE_PORT"));
    ck_assert_ptr_nonnull(strstr(help, "--[no-]prefix-cache"));
    ck_assert_ptr_nonnull(strstr(help, "--kv-type f16|f32"));
    ck_assert_ptr_nonnull(strstr(help, "(default 8080)"));
    ck_assert_ptr_nonnull(strstr(help, "(default 127.0.0.1)"));
    free(help);
}
END_TEST

/* ---- suite -------------------------------------------------------------- */

static TCase *tcase(const char *name) {
    TCase *tc = tcase_create(name);
    tcase_add_checked_fixture(tc, clean_env, NULL);
    tcase_set_timeout(tc, 10);
    return tc;
}

Suite *config_suite(void) {
    Suite *s = suite_create("config");
    TCase *tc;

    tc = tcase("defaults");
    tcase_add_test(tc, test_defaults_load);
    tcase_add_test(tc, test_defaults_function);
    tcase_add_test(tc, test_defaults_argc_zero);
    suite_add_tcase(s, tc);

    tc = tcase("file");
    tcase_add_test(tc, test_file_values);
    tcase_add_test(tc, test_file_from_env);
    tcase_add_test(tc, test_file_cli_beats_env);
    tcase_add_test(tc, test_file_empty_object);
    tcase_add_test(tc, test_file_example_loads);
    suite_add_tcase(s, tc);

    tc = tcase("env");
    tcase_add_test(tc, test_env_values);
    tcase_add_test(tc, test_env_every_key);
    suite_add_tcase(s, tc);

    tc = tcase("cli");
    tcase_add_test(tc, test_cli_values);
    tcase_add_test(tc, test_cli_last_wins);
    tcase_add_test(tc, test_cli_empty_string_value);
    suite_add_tcase(s, tc);

    tc = tcase("precedence");
    tcase_add_test(tc, test_precedence);
    tcase_add_test(tc, test_precedence_errors_in_overridden_sources);
    suite_add_tcase(s, tc);

    tc = tcase("errors");
    tcase_add_test(tc, test_error_unknown_key);
    tcase_add_test(tc, test_error_wrong_type);
    tcase_add_test(tc, test_error_out_of_range);
    tcase_add_test(tc, test_error_bad_enum);
    tcase_add_test(tc, test_error_bad_values_text);
    tcase_add_test(tc, test_error_bad_size);
    tcase_add_test(tc, test_error_unknown_flag);
    tcase_add_test(tc, test_error_missing_value);
    tcase_add_test(tc, test_error_file_problems);
    tcase_add_test(tc, test_error_frees_strings);
    tcase_add_test(tc, test_error_null_err);
    suite_add_tcase(s, tc);

    tc = tcase("sizes");
    tcase_add_test(tc, test_sizes);
    suite_add_tcase(s, tc);

    tc = tcase("rest");
    tcase_add_test(tc, test_rest_collected);
    tcase_add_test(tc, test_rest_empty);
    tcase_add_test(tc, test_rest_on_error);
    suite_add_tcase(s, tc);

    tc = tcase("print_json");
    tcase_add_test(tc, test_print_json);
    tcase_add_test(tc, test_print_json_empty_key_unmasked);
    suite_add_tcase(s, tc);

    tc = tcase("docs");
    tcase_add_test(tc, test_docs_example_file);
    tcase_add_test(tc, test_docs_readme_table);
    tcase_add_test(tc, test_docs_markdown_shape);
    tcase_add_test(tc, test_docs_help);
    suite_add_tcase(s, tc);

    return s;
}
