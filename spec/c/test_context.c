/* test_context: id rules, context making, generated ids, refcounting. */
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "context.h"

static char err[512];

static bool valid(const char *value) {
    err[0] = '\0';
    return ctx_validate_id("user_id", value, err, sizeof err);
}

/* Asserts value is refused and the message contains `part`. */
static void refused(const char *value, const char *part) {
    strcpy(err, "(unset)");
    if (ctx_validate_id("user_id", value, err, sizeof err))
        fail_msg("accepted: %s", value ? value : "(null)");
    if (!strstr(err, part)) fail_msg("message '%s' lacks '%s'", err, part);
    if (strncmp(err, "user_id: ", 9)) fail_msg("no field in '%s'", err);
}

static char *repeat(char c, size_t n) {
    char *s = malloc(n + 1);
    memset(s, c, n);
    s[n] = '\0';
    return s;
}

static void test_accepts_real_ids(void **state) {
    (void)state;
    const char *ok[] = {
        "alice",
        "u",
        "42",
        "default_user",
        "test_user_7",
        "user@example.com",
        "Jane Doe",
        "nonexistent",
        "nullable",
        "defaults",
        "mocked",
        "none-of-them",
        "registry.v2",
        "Zo\xC3\xAB",               /* Zoë */
        "\xE7\x94\xA8\xE6\x88\xB7", /* two CJK letters */
        "\xF0\x9F\x98\x80",         /* an emoji, 4 bytes */
        "a\xC2\xA0"
        "b", /* inner NBSP is fine */
        "auth0|5f7c8ec7c33c6c004bbafe82",
    };
    for (size_t i = 0; i < sizeof ok / sizeof *ok; i++)
        if (!valid(ok[i])) fail_msg("refused '%s': %s", ok[i], err);
}

static void test_length_bounds(void **state) {
    (void)state;
    char *max = repeat('a', CTX_ID_MAX);
    char *over = repeat('a', CTX_ID_MAX + 1);
    char *huge = repeat('a', 100000);

    assert_true(valid(max));
    refused(over, "longer than 256 bytes");
    refused(huge, "longer than 256 bytes");
    refused("", "empty - pass the authenticated user's id");
    refused(NULL, "missing - pass the authenticated user's id");

    /* 254 bytes plus a 3-byte character is 257: too long. */
    memcpy(over + 254, "\xE2\x82\xAC", 3);
    refused(over, "longer than");
    free(max);
    free(over);
    free(huge);
}

static void test_placeholders_refused(void **state) {
    (void)state;
    const char *words[] = {
        "none",     "null",        "undefined", "registry", "placeholder",
        "default",  "mock",        "NONE",      "Null",     "UNDEFINED",
        "Registry", "PlaceHolder", "DEFAULT",   "mOcK",
    };
    for (size_t i = 0; i < sizeof words / sizeof *words; i++) {
        refused(words[i], "placeholder value '");
        assert_non_null(strstr(err, words[i]));
    }

    assert_false(valid("default"));
    assert_string_equal(err, "user_id: placeholder value 'default' is not a "
                             "real id - pass the authenticated user's id");
}

static void test_edge_whitespace_refused(void **state) {
    (void)state;
    refused(" default", "whitespace at the start");
    refused("default ", "whitespace at the end");
    refused(" alice", "whitespace at the start");
    refused("alice ", "whitespace at the end");
    refused(" ", "whitespace at the start");
    refused("\xC2\xA0"
            "alice",
            "whitespace at the start");                    /* NBSP */
    refused("alice\xE3\x80\x80", "whitespace at the end"); /* U+3000 */
    refused("alice\xE2\x80\x83", "whitespace at the end"); /* em space */
}

static void test_controls_refused(void **state) {
    (void)state;
    refused("a\tb", "control character U+0009 at byte 1");
    refused("a\nb", "control character U+000A");
    refused("\x1b[31mred", "control character U+001B at byte 0");
    refused("a\x7f", "control character U+007F");
    refused("a\xC2\x80", "control character U+0080");
    refused("a\xC2\x85", "control character U+0085"); /* NEL */
    refused("a\xC2\x9F", "control character U+009F");
    refused("a\xE2\x80\x8B"
            "b",
            "invisible character U+200B");
    refused("a\xE2\x80\xAE"
            "b",
            "invisible character U+202E"); /* RLO */
    refused("a\xE2\x80\xA8"
            "b",
            "invisible character U+2028");
    refused("\xEF\xBB\xBF"
            "alice",
            "invisible character U+FEFF");

    /* Just outside the refused ranges. */
    assert_true(valid("a\xC2\xA1")); /* U+00A1 ¡ */
    assert_true(valid("a~"));
}

