/* bindings: the `netra` Lua module (see bindings.h). */
#include "bindings.h"

#include <dirent.h>
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <lauxlib.h>
#include <lualib.h>

#include "analytics.h"
#include "bind_clickhouse.h"
#include "bind_disp.h"
#include "log.h"
#include "server.h"

static runtime *rt_of(lua_State *L) {
    return lua_touserdata(L, lua_upvalueindex(1));
}

/* ---- JSON <-> Lua ---------------------------------------------------------- */

void bindings_push_json(lua_State *L, const cJSON *v) {
    luaL_checkstack(L, 4, "JSON nested too deeply");
    if (cJSON_IsObject(v)) {
        lua_createtable(L, 0, cJSON_GetArraySize(v));
        for (const cJSON *c = v->child; c; c = c->next) {
            if (cJSON_IsNull(c)) continue;
            bindings_push_json(L, c);
            lua_setfield(L, -2, c->string);
        }
    } else if (cJSON_IsArray(v)) {
        lua_createtable(L, cJSON_GetArraySize(v), 0);
        lua_Integer i = 1;
        for (const cJSON *c = v->child; c; c = c->next, i++) {
            bindings_push_json(L, c);
            lua_rawseti(L, -2, i);
        }
    } else if (cJSON_IsString(v)) {
        lua_pushstring(L, v->valuestring);
    } else if (cJSON_IsBool(v)) {
        lua_pushboolean(L, cJSON_IsTrue(v));
    } else if (cJSON_IsNumber(v)) {
        double d = v->valuedouble;
        if (d == floor(d) && fabs(d) < 9007199254740992.0)
            lua_pushinteger(L, (lua_Integer)d);
        else
            lua_pushnumber(L, d);
    } else {
        lua_pushnil(L);
    }
}

static cJSON *to_json(lua_State *L, int idx, int depth, char *err,
                      size_t size);

/* A table is an array when its keys are exactly 1..n (n >= 1). */
static bool is_array(lua_State *L, int idx, lua_Integer *n) {
    lua_Integer count = 0;
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        lua_pop(L, 1);
        if (!lua_isinteger(L, -1)) {
            lua_pop(L, 1);
            return false;
        }
        count++;
    }
    *n = count;
    return count > 0 && (lua_Integer)lua_rawlen(L, idx) == count;
}

static cJSON *table_to_json(lua_State *L, int idx, int depth, char *err,
                            size_t size) {
    lua_Integer n;
    if (is_array(L, idx, &n)) {
        cJSON *a = cJSON_CreateArray();
        for (lua_Integer i = 1; i <= n; i++) {
            lua_rawgeti(L, idx, i);
            cJSON *item = to_json(L, lua_gettop(L), depth + 1, err, size);
            lua_pop(L, 1);
            if (!item) {
                cJSON_Delete(a);
                return NULL;
            }
            cJSON_AddItemToArray(a, item);
        }
        return a;
    }
    cJSON *o = cJSON_CreateObject();
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        if (lua_type(L, -2) != LUA_TSTRING) {
            lua_pop(L, 2);
            snprintf(err, size, "table keys must be strings (or 1..n)");
            cJSON_Delete(o);
            return NULL;
        }
        cJSON *item = to_json(L, lua_gettop(L), depth + 1, err, size);
        if (!item) {
            lua_pop(L, 2);
            cJSON_Delete(o);
            return NULL;
        }
        cJSON_AddItemToObject(o, lua_tostring(L, -2), item);
        lua_pop(L, 1);
    }
    return o;
}

