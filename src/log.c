/* log: levelled, redacted log lines (see log.h). */
#include "log.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cJSON.h>

#include "utf8.h"

#define LOG_LINE_MAX 8192
#define LOG_SECRETS_MAX 64

static pthread_mutex_t log_lock = PTHREAD_MUTEX_INITIALIZER;
static log_level log_min = NLOG_INFO;
static bool log_json;
static FILE *log_out;
static char *log_secrets[LOG_SECRETS_MAX];
static int log_nsecrets;

static const char *level_names[] = {"debug", "info", "warn", "error"};

void log_setup(log_level min_level, bool json) {
    pthread_mutex_lock(&log_lock);
    log_min = min_level;
    log_json = json;
    pthread_mutex_unlock(&log_lock);
}

void log_set_output(FILE *out) {
    pthread_mutex_lock(&log_lock);
    log_out = out;
    pthread_mutex_unlock(&log_lock);
}

bool log_parse_level(const char *text, log_level *out) {
    if (!text) return false;
    if (!strcasecmp(text, "debug")) *out = NLOG_DEBUG;
    else if (!strcasecmp(text, "info")) *out = NLOG_INFO;
    else if (!strcasecmp(text, "warn") || !strcasecmp(text, "warning"))
        *out = NLOG_WARN;
    else if (!strcasecmp(text, "error")) *out = NLOG_ERROR;
    else return false;
    return true;
}

bool log_enabled(log_level level) {
    return level >= log_min;
}

void log_add_secret(const char *value) {
    if (!value || strlen(value) < 4) return;
    pthread_mutex_lock(&log_lock);
    bool known = false;
    for (int i = 0; i < log_nsecrets; i++)
        if (!strcmp(log_secrets[i], value)) known = true;
    if (!known && log_nsecrets < LOG_SECRETS_MAX)
        log_secrets[log_nsecrets++] = strdup(value);
    pthread_mutex_unlock(&log_lock);
}

/* Replaces the password of every scheme://user:password@ in buf. */
static void redact_urls(char *buf, size_t n) {
    char *p = buf;
    while ((p = strstr(p, "://")) != NULL) {
        char *auth = p + 3;
        size_t span = strcspn(auth, "/?# \t\"'@");
        if (auth[span] != '@') {
            p = auth;
            continue;
        }
        char *colon = memchr(auth, ':', span);
        if (!colon) {
            p = auth + span;
            continue;
        }
        const char *mask = "***";
        char *at = auth + span;
        size_t tail = strlen(at) + 1;
        size_t old = (size_t)(at - (colon + 1));
        size_t newlen = (size_t)(colon + 1 - buf) + strlen(mask) + tail;
        if (newlen > n) return;
        memmove(colon + 1 + strlen(mask), at, tail);
        memcpy(colon + 1, mask, strlen(mask));
        (void)old;
        p = colon + 1 + strlen(mask);
    }
}

/* Replaces the value of NAME=value where NAME ends in _PASSWORD, _SECRET,
 * _TOKEN or _KEY (any case), up to the next blank or quote. */
static void redact_assignments(char *buf, size_t n) {
    static const char *suffixes[] = {"_password=", "_secret=", "_token=",
                                     "_key="};
    static const char mask[] = "[REDACTED]";
    for (char *p = buf; *p; p++) {
        for (int i = 0; i < 4; i++) {
            size_t sl = strlen(suffixes[i]);
            if (strncasecmp(p, suffixes[i], sl)) continue;
            char *v = p + sl;
            size_t vl = strcspn(v, " \t\"',;&");
            if (!vl || (vl == sizeof mask - 1 && !strncmp(v, mask, vl)))
                continue;
            size_t tail = strlen(v + vl) + 1;
            if ((size_t)(v - buf) + sizeof mask - 1 + tail > n) return;
            memmove(v + sizeof mask - 1, v + vl, tail);
            memcpy(v, mask, sizeof mask - 1);
            p = v + sizeof mask - 2;
            break;
        }
    }
}

/* Replaces each remembered secret in buf. Called with log_lock held. */
static void redact_secrets(char *buf, size_t n) {
    static const char mask[] = "[REDACTED]";
    for (int i = 0; i < log_nsecrets; i++) {
        const char *s = log_secrets[i];
        size_t slen = strlen(s);
        char *hit = buf;
        while ((hit = strstr(hit, s)) != NULL) {
            size_t tail = strlen(hit + slen) + 1;
            size_t used = (size_t)(hit - buf) + sizeof mask - 1 + tail;
            if (used > n) return;
            memmove(hit + sizeof mask - 1, hit + slen, tail);
            memcpy(hit, mask, sizeof mask - 1);
            hit += sizeof mask - 1;
        }
    }
}

