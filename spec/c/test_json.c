/* Tests for json: the strict front door for untrusted JSON text. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "json.h"

/* Parses a NUL-terminated text with the default depth. */
static cJSON *parse(const char *text, json_error *err) {
    return json_parse(text, strlen(text), 0, err);
}

/* Asserts that text is refused with exactly `message`. */
static void refused(const char *text, size_t len, const char *message) {
    json_error err = {0};
    cJSON *v = json_parse(text, len, 0, &err);

    if (v != NULL || strcmp(err.message, message) != 0)
        fail_msg("text %.40s: wanted \"%s\", got %s \"%s\"", text, message,
                 v ? "a value and" : "", err.message);
    cJSON_Delete(v);
}

static void refused_s(const char *text, const char *message) {
    refused(text, strlen(text), message);
}

static void accepted(const char *text) {
    json_error err = {0};
    cJSON *v = parse(text, &err);

    if (v == NULL) fail_msg("text %.60s refused: %s", text, err.message);
    cJSON_Delete(v);
}

static void test_parses_plain_values(void **state) {
    json_error err = {0};
    cJSON *v = parse(" {\"a\": [1, 2.5, -0, 1E+2, true, null],\n"
                     "  \"b\": \"caf\\u00e9 \\ud83d\\ude00 \xe2\x82\xac\"} ",
                     &err);

    assert_non_null(v);
    cJSON *a = cJSON_GetObjectItemCaseSensitive(v, "a");
    assert_int_equal(cJSON_GetArraySize(a), 6);
    assert_true(cJSON_GetArrayItem(a, 3)->valuedouble == 100.0);
    assert_string_equal(cJSON_GetObjectItemCaseSensitive(v, "b")->valuestring,
                        "caf\xc3\xa9 \xf0\x9f\x98\x80 \xe2\x82\xac");
    cJSON_Delete(v);

    accepted("0");
    accepted("\"\"");
    accepted("[]");
    accepted("{}");
    accepted("[[], {}, [{}]]");
    accepted("-1.5e-7");
}

static void test_does_not_need_a_nul_terminator(void **state) {
    const char text[] = "[1,2]xyz";
    json_error err = {0};
    cJSON *v = json_parse(text, 5, 0, &err);

    assert_non_null(v);
    assert_int_equal(cJSON_GetArraySize(v), 2);
    cJSON_Delete(v);

    /* A value cut short by the length is refused, not read past. */
    v = json_parse(text, 4, 0, &err);
    assert_null(v);
    assert_string_equal(err.message,
                        "unexpected end of text inside an array at byte 4");
}

static char *nested(int levels, char open, char close) {
    char *s = malloc((size_t)levels * 2 + 1);

    memset(s, open, (size_t)levels);
    memset(s + levels, close, (size_t)levels);
    s[levels * 2] = '\0';
    return s;
}

static void test_refuses_deep_nesting(void **state) {
    char *ok = nested(64, '[', ']');
    char *deep = nested(65, '[', ']');
    json_error err = {0};

    accepted(ok);
    assert_null(parse(deep, &err));
    assert_string_equal(err.message, "nested deeper than 64 levels at byte 64");
    assert_int_equal(err.offset, 64);

    /* The bound is a parameter. */
    cJSON *v = json_parse(deep, strlen(deep), 65, &err);
    assert_non_null(v);
    cJSON_Delete(v);
    assert_null(json_parse(ok, strlen(ok), 3, &err));
    assert_string_equal(err.message, "nested deeper than 3 levels at byte 3");
    free(ok);
    free(deep);

    /* Far deeper than cJSON's own limit, and than a stack would bear if
     * the check recursed: refused promptly. */
    char *huge = nested(2000000, '[', ']');
    assert_null(json_parse(huge, strlen(huge), 0, &err));
    assert_int_equal(err.offset, 64);
    /* A bound above cJSON's own nesting limit is lowered to it. */
    assert_null(json_parse(huge, strlen(huge), 10000000, &err));
    assert_string_equal(err.message,
                        "nested deeper than 1000 levels at byte 1000");
    free(huge);

    /* Objects count too. */
    char obj[64 * 6 + 8];
    size_t n = 0;
    for (int i = 0; i < 65; i++)
        n += (size_t)sprintf(obj + n, "{\"a\":");
    assert_null(json_parse(obj, n, 0, &err));
    assert_string_equal(err.message,
                        "nested deeper than 64 levels at byte 320");
}

