/* disp: the registry, the worker pool and request-scoped dispatchers
 * (see disp.h). */
#include "disp.h"

#include <ctype.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

#include <lauxlib.h>

#include "log.h"
#include "sandbox.h"
#include "schema.h"
#include "utf8.h"

#define DISP_MAX_DEPTH 8
#define USER_BUCKETS 64
#define POLL_MAX_MS 1000
#define RECENT_USERS 32 /* per worker, for picking queued jobs fairly */

static const char STALE_CTX[] =
    "ctx used outside its request: a ctx is valid only during the call "
    "that received it";

/* ---- small helpers --------------------------------------------------------- */

static int64_t mono_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static double mono_exact_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1000.0 + (double)ts.tv_nsec / 1e6;
}

static int64_t unix_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* RFC 3339, UTC, milliseconds: 2025-01-02T03:04:05.678Z */
static void rfc3339(int64_t ms, char out[32]) {
    time_t secs = (time_t)(ms / 1000);
    struct tm tm;
    gmtime_r(&secs, &tm);
    size_t n = strftime(out, 32, "%Y-%m-%dT%H:%M:%S", &tm);
    snprintf(out + n, 32 - n, ".%03dZ", (int)(ms % 1000));
}

static char *dup_str(const char *s) {
    return s ? strdup(s) : NULL;
}

/* ---- redaction ------------------------------------------------------------- */

static bool secret_key(const char *key) {
    static const char *const words[] = {"password", "secret", "token",
                                        "api_key", "apikey", "authorization",
                                        "credential", "private_key", NULL};
    for (int i = 0; key && words[i]; i++)
        if (strcasestr(key, words[i])) return true;
    return false;
}

/* Replaces, in place and at any depth, the values of secret-looking keys
 * with "[REDACTED]". */
static void redact(cJSON *v) {
    for (cJSON *c = v ? v->child : NULL; c; c = c->next) {
        if (cJSON_IsObject(v) && secret_key(c->string)) {
            cJSON *r = cJSON_CreateString("[REDACTED]");
            if (!r) continue;
            r->string = c->string; /* the key moves to the new item */
            c->string = NULL;
            cJSON_ReplaceItemViaPointer(v, c, r);
            c = r;
        } else {
            redact(c);
        }
    }
}

static cJSON *redacted_copy(const cJSON *v) {
    cJSON *c = v ? cJSON_Duplicate(v, 1) : cJSON_CreateObject();
    redact(c);
    return c;
}

/* ---- registry -------------------------------------------------------------- */

typedef struct {
    char *name, *description, *path;
    cJSON *input, *output, *annotations;
    schema_t *in_schema, *out_schema;
    bool agent;
} reg_entry;

struct disp_registry {
    atomic_int refs;
    char *lua_dir;
    reg_entry *items;
    int n, cap;
};

disp_registry *disp_registry_new(const char *lua_dir) {
    disp_registry *reg = calloc(1, sizeof *reg);
    if (!reg || !(reg->lua_dir = dup_str(lua_dir ? lua_dir : "lua"))) {
        free(reg);
        return NULL;
    }
    atomic_init(&reg->refs, 1);
    return reg;
}

disp_registry *disp_registry_ref(disp_registry *reg) {
    if (reg) atomic_fetch_add(&reg->refs, 1);
    return reg;
}

static void entry_clear(reg_entry *e) {
    free(e->name);
    free(e->description);
    free(e->path);
    cJSON_Delete(e->input);
    cJSON_Delete(e->output);
    cJSON_Delete(e->annotations);
    schema_free(e->in_schema);
    schema_free(e->out_schema);
}

void disp_registry_unref(disp_registry *reg) {
    if (!reg || atomic_fetch_sub(&reg->refs, 1) != 1) return;
    for (int i = 0; i < reg->n; i++) entry_clear(&reg->items[i]);
    free(reg->items);
    free(reg->lua_dir);
    free(reg);
}

static int find_entry(const disp_registry *reg, const char *name,
                      bool agent) {
    for (int i = 0; name && i < reg->n; i++)
        if (reg->items[i].agent == agent && !strcmp(reg->items[i].name, name))
            return i;
    return -1;
}

static int add_file(disp_registry *reg, const char *path, bool agent,
                    char *err, size_t err_size) {
    const char *kind = agent ? "agent" : "tool";
    char serr[1024];
    sbx_config sc = {.lua_dir = reg->lua_dir};
    sbx_tool_def def;
    memset(&def, 0, sizeof def);

    /* A scratch sandbox: loading runs the file, under the default
     * budgets, and must not leave anything behind. */
    sbx *s = sbx_new(&sc, serr, sizeof serr);
    if (!s) {
        snprintf(err, err_size, "%s: %s", path, serr);
        return -1;
    }
    int rc = agent ? sbx_load_agent(s, path, &def, err, err_size)
                   : sbx_load_tool(s, path, &def, err, err_size);
    sbx_free(s);
    if (rc != 0) return -1;

    int other = find_entry(reg, def.name, agent);
    if (other >= 0) {
        snprintf(err, err_size, "%s: %s name '%s' is already registered by "
                 "%s - rename one of them or remove one file", path, kind,
                 def.name, reg->items[other].path);
        sbx_tool_def_free(&def);
        return -1;
    }

    const cJSON *root_type =
        cJSON_GetObjectItemCaseSensitive(def.input_schema, "type");
    if (!cJSON_IsString(root_type) ||
        strcmp(root_type->valuestring, "object")) {
        snprintf(err, err_size, "%s: inputSchema: the root must be {type = "
                 "\"object\"} (MCP sends arguments as an object) - wrap "
                 "the value in a property", path);
        sbx_tool_def_free(&def);
        return -1;
    }

    reg_entry e = {.agent = agent};
    char why[512];
    e.in_schema = schema_compile(def.input_schema, why, sizeof why);
    if (!e.in_schema) {
        snprintf(err, err_size, "%s: inputSchema: %s%s", path, why,
                 !strncmp(why, "unsupported", 11)
                     ? " - netra enforces a JSON Schema subset (see "
                       "doc/schema.md); remove or replace that keyword"
                     : "");
        sbx_tool_def_free(&def);
        return -1;
    }
    if (def.output_schema &&
        !(e.out_schema = schema_compile(def.output_schema, why,
                                        sizeof why))) {
        snprintf(err, err_size, "%s: outputSchema: %s%s", path, why,
                 !strncmp(why, "unsupported", 11)
                     ? " - netra enforces a JSON Schema subset (see "
                       "doc/schema.md); remove or replace that keyword"
                     : "");
        schema_free(e.in_schema);
        sbx_tool_def_free(&def);
        return -1;
    }

    if (reg->n == reg->cap) {
        int cap = reg->cap ? reg->cap * 2 : 8;
        reg_entry *items = realloc(reg->items, (size_t)cap * sizeof *items);
        if (!items) {
            snprintf(err, err_size, "%s: out of memory", path);
            entry_clear(&e);
            sbx_tool_def_free(&def);
            return -1;
        }
        reg->items = items;
        reg->cap = cap;
    }
    e.name = def.name;
    e.description = def.description;
    e.path = def.path;
    e.input = def.input_schema;
    e.output = def.output_schema;
    e.annotations = def.annotations;
    reg->items[reg->n++] = e;
    return 0;
}

int disp_registry_add_tool(disp_registry *reg, const char *path, char *err,
                           size_t err_size) {
    return add_file(reg, path, false, err, err_size);
}

int disp_registry_add_agent(disp_registry *reg, const char *path, char *err,
                            size_t err_size) {
    return add_file(reg, path, true, err, err_size);
}

cJSON *disp_registry_tools_json(disp_registry *reg) {
    cJSON *a = cJSON_CreateArray();
    for (int i = 0; a && i < reg->n; i++) {
        const reg_entry *e = &reg->items[i];
        if (e->agent) continue;
        cJSON *t = cJSON_CreateObject();
        cJSON_AddStringToObject(t, "name", e->name);
        cJSON_AddStringToObject(t, "description", e->description);
        cJSON_AddItemToObject(t, "inputSchema", cJSON_Duplicate(e->input, 1));
        if (e->output)
            cJSON_AddItemToObject(t, "outputSchema",
                                  cJSON_Duplicate(e->output, 1));
        if (e->annotations)
            cJSON_AddItemToObject(t, "annotations",
                                  cJSON_Duplicate(e->annotations, 1));
        cJSON_AddItemToArray(a, t);
    }
    return a;
}

cJSON *disp_registry_agents_json(disp_registry *reg) {
    cJSON *a = cJSON_CreateArray();
    for (int i = 0; a && i < reg->n; i++) {
        const reg_entry *e = &reg->items[i];
        if (!e->agent) continue;
        cJSON *t = cJSON_CreateObject();
        cJSON_AddStringToObject(t, "name", e->name);
        cJSON_AddStringToObject(t, "description", e->description);
        cJSON_AddItemToObject(t, "inputSchema", cJSON_Duplicate(e->input, 1));
        cJSON_AddItemToArray(a, t);
    }
    return a;
}

