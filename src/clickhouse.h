/* clickhouse: an HTTP client for ClickHouse on libcurl - settings, ping,
 * queries with typed results, TSV inserts, commands, KILL QUERY, escaping
 * and the parsing of both error formats (18.x and current servers).
 *
 * Threads: ch_client_new may be called from any thread at any time (it
 * initialises libcurl once, safely). A client, and every request made
 * from it, belongs to one thread at a time: use one client per thread, or
 * hand it over with your own lock. The pure helpers (settings, escaping,
 * row builders, parsers) are safe from any thread.
 *
 * Two ways to call:
 *
 *   Blocking: ch_ping, ch_query, ch_exec, ch_insert, ch_kill. They run the
 *   transfer to the end on the client's own multi handle.
 *
 *   Non-blocking (a worker that serves many requests on one CURLM): make a
 *   request, add it to your multi handle, drive the multi handle yourself,
 *   and finish the request when libcurl reports its easy handle done:
 *
 *     ch_request *r = ch_request_query(client, "SELECT 1", NULL, &err);
 *     ch_request_start(r, multi);          // curl_multi_add_handle
 *     // Lua: the coroutine yields here; the worker loop runs
 *     //   curl_multi_perform(multi, &running); curl_multi_poll(...);
 *     //   while ((m = curl_multi_info_read(multi, &left)))
 *     //     if (m->msg == CURLMSG_DONE) {
 *     //       ch_request *done = ch_request_of(m->easy_handle);
 *     //       int rc = ch_request_finish(done, m->data.result, &err);
 *     //       if (rc == CH_AGAIN) continue;  // re-added: keep driving
 *     //       ... resume the coroutine that waits on `done` ...
 *     //     }
 *     ch_result *res = ch_request_take_result(r);   // query results
 *     ch_request_free(r);
 *
 *   ch_request_finish removes the handle from the multi handle, parses the
 *   answer, and returns CH_OK or CH_ERR; it returns CH_AGAIN when it put
 *   the request back on the multi handle for its one transparent retry (a
 *   reused keep-alive socket that the server had closed).
 *
 * Errors: every operation fills a ch_error (may be NULL). A client that is
 * not connected (never connected, failed, or closed) fails every call with
 * exactly "Not connected to ClickHouse." (kind CH_E_NOT_CONNECTED).
 *
 * Secrets: the password travels only in the X-ClickHouse-Key header; it is
 * never put in a URL and is registered with log_add_secret. */
#ifndef NETRA_CLICKHOUSE_H
#define NETRA_CLICKHOUSE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <curl/curl.h>

#define CH_OK 0
#define CH_ERR (-1)
#define CH_AGAIN 1   /* ch_request_finish: retrying, keep driving */
#define CH_UNSET 1   /* ch_settings_parse: nothing is configured */

#define CH_NOT_CONNECTED "Not connected to ClickHouse."

/* ---- errors ---------------------------------------------------------- */

typedef enum {
    CH_E_NONE = 0,
    CH_E_NOT_CONNECTED, /* the client is not connected */
    CH_E_USAGE,         /* a bad argument from the caller */
    CH_E_CONNECT,       /* could not connect (refused, DNS, TLS, timeout) */
    CH_E_TIMEOUT,       /* the request ran past its timeout */
    CH_E_NETWORK,       /* the connection broke during the request */
    CH_E_SERVER,        /* ClickHouse answered with an error (code set) */
    CH_E_PROTOCOL,      /* an answer netra could not understand */
    CH_E_NOMEM,
} ch_error_kind;

typedef struct {
    ch_error_kind kind;
    int code;          /* ClickHouse error code, 0 when there is none */
    long http_status;  /* 0 when no response arrived */
    char name[64];     /* "UNKNOWN_IDENTIFIER" when the server named it */
    char message[1024];/* one line for a person: what failed, what next */
} ch_error;

