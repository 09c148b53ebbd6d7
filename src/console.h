/* console: the control socket of `netra serve` (netra-<port>.sock in
 * NETRA_RUN_DIR) that `netra repl --attach` connects to, and the client
 * side of it.
 *
 * The protocol is one JSON object per line. The server greets with
 * {"hello":"netra","version","environment","pid"}; the client sends
 * {"op":"eval","chunk":...} or {"op":"complete","line":...}; the server
 * answers {"status":"ok"|"error"|"incomplete","text":...} or
 * {"matches":[...]}.
 *
 * Threads: the server side runs one console thread that accepts one
 * connection at a time and evaluates in a Lua state of its own per
 * connection, under the gating table's tool budget; the service thread is
 * never involved. console_start and console_stop belong to main; the
 * setters may be called from any thread. The client side belongs to its
 * caller's thread. */
#ifndef NETRA_CONSOLE_H
#define NETRA_CONSOLE_H

#include <stddef.h>

#include "policy.h"
#include "repl.h"
#include "runtime.h"

struct disp_pool;

typedef struct console console;

/* Opens the control socket for the server on `port` when the gating
 * table's `console` field (or NETRA_CONSOLE) allows it, and starts the
 * console thread. Returns NULL when the console stays off; the reason is
 * logged (off in this environment, a run directory writable by group or
 * others, a socket in use) and serving goes on without it. */
console *console_start(runtime *rt, int port);

/* What later sessions use: the applied policy (components(), query())
 * and the dispatcher pool (dispatch_as). Either may be NULL. */
void console_set_policy(console *c, policy *p);
void console_set_pool(console *c, struct disp_pool *pool);

/* The socket's path. */
const char *console_path(const console *c);

/* Stops the thread (after the evaluation in progress), removes the
 * socket and frees. NULL is ignored. */
void console_stop(console *c);

/* The run directory: NETRA_RUN_DIR, else $XDG_RUNTIME_DIR/netra, else
 * /run/netra. */
void console_run_dir(config *cfg, char *out, size_t size);

/* Finds the netra-*.sock files in dir. Returns how many; when exactly
 * one, its path is in out. `list` gets one path per line (all of them). */
int console_find(const char *dir, char *out, size_t size, char *list,
                 size_t list_size);

/* ---- client --------------------------------------------------------------- */

typedef struct console_client console_client;

/* Connects and reads the greeting (copied to hello, a short text).
 * Returns NULL with err filled. */
console_client *console_connect(const char *path, char *hello,
                                 size_t hello_size, char *err,
                                 size_t err_size);

/* Evaluates a chunk in the server (as repl_eval). A broken connection is
 * an error with the reason in *text. */
repl_status console_eval(console_client *cc, const char *chunk, char **text);

/* Completion candidates from the server (as repl_complete). */
char **console_complete(console_client *cc, const char *line);

void console_close(console_client *cc);

#endif
