/*
 * log.h - the engine's log lines, routed through engine_set_log().
 */
#ifndef SASERVE_ENGINE_LOG_H
#define SASERVE_ENGINE_LOG_H

#include "engine.h"

void elog(engine_log_level level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#define ELOG_DEBUG(...) elog(ENGINE_LOG_DEBUG, __VA_ARGS__)
#define ELOG_INFO(...) elog(ENGINE_LOG_INFO, __VA_ARGS__)
#define ELOG_WARN(...) elog(ENGINE_LOG_WARN, __VA_ARGS__)
#define ELOG_ERROR(...) elog(ENGINE_LOG_ERROR, __VA_ARGS__)

#endif
