/* log: levelled log lines on stderr, as text or JSON, with a component
 * tag, optional request and run ids, and redaction of secrets.
 *
 * Any thread may call any function here; a line is written whole. */
#ifndef NETRA_LOG_H
#define NETRA_LOG_H

#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>

typedef enum {
    NLOG_DEBUG = 0,
    NLOG_INFO,
    NLOG_WARN,
    NLOG_ERROR,
} log_level;

/* Sets the least level written and the format. Can't fail. */
void log_setup(log_level min_level, bool json);

/* Sends lines to `out` instead of stderr (tests); NULL restores stderr. */
void log_set_output(FILE *out);

/* Parses "debug", "info", "warn"/"warning" or "error" (any case).
 * Returns false and leaves *out alone on anything else. */
bool log_parse_level(const char *text, log_level *out);

/* Is a line at `level` written? */
bool log_enabled(log_level level);

/* Remembers a secret value (4 bytes or more) so that it is replaced by
 * [REDACTED] wherever it would appear in a line. Can't fail; values past
 * the first 64 are ignored. */
void log_add_secret(const char *value);

/* Writes one line: time, level, [component], message. Passwords inside
 * URLs (scheme://user:password@host) and remembered secrets are replaced.
 * `component` may be NULL. */
void log_msg(log_level level, const char *component, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* As log_msg, for a line about a request; either id may be NULL. */
void log_req(log_level level, const char *component, const char *request_id,
             const char *run_id, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));

void log_vreq(log_level level, const char *component, const char *request_id,
              const char *run_id, const char *fmt, va_list ap);

/* Copies `text` into out (size n, always terminated) with URL passwords
 * and remembered secrets replaced. Returns out. */
char *log_redact(const char *text, char *out, size_t n);

#endif
