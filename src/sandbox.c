/* sandbox: one Lua state per worker, the tool environment, budgets and
 * requests as coroutines. See sandbox.h for the contract. */
#include "sandbox.h"

#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <lauxlib.h>
#include <lualib.h>

#include "log.h"
#include "utf8.h"

#define SBX_POOL_MAX 16
#define SBX_PRINT_MAX 4096
#define SBX_NAME_MAX 64

/* Registry keys (addresses of these bytes). */
static const char KEY_BASE = 0;   /* the shared base environment */
static const char KEY_FROZEN = 0; /* weak set of read-only tables */
static const char KEY_LIBS = 0;   /* require cache */

typedef struct {
    char *path;
    char *name;
    int fn_ref; /* the handler in the current state */
    sbx_budget budget;
    bool agent; /* an agent file (run) rather than a tool (handler) */
} sbx_tool;

/* A timer cell outlives its sandbox: a signal may still be on its way
 * after sbx_free. Cells are kept on a global list and never reused. */
typedef struct timer_cell {
    sbx *volatile s;
    struct timer_cell *next;
} timer_cell;

struct sbx {
    lua_State *L;
    char *lua_dir;
    sbx_budget defaults;
    int64_t state_limit;
    sbx_hook_mode hook;
    const atomic_bool *stop;

    int64_t used;     /* bytes allocated by the state */
    bool state_hit;   /* the state-wide limit refused an allocation */
    bool damaged;     /* a memory limit was hit since the last build */
    bool building;    /* no request accounting while building */
    bool loading;     /* inside load_file: no automatic rebuild */

    sbx_request *volatile current;  /* the request running now */
    lua_State *volatile running;    /* its innermost running thread */

    sbx_tool *tools;
    int ntools, tools_cap;

    sbx_request *requests; /* every live request */
    int in_flight;

    int pool[SBX_POOL_MAX]; /* registry refs of reusable threads */
    int npool;

    timer_cell *cell;
    timer_t timer;
    bool has_timer;
};

struct sbx_request {
    sbx *s;
    sbx_request *prev, *next;
    lua_State *co;
    int co_ref;
    int nargs;
    char *tool;
    char *request_id, *run_id;

    int64_t time_ms, instr_limit, mem_limit; /* <= 0: off */
    int64_t deadline_ms;
    int64_t instr;
    int64_t mem;
    bool mem_hit;
    bool state_hit;        /* the state-wide limit, not the request's */
    bool hooked;           /* a count hook runs all the time */
    volatile bool armed;   /* the timer or allocator armed a hook */

    sbx_status status;
    bool started;
    bool waiting;
    void *wait_token;
    sbx_stop stop;
    char *error;
    int nres;
    void *ud;
    const atomic_bool *cancel;
    const char *cancel_reason;
};

static void sbx_hook(lua_State *L, lua_Debug *ar);
static void set_error(sbx_request *req, sbx_stop stop, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* ---- small helpers ---------------------------------------------------- */

static int64_t now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static char *dup_str(const char *s) {
    if (!s)
        return NULL;
    size_t n = strlen(s) + 1;
    char *d = malloc(n);
    if (d)
        memcpy(d, s, n);
    return d;
}

/* The name a file goes by in messages: "lua/netra/tools/x.lua" when it
 * lies under the sandbox's lua_dir "/srv/lua" (Lua cuts long chunk
 * names), else the path itself. */
static void display_name(const sbx *s, const char *path, char *out,
                         size_t n) {
    size_t dl = strlen(s->lua_dir);
    const char *last = strrchr(s->lua_dir, '/');

    last = last ? last + 1 : s->lua_dir;
    if (*last && !strncmp(path, s->lua_dir, dl) && path[dl] == '/')
        snprintf(out, n, "%s%s", last, path + dl);
    else
        snprintf(out, n, "%s", path);
}

#define SBX_FILE_MAX (4 << 20)

/* Loads a Lua file as text under the chunk name "@<shown>". Pushes the
 * function, or an error message; returns a lua_load status. */
static int load_text(lua_State *L, const char *path, const char *shown) {
    FILE *f = fopen(path, "rb");
    char *buf;
    size_t n;
    int rc;

    if (!f) {
        lua_pushfstring(L, "cannot open %s: %s", shown, strerror(errno));
        return LUA_ERRFILE;
    }
    buf = malloc(SBX_FILE_MAX + 1);
    if (!buf) {
        fclose(f);
        lua_pushfstring(L, "cannot read %s: out of memory", shown);
        return LUA_ERRMEM;
    }
    n = fread(buf, 1, SBX_FILE_MAX + 1, f);
    fclose(f);
    if (n > SBX_FILE_MAX) {
        free(buf);
        lua_pushfstring(L, "%s is larger than %d bytes", shown, SBX_FILE_MAX);
        return LUA_ERRFILE;
    }
    lua_pushfstring(L, "@%s", shown);
    rc = luaL_loadbufferx(L, buf, n, lua_tostring(L, -1), "t");
    free(buf);
    lua_remove(L, -2);
    return rc;
}

static sbx *sbx_of(lua_State *L) {
    return *(sbx **)lua_getextraspace(L);
}

static void set_error(sbx_request *req, sbx_stop stop, const char *fmt, ...) {
    char buf[1024];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);

    free(req->error);
    req->error = dup_str(buf);
    req->stop = stop;
}

/* Installs the hook a thread of this request should have now. */
static void apply_hook(sbx_request *req, lua_State *L) {
    if (!req) {
        lua_sethook(L, NULL, 0, 0);
    } else if (req->stop != SBX_STOP_NONE || req->armed) {
        lua_sethook(L, sbx_hook, LUA_MASKCOUNT, 1);
    } else if (req->hooked) {
        lua_sethook(L, sbx_hook, LUA_MASKCOUNT, SBX_HOOK_PERIOD);
    } else {
        lua_sethook(L, NULL, 0, 0);
    }
}

/* Makes the running thread notice its request at the next instruction
 * (from the allocator or the timer signal: only writes a few fields). */
static void arm(sbx *s) {
    sbx_request *req = s->current;
    lua_State *L = s->running;

    if (!req || !L)
        return;
    req->armed = true;
    lua_sethook(L, sbx_hook, LUA_MASKCOUNT, 1);
}

/* ---- allocator -------------------------------------------------------- */

static void *sbx_alloc(void *ud, void *ptr, size_t osize, size_t nsize) {
    sbx *s = ud;
    sbx_request *req = s->building ? NULL : s->current;

    if (!ptr)
        osize = 0;

    if (nsize == 0) {
        free(ptr);
        s->used -= (int64_t)osize;
        if (req) {
            req->mem -= (int64_t)osize;
            if (req->mem < 0)
                req->mem = 0;
        }
        return NULL;
    }

    if (nsize > osize) {
        int64_t grow = (int64_t)(nsize - osize);

        if (req && req->mem_limit > 0 && req->stop == SBX_STOP_NONE &&
            req->mem + grow > req->mem_limit) {
            req->mem_hit = true;
            s->damaged = true;
            arm(s);
            return NULL;
        }
        if (s->used + grow > s->state_limit) {
            s->state_hit = true;
            s->damaged = true;
            if (req && !req->mem_hit) {
                req->mem_hit = true;
                req->state_hit = true;
                arm(s);
            }
            return NULL;
        }
    }

    void *p = realloc(ptr, nsize);
    if (!p)
        return nsize > osize ? NULL : ptr;

    s->used += (int64_t)nsize - (int64_t)osize;
    if (req) {
        req->mem += (int64_t)nsize - (int64_t)osize;
        if (req->mem < 0)
            req->mem = 0;
    }
    return p;
}

/* ---- budgets and stopping -------------------------------------------- */

/* Sets req->stop when a budget ran out. */
static void check_budgets(sbx *s, sbx_request *req) {
    if (req->stop != SBX_STOP_NONE)
        return;

    if (req->cancel && atomic_load(req->cancel)) {
        set_error(req, SBX_STOP_CANCELLED, "%s",
                  req->cancel_reason && req->cancel_reason[0]
                      ? req->cancel_reason
                      : "cancelled");
    } else if (s->stop && atomic_load(s->stop)) {
        set_error(req, SBX_STOP_CANCELLED,
                  "cancelled: the dispatcher is shutting down");
    } else if (req->mem_hit) {
        if (req->state_hit)
            set_error(req, SBX_STOP_MEMORY,
                      "tool '%s' exceeded the sandbox memory limit "
                      "(%lld bytes)",
                      req->tool, (long long)s->state_limit);
        else
            set_error(req, SBX_STOP_MEMORY,
                      "tool '%s' exceeded its memory budget (%lld bytes)",
                      req->tool, (long long)req->mem_limit);
    } else if (req->instr_limit > 0 && req->instr > req->instr_limit) {
        set_error(req, SBX_STOP_INSTRUCTIONS,
                  "tool '%s' exceeded its instruction budget "
                  "(%lld instructions)",
                  req->tool, (long long)req->instr_limit);
    } else if (req->time_ms > 0 && now_ms() >= req->deadline_ms) {
        set_error(req, SBX_STOP_TIME,
                  "tool '%s' exceeded its time budget (%lld ms)", req->tool,
                  (long long)req->time_ms);
    }
}

/* From a C function: leaves the request for good. Yields where Lua can
 * (a yield escapes any pcall), else raises; the count-1 hook raises
 * again at the next instruction if a pcall catches it. */
static int stop_from_c(lua_State *L, sbx_request *req) {
    lua_sethook(L, sbx_hook, LUA_MASKCOUNT, 1);
    if (lua_isyieldable(L))
        return lua_yield(L, 0);
    return luaL_error(L, "%s", req->error ? req->error : "request stopped");
}

static void sbx_hook(lua_State *L, lua_Debug *ar) {
    sbx *s = sbx_of(L);
    sbx_request *req = s->current;

    (void)ar;
    if (!req) {
        lua_sethook(L, NULL, 0, 0);
        return;
    }

    if (req->stop == SBX_STOP_NONE) {
        req->instr += lua_gethookcount(L);
        check_budgets(s, req);
        if (req->stop == SBX_STOP_NONE) {
            if (req->armed) {
                req->armed = false;
                apply_hook(req, L);
            }
            return;
        }
    }

    lua_sethook(L, sbx_hook, LUA_MASKCOUNT, 1);
    if (lua_isyieldable(L)) {
        lua_yield(L, 0);
        return;
    }
    luaL_error(L, "%s", req->error ? req->error : "request stopped");
}

