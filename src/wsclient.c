/* wsclient: a small blocking WebSocket client (see wsclient.h). */
#include "wsclient.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <poll.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <openssl/evp.h>
#include <openssl/rand.h>
#include <openssl/sha.h>

#define WS_GUID "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

enum { OP_CONT = 0, OP_TEXT = 1, OP_BINARY = 2, OP_CLOSE = 8, OP_PING = 9,
       OP_PONG = 10 };

struct wsc {
    int fd;
    bool open;         /* neither side has closed */
    bool close_sent;
    int close_code;    /* the server's, once it closed */
    unsigned char *in; /* bytes read, not yet parsed */
    size_t in_len, in_cap;
    char *msg;         /* a fragmented message being joined */
    size_t msg_len;
    bool in_message;
};

static int64_t now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Writes all of buf. Returns 0 or -1 (errno set). */
static int write_all(int fd, const void *buf, size_t len) {
    const char *p = buf;
    while (len) {
        ssize_t n = send(fd, p, len, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            struct pollfd pfd = {.fd = fd, .events = POLLOUT};
            poll(&pfd, 1, 1000);
            continue;
        }
        if (n <= 0) return -1;
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

/* Reads what is there into c->in, waiting up to timeout_ms. Returns
 * bytes read (> 0), 0 on timeout, -1 on EOF or error. */
static int fill(wsc *c, int timeout_ms) {
    struct pollfd pfd = {.fd = c->fd, .events = POLLIN};
    int r = poll(&pfd, 1, timeout_ms < 0 ? 0 : timeout_ms);
    if (r < 0 && errno == EINTR) return 0;
    if (r <= 0) return r;
    if (c->in_cap - c->in_len < 16384) {
        size_t cap = c->in_cap ? c->in_cap * 2 : 65536;
        unsigned char *p = realloc(c->in, cap);
        if (!p) return -1;
        c->in = p;
        c->in_cap = cap;
    }
    ssize_t n = recv(c->fd, c->in + c->in_len, c->in_cap - c->in_len, 0);
    if (n < 0 && (errno == EINTR || errno == EAGAIN)) return 0;
    if (n <= 0) return -1;
    c->in_len += (size_t)n;
    return (int)n;
}

static void consume(wsc *c, size_t n) {
    memmove(c->in, c->in + n, c->in_len - n);
    c->in_len -= n;
}

/* Sends one masked frame. Returns 0 or -1. */
static int send_frame(wsc *c, int opcode, const void *data, size_t len) {
    unsigned char head[14], mask[4];
    size_t h = 0;
    head[h++] = (unsigned char)(0x80 | opcode);
    if (len < 126) {
        head[h++] = (unsigned char)(0x80 | len);
    } else if (len <= 0xffff) {
        head[h++] = 0x80 | 126;
        head[h++] = (unsigned char)(len >> 8);
        head[h++] = (unsigned char)len;
    } else {
        head[h++] = 0x80 | 127;
        for (int i = 7; i >= 0; i--)
            head[h++] = (unsigned char)((uint64_t)len >> (8 * i));
    }
    if (RAND_bytes(mask, sizeof mask) != 1) return -1;
    memcpy(head + h, mask, 4);
    h += 4;

    unsigned char *buf = malloc(h + len + 1);
    if (!buf) return -1;
    memcpy(buf, head, h);
    const unsigned char *src = data;
    for (size_t i = 0; i < len; i++) buf[h + i] = src[i] ^ mask[i & 3];
    int rc = write_all(c->fd, buf, h + len);
    free(buf);
    return rc;
}

/* ---- the handshake ------------------------------------------------------ */

static int open_socket(const char *host, int port, int timeout_ms, char *err,
                       size_t err_size) {
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM,
                             .ai_flags = AI_NUMERICHOST | AI_NUMERICSERV};
    struct addrinfo *ai = NULL;
    char service[16];
    snprintf(service, sizeof service, "%d", port);
    int rc = getaddrinfo(host, service, &hints, &ai);
    if (rc != 0) {
        snprintf(err, err_size, "address '%s': %s (give a numeric address)",
                 host, gai_strerror(rc));
        return -1;
    }
    int fd = socket(ai->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        snprintf(err, err_size, "socket: %s", strerror(errno));
        freeaddrinfo(ai);
        return -1;
    }
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    rc = connect(fd, ai->ai_addr, ai->ai_addrlen);
    freeaddrinfo(ai);
    if (rc < 0 && errno == EINPROGRESS) {
        struct pollfd pfd = {.fd = fd, .events = POLLOUT};
        int soerr = ETIMEDOUT;
        socklen_t sl = sizeof soerr;
        if (poll(&pfd, 1, timeout_ms) == 1)
            getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &sl);
        rc = soerr ? -1 : 0;
        errno = soerr;
    }
    if (rc < 0) {
        snprintf(err, err_size, "connect to %s:%d: %s", host, port,
                 strerror(errno));
        close(fd);
        return -1;
    }
    return fd;
}

