/* bench_dispatch: in-process tool calls per second through the dispatcher
 * (context, argument validation, a trivial Lua handler, events, result
 * mapping) with 1 and N workers, budgets on (count hook), by timer, and
 * off; beside a bare lua_pcall of the same handler as the floor.
 * Usage: bench_dispatch LUA_DIR CALLS WORKERS */
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <lauxlib.h>
#include <lualib.h>

#include "disp.h"
#include "log.h"
#include "sandbox.h"

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cond = PTHREAD_COND_INITIALIZER;
static int in_flight;
static atomic_long events;

static void on_event(void *ud, cJSON *ev) {
    (void)ud;
    atomic_fetch_add(&events, 1);
    cJSON_Delete(ev);
}

static void on_done(void *ud, cJSON *r) {
    disp *d = ud;
    cJSON_Delete(r);
    disp_release(d);
    pthread_mutex_lock(&lock);
    in_flight--;
    pthread_cond_signal(&cond);
    pthread_mutex_unlock(&lock);
}

/* Release from inside done needs the disp pointer: the sink's ud is set
 * after disp_new, so keep a small box. */
typedef struct {
    disp *d;
} box;

static void box_done(void *ud, cJSON *r) {
    box *b = ud;
    on_done(b->d, r);
    free(b);
}

static double run_pool(const char *path, const char *lua_dir, long calls,
                       int workers, int mode) {
    char err[1024];
    disp_registry *reg = disp_registry_new(lua_dir);
    if (disp_registry_add_tool(reg, path, err, sizeof err) != 0) {
        fprintf(stderr, "%s\n", err);
        exit(1);
    }
    disp_pool_config cfg = {.workers = workers,
                            .queue_max = 100000,
                            .max_inflight_per_user = 100000};
    if (mode == 2) {
        cfg.time_ms = SBX_UNLIMITED;
        cfg.instructions = SBX_UNLIMITED;
        cfg.memory_bytes = SBX_UNLIMITED;
    } else if (mode == 1) {
        cfg.instructions = SBX_UNLIMITED;
        cfg.timer_hook = true;
    }
    disp_pool *pool = disp_pool_new(reg, &cfg, err, sizeof err);
    if (!pool) {
        fprintf(stderr, "%s\n", err);
        exit(1);
    }
    ctx_fields f = {.user_id = "bench_user"};
    netra_ctx *ctx = ctx_new(&f, err, sizeof err);
    int window = 64 * workers;

    double t0 = now_s();
    for (long i = 0; i < calls; i++) {
        pthread_mutex_lock(&lock);
        while (in_flight >= window) pthread_cond_wait(&cond, &lock);
        in_flight++;
        pthread_mutex_unlock(&lock);
        box *b = malloc(sizeof *b);
        disp_sink sink = {b, on_event, NULL, box_done};
        b->d = disp_new(pool, ctx, &sink, err, sizeof err);
        int code;
        if (disp_call_tool(b->d, "echo", cJSON_Parse("{\"text\":\"hello\"}"),
                           NULL, &code, err, sizeof err) != 0) {
            fprintf(stderr, "refused: %s\n", err);
            exit(1);
        }
    }
    pthread_mutex_lock(&lock);
    while (in_flight > 0) pthread_cond_wait(&cond, &lock);
    pthread_mutex_unlock(&lock);
    double dt = now_s() - t0;

    ctx_unref(ctx);
    disp_pool_free(pool);
    disp_registry_unref(reg);
    return (double)calls / dt;
}

static double run_floor(long calls) {
    lua_State *L = luaL_newstate();
    luaL_openlibs(L);
    luaL_dostring(L, "return function(ctx, args) return args.text end");
    int fn = luaL_ref(L, LUA_REGISTRYINDEX);
    double t0 = now_s();
    for (long i = 0; i < calls; i++) {
        lua_rawgeti(L, LUA_REGISTRYINDEX, fn);
        lua_newtable(L);
        lua_createtable(L, 0, 1);
        lua_pushliteral(L, "hello");
        lua_setfield(L, -2, "text");
        if (lua_pcall(L, 2, 1, 0) != LUA_OK) exit(1);
        lua_pop(L, 1);
    }
    double dt = now_s() - t0;
    lua_close(L);
    return (double)calls / dt;
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: bench_dispatch LUA_DIR CALLS WORKERS\n");
        return 2;
    }
    const char *lua_dir = argv[1];
    long calls = atol(argv[2]);
    int n = atoi(argv[3]);
    char path[1024];
    snprintf(path, sizeof path, "%s/netra/tools/echo.lua", lua_dir);
    log_setup(NLOG_WARN, false);

    printf("bare lua_pcall (floor)        %10.0f calls/s\n",
           run_floor(calls * 10));
    const char *modes[] = {"budgets on (count hook)", "budgets by timer",
                           "budgets off"};
    int ws[] = {1, n};
    for (int m = 0; m < 3; m++)
        for (int k = 0; k < 2; k++)
            printf("dispatcher %2d worker(s), %-24s %10.0f calls/s\n", ws[k],
                   modes[m], run_pool(path, lua_dir, calls, ws[k], m));
    printf("(events delivered: %ld)\n", (long)atomic_load(&events));
    return 0;
}
