/* test_sandbox: the tool sandbox with real Lua files in a temp dir:
 * budgets, frozen libraries, globals, tool definitions, waits, JSON. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <lauxlib.h>
#include <lualib.h>

#include "log.h"
#include "sandbox.h"

static char root[600];  /* <tmp>/lua */
static char tools[700]; /* <tmp>/lua/netra/tools */

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

static void write_file(const char *path, const char *body, size_t n) {
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(body, 1, n, f), n);
    fclose(f);
}

/* Writes lua/netra/tools/<name>.lua and returns its path (static). */
static const char *tool_file(const char *name, const char *body) {
    static char path[1024];
    snprintf(path, sizeof path, "%s/%s.lua", tools, name);
    write_file(path, body, strlen(body));
    return path;
}

static sbx *new_sbx(sbx_hook_mode mode) {
    sbx_config cfg = {0};
    char err[256];
    sbx *s;

    cfg.lua_dir = root;
    cfg.hook = mode;
    s = sbx_new(&cfg, err, sizeof err);
    if (!s)
        fail_msg("sbx_new: %s", err);
    return s;
}

static int load(sbx *s, const char *name, const char *body) {
    sbx_tool_def def;
    char err[512];
    int ref;

    if (sbx_load_tool(s, tool_file(name, body), &def, err, sizeof err) != 0)
        fail_msg("load %s: %s", name, err);
    ref = def.handler_ref;
    sbx_tool_def_free(&def);
    return ref;
}

/* Loads a file expected to fail; returns the error (static). */
static const char *load_err(sbx *s, const char *name, const char *body) {
    static char err[512];
    sbx_tool_def def;

    assert_int_equal(sbx_load_tool(s, tool_file(name, body), &def, err,
                                   sizeof err), -1);
    assert_null(def.name);
    return err;
}

/* ---- ctx and arguments ----------------------------------------------- */

static const char WAIT_TOKEN = 0;

static int t_wait(lua_State *L) {
    return sbx_wait(L, (void *)&WAIT_TOKEN, 0, NULL);
}

/* pushes ctx ({wait = fn, state = {}}) and args parsed from JSON */
static int push_ctx_args(lua_State *L, void *ud) {
    const char *json = ud;
    cJSON *j = cJSON_Parse(json ? json : "{}");

    lua_newtable(L);
    lua_pushcfunction(L, t_wait);
    lua_setfield(L, -2, "wait");
    lua_newtable(L);
    lua_setfield(L, -2, "state");
    sbx_push_json(L, j);
    cJSON_Delete(j);
    return 2;
}

static int push_string(lua_State *L, void *ud) {
    lua_pushstring(L, ud);
    return 1;
}

static sbx_request *start(sbx *s, int ref, const char *args,
                          sbx_budget budget) {
    sbx_request_opts o = {0};
    char err[256];
    sbx_request *r;

    o.budget = budget;
    o.request_id = "req-1";
    r = sbx_start(s, NULL, ref, push_ctx_args, (void *)args, &o, err,
                  sizeof err);
    if (!r)
        fail_msg("sbx_start: %s", err);
    return r;
}

static sbx_budget B(int64_t t, int64_t i, int64_t m) {
    sbx_budget b = {t, i, m};
    return b;
}

/* Runs to completion; returns the status and copies the first result as
 * a string (or the error) into out. */
