/* reload: the one entry point for reloading a running server, asked by
 * SIGHUP or by reload() from an attached REPL. The reload itself (the
 * policy re-run into fresh Lua states, the tool registry swapped,
 * notifications/tools/list_changed) is not written yet; this is the hook
 * it will fill.
 *
 * Threads: any thread. */
#ifndef NETRA_RELOAD_H
#define NETRA_RELOAD_H

#include <stddef.h>

#include "runtime.h"

/* Reloads the server for `who` (named in the log: "SIGHUP", "operator
 * uid=1000"). Returns 0, or -1 with err saying why nothing changed (the
 * old generation keeps serving). */
int reload_request(runtime *rt, const char *who, char *err, size_t err_size);

#endif
