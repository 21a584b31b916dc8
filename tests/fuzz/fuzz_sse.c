/*
 * fuzz_sse.c - the SSE side of streaming: routes_consume_events() turning
 * the scheduler's events (tokens with logprobs, finishes, errors) into the
 * bytes of an OpenAI event stream, for completions and chat.
 *
 * Input: byte 0 = flags (bit 0 chat, bits 1-2 n - 1 (1..3; up to 4 choices
 * with two prompts), bit 3 include_usage, bit 4 logprobs, bit 5 two prompts,
 * bit 6 echo); then events, each a type byte (mod 8: 0-5 token, 6 finish,
 * 7 error), a choice byte, two bytes of token id and a length byte plus
 * that many bytes of text (made valid UTF-8 as the textstream's output
 * always is).  The events follow the scheduler's protocol: nothing for a
 * choice after its finish, nothing at all after an error or once every
 * choice finished.
 *
 * Oracle: the stream is a sequence of "data: <JSON object>\n\n" events
 * ending in exactly one "data: [DONE]\n\n" once every choice finished or an
 * error came; every chunk has the endpoint's object type, one choice with a
 * valid index; each choice's deltas concatenate to exactly the text sent for
 * it; one finish_reason per choice (none after an error); the usage chunk
 * (empty choices) comes only with include_usage and no error; an error
 * arrives as one {"error": ...} event.
 */
#include <jansson.h>
#include <string.h>

#include "config.h"
#include "fuzz.h"
#include "server.h"
#include "utf8.h"

static server S;
static saserve_config cfg;

static void quiet(engine_log_level level, const char *msg, void *ud) {
    (void)level, (void)msg, (void)ud;
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc, (void)argv;
    char err[512], path[1024];
    engine_set_log(quiet, NULL);
    if (config_defaults(&cfg, err, sizeof err) != 0) exit(1);
    engine_params p = engine_default_params();
    p.model_path = fuzz_path(path, sizeof path, FUZZ_SPM_MODEL);
    p.n_threads = 1;
    p.max_seqs = 1;
    p.max_batch_tokens = 16;
    p.kv_cache_bytes = 4 << 20;
    engine *e;
    if (engine_open(&p, &e, err, sizeof err) != 0) {
        fprintf(stderr, "cannot open %s: %s\n", path, err);
        exit(1);
    }
    S.cfg = &cfg;
    S.eng = e;
    S.info = engine_get_info(e);
    S.chat_family = "chatml";
    snprintf(S.model_id, sizeof S.model_id, "sa-tiny-sa-q8_0");
    return 0;
}

