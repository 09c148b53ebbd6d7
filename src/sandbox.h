/* sandbox: the Lua state a worker owns, the tool environment inside it,
 * and requests that run tool handlers as coroutines under budgets.
 *
 * Threads: a sandbox and everything made from it (requests, the lua_State
 * and its coroutines) belong to the one thread that created it. No
 * function here may be called for a sandbox from any other thread. The
 * only exception is internal: in SBX_HOOK_TIMER mode a POSIX timer sends
 * a signal to the owning thread, whose handler arms a hook (as lua.c does
 * for Ctrl-C).
 *
 * Memory: every allocation of the state goes through a counting
 * allocator. A request's memory is approximated by the net growth of the
 * state's bytes while that request runs (never below zero): garbage of
 * other requests that the collector frees during its run is credited to
 * it, and its own garbage freed later is credited to whoever runs then.
 * A hard cap for the whole state (config.state_memory_bytes) sits on top:
 * it bounds what many requests waiting at once (each within its own
 * budget) can hold together; past it, the request that allocates fails.
 */
#ifndef NETRA_SANDBOX_H
#define NETRA_SANDBOX_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <signal.h>
#include <stdatomic.h>

#include <cJSON.h>
#include <lua.h>

typedef struct sbx sbx;
typedef struct sbx_request sbx_request;

/* A budget value of 0 means "not set here: inherit" and SBX_UNLIMITED
 * turns the budget off. */
#define SBX_UNLIMITED (-1)

/* Instructions between two hook calls (the instruction budget is counted
 * in steps of this size). */
#define SBX_HOOK_PERIOD 1000

/* Pattern functions refuse a call whose estimated matching work (see
 * doc/tools.md) is above this many steps: about 0.1 s of C time. */
#define SBX_PATTERN_MAX_STEPS (1LL << 25)

/* The most a tool file's `budget` may ask for (registration refuses
 * more): 10 minutes, 10^10 instructions, 1 GiB. The gating table's
 * defaults are the normal values; these only stop absurd ones (which
 * would overflow deadlines or pin a worker for days). */
#define SBX_MAX_TIME_MS 600000LL
#define SBX_MAX_INSTRUCTIONS 10000000000LL
#define SBX_MAX_MEMORY_BYTES (1LL << 30)

/* JSON conversions refuse nesting deeper than this. */
#define SBX_JSON_MAX_DEPTH 100

typedef struct {
    int64_t time_ms;      /* wall-clock from sbx_start */
    int64_t instructions; /* Lua VM instructions, all coroutines */
    int64_t memory_bytes; /* net allocation growth while running */
} sbx_budget;

typedef enum {
    /* A count hook every SBX_HOOK_PERIOD instructions checks all budgets;
     * costs about 2x in tight loops. */
    SBX_HOOK_COUNT = 0,
    /* No hook unless the request has an instruction budget: a timer
     * signal arms one when the time budget runs out, and the allocator
     * arms one when the memory budget is hit. Near zero overhead; uses
     * the real-time signal SBX_TIMER_SIGNAL in this process. */
    SBX_HOOK_TIMER,
} sbx_hook_mode;

#define SBX_TIMER_SIGNAL (SIGRTMIN + 5)

typedef struct {
    const char *lua_dir; /* holds netra/tools/ and netra/lib/; required */
    sbx_budget defaults; /* 0 fields: 2000 ms, 100000000 instructions,
                            64 MiB */
    int64_t state_memory_bytes; /* whole state; 0: 512 MiB */
    sbx_hook_mode hook;
    /* When it becomes true (any thread), every request stops at its next
     * hook with "cancelled: the dispatcher is shutting down". May be
     * NULL; must outlive the sandbox. */
    const atomic_bool *stop;
} sbx_config;

/* What a tool file declared. Strings and cJSON trees are owned by the
 * struct: free with sbx_tool_def_free. */
typedef struct {
    char *name;
    char *description;
    char *path;
    cJSON *input_schema;  /* an object */
    cJSON *output_schema; /* NULL when absent */
    cJSON *annotations;   /* NULL when absent */
    sbx_budget budget;    /* the tool's overrides; 0 fields when absent */
    int handler_ref;      /* the tool's id in its sandbox: stays valid
                             across sbx_rebuild */
} sbx_tool_def;

