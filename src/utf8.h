/* utf8: checking and repairing UTF-8 text before it leaves netra (JSON
 * text frames, log lines, analytics rows must never carry invalid bytes).
 *
 * Threads: pure functions; any thread. */
#ifndef NETRA_UTF8_H
#define NETRA_UTF8_H

#include <stdbool.h>
#include <stddef.h>

/* The length of the valid UTF-8 sequence at s (n bytes available): 1 to
 * 4, or 0 when the bytes there are not valid UTF-8 (overlong forms,
 * surrogates and code points past U+10FFFF are invalid). NUL counts as a
 * valid one-byte sequence. */
size_t utf8_seq_len(const unsigned char *s, size_t n);

/* True when the n bytes at s are valid UTF-8 without NUL bytes. When
 * false and bad_at is not NULL, *bad_at is the offset of the first
 * invalid (or NUL) byte. */
bool utf8_ok(const char *s, size_t n, size_t *bad_at);

/* A new NUL-terminated copy of the n bytes at s where every invalid byte
 * and every NUL byte is replaced by U+FFFD. NULL when out of memory; the
 * caller frees. s NULL gives an empty string. */
char *utf8_clean(const char *s, size_t n);

#endif
