/* test_health: the health registry with real threads and real clocks:
 * registration, aggregation, flip thresholds, maximum age, hung and slow
 * checks, health+json and concurrent use. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "health.h"
#include "log.h"

/* ---- clocks and waiting ----------------------------------------------- */

static int64_t now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void sleep_ms(int ms) {
    struct timespec ts = {.tv_sec = ms / 1000,
                          .tv_nsec = (long)(ms % 1000) * 1000000};
    nanosleep(&ts, NULL);
}

/* Polls until cond holds or `ms` pass; evaluates to whether it held. */
#define WAIT_FOR(cond, ms)                                                     \
    ({                                                                         \
        int64_t until_ = now_ms() + (ms);                                      \
        bool held_ = false;                                                    \
        while (!(held_ = (cond)) && now_ms() < until_)                         \
            sleep_ms(2);                                                       \
        held_;                                                                 \
    })

static health_info info_of(health_registry *reg, const char *name) {
    health_info info;
    assert_int_equal(health_get(reg, name, &info), 0);
    return info;
}

static health_status status_of(health_registry *reg, const char *name) {
    return info_of(reg, name).status;
}

static bool message_has(health_registry *reg, const char *name,
                        const char *part) {
    health_info info;
    return health_get(reg, name, &info) == 0 &&
           strstr(info.message, part) != NULL;
}

/* ---- checks used by the tests ----------------------------------------- */

/* Returns whatever the test last put in `status`. */
typedef struct {
    _Atomic int status;
    atomic_int calls;
    atomic_int freed;
} script;

static health_status script_check(void *ud, char *message, size_t size,
                                  cJSON **observed) {
    script *s = ud;
    int n = atomic_fetch_add(&s->calls, 1) + 1;
    health_status st = (health_status)atomic_load(&s->status);
    snprintf(message, size, "scripted %s", health_status_name(st));
    *observed = cJSON_CreateNumber(n);
    return st;
}

static void script_free(void *ud) {
    atomic_fetch_add(&((script *)ud)->freed, 1);
}

/* The first call blocks until the gate opens (at most 30 s) and returns
 * `late_status`; later calls sleep `later_sleep_ms` and return
 * `later_status`. */
typedef struct {
    pthread_mutex_t lock;
    pthread_cond_t cond;
    bool open;
    atomic_int calls;
    atomic_int returned; /* the first (hung) call has returned */
    atomic_int freed;
    health_status late_status;
    health_status later_status;
    int later_sleep_ms;
} gate;

static void gate_init(gate *g, health_status late, health_status later,
                      int later_sleep_ms) {
    memset(g, 0, sizeof *g);
    pthread_mutex_init(&g->lock, NULL);
    pthread_cond_init(&g->cond, NULL);
    g->late_status = late;
    g->later_status = later;
    g->later_sleep_ms = later_sleep_ms;
}

static void gate_open(gate *g) {
    pthread_mutex_lock(&g->lock);
    g->open = true;
    pthread_cond_broadcast(&g->cond);
    pthread_mutex_unlock(&g->lock);
}

static health_status gate_check(void *ud, char *message, size_t size,
                                cJSON **observed) {
    gate *g = ud;
    if (atomic_fetch_add(&g->calls, 1) > 0) {
        sleep_ms(g->later_sleep_ms);
        snprintf(message, size, "fresh %s",
                 health_status_name(g->later_status));
        return g->later_status;
    }

    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_sec += 30;
    pthread_mutex_lock(&g->lock);
    while (!g->open)
        if (pthread_cond_timedwait(&g->cond, &g->lock, &until) != 0) break;
    pthread_mutex_unlock(&g->lock);

    snprintf(message, size, "late result");
    *observed = cJSON_CreateString("late");
    atomic_store(&g->returned, 1);
    return g->late_status;
}

static void gate_free(void *ud) {
    atomic_fetch_add(&((gate *)ud)->freed, 1);
}

/* Reports a healthy datastore with its response time. */
static health_status observed_check(void *ud, char *message, size_t size,
                                    cJSON **observed) {
    snprintf(message, size, "SELECT 1 answered");
    *observed = cJSON_CreateNumber(12.5);
    return HEALTH_HEALTHY;
}

/* ---- JSON helpers ----------------------------------------------------- */

static const char *str_at(const cJSON *obj, const char *key) {
    const cJSON *it = cJSON_GetObjectItemCaseSensitive(obj, key);
    return cJSON_IsString(it) ? it->valuestring : NULL;
}

/* The single object of checks["<key>"]. */
static const cJSON *check_entry(const cJSON *doc, const char *key) {
    const cJSON *checks = cJSON_GetObjectItemCaseSensitive(doc, "checks");
    const cJSON *list = cJSON_GetObjectItemCaseSensitive(checks, key);
    assert_true(cJSON_IsArray(list));
    assert_int_equal(cJSON_GetArraySize(list), 1);
    return cJSON_GetArrayItem(list, 0);
}

static const cJSON *netra_comp(const cJSON *doc, const char *name) {
    const cJSON *netra = cJSON_GetObjectItemCaseSensitive(doc, "netra");
    const cJSON *comps = cJSON_GetObjectItemCaseSensitive(netra, "components");
    const cJSON *c = cJSON_GetObjectItemCaseSensitive(comps, name);
    assert_non_null(c);
    return c;
}

