/*
 * cli_calibrate.c - saserve calibrate: the Shared Attention paper's analysis
 * as a tool.  Which layers can share their attention, and what does it cost?
 *
 * 1. Similarity.  The model runs without sharing over the calibration windows
 *    (cli_eval.h) with an attention observer.  For every pair of layers
 *    (i, j), S[i][j] is the mean over windows, heads and query positions of
 *    cos(A_i[q,:], A_j[q,:]), A_l being layer l's post-softmax causal
 *    attention rows: the definition of sa-tiny's
 *    reference/layer_similarity.json.  The same pass gives the baseline
 *    perplexity.
 * 2. Candidates.  Every run of 1..max_span consecutive shared layers a..b
 *    (1 <= a: layer 0 cannot share; the source is layer a-1), plus the
 *    model's own saserve.shared_layers setting if it has one, is measured:
 *    perplexity over the same windows, a fresh engine each.
 * 3. Choice, greedy.  Candidates whose own increase exceeds the limit are
 *    dropped.  The rest are taken in order of NLL increase per shared layer
 *    (cheapest first; ties: more layers, then lower layers).  Each one that
 *    adds layers is united with the set chosen so far and the union itself
 *    is measured: uniting adjacent runs changes their sources (a shared
 *    layer's source is the nearest lower layer that does not share), so the
 *    parts' costs do not simply add up.  The union is kept when its measured
 *    perplexity is within the limit.  A union is not measured when the
 *    set's measured increase plus the candidate's per-layer cost for each
 *    layer it adds already exceeds the limit (costs grow with sharing; this
 *    bounds the run time).
 *    The answer is the kept set, or a single candidate within the limit
 *    that shares more layers (ties: lower perplexity); its perplexity is
 *    always a measurement of exactly that setting.
 *
 * Tables (or one JSON object with --json) go to stdout, progress to stderr;
 * --svg writes a heatmap of S with the chosen layers marked.
 */
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "cli_common.h"
#include "cli_eval.h"

#define DEFAULT_MAX_SEQS 32
#define DEFAULT_MAX_SPAN 3
#define DEFAULT_MAX_INCREASE 0.02
/* Tokens per step in the similarity pass: the observer keeps every layer's
 * rows of the step, L * H * ctx^2 / 2 floats per window. */
#define SIM_BATCH_TOKENS 1024
/* ... and at most this much of them (a define to let tests force chunks). */
#ifndef SIM_MEMORY_BYTES
#define SIM_MEMORY_BYTES ((size_t)1 << 30)
#endif

static void calibrate_usage(FILE *f) {
    fprintf(f,
            "usage: saserve calibrate --model FILE (--file TEXT | --tokens FILE) [options]\n"
            "\n"
            "Measures which layers can share attention (Shared Attention, arXiv:2407.12866)\n"
            "and picks the largest set within a perplexity budget:\n"
            "  1. similarity: for every pair of layers, the mean cosine similarity of their\n"
            "     post-softmax attention rows (over heads, query positions and windows),\n"
            "     from a run without sharing that also gives the baseline perplexity;\n"
            "  2. candidates: every run of 1..--max-span consecutive shared layers (and the\n"
            "     model's own setting, if any), each measured by perplexity on the same\n"
            "     windows;\n"
            "  3. choice: candidates within the budget, cheapest increase per shared layer\n"
            "     first, are united one by one; each union is measured itself (uniting\n"
            "     adjacent runs changes their source layers) and kept if it stays within\n"
            "     the budget.  The answer is the largest set found, with its measured\n"
            "     perplexity.\n"
            "Windows are as in `saserve perplexity`: window i runs tokens [N*i, N*i+N) from\n"
            "an empty cache and scores their next-token predictions.\n"
            "\n"
            "  --file FILE              text file, tokenized as one text with one leading BOS\n"
            "  --tokens FILE            raw little-endian uint16 token ids, used as they are\n"
            "  --ctx N                  window length in tokens (default 512, at most the\n"
            "                           model's context)\n"
            "  --max-seqs N             use at most the first N windows (default %d)\n"
            "  --max-ppl-increase P%%    perplexity budget over no sharing, in percent\n"
            "                           (default 2%%; '5' and '5%%' both mean 5%%)\n"
            "  --max-span N             longest run of shared layers tried as a candidate\n"
            "                           (default %d)\n"
            "  --similarity-only        only the similarity matrix and the baseline\n"
            "  --svg FILE               write the similarity heatmap, chosen layers marked\n"
            "  --json                   print one JSON object (similarity, candidates, choice)\n"
            "%s",
            DEFAULT_MAX_SEQS, DEFAULT_MAX_SPAN, cli_engine_help);
}

/* ==== Similarity observer ============================================== */

/* The observer is called layer by layer, item by item.  Each item's rows of
 * the current step are kept for every layer, normalised to unit length, in
 * buf: item i, layer l, token t, head h starts at
 *   off[i] + l * size[i] + H * (t * pos0 + t * (t + 1) / 2) + h * (pos0 + t + 1)
 * (row t of a chunk starting at position pos0 holds pos0 + t + 1 weights).
 * When layer l arrives its rows are dotted with those of every layer a < l. */
typedef struct {
    int L, H, max_items;
    double *sum; /* [H][L][L]: sums of cosines, a < b filled */
    long rows;   /* query rows per head seen so far */
    float *buf;
    size_t cap;  /* floats */
    size_t *off, *size;
    int *pos0, *n_tokens;
    bool oom;
} sim_state;