#define MAXC 8

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1) return 0;
    uint8_t f = data[0];
    bool chat = f & 1, usage = f & 8, lp = f & 16, two = (f & 32) && !chat, echo = (f & 64) && !chat;
    int n = 1 + ((f >> 1) & 3) % 3;
    char body[512];
    if (chat)
        snprintf(body, sizeof body,
                 "{\"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}], \"stream\": true, \"n\": %d, "
                 "\"max_tokens\": 32%s%s}",
                 n, lp ? ", \"logprobs\": true, \"top_logprobs\": 3" : "",
                 usage ? ", \"stream_options\": {\"include_usage\": true}" : "");
    else
        snprintf(body, sizeof body, "{\"prompt\": %s, \"stream\": true, \"n\": %d, \"max_tokens\": 32%s%s%s}",
                 two ? "[\"The kernel\", \"You will\"]" : "\"The kernel\"", n, lp ? ", \"logprobs\": 3" : "",
                 usage ? ", \"stream_options\": {\"include_usage\": true}" : "", echo ? ", \"echo\": true" : "");
    request *r;
    routes_verr e;
    FUZZ_CHECK(routes_parse_request(&S, chat ? REQ_CHAT : REQ_COMPLETION, body, strlen(body), &r, &e) == 0, "%s: %s",
               body, e.msg);
    int nc = r->n_choices;
    FUZZ_CHECK(nc >= 1 && nc <= MAXC, "choices %d", nc);
    routes_consume_events(&S, r, NULL); /* stream start: role deltas / echo */
    size_t start_len = r->sse.len;

    buf sent[MAXC] = {{0}};
    bool finished[MAXC] = {false}, errored = false;
    size_t i = 1;
    int n_finished = 0;
    while (i + 5 <= size && !r->loop_done) {
        req_outbox out = {0};
        int batch = 1 + data[i] % 4; /* events per wake-up */
        /* Once every choice finished the request has left the scheduler:
         * no more events of any kind. */
        for (int b = 0; b < batch && i + 5 <= size && !errored && n_finished < nc; b++) {
            int type = data[i] % 8, ci = data[i + 1] % (nc + 1); /* nc: an index out of range */
            int32_t tok = (int32_t)(data[i + 2] | data[i + 3] << 8) % S.info->n_vocab;
            size_t tl = data[i + 4] % 16;
            i += 5;
            if (tl > size - i) tl = size - i;
            char clean[3 * 16];
            size_t cl = utf8_sanitize((const char *)data + i, tl, clean);
            i += tl;
            if (ci < nc && finished[ci]) continue;
            if (out.n == out.cap) {
                out.cap = out.cap ? out.cap * 2 : 8;
                out.ev = realloc(out.ev, (size_t)out.cap * sizeof *out.ev);
            }
            req_event *ev = &out.ev[out.n];
            memset(ev, 0, sizeof *ev);
            ev->choice = ci;
            if (type < 6) {
                ev->type = EV_TOKEN;
                ev->token = type == 5 ? -1 : tok; /* -1: text released at the finish */
                ev->logprob = -(float)(data[i - tl - 1] % 50) / 7.0f;
                ev->n_top = r->logprobs > 0 && ev->token >= 0 ? r->logprobs : 0;
                for (int k = 0; k < ev->n_top; k++) {
                    ev->top_ids[k] = (tok + 7 * k) % S.info->n_vocab;
                    ev->top_lps[k] = -0.5f * (float)k;
                }
                ev->text_off = out.text.len;
                ev->text_len = cl;
                buf_append(&out.text, clean, cl);
                if (ci < nc) buf_append(&sent[ci], clean, cl);
            } else if (type == 6) {
                ev->type = EV_FINISH;
                ev->finish_reason = data[i - 1] & 1 ? "stop" : "length";
                if (ci < nc) finished[ci] = true, n_finished++;
            } else {
                ev->type = EV_ERROR;
                ev->status = data[i - 1] & 1 ? 408 : 500;
                snprintf(ev->message, sizeof ev->message, "%s", ev->status == 408 ? "request timed out" : "internal");
                errored = true;
            }
            out.n++;
        }
        routes_consume_events(&S, r, &out);
        request_outbox_free(&out);
    }
    if (!r->loop_done) { /* the scheduler always finishes every choice */
        req_outbox out = {0};
        out.ev = calloc((size_t)nc, sizeof *out.ev);
        for (int ci = 0; ci < nc; ci++)
            if (!finished[ci]) {
                out.ev[out.n].type = EV_FINISH;
                out.ev[out.n].choice = ci;
                out.ev[out.n].finish_reason = "length";
                out.n++;
                finished[ci] = true;
            }
        routes_consume_events(&S, r, &out);
        request_outbox_free(&out);
    }
    FUZZ_CHECK(r->loop_done, "stream not done after every choice finished");

    /* Parse the stream. */
    const char *want_obj = chat ? "chat.completion.chunk" : "text_completion";
    buf got[MAXC] = {{0}};
    int finishes[MAXC] = {0}, usage_chunks = 0, error_events = 0, done = 0;
    const char *p = r->sse.p, *end = r->sse.p + r->sse.len;
    FUZZ_CHECK(r->sse.len > start_len || !r->sse.len, "nothing sent");
    while (p < end) {
        FUZZ_CHECK(!done, "bytes after [DONE]");
        FUZZ_CHECK(end - p > 6 && !memcmp(p, "data: ", 6), "event does not start with 'data: '");
        const char *e2 = memmem(p, (size_t)(end - p), "\n\n", 2);
        FUZZ_CHECK(e2 != NULL, "unterminated event");
        const char *payload = p + 6;
        size_t pl = (size_t)(e2 - payload);
        if (pl == 6 && !memcmp(payload, "[DONE]", 6)) {
            done++;
        } else {
            json_error_t je;
            json_t *o = json_loadb(payload, pl, JSON_ALLOW_NUL, &je); /* text may hold U+0000 (legal JSON) */
            FUZZ_CHECK(json_is_object(o), "event is not a JSON object: %s", je.text);
            if (json_object_get(o, "error")) {
                error_events++;
                FUZZ_CHECK(json_is_string(json_object_get(json_object_get(o, "error"), "message")), "error message");
            } else {
                const char *obj = json_string_value(json_object_get(o, "object"));
                FUZZ_CHECK(obj && !strcmp(obj, want_obj), "object %s", obj ? obj : "(none)");
                json_t *cs = json_object_get(o, "choices");
                FUZZ_CHECK(json_is_array(cs) && json_array_size(cs) <= 1, "choices");
                if (json_array_size(cs) == 0) {
                    usage_chunks++;
                    FUZZ_CHECK(json_is_object(json_object_get(o, "usage")), "usage chunk without usage");
                } else {
                    json_t *c = json_array_get(cs, 0);
                    json_int_t idx = json_integer_value(json_object_get(c, "index"));
                    FUZZ_CHECK(idx >= 0 && idx < nc, "index %lld", (long long)idx);
                    json_t *t = chat ? json_object_get(json_object_get(c, "delta"), "content")
                                     : json_object_get(c, "text");
                    if (json_is_string(t))
                        buf_append(&got[idx], json_string_value(t), json_string_length(t));
                    if (json_is_string(json_object_get(c, "finish_reason"))) finishes[idx]++;
                }
            }
            json_decref(o);
        }
        p = e2 + 2;
    }
    FUZZ_CHECK(done == 1, "%d [DONE] events", done);
    FUZZ_CHECK(error_events == (errored ? 1 : 0), "%d error events, errored %d", error_events, errored);
    FUZZ_CHECK(usage_chunks == (usage && !errored ? 1 : 0), "%d usage chunks", usage_chunks);
    for (int ci = 0; ci < nc; ci++) {
        /* Echo streams the prompt first; compare the generated tail. */
        size_t off = got[ci].len >= sent[ci].len ? got[ci].len - sent[ci].len : 0;
        FUZZ_CHECK(got[ci].len >= sent[ci].len && (!sent[ci].len || !memcmp(got[ci].p + off, sent[ci].p, sent[ci].len)),
                   "choice %d: %zu bytes streamed for %zu sent", ci, got[ci].len, sent[ci].len);
        if (!echo) FUZZ_CHECK(off == 0, "choice %d: extra text", ci);
        FUZZ_CHECK(finishes[ci] <= 1, "choice %d finished %d times", ci, finishes[ci]);
        if (!errored) FUZZ_CHECK(finishes[ci] == 1, "choice %d: no finish_reason", ci);
        buf_free(&got[ci]);
        buf_free(&sent[ci]);
    }
    request_unref(r);
    return 0;
}