/* The Sec-WebSocket-Accept value for key. */
static void accept_value(const char *key, char out[64]) {
    char buf[128];
    unsigned char digest[SHA_DIGEST_LENGTH];
    snprintf(buf, sizeof buf, "%s%s", key, WS_GUID);
    SHA1((const unsigned char *)buf, strlen(buf), digest);
    EVP_EncodeBlock((unsigned char *)out, digest, SHA_DIGEST_LENGTH);
}

/* The value of header `name` in the response head, copied into out. */
static bool find_header(const char *head, const char *name, char *out,
                        size_t size) {
    size_t n = strlen(name);
    for (const char *p = strstr(head, "\r\n"); p; p = strstr(p, "\r\n")) {
        p += 2;
        if (!strncasecmp(p, name, n) && p[n] == ':') {
            const char *v = p + n + 1;
            while (*v == ' ' || *v == '\t') v++;
            size_t len = strcspn(v, "\r\n");
            snprintf(out, size, "%.*s", (int)len, v);
            return true;
        }
    }
    return false;
}

/* Reads the response head (up to the blank line). Returns its length
 * including the blank line, or -1. */
static long read_head(wsc *c, int64_t deadline, char *err, size_t err_size) {
    for (;;) {
        if (c->in_len) {
            void *end = memmem(c->in, c->in_len, "\r\n\r\n", 4);
            if (end) return (long)((unsigned char *)end - c->in) + 4;
        }
        if (c->in_len > 65536) {
            snprintf(err, err_size, "upgrade answer head over 64 KB");
            return -1;
        }
        int64_t left = deadline - now_ms();
        int r = left > 0 ? fill(c, (int)left) : 0;
        if (r < 0 || (r == 0 && now_ms() >= deadline)) {
            snprintf(err, err_size, r < 0 ? "the server closed the "
                     "connection during the upgrade" : "no upgrade answer "
                     "in time");
            return -1;
        }
    }
}