/* RFC 3339 UTC with milliseconds, within a minute of now. */
static void assert_recent_time(const char *text) {
    assert_non_null(text);
    assert_int_equal(strlen(text), 24);
    struct tm tm = {0};
    int ms = -1;
    char z = 0;
    assert_int_equal(sscanf(text, "%4d-%2d-%2dT%2d:%2d:%2d.%3d%c", &tm.tm_year,
                            &tm.tm_mon, &tm.tm_mday, &tm.tm_hour, &tm.tm_min,
                            &tm.tm_sec, &ms, &z),
                     8);
    assert_int_equal(z, 'Z');
    assert_in_range(ms, 0, 999);
    tm.tm_year -= 1900;
    tm.tm_mon -= 1;
    time_t t = timegm(&tm);
    assert_true(llabs((long long)(t - time(NULL))) < 60);
}

static health_spec basic_spec(const char *name, bool required) {
    health_spec spec = {
        .name = name, .type = "component", .required = required};
    return spec;
}

static void add(health_registry *reg, const health_spec *spec) {
    char err[256] = "";
    int rc = health_register(reg, spec, err, sizeof err);
    if (rc != 0) fail_msg("register %s: %s", spec->name, err);
}

/* ---- tests ------------------------------------------------------------ */

static void test_status_names(void **state) {
    static const char *words[] = {"fail", "pass", "warn",
                                  "fail", "fail", "pass"};
    for (int i = HEALTH_STARTING; i <= HEALTH_DISABLED; i++) {
        health_status back;
        const char *name = health_status_name((health_status)i);
        assert_true(health_status_parse(name, &back));
        assert_int_equal(back, i);
        assert_string_equal(health_status_word((health_status)i), words[i]);
    }
    health_status s = HEALTH_HEALTHY;
    assert_false(health_status_parse("ok", &s));
    assert_false(health_status_parse(NULL, &s));
    assert_int_equal(s, HEALTH_HEALTHY);
    assert_string_equal(health_status_name((health_status)42), "unknown");
    assert_string_equal(health_status_name(HEALTH_DEGRADED), "degraded");
}

static void test_register_rejects_bad_specs(void **state) {
    health_registry *reg = health_new();
    script s = {0};
    char long_name[65];
    memset(long_name, 'a', 64);
    long_name[64] = '\0';
    const char *bad_names[] = {"",        "Upper",   "has-dash", "has space",
                               "dot.ted", long_name, NULL};
    char err[256];

    for (size_t i = 0; i < sizeof bad_names / sizeof *bad_names; i++) {
        health_spec spec = {.name = bad_names[i],
                            .check = script_check,
                            .ud = &s,
                            .ud_free = script_free};
        err[0] = '\0';
        assert_int_equal(health_register(reg, &spec, err, sizeof err), -1);
        assert_non_null(strstr(err, "is not valid"));
        assert_non_null(strstr(err, "a-z, 0-9 and _"));
    }

    health_spec spec = {.name = "db", .type = "data store"};
    assert_int_equal(health_register(reg, &spec, err, sizeof err), -1);
    assert_non_null(strstr(err, "type 'data store'"));

    spec = (health_spec){.name = "db", .measurement = "response time"};
    assert_int_equal(health_register(reg, &spec, err, sizeof err), -1);
    assert_non_null(strstr(err, "measurement"));

    spec = (health_spec){.name = "db", .interval_ms = -5};
    assert_int_equal(health_register(reg, &spec, err, sizeof err), -1);
    assert_non_null(strstr(err, "negative"));

    assert_int_equal(health_register(reg, NULL, err, sizeof err), -1);
    assert_int_equal(atomic_load(&s.freed), 0);

    long_name[63] = '\0';
    spec = (health_spec){.name = long_name};
    assert_int_equal(health_register(reg, &spec, err, sizeof err), 0);
    assert_int_equal(health_register(reg, &spec, NULL, 0), 0);

    cJSON *names = health_names(reg);
    assert_int_equal(cJSON_GetArraySize(names), 1);
    cJSON_Delete(names);
    health_free(reg);
}

static void test_names_order_and_unknown_names(void **state) {
    health_registry *reg = health_new();
    const char *order[] = {"cache", "api", "db"};
    for (int i = 0; i < 3; i++) {
        health_spec spec = basic_spec(order[i], false);
        add(reg, &spec);
    }
    health_spec again = basic_spec("api", true);
    add(reg, &again); /* replaced in place */

    cJSON *names = health_names(reg);
    char *text = cJSON_PrintUnformatted(names);
    assert_string_equal(text, "[\"cache\",\"api\",\"db\"]");
    free(text);
    cJSON_Delete(names);
    assert_true(info_of(reg, "api").required);

    assert_int_equal(health_remove(reg, "cache"), 0);
    assert_int_equal(health_remove(reg, "cache"), -1);
    health_info info;
    assert_int_equal(health_get(reg, "nope", &info), -1);
    assert_int_equal(
        health_set(reg, "nope", HEALTH_HEALTHY, "x", cJSON_CreateNumber(1)),
        -1);
    assert_null(health_render_component(reg, "nope", true));

    names = health_names(reg);
    text = cJSON_PrintUnformatted(names);
    assert_string_equal(text, "[\"api\",\"db\"]");
    free(text);
    cJSON_Delete(names);

    info = info_of(reg, "db");
    assert_int_equal(info.status, HEALTH_STARTING);
    assert_int_equal(info.last_check_ms, 0);
    assert_string_equal(info.type, "component");
    health_free(reg);
}

