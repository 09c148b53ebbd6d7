/* test_jwt: HS256 signing and verification, refusal reasons, and finding
 * the token in a header or a query string.
 *
 * Known answers: the token KAT_TOKEN was computed outside netra with
 *   printf '%s' "$H.$P" | openssl dgst -sha256 -hmac netra-test-secret
 * over the base64url of KAT_HEADER and KAT_PAYLOAD; the RFC 7515 A.1
 * example (key and token are published in the RFC) is the second. */
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>

#include "jwt.h"

#define SECRET "netra-test-secret"
#define NOW 1700000100

#define KAT_HEADER "{\"alg\":\"HS256\",\"typ\":\"JWT\"}"
#define KAT_PAYLOAD "{\"sub\":\"alice\",\"iat\":1700000000,\"exp\":1700003600}"
#define KAT_TOKEN                                                              \
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9."                                    \
    "eyJzdWIiOiJhbGljZSIsImlhdCI6MTcwMDAwMDAwMCwiZXhwIjoxNzAwMDAzNjAwfQ."      \
    "pnC6hUhaki2FDN5zV_ZDpOLRuBVXtOdVzHCjSHGopFM"

/* RFC 7515 appendix A.1: HS256 with a 64-byte key. */
static const unsigned char rfc_key[] = {
    0x03, 0x23, 0x35, 0x4b, 0x2b, 0x0f, 0xa5, 0xbc, 0x83, 0x7e, 0x06,
    0x65, 0x77, 0x7b, 0xa6, 0x8f, 0x5a, 0xb3, 0x28, 0xe6, 0xf0, 0x54,
    0xc9, 0x28, 0xa9, 0x0f, 0x84, 0xb2, 0xd2, 0x50, 0x2e, 0xbf, 0xd3,
    0xfb, 0x5a, 0x92, 0xd2, 0x06, 0x47, 0xef, 0x96, 0x8a, 0xb4, 0xc3,
    0x77, 0x62, 0x3d, 0x22, 0x3d, 0x2e, 0x21, 0x72, 0x05, 0x2e, 0x4f,
    0x08, 0xc0, 0xcd, 0x9a, 0xf5, 0x67, 0xd0, 0x80, 0xa3, 0x00};
#define RFC_TOKEN                                                              \
    "eyJ0eXAiOiJKV1QiLA0KICJhbGciOiJIUzI1NiJ9."                                \
    "eyJpc3MiOiJqb2UiLA0KICJleHAiOjEzMDA4MTkzODAsDQogImh0dHA6Ly9leGFtcGxl"     \
    "LmNvbS9pc19yb290Ijp0cnVlfQ."                                              \
    "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"

static char err[512];
static jwt_claims claims;

/* ---- a token maker of the test's own, for crafted tokens ------------- */

