/* scenario: `netra run` and netra.scenario.core (see scenario.h). */
#include "scenario.h"

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cJSON.h>
#include <curl/curl.h>
#include <lauxlib.h>
#include <lualib.h>

#include "bindings.h"
#include "config.h"
#include "jwt.h"
#include "log.h"
#include "serve.h"
#include "wsclient.h"

#define RUNTIME_MT "netra.scenario.runtime"
#define WS_MT "netra.scenario.ws"
#define LOG_FILES_MAX 32

typedef struct {
    serve *s;
} lruntime;

typedef struct {
    wsc *c;
} lws_client;

/* Log files handed to log_set_output; closed only when the run ends, as
 * a runtime's threads may still hold the previous one for a moment. */
static FILE *log_files[LOG_FILES_MAX];
static int log_file_count;

/* ---- runtimes ------------------------------------------------------------ */

static void remember_secret(void *ud, const char *key, const char *value,
                            config_source source) {
    (void)ud;
    (void)source;
    if (config_is_secret(key)) log_add_secret(value);
}

/* Sets up logging as `netra serve` does for cfg. Returns 0 or -1. */
static int setup_log(config *cfg, char *err, size_t err_size) {
    log_level level = NLOG_INFO;
    const char *lv = config_get(cfg, "NETRA_LOG_LEVEL");
    if (lv && !log_parse_level(lv, &level)) {
        snprintf(err, err_size, "NETRA_LOG_LEVEL=%s is not a level - use "
                 "debug, info, warn or error", lv);
        return -1;
    }
    const char *format = config_get_or(cfg, "NETRA_LOG_FORMAT", "text");
    if (strcmp(format, "text") && strcmp(format, "json")) {
        snprintf(err, err_size, "NETRA_LOG_FORMAT=%s - use text or json",
                 format);
        return -1;
    }
    config_each(cfg, remember_secret, NULL);
    log_setup(level, !strcmp(format, "json"));
    return 0;
}

/* start(env, settings, unset) -> runtime | nil, err */
static int l_start(lua_State *L) {
    const char *env = luaL_optstring(L, 1, NULL);
    char err[2048];
    if (lua_istable(L, 3)) {
        /* Names to drop from the process environment first (it is read
         * by config_load); see scenario.h. */
        for (lua_Integer i = 1; i <= luaL_len(L, 3); i++) {
            lua_rawgeti(L, 3, i);
            if (lua_isstring(L, -1)) unsetenv(lua_tostring(L, -1));
            lua_pop(L, 1);
        }
    }
    config *cfg = config_new();
    if (!cfg) return luaL_error(L, "out of memory");
    if (env) config_set(cfg, CONFIG_FLAG, "ENVIRONMENT", env);
    if (lua_istable(L, 2)) {
        lua_pushnil(L);
        while (lua_next(L, 2)) {
            if (lua_type(L, -2) == LUA_TSTRING) {
                const char *key = lua_tostring(L, -2);
                const char *v = lua_isboolean(L, -1)
                                    ? (lua_toboolean(L, -1) ? "true" : "false")
                                    : luaL_tolstring(L, -1, NULL);
                config_set(cfg, CONFIG_FLAG, key, v);
                if (!lua_isboolean(L, -1)) lua_pop(L, 1);
            }
            lua_pop(L, 1);
        }
    }
    if (config_load(cfg, err, sizeof err) < 0 ||
        setup_log(cfg, err, sizeof err) < 0) {
        config_free(cfg);
        lua_pushnil(L);
        lua_pushstring(L, err);
        return 2;
    }

    lruntime *r = lua_newuserdatauv(L, sizeof *r, 0);
    r->s = NULL;
    luaL_setmetatable(L, RUNTIME_MT);
    r->s = serve_start(cfg, err, sizeof err);
    if (!r->s) {
        lua_pushnil(L);
        lua_pushstring(L, err);
        return 2;
    }
    return 1;
}

static serve *check_runtime(lua_State *L) {
    lruntime *r = luaL_checkudata(L, 1, RUNTIME_MT);
    if (!r->s) luaL_error(L, "runtime stopped: start a new one");
    return r->s;
}