static void test_ud_free_on_replace_remove_free(void **state) {
    health_registry *reg = health_new();
    script a = {0}, b = {0}, c = {0}, d = {0};
    health_spec spec = {
        .name = "one", .check = script_check, .ud = &a, .ud_free = script_free};
    add(reg, &spec);

    spec.ud = &b; /* replaces "one": a goes */
    add(reg, &spec);
    assert_int_equal(atomic_load(&a.freed), 1);
    assert_int_equal(atomic_load(&b.freed), 0);

    spec = (health_spec){.name = "two", .ud = &c, .ud_free = script_free};
    add(reg, &spec);
    assert_int_equal(health_remove(reg, "two"), 0);
    assert_int_equal(atomic_load(&c.freed), 1);

    spec = (health_spec){.name = "three", .ud = &d, .ud_free = script_free};
    add(reg, &spec);
    health_run_all(reg); /* runs finish before it returns */
    health_free(reg);
    assert_int_equal(atomic_load(&a.freed), 1);
    assert_int_equal(atomic_load(&b.freed), 1);
    assert_int_equal(atomic_load(&c.freed), 1);
    assert_int_equal(atomic_load(&d.freed), 1);
}

typedef struct {
    bool required;
    health_status status;
} agg_comp;

typedef struct {
    const char *label;
    int n;
    agg_comp comps[3];
    health_status overall;
    bool required_ok;
} agg_row;

static const agg_row agg_rows[] = {
    {"empty", 0, {{0}}, HEALTH_HEALTHY, true},
    {"req healthy", 1, {{true, HEALTH_HEALTHY}}, HEALTH_HEALTHY, true},
    {"req degraded", 1, {{true, HEALTH_DEGRADED}}, HEALTH_DEGRADED, true},
    {"req unhealthy", 1, {{true, HEALTH_UNHEALTHY}}, HEALTH_UNHEALTHY, false},
    {"req unknown", 1, {{true, HEALTH_UNKNOWN}}, HEALTH_UNHEALTHY, false},
    {"req starting", 1, {{true, HEALTH_STARTING}}, HEALTH_UNHEALTHY, false},
    {"req disabled", 1, {{true, HEALTH_DISABLED}}, HEALTH_HEALTHY, true},
    {"opt healthy", 1, {{false, HEALTH_HEALTHY}}, HEALTH_HEALTHY, true},
    {"opt degraded", 1, {{false, HEALTH_DEGRADED}}, HEALTH_DEGRADED, true},
    {"opt unhealthy", 1, {{false, HEALTH_UNHEALTHY}}, HEALTH_DEGRADED, true},
    {"opt unknown", 1, {{false, HEALTH_UNKNOWN}}, HEALTH_DEGRADED, true},
    {"opt starting", 1, {{false, HEALTH_STARTING}}, HEALTH_HEALTHY, true},
    {"opt disabled", 1, {{false, HEALTH_DISABLED}}, HEALTH_HEALTHY, true},
    {"req ok + opt unhealthy",
     2,
     {{true, HEALTH_HEALTHY}, {false, HEALTH_UNHEALTHY}},
     HEALTH_DEGRADED,
     true},
    {"req unhealthy + opt ok",
     2,
     {{true, HEALTH_UNHEALTHY}, {false, HEALTH_HEALTHY}},
     HEALTH_UNHEALTHY,
     false},
    {"req degraded + opt unknown",
     2,
     {{true, HEALTH_DEGRADED}, {false, HEALTH_UNKNOWN}},
     HEALTH_DEGRADED,
     true},
    {"opt degraded + req starting",
     2,
     {{false, HEALTH_DEGRADED}, {true, HEALTH_STARTING}},
     HEALTH_UNHEALTHY,
     false},
    {"all disabled",
     3,
     {{true, HEALTH_DISABLED},
      {false, HEALTH_DISABLED},
      {true, HEALTH_DISABLED}},
     HEALTH_HEALTHY,
     true},
    {"req disabled + opt degraded + req ok",
     3,
     {{true, HEALTH_DISABLED},
      {false, HEALTH_DEGRADED},
      {true, HEALTH_HEALTHY}},
     HEALTH_DEGRADED,
     true},
};

static void test_aggregation_table(void **state) {
    static const char *words[] = {"fail", "pass", "warn", "fail"};
    for (size_t r = 0; r < sizeof agg_rows / sizeof *agg_rows; r++) {
        const agg_row *row = &agg_rows[r];
        health_registry *reg = health_new();
        for (int i = 0; i < row->n; i++) {
            char name[16];
            snprintf(name, sizeof name, "c%d", i);
            health_spec spec = basic_spec(name, row->comps[i].required);
            add(reg, &spec);
            if (row->comps[i].status != HEALTH_STARTING)
                health_set(reg, name, row->comps[i].status, "set", NULL);
        }

        health_status got = health_overall(reg);
        if (got != row->overall)
            fail_msg("row '%s': overall %s, want %s", row->label,
                     health_status_name(got), health_status_name(row->overall));
        if (health_required_ok(reg) != row->required_ok)
            fail_msg("row '%s': required_ok wrong", row->label);

        cJSON *doc = health_render(reg, false, NULL, NULL);
        assert_string_equal(str_at(doc, "status"), words[row->overall]);
        cJSON_Delete(doc);
        health_free(reg);
    }
}

