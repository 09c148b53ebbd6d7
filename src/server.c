/* server: the libwebsockets listener for /health* and /ws (server.h). */
#include "server.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <libwebsockets.h>
#include <openssl/crypto.h>

#include "context.h"
#include "jwt.h"
#include "log.h"

#define TICK_US (250 * 1000)
#define RECENT_STALL_MS (60 * 1000)

#define BUCKETS 4096
#define PENDING_MAX 256

/* A message waiting to be written, with LWS_PRE bytes of headroom. */
typedef struct outmsg {
    struct outmsg *next;
    size_t len;
    unsigned char data[];
} outmsg;

/* One connection: an HTTP request being answered, or a WebSocket. All of
 * it belongs to the service thread. */
typedef struct conn {
    struct conn *next, *prev; /* WebSocket list */
    struct conn *hnext;       /* id hash chain */
    struct lws *wsi;
    uint64_t id;
    bool is_ws;
    bool closing;
    int close_code;
    char close_reason[96];
    unsigned char *body; /* HTTP answer waiting for WRITEABLE, LWS_PRE */
    size_t body_len;
    bool head_only; /* a HEAD request: the headers say the length */
    char *rx; /* the message being reassembled */
    size_t rx_len, rx_cap;
    outmsg *out_head, *out_tail;
    size_t out_bytes;
} conn;

/* Work handed to the service thread by other threads. */
enum { INBOX_SEND, INBOX_CLOSE, INBOX_BROADCAST };
typedef struct inbox_item {
    struct inbox_item *next;
    int kind;
    uint64_t conn_id;
    int code;
    char *text;
    size_t len;
} inbox_item;

/* A user authenticated during the handshake, until ESTABLISHED. */
typedef struct {
    struct lws *wsi;
    char user_id[CTX_ID_MAX + 1];
} pending_user;

struct server {
    runtime *rt;
    server_options opts;
    struct lws_context *ctx;
    struct lws_vhost *vhost;
    int port;
    pthread_t thread, watchdog;
    bool thread_started, watchdog_started;

    pthread_mutex_t lock; /* start handshake and stall records */
    pthread_cond_t cond;
    int start_state; /* 0 pending, 1 listening, -1 failed */
    char start_err[256];
    int stall_count;
    int64_t longest_stall_ms, last_stall_end_ms;

    atomic_llong last_turn_ms;
    atomic_int connections;
    atomic_bool stop_requested;
    atomic_bool watchdog_stop;
    atomic_bool stall_reported;
    bool closing_all; /* service thread only */
    int64_t stop_deadline_ms;
    conn ws_list; /* sentinel */
    lws_sorted_usec_list_t tick;
    lws_retry_bo_t keepalive;

    conn *buckets[BUCKETS]; /* open WebSockets by id */
    uint64_t next_id;
    pending_user pending[PENDING_MAX];

    pthread_mutex_t inbox_lock; /* guards inbox, handler and auth */
    inbox_item *inbox_head, *inbox_tail;
    server_handler handler;
    server_auth auth;
    atomic_bool refuse_new;

    /* The last rendered /health documents, without and with detail, and
     * when they were made (service thread only). */
    char *snapshot[2];
    int snapshot_status[2];
    int64_t snapshot_ms[2];
};

/* How long a rendered /health document is served before a new one. */
#define SNAPSHOT_MS 100

int64_t server_now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int server_parse_listen(const char *text, server_options *opts, char *err,
                        size_t err_size) {
    const char *colon = strrchr(text, ':');
    const char *host = text;
    size_t host_len = colon ? (size_t)(colon - text) : 0;
    if (host_len >= 2 && host[0] == '[' && host[host_len - 1] == ']') {
        host++;
        host_len -= 2;
    }
    char *end = NULL;
    bool digits = colon && colon[1] >= '0' && colon[1] <= '9';
    bool bracketed = text[0] == '[';
    long port = digits ? strtol(colon + 1, &end, 10) : -1;
    if (!colon || host_len == 0 || host_len >= sizeof opts->host ||
        !end || *end || end == colon + 1 || port < 0 || port > 65535) {
        snprintf(err, err_size,
                 "listen address: expected HOST:PORT (e.g. 127.0.0.1:8080, "
                 "port 0 for a free one), got '%s'",
                 text);
        return -1;
    }
    memcpy(opts->host, host, host_len);
    opts->host[host_len] = '\0';
    if (bracketed != (strchr(opts->host, ':') != NULL)) {
        snprintf(err, err_size,
                 "listen address: write IPv6 addresses in brackets "
                 "([::1]:8080) and IPv4 ones without, got '%s'",
                 text);
        return -1;
    }
    if (!strcmp(opts->host, "localhost"))
        snprintf(opts->host, sizeof opts->host, "127.0.0.1");
    struct in6_addr a6;
    struct in_addr a4;
    if (inet_pton(AF_INET, opts->host, &a4) != 1 &&
        inet_pton(AF_INET6, opts->host, &a6) != 1) {
        snprintf(err, err_size,
                 "listen address: '%s' is not an IP address - use an IPv4 "
                 "or IPv6 literal such as 127.0.0.1",
                 opts->host);
        return -1;
    }
    opts->port = (int)port;
    return 0;
}

/* ---- HTTP answers ---------------------------------------------------- */

static bool peer_is_loopback(struct lws *wsi) {
    char peer[128] = "";
    lws_get_peer_simple(wsi, peer, sizeof peer);
    return !strncmp(peer, "127.", 4) || !strcmp(peer, "::1") ||
           !strncmp(peer, "::ffff:127.", 11);
}

