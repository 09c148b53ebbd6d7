/* Unit tests for log: levels, formats and redaction. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "log.h"

static char *capture(log_level min, bool json, void (*emit)(void)) {
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    log_set_output(f);
    log_setup(min, json);
    emit();
    log_set_output(NULL);
    fclose(f);
    return buf;
}

static void emit_levels(void) {
    log_msg(NLOG_DEBUG, "t", "a debug line");
    log_msg(NLOG_INFO, "t", "an info line");
    log_msg(NLOG_ERROR, "t", "an error line");
}

static void test_levels(void **state) {
    (void)state;
    char *out = capture(NLOG_INFO, false, emit_levels);
    assert_null(strstr(out, "a debug line"));
    assert_non_null(strstr(out, "info  [t] an info line"));
    assert_non_null(strstr(out, "error [t] an error line"));
    free(out);
    log_level lv;
    assert_true(log_parse_level("WARNING", &lv));
    assert_int_equal(lv, NLOG_WARN);
    assert_false(log_parse_level("loud", &lv));
}

static void emit_request(void) {
    log_req(NLOG_INFO, "dispatcher", "req-1", "run-9", "tool %s done", "echo");
}

static void test_json(void **state) {
    (void)state;
    char *out = capture(NLOG_INFO, true, emit_request);
    assert_non_null(strstr(out, "\"component\":\"dispatcher\""));
    assert_non_null(strstr(out, "\"message\":\"tool echo done\""));
    assert_non_null(strstr(out, "\"request_id\":\"req-1\""));
    assert_non_null(strstr(out, "\"run_id\":\"run-9\""));
    assert_non_null(strstr(out, "\"level\":\"info\""));
    free(out);
    out = capture(NLOG_INFO, false, emit_request);
    assert_non_null(strstr(out, "request_id=req-1 run_id=run-9"));
    free(out);
}

static void emit_secrets(void) {
    log_msg(NLOG_INFO, "ClickHouse",
            "connecting to http://admin:pa55word@db:8123/x and "
            "https://u:p%%40ss@h/ then token s3cr3t-value!");
}

static void test_redaction(void **state) {
    (void)state;
    log_add_secret("s3cr3t-value");
    char *out = capture(NLOG_INFO, false, emit_secrets);
    assert_null(strstr(out, "pa55word"));
    assert_null(strstr(out, "p%40ss"));
    assert_null(strstr(out, "s3cr3t-value"));
    assert_non_null(strstr(out, "http://admin:***@db:8123/x"));
    assert_non_null(strstr(out, "token [REDACTED]!"));
    free(out);

    char buf[128];
    log_redact("set CLICKHOUSE_PASSWORD=hunter2 and api_key='k1' ok", buf,
               sizeof buf);
    assert_string_equal(buf, "set CLICKHOUSE_PASSWORD=[REDACTED] and "
                             "api_key='k1' ok");
    log_redact("NETRA_JWT_SECRET=abc,X_TOKEN=def", buf, sizeof buf);
    assert_string_equal(buf, "NETRA_JWT_SECRET=[REDACTED],X_TOKEN=[REDACTED]");
    log_redact("ftp://a:b@c no password here", buf, sizeof buf);
    assert_string_equal(buf, "ftp://a:***@c no password here");
    log_redact("http://host:8123/path", buf, sizeof buf);
    assert_string_equal(buf, "http://host:8123/path");
}

static void emit_forgery(void) {
    log_req(NLOG_INFO, "Tool", "req-2", NULL, "%s",
            "hi\n2026-01-01T00:00:00.000Z error [startup] FORGED\r\x1b[2J"
            "\tbad \xff\xfe byte \xc3\xa9 ok\x7f");
}

/* D9: a tool's text cannot start a line of its own, move the terminal
 * or put invalid UTF-8 in the log. */
static void test_control_bytes_escaped(void **state) {
    (void)state;
    char *out = capture(NLOG_INFO, false, emit_forgery);
    assert_non_null(strstr(out, "hi\\n2026-01-01T00:00:00.000Z error "
                                "[startup] FORGED\\r\\x1b[2J\\tbad "
                                "\xef\xbf\xbd\xef\xbf\xbd byte \xc3\xa9 "
                                "ok\\x7f request_id=req-2\n"));
    /* exactly one line */
    assert_ptr_equal(strchr(out, '\n'), out + strlen(out) - 1);
    assert_null(strchr(out, '\x1b'));
    assert_null(strchr(out, '\r'));
    free(out);

    out = capture(NLOG_INFO, true, emit_forgery);
    assert_ptr_equal(strchr(out, '\n'), out + strlen(out) - 1);
    assert_non_null(strstr(out, "hi\\n2026"));
    assert_non_null(strstr(out, "bad \xef\xbf\xbd\xef\xbf\xbd byte"));
    assert_null(strstr(out, "\xff"));
    free(out);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_levels),
        cmocka_unit_test(test_json),
        cmocka_unit_test(test_redaction),
        cmocka_unit_test(test_control_bytes_escaped),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