static sbx_status run(sbx *s, int ref, const char *args, sbx_budget b,
                      char *out, size_t n) {
    sbx_request *r = start(s, ref, args, b);
    sbx_status st = sbx_resume(r, NULL, NULL);
    lua_State *L;
    int nres;

    out[0] = 0;
    if (st == SBX_DONE) {
        nres = sbx_request_results(r, &L);
        if (nres > 0 && lua_type(L, -nres) == LUA_TSTRING)
            snprintf(out, n, "%s", lua_tostring(L, -nres));
        else if (nres > 0 && lua_istable(L, -nres)) {
            char err[256];
            cJSON *j = sbx_table_to_json(L, -nres, "result", err, sizeof err);
            char *txt = j ? cJSON_PrintUnformatted(j) : NULL;
            snprintf(out, n, "%s", txt ? txt : err);
            free(txt);
            cJSON_Delete(j);
        }
    } else if (st == SBX_FAILED) {
        snprintf(out, n, "%s", sbx_request_error(r));
    }
    sbx_request_free(r);
    return st;
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static const char *ECHO =
    "return {\n"
    "  name = 'echo', description = 'echoes',\n"
    "  inputSchema = {type = 'object'},\n"
    "  handler = function(ctx, args) return args.text end,\n"
    "}\n";

/* The next request on the same sandbox still works. */
static void assert_recovers(sbx *s) {
    int ref = load(s, "echo", ECHO);
    char out[512];
    assert_int_equal(run(s, ref, "{\"text\":\"still here\"}", B(0, 0, 0),
                         out, sizeof out), SBX_DONE);
    assert_string_equal(out, "still here");
}

/* ---- fixtures ----------------------------------------------------------- */

static int group_setup(void **state) {
    const char *base = getenv("NETRA_TEST_DIR");
    char tmpl[512], lib[800];

    (void)state;
    if (base) {
        mkdir_p(base);
        snprintf(tmpl, sizeof tmpl, "%s/sandbox-XXXXXX", base);
    } else {
        snprintf(tmpl, sizeof tmpl, "/tmp/netra-sandbox-XXXXXX");
    }
    assert_non_null(mkdtemp(tmpl));
    snprintf(root, sizeof root, "%s/lua", tmpl);
    snprintf(tools, sizeof tools, "%s/netra/tools", root);
    snprintf(lib, sizeof lib, "%s/netra/lib", root);
    mkdir_p(tools);
    mkdir_p(lib);

    snprintf(lib, sizeof lib, "%s/netra/lib/helper.lua", root);
    const char *helper = "local M = {}\n"
                         "function M.twice(x) return x * 2 end\n"
                         "return M\n";
    write_file(lib, helper, strlen(helper));
    snprintf(lib, sizeof lib, "%s/netra/lib/leaky.lua", root);
    const char *leaky = "leaked = true\nreturn {}\n";
    write_file(lib, leaky, strlen(leaky));
    return 0;
}

/* ---- tests: basics ------------------------------------------------------ */

static void test_echo(void **state) {
    (void)state;
    sbx *s = new_sbx(SBX_HOOK_COUNT);
    char out[256];
    int ref = load(s, "echo", ECHO);

    assert_true(ref > 0);
    assert_int_equal(run(s, ref, "{\"text\":\"hi\"}", B(0, 0, 0), out,
                         sizeof out), SBX_DONE);
    assert_string_equal(out, "hi");
    assert_int_equal(sbx_in_flight(s), 0);
    sbx_free(s);
}

static void test_tool_definition(void **state) {
    (void)state;
    sbx *s = new_sbx(SBX_HOOK_COUNT);
    sbx_tool_def def;
    char err[256];
    const char *path = tool_file(
        "full", "return { name = 'full.tool-1', description = 'd',\n"
                "  inputSchema = {type = 'object', properties = {\n"
                "    text = {type = 'string'}}, required = {'text'}},\n"
                "  outputSchema = {type = 'object'},\n"
                "  annotations = {readOnlyHint = true},\n"
                "  budget = {time_ms = 500, instructions = 10000,\n"
                "            memory_bytes = 1048576},\n"
                "  handler = function() end }\n");

    assert_int_equal(sbx_load_tool(s, path, &def, err, sizeof err), 0);
    assert_string_equal(def.name, "full.tool-1");
    assert_string_equal(def.description, "d");
    assert_string_equal(def.path, path);
    assert_true(cJSON_IsObject(def.input_schema));
    assert_true(cJSON_IsArray(
        cJSON_GetObjectItem(def.input_schema, "required")));
    assert_non_null(def.output_schema);
    assert_true(cJSON_IsTrue(
        cJSON_GetObjectItem(def.annotations, "readOnlyHint")));
    assert_int_equal(def.budget.time_ms, 500);
    assert_int_equal(def.budget.instructions, 10000);
    assert_int_equal(def.budget.memory_bytes, 1048576);
    sbx_tool_def_free(&def);
    sbx_free(s);
}

static void test_tool_definition_errors(void **state) {
    (void)state;
    sbx *s = new_sbx(SBX_HOOK_COUNT);
    char want[1024];
    const char *e;

    e = load_err(s, "nohandler", "return { name = 'x', description = 'd',"
                 " inputSchema = {} }");
    assert_string_equal(e, "lua/netra/tools/nohandler.lua: handler must be "
                           "a function");

    e = load_err(s, "badname", "return { name = 'a b', description = 'd',"
                 " inputSchema = {}, handler = print }");
    assert_non_null(strstr(e, "badname.lua: name must be a string"));

    e = load_err(s, "nodesc", "return { name = 'a', inputSchema = {},"
                 " handler = print }");
    assert_non_null(strstr(e, "nodesc.lua: description must be a string"));

    e = load_err(s, "noschema", "return { name = 'a', description = 'd',"
                 " inputSchema = 'x', handler = print }");
    assert_non_null(strstr(e, "noschema.lua: inputSchema must be a table"));

    e = load_err(s, "badbudget", "return { name = 'a', description = 'd',"
                 " inputSchema = {}, handler = print,"
                 " budget = {time_ms = -1} }");
    assert_non_null(strstr(e, "budget.time_ms must be a positive integer"));

    e = load_err(s, "budgetkey", "return { name = 'a', description = 'd',"
                 " inputSchema = {}, handler = print,"
                 " budget = {seconds = 1} }");
    assert_non_null(strstr(e, "budget.seconds is not a budget"));

    e = load_err(s, "notable", "return 42");
    assert_non_null(strstr(e, "notable.lua: the file must return a table"));

    e = load_err(s, "syntax", "return {\n  name = 'x'\n  oops\n}");
    assert_non_null(strstr(e, "lua/netra/tools/syntax.lua:3:"));

    e = load_err(s, "toperr", "local x = nil\nreturn x.y");
    assert_non_null(strstr(e, "lua/netra/tools/toperr.lua:2:"));

    e = load_err(s, "topglobal", "helper_state = {}\nreturn {}");
    assert_non_null(strstr(e, "GLOBAL STATE USAGE: tool 'topglobal' "
                           "assigned global 'helper_state'"));

    e = load_err(s, "toploop", "while true do end");
    assert_non_null(strstr(e, "toploop.lua: tool 'toploop' exceeded its"));

    snprintf(want, sizeof want, "%s/missing.lua", tools);
    sbx_tool_def def;
    char err[512];
    assert_int_equal(sbx_load_tool(s, want, &def, err, sizeof err), -1);
    assert_non_null(strstr(err, "missing.lua"));
    assert_non_null(strstr(err, "cannot open"));

    assert_recovers(s);
    sbx_free(s);
}

static void test_binary_chunk_refused(void **state) {
    (void)state;
    sbx *s = new_sbx(SBX_HOOK_COUNT);
    char path[1024], out[512];
    lua_State *L;
    sbx_tool_def def;
    char err[512];

    /* a real binary chunk made by another state */
    L = luaL_newstate();
    luaL_openlibs(L);
    assert_int_equal(luaL_dostring(L, "return string.dump(load("
                                      "'return {name = \"bin\"}'))"),
                     0);
    size_t n;
    const char *bytes = lua_tolstring(L, -1, &n);
    snprintf(path, sizeof path, "%s/bin.lua", tools);
    write_file(path, bytes, n);
    lua_close(L);

    assert_int_equal(sbx_load_tool(s, path, &def, err, sizeof err), -1);
    assert_non_null(strstr(err, "binary"));

    /* load() inside a tool refuses binary chunks and a binary mode */
    int ref = load(s, "probe",
                   "return { name = 'probe', description = 'd',\n"
                   "  inputSchema = {},\n"
                   "  handler = function(ctx, args)\n"
                   "    local f, e = load(args.code, '=p', 't', {})\n"
                   "    local ok, e2 = pcall(load, 'return 1', '=p', 'b', {})\n"
                   "    return tostring(e) .. ' | ' .. tostring(e2)\n"
                   "  end }\n");
    assert_int_equal(run(s, ref, "{\"code\":\"\\u001bLua\\u0054\"}",
                         B(0, 0, 0), out, sizeof out), SBX_DONE);
    assert_non_null(strstr(out, "attempt to load a binary chunk"));
    assert_non_null(strstr(out, "only text chunks"));
    sbx_free(s);
}

/* ---- tests: the environment ------------------------------------------- */

/* Runs `code` (a chunk) in a probe tool whose environment reads the
 * tool environment; returns its first result as a string. */
static sbx_status probe(sbx *s, int ref, const char *code, char *out,
                        size_t n) {
    cJSON *j = cJSON_CreateObject();
    char *args;
    sbx_status st;

    cJSON_AddStringToObject(j, "code", code);
    args = cJSON_PrintUnformatted(j);
    st = run(s, ref, args, B(0, 0, 0), out, n);
    free(args);
    cJSON_Delete(j);
    return st;
}

static int load_probe(sbx *s) {
    /* the probe chunk sees the tool's own globals through a table that
     * forwards reads: _ENV itself is the tool environment */
    return load(s, "probe",
                "local E = _ENV\n"
                "return { name = 'probe', description = 'runs code',\n"
                "  inputSchema = {},\n"
                "  handler = function(ctx, args)\n"
                "    local env = setmetatable({}, {__index = function(_, k)\n"
                "      return E[k] end})\n"
                "    local f = assert(load(args.code, '=probe', 't', env))\n"
                "    return f()\n"
                "  end }\n");
}

static void expect_refused(sbx *s, int ref, const char *stmt,
                           const char *needle) {
    char code[1024], out[1024];
    snprintf(code, sizeof code,
             "local ok, e = pcall(function() %s end)\n"
             "if ok then return 'ALLOWED' end\n"
             "return tostring(e)", stmt);
    assert_int_equal(probe(s, ref, code, out, sizeof out), SBX_DONE);
    if (strcmp(out, "ALLOWED") == 0 || !strstr(out, needle))
        fail_msg("`%s` gave `%s`, wanted a refusal with `%s`", stmt, out,
                 needle);
}

static void test_frozen_libraries(void **state) {
    (void)state;
    sbx *s = new_sbx(SBX_HOOK_COUNT);
    int ref = load_probe(s);
    char out[512];

    expect_refused(s, ref, "string.x = 1", "read-only table 'string'");
    expect_refused(s, ref, "string.find = nil", "read-only table 'string'");
    expect_refused(s, ref, "table.insert = print", "read-only");
    expect_refused(s, ref, "math.pi = 3", "read-only table 'math'");
    expect_refused(s, ref, "utf8.char = nil", "read-only");
    expect_refused(s, ref, "os.time = nil", "read-only");
    expect_refused(s, ref, "coroutine.create = nil", "read-only");
    expect_refused(s, ref, "local x = ('').x; ('').x = 1", "read-only");
    expect_refused(s, ref, "getmetatable('').__index = {}", "read-only");
    expect_refused(s, ref, "getmetatable('').__index.upper = nil",
                   "read-only");
    expect_refused(s, ref, "rawset(string, 'x', 1)", "read-only");
    expect_refused(s, ref, "setmetatable(string, {})", "protected");
    expect_refused(s, ref, "setmetatable({}, {__gc = print})", "__gc");
    expect_refused(s, ref, "local _, t = pairs(string); t.x = 1",
                   "read-only");

    /* reading still works, including pairs and methods */
    assert_int_equal(probe(s, ref,
                           "local n = 0\n"
                           "for k in pairs(string) do n = n + 1 end\n"
                           "return ('%d %s %s %d'):format(n > 10 and 1 or 0,"
                           " ('abc'):upper(), string.rep('x', 3),"
                           " math.max(1, 5))",
                           out, sizeof out),
                     SBX_DONE);
    assert_string_equal(out, "1 ABC xxx 5");

    /* the library is still intact after all the attempts */
    assert_int_equal(probe(s, ref, "return type(string.find) .. "
                           "type(table.insert) .. tostring(math.pi > 3)",
                           out, sizeof out), SBX_DONE);
    assert_string_equal(out, "functionfunctiontrue");
    sbx_free(s);
}

static void test_no_dangerous_functions(void **state) {
    (void)state;
    sbx *s = new_sbx(SBX_HOOK_COUNT);
    int ref = load_probe(s);
    char out[512];

    assert_int_equal(probe(s, ref,
                           "return tostring(os.execute) .. tostring(os.exit)"
                           " .. tostring(os.getenv) .. tostring(os.remove)"
                           " .. tostring(string.dump) .. "
                           "tostring(math.randomseed)",
                           out, sizeof out),
                     SBX_DONE);
    assert_string_equal(out, "nilnilnilnilnilnil");

    expect_refused(s, ref, "return io.open('/etc/passwd')",
                   "undefined global 'io'");
    expect_refused(s, ref, "return debug.getinfo(1)",
                   "undefined global 'debug'");
    expect_refused(s, ref, "return package.loaded",
                   "undefined global 'package'");
    expect_refused(s, ref, "return dofile('/etc/passwd')",
                   "undefined global 'dofile'");
    expect_refused(s, ref, "return loadfile('/etc/passwd')",
                   "undefined global 'loadfile'");
    expect_refused(s, ref, "return require('os')", "not allowed");
    expect_refused(s, ref, "return require('io')", "not allowed");
    expect_refused(s, ref, "return require('netra.lib.../../x')",
                   "bad module name");
    expect_refused(s, ref, "return require('netra.lib.missing')",
                   "cannot load module");
    expect_refused(s, ref, "return load('return 1')",
                   "environment table");

    assert_int_equal(probe(s, ref,
                           "local h = require('netra.lib.helper')\n"
                           "local ok = pcall(function() h.twice = nil end)\n"
                           "return tostring(h.twice(21)) .. tostring(ok) .. "
                           "tostring(require('netra.lib.helper') == h)",
                           out, sizeof out),
                     SBX_DONE);
    assert_string_equal(out, "42falsetrue");

    /* a library module that assigns a global is stopped too */
    assert_int_equal(probe(s, ref, "return require('netra.lib.leaky')",
                           out, sizeof out), SBX_FAILED);
    assert_string_equal(out, "GLOBAL STATE USAGE: module 'netra.lib.leaky' "
                             "assigned global 'leaked'");

    /* collectgarbage is harmless */
    assert_int_equal(probe(s, ref, "return tostring(collectgarbage('count')"
                           " > 0) .. collectgarbage('stop')",
                           out, sizeof out), SBX_DONE);
    assert_string_equal(out, "true0");
    sbx_free(s);
}

static void test_global_assignment(void **state) {
    (void)state;
    sbx *s = new_sbx(SBX_HOOK_COUNT);
    char out[512];
    int ref;

    ref = load(s, "globby",
               "return { name = 'globby', description = 'd',\n"
               "  inputSchema = {},\n"
               "  handler = function(ctx, args) counter = 1 end }\n");
    assert_int_equal(run(s, ref, NULL, B(0, 0, 0), out, sizeof out),
                     SBX_FAILED);
    assert_string_equal(out, "GLOBAL STATE USAGE: tool 'globby' assigned "
                             "global 'counter'");

    /* a helper function in the file, behind pcall: still stopped */
    ref = load(s, "helpers",
               "local function remember(v) cache = v end\n"
               "return { name = 'helpers', description = 'd',\n"
               "  inputSchema = {},\n"
               "  handler = function(ctx, args)\n"
               "    for i = 1, 3 do pcall(remember, i) end\n"
               "    return 'escaped'\n"
               "  end }\n");
    assert_int_equal(run(s, ref, NULL, B(0, 0, 0), out, sizeof out),
                     SBX_FAILED);
    assert_string_equal(out, "GLOBAL STATE USAGE: tool 'helpers' assigned "
                             "global 'cache'");

    /* rawset on the environment is refused as well */
    ref = load(s, "rawglob",
               "return { name = 'rawglob', description = 'd',\n"
               "  inputSchema = {},\n"
               "  handler = function(ctx, args)\n"
               "    local ok, e = pcall(rawset, _ENV, 'x', 1)\n"
               "    return tostring(ok) .. ' ' .. tostring(e)\n"
               "  end }\n");
    assert_int_equal(run(s, ref, NULL, B(0, 0, 0), out, sizeof out),
                     SBX_DONE);
    assert_non_null(strstr(out, "false"));
    assert_non_null(strstr(out, "read-only"));

    /* reading an undefined global is an error */
    ref = load(s, "undef",
               "return { name = 'undef', description = 'd',\n"
               "  inputSchema = {},\n"
               "  handler = function(ctx, args)\n"
               "    return tostring(no_such_thing)\n"
               "  end }\n");
    assert_int_equal(run(s, ref, NULL, B(0, 0, 0), out, sizeof out),
                     SBX_FAILED);
    assert_non_null(strstr(out, "undefined global 'no_such_thing'"));
    assert_non_null(strstr(out, "undef.lua:4:"));

    assert_recovers(s);
    sbx_free(s);
}

static void test_error_file_and_line(void **state) {
    (void)state;
    sbx *s = new_sbx(SBX_HOOK_COUNT);
    char out[512];
    FILE *logf = tmpfile();
    int ref = load(s, "boom",
                   "local function inner()\n"
                   "  error('boom')\n"
                   "end\n"
                   "return { name = 'boom', description = 'd',\n"
                   "  inputSchema = {},\n"
                   "  handler = function(ctx, args) inner() end }\n");

    log_set_output(logf);
    assert_int_equal(run(s, ref, NULL, B(0, 0, 0), out, sizeof out),
                     SBX_FAILED);
    log_set_output(NULL);
    assert_string_equal(out, "tool 'boom' failed: "
                             "lua/netra/tools/boom.lua:2: boom");

    /* the log has a traceback */
    char buf[8192] = {0};
    rewind(logf);
    size_t n = fread(buf, 1, sizeof buf - 1, logf);
    buf[n] = 0;
    fclose(logf);
    assert_non_null(strstr(buf, "stack traceback:"));
    assert_non_null(strstr(buf, "inner"));
    sbx_free(s);
}

static void test_print_goes_to_log(void **state) {
    (void)state;
    sbx *s = new_sbx(SBX_HOOK_COUNT);
    char out[64], buf[4096] = {0};
    FILE *logf = tmpfile();
    int ref = load(s, "printer",
                   "return { name = 'printer', description = 'd',\n"
                   "  inputSchema = {},\n"
                   "  handler = function() print('hello', 42) end }\n");

    log_set_output(logf);
    assert_int_equal(run(s, ref, NULL, B(0, 0, 0), out, sizeof out),
                     SBX_DONE);
    log_set_output(NULL);
    rewind(logf);
    buf[fread(buf, 1, sizeof buf - 1, logf)] = 0;
    fclose(logf);
    assert_non_null(strstr(buf, "[printer] hello\\t42"));
    assert_non_null(strstr(buf, "req-1"));
    sbx_free(s);
}

/* ---- tests: budgets -------------------------------------------------- */

static const char *SPIN =
    "return { name = 'spin', description = 'd', inputSchema = {},\n"
    "  handler = function(ctx, args)\n"
    "    local mode = args.mode\n"
    "    if mode == 'loop' then while true do end\n"
    "    elseif mode == 'pcall' then\n"
    "      while true do pcall(function() while true do end end) end\n"
    "    elseif mode == 'pcall_once' then\n"
    "      pcall(function() while true do end end)\n"
    "      return 'escaped'\n"
    "    elseif mode == 'xpcall' then\n"
    "      xpcall(function() while true do end end,\n"
    "             function(e) return e end)\n"
    "      return 'escaped'\n"
    "    elseif mode == 'coroutine' then\n"
    "      local co = coroutine.create(function() while true do end end)\n"
    "      local ok = coroutine.resume(co)\n"
    "      return 'escaped'\n"
    "    elseif mode == 'wrap' then\n"
    "      local f = coroutine.wrap(function() while true do end end)\n"
    "      pcall(f)\n"
    "      return 'escaped'\n"
    "    elseif mode == 'nested' then\n"
    "      local co = coroutine.wrap(function()\n"
    "        local inner = coroutine.create(function()\n"
    "          while true do pcall(string.rep, 'x', 10) end end)\n"
    "        pcall(coroutine.resume, inner)\n"
    "      end)\n"
    "      pcall(co)\n"
    "      return 'escaped'\n"
    "    elseif mode == 'gsub' then\n"
    "      string.gsub('aaa', 'a', function()\n"
    "        while true do pcall(function() while true do end end) end\n"
    "      end)\n"
    "      return 'escaped'\n"
    "    elseif mode == 'sort' then\n"
    "      local t = {3, 2, 1}\n"
    "      pcall(table.sort, t, function(a, b) while true do end end)\n"
    "      return 'escaped'\n"
    "    elseif mode == 'close' then\n"
    "      local x <close> = setmetatable({}, {__close = function()\n"
    "        while true do end end})\n"
    "      while true do end\n"
    "    elseif mode == 'memory' then\n"
    "      local t = {}\n"
    "      for i = 1, 1e9 do t[i] = ('x'):rep(64) .. i end\n"
    "    elseif mode == 'memory_pcall' then\n"
    "      local t = {}\n"
    "      for j = 1, 1e9 do\n"
    "        pcall(function() for i = 1, 1e9 do t[#t + 1] = {i} end end)\n"
    "      end\n"
    "    elseif mode == 'bigrep' then\n"
    "      return ('x'):rep(1 << 30)\n"
    "    elseif mode == 'pattern' then\n"
    "      return string.find(('a'):rep(300), '.-.-.-.-b')\n"
    "    elseif mode == 'pattern_method' then\n"
    "      return (('a'):rep(300)):match('.-.-.-.-b')\n"
    "    elseif mode == 'pattern_loop' then\n"
    "      local s = ('a'):rep(300)\n"
    "      while true do pcall(string.find, s, '.-.-.-.-b') end\n"
    "    end\n"
    "  end }\n";

static void expect_stop(sbx *s, int ref, const char *mode, sbx_budget b,
                        const char *want) {
    char args[128], out[512];
    double t0 = now_s();

    snprintf(args, sizeof args, "{\"mode\":\"%s\"}", mode);
    sbx_status st = run(s, ref, args, b, out, sizeof out);
    double took = now_s() - t0;
    if (st != SBX_FAILED || strcmp(out, want) != 0)
        fail_msg("mode %s: status %d, `%s`; wanted `%s`", mode, (int)st, out,
                 want);
    /* generous: the point is that it ended at all */
    assert_true(took < 30.0);
    assert_recovers(s);
}

static void runaway_cases(sbx_hook_mode mode) {
    sbx *s = new_sbx(mode);
    int ref = load(s, "spin", SPIN);
    const char *time_msg = "tool 'spin' exceeded its time budget (300 ms)";
    const char *instr_msg =
        "tool 'spin' exceeded its instruction budget (200000 instructions)";
    const char *mem_msg =
        "tool 'spin' exceeded its memory budget (4194304 bytes)";
    sbx_budget tb = B(300, SBX_UNLIMITED, SBX_UNLIMITED);
    sbx_budget ib = B(SBX_UNLIMITED, 200000, SBX_UNLIMITED);
    sbx_budget mb = B(SBX_UNLIMITED, SBX_UNLIMITED, 4 << 20);
    static const char *const modes[] = {"loop", "pcall", "pcall_once",
                                        "xpcall", "coroutine", "wrap",
                                        "nested", "gsub", "sort", "close",
                                        "pattern_loop", NULL};

    for (int i = 0; modes[i]; i++) {
        expect_stop(s, ref, modes[i], tb, time_msg);
        expect_stop(s, ref, modes[i], ib, instr_msg);
    }
    expect_stop(s, ref, "memory", mb, mem_msg);
    expect_stop(s, ref, "memory_pcall", mb, mem_msg);
    expect_stop(s, ref, "bigrep", mb, mem_msg);
    assert_false(sbx_needs_rebuild(s));
    sbx_free(s);
}

static void test_runaway_count_hook(void **state) {
    (void)state;
    runaway_cases(SBX_HOOK_COUNT);
}

static void test_runaway_timer(void **state) {
    (void)state;
    runaway_cases(SBX_HOOK_TIMER);
}

static void test_pattern_bounds(void **state) {
    (void)state;
    sbx *s = new_sbx(SBX_HOOK_COUNT);
    int ref = load(s, "spin", SPIN);
    int pr = load_probe(s);
    char out[512];
    double t0 = now_s();

    assert_int_equal(run(s, ref, "{\"mode\":\"pattern\"}", B(2000, 0, 0),
                         out, sizeof out), SBX_FAILED);
    assert_non_null(strstr(out, "string.find: pattern too costly"));
    assert_int_equal(run(s, ref, "{\"mode\":\"pattern_method\"}",
                         B(2000, 0, 0), out, sizeof out), SBX_FAILED);
    assert_non_null(strstr(out, "string.match: pattern too costly"));
    assert_true(now_s() - t0 < 30.0);

    /* ordinary uses still work, on large subjects too */
    assert_int_equal(probe(s, pr,
                           "local big = ('word '):rep(20000)\n"
                           "local n = select(2, big:gsub('%w+', 'x'))\n"
                           "local t = ('  padded  '):match('^%s*(.-)%s*$')\n"
                           "local k, v = ('key=value'):match('(%w+)=(%w+)')\n"
                           "local c = 0\n"
                           "for w in big:gmatch('%a+') do c = c + 1 end\n"
                           "local p = big:find('word word', 1, true)\n"
                           "return ('%d %s %s %s %d %d'):format(n, t, k, v,"
                           " c, p)",
                           out, sizeof out),
                     SBX_DONE);
    assert_string_equal(out, "20000 padded key value 20000 1");
    sbx_free(s);
}

/* ---- tests: requests that wait ---------------------------------------- */

static const char *WAITER =
    "return { name = 'waiter', description = 'd', inputSchema = {},\n"
    "  handler = function(ctx, args)\n"
    "    ctx.state.id = args.id\n"
    "    local a = ctx.wait()\n"
    "    local b\n"
    "    if args.nested then\n"
    "      local f = coroutine.wrap(function(x)\n"
    "        local got = ctx.wait()\n"
    "        coroutine.yield(got .. x)\n"
    "      end)\n"
    "      b = f('+inner')\n"
    "    else\n"
    "      b = ctx.wait()\n"
    "    end\n"
    "    return ctx.state.id .. ':' .. a .. ':' .. b\n"
    "  end }\n";

static void test_interleaved_requests(void **state) {
    (void)state;
    sbx *s = new_sbx(SBX_HOOK_COUNT);
    int ref = load(s, "waiter", WAITER);
    sbx_request *a = start(s, ref, "{\"id\":\"A\"}", B(0, 0, 0));
    sbx_request *b = start(s, ref, "{\"id\":\"B\",\"nested\":true}",
                           B(0, 0, 0));
    lua_State *L;

    assert_int_equal(sbx_in_flight(s), 2);
    assert_int_equal(sbx_resume(a, NULL, NULL), SBX_YIELDED);
    assert_ptr_equal(sbx_request_wait_token(a), &WAIT_TOKEN);
    assert_int_equal(sbx_resume(b, NULL, NULL), SBX_YIELDED);

    /* resume in the other order */
    assert_int_equal(sbx_resume(b, push_string, "b1"), SBX_YIELDED);
    assert_int_equal(sbx_resume(a, push_string, "a1"), SBX_YIELDED);
    assert_int_equal(sbx_resume(b, push_string, "b2"), SBX_DONE);
    assert_int_equal(sbx_resume(a, push_string, "a2"), SBX_DONE);

    assert_int_equal(sbx_request_results(a, &L), 1);
    assert_string_equal(lua_tostring(L, -1), "A:a1:a2");
    assert_int_equal(sbx_request_results(b, &L), 1);
    assert_string_equal(lua_tostring(L, -1), "B:b1:b2+inner");
    sbx_request_free(a);
    sbx_request_free(b);

    /* a waiting request past its time budget fails when resumed */
    a = start(s, ref, "{\"id\":\"C\"}", B(50, 0, 0));
    assert_int_equal(sbx_resume(a, NULL, NULL), SBX_YIELDED);
    assert_true(sbx_request_deadline_ms(a) < INT64_MAX);
    usleep(100 * 1000);
    assert_int_equal(sbx_resume(a, push_string, "late"), SBX_FAILED);
    assert_string_equal(sbx_request_error(a),
                        "tool 'waiter' exceeded its time budget (50 ms)");
    sbx_request_free(a);

    /* cancel and free while waiting */
    a = start(s, ref, "{\"id\":\"D\"}", B(0, 0, 0));
    assert_int_equal(sbx_resume(a, NULL, NULL), SBX_YIELDED);
    sbx_cancel(a, "cancelled by the client");
    assert_int_equal(sbx_request_stop(a), SBX_STOP_CANCELLED);
    assert_string_equal(sbx_request_error(a), "cancelled by the client");
    sbx_request_free(a);
    a = start(s, ref, "{\"id\":\"E\"}", B(0, 0, 0));
    assert_int_equal(sbx_resume(a, NULL, NULL), SBX_YIELDED);
    sbx_request_free(a);
    assert_int_equal(sbx_in_flight(s), 0);

    assert_recovers(s);
    sbx_free(s);
}

static void test_tool_yield_is_not_a_wait(void **state) {
    (void)state;
    sbx *s = new_sbx(SBX_HOOK_COUNT);
    char out[256];
    int ref = load(s, "yielder",
                   "return { name = 'yielder', description = 'd',\n"
                   "  inputSchema = {},\n"
                   "  handler = function(ctx, args)\n"
                   "    local co = coroutine.wrap(function()\n"
                   "      coroutine.yield(1); coroutine.yield(2) end)\n"
                   "    local s = co() + co()\n"
                   "    local ok = pcall(coroutine.yield, 'x')\n"
                   "    return tostring(s) .. tostring(ok)\n"
                   "  end }\n");

    assert_int_equal(run(s, ref, NULL, B(0, 0, 0), out, sizeof out),
                     SBX_DONE);
    assert_string_equal(out, "3false");
    sbx_free(s);
}

/* ---- tests: JSON -------------------------------------------------------- */

static int push_json_text(lua_State *L, void *ud) {
    cJSON *j = cJSON_Parse(ud);
    sbx_push_json(L, j);
    cJSON_Delete(j);
    return 1;
}

static void test_json_round_trip(void **state) {
    (void)state;
    const char *doc =
        "{\"s\":\"h\\u00e9llo\",\"i\":42,\"neg\":-7,\"f\":1.5,"
        "\"t\":true,\"no\":false,\"arr\":[1,\"two\",[3],{\"k\":\"v\"}],"
        "\"empty_arr\":[],\"empty_obj\":{},\"nested\":{\"a\":{\"b\":[]}}}";
    lua_State *L = luaL_newstate();
    cJSON *in = cJSON_Parse(doc), *out;
    char err[256];

    push_json_text(L, (void *)doc);
    lua_getfield(L, -1, "i");
    assert_true(lua_isinteger(L, -1));
    lua_pop(L, 1);
    lua_getfield(L, -1, "f");
    assert_false(lua_isinteger(L, -1));
    lua_pop(L, 1);

    out = sbx_table_to_json(L, -1, "value", err, sizeof err);
    if (!out)
        fail_msg("%s", err);
    assert_true(cJSON_Compare(in, out, 1));
    cJSON_Delete(out);
    cJSON_Delete(in);
    lua_settop(L, 0);

    /* null in an array: a hole that comes back as null */
    push_json_text(L, "[1,null,3]");
    out = sbx_table_to_json(L, -1, "v", err, sizeof err);
    char *txt = cJSON_PrintUnformatted(out);
    assert_string_equal(txt, "[1,null,3]");
    free(txt);
    cJSON_Delete(out);
    lua_settop(L, 0);

    /* big integers travel as strings */
    lua_pushinteger(L, (lua_Integer)1 << 60);
    out = sbx_table_to_json(L, -1, "v", err, sizeof err);
    assert_true(cJSON_IsString(out));
    assert_string_equal(out->valuestring, "1152921504606846976");
    cJSON_Delete(out);
    lua_settop(L, 0);
    lua_close(L);
}

static void expect_json_error(const char *code, const char *needle) {
    lua_State *L = luaL_newstate();
    char err[256];

    luaL_openlibs(L);
    if (luaL_dostring(L, code) != 0)
        fail_msg("%s", lua_tostring(L, -1));
    cJSON *j = sbx_table_to_json(L, -1, "result", err, sizeof err);
    if (j || !strstr(err, needle))
        fail_msg("`%s` gave `%s`, wanted `%s`", code, j ? "json" : err,
                 needle);
    lua_close(L);
}

static void test_json_refusals(void **state) {
    (void)state;
    expect_json_error("local t = {} t.self = t return t",
                      "result.self: the table contains itself");
    expect_json_error("return {f = print}",
                      "result.f: a function cannot be sent as JSON");
    expect_json_error("return {a = {1, 2, coroutine.create(print)}}",
                      "result.a[3]: a thread cannot");
    expect_json_error("return {[1] = 1, x = 2}", "mixes array and object");
    expect_json_error("return {[1000] = 1}", "sparse array");
    expect_json_error("return {x = 0/0}", "NaN");
    expect_json_error("return {x = 'a\\0b'}", "not valid UTF-8");
    expect_json_error("return {x = '\\xff'}", "not valid UTF-8");
    expect_json_error("return {[true] = 1}", "keys must be strings");
    expect_json_error("local t = {} for i = 1, 200 do t = {t} end return t",
                      "nested too deeply");

    /* marked empty arrays */
    lua_State *L = luaL_newstate();
    luaL_openlibs(L);
    luaL_dostring(L, "return {a = setmetatable({}, {__jsontype = 'array'}),"
                     " b = {}}");
    char err[64];
    cJSON *j = sbx_table_to_json(L, -1, "r", err, sizeof err);
    assert_true(cJSON_IsArray(cJSON_GetObjectItem(j, "a")));
    assert_true(cJSON_IsObject(cJSON_GetObjectItem(j, "b")));
    cJSON_Delete(j);
    lua_close(L);
}

static void test_table_result(void **state) {
    (void)state;
    sbx *s = new_sbx(SBX_HOOK_COUNT);
    char out[256];
    int ref = load(s, "tab",
                   "return { name = 'tab', description = 'd',\n"
                   "  inputSchema = {},\n"
                   "  handler = function(ctx, args)\n"
                   "    return {n = args.n + 1, list = {args.n, 'x'}}\n"
                   "  end }\n");

    assert_int_equal(run(s, ref, "{\"n\":41}", B(0, 0, 0), out, sizeof out),
                     SBX_DONE);
    cJSON *j = cJSON_Parse(out);
    assert_int_equal(cJSON_GetObjectItem(j, "n")->valueint, 42);
    assert_int_equal(cJSON_GetArraySize(cJSON_GetObjectItem(j, "list")), 2);
    cJSON_Delete(j);
    sbx_free(s);
}

static void test_rebuild_keeps_tools(void **state) {
    (void)state;
    sbx *s = new_sbx(SBX_HOOK_COUNT);
    char err[256], out[256];
    int ref = load(s, "echo", ECHO);

    assert_int_equal(sbx_rebuild(s, err, sizeof err), 0);
    assert_int_equal(run(s, ref, "{\"text\":\"after\"}", B(0, 0, 0), out,
                         sizeof out), SBX_DONE);
    assert_string_equal(out, "after");

    /* refused while a request is in flight */
    int w = load(s, "waiter", WAITER);
    sbx_request *r = start(s, w, "{\"id\":\"A\"}", B(0, 0, 0));
    assert_int_equal(sbx_resume(r, NULL, NULL), SBX_YIELDED);
    assert_int_equal(sbx_rebuild(s, err, sizeof err), -1);
    assert_non_null(strstr(err, "in flight"));
    sbx_request_free(r);
    sbx_free(s);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_echo),
        cmocka_unit_test(test_tool_definition),
        cmocka_unit_test(test_tool_definition_errors),
        cmocka_unit_test(test_binary_chunk_refused),
        cmocka_unit_test(test_frozen_libraries),
        cmocka_unit_test(test_no_dangerous_functions),
        cmocka_unit_test(test_global_assignment),
        cmocka_unit_test(test_error_file_and_line),
        cmocka_unit_test(test_print_goes_to_log),
        cmocka_unit_test(test_runaway_count_hook),
        cmocka_unit_test(test_runaway_timer),
        cmocka_unit_test(test_pattern_bounds),
        cmocka_unit_test(test_interleaved_requests),
        cmocka_unit_test(test_tool_yield_is_not_a_wait),
        cmocka_unit_test(test_json_round_trip),
        cmocka_unit_test(test_json_refusals),
        cmocka_unit_test(test_table_result),
        cmocka_unit_test(test_rebuild_keeps_tools),
    };
    return cmocka_run_group_tests(tests, group_setup, NULL);
}
