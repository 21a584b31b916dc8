/*
 * tokenizer.c - tokenizers from GGUF metadata: the vocabulary and special
 * tokens of both kinds, and SentencePiece-style BPE; see tokenizer.h.  The
 * byte-level BPE of "gpt2" models is in tokenizer_bpe.c.
 */
#include "tokenizer.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine.h"
#include "tokenizer_bpe.h"

#define SPACE_MARK "\xe2\x96\x81" /* U+2581 LOWER ONE EIGHTH BLOCK */
#define SPACE_MARK_LEN 3

typedef struct {
    const char *text; /* points into the GGUF mapping */
    uint32_t len;
    float score;
    int32_t type;
} token_entry;

struct tokenizer {
    int n_vocab;
    token_entry *tokens;
    /* Open-addressing hash from piece text to id. */
    int32_t *table;
    uint32_t table_mask;
    int32_t byte_token[256];
    int bos, eos, unk;
    bool add_bos, add_space_prefix;
    /* Control and user-defined tokens, longest first, for parse_special. */
    int32_t *special;
    int n_special;
    bool special_first[256]; /* bytes some special token starts with */
    bool *eog;               /* [n_vocab] ends generation */
    bpe_model *bpe;          /* "gpt2" models; NULL for SentencePiece */
};

/* ==== Vocabulary lookup ================================================ */

static uint32_t hash_bytes(const char *s, size_t n) {
    uint32_t h = 2166136261u; /* FNV-1a */
    for (size_t i = 0; i < n; i++) h = (h ^ (uint8_t)s[i]) * 16777619u;
    return h;
}

static int32_t lookup(const tokenizer *t, const char *s, size_t n) {
    for (uint32_t i = hash_bytes(s, n) & t->table_mask;; i = (i + 1) & t->table_mask) {
        int32_t id = t->table[i];
        if (id < 0) return -1;
        if (t->tokens[id].len == n && memcmp(t->tokens[id].text, s, n) == 0) return id;
    }
}

int32_t tokenizer_lookup(const tokenizer *t, const char *s, size_t n) { return lookup(t, s, n); }

/* ==== Loading ========================================================== */

