/*
 * config.c - see config.h.
 *
 * Every key is declared once, in registry[] below: its name, type, field,
 * default, bounds, environment name and help line.  Everything else here
 * (defaults, the JSON file, the environment, the command line, --help, the
 * README table, the example file, --print-config) is generic code that walks
 * the table, so adding a key is one line here plus its field in config.h.
 */
#include "config.h"

#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <jansson.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

/* ======================================================================
 * The registry
 * ====================================================================== */

typedef enum {
    CFG_STRING, /* char *, any text */
    CFG_INT,    /* int, decimal */
    CFG_SIZE,   /* int64_t byte count, decimal with an optional K/M/G/T suffix */
    CFG_DOUBLE, /* double */
    CFG_BOOL,   /* bool */
    CFG_ENUM,   /* char *, one of a fixed list */
} config_type;

typedef struct {
    const char *name;          /* key in the file; flag is --name with '_' -> '-' */
    config_type type;
    size_t offset;             /* of the field in saserve_config */
    const char *def;           /* default, written as a flag value would be */
    double min, max;           /* CFG_INT, CFG_SIZE, CFG_DOUBLE: inclusive bounds */
    const char *const *values; /* CFG_ENUM: the allowed values, NULL-terminated */
    const char *env;           /* SASERVE_ + name in upper case */
    const char *arg;           /* placeholder in --help ("FILE", "N"); NULL for bools */
    const char *help;          /* one line, no trailing period */
} config_entry;

/* offsetof plus a compile-time check that the field has the C type the entry
 * claims: _Generic without a matching association does not compile, so a
 * CFG_INT entry can never point at a double. */
#define FIELD(key, T) (offsetof(saserve_config, key) + _Generic(((saserve_config *)0)->key, T: 0))

