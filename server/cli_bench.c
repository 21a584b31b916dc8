/*
 * cli_bench.c - saserve bench: prompt-processing and decode speed (like
 * llama-bench), the machine's ceilings (memory read bandwidth, OpenBLAS
 * sgemm), and how many sequences a KV pool of a given size holds.
 *
 * Speed mode.  For every combination of the list-valued options one row:
 *   prefill: a prompt of P tokens into an empty sequence (prefix cache off),
 *            prompt=true items chunked by max_batch_tokens;
 *   decode:  B sequences that each already hold D context tokens generate G
 *            tokens, one token per sequence per engine_step (all B in the same
 *            step), greedy argmax; tok/s counts all B sequences.
 * The D context tokens are prefilled once and forked into the B sequences
 * (engine_seq_fork shares the full blocks), outside the timed part.  Each
 * figure is the median of --reps runs, after one warm-up run per engine.
 * Token ids: a fixed xorshift stream of pseudo-random ids in [3, n_vocab),
 * the same for every run and every model with the same vocabulary.
 *
 * Byte and flop counts printed next to the speeds (--json) are computed from
 * the model's shape and weight type: a decode step reads every matrix the
 * step uses once (W_q/W_k of shared layers are skipped) plus each sequence's
 * cached K/V; a prompt token costs 2 flops per matrix weight it is multiplied
 * by (not the embedding lookup, not the output matrix: prompt chunks compute
 * logits for their last token only) plus its causal attention.
 */
#include <cblas.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include "cli.h"
#include "cli_common.h"
#include "config.h"

#define MAX_LIST 16

typedef struct {
    long v[MAX_LIST];
    int n;
} int_list;

typedef struct {
    const char *v[MAX_LIST]; /* NULL: the model's own setting */
    char buf[MAX_LIST][128];
    int n;
} str_list;

typedef struct {
    engine_params p;
    int_list prompt, gen, depth, batch, threads;
    str_list shared;
    long reps;
    double max_seconds; /* per figure: stop repeating after this long (0: never) */
    bool json, warmup;
    const char *prog;
} bench_opts;

static void bench_usage(FILE *f) {
    fprintf(f,
            "usage: saserve bench --model FILE [options]\n"
            "\n"
            "Prompt-processing and decode tokens/s, medians over --reps runs after a warm-up.\n"
            "Options marked LIST take comma-separated values; every combination is one row.\n"
            "\n"
            "  -p, --prompt-tokens LIST   prompt length P (default 512; 0: no prefill figure)\n"
            "  -n, --gen-tokens LIST      tokens generated per sequence G (default 128)\n"
            "  -d, --depth LIST           context tokens already cached before decoding D (default 0)\n"
            "  -B, --batch LIST           sequences decoding together in each step (default 1)\n"
            "  -t, --threads LIST         threads (default: one per CPU)\n"
            "  --shared-layers LIST       e.g. none,4-11 ('model' = the model's own setting, the default);\n"
            "                             a setting with commas (5-7,9-11) is one value: separate values\n"
            "                             with '/' or repeat the flag (none/5-7,9-11)\n"
            "  -r, --reps N               runs per figure (default 5)\n"
            "  --max-seconds S            stop repeating a figure once its runs took S seconds (default:\n"
            "                             never); the JSON says how many runs each median has\n"
            "  --max-batch-tokens N       tokens per engine step (default 512)\n"
            "  --no-warmup                skip the warm-up run\n"
            "  --json                     one JSON object per row\n"
            "\n"
            "Other modes:\n"
            "  --ceilings                 memory read bandwidth (sum over a --bw-mib buffer, default 1024)\n"
            "                             and OpenBLAS sgemm GFLOP/s (--sgemm-n, default 2048) with the core\n"
            "                             OpenBLAS runs and, in child processes, with OpenBLAS's own pick and\n"
            "                             with OPENBLAS_CORETYPE=Prescott; the best of --reps runs each\n"
            "  --sgemm-only               only the sgemm figure, for the core this process runs\n"
            "  --max-concurrency          with --kv-cache-bytes SIZE: how many sequences of P+G tokens the\n"
            "                             pool holds at once (each one prefilled until the pool is full)\n"
            "\n"
            "%s",
            cli_engine_help);
}

/* ==== Option parsing ===================================================== */

