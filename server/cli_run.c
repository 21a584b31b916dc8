/*
 * cli_run.c - saserve run: one prompt, its continuation on stdout.
 *
 * Only the generated text goes to stdout (as it is produced, never splitting
 * a UTF-8 character); logs and timings go to stderr.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cli.h"
#include "cli_common.h"
#include "utf8.h"

static void run_usage(FILE *f) {
    fprintf(f,
            "usage: saserve run --model FILE -p TEXT [options]\n"
            "\n"
            "  -p, --prompt TEXT        prompt (a BOS token is added as the model asks)\n"
            "  -n, --n-predict N        tokens to generate (default 64)\n"
            "  --temperature T          0 = greedy (default 0.8)\n"
            "  --top-k N                (default 40; 0 = off)\n"
            "  --top-p P                (default 0.95)\n"
            "  --min-p P                (default 0.05)\n"
            "  --seed S                 sampling seed (default: from the clock)\n"
            "  --ignore-eos             keep generating past end-of-sequence\n"
            "%s",
            cli_engine_help);
}

int cli_run(int argc, char **argv) {
    const char *prog = "saserve run";
    engine_params p = engine_default_params();
    p.max_seqs = 1;
    p.prefix_cache = false;
    const char *prompt = NULL;
    long n_predict = 64;
    double temp = 0.8, top_p = 0.95, min_p = 0.05;
    long top_k = 40;
    unsigned long long seed = (unsigned long long)time(NULL);
    bool ignore_eos = false;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v;
        int r = cli_engine_flag(argc, argv, &i, &p, prog);
        if (r < 0) return 2;
        if (r > 0) continue;
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            run_usage(stdout);
            return 0;
        } else if (!strcmp(a, "-p") || !strcmp(a, "--prompt")) {
            if (!(prompt = cli_value(argc, argv, &i, prog))) return 2;
        } else if (!strcmp(a, "-n") || !strcmp(a, "--n-predict")) {
            if (!(v = cli_value(argc, argv, &i, prog)) || !cli_int(v, 0, 1 << 24, &n_predict, a, prog)) return 2;
        } else if (!strcmp(a, "--temperature") || !strcmp(a, "--temp")) {
            if (!(v = cli_value(argc, argv, &i, prog)) || !cli_double(v, 0, 100, &temp, a, prog)) return 2;
        } else if (!strcmp(a, "--top-k")) {
            if (!(v = cli_value(argc, argv, &i, prog)) || !cli_int(v, 0, 1 << 30, &top_k, a, prog)) return 2;
        } else if (!strcmp(a, "--top-p")) {
            if (!(v = cli_value(argc, argv, &i, prog)) || !cli_double(v, 0, 1, &top_p, a, prog)) return 2;
        } else if (!strcmp(a, "--min-p")) {
            if (!(v = cli_value(argc, argv, &i, prog)) || !cli_double(v, 0, 1, &min_p, a, prog)) return 2;
        } else if (!strcmp(a, "--seed")) {
            long s;
            if (!(v = cli_value(argc, argv, &i, prog)) || !cli_int(v, 0, 0x7fffffffffffffffL, &s, a, prog)) return 2;
            seed = (unsigned long long)s;
        } else if (!strcmp(a, "--ignore-eos")) {
            ignore_eos = true;
        } else {
            fprintf(stderr, "%s: unknown option '%s'\n", prog, a);
            run_usage(stderr);
            return 2;
        }
    }
    if (!p.model_path || !prompt) {
        fprintf(stderr, "%s: --model and --prompt are required\n", prog);
        run_usage(stderr);
        return 2;
    }
    engine *e = cli_open_engine(&p, prog);
    if (!e) return 1;
    const engine_info *in = engine_get_info(e);
    int rc = 1;
    int cap = in->n_ctx;
    int32_t *ids = malloc((size_t)cap * sizeof *ids);
    void *scratch = malloc(engine_sample_scratch_bytes(in->n_vocab));
    char *pending = malloc(4096);
    size_t n_pending = 0;
    if (!ids || !scratch || !pending) {
        fprintf(stderr, "%s: out of memory\n", prog);
        goto out;
    }
    int n = engine_tokenize(e, prompt, strlen(prompt), in->add_bos, ids, cap);
    if (n < 0) {
        fprintf(stderr, "%s: cannot tokenize the prompt: %s\n", prog, engine_strerror(n));
        goto out;
    }
    if (n == 0) {
        fprintf(stderr, "%s: the prompt is empty and the model adds no BOS token\n", prog);
        goto out;
    }
    if (n >= cap) {
        fprintf(stderr, "%s: the prompt has %d tokens; the context holds %d\n", prog, n, cap);
        goto out;
    }
    if (n + n_predict > cap) n_predict = cap - n;
    int seq = engine_seq_create(e);
    double t0 = cli_now();
    const float *logits = NULL;
    for (int done = 0; done < n;) {
        int chunk = n - done < in->max_batch_tokens ? n - done : in->max_batch_tokens;
        engine_batch_item it = {.seq = seq, .tokens = ids + done, .n_tokens = chunk, .prompt = true};
        int err = engine_step(e, &it, 1);
        if (err) {
            fprintf(stderr, "%s: prompt processing failed: %s\n", prog, engine_strerror(err));
            goto out;
        }
        logits = it.logits;
        done += chunk;
    }
    double t1 = cli_now();
    engine_sampling sp = {.temperature = (float)temp, .top_k = (int)top_k, .top_p = (float)top_p,
                          .min_p = (float)min_p, .repetition_penalty = 1.0f};
    engine_rng rng;
    engine_rng_seed(&rng, seed);
    int n_gen = 0;
    int32_t *gen = ids + n;
    while (n_gen < n_predict) {
        int32_t tok = engine_sample(logits, in->n_vocab, &sp, &rng, gen, n_gen, scratch);
        gen[n_gen++] = tok;
        if (!ignore_eos && engine_token_is_eog(e, tok)) break;
        int l = engine_token_bytes(e, tok, pending + n_pending, 4096 - n_pending);
        if (l > 0 && n_pending + (size_t)l <= 4096) n_pending += (size_t)l;
        size_t ok = utf8_complete_prefix(pending, n_pending);
        if (ok > 0) {
            char clean[3 * 4096];
            size_t m = utf8_sanitize(pending, ok, clean);
            fwrite(clean, 1, m, stdout);
            fflush(stdout);
            memmove(pending, pending + ok, n_pending - ok);
            n_pending -= ok;
        }
        if (n_gen == n_predict) break;
        engine_batch_item it = {.seq = seq, .tokens = &gen[n_gen - 1], .n_tokens = 1};
        int err = engine_step(e, &it, 1);
        if (err) {
            fprintf(stderr, "\n%s: decode failed: %s\n", prog, engine_strerror(err));
            goto out;
        }
        logits = it.logits;
    }
    if (n_pending) {
        char clean[3 * 4096];
        fwrite(clean, 1, utf8_sanitize(pending, n_pending, clean), stdout);
    }
    fflush(stdout);
    double t2 = cli_now();
    fprintf(stderr, "\n%s: prompt %d tokens in %.3f s (%.1f tok/s); generated %d tokens in %.3f s (%.1f tok/s)\n", prog,
            n, t1 - t0, n / (t1 - t0), n_gen, t2 - t1, n_gen > 1 ? (n_gen - 1) / (t2 - t1) : 0.0);
    rc = 0;
out:
    free(ids);
    free(scratch);
    free(pending);
    engine_close(e);
    return rc;
}