/* ---- the timer (SBX_HOOK_TIMER) --------------------------------------- */

static pthread_mutex_t cells_lock = PTHREAD_MUTEX_INITIALIZER;
static timer_cell *cells;
static pthread_once_t signal_once = PTHREAD_ONCE_INIT;
static int signal_ok;

static void on_timer_signal(int sig, siginfo_t *si, void *uc) {
    (void)sig;
    (void)uc;
    timer_cell *cell = si->si_value.sival_ptr;
    if (cell && cell->s)
        arm(cell->s);
}

static void install_signal(void) {
    struct sigaction sa;

    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_timer_signal;
    sa.sa_flags = SA_SIGINFO | SA_RESTART;
    sigemptyset(&sa.sa_mask);
    signal_ok = sigaction(SBX_TIMER_SIGNAL, &sa, NULL) == 0;
}

static int timer_setup(sbx *s, char *err, size_t errsize) {
    struct sigevent sev;

    pthread_once(&signal_once, install_signal);
    if (!signal_ok) {
        snprintf(err, errsize, "sandbox: cannot install the timer signal "
                 "handler: %s; use SBX_HOOK_COUNT", strerror(errno));
        return -1;
    }

    s->cell = calloc(1, sizeof *s->cell);
    if (!s->cell) {
        snprintf(err, errsize, "sandbox: out of memory");
        return -1;
    }
    pthread_mutex_lock(&cells_lock);
    s->cell->next = cells;
    cells = s->cell;
    pthread_mutex_unlock(&cells_lock);

    memset(&sev, 0, sizeof sev);
    sev.sigev_notify = SIGEV_THREAD_ID;
    sev.sigev_signo = SBX_TIMER_SIGNAL;
    sev.sigev_value.sival_ptr = s->cell;
    sev._sigev_un._tid = gettid();
    if (timer_create(CLOCK_MONOTONIC, &sev, &s->timer) != 0) {
        snprintf(err, errsize, "sandbox: timer_create failed: %s; use "
                 "SBX_HOOK_COUNT", strerror(errno));
        return -1;
    }
    s->has_timer = true;
    s->cell->s = s;
    return 0;
}

static void timer_arm(sbx *s, int64_t deadline_ms) {
    struct itimerspec its;

    memset(&its, 0, sizeof its);
    its.it_value.tv_sec = deadline_ms / 1000;
    its.it_value.tv_nsec = (deadline_ms % 1000) * 1000000;
    if (its.it_value.tv_sec == 0 && its.it_value.tv_nsec == 0)
        its.it_value.tv_nsec = 1;
    timer_settime(s->timer, TIMER_ABSTIME, &its, NULL);
}

static void timer_disarm(sbx *s) {
    struct itimerspec its;

    memset(&its, 0, sizeof its);
    timer_settime(s->timer, 0, &its, NULL);
}

/* ---- read-only tables ------------------------------------------------- */

static int ro_newindex(lua_State *L) {
    const char *name = lua_tostring(L, lua_upvalueindex(1));
    return luaL_error(L, "attempt to modify read-only table '%s'", name);
}

static int ro_next(lua_State *L) {
    lua_settop(L, 2);
    if (lua_next(L, lua_upvalueindex(1)))
        return 2;
    lua_pushnil(L);
    return 1;
}

static int ro_pairs(lua_State *L) {
    lua_pushvalue(L, lua_upvalueindex(1));
    lua_pushcclosure(L, ro_next, 1);
    lua_pushvalue(L, 1);
    lua_pushnil(L);
    return 3;
}

static int ro_len(lua_State *L) {
    lua_pushinteger(L, (lua_Integer)lua_rawlen(L, lua_upvalueindex(1)));
    return 1;
}

static void mark_frozen(lua_State *L, int idx) {
    idx = lua_absindex(L, idx);
    lua_rawgetp(L, LUA_REGISTRYINDEX, &KEY_FROZEN);
    lua_pushvalue(L, idx);
    lua_pushboolean(L, 1);
    lua_rawset(L, -3);
    lua_pop(L, 1);
}

/* Replaces the table on top with a read-only proxy of it. */
static void freeze(lua_State *L, const char *name) {
    int t = lua_gettop(L);

    lua_newtable(L); /* proxy */
    lua_createtable(L, 0, 6);
    lua_pushvalue(L, t);
    lua_setfield(L, -2, "__index");
    lua_pushstring(L, name);
    lua_pushcclosure(L, ro_newindex, 1);
    lua_setfield(L, -2, "__newindex");
    lua_pushvalue(L, t);
    lua_pushcclosure(L, ro_pairs, 1);
    lua_setfield(L, -2, "__pairs");
    lua_pushvalue(L, t);
    lua_pushcclosure(L, ro_len, 1);
    lua_setfield(L, -2, "__len");
    lua_pushliteral(L, "locked");
    lua_setfield(L, -2, "__metatable");
    lua_setmetatable(L, -2);
    mark_frozen(L, -1);
    lua_replace(L, t);
}

/* ---- global environments ---------------------------------------------- */

static int env_newindex(lua_State *L) {
    sbx *s = sbx_of(L);
    sbx_request *req = s->current;
    const char *who = lua_tostring(L, lua_upvalueindex(1));
    const char *key = lua_type(L, 2) == LUA_TSTRING ? lua_tostring(L, 2)
                                                     : luaL_typename(L, 2);
    lua_Debug ar;
    char where[256] = "";

    if (lua_getstack(L, 1, &ar) && lua_getinfo(L, "Sl", &ar) &&
        ar.currentline > 0)
        snprintf(where, sizeof where, " at %s:%d", ar.short_src,
                 ar.currentline);

    if (!req)
        return luaL_error(L, "GLOBAL STATE USAGE: %s assigned global '%s'",
                          who, key);

    if (req->stop == SBX_STOP_NONE) {
        set_error(req, SBX_STOP_GLOBAL,
                  "GLOBAL STATE USAGE: %s assigned global '%s'", who, key);
        log_req(NLOG_ERROR, "Sandbox", req->request_id, req->run_id, "%s%s",
                req->error, where);
    }
    return stop_from_c(L, req);
}

static int env_undefined(lua_State *L) {
    if (lua_type(L, 2) == LUA_TSTRING)
        return luaL_error(L, "undefined global '%s'", lua_tostring(L, 2));
    return luaL_error(L, "undefined global (a %s key)", luaL_typename(L, 2));
}

/* Pushes a fresh environment whose reads go to the shared base and whose
 * writes stop the request, naming `who` ("tool 'echo'"). */
static void push_env(lua_State *L, const char *who) {
    lua_newtable(L);
    lua_createtable(L, 0, 3);
    lua_rawgetp(L, LUA_REGISTRYINDEX, &KEY_BASE);
    lua_setfield(L, -2, "__index");
    lua_pushstring(L, who);
    lua_pushcclosure(L, env_newindex, 1);
    lua_setfield(L, -2, "__newindex");
    lua_pushliteral(L, "locked");
    lua_setfield(L, -2, "__metatable");
    lua_setmetatable(L, -2);
    mark_frozen(L, -1);
}

/* ---- base functions for tools ----------------------------------------- */

static int sb_print(lua_State *L) {
    sbx *s = sbx_of(L);
    sbx_request *req = s->current;
    int n = lua_gettop(L);
    luaL_Buffer b;

    luaL_buffinit(L, &b);
    for (int i = 1; i <= n; i++) {
        size_t len;
        const char *str = luaL_tolstring(L, i, &len);
        if (i > 1)
            luaL_addchar(&b, '\t');
        luaL_addlstring(&b, str, len > SBX_PRINT_MAX ? SBX_PRINT_MAX : len);
        lua_pop(L, 1);
    }
    luaL_pushresult(&b);

    log_req(NLOG_INFO, "Tool", req ? req->request_id : NULL,
            req ? req->run_id : NULL, "[%s] %.*s", req ? req->tool : "-",
            SBX_PRINT_MAX, lua_tostring(L, -1));
    return 0;
}

static int sb_rawset(lua_State *L) {
    luaL_checktype(L, 1, LUA_TTABLE);
    luaL_checkany(L, 2);
    luaL_checkany(L, 3);

    lua_rawgetp(L, LUA_REGISTRYINDEX, &KEY_FROZEN);
    lua_pushvalue(L, 1);
    if (lua_rawget(L, -2) != LUA_TNIL)
        return luaL_error(L, "rawset: the table is read-only");
    lua_settop(L, 3);
    lua_rawset(L, 1);
    return 1;
}

static int sb_setmetatable(lua_State *L) {
    lua_pushliteral(L, "__gc");
    if (lua_type(L, 2) == LUA_TTABLE && lua_rawget(L, 2) != LUA_TNIL)
        return luaL_error(L, "setmetatable: __gc metamethods are not "
                          "allowed in tools");
    lua_settop(L, 2);
    lua_pushvalue(L, lua_upvalueindex(1));
    lua_insert(L, 1);
    lua_call(L, 2, 1);
    return 1;
}

/* load(chunk [, chunkname [, mode [, env]]]) with text chunks only and
 * an explicit environment. */
static int sb_load(lua_State *L) {
    if (lua_type(L, 4) != LUA_TTABLE)
        return luaL_error(L, "load: pass an environment table as the 4th "
                          "argument (tools have no global environment)");
    if (!lua_isnoneornil(L, 3) && strcmp(luaL_checkstring(L, 3), "t") != 0)
        return luaL_error(L, "load: only text chunks (mode \"t\") may be "
                          "loaded");
    lua_settop(L, 4);
    lua_pushliteral(L, "t");
    lua_replace(L, 3);
    lua_pushvalue(L, lua_upvalueindex(1));
    lua_insert(L, 1);
    lua_call(L, 4, LUA_MULTRET);
    return lua_gettop(L);
}

static int sb_collectgarbage(lua_State *L) {
    const char *opt = luaL_optstring(L, 1, "collect");

    if (strcmp(opt, "count") == 0) {
        lua_pushnumber(L, (lua_Number)lua_gc(L, LUA_GCCOUNT, 0) +
                              lua_gc(L, LUA_GCCOUNTB, 0) / 1024.0);
        return 1;
    }
    lua_pushinteger(L, 0);
    return 1;
}

