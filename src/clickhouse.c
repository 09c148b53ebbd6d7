/* clickhouse: the ClickHouse HTTP client (see clickhouse.h). */
#include "clickhouse.h"

#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/random.h>
#include <time.h>

#include "log.h"

/* ---- growable buffer -------------------------------------------------- */

typedef struct {
    char *p;
    size_t len, cap;
    bool failed;
} buf;

static bool buf_reserve(buf *b, size_t more) {
    if (b->failed)
        return false;
    if (b->len + more + 1 <= b->cap)
        return true;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + more + 1)
        cap *= 2;
    char *p = realloc(b->p, cap);
    if (!p) {
        b->failed = true;
        return false;
    }
    b->p = p;
    b->cap = cap;
    return true;
}

static void buf_add(buf *b, const void *s, size_t n) {
    if (!buf_reserve(b, n))
        return;
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = '\0';
}

static void buf_addc(buf *b, char c) { buf_add(b, &c, 1); }

static void buf_adds(buf *b, const char *s) { buf_add(b, s, strlen(s)); }

static void buf_free(buf *b) {
    free(b->p);
    memset(b, 0, sizeof *b);
}

/* Hands the text over (never NULL unless the buffer failed). */
static char *buf_take(buf *b) {
    if (b->failed) {
        buf_free(b);
        return NULL;
    }
    if (!b->p)
        buf_reserve(b, 0);
    char *p = b->p;
    if (p)
        p[b->len] = '\0';
    memset(b, 0, sizeof *b);
    return p;
}

static char *dup_n(const char *s, size_t n) {
    char *p = malloc(n + 1);
    if (!p)
        return NULL;
    memcpy(p, s, n);
    p[n] = '\0';
    return p;
}

/* ---- errors ----------------------------------------------------------- */

static void err_set(ch_error *e, ch_error_kind kind, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void err_set(ch_error *e, ch_error_kind kind, const char *fmt, ...) {
    if (!e)
        return;
    memset(e, 0, sizeof *e);
    e->kind = kind;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->message, sizeof e->message, fmt, ap);
    va_end(ap);
}

static const char *mem_find(const char *h, size_t hn, const char *n) {
    size_t nn = strlen(n);
    if (nn > hn)
        return NULL;
    return memmem(h, hn, n, nn);
}

static const char *mem_rfind(const char *h, size_t hn, const char *n) {
    size_t nn = strlen(n);
    if (nn > hn)
        return NULL;
    for (size_t i = hn - nn + 1; i-- > 0;)
        if (memcmp(h + i, n, nn) == 0)
            return h + i;
    return NULL;
}

/* Where "Code: <digits>" starts in the exception text, or NULL. The body
 * may start with it (a whole error answer) or end with it in its last
 * line (after streamed rows). */
static const char *find_code(const char *s, size_t len) {
    while (len && (s[len - 1] == '\n' || s[len - 1] == '\r' ||
                   s[len - 1] == ' '))
        len--;
    size_t skip = 0;
    while (skip < len && isspace((unsigned char)s[skip]))
        skip++;
    if (len - skip > 7 && memcmp(s + skip, "Code: ", 6) == 0 &&
        isdigit((unsigned char)s[skip + 6]))
        return s + skip;

    const char *nl = mem_rfind(s, len, "\n");
    size_t start = nl ? (size_t)(nl - s) + 1 : 0;
    const char *line = s + start;
    size_t ln = len - start;
    for (const char *p = mem_find(line, ln, "Code: "); p;
         p = mem_find(p + 1, ln - (size_t)(p + 1 - line), "Code: ")) {
        const char *q = p + 6;
        if (q >= line + ln || !isdigit((unsigned char)*q))
            continue;
        while (q < line + ln && isdigit((unsigned char)*q))
            q++;
        size_t rest = (size_t)(line + ln - q);
        if ((rest >= 18 && memcmp(q, ", e.displayText() ", 18) == 0) ||
            (rest >= 6 && memcmp(q, ". DB::", 6) == 0) ||
            (rest >= 2 && memcmp(q, ". ", 2) == 0))
            return p;
    }
    return NULL;
}

/* Cuts "(version ...)" and "(NAME)" off the end of msg[0..*n), copying
 * NAME into name. */
static void trim_suffixes(const char *msg, size_t *n, char *name,
                          size_t name_size) {
    while (*n && isspace((unsigned char)msg[*n - 1]))
        (*n)--;
    const char *v = mem_rfind(msg, *n, " (version ");
    if (v && msg[*n - 1] == ')')
        *n = (size_t)(v - msg);
    while (*n && isspace((unsigned char)msg[*n - 1]))
        (*n)--;
    if (*n < 3 || msg[*n - 1] != ')')
        return;
    size_t open = *n - 1;
    while (open > 0 && msg[open - 1] != '(')
        open--;
    if (open < 2 || msg[open - 2] != ' ')
        return;
    size_t nl = *n - 1 - open;
    for (size_t i = 0; i < nl; i++) {
        char c = msg[open + i];
        if (!(isupper((unsigned char)c) || isdigit((unsigned char)c) ||
              c == '_'))
            return;
    }
    if (nl == 0 || nl >= name_size)
        return;
    memcpy(name, msg + open, nl);
    name[nl] = '\0';
    *n = open - 2;
}

bool ch_error_parse(const char *body, size_t len, ch_error *out) {
    if (!body)
        return false;
    const char *p = find_code(body, len);
    if (!p)
        return false;

    const char *end = body + len;
    while (end > p && (end[-1] == '\n' || end[-1] == '\r' || end[-1] == ' '))
        end--;
    const char *q = p + 6;
    long code = 0;
    while (q < end && isdigit((unsigned char)*q) && code < 1000000)
        code = code * 10 + (*q++ - '0');

    const char *msg = q;
    size_t n = (size_t)(end - q);
    if (n >= 18 && memcmp(msg, ", e.displayText() ", 18) == 0) {
        msg += 18;
        n -= 18;
        if (n >= 2 && memcmp(msg, "= ", 2) == 0) {
            msg += 2;
            n -= 2;
        }
        const char *w = mem_rfind(msg, n, ", e.what() = ");
        if (w)
            n = (size_t)(w - msg);
    } else if (n >= 2 && (msg[0] == '.' || msg[0] == ',')) {
        msg += 2;
        n -= 2;
    }
    const char *ex = mem_find(msg, n < 64 ? n : 64, "Exception: ");
    if (ex && !memchr(msg, ' ', (size_t)(ex - msg))) {
        n -= (size_t)(ex + 11 - msg);
        msg = ex + 11;
    }

    ch_error e;
    memset(&e, 0, sizeof e);
    trim_suffixes(msg, &n, e.name, sizeof e.name);
    e.kind = CH_E_SERVER;
    e.code = (int)code;
    if (n > 900)
        n = 900;
    if (e.name[0])
        snprintf(e.message, sizeof e.message, "ClickHouse error %d (%s): %.*s",
                 e.code, e.name, (int)n, msg);
    else
        snprintf(e.message, sizeof e.message, "ClickHouse error %d: %.*s",
                 e.code, (int)n, msg);
    if (out)
        *out = e;
    return true;
}

/* The 25.11+ block at the very end of a body; see clickhouse.h. */
static bool tagged_tail(const char *body, size_t len, const char *tag,
                        ch_error *out) {
    static const char mark[] = "__exception__";
    size_t n = len;
    while (n && (body[n - 1] == '\n' || body[n - 1] == '\r'))
        n--;
    if (n < sizeof mark - 1 ||
        memcmp(body + n - (sizeof mark - 1), mark, sizeof mark - 1) != 0)
        return false;
    size_t close = n - (sizeof mark - 1);

    size_t lend = close;
    while (lend && (body[lend - 1] == '\n' || body[lend - 1] == '\r'))
        lend--;
    const char *nl = mem_rfind(body, lend, "\n");
    size_t lstart = nl ? (size_t)(nl - body) + 1 : 0;
    const char *sp = memchr(body + lstart, ' ', lend - lstart);
    if (!sp)
        return false;
    if (tag && *tag) {
        size_t tl = lend - (size_t)(sp + 1 - body);
        if (tl != strlen(tag) || memcmp(sp + 1, tag, tl) != 0)
            return false;
    }

    const char *open = mem_rfind(body, lstart, mark);
    if (!open)
        return false;
    const char *m = open + sizeof mark - 1;
    const char *mend = body + lstart;
    while (m < mend && (*m == '\r' || *m == '\n'))
        m++;
    if (m >= mend)
        return false;
    const char *tl_end = memchr(m, '\n', (size_t)(mend - m));
    if (tl_end)
        m = tl_end + 1; /* skip the tag line */
    while (mend > m && (mend[-1] == '\n' || mend[-1] == '\r'))
        mend--;
    if (ch_error_parse(m, (size_t)(mend - m), out))
        return true;
    err_set(out, CH_E_SERVER, "ClickHouse failed during the query: %.*s",
            (int)((mend - m) > 900 ? 900 : (mend - m)), m);
    return true;
}