static void b64url(const unsigned char *in, size_t n, char *out) {
    static const char a[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstu"
                            "vwxyz0123456789-_";
    size_t o = 0;
    for (size_t i = 0; i < n; i += 3) {
        uint32_t v = (uint32_t)in[i] << 16;
        if (i + 1 < n) v |= (uint32_t)in[i + 1] << 8;
        if (i + 2 < n) v |= in[i + 2];
        out[o++] = a[v >> 18];
        out[o++] = a[(v >> 12) & 63];
        if (i + 1 < n) out[o++] = a[(v >> 6) & 63];
        if (i + 2 < n) out[o++] = a[v & 63];
    }
    out[o] = '\0';
}

/* Encodes header and payload (n bytes each, -1 for strlen) and signs
 * them with secret. Returns a malloc'd token. */
static char *craft_n(const char *header, long hn, const char *payload, long pn,
                     const char *secret) {
    size_t hl = hn < 0 ? strlen(header) : (size_t)hn;
    size_t pl = pn < 0 ? strlen(payload) : (size_t)pn;
    char *t = malloc(2 * (hl + pl) + 100);
    unsigned char mac[32];
    unsigned int mac_len = 0;

    b64url((const unsigned char *)header, hl, t);
    strcat(t, ".");
    b64url((const unsigned char *)payload, pl, t + strlen(t));
    HMAC(EVP_sha256(), secret, (int)strlen(secret), (unsigned char *)t,
         strlen(t), mac, &mac_len);
    strcat(t, ".");
    b64url(mac, mac_len, t + strlen(t));
    return t;
}

static char *craft(const char *header, const char *payload) {
    return craft_n(header, -1, payload, -1, SECRET);
}

static jwt_result verify(const char *token) {
    err[0] = '\0';
    return jwt_verify(token, SECRET, NOW, JWT_LEEWAY_S, true, &claims, err,
                      sizeof err);
}

/* Verifies a crafted token and asserts the result and a message part. */
static void expect(const char *header, const char *payload, jwt_result want,
                   const char *part) {
    char *t = craft(header, payload);
    jwt_result got = verify(t);
    if (got != want)
        fail_msg("%s.%s: got %s (%s), want %s", header, payload,
                 jwt_result_name(got), err, jwt_result_name(want));
    if (part && !strstr(err, part))
        fail_msg("message '%s' lacks '%s'", err, part);
    free(t);
}

/* ---- known answers ---------------------------------------------------- */

static void test_sign_known_answer(void **state) {
    (void)state;
    char *t = NULL;

    assert_int_equal(
        jwt_sign(SECRET, "alice", 1700000000, 1700003600, &t, err, sizeof err),
        0);
    assert_string_equal(t, KAT_TOKEN);
    free(t);

    /* The test's own maker agrees, so crafted tokens below are real. */
    t = craft(KAT_HEADER, KAT_PAYLOAD);
    assert_string_equal(t, KAT_TOKEN);
    free(t);
}

static void test_verify_known_answer(void **state) {
    (void)state;
    assert_int_equal(verify(KAT_TOKEN), JWT_OK);
    assert_string_equal(claims.sub, "alice");
    assert_true(claims.has_exp && claims.exp == 1700003600);
    assert_true(claims.has_iat && claims.iat == 1700000000);
    assert_false(claims.has_nbf);
}

static void test_rfc7515_example(void **state) {
    (void)state;
    const char *key = (const char *)rfc_key;

    /* The signature holds; the example has no sub, so it ends there. */
    assert_int_equal(jwt_verify(RFC_TOKEN, key, 1300819000, 0, true, &claims,
                                err, sizeof err),
                     JWT_BAD_SUB);
    assert_non_null(strstr(err, "no 'sub' claim"));

    /* Its exp (1300819380) is checked after the signature. */
    assert_int_equal(jwt_verify(RFC_TOKEN, key, 1300819380, 0, true, &claims,
                                err, sizeof err),
                     JWT_EXPIRED);
    assert_non_null(strstr(err, "expired at 2011-03-22T18:43:00Z"));

    /* One signature character changed. */
    char *t = strdup(RFC_TOKEN);
    t[strlen(t) - 2] = t[strlen(t) - 2] == 'j' ? 'k' : 'j';
    assert_int_equal(
        jwt_verify(t, key, 1300819000, 0, true, NULL, err, sizeof err),
        JWT_BAD_SIGNATURE);
    free(t);
}

/* ---- signing ---------------------------------------------------------- */

static void test_sign_round_trip(void **state) {
    (void)state;
    char *t = NULL;

    assert_int_equal(jwt_sign(SECRET, "Zo\xC3\xAB \"q\" \\", NOW, NOW + 60, &t,
                              err, sizeof err),
                     0);
    assert_int_equal(verify(t), JWT_OK);
    assert_string_equal(claims.sub, "Zo\xC3\xAB \"q\" \\");
    free(t);

    /* exp 0 leaves exp out: fine unless one is required. */
    assert_int_equal(jwt_sign(SECRET, "bob", NOW, 0, &t, err, sizeof err), 0);
    assert_int_equal(
        jwt_verify(t, SECRET, NOW, 60, false, &claims, err, sizeof err),
        JWT_OK);
    assert_false(claims.has_exp);
    assert_int_equal(verify(t), JWT_EXP_MISSING);
    assert_non_null(strstr(err, "no 'exp' claim"));
    free(t);
}

static void test_sign_refusals(void **state) {
    (void)state;
    char *t = (char *)"untouched";

    assert_int_equal(jwt_sign("", "alice", NOW, NOW + 1, &t, err, sizeof err),
                     -1);
    assert_null(t);
    assert_non_null(strstr(err, "NETRA_JWT_SECRET"));

    assert_int_equal(jwt_sign(NULL, "alice", NOW, NOW + 1, &t, err, sizeof err),
                     -1);
    assert_int_equal(
        jwt_sign(SECRET, "default", NOW, NOW + 1, &t, err, sizeof err), -1);
    assert_null(t);
    assert_non_null(strstr(err, "sub: placeholder value 'default'"));
    assert_int_equal(
        jwt_sign(SECRET, "a\nb", NOW, NOW + 1, &t, err, sizeof err), -1);
}

/* ---- refusals --------------------------------------------------------- */

static void test_missing_and_no_secret(void **state) {
    (void)state;
    assert_int_equal(verify(NULL), JWT_MISSING);
    assert_non_null(strstr(err, "Authorization: Bearer"));
    assert_int_equal(verify(""), JWT_MISSING);

    assert_int_equal(
        jwt_verify(KAT_TOKEN, "", NOW, 60, true, &claims, err, sizeof err),
        JWT_NO_SECRET);
    assert_int_equal(jwt_verify(KAT_TOKEN, NULL, NOW, 60, true, NULL, NULL, 0),
                     JWT_NO_SECRET);
}

static void test_malformed_shape(void **state) {
    (void)state;
    const char *bad[] = {
        "abc",
        "a.b",
        "a.b.c.d",
        "..",
        ".eyJzdWIiOiJhIn0.sig",
        KAT_TOKEN ".",
        " " KAT_TOKEN,
        KAT_TOKEN " ",
        "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9=.eyJ9.x",           /* padding */
        "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJ+Lw.x",          /* + and / */
        "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.e.x",               /* 1 mod 4 */
        "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJhIn1.x", /* bits */
        "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJ9.a=b",
        "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJ9.a\xff",
    };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        jwt_result r = verify(bad[i]);
        if (r != JWT_MALFORMED)
            fail_msg("'%s': got %s (%s)", bad[i], jwt_result_name(r), err);
        assert_int_equal(claims.sub[0], '\0');
    }

    /* The same KAT token, with the payload's last character written in a
     * non-canonical way (same bytes, other trailing bits). */
    char *t = strdup(KAT_TOKEN);
    char *dot = strrchr(t, '.');
    assert_int_equal(dot[-1], 'Q');
    dot[-1] = 'R';
    assert_int_equal(verify(t), JWT_MALFORMED);
    assert_non_null(strstr(err, "not canonical base64url"));
    free(t);
}