/* Sets what the scripted check returns, runs it once, returns the status
 * the component then reads. */
static health_status step(health_registry *reg, script *s, const char *name,
                          health_status result) {
    atomic_store(&s->status, result);
    health_run_all(reg);
    return status_of(reg, name);
}

static void test_flip_thresholds(void **state) {
    health_registry *reg = health_new();
    script s = {0};
    health_spec spec = {.name = "db",
                        .check = script_check,
                        .ud = &s,
                        .fail_after = 3,
                        .recover_after = 2};
    add(reg, &spec);

    /* The first result applies at once. */
    assert_int_equal(step(reg, &s, "db", HEALTH_HEALTHY), HEALTH_HEALTHY);

    /* Three failures in a row to turn; the first two change nothing. */
    assert_int_equal(step(reg, &s, "db", HEALTH_UNHEALTHY), HEALTH_HEALTHY);
    assert_int_equal(step(reg, &s, "db", HEALTH_UNHEALTHY), HEALTH_HEALTHY);
    assert_string_equal(info_of(reg, "db").message, "scripted healthy");
    assert_int_equal(step(reg, &s, "db", HEALTH_UNHEALTHY), HEALTH_UNHEALTHY);
    assert_string_equal(info_of(reg, "db").message, "scripted unhealthy");

    /* Two successes to turn back. */
    assert_int_equal(step(reg, &s, "db", HEALTH_HEALTHY), HEALTH_UNHEALTHY);
    assert_int_equal(step(reg, &s, "db", HEALTH_HEALTHY), HEALTH_HEALTHY);

    /* Failures must be consecutive. */
    assert_int_equal(step(reg, &s, "db", HEALTH_UNHEALTHY), HEALTH_HEALTHY);
    assert_int_equal(step(reg, &s, "db", HEALTH_HEALTHY), HEALTH_HEALTHY);
    assert_int_equal(step(reg, &s, "db", HEALTH_DEGRADED), HEALTH_HEALTHY);
    assert_int_equal(step(reg, &s, "db", HEALTH_UNHEALTHY), HEALTH_HEALTHY);
    assert_int_equal(step(reg, &s, "db", HEALTH_DEGRADED), HEALTH_DEGRADED);

    /* Between failing statuses a result applies at once. */
    assert_int_equal(step(reg, &s, "db", HEALTH_UNHEALTHY), HEALTH_UNHEALTHY);

    /* A success in between restarts the count of successes. */
    assert_int_equal(step(reg, &s, "db", HEALTH_HEALTHY), HEALTH_UNHEALTHY);
    assert_int_equal(step(reg, &s, "db", HEALTH_DEGRADED), HEALTH_DEGRADED);
    assert_int_equal(step(reg, &s, "db", HEALTH_HEALTHY), HEALTH_DEGRADED);
    assert_int_equal(step(reg, &s, "db", HEALTH_HEALTHY), HEALTH_HEALTHY);
    assert_int_equal(info_of(reg, "db").runs, 16);

    /* A fresh component takes its first failing result at once. */
    script t = {0};
    health_spec other = {.name = "cache",
                         .check = script_check,
                         .ud = &t,
                         .fail_after = 5,
                         .recover_after = 5};
    add(reg, &other);
    assert_int_equal(step(reg, &t, "cache", HEALTH_UNHEALTHY),
                     HEALTH_UNHEALTHY);
    health_free(reg);
}

static void test_set_applies_at_once_and_resets(void **state) {
    health_registry *reg = health_new();
    script s = {0};
    health_spec spec = {.name = "db",
                        .check = script_check,
                        .ud = &s,
                        .fail_after = 3,
                        .recover_after = 2};
    add(reg, &spec);
    assert_int_equal(step(reg, &s, "db", HEALTH_HEALTHY), HEALTH_HEALTHY);

    /* Two failures counted, then a direct report resets the count. */
    assert_int_equal(step(reg, &s, "db", HEALTH_UNHEALTHY), HEALTH_HEALTHY);
    assert_int_equal(step(reg, &s, "db", HEALTH_UNHEALTHY), HEALTH_HEALTHY);
    assert_int_equal(health_set(reg, "db", HEALTH_HEALTHY, "reconnected", NULL),
                     0);
    assert_int_equal(step(reg, &s, "db", HEALTH_UNHEALTHY), HEALTH_HEALTHY);
    assert_int_equal(step(reg, &s, "db", HEALTH_UNHEALTHY), HEALTH_HEALTHY);
    assert_int_equal(step(reg, &s, "db", HEALTH_UNHEALTHY), HEALTH_UNHEALTHY);

    /* A direct report ignores the thresholds both ways. */
    health_set(reg, "db", HEALTH_HEALTHY, "policy says fine", NULL);
    assert_int_equal(status_of(reg, "db"), HEALTH_HEALTHY);
    health_set(reg, "db", HEALTH_UNHEALTHY, "connection refused", NULL);
    health_info info = info_of(reg, "db");
    assert_int_equal(info.status, HEALTH_UNHEALTHY);
    assert_string_equal(info.message, "connection refused");
    assert_true(info.last_check_ms > 0);
    assert_int_equal(step(reg, &s, "db", HEALTH_HEALTHY), HEALTH_UNHEALTHY);
    assert_int_equal(step(reg, &s, "db", HEALTH_HEALTHY), HEALTH_HEALTHY);
    health_free(reg);
}

