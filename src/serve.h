/* serve: one runtime serving on its listener, as `netra serve` runs it:
 * the server and its bridge, the health checker, the startup policy on a
 * thread of its own, the worker pool once the policy has finished, and
 * the orderly stop (readiness off, drain, grace, cancel, 1001).
 *
 * `netra run` scenarios start runtimes in process through this part.
 * TODO: cmd_serve in main.c still has its own copy of these steps, and
 * more: the control socket (console) and SIGHUP reload generations,
 * which in-process runtimes do not have yet. cmd_serve can become
 * serve_start + a signal loop + serve_stop once serve grows those.
 *
 * Threads: serve_start and serve_stop belong to one owning thread; the
 * getters may be called from any thread. */
#ifndef NETRA_SERVE_H
#define NETRA_SERVE_H

#include <stddef.h>

#include "config.h"
#include "runtime.h"

typedef struct serve serve;

typedef enum {
    SERVE_STARTING = 0, /* listening; the policy or the pool is underway */
    SERVE_READY,        /* the pool runs and /ws accepts clients */
    SERVE_REFUSED,      /* the policy refused or failed; see serve_state */
} serve_state;

/* Starts a runtime on cfg (loaded with config_load; taken in every case,
 * freed on failure): binds NETRA_LISTEN (default 127.0.0.1:8080), starts
 * the service thread, the bridge and the health checker, and runs the
 * policy on a thread of its own, which then starts the worker pool and
 * marks the runtime ready. Returns at once after binding; NULL with err
 * filled when a setting is malformed or the address cannot be bound. */
serve *serve_start(config *cfg, char *err, size_t err_size);

/* The current state; when SERVE_REFUSED, copies why startup was refused
 * into why (may be NULL). Any thread. */
serve_state serve_get_state(serve *s, char *why, size_t why_size);

/* The port the listener bound, and the runtime (owned by s). */
int serve_port(const serve *s);
runtime *serve_runtime(serve *s);

/* The policy and the worker pool once SERVE_READY (NULL before). */
struct policy *serve_policy(serve *s);
struct disp_pool *serve_pool(serve *s);

/* Stops as on SIGTERM: readiness 503, every client 1001 once the runs in
 * flight ended within NETRA_SHUTDOWN_GRACE_MS (then cancelled), and
 * frees everything. Waits for the policy thread when it is still running
 * (a long connection retry). NULL is a no-op. Owning thread only. */
void serve_stop(serve *s);

#endif