char *log_redact(const char *text, char *out, size_t n) {
    if (n == 0) return out;
    snprintf(out, n, "%s", text ? text : "");
    redact_urls(out, n);
    redact_assignments(out, n);
    pthread_mutex_lock(&log_lock);
    redact_secrets(out, n);
    pthread_mutex_unlock(&log_lock);
    return out;
}

static void format_time(char *out, size_t n) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    struct tm tm;
    gmtime_r(&ts.tv_sec, &tm);
    size_t len = strftime(out, n, "%Y-%m-%dT%H:%M:%S", &tm);
    snprintf(out + len, n - len, ".%03ldZ", ts.tv_nsec / 1000000);
}

static void write_text(FILE *out, const char *when, log_level level,
                       const char *component, const char *request_id,
                       const char *run_id, const char *msg) {
    fprintf(out, "%s %-5s ", when, level_names[level]);
    if (component) fprintf(out, "[%s] ", component);
    fputs(msg, out);
    if (request_id) fprintf(out, " request_id=%s", request_id);
    if (run_id) fprintf(out, " run_id=%s", run_id);
    fputc('\n', out);
}

static void write_json(FILE *out, const char *when, log_level level,
                       const char *component, const char *request_id,
                       const char *run_id, const char *msg) {
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "time", when);
    cJSON_AddStringToObject(o, "level", level_names[level]);
    if (component) cJSON_AddStringToObject(o, "component", component);
    cJSON_AddStringToObject(o, "message", msg);
    if (request_id) cJSON_AddStringToObject(o, "request_id", request_id);
    if (run_id) cJSON_AddStringToObject(o, "run_id", run_id);
    char *text = cJSON_PrintUnformatted(o);
    if (text) {
        fputs(text, out);
        fputc('\n', out);
    }
    free(text);
    cJSON_Delete(o);
}

/* Copies msg to out (n bytes) so that it stays one line of valid UTF-8:
 * in text form (json false) \n, \r, \t become those two characters and
 * other control bytes (C0, DEL, ESC) \xNN; in both forms every byte that
 * is not valid UTF-8 becomes U+FFFD. Truncates at a whole character. */
static void make_safe(const char *msg, bool json, char *out, size_t n) {
    const unsigned char *u = (const unsigned char *)msg;
    size_t len = strlen(msg), o = 0;
    for (size_t i = 0; i < len;) {
        char tmp[8];
        size_t k = 0, step = 1;
        unsigned char c = u[i];
        if (c < 0x20 || c == 0x7f) {
            if (json) tmp[k++] = (char)c;
            else if (c == '\n') k = (size_t)snprintf(tmp, sizeof tmp, "\\n");
            else if (c == '\r') k = (size_t)snprintf(tmp, sizeof tmp, "\\r");
            else if (c == '\t') k = (size_t)snprintf(tmp, sizeof tmp, "\\t");
            else k = (size_t)snprintf(tmp, sizeof tmp, "\\x%02x", c);
        } else if (c < 0x80) {
            tmp[k++] = (char)c;
        } else if ((step = utf8_seq_len(u + i, len - i)) > 0) {
            memcpy(tmp, u + i, step);
            k = step;
        } else {
            memcpy(tmp, "\xef\xbf\xbd", 3);
            k = 3;
            step = 1;
        }
        if (o + k + 1 > n) break;
        memcpy(out + o, tmp, k);
        o += k;
        i += step;
    }
    out[o] = 0;
}

void log_vreq(log_level level, const char *component, const char *request_id,
              const char *run_id, const char *fmt, va_list ap) {
    if (!log_enabled(level)) return;
    char msg[LOG_LINE_MAX], safe[LOG_LINE_MAX * 2];
    vsnprintf(msg, sizeof msg, fmt, ap);
    redact_urls(msg, sizeof msg);
    redact_assignments(msg, sizeof msg);
    char when[40];
    format_time(when, sizeof when);

    pthread_mutex_lock(&log_lock);
    redact_secrets(msg, sizeof msg);
    FILE *out = log_out ? log_out : stderr;
    make_safe(msg, log_json, safe, sizeof safe);
    if (log_json)
        write_json(out, when, level, component, request_id, run_id, safe);
    else
        write_text(out, when, level, component, request_id, run_id, safe);
    fflush(out);
    pthread_mutex_unlock(&log_lock);
}

void log_req(log_level level, const char *component, const char *request_id,
             const char *run_id, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    log_vreq(level, component, request_id, run_id, fmt, ap);
    va_end(ap);
}

void log_msg(log_level level, const char *component, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    log_vreq(level, component, NULL, NULL, fmt, ap);
    va_end(ap);
}
