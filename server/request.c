/*
 * request.c - request lifetime, arena and outbox; see request.h.
 */
#include "request.h"

#include <jansson.h>
#include <stdlib.h>
#include <stdio.h>
#include <string.h>

/* ==== Arena ============================================================ */

struct arena_chunk {
    arena_chunk *next;
    size_t used, cap;
    _Alignas(16) unsigned char data[];
};

void *arena_alloc(arena *a, size_t n) {
    n = (n + 15) & ~(size_t)15;
    arena_chunk *c = a->head;
    if (!c || c->cap - c->used < n) {
        size_t cap = n > 8192 ? n : 8192;
        c = malloc(sizeof *c + cap);
        if (!c) return NULL;
        c->next = a->head;
        c->used = 0;
        c->cap = cap;
        a->head = c;
    }
    void *p = c->data + c->used;
    c->used += n;
    memset(p, 0, n);
    return p;
}

char *arena_strndup(arena *a, const char *s, size_t n) {
    char *p = arena_alloc(a, n + 1);
    if (p) {
        memcpy(p, s, n);
        p[n] = 0;
    }
    return p;
}

void arena_free(arena *a) {
    for (arena_chunk *c = a->head, *next; c; c = next) {
        next = c->next;
        free(c);
    }
    a->head = NULL;
}

/* ==== Lifetime ========================================================= */

double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

request *request_new(req_kind kind) {
    request *r = calloc(1, sizeof *r);
    if (!r) return NULL;
    atomic_init(&r->refs, 1);
    atomic_init(&r->state, REQ_QUEUED);
    atomic_init(&r->cancel, false);
    pthread_mutex_init(&r->mu, NULL);
    r->kind = kind;
    r->n = 1;
    r->logprobs = -1;
    r->sampling.repetition_penalty = 1.0f;
    r->sampling.top_p = 1.0f;
    r->sampling.temperature = 1.0f;
    r->t_arrival = now_seconds();
    return r;
}

void request_ref(request *r) { atomic_fetch_add(&r->refs, 1); }

int request_alloc_choices(request *r) {
    r->n_choices = r->n_prompts * r->n;
    r->choices = arena_alloc(&r->mem, (size_t)r->n_choices * sizeof *r->choices);
    r->texts = arena_alloc(&r->mem, (size_t)r->n_choices * sizeof *r->texts);
    r->finish = arena_alloc(&r->mem, (size_t)r->n_choices * sizeof *r->finish);
    r->lp = arena_alloc(&r->mem, (size_t)r->n_choices * sizeof *r->lp);
    r->text_tokens = arena_alloc(&r->mem, (size_t)r->n_choices * sizeof *r->text_tokens);
    if (!r->choices || !r->texts || !r->finish || !r->lp || !r->text_tokens) return -1;
    for (int i = 0; i < r->n_choices; i++) {
        req_choice *c = &r->choices[i];
        c->prompt = i / r->n;
        c->seq = -1;
        int cap = r->prompt_len[c->prompt] + r->max_tokens + 1;
        c->tokens = arena_alloc(&r->mem, (size_t)cap * sizeof(int32_t));
        if (!c->tokens) return -1;
        memcpy(c->tokens, r->prompt_tokens[c->prompt], (size_t)r->prompt_len[c->prompt] * sizeof(int32_t));
        c->n_tokens = r->prompt_len[c->prompt];
        /* Choices after the first of a prompt start from its prefilled
         * sequence (one prefill, shared blocks). */
        c->waiting_fork = (i % r->n) != 0;
        /* Each choice draws from its own stream: seed + index. */
        engine_rng_seed(&c->rng, r->seed + (uint64_t)i * 0x9e3779b97f4a7c15ull);
        textstream_init(&c->ts, r->stops, r->n_stops);
    }
    return 0;
}

void request_unref(request *r) {
    if (!r || atomic_fetch_sub(&r->refs, 1) != 1) return;
    for (int i = 0; i < r->n_choices; i++) {
        textstream_free(&r->choices[i].ts);
        buf_free(&r->texts[i]);
        if (r->lp[i]) json_decref(r->lp[i]);
    }
    request_outbox_free(&r->out);
    buf_free(&r->sse);
    pthread_mutex_destroy(&r->mu);
    arena_free(&r->mem);
    free(r);
}

/* ==== Outbox =========================================================== */

