/* repl: one operator session in a Lua state (see repl.h). */
#include "repl.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <lauxlib.h>
#include <lualib.h>

#include "bindings.h"
#include "context.h"
#include "disp.h"
#include "log.h"

#define REPL_MAX_OUTPUT (4u << 20)

struct repl {
    runtime *rt;
    policy *pol;
    lua_State *L;
    bool own;
    bool bounded;
    int64_t time_ms, instructions;
    char who[64];
    char tag[16];
    repl_reload_fn reload;
    void *reload_ud;
    struct disp_pool *pool;
    int session_ref, eval_ref, complete_ref;

    char *out; /* what print() wrote during the evaluation */
    size_t out_len, out_cap;
    bool out_truncated;

    int64_t deadline_ms; /* the budget of the evaluation running now */
    int64_t counted;
    int stopped; /* 0, or 1 time, 2 instructions */
};

static int64_t now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static repl *repl_of(lua_State *L) {
    return lua_touserdata(L, lua_upvalueindex(1));
}

static void lock(repl *r) {
    if (!r->own) pthread_mutex_lock(&r->rt->lua_lock);
}

static void unlock(repl *r) {
    if (!r->own) pthread_mutex_unlock(&r->rt->lua_lock);
}

/* ---- output ------------------------------------------------------------- */

static void out_add(repl *r, const char *text, size_t len) {
    if (r->out_len + len > REPL_MAX_OUTPUT) {
        r->out_truncated = true;
        return;
    }
    if (r->out_len + len + 1 > r->out_cap) {
        size_t cap = r->out_cap ? r->out_cap : 1024;
        while (cap < r->out_len + len + 1) cap *= 2;
        char *grown = realloc(r->out, cap);
        if (!grown) {
            r->out_truncated = true;
            return;
        }
        r->out = grown;
        r->out_cap = cap;
    }
    memcpy(r->out + r->out_len, text, len);
    r->out_len += len;
    r->out[r->out_len] = '\0';
}

/* ---- budgets -------------------------------------------------------------- */

static const char *budget_message(repl *r, char *buf, size_t size) {
    if (r->stopped == 1)
        snprintf(buf, size, "evaluation exceeded its time budget (%lld ms)",
                 (long long)r->time_ms);
    else
        snprintf(buf, size, "evaluation exceeded its instruction budget "
                            "(%lld instructions)",
                 (long long)r->instructions);
    return buf;
}

/* Count hook of a bounded session: once a budget is spent it raises on
 * every call, so that a pcall inside the chunk cannot keep it going. */
static void budget_hook(lua_State *L, lua_Debug *ar) {
    (void)ar;
    repl *r = *(repl **)lua_getextraspace(L);
    if (!r) return;
    r->counted += 1000;
    if (!r->stopped) {
        if (r->time_ms > 0 && now_ms() > r->deadline_ms) r->stopped = 1;
        else if (r->instructions > 0 && r->counted > r->instructions)
            r->stopped = 2;
    }
    if (r->stopped) {
        /* From now on every instruction raises, outside pcalls too. */
        lua_sethook(L, budget_hook, LUA_MASKCOUNT, 1);
        char msg[128];
        luaL_error(L, "%s", budget_message(r, msg, sizeof msg));
    }
}

/* ---- what the Lua side asks of the host ------------------------------------ */

static int host_write(lua_State *L) {
    size_t len;
    const char *text = luaL_checklstring(L, 1, &len);
    out_add(repl_of(L), text, len);
    return 0;
}

static int host_log(lua_State *L) {
    repl *r = repl_of(L);
    char line[320];
    snprintf(line, sizeof line, "%s", luaL_checkstring(L, 1));
    for (char *p = line; *p; p++)
        if (*p == '\n' || *p == '\r' || *p == '\t') *p = ' ';
    log_msg(NLOG_INFO, r->tag, "operator %s: %s", r->who, line);
    return 0;
}

static int host_reload(lua_State *L) {
    repl *r = repl_of(L);
    char err[2048] = "";
    if (r->reload(r->reload_ud, err, sizeof err) < 0) {
        lua_pushnil(L);
        lua_pushstring(L, err[0] ? err : "reload failed");
        return 2;
    }
    lua_pushboolean(L, 1);
    return 1;
}

/* Runs repl.policy_side(policy, name, arg) in the policy's state under
 * rt->lua_lock and carries the result across as JSON. */
