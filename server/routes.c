/*
 * routes.c - the HTTP API: OpenAI completions and chat completions, models,
 * health, metrics, tokenize/detokenize.  Runs on the loop thread.
 *
 * Request bodies are validated field by field; a field of the wrong type or
 * out of range is a 400 that names the param, in OpenAI's error shape.
 * Unknown fields are ignored, as OpenAI's own API does.
 */
#include <ctype.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

#include "chat.h"
#include "log.h"
#include "server.h"
#include "utf8.h"

#define MAX_PROMPTS 64
#define MAX_MESSAGES 1024
#define MAX_FRAGS 4096

/* ==== Validation helpers =============================================== */

typedef routes_verr verr;

static bool bad(verr *e, const char *param, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static bool bad(verr *e, const char *param, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->msg, sizeof e->msg, fmt, ap);
    va_end(ap);
    e->param = param;
    return false;
}

/* A JSON null counts as absent everywhere (clients send explicit nulls). */
static json_t *field(json_t *o, const char *key) {
    json_t *v = json_object_get(o, key);
    return json_is_null(v) ? NULL : v;
}

static bool get_num(json_t *o, const char *key, double lo, double hi, double *out, verr *e) {
    json_t *v = field(o, key);
    if (!v) return true;
    if (!json_is_number(v)) return bad(e, key, "'%s' must be a number", key);
    double x = json_number_value(v);
    if (!isfinite(x) || x < lo || x > hi) return bad(e, key, "'%s' must be between %g and %g, got %g", key, lo, hi, x);
    *out = x;
    return true;
}

static bool get_int(json_t *o, const char *key, long long lo, long long hi, long long *out, verr *e) {
    json_t *v = field(o, key);
    if (!v) return true;
    if (!json_is_integer(v)) return bad(e, key, "'%s' must be an integer", key);
    long long x = json_integer_value(v);
    if (x < lo || x > hi) return bad(e, key, "'%s' must be between %lld and %lld, got %lld", key, lo, hi, x);
    *out = x;
    return true;
}

static bool get_bool(json_t *o, const char *key, bool *out, verr *e) {
    json_t *v = field(o, key);
    if (!v) return true;
    if (!json_is_boolean(v)) return bad(e, key, "'%s' must be a boolean", key);
    *out = json_is_true(v);
    return true;
}

static bool valid_utf8_str(json_t *v) {
    /* jansson rejects invalid UTF-8 while parsing; \u escapes can still
     * smuggle lone surrogates, which it encodes as invalid sequences. */
    return utf8_valid(json_string_value(v), json_string_length(v));
}

/* ==== Common sampling / generation fields ============================== */

static bool parse_common(server *s, request *r, json_t *body, verr *e) {
    const saserve_config *cfg = s->cfg;
    double temp = cfg->default_temperature, top_p = cfg->default_top_p, min_p = 0, pres = 0, freq = 0, rep = 1;
    long long top_k = 0, n = 1, seed = -1;
    if (!get_num(body, "temperature", 0, 2, &temp, e) || !get_num(body, "top_p", 0, 1, &top_p, e) ||
        !get_num(body, "min_p", 0, 1, &min_p, e) || !get_num(body, "presence_penalty", -2, 2, &pres, e) ||
        !get_num(body, "frequency_penalty", -2, 2, &freq, e) ||
        !get_num(body, "repetition_penalty", 0.01, 10, &rep, e) || !get_int(body, "top_k", -1, 1 << 30, &top_k, e) ||
        !get_int(body, "n", 1, cfg->max_n, &n, e) || !get_int(body, "seed", LLONG_MIN, LLONG_MAX, &seed, e) ||
        !get_bool(body, "stream", &r->stream, e) || !get_bool(body, "ignore_eos", &r->ignore_eos, e))
        return false;
    json_t *so = field(body, "stream_options");
    if (so) {
        if (!json_is_object(so)) return bad(e, "stream_options", "'stream_options' must be an object");
        if (!r->stream) return bad(e, "stream_options", "'stream_options' is only allowed when 'stream' is true");
        if (!get_bool(so, "include_usage", &r->include_usage, e)) return false;
    }
    json_t *bo = field(body, "best_of");
    if (bo && (!json_is_integer(bo) || json_integer_value(bo) != n))
        return bad(e, "best_of", "'best_of' is not supported (only equal to 'n')");
    r->n = (int)n;
    r->sampling.temperature = (float)temp;
    r->sampling.top_p = (float)top_p;
    r->sampling.min_p = (float)min_p;
    r->sampling.top_k = top_k > 0 ? (int)top_k : 0;
    r->sampling.presence_penalty = (float)pres;
    r->sampling.frequency_penalty = (float)freq;
    r->sampling.repetition_penalty = (float)rep;
    if (seed == -1) {
        uint64_t rnd;
        if (getrandom(&rnd, sizeof rnd, GRND_NONBLOCK) != sizeof rnd) rnd = (uint64_t)time(NULL) ^ r->num;
        r->seed = rnd;
    } else {
        r->seed = (uint64_t)seed;
    }

    /* stop: a string or up to 4 strings. */
    json_t *stop = field(body, "stop");
    if (stop) {
        if (json_is_string(stop)) {
            if (!valid_utf8_str(stop)) return bad(e, "stop", "'stop' is not valid UTF-8");
            r->stops[r->n_stops++] = arena_strndup(&r->mem, json_string_value(stop), json_string_length(stop));
        } else if (json_is_array(stop)) {
            if (json_array_size(stop) > STREAM_MAX_STOPS)
                return bad(e, "stop", "'stop' may hold at most %d strings", STREAM_MAX_STOPS);
            size_t i;
            json_t *v;
            json_array_foreach(stop, i, v) {
                if (!json_is_string(v)) return bad(e, "stop", "'stop' must be a string or an array of strings");
                if (!valid_utf8_str(v)) return bad(e, "stop", "'stop' is not valid UTF-8");
                r->stops[r->n_stops++] = arena_strndup(&r->mem, json_string_value(v), json_string_length(v));
            }
        } else {
            return bad(e, "stop", "'stop' must be a string or an array of strings");
        }
    }

    /* logit_bias: {"token id": bias in [-100, 100]}. */
    json_t *lb = field(body, "logit_bias");
    if (lb) {
        if (!json_is_object(lb)) return bad(e, "logit_bias", "'logit_bias' must be an object");
        size_t nb = json_object_size(lb);
        int32_t *ids = arena_alloc(&r->mem, (nb + 1) * sizeof *ids);
        float *vals = arena_alloc(&r->mem, (nb + 1) * sizeof *vals);
        const char *k;
        json_t *v;
        int cnt = 0;
        json_object_foreach(lb, k, v) {
            char *end;
            long id = strtol(k, &end, 10);
            if (!*k || *end || id < 0 || id >= s->info->n_vocab)
                return bad(e, "logit_bias", "'logit_bias' key '%.40s' is not a token id in [0, %d)", k,
                           s->info->n_vocab);
            if (!json_is_number(v) || json_number_value(v) < -100 || json_number_value(v) > 100)
                return bad(e, "logit_bias", "'logit_bias' values must be numbers between -100 and 100");
            ids[cnt] = (int32_t)id;
            vals[cnt] = (float)json_number_value(v);
            cnt++;
        }
        r->sampling.bias_ids = ids;
        r->sampling.bias_values = vals;
        r->sampling.n_bias = cnt;
    }
    json_t *user = field(body, "user");
    if (user && !json_is_string(user)) return bad(e, "user", "'user' must be a string");
    return true;
}

