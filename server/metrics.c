/*
 * metrics.c - see metrics.h.  Names follow vLLM's, with the saserve_ prefix
 * and base units (seconds, bytes).
 */
#include "metrics.h"

#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#define MAX_BUCKETS 24

typedef struct {
    const char *name, *help;
    int n_bounds;
    double bounds[MAX_BUCKETS];
    pthread_mutex_t mu;
    uint64_t counts[MAX_BUCKETS + 1]; /* per bucket (not cumulative); last = +Inf */
    double sum;
    uint64_t count;
} histogram;

struct metrics {
    atomic_uint_fast64_t prompt_tokens, generation_tokens, preemptions;
    atomic_uint_fast64_t success[FIN_COUNT];
    atomic_uint_fast64_t failure[FAIL_COUNT];
    histogram hist[H_COUNT];
};

static const char *finish_names[FIN_COUNT] = {"stop", "length"};
static const char *failure_names[FAIL_COUNT] = {"bad_request", "unauthorized", "too_large", "queue_full",
                                                "unavailable",  "timeout",      "cancelled", "internal"};

static void hist_init(histogram *h, const char *name, const char *help, const double *b, int n) {
    h->name = name;
    h->help = help;
    h->n_bounds = n;
    memcpy(h->bounds, b, (size_t)n * sizeof *b);
    pthread_mutex_init(&h->mu, NULL);
}

metrics *metrics_new(void) {
    metrics *m = calloc(1, sizeof *m);
    if (!m) return NULL;
    static const double lat[] = {0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5,
                                 0.75,  1.0,   2.5,  5.0,  7.5,  10.0, 20.0, 40.0, 80.0};
    static const double itl[] = {0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05,
                                 0.075, 0.1,    0.15,  0.2,  0.3,   0.4,  0.5,   0.75, 1.0,  2.5};
    static const double e2e[] = {0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                                 120.0, 240.0, 480.0, 960.0};
    static const double tok[] = {1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192};
    hist_init(&m->hist[H_TTFT], "saserve_time_to_first_token_seconds",
              "Time from the request's arrival to its first generated token.", lat, sizeof lat / sizeof lat[0]);
    hist_init(&m->hist[H_ITL], "saserve_inter_token_latency_seconds",
              "Time between consecutive generated tokens of one sequence.", itl, sizeof itl / sizeof itl[0]);
    hist_init(&m->hist[H_E2E], "saserve_e2e_request_latency_seconds",
              "Time from the request's arrival to its last token.", e2e, sizeof e2e / sizeof e2e[0]);
    hist_init(&m->hist[H_QUEUE], "saserve_request_queue_time_seconds",
              "Time a request waited in the admission queue.", lat, sizeof lat / sizeof lat[0]);
    hist_init(&m->hist[H_ITER_TOKENS], "saserve_iteration_tokens", "Tokens processed per engine step.", tok,
              sizeof tok / sizeof tok[0]);
    return m;
}

void metrics_free(metrics *m) {
    if (!m) return;
    for (int i = 0; i < H_COUNT; i++) pthread_mutex_destroy(&m->hist[i].mu);
    free(m);
}

void metrics_add_prompt_tokens(metrics *m, uint64_t n) { if (m) atomic_fetch_add(&m->prompt_tokens, n); }
void metrics_add_generation_tokens(metrics *m, uint64_t n) { if (m) atomic_fetch_add(&m->generation_tokens, n); }
void metrics_request_success(metrics *m, metrics_finish why) { if (m) atomic_fetch_add(&m->success[why], 1); }
void metrics_request_failure(metrics *m, metrics_failure why) { if (m) atomic_fetch_add(&m->failure[why], 1); }
void metrics_add_preemption(metrics *m) { if (m) atomic_fetch_add(&m->preemptions, 1); }

uint64_t metrics_success_total(metrics *m) {
    uint64_t s = 0;
    for (int i = 0; i < FIN_COUNT; i++) s += atomic_load(&m->success[i]);
    return s;
}

void metrics_observe(metrics *m, metrics_hist which, double v) {
    if (!m || !isfinite(v)) return;
    histogram *h = &m->hist[which];
    int b = 0;
    while (b < h->n_bounds && v > h->bounds[b]) b++;
    pthread_mutex_lock(&h->mu);
    h->counts[b]++;
    h->sum += v;
    h->count++;
    pthread_mutex_unlock(&h->mu);
}

/* ==== Rendering ======================================================== */

/* Prometheus label value escaping: backslash, double quote, newline. */
static void label_value(buf *out, const char *s) {
    for (; *s; s++) {
        if (*s == '\\') buf_append(out, "\\\\", 2);
        else if (*s == '"') buf_append(out, "\\\"", 2);
        else if (*s == '\n') buf_append(out, "\\n", 2);
        else buf_append(out, s, 1);
    }
}

