/* serve: one runtime serving on its listener (see serve.h). */
#include "serve.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "analytics.h"
#include "bridge.h"
#include "disp.h"
#include "log.h"
#include "policy.h"
#include "reload.h"
#include "server.h"

struct serve {
    runtime *rt;
    bridge *bridge;
    disp_pool *pool;  /* set by the startup thread, read after its join */
    policy *policy;
    pthread_t startup;
    bool startup_joined;
    atomic_int state; /* a serve_state */
    atomic_bool stopping;
    long grace_ms, drain_ms;
    char why[8192];   /* written by the startup thread before REFUSED */
};

static void sleep_ms(long ms) {
    struct timespec ts = {.tv_sec = ms / 1000,
                          .tv_nsec = (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* Makes the worker pool from what the policy registered, as `netra
 * serve` does. Returns NULL with err filled. */
static disp_pool *make_pool(runtime *rt, char *err, size_t err_size) {
    if (!rt->tools) {
        char dir[4096];
        snprintf(dir, sizeof dir, "%s/lua", config_home(rt->cfg));
        rt->tools = disp_registry_new(dir);
        if (!rt->tools) {
            snprintf(err, err_size, "out of memory making the registry");
            return NULL;
        }
    }
    return reload_pool_new(rt, rt->tools, err, err_size);
}

/* The startup thread: the policy, then the pool, then ready. */
static void *startup_main(void *arg) {
    serve *s = arg;
    runtime *rt = s->rt;
    const char *env = config_environment(rt->cfg);

    runtime_set_phase(rt, "policy");
    s->policy = policy_open(rt, s->why, sizeof s->why);
    int outcome = s->policy ? policy_start(s->policy, s->why, sizeof s->why)
                            : POLICY_FAILED;
    if (outcome != POLICY_OK) {
        log_msg(NLOG_ERROR, "startup", "%s", s->why);
        log_msg(NLOG_ERROR, "startup", "startup refused in %s", env);
        atomic_store(&s->state, SERVE_REFUSED);
        return NULL;
    }
    if (atomic_load(&s->stopping)) return NULL;

    s->pool = make_pool(rt, s->why, sizeof s->why);
    if (!s->pool) {
        log_msg(NLOG_ERROR, "dispatcher", "%s", s->why);
        log_msg(NLOG_ERROR, "startup", "startup refused in %s", env);
        atomic_store(&s->state, SERVE_REFUSED);
        return NULL;
    }
    bridge_set_dispatcher(s->bridge, s->pool, rt->tools);
    runtime_set_started(rt);
    log_msg(NLOG_INFO, "netra", "ready in %s on port %d", env,
            server_port(rt->server));
    atomic_store(&s->state, SERVE_READY);
    return NULL;
}

/* Reads the listener and limits from cfg into so. Returns 0 or -1. */
static int read_options(serve *s, config *cfg, server_options *so,
                        char *err, size_t err_size) {
    long stall_ms, max_msg, max_out, ping_s;
    memset(so, 0, sizeof *so);
    const char *listen = config_get_or(cfg, "NETRA_LISTEN", "127.0.0.1:8080");
    if (server_parse_listen(listen, so, err, err_size) < 0 ||
        config_int(cfg, "NETRA_WATCHDOG_STALL_MS", 2000, 100, 600000,
                   &stall_ms, err, err_size) < 0 ||
        config_int(cfg, "NETRA_SHUTDOWN_GRACE_MS", 5000, 0, 600000,
                   &s->grace_ms, err, err_size) < 0 ||
        config_int(cfg, "NETRA_SHUTDOWN_DRAIN_MS", 250, 0, 600000,
                   &s->drain_ms, err, err_size) < 0 ||
        config_int(cfg, "NETRA_MAX_MESSAGE_BYTES", 1 << 20, 1024, 1L << 30,
                   &max_msg, err, err_size) < 0 ||
        config_int(cfg, "NETRA_MAX_OUTBOX_BYTES", 8L << 20, 65536, 1L << 32,
                   &max_out, err, err_size) < 0 ||
        config_int(cfg, "NETRA_WS_PING_S", 30, 1, 3600, &ping_s, err,
                   err_size) < 0)
        return -1;
    so->stall_ms = (int)stall_ms;
    so->max_message_bytes = (size_t)max_msg;
    so->max_outbox_bytes = (size_t)max_out;
    so->ping_s = (int)ping_s;
    return 0;
}

serve *serve_start(config *cfg, char *err, size_t err_size) {
    serve *s = calloc(1, sizeof *s);
    server_options so;
    if (!s) {
        snprintf(err, err_size, "out of memory");
        config_free(cfg);
        return NULL;
    }
    if (read_options(s, cfg, &so, err, err_size) < 0) {
        config_free(cfg);
        free(s);
        return NULL;
    }

    s->rt = runtime_new(cfg);
    if (!s->rt) {
        snprintf(err, err_size, "out of memory");
        free(s);
        return NULL;
    }
    runtime *rt = s->rt;
    log_msg(NLOG_INFO, "netra", "netra %s starting in %s (home %s)",
            NETRA_VERSION, config_environment(rt->cfg),
            config_home(rt->cfg));

    rt->server = server_start(rt, &so, err, err_size);
    if (!rt->server) {
        runtime_free(rt);
        free(s);
        return NULL;
    }
    log_msg(NLOG_INFO, "server", "listening on http://%s%s%s:%d",
            strchr(so.host, ':') ? "[" : "", so.host,
            strchr(so.host, ':') ? "]" : "", server_port(rt->server));

    s->bridge = bridge_new(rt, rt->server);
    if (!s->bridge) {
        snprintf(err, err_size, "out of memory making the bridge");
        server_free(rt->server);
        rt->server = NULL;
        runtime_free(rt);
        free(s);
        return NULL;
    }
    server_register_bridge(rt->server, NULL, err, err_size);
    health_start(rt->health);

    atomic_store(&s->state, SERVE_STARTING);
    if (pthread_create(&s->startup, NULL, startup_main, s) != 0) {
        snprintf(s->why, sizeof s->why, "could not start the startup thread");
        atomic_store(&s->state, SERVE_REFUSED);
        s->startup_joined = true;
    }
    return s;
}

serve_state serve_get_state(serve *s, char *why, size_t why_size) {
    serve_state st = atomic_load(&s->state);
    if (why && why_size) {
        if (st == SERVE_REFUSED) snprintf(why, why_size, "%s", s->why);
        else why[0] = '\0';
    }
    return st;
}

int serve_port(const serve *s) {
    return server_port(s->rt->server);
}

policy *serve_policy(serve *s) {
    return atomic_load(&s->state) == SERVE_READY ? s->policy : NULL;
}

disp_pool *serve_pool(serve *s) {
    return atomic_load(&s->state) == SERVE_READY ? s->pool : NULL;
}

runtime *serve_runtime(serve *s) {
    return s->rt;
}

/* Lets runs in flight end within the grace, then cancels what is left. */
static void drain(serve *s) {
    int64_t now = server_now_ms();
    int64_t drain_until = now + s->drain_ms, grace_until = now + s->grace_ms;
    while (server_now_ms() < drain_until) sleep_ms(20);
    while (bridge_in_flight(s->bridge) > 0 && server_now_ms() < grace_until)
        sleep_ms(20);
    if (bridge_in_flight(s->bridge) == 0) return;

    log_msg(NLOG_INFO, "netra", "cancelling %d request(s) still running "
            "after the grace period", bridge_in_flight(s->bridge));
    bridge_cancel_all(s->bridge, "the server is shutting down");
    int64_t until = server_now_ms() + 2000;
    while (bridge_in_flight(s->bridge) > 0 && server_now_ms() < until)
        sleep_ms(20);
}

void serve_stop(serve *s) {
    if (!s) return;
    runtime *rt = s->rt;
    log_msg(NLOG_INFO, "netra", "stopping: readiness off, closing "
            "connections (grace %ld ms)", s->grace_ms);

    atomic_store(&s->stopping, true);
    runtime_set_stopping(rt);
    server_begin_close(rt->server);
    if (!s->startup_joined) {
        pthread_join(s->startup, NULL);
        s->startup_joined = true;
    }
    drain(s);

    health_stop(rt->health);
    server_stop(rt->server, 2000);
    bridge_set_dispatcher(s->bridge, NULL, NULL);
    disp_pool_free(s->pool);
    /* What analytics accepted is in the spool; one last send, and the
     * rest waits there for the next start. */
    analytics_stop(rt->analytics, (int)s->grace_ms);
    rt->analytics = NULL;
    health_free(rt->health);
    rt->health = NULL;
    policy_close(s->policy);
    server_free(rt->server);
    rt->server = NULL;
    bridge_free(s->bridge);
    runtime_free(rt);
    free(s);
    log_msg(NLOG_INFO, "netra", "stopped");
}