/* max_tokens against the context: OpenAI's wording, both numbers named. */
static bool check_lengths(server *s, request *r, long long max_tokens, bool explicit_max, verr *e) {
    int n_ctx = s->info->n_ctx;
    int longest = 0;
    for (int i = 0; i < r->n_prompts; i++) longest = r->prompt_len[i] > longest ? r->prompt_len[i] : longest;
    if (longest >= n_ctx) {
        bad(e, r->kind == REQ_CHAT ? "messages" : "prompt",
            "This model's maximum context length is %d tokens. However, your prompt has %d tokens. Please reduce "
            "the length of the prompt.", n_ctx, longest);
        e->code = "context_length_exceeded";
        return false;
    }
    if (explicit_max && longest + max_tokens > n_ctx) {
        bad(e, r->kind == REQ_CHAT ? "max_tokens" : "max_tokens",
            "This model's maximum context length is %d tokens. However, you requested %lld tokens (%d in the %s, "
            "%lld for the completion). Please reduce the length of the %s or the completion.", n_ctx,
            longest + max_tokens, longest, r->kind == REQ_CHAT ? "messages" : "prompt", max_tokens,
            r->kind == REQ_CHAT ? "messages" : "prompt");
        e->code = "context_length_exceeded";
        return false;
    }
    if (!explicit_max) max_tokens = max_tokens < n_ctx - longest ? max_tokens : n_ctx - longest;
    r->max_tokens = (int)max_tokens;
    return true;
}

static void make_id(server *s, request *r, const char *prefix) {
    uint64_t a = 0, b = 0;
    if (getrandom(&a, sizeof a, GRND_NONBLOCK) != sizeof a) a = (uint64_t)time(NULL);
    b = atomic_fetch_add(&s->next_id, 1);
    r->num = b;
    snprintf(r->id, sizeof r->id, "%s%016llx%08llx", prefix, (unsigned long long)a, (unsigned long long)b);
}

/* ==== Prompts ========================================================== */

static bool tokenize_into(server *s, request *r, int idx, const engine_fragment *frags, int n_frags, bool add_bos,
                          verr *e) {
    int n = engine_tokenize_fragments(s->eng, frags, n_frags, add_bos, NULL, 0);
    if (n < 0) return bad(e, "prompt", "the prompt cannot be tokenized");
    int32_t *ids = arena_alloc(&r->mem, ((size_t)n + 1) * sizeof *ids);
    if (!ids) return bad(e, "prompt", "out of memory");
    engine_tokenize_fragments(s->eng, frags, n_frags, add_bos, ids, n);
    r->prompt_tokens[idx] = ids;
    r->prompt_len[idx] = n;
    return true;
}

static bool token_array(server *s, request *r, int idx, json_t *arr, verr *e) {
    size_t n = json_array_size(arr);
    if (n == 0) return bad(e, "prompt", "'prompt' must not be empty");
    int32_t *ids = arena_alloc(&r->mem, n * sizeof *ids);
    if (!ids) return bad(e, "prompt", "out of memory");
    for (size_t i = 0; i < n; i++) {
        json_t *v = json_array_get(arr, i);
        if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) >= s->info->n_vocab)
            return bad(e, "prompt", "token ids in 'prompt' must be integers in [0, %d)", s->info->n_vocab);
        ids[i] = (int32_t)json_integer_value(v);
    }
    r->prompt_tokens[idx] = ids;
    r->prompt_len[idx] = (int)n;
    return true;
}

/* prompt: a string, an array of strings, an array of token ids, or an array
 * of arrays of token ids. */
