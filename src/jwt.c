/* jwt: HS256 tokens, strictly parsed (see jwt.h). */
#include "jwt.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include <cJSON.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>

#define JWT_MAC_LEN 32                     /* SHA-256 */
#define JWT_MAC_B64_LEN 43                 /* its base64url length, unpadded */
#define JWT_MAX_SECONDS 9007199254740991.0 /* 2^53 - 1 */

static const char b64url_chars[] =
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

static const char *const result_names[] = {
    "ok",      "missing",       "malformed",   "bad_algorithm", "bad_signature",
    "expired", "not_yet_valid", "exp_missing", "bad_sub",       "no_secret",
};

const char *jwt_result_name(jwt_result result) {
    size_t n = sizeof result_names / sizeof *result_names;
    if ((unsigned)result >= n) return "unknown";
    return result_names[result];
}

static void fail(char *err, size_t err_size, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void fail(char *err, size_t err_size, const char *fmt, ...) {
    if (!err || err_size == 0) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, err_size, fmt, ap);
    va_end(ap);
}

/* ---- base64url, unpadded ---------------------------------------------- */

/* Encodes n bytes into out, which must hold 4 * ceil(n / 3) + 1 bytes.
 * Returns the encoded length. */
static size_t b64url_encode(const unsigned char *in, size_t n, char *out) {
    size_t o = 0, i = 0;

    for (; i + 3 <= n; i += 3) {
        uint32_t v =
            (uint32_t)in[i] << 16 | (uint32_t)in[i + 1] << 8 | in[i + 2];
        out[o++] = b64url_chars[v >> 18];
        out[o++] = b64url_chars[(v >> 12) & 63];
        out[o++] = b64url_chars[(v >> 6) & 63];
        out[o++] = b64url_chars[v & 63];
    }

    if (n - i == 1) {
        uint32_t v = (uint32_t)in[i] << 16;
        out[o++] = b64url_chars[v >> 18];
        out[o++] = b64url_chars[(v >> 12) & 63];
    } else if (n - i == 2) {
        uint32_t v = (uint32_t)in[i] << 16 | (uint32_t)in[i + 1] << 8;
        out[o++] = b64url_chars[v >> 18];
        out[o++] = b64url_chars[(v >> 12) & 63];
        out[o++] = b64url_chars[(v >> 6) & 63];
    }
    out[o] = '\0';
    return o;
}

static int b64url_value(unsigned char c) {
    if (c >= 'A' && c <= 'Z') return c - 'A';
    if (c >= 'a' && c <= 'z') return c - 'a' + 26;
    if (c >= '0' && c <= '9') return c - '0' + 52;
    if (c == '-') return 62;
    if (c == '_') return 63;
    return -1;
}

/* Decodes n characters into out (room for 3 * n / 4 + 1 bytes; a NUL is
 * added). Only the canonical encoding passes: url alphabet, no padding,
 * no length of 1 mod 4, zero bits after the last byte. Returns the byte
 * count, or -1. */
static long b64url_decode(const char *in, size_t n, unsigned char *out) {
    uint32_t acc = 0;
    int bits = 0;
    size_t o = 0;

    if (n % 4 == 1) return -1;
    for (size_t i = 0; i < n; i++) {
        int v = b64url_value((unsigned char)in[i]);
        if (v < 0) return -1;
        acc = (acc << 6) | (uint32_t)v;
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            out[o++] = (unsigned char)(acc >> bits);
            acc &= (1u << bits) - 1;
        }
    }
    if (acc != 0) return -1; /* leftover bits must be zero */
    out[o] = '\0';
    return (long)o;
}

/* ---- JSON helpers ----------------------------------------------------- */

/* Parses decoded bytes as one JSON object. Refuses a raw NUL, a \u0000
 * escape (cJSON would cut the string there), trailing bytes, and any
 * other value than an object. Returns the object or NULL. */
static cJSON *parse_object(const unsigned char *buf, size_t n) {
    if (memchr(buf, '\0', n)) return NULL;
    for (size_t i = 0; i + 1 < n; i++) {
        if (buf[i] != '\\') continue;
        if (buf[i + 1] == 'u' && i + 5 < n && !memcmp(buf + i + 2, "0000", 4))
            return NULL;
        i++; /* skip the escaped character */
    }

    const char *end = NULL;
    cJSON *json = cJSON_ParseWithOpts((const char *)buf, &end, 1);
    if (!json) return NULL;
    if (!cJSON_IsObject(json)) {
        cJSON_Delete(json);
        return NULL;
    }
    return json;
}

