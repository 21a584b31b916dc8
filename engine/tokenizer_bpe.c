/*
 * tokenizer_bpe.c - GPT-2 byte-level BPE; see tokenizer_bpe.h.
 */
#include "tokenizer_bpe.h"

#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine.h"
#include "unicode.h"

typedef struct {
    int32_t left, right, result; /* token ids; result is the merged token */
} merge_rule;

struct bpe_model {
    bpe_pre pre;
    bool nfc;           /* normalise text to NFC first */
    bool ignore_merges; /* a pre-token in the vocabulary is taken whole */
    int32_t unk;        /* tokenizer.ggml.unknown_token_id, or -1 */
    int32_t byte_id[256];
    merge_rule *merges; /* indexed by rank */
    int n_merges;
    /* Open addressing from (left, right) to rank; -1 marks an empty slot. */
    int32_t *table;
    uint32_t table_mask;
};

bpe_pre bpe_model_pre(const bpe_model *m) { return m->pre; }

/* ==== GPT-2's byte map ================================================= */

/* GPT-2 (bytes_to_unicode) shows every byte as a printable character: the
 * bytes ! .. ~, ¡ .. ¬ and ® .. ÿ as themselves, the other 68 bytes as
 * U+0100 onwards in byte order (so the space 0x20 is U+0120 "Ġ"). */
static uint32_t byte_to_cp(uint8_t b) {
    if ((b >= 0x21 && b <= 0x7e) || (b >= 0xa1 && b <= 0xac) || b >= 0xae) return b;
    if (b <= 0x20) return 0x100u + b;
    if (b <= 0xa0) return 0x100u + 33 + (b - 0x7fu);
    return 0x100u + 67; /* 0xad */
}

static int cp_to_byte(uint32_t cp) {
    if ((cp >= 0x21 && cp <= 0x7e) || (cp >= 0xa1 && cp <= 0xac) || (cp >= 0xae && cp <= 0xff)) return (int)cp;
    if (cp >= 0x100 && cp <= 0x120) return (int)(cp - 0x100);
    if (cp >= 0x121 && cp <= 0x142) return (int)(cp - 0x121 + 0x7f);
    if (cp == 0x143) return 0xad;
    return -1;
}

size_t bpe_token_bytes(const char *text, size_t len, char *buf, size_t cap) {
    size_t o = 0;
    for (size_t i = 0, l; i < len; i += l) {
        uint32_t cp = unicode_decode(text + i, len - i, &l);
        int b = cp == UNICODE_INVALID ? -1 : cp_to_byte(cp);
        if (b >= 0) {
            if (o < cap) buf[o] = (char)b;
            o++;
        } else {
            for (size_t k = 0; k < l; k++, o++)
                if (o < cap) buf[o] = text[i + k];
        }
    }
    return o;
}

/* ==== Pre-tokenizers =================================================== */

/* The class of the character at pos (UNICODE_*), its length in *l; -1 at
 * the end of the text. */
static int class_at(const char *s, size_t len, size_t pos, size_t *l) {
    if (pos >= len) {
        *l = 0;
        return -1;
    }
    uint8_t c = (uint8_t)s[pos];
    if (c < 0x80) {
        *l = 1;
        return unicode_class(c);
    }
    return unicode_class(unicode_decode(s + pos, len - pos, l));
}

/* End of the run of characters of class cls starting at pos. */
static size_t run_end(const char *s, size_t len, size_t pos, int cls) {
    size_t l;
    while (class_at(s, len, pos, &l) == cls) pos += l;
    return pos;
}

static int ascii_lower(char c) { return c >= 'A' && c <= 'Z' ? c + 32 : c; }

/* 's 't 're 've 'm 'll 'd at pos (which holds the apostrophe): the end of
 * the match, or 0. */
