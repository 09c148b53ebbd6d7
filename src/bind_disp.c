/* bind_disp: `netra.dispatcher` (see bind_disp.h). */
#include "bind_disp.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <lauxlib.h>

#include "bindings.h"
#include "disp.h"

#define DISPATCHER_MT "netra.dispatcher"

/* The module's own pool (netra.dispatcher.start). */
static pthread_mutex_t pool_lock = PTHREAD_MUTEX_INITIALIZER;
static disp_pool *lua_pool;
static disp_registry *lua_reg;

typedef struct {
    netra_ctx *ctx;
    bool released;
    int cancel_after_ms; /* 0: never */
} ldisp;

/* What one blocking request collects from its sink. */
typedef struct {
    pthread_mutex_t lock;
    pthread_cond_t cond;
    cJSON *events;
    cJSON *result;
    bool done;
} collector;

static runtime *rt_of(lua_State *L) {
    return lua_touserdata(L, lua_upvalueindex(1));
}

static void lua_dir_of(runtime *rt, char *out, size_t size) {
    snprintf(out, size, "%s/lua", config_home(rt->cfg));
}

/* ---- the runtime's registry (policy) ---------------------------------------- */

static int register_file(lua_State *L, bool agent) {
    runtime *rt = rt_of(L);
    const char *path = luaL_checkstring(L, 1);
    char err[2048], dir[4096];
    if (!rt->tools) {
        lua_dir_of(rt, dir, sizeof dir);
        rt->tools = disp_registry_new(dir);
        if (!rt->tools) return luaL_error(L, "out of memory");
    }
    int rc = agent ? disp_registry_add_agent(rt->tools, path, err, sizeof err)
                   : disp_registry_add_tool(rt->tools, path, err, sizeof err);
    if (rc != 0) {
        lua_pushnil(L);
        lua_pushstring(L, err);
        return 2;
    }
    lua_pushboolean(L, 1);
    return 1;
}

static int l_register_tool(lua_State *L) {
    return register_file(L, false);
}

static int l_register_agent(lua_State *L) {
    return register_file(L, true);
}

/* set_budget{time_ms, instructions, memory_bytes}: the defaults of the
 * pool that `netra serve` makes after the policy. */
static int l_set_budget(lua_State *L) {
    runtime *rt = rt_of(L);
    luaL_checktype(L, 1, LUA_TTABLE);
    lua_getfield(L, 1, "time_ms");
    lua_getfield(L, 1, "instructions");
    lua_getfield(L, 1, "memory_bytes");
    rt->tool_budget.time_ms = luaL_optinteger(L, -3, 0);
    rt->tool_budget.instructions = luaL_optinteger(L, -2, 0);
    rt->tool_budget.memory_bytes = luaL_optinteger(L, -1, 0);
    lua_pop(L, 3);
    return 0;
}

static int l_list(lua_State *L) {
    runtime *rt = rt_of(L);
    lua_createtable(L, 0, 2);
    cJSON *t = rt->tools ? disp_registry_tools_json(rt->tools)
                         : cJSON_CreateArray();
    cJSON *a = rt->tools ? disp_registry_agents_json(rt->tools)
                         : cJSON_CreateArray();
    bindings_push_json(L, t);
    lua_setfield(L, -2, "tools");
    bindings_push_json(L, a);
    lua_setfield(L, -2, "agents");
    cJSON_Delete(t);
    cJSON_Delete(a);
    return 1;
}

/* ---- the module's pool ---------------------------------------------------------- */

static void stop_pool(void) {
    pthread_mutex_lock(&pool_lock);
    disp_pool *p = lua_pool;
    disp_registry *r = lua_reg;
    lua_pool = NULL;
    lua_reg = NULL;
    pthread_mutex_unlock(&pool_lock);
    disp_pool_free(p);
    disp_registry_unref(r);
}

static lua_Integer int_field(lua_State *L, const char *k, lua_Integer def) {
    lua_getfield(L, 1, k);
    lua_Integer v = luaL_optinteger(L, -1, def);
    lua_pop(L, 1);
    return v;
}

/* Adds every path of field k (an array) to reg; false with err. */
static bool add_paths(lua_State *L, disp_registry *reg, const char *k,
                      bool agent, char *err, size_t size) {
    bool ok = true;
    lua_getfield(L, 1, k);
    if (lua_istable(L, -1)) {
        lua_Integer n = (lua_Integer)lua_rawlen(L, -1);
        for (lua_Integer i = 1; ok && i <= n; i++) {
            lua_rawgeti(L, -1, i);
            const char *path = lua_tostring(L, -1);
            ok = path && (agent ? disp_registry_add_agent(reg, path, err, size)
                                : disp_registry_add_tool(reg, path, err,
                                                         size)) == 0;
            if (!path) snprintf(err, size, "%s[%d]: expected a path", k,
                                (int)i);
            lua_pop(L, 1);
        }
    }
    lua_pop(L, 1);
    return ok;
}

