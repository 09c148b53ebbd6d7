/* Tests for schema: the JSON Schema Test Suite (draft 2020-12) from
 * $NETRA_SHARED_DIR, then error messages, limits and threads. */
#include <dirent.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cmocka.h>

#include "json.h"
#include "schema.h"

/* ---- helpers ---- */

static cJSON *js(const char *text) {
    json_error err;
    cJSON *v = json_parse(text, strlen(text), 0, &err);

    if (v == NULL) fail_msg("bad JSON in the test: %s: %s", text, err.message);
    return v;
}

static schema_t *compile_text(const char *text, char *err, size_t n) {
    cJSON *doc = js(text);
    schema_t *s = schema_compile(doc, err, n);

    cJSON_Delete(doc); /* the schema keeps its own copy */
    return s;
}

static schema_t *must_compile(const char *text) {
    char err[256];
    schema_t *s = compile_text(text, err, sizeof err);

    if (s == NULL) fail_msg("schema %s refused: %s", text, err);
    return s;
}

static void compile_fails(const char *text, const char *message) {
    char err[256] = "";
    schema_t *s = compile_text(text, err, sizeof err);

    if (s != NULL || strcmp(err, message) != 0)
        fail_msg("schema %s: wanted \"%s\", got \"%s\"", text, message, err);
    schema_free(s);
}

/* Validates instance text; returns the result and leaves the message. */
static bool check(const schema_t *s, const char *instance, char *err,
                  size_t n) {
    cJSON *x = js(instance);
    bool ok = schema_validate(s, x, "arguments", err, n);

    cJSON_Delete(x);
    return ok;
}

static void invalid_with(const char *schema, const char *instance,
                         const char *message) {
    schema_t *s = must_compile(schema);
    char err[256] = "";

    if (check(s, instance, err, sizeof err))
        fail_msg("%s accepted %s", schema, instance);
    if (strcmp(err, message) != 0)
        fail_msg("%s / %s: wanted \"%s\", got \"%s\"", schema, instance,
                 message, err);
    schema_free(s);
}

static void valid(const char *schema, const char *instance) {
    schema_t *s = must_compile(schema);
    char err[256] = "";

    if (!check(s, instance, err, sizeof err))
        fail_msg("%s refused %s: %s", schema, instance, err);
    schema_free(s);
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

/* ---- the suite ---- */

static char *read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    char *buf = NULL;
    long n;

    if (f == NULL) return NULL;
    if (fseek(f, 0, SEEK_END) == 0 && (n = ftell(f)) >= 0 &&
        fseek(f, 0, SEEK_SET) == 0 && (buf = malloc((size_t)n + 1)) != NULL) {
        *len = fread(buf, 1, (size_t)n, f);
        buf[*len] = '\0';
    }
    fclose(f);
    return buf;
}

static int cmp_names(const void *a, const void *b) {
    return strcmp(*(char *const *)a, *(char *const *)b);
}

typedef struct {
    int passed, skipped, failed;
    char reasons[64][96];
    int reason_count[64];
    int nreasons;
} tally;

static void count_reason(tally *t, const char *err) {
    char reason[96];

    /* "unsupported keyword \"x\" at path" -> up to " at ". */
    snprintf(reason, sizeof reason, "%s", err);
    char *at = strstr(reason, " at ");
    if (at != NULL) *at = '\0';
    if (strncmp(reason, "unsupported $ref", 16) == 0)
        snprintf(reason, sizeof reason, "unsupported $ref form");
    if (strncmp(reason, "unsupported $schema", 19) == 0)
        snprintf(reason, sizeof reason, "unsupported $schema (metaschema)");
    for (int i = 0; i < t->nreasons; i++) {
        if (strcmp(t->reasons[i], reason) == 0) {
            t->reason_count[i]++;
            return;
        }
    }
    if (t->nreasons < 64) {
        snprintf(t->reasons[t->nreasons], sizeof t->reasons[0], "%s", reason);
        t->reason_count[t->nreasons++] = 1;
    }
}

/* Is a compile error an honest "unsupported"? The keyword it names must
 * really be a key in the group's schema, and not one we claim to do. */
