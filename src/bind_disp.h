/* bind_disp: the Lua face of the dispatcher, `netra.dispatcher`:
 *
 *   register_tool(path), register_agent(path)  -> true | nil, err
 *       into the runtime's registry (rt->tools; the policy's way in)
 *   list() -> {tools = {...}, agents = {...}}   what is registered there
 *   start{workers, tools = {paths}, agents = {paths}, clickhouse_url,
 *         max_inflight_per_user, queue_max, time_ms, instructions,
 *         memory_bytes, timer_hook}             -> true | nil, err
 *       a registry and pool of the module's own, for specs and the REPL
 *   stop()                                       frees that pool
 *   new{user_id, thread_id?, run_id?}            -> a dispatcher object:
 *       d:call(tool, args)  -> CallToolResult table, events
 *                              (nil, message, code when refused)
 *       d:run(agent, input) -> final event, events
 *       d:cancel_after(ms)  (tests) cancels the next request ms after
 *                           it was queued
 *       d:release()
 *
 * new() without a table raises the GLOBAL STATE USAGE error; using a
 * released dispatcher raises "dispatcher released: ...".
 *
 * Threads: calls block the calling Lua thread until the request is done;
 * the pool's workers run the tools. One started pool per process. */
#ifndef NETRA_BIND_DISP_H
#define NETRA_BIND_DISP_H

#include <lua.h>

#include "runtime.h"

/* Pushes the `dispatcher` table bound to rt. Returns 1. */
int bind_disp(lua_State *L, runtime *rt);

#endif
