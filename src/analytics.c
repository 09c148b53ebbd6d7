/* analytics: events to the spool, the spool to ClickHouse (analytics.h). */
#include "analytics.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include "clickhouse.h"
#include "context.h"
#include "eventlog.h"
#include "log.h"
#include "spool.h"

#define KIND_TOOL_CALL 1
#define KIND_AGENT_EVENT 2
#define DROP_LOG_MS 60000

const char analytics_tool_calls_ddl[] =
    "CREATE TABLE IF NOT EXISTS netra_tool_calls ("
    "event_id String, started_at DateTime, started_ms UInt16, "
    "user_id String, thread_id String, run_id String, request_id String, "
    "tool_name String, tool_call_id String, agent_name String, "
    "status String, error String, duration_ms Float64, arguments String"
    ") ENGINE = ReplacingMergeTree "
    "PARTITION BY toYYYYMM(started_at) "
    "ORDER BY (user_id, started_at, event_id)";

const char analytics_agent_events_ddl[] =
    "CREATE TABLE IF NOT EXISTS netra_agent_events ("
    "event_id String, at DateTime, at_ms UInt16, user_id String, "
    "thread_id String, run_id String, agent_name String, type String, "
    "tool_name String, tool_call_id String, data String"
    ") ENGINE = ReplacingMergeTree "
    "PARTITION BY toYYYYMM(at) "
    "ORDER BY (user_id, run_id, at, event_id)";

static const char *const call_columns[] = {
    "event_id",  "started_at", "started_ms",   "user_id",    "thread_id",
    "run_id",    "request_id", "tool_name",    "tool_call_id",
    "agent_name", "status",    "error",        "duration_ms", "arguments"};
static const char *const event_columns[] = {
    "event_id", "at",         "at_ms",       "user_id",      "thread_id",
    "run_id",   "agent_name", "type",        "tool_name",    "tool_call_id",
    "data"};

struct analytics {
    analytics_config cfg;
    char *spool_dir, *events_file;
    pthread_mutex_t lock; /* guards the spool and the events file */
    pthread_cond_t wake;
    spool *sp;
    evlog *ev;
    ch_client *ch;
    bool tables_ready;
    pthread_t thread;
    bool running, stopping;
    int64_t last_drop_log_ms;

    atomic_ullong accepted, dropped, delivered;
    atomic_int refs; /* the owner, and the health check while registered */
    char last_error[1200]; /* guarded by lock */
};

static int64_t now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static const char *or_empty(const char *s) {
    return s ? s : "";
}

static void add_str(ch_rows *r, const char *s) {
    s = or_empty(s);
    ch_rows_str(r, s, strlen(s));
}

/* Records a dropped event; logs at most once a minute. Called with the
 * lock held. */
static void note_drop(analytics *a, const char *why) {
    unsigned long long n = atomic_fetch_add(&a->dropped, 1) + 1;
    int64_t now = now_ms();
    if (now - a->last_drop_log_ms >= DROP_LOG_MS) {
        a->last_drop_log_ms = now;
        log_msg(NLOG_WARN, "analytics",
                "dropping events: %s (%llu dropped so far) - free space or "
                "raise NETRA_SPOOL_MAX_BYTES, and check ClickHouse",
                why, n);
    }
}

/* Writes one record to the spool; returns 0 or -1 (dropped). */
static int spool_put(analytics *a, uint16_t kind, const char *data,
                     size_t len) {
    pthread_mutex_lock(&a->lock);
    int rc = a->sp ? spool_append(a->sp, kind, data, len, 1, NULL)
                   : SPOOL_EIO;
    if (rc == SPOOL_OK) {
        atomic_fetch_add(&a->accepted, 1);
        pthread_cond_signal(&a->wake);
    } else {
        note_drop(a, rc == SPOOL_FULL ? "the spool is full"
                                      : spool_error(a->sp));
    }
    pthread_mutex_unlock(&a->lock);
    return rc == SPOOL_OK ? 0 : -1;
}