/* Details beyond status: loopback callers in development and test, and
 * anyone with Authorization: Bearer <NETRA_ADMIN_TOKEN>. */
static bool wants_detail(server *srv, struct lws *wsi) {
    const char *env = config_environment(srv->rt->cfg);
    bool open_env = !strcmp(env, "development") || !strcmp(env, "test");
    if (open_env && peer_is_loopback(wsi)) return true;

    const char *token = config_get(srv->rt->cfg, "NETRA_ADMIN_TOKEN");
    char auth[JWT_MAX_TOKEN + 64];
    if (!token ||
        lws_hdr_copy(wsi, auth, sizeof auth, WSI_TOKEN_HTTP_AUTHORIZATION) <= 0)
        return false;
    if (strncmp(auth, "Bearer ", 7)) return false;
    size_t n = strlen(token);
    return strlen(auth + 7) == n && CRYPTO_memcmp(auth + 7, token, n) == 0;
}

/* Writes status line and headers, and keeps the body for WRITEABLE.
 * Returns 0, or -1 to close the connection. */
static int answer(conn *c, struct lws *wsi, int status, const char *type,
                  char *body) {
    if (!body) return -1;
    size_t len = strlen(body);
    unsigned char head[LWS_PRE + 1024];
    unsigned char *start = head + LWS_PRE, *p = start;
    unsigned char *end = head + sizeof head - 1;

    if (lws_add_http_common_headers(wsi, (unsigned)status, type, len, &p,
                                    end) ||
        lws_add_http_header_by_token(wsi, WSI_TOKEN_HTTP_CACHE_CONTROL,
                                     (const unsigned char *)"no-store", 8, &p,
                                     end) ||
        lws_finalize_write_http_header(wsi, start, &p, end)) {
        free(body);
        return -1;
    }
    c->body = malloc(LWS_PRE + len + 1);
    if (!c->body) {
        free(body);
        return -1;
    }
    memcpy(c->body + LWS_PRE, body, len);
    c->body_len = len;
    free(body);
    lws_callback_on_writable(wsi);
    return 0;
}

static char *json_text(cJSON *doc) {
    char *text = doc ? cJSON_PrintUnformatted(doc) : NULL;
    cJSON_Delete(doc);
    return text ? text : strdup("{\"status\":\"fail\"}");
}

static char *simple_doc(const char *status, const char *key, const char *val) {
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "status", status);
    if (key) cJSON_AddStringToObject(o, key, val);
    return json_text(o);
}

static int answer_health(server *srv, conn *c, struct lws *wsi,
                         const char *path) {
    runtime *rt = srv->rt;
    const char *type = "application/health+json";
    char phase[64];
    runtime_phase(rt, phase, sizeof phase);
    bool detail = wants_detail(srv, wsi);

    if (!strcmp(path, "/health")) {
        int v = detail ? 1 : 0;
        int64_t now = server_now_ms();
        if (!srv->snapshot[v] || now - srv->snapshot_ms[v] >= SNAPSHOT_MS) {
            cJSON *doc = health_render(rt->health, detail,
                                       config_environment(rt->cfg), phase);
            health_status overall = health_overall(rt->health);
            free(srv->snapshot[v]);
            srv->snapshot[v] = json_text(doc);
            srv->snapshot_status[v] =
                strcmp(health_status_word(overall), "fail") ? 200 : 503;
            srv->snapshot_ms[v] = now;
        }
        return answer(c, wsi, srv->snapshot_status[v], type,
                      strdup(srv->snapshot[v]));
    }
    if (!strcmp(path, "/health/live")) {
        /* Answered by the service loop itself: it is alive. */
        return answer(c, wsi, 200, type, simple_doc("pass", NULL, NULL));
    }
    if (!strcmp(path, "/health/ready")) {
        bool ready = runtime_ready(rt);
        if (!ready && !strcmp(phase, "ready")) {
            snprintf(phase, sizeof phase, "ready, but a required component "
                                          "is not healthy");
        }
        return answer(c, wsi, ready ? 200 : 503, type,
                      simple_doc(ready ? "pass" : "fail", "phase", phase));
    }
    const char *name = path + strlen("/health/");
    cJSON *doc = name[0] && !strchr(name, '/')
                     ? health_render_component(rt->health, name, detail)
                     : NULL;
    if (!doc)
        return answer(c, wsi, 404, type,
                      simple_doc("fail", "output", "no such component"));
    cJSON *st = cJSON_GetObjectItemCaseSensitive(doc, "status");
    bool fail = cJSON_IsString(st) && !strcmp(st->valuestring, "fail");
    return answer(c, wsi, fail ? 503 : 200, type, json_text(doc));
}

static int on_http(server *srv, conn *c, struct lws *wsi, const char *path) {
    bool head = lws_hdr_total_length(wsi, WSI_TOKEN_HEAD_URI) > 0;
    if (lws_hdr_total_length(wsi, WSI_TOKEN_GET_URI) <= 0 && !head)
        return answer(c, wsi, 405, "application/json",
                      simple_doc("fail", "output", "only GET and HEAD are "
                                                   "served"));
    c->head_only = head;
    if (!strncmp(path, "/health", 7) &&
        (path[7] == '\0' || path[7] == '/'))
        return answer_health(srv, c, wsi, path);
    if (!strcmp(path, "/ws"))
        return answer(c, wsi, 426, "application/json",
                      simple_doc("fail", "output",
                                 "/ws speaks WebSocket: send an Upgrade "
                                 "request"));
    return answer(c, wsi, 404, "application/json",
                  simple_doc("fail", "output",
                             "not found: try /health, /health/live, "
                             "/health/ready or /ws"));
}

