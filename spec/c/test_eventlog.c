/* Unit tests for eventlog: rotation and what is kept, line validation,
 * a torn last line, the lock, and directory errors, on real files. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include <cJSON.h>
#include <ftw.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "eventlog.h"

static void make_dir(char *out, size_t n) {
    const char *base = getenv("NETRA_TEST_DIR");
    if (base) mkdir(base, 0755);
    snprintf(out, n, "%s/evlog.XXXXXX", base ? base : "/tmp");
    assert_non_null(mkdtemp(out));
}

static int rm_one(const char *p, const struct stat *s, int f, struct FTW *w) {
    (void)s;
    (void)f;
    (void)w;
    return remove(p);
}

static void remove_dir(const char *dir) {
    nftw(dir, rm_one, 16, FTW_DEPTH | FTW_PHYS);
}

static evlog *open_ok(const char *dir, uint64_t max_bytes, int keep) {
    evlog_options o = {.dir = dir, .max_bytes = max_bytes, .keep = keep};
    evlog *ev = NULL;
    char err[512];
    int rc = evlog_open(&o, &ev, err, sizeof(err));
    if (rc != EVLOG_OK) fail_msg("evlog_open: %s", err);
    return ev;
}

static char *slurp(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *buf = malloc((size_t)n + 1);
    assert_int_equal(fread(buf, 1, (size_t)n, f), (size_t)n);
    buf[n] = '\0';
    fclose(f);
    return buf;
}

/* Checks that every line of the file is a JSON object with an "n", in
 * steps of one from *next; returns the line count. */
static int check_lines(const char *path, int *next) {
    char *text = slurp(path);
    assert_non_null(text);
    int lines = 0;
    char *save = NULL;
    assert_true(text[0] == '\0' || text[strlen(text) - 1] == '\n');
    for (char *l = strtok_r(text, "\n", &save); l;
         l = strtok_r(NULL, "\n", &save)) {
        const char *end = NULL;
        cJSON *j = cJSON_ParseWithOpts(l, &end, 1);
        assert_non_null(j);
        assert_true(cJSON_IsObject(j));
        cJSON *n = cJSON_GetObjectItemCaseSensitive(j, "n");
        assert_true(cJSON_IsNumber(n));
        assert_int_equal(n->valueint, *next);
        (*next)++;
        cJSON_Delete(j);
        lines++;
    }
    free(text);
    return lines;
}

static void test_rotation(void **state) {
    (void)state;
    char dir[512], path[600];
    make_dir(dir, sizeof(dir));
    evlog *ev = open_ok(dir, 1000, 3);
    char line[200];
    for (int i = 0; i < 100; i++) {
        int n = snprintf(line, sizeof(line),
                         "{\"n\":%d,\"event\":\"tool_"
                         "call\",\"pad\":\"%040d\"}",
                         i, i);
        assert_int_equal(evlog_append(ev, line, (size_t)n), EVLOG_OK);
    }
    evlog_stats st;
    evlog_get_stats(ev, &st);
    assert_int_equal(st.lines, 100);
    assert_true(st.rotations >= 5);
    evlog_close(ev);

    /* events.jsonl.3 (oldest) .. .1, then events.jsonl: consecutive. */
    snprintf(path, sizeof(path), "%s/events.jsonl.4", dir);
    assert_int_not_equal(access(path, F_OK), 0); /* only three kept */
    int first = -1, next = 0;
    for (int k = 3; k >= 0; k--) {
        if (k)
            snprintf(path, sizeof(path), "%s/events.jsonl.%d", dir, k);
        else
            snprintf(path, sizeof(path), "%s/events.jsonl", dir);
        struct stat sb;
        assert_int_equal(stat(path, &sb), 0);
        assert_true(sb.st_size <= 1000);
        char *text = slurp(path);
        if (first < 0) {
            first = atoi(strstr(text, "\"n\":") + 4);
            next = first;
        }
        free(text);
        assert_true(check_lines(path, &next) > 0);
    }
    assert_true(first > 0); /* the oldest went away */
    assert_int_equal(next, 100);

    /* Reopening appends to the current file. */
    ev = open_ok(dir, 1000, 3);
    assert_int_equal(evlog_append(ev, "{\"n\":100}", 9), EVLOG_OK);
    evlog_close(ev);
    snprintf(path, sizeof(path), "%s/events.jsonl", dir);
    char *text = slurp(path);
    assert_non_null(strstr(text, "{\"n\":99,"));
    assert_non_null(strstr(text, "\n{\"n\":100}\n"));
    free(text);
    remove_dir(dir);
}

static void test_keep_none(void **state) {
    (void)state;
    char dir[512], path[600];
    make_dir(dir, sizeof(dir));
    evlog *ev = open_ok(dir, 100, 0);
    char line[64];
    for (int i = 0; i < 10; i++) {
        int n =
            snprintf(line, sizeof(line), "{\"n\":%d,\"p\":\"%030d\"}", i, 0);
        assert_int_equal(evlog_append(ev, line, (size_t)n), EVLOG_OK);
    }
    evlog_close(ev);
    snprintf(path, sizeof(path), "%s/events.jsonl.1", dir);
    assert_int_not_equal(access(path, F_OK), 0);
    snprintf(path, sizeof(path), "%s/events.jsonl", dir);
    int next = 8; /* two 47-byte lines fit in 100 */
    assert_int_equal(check_lines(path, &next), 2);
    remove_dir(dir);
}