static cJSON *to_json(lua_State *L, int idx, int depth, char *err,
                      size_t size) {
    if (depth > 64) {
        snprintf(err, size, "value nested deeper than 64 levels (a cycle?)");
        return NULL;
    }
    switch (lua_type(L, idx)) {
    case LUA_TNIL: return cJSON_CreateNull();
    case LUA_TBOOLEAN: return cJSON_CreateBool(lua_toboolean(L, idx));
    case LUA_TNUMBER: return cJSON_CreateNumber(lua_tonumber(L, idx));
    case LUA_TSTRING: return cJSON_CreateString(lua_tostring(L, idx));
    case LUA_TTABLE:
        luaL_checkstack(L, 4, "table nested too deeply");
        return table_to_json(L, idx, depth, err, size);
    case LUA_TLIGHTUSERDATA:
        if (!lua_touserdata(L, idx)) return cJSON_CreateNull();
        /* fall through */
    default:
        snprintf(err, size, "cannot convert a %s to JSON",
                 luaL_typename(L, idx));
        return NULL;
    }
}

cJSON *bindings_to_json(lua_State *L, int index, char *err, size_t size) {
    return to_json(L, lua_absindex(L, index), 0, err, size);
}

/* ---- netra.config ---------------------------------------------------------- */

static int l_config_get(lua_State *L) {
    const char *v = config_get(rt_of(L)->cfg, luaL_checkstring(L, 1));
    if (v) lua_pushstring(L, v);
    else lua_pushvalue(L, 2);
    return 1;
}

static int l_config_bool(lua_State *L) {
    const char *key = luaL_checkstring(L, 1);
    bool def = lua_toboolean(L, 2), out;
    char err[256];
    if (config_bool(rt_of(L)->cfg, key, def, &out, err, sizeof err) < 0)
        return luaL_error(L, "%s", err);
    lua_pushboolean(L, out);
    return 1;
}

static int l_config_int(lua_State *L) {
    const char *key = luaL_checkstring(L, 1);
    lua_Integer def = luaL_optinteger(L, 2, 0);
    lua_Integer min = luaL_optinteger(L, 3, LONG_MIN);
    lua_Integer max = luaL_optinteger(L, 4, LONG_MAX);
    long out;
    char err[256];
    if (config_int(rt_of(L)->cfg, key, (long)def, (long)min, (long)max, &out,
                   err, sizeof err) < 0)
        return luaL_error(L, "%s", err);
    lua_pushinteger(L, out);
    return 1;
}

static int l_config_source(lua_State *L) {
    runtime *rt = rt_of(L);
    config_source s = config_source_of(rt->cfg, luaL_checkstring(L, 1));
    lua_pushstring(L, config_source_name(rt->cfg, s));
    return 1;
}

static int l_config_is_secret(lua_State *L) {
    lua_pushboolean(L, config_is_secret(luaL_checkstring(L, 1)));
    return 1;
}

static int l_config_environment(lua_State *L) {
    lua_pushstring(L, config_environment(rt_of(L)->cfg));
    return 1;
}

static int l_config_home(lua_State *L) {
    lua_pushstring(L, config_home(rt_of(L)->cfg));
    return 1;
}

static const luaL_Reg config_funcs[] = {
    {"get", l_config_get},
    {"bool", l_config_bool},
    {"int", l_config_int},
    {"source", l_config_source},
    {"is_secret", l_config_is_secret},
    {"environment", l_config_environment},
    {"home", l_config_home},
    {NULL, NULL},
};

/* ---- netra.log --------------------------------------------------------------- */

static int log_at(lua_State *L, log_level level) {
    const char *component = luaL_checkstring(L, 1);
    const char *message = luaL_checkstring(L, 2);
    log_msg(level, component, "%s", message);
    return 0;
}

static int l_log_debug(lua_State *L) { return log_at(L, NLOG_DEBUG); }
static int l_log_info(lua_State *L) { return log_at(L, NLOG_INFO); }
static int l_log_warn(lua_State *L) { return log_at(L, NLOG_WARN); }
static int l_log_error(lua_State *L) { return log_at(L, NLOG_ERROR); }