/* require(name): only netra.lib.* from <lua dir>/netra/lib, as text,
 * each module loaded once per sandbox and handed out read-only. */
static int sb_require(lua_State *L) {
    sbx *s = sbx_of(L);
    const char *name = luaL_checkstring(L, 1);
    const char *prefix = "netra.lib.";
    size_t plen = strlen(prefix);
    char path[4096], who[256];

    if (strncmp(name, prefix, plen) != 0 || !name[plen])
        return luaL_error(L, "require: module '%s' is not allowed: tools may "
                          "only require netra.lib.* modules", name);
    for (const char *p = name + plen; *p; p++) {
        bool ok = isalnum((unsigned char)*p) || *p == '_' ||
                  (*p == '.' && p[1] && p[1] != '.' && p[-1] != '.');
        if (!ok)
            return luaL_error(L, "require: bad module name '%s'", name);
    }

    lua_rawgetp(L, LUA_REGISTRYINDEX, &KEY_LIBS);
    if (lua_getfield(L, -1, name) != LUA_TNIL)
        return 1;
    lua_pop(L, 1);

    int n = snprintf(path, sizeof path, "%s/netra/lib/", s->lua_dir);
    for (const char *p = name + plen; *p && n < (int)sizeof path - 5; p++)
        path[n++] = *p == '.' ? '/' : *p;
    snprintf(path + n, sizeof path - (size_t)n, ".lua");

    char shown[4096];
    display_name(s, path, shown, sizeof shown);
    if (load_text(L, path, shown) != LUA_OK)
        return luaL_error(L, "require: cannot load module '%s': %s", name,
                          lua_tostring(L, -1));
    snprintf(who, sizeof who, "module '%s'", name);
    push_env(L, who);
    lua_setupvalue(L, -2, 1);
    lua_call(L, 0, 1);

    if (lua_isnil(L, -1)) {
        lua_pop(L, 1);
        lua_pushboolean(L, 1);
    } else if (lua_istable(L, -1)) {
        freeze(L, name);
    }
    lua_pushvalue(L, -1);
    lua_setfield(L, -3, name);
    return 1;
}

/* ---- coroutines that carry the request -------------------------------- */

static void set_running(sbx *s, lua_State *L) {
    s->running = L;
}

static int co_cont(lua_State *L, int status, lua_KContext ctx);

/* Resumes `co` with the top narg values of L. A stop in the child leaves
 * the request; a wait in the child (sbx_wait) passes up through this
 * coroutine to the worker, and the values it brings back go down again
 * (co_cont). Anything else is what coroutine.resume/wrap return. */
static int co_step(lua_State *L, lua_State *co, int narg, int wrap) {
    sbx *s = sbx_of(L);
    sbx_request *req = s->current;
    int nres = 0, status;

    if (req && req->stop != SBX_STOP_NONE)
        return stop_from_c(L, req);
    if (!lua_checkstack(co, narg))
        return luaL_error(L, "too many arguments to resume");

    apply_hook(req, co);
    lua_xmove(L, co, narg);
    set_running(s, co);
    status = lua_resume(co, L, narg, &nres);
    set_running(s, L);

    if (req && req->stop != SBX_STOP_NONE)
        return stop_from_c(L, req);

    if (status == LUA_YIELD && req && req->waiting) {
        lua_pop(co, nres);
        lua_settop(L, wrap ? 0 : 1);
        return lua_yieldk(L, 0, (lua_KContext)wrap, co_cont);
    }

    if (status == LUA_OK || status == LUA_YIELD) {
        if (!lua_checkstack(L, nres + 1)) {
            lua_pop(co, nres);
            return luaL_error(L, "too many results to resume");
        }
        if (!wrap)
            lua_pushboolean(L, 1);
        lua_xmove(co, L, nres);
        return nres + (wrap ? 0 : 1);
    }

    lua_xmove(co, L, 1); /* the error object */
    if (wrap) {
        lua_resetthread(co);
        if (lua_type(L, -1) == LUA_TSTRING) {
            luaL_where(L, 1);
            lua_insert(L, -2);
            lua_concat(L, 2);
        }
        return lua_error(L);
    }
    lua_pushboolean(L, 0);
    lua_insert(L, -2);
    return 2;
}

static int co_cont(lua_State *L, int status, lua_KContext ctx) {
    int wrap = (int)ctx;
    lua_State *co = wrap ? lua_tothread(L, lua_upvalueindex(1))
                         : lua_tothread(L, 1);

    (void)status;
    return co_step(L, co, lua_gettop(L) - (wrap ? 0 : 1), wrap);
}

static int sb_co_create(lua_State *L) {
    sbx *s = sbx_of(L);
    lua_State *co;

    luaL_checktype(L, 1, LUA_TFUNCTION);
    co = lua_newthread(L);
    apply_hook(s->current, co);
    lua_pushvalue(L, 1);
    lua_xmove(L, co, 1);
    return 1;
}

static int sb_co_resume(lua_State *L) {
    lua_State *co = lua_tothread(L, 1);

    luaL_argexpected(L, co, 1, "coroutine");
    return co_step(L, co, lua_gettop(L) - 1, 0);
}

static int co_wrapped(lua_State *L) {
    lua_State *co = lua_tothread(L, lua_upvalueindex(1));
    return co_step(L, co, lua_gettop(L), 1);
}

static int sb_co_wrap(lua_State *L) {
    sb_co_create(L);
    lua_pushcclosure(L, co_wrapped, 1);
    return 1;
}

/* coroutine.yield: the request's own coroutine is not the tool's to
 * yield (the worker would not know what it waits for). */
static int sb_co_yield(lua_State *L) {
    sbx *s = sbx_of(L);

    if (s->current && s->current->co == L)
        return luaL_error(L, "attempt to yield from outside a coroutine");
    return lua_yield(L, lua_gettop(L));
}

/* ---- pattern functions with bounded work ------------------------------ */

/* Does byte c belong to the class %<cl>? */
static bool class_letter(int cl, unsigned char c) {
    bool r;

    switch (tolower(cl)) {
    case 'a': r = isalpha(c); break;
    case 'c': r = iscntrl(c); break;
    case 'd': r = isdigit(c); break;
    case 'g': r = isgraph(c); break;
    case 'l': r = islower(c); break;
    case 'p': r = ispunct(c); break;
    case 's': r = isspace(c); break;
    case 'u': r = isupper(c); break;
    case 'w': r = isalnum(c); break;
    case 'x': r = isxdigit(c); break;
    default: return cl == c;
    }
    return isupper(cl) ? !r : r;
}

/* Does byte c belong to the set [p .. end) (p just after '[')? */
static bool set_has(const char *p, const char *end, unsigned char c) {
    bool neg = false;

    if (p < end && *p == '^') {
        neg = true;
        p++;
    }
    for (bool first = true; p < end && (first || *p != ']'); first = false) {
        if (*p == '%' && p + 1 < end) {
            if (class_letter((unsigned char)p[1], c))
                return !neg;
            p += 2;
        } else if (p + 2 < end && p[1] == '-' && p[2] != ']') {
            if ((unsigned char)p[0] <= c && c <= (unsigned char)p[2])
                return !neg;
            p += 3;
        } else {
            if ((unsigned char)*p == c)
                return !neg;
            p++;
        }
    }
    return neg;
}

/* The end of the single-character class at p, or NULL if malformed. */
static const char *class_end(const char *p, const char *end) {
    if (*p == '%')
        return p + 1 < end ? p + 2 : NULL;
    if (*p != '[')
        return p + 1;
    p++;
    if (p < end && *p == '^')
        p++;
    do {
        if (p >= end)
            return NULL;
        if (*p == '%')
            p++;
        p++;
    } while (p < end && *p != ']');
    return p < end ? p + 1 : NULL;
}

static bool class_has(const char *p, const char *ep, unsigned char c) {
    if (*p == '.')
        return true;
    if (*p == '%')
        return class_letter((unsigned char)p[1], c);
    if (*p == '[')
        return set_has(p + 1, ep, c);
    return (unsigned char)*p == c;
}

/* The longest run of subject bytes in the class [p, ep). */
static size_t longest_run(const char *p, const char *ep, const char *subj,
                          size_t n) {
    size_t best = 0, cur = 0;

    if (*p == '.')
        return n;
    for (size_t i = 0; i < n; i++) {
        cur = class_has(p, ep, (unsigned char)subj[i]) ? cur + 1 : 0;
        if (cur > best)
            best = cur;
    }
    return best;
}

/* log2 of an upper bound on the matcher's steps: start positions times
 * the product, over quantified items, of how far each can expand in this
 * subject, times the number of items. Malformed tails count as nothing
 * (the matcher raises there). */
static double pattern_cost(const char *pat, size_t plen, const char *subj,
                           size_t n, bool anchor_ok) {
    const char *p = pat, *end = pat + plen;
    double cost = 0;
    int items = 0;

    if (anchor_ok && p < end && *p == '^')
        p++;
    else
        cost += log2((double)n + 1);

    while (p < end && cost <= 64) {
        const char *ep;

        if (*p == '(' || *p == ')') {
            p++;
            continue;
        }
        if (*p == '$' && p + 1 == end)
            break;
        items++;
        if (*p == '%' && p + 1 < end && p[1] == 'b') {
            cost += log2((double)n + 1);
            p += 4;
            continue;
        }
        if (*p == '%' && p + 1 < end && p[1] == 'f') {
            p += 2;
            if (p >= end || *p != '[' || !(ep = class_end(p, end)))
                break;
            p = ep;
            continue;
        }
        if (*p == '%' && p + 1 < end && isdigit((unsigned char)p[1])) {
            cost += log2((double)n + 1);
            p += 2;
            continue;
        }
        if (!(ep = class_end(p, end)))
            break;
        if (ep < end && (*ep == '*' || *ep == '+' || *ep == '-')) {
            cost += log2((double)longest_run(p, ep, subj, n) + 1);
            ep++;
        } else if (ep < end && *ep == '?') {
            cost += 1;
            ep++;
        }
        p = ep;
    }
    return cost + log2((double)items + 1);
}

