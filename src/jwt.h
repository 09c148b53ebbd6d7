/* jwt: HS256 JSON Web Tokens (RFC 7519) signed with a shared secret, the
 * only kind netra accepts, and getting a token out of an Authorization
 * header or a query string.
 *
 * Strict by design: a token is three base64url parts without padding
 * (RFC 7515's compact form), at most JWT_MAX_TOKEN bytes; the header must
 * say alg HS256 (no "none", no RSA or EC, no "crit"); the signature is
 * compared in constant time; exp, nbf and iat, when present, are numbers;
 * sub is the user id and must pass ctx_validate_id. Claims netra does not
 * read (aud, iss, jti, ...) are ignored.
 *
 * Threads: every function may be called from any thread; nothing here
 * keeps state. */
#ifndef NETRA_JWT_H
#define NETRA_JWT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "context.h"

#define JWT_MAX_TOKEN 8192 /* bytes; a longer token is malformed */
#define JWT_LEEWAY_S 60    /* netra's leeway for exp and nbf */

/* Why a token was refused. jwt_result_name gives the word for logs. */
typedef enum {
    JWT_OK = 0,
    JWT_MISSING,       /* no token, or an empty one */
    JWT_MALFORMED,     /* not three strict base64url parts, bad JSON,
                          bad header, a claim of the wrong type, too long */
    JWT_BAD_ALGORITHM, /* alg is anything but HS256 */
    JWT_BAD_SIGNATURE, /* the signature does not match the secret */
    JWT_EXPIRED,       /* now >= exp + leeway */
    JWT_NOT_YET_VALID, /* now < nbf - leeway */
    JWT_EXP_MISSING,   /* no exp, and one is required */
    JWT_BAD_SUB,       /* sub missing, not a string, or not a valid id */
    JWT_NO_SECRET,     /* the server has no secret: every token fails */
} jwt_result;

/* "ok", "missing", "malformed", "bad_algorithm", "bad_signature",
 * "expired", "not_yet_valid", "exp_missing", "bad_sub", "no_secret".
 * Can't fail (an unknown value gives "unknown"). */
const char *jwt_result_name(jwt_result result);

/* What a verified token says. The has_ flags tell which times were
 * present; times are Unix seconds (fractions dropped). */
typedef struct {
    char sub[CTX_ID_MAX + 1];
    int64_t exp, nbf, iat;
    bool has_exp, has_nbf, has_iat;
} jwt_claims;

/* Makes a token {"alg":"HS256","typ":"JWT"}.{"sub","iat","exp"} signed
 * with `secret` (a NUL-terminated string, not empty). exp <= 0 leaves the
 * exp claim out. On success returns 0 and sets *out to a new string the
 * caller frees with free(). Returns -1 with err filled and *out NULL when
 * the secret is empty, sub fails ctx_validate_id, or memory runs out. */
int jwt_sign(const char *secret, const char *sub, int64_t iat, int64_t exp,
             char **out, char *err, size_t err_size);

/* Verifies `token` against `secret` at time `now` (Unix seconds), with
 * `leeway_s` seconds of tolerance on exp and nbf (negative counts as 0).
 * When require_exp is true a token without exp is refused. Returns JWT_OK
 * and fills *out (may be NULL); otherwise returns the reason, fills err
 * (may be NULL) with one line that says what to do, and zeroes *out. The
 * message never contains the token or the secret.
 * Checks run in this order: secret, presence, length and shape, header
 * and alg, signature, payload JSON and claim types, exp, nbf, sub. */
jwt_result jwt_verify(const char *token, const char *secret, int64_t now,
                      int leeway_s, bool require_exp, jwt_claims *out,
                      char *err, size_t err_size);

/* Finds the `token` parameter in a URL query string (the part after '?';
 * a leading '?' is skipped) and percent-decodes it into out (form rules:
 * '+' is a space). Returns 1 when found (out may then be empty, for
 * "token=" or a bare "token"), 0 when absent (out empty), -1 when the
 * parameter appears twice, has a bad or NUL escape, or does not fit in
 * out_size (out empty, err filled). Give out JWT_MAX_TOKEN + 1 bytes. */
int jwt_query_token(const char *query, char *out, size_t out_size, char *err,
                    size_t err_size);

/* Copies the token of an Authorization header value "Bearer <token>"
 * into out (scheme compared without case; spaces and tabs around the
 * token skipped). Returns 1 when found, 0 when header is NULL, names
 * another scheme or holds no token (out empty), -1 when the token does
 * not fit in out_size (out empty). Give out JWT_MAX_TOKEN + 1 bytes. */
int jwt_bearer_token(const char *header, char *out, size_t out_size);

#endif