static size_t rows_floats(int H, int pos0, int n) {
    return (size_t)H * ((size_t)n * (size_t)pos0 + (size_t)n * (size_t)(n + 1) / 2);
}

/* Dot product with eight running sums (the compiler keeps the order). */
static float dot8(const float *a, const float *b, int n) {
    float s[8] = {0};
    int i = 0;
    for (; i + 8 <= n; i += 8)
        for (int k = 0; k < 8; k++) s[k] += a[i + k] * b[i + k];
    float r = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
    for (; i < n; i++) r += a[i] * b[i];
    return r;
}

static void sim_observer(int layer, int item, int n_head, int n_tokens, int pos0, int stride, const float *probs,
                         void *ud) {
    sim_state *st = ud;
    if (st->oom || layer >= st->L || item >= st->max_items || n_head != st->H) return;
    int H = st->H;
    if (layer == 0) {
        /* A new step: lay the item out after the previous one. */
        st->pos0[item] = pos0;
        st->n_tokens[item] = n_tokens;
        st->size[item] = rows_floats(H, pos0, n_tokens);
        st->off[item] = item == 0 ? 0 : st->off[item - 1] + (size_t)st->L * st->size[item - 1];
        size_t need = st->off[item] + (size_t)st->L * st->size[item];
        if (need > st->cap) {
            float *nb = realloc(st->buf, need * sizeof *nb);
            if (!nb) {
                st->oom = true;
                return;
            }
            st->buf = nb;
            st->cap = need;
        }
    }
    float *base = st->buf + st->off[item];
    size_t lsize = st->size[item];
    float *mine = base + (size_t)layer * lsize;
    for (int t = 0; t < n_tokens; t++) {
        int len = pos0 + t + 1;
        size_t roff = (size_t)H * ((size_t)t * (size_t)pos0 + (size_t)t * (size_t)(t + 1) / 2);
        for (int h = 0; h < H; h++) {
            const float *src = probs + ((size_t)t * (size_t)H + (size_t)h) * (size_t)stride;
            float *dst = mine + roff + (size_t)h * (size_t)len;
            double ss = 0;
            for (int j = 0; j < len; j++) ss += (double)src[j] * src[j];
            float inv = ss > 0 ? (float)(1.0 / sqrt(ss)) : 0.0f;
            for (int j = 0; j < len; j++) dst[j] = src[j] * inv;
            for (int a = 0; a < layer; a++) {
                const float *other = base + (size_t)a * lsize + roff + (size_t)h * (size_t)len;
                st->sum[((size_t)h * (size_t)st->L + (size_t)a) * (size_t)st->L + (size_t)layer] +=
                    dot8(other, dst, len);
            }
        }
    }
    if (layer == st->L - 1) st->rows += n_tokens;
}

/* ==== Measurements ===================================================== */

typedef struct {
    char shared[256]; /* normalised setting, e.g. "5-7" */
    int n_shared;
    double nll, ppl;
    size_t kv_bytes_per_token, kv_unshared;
} measurement;

/* Runs settings on the calibration windows; every measured setting is kept
 * (by index: the array grows), so none is run twice. */
typedef struct {
    engine_params p; /* sized for the windows; shared_layers set per run */
    long ctx;
    int n_windows;
    const eval_stream *s;
    const char *prog;
    measurement *m;
    int n, cap;
} runner;

static int runner_find(const runner *r, const char *shared) {
    for (int i = 0; i < r->n; i++)
        if (!strcmp(r->m[i].shared, shared)) return i;
    return -1;
}

static measurement *runner_add(runner *r) {
    if (r->n == r->cap) {
        int ncap = r->cap ? 2 * r->cap : 64;
        measurement *nm = realloc(r->m, (size_t)ncap * sizeof *nm);
        if (!nm) return NULL;
        r->m = nm;
        r->cap = ncap;
    }
    measurement *m = &r->m[r->n];
    memset(m, 0, sizeof *m);
    return m;
}

/* Perplexity of one sharing setting on the windows, with a fresh engine.
 * Returns the measurement's index, or -1 (message printed). */
static int measure(runner *r, const char *shared, const char *what) {
    int hit = runner_find(r, shared);
    if (hit >= 0) return hit;
    measurement *m = runner_add(r);
    if (!m) {
        fprintf(stderr, "%s: out of memory\n", r->prog);
        return -1;
    }
    engine_params p = r->p;
    p.shared_layers = shared;
    p.capture_attention = false;
    long ctx = r->ctx;
    int status;
    /* Quiet: the start-up lines (and the warning about overriding a model's
     * own setting) would repeat for every setting. */
    engine *e = eval_open(&p, &ctx, EVAL_BATCH_TOKENS, true, r->prog, &status);
    if (!e) return -1;
    const engine_info *in = engine_get_info(e);
    snprintf(m->shared, sizeof m->shared, "%s", in->shared_layers);
    m->n_shared = in->n_shared;
    m->kv_bytes_per_token = in->kv_bytes_per_token;
    m->kv_unshared = in->kv_bytes_per_token_unshared;
    /* A spelling the engine normalises differently may already be known. */
    hit = runner_find(r, m->shared);
    if (hit >= 0) {
        engine_close(e);
        return hit;
    }
    eval_result res;
    int rc = eval_windows(e, r->s, (int)ctx, r->n_windows, &res, NULL);
    engine_close(e);
    if (rc) return -1;
    m->nll = res.nll_sum / (double)res.tokens;
    m->ppl = exp(m->nll);
    fprintf(stderr, "%s: %s %-12s ppl %.4f (%.1f s)\n", r->prog, what, m->shared, m->ppl, res.seconds);
    return r->n++;
}

