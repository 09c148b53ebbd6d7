/* test_reload: netra_reload against a real server, bridge, policy and
 * pool in process, with a private copy of lua/ and config/: generations
 * advance, a broken tool or policy returns its file and line and keeps
 * the old generation, and Lua health checks outlive the state that
 * registered them without touching it. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "analytics.h"
#include "bridge.h"
#include "config.h"
#include "disp.h"
#include "log.h"
#include "policy.h"
#include "reload.h"
#include "runtime.h"
#include "server.h"

typedef struct {
    char home[512];
    runtime *rt;
    bridge *b;
} fixture;

static void sleep_ms(int ms) {
    struct timespec ts = {.tv_sec = ms / 1000,
                          .tv_nsec = (long)(ms % 1000) * 1000000};
    nanosleep(&ts, NULL);
}

static void write_file(const char *home, const char *rel, const char *text) {
    char path[1024];
    snprintf(path, sizeof path, "%s/%s", home, rel);
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fputs(text, f);
    fclose(f);
}

/* A copy of the repository's lua/ and config/ under NETRA_TEST_DIR. */
static char source_home[512] = ".";

static void make_home(char *out, size_t size) {
    const char *src = source_home;
    const char *tmp = getenv("NETRA_TEST_DIR");
    char cmd[4096];
    snprintf(out, size, "%s/reload-XXXXXX", tmp ? tmp : "/tmp");
    snprintf(cmd, sizeof cmd, "mkdir -p '%s'", tmp ? tmp : "/tmp");
    assert_int_equal(system(cmd), 0);
    assert_non_null(mkdtemp(out));
    snprintf(cmd, sizeof cmd, "cp -r '%s/lua' '%s/config' '%s/'", src, src,
             out);
    assert_int_equal(system(cmd), 0);
}

/* Starts what `netra serve` starts; with policy_text, that text is the
 * policy (home/probe.lua as NETRA_POLICY). */
static fixture *start(const char *policy_text) {
    fixture *f = calloc(1, sizeof *f);
    make_home(f->home, sizeof f->home);
    if (policy_text) write_file(f->home, "probe.lua", policy_text);
    setenv("NETRA_HOME", f->home, 1);
    config *cfg = config_new();
    config_set(cfg, CONFIG_FLAG, "ENVIRONMENT", "test");
    config_set(cfg, CONFIG_FLAG, "NETRA_WORKERS", "1");
    config_set(cfg, CONFIG_FLAG, "NETRA_STATE_DIR", f->home);
    char path[1024], err[8192];
    if (policy_text) {
        snprintf(path, sizeof path, "%s/probe.lua", f->home);
        config_set(cfg, CONFIG_FLAG, "NETRA_POLICY", path);
    }
    assert_int_equal(config_load(cfg, err, sizeof err), 0);
    f->rt = runtime_new(cfg);
    assert_non_null(f->rt);

    server_options so;
    memset(&so, 0, sizeof so);
    assert_int_equal(server_parse_listen("127.0.0.1:0", &so, err,
                                         sizeof err), 0);
    so.stall_ms = 2000;
    so.max_message_bytes = 1 << 20;
    so.max_outbox_bytes = 8 << 20;
    so.ping_s = 30;
    f->rt->server = server_start(f->rt, &so, err, sizeof err);
    assert_non_null(f->rt->server);
    f->b = bridge_new(f->rt, f->rt->server);
    assert_non_null(f->b);
    health_start(f->rt->health);

    policy *p = policy_open(f->rt, err, sizeof err);
    if (!p) fail_msg("%s", err);
    assert_int_equal(policy_start(p, err, sizeof err), POLICY_OK);
    if (!f->rt->tools) {
        snprintf(path, sizeof path, "%s/lua", f->home);
        f->rt->tools = disp_registry_new(path);
    }
    disp_pool *pool = reload_pool_new(f->rt, f->rt->tools, err, sizeof err);
    assert_non_null(pool);
    bridge_set_dispatcher(f->b, pool, f->rt->tools);
    assert_non_null(reload_new(f->rt, f->b, p, pool));
    runtime_set_started(f->rt);
    return f;
}

static void stop(fixture *f) {
    runtime *rt = f->rt;
    health_stop(rt->health);
    server_stop(rt->server, 1000);
    bridge_set_dispatcher(f->b, NULL, NULL);
    reload_free(rt->reload);
    analytics_stop(rt->analytics, 1000);
    rt->analytics = NULL;
    health_free(rt->health);
    rt->health = NULL;
    server_free(rt->server);
    rt->server = NULL;
    bridge_free(f->b);
    runtime_free(rt);
    char cmd[1024];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", f->home);
    assert_int_equal(system(cmd), 0);
    free(f);
}

static unsigned long generation(runtime *rt) {
    unsigned long g;
    reload_counts(rt->reload, &g, NULL);
    return g;
}

static const char reverse_tool[] =
    "return { name = 'reverse', description = 'Reverses text.',\n"
    "  inputSchema = { type = 'object' },\n"
    "  handler = function(_, args) return args.text:reverse() end }\n";

