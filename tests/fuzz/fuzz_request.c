/*
 * fuzz_request.c - request JSON -> parameters: routes_parse_request() for
 * /v1/completions (built as request_completions) or /v1/chat/completions
 * (built with -DFUZZ_CHAT as request_chat), with the bundled model's real
 * tokenizer and chat rendering, without the HTTP layer.  Chat bodies are
 * parsed with ChatML (the bundled model's) and one more template family.
 *
 * Invariants of an accepted request: 1 <= n <= max_n, every prompt is
 * non-empty, inside the context and made of valid ids, prompt + max_tokens
 * never exceeds the context, the sampling parameters are in range and the
 * stop strings are valid UTF-8.  A refused one has a message.
 */
#include <math.h>
#include <string.h>

#include "config.h"
#include "fuzz.h"
#include "server.h"
#include "utf8.h"

#ifdef FUZZ_CHAT
#define KIND REQ_CHAT
#else
#define KIND REQ_COMPLETION
#endif

static server S;
static saserve_config cfg;

static void quiet(engine_log_level level, const char *msg, void *ud) {
    (void)level, (void)msg, (void)ud;
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc, (void)argv;
    char err[512], path[1024];
    engine_set_log(quiet, NULL);
    if (config_defaults(&cfg, err, sizeof err) != 0) {
        fprintf(stderr, "config: %s\n", err);
        exit(1);
    }
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

static void check_one(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    S.chat_family = "chatml";
    check_one(data, size);
#ifdef FUZZ_CHAT
    /* And one of the other template families, picked by the input's size. */
    static const char *const others[] = {"llama2", "llama3", "mistral", "zephyr", "gemma", "phi3"};
    S.chat_family = others[size % 6];
    check_one(data, size);
#endif
    return 0;
}

static void check_one(const uint8_t *data, size_t size) {
    request *r = NULL;
    routes_verr e;
    int rc = routes_parse_request(&S, KIND, (const char *)data, size, &r, &e);
    if (rc != 0) {
        FUZZ_CHECK(r == NULL, "refused request returned");
        FUZZ_CHECK(e.msg[0] != 0, "refused without a message");
        FUZZ_CHECK(e.status == 0 || e.status == 400 || e.status == 500, "status %d", e.status);
        return;
    }
    const engine_info *in = S.info;
    FUZZ_CHECK(r != NULL && r->kind == KIND, "no request");
    FUZZ_CHECK(r->n >= 1 && r->n <= cfg.max_n, "n = %d", r->n);
    FUZZ_CHECK(r->n_prompts >= 1 && r->n_choices == r->n_prompts * r->n, "prompts %d choices %d", r->n_prompts,
               r->n_choices);
    FUZZ_CHECK(r->max_tokens >= 0 && r->max_tokens <= in->n_ctx, "max_tokens %d", r->max_tokens);
    int total = 0;
    for (int i = 0; i < r->n_prompts; i++) {
        int len = r->prompt_len[i];
        FUZZ_CHECK(len >= 1 && len < in->n_ctx, "prompt %d has %d tokens", i, len);
        FUZZ_CHECK(len + r->max_tokens <= in->n_ctx, "prompt %d: %d + %d tokens exceed the context", i, len,
                   r->max_tokens);
        for (int k = 0; k < len; k++)
            FUZZ_CHECK(r->prompt_tokens[i][k] >= 0 && r->prompt_tokens[i][k] < in->n_vocab, "token id %d",
                       r->prompt_tokens[i][k]);
        total += len;
    }
    FUZZ_CHECK(total == r->total_prompt_tokens, "prompt token total");
    for (int i = 0; i < r->n_choices; i++) {
        const req_choice *c = &r->choices[i];
        FUZZ_CHECK(c->prompt == i / r->n && c->seq == -1 && c->n_tokens == r->prompt_len[c->prompt], "choice %d", i);
    }
    FUZZ_CHECK(r->n_stops >= 0 && r->n_stops <= STREAM_MAX_STOPS, "n_stops %d", r->n_stops);
    for (int i = 0; i < r->n_stops; i++)
        FUZZ_CHECK(r->stops[i] && utf8_valid(r->stops[i], strlen(r->stops[i])), "stop %d is not valid UTF-8", i);
    const engine_sampling *sp = &r->sampling;
    FUZZ_CHECK(isfinite(sp->temperature) && sp->temperature >= 0 && sp->temperature <= 2, "temperature");
    FUZZ_CHECK(sp->top_p >= 0 && sp->top_p <= 1 && sp->min_p >= 0 && sp->min_p <= 1, "top_p/min_p");
    FUZZ_CHECK(sp->top_k >= 0 && sp->repetition_penalty > 0, "top_k/repetition_penalty");
    for (int i = 0; i < sp->n_bias; i++)
        FUZZ_CHECK(sp->bias_ids[i] >= 0 && sp->bias_ids[i] < in->n_vocab && fabsf(sp->bias_values[i]) <= 100,
                   "logit_bias entry %d", i);
    FUZZ_CHECK(r->logprobs >= -1 && r->logprobs <= REQ_MAX_TOP_LOGPROBS, "logprobs %d", r->logprobs);
    FUZZ_CHECK(!r->include_usage || r->stream, "include_usage without stream");
    request_unref(r);
}