static bool parse_prompt(server *s, request *r, json_t *body, verr *e) {
    json_t *p = field(body, "prompt");
    if (!p) return bad(e, "prompt", "'prompt' is required");
    json_t *items[MAX_PROMPTS];
    int n = 0;
    bool ids_single = false;
    if (json_is_string(p)) {
        items[n++] = p;
    } else if (json_is_array(p)) {
        if (json_array_size(p) == 0) return bad(e, "prompt", "'prompt' must not be empty");
        json_t *first = json_array_get(p, 0);
        if (json_is_integer(first)) {
            ids_single = true;
        } else {
            if (json_array_size(p) > MAX_PROMPTS) return bad(e, "prompt", "at most %d prompts per request", MAX_PROMPTS);
            size_t i;
            json_t *v;
            json_array_foreach(p, i, v) {
                if (!json_is_string(v) && !json_is_array(v))
                    return bad(e, "prompt", "'prompt' must be a string, an array of strings or of token ids");
                items[n++] = v;
            }
        }
    } else {
        return bad(e, "prompt", "'prompt' must be a string, an array of strings or of token ids");
    }
    r->n_prompts = ids_single ? 1 : n;
    r->prompt_tokens = arena_alloc(&r->mem, (size_t)r->n_prompts * sizeof *r->prompt_tokens);
    r->prompt_len = arena_alloc(&r->mem, (size_t)r->n_prompts * sizeof *r->prompt_len);
    if (ids_single) return token_array(s, r, 0, p, e);
    for (int i = 0; i < n; i++) {
        if (json_is_array(items[i])) {
            if (!token_array(s, r, i, items[i], e)) return false;
            continue;
        }
        if (!valid_utf8_str(items[i])) return bad(e, "prompt", "'prompt' is not valid UTF-8");
        engine_fragment f = {json_string_value(items[i]), json_string_length(items[i]), false};
        if (!tokenize_into(s, r, i, &f, 1, s->info->add_bos, e)) return false;
        if (r->prompt_len[i] == 0) return bad(e, "prompt", "'prompt' is empty and the model adds no BOS token");
    }
    return true;
}

static bool parse_messages(server *s, request *r, json_t *body, verr *e) {
    json_t *ms = field(body, "messages");
    if (!ms || !json_is_array(ms) || json_array_size(ms) == 0)
        return bad(e, "messages", "'messages' must be a non-empty array");
    size_t n = json_array_size(ms);
    if (n > MAX_MESSAGES) return bad(e, "messages", "at most %d messages per request", MAX_MESSAGES);
    chat_message *msgs = arena_alloc(&r->mem, n * sizeof *msgs);
    for (size_t i = 0; i < n; i++) {
        json_t *m = json_array_get(ms, i);
        if (!json_is_object(m)) return bad(e, "messages", "messages[%zu] must be an object", i);
        json_t *role = json_object_get(m, "role");
        if (!json_is_string(role)) return bad(e, "messages", "messages[%zu].role must be a string", i);
        const char *rs = json_string_value(role);
        if (!strcmp(rs, "developer")) rs = "system";
        if (strcmp(rs, "system") && strcmp(rs, "user") && strcmp(rs, "assistant"))
            return bad(e, "messages", "messages[%zu].role '%.32s' is not supported (system, user, assistant)", i, rs);
        json_t *c = json_object_get(m, "content");
        buf text = {0};
        if (json_is_string(c)) {
            buf_append(&text, json_string_value(c), json_string_length(c));
        } else if (json_is_array(c)) {
            size_t j;
            json_t *part;
            json_array_foreach(c, j, part) {
                json_t *type = json_object_get(part, "type"), *t = json_object_get(part, "text");
                if (!json_is_object(part) || !json_is_string(type) || strcmp(json_string_value(type), "text") ||
                    !json_is_string(t)) {
                    buf_free(&text);
                    return bad(e, "messages", "messages[%zu].content parts must be {\"type\": \"text\", \"text\": ...}",
                               i);
                }
                buf_append(&text, json_string_value(t), json_string_length(t));
            }
        } else if (json_is_null(c) && !strcmp(rs, "assistant")) {
            /* an assistant turn with no content */
        } else {
            return bad(e, "messages", "messages[%zu].content must be a string or an array of text parts", i);
        }
        if (text.len && !utf8_valid(text.p, text.len)) {
            buf_free(&text);
            return bad(e, "messages", "messages[%zu].content is not valid UTF-8", i);
        }
        msgs[i].role = arena_strndup(&r->mem, rs, strlen(rs));
        msgs[i].content = arena_strndup(&r->mem, text.p ? text.p : "", text.len);
        msgs[i].len = text.len;
        buf_free(&text);
    }
    buf text = {0};
    engine_fragment *frags = malloc(MAX_FRAGS * sizeof *frags);
    bool add_bos = false;
    int nf = frags ? chat_render(s->chat_family, msgs, (int)n, &text, frags, MAX_FRAGS, &add_bos) : -1;
    r->n_prompts = 1;
    r->prompt_tokens = arena_alloc(&r->mem, sizeof *r->prompt_tokens);
    r->prompt_len = arena_alloc(&r->mem, sizeof *r->prompt_len);
    bool ok = nf >= 0 ? tokenize_into(s, r, 0, frags, nf, add_bos && s->info->add_bos, e)
                      : bad(e, "messages", "the conversation is too long to render");
    free(frags);
    buf_free(&text);
    if (!ok) return false;
    /* Llama 2's template drops a system message that no turn follows, as
     * its reference Jinja does: nothing would be left to prefill. */
    if (r->prompt_len[0] == 0)
        return bad(e, "messages", "the messages render to an empty prompt with the %s template (add a user turn)",
                   s->chat_family);
    /* The turn ends at the template's end marker; when the model has no
     * such control token (e.g. ChatML on a base model) it is a stop string. */
    const char *end = chat_end_marker(s->chat_family);
    if (engine_token_lookup(s->eng, end) < 0 && r->n_stops < STREAM_MAX_STOPS) {
        bool dup = false;
        for (int i = 0; i < r->n_stops; i++) dup |= !strcmp(r->stops[i], end);
        if (!dup) r->stops[r->n_stops++] = end;
    }
    return true;
}