int tokenizer_load(tokenizer **out, const gguf *g, char *err, size_t errlen) {
    *out = NULL;
    gguf_str model;
    if (!gguf_get_str(g, "tokenizer.ggml.model", &model, NULL)) {
        snprintf(err, errlen, "metadata key 'tokenizer.ggml.model' is missing or not a string");
        return ENGINE_EFORMAT;
    }
    bool gpt2 = gguf_str_eq(model, "gpt2");
    if (!gguf_str_eq(model, "llama") && !gpt2) {
        snprintf(err, errlen, "tokenizer '%.*s' is not supported (supported: llama, gpt2)", (int)model.len, model.p);
        return ENGINE_EUNSUPPORTED;
    }
    const gguf_kv *toks = gguf_find(g, "tokenizer.ggml.tokens");
    if (!toks || toks->type != GGUF_T_ARRAY || toks->v.arr.type != GGUF_T_STRING || toks->v.arr.n == 0 ||
        toks->v.arr.n > (1u << 22)) {
        snprintf(err, errlen, "metadata key 'tokenizer.ggml.tokens' is missing or not a string array");
        return ENGINE_EFORMAT;
    }
    int n = (int)toks->v.arr.n;
    const gguf_kv *scores = gguf_find(g, "tokenizer.ggml.scores");
    if (scores && (scores->type != GGUF_T_ARRAY || scores->v.arr.n != (uint64_t)n || scores->v.arr.strs ||
                   !scores->v.arr.data)) {
        snprintf(err, errlen, "metadata key 'tokenizer.ggml.scores' must be a numeric array of %d entries", n);
        return ENGINE_EFORMAT;
    }
    const gguf_kv *types = gguf_find(g, "tokenizer.ggml.token_type");
    if (types && (types->type != GGUF_T_ARRAY || types->v.arr.n != (uint64_t)n || types->v.arr.strs ||
                  !types->v.arr.data)) {
        snprintf(err, errlen, "metadata key 'tokenizer.ggml.token_type' must be a numeric array of %d entries", n);
        return ENGINE_EFORMAT;
    }
    tokenizer *t = calloc(1, sizeof *t);
    uint32_t cap = 1;
    while (cap < (uint32_t)n * 2) cap <<= 1;
    if (t) {
        t->tokens = calloc((size_t)n, sizeof *t->tokens);
        t->table = malloc(cap * sizeof *t->table);
    }
    if (!t || !t->tokens || !t->table) {
        tokenizer_free(t);
        snprintf(err, errlen, "out of memory");
        return ENGINE_ENOMEM;
    }
    t->n_vocab = n;
    t->table_mask = cap - 1;
    memset(t->table, 0xff, cap * sizeof *t->table);
    for (int i = 0; i < 256; i++) t->byte_token[i] = -1;
    for (int i = 0; i < n; i++) {
        gguf_str s = toks->v.arr.strs[i];
        if (s.len > 4096) {
            tokenizer_free(t);
            snprintf(err, errlen, "token %d is %llu bytes long", i, (unsigned long long)s.len);
            return ENGINE_EFORMAT;
        }
        token_entry *e = &t->tokens[i];
        e->text = s.p;
        e->len = (uint32_t)s.len;
        e->score = scores ? (float)gguf_arr_f64(scores, (uint64_t)i) : 0.0f;
        e->type = types ? (int32_t)gguf_arr_i64(types, (uint64_t)i) : TOK_NORMAL;
        if (e->type == TOK_BYTE) {
            unsigned v;
            char tail;
            char buf[16] = {0};
            memcpy(buf, s.p, s.len < 15 ? s.len : 15);
            if (s.len == 6 && sscanf(buf, "<0x%2X%c", &v, &tail) == 2 && tail == '>' && v < 256)
                t->byte_token[v] = i;
        }
        /* First occurrence wins, as in sentencepiece's piece map. */
        if (lookup(t, e->text, e->len) < 0) {
            uint32_t h = hash_bytes(e->text, e->len) & t->table_mask;
            while (t->table[h] >= 0) h = (h + 1) & t->table_mask;
            t->table[h] = i;
        }
    }
    uint64_t v;
    t->bos = gguf_get_u64(g, "tokenizer.ggml.bos_token_id", &v, NULL) && v < (uint64_t)n ? (int)v : -1;
    t->eos = gguf_get_u64(g, "tokenizer.ggml.eos_token_id", &v, NULL) && v < (uint64_t)n ? (int)v : -1;
    t->unk = gguf_get_u64(g, "tokenizer.ggml.unknown_token_id", &v, NULL) && v < (uint64_t)n ? (int)v : 0;
    bool b;
    t->add_bos = gguf_get_bool(g, "tokenizer.ggml.add_bos_token", &b, NULL) ? b : true;
    t->add_space_prefix = gguf_get_bool(g, "tokenizer.ggml.add_space_prefix", &b, NULL) ? b : true;
    if (gpt2) t->add_space_prefix = false; /* byte-level BPE has no dummy prefix */
    t->special = malloc((size_t)n * sizeof *t->special);
    t->eog = calloc((size_t)n, sizeof *t->eog);
    if (!t->special || !t->eog) {
        tokenizer_free(t);
        snprintf(err, errlen, "out of memory");
        return ENGINE_ENOMEM;
    }
    static const char *const eog_names[] = {"<|im_end|>",    "<|eot_id|>", "<|end|>",         "<end_of_turn>",
                                            "<|endoftext|>", "<|eom_id|>", "<|end_of_text|>"};
    for (int i = 0; i < n; i++) {
        const token_entry *e = &t->tokens[i];
        if ((e->type == TOK_CONTROL || e->type == TOK_USER) && e->len > 0) {
            t->special[t->n_special++] = i;
            t->special_first[(uint8_t)e->text[0]] = true;
        }
        if (e->type == TOK_CONTROL || e->type == TOK_USER)
            for (size_t k = 0; k < sizeof eog_names / sizeof eog_names[0]; k++)
                if (e->len == strlen(eog_names[k]) && !memcmp(e->text, eog_names[k], e->len)) t->eog[i] = true;
    }
    if (t->eos >= 0) t->eog[t->eos] = true;
    /* Longest first, so "<|im_start|>" wins over a shorter prefix token. */
    for (int i = 1; i < t->n_special; i++) {
        int32_t id = t->special[i];
        int j = i;
        while (j > 0 && t->tokens[t->special[j - 1]].len < t->tokens[id].len) {
            t->special[j] = t->special[j - 1];
            j--;
        }
        t->special[j] = id;
    }
    if (t->add_bos && t->bos < 0) {
        tokenizer_free(t);
        snprintf(err, errlen, "tokenizer adds BOS but 'tokenizer.ggml.bos_token_id' is missing or out of range");
        return ENGINE_EFORMAT;
    }
    if (gpt2) {
        int rc = bpe_model_load(&t->bpe, t, g, err, errlen);
        if (rc) {
            tokenizer_free(t);
            return rc;
        }
    }
    *out = t;
    return 0;
}