bool disp_registry_has_tool(disp_registry *reg, const char *name) {
    return reg && find_entry(reg, name, false) >= 0;
}

bool disp_registry_has_agent(disp_registry *reg, const char *name) {
    return reg && find_entry(reg, name, true) >= 0;
}

/* ---- types of the pool ------------------------------------------------------ */

typedef struct worker worker;
typedef struct job job;

/* One tool call of a request: the bare call, or a ctx:call inside it. */
typedef struct frame {
    struct frame *up;
    int entry;
    char call_id[CTX_NEW_ID_LEN + 1];
    cJSON *args_shown; /* redacted */
    cJSON *args;       /* a nested call's arguments (owned), or NULL */
    int64_t started_ms;
    double t0;
} frame;

struct job {
    job *next, *prev;
    disp *d;
    worker *w;
    int entry;
    bool agent;
    cJSON *args;
    cJSON *progress_token;
    double last_progress;
    bool any_progress;
    sbx_request *req;
    ch_request *chq;
    frame *frames;
    int depth; /* nested ctx:call frames */
    char *pre_error; /* refused before the handler ran (arguments) */
    uint64_t serial; /* unique per job: what a Lua ctx points to */
    char user_key[CTX_ID_MAX + 1];
};

typedef struct ucount {
    struct ucount *next;
    int n;
    char user[];
} ucount;

struct worker {
    disp_pool *pool;
    int index;
    pthread_t th;
    bool thread_ok;
    sbx *s;
    CURLM *multi;
    ch_client *ch;
    int *refs; /* handler_ref per registry entry */

    pthread_mutex_t lock; /* guards queue, stop, init */
    pthread_cond_t init_cond;
    int init; /* 0 starting, 1 ready, -1 failed */
    char init_err[1024];
    job *queue, *queue_tail;
    bool stop;
    atomic_int load; /* assigned and unfinished jobs */

    job *active; /* worker thread only */

    /* The users whose jobs this worker started last (worker thread only):
     * the next job is the queued one whose user was served longest ago. */
    char recent[RECENT_USERS][CTX_ID_MAX + 1];
    uint64_t recent_seq[RECENT_USERS];
    uint64_t seq;
};

struct disp_pool {
    disp_registry *reg;
    disp_pool_config cfg;
    bool ch_on;
    ch_settings ch;
    int nworkers;
    worker *workers;
    atomic_int in_flight;
    atomic_uint rr;
    atomic_bool stopping; /* the sandboxes' stop flag */

    pthread_mutex_t lock; /* guards users */
    ucount *users[USER_BUCKETS];
};

struct disp {
    disp_pool *pool;
    netra_ctx *ctx;
    disp_sink sink;
    pthread_mutex_t lock;
    bool submitted, finished, released;
    worker *w;
    atomic_bool cancel;
    char cancel_reason[256];
    char run_id[CTX_ID_MAX + 1];
    char agent_name[128];
};

/* ---- admission ---------------------------------------------------------------- */

static unsigned user_hash(const char *s) {
    unsigned h = 2166136261u;
    for (; *s; s++) h = (h ^ (unsigned char)*s) * 16777619u;
    return h % USER_BUCKETS;
}

/* Counts one more request for user unless at the cap. */
static bool user_enter(disp_pool *p, const char *user, int max) {
    pthread_mutex_lock(&p->lock);
    ucount **slot = &p->users[user_hash(user)], *u = *slot;
    while (u && strcmp(u->user, user)) u = u->next;
    bool ok = true;
    if (u && u->n >= max) {
        ok = false;
    } else if (u) {
        u->n++;
    } else if ((u = malloc(sizeof *u + strlen(user) + 1))) {
        strcpy(u->user, user);
        u->n = 1;
        u->next = *slot;
        *slot = u;
    } else {
        ok = false;
    }
    pthread_mutex_unlock(&p->lock);
    return ok;
}

static void user_leave(disp_pool *p, const char *user) {
    pthread_mutex_lock(&p->lock);
    ucount **slot = &p->users[user_hash(user)];
    while (*slot && strcmp((*slot)->user, user)) slot = &(*slot)->next;
    if (*slot && --(*slot)->n == 0) {
        ucount *u = *slot;
        *slot = u->next;
        free(u);
    }
    pthread_mutex_unlock(&p->lock);
}

/* ---- events --------------------------------------------------------------------- */

/* Adds s (NULL: "") as a string member, every byte that is not valid
 * UTF-8 replaced by U+FFFD: nothing invalid leaves the dispatcher. */
static void add_text(cJSON *o, const char *k, const char *s) {
    char *c = utf8_clean(s, s ? strlen(s) : 0);
    cJSON_AddStringToObject(o, k, c ? c : "");
    free(c);
}

static void add_str_or_null(cJSON *o, const char *k, const char *v) {
    if (v) cJSON_AddStringToObject(o, k, v);
    else cJSON_AddNullToObject(o, k);
}

static cJSON *event_new(job *j, const char *type) {
    disp *d = j->d;
    char ts[32];
    cJSON *o = cJSON_CreateObject();
    if (!o) return NULL;
    rfc3339(unix_ms(), ts);
    cJSON_AddStringToObject(o, "type", type);
    add_str_or_null(o, "run_id", d->run_id[0] ? d->run_id : NULL);
    add_str_or_null(o, "thread_id", ctx_thread_id(d->ctx));
    cJSON_AddStringToObject(o, "user_id", ctx_user_id(d->ctx));
    add_str_or_null(o, "agent_name", d->agent_name[0] ? d->agent_name : NULL);
    cJSON_AddStringToObject(o, "timestamp", ts);
    return o;
}

/* Sends an event to this request's sink (no lock is held here). */
static void emit(job *j, cJSON *ev) {
    if (!ev) return;
    disp_pool *p = j->d->pool;
    if (p->cfg.record_event && j->d->agent_name[0])
        p->cfg.record_event(p->cfg.record_ud, ev);
    if (j->d->sink.event) j->d->sink.event(j->d->sink.ud, ev);
    else cJSON_Delete(ev);
}

static const char *entry_name(job *j, int entry) {
    return j->d->pool->reg->items[entry].name;
}

static frame *frame_push(job *j, int entry, const cJSON *args) {
    frame *f = calloc(1, sizeof *f);
    if (!f) return NULL;
    f->entry = entry;
    ctx_new_id(f->call_id);
    f->args_shown = redacted_copy(args);
    f->started_ms = unix_ms();
    f->t0 = mono_exact_ms();
    f->up = j->frames;
    j->frames = f;

    cJSON *ev = event_new(j, "tool_executing");
    if (ev) {
        cJSON_AddStringToObject(ev, "tool_name", entry_name(j, entry));
        cJSON_AddStringToObject(ev, "tool_call_id", f->call_id);
        cJSON_AddItemToObject(ev, "arguments",
                              cJSON_Duplicate(f->args_shown, 1));
    }
    emit(j, ev);
    return f;
}

/* Ends the innermost frame: the tool_completed event (with `result`, a
 * CallToolResult, or an error {code, message}) and the analytics record.
 * status: "ok", "error", "budget", "cancelled". */
static void frame_pop(job *j, const cJSON *result, const char *status,
                      const char *error) {
    frame *f = j->frames;
    if (!f) return;
    j->frames = f->up;
    disp_pool *p = j->d->pool;
    const char *name = entry_name(j, f->entry);

    cJSON *ev = event_new(j, "tool_completed");
    if (ev) {
        cJSON_AddStringToObject(ev, "tool_name", name);
        cJSON_AddStringToObject(ev, "tool_call_id", f->call_id);
        if (result && strcmp(status, "budget") && strcmp(status, "cancelled")) {
            cJSON_AddItemToObject(ev, "results", cJSON_Duplicate(result, 1));
        } else {
            cJSON *e = cJSON_AddObjectToObject(ev, "error");
            cJSON_AddStringToObject(e, "code", status);
            add_text(e, "message", error ? error : status);
        }
    }
    emit(j, ev);

    if (p->cfg.record) {
        char *clean = error ? utf8_clean(error, strlen(error)) : NULL;
        char event_id[CTX_NEW_ID_LEN + 1];
        char *args = cJSON_PrintUnformatted(f->args_shown);
        ctx_new_id(event_id);
        disp_call_record rec = {
            .event_id = event_id,
            .user_id = ctx_user_id(j->d->ctx),
            .thread_id = ctx_thread_id(j->d->ctx),
            .run_id = j->d->run_id[0] ? j->d->run_id : NULL,
            .request_id = ctx_request_id(j->d->ctx),
            .tool_name = name,
            .tool_call_id = f->call_id,
            .agent_name = j->d->agent_name[0] ? j->d->agent_name : NULL,
            .status = status,
            .error = clean ? clean : error,
            .started_ms = f->started_ms,
            .duration_ms = mono_exact_ms() - f->t0,
            .arguments = args ? args : "{}",
        };
        p->cfg.record(p->cfg.record_ud, &rec);
        free(args);
        free(clean);
    }
    cJSON_Delete(f->args_shown);
    cJSON_Delete(f->args);
    free(f);
}

/* {content: [{type: "text", text}], isError?, structuredContent?}; the
 * text with invalid UTF-8 replaced. */