/* The member named `name` (case-sensitive). *dup is set when it appears
 * more than once: parsers disagree on which copy wins, so such a token
 * is refused. */
static cJSON *member(const cJSON *obj, const char *name, bool *dup) {
    cJSON *found = NULL;
    const cJSON *item;

    cJSON_ArrayForEach(item, obj) {
        if (!item->string || strcmp(item->string, name)) continue;
        if (found)
            *dup = true;
        else
            found = (cJSON *)item;
    }
    return found;
}

/* Copies a header value into out for a message, or "?" when it is not
 * short printable ASCII (it came from an untrusted token). */
static const char *printable(const char *s, char *out, size_t out_size) {
    size_t n = strlen(s);
    if (n == 0 || n >= out_size) return "?";
    for (size_t i = 0; i < n; i++)
        if (s[i] < 0x21 || s[i] > 0x7E || s[i] == '\'') return "?";
    memcpy(out, s, n + 1);
    return out;
}

static const char *format_time(double t, char *out, size_t out_size) {
    struct tm tm;
    time_t tt = (time_t)t;

    if (gmtime_r(&tt, &tm) &&
        strftime(out, out_size, "%Y-%m-%dT%H:%M:%SZ", &tm) > 0)
        return out;
    snprintf(out, out_size, "%.0f", t);
    return out;
}

/* ---- signing ---------------------------------------------------------- */

static bool mac(const char *secret, const char *data, size_t n,
                unsigned char out[JWT_MAC_LEN]) {
    unsigned int len = 0;
    size_t key_len = strlen(secret);

    if (key_len > (size_t)INT32_MAX) return false;
    if (!HMAC(EVP_sha256(), secret, (int)key_len, (const unsigned char *)data,
              n, out, &len))
        return false;
    return len == JWT_MAC_LEN;
}

int jwt_sign(const char *secret, const char *sub, int64_t iat, int64_t exp,
             char **out, char *err, size_t err_size) {
    static const char header[] = "{\"alg\":\"HS256\",\"typ\":\"JWT\"}";

    *out = NULL;
    if (!secret || !*secret) {
        fail(err, err_size,
             "no signing secret - set NETRA_JWT_SECRET to a long random "
             "string");
        return -1;
    }
    if (!ctx_validate_id("sub", sub, err, err_size)) return -1;

    /* sub is at most CTX_ID_MAX bytes; quoting at most doubles it. */
    char payload[2 * CTX_ID_MAX + 128];
    cJSON *quoted = cJSON_CreateString(sub);
    char *sub_json = quoted ? cJSON_PrintUnformatted(quoted) : NULL;
    cJSON_Delete(quoted);
    if (!sub_json) {
        fail(err, err_size, "token: out of memory");
        return -1;
    }
    if (exp > 0)
        snprintf(payload, sizeof payload,
                 "{\"sub\":%s,\"iat\":%lld,\"exp\":%lld}", sub_json,
                 (long long)iat, (long long)exp);
    else
        snprintf(payload, sizeof payload, "{\"sub\":%s,\"iat\":%lld}", sub_json,
                 (long long)iat);
    free(sub_json);

    size_t hlen = strlen(header), plen = strlen(payload);
    size_t cap =
        4 * ((hlen + 2) / 3) + 4 * ((plen + 2) / 3) + JWT_MAC_B64_LEN + 8;
    char *token = malloc(cap);
    if (!token) {
        fail(err, err_size, "token: out of memory");
        return -1;
    }

    size_t at = b64url_encode((const unsigned char *)header, hlen, token);
    token[at++] = '.';
    at += b64url_encode((const unsigned char *)payload, plen, token + at);

    unsigned char sig[JWT_MAC_LEN];
    if (!mac(secret, token, at, sig)) {
        free(token);
        fail(err, err_size, "token: HMAC-SHA256 failed in libcrypto");
        return -1;
    }
    token[at++] = '.';
    b64url_encode(sig, sizeof sig, token + at);

    *out = token;
    return 0;
}

/* ---- verification ----------------------------------------------------- */

typedef struct {
    const char *part[3];
    size_t len[3];
    unsigned char header[JWT_MAX_TOKEN];
    unsigned char payload[JWT_MAX_TOKEN];
    long header_len, payload_len;
} jwt_parts;