/* ==== /v1/completions and /v1/chat/completions ========================= */

static enum MHD_Result respond_verr(server *s, struct MHD_Connection *conn, const verr *e) {
    unsigned st = e->status ? (unsigned)e->status : 400;
    metrics_request_failure(s->m, st >= 500 ? FAIL_INTERNAL : FAIL_BAD_REQUEST);
    return http_error(s, conn, st, st >= 500 ? "server_error" : "invalid_request_error", e->msg, e->param, e->code);
}

int routes_parse_request(server *s, req_kind kind, const char *body, size_t len, request **out, routes_verr *e) {
    *out = NULL;
    memset(e, 0, sizeof *e);
    json_error_t jerr;
    json_t *root = json_loadb(body, len, JSON_REJECT_DUPLICATES, &jerr);
    if (!root) {
        snprintf(e->msg, sizeof e->msg, "We could not parse the JSON body of your request: %s (line %d, column %d)",
                 jerr.text, jerr.line, jerr.column);
        return -1;
    }
    if (!json_is_object(root)) {
        json_decref(root);
        snprintf(e->msg, sizeof e->msg, "The request body must be a JSON object.");
        return -1;
    }
    request *r = request_new(kind);
    if (!r) {
        json_decref(root);
        e->status = 500;
        snprintf(e->msg, sizeof e->msg, "out of memory");
        return -1;
    }
    make_id(s, r, kind == REQ_CHAT ? "chatcmpl-" : "cmpl-");
    r->created = (long long)time(NULL);
    json_t *model = field(root, "model");
    bool ok = true;
    if (model && !json_is_string(model)) ok = bad(e, "model", "'model' must be a string");
    r->model = arena_strndup(&r->mem, s->model_id, strlen(s->model_id));
    ok = ok && parse_common(s, r, root, e);
    long long max_tokens = kind == REQ_CHAT ? s->info->n_ctx : s->cfg->default_max_tokens;
    bool explicit_max = false;
    long long limit = s->cfg->max_tokens_limit > 0 ? s->cfg->max_tokens_limit : s->info->n_ctx;
    if (ok) {
        const char *mk = field(root, "max_completion_tokens") ? "max_completion_tokens" : "max_tokens";
        explicit_max = field(root, mk) != NULL;
        ok = get_int(root, mk, kind == REQ_CHAT ? 1 : 0, limit, &max_tokens, e);
        if (!explicit_max && max_tokens > limit) max_tokens = limit;
    }
    if (ok && kind == REQ_COMPLETION) {
        json_t *lp = field(root, "logprobs");
        if (lp) {
            if (!json_is_integer(lp) || json_integer_value(lp) < 0 || json_integer_value(lp) > 5)
                ok = bad(e, "logprobs", "'logprobs' must be an integer between 0 and 5");
            else
                r->logprobs = (int)json_integer_value(lp);
        }
        ok = ok && get_bool(root, "echo", &r->echo, e);
        r->prompt_logprobs = r->echo && r->logprobs >= 0;
        json_t *suffix = field(root, "suffix");
        if (ok && suffix) ok = bad(e, "suffix", "'suffix' is not supported by this model");
        ok = ok && parse_prompt(s, r, root, e);
    } else if (ok) {
        bool lp = false;
        long long top = 0;
        ok = get_bool(root, "logprobs", &lp, e) && get_int(root, "top_logprobs", 0, 20, &top, e);
        if (ok && field(root, "top_logprobs") && !lp)
            ok = bad(e, "top_logprobs", "'top_logprobs' requires 'logprobs' to be true");
        if (ok && lp) r->logprobs = (int)top;
        ok = ok && parse_messages(s, r, root, e);
    }
    /* max_tokens == 0 with no echo is still a valid request (prompt
     * accounting only). */
    ok = ok && check_lengths(s, r, max_tokens, explicit_max, e);
    /* Every choice is a running sequence: more than max_running could never
     * be admitted, so refuse now instead of waiting forever. */
    if (ok && r->n_prompts * r->n > s->cfg->max_running)
        ok = bad(e, "n", "%d prompt(s) x n=%d choices exceed the %d sequences this server runs at once",
                 r->n_prompts, r->n, s->cfg->max_running);
    json_decref(root);
    if (!ok) {
        request_unref(r);
        return -1;
    }
    for (int i = 0; i < r->n_prompts; i++) r->total_prompt_tokens += r->prompt_len[i];
    if (request_alloc_choices(r) != 0) {
        request_unref(r);
        e->status = 500;
        snprintf(e->msg, sizeof e->msg, "out of memory");
        return -1;
    }
    *out = r;
    return 0;
}