bool ch_error_in_tail(const char *body, size_t len, const char *tag,
                      ch_error *out) {
    if (!body || !len)
        return false;
    if (tagged_tail(body, len, tag, out))
        return true;
    size_t from = len > 65536 ? len - 65536 : 0;
    return ch_error_parse(body + from, len - from, out);
}

/* ---- settings --------------------------------------------------------- */

static const char *get_set(ch_getter get, void *ud, const char *key) {
    const char *v = get(ud, key);
    return v && *v ? v : NULL;
}

static bool parse_bool(const char *v, bool *out) {
    static const char *yes[] = {"true", "1", "yes", "on"};
    static const char *no[] = {"false", "0", "no", "off"};
    for (size_t i = 0; i < 4; i++) {
        if (strcasecmp(v, yes[i]) == 0) {
            *out = true;
            return true;
        }
        if (strcasecmp(v, no[i]) == 0) {
            *out = false;
            return true;
        }
    }
    return false;
}

static bool parse_port(const char *v, int *out) {
    char *end;
    errno = 0;
    long p = strtol(v, &end, 10);
    if (errno || end == v || *end || p < 1 || p > 65535)
        return false;
    *out = (int)p;
    return true;
}

static bool has_ctl(const char *s) {
    for (; s && *s; s++)
        if ((unsigned char)*s < 0x20 || *s == 0x7f)
            return true;
    return false;
}