static int host_policy_call(lua_State *L) {
    repl *r = repl_of(L);
    const char *name = luaL_checkstring(L, 1);
    const char *arg = luaL_optstring(L, 2, NULL);
    char err[2048] = "";
    cJSON *res = NULL;
    if (!r->pol) {
        lua_pushnil(L);
        lua_pushstring(L, "the policy has not been applied in this process "
                          "(still starting?) - try again when ready");
        return 2;
    }

    pthread_mutex_lock(&r->rt->lua_lock);
    lua_State *P = policy_state(r->pol);
    int top = lua_gettop(P);
    lua_getglobal(P, "require");
    lua_pushstring(P, "netra.repl");
    if (lua_pcall(P, 1, 1, 0) == LUA_OK) {
        lua_getfield(P, -1, "policy_side");
        lua_getglobal(P, "package");
        lua_getfield(P, -1, "loaded");
        lua_getfield(P, -1, "netra.policy");
        lua_replace(P, -3);
        lua_pop(P, 1);
        lua_pushstring(P, name);
        if (arg) lua_pushstring(P, arg);
        else lua_pushnil(P);
        if (lua_pcall(P, 3, 2, 0) == LUA_OK && !lua_isnil(P, -2))
            res = bindings_to_json(P, -2, err, sizeof err);
        else
            snprintf(err, sizeof err, "%s", lua_tostring(P, -1));
    } else {
        snprintf(err, sizeof err, "%s", lua_tostring(P, -1));
    }
    lua_settop(P, top);
    pthread_mutex_unlock(&r->rt->lua_lock);

    if (!res) {
        lua_pushnil(L);
        lua_pushstring(L, err);
        return 2;
    }
    bindings_push_json(L, res);
    cJSON_Delete(res);
    return 1;
}

/* What one dispatch_as call collects from its sink (worker threads). */
typedef struct {
    pthread_mutex_t lock;
    pthread_cond_t cond;
    cJSON *events;
    cJSON *result;
    bool done;
} collector;

static void sink_event(void *ud, cJSON *ev) {
    collector *c = ud;
    pthread_mutex_lock(&c->lock);
    cJSON_AddItemToArray(c->events, ev);
    pthread_mutex_unlock(&c->lock);
}

static void sink_progress(void *ud, cJSON *params) {
    cJSON *ev = cJSON_CreateObject();
    cJSON_AddStringToObject(ev, "type", "progress");
    cJSON_AddItemToObject(ev, "params", params);
    sink_event(ud, ev);
}

static void sink_done(void *ud, cJSON *result) {
    collector *c = ud;
    pthread_mutex_lock(&c->lock);
    c->result = result;
    c->done = true;
    pthread_cond_signal(&c->cond);
    pthread_mutex_unlock(&c->lock);
}

static const char *str_field(lua_State *L, int t, const char *k) {
    lua_getfield(L, t, k);
    const char *v = lua_tostring(L, -1);
    lua_pop(L, 1); /* the string stays alive in the table */
    return v;
}

/* dispatch(fields, tool, args) -> result, events | nil, message: one tool
 * call through the pool, in a validated context, waited for here. */
static int host_dispatch(lua_State *L) {
    repl *r = repl_of(L);
    luaL_checktype(L, 1, LUA_TTABLE);
    const char *tool = luaL_checkstring(L, 2);
    char err[1024];
    ctx_fields f = {0};
    f.user_id = str_field(L, 1, "user_id");
    f.thread_id = str_field(L, 1, "thread_id");
    f.run_id = str_field(L, 1, "run_id");
    f.request_id = str_field(L, 1, "request_id");
    log_msg(NLOG_INFO, r->tag,
            "operator %s: dispatch_as user_id=%s thread_id=%s tool=%s", r->who,
            f.user_id ? f.user_id : "(none)",
            f.thread_id ? f.thread_id : "(none)", tool);
    if (!r->pool) {
        lua_pushnil(L);
        lua_pushstring(L, "dispatch_as: no dispatcher in this process (the "
                          "policy did not start, or the server is not "
                          "ready yet)");
        return 2;
    }
    netra_ctx *ctx = ctx_new(&f, err, sizeof err);
    if (!ctx) {
        lua_pushnil(L);
        lua_pushfstring(L, "dispatch_as: %s", err);
        return 2;
    }
    cJSON *args = NULL;
    if (!lua_isnoneornil(L, 3) &&
        !(args = bindings_to_json(L, 3, err, sizeof err))) {
        ctx_unref(ctx);
        lua_pushnil(L);
        lua_pushfstring(L, "dispatch_as: arguments: %s", err);
        return 2;
    }
    if (!args) args = cJSON_CreateObject();

    collector c = {.events = cJSON_CreateArray()};
    pthread_mutex_init(&c.lock, NULL);
    pthread_cond_init(&c.cond, NULL);
    disp_sink sink = {.ud = &c, .event = sink_event,
                      .progress = sink_progress, .done = sink_done};
    int code = 0, rc = -1;
    disp *d = disp_new(r->pool, ctx, &sink, err, sizeof err);
    ctx_unref(ctx);
    if (d) rc = disp_call_tool(d, tool, args, NULL, &code, err, sizeof err);
    else cJSON_Delete(args);
    if (rc == 0) {
        pthread_mutex_lock(&c.lock);
        while (!c.done) pthread_cond_wait(&c.cond, &c.lock);
        pthread_mutex_unlock(&c.lock);
    }
    if (d) disp_release(d);
    pthread_mutex_destroy(&c.lock);
    pthread_cond_destroy(&c.cond);

    if (rc != 0) {
        cJSON_Delete(c.events);
        lua_pushnil(L);
        lua_pushfstring(L, "dispatch_as: %s", err);
        return 2;
    }
    bindings_push_json(L, c.result);
    bindings_push_json(L, c.events);
    cJSON_Delete(c.result);
    cJSON_Delete(c.events);
    return 2;
}