static enum MHD_Result handle_generate(server *s, struct MHD_Connection *conn, const char *body, size_t len,
                                       req_kind kind, request **out) {
    verr e;
    request *r;
    if (routes_parse_request(s, kind, body, len, &r, &e) != 0) return respond_verr(s, conn, &e);
    if (r->max_tokens == 0) {
        /* Echo-only (or empty) completions never reach the scheduler; they
         * are counted here as the scheduler counts the others: per choice,
         * with their prompt tokens. */
        metrics_add_prompt_tokens(s->m, (uint64_t)r->total_prompt_tokens);
        for (int i = 0; i < r->n_choices; i++) {
            r->finish[i] = "length";
            metrics_request_success(s->m, FIN_LENGTH);
        }
        r->n_finished_loop = r->n_choices;
        r->loop_done = true;
        enum MHD_Result rc = routes_respond_final(s, conn, r);
        request_unref(r);
        return rc;
    }
    int rc = s->draining ? SCHED_EDRAINING : sched_submit(s->sched, r);
    if (rc != 0) {
        request_unref(r);
        if (rc == SCHED_EFULL) {
            metrics_request_failure(s->m, FAIL_QUEUE_FULL);
            return http_error(s, conn, 429, "rate_limit_error",
                              "The server is busy: too many requests are waiting. Retry shortly.", NULL,
                              "queue_full");
        }
        metrics_request_failure(s->m, FAIL_UNAVAILABLE);
        return http_error(s, conn, 503, "server_error", "The server is shutting down.", NULL, "unavailable");
    }
    LOG_DEBUG(r->id, "queued: %d prompt tokens, %d choices, max_tokens %d%s", r->total_prompt_tokens, r->n_choices,
              r->max_tokens, r->stream ? ", stream" : "");
    *out = r;
    if (!r->stream) return MHD_YES;
    /* Streams start right away: headers, then the first chunks. */
    r->conn = conn;
    routes_consume_events(s, r, NULL);
    return http_start_stream(s, conn, r);
}

/* ==== Response building ================================================ */

/* A token as text for logprobs: its bytes, invalid UTF-8 replaced. */
static json_t *token_text(server *s, int32_t id, json_t **bytes_out) {
    char raw[256], clean[3 * 256];
    int n = engine_token_bytes(s->eng, id, raw, sizeof raw);
    if (n < 0) n = 0;
    if (n > (int)sizeof raw) n = sizeof raw;
    if (bytes_out) {
        *bytes_out = json_array();
        for (int i = 0; i < n; i++) json_array_append_new(*bytes_out, json_integer((unsigned char)raw[i]));
    }
    size_t m = utf8_sanitize(raw, (size_t)n, clean);
    return json_stringn(clean, m);
}

/* Legacy completions logprobs for a run of events of one choice. */
static json_t *legacy_logprobs(server *s, const req_event *const *evs, int n, int *offset) {
    json_t *tokens = json_array(), *lps = json_array(), *tops = json_array(), *offs = json_array();
    for (int i = 0; i < n; i++) {
        const req_event *ev = evs[i];
        json_t *t = token_text(s, ev->token, NULL);
        json_array_append_new(offs, json_integer(*offset));
        *offset += (int)json_string_length(t);
        json_array_append_new(tokens, t);
        if (isnan(ev->logprob)) { /* the first prompt token has no logprob */
            json_array_append_new(lps, json_null());
            json_array_append_new(tops, json_null());
            continue;
        }
        json_array_append_new(lps, json_real(ev->logprob));
        json_t *top = json_object();
        for (int k = 0; k < ev->n_top; k++) {
            json_t *tt = token_text(s, ev->top_ids[k], NULL);
            json_object_set_new(top, json_string_value(tt), json_real(ev->top_lps[k]));
            json_decref(tt);
        }
        json_array_append_new(tops, top);
    }
    return json_pack("{s:o, s:o, s:o, s:o}", "tokens", tokens, "token_logprobs", lps, "top_logprobs", tops,
                     "text_offset", offs);
}

/* Chat logprobs entries for events. */
static json_t *chat_logprob_entries(server *s, const req_event *const *evs, int n) {
    json_t *arr = json_array();
    for (int i = 0; i < n; i++) {
        const req_event *ev = evs[i];
        json_t *bytes;
        json_t *t = token_text(s, ev->token, &bytes);
        json_t *top = json_array();
        for (int k = 0; k < ev->n_top; k++) {
            json_t *tb;
            json_t *tt = token_text(s, ev->top_ids[k], &tb);
            json_array_append_new(top, json_pack("{s:o, s:f, s:o}", "token", tt, "logprob", (double)ev->top_lps[k],
                                                 "bytes", tb));
        }
        json_array_append_new(arr, json_pack("{s:o, s:f, s:o, s:o}", "token", t, "logprob", (double)ev->logprob,
                                             "bytes", bytes, "top_logprobs", top));
    }
    return arr;
}

static json_t *usage_json(const request *r) {
    return json_pack("{s:i, s:i, s:i}", "prompt_tokens", r->total_prompt_tokens, "completion_tokens",
                     r->completion_tokens, "total_tokens", r->total_prompt_tokens + r->completion_tokens);
}

static json_t *chunk_base(const request *r) {
    return json_pack("{s:s, s:s, s:I, s:s}", "id", r->id, "object",
                     r->kind == REQ_CHAT ? "chat.completion.chunk" : "text_completion", "created",
                     (json_int_t)r->created, "model", r->model);
}

static void sse_send(request *r, json_t *o) {
    char *t = json_dumps(o, JSON_COMPACT);
    json_decref(o);
    if (!t) return;
    buf_append(&r->sse, "data: ", 6);
    buf_append(&r->sse, t, strlen(t));
    buf_append(&r->sse, "\n\n", 2);
    free(t);
}

static void sse_choice(request *r, int index, json_t *payload_or_delta, json_t *logprobs, const char *finish) {
    json_t *o = chunk_base(r);
    json_t *c = json_pack("{s:i}", "index", index);
    if (r->kind == REQ_CHAT) json_object_set_new(c, "delta", payload_or_delta);
    else json_object_set_new(c, "text", payload_or_delta);
    json_object_set_new(c, "logprobs", logprobs ? logprobs : json_null());
    json_object_set_new(c, "finish_reason", finish ? json_string(finish) : json_null());
    json_object_set_new(o, "choices", json_pack("[o]", c));
    if (r->include_usage) json_object_set_new(o, "usage", json_null());
    sse_send(r, o);
}