static void test_malformed_header(void **state) {
    (void)state;
    const char *p = "{\"sub\":\"alice\",\"exp\":1700003600}";

    expect("not json", p, JWT_MALFORMED, "header is not a JSON object");
    expect("[\"HS256\"]", p, JWT_MALFORMED, "header is not a JSON object");
    expect("{\"alg\":\"HS256\"} x", p, JWT_MALFORMED, NULL);
    expect("{\"alg\":\"HS256\"", p, JWT_MALFORMED, NULL);
    expect("{\"typ\":\"JWT\"}", p, JWT_MALFORMED, "no 'alg'");
    expect("{\"alg\":256}", p, JWT_MALFORMED, "no 'alg'");
    expect("{\"ALG\":\"HS256\"}", p, JWT_MALFORMED, "no 'alg'");
    expect("{\"alg\":\"HS256\",\"crit\":[\"exp\"]}", p, JWT_MALFORMED,
           "'crit'");
    expect("{\"alg\":\"HS256\",\"alg\":\"none\"}", p, JWT_MALFORMED,
           "repeats a member");
    expect("{\"alg\":\"HS256\"}", p, JWT_OK, NULL);
    expect("{\"alg\":\"HS256\",\"kid\":\"k1\",\"typ\":\"at+jwt\"}", p, JWT_OK,
           NULL);
}

