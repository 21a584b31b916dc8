/*
 * cli_eval.c - see cli_eval.h.
 */
#include "cli_eval.h"

#include <errno.h>
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli_common.h"

/* ==== Opening the engine =============================================== */

void eval_log_quiet(engine_log_level level, const char *msg, void *ud) {
    (void)ud;
    if (level >= ENGINE_LOG_ERROR) fprintf(stderr, "saserve: error: %s\n", msg);
}

engine *eval_open(engine_params *p, long *ctx, int batch_tokens, bool quiet, const char *prog, int *status) {
    *status = 1;
    if (!p->model_path) {
        fprintf(stderr, "%s: --model is required\n", prog);
        *status = 2;
        return NULL;
    }
    /* A first, small, silent open learns the model's context and layer
     * count (without sharing: a bad --shared-layers is a usage error). */
    engine_params probe = *p;
    probe.shared_layers = "none";
    probe.max_seqs = 1;
    probe.max_batch_tokens = 16;
    probe.n_ctx = 0;
    probe.kv_cache_bytes = 0;
    probe.capture_attention = false;
    engine_set_log(eval_log_quiet, NULL);
    engine *e = cli_open_engine(&probe, prog);
    engine_set_log(NULL, NULL);
    if (!e) return NULL;
    const engine_info *in = engine_get_info(e);
    int model_ctx = in->n_ctx_train > 0 ? in->n_ctx_train : in->n_ctx;
    int n_layer = in->n_layer;
    engine_close(e);
    if (p->shared_layers) {
        bool *mask = calloc((size_t)n_layer, sizeof *mask);
        char err[256];
        int bad = !mask ? 0 : engine_parse_shared_layers(p->shared_layers, n_layer, mask, err, sizeof err);
        free(mask);
        if (bad) {
            fprintf(stderr, "%s: %s\n", prog, err);
            *status = 2;
            return NULL;
        }
    }
    if (*ctx == 0) *ctx = EVAL_DEFAULT_CTX < model_ctx ? EVAL_DEFAULT_CTX : model_ctx;
    if (*ctx > model_ctx) {
        fprintf(stderr, "%s: --ctx %ld exceeds the model's context of %d tokens\n", prog, *ctx, model_ctx);
        *status = 2;
        return NULL;
    }
    int per_step = batch_tokens / (int)*ctx;
    if (per_step < 1) per_step = 1;
    p->n_ctx = (int)*ctx;
    p->max_seqs = per_step;
    p->max_batch_tokens = *ctx <= batch_tokens ? per_step * (int)*ctx : batch_tokens;
    p->kv_cache_bytes = 0; /* enough for max_seqs full windows */
    p->prefix_cache = false;
    if (quiet) engine_set_log(eval_log_quiet, NULL);
    e = cli_open_engine(p, prog);
    engine_set_log(NULL, NULL);
    return e;
}

/* ==== Reading the tokens =============================================== */

/* Reads a whole file into a malloc'd buffer (NUL-terminated for text). */
static char *slurp(const char *path, size_t *len, const char *prog) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "%s: cannot open '%s': %s\n", prog, path, strerror(errno));
        return NULL;
    }
    size_t cap = 1 << 16, n = 0;
    char *buf = malloc(cap + 1);
    while (buf) {
        if (n == cap) {
            char *nb = cap > ((size_t)1 << 40) ? NULL : realloc(buf, cap * 2 + 1);
            if (!nb) {
                free(buf);
                buf = NULL;
                break;
            }
            buf = nb;
            cap *= 2;
        }
        size_t got = fread(buf + n, 1, cap - n, f);
        n += got;
        if (got == 0) break;
    }
    if (!buf) {
        fprintf(stderr, "%s: out of memory reading '%s'\n", prog, path);
        fclose(f);
        return NULL;
    }
    if (ferror(f)) {
        fprintf(stderr, "%s: cannot read '%s': %s\n", prog, path, strerror(errno));
        free(buf);
        fclose(f);
        return NULL;
    }
    fclose(f);
    buf[n] = 0;
    *len = n;
    return buf;
}

static int load_text(const engine *e, const char *path, eval_stream *out, const char *prog) {
    size_t len;
    char *text = slurp(path, &len, prog);
    if (!text) return 1;
    if (len > (size_t)0x7ffffff0) {
        fprintf(stderr, "%s: '%s' is too large (%zu bytes)\n", prog, path, len);
        free(text);
        return 1;
    }
    /* SentencePiece gives at most one id per byte, plus the BOS and the
     * dummy-prefix space; retry with the reported size just in case. */
    int cap = (int)len + 16;
    for (;;) {
        int32_t *ids = malloc((size_t)cap * sizeof *ids);
        if (!ids) {
            fprintf(stderr, "%s: out of memory tokenizing '%s'\n", prog, path);
            free(text);
            return 1;
        }
        int n = engine_tokenize(e, text, len, true, ids, cap);
        if (n < 0) {
            fprintf(stderr, "%s: cannot tokenize '%s': %s\n", prog, path, engine_strerror(n));
            free(ids);
            free(text);
            return 1;
        }
        if (n <= cap) {
            out->ids = ids;
            out->n = (size_t)n;
            free(text);
            return 0;
        }
        free(ids);
        cap = n;
    }
}