static void test_max_age_reads_unknown(void **state) {
    health_registry *reg = health_new();
    health_spec spec = {.name = "queue", .required = true, .max_age_ms = 200};
    add(reg, &spec);
    spec = (health_spec){.name = "search", .max_age_ms = 200};
    add(reg, &spec);
    spec =
        (health_spec){.name = "warming", .required = true, .max_age_ms = 200};
    add(reg, &spec);
    spec = (health_spec){.name = "pushed"}; /* no check: never expires */
    add(reg, &spec);

    health_set(reg, "queue", HEALTH_HEALTHY, "consumer attached", NULL);
    health_set(reg, "search", HEALTH_DISABLED, "not used in test", NULL);
    health_set(reg, "pushed", HEALTH_HEALTHY, "pushed by policy", NULL);
    health_set(reg, "warming", HEALTH_STARTING, "loading models", NULL);
    assert_int_equal(status_of(reg, "queue"), HEALTH_HEALTHY);

    assert_true(WAIT_FOR(status_of(reg, "queue") == HEALTH_UNKNOWN, 3000));
    sleep_ms(100);
    health_info info = info_of(reg, "queue");
    assert_int_equal(info.status, HEALTH_UNKNOWN);
    assert_non_null(strstr(info.message, "maximum age 200 ms"));
    assert_non_null(strstr(info.message, "consumer attached"));
    assert_int_equal(status_of(reg, "search"), HEALTH_DISABLED);
    assert_int_equal(status_of(reg, "warming"), HEALTH_STARTING);
    assert_int_equal(status_of(reg, "pushed"), HEALTH_HEALTHY);
    assert_int_equal(health_overall(reg), HEALTH_UNHEALTHY);
    assert_false(health_required_ok(reg));

    cJSON *doc = health_render(reg, true, "test", "ready");
    const cJSON *entry = check_entry(doc, "queue:status");
    assert_string_equal(str_at(entry, "status"), "fail");
    assert_non_null(strstr(str_at(entry, "output"), "maximum age"));
    assert_string_equal(str_at(netra_comp(doc, "queue"), "status"), "unknown");
    cJSON_Delete(doc);

    /* A fresh result makes it current again. */
    health_set(reg, "queue", HEALTH_HEALTHY, "consumer attached", NULL);
    health_set(reg, "warming", HEALTH_HEALTHY, "models loaded", NULL);
    assert_int_equal(status_of(reg, "queue"), HEALTH_HEALTHY);
    assert_int_equal(health_overall(reg), HEALTH_HEALTHY);
    health_free(reg);
}

static void test_checker_schedule_and_disabled(void **state) {
    health_registry *reg = health_new();
    static script s;
    s = (script){.status = HEALTH_HEALTHY};
    health_spec spec = {.name = "api",
                        .check = script_check,
                        .ud = &s,
                        .ud_free = script_free,
                        .interval_ms = 20,
                        .timeout_ms = 500};
    add(reg, &spec);
    assert_int_equal(health_start(reg), 0);
    assert_int_equal(health_start(reg), 0); /* already running */

    assert_true(WAIT_FOR(info_of(reg, "api").runs >= 3, 3000));
    assert_int_equal(status_of(reg, "api"), HEALTH_HEALTHY);

    /* Disabled by the policy: the checks stop and the status holds. */
    health_set(reg, "api", HEALTH_DISABLED, "turned off in staging", NULL);
    uint64_t runs = info_of(reg, "api").runs;
    sleep_ms(150);
    assert_int_equal(info_of(reg, "api").runs, runs);
    assert_int_equal(status_of(reg, "api"), HEALTH_DISABLED);
    cJSON *doc = health_render_component(reg, "api", true);
    assert_string_equal(str_at(doc, "status"), "pass");
    assert_string_equal(str_at(check_entry(doc, "api:status"), "output"),
                        "disabled: turned off in staging");
    cJSON_Delete(doc);

    /* Enabled again: the checks resume. */
    health_set(reg, "api", HEALTH_STARTING, "enabled again", NULL);
    assert_true(WAIT_FOR(info_of(reg, "api").runs >= runs + 2, 3000));
    assert_true(WAIT_FOR(status_of(reg, "api") == HEALTH_HEALTHY, 3000));

    health_stop(reg);
    health_stop(reg);
    runs = info_of(reg, "api").runs;
    sleep_ms(100);
    assert_int_equal(info_of(reg, "api").runs, runs);

    assert_int_equal(health_start(reg), 0);
    assert_true(WAIT_FOR(info_of(reg, "api").runs > runs, 3000));
    health_free(reg);
    assert_true(WAIT_FOR(atomic_load(&s.freed) == 1, 3000));
}