static const luaL_Reg log_funcs[] = {
    {"debug", l_log_debug}, {"info", l_log_info},
    {"warn", l_log_warn},   {"error", l_log_error},
    {NULL, NULL},
};

/* ---- netra.health ------------------------------------------------------------ */

/* A health check written in Lua: a function kept in the registry of the
 * state that registered it, called under rt->lua_lock. */
/* What a check knows of its state: L, until the state is closed (its
 * __gc clears it under rt->lua_lock). Shared by the state and each check
 * registered from it; freed by the last of them, so that a check that
 * outlives its state (a reload closed it) neither runs nor unrefs. */
typedef struct {
    atomic_int refs;
    lua_State *L;
} state_anchor;

typedef struct {
    runtime *rt;
    state_anchor *anchor;
    int ref;
    int timeout_ms;
} lua_check;

#define ANCHOR_KEY "netra.state_anchor"

static void anchor_unref(state_anchor *a) {
    if (a && atomic_fetch_sub(&a->refs, 1) == 1) free(a);
}

static int anchor_gc(lua_State *L) {
    state_anchor **slot = lua_touserdata(L, 1);
    if (*slot) {
        (*slot)->L = NULL;
        anchor_unref(*slot);
        *slot = NULL;
    }
    return 0;
}

/* The anchor of L's main state, made on first use; a new reference for
 * the caller, or NULL when out of memory. */
static state_anchor *anchor_of(lua_State *L) {
    lua_getfield(L, LUA_REGISTRYINDEX, ANCHOR_KEY);
    state_anchor **slot = lua_touserdata(L, -1);
    lua_pop(L, 1);
    if (!slot) {
        state_anchor *a = calloc(1, sizeof *a);
        if (!a) return NULL;
        atomic_init(&a->refs, 1);
        lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_MAINTHREAD);
        a->L = lua_tothread(L, -1);
        lua_pop(L, 1);
        slot = lua_newuserdatauv(L, sizeof *slot, 0);
        *slot = a;
        lua_createtable(L, 0, 1);
        lua_pushcfunction(L, anchor_gc);
        lua_setfield(L, -2, "__gc");
        lua_setmetatable(L, -2);
        lua_setfield(L, LUA_REGISTRYINDEX, ANCHOR_KEY);
    }
    atomic_fetch_add(&(*slot)->refs, 1);
    return *slot;
}

typedef struct {
    struct timespec deadline;
} check_deadline;

static void deadline_hook(lua_State *L, lua_Debug *ar) {
    (void)ar;
    check_deadline *d;
    lua_getfield(L, LUA_REGISTRYINDEX, "netra.check_deadline");
    d = lua_touserdata(L, -1);
    lua_pop(L, 1);
    if (!d) return;
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    if (now.tv_sec > d->deadline.tv_sec ||
        (now.tv_sec == d->deadline.tv_sec &&
         now.tv_nsec > d->deadline.tv_nsec))
        luaL_error(L, "check ran past its timeout");
}