/* Sends the upgrade request and checks the answer. Returns 0 or -1. */
static int handshake(wsc *c, const char *host, int port, const char *path,
                     const char *const *headers, int timeout_ms, int *status,
                     char *err, size_t err_size) {
    unsigned char raw[16];
    char key[32], want[64], got[128];
    RAND_bytes(raw, sizeof raw);
    EVP_EncodeBlock((unsigned char *)key, raw, sizeof raw);

    size_t cap = 1024, len = 0;
    for (int i = 0; headers && headers[i]; i++) cap += strlen(headers[i]) + 2;
    cap += strlen(path);
    char *req = malloc(cap);
    if (!req) return -1;
    len += (size_t)snprintf(req + len, cap - len,
                            "GET %s HTTP/1.1\r\nHost: %s:%d\r\n"
                            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                            "Sec-WebSocket-Key: %s\r\n"
                            "Sec-WebSocket-Version: 13\r\n",
                            path, host, port, key);
    for (int i = 0; headers && headers[i]; i++)
        len += (size_t)snprintf(req + len, cap - len, "%s\r\n", headers[i]);
    len += (size_t)snprintf(req + len, cap - len, "\r\n");
    int rc = write_all(c->fd, req, len);
    free(req);
    if (rc < 0) {
        snprintf(err, err_size, "sending the upgrade: %s", strerror(errno));
        return -1;
    }

    long head_len = read_head(c, now_ms() + timeout_ms, err, err_size);
    if (head_len < 0) return -1;
    char *head = strndup((const char *)c->in, (size_t)head_len);
    consume(c, (size_t)head_len);
    int code = 0;
    sscanf(head, "HTTP/1.%*d %d", &code);
    *status = code;
    if (code != 101) {
        snprintf(err, err_size, "upgrade refused with HTTP %d", code);
        free(head);
        return -1;
    }
    accept_value(key, want);
    bool ok = find_header(head, "Sec-WebSocket-Accept", got, sizeof got) &&
              !strcmp(got, want);
    free(head);
    if (!ok) {
        snprintf(err, err_size, "upgrade answer has a wrong "
                 "Sec-WebSocket-Accept");
        return -1;
    }
    return 0;
}

wsc *wsc_connect(const char *host, int port, const char *path,
                 const char *const *headers, int timeout_ms, int *http_status,
                 char *err, size_t err_size) {
    int status = 0;
    if (http_status) *http_status = 0;
    int fd = open_socket(host, port, timeout_ms, err, err_size);
    if (fd < 0) return NULL;
    wsc *c = calloc(1, sizeof *c);
    if (!c) {
        close(fd);
        snprintf(err, err_size, "out of memory");
        return NULL;
    }
    c->fd = fd;
    if (handshake(c, host, port, path, headers, timeout_ms, &status, err,
                  err_size) < 0) {
        if (http_status) *http_status = status;
        close(fd);
        free(c->in);
        free(c);
        return NULL;
    }
    if (http_status) *http_status = status;
    c->open = true;
    c->close_code = 1006;
    return c;
}

int wsc_send_text(wsc *c, const char *text, size_t len, char *err,
                  size_t err_size) {
    if (!c->open) {
        snprintf(err, err_size, "the connection is closed (code %d)",
                 c->close_code);
        return -1;
    }
    if (send_frame(c, OP_TEXT, text, len) < 0) {
        c->open = false;
        snprintf(err, err_size, "send failed: %s", strerror(errno));
        return -1;
    }
    return 0;
}

/* ---- frames in ------------------------------------------------------------ */

/* Parses one frame from c->in. Returns 1 with the frame's parts (payload
 * unmasked in place; valid until the next consume), 0 when incomplete,
 * -1 when too large. */
static int parse_frame(wsc *c, int *fin, int *opcode, unsigned char **data,
                       size_t *len, size_t *total) {
    if (c->in_len < 2) return 0;
    unsigned char *p = c->in;
    size_t h = 2;
    uint64_t n = p[1] & 0x7f;
    bool masked = p[1] & 0x80;
    if (n == 126) {
        if (c->in_len < 4) return 0;
        n = ((uint64_t)p[2] << 8) | p[3];
        h = 4;
    } else if (n == 127) {
        if (c->in_len < 10) return 0;
        n = 0;
        for (int i = 0; i < 8; i++) n = (n << 8) | p[2 + i];
        h = 10;
    }
    if (n > WSC_MAX_MESSAGE) return -1;
    size_t mh = masked ? 4 : 0;
    if (c->in_len < h + mh + n) return 0;
    if (masked)
        for (uint64_t i = 0; i < n; i++) p[h + mh + i] ^= p[h + (i & 3)];
    *fin = (p[0] & 0x80) != 0;
    *opcode = p[0] & 0x0f;
    *data = p + h + mh;
    *len = (size_t)n;
    *total = h + mh + (size_t)n;
    return 1;
}

