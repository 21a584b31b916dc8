/*
 * unicode.c - UTF-8, character classes and NFC; see unicode.h.
 *
 * The class and combining-class tables are piecewise constant over the code
 * space: entry k holds the value for code points from its start up to the
 * next entry's start, so one binary search answers a lookup.  Decomposition
 * and composition pairs are sorted lists.  Hangul syllables are composed and
 * decomposed arithmetically (Unicode 3.12) and are not in the tables.
 */
#include "unicode.h"

#include <stdbool.h>
#include <stdlib.h>

#include "unicode_tables.h"

#define N_OF(a) (sizeof(a) / sizeof((a)[0]))

const char *unicode_version(void) { return UNICODE_TABLES_VERSION; }

/* ==== UTF-8 ============================================================ */

uint32_t unicode_decode(const char *s, size_t n, size_t *len) {
    const uint8_t *p = (const uint8_t *)s;
    *len = 1;
    if (p[0] < 0x80) return p[0];
    size_t l;
    uint32_t cp, min;
    if ((p[0] & 0xe0) == 0xc0) l = 2, cp = p[0] & 0x1f, min = 0x80;
    else if ((p[0] & 0xf0) == 0xe0) l = 3, cp = p[0] & 0x0f, min = 0x800;
    else if ((p[0] & 0xf8) == 0xf0) l = 4, cp = p[0] & 0x07, min = 0x10000;
    else return UNICODE_INVALID;
    if (l > n) return UNICODE_INVALID;
    for (size_t i = 1; i < l; i++) {
        if ((p[i] & 0xc0) != 0x80) return UNICODE_INVALID;
        cp = (cp << 6) | (p[i] & 0x3f);
    }
    if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return UNICODE_INVALID;
    *len = l;
    return cp;
}

int unicode_encode(uint32_t cp, char *out) {
    if (cp < 0x80) {
        out[0] = (char)cp;
        return 1;
    }
    if (cp < 0x800) {
        out[0] = (char)(0xc0 | (cp >> 6));
        out[1] = (char)(0x80 | (cp & 0x3f));
        return 2;
    }
    if (cp < 0x10000) {
        out[0] = (char)(0xe0 | (cp >> 12));
        out[1] = (char)(0x80 | ((cp >> 6) & 0x3f));
        out[2] = (char)(0x80 | (cp & 0x3f));
        return 3;
    }
    out[0] = (char)(0xf0 | (cp >> 18));
    out[1] = (char)(0x80 | ((cp >> 12) & 0x3f));
    out[2] = (char)(0x80 | ((cp >> 6) & 0x3f));
    out[3] = (char)(0x80 | (cp & 0x3f));
    return 4;
}

/* ==== Piecewise tables ================================================= */

/* The entry of tab (values start << shift | payload) covering cp. */
static uint32_t piecewise(const uint32_t *tab, size_t n, int shift, uint32_t cp) {
    size_t lo = 0, hi = n; /* tab[0] starts at 0, so the answer is in [lo, hi) */
    while (hi - lo > 1) {
        size_t mid = lo + (hi - lo) / 2;
        if ((tab[mid] >> shift) <= cp) lo = mid;
        else hi = mid;
    }
    return tab[lo] & ((1u << shift) - 1);
}

/* Class bits 0-1 and the NFC "needs a look" bit 2. */
static uint32_t class_flags(uint32_t cp) {
    if (cp > 0x10ffff) return UNICODE_OTHER;
    return piecewise(unicode_class_tab, N_OF(unicode_class_tab), 3, cp);
}

int unicode_class(uint32_t cp) {
    /* ASCII answers without a search: it is most of most text. */
    if (cp < 0x80) {
        if ((cp | 0x20) - 'a' < 26) return UNICODE_LETTER;
        if (cp - '0' < 10) return UNICODE_NUMBER;
        if (cp == ' ' || (cp >= 0x09 && cp <= 0x0d)) return UNICODE_SPACE;
        return UNICODE_OTHER;
    }
    return (int)(class_flags(cp) & 3);
}

static int ccc(uint32_t cp) {
    if (cp < 0x300 || cp > 0x10ffff) return 0;
    return (int)piecewise(unicode_ccc_tab, N_OF(unicode_ccc_tab), 8, cp);
}

/* ==== NFC ============================================================== */

enum {
    S_BASE = 0xAC00, L_BASE = 0x1100, V_BASE = 0x1161, T_BASE = 0x11A7,
    L_COUNT = 19, V_COUNT = 21, T_COUNT = 28, N_COUNT = V_COUNT * T_COUNT, S_COUNT = L_COUNT * N_COUNT,
};

/* Invalid input bytes travel through NFC as these values (never composed). */
#define RAW_BYTE 0x110000u

