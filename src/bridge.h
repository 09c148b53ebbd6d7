/* bridge: one agent bridge per WebSocket connection. It speaks JSON-RPC
 * 2.0 in the form MCP clients use (initialize, ping, tools/list,
 * tools/call, notifications/cancelled) plus netra's agents/list,
 * agents/run and agents/cancel, hands calls to request-scoped
 * dispatchers, and sends each request's events only to the connection
 * that made it.
 *
 * Threads: bridge_new and bridge_free on the main thread; the server's
 * handler callbacks on the service thread; dispatcher sinks on workers.
 * Shared state is behind one mutex held only briefly. */
#ifndef NETRA_BRIDGE_H
#define NETRA_BRIDGE_H

#include "disp.h"
#include "runtime.h"
#include "server.h"

typedef struct bridge bridge;

/* Creates the bridge and installs it as the server's handler. Returns
 * NULL when out of memory. */
bridge *bridge_new(runtime *rt, server *srv);

/* Sets the dispatcher pool and registry that new requests use (the
 * bridge takes a registry reference; the pool stays the caller's).
 * Requests already running finish where they started. Returns once no
 * request is still on its way into the previous pool, so that from then
 * on disp_pool_in_flight(previous) reaching 0 means the previous pool
 * may be freed. Any thread but the server's service thread. */
void bridge_set_dispatcher(bridge *b, disp_pool *pool, disp_registry *reg);

/* Cancels every request of every connection (shutdown). Any thread. */
void bridge_cancel_all(bridge *b, const char *reason);

/* Requests (tool calls and agent runs) in flight, and agent runs alone. */
int bridge_in_flight(bridge *b);
int bridge_runs(bridge *b);

/* Frees the bridge; the server must be stopped and the requests done. */
void bridge_free(bridge *b);

/* The protocol versions answered by initialize, newest first. */
extern const char *const bridge_protocol_versions[];

#endif
