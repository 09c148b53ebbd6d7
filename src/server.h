/* server: the libwebsockets listener that serves /health* over HTTP and
 * /ws over WebSocket, on one address, from one service thread.
 *
 * Threads: server_start, server_stop and server_free belong to the thread
 * that owns the server (main). The service thread runs every lws
 * callback and never blocks. Any thread may read the counters. */
#ifndef NETRA_SERVER_H
#define NETRA_SERVER_H

#include <stdbool.h>
#include <stdint.h>

#include "runtime.h"

typedef struct server server;

typedef struct {
    char host[64];    /* IPv4 or IPv6 literal, or "localhost" */
    int port;         /* 0 picks a free port */
    int stall_ms;     /* watchdog: a loop silent this long has stalled */
    int max_header_bytes;
    size_t max_message_bytes; /* larger WebSocket messages close 1009 */
    size_t max_outbox_bytes;  /* a client with more queued is closed */
    int ping_s;               /* idle seconds before a PING */
    int hangup_s;             /* idle seconds before hanging up */
} server_options;

/* What the WebSocket side of the server hands to the layer above (the
 * bridge). Every callback runs on the service thread and must not block.
 * conn_id is the server's own id for a connection; it is never reused. */
typedef struct {
    void *ud;
    void (*on_open)(void *ud, uint64_t conn_id, const char *user_id);
    void (*on_message)(void *ud, uint64_t conn_id, const char *text,
                       size_t len);
    void (*on_close)(void *ud, uint64_t conn_id);
} server_handler;

/* Who may connect to /ws, as the policy decided. */
typedef struct {
    bool anonymous;        /* no token: user from X-Netra-User (dev_user) */
    bool require_exp;      /* tokens must carry exp */
} server_auth;

/* Parses HOST:PORT (or [V6]:PORT) into opts. Returns 0, or -1 with err
 * filled ("NETRA_LISTEN: expected HOST:PORT, got 'x'"). */
int server_parse_listen(const char *text, server_options *opts, char *err,
                        size_t err_size);

/* Creates the server, binds the listener and starts the service thread
 * and the watchdog. Returns NULL with err filled when the address cannot
 * be bound. The listener answers /health/live at once. */
server *server_start(runtime *rt, const server_options *opts, char *err,
                     size_t err_size);

/* Sets the handler for WebSocket events; call before the server is
 * ready. Any thread. */
void server_set_handler(server *srv, const server_handler *handler);

/* Sets who may connect (see server_auth). Any thread. */
void server_set_auth(server *srv, const server_auth *auth);

/* Queues a text message for a connection; takes `text` (malloc'd, len
 * bytes). Returns 0, or -1 if the connection is gone or closing (text is
 * freed). Any thread; wakes the service thread. */
int server_send(server *srv, uint64_t conn_id, char *text, size_t len);

/* Sends to every open connection (e.g. notifications/tools/list_changed).
 * Any thread. */
void server_broadcast(server *srv, const char *text);

/* Closes a connection with a WebSocket close code and reason. Any
 * thread. */
void server_close(server *srv, uint64_t conn_id, int code,
                  const char *reason);

/* Stops accepting new WebSocket clients and closes every open one with
 * 1001; returns at once (server_stop waits). Any thread. */
void server_begin_close(server *srv);

/* The port actually bound (useful with port 0). */
int server_port(const server *srv);

/* Closes every client with 1001 (waiting up to grace_ms for them to go),
 * stops the service thread and the watchdog. Idempotent. */
void server_stop(server *srv, int grace_ms);

/* Stops if needed and frees the server. */
void server_free(server *srv);

/* Unix ms of the last service loop turn. */
int64_t server_last_turn_ms(const server *srv);

/* Open WebSocket connections. */
int server_connections(const server *srv);

/* The health check of the agent_websocket_bridge component: the listener
 * accepts a TCP connection and the service loop turned recently. `ud` is
 * the server. Runs on a checker thread. */
health_status server_bridge_check(void *ud, char *message, size_t size,
                                  cJSON **observed);

/* Registers (or re-registers with the given schedule) the bridge
 * component. Returns 0 or -1 with err filled. */
int server_register_bridge(server *srv, const health_spec *schedule,
                           char *err, size_t err_size);

/* Unix time in ms (CLOCK_REALTIME). */
int64_t server_now_ms(void);

#endif