static bool parse_int_list(const char *s, long lo, long hi, int_list *out, const char *flag, const char *prog) {
    char tmp[512];
    snprintf(tmp, sizeof tmp, "%s", s);
    out->n = 0;
    for (char *save = NULL, *tok = strtok_r(tmp, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        if (out->n == MAX_LIST) {
            fprintf(stderr, "%s: %s takes at most %d values\n", prog, flag, MAX_LIST);
            return false;
        }
        if (!cli_int(tok, lo, hi, &out->v[out->n], flag, prog)) return false;
        out->n++;
    }
    if (out->n == 0) {
        fprintf(stderr, "%s: %s needs at least one value\n", prog, flag);
        return false;
    }
    return true;
}

/* Adds shared-layer settings: values split at '/'; within one value, a
 * comma-separated item "none" or "model" stands alone, so "none,4-11" is two
 * values while "5-7,9-11" stays one. */
static bool add_shared(str_list *l, const char *s, const char *prog) {
    char tmp[512];
    snprintf(tmp, sizeof tmp, "%s", s);
    for (char *s1 = NULL, *val = strtok_r(tmp, "/", &s1); val; val = strtok_r(NULL, "/", &s1)) {
        char cur[128] = "";
        char *items[64];
        int n = 0;
        for (char *s2 = NULL, *it = strtok_r(val, ",", &s2); it && n < 64; it = strtok_r(NULL, ",", &s2)) items[n++] = it;
        for (int i = 0; i <= n; i++) {
            bool alone = i < n && (!strcmp(items[i], "none") || !strcmp(items[i], "model"));
            if ((i == n || alone) && cur[0]) {
                if (l->n == MAX_LIST) goto full;
                snprintf(l->buf[l->n], sizeof l->buf[0], "%s", cur);
                l->v[l->n] = l->buf[l->n];
                l->n++;
                cur[0] = 0;
            }
            if (i == n) break;
            if (alone) {
                if (l->n == MAX_LIST) goto full;
                l->v[l->n] = !strcmp(items[i], "model") ? NULL : "none";
                l->n++;
            } else {
                size_t len = strlen(cur);
                snprintf(cur + len, sizeof cur - len, "%s%s", len ? "," : "", items[i]);
            }
        }
    }
    return true;
full:
    fprintf(stderr, "%s: --shared-layers takes at most %d values\n", prog, MAX_LIST);
    return false;
}

/* A size as the configuration reads one (config_parse_size: 8M, 2G). */
static bool parse_size(const char *s, size_t *out, const char *flag, const char *prog) {
    int64_t v;
    if (config_parse_size(s, &v) != 1 || v < 0) {
        fprintf(stderr, "%s: %s must be a size such as 8M or 2G, got '%s'\n", prog, flag, s);
        return false;
    }
    *out = (size_t)v;
    return true;
}

/* ==== Small helpers ====================================================== */

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double median(double *v, int n) {
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

/* Peak resident set since the last reset_peak_rss(), in bytes. */
static void reset_peak_rss(void) {
    FILE *f = fopen("/proc/self/clear_refs", "w");
    if (f) {
        fputs("5", f);
        fclose(f);
    }
}

static size_t peak_rss(void) {
    FILE *f = fopen("/proc/self/status", "r");
    size_t kb = 0;
    if (f) {
        char line[256];
        while (fgets(line, sizeof line, f))
            if (sscanf(line, "VmHWM: %zu kB", &kb) == 1) break;
        fclose(f);
    }
    if (!kb) {
        struct rusage ru;
        getrusage(RUSAGE_SELF, &ru);
        kb = (size_t)ru.ru_maxrss;
    }
    return kb * 1024;
}

/* Deterministic pseudo-random token ids in [3, n_vocab). */
static void fill_ids(int32_t *ids, int n, int n_vocab, uint64_t seed) {
    uint64_t x = seed * 0x9e3779b97f4a7c15ULL + 0x2545f4914f6cdd1dULL;
    for (int i = 0; i < n; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        ids[i] = 3 + (int32_t)(x % (uint64_t)(n_vocab - 3));
    }
}

static int32_t argmax(const float *x, int n) {
    int32_t best = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[best]) best = i;
    return best;
}

static void quiet_log(engine_log_level level, const char *msg, void *ud) {
    if (level >= ENGINE_LOG_WARN) fprintf(stderr, "%s: %s\n", (const char *)ud, msg);
}

/* Bytes per weight of the model's main type.  A mixed file (Q4_K_M: Q4_K
 * with some Q6_K) is counted at its main type, a few percent low. */
static double type_bytes(const char *type) {
    if (!strcmp(type, "F32")) return 4;
    if (!strcmp(type, "F16") || !strcmp(type, "BF16")) return 2;
    if (!strcmp(type, "Q8_0")) return 34.0 / 32;
    if (!strcmp(type, "Q4_0")) return 18.0 / 32;
    if (!strcmp(type, "Q4_K")) return 144.0 / 256;
    if (!strcmp(type, "Q5_K")) return 176.0 / 256;
    if (!strcmp(type, "Q6_K")) return 210.0 / 256;
    return 2;
}

/* Matrix weights one token is multiplied by in each layer (not the
 * embedding, not the output). */
static void layer_params(const engine_info *in, int l, double *qk, double *rest) {
    double d = in->n_embd, qd = (double)in->n_head * in->head_dim, kvd = (double)in->n_head_kv * in->head_dim;
    *qk = in->layer_source[l] == l ? d * qd + d * kvd : 0;
    *rest = d * kvd + qd * d + 3 * d * in->n_ff;
}

/* Bytes one decode step reads: every used matrix once, the output matrix,
 * and each of the batch's sequences' cached K/V at an average context. */
static double decode_bytes_per_step(const engine_info *in, int batch, double avg_ctx) {
    double params = (double)in->n_vocab * in->n_embd;
    for (int l = 0; l < in->n_layer; l++) {
        double qk, rest;
        layer_params(in, l, &qk, &rest);
        params += qk + rest;
    }
    return params * type_bytes(in->weight_type) + (double)batch * avg_ctx * (double)in->kv_bytes_per_token;
}

/* Flops of one prompt token at an average context. */
static double prefill_flops_per_token(const engine_info *in, double avg_ctx) {
    double f = 0, hd = (double)in->n_head * in->head_dim;
    for (int l = 0; l < in->n_layer; l++) {
        double qk, rest;
        layer_params(in, l, &qk, &rest);
        f += 2 * (qk + rest);
        f += (in->layer_source[l] == l ? 4 : 2) * hd * avg_ctx; /* QK^T and PV, or PV only */
    }
    return f;
}

/* ==== Speed ============================================================== */

/* Prefills seq with n tokens in max_batch_tokens chunks.  Returns 0 or a
 * negative engine code; *logits gets the last chunk's logits. */
static int prefill(engine *e, int seq, const int32_t *ids, int n, const float **logits) {
    int chunk_max = engine_get_info(e)->max_batch_tokens;
    for (int done = 0; done < n;) {
        int chunk = n - done < chunk_max ? n - done : chunk_max;
        engine_batch_item it = {.seq = seq, .tokens = ids + done, .n_tokens = chunk, .prompt = true};
        int rc = engine_step(e, &it, 1);
        if (rc) return rc;
        if (logits) *logits = it.logits;
        done += chunk;
    }
    return 0;
}

/* Seconds to prefill P tokens into a fresh sequence, or < 0 on error. */
static double time_prefill(engine *e, const int32_t *ids, int P, const char *prog) {
    int seq = engine_seq_create(e);
    if (seq < 0) return -1;
    double t0 = cli_now();
    int rc = prefill(e, seq, ids, P, NULL);
    double t = cli_now() - t0;
    engine_seq_free(e, seq);
    if (rc) {
        fprintf(stderr, "%s: prefill of %d tokens failed: %s\n", prog, P, engine_strerror(rc));
        return -1;
    }
    return t;
}

/* Seconds for G decode steps of B sequences at depth D, or < 0 on error. */
static double time_decode(engine *e, const int32_t *ids, int D, int G, int B, const char *prog) {
    const engine_info *in = engine_get_info(e);
    int *seqs = malloc((size_t)B * sizeof *seqs);
    int32_t *next = malloc((size_t)B * sizeof *next);
    engine_batch_item *items = malloc((size_t)B * sizeof *items);
    double t = -1;
    int n_seqs = 0, rc = 0;
    if (!seqs || !next || !items) {
        rc = ENGINE_ENOMEM;
        goto out;
    }
    if ((rc = seqs[n_seqs] = engine_seq_create(e)) < 0) goto out;
    rc = 0;
    n_seqs++;
    const float *logits = NULL;
    if (D > 0 && (rc = prefill(e, seqs[0], ids, D, &logits))) goto out;
    for (int b = 1; b < B; b++) {
        seqs[n_seqs] = engine_seq_create(e);
        if (seqs[n_seqs] < 0) {
            rc = seqs[n_seqs];
            goto out;
        }
        n_seqs++;
        if (D > 0 && (rc = engine_seq_fork(e, seqs[0], seqs[b]))) goto out;
    }
    /* Different first tokens so the sequences do not all decode the same. */
    for (int b = 0; b < B; b++) next[b] = ids[(D + b) % in->n_ctx];
    if (logits) next[0] = argmax(logits, in->n_vocab);
    double t0 = cli_now();
    for (int g = 0; g < G; g++) {
        for (int b = 0; b < B; b++) items[b] = (engine_batch_item){.seq = seqs[b], .tokens = &next[b], .n_tokens = 1};
        if ((rc = engine_step(e, items, B))) goto out;
        for (int b = 0; b < B; b++) next[b] = argmax(items[b].logits, in->n_vocab);
    }
    t = cli_now() - t0;
out:
    if (rc) fprintf(stderr, "%s: decode (depth %d, batch %d) failed: %s\n", prog, D, B, engine_strerror(rc));
    for (int i = 0; i < n_seqs; i++) engine_seq_free(e, seqs[i]);
    free(seqs);
    free(next);
    free(items);
    return rc ? -1 : t;
}

static long list_max(const int_list *l) {
    long m = l->v[0];
    for (int i = 1; i < l->n; i++)
        if (l->v[i] > m) m = l->v[i];
    return m;
}

static void print_header(void) {
    printf("| %-24s | %-5s | %7s | %-12s | %5s | %5s | %5s | %5s | %12s | %12s | %9s |\n", "model", "type", "threads",
           "shared", "pp", "tg", "depth", "batch", "prefill t/s", "decode t/s", "RSS MiB");
    printf("|%s|%s|%s|%s|%s|%s|%s|%s|%s|%s|%s|\n", "--------------------------", "-------", "--------:",
           "--------------", "------:", "------:", "------:", "------:", "-------------:", "-------------:",
           "----------:");
}

static const char *base_name(const char *path) {
    const char *b = strrchr(path, '/');
    return b ? b + 1 : path;
}

/* One engine (threads x shared setting): every P, G, D, B combination. */
static int bench_engine(bench_opts *o, int threads, const char *shared) {
    const char *prog = o->prog;
    engine_params p = o->p;
    p.n_threads = threads;
    p.shared_layers = shared;
    p.prefix_cache = false;
    p.max_seqs = (int)list_max(&o->batch);
    /* Room for the longest row; a context beyond the model's training length
     * is fine for timing (RoPE just continues). */
    long need = list_max(&o->prompt);
    long dg = list_max(&o->depth) + list_max(&o->gen);
    if (dg > need) need = dg;
    reset_peak_rss();
    engine_params probe = p;
    engine *e = cli_open_engine(&probe, prog);
    if (!e) return 1;
    if (p.n_ctx == 0 && engine_get_info(e)->n_ctx < need) {
        engine_close(e);
        p.n_ctx = (int)need;
        reset_peak_rss();
        if (!(e = cli_open_engine(&p, prog))) return 1;
    }
    const engine_info *in = engine_get_info(e);
    if (in->n_ctx < need) {
        fprintf(stderr, "%s: the context holds %d tokens; this run needs %ld (use --ctx-size)\n", prog, in->n_ctx,
                need);
        engine_close(e);
        return 1;
    }
    int n_ids = in->n_ctx;
    int32_t *ids = malloc((size_t)n_ids * sizeof *ids);
    double *t = malloc((size_t)o->reps * sizeof *t);
    double pp_cache[MAX_LIST];
    int pp_reps[MAX_LIST];
    int rc = 1;
    if (!ids || !t) goto out;
    fill_ids(ids, n_ids, in->n_vocab, 1);
    if (o->warmup) {
        if (o->prompt.v[0] > 0 && time_prefill(e, ids, (int)o->prompt.v[0], prog) < 0) goto out;
        if (time_decode(e, ids, 0, 4, (int)list_max(&o->batch), prog) < 0) goto out;
    }
    for (int i = 0; i < o->prompt.n; i++) {
        int n = 0;
        double t0 = cli_now();
        while (o->prompt.v[i] > 0 && n < o->reps) {
            if ((t[n++] = time_prefill(e, ids, (int)o->prompt.v[i], prog)) < 0) goto out;
            if (o->max_seconds > 0 && cli_now() - t0 > o->max_seconds) break;
        }
        pp_reps[i] = n;
        pp_cache[i] = n ? (double)o->prompt.v[i] / median(t, n) : NAN;
    }
    /* Decode does not depend on P: one measurement per (G, D, B), printed
     * with each P's prefill figure. */
    for (int g = 0; g < o->gen.n; g++)
        for (int d = 0; d < o->depth.n; d++)
            for (int b = 0; b < o->batch.n; b++) {
                int G = (int)o->gen.v[g], D = (int)o->depth.v[d], B = (int)o->batch.v[b];
                int n = 0;
                double t0 = cli_now();
                while (n < o->reps) {
                    if ((t[n++] = time_decode(e, ids, D, G, B, prog)) < 0) goto out;
                    if (o->max_seconds > 0 && cli_now() - t0 > o->max_seconds) break;
                }
                double tg = (double)G * B / median(t, n);
                size_t rss = peak_rss();
                for (int i = 0; i < o->prompt.n; i++) {
                    int P = (int)o->prompt.v[i];
                    double pp = pp_cache[i];
                    if (o->json) {
                        double bps = decode_bytes_per_step(in, B, D + G / 2.0);
                        double fpt = prefill_flops_per_token(in, (P + 1) / 2.0);
                        char pps[64] = "null", ppg[64] = "null";
                        if (pp == pp) {
                            snprintf(pps, sizeof pps, "%.3f", pp);
                            snprintf(ppg, sizeof ppg, "%.3f", fpt * pp / 1e9);
                        }
                        printf("{\"model\":\"%s\",\"weight_type\":\"%s\",\"n_params\":%zu,\"model_bytes\":%zu,"
                               "\"kv_bytes_per_token\":%zu,\"threads\":%d,\"shared_layers\":\"%s\","
                               "\"prompt_tokens\":%d,\"gen_tokens\":%d,\"depth\":%d,\"batch\":%d,"
                               "\"reps_prefill\":%d,\"reps_decode\":%d,\"prefill_tok_s\":%s,\"decode_tok_s\":%.3f,"
                               "\"decode_bytes_per_step\":%.0f,\"decode_gb_s\":%.3f,\"prefill_flops_per_token\":%.0f,"
                               "\"prefill_gflop_s\":%s,\"peak_rss_bytes\":%zu}\n",
                               base_name(p.model_path), in->weight_type, in->n_params, in->model_bytes,
                               in->kv_bytes_per_token, in->n_threads, in->shared_layers, P, G, D, B, pp_reps[i], n,
                               pps, tg, bps, bps * tg / B / 1e9, fpt, ppg, rss);
                    } else {
                        char pps[32] = "-";
                        if (pp == pp) snprintf(pps, sizeof pps, "%.1f", pp);
                        printf("| %-24.24s | %-5s | %7d | %-12.12s | %5d | %5d | %5d | %5d | %12s | %12.1f | %9.1f |\n",
                               base_name(p.model_path), in->weight_type, in->n_threads, in->shared_layers, P, G, D, B,
                               pps, tg, (double)rss / (1 << 20));
                    }
                }
                fflush(stdout);
            }
    rc = 0;
out:
    free(ids);
    free(t);
    engine_close(e);
    return rc;
}

/* ==== Ceilings =========================================================== */

typedef unsigned long long v8u64 __attribute__((vector_size(64)));

typedef struct {
    const v8u64 *p;
    size_t n;
    unsigned long long sum;
    pthread_barrier_t *bar;
} bw_job;

/* The sum in three builds, picked at run time.  (Not target_clones: its
 * ifunc resolver runs before ThreadSanitizer's runtime is up and crashes
 * every sanitized binary at load.) */
#define BW_SUM(NAME, ATTR)                                                                                 \
    ATTR static void *NAME(void *arg) {                                                                    \
        bw_job *j = arg;                                                                                   \
        pthread_barrier_wait(j->bar);                                                                      \
        v8u64 a = {0}, b = {0}, c = {0}, d = {0};                                                          \
        size_t i = 0;                                                                                      \
        for (; i + 4 <= j->n; i += 4) {                                                                    \
            a += j->p[i];                                                                                  \
            b += j->p[i + 1];                                                                              \
            c += j->p[i + 2];                                                                              \
            d += j->p[i + 3];                                                                              \
        }                                                                                                  \
        for (; i < j->n; i++) a += j->p[i];                                                                \
        a += b + c + d;                                                                                    \
        unsigned long long s = 0;                                                                          \
        for (int k = 0; k < 8; k++) s += a[k];                                                             \
        j->sum = s;                                                                                        \
        return NULL;                                                                                       \
    }
BW_SUM(bw_sum_avx512, __attribute__((target("avx512f"))))
BW_SUM(bw_sum_avx2, __attribute__((target("avx2"))))
BW_SUM(bw_sum_base, )

static void *(*bw_sum_fn(void))(void *) {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) return bw_sum_avx512;
    if (__builtin_cpu_supports("avx2")) return bw_sum_avx2;
    return bw_sum_base;
}

