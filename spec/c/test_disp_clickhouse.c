/* test_disp_clickhouse: ctx.clickhouse through the worker pool against a
 * real server (needs: clickhouse). A request waiting on a slow query
 * does not hold its worker; waiting requests can be cancelled; queries
 * are read-only. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "disp.h"
#include "log.h"

static char root[600], tooldir[700], url[256];
static disp_registry *REG;
static disp_pool *POOL;

typedef struct {
    pthread_mutex_t lock;
    pthread_cond_t cond;
    cJSON *result;
    int events;
    bool done;
    disp *d;
} coll;

static void c_event(void *ud, cJSON *ev) {
    coll *c = ud;
    pthread_mutex_lock(&c->lock);
    c->events++;
    pthread_mutex_unlock(&c->lock);
    cJSON_Delete(ev);
}

static void c_done(void *ud, cJSON *r) {
    coll *c = ud;
    pthread_mutex_lock(&c->lock);
    c->result = r;
    c->done = true;
    pthread_cond_broadcast(&c->cond);
    pthread_mutex_unlock(&c->lock);
}

static bool coll_wait(coll *c, int ms) {
    struct timespec at;
    clock_gettime(CLOCK_REALTIME, &at);
    at.tv_sec += ms / 1000;
    at.tv_nsec += (long)(ms % 1000) * 1000000L;
    if (at.tv_nsec >= 1000000000L) {
        at.tv_sec++;
        at.tv_nsec -= 1000000000L;
    }
    pthread_mutex_lock(&c->lock);
    int rc = 0;
    while (!c->done && rc == 0)
        rc = pthread_cond_timedwait(&c->cond, &c->lock, &at);
    bool done = c->done;
    pthread_mutex_unlock(&c->lock);
    return done;
}

static bool is_done(coll *c) {
    pthread_mutex_lock(&c->lock);
    bool d = c->done;
    pthread_mutex_unlock(&c->lock);
    return d;
}

static coll *start(const char *user, const char *tool, const char *args) {
    coll *c = calloc(1, sizeof *c);
    pthread_mutex_init(&c->lock, NULL);
    pthread_cond_init(&c->cond, NULL);
    char err[512];
    ctx_fields f = {.user_id = user};
    netra_ctx *ctx = ctx_new(&f, err, sizeof err);
    disp_sink sink = {c, c_event, NULL, c_done};
    c->d = disp_new(POOL, ctx, &sink, err, sizeof err);
    ctx_unref(ctx);
    int code;
    if (disp_call_tool(c->d, tool, cJSON_Parse(args), NULL, &code, err,
                       sizeof err) != 0)
        fail_msg("%s", err);
    return c;
}

static void coll_free(coll *c) {
    disp_release(c->d);
    cJSON_Delete(c->result);
    pthread_mutex_destroy(&c->lock);
    pthread_cond_destroy(&c->cond);
    free(c);
}

static const char *text_of(const cJSON *r) {
    const cJSON *item = cJSON_GetArrayItem(cJSON_GetObjectItem(r, "content"),
                                           0);
    return cJSON_GetStringValue(cJSON_GetObjectItem(item, "text"));
}

static void add(const char *name, const char *body) {
    char path[1024], err[1024];
    snprintf(path, sizeof path, "%s/%s.lua", tooldir, name);
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    fputs(body, f);
    fclose(f);
    if (disp_registry_add_tool(REG, path, err, sizeof err) != 0)
        fail_msg("%s", err);
}

#define QUERY_TOOL(name, sql, budget)                                     \
    "return { name = '" name "', description = 'd', " budget              \
    " inputSchema = { type = 'object' },\n handler = function(ctx, args)\n" \
    "  local rows, err = ctx.clickhouse:query(\"" sql "\")\n"             \
    "  if not rows then return nil, err end\n"                            \
    "  return { rows = rows, n = #rows } end }\n"

static int setup(void **state) {
    (void)state;
    const char *dir = getenv("NETRA_TEST_DIR");
    const char *addr_file = getenv("NETRA_TEST_CLICKHOUSE");
    char addr[128] = "";
    FILE *f = addr_file ? fopen(addr_file, "r") : NULL;
    if (!f) fail_msg("NETRA_TEST_CLICKHOUSE is not readable: run via ctest");
    if (!fgets(addr, sizeof addr, f)) fail_msg("empty address file");
    fclose(f);
    addr[strcspn(addr, "\r\n")] = 0;
    snprintf(url, sizeof url, "http://default@%s/default", addr);

    snprintf(root, sizeof root, "%s/dispch-%d/lua", dir ? dir : "/tmp",
             (int)getpid());
    snprintf(tooldir, sizeof tooldir, "%s/netra/tools", root);
    char cmd[1024];
    snprintf(cmd, sizeof cmd, "mkdir -p '%s'", tooldir);
    assert_int_equal(system(cmd), 0);
    log_setup(NLOG_ERROR, false);

    REG = disp_registry_new(root);
    add("slow", QUERY_TOOL("slow", "SELECT sleep(2) AS s", ""));
    add("fast", QUERY_TOOL("fast", "SELECT number AS n, toString(number) AS "
                           "s FROM system.numbers LIMIT 3", ""));
    add("write", QUERY_TOOL("write", "CREATE TABLE netra_disp_nope (x "
                            "UInt8) ENGINE = Memory", ""));
    add("short", QUERY_TOOL("short", "SELECT sleep(2) AS s",
                            "budget = { time_ms = 300 },"));
    add("echo", "return { name = 'echo', description = 'd', inputSchema = "
                "{ type = 'object' },\n handler = function(ctx, args) return "
                "'pong' end }\n");

    disp_pool_config cfg = {.workers = 1, .time_ms = 10000,
                            .clickhouse_url = url};
    char err[1024];
    POOL = disp_pool_new(REG, &cfg, err, sizeof err);
    if (!POOL) fail_msg("%s", err);
    return 0;
}

static int teardown(void **state) {
    (void)state;
    disp_pool_free(POOL);
    disp_registry_unref(REG);
    return 0;
}

static void test_query_rows(void **state) {
    (void)state;
    coll *c = start("alice", "fast", "{}");
    assert_true(coll_wait(c, 20000));
    cJSON *sc = cJSON_GetObjectItem(c->result, "structuredContent");
    assert_non_null(sc);
    assert_int_equal(cJSON_GetObjectItem(sc, "n")->valueint, 3);
    cJSON *row = cJSON_GetArrayItem(cJSON_GetObjectItem(sc, "rows"), 2);
    assert_int_equal(cJSON_GetObjectItem(row, "n")->valueint, 2);
    assert_string_equal(cJSON_GetStringValue(cJSON_GetObjectItem(row, "s")),
                        "2");
    coll_free(c);
}

static void test_read_only(void **state) {
    (void)state;
    coll *c = start("alice", "write", "{}");
    assert_true(coll_wait(c, 20000));
    assert_true(cJSON_IsTrue(cJSON_GetObjectItem(c->result, "isError")));
    const char *t = text_of(c->result);
    if (!strstr(t, "readonly") && !strstr(t, "read-only") &&
        !strstr(t, "READONLY"))
        fail_msg("expected a read-only refusal, got: %s", t);
    coll_free(c);
}

/* One worker: while a request waits on SELECT sleep(2), others on the
 * same worker complete. */