static double kv_saving(const measurement *m) {
    return m->kv_unshared ? 1.0 - (double)m->kv_bytes_per_token / (double)m->kv_unshared : 0.0;
}

/* ==== Choice =========================================================== */

typedef struct {
    int m;       /* measurement index */
    double cost; /* NLL increase per shared layer */
} cand;

/* Cheapest per shared layer first; ties: more layers, then lower layers. */
static const runner *cmp_runner;
static int cand_cmp(const void *pa, const void *pb) {
    const cand *a = pa, *b = pb;
    if (a->cost != b->cost) return a->cost < b->cost ? -1 : 1;
    const measurement *ma = &cmp_runner->m[a->m], *mb = &cmp_runner->m[b->m];
    if (ma->n_shared != mb->n_shared) return mb->n_shared - ma->n_shared;
    return a->m - b->m;
}

typedef struct {
    int m;         /* measurement index, -1 when not measured */
    char shared[256];
    bool accepted;
} trial;

typedef struct {
    cand *cands;
    int n_cands;
    trial *trials;
    int n_trials;
    int choice; /* measurement index */
} selection;

/* The greedy union described at the top of the file.  Returns 0 or -1. */
static int choose(runner *r, int L, double nll0, double limit, selection *sel) {
    bool *cur = calloc((size_t)L, sizeof *cur), *next = calloc((size_t)L, sizeof *next),
         *cm = calloc((size_t)L, sizeof *cm);
    int rc = -1;
    if (!cur || !next || !cm) goto out;
    cand *fit = malloc(((size_t)sel->n_cands + 1) * sizeof *fit);
    sel->trials = calloc((size_t)sel->n_cands + 1, sizeof *sel->trials);
    if (!fit || !sel->trials) {
        free(fit);
        goto out;
    }
    int n_fit = 0;
    for (int c = 0; c < sel->n_cands; c++)
        if (r->m[sel->cands[c].m].nll - nll0 <= limit) fit[n_fit++] = sel->cands[c];
    cmp_runner = r;
    qsort(fit, (size_t)n_fit, sizeof *fit, cand_cmp);
    int cur_m = 0; /* "none" is measurement 0 */
    for (int c = 0; c < n_fit; c++) {
        const measurement *mc = &r->m[fit[c].m];
        char err[256];
        if (engine_parse_shared_layers(mc->shared, L, cm, err, sizeof err)) continue;
        int adds = 0;
        for (int l = 0; l < L; l++) {
            next[l] = cur[l] || cm[l];
            adds += cm[l] && !cur[l];
        }
        if (!adds) continue;
        trial *t = &sel->trials[sel->n_trials];
        engine_format_shared_layers(next, L, t->shared, sizeof t->shared);
        bool again = false; /* reached before from other parts */
        for (int u = 0; u < sel->n_trials; u++) again |= !strcmp(sel->trials[u].shared, t->shared);
        if (again) continue;
        sel->n_trials++;
        t->m = -1;
        /* Additive estimate: the set's increase plus the candidate's cost
         * for each layer it adds. */
        if (cur_m != 0 && (r->m[cur_m].nll - nll0) + fit[c].cost * adds > limit) continue; /* not measured */
        char what[64];
        snprintf(what, sizeof what, "union %d", sel->n_trials);
        int k = cur_m == 0 ? fit[c].m : measure(r, t->shared, what);
        if (k < 0) {
            free(fit);
            goto out;
        }
        t->m = k;
        if (r->m[k].nll - nll0 <= limit) {
            t->accepted = true;
            cur_m = k;
            memcpy(cur, next, (size_t)L * sizeof *cur);
        }
    }
    /* A single candidate that shares more beats the union. */
    sel->choice = cur_m;
    for (int c = 0; c < n_fit; c++) {
        const measurement *a = &r->m[fit[c].m], *b = &r->m[sel->choice];
        if (a->n_shared > b->n_shared || (a->n_shared == b->n_shared && a->nll < b->nll)) sel->choice = fit[c].m;
    }
    free(fit);
    rc = 0;
out:
    if (rc) fprintf(stderr, "%s: choosing the shared layers failed\n", r->prog);
    free(cur);
    free(next);
    free(cm);
    return rc;
}

/* ==== SVG heatmap ====================================================== */

/* Viridis, sampled at 9 points. */
static void colour(double x, int rgb[3]) {
    static const int stops[9][3] = {{68, 1, 84},    {71, 45, 123},  {59, 82, 139},  {44, 114, 142}, {33, 145, 140},
                                    {40, 174, 128}, {94, 201, 98},  {173, 220, 48}, {253, 231, 37}};
    if (!(x > 0)) x = 0;
    if (x > 1) x = 1;
    double f = x * 8;
    int i = (int)f;
    if (i >= 8) i = 7;
    double u = f - i;
    for (int k = 0; k < 3; k++) rgb[k] = (int)lround(stops[i][k] + u * (stops[i + 1][k] - stops[i][k]));
}

static void xml_text(FILE *f, const char *s) {
    for (; *s; s++) {
        switch (*s) {
        case '&': fputs("&amp;", f); break;
        case '<': fputs("&lt;", f); break;
        case '>': fputs("&gt;", f); break;
        case '"': fputs("&quot;", f); break;
        default:
            if ((unsigned char)*s >= 0x20 || *s == '\t') fputc(*s, f);
        }
    }
}