/* Ceilings are the best of their runs (what the machine can do), while the
 * engine's figures are medians (what it typically does). */
static double min_of(const double *v, int n) {
    double m = INFINITY;
    for (int i = 0; i < n; i++)
        if (v[i] < m) m = v[i];
    return m;
}

/* Read bandwidth in GB/s: threads sum disjoint slices of one buffer. */
static double bandwidth(size_t bytes, int threads, int reps) {
    size_t n = bytes / sizeof(v8u64);
    v8u64 *buf = NULL;
    if (posix_memalign((void **)&buf, 4096, n * sizeof(v8u64))) return -1;
    memset(buf, 1, n * sizeof(v8u64));
    double *t = malloc((size_t)(reps + 1) * sizeof *t);
    if (!t) {
        free(buf);
        return -1;
    }
    pthread_t th[256];
    bw_job jobs[256];
    if (threads > 256) threads = 256;
    unsigned long long check = 0;
    for (int r = 0; r <= reps; r++) { /* run 0 is the warm-up */
        pthread_barrier_t bar;
        pthread_barrier_init(&bar, NULL, (unsigned)threads + 1);
        for (int i = 0; i < threads; i++) {
            size_t lo = n * (size_t)i / (size_t)threads, hi = n * (size_t)(i + 1) / (size_t)threads;
            jobs[i] = (bw_job){buf + lo, hi - lo, 0, &bar};
            pthread_create(&th[i], NULL, bw_sum_fn(), &jobs[i]);
        }
        pthread_barrier_wait(&bar);
        double t0 = cli_now();
        for (int i = 0; i < threads; i++) {
            pthread_join(th[i], NULL);
            check += jobs[i].sum;
        }
        t[r] = cli_now() - t0;
        pthread_barrier_destroy(&bar);
    }
    double best = min_of(t + 1, reps);
    free(t);
    free(buf);
    if (check == 42) fprintf(stderr, "\n"); /* keeps the sums alive */
    return (double)(n * sizeof(v8u64)) / best / 1e9;
}

