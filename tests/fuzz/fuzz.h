/*
 * fuzz.h - shared bits of the libFuzzer targets in tests/fuzz.
 *
 * Each target is one fuzz_<name>.c with LLVMFuzzerTestOneInput (and, where
 * it needs a model, LLVMFuzzerInitialize).  Beyond memory safety (ASan,
 * UBSan) the targets check the invariants their code promises; a broken
 * invariant aborts with FUZZ_CHECK's message, which libFuzzer reports as a
 * crash with the input saved.  `make fuzz` builds and runs them all.
 */
#ifndef SASERVE_FUZZ_H
#define SASERVE_FUZZ_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerInitialize(int *argc, char ***argv);

#define FUZZ_CHECK(cond, ...)                                                          \
    do {                                                                               \
        if (!(cond)) {                                                                 \
            fprintf(stderr, "fuzz invariant failed at %s:%d: %s: ", __FILE__, __LINE__, #cond); \
            fprintf(stderr, __VA_ARGS__);                                              \
            fputc('\n', stderr);                                                       \
            abort();                                                                   \
        }                                                                              \
    } while (0)

/* Paths relative to the repository root (make fuzz runs there);
 * SASERVE_FUZZ_ROOT overrides the root. */
static inline const char *fuzz_path(char *buf, size_t cap, const char *rel) {
    const char *root = getenv("SASERVE_FUZZ_ROOT");
    snprintf(buf, cap, "%s%s%s", root ? root : "", root ? "/" : "", rel);
    return buf;
}

/* Tokenizers: sa-tiny's SentencePiece BPE ("llama"), and the real Llama 3
 * (llama-bpe) and Qwen3 (qwen2 pre-tokenizer, NFC) byte-level BPE
 * vocabularies that the tokenizer_bpe suite of `make test` converts into
 * build/bpe/.  Without them the targets fall back to the small byte-level
 * vocabularies of the gguf seeds (and say so). */
#define FUZZ_SPM_MODEL "models/sa-tiny-sa-q8_0.gguf"
#define FUZZ_LLAMA3_MODEL "build/bpe/llama3-v1.gguf"
#define FUZZ_LLAMA3_FALLBACK "tests/fuzz/gguf/bpe-llama-bpe.gguf"
#define FUZZ_QWEN_MODEL "build/bpe/qwen3-v1.gguf"
#define FUZZ_QWEN_FALLBACK "tests/fuzz/gguf/bpe-qwen2.gguf"

#ifdef SASERVE_TOKENIZER_H
#include <unistd.h>
/* Opens a tokenizer (primary path, else fallback); exits on failure. */
static inline void fuzz_load_tokenizer(const char *primary, const char *fallback, gguf **g, tokenizer **t) {
    char path[1024], err[512];
    fuzz_path(path, sizeof path, primary);
    if (fallback && access(path, R_OK) != 0) {
        fprintf(stderr, "fuzz: %s not found (make test builds it); using %s\n", primary, fallback);
        fuzz_path(path, sizeof path, fallback);
    }
    *g = gguf_open(path, err, sizeof err);
    if (!*g || tokenizer_load(t, *g, err, sizeof err) != 0) {
        fprintf(stderr, "fuzz: cannot load the tokenizer of %s: %s\n", path, err);
        exit(1);
    }
}
#endif

#endif