static int write_svg(const char *path, const double *S, int L, const bool *chosen,
                     const int *src, const char *title, const char *sub1, const char *sub2, const char *prog) {
    FILE *f = fopen(path, "w");
    if (!f) {
        fprintf(stderr, "%s: cannot write '%s'\n", prog, path);
        return 1;
    }
    int cell = L <= 16 ? 40 : L <= 32 ? 22 : 12;
    int left = 70, top = 104, grid = cell * L;
    int legend_x = left + grid + 40, width = legend_x + 110, height = top + grid + 90;
    /* The colour scale spans the off-diagonal values. */
    double lo = 1, hi = 0;
    for (int i = 0; i < L; i++)
        for (int j = 0; j < L; j++)
            if (i != j) {
                double v = S[i * L + j];
                if (v < lo) lo = v;
                if (v > hi) hi = v;
            }
    if (hi <= lo) {
        lo = 0;
        hi = 1;
    }
    fprintf(f, "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    fprintf(f,
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%d\" height=\"%d\" viewBox=\"0 0 %d %d\" "
            "font-family=\"sans-serif\">\n",
            width, height, width, height);
    fprintf(f, "<rect width=\"%d\" height=\"%d\" fill=\"white\"/>\n", width, height);
    fprintf(f, "<text x=\"%d\" y=\"24\" font-size=\"16\" font-weight=\"bold\">", left);
    xml_text(f, title);
    fprintf(f, "</text>\n<text x=\"%d\" y=\"42\" font-size=\"12\">", left);
    xml_text(f, sub1);
    fprintf(f, "</text>\n<text x=\"%d\" y=\"58\" font-size=\"12\">", left);
    xml_text(f, sub2);
    fprintf(f, "</text>\n");
    fprintf(f,
            "<text x=\"%d\" y=\"%d\" font-size=\"12\" text-anchor=\"middle\">layer j</text>\n"
            "<text x=\"16\" y=\"%d\" font-size=\"12\" text-anchor=\"middle\" transform=\"rotate(-90 16 %d)\">"
            "layer i</text>\n",
            left + grid / 2, top - 28, top + grid / 2, top + grid / 2);
    int fs = cell >= 40 ? 10 : cell >= 22 ? 7 : 0;
    fprintf(f, "<g id=\"cells\">\n");
    for (int i = 0; i < L; i++) {
        for (int j = 0; j < L; j++) {
            double v = S[i * L + j];
            int rgb[3] = {220, 220, 220};
            if (i != j) colour((v - lo) / (hi - lo), rgb);
            int x = left + j * cell, y = top + i * cell;
            fprintf(f, "<rect x=\"%d\" y=\"%d\" width=\"%d\" height=\"%d\" fill=\"#%02x%02x%02x\"><title>%d,%d: %.4f</title></rect>\n",
                    x, y, cell, cell, rgb[0], rgb[1], rgb[2], i, j, v);
            if (fs) {
                bool dark = i != j && (0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]) < 140;
                fprintf(f,
                        "<text x=\"%d\" y=\"%d\" font-size=\"%d\" text-anchor=\"middle\" fill=\"%s\">%.2f</text>\n",
                        x + cell / 2, y + cell / 2 + fs / 3, fs, dark ? "white" : "black", v);
            }
        }
    }
    fprintf(f, "</g>\n<g id=\"labels\" font-size=\"11\">\n");
    for (int i = 0; i < L; i++) {
        const char *col = chosen && chosen[i] ? "#d62728" : "black";
        const char *wt = chosen && chosen[i] ? "bold" : "normal";
        fprintf(f, "<text x=\"%d\" y=\"%d\" text-anchor=\"end\" fill=\"%s\" font-weight=\"%s\">%d</text>\n",
                left - 8, top + i * cell + cell / 2 + 4, col, wt, i);
        fprintf(f, "<text x=\"%d\" y=\"%d\" text-anchor=\"middle\" fill=\"%s\" font-weight=\"%s\">%d</text>\n",
                left + i * cell + cell / 2, top - 8, col, wt, i);
    }
    fprintf(f, "</g>\n");
    /* Chosen layers: their row and column outlined, and the cell pairing
     * each with its source drawn thick. */
    if (chosen) {
        fprintf(f, "<g id=\"shared\" fill=\"none\" stroke=\"#d62728\">\n");
        for (int l = 0; l < L; l++) {
            if (!chosen[l]) continue;
            fprintf(f, "<rect x=\"%d\" y=\"%d\" width=\"%d\" height=\"%d\" stroke-width=\"1.5\" "
                       "stroke-dasharray=\"4 3\"/>\n", left, top + l * cell, grid, cell);
            fprintf(f, "<rect x=\"%d\" y=\"%d\" width=\"%d\" height=\"%d\" stroke-width=\"1.5\" "
                       "stroke-dasharray=\"4 3\"/>\n", left + l * cell, top, cell, grid);
            fprintf(f, "<rect x=\"%d\" y=\"%d\" width=\"%d\" height=\"%d\" stroke-width=\"4\"/>\n",
                    left + src[l] * cell + 2, top + l * cell + 2, cell - 4, cell - 4);
            fprintf(f, "<path d=\"M %d %d l -8 -5 v 10 z\" fill=\"#d62728\"/>\n", left - 26,
                    top + l * cell + cell / 2);
        }
        fprintf(f, "</g>\n");
    }
    /* Legend: the colour scale. */
    fprintf(f, "<defs><linearGradient id=\"scale\" x1=\"0\" y1=\"1\" x2=\"0\" y2=\"0\">\n");
    for (int k = 0; k <= 8; k++) {
        int rgb[3];
        colour(k / 8.0, rgb);
        fprintf(f, "<stop offset=\"%.3f\" stop-color=\"#%02x%02x%02x\"/>\n", k / 8.0, rgb[0], rgb[1], rgb[2]);
    }
    fprintf(f, "</linearGradient></defs>\n");
    fprintf(f, "<rect x=\"%d\" y=\"%d\" width=\"20\" height=\"%d\" fill=\"url(#scale)\" stroke=\"black\" "
               "stroke-width=\"0.5\"/>\n", legend_x, top, grid);
    for (int k = 0; k <= 4; k++) {
        double v = lo + (hi - lo) * k / 4.0;
        int y = top + grid - (int)lround(grid * k / 4.0);
        fprintf(f, "<line x1=\"%d\" y1=\"%d\" x2=\"%d\" y2=\"%d\" stroke=\"black\"/>\n", legend_x + 20, y,
                legend_x + 25, y);
        fprintf(f, "<text x=\"%d\" y=\"%d\" font-size=\"11\">%.3f</text>\n", legend_x + 28, y + 4, v);
    }
    fprintf(f, "<text x=\"%d\" y=\"%d\" font-size=\"11\">cosine</text>\n", legend_x, top - 8);
    int ly = top + grid + 30;
    fprintf(f, "<text x=\"%d\" y=\"%d\" font-size=\"11\">Cell (i, j): mean cosine similarity of layers i and j's "
               "post-softmax attention rows; diagonal = 1 (grey).</text>\n", left, ly);
    if (chosen)
        fprintf(f, "<text x=\"%d\" y=\"%d\" font-size=\"11\" fill=\"#d62728\">Red: chosen shared layers (marker, "
                   "dashed row and column); thick box: the layer's source.</text>\n", left, ly + 18);
    fprintf(f, "</svg>\n");
    if (fclose(f) != 0) {
        fprintf(stderr, "%s: cannot write '%s'\n", prog, path);
        return 1;
    }
    return 0;
}

