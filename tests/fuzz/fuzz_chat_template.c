/*
 * fuzz_chat_template.c - chat_render() for every template family, then the
 * fragments tokenized as the server does (template parts parse special
 * tokens, message contents never do).
 *
 * Input: byte 0 picks the family (mod 7) and the tokenizer (bit 4: Llama 3's
 * byte-level BPE, else sa-tiny's SentencePiece); byte 1 the fragment limit
 * (0: the server's 4096, else 1..255, to reach the overflow path); then
 * messages separated by 0xff bytes, each a role byte (mod 3) and content.
 *
 * Invariants: something is rendered (except Llama 2 with only system
 * messages, which its reference template drops; the server refuses that
 * request), the fragments tile the rendered text exactly, neighbours differ
 * in kind, -1 only when the limit was too small; families that copy each
 * message verbatim (chatml, llama3, zephyr, phi3) keep every content byte as
 * plain text; with Llama 3's tokenizer, a conversation rendered as llama3 has
 * exactly one <|start_header_id|> per message plus the assistant's, whatever
 * the contents say (no control-token injection).
 */
#include <string.h>

#include "chat.h"
#include "engine.h"
#include "gguf.h"
#include "tokenizer.h"
#include "fuzz.h"

static const char *const families[] = {"chatml", "llama2", "llama3", "mistral", "zephyr", "gemma", "phi3"};
static const char *const roles[] = {"system", "user", "assistant"};
static gguf *G[2];
static tokenizer *T[2];
static int32_t start_header = -1;

static void quiet(engine_log_level level, const char *msg, void *ud) {
    (void)level, (void)msg, (void)ud;
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc, (void)argv;
    engine_set_log(quiet, NULL);
    fuzz_load_tokenizer(FUZZ_SPM_MODEL, NULL, &G[0], &T[0]);
    fuzz_load_tokenizer(FUZZ_LLAMA3_MODEL, FUZZ_LLAMA3_FALLBACK, &G[1], &T[1]);
    start_header = tokenizer_lookup(T[1], "<|start_header_id|>", strlen("<|start_header_id|>"));
    return 0;
}

#define MAX_MSGS 64

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 2) return 0;
    const char *family = families[(data[0] & 15) % 7];
    int which = (data[0] & 16) ? 1 : 0;
    int max_frags = data[1] ? data[1] : 4096;
    chat_message msgs[MAX_MSGS];
    int n = 0;
    size_t plain_total = 0;
    for (size_t i = 2; i < size && n < MAX_MSGS;) {
        size_t end = i;
        while (end < size && data[end] != 0xff) end++;
        if (end > i) {
            msgs[n].role = roles[data[i] % 3];
            msgs[n].content = (const char *)data + i + 1;
            msgs[n].len = end - i - 1;
            plain_total += msgs[n].len;
            n++;
        }
        i = end + 1;
    }
    buf text = {0};
    engine_fragment *frags = malloc((size_t)max_frags * sizeof *frags);
    bool add_bos;
    int nf = chat_render(family, msgs, n, &text, frags, max_frags, &add_bos);
    if (nf < 0) {
        FUZZ_CHECK(max_frags < 4096, "%s: overflow with %d fragments allowed", family, max_frags);
        free(frags);
        buf_free(&text);
        return 0;
    }
    /* Llama 2 renders a conversation without user or assistant turns to
     * nothing (the server refuses that request); others always say something. */
    bool only_system = true;
    for (int i = 0; i < n; i++) only_system &= !strcmp(msgs[i].role, "system");
    FUZZ_CHECK(nf <= max_frags && (nf >= 1 || (!strcmp(family, "llama2") && only_system)), "%s: %d fragments",
               family, nf);
    if (nf == 0) {
        free(frags);
        buf_free(&text);
        return 0;
    }
    size_t off = 0, plain = 0;
    buf joined = {0};
    for (int i = 0; i < nf; i++) {
        FUZZ_CHECK(frags[i].text == text.p + off, "%s: fragment %d does not follow its predecessor", family, i);
        FUZZ_CHECK(frags[i].len > 0, "%s: empty fragment %d", family, i);
        if (i > 0) FUZZ_CHECK(frags[i].parse_special != frags[i - 1].parse_special, "%s: unmerged fragments", family);
        off += frags[i].len;
        if (!frags[i].parse_special) {
            plain += frags[i].len;
            buf_append(&joined, frags[i].text, frags[i].len);
        }
    }
    FUZZ_CHECK(off == text.len, "%s: fragments cover %zu of %zu bytes", family, off, text.len);
    bool verbatim = !strcmp(family, "chatml") || !strcmp(family, "llama3") || !strcmp(family, "zephyr") ||
                    !strcmp(family, "phi3");
    if (verbatim) {
        FUZZ_CHECK(plain == plain_total, "%s: %zu plain bytes for %zu content bytes", family, plain, plain_total);
        size_t o = 0;
        for (int i = 0; i < n; i++) {
            FUZZ_CHECK(!msgs[i].len || !memcmp(joined.p + o, msgs[i].content, msgs[i].len), "%s: content %d changed",
                       family, i);
            o += msgs[i].len;
        }
    } else {
        FUZZ_CHECK(plain <= plain_total, "%s: more plain text than contents", family);
    }
    buf_free(&joined);

    /* Tokenized as the server does. */
    const tokenizer *t = T[which];
    int n_ids = tokenizer_encode_fragments(t, (const tokenizer_fragment *)frags, nf, add_bos, NULL, 0);
    FUZZ_CHECK(n_ids >= 0, "encode failed");
    int32_t *ids = malloc(((size_t)n_ids + 1) * sizeof *ids);
    FUZZ_CHECK(tokenizer_encode_fragments(t, (const tokenizer_fragment *)frags, nf, add_bos, ids, n_ids) == n_ids,
               "encode count changed");
    if (which == 1 && !strcmp(family, "llama3") && start_header >= 0) {
        int headers = 0;
        for (int i = 0; i < n_ids; i++) headers += ids[i] == start_header;
        FUZZ_CHECK(headers == n + 1, "llama3: %d <|start_header_id|> tokens for %d messages", headers, n);
    }
    free(ids);
    free(frags);
    buf_free(&text);
    return 0;
}