static void test_timeout_message(void **state) {
    health_registry *reg = health_new();
    gate g;
    gate_init(&g, HEALTH_HEALTHY, HEALTH_HEALTHY, 0);
    health_spec spec = {.name = "slow",
                        .check = gate_check,
                        .ud = &g,
                        .ud_free = gate_free,
                        .timeout_ms = 40,
                        .fail_after = 3,
                        .recover_after = 2};
    add(reg, &spec);

    health_run_all(reg);
    assert_int_equal(atomic_load(&g.returned), 0); /* still running */
    health_info info = info_of(reg, "slow");
    assert_int_equal(info.status, HEALTH_UNHEALTHY);
    assert_string_equal(info.message, "check timed out after 40 ms");
    assert_true(info.duration_ms >= 40.0);
    assert_int_equal(info.runs, 1);

    /* No second run while the first is still out. */
    health_run_all(reg);
    assert_int_equal(info_of(reg, "slow").runs, 1);
    assert_int_equal(atomic_load(&g.calls), 1);

    /* Once it is back, the next run goes ahead (its late result is not
     * taken; the new run's is). */
    gate_open(&g);
    assert_true(WAIT_FOR(atomic_load(&g.returned) == 1, 3000));
    assert_true(
        WAIT_FOR((health_run_all(reg), info_of(reg, "slow").runs == 2), 3000));
    info = info_of(reg, "slow");
    assert_int_equal(info.status, HEALTH_UNHEALTHY); /* recover_after 2 */
    assert_string_equal(info.message, "check timed out after 40 ms");
    health_run_all(reg);
    info = info_of(reg, "slow");
    assert_int_equal(info.status, HEALTH_HEALTHY);
    assert_string_equal(info.message, "fresh healthy");
    health_free(reg);
    assert_int_equal(atomic_load(&g.freed), 1);
}

static void test_hung_check_blocks_nothing(void **state) {
    health_registry *reg = health_new();
    gate g;
    gate_init(&g, HEALTH_HEALTHY, HEALTH_HEALTHY, 0);
    health_spec spec = {.name = "stuck",
                        .type = "datastore",
                        .required = true,
                        .check = gate_check,
                        .ud = &g,
                        .ud_free = gate_free,
                        .interval_ms = 20,
                        .timeout_ms = 50,
                        .max_age_ms = 600};
    add(reg, &spec);
    static script s = {.status = HEALTH_HEALTHY};
    health_spec other = {.name = "fine",
                         .check = script_check,
                         .ud = &s,
                         .interval_ms = 20,
                         .timeout_ms = 500};
    add(reg, &other);
    assert_int_equal(health_start(reg), 0);

    assert_true(
        WAIT_FOR(message_has(reg, "stuck", "timed out after 50 ms"), 3000));
    assert_int_equal(status_of(reg, "stuck"), HEALTH_UNHEALTHY);

    /* Rendering answers while the check is still inside its 30 s hang. */
    int64_t t0 = now_ms();
    cJSON *doc = health_render(reg, true, "test", "ready");
    int64_t took = now_ms() - t0;
    assert_int_equal(atomic_load(&g.returned), 0);
    assert_true(took < 1000);
    assert_string_equal(str_at(doc, "status"), "fail");
    assert_string_equal(str_at(check_entry(doc, "stuck:status"), "output"),
                        "check timed out after 50 ms");
    cJSON_Delete(doc);

    /* The other component keeps being checked; the hung one is not run
     * again, and its result goes stale. */
    uint64_t fine_runs = info_of(reg, "fine").runs;
    assert_true(WAIT_FOR(info_of(reg, "fine").runs >= fine_runs + 3, 3000));
    assert_int_equal(info_of(reg, "stuck").runs, 1);
    assert_true(WAIT_FOR(status_of(reg, "stuck") == HEALTH_UNKNOWN, 3000));
    assert_int_equal(info_of(reg, "stuck").runs, 1);
    assert_int_equal(atomic_load(&g.calls), 1);

    /* Stopping and freeing do not wait for it either. */
    t0 = now_ms();
    health_stop(reg);
    health_free(reg);
    took = now_ms() - t0;
    assert_true(took < 1000);
    assert_int_equal(atomic_load(&g.returned), 0);
    assert_int_equal(atomic_load(&g.freed), 0); /* the run still holds ud */

    /* When the run finally returns it cleans up after itself. */
    gate_open(&g);
    assert_true(WAIT_FOR(atomic_load(&g.freed) == 1, 3000));
}