static void say(char *out, size_t n, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void say(char *out, size_t n, const char *fmt, ...) {
    if (!out || !n)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(out, n, fmt, ap);
    va_end(ap);
}

static char *url_part(CURLU *u, CURLUPart part, bool decode) {
    char *v = NULL;
    if (curl_url_get(u, part, &v, decode ? CURLU_URLDECODE : 0) != CURLUE_OK)
        return NULL;
    char *copy = strdup(v);
    curl_free(v);
    return copy;
}

static int parse_url(ch_settings *s, const char *url, char *error,
                     size_t en) {
    static const char usage[] =
        "use http[s]://user:password@host:port/database";
    if (strncasecmp(url, "http://", 7) != 0 &&
        strncasecmp(url, "https://", 8) != 0) {
        say(error, en, "CLICKHOUSE_URL must start with http:// or https:// - "
            "%s", usage);
        return CH_ERR;
    }
    CURLU *u = curl_url();
    if (!u || curl_url_set(u, CURLUPART_URL, url, 0) != CURLUE_OK) {
        curl_url_cleanup(u);
        say(error, en, "CLICKHOUSE_URL is not a valid URL - %s", usage);
        return CH_ERR;
    }
    char *scheme = url_part(u, CURLUPART_SCHEME, false);
    s->secure = scheme && strcasecmp(scheme, "https") == 0;
    free(scheme);
    s->host = url_part(u, CURLUPART_HOST, true);
    s->user = url_part(u, CURLUPART_USER, true);
    s->password = url_part(u, CURLUPART_PASSWORD, true);
    char *port = url_part(u, CURLUPART_PORT, false);
    char *path = url_part(u, CURLUPART_PATH, true);
    curl_url_cleanup(u);

    int rc = CH_OK;
    s->port = s->secure ? 8443 : 8123;
    if (port && !parse_port(port, &s->port)) {
        say(error, en, "CLICKHOUSE_URL has a bad port - %s", usage);
        rc = CH_ERR;
    }
    const char *db = path ? path + strspn(path, "/") : "";
    size_t dl = strlen(db);
    while (dl && db[dl - 1] == '/')
        dl--;
    if (rc == CH_OK && memchr(db, '/', dl)) {
        say(error, en, "CLICKHOUSE_URL's path must be one database name - "
            "%s", usage);
        rc = CH_ERR;
    }
    if (rc == CH_OK && dl)
        s->database = dup_n(db, dl);
    if (rc == CH_OK && (!s->host || !*s->host)) {
        say(error, en, "CLICKHOUSE_URL has no host - %s", usage);
        rc = CH_ERR;
    }
    free(port);
    free(path);
    return rc;
}

static int parse_keys(ch_settings *s, ch_getter get, void *ud, char *error,
                      size_t en) {
    const char *v = get_set(get, ud, "CLICKHOUSE_SECURE");
    if (v && !parse_bool(v, &s->secure)) {
        say(error, en, "CLICKHOUSE_SECURE must be true or false, not '%s'",
            v);
        return CH_ERR;
    }
    s->port = s->secure ? 8443 : 8123;
    v = get_set(get, ud, "CLICKHOUSE_PORT");
    if (v && !parse_port(v, &s->port)) {
        say(error, en,
            "CLICKHOUSE_PORT must be a number from 1 to 65535, not '%s'", v);
        return CH_ERR;
    }
    const char *host = get_set(get, ud, "CLICKHOUSE_HOST");
    s->host = strdup(host);
    if ((v = get_set(get, ud, "CLICKHOUSE_USER")))
        s->user = strdup(v);
    if ((v = get_set(get, ud, "CLICKHOUSE_PASSWORD")))
        s->password = strdup(v);
    if ((v = get_set(get, ud, "CLICKHOUSE_DB")))
        s->database = strdup(v);
    return CH_OK;
}

static void ignored_keys(ch_getter get, void *ud, char *warning, size_t wn) {
    static const char *keys[] = {"CLICKHOUSE_HOST", "CLICKHOUSE_PORT",
                                 "CLICKHOUSE_USER", "CLICKHOUSE_PASSWORD",
                                 "CLICKHOUSE_DB", "CLICKHOUSE_SECURE"};
    char list[256] = "";
    for (size_t i = 0; i < sizeof keys / sizeof *keys; i++) {
        if (!get_set(get, ud, keys[i]))
            continue;
        if (*list)
            strncat(list, ", ", sizeof list - strlen(list) - 1);
        strncat(list, keys[i], sizeof list - strlen(list) - 1);
    }
    if (*list)
        say(warning, wn, "CLICKHOUSE_URL and %s are both set; using "
            "CLICKHOUSE_URL and ignoring %s - unset one of them", list, list);
}

int ch_settings_parse(ch_settings *out, ch_getter get, void *ud,
                      char *warning, size_t wn, char *error, size_t en) {
    say(warning, wn, "%s", "");
    say(error, en, "%s", "");
    memset(out, 0, sizeof *out);
    const char *url = get_set(get, ud, "CLICKHOUSE_URL");
    if (!url && !get_set(get, ud, "CLICKHOUSE_HOST"))
        return CH_UNSET;

    int rc;
    if (url) {
        rc = parse_url(out, url, error, en);
        if (rc == CH_OK)
            ignored_keys(get, ud, warning, wn);
    } else {
        rc = parse_keys(out, get, ud, error, en);
    }
    if (rc == CH_OK && (has_ctl(out->user) || has_ctl(out->password) ||
                        has_ctl(out->host) || has_ctl(out->database))) {
        say(error, en, "the ClickHouse host, user, password or database "
            "holds a control character - remove it");
        rc = CH_ERR;
    }
    if (rc == CH_OK && !out->user)
        out->user = strdup("default");
    if (rc == CH_OK && !out->password)
        out->password = strdup("");
    if (rc == CH_OK && !out->database)
        out->database = strdup("default");
    if (rc == CH_OK && (!out->host || !out->user || !out->password ||
                        !out->database)) {
        say(error, en, "out of memory reading the ClickHouse settings");
        rc = CH_ERR;
    }
    if (rc != CH_OK)
        ch_settings_free(out);
    else if (strlen(out->password) >= 4)
        log_add_secret(out->password);
    return rc;
}

void ch_settings_free(ch_settings *s) {
    if (!s)
        return;
    free(s->host);
    free(s->user);
    free(s->password);
    free(s->database);
    memset(s, 0, sizeof *s);
}

size_t ch_settings_missing(ch_getter get, void *ud, const char **names,
                           size_t max) {
    size_t n = 0;
    if (!get_set(get, ud, "CLICKHOUSE_URL") &&
        !get_set(get, ud, "CLICKHOUSE_HOST")) {
        if (n < max)
            names[n] = "CLICKHOUSE_URL";
        n++;
    }
    return n;
}

/* ---- escaping and rows ------------------------------------------------ */

static char *quote_with(const char *s, size_t len, char q) {
    buf b = {0};
    buf_reserve(&b, len + 2);
    buf_addc(&b, q);
    for (size_t i = 0; i < len; i++) {
        char c = s[i];
        switch (c) {
        case '\\': buf_add(&b, "\\\\", 2); break;
        case '\n': buf_add(&b, "\\n", 2); break;
        case '\t': buf_add(&b, "\\t", 2); break;
        case '\r': buf_add(&b, "\\r", 2); break;
        case '\0': buf_add(&b, "\\0", 2); break;
        default:
            if (c == q)
                buf_addc(&b, '\\');
            buf_addc(&b, c);
        }
    }
    buf_addc(&b, q);
    return buf_take(&b);
}

char *ch_quote(const char *s, size_t len) { return quote_with(s, len, '\''); }

char *ch_ident(const char *s, size_t len) { return quote_with(s, len, '`'); }

struct ch_rows {
    buf b;
    size_t rows;
    bool mid; /* a field is already in the current row */
};

ch_rows *ch_rows_new(void) { return calloc(1, sizeof(ch_rows)); }

void ch_rows_free(ch_rows *r) {
    if (!r)
        return;
    buf_free(&r->b);
    free(r);
}

static void field(ch_rows *r) {
    if (r->mid)
        buf_addc(&r->b, '\t');
    r->mid = true;
}

static int rows_status(const ch_rows *r) {
    return r->b.failed ? CH_ERR : CH_OK;
}

/* Bytes TSV must escape, and the letter after the backslash. */
static const char tsv_esc[256] = {
    ['\\'] = '\\', ['\t'] = 't', ['\n'] = 'n', ['\r'] = 'r', [0] = '0',
};

static void tsv_escape(buf *b, const char *s, size_t len) {
    if (!buf_reserve(b, len))
        return;
    size_t run = 0;
    for (size_t i = 0; i < len; i++) {
        char e = tsv_esc[(unsigned char)s[i]];
        if (!e)
            continue;
        char pair[2] = {'\\', e};
        buf_add(b, s + run, i - run);
        buf_add(b, pair, 2);
        run = i + 1;
    }
    buf_add(b, s + run, len - run);
}

/* Decimal digits of v into the end of t[24]; returns the first. */
static char *u64_text(uint64_t v, char t[24]) {
    char *p = t + 24;
    do {
        *--p = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    return p;
}

int ch_rows_str(ch_rows *r, const char *s, size_t len) {
    field(r);
    tsv_escape(&r->b, s, len);
    return rows_status(r);
}

int ch_rows_literal(ch_rows *r, const char *s, size_t len) {
    field(r);
    size_t run = 0;
    for (size_t i = 0; i < len; i++) {
        const char *esc = s[i] == '\t' ? "\\t" : s[i] == '\n' ? "\\n"
                        : s[i] == '\r' ? "\\r" : s[i] == '\0' ? "\\0" : NULL;
        if (!esc)
            continue;
        buf_add(&r->b, s + run, i - run);
        buf_add(&r->b, esc, 2);
        run = i + 1;
    }
    buf_add(&r->b, s + run, len - run);
    return rows_status(r);
}

int ch_rows_int(ch_rows *r, int64_t v) {
    char t[24];
    uint64_t u = v < 0 ? (uint64_t)0 - (uint64_t)v : (uint64_t)v;
    char *p = u64_text(u, t);
    if (v < 0)
        *--p = '-';
    field(r);
    buf_add(&r->b, p, (size_t)(t + 24 - p));
    return rows_status(r);
}

int ch_rows_uint(ch_rows *r, uint64_t v) {
    char t[24];
    char *p = u64_text(v, t);
    field(r);
    buf_add(&r->b, p, (size_t)(t + 24 - p));
    return rows_status(r);
}

int ch_rows_double(ch_rows *r, double v) {
    char t[40];
    field(r);
    if (isnan(v))
        buf_adds(&r->b, "nan");
    else if (isinf(v))
        buf_adds(&r->b, v > 0 ? "inf" : "-inf");
    else
        buf_add(&r->b, t, (size_t)snprintf(t, sizeof t, "%.17g", v));
    return rows_status(r);
}

int ch_rows_null(ch_rows *r) {
    field(r);
    buf_add(&r->b, "\\N", 2);
    return rows_status(r);
}

int ch_rows_end(ch_rows *r) {
    buf_addc(&r->b, '\n');
    r->rows++;
    r->mid = false;
    return rows_status(r);
}

int ch_rows_append(ch_rows *r, const char *tsv, size_t len, size_t rows) {
    if (r->mid || (len && tsv[len - 1] != '\n')) return CH_ERR;
    buf_add(&r->b, tsv, len);
    r->rows += rows;
    return rows_status(r);
}

void ch_rows_clear(ch_rows *r) {
    r->b.len = 0;
    r->rows = 0;
    r->mid = false;
}

size_t ch_rows_count(const ch_rows *r) { return r->rows; }

const char *ch_rows_data(const ch_rows *r, size_t *len) {
    *len = r->b.len;
    return r->b.p ? r->b.p : "";
}

/* ---- JSON results ----------------------------------------------------- */

/* A number still as text, until its column type says what it is. */
#define CH_NUMTEXT ((ch_kind)99)
#define JSON_MAX_DEPTH 64

typedef struct {
    const char *p, *end;
    int depth;
    const char *why;
} jp;

static void value_free(ch_value *v) {
    if (v->kind == CH_STRING || v->kind == CH_NUMTEXT) {
        free(v->u.s.ptr);
    } else if (v->kind == CH_ARRAY) {
        for (size_t i = 0; i < v->u.a.len; i++)
            value_free(&v->u.a.items[i]);
        free(v->u.a.items);
    }
    v->kind = CH_NULL;
}

static void ws(jp *j) {
    while (j->p < j->end && (*j->p == ' ' || *j->p == '\t' ||
                             *j->p == '\n' || *j->p == '\r'))
        j->p++;
}

static bool fail(jp *j, const char *why) {
    if (!j->why)
        j->why = why;
    return false;
}

static bool eat(jp *j, char c) {
    ws(j);
    if (j->p < j->end && *j->p == c) {
        j->p++;
        return true;
    }
    return false;
}

static int hex4(const char *p) {
    int v = 0;
    for (int i = 0; i < 4; i++) {
        int c = p[i], d;
        if (c >= '0' && c <= '9')
            d = c - '0';
        else if (c >= 'a' && c <= 'f')
            d = c - 'a' + 10;
        else if (c >= 'A' && c <= 'F')
            d = c - 'A' + 10;
        else
            return -1;
        v = v * 16 + d;
    }
    return v;
}

static void put_utf8(buf *b, unsigned cp) {
    char t[4];
    size_t n;
    if (cp < 0x80) {
        t[0] = (char)cp;
        n = 1;
    } else if (cp < 0x800) {
        t[0] = (char)(0xC0 | (cp >> 6));
        t[1] = (char)(0x80 | (cp & 0x3F));
        n = 2;
    } else if (cp < 0x10000) {
        t[0] = (char)(0xE0 | (cp >> 12));
        t[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        t[2] = (char)(0x80 | (cp & 0x3F));
        n = 3;
    } else {
        t[0] = (char)(0xF0 | (cp >> 18));
        t[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
        t[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
        t[3] = (char)(0x80 | (cp & 0x3F));
        n = 4;
    }
    buf_add(b, t, n);
}

/* A string after its opening quote, into b (bytes, NUL allowed). */
static bool json_string(jp *j, buf *b) {
    for (;;) {
        const char *s = j->p;
        while (j->p < j->end && *j->p != '"' && *j->p != '\\')
            j->p++;
        buf_add(b, s, (size_t)(j->p - s));
        if (j->p >= j->end)
            return fail(j, "unterminated string");
        if (*j->p++ == '"')
            return !b->failed || fail(j, "out of memory");
        if (j->p >= j->end)
            return fail(j, "unterminated escape");
        char c = *j->p++;
        switch (c) {
        case '"': case '\\': case '/': buf_addc(b, c); break;
        case 'b': buf_addc(b, '\b'); break;
        case 'f': buf_addc(b, '\f'); break;
        case 'n': buf_addc(b, '\n'); break;
        case 'r': buf_addc(b, '\r'); break;
        case 't': buf_addc(b, '\t'); break;
        case 'u': {
            if (j->end - j->p < 4 || hex4(j->p) < 0)
                return fail(j, "bad \\u escape");
            unsigned cp = (unsigned)hex4(j->p);
            j->p += 4;
            if (cp >= 0xD800 && cp < 0xDC00 && j->end - j->p >= 6 &&
                j->p[0] == '\\' && j->p[1] == 'u' && hex4(j->p + 2) >= 0xDC00 &&
                hex4(j->p + 2) < 0xE000) {
                cp = 0x10000 + ((cp - 0xD800) << 10) +
                     ((unsigned)hex4(j->p + 2) - 0xDC00);
                j->p += 6;
            }
            put_utf8(b, cp);
            break;
        }
        default: return fail(j, "bad escape");
        }
    }
}

static bool json_value(jp *j, ch_value *out);

static bool json_skip(jp *j) {
    ch_value v = {0};
    bool ok = json_value(j, &v);
    value_free(&v);
    return ok;
}

static bool json_array(jp *j, ch_value *out) {
    size_t cap = 0;
    out->kind = CH_ARRAY;
    out->u.a.items = NULL;
    out->u.a.len = 0;
    if (eat(j, ']'))
        return true;
    do {
        if (out->u.a.len == cap) {
            cap = cap ? cap * 2 : 4;
            ch_value *n = realloc(out->u.a.items, cap * sizeof *n);
            if (!n)
                return fail(j, "out of memory");
            out->u.a.items = n;
        }
        ch_value *item = &out->u.a.items[out->u.a.len];
        memset(item, 0, sizeof *item);
        out->u.a.len++;
        if (!json_value(j, item))
            return false;
    } while (eat(j, ','));
    return eat(j, ']') || fail(j, "expected ',' or ']'");
}

/* An object inside a value (Map, JSON types): kept as its JSON text. */
static bool json_object_text(jp *j, ch_value *out) {
    const char *start = j->p - 1;
    if (!eat(j, '}')) {
        do {
            buf key = {0};
            bool ok = eat(j, '"') && json_string(j, &key);
            buf_free(&key);
            if (!ok || !eat(j, ':') || !json_skip(j))
                return fail(j, "bad object");
        } while (eat(j, ','));
        if (!eat(j, '}'))
            return fail(j, "expected ',' or '}'");
    }
    out->kind = CH_STRING;
    out->u.s.len = (size_t)(j->p - start);
    out->u.s.ptr = dup_n(start, out->u.s.len);
    return out->u.s.ptr || fail(j, "out of memory");
}

static bool json_number(jp *j, ch_value *out) {
    const char *s = j->p;
    while (j->p < j->end && (isdigit((unsigned char)*j->p) || *j->p == '-' ||
                             *j->p == '+' || *j->p == '.' || *j->p == 'e' ||
                             *j->p == 'E'))
        j->p++;
    if (j->p == s)
        return fail(j, "unexpected character");
    out->kind = CH_NUMTEXT;
    out->u.s.len = (size_t)(j->p - s);
    out->u.s.ptr = dup_n(s, out->u.s.len);
    return out->u.s.ptr || fail(j, "out of memory");
}

static bool word(jp *j, const char *w) {
    size_t n = strlen(w);
    if ((size_t)(j->end - j->p) < n || memcmp(j->p, w, n) != 0)
        return fail(j, "unexpected word");
    j->p += n;
    return true;
}

static bool json_value(jp *j, ch_value *out) {
    ws(j);
    if (j->p >= j->end)
        return fail(j, "unexpected end");
    if (++j->depth > JSON_MAX_DEPTH)
        return fail(j, "nested too deeply");
    bool ok;
    char c = *j->p++;
    if (c == '"') {
        buf b = {0};
        ok = json_string(j, &b);
        out->kind = CH_STRING;
        out->u.s.len = b.len;
        out->u.s.ptr = buf_take(&b);
        if (ok && !out->u.s.ptr)
            ok = fail(j, "out of memory");
        if (!out->u.s.ptr)
            out->kind = CH_NULL;
    } else if (c == '[') {
        ok = json_array(j, out);
    } else if (c == '{') {
        ok = json_object_text(j, out);
    } else if (c == 't' || c == 'f' || c == 'n') {
        j->p--;
        ok = word(j, c == 't' ? "true" : c == 'f' ? "false" : "null");
        out->kind = c == 'n' ? CH_NULL : CH_BOOL;
        out->u.b = c == 't';
    } else {
        j->p--;
        ok = json_number(j, out);
    }
    j->depth--;
    return ok;
}

/* What a column type's values become. */
typedef enum { T_OTHER, T_INT, T_FLOAT, T_DECIMAL } tclass;

static const char *unwrap(const char *t, size_t *n, const char *w) {
    size_t wl = strlen(w);
    if (*n > wl && strncmp(t, w, wl) == 0 && t[*n - 1] == ')') {
        *n -= wl + 1;
        return t + wl;
    }
    return NULL;
}

static const char *base_type(const char *t, size_t *n) {
    for (;;) {
        const char *in = unwrap(t, n, "Nullable(");
        if (!in)
            in = unwrap(t, n, "LowCardinality(");
        if (!in)
            return t;
        t = in;
    }
}

static tclass classify(const char *t, size_t n) {
    if ((n >= 3 && strncmp(t, "Int", 3) == 0) ||
        (n >= 4 && strncmp(t, "UInt", 4) == 0))
        return T_INT;
    if (n >= 5 && strncmp(t, "Float", 5) == 0)
        return T_FLOAT;
    if (n >= 7 && strncmp(t, "Decimal", 7) == 0)
        return T_DECIMAL;
    return T_OTHER;
}

static bool text_int(const char *s, int64_t *out) {
    if (!*s || (!isdigit((unsigned char)*s) && *s != '-'))
        return false;
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (errno || *end || end == s)
        return false;
    *out = v;
    return true;
}

static void to_int(ch_value *v, int64_t i) {
    free(v->u.s.ptr);
    v->kind = CH_INT;
    v->u.i = i;
}

static void to_float(ch_value *v, double f) {
    free(v->u.s.ptr);
    v->kind = CH_FLOAT;
    v->u.f = f;
}

static void convert(ch_value *v, const char *t, size_t n) {
    t = base_type(t, &n);
    if (v->kind == CH_ARRAY) {
        const char *in = unwrap(t, &n, "Array(");
        for (size_t i = 0; i < v->u.a.len; i++)
            convert(&v->u.a.items[i], in ? in : "", in ? n : 0);
        return;
    }
    if (v->kind != CH_STRING && v->kind != CH_NUMTEXT)
        return;
    tclass c = classify(t, n);
    int64_t i;
    const char *s = v->u.s.ptr;
    if (c == T_INT && text_int(s, &i))
        to_int(v, i);
    else if (c == T_FLOAT && v->kind == CH_NUMTEXT)
        to_float(v, strtod(s, NULL));
    else if (c == T_FLOAT && (strcmp(s, "nan") == 0 || strcmp(s, "inf") == 0 ||
                              strcmp(s, "-inf") == 0 || strcmp(s, "+inf") == 0))
        to_float(v, strtod(s, NULL));
    else if (v->kind == CH_NUMTEXT && c == T_OTHER)
        strpbrk(s, ".eE") || !text_int(s, &i) ? to_float(v, strtod(s, NULL))
                                               : to_int(v, i);
    else
        v->kind = CH_STRING; /* Decimal, big integers, strings */
}

typedef struct {
    ch_result *r;
    size_t cap; /* cells allocated */
} builder;

static bool meta_entry(jp *j, ch_column *col) {
    if (!eat(j, '{'))
        return fail(j, "meta: expected an object");
    if (eat(j, '}'))
        return fail(j, "meta: empty column");
    do {
        buf key = {0}, val = {0};
        bool ok = eat(j, '"') && json_string(j, &key) && eat(j, ':') &&
                  eat(j, '"') && json_string(j, &val);
        if (ok && key.p && strcmp(key.p, "name") == 0 && !col->name)
            col->name = buf_take(&val);
        else if (ok && key.p && strcmp(key.p, "type") == 0 && !col->type)
            col->type = buf_take(&val);
        buf_free(&key);
        buf_free(&val);
        if (!ok)
            return fail(j, "meta: bad entry");
    } while (eat(j, ','));
    if (!eat(j, '}') || !col->name || !col->type)
        return fail(j, "meta: a column needs a name and a type");
    return true;
}

static bool parse_meta(jp *j, builder *b) {
    ch_result *r = b->r;
    size_t cap = 0;
    if (r->columns)
        return fail(j, "meta twice");
    if (!eat(j, '['))
        return fail(j, "meta: expected an array");
    if (eat(j, ']'))
        return true;
    do {
        if (r->ncols == cap) {
            cap = cap ? cap * 2 : 8;
            ch_column *n = realloc(r->columns, cap * sizeof *n);
            if (!n)
                return fail(j, "out of memory");
            r->columns = n;
        }
        memset(&r->columns[r->ncols], 0, sizeof *r->columns);
        r->ncols++;
        if (!meta_entry(j, &r->columns[r->ncols - 1]))
            return false;
    } while (eat(j, ','));
    return eat(j, ']') || fail(j, "meta: expected ']'");
}

static bool parse_row(jp *j, builder *b) {
    ch_result *r = b->r;
    bool object = eat(j, '{');
    if (!object && !eat(j, '['))
        return fail(j, "data: expected a row");
    size_t n = 0;
    if (!eat(j, object ? '}' : ']')) {
        do {
            if (object) {
                buf key = {0};
                bool ok = eat(j, '"') && json_string(j, &key) && eat(j, ':');
                buf_free(&key);
                if (!ok)
                    return fail(j, "data: bad row object");
            }
            if (n >= r->ncols)
                return fail(j, "data: more values than columns");
            ch_value *cell = &r->cells[r->nrows * r->ncols + n];
            n++;
            if (!json_value(j, cell))
                return false;
            convert(cell, r->columns[n - 1].type,
                    strlen(r->columns[n - 1].type));
        } while (eat(j, ','));
        if (!eat(j, object ? '}' : ']'))
            return fail(j, "data: row not closed");
    }
    if (n != r->ncols)
        return fail(j, "data: fewer values than columns");
    r->nrows++;
    return true;
}

static bool parse_data(jp *j, builder *b) {
    ch_result *r = b->r;
    if (!eat(j, '['))
        return fail(j, "data: expected an array");
    if (eat(j, ']'))
        return true;
    if (!r->columns && r->ncols == 0)
        return fail(j, "data before meta");
    do {
        /* room for one whole row */
        while (r->nrows * r->ncols + r->ncols > b->cap) {
            size_t cap = b->cap ? b->cap * 2 : 64;
            ch_value *n = realloc(r->cells, cap * sizeof *n);
            if (!n)
                return fail(j, "out of memory");
            r->cells = n;
            b->cap = cap;
        }
        memset(&r->cells[r->nrows * r->ncols], 0,
               r->ncols * sizeof *r->cells);
        if (!parse_row(j, b)) {
            /* free the values of the partial row */
            ch_value *row = &r->cells[r->nrows * r->ncols];
            for (size_t k = 0; k < r->ncols; k++)
                value_free(&row[k]);
            return false;
        }
    } while (eat(j, ','));
    return eat(j, ']') || fail(j, "data: expected ']'");
}

const ch_value *ch_cell(const ch_result *r, size_t row, size_t col) {
    if (!r || row >= r->nrows || col >= r->ncols)
        return NULL;
    return &r->cells[row * r->ncols + col];
}

void ch_result_free(ch_result *r) {
    if (!r)
        return;
    for (size_t i = 0; i < r->nrows * r->ncols; i++)
        value_free(&r->cells[i]);
    for (size_t i = 0; i < r->ncols; i++) {
        free(r->columns[i].name);
        free(r->columns[i].type);
    }
    free(r->columns);
    free(r->cells);
    free(r);
}

static bool parse_top(jp *j, builder *b, ch_error *err, bool *server_err) {
    if (!eat(j, '{'))
        return fail(j, "expected a JSON object (is there a FORMAT clause "
                    "other than JSON or JSONCompact?)");
    if (eat(j, '}'))
        return true;
    do {
        buf key = {0};
        if (!eat(j, '"') || !json_string(j, &key) || !eat(j, ':')) {
            buf_free(&key);
            return fail(j, "expected a member name");
        }
        const char *k = key.p ? key.p : "";
        bool ok;
        if (strcmp(k, "meta") == 0) {
            ok = parse_meta(j, b);
        } else if (strcmp(k, "data") == 0) {
            ok = parse_data(j, b);
        } else if (strcmp(k, "exception") == 0) {
            ch_value v = {0};
            ok = json_value(j, &v);
            if (ok && v.kind == CH_STRING) {
                if (!ch_error_parse(v.u.s.ptr, v.u.s.len, err))
                    err_set(err, CH_E_SERVER, "ClickHouse error: %.900s",
                            v.u.s.ptr);
                *server_err = true;
            }
            value_free(&v);
            if (*server_err) {
                buf_free(&key);
                return false;
            }
        } else {
            ok = json_skip(j);
        }
        buf_free(&key);
        if (!ok)
            return false;
    } while (eat(j, ','));
    if (!eat(j, '}'))
        return fail(j, "expected ',' or '}'");
    ws(j);
    return j->p == j->end || fail(j, "text after the JSON object");
}

ch_result *ch_result_parse(const char *body, size_t len, ch_error *err) {
    ch_result *r = calloc(1, sizeof *r);
    if (!r) {
        err_set(err, CH_E_NOMEM, "out of memory parsing a ClickHouse result");
        return NULL;
    }
    jp j = {body, body + len, 0, NULL};
    ws(&j);
    if (j.p == j.end)
        return r;

    builder b = {r, 0};
    bool server_err = false;
    if (parse_top(&j, &b, err, &server_err))
        return r;
    ch_result_free(r);
    if (server_err)
        return NULL;
    if (ch_error_in_tail(body, len, NULL, err))
        return NULL;
    err_set(err, CH_E_PROTOCOL, "could not read ClickHouse's answer: %s at "
            "byte %zu of %zu", j.why ? j.why : "malformed JSON",
            (size_t)(j.p - body), len);
    return NULL;
}

/* ---- client ----------------------------------------------------------- */

struct ch_client {
    ch_settings s;
    ch_options o;
    char base[320];   /* http://host:port/ */
    char where[280];  /* host:port, for messages */
    CURLM *multi;     /* for the blocking calls */
    struct curl_slist *headers;
    bool connected;
    char version[64], timezone[64];
    int major, minor;
    ch_stats stats;
};

typedef enum { R_QUERY, R_EXEC, R_INSERT, R_PING } rtype;

struct ch_request {
    ch_client *c;
    rtype type;
    CURL *easy;
    CURLM *multi;
    char *url;
    char *body;
    size_t body_len;
    buf resp;
    char tag[64];
    bool got_byte, retried, too_big;
    char query_id[64];
    ch_result *result;
    char errbuf[CURL_ERROR_SIZE];
    long timeout_ms;
};

static pthread_once_t curl_once = PTHREAD_ONCE_INIT;

static void curl_start(void) { curl_global_init(CURL_GLOBAL_DEFAULT); }

static void set_defaults(ch_options *o) {
    if (o->connect_timeout_ms <= 0)
        o->connect_timeout_ms = 3000;
    if (o->timeout_ms < 0)
        o->timeout_ms = 0;
    if (o->retries < 0)
        o->retries = 0;
    if (o->retry_backoff_ms <= 0)
        o->retry_backoff_ms = 200;
    if (o->max_idle_ms <= 0)
        o->max_idle_ms = 2000;
    if (o->max_response_bytes == 0)
        o->max_response_bytes = (size_t)256 << 20;
}

static struct curl_slist *make_headers(const ch_settings *s) {
    struct curl_slist *h = NULL, *t;
    char line[1024];
    const char *add[4];
    snprintf(line, sizeof line, "X-ClickHouse-User: %s", s->user);
    add[0] = line;
    add[1] = "Content-Type: text/plain; charset=utf-8";
    add[2] = "Expect:";
    for (int i = 0; i < 3; i++) {
        if (!(t = curl_slist_append(h, add[i])))
            goto fail;
        h = t;
    }
    size_t n = strlen(s->password) + 32;
    char *key = malloc(n);
    if (!key)
        goto fail;
    snprintf(key, n, "X-ClickHouse-Key: %s", s->password);
    t = curl_slist_append(h, key);
    memset(key, 0, n);
    free(key);
    if (!t)
        goto fail;
    return t;
fail:
    curl_slist_free_all(h);
    return NULL;
}

ch_client *ch_client_new(const ch_settings *s, const ch_options *o) {
    pthread_once(&curl_once, curl_start);
    ch_client *c = calloc(1, sizeof *c);
    if (!c)
        return NULL;
    if (o)
        c->o = *o;
    else
        c->o.timeout_ms = 30000;
    set_defaults(&c->o);
    c->s.host = strdup(s->host ? s->host : "");
    c->s.user = strdup(s->user ? s->user : "default");
    c->s.password = strdup(s->password ? s->password : "");
    c->s.database = strdup(s->database ? s->database : "default");
    c->s.port = s->port > 0 ? s->port : (s->secure ? 8443 : 8123);
    c->s.secure = s->secure;
    c->multi = curl_multi_init();
    c->headers = c->s.user && c->s.password ? make_headers(&c->s) : NULL;
    if (!c->s.host || !c->s.user || !c->s.password || !c->s.database ||
        !c->multi || !c->headers) {
        ch_client_free(c);
        return NULL;
    }
    if (strlen(c->s.password) >= 4)
        log_add_secret(c->s.password);
    bool v6 = strchr(c->s.host, ':') && c->s.host[0] != '[';
    snprintf(c->where, sizeof c->where, "%s%s%s:%d", v6 ? "[" : "",
             c->s.host, v6 ? "]" : "", c->s.port);
    snprintf(c->base, sizeof c->base, "%s://%s/",
             c->s.secure ? "https" : "http", c->where);
    return c;
}

void ch_close(ch_client *c) {
    if (!c)
        return;
    c->connected = false;
    c->version[0] = c->timezone[0] = '\0';
    c->major = c->minor = 0;
    CURLM *fresh = curl_multi_init(); /* drops the cached sockets */
    if (fresh) {
        curl_multi_cleanup(c->multi);
        c->multi = fresh;
    }
}

void ch_client_free(ch_client *c) {
    if (!c)
        return;
    if (c->multi)
        curl_multi_cleanup(c->multi);
    curl_slist_free_all(c->headers);
    if (c->s.password)
        memset(c->s.password, 0, strlen(c->s.password));
    ch_settings_free(&c->s);
    free(c);
}

bool ch_connected(const ch_client *c) { return c && c->connected; }

const char *ch_version(const ch_client *c) {
    return c && c->connected ? c->version : "";
}

const char *ch_timezone(const ch_client *c) {
    return c && c->connected ? c->timezone : "";
}

bool ch_version_at_least(const ch_client *c, int major, int minor) {
    if (!c || !c->connected)
        return false;
    return c->major > major || (c->major == major && c->minor >= minor);
}

ch_stats ch_client_stats(const ch_client *c) {
    ch_stats none = {0};
    return c ? c->stats : none;
}

void ch_new_query_id(char out[37]) {
    unsigned char b[16];
    if (getrandom(b, sizeof b, 0) != (ssize_t)sizeof b) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        for (size_t i = 0; i < sizeof b; i++)
            b[i] = (unsigned char)(rand() ^ (ts.tv_nsec >> (i % 8)));
    }
    b[6] = (unsigned char)((b[6] & 0x0F) | 0x40);
    b[8] = (unsigned char)((b[8] & 0x3F) | 0x80);
    snprintf(out, 37,
             "%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-"
             "%02x%02x%02x%02x%02x%02x",
             b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9],
             b[10], b[11], b[12], b[13], b[14], b[15]);
}

/* ---- requests --------------------------------------------------------- */

static size_t on_body(char *p, size_t size, size_t n, void *ud) {
    ch_request *r = ud;
    size_t len = size * n;
    r->got_byte = true;
    if (r->resp.len + len > r->c->o.max_response_bytes) {
        r->too_big = true;
        return 0;
    }
    buf_add(&r->resp, p, len);
    return r->resp.failed ? 0 : len;
}

static size_t on_header(char *p, size_t size, size_t n, void *ud) {
    ch_request *r = ud;
    size_t len = size * n;
    static const char name[] = "x-clickhouse-exception-tag:";
    r->got_byte = true;
    if (len > sizeof name - 1 && strncasecmp(p, name, sizeof name - 1) == 0) {
        const char *v = p + sizeof name - 1;
        size_t vl = len - (sizeof name - 1);
        while (vl && (*v == ' ' || *v == '\t')) {
            v++;
            vl--;
        }
        while (vl && (v[vl - 1] == '\r' || v[vl - 1] == '\n' ||
                      v[vl - 1] == ' '))
            vl--;
        if (vl < sizeof r->tag) {
            memcpy(r->tag, v, vl);
            r->tag[vl] = '\0';
        }
    }
    return len;
}

static void add_param(buf *u, CURL *e, const char *k, const char *v) {
    char *esc = curl_easy_escape(e, v, 0);
    buf_addc(u, u->p && strchr(u->p, '?') ? '&' : '?');
    buf_adds(u, k);
    buf_addc(u, '=');
    if (esc)
        buf_adds(u, esc);
    else
        u->failed = true;
    curl_free(esc);
}

static bool build_url(ch_request *r, const ch_query_opts *o,
                      const char *insert_sql) {
    ch_client *c = r->c;
    buf u = {0};
    buf_adds(&u, c->base);
    if (r->type == R_PING) {
        buf_adds(&u, "ping");
        r->url = buf_take(&u);
        return r->url != NULL;
    }
    add_param(&u, r->easy, "database", c->s.database);
    add_param(&u, r->easy, "query_id", r->query_id);
    if (!(o && o->stream))
        buf_adds(&u, "&wait_end_of_query=1");
    if (r->type == R_QUERY) {
        buf_adds(&u, "&default_format=JSONCompact");
        if (r->timeout_ms > 0) {
            char t[48];
            snprintf(t, sizeof t, "&max_execution_time=%ld",
                     (r->timeout_ms + 999) / 1000);
            buf_adds(&u, t);
        }
    }
    if (o && o->readonly) {
        buf_adds(&u, "&readonly=2");
        /* settings newer servers know; 18.16 rejects unknown ones */
        if (ch_version_at_least(c, 19, 17))
            buf_adds(&u, "&cancel_http_readonly_queries_on_client_close=1");
    }
    if (o && o->settings && *o->settings) {
        buf_addc(&u, '&');
        buf_adds(&u, o->settings);
    }
    if (insert_sql)
        add_param(&u, r->easy, "query", insert_sql);
    r->url = buf_take(&u);
    return r->url != NULL;
}

static void prepare(ch_request *r) {
    ch_client *c = r->c;
    CURL *e = r->easy;
    long idle_s = c->o.max_idle_ms / 1000;
    curl_easy_setopt(e, CURLOPT_URL, r->url);
    curl_easy_setopt(e, CURLOPT_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(e, CURLOPT_HTTPHEADER, c->headers);
    curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS, c->o.connect_timeout_ms);
    curl_easy_setopt(e, CURLOPT_TIMEOUT_MS, r->timeout_ms);
    curl_easy_setopt(e, CURLOPT_MAXAGE_CONN, idle_s > 0 ? idle_s : 1L);
    curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, on_body);
    curl_easy_setopt(e, CURLOPT_WRITEDATA, r);
    curl_easy_setopt(e, CURLOPT_HEADERFUNCTION, on_header);
    curl_easy_setopt(e, CURLOPT_HEADERDATA, r);
    curl_easy_setopt(e, CURLOPT_PRIVATE, r);
    curl_easy_setopt(e, CURLOPT_ERRORBUFFER, r->errbuf);
    if (c->o.insecure_tls) {
        curl_easy_setopt(e, CURLOPT_SSL_VERIFYPEER, 0L);
        curl_easy_setopt(e, CURLOPT_SSL_VERIFYHOST, 0L);
    }
    if (r->type == R_PING) {
        curl_easy_setopt(e, CURLOPT_HTTPGET, 1L);
    } else {
        curl_easy_setopt(e, CURLOPT_POSTFIELDS, r->body ? r->body : "");
        curl_easy_setopt(e, CURLOPT_POSTFIELDSIZE_LARGE,
                         (curl_off_t)r->body_len);
    }
}

static void rearm(ch_request *r) {
    r->resp.len = 0;
    r->resp.failed = false;
    r->tag[0] = '\0';
    r->errbuf[0] = '\0';
    r->got_byte = r->too_big = false;
}

static ch_request *request_new(ch_client *c, rtype type,
                               const ch_query_opts *o, ch_error *err,
                               bool need_connected) {
    if (!c || (need_connected && !c->connected)) {
        err_set(err, CH_E_NOT_CONNECTED, CH_NOT_CONNECTED);
        return NULL;
    }
    ch_request *r = calloc(1, sizeof *r);
    if (!r || !(r->easy = curl_easy_init())) {
        free(r);
        err_set(err, CH_E_NOMEM, "out of memory making a ClickHouse request");
        return NULL;
    }
    r->c = c;
    r->type = type;
    r->timeout_ms = o && o->timeout_ms > 0 ? o->timeout_ms : c->o.timeout_ms;
    if (o && o->query_id && *o->query_id)
        snprintf(r->query_id, sizeof r->query_id, "%s", o->query_id);
    else
        ch_new_query_id(r->query_id);
    return r;
}

static ch_request *finish_new(ch_request *r, const ch_query_opts *o,
                              const char *insert_sql, ch_error *err) {
    if (!build_url(r, o, insert_sql)) {
        ch_request_free(r);
        err_set(err, CH_E_NOMEM, "out of memory making a ClickHouse request");
        return NULL;
    }
    prepare(r);
    return r;
}

static ch_request *sql_request(ch_client *c, rtype type, const char *sql,
                               const ch_query_opts *o, ch_error *err,
                               bool need_connected) {
    if (!sql) {
        err_set(err, CH_E_USAGE, "no SQL given");
        return NULL;
    }
    ch_request *r = request_new(c, type, o, err, need_connected);
    if (!r)
        return NULL;
    r->body_len = strlen(sql);
    r->body = dup_n(sql, r->body_len);
    if (!r->body) {
        ch_request_free(r);
        err_set(err, CH_E_NOMEM, "out of memory making a ClickHouse request");
        return NULL;
    }
    return finish_new(r, o, NULL, err);
}

ch_request *ch_request_query(ch_client *c, const char *sql,
                             const ch_query_opts *o, ch_error *err) {
    return sql_request(c, R_QUERY, sql, o, err, true);
}

ch_request *ch_request_exec(ch_client *c, const char *sql,
                            const ch_query_opts *o, ch_error *err) {
    return sql_request(c, R_EXEC, sql, o, err, true);
}

ch_request *ch_request_ping(ch_client *c, ch_error *err) {
    ch_request *r = request_new(c, R_PING, NULL, err, true);
    return r ? finish_new(r, NULL, NULL, err) : NULL;
}

static char *insert_sql(const char *table, const char *const *columns,
                        size_t ncols) {
    buf b = {0};
    char *t = ch_ident(table, strlen(table));
    buf_adds(&b, "INSERT INTO ");
    if (t)
        buf_adds(&b, t);
    else
        b.failed = true;
    free(t);
    for (size_t i = 0; i < ncols; i++) {
        char *q = ch_ident(columns[i], strlen(columns[i]));
        buf_adds(&b, i ? ", " : " (");
        if (q)
            buf_adds(&b, q);
        else
            b.failed = true;
        free(q);
    }
    buf_adds(&b, ncols ? ") FORMAT TabSeparated" : " FORMAT TabSeparated");
    return buf_take(&b);
}

ch_request *ch_request_insert(ch_client *c, const char *table,
                              const char *const *columns, size_t ncols,
                              const ch_rows *rows, const ch_query_opts *o,
                              ch_error *err) {
    if (!table || !*table || !rows || (ncols && !columns)) {
        err_set(err, CH_E_USAGE, "insert needs a table name and rows");
        return NULL;
    }
    ch_request *r = request_new(c, R_INSERT, o, err, true);
    if (!r)
        return NULL;
    size_t len;
    const char *data = ch_rows_data(rows, &len);
    r->body = dup_n(data, len);
    r->body_len = len;
    char *sql = insert_sql(table, columns, ncols);
    if (!r->body || !sql) {
        free(sql);
        ch_request_free(r);
        err_set(err, CH_E_NOMEM, "out of memory making a ClickHouse insert");
        return NULL;
    }
    r = finish_new(r, o, sql, err);
    free(sql);
    return r;
}

int ch_request_start(ch_request *r, CURLM *multi, ch_error *err) {
    if (r->multi) {
        err_set(err, CH_E_USAGE, "the request is already started");
        return CH_ERR;
    }
    rearm(r);
    CURLMcode mc = curl_multi_add_handle(multi, r->easy);
    if (mc != CURLM_OK) {
        err_set(err, CH_E_USAGE, "could not start the ClickHouse request: %s",
                curl_multi_strerror(mc));
        return CH_ERR;
    }
    r->multi = multi;
    return CH_OK;
}

ch_request *ch_request_of(CURL *easy) {
    char *p = NULL;
    if (curl_easy_getinfo(easy, CURLINFO_PRIVATE, &p) != CURLE_OK)
        return NULL;
    return (ch_request *)(void *)p;
}

/* The transfer failed at the libcurl level: say what and what to do. */
static void transfer_error(ch_request *r, CURLcode rc, ch_error *err) {
    ch_client *c = r->c;
    const char *why = r->errbuf[0] ? r->errbuf : curl_easy_strerror(rc);
    curl_off_t connect_us = 0;
    curl_easy_getinfo(r->easy, CURLINFO_CONNECT_TIME_T, &connect_us);
    bool connecting = !r->got_byte && connect_us == 0;

    if (r->too_big) {
        err_set(err, CH_E_PROTOCOL, "ClickHouse's answer is larger than %zu "
                "bytes - add a LIMIT or raise max_response_bytes",
                c->o.max_response_bytes);
    } else if (rc == CURLE_COULDNT_CONNECT || rc == CURLE_COULDNT_RESOLVE_HOST
               || rc == CURLE_SSL_CONNECT_ERROR ||
               (rc == CURLE_OPERATION_TIMEDOUT && connecting)) {
        err_set(err, CH_E_CONNECT, "could not connect to ClickHouse at %s: %s "
                "- check that the server runs and CLICKHOUSE_URL or "
                "CLICKHOUSE_HOST/CLICKHOUSE_PORT point at it", c->where, why);
    } else if (rc == CURLE_OPERATION_TIMEDOUT) {
        err_set(err, CH_E_TIMEOUT, "ClickHouse at %s did not answer within "
                "%ld ms (query_id %s): %s - raise the timeout or make the "
                "query cheaper", c->where, r->timeout_ms, r->query_id, why);
    } else {
        err_set(err, CH_E_NETWORK, "the connection to ClickHouse at %s broke "
                "(query_id %s): %s", c->where, r->query_id, why);
    }
}

/* A reused keep-alive socket the server had closed: nothing came back. */
static bool stale_socket(ch_request *r, CURLcode rc) {
    long fresh = 1;
    if (r->retried || r->got_byte)
        return false;
    if (rc != CURLE_SEND_ERROR && rc != CURLE_RECV_ERROR &&
        rc != CURLE_GOT_NOTHING)
        return false;
    curl_easy_getinfo(r->easy, CURLINFO_NUM_CONNECTS, &fresh);
    return fresh == 0;
}

static int check_answer(ch_request *r, ch_error *err) {
    long status = 0;
    curl_easy_getinfo(r->easy, CURLINFO_RESPONSE_CODE, &status);
    const char *body = r->resp.p ? r->resp.p : "";
    size_t len = r->resp.len;

    if (status != 200) {
        if (!ch_error_parse(body, len, err))
            err_set(err, status == 401 || status == 403 ? CH_E_SERVER
                                                        : CH_E_PROTOCOL,
                    "ClickHouse at %s answered HTTP %ld: %.300s", r->c->where,
                    status, body);
        if (err)
            err->http_status = status;
        return CH_ERR;
    }
    /* a query's JSON is checked whole; a late error makes it invalid */
    if (r->type != R_QUERY &&
        ch_error_in_tail(body, len, r->tag[0] ? r->tag : NULL, err)) {
        if (err)
            err->http_status = status;
        return CH_ERR;
    }
    if (r->type == R_PING && strncmp(body, "Ok.", 3) != 0) {
        err_set(err, CH_E_PROTOCOL, "%s answered /ping with something other "
                "than Ok. - is it ClickHouse?", r->c->where);
        return CH_ERR;
    }
    if (r->type == R_QUERY) {
        r->result = ch_result_parse(body, len, err);
        if (!r->result) {
            if (err)
                err->http_status = status;
            return CH_ERR;
        }
        snprintf(r->result->query_id, sizeof r->result->query_id, "%s",
                 r->query_id);
    }
    return CH_OK;
}

int ch_request_finish(ch_request *r, CURLcode rc, ch_error *err) {
    CURLM *multi = r->multi;
    if (multi)
        curl_multi_remove_handle(multi, r->easy);
    r->multi = NULL;
    r->c->stats.requests++;

    if (rc != CURLE_OK && multi && stale_socket(r, rc)) {
        r->retried = true;
        r->c->stats.stale_retries++;
        log_msg(NLOG_DEBUG, "ClickHouse", "retrying query_id %s on a new "
                "connection: the kept-alive one was closed", r->query_id);
        if (ch_request_start(r, multi, err) == CH_OK)
            return CH_AGAIN;
        return CH_ERR;
    }
    if (rc != CURLE_OK) {
        transfer_error(r, rc, err);
        return CH_ERR;
    }
    return check_answer(r, err);
}

ch_result *ch_request_take_result(ch_request *r) {
    ch_result *res = r->result;
    r->result = NULL;
    return res;
}

const char *ch_request_query_id(const ch_request *r) { return r->query_id; }

void ch_request_free(ch_request *r) {
    if (!r)
        return;
    if (r->multi)
        curl_multi_remove_handle(r->multi, r->easy);
    curl_easy_cleanup(r->easy);
    free(r->url);
    free(r->body);
    buf_free(&r->resp);
    ch_result_free(r->result);
    free(r);
}

/* ---- blocking calls ---------------------------------------------------- */

static void pause_ms(long ms) {
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) == -1 && errno == EINTR)
        ;
}