/* Writes one JSON line to the events file; returns 0 or -1 (dropped). */
static int local_put(analytics *a, cJSON *line) {
    char *text = cJSON_PrintUnformatted(line);
    cJSON_Delete(line);
    if (!text) return -1;
    pthread_mutex_lock(&a->lock);
    int rc = a->ev ? evlog_append(a->ev, text, strlen(text)) : -1;
    if (rc == 0) atomic_fetch_add(&a->accepted, 1);
    else note_drop(a, a->ev ? evlog_error(a->ev) : "no events file");
    pthread_mutex_unlock(&a->lock);
    free(text);
    return rc == 0 ? 0 : -1;
}

int analytics_tool_call(analytics *a, const disp_call_record *rec) {
    if (a->cfg.mode == ANALYTICS_LOCAL) {
        cJSON *o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "table", "netra_tool_calls");
        cJSON_AddStringToObject(o, "event_id", or_empty(rec->event_id));
        cJSON_AddNumberToObject(o, "started_ms", (double)rec->started_ms);
        cJSON_AddStringToObject(o, "user_id", or_empty(rec->user_id));
        cJSON_AddStringToObject(o, "thread_id", or_empty(rec->thread_id));
        cJSON_AddStringToObject(o, "run_id", or_empty(rec->run_id));
        cJSON_AddStringToObject(o, "request_id", or_empty(rec->request_id));
        cJSON_AddStringToObject(o, "tool_name", or_empty(rec->tool_name));
        cJSON_AddStringToObject(o, "tool_call_id",
                                or_empty(rec->tool_call_id));
        cJSON_AddStringToObject(o, "agent_name", or_empty(rec->agent_name));
        cJSON_AddStringToObject(o, "status", or_empty(rec->status));
        cJSON_AddStringToObject(o, "error", or_empty(rec->error));
        cJSON_AddNumberToObject(o, "duration_ms", rec->duration_ms);
        cJSON_AddStringToObject(o, "arguments", or_empty(rec->arguments));
        return local_put(a, o);
    }

    ch_rows *r = ch_rows_new();
    if (!r) return -1;
    add_str(r, rec->event_id);
    ch_rows_int(r, rec->started_ms / 1000);
    ch_rows_int(r, rec->started_ms % 1000);
    add_str(r, rec->user_id);
    add_str(r, rec->thread_id);
    add_str(r, rec->run_id);
    add_str(r, rec->request_id);
    add_str(r, rec->tool_name);
    add_str(r, rec->tool_call_id);
    add_str(r, rec->agent_name);
    add_str(r, rec->status);
    add_str(r, rec->error);
    ch_rows_double(r, rec->duration_ms);
    add_str(r, rec->arguments);
    int rc = ch_rows_end(r);
    size_t len;
    const char *data = ch_rows_data(r, &len);
    rc = rc == CH_OK ? spool_put(a, KIND_TOOL_CALL, data, len) : -1;
    ch_rows_free(r);
    return rc;
}

static const char *event_str(const cJSON *e, const char *key) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(e, key);
    return cJSON_IsString(v) ? v->valuestring : "";
}

/* Unix ms of an RFC 3339 UTC timestamp with milliseconds, or now. */
static int64_t event_ms(const cJSON *e) {
    const char *ts = event_str(e, "timestamp");
    struct tm tm;
    memset(&tm, 0, sizeof tm);
    int ms = 0;
    if (sscanf(ts, "%4d-%2d-%2dT%2d:%2d:%2d.%3dZ", &tm.tm_year, &tm.tm_mon,
               &tm.tm_mday, &tm.tm_hour, &tm.tm_min, &tm.tm_sec, &ms) < 6)
        return now_ms();
    tm.tm_year -= 1900;
    tm.tm_mon -= 1;
    return (int64_t)timegm(&tm) * 1000 + ms;
}

