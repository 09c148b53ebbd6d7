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

#define SBX_UNLIMITED_TEST (-1) /* sandbox.h SBX_UNLIMITED */

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
    {"keeper",
     "local saved\n"
     "return { name = 'keeper', description = 'keeps ctx', inputSchema = { "
     "type = 'object' },\n handler = function(ctx, args)\n"
     "  if args.keep then saved = ctx return 'kept' end\n"
     "  local out = {}\n"
     "  local function try(f)\n"
     "    local ok, e = pcall(f)\n"
     "    out[#out + 1] = ok and ('LEAK:' .. tostring(e)) or tostring(e)\n"
     "  end\n"
     "  try(function() return saved.user_id end)\n"
     "  try(function() return saved:call('table', {}).who end)\n"
     "  try(function() saved:emit('x', {}) return 'emitted' end)\n"
     "  try(function() saved:log('info', 'x') return 'logged' end)\n"
     "  try(function() return tostring(saved.clickhouse) end)\n"
     "  try(function() return ctx.emit(saved, 'x', {}) or 'emitted' end)\n"
     "  return table.concat(out, '|')\n end }\n"},
    {"writer", TOOL("writer", "{ type = 'object' }",
                    "local ok1 = pcall(function() ctx.user_id = 'alice' end)\n"
                    " local ok2 = pcall(rawset, ctx, 'user_id', 'alice')\n"
                    " local r = ctx:call('table', {})\n"
                    " return { w1 = ok1, w2 = ok2, who = r.who, seen = "
                    "ctx.user_id,\n mt = tostring(getmetatable(ctx)) }")},
    {"badutf", TOOL("badutf", "{ type = 'object' }",
                    "local m = args.mode\n"
                    " if m == 1 then return '\\xc3\\x28 bad' end\n"
                    " if m == 2 then return nil, 'bad \\xfe msg' end\n"
                    " if m == 3 then error('bad \\xff byte') end\n"
                    " if m == 4 then ctx:progress(1, 2, 'p\\xff') return 'ok' "
                    "end\n"
                    " if m == 5 then return { ['\\xff'] = 1 } end\n"
                    " if m == 6 then ctx:emit('x', { ['\\xff'] = 1 }) end\n"
                    " if m == 7 then return 'a\\0b' end\n"
                    " if m == 8 then ctx:emit('t\\xff', {}) end\n"
                    " return 'ok'")},
    {"huge", TOOL("huge", "{ type = 'object' }",
                  "local s = ('R'):rep(args.n or 5 * 1024 * 1024)\n"
                  " if args.table then return { s = s } end\n"
                  " return s")},
    {"closer", TOOL("closer", "{ type = 'object' }",
                    "local x <close> = setmetatable({}, { __close = "
                    "function() ctx:emit('closed', {}) end })\n"
                    " error('boom in closer')")},
    {"float", TOOL("float", "{ type = 'object' }", "return 0.1 + 0.2")},
    {"chguard", TOOL("chguard", "{ type = 'object' }",
                     "local r, e = ctx.clickhouse:query(args.sql)\n"
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
    {"nester",
     "return { name = 'nester', description = 'a',\n"
     " run = function(ctx, input) ctx:think('calling loop')\n"
     "  return { r = ctx:call('loop', {}) } end }\n"},
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

/* D13: MCP needs an object at the root of inputSchema. */
static void test_schema_root_must_be_object(void **state) {
    (void)state;
    add_expect_error("strroot",
                     TOOL("strroot", "{ type = 'string' }", "return 1"),
                     false, "inputSchema: the root must be {type = \"object\"");
    add_expect_error("noroot",
                     TOOL("noroot", "{ properties = {} }", "return 1"),
                     false, "inputSchema: the root must be");
}

/* D4: budgets above the ceilings are refused at registration. */
static void test_budget_ceilings(void **state) {
    (void)state;
    add_expect_error("bigtime",
                     "return { name = 'bigtime', description = 'd', "
                     "inputSchema = { type = 'object' }, budget = { time_ms = "
                     "math.maxinteger }, handler = function() end }",
                     false, "budget.time_ms");
    add_expect_error("biginstr",
                     "return { name = 'biginstr', description = 'd', "
                     "inputSchema = { type = 'object' }, budget = { "
                     "instructions = 1 << 60 }, handler = function() end }",
                     false, "budget.instructions");
    add_expect_error("bigmem",
                     "return { name = 'bigmem', description = 'd', "
                     "inputSchema = { type = 'object' }, budget = { "
                     "memory_bytes = 1 << 40 }, handler = function() end }",
                     false, "budget.memory_bytes");
    add_expect_error("bigagent",
                     "return { name = 'bigagent', description = 'd', budget = "
                     "{ time_ms = 100000000 }, run = function() end }",
                     true, "at most");
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
    assert_int_equal(cJSON_GetArraySize(agents), 4);
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


/* ---- attacks on ctx, results and the pool ---------------------------------- */

static coll *start_on(disp_pool *p, const char *user, const char *tool,
                      const char *args, const cJSON *token) {
    coll *c = coll_new();
    netra_ctx *ctx = user_ctx(user);
    char err[512];
    disp_sink sink = {c, c_event, c_progress, c_done};
    c->d = disp_new(p, ctx, &sink, err, sizeof err);
    ctx_unref(ctx);
    assert_non_null(c->d);
    int code = 0;
    if (disp_call_tool(c->d, tool, cJSON_Parse(args), token, &code, err,
                       sizeof err) != 0)
        fail_msg("call refused: %s", err);
    return c;
}

static coll *call_on(disp_pool *p, const char *user, const char *tool,
                     const char *args) {
    coll *c = start_on(p, user, tool, args, NULL);
    assert_true(coll_wait(c, 30000));
    disp_release(c->d);
    return c;
}

static disp_pool *one_worker(int64_t time_ms, int64_t instructions) {
    char err[1024];
    disp_pool_config cfg = {.workers = 1, .time_ms = time_ms,
                            .instructions = instructions};
    disp_pool *p = disp_pool_new(REG, &cfg, err, sizeof err);
    if (!p) fail_msg("%s", err);
    return p;
}

/* D1: a ctx kept in a file-level local is dead once its call ended. */
static void test_stale_ctx_refused(void **state) {
    (void)state;
    disp_pool *p = one_worker(2000, 0);
    coll *a = call_on(p, "alice", "keeper", "{\"keep\":true}");
    assert_string_equal(text_of(a->result), "kept");
    coll_free(a);
    coll *e = call_on(p, "eve", "keeper", "{}");
    const char *t = text_of(e->result);
    if (strstr(t, "LEAK") || strstr(t, "alice"))
        fail_msg("a stale ctx still works: %s", t);
    const char *want = "ctx used outside its request: a ctx is valid only "
                       "during the call that received it";
    int hits = 0;
    for (const char *q = t; (q = strstr(q, want)); q++) hits++;
    if (hits != 6) fail_msg("want 6 refusals in: %s", t);
    /* nothing reached eve's (or anyone's) sink but eve's own pair */
    assert_int_equal(cJSON_GetArraySize(e->events), 2);
    coll_free(e);
    disp_pool_free(p);
}

/* D2: ctx is read-only, and nested calls see the caller's identity. */
static void test_ctx_read_only(void **state) {
    (void)state;
    coll *c = call("eve", "writer", "{}");
    assert_false(is_error(c->result));
    cJSON *sc = cJSON_GetObjectItem(c->result, "structuredContent");
    assert_true(cJSON_IsFalse(cJSON_GetObjectItem(sc, "w1")));
    assert_true(cJSON_IsFalse(cJSON_GetObjectItem(sc, "w2")));
    assert_string_equal(ev_str(sc, "who"), "eve");
    assert_string_equal(ev_str(sc, "seen"), "eve");
    assert_string_equal(ev_str(sc, "mt"), "locked");
    coll_free(c);
}

static bool all_utf8(const cJSON *v) {
    char *text = cJSON_PrintUnformatted(v);
    const unsigned char *u = (const unsigned char *)text;
    bool ok = true;
    size_t n = strlen(text), i = 0;
    while (ok && i < n) {
        unsigned char b = u[i];
        size_t k = b < 0x80 ? 1 : b >= 0xc2 && b <= 0xdf ? 2
                 : b >= 0xe0 && b <= 0xef ? 3 : b >= 0xf0 && b <= 0xf4 ? 4
                                                                     : 0;
        if (!k || i + k > n) ok = false;
        for (size_t m = 1; ok && m < k; m++)
            if ((u[i + m] & 0xc0) != 0x80) ok = false;
        i += k ? k : 1;
    }
    free(text);
    return ok;
}

/* D3: nothing invalid reaches the client; NUL in results is refused. */
static void test_invalid_utf8_never_leaves(void **state) {
    (void)state;
    cJSON *token = cJSON_CreateString("tok-u");
    for (int mode = 1; mode <= 8; mode++) {
        char args[32];
        snprintf(args, sizeof args, "{\"mode\":%d}", mode);
        coll *c = start_call("alice", "badutf", args, token);
        assert_true(coll_wait(c, 20000));
        disp_release(c->d);
        if (!all_utf8(c->result) || !all_utf8(c->events)) {
            char *r = cJSON_PrintUnformatted(c->result);
            fail_msg("mode %d: invalid UTF-8 left: %s", mode, r);
        }
        if (mode == 1 || mode == 7 || mode == 5)
            assert_true(is_error(c->result));
        if (mode == 7)
            assert_non_null(strstr(text_of(c->result), "NUL"));
        if (mode == 1)
            assert_non_null(strstr(text_of(c->result), "UTF-8"));
        coll_free(c);
    }
    cJSON_Delete(token);
}

/* D4: shutdown and cancel end a CPU loop that has a huge time budget. */
typedef struct {
    disp_pool *p;
    atomic_bool done;
} freer;

static void *free_pool(void *arg) {
    freer *f = arg;
    disp_pool_free(f->p);
    atomic_store(&f->done, true);
    return NULL;
}

static void test_cancel_and_shutdown_stop_cpu_loops(void **state) {
    (void)state;
    disp_pool *p = one_worker(600000, SBX_UNLIMITED_TEST);
    coll *c = start_on(p, "alice", "loop", "{}", NULL);
    usleep(200 * 1000);
    disp_cancel(c->d, "enough");
    assert_true(coll_wait(c, 30000));
    assert_true(is_error(c->result));
    assert_non_null(strstr(text_of(c->result), "enough"));
    disp_release(c->d);
    coll_free(c);

    c = start_on(p, "alice", "loop", "{}", NULL);
    usleep(200 * 1000);
    freer f = {.p = p};
    pthread_t th;
    pthread_create(&th, NULL, free_pool, &f);
    for (int i = 0; i < 300 && !atomic_load(&f.done); i++) usleep(100 * 1000);
    assert_true(atomic_load(&f.done)); /* else the pool never stopped */
    pthread_join(th, NULL);
    assert_int_equal(c->dones, 1);
    disp_release(c->d);
    coll_free(c);
}

/* D5: one user's flood does not hold another user's call until it ends. */
static void test_fair_between_users(void **state) {
    (void)state;
    char err[1024];
    disp_pool_config cfg = {.workers = 2, .time_ms = 1000,
                            .instructions = SBX_UNLIMITED_TEST,
                            .max_inflight_per_user = 16};
    disp_pool *p = disp_pool_new(REG, &cfg, err, sizeof err);
    assert_non_null(p);
    coll *a[16];
    for (int i = 0; i < 16; i++) a[i] = start_on(p, "flood", "loop", "{}", NULL);
    coll *b = start_on(p, "bob", "echo", "{\"text\":\"served\"}", NULL);
    assert_true(coll_wait(b, 60000));
    int ended = 0;
    for (int i = 0; i < 16; i++) {
        pthread_mutex_lock(&a[i]->lock);
        ended += a[i]->dones;
        pthread_mutex_unlock(&a[i]->lock);
    }
    if (ended >= 16) fail_msg("bob waited for all 16 of flood's calls");
    assert_string_equal(text_of(b->result), "served");
    disp_release(b->d);
    coll_free(b);
    for (int i = 0; i < 16; i++) {
        assert_true(coll_wait(a[i], 60000));
        disp_release(a[i]->d);
        coll_free(a[i]);
    }
    disp_pool_free(p);
}

/* D6: results past the limit become errors. */
static void test_result_size_limit(void **state) {
    (void)state;
    char err[1024];
    disp_pool_config cfg = {.workers = 1, .max_result_bytes = 100000};
    disp_pool *p = disp_pool_new(REG, &cfg, err, sizeof err);
    assert_non_null(p);
    coll *c = call_on(p, "alice", "huge", "{\"n\":200000}");
    assert_true(is_error(c->result));
    assert_non_null(strstr(text_of(c->result), "result too large (200000 "
                                               "bytes; the limit is 100000)"));
    coll_free(c);
    c = call_on(p, "alice", "huge", "{\"n\":200000,\"table\":true}");
    assert_true(is_error(c->result));
    assert_non_null(strstr(text_of(c->result), "result too large"));
    coll_free(c);
    c = call_on(p, "alice", "huge", "{\"n\":1000}");
    assert_false(is_error(c->result));
    coll_free(c);
    disp_pool_free(p);

    /* the default limit is 4 MiB */
    c = call("alice", "huge", "{}");
    assert_true(is_error(c->result));
    assert_non_null(strstr(text_of(c->result), "the limit is 4194304"));
    coll_free(c);
}

/* D7: a run cancelled inside a nested call ends that call's frame too
 * (ASan reports the frame as a leak otherwise). */
static void test_agent_cancelled_in_nested_call(void **state) {
    (void)state;
    coll *c = run_agent("alice", "nester", "{}", 150);
    assert_string_equal(last_type(c), "agent_error");
    assert_int_equal(count_type(c, "tool_executing"), 1);
    assert_int_equal(count_type(c, "tool_completed"), 1);
    coll_free(c);
}

/* D15: __close handlers run when a handler raises. */
static void test_close_runs_on_error(void **state) {
    (void)state;
    coll *c = call("alice", "closer", "{}");
    assert_true(is_error(c->result));
    assert_non_null(strstr(text_of(c->result), "boom in closer"));
    assert_int_equal(count_type(c, "closed"), 1);
    coll_free(c);
}

/* D8: a number returned alone reads back as the same double. */
static void test_float_round_trips(void **state) {
    (void)state;
    coll *c = call("alice", "float", "{}");
    assert_string_equal(text_of(c->result), "0.30000000000000004");
    coll_free(c);
}

/* D18: ctx.clickhouse refuses writes, KILL and table functions. */
static void test_clickhouse_guard(void **state) {
    (void)state;
    static const char *const cases[][2] = {
        {"SELECT * FROM url('http://127.0.0.1:1/x', CSV, 'a String')",
         "table function 'url'"},
        {"select 1 from  S3 ('x')", "table function 's3'"},
        {"KILL QUERY WHERE 1", "only SELECT"},
        {"/* hi */ -- x\\n INSERT INTO t VALUES (1)", "only SELECT"},
        {"/* c */ -- x\\n SELECT 'url(' AS u", "Not connected"},
        {"WITH 1 AS x SELECT x", "Not connected"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        char args[256];
        snprintf(args, sizeof args, "{\"sql\":\"%s\"}", cases[i][0]);
        coll *c = call("alice", "chguard", args);
        if (!strstr(text_of(c->result), cases[i][1]))
            fail_msg("%s: want '%s' in: %s", cases[i][0], cases[i][1],
                     text_of(c->result));
        coll_free(c);
    }
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
        cmocka_unit_test(test_schema_root_must_be_object),
        cmocka_unit_test(test_budget_ceilings),
        cmocka_unit_test(test_stale_ctx_refused),
        cmocka_unit_test(test_ctx_read_only),
        cmocka_unit_test(test_invalid_utf8_never_leaves),
        cmocka_unit_test(test_cancel_and_shutdown_stop_cpu_loops),
        cmocka_unit_test(test_fair_between_users),
        cmocka_unit_test(test_result_size_limit),
        cmocka_unit_test(test_agent_cancelled_in_nested_call),
        cmocka_unit_test(test_close_runs_on_error),
        cmocka_unit_test(test_clickhouse_guard),
        cmocka_unit_test(test_float_round_trips),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