static size_t contraction(const char *s, size_t len, size_t pos, bool icase) {
    if (pos + 1 >= len) return 0;
    int a = icase ? ascii_lower(s[pos + 1]) : s[pos + 1];
    if (a == 's' || a == 't' || a == 'm' || a == 'd') return pos + 2;
    if (pos + 2 >= len) return 0;
    int b = icase ? ascii_lower(s[pos + 2]) : s[pos + 2];
    if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) return pos + 3;
    return 0;
}

/* \s+(?!\S) then \s+, for a whitespace run [pos, end): the whole run when it
 * ends the text or is one character, else all but its last character (which
 * then leads the next pre-token, e.g. " world"). */
static size_t space_run(const char *s, size_t len, size_t pos, size_t end) {
    if (end == len) return end;
    size_t last = pos, l;
    for (size_t p = pos; p < end; p += l) {
        last = p;
        class_at(s, len, p, &l);
    }
    return last > pos ? last : end;
}

static size_t pre_gpt2(const char *s, size_t len, size_t pos) {
    size_t l0, l1, e;
    int k0 = class_at(s, len, pos, &l0);
    if (s[pos] == '\'' && (e = contraction(s, len, pos, false))) return e;
    /* " ?\p{L}+", " ?\p{N}+", " ?[^\s\p{L}\p{N}]+" */
    size_t q = pos;
    int k = k0;
    if (s[pos] == ' ') {
        int k1 = class_at(s, len, pos + 1, &l1);
        if (k1 >= 0 && k1 != UNICODE_SPACE) q = pos + 1, k = k1;
    }
    if (k != UNICODE_SPACE) return run_end(s, len, q, k);
    return space_run(s, len, pos, run_end(s, len, pos, UNICODE_SPACE));
}

/* Llama 3 (max_digits 3) and Qwen2 (max_digits 1). */
static size_t pre_llama3(const char *s, size_t len, size_t pos, int max_digits) {
    size_t l0, l1, e;
    int k0 = class_at(s, len, pos, &l0);
    /* (?i:'s|'t|'re|'ve|'m|'ll|'d) */
    if (s[pos] == '\'' && (e = contraction(s, len, pos, true))) return e;
    /* [^\r\n\p{L}\p{N}]?\p{L}+ */
    if (k0 == UNICODE_LETTER) return run_end(s, len, pos, UNICODE_LETTER);
    bool crlf = s[pos] == '\r' || s[pos] == '\n';
    if (!crlf && k0 != UNICODE_NUMBER && class_at(s, len, pos + l0, &l1) == UNICODE_LETTER)
        return run_end(s, len, pos + l0, UNICODE_LETTER);
    /* \p{N}{1,3} */
    if (k0 == UNICODE_NUMBER) {
        size_t p = pos + l0;
        for (int d = 1; d < max_digits && class_at(s, len, p, &l1) == UNICODE_NUMBER; d++) p += l1;
        return p;
    }
    /*  ?[^\s\p{L}\p{N}]+[\r\n]* */
    size_t q = s[pos] == ' ' ? pos + 1 : pos;
    if (class_at(s, len, q, &l1) == UNICODE_OTHER) {
        q = run_end(s, len, q, UNICODE_OTHER);
        while (q < len && (s[q] == '\r' || s[q] == '\n')) q++;
        return q;
    }
    /* Only whitespace is left (k0 is SPACE here). */
    size_t end = run_end(s, len, pos, UNICODE_SPACE);
    /* \s*[\r\n]+: up to and including the run's last CR or LF. */
    for (size_t p = end; p > pos; p--)
        if (s[p - 1] == '\r' || s[p - 1] == '\n') return p;
    /* \s+(?!\S), \s+ */
    return space_run(s, len, pos, end);
}

size_t bpe_pre_next(bpe_pre pre, const char *s, size_t len, size_t pos) {
    switch (pre) {
    case BPE_PRE_LLAMA3: return pre_llama3(s, len, pos, 3);
    case BPE_PRE_QWEN2: return pre_llama3(s, len, pos, 1);
    case BPE_PRE_GPT2: break;
    }
    return pre_gpt2(s, len, pos);
}

