/* test_clickhouse: the ClickHouse client against a real 18.16 server, and
 * its parsers against recorded bodies of current servers.
 * needs: clickhouse */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>
#include <lauxlib.h>
#include <lualib.h>

#include "bind_clickhouse.h"
#include "clickhouse.h"

/* ---- helpers ------------------------------------------------------------ */

static char g_host[64];
static int g_port;
static char g_password[128];

static void read_server(void) {
    const char *path = getenv("NETRA_TEST_CLICKHOUSE");
    assert_non_null(path);
    FILE *f = fopen(path, "r");
    assert_non_null(f);
    char line[128] = "";
    assert_non_null(fgets(line, sizeof line, f));
    fclose(f);
    char *colon = strrchr(line, ':');
    assert_non_null(colon);
    *colon = '\0';
    snprintf(g_host, sizeof g_host, "%.63s", line);
    g_port = atoi(colon + 1);

    char pw[512];
    snprintf(pw, sizeof pw, "%s", path);
    char *slash = strrchr(pw, '/');
    assert_non_null(slash);
    snprintf(slash, sizeof pw - (size_t)(slash - pw), "/password");
    f = fopen(pw, "r");
    assert_non_null(f);
    assert_non_null(fgets(g_password, sizeof g_password, f));
    fclose(f);
    g_password[strcspn(g_password, "\r\n")] = '\0';
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static ch_client *client_as(const char *user, const char *pw,
                            const ch_options *o) {
    ch_settings s = {g_host, g_port, (char *)user, (char *)pw,
                     (char *)"default", false};
    ch_client *c = ch_client_new(&s, o);
    assert_non_null(c);
    return c;
}

static ch_client *connected(void) {
    ch_client *c = client_as("default", "", NULL);
    ch_error e;
    int rc = ch_connect(c, &e);
    if (rc != CH_OK)
        fail_msg("connect: %s", e.message);
    return c;
}

static ch_result *must_query(ch_client *c, const char *sql) {
    ch_result *r = NULL;
    ch_error e;
    if (ch_query(c, sql, NULL, &r, &e) != CH_OK)
        fail_msg("query %s: %s", sql, e.message);
    return r;
}

static void must_exec(ch_client *c, const char *sql) {
    ch_error e;
    if (ch_exec(c, sql, NULL, &e) != CH_OK)
        fail_msg("exec %s: %s", sql, e.message);
}

typedef struct {
    const char *keys[8];
    const char *values[8];
} kv;

static const char *kv_get(void *ud, const char *key) {
    kv *t = ud;
    for (int i = 0; i < 8 && t->keys[i]; i++)
        if (strcmp(t->keys[i], key) == 0)
            return t->values[i];
    return NULL;
}

/* ---- settings ------------------------------------------------------------ */

static void test_settings_url(void **state) {
    (void)state;
    kv t = {{"CLICKHOUSE_URL"},
            {"https://bob:p%40ss%3Aw0rd@ch.example:9440/analytics"}};
    ch_settings s;
    char w[256], e[256];
    assert_int_equal(ch_settings_parse(&s, kv_get, &t, w, sizeof w, e,
                                       sizeof e), CH_OK);
    assert_string_equal(s.host, "ch.example");
    assert_int_equal(s.port, 9440);
    assert_string_equal(s.user, "bob");
    assert_string_equal(s.password, "p@ss:w0rd");
    assert_string_equal(s.database, "analytics");
    assert_true(s.secure);
    assert_string_equal(w, "");
    ch_settings_free(&s);

    kv d = {{"CLICKHOUSE_URL"}, {"http://h"}};
    assert_int_equal(ch_settings_parse(&s, kv_get, &d, w, sizeof w, e,
                                       sizeof e), CH_OK);
    assert_int_equal(s.port, 8123);
    assert_string_equal(s.user, "default");
    assert_string_equal(s.password, "");
    assert_string_equal(s.database, "default");
    assert_false(s.secure);
    ch_settings_free(&s);
}

static void test_settings_keys_and_conflict(void **state) {
    (void)state;
    ch_settings s;
    char w[512], e[256];
    kv t = {{"CLICKHOUSE_HOST", "CLICKHOUSE_SECURE", "CLICKHOUSE_USER",
             "CLICKHOUSE_PASSWORD", "CLICKHOUSE_DB"},
            {"db.internal", "yes", "u", "secret-pw", "events"}};
    assert_int_equal(ch_settings_parse(&s, kv_get, &t, w, sizeof w, e,
                                       sizeof e), CH_OK);
    assert_int_equal(s.port, 8443);
    assert_true(s.secure);
    assert_string_equal(s.database, "events");
    ch_settings_free(&s);

    kv both = {{"CLICKHOUSE_URL", "CLICKHOUSE_HOST", "CLICKHOUSE_PASSWORD"},
               {"http://a:hidden-pw@url-host:1234/x", "other-host", "pw2-x"}};
    assert_int_equal(ch_settings_parse(&s, kv_get, &both, w, sizeof w, e,
                                       sizeof e), CH_OK);
    assert_string_equal(s.host, "url-host");
    assert_int_equal(s.port, 1234);
    assert_non_null(strstr(w, "CLICKHOUSE_HOST"));
    assert_non_null(strstr(w, "using CLICKHOUSE_URL"));
    assert_null(strstr(w, "hidden-pw"));
    assert_null(strstr(w, "pw2-x"));
    ch_settings_free(&s);

    kv bad = {{"CLICKHOUSE_HOST", "CLICKHOUSE_PORT"}, {"h", "80000"}};
    assert_int_equal(ch_settings_parse(&s, kv_get, &bad, w, sizeof w, e,
                                       sizeof e), CH_ERR);
    assert_non_null(strstr(e, "CLICKHOUSE_PORT"));
    kv badurl = {{"CLICKHOUSE_URL"}, {"ftp://u:topsecret@h/db"}};
    assert_int_equal(ch_settings_parse(&s, kv_get, &badurl, w, sizeof w, e,
                                       sizeof e), CH_ERR);
    assert_null(strstr(e, "topsecret"));
}

static void test_settings_missing(void **state) {
    (void)state;
    ch_settings s;
    kv none = {{"CLICKHOUSE_DB", "CLICKHOUSE_URL"}, {"x", ""}};
    assert_int_equal(ch_settings_parse(&s, kv_get, &none, NULL, 0, NULL, 0),
                     CH_UNSET);
    const char *names[4];
    assert_int_equal(ch_settings_missing(kv_get, &none, names, 4), 1);
    assert_string_equal(names[0], "CLICKHOUSE_URL");
    kv host = {{"CLICKHOUSE_HOST"}, {"h"}};
    assert_int_equal(ch_settings_missing(kv_get, &host, names, 4), 0);
}

/* ---- escaping ------------------------------------------------------------ */

static void test_escaping(void **state) {
    (void)state;
    static const char in[] = "a'b\\c\n\t\r\0`z";
    char *q = ch_quote(in, sizeof in - 1);
    assert_string_equal(q, "'a\\'b\\\\c\\n\\t\\r\\0`z'");
    free(q);
    char *i = ch_ident(in, sizeof in - 1);
    assert_string_equal(i, "`a'b\\\\c\\n\\t\\r\\0\\`z`");
    free(i);
    q = ch_quote("x\\", 2); /* a trailing backslash cannot eat the quote */
    assert_string_equal(q, "'x\\\\'");
    free(q);

    ch_rows *r = ch_rows_new();
    ch_rows_str(r, in, sizeof in - 1);
    ch_rows_null(r);
    ch_rows_str(r, "\\N", 2);
    ch_rows_int(r, INT64_MIN);
    ch_rows_uint(r, UINT64_MAX);
    ch_rows_end(r);
    size_t len;
    const char *data = ch_rows_data(r, &len);
    static const char want[] =
        "a'b\\\\c\\n\\t\\r\\0`z\t\\N\t\\\\N\t-9223372036854775808\t"
        "18446744073709551615\n";
    assert_int_equal(len, sizeof want - 1);
    assert_memory_equal(data, want, len);
    assert_int_equal(ch_rows_count(r), 1);
    ch_rows_free(r);
}

/* ---- error parsing on recorded bodies ------------------------------------ */

static void test_error_formats(void **state) {
    (void)state;
    ch_error e;
    static const char old[] =
        "Code: 47, e.displayText() = DB::Exception: Unknown identifier: foo."
        " Note that there is no tables (FROM clause) in your query, "
        "e.what() = DB::Exception\n";
    assert_true(ch_error_parse(old, sizeof old - 1, &e));
    assert_int_equal(e.code, 47);
    assert_int_equal(e.kind, CH_E_SERVER);
    assert_string_equal(e.name, "");
    assert_non_null(strstr(e.message, "ClickHouse error 47: Unknown "
                                      "identifier: foo."));
    assert_null(strstr(e.message, "e.what()"));

    /* a current server (recorded from 24.8) */
    static const char cur[] =
        "Code: 47. DB::Exception: Missing columns: 'foo' while processing "
        "query: 'SELECT foo', required columns: 'foo'. (UNKNOWN_IDENTIFIER) "
        "(version 24.8.4.13 (official build))\n";
    assert_true(ch_error_parse(cur, sizeof cur - 1, &e));
    assert_int_equal(e.code, 47);
    assert_string_equal(e.name, "UNKNOWN_IDENTIFIER");
    assert_string_equal(e.message,
                        "ClickHouse error 47 (UNKNOWN_IDENTIFIER): Missing "
                        "columns: 'foo' while processing query: 'SELECT foo',"
                        " required columns: 'foo'.");

    static const char auth[] =
        "Code: 516. DB::Exception: netra_test: Authentication failed: "
        "password is incorrect, or there is no user with such name. "
        "(AUTHENTICATION_FAILED) (version 25.3.2.39 (official build))\n";
    assert_true(ch_error_parse(auth, sizeof auth - 1, &e));
    assert_int_equal(e.code, 516);
    assert_string_equal(e.name, "AUTHENTICATION_FAILED");

    assert_false(ch_error_parse("Ok.\n", 4, &e));
    assert_false(ch_error_parse("1\t2\n", 4, &e));
    static const char data[] = "Code: is a word\n";
    assert_false(ch_error_parse(data, sizeof data - 1, &e));
}

static void test_error_mid_stream_recorded(void **state) {
    (void)state;
    ch_error e;
    /* 18.16, JSONCompact, error after 200 OK: glued to the last row */
    static const char old[] =
        "{\n\t\"meta\":\n\t[\n\t\t{\n\t\t\t\"name\": \"number\",\n\t\t\t"
        "\"type\": \"UInt64\"\n\t\t}\n\t],\n\n\t\"data\":\n\t[\n"
        "\t\t[\"999998\"],\n\t\t[\"999999\"]Code: 395, e.displayText() = "
        "DB::Exception: Value passed to 'throwIf' function is non zero, "
        "e.what() = DB::Exception\n";
    assert_null(ch_result_parse(old, sizeof old - 1, &e));
    assert_int_equal(e.code, 395);
    assert_int_equal(e.kind, CH_E_SERVER);

    /* 24.x, TSV: a last line */
    static const char tsv[] =
        "1\n2\n3\nCode: 395. DB::Exception: Value passed to 'throwIf' "
        "function is non-zero: while executing 'FUNCTION throwIf(...)'. "
        "(FUNCTION_THROW_IF_VALUE_IS_NON_ZERO) (version 24.3.1.1)\n";
    assert_true(ch_error_in_tail(tsv, sizeof tsv - 1, NULL, &e));
    assert_int_equal(e.code, 395);
    assert_string_equal(e.name, "FUNCTION_THROW_IF_VALUE_IS_NON_ZERO");

    /* 25.11+: the tagged block, tag from X-ClickHouse-Exception-Tag */
    static const char msg[] =
        "Code: 395. DB::Exception: Value passed to 'throwIf' function is "
        "non-zero. (FUNCTION_THROW_IF_VALUE_IS_NON_ZERO) (version 25.11.1.1 "
        "(official build))";
    char block[1024];
    snprintf(block, sizeof block,
             "{\"meta\":[{\"name\":\"n\",\"type\":\"UInt64\"}],\"data\":["
             "[\"0\"],[\"1\"]\r\n__exception__\r\nqxzjvlbqdwtrkmnh\r\n%s\n"
             "%zu qxzjvlbqdwtrkmnh\r\n__exception__\r\n",
             msg, sizeof msg - 1);
    assert_true(ch_error_in_tail(block, strlen(block), "qxzjvlbqdwtrkmnh",
                                 &e));
    assert_int_equal(e.code, 395);
    assert_string_equal(e.name, "FUNCTION_THROW_IF_VALUE_IS_NON_ZERO");
    assert_null(strstr(e.message, "__exception__"));
    assert_null(strstr(e.message, "qxzjvlbqdwtrkmnh"));
    /* a different tag is data, not our server's error */
    assert_false(ch_error_in_tail(block, strlen(block), "aaaaaaaaaaaaaaaa",
                                  &e) && e.code == 0);
    assert_null(ch_result_parse(block, strlen(block), &e));
    assert_int_equal(e.code, 395);

    /* a current server writing the error inside JSON output */
    static const char injson[] =
        "{\"meta\":[{\"name\":\"n\",\"type\":\"UInt64\"}],\"data\":[[\"0\"]],"
        "\"exception\": \"Code: 395. DB::Exception: boom. "
        "(FUNCTION_THROW_IF_VALUE_IS_NON_ZERO) (version 24.8.1.1)\"}\n";
    assert_null(ch_result_parse(injson, sizeof injson - 1, &e));
    assert_int_equal(e.code, 395);
}

static void test_result_parse_recorded(void **state) {
    (void)state;
    ch_error e;
    static const char body[] =
        "{\"meta\":[{\"name\":\"u\",\"type\":\"UInt64\"},"
        "{\"name\":\"i\",\"type\":\"Int64\"},"
        "{\"name\":\"s\",\"type\":\"String\"},"
        "{\"name\":\"a\",\"type\":\"Array(Nullable(Int64))\"},"
        "{\"name\":\"f\",\"type\":\"Float64\"}],"
        "\"data\":[[\"18446744073709551615\",\"-9223372036854775808\","
        "\"a\\u0000b\\\"\\\\\\n\",[\"1\",null,\"-2\"],1.5]],"
        "\"rows\":1,\"statistics\":{\"elapsed\":0.1}}";
    ch_result *r = ch_result_parse(body, sizeof body - 1, &e);
    assert_non_null(r);
    assert_int_equal(r->ncols, 5);
    assert_int_equal(r->nrows, 1);
    assert_int_equal(ch_cell(r, 0, 0)->kind, CH_STRING);
    assert_string_equal(ch_cell(r, 0, 0)->u.s.ptr, "18446744073709551615");
    assert_int_equal(ch_cell(r, 0, 1)->kind, CH_INT);
    assert_true(ch_cell(r, 0, 1)->u.i == INT64_MIN);
    assert_int_equal(ch_cell(r, 0, 2)->u.s.len, 6);
    assert_memory_equal(ch_cell(r, 0, 2)->u.s.ptr, "a\0b\"\\\n", 6);
    const ch_value *a = ch_cell(r, 0, 3);
    assert_int_equal(a->kind, CH_ARRAY);
    assert_int_equal(a->u.a.len, 3);
    assert_int_equal(a->u.a.items[0].kind, CH_INT);
    assert_int_equal(a->u.a.items[1].kind, CH_NULL);
    assert_int_equal(a->u.a.items[2].u.i, -2);
    assert_int_equal(ch_cell(r, 0, 4)->kind, CH_FLOAT);
    ch_result_free(r);

    static const char bad[] = "{\"meta\":[],\"data\":[[1]]}";
    assert_null(ch_result_parse(bad, sizeof bad - 1, &e));
    assert_int_equal(e.kind, CH_E_PROTOCOL);
    assert_null(ch_result_parse("1\t2\n", 4, &e));
    assert_int_equal(e.kind, CH_E_PROTOCOL);
}

/* ---- live: connection ---------------------------------------------------- */

static void test_not_connected(void **state) {
    (void)state;
    ch_client *c = client_as("default", "", NULL);
    ch_error e;
    ch_result *r = NULL;
    assert_int_equal(ch_query(c, "SELECT 1", NULL, &r, &e), CH_ERR);
    assert_string_equal(e.message, "Not connected to ClickHouse.");
    assert_int_equal(e.kind, CH_E_NOT_CONNECTED);
    assert_int_equal(ch_ping(c, &e), CH_ERR);
    assert_string_equal(e.message, CH_NOT_CONNECTED);

    assert_int_equal(ch_connect(c, &e), CH_OK);
    assert_int_equal(ch_ping(c, &e), CH_OK);
    ch_close(c);
    assert_int_equal(ch_exec(c, "SELECT 1", NULL, &e), CH_ERR);
    assert_string_equal(e.message, CH_NOT_CONNECTED);
    ch_rows *rows = ch_rows_new();
    assert_int_equal(ch_insert(c, "t", NULL, 0, rows, NULL, &e), CH_ERR);
    assert_string_equal(e.message, CH_NOT_CONNECTED);
    assert_int_equal(ch_kill(c, "x", NULL, &e), CH_ERR);
    assert_string_equal(e.message, CH_NOT_CONNECTED);
    assert_null(ch_request_query(c, "SELECT 1", NULL, &e));
    assert_string_equal(e.message, CH_NOT_CONNECTED);
    ch_rows_free(rows);
    ch_client_free(c);
}

static void test_connect_version(void **state) {
    (void)state;
    ch_client *c = connected();
    assert_true(strncmp(ch_version(c), "18.16", 5) == 0);
    assert_true(ch_version_at_least(c, 18, 16));
    assert_false(ch_version_at_least(c, 19, 1));
    assert_true(strlen(ch_timezone(c)) > 0);
    ch_error e;
    assert_int_equal(ch_ping(c, &e), CH_OK);
    ch_client_free(c);
}

static void test_auth(void **state) {
    (void)state;
    ch_client *c = client_as("netra_test", g_password, NULL);
    ch_error e;
    assert_int_equal(ch_connect(c, &e), CH_OK);
    /* 18.16 has no currentUser(): ask the process list about ourselves */
    ch_result *r = NULL;
    ch_query_opts who = {.query_id = "netra-whoami-c"};
    assert_int_equal(ch_query(c, "SELECT user FROM system.processes WHERE "
                              "query_id = 'netra-whoami-c'", &who, &r, &e),
                     CH_OK);
    assert_int_equal(r->nrows, 1);
    assert_string_equal(ch_cell(r, 0, 0)->u.s.ptr, "netra_test");
    ch_result_free(r);
    ch_client_free(c);

    c = client_as("netra_test", "wrong-password", NULL);
    assert_int_equal(ch_connect(c, &e), CH_ERR);
    assert_int_equal(e.code, 193);
    assert_int_equal(e.http_status, 401);
    assert_non_null(strstr(e.message, "Wrong password"));
    assert_false(ch_connected(c));
    ch_client_free(c);
}

static void test_connect_refused_fast(void **state) {
    (void)state;
    ch_settings s = {"127.0.0.1", 1, "default", "", "default", false};
    ch_options o = {.connect_timeout_ms = 1000, .timeout_ms = 5000};
    ch_client *c = ch_client_new(&s, &o);
    ch_error e;
    double t0 = now_s();
    assert_int_equal(ch_connect(c, &e), CH_ERR);
    assert_true(now_s() - t0 < 4.0); /* a generous deadline */
    assert_int_equal(e.kind, CH_E_CONNECT);
    assert_non_null(strstr(e.message, "could not connect to ClickHouse at "
                                      "127.0.0.1:1"));
    ch_client_free(c);

    o.retries = 2;
    o.retry_backoff_ms = 50;
    c = ch_client_new(&s, &o);
    assert_int_equal(ch_connect(c, &e), CH_ERR);
    assert_int_equal(ch_client_stats(c).connect_retries, 2);
    ch_client_free(c);
}

/* ---- live: queries ------------------------------------------------------- */

static void test_query_types(void **state) {
    (void)state;
    ch_client *c = connected();
    ch_result *r = must_query(c,
        "SELECT toUInt64(18446744073709551615) AS umax, "
        "toInt64(-9223372036854775808) AS imin, "
        "toUInt64(9223372036854775807) AS ufit, toInt32(-7) AS i32, "
        "toFloat64(2.5) AS f, 'héllo' AS s, [1, 2, 3] AS arr, "
        "[toUInt64(18446744073709551615)] AS uarr, "
        "CAST(NULL AS Nullable(Int64)) AS n, "
        "CAST(5 AS Nullable(Int64)) AS nn");
    assert_int_equal(r->ncols, 10);
    assert_string_equal(r->columns[0].name, "umax");
    assert_string_equal(r->columns[0].type, "UInt64");
    assert_int_equal(ch_cell(r, 0, 0)->kind, CH_STRING);
    assert_string_equal(ch_cell(r, 0, 0)->u.s.ptr, "18446744073709551615");
    assert_int_equal(ch_cell(r, 0, 1)->kind, CH_INT);
    assert_true(ch_cell(r, 0, 1)->u.i == INT64_MIN);
    assert_true(ch_cell(r, 0, 2)->u.i == INT64_MAX);
    assert_int_equal(ch_cell(r, 0, 3)->u.i, -7);
    assert_int_equal(ch_cell(r, 0, 4)->kind, CH_FLOAT);
    assert_true(ch_cell(r, 0, 4)->u.f == 2.5);
    assert_string_equal(ch_cell(r, 0, 5)->u.s.ptr, "héllo");
    const ch_value *a = ch_cell(r, 0, 6);
    assert_int_equal(a->kind, CH_ARRAY);
    assert_int_equal(a->u.a.len, 3);
    assert_int_equal(a->u.a.items[2].u.i, 3);
    assert_int_equal(ch_cell(r, 0, 7)->u.a.items[0].kind, CH_STRING);
    assert_int_equal(ch_cell(r, 0, 8)->kind, CH_NULL);
    assert_int_equal(ch_cell(r, 0, 9)->kind, CH_INT);
    assert_int_equal(ch_cell(r, 0, 9)->u.i, 5);
    assert_int_equal(strlen(r->query_id), 36);
    ch_result_free(r);

    r = must_query(c, "SELECT number FROM system.numbers LIMIT 3 FORMAT JSON");
    assert_int_equal(r->nrows, 3);
    assert_int_equal(ch_cell(r, 2, 0)->u.i, 2);
    ch_result_free(r);
    ch_client_free(c);
}

static void test_live_errors(void **state) {
    (void)state;
    ch_client *c = connected();
    ch_result *r = NULL;
    ch_error e;
    assert_int_equal(ch_query(c, "SELECT foo", NULL, &r, &e), CH_ERR);
    assert_int_equal(e.code, 47);
    assert_int_equal(e.http_status, 404);
    assert_non_null(strstr(e.message, "ClickHouse error 47"));
    assert_int_equal(ch_exec(c, "SELEC 1", NULL, &e), CH_ERR);
    assert_int_equal(e.code, 62);
    assert_int_equal(ch_query(c, "SELECT 1", &(ch_query_opts){
                                  .settings = "no_such_setting=1"},
                              &r, &e), CH_ERR);
    assert_int_equal(e.code, 115);
    /* the client still works after errors */
    r = must_query(c, "SELECT 1");
    ch_result_free(r);
    ch_client_free(c);
}

static void test_live_mid_stream_error(void **state) {
    (void)state;
    ch_client *c = connected();
    ch_query_opts o = {.stream = true, .settings = "max_block_size=10000"};
    ch_result *r = NULL;
    ch_error e;
    assert_int_equal(ch_query(c, "SELECT number, throwIf(number = 1000000) "
                              "FROM system.numbers LIMIT 2000000", &o, &r,
                              &e), CH_ERR);
    assert_null(r);
    assert_int_equal(e.code, 395);
    assert_int_equal(e.http_status, 200); /* it came after 200 OK */

    o.stream = false; /* wait_end_of_query=1: a real error status */
    assert_int_equal(ch_query(c, "SELECT number, throwIf(number = 1000000) "
                              "FROM system.numbers LIMIT 2000000", &o, &r,
                              &e), CH_ERR);
    assert_int_equal(e.code, 395);
    assert_int_equal(e.http_status, 500);
    ch_client_free(c);
}

static void test_insert_many(void **state) {
    (void)state;
    ch_client *c = connected();
    must_exec(c, "DROP TABLE IF EXISTS netra_t_many");
    must_exec(c, "CREATE TABLE netra_t_many (id UInt64, name String, "
                 "v Nullable(Float64)) ENGINE = MergeTree ORDER BY id");
    ch_rows *rows = ch_rows_new();
    char name[32];
    for (int i = 0; i < 10000; i++) {
        snprintf(name, sizeof name, "n%d", i);
        ch_rows_uint(rows, (uint64_t)i);
        ch_rows_str(rows, name, strlen(name));
        if (i % 2)
            ch_rows_null(rows);
        else
            ch_rows_double(rows, i / 4.0);
        ch_rows_end(rows);
    }
    const char *cols[] = {"id", "name", "v"};
    ch_error e;
    if (ch_insert(c, "netra_t_many", cols, 3, rows, NULL, &e) != CH_OK)
        fail_msg("insert: %s", e.message);
    ch_rows_free(rows);
    ch_result *r = must_query(c, "SELECT count() AS n, countIf(v IS NULL) "
                                 "AS nulls, sum(id) AS s FROM netra_t_many");
    assert_int_equal(ch_cell(r, 0, 0)->u.i, 10000);
    assert_int_equal(ch_cell(r, 0, 1)->u.i, 5000);
    assert_int_equal(ch_cell(r, 0, 2)->u.i, 49995000);
    ch_result_free(r);
    must_exec(c, "DROP TABLE netra_t_many");
    ch_client_free(c);
}

#define S(x) x, sizeof(x) - 1

static const struct {
    const char *s;
    size_t len;
} hostile[] = {
    {S("it's")},
    {S("back\\slash")},
    {S("trailing\\")},
    {S("line\nbreak\r\n")},
    {S("tab\there")},
    {S("nul\0inside")},
    {S("\\N")},
    {S("quote\\'); DROP TABLE x; --")},
    {S("x' OR 1=1 --")},
    {S("unicode ☃ 𝄞 é")},
    {S("")},
};

#define NHOSTILE (sizeof hostile / sizeof *hostile)

static void test_hostile_strings(void **state) {
    (void)state;
    ch_client *c = connected();
    /* via a literal in SQL */
    for (size_t i = 0; i < NHOSTILE; i++) {
        char *q = ch_quote(hostile[i].s, hostile[i].len);
        char sql[256];
        snprintf(sql, sizeof sql, "SELECT %s AS s, length(%s) AS n", q, q);
        free(q);
        ch_result *r = must_query(c, sql);
        const ch_value *v = ch_cell(r, 0, 0);
        assert_int_equal(v->kind, CH_STRING);
        assert_int_equal(v->u.s.len, hostile[i].len);
        assert_memory_equal(v->u.s.ptr, hostile[i].s, hostile[i].len);
        assert_int_equal(ch_cell(r, 0, 1)->u.i, (int64_t)hostile[i].len);
        ch_result_free(r);
    }

    /* via an insert, and back */
    must_exec(c, "DROP TABLE IF EXISTS netra_t_hostile");
    must_exec(c, "CREATE TABLE netra_t_hostile (i UInt32, s String) "
                 "ENGINE = MergeTree ORDER BY i");
    ch_rows *rows = ch_rows_new();
    for (size_t i = 0; i < NHOSTILE; i++) {
        ch_rows_int(rows, (int64_t)i);
        ch_rows_str(rows, hostile[i].s, hostile[i].len);
        ch_rows_end(rows);
    }
    const char *cols[] = {"i", "s"};
    ch_error e;
    if (ch_insert(c, "netra_t_hostile", cols, 2, rows, NULL, &e) != CH_OK)
        fail_msg("insert: %s", e.message);
    ch_rows_free(rows);
    ch_result *r = must_query(c, "SELECT i, s FROM netra_t_hostile "
                                 "ORDER BY i");
    assert_int_equal(r->nrows, NHOSTILE);
    for (size_t i = 0; i < NHOSTILE; i++) {
        const ch_value *v = ch_cell(r, i, 1);
        assert_int_equal(v->u.s.len, hostile[i].len);
        assert_memory_equal(v->u.s.ptr, hostile[i].s, hostile[i].len);
    }
    ch_result_free(r);

    /* an injection attempt stays a value: it matches nothing */
    char *q = ch_quote("x' OR 1=1 --", 12);
    char sql[256];
    snprintf(sql, sizeof sql, "SELECT count() AS n FROM netra_t_hostile "
             "WHERE s = 'nothing' AND s = %s", q);
    free(q);
    r = must_query(c, sql);
    assert_int_equal(ch_cell(r, 0, 0)->u.i, 0);
    ch_result_free(r);
    q = ch_quote("nope' OR '1'='1", 15);
    snprintf(sql, sizeof sql, "SELECT count() AS n FROM netra_t_hostile "
             "WHERE s = %s", q);
    free(q);
    r = must_query(c, sql);
    assert_int_equal(ch_cell(r, 0, 0)->u.i, 0);
    ch_result_free(r);

    /* a hostile identifier is one name, not SQL */
    char *id = ch_ident("s` FROM system.one --", 21);
    snprintf(sql, sizeof sql, "SELECT %s FROM netra_t_hostile", id);
    free(id);
    assert_int_equal(ch_query(c, sql, NULL, &r, &e), CH_ERR);
    assert_int_equal(e.code, 47);
    must_exec(c, "DROP TABLE netra_t_hostile");
    ch_client_free(c);
}

/* ---- live: kill, keep-alive, concurrency ----------------------------------- */

static void test_kill(void **state) {
    (void)state;
    ch_client *runner = connected();
    ch_client *killer = connected();
    CURLM *multi = curl_multi_init();
    ch_query_opts o = {.query_id = "netra-kill-test-1"};
    ch_error e;
    ch_request *r = ch_request_query(runner, "SELECT sleep(3)", &o, &e);
    assert_non_null(r);
    assert_string_equal(ch_request_query_id(r), "netra-kill-test-1");
    assert_int_equal(ch_request_start(r, multi, &e), CH_OK);

    /* wait until the server runs it, then kill it */
    int killed = 0, running = 0;
    double t0 = now_s();
    while (killed == 0 && now_s() - t0 < 10) {
        curl_multi_perform(multi, &running);
        assert_int_equal(ch_kill(killer, "netra-kill-test-1", &killed, &e),
                         CH_OK);
        if (!killed)
            usleep(50000);
    }
    assert_int_equal(killed, 1);

    int rc = CH_AGAIN;
    while (rc == CH_AGAIN && now_s() - t0 < 30) {
        curl_multi_perform(multi, &running);
        CURLMsg *m;
        int left;
        while ((m = curl_multi_info_read(multi, &left)))
            if (m->msg == CURLMSG_DONE)
                rc = ch_request_finish(ch_request_of(m->easy_handle),
                                       m->data.result, &e);
        if (rc == CH_AGAIN)
            curl_multi_poll(multi, NULL, 0, 100, NULL);
    }
    assert_int_equal(rc, CH_ERR);
    assert_int_equal(e.code, 394); /* QUERY_WAS_CANCELLED */
    ch_request_free(r);
    curl_multi_cleanup(multi);
    assert_int_equal(ch_kill(killer, "netra-no-such-query", &killed, &e),
                     CH_OK);
    assert_int_equal(killed, 0);
    ch_client_free(runner);
    ch_client_free(killer);
}

static void test_keepalive_idle(void **state) {
    (void)state;
    /* default: sockets idle past max_idle_ms are not reused */
    ch_client *c = connected();
    ch_error e;
    assert_int_equal(ch_ping(c, &e), CH_OK);
    sleep(4); /* the server closes idle sockets after 3 s */
    ch_result *r = must_query(c, "SELECT 1 AS one");
    assert_int_equal(ch_cell(r, 0, 0)->u.i, 1);
    ch_result_free(r);
    ch_client_free(c);

    /* a client that keeps sockets long: still fine (dead socket is
     * detected or the request retried once) */
    ch_options o = {.max_idle_ms = 60000, .timeout_ms = 10000};
    c = client_as("default", "", &o);
    assert_int_equal(ch_connect(c, &e), CH_OK);
    sleep(4);
    r = must_query(c, "SELECT 2 AS two");
    assert_int_equal(ch_cell(r, 0, 0)->u.i, 2);
    ch_result_free(r);
    ch_client_free(c);
}

static void test_multi_concurrent(void **state) {
    (void)state;
    ch_client *c = connected();
    CURLM *multi = curl_multi_init();
    ch_error e;
    ch_request *slow = ch_request_query(c, "SELECT sleep(1) AS z", NULL, &e);
    ch_request *fast = ch_request_query(c, "SELECT 42 AS x", NULL, &e);
    assert_non_null(slow);
    assert_non_null(fast);
    assert_int_equal(ch_request_start(slow, multi, &e), CH_OK);
    assert_int_equal(ch_request_start(fast, multi, &e), CH_OK);

    ch_request *order[2] = {NULL, NULL};
    int done = 0, running = 0;
    double t0 = now_s();
    while (done < 2 && now_s() - t0 < 30) {
        curl_multi_perform(multi, &running);
        CURLMsg *m;
        int left;
        while ((m = curl_multi_info_read(multi, &left))) {
            if (m->msg != CURLMSG_DONE)
                continue;
            ch_request *r = ch_request_of(m->easy_handle);
            int rc = ch_request_finish(r, m->data.result, &e);
            if (rc == CH_AGAIN)
                continue;
            if (rc != CH_OK)
                fail_msg("request: %s", e.message);
            order[done++] = r;
        }
        curl_multi_poll(multi, NULL, 0, 100, NULL);
    }
    assert_int_equal(done, 2);
    assert_ptr_equal(order[0], fast);
    assert_ptr_equal(order[1], slow);
    ch_result *fr = ch_request_take_result(fast);
    assert_int_equal(ch_cell(fr, 0, 0)->u.i, 42);
    ch_result_free(fr);
    ch_request_free(slow);
    ch_request_free(fast);
    curl_multi_cleanup(multi);
    ch_client_free(c);
}

/* ---- Lua binding ------------------------------------------------------------ */

static lua_State *lua_with_ch(void) {
    lua_State *L = luaL_newstate();
    luaL_openlibs(L);
    bind_clickhouse(L);
    lua_setglobal(L, "ch");
    lua_pushfstring(L, "%s:%d", g_host, g_port);
    lua_setglobal(L, "ADDR");
    lua_pushstring(L, g_host);
    lua_setglobal(L, "HOST");
    lua_pushinteger(L, g_port);
    lua_setglobal(L, "PORT");
    lua_pushstring(L, g_password);
    lua_setglobal(L, "PASSWORD");
    return L;
}

static void run_lua(lua_State *L, const char *chunk) {
    if (luaL_loadstring(L, chunk) != LUA_OK || lua_pcall(L, 0, 0, 0) != LUA_OK)
        fail_msg("lua: %s", lua_tostring(L, -1));
}

static void test_lua_binding(void **state) {
    (void)state;
    lua_State *L = lua_with_ch();
    run_lua(L,
        "local c, w = ch.connect{host = HOST, port = PORT}\n"
        "assert(c, w)\n"
        "assert(c:ping() == true)\n"
        "assert(c:version():match('^18%.16'))\n"
        "assert(#c:timezone() > 0)\n"
        "local rows, meta = c:query([[SELECT toUInt64(18446744073709551615)"
        " AS u, toInt64(-9223372036854775808) AS i, 1.5 AS f, 'x' AS s,"
        " [1,2] AS a, CAST(NULL AS Nullable(Int8)) AS n]])\n"
        "assert(#rows == 1, 'one row')\n"
        "local r = rows[1]\n"
        "assert(r.u == '18446744073709551615', 'UInt64 max is a string')\n"
        "assert(math.type(r.i) == 'integer' and r.i == math.mininteger)\n"
        "assert(r.f == 1.5 and r.s == 'x' and r.a[2] == 2 and r.n == nil)\n"
        "assert(meta.columns[1].name == 'u' and meta.columns[1].type =="
        " 'UInt64')\n"
        "assert(#meta.query_id == 36)\n"
        "assert(ch.quote([[a'b\\]]) == [['a\\'b\\\\']])\n"
        "assert(ch.ident('we`ird') == '`we\\\\`ird`')\n"
        "assert(c:exec('DROP TABLE IF EXISTS netra_t_lua'))\n"
        "assert(c:exec([[CREATE TABLE netra_t_lua (id UInt32, s String,"
        " n Nullable(Int64), tags Array(String)) ENGINE = MergeTree"
        " ORDER BY id]]))\n"
        "local data = {}\n"
        "for i = 1, 10000 do data[i] = {i, 'v' .. i, i % 2 == 0 and i or nil,"
        " {'a', \"b'c\"}} end\n"
        "data[10001] = {id = 0, s = 'keyed\\n\\0', tags = {}}\n"
        "local n, err = c:insert('netra_t_lua', {'id', 's', 'n', 'tags'},"
        " data)\n"
        "assert(n == 10001, err)\n"
        "rows = c:query('SELECT count() AS c, countIf(n IS NULL) AS nulls"
        " FROM netra_t_lua')\n"
        "assert(rows[1].c == 10001 and rows[1].nulls == 5001)\n"
        "rows = c:query('SELECT s, tags FROM netra_t_lua WHERE id = 0')\n"
        "assert(rows[1].s == 'keyed\\n\\0' and #rows[1].tags == 0)\n"
        "rows = c:query('SELECT tags FROM netra_t_lua WHERE id = 7')\n"
        "assert(rows[1].tags[2] == \"b'c\")\n"
        "local q = ch.quote(\"x' OR 1=1 --\")\n"
        "rows = c:query('SELECT count() AS c FROM netra_t_lua WHERE s = ' .."
        " q)\n"
        "assert(rows[1].c == 0)\n"
        "local none, msg, code = c:query('SELECT nope')\n"
        "assert(none == nil and code == 47 and msg:find('ClickHouse error"
        " 47', 1, true), msg)\n"
        "assert(c:exec('DROP TABLE netra_t_lua'))\n"
        "c:close()\n"
        "local nothing, why = c:query('SELECT 1')\n"
        "assert(nothing == nil and why == 'Not connected to ClickHouse.')\n"
        "nothing, why = c:ping()\n"
        "assert(why == 'Not connected to ClickHouse.')\n"
        "assert(select(2, c:version()) == 'Not connected to ClickHouse.')\n");

    run_lua(L,
        "local c, w = ch.connect{CLICKHOUSE_URL = 'http://netra_test:' .."
        " PASSWORD .. '@' .. ADDR .. '/default', CLICKHOUSE_HOST = 'x'}\n"
        "assert(c, w)\n"
        "assert(w:find('CLICKHOUSE_HOST', 1, true), 'URL wins with a"
        " warning')\n"
        "assert(not w:find(PASSWORD, 1, true))\n"
        "local me = c:query([[SELECT user FROM system.processes WHERE"
        " query_id = 'netra-whoami-lua']], {query_id = 'netra-whoami-lua'})\n"
        "assert(me[1].user == 'netra_test')\n"
        "local bad, msg, code = ch.connect{host = HOST, port = PORT,"
        " user = 'netra_test', password = 'wrong'}\n"
        "assert(bad == nil and code == 193, msg)\n"
        "local s = ch.settings{CLICKHOUSE_HOST = 'h', CLICKHOUSE_SECURE ="
        " true}\n"
        "assert(s.port == 8443 and s.secure and s.password == nil)\n"
        "assert(ch.missing{}[1] == 'CLICKHOUSE_URL')\n"
        "assert(#ch.missing{CLICKHOUSE_HOST = 'h'} == 0)\n"
        "local none, why = ch.connect{}\n"
        "assert(none == nil and why:find('CLICKHOUSE_URL', 1, true))\n"
        "local r, m = ch.connect{host = '127.0.0.1', port = 1,"
        " connect_timeout_ms = 500}\n"
        "assert(r == nil and m:find('could not connect', 1, true), m)\n");
    lua_close(L);
}

int main(void) {
    read_server();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_settings_url),
        cmocka_unit_test(test_settings_keys_and_conflict),
        cmocka_unit_test(test_settings_missing),
        cmocka_unit_test(test_escaping),
        cmocka_unit_test(test_error_formats),
        cmocka_unit_test(test_error_mid_stream_recorded),
        cmocka_unit_test(test_result_parse_recorded),
        cmocka_unit_test(test_not_connected),
        cmocka_unit_test(test_connect_version),
        cmocka_unit_test(test_auth),
        cmocka_unit_test(test_connect_refused_fast),
        cmocka_unit_test(test_query_types),
        cmocka_unit_test(test_live_errors),
        cmocka_unit_test(test_live_mid_stream_error),
        cmocka_unit_test(test_insert_many),
        cmocka_unit_test(test_hostile_strings),
        cmocka_unit_test(test_kill),
        cmocka_unit_test(test_keepalive_idle),
        cmocka_unit_test(test_multi_concurrent),
        cmocka_unit_test(test_lua_binding),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