/* OpenBLAS sgemm GFLOP/s on n x n x n. */
static double sgemm_rate(int n, int threads, int reps) {
    size_t nn = (size_t)n * (size_t)n;
    float *a = malloc(nn * sizeof *a), *b = malloc(nn * sizeof *b), *c = malloc(nn * sizeof *c);
    double *t = malloc((size_t)(reps + 1) * sizeof *t);
    if (!a || !b || !c || !t) return -1;
    for (size_t i = 0; i < nn; i++) {
        a[i] = (float)(i % 7) * 0.125f;
        b[i] = (float)(i % 5) * 0.25f;
    }
    openblas_set_num_threads(threads);
    for (int r = 0; r <= reps; r++) {
        double t0 = cli_now();
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, n, n, 1.0f, a, n, b, n, 0.0f, c, n);
        t[r] = cli_now() - t0;
    }
    double best = min_of(t + 1, reps);
    free(a);
    free(b);
    free(c);
    free(t);
    return 2.0 * n * (double)n * n / best / 1e9;
}

/* Runs this program's "bench --sgemm-only" with OPENBLAS_CORETYPE=core (NULL:
 * with SASERVE_BLAS_FIX=0 and no OPENBLAS_CORETYPE, i.e. OpenBLAS's own
 * choice) and reads its figure and core name. */
