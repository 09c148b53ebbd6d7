/* runtime: what one netra process shares between its parts: the
 * configuration, the health registry, the server, and the startup phase.
 *
 * Threads: the fields are set before any thread starts, except the phase
 * and the ready flag, which runtime_set_phase guards. */
#ifndef NETRA_RUNTIME_H
#define NETRA_RUNTIME_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#include "config.h"
#include "health.h"

struct server;
struct analytics;
struct disp_registry;
struct reload;

typedef struct runtime {
    config *cfg;             /* owned */
    health_registry *health; /* owned */
    struct server *server;   /* NULL outside `netra serve` */
    bool dry_run;            /* `netra check`: decide, never connect */
    struct analytics *analytics; /* started by the policy, or NULL */

    pthread_mutex_t lock;    /* guards phase and started */
    char phase[32];          /* "starting", "policy", ..., "ready" */
    bool started;            /* the policy finished and startup went on */
    bool stopping;

    pthread_mutex_t lua_lock; /* held by whoever runs the policy's state */
    atomic_int pins; /* console sessions holding a generation's policy and
                        pool: reload keeps retired ones while > 0 */

    struct disp_registry *tools; /* what the policy registered (owned;
                                    NULL until the first registration) */
    atomic_int requests;          /* tool calls and agent runs in flight
                                     (runtime_requests_changed) */
    struct {
        int64_t time_ms, instructions, memory_bytes;
    } tool_budget;                /* the policy's default budgets (0:
                                     the sandbox's defaults) */
    struct reload *reload;        /* `netra serve` once started: the
                                     generations (reload.h); else NULL */
} runtime;

/* Returns a runtime owning cfg (already loaded) and a new registry, or
 * NULL when out of memory (cfg is then freed). */
runtime *runtime_new(config *cfg);

/* Frees the registry and config; the server must already be gone. */
void runtime_free(runtime *rt);

/* Sets the phase shown by /health and /health/ready. Can't fail. */
void runtime_set_phase(runtime *rt, const char *phase);

/* Copies the phase into out. */
void runtime_phase(runtime *rt, char *out, size_t size);

/* Marks startup finished (ready once required components are healthy)
 * or the process as stopping (never ready again). */
void runtime_set_started(runtime *rt);
void runtime_set_stopping(runtime *rt);

/* True when startup finished, the process is not stopping, and every
 * required component is healthy. */
bool runtime_ready(runtime *rt);

/* Adds delta to rt->requests; the signature fits disp_pool_config's
 * requests_changed (ud is the runtime). Any thread. */
void runtime_requests_changed(void *rt, int delta);

#endif