static void test_invalid_utf8_refused(void **state) {
    (void)state;
    refused("\x80", "invalid UTF-8 at byte 0");
    refused("ab\xFF", "invalid UTF-8 at byte 2");
    refused("\xC3\x28", "invalid UTF-8");             /* bad continuation */
    refused("\xC0\xAF", "invalid UTF-8");             /* overlong '/' */
    refused("\xE0\x80\xAF", "invalid UTF-8");         /* overlong */
    refused("\xF0\x80\x80\xAF", "invalid UTF-8");     /* overlong */
    refused("\xED\xA0\x80", "invalid UTF-8");         /* surrogate */
    refused("\xF4\x90\x80\x80", "invalid UTF-8");     /* above U+10FFFF */
    refused("ok\xE2\x82", "invalid UTF-8 at byte 2"); /* truncated */
    refused("\xF8\x88\x80\x80\x80", "invalid UTF-8");

    assert_true(valid("\xF4\x8F\xBF\xBD")); /* U+10FFFD, the last plane */
    assert_true(valid("\xED\x9F\xBF"));     /* U+D7FF, before surrogates */
}

static void test_messages(void **state) {
    (void)state;
    char small[16];

    assert_false(ctx_validate_id("thread_id", "null", err, sizeof err));
    assert_string_equal(err, "thread_id: placeholder value 'null' is not a "
                             "real id - pass a real id or leave it out");
    assert_false(ctx_validate_id(NULL, "", err, sizeof err));
    assert_string_equal(err, "id: empty - pass a real id or leave it out");
    assert_false(ctx_validate_id("sub", "mock", err, sizeof err));
    assert_non_null(strstr(err, "sub: placeholder value 'mock'"));

    /* A refused value other than a placeholder word is never echoed. */
    assert_false(ctx_validate_id("user_id", "evil\nline", err, sizeof err));
    assert_null(strstr(err, "evil"));

    /* err may be NULL or small; it stays terminated. */
    assert_false(ctx_validate_id("user_id", "none", NULL, 0));
    assert_false(ctx_validate_id("user_id", "none", small, sizeof small));
    assert_int_equal(strlen(small), sizeof small - 1);
    assert_true(ctx_validate_id("user_id", "alice", NULL, 0));
}

static bool is_hex(char c) {
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f');
}

static void assert_uuid4(const char *id) {
    assert_int_equal(strlen(id), 36);
    for (int i = 0; i < 36; i++) {
        if (i == 8 || i == 13 || i == 18 || i == 23)
            assert_int_equal(id[i], '-');
        else if (!is_hex(id[i]))
            fail_msg("not lower hex at %d: %s", i, id);
    }
    assert_int_equal(id[14], '4');
    assert_non_null(strchr("89ab", id[19]));
}

static int compare_ids(const void *a, const void *b) {
    return strcmp(a, b);
}

static void test_new_id(void **state) {
    (void)state;
    enum { N = 2000 };
    char(*ids)[CTX_NEW_ID_LEN + 1] = calloc(N, sizeof *ids);

    for (int i = 0; i < N; i++) {
        assert_int_equal(ctx_new_id(ids[i]), 0);
        assert_uuid4(ids[i]);
        assert_true(valid(ids[i]));
    }
    qsort(ids, N, sizeof *ids, compare_ids);
    for (int i = 1; i < N; i++)
        if (!strcmp(ids[i - 1], ids[i])) fail_msg("repeated %s", ids[i]);
    free(ids);
}

static void test_new_without_fields_is_global_state(void **state) {
    (void)state;
    assert_null(ctx_new(NULL, err, sizeof err));
    assert_string_equal(err, "GLOBAL STATE USAGE: dispatcher requested "
                             "without a user context - create one with a "
                             "validated user_id");
    assert_null(ctx_new(NULL, NULL, 0));
}

static void test_new_refuses_bad_ids(void **state) {
    (void)state;
    ctx_fields f = {0};

    assert_null(ctx_new(&f, err, sizeof err));
    assert_string_equal(err, "user_id: missing - pass the authenticated "
                             "user's id");

    f.user_id = "Default";
    assert_null(ctx_new(&f, err, sizeof err));
    assert_non_null(strstr(err, "user_id: placeholder value 'Default'"));

    f.user_id = "alice";
    f.thread_id = "undefined";
    assert_null(ctx_new(&f, err, sizeof err));
    assert_non_null(strstr(err, "thread_id: placeholder value"));

    f.thread_id = "t1";
    f.run_id = "";
    assert_null(ctx_new(&f, err, sizeof err));
    assert_non_null(strstr(err, "run_id: empty"));

    f.run_id = NULL;
    f.request_id = "req\x01";
    assert_null(ctx_new(&f, err, sizeof err));
    assert_non_null(strstr(err, "request_id: control character U+0001"));
}

