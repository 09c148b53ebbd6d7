/* disp: the dispatcher. Three things live here:
 *
 *  - the registry: the tools and agents the policy registered, each
 *    validated (definition, JSON Schemas compiled) and immutable after
 *    loading; shared by every worker; refcounted so that a reload can
 *    build a new generation while calls finish on the old one;
 *  - the pool: NETRA_WORKERS threads, each owning a sandbox (its own Lua
 *    state with every tool and agent loaded) and a curl multi handle;
 *    every request is a coroutine in one worker; a request waiting on
 *    I/O (ctx.clickhouse) does not hold its worker;
 *  - the request-scoped dispatcher (`disp`): made only from a validated
 *    user context, it runs one tool call or one agent run and sends its
 *    events, progress and result to that request's sink only.
 *
 * Threads: registry functions may be called from any thread once loaded
 * (loading belongs to one thread). disp_new, disp_call_tool,
 * disp_run_agent, disp_cancel and disp_release may be called from any
 * thread; sink callbacks run on worker threads. */
#ifndef NETRA_DISP_H
#define NETRA_DISP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <cJSON.h>

#include "clickhouse.h"
#include "context.h"

/* JSON-RPC error codes the dispatcher answers with. */
#define DISP_BAD_PARAMS (-32602) /* unknown tool or agent, bad params */
#define DISP_BUSY (-32000)       /* queue full or per-user cap reached */

/* The default result size limit (NETRA_MAX_RESULT_BYTES): 4 MiB. */
#define DISP_MAX_RESULT_DEFAULT ((int64_t)4 << 20)

/* What a tool's ctx.clickhouse:query may bring back: 64 MiB of response
 * text (the rows as Lua tables take more). */
#define DISP_CH_MAX_RESPONSE ((int64_t)64 << 20)

/* ---- registry ------------------------------------------------------------ */

typedef struct disp_registry disp_registry;

/* A new, empty registry whose tools and agents live under lua_dir (the
 * directory holding netra/). NULL when out of memory. */
disp_registry *disp_registry_new(const char *lua_dir);
disp_registry *disp_registry_ref(disp_registry *reg);
void disp_registry_unref(disp_registry *reg);

/* Loads and validates a tool file (lua/netra/tools/x.lua): its definition,
 * its input and output schemas (unsupported keywords refused), a name not
 * already registered. Returns 0, or -1 with err "path: reason". */
int disp_registry_add_tool(disp_registry *reg, const char *path, char *err,
                           size_t err_size);

/* The same for an agent file (lua/netra/agents/x.lua: name, description,
 * optional inputSchema, run(ctx, input)). */
int disp_registry_add_agent(disp_registry *reg, const char *path, char *err,
                            size_t err_size);

/* tools/list's `tools` array and agents/list's `agents` array (new cJSON
 * values, caller frees). */
cJSON *disp_registry_tools_json(disp_registry *reg);
cJSON *disp_registry_agents_json(disp_registry *reg);

bool disp_registry_has_tool(disp_registry *reg, const char *name);
bool disp_registry_has_agent(disp_registry *reg, const char *name);

/* ---- pool --------------------------------------------------------------------- */

typedef struct disp_pool disp_pool;

/* One finished tool call, for analytics (the pool calls `record` on a
 * worker thread; it must not block). */
typedef struct {
    const char *event_id;   /* unique per call */
    const char *user_id, *thread_id, *run_id, *request_id;
    const char *tool_name, *tool_call_id, *agent_name; /* agent may be NULL */
    const char *status;     /* "ok", "error", "budget", "cancelled" */
    const char *error;      /* NULL when ok */
    int64_t started_ms;     /* Unix ms */
    double duration_ms;
    const char *arguments;  /* JSON text, secrets redacted */
} disp_call_record;

typedef struct {
    int workers;               /* 0: number of cores */
    int queue_max;             /* per worker; 0: 256 */
    int max_inflight_per_user; /* 0: 16 */
    int64_t time_ms, instructions, memory_bytes; /* default budgets */
    int64_t max_result_bytes;   /* a tool's result as JSON text, and an
                                   agent's final result; 0:
                                   DISP_MAX_RESULT_DEFAULT */
    const char *clickhouse_url; /* ctx.clickhouse target, NULL: not
                                   connected (settings as clickhouse.h) */
    ch_getter clickhouse_get;   /* used instead when clickhouse_url is
                                   NULL: CLICKHOUSE_* settings */
    void *clickhouse_get_ud;
    bool timer_hook;            /* budgets by timer signal, not a count
                                   hook (sandbox.h SBX_HOOK_TIMER) */
    void *counter_ud;           /* requests_changed(+1/-1) as requests
                                   start and end (e.g. a runtime gauge) */
    void (*requests_changed)(void *ud, int delta);
    void *record_ud;
    void (*record)(void *ud, const disp_call_record *rec);
    /* Each event of an agent run, before it goes to the sink (worker
     * thread; must not block or keep the event). */
    void (*record_event)(void *ud, const cJSON *event);
} disp_pool_config;

/* Starts the workers, each loading every tool and agent of reg. Returns
 * NULL with err filled when a worker cannot start or load. */
disp_pool *disp_pool_new(disp_registry *reg, const disp_pool_config *cfg,
                         char *err, size_t err_size);

/* Cancels what is in flight (runs end with agent_error, cancelled), waits
 * for the workers and frees the pool. */
void disp_pool_free(disp_pool *pool);

/* Requests (tool calls and agent runs) in flight now. */
int disp_pool_in_flight(disp_pool *pool);

/* ---- request-scoped dispatcher -------------------------------------------- */

/* Where one request's output goes. Every callback runs on a worker thread
 * and takes ownership of the cJSON it is given. Events arrive in order,
 * and `done` comes last, exactly once: for a tool call with the
 * CallToolResult (after the tool_completed event), for an agent run with
 * NULL (after its agent_completed or agent_error event). */
typedef struct {
    void *ud;
    void (*event)(void *ud, cJSON *event);       /* netra/event params */
    void (*progress)(void *ud, cJSON *params);   /* notifications/progress */
    void (*done)(void *ud, cJSON *result);       /* CallToolResult, or the
                                                    agent's final event */
} disp_sink;

typedef struct disp disp;

/* Makes a dispatcher for one request. ctx NULL fails with err beginning
 * "GLOBAL STATE USAGE:". Takes a reference on ctx. */
disp *disp_new(disp_pool *pool, netra_ctx *ctx, const disp_sink *sink,
               char *err, size_t err_size);

/* Queues a tools/call. Returns 0, or -1 with *code (DISP_BAD_PARAMS for
 * an unknown tool, DISP_BUSY) and err filled; the sink is then never
 * called. Invalid arguments are not an error here: the result says so
 * (isError, the failing path). progress_token may be NULL. Takes args. */
int disp_call_tool(disp *d, const char *tool, cJSON *args,
                   const cJSON *progress_token, int *code, char *err,
                   size_t err_size);

/* Queues an agents/run with this dispatcher's run id. Same returns. */
int disp_run_agent(disp *d, const char *agent, cJSON *input, int *code,
                   char *err, size_t err_size);

/* Asks the request to stop; it ends with a cancelled error (agents:
 * agent_error). Any thread; no-op when finished. */
void disp_cancel(disp *d, const char *reason);

/* Gives the dispatcher up: it is freed once its request has finished (at
 * once if it never started). Using it afterwards is a programming error
 * that the Lua binding reports, not a crash. */
void disp_release(disp *d);

#endif
