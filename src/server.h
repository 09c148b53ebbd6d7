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
} server_options;

/* Parses HOST:PORT (or [V6]:PORT) into opts. Returns 0, or -1 with err
 * filled ("NETRA_LISTEN: expected HOST:PORT, got 'x'"). */
int server_parse_listen(const char *text, server_options *opts, char *err,
                        size_t err_size);

/* Creates the server, binds the listener and starts the service thread
 * and the watchdog. Returns NULL with err filled when the address cannot
 * be bound. The listener answers /health/live at once. */
server *server_start(runtime *rt, const server_options *opts, char *err,
                     size_t err_size);

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