static double sgemm_child(const char *core, int n, int threads, int reps, char *core_out, size_t cap) {
    int fd[2];
    if (pipe(fd)) return -1;
    pid_t pid = fork();
    if (pid < 0) return -1;
    if (pid == 0) {
        dup2(fd[1], 1);
        close(fd[0]);
        close(fd[1]);
        FILE *devnull = freopen("/dev/null", "w", stderr);
        (void)devnull;
        if (core) setenv("OPENBLAS_CORETYPE", core, 1);
        else {
            unsetenv("OPENBLAS_CORETYPE");
            setenv("SASERVE_BLAS_FIX", "0", 1);
        }
        char sn[32], st[32], sr[32];
        snprintf(sn, sizeof sn, "%d", n);
        snprintf(st, sizeof st, "%d", threads);
        snprintf(sr, sizeof sr, "%d", reps);
        execl("/proc/self/exe", "saserve", "bench", "--sgemm-only", "--sgemm-n", sn, "--threads", st, "--reps", sr,
              (char *)NULL);
        _exit(127);
    }
    close(fd[1]);
    char out[512] = "";
    size_t len = 0;
    ssize_t k;
    while (len < sizeof out - 1 && (k = read(fd[0], out + len, sizeof out - 1 - len)) > 0) len += (size_t)k;
    out[len] = 0;
    close(fd[0]);
    int st;
    waitpid(pid, &st, 0);
    double g = -1;
    char name[64] = "";
    if (sscanf(out, "sgemm %63s %lf", name, &g) != 2) return -1;
    snprintf(core_out, cap, "%s", name);
    return g;
}

