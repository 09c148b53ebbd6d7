/* context: user execution contexts and id rules (see context.h). */
#include "context.h"

#include <errno.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/random.h>

struct netra_ctx {
    atomic_uint refs;
    uint64_t conn_id;
    bool request_id_generated;
    const char *user_id;
    const char *thread_id;
    const char *run_id;
    const char *request_id;
    char strings[]; /* the four ids, each NUL-terminated */
};

static const char *const placeholders[] = {
    "none", "null", "undefined", "registry", "placeholder", "default", "mock",
};

static void fail(char *err, size_t err_size, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void fail(char *err, size_t err_size, const char *fmt, ...) {
    if (!err || err_size == 0) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, err_size, fmt, ap);
    va_end(ap);
}

/* What to do about a missing, empty or placeholder id, by field. */
static const char *advice_for(const char *field) {
    if (!strcmp(field, "user_id")) return "pass the authenticated user's id";
    if (!strcmp(field, "sub"))
        return "sign the token with the authenticated user's id";
    if (!strcmp(field, "request_id"))
        return "pass a real request id or leave it out to have one generated";
    return "pass a real id or leave it out";
}

/* Decodes one UTF-8 sequence at s[0..n). Returns its length and sets *cp,
 * or 0 when the bytes are not valid UTF-8 (truncated, overlong, a
 * surrogate, or beyond U+10FFFF). */
static size_t utf8_decode(const unsigned char *s, size_t n, uint32_t *cp) {
    unsigned char c = s[0];
    size_t len;
    uint32_t min;

    if (c < 0x80) {
        *cp = c;
        return 1;
    }
    if (c >= 0xC2 && c <= 0xDF) {
        len = 2, min = 0x80, *cp = c & 0x1F;
    } else if (c >= 0xE0 && c <= 0xEF) {
        len = 3, min = 0x800, *cp = c & 0x0F;
    } else if (c >= 0xF0 && c <= 0xF4) {
        len = 4, min = 0x10000, *cp = c & 0x07;
    } else {
        return 0;
    }
    if (len > n) return 0;

    for (size_t i = 1; i < len; i++) {
        if ((s[i] & 0xC0) != 0x80) return 0;
        *cp = (*cp << 6) | (s[i] & 0x3F);
    }
    if (*cp < min || *cp > 0x10FFFF) return 0;
    if (*cp >= 0xD800 && *cp <= 0xDFFF) return 0;
    return len;
}

static bool is_control(uint32_t cp) {
    return cp < 0x20 || (cp >= 0x7F && cp <= 0x9F);
}

/* Zero-width, bidirectional and line/paragraph separator characters. */
static bool is_invisible(uint32_t cp) {
    return (cp >= 0x200B && cp <= 0x200F) || (cp >= 0x2028 && cp <= 0x202E) ||
           (cp >= 0x2060 && cp <= 0x2069) || cp == 0xFEFF;
}

static bool is_space(uint32_t cp) {
    return cp == 0x20 || cp == 0xA0 || cp == 0x1680 ||
           (cp >= 0x2000 && cp <= 0x200A) || cp == 0x202F || cp == 0x205F ||
           cp == 0x3000;
}

/* Checks the characters of value[0..len); fills err on the first bad one. */
static bool check_chars(const char *field, const char *value, size_t len,
                        char *err, size_t err_size) {
    const unsigned char *s = (const unsigned char *)value;
    size_t at = 0;
    uint32_t cp = 0;

    while (at < len) {
        size_t n = utf8_decode(s + at, len - at, &cp);
        if (n == 0) {
            fail(err, err_size,
                 "%s: invalid UTF-8 at byte %zu - ids must be UTF-8 text",
                 field, at);
            return false;
        }
        if (is_control(cp) || is_invisible(cp)) {
            fail(err, err_size,
                 "%s: %s character U+%04X at byte %zu - ids must be "
                 "printable text",
                 field, is_control(cp) ? "control" : "invisible", (unsigned)cp,
                 at);
            return false;
        }
        if (is_space(cp) && (at == 0 || at + n == len)) {
            fail(err, err_size,
                 "%s: whitespace at the %s - pass the id without padding",
                 field, at == 0 ? "start" : "end");
            return false;
        }
        at += n;
    }
    return true;
}

bool ctx_validate_id(const char *field, const char *value, char *err,
                     size_t err_size) {
    if (!field) field = "id";
    if (!value) {
        fail(err, err_size, "%s: missing - %s", field, advice_for(field));
        return false;
    }

    size_t len = strnlen(value, CTX_ID_MAX + 1);
    if (len == 0) {
        fail(err, err_size, "%s: empty - %s", field, advice_for(field));
        return false;
    }
    if (len > CTX_ID_MAX) {
        fail(err, err_size,
             "%s: longer than %d bytes - pass a shorter id (a hash of a "
             "long name works)",
             field, CTX_ID_MAX);
        return false;
    }

    if (!check_chars(field, value, len, err, err_size)) return false;

    for (size_t i = 0; i < sizeof placeholders / sizeof *placeholders; i++) {
        if (strcasecmp(value, placeholders[i])) continue;
        fail(err, err_size, "%s: placeholder value '%s' is not a real id - %s",
             field, value, advice_for(field));
        return false;
    }
    return true;
}

