/*
 * shared.c - the shared-layers setting: parsing, validation and formatting.
 *
 * Notation as in the paper's code: the list names the layers that SHARE.
 * "5-7,9-11" means layers 5, 6, 7, 9, 10, 11 reuse the attention weights of
 * their source, the nearest lower layer that is not shared (4 and 8).
 */
#include <ctype.h>
#include <stdio.h>
#include <string.h>

#include "engine.h"

static bool parse_uint(const char **p, const char *end, int *out) {
    const char *s = *p;
    if (s >= end || !isdigit((unsigned char)*s)) return false;
    long v = 0;
    while (s < end && isdigit((unsigned char)*s)) {
        v = v * 10 + (*s - '0');
        if (v > 1000000) return false;
        s++;
    }
    *p = s;
    *out = (int)v;
    return true;
}

int engine_parse_shared_layers(const char *text, int n_layer, bool *shared, char *err, size_t errlen) {
    for (int i = 0; i < n_layer; i++) shared[i] = false;
    if (!text || !*text || strcmp(text, "none") == 0) return 0;
    const char *p = text;
    for (;;) {
        const char *end = strchr(p, ',');
        if (!end) end = p + strlen(p);
        int len = (int)(end - p);
        const char *q = p;
        int a, b;
        bool ok = parse_uint(&q, end, &a);
        b = a;
        if (ok && q < end && *q == '-') {
            q++;
            ok = parse_uint(&q, end, &b);
        }
        if (!ok || q != end || b < a) {
            snprintf(err, errlen, "shared layers: entry '%.*s' is not a layer (N) or a range (N-M, N <= M)", len, p);
            return ENGINE_ESHARED;
        }
        if (a == 0) {
            snprintf(err, errlen, "shared layers: entry '%.*s' includes layer 0, which cannot share (no earlier layer)",
                     len, p);
            return ENGINE_ESHARED;
        }
        if (b >= n_layer) {
            snprintf(err, errlen, "shared layers: entry '%.*s' names layer %d, but the model has layers 0-%d", len, p,
                     b, n_layer - 1);
            return ENGINE_ESHARED;
        }
        for (int l = a; l <= b; l++) {
            if (shared[l]) {
                snprintf(err, errlen, "shared layers: entry '%.*s' overlaps an earlier entry at layer %d", len, p, l);
                return ENGINE_ESHARED;
            }
            shared[l] = true;
        }
        if (!*end) break;
        p = end + 1;
    }
    return 0;
}

void engine_format_shared_layers(const bool *shared, int n_layer, char *out, size_t cap) {
    size_t o = 0;
    out[0] = 0;
    for (int l = 0; l < n_layer;) {
        if (!shared[l]) {
            l++;
            continue;
        }
        int e = l;
        while (e + 1 < n_layer && shared[e + 1]) e++;
        int w = e > l ? snprintf(out + o, cap - o, "%s%d-%d", o ? "," : "", l, e)
                      : snprintf(out + o, cap - o, "%s%d", o ? "," : "", l);
        if (w < 0 || (size_t)w >= cap - o) break;
        o += (size_t)w;
        l = e + 1;
    }
    if (o == 0) snprintf(out, cap, "none");
}