static cJSON *call_result(const char *text, cJSON *structured, bool error) {
    cJSON *r = cJSON_CreateObject();
    cJSON *content = cJSON_AddArrayToObject(r, "content");
    cJSON *item = cJSON_CreateObject();
    cJSON_AddStringToObject(item, "type", "text");
    add_text(item, "text", text ? text : "");
    cJSON_AddItemToArray(content, item);
    if (structured) cJSON_AddItemToObject(r, "structuredContent", structured);
    if (error) cJSON_AddBoolToObject(r, "isError", true);
    return r;
}

static const char *stop_status(sbx_stop stop) {
    switch (stop) {
    case SBX_STOP_TIME:
    case SBX_STOP_INSTRUCTIONS:
    case SBX_STOP_MEMORY: return "budget";
    case SBX_STOP_CANCELLED: return "cancelled";
    default: return "error";
    }
}

static cJSON *too_large(size_t n, int64_t limit) {
    char msg[200];
    snprintf(msg, sizeof msg, "result too large (%zu bytes; the limit is "
             "%lld) - return less or page it", n, (long long)limit);
    return call_result(msg, NULL, true);
}

/* A Lua number as text that reads back as the same value. */
static void number_text(lua_State *L, int idx, char *out, size_t size) {
    if (lua_isinteger(L, idx)) {
        snprintf(out, size, "%lld", (long long)lua_tointeger(L, idx));
        return;
    }
    double d = lua_tonumber(L, idx);
    snprintf(out, size, "%.15g", d);
    if (strtod(out, NULL) != d) snprintf(out, size, "%.17g", d);
}

/* Maps a handler's return values (n values from index first of L) to a
 * CallToolResult. *ok tells whether the result is a success. A result
 * whose text is longer than limit bytes (0: no limit) is an error. */
static cJSON *map_result(lua_State *L, int first, int n, const reg_entry *e,
                         int64_t limit, bool *ok) {
    char err[1024];
    int t = n > 0 ? lua_type(L, first) : LUA_TNIL;
    *ok = false;

    if (t == LUA_TNIL) {
        size_t len = 0;
        const char *msg = n > 1 && lua_type(L, first + 1) != LUA_TNIL
                              ? lua_tolstring(L, first + 1, &len)
                              : NULL;
        if (!msg)
            return call_result("the tool returned nothing (return a "
                               "string, a table, or nil and a message)",
                               NULL, true);
        char *clean = utf8_clean(msg, len < 8192 ? len : 8192);
        cJSON *r = call_result(clean ? clean : "(out of memory)", NULL,
                               true);
        free(clean);
        return r;
    }
    if (t == LUA_TTABLE) {
        cJSON *json = sbx_table_to_json(L, first, "result", err, sizeof err);
        if (!json || !cJSON_IsObject(json)) {
            if (json)
                snprintf(err, sizeof err, "result: a table with string "
                         "keys (an object) is needed, not an array");
            cJSON_Delete(json);
            return call_result(err, NULL, true);
        }
        if (e->out_schema &&
            !schema_validate(e->out_schema, json, "result", err,
                             sizeof err)) {
            char msg[1200];
            snprintf(msg, sizeof msg, "tool '%s' returned a result that "
                     "does not match its outputSchema: %s", e->name, err);
            cJSON_Delete(json);
            return call_result(msg, NULL, true);
        }
        char *text = cJSON_PrintUnformatted(json);
        size_t tl = text ? strlen(text) : 0;
        if (!text || (limit > 0 && (int64_t)tl > limit)) {
            free(text);
            cJSON_Delete(json);
            return text ? too_large(tl, limit)
                        : call_result("out of memory", NULL, true);
        }
        cJSON *r = call_result(text, json, false);
        free(text);
        *ok = true;
        return r;
    }
    if (e->out_schema) {
        snprintf(err, sizeof err, "tool '%s' has an outputSchema and must "
                 "return a table, not a %s", e->name, lua_typename(L, t));
        return call_result(err, NULL, true);
    }
    if (t == LUA_TSTRING) {
        size_t len, bad;
        const char *str = lua_tolstring(L, first, &len);
        if (limit > 0 && (int64_t)len > limit) return too_large(len, limit);
        if (!utf8_ok(str, len, &bad)) {
            if (str[bad] == 0)
                snprintf(err, sizeof err, "tool '%s' returned a string "
                         "holding a NUL byte (at byte %zu); results are "
                         "text - remove it, or return a table", e->name,
                         bad);
            else
                snprintf(err, sizeof err, "tool '%s' returned a string "
                         "that is not valid UTF-8 (at byte %zu) - return "
                         "text, or encode binary data (e.g. as base64)",
                         e->name, bad);
            return call_result(err, NULL, true);
        }
        *ok = true;
        return call_result(str, NULL, false);
    }
    if (t == LUA_TNUMBER || t == LUA_TBOOLEAN) {
        char num[64];
        if (t == LUA_TNUMBER) number_text(L, first, num, sizeof num);
        else snprintf(num, sizeof num, "%s",
                      lua_toboolean(L, first) ? "true" : "false");
        *ok = true;
        return call_result(num, NULL, false);
    }
    snprintf(err, sizeof err, "tool '%s' returned a %s; return a string, a "
             "table, or nil and a message", e->name, lua_typename(L, t));
    return call_result(err, NULL, true);
}

static const char *result_text(const cJSON *r) {
    const cJSON *c = cJSON_GetArrayItem(
        cJSON_GetObjectItemCaseSensitive(r, "content"), 0);
    const cJSON *t = cJSON_GetObjectItemCaseSensitive(c, "text");
    return cJSON_IsString(t) ? t->valuestring : "";
}

/* ---- ctx, inside the worker's Lua state -------------------------------------- */

/* A Lua ctx, its ctx.state and its ctx.clickhouse are userdata holding
 * the serial of the job they were made for. They work only while that
 * job runs: the job running now (sbx_current) must have that serial.
 * Identity always comes from the job's C-side context, never from Lua. */
#define CTX_MT "netra.ctx"
#define STATE_MT "netra.ctx.state"
#define CH_MT "netra.ctx.clickhouse"

typedef struct {
    uint64_t serial;
} ctx_box;

static atomic_uint_fast64_t job_serials = 1;

static job *current_job(lua_State *L) {
    sbx_request *req = sbx_current(L);
    return req ? sbx_request_ud(req) : NULL;
}

/* The job whose object (of metatable mt) is at idx, when it runs now;
 * raises otherwise (also when it was cancelled, if check_cancel). */
static job *owner_job(lua_State *L, int idx, const char *mt,
                      const char *what, bool check_cancel) {
    ctx_box *b = luaL_testudata(L, idx, mt);
    if (!b)
        luaL_error(L, "%s: call it as a method (with ':') on the ctx your "
                   "handler received", what);
    job *j = current_job(L);
    if (!j || j->serial != b->serial) luaL_error(L, "%s", STALE_CTX);
    if (check_cancel && atomic_load(&j->d->cancel))
        luaL_error(L, "%s", j->d->cancel_reason);
    return j;
}

static job *check_job(lua_State *L, const char *what) {
    return owner_job(L, 1, CTX_MT, what, true);
}

static int l_ctx_emit(lua_State *L) {
    job *j = check_job(L, "ctx:emit");
    size_t tlen;
    const char *type = luaL_checklstring(L, 2, &tlen);
    char err[512];
    bool plain = tlen > 0 && tlen <= 64 && utf8_ok(type, tlen, NULL);
    for (size_t i = 0; plain && i < tlen; i++)
        if ((unsigned char)type[i] < 0x20 || type[i] == 0x7f) plain = false;
    if (!plain)
        return luaL_error(L, "ctx:emit: the event type must be 1 to 64 "
                          "bytes of UTF-8 text without control characters");
    if (!strncmp(type, "tool_", 5) || !strncmp(type, "agent_", 6))
        return luaL_error(L, "ctx:emit: type '%s' is reserved for netra's "
                          "own events; choose another name", type);
    cJSON *data = NULL;
    if (!lua_isnoneornil(L, 3)) {
        data = sbx_table_to_json(L, 3, "data", err, sizeof err);
        if (!data) return luaL_error(L, "ctx:emit: %s", err);
    }
    cJSON *ev = event_new(j, type);
    if (ev && data) cJSON_AddItemToObject(ev, "data", data);
    else cJSON_Delete(data);
    emit(j, ev);
    return 0;
}

static int l_ctx_think(lua_State *L) {
    job *j = check_job(L, "ctx:think");
    const char *text = luaL_checkstring(L, 2);
    if (!j->agent)
        return luaL_error(L, "ctx:think: only agents think aloud; a tool "
                          "may use ctx:log or ctx:emit");
    cJSON *ev = event_new(j, "agent_thinking");
    if (ev) add_text(ev, "text", text);
    emit(j, ev);
    return 0;
}