static bool honest_skip(const cJSON *schema, const char *err) {
    static const char *const supported[] = {
        "type",
        "properties",
        "required",
        "additionalProperties",
        "items",
        "prefixItems",
        "enum",
        "const",
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "exclusiveMaximum",
        "multipleOf",
        "minLength",
        "maxLength",
        "pattern",
        "minItems",
        "maxItems",
        "uniqueItems",
        "minProperties",
        "maxProperties",
        "anyOf",
        "oneOf",
        "allOf",
        "not",
        "$defs",
        "definitions",
        "title",
        "description",
        "default",
        "examples",
        "deprecated",
        "readOnly",
        "writeOnly",
        "$comment",
        "$schema",
        "format",
        "contentMediaType",
        "contentEncoding",
    };
    const char *prefix = "unsupported keyword \"";
    const char *meta = "https://json-schema.org/draft/2020-12/schema";

    if (strncmp(err, "unsupported $schema \"", 21) == 0)
        return strncmp(err + 21, meta, strlen(meta)) != 0;

    if (strncmp(err, "unsupported $ref \"", 18) == 0) {
        /* Remote, relative or anchor refs: never starting "#/" or "#\"". */
        return !(err[18] == '#' && (err[19] == '/' || err[19] == '"'));
    }
    if (strncmp(err, prefix, strlen(prefix)) != 0) return false;

    char kw[64];
    const char *start = err + strlen(prefix), *end = strchr(start, '"');
    if (end == NULL || (size_t)(end - start) >= sizeof kw) return false;
    memcpy(kw, start, (size_t)(end - start));
    kw[end - start] = '\0';
    for (size_t i = 0; i < sizeof supported / sizeof *supported; i++)
        if (strcmp(kw, supported[i]) == 0) return false;

    char quoted[80];
    snprintf(quoted, sizeof quoted, "\"%s\":", kw);
    char *text = cJSON_PrintUnformatted(schema);
    bool there = text != NULL && strstr(text, quoted) != NULL;
    cJSON_free(text);
    return there;
}

static void run_group(const char *file, const cJSON *group, tally *t) {
    const char *gdesc =
        cJSON_GetStringValue(cJSON_GetObjectItem(group, "description"));
    const cJSON *schema_json = cJSON_GetObjectItem(group, "schema");
    char err[512] = "";
    schema_t *s = schema_compile(schema_json, err, sizeof err);

    if (s == NULL) {
        if (strncmp(err, "unsupported ", 12) == 0 &&
            honest_skip(schema_json, err)) {
            t->skipped++;
            count_reason(t, err);
            return;
        }
        t->failed++;
        print_error("FAIL %s / %s: schema refused: %s\n", file, gdesc, err);
        return;
    }

    bool group_ok = true;
    const cJSON *test;
    cJSON_ArrayForEach(test, cJSON_GetObjectItem(group, "tests")) {
        const char *tdesc =
            cJSON_GetStringValue(cJSON_GetObjectItem(test, "description"));
        bool want = cJSON_IsTrue(cJSON_GetObjectItem(test, "valid"));
        err[0] = '\0';
        bool got = schema_validate(s, cJSON_GetObjectItem(test, "data"), "data",
                                   err, sizeof err);
        if (got != want) {
            group_ok = false;
            print_error("FAIL %s / %s / %s: wanted %s, got %s (%s)\n", file,
                        gdesc, tdesc, want ? "valid" : "invalid",
                        got ? "valid" : "invalid", err);
        }
    }
    if (group_ok)
        t->passed++;
    else
        t->failed++;
    schema_free(s);
}

