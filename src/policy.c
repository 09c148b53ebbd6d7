/* policy: the startup policy's Lua state (see policy.h). */
#include "policy.h"

#include <errno.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <sys/stat.h>

#include <lauxlib.h>
#include <lualib.h>

#include "bindings.h"

/* A policy file larger than this is refused (it is configuration). */
#define POLICY_MAX_BYTES (1 << 20)

struct policy {
    runtime *rt;
    lua_State *L;
    int ref; /* the policy table */
    char path[PATH_MAX];
};

/* Message handler: the error plus a traceback. */
static int traceback(lua_State *L) {
    const char *msg = lua_tostring(L, 1);
    if (!msg) msg = lua_pushfstring(L, "(error object is a %s value)",
                                    luaL_typename(L, 1));
    luaL_traceback(L, L, msg, 1);
    return 1;
}

static void policy_file(runtime *rt, char *out, size_t size) {
    const char *custom = config_get(rt->cfg, "NETRA_POLICY");
    if (custom) snprintf(out, size, "%s", custom);
    else snprintf(out, size, "%s/lua/netra/policy.lua", config_home(rt->cfg));
}

/* Loads a Lua file as text, named in messages by its path relative to
 * home when it lies there (lua/netra/policy.lua:12: ...). */
static int load_text_file(lua_State *L, const char *path, const char *home) {
    size_t hl = strlen(home);
    const char *shown = path;
    if (!strncmp(path, home, hl) && path[hl] == '/') shown = path + hl + 1;

    struct stat st;
    if (stat(path, &st) < 0) {
        lua_pushfstring(L, "cannot open %s: %s", path, strerror(errno));
        return LUA_ERRFILE;
    }
    if (!S_ISREG(st.st_mode) || st.st_size > POLICY_MAX_BYTES) {
        lua_pushfstring(L, "%s is not a regular file of at most %d bytes",
                        path, POLICY_MAX_BYTES);
        return LUA_ERRFILE;
    }
    FILE *f = fopen(path, "rb");
    if (!f) {
        lua_pushfstring(L, "cannot open %s: %s", path, strerror(errno));
        return LUA_ERRFILE;
    }
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    char chunk[4096];
    size_t n;
    while ((n = fread(chunk, 1, sizeof chunk, f)) > 0)
        luaL_addlstring(&b, chunk, n);
    fclose(f);
    luaL_pushresult(&b);
    size_t len;
    const char *text = lua_tolstring(L, -1, &len);
    lua_pushfstring(L, "@%s", shown);
    int rc = luaL_loadbufferx(L, text, len, lua_tostring(L, -1), "t");
    lua_remove(L, -2); /* chunk name */
    lua_remove(L, -2); /* text */
    return rc;
}

policy *policy_open(runtime *rt, char *err, size_t err_size) {
    policy *p = calloc(1, sizeof *p);
    if (!p || !(p->L = luaL_newstate())) {
        free(p);
        snprintf(err, err_size, "out of memory creating the policy state");
        return NULL;
    }
    p->rt = rt;
    policy_file(rt, p->path, sizeof p->path);
    lua_State *L = p->L;

    pthread_mutex_lock(&rt->lua_lock);
    luaL_openlibs(L);
    bindings_preload(L, rt);
    lua_pushcfunction(L, traceback);
    int handler = lua_gettop(L);
    int rc = load_text_file(L, p->path, config_home(rt->cfg));
    if (rc == LUA_OK) rc = lua_pcall(L, 0, 1, handler);
    if (rc != LUA_OK) {
        snprintf(err, err_size, "policy %s failed to load: %s", p->path,
                 lua_tostring(L, -1));
        pthread_mutex_unlock(&rt->lua_lock);
        policy_close(p);
        return NULL;
    }
    if (!lua_istable(L, -1)) {
        snprintf(err, err_size,
                 "policy %s returned %s; it must return a table with start() "
                 "and check()",
                 p->path, luaL_typename(L, -1));
        pthread_mutex_unlock(&rt->lua_lock);
        policy_close(p);
        return NULL;
    }
    lua_getglobal(L, "package");
    lua_getfield(L, -1, "loaded");
    lua_pushvalue(L, -3);
    lua_setfield(L, -2, "netra.policy");
    lua_pop(L, 2);
    p->ref = luaL_ref(L, LUA_REGISTRYINDEX);
    lua_settop(L, 0);
    pthread_mutex_unlock(&rt->lua_lock);
    return p;
}

