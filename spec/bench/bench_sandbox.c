/* bench_sandbox: calls per second of a trivial tool handler through
 * sbx_start/sbx_resume, against a bare lua_pcall of the same function,
 * with budgets off, with the count hook and with the timer; and a tight
 * loop under each hook mode. Prints figures; asserts nothing. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include <lauxlib.h>
#include <lualib.h>

#include "sandbox.h"

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static int push_args(lua_State *L, void *ud) {
    (void)ud;
    lua_newtable(L);
    lua_createtable(L, 0, 1);
    lua_pushliteral(L, "hi");
    lua_setfield(L, -2, "text");
    return 2;
}

static double run_calls(sbx *s, int ref, sbx_budget b, int n) {
    sbx_request_opts o = {0};
    char err[256];
    double t0 = now_s();

    o.budget = b;
    for (int i = 0; i < n; i++) {
        sbx_request *r = sbx_start(s, NULL, ref, push_args, NULL, &o, err,
                                   sizeof err);
        if (!r || sbx_resume(r, NULL, NULL) != SBX_DONE) {
            fprintf(stderr, "call failed: %s\n", r ? sbx_request_error(r)
                                                   : err);
            exit(1);
        }
        sbx_request_free(r);
    }
    return n / (now_s() - t0);
}

static double bare_calls(int n) {
    lua_State *L = luaL_newstate();
    double t0;

    luaL_openlibs(L);
    luaL_dostring(L, "return function(ctx, args) return args.text end");
    t0 = now_s();
    for (int i = 0; i < n; i++) {
        lua_pushvalue(L, -1);
        push_args(L, NULL);
        if (lua_pcall(L, 2, 1, 0) != LUA_OK)
            exit(1);
        lua_pop(L, 1);
    }
    lua_close(L);
    return n / (now_s() - t0);
}

static double loop_time(sbx *s, int ref, sbx_budget b) {
    sbx_request_opts o = {0};
    char err[256];
    double t0 = now_s();

    o.budget = b;
    sbx_request *r = sbx_start(s, NULL, ref, NULL, NULL, &o, err, sizeof err);
    if (!r || sbx_resume(r, NULL, NULL) != SBX_DONE) {
        fprintf(stderr, "loop failed: %s\n", r ? sbx_request_error(r) : err);
        exit(1);
    }
    sbx_request_free(r);
    return now_s() - t0;
}

int main(int argc, char **argv) {
    const char *dir = argc > 1 ? argv[1] : "/tmp/netra-bench-sandbox";
    char path[1024], err[256];
    int n = 200000;
    sbx_budget off = {SBX_UNLIMITED, SBX_UNLIMITED, SBX_UNLIMITED};
    sbx_budget time_only = {60000, SBX_UNLIMITED, SBX_UNLIMITED};
    sbx_budget all = {60000, 1000000000, 64 << 20};

    snprintf(path, sizeof path, "%s/lua/netra/tools", dir);
    char cmd[1200];
    snprintf(cmd, sizeof cmd, "mkdir -p %s", path);
    if (system(cmd) != 0)
        return 1;
    snprintf(path, sizeof path, "%s/lua/netra/tools/echo.lua", dir);
    FILE *f = fopen(path, "w");
    fputs("return { name = 'echo', description = 'd', inputSchema = {},\n"
          "  handler = function(ctx, args) return args.text end }\n", f);
    fclose(f);
    snprintf(path, sizeof path, "%s/lua/netra/tools/loop.lua", dir);
    f = fopen(path, "w");
    fputs("return { name = 'loop', description = 'd', inputSchema = {},\n"
          "  handler = function() local x = 0\n"
          "    for i = 1, 50000000 do x = x + i end return x end }\n", f);
    fclose(f);

    snprintf(path, sizeof path, "%s/lua", dir);
    sbx_config cc = {.lua_dir = path, .hook = SBX_HOOK_COUNT};
    sbx_config ct = {.lua_dir = path, .hook = SBX_HOOK_TIMER};
    sbx *sc = sbx_new(&cc, err, sizeof err);
    sbx *st = sbx_new(&ct, err, sizeof err);
    sbx_tool_def d1, d2, d3, d4;
    char lp[1100], ep[1100];
    snprintf(ep, sizeof ep, "%s/netra/tools/echo.lua", path);
    snprintf(lp, sizeof lp, "%s/netra/tools/loop.lua", path);
    if (!sc || !st || sbx_load_tool(sc, ep, &d1, err, sizeof err) ||
        sbx_load_tool(sc, lp, &d2, err, sizeof err) ||
        sbx_load_tool(st, ep, &d3, err, sizeof err) ||
        sbx_load_tool(st, lp, &d4, err, sizeof err)) {
        fprintf(stderr, "setup: %s\n", err);
        return 1;
    }

    run_calls(sc, d1.handler_ref, off, 20000); /* warm up */
    printf("trivial handler, %d calls each (calls/s):\n", n);
    printf("  bare lua_pcall                      %10.0f\n", bare_calls(n));
    printf("  sbx, budgets off                    %10.0f\n",
           run_calls(sc, d1.handler_ref, off, n));
    printf("  sbx, count hook (time only)         %10.0f\n",
           run_calls(sc, d1.handler_ref, time_only, n));
    printf("  sbx, count hook (all budgets)       %10.0f\n",
           run_calls(sc, d1.handler_ref, all, n));
    printf("  sbx, timer (time + memory)          %10.0f\n",
           run_calls(st, d3.handler_ref,
                     (sbx_budget){60000, SBX_UNLIMITED, 64 << 20}, n));
    printf("tight loop of 5e7 additions (s):\n");
    printf("  budgets off                         %10.3f\n",
           loop_time(sc, d2.handler_ref, off));
    printf("  count hook (time only)              %10.3f\n",
           loop_time(sc, d2.handler_ref, time_only));
    printf("  count hook (all budgets)            %10.3f\n",
           loop_time(sc, d2.handler_ref, all));
    printf("  timer (time + memory)               %10.3f\n",
           loop_time(st, d4.handler_ref,
                     (sbx_budget){60000, SBX_UNLIMITED, 64 << 20}));

    sbx_tool_def_free(&d1);
    sbx_tool_def_free(&d2);
    sbx_tool_def_free(&d3);
    sbx_tool_def_free(&d4);
    sbx_free(sc);
    sbx_free(st);
    return 0;
}
