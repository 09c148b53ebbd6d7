/* Unit tests for config: layers, env files, typed getters, secrets. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "config.h"

static char *write_tmp(const char *text) {
    static char path[256];
    snprintf(path, sizeof path, "/tmp/netra-config-test-%d.env", getpid());
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fputs(text, f);
    fclose(f);
    return path;
}

static void test_layers(void **state) {
    (void)state;
    config *c = config_new();
    assert_int_equal(config_set(c, CONFIG_DEFAULT, "K", "default"), 0);
    assert_string_equal(config_get(c, "K"), "default");
    assert_int_equal(config_source_of(c, "K"), CONFIG_DEFAULT);
    config_set(c, CONFIG_FILE, "K", "file");
    assert_string_equal(config_get(c, "K"), "file");
    config_set(c, CONFIG_ENVIRONMENT, "K", "env");
    assert_string_equal(config_get(c, "K"), "env");
    config_set(c, CONFIG_FLAG, "K", "flag");
    assert_string_equal(config_get(c, "K"), "flag");
    /* An empty value means unset: the next layer down shows through. */
    config_set(c, CONFIG_FLAG, "K", "");
    assert_string_equal(config_get(c, "K"), "env");
    config_set(c, CONFIG_ENVIRONMENT, "K", "");
    config_set(c, CONFIG_FILE, "K", "");
    config_set(c, CONFIG_DEFAULT, "K", "");
    assert_null(config_get(c, "K"));
    assert_string_equal(config_get_or(c, "K", "x"), "x");
    assert_null(config_get(c, "MISSING"));
    config_free(c);
}

static void test_bools(void **state) {
    (void)state;
    const char *yes[] = {"true", "TRUE", "1", "yes", "On"};
    const char *no[] = {"false", "0", "no", "OFF"};
    bool b;
    for (size_t i = 0; i < sizeof yes / sizeof *yes; i++) {
        assert_true(config_parse_bool(yes[i], &b));
        assert_true(b);
    }
    for (size_t i = 0; i < sizeof no / sizeof *no; i++) {
        assert_true(config_parse_bool(no[i], &b));
        assert_false(b);
    }
    assert_false(config_parse_bool("maybe", &b));
    assert_false(config_parse_bool("", &b));

    config *c = config_new();
    char err[256];
    config_set(c, CONFIG_FLAG, "B", "maybe");
    assert_int_equal(config_bool(c, "B", false, &b, err, sizeof err), -1);
    assert_non_null(strstr(err, "B: expected a boolean"));
    assert_int_equal(config_bool(c, "UNSET", true, &b, err, sizeof err), 0);
    assert_true(b);
    config_free(c);
}

static void test_ints(void **state) {
    (void)state;
    config *c = config_new();
    char err[256];
    long n;
    config_set(c, CONFIG_FLAG, "N", "four");
    assert_int_equal(config_int(c, "N", 1, 0, 10, &n, err, sizeof err), -1);
    assert_non_null(strstr(err, "expected an integer, got 'four'"));
    config_set(c, CONFIG_FLAG, "N", "11");
    assert_int_equal(config_int(c, "N", 1, 0, 10, &n, err, sizeof err), -1);
    assert_non_null(strstr(err, "out of range"));
    config_set(c, CONFIG_FLAG, "N", "7");
    assert_int_equal(config_int(c, "N", 1, 0, 10, &n, err, sizeof err), 0);
    assert_int_equal(n, 7);
    config_free(c);
}

