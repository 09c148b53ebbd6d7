/* health: the component registry, its checker thread and the
 * application/health+json renderings (see health.h). */
#include "health.h"

#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "log.h"

#ifndef NETRA_VERSION
#define NETRA_VERSION "0.0.0"
#endif
#ifndef NETRA_RELEASE_ID
#define NETRA_RELEASE_ID NETRA_VERSION
#endif

#define HEALTH_TEXT_MAX 64 /* name, type, measurement, unit: 63 + NUL */
#define HEALTH_MESSAGE_MAX 512
#define HEALTH_NEVER INT64_MAX

#define DEFAULT_INTERVAL_MS 5000
#define DEFAULT_TIMEOUT_MS 2000

/* ud and its destructor, shared by the component and each run in flight:
 * a check that outlives its component still has a live ud. */
typedef struct {
    void *ud;
    void (*ud_free)(void *ud);
    int refs; /* under the registry lock */
} health_ud;

struct health_comp;

/* One run of a check. Owned by the component (while it waits for the
 * result), by the run's thread, and by health_run_all while it waits;
 * all fields after `refs` are under the registry lock, except the result
 * fields, which only the run's thread writes before it sets `done`. */
typedef struct {
    health_registry *reg;
    health_check_fn check;
    health_ud *ud;
    int refs;
    struct health_comp *comp; /* NULL once the component is gone */
    bool done;
    bool timed_out; /* the timeout was recorded; the result is dropped */
    int64_t deadline;

    health_status status;
    char message[HEALTH_MESSAGE_MAX];
    cJSON *observed;
    double duration_ms;
} health_run;

typedef struct health_comp {
    char name[HEALTH_TEXT_MAX];
    char type[HEALTH_TEXT_MAX];
    char measurement[HEALTH_TEXT_MAX];
    char unit[HEALTH_TEXT_MAX]; /* "" when none */
    bool required;
    int interval_ms;
    int timeout_ms;
    int max_age_ms; /* -1: results never expire */
    int fail_after;
    int recover_after;
    health_check_fn check;
    health_ud *ud;

    health_status status; /* as stored, before the maximum age */
    char message[HEALTH_MESSAGE_MAX];
    cJSON *observed;
    bool held_disabled; /* disabled by health_set: checks stop */
    int fails;          /* consecutive failing results */
    int successes;      /* consecutive healthy results */
    int64_t last_mono;  /* monotonic ms of the last result, 0 if none */
    int64_t last_wall;  /* Unix ms of the last result, 0 if none */
    double duration_ms;
    uint64_t runs;
    health_run *run;  /* in flight, or NULL */
    int64_t next_due; /* monotonic ms */
} health_comp;

struct health_registry {
    pthread_mutex_t lock;
    pthread_cond_t wake; /* results, changes and stop; CLOCK_MONOTONIC */
    int refs;            /* 1 for the owner, 1 per run thread alive */
    health_comp **comps;
    size_t ncomps;
    size_t cap;
    pthread_t checker;
    bool checker_on;
    bool stopping;
};

/* A component's status and message as read at one moment. */
typedef struct {
    health_status status;
    char message[HEALTH_MESSAGE_MAX];
} health_view;

/* ---- small helpers ---------------------------------------------------- */

static int64_t mono_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int64_t mono_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

static int64_t wall_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Formats Unix ms as RFC 3339 UTC with milliseconds. */
static void format_rfc3339(int64_t ms, char *out, size_t n) {
    time_t secs = (time_t)(ms / 1000);
    struct tm tm;
    gmtime_r(&secs, &tm);
    size_t len = strftime(out, n, "%Y-%m-%dT%H:%M:%S", &tm);
    snprintf(out + len, n - len, ".%03dZ", (int)(ms % 1000));
}

static bool status_valid(health_status s) {
    return s >= HEALTH_STARTING && s <= HEALTH_DISABLED;
}

static bool status_failing(health_status s) {
    return s == HEALTH_DEGRADED || s == HEALTH_UNHEALTHY || s == HEALTH_UNKNOWN;
}

static const char *const status_names[] = {
    "starting", "healthy", "degraded", "unhealthy", "unknown", "disabled",
};

const char *health_status_name(health_status status) {
    if (!status_valid(status)) return "unknown";
    return status_names[status];
}

bool health_status_parse(const char *name, health_status *out) {
    if (!name) return false;
    for (int i = HEALTH_STARTING; i <= HEALTH_DISABLED; i++) {
        if (!strcmp(name, status_names[i])) {
            *out = (health_status)i;
            return true;
        }
    }
    return false;
}