static int load_tokens(const engine *e, const char *path, eval_stream *out, const char *prog) {
    size_t len;
    char *raw = slurp(path, &len, prog);
    if (!raw) return 1;
    if (len % 2) {
        fprintf(stderr, "%s: '%s' has %zu bytes, an odd number: not a uint16 token stream\n", prog, path, len);
        free(raw);
        return 1;
    }
    size_t n = len / 2;
    int32_t *ids = malloc((n ? n : 1) * sizeof *ids);
    if (!ids) {
        fprintf(stderr, "%s: out of memory reading '%s'\n", prog, path);
        free(raw);
        return 1;
    }
    int n_vocab = engine_get_info(e)->n_vocab;
    const unsigned char *b = (const unsigned char *)raw;
    for (size_t i = 0; i < n; i++) {
        ids[i] = (int32_t)(b[2 * i] | (b[2 * i + 1] << 8)); /* little-endian on any host */
        if (ids[i] >= n_vocab) {
            fprintf(stderr, "%s: '%s': token %zu is id %d, outside the model's vocabulary of %d\n", prog, path, i,
                    ids[i], n_vocab);
            free(ids);
            free(raw);
            return 1;
        }
    }
    free(raw);
    out->ids = ids;
    out->n = n;
    return 0;
}

int eval_stream_load(const engine *e, const char *text_path, const char *tokens_path, eval_stream *out,
                     const char *prog) {
    out->ids = NULL;
    out->n = 0;
    return text_path ? load_text(e, text_path, out, prog) : load_tokens(e, tokens_path, out, prog);
}

void eval_stream_free(eval_stream *s) {
    free(s->ids);
    s->ids = NULL;
    s->n = 0;
}

int eval_n_windows(const eval_stream *s, int ctx) {
    if (ctx < 1 || s->n < 2) return 0;
    size_t w = (s->n - 1) / (size_t)ctx;
    return w > 0x7fffffff ? 0x7fffffff : (int)w;
}

/* ==== Scoring ========================================================== */

double eval_token_nll(const float *logits, int n_vocab, int32_t target) {
    double mx = logits[0];
    for (int i = 1; i < n_vocab; i++)
        if (logits[i] > mx) mx = logits[i];
    double sum = 0;
    for (int i = 0; i < n_vocab; i++) sum += exp((double)logits[i] - mx);
    return -((double)logits[target] - mx - log(sum));
}

int eval_windows_per_step(const engine_info *in, int ctx) {
    int w = in->max_batch_tokens / ctx;
    if (w > in->max_seqs) w = in->max_seqs;
    return w < 1 ? 1 : w;
}

int eval_windows(engine *e, const eval_stream *s, int ctx, int n_windows, eval_result *out, const char *label) {
    const engine_info *in = engine_get_info(e);
    int per_step = eval_windows_per_step(in, ctx);
    /* A window longer than one step's budget is fed in chunks. */
    int chunk = ctx < in->max_batch_tokens ? ctx : in->max_batch_tokens;
    engine_batch_item *items = calloc((size_t)per_step, sizeof *items);
    int *seqs = malloc((size_t)per_step * sizeof *seqs);
    if (!items || !seqs) {
        free(items);
        free(seqs);
        fprintf(stderr, "%s: out of memory\n", label ? label : "saserve");
        return ENGINE_ENOMEM;
    }
    memset(out, 0, sizeof *out);
    double t0 = cli_now(), last_report = t0;
    bool tty = label && isatty(2);
    int rc = 0;
    for (int w0 = 0; w0 < n_windows && !rc; w0 += per_step) {
        int nw = n_windows - w0 < per_step ? n_windows - w0 : per_step;
        int made = 0;
        for (; made < nw; made++) {
            seqs[made] = engine_seq_create(e);
            if (seqs[made] < 0) {
                rc = seqs[made];
                break;
            }
        }
        for (int off = 0; off < ctx && !rc; off += chunk) {
            int n = ctx - off < chunk ? ctx - off : chunk;
            for (int k = 0; k < nw; k++) {
                const int32_t *win = s->ids + (size_t)(w0 + k) * (size_t)ctx;
                items[k] = (engine_batch_item){
                    .seq = seqs[k], .tokens = win + off, .n_tokens = n, .all_logits = true, .prompt = true};
            }
            rc = engine_step(e, items, nw);
            if (rc) break;
            for (int k = 0; k < nw; k++) {
                /* Row j of this chunk predicts window token off + j + 1. */
                const int32_t *target = s->ids + (size_t)(w0 + k) * (size_t)ctx + (size_t)off + 1;
                for (int j = 0; j < n; j++)
                    out->nll_sum += eval_token_nll(items[k].logits + (size_t)j * (size_t)in->n_vocab, in->n_vocab,
                                                   target[j]);
            }
        }
        for (int k = 0; k < made; k++) engine_seq_free(e, seqs[k]);
        if (rc) break;
        out->windows += nw;
        out->tokens += (long)nw * ctx;
        double now = cli_now();
        if (label && (tty || now - last_report >= 10.0 || out->windows == n_windows)) {
            last_report = now;
            fprintf(stderr, "%s%s: window %d/%d, ppl %.4f, %.0f tokens/s%s", tty ? "\r" : "", label, out->windows,
                    n_windows, exp(out->nll_sum / (double)out->tokens), (double)out->tokens / (now - t0),
                    tty && out->windows < n_windows ? "" : "\n");
            fflush(stderr);
        }
    }
    out->seconds = cli_now() - t0;
    if (rc) fprintf(stderr, "%s%s: evaluation failed: %s\n", tty ? "\n" : "", label ? label : "saserve",
                    engine_strerror(rc));
    free(items);
    free(seqs);
    return rc;
}
