/* fuzz_context: id validation on arbitrary bytes. Checks, beyond not
 * crashing, that an accepted id obeys the rules and round-trips through
 * a context. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "context.h"

static void check_accepted(const char *id, size_t n) {
    const unsigned char *s = (const unsigned char *)id;

    if (n == 0 || n > CTX_ID_MAX) abort();
    for (size_t i = 0; i < n; i++)
        if (s[i] < 0x20 || s[i] == 0x7F || s[i] == 0xC0 || s[i] == 0xC1 ||
            s[i] >= 0xF5)
            abort();
    if (s[0] == ' ' || s[n - 1] == ' ') abort();
    if (!strcasecmp(id, "default") || !strcasecmp(id, "null")) abort();

    ctx_fields f = {.user_id = id,
                    .thread_id = id,
                    .run_id = id,
                    .request_id = id,
                    .conn_id = n};
    char err[256];
    netra_ctx *ctx = ctx_new(&f, err, sizeof err);
    if (!ctx || strcmp(ctx_user_id(ctx), id) ||
        strcmp(ctx_request_id(ctx), id) || ctx_conn_id(ctx) != n)
        abort();
    ctx_unref(ctx);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    char *id = malloc(size + 1);
    char err[128];

    if (!id) return 0;
    memcpy(id, data, size);
    id[size] = '\0';

    err[0] = '\0';
    if (ctx_validate_id("user_id", id, err, sizeof err))
        check_accepted(id, strlen(id));
    else if (strncmp(err, "user_id: ", 9))
        abort(); /* every refusal names the field */

    free(id);
    return 0;
}
