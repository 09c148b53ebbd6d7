/* test_disp: the dispatcher with real worker threads, real Lua tool
 * files written to a temp dir, and real sinks: registration errors,
 * context refusals, argument and result mapping, events, budgets,
 * admission, cancellation, agents. */
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
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "disp.h"
#include "log.h"

static char root[600];   /* <tmp>/lua */
static char tooldir[700];
static char agentdir[700];

/* ---- files ------------------------------------------------------------------ */

static void mkdir_p(const char *path) {
    char buf[1024];
    snprintf(buf, sizeof buf, "%s", path);
    for (char *p = buf + 1; *p; p++) {
        if (*p == '/') {
            *p = 0;
            mkdir(buf, 0700);
            *p = '/';
        }
    }
    mkdir(buf, 0700);
}

static char *file_in(const char *dir, const char *name, const char *body) {
    char *path = malloc(1024);
    snprintf(path, 1024, "%s/%s.lua", dir, name);
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    fputs(body, f);
    fclose(f);
    return path;
}

#define TOOL(name, schema, body)                                          \
    "return { name = '" name "', description = 'test tool',\n"            \
    "  inputSchema = " schema ",\n"                                       \
    "  handler = function(ctx, args)\n" body "\n end }\n"

static const char *const tools_src[][2] = {
    {"echo", TOOL("echo", "{ type = 'object', properties = { text = { type = "
                  "'string' } }, required = { 'text' } }",
                  "return args.text")},
    {"table", TOOL("table", "{ type = 'object' }",
                   "return { n = 42, who = ctx.user_id }")},
    {"fail", TOOL("fail", "{ type = 'object' }",
                  "return nil, 'no luck today'")},
    {"boom", TOOL("boom", "{ type = 'object' }",
                  "local x = nil\n  return x.field")},
    {"shaped",
     "return { name = 'shaped', description = 'd', inputSchema = { type = "
     "'object' },\n outputSchema = { type = 'object', properties = { n = { "
     "type = 'integer' } }, required = { 'n' } },\n handler = function(ctx, "
     "args) if args.good then return { n = 1 } end return { n = 'one' } "
     "end }\n"},
    {"loop", TOOL("loop", "{ type = 'object' }", "while true do end")},
    {"coloop", TOOL("coloop", "{ type = 'object' }",
                    "local co = coroutine.wrap(function() while true do end "
                    "end)\n co()")},
    {"alloc", TOOL("alloc", "{ type = 'object' }",
                   "local t = {} local i = 0 while true do i = i + 1 "
                   "t[i] = ('x'):rep(1000) .. i end")},
    {"pcallloop", TOOL("pcallloop", "{ type = 'object' }",
                       "for _ = 1, 1000 do pcall(function() while true do "
                       "end end) end return 'escaped'")},
    {"regex", TOOL("regex", "{ type = 'object' }",
                   "local s = ('a'):rep(100000) .. 'b'\n"
                   " return tostring(s:find('a-a-a-a-a-a-a-a-c'))")},
    {"nest", TOOL("nest", "{ type = 'object' }",
                  "local r, e = ctx:call('echo', { text = 'inner' })\n"
                  " local bad, why = ctx:call('echo', { text = 7 })\n"
                  " return { r = r, why = why }")},
    {"deep", TOOL("deep", "{ type = 'object', properties = { n = { type = "
                  "'integer' } } }",
                  "local n = args.n or 0\n"
                  " local r, e = ctx:call('deep', { n = n + 1 })\n"
                  " if r then return r end\n"
                  " return { reached = n, err = e }")},
    {"progress", TOOL("progress", "{ type = 'object' }",
                      "ctx:progress(1, 3, 'one') ctx:progress(1, 3) "
                      "ctx:progress(2, 3) ctx:emit('note', { k = 1 }) "
                      "ctx:log('info', 'hello') return 'ok'")},
    {"globals", TOOL("globals", "{ type = 'object' }",
                     "counter = 1 return 'set'")},
    {"state", TOOL("state", "{ type = 'object' }",
                   "ctx.state.n = (ctx.state.n or 0) + 1 return "
                   "tostring(ctx.state.n)")},
    {"noch", TOOL("noch", "{ type = 'object' }",
                  "local r, e = ctx.clickhouse:query('SELECT 1')\n"
                  " return e or 'rows'")},
};