static health_status run_lua_check(void *ud, char *message, size_t size,
                                   cJSON **observed) {
    lua_check *lc = ud;
    health_status status = HEALTH_UNHEALTHY;
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_sec += lc->timeout_ms / 1000;
    until.tv_nsec += (long)(lc->timeout_ms % 1000) * 1000000L;
    if (until.tv_nsec >= 1000000000L) {
        until.tv_sec++;
        until.tv_nsec -= 1000000000L;
    }
    if (pthread_mutex_timedlock(&lc->rt->lua_lock, &until) != 0) {
        snprintf(message, size,
                 "could not run: the policy's Lua state stayed busy for %d "
                 "ms (another Lua check or the policy is still running)",
                 lc->timeout_ms);
        return HEALTH_UNKNOWN;
    }
    lua_State *L = lc->anchor->L;
    if (!L) {
        pthread_mutex_unlock(&lc->rt->lua_lock);
        snprintf(message, size, "the Lua state of this check is gone");
        return HEALTH_UNKNOWN;
    }
    int top = lua_gettop(L);

    check_deadline *d = lua_newuserdatauv(L, sizeof *d, 0);
    clock_gettime(CLOCK_MONOTONIC, &d->deadline);
    d->deadline.tv_sec += lc->timeout_ms / 1000;
    d->deadline.tv_nsec += (long)(lc->timeout_ms % 1000) * 1000000L;
    if (d->deadline.tv_nsec >= 1000000000L) {
        d->deadline.tv_sec++;
        d->deadline.tv_nsec -= 1000000000L;
    }
    lua_setfield(L, LUA_REGISTRYINDEX, "netra.check_deadline");
    lua_sethook(L, deadline_hook, LUA_MASKCOUNT, 1000);

    lua_rawgeti(L, LUA_REGISTRYINDEX, lc->ref);
    if (lua_pcall(L, 0, 3, 0) != LUA_OK) {
        snprintf(message, size, "check failed: %s", lua_tostring(L, -1));
    } else {
        const char *name = lua_tostring(L, top + 1);
        if (!name || !health_status_parse(name, &status)) {
            snprintf(message, size,
                     "check returned %s instead of a status name "
                     "(healthy, degraded, unhealthy, ...)",
                     name ? name : luaL_typename(L, top + 1));
            status = HEALTH_UNHEALTHY;
        } else {
            snprintf(message, size, "%s",
                     lua_isstring(L, top + 2) ? lua_tostring(L, top + 2)
                                              : "");
            if (!lua_isnil(L, top + 3)) {
                char err[128];
                *observed = bindings_to_json(L, top + 3, err, sizeof err);
            }
        }
    }
    lua_sethook(L, NULL, 0, 0);
    lua_pushnil(L);
    lua_setfield(L, LUA_REGISTRYINDEX, "netra.check_deadline");
    lua_settop(L, top);
    pthread_mutex_unlock(&lc->rt->lua_lock);
    return status;
}

static void free_lua_check(void *ud) {
    lua_check *lc = ud;
    pthread_mutex_lock(&lc->rt->lua_lock);
    if (lc->anchor->L) luaL_unref(lc->anchor->L, LUA_REGISTRYINDEX, lc->ref);
    pthread_mutex_unlock(&lc->rt->lua_lock);
    anchor_unref(lc->anchor);
    free(lc);
}

static int opt_int_field(lua_State *L, int t, const char *key, int def) {
    lua_getfield(L, t, key);
    int v = lua_isnil(L, -1) ? def : (int)luaL_checkinteger(L, -1);
    lua_pop(L, 1);
    return v;
}

static const char *opt_str_field(lua_State *L, int t, const char *key,
                                 const char *def) {
    lua_getfield(L, t, key);
    const char *v = lua_isnil(L, -1) ? def : luaL_checkstring(L, -1);
    lua_pop(L, 1); /* the string stays alive in the table */
    return v;
}

/* netra.health.register{name=, type=, required=, check=function|"bridge",
 * interval_ms=, timeout_ms=, max_age_ms=, fail_after=, recover_after=,
 * measurement=, unit=} */