#define STRING(key, env, def, arg, help) \
    {#key, CFG_STRING, FIELD(key, char *), def, 0, 0, NULL, env, arg, help}
#define INT(key, env, def, lo, hi, arg, help) \
    {#key, CFG_INT, FIELD(key, int), def, lo, hi, NULL, env, arg, help}
#define SIZE(key, env, def, lo, hi, help) \
    {#key, CFG_SIZE, FIELD(key, int64_t), def, lo, hi, NULL, env, "BYTES", help}
#define DOUBLE(key, env, def, lo, hi, arg, help) \
    {#key, CFG_DOUBLE, FIELD(key, double), def, lo, hi, NULL, env, arg, help}
#define BOOL(key, env, def, help) \
    {#key, CFG_BOOL, FIELD(key, bool), def, 0, 0, NULL, env, NULL, help}
#define ENUM(key, env, def, vals, help) \
    {#key, CFG_ENUM, FIELD(key, char *), def, 0, 0, (const char *const[]){vals, NULL}, env, NULL, help}
#define VALUES(...) __VA_ARGS__

/* Bounds are doubles for every numeric type; each bound below is an integer
 * well under 2^53, so it is exact. */
#define KI 1024.0
#define MI (1024.0 * KI)
#define GI (1024.0 * MI)
#define TI (1024.0 * GI)

static const config_entry registry[] = {
    /* ---- model ---- */
    STRING(model, "SASERVE_MODEL", "", "FILE", "GGUF model file to serve (serve requires one)"),
    STRING(model_alias, "SASERVE_MODEL_ALIAS", "", "NAME",
           "model id in /v1/models and in responses; empty: the file name without .gguf"),
    STRING(shared_layers, "SASERVE_SHARED_LAYERS", "", "LIST",
           "layers that share attention, e.g. 4-11 or 5-7,9-11; none: off; "
           "empty: the model's saserve.shared_layers"),
    STRING(chat_template, "SASERVE_CHAT_TEMPLATE", "", "NAME",
           "chat template family for /v1/chat/completions; empty: from the model"),
    INT(ctx_size, "SASERVE_CTX_SIZE", "0", 0, 16777216, "N", "context length per sequence in tokens; 0: the model's"),
    /* ---- server ---- */
    STRING(host, "SASERVE_HOST", "127.0.0.1", "ADDR", "address to listen on"),
    INT(port, "SASERVE_PORT", "8080", 0, 65535, "N", "TCP port to listen on"),
    INT(threads, "SASERVE_THREADS", "0", 0, 1024, "N", "compute threads; 0: one per online CPU"),
    /* ---- KV cache ---- */
    SIZE(kv_cache_bytes, "SASERVE_KV_CACHE_BYTES", "0", 0, 16 * TI,
         "KV cache pool size (K, M, G, T suffixes); 0: automatic"),
    ENUM(kv_type, "SASERVE_KV_TYPE", "f16", VALUES("f16", "f32"), "KV cache element type"),
    INT(kv_block_tokens, "SASERVE_KV_BLOCK_TOKENS", "16", 1, 1024, "N", "tokens per KV cache block"),
    BOOL(prefix_cache, "SASERVE_PREFIX_CACHE", "true", "reuse the KV blocks of identical prompt prefixes"),
    /* ---- scheduling ---- */
    INT(max_batch_tokens, "SASERVE_MAX_BATCH_TOKENS", "512", 1, 65536, "N",
        "tokens per engine step, all sequences together"),
    INT(max_running, "SASERVE_MAX_RUNNING", "16", 1, 4096, "N", "sequences decoding at once"),
    INT(max_queue, "SASERVE_MAX_QUEUE", "64", 0, 1000000, "N",
        "requests waiting for admission; when full, new requests get 429"),
    DOUBLE(request_timeout, "SASERVE_REQUEST_TIMEOUT", "600", 0, 86400, "SECONDS",
           "longest a request may take, queueing included; 0: no limit"),
    DOUBLE(shutdown_grace, "SASERVE_SHUTDOWN_GRACE", "30", 0, 3600, "SECONDS",
           "time running requests get to finish after SIGTERM or SIGINT"),
    /* ---- request limits and defaults ---- */
    SIZE(max_body_bytes, "SASERVE_MAX_BODY_BYTES", "1M", KI, GI, "largest request body; larger ones get 413"),
    INT(max_tokens_limit, "SASERVE_MAX_TOKENS_LIMIT", "0", 0, 16777216, "N",
        "cap on a request's max_tokens; 0: the context size"),
    INT(max_n, "SASERVE_MAX_N", "16", 1, 128, "N", "cap on a request's n (choices per prompt)"),
    INT(default_max_tokens, "SASERVE_DEFAULT_MAX_TOKENS", "16", 1, 16777216, "N",
        "max_tokens for /v1/completions when the request has none (OpenAI's default)"),
    DOUBLE(default_temperature, "SASERVE_DEFAULT_TEMPERATURE", "1.0", 0, 2, "X",
           "temperature when the request has none"),
    DOUBLE(default_top_p, "SASERVE_DEFAULT_TOP_P", "1.0", 0, 1, "X", "top_p when the request has none"),
    /* ---- access ---- */
    STRING(api_key, "SASERVE_API_KEY", "", "KEY",
           "require Authorization: Bearer KEY; empty: no authentication"),
    STRING(api_key_file, "SASERVE_API_KEY_FILE", "", "FILE", "file of accepted API keys, one per line"),
    BOOL(auth_health, "SASERVE_AUTH_HEALTH", "false", "also require the API key for /health and /metrics"),
    STRING(cors_origins, "SASERVE_CORS_ORIGINS", "", "LIST",
           "origins allowed by CORS: \"*\" or a comma-separated list; empty: no CORS headers"),
    /* ---- operations ---- */
    ENUM(log_level, "SASERVE_LOG_LEVEL", "info", VALUES("debug", "info", "warn", "error"),
         "least severe log level printed"),
    ENUM(log_format, "SASERVE_LOG_FORMAT", "text", VALUES("text", "json"),
         "log lines as plain text or as JSON objects"),
    BOOL(metrics, "SASERVE_METRICS", "true", "serve Prometheus metrics at /metrics"),
};

#define N_KEYS (sizeof registry / sizeof registry[0])

/* source[] in saserve_config has one slot per registry entry. */
_Static_assert(N_KEYS <= sizeof(((saserve_config *)0)->source) / sizeof(config_source),
               "saserve_config.source[] is too small for the registry");

/* ======================================================================
 * Small helpers
 * ====================================================================== */

static void *field(saserve_config *c, const config_entry *e) { return (char *)c + e->offset; }
static const void *cfield(const saserve_config *c, const config_entry *e) {
    return (const char *)c + e->offset;
}

static const config_entry *find_key(const char *name, size_t len) {
    for (size_t i = 0; i < N_KEYS; i++)
        if (strlen(registry[i].name) == len && !strncmp(registry[i].name, name, len)) return &registry[i];
    return NULL;
}

/* Formats into err (which may be NULL or have errlen 0) and returns -1, so an
 * error is one line: "return fail(err, errlen, ...)". */
static int fail(char *err, size_t errlen, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int fail(char *err, size_t errlen, const char *fmt, ...) {
    if (err && errlen) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, errlen, fmt, ap);
        va_end(ap);
    }
    return -1;
}

/* A size as people write it: the largest binary suffix that divides it
 * exactly ("1M", "1536K"), else plain digits. */
static void format_size(char *buf, size_t cap, int64_t v) {
    static const char suffix[] = "TGMK";
    for (int i = 0; i < 4; i++) {
        int64_t unit = (int64_t)1 << (10 * (4 - i));
        if (v != 0 && v % unit == 0) {
            snprintf(buf, cap, "%" PRId64 "%c", v / unit, suffix[i]);
            return;
        }
    }
    snprintf(buf, cap, "%" PRId64, v);
}

static void format_bound(char *buf, size_t cap, const config_entry *e, double v) {
    if (e->type == CFG_SIZE) format_size(buf, cap, (int64_t)v);
    else if (e->type == CFG_INT) snprintf(buf, cap, "%" PRId64, (int64_t)v);
    else snprintf(buf, cap, "%g", v);
}

/* "[0, 65535]" for numbers, "f16, f32" for enums, "" otherwise. */
static void format_range(char *buf, size_t cap, const config_entry *e) {
    buf[0] = 0;
    if (e->type == CFG_INT || e->type == CFG_SIZE || e->type == CFG_DOUBLE) {
        char lo[32], hi[32];
        format_bound(lo, sizeof lo, e, e->min);
        format_bound(hi, sizeof hi, e, e->max);
        snprintf(buf, cap, "[%s, %s]", lo, hi);
    } else if (e->type == CFG_ENUM) {
        size_t n = 0;
        for (const char *const *v = e->values; *v && n < cap; v++)
            n += (size_t)snprintf(buf + n, cap - n, "%s%s", v == e->values ? "" : ", ", *v);
    }
}

/* "--max-batch-tokens" (or "--no-max-batch-tokens"). */
static void flag_name(char *buf, size_t cap, const config_entry *e, bool negated) {
    snprintf(buf, cap, "--%s%s", negated ? "no-" : "", e->name);
    for (char *p = buf + 2; *p; p++)
        if (*p == '_') *p = '-';
}

const char *config_source_name(config_source s) {
    switch (s) {
    case CFG_SRC_DEFAULT: return "default";
    case CFG_SRC_FILE: return "file";
    case CFG_SRC_ENV: return "env";
    case CFG_SRC_CLI: return "cli";
    }
    return "?";
}

/* ======================================================================
 * Values: parsing, checking, storing
 * ====================================================================== */

/* A parsed value before it is stored; which member is used follows the type. */
typedef struct {
    int64_t i;     /* CFG_INT, CFG_SIZE */
    double d;      /* CFG_DOUBLE */
    bool b;        /* CFG_BOOL */
    const char *s; /* CFG_STRING, CFG_ENUM: borrowed until stored */
} config_value;

static bool parse_int64(const char *s, int64_t *out, char **end) {
    if (!*s || isspace((unsigned char)*s)) return false;
    errno = 0;
    long long v = strtoll(s, end, 10);
    if (errno || *end == s) return false;
    *out = v;
    return true;
}

static bool parse_bool(const char *s, bool *out) {
    static const char *const yes[] = {"true", "1", "yes", "on"}, *const no[] = {"false", "0", "no", "off"};
    for (size_t i = 0; i < sizeof yes / sizeof yes[0]; i++) {
        if (!strcasecmp(s, yes[i])) return *out = true, true;
        if (!strcasecmp(s, no[i])) return *out = false, true;
    }
    return false;
}

/* Checks the bounds or the allowed values.  On failure writes a phrase such as
 * "out of range [0, 65535]" to why; callers add what and where. */
static bool check_value(const config_entry *e, const config_value *v, char *why, size_t cap) {
    char range[128];
    switch (e->type) {
    case CFG_INT:
    case CFG_SIZE:
        if ((double)v->i >= e->min && (double)v->i <= e->max) return true;
        break;
    case CFG_DOUBLE:
        if (isfinite(v->d) && v->d >= e->min && v->d <= e->max) return true;
        break;
    case CFG_ENUM:
        for (const char *const *a = e->values; *a; a++)
            if (!strcmp(*a, v->s)) return true;
        format_range(range, sizeof range, e);
        snprintf(why, cap, "not one of %s", range);
        return false;
    case CFG_STRING:
    case CFG_BOOL:
        return true;
    }
    format_range(range, sizeof range, e);
    snprintf(why, cap, "out of range %s", range);
    return false;
}

int config_parse_size(const char *s, int64_t *out) {
    char *end;
    if (!parse_int64(s, out, &end)) return 0;
    int shift = 0;
    switch (toupper((unsigned char)*end)) {
    case 0: break;
    case 'K': shift = 10; break;
    case 'M': shift = 20; break;
    case 'G': shift = 30; break;
    case 'T': shift = 40; break;
    default: return 0;
    }
    if (*end && end[1]) return 0;
    if (*out > (INT64_MAX >> shift) || *out < (INT64_MIN >> shift)) return -1;
    *out *= (int64_t)1 << shift;
    return 1;
}

/* Parses text as given on the command line or in the environment (and size
 * strings in the file), then checks it.  On failure why gets a phrase: "not an
 * integer", "out of range [1K, 1G]", "not one of f16, f32", ... */
static bool parse_text(const config_entry *e, const char *s, config_value *v, char *why, size_t cap) {
    char *end;
    switch (e->type) {
    case CFG_STRING:
    case CFG_ENUM:
        v->s = s;
        break;
    case CFG_INT:
        if (!parse_int64(s, &v->i, &end) || *end) {
            snprintf(why, cap, "not an integer");
            return false;
        }
        break;
    case CFG_SIZE: {
        int rc = config_parse_size(s, &v->i);
        if (rc == 0) {
            snprintf(why, cap, "not a size (an integer with an optional K, M, G or T suffix)");
            return false;
        }
        if (rc < 0) {
            /* Too large to represent is also too large for the bounds. */
            char range[128];
            format_range(range, sizeof range, e);
            snprintf(why, cap, "out of range %s", range);
            return false;
        }
        break;
    }
    case CFG_DOUBLE:
        if (!*s || isspace((unsigned char)*s)) goto bad_number;
        errno = 0;
        v->d = strtod(s, &end);
        if (errno == ERANGE && fabs(v->d) < 1) v->d = 0, errno = 0; /* underflow: effectively zero */
        if (errno || end == s || *end || !isfinite(v->d)) goto bad_number;
        break;
    bad_number:
        snprintf(why, cap, "not a number");
        return false;
    case CFG_BOOL:
        if (!parse_bool(s, &v->b)) {
            snprintf(why, cap, "not a boolean (true or false)");
            return false;
        }
        break;
    }
    return check_value(e, v, why, cap);
}

/* Stores a checked value; strings are copied.  Returns false only when out of
 * memory. */
static bool store(saserve_config *c, const config_entry *e, const config_value *v, config_source src) {
    void *p = field(c, e);
    switch (e->type) {
    case CFG_STRING:
    case CFG_ENUM: {
        char *copy = strdup(v->s);
        if (!copy) return false;
        free(*(char **)p);
        *(char **)p = copy;
        break;
    }
    case CFG_INT: *(int *)p = (int)v->i; break;
    case CFG_SIZE: *(int64_t *)p = v->i; break;
    case CFG_DOUBLE: *(double *)p = v->d; break;
    case CFG_BOOL: *(bool *)p = v->b; break;
    }
    c->source[e - registry] = src;
    return true;
}

/* ======================================================================
 * Sources: defaults, file, environment, command line
 * ====================================================================== */

static int load_defaults(saserve_config *c, char *err, size_t errlen) {
    for (size_t i = 0; i < N_KEYS; i++) {
        const config_entry *e = &registry[i];
        config_value v = {0};
        char why[256];
        /* A default that fails its own checks is a bug in the table above. */
        if (!parse_text(e, e->def, &v, why, sizeof why))
            return fail(err, errlen, "default of '%s' = %s: %s", e->name, e->def, why);
        if (!store(c, e, &v, CFG_SRC_DEFAULT)) return fail(err, errlen, "out of memory");
    }
    return 0;
}

static const char *json_kind(const json_t *j) {
    switch (json_typeof(j)) {
    case JSON_OBJECT: return "an object";
    case JSON_ARRAY: return "an array";
    case JSON_STRING: return "a string";
    case JSON_INTEGER: return "an integer";
    case JSON_REAL: return "a real number";
    case JSON_TRUE:
    case JSON_FALSE: return "a boolean";
    case JSON_NULL: return "null";
    }
    return "?";
}

/* What a key's JSON value must be, for type errors. */
static const char *json_expected(const config_entry *e) {
    switch (e->type) {
    case CFG_STRING: return "a string";
    case CFG_ENUM: return "a string";
    case CFG_INT: return "an integer";
    case CFG_SIZE: return "an integer or a size string such as \"512M\"";
    case CFG_DOUBLE: return "a number";
    case CFG_BOOL: return "true or false";
    }
    return "?";
}

/* Converts and checks one JSON value of the file.  On failure why is set and
 * *type_error tells a wrong JSON type from a bad value. */
static bool from_json(const config_entry *e, json_t *j, config_value *v, bool *type_error, char *why,
                      size_t cap) {
    *type_error = false;
    switch (e->type) {
    case CFG_STRING:
    case CFG_ENUM:
        if (!json_is_string(j)) break;
        v->s = json_string_value(j);
        return check_value(e, v, why, cap);
    case CFG_INT:
        if (!json_is_integer(j)) break;
        v->i = json_integer_value(j);
        return check_value(e, v, why, cap);
    case CFG_SIZE:
        if (json_is_string(j)) return parse_text(e, json_string_value(j), v, why, cap);
        if (!json_is_integer(j)) break;
        v->i = json_integer_value(j);
        return check_value(e, v, why, cap);
    case CFG_DOUBLE:
        if (!json_is_number(j)) break;
        v->d = json_number_value(j);
        return check_value(e, v, why, cap);
    case CFG_BOOL:
        if (!json_is_boolean(j)) break;
        v->b = json_is_true(j);
        return true;
    }
    *type_error = true;
    return false;
}

/* Levenshtein distance, capped: enough to suggest "port" for "prot". */
static size_t edit_distance(const char *a, const char *b) {
    size_t la = strlen(a), lb = strlen(b);
    if (la > 63 || lb > 63) return SIZE_MAX;
    size_t row[64];
    for (size_t j = 0; j <= lb; j++) row[j] = j;
    for (size_t i = 1; i <= la; i++) {
        size_t diag = row[0];
        row[0] = i;
        for (size_t j = 1; j <= lb; j++) {
            size_t up = row[j];
            size_t best = diag + (a[i - 1] != b[j - 1]);
            if (up + 1 < best) best = up + 1;
            if (row[j - 1] + 1 < best) best = row[j - 1] + 1;
            row[j] = best;
            diag = up;
        }
    }
    return row[lb];
}

/* The registry key closest to name (at most two edits away), or NULL. */
static const config_entry *suggest(const char *name) {
    const config_entry *best = NULL;
    size_t best_d = 3;
    for (size_t i = 0; i < N_KEYS; i++) {
        size_t d = edit_distance(name, registry[i].name);
        if (d < best_d) best = &registry[i], best_d = d;
    }
    return best;
}

static int load_file(saserve_config *c, const char *path, char *err, size_t errlen) {
    /* Opened here rather than by jansson so that a missing file reads
     * "config file X: No such file or directory", naming the path once. */
    FILE *f = fopen(path, "rb");
    if (!f) return fail(err, errlen, "config file %s: %s", path, strerror(errno));
    json_error_t jerr;
    json_t *root = json_loadf(f, JSON_REJECT_DUPLICATES, &jerr);
    fclose(f);
    if (!root) {
        if (jerr.line > 0)
            return fail(err, errlen, "config file %s: line %d column %d: %s", path, jerr.line, jerr.column,
                        jerr.text);
        return fail(err, errlen, "config file %s: %s", path, jerr.text);
    }
    int rc = 0;
    if (!json_is_object(root)) {
        rc = fail(err, errlen, "config file %s: must be one JSON object of keys, not %s", path, json_kind(root));
        goto out;
    }
    const char *key;
    json_t *j;
    json_object_foreach(root, key, j) {
        const config_entry *e = find_key(key, strlen(key));
        if (!e) {
            /* The key is normalised the way people mistype it: flags use
             * dashes, so "max-queue" in a file is a likely slip. */
            char alt[128];
            snprintf(alt, sizeof alt, "%s", key);
            for (char *p = alt; *p; p++)
                if (*p == '-') *p = '_';
            const config_entry *s = suggest(alt);
            if (s)
                rc = fail(err, errlen, "config file %s: unknown key '%s' (did you mean '%s'?)", path, key, s->name);
            else
                rc = fail(err, errlen, "config file %s: unknown key '%s'", path, key);
            goto out;
        }
        config_value v = {0};
        bool type_error;
        char why[256];
        if (!from_json(e, j, &v, &type_error, why, sizeof why)) {
            char *text = json_dumps(j, JSON_ENCODE_ANY | JSON_COMPACT);
            if (type_error)
                rc = fail(err, errlen, "config file %s: key '%s' must be %s, got %s", path, key, json_expected(e),
                          text ? text : json_kind(j));
            else
                rc = fail(err, errlen, "config file %s: key '%s' = %s is %s", path, key, text ? text : "?", why);
            free(text);
            goto out;
        }
        if (!store(c, e, &v, CFG_SRC_FILE)) {
            rc = fail(err, errlen, "out of memory");
            goto out;
        }
    }
out:
    json_decref(root);
    return rc;
}

/* Every SASERVE_* variable named in the registry; others (SASERVE_CONFIG, the
 * test harness's SASERVE_BIN) are not ours to judge.  A variable set to the
 * empty string counts as set: "SASERVE_API_KEY=" clears a key from the file. */
static int load_env(saserve_config *c, char *err, size_t errlen) {
    for (size_t i = 0; i < N_KEYS; i++) {
        const config_entry *e = &registry[i];
        const char *s = getenv(e->env);
        if (!s) continue;
        config_value v = {0};
        char why[256];
        if (!parse_text(e, s, &v, why, sizeof why)) return fail(err, errlen, "%s=%s: %s", e->env, s, why);
        if (!store(c, e, &v, CFG_SRC_ENV)) return fail(err, errlen, "out of memory");
    }
    return 0;
}

/* One registry flag found on the command line, applied after file and env. */
typedef struct {
    const config_entry *e;
    const char *value; /* NULL: a bare boolean flag, value in negated */
    bool negated;      /* --no-KEY */
    int arg;           /* index in argv, for messages */
} cli_setting;

/* Recognises "--key-name", "--no-key-name" (booleans) and "--key-name=V".
 * Returns the entry or NULL; *value points after '=' or is NULL. */
static const config_entry *match_flag(const char *a, bool *negated, const char **value) {
    *negated = false;
    *value = NULL;
    if (strncmp(a, "--", 2) != 0) return NULL;
    const char *name = a + 2;
    const char *eq = strchr(name, '=');
    size_t len = eq ? (size_t)(eq - name) : strlen(name);
    char key[128];
    if (len == 0 || len >= sizeof key) return NULL;
    for (size_t i = 0; i < len; i++) {
        /* Keys use underscores; only the dashed spelling is a flag. */
        if (name[i] == '_') return NULL;
        key[i] = name[i] == '-' ? '_' : name[i];
    }
    key[len] = 0;
    const config_entry *e = find_key(key, len);
    if (!e && !strncmp(key, "no_", 3)) {
        e = find_key(key + 3, len - 3);
        if (e && e->type != CFG_BOOL) return NULL;
        *negated = e != NULL;
    }
    if (e && eq) *value = eq + 1;
    return e;
}

/* Splits argv into registry settings, the config file path and the rest. */
static int scan_args(int argc, char **argv, cli_setting *set, int *n_set, const char **config_path, int *rest,
                     int *n_rest, char *err, size_t errlen) {
    *n_set = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--config")) {
            if (i + 1 >= argc) return fail(err, errlen, "--config needs a value (a JSON file)");
            *config_path = argv[++i];
            continue;
        }
        if (!strncmp(a, "--config=", 9)) {
            *config_path = a + 9;
            continue;
        }
        bool negated;
        const char *value;
        const config_entry *e = match_flag(a, &negated, &value);
        if (e) {
            char flag[128];
            flag_name(flag, sizeof flag, e, negated);
            if (negated && value) return fail(err, errlen, "%s takes no value, got '%s'", flag, a);
            if (!value && e->type != CFG_BOOL) {
                if (i + 1 >= argc) return fail(err, errlen, "%s needs a value", flag);
                value = argv[++i];
            }
            set[(*n_set)++] = (cli_setting){e, value, negated, i};
            continue;
        }
        if (rest) {
            rest[(*n_rest)++] = i;
            continue;
        }
        if (a[0] != '-' || !a[1]) return fail(err, errlen, "unexpected argument '%s'", a);
        /* Suggest the nearest flag for a misspelt one. */
        char key[128];
        snprintf(key, sizeof key, "%s", a + strspn(a, "-"));
        key[strcspn(key, "=")] = 0;
        for (char *p = key; *p; p++)
            if (*p == '-') *p = '_';
        const config_entry *s = suggest(key);
        if (!strncmp(key, "no_", 3) && (s = find_key(key + 3, strlen(key + 3)))) {
            char flag[128];
            flag_name(flag, sizeof flag, s, false);
            return fail(err, errlen, "unknown option '%s' (%s is not a boolean)", a, flag);
        }
        if (s) {
            char flag[128];
            flag_name(flag, sizeof flag, s, false);
            return fail(err, errlen, "unknown option '%s' (did you mean %s?)", a, flag);
        }
        return fail(err, errlen, "unknown option '%s'", a);
    }
    return 0;
}

static int apply_args(saserve_config *c, const cli_setting *set, int n_set, char *err, size_t errlen) {
    for (int k = 0; k < n_set; k++) {
        const config_entry *e = set[k].e;
        config_value v = {0};
        char why[256], flag[128];
        flag_name(flag, sizeof flag, e, false);
        if (!set[k].value) {
            v.b = !set[k].negated; /* --key / --no-key */
        } else if (!parse_text(e, set[k].value, &v, why, sizeof why)) {
            return fail(err, errlen, "%s=%s: %s", flag, set[k].value, why);
        }
        if (!store(c, e, &v, CFG_SRC_CLI)) return fail(err, errlen, "out of memory");
    }
    return 0;
}

/* ======================================================================
 * Public API
 * ====================================================================== */

void config_free(saserve_config *c) {
    if (!c) return;
    for (size_t i = 0; i < N_KEYS; i++) {
        const config_entry *e = &registry[i];
        if (e->type == CFG_STRING || e->type == CFG_ENUM) {
            char **p = field(c, e);
            free(*p);
            *p = NULL;
        }
    }
}

int config_defaults(saserve_config *c, char *err, size_t errlen) {
    memset(c, 0, sizeof *c);
    if (load_defaults(c, err, errlen) == 0) return 0;
    config_free(c);
    return -1;
}

int config_load(saserve_config *c, int argc, char **argv, int *rest, int *n_rest, char *err, size_t errlen) {
    memset(c, 0, sizeof *c);
    if (n_rest) *n_rest = 0;
    if (err && errlen) err[0] = 0;
    int dummy_n_rest;
    if (rest && !n_rest) n_rest = &dummy_n_rest;

    /* The command line is read first, to find --config, but applied last. */
    cli_setting *set = malloc(sizeof *set * (size_t)(argc > 0 ? argc : 1));
    if (!set) return fail(err, errlen, "out of memory");
    int n_set = 0;
    const char *path = getenv("SASERVE_CONFIG");
    if (path && !*path) path = NULL; /* SASERVE_CONFIG= means no file */
    if (scan_args(argc, argv, set, &n_set, &path, rest, n_rest, err, errlen) || load_defaults(c, err, errlen) ||
        (path && load_file(c, path, err, errlen)) || load_env(c, err, errlen) ||
        apply_args(c, set, n_set, err, errlen)) {
        free(set);
        config_free(c);
        if (n_rest) *n_rest = 0;
        return -1;
    }
    free(set);
    return 0;
}

int config_key_source(const saserve_config *c, const char *key) {
    const config_entry *e = find_key(key, strlen(key));
    return e ? (int)c->source[e - registry] : -1;
}

/* ======================================================================
 * Output: --print-config, --help, the README table, the example file
 * ====================================================================== */

static json_t *value_json(const config_entry *e, const void *p) {
    switch (e->type) {
    case CFG_STRING:
    case CFG_ENUM: return json_string(*(char *const *)p ? *(char *const *)p : "");
    case CFG_INT: return json_integer(*(const int *)p);
    case CFG_SIZE: return json_integer(*(const int64_t *)p);
    case CFG_DOUBLE: return json_real(*(const double *)p);
    case CFG_BOOL: return json_boolean(*(const bool *)p);
    }
    return json_null();
}

/* JSON_REAL_PRECISION(15): 0.7 prints as 0.7, not 0.69999999999999996. */
#define DUMP_FLAGS (JSON_INDENT(2) | JSON_REAL_PRECISION(15))

/* One key per line, which jansson's indentation cannot do, so the object is
 * assembled here; keys are plain identifiers and need no escaping. */
void config_print_json(const saserve_config *c, FILE *f) {
    fputs("{\n", f);
    for (size_t i = 0; i < N_KEYS; i++) {
        const config_entry *e = &registry[i];
        json_t *v;
        /* The key itself never leaves the process; only whether one is set. */
        if (!strcmp(e->name, "api_key") && c->api_key && *c->api_key) v = json_string("***");
        else v = value_json(e, cfield(c, e));
        json_t *item = json_pack("{s:o,s:s}", "value", v, "source", config_source_name(c->source[i]));
        char *text = json_dumps(item, JSON_REAL_PRECISION(15));
        fprintf(f, "  \"%s\": %s%s\n", e->name, text ? text : "null", i + 1 < N_KEYS ? "," : "");
        free(text);
        json_decref(item);
    }
    fputs("}\n", f);
}

void config_print_example(FILE *f) {
    saserve_config c;
    if (config_defaults(&c, NULL, 0)) return;
    json_t *root = json_object();
    for (size_t i = 0; i < N_KEYS; i++)
        json_object_set_new(root, registry[i].name, value_json(&registry[i], cfield(&c, &registry[i])));
    json_dumpf(root, f, DUMP_FLAGS);
    fputc('\n', f);
    json_decref(root);
    config_free(&c);
}

/* "--port N", "--[no-]metrics", "--kv-type f16|f32". */
static void flag_usage(char *buf, size_t cap, const config_entry *e) {
    char flag[128];
    flag_name(flag, sizeof flag, e, false);
    if (e->type == CFG_BOOL) {
        snprintf(buf, cap, "--[no-]%s", flag + 2);
    } else if (e->type == CFG_ENUM) {
        size_t n = (size_t)snprintf(buf, cap, "%s ", flag);
        for (const char *const *v = e->values; *v && n < cap; v++)
            n += (size_t)snprintf(buf + n, cap - n, "%s%s", v == e->values ? "" : "|", *v);
    } else {
        snprintf(buf, cap, "%s %s", flag, e->arg);
    }
}

static const char *shown_default(const config_entry *e) { return *e->def ? e->def : "\"\""; }

void config_print_help(FILE *f) {
    int wflag = 0, wenv = 0;
    char buf[256];
    for (size_t i = 0; i < N_KEYS; i++) {
        flag_usage(buf, sizeof buf, &registry[i]);
        if ((int)strlen(buf) > wflag) wflag = (int)strlen(buf);
        if ((int)strlen(registry[i].env) > wenv) wenv = (int)strlen(registry[i].env);
    }
    for (size_t i = 0; i < N_KEYS; i++) {
        const config_entry *e = &registry[i];
        flag_usage(buf, sizeof buf, e);
        fprintf(f, "  %-*s  %-*s  %s (default %s)\n", wflag, buf, wenv, e->env, e->help, shown_default(e));
    }
}

static const char *type_name(config_type t) {
    switch (t) {
    case CFG_STRING: return "string";
    case CFG_INT: return "integer";
    case CFG_SIZE: return "size";
    case CFG_DOUBLE: return "number";
    case CFG_BOOL: return "boolean";
    case CFG_ENUM: return "enum";
    }
    return "?";
}

/* Table cells may not contain '|'. */
static void md_cell(FILE *f, const char *s) {
    for (; *s; s++) {
        if (*s == '|') fputc('\\', f);
        fputc(*s, f);
    }
}

void config_print_markdown(FILE *f) {
    fprintf(f, "| key | flag | env | type | default | range/values | description |\n");
    fprintf(f, "|---|---|---|---|---|---|---|\n");
    for (size_t i = 0; i < N_KEYS; i++) {
        const config_entry *e = &registry[i];
        char flag[128], range[128];
        flag_name(flag, sizeof flag, e, false);
        fprintf(f, "| `%s` | `%s`", e->name, flag);
        if (e->type == CFG_BOOL) {
            flag_name(flag, sizeof flag, e, true);
            fprintf(f, ", `%s`", flag);
        }
        fprintf(f, " | `%s` | %s | `%s` | ", e->env, type_name(e->type), shown_default(e));
        if (e->type == CFG_ENUM) {
            for (const char *const *v = e->values; *v; v++) fprintf(f, "%s`%s`", v == e->values ? "" : ", ", *v);
        } else {
            format_range(range, sizeof range, e);
            fputs(range, f);
        }
        fputs(" | ", f);
        md_cell(f, e->help);
        fputs(" |\n", f);
    }
}