static void test_refuses_invalid_utf8(void **state) {
    /* The byte offset points at the first byte of the bad sequence. */
    refused_s("\"abc\xc0\x80\"", "invalid UTF-8 at byte 4");      /* overlong */
    refused_s("\"\xe0\x80\xaf\"", "invalid UTF-8 at byte 1");     /* overlong */
    refused_s("\"\xf0\x80\x80\xaf\"", "invalid UTF-8 at byte 1"); /* overlong */
    refused_s("\"\xed\xa0\x80\"", "invalid UTF-8 at byte 1"); /* surrogate */
    refused_s("\"\xed\xbf\xbf\"", "invalid UTF-8 at byte 1"); /* surrogate */
    refused_s("\"\xf4\x90\x80\x80\"", "invalid UTF-8 at byte 1"); /* >10FFFF */
    refused_s("\"\xf5\x80\x80\x80\"", "invalid UTF-8 at byte 1");
    refused_s("\"\xff\"", "invalid UTF-8 at byte 1");
    refused_s("\"\x80\"", "invalid UTF-8 at byte 1"); /* lone continuation */
    refused_s("\"ab\xe2\x82\"", "invalid UTF-8 at byte 3");      /* truncated */
    refused_s("[\"ok\", \"\xe2\x82", "invalid UTF-8 at byte 8"); /* at end */

    accepted("\"\xed\x9f\xbf\"");     /* U+D7FF */
    accepted("\"\xee\x80\x80\"");     /* U+E000 */
    accepted("\"\xf4\x8f\xbf\xbf\""); /* U+10FFFF */
    accepted("\"\xc2\x80\xdf\xbf\""); /* U+0080, U+07FF */
}

static void test_utf8_valid(void **state) {
    size_t at = 99;

    assert_true(json_utf8_valid("", 0));
    assert_true(json_utf8_valid("a\0b", 3)); /* NUL is valid UTF-8 */
    assert_true(json_utf8_valid("\xf0\x9f\x98\x80", 4));
    assert_false(json_utf8_valid("\xf0\x9f\x98", 3));
    assert_false(json_utf8_valid("\xc1\xbf", 2));
    assert_false(json_utf8_check("abc\xed\xb0\x80", 6, &at));
    assert_int_equal(at, 3);

    /* Every two-byte prefix: valid exactly per the Unicode table. */
    for (int a = 0; a < 256; a++) {
        for (int b = 0; b < 256; b++) {
            unsigned char s[2] = {(unsigned char)a, (unsigned char)b};
            bool want;
            if (a < 0x80)
                want = b < 0x80;
            else
                want = a >= 0xC2 && a <= 0xDF && (b & 0xC0) == 0x80;
            if (json_utf8_valid((const char *)s, 2) != want)
                fail_msg("bytes %02x %02x", a, b);
        }
    }
}

static void test_refuses_trailing_characters(void **state) {
    refused_s("{\"a\":1} x", "trailing characters after the JSON value at "
                             "byte 8");
    refused_s("1 2", "trailing characters after the JSON value at byte 2");
    refused_s("{}{}", "trailing characters after the JSON value at byte 2");
    refused("[1]\0", 4, "trailing characters after the JSON value at byte 3");
    accepted(" \t\r\n[1] \n");
}

static void test_refuses_nul_and_control_characters(void **state) {
    refused_s("\"a\\u0000b\"",
              "\\u0000 in a string at byte 2 (NUL characters are not "
              "accepted)");
    refused_s("{\"k\\u0000\":1}",
              "\\u0000 in a string at byte 3 (NUL characters are not "
              "accepted)");
    refused("\"a\0b\"", 5, "control character in a string at byte 2");
    refused_s("\"tab\there\"", "control character in a string at byte 4");
    refused_s("\"\\ud800\"", "unpaired surrogate escape at byte 1");
    refused_s("\"\\udc00\"", "unpaired surrogate escape at byte 1");
    refused_s("\"\\ud800\\u0041\"", "unpaired surrogate escape at byte 1");
    refused_s("\"\\x41\"", "invalid escape at byte 1");
    refused_s("\"\\u12g4\"", "invalid \\u escape at byte 1");
    refused_s("\"abc", "unterminated string starting at byte 0");
    accepted("\"\\u0001\\\"\\\\\\/\\b\\f\\n\\r\\t\"");
}

