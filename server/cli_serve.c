/*
 * cli_serve.c - saserve serve: configuration, start-up order, shutdown.
 *
 * Order: configuration (defaults < file < env < flags) -> logging -> model
 * (mmap, checks, KV cache and activations allocated) -> metrics ->
 * scheduler thread -> HTTP loop.  The server only listens once the model is
 * loaded, so /health answers 200 from the first request on.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "chat.h"
#include "cli.h"
#include "config.h"
#include "log.h"
#include "server.h"

sched_notify_fn http_notify_fn(void);

static void serve_usage(FILE *f) {
    fprintf(f,
            "usage: saserve serve --model FILE [options]\n"
            "\n"
            "Serves the OpenAI API (/v1/completions, /v1/chat/completions, /v1/models) plus /health,\n"
            "/metrics, /tokenize and /detokenize.  Every option is also an environment variable\n"
            "(SASERVE_<NAME>) and a key of the JSON file given with --config FILE; flags win over the\n"
            "environment, which wins over the file.\n"
            "\n"
            "  --config FILE            JSON configuration file\n"
            "  --print-config           print the effective configuration (with sources) and exit\n"
            "\n");
    config_print_help(f);
}

/* Reads api_key and the lines of api_key_file (blank lines and # comments
 * skipped).  Keys are never logged. */
static int load_keys(server *s, const saserve_config *cfg) {
    int cap = 8;
    s->api_keys = calloc((size_t)cap, sizeof *s->api_keys);
    if (!s->api_keys) return -1;
    if (cfg->api_key && cfg->api_key[0]) s->api_keys[s->n_api_keys++] = strdup(cfg->api_key);
    if (cfg->api_key_file && cfg->api_key_file[0]) {
        FILE *f = fopen(cfg->api_key_file, "r");
        if (!f) {
            LOG_ERROR(NULL, "cannot read api_key_file '%s'", cfg->api_key_file);
            return -1;
        }
        char line[1024];
        while (fgets(line, sizeof line, f)) {
            size_t n = strlen(line);
            while (n && (line[n - 1] == '\n' || line[n - 1] == '\r' || line[n - 1] == ' ')) line[--n] = 0;
            char *p = line;
            while (*p == ' ') p++;
            if (!*p || *p == '#') continue;
            if (s->n_api_keys == cap) {
                cap *= 2;
                char **k = realloc(s->api_keys, (size_t)cap * sizeof *k);
                if (!k) break;
                s->api_keys = k;
            }
            s->api_keys[s->n_api_keys++] = strdup(p);
        }
        fclose(f);
        if (s->n_api_keys == 0) {
            LOG_ERROR(NULL, "api_key_file '%s' holds no keys", cfg->api_key_file);
            return -1;
        }
    }
    return 0;
}