/* Parses a ClickHouse exception text, in either form:
 *   18.x:    Code: 47, e.displayText() = DB::Exception: MSG, e.what() = ...
 *   current: Code: 47. DB::Exception: MSG. (UNKNOWN_IDENTIFIER) (version X)
 * The text may be preceded by anything (rows streamed before the error) as
 * long as the "Code: N" is in the last line. Fills out (kind CH_E_SERVER,
 * code, name, message "ClickHouse error 47 (UNKNOWN_IDENTIFIER): MSG").
 * Returns false, leaving out alone, when no exception is found. */
bool ch_error_parse(const char *body, size_t len, ch_error *out);

/* Looks for an error at the end of a 200 OK body: the 25.11+ block
 *   \r\n__exception__\r\n<tag>\r\n<message>\r\n<length> <tag>\r\n
 *   __exception__\r\n
 * (tag = the X-ClickHouse-Exception-Tag header; NULL accepts any tag), or
 * a last line holding "Code: N" in either form above. Returns true and
 * fills out when the body ends in an error. */
bool ch_error_in_tail(const char *body, size_t len, const char *tag,
                      ch_error *out);

/* ---- settings -------------------------------------------------------- */

/* Returns the value of a setting, or NULL (an empty string is unset). */
typedef const char *(*ch_getter)(void *ud, const char *key);

typedef struct {
    char *host;
    int port;       /* 8123, or 8443 when secure, unless given */
    char *user;     /* "default" unless given */
    char *password; /* "" unless given */
    char *database; /* "default" unless given */
    bool secure;    /* https */
} ch_settings;

/* Reads CLICKHOUSE_URL (http[s]://user:password@host:port/db) or
 * CLICKHOUSE_HOST, _PORT, _USER, _PASSWORD, _DB, _SECURE through `get`.
 * When both the URL and separate keys are set the URL wins and `warning`
 * says which keys were ignored (else warning is ""). Returns CH_OK,
 * CH_UNSET when neither the URL nor the host is set (out zeroed), or
 * CH_ERR with `error` saying which value is wrong (out zeroed). On CH_OK
 * free out with ch_settings_free. warning/error may be NULL. */
int ch_settings_parse(ch_settings *out, ch_getter get, void *ud,
                      char *warning, size_t warning_size,
                      char *error, size_t error_size);

/* Frees the strings in s and zeroes it. NULL is fine. */
void ch_settings_free(ch_settings *s);

/* Fills names with the settings that must be set for a connection but are
 * not (today only "CLICKHOUSE_URL" when neither it nor CLICKHOUSE_HOST is
 * set; the URL is the one to advise). Returns how many there are (it may
 * exceed max; only max are written). Can't fail. */
size_t ch_settings_missing(ch_getter get, void *ud, const char **names,
                           size_t max);

/* ---- client ---------------------------------------------------------- */

typedef struct {
    long connect_timeout_ms; /* TCP (+TLS) connect; default 3000 */
    long timeout_ms;         /* a whole request; default 30000; the server
                                gets max_execution_time to match */
    int retries;             /* extra attempts after a connect failure
                                (nothing was sent); default 0 */
    long retry_backoff_ms;   /* first pause between them, doubling;
                                default 200 */
    long max_idle_ms;        /* reuse a keep-alive socket idle at most this
                                long; default 2000 (the server drops idle
                                ones after 3 s) */
    size_t max_response_bytes; /* default 256 MiB */
    bool insecure_tls;       /* skip certificate checks (never default) */
} ch_options;

typedef struct ch_client ch_client;

/* Makes a client from copies of s and o (o may be NULL: defaults). It is
 * not connected yet. Returns NULL only when out of memory. */
ch_client *ch_client_new(const ch_settings *s, const ch_options *o);

/* Connects: one request "SELECT version(), timezone()", retried up to
 * `retries` times with backoff when the server cannot be reached. Returns
 * CH_OK and marks the client connected, or CH_ERR with err filled and the
 * client left disconnected. May be called again after a failure or
 * ch_close. Blocks up to about (retries + 1) * timeout. */
int ch_connect(ch_client *c, ch_error *err);

/* Disconnects: closes sockets; later calls fail with CH_NOT_CONNECTED
 * until ch_connect succeeds again. Can't fail. */
void ch_close(ch_client *c);

/* Frees the client (closing it). Requests made from it must be freed
 * first. NULL is fine. */
void ch_client_free(ch_client *c);

