/* wsclient: a small blocking WebSocket client (RFC 6455) over a plain
 * TCP socket, for scenarios and tests that talk to netra as real clients
 * do: the HTTP upgrade with chosen headers, masked text frames out,
 * messages in (fragments joined, pings answered), and the close
 * handshake. No TLS, no extensions.
 *
 * Threads: a client belongs to one thread at a time; clients are
 * independent of each other. */
#ifndef NETRA_WSCLIENT_H
#define NETRA_WSCLIENT_H

#include <stddef.h>

typedef struct wsc wsc;

#define WSC_MAX_MESSAGE (64u << 20) /* a larger incoming message fails */

/* Connects to host:port (a numeric address) and upgrades `path` (with
 * its query string). `headers` is NULL or a NULL-terminated list of
 * "Name: value" lines sent with the upgrade. Waits up to timeout_ms in
 * all. Returns the client, or NULL with err filled; *http_status (may be
 * NULL) is the server's answer (101 on success, 0 when none came). */
wsc *wsc_connect(const char *host, int port, const char *path,
                 const char *const *headers, int timeout_ms, int *http_status,
                 char *err, size_t err_size);

/* Sends one text message. Returns 0, or -1 with err filled when the
 * connection is closed or broken. */
int wsc_send_text(wsc *c, const char *text, size_t len, char *err,
                  size_t err_size);

/* Waits up to timeout_ms (0: do not wait) for the next text or binary
 * message. Returns 1 with *out (malloc'd, NUL-terminated, the caller
 * frees) and *len; 0 on timeout; -1 when the connection closed or broke,
 * with *close_code (1000..4999 from the server's close frame, 1006 when
 * none came) and err filled. */
int wsc_recv(wsc *c, int timeout_ms, char **out, size_t *len,
             int *close_code, char *err, size_t err_size);

/* True until the connection has closed or broken. */
int wsc_is_open(const wsc *c);

/* Sends a close frame with `code` (when still open), waits up to
 * timeout_ms for the server's close, closes the socket and frees c.
 * NULL is a no-op. */
void wsc_close(wsc *c, int code, int timeout_ms);

#endif