/* Refuses an upgrade with a complete HTTP answer written at once.
 * Returns 1, which tells lws the answer was sent. */
static int refuse_upgrade(struct lws *wsi, int status, const char *why) {
    char *body = simple_doc("fail", "output", why);
    size_t len = strlen(body);
    unsigned char buf[LWS_PRE + 2048];
    unsigned char *start = buf + LWS_PRE, *p = start;
    unsigned char *end = buf + sizeof buf - 1;
    if (len < 1024 &&
        !lws_add_http_common_headers(wsi, (unsigned)status,
                                     "application/json", len, &p, end) &&
        !lws_add_http_header_by_token(wsi, WSI_TOKEN_HTTP_CACHE_CONTROL,
                                      (const unsigned char *)"no-store", 8,
                                      &p, end) &&
        !lws_finalize_http_header(wsi, &p, end)) {
        memcpy(p, body, len);
        p += len;
        lws_write(wsi, start, (size_t)(p - start), LWS_WRITE_HTTP_HEADERS);
    }
    free(body);
    return 1;
}

/* The user a client authenticates as, or an HTTP status refusing it with
 * `why` filled. Reads the token from Authorization: Bearer, else from the
 * `token` query parameter (never logged). */
static int authenticate(server *srv, struct lws *wsi, char *user,
                        size_t user_size, char *why, size_t why_size) {
    pthread_mutex_lock(&srv->inbox_lock);
    server_auth auth = srv->auth;
    pthread_mutex_unlock(&srv->inbox_lock);

    char token[JWT_MAX_TOKEN + 1];
    char header[JWT_MAX_TOKEN + 64];
    token[0] = '\0';
    if (lws_hdr_copy(wsi, header, sizeof header,
                     WSI_TOKEN_HTTP_AUTHORIZATION) > 0 &&
        jwt_bearer_token(header, token, sizeof token) < 0) {
        snprintf(why, why_size, "malformed Authorization header");
        return 401;
    }
    bool from_header = token[0] != '\0';
    int seen = 0;
    for (int i = 0; i < 64; i++) {
        char arg[JWT_MAX_TOKEN + 16];
        int n = lws_hdr_copy_fragment(wsi, arg, sizeof arg,
                                      WSI_TOKEN_HTTP_URI_ARGS, i);
        if (n <= 0) break;
        if (strncmp(arg, "token=", 6)) continue;
        if (++seen > 1) {
            snprintf(why, why_size, "malformed query: `token` given twice");
            return 401;
        }
        if (!from_header)
            snprintf(token, sizeof token, "%.*s", JWT_MAX_TOKEN, arg + 6);
    }

    if (!token[0]) {
        if (!auth.anonymous) {
            snprintf(why, why_size,
                     "missing token: send Authorization: Bearer <jwt> or "
                     "?token=<jwt> (get one with `netra token --user NAME`)");
            return 401;
        }
        char name[CTX_ID_MAX + 2] = "";
        int n = lws_hdr_custom_copy(wsi, name, sizeof name, "x-netra-user:",
                                    13);
        const char *id = n > 0 ? name : "dev_user";
        char err[256];
        if (!ctx_validate_id("X-Netra-User", id, err, sizeof err)) {
            snprintf(why, why_size, "%s", err);
            return 401;
        }
        snprintf(user, user_size, "%s", id);
        return 0;
    }

    const char *secret = config_get(srv->rt->cfg, "NETRA_JWT_SECRET");
    jwt_claims claims;
    char err[256];
    jwt_result r = jwt_verify(token, secret, time(NULL), JWT_LEEWAY_S,
                              auth.require_exp, &claims, err, sizeof err);
    if (r != JWT_OK) {
        snprintf(why, why_size, "token refused (%s): %s",
                 jwt_result_name(r), err);
        return 401;
    }
    snprintf(user, user_size, "%s", claims.sub);
    return 0;
}

/* True when NETRA_ALLOWED_ORIGINS is unset, the request has no Origin, or
 * the list (comma separated, exact match) holds it. */
static bool origin_allowed(server *srv, struct lws *wsi, char *origin,
                           size_t size) {
    const char *allowed = config_get(srv->rt->cfg, "NETRA_ALLOWED_ORIGINS");
    origin[0] = '\0';
    lws_hdr_copy(wsi, origin, (int)size, WSI_TOKEN_ORIGIN);
    if (!allowed) return true;
    size_t n = strlen(origin);
    /* Browsers always send Origin; a client without one (an SDK, a
     * server) is not the cross-site case this check guards against. */
    if (n == 0) return true;
    for (const char *p = allowed; *p;) {
        while (*p == ' ' || *p == ',') p++;
        size_t len = strcspn(p, ",");
        size_t trimmed = len;
        while (trimmed && p[trimmed - 1] == ' ') trimmed--;
        if (n && trimmed == n && !strncmp(p, origin, n)) return true;
        p += len;
    }
    return false;
}

static void remember_user(server *srv, struct lws *wsi, const char *user) {
    for (int i = 0; i < PENDING_MAX; i++) {
        if (!srv->pending[i].wsi || srv->pending[i].wsi == wsi) {
            srv->pending[i].wsi = wsi;
            snprintf(srv->pending[i].user_id, sizeof srv->pending[i].user_id,
                     "%s", user);
            return;
        }
    }
}

/* Takes the user remembered for wsi; false when there is none. */
static bool take_user(server *srv, struct lws *wsi, char *user, size_t n) {
    for (int i = 0; i < PENDING_MAX; i++) {
        if (srv->pending[i].wsi == wsi) {
            snprintf(user, n, "%s", srv->pending[i].user_id);
            srv->pending[i].wsi = NULL;
            return true;
        }
    }
    return false;
}