/* ==== The command ====================================================== */

static bool parse_percent(const char *s, double *out, const char *prog) {
    char buf[64];
    size_t n = strlen(s);
    if (n == 0 || n >= sizeof buf) {
        fprintf(stderr, "%s: --max-ppl-increase must be a percentage such as 2%%, got '%s'\n", prog, s);
        return false;
    }
    memcpy(buf, s, n + 1);
    if (buf[n - 1] == '%') buf[n - 1] = 0;
    double v;
    if (!cli_double(buf, 0, 1000, &v, "--max-ppl-increase (percent)", prog)) return false;
    *out = v / 100.0;
    return true;
}

/* The model's own saserve.shared_layers setting ("" if none), from a small
 * silent open.  Returns 0 or 1 (message printed). */
static int model_setting(const engine_params *p, char *out, size_t cap, const char *prog) {
    engine_params q = *p;
    q.n_ctx = 16;
    q.max_seqs = 1;
    q.max_batch_tokens = 16;
    q.kv_cache_bytes = 0;
    engine_set_log(eval_log_quiet, NULL);
    engine *e = cli_open_engine(&q, prog);
    engine_set_log(NULL, NULL);
    if (!e) return 1;
    const engine_info *in = engine_get_info(e);
    snprintf(out, cap, "%s", strcmp(in->shared_origin, "model") ? "" : in->shared_layers);
    engine_close(e);
    return 0;
}

/* Similarity pass: no sharing, every layer's probabilities to the observer,
 * and the baseline NLL.  S gets the head mean [L][L], per_head [H][L][L].
 * Returns 0 or 1. */
