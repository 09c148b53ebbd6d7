/* fuzz_jwt: token verification and query parsing on arbitrary bytes.
 * Beyond not crashing: a refusal always has a message without the secret,
 * an accepted token has a valid sub, and the bytes used as a header or a
 * payload of a correctly signed token are judged on their content only
 * (never as a bad signature). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/evp.h>
#include <openssl/hmac.h>

#include "jwt.h"

#define SECRET "fuzz-secret-0123456789"
#define NOW 1700000000
#define HEADER "{\"alg\":\"HS256\"}"
#define PAYLOAD "{\"sub\":\"alice\",\"exp\":1700000600}"

static size_t b64url(const unsigned char *in, size_t n, char *out) {
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
    return o;
}

/* Verifies a token made of header and payload, signed with SECRET. */
static void verify_signed(const uint8_t *h, size_t hn, const uint8_t *p,
                          size_t pn) {
    char *t = malloc(2 * (hn + pn) + 64);
    unsigned char mac[32];
    unsigned int mac_len = 0;
    jwt_claims c;
    char err[512];

    size_t at = b64url(h, hn, t);
    t[at++] = '.';
    at += b64url(p, pn, t + at);
    HMAC(EVP_sha256(), SECRET, (int)strlen(SECRET), (unsigned char *)t, at, mac,
         &mac_len);
    t[at++] = '.';
    b64url(mac, mac_len, t + at);

    jwt_result r = jwt_verify(t, SECRET, NOW, 60, true, &c, err, sizeof err);
    if (r == JWT_BAD_SIGNATURE || r == JWT_MISSING || r == JWT_NO_SECRET)
        abort();
    if (r == JWT_OK && !ctx_validate_id("sub", c.sub, NULL, 0)) abort();
    free(t);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    char *text = malloc(size + 1);
    char err[512], out[JWT_MAX_TOKEN + 1];
    jwt_claims claims;

    if (!text) return 0;
    memcpy(text, data, size);
    text[size] = '\0';

    /* The bytes as a token. */
    err[0] = '\0';
    jwt_result r = jwt_verify(text, SECRET, NOW, JWT_LEEWAY_S, true, &claims,
                              err, sizeof err);
    if (r != JWT_OK && (!err[0] || strstr(err, SECRET))) abort();
    if (r == JWT_OK && !ctx_validate_id("sub", claims.sub, NULL, 0)) abort();

    /* As a query string and as a header value. */
    if (jwt_query_token(text, out, sizeof out, err, sizeof err) == 1)
        (void)jwt_verify(out, SECRET, NOW, 60, false, NULL, NULL, 0);
    (void)jwt_bearer_token(text, out, sizeof out);

    /* As the header, then the payload, of a correctly signed token. */
    if (size < 4096) {
        verify_signed(data, size, (const uint8_t *)PAYLOAD, strlen(PAYLOAD));
        verify_signed((const uint8_t *)HEADER, strlen(HEADER), data, size);
    }

    /* As a user id: a token signed for it must verify. */
    char *token = NULL;
    if (jwt_sign(SECRET, text, NOW, NOW + 600, &token, NULL, 0) == 0) {
        if (jwt_verify(token, SECRET, NOW, 0, true, &claims, NULL, 0) !=
                JWT_OK ||
            strcmp(claims.sub, text))
            abort();
        free(token);
    }

    free(text);
    return 0;
}