static void test_new_keeps_and_copies(void **state) {
    (void)state;
    char user[] = "alice", thread[] = "thread-9", run[] = "run-3";
    char request[] = "req-1";
    ctx_fields f = {user, thread, run, request, 77};

    netra_ctx *ctx = ctx_new(&f, err, sizeof err);
    assert_non_null(ctx);
    memset(user, 'x', 5); /* the context holds its own copies */
    memset(request, 'x', 5);

    assert_string_equal(ctx_user_id(ctx), "alice");
    assert_string_equal(ctx_thread_id(ctx), "thread-9");
    assert_string_equal(ctx_run_id(ctx), "run-3");
    assert_string_equal(ctx_request_id(ctx), "req-1");
    assert_true(ctx_conn_id(ctx) == 77);
    assert_false(ctx_request_id_generated(ctx));
    assert_int_equal(ctx_refs(ctx), 1);

    /* Derive a context with another run id. */
    ctx_fields g;
    ctx_fields_of(ctx, &g);
    g.run_id = "run-4";
    netra_ctx *child = ctx_new(&g, err, sizeof err);
    assert_non_null(child);
    assert_string_equal(ctx_run_id(child), "run-4");
    assert_string_equal(ctx_request_id(child), "req-1");
    assert_true(ctx_conn_id(child) == 77);

    ctx_unref(child);
    ctx_unref(ctx);
}

static void test_new_generates_request_id(void **state) {
    (void)state;
    ctx_fields f = {.user_id = "default_user"};

    netra_ctx *a = ctx_new(&f, err, sizeof err);
    netra_ctx *b = ctx_new(&f, err, sizeof err);
    assert_non_null(a);
    assert_non_null(b);
    assert_uuid4(ctx_request_id(a));
    assert_true(ctx_request_id_generated(a));
    assert_string_not_equal(ctx_request_id(a), ctx_request_id(b));
    assert_null(ctx_thread_id(a));
    assert_null(ctx_run_id(a));
    assert_true(ctx_conn_id(a) == 0);
    ctx_unref(a);
    ctx_unref(b);
}

static void test_null_is_harmless(void **state) {
    (void)state;
    ctx_fields f;

    assert_null(ctx_ref(NULL));
    ctx_unref(NULL);
    assert_null(ctx_user_id(NULL));
    assert_null(ctx_request_id(NULL));
    assert_true(ctx_conn_id(NULL) == 0);
    assert_int_equal(ctx_refs(NULL), 0);
    ctx_fields_of(NULL, &f);
    assert_null(f.user_id);
}

enum { THREADS = 8, ROUNDS = 200000 };

static void *hammer(void *arg) {
    netra_ctx *ctx = arg;
    for (int i = 0; i < ROUNDS; i++) {
        ctx_ref(ctx);
        if (strcmp(ctx_user_id(ctx), "alice")) abort();
        ctx_unref(ctx);
    }
    return NULL;
}

static void test_refcount_across_threads(void **state) {
    (void)state;
    ctx_fields f = {.user_id = "alice"};
    netra_ctx *ctx = ctx_new(&f, err, sizeof err);
    pthread_t t[THREADS];

    for (int i = 0; i < THREADS; i++)
        assert_int_equal(pthread_create(&t[i], NULL, hammer, ctx), 0);
    for (int i = 0; i < THREADS; i++)
        pthread_join(t[i], NULL);

    assert_int_equal(ctx_refs(ctx), 1);
    ctx_unref(ctx);
}

/* Each thread gets one reference, the creator drops its own at once, and
 * whichever thread ends last frees the context (ASan watches). */
static void *hammer_and_release(void *arg) {
    hammer(arg);
    ctx_unref(arg);
    return NULL;
}

static void test_last_thread_frees(void **state) {
    (void)state;
    ctx_fields f = {.user_id = "alice"};
    netra_ctx *ctx = ctx_new(&f, err, sizeof err);
    pthread_t t[THREADS];

    for (int i = 0; i < THREADS; i++)
        ctx_ref(ctx);
    assert_int_equal(ctx_refs(ctx), THREADS + 1);

    for (int i = 0; i < THREADS; i++)
        assert_int_equal(pthread_create(&t[i], NULL, hammer_and_release, ctx),
                         0);
    ctx_unref(ctx);
    for (int i = 0; i < THREADS; i++)
        pthread_join(t[i], NULL);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_accepts_real_ids),
        cmocka_unit_test(test_length_bounds),
        cmocka_unit_test(test_placeholders_refused),
        cmocka_unit_test(test_edge_whitespace_refused),
        cmocka_unit_test(test_controls_refused),
        cmocka_unit_test(test_invalid_utf8_refused),
        cmocka_unit_test(test_messages),
        cmocka_unit_test(test_new_id),
        cmocka_unit_test(test_new_without_fields_is_global_state),
        cmocka_unit_test(test_new_refuses_bad_ids),
        cmocka_unit_test(test_new_keeps_and_copies),
        cmocka_unit_test(test_new_generates_request_id),
        cmocka_unit_test(test_null_is_harmless),
        cmocka_unit_test(test_refcount_across_threads),
        cmocka_unit_test(test_last_thread_frees),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