int analytics_agent_event(analytics *a, const cJSON *event) {
    char id[CTX_NEW_ID_LEN + 1];
    ctx_new_id(id);
    if (a->cfg.mode == ANALYTICS_LOCAL) {
        cJSON *o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "table", "netra_agent_events");
        cJSON_AddStringToObject(o, "event_id", id);
        cJSON_AddItemToObject(o, "event", cJSON_Duplicate(event, 1));
        return local_put(a, o);
    }

    int64_t at = event_ms(event);
    char *data = cJSON_PrintUnformatted(event);
    ch_rows *r = ch_rows_new();
    if (!r || !data) {
        ch_rows_free(r);
        free(data);
        return -1;
    }
    add_str(r, id);
    ch_rows_int(r, at / 1000);
    ch_rows_int(r, at % 1000);
    add_str(r, event_str(event, "user_id"));
    add_str(r, event_str(event, "thread_id"));
    add_str(r, event_str(event, "run_id"));
    add_str(r, event_str(event, "agent_name"));
    add_str(r, event_str(event, "type"));
    add_str(r, event_str(event, "tool_name"));
    add_str(r, event_str(event, "tool_call_id"));
    add_str(r, data);
    int rc = ch_rows_end(r);
    size_t len;
    const char *tsv = ch_rows_data(r, &len);
    rc = rc == CH_OK ? spool_put(a, KIND_AGENT_EVENT, tsv, len) : -1;
    ch_rows_free(r);
    free(data);
    return rc;
}

void analytics_record_call(void *ud, const disp_call_record *rec) {
    analytics_tool_call(ud, rec);
}

void analytics_record_event(void *ud, const cJSON *event) {
    analytics_agent_event(ud, event);
}

/* ---- the analytics thread -------------------------------------------------- */

/* Connects (if needed) and creates the tables. Returns 0 or -1 with the
 * error recorded. */
static int ensure_clickhouse(analytics *a, char *why, size_t n) {
    ch_error err;
    if (!a->ch) {
        ch_settings s;
        char warn[256], e[256] = "ClickHouse is not configured";
        if (!a->cfg.clickhouse_get ||
            ch_settings_parse(&s, a->cfg.clickhouse_get,
                              a->cfg.clickhouse_get_ud, warn, sizeof warn, e,
                              sizeof e) != CH_OK) {
            snprintf(why, n, "ClickHouse settings: %s", e);
            return -1;
        }
        ch_options o = {.connect_timeout_ms = 2000, .timeout_ms = 30000};
        a->ch = ch_client_new(&s, &o);
        ch_settings_free(&s);
        if (!a->ch) {
            snprintf(why, n, "out of memory");
            return -1;
        }
    }
    if (!ch_connected(a->ch) && ch_connect(a->ch, &err) != CH_OK) {
        snprintf(why, n, "%.500s", err.message);
        return -1;
    }
    if (!a->tables_ready) {
        if (ch_exec(a->ch, analytics_tool_calls_ddl, NULL, &err) != CH_OK ||
            ch_exec(a->ch, analytics_agent_events_ddl, NULL, &err) != CH_OK) {
            snprintf(why, n, "creating the tables: %.500s", err.message);
            return -1;
        }
        a->tables_ready = true;
    }
    return 0;
}

/* Collects the oldest pending records of one kind (up to batch_rows
 * rows) into rows. Returns true when it took any record (even one it had
 * to skip), with *last the seq of the last one taken. */