static void test_wrong_algorithm(void **state) {
    (void)state;
    const char *p = "{\"sub\":\"alice\",\"exp\":1700003600}";

    expect("{\"alg\":\"none\"}", p, JWT_BAD_ALGORITHM, "'none' refused");
    expect("{\"alg\":\"RS256\"}", p, JWT_BAD_ALGORITHM, "'RS256' refused");
    expect("{\"alg\":\"HS512\"}", p, JWT_BAD_ALGORITHM, "only HS256");
    expect("{\"alg\":\"hs256\"}", p, JWT_BAD_ALGORITHM, NULL);
    expect("{\"alg\":\"HS256 \"}", p, JWT_BAD_ALGORITHM, NULL);
    expect("{\"alg\":\"\\u001b[31m\"}", p, JWT_BAD_ALGORITHM, "'?' refused");

    /* alg none with an empty signature, the classic. */
    char h[64], pl[128], t[256];
    b64url((const unsigned char *)"{\"alg\":\"none\",\"typ\":\"JWT\"}", 26, h);
    b64url((const unsigned char *)p, strlen(p), pl);
    snprintf(t, sizeof t, "%s.%s.", h, pl);
    assert_int_equal(verify(t), JWT_BAD_ALGORITHM);

    /* The KAT token's payload and signature under a swapped header. */
    const char *kat_rest = strchr(KAT_TOKEN, '.');
    b64url((const unsigned char *)"{\"alg\":\"HS384\",\"typ\":\"JWT\"}", 27, h);
    snprintf(t, sizeof t, "%s%s", h, kat_rest);
    assert_int_equal(verify(t), JWT_BAD_ALGORITHM);
}

static void test_bad_signature(void **state) {
    (void)state;
    char *t, *other;

    /* Another secret. */
    assert_int_equal(jwt_verify(KAT_TOKEN, "another-secret", NOW, 60, true,
                                &claims, err, sizeof err),
                     JWT_BAD_SIGNATURE);
    assert_non_null(strstr(err, "signature does not match"));
    assert_null(strstr(err, SECRET));

    /* Tampered payload: sub alice -> admin, the old signature kept. */
    char pl[128], tok[512];
    const char *forged = "{\"sub\":\"admin\",\"iat\":1700000000,"
                         "\"exp\":1700003600}";
    b64url((const unsigned char *)forged, strlen(forged), pl);
    snprintf(tok, sizeof tok, "%.36s.%s%s", KAT_TOKEN, pl,
             strrchr(KAT_TOKEN, '.'));
    assert_int_equal(verify(tok), JWT_BAD_SIGNATURE);

    /* Extended exp, same trick. */
    t = craft_n(KAT_HEADER, -1, "{\"sub\":\"alice\",\"exp\":9999999999}", -1,
                "wrong");
    assert_int_equal(verify(t), JWT_BAD_SIGNATURE);
    free(t);

    /* Truncated signatures: one character, half, all of it. */
    t = strdup(KAT_TOKEN);
    t[strlen(t) - 1] = '\0';
    assert_int_equal(verify(t), JWT_BAD_SIGNATURE);
    t[strlen(t) - 20] = '\0';
    assert_int_equal(verify(t), JWT_BAD_SIGNATURE);
    *strrchr(t, '.') = '\0';
    strcat(t, ".");
    assert_int_equal(verify(t), JWT_BAD_SIGNATURE);
    free(t);

    /* A signature with one character too many. */
    snprintf(tok, sizeof tok, "%sA", KAT_TOKEN);
    assert_int_equal(verify(tok), JWT_BAD_SIGNATURE);

    /* Signature of one valid token on another's parts. */
    t = craft(KAT_HEADER, "{\"sub\":\"bob\",\"exp\":1700003600}");
    other = craft(KAT_HEADER, "{\"sub\":\"eve\",\"exp\":1700003600}");
    strcpy(strrchr(t, '.'), strrchr(other, '.'));
    assert_int_equal(verify(t), JWT_BAD_SIGNATURE);
    free(t);
    free(other);
}