/* Drives r on the client's own multi handle until it is done. */
static int drive(ch_request *r, ch_error *err) {
    ch_client *c = r->c;
    if (ch_request_start(r, c->multi, err) != CH_OK)
        return CH_ERR;
    for (;;) {
        int running = 0, left = 0;
        curl_multi_perform(c->multi, &running);
        CURLMsg *m;
        while ((m = curl_multi_info_read(c->multi, &left))) {
            if (m->msg != CURLMSG_DONE || m->easy_handle != r->easy)
                continue;
            int rc = ch_request_finish(r, m->data.result, err);
            if (rc != CH_AGAIN)
                return rc;
        }
        curl_multi_poll(c->multi, NULL, 0, 1000, NULL);
    }
}

/* Runs r, retrying connect failures (nothing was sent) with backoff. */
static int run(ch_request *r, ch_error *err) {
    ch_error local;
    ch_error *e = err ? err : &local;
    long pause = r->c->o.retry_backoff_ms;
    for (int attempt = 0;; attempt++) {
        int rc = drive(r, e);
        if (rc == CH_OK || e->kind != CH_E_CONNECT ||
            attempt >= r->c->o.retries)
            return rc;
        r->c->stats.connect_retries++;
        pause_ms(pause);
        pause *= 2;
    }
}