static void test_json_schema_suite(void **state) {
    const char *shared = getenv("NETRA_SHARED_DIR");
    char dir[1024];

    snprintf(dir, sizeof dir, "%s/data/json-schema-test-suite/draft2020-12",
             shared ? shared : "../shared");
    DIR *d = opendir(dir);
    if (d == NULL) {
        print_message("schema suite: %s is absent; skipped\n", dir);
        skip();
    }

    char *names[256];
    int nnames = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL && nnames < 256) {
        size_t n = strlen(e->d_name);
        if (n > 5 && strcmp(e->d_name + n - 5, ".json") == 0)
            names[nnames++] = strdup(e->d_name);
    }
    closedir(d);
    qsort(names, (size_t)nnames, sizeof *names, cmp_names);
    assert_true(nnames > 30);

    tally *t = calloc(1, sizeof *t);
    for (int i = 0; i < nnames; i++) {
        char path[1400];
        size_t len = 0;
        snprintf(path, sizeof path, "%s/%s", dir, names[i]);
        char *text = read_file(path, &len);
        assert_non_null(text);
        /* Trusted test data, read with cJSON itself: some groups hold
         * "\u0000", which the front door (json_parse) refuses. */
        cJSON *groups = cJSON_ParseWithLength(text, len);
        if (groups == NULL) fail_msg("%s does not parse", path);
        const cJSON *group;
        cJSON_ArrayForEach(group, groups) run_group(names[i], group, t);
        cJSON_Delete(groups);
        free(text);
        free(names[i]);
    }

    print_message("schema suite: %d groups passed, %d skipped (unsupported "
                  "keywords), %d failed\n",
                  t->passed, t->skipped, t->failed);
    for (int i = 0; i < t->nreasons; i++)
        print_message("  skipped %3d: %s\n", t->reason_count[i], t->reasons[i]);
    int failed = t->failed, passed = t->passed;
    free(t);
    assert_int_equal(failed, 0);
    /* Most of the suite must run, not just be skipped. */
    assert_true(passed >= 180);
}

/* ---- compile errors ---- */

static void test_compile_errors_name_the_place(void **state) {
    compile_fails("{\"properties\":{\"x\":{\"$dynamicRef\":\"#a\"}}}",
                  "unsupported keyword \"$dynamicRef\" at properties.x");
    compile_fails("{\"if\":true}",
                  "unsupported keyword \"if\" at the schema root");
    compile_fails("{\"items\":{\"anyOf\":[{\"type\":\"string\"},"
                  "{\"patternProperties\":{}}]}}",
                  "unsupported keyword \"patternProperties\" at "
                  "items.anyOf[1]");
    compile_fails("{\"type\":\"strng\"}",
                  "unknown type \"strng\" at the schema root");
    compile_fails("{\"properties\":{\"a\":{\"minLength\":-1}}}",
                  "minLength must be a non-negative integer at "
                  "properties.a");
    compile_fails("{\"items\":[{\"type\":\"string\"}]}",
                  "items must be a schema (an array of schemas is "
                  "prefixItems in draft 2020-12) at the schema root");
    compile_fails("{\"properties\":{\"a\":3}}",
                  "a schema must be an object or a boolean at properties.a");
    compile_fails("{\"multipleOf\":0}",
                  "multipleOf must be above 0 at the schema root");
    compile_fails("{\"anyOf\":[]}",
                  "anyOf must be a non-empty array of schemas at the schema "
                  "root");
    compile_fails("{\"properties\":{\"p\":{\"$id\":\"x\"}}}",
                  "unsupported keyword \"$id\" below the root (only a root "
                  "$id is accepted) at properties.p");
}

static void test_compile_errors_for_patterns_and_refs(void **state) {
    char err[256];
    schema_t *s = compile_text("{\"properties\":{\"id\":{\"pattern\":"
                               "\"^(ab\"}}}",
                               err, sizeof err);

    assert_null(s);
    /* PCRE2's own words for it. */
    assert_non_null(strstr(err, "missing closing parenthesis"));
    assert_non_null(strstr(err, "at properties.id.pattern"));
    assert_int_equal(strncmp(err, "bad pattern \"^(ab\"", 17), 0);

    compile_fails("{\"$ref\":\"#/$defs/nope\"}",
                  "$ref \"#/$defs/nope\" points to nothing in this schema "
                  "at $ref");
    compile_fails("{\"properties\":{\"a\":{\"$ref\":\"other.json#/x\"}}}",
                  "unsupported $ref \"other.json#/x\": only local "
                  "references starting with '#' are supported at "
                  "properties.a.$ref");
    compile_fails("{\"$ref\":\"#foo\"}",
                  "unsupported $ref \"#foo\": anchors are not supported at "
                  "$ref");
    compile_fails("{\"$defs\":{\"a\":{\"unevaluatedProperties\":false}}}",
                  "unsupported keyword \"unevaluatedProperties\" at "
                  "$defs.a");

    /* What is accepted: annotations, a root $id, definitions. */
    schema_free(must_compile(
        "{\"$schema\":\"https://json-schema.org/draft/2020-12/schema\","
        "\"$id\":\"https://example.com/s\",\"title\":\"t\","
        "\"description\":\"d\",\"default\":1,\"examples\":[1],"
        "\"deprecated\":false,\"readOnly\":true,\"writeOnly\":false,"
        "\"$comment\":\"c\",\"format\":\"email\","
        "\"contentMediaType\":\"text/plain\",\"contentEncoding\":\"base64\","
        "\"definitions\":{\"a\":{\"type\":\"string\"}},"
        "\"$ref\":\"#/definitions/a\"}"));
}