/* Splits the token at its two dots and decodes header and payload. */
static jwt_result split(const char *token, size_t n, jwt_parts *p, char *err,
                        size_t err_size) {
    const char *dot1 = memchr(token, '.', n);
    const char *dot2 =
        dot1 ? memchr(dot1 + 1, '.', n - (size_t)(dot1 + 1 - token)) : NULL;
    if (!dot2 || memchr(dot2 + 1, '.', n - (size_t)(dot2 + 1 - token))) {
        fail(err, err_size,
             "token is not three dot-separated parts - send the compact "
             "JWT as issued");
        return JWT_MALFORMED;
    }

    p->part[0] = token;
    p->len[0] = (size_t)(dot1 - token);
    p->part[1] = dot1 + 1;
    p->len[1] = (size_t)(dot2 - dot1 - 1);
    p->part[2] = dot2 + 1;
    p->len[2] = n - (size_t)(dot2 + 1 - token);

    static const char *const names[] = {"header", "payload", "signature"};
    for (int i = 0; i < 3; i++) {
        for (size_t j = 0; j < p->len[i]; j++) {
            if (b64url_value((unsigned char)p->part[i][j]) >= 0) continue;
            fail(err, err_size,
                 "token %s is not unpadded base64url (byte %zu) - send the "
                 "token without '=' padding or '+' '/' characters",
                 names[i], j);
            return JWT_MALFORMED;
        }
    }

    p->header_len = b64url_decode(p->part[0], p->len[0], p->header);
    p->payload_len = b64url_decode(p->part[1], p->len[1], p->payload);
    if (p->header_len <= 0 || p->payload_len <= 0) {
        fail(err, err_size,
             "token %s is empty or not canonical base64url - send the "
             "token as issued",
             p->header_len <= 0 ? "header" : "payload");
        return JWT_MALFORMED;
    }
    return JWT_OK;
}

/* Checks the header: a JSON object with alg "HS256" and no crit. */
static jwt_result check_header(const jwt_parts *p, char *err, size_t err_size) {
    cJSON *h = parse_object(p->header, (size_t)p->header_len);
    if (!h) {
        fail(err, err_size,
             "token header is not a JSON object - send a JWT, not another "
             "kind of token");
        return JWT_MALFORMED;
    }

    bool dup = false;
    const cJSON *alg = member(h, "alg", &dup);
    const cJSON *crit = member(h, "crit", &dup);
    jwt_result r = JWT_OK;
    char word[32];

    if (dup) {
        fail(err, err_size,
             "token header repeats a member - sign it with a standard JWT "
             "library");
        r = JWT_MALFORMED;
    } else if (crit) {
        fail(err, err_size,
             "token header has 'crit', which netra does not support - sign "
             "without critical extensions");
        r = JWT_MALFORMED;
    } else if (!cJSON_IsString(alg)) {
        fail(err, err_size,
             "token header has no 'alg' string - sign the token with HS256");
        r = JWT_MALFORMED;
    } else if (strcmp(alg->valuestring, "HS256")) {
        fail(err, err_size,
             "token algorithm '%s' refused - netra accepts only HS256 "
             "signed with NETRA_JWT_SECRET",
             printable(alg->valuestring, word, sizeof word));
        r = JWT_BAD_ALGORITHM;
    }
    cJSON_Delete(h);
    return r;
}

static jwt_result check_signature(const jwt_parts *p, const char *secret,
                                  char *err, size_t err_size) {
    unsigned char want[JWT_MAC_LEN];
    unsigned char got[JWT_MAC_B64_LEN]; /* 32 bytes and a NUL fit */
    size_t signed_len = p->len[0] + 1 + p->len[1];

    if (!mac(secret, p->part[0], signed_len, want)) {
        fail(err, err_size, "could not compute HMAC-SHA256 in libcrypto");
        return JWT_BAD_SIGNATURE;
    }

    bool ok = p->len[2] == JWT_MAC_B64_LEN &&
              b64url_decode(p->part[2], p->len[2], got) == JWT_MAC_LEN &&
              CRYPTO_memcmp(want, got, JWT_MAC_LEN) == 0;
    OPENSSL_cleanse(want, sizeof want);
    if (!ok) {
        fail(err, err_size,
             "token signature does not match - sign it with this server's "
             "NETRA_JWT_SECRET and do not alter it");
        return JWT_BAD_SIGNATURE;
    }
    return JWT_OK;
}

/* Reads an optional NumericDate claim. Returns false when it is present
 * but not a number within +-(2^53 - 1). */