static int l_start(lua_State *L) {
    runtime *rt = rt_of(L);
    char dir[4096], err[2048];
    luaL_checktype(L, 1, LUA_TTABLE);
    stop_pool();

    lua_dir_of(rt, dir, sizeof dir);
    disp_registry *reg = disp_registry_new(dir);
    if (!reg) return luaL_error(L, "out of memory");
    if (!add_paths(L, reg, "tools", false, err, sizeof err) ||
        !add_paths(L, reg, "agents", true, err, sizeof err)) {
        disp_registry_unref(reg);
        lua_pushnil(L);
        lua_pushstring(L, err);
        return 2;
    }
    disp_pool_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.workers = (int)int_field(L, "workers", 0);
    cfg.queue_max = (int)int_field(L, "queue_max", 0);
    cfg.max_inflight_per_user = (int)int_field(L, "max_inflight_per_user", 0);
    cfg.time_ms = int_field(L, "time_ms", 0);
    cfg.instructions = int_field(L, "instructions", 0);
    cfg.memory_bytes = int_field(L, "memory_bytes", 0);
    lua_getfield(L, 1, "timer_hook");
    cfg.timer_hook = lua_toboolean(L, -1);
    lua_getfield(L, 1, "clickhouse_url");
    cfg.clickhouse_url = lua_tostring(L, -1);
    cfg.counter_ud = rt;
    cfg.requests_changed = runtime_requests_changed;

    disp_pool *p = disp_pool_new(reg, &cfg, err, sizeof err);
    lua_pop(L, 2);
    if (!p) {
        disp_registry_unref(reg);
        lua_pushnil(L);
        lua_pushstring(L, err);
        return 2;
    }
    pthread_mutex_lock(&pool_lock);
    lua_pool = p;
    lua_reg = reg;
    pthread_mutex_unlock(&pool_lock);
    lua_pushboolean(L, 1);
    return 1;
}

static int l_stop(lua_State *L) {
    (void)L;
    stop_pool();
    return 0;
}

static int l_in_flight(lua_State *L) {
    pthread_mutex_lock(&pool_lock);
    lua_pushinteger(L, disp_pool_in_flight(lua_pool));
    pthread_mutex_unlock(&pool_lock);
    return 1;
}

/* ---- dispatcher objects ------------------------------------------------------------ */

static int l_new(lua_State *L) {
    char err[512];
    if (!lua_istable(L, 1)) {
        ctx_new(NULL, err, sizeof err);
        return luaL_error(L, "%s", err);
    }
    ctx_fields f = {0};
    lua_getfield(L, 1, "user_id");
    lua_getfield(L, 1, "thread_id");
    lua_getfield(L, 1, "run_id");
    lua_getfield(L, 1, "request_id");
    f.user_id = lua_tostring(L, -4);
    f.thread_id = lua_tostring(L, -3);
    f.run_id = lua_tostring(L, -2);
    f.request_id = lua_tostring(L, -1);
    netra_ctx *ctx = ctx_new(&f, err, sizeof err);
    lua_pop(L, 4);
    if (!ctx) return luaL_error(L, "%s", err);

    ldisp *d = lua_newuserdatauv(L, sizeof *d, 0);
    memset(d, 0, sizeof *d);
    d->ctx = ctx;
    luaL_setmetatable(L, DISPATCHER_MT);
    return 1;
}

static ldisp *check_live(lua_State *L) {
    ldisp *d = luaL_checkudata(L, 1, DISPATCHER_MT);
    if (d->released)
        luaL_error(L, "dispatcher released: make a new one for each "
                   "request");
    return d;
}

static void sink_event(void *ud, cJSON *ev) {
    collector *c = ud;
    pthread_mutex_lock(&c->lock);
    cJSON_AddItemToArray(c->events, ev);
    pthread_mutex_unlock(&c->lock);
}

static void sink_progress(void *ud, cJSON *params) {
    collector *c = ud;
    cJSON *ev = cJSON_CreateObject();
    cJSON_AddStringToObject(ev, "type", "progress");
    cJSON_AddItemToObject(ev, "params", params);
    sink_event(c, ev);
}

static void sink_done(void *ud, cJSON *result) {
    collector *c = ud;
    pthread_mutex_lock(&c->lock);
    c->result = result;
    c->done = true;
    pthread_cond_signal(&c->cond);
    pthread_mutex_unlock(&c->lock);
}

/* Runs one request and waits for it. Pushes result/final event and
 * events, or nil, message, code. */