int ctx_new_id(char out[CTX_NEW_ID_LEN + 1]) {
    unsigned char b[16];
    size_t got = 0;

    out[0] = '\0';
    while (got < sizeof b) {
        ssize_t n = getrandom(b + got, sizeof b - got, 0);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) return -1;
        got += (size_t)n;
    }

    b[6] = (unsigned char)((b[6] & 0x0F) | 0x40); /* version 4 */
    b[8] = (unsigned char)((b[8] & 0x3F) | 0x80); /* RFC 4122 variant */

    static const char hex[] = "0123456789abcdef";
    char *p = out;
    for (int i = 0; i < 16; i++) {
        if (i == 4 || i == 6 || i == 8 || i == 10) *p++ = '-';
        *p++ = hex[b[i] >> 4];
        *p++ = hex[b[i] & 0x0F];
    }
    *p = '\0';
    return 0;
}

/* Copies s (or nothing) into the tail at *cursor; returns the copy. */
static const char *place(char **cursor, const char *s) {
    if (!s) return NULL;
    size_t n = strlen(s) + 1;
    char *dst = *cursor;
    memcpy(dst, s, n);
    *cursor += n;
    return dst;
}

netra_ctx *ctx_new(const ctx_fields *in, char *err, size_t err_size) {
    if (!in) {
        fail(err, err_size,
             "GLOBAL STATE USAGE: dispatcher requested without a user "
             "context - create one with a validated user_id");
        return NULL;
    }

    if (!ctx_validate_id("user_id", in->user_id, err, err_size)) return NULL;
    if (in->thread_id &&
        !ctx_validate_id("thread_id", in->thread_id, err, err_size))
        return NULL;
    if (in->run_id && !ctx_validate_id("run_id", in->run_id, err, err_size))
        return NULL;
    if (in->request_id &&
        !ctx_validate_id("request_id", in->request_id, err, err_size))
        return NULL;

    char generated[CTX_NEW_ID_LEN + 1];
    const char *request_id = in->request_id;
    if (!request_id) {
        if (ctx_new_id(generated) < 0) {
            fail(err, err_size,
                 "request_id: no randomness from getrandom (%s) - check "
                 "the kernel's entropy source",
                 strerror(errno));
            return NULL;
        }
        request_id = generated;
    }

    size_t size =
        sizeof(netra_ctx) + strlen(in->user_id) + 1 + strlen(request_id) + 1;
    if (in->thread_id) size += strlen(in->thread_id) + 1;
    if (in->run_id) size += strlen(in->run_id) + 1;

    netra_ctx *ctx = malloc(size);
    if (!ctx) {
        fail(err, err_size, "context: out of memory");
        return NULL;
    }

    char *cursor = ctx->strings;
    atomic_init(&ctx->refs, 1);
    ctx->conn_id = in->conn_id;
    ctx->request_id_generated = in->request_id == NULL;
    ctx->user_id = place(&cursor, in->user_id);
    ctx->thread_id = place(&cursor, in->thread_id);
    ctx->run_id = place(&cursor, in->run_id);
    ctx->request_id = place(&cursor, request_id);
    return ctx;
}

netra_ctx *ctx_ref(netra_ctx *ctx) {
    if (ctx) atomic_fetch_add_explicit(&ctx->refs, 1, memory_order_relaxed);
    return ctx;
}

void ctx_unref(netra_ctx *ctx) {
    if (!ctx) return;
    if (atomic_fetch_sub_explicit(&ctx->refs, 1, memory_order_acq_rel) == 1)
        free(ctx);
}

const char *ctx_user_id(const netra_ctx *ctx) {
    return ctx ? ctx->user_id : NULL;
}

const char *ctx_thread_id(const netra_ctx *ctx) {
    return ctx ? ctx->thread_id : NULL;
}

const char *ctx_run_id(const netra_ctx *ctx) {
    return ctx ? ctx->run_id : NULL;
}

const char *ctx_request_id(const netra_ctx *ctx) {
    return ctx ? ctx->request_id : NULL;
}

uint64_t ctx_conn_id(const netra_ctx *ctx) {
    return ctx ? ctx->conn_id : 0;
}

bool ctx_request_id_generated(const netra_ctx *ctx) {
    return ctx && ctx->request_id_generated;
}

void ctx_fields_of(const netra_ctx *ctx, ctx_fields *out) {
    memset(out, 0, sizeof *out);
    if (!ctx) return;
    out->user_id = ctx->user_id;
    out->thread_id = ctx->thread_id;
    out->run_id = ctx->run_id;
    out->request_id = ctx->request_id;
    out->conn_id = ctx->conn_id;
}

unsigned ctx_refs(const netra_ctx *ctx) {
    if (!ctx) return 0;
    return atomic_load_explicit(&((netra_ctx *)ctx)->refs,
                                memory_order_relaxed);
}