void tokenizer_free(tokenizer *t) {
    if (!t) return;
    free(t->tokens);
    free(t->table);
    free(t->special);
    free(t->eog);
    bpe_model_free(t->bpe);
    free(t);
}

int tokenizer_n_vocab(const tokenizer *t) { return t->n_vocab; }
int tokenizer_bos(const tokenizer *t) { return t->bos; }
int tokenizer_eos(const tokenizer *t) { return t->eos; }
bool tokenizer_add_bos(const tokenizer *t) { return t->add_bos; }
bool tokenizer_is_eog(const tokenizer *t, int32_t id) { return id >= 0 && id < t->n_vocab && t->eog[id]; }
int tokenizer_token_type(const tokenizer *t, int32_t id) { return t->tokens[id].type; }

/* ==== Encoding ========================================================= */

typedef struct {
    int prev, next; /* neighbours in the symbol list, -1 at the ends */
    const char *text;
    uint32_t len;
} symbol;

typedef struct {
    int left, right;
    float score;
    uint32_t len; /* merged length when queued: stale entries are skipped */
} bigram;

typedef struct {
    bigram *v;
    int n;
} heap;

/* Higher score first; on ties the leftmost pair. */
static bool before(const bigram *a, const bigram *b) {
    return a->score > b->score || (a->score == b->score && a->left < b->left);
}

static void heap_push(heap *h, bigram b) {
    int i = h->n++;
    h->v[i] = b;
    while (i > 0) {
        int p = (i - 1) / 2;
        if (!before(&h->v[i], &h->v[p])) break;
        bigram tmp = h->v[i];
        h->v[i] = h->v[p];
        h->v[p] = tmp;
        i = p;
    }
}

static bigram heap_pop(heap *h) {
    bigram top = h->v[0];
    h->v[0] = h->v[--h->n];
    int i = 0;
    for (;;) {
        int l = 2 * i + 1, r = l + 1, m = i;
        if (l < h->n && before(&h->v[l], &h->v[m])) m = l;
        if (r < h->n && before(&h->v[r], &h->v[m])) m = r;
        if (m == i) break;
        bigram tmp = h->v[i];
        h->v[i] = h->v[m];
        h->v[m] = tmp;
        i = m;
    }
    return top;
}

typedef struct {
    const tokenizer *t;
    symbol *sym;
    heap h;
    /* For resegmenting pieces that are not tokens: the pair each merged
     * string came from, keyed by (start, len) of the merged text. */
    int *rev_left, *rev_right; /* indexed by symbol slot of the merge result */
    int32_t *ids;
    int max_ids, count;
} encoder;

static void try_bigram(encoder *e, int left, int right) {
    if (left < 0 || right < 0) return;
    uint32_t len = e->sym[left].len + e->sym[right].len;
    int32_t id = lookup(e->t, e->sym[left].text, len);
    if (id < 0) return;
    heap_push(&e->h, (bigram){left, right, e->t->tokens[id].score, len});
}

static void emit(encoder *e, int32_t id) {
    if (e->count < e->max_ids) e->ids[e->count] = id;
    e->count++;
}

static int utf8_len(uint8_t c) {
    if (c < 0x80) return 1;
    if ((c & 0xe0) == 0xc0) return 2;
    if ((c & 0xf0) == 0xe0) return 3;
    if ((c & 0xf8) == 0xf0) return 4;
    return 1;
}

/* Emits the text of [p, p+len): as one token if it is one, else split back
 * into the two pieces it was merged from, else as bytes. */
static void resegment(encoder *e, const char *p, uint32_t len, int depth) {
    int32_t id = lookup(e->t, p, len);
    if (id >= 0 && e->t->tokens[id].type != TOK_UNUSED) {
        emit(e, id);
        return;
    }
    /* Merges only ever join pieces that are tokens, so a merged symbol is
     * always a token; anything reaching here is a single character (or an
     * invalid byte) that the vocabulary lacks. */
    (void)depth;
    for (uint32_t i = 0; i < len; i++) {
        int32_t b = e->t->byte_token[(uint8_t)p[i]];
        emit(e, b >= 0 ? b : e->t->unk);
    }
}

static void emit_cb(void *ud, int32_t id) { emit(ud, id); }

