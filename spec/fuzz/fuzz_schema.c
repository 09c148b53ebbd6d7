/* Fuzz target for schema: the input is a schema and an instance, split at
 * the first NUL byte (no NUL: the instance is null). Both go through
 * json_parse; a schema that compiles is used to validate the instance.
 * Checks memory safety, that a refusal always says why, and that
 * validating twice gives the same answer. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "json.h"
#include "schema.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    const char *text = (const char *)data;
    const char *nul = memchr(text, '\0', size);
    size_t schema_len = nul ? (size_t)(nul - text) : size;
    json_error jerr;
    char err[256];

    cJSON *sj = json_parse(text, schema_len, 0, &jerr);
    if (sj == NULL) return 0;

    schema_t *s = schema_compile(sj, err, sizeof err);
    cJSON_Delete(sj);
    if (s == NULL) {
        if (err[0] == '\0') abort();
        return 0;
    }

    cJSON *x = nul ? json_parse(nul + 1, size - schema_len - 1, 0, &jerr)
                   : cJSON_CreateNull();
    if (x != NULL) {
        char err2[256];
        bool ok = schema_validate(s, x, "arguments", err, sizeof err);
        if (!ok && strncmp(err, "arguments", 9) != 0) abort();
        if (schema_validate(s, x, "arguments", err2, sizeof err2) != ok ||
            (!ok && strcmp(err, err2) != 0))
            abort();
        cJSON_Delete(x);
    }
    schema_free(s);
    return 0;
}
