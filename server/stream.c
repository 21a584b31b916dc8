/*
 * stream.c - see stream.h.
 */
#include "stream.h"

#include <string.h>

#include "utf8.h"

void textstream_init(textstream *ts, const char *const *stops, int n_stops) {
    memset(ts, 0, sizeof *ts);
    for (int i = 0; i < n_stops && ts->n_stops < STREAM_MAX_STOPS; i++) {
        if (!stops[i] || !stops[i][0]) continue; /* an empty stop string matches nothing */
        ts->stops[ts->n_stops] = stops[i];
        ts->stop_len[ts->n_stops] = strlen(stops[i]);
        ts->n_stops++;
    }
}

void textstream_free(textstream *ts) { buf_free(&ts->pending); }

static void release(buf *out, const char *s, size_t n) {
    char tmp[3 * 256];
    while (n > 0) { /* sanitised in pieces so the stack buffer stays small */
        size_t m = n < 256 ? n : 256;
        /* Do not split a valid character between pieces. */
        if (m < n) {
            size_t ok = utf8_complete_prefix(s, m);
            if (ok > 0) m = ok;
        }
        buf_append(out, tmp, utf8_sanitize(s, m, tmp));
        s += m;
        n -= m;
    }
}

/* Length of the longest suffix of s[0..n) that is a proper prefix of a stop. */
static size_t holdback(const textstream *ts, const char *s, size_t n) {
    size_t best = 0;
    for (int i = 0; i < ts->n_stops; i++) {
        size_t max = ts->stop_len[i] - 1 < n ? ts->stop_len[i] - 1 : n;
        for (size_t k = max; k > best; k--)
            if (memcmp(s + n - k, ts->stops[i], k) == 0) {
                best = k;
                break;
            }
    }
    return best;
}

bool textstream_feed(textstream *ts, const char *bytes, size_t n, buf *out) {
    if (ts->stopped) return true;
    buf_append(&ts->pending, bytes, n);
    const char *p = ts->pending.p;
    size_t len = ts->pending.len;
    /* Earliest stop match anywhere in what is pending. */
    size_t first = len + 1;
    for (int i = 0; i < ts->n_stops; i++) {
        const char *m = memmem(p, len, ts->stops[i], ts->stop_len[i]);
        if (m && (size_t)(m - p) < first) first = (size_t)(m - p);
    }
    if (first <= len) {
        release(out, p, first);
        buf_reset(&ts->pending);
        ts->stopped = true;
        return true;
    }
    size_t keep = holdback(ts, p, len);
    size_t ready = utf8_complete_prefix(p, len - keep);
    if (ready > 0) {
        release(out, p, ready);
        buf_consume(&ts->pending, ready);
    }
    return false;
}

void textstream_finish(textstream *ts, buf *out) {
    if (!ts->stopped && ts->pending.len) release(out, ts->pending.p, ts->pending.len);
    buf_reset(&ts->pending);
}