static int l_ctx_progress(lua_State *L) {
    job *j = check_job(L, "ctx:progress");
    lua_Number done = luaL_checknumber(L, 2);
    bool has_total = !lua_isnoneornil(L, 3);
    lua_Number total = has_total ? luaL_checknumber(L, 3) : 0;
    const char *msg = luaL_optstring(L, 4, NULL);

    if (!j->progress_token || !j->d->sink.progress ||
        (j->any_progress && done <= j->last_progress)) {
        lua_pushboolean(L, 0);
        return 1;
    }
    j->any_progress = true;
    j->last_progress = done;
    cJSON *p = cJSON_CreateObject();
    cJSON_AddItemToObject(p, "progressToken",
                          cJSON_Duplicate(j->progress_token, 1));
    cJSON_AddNumberToObject(p, "progress", done);
    if (has_total) cJSON_AddNumberToObject(p, "total", total);
    if (msg) add_text(p, "message", msg);
    j->d->sink.progress(j->d->sink.ud, p);
    lua_pushboolean(L, 1);
    return 1;
}

static int l_ctx_log(lua_State *L) {
    job *j = check_job(L, "ctx:log");
    const char *level = luaL_checkstring(L, 2);
    const char *msg = luaL_checkstring(L, 3);
    log_level lv;
    if (!log_parse_level(level, &lv))
        return luaL_error(L, "ctx:log: level '%s' - use debug, info, warn "
                          "or error", level);
    const char *tool = j->frames ? entry_name(j, j->frames->entry)
                                 : j->d->agent_name;
    log_req(lv, "Tool", ctx_request_id(j->d->ctx),
            j->d->run_id[0] ? j->d->run_id : NULL, "[%s] user %s: %.4000s",
            tool, ctx_user_id(j->d->ctx), msg);
    return 0;
}

/* Validates a nested call's arguments; pushes nil, message and returns
 * NULL when they are invalid. */
static cJSON *nested_args(lua_State *L, const reg_entry *e, char *err,
                          size_t size) {
    cJSON *args;
    if (lua_isnoneornil(L, 3)) args = cJSON_CreateObject();
    else args = sbx_table_to_json(L, 3, "arguments", err, size);
    if (args && !cJSON_IsObject(args)) {
        snprintf(err, size, "arguments: expected an object");
        cJSON_Delete(args);
        return NULL;
    }
    if (args && !schema_validate(e->in_schema, args, "arguments", err, size)) {
        cJSON_Delete(args);
        return NULL;
    }
    return args;
}

/* After the nested handler: stack is [ctx, results...] or [ctx, err]. */
static int call_k(lua_State *L, int status, lua_KContext kctx) {
    job *j = current_job(L);
    const reg_entry *e = &j->d->pool->reg->items[(int)kctx];
    int n = lua_gettop(L) - 1;
    j->depth--;

    if (status != LUA_OK && status != LUA_YIELD) {
        char msg[1200];
        snprintf(msg, sizeof msg, "tool '%s' failed: %s", e->name,
                 lua_tostring(L, -1) ? lua_tostring(L, -1)
                                     : "(error object is not a string)");
        cJSON *r = call_result(msg, NULL, true);
        frame_pop(j, r, "error", msg);
        cJSON_Delete(r);
        lua_pushnil(L);
        lua_pushstring(L, msg);
        return 2;
    }

    bool ok;
    cJSON *r = map_result(L, 2, n, e, 0, &ok);
    frame_pop(j, r, ok ? "ok" : "error", ok ? NULL : result_text(r));
    if (ok) {
        lua_settop(L, 2);
        cJSON_Delete(r);
        return 1;
    }
    lua_settop(L, 1);
    lua_pushnil(L);
    lua_pushstring(L, result_text(r));
    cJSON_Delete(r);
    return 2;
}

/* ctx:call(tool, args): the other tool's handler, inline. */
static int l_ctx_call(lua_State *L) {
    job *j = check_job(L, "ctx:call");
    const char *name = luaL_checkstring(L, 2);
    disp_registry *reg = j->d->pool->reg;
    int entry = find_entry(reg, name, false);
    char err[1024];

    if (entry < 0) {
        lua_pushnil(L);
        lua_pushfstring(L, "ctx:call: unknown tool '%s'", name);
        return 2;
    }
    if (j->depth >= DISP_MAX_DEPTH) {
        lua_pushnil(L);
        lua_pushfstring(L, "ctx:call: calls nest at most %d deep; '%s' "
                        "would be deeper", DISP_MAX_DEPTH, name);
        return 2;
    }
    const reg_entry *e = &reg->items[entry];
    cJSON *args = nested_args(L, e, err, sizeof err);
    if (!args) {
        char ignored[64];
        cJSON *shown = lua_istable(L, 3) ? sbx_table_to_json(
                           L, 3, "arguments", ignored, sizeof ignored)
                                         : NULL;
        frame_push(j, entry, shown);
        cJSON_Delete(shown);
        cJSON *r = call_result(err, NULL, true);
        frame_pop(j, r, "error", err);
        cJSON_Delete(r);
        lua_pushnil(L);
        lua_pushstring(L, err);
        return 2;
    }
    frame *f = frame_push(j, entry, args);
    if (!f) {
        cJSON_Delete(args);
        return luaL_error(L, "ctx:call: out of memory");
    }
    f->args = args; /* freed with the frame, also if a push below raises */

    lua_settop(L, 1);
    if (sbx_push_handler(j->w->s, L, j->w->refs[entry]) != 0)
        return luaL_error(L, "ctx:call: tool '%s' is not loaded", name);
    lua_pushvalue(L, 1);
    sbx_push_json(L, f->args);
    j->depth++;
    int status = lua_pcallk(L, 2, LUA_MULTRET, 0, (lua_KContext)entry,
                            call_k);
    return call_k(L, status, (lua_KContext)entry);
}

/* ---- ctx.clickhouse ------------------------------------------------------------ */

static void push_ch_value(lua_State *L, const ch_value *v) {
    luaL_checkstack(L, 3, "ClickHouse value nested too deeply");
    switch (v->kind) {
    case CH_BOOL: lua_pushboolean(L, v->u.b); break;
    case CH_INT: lua_pushinteger(L, (lua_Integer)v->u.i); break;
    case CH_FLOAT: lua_pushnumber(L, v->u.f); break;
    case CH_STRING: lua_pushlstring(L, v->u.s.ptr, v->u.s.len); break;
    case CH_ARRAY:
        lua_createtable(L, (int)v->u.a.len, 0);
        for (size_t i = 0; i < v->u.a.len; i++) {
            push_ch_value(L, &v->u.a.items[i]);
            lua_rawseti(L, -2, (lua_Integer)i + 1);
        }
        break;
    default: lua_pushnil(L); break;
    }
}

typedef struct {
    ch_result *res;
    const char *error;
} ch_answer;

/* Pushes rows as an array of {column = value} tables, or nil, error. */
static int push_answer(lua_State *L, void *ud) {
    ch_answer *a = ud;
    if (!a->res) {
        lua_pushnil(L);
        lua_pushstring(L, a->error);
        return 2;
    }
    lua_createtable(L, (int)a->res->nrows, 0);
    for (size_t r = 0; r < a->res->nrows; r++) {
        lua_createtable(L, 0, (int)a->res->ncols);
        for (size_t c = 0; c < a->res->ncols; c++) {
            push_ch_value(L, ch_cell(a->res, r, c));
            lua_setfield(L, -2, a->res->columns[c].name);
        }
        lua_rawseti(L, -2, (lua_Integer)r + 1);
    }
    return 1;
}

/* The user id as it may appear inside an SQL comment. */
static void comment_safe(const char *in, char *out, size_t size) {
    size_t n = 0;
    for (; *in && n + 1 < size; in++)
        out[n++] = isalnum((unsigned char)*in) || *in == '_' || *in == '-' ||
                           *in == '.' || *in == '@'
                       ? *in
                       : '_';
    out[n] = 0;
}

/* Skips blanks and comments (-- to end of line, slash-star to star-slash). */
static const char *skip_blank(const char *p) {
    for (;;) {
        while (isspace((unsigned char)*p)) p++;
        if (p[0] == '-' && p[1] == '-') {
            while (*p && *p != '\n') p++;
        } else if (p[0] == '/' && p[1] == '*') {
            const char *e = strstr(p + 2, "*/");
            p = e ? e + 2 : p + strlen(p);
        } else {
            return p;
        }
    }
}

/* A guard, not a parser: refuses statements that do not start with
 * SELECT, WITH, SHOW, DESCRIBE/DESC or EXISTS, and any call of a table
 * function that reaches outside the server's own tables (url(, file(,
 * remote(, s3(, ...) outside string literals and quoted names. Returns
 * false with why filled. */
