/* bridge: JSON-RPC over WebSocket, one bridge per connection (bridge.h). */
#include "bridge.h"

#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "json.h"
#include "log.h"

#define CONN_BUCKETS 1024
#define MAX_DEPTH 64

const char *const bridge_protocol_versions[] = {"2025-11-25", "2025-06-18",
                                                NULL};

typedef struct bconn bconn;

/* One request in flight: a tools/call or an agents/run. */
typedef struct breq {
    struct breq *next, *prev; /* in its connection's list */
    bridge *b;
    bconn *conn; /* NULL once the connection closed */
    uint64_t conn_id;
    disp *d;
    bool is_run;
    bool answered;    /* the response went out: events may follow */
    bool finished;    /* done came before the response went out */
    char *raw_id;     /* the JSON-RPC id as sent */
    char run_id[CTX_NEW_ID_LEN + 1];
    char user_id[CTX_ID_MAX + 1];
    char **held;      /* events waiting for the response */
    size_t nheld;
} breq;

struct bconn {
    bconn *hnext;
    uint64_t id;
    char user_id[CTX_ID_MAX + 1];
    breq reqs; /* sentinel */
};

struct bridge {
    runtime *rt;
    server *srv;
    pthread_mutex_t lock;
    bconn *buckets[CONN_BUCKETS];
    disp_pool *pool;
    disp_registry *reg;
    atomic_int in_flight, runs;
    int entering; /* requests between reading pool and submitting to it
                     (guarded by lock; bridge_set_dispatcher waits) */
};

/* ---- sending ------------------------------------------------------------- */

static void send_text(bridge *b, uint64_t conn_id, char *text) {
    if (text) server_send(b->srv, conn_id, text, strlen(text));
}

/* {"jsonrpc":"2.0","id":<raw>,"result":<result>} */
static char *result_text(const char *raw_id, const cJSON *result) {
    char *body = cJSON_PrintUnformatted(result);
    if (!body) return NULL;
    size_t n = strlen(body) + strlen(raw_id) + 48;
    char *text = malloc(n);
    if (text) snprintf(text, n, "{\"jsonrpc\":\"2.0\",\"id\":%s,\"result\":%s}",
                       raw_id, body);
    free(body);
    return text;
}

static char *error_text(const char *raw_id, int code, const char *message) {
    cJSON *err = cJSON_CreateObject();
    cJSON_AddNumberToObject(err, "code", code);
    cJSON_AddStringToObject(err, "message", message);
    char *body = cJSON_PrintUnformatted(err);
    cJSON_Delete(err);
    if (!body) return NULL;
    const char *id = raw_id ? raw_id : "null";
    size_t n = strlen(body) + strlen(id) + 48;
    char *text = malloc(n);
    if (text) snprintf(text, n, "{\"jsonrpc\":\"2.0\",\"id\":%s,\"error\":%s}",
                       id, body);
    free(body);
    return text;
}

static void send_error(bridge *b, uint64_t conn_id, const char *raw_id,
                       int code, const char *message) {
    send_text(b, conn_id, error_text(raw_id, code, message));
}

static void send_result(bridge *b, uint64_t conn_id, const char *raw_id,
                        cJSON *result) {
    send_text(b, conn_id, result_text(raw_id, result));
    cJSON_Delete(result);
}

/* A notification's text; takes params. */
static char *notification_text(const char *method, cJSON *params) {
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "jsonrpc", "2.0");
    cJSON_AddStringToObject(o, "method", method);
    cJSON_AddItemToObject(o, "params", params);
    char *text = cJSON_PrintUnformatted(o);
    cJSON_Delete(o);
    return text;
}

/* ---- connections ------------------------------------------------------------ */

static bconn *find_conn(bridge *b, uint64_t id) {
    for (bconn *c = b->buckets[id % CONN_BUCKETS]; c; c = c->hnext)
        if (c->id == id) return c;
    return NULL;
}