static bool collect(analytics *a, ch_rows *rows, uint16_t *kind,
                    uint64_t *last) {
    size_t n = 0;
    bool took = false;
    spool_record rec;
    pthread_mutex_lock(&a->lock);
    while (n < (size_t)a->cfg.batch_rows &&
           spool_peek_next(a->sp, *last, &rec) == SPOOL_OK) {
        if (n && rec.kind != *kind) break;
        took = true;
        *last = rec.seq;
        if (rec.kind != KIND_TOOL_CALL && rec.kind != KIND_AGENT_EVENT) {
            log_msg(NLOG_WARN, "analytics",
                    "skipping spool record %llu of unknown kind %u",
                    (unsigned long long)rec.seq, rec.kind);
        } else if (ch_rows_append(rows, rec.data, rec.len, rec.count) !=
                   CH_OK) {
            log_msg(NLOG_WARN, "analytics",
                    "skipping spool record %llu: not whole TSV rows",
                    (unsigned long long)rec.seq);
        } else {
            *kind = rec.kind;
            n += rec.count;
        }
    }
    pthread_mutex_unlock(&a->lock);
    return took;
}

/* Sends one batch. Returns 1 when something was sent, 0 when nothing is
 * pending, -1 on failure (why filled). */
static int send_batch(analytics *a, ch_rows *rows, char *why, size_t n) {
    uint16_t kind = 0;
    uint64_t last = 0;
    ch_rows_clear(rows);
    if (!collect(a, rows, &kind, &last)) return 0;
    if (ch_rows_count(rows)) {
        if (ensure_clickhouse(a, why, n) < 0) return -1;
        ch_error err;
        bool calls = kind == KIND_TOOL_CALL;
        if (ch_insert(a->ch, calls ? "netra_tool_calls" : "netra_agent_events",
                      calls ? call_columns : event_columns,
                      calls ? sizeof call_columns / sizeof *call_columns
                            : sizeof event_columns / sizeof *event_columns,
                      rows, NULL, &err) != CH_OK) {
            snprintf(why, n, "%.500s", err.message);
            if (err.kind != CH_E_SERVER) ch_close(a->ch);
            return -1;
        }
        atomic_fetch_add(&a->delivered, ch_rows_count(rows));
    }
    pthread_mutex_lock(&a->lock);
    int rc = spool_ack_through(a->sp, last);
    pthread_mutex_unlock(&a->lock);
    if (rc != SPOOL_OK) {
        snprintf(why, n, "acknowledging the spool: %s", spool_error(a->sp));
        return -1;
    }
    return 1;
}

static health_status analytics_check(void *ud, char *message, size_t size,
                                     cJSON **observed);

static void *analytics_main(void *arg) {
    analytics *a = arg;
    ch_rows *rows = ch_rows_new();
    int backoff_ms = 0;
    bool failing = false;
    char why[1200];

    /* Tables first, so that readers (analytics_recent_calls) find them. */
    if (ensure_clickhouse(a, why, sizeof why) < 0)
        log_msg(NLOG_INFO, "analytics", "ClickHouse not ready yet (%s); "
                "events wait in the spool", why);

    pthread_mutex_lock(&a->lock);
    for (;;) {
        struct timespec until;
        clock_gettime(CLOCK_REALTIME, &until);
        int wait = backoff_ms ? backoff_ms : a->cfg.flush_ms;
        until.tv_sec += wait / 1000;
        until.tv_nsec += (long)(wait % 1000) * 1000000L;
        if (until.tv_nsec >= 1000000000L) {
            until.tv_sec++;
            until.tv_nsec -= 1000000000L;
        }
        if (!a->stopping)
            pthread_cond_timedwait(&a->wake, &a->lock, &until);
        bool stop = a->stopping;
        pthread_mutex_unlock(&a->lock);

        int rc;
        while ((rc = send_batch(a, rows, why, sizeof why)) > 0) {}
        if (rc < 0) {
            backoff_ms = backoff_ms ? backoff_ms * 2 : 500;
            if (backoff_ms > 30000) backoff_ms = 30000;
            if (!failing)
                log_msg(NLOG_WARN, "analytics",
                        "ClickHouse is not taking events (%s) - they stay "
                        "in the spool and are sent when it is back", why);
            failing = true;
        } else {
            if (failing)
                log_msg(NLOG_INFO, "analytics",
                        "ClickHouse takes events again; the spool is "
                        "drained");
            failing = false;
            backoff_ms = 0;
        }
        pthread_mutex_lock(&a->lock);
        snprintf(a->last_error, sizeof a->last_error, "%s",
                 failing ? why : "");
        if (stop) break;
    }
    pthread_mutex_unlock(&a->lock);
    ch_rows_free(rows);
    return NULL;
}