/* Encodes one run of plain text, with the dummy-prefix space if asked. */
static int encode_text(encoder *e, const char *text, size_t len, bool prefix) {
    if (e->t->bpe) return bpe_encode(e->t->bpe, e->t, text, len, emit_cb, e);
    if (len == 0) return 0;
    if (len > (1u << 28)) return ENGINE_EINVAL;
    /* Normalise: dummy prefix, spaces to U+2581. */
    size_t spaces = prefix ? 1 : 0;
    for (size_t i = 0; i < len; i++) spaces += text[i] == ' ';
    size_t nlen = len + spaces * (SPACE_MARK_LEN - 1) + (prefix ? 1 : 0);
    char *norm = malloc(nlen);
    e->sym = malloc(nlen * sizeof *e->sym);
    e->h.v = malloc((2 * nlen + 1) * sizeof *e->h.v);
    e->h.n = 0;
    if (!norm || !e->sym || !e->h.v) {
        free(norm);
        free(e->sym);
        free(e->h.v);
        return ENGINE_ENOMEM;
    }
    size_t o = 0;
    if (prefix) {
        memcpy(norm, SPACE_MARK, SPACE_MARK_LEN);
        o = SPACE_MARK_LEN;
    }
    for (size_t i = 0; i < len; i++) {
        if (text[i] == ' ') {
            memcpy(norm + o, SPACE_MARK, SPACE_MARK_LEN);
            o += SPACE_MARK_LEN;
        } else {
            norm[o++] = text[i];
        }
    }
    /* One symbol per UTF-8 character. */
    int n_sym = 0;
    for (size_t i = 0; i < o;) {
        uint32_t cl = (uint32_t)utf8_len((uint8_t)norm[i]);
        if (cl > o - i) cl = (uint32_t)(o - i);
        e->sym[n_sym] = (symbol){n_sym - 1, -1, norm + i, cl};
        if (n_sym > 0) e->sym[n_sym - 1].next = n_sym;
        n_sym++;
        i += cl;
    }
    for (int i = 1; i < n_sym; i++) try_bigram(e, i - 1, i);
    while (e->h.n > 0) {
        bigram b = heap_pop(&e->h);
        symbol *l = &e->sym[b.left], *r = &e->sym[b.right];
        /* Stale: one side was merged away or grew since this was queued. */
        if (l->len == 0 || r->len == 0 || l->len + r->len != b.len || l->next != b.right) continue;
        l->len += r->len;
        r->len = 0;
        l->next = r->next;
        if (r->next >= 0) e->sym[r->next].prev = b.left;
        try_bigram(e, l->prev, b.left);
        try_bigram(e, b.left, l->next);
    }
    for (int i = 0; i != -1 && n_sym > 0; i = e->sym[i].next) resegment(e, e->sym[i].text, e->sym[i].len, 0);
    free(norm);
    free(e->sym);
    free(e->h.v);
    e->sym = NULL;
    e->h.v = NULL;
    return 0;
}

/* The special token whose text starts at s (longest match), or -1. */
static int32_t special_at(const tokenizer *t, const char *s, size_t n) {
    if (!t->special_first[(uint8_t)s[0]]) return -1;
    for (int i = 0; i < t->n_special; i++) {
        const token_entry *e = &t->tokens[t->special[i]];
        if (e->len <= n && memcmp(e->text, s, e->len) == 0) return t->special[i];
    }
    return -1;
}

int tokenizer_encode_fragments(const tokenizer *t, const tokenizer_fragment *frags, int n_frags, bool add_bos,
                               int32_t *ids, int max_ids) {
    encoder e = {.t = t, .ids = ids, .max_ids = max_ids < 0 ? 0 : max_ids};
    if (add_bos && t->bos >= 0) emit(&e, t->bos);
    /* As sentencepiece (and llama.cpp): a run of text gets the dummy-prefix
     * space when it starts the input or follows a special token. */
    bool prev_special = true;
    for (int f = 0; f < n_frags; f++) {
        const char *p = frags[f].text;
        size_t len = frags[f].len;
        size_t start = 0;
        for (size_t i = 0; frags[f].parse_special && i < len; i++) {
            int32_t sp = special_at(t, p + i, len - i);
            if (sp < 0) continue;
            int rc = encode_text(&e, p + start, i - start, t->add_space_prefix && prev_special);
            if (rc) return rc;
            if (i > start) prev_special = false;
            emit(&e, sp);
            prev_special = true;
            i += t->tokens[sp].len - 1;
            start = i + 1;
        }
        if (len > start) {
            int rc = encode_text(&e, p + start, len - start, t->add_space_prefix && prev_special);
            if (rc) return rc;
            prev_special = false;
        }
    }
    return e.count;
}

int tokenizer_encode(const tokenizer *t, const char *text, size_t len, bool add_bos, int32_t *ids, int max_ids) {
    tokenizer_fragment f = {text, len, false};
    return tokenizer_encode_fragments(t, &f, 1, add_bos, ids, max_ids);
}