static bool sql_guard(const char *sql, char *why, size_t size) {
    static const char *const first_ok[] = {"select", "with", "show",
                                           "describe", "desc", "exists",
                                           NULL};
    static const char *const table_fns[] = {
        "url", "urlcluster", "file", "filecluster", "remote",
        "remotesecure", "cluster", "clusterallreplicas", "s3",
        "s3cluster", "gcs", "cosn", "oss", "mysql", "postgresql", "jdbc",
        "odbc", "hdfs", "hdfscluster", "input", "executable", "mongodb",
        "redis", "sqlite", "azureblobstorage", "deltalake", "hudi",
        "iceberg", "dictionary", "merge", NULL};
    const char *p = skip_blank(sql);
    size_t n = 0;
    while (isalpha((unsigned char)p[n])) n++;
    bool ok = false;
    for (int i = 0; first_ok[i] && !ok; i++)
        ok = n == strlen(first_ok[i]) && !strncasecmp(p, first_ok[i], n);
    if (!ok) {
        snprintf(why, size, "ctx.clickhouse is read-only: only SELECT, "
                 "WITH, SHOW, DESCRIBE and EXISTS statements are allowed "
                 "(the query "
                 "starts with '%.*s')", (int)(n < 20 ? n : 20), p);
        return false;
    }

    while (*p) {
        p = skip_blank(p);
        if (*p == '\'' || *p == '"' || *p == '`') {
            char q = *p++;
            while (*p && *p != q) p += p[0] == '\\' && p[1] ? 2 : 1;
            if (*p) p++;
        } else if (isalpha((unsigned char)*p) || *p == '_') {
            const char *w = p;
            while (isalnum((unsigned char)*p) || *p == '_') p++;
            size_t wl = (size_t)(p - w);
            const char *after = skip_blank(p);
            if (*after != '(') continue;
            for (int i = 0; table_fns[i]; i++) {
                if (wl == strlen(table_fns[i]) &&
                    !strncasecmp(w, table_fns[i], wl)) {
                    snprintf(why, size, "ctx.clickhouse: the table function "
                             "'%s' is not allowed in tool queries (it "
                             "reaches outside the server's tables)",
                             table_fns[i]);
                    return false;
                }
            }
        } else if (*p) {
            p++;
        }
    }
    return true;
}

static int l_ch_query(lua_State *L) {
    job *j = owner_job(L, 1, CH_MT, "ctx.clickhouse:query", true);
    const char *sql = luaL_checkstring(L, 2);
    worker *w = j->w;
    ch_error ce;
    char why[256];

    if (!sql_guard(sql, why, sizeof why)) {
        lua_pushnil(L);
        lua_pushstring(L, why);
        return 2;
    }

    if (!w->pool->ch_on || !w->ch) {
        lua_pushnil(L);
        lua_pushstring(L, CH_NOT_CONNECTED);
        return 2;
    }
    if (!lua_isyieldable(L))
        return luaL_error(L, "ctx.clickhouse:query cannot wait here (inside "
                          "a C function such as string.gsub or table.sort)"
                          ": call it from plain Lua code");
    /* TODO: the first query of a worker connects with a blocking request
     * (ch_connect has no non-blocking form); later ones never block. */
    if (!ch_connected(w->ch) && ch_connect(w->ch, &ce) != CH_OK) {
        lua_pushnil(L);
        lua_pushstring(L, ce.message);
        return 2;
    }

    char user[128], qid[80], uuid[CTX_NEW_ID_LEN + 1];
    comment_safe(ctx_user_id(j->d->ctx), user, sizeof user);
    ctx_new_id(uuid);
    snprintf(qid, sizeof qid, "netra-%s", uuid);
    lua_pushfstring(L, "/* netra user=%s */ %s", user, sql);
    int64_t left = sbx_request_deadline_ms(j->req) - mono_ms();
    ch_query_opts o = {.query_id = qid,
                       .readonly = true,
                       .timeout_ms = left > 0 && left < 3600000 ? left : 0};
    ch_request *r = ch_request_query(w->ch, lua_tostring(L, -1), &o, &ce);
    lua_pop(L, 1);
    if (!r || ch_request_start(r, w->multi, &ce) != CH_OK) {
        ch_request_free(r);
        lua_pushnil(L);
        lua_pushstring(L, ce.message);
        return 2;
    }
    log_req(NLOG_DEBUG, "ClickHouse", ctx_request_id(j->d->ctx),
            j->d->run_id[0] ? j->d->run_id : NULL,
            "read-only query %s for user %s", qid, ctx_user_id(j->d->ctx));
    j->chq = r;
    return sbx_wait(L, r, 0, NULL);
}

static int l_ch_quote(lua_State *L) {
    size_t len;
    const char *s = luaL_checklstring(L, 1, &len);
    char *q = ch_quote(s, len);
    if (!q) return luaL_error(L, "out of memory");
    lua_pushstring(L, q);
    free(q);
    return 1;
}

static int l_ch_index(lua_State *L) {
    owner_job(L, 1, CH_MT, "ctx.clickhouse", false);
    const char *k = lua_tostring(L, 2);
    if (k && !strcmp(k, "query")) lua_pushcfunction(L, l_ch_query);
    else if (k && !strcmp(k, "quote")) lua_pushcfunction(L, l_ch_quote);
    else lua_pushnil(L);
    return 1;
}

static int l_ch_newindex(lua_State *L) {
    return luaL_error(L, "ctx.clickhouse is read-only");
}

static int l_ctx_newindex(lua_State *L) {
    return luaL_error(L, "ctx is read-only: keep your own data in locals "
                      "or in ctx.state");
}

static void push_id(lua_State *L, const char *v) {
    if (v) lua_pushstring(L, v);
    else lua_pushnil(L);
}

/* ctx.<key>: the ids (from the job's C-side context), state, clickhouse,
 * or a method (upvalue 1: the methods table). */
static int l_ctx_index(lua_State *L) {
    job *j = owner_job(L, 1, CTX_MT, "ctx", false);
    const char *k = lua_tostring(L, 2);
    disp *d = j->d;
    if (!k) lua_pushnil(L);
    else if (!strcmp(k, "user_id")) push_id(L, ctx_user_id(d->ctx));
    else if (!strcmp(k, "thread_id")) push_id(L, ctx_thread_id(d->ctx));
    else if (!strcmp(k, "run_id")) push_id(L, d->run_id[0] ? d->run_id : NULL);
    else if (!strcmp(k, "request_id")) push_id(L, ctx_request_id(d->ctx));
    else if (!strcmp(k, "state")) lua_getiuservalue(L, 1, 1);
    else if (!strcmp(k, "clickhouse")) lua_getiuservalue(L, 1, 2);
    else lua_getfield(L, lua_upvalueindex(1), k);
    return 1;
}

/* ctx.state: a table of the request's own, behind a userdata that only
 * its request may use (uservalue 1: the table). */
static int l_state_index(lua_State *L) {
    owner_job(L, 1, STATE_MT, "ctx.state", false);
    lua_getiuservalue(L, 1, 1);
    lua_pushvalue(L, 2);
    lua_rawget(L, -2);
    return 1;
}

static int l_state_newindex(lua_State *L) {
    owner_job(L, 1, STATE_MT, "ctx.state", false);
    lua_getiuservalue(L, 1, 1);
    lua_pushvalue(L, 2);
    lua_pushvalue(L, 3);
    lua_rawset(L, -3);
    return 0;
}

static int l_state_len(lua_State *L) {
    owner_job(L, 1, STATE_MT, "ctx.state", false);
    lua_getiuservalue(L, 1, 1);
    lua_pushinteger(L, (lua_Integer)lua_rawlen(L, -1));
    return 1;
}

static int l_state_next(lua_State *L) {
    lua_settop(L, 2);
    return lua_next(L, 1) ? 2 : (lua_pushnil(L), 1);
}

static int l_state_pairs(lua_State *L) {
    owner_job(L, 1, STATE_MT, "ctx.state", false);
    lua_pushcfunction(L, l_state_next);
    lua_getiuservalue(L, 1, 1);
    lua_pushnil(L);
    return 3;
}

/* Makes the three metatables the first time in this Lua state (a
 * rebuilt state has none). */
static void make_metatables(lua_State *L) {
    if (luaL_newmetatable(L, CTX_MT)) {
        static const luaL_Reg methods[] = {
            {"emit", l_ctx_emit}, {"progress", l_ctx_progress},
            {"log", l_ctx_log},   {"call", l_ctx_call},
            {"think", l_ctx_think}, {NULL, NULL}};
        luaL_newlib(L, methods);
        lua_pushcclosure(L, l_ctx_index, 1);
        lua_setfield(L, -2, "__index");
        lua_pushcfunction(L, l_ctx_newindex);
        lua_setfield(L, -2, "__newindex");
        lua_pushliteral(L, "locked");
        lua_setfield(L, -2, "__metatable");
    }
    lua_pop(L, 1);
    if (luaL_newmetatable(L, STATE_MT)) {
        static const luaL_Reg mm[] = {
            {"__index", l_state_index}, {"__newindex", l_state_newindex},
            {"__len", l_state_len}, {"__pairs", l_state_pairs},
            {NULL, NULL}};
        luaL_setfuncs(L, mm, 0);
        lua_pushliteral(L, "locked");
        lua_setfield(L, -2, "__metatable");
    }
    lua_pop(L, 1);
    if (luaL_newmetatable(L, CH_MT)) {
        lua_pushcfunction(L, l_ch_index);
        lua_setfield(L, -2, "__index");
        lua_pushcfunction(L, l_ch_newindex);
        lua_setfield(L, -2, "__newindex");
        lua_pushliteral(L, "locked");
        lua_setfield(L, -2, "__metatable");
    }
    lua_pop(L, 1);
}