static void forget_user(server *srv, struct lws *wsi) {
    for (int i = 0; i < PENDING_MAX; i++)
        if (srv->pending[i].wsi == wsi) srv->pending[i].wsi = NULL;
}

static int on_confirm_upgrade(server *srv, struct lws *wsi) {
    char uri[256] = "", peer[128] = "", why[512], origin[512];
    lws_hdr_copy(wsi, uri, sizeof uri, WSI_TOKEN_GET_URI);
    lws_get_peer_simple(wsi, peer, sizeof peer);
    if (strcmp(uri, "/ws"))
        return refuse_upgrade(wsi, 404, "WebSocket clients connect to /ws");
    if (atomic_load(&srv->refuse_new) || !runtime_ready(srv->rt)) {
        char phase[32];
        runtime_phase(srv->rt, phase, sizeof phase);
        snprintf(why, sizeof why, "not ready (phase: %s) - retry shortly",
                 phase);
        return refuse_upgrade(wsi, 503, why);
    }
    if (!origin_allowed(srv, wsi, origin, sizeof origin)) {
        log_msg(NLOG_WARN, "bridge",
                "refused a WebSocket client from %s: Origin '%.200s' is not "
                "in NETRA_ALLOWED_ORIGINS", peer, origin);
        return refuse_upgrade(wsi, 403, "Origin not allowed");
    }
    char user[CTX_ID_MAX + 1];
    int status = authenticate(srv, wsi, user, sizeof user, why, sizeof why);
    if (status) {
        log_msg(NLOG_WARN, "bridge", "refused a WebSocket client from %s: %s",
                peer, why);
        return refuse_upgrade(wsi, status, why);
    }
    remember_user(srv, wsi, user);
    return 0;
}

/* ---- WebSocket connections ------------------------------------------- */

static void ws_link(server *srv, conn *c) {
    c->next = srv->ws_list.next;
    c->prev = &srv->ws_list;
    srv->ws_list.next->prev = c;
    srv->ws_list.next = c;
    conn **b = &srv->buckets[c->id % BUCKETS];
    c->hnext = *b;
    *b = c;
}

static void ws_unlink(server *srv, conn *c) {
    if (!c->next) return;
    c->prev->next = c->next;
    c->next->prev = c->prev;
    c->next = c->prev = NULL;
    for (conn **p = &srv->buckets[c->id % BUCKETS]; *p; p = &(*p)->hnext) {
        if (*p == c) {
            *p = c->hnext;
            break;
        }
    }
}

static conn *find_conn(server *srv, uint64_t id) {
    for (conn *c = srv->buckets[id % BUCKETS]; c; c = c->hnext)
        if (c->id == id) return c;
    return NULL;
}

static void free_out_queue(conn *c) {
    while (c->out_head) {
        outmsg *m = c->out_head;
        c->out_head = m->next;
        free(m);
    }
    c->out_tail = NULL;
    c->out_bytes = 0;
}

static void free_conn_buffers(conn *c) {
    free(c->rx);
    c->rx = NULL;
    c->rx_len = c->rx_cap = 0;
    free_out_queue(c);
}

/* Marks a connection to close with code and reason at its next
 * WRITEABLE (service thread). */
static void start_close(conn *c, int code, const char *reason) {
    if (c->closing) return;
    c->closing = true;
    c->close_code = code;
    snprintf(c->close_reason, sizeof c->close_reason, "%s", reason);
    lws_callback_on_writable(c->wsi);
}

/* Queues a message on a connection; takes m. A message that finds more
 * than max_outbox_bytes already queued closes the client: the queue
 * holds at most the limit plus one message, and a burst queued before
 * the service thread could write (a large result right after its
 * tool_completed event) does not close a client that reads. */
static void enqueue(server *srv, conn *c, outmsg *m) {
    if (c->closing) {
        free(m);
        return;
    }
    if (c->out_bytes > srv->opts.max_outbox_bytes) {
        log_msg(NLOG_WARN, "bridge",
                "closing connection %llu: %zu bytes queued for a client that "
                "does not read (limit %zu)",
                (unsigned long long)c->id, c->out_bytes + m->len,
                srv->opts.max_outbox_bytes);
        free(m);
        free_out_queue(c); /* it would never be sent */
        start_close(c, LWS_CLOSE_STATUS_POLICY_VIOLATION,
                    "client too slow: outgoing queue over its limit");
        return;
    }
    m->next = NULL;
    if (c->out_tail) c->out_tail->next = m;
    else c->out_head = m;
    c->out_tail = m;
    c->out_bytes += m->len;
    lws_callback_on_writable(c->wsi);
}

static outmsg *new_outmsg(const char *text, size_t len) {
    outmsg *m = malloc(sizeof *m + LWS_PRE + len);
    if (!m) return NULL;
    m->len = len;
    memcpy(m->data + LWS_PRE, text, len);
    return m;
}

/* Starts closing every WebSocket with 1001 (service thread). */
static void close_all(server *srv) {
    for (conn *c = srv->ws_list.next; c != &srv->ws_list; c = c->next)
        start_close(c, LWS_CLOSE_STATUS_GOINGAWAY, "server shutting down");
}

