/* console: the control socket and its client (see console.h). */
#include "console.h"

#include <dirent.h>
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cJSON.h>

#include "log.h"
#include "reload.h"

#define CONSOLE_MAX_LINE (1u << 20)

struct console {
    runtime *rt;
    int fd;
    char path[sizeof(((struct sockaddr_un *)0)->sun_path)];
    pthread_t thread;
    atomic_bool stop;
    pthread_mutex_t lock; /* guards pol and pool */
    policy *pol;
    struct disp_pool *pool;
};

/* ---- paths ------------------------------------------------------------------ */

void console_run_dir(config *cfg, char *out, size_t size) {
    const char *dir = config_get(cfg, "NETRA_RUN_DIR");
    const char *xdg = getenv("XDG_RUNTIME_DIR");
    if (dir) snprintf(out, size, "%s", dir);
    else if (xdg && *xdg) snprintf(out, size, "%s/netra", xdg);
    else snprintf(out, size, "/run/netra");
}

/* Makes dir (0700) when missing and checks that only its owner, this
 * user, may write there. Returns 0, or -1 with err filled. */
static int check_run_dir(const char *dir, char *err, size_t size) {
    if (mkdir(dir, 0700) < 0 && errno != EEXIST) {
        snprintf(err, size, "cannot create the run directory %s: %s - set "
                            "NETRA_RUN_DIR to a directory of yours",
                 dir, strerror(errno));
        return -1;
    }
    struct stat st;
    if (lstat(dir, &st) < 0 || !S_ISDIR(st.st_mode)) {
        snprintf(err, size, "the run directory %s is not a directory", dir);
        return -1;
    }
    if (st.st_uid != geteuid()) {
        snprintf(err, size, "the run directory %s belongs to uid %u, not to "
                            "this user (uid %u) - use a directory of yours",
                 dir, (unsigned)st.st_uid, (unsigned)geteuid());
        return -1;
    }
    if (st.st_mode & (S_IWGRP | S_IWOTH)) {
        snprintf(err, size, "the run directory %s is writable by group or "
                            "others (mode %04o) - chmod 700 %s",
                 dir, (unsigned)(st.st_mode & 07777), dir);
        return -1;
    }
    return 0;
}

static int fill_addr(struct sockaddr_un *sa, const char *path) {
    memset(sa, 0, sizeof *sa);
    sa->sun_family = AF_UNIX;
    if (strlen(path) >= sizeof sa->sun_path) return -1;
    memcpy(sa->sun_path, path, strlen(path) + 1);
    return 0;
}

/* True when a server answers on path. */
static bool socket_live(const char *path) {
    struct sockaddr_un sa;
    if (fill_addr(&sa, path) < 0) return false;
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return false;
    bool live = connect(fd, (struct sockaddr *)&sa, sizeof sa) == 0;
    close(fd);
    return live;
}

/* Binds and listens on path (mode 0600). Returns the fd or -1. */
static int open_socket(const char *path, char *err, size_t size) {
    struct sockaddr_un sa;
    if (fill_addr(&sa, path) < 0) {
        snprintf(err, size, "the socket path %s is too long - set a "
                            "shorter NETRA_RUN_DIR", path);
        return -1;
    }
    struct stat st;
    if (lstat(path, &st) == 0) {
        if (!S_ISSOCK(st.st_mode) || socket_live(path)) {
            snprintf(err, size, "%s is in use (another netra on this "
                                "port?)", path);
            return -1;
        }
        unlink(path); /* left by a server that died */
    }
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0 || bind(fd, (struct sockaddr *)&sa, sizeof sa) < 0 ||
        chmod(path, 0600) < 0 || listen(fd, 4) < 0) {
        snprintf(err, size, "cannot open the control socket %s: %s", path,
                 strerror(errno));
        if (fd >= 0) close(fd);
        unlink(path);
        return -1;
    }
    return fd;
}