const char *health_status_word(health_status status) {
    switch (status) {
    case HEALTH_HEALTHY:
    case HEALTH_DISABLED:
        return "pass";
    case HEALTH_DEGRADED:
        return "warn";
    default:
        return "fail";
    }
}

/* ---- reference counts (all under the registry lock) ------------------- */

/* Drops one reference; true when the caller must destroy ud (unlocked). */
static bool ud_unref_locked(health_ud *ud) {
    return ud && --ud->refs == 0;
}

static void ud_destroy(health_ud *ud) {
    if (ud->ud_free) ud->ud_free(ud->ud);
    free(ud);
}

static void run_unref_locked(health_run *run) {
    if (--run->refs > 0) return;
    cJSON_Delete(run->observed);
    free(run);
}

static void reg_destroy(health_registry *reg) {
    pthread_cond_destroy(&reg->wake);
    pthread_mutex_destroy(&reg->lock);
    free(reg->comps);
    free(reg);
}

/* ---- reading a component ---------------------------------------------- */

/* Is the stored result older than the component's maximum age? */
static bool comp_stale(const health_comp *c, int64_t now) {
    if (c->status == HEALTH_STARTING || c->status == HEALTH_DISABLED)
        return false;
    if (c->max_age_ms < 0 || c->last_mono == 0) return false;
    return now - c->last_mono > c->max_age_ms;
}

/* The component's status and message at `now`, maximum age applied. */
static void comp_view(const health_comp *c, int64_t now, health_view *v) {
    if (!comp_stale(c, now)) {
        v->status = c->status;
        snprintf(v->message, sizeof v->message, "%s", c->message);
        return;
    }
    v->status = HEALTH_UNKNOWN;
    int len = snprintf(v->message, sizeof v->message,
                       "no result for %lld ms (maximum age %d ms); last "
                       "was %s: ",
                       (long long)(now - c->last_mono), c->max_age_ms,
                       health_status_name(c->status));
    if (len < 0 || (size_t)len >= sizeof v->message) return;
    size_t room = sizeof v->message - (size_t)len - 1;
    size_t n = strnlen(c->message, room);
    memcpy(v->message + len, c->message, n);
    v->message[(size_t)len + n] = '\0';
}

static health_comp *find_locked(health_registry *reg, const char *name,
                                size_t *index) {
    if (!name) return NULL;
    for (size_t i = 0; i < reg->ncomps; i++) {
        if (!strcmp(reg->comps[i]->name, name)) {
            if (index) *index = i;
            return reg->comps[i];
        }
    }
    return NULL;
}

/* ---- recording results ------------------------------------------------ */

/* Makes `st` the component's stored status, taking `observed`. */
static void comp_store(health_comp *c, health_status st, const char *message,
                       cJSON *observed) {
    if (st != c->status) {
        /* An optional component's trouble is news, not a warning: the
         * policy says once, in its own words, what it means. */
        log_level level = st == HEALTH_HEALTHY || st == HEALTH_DISABLED ||
                                  !c->required
                              ? NLOG_INFO
                              : NLOG_WARN;
        log_msg(level, "Health", "component '%s' %s -> %s%s%s", c->name,
                health_status_name(c->status), health_status_name(st),
                message && *message ? ": " : "", message ? message : "");
    }
    c->status = st;
    snprintf(c->message, sizeof c->message, "%s", message ? message : "");
    cJSON_Delete(c->observed);
    c->observed = observed;
}

/* Records a check's result through the flip thresholds; takes observed.
 * A healthy component turns failing after fail_after failing results in a
 * row, a failing one turns healthy after recover_after healthy results;
 * anything else (the first result, a change between failing statuses,
 * starting or disabled) applies at once. */
static void comp_record(health_comp *c, health_status st, const char *message,
                        cJSON *observed, double duration_ms, int64_t now) {
    if (c->held_disabled) {
        cJSON_Delete(observed);
        return;
    }
    if (!status_valid(st)) {
        st = HEALTH_UNHEALTHY;
        message = "check returned a status that is not one of health_status";
    }

    if (comp_stale(c, now)) {
        health_view v;
        comp_view(c, now, &v);
        comp_store(c, HEALTH_UNKNOWN, v.message, NULL);
        c->fails = 0;
        c->successes = 0;
    }
    c->last_mono = now;
    c->last_wall = wall_ms();
    c->duration_ms = duration_ms;

    bool apply;
    if (c->status == HEALTH_STARTING || c->status == HEALTH_DISABLED ||
        !(st == HEALTH_HEALTHY || status_failing(st))) {
        apply = true;
        c->fails = 0;
        c->successes = 0;
    } else if (st == HEALTH_HEALTHY) {
        c->fails = 0;
        c->successes++;
        apply = c->status == HEALTH_HEALTHY || c->successes >= c->recover_after;
    } else {
        c->successes = 0;
        c->fails++;
        apply = c->status != HEALTH_HEALTHY || c->fails >= c->fail_after;
    }

    if (apply)
        comp_store(c, st, message, observed);
    else
        cJSON_Delete(observed);
}