static bool read_time(const cJSON *payload, const char *name, bool *dup,
                      double *value, bool *present) {
    const cJSON *item = member(payload, name, dup);
    *present = item != NULL;
    if (!item) return true;
    if (!cJSON_IsNumber(item)) return false;
    *value = item->valuedouble;
    return isfinite(*value) && fabs(*value) <= JWT_MAX_SECONDS;
}

typedef struct {
    double exp, nbf, iat;
    bool has_exp, has_nbf, has_iat;
} jwt_times;

static jwt_result check_times(const jwt_times *t, int64_t now, int leeway,
                              bool require_exp, char *err, size_t err_size) {
    char when[40], now_text[40];
    double dnow = (double)now;

    if (require_exp && !t->has_exp) {
        fail(err, err_size,
             "token has no 'exp' claim, which is required here - issue "
             "tokens with an expiry (netra token --ttl)");
        return JWT_EXP_MISSING;
    }
    if (t->has_exp && dnow >= t->exp + leeway) {
        fail(err, err_size,
             "token expired at %s (now %s, leeway %d s) - get a new token",
             format_time(t->exp, when, sizeof when),
             format_time(dnow, now_text, sizeof now_text), leeway);
        return JWT_EXPIRED;
    }
    if (t->has_nbf && dnow < t->nbf - leeway) {
        fail(err, err_size,
             "token not valid before %s (now %s, leeway %d s) - check the "
             "clocks of the issuer and this server",
             format_time(t->nbf, when, sizeof when),
             format_time(dnow, now_text, sizeof now_text), leeway);
        return JWT_NOT_YET_VALID;
    }
    return JWT_OK;
}

/* Checks the payload's claims and fills *out. */
static jwt_result check_payload(const jwt_parts *p, int64_t now, int leeway,
                                bool require_exp, jwt_claims *out, char *err,
                                size_t err_size) {
    cJSON *payload = parse_object(p->payload, (size_t)p->payload_len);
    if (!payload) {
        fail(err, err_size,
             "token payload is not a JSON object - sign a JSON claims set");
        return JWT_MALFORMED;
    }

    jwt_times t = {0};
    bool dup = false;
    bool times_ok = read_time(payload, "exp", &dup, &t.exp, &t.has_exp) &&
                    read_time(payload, "nbf", &dup, &t.nbf, &t.has_nbf) &&
                    read_time(payload, "iat", &dup, &t.iat, &t.has_iat);
    const cJSON *sub = member(payload, "sub", &dup);
    jwt_result r = JWT_OK;

    if (dup || !times_ok) {
        fail(err, err_size,
             "token claims are malformed (%s) - exp, nbf and iat must be "
             "numbers of seconds, each claim given once",
             dup ? "a repeated claim" : "a time that is not a number");
        r = JWT_MALFORMED;
    } else if ((r = check_times(&t, now, leeway, require_exp, err, err_size)) !=
               JWT_OK) {
        /* message written */
    } else if (!sub) {
        fail(err, err_size,
             "token has no 'sub' claim - sign it for the user's id");
        r = JWT_BAD_SUB;
    } else if (!cJSON_IsString(sub)) {
        fail(err, err_size,
             "token 'sub' is not a string - sign it with the user's id as "
             "a string");
        r = JWT_BAD_SUB;
    } else if (!ctx_validate_id("sub", sub->valuestring, err, err_size)) {
        r = JWT_BAD_SUB;
    } else if (out) {
        snprintf(out->sub, sizeof out->sub, "%s", sub->valuestring);
        out->exp = (int64_t)floor(t.exp);
        out->nbf = (int64_t)floor(t.nbf);
        out->iat = (int64_t)floor(t.iat);
        out->has_exp = t.has_exp;
        out->has_nbf = t.has_nbf;
        out->has_iat = t.has_iat;
    }
    cJSON_Delete(payload);
    return r;
}

