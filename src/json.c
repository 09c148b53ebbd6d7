/* json: strict checking of untrusted JSON text before cJSON parses it. */
#include "json.h"

#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- UTF-8 ---- */

/* Length of the valid UTF-8 sequence at s[0..left), or 0 if invalid. */
static size_t utf8_seq(const unsigned char *s, size_t left) {
    unsigned char c = s[0];

    if (c < 0x80) return 1;
    if (c < 0xC2 || c > 0xF4) /* continuation, overlong lead, > U+10FFFF */
        return 0;

    size_t n = c < 0xE0 ? 2 : c < 0xF0 ? 3 : 4;
    if (left < n) return 0;
    for (size_t i = 1; i < n; i++)
        if ((s[i] & 0xC0) != 0x80) return 0;

    if (c == 0xE0 && s[1] < 0xA0) /* overlong 3-byte form */
        return 0;
    if (c == 0xED && s[1] >= 0xA0) /* U+D800..U+DFFF */
        return 0;
    if (c == 0xF0 && s[1] < 0x90) /* overlong 4-byte form */
        return 0;
    if (c == 0xF4 && s[1] >= 0x90) /* above U+10FFFF */
        return 0;
    return n;
}

bool json_utf8_check(const char *text, size_t len, size_t *bad_offset) {
    const unsigned char *s = (const unsigned char *)text;
    size_t i = 0;

    while (i < len) {
        if (s[i] < 0x80) {
            i++;
            continue;
        }
        size_t n = utf8_seq(s + i, len - i);
        if (n == 0) {
            if (bad_offset) *bad_offset = i;
            return false;
        }
        i += n;
    }
    return true;
}

bool json_utf8_valid(const char *text, size_t len) {
    return json_utf8_check(text, len, NULL);
}

/* ---- the strict scan ---- */

typedef struct {
    const unsigned char *s;
    size_t len;
    size_t pos;
    json_error *err;
} scan;

