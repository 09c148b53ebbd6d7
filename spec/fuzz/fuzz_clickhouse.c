/* fuzz_clickhouse: ClickHouse answers as a hostile server could send them -
 * the JSON result parser, the error parser and the end-of-stream check. */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "clickhouse.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    /* a copy of exactly `size` bytes, so reads past the end are caught */
    char *body = malloc(size ? size : 1);
    if (!body)
        return 0;
    memcpy(body, data, size);

    ch_error e;
    ch_result *r = ch_result_parse(body, size, &e);
    if (r) {
        for (size_t i = 0; i < r->nrows; i++)
            for (size_t j = 0; j < r->ncols; j++) {
                const ch_value *v = ch_cell(r, i, j);
                if (v->kind == CH_STRING && v->u.s.ptr[v->u.s.len] != '\0')
                    abort();
            }
        ch_result_free(r);
    } else if (memchr(e.message, '\0', sizeof e.message) == NULL) {
        abort();
    }
    ch_error_parse(body, size, &e);
    ch_error_in_tail(body, size, "abcdefghijklmnop", &e);
    ch_error_in_tail(body, size, NULL, &e);
    free(body);
    return 0;
}