int cli_serve(int argc, char **argv) {
    saserve_config cfg;
    char err[512];
    bool print_config = false;
    int *rest = calloc((size_t)argc + 1, sizeof *rest);
    int n_rest = 0;
    if (!rest || config_load(&cfg, argc, argv, rest, &n_rest, err, sizeof err) != 0) {
        fprintf(stderr, "saserve serve: %s\n", rest ? err : "out of memory");
        free(rest);
        return 2;
    }
    for (int i = 0; i < n_rest; i++) {
        const char *a = argv[rest[i]];
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            serve_usage(stdout);
            free(rest);
            config_free(&cfg);
            return 0;
        } else if (!strcmp(a, "--print-config")) {
            print_config = true;
        } else if (!strcmp(a, "-m")) { /* short alias */
            if (i + 1 >= n_rest) {
                fprintf(stderr, "saserve serve: -m needs a value\n");
                free(rest);
                config_free(&cfg);
                return 2;
            }
            free(cfg.model);
            cfg.model = strdup(argv[rest[++i]]);
        } else {
            fprintf(stderr, "saserve serve: unknown option '%s' (see saserve serve --help)\n", a);
            free(rest);
            config_free(&cfg);
            return 2;
        }
    }
    free(rest);
    if (print_config) {
        config_print_json(&cfg, stdout);
        config_free(&cfg);
        return 0;
    }
    if (slog_init(cfg.log_level, !strcmp(cfg.log_format, "json")) != 0) {
        fprintf(stderr, "saserve serve: bad log_level '%s'\n", cfg.log_level);
        config_free(&cfg);
        return 2;
    }
    if (!cfg.model || !cfg.model[0]) {
        fprintf(stderr, "saserve serve: no model: pass --model FILE (or SASERVE_MODEL, or \"model\" in --config)\n");
        config_free(&cfg);
        return 2;
    }
    if (cfg.chat_template[0] && !chat_family_known(cfg.chat_template)) {
        fprintf(stderr, "saserve serve: chat_template '%s' is not one of: %s\n", cfg.chat_template,
                chat_family_list());
        config_free(&cfg);
        return 2;
    }

    int rc = 1;
    server s;
    memset(&s, 0, sizeof s);
    s.cfg = &cfg;
    engine_params p = engine_default_params();
    p.model_path = cfg.model;
    p.shared_layers = cfg.shared_layers[0] ? cfg.shared_layers : NULL;
    p.n_threads = cfg.threads;
    p.n_ctx = cfg.ctx_size;
    p.kv_cache_bytes = (size_t)cfg.kv_cache_bytes;
    p.kv_type = !strcmp(cfg.kv_type, "f32") ? ENGINE_KV_F32 : ENGINE_KV_F16;
    p.kv_block_tokens = cfg.kv_block_tokens;
    p.max_batch_tokens = cfg.max_batch_tokens;
    p.max_seqs = cfg.max_running;
    p.prefix_cache = cfg.prefix_cache;
    if (engine_open(&p, &s.eng, err, sizeof err) != 0) {
        LOG_ERROR(NULL, "%s", err);
        config_free(&cfg);
        return 1;
    }
    s.info = engine_get_info(s.eng);
    const engine_info *in = s.info;
    if (cfg.model_alias[0]) {
        snprintf(s.model_id, sizeof s.model_id, "%s", cfg.model_alias);
    } else {
        const char *b = strrchr(cfg.model, '/');
        snprintf(s.model_id, sizeof s.model_id, "%s", b ? b + 1 : cfg.model);
        size_t n = strlen(s.model_id);
        if (n > 5 && !strcmp(s.model_id + n - 5, ".gguf")) s.model_id[n - 5] = 0;
    }
    s.created = (long long)time(NULL);

    /* Shared Attention at a glance. */
    char map[1024];
    size_t o = 0;
    for (int l = 0; l < in->n_layer && o < sizeof map - 16; l++)
        o += (size_t)snprintf(map + o, sizeof map - o, "%s%d<-%d", l ? " " : "", l, in->layer_source[l]);
    LOG_INFO(NULL, "shared attention: layers %s (%s); layer<-source: %s", in->shared_layers, in->shared_origin, map);
    LOG_INFO(NULL, "KV bytes per token: %zu with sharing, %zu without (%.1f%% saved); %zu K bytes not allocated",
             in->kv_bytes_per_token, in->kv_bytes_per_token_unshared,
             100.0 * (1.0 - (double)in->kv_bytes_per_token / (double)in->kv_bytes_per_token_unshared),
             in->kv_saved_bytes);

    char tmpl[8192];
    if (cfg.chat_template[0]) s.chat_family = cfg.chat_template;
    else if (engine_meta_str(s.eng, "tokenizer.chat_template", tmpl, sizeof tmpl)) s.chat_family = chat_detect_family(tmpl);
    else s.chat_family = "chatml";
    LOG_INFO(NULL, "chat template: %s%s", s.chat_family, cfg.chat_template[0] ? " (configured)" : "");

    if (load_keys(&s, &cfg) != 0) goto out;
    if (s.n_api_keys) LOG_INFO(NULL, "API key authentication on (%d key%s)", s.n_api_keys, s.n_api_keys > 1 ? "s" : "");

    s.m = metrics_new();
    sched_engine se = sched_engine_real(s.eng);
    sched_config sc = {.max_running = cfg.max_running, .max_queue = cfg.max_queue,
                       .max_batch_tokens = cfg.max_batch_tokens, .request_timeout = cfg.request_timeout};
    s.sched = s.m ? sched_create(&se, &sc, s.m, http_notify_fn(), &s) : NULL;
    if (!s.sched || sched_start(s.sched) != 0) {
        LOG_ERROR(NULL, "cannot start the scheduler");
        goto out;
    }
    rc = server_run(&s);
out:
    if (s.sched) sched_destroy(s.sched);
    metrics_free(s.m);
    for (int i = 0; i < s.n_api_keys; i++) free(s.api_keys[i]);
    free(s.api_keys);
    engine_close(s.eng);
    config_free(&cfg);
    return rc;
}