static int similarity_pass(engine_params *p, long *ctx, const char *text_path, const char *tokens_path,
                           long max_seqs, eval_stream *s, int *n_windows, double **S_out, double **per_head_out,
                           measurement *base, const char *prog, int *status) {
    p->shared_layers = "none";
    p->capture_attention = true;
    engine *e = eval_open(p, ctx, SIM_BATCH_TOKENS, false, prog, status);
    if (!e) return 1;
    *status = 1;
    const engine_info *in = engine_get_info(e);
    int L = in->n_layer, H = in->n_head, rc = 1;
    /* The observer keeps up to L * H * ctx floats per row of a step: a big
     * model gets fewer rows per step (windows are then fed in chunks). */
    size_t row_bytes = (size_t)L * (size_t)H * (size_t)*ctx * sizeof(float);
    if ((size_t)in->max_batch_tokens * row_bytes > SIM_MEMORY_BYTES) {
        long rows = (long)(SIM_MEMORY_BYTES / row_bytes);
        engine_close(e);
        e = eval_open(p, ctx, rows > 0 ? (int)rows : 1, true, prog, status);
        if (!e) return 1;
        *status = 1;
        in = engine_get_info(e);
    }
    sim_state st = {.L = L, .H = H, .max_items = in->max_seqs};
    double *S = NULL;
    if (eval_stream_load(e, text_path, tokens_path, s, prog)) goto out;
    *n_windows = eval_n_windows(s, (int)*ctx);
    if (*n_windows == 0) {
        fprintf(stderr, "%s: '%s' has %zu tokens; one window of --ctx %ld needs %ld\n", prog,
                text_path ? text_path : tokens_path, s->n, *ctx, *ctx + 1);
        goto out;
    }
    if (max_seqs < *n_windows) *n_windows = (int)max_seqs;
    st.sum = calloc((size_t)H * (size_t)L * (size_t)L, sizeof *st.sum);
    st.off = calloc((size_t)st.max_items, sizeof *st.off);
    st.size = calloc((size_t)st.max_items, sizeof *st.size);
    st.pos0 = calloc((size_t)st.max_items, sizeof *st.pos0);
    st.n_tokens = calloc((size_t)st.max_items, sizeof *st.n_tokens);
    S = calloc((size_t)L * (size_t)L, sizeof *S);
    if (!st.sum || !st.off || !st.size || !st.pos0 || !st.n_tokens || !S) {
        fprintf(stderr, "%s: out of memory\n", prog);
        goto out;
    }
    fprintf(stderr, "%s: %zu tokens; %d windows of %ld; attention similarity and baseline\n", prog, s->n,
            *n_windows, *ctx);
    engine_set_attn_observer(e, sim_observer, &st);
    eval_result res;
    if (eval_windows(e, s, (int)*ctx, *n_windows, &res, prog)) goto out;
    if (st.oom || st.rows == 0) {
        fprintf(stderr, "%s: out of memory keeping the attention rows\n", prog);
        goto out;
    }
    /* Sums (a < b) to means, mirrored; S is the mean over heads. */
    for (int h = 0; h < H; h++) {
        double *m = st.sum + (size_t)h * (size_t)L * (size_t)L;
        for (int a = 0; a < L; a++) {
            m[a * L + a] = 1.0;
            for (int b = a + 1; b < L; b++) {
                m[a * L + b] /= (double)st.rows;
                m[b * L + a] = m[a * L + b];
            }
        }
        for (int k = 0; k < L * L; k++) S[k] += m[k] / H;
    }
    snprintf(base->shared, sizeof base->shared, "none");
    base->nll = res.nll_sum / (double)res.tokens;
    base->ppl = exp(base->nll);
    base->kv_bytes_per_token = base->kv_unshared = in->kv_bytes_per_token_unshared;
    *S_out = S;
    *per_head_out = st.sum;
    S = NULL;
    st.sum = NULL;
    rc = 0;
out:
    free(S);
    free(st.sum);
    free(st.buf);
    free(st.off);
    free(st.size);
    free(st.pos0);
    free(st.n_tokens);
    engine_close(e);
    return rc;
}

/* The source layers of a setting's runs, e.g. "4" for "5-7", "2,8" for
 * "3-5,9-11". */
static void sources_text(const char *shared, int L, char *out, size_t cap) {
    out[0] = 0;
    bool *mask = calloc((size_t)L, sizeof *mask);
    char err[128];
    if (mask && !engine_parse_shared_layers(shared, L, mask, err, sizeof err)) {
        size_t o = 0;
        for (int l = 1; l < L && o + 12 < cap; l++)
            if (mask[l] && !mask[l - 1]) o += (size_t)snprintf(out + o, cap - o, "%s%d", o ? "," : "", l - 1);
    }
    free(mask);
}

static void print_tables(const engine_info *in, const runner *r, const double *S, const selection *sel,
                         double max_inc, bool sim_only) {
    int L = in->n_layer;
    const measurement *m0 = &r->m[0];
    printf("model: %s (%s), %d windows x %ld tokens\n\n", in->name, in->weight_type, r->n_windows, r->ctx);
    printf("attention similarity: mean cosine of post-softmax rows (heads, positions, windows)\n    ");
    for (int j = 0; j < L; j++) printf(" %5d", j);
    printf("\n");
    for (int i = 0; i < L; i++) {
        printf("%4d", i);
        for (int j = 0; j < L; j++) printf(" %5.3f", S[i * L + j]);
        printf("\n");
    }
    printf("\nbaseline (no sharing): ppl %.4f, mean NLL %.6f\n", m0->ppl, m0->nll);
    if (sim_only) return;
    double limit_ppl = m0->ppl * (1 + max_inc);
    printf("\ncandidates (limit +%.2f%%: ppl <= %.4f)\n", 100 * max_inc, limit_ppl);
    printf("%-16s %6s %10s %10s %10s %s\n", "shared layers", "source", "ppl", "increase", "KV saved", "fits");
    for (int c = 0; c < sel->n_cands; c++) {
        const measurement *m = &r->m[sel->cands[c].m];
        char srcs[64];
        sources_text(m->shared, L, srcs, sizeof srcs);
        printf("%-16s %6s %10.4f %+9.2f%% %9.1f%% %s\n", m->shared, srcs, m->ppl, 100 * (m->ppl / m0->ppl - 1),
               100 * kv_saving(m), m->nll - m0->nll <= log1p(max_inc) ? "yes" : "no");
    }
    if (sel->n_trials) {
        printf("\nunions tried (cheapest increase per shared layer first)\n");
        for (int t = 0; t < sel->n_trials; t++) {
            const trial *tr = &sel->trials[t];
            if (tr->m < 0) {
                printf("%-16s %6s %10s %10s            skipped: parts' increases add up past the limit\n",
                       tr->shared, "", "-", "-");
                continue;
            }
            const measurement *m = &r->m[tr->m];
            char srcs[64];
            sources_text(m->shared, L, srcs, sizeof srcs);
            printf("%-16s %6s %10.4f %+9.2f%% %9.1f%% %s\n", tr->shared, srcs, m->ppl, 100 * (m->ppl / m0->ppl - 1),
                   100 * kv_saving(m), tr->accepted ? "kept" : "over the limit");
        }
    }
    const measurement *ch = &r->m[sel->choice];
    printf("\nchoice: --shared-layers %s\n", ch->shared);
    printf("  ppl %.4f (%+.2f%% over %.4f), KV %zu bytes/token (%.1f%% saved)\n", ch->ppl,
           100 * (ch->ppl / m0->ppl - 1), m0->ppl, ch->kv_bytes_per_token, 100 * kv_saving(ch));
}