static const uint32_t *find_decomp(uint32_t cp) {
    size_t lo = 0, hi = N_OF(unicode_decomp_tab);
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (unicode_decomp_tab[mid][0] < cp) lo = mid + 1;
        else hi = mid;
    }
    return lo < N_OF(unicode_decomp_tab) && unicode_decomp_tab[lo][0] == cp ? unicode_decomp_tab[lo] : NULL;
}

/* Full canonical decomposition of cp appended at out; returns the count
 * (at most 4 for any code point). */
static size_t decompose(uint32_t cp, uint32_t *out) {
    if (cp >= S_BASE && cp < S_BASE + S_COUNT) {
        uint32_t s = cp - S_BASE;
        out[0] = L_BASE + s / N_COUNT;
        out[1] = V_BASE + (s % N_COUNT) / T_COUNT;
        if (s % T_COUNT == 0) return 2;
        out[2] = T_BASE + s % T_COUNT;
        return 3;
    }
    const uint32_t *d = cp < 0xC0 || cp >= RAW_BYTE ? NULL : find_decomp(cp);
    if (!d) {
        out[0] = cp;
        return 1;
    }
    size_t k = decompose(d[1], out);
    if (d[2]) k += decompose(d[2], out + k);
    return k;
}

/* The primary composite of (a, b), or 0. */
static uint32_t compose(uint32_t a, uint32_t b) {
    if (a >= L_BASE && a < L_BASE + L_COUNT && b >= V_BASE && b < V_BASE + V_COUNT)
        return S_BASE + ((a - L_BASE) * V_COUNT + (b - V_BASE)) * T_COUNT;
    if (a >= S_BASE && a < S_BASE + S_COUNT && (a - S_BASE) % T_COUNT == 0 && b > T_BASE && b < T_BASE + T_COUNT)
        return a + (b - T_BASE);
    size_t lo = 0, hi = N_OF(unicode_comp_tab);
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        const uint32_t *e = unicode_comp_tab[mid];
        if (e[0] < a || (e[0] == a && e[1] < b)) lo = mid + 1;
        else hi = mid;
    }
    if (lo < N_OF(unicode_comp_tab) && unicode_comp_tab[lo][0] == a && unicode_comp_tab[lo][1] == b)
        return unicode_comp_tab[lo][2];
    return 0;
}

int unicode_nfc(const char *s, size_t n, char **out, size_t *out_len) {
    *out = NULL;
    *out_len = n;
    /* Quick check (UAX #15): text whose code points all have NFC_QC=Yes and
     * combining class 0 is already normalised. */
    bool look = false;
    for (size_t i = 0, l; i < n && !look; i += l) {
        if ((uint8_t)s[i] < 0x80) {
            l = 1;
            continue;
        }
        uint32_t cp = unicode_decode(s + i, n - i, &l);
        look = cp != UNICODE_INVALID && (class_flags(cp) & 4);
    }
    if (!look) return 0;

    uint32_t *cps = malloc((4 * n + 1) * sizeof *cps);
    char *buf = malloc(4 * n + 1);
    if (!cps || !buf) {
        free(cps);
        free(buf);
        return -1;
    }
    /* Decompose. */
    size_t m = 0;
    for (size_t i = 0, l; i < n; i += l) {
        uint32_t cp = unicode_decode(s + i, n - i, &l);
        if (cp == UNICODE_INVALID) cps[m++] = RAW_BYTE + (uint8_t)s[i];
        else m += decompose(cp, cps + m);
    }
    /* Canonical order: a stable sort by combining class within each run of
     * non-starters. */
    for (size_t i = 1; i < m; i++) {
        uint32_t c = cps[i];
        int cc = ccc(c);
        if (cc == 0) continue;
        size_t j = i;
        while (j > 0 && ccc(cps[j - 1]) > cc) {
            cps[j] = cps[j - 1];
            j--;
        }
        cps[j] = c;
    }
    /* Compose: each character joins the last starter unless blocked by a
     * character in between of the same or higher class. */
    size_t w = 0;
    long starter = -1;
    int last_cc = 0;
    for (size_t i = 0; i < m; i++) {
        uint32_t c = cps[i];
        int cc = ccc(c);
        if (starter >= 0 && (last_cc < cc || (last_cc == 0 && (size_t)starter == w - 1))) {
            uint32_t comp = compose(cps[starter], c);
            if (comp) {
                cps[starter] = comp;
                continue;
            }
        }
        if (cc == 0) starter = (long)w;
        last_cc = cc;
        cps[w++] = c;
    }
    size_t o = 0;
    for (size_t i = 0; i < w; i++) {
        if (cps[i] >= RAW_BYTE) buf[o++] = (char)(cps[i] - RAW_BYTE);
        else o += (size_t)unicode_encode(cps[i], buf + o);
    }
    free(cps);
    *out = buf;
    *out_len = o;
    return 0;
}