static int l_health_register(lua_State *L) {
    runtime *rt = rt_of(L);
    luaL_checktype(L, 1, LUA_TTABLE);
    health_spec spec;
    memset(&spec, 0, sizeof spec);
    spec.name = opt_str_field(L, 1, "name", NULL);
    if (!spec.name) return luaL_error(L, "health.register: name is required");
    if (!strcmp(spec.name, "live") || !strcmp(spec.name, "ready"))
        return luaL_error(L, "health.register: '%s' is reserved for "
                             "/health/%s; choose another name",
                          spec.name, spec.name);
    spec.type = opt_str_field(L, 1, "type", "component");
    spec.measurement = opt_str_field(L, 1, "measurement", NULL);
    spec.unit = opt_str_field(L, 1, "unit", NULL);
    lua_getfield(L, 1, "required");
    spec.required = lua_toboolean(L, -1);
    lua_pop(L, 1);
    spec.interval_ms = opt_int_field(L, 1, "interval_ms", 0);
    spec.timeout_ms = opt_int_field(L, 1, "timeout_ms", 0);
    spec.max_age_ms = opt_int_field(L, 1, "max_age_ms", 0);
    spec.fail_after = opt_int_field(L, 1, "fail_after", 0);
    spec.recover_after = opt_int_field(L, 1, "recover_after", 0);

    char err[256];
    lua_getfield(L, 1, "check");
    if (lua_type(L, -1) == LUA_TSTRING &&
        !strcmp(lua_tostring(L, -1), "bridge")) {
        lua_pop(L, 1);
        if (!rt->server) {
            /* No listener in this process (check, repl): keep the
             * component, with nothing to check. */
            if (health_register(rt->health, &spec, err, sizeof err) < 0)
                return luaL_error(L, "health.register: %s", err);
            return 0;
        }
        if (server_register_bridge(rt->server, &spec, err, sizeof err) < 0)
            return luaL_error(L, "health.register: %s", err);
        return 0;
    }
    if (lua_isfunction(L, -1)) {
        lua_check *lc = calloc(1, sizeof *lc);
        if (!lc || !(lc->anchor = anchor_of(L))) {
            free(lc);
            return luaL_error(L, "out of memory");
        }
        lc->rt = rt;
        lc->timeout_ms = spec.timeout_ms > 0 ? spec.timeout_ms : 2000;
        lua_pushvalue(L, -1);
        lc->ref = luaL_ref(L, LUA_REGISTRYINDEX);
        spec.check = run_lua_check;
        spec.ud = lc;
        spec.ud_free = free_lua_check;
    } else if (!lua_isnil(L, -1)) {
        return luaL_error(L, "health.register: check must be a function or "
                             "\"bridge\"");
    }
    lua_pop(L, 1);
    if (health_register(rt->health, &spec, err, sizeof err) < 0) {
        if (spec.ud) free_lua_check(spec.ud);
        return luaL_error(L, "health.register: %s", err);
    }
    return 0;
}

static int l_health_set(lua_State *L) {
    runtime *rt = rt_of(L);
    const char *name = luaL_checkstring(L, 1);
    health_status status;
    if (!health_status_parse(luaL_checkstring(L, 2), &status))
        return luaL_argerror(L, 2, "expected a status name: starting, "
                                   "healthy, degraded, unhealthy, unknown or "
                                   "disabled");
    const char *message = luaL_optstring(L, 3, "");
    cJSON *observed = NULL;
    if (!lua_isnoneornil(L, 4)) {
        char err[128];
        observed = bindings_to_json(L, 4, err, sizeof err);
        if (!observed) return luaL_argerror(L, 4, err);
    }
    if (health_set(rt->health, name, status, message, observed) < 0)
        return luaL_error(L, "health.set: no component named '%s' - "
                             "register it first",
                          name);
    return 0;
}

static void push_info(lua_State *L, const health_info *info) {
    lua_createtable(L, 0, 8);
    lua_pushstring(L, info->name);
    lua_setfield(L, -2, "name");
    lua_pushstring(L, info->type);
    lua_setfield(L, -2, "type");
    lua_pushstring(L, health_status_name(info->status));
    lua_setfield(L, -2, "status");
    lua_pushboolean(L, info->required);
    lua_setfield(L, -2, "required");
    lua_pushstring(L, info->message);
    lua_setfield(L, -2, "message");
    lua_pushinteger(L, info->last_check_ms);
    lua_setfield(L, -2, "last_check_ms");
    lua_pushnumber(L, info->duration_ms);
    lua_setfield(L, -2, "duration_ms");
}