jwt_result jwt_verify(const char *token, const char *secret, int64_t now,
                      int leeway_s, bool require_exp, jwt_claims *out,
                      char *err, size_t err_size) {
    if (out) memset(out, 0, sizeof *out);
    if (leeway_s < 0) leeway_s = 0;

    if (!secret || !*secret) {
        fail(err, err_size,
             "no NETRA_JWT_SECRET is set, so no token can be verified - "
             "set it on the server");
        return JWT_NO_SECRET;
    }
    if (!token || !*token) {
        fail(err, err_size,
             "no token - send 'Authorization: Bearer <token>' or "
             "?token=<token>");
        return JWT_MISSING;
    }

    size_t n = strnlen(token, JWT_MAX_TOKEN + 1);
    if (n > JWT_MAX_TOKEN) {
        fail(err, err_size,
             "token longer than %d bytes - put fewer claims in it",
             JWT_MAX_TOKEN);
        return JWT_MALFORMED;
    }

    jwt_parts *p = malloc(sizeof *p);
    if (!p) {
        fail(err, err_size, "token: out of memory");
        return JWT_MALFORMED;
    }

    jwt_result r = split(token, n, p, err, err_size);
    if (r == JWT_OK) r = check_header(p, err, err_size);
    if (r == JWT_OK) r = check_signature(p, secret, err, err_size);
    if (r == JWT_OK)
        r = check_payload(p, now, leeway_s, require_exp, out, err, err_size);
    free(p);

    if (r != JWT_OK && out) memset(out, 0, sizeof *out);
    return r;
}

/* ---- finding the token ------------------------------------------------ */

static int hex_value(unsigned char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* Percent-decodes s[0..n) with '+' as space into out. Returns the length,
 * -1 for a bad escape (*at set to its offset), -2 for %00, -3 when it
 * does not fit in out_size (a NUL included). */
static long pct_decode(const char *s, size_t n, char *out, size_t out_size,
                       size_t *at) {
    size_t o = 0;

    for (size_t i = 0; i < n; i++) {
        int c = (unsigned char)s[i];
        if (c == '+') {
            c = ' ';
        } else if (c == '%') {
            int hi = i + 2 < n ? hex_value((unsigned char)s[i + 1]) : -1;
            int lo = i + 2 < n ? hex_value((unsigned char)s[i + 2]) : -1;
            if (hi < 0 || lo < 0) {
                *at = i;
                return -1;
            }
            c = hi << 4 | lo;
            if (c == 0) return -2;
            i += 2;
        }
        if (o + 1 >= out_size) return -3;
        out[o++] = (char)c;
    }
    out[o] = '\0';
    return (long)o;
}

/* Is the parameter name s[0..n) "token" once decoded? */
static bool is_token_key(const char *s, size_t n) {
    char key[8];
    size_t at = 0;
    return pct_decode(s, n, key, sizeof key, &at) == 5 &&
           !memcmp(key, "token", 5);
}

int jwt_query_token(const char *query, char *out, size_t out_size, char *err,
                    size_t err_size) {
    int found = 0;

    if (out_size == 0) return -1;
    out[0] = '\0';
    if (!query) return 0;
    if (*query == '?') query++;

    for (const char *p = query; *p;) {
        size_t seg = strcspn(p, "&");
        const char *eq = memchr(p, '=', seg);
        size_t key_len = eq ? (size_t)(eq - p) : seg;

        if (is_token_key(p, key_len)) {
            const char *val = eq ? eq + 1 : p + seg;
            size_t val_len = (size_t)(p + seg - val), at = 0;
            long r = found ? -4 : pct_decode(val, val_len, out, out_size, &at);
            if (r < 0) {
                out[0] = '\0';
                if (r == -1)
                    fail(err, err_size,
                         "token query parameter has a bad percent escape "
                         "at byte %zu - encode it with encodeURIComponent",
                         at);
                else if (r == -2)
                    fail(err, err_size,
                         "token query parameter contains %%00 - send the "
                         "token as issued");
                else if (r == -3)
                    fail(err, err_size,
                         "token query parameter longer than %zu bytes - "
                         "send a shorter token",
                         out_size - 1);
                else
                    fail(err, err_size,
                         "token query parameter given twice - send it once");
                return -1;
            }
            found = 1;
        }
        p += seg;
        if (*p == '&') p++;
    }
    return found;
}

int jwt_bearer_token(const char *header, char *out, size_t out_size) {
    if (out_size == 0) return -1;
    out[0] = '\0';
    if (!header) return 0;

    const char *p = header + strspn(header, " \t");
    if (strncasecmp(p, "bearer", 6) || (p[6] != ' ' && p[6] != '\t')) return 0;
    p += 6;
    p += strspn(p, " \t");

    size_t n = strlen(p);
    while (n > 0 && (p[n - 1] == ' ' || p[n - 1] == '\t'))
        n--;
    if (n == 0) return 0;
    if (n >= out_size) return -1;
    memcpy(out, p, n);
    out[n] = '\0';
    return 1;
}