/* Pushes the traceback handler and policy[name]; returns the handler's
 * index, or 0 with err filled when the function is missing. */
static int push_method(policy *p, const char *name, char *err,
                       size_t err_size) {
    lua_State *L = p->L;
    lua_pushcfunction(L, traceback);
    int handler = lua_gettop(L);
    lua_rawgeti(L, LUA_REGISTRYINDEX, p->ref);
    lua_getfield(L, -1, name);
    lua_remove(L, -2);
    if (!lua_isfunction(L, -1)) {
        snprintf(err, err_size, "policy %s has no function %s()", p->path,
                 name);
        lua_settop(L, handler - 1);
        return 0;
    }
    return handler;
}

int policy_start(policy *p, char *err, size_t err_size) {
    lua_State *L = p->L;
    pthread_mutex_lock(&p->rt->lua_lock);
    int top = lua_gettop(L);
    int handler = push_method(p, "start", err, err_size);
    int result = POLICY_FAILED;
    if (handler) {
        if (lua_pcall(L, 0, 2, handler) != LUA_OK) {
            snprintf(err, err_size, "policy %s failed: %s", p->path,
                     lua_tostring(L, -1));
        } else if (lua_isboolean(L, -2) && lua_toboolean(L, -2)) {
            result = POLICY_OK;
        } else if (!lua_isnil(L, -2) && !lua_isboolean(L, -2)) {
            snprintf(err, err_size,
                     "policy %s: start() returned a %s; it must return true, "
                     "or nil and the reason it refuses",
                     p->path, luaL_typename(L, -2));
        } else {
            snprintf(err, err_size, "%s",
                     lua_isstring(L, -1) ? lua_tostring(L, -1)
                                         : "the policy refused to start "
                                           "without saying why");
            result = POLICY_REFUSED;
        }
    }
    lua_settop(L, top);
    pthread_mutex_unlock(&p->rt->lua_lock);
    return result;
}

int policy_check(policy *p, FILE *out) {
    lua_State *L = p->L;
    char err[512];
    pthread_mutex_lock(&p->rt->lua_lock);
    int top = lua_gettop(L);
    int handler = push_method(p, "check", err, sizeof err);
    int result = 2;
    if (!handler) {
        fprintf(out, "error: %s\n", err);
    } else if (lua_pcall(L, 0, 2, handler) != LUA_OK) {
        fprintf(out, "error: policy %s failed: %s\n", p->path,
                lua_tostring(L, -1));
    } else {
        if (lua_istable(L, -1)) {
            lua_Integer n = (lua_Integer)lua_rawlen(L, -1);
            for (lua_Integer i = 1; i <= n; i++) {
                lua_rawgeti(L, -1, i);
                fprintf(out, "%s\n", luaL_tolstring(L, -1, NULL));
                lua_pop(L, 2);
            }
        }
        if (!lua_isboolean(L, -2)) {
            fprintf(out, "error: policy %s: check() returned a %s; it must "
                         "return a boolean and the report lines\n",
                    p->path, luaL_typename(L, -2));
            result = 2;
        } else {
            result = lua_toboolean(L, -2) ? 0 : 1;
        }
    }
    lua_settop(L, top);
    pthread_mutex_unlock(&p->rt->lua_lock);
    return result;
}

lua_State *policy_state(policy *p) {
    return p->L;
}

const char *policy_path(const policy *p) {
    return p->path;
}

void policy_close(policy *p) {
    if (!p) return;
    if (p->L) {
        /* A Lua check stuck in a C call may hold the state: rather than
         * wait for it at exit, leave the state to the process's end. */
        struct timespec until;
        clock_gettime(CLOCK_REALTIME, &until);
        until.tv_sec += 2;
        if (pthread_mutex_timedlock(&p->rt->lua_lock, &until) != 0) {
            free(p);
            return;
        }
        lua_close(p->L);
        pthread_mutex_unlock(&p->rt->lua_lock);
    }
    free(p);
}