/* ---- validation messages ---- */

static void test_validation_messages_name_the_path(void **state) {
    const char *tool = "{\"type\":\"object\",\"properties\":{\"items\":"
                       "{\"type\":\"array\",\"items\":{\"type\":\"object\","
                       "\"properties\":{\"name\":{\"type\":\"string\"}},"
                       "\"required\":[\"name\"]}}},"
                       "\"additionalProperties\":false}";

    invalid_with(tool,
                 "{\"items\":[{\"name\":\"a\"},{\"name\":\"b\"},"
                 "{\"name\":3}]}",
                 "arguments.items[2].name: expected string");
    invalid_with(tool, "{\"items\":[{}]}",
                 "arguments.items[0]: missing required property \"name\"");
    invalid_with(tool, "{\"other\":1}",
                 "arguments.other: property not allowed");
    invalid_with(tool, "[]", "arguments: expected object");
    valid(tool, "{\"items\":[{\"name\":\"x\",\"extra\":1}]}");

    invalid_with("{\"properties\":{\"a b\":{\"properties\":{\"q\\\"\":"
                 "{\"type\":[\"integer\",\"null\"]}}}}}",
                 "{\"a b\":{\"q\\\"\":1.5}}",
                 "arguments[\"a b\"][\"q\\\"\"]: expected null or integer");
    invalid_with("{\"type\":[\"string\",\"number\",\"boolean\"]}", "{}",
                 "arguments: expected boolean, number, or string");
    invalid_with("{\"enum\":[1,\"a\"]}", "2",
                 "arguments: not one of the values allowed by enum");
    invalid_with("{\"const\":{\"a\":[1]}}", "{\"a\":[2]}",
                 "arguments: not equal to the const value");
    invalid_with("{\"minimum\":5}", "4.5", "arguments: must be >= 5");
    invalid_with("{\"exclusiveMaximum\":0.5}", "0.5",
                 "arguments: must be < 0.5");
    invalid_with("{\"multipleOf\":0.01}", "0.015",
                 "arguments: must be a multiple of 0.01");
    invalid_with("{\"maxLength\":4}", "\"h\xc3\xa9llo\"",
                 "arguments: must be at most 4 characters long");
    invalid_with("{\"pattern\":\"^[a-z]+$\"}", "\"abc1\"",
                 "arguments: does not match pattern \"^[a-z]+$\"");
    invalid_with("{\"uniqueItems\":true}", "[1,{\"a\":1},2,{\"a\":1.0}]",
                 "arguments: items [1] and [3] are equal (items must be "
                 "unique)");
    invalid_with("{\"prefixItems\":[{\"type\":\"string\"}],\"items\":false}",
                 "[\"a\",2]", "arguments[1]: no value is allowed here");
    invalid_with("{\"anyOf\":[{\"type\":\"string\"},{\"minimum\":3}]}", "2",
                 "arguments: matches none of the schemas in anyOf");
    invalid_with("{\"oneOf\":[{\"type\":\"integer\"},{\"minimum\":0}]}", "1",
                 "arguments: matches more than one schema in oneOf "
                 "(oneOf[0] and another)");
    invalid_with("{\"not\":{\"type\":\"null\"}}", "null",
                 "arguments: must not match the schema in not");
    invalid_with("{\"minProperties\":2}", "{\"a\":1}",
                 "arguments: must have at least 2 properties");

    /* A NULL root name reads "instance". */
    schema_t *s = must_compile("{\"type\":\"string\"}");
    char err[64];
    cJSON *x = js("1");
    assert_false(schema_validate(s, x, NULL, err, sizeof err));
    assert_string_equal(err, "instance: expected string");
    /* A small buffer is truncated, never overrun. */
    char tiny[8];
    assert_false(schema_validate(s, x, "arguments", tiny, sizeof tiny));
    assert_string_equal(tiny, "argumen");
    cJSON_Delete(x);
    schema_free(s);
}