static int l_health_get(lua_State *L) {
    health_info info;
    if (health_get(rt_of(L)->health, luaL_checkstring(L, 1), &info) < 0) {
        lua_pushnil(L);
        lua_pushfstring(L, "no component named '%s'", lua_tostring(L, 1));
        return 2;
    }
    push_info(L, &info);
    return 1;
}

static int l_health_overall(lua_State *L) {
    lua_pushstring(L, health_status_name(health_overall(rt_of(L)->health)));
    return 1;
}

static int l_health_snapshot(lua_State *L) {
    runtime *rt = rt_of(L);
    char phase[32];
    runtime_phase(rt, phase, sizeof phase);
    cJSON *doc = health_render(rt->health, true, config_environment(rt->cfg),
                               phase);
    if (!doc) return luaL_error(L, "out of memory");
    bindings_push_json(L, doc);
    cJSON_Delete(doc);
    return 1;
}

static int l_health_components(lua_State *L) {
    cJSON *names = health_names(rt_of(L)->health);
    bindings_push_json(L, names);
    cJSON_Delete(names);
    return 1;
}

static int l_health_run_all(lua_State *L) {
    health_run_all(rt_of(L)->health);
    return 0;
}

static int l_health_remove(lua_State *L) {
    lua_pushboolean(L, health_remove(rt_of(L)->health,
                                     luaL_checkstring(L, 1)) == 0);
    return 1;
}

static const luaL_Reg health_funcs[] = {
    {"register", l_health_register},
    {"set", l_health_set},
    {"get", l_health_get},
    {"overall", l_health_overall},
    {"snapshot", l_health_snapshot},
    {"components", l_health_components},
    {"run_all", l_health_run_all},
    {"remove", l_health_remove},
    {NULL, NULL},
};

/* ---- netra.startup ----------------------------------------------------------- */

static int l_startup_phase(lua_State *L) {
    runtime *rt = rt_of(L);
    if (lua_isnoneornil(L, 1)) {
        char phase[32];
        runtime_phase(rt, phase, sizeof phase);
        lua_pushstring(L, phase);
        return 1;
    }
    const char *phase = luaL_checkstring(L, 1);
    runtime_set_phase(rt, phase);
    log_msg(NLOG_INFO, "startup", "phase %s", phase);
    return 0;
}

static int l_startup_dry_run(lua_State *L) {
    lua_pushboolean(L, rt_of(L)->dry_run);
    return 1;
}

static int l_startup_serving(lua_State *L) {
    lua_pushboolean(L, rt_of(L)->server != NULL);
    return 1;
}

static int l_startup_sleep(lua_State *L) {
    lua_Number ms = luaL_checknumber(L, 1);
    luaL_argcheck(L, ms >= 0 && ms <= 3600 * 1000, 1,
                  "milliseconds from 0 to 3600000");
    if (ms > 0) {
        struct timespec ts = {.tv_sec = (time_t)(ms / 1000),
                              .tv_nsec = (long)fmod(ms, 1000) * 1000000L};
        nanosleep(&ts, NULL);
    }
    return 0;
}

static int l_startup_now_ms(lua_State *L) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    lua_pushinteger(L, (lua_Integer)ts.tv_sec * 1000 + ts.tv_nsec / 1000000);
    return 1;
}