static void on_open(void *ud, uint64_t conn_id, const char *user_id) {
    bridge *b = ud;
    bconn *c = calloc(1, sizeof *c);
    if (!c) {
        server_close(b->srv, conn_id, 1011, "out of memory");
        return;
    }
    c->id = conn_id;
    snprintf(c->user_id, sizeof c->user_id, "%s", user_id);
    c->reqs.next = c->reqs.prev = &c->reqs;
    pthread_mutex_lock(&b->lock);
    c->hnext = b->buckets[conn_id % CONN_BUCKETS];
    b->buckets[conn_id % CONN_BUCKETS] = c;
    pthread_mutex_unlock(&b->lock);
    log_msg(NLOG_INFO, "bridge", "connection %llu opened for user %s",
            (unsigned long long)conn_id, user_id);
}

static void on_close(void *ud, uint64_t conn_id) {
    bridge *b = ud;
    int cancelled = 0;
    pthread_mutex_lock(&b->lock);
    bconn **p = &b->buckets[conn_id % CONN_BUCKETS];
    while (*p && (*p)->id != conn_id) p = &(*p)->hnext;
    bconn *c = *p;
    if (c) {
        *p = c->hnext;
        for (breq *r = c->reqs.next; r != &c->reqs; r = r->next) {
            r->conn = NULL;
            disp_cancel(r->d, "the client disconnected");
            cancelled++;
        }
    }
    pthread_mutex_unlock(&b->lock);
    free(c);
    log_msg(NLOG_INFO, "bridge",
            "connection %llu closed; %d request(s) cancelled",
            (unsigned long long)conn_id, cancelled);
}

/* ---- requests ---------------------------------------------------------------- */

static void req_free(breq *r) {
    for (size_t i = 0; i < r->nheld; i++) free(r->held[i]);
    free(r->held);
    free(r->raw_id);
    free(r);
}

/* Sends a notification for a request, holding it back until the
 * request's response went out. Takes text. */
static void req_send(breq *r, char *text) {
    if (!text) return;
    pthread_mutex_lock(&r->b->lock);
    if (!r->answered) {
        char **grown = realloc(r->held, (r->nheld + 1) * sizeof *grown);
        if (grown) {
            r->held = grown;
            r->held[r->nheld++] = text;
            text = NULL;
        }
    } else if (r->conn) {
        send_text(r->b, r->conn_id, text);
        text = NULL;
    }
    pthread_mutex_unlock(&r->b->lock);
    free(text);
}

static void sink_event(void *ud, cJSON *event) {
    req_send(ud, notification_text("netra/event", event));
}

static void sink_progress(void *ud, cJSON *params) {
    req_send(ud, notification_text("notifications/progress", params));
}

/* Unlinks a finished request from its connection, drops its counts and
 * frees it (any thread, b->lock not held). */
static void req_finish(breq *r) {
    bridge *b = r->b;
    pthread_mutex_lock(&b->lock);
    if (r->conn) {
        r->prev->next = r->next;
        r->next->prev = r->prev;
    }
    pthread_mutex_unlock(&b->lock);
    atomic_fetch_sub(&b->in_flight, 1);
    if (r->is_run) atomic_fetch_sub(&b->runs, 1);
    disp_release(r->d);
    req_free(r);
}

/* The request ended. A run can end before agents_run sent its response
 * (a quick agent on another worker): then req_answered finishes it, so
 * that the response still goes first and r outlives agents_run. */
static void sink_done(void *ud, cJSON *result) {
    breq *r = ud;
    bridge *b = r->b;
    pthread_mutex_lock(&b->lock);
    if (!r->is_run && r->conn)
        send_text(b, r->conn_id, result_text(r->raw_id, result));
    bool early = !r->answered;
    if (early) r->finished = true;
    pthread_mutex_unlock(&b->lock);
    cJSON_Delete(result);
    if (!early) req_finish(r);
}

/* Marks a request answered and lets its held notifications go; finishes
 * a request whose done came first. r may be freed on return. */
static void req_answered(breq *r) {
    pthread_mutex_lock(&r->b->lock);
    r->answered = true;
    for (size_t i = 0; i < r->nheld; i++) {
        if (r->conn) send_text(r->b, r->conn_id, r->held[i]);
        else free(r->held[i]);
        r->held[i] = NULL;
    }
    r->nheld = 0;
    bool finished = r->finished;
    pthread_mutex_unlock(&r->b->lock);
    if (finished) req_finish(r);
}

/* Ends the step between a request taking the pool and submitting to it
 * (see bridge_set_dispatcher). */