/* Prompt text for echo. */
static void prompt_text(server *s, const request *r, int p, buf *out) {
    char tmp[256];
    for (int i = 0; i < r->prompt_len[p]; i++) {
        int n = engine_token_bytes(s->eng, r->prompt_tokens[p][i], tmp, sizeof tmp);
        if (n > 0) buf_append(out, tmp, (size_t)n < sizeof tmp ? (size_t)n : sizeof tmp);
    }
    /* Drop the dummy-prefix space the tokenizer added after BOS. */
    if (out->len && out->p[0] == ' ' && r->prompt_len[p] && r->prompt_tokens[p][0] == s->info->bos) buf_consume(out, 1);
    else if (out->len && out->p[0] == ' ' && s->info->add_bos) buf_consume(out, 1);
    char *clean = malloc(3 * out->len + 1);
    if (clean) {
        size_t m = utf8_sanitize(out->p, out->len, clean);
        buf_reset(out);
        buf_append(out, clean, m);
        free(clean);
    }
}

void routes_consume_events(server *s, request *r, req_outbox *out) {
    if (!out) {
        /* Stream start: the role delta (chat) or the echoed prompt. */
        for (int i = 0; i < r->n_choices; i++) {
            if (r->kind == REQ_CHAT) {
                sse_choice(r, i, json_pack("{s:s, s:s}", "role", "assistant", "content", ""), NULL, NULL);
            } else if (r->echo) {
                buf t = {0};
                prompt_text(s, r, r->choices[i].prompt, &t);
                sse_choice(r, i, json_stringn(t.p ? t.p : "", t.len), NULL, NULL);
                buf_free(&t);
            }
        }
        return;
    }
    for (int k = 0; k < out->n; k++) {
        const req_event *ev = &out->ev[k];
        int ci = ev->choice;
        if (ev->type == EV_ERROR) {
            if (r->error_status) continue;
            r->error_status = ev->status;
            snprintf(r->error_msg, sizeof r->error_msg, "%s", ev->message);
            continue;
        }
        if (ci < 0 || ci >= r->n_choices) continue;
        if (ev->type == EV_TOKEN) {
            const char *text = out->text.p ? out->text.p + ev->text_off : "";
            bool has_token = ev->token >= 0;
            if (has_token && !ev->prompt) r->completion_tokens++;
            json_t *lp = NULL;
            if (has_token && r->logprobs >= 0) {
                const req_event *one[1] = {ev};
                if (r->kind == REQ_CHAT) {
                    lp = chat_logprob_entries(s, one, 1);
                } else {
                    int off = r->text_tokens[ci];
                    lp = legacy_logprobs(s, one, 1, &off);
                    r->text_tokens[ci] = off;
                }
            }
            if (r->stream) {
                if (ev->text_len == 0 && !lp) continue;
                json_t *t = json_stringn(text, ev->text_len);
                if (r->kind == REQ_CHAT) {
                    json_t *d = json_pack("{s:o}", "content", t);
                    sse_choice(r, ci, d, lp ? json_pack("{s:o}", "content", lp) : NULL, NULL);
                } else {
                    sse_choice(r, ci, t, lp, NULL);
                }
            } else {
                buf_append(&r->texts[ci], text, ev->text_len);
                if (lp) {
                    if (!r->lp[ci]) r->lp[ci] = lp;
                    else if (r->kind == REQ_CHAT) json_array_extend(r->lp[ci], lp), json_decref(lp);
                    else {
                        static const char *keys[] = {"tokens", "token_logprobs", "top_logprobs", "text_offset"};
                        for (int q = 0; q < 4; q++)
                            json_array_extend(json_object_get(r->lp[ci], keys[q]), json_object_get(lp, keys[q]));
                        json_decref(lp);
                    }
                }
            }
        } else if (ev->type == EV_FINISH) {
            r->finish[ci] = ev->finish_reason;
            r->n_finished_loop++;
            if (r->stream) {
                sse_choice(r, ci, r->kind == REQ_CHAT ? json_object() : json_string(""), NULL, ev->finish_reason);
            }
        }
    }
    bool done = r->n_finished_loop == r->n_choices || r->error_status;
    if (!done || r->loop_done) return;
    r->loop_done = true;
    if (r->stream) {
        if (r->error_status && r->n_finished_loop < r->n_choices) {
            /* The stream has begun: the error travels as an event. */
            json_t *err = json_pack("{s:{s:s, s:s, s:n, s:s}}", "error", "message", r->error_msg, "type",
                                    r->error_status == 408 ? "timeout_error" : "server_error", "param", "code",
                                    r->error_status == 408 ? "request_timeout" : "internal_error");
            sse_send(r, err);
        } else if (r->include_usage) {
            json_t *o = chunk_base(r);
            json_object_set_new(o, "choices", json_array());
            json_object_set_new(o, "usage", usage_json(r));
            sse_send(r, o);
        }
        buf_append(&r->sse, "data: [DONE]\n\n", 14);
    }
}