bool ch_connected(const ch_client *c);

/* The server's version ("18.16.1") and timezone ("Etc/UTC") as read at
 * connect, or "" when not connected. Owned by the client. */
const char *ch_version(const ch_client *c);
const char *ch_timezone(const ch_client *c);

/* Is the server at least major.minor? False when not connected. */
bool ch_version_at_least(const ch_client *c, int major, int minor);

typedef struct {
    uint64_t requests;       /* requests finished */
    uint64_t stale_retries;  /* transparent retries on a dead keep-alive */
    uint64_t connect_retries;
} ch_stats;

ch_stats ch_client_stats(const ch_client *c);

/* ---- results ---------------------------------------------------------- */

typedef enum {
    CH_NULL = 0,
    CH_BOOL,
    CH_INT,    /* integers that fit int64 */
    CH_FLOAT,
    CH_STRING, /* also UInt64 above INT64_MAX, Decimal, Int128 and up */
    CH_ARRAY,  /* Array and Tuple */
} ch_kind;

typedef struct ch_value {
    ch_kind kind;
    union {
        bool b;
        int64_t i;
        double f;
        struct {
            char *ptr; /* NUL-terminated too; may contain NUL bytes */
            size_t len;
        } s;
        struct {
            struct ch_value *items;
            size_t len;
        } a;
    } u;
} ch_value;

typedef struct {
    char *name;
    char *type; /* ClickHouse type, e.g. "Nullable(Int64)" */
} ch_column;

typedef struct {
    size_t ncols, nrows;
    ch_column *columns;
    ch_value *cells; /* row-major: cells[row * ncols + col] */
    char query_id[64];
} ch_result;

/* A cell; NULL when out of range. */
const ch_value *ch_cell(const ch_result *r, size_t row, size_t col);

/* Frees a result and all its values. NULL is fine. */
void ch_result_free(ch_result *r);

/* Parses a body in FORMAT JSONCompact or JSON (with "meta"), converting
 * values by column type: integer types to CH_INT where they fit int64
 * (quoted or not), otherwise CH_STRING; floats to CH_FLOAT; Decimal to
 * CH_STRING. An empty body gives an empty result. A body that ends in an
 * error, or holds an "exception" member, fills err (CH_E_SERVER); any
 * other malformed body fills err (CH_E_PROTOCOL). Returns NULL on error. */
ch_result *ch_result_parse(const char *body, size_t len, ch_error *err);

/* ---- escaping and TSV rows -------------------------------------------- */

/* 'text' as a ClickHouse string literal: backslash, then quote, escaped,
 * and \n \t \r \0 written as escapes, so the result holds no control
 * byte. Returns a new string (free it), or NULL when out of memory. */
char *ch_quote(const char *s, size_t len);

/* `name` as an identifier in backticks, escaping backslash and backtick
 * (and \n \t \r \0). Returns a new string, or NULL when out of memory. */
char *ch_ident(const char *s, size_t len);

/* A batch of rows in TabSeparated: fields are escaped as TSV wants
 * (backslash, tab, newline, carriage return, NUL; \N is NULL). Add the
 * fields of a row, then ch_rows_end. Each add returns CH_OK or CH_ERR
 * (out of memory; the batch is then unusable: free it). */
typedef struct ch_rows ch_rows;

ch_rows *ch_rows_new(void);
void ch_rows_free(ch_rows *r);
int ch_rows_str(ch_rows *r, const char *s, size_t len);
int ch_rows_int(ch_rows *r, int64_t v);
int ch_rows_uint(ch_rows *r, uint64_t v);
int ch_rows_double(ch_rows *r, double v);
int ch_rows_null(ch_rows *r);
/* An array (or tuple) field from SQL literals as ch_quote writes them,
 * e.g. "[1,'a\\'b']": ClickHouse reads arrays in TSV with the quoting
 * rules of SQL, so the text goes in as is (a raw tab, line break or NUL
 * is escaped). */
int ch_rows_literal(ch_rows *r, const char *s, size_t len);
int ch_rows_end(ch_rows *r);
/* Appends `rows` whole rows of TSV text made by another ch_rows (each
 * ending in a newline), e.g. batches kept in the spool. CH_ERR when a row
 * is half built here or the text does not end a row. */
