/* reload: the generations of a running server and hot reload.
 *
 * A generation is what one run of the policy made: the policy's Lua state,
 * the registry of tools and agents it registered, and the dispatcher pool
 * made from them. A reload (SIGHUP, or reload() from an attached REPL)
 * runs the policy again in a fresh state into a fresh registry, makes a
 * fresh pool, and hands it to the bridge; connections stay open. Requests
 * already running finish on the generation they started in, which is
 * retired and freed once none is left (reload_collect). When the tools
 * changed (names or definitions), every client gets
 * notifications/tools/list_changed. A reload whose policy, tools or pool
 * fail changes nothing: the old generation keeps serving and the error
 * (with file and line) is logged and returned to whoever asked.
 *
 * Threads: reload_new, reload_collect and reload_free on the main thread;
 * netra_reload on any thread except the server's service thread and the
 * dispatcher's workers (reloads are serialised; one waits for another). */
#ifndef NETRA_RELOAD_H
#define NETRA_RELOAD_H

#include <stddef.h>

#include "bridge.h"
#include "disp.h"
#include "policy.h"
#include "runtime.h"

typedef struct reload reload;

/* Makes a pool for reg with the dispatcher settings (NETRA_WORKERS,
 * NETRA_MAX_INFLIGHT_PER_USER, NETRA_QUEUE_MAX), rt->tool_budget,
 * ClickHouse for tools unless the clickhouse component is disabled, and
 * call records going to rt->analytics when it runs.
 * Returns NULL with err filled. Main thread or the reloading thread. */
disp_pool *reload_pool_new(runtime *rt, disp_registry *reg, char *err,
                           size_t err_size);

/* Takes over the first generation: the policy that startup ran (p) and
 * the pool made from rt->tools, already given to b. Sets rt->reload.
 * Returns NULL when out of memory (nothing is taken then). */
reload *reload_new(runtime *rt, bridge *b, policy *p, disp_pool *pool);

/* Reloads (see above). Returns 0, or -1 with err filled ("policy
 * lua/netra/policy.lua failed: lua/netra/tools/x.lua:3: ...") and the
 * old generation still serving; also -1 when rt is not a started server
 * or is stopping. The outcome is logged either way. */
int netra_reload(runtime *rt, char *err, size_t err_size);

/* Frees retired generations whose requests have all finished. Call it
 * every turn of the main loop. Returns how many are still retiring. */
int reload_collect(reload *r);

/* The number of the generation now serving (1 after startup) and of
 * reloads that succeeded and failed. Any thread. */
void reload_counts(reload *r, unsigned long *generation,
                   unsigned long *failed);

/* The policy of the generation now serving, for a caller about to run
 * Lua in it: hold rt->lua_lock from before this call until done (a
 * reload replaces it under that lock). */
policy *reload_current_policy(runtime *rt);

/* The pool of the generation serving now, or NULL before the first. */
disp_pool *reload_current_pool(runtime *rt);

/* Reloads for `who` (named in the log: "SIGHUP", "operator uid=1000"):
 * netra_reload, or -1 with err when the server is not ready yet. */
int reload_request(runtime *rt, const char *who, char *err, size_t err_size);

/* At shutdown, after bridge_set_dispatcher(b, NULL, NULL) and
 * health_stop, and before rt->analytics goes (the pools record into it):
 * frees every pool (cancelling what still runs) and closes every policy
 * state (Lua checks still registered from them then report their state
 * gone). Clears rt->reload. */
void reload_free(reload *r);

#endif
