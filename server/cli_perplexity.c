/*
 * cli_perplexity.c - saserve perplexity: perplexity of a text or token file
 * under a Shared Attention setting, and what that setting saves in the KV
 * cache.
 *
 * The windows follow cli_eval.h: window i feeds tokens [N*i, N*i + N) from
 * an empty cache and scores the next-token predictions of [N*i + 1, N*i + N];
 * perplexity = exp(mean NLL).  The result goes to stdout (a table, or one
 * JSON object with --json); progress and engine logs go to stderr.
 */
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "cli_common.h"
#include "cli_eval.h"

static void perplexity_usage(FILE *f) {
    fprintf(f,
            "usage: saserve perplexity --model FILE (--file TEXT | --tokens FILE) [options]\n"
            "\n"
            "Perplexity of a text under a Shared Attention setting, and the KV cache bytes\n"
            "per token it needs.  The input is cut into windows of N tokens; each window\n"
            "is run from an empty cache and scores its next-token predictions, so every\n"
            "token but the first is scored exactly once (an incomplete last window is\n"
            "dropped).  perplexity = exp(mean NLL).\n"
            "\n"
            "  --file FILE              text file, tokenized as one text with one leading BOS\n"
            "  --tokens FILE            raw little-endian uint16 token ids, used as they are\n"
            "  --ctx N                  window length in tokens (default 512, at most the\n"
            "                           model's context)\n"
            "  --max-windows N          score only the first N windows (default: all)\n"
            "  --json                   print one JSON object: ppl, nll_mean, tokens,\n"
            "                           kv_bytes_per_token, kv_saving_ratio, shared_layers, ...\n"
            "%s",
            cli_engine_help);
}

int cli_perplexity(int argc, char **argv) {
    const char *prog = "saserve perplexity";
    engine_params p = engine_default_params();
    p.prefix_cache = false;
    const char *text_path = NULL, *tokens_path = NULL;
    long ctx = 0, max_windows = 0;
    bool json = false;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v;
        int r = cli_engine_flag(argc, argv, &i, &p, prog);
        if (r < 0) return 2;
        if (r > 0) continue;
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            perplexity_usage(stdout);
            return 0;
        } else if (!strcmp(a, "-f") || !strcmp(a, "--file")) {
            if (!(text_path = cli_value(argc, argv, &i, prog))) return 2;
        } else if (!strcmp(a, "--tokens")) {
            if (!(tokens_path = cli_value(argc, argv, &i, prog))) return 2;
        } else if (!strcmp(a, "--ctx")) {
            if (!(v = cli_value(argc, argv, &i, prog)) || !cli_int(v, 1, 1 << 20, &ctx, a, prog)) return 2;
        } else if (!strcmp(a, "--max-windows")) {
            if (!(v = cli_value(argc, argv, &i, prog)) || !cli_int(v, 1, 0x7fffffff, &max_windows, a, prog))
                return 2;
        } else if (!strcmp(a, "--json")) {
            json = true;
        } else {
            fprintf(stderr, "%s: unknown option '%s'\n", prog, a);
            perplexity_usage(stderr);
            return 2;
        }
    }
    if (!p.model_path || (!text_path) == (!tokens_path)) {
        fprintf(stderr, "%s: --model and exactly one of --file or --tokens are required\n", prog);
        perplexity_usage(stderr);
        return 2;
    }
    /* --ctx-size (an engine flag) also sets the window when --ctx is absent. */
    if (ctx == 0 && p.n_ctx > 0) ctx = p.n_ctx;
    int status;
    engine *e = eval_open(&p, &ctx, EVAL_BATCH_TOKENS, false, prog, &status);
    if (!e) return status;
    const engine_info *in = engine_get_info(e);

    int rc = 1;
    eval_stream s;
    if (eval_stream_load(e, text_path, tokens_path, &s, prog)) goto out;
    int n_windows = eval_n_windows(&s, (int)ctx);
    if (n_windows == 0) {
        fprintf(stderr, "%s: '%s' has %zu tokens; one window of --ctx %ld needs %ld\n", prog,
                text_path ? text_path : tokens_path, s.n, ctx, ctx + 1);
        goto out;
    }
    if (max_windows > 0 && max_windows < n_windows) n_windows = (int)max_windows;
    fprintf(stderr, "%s: %zu tokens, %d windows of %ld, shared layers %s\n", prog, s.n, n_windows, ctx,
            in->shared_layers);
    eval_result res;
    if (eval_windows(e, &s, (int)ctx, n_windows, &res, prog)) goto out;

    double nll = res.nll_sum / (double)res.tokens, ppl = exp(nll);
    double saving = in->kv_bytes_per_token_unshared
                        ? 1.0 - (double)in->kv_bytes_per_token / (double)in->kv_bytes_per_token_unshared
                        : 0.0;
    if (json) {
        json_t *o = json_pack("{s:f, s:f, s:I, s:I, s:f, s:s, s:s, s:I, s:I, s:I, s:f}", "ppl", ppl, "nll_mean", nll,
                              "tokens", (json_int_t)res.tokens, "kv_bytes_per_token",
                              (json_int_t)in->kv_bytes_per_token, "kv_saving_ratio", saving, "shared_layers",
                              in->shared_layers, "model", in->name, "ctx", (json_int_t)ctx, "windows",
                              (json_int_t)res.windows, "kv_bytes_per_token_unshared",
                              (json_int_t)in->kv_bytes_per_token_unshared, "seconds", res.seconds);
        char *txt = o ? json_dumps(o, JSON_REAL_PRECISION(10)) : NULL;
        if (!txt) {
            fprintf(stderr, "%s: cannot format the JSON result\n", prog);
            json_decref(o);
            goto out;
        }
        printf("%s\n", txt);
        free(txt);
        json_decref(o);
    } else {
        printf("model               %s (%s)\n", in->name, in->weight_type);
        printf("shared layers       %s\n", in->shared_layers);
        printf("windows             %d x %ld tokens\n", res.windows, ctx);
        printf("tokens scored       %ld\n", res.tokens);
        printf("mean NLL            %.6f\n", nll);
        printf("perplexity          %.4f\n", ppl);
        printf("KV bytes per token  %zu (without sharing %zu: %.1f%% saved)\n", in->kv_bytes_per_token,
               in->kv_bytes_per_token_unshared, 100.0 * saving);
        printf("time                %.1f s (%.0f tokens/s)\n", res.seconds, (double)res.tokens / res.seconds);
    }
    fflush(stdout);
    rc = 0;
out:
    eval_stream_free(&s);
    engine_close(e);
    return rc;
}