/* ---- running checks --------------------------------------------------- */

static void *run_main(void *arg) {
    health_run *run = arg;
    health_registry *reg = run->reg;
    cJSON *observed = NULL;

    int64_t t0 = mono_us();
    health_status st =
        run->check(run->ud->ud, run->message, sizeof run->message, &observed);
    double duration_ms = (double)(mono_us() - t0) / 1000.0;

    pthread_mutex_lock(&reg->lock);
    run->message[sizeof run->message - 1] = '\0';
    run->status = st;
    run->observed = observed;
    run->duration_ms = duration_ms;
    run->done = true;
    pthread_cond_broadcast(&reg->wake);
    health_ud *ud = run->ud;
    bool free_ud = ud_unref_locked(ud);
    run_unref_locked(run);
    bool free_reg = --reg->refs == 0;
    pthread_mutex_unlock(&reg->lock);

    if (free_ud) ud_destroy(ud);
    if (free_reg) reg_destroy(reg);
    return NULL;
}

/* Starts a run of c's check on a detached thread; on failure records an
 * unhealthy result instead. */
static void run_start_locked(health_registry *reg, health_comp *c,
                             int64_t now) {
    c->runs++;
    c->next_due = now + c->interval_ms;

    health_run *run = calloc(1, sizeof *run);
    if (!run) {
        comp_record(c, HEALTH_UNHEALTHY,
                    "could not start the check: out of memory", NULL, 0, now);
        return;
    }
    run->reg = reg;
    run->check = c->check;
    run->ud = c->ud;
    run->refs = 2; /* the component and the thread */
    run->comp = c;
    run->deadline = now + c->timeout_ms;

    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_t tid;
    reg->refs++;
    c->ud->refs++;
    int rc = pthread_create(&tid, &attr, run_main, run);
    pthread_attr_destroy(&attr);
    if (rc != 0) {
        reg->refs--;
        c->ud->refs--;
        free(run);
        char msg[HEALTH_MESSAGE_MAX];
        snprintf(msg, sizeof msg, "could not start the check thread: %s",
                 strerror(rc));
        comp_record(c, HEALTH_UNHEALTHY, msg, NULL, 0, now);
        return;
    }
    c->run = run;
}

/* Takes in c's finished run, or records its timeout once it is late. */
static void run_collect_locked(health_comp *c, int64_t now) {
    health_run *run = c->run;
    if (!run) return;

    if (run->done) {
        if (!run->timed_out) {
            comp_record(c, run->status, run->message, run->observed,
                        run->duration_ms, now);
            run->observed = NULL;
        }
        c->run = NULL;
        run->comp = NULL;
        run_unref_locked(run);
        return;
    }

    if (!run->timed_out && now >= run->deadline) {
        char msg[64];
        snprintf(msg, sizeof msg, "check timed out after %d ms", c->timeout_ms);
        run->timed_out = true;
        comp_record(c, HEALTH_UNHEALTHY, msg, NULL, c->timeout_ms, now);
    }
}

static bool comp_checkable(const health_comp *c) {
    return c->check && !c->held_disabled;
}

/* When the checker next has something to do for c (monotonic ms). */
static int64_t comp_next_event(const health_comp *c) {
    if (c->run) return c->run->timed_out ? HEALTH_NEVER : c->run->deadline;
    return comp_checkable(c) ? c->next_due : HEALTH_NEVER;
}

/* Waits on the registry's condvar until `until` (monotonic ms). */
static void wait_until_locked(health_registry *reg, int64_t until) {
    if (until == HEALTH_NEVER) {
        pthread_cond_wait(&reg->wake, &reg->lock);
        return;
    }
    struct timespec ts = {.tv_sec = until / 1000,
                          .tv_nsec = (long)(until % 1000) * 1000000};
    pthread_cond_timedwait(&reg->wake, &reg->lock, &ts);
}