static bool has_specials(const char *p, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (strchr("^$*+?.([%-", p[i]))
            return true;
    return false;
}

/* Calls the real pattern function (upvalue 1) after checking that its
 * work is bounded; upvalue 2 names it. */
static int sb_pattern(lua_State *L) {
    size_t n, plen;
    const char *subj = luaL_checklstring(L, 1, &n);
    const char *pat = luaL_checklstring(L, 2, &plen);
    const char *fname = lua_tostring(L, lua_upvalueindex(2));
    bool is_find = strcmp(fname, "string.find") == 0;
    bool plain = is_find && lua_toboolean(L, 4);
    bool is_gmatch = strcmp(fname, "string.gmatch") == 0;

    if (plain || !has_specials(pat, plen)) {
        /* memchr/memcmp search: n * plen byte compares at worst */
        double c = log2((double)n + 1) + log2((double)plen + 1) - 4;
        if (c > log2((double)SBX_PATTERN_MAX_STEPS))
            return luaL_error(L, "%s: search too costly for a subject of "
                              "%d bytes and a pattern of %d: shorten either",
                              fname, (int)n, (int)plen);
    } else {
        double c = pattern_cost(pat, plen, subj, n, !is_gmatch);
        if (c > log2((double)SBX_PATTERN_MAX_STEPS)) {
            char msg[256];
            snprintf(msg, sizeof msg,
                     "%s: pattern too costly for a subject of %zu bytes "
                     "(about 2^%.0f steps, limit 2^%.0f): shorten the "
                     "subject or simplify the pattern",
                     fname, n, c, log2((double)SBX_PATTERN_MAX_STEPS));
            return luaL_error(L, "%s", msg);
        }
    }

    lua_pushvalue(L, lua_upvalueindex(1));
    lua_insert(L, 1);
    lua_call(L, lua_gettop(L) - 1, LUA_MULTRET);
    return lua_gettop(L);
}

/* ---- building the state ----------------------------------------------- */

/* Copies field `name` of the table at `from` into the table on top. */
static void copy_field(lua_State *L, int from, const char *name) {
    lua_getfield(L, from, name);
    lua_setfield(L, -2, name);
}

/* Opens library `open` and leaves its table on top (not as a global). */
static void open_lib(lua_State *L, const char *name, lua_CFunction open) {
    luaL_requiref(L, name, open, 0);
}

static void build_string(lua_State *L) {
    static const char *const wrapped[] = {"find", "match", "gmatch", "gsub",
                                          NULL};
    int lib, mt;

    open_lib(L, LUA_STRLIBNAME, luaopen_string);
    lib = lua_gettop(L);

    lua_newtable(L); /* the tools' string table */
    lua_pushnil(L);
    while (lua_next(L, lib)) {
        lua_pushvalue(L, -2);
        lua_insert(L, -2);
        lua_rawset(L, -4);
    }
    lua_pushnil(L);
    lua_setfield(L, -2, "dump");
    for (int i = 0; wrapped[i]; i++) {
        lua_getfield(L, lib, wrapped[i]);
        lua_pushfstring(L, "string.%s", wrapped[i]);
        lua_pushcclosure(L, sb_pattern, 2);
        lua_setfield(L, -2, wrapped[i]);
    }

    /* Strings index the real table; the metatable is closed and what
     * getmetatable("") shows is a read-only stand-in. */
    lua_pushliteral(L, "");
    lua_getmetatable(L, -1);
    mt = lua_gettop(L);
    lua_pushvalue(L, mt - 2);
    lua_setfield(L, mt, "__index");
    lua_pushliteral(L, "string");
    lua_pushcclosure(L, ro_newindex, 1);
    lua_setfield(L, mt, "__newindex");
    lua_pushvalue(L, mt - 2);
    freeze(L, "string"); /* the proxy tools see as `string` */
    lua_createtable(L, 0, 1);
    lua_pushvalue(L, -2);
    lua_setfield(L, -2, "__index");
    freeze(L, "string metatable");
    lua_setfield(L, mt, "__metatable");
    lua_replace(L, lib);
    lua_settop(L, lib);
}

static void build_coroutine(lua_State *L) {
    int lib;

    open_lib(L, LUA_COLIBNAME, luaopen_coroutine);
    lib = lua_gettop(L);
    lua_newtable(L);
    copy_field(L, lib, "status");
    copy_field(L, lib, "running");
    copy_field(L, lib, "isyieldable");
    copy_field(L, lib, "close");
    lua_pushcfunction(L, sb_co_create);
    lua_setfield(L, -2, "create");
    lua_pushcfunction(L, sb_co_resume);
    lua_setfield(L, -2, "resume");
    lua_pushcfunction(L, sb_co_wrap);
    lua_setfield(L, -2, "wrap");
    lua_pushcfunction(L, sb_co_yield);
    lua_setfield(L, -2, "yield");
    freeze(L, "coroutine");
    lua_replace(L, lib);
}

static void build_os(lua_State *L) {
    int lib;

    open_lib(L, LUA_OSLIBNAME, luaopen_os);
    lib = lua_gettop(L);
    lua_newtable(L);
    copy_field(L, lib, "time");
    copy_field(L, lib, "clock");
    copy_field(L, lib, "date");
    copy_field(L, lib, "difftime");
    freeze(L, "os");
    lua_replace(L, lib);
}

/* Builds the shared base environment (runs in protected mode). */
static int build_base(lua_State *L) {
    static const char *const base_names[] = {
        "pairs", "ipairs", "next", "select", "type", "tostring", "tonumber",
        "pcall", "xpcall", "error", "assert", "rawequal", "rawlen", "rawget",
        "getmetatable", "_VERSION", NULL};
    int g, base;

    lua_newtable(L);
    lua_createtable(L, 0, 1);
    lua_pushliteral(L, "k");
    lua_setfield(L, -2, "__mode");
    lua_setmetatable(L, -2);
    lua_rawsetp(L, LUA_REGISTRYINDEX, &KEY_FROZEN);
    lua_newtable(L);
    lua_rawsetp(L, LUA_REGISTRYINDEX, &KEY_LIBS);

    luaL_requiref(L, LUA_GNAME, luaopen_base, 0);
    g = lua_gettop(L);
    lua_newtable(L);
    base = lua_gettop(L);
    for (int i = 0; base_names[i]; i++)
        copy_field(L, g, base_names[i]);

    lua_getfield(L, g, "load");
    lua_pushcclosure(L, sb_load, 1);
    lua_setfield(L, base, "load");
    lua_getfield(L, g, "setmetatable");
    lua_pushcclosure(L, sb_setmetatable, 1);
    lua_setfield(L, base, "setmetatable");
    lua_pushcfunction(L, sb_rawset);
    lua_setfield(L, base, "rawset");
    lua_pushcfunction(L, sb_print);
    lua_setfield(L, base, "print");
    lua_pushcfunction(L, sb_collectgarbage);
    lua_setfield(L, base, "collectgarbage");
    lua_pushcfunction(L, sb_require);
    lua_setfield(L, base, "require");

    build_string(L);
    lua_setfield(L, base, "string");
    open_lib(L, LUA_TABLIBNAME, luaopen_table);
    freeze(L, "table");
    lua_setfield(L, base, "table");
    open_lib(L, LUA_MATHLIBNAME, luaopen_math);
    lua_pushnil(L);
    lua_setfield(L, -2, "randomseed");
    freeze(L, "math");
    lua_setfield(L, base, "math");
    open_lib(L, LUA_UTF8LIBNAME, luaopen_utf8);
    freeze(L, "utf8");
    lua_setfield(L, base, "utf8");
    build_coroutine(L);
    lua_setfield(L, base, "coroutine");
    build_os(L);
    lua_setfield(L, base, "os");

    /* Reading a name that is not here is an error. */
    lua_createtable(L, 0, 2);
    lua_pushcfunction(L, env_undefined);
    lua_setfield(L, -2, "__index");
    lua_pushliteral(L, "locked");
    lua_setfield(L, -2, "__metatable");
    lua_setmetatable(L, base);
    lua_pushvalue(L, base);
    lua_rawsetp(L, LUA_REGISTRYINDEX, &KEY_BASE);

    /* The real global table is left empty: nothing reaches it. */
    lua_newtable(L);
    lua_rawseti(L, LUA_REGISTRYINDEX, LUA_RIDX_GLOBALS);
    lua_getfield(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE);
    lua_newtable(L);
    lua_setfield(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE);
    lua_pop(L, 1);
    return 0;
}

static int panic_handler(lua_State *L) {
    log_msg(NLOG_ERROR, "Sandbox", "unprotected Lua error: %s",
            lua_tostring(L, -1) ? lua_tostring(L, -1) : "?");
    return 0; /* Lua aborts */
}

/* A fresh state with the base environment, or NULL (err filled). */
static lua_State *new_state(sbx *s, char *err, size_t errsize) {
    lua_State *L;

    s->building = true;
    s->used = 0;
    s->state_hit = false;
    L = lua_newstate(sbx_alloc, s);
    if (!L) {
        snprintf(err, errsize, "sandbox: cannot create a Lua state (out of "
                 "memory?)");
        s->building = false;
        return NULL;
    }
    lua_atpanic(L, panic_handler);
    *(sbx **)lua_getextraspace(L) = s;

    lua_pushcfunction(L, build_base);
    if (lua_pcall(L, 0, 0, 0) != LUA_OK) {
        snprintf(err, errsize, "sandbox: cannot build the tool environment: "
                 "%s", lua_tostring(L, -1));
        lua_close(L);
        s->building = false;
        return NULL;
    }
    s->building = false;
    return L;
}

static int64_t pick(int64_t a, int64_t b, int64_t c) {
    int64_t v = a ? a : b ? b : c;
    return v < 0 ? 0 : v;
}