/* ---- health ------------------------------------------------------------------- */

void analytics_get_stats(analytics *a, analytics_stats *out) {
    memset(out, 0, sizeof *out);
    out->accepted = atomic_load(&a->accepted);
    out->dropped = atomic_load(&a->dropped);
    out->delivered = atomic_load(&a->delivered);
    pthread_mutex_lock(&a->lock);
    if (a->sp) {
        spool_stats st;
        spool_get_stats(a->sp, &st);
        out->pending = st.pending_count;
        out->corrupt = st.corrupt_records + st.torn_tails + st.quarantined;
    }
    pthread_mutex_unlock(&a->lock);
}

static health_status analytics_check(void *ud, char *message, size_t size,
                                     cJSON **observed) {
    analytics *a = ud;
    analytics_stats st;
    analytics_get_stats(a, &st);
    char last[1200];
    pthread_mutex_lock(&a->lock);
    snprintf(last, sizeof last, "%s", a->last_error);
    pthread_mutex_unlock(&a->lock);

    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "mode", a->cfg.mode == ANALYTICS_LOCAL
                                           ? "local"
                                           : "clickhouse");
    cJSON_AddNumberToObject(o, "accepted", (double)st.accepted);
    cJSON_AddNumberToObject(o, "delivered", (double)st.delivered);
    cJSON_AddNumberToObject(o, "pending", (double)st.pending);
    cJSON_AddNumberToObject(o, "dropped", (double)st.dropped);
    cJSON_AddNumberToObject(o, "corrupt", (double)st.corrupt);
    *observed = o;

    if (a->cfg.mode == ANALYTICS_LOCAL) {
        snprintf(message, size,
                 "ClickHouse disabled: %llu event(s) written to %s%s",
                 (unsigned long long)st.accepted, a->events_file,
                 st.dropped ? " (some dropped)" : "");
        return st.dropped ? HEALTH_DEGRADED : HEALTH_HEALTHY;
    }
    if (st.dropped) {
        snprintf(message, size,
                 "%llu event(s) dropped: the spool is full; %llu pending",
                 (unsigned long long)st.dropped,
                 (unsigned long long)st.pending);
        return HEALTH_DEGRADED;
    }
    if (last[0]) {
        snprintf(message, size, "%llu event(s) spooled, waiting for "
                                "ClickHouse: %s",
                 (unsigned long long)st.pending, last);
        return HEALTH_DEGRADED;
    }
    snprintf(message, size, "%llu event(s) delivered, %llu pending",
             (unsigned long long)st.delivered,
             (unsigned long long)st.pending);
    return HEALTH_HEALTHY;
}

/* ---- start and stop ----------------------------------------------------------- */

static void release(void *ud) {
    analytics *a = ud;
    if (atomic_fetch_sub(&a->refs, 1) != 1) return;
    pthread_mutex_destroy(&a->lock);
    pthread_cond_destroy(&a->wake);
    free(a->spool_dir);
    free(a->events_file);
    free(a);
}


static int make_dir(const char *path, char *err, size_t n) {
    char tmp[4096];
    snprintf(tmp, sizeof tmp, "%s", path);
    for (char *p = tmp + 1; *p; p++) {
        if (*p != '/') continue;
        *p = '\0';
        mkdir(tmp, 0700);
        *p = '/';
    }
    if (mkdir(tmp, 0700) < 0 && errno != EEXIST) {
        snprintf(err, n, "cannot create %s: %s - set NETRA_SPOOL_DIR to a "
                         "writable directory", path, strerror(errno));
        return -1;
    }
    return 0;
}