/* ==== Merge ranks ====================================================== */

static uint32_t pair_hash(int32_t a, int32_t b) {
    uint64_t k = ((uint64_t)(uint32_t)a << 32 | (uint32_t)b) * 0x9E3779B97F4A7C15ull;
    return (uint32_t)(k >> 32);
}

/* Rank of merging tokens a and b, or -1. */
static int32_t merge_rank(const bpe_model *m, int32_t a, int32_t b) {
    for (uint32_t i = pair_hash(a, b) & m->table_mask;; i = (i + 1) & m->table_mask) {
        int32_t r = m->table[i];
        if (r < 0) return -1;
        if (m->merges[r].left == a && m->merges[r].right == b) return r;
    }
}

/* ==== Loading ========================================================== */

static const struct {
    const char *name;
    bpe_pre pre;
} pre_names[] = {
    /* Names llama.cpp's converter writes for these regexes. */
    {"llama-bpe", BPE_PRE_LLAMA3}, {"llama3", BPE_PRE_LLAMA3}, {"llama-v3", BPE_PRE_LLAMA3},
    {"qwen2", BPE_PRE_QWEN2},      {"deepseek-r1-qwen", BPE_PRE_QWEN2},
    {"default", BPE_PRE_GPT2},     {"gpt2", BPE_PRE_GPT2},    {"gpt-2", BPE_PRE_GPT2},
};

int bpe_model_load(bpe_model **out, const tokenizer *t, const gguf *g, char *err, size_t errlen) {
    *out = NULL;
    bpe_pre pre = BPE_PRE_GPT2;
    gguf_str ps;
    bool bad = false;
    if (gguf_get_str(g, "tokenizer.ggml.pre", &ps, &bad)) {
        size_t k = 0, n_names = sizeof pre_names / sizeof pre_names[0];
        while (k < n_names && !gguf_str_eq(ps, pre_names[k].name)) k++;
        if (k == n_names) {
            snprintf(err, errlen,
                     "pre-tokenizer 'tokenizer.ggml.pre' = '%.*s' is not supported (supported: llama-bpe, qwen2, "
                     "default)",
                     (int)(ps.len > 64 ? 64 : ps.len), ps.p);
            return ENGINE_EUNSUPPORTED;
        }
        pre = pre_names[k].pre;
    } else if (bad) {
        snprintf(err, errlen, "metadata key 'tokenizer.ggml.pre' is not a string");
        return ENGINE_EFORMAT;
    }
    const gguf_kv *mk = gguf_find(g, "tokenizer.ggml.merges");
    if (!mk || mk->type != GGUF_T_ARRAY || mk->v.arr.type != GGUF_T_STRING || mk->v.arr.n > (1u << 24)) {
        snprintf(err, errlen, "metadata key 'tokenizer.ggml.merges' is missing or not a string array");
        return ENGINE_EFORMAT;
    }
    int n = (int)mk->v.arr.n;
    bpe_model *m = calloc(1, sizeof *m);
    uint32_t cap = 16;
    while (cap < (uint32_t)n + (uint32_t)n / 2) cap <<= 1;
    if (m) {
        m->merges = malloc(((size_t)n + 1) * sizeof *m->merges);
        m->table = malloc(cap * sizeof *m->table);
    }
    if (!m || !m->merges || !m->table) {
        bpe_model_free(m);
        snprintf(err, errlen, "out of memory");
        return ENGINE_ENOMEM;
    }
    m->pre = pre;
    m->nfc = pre == BPE_PRE_QWEN2;
    m->ignore_merges = pre == BPE_PRE_LLAMA3;
    uint64_t v;
    m->unk = gguf_get_u64(g, "tokenizer.ggml.unknown_token_id", &v, NULL) && v < (uint64_t)tokenizer_n_vocab(t)
                 ? (int32_t)v
                 : -1;
    m->n_merges = n;
    m->table_mask = cap - 1;
    memset(m->table, 0xff, cap * sizeof *m->table);
    for (int b = 0; b < 256; b++) {
        char u[4];
        int ul = unicode_encode(byte_to_cp((uint8_t)b), u);
        m->byte_id[b] = tokenizer_lookup(t, u, (size_t)ul);
    }
    char buf[4096]; /* tokenizer.c refuses longer tokens */
    for (int r = 0; r < n; r++) {
        gguf_str s = mk->v.arr.strs[r];
        merge_rule *e = &m->merges[r];
        e->left = e->right = e->result = -1;
        /* "left right"; the split is at the first space after the first
         * byte, so a left part could itself be a space. */
        const char *sp = s.len > 1 ? memchr(s.p + 1, ' ', s.len - 1) : NULL;
        if (!sp) {
            bpe_model_free(m);
            snprintf(err, errlen, "merge %d in 'tokenizer.ggml.merges' is not two tokens separated by a space", r);
            return ENGINE_EFORMAT;
        }
        size_t ll = (size_t)(sp - s.p), rl = s.len - ll - 1;
        if (ll + rl > sizeof buf) continue; /* the result cannot be a token */
        memcpy(buf, s.p, ll);
        memcpy(buf + ll, sp + 1, rl);
        e->left = tokenizer_lookup(t, s.p, ll);
        e->right = tokenizer_lookup(t, sp + 1, rl);
        e->result = tokenizer_lookup(t, buf, ll + rl);
        /* A merge whose parts or result the vocabulary lacks can never
         * apply (symbols are always tokens); it keeps its rank unused. */
        if (e->left < 0 || e->right < 0 || e->result < 0) continue;
        if (merge_rank(m, e->left, e->right) >= 0) continue; /* the first rank of a repeated pair wins */
        uint32_t h = pair_hash(e->left, e->right) & m->table_mask;
        while (m->table[h] >= 0) h = (h + 1) & m->table_mask;
        m->table[h] = r;
    }
    *out = m;
    return 0;
}