sbx *sbx_new(const sbx_config *config, char *err, size_t errsize) {
    sbx *s;

    if (!config || !config->lua_dir || !config->lua_dir[0]) {
        snprintf(err, errsize, "sandbox: lua_dir is required (the directory "
                 "holding netra/tools and netra/lib)");
        return NULL;
    }
    s = calloc(1, sizeof *s);
    if (!s || !(s->lua_dir = dup_str(config->lua_dir))) {
        free(s);
        snprintf(err, errsize, "sandbox: out of memory");
        return NULL;
    }

    s->defaults.time_ms = config->defaults.time_ms ? config->defaults.time_ms
                                                   : 2000;
    s->defaults.instructions = config->defaults.instructions
                                   ? config->defaults.instructions
                                   : 100000000;
    s->defaults.memory_bytes = config->defaults.memory_bytes
                                   ? config->defaults.memory_bytes
                                   : 64 << 20;
    s->state_limit = config->state_memory_bytes > 0
                         ? config->state_memory_bytes
                         : (int64_t)512 << 20;
    s->hook = config->hook;
    s->stop = config->stop;

    if (s->hook == SBX_HOOK_TIMER && timer_setup(s, err, errsize) != 0) {
        sbx_free(s);
        return NULL;
    }
    s->L = new_state(s, err, errsize);
    if (!s->L) {
        sbx_free(s);
        return NULL;
    }
    return s;
}

/* ---- protected helpers ------------------------------------------------ */

typedef struct {
    sbx_push_fn push;
    void *ud;
    int n;
} push_call;

static int push_tramp(lua_State *L) {
    push_call *pc = lua_touserdata(L, 1);
    lua_settop(L, 0);
    pc->n = pc->push ? pc->push(L, pc->ud) : 0;
    return pc->n;
}

/* Runs push on the main thread in protected mode and moves its values to
 * co. Returns how many, or -1 with err filled. */
static int push_values(sbx *s, lua_State *co, sbx_push_fn push, void *ud,
                       char *err, size_t errsize) {
    lua_State *L = s->L;
    int top = lua_gettop(L);
    push_call pc = {push, ud, 0};

    if (!push)
        return 0;
    lua_pushcfunction(L, push_tramp);
    lua_pushlightuserdata(L, &pc);
    if (lua_pcall(L, 1, LUA_MULTRET, 0) != LUA_OK) {
        snprintf(err, errsize, "cannot pass values to the request: %s",
                 lua_tostring(L, -1) ? lua_tostring(L, -1) : "?");
        lua_settop(L, top);
        return -1;
    }
    int n = lua_gettop(L) - top;
    if (!lua_checkstack(co, n + 1)) {
        snprintf(err, errsize, "cannot pass %d values to the request", n);
        lua_settop(L, top);
        return -1;
    }
    lua_xmove(L, co, n);
    return n;
}

/* ---- requests --------------------------------------------------------- */

static int new_thread_tramp(lua_State *L) {
    lua_newthread(L);
    return 1;
}

/* A thread from the pool or a new one, anchored by *ref. */
static lua_State *get_thread(sbx *s, int *ref) {
    lua_State *L = s->L, *co;

    if (s->npool > 0) {
        *ref = s->pool[--s->npool];
        lua_rawgeti(L, LUA_REGISTRYINDEX, *ref);
        co = lua_tothread(L, -1);
        lua_pop(L, 1);
        return co;
    }
    lua_pushcfunction(L, new_thread_tramp);
    if (lua_pcall(L, 0, 1, 0) != LUA_OK) {
        lua_pop(L, 1);
        return NULL;
    }
    co = lua_tothread(L, -1);
    *ref = luaL_ref(L, LUA_REGISTRYINDEX);
    if (*ref == LUA_REFNIL || *ref == LUA_NOREF)
        return NULL;
    return co;
}

/* Resets a request's thread with its hook armed (so that __close
 * handlers cannot run away) and returns it to the pool. */
static void release_thread(sbx *s, sbx_request *req) {
    sbx_request *saved = s->current;

    if (!req->co)
        return;
    if (req->stop == SBX_STOP_NONE)
        req->stop = SBX_STOP_CANCELLED;
    s->current = req;

    if (req->stop == SBX_STOP_ERROR) {
        /* An ordinary error: pending to-be-closed variables get their
         * __close, under the request's budgets (a stop inside one ends
         * it and the next ones at once). The error stays the first. */
        char *error = req->error;
        req->error = NULL;
        req->stop = SBX_STOP_NONE;
        req->armed = false;
        set_running(s, req->co);
        apply_hook(req, req->co);
        if (s->has_timer && !req->hooked && req->time_ms > 0)
            timer_arm(s, req->deadline_ms);
        lua_resetthread(req->co);
        if (s->has_timer && !req->hooked && req->time_ms > 0)
            timer_disarm(s);
        set_running(s, NULL);
        free(req->error);
        req->error = error;
        req->stop = SBX_STOP_ERROR;
    } else {
        lua_sethook(req->co, sbx_hook, LUA_MASKCOUNT, 1);
        lua_resetthread(req->co);
    }
    lua_settop(req->co, 0);
    lua_sethook(req->co, NULL, 0, 0);
    s->current = saved;

    /* Only threads that returned normally go back to the pool: an error
     * raised from the hook and caught by lua_resume leaves the thread
     * with hooks disallowed, and lua_resetthread does not undo that. */
    if (req->status == SBX_DONE && s->npool < SBX_POOL_MAX)
        s->pool[s->npool++] = req->co_ref;
    else
        luaL_unref(s->L, LUA_REGISTRYINDEX, req->co_ref);
    req->co = NULL;
}

static sbx_request *req_create(sbx *s, const char *tool,
                               const sbx_budget *tool_budget,
                               const sbx_request_opts *opts, char *err,
                               size_t errsize) {
    sbx_request *req = calloc(1, sizeof *req);
    sbx_budget none = {0, 0, 0};
    const sbx_budget *ob = opts ? &opts->budget : &none;

    if (!tool_budget)
        tool_budget = &none;
    if (!req || !(req->tool = dup_str(tool))) {
        free(req);
        snprintf(err, errsize, "sandbox: out of memory");
        return NULL;
    }
    req->s = s;
    if (opts) {
        req->request_id = dup_str(opts->request_id);
        req->run_id = dup_str(opts->run_id);
        req->ud = opts->ud;
        req->cancel = opts->cancel;
        req->cancel_reason = opts->cancel_reason;
    }
    req->time_ms = pick(ob->time_ms, tool_budget->time_ms,
                        s->defaults.time_ms);
    req->instr_limit = pick(ob->instructions, tool_budget->instructions,
                            s->defaults.instructions);
    req->mem_limit = pick(ob->memory_bytes, tool_budget->memory_bytes,
                          s->defaults.memory_bytes);
    if (req->time_ms > INT64_MAX / 4)
        req->time_ms = INT64_MAX / 4; /* no overflow below */
    req->deadline_ms = req->time_ms > 0 ? now_ms() + req->time_ms
                                        : INT64_MAX;
    req->hooked = req->instr_limit > 0 ||
                  (s->hook == SBX_HOOK_COUNT && req->time_ms > 0);
    req->status = SBX_YIELDED;

    req->co = get_thread(s, &req->co_ref);
    if (!req->co) {
        snprintf(err, errsize, "sandbox: cannot create a coroutine (out of "
                 "memory)");
        free(req->tool);
        free(req->request_id);
        free(req->run_id);
        free(req);
        return NULL;
    }

    req->next = s->requests;
    if (s->requests)
        s->requests->prev = req;
    s->requests = req;
    s->in_flight++;
    return req;
}

sbx_request *sbx_start(sbx *s, const char *tool_name, int handler_ref,
                       sbx_push_fn push, void *push_ud,
                       const sbx_request_opts *opts, char *err,
                       size_t errsize) {
    sbx_tool *t;
    sbx_request *req;
    int n;

    if (handler_ref < 1 || handler_ref > s->ntools ||
        s->tools[handler_ref - 1].fn_ref == LUA_NOREF) {
        snprintf(err, errsize, "sandbox: no tool with handler_ref %d",
                 handler_ref);
        return NULL;
    }
    t = &s->tools[handler_ref - 1];
    req = req_create(s, tool_name ? tool_name : t->name, &t->budget, opts,
                     err, errsize);
    if (!req)
        return NULL;

    lua_rawgeti(s->L, LUA_REGISTRYINDEX, t->fn_ref);
    lua_xmove(s->L, req->co, 1);
    n = push_values(s, req->co, push, push_ud, err, errsize);
    if (n < 0) {
        sbx_request_free(req);
        return NULL;
    }
    req->nargs = n;
    return req;
}

/* Copies the error value and a traceback of co into req->error and the
 * log. Uses no Lua allocation. */
static void describe_error(sbx_request *req, lua_State *co) {
    char msg[1024], trace[2048], where[LUA_IDSIZE] = "";
    size_t tl = 0;
    lua_Debug ar;
    int line = 0;

    if (lua_type(co, -1) == LUA_TSTRING)
        snprintf(msg, sizeof msg, "%s", lua_tostring(co, -1));
    else if (lua_type(co, -1) == LUA_TNUMBER)
        snprintf(msg, sizeof msg, "%g", (double)lua_tonumber(co, -1));
    else
        snprintf(msg, sizeof msg, "(error object is a %s value)",
                 luaL_typename(co, -1));

    trace[0] = 0;
    for (int level = 0; level < 16 && lua_getstack(co, level, &ar);
         level++) {
        if (!lua_getinfo(co, "Sln", &ar))
            break;
        if (!where[0] && ar.currentline > 0) {
            snprintf(where, sizeof where, "%s", ar.short_src);
            line = ar.currentline;
        }
        if (tl < sizeof trace - 1)
            tl += (size_t)snprintf(trace + tl, sizeof trace - tl,
                                   "\n\t%s:%d: in %s%s", ar.short_src,
                                   ar.currentline > 0 ? ar.currentline : 0,
                                   ar.name ? "function " : "",
                                   ar.name ? ar.name : ar.what);
    }

    if (where[0] && !strstr(msg, where))
        set_error(req, SBX_STOP_ERROR, "tool '%s' failed: %s (at %s:%d)",
                  req->tool, msg, where, line);
    else
        set_error(req, SBX_STOP_ERROR, "tool '%s' failed: %s", req->tool,
                  msg);
    log_req(NLOG_ERROR, "Sandbox", req->request_id, req->run_id,
            "%s\nstack traceback:%s", req->error, trace);
}