static int run_free(ch_request *r, ch_result **out, ch_error *err) {
    if (!r)
        return CH_ERR;
    int rc = run(r, err);
    if (rc == CH_OK && out)
        *out = ch_request_take_result(r);
    ch_request_free(r);
    return rc;
}

int ch_connect(ch_client *c, ch_error *err) {
    if (!c) {
        err_set(err, CH_E_USAGE, "no ClickHouse client");
        return CH_ERR;
    }
    ch_close(c);
    ch_result *res = NULL;
    ch_request *r = sql_request(c, R_QUERY, "SELECT version(), timezone()",
                                NULL, err, false);
    if (run_free(r, &res, err) != CH_OK)
        return CH_ERR;
    const ch_value *v = ch_cell(res, 0, 0), *tz = ch_cell(res, 0, 1);
    if (!v || !tz || v->kind != CH_STRING || tz->kind != CH_STRING) {
        ch_result_free(res);
        err_set(err, CH_E_PROTOCOL, "ClickHouse at %s gave no version",
                c->where);
        return CH_ERR;
    }
    snprintf(c->version, sizeof c->version, "%s", v->u.s.ptr);
    snprintf(c->timezone, sizeof c->timezone, "%s", tz->u.s.ptr);
    sscanf(c->version, "%d.%d", &c->major, &c->minor);
    ch_result_free(res);
    c->connected = true;
    return CH_OK;
}