static void test_late_result_is_discarded(void **state) {
    health_registry *reg = health_new();
    gate g;
    gate_init(&g, HEALTH_HEALTHY, HEALTH_UNHEALTHY, 100);
    health_spec spec = {.name = "late",
                        .check = gate_check,
                        .ud = &g,
                        .ud_free = gate_free,
                        .interval_ms = 20,
                        .timeout_ms = 300};
    add(reg, &spec);
    assert_int_equal(health_start(reg), 0);
    assert_true(WAIT_FOR(message_has(reg, "late", "timed out"), 3000));

    /* The hung run returns "healthy"; that result must never show. The
     * next run takes 100 ms, so a wrongly applied result would be seen. */
    gate_open(&g);
    int64_t until = now_ms() + 3000;
    health_info info;
    for (;;) {
        info = info_of(reg, "late");
        assert_int_not_equal(info.status, HEALTH_HEALTHY);
        assert_null(strstr(info.message, "late result"));
        if (!strcmp(info.message, "fresh unhealthy")) break;
        if (now_ms() >= until)
            fail_msg("still %s after 3 s: %s (runs %llu)",
                     health_status_name(info.status), info.message,
                     (unsigned long long)info.runs);
        sleep_ms(1);
    }
    assert_true(info.runs >= 2);
    health_free(reg);
    assert_true(WAIT_FOR(atomic_load(&g.freed) == 1, 3000));
}

static void test_render_document(void **state) {
    health_registry *reg = health_new();
    health_spec db = {.name = "clickhouse",
                      .type = "datastore",
                      .measurement = "responseTime",
                      .unit = "ms",
                      .required = true,
                      .check = observed_check};
    add(reg, &db);
    health_spec tools = {
        .name = "tools", .type = "component", .required = true};
    add(reg, &tools);
    health_spec llm = {.name = "llm", .type = "system"};
    add(reg, &llm);
    health_spec metrics = {.name = "metrics", .type = "component"};
    add(reg, &metrics);

    health_run_all(reg);
    health_set(reg, "tools", HEALTH_HEALTHY, "3 tools registered", NULL);
    health_set(reg, "llm", HEALTH_UNHEALTHY,
               "provider answered 503 - retrying in 5 s", NULL);
    health_set(reg, "metrics", HEALTH_DISABLED, "METRICS_ENABLED=false", NULL);

    cJSON *doc = health_render(reg, true, "development", "ready");
    if (getenv("HEALTH_TEST_PRINT")) {
        char *text = cJSON_Print(doc);
        printf("%s\n", text);
        free(text);
    }
    assert_string_equal(str_at(doc, "status"), "warn");
    assert_string_equal(str_at(doc, "version"), NETRA_VERSION);
    assert_non_null(str_at(doc, "releaseId"));

    const cJSON *e = check_entry(doc, "clickhouse:responseTime");
    assert_string_equal(str_at(e, "componentType"), "datastore");
    assert_string_equal(str_at(e, "status"), "pass");
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(e, "observedValue");
    assert_true(cJSON_IsNumber(v));
    assert_true(v->valuedouble == 12.5);
    assert_string_equal(str_at(e, "observedUnit"), "ms");
    assert_recent_time(str_at(e, "time"));
    assert_null(cJSON_GetObjectItemCaseSensitive(e, "output"));

    e = check_entry(doc, "llm:status");
    assert_string_equal(str_at(e, "status"), "fail");
    assert_string_equal(str_at(e, "output"),
                        "provider answered 503 - retrying in 5 s");
    e = check_entry(doc, "metrics:status");
    assert_string_equal(str_at(e, "status"), "pass");
    assert_string_equal(str_at(e, "output"), "disabled: METRICS_ENABLED=false");

    const cJSON *netra = cJSON_GetObjectItemCaseSensitive(doc, "netra");
    assert_string_equal(str_at(netra, "environment"), "development");
    assert_string_equal(str_at(netra, "phase"), "ready");
    assert_string_equal(str_at(netra, "status"), "degraded");
    const cJSON *c = netra_comp(doc, "clickhouse");
    assert_string_equal(str_at(c, "status"), "healthy");
    assert_true(cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(c, "required")));
    assert_string_equal(str_at(c, "message"), "SELECT 1 answered");
    assert_recent_time(str_at(c, "last_check"));
    assert_true(
        cJSON_IsNumber(cJSON_GetObjectItemCaseSensitive(c, "duration_ms")));
    assert_string_equal(str_at(c, "component_type"), "datastore");
    v = cJSON_GetObjectItemCaseSensitive(c, "observed");
    assert_true(cJSON_IsNumber(v) && v->valuedouble == 12.5);
    assert_string_equal(str_at(netra_comp(doc, "metrics"), "status"),
                        "disabled");
    cJSON_Delete(doc);

    /* Without detail: the status only. */
    doc = health_render(reg, false, "development", "ready");
    assert_int_equal(cJSON_GetArraySize(doc), 1);
    assert_string_equal(str_at(doc, "status"), "warn");
    cJSON_Delete(doc);

    /* One component: its own status; a starting one has no time yet. */
    doc = health_render_component(reg, "llm", false);
    assert_int_equal(cJSON_GetArraySize(doc), 1);
    assert_string_equal(str_at(doc, "status"), "fail");
    cJSON_Delete(doc);
    health_spec fresh = {.name = "fresh", .type = "system"};
    add(reg, &fresh);
    doc = health_render_component(reg, "fresh", true);
    assert_string_equal(str_at(doc, "status"), "fail");
    e = check_entry(doc, "fresh:status");
    assert_null(cJSON_GetObjectItemCaseSensitive(e, "time"));
    assert_string_equal(str_at(e, "output"), "no result yet");
    netra = cJSON_GetObjectItemCaseSensitive(doc, "netra");
    assert_string_equal(str_at(netra, "name"), "fresh");
    assert_string_equal(str_at(netra, "status"), "starting");
    assert_true(
        cJSON_IsNull(cJSON_GetObjectItemCaseSensitive(netra, "last_check")));
    cJSON_Delete(doc);

    /* A required component still starting fails the whole. */
    doc = health_render(reg, false, NULL, NULL);
    assert_string_equal(str_at(doc, "status"), "warn"); /* optional */
    cJSON_Delete(doc);
    fresh.required = true;
    add(reg, &fresh);
    doc = health_render(reg, true, NULL, NULL);
    assert_string_equal(str_at(doc, "status"), "fail");
    netra = cJSON_GetObjectItemCaseSensitive(doc, "netra");
    assert_true(cJSON_IsNull(cJSON_GetObjectItemCaseSensitive(netra, "phase")));
    cJSON_Delete(doc);
    health_free(reg);
}