/* Moves work from other threads onto connections (service thread). */
static void drain_inbox(server *srv) {
    pthread_mutex_lock(&srv->inbox_lock);
    inbox_item *it = srv->inbox_head;
    srv->inbox_head = srv->inbox_tail = NULL;
    pthread_mutex_unlock(&srv->inbox_lock);

    while (it) {
        inbox_item *next = it->next;
        if (it->kind == INBOX_BROADCAST) {
            for (conn *c = srv->ws_list.next; c != &srv->ws_list;
                 c = c->next) {
                outmsg *m = new_outmsg(it->text, it->len);
                if (m) enqueue(srv, c, m);
            }
        } else {
            conn *c = find_conn(srv, it->conn_id);
            if (c && it->kind == INBOX_SEND) {
                outmsg *m = new_outmsg(it->text, it->len);
                if (m) enqueue(srv, c, m);
            } else if (c && it->kind == INBOX_CLOSE) {
                start_close(c, it->code, it->text ? it->text : "");
            }
        }
        free(it->text);
        free(it);
        it = next;
    }
}

static void push_inbox(server *srv, inbox_item *it) {
    it->next = NULL;
    pthread_mutex_lock(&srv->inbox_lock);
    if (srv->inbox_tail) srv->inbox_tail->next = it;
    else srv->inbox_head = it;
    srv->inbox_tail = it;
    pthread_mutex_unlock(&srv->inbox_lock);
    if (srv->ctx) lws_cancel_service(srv->ctx);
}

static int on_ws_writeable(conn *c, struct lws *wsi) {
    if (c->closing) {
        lws_close_reason(wsi, (enum lws_close_status)c->close_code,
                         (unsigned char *)c->close_reason,
                         strlen(c->close_reason));
        return -1;
    }
    outmsg *m = c->out_head;
    if (!m) return 0;
    int n = lws_write(wsi, m->data + LWS_PRE, m->len, LWS_WRITE_TEXT);
    if (n < (int)m->len) return -1;
    c->out_head = m->next;
    if (!c->out_head) c->out_tail = NULL;
    c->out_bytes -= m->len;
    free(m);
    if (c->out_head) lws_callback_on_writable(wsi);
    return 0;
}

/* Adds a received fragment; delivers the message when complete. Returns
 * -1 to close (the close reason is set). */
static int on_ws_receive(server *srv, conn *c, struct lws *wsi,
                         const void *in, size_t len) {
    if (c->closing) return 0;
    if (lws_frame_is_binary(wsi)) {
        static const char why[] = "binary messages are not accepted";
        lws_close_reason(wsi, LWS_CLOSE_STATUS_UNACCEPTABLE_OPCODE,
                         (unsigned char *)why, sizeof why - 1);
        return -1;
    }
    if (c->rx_len + len > srv->opts.max_message_bytes) {
        char why[96];
        snprintf(why, sizeof why, "message larger than %zu bytes",
                 srv->opts.max_message_bytes);
        log_msg(NLOG_WARN, "bridge", "closing connection %llu: %s",
                (unsigned long long)c->id, why);
        lws_close_reason(wsi, LWS_CLOSE_STATUS_MESSAGE_TOO_LARGE,
                         (unsigned char *)why, strlen(why));
        return -1;
    }
    if (c->rx_len + len + 1 > c->rx_cap) {
        size_t cap = c->rx_cap ? c->rx_cap : 4096;
        while (cap < c->rx_len + len + 1) cap *= 2;
        char *grown = realloc(c->rx, cap);
        if (!grown) return -1;
        c->rx = grown;
        c->rx_cap = cap;
    }
    memcpy(c->rx + c->rx_len, in, len);
    c->rx_len += len;
    if (!lws_is_final_fragment(wsi) || lws_remaining_packet_payload(wsi))
        return 0;

    c->rx[c->rx_len] = '\0';
    size_t n = c->rx_len;
    c->rx_len = 0;
    if (srv->handler.on_message)
        srv->handler.on_message(srv->handler.ud, c->id, c->rx, n);
    if (c->rx_cap > 65536) {
        free(c->rx);
        c->rx = NULL;
        c->rx_cap = 0;
    }
    return 0;
}

static int on_ws_established(server *srv, conn *c, struct lws *wsi) {
    char user[CTX_ID_MAX + 1];
    memset(c, 0, sizeof *c);
    c->wsi = wsi;
    if (!take_user(srv, wsi, user, sizeof user)) return -1;
    c->id = ++srv->next_id;
    c->is_ws = true;
    ws_link(srv, c);
    atomic_fetch_add(&srv->connections, 1);
    if (srv->closing_all) {
        start_close(c, LWS_CLOSE_STATUS_GOINGAWAY, "server shutting down");
        return 0;
    }
    if (srv->handler.on_open)
        srv->handler.on_open(srv->handler.ud, c->id, user);
    return 0;
}

static void on_ws_closed(server *srv, conn *c) {
    if (!c || !c->is_ws) return;
    ws_unlink(srv, c);
    c->is_ws = false;
    free_conn_buffers(c);
    atomic_fetch_sub(&srv->connections, 1);
    if (srv->handler.on_close) srv->handler.on_close(srv->handler.ud, c->id);
}

/* ---- the callback ------------------------------------------------------ */