static bool scan_fail(scan *sc, size_t at, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static bool scan_fail(scan *sc, size_t at, const char *fmt, ...) {
    if (sc->err == NULL) return false;

    va_list ap;
    va_start(ap, fmt);
    vsnprintf(sc->err->message, sizeof sc->err->message, fmt, ap);
    va_end(ap);
    sc->err->offset = at;
    return false;
}

static void skip_ws(scan *sc) {
    while (sc->pos < sc->len) {
        unsigned char c = sc->s[sc->pos];
        if (c != ' ' && c != '\t' && c != '\n' && c != '\r') return;
        sc->pos++;
    }
}

static int hex_value(unsigned char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* Reads the four hex digits after "\u" at p; -1 if they are not there. */
static long read_u4(const unsigned char *s, size_t len, size_t p) {
    if (p > len || len - p < 4) return -1;

    long v = 0;
    for (int i = 0; i < 4; i++) {
        int h = hex_value(s[p + i]);
        if (h < 0) return -1;
        v = v * 16 + h;
    }
    return v;
}

/* A "\u" escape at sc->pos (pointing at the backslash); moves past it and
 * its low surrogate, if any. */
static bool scan_u_escape(scan *sc) {
    size_t at = sc->pos;
    long v = read_u4(sc->s, sc->len, at + 2);

    if (v < 0) return scan_fail(sc, at, "invalid \\u escape at byte %zu", at);
    if (v == 0)
        return scan_fail(sc, at,
                         "\\u0000 in a string at byte %zu (NUL characters "
                         "are not accepted)",
                         at);
    sc->pos = at + 6;
    if (v >= 0xDC00 && v <= 0xDFFF)
        return scan_fail(sc, at, "unpaired surrogate escape at byte %zu", at);
    if (v < 0xD800 || v > 0xDBFF) return true;

    long lo = -1;
    if (sc->pos + 1 < sc->len && sc->s[sc->pos] == '\\' &&
        sc->s[sc->pos + 1] == 'u')
        lo = read_u4(sc->s, sc->len, sc->pos + 2);
    if (lo < 0xDC00 || lo > 0xDFFF)
        return scan_fail(sc, at, "unpaired surrogate escape at byte %zu", at);
    sc->pos += 6;
    return true;
}

/* A string at sc->pos (the opening quote). The text is valid UTF-8. */
static bool scan_string(scan *sc) {
    size_t start = sc->pos;

    sc->pos++;
    while (sc->pos < sc->len) {
        unsigned char c = sc->s[sc->pos];
        if (c == '"') {
            sc->pos++;
            return true;
        }
        if (c < 0x20)
            return scan_fail(sc, sc->pos,
                             "control character in a string at byte %zu",
                             sc->pos);
        if (c != '\\') {
            sc->pos++;
            continue;
        }
        if (sc->pos + 1 >= sc->len) break;
        unsigned char e = sc->s[sc->pos + 1];
        if (e == 'u') {
            if (!scan_u_escape(sc)) return false;
        } else if (strchr("\"\\/bfnrt", e) != NULL && e != '\0') {
            sc->pos += 2;
        } else {
            return scan_fail(sc, sc->pos, "invalid escape at byte %zu",
                             sc->pos);
        }
    }
    return scan_fail(sc, start, "unterminated string starting at byte %zu",
                     start);
}

static bool is_digit(const scan *sc) {
    return sc->pos < sc->len && sc->s[sc->pos] >= '0' && sc->s[sc->pos] <= '9';
}

/* Moves past one or more digits; false if there is none. */
static bool scan_digits(scan *sc) {
    if (!is_digit(sc)) return false;
    while (is_digit(sc))
        sc->pos++;
    return true;
}

/* Is the number text s[0..n) too large for a double? */
static bool number_overflows(const unsigned char *s, size_t n) {
    char small[64];
    char *buf = n < sizeof small ? small : malloc(n + 1);

    if (buf == NULL) return false; /* cJSON will fail on memory and say so */
    memcpy(buf, s, n);
    buf[n] = '\0';
    double v = strtod(buf, NULL);
    if (buf != small) free(buf);
    return isinf(v);
}

static bool scan_number(scan *sc) {
    size_t start = sc->pos;

    if (sc->s[sc->pos] == '-') sc->pos++;
    if (sc->pos < sc->len && sc->s[sc->pos] == '0')
        sc->pos++;
    else if (!scan_digits(sc))
        return scan_fail(sc, start, "invalid number at byte %zu", start);
    if (sc->pos < sc->len && sc->s[sc->pos] == '.') {
        sc->pos++;
        if (!scan_digits(sc))
            return scan_fail(sc, start, "invalid number at byte %zu", start);
    }
    if (sc->pos < sc->len && (sc->s[sc->pos] | 0x20) == 'e') {
        sc->pos++;
        if (sc->pos < sc->len &&
            (sc->s[sc->pos] == '+' || sc->s[sc->pos] == '-'))
            sc->pos++;
        if (!scan_digits(sc))
            return scan_fail(sc, start, "invalid number at byte %zu", start);
    }
    if (number_overflows(sc->s + start, sc->pos - start))
        return scan_fail(sc, start, "number out of range at byte %zu", start);
    return true;
}

static bool scan_literal(scan *sc, const char *word) {
    size_t n = strlen(word);

    if (sc->len - sc->pos < n || memcmp(sc->s + sc->pos, word, n) != 0)
        return scan_fail(sc, sc->pos, "unexpected character at byte %zu",
                         sc->pos);
    sc->pos += n;
    return true;
}

static bool scan_scalar(scan *sc) {
    unsigned char c = sc->s[sc->pos];

    if (c == '"') return scan_string(sc);
    if (c == '-' || (c >= '0' && c <= '9')) return scan_number(sc);
    if (c == 't') return scan_literal(sc, "true");
    if (c == 'f') return scan_literal(sc, "false");
    if (c == 'n') return scan_literal(sc, "null");
    return scan_fail(sc, sc->pos, "unexpected character at byte %zu", sc->pos);
}

enum { WANT_VALUE, WANT_KEY, AFTER_VALUE };

/* One step in a container after a value: ',' or the closing bracket. */
static bool scan_after_value(scan *sc, char *stack, int *depth, int *state) {
    skip_ws(sc);
    if (sc->pos >= sc->len)
        return scan_fail(
            sc, sc->pos, "unexpected end of text inside %s at byte %zu",
            stack[*depth - 1] == '{' ? "an object" : "an array", sc->pos);

    char top = stack[*depth - 1];
    unsigned char c = sc->s[sc->pos];
    if (c == ',') {
        sc->pos++;
        *state = top == '{' ? WANT_KEY : WANT_VALUE;
        return true;
    }
    if ((top == '{' && c == '}') || (top == '[' && c == ']')) {
        sc->pos++;
        (*depth)--;
        return true;
    }
    return scan_fail(sc, sc->pos, "expected ',' or '%c' at byte %zu",
                     top == '{' ? '}' : ']', sc->pos);
}

/* A key, then ':'. */
static bool scan_key(scan *sc) {
    skip_ws(sc);
    if (sc->pos >= sc->len || sc->s[sc->pos] != '"')
        return scan_fail(sc, sc->pos, "expected a string key at byte %zu",
                         sc->pos);
    if (!scan_string(sc)) return false;
    skip_ws(sc);
    if (sc->pos >= sc->len || sc->s[sc->pos] != ':')
        return scan_fail(sc, sc->pos, "expected ':' at byte %zu", sc->pos);
    sc->pos++;
    return true;
}

/* Opens '{' or '[' at sc->pos; an empty container closes at once. */
static bool scan_open(scan *sc, char *stack, int *depth, int max_depth,
                      int *state) {
    unsigned char c = sc->s[sc->pos];

    if (*depth >= max_depth)
        return scan_fail(sc, sc->pos,
                         "nested deeper than %d levels at byte %zu", max_depth,
                         sc->pos);
    stack[(*depth)++] = (char)c;
    sc->pos++;
    skip_ws(sc);
    if (sc->pos < sc->len && sc->s[sc->pos] == (c == '{' ? '}' : ']')) {
        sc->pos++;
        (*depth)--;
        *state = AFTER_VALUE;
        return true;
    }
    *state = c == '{' ? WANT_KEY : WANT_VALUE;
    return true;
}

/* The whole grammar, without recursion: a stack of open brackets whose
 * size is the nesting bound. Sets *deepest to the deepest nesting seen. */
static bool scan_text(scan *sc, int max_depth, int *deepest) {
    size_t cap = (size_t)max_depth < sc->len ? (size_t)max_depth : sc->len;
    char *stack = malloc(cap + 1);
    int depth = 0;
    int state = WANT_VALUE;
    bool ok = true;

    if (stack == NULL)
        return scan_fail(sc, 0, "out of memory checking the JSON text");
    *deepest = 0;
    while (ok) {
        if (state == WANT_KEY) {
            ok = scan_key(sc);
            state = WANT_VALUE;
            continue;
        }
        if (state == AFTER_VALUE) {
            if (depth == 0) break;
            ok = scan_after_value(sc, stack, &depth, &state);
            continue;
        }
        skip_ws(sc);
        if (sc->pos >= sc->len) {
            ok = scan_fail(sc, sc->pos,
                           "unexpected end of text at byte %zu, expected a "
                           "value",
                           sc->pos);
            break;
        }
        unsigned char c = sc->s[sc->pos];
        if (c == '{' || c == '[') {
            ok = scan_open(sc, stack, &depth, max_depth, &state);
            if (depth > *deepest) *deepest = depth;
        } else {
            ok = scan_scalar(sc);
            state = AFTER_VALUE;
        }
    }
    free(stack);
    if (!ok) return false;

    skip_ws(sc);
    if (sc->pos < sc->len)
        return scan_fail(sc, sc->pos,
                         "trailing characters after the JSON value at byte "
                         "%zu",
                         sc->pos);
    return true;
}

/* ---- duplicate keys, after cJSON has parsed ---- */

static int cmp_keys(const void *a, const void *b) {
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* The first key that appears twice among the members of obj, or NULL. */
static const char *duplicate_key(const cJSON *obj, const char **scratch) {
    size_t n = 0;

    for (const cJSON *m = obj->child; m != NULL; m = m->next)
        scratch[n++] = m->string;
    if (n < 2) return NULL;
    qsort(scratch, n, sizeof *scratch, cmp_keys);
    for (size_t i = 1; i < n; i++)
        if (strcmp(scratch[i - 1], scratch[i]) == 0) return scratch[i];
    return NULL;
}

static void copy_printable(char *out, size_t n, const char *s) {
    size_t i = 0;

    for (; s[i] != '\0' && i + 1 < n; i++) {
        unsigned char c = (unsigned char)s[i];
        out[i] = (c < 0x20 || c == '"' || c == '\\' || c >= 0x7f) ? '?' : c;
    }
    out[i] = '\0';
}

/* Walks the tree (depth at most `deepest`) without recursion. `members`
 * is the largest number of bytes, an upper bound on members per object. */
static bool check_duplicates(const cJSON *root, int deepest, size_t bytes,
                             json_error *err) {
    const cJSON **path = malloc(sizeof *path * ((size_t)deepest + 2));
    const char **scratch = malloc(sizeof *scratch * (bytes / 4 + 2));
    int top = 0;
    bool ok = true;

    if (path == NULL || scratch == NULL) {
        free(path);
        free(scratch);
        if (err != NULL) {
            err->offset = JSON_NO_OFFSET;
            snprintf(err->message, sizeof err->message,
                     "out of memory checking the JSON text");
        }
        return false;
    }
    path[0] = root;
    while (ok && top >= 0) {
        const cJSON *v = path[top];
        const char *dup = NULL;

        if (cJSON_IsObject(v)) dup = duplicate_key(v, scratch);
        if (dup != NULL) {
            char name[48];
            copy_printable(name, sizeof name, dup);
            if (err != NULL) {
                err->offset = JSON_NO_OFFSET;
                snprintf(err->message, sizeof err->message,
                         "duplicate key \"%s\" in an object", name);
            }
            ok = false;
            break;
        }

        /* Next: the first child, else the next sibling going up. */
        if ((cJSON_IsObject(v) || cJSON_IsArray(v)) && v->child != NULL) {
            path[++top] = v->child;
            continue;
        }
        while (top > 0 && path[top]->next == NULL)
            top--;
        if (top == 0) break;
        path[top] = path[top]->next;
    }
    free(path);
    free(scratch);
    return ok;
}

cJSON *json_parse(const char *text, size_t len, int max_depth,
                  json_error *err) {
    scan sc = {(const unsigned char *)text, len, 0, err};
    size_t bad;
    int deepest = 0;

    if (max_depth <= 0) max_depth = JSON_DEFAULT_MAX_DEPTH;
    if (max_depth > CJSON_NESTING_LIMIT) max_depth = CJSON_NESTING_LIMIT;
    if (text == NULL) {
        scan_fail(&sc, 0, "no JSON text");
        return NULL;
    }
    if (!json_utf8_check(text, len, &bad)) {
        scan_fail(&sc, bad, "invalid UTF-8 at byte %zu", bad);
        return NULL;
    }
    if (!scan_text(&sc, max_depth, &deepest)) return NULL;

    const char *end = NULL;
    cJSON *v = cJSON_ParseWithLengthOpts(text, len, &end, false);
    if (v == NULL) {
        scan_fail(&sc, 0, "could not build the JSON value (out of memory)");
        return NULL;
    }
    if (!check_duplicates(v, deepest, len, err)) {
        cJSON_Delete(v);
        return NULL;
    }
    return v;
}

/* ---- raw members ---- */

/* Moves past a string at s[p] (the opening quote); returns the offset
 * after the closing quote, or 0 if it does not end. */
static size_t skip_string(const unsigned char *s, size_t len, size_t p) {
    for (p++; p < len; p++) {
        if (s[p] == '\\')
            p++;
        else if (s[p] == '"')
            return p + 1;
    }
    return 0;
}

/* Moves past any value at s[p]; returns the offset after it, or 0. */
static size_t skip_value(const unsigned char *s, size_t len, size_t p) {
    size_t depth = 0;

    while (p < len) {
        unsigned char c = s[p];
        if (c == '"') {
            p = skip_string(s, len, p);
            if (p == 0) return 0;
        } else if (c == '{' || c == '[') {
            depth++;
            p++;
        } else if (c == '}' || c == ']') {
            if (depth == 0) return p;
            depth--;
            p++;
        } else if (depth == 0 && (c == ',' || c == ' ' || c == '\t' ||
                                  c == '\n' || c == '\r')) {
            return p;
        } else {
            p++;
        }
        if (depth == 0 && (c == '"' || c == '}' || c == ']')) return p;
    }
    return depth == 0 ? p : 0;
}

/* Encodes code point cp as UTF-8 into out; returns the length. */
static size_t put_utf8(unsigned long cp, unsigned char *out) {
    if (cp < 0x80) {
        out[0] = (unsigned char)cp;
        return 1;
    }
    if (cp < 0x800) {
        out[0] = (unsigned char)(0xC0 | (cp >> 6));
        out[1] = (unsigned char)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        out[0] = (unsigned char)(0xE0 | (cp >> 12));
        out[1] = (unsigned char)(0x80 | ((cp >> 6) & 0x3F));
        out[2] = (unsigned char)(0x80 | (cp & 0x3F));
        return 3;
    }
    out[0] = (unsigned char)(0xF0 | (cp >> 18));
    out[1] = (unsigned char)(0x80 | ((cp >> 12) & 0x3F));
    out[2] = (unsigned char)(0x80 | ((cp >> 6) & 0x3F));
    out[3] = (unsigned char)(0x80 | (cp & 0x3F));
    return 4;
}

/* Does the string s[a..b) (inside the quotes) unescape to name? */
static bool key_equals(const unsigned char *s, size_t a, size_t b,
                       const char *name) {
    const unsigned char *want = (const unsigned char *)name;
    size_t w = 0, wn = strlen(name);

    while (a < b) {
        unsigned char buf[4];
        size_t n = 1;
        buf[0] = s[a];
        if (s[a] != '\\') {
            a++;
        } else if (a + 1 < b && s[a + 1] != 'u') {
            const char *from = "\"\\/bfnrt", *to = "\"\\/\b\f\n\r\t";
            const char *e = strchr(from, s[a + 1]);
            if (e == NULL || s[a + 1] == '\0') return false;
            buf[0] = (unsigned char)to[e - from];
            a += 2;
        } else {
            long cp = read_u4(s, b, a + 2);
            if (cp < 0) return false;
            a += 6;
            if (cp >= 0xD800 && cp <= 0xDBFF) {
                long lo = a + 1 < b && s[a] == '\\' && s[a + 1] == 'u'
                              ? read_u4(s, b, a + 2)
                              : -1;
                if (lo < 0xDC00 || lo > 0xDFFF) return false;
                cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                a += 6;
            }
            n = put_utf8((unsigned long)cp, buf);
        }
        if (wn - w < n || memcmp(want + w, buf, n) != 0) return false;
        w += n;
    }
    return w == wn;
}

bool json_raw_member(const char *text, size_t len, const char *name,
                     const char **start, size_t *n) {
    const unsigned char *s = (const unsigned char *)text;
    scan sc = {s, len, 0, NULL};

    skip_ws(&sc);
    if (sc.pos >= len || s[sc.pos] != '{') return false;
    sc.pos++;
    for (;;) {
        skip_ws(&sc);
        if (sc.pos >= len || s[sc.pos] != '"') return false;
        size_t key = sc.pos;
        size_t key_end = skip_string(s, len, key);
        if (key_end == 0) return false;

        sc.pos = key_end;
        skip_ws(&sc);
        if (sc.pos >= len || s[sc.pos] != ':') return false;
        sc.pos++;
        skip_ws(&sc);
        size_t v = sc.pos;
        size_t v_end = skip_value(s, len, v);
        if (v_end == 0 || v_end == v) return false;

        if (key_equals(s, key + 1, key_end - 1, name)) {
            *start = text + v;
            *n = v_end - v;
            return true;
        }
        sc.pos = v_end;
        skip_ws(&sc);
        if (sc.pos >= len || s[sc.pos] != ',') return false;
        sc.pos++;
    }
}

bool json_raw_id(const char *text, size_t len, const char **start, size_t *n) {
    return json_raw_member(text, len, "id", start, n);
}