static void test_line_validity(void **state) {
    (void)state;
    char dir[512], path[600];
    make_dir(dir, sizeof(dir));
    evlog *ev = open_ok(dir, 0, 2);
    const char *bad[] = {
        "{\"a\":1}\n{\"b\":2}",
        "{\"a\":\"x\ry\"}",
        "not json",
        "[1,2]",
        "{",
        "",
        "   ",
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(*bad); i++)
        assert_int_equal(evlog_append(ev, bad[i], strlen(bad[i])),
                         EVLOG_EINVAL);
    assert_int_equal(evlog_append(ev, "{\"a\":1}\0{}", 10), EVLOG_EINVAL);
    assert_non_null(strstr(evlog_error(ev), "NUL"));
    assert_int_equal(evlog_append(ev, bad[0], strlen(bad[0])), EVLOG_EINVAL);
    assert_non_null(strstr(evlog_error(ev), "raw newline at byte 7"));
    assert_int_equal(evlog_append(ev, " {\"n\":0} ", 9), EVLOG_OK);

    evlog_stats st;
    evlog_get_stats(ev, &st);
    assert_int_equal(st.rejected, 9);
    assert_int_equal(st.lines, 1);
    evlog_close(ev);
    snprintf(path, sizeof(path), "%s/events.jsonl", dir);
    char *text = slurp(path);
    assert_string_equal(text, " {\"n\":0} \n"); /* nothing else got in */
    free(text);
    remove_dir(dir);
}

static void test_torn_line(void **state) {
    (void)state;
    char dir[512], path[600];
    make_dir(dir, sizeof(dir));
    snprintf(path, sizeof(path), "%s/events.jsonl", dir);
    FILE *f = fopen(path, "w");
    fputs("{\"n\":0}\n{\"n\":1,\"cut", f); /* a crash mid-line */
    fclose(f);

    evlog *ev = open_ok(dir, 0, 2);
    assert_int_equal(evlog_append(ev, "{\"n\":2}", 7), EVLOG_OK);
    evlog_close(ev);
    char *text = slurp(path);
    assert_string_equal(text, "{\"n\":0}\n{\"n\":1,\"cut\n{\"n\":2}\n");
    free(text);
    remove_dir(dir);
}

static void test_lock(void **state) {
    (void)state;
    char dir[512], err[512], pid[32];
    make_dir(dir, sizeof(dir));
    evlog *ev = open_ok(dir, 0, 1);
    evlog_options o = {.dir = dir};
    evlog *second = NULL;
    assert_int_equal(evlog_open(&o, &second, err, sizeof(err)), EVLOG_ELOCKED);
    assert_null(second);
    snprintf(pid, sizeof(pid), "pid %d", (int)getpid());
    assert_non_null(strstr(err, pid));
    o.name = "other.jsonl"; /* another file in the same place is fine */
    assert_int_equal(evlog_open(&o, &second, err, sizeof(err)), EVLOG_OK);
    evlog_close(second);
    evlog_close(ev);
    remove_dir(dir);
}

static void test_directory_errors(void **state) {
    (void)state;
    char dir[512], missing[600], err[512];
    make_dir(dir, sizeof(dir));
    evlog *ev = NULL;

    snprintf(missing, sizeof(missing), "%s/nope", dir);
    evlog_options o = {.dir = missing};
    assert_int_equal(evlog_open(&o, &ev, err, sizeof(err)), EVLOG_EIO);
    assert_null(ev);
    assert_non_null(strstr(err, missing));
    assert_non_null(strstr(err, "does not exist"));
    assert_non_null(strstr(err, "mkdir -p"));

    o.keep = -1;
    assert_int_equal(evlog_open(&o, &ev, err, sizeof(err)), EVLOG_EINVAL);
    o.keep = 0;
    o.name = "../x";
    assert_int_equal(evlog_open(&o, &ev, err, sizeof(err)), EVLOG_EINVAL);
    o.name = NULL;

    /* Not writable: root ignores mode bits, so try as nobody then. */
    char ro[600];
    snprintf(ro, sizeof(ro), "%s/ro", dir);
    assert_int_equal(mkdir(ro, 0555), 0);
    chmod(dir, 0755);
    int p[2];
    assert_int_equal(pipe(p), 0);
    pid_t child = fork();
    assert_true(child >= 0);
    if (child == 0) {
        if (geteuid() == 0 && (setgid(65534) != 0 || setuid(65534) != 0))
            _exit(2);
        evlog_options c = {.dir = ro};
        evlog *e = NULL;
        char msg[512] = "";
        int rc = evlog_open(&c, &e, msg, sizeof(msg));
        if (write(p[1], msg, strlen(msg)) < 0) _exit(3);
        _exit(rc == EVLOG_EIO ? 0 : 1);
    }
    close(p[1]);
    char msg[512] = "";
    ssize_t n = read(p[0], msg, sizeof(msg) - 1);
    msg[n > 0 ? n : 0] = '\0';
    close(p[0]);
    int status;
    assert_int_equal(waitpid(child, &status, 0), child);
    assert_true(WIFEXITED(status));
    assert_int_equal(WEXITSTATUS(status), 0);
    assert_non_null(strstr(msg, ro));
    assert_non_null(strstr(msg, "permissions"));
    remove_dir(dir);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_rotation),
        cmocka_unit_test(test_keep_none),
        cmocka_unit_test(test_line_validity),
        cmocka_unit_test(test_torn_line),
        cmocka_unit_test(test_lock),
        cmocka_unit_test(test_directory_errors),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