static void finish_failed(sbx *s, sbx_request *req) {
    req->status = SBX_FAILED;
    if (req->stop != SBX_STOP_ERROR && req->stop != SBX_STOP_GLOBAL)
        log_req(NLOG_WARN, "Sandbox", req->request_id, req->run_id, "%s",
                req->error ? req->error : "request stopped");
    release_thread(s, req);
    if (req->stop == SBX_STOP_MEMORY)
        lua_gc(s->L, LUA_GCCOLLECT, 0);
}

sbx_status sbx_resume(sbx_request *req, sbx_push_fn push, void *push_ud) {
    sbx *s = req->s;
    int narg, nres = 0, status;
    char err[512];

    if (req->status != SBX_YIELDED)
        return req->status;
    if (s->current) {
        set_error(req, SBX_STOP_ERROR, "tool '%s': sbx_resume called while "
                  "another request runs", req->tool);
        finish_failed(s, req);
        return req->status;
    }

    if (!req->started) {
        narg = req->nargs;
        req->started = true;
    } else {
        narg = push_values(s, req->co, push, push_ud, err, sizeof err);
        if (narg < 0) {
            set_error(req, SBX_STOP_ERROR, "tool '%s': %s", req->tool, err);
            finish_failed(s, req);
            return req->status;
        }
    }

    if (req->time_ms > 0 && now_ms() >= req->deadline_ms) {
        set_error(req, SBX_STOP_TIME,
                  "tool '%s' exceeded its time budget (%lld ms)", req->tool,
                  (long long)req->time_ms);
        finish_failed(s, req);
        return req->status;
    }

    req->waiting = false;
    req->wait_token = NULL;
    req->armed = false;
    s->current = req;
    set_running(s, req->co);
    apply_hook(req, req->co);
    if (s->has_timer && !req->hooked && req->time_ms > 0)
        timer_arm(s, req->deadline_ms);

    status = lua_resume(req->co, NULL, narg, &nres);

    if (s->has_timer && !req->hooked && req->time_ms > 0)
        timer_disarm(s);
    set_running(s, NULL);

    if (req->stop == SBX_STOP_NONE && req->mem_hit)
        check_budgets(s, req);

    if (req->stop != SBX_STOP_NONE) {
        s->current = NULL;
        finish_failed(s, req);
    } else if (status == LUA_YIELD && req->waiting) {
        lua_pop(req->co, nres);
        s->current = NULL;
        req->status = SBX_YIELDED;
    } else if (status == LUA_YIELD) {
        set_error(req, SBX_STOP_ERROR, "tool '%s' yielded without waiting "
                  "on anything", req->tool);
        s->current = NULL;
        finish_failed(s, req);
    } else if (status == LUA_OK) {
        s->current = NULL;
        req->nres = nres;
        req->status = SBX_DONE;
    } else {
        describe_error(req, req->co);
        s->current = NULL;
        finish_failed(s, req);
    }
    return req->status;
}

void sbx_cancel(sbx_request *req, const char *reason) {
    if (!req || req->status != SBX_YIELDED || req->s->current == req)
        return;
    set_error(req, SBX_STOP_CANCELLED, "%s", reason ? reason : "cancelled");
    finish_failed(req->s, req);
}

static void req_unlink(sbx *s, sbx_request *req) {
    if (req->prev)
        req->prev->next = req->next;
    else
        s->requests = req->next;
    if (req->next)
        req->next->prev = req->prev;
    s->in_flight--;
}

static void req_destroy(sbx_request *req) {
    free(req->tool);
    free(req->request_id);
    free(req->run_id);
    free(req->error);
    free(req);
}

void sbx_request_free(sbx_request *req) {
    sbx *s;
    char err[512];

    if (!req)
        return;
    s = req->s;
    if (req->co)
        release_thread(s, req);
    req_unlink(s, req);
    req_destroy(req);

    if (s->damaged && s->in_flight == 0 && s->ntools > 0 && !s->loading) {
        if (sbx_rebuild(s, err, sizeof err) != 0)
            log_msg(NLOG_WARN, "Sandbox", "%s", err);
    }
}

int sbx_request_results(sbx_request *req, lua_State **L) {
    if (req->status != SBX_DONE)
        return -1;
    if (L)
        *L = req->co;
    return req->nres;
}

const char *sbx_request_error(const sbx_request *req) {
    return req->status == SBX_FAILED ? req->error : NULL;
}

sbx_stop sbx_request_stop(const sbx_request *req) {
    return req->stop;
}

void *sbx_request_wait_token(const sbx_request *req) {
    return req->status == SBX_YIELDED && req->waiting ? req->wait_token
                                                      : NULL;
}

int64_t sbx_request_deadline_ms(const sbx_request *req) {
    return req->deadline_ms;
}

void *sbx_request_ud(const sbx_request *req) {
    return req->ud;
}

const char *sbx_request_tool(const sbx_request *req) {
    return req->tool;
}

int64_t sbx_request_instructions(const sbx_request *req) {
    return req->instr;
}

int64_t sbx_request_memory(const sbx_request *req) {
    return req->mem;
}

int sbx_in_flight(const sbx *s) {
    return s->in_flight;
}

sbx_request *sbx_current(lua_State *L) {
    return sbx_of(L)->current;
}

int sbx_wait(lua_State *L, void *token, lua_KContext ctx, lua_KFunction k) {
    sbx_request *req = sbx_of(L)->current;

    if (!req)
        return luaL_error(L, "cannot wait on I/O outside a request");
    if (req->stop != SBX_STOP_NONE)
        return stop_from_c(L, req);
    if (!lua_isyieldable(L))
        return luaL_error(L, "cannot wait on I/O here (inside a C function "
                          "such as string.gsub or table.sort): call it "
                          "from plain Lua code");
    req->waiting = true;
    req->wait_token = token;
    return lua_yieldk(L, 0, ctx, k);
}

bool sbx_needs_rebuild(const sbx *s) {
    return s->damaged;
}

lua_State *sbx_lua(sbx *s) {
    return s->L;
}

void sbx_free(sbx *s) {
    if (!s)
        return;
    if (s->has_timer) {
        timer_disarm(s);
        timer_delete(s->timer);
    }
    if (s->cell)
        s->cell->s = NULL;
    while (s->requests) {
        sbx_request *req = s->requests;
        req_unlink(s, req);
        req_destroy(req);
    }
    if (s->L)
        lua_close(s->L);
    for (int i = 0; i < s->ntools; i++) {
        free(s->tools[i].path);
        free(s->tools[i].name);
    }
    free(s->tools);
    free(s->lua_dir);
    free(s);
}

/* ---- tool files ------------------------------------------------------- */

typedef struct {
    const char *path;
    const char *shown;
    const char *who; /* "tool 'stem'" */
    int env_ref;
} prep_call;

/* Loads the file as text with a fresh tool environment; leaves the chunk
 * on top and anchors the environment. */
static int prep_tramp(lua_State *L) {
    prep_call *pc = lua_touserdata(L, 1);

    if (load_text(L, pc->path, pc->shown) != LUA_OK)
        return lua_error(L);
    push_env(L, pc->who);
    lua_pushvalue(L, -1);
    pc->env_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    lua_setupvalue(L, -2, 1);
    return 1;
}

typedef struct {
    sbx *s;
    lua_State *co;
    int nres;
    int env_ref;
    sbx_tool_def *def;
    int fn_ref;
    bool agent;
} check_call;

static bool valid_name(const char *name, size_t len) {
    if (len == 0 || len > SBX_NAME_MAX)
        return false;
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)name[i];
        if (!isalnum(c) && c != '_' && c != '-' && c != '.')
            return false;
    }
    return true;
}

static int fail(lua_State *L, const char *fmt, const char *arg) {
    lua_pushfstring(L, fmt, arg);
    return lua_error(L);
}

/* Reads an optional table field of the definition as JSON. */
static cJSON *json_field(lua_State *L, int def, const char *key,
                         bool required) {
    char err[512];
    cJSON *j;

    lua_pushstring(L, key);
    if (lua_rawget(L, def) == LUA_TNIL && !required) {
        lua_pop(L, 1);
        return NULL;
    }
    if (!lua_istable(L, -1))
        fail(L, "%s must be a table", key);
    j = sbx_table_to_json(L, -1, key, err, sizeof err);
    if (!j)
        fail(L, "%s", err);
    lua_pop(L, 1);
    if (!cJSON_IsObject(j)) {
        cJSON_Delete(j);
        fail(L, "%s must be a table with string keys (a JSON object)", key);
    }
    return j;
}

static void budget_field(lua_State *L, int budget, const char *key,
                         int64_t max, int64_t *out) {
    int isint;
    lua_Integer v;

    lua_pushstring(L, key);
    lua_rawget(L, budget);
    if (lua_isnil(L, -1)) {
        lua_pop(L, 1);
        return;
    }
    v = lua_tointegerx(L, -1, &isint);
    if (!isint || v <= 0)
        fail(L, "budget.%s must be a positive integer", key);
    if (v > max) {
        lua_pushfstring(L, "budget.%s is %I; it may be at most %I (the "
                        "sandbox's ceiling) - ask for less", key,
                        (lua_Integer)v, (lua_Integer)max);
        lua_error(L);
    }
    *out = v;
    lua_pop(L, 1);
}

/* Checks the definition returned by the file (in protected mode); fills
 * pc->def and refs the handler. */
