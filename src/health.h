/* health: the registry of components, their statuses and checks, the
 * aggregation into one overall status, and its renderings as
 * application/health+json.
 *
 * Threads: every function may be called from any thread; the registry
 * holds one mutex, never across a running check. Checks run on the
 * checker thread (health_start), each run on a short-lived thread of its
 * own so that a check that hangs costs its timeout and nothing more. */
#ifndef NETRA_HEALTH_H
#define NETRA_HEALTH_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <cJSON.h>

typedef enum {
    HEALTH_STARTING = 0, /* no result yet */
    HEALTH_HEALTHY,
    HEALTH_DEGRADED,
    HEALTH_UNHEALTHY,
    HEALTH_UNKNOWN, /* the last result is older than the maximum age */
    HEALTH_DISABLED, /* turned off by policy; never degrades the whole */
} health_status;

/* "starting", "healthy", ... Can't fail (unknown values give "unknown"). */
const char *health_status_name(health_status status);

/* Parses a status name; false on anything else. */
bool health_status_parse(const char *name, health_status *out);

/* health+json's word for a status: pass, warn or fail. */
const char *health_status_word(health_status status);

/* A check: fills message (and may set *observed to a new cJSON value that
 * the registry takes) and returns the status it saw. It runs on a thread
 * of its own and must bound its own blocking calls; if it outlives its
 * timeout the result is discarded, the run counts as an unhealthy result
 * "check timed out after N ms", and no new run of that component starts
 * until it returns. healthy is a success; degraded, unhealthy and unknown
 * are failures (see fail_after); starting and disabled apply at once. */
typedef health_status (*health_check_fn)(void *ud, char *message,
                                         size_t message_size,
                                         cJSON **observed);

typedef struct {
    const char *name;        /* [a-z0-9_], 1 to 63, unique */
    const char *type;        /* componentType: "datastore", "system", ...;
                                no spaces or quotes; default "component" */
    const char *measurement; /* key suffix in checks; [A-Za-z0-9_.-];
                                default "status" */
    const char *unit;        /* observedUnit, or NULL */
    bool required;
    int interval_ms;   /* between check runs; default 5000 */
    int timeout_ms;    /* a run longer than this fails; default 2000 */
    int max_age_ms;    /* older results read as unknown; default 3x
                          interval + timeout when there is a check, none
                          without one; negative: never */
    int fail_after;    /* consecutive failures before a healthy component
                          turns unhealthy; default 1 */
    int recover_after; /* consecutive successes to turn back; default 1 */
    health_check_fn check; /* may be NULL: status only set by health_set */
    void *ud;
    void (*ud_free)(void *ud); /* called when the component goes away, or
                                  when its last run in flight returns (on
                                  that run's thread); not on a failed
                                  health_register */
} health_spec;

typedef struct health_registry health_registry;

/* Component as seen at one moment (health_get). */
typedef struct {
    char name[64];
    char type[64];
    char message[512];    /* when unknown by age, says how old and what
                             the last result was */
    health_status status; /* after the maximum age is applied */
    bool required;
    int64_t last_check_ms; /* Unix ms of the last result, 0 if none */
    double duration_ms;    /* how long the last check took */
    uint64_t runs;         /* check runs so far */
} health_info;

/* Returns a new empty registry, or NULL when out of memory. */
health_registry *health_new(void);

/* Stops the checker if running and frees everything, calling ud_free.
 * Returns at once even if a check hangs: a run still in flight keeps what
 * it needs alive and releases it (calling ud_free) when it returns. */
void health_free(health_registry *reg);

/* Adds a component (status starting), or replaces the one with that name
 * in place (its ud_free is called; the new one starts over). Returns 0, or
 * -1 with err filled (bad name, type, measurement or negative setting;
 * out of memory) and nothing changed. err may be NULL. */
int health_register(health_registry *reg, const health_spec *spec,
                    char *err, size_t err_size);

/* Removes a component; returns -1 if there is none of that name. */
int health_remove(health_registry *reg, const char *name);

/* Records a result reported directly (not by its check), e.g. by the
 * policy after a connection attempt; takes `observed` (may be NULL) in
 * every case. A direct report applies at once, without the flip
 * thresholds, and resets their counts. disabled also stops the
 * component's checks until another status is set. Returns -1 if the
 * component does not exist or the status is out of range. */
int health_set(health_registry *reg, const char *name, health_status status,
               const char *message, cJSON *observed);

/* Copies a component's current view into *out; -1 if unknown name. */
int health_get(health_registry *reg, const char *name, health_info *out);

/* The overall status: unhealthy if a required component is unhealthy or
 * unknown (or still starting), degraded if an optional one is unhealthy
 * or unknown or any is degraded, healthy otherwise. Disabled components
 * count for nothing. */
health_status health_overall(health_registry *reg);

/* True when every required component is healthy (or degraded). */
bool health_required_ok(health_registry *reg);

/* Starts the checker thread; 0 (also when already running) or -1 with
 * errno (EBUSY while a health_stop is under way). */
int health_start(health_registry *reg);

/* Stops the checker thread and joins it; returns promptly even while a
 * check hangs (runs in flight finish on their own). Can't fail; a no-op
 * when not running. */
void health_stop(health_registry *reg);

/* Runs every component's check once now, in parallel, and returns when
 * each has a result or has timed out (tests and `netra check`). Skips
 * components without a check, disabled ones, and those whose previous
 * run is still out. */
void health_run_all(health_registry *reg);

/* Renders the health+json document: {"status"} alone, or with `detail`
 * also version, releaseId, description, checks and the netra section;
 * environment and phase (may be NULL: JSON null) go into
 * netra.{environment,phase}. Never waits on a check. Returns a new cJSON
 * object the caller frees, or NULL when out of memory. */
cJSON *health_render(health_registry *reg, bool detail,
                     const char *environment, const char *phase);

/* Renders one component as health+json (status, checks for it, and under
 * netra the component's fields when detail). Returns NULL if unknown. */
cJSON *health_render_component(health_registry *reg, const char *name,
                               bool detail);

/* Names of all components, in registration order, as a cJSON array. */
cJSON *health_names(health_registry *reg);

#endif