static void *checker_main(void *arg) {
    health_registry *reg = arg;

    pthread_mutex_lock(&reg->lock);
    while (!reg->stopping) {
        int64_t now = mono_ms();
        int64_t next = HEALTH_NEVER;
        for (size_t i = 0; i < reg->ncomps; i++) {
            health_comp *c = reg->comps[i];
            run_collect_locked(c, now);
            if (!c->run && comp_checkable(c) && now >= c->next_due)
                run_start_locked(reg, c, now);
            int64_t t = comp_next_event(c);
            if (t < next) next = t;
        }
        wait_until_locked(reg, next);
    }
    pthread_mutex_unlock(&reg->lock);
    return NULL;
}

/* ---- the registry ----------------------------------------------------- */

health_registry *health_new(void) {
    health_registry *reg = calloc(1, sizeof *reg);
    if (!reg) return NULL;

    pthread_condattr_t attr;
    if (pthread_condattr_init(&attr) != 0) {
        free(reg);
        return NULL;
    }
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    int rc = pthread_cond_init(&reg->wake, &attr);
    pthread_condattr_destroy(&attr);
    if (rc != 0) {
        free(reg);
        return NULL;
    }
    if (pthread_mutex_init(&reg->lock, NULL) != 0) {
        pthread_cond_destroy(&reg->wake);
        free(reg);
        return NULL;
    }
    reg->refs = 1;
    return reg;
}

/* Cuts c loose from the registry: its run (if any) finishes alone.
 * Returns c's ud when the caller must destroy it after unlocking. */
static health_ud *comp_detach_locked(health_comp *c) {
    if (c->run) {
        c->run->comp = NULL;
        run_unref_locked(c->run);
        c->run = NULL;
    }
    return ud_unref_locked(c->ud) ? c->ud : NULL;
}

static void comp_free(health_comp *c, health_ud *ud) {
    if (ud) ud_destroy(ud);
    cJSON_Delete(c->observed);
    free(c);
}

void health_free(health_registry *reg) {
    if (!reg) return;
    health_stop(reg);

    pthread_mutex_lock(&reg->lock);
    size_t n = reg->ncomps;
    health_comp **comps = reg->comps;
    health_ud **uds = calloc(n ? n : 1, sizeof *uds);
    for (size_t i = 0; i < n; i++) {
        health_ud *ud = comp_detach_locked(comps[i]);
        if (uds)
            uds[i] = ud;
        else if (ud)
            ud->ud_free = NULL; /* out of memory: leak, safely */
    }
    reg->comps = NULL;
    reg->ncomps = 0;
    reg->cap = 0;
    bool last = --reg->refs == 0;
    pthread_mutex_unlock(&reg->lock);

    for (size_t i = 0; i < n; i++)
        comp_free(comps[i], uds ? uds[i] : NULL);
    free(uds);
    free(comps);
    if (last) reg_destroy(reg);
}

static bool name_valid(const char *s) {
    size_t n = s ? strlen(s) : 0;
    if (n < 1 || n >= HEALTH_TEXT_MAX) return false;
    return strspn(s, "abcdefghijklmnopqrstuvwxyz0123456789_") == n;
}

/* componentType: a word ("datastore") or a URI; no spaces or quotes. */
static bool type_valid(const char *s) {
    size_t n = strlen(s);
    if (n < 1 || n >= HEALTH_TEXT_MAX) return false;
    for (size_t i = 0; i < n; i++)
        if (s[i] <= ' ' || s[i] >= 0x7f || s[i] == '"' || s[i] == '\\')
            return false;
    return true;
}

static bool measurement_valid(const char *s) {
    size_t n = strlen(s);
    if (n < 1 || n >= HEALTH_TEXT_MAX) return false;
    return strspn(s, "abcdefghijklmnopqrstuvwxyz"
                     "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.") == n;
}