static int l_rt_port(lua_State *L) {
    lua_pushinteger(L, serve_port(check_runtime(L)));
    return 1;
}

static int l_rt_state(lua_State *L) {
    char why[8192];
    serve_state st = serve_get_state(check_runtime(L), why, sizeof why);
    static const char *const names[] = {"starting", "ready", "refused"};
    lua_pushstring(L, names[st]);
    if (st != SERVE_REFUSED) return 1;
    lua_pushstring(L, why);
    return 2;
}

static int l_rt_setting(lua_State *L) {
    runtime *rt = serve_runtime(check_runtime(L));
    const char *v = config_get(rt->cfg, luaL_checkstring(L, 2));
    if (v) lua_pushstring(L, v);
    else lua_pushnil(L);
    return 1;
}

static int l_rt_stop(lua_State *L) {
    lruntime *r = luaL_checkudata(L, 1, RUNTIME_MT);
    serve_stop(r->s);
    r->s = NULL;
    return 0;
}

static const luaL_Reg runtime_methods[] = {
    {"port", l_rt_port},       {"state", l_rt_state},
    {"setting", l_rt_setting}, {"stop", l_rt_stop},
    {NULL, NULL},
};

/* ---- logs, time, files, JSON, tokens ---------------------------------------- */

static int l_log_to(lua_State *L) {
    if (lua_isnoneornil(L, 1)) {
        log_set_output(NULL);
        return 0;
    }
    const char *path = luaL_checkstring(L, 1);
    if (log_file_count >= LOG_FILES_MAX)
        return luaL_error(L, "log_to: more than %d log files in one run",
                          LOG_FILES_MAX);
    FILE *f = fopen(path, "a");
    if (!f) {
        lua_pushnil(L);
        lua_pushfstring(L, "%s: %s", path, strerror(errno));
        return 2;
    }
    setvbuf(f, NULL, _IOLBF, 0);
    log_files[log_file_count++] = f;
    log_set_output(f);
    lua_pushboolean(L, 1);
    return 1;
}

static int l_sleep(lua_State *L) {
    lua_Integer ms = luaL_checkinteger(L, 1);
    if (ms > 0) {
        struct timespec ts = {.tv_sec = ms / 1000,
                              .tv_nsec = (ms % 1000) * 1000000L};
        while (nanosleep(&ts, &ts) < 0 && errno == EINTR) {}
    }
    return 0;
}

static int l_now_ms(lua_State *L) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    lua_pushinteger(L, (lua_Integer)ts.tv_sec * 1000 + ts.tv_nsec / 1000000);
    return 1;
}

static int l_mkdtemp(lua_State *L) {
    const char *prefix = luaL_checkstring(L, 1);
    char path[4096];
    snprintf(path, sizeof path, "%s.XXXXXX", prefix);
    if (!mkdtemp(path)) {
        lua_pushnil(L);
        lua_pushfstring(L, "mkdtemp %s: %s", path, strerror(errno));
        return 2;
    }
    lua_pushstring(L, path);
    return 1;
}

static int l_json_encode(lua_State *L) {
    char err[256];
    luaL_checkany(L, 1);
    cJSON *j = bindings_to_json(L, 1, err, sizeof err);
    if (!j) return luaL_error(L, "json_encode: %s", err);
    char *text = cJSON_PrintUnformatted(j);
    cJSON_Delete(j);
    if (!text) return luaL_error(L, "out of memory");
    lua_pushstring(L, text);
    free(text);
    return 1;
}

static int l_json_decode(lua_State *L) {
    size_t len;
    const char *text = luaL_checklstring(L, 1, &len);
    const char *end = NULL;
    cJSON *j = cJSON_ParseWithLengthOpts(text, len, &end, false);
    while (j && end && end < text + len && strchr(" \t\r\n", *end)) end++;
    if (!j || (end && end != text + len)) {
        cJSON_Delete(j);
        lua_pushnil(L);
        lua_pushstring(L, "not valid JSON");
        return 2;
    }
    bindings_push_json(L, j);
    cJSON_Delete(j);
    return 1;
}