static void test_numbers(void **state) {
    valid("{\"type\":\"integer\"}", "1.0");
    valid("{\"type\":\"integer\"}", "-9007199254740993");
    invalid_with("{\"type\":\"integer\"}", "1.5",
                 "arguments: expected integer");
    valid("{\"multipleOf\":0.1}", "0.3");
    valid("{\"multipleOf\":0.0001}", "0.0075");
    valid("{\"multipleOf\":1e-8}", "12391239123");
    valid("{\"multipleOf\":3}", "-9");
    invalid_with("{\"multipleOf\":3}", "10",
                 "arguments: must be a multiple of 3");
    invalid_with("{\"multipleOf\":0.123456789}", "1e308",
                 "arguments: must be a multiple of 0.123456789");
    valid("{\"const\":1}", "1.0");
    valid("{\"enum\":[[0]]}", "[0.0]");
    invalid_with("{\"enum\":[false]}", "0",
                 "arguments: not one of the values allowed by enum");
}

/* ---- limits ---- */

static void test_catastrophic_pattern_returns_promptly(void **state) {
    schema_t *s = must_compile("{\"pattern\":\"^(a+)+$\"}");
    char text[80], err[256];

    /* 60 a's then b: about 2^60 backtracking paths. */
    text[0] = '"';
    memset(text + 1, 'a', 60);
    strcpy(text + 61, "b\"");
    double t0 = now();
    bool ok = check(s, text, err, sizeof err);
    double took = now() - t0;

    assert_false(ok);
    print_message("catastrophic pattern: %s (%.3f s)\n", err, took);
    assert_non_null(strstr(err, "arguments: "));
    schema_free(s);

    /* A pattern PCRE2 cannot shortcut: it must give up at the limit. */
    s = must_compile("{\"pattern\":\"^(\\\\w+\\\\s?)*$\"}");
    char text2[200];
    text2[0] = '"';
    for (int i = 0; i < 100; i++)
        text2[1 + i] = (char)('a' + i % 3);
    strcpy(text2 + 101, "!\"");
    assert_false(check(s, text2, err, sizeof err));
    assert_string_equal(err, "arguments: pattern \"^(\\w+\\s?)*$\" gave up "
                             "on this string (match limit reached)");

    /* The limit is fatal: wrapping the pattern in `not` does not turn the
     * failure into a pass. */
    schema_free(s);
    s = must_compile("{\"not\":{\"pattern\":\"^(\\\\w+\\\\s?)*$\"}}");
    assert_false(check(s, text2, err, sizeof err));
    assert_non_null(strstr(err, "match limit reached"));
    schema_free(s);
}

static void test_ref_cycles_end(void **state) {
    char err[256];
    schema_t *s = must_compile("{\"$ref\":\"#\"}");

    assert_false(check(s, "1", err, sizeof err));
    assert_string_equal(err, "arguments: schema evaluation nested too "
                             "deeply (a $ref cycle, or a value nested too "
                             "deeply)");
    schema_free(s);

    s = must_compile("{\"$defs\":{\"a\":{\"allOf\":[{\"$ref\":\"#/$defs/b\"}]},"
                     "\"b\":{\"anyOf\":[{\"$ref\":\"#/$defs/a\"}]}},"
                     "\"not\":{\"$ref\":\"#/$defs/a\"}}");
    assert_false(check(s, "{}", err, sizeof err));
    assert_non_null(strstr(err, "nested too deeply"));
    schema_free(s);

    /* A recursive schema that consumes input is fine. */
    s = must_compile("{\"type\":\"object\",\"properties\":{\"child\":"
                     "{\"$ref\":\"#\"},\"v\":{\"type\":\"integer\"}}}");
    char deep[1024] = "", long_err[512];
    for (int i = 0; i < 40; i++)
        strcat(deep, "{\"child\":");
    strcat(deep, "{\"v\":\"x\"}");
    for (int i = 0; i < 40; i++)
        strcat(deep, "}");
    assert_false(check(s, deep, long_err, sizeof long_err));
    assert_int_equal(strncmp(long_err, "arguments.child.child.", 22), 0);
    assert_non_null(strstr(long_err, ".child.v: expected integer"));
    schema_free(s);
}

