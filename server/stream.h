/*
 * stream.h - turns a choice's generated token bytes into text that is safe to
 * send: stop strings are cut (they never appear in the output), text that
 * could still become a stop string is held back, and a delta never ends inside
 * a multi-byte UTF-8 character (invalid bytes become U+FFFD).
 *
 * One textstream per choice, used by one thread (the scheduler).
 */
#ifndef SASERVE_STREAM_H
#define SASERVE_STREAM_H

#include <stdbool.h>
#include <stddef.h>

#include "buf.h"

#define STREAM_MAX_STOPS 4

typedef struct {
    buf pending;   /* bytes received but not yet released */
    const char *stops[STREAM_MAX_STOPS];
    size_t stop_len[STREAM_MAX_STOPS];
    int n_stops;
    bool stopped;  /* a stop string matched: nothing more is released */
} textstream;

void textstream_init(textstream *ts, const char *const *stops, int n_stops);
void textstream_free(textstream *ts);
/* Adds n bytes; appends what may be released now to out.  Returns true when
 * a stop string matched (out then ends just before it). */
bool textstream_feed(textstream *ts, const char *bytes, size_t n, buf *out);
/* End of generation: releases everything still held (no stop matched). */
void textstream_finish(textstream *ts, buf *out);

#endif