static void push_box(lua_State *L, uint64_t serial, int nuv, const char *mt) {
    ctx_box *b = lua_newuserdatauv(L, sizeof *b, nuv);
    b->serial = serial;
    luaL_setmetatable(L, mt);
}

/* sbx_push_fn: ctx and the arguments (or input). */
static int push_ctx_args(lua_State *L, void *ud) {
    job *j = ud;
    make_metatables(L);
    push_box(L, j->serial, 2, CTX_MT);
    push_box(L, j->serial, 1, STATE_MT);
    lua_newtable(L);
    lua_setiuservalue(L, -2, 1);
    lua_setiuservalue(L, -2, 1);
    push_box(L, j->serial, 0, CH_MT);
    lua_setiuservalue(L, -2, 2);
    sbx_push_json(L, j->args);
    return 2;
}

/* ---- jobs on a worker ---------------------------------------------------------- */

static void disp_finished(disp *d);

static void job_unlink(worker *w, job *j) {
    if (j->prev) j->prev->next = j->next;
    else w->active = j->next;
    if (j->next) j->next->prev = j->prev;
    j->next = j->prev = NULL;
}

/* Ends a job: events, record, accounting, then the sink's done. The
 * values of a DONE request are read before it is freed. */
static void job_finish(worker *w, job *j) {
    disp *d = j->d;
    disp_pool *p = w->pool;
    const reg_entry *e = &p->reg->items[j->entry];
    cJSON *done = NULL;
    bool cancelled = atomic_load(&d->cancel);

    if (j->chq) {
        ch_request_free(j->chq);
        j->chq = NULL;
    }
    const char *error = NULL, *status = "ok";
    char msg[1200] = "";
    lua_State *co = NULL;
    int n = -1;
    if (j->req && sbx_resume(j->req, NULL, NULL) == SBX_FAILED) {
        error = sbx_request_error(j->req);
        status = stop_status(sbx_request_stop(j->req));
    } else if (j->req) {
        n = sbx_request_results(j->req, &co);
    } else if (j->pre_error) {
        error = j->pre_error;
    } else {
        error = cancelled ? d->cancel_reason : "the request did not start";
        status = cancelled ? "cancelled" : "error";
    }
    if (cancelled && j->agent) {
        error = d->cancel_reason;
        status = "cancelled";
    }

    /* Frames of nested calls that never returned end with the error (for
     * an agent every frame is a nested call). */
    while (j->frames && (j->agent || j->frames->up)) {
        cJSON *r = call_result(error ? error : "stopped", NULL, true);
        frame_pop(j, r, error ? status : "error", error ? error : "stopped");
        cJSON_Delete(r);
    }

    if (!j->agent) {
        bool ok = false;
        if (n >= 0 && co) {
            done = map_result(co, lua_gettop(co) - n + 1, n, e,
                              p->cfg.max_result_bytes, &ok);
        } else {
            snprintf(msg, sizeof msg, "%s", error ? error : "failed");
            done = call_result(msg, NULL, true);
            if (!strcmp(status, "ok")) status = "error";
        }
        if (!ok && n >= 0) status = "error";
        frame_pop(j, done, status, ok ? NULL : result_text(done));
    } else {
        cJSON *ev;
        if (!error && n >= 0 && co && n > 0 &&
            lua_type(co, lua_gettop(co) - n + 1) != LUA_TNIL) {
            int first = lua_gettop(co) - n + 1;
            size_t slen = 0, bad = 0;
            const char *str = lua_type(co, first) == LUA_TSTRING
                                  ? lua_tolstring(co, first, &slen)
                                  : NULL;
            bool str_ok = str && utf8_ok(str, slen, &bad);
            cJSON *res = lua_type(co, first) == LUA_TTABLE
                             ? sbx_table_to_json(co, first, "result", msg,
                                                 sizeof msg)
                         : str_ok ? cJSON_CreateString(str)
                                  : NULL;
            if (!res && !msg[0] && str)
                snprintf(msg, sizeof msg, "agent '%s' returned a string "
                         "that is not valid UTF-8 or holds NUL (at byte "
                         "%zu)", e->name, bad);
            else if (!res && !msg[0])
                snprintf(msg, sizeof msg, "agent '%s' returned a %s; return "
                         "a table or a string", e->name,
                         luaL_typename(co, first));
            char *rt = res ? cJSON_PrintUnformatted(res) : NULL;
            size_t rl = rt ? strlen(rt) : 0;
            free(rt);
            if (res && (int64_t)rl > p->cfg.max_result_bytes) {
                snprintf(msg, sizeof msg, "result too large (%zu bytes; the "
                         "limit is %lld) - return less or page it", rl,
                         (long long)p->cfg.max_result_bytes);
                cJSON_Delete(res);
                res = NULL;
            }
            if (res) {
                ev = event_new(j, "agent_completed");
                cJSON_AddItemToObject(ev, "result", res);
            } else {
                error = msg;
                status = "error";
                ev = NULL;
            }
            if (ev) {
                emit(j, ev);
                goto agent_done;
            }
        } else if (!error) {
            const char *m = n > 1 && co ? lua_tostring(co, lua_gettop(co) - n + 2)
                                        : NULL;
            snprintf(msg, sizeof msg, "%s", m ? m : "the agent returned nil");
            error = msg;
        }
        ev = event_new(j, "agent_error");
        cJSON *err = cJSON_AddObjectToObject(ev, "error");
        cJSON_AddStringToObject(err, "code", status);
        add_text(err, "message", error);
        emit(j, ev);
    agent_done:;
    }

    sbx_request_free(j->req);
    j->req = NULL;
    job_unlink(w, j);
    atomic_fetch_sub(&w->load, 1);
    user_leave(p, j->user_key);
    atomic_fetch_sub(&p->in_flight, 1);
    if (p->cfg.requests_changed) p->cfg.requests_changed(p->cfg.counter_ud, -1);

    cJSON_Delete(j->args);
    cJSON_Delete(j->progress_token);
    free(j->pre_error);
    free(j);
    if (d->sink.done) d->sink.done(d->sink.ud, done);
    else cJSON_Delete(done);
    disp_finished(d);
}

/* Runs a job until it waits or ends. */
static void job_run(worker *w, job *j, sbx_push_fn push, void *ud) {
    sbx_status st = sbx_resume(j->req, push, ud);
    if (st == SBX_YIELDED && sbx_request_wait_token(j->req) &&
        sbx_request_wait_token(j->req) == j->chq)
        return;
    if (st == SBX_YIELDED) {
        /* waiting on something that is not ours: cannot happen */
        sbx_cancel(j->req, "the request waited on an unknown operation");
    }
    job_finish(w, j);
}

static void job_start(worker *w, job *j) {
    disp *d = j->d;
    const reg_entry *e = &w->pool->reg->items[j->entry];
    char err[1024];

    j->prev = NULL;
    j->next = w->active;
    if (w->active) w->active->prev = j;
    w->active = j;

    if (j->agent) {
        cJSON *ev = event_new(j, "agent_started");
        if (ev) cJSON_AddItemToObject(ev, "input", redacted_copy(j->args));
        emit(j, ev);
    } else {
        frame_push(j, j->entry, j->args);
    }
    if (atomic_load(&d->cancel)) {
        job_finish(w, j);
        return;
    }
    if (!j->agent &&
        !schema_validate(e->in_schema, j->args, "arguments", err,
                         sizeof err)) {
        j->pre_error = strdup(err); /* the handler never runs */
        job_finish(w, j);
        return;
    }

    sbx_request_opts o = {.request_id = ctx_request_id(d->ctx),
                          .run_id = d->run_id[0] ? d->run_id : NULL,
                          .ud = j,
                          .cancel = &d->cancel,
                          .cancel_reason = d->cancel_reason};
    j->req = sbx_start(w->s, e->name, w->refs[j->entry], push_ctx_args, j,
                       &o, err, sizeof err);
    if (!j->req) {
        log_req(NLOG_ERROR, "Dispatcher", o.request_id, o.run_id, "%s", err);
        job_finish(w, j);
        return;
    }
    job_run(w, j, NULL, NULL);
}

/* A ClickHouse transfer ended. */
static void on_transfer(worker *w, CURLMsg *m) {
    ch_request *r = ch_request_of(m->easy_handle);
    job *j = w->active;
    while (j && j->chq != r) j = j->next;
    if (!j) return;

    ch_error ce;
    memset(&ce, 0, sizeof ce);
    int rc = ch_request_finish(r, m->data.result, &ce);
    if (rc == CH_AGAIN) return;
    ch_answer a = {.res = rc == CH_OK ? ch_request_take_result(r) : NULL,
                   .error = ce.message[0] ? ce.message : "query failed"};
    ch_request_free(r);
    j->chq = NULL;
    job_run(w, j, push_answer, &a);
    ch_result_free(a.res);
}

/* Marks a request cancelled because the pool shuts down. */
static void mark_shutdown(disp *d) {
    pthread_mutex_lock(&d->lock);
    if (!atomic_load(&d->cancel))
        snprintf(d->cancel_reason, sizeof d->cancel_reason,
                 "cancelled: the dispatcher is shutting down");
    atomic_store(&d->cancel, true);
    pthread_mutex_unlock(&d->lock);
}