static void test_truncated_token(void **state) {
    (void)state;
    size_t n = strlen(KAT_TOKEN);
    char buf[512];

    for (size_t cut = 1; cut < n; cut++) {
        memcpy(buf, KAT_TOKEN, cut);
        buf[cut] = '\0';
        jwt_result r = verify(buf);
        if (r == JWT_OK) fail_msg("accepted a cut at %zu", cut);
        if (r != JWT_MALFORMED && r != JWT_BAD_SIGNATURE)
            fail_msg("cut at %zu: %s", cut, jwt_result_name(r));
    }
}

static void test_token_length_bound(void **state) {
    (void)state;
    char *payload = malloc(JWT_MAX_TOKEN);
    char *t = NULL;
    bool hit = false;

    /* Grow a padding claim until the token is exactly the bound. */
    for (size_t pad = 5900; pad < 6200 && !hit; pad++) {
        snprintf(payload, JWT_MAX_TOKEN,
                 "{\"sub\":\"alice\",\"exp\":1700003600,\"pad\":\"%0*d\"}",
                 (int)pad, 0);
        free(t);
        t = craft(KAT_HEADER, payload);
        hit = strlen(t) == JWT_MAX_TOKEN;
    }
    assert_true(hit);
    assert_int_equal(verify(t), JWT_OK);

    /* One more byte is too long, checked before anything else. */
    t = realloc(t, JWT_MAX_TOKEN + 2);
    strcat(t, "A");
    assert_int_equal(verify(t), JWT_MALFORMED);
    assert_non_null(strstr(err, "longer than 8192 bytes"));
    free(t);

    /* A megabyte of junk. */
    size_t big = 1 << 20;
    t = malloc(big + 1);
    memset(t, 'A', big);
    t[big] = '\0';
    t[100] = '.';
    t[200] = '.';
    assert_int_equal(verify(t), JWT_MALFORMED);
    free(t);
    free(payload);
}

static void test_malformed_payload(void **state) {
    (void)state;
    const char *h = KAT_HEADER;

    expect(h, "not json", JWT_MALFORMED, "payload is not a JSON object");
    expect(h, "\"alice\"", JWT_MALFORMED, "payload is not a JSON object");
    expect(h, "{\"sub\":\"alice\",\"exp\":1700003600", JWT_MALFORMED, NULL);
    expect(h, "{\"sub\":\"alice\",\"exp\":1700003600}{}", JWT_MALFORMED, NULL);
    expect(h, "{\"sub\":\"alice\",\"exp\":\"1700003600\"}", JWT_MALFORMED,
           "not a number");
    expect(h, "{\"sub\":\"alice\",\"exp\":1700003600,\"nbf\":true}",
           JWT_MALFORMED, "not a number");
    expect(h, "{\"sub\":\"alice\",\"exp\":1700003600,\"iat\":null}",
           JWT_MALFORMED, NULL);
    expect(h, "{\"sub\":\"alice\",\"exp\":1e300}", JWT_MALFORMED, NULL);
    expect(h, "{\"sub\":\"alice\",\"exp\":1700003600,\"exp\":1}", JWT_MALFORMED,
           "repeated claim");
    expect(h, "{\"sub\":\"alice\",\"sub\":\"admin\",\"exp\":1700003600}",
           JWT_MALFORMED, "repeated claim");
    expect(h, "{\"sub\":\"ali\\u0000ce\",\"exp\":1700003600}", JWT_MALFORMED,
           NULL);

    /* A raw NUL inside the payload bytes. */
    char *t =
        craft_n(h, -1, "{\"sub\":\"alice\",\"exp\":1700003600}\0", 33, SECRET);
    assert_int_equal(verify(t), JWT_MALFORMED);
    free(t);

    /* Deep nesting is refused by the parser, not a crash. */
    char deep[4200] = "{\"sub\":\"alice\",\"exp\":1700003600,\"x\":";
    size_t at = strlen(deep);
    for (int i = 0; i < 2000; i++)
        deep[at++] = '[';
    for (int i = 0; i < 2000; i++)
        deep[at++] = ']';
    deep[at++] = '}';
    deep[at] = '\0';
    expect(h, deep, JWT_MALFORMED, NULL);

    /* Escaped backslash before u0000 is a plain string, not a NUL. */
    expect(h, "{\"sub\":\"alice\",\"exp\":1700003600,\"n\":\"\\\\u0000\"}",
           JWT_OK, NULL);
    /* Unknown claims are ignored, fractional times accepted. */
    expect(h, "{\"sub\":\"alice\",\"exp\":1700003600.5,\"aud\":[\"x\"]}",
           JWT_OK, NULL);
}

