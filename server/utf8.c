/*
 * utf8.c - see utf8.h.
 */
#include "utf8.h"

#include <stdint.h>

/* Length of the valid sequence at s, 0 if invalid, -1 if truncated (valid so
 * far but n is too short). */
static int seq_at(const uint8_t *s, size_t n) {
    int len;
    uint32_t cp;
    if (s[0] < 0x80) return 1;
    if (s[0] >= 0xc2 && s[0] <= 0xdf) len = 2, cp = s[0] & 0x1f;
    else if ((s[0] & 0xf0) == 0xe0) len = 3, cp = s[0] & 0x0f;
    else if (s[0] >= 0xf0 && s[0] <= 0xf4) len = 4, cp = s[0] & 0x07;
    else return 0;
    for (int i = 1; i < len; i++) {
        if ((size_t)i >= n) {
            return -1;
        }
        if ((s[i] & 0xc0) != 0x80) return 0;
        cp = (cp << 6) | (s[i] & 0x3f);
        /* Reject overlong / surrogate / out-of-range prefixes early. */
        if (i == 1) {
            if (len == 3 && ((s[0] == 0xe0 && s[1] < 0xa0) || (s[0] == 0xed && s[1] >= 0xa0))) return 0;
            if (len == 4 && ((s[0] == 0xf0 && s[1] < 0x90) || (s[0] == 0xf4 && s[1] >= 0x90))) return 0;
        }
    }
    return len;
}

size_t utf8_complete_prefix(const char *s, size_t n) {
    const uint8_t *u = (const uint8_t *)s;
    size_t i = 0;
    while (i < n) {
        int l = seq_at(u + i, n - i);
        if (l < 0) return i;
        i += l > 0 ? (size_t)l : 1;
    }
    return n;
}

bool utf8_valid(const char *s, size_t n) {
    const uint8_t *u = (const uint8_t *)s;
    for (size_t i = 0; i < n;) {
        int l = seq_at(u + i, n - i);
        if (l <= 0) return false;
        i += (size_t)l;
    }
    return true;
}

size_t utf8_sanitize(const char *s, size_t n, char *out) {
    const uint8_t *u = (const uint8_t *)s;
    size_t o = 0;
    for (size_t i = 0; i < n;) {
        int l = seq_at(u + i, n - i);
        if (l > 0) {
            for (int k = 0; k < l; k++) out[o++] = s[i + k];
            i += (size_t)l;
        } else {
            out[o++] = (char)0xef, out[o++] = (char)0xbf, out[o++] = (char)0xbd;
            i++;
        }
    }
    return o;
}