static void leave_pool(bridge *b) {
    pthread_mutex_lock(&b->lock);
    b->entering--;
    pthread_mutex_unlock(&b->lock);
}

/* Makes a request with its context and dispatcher, linked to its
 * connection. Returns NULL after answering the error; otherwise the
 * caller calls leave_pool once the request is submitted (or refused). */
static breq *new_request(bridge *b, uint64_t conn_id, const char *raw_id,
                         const char *thread_id, bool is_run) {
    /* Once shutdown began no request starts: it could outlive the
     * server and its final event would reach nobody. */
    bool stopping = false;
    if (b->rt) {
        pthread_mutex_lock(&b->rt->lock);
        stopping = b->rt->stopping;
        pthread_mutex_unlock(&b->rt->lock);
    }
    if (stopping) {
        send_error(b, conn_id, raw_id, DISP_BUSY,
                   "busy: the server is shutting down - reconnect and "
                   "retry");
        return NULL;
    }

    pthread_mutex_lock(&b->lock);
    bconn *c = find_conn(b, conn_id);
    char user[CTX_ID_MAX + 1] = "";
    if (c) snprintf(user, sizeof user, "%s", c->user_id);
    disp_pool *pool = b->pool;
    if (c && pool) b->entering++;
    pthread_mutex_unlock(&b->lock);
    if (!c) return NULL;
    if (!pool) {
        send_error(b, conn_id, raw_id, DISP_BUSY,
                   "busy: the dispatcher is not running - retry shortly");
        return NULL;
    }

    breq *r = calloc(1, sizeof *r);
    if (!r) {
        leave_pool(b);
        return NULL;
    }
    r->b = b;
    r->conn_id = conn_id;
    r->is_run = is_run;
    r->raw_id = strdup(raw_id);
    snprintf(r->user_id, sizeof r->user_id, "%s", user);
    if (is_run) ctx_new_id(r->run_id);

    char err[512];
    ctx_fields f = {.user_id = user,
                    .thread_id = thread_id,
                    .run_id = is_run ? r->run_id : NULL,
                    .request_id = NULL,
                    .conn_id = conn_id};
    netra_ctx *ctx = ctx_new(&f, err, sizeof err);
    if (!ctx) {
        leave_pool(b);
        send_error(b, conn_id, raw_id, DISP_BAD_PARAMS, err);
        req_free(r);
        return NULL;
    }
    disp_sink sink = {.ud = r,
                      .event = sink_event,
                      .progress = sink_progress,
                      .done = sink_done};
    r->d = disp_new(pool, ctx, &sink, err, sizeof err);
    ctx_unref(ctx);
    if (!r->d) {
        leave_pool(b);
        send_error(b, conn_id, raw_id, -32603, err);
        req_free(r);
        return NULL;
    }
    return r;
}

/* Links a started request to its connection; false when the connection
 * went away meanwhile (the request is then cancelled). */
static void link_request(bridge *b, breq *r) {
    pthread_mutex_lock(&b->lock);
    bconn *c = find_conn(b, r->conn_id);
    r->conn = c;
    if (c) {
        r->next = c->reqs.next;
        r->prev = &c->reqs;
        c->reqs.next->prev = r;
        c->reqs.next = r;
    } else {
        disp_cancel(r->d, "the client disconnected");
    }
    pthread_mutex_unlock(&b->lock);
    atomic_fetch_add(&b->in_flight, 1);
    if (r->is_run) atomic_fetch_add(&b->runs, 1);
}

/* ---- methods ------------------------------------------------------------------- */

static const char *string_member(const cJSON *o, const char *name) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, name);
    return cJSON_IsString(v) ? v->valuestring : NULL;
}

static cJSON *initialize_result(const cJSON *params) {
    const char *asked = string_member(params, "protocolVersion");
    const char *version = bridge_protocol_versions[0];
    for (int i = 0; asked && bridge_protocol_versions[i]; i++)
        if (!strcmp(asked, bridge_protocol_versions[i])) version = asked;
    cJSON *r = cJSON_CreateObject();
    cJSON_AddStringToObject(r, "protocolVersion", version);
    cJSON *caps = cJSON_AddObjectToObject(r, "capabilities");
    cJSON *tools = cJSON_AddObjectToObject(caps, "tools");
    cJSON_AddBoolToObject(tools, "listChanged", true);
    cJSON *info = cJSON_AddObjectToObject(r, "serverInfo");
    cJSON_AddStringToObject(info, "name", "netra");
    cJSON_AddStringToObject(info, "version", NETRA_VERSION);
    cJSON_AddStringToObject(r, "instructions",
                            "netra: tools/call runs tools; agents/run starts "
                            "an agent whose events arrive as netra/event.");
    return r;
}

