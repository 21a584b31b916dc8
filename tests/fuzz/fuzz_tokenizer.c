/*
 * fuzz_tokenizer.c - encode and decode with both tokenizer kinds: sa-tiny's
 * SentencePiece BPE, and the byte-level BPE vocabularies of Llama 3
 * (llama-bpe) and Qwen3 (qwen2 pre-tokenizer, NFC first); see fuzz.h.
 *
 * Input: byte 0 picks the tokenizer (bits 0-1: sa-tiny, Llama 3, Qwen3), add_bos (bit 2),
 * parse_special (bit 3) and decode mode (bit 4); the rest is the text, or in
 * decode mode little-endian int32 ids (out-of-range ones included: the API
 * reports them, it must not read past the vocabulary).
 *
 * Invariants: encoding the same text twice gives the same ids, all in range;
 * decoding gives valid UTF-8 of the length it announced; plain valid UTF-8
 * text survives encode -> decode unchanged (after NFC for Qwen; U+2581
 * becomes a space with SentencePiece).
 */
#include <string.h>

#include "engine.h"
#include "gguf.h"
#include "tokenizer.h"
#include "fuzz.h"
#include "unicode.h"
#include "utf8.h"

#define N_TOK 3
static gguf *G[N_TOK];
static tokenizer *T[N_TOK];

static void quiet(engine_log_level level, const char *msg, void *ud) {
    (void)level, (void)msg, (void)ud;
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc, (void)argv;
    engine_set_log(quiet, NULL);
    fuzz_load_tokenizer(FUZZ_SPM_MODEL, NULL, &G[0], &T[0]);
    fuzz_load_tokenizer(FUZZ_LLAMA3_MODEL, FUZZ_LLAMA3_FALLBACK, &G[1], &T[1]);
    fuzz_load_tokenizer(FUZZ_QWEN_MODEL, FUZZ_QWEN_FALLBACK, &G[2], &T[2]);
    return 0;
}

/* Standalone decode into a fresh buffer; checks its length and validity. */
static char *decode(const tokenizer *t, const int32_t *ids, int n, size_t *len) {
    size_t need = tokenizer_decode(t, ids, n, NULL, 0);
    char *out = malloc(need + 1);
    FUZZ_CHECK(out != NULL, "oom");
    size_t got = tokenizer_decode(t, ids, n, out, need + 1);
    FUZZ_CHECK(got == need, "decode announced %zu bytes, wrote %zu", need, got);
    FUZZ_CHECK(out[got] == 0, "decode output not terminated");
    FUZZ_CHECK(utf8_valid(out, got), "decode output is not valid UTF-8");
    *len = got;
    return out;
}

static int32_t *encode(const tokenizer *t, const char *text, size_t len, bool add_bos, bool special, int *n_out) {
    tokenizer_fragment f = {text, len, special};
    int n = tokenizer_encode_fragments(t, &f, 1, add_bos, NULL, 0);
    FUZZ_CHECK(n >= 0, "encode failed: %d", n);
    int32_t *ids = malloc(((size_t)n + 1) * sizeof *ids);
    FUZZ_CHECK(ids != NULL, "oom");
    int n2 = tokenizer_encode_fragments(t, &f, 1, add_bos, ids, n);
    FUZZ_CHECK(n2 == n, "encode counted %d ids, then %d", n, n2);
    for (int i = 0; i < n; i++) FUZZ_CHECK(ids[i] >= 0 && ids[i] < tokenizer_n_vocab(t), "id %d out of range", ids[i]);
    /* A short buffer gets a prefix of the same ids. */
    if (n > 1) {
        int32_t few[2];
        FUZZ_CHECK(tokenizer_encode_fragments(t, &f, 1, add_bos, few, 1) == n && few[0] == ids[0], "prefix");
    }
    *n_out = n;
    return ids;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1) return 0;
    int which = (data[0] & 3) % N_TOK;
    bool add_bos = data[0] & 4, special = data[0] & 8, decode_mode = data[0] & 16;
    const tokenizer *t = T[which];
    const char *text = (const char *)data + 1;
    size_t len = size - 1;
    if (decode_mode) {
        int n = (int)(len / 4);
        int32_t *ids = malloc(((size_t)n + 1) * sizeof *ids);
        memcpy(ids, text, (size_t)n * 4);
        size_t dl;
        free(decode(t, ids, n, &dl));
        char piece[256];
        for (int i = 0; i < n; i++) {
            int l = tokenizer_token_bytes(t, ids[i], piece, sizeof piece);
            FUZZ_CHECK((ids[i] >= 0 && ids[i] < tokenizer_n_vocab(t)) == (l >= 0), "token_bytes(%d) = %d", ids[i], l);
            if (l >= 0) FUZZ_CHECK(tokenizer_token_bytes(t, ids[i], NULL, 0) == l, "token_bytes length");
        }
        free(ids);
        return 0;
    }
    int n;
    int32_t *ids = encode(t, text, len, add_bos, special, &n);
    size_t dl;
    char *back = decode(t, ids, n, &dl);
    if (!special && utf8_valid(text, len)) {
        /* Round trip.  Qwen normalises to NFC first; SentencePiece writes
         * spaces as U+2581, so a U+2581 of the input comes back as a space
         * (as with sentencepiece itself). */
        char *norm = NULL;
        size_t nl = len;
        if (which == 2) FUZZ_CHECK(unicode_nfc(text, len, &norm, &nl) == 0, "nfc");
        if (which == 0) {
            norm = malloc(len + 1);
            nl = 0;
            for (size_t i = 0; i < len;) {
                if (i + 3 <= len && !memcmp(text + i, "\xe2\x96\x81", 3)) {
                    norm[nl++] = ' ';
                    i += 3;
                } else {
                    norm[nl++] = text[i++];
                }
            }
        }
        const char *want = norm ? norm : text;
        FUZZ_CHECK(dl == nl && memcmp(back, want, nl) == 0, "round trip of %zu bytes gave %zu bytes (tokenizer %d)",
                   nl, dl, which);
        free(norm);
    }
    free(back);
    free(ids);
    return 0;
}