static int callback(struct lws *wsi, enum lws_callback_reasons reason,
                    void *user, void *in, size_t len) {
    server *srv = lws_context_user(lws_get_context(wsi));
    conn *c = user;

    switch (reason) {
    case LWS_CALLBACK_HTTP:
        memset(c, 0, sizeof *c);
        return on_http(srv, c, wsi, in ? (const char *)in : "/");

    case LWS_CALLBACK_HTTP_WRITEABLE:
        if (!c || !c->body) return 0;
        if (c->head_only) {
            free(c->body);
            c->body = NULL;
            return lws_http_transaction_completed(wsi) ? -1 : 0;
        }
        if (lws_write(wsi, c->body + LWS_PRE, c->body_len,
                      LWS_WRITE_HTTP_FINAL) < (int)c->body_len) {
            free(c->body);
            c->body = NULL;
            return -1;
        }
        free(c->body);
        c->body = NULL;
        return lws_http_transaction_completed(wsi) ? -1 : 0;

    case LWS_CALLBACK_CLOSED_HTTP:
    case LWS_CALLBACK_HTTP_DROP_PROTOCOL:
        if (c && !c->is_ws && c->body) {
            free(c->body);
            c->body = NULL;
        }
        return 0;

    case LWS_CALLBACK_HTTP_CONFIRM_UPGRADE:
        return on_confirm_upgrade(srv, wsi);

    case LWS_CALLBACK_ESTABLISHED:
        return on_ws_established(srv, c, wsi);

    case LWS_CALLBACK_SERVER_WRITEABLE:
        return c && c->is_ws ? on_ws_writeable(c, wsi) : 0;

    case LWS_CALLBACK_RECEIVE:
        return c && c->is_ws ? on_ws_receive(srv, c, wsi, in, len) : -1;

    case LWS_CALLBACK_CLOSED:
        on_ws_closed(srv, c);
        return 0;

    case LWS_CALLBACK_WSI_DESTROY:
        forget_user(srv, wsi);
        return 0;

    case LWS_CALLBACK_EVENT_WAIT_CANCELLED:
        if (!srv) return 0;
        drain_inbox(srv);
        if (atomic_load(&srv->stop_requested) && !srv->closing_all) {
            srv->closing_all = true;
            close_all(srv);
        }
        return 0;

    default:
        return 0;
    }
}

/* An 8 KiB receive buffer per connection: larger messages arrive in
 * pieces and on_ws_receive joins them. 64 KiB cost about 5 KB more
 * resident memory per idle connection (spec/bench/bridge.sh). */
static const struct lws_protocols protocols[] = {
    {"mcp", callback, sizeof(conn), 8192, 0, NULL, 0},
    {NULL, NULL, 0, 0, 0, NULL, 0},
};

/* ---- service loop and watchdog ------------------------------------------ */

/* Records that the loop turned; notes a stall that just ended. */
static void on_tick(lws_sorted_usec_list_t *sul) {
    server *srv = lws_container_of(sul, server, tick);
    int64_t now = server_now_ms();
    int64_t gap = now - atomic_load(&srv->last_turn_ms);
    atomic_store(&srv->last_turn_ms, now);
    if (gap >= srv->opts.stall_ms) {
        pthread_mutex_lock(&srv->lock);
        srv->stall_count++;
        if (gap > srv->longest_stall_ms) srv->longest_stall_ms = gap;
        srv->last_stall_end_ms = now;
        pthread_mutex_unlock(&srv->lock);
        atomic_store(&srv->stall_reported, false);
        log_msg(NLOG_WARN, "server",
                "service loop turned again after a stall of %lld ms",
                (long long)gap);
    }
    lws_sul_schedule(srv->ctx, 0, &srv->tick, on_tick, TICK_US);
}

static void *watchdog_main(void *arg) {
    server *srv = arg;
    while (!atomic_load(&srv->watchdog_stop)) {
        usleep(100 * 1000);
        int64_t silent = server_now_ms() - atomic_load(&srv->last_turn_ms);
        if (silent >= srv->opts.stall_ms &&
            !atomic_exchange(&srv->stall_reported, true))
            log_msg(NLOG_ERROR, "watchdog",
                    "service loop has not turned for %lld ms - HTTP and "
                    "WebSocket clients are not being served",
                    (long long)silent);
    }
    return NULL;
}

/* libwebsockets' own log lines, through netra's logger. */
static void lws_log_line(int level, const char *line) {
    char text[512];
    snprintf(text, sizeof text, "%s", line);
    size_t n = strlen(text);
    while (n && (text[n - 1] == '\n' || text[n - 1] == '\r')) text[--n] = 0;
    /* lws prefixes a time stamp and a level letter: keep the message. */
    const char *msg = text;
    const char *mark = strstr(text, "] ");
    if (mark && text[0] == '[') msg = mark + 2;
    if (msg[0] && msg[1] == ':' && msg[2] == ' ') msg += 3;
    log_msg(level & LLL_ERR ? NLOG_ERROR : NLOG_WARN, "lws", "%s", msg);
}

static void set_start_state(server *srv, int state, const char *why) {
    pthread_mutex_lock(&srv->lock);
    srv->start_state = state;
    if (why) snprintf(srv->start_err, sizeof srv->start_err, "%s", why);
    pthread_cond_broadcast(&srv->cond);
    pthread_mutex_unlock(&srv->lock);
}