typedef enum {
    SBX_DONE = 0, /* the handler returned; see sbx_request_results */
    SBX_YIELDED,  /* waiting on I/O (sbx_wait); resume with the result */
    SBX_FAILED,   /* error or budget; see sbx_request_error */
} sbx_status;

typedef enum {
    SBX_STOP_NONE = 0,
    SBX_STOP_ERROR,        /* a Lua error in the handler */
    SBX_STOP_TIME,
    SBX_STOP_INSTRUCTIONS,
    SBX_STOP_MEMORY,
    SBX_STOP_CANCELLED,    /* sbx_cancel, sbx_request_free */
    SBX_STOP_GLOBAL,       /* the tool assigned a global */
} sbx_stop;

/* Pushes values onto L and returns how many. Runs in protected mode
 * (it may raise Lua errors, e.g. out of memory), on the sandbox's main
 * thread; the values are then moved where they belong. */
typedef int (*sbx_push_fn)(lua_State *L, void *ud);

typedef struct {
    sbx_budget budget;      /* 0 fields: the tool's, then the defaults */
    const char *request_id; /* for log lines; may be NULL; copied */
    const char *run_id;     /* may be NULL; copied */
    void *ud;               /* returned by sbx_request_ud */
    /* When *cancel becomes true (any thread), the request stops at its
     * next hook (SBX_STOP_CANCELLED) with the text cancel_reason holds
     * then. Both may be NULL; both must outlive the request. The hook
     * runs while a count hook is set: always in SBX_HOOK_COUNT mode, and
     * in SBX_HOOK_TIMER mode when the request has an instruction budget
     * (else a computing request notices at its time budget). */
    const atomic_bool *cancel;
    const char *cancel_reason;
} sbx_request_opts;

/* Creates a sandbox. Returns NULL and fills err when the config is bad
 * or Lua cannot start. Free with sbx_free. */
sbx *sbx_new(const sbx_config *config, char *err, size_t errsize);

/* Frees the state and every request still alive (their pointers become
 * invalid). NULL is ignored. */
void sbx_free(sbx *s);

/* Loads a tool file (text only) in an environment of its own, runs it
 * under the default budgets and checks the definition it returns. On
 * success fills *out (free with sbx_tool_def_free) and returns 0. On
 * failure returns -1, leaves *out zeroed and writes
 * "<path>: <reason>" to err. */
int sbx_load_tool(sbx *s, const char *path, sbx_tool_def *out, char *err,
                  size_t errsize);

/* The same for an agent file: name, description, optional inputSchema
 * (default {"type": "object"}), optional budget and run(ctx, input),
 * which becomes the handler (handler_ref) that sbx_start runs. */
int sbx_load_agent(sbx *s, const char *path, sbx_tool_def *out, char *err,
                   size_t errsize);

void sbx_tool_def_free(sbx_tool_def *def);

/* For C functions called from Lua inside a request (ctx:call): pushes the
 * handler of handler_ref onto L, a thread of s's state, to be called
 * inline. Returns 0, or -1 (nothing pushed) when the ref is unknown. */
int sbx_push_handler(sbx *s, lua_State *L, int handler_ref);

/* Starts a request: a coroutine that will call the handler of tool
 * handler_ref with the values `push` leaves (push may be NULL: no
 * arguments). tool_name is used in messages (NULL: the tool's own name).
 * Nothing runs until sbx_resume. Returns NULL and fills err when the
 * handler_ref is unknown or push fails. Free with sbx_request_free. */
sbx_request *sbx_start(sbx *s, const char *tool_name, int handler_ref,
                       sbx_push_fn push, void *push_ud,
                       const sbx_request_opts *opts, char *err,
                       size_t errsize);

/* Runs the request until it returns, fails or waits on I/O. For a
 * request that waits (SBX_YIELDED), push supplies the values the waiting
 * call receives (NULL: none). A request past its time budget fails at
 * once without running. Calling it on a DONE or FAILED request returns
 * that status again. */
sbx_status sbx_resume(sbx_request *req, sbx_push_fn push, void *push_ud);