enum MHD_Result routes_respond_final(server *s, struct MHD_Connection *conn, request *r) {
    if (r->error_status && r->n_finished_loop < r->n_choices) {
        unsigned st = r->error_status == 499 ? 503 : (unsigned)r->error_status;
        return http_error(s, conn, st, st == 408 ? "timeout_error" : st == 400 ? "invalid_request_error" : "server_error",
                          r->error_msg, NULL, st == 408 ? "request_timeout" : NULL);
    }
    json_t *choices = json_array();
    for (int i = 0; i < r->n_choices; i++) {
        json_t *lp = r->lp[i] ? json_incref(r->lp[i]) : json_null();
        const char *text = r->texts[i].p ? r->texts[i].p : "";
        size_t tl = r->texts[i].len;
        const char *fin = r->finish[i] ? r->finish[i] : "stop";
        if (r->kind == REQ_CHAT) {
            json_t *msg = json_pack("{s:s, s:s%}", "role", "assistant", "content", text, tl);
            json_array_append_new(choices, json_pack("{s:i, s:o, s:o, s:s}", "index", i, "message", msg, "logprobs",
                                                     r->lp[i] ? json_pack("{s:o}", "content", lp) : lp,
                                                     "finish_reason", fin));
        } else {
            buf full = {0};
            if (r->echo) prompt_text(s, r, r->choices[i].prompt, &full);
            buf_append(&full, text, tl);
            json_array_append_new(choices, json_pack("{s:s%, s:i, s:o, s:s}", "text", full.p ? full.p : "", full.len,
                                                     "index", i, "logprobs", lp, "finish_reason", fin));
            buf_free(&full);
        }
    }
    json_t *o = json_pack("{s:s, s:s, s:I, s:s, s:o, s:o}", "id", r->id, "object",
                          r->kind == REQ_CHAT ? "chat.completion" : "text_completion", "created",
                          (json_int_t)r->created, "model", r->model, "choices", choices, "usage", usage_json(r));
    char *t = json_dumps(o, JSON_COMPACT);
    json_decref(o);
    enum MHD_Result rc = http_respond(s, conn, 200, "application/json", t ? t : "{}", t ? strlen(t) : 2);
    free(t);
    return rc;
}

/* ==== Other endpoints ================================================== */

static enum MHD_Result respond_json(server *s, struct MHD_Connection *conn, unsigned status, json_t *o) {
    char *t = json_dumps(o, JSON_COMPACT);
    json_decref(o);
    enum MHD_Result rc = http_respond(s, conn, status, "application/json", t ? t : "{}", t ? strlen(t) : 2);
    free(t);
    return rc;
}

static json_t *shared_attention_json(server *s) {
    const engine_info *in = s->info;
    json_t *src = json_array();
    for (int l = 0; l < in->n_layer; l++) json_array_append_new(src, json_integer(in->layer_source[l]));
    return json_pack("{s:s, s:s, s:i, s:o, s:I, s:I, s:f}", "shared_layers", in->shared_layers, "origin",
                     in->shared_origin, "n_shared", in->n_shared, "layer_source", src, "kv_bytes_per_token",
                     (json_int_t)in->kv_bytes_per_token, "kv_bytes_per_token_unshared",
                     (json_int_t)in->kv_bytes_per_token_unshared, "kv_saving_ratio",
                     in->kv_bytes_per_token_unshared
                         ? 1.0 - (double)in->kv_bytes_per_token / (double)in->kv_bytes_per_token_unshared
                         : 0.0);
}

static enum MHD_Result handle_models(server *s, struct MHD_Connection *conn) {
    const engine_info *in = s->info;
    json_t *m = json_pack("{s:s, s:s, s:I, s:s, s:i, s:s, s:o}", "id", s->model_id, "object", "model", "created",
                          (json_int_t)s->created, "owned_by", "saserve", "max_model_len", in->n_ctx, "arch", in->arch,
                          "shared_attention", shared_attention_json(s));
    return respond_json(s, conn, 200, json_pack("{s:s, s:[o]}", "object", "list", "data", m));
}

static enum MHD_Result handle_tokenize(server *s, struct MHD_Connection *conn, const char *body, size_t len) {
    verr e = {0};
    json_t *root = json_loadb(body, len, 0, NULL);
    json_t *content = root ? json_object_get(root, "content") : NULL;
    if (!root || !json_is_object(root) || !json_is_string(content)) {
        json_decref(root);
        bad(&e, "content", "the body must be a JSON object with a string 'content'");
        return respond_verr(s, conn, &e);
    }
    bool add_special = false, with_pieces = false, parse_special = false;
    if (!get_bool(root, "add_special", &add_special, &e) || !get_bool(root, "with_pieces", &with_pieces, &e) ||
        !get_bool(root, "parse_special", &parse_special, &e)) {
        json_decref(root);
        return respond_verr(s, conn, &e);
    }
    engine_fragment f = {json_string_value(content), json_string_length(content), parse_special};
    int n = engine_tokenize_fragments(s->eng, &f, 1, add_special && s->info->add_bos, NULL, 0);
    int32_t *ids = n > 0 ? malloc((size_t)n * sizeof *ids) : NULL;
    if (n > 0 && ids) engine_tokenize_fragments(s->eng, &f, 1, add_special && s->info->add_bos, ids, n);
    json_t *toks = json_array();
    for (int i = 0; i < n && ids; i++) {
        if (with_pieces) {
            char raw[256], clean[3 * 256];
            int bl = engine_token_bytes(s->eng, ids[i], raw, sizeof raw);
            bl = bl < 0 ? 0 : bl > 256 ? 256 : bl;
            json_array_append_new(toks, json_pack("{s:i, s:s%}", "id", ids[i], "piece", clean,
                                                  utf8_sanitize(raw, (size_t)bl, clean)));
        } else {
            json_array_append_new(toks, json_integer(ids[i]));
        }
    }
    free(ids);
    json_decref(root);
    return respond_json(s, conn, 200, json_pack("{s:o}", "tokens", toks));
}