analytics *analytics_start(const analytics_config *cfg, char *err,
                           size_t err_size) {
    analytics *a = calloc(1, sizeof *a);
    if (!a) {
        snprintf(err, err_size, "out of memory");
        return NULL;
    }
    a->cfg = *cfg;
    atomic_store(&a->refs, 1);
    if (a->cfg.batch_rows <= 0) a->cfg.batch_rows = 10000;
    if (a->cfg.flush_ms <= 0) a->cfg.flush_ms = 200;
    a->spool_dir = cfg->spool_dir ? strdup(cfg->spool_dir) : NULL;
    a->events_file = cfg->events_file ? strdup(cfg->events_file) : NULL;
    pthread_mutex_init(&a->lock, NULL);
    pthread_cond_init(&a->wake, NULL);

    if (cfg->mode == ANALYTICS_LOCAL) {
        char dir[4096], *slash;
        snprintf(dir, sizeof dir, "%s", or_empty(a->events_file));
        slash = strrchr(dir, '/');
        if (!a->events_file || !slash) {
            snprintf(err, err_size, "NETRA_EVENTS_FILE must be an absolute "
                                    "path to a file");
            analytics_stop(a, 0);
            return NULL;
        }
        *slash = '\0';
        if (make_dir(dir, err, err_size) < 0) {
            analytics_stop(a, 0);
            return NULL;
        }
        evlog_options eo = {.dir = dir,
                            .name = slash + 1,
                            .max_bytes = cfg->events_rotate_bytes,
                            .keep = 5,
                            .sync_every = -1};
        if (evlog_open(&eo, &a->ev, err, err_size) != 0) {
            analytics_stop(a, 0);
            return NULL;
        }
    } else {
        if (!a->spool_dir || make_dir(a->spool_dir, err, err_size) < 0) {
            if (!a->spool_dir)
                snprintf(err, err_size, "NETRA_SPOOL_DIR is not set");
            analytics_stop(a, 0);
            return NULL;
        }
        spool_options so = {.dir = a->spool_dir,
                            .max_bytes = cfg->spool_max_bytes,
                            .sync_every = -1};
        if (spool_open(&so, &a->sp, err, err_size) != SPOOL_OK) {
            analytics_stop(a, 0);
            return NULL;
        }
        if (pthread_create(&a->thread, NULL, analytics_main, a)) {
            snprintf(err, err_size, "cannot start the analytics thread");
            analytics_stop(a, 0);
            return NULL;
        }
        a->running = true;
    }

    if (cfg->health) {
        health_spec spec = {.name = "analytics",
                            .type = "component",
                            .measurement = "events",
                            .required = false,
                            .interval_ms = 2000,
                            .timeout_ms = 1000,
                            .check = analytics_check,
                            .ud = a,
                            .ud_free = release};
        char herr[256];
        atomic_fetch_add(&a->refs, 1);
        if (health_register(cfg->health, &spec, herr, sizeof herr) < 0)
            release(a);
    }
    return a;
}

void analytics_stop(analytics *a, int grace_ms) {
    if (!a) return;
    if (a->cfg.health) health_remove(a->cfg.health, "analytics");
    if (a->running) {
        (void)grace_ms; /* one last send happens before the thread ends */
        pthread_mutex_lock(&a->lock);
        a->stopping = true;
        pthread_cond_signal(&a->wake);
        pthread_mutex_unlock(&a->lock);
        pthread_join(a->thread, NULL);
    }
    pthread_mutex_lock(&a->lock);
    if (a->sp) spool_close(a->sp);
    if (a->ev) evlog_close(a->ev);
    pthread_mutex_unlock(&a->lock);
    pthread_mutex_lock(&a->lock);
    if (a->ch) ch_client_free(a->ch);
    a->sp = NULL;
    a->ev = NULL;
    a->ch = NULL;
    pthread_mutex_unlock(&a->lock);
    release(a);
}