/* Ends a waiting request: it becomes FAILED with "<reason>" (stop reason
 * SBX_STOP_CANCELLED) and its coroutine is reset. No-op when done or
 * failed already. */
void sbx_cancel(sbx_request *req, const char *reason);

/* Releases the request (resetting its coroutine if it never finished).
 * When it was the last one in flight and the state may be damaged (a
 * memory limit was hit), the state is rebuilt. NULL is ignored. */
void sbx_request_free(sbx_request *req);

/* On SBX_DONE: the handler's return values are the top n slots of *L
 * (indexes -n .. -1); returns n. They stay until sbx_request_free.
 * Returns -1 when the request is not done. */
int sbx_request_results(sbx_request *req, lua_State **L);

/* On SBX_FAILED: the message ("tool 'x' exceeded its time budget (2000
 * ms)", "tool 'x' failed: path:line: message", ...). Else NULL. The
 * string lives as long as the request. */
const char *sbx_request_error(const sbx_request *req);
sbx_stop sbx_request_stop(const sbx_request *req);

/* The token given to sbx_wait by the call that is waiting (NULL when not
 * waiting). */
void *sbx_request_wait_token(const sbx_request *req);

/* Monotonic deadline (CLOCK_MONOTONIC, ms) of the time budget, or
 * INT64_MAX; the worker bounds its I/O waits with it. */
int64_t sbx_request_deadline_ms(const sbx_request *req);

void *sbx_request_ud(const sbx_request *req);
const char *sbx_request_tool(const sbx_request *req);
int64_t sbx_request_instructions(const sbx_request *req);
int64_t sbx_request_memory(const sbx_request *req);
int sbx_in_flight(const sbx *s);

/* For C functions called from Lua: the request running now, or NULL. */
sbx_request *sbx_current(lua_State *L);

/* For C functions called from Lua inside a request (e.g. a ClickHouse
 * query): makes the whole request wait, even from inside a coroutine
 * the tool created. Use as `return sbx_wait(L, token, ctx, k);`. The
 * worker sees SBX_YIELDED and sbx_request_wait_token == token; when it
 * resumes the request, k(L, LUA_YIELD, ctx) runs with the pushed values
 * on top of L's stack (k NULL: they become the C function's results).
 * Raises a Lua error outside a request or where Lua cannot yield (inside
 * string.gsub callbacks, table.sort comparators, metamethods called
 * from C). */
int sbx_wait(lua_State *L, void *token, lua_KContext ctx, lua_KFunction k);

/* True when a memory limit was hit since the last rebuild. */
bool sbx_needs_rebuild(const sbx *s);

/* Replaces the Lua state with a fresh one and reloads every tool loaded
 * so far (handler_refs stay valid). Only with no request in flight.
 * Returns 0, or -1 with err filled and the old state kept. */
int sbx_rebuild(sbx *s, char *err, size_t errsize);

/* The main lua_State (for the dispatcher's own setup; do not run tool
 * code on it). */
lua_State *sbx_lua(sbx *s);

/* Converts the Lua value at idx to JSON. Tables whose keys are all
 * positive integers (holes filled with null, at most half holes) become
 * arrays, tables with string keys objects; an empty table becomes {}
 * unless its metatable has __jsontype = "array". Integers within 2^53
 * become numbers, larger ones decimal strings. Refuses (returns NULL,
 * err names the path from `what`, e.g. "result.items[2]") functions,
 * userdata, threads, cycles, mixed or sparse keys, NaN/inf, invalid
 * UTF-8 and nesting past SBX_JSON_MAX_DEPTH. Raw access only: runs no
 * metamethods and raises no Lua error. Caller frees the result. */
cJSON *sbx_table_to_json(lua_State *L, int idx, const char *what, char *err,
                         size_t errsize);

/* Pushes the JSON value as Lua: objects and arrays as tables (an empty
 * array gets the __jsontype = "array" metatable), integral numbers within
 * 2^53 as integers, other numbers as floats, null as nil. May raise a Lua
 * error (memory, stack): call it in protected mode, e.g. from an
 * sbx_push_fn. */
void sbx_push_json(lua_State *L, const cJSON *json);

#endif