static void test_env_file(void **state) {
    (void)state;
    config *c = config_new();
    char err[512];
    const char *path = write_tmp("\xEF\xBB\xBF# comment after a BOM\n"
                                 "export  G=two spaces\n"
                                 "H=   padded\n"
                                 "# comment\n"
                                 "\n"
                                 "A=plain value  \n"
                                 "export B=exported\n"
                                 "C=\"double \\\"quoted\\\" # not a comment\"\n"
                                 "D='single $x \\n'\n"
                                 "E=value # a comment\n"
                                 "F=\n");
    assert_int_equal(config_read_file(c, path, err, sizeof err), 0);
    assert_string_equal(config_get(c, "A"), "plain value");
    assert_string_equal(config_get(c, "B"), "exported");
    assert_string_equal(config_get(c, "C"), "double \"quoted\" # not a comment");
    assert_string_equal(config_get(c, "D"), "single $x \\n");
    assert_string_equal(config_get(c, "E"), "value");
    assert_null(config_get(c, "F"));
    assert_string_equal(config_get(c, "G"), "two spaces");
    assert_string_equal(config_get(c, "H"), "padded");
    config_free(c);
    unlink(path);

    c = config_new();
    assert_int_equal(config_read_file(c, "/tmp", err, sizeof err), -1);
    assert_non_null(strstr(err, "not a regular file"));
    config_free(c);
}

static void expect_bad_line(const char *text, int line, const char *why) {
    config *c = config_new();
    char err[512], want[64];
    const char *path = write_tmp(text);
    assert_int_equal(config_read_file(c, path, err, sizeof err), -1);
    snprintf(want, sizeof want, ".env:%d: ", line);
    if (!strstr(err, want) || !strstr(err, why)) fail_msg("got: %s", err);
    config_free(c);
    unlink(path);
}

static void test_env_file_errors(void **state) {
    (void)state;
    expect_bad_line("A=1\nnot a line\n", 2, "expected KEY=VALUE");
    expect_bad_line("lower=1\n", 1, "upper case");
    expect_bad_line("A = 1\n", 1, "no spaces around");
    expect_bad_line("A=1\nB=\"open\n", 2, "unterminated");
    expect_bad_line("A='x' y\n", 1, "after the closing quote");
    expect_bad_line("A=it's\n", 1, "quote the whole value");
}

static void test_secrets(void **state) {
    (void)state;
    assert_true(config_is_secret("CLICKHOUSE_PASSWORD"));
    assert_true(config_is_secret("NETRA_JWT_SECRET"));
    assert_true(config_is_secret("NETRA_ADMIN_TOKEN"));
    assert_true(config_is_secret("API_KEY"));
    assert_false(config_is_secret("CLICKHOUSE_USER"));
    assert_false(config_is_secret("KEYBOARD"));
}

static void test_environment_names(void **state) {
    (void)state;
    assert_true(config_environment_valid("development"));
    assert_true(config_environment_valid("production"));
    assert_false(config_environment_valid("prod"));
    assert_false(config_environment_valid(NULL));

    config *c = config_new();
    char err[512];
    config_set(c, CONFIG_FLAG, "ENVIRONMENT", "qa");
    assert_int_equal(config_load(c, err, sizeof err), -1);
    assert_non_null(strstr(err, "unknown environment 'qa'"));
    assert_non_null(strstr(err, "development, test, staging, production"));
    config_free(c);
}

static void test_load_finds_home(void **state) {
    (void)state;
    config *c = config_new();
    char err[512];
    config_set(c, CONFIG_FLAG, "ENVIRONMENT", "staging");
    assert_int_equal(config_load(c, err, sizeof err), 0);
    assert_string_equal(config_environment(c), "staging");
    /* config/staging.env sets CLICKHOUSE_REQUIRED=false. */
    if (config_source_of(c, "CLICKHOUSE_REQUIRED") == CONFIG_FILE)
        assert_string_equal(config_get(c, "CLICKHOUSE_REQUIRED"), "false");
    assert_string_equal(config_source_name(c, CONFIG_FILE),
                        "config/staging.env");
    config_free(c);

    c = config_new();
    config_set(c, CONFIG_FLAG, "NETRA_HOME", "/nonexistent");
    assert_int_equal(config_load(c, err, sizeof err), -1);
    assert_non_null(strstr(err, "NETRA_HOME=/nonexistent"));
    config_free(c);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_layers),
        cmocka_unit_test(test_bools),
        cmocka_unit_test(test_ints),
        cmocka_unit_test(test_env_file),
        cmocka_unit_test(test_env_file_errors),
        cmocka_unit_test(test_secrets),
        cmocka_unit_test(test_environment_names),
        cmocka_unit_test(test_load_finds_home),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