static void add_host(lua_State *L, repl *r, const char *name,
                     lua_CFunction fn) {
    lua_pushlightuserdata(L, r);
    lua_pushcclosure(L, fn, 1);
    lua_setfield(L, -2, name);
}

/* ---- gating -------------------------------------------------------------------- */

/* Reads gating.rules(env) in L: console flag and budget. */
static int read_gating(lua_State *L, bool *console, int64_t *time_ms,
                       int64_t *instructions, char *err, size_t err_size) {
    static const char code[] =
        "local g = require('netra.gating')\n"
        "local r = g.rules(require('netra').environment)\n"
        "local b = r.budget or {}\n"
        "return r.console == true, b.time_ms or 0, b.instructions or 0\n";
    int top = lua_gettop(L);
    if (luaL_loadbufferx(L, code, sizeof code - 1, "=gating", "t") ||
        lua_pcall(L, 0, 3, 0)) {
        snprintf(err, err_size, "cannot read the gating table: %s",
                 lua_tostring(L, -1));
        lua_settop(L, top);
        return -1;
    }
    if (console) *console = lua_toboolean(L, -3);
    if (time_ms) *time_ms = lua_tointeger(L, -2);
    if (instructions) *instructions = lua_tointeger(L, -1);
    lua_settop(L, top);
    return 0;
}

int repl_gating(runtime *rt, bool *console, int64_t *time_ms,
                int64_t *instructions, char *err, size_t err_size) {
    lua_State *L = luaL_newstate();
    if (!L) {
        snprintf(err, err_size, "out of memory");
        return -1;
    }
    luaL_openlibs(L);
    bindings_preload(L, rt);
    bool on = false;
    int rc = read_gating(L, &on, time_ms, instructions, err, err_size);
    lua_close(L);
    if (rc < 0) return -1;
    if (console &&
        config_bool(rt->cfg, "NETRA_CONSOLE", on, console, err, err_size) < 0)
        return -1;
    return 0;
}

/* ---- sessions ------------------------------------------------------------------- */

/* Loads netra.repl and makes the session; leaves nothing on the stack.
 * Returns 0, or -1 with the message on top. */
static int start_session(repl *r) {
    lua_State *L = r->L;
    lua_getglobal(L, "require");
    lua_pushstring(L, "netra.repl");
    if (lua_pcall(L, 1, 1, 0) != LUA_OK) return -1;
    lua_getfield(L, -1, "eval");
    r->eval_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    lua_getfield(L, -1, "complete");
    r->complete_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    lua_getfield(L, -1, "session");

    lua_newtable(L);
    add_host(L, r, "write", host_write);
    add_host(L, r, "log", host_log);
    add_host(L, r, "dispatch", host_dispatch);
    if (r->reload) add_host(L, r, "reload", host_reload);
    if (r->own) add_host(L, r, "policy_call", host_policy_call);
    if (lua_pcall(L, 1, 1, 0) != LUA_OK) return -1;
    r->session_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    lua_pop(L, 1);
    return 0;
}

repl *repl_new(const repl_options *opts, char *err, size_t err_size) {
    repl *r = calloc(1, sizeof *r);
    if (!r) {
        snprintf(err, err_size, "out of memory");
        return NULL;
    }
    r->rt = opts->rt;
    r->pol = opts->policy;
    r->own = opts->own_state || !opts->policy;
    r->bounded = opts->bounded && r->own;
    r->reload = opts->reload;
    r->reload_ud = opts->reload_ud;
    r->session_ref = r->eval_ref = r->complete_ref = LUA_NOREF;
    snprintf(r->who, sizeof r->who, "%s", opts->who ? opts->who : "local");
    snprintf(r->tag, sizeof r->tag, "%s", opts->tag ? opts->tag : "repl");

    if (r->own) {
        r->L = luaL_newstate();
        if (!r->L) {
            free(r);
            snprintf(err, err_size, "out of memory creating a Lua state");
            return NULL;
        }
        luaL_openlibs(r->L);
        bindings_preload(r->L, r->rt);
        *(repl **)lua_getextraspace(r->L) = r;
    } else {
        r->L = policy_state(r->pol);
    }

    lock(r);
    int top = lua_gettop(r->L);
    int rc = start_session(r);
    if (rc < 0)
        snprintf(err, err_size, "cannot start the REPL: %s",
                 lua_tostring(r->L, -1));
    if (rc == 0 && r->bounded &&
        read_gating(r->L, NULL, &r->time_ms, &r->instructions, err,
                    err_size) < 0)
        rc = -1;
    lua_settop(r->L, top);
    unlock(r);
    if (rc < 0) {
        repl_free(r);
        return NULL;
    }
    return r;
}