static int l_jwt_sign(lua_State *L) {
    const char *secret = luaL_checkstring(L, 1);
    const char *user = luaL_checkstring(L, 2);
    lua_Integer ttl = luaL_optinteger(L, 3, 3600);
    char *token = NULL, err[512];
    int64_t now = time(NULL);
    if (jwt_sign(secret, user, now, ttl > 0 ? now + ttl : 0, &token, err,
                 sizeof err) < 0) {
        lua_pushnil(L);
        lua_pushstring(L, err);
        return 2;
    }
    lua_pushstring(L, token);
    free(token);
    return 1;
}

/* ---- HTTP ------------------------------------------------------------------ */

typedef struct {
    char *data;
    size_t len;
} buffer;

static size_t on_body(char *p, size_t size, size_t n, void *ud) {
    buffer *b = ud;
    size_t add = size * n;
    char *d = realloc(b->data, b->len + add + 1);
    if (!d) return 0;
    memcpy(d + b->len, p, add);
    b->data = d;
    b->len += add;
    d[b->len] = '\0';
    return add;
}

/* Headers arrive as "Name: value\r\n" lines; they are kept as they are
 * and split when pushed. */
static size_t on_header(char *p, size_t size, size_t n, void *ud) {
    return on_body(p, size, n, ud);
}

/* Pushes a table of lower-cased header names to values. */
static void push_headers(lua_State *L, const buffer *h) {
    lua_newtable(L);
    const char *p = h->data ? h->data : "";
    while (*p) {
        size_t line = strcspn(p, "\r\n");
        const char *colon = memchr(p, ':', line);
        if (colon) {
            luaL_Buffer name;
            luaL_buffinit(L, &name);
            for (const char *q = p; q < colon; q++)
                luaL_addchar(&name, (char)(*q >= 'A' && *q <= 'Z' ? *q + 32
                                                                  : *q));
            luaL_pushresult(&name);
            const char *v = colon + 1;
            while (*v == ' ') v++;
            lua_pushlstring(L, v, (size_t)(p + line - v));
            lua_settable(L, -3);
        }
        p += line;
        while (*p == '\r' || *p == '\n') p++;
    }
}

/* http_get(port, path, headers, timeout_ms) */
static int l_http_get(lua_State *L) {
    lua_Integer port = luaL_checkinteger(L, 1);
    const char *path = luaL_checkstring(L, 2);
    lua_Integer timeout = luaL_optinteger(L, 4, 5000);
    luaL_argcheck(L, port > 0 && port < 65536, 1, "a port number");
    luaL_argcheck(L, path[0] == '/', 2, "a path starting with /");

    char url[2048];
    snprintf(url, sizeof url, "http://127.0.0.1:%d%s", (int)port, path);
    struct curl_slist *hl = NULL;
    if (lua_istable(L, 3)) {
        lua_pushnil(L);
        while (lua_next(L, 3)) {
            lua_pushfstring(L, "%s: %s", lua_tostring(L, -2),
                            lua_tostring(L, -1));
            hl = curl_slist_append(hl, lua_tostring(L, -1));
            lua_pop(L, 2);
        }
    }

    buffer body = {0}, head = {0};
    CURL *c = curl_easy_init();
    if (!c) return luaL_error(L, "out of memory");
    curl_easy_setopt(c, CURLOPT_URL, url);
    curl_easy_setopt(c, CURLOPT_HTTPHEADER, hl);
    curl_easy_setopt(c, CURLOPT_TIMEOUT_MS, (long)timeout);
    curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(c, CURLOPT_PROXY, "");
    curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, on_body);
    curl_easy_setopt(c, CURLOPT_WRITEDATA, &body);
    curl_easy_setopt(c, CURLOPT_HEADERFUNCTION, on_header);
    curl_easy_setopt(c, CURLOPT_HEADERDATA, &head);
    CURLcode rc = curl_easy_perform(c);
    long status = 0;
    curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &status);
    curl_easy_cleanup(c);
    curl_slist_free_all(hl);

    int n;
    if (rc != CURLE_OK) {
        lua_pushnil(L);
        lua_pushfstring(L, "GET %s: %s", url, curl_easy_strerror(rc));
        n = 2;
    } else {
        lua_pushinteger(L, status);
        lua_pushlstring(L, body.data ? body.data : "", body.len);
        push_headers(L, &head);
        n = 3;
    }
    free(body.data);
    free(head.data);
    return n;
}

