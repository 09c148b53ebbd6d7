/* json: the front door for untrusted JSON text. Text is checked strictly
 * (RFC 8259 grammar, UTF-8, nesting bound, no NUL in strings, no
 * duplicate keys, nothing after the value) before cJSON sees it, so that
 * cJSON's lax corners (trailing garbage, truncating "\u0000", deep
 * recursion, "01") never reach the rest of netra.
 *
 * Threads: every function may be called from any thread at once. (cJSON
 * itself keeps one global error pointer that a failed parse writes; the
 * check here runs first, so cJSON only fails when memory runs out.) */
#ifndef NETRA_JSON_H
#define NETRA_JSON_H

#include <stdbool.h>
#include <stddef.h>

#include <cJSON.h>

/* The nesting bound used when json_parse is given 0. */
#define JSON_DEFAULT_MAX_DEPTH 64

/* Where a JSON offset is not known (a duplicate key is found after
 * parsing, by name). */
#define JSON_NO_OFFSET ((size_t)-1)

/* Why json_parse refused a text. `offset` is the byte (0-based) where the
 * problem was seen, or JSON_NO_OFFSET; `message` is a short reason that
 * already names the byte, e.g. "invalid UTF-8 at byte 17". */
typedef struct {
    size_t offset;
    char message[160];
} json_error;

/* Parses `len` bytes of `text` (need not be NUL-terminated) into a new
 * cJSON value that the caller frees with cJSON_Delete. Objects and arrays
 * may nest at most `max_depth` levels (0 means JSON_DEFAULT_MAX_DEPTH; a
 * scalar at the top is depth 0, `[1]` is depth 1; a bound above cJSON's
 * own CJSON_NESTING_LIMIT, 1000, is lowered to it).
 *
 * Returns NULL and fills *err (when err is not NULL) if the text is not
 * valid UTF-8, is not exactly one JSON value (whitespace around it is
 * fine), nests deeper than the bound, holds a raw control character or
 * "\u0000" in a string, a number too large for a double, or an object with
 * the same key twice; or when memory runs out. */
cJSON *json_parse(const char *text, size_t len, int max_depth, json_error *err);

/* Checks strict UTF-8: no overlong forms, no surrogates (U+D800..DFFF),
 * nothing above U+10FFFF, no truncated sequence. NUL bytes are valid
 * UTF-8. Can't fail. */
bool json_utf8_valid(const char *text, size_t len);

/* As json_utf8_valid; on false, *bad_offset (if not NULL) is the offset
 * of the first byte of the first invalid sequence. */
bool json_utf8_check(const char *text, size_t len, size_t *bad_offset);

/* Finds the raw text of the top-level member `name` of the JSON object in
 * `text` (exactly as sent: `12345678901234567890`, `"a\u0062"`, `null`),
 * so that a JSON-RPC id can be echoed byte for byte. Keys are compared
 * after unescaping. On success sets *start (a pointer into text) and *n
 * and returns true. Returns false if text is not an object, has no such
 * member, or is malformed before the member is found. The text should
 * have passed json_parse; this never reads outside text[0..len). */
bool json_raw_member(const char *text, size_t len, const char *name,
                     const char **start, size_t *n);

/* json_raw_member(text, len, "id", start, n). */
bool json_raw_id(const char *text, size_t len, const char **start, size_t *n);

#endif