int ch_rows_append(ch_rows *r, const char *tsv, size_t len, size_t rows);
/* Forgets all rows (keeps the memory) for the next batch. */
void ch_rows_clear(ch_rows *r);
size_t ch_rows_count(const ch_rows *r);
const char *ch_rows_data(const ch_rows *r, size_t *len);

/* ---- requests --------------------------------------------------------- */

typedef struct {
    const char *query_id;  /* NULL: a fresh random one */
    bool stream;           /* true: no wait_end_of_query, so rows stream
                              and a late error arrives after 200 OK */
    bool readonly;         /* readonly=2: reads and SET only */
    long timeout_ms;       /* 0: the client's timeout */
    const char *settings;  /* extra "k=v&k2=v2" URL settings, raw */
} ch_query_opts;

typedef struct ch_request ch_request;

/* Builds a request; none of them sends anything yet. Each returns NULL
 * with err filled when the client is not connected or out of memory.
 * query: the SQL's result is parsed (JSONCompact unless the SQL names
 *   FORMAT JSON); exec: DDL or a command, the body is ignored;
 * insert: the rows (copied) into `table` (an identifier in the client's
 *   database) with `columns` (ncols names; 0 means all, in table order).
 * ping: GET /ping. */
ch_request *ch_request_query(ch_client *c, const char *sql,
                             const ch_query_opts *o, ch_error *err);
ch_request *ch_request_exec(ch_client *c, const char *sql,
                            const ch_query_opts *o, ch_error *err);
ch_request *ch_request_insert(ch_client *c, const char *table,
                              const char *const *columns, size_t ncols,
                              const ch_rows *rows, const ch_query_opts *o,
                              ch_error *err);
ch_request *ch_request_ping(ch_client *c, ch_error *err);

/* Adds the request's easy handle to `multi` (the caller drives it).
 * Returns CH_OK, or CH_ERR with err filled. */
int ch_request_start(ch_request *r, CURLM *multi, ch_error *err);

/* The request an easy handle reported by curl_multi_info_read belongs to,
 * or NULL when it is not one of ours. */
ch_request *ch_request_of(CURL *easy);

/* Finishes a request after libcurl reported it done with `result`:
 * removes it from the multi handle and parses the answer. Returns CH_OK;
 * CH_ERR with err filled; or CH_AGAIN when it has re-added itself for a
 * transparent retry (keep driving the multi handle and wait again). */
int ch_request_finish(ch_request *r, CURLcode result, ch_error *err);

/* A query's result after CH_OK; the caller owns it. NULL otherwise. */
ch_result *ch_request_take_result(ch_request *r);

/* The query_id this request sent. */
const char *ch_request_query_id(const ch_request *r);

/* Frees a request, first removing it from its multi handle if it is
 * still on one (the transfer is abandoned; the server may still run the
 * query - use ch_kill). NULL is fine. */
void ch_request_free(ch_request *r);

/* ---- blocking calls ---------------------------------------------------- */

/* Each returns CH_OK or CH_ERR (err filled). o may be NULL. */
int ch_ping(ch_client *c, ch_error *err);

/* *out gets a result to free with ch_result_free. */
int ch_query(ch_client *c, const char *sql, const ch_query_opts *o,
             ch_result **out, ch_error *err);

int ch_exec(ch_client *c, const char *sql, const ch_query_opts *o,
            ch_error *err);

/* One request for the whole batch (one block up to ~1 M rows, atomic). An
 * insert is never retried once a response byte arrived or it timed out. */
int ch_insert(ch_client *c, const char *table, const char *const *columns,
              size_t ncols, const ch_rows *rows, const ch_query_opts *o,
              ch_error *err);

/* KILL QUERY WHERE query_id = '...'. *killed (may be NULL) gets how many
 * running queries matched (0 when it had already finished). */
int ch_kill(ch_client *c, const char *query_id, int *killed,
            ch_error *err);

/* Writes a fresh random query id (36 chars + NUL) into out[37]. */
void ch_new_query_id(char out[37]);

#endif