static int run_request(lua_State *L, bool agent) {
    ldisp *ld = check_live(L);
    const char *name = luaL_checkstring(L, 2);
    char err[1024];
    cJSON *args = NULL;
    if (!lua_isnoneornil(L, 3)) {
        args = bindings_to_json(L, 3, err, sizeof err);
        if (!args) return luaL_error(L, "arguments: %s", err);
    }

    collector c = {.events = cJSON_CreateArray()};
    pthread_mutex_init(&c.lock, NULL);
    pthread_cond_init(&c.cond, NULL);
    disp_sink sink = {.ud = &c, .event = sink_event,
                      .progress = sink_progress, .done = sink_done};

    pthread_mutex_lock(&pool_lock);
    disp *d = disp_new(lua_pool, ld->ctx, &sink, err, sizeof err);
    int code = 0, rc = -1;
    if (d)
        rc = agent ? disp_run_agent(d, name, args, &code, err, sizeof err)
                   : disp_call_tool(d, name, args, NULL, &code, err,
                                    sizeof err);
    else
        cJSON_Delete(args);
    pthread_mutex_unlock(&pool_lock);

    if (rc == 0) {
        struct timespec at;
        clock_gettime(CLOCK_REALTIME, &at);
        long ms = ld->cancel_after_ms;
        at.tv_sec += ms / 1000;
        at.tv_nsec += (ms % 1000) * 1000000L;
        if (at.tv_nsec >= 1000000000L) {
            at.tv_sec++;
            at.tv_nsec -= 1000000000L;
        }
        pthread_mutex_lock(&c.lock);
        while (!c.done) {
            if (ms > 0) {
                if (pthread_cond_timedwait(&c.cond, &c.lock, &at) ==
                    ETIMEDOUT) {
                    ms = 0;
                    disp_cancel(d, "cancelled by the caller");
                }
            } else {
                pthread_cond_wait(&c.cond, &c.lock);
            }
        }
        pthread_mutex_unlock(&c.lock);
    }
    ld->cancel_after_ms = 0;
    if (d) disp_release(d);
    pthread_mutex_destroy(&c.lock);
    pthread_cond_destroy(&c.cond);

    if (rc != 0) {
        cJSON_Delete(c.events);
        lua_pushnil(L);
        lua_pushstring(L, err);
        lua_pushinteger(L, code);
        return 3;
    }
    if (agent) {
        int n = cJSON_GetArraySize(c.events);
        bindings_push_json(L, cJSON_GetArrayItem(c.events, n - 1));
    } else {
        bindings_push_json(L, c.result);
    }
    bindings_push_json(L, c.events);
    cJSON_Delete(c.result);
    cJSON_Delete(c.events);
    return 2;
}

static int l_call(lua_State *L) {
    return run_request(L, false);
}

static int l_run(lua_State *L) {
    return run_request(L, true);
}

static int l_cancel_after(lua_State *L) {
    ldisp *d = check_live(L);
    d->cancel_after_ms = (int)luaL_checkinteger(L, 2);
    return 0;
}

static int l_release(lua_State *L) {
    ldisp *d = check_live(L);
    d->released = true;
    ctx_unref(d->ctx);
    d->ctx = NULL;
    return 0;
}

static int l_gc(lua_State *L) {
    ldisp *d = luaL_checkudata(L, 1, DISPATCHER_MT);
    if (!d->released) ctx_unref(d->ctx);
    d->released = true;
    d->ctx = NULL;
    return 0;
}

static int l_index_ctx(lua_State *L) {
    ldisp *d = check_live(L);
    const char *k = luaL_checkstring(L, 2);
    const char *v = !strcmp(k, "user_id")      ? ctx_user_id(d->ctx)
                    : !strcmp(k, "thread_id")  ? ctx_thread_id(d->ctx)
                    : !strcmp(k, "run_id")     ? ctx_run_id(d->ctx)
                    : !strcmp(k, "request_id") ? ctx_request_id(d->ctx)
                                               : NULL;
    lua_pushstring(L, v);
    return 1;
}

int bind_disp(lua_State *L, runtime *rt) {
    static const luaL_Reg methods[] = {
        {"call", l_call},       {"run", l_run},
        {"release", l_release}, {"cancel_after", l_cancel_after},
        {"ctx", l_index_ctx},   {NULL, NULL}};
    static const luaL_Reg funcs[] = {
        {"register_tool", l_register_tool},
        {"register_agent", l_register_agent},
        {"list", l_list},
        {"set_budget", l_set_budget},
        {"start", l_start},
        {"stop", l_stop},
        {"in_flight", l_in_flight},
        {"new", l_new},
        {NULL, NULL}};

    if (luaL_newmetatable(L, DISPATCHER_MT)) {
        luaL_newlib(L, methods);
        lua_setfield(L, -2, "__index");
        lua_pushcfunction(L, l_gc);
        lua_setfield(L, -2, "__gc");
    }
    lua_pop(L, 1);
    lua_newtable(L);
    lua_pushlightuserdata(L, rt);
    luaL_setfuncs(L, funcs, 1);
    return 1;
}