/* Checks the spec; fills err and returns false when it is not usable. */
static bool spec_valid(const health_spec *spec, char *err, size_t n) {
    if (!spec) {
        snprintf(err, n, "health: no component spec given");
        return false;
    }
    if (!name_valid(spec->name)) {
        snprintf(err, n,
                 "health: component name '%.80s' is not valid - use 1 to 63 "
                 "characters from a-z, 0-9 and _ (e.g. 'clickhouse')",
                 spec->name ? spec->name : "(null)");
        return false;
    }
    if (spec->type && !type_valid(spec->type)) {
        snprintf(err, n,
                 "health: component '%s' has type '%.80s', which is not "
                 "valid - use 1 to 63 printable characters without spaces or "
                 "quotes, e.g. 'datastore', 'system' or 'component'",
                 spec->name, spec->type);
        return false;
    }
    if (spec->measurement && !measurement_valid(spec->measurement)) {
        snprintf(err, n,
                 "health: component '%s' has measurement '%.80s', which is "
                 "not valid - use 1 to 63 characters from A-Z, a-z, 0-9, "
                 "_, - and . (e.g. 'responseTime')",
                 spec->name, spec->measurement);
        return false;
    }
    if (spec->unit && strlen(spec->unit) >= HEALTH_TEXT_MAX) {
        snprintf(err, n,
                 "health: component '%s' has a unit longer than 63 "
                 "characters - shorten it (e.g. 'ms')",
                 spec->name);
        return false;
    }
    if (spec->interval_ms < 0 || spec->timeout_ms < 0 || spec->fail_after < 0 ||
        spec->recover_after < 0) {
        snprintf(err, n,
                 "health: component '%s' has a negative interval_ms, "
                 "timeout_ms, fail_after or recover_after - use 0 for the "
                 "default or a positive value",
                 spec->name);
        return false;
    }
    return true;
}

/* Builds a component from a valid spec; NULL when out of memory. */
static health_comp *comp_new(const health_spec *spec) {
    health_comp *c = calloc(1, sizeof *c);
    health_ud *ud = calloc(1, sizeof *ud);
    if (!c || !ud) {
        free(c);
        free(ud);
        return NULL;
    }
    ud->ud = spec->ud;
    ud->ud_free = spec->ud_free;
    ud->refs = 1;
    c->ud = ud;

    snprintf(c->name, sizeof c->name, "%s", spec->name);
    snprintf(c->type, sizeof c->type, "%s",
             spec->type ? spec->type : "component");
    snprintf(c->measurement, sizeof c->measurement, "%s",
             spec->measurement ? spec->measurement : "status");
    snprintf(c->unit, sizeof c->unit, "%s", spec->unit ? spec->unit : "");
    c->required = spec->required;
    c->interval_ms =
        spec->interval_ms ? spec->interval_ms : DEFAULT_INTERVAL_MS;
    c->timeout_ms = spec->timeout_ms ? spec->timeout_ms : DEFAULT_TIMEOUT_MS;
    c->fail_after = spec->fail_after ? spec->fail_after : 1;
    c->recover_after = spec->recover_after ? spec->recover_after : 1;
    c->check = spec->check;

    /* 0 means the default: results of a check expire after three missed
     * intervals; a status only ever set by health_set does not expire. */
    if (spec->max_age_ms > 0)
        c->max_age_ms = spec->max_age_ms;
    else if (spec->max_age_ms == 0 && spec->check)
        c->max_age_ms =
            (int)fmin(3.0 * c->interval_ms + c->timeout_ms, (double)INT32_MAX);
    else
        c->max_age_ms = -1;

    c->status = HEALTH_STARTING;
    snprintf(c->message, sizeof c->message, "no result yet");
    return c;
}

static bool comps_reserve_locked(health_registry *reg) {
    if (reg->ncomps < reg->cap) return true;
    size_t cap = reg->cap ? reg->cap * 2 : 8;
    health_comp **comps = realloc(reg->comps, cap * sizeof *comps);
    if (!comps) return false;
    reg->comps = comps;
    reg->cap = cap;
    return true;
}

int health_register(health_registry *reg, const health_spec *spec, char *err,
                    size_t err_size) {
    char scratch[8];
    if (!err || err_size == 0) {
        err = scratch;
        err_size = sizeof scratch;
    }
    if (!reg) {
        snprintf(err, err_size, "health: no registry given");
        return -1;
    }
    if (!spec_valid(spec, err, err_size)) return -1;
    health_comp *c = comp_new(spec);
    if (!c) {
        snprintf(err, err_size,
                 "health: out of memory registering component '%s'",
                 spec->name);
        return -1;
    }

    pthread_mutex_lock(&reg->lock);
    size_t at;
    health_comp *old = find_locked(reg, spec->name, &at);
    health_ud *old_ud = NULL;
    if (old) {
        /* A component registered again (a new schedule, a reload) keeps
         * its last result until its new check reports. */
        if (old->status != HEALTH_STARTING && !old->held_disabled) {
            c->status = old->status;
            snprintf(c->message, sizeof c->message, "%s", old->message);
            c->observed = old->observed ? cJSON_Duplicate(old->observed, 1)
                                        : NULL;
            c->last_mono = old->last_mono;
            c->last_wall = old->last_wall;
            c->duration_ms = old->duration_ms;
        }
        old_ud = comp_detach_locked(old);
        reg->comps[at] = c;
    } else if (comps_reserve_locked(reg)) {
        reg->comps[reg->ncomps++] = c;
    } else {
        pthread_mutex_unlock(&reg->lock);
        free(c->ud);
        free(c);
        snprintf(err, err_size,
                 "health: out of memory registering component '%s'",
                 spec->name);
        return -1;
    }
    pthread_cond_broadcast(&reg->wake);
    pthread_mutex_unlock(&reg->lock);

    if (old) comp_free(old, old_ud);
    return 0;
}

