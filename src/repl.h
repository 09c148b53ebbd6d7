/* repl: one operator session in a Lua state: chunks evaluated the way
 * lua.c does (bare expressions print, "<eof>" means more input), values
 * printed readably, the helpers of netra.repl (lua/netra/repl.lua), tab
 * completion, and optional budgets for evaluations.
 *
 * A session either borrows the policy's state (`netra repl`: the policy
 * was applied there) or makes a state of its own bound to the runtime
 * (the control socket of `netra serve`), which reaches the policy's state
 * only through components() and query(), under rt->lua_lock.
 *
 * Threads: a session belongs to the thread that made it. */
#ifndef NETRA_REPL_H
#define NETRA_REPL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "policy.h"
#include "runtime.h"

struct disp_pool;

typedef struct repl repl;

typedef enum {
    REPL_OK = 0,       /* ran; text holds printed output and results */
    REPL_INCOMPLETE,   /* the chunk needs more lines */
    REPL_ERROR,        /* text holds output so far and the error */
} repl_status;

/* Re-runs the policy or reloads the server; 0, or -1 with err filled. */
typedef int (*repl_reload_fn)(void *ud, char *err, size_t err_size);

typedef struct {
    runtime *rt;
    policy *policy;     /* whose state answers components() and query();
                           may be NULL (the helpers then say so) */
    bool own_state;     /* true: a state of our own; false: borrow the
                           policy's state (policy must be set) */
    bool bounded;       /* evaluations get the gating table's tool budget
                           (instructions and time) */
    const char *who;    /* names the operator in log lines ("uid=1000") */
    const char *tag;    /* log component: "repl" or "console" */
    repl_reload_fn reload; /* NULL: reload() re-runs the policy file in
                              this state */
    void *reload_ud;
} repl_options;

/* Makes a session. Returns NULL with err filled when the Lua side cannot
 * load (lua/netra/repl.lua missing or broken). */
repl *repl_new(const repl_options *opts, char *err, size_t err_size);

/* Sets the dispatcher pool dispatch_as() goes through (NULL: none).
 * The pool must outlive the session. */
void repl_set_pool(repl *r, struct disp_pool *pool);

/* Evaluates one chunk. *text gets a malloc'd string (caller frees) or
 * NULL when there is nothing to show. Can't fail otherwise. */
repl_status repl_eval(repl *r, const char *chunk, char **text);

/* Completion candidates for the word that ends `line` (whole words,
 * dotted path included). Returns a malloc'd NULL-terminated array of
 * malloc'd strings (free with repl_free_list), or NULL when none. */
char **repl_complete(repl *r, const char *line);
void repl_free_list(char **list);

/* The budget evaluations run under (0 when unbounded). */
void repl_budget(const repl *r, int64_t *time_ms, int64_t *instructions);

/* Frees the session (and its state when it is its own). */
void repl_free(repl *r);

/* Reads the gating row of the runtime's environment: whether the
 * console opens (`console`, NETRA_CONSOLE overriding) and the tool
 * budget. Returns 0, or -1 with err filled. */
int repl_gating(runtime *rt, bool *console, int64_t *time_ms,
                int64_t *instructions, char *err, size_t err_size);

#endif