/* ---- one connection ------------------------------------------------------------ */

static int send_all(int fd, const char *data, size_t len) {
    while (len > 0) {
        ssize_t n = send(fd, data, len, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return -1;
        data += n;
        len -= (size_t)n;
    }
    return 0;
}

/* Sends a JSON object as one line and frees it. */
static int send_json(int fd, cJSON *obj) {
    char *text = cJSON_PrintUnformatted(obj);
    cJSON_Delete(obj);
    if (!text) return -1;
    int rc = send_all(fd, text, strlen(text));
    if (rc == 0) rc = send_all(fd, "\n", 1);
    free(text);
    return rc;
}

typedef struct {
    char *buf;
    size_t len, cap;
} line_reader;

/* Reads one line (without '\n') into a malloc'd string. Returns 1, 0 at
 * end of input or when stopping, -1 on an error or a line too long. */
static int read_line(console *c, int fd, line_reader *lr, char **line) {
    for (;;) {
        char *nl = lr->len ? memchr(lr->buf, '\n', lr->len) : NULL;
        if (nl) {
            size_t n = (size_t)(nl - lr->buf);
            *line = strndup(lr->buf, n);
            memmove(lr->buf, nl + 1, lr->len - n - 1);
            lr->len -= n + 1;
            return *line ? 1 : -1;
        }
        if (lr->len >= CONSOLE_MAX_LINE) return -1;
        if (lr->cap - lr->len < 4096) {
            size_t cap = lr->cap ? lr->cap * 2 : 8192;
            char *grown = realloc(lr->buf, cap);
            if (!grown) return -1;
            lr->buf = grown;
            lr->cap = cap;
        }
        if (c && atomic_load(&c->stop)) return 0;
        ssize_t n = recv(fd, lr->buf + lr->len, lr->cap - lr->len, 0);
        if (n == 0) return 0;
        if (n < 0) {
            if (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK)
                continue;
            return -1;
        }
        lr->len += (size_t)n;
    }
}

static int console_reload(void *ud, char *err, size_t size) {
    console *c = ud;
    return reload_request(c->rt, "an operator on the console", err, size);
}

static const char *status_name(repl_status st) {
    return st == REPL_OK ? "ok" : st == REPL_INCOMPLETE ? "incomplete"
                                                         : "error";
}

/* Answers one request line. Returns 0, or -1 to hang up. */
static int answer(console *c, int fd, repl *r, const char *who,
                  const char *line) {
    cJSON *req = cJSON_Parse(line);
    const char *op = cJSON_GetStringValue(cJSON_GetObjectItem(req, "op"));
    cJSON *reply = cJSON_CreateObject();
    if (op && !strcmp(op, "eval")) {
        const char *chunk =
            cJSON_GetStringValue(cJSON_GetObjectItem(req, "chunk"));
        char shown[240];
        snprintf(shown, sizeof shown, "%s", chunk ? chunk : "");
        for (char *p = shown; *p; p++)
            if (*p == '\n' || *p == '\r' || *p == '\t') *p = ' ';
        log_msg(NLOG_INFO, "console", "operator %s evaluates: %s", who,
                shown);
        char *text = NULL;
        repl_status st = repl_eval(r, chunk ? chunk : "", &text);
        cJSON_AddStringToObject(reply, "status", status_name(st));
        if (text) cJSON_AddStringToObject(reply, "text", text);
        if (st == REPL_ERROR)
            log_msg(NLOG_INFO, "console", "operator %s: evaluation failed: "
                    "%.200s", who, text ? text : "");
        free(text);
    } else if (op && !strcmp(op, "complete")) {
        const char *text =
            cJSON_GetStringValue(cJSON_GetObjectItem(req, "line"));
        char **list = repl_complete(r, text ? text : "");
        cJSON *arr = cJSON_AddArrayToObject(reply, "matches");
        for (char **p = list; p && *p; p++)
            cJSON_AddItemToArray(arr, cJSON_CreateString(*p));
        repl_free_list(list);
    } else {
        cJSON_AddStringToObject(reply, "status", "error");
        cJSON_AddStringToObject(reply, "text",
                                "bad request: expected one JSON object per "
                                "line with op \"eval\" or \"complete\"");
    }
    cJSON_Delete(req);
    (void)c;
    return send_json(fd, reply);
}

static void serve_client(console *c, int fd) {
    struct ucred cred;
    socklen_t len = sizeof cred;
    char who[64];
    if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0) {
        log_msg(NLOG_WARN, "console", "cannot read the peer's credentials "
                "(%s); connection closed", strerror(errno));
        return;
    }
    snprintf(who, sizeof who, "uid=%u pid=%d", (unsigned)cred.uid,
             (int)cred.pid);
    if (cred.uid != geteuid() && cred.uid != 0) {
        log_msg(NLOG_WARN, "console", "refused %s: not this server's user",
                who);
        return;
    }
    struct timeval tv = {.tv_sec = 0, .tv_usec = 200000};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);

    /* The session pins the generation it starts with (see reload.h). */
    atomic_fetch_add(&c->rt->pins, 1);
    policy *pol = reload_current_policy(c->rt);
    struct disp_pool *pool = reload_current_pool(c->rt);
    pthread_mutex_lock(&c->lock);
    if (!pol) pol = c->pol;
    if (!pool) pool = c->pool;
    repl_options ro = {.rt = c->rt, .policy = pol, .own_state = true,
                       .bounded = true, .who = who, .tag = "console",
                       .reload = console_reload, .reload_ud = c};
    pthread_mutex_unlock(&c->lock);
    char err[1024];
    repl *r = repl_new(&ro, err, sizeof err);
    if (!r) {
        log_msg(NLOG_ERROR, "console", "%s", err);
        cJSON *bye = cJSON_CreateObject();
        cJSON_AddStringToObject(bye, "error", err);
        send_json(fd, bye);
        atomic_fetch_sub(&c->rt->pins, 1);
        return;
    }
    repl_set_pool(r, pool);
    log_msg(NLOG_INFO, "console", "operator %s attached", who);

    cJSON *hello = cJSON_CreateObject();
    cJSON_AddStringToObject(hello, "hello", "netra");
    cJSON_AddStringToObject(hello, "version", NETRA_VERSION);
    cJSON_AddStringToObject(hello, "environment",
                            config_environment(c->rt->cfg));
    cJSON_AddNumberToObject(hello, "pid", (double)getpid());
    line_reader lr = {0};
    char *line = NULL;
    if (send_json(fd, hello) == 0) {
        while (read_line(c, fd, &lr, &line) == 1) {
            int rc = answer(c, fd, r, who, line);
            free(line);
            if (rc < 0) break;
        }
    }
    free(lr.buf);
    repl_free(r);
    atomic_fetch_sub(&c->rt->pins, 1);
    log_msg(NLOG_INFO, "console", "operator %s detached", who);
}