static const char broken_tool[] =
    "return { name = 'reverse', description = 'Reverses text.',\n"
    "  handler = function(_, args)\n"
    "    return args.text:reverse(\n"
    "  end }\n";

static void test_not_started(void **state) {
    (void)state;
    char err[512];
    assert_int_equal(netra_reload(NULL, err, sizeof err), -1);
    assert_non_null(strstr(err, "has not finished starting"));
}

static void test_generations_and_errors(void **state) {
    (void)state;
    fixture *f = start(NULL);
    runtime *rt = f->rt;
    char err[8192];
    assert_int_equal(generation(rt), 1);
    assert_false(disp_registry_has_tool(rt->tools, "reverse"));

    write_file(f->home, "lua/netra/tools/reverse.lua", reverse_tool);
    assert_int_equal(netra_reload(rt, err, sizeof err), 0);
    assert_int_equal(generation(rt), 2);
    assert_true(disp_registry_has_tool(rt->tools, "reverse"));

    /* A broken tool: the error names its file and line, and nothing
     * changes. */
    policy *before = reload_current_policy(rt);
    disp_registry *reg = rt->tools;
    write_file(f->home, "lua/netra/tools/reverse.lua", broken_tool);
    assert_int_equal(netra_reload(rt, err, sizeof err), -1);
    if (!strstr(err, "lua/netra/tools/reverse.lua:4:"))
        fail_msg("no file:line in '%s'", err);
    unsigned long failed;
    reload_counts(rt->reload, NULL, &failed);
    assert_int_equal(failed, 1);
    assert_int_equal(generation(rt), 2);
    assert_ptr_equal(reload_current_policy(rt), before);
    assert_ptr_equal(rt->tools, reg);
    assert_true(disp_registry_has_tool(rt->tools, "reverse"));

    /* A broken policy file. */
    write_file(f->home, "lua/netra/tools/reverse.lua", reverse_tool);
    char policy_path[1024], saved[1100];
    snprintf(policy_path, sizeof policy_path, "%s/lua/netra/policy.lua",
             f->home);
    snprintf(saved, sizeof saved, "%s.saved", policy_path);
    assert_int_equal(rename(policy_path, saved), 0);
    write_file(f->home, "lua/netra/policy.lua", "local x = = 1\n");
    assert_int_equal(netra_reload(rt, err, sizeof err), -1);
    if (!strstr(err, "lua/netra/policy.lua:1:"))
        fail_msg("no file:line in '%s'", err);
    assert_int_equal(generation(rt), 2);

    /* Fixed: the next reload works. */
    assert_int_equal(rename(saved, policy_path), 0);
    assert_int_equal(netra_reload(rt, err, sizeof err), 0);
    assert_int_equal(generation(rt), 3);
    assert_int_equal(reload_collect(rt->reload), 0);
    stop(f);
}

/* policy v1 registers a Lua check "probe"; v2 does not. */
static const char probe_policy[] =
    "local netra = require('netra')\n"
    "local version = %d\n"
    "return {\n"
    "  start = function()\n"
    "    if version == 1 then\n"
    "      netra.health.register({ name = 'probe', interval_ms = 20,\n"
    "        timeout_ms = 500, check = function()\n"
    "          return 'healthy', 'v1 answers' end })\n"
    "    end\n"
    "    return true\n"
    "  end,\n"
    "  check = function() return true, {} end,\n"
    "}\n";

static void test_lua_check_outlives_its_state(void **state) {
    (void)state;
    char text[1024], err[8192];
    snprintf(text, sizeof text, probe_policy, 1);
    fixture *f = start(text);
    runtime *rt = f->rt;

    /* Reload v1 many times while its check runs every 20 ms: each
     * reload replaces the check and closes the previous state. */
    for (int i = 0; i < 30; i++) {
        assert_int_equal(netra_reload(rt, err, sizeof err), 0);
        sleep_ms(7);
    }
    health_info info;
    for (int i = 0; i < 200; i++) {
        assert_int_equal(health_get(rt->health, "probe", &info), 0);
        if (info.status == HEALTH_HEALTHY) break;
        sleep_ms(10);
    }
    assert_int_equal(info.status, HEALTH_HEALTHY);
    assert_string_equal(info.message, "v1 answers");

    /* v2 does not register the probe: once v1's state is closed, the
     * check says its state is gone instead of running in freed memory. */
    snprintf(text, sizeof text, probe_policy, 2);
    write_file(f->home, "probe.lua", text);
    assert_int_equal(netra_reload(rt, err, sizeof err), 0);
    assert_int_equal(reload_collect(rt->reload), 0);
    bool gone = false;
    for (int i = 0; i < 300 && !gone; i++) {
        health_get(rt->health, "probe", &info);
        gone = strstr(info.message, "state of this check is gone") != NULL;
        sleep_ms(10);
    }
    if (!gone) fail_msg("probe still says '%s'", info.message);
    stop(f);
}

int main(void) {
    log_setup(NLOG_WARN, false);
    if (getenv("NETRA_HOME"))
        snprintf(source_home, sizeof source_home, "%s", getenv("NETRA_HOME"));
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_not_started),
        cmocka_unit_test(test_generations_and_errors),
        cmocka_unit_test(test_lua_check_outlives_its_state),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