/* ==== Max concurrency =================================================== */

static int bench_max_concurrency(bench_opts *o, const char *shared, int L) {
    engine_params p = o->p;
    p.shared_layers = shared;
    p.prefix_cache = false;
    p.n_threads = (int)o->threads.v[0];
    if (p.max_seqs < 1024) p.max_seqs = 1024;
    if (p.n_ctx == 0) p.n_ctx = L;
    engine *e = cli_open_engine(&p, o->prog);
    if (!e) return -1;
    const engine_info *in = engine_get_info(e);
    int32_t *ids = malloc((size_t)L * sizeof *ids);
    int count = 0;
    if (ids) {
        for (;; count++) {
            int seq = engine_seq_create(e);
            if (seq < 0) break;
            fill_ids(ids, L, in->n_vocab, (uint64_t)count + 7);
            int rc = prefill(e, seq, ids, L, NULL);
            if (rc == ENGINE_ENOKV) break;
            if (rc) {
                fprintf(stderr, "%s: %s\n", o->prog, engine_strerror(rc));
                count = -1;
                break;
            }
        }
    }
    if (count >= 0) {
        size_t pool = in->kv_k_bytes + in->kv_v_bytes;
        if (o->json)
            printf("{\"model\":\"%s\",\"shared_layers\":\"%s\",\"kv_cache_bytes\":%zu,\"kv_blocks\":%d,"
                   "\"kv_bytes_per_token\":%zu,\"kv_bytes_per_token_unshared\":%zu,\"seq_tokens\":%d,"
                   "\"max_concurrent_seqs\":%d}\n",
                   base_name(p.model_path), in->shared_layers, pool, in->kv_blocks, in->kv_bytes_per_token,
                   in->kv_bytes_per_token_unshared, L, count);
        else
            printf("%-24s shared %-10s KV pool %.1f MiB (%d blocks), %zu bytes/token: %d sequences of %d tokens\n",
                   base_name(p.model_path), in->shared_layers, (double)pool / (1 << 20), in->kv_blocks,
                   in->kv_bytes_per_token, count, L);
    }
    free(ids);
    engine_close(e);
    return count;
}