void bpe_model_free(bpe_model *m) {
    if (!m) return;
    free(m->merges);
    free(m->table);
    free(m);
}

/* ==== Encoding ========================================================= */

typedef struct {
    int32_t id;
    int prev, next; /* neighbours in the symbol list, -1 at the ends */
} symbol;

typedef struct {
    int32_t rank;
    int left, right; /* symbol slots; the left one keeps the merged token */
} candidate;

typedef struct {
    const bpe_model *m;
    const tokenizer *t;
    symbol *sym;
    candidate *heap;
    int n_heap;
    char *mapped; /* a pre-token in GPT-2's characters (ignore_merges) */
    void (*emit)(void *ud, int32_t id);
    void *ud;
} bpe_encoder;

/* Lowest rank first; on ties the leftmost pair. */
static bool cand_before(const candidate *a, const candidate *b) {
    return a->rank < b->rank || (a->rank == b->rank && a->left < b->left);
}

static void cand_push(bpe_encoder *e, candidate c) {
    int i = e->n_heap++;
    e->heap[i] = c;
    while (i > 0) {
        int p = (i - 1) / 2;
        if (!cand_before(&e->heap[i], &e->heap[p])) break;
        candidate tmp = e->heap[i];
        e->heap[i] = e->heap[p];
        e->heap[p] = tmp;
        i = p;
    }
}

static candidate cand_pop(bpe_encoder *e) {
    candidate top = e->heap[0];
    e->heap[0] = e->heap[--e->n_heap];
    int i = 0;
    for (;;) {
        int l = 2 * i + 1, r = l + 1, mi = i;
        if (l < e->n_heap && cand_before(&e->heap[l], &e->heap[mi])) mi = l;
        if (r < e->n_heap && cand_before(&e->heap[r], &e->heap[mi])) mi = r;
        if (mi == i) break;
        candidate tmp = e->heap[i];
        e->heap[i] = e->heap[mi];
        e->heap[mi] = tmp;
        i = mi;
    }
    return top;
}