/* ---- concurrency ------------------------------------------------------ */

typedef struct {
    health_registry *reg;
    atomic_bool stop;
    atomic_int renders;
    atomic_int failures;
} stress;

static void *stress_reader(void *arg) {
    stress *st = arg;
    while (!atomic_load(&st->stop)) {
        cJSON *doc = health_render(st->reg, true, "test", "ready");
        char *text = doc ? cJSON_PrintUnformatted(doc) : NULL;
        if (!text || !str_at(doc, "status")) atomic_fetch_add(&st->failures, 1);
        free(text);
        cJSON_Delete(doc);

        doc = health_render_component(st->reg, "c1", true);
        if (!doc) atomic_fetch_add(&st->failures, 1);
        cJSON_Delete(doc);

        health_info info;
        if (health_get(st->reg, "c2", &info) != 0)
            atomic_fetch_add(&st->failures, 1);
        (void)health_overall(st->reg);
        (void)health_required_ok(st->reg);
        cJSON_Delete(health_names(st->reg));
        atomic_fetch_add(&st->renders, 1);
    }
    return NULL;
}

static void *stress_writer(void *arg) {
    stress *st = arg;
    static script churn = {.status = HEALTH_DEGRADED};
    int i = 0;
    while (!atomic_load(&st->stop)) {
        health_spec spec = {.name = "churn",
                            .check = script_check,
                            .ud = &churn,
                            .ud_free = script_free,
                            .interval_ms = 1,
                            .timeout_ms = 20};
        char err[128];
        if (health_register(st->reg, &spec, err, sizeof err) != 0)
            atomic_fetch_add(&st->failures, 1);
        health_set(st->reg, "c3", (health_status)(1 + i % 3), "set",
                   cJSON_CreateNumber(i));
        if (i % 2) health_remove(st->reg, "churn");
        if (i % 7 == 0) health_run_all(st->reg);
        i++;
    }
    return NULL;
}

static void test_concurrent_render(void **state) {
    health_registry *reg = health_new();
    static script s[4]; /* runs may outlive health_free by a moment */
    for (int i = 0; i < 4; i++) {
        s[i] = (script){.status = 1 + i % 3};
        char name[16];
        snprintf(name, sizeof name, "c%d", i);
        health_spec spec = {.name = name,
                            .check = script_check,
                            .ud = &s[i],
                            .interval_ms = 2 + i,
                            .timeout_ms = 100,
                            .required = i % 2,
                            .fail_after = i % 2 + 1,
                            .max_age_ms = 50};
        add(reg, &spec);
    }
    stress st = {.reg = reg};
    assert_int_equal(health_start(reg), 0);

    pthread_t readers[4], writer;
    for (int i = 0; i < 4; i++)
        assert_int_equal(pthread_create(&readers[i], NULL, stress_reader, &st),
                         0);
    assert_int_equal(pthread_create(&writer, NULL, stress_writer, &st), 0);
    sleep_ms(600);
    atomic_store(&st.stop, true);
    for (int i = 0; i < 4; i++)
        pthread_join(readers[i], NULL);
    pthread_join(writer, NULL);

    assert_int_equal(atomic_load(&st.failures), 0);
    assert_true(atomic_load(&st.renders) > 0);
    for (int i = 0; i < 4; i++) {
        char name[16];
        snprintf(name, sizeof name, "c%d", i);
        assert_true(info_of(reg, name).runs >= 5);
    }
    health_free(reg);
}

int main(void) {
    log_setup(NLOG_ERROR, false);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_status_names),
        cmocka_unit_test(test_register_rejects_bad_specs),
        cmocka_unit_test(test_names_order_and_unknown_names),
        cmocka_unit_test(test_ud_free_on_replace_remove_free),
        cmocka_unit_test(test_aggregation_table),
        cmocka_unit_test(test_flip_thresholds),
        cmocka_unit_test(test_set_applies_at_once_and_resets),
        cmocka_unit_test(test_max_age_reads_unknown),
        cmocka_unit_test(test_checker_schedule_and_disabled),
        cmocka_unit_test(test_timeout_message),
        cmocka_unit_test(test_hung_check_blocks_nothing),
        cmocka_unit_test(test_late_result_is_discarded),
        cmocka_unit_test(test_render_document),
        cmocka_unit_test(test_concurrent_render),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