static void tools_call(bridge *b, uint64_t conn_id, const char *raw_id,
                       const cJSON *params) {
    const char *name = string_member(params, "name");
    if (!name) {
        send_error(b, conn_id, raw_id, DISP_BAD_PARAMS,
                   "params.name: expected the tool's name (a string)");
        return;
    }
    const cJSON *args = cJSON_GetObjectItemCaseSensitive(params, "arguments");
    if (args && !cJSON_IsObject(args) && !cJSON_IsNull(args)) {
        send_error(b, conn_id, raw_id, DISP_BAD_PARAMS,
                   "params.arguments: expected an object");
        return;
    }
    const cJSON *meta = cJSON_GetObjectItemCaseSensitive(params, "_meta");
    const cJSON *token = meta ? cJSON_GetObjectItemCaseSensitive(
                                    meta, "progressToken")
                              : NULL;
    if (token && !cJSON_IsString(token) && !cJSON_IsNumber(token))
        token = NULL;

    breq *r = new_request(b, conn_id, raw_id, NULL, false);
    if (!r) return;
    cJSON *copy = args && cJSON_IsObject(args) ? cJSON_Duplicate(args, 1)
                                               : cJSON_CreateObject();
    int code = 0;
    char err[512];
    r->answered = true; /* its events precede its result; none is held */
    link_request(b, r);
    int rc = disp_call_tool(r->d, name, copy, token, &code, err, sizeof err);
    leave_pool(b);
    if (rc < 0) {
        send_error(b, conn_id, raw_id, code ? code : DISP_BAD_PARAMS, err);
        req_finish(r);
    }
}

static void agents_run(bridge *b, uint64_t conn_id, const char *raw_id,
                       const cJSON *params) {
    const char *name = string_member(params, "name");
    if (!name) {
        send_error(b, conn_id, raw_id, DISP_BAD_PARAMS,
                   "params.name: expected the agent's name (a string)");
        return;
    }
    const cJSON *thread = cJSON_GetObjectItemCaseSensitive(params,
                                                          "thread_id");
    char thread_id[CTX_ID_MAX + 1];
    if (thread && !cJSON_IsNull(thread)) {
        if (!cJSON_IsString(thread)) {
            send_error(b, conn_id, raw_id, DISP_BAD_PARAMS,
                       "params.thread_id: expected a string");
            return;
        }
        snprintf(thread_id, sizeof thread_id, "%s", thread->valuestring);
    } else {
        ctx_new_id(thread_id);
    }
    const cJSON *input = cJSON_GetObjectItemCaseSensitive(params, "input");

    breq *r = new_request(b, conn_id, raw_id, thread_id, true);
    if (!r) return;
    link_request(b, r);
    int code = 0;
    char err[512];
    cJSON *copy = input ? cJSON_Duplicate(input, 1) : cJSON_CreateObject();
    int rc = disp_run_agent(r->d, name, copy, &code, err, sizeof err);
    leave_pool(b);
    if (rc < 0) {
        send_error(b, conn_id, raw_id, code ? code : DISP_BAD_PARAMS, err);
        req_finish(r);
        return;
    }
    cJSON *res = cJSON_CreateObject();
    cJSON_AddStringToObject(res, "run_id", r->run_id);
    cJSON_AddStringToObject(res, "thread_id", thread_id);
    /* The response goes out before any of the run's events. */
    pthread_mutex_lock(&b->lock);
    send_result(b, conn_id, raw_id, res);
    pthread_mutex_unlock(&b->lock);
    req_answered(r);
}