static void test_expiry_with_leeway(void **state) {
    (void)state;
    char p[128];

    /* exp + leeway must be later than now: 59 s late passes, 60 not. */
    snprintf(p, sizeof p, "{\"sub\":\"alice\",\"exp\":%d}", NOW - 59);
    expect(KAT_HEADER, p, JWT_OK, NULL);
    snprintf(p, sizeof p, "{\"sub\":\"alice\",\"exp\":%d}", NOW - 60);
    expect(KAT_HEADER, p, JWT_EXPIRED, "leeway 60 s");
    snprintf(p, sizeof p, "{\"sub\":\"alice\",\"exp\":%d}", NOW - 3600);
    expect(KAT_HEADER, p, JWT_EXPIRED, "expired at 2023-11-14T21:15:00Z");
    assert_non_null(strstr(err, "now 2023-11-14T22:15:00Z"));
    assert_non_null(strstr(err, "get a new token"));

    /* Without leeway (and a negative leeway counts as none). */
    assert_int_equal(jwt_verify(KAT_TOKEN, SECRET, 1700003599, 0, true, &claims,
                                err, sizeof err),
                     JWT_OK);
    assert_int_equal(jwt_verify(KAT_TOKEN, SECRET, 1700003600, 0, true, &claims,
                                err, sizeof err),
                     JWT_EXPIRED);
    assert_int_equal(jwt_verify(KAT_TOKEN, SECRET, 1700003600, -100, true,
                                &claims, err, sizeof err),
                     JWT_EXPIRED);
    assert_int_equal(claims.sub[0], '\0'); /* zeroed on refusal */
}

static void test_not_before_with_leeway(void **state) {
    (void)state;
    char p[128];

    snprintf(p, sizeof p, "{\"sub\":\"alice\",\"exp\":%d,\"nbf\":%d}",
             NOW + 999, NOW + 60);
    expect(KAT_HEADER, p, JWT_OK, NULL);
    assert_true(claims.has_nbf && claims.nbf == NOW + 60);
    snprintf(p, sizeof p, "{\"sub\":\"alice\",\"exp\":%d,\"nbf\":%d}",
             NOW + 999, NOW + 61);
    expect(KAT_HEADER, p, JWT_NOT_YET_VALID, "not valid before");
    assert_non_null(strstr(err, "check the clocks"));
}

static void test_exp_required(void **state) {
    (void)state;
    expect(KAT_HEADER, "{\"sub\":\"alice\"}", JWT_EXP_MISSING, "'exp'");

    char *t = craft(KAT_HEADER, "{\"sub\":\"alice\"}");
    assert_int_equal(
        jwt_verify(t, SECRET, NOW, 60, false, &claims, err, sizeof err),
        JWT_OK);
    free(t);
}