static json_t *measurement_json(const measurement *m, double nll0, double limit) {
    return json_pack("{s:s, s:i, s:f, s:f, s:f, s:I, s:f, s:b}", "shared_layers", m->shared, "n_shared", m->n_shared,
                     "ppl", m->ppl, "nll_mean", m->nll, "increase", exp(m->nll - nll0) - 1.0,
                     "kv_bytes_per_token", (json_int_t)m->kv_bytes_per_token, "kv_saving_ratio", kv_saving(m),
                     "within_limit", m->nll - nll0 <= limit);
}

static json_t *matrix_json(const double *a, int L) {
    json_t *rows = json_array();
    for (int i = 0; i < L; i++) {
        json_t *row = json_array();
        for (int j = 0; j < L; j++) json_array_append_new(row, json_real(a[i * L + j]));
        json_array_append_new(rows, row);
    }
    return rows;
}

static json_t *result_json(const engine_info *in, const runner *r, const double *S, const double *per_head,
                           const selection *sel, double max_inc, bool sim_only) {
    int L = in->n_layer;
    double nll0 = r->m[0].nll, limit = log1p(max_inc);
    json_t *heads = json_array();
    for (int h = 0; h < in->n_head; h++)
        json_array_append_new(heads, matrix_json(per_head + (size_t)h * (size_t)L * (size_t)L, L));
    json_t *o = json_pack("{s:s, s:i, s:I, s:i, s:I, s:i, s:o, s:o, s:o, s:f}", "model", in->name, "layers", L,
                          "ctx", (json_int_t)r->ctx, "windows", r->n_windows, "tokens",
                          (json_int_t)r->n_windows * r->ctx, "heads", in->n_head, "similarity", matrix_json(S, L),
                          "similarity_per_head", heads, "baseline", measurement_json(&r->m[0], nll0, limit),
                          "max_ppl_increase", max_inc);
    json_t *cands = json_array(), *unions = json_array();
    if (!sim_only) {
        for (int c = 0; c < sel->n_cands; c++)
            json_array_append_new(cands, measurement_json(&r->m[sel->cands[c].m], nll0, limit));
        for (int t = 0; t < sel->n_trials; t++) {
            const trial *tr = &sel->trials[t];
            json_t *u = tr->m >= 0 ? measurement_json(&r->m[tr->m], nll0, limit)
                                   : json_pack("{s:s, s:n}", "shared_layers", tr->shared, "ppl");
            json_object_set_new(u, "accepted", json_boolean(tr->accepted));
            json_object_set_new(u, "measured", json_boolean(tr->m >= 0));
            json_array_append_new(unions, u);
        }
    }
    json_object_set_new(o, "candidates", cands);
    json_object_set_new(o, "unions", unions);
    json_object_set_new(o, "choice", sim_only ? json_null() : measurement_json(&r->m[sel->choice], nll0, limit));
    return o;
}