static void *console_main(void *arg) {
    console *c = arg;
    while (!atomic_load(&c->stop)) {
        struct pollfd p = {.fd = c->fd, .events = POLLIN};
        if (poll(&p, 1, 200) <= 0) continue;
        int fd = accept4(c->fd, NULL, NULL, SOCK_CLOEXEC);
        if (fd < 0) continue;
        serve_client(c, fd);
        close(fd);
    }
    return NULL;
}

/* ---- server side -------------------------------------------------------------- */

console *console_start(runtime *rt, int port) {
    bool on = false;
    char err[1024], dir[sizeof(((struct sockaddr_un *)0)->sun_path) + 64];
    const char *env = config_environment(rt->cfg);
    if (repl_gating(rt, &on, NULL, NULL, err, sizeof err) < 0) {
        log_msg(NLOG_ERROR, "console", "%s; serving without the console",
                err);
        return NULL;
    }
    if (!on) {
        log_msg(NLOG_INFO, "console", "control socket off in %s (gating "
                "table or NETRA_CONSOLE) - set NETRA_CONSOLE=on to open it",
                env);
        return NULL;
    }
    console_run_dir(rt->cfg, dir, sizeof dir);
    if (check_run_dir(dir, err, sizeof err) < 0) {
        log_msg(NLOG_ERROR, "console", "refusing the control socket: %s; "
                "serving continues without the console", err);
        return NULL;
    }
    console *c = calloc(1, sizeof *c);
    if (!c) return NULL;
    c->rt = rt;
    pthread_mutex_init(&c->lock, NULL);
    int n = snprintf(c->path, sizeof c->path, "%s/netra-%d.sock", dir, port);
    c->fd = n < (int)sizeof c->path ? open_socket(c->path, err, sizeof err)
                                    : -1;
    if (n >= (int)sizeof c->path)
        snprintf(err, sizeof err, "the socket path under %s is too long - "
                                  "set a shorter NETRA_RUN_DIR", dir);
    if (c->fd < 0 ||
        pthread_create(&c->thread, NULL, console_main, c) != 0) {
        log_msg(NLOG_ERROR, "console", "%s; serving continues without the "
                "console", err);
        if (c->fd >= 0) {
            close(c->fd);
            unlink(c->path);
        }
        pthread_mutex_destroy(&c->lock);
        free(c);
        return NULL;
    }
    log_msg(NLOG_INFO, "console", "control socket %s (mode 0600); attach "
            "with: netra repl --attach %s", c->path, c->path);
    return c;
}

