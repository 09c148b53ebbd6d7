/* utf8: checking and repairing UTF-8 text (see utf8.h). */
#include "utf8.h"

#include <stdlib.h>
#include <string.h>

size_t utf8_seq_len(const unsigned char *s, size_t n) {
    if (n == 0) return 0;
    unsigned char c = s[0];
    if (c < 0x80) return 1;

    size_t len;
    unsigned min;
    unsigned cp;
    if (c >= 0xc2 && c <= 0xdf) {
        len = 2, min = 0x80, cp = c & 0x1f;
    } else if (c >= 0xe0 && c <= 0xef) {
        len = 3, min = 0x800, cp = c & 0x0f;
    } else if (c >= 0xf0 && c <= 0xf4) {
        len = 4, min = 0x10000, cp = c & 0x07;
    } else {
        return 0;
    }
    if (n < len) return 0;

    for (size_t i = 1; i < len; i++) {
        if ((s[i] & 0xc0) != 0x80) return 0;
        cp = (cp << 6) | (s[i] & 0x3f);
    }
    if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
        return 0;
    return len;
}

bool utf8_ok(const char *s, size_t n, size_t *bad_at) {
    const unsigned char *u = (const unsigned char *)s;
    size_t i = 0;
    while (i < n) {
        size_t k = u[i] ? utf8_seq_len(u + i, n - i) : 0;
        if (k == 0) {
            if (bad_at) *bad_at = i;
            return false;
        }
        i += k;
    }
    return true;
}

char *utf8_clean(const char *s, size_t n) {
    const unsigned char *u = (const unsigned char *)s;
    if (!s) n = 0;

    /* At most 3 output bytes per input byte. */
    char *out = malloc(n * 3 + 1);
    if (!out) return NULL;

    size_t o = 0, i = 0;
    while (i < n) {
        size_t k = u[i] ? utf8_seq_len(u + i, n - i) : 0;
        if (k == 0) {
            memcpy(out + o, "\xef\xbf\xbd", 3);
            o += 3;
            i++;
        } else {
            memcpy(out + o, u + i, k);
            o += k;
            i += k;
        }
    }
    out[o] = 0;
    return out;
}