int cli_calibrate(int argc, char **argv) {
    const char *prog = "saserve calibrate";
    engine_params p = engine_default_params();
    const char *text_path = NULL, *tokens_path = NULL, *svg_path = NULL;
    long ctx = 0, max_seqs = DEFAULT_MAX_SEQS, max_span = DEFAULT_MAX_SPAN;
    double max_inc = DEFAULT_MAX_INCREASE;
    bool json = false, sim_only = false;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v;
        int r = cli_engine_flag(argc, argv, &i, &p, prog);
        if (r < 0) return 2;
        if (r > 0) continue;
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            calibrate_usage(stdout);
            return 0;
        } else if (!strcmp(a, "-f") || !strcmp(a, "--file")) {
            if (!(text_path = cli_value(argc, argv, &i, prog))) return 2;
        } else if (!strcmp(a, "--tokens")) {
            if (!(tokens_path = cli_value(argc, argv, &i, prog))) return 2;
        } else if (!strcmp(a, "--ctx")) {
            if (!(v = cli_value(argc, argv, &i, prog)) || !cli_int(v, 1, 1 << 20, &ctx, a, prog)) return 2;
        } else if (!strcmp(a, "--max-seqs") || !strcmp(a, "--max-windows")) {
            if (!(v = cli_value(argc, argv, &i, prog)) || !cli_int(v, 1, 0x7fffffff, &max_seqs, a, prog)) return 2;
        } else if (!strcmp(a, "--max-span")) {
            if (!(v = cli_value(argc, argv, &i, prog)) || !cli_int(v, 1, 1024, &max_span, a, prog)) return 2;
        } else if (!strcmp(a, "--max-ppl-increase")) {
            if (!(v = cli_value(argc, argv, &i, prog)) || !parse_percent(v, &max_inc, prog)) return 2;
        } else if (!strcmp(a, "--svg")) {
            if (!(svg_path = cli_value(argc, argv, &i, prog))) return 2;
        } else if (!strcmp(a, "--json")) {
            json = true;
        } else if (!strcmp(a, "--similarity-only")) {
            sim_only = true;
        } else {
            fprintf(stderr, "%s: unknown option '%s'\n", prog, a);
            calibrate_usage(stderr);
            return 2;
        }
    }
    if (!p.model_path || (!text_path) == (!tokens_path)) {
        fprintf(stderr, "%s: --model and exactly one of --file or --tokens are required\n", prog);
        calibrate_usage(stderr);
        return 2;
    }
    if (p.shared_layers) {
        fprintf(stderr, "%s: --shared-layers does not apply: calibrate tries the settings itself\n", prog);
        return 2;
    }
    if (ctx == 0 && p.n_ctx > 0) ctx = p.n_ctx;

    char own[256];
    if (model_setting(&p, own, sizeof own, prog)) return 1;

    int status = 1, n_windows = 0;
    eval_stream s = {0};
    double *S = NULL, *per_head = NULL;
    measurement base = {0};
    runner run = {0};
    selection sel = {0};
    engine *info_e = NULL;
    if (similarity_pass(&p, &ctx, text_path, tokens_path, max_seqs, &s, &n_windows, &S, &per_head, &base, prog,
                        &status))
        goto done;
    status = 1;
    /* Candidate engines are sized like the similarity pass but batch more. */
    run = (runner){.p = p, .ctx = ctx, .n_windows = n_windows, .s = &s, .prog = prog};
    measurement *m0 = runner_add(&run);
    if (!m0) goto done;
    *m0 = base;
    run.n = 1;
    double nll0 = base.nll, limit = log1p(max_inc);

    /* The engine info for the report (names, layer count); a small open. */
    {
        engine_params q = p;
        q.shared_layers = "none";
        q.capture_attention = false;
        q.max_seqs = 1;
        q.max_batch_tokens = 16;
        engine_set_log(eval_log_quiet, NULL);
        info_e = cli_open_engine(&q, prog);
        engine_set_log(NULL, NULL);
        if (!info_e) goto done;
    }
    const engine_info *in = engine_get_info(info_e);
    int L = in->n_layer;

    if (!sim_only) {
        int n_runs = 0;
        for (int len = 1; len <= max_span && len < L; len++) n_runs += L - len;
        int total = n_runs + (own[0] ? 1 : 0), k = 0;
        sel.cands = calloc((size_t)total + 1, sizeof *sel.cands);
        if (!sel.cands) goto done;
        for (int a = 1; a < L; a++)
            for (int len = 1; len <= max_span && a + len - 1 < L; len++) {
                char spec[64], what[64];
                if (len == 1) snprintf(spec, sizeof spec, "%d", a);
                else snprintf(spec, sizeof spec, "%d-%d", a, a + len - 1);
                snprintf(what, sizeof what, "candidate %d/%d", ++k, total);
                int mi = measure(&run, spec, what);
                if (mi < 0) goto done;
                sel.cands[sel.n_cands++].m = mi;
            }
        if (own[0] && runner_find(&run, own) < 0) {
            char what[64];
            snprintf(what, sizeof what, "candidate %d/%d (the model's own)", total, total);
            int mi = measure(&run, own, what);
            if (mi < 0) goto done;
            sel.cands[sel.n_cands++].m = mi;
        }
        for (int c = 0; c < sel.n_cands; c++) {
            const measurement *m = &run.m[sel.cands[c].m];
            sel.cands[c].cost = (m->nll - nll0) / (m->n_shared > 0 ? m->n_shared : 1);
        }
        if (choose(&run, L, nll0, limit, &sel)) goto done;
    }

    if (json) {
        json_t *o = result_json(in, &run, S, per_head, &sel, max_inc, sim_only);
        char *txt = o ? json_dumps(o, JSON_REAL_PRECISION(8)) : NULL;
        json_decref(o);
        if (!txt) {
            fprintf(stderr, "%s: cannot format the JSON result\n", prog);
            goto done;
        }
        printf("%s\n", txt);
        free(txt);
    } else {
        print_tables(in, &run, S, &sel, max_inc, sim_only);
    }
    fflush(stdout);
    if (svg_path) {
        bool mask[1024] = {false};
        int src[1024];
        char title[512], sub1[512], sub2[512], err[128];
        bool have = !sim_only && L <= 1024 &&
                    !engine_parse_shared_layers(run.m[sel.choice].shared, L, mask, err, sizeof err);
        for (int l = 0; l < L && l < 1024; l++) src[l] = mask[l] && l > 0 ? src[l - 1] : l;
        snprintf(title, sizeof title, "%s: attention similarity between layers", in->name);
        snprintf(sub1, sizeof sub1, "%d windows x %ld tokens; no sharing: ppl %.3f", n_windows, ctx, base.ppl);
        if (have) {
            const measurement *ch = &run.m[sel.choice];
            snprintf(sub2, sizeof sub2, "chosen: --shared-layers %s, ppl %.3f (%+.2f%%, limit %+.1f%%), KV %.1f%% smaller",
                     ch->shared, ch->ppl, 100 * (ch->ppl / base.ppl - 1), 100 * max_inc, 100 * kv_saving(ch));
        } else {
            snprintf(sub2, sizeof sub2, "%s", sim_only ? "similarity only: no layers chosen" : "");
        }
        if (write_svg(svg_path, S, L, have ? mask : NULL, src, title, sub1, sub2, prog)) goto done;
        fprintf(stderr, "%s: wrote %s\n", prog, svg_path);
    }
    status = 0;
done:
    engine_close(info_e);
    eval_stream_free(&s);
    free(S);
    free(per_head);
    free(run.m);
    free(sel.cands);
    free(sel.trials);
    return status;
}
