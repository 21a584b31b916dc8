/*
 * log.c - see log.h.
 */
#include "log.h"

#include <jansson.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

static slog_level min_level = SLOG_INFO;
static bool as_json;
static const char *level_names[] = {"debug", "info", "warn", "error"};

static void engine_sink(engine_log_level level, const char *msg, void *ud) {
    (void)ud;
    slog((slog_level)level, NULL, "%s", msg);
}

int slog_init(const char *level, bool json) {
    int found = -1;
    for (int i = 0; i < 4; i++)
        if (level && !strcmp(level, level_names[i])) found = i;
    if (found < 0) return -1;
    min_level = (slog_level)found;
    as_json = json;
    engine_set_log(engine_sink, NULL);
    return 0;
}

void slog(slog_level level, const char *req_id, const char *fmt, ...) {
    if (level < min_level) return;
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    struct timeval tv;
    gettimeofday(&tv, NULL);
    struct tm tm;
    gmtime_r(&tv.tv_sec, &tm);
    char ts[96];
    snprintf(ts, sizeof ts, "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ", tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday,
             tm.tm_hour, tm.tm_min, tm.tm_sec, (int)(tv.tv_usec / 1000));
    char line[1400];
    int n;
    if (as_json) {
        json_t *o = json_pack("{s:s, s:s, s:s}", "ts", ts, "level", level_names[level], "msg", msg);
        if (req_id) json_object_set_new(o, "request_id", json_string(req_id));
        char *s = json_dumps(o, JSON_COMPACT | JSON_ENSURE_ASCII);
        n = snprintf(line, sizeof line, "%s\n", s ? s : "{}");
        free(s);
        json_decref(o);
    } else if (req_id) {
        n = snprintf(line, sizeof line, "%s %-5s [%s] %s\n", ts, level_names[level], req_id, msg);
    } else {
        n = snprintf(line, sizeof line, "%s %-5s %s\n", ts, level_names[level], msg);
    }
    if (n > (int)sizeof line - 1) {
        n = (int)sizeof line - 1;
        line[n - 1] = '\n';
    }
    ssize_t w = write(STDERR_FILENO, line, (size_t)n);
    (void)w;
}