/* Handles a control frame. Returns -1 when it was a close. */
static int control(wsc *c, int opcode, const unsigned char *data,
                   size_t len) {
    if (opcode == OP_PING) {
        send_frame(c, OP_PONG, data, len);
        return 0;
    }
    if (opcode != OP_CLOSE) return 0;
    c->close_code = len >= 2 ? (data[0] << 8) | data[1] : 1005;
    if (!c->close_sent) {
        send_frame(c, OP_CLOSE, data, len >= 2 ? 2 : 0);
        c->close_sent = true;
    }
    c->open = false;
    return -1;
}

/* Adds a data frame to the message being joined. Returns 1 when the
 * message is complete, 0 when more is to come, -1 out of memory. */
static int join(wsc *c, int fin, const unsigned char *data, size_t len) {
    if (c->msg_len + len > WSC_MAX_MESSAGE) return -1;
    char *m = realloc(c->msg, c->msg_len + len + 1);
    if (!m) return -1;
    memcpy(m + c->msg_len, data, len);
    c->msg = m;
    c->msg_len += len;
    c->msg[c->msg_len] = '\0';
    c->in_message = !fin;
    return fin ? 1 : 0;
}

int wsc_recv(wsc *c, int timeout_ms, char **out, size_t *len,
             int *close_code, char *err, size_t err_size) {
    int64_t deadline = now_ms() + (timeout_ms > 0 ? timeout_ms : 0);
    *out = NULL;
    *len = 0;
    for (;;) {
        int fin, opcode;
        unsigned char *data;
        size_t dlen, total;
        int r = c->open ? parse_frame(c, &fin, &opcode, &data, &dlen, &total)
                        : 0;
        if (r < 0) {
            snprintf(err, err_size, "incoming message over %u bytes",
                     WSC_MAX_MESSAGE);
            c->open = false;
            *close_code = c->close_code;
            return -1;
        }
        if (r == 1) {
            int done = 0;
            if (opcode >= OP_CLOSE) {
                done = control(c, opcode, data, dlen) < 0 ? -2 : 0;
            } else {
                done = join(c, fin, data, dlen);
            }
            consume(c, total);
            if (done == 1) {
                *out = c->msg;
                *len = c->msg_len;
                c->msg = NULL;
                c->msg_len = 0;
                return 1;
            }
            if (done == -1 || done == -2) {
                if (done == -2)
                    snprintf(err, err_size, "closed by the server (code %d)",
                             c->close_code);
                else
                    snprintf(err, err_size, "out of memory joining a message");
                *close_code = c->close_code;
                return -1;
            }
            continue;
        }
        if (!c->open) {
            snprintf(err, err_size, "the connection is closed (code %d)",
                     c->close_code);
            *close_code = c->close_code;
            return -1;
        }
        int64_t left = deadline - now_ms();
        int got = fill(c, left > 0 ? (int)left : 0);
        if (got < 0) {
            c->open = false;
            snprintf(err, err_size, "the connection broke without a close "
                     "frame (code %d)", c->close_code);
            *close_code = c->close_code;
            return -1;
        }
        if (got == 0 && now_ms() >= deadline) return 0;
    }
}

int wsc_is_open(const wsc *c) {
    return c->open;
}

void wsc_close(wsc *c, int code, int timeout_ms) {
    if (!c) return;
    if (c->open && !c->close_sent) {
        unsigned char body[2] = {(unsigned char)(code >> 8),
                                 (unsigned char)code};
        send_frame(c, OP_CLOSE, body, 2);
        c->close_sent = true;
        int64_t deadline = now_ms() + timeout_ms;
        while (c->open && now_ms() < deadline) {
            char *msg, e[64];
            size_t n;
            int cc;
            int r = wsc_recv(c, (int)(deadline - now_ms()), &msg, &n, &cc, e,
                             sizeof e);
            free(msg);
            if (r < 0) break;
        }
    }
    close(c->fd);
    free(c->in);
    free(c->msg);
    free(c);
}