int health_remove(health_registry *reg, const char *name) {
    pthread_mutex_lock(&reg->lock);
    size_t at;
    health_comp *c = find_locked(reg, name, &at);
    if (!c) {
        pthread_mutex_unlock(&reg->lock);
        return -1;
    }
    health_ud *ud = comp_detach_locked(c);
    memmove(&reg->comps[at], &reg->comps[at + 1],
            (reg->ncomps - at - 1) * sizeof *reg->comps);
    reg->ncomps--;
    pthread_cond_broadcast(&reg->wake);
    pthread_mutex_unlock(&reg->lock);

    comp_free(c, ud);
    return 0;
}

int health_set(health_registry *reg, const char *name, health_status status,
               const char *message, cJSON *observed) {
    if (!status_valid(status)) {
        cJSON_Delete(observed);
        return -1;
    }

    pthread_mutex_lock(&reg->lock);
    health_comp *c = find_locked(reg, name, NULL);
    if (!c) {
        pthread_mutex_unlock(&reg->lock);
        cJSON_Delete(observed);
        return -1;
    }
    bool was_held = c->held_disabled;
    c->held_disabled = status == HEALTH_DISABLED;
    comp_store(c, status, message, observed);
    c->fails = 0;
    c->successes = 0;
    c->last_mono = mono_ms();
    c->last_wall = wall_ms();
    c->duration_ms = 0;
    if (was_held && !c->held_disabled) c->next_due = c->last_mono;
    pthread_cond_broadcast(&reg->wake);
    pthread_mutex_unlock(&reg->lock);
    return 0;
}

int health_get(health_registry *reg, const char *name, health_info *out) {
    pthread_mutex_lock(&reg->lock);
    health_comp *c = find_locked(reg, name, NULL);
    if (!c) {
        pthread_mutex_unlock(&reg->lock);
        return -1;
    }
    health_view v;
    comp_view(c, mono_ms(), &v);
    memset(out, 0, sizeof *out);
    snprintf(out->name, sizeof out->name, "%s", c->name);
    snprintf(out->type, sizeof out->type, "%s", c->type);
    snprintf(out->message, sizeof out->message, "%s", v.message);
    out->status = v.status;
    out->required = c->required;
    out->last_check_ms = c->last_wall;
    out->duration_ms = c->duration_ms;
    out->runs = c->runs;
    pthread_mutex_unlock(&reg->lock);
    return 0;
}

/* The overall status from the views of every component. */
static health_status overall_locked(health_registry *reg, int64_t now) {
    health_status overall = HEALTH_HEALTHY;
    for (size_t i = 0; i < reg->ncomps; i++) {
        health_comp *c = reg->comps[i];
        health_view v;
        comp_view(c, now, &v);
        health_status s = v.status;
        bool bad = s == HEALTH_UNHEALTHY || s == HEALTH_UNKNOWN;
        if (c->required && (bad || s == HEALTH_STARTING))
            return HEALTH_UNHEALTHY;
        if (bad || s == HEALTH_DEGRADED) overall = HEALTH_DEGRADED;
    }
    return overall;
}

health_status health_overall(health_registry *reg) {
    pthread_mutex_lock(&reg->lock);
    health_status s = overall_locked(reg, mono_ms());
    pthread_mutex_unlock(&reg->lock);
    return s;
}

bool health_required_ok(health_registry *reg) {
    pthread_mutex_lock(&reg->lock);
    int64_t now = mono_ms();
    bool ok = true;
    for (size_t i = 0; i < reg->ncomps && ok; i++) {
        health_comp *c = reg->comps[i];
        if (!c->required) continue;
        health_view v;
        comp_view(c, now, &v);
        ok = v.status == HEALTH_HEALTHY || v.status == HEALTH_DEGRADED ||
             v.status == HEALTH_DISABLED;
    }
    pthread_mutex_unlock(&reg->lock);
    return ok;
}

