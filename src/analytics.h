/* analytics: tool calls and agent events, kept for ClickHouse.
 *
 * Every accepted event is first written to the spool (a write-ahead log
 * under NETRA_SPOOL_DIR) by the thread that reports it, so a kill -9 loses
 * nothing accepted; the analytics thread then sends the spool, oldest
 * first and in batches, to the tables netra_tool_calls and
 * netra_agent_events (created if missing), and acknowledges what
 * ClickHouse took. While ClickHouse is unreachable or failing the spool
 * grows, up to NETRA_SPOOL_MAX_BYTES; past that, new events are dropped,
 * counted, logged once a minute and shown in the `analytics` component.
 * Rows carry an event_id and the tables are ReplacingMergeTree, so a batch
 * sent twice (a crash between insert and acknowledgement) collapses:
 * `SELECT count() FROM netra_tool_calls FINAL` equals the accepted calls.
 *
 * When ClickHouse is disabled by the policy, events go to a rotating
 * JSON-lines file instead (NETRA_EVENTS_FILE) and nothing is replayed.
 *
 * Threads: analytics_tool_call and analytics_agent_event may be called
 * from any thread and never wait for ClickHouse. */
#ifndef NETRA_ANALYTICS_H
#define NETRA_ANALYTICS_H

#include <stdint.h>

#include <cJSON.h>

#include "clickhouse.h"
#include "disp.h"
#include "health.h"

typedef struct analytics analytics;

typedef enum {
    ANALYTICS_CLICKHOUSE = 0, /* spool, then ClickHouse */
    ANALYTICS_LOCAL,          /* the JSON-lines file */
} analytics_mode;

typedef struct {
    analytics_mode mode;
    ch_getter clickhouse_get;    /* the CLICKHOUSE_* settings; for
                                    CLICKHOUSE */
    void *clickhouse_get_ud;
    const char *spool_dir;       /* created if missing */
    uint64_t spool_max_bytes;    /* 0: 1 GiB */
    const char *events_file;     /* for LOCAL */
    uint64_t events_rotate_bytes; /* 0: 64 MiB */
    int batch_rows;              /* rows per insert; 0: 10000 */
    int flush_ms;                /* longest wait before sending; 0: 200 */
    health_registry *health;     /* gets the `analytics` component */
} analytics_config;

/* Opens the spool (or the events file) and starts the analytics thread.
 * Returns NULL with err filled (spool locked by another process, a
 * directory that cannot be written, ...). */
analytics *analytics_start(const analytics_config *cfg, char *err,
                           size_t err_size);

/* Accepts one finished tool call. Returns 0 when accepted, -1 when
 * dropped (spool full or unwritable: counted and logged). */
int analytics_tool_call(analytics *a, const disp_call_record *rec);

/* Accepts one agent event (a netra/event object). Same returns. */
int analytics_agent_event(analytics *a, const cJSON *event);

/* The same two, shaped as disp_pool_config callbacks (ud = analytics). */
void analytics_record_call(void *ud, const disp_call_record *rec);
void analytics_record_event(void *ud, const cJSON *event);

/* Counters for the component and for tests. */
typedef struct {
    uint64_t accepted, dropped, delivered, pending, corrupt;
} analytics_stats;
void analytics_get_stats(analytics *a, analytics_stats *out);

/* Tries to send what is pending for up to grace_ms, stops the thread and
 * closes the spool (what was not sent stays there for the next start).
 * NULL is fine. */
void analytics_stop(analytics *a, int grace_ms);

/* The CREATE TABLE statements (for docs and tests). */
extern const char analytics_tool_calls_ddl[];
extern const char analytics_agent_events_ddl[];

#endif