static void agents_cancel(bridge *b, uint64_t conn_id, const char *raw_id,
                          const cJSON *params) {
    const char *run_id = string_member(params, "run_id");
    if (!run_id) {
        send_error(b, conn_id, raw_id, DISP_BAD_PARAMS,
                   "params.run_id: expected a string");
        return;
    }
    bool found = false;
    pthread_mutex_lock(&b->lock);
    bconn *me = find_conn(b, conn_id);
    for (int i = 0; me && !found && i < CONN_BUCKETS; i++) {
        for (bconn *c = b->buckets[i]; c && !found; c = c->hnext) {
            if (strcmp(c->user_id, me->user_id)) continue;
            for (breq *r = c->reqs.next; r != &c->reqs; r = r->next) {
                if (r->is_run && !strcmp(r->run_id, run_id)) {
                    disp_cancel(r->d, "cancelled by agents/cancel");
                    found = true;
                    break;
                }
            }
        }
    }
    pthread_mutex_unlock(&b->lock);
    if (found) send_result(b, conn_id, raw_id, cJSON_CreateObject());
    else send_error(b, conn_id, raw_id, DISP_BAD_PARAMS, "run not found");
}

/* notifications/cancelled: the request with that id on this connection. */
static void cancel_request(bridge *b, uint64_t conn_id, const char *text,
                           size_t len) {
    const char *params;
    size_t plen;
    const char *rid;
    size_t rlen;
    if (!json_raw_member(text, len, "params", &params, &plen) ||
        !json_raw_member(params, plen, "requestId", &rid, &rlen))
        return;
    pthread_mutex_lock(&b->lock);
    bconn *c = find_conn(b, conn_id);
    for (breq *r = c ? c->reqs.next : NULL; c && r != &c->reqs; r = r->next) {
        if (!r->is_run && strlen(r->raw_id) == rlen &&
            !memcmp(r->raw_id, rid, rlen)) {
            disp_cancel(r->d, "cancelled by the client");
            break;
        }
    }
    pthread_mutex_unlock(&b->lock);
}

static void on_request(bridge *b, uint64_t conn_id, const char *raw_id,
                       const char *method, const cJSON *params) {
    pthread_mutex_lock(&b->lock);
    disp_registry *reg = b->reg ? disp_registry_ref(b->reg) : NULL;
    pthread_mutex_unlock(&b->lock);

    if (!strcmp(method, "initialize")) {
        send_result(b, conn_id, raw_id, initialize_result(params));
    } else if (!strcmp(method, "ping")) {
        send_result(b, conn_id, raw_id, cJSON_CreateObject());
    } else if (!strcmp(method, "tools/list")) {
        cJSON *r = cJSON_CreateObject();
        cJSON_AddItemToObject(r, "tools", reg ? disp_registry_tools_json(reg)
                                              : cJSON_CreateArray());
        send_result(b, conn_id, raw_id, r);
    } else if (!strcmp(method, "agents/list")) {
        cJSON *r = cJSON_CreateObject();
        cJSON_AddItemToObject(r, "agents",
                              reg ? disp_registry_agents_json(reg)
                                  : cJSON_CreateArray());
        send_result(b, conn_id, raw_id, r);
    } else if (!strcmp(method, "tools/call")) {
        tools_call(b, conn_id, raw_id, params);
    } else if (!strcmp(method, "agents/run")) {
        agents_run(b, conn_id, raw_id, params);
    } else if (!strcmp(method, "agents/cancel")) {
        agents_cancel(b, conn_id, raw_id, params);
    } else {
        char msg[200];
        snprintf(msg, sizeof msg,
                 "unknown method '%.100s' - see initialize and tools/list",
                 method);
        send_error(b, conn_id, raw_id, -32601, msg);
    }
    if (reg) disp_registry_unref(reg);
}