static const char *const agents_src[][2] = {
    {"helper",
     "return { name = 'helper', description = 'a',\n"
     " run = function(ctx, input)\n"
     "  ctx:think('thinking about ' .. (input.topic or '?'))\n"
     "  local r = ctx:call('echo', { text = 'hi', api_key = nil })\n"
     "  return { said = r }\n end }\n"},
    {"raiser",
     "return { name = 'raiser', description = 'a',\n"
     " run = function(ctx, input) ctx:think('about to fail')\n"
     "  error('agent broke') end }\n"},
    {"spinner",
     "return { name = 'spinner', description = 'a', budget = { time_ms = "
     "300 },\n run = function(ctx, input) while true do end end }\n"},
};

/* ---- sinks ------------------------------------------------------------------- */

typedef struct {
    pthread_mutex_t lock;
    pthread_cond_t cond;
    cJSON *events;
    cJSON *result;
    int dones;
    disp *d;
    bool release_in_done;
} coll;

static void c_event(void *ud, cJSON *ev) {
    coll *c = ud;
    pthread_mutex_lock(&c->lock);
    cJSON_AddItemToArray(c->events, ev);
    pthread_mutex_unlock(&c->lock);
}

static void c_progress(void *ud, cJSON *p) {
    cJSON *ev = cJSON_CreateObject();
    cJSON_AddStringToObject(ev, "type", "progress");
    cJSON_AddItemToObject(ev, "params", p);
    c_event(ud, ev);
}

static void c_done(void *ud, cJSON *result) {
    coll *c = ud;
    pthread_mutex_lock(&c->lock);
    c->result = result;
    c->dones++;
    if (c->release_in_done) disp_release(c->d);
    pthread_cond_broadcast(&c->cond);
    pthread_mutex_unlock(&c->lock);
}

static coll *coll_new(void) {
    coll *c = calloc(1, sizeof *c);
    pthread_mutex_init(&c->lock, NULL);
    pthread_cond_init(&c->cond, NULL);
    c->events = cJSON_CreateArray();
    return c;
}

static void coll_free(coll *c) {
    cJSON_Delete(c->events);
    cJSON_Delete(c->result);
    pthread_mutex_destroy(&c->lock);
    pthread_cond_destroy(&c->cond);
    free(c);
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
    while (!c->dones && rc == 0)
        rc = pthread_cond_timedwait(&c->cond, &c->lock, &at);
    bool done = c->dones > 0;
    pthread_mutex_unlock(&c->lock);
    return done;
}

/* ---- pool --------------------------------------------------------------------- */

static disp_registry *REG;
static disp_pool *POOL;
static atomic_int records;
static char last_record_args[1024];
static pthread_mutex_t rec_lock = PTHREAD_MUTEX_INITIALIZER;

static void on_record(void *ud, const disp_call_record *r) {
    (void)ud;
    atomic_fetch_add(&records, 1);
    pthread_mutex_lock(&rec_lock);
    snprintf(last_record_args, sizeof last_record_args, "%s", r->arguments);
    pthread_mutex_unlock(&rec_lock);
}

static disp_registry *full_registry(void) {
    char err[1024];
    disp_registry *reg = disp_registry_new(root);
    for (size_t i = 0; i < sizeof tools_src / sizeof *tools_src; i++) {
        char *p = file_in(tooldir, tools_src[i][0], tools_src[i][1]);
        if (disp_registry_add_tool(reg, p, err, sizeof err) != 0)
            fail_msg("%s", err);
        free(p);
    }
    for (size_t i = 0; i < sizeof agents_src / sizeof *agents_src; i++) {
        char *p = file_in(agentdir, agents_src[i][0], agents_src[i][1]);
        if (disp_registry_add_agent(reg, p, err, sizeof err) != 0)
            fail_msg("%s", err);
        free(p);
    }
    return reg;
}