static int check_tramp(lua_State *L) {
    check_call *cc = lua_touserdata(L, 1);
    sbx_tool_def *def = cc->def;
    size_t len;
    const char *str;
    int d;

    lua_settop(L, 0);
    const char *kind = cc->agent ? "agent" : "tool";

    if (cc->nres < 1)
        return fail(L, "the file must return a table (the %s definition)",
                    kind);
    lua_pop(cc->co, cc->nres - 1);
    lua_xmove(cc->co, L, 1);
    if (!lua_istable(L, 1)) {
        lua_pushfstring(L, "the file must return a table (the %s "
                        "definition), not a %s", kind, luaL_typename(L, 1));
        return lua_error(L);
    }
    d = 1;

    lua_pushliteral(L, "name");
    lua_rawget(L, d);
    str = lua_tolstring(L, -1, &len);
    if (lua_type(L, -1) != LUA_TSTRING || !valid_name(str, len))
        return fail(L, "%s", "name must be a string of 1 to 64 letters, "
                    "digits, '_', '-' or '.'");
    def->name = dup_str(str);
    lua_pop(L, 1);

    lua_pushliteral(L, "description");
    if (lua_rawget(L, d) != LUA_TSTRING)
        return fail(L, "%s", "description must be a string");
    def->description = dup_str(lua_tostring(L, -1));
    lua_pop(L, 1);

    def->input_schema = json_field(L, d, "inputSchema", !cc->agent);
    if (!def->input_schema)
        def->input_schema = cJSON_Parse("{\"type\":\"object\"}");
    def->output_schema = json_field(L, d, "outputSchema", false);
    def->annotations = json_field(L, d, "annotations", false);

    lua_pushliteral(L, "budget");
    if (lua_rawget(L, d) != LUA_TNIL) {
        int b = lua_gettop(L);
        if (!lua_istable(L, b))
            return fail(L, "%s", "budget must be a table {time_ms, "
                        "instructions, memory_bytes}");
        lua_pushnil(L);
        while (lua_next(L, b)) {
            const char *k = lua_type(L, -2) == LUA_TSTRING
                                ? lua_tostring(L, -2) : "?";
            if (strcmp(k, "time_ms") && strcmp(k, "instructions") &&
                strcmp(k, "memory_bytes"))
                return fail(L, "budget.%s is not a budget (use time_ms, "
                            "instructions or memory_bytes)", k);
            lua_pop(L, 1);
        }
        budget_field(L, b, "time_ms", SBX_MAX_TIME_MS,
                     &def->budget.time_ms);
        budget_field(L, b, "instructions", SBX_MAX_INSTRUCTIONS,
                     &def->budget.instructions);
        budget_field(L, b, "memory_bytes", SBX_MAX_MEMORY_BYTES,
                     &def->budget.memory_bytes);
    }
    lua_pop(L, 1);

    lua_pushstring(L, cc->agent ? "run" : "handler");
    if (lua_rawget(L, d) != LUA_TFUNCTION)
        return fail(L, "%s", cc->agent ? "run must be a function"
                                       : "handler must be a function");
    cc->fn_ref = luaL_ref(L, LUA_REGISTRYINDEX);

    /* From now on the environment names the file by its own name. */
    lua_rawgeti(L, LUA_REGISTRYINDEX, cc->env_ref);
    lua_getmetatable(L, -1);
    lua_pushfstring(L, "%s '%s'", kind, def->name);
    lua_pushcclosure(L, env_newindex, 1);
    lua_setfield(L, -2, "__newindex");
    return 0;
}

static void def_clear(sbx_tool_def *def) {
    free(def->name);
    free(def->description);
    free(def->path);
    cJSON_Delete(def->input_schema);
    cJSON_Delete(def->output_schema);
    cJSON_Delete(def->annotations);
    memset(def, 0, sizeof *def);
}

void sbx_tool_def_free(sbx_tool_def *def) {
    if (def)
        def_clear(def);
}

/* Loads and runs one tool file in s->L; fills def and *fn_ref. */
static int load_file(sbx *s, const char *path, bool agent,
                     sbx_tool_def *def, int *fn_ref, char *err,
                     size_t errsize) {
    lua_State *L = s->L;
    const char *base = strrchr(path, '/');
    char stem[SBX_NAME_MAX + 16], who[SBX_NAME_MAX + 32], msg[512];
    char shown[1024];
    prep_call pc = {path, shown, who, LUA_NOREF};
    check_call cc;
    sbx_request *req;
    sbx_status st;
    int rc = -1;

    memset(def, 0, sizeof *def);
    display_name(s, path, shown, sizeof shown);
    snprintf(stem, sizeof stem, "%s", base ? base + 1 : path);
    if (strlen(stem) > 4 && !strcmp(stem + strlen(stem) - 4, ".lua"))
        stem[strlen(stem) - 4] = 0;
    snprintf(who, sizeof who, "%s '%s'", agent ? "agent" : "tool", stem);

    lua_pushcfunction(L, prep_tramp);
    lua_pushlightuserdata(L, &pc);
    if (lua_pcall(L, 1, 1, 0) != LUA_OK) {
        const char *e = lua_tostring(L, -1) ? lua_tostring(L, -1) : "?";
        size_t pl = strlen(shown);
        /* syntax errors already start with the file name */
        if (!strncmp(e, shown, pl) && e[pl] == ':')
            snprintf(err, errsize, "%s", e);
        else
            snprintf(err, errsize, "%s: %s", shown, e);
        lua_pop(L, 1);
        return -1;
    }

    s->loading = true;
    req = req_create(s, stem, NULL, NULL, msg, sizeof msg);
    if (!req) {
        lua_pop(L, 1);
        snprintf(err, errsize, "%s: %s", shown, msg);
        goto out;
    }
    lua_xmove(L, req->co, 1);
    st = sbx_resume(req, NULL, NULL);
    if (st == SBX_FAILED) {
        snprintf(err, errsize, "%s: %s", shown, sbx_request_error(req));
    } else if (st == SBX_YIELDED) {
        snprintf(err, errsize, "%s: a tool file may not wait on I/O while "
                 "it loads", shown);
    } else {
        cc = (check_call){s, req->co, req->nres, pc.env_ref, def,
                          LUA_NOREF, agent};
        lua_pushcfunction(L, check_tramp);
        lua_pushlightuserdata(L, &cc);
        if (lua_pcall(L, 1, 0, 0) != LUA_OK) {
            snprintf(err, errsize, "%s: %s", shown,
                     lua_tostring(L, -1) ? lua_tostring(L, -1) : "?");
            lua_pop(L, 1);
            if (cc.fn_ref != LUA_NOREF)
                luaL_unref(L, LUA_REGISTRYINDEX, cc.fn_ref);
        } else if (!(def->path = dup_str(path))) {
            snprintf(err, errsize, "%s: out of memory", shown);
            luaL_unref(L, LUA_REGISTRYINDEX, cc.fn_ref);
        } else {
            *fn_ref = cc.fn_ref;
            rc = 0;
        }
    }
    sbx_request_free(req);

out:
    s->loading = false;
    luaL_unref(L, LUA_REGISTRYINDEX, pc.env_ref);
    if (rc != 0)
        def_clear(def);
    return rc;
}

static int load_def(sbx *s, const char *path, bool agent, sbx_tool_def *out,
                    char *err, size_t errsize) {
    int fn_ref = LUA_NOREF;
    sbx_tool *t;

    if (!path || !out) {
        snprintf(err, errsize, "sandbox: sbx_load_tool needs a path and an "
                 "output definition");
        return -1;
    }
    if (s->ntools == s->tools_cap) {
        int cap = s->tools_cap ? s->tools_cap * 2 : 8;
        sbx_tool *nt = realloc(s->tools, (size_t)cap * sizeof *nt);
        if (!nt) {
            snprintf(err, errsize, "%s: out of memory", path);
            return -1;
        }
        s->tools = nt;
        s->tools_cap = cap;
    }
    if (load_file(s, path, agent, out, &fn_ref, err, errsize) != 0)
        return -1;

    t = &s->tools[s->ntools];
    t->path = dup_str(path);
    t->name = dup_str(out->name);
    if (!t->path || !t->name) {
        free(t->path);
        free(t->name);
        luaL_unref(s->L, LUA_REGISTRYINDEX, fn_ref);
        def_clear(out);
        snprintf(err, errsize, "%s: out of memory", path);
        return -1;
    }
    t->fn_ref = fn_ref;
    t->budget = out->budget;
    t->agent = agent;
    out->handler_ref = ++s->ntools;
    return 0;
}

int sbx_load_tool(sbx *s, const char *path, sbx_tool_def *out, char *err,
                  size_t errsize) {
    return load_def(s, path, false, out, err, errsize);
}

int sbx_load_agent(sbx *s, const char *path, sbx_tool_def *out, char *err,
                   size_t errsize) {
    return load_def(s, path, true, out, err, errsize);
}

int sbx_push_handler(sbx *s, lua_State *L, int handler_ref) {
    if (handler_ref < 1 || handler_ref > s->ntools ||
        s->tools[handler_ref - 1].fn_ref == LUA_NOREF ||
        !lua_checkstack(L, 1))
        return -1;
    lua_rawgeti(L, LUA_REGISTRYINDEX, s->tools[handler_ref - 1].fn_ref);
    return 0;
}

int sbx_rebuild(sbx *s, char *err, size_t errsize) {
    lua_State *old = s->L;
    int64_t old_used = s->used;
    int old_pool[SBX_POOL_MAX], old_npool = s->npool;
    int *refs;
    lua_State *L;

    if (s->in_flight > 0 || s->current) {
        snprintf(err, errsize, "sandbox: cannot rebuild with %d requests "
                 "in flight", s->in_flight);
        return -1;
    }
    refs = calloc((size_t)s->ntools + 1, sizeof *refs);
    if (!refs) {
        snprintf(err, errsize, "sandbox: out of memory");
        return -1;
    }
    memcpy(old_pool, s->pool, sizeof old_pool);
    s->damaged = false;

    L = new_state(s, err, errsize);
    if (!L) {
        s->used = old_used;
        free(refs);
        return -1;
    }
    s->L = L;
    s->npool = 0;
    for (int i = 0; i < s->ntools; i++) {
        sbx_tool_def def;
        if (load_file(s, s->tools[i].path, s->tools[i].agent, &def,
                      &refs[i], err, errsize) != 0) {
            /* keep the old state: it still works */
            lua_close(L);
            s->L = old;
            s->used = old_used;
            s->npool = old_npool;
            memcpy(s->pool, old_pool, sizeof old_pool);
            s->damaged = false;
            free(refs);
            return -1;
        }
        s->tools[i].budget = def.budget;
        def_clear(&def);
    }

    int64_t new_used = s->used;
    lua_close(old);
    s->used = new_used;
    for (int i = 0; i < s->ntools; i++)
        s->tools[i].fn_ref = refs[i];
    free(refs);
    s->damaged = false;
    s->state_hit = false;
    log_msg(NLOG_INFO, "Sandbox", "rebuilt the Lua state (%d tools "
            "reloaded)", s->ntools);
    return 0;
}

/* ---- JSON ------------------------------------------------------------- */

typedef struct {
    char *err;
    size_t errsize;
    const void *seen[SBX_JSON_MAX_DEPTH + 2];
    int depth;
    char path[512];
    size_t plen;
} jctx;