/* ---- WebSocket clients ------------------------------------------------------- */

/* ws_connect(port, path, headers, timeout_ms) */
static int l_ws_connect(lua_State *L) {
    lua_Integer port = luaL_checkinteger(L, 1);
    const char *path = luaL_checkstring(L, 2);
    lua_Integer timeout = luaL_optinteger(L, 4, 5000);
    luaL_argcheck(L, port > 0 && port < 65536, 1, "a port number");
    luaL_argcheck(L, path[0] == '/', 2, "a path starting with /");

    int count = lua_istable(L, 3) ? (int)luaL_len(L, 3) : 0;
    const char **headers = calloc((size_t)count + 1, sizeof *headers);
    if (!headers) return luaL_error(L, "out of memory");
    for (int i = 0; i < count; i++) {
        lua_rawgeti(L, 3, i + 1);
        headers[i] = lua_tostring(L, -1); /* kept alive by the table */
        lua_pop(L, 1);
    }

    lws_client *w = lua_newuserdatauv(L, sizeof *w, 0);
    w->c = NULL;
    luaL_setmetatable(L, WS_MT);
    char err[512];
    int status = 0;
    w->c = wsc_connect("127.0.0.1", (int)port, path, headers, (int)timeout,
                       &status, err, sizeof err);
    free(headers);
    if (!w->c) {
        lua_pushnil(L);
        lua_pushstring(L, err);
        lua_pushinteger(L, status);
        return 3;
    }
    return 1;
}

static wsc *check_ws(lua_State *L) {
    lws_client *w = luaL_checkudata(L, 1, WS_MT);
    if (!w->c) luaL_error(L, "client closed: connect again");
    return w->c;
}

static int l_ws_send(lua_State *L) {
    wsc *c = check_ws(L);
    size_t len;
    const char *text = luaL_checklstring(L, 2, &len);
    char err[256];
    if (wsc_send_text(c, text, len, err, sizeof err) < 0) {
        lua_pushnil(L);
        lua_pushstring(L, err);
        return 2;
    }
    lua_pushboolean(L, 1);
    return 1;
}

/* ws:recv(timeout_ms) -> text | nil, "timeout" | nil, err, close_code */
static int l_ws_recv(lua_State *L) {
    wsc *c = check_ws(L);
    lua_Integer timeout = luaL_optinteger(L, 2, 5000);
    char *msg, err[256];
    size_t len;
    int code = 0;
    int r = wsc_recv(c, (int)timeout, &msg, &len, &code, err, sizeof err);
    if (r == 1) {
        lua_pushlstring(L, msg, len);
        free(msg);
        return 1;
    }
    lua_pushnil(L);
    if (r == 0) {
        lua_pushliteral(L, "timeout");
        return 2;
    }
    lua_pushstring(L, err);
    lua_pushinteger(L, code);
    return 3;
}

static int l_ws_close(lua_State *L) {
    lws_client *w = luaL_checkudata(L, 1, WS_MT);
    wsc_close(w->c, (int)luaL_optinteger(L, 2, 1000), 2000);
    w->c = NULL;
    return 0;
}

static int l_ws_is_open(lua_State *L) {
    lws_client *w = luaL_checkudata(L, 1, WS_MT);
    lua_pushboolean(L, w->c && wsc_is_open(w->c));
    return 1;
}

static const luaL_Reg ws_methods[] = {
    {"send", l_ws_send},   {"recv", l_ws_recv},
    {"close", l_ws_close}, {"is_open", l_ws_is_open},
    {NULL, NULL},
};

/* ---- the module ----------------------------------------------------------------- */

static const luaL_Reg core_funcs[] = {
    {"start", l_start},
    {"log_to", l_log_to},
    {"http_get", l_http_get},
    {"ws_connect", l_ws_connect},
    {"jwt_sign", l_jwt_sign},
    {"json_encode", l_json_encode},
    {"json_decode", l_json_decode},
    {"sleep", l_sleep},
    {"now_ms", l_now_ms},
    {"mkdtemp", l_mkdtemp},
    {NULL, NULL},
};