static void test_waiting_does_not_hold_worker(void **state) {
    (void)state;
    coll *slow = start("alice", "slow", "{}");
    usleep(100 * 1000);
    for (int i = 0; i < 10; i++) {
        coll *c = start("bob", i % 2 ? "echo" : "fast", "{}");
        assert_true(coll_wait(c, 1500));
        assert_false(cJSON_IsTrue(cJSON_GetObjectItem(c->result, "isError")));
        coll_free(c);
    }
    assert_false(is_done(slow));
    assert_true(coll_wait(slow, 20000));
    assert_false(cJSON_IsTrue(cJSON_GetObjectItem(slow->result, "isError")));
    coll_free(slow);
}

static void test_cancel_waiting(void **state) {
    (void)state;
    coll *slow = start("alice", "slow", "{}");
    usleep(200 * 1000);
    assert_false(is_done(slow));
    disp_cancel(slow->d, "no longer wanted");
    assert_true(coll_wait(slow, 1000)); /* at once, not after 2 s */
    assert_true(cJSON_IsTrue(cJSON_GetObjectItem(slow->result, "isError")));
    assert_non_null(strstr(text_of(slow->result), "no longer wanted"));
    coll_free(slow);
}

static void test_budget_while_waiting(void **state) {
    (void)state;
    coll *c = start("alice", "short", "{}");
    assert_true(coll_wait(c, 1500));
    assert_true(cJSON_IsTrue(cJSON_GetObjectItem(c->result, "isError")));
    assert_non_null(strstr(text_of(c->result), "time budget (300 ms)"));
    coll_free(c);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_query_rows),
        cmocka_unit_test(test_read_only),
        cmocka_unit_test(test_waiting_does_not_hold_worker),
        cmocka_unit_test(test_cancel_waiting),
        cmocka_unit_test(test_budget_while_waiting),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