void console_set_policy(console *c, policy *p) {
    if (!c) return;
    pthread_mutex_lock(&c->lock);
    c->pol = p;
    pthread_mutex_unlock(&c->lock);
}

void console_set_pool(console *c, struct disp_pool *pool) {
    if (!c) return;
    pthread_mutex_lock(&c->lock);
    c->pool = pool;
    pthread_mutex_unlock(&c->lock);
}

const char *console_path(const console *c) {
    return c->path;
}

void console_stop(console *c) {
    if (!c) return;
    atomic_store(&c->stop, true);
    pthread_join(c->thread, NULL);
    close(c->fd);
    unlink(c->path);
    pthread_mutex_destroy(&c->lock);
    free(c);
}

int console_find(const char *dir, char *out, size_t size, char *list,
                 size_t list_size) {
    DIR *d = opendir(dir);
    int found = 0;
    size_t used = 0;
    if (list_size) list[0] = '\0';
    if (!d) return 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        size_t n = strlen(e->d_name);
        if (strncmp(e->d_name, "netra-", 6) || n < 11 ||
            strcmp(e->d_name + n - 5, ".sock"))
            continue;
        /* A socket nobody listens on was left by a server that died. */
        char path[PATH_MAX];
        snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
        int fd = socket(AF_UNIX, SOCK_STREAM, 0);
        struct sockaddr_un sa = {.sun_family = AF_UNIX};
        bool alive = false;
        if (strlen(path) < sizeof sa.sun_path) {
            memcpy(sa.sun_path, path, strlen(path) + 1);
            alive = fd >= 0 &&
                    connect(fd, (struct sockaddr *)&sa, sizeof sa) == 0;
        }
        if (fd >= 0) close(fd);
        if (!alive) continue;
        found++;
        snprintf(out, size, "%s/%s", dir, e->d_name);
        if (used < list_size)
            used += (size_t)snprintf(list + used, list_size - used, "%s\n",
                                     out);
    }
    closedir(d);
    return found;
}

/* ---- client side ------------------------------------------------------------------ */

struct console_client {
    int fd;
    line_reader lr;
};

