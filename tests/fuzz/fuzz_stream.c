/*
 * fuzz_stream.c - the textstream (stop strings, UTF-8 hold-back) that turns
 * each choice's token bytes into SSE deltas.
 *
 * Input: byte 0 = number of stop strings (mod 5); each stop is a length byte
 * (mod 12, 0 skips it as the server skips "") and its bytes; the rest are
 * token pieces, each a length byte (mod 24) and its bytes, fed one by one as
 * the scheduler feeds tokens.
 *
 * Oracle: let R_k be the raw bytes of pieces 1..k.  At the first k where R_k
 * contains a stop string, generation stops and the output is the sanitized
 * R_k up to the earliest such occurrence; with no stop it is the sanitized
 * whole input after textstream_finish.  Every delta is valid UTF-8, nothing
 * is released after a stop, and the concatenated deltas equal the oracle.
 * Stops are fed as the server would (valid UTF-8), plus invalid ones when
 * byte 0 has bit 7 set (memory safety only for the hold-back of those).
 */
#include <string.h>

#include "fuzz.h"
#include "stream.h"
#include "utf8.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1) return 0;
    bool allow_invalid = data[0] & 0x80;
    int want = (data[0] & 0x7f) % 5;
    size_t i = 1;
    char stops_mem[STREAM_MAX_STOPS][16];
    const char *stops[STREAM_MAX_STOPS];
    int n_stops = 0;
    for (int s = 0; s < want && i < size; s++) {
        size_t l = data[i++] % 12;
        if (l > size - i) l = size - i;
        memcpy(stops_mem[n_stops], data + i, l);
        stops_mem[n_stops][l] = 0;
        i += l;
        /* The server refuses invalid UTF-8 and treats "" as no stop; a NUL
         * inside ends the C string, as it would in the request's copy. */
        size_t sl = strlen(stops_mem[n_stops]);
        if (!allow_invalid && !utf8_valid(stops_mem[n_stops], sl)) continue;
        stops[n_stops] = stops_mem[n_stops];
        n_stops++;
    }
    /* The oracle's stops: the empty string stops nothing (textstream_init
     * drops it; memmem would match it everywhere). */
    const char *live[STREAM_MAX_STOPS];
    int n_live = 0;
    for (int s = 0; s < n_stops; s++)
        if (stops[s][0]) live[n_live++] = stops[s];
    textstream ts;
    textstream_init(&ts, stops, n_stops);
    buf raw = {0}, out = {0}, delta = {0};
    size_t cut = (size_t)-1; /* oracle: where the output must end */
    bool stopped = false;
    while (i < size) {
        size_t l = data[i++] % 24;
        if (l > size - i) l = size - i;
        buf_append(&raw, data + i, l);
        i += l;
        if (cut == (size_t)-1) {
            for (int s = 0; s < n_live; s++) {
                const char *m = memmem(raw.p, raw.len, live[s], strlen(live[s]));
                if (m && (size_t)(m - raw.p) < cut) cut = (size_t)(m - raw.p);
            }
        }
        buf_reset(&delta);
        bool st = textstream_feed(&ts, (const char *)data + i - l, l, &delta);
        FUZZ_CHECK(!stopped || delta.len == 0, "released %zu bytes after a stop", delta.len);
        FUZZ_CHECK(utf8_valid(delta.p ? delta.p : "", delta.len), "delta is not valid UTF-8");
        if (!stopped) buf_append(&out, delta.p ? delta.p : "", delta.len);
        FUZZ_CHECK(st == (cut != (size_t)-1), "stop reported %d, oracle %d", st, cut != (size_t)-1);
        stopped = st;
    }
    buf_reset(&delta);
    textstream_finish(&ts, &delta);
    FUZZ_CHECK(!stopped || delta.len == 0, "finish released text after a stop");
    FUZZ_CHECK(utf8_valid(delta.p ? delta.p : "", delta.len), "final delta is not valid UTF-8");
    buf_append(&out, delta.p ? delta.p : "", delta.len);

    size_t end = cut != (size_t)-1 ? cut : raw.len;
    char *want_out = malloc(3 * end + 1);
    size_t wl = utf8_sanitize(raw.p ? raw.p : "", end, want_out);
    FUZZ_CHECK(out.len == wl && memcmp(out.p ? out.p : "", want_out, wl) == 0,
               "output of %zu bytes differs from the oracle's %zu (stop at %zd)", out.len, wl,
               cut == (size_t)-1 ? (ssize_t)-1 : (ssize_t)cut);
    free(want_out);
    buf_free(&raw);
    buf_free(&out);
    buf_free(&delta);
    textstream_free(&ts);
    return 0;
}