static void test_sub_rules(void **state) {
    (void)state;
    const char *h = KAT_HEADER;

    expect(h, "{\"exp\":1700003600}", JWT_BAD_SUB, "no 'sub' claim");
    expect(h, "{\"sub\":42,\"exp\":1700003600}", JWT_BAD_SUB,
           "'sub' is not a string");
    expect(h, "{\"sub\":null,\"exp\":1700003600}", JWT_BAD_SUB, NULL);
    expect(h, "{\"sub\":\"\",\"exp\":1700003600}", JWT_BAD_SUB, "sub: empty");
    expect(h, "{\"sub\":\"DEFAULT\",\"exp\":1700003600}", JWT_BAD_SUB,
           "sub: placeholder value 'DEFAULT' is not a real id");
    expect(h, "{\"sub\":\"undefined\",\"exp\":1700003600}", JWT_BAD_SUB, NULL);
    expect(h, "{\"sub\":\"a\\nb\",\"exp\":1700003600}", JWT_BAD_SUB,
           "control character");
    expect(h, "{\"sub\":\" alice\",\"exp\":1700003600}", JWT_BAD_SUB,
           "whitespace");
    expect(h, "{\"sub\":\"\xC0\xAF\",\"exp\":1700003600}", JWT_BAD_SUB,
           "invalid UTF-8");

    expect(h, "{\"sub\":\"default_user\",\"exp\":1700003600}", JWT_OK, NULL);
    assert_string_equal(claims.sub, "default_user");
    expect(h, "{\"sub\":\"test_user_7\",\"exp\":1700003600}", JWT_OK, NULL);

    char p[600], *long_sub = malloc(CTX_ID_MAX + 2);
    memset(long_sub, 'u', CTX_ID_MAX + 1);
    long_sub[CTX_ID_MAX + 1] = '\0';
    snprintf(p, sizeof p, "{\"sub\":\"%s\",\"exp\":1700003600}", long_sub);
    expect(h, p, JWT_BAD_SUB, "longer than 256");
    long_sub[CTX_ID_MAX] = '\0';
    snprintf(p, sizeof p, "{\"sub\":\"%s\",\"exp\":1700003600}", long_sub);
    expect(h, p, JWT_OK, NULL);
    assert_int_equal(strlen(claims.sub), CTX_ID_MAX);
    free(long_sub);
}

static void test_result_names(void **state) {
    (void)state;
    const char *want[] = {"ok",
                          "missing",
                          "malformed",
                          "bad_algorithm",
                          "bad_signature",
                          "expired",
                          "not_yet_valid",
                          "exp_missing",
                          "bad_sub",
                          "no_secret"};
    for (int i = 0; i <= JWT_NO_SECRET; i++)
        assert_string_equal(jwt_result_name((jwt_result)i), want[i]);
    assert_string_equal(jwt_result_name((jwt_result)99), "unknown");
}

/* ---- finding the token ------------------------------------------------ */

static char out[JWT_MAX_TOKEN + 1];

static int query(const char *q) {
    strcpy(out, "(unset)");
    err[0] = '\0';
    return jwt_query_token(q, out, sizeof out, err, sizeof err);
}

static void test_query_token(void **state) {
    (void)state;

    assert_int_equal(query("token=abc"), 1);
    assert_string_equal(out, "abc");
    assert_int_equal(query("?token=abc"), 1);
    assert_string_equal(out, "abc");
    assert_int_equal(query("a=1&token=" KAT_TOKEN "&b=2"), 1);
    assert_string_equal(out, KAT_TOKEN);
    assert_int_equal(query("%74oken=x%2Ey%2e%5F"), 1);
    assert_string_equal(out, "x.y._");
    assert_int_equal(query("token=a+b%20c"), 1);
    assert_string_equal(out, "a b c");
    assert_int_equal(query("&&token=x&"), 1);
    assert_string_equal(out, "x");
    assert_int_equal(query("token=a=b"), 1);
    assert_string_equal(out, "a=b");
    assert_int_equal(query("token="), 1);
    assert_string_equal(out, "");
    assert_int_equal(query("x=1&token"), 1);
    assert_string_equal(out, "");
    /* Another parameter's bad escape is not ours to judge. */
    assert_int_equal(query("x=%zz&token=ok"), 1);
    assert_string_equal(out, "ok");

    assert_int_equal(query(NULL), 0);
    assert_string_equal(out, "");
    assert_int_equal(query(""), 0);
    assert_int_equal(query("tokens=abc&xtoken=abc&Token=abc"), 0);
    assert_string_equal(out, "");
    assert_int_equal(query("a=token"), 0);

    assert_int_equal(query("token=abc&token=def"), -1);
    assert_non_null(strstr(err, "given twice"));
    assert_string_equal(out, "");
    assert_int_equal(query("token=ab%zz"), -1);
    assert_non_null(strstr(err, "bad percent escape at byte 2"));
    assert_int_equal(query("token=ab%4"), -1);
    assert_int_equal(query("token=ab%"), -1);
    assert_int_equal(query("token=a%00b"), -1);
    assert_non_null(strstr(err, "%00"));

    char small[4];
    assert_int_equal(
        jwt_query_token("token=abcd", small, sizeof small, err, sizeof err),
        -1);
    assert_string_equal(small, "");
    assert_non_null(strstr(err, "longer than 3 bytes"));
    assert_int_equal(jwt_query_token("token=abc", small, sizeof small, NULL, 0),
                     1);
    assert_string_equal(small, "abc");
}