static int setup(void **state) {
    (void)state;
    const char *dir = getenv("NETRA_TEST_DIR");
    snprintf(root, sizeof root, "%s/disp-%d/lua", dir ? dir : "/tmp",
             (int)getpid());
    snprintf(tooldir, sizeof tooldir, "%s/netra/tools", root);
    snprintf(agentdir, sizeof agentdir, "%s/netra/agents", root);
    mkdir_p(tooldir);
    mkdir_p(agentdir);
    log_setup(NLOG_ERROR, false);

    REG = full_registry();
    disp_pool_config cfg = {.workers = 2,
                            .max_inflight_per_user = 4,
                            .time_ms = 500,
                            .memory_bytes = 16 << 20,
                            .record = on_record};
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

static netra_ctx *user_ctx(const char *user) {
    char err[256];
    ctx_fields f = {.user_id = user, .thread_id = "thread-1"};
    netra_ctx *ctx = ctx_new(&f, err, sizeof err);
    assert_non_null(ctx);
    return ctx;
}

/* Starts a tool call for user; returns its collector (and dispatcher). */
static coll *start_call(const char *user, const char *tool, const char *args,
                        const cJSON *token) {
    coll *c = coll_new();
    netra_ctx *ctx = user_ctx(user);
    char err[512];
    disp_sink sink = {c, c_event, c_progress, c_done};
    c->d = disp_new(POOL, ctx, &sink, err, sizeof err);
    ctx_unref(ctx);
    assert_non_null(c->d);
    int code = 0;
    if (disp_call_tool(c->d, tool, cJSON_Parse(args), token, &code, err,
                       sizeof err) != 0)
        fail_msg("call refused: %s", err);
    return c;
}

/* Runs a call to the end and returns its collector (dispatcher freed). */
static coll *call(const char *user, const char *tool, const char *args) {
    coll *c = start_call(user, tool, args, NULL);
    assert_true(coll_wait(c, 20000));
    disp_release(c->d);
    return c;
}

static const char *text_of(const cJSON *result) {
    const cJSON *item = cJSON_GetArrayItem(
        cJSON_GetObjectItem(result, "content"), 0);
    return cJSON_GetStringValue(cJSON_GetObjectItem(item, "text"));
}

static bool is_error(const cJSON *result) {
    return cJSON_IsTrue(cJSON_GetObjectItem(result, "isError"));
}

static const char *ev_str(const cJSON *ev, const char *k) {
    return cJSON_GetStringValue(cJSON_GetObjectItem(ev, k));
}

/* ---- registration ---------------------------------------------------------------- */

static void add_expect_error(const char *name, const char *body,
                             bool agent, const char *want) {
    disp_registry *reg = disp_registry_new(root);
    char err[1024] = "";
    char *first = file_in(tooldir, "echo", tools_src[0][1]);
    assert_int_equal(disp_registry_add_tool(reg, first, err, sizeof err), 0);
    char *p = file_in(agent ? agentdir : tooldir, name, body);
    int rc = agent ? disp_registry_add_agent(reg, p, err, sizeof err)
                   : disp_registry_add_tool(reg, p, err, sizeof err);
    assert_int_equal(rc, -1);
    /* the sandbox may show the path relative to the lua dir's parent */
    const char *tail = strstr(p, "/netra/");
    if (!strstr(err, tail)) fail_msg("error does not name %s: %s", p, err);
    if (!strstr(err, want)) fail_msg("want '%s' in: %s", want, err);
    free(first);
    free(p);
    disp_registry_unref(reg);
}

static void test_registration_errors(void **state) {
    (void)state;
    add_expect_error("echo2", TOOL("echo", "{ type = 'object' }", "return 1"),
                     false, "already registered by");
    add_expect_error("echo3", TOOL("echo", "{ type = 'object' }", "return 1"),
                     false, "/echo.lua");
    add_expect_error("badschema",
                     TOOL("badschema", "{ type = 'nonsense' }", "return 1"),
                     false, "inputSchema");
    add_expect_error("unsupported",
                     TOOL("unsupported",
                          "{ type = 'object', ['$dynamicRef'] = '#x' }",
                          "return 1"),
                     false, "unsupported keyword");
    add_expect_error("nohandler",
                     "return { name = 'nohandler', description = 'd', "
                     "inputSchema = { type = 'object' } }",
                     false, "handler must be a function");
    add_expect_error("norun",
                     "return { name = 'norun', description = 'd' }", true,
                     "run must be a function");
    add_expect_error("syntax", "return { name = ", false, "syntax.lua");
}

static void test_tools_json(void **state) {
    (void)state;
    cJSON *tools = disp_registry_tools_json(REG);
    cJSON *agents = disp_registry_agents_json(REG);
    bool shaped = false;
    cJSON *t;
    cJSON_ArrayForEach(t, tools) {
        assert_non_null(cJSON_GetObjectItem(t, "inputSchema"));
        if (!strcmp(ev_str(t, "name"), "shaped"))
            shaped = cJSON_GetObjectItem(t, "outputSchema") != NULL;
    }
    assert_true(shaped);
    assert_int_equal(cJSON_GetArraySize(agents), 3);
    assert_true(disp_registry_has_tool(REG, "echo"));
    assert_false(disp_registry_has_tool(REG, "helper"));
    assert_true(disp_registry_has_agent(REG, "helper"));
    cJSON_Delete(tools);
    cJSON_Delete(agents);
}

/* ---- contexts -------------------------------------------------------------------- */

static void test_global_state_refused(void **state) {
    (void)state;
    char err[512] = "";
    disp_sink sink = {0};
    assert_null(disp_new(POOL, NULL, &sink, err, sizeof err));
    assert_int_equal(strncmp(err, "GLOBAL STATE USAGE:", 19), 0);
}

static void test_unknown_tool_refused(void **state) {
    (void)state;
    netra_ctx *ctx = user_ctx("alice");
    char err[512];
    disp_sink sink = {0};
    disp *d = disp_new(POOL, ctx, &sink, err, sizeof err);
    ctx_unref(ctx);
    int code = 0;
    assert_int_equal(disp_call_tool(d, "nope", NULL, NULL, &code, err,
                                    sizeof err), -1);
    assert_int_equal(code, DISP_BAD_PARAMS);
    assert_non_null(strstr(err, "unknown tool 'nope'"));
    disp_release(d);
}

/* ---- results ------------------------------------------------------------------------ */

static void test_result_mapping(void **state) {
    (void)state;
    coll *c = call("alice", "echo", "{\"text\":\"hello\"}");
    assert_false(is_error(c->result));
    assert_string_equal(text_of(c->result), "hello");
    coll_free(c);

    c = call("alice", "table", "{}");
    cJSON *sc = cJSON_GetObjectItem(c->result, "structuredContent");
    assert_int_equal(cJSON_GetObjectItem(sc, "n")->valueint, 42);
    assert_string_equal(ev_str(sc, "who"), "alice");
    assert_non_null(strstr(text_of(c->result), "\"n\":42"));
    coll_free(c);

    c = call("alice", "fail", "{}");
    assert_true(is_error(c->result));
    assert_string_equal(text_of(c->result), "no luck today");
    coll_free(c);

    c = call("alice", "boom", "{}");
    assert_true(is_error(c->result));
    assert_non_null(strstr(text_of(c->result), "boom.lua:5"));
    coll_free(c);

    c = call("alice", "shaped", "{}");
    assert_true(is_error(c->result));
    assert_non_null(strstr(text_of(c->result), "result.n: expected integer"));
    coll_free(c);
    c = call("alice", "shaped", "{\"good\":true}");
    assert_false(is_error(c->result));
    coll_free(c);

    c = call("alice", "globals", "{}");
    assert_true(is_error(c->result));
    assert_non_null(strstr(text_of(c->result), "GLOBAL STATE USAGE"));
    coll_free(c);
}

static void test_invalid_arguments(void **state) {
    (void)state;
    int before = atomic_load(&records);
    coll *c = call("alice", "echo", "{\"text\":5}");
    assert_true(is_error(c->result));
    assert_string_equal(text_of(c->result), "arguments.text: expected string");
    assert_int_equal(cJSON_GetArraySize(c->events), 2);
    assert_int_equal(atomic_load(&records), before + 1);
    coll_free(c);

    c = call("alice", "echo", "{}");
    assert_non_null(strstr(text_of(c->result), "arguments: missing required"));
    coll_free(c);
}

/* ---- events ------------------------------------------------------------------------- */

static void test_events(void **state) {
    (void)state;
    coll *c = call("alice", "echo",
                   "{\"text\":\"x\",\"nested\":{\"Password\":\"p\","
                   "\"list\":[{\"API_KEY\":\"k\"}]},\"auth_token\":\"t\"}");
    /* additionalProperties are allowed by echo's schema */
    assert_int_equal(cJSON_GetArraySize(c->events), 2);
    cJSON *ex = cJSON_GetArrayItem(c->events, 0);
    cJSON *co = cJSON_GetArrayItem(c->events, 1);
    assert_string_equal(ev_str(ex, "type"), "tool_executing");
    assert_string_equal(ev_str(co, "type"), "tool_completed");
    assert_string_equal(ev_str(ex, "tool_call_id"), ev_str(co, "tool_call_id"));
    assert_string_equal(ev_str(ex, "tool_name"), "echo");
    assert_string_equal(ev_str(ex, "user_id"), "alice");
    assert_string_equal(ev_str(ex, "thread_id"), "thread-1");
    assert_true(cJSON_IsNull(cJSON_GetObjectItem(ex, "agent_name")));
    assert_non_null(cJSON_GetObjectItem(ex, "run_id"));
    const char *ts = ev_str(ex, "timestamp");
    assert_int_equal(strlen(ts), 24);
    assert_int_equal(ts[23], 'Z');
    assert_int_equal(ts[19], '.');
    char *args = cJSON_PrintUnformatted(cJSON_GetObjectItem(ex, "arguments"));
    assert_non_null(strstr(args, "\"Password\":\"[REDACTED]\""));
    assert_non_null(strstr(args, "\"API_KEY\":\"[REDACTED]\""));
    assert_non_null(strstr(args, "\"auth_token\":\"[REDACTED]\""));
    assert_null(strstr(args, "\"p\""));
    free(args);
    pthread_mutex_lock(&rec_lock);
    assert_null(strstr(last_record_args, "\"k\""));
    assert_non_null(strstr(last_record_args, "[REDACTED]"));
    pthread_mutex_unlock(&rec_lock);
    cJSON *res = cJSON_GetObjectItem(co, "results");
    assert_string_equal(text_of(res), "x");
    coll_free(c);
}

static void test_progress_emit_log(void **state) {
    (void)state;
    cJSON *token = cJSON_CreateString("tok-1");
    coll *c = start_call("alice", "progress", "{}", token);
    assert_true(coll_wait(c, 20000));
    disp_release(c->d);
    /* executing, progress 1, progress 2 (the repeated 1 is dropped),
     * note, completed */
    assert_int_equal(cJSON_GetArraySize(c->events), 5);
    cJSON *p1 = cJSON_GetObjectItem(cJSON_GetArrayItem(c->events, 1),
                                    "params");
    assert_string_equal(ev_str(p1, "progressToken"), "tok-1");
    assert_int_equal(cJSON_GetObjectItem(p1, "progress")->valueint, 1);
    assert_int_equal(cJSON_GetObjectItem(p1, "total")->valueint, 3);
    assert_string_equal(ev_str(p1, "message"), "one");
    cJSON *p2 = cJSON_GetObjectItem(cJSON_GetArrayItem(c->events, 2),
                                    "params");
    assert_int_equal(cJSON_GetObjectItem(p2, "progress")->valueint, 2);
    cJSON *note = cJSON_GetArrayItem(c->events, 3);
    assert_string_equal(ev_str(note, "type"), "note");
    assert_int_equal(
        cJSON_GetObjectItem(cJSON_GetObjectItem(note, "data"), "k")->valueint,
        1);
    coll_free(c);
    cJSON_Delete(token);

    /* without a token no progress is sent */
    c = call("alice", "progress", "{}");
    assert_int_equal(cJSON_GetArraySize(c->events), 3);
    coll_free(c);
}

static void test_nested_calls(void **state) {
    (void)state;
    coll *c = call("alice", "nest", "{}");
    assert_false(is_error(c->result));
    /* nest executing, echo pair, echo (invalid) pair, nest completed */
    assert_int_equal(cJSON_GetArraySize(c->events), 6);
    cJSON *e1 = cJSON_GetArrayItem(c->events, 1);
    cJSON *e2 = cJSON_GetArrayItem(c->events, 2);
    assert_string_equal(ev_str(e1, "tool_name"), "echo");
    assert_string_equal(ev_str(e1, "tool_call_id"), ev_str(e2, "tool_call_id"));
    assert_string_not_equal(
        ev_str(e1, "tool_call_id"),
        ev_str(cJSON_GetArrayItem(c->events, 0), "tool_call_id"));
    cJSON *sc = cJSON_GetObjectItem(c->result, "structuredContent");
    assert_string_equal(ev_str(sc, "r"), "inner");
    assert_string_equal(ev_str(sc, "why"), "arguments.text: expected string");
    coll_free(c);
}

static void test_depth_limit(void **state) {
    (void)state;
    coll *c = call("alice", "deep", "{}");
    assert_false(is_error(c->result));
    cJSON *sc = cJSON_GetObjectItem(c->result, "structuredContent");
    assert_int_equal(cJSON_GetObjectItem(sc, "reached")->valueint, 8);
    assert_non_null(strstr(ev_str(sc, "err"), "at most 8"));
    /* 1 bare + 8 nested calls, each a pair */
    assert_int_equal(cJSON_GetArraySize(c->events), 18);
    coll_free(c);
}

static void test_state_is_per_request(void **state) {
    (void)state;
    for (int i = 0; i < 3; i++) {
        coll *c = call("alice", "state", "{}");
        assert_string_equal(text_of(c->result), "1");
        coll_free(c);
    }
}

static void test_clickhouse_disabled(void **state) {
    (void)state;
    coll *c = call("alice", "noch", "{}");
    assert_string_equal(text_of(c->result), "Not connected to ClickHouse.");
    coll_free(c);
}

/* Two users at once: each sink gets only its own events. */
static void test_sink_isolation(void **state) {
    (void)state;
    coll *a[4], *b[4];
    for (int i = 0; i < 4; i++) {
        a[i] = start_call("alice", "echo", "{\"text\":\"from-a\"}", NULL);
        b[i] = start_call("bob", "table", "{}", NULL);
    }
    for (int i = 0; i < 4; i++) {
        assert_true(coll_wait(a[i], 20000));
        assert_true(coll_wait(b[i], 20000));
        cJSON *ev;
        cJSON_ArrayForEach(ev, a[i]->events) {
            assert_string_equal(ev_str(ev, "user_id"), "alice");
            assert_string_equal(ev_str(ev, "tool_name"), "echo");
        }
        cJSON_ArrayForEach(ev, b[i]->events) {
            assert_string_equal(ev_str(ev, "user_id"), "bob");
            assert_string_equal(ev_str(ev, "tool_name"), "table");
        }
        assert_int_equal(cJSON_GetArraySize(a[i]->events), 2);
        assert_int_equal(a[i]->dones, 1);
        disp_release(a[i]->d);
        disp_release(b[i]->d);
        coll_free(a[i]);
        coll_free(b[i]);
    }
}

/* ---- budgets ------------------------------------------------------------------------- */

static void test_budgets(void **state) {
    (void)state;
    static const char *const runaway[][2] = {
        {"loop", "budget"},      {"coloop", "budget"},
        {"alloc", "budget"},     {"pcallloop", "budget"},
        {"regex", "too costly"},
    };
    for (size_t i = 0; i < sizeof runaway / sizeof *runaway; i++) {
        /* meanwhile another user's calls keep completing */
        coll *bad = start_call("mallory", runaway[i][0], "{}", NULL);
        for (int k = 0; k < 5; k++) {
            coll *ok = call("alice", "echo", "{\"text\":\"still here\"}");
            assert_string_equal(text_of(ok->result), "still here");
            coll_free(ok);
        }
        assert_true(coll_wait(bad, 20000));
        disp_release(bad->d);
        assert_true(is_error(bad->result));
        const char *t = text_of(bad->result);
        if (!strstr(t, runaway[i][1]))
            fail_msg("%s: want '%s' in: %s", runaway[i][0], runaway[i][1],
                     t);
        if (strcmp(runaway[i][0], "regex"))
            assert_non_null(strstr(t, runaway[i][0]));
        cJSON *co = cJSON_GetArrayItem(bad->events, 1);
        assert_string_equal(ev_str(co, "type"), "tool_completed");
        coll_free(bad);

        /* the same worker serves the next call */
        coll *next = call("mallory", "echo", "{\"text\":\"after\"}");
        assert_string_equal(text_of(next->result), "after");
        coll_free(next);
    }
}

/* ---- admission and cancel --------------------------------------------------------- */

static void test_per_user_cap(void **state) {
    (void)state;
    coll *busy[4];
    for (int i = 0; i < 4; i++)
        busy[i] = start_call("carol", "loop", "{}", NULL);

    netra_ctx *ctx = user_ctx("carol");
    char err[512];
    disp_sink sink = {0};
    disp *d = disp_new(POOL, ctx, &sink, err, sizeof err);
    int code = 0;
    assert_int_equal(disp_call_tool(d, "echo", cJSON_Parse("{\"text\":\"x\"}"),
                                    NULL, &code, err, sizeof err), -1);
    assert_int_equal(code, DISP_BUSY);
    assert_non_null(strstr(err, "busy"));
    assert_non_null(strstr(err, "retry"));
    disp_release(d);
    ctx_unref(ctx);

    /* other users are admitted */
    coll *ok = call("dave", "echo", "{\"text\":\"fine\"}");
    assert_string_equal(text_of(ok->result), "fine");
    coll_free(ok);

    for (int i = 0; i < 4; i++) {
        assert_true(coll_wait(busy[i], 20000));
        disp_release(busy[i]->d);
        coll_free(busy[i]);
    }
}

static void test_cancel_queued_and_running(void **state) {
    (void)state;
    coll *c = start_call("erin", "loop", "{}", NULL);
    disp_cancel(c->d, "test says stop");
    assert_true(coll_wait(c, 20000));
    assert_true(is_error(c->result));
    assert_int_equal(c->dones, 1);
    disp_release(c->d);
    coll_free(c);
}

/* ---- agents -------------------------------------------------------------------------- */

static coll *run_agent(const char *user, const char *agent, const char *in,
                       int cancel_after_ms) {
    coll *c = coll_new();
    netra_ctx *ctx = user_ctx(user);
    char err[512];
    disp_sink sink = {c, c_event, c_progress, c_done};
    c->d = disp_new(POOL, ctx, &sink, err, sizeof err);
    ctx_unref(ctx);
    int code;
    assert_int_equal(disp_run_agent(c->d, agent, cJSON_Parse(in), &code, err,
                                    sizeof err), 0);
    if (cancel_after_ms) {
        usleep((useconds_t)cancel_after_ms * 1000);
        disp_cancel(c->d, "stop the agent");
    }
    assert_true(coll_wait(c, 20000));
    disp_release(c->d);
    return c;
}

static const char *last_type(coll *c) {
    int n = cJSON_GetArraySize(c->events);
    return ev_str(cJSON_GetArrayItem(c->events, n - 1), "type");
}

static int count_type(coll *c, const char *type) {
    int n = 0;
    cJSON *ev;
    cJSON_ArrayForEach(ev, c->events) n += !strcmp(ev_str(ev, "type"), type);
    return n;
}

static void test_agent_sequence(void **state) {
    (void)state;
    coll *c = run_agent("alice", "helper", "{\"topic\":\"rain\"}", 0);
    const char *want[] = {"agent_started", "agent_thinking", "tool_executing",
                          "tool_completed", "agent_completed"};
    assert_int_equal(cJSON_GetArraySize(c->events), 5);
    for (int i = 0; i < 5; i++) {
        cJSON *ev = cJSON_GetArrayItem(c->events, i);
        assert_string_equal(ev_str(ev, "type"), want[i]);
        assert_string_equal(ev_str(ev, "agent_name"), "helper");
        assert_non_null(ev_str(ev, "run_id"));
    }
    assert_string_equal(
        ev_str(cJSON_GetArrayItem(c->events, 1), "text"), "thinking about rain");
    cJSON *res = cJSON_GetObjectItem(cJSON_GetArrayItem(c->events, 4),
                                     "result");
    assert_string_equal(ev_str(res, "said"), "hi");
    assert_null(c->result);
    coll_free(c);
}

static void test_agent_raises(void **state) {
    (void)state;
    coll *c = run_agent("alice", "raiser", "{}", 0);
    assert_string_equal(last_type(c), "agent_error");
    assert_int_equal(count_type(c, "agent_error"), 1);
    assert_int_equal(count_type(c, "agent_completed"), 0);
    cJSON *err = cJSON_GetObjectItem(
        cJSON_GetArrayItem(c->events, cJSON_GetArraySize(c->events) - 1),
        "error");
    assert_non_null(strstr(ev_str(err, "message"), "agent broke"));
    coll_free(c);
}

static void test_agent_budget_and_cancel(void **state) {
    (void)state;
    coll *c = run_agent("alice", "spinner", "{}", 0);
    assert_string_equal(last_type(c), "agent_error");
    assert_int_equal(count_type(c, "agent_error"), 1);
    coll_free(c);

    c = run_agent("alice", "spinner", "{}", 50);
    assert_string_equal(last_type(c), "agent_error");
    assert_int_equal(count_type(c, "agent_error"), 1);
    cJSON *err = cJSON_GetObjectItem(
        cJSON_GetArrayItem(c->events, cJSON_GetArraySize(c->events) - 1),
        "error");
    assert_non_null(strstr(ev_str(err, "message"), "cancelled"));
    coll_free(c);
}

static void test_release_in_done(void **state) {
    (void)state;
    coll *c = coll_new();
    c->release_in_done = true;
    netra_ctx *ctx = user_ctx("alice");
    char err[512];
    disp_sink sink = {c, c_event, c_progress, c_done};
    c->d = disp_new(POOL, ctx, &sink, err, sizeof err);
    ctx_unref(ctx);
    int code;
    assert_int_equal(disp_call_tool(c->d, "echo",
                                    cJSON_Parse("{\"text\":\"r\"}"), NULL,
                                    &code, err, sizeof err), 0);
    assert_true(coll_wait(c, 20000));
    assert_string_equal(text_of(c->result), "r");
    coll_free(c);
}

/* A pool freed with an agent in flight ends it with agent_error. */
static void test_pool_shutdown(void **state) {
    (void)state;
    char err[1024];
    disp_pool_config cfg = {.workers = 1, .time_ms = 60000};
    disp_pool *p = disp_pool_new(REG, &cfg, err, sizeof err);
    assert_non_null(p);
    coll *c = coll_new();
    netra_ctx *ctx = user_ctx("alice");
    disp_sink sink = {c, c_event, c_progress, c_done};
    c->d = disp_new(p, ctx, &sink, err, sizeof err);
    ctx_unref(ctx);
    int code;
    assert_int_equal(disp_run_agent(c->d, "helper", NULL, &code, err,
                                    sizeof err), 0);
    disp_pool_free(p);
    assert_int_equal(c->dones, 1);
    assert_true(!strcmp(last_type(c), "agent_error") ||
                !strcmp(last_type(c), "agent_completed"));
    disp_release(c->d);
    coll_free(c);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_registration_errors),
        cmocka_unit_test(test_tools_json),
        cmocka_unit_test(test_global_state_refused),
        cmocka_unit_test(test_unknown_tool_refused),
        cmocka_unit_test(test_result_mapping),
        cmocka_unit_test(test_invalid_arguments),
        cmocka_unit_test(test_events),
        cmocka_unit_test(test_progress_emit_log),
        cmocka_unit_test(test_nested_calls),
        cmocka_unit_test(test_depth_limit),
        cmocka_unit_test(test_state_is_per_request),
        cmocka_unit_test(test_clickhouse_disabled),
        cmocka_unit_test(test_sink_isolation),
        cmocka_unit_test(test_budgets),
        cmocka_unit_test(test_per_user_cap),
        cmocka_unit_test(test_cancel_queued_and_running),
        cmocka_unit_test(test_agent_sequence),
        cmocka_unit_test(test_agent_raises),
        cmocka_unit_test(test_agent_budget_and_cancel),
        cmocka_unit_test(test_release_in_done),
        cmocka_unit_test(test_pool_shutdown),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
