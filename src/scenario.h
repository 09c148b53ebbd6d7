/* scenario: `netra run SCRIPT [ARGS]`, the host of scenario scripts, and
 * `netra.scenario.core`, the C half of the Lua module `netra.scenario`
 * (lua/netra/scenario.lua; doc/scenarios.md has the API):
 *
 *   start(env, settings, unset) -> runtime | nil, err   (serve.h, in process)
 *     settings win as flags; the names in `unset` are removed from the
 *     process environment first (unsetenv: call it before other threads
 *     of the run read the environment, i.e. before the first start)
 *     rt:port(), rt:state() -> "starting"|"ready"|"refused"[, why],
 *     rt:setting(key), rt:stop()
 *   log_to(path | nil)          runtime log lines to a file, or stderr
 *   http_get(port, path, headers, timeout_ms)
 *                               -> status, body, headers | nil, err
 *   ws_connect(port, path, headers, timeout_ms)
 *                               -> ws | nil, err, http_status (wsclient.h)
 *     ws:send(text), ws:recv(timeout_ms), ws:close(code), ws:is_open()
 *   jwt_sign(secret, user, ttl_s) -> token | nil, err
 *   json_encode(v), json_decode(text), sleep(ms), now_ms(), mkdtemp(prefix)
 *
 * Every address is 127.0.0.1: scenarios reach only what they started.
 *
 * Threads: the main thread; runtimes run their own threads inside. */
#ifndef NETRA_SCENARIO_H
#define NETRA_SCENARIO_H

#include <lua.h>

/* Runs the scenario script argv[0] with arg = {[0] = script, argv[1..]}
 * in a fresh Lua state with the standard libraries, `netra` (bound to a
 * runtime made from the process environment) and `netra.scenario`.
 * Prints TAP on stdout. Returns the exit code: 0 when every assertion
 * held and the script did not raise, 1 otherwise, 2 for a usage error. */
int scenario_main(int argc, char **argv);

/* Pushes the `netra.scenario.core` table. Returns 1. */
int scenario_open_core(lua_State *L);

#endif