/* Cancels what was asked to stop, and what waited past its budget. */
static void sweep(worker *w, bool stopping, int64_t *next_deadline) {
    int64_t now = mono_ms();
    job *j = w->active;
    *next_deadline = INT64_MAX;
    while (j) {
        job *next = j->next;
        bool cancel = atomic_load(&j->d->cancel) || stopping;
        int64_t dl = sbx_request_deadline_ms(j->req);
        if (cancel || now >= dl) {
            if (j->chq) {
                ch_request_free(j->chq);
                j->chq = NULL;
            }
            if (cancel) {
                if (stopping) mark_shutdown(j->d);
                sbx_cancel(j->req, j->d->cancel_reason);
            }
            job_finish(w, j); /* a late one fails with its time budget */
        } else if (dl < *next_deadline) {
            *next_deadline = dl;
        }
        j = next;
    }
}

static int worker_init(worker *w, char *err, size_t size) {
    disp_pool *p = w->pool;
    sbx_config sc = {.lua_dir = p->reg->lua_dir,
                     .defaults = {p->cfg.time_ms, p->cfg.instructions,
                                  p->cfg.memory_bytes},
                     .hook = p->cfg.timer_hook ? SBX_HOOK_TIMER
                                               : SBX_HOOK_COUNT,
                     .stop = &p->stopping};
    w->s = sbx_new(&sc, err, size);
    if (!w->s) return -1;
    w->refs = calloc((size_t)p->reg->n + 1, sizeof *w->refs);
    if (!w->refs) {
        snprintf(err, size, "out of memory");
        return -1;
    }
    for (int i = 0; i < p->reg->n; i++) {
        sbx_tool_def def;
        const reg_entry *e = &p->reg->items[i];
        int rc = e->agent ? sbx_load_agent(w->s, e->path, &def, err, size)
                          : sbx_load_tool(w->s, e->path, &def, err, size);
        if (rc != 0) return -1;
        w->refs[i] = def.handler_ref;
        sbx_tool_def_free(&def);
    }
    w->multi = curl_multi_init();
    if (!w->multi) {
        snprintf(err, size, "cannot create a curl multi handle");
        return -1;
    }
    if (p->ch_on) {
        ch_options o = {.connect_timeout_ms = 2000,
                        .max_response_bytes = DISP_CH_MAX_RESPONSE};
        w->ch = ch_client_new(&p->ch, &o);
    }
    return 0;
}

/* When user's job last started on this worker (0: not lately). */
static uint64_t served_at(const worker *w, const char *user) {
    for (int i = 0; i < RECENT_USERS; i++)
        if (w->recent_seq[i] && !strcmp(w->recent[i], user))
            return w->recent_seq[i];
    return 0;
}

static void note_served(worker *w, const char *user) {
    int slot = 0;
    for (int i = 0; i < RECENT_USERS; i++) {
        if (w->recent_seq[i] && !strcmp(w->recent[i], user)) {
            slot = i;
            break;
        }
        if (w->recent_seq[i] < w->recent_seq[slot]) slot = i;
    }
    snprintf(w->recent[slot], sizeof w->recent[slot], "%s", user);
    w->recent_seq[slot] = ++w->seq;
}

/* Takes the next job off the queue (w->lock held): the first one whose
 * user was served longest ago, so that one user's flood of calls cannot
 * keep another user's call waiting behind all of it. */
static job *take_job(worker *w) {
    job *best = NULL, *best_prev = NULL, *prev = NULL;
    uint64_t best_at = UINT64_MAX;
    for (job *j = w->queue; j; prev = j, j = j->next) {
        uint64_t at = served_at(w, j->user_key);
        if (at < best_at) {
            best = j;
            best_prev = prev;
            best_at = at;
            if (at == 0) break;
        }
    }
    if (!best) return NULL;
    if (best_prev) best_prev->next = best->next;
    else w->queue = best->next;
    if (w->queue_tail == best) w->queue_tail = best_prev;
    best->next = NULL;
    note_served(w, best->user_key);
    return best;
}

static void *worker_main(void *arg) {
    worker *w = arg;
    char err[1024] = "";
    int rc = worker_init(w, err, sizeof err);

    pthread_mutex_lock(&w->lock);
    w->init = rc == 0 ? 1 : -1;
    snprintf(w->init_err, sizeof w->init_err, "%s", err);
    pthread_cond_broadcast(&w->init_cond);
    pthread_mutex_unlock(&w->lock);
    if (rc != 0) return NULL;

    for (;;) {
        pthread_mutex_lock(&w->lock);
        job *in = take_job(w);
        bool stop = w->stop;
        bool more = w->queue != NULL;
        pthread_mutex_unlock(&w->lock);

        if (in) {
            if (stop) mark_shutdown(in->d);
            job_start(w, in);
        }

        int running = 0, left;
        curl_multi_perform(w->multi, &running);
        CURLMsg *m;
        while ((m = curl_multi_info_read(w->multi, &left)))
            if (m->msg == CURLMSG_DONE) on_transfer(w, m);

        int64_t deadline;
        sweep(w, stop, &deadline);
        if (stop && !w->active) {
            pthread_mutex_lock(&w->lock);
            bool empty = !w->queue;
            pthread_mutex_unlock(&w->lock);
            if (empty) break;
            continue;
        }

        int64_t wait = more ? 0 : POLL_MAX_MS;
        if (deadline != INT64_MAX) {
            int64_t d = deadline - mono_ms();
            wait = d < 0 ? 0 : d < wait ? d : wait;
        }
        curl_multi_poll(w->multi, NULL, 0, (int)wait, NULL);
    }
    return NULL;
}

/* ---- pool ------------------------------------------------------------------------ */

static const char *url_get(void *ud, const char *key) {
    return !strcmp(key, "CLICKHOUSE_URL") ? ud : NULL;
}

static void worker_free(worker *w) {
    if (w->ch) ch_client_free(w->ch);
    if (w->multi) curl_multi_cleanup(w->multi);
    sbx_free(w->s);
    free(w->refs);
    pthread_mutex_destroy(&w->lock);
    pthread_cond_destroy(&w->init_cond);
}

static void stop_workers(disp_pool *p) {
    atomic_store(&p->stopping, true); /* running handlers stop at once */
    for (int i = 0; i < p->nworkers; i++) {
        worker *w = &p->workers[i];
        if (!w->thread_ok) continue;
        pthread_mutex_lock(&w->lock);
        w->stop = true;
        pthread_mutex_unlock(&w->lock);
        if (w->multi) curl_multi_wakeup(w->multi);
    }
    for (int i = 0; i < p->nworkers; i++) {
        worker *w = &p->workers[i];
        if (w->thread_ok) pthread_join(w->th, NULL);
        worker_free(w);
    }
}

disp_pool *disp_pool_new(disp_registry *reg, const disp_pool_config *cfg,
                         char *err, size_t err_size) {
    disp_pool_config def;
    memset(&def, 0, sizeof def);
    if (!cfg) cfg = &def;
    if (!reg) {
        snprintf(err, err_size, "dispatcher: a registry is required");
        return NULL;
    }
    disp_pool *p = calloc(1, sizeof *p);
    if (!p) {
        snprintf(err, err_size, "dispatcher: out of memory");
        return NULL;
    }
    p->cfg = *cfg;
    p->cfg.clickhouse_url = NULL; /* not kept: parsed below */
    if (p->cfg.workers <= 0) {
        long n = sysconf(_SC_NPROCESSORS_ONLN);
        p->cfg.workers = n > 0 ? (int)n : 1;
    }
    if (p->cfg.queue_max <= 0) p->cfg.queue_max = 256;
    if (p->cfg.max_inflight_per_user <= 0) p->cfg.max_inflight_per_user = 16;
    if (p->cfg.max_result_bytes <= 0)
        p->cfg.max_result_bytes = DISP_MAX_RESULT_DEFAULT;
    atomic_init(&p->stopping, false);
    pthread_mutex_init(&p->lock, NULL);

    char warn[256] = "", why[512] = "";
    int crc = CH_UNSET;
    if (cfg->clickhouse_url && cfg->clickhouse_url[0])
        crc = ch_settings_parse(&p->ch, url_get, (void *)cfg->clickhouse_url,
                                warn, sizeof warn, why, sizeof why);
    else if (cfg->clickhouse_get)
        crc = ch_settings_parse(&p->ch, cfg->clickhouse_get,
                                cfg->clickhouse_get_ud, warn, sizeof warn, why,
                                sizeof why);
    if (crc == CH_ERR) {
        snprintf(err, err_size, "dispatcher: ClickHouse settings: %s", why);
        pthread_mutex_destroy(&p->lock);
        free(p);
        return NULL;
    }
    p->ch_on = crc == CH_OK;
    p->reg = disp_registry_ref(reg);

    p->nworkers = p->cfg.workers;
    p->workers = calloc((size_t)p->nworkers, sizeof *p->workers);
    if (!p->workers) {
        snprintf(err, err_size, "dispatcher: out of memory");
        p->nworkers = 0;
        disp_pool_free(p);
        return NULL;
    }
    int failed = -1;
    for (int i = 0; i < p->nworkers; i++) {
        worker *w = &p->workers[i];
        w->pool = p;
        w->index = i;
        pthread_mutex_init(&w->lock, NULL);
        pthread_cond_init(&w->init_cond, NULL);
        w->thread_ok = pthread_create(&w->th, NULL, worker_main, w) == 0;
        if (!w->thread_ok && failed < 0) {
            failed = i;
            snprintf(err, err_size, "dispatcher: cannot start worker %d", i);
        }
    }
    for (int i = 0; i < p->nworkers; i++) {
        worker *w = &p->workers[i];
        if (!w->thread_ok) continue;
        pthread_mutex_lock(&w->lock);
        while (w->init == 0) pthread_cond_wait(&w->init_cond, &w->lock);
        if (w->init < 0 && failed < 0) {
            failed = i;
            snprintf(err, err_size, "dispatcher: worker %d cannot load: %s",
                     i, w->init_err);
        }
        pthread_mutex_unlock(&w->lock);
    }
    if (failed >= 0) {
        disp_pool_free(p);
        return NULL;
    }
    log_msg(NLOG_INFO, "Dispatcher", "%d worker(s) started with %d tool(s) "
            "and agent(s); ClickHouse for tools %s", p->nworkers, reg->n,
            p->ch_on ? "configured" : "not configured");
    return p;
}