static void *service_main(void *arg) {
    server *srv = arg;
    struct lws_context_creation_info info;
    memset(&info, 0, sizeof info);
    info.port = srv->opts.port;
    info.iface = srv->opts.host;
    info.protocols = protocols;
    info.user = srv;
    info.max_http_header_data = (unsigned short)srv->opts.max_header_bytes;
    info.options = LWS_SERVER_OPTION_VALIDATE_UTF8;
    info.retry_and_idle_policy = &srv->keepalive;
    /* An IPv4 iface on an IPv6 build would listen everywhere. */
    if (!strchr(srv->opts.host, ':'))
        info.options |= LWS_SERVER_OPTION_DISABLE_IPV6;
    else
        info.options |= LWS_SERVER_OPTION_IPV6_V6ONLY_MODIFY |
                        LWS_SERVER_OPTION_IPV6_V6ONLY_VALUE;
    lws_set_log_level(LLL_ERR | LLL_WARN, lws_log_line);

    srv->ctx = lws_create_context(&info);
    srv->vhost = srv->ctx ? lws_get_vhost_by_name(srv->ctx, "default") : NULL;
    srv->port = srv->vhost ? lws_get_vhost_listen_port(srv->vhost) : -1;
    if (!srv->ctx || srv->port <= 0) {
        char why[200];
        snprintf(why, sizeof why,
                 "cannot listen on %s:%d - is the port in use or the address "
                 "not on this machine? Choose another with --listen",
                 srv->opts.host, srv->opts.port);
        if (srv->ctx) lws_context_destroy(srv->ctx);
        srv->ctx = NULL;
        set_start_state(srv, -1, why);
        return NULL;
    }
    atomic_store(&srv->last_turn_ms, server_now_ms());
    lws_sul_schedule(srv->ctx, 0, &srv->tick, on_tick, TICK_US);
    set_start_state(srv, 1, NULL);

    for (;;) {
        if (lws_service(srv->ctx, 0) < 0) break;
        if (srv->closing_all &&
            (atomic_load(&srv->connections) == 0 ||
             server_now_ms() >= srv->stop_deadline_ms))
            break;
    }
    lws_sul_cancel(&srv->tick);
    lws_context_destroy(srv->ctx);
    srv->ctx = NULL;
    for (int v = 0; v < 2; v++) {
        free(srv->snapshot[v]);
        srv->snapshot[v] = NULL;
    }
    return NULL;
}

server *server_start(runtime *rt, const server_options *opts, char *err,
                     size_t err_size) {
    server *srv = calloc(1, sizeof *srv);
    if (!srv) {
        snprintf(err, err_size, "out of memory");
        return NULL;
    }
    srv->rt = rt;
    srv->opts = *opts;
    if (srv->opts.stall_ms <= 0) srv->opts.stall_ms = 2000;
    if (srv->opts.max_header_bytes <= 0) srv->opts.max_header_bytes = 16384;
    if (!srv->opts.max_message_bytes) srv->opts.max_message_bytes = 1 << 20;
    if (!srv->opts.max_outbox_bytes) srv->opts.max_outbox_bytes = 8u << 20;
    if (srv->opts.ping_s <= 0) srv->opts.ping_s = 30;
    if (srv->opts.hangup_s <= srv->opts.ping_s)
        srv->opts.hangup_s = srv->opts.ping_s + 10;
    srv->keepalive.secs_since_valid_ping = (uint16_t)srv->opts.ping_s;
    srv->keepalive.secs_since_valid_hangup = (uint16_t)srv->opts.hangup_s;
    srv->ws_list.next = srv->ws_list.prev = &srv->ws_list;
    pthread_mutex_init(&srv->inbox_lock, NULL);
    pthread_mutex_init(&srv->lock, NULL);
    pthread_cond_init(&srv->cond, NULL);

    if (pthread_create(&srv->thread, NULL, service_main, srv)) {
        snprintf(err, err_size, "cannot start the service thread: %s",
                 strerror(errno));
        server_free(srv);
        return NULL;
    }
    srv->thread_started = true;
    pthread_mutex_lock(&srv->lock);
    while (srv->start_state == 0) pthread_cond_wait(&srv->cond, &srv->lock);
    pthread_mutex_unlock(&srv->lock);
    if (srv->start_state < 0) {
        snprintf(err, err_size, "%s", srv->start_err);
        server_free(srv);
        return NULL;
    }
    if (!pthread_create(&srv->watchdog, NULL, watchdog_main, srv))
        srv->watchdog_started = true;
    return srv;
}

int server_port(const server *srv) {
    return srv->port;
}

int64_t server_last_turn_ms(const server *srv) {
    return atomic_load(&((server *)srv)->last_turn_ms);
}

int server_connections(const server *srv) {
    return atomic_load(&((server *)srv)->connections);
}

void server_set_handler(server *srv, const server_handler *handler) {
    pthread_mutex_lock(&srv->inbox_lock);
    srv->handler = *handler;
    pthread_mutex_unlock(&srv->inbox_lock);
}

void server_set_auth(server *srv, const server_auth *auth) {
    pthread_mutex_lock(&srv->inbox_lock);
    srv->auth = *auth;
    pthread_mutex_unlock(&srv->inbox_lock);
}

int server_send(server *srv, uint64_t conn_id, char *text, size_t len) {
    inbox_item *it = calloc(1, sizeof *it);
    if (!it || atomic_load(&srv->stop_requested)) {
        free(it);
        free(text);
        return -1;
    }
    it->kind = INBOX_SEND;
    it->conn_id = conn_id;
    it->text = text;
    it->len = len;
    push_inbox(srv, it);
    return 0;
}

void server_broadcast(server *srv, const char *text) {
    inbox_item *it = calloc(1, sizeof *it);
    if (!it) return;
    it->kind = INBOX_BROADCAST;
    it->text = strdup(text);
    it->len = it->text ? strlen(text) : 0;
    push_inbox(srv, it);
}

void server_close(server *srv, uint64_t conn_id, int code,
                  const char *reason) {
    inbox_item *it = calloc(1, sizeof *it);
    if (!it) return;
    it->kind = INBOX_CLOSE;
    it->conn_id = conn_id;
    it->code = code;
    it->text = strdup(reason ? reason : "");
    push_inbox(srv, it);
}

void server_begin_close(server *srv) {
    atomic_store(&srv->refuse_new, true);
}