void repl_set_pool(repl *r, struct disp_pool *pool) {
    r->pool = pool;
}

void repl_budget(const repl *r, int64_t *time_ms, int64_t *instructions) {
    *time_ms = r->bounded ? r->time_ms : 0;
    *instructions = r->bounded ? r->instructions : 0;
}

/* Joins output, results and error into one malloc'd text (or NULL). */
static char *compose(repl *r, const char *tail) {
    if (r->out_truncated)
        out_add(r, "[output truncated]\n", 19);
    size_t tl = tail ? strlen(tail) : 0;
    if (!r->out_len && !tl) return NULL;
    char *text = malloc(r->out_len + tl + 2);
    if (!text) return NULL;
    memcpy(text, r->out ? r->out : "", r->out_len);
    size_t n = r->out_len;
    if (tl) {
        memcpy(text + n, tail, tl);
        n += tl;
    }
    text[n] = '\0';
    return text;
}

repl_status repl_eval(repl *r, const char *chunk, char **text) {
    lua_State *L = r->L;
    *text = NULL;
    lock(r);
    int top = lua_gettop(L);
    r->out_len = 0;
    r->out_truncated = false;
    r->stopped = 0;
    r->counted = 0;
    if (r->bounded) {
        r->deadline_ms = now_ms() + r->time_ms;
        lua_sethook(L, budget_hook, LUA_MASKCOUNT, 1000);
    }

    lua_rawgeti(L, LUA_REGISTRYINDEX, r->eval_ref);
    lua_rawgeti(L, LUA_REGISTRYINDEX, r->session_ref);
    lua_pushstring(L, chunk);
    int rc = lua_pcall(L, 2, 2, 0);
    if (r->bounded) lua_sethook(L, NULL, 0, 0);

    repl_status status = REPL_ERROR;
    const char *tail = NULL;
    char msg[256];
    if (rc != LUA_OK) {
        tail = lua_tostring(L, -1);
        if (!tail) tail = "(error object is not a string)";
    } else {
        const char *s = lua_tostring(L, -2);
        tail = lua_tostring(L, -1);
        if (s && !strcmp(s, "ok")) status = REPL_OK;
        else if (s && !strcmp(s, "incomplete")) status = REPL_INCOMPLETE;
    }
    if (r->stopped) {
        status = REPL_ERROR;
        if (!tail || !strstr(tail, "exceeded its"))
            tail = budget_message(r, msg, sizeof msg);
    }
    *text = compose(r, tail);
    lua_settop(L, top);
    unlock(r);
    lua_gc(L, LUA_GCSTEP, 0);
    return status;
}

char **repl_complete(repl *r, const char *line) {
    lua_State *L = r->L;
    lock(r);
    int top = lua_gettop(L);
    char **list = NULL;
    lua_rawgeti(L, LUA_REGISTRYINDEX, r->complete_ref);
    lua_rawgeti(L, LUA_REGISTRYINDEX, r->session_ref);
    lua_pushstring(L, line);
    if (lua_pcall(L, 2, 1, 0) == LUA_OK && lua_istable(L, -1)) {
        size_t n = lua_rawlen(L, -1);
        if (n > 0 && (list = calloc(n + 1, sizeof *list))) {
            for (size_t i = 0; i < n; i++) {
                lua_rawgeti(L, -1, (lua_Integer)i + 1);
                const char *s = lua_tostring(L, -1);
                list[i] = strdup(s ? s : "");
                lua_pop(L, 1);
            }
        }
    }
    lua_settop(L, top);
    unlock(r);
    return list;
}

void repl_free_list(char **list) {
    if (!list) return;
    for (char **p = list; *p; p++) free(*p);
    free(list);
}

void repl_free(repl *r) {
    if (!r) return;
    if (r->own) {
        lua_close(r->L);
    } else {
        lock(r);
        luaL_unref(r->L, LUA_REGISTRYINDEX, r->session_ref);
        luaL_unref(r->L, LUA_REGISTRYINDEX, r->eval_ref);
        luaL_unref(r->L, LUA_REGISTRYINDEX, r->complete_ref);
        unlock(r);
    }
    free(r->out);
    free(r);
}