void disp_pool_free(disp_pool *p) {
    if (!p) return;
    stop_workers(p);
    for (int i = 0; i < USER_BUCKETS; i++)
        while (p->users[i]) {
            ucount *u = p->users[i];
            p->users[i] = u->next;
            free(u);
        }
    ch_settings_free(&p->ch);
    disp_registry_unref(p->reg);
    free(p->workers);
    pthread_mutex_destroy(&p->lock);
    free(p);
}

int disp_pool_in_flight(disp_pool *p) {
    return p ? atomic_load(&p->in_flight) : 0;
}

/* ---- request-scoped dispatcher --------------------------------------------------- */

disp *disp_new(disp_pool *pool, netra_ctx *ctx, const disp_sink *sink,
               char *err, size_t err_size) {
    if (!ctx) {
        ctx_new(NULL, err, err_size); /* fills the GLOBAL STATE text */
        return NULL;
    }
    if (!pool) {
        snprintf(err, err_size, "dispatcher: the worker pool is not running"
                 " - start it before making dispatchers");
        return NULL;
    }
    disp *d = calloc(1, sizeof *d);
    if (!d) {
        snprintf(err, err_size, "dispatcher: out of memory");
        return NULL;
    }
    d->pool = pool;
    d->ctx = ctx_ref(ctx);
    if (sink) d->sink = *sink;
    pthread_mutex_init(&d->lock, NULL);
    atomic_init(&d->cancel, false);
    if (ctx_run_id(ctx))
        snprintf(d->run_id, sizeof d->run_id, "%s", ctx_run_id(ctx));
    return d;
}

static void disp_destroy(disp *d) {
    ctx_unref(d->ctx);
    pthread_mutex_destroy(&d->lock);
    free(d);
}

/* The worker finished d's request (after done). */
static void disp_finished(disp *d) {
    pthread_mutex_lock(&d->lock);
    d->finished = true;
    d->w = NULL;
    bool free_now = d->released;
    pthread_mutex_unlock(&d->lock);
    if (free_now) disp_destroy(d);
}

static int submit(disp *d, int entry, bool agent, cJSON *args,
                  const cJSON *token, int *code, char *err, size_t size) {
    disp_pool *p = d->pool;
    int dummy;
    if (!code) code = &dummy;

    pthread_mutex_lock(&d->lock);
    bool used = d->submitted || d->released;
    d->submitted = true;
    pthread_mutex_unlock(&d->lock);
    if (used) {
        *code = DISP_BAD_PARAMS;
        snprintf(err, size, "dispatcher: this dispatcher already ran a "
                 "request (or was released) - make a new one per request");
        cJSON_Delete(args);
        return -1;
    }

    const char *user = ctx_user_id(d->ctx);
    if (!user_enter(p, user, p->cfg.max_inflight_per_user)) {
        *code = DISP_BUSY;
        snprintf(err, size, "busy: user '%s' already has %d requests in "
                 "flight - retry when one has finished", user,
                 p->cfg.max_inflight_per_user);
        goto refuse;
    }

    worker *w = NULL;
    unsigned start = atomic_fetch_add(&p->rr, 1);
    for (int k = 0; k < p->nworkers; k++) {
        worker *c = &p->workers[(start + (unsigned)k) % (unsigned)p->nworkers];
        if (!w || atomic_load(&c->load) < atomic_load(&w->load)) w = c;
    }
    if (!w || atomic_fetch_add(&w->load, 1) >= p->cfg.queue_max) {
        if (w) atomic_fetch_sub(&w->load, 1);
        user_leave(p, user);
        *code = DISP_BUSY;
        snprintf(err, size, "busy: the dispatcher's queues are full (%d "
                 "per worker) - retry shortly", p->cfg.queue_max);
        goto refuse;
    }

    job *j = calloc(1, sizeof *j);
    if (!j) {
        atomic_fetch_sub(&w->load, 1);
        user_leave(p, user);
        *code = DISP_BUSY;
        snprintf(err, size, "busy: out of memory - retry shortly");
        goto refuse;
    }
    j->d = d;
    j->w = w;
    j->entry = entry;
    j->agent = agent;
    j->args = args ? args : cJSON_CreateObject();
    j->progress_token = token ? cJSON_Duplicate(token, 1) : NULL;
    j->serial = atomic_fetch_add(&job_serials, 1);
    snprintf(j->user_key, sizeof j->user_key, "%s", user);
    atomic_fetch_add(&p->in_flight, 1);
    if (p->cfg.requests_changed) p->cfg.requests_changed(p->cfg.counter_ud, 1);

    pthread_mutex_lock(&d->lock);
    d->w = w;
    pthread_mutex_unlock(&d->lock);
    pthread_mutex_lock(&w->lock);
    if (w->queue_tail) w->queue_tail->next = j;
    else w->queue = j;
    w->queue_tail = j;
    pthread_mutex_unlock(&w->lock);
    curl_multi_wakeup(w->multi);
    return 0;

refuse:
    pthread_mutex_lock(&d->lock);
    d->submitted = false;
    pthread_mutex_unlock(&d->lock);
    cJSON_Delete(args);
    return -1;
}

int disp_call_tool(disp *d, const char *tool, cJSON *args,
                   const cJSON *progress_token, int *code, char *err,
                   size_t err_size) {
    int entry = find_entry(d->pool->reg, tool, false);
    if (entry < 0) {
        if (code) *code = DISP_BAD_PARAMS;
        snprintf(err, err_size, "unknown tool '%.128s' - see tools/list",
                 tool ? tool : "(null)");
        cJSON_Delete(args);
        return -1;
    }
    if (args && !cJSON_IsObject(args)) {
        if (code) *code = DISP_BAD_PARAMS;
        snprintf(err, err_size, "arguments: expected an object");
        cJSON_Delete(args);
        return -1;
    }
    return submit(d, entry, false, args, progress_token, code, err, err_size);
}

int disp_run_agent(disp *d, const char *agent, cJSON *input, int *code,
                   char *err, size_t err_size) {
    int entry = find_entry(d->pool->reg, agent, true);
    char why[1024];
    if (entry < 0) {
        if (code) *code = DISP_BAD_PARAMS;
        snprintf(err, err_size, "unknown agent '%.128s' - see agents/list",
                 agent ? agent : "(null)");
        cJSON_Delete(input);
        return -1;
    }
    if (!input) input = cJSON_CreateObject();
    if (!schema_validate(d->pool->reg->items[entry].in_schema, input, "input",
                         why, sizeof why)) {
        if (code) *code = DISP_BAD_PARAMS;
        snprintf(err, err_size, "%s", why);
        cJSON_Delete(input);
        return -1;
    }
    if (!d->run_id[0]) ctx_new_id(d->run_id);
    snprintf(d->agent_name, sizeof d->agent_name, "%s", agent);
    return submit(d, entry, true, input, NULL, code, err, err_size);
}

void disp_cancel(disp *d, const char *reason) {
    if (!d) return;
    pthread_mutex_lock(&d->lock);
    worker *w = d->finished ? NULL : d->w;
    if (!d->finished && !atomic_load(&d->cancel)) {
        snprintf(d->cancel_reason, sizeof d->cancel_reason, "cancelled: %s",
                 reason ? reason : "cancelled");
        atomic_store(&d->cancel, true);
    }
    pthread_mutex_unlock(&d->lock);
    if (w) curl_multi_wakeup(w->multi);
}

void disp_release(disp *d) {
    if (!d) return;
    pthread_mutex_lock(&d->lock);
    d->released = true;
    bool free_now = !d->submitted || d->finished;
    pthread_mutex_unlock(&d->lock);
    if (free_now) disp_destroy(d);
}
