/*
 * config.h - saserve's configuration: one registry drives the command-line
 * flags, the SASERVE_* environment variables and the JSON config file.
 *
 * Precedence, lowest first: built-in defaults < config file (--config FILE or
 * SASERVE_CONFIG) < environment < command line.  Every key has a type,
 * a default, bounds, an environment name and a help line in one table
 * (config.c); flags are the key with '_' -> '-' ("max_batch_tokens" ->
 * --max-batch-tokens), booleans also take --no-KEY, the environment name is
 * SASERVE_ + the key in upper case.
 *
 * Ownership: strings in a config are owned by it; config_free() releases them.
 */
#ifndef SASERVE_CONFIG_H
#define SASERVE_CONFIG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

typedef enum { CFG_SRC_DEFAULT = 0, CFG_SRC_FILE, CFG_SRC_ENV, CFG_SRC_CLI } config_source;

typedef struct {
    /* model */
    char *model;            /* path to a GGUF file */
    char *model_alias;      /* id in /v1/models; "" = file name without .gguf */
    char *shared_layers;    /* "" = the model's saserve.shared_layers; "none" = off */
    char *chat_template;    /* "" = from the model, else a family name */
    int ctx_size;           /* 0 = the model's context length */
    /* server */
    char *host;
    int port;
    int threads;            /* 0 = one per online CPU */
    /* KV cache */
    int64_t kv_cache_bytes; /* 0 = automatic; accepts K/M/G suffixes */
    char *kv_type;          /* "f16" or "f32" */
    int kv_block_tokens;
    bool prefix_cache;
    /* scheduling */
    int max_batch_tokens;
    int max_running;        /* sequences decoding at once */
    int max_queue;          /* requests waiting for admission */
    double request_timeout; /* seconds; 0 = none */
    double shutdown_grace;  /* seconds */
    /* request limits and defaults */
    int64_t max_body_bytes;
    int max_tokens_limit;   /* cap on max_tokens; 0 = context size */
    int max_n;              /* cap on n */
    int default_max_tokens; /* /v1/completions when max_tokens is absent */
    double default_temperature;
    double default_top_p;
    /* access */
    char *api_key;          /* "" = no authentication */
    char *api_key_file;     /* file with one key per line */
    bool auth_health;       /* also require the key for /health and /metrics */
    char *cors_origins;     /* "" = no CORS headers; "*" or comma-separated origins */
    /* operations */
    char *log_level;        /* debug, info, warn, error */
    char *log_format;       /* text or json */
    bool metrics;           /* serve /metrics */

    config_source source[64]; /* per registry entry, in registry order */
} saserve_config;

/* Fills *c from defaults, then the config file, the environment and argv
 * (argv[0] is the subcommand name and is skipped).  Arguments that are not
 * registry flags are left for the caller: their indexes go to rest[] (in
 * order; *n_rest set; rest needs room for argc entries) when rest is
 * non-NULL, else they are errors.  A registry flag's value is consumed with
 * it; anything else, a caller flag's value included, goes to rest[] as is.
 * Handles --config FILE / --config=FILE itself.  Returns 0, or -1 with a
 * one-line message in err that names the key or flag and, for range errors,
 * the allowed range; on failure *c holds nothing (config_free() is harmless)
 * and *n_rest is 0. */
int config_load(saserve_config *c, int argc, char **argv, int *rest, int *n_rest, char *err, size_t errlen);
/* Releases the strings; safe on a config that config_load() or
 * config_defaults() failed to fill (they leave nothing to free). */
void config_free(saserve_config *c);
/* Fills *c with the built-in defaults only (no file, environment or argv):
 * for tests and embedders.  Returns 0, or -1 (out of memory) with err set. */
int config_defaults(saserve_config *c, char *err, size_t errlen);

/* A size as the registry reads one: an integer with an optional K, M, G or
 * T suffix (powers of 1024).  Returns 1 with *out set, 0 if s is not a size,
 * -1 if it does not fit in 64 bits. */
int config_parse_size(const char *s, int64_t *out);

/* Where a key's value came from: a config_source, or -1 for an unknown key. */
int config_key_source(const saserve_config *c, const char *key);
/* "default", "file", "env" or "cli". */
const char *config_source_name(config_source s);

/* The effective configuration as one JSON object: {"key": {"value": v,
 * "source": "default"|"file"|"env"|"cli"}, ...}; api_key shown as "***"
 * when set. */
void config_print_json(const saserve_config *c, FILE *f);
/* Flag help for every key, for --help. */
void config_print_help(FILE *f);
/* The README's table of keys (Markdown), generated from the registry. */
void config_print_markdown(FILE *f);
/* An example config file with every key at its default. */
void config_print_example(FILE *f);

#endif
