/*
 * fuzz_gguf.c - the checked GGUF reader on arbitrary bytes, then the loaders
 * that read its metadata: the tokenizer (both kinds, merges included) and the
 * model's hyperparameters and tensor shapes.
 *
 * Invariants: gguf_parse either fails with a message or hands out only
 * pointers inside the buffer (every string, array and tensor is read here in
 * full, so ASan sees any that is not); the loaders fail cleanly.
 */
#include <string.h>

#include "engine.h"
#include "fuzz.h"
#include "gguf.h"
#include "model.h"
#include "ops.h"
#include "tokenizer.h"

static void quiet(engine_log_level level, const char *msg, void *ud) {
    (void)level, (void)msg, (void)ud;
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc, (void)argv;
    engine_set_log(quiet, NULL);
    ops_init(NULL);
    return 0;
}

static const uint8_t *lo, *hi;

static void in_buffer(const void *p, uint64_t n, const char *what) {
    const uint8_t *q = p;
    FUZZ_CHECK(n == 0 || (q >= lo && q <= hi && n <= (uint64_t)(hi - q)), "%s outside the buffer", what);
}

/* Reads every byte the reader hands out. */
static unsigned touch(const void *p, uint64_t n) {
    unsigned x = 0;
    for (uint64_t i = 0; i < n; i++) x += ((const uint8_t *)p)[i];
    return x;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    /* Work on a private copy so the parser cannot rely on bytes past size. */
    uint8_t *copy = malloc(size ? size : 1);
    if (!copy) return 0;
    memcpy(copy, data, size);
    lo = copy;
    hi = copy + size;
    char err[512];
    err[0] = 0;
    gguf *g = gguf_parse(copy, size, err, sizeof err);
    if (!g) {
        FUZZ_CHECK(err[0] != 0, "gguf_parse failed without a message");
        free(copy);
        return 0;
    }
    volatile unsigned sink = 0;
    for (uint64_t i = 0; i < gguf_n_kv(g); i++) {
        const gguf_kv *kv = gguf_kv_at(g, i);
        in_buffer(kv->key.p, kv->key.len, "key");
        sink += touch(kv->key.p, kv->key.len);
        if (kv->type == GGUF_T_STRING) {
            in_buffer(kv->v.s.p, kv->v.s.len, "string value");
            sink += touch(kv->v.s.p, kv->v.s.len);
        } else if (kv->type == GGUF_T_ARRAY) {
            if (kv->v.arr.type == GGUF_T_STRING) {
                for (uint64_t j = 0; j < kv->v.arr.n; j++) {
                    in_buffer(kv->v.arr.strs[j].p, kv->v.arr.strs[j].len, "array string");
                    sink += touch(kv->v.arr.strs[j].p, kv->v.arr.strs[j].len);
                }
            } else {
                for (uint64_t j = 0; j < kv->v.arr.n; j++) sink += (unsigned)gguf_arr_i64(kv, j);
            }
        }
    }
    for (uint64_t i = 0; i < gguf_n_tensors(g); i++) {
        const gguf_tensor *t = gguf_tensor_at(g, i);
        in_buffer(t->name.p, t->name.len, "tensor name");
        in_buffer(t->data, t->nbytes, "tensor data");
        FUZZ_CHECK(t->nbytes > 0 && ggml_type_name(t->type) != NULL, "tensor with no bytes or an unknown type");
        if (t->nbytes <= 4096) sink += touch(t->data, t->nbytes);
    }
    uint64_t u;
    double f;
    bool b;
    gguf_str s;
    bool bad = false;
    gguf_get_u64(g, "general.alignment", &u, &bad);
    gguf_get_f64(g, "llama.rope.freq_base", &f, &bad);
    gguf_get_bool(g, "tokenizer.ggml.add_bos_token", &b, &bad);
    gguf_get_str(g, "general.architecture", &s, &bad);

    tokenizer *tok = NULL;
    if (tokenizer_load(&tok, g, err, sizeof err) == 0) {
        /* A loaded tokenizer must encode and decode a little text. */
        static const char text[] = "Hello <s> world's 123 \xc3\xa9\xe2\x96\x81!";
        int32_t ids[64];
        int n = tokenizer_encode(tok, text, sizeof text - 1, true, ids, 64);
        FUZZ_CHECK(n >= 0 || n == ENGINE_ENOMEM, "encode failed: %d", n);
        char out[512];
        if (n > 0) {
            for (int i = 0; i < n && i < 64; i++) FUZZ_CHECK(ids[i] >= 0 && ids[i] < tokenizer_n_vocab(tok), "id");
            tokenizer_decode(tok, ids, n < 64 ? n : 64, out, sizeof out);
        }
        for (int32_t id = 0; id < tokenizer_n_vocab(tok) && id < 512; id++) {
            int l = tokenizer_token_bytes(tok, id, out, sizeof out);
            FUZZ_CHECK(l >= 0, "token_bytes of an in-range id failed");
        }
        tokenizer_free(tok);
    } else {
        FUZZ_CHECK(err[0] != 0, "tokenizer_load failed without a message");
    }
    /* The model loader takes g over (and closes it). */
    model m;
    err[0] = 0;
    if (model_load_gguf(&m, g, "fuzz.gguf", err, sizeof err) == 0) {
        FUZZ_CHECK(m.n_layer > 0 && m.n_vocab > 0 && m.head_dim > 0, "model loaded with empty shapes");
        model_free(&m);
    } else {
        FUZZ_CHECK(err[0] != 0, "model_load_gguf failed without a message");
    }
    (void)sink;
    free(copy);
    return 0;
}