static void on_message(void *ud, uint64_t conn_id, const char *text,
                       size_t len) {
    bridge *b = ud;
    json_error jerr;
    cJSON *msg = json_parse(text, len, MAX_DEPTH, &jerr);
    if (!msg) {
        char why[256];
        snprintf(why, sizeof why, "parse error: %s", jerr.message);
        send_error(b, conn_id, NULL, -32700, why);
        return;
    }
    if (!cJSON_IsObject(msg)) {
        send_error(b, conn_id, NULL, -32600,
                   "invalid request: expected a JSON-RPC object (batches "
                   "are not supported)");
        cJSON_Delete(msg);
        return;
    }

    const char *raw = NULL;
    size_t raw_len = 0;
    char *raw_id = NULL;
    const cJSON *id = cJSON_GetObjectItemCaseSensitive(msg, "id");
    if (id && json_raw_id(text, len, &raw, &raw_len))
        raw_id = strndup(raw, raw_len);
    const char *shown = raw_id && (cJSON_IsString(id) || cJSON_IsNumber(id))
                            ? raw_id
                            : NULL;

    const char *version = string_member(msg, "jsonrpc");
    const cJSON *method = cJSON_GetObjectItemCaseSensitive(msg, "method");
    const cJSON *params = cJSON_GetObjectItemCaseSensitive(msg, "params");
    if (!version || strcmp(version, "2.0")) {
        send_error(b, conn_id, shown, -32600,
                   "invalid request: \"jsonrpc\" must be \"2.0\"");
    } else if (!cJSON_IsString(method)) {
        if (!id || cJSON_IsNull(id) || !shown ||
            (!cJSON_GetObjectItemCaseSensitive(msg, "result") &&
             !cJSON_GetObjectItemCaseSensitive(msg, "error")))
            send_error(b, conn_id, shown, -32600,
                       "invalid request: \"method\" must be a string");
        /* else: a response from the client; netra sends no requests. */
    } else if (id && !shown) {
        send_error(b, conn_id, NULL, -32600,
                   "invalid request: \"id\" must be a string or a number");
    } else if (params && !cJSON_IsObject(params)) {
        send_error(b, conn_id, shown, DISP_BAD_PARAMS,
                   "params: expected an object");
    } else if (!id) {
        if (!strcmp(method->valuestring, "notifications/cancelled"))
            cancel_request(b, conn_id, text, len);
        /* Other notifications need no answer. */
    } else {
        static const cJSON empty = {.type = cJSON_Object};
        on_request(b, conn_id, shown, method->valuestring,
                   params ? params : &empty);
    }
    free(raw_id);
    cJSON_Delete(msg);
}

/* ---- the bridge ---------------------------------------------------------------- */

bridge *bridge_new(runtime *rt, server *srv) {
    bridge *b = calloc(1, sizeof *b);
    if (!b) return NULL;
    b->rt = rt;
    b->srv = srv;
    pthread_mutex_init(&b->lock, NULL);
    server_handler h = {.ud = b,
                        .on_open = on_open,
                        .on_message = on_message,
                        .on_close = on_close};
    server_set_handler(srv, &h);
    return b;
}

void bridge_set_dispatcher(bridge *b, disp_pool *pool, disp_registry *reg) {
    pthread_mutex_lock(&b->lock);
    disp_registry *old = b->reg;
    b->pool = pool;
    b->reg = reg ? disp_registry_ref(reg) : NULL;
    pthread_mutex_unlock(&b->lock);
    if (old) disp_registry_unref(old);

    /* A request that took the old pool just before the swap submits to
     * it within microseconds; once none is left, the old pool's
     * disp_pool_in_flight counts every request it will ever have. */
    for (;;) {
        pthread_mutex_lock(&b->lock);
        int entering = b->entering;
        pthread_mutex_unlock(&b->lock);
        if (!entering) break;
        struct timespec ts = {.tv_sec = 0, .tv_nsec = 100 * 1000};
        nanosleep(&ts, NULL);
    }
}

void bridge_cancel_all(bridge *b, const char *reason) {
    pthread_mutex_lock(&b->lock);
    for (int i = 0; i < CONN_BUCKETS; i++)
        for (bconn *c = b->buckets[i]; c; c = c->hnext)
            for (breq *r = c->reqs.next; r != &c->reqs; r = r->next)
                disp_cancel(r->d, reason);
    pthread_mutex_unlock(&b->lock);
}

int bridge_in_flight(bridge *b) {
    return atomic_load(&b->in_flight);
}

int bridge_runs(bridge *b) {
    return atomic_load(&b->runs);
}

void bridge_free(bridge *b) {
    if (!b) return;
    for (int i = 0; i < CONN_BUCKETS; i++) {
        while (b->buckets[i]) {
            bconn *c = b->buckets[i];
            b->buckets[i] = c->hnext;
            free(c);
        }
    }
    if (b->reg) disp_registry_unref(b->reg);
    pthread_mutex_destroy(&b->lock);
    free(b);
}