static bool utf8_valid(const unsigned char *s, size_t n) {
    size_t i = 0;

    while (i < n) {
        unsigned char c = s[i];
        size_t len;
        uint32_t cp;

        if (c == 0)
            return false;
        if (c < 0x80) {
            i++;
            continue;
        }
        if ((c & 0xE0) == 0xC0) {
            len = 2;
            cp = c & 0x1F;
        } else if ((c & 0xF0) == 0xE0) {
            len = 3;
            cp = c & 0x0F;
        } else if ((c & 0xF8) == 0xF0) {
            len = 4;
            cp = c & 0x07;
        } else {
            return false;
        }
        if (i + len > n)
            return false;
        for (size_t k = 1; k < len; k++) {
            if ((s[i + k] & 0xC0) != 0x80)
                return false;
            cp = (cp << 6) | (s[i + k] & 0x3F);
        }
        if ((len == 2 && cp < 0x80) || (len == 3 && cp < 0x800) ||
            (len == 4 && cp < 0x10000) || cp > 0x10FFFF ||
            (cp >= 0xD800 && cp <= 0xDFFF))
            return false;
        i += len;
    }
    return true;
}

static cJSON *jfail(jctx *j, const char *what) {
    const char *path = j->path;

    if (j->plen > 100)
        path = j->path + j->plen - 100;
    snprintf(j->err, j->errsize, "%s%s: %s", path == j->path ? "" : "...",
             path, what);
    return NULL;
}

static void jpush_path(jctx *j, lua_State *L, int key_idx, size_t *saved) {
    *saved = j->plen;
    if (j->plen >= sizeof j->path - 1)
        return;
    if (lua_type(L, key_idx) == LUA_TSTRING) {
        /* The key as text that is safe to show: control bytes and bytes
         * that are not UTF-8 become \xNN. */
        size_t klen, o = j->plen, cap = sizeof j->path - 5;
        const unsigned char *k =
            (const unsigned char *)lua_tolstring(L, key_idx, &klen);
        j->path[o++] = '.';
        for (size_t i = 0; i < klen && o < cap;) {
            size_t n = k[i] >= 0x20 && k[i] != 0x7f
                           ? utf8_seq_len(k + i, klen - i)
                           : 0;
            if (n == 0 || o + n >= cap) {
                snprintf(j->path + o, sizeof j->path - o, "\\x%02x", k[i]);
                o += 4;
                i++;
            } else {
                memcpy(j->path + o, k + i, n);
                o += n;
                i += n;
            }
        }
        j->path[o] = 0;
    } else
        snprintf(j->path + j->plen, sizeof j->path - j->plen, "[%lld]",
                 (long long)lua_tointeger(L, key_idx));
    j->plen = strlen(j->path);
}

static void jpop_path(jctx *j, size_t saved) {
    j->plen = saved;
    j->path[saved] = 0;
}

static bool is_array_marked(lua_State *L, int idx) {
    bool r = false;

    if (lua_getmetatable(L, idx)) {
        lua_pushliteral(L, "__jsontype");
        lua_rawget(L, -2);
        r = lua_type(L, -1) == LUA_TSTRING &&
            strcmp(lua_tostring(L, -1), "array") == 0;
        lua_pop(L, 2);
    }
    return r;
}

static cJSON *to_json(lua_State *L, int idx, jctx *j);

static cJSON *table_to_json(lua_State *L, int idx, jctx *j) {
    const void *p = lua_topointer(L, idx);
    lua_Integer count = 0, maxkey = 0;
    bool strkeys = false, intkeys = false;
    cJSON *out;

    for (int i = 0; i < j->depth; i++)
        if (j->seen[i] == p)
            return jfail(j, "the table contains itself (a cycle)");
    if (j->depth >= SBX_JSON_MAX_DEPTH)
        return jfail(j, "nested too deeply");
    if (!lua_checkstack(L, 4))
        return jfail(j, "nested too deeply (Lua stack)");
    j->seen[j->depth++] = p;

    lua_pushnil(L);
    while (lua_next(L, idx)) {
        lua_pop(L, 1);
        count++;
        if (lua_type(L, -1) == LUA_TSTRING) {
            strkeys = true;
        } else if (lua_isinteger(L, -1) && lua_tointeger(L, -1) > 0) {
            intkeys = true;
            if (lua_tointeger(L, -1) > maxkey)
                maxkey = lua_tointeger(L, -1);
        } else {
            lua_pop(L, 1);
            j->depth--;
            return jfail(j, "keys must be strings or positive integers");
        }
    }
    if (strkeys && intkeys) {
        j->depth--;
        return jfail(j, "the table mixes array and object keys");
    }

    if (intkeys || (count == 0 && is_array_marked(L, idx))) {
        if (maxkey > 2 * count + 1) {
            j->depth--;
            return jfail(j, "sparse array (more holes than values)");
        }
        out = cJSON_CreateArray();
        for (lua_Integer i = 1; out && i <= maxkey; i++) {
            size_t saved;
            cJSON *v;
            lua_pushinteger(L, i);
            jpush_path(j, L, -1, &saved);
            lua_pop(L, 1);
            lua_rawgeti(L, idx, i);
            v = lua_isnil(L, -1) ? cJSON_CreateNull()
                                 : to_json(L, lua_gettop(L), j);
            lua_pop(L, 1);
            if (!v) {
                cJSON_Delete(out);
                j->depth--;
                return NULL;
            }
            jpop_path(j, saved);
            cJSON_AddItemToArray(out, v);
        }
    } else {
        out = cJSON_CreateObject();
        lua_pushnil(L);
        while (out && lua_next(L, idx)) {
            size_t saved, klen;
            const char *k = lua_tolstring(L, -2, &klen);
            cJSON *v;
            jpush_path(j, L, -2, &saved);
            if (!utf8_valid((const unsigned char *)k, klen)) {
                lua_pop(L, 2);
                cJSON_Delete(out);
                j->depth--;
                return jfail(j, "key is not valid UTF-8 (or holds NUL)");
            }
            v = to_json(L, lua_gettop(L), j);
            lua_pop(L, 1);
            if (!v) {
                lua_pop(L, 1);
                cJSON_Delete(out);
                j->depth--;
                return NULL;
            }
            jpop_path(j, saved);
            cJSON_AddItemToObject(out, k, v);
        }
    }
    j->depth--;
    return out ? out : jfail(j, "out of memory");
}

static cJSON *to_json(lua_State *L, int idx, jctx *j) {
    switch (lua_type(L, idx)) {
    case LUA_TNIL:
        return cJSON_CreateNull();
    case LUA_TBOOLEAN:
        return cJSON_CreateBool(lua_toboolean(L, idx));
    case LUA_TNUMBER:
        if (lua_isinteger(L, idx)) {
            lua_Integer v = lua_tointeger(L, idx);
            if (v > ((lua_Integer)1 << 53) || v < -((lua_Integer)1 << 53)) {
                char buf[32];
                snprintf(buf, sizeof buf, "%lld", (long long)v);
                return cJSON_CreateString(buf);
            }
            return cJSON_CreateNumber((double)v);
        } else {
            double d = lua_tonumber(L, idx);
            if (!isfinite(d))
                return jfail(j, "NaN and infinity have no JSON form");
            return cJSON_CreateNumber(d);
        }
    case LUA_TSTRING: {
        size_t len;
        const char *s = lua_tolstring(L, idx, &len);
        if (!utf8_valid((const unsigned char *)s, len))
            return jfail(j, "string is not valid UTF-8 (or holds NUL)");
        return cJSON_CreateString(s);
    }
    case LUA_TTABLE:
        return table_to_json(L, idx, j);
    default: {
        char what[96];
        snprintf(what, sizeof what, "a %s cannot be sent as JSON",
                 luaL_typename(L, idx));
        return jfail(j, what);
    }
    }
}

cJSON *sbx_table_to_json(lua_State *L, int idx, const char *what, char *err,
                         size_t errsize) {
    jctx j;
    char dummy[8];

    memset(&j, 0, sizeof j);
    j.err = err ? err : dummy;
    j.errsize = err ? errsize : sizeof dummy;
    snprintf(j.path, sizeof j.path, "%s", what ? what : "value");
    j.plen = strlen(j.path);
    return to_json(L, lua_absindex(L, idx), &j);
}

static void push_array_mt(lua_State *L) {
    if (luaL_newmetatable(L, "netra.json_array")) {
        lua_pushliteral(L, "array");
        lua_setfield(L, -2, "__jsontype");
        lua_pushliteral(L, "json array");
        lua_setfield(L, -2, "__metatable");
    }
}

void sbx_push_json(lua_State *L, const cJSON *json) {
    luaL_checkstack(L, 4, "JSON nested too deeply");

    if (!json || cJSON_IsNull(json) || cJSON_IsInvalid(json)) {
        lua_pushnil(L);
    } else if (cJSON_IsBool(json)) {
        lua_pushboolean(L, cJSON_IsTrue(json));
    } else if (cJSON_IsNumber(json)) {
        double d = json->valuedouble;
        if (d == floor(d) && fabs(d) <= 9007199254740992.0)
            lua_pushinteger(L, (lua_Integer)d);
        else
            lua_pushnumber(L, d);
    } else if (cJSON_IsString(json) || cJSON_IsRaw(json)) {
        lua_pushstring(L, json->valuestring ? json->valuestring : "");
    } else if (cJSON_IsArray(json)) {
        int n = cJSON_GetArraySize(json);
        lua_Integer i = 0;
        lua_createtable(L, n, 0);
        for (const cJSON *c = json->child; c; c = c->next) {
            i++;
            if (cJSON_IsNull(c))
                continue;
            sbx_push_json(L, c);
            lua_rawseti(L, -2, i);
        }
        if (n == 0) {
            push_array_mt(L);
            lua_setmetatable(L, -2);
        }
    } else {
        lua_createtable(L, 0, cJSON_GetArraySize(json));
        for (const cJSON *c = json->child; c; c = c->next) {
            if (cJSON_IsNull(c) || !c->string)
                continue;
            lua_pushstring(L, c->string);
            sbx_push_json(L, c);
            lua_rawset(L, -3);
        }
    }
}