static void new_class(lua_State *L, const char *name, const luaL_Reg *methods,
                      lua_CFunction gc) {
    if (!luaL_newmetatable(L, name)) {
        lua_pop(L, 1);
        return;
    }
    lua_newtable(L);
    luaL_setfuncs(L, methods, 0);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, gc);
    lua_setfield(L, -2, "__gc");
    lua_pop(L, 1);
}

int scenario_open_core(lua_State *L) {
    new_class(L, RUNTIME_MT, runtime_methods, l_rt_stop);
    new_class(L, WS_MT, ws_methods, l_ws_close);
    luaL_newlib(L, core_funcs);
    return 1;
}

/* ---- netra run ------------------------------------------------------------------- */

static int traceback(lua_State *L) {
    const char *msg = lua_tostring(L, 1);
    if (!msg) msg = luaL_tolstring(L, 1, NULL);
    luaL_traceback(L, L, msg, 1);
    return 1;
}

/* Loads and runs the script; returns NULL or the error (on the stack). */
static const char *run_script(lua_State *L, int argc, char **argv) {
    lua_createtable(L, argc, 1);
    for (int i = 0; i < argc; i++) {
        lua_pushstring(L, argv[i]);
        lua_rawseti(L, -2, i);
    }
    lua_setglobal(L, "arg");

    lua_pushcfunction(L, traceback);
    int tb = lua_gettop(L);
    if (luaL_loadfilex(L, argv[0], "t") != LUA_OK) return lua_tostring(L, -1);
    for (int i = 1; i < argc; i++) lua_pushstring(L, argv[i]);
    if (lua_pcall(L, argc - 1, 0, tb) != LUA_OK) return lua_tostring(L, -1);
    return NULL;
}

/* Calls require("netra.scenario").finish(err); returns its exit code. */
static int finish(lua_State *L, const char *raised) {
    lua_pushcfunction(L, traceback);
    int tb = lua_gettop(L);
    lua_getglobal(L, "require");
    lua_pushliteral(L, "netra.scenario");
    if (lua_pcall(L, 1, 1, tb) != LUA_OK) {
        printf("not ok 1 - the scenario module loads\n# %s\n1..1\n",
               lua_tostring(L, -1));
        return 1;
    }
    lua_getfield(L, -1, "finish");
    if (raised) lua_pushstring(L, raised);
    else lua_pushnil(L);
    if (lua_pcall(L, 1, 1, tb) != LUA_OK) {
        fprintf(stderr, "netra run: finishing the scenario failed: %s\n",
                lua_tostring(L, -1));
        return 1;
    }
    return (int)lua_tointeger(L, -1);
}

int scenario_main(int argc, char **argv) {
    if (argc < 1) {
        fprintf(stderr, "usage: netra run SCRIPT.lua [ARGS]\n");
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    curl_global_init(CURL_GLOBAL_DEFAULT);

    char err[1024];
    config *cfg = config_new();
    if (!cfg || config_load(cfg, err, sizeof err) < 0) {
        fprintf(stderr, "netra run: %s\n", cfg ? err : "out of memory");
        config_free(cfg);
        return 1;
    }
    runtime *host = runtime_new(cfg);
    lua_State *L = host ? luaL_newstate() : NULL;
    if (!L) {
        fprintf(stderr, "netra run: out of memory\n");
        runtime_free(host);
        return 1;
    }
    luaL_openlibs(L);
    bindings_preload(L, host);
    luaL_getsubtable(L, LUA_REGISTRYINDEX, LUA_PRELOAD_TABLE);
    lua_pushcfunction(L, scenario_open_core);
    lua_setfield(L, -2, "netra.scenario.core");
    lua_pop(L, 1);

    const char *raised = run_script(L, argc, argv);
    int rc = finish(L, raised);
    fflush(stdout);
    lua_close(L);

    log_set_output(NULL);
    for (int i = 0; i < log_file_count; i++) fclose(log_files[i]);
    log_file_count = 0;
    runtime_free(host);
    return rc;
}