static req_event *push_event(request *r) {
    req_outbox *o = &r->out;
    if (o->n == o->cap) {
        int cap = o->cap ? o->cap * 2 : 16;
        req_event *ev = realloc(o->ev, (size_t)cap * sizeof *ev);
        if (!ev) return NULL;
        o->ev = ev;
        o->cap = cap;
    }
    req_event *e = &o->ev[o->n++];
    memset(e, 0, sizeof *e);
    return e;
}

/* Appends a token event; called with mu held. */
static void token_event(request *r, bool prompt, int choice, int32_t token, float logprob, int n_top,
                        const int32_t *top_ids, const float *top_lps, const char *text, size_t len) {
    req_event *e = push_event(r);
    if (!e) return;
    e->type = EV_TOKEN;
    e->prompt = prompt;
    e->choice = choice;
    e->token = token;
    e->logprob = logprob;
    e->n_top = n_top > REQ_MAX_TOP_LOGPROBS ? REQ_MAX_TOP_LOGPROBS : n_top;
    for (int i = 0; i < e->n_top; i++) {
        e->top_ids[i] = top_ids[i];
        e->top_lps[i] = top_lps[i];
    }
    e->text_off = r->out.text.len;
    e->text_len = len && buf_append(&r->out.text, text, len) ? len : 0;
}

void request_post_token(request *r, int choice, int32_t token, float logprob, int n_top, const int32_t *top_ids,
                        const float *top_lps, const char *text, size_t len) {
    pthread_mutex_lock(&r->mu);
    token_event(r, false, choice, token, logprob, n_top, top_ids, top_lps, text, len);
    pthread_mutex_unlock(&r->mu);
}

void request_post_prompt_token(request *r, int choice, int32_t token, float logprob, int n_top,
                               const int32_t *top_ids, const float *top_lps) {
    pthread_mutex_lock(&r->mu);
    token_event(r, true, choice, token, logprob, n_top, top_ids, top_lps, NULL, 0);
    pthread_mutex_unlock(&r->mu);
}

void request_post_finish(request *r, int choice, const char *reason) {
    pthread_mutex_lock(&r->mu);
    req_event *e = push_event(r);
    if (e) {
        e->type = EV_FINISH;
        e->choice = choice;
        e->finish_reason = reason;
    }
    pthread_mutex_unlock(&r->mu);
}

void request_post_error(request *r, int status, const char *msg) {
    pthread_mutex_lock(&r->mu);
    req_event *e = push_event(r);
    if (e) {
        e->type = EV_ERROR;
        e->status = status;
        snprintf(e->message, sizeof e->message, "%s", msg);
    }
    pthread_mutex_unlock(&r->mu);
}

void request_take_outbox(request *r, req_outbox *out) {
    pthread_mutex_lock(&r->mu);
    *out = r->out;
    memset(&r->out, 0, sizeof r->out);
    pthread_mutex_unlock(&r->mu);
}

void request_outbox_free(req_outbox *o) {
    free(o->ev);
    buf_free(&o->text);
    memset(o, 0, sizeof *o);
}

/* ==== Wake queue ======================================================= */

void req_wakeq_init(req_wakeq *q) {
    pthread_mutex_init(&q->mu, NULL);
    q->head = NULL;
}

void req_wakeq_clear(req_wakeq *q) {
    for (request *r = req_wakeq_take(q), *next; r; r = next) {
        next = r->wake_next;
        request_unref(r);
    }
}

bool req_wakeq_push(req_wakeq *q, request *r) {
    pthread_mutex_lock(&q->mu);
    bool added = !r->in_pending;
    if (added) {
        r->in_pending = true;
        request_ref(r);
        r->pending_next = q->head;
        q->head = r;
    }
    pthread_mutex_unlock(&q->mu);
    return added;
}

request *req_wakeq_take(req_wakeq *q) {
    /* The list is relinked through wake_next under the lock: once in_pending
     * is false the scheduler may queue a request again, rewriting its
     * pending_next, so the taker must never follow pending_next unlocked. */
    pthread_mutex_lock(&q->mu);
    request *out = NULL;
    for (request *r = q->head, *next; r; r = next) {
        next = r->pending_next;
        r->pending_next = NULL;
        r->in_pending = false;
        r->wake_next = out;
        out = r;
    }
    q->head = NULL;
    pthread_mutex_unlock(&q->mu);
    return out;
}