/* ==== Entry ============================================================== */

int cli_bench(int argc, char **argv) {
    bench_opts o = {.p = engine_default_params(), .reps = 5, .warmup = true, .prog = "saserve bench"};
    const char *prog = o.prog;
    bool ceilings = false, sgemm_only = false, max_conc = false;
    long bw_mib = 1024, sgemm_n = 2048;
    size_t kv_bytes = 0;
    bool have_kv = false;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v;
        long n;
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            bench_usage(stdout);
            return 0;
        } else if (!strcmp(a, "-p") || !strcmp(a, "--prompt-tokens")) {
            if (!(v = cli_value(argc, argv, &i, prog)) || !parse_int_list(v, 0, 1 << 20, &o.prompt, a, prog)) return 2;
        } else if (!strcmp(a, "-n") || !strcmp(a, "--gen-tokens")) {
            if (!(v = cli_value(argc, argv, &i, prog)) || !parse_int_list(v, 1, 1 << 20, &o.gen, a, prog)) return 2;
        } else if (!strcmp(a, "-d") || !strcmp(a, "--depth")) {
            if (!(v = cli_value(argc, argv, &i, prog)) || !parse_int_list(v, 0, 1 << 20, &o.depth, a, prog)) return 2;
        } else if (!strcmp(a, "-B") || !strcmp(a, "--batch")) {
            if (!(v = cli_value(argc, argv, &i, prog)) || !parse_int_list(v, 1, 4096, &o.batch, a, prog)) return 2;
        } else if (!strcmp(a, "-t") || !strcmp(a, "--threads")) {
            if (!(v = cli_value(argc, argv, &i, prog)) || !parse_int_list(v, 0, 1024, &o.threads, a, prog)) return 2;
        } else if (!strcmp(a, "--shared-layers")) {
            if (!(v = cli_value(argc, argv, &i, prog)) || !add_shared(&o.shared, v, prog)) return 2;
        } else if (!strcmp(a, "-r") || !strcmp(a, "--reps")) {
            if (!(v = cli_value(argc, argv, &i, prog)) || !cli_int(v, 1, 1000, &o.reps, a, prog)) return 2;
        } else if (!strcmp(a, "--max-batch-tokens")) {
            if (!(v = cli_value(argc, argv, &i, prog)) || !cli_int(v, 1, 65536, &n, a, prog)) return 2;
            o.p.max_batch_tokens = (int)n;
        } else if (!strcmp(a, "--kv-cache-bytes")) {
            if (!(v = cli_value(argc, argv, &i, prog)) || !parse_size(v, &kv_bytes, a, prog)) return 2;
            have_kv = true;
        } else if (!strcmp(a, "--bw-mib")) {
            if (!(v = cli_value(argc, argv, &i, prog)) || !cli_int(v, 1, 1 << 20, &bw_mib, a, prog)) return 2;
        } else if (!strcmp(a, "--sgemm-n")) {
            if (!(v = cli_value(argc, argv, &i, prog)) || !cli_int(v, 16, 1 << 15, &sgemm_n, a, prog)) return 2;
        } else if (!strcmp(a, "--max-seconds")) {
            if (!(v = cli_value(argc, argv, &i, prog)) || !cli_double(v, 0, 1e6, &o.max_seconds, a, prog)) return 2;
        } else if (!strcmp(a, "--no-warmup")) {
            o.warmup = false;
        } else if (!strcmp(a, "--json")) {
            o.json = true;
        } else if (!strcmp(a, "--ceilings")) {
            ceilings = true;
        } else if (!strcmp(a, "--sgemm-only")) {
            sgemm_only = true;
        } else if (!strcmp(a, "--max-concurrency")) {
            max_conc = true;
        } else {
            int r = cli_engine_flag(argc, argv, &i, &o.p, prog);
            if (r < 0) return 2;
            if (r == 0) {
                fprintf(stderr, "%s: unknown option '%s'\n", prog, a);
                bench_usage(stderr);
                return 2;
            }
        }
    }
    if (o.prompt.n == 0) o.prompt = (int_list){{512}, 1};
    if (o.gen.n == 0) o.gen = (int_list){{128}, 1};
    if (o.depth.n == 0) o.depth = (int_list){{0}, 1};
    if (o.batch.n == 0) o.batch = (int_list){{1}, 1};
    if (o.threads.n == 0) o.threads = (int_list){{0}, 1};
    if (o.shared.n == 0) o.shared = (str_list){.v = {NULL}, .n = 1};
    for (int i = 0; i < o.threads.n; i++)
        if (o.threads.v[i] == 0) {
            long n = sysconf(_SC_NPROCESSORS_ONLN);
            o.threads.v[i] = n > 0 ? n : 1;
        }
    int threads = (int)o.threads.v[0];

    if (sgemm_only) {
        double g = sgemm_rate((int)sgemm_n, threads, (int)o.reps);
        printf("sgemm %s %.3f\n", openblas_get_corename(), g);
        return g > 0 ? 0 : 1;
    }
    if (ceilings) {
        double bw = bandwidth((size_t)bw_mib << 20, threads, (int)o.reps);
        double sg = sgemm_rate((int)sgemm_n, threads, (int)o.reps);
        char native[64] = "?", presc[64] = "?";
        double sg_native = sgemm_child(NULL, (int)sgemm_n, threads, (int)o.reps, native, sizeof native);
        double sg_presc = sgemm_child("Prescott", (int)sgemm_n, threads, (int)o.reps, presc, sizeof presc);
        if (o.json)
            printf("{\"threads\":%d,\"bandwidth_bytes\":%zu,\"bandwidth_gb_s\":%.3f,\"sgemm_n\":%ld,"
                   "\"sgemm_core\":\"%s\",\"sgemm_gflop_s\":%.3f,\"sgemm_native_core\":\"%s\","
                   "\"sgemm_native_gflop_s\":%.3f,\"sgemm_prescott_core\":\"%s\",\"sgemm_prescott_gflop_s\":%.3f}\n",
                   threads, (size_t)bw_mib << 20, bw, sgemm_n, openblas_get_corename(), sg, native, sg_native, presc,
                   sg_presc);
        else
            printf("threads %d: memory read %.1f GB/s (%ld MiB buffer); sgemm %ld^3: %.1f GFLOP/s (core %s, as "
                   "saserve runs), %.1f GFLOP/s (core %s, OpenBLAS's own pick), %.1f GFLOP/s (core %s)\n",
                   threads, bw, bw_mib, sgemm_n, sg, openblas_get_corename(), sg_native, native, sg_presc, presc);
        return bw > 0 && sg > 0 ? 0 : 1;
    }
    engine_set_log(quiet_log, (void *)prog);
    if (!o.p.model_path) {
        fprintf(stderr, "%s: --model is required\n", prog);
        bench_usage(stderr);
        return 2;
    }
    if (max_conc) {
        if (!have_kv) {
            fprintf(stderr, "%s: --max-concurrency needs --kv-cache-bytes\n", prog);
            return 2;
        }
        o.p.kv_cache_bytes = kv_bytes;
        int L = (int)(o.prompt.v[0] + o.gen.v[0]);
        for (int s = 0; s < o.shared.n; s++)
            if (bench_max_concurrency(&o, o.shared.v[s], L) < 0) return 1;
        return 0;
    }
    if (have_kv) o.p.kv_cache_bytes = kv_bytes;
    if (!o.json) print_header();
    for (int t = 0; t < o.threads.n; t++)
        for (int s = 0; s < o.shared.n; s++)
            if (bench_engine(&o, (int)o.threads.v[t], o.shared.v[s])) return 1;
    return 0;
}