static void test_bearer_token(void **state) {
    (void)state;

    assert_int_equal(jwt_bearer_token("Bearer abc", out, sizeof out), 1);
    assert_string_equal(out, "abc");
    assert_int_equal(jwt_bearer_token("bearer   abc \t", out, sizeof out), 1);
    assert_string_equal(out, "abc");
    assert_int_equal(jwt_bearer_token(" BEARER\tabc", out, sizeof out), 1);
    assert_string_equal(out, "abc");
    assert_int_equal(jwt_bearer_token("Bearer " KAT_TOKEN, out, sizeof out), 1);
    assert_int_equal(verify(out), JWT_OK);

    assert_int_equal(jwt_bearer_token(NULL, out, sizeof out), 0);
    assert_int_equal(jwt_bearer_token("Basic YWxpY2U6cHc=", out, sizeof out),
                     0);
    assert_string_equal(out, "");
    assert_int_equal(jwt_bearer_token("Bearer", out, sizeof out), 0);
    assert_int_equal(jwt_bearer_token("Bearer   ", out, sizeof out), 0);
    assert_int_equal(jwt_bearer_token("Bearerabc", out, sizeof out), 0);
    assert_int_equal(jwt_bearer_token("", out, sizeof out), 0);

    char small[4];
    assert_int_equal(jwt_bearer_token("Bearer abcd", small, sizeof small), -1);
    assert_string_equal(small, "");
}

/* Verification keeps no state: many threads at once agree. */
static void *verify_many(void *arg) {
    (void)arg;
    jwt_claims c;
    for (int i = 0; i < 2000; i++) {
        if (jwt_verify(KAT_TOKEN, SECRET, NOW, 60, true, &c, NULL, 0) !=
                JWT_OK ||
            strcmp(c.sub, "alice"))
            return (void *)1;
        if (jwt_verify(KAT_TOKEN, "x", NOW, 60, true, &c, NULL, 0) !=
            JWT_BAD_SIGNATURE)
            return (void *)1;
    }
    return NULL;
}

static void test_threads(void **state) {
    (void)state;
    pthread_t t[4];
    void *r;

    for (int i = 0; i < 4; i++)
        assert_int_equal(pthread_create(&t[i], NULL, verify_many, NULL), 0);
    for (int i = 0; i < 4; i++) {
        pthread_join(t[i], &r);
        assert_null(r);
    }
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_sign_known_answer),
        cmocka_unit_test(test_verify_known_answer),
        cmocka_unit_test(test_rfc7515_example),
        cmocka_unit_test(test_sign_round_trip),
        cmocka_unit_test(test_sign_refusals),
        cmocka_unit_test(test_missing_and_no_secret),
        cmocka_unit_test(test_malformed_shape),
        cmocka_unit_test(test_malformed_header),
        cmocka_unit_test(test_wrong_algorithm),
        cmocka_unit_test(test_bad_signature),
        cmocka_unit_test(test_truncated_token),
        cmocka_unit_test(test_token_length_bound),
        cmocka_unit_test(test_malformed_payload),
        cmocka_unit_test(test_expiry_with_leeway),
        cmocka_unit_test(test_not_before_with_leeway),
        cmocka_unit_test(test_exp_required),
        cmocka_unit_test(test_sub_rules),
        cmocka_unit_test(test_result_names),
        cmocka_unit_test(test_query_token),
        cmocka_unit_test(test_bearer_token),
        cmocka_unit_test(test_threads),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