/* Reads one reply line as JSON; NULL when the connection broke. */
static cJSON *read_reply(console_client *cc) {
    char *line = NULL;
    if (read_line(NULL, cc->fd, &cc->lr, &line) != 1) return NULL;
    cJSON *v = cJSON_Parse(line);
    free(line);
    return v;
}

console_client *console_connect(const char *path, char *hello,
                                size_t hello_size, char *err,
                                size_t err_size) {
    struct sockaddr_un sa;
    if (fill_addr(&sa, path) < 0) {
        snprintf(err, err_size, "socket path too long: %s", path);
        return NULL;
    }
    console_client *cc = calloc(1, sizeof *cc);
    if (!cc) return NULL;
    cc->fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (cc->fd < 0 || connect(cc->fd, (struct sockaddr *)&sa, sizeof sa)) {
        snprintf(err, err_size, "cannot connect to %s: %s - is netra serve "
                                "running with its console on?",
                 path, strerror(errno));
        console_close(cc);
        return NULL;
    }
    cJSON *h = read_reply(cc);
    const char *name = cJSON_GetStringValue(cJSON_GetObjectItem(h, "hello"));
    if (!name) {
        const char *why =
            cJSON_GetStringValue(cJSON_GetObjectItem(h, "error"));
        snprintf(err, err_size, "%s did not greet as a netra console%s%s",
                 path, why ? ": " : "", why ? why : "");
        cJSON_Delete(h);
        console_close(cc);
        return NULL;
    }
    cJSON *env = cJSON_GetObjectItem(h, "environment");
    cJSON *pid = cJSON_GetObjectItem(h, "pid");
    cJSON *ver = cJSON_GetObjectItem(h, "version");
    snprintf(hello, hello_size, "attached to %s (netra %s, environment %s, "
             "pid %d)", path, cJSON_GetStringValue(ver),
             cJSON_GetStringValue(env), (int)cJSON_GetNumberValue(pid));
    cJSON_Delete(h);
    return cc;
}

/* Sends one request object and reads the reply; NULL when broken. */
static cJSON *request(console_client *cc, cJSON *req) {
    if (send_json(cc->fd, req) < 0) return NULL;
    return read_reply(cc);
}

repl_status console_eval(console_client *cc, const char *chunk, char **text) {
    cJSON *req = cJSON_CreateObject();
    cJSON_AddStringToObject(req, "op", "eval");
    cJSON_AddStringToObject(req, "chunk", chunk);
    cJSON *reply = request(cc, req);
    if (!reply) {
        *text = strdup("the server closed the console connection");
        return REPL_ERROR;
    }
    const char *st = cJSON_GetStringValue(cJSON_GetObjectItem(reply,
                                                              "status"));
    const char *t = cJSON_GetStringValue(cJSON_GetObjectItem(reply, "text"));
    *text = t ? strdup(t) : NULL;
    repl_status status = REPL_ERROR;
    if (st && !strcmp(st, "ok")) status = REPL_OK;
    else if (st && !strcmp(st, "incomplete")) status = REPL_INCOMPLETE;
    cJSON_Delete(reply);
    return status;
}

char **console_complete(console_client *cc, const char *line) {
    cJSON *req = cJSON_CreateObject();
    cJSON_AddStringToObject(req, "op", "complete");
    cJSON_AddStringToObject(req, "line", line);
    cJSON *reply = request(cc, req);
    cJSON *arr = cJSON_GetObjectItem(reply, "matches");
    int n = cJSON_GetArraySize(arr);
    char **list = n > 0 ? calloc((size_t)n + 1, sizeof *list) : NULL;
    for (int i = 0; list && i < n; i++) {
        const char *s = cJSON_GetStringValue(cJSON_GetArrayItem(arr, i));
        list[i] = strdup(s ? s : "");
    }
    cJSON_Delete(reply);
    return list;
}

void console_close(console_client *cc) {
    if (!cc) return;
    if (cc->fd >= 0) close(cc->fd);
    free(cc->lr.buf);
    free(cc);
}