static int cmp_names(const void *a, const void *b) {
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* netra.startup.list_dir(path) -> sorted names of the regular files in
 * path (no dot files), or nil, message. */
static int l_startup_list_dir(lua_State *L) {
    const char *path = luaL_checkstring(L, 1);
    DIR *dir = opendir(path);
    if (!dir) {
        lua_pushnil(L);
        lua_pushfstring(L, "cannot list %s: %s", path, strerror(errno));
        return 2;
    }
    char **names = NULL;
    size_t n = 0, cap = 0;
    struct dirent *e;
    while ((e = readdir(dir))) {
        if (e->d_name[0] == '.' ||
            (e->d_type != DT_REG && e->d_type != DT_UNKNOWN))
            continue;
        if (n == cap) {
            cap = cap ? cap * 2 : 16;
            char **grown = realloc(names, cap * sizeof *grown);
            if (!grown) break;
            names = grown;
        }
        if (!(names[n] = strdup(e->d_name))) break;
        n++;
    }
    closedir(dir);
    qsort(names, n, sizeof *names, cmp_names);
    lua_createtable(L, (int)n, 0);
    for (size_t i = 0; i < n; i++) {
        lua_pushstring(L, names[i]);
        lua_rawseti(L, -2, (lua_Integer)i + 1);
        free(names[i]);
    }
    free(names);
    return 1;
}

static const luaL_Reg startup_funcs[] = {
    {"list_dir", l_startup_list_dir},
    {"phase", l_startup_phase},
    {"dry_run", l_startup_dry_run},
    {"serving", l_startup_serving},
    {"sleep", l_startup_sleep},
    {"now_ms", l_startup_now_ms},
    {NULL, NULL},
};

/* ---- netra.server ------------------------------------------------------------- */

/* netra.server.set_auth{anonymous = bool, require_exp = bool}: who may
 * connect to /ws. A no-op outside `netra serve`. */
static int l_server_set_auth(lua_State *L) {
    runtime *rt = rt_of(L);
    luaL_checktype(L, 1, LUA_TTABLE);
    server_auth auth;
    lua_getfield(L, 1, "anonymous");
    auth.anonymous = lua_toboolean(L, -1);
    lua_getfield(L, 1, "require_exp");
    auth.require_exp = lua_toboolean(L, -1);
    lua_pop(L, 2);
    if (rt->server) server_set_auth(rt->server, &auth);
    return 0;
}

static const luaL_Reg server_funcs[] = {
    {"set_auth", l_server_set_auth},
    {NULL, NULL},
};

/* ---- netra.analytics ---------------------------------------------------------- */

/* The directory for netra's own state: NETRA_STATE_DIR, else
 * $XDG_STATE_HOME/netra, else ~/.local/state/netra, else /var/lib/netra. */
static void state_dir(runtime *rt, char *out, size_t n) {
    const char *dir = config_get(rt->cfg, "NETRA_STATE_DIR");
    const char *xdg = config_get(rt->cfg, "XDG_STATE_HOME");
    const char *home = config_get(rt->cfg, "HOME");
    if (dir) snprintf(out, n, "%s", dir);
    else if (xdg) snprintf(out, n, "%s/netra", xdg);
    else if (home) snprintf(out, n, "%s/.local/state/netra", home);
    else snprintf(out, n, "/var/lib/netra");
}

/* netra.analytics.start{mode = "clickhouse" | "local"}: starts the
 * analytics thread for this process (once). Returns true, or nil and the
 * reason. Outside `netra serve` it does nothing and returns true. */
static int l_analytics_start(lua_State *L) {
    runtime *rt = rt_of(L);
    luaL_checktype(L, 1, LUA_TTABLE);
    const char *mode = opt_str_field(L, 1, "mode", "clickhouse");
    if (strcmp(mode, "clickhouse") && strcmp(mode, "local"))
        return luaL_argerror(L, 1, "mode must be \"clickhouse\" or \"local\"");
    if (!rt->server || rt->dry_run || rt->analytics) {
        lua_pushboolean(L, 1);
        return 1;
    }
    char state[2048], spool_dir[2200], events[2200], err[1024];
    state_dir(rt, state, sizeof state);
    int port = server_port(rt->server);
    const char *sd = config_get(rt->cfg, "NETRA_SPOOL_DIR");
    const char *ef = config_get(rt->cfg, "NETRA_EVENTS_FILE");
    if (sd) snprintf(spool_dir, sizeof spool_dir, "%s", sd);
    else snprintf(spool_dir, sizeof spool_dir, "%s/spool-%d", state, port);
    if (ef) snprintf(events, sizeof events, "%s", ef);
    else snprintf(events, sizeof events, "%s/events-%d.jsonl", state, port);
    long max_mb;
    if (config_int(rt->cfg, "NETRA_SPOOL_MAX_BYTES", 1L << 30, 4096,
                   1L << 40, &max_mb, err, sizeof err) < 0) {
        lua_pushnil(L);
        lua_pushstring(L, err);
        return 2;
    }
    long rotate;
    if (config_int(rt->cfg, "NETRA_EVENTS_ROTATE_BYTES", 64L << 20, 4096,
                   1L << 40, &rotate, err, sizeof err) < 0) {
        lua_pushnil(L);
        lua_pushstring(L, err);
        return 2;
    }
    analytics_config ac = {
        .mode = strcmp(mode, "local") ? ANALYTICS_CLICKHOUSE : ANALYTICS_LOCAL,
        .spool_dir = spool_dir,
        .spool_max_bytes = (uint64_t)max_mb,
        .events_file = events,
        .events_rotate_bytes = (uint64_t)rotate,
        .health = rt->health,
    };
    ac.clickhouse_get = config_getter;
    ac.clickhouse_get_ud = rt->cfg;
    rt->analytics = analytics_start(&ac, err, sizeof err);
    if (!rt->analytics) {
        lua_pushnil(L);
        lua_pushfstring(L, "[analytics] %s", err);
        return 2;
    }
    log_msg(NLOG_INFO, "analytics", "%s",
            ac.mode == ANALYTICS_LOCAL
                ? "ClickHouse disabled: events go to the local JSON-lines "
                  "file"
                : "events are spooled, then sent to ClickHouse");
    lua_pushboolean(L, 1);
    return 1;
}

static const luaL_Reg analytics_funcs[] = {
    {"start", l_analytics_start},
    {NULL, NULL},
};

/* ---- the module ---------------------------------------------------------------- */

static void add_section(lua_State *L, runtime *rt, const char *name,
                        const luaL_Reg *funcs) {
    lua_newtable(L);
    lua_pushlightuserdata(L, rt);
    luaL_setfuncs(L, funcs, 1);
    lua_setfield(L, -2, name);
}

int bindings_push(lua_State *L, runtime *rt) {
    lua_newtable(L);
    lua_pushstring(L, NETRA_VERSION);
    lua_setfield(L, -2, "version");
    lua_pushstring(L, config_environment(rt->cfg));
    lua_setfield(L, -2, "environment");
    lua_pushlightuserdata(L, NULL);
    lua_setfield(L, -2, "null");
    add_section(L, rt, "config", config_funcs);
    add_section(L, rt, "log", log_funcs);
    add_section(L, rt, "health", health_funcs);
    add_section(L, rt, "startup", startup_funcs);
    add_section(L, rt, "server", server_funcs);
    add_section(L, rt, "analytics", analytics_funcs);
    bind_clickhouse(L);
    lua_setfield(L, -2, "clickhouse");
    bind_disp(L, rt);
    lua_setfield(L, -2, "dispatcher");
    return 1;
}

static int preload_netra(lua_State *L) {
    return bindings_push(L, lua_touserdata(L, lua_upvalueindex(1)));
}

void bindings_preload(lua_State *L, runtime *rt) {
    lua_getglobal(L, "package");
    lua_getfield(L, -1, "preload");
    lua_pushlightuserdata(L, rt);
    lua_pushcclosure(L, preload_netra, 1);
    lua_setfield(L, -2, "netra");
    lua_pop(L, 1);

    const char *home = config_home(rt->cfg);
    lua_getfield(L, -1, "path");
    lua_pushfstring(L, "%s/lua/?.lua;%s/lua/?/init.lua;%s", home, home,
                    lua_tostring(L, -1));
    lua_setfield(L, -3, "path");
    lua_pop(L, 2);
}