static void header(buf *out, const char *name, const char *type, const char *help) {
    buf_appendf(out, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

static void gauge(buf *out, const char *name, const char *help, double v) {
    header(out, name, "gauge", help);
    buf_appendf(out, "%s %.17g\n", name, v);
}

static void counter(buf *out, const char *name, const char *help, double v) {
    header(out, name, "counter", help);
    buf_appendf(out, "%s %.17g\n", name, v);
}

static void render_hist(buf *out, histogram *h) {
    pthread_mutex_lock(&h->mu);
    uint64_t counts[MAX_BUCKETS + 1];
    memcpy(counts, h->counts, sizeof counts);
    double sum = h->sum;
    uint64_t count = h->count;
    pthread_mutex_unlock(&h->mu);
    header(out, h->name, "histogram", h->help);
    uint64_t cum = 0;
    for (int i = 0; i < h->n_bounds; i++) {
        cum += counts[i];
        buf_appendf(out, "%s_bucket{le=\"%g\"} %llu\n", h->name, h->bounds[i], (unsigned long long)cum);
    }
    cum += counts[h->n_bounds];
    buf_appendf(out, "%s_bucket{le=\"+Inf\"} %llu\n", h->name, (unsigned long long)cum);
    buf_appendf(out, "%s_sum %.17g\n%s_count %llu\n", h->name, sum, h->name, (unsigned long long)count);
}

void metrics_render(metrics *m, const metrics_state *st, buf *out) {
    const engine_info *in = st->info;
    gauge(out, "saserve_num_requests_running", "Requests whose sequences are in the running batch.", st->running);
    gauge(out, "saserve_num_requests_waiting", "Requests waiting for admission.", st->waiting);
    gauge(out, "saserve_kv_cache_usage_ratio", "Fraction of KV cache blocks in use (1 = full).",
          st->kv_total_blocks ? (double)st->kv_used_blocks / st->kv_total_blocks : 0.0);
    counter(out, "saserve_prompt_tokens_total", "Prompt tokens of finished and running requests.",
            (double)atomic_load(&m->prompt_tokens));
    counter(out, "saserve_generation_tokens_total", "Generated tokens.", (double)atomic_load(&m->generation_tokens));

    header(out, "saserve_request_success_total", "counter", "Requests that finished, by finish reason.");
    for (int i = 0; i < FIN_COUNT; i++)
        buf_appendf(out, "saserve_request_success_total{finished_reason=\"%s\"} %llu\n", finish_names[i],
                    (unsigned long long)atomic_load(&m->success[i]));
    header(out, "saserve_request_failure_total", "counter", "Requests that failed, by reason.");
    for (int i = 0; i < FAIL_COUNT; i++)
        buf_appendf(out, "saserve_request_failure_total{reason=\"%s\"} %llu\n", failure_names[i],
                    (unsigned long long)atomic_load(&m->failure[i]));
    counter(out, "saserve_num_preemptions_total", "Sequences preempted for lack of KV blocks (recomputed later).",
            (double)atomic_load(&m->preemptions));
    counter(out, "saserve_prefix_cache_queries_total", "Prompt tokens in full blocks looked up in the prefix cache.",
            (double)st->prefix.queries);
    counter(out, "saserve_prefix_cache_hits_total", "Prompt tokens found in the prefix cache.", (double)st->prefix.hits);
    for (int i = 0; i < H_COUNT; i++) render_hist(out, &m->hist[i]);

    /* Shared Attention. */
    header(out, "saserve_shared_attention_layer_source", "gauge",
           "Layer whose attention weights each layer uses (itself when not shared).");
    for (int l = 0; l < in->n_layer; l++)
        buf_appendf(out, "saserve_shared_attention_layer_source{layer=\"%d\"} %d\n", l, in->layer_source[l]);
    header(out, "saserve_kv_cache_bytes", "gauge", "KV cache capacity in bytes, by tensor.");
    buf_appendf(out, "saserve_kv_cache_bytes{tensor=\"k\"} %zu\n", in->kv_k_bytes);
    buf_appendf(out, "saserve_kv_cache_bytes{tensor=\"v\"} %zu\n", in->kv_v_bytes);
    gauge(out, "saserve_kv_cache_bytes_per_token", "KV cache bytes one token takes across all layers.",
          (double)in->kv_bytes_per_token);
    gauge(out, "saserve_kv_cache_saved_bytes", "K cache bytes not allocated because layers share attention.",
          (double)in->kv_saved_bytes);
    counter(out, "saserve_attention_flops_saved_total",
            "Floating-point operations shared layers skipped (Q/K projections, QK^T, softmax).",
            st->counters.attention_flops_saved);

    header(out, "saserve_model_info", "gauge", "The loaded model.");
    buf_append(out, "saserve_model_info{model=\"", 26);
    label_value(out, st->model_id);
    buf_append(out, "\",arch=\"", 8);
    label_value(out, in->arch);
    buf_appendf(out, "\",n_layer=\"%d\",n_head=\"%d\",n_head_kv=\"%d\",n_embd=\"%d\",n_ctx=\"%d\",weight_type=\"",
                in->n_layer, in->n_head, in->n_head_kv, in->n_embd, in->n_ctx);
    label_value(out, in->weight_type);
    buf_append(out, "\",shared_layers=\"", 17);
    label_value(out, in->shared_layers);
    buf_append(out, "\"} 1\n", 5);
    header(out, "saserve_build_info", "gauge", "saserve version.");
    buf_appendf(out, "saserve_build_info{version=\"%s\"} 1\n", SASERVE_VERSION);
}