void server_stop(server *srv, int grace_ms) {
    if (!srv || !srv->thread_started) return;
    atomic_store(&srv->refuse_new, true);
    srv->stop_deadline_ms = server_now_ms() + (grace_ms > 0 ? grace_ms : 0);
    atomic_store(&srv->stop_requested, true);
    if (srv->ctx) lws_cancel_service(srv->ctx);
    pthread_join(srv->thread, NULL);
    srv->thread_started = false;
    if (srv->watchdog_started) {
        atomic_store(&srv->watchdog_stop, true);
        pthread_join(srv->watchdog, NULL);
        srv->watchdog_started = false;
    }
}

void server_free(server *srv) {
    if (!srv) return;
    server_stop(srv, 0);
    for (inbox_item *it = srv->inbox_head, *next; it; it = next) {
        next = it->next;
        free(it->text);
        free(it);
    }
    pthread_mutex_destroy(&srv->inbox_lock);
    pthread_mutex_destroy(&srv->lock);
    pthread_cond_destroy(&srv->cond);
    free(srv);
}

/* ---- the bridge component ------------------------------------------------ */

/* Connects to the listener with a short timeout. Returns 0 or errno. */
static int probe_listener(const server *srv) {
    bool v6 = strchr(srv->opts.host, ':') != NULL;
    int fd = socket(v6 ? AF_INET6 : AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (fd < 0) return errno;
    struct sockaddr_storage ss;
    memset(&ss, 0, sizeof ss);
    socklen_t sl;
    if (v6) {
        struct sockaddr_in6 *a = (struct sockaddr_in6 *)&ss;
        a->sin6_family = AF_INET6;
        a->sin6_port = htons((uint16_t)srv->port);
        inet_pton(AF_INET6, srv->opts.host, &a->sin6_addr);
        sl = sizeof *a;
    } else {
        struct sockaddr_in *a = (struct sockaddr_in *)&ss;
        a->sin_family = AF_INET;
        a->sin_port = htons((uint16_t)srv->port);
        const char *h = strcmp(srv->opts.host, "0.0.0.0") ? srv->opts.host
                                                          : "127.0.0.1";
        inet_pton(AF_INET, h, &a->sin_addr);
        sl = sizeof *a;
    }
    int rc = 0;
    if (connect(fd, (struct sockaddr *)&ss, sl) < 0) {
        rc = errno;
        if (rc == EINPROGRESS) {
            struct pollfd pfd = {.fd = fd, .events = POLLOUT};
            rc = poll(&pfd, 1, 1000) == 1 ? 0 : ETIMEDOUT;
            if (!rc) {
                int so = 0;
                socklen_t sol = sizeof so;
                getsockopt(fd, SOL_SOCKET, SO_ERROR, &so, &sol);
                rc = so;
            }
        }
    }
    close(fd);
    return rc;
}

health_status server_bridge_check(void *ud, char *message, size_t size,
                                  cJSON **observed) {
    server *srv = ud;
    int64_t now = server_now_ms();
    int64_t silent = now - server_last_turn_ms(srv);
    int connections = server_connections(srv);

    cJSON *o = cJSON_CreateObject();
    cJSON_AddNumberToObject(o, "connections", connections);
    cJSON_AddNumberToObject(o, "runs_in_flight",
                            srv->rt ? atomic_load(&srv->rt->requests) : 0);
    cJSON_AddNumberToObject(o, "loop_silent_ms", (double)silent);
    *observed = o;

    int rc = srv->thread_started ? probe_listener(srv) : ECONNREFUSED;
    if (rc) {
        snprintf(message, size, "listener %s:%d does not accept: %s",
                 srv->opts.host, srv->port, strerror(rc));
        return HEALTH_UNHEALTHY;
    }
    if (silent >= srv->opts.stall_ms) {
        snprintf(message, size,
                 "service loop has not turned for %lld ms (stalled)",
                 (long long)silent);
        return HEALTH_UNHEALTHY;
    }

    pthread_mutex_lock(&srv->lock);
    int stalls = srv->stall_count;
    int64_t longest = srv->longest_stall_ms, last_end = srv->last_stall_end_ms;
    pthread_mutex_unlock(&srv->lock);
    cJSON_AddNumberToObject(o, "stalls", stalls);
    if (stalls && now - last_end < RECENT_STALL_MS) {
        snprintf(message, size,
                 "listening on %s:%d; the service loop stalled %d time(s), "
                 "longest %lld ms, last one ended %lld ms ago",
                 srv->opts.host, srv->port, stalls, (long long)longest,
                 (long long)(now - last_end));
        return HEALTH_DEGRADED;
    }
    snprintf(message, size,
             "listening on %s:%d; service loop turned %lld ms ago; %d "
             "connection(s)%s",
             srv->opts.host, srv->port, (long long)silent, connections,
             stalls ? "; earlier stalls recovered" : "");
    return HEALTH_HEALTHY;
}

int server_register_bridge(server *srv, const health_spec *schedule,
                           char *err, size_t err_size) {
    health_spec spec;
    if (schedule) spec = *schedule;
    else memset(&spec, 0, sizeof spec);
    spec.name = "agent_websocket_bridge";
    if (!spec.type) spec.type = "component";
    if (!spec.measurement) spec.measurement = "connections";
    spec.check = server_bridge_check;
    spec.ud = srv;
    spec.ud_free = NULL;
    if (!schedule) {
        spec.required = true;
        spec.interval_ms = 1000;
        spec.timeout_ms = 1500;
    }
    return health_register(srv->rt->health, &spec, err, err_size);
}