static void test_refuses_bad_grammar(void **state) {
    refused_s("", "unexpected end of text at byte 0, expected a value");
    refused_s("   ", "unexpected end of text at byte 3, expected a value");
    refused_s("01", "trailing characters after the JSON value at byte 1");
    refused_s("1.", "invalid number at byte 0");
    refused_s("-", "invalid number at byte 0");
    refused_s("1e", "invalid number at byte 0");
    refused_s(".5", "unexpected character at byte 0");
    refused_s("+1", "unexpected character at byte 0");
    refused_s("[1,]", "unexpected character at byte 3");
    refused_s("{\"a\":1,}", "expected a string key at byte 7");
    refused_s("{\"a\" 1}", "expected ':' at byte 5");
    refused_s("{a:1}", "expected a string key at byte 1");
    refused_s("[1 2]", "expected ',' or ']' at byte 3");
    refused_s("[tru]", "unexpected character at byte 1");
    refused_s("NaN", "unexpected character at byte 0");
    refused_s("1e400", "number out of range at byte 0");
    refused_s("[-1e999]", "number out of range at byte 1");
    accepted("1e-400"); /* underflows to 0: still a number */
}

static void test_refuses_duplicate_keys(void **state) {
    json_error err = {0};

    assert_null(parse("{\"limit\":5,\"limit\":\"x\"}", &err));
    assert_string_equal(err.message, "duplicate key \"limit\" in an object");
    assert_true(err.offset == JSON_NO_OFFSET);

    /* The same key written two ways, deep inside. */
    assert_null(parse("[{\"x\":{\"a\":1,\"b\":2,\"\\u0061\":3}}]", &err));
    assert_string_equal(err.message, "duplicate key \"a\" in an object");

    accepted("{\"a\":{\"a\":1},\"b\":{\"a\":2}}");
}

static void expect_id(const char *text, const char *want) {
    const char *start = NULL;
    size_t n = 0;
    bool found = json_raw_id(text, strlen(text), &start, &n);

    if (want == NULL) {
        if (found) fail_msg("%s: found an id %.*s", text, (int)n, start);
        return;
    }
    if (!found) fail_msg("%s: no id found", text);
    if (n != strlen(want) || memcmp(start, want, n) != 0)
        fail_msg("%s: id %.*s, wanted %s", text, (int)n, start, want);
}

static void test_raw_id(void **state) {
    expect_id("{\"jsonrpc\":\"2.0\",\"id\":12345678901234567890,\"m\":1}",
              "12345678901234567890");
    expect_id("{\"id\":9007199254740993}", "9007199254740993");
    expect_id("{ \"params\" : {\"id\": 1, \"x\": [\"id\"]}, \"id\" : "
              "\"a\\\"b\" }",
              "\"a\\\"b\"");
    expect_id("{\"\\u0069d\":-1.5e3}", "-1.5e3");
    expect_id("{\"id\":null}", "null");
    expect_id("{\"a\":[{\"id\":2}],\"id\":{\"k\":[1,2]}}", "{\"k\":[1,2]}");
    expect_id("{\"idx\":1,\"i\":2}", NULL);
    expect_id("[{\"id\":1}]", NULL);
    expect_id("{\"id\"", NULL);
    expect_id("{\"id\":", NULL);
    expect_id("{\"id\":\"abc", NULL);
    expect_id("", NULL);

    /* The raw text agrees with what cJSON would round. */
    const char *text = "{\"id\":18446744073709551615}";
    json_error err;
    cJSON *v = parse(text, &err);
    assert_non_null(v);
    char *printed = cJSON_PrintUnformatted(cJSON_GetObjectItem(v, "id"));
    assert_string_not_equal(printed, "18446744073709551615");
    cJSON_free(printed);
    cJSON_Delete(v);
    expect_id(text, "18446744073709551615");

    const char *start;
    size_t n;
    assert_true(json_raw_member("{\"a\":1,\"method\":\"x\"}", 20, "method",
                                &start, &n));
    assert_int_equal(n, 3);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_parses_plain_values),
        cmocka_unit_test(test_does_not_need_a_nul_terminator),
        cmocka_unit_test(test_refuses_deep_nesting),
        cmocka_unit_test(test_refuses_invalid_utf8),
        cmocka_unit_test(test_utf8_valid),
        cmocka_unit_test(test_refuses_trailing_characters),
        cmocka_unit_test(test_refuses_nul_and_control_characters),
        cmocka_unit_test(test_refuses_bad_grammar),
        cmocka_unit_test(test_refuses_duplicate_keys),
        cmocka_unit_test(test_raw_id),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