int health_start(health_registry *reg) {
    pthread_mutex_lock(&reg->lock);
    if (reg->checker_on) {
        bool stopping = reg->stopping;
        pthread_mutex_unlock(&reg->lock);
        if (!stopping) return 0;
        errno = EBUSY;
        return -1;
    }
    reg->stopping = false;
    int rc = pthread_create(&reg->checker, NULL, checker_main, reg);
    if (rc == 0) reg->checker_on = true;
    pthread_mutex_unlock(&reg->lock);
    if (rc != 0) {
        log_msg(NLOG_ERROR, "Health", "could not start the checker thread: %s",
                strerror(rc));
        errno = rc;
        return -1;
    }
    return 0;
}

void health_stop(health_registry *reg) {
    pthread_mutex_lock(&reg->lock);
    if (!reg->checker_on || reg->stopping) {
        pthread_mutex_unlock(&reg->lock);
        return;
    }
    reg->stopping = true;
    pthread_t checker = reg->checker;
    pthread_cond_broadcast(&reg->wake);
    pthread_mutex_unlock(&reg->lock);

    pthread_join(checker, NULL);

    pthread_mutex_lock(&reg->lock);
    reg->checker_on = false;
    reg->stopping = false;
    pthread_mutex_unlock(&reg->lock);
}

/* Is `run` (started by health_run_all) still owed a result or timeout? */
static bool run_pending_locked(health_run *run) {
    return run->comp && run->comp->run == run && !run->timed_out;
}

void health_run_all(health_registry *reg) {
    pthread_mutex_lock(&reg->lock);
    size_t n = reg->ncomps;
    health_run **mine = calloc(n ? n : 1, sizeof *mine);
    if (!mine) {
        pthread_mutex_unlock(&reg->lock);
        log_msg(NLOG_ERROR, "Health", "out of memory running the checks");
        return;
    }

    size_t count = 0;
    int64_t now = mono_ms();
    for (size_t i = 0; i < n; i++) {
        health_comp *c = reg->comps[i];
        run_collect_locked(c, now);
        if (c->run || !comp_checkable(c)) continue;
        run_start_locked(reg, c, now);
        if (!c->run) continue;
        c->run->refs++;
        mine[count++] = c->run;
    }

    for (;;) {
        now = mono_ms();
        int64_t next = HEALTH_NEVER;
        for (size_t i = 0; i < count; i++) {
            if (!run_pending_locked(mine[i])) continue;
            run_collect_locked(mine[i]->comp, now);
            if (run_pending_locked(mine[i]) && mine[i]->deadline < next)
                next = mine[i]->deadline;
        }
        if (next == HEALTH_NEVER) break;
        wait_until_locked(reg, next);
    }

    for (size_t i = 0; i < count; i++)
        run_unref_locked(mine[i]);
    pthread_mutex_unlock(&reg->lock);
    free(mine);
}

/* ---- health+json ------------------------------------------------------ */

/* cJSON reports out of memory by returning NULL (or false) from each add;
 * these helpers fold that into one flag so a renderer can give up once. */
static void put(cJSON *obj, const char *key, cJSON *item, bool *ok) {
    bool added = obj && item &&
                 (cJSON_IsArray(obj) ? cJSON_AddItemToArray(obj, item)
                                     : cJSON_AddItemToObject(obj, key, item));
    if (!added) {
        cJSON_Delete(item);
        *ok = false;
    }
}

static void put_str(cJSON *obj, const char *key, const char *s, bool *ok) {
    put(obj, key, s ? cJSON_CreateString(s) : cJSON_CreateNull(), ok);
}

/* Adds a number of ms rounded to microseconds (keeps the JSON short). */
static void put_ms(cJSON *obj, const char *key, double ms, bool *ok) {
    put(obj, key, cJSON_CreateNumber(round(ms * 1000.0) / 1000.0), ok);
}

/* Adds an object under key and returns it (NULL on failure). */
static cJSON *put_obj(cJSON *obj, const char *key, bool *ok) {
    cJSON *child = cJSON_CreateObject();
    put(obj, key, child, ok);
    return *ok ? child : NULL;
}

static void put_time(cJSON *obj, const char *key, int64_t wall, bool *ok) {
    char when[40];
    if (wall) format_rfc3339(wall, when, sizeof when);
    put_str(obj, key, wall ? when : NULL, ok);
}