static void try_pair(bpe_encoder *e, int left, int right) {
    if (left < 0 || right < 0 || e->sym[left].id < 0 || e->sym[right].id < 0) return;
    int32_t r = merge_rank(e->m, e->sym[left].id, e->sym[right].id);
    if (r >= 0) cand_push(e, (candidate){r, left, right});
}

/* BPE over one pre-token's bytes. */
static void encode_word(bpe_encoder *e, const char *w, size_t n) {
    const bpe_model *m = e->m;
    if (m->ignore_merges && n > 1) {
        size_t o = 0;
        for (size_t i = 0; i < n; i++) o += (size_t)unicode_encode(byte_to_cp((uint8_t)w[i]), e->mapped + o);
        int32_t id = tokenizer_lookup(e->t, e->mapped, o);
        if (id >= 0 && tokenizer_token_type(e->t, id) == TOK_NORMAL) {
            e->emit(e->ud, id);
            return;
        }
    }
    int ns = (int)n;
    for (int i = 0; i < ns; i++) e->sym[i] = (symbol){m->byte_id[(uint8_t)w[i]], i - 1, i + 1 < ns ? i + 1 : -1};
    e->n_heap = 0;
    for (int i = 0; i + 1 < ns; i++) try_pair(e, i, i + 1);
    while (e->n_heap > 0) {
        candidate c = cand_pop(e);
        symbol *l = &e->sym[c.left], *r = &e->sym[c.right];
        /* Stale: a side was merged away, or the pair changed since. */
        if (l->next != c.right || l->id != m->merges[c.rank].left || r->id != m->merges[c.rank].right) continue;
        l->id = m->merges[c.rank].result;
        l->next = r->next;
        if (r->next >= 0) e->sym[r->next].prev = c.left;
        r->id = -1;
        r->prev = r->next = -1;
        try_pair(e, l->prev, c.left);
        try_pair(e, c.left, l->next);
    }
    for (int i = 0; i >= 0; i = e->sym[i].next) {
        /* A byte the vocabulary lacks (no byte-level vocabulary does). */
        int32_t id = e->sym[i].id >= 0 ? e->sym[i].id : m->unk;
        if (id >= 0) e->emit(e->ud, id);
    }
}

int bpe_encode(const bpe_model *m, const tokenizer *t, const char *text, size_t len,
               void (*emit)(void *ud, int32_t id), void *ud) {
    if (len == 0) return 0;
    if (len > (1u << 28)) return ENGINE_EINVAL;
    char *norm = NULL;
    if (m->nfc) {
        if (unicode_nfc(text, len, &norm, &len) < 0) return ENGINE_ENOMEM;
        if (norm) text = norm;
    }
    bpe_encoder e = {.m = m, .t = t, .emit = emit, .ud = ud};
    /* Scratch for the longest pre-token, which is at most the whole text. */
    size_t longest = 0;
    for (size_t pos = 0; pos < len;) {
        size_t end = bpe_pre_next(m->pre, text, len, pos);
        if (end - pos > longest) longest = end - pos;
        pos = end;
    }
    e.sym = malloc(longest * sizeof *e.sym);
    e.heap = malloc((3 * longest + 1) * sizeof *e.heap);
    e.mapped = malloc(2 * longest + 1);
    if (!e.sym || !e.heap || !e.mapped) {
        free(e.sym);
        free(e.heap);
        free(e.mapped);
        free(norm);
        return ENGINE_ENOMEM;
    }
    for (size_t pos = 0; pos < len;) {
        size_t end = bpe_pre_next(m->pre, text, len, pos);
        encode_word(&e, text + pos, end - pos);
        pos = end;
    }
    free(e.sym);
    free(e.heap);
    free(e.mapped);
    free(norm);
    return 0;
}
