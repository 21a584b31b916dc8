/*
 * log.h - server log lines: text or JSON lines on stderr, with a level and,
 * where there is one, the request id.  Thread-safe (one write(2) per line).
 */
#ifndef SASERVE_LOG_H
#define SASERVE_LOG_H

#include "engine.h"

typedef enum { SLOG_DEBUG = 0, SLOG_INFO, SLOG_WARN, SLOG_ERROR } slog_level;

/* level: "debug".."error"; json: one JSON object per line.  Also routes the
 * engine's log through here.  Returns -1 for an unknown level name. */
int slog_init(const char *level, bool json);
void slog(slog_level level, const char *req_id, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

#define LOG_DEBUG(id, ...) slog(SLOG_DEBUG, id, __VA_ARGS__)
#define LOG_INFO(id, ...) slog(SLOG_INFO, id, __VA_ARGS__)
#define LOG_WARN(id, ...) slog(SLOG_WARN, id, __VA_ARGS__)
#define LOG_ERROR(id, ...) slog(SLOG_ERROR, id, __VA_ARGS__)

#endif