static void test_exponential_schema_is_bounded(void **state) {
    /* d0 -> two refs to d1 -> ... -> d39 = false: 2^40 paths. */
    char text[8192];
    size_t n = (size_t)sprintf(text, "{\"$defs\":{");
    for (int i = 0; i < 40; i++)
        n += (size_t)sprintf(text + n,
                             "\"d%d\":{\"anyOf\":[{\"$ref\":\"#/$defs/d%d\"},"
                             "{\"$ref\":\"#/$defs/d%d\"}]},",
                             i, i + 1, i + 1);
    sprintf(text + n, "\"d40\":false},\"$ref\":\"#/$defs/d0\"}");
    schema_t *s = must_compile(text);
    char err[256];
    double t0 = now();

    assert_false(check(s, "1", err, sizeof err));
    print_message("exponential schema: %s (%.3f s)\n", err, now() - t0);
    assert_non_null(strstr(err, "too much work"));
    schema_free(s);
}

/* ---- threads ---- */

typedef struct {
    const schema_t *s;
    cJSON *good, *bad;
    int wrong;
} worker;

static void *work(void *arg) {
    worker *w = arg;
    char err[256];

    for (int i = 0; i < 3000; i++) {
        if (!schema_validate(w->s, w->good, "arguments", err, sizeof err))
            w->wrong++;
        if (schema_validate(w->s, w->bad, "arguments", err, sizeof err) ||
            strcmp(err, "arguments.tags[1]: does not match pattern "
                        "\"^[a-z]+(-[a-z]+)*$\"") != 0)
            w->wrong++;
    }
    return NULL;
}

static void test_one_schema_from_four_threads(void **state) {
    schema_t *s = must_compile(
        "{\"type\":\"object\",\"required\":[\"tags\"],\"properties\":{"
        "\"tags\":{\"type\":\"array\",\"uniqueItems\":true,\"items\":"
        "{\"$ref\":\"#/$defs/tag\"}},\"n\":{\"type\":\"integer\"}},"
        "\"$defs\":{\"tag\":{\"type\":\"string\",\"maxLength\":20,"
        "\"pattern\":\"^[a-z]+(-[a-z]+)*$\"}}}");
    worker w[4];
    pthread_t th[4];

    for (int i = 0; i < 4; i++) {
        w[i] = (worker){s, js("{\"tags\":[\"a-b\",\"c\",\"d-e-f\"],\"n\":3}"),
                        js("{\"tags\":[\"ok\",\"Bad\"],\"n\":3}"), 0};
        assert_int_equal(pthread_create(&th[i], NULL, work, &w[i]), 0);
    }
    for (int i = 0; i < 4; i++) {
        pthread_join(th[i], NULL);
        assert_int_equal(w[i].wrong, 0);
        cJSON_Delete(w[i].good);
        cJSON_Delete(w[i].bad);
    }
    schema_free(s);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_json_schema_suite),
        cmocka_unit_test(test_compile_errors_name_the_place),
        cmocka_unit_test(test_compile_errors_for_patterns_and_refs),
        cmocka_unit_test(test_validation_messages_name_the_path),
        cmocka_unit_test(test_numbers),
        cmocka_unit_test(test_catastrophic_pattern_returns_promptly),
        cmocka_unit_test(test_ref_cycles_end),
        cmocka_unit_test(test_exponential_schema_is_bounded),
        cmocka_unit_test(test_one_schema_from_four_threads),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