int ch_ping(ch_client *c, ch_error *err) {
    return run_free(ch_request_ping(c, err), NULL, err);
}

int ch_query(ch_client *c, const char *sql, const ch_query_opts *o,
             ch_result **out, ch_error *err) {
    *out = NULL;
    return run_free(ch_request_query(c, sql, o, err), out, err);
}

int ch_exec(ch_client *c, const char *sql, const ch_query_opts *o,
            ch_error *err) {
    return run_free(ch_request_exec(c, sql, o, err), NULL, err);
}

int ch_insert(ch_client *c, const char *table, const char *const *columns,
              size_t ncols, const ch_rows *rows, const ch_query_opts *o,
              ch_error *err) {
    ch_request *r = ch_request_insert(c, table, columns, ncols, rows, o, err);
    return run_free(r, NULL, err);
}

int ch_kill(ch_client *c, const char *query_id, int *killed, ch_error *err) {
    if (killed)
        *killed = 0;
    if (!query_id || !*query_id) {
        err_set(err, CH_E_USAGE, "kill needs a query_id");
        return CH_ERR;
    }
    if (!ch_connected(c)) {
        err_set(err, CH_E_NOT_CONNECTED, CH_NOT_CONNECTED);
        return CH_ERR;
    }
    char *q = ch_quote(query_id, strlen(query_id));
    buf sql = {0};
    buf_adds(&sql, "KILL QUERY WHERE query_id = ");
    if (q)
        buf_adds(&sql, q);
    free(q);
    if (!q || sql.failed) {
        buf_free(&sql);
        err_set(err, CH_E_NOMEM, "out of memory");
        return CH_ERR;
    }
    ch_result *res = NULL;
    int rc = ch_query(c, sql.p, NULL, &res, err);
    buf_free(&sql);
    if (rc == CH_OK && killed)
        *killed = (int)res->nrows;
    ch_result_free(res);
    return rc;
}