/* ==== Decoding ========================================================= */

int tokenizer_token_bytes(const tokenizer *t, int32_t id, char *buf, size_t cap) {
    if (id < 0 || id >= t->n_vocab) return -1;
    const token_entry *e = &t->tokens[id];
    switch (e->type) {
    case TOK_CONTROL:
    case TOK_UNUSED:
        return 0;
    case TOK_BYTE:
        for (int b = 0; b < 256; b++)
            if (t->byte_token[b] == id) {
                if (cap > 0) buf[0] = (char)b;
                return 1;
            }
        return 0;
    case TOK_UNKNOWN: {
        static const char unk[] = " \xe2\x81\x87 "; /* sentencepiece's " ⁇ " */
        size_t n = sizeof unk - 1;
        if (cap > 0) memcpy(buf, unk, n < cap ? n : cap);
        return (int)n;
    }
    default: {
        if (t->bpe) {
            /* User-defined tokens are stored as plain text (e.g. "<think>"). */
            if (e->type == TOK_USER) {
                if (cap > 0) memcpy(buf, e->text, e->len < cap ? e->len : cap);
                return (int)e->len;
            }
            return (int)bpe_token_bytes(e->text, e->len, buf, cap);
        }
        size_t o = 0;
        for (uint32_t i = 0; i < e->len;) {
            if (i + SPACE_MARK_LEN <= e->len && memcmp(e->text + i, SPACE_MARK, SPACE_MARK_LEN) == 0) {
                if (o < cap) buf[o] = ' ';
                o++;
                i += SPACE_MARK_LEN;
            } else {
                if (o < cap) buf[o] = e->text[i];
                o++;
                i++;
            }
        }
        return (int)o;
    }
    }
}

/* Length of the valid UTF-8 sequence at s (1..4), or 0 if invalid/truncated. */
static int utf8_valid_at(const uint8_t *s, size_t n) {
    if (s[0] < 0x80) return 1;
    int len;
    uint32_t cp;
    if ((s[0] & 0xe0) == 0xc0) len = 2, cp = s[0] & 0x1f;
    else if ((s[0] & 0xf0) == 0xe0) len = 3, cp = s[0] & 0x0f;
    else if ((s[0] & 0xf8) == 0xf0) len = 4, cp = s[0] & 0x07;
    else return 0;
    if ((size_t)len > n) return 0;
    for (int i = 1; i < len; i++) {
        if ((s[i] & 0xc0) != 0x80) return 0;
        cp = (cp << 6) | (s[i] & 0x3f);
    }
    if ((len == 2 && cp < 0x80) || (len == 3 && cp < 0x800) || (len == 4 && cp < 0x10000) || cp > 0x10ffff ||
        (cp >= 0xd800 && cp <= 0xdfff))
        return 0;
    return len;
}

size_t tokenizer_decode(const tokenizer *t, const int32_t *ids, int n, char *buf, size_t cap) {
    /* First the raw bytes, then UTF-8 repair into buf. */
    size_t raw_cap = 64;
    for (int i = 0; i < n; i++) {
        int l = tokenizer_token_bytes(t, ids[i], NULL, 0);
        raw_cap += l > 0 ? (size_t)l : 0;
    }
    char *raw = malloc(raw_cap);
    if (!raw) return 0;
    size_t r = 0;
    bool first = true;
    for (int i = 0; i < n; i++) {
        int l = tokenizer_token_bytes(t, ids[i], raw + r, raw_cap - r);
        if (l <= 0) continue;
        /* The encoder's dummy prefix: drop the leading space of the first
         * piece (sentencepiece does the same). */
        if (first && t->add_space_prefix && t->tokens[ids[i]].type == TOK_NORMAL && raw[r] == ' ') {
            memmove(raw + r, raw + r + 1, (size_t)l - 1);
            l--;
        }
        first = false;
        r += (size_t)l;
    }
    size_t o = 0;
    for (size_t i = 0; i < r;) {
        int v = utf8_valid_at((const uint8_t *)raw + i, r - i);
        if (v > 0) {
            for (int k = 0; k < v; k++, o++)
                if (o < cap) buf[o] = raw[i + k];
            i += (size_t)v;
        } else {
            static const char rep[] = "\xef\xbf\xbd";
            for (int k = 0; k < 3; k++, o++)
                if (o < cap) buf[o] = rep[k];
            i++;
        }
    }
    if (cap > 0) buf[o < cap ? o : cap - 1] = 0;
    free(raw);
    return o;
}
