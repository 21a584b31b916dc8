/*
 * log.c - engine logging.  The server installs its own sink (text or JSON
 * lines); without one, INFO and above go to stderr.
 */
#include "log.h"

#include <stdarg.h>
#include <stdio.h>

static engine_log_fn log_fn;
static void *log_ud;

void engine_set_log(engine_log_fn fn, void *ud) {
    log_fn = fn;
    log_ud = ud;
}

void elog(engine_log_level level, const char *fmt, ...) {
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    if (log_fn) {
        log_fn(level, buf, log_ud);
        return;
    }
    if (level < ENGINE_LOG_INFO) return;
    static const char *names[] = {"debug", "info", "warn", "error"};
    fprintf(stderr, "saserve: %s: %s\n", names[level], buf);
}