/* Adds "<name>:<measurement>": [{componentType, status, ...}] to checks. */
static void put_check(cJSON *checks, const health_comp *c, const health_view *v,
                      bool *ok) {
    char key[2 * HEALTH_TEXT_MAX];
    snprintf(key, sizeof key, "%s:%s", c->name, c->measurement);
    cJSON *list = cJSON_CreateArray();
    put(checks, key, list, ok);
    cJSON *o = cJSON_CreateObject();
    put(list, NULL, o, ok);
    if (!*ok) return;

    put_str(o, "componentType", c->type, ok);
    put_str(o, "status", health_status_word(v->status), ok);
    if (c->observed) {
        put(o, "observedValue", cJSON_Duplicate(c->observed, true), ok);
        if (c->unit[0]) put_str(o, "observedUnit", c->unit, ok);
    }
    if (c->last_wall) put_time(o, "time", c->last_wall, ok);
    if (v->status == HEALTH_DISABLED) {
        char out[HEALTH_MESSAGE_MAX + 16];
        snprintf(out, sizeof out, "disabled: %s", v->message);
        put_str(o, "output", out, ok);
    } else if (v->status != HEALTH_HEALTHY) {
        put_str(o, "output", v->message, ok);
    }
}

/* Fills o with netra's own fields for c. */
static void put_netra_comp(cJSON *o, const health_comp *c, const health_view *v,
                           bool *ok) {
    if (!o) return;
    put_str(o, "status", health_status_name(v->status), ok);
    put(o, "required", cJSON_CreateBool(c->required), ok);
    put_str(o, "message", v->message, ok);
    put_time(o, "last_check", c->last_wall, ok);
    put_ms(o, "duration_ms", c->duration_ms, ok);
    put_str(o, "component_type", c->type, ok);
    if (c->observed) put(o, "observed", cJSON_Duplicate(c->observed, true), ok);
}

cJSON *health_render(health_registry *reg, bool detail, const char *environment,
                     const char *phase) {
    cJSON *doc = cJSON_CreateObject();
    if (!doc) return NULL;
    bool ok = true;

    pthread_mutex_lock(&reg->lock);
    int64_t now = mono_ms();
    health_status overall = overall_locked(reg, now);
    put_str(doc, "status", health_status_word(overall), &ok);
    if (detail) {
        put_str(doc, "version", NETRA_VERSION, &ok);
        put_str(doc, "releaseId", NETRA_RELEASE_ID, &ok);
        put_str(doc, "description", "netra agent runtime", &ok);
        cJSON *checks = put_obj(doc, "checks", &ok);
        cJSON *netra = put_obj(doc, "netra", &ok);
        put_str(netra, "environment", environment, &ok);
        put_str(netra, "phase", phase, &ok);
        put_str(netra, "status", health_status_name(overall), &ok);
        cJSON *comps = put_obj(netra, "components", &ok);
        for (size_t i = 0; i < reg->ncomps && ok; i++) {
            health_comp *c = reg->comps[i];
            health_view v;
            comp_view(c, now, &v);
            put_check(checks, c, &v, &ok);
            put_netra_comp(put_obj(comps, c->name, &ok), c, &v, &ok);
        }
    }
    pthread_mutex_unlock(&reg->lock);

    if (!ok) {
        cJSON_Delete(doc);
        return NULL;
    }
    return doc;
}

cJSON *health_render_component(health_registry *reg, const char *name,
                               bool detail) {
    pthread_mutex_lock(&reg->lock);
    health_comp *c = find_locked(reg, name, NULL);
    if (!c) {
        pthread_mutex_unlock(&reg->lock);
        return NULL;
    }
    cJSON *doc = cJSON_CreateObject();
    bool ok = doc != NULL;
    health_view v;
    comp_view(c, mono_ms(), &v);
    put_str(doc, "status", health_status_word(v.status), &ok);
    if (detail && ok) {
        put_check(put_obj(doc, "checks", &ok), c, &v, &ok);
        cJSON *netra = put_obj(doc, "netra", &ok);
        put_str(netra, "name", c->name, &ok);
        put_netra_comp(netra, c, &v, &ok);
    }
    pthread_mutex_unlock(&reg->lock);

    if (!ok) {
        cJSON_Delete(doc);
        return NULL;
    }
    return doc;
}

cJSON *health_names(health_registry *reg) {
    cJSON *names = cJSON_CreateArray();
    bool ok = names != NULL;
    pthread_mutex_lock(&reg->lock);
    for (size_t i = 0; i < reg->ncomps && ok; i++)
        put_str(names, NULL, reg->comps[i]->name, &ok);
    pthread_mutex_unlock(&reg->lock);
    if (!ok) {
        cJSON_Delete(names);
        return NULL;
    }
    return names;
}
