/* Fuzz target for json: json_parse, json_utf8_valid and json_raw_id on
 * arbitrary bytes. Checks, besides memory safety: accepted text is valid
 * UTF-8 by an independent decoder; what cJSON prints from an accepted
 * value is accepted again and equal; a raw id found in accepted text
 * parses to the same value as the parsed "id" member. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "json.h"

/* A plain decoder: code point ranges, not byte tables. */
static int reference_utf8(const uint8_t *s, size_t n) {
    size_t i = 0;

    while (i < n) {
        uint32_t cp;
        size_t len;
        if (s[i] < 0x80) {
            i++;
            continue;
        } else if ((s[i] & 0xE0) == 0xC0) {
            cp = s[i] & 0x1F, len = 2;
        } else if ((s[i] & 0xF0) == 0xE0) {
            cp = s[i] & 0x0F, len = 3;
        } else if ((s[i] & 0xF8) == 0xF0) {
            cp = s[i] & 0x07, len = 4;
        } else {
            return 0;
        }
        if (n - i < len) return 0;
        for (size_t k = 1; k < len; k++) {
            if ((s[i + k] & 0xC0) != 0x80) return 0;
            cp = (cp << 6) | (s[i + k] & 0x3F);
        }
        static const uint32_t least[5] = {0, 0, 0x80, 0x800, 0x10000};
        if (cp < least[len] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
            return 0;
        i += len;
    }
    return 1;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    const char *text = (const char *)data;
    json_error err;

    if (json_utf8_valid(text, size) != reference_utf8(data, size)) abort();

    cJSON *v = json_parse(text, size, 0, &err);
    if (v == NULL) {
        if (err.message[0] == '\0' ||
            (err.offset != JSON_NO_OFFSET && err.offset > size))
            abort();
    } else if (!reference_utf8(data, size)) {
        abort();
    }

    const char *start = NULL;
    size_t n = 0;
    bool found = json_raw_id(text, size, &start, &n);
    if (found && (start < text || start + n > text + size || n == 0)) abort();

    if (v == NULL) return 0;

    char *printed = cJSON_PrintUnformatted(v);
    if (printed != NULL) {
        cJSON *again = json_parse(printed, strlen(printed), 0, &err);
        if (again == NULL || !cJSON_Compare(v, again, 1)) abort();
        cJSON_Delete(again);
        cJSON_free(printed);
    }

    const cJSON *id = cJSON_GetObjectItemCaseSensitive(v, "id");
    if (cJSON_IsObject(v) && (id != NULL) != found) abort();
    if (id != NULL && found) {
        cJSON *raw = json_parse(start, n, 0, &err);
        if (raw == NULL || !cJSON_Compare(raw, id, 1)) abort();
        cJSON_Delete(raw);
    }
    cJSON_Delete(v);
    return 0;
}