static enum MHD_Result handle_detokenize(server *s, struct MHD_Connection *conn, const char *body, size_t len) {
    verr e = {0};
    json_t *root = json_loadb(body, len, 0, NULL);
    json_t *toks = root ? json_object_get(root, "tokens") : NULL;
    if (!root || !json_is_array(toks)) {
        json_decref(root);
        bad(&e, "tokens", "the body must be a JSON object with an array 'tokens'");
        return respond_verr(s, conn, &e);
    }
    size_t n = json_array_size(toks);
    int32_t *ids = malloc((n + 1) * sizeof *ids);
    for (size_t i = 0; i < n; i++) {
        json_t *v = json_array_get(toks, i);
        if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) >= s->info->n_vocab) {
            free(ids);
            json_decref(root);
            bad(&e, "tokens", "'tokens' must hold integers in [0, %d)", s->info->n_vocab);
            return respond_verr(s, conn, &e);
        }
        ids[i] = (int32_t)json_integer_value(v);
    }
    /* Running text: the pieces concatenated, as the stream would give them. */
    buf raw = {0};
    char tmp[256];
    for (size_t i = 0; i < n; i++) {
        int bl = engine_token_bytes(s->eng, ids[i], tmp, sizeof tmp);
        if (bl > 0) buf_append(&raw, tmp, (size_t)bl < sizeof tmp ? (size_t)bl : sizeof tmp);
    }
    char *clean = malloc(3 * raw.len + 1);
    size_t m = clean ? utf8_sanitize(raw.p ? raw.p : "", raw.len, clean) : 0;
    json_t *o = json_pack("{s:s%}", "content", clean ? clean : "", m);
    free(clean);
    buf_free(&raw);
    free(ids);
    json_decref(root);
    return respond_json(s, conn, 200, o);
}

static enum MHD_Result handle_metrics(server *s, struct MHD_Connection *conn) {
    sched_stats st;
    sched_snapshot(s->sched, &st);
    metrics_state ms = {.info = s->info, .model_id = s->model_id, .running = st.running_requests,
                        .waiting = st.waiting, .kv_used_blocks = st.kv_used_blocks,
                        .kv_total_blocks = st.kv_total_blocks};
    engine_get_prefix_stats(s->eng, &ms.prefix);
    engine_get_counters(s->eng, &ms.counters);
    buf out = {0};
    metrics_render(s->m, &ms, &out);
    enum MHD_Result rc = http_respond(s, conn, 200, "text/plain; version=0.0.4; charset=utf-8", out.p ? out.p : "",
                                      out.len);
    buf_free(&out);
    return rc;
}

static enum MHD_Result handle_options(server *s, struct MHD_Connection *conn) {
    struct MHD_Response *resp = MHD_create_response_from_buffer(0, (void *)"", MHD_RESPMEM_PERSISTENT);
    if (!resp) return MHD_NO;
    http_add_common_headers(s, conn, resp);
    if (s->cfg->cors_origins[0]) {
        MHD_add_response_header(resp, "Access-Control-Allow-Methods", "GET, POST, OPTIONS");
        MHD_add_response_header(resp, "Access-Control-Allow-Headers", "Authorization, Content-Type");
        MHD_add_response_header(resp, "Access-Control-Max-Age", "86400");
    }
    enum MHD_Result rc = MHD_queue_response(conn, 204, resp);
    MHD_destroy_response(resp);
    return rc;
}

enum MHD_Result routes_dispatch(server *s, struct MHD_Connection *conn, const char *method, const char *url,
                                const char *body, size_t body_len, request **req_out) {
    *req_out = NULL;
    bool get = !strcmp(method, "GET"), post = !strcmp(method, "POST");
    if (!strcmp(method, "OPTIONS")) return handle_options(s, conn);
    struct {
        const char *path;
        bool post;
    } routes[] = {{"/v1/completions", true}, {"/v1/chat/completions", true}, {"/tokenize", true},
                  {"/detokenize", true},     {"/v1/models", false},         {"/health", false},
                  {"/metrics", false},       {"/completions", true},        {"/chat/completions", true},
                  {"/models", false}};
    for (size_t i = 0; i < sizeof routes / sizeof routes[0]; i++) {
        if (strcmp(url, routes[i].path)) continue;
        if ((routes[i].post && !post) || (!routes[i].post && !get))
            return http_error(s, conn, 405, "invalid_request_error", "Method not allowed for this endpoint.", NULL,
                              "method_not_allowed");
        const char *p = url;
        if (!strncmp(p, "/v1", 3)) p += 3;
        if (!strcmp(p, "/completions")) return handle_generate(s, conn, body, body_len, REQ_COMPLETION, req_out);
        if (!strcmp(p, "/chat/completions")) return handle_generate(s, conn, body, body_len, REQ_CHAT, req_out);
        if (!strcmp(p, "/tokenize")) return handle_tokenize(s, conn, body, body_len);
        if (!strcmp(p, "/detokenize")) return handle_detokenize(s, conn, body, body_len);
        if (!strcmp(p, "/models")) return handle_models(s, conn);
        if (!strcmp(p, "/metrics")) {
            if (!s->cfg->metrics)
                return http_error(s, conn, 404, "invalid_request_error", "Metrics are disabled.", NULL, "not_found");
            return handle_metrics(s, conn);
        }
        if (!strcmp(p, "/health")) {
            if (s->draining) return respond_json(s, conn, 503, json_pack("{s:s}", "status", "draining"));
            return respond_json(s, conn, 200, json_pack("{s:s}", "status", "ok"));
        }
    }
    char msg[300];
    snprintf(msg, sizeof msg, "Unknown endpoint %.200s %.40s.", method, url);
    return http_error(s, conn, 404, "invalid_request_error", msg, NULL, "not_found");
}
