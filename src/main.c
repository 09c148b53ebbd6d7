/* main: the netra command line: serve, check, token, repl, version,
 * help. */
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "analytics.h"
#include "bridge.h"
#include "config.h"
#include "console.h"
#include "disp.h"
#include "jwt.h"
#include "log.h"
#include "policy.h"
#include "reload.h"
#include "repl.h"
#include "repl_term.h"
#include "runtime.h"
#include "scenario.h"
#include "serve.h"
#include "server.h"

static const char usage_text[] =
    "usage: netra <command> [options]\n"
    "\n"
    "commands:\n"
    "  serve [--env NAME] [--listen HOST:PORT]\n"
    "                 run the server (default 127.0.0.1:8080; port 0 picks\n"
    "                 a free port and the log says which)\n"
    "  check [--env NAME]\n"
    "                 run the startup policy without connecting; print every\n"
    "                 component as required, optional or disabled and why;\n"
    "                 exit 1 when startup would be refused\n"
    "  token --user NAME [--ttl SECONDS] [--env NAME]\n"
    "                 print a client token signed with NETRA_JWT_SECRET\n"
    "                 (default ttl 3600), alone on stdout\n"
    "  repl [--env NAME] [--serve] [--attach [PATH]]\n"
    "                 a Lua prompt with the netra module and the policy\n"
    "                 applied (--serve: serving too); --attach evaluates\n"
    "                 in a running server through its control socket;\n"
    "                 stdin not a terminal: run it as a script\n"
    "  run SCRIPT.lua [ARGS]\n"
    "                 run a scenario (netra.scenario, doc/scenarios.md);\n"
    "                 TAP on stdout, exit 0 only when every assertion held\n"
    "  version        print the version\n"
    "  help, --help   print this text\n"
    "\n"
    "NAME is development (default), test, staging or production.\n"
    "Settings come from flags, then the process environment, then\n"
    "config/<NAME>.env; see the README.\n";

static int usage(FILE *out, int code) {
    fputs(usage_text, out);
    return code;
}

typedef struct {
    const char *command;
    const char *env;
    const char *listen;
    const char *user;
    const char *ttl;
    bool serve;         /* repl --serve */
    bool attach;        /* repl --attach [PATH] */
    const char *attach_path;
} options;

/* Options each command takes. */
static bool takes(const char *command, const char *option) {
    if (!strcmp(option, "--env"))
        return !strcmp(command, "serve") || !strcmp(command, "check") ||
               !strcmp(command, "token") || !strcmp(command, "repl");
    if (!strcmp(option, "--listen")) return !strcmp(command, "serve");
    if (!strcmp(option, "--user") || !strcmp(option, "--ttl"))
        return !strcmp(command, "token");
    return false;
}

/* Parses argv; returns 0, or 2 after printing what was wrong. */
static int parse_args(int argc, char **argv, options *o) {
    memset(o, 0, sizeof *o);
    if (argc < 2) return usage(stderr, 2);
    o->command = argv[1];
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage(stdout, 0);
            exit(0);
        }
        if (!strcmp(o->command, "repl") && !strcmp(a, "--serve")) {
            o->serve = true;
            continue;
        }
        if (!strcmp(o->command, "repl") && !strncmp(a, "--attach", 8) &&
            (a[8] == '\0' || a[8] == '=')) {
            o->attach = true;
            if (a[8] == '=') o->attach_path = a + 9;
            else if (i + 1 < argc && argv[i + 1][0] != '-')
                o->attach_path = argv[++i];
            continue;
        }
        char name[32];
        size_t n = strcspn(a, "=");
        snprintf(name, sizeof name, "%.*s", (int)(n < 31 ? n : 31), a);
        const char **slot = NULL;
        if (takes(o->command, name)) {
            if (!strcmp(name, "--env")) slot = &o->env;
            else if (!strcmp(name, "--listen")) slot = &o->listen;
            else if (!strcmp(name, "--user")) slot = &o->user;
            else slot = &o->ttl;
        }
        if (!slot) {
            fprintf(stderr, "netra %s: unknown option '%s'\n\n", o->command,
                    a);
            return usage(stderr, 2);
        }
        if (a[n] == '=') *slot = a + n + 1;
        else if (i + 1 < argc) *slot = argv[++i];
        else {
            fprintf(stderr, "netra %s: %s needs a value\n\n", o->command,
                    name);
            return usage(stderr, 2);
        }
    }
    return 0;
}

static void remember_secret(void *ud, const char *key, const char *value,
                            config_source source) {
    (void)ud;
    (void)source;
    if (config_is_secret(key)) log_add_secret(value);
}

/* Loads the configuration and sets up logging. Returns NULL after
 * printing the reason. */
static config *load_config(const options *o) {
    config *cfg = config_new();
    char err[1024];
    if (!cfg) {
        fprintf(stderr, "netra: out of memory\n");
        return NULL;
    }
    if (o->env) config_set(cfg, CONFIG_FLAG, "ENVIRONMENT", o->env);
    if (o->listen) config_set(cfg, CONFIG_FLAG, "NETRA_LISTEN", o->listen);
    if (config_load(cfg, err, sizeof err) < 0) {
        fprintf(stderr, "netra: %s\n", err);
        config_free(cfg);
        return NULL;
    }
    config_each(cfg, remember_secret, NULL);

    log_level level = NLOG_INFO;
    const char *lv = config_get(cfg, "NETRA_LOG_LEVEL");
    if (lv && !log_parse_level(lv, &level)) {
        fprintf(stderr, "netra: NETRA_LOG_LEVEL=%s is not a level - use "
                        "debug, info, warn or error\n", lv);
        config_free(cfg);
        return NULL;
    }
    const char *format = config_get_or(cfg, "NETRA_LOG_FORMAT", "text");
    if (strcmp(format, "text") && strcmp(format, "json")) {
        fprintf(stderr, "netra: NETRA_LOG_FORMAT=%s - use text or json\n",
                format);
        config_free(cfg);
        return NULL;
    }
    log_setup(level, !strcmp(format, "json"));
    return cfg;
}

/* ---- check ---------------------------------------------------------------- */

static int cmd_check(const options *o) {
    config *cfg = load_config(o);
    if (!cfg) return 1;
    runtime *rt = runtime_new(cfg);
    if (!rt) return 1;
    rt->dry_run = true;

    char err[4096];
    policy *p = policy_open(rt, err, sizeof err);
    int rc = 1;
    if (!p) {
        printf("error: %s\n", err);
    } else {
        printf("policy: %s\n", policy_path(p));
        rc = policy_check(p, stdout) == 0 ? 0 : 1;
    }
    health_free(rt->health);
    rt->health = NULL;
    policy_close(p);
    runtime_free(rt);
    return rc;
}

/* ---- token ------------------------------------------------------------------ */

static int cmd_token(const options *o) {
    if (!o->user) {
        fprintf(stderr, "netra token: --user NAME is required\n\n");
        return usage(stderr, 2);
    }
    long ttl = 3600;
    if (o->ttl) {
        char *end;
        ttl = strtol(o->ttl, &end, 10);
        if (*end || end == o->ttl || ttl <= 0 || ttl > 366L * 86400) {
            fprintf(stderr, "netra token: --ttl must be a number of seconds "
                            "from 1 to 31622400, got '%s'\n", o->ttl);
            return 2;
        }
    }
    config *cfg = load_config(o);
    if (!cfg) return 1;
    const char *secret = config_get(cfg, "NETRA_JWT_SECRET");
    if (!secret) {
        fprintf(stderr, "netra token: NETRA_JWT_SECRET is not set in %s - "
                        "set it (the same value the server uses)\n",
                config_environment(cfg));
        config_free(cfg);
        return 1;
    }
    char *token = NULL, err[512];
    int64_t now = time(NULL);
    int rc = jwt_sign(secret, o->user, now, now + ttl, &token, err,
                      sizeof err);
    config_free(cfg);
    if (rc < 0) {
        fprintf(stderr, "netra token: %s\n", err);
        return 1;
    }
    printf("%s\n", token);
    free(token);
    return 0;
}

/* ---- serve ------------------------------------------------------------------ */

typedef struct {
    runtime *rt;
    policy *policy;
    atomic_int outcome; /* -1 running, else a POLICY_ value */
    char err[8192];
} startup;

static void *startup_main(void *arg) {
    startup *s = arg;
    runtime_set_phase(s->rt, "policy");
    s->policy = policy_open(s->rt, s->err, sizeof s->err);
    int outcome = s->policy ? policy_start(s->policy, s->err, sizeof s->err)
                            : POLICY_FAILED;
    atomic_store(&s->outcome, outcome);
    return NULL;
}

/* Makes the dispatcher's pool from what the policy registered. Returns
 * NULL after logging why. */
static disp_pool *start_pool(runtime *rt) {
    char err[2048], dir[4096];
    if (!rt->tools) {
        snprintf(dir, sizeof dir, "%s/lua", config_home(rt->cfg));
        rt->tools = disp_registry_new(dir);
        if (!rt->tools) return NULL;
    }
    disp_pool *pool = reload_pool_new(rt, rt->tools, err, sizeof err);
    if (!pool) log_msg(NLOG_ERROR, "dispatcher", "%s", err);
    return pool;
}

/* SIGHUP: reloads once started (netra_reload logs the outcome). */
static void serve_reload(runtime *rt) {
    char err[8192];
    if (!rt->reload) {
        log_msg(NLOG_WARN, "reload", "SIGHUP during startup: ignored - "
                "send it again once the server is ready");
        return;
    }
    reload_request(rt, "SIGHUP", err, sizeof err);
}

/* Waits up to 200 ms for a signal; returns it or 0. */
static int wait_signal(const sigset_t *set) {
    struct timespec ts = {.tv_sec = 0, .tv_nsec = 200 * 1000 * 1000};
    int sig = sigtimedwait(set, NULL, &ts);
    return sig > 0 ? sig : 0;
}

static int cmd_serve(const options *o) {
    config *cfg = load_config(o);
    if (!cfg) return 1;

    server_options so;
    memset(&so, 0, sizeof so);
    char err[1024];
    long stall_ms, grace_ms, drain_ms;
    const char *listen = config_get_or(cfg, "NETRA_LISTEN", "127.0.0.1:8080");
    if (server_parse_listen(listen, &so, err, sizeof err) < 0 ||
        config_int(cfg, "NETRA_WATCHDOG_STALL_MS", 2000, 100, 600000,
                   &stall_ms, err, sizeof err) < 0 ||
        config_int(cfg, "NETRA_SHUTDOWN_GRACE_MS", 5000, 0, 600000, &grace_ms,
                   err, sizeof err) < 0 ||
        config_int(cfg, "NETRA_SHUTDOWN_DRAIN_MS", 250, 0, 600000, &drain_ms,
                   err, sizeof err) < 0) {
        log_msg(NLOG_ERROR, "netra", "%s", err);
        config_free(cfg);
        return 1;
    }
    so.stall_ms = (int)stall_ms;
    long max_msg, max_out, ping_s;
    if (config_int(cfg, "NETRA_MAX_MESSAGE_BYTES", 1 << 20, 1024, 1L << 30,
                   &max_msg, err, sizeof err) < 0 ||
        config_int(cfg, "NETRA_MAX_OUTBOX_BYTES", 8L << 20, 65536, 1L << 32,
                   &max_out, err, sizeof err) < 0 ||
        config_int(cfg, "NETRA_WS_PING_S", 30, 1, 3600, &ping_s, err,
                   sizeof err) < 0) {
        log_msg(NLOG_ERROR, "netra", "%s", err);
        config_free(cfg);
        return 1;
    }
    so.max_message_bytes = (size_t)max_msg;
    so.max_outbox_bytes = (size_t)max_out;
    so.ping_s = (int)ping_s;

    runtime *rt = runtime_new(cfg);
    if (!rt) return 1;
    const char *env = config_environment(rt->cfg);
    log_msg(NLOG_INFO, "netra", "netra %s starting in %s (home %s)",
            NETRA_VERSION, env, config_home(rt->cfg));

    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGHUP);
    pthread_sigmask(SIG_BLOCK, &set, NULL);
    signal(SIGPIPE, SIG_IGN);

    rt->server = server_start(rt, &so, err, sizeof err);
    if (!rt->server) {
        log_msg(NLOG_ERROR, "server", "%s", err);
        runtime_free(rt);
        return 1;
    }
    log_msg(NLOG_INFO, "server", "listening on http://%s%s%s:%d (/health, "
            "/health/live, /health/ready, /ws)",
            strchr(so.host, ':') ? "[" : "", so.host,
            strchr(so.host, ':') ? "]" : "", server_port(rt->server));
    bridge *b = bridge_new(rt, rt->server);
    if (!b) {
        log_msg(NLOG_ERROR, "server", "out of memory making the bridge");
        server_stop(rt->server, 0);
        server_free(rt->server);
        runtime_free(rt);
        return 1;
    }
    disp_pool *pool = NULL;
    reload *gens = NULL; /* owns pool and s.policy once made */
    console *con = console_start(rt, server_port(rt->server));
    server_register_bridge(rt->server, NULL, err, sizeof err);
    health_start(rt->health);

    startup s = {.rt = rt};
    atomic_store(&s.outcome, -1);
    pthread_t th;
    pthread_create(&th, NULL, startup_main, &s);

    int rc = 0, sig = 0;
    bool joined = false;
    while (!sig) {
        sig = wait_signal(&set);
        if (sig == SIGHUP) {
            serve_reload(rt);
            sig = 0;
        }
        reload_collect(gens);
        int outcome = atomic_load(&s.outcome);
        if (!joined && outcome >= 0) {
            pthread_join(th, NULL);
            joined = true;
            if (outcome != POLICY_OK) {
                log_msg(NLOG_ERROR, "startup", "%s", s.err);
                log_msg(NLOG_ERROR, "startup",
                        "startup refused in %s; exiting", env);
                rc = 1;
                break;
            }
            pool = start_pool(rt);
            if (!pool) {
                log_msg(NLOG_ERROR, "startup",
                        "startup refused in %s; exiting", env);
                rc = 1;
                break;
            }
            bridge_set_dispatcher(b, pool, rt->tools);
            gens = reload_new(rt, b, s.policy, pool);
            console_set_policy(con, s.policy);
            console_set_pool(con, pool);
            runtime_set_started(rt);
            log_msg(NLOG_INFO, "netra", "ready in %s on port %d", env,
                    server_port(rt->server));
        }
    }
    if (sig) {
        log_msg(NLOG_INFO, "netra", "%s received: readiness off, closing "
                "connections (grace %ld ms)", strsignal(sig), grace_ms);
    }

    /* Readiness turns 503 first, while HTTP is still served, so that a
     * load balancer stops sending; then runs in flight get the grace to
     * end; what is left is cancelled (runs end with agent_error); then
     * every client gets 1001. */
    runtime_set_stopping(rt);
    console_stop(con);
    server_begin_close(rt->server);
    int64_t now = server_now_ms();
    int64_t drain_until = now + drain_ms, grace_until = now + grace_ms;
    while (server_now_ms() < drain_until) {
        struct timespec ts = {.tv_sec = 0, .tv_nsec = 20 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    while (bridge_in_flight(b) > 0 && server_now_ms() < grace_until) {
        struct timespec ts = {.tv_sec = 0, .tv_nsec = 20 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    if (bridge_in_flight(b) > 0) {
        log_msg(NLOG_INFO, "netra", "cancelling %d request(s) still running "
                "after the grace period", bridge_in_flight(b));
        bridge_cancel_all(b, "the server is shutting down");
        int64_t until = server_now_ms() + 2000;
        while (bridge_in_flight(b) > 0 && server_now_ms() < until) {
            struct timespec ts = {.tv_sec = 0, .tv_nsec = 20 * 1000 * 1000};
            nanosleep(&ts, NULL);
        }
    }
    health_stop(rt->health);
    server_stop(rt->server, 2000);
    bridge_set_dispatcher(b, NULL, NULL);
    if (gens) reload_free(gens); /* every generation's pool and policy */
    else disp_pool_free(pool);
    /* What analytics accepted is in the spool; one last send, and the
     * rest waits there for the next start. */
    analytics_stop(rt->analytics, (int)grace_ms);
    rt->analytics = NULL;
    if (!joined) {
        /* The policy is still running (a long connection retry): its
         * thread ends with the process. */
        log_msg(NLOG_INFO, "netra", "stopped during startup");
        return rc;
    }
    health_free(rt->health);
    rt->health = NULL;
    if (!gens) policy_close(s.policy);
    server_free(rt->server);
    rt->server = NULL;
    bridge_free(b);
    runtime_free(rt);
    if (!rc) log_msg(NLOG_INFO, "netra", "stopped");
    return rc;
}

/* ---- repl ------------------------------------------------------------------- */

static repl_status local_eval(void *ud, const char *chunk, char **text) {
    return repl_eval(ud, chunk, text);
}

static char **local_complete(void *ud, const char *line) {
    return repl_complete(ud, line);
}

static const char repl_banner[] =
    "netra %s REPL, environment %s. Helpers: health() report() "
    "components()\n"
    "tools() agents() dispatch_as{user_id=, thread_id=}(tool, args) "
    "query(sql) reload()\n"
    "Tab completes; Ctrl-D leaves.";

/* `netra repl` without --attach: the policy applied in this process (not
 * serving), and a prompt in the policy's state. */
static int cmd_repl_local(const options *o) {
    config *cfg = load_config(o);
    if (!cfg) return 1;
    runtime *rt = runtime_new(cfg);
    if (!rt) return 1;

    char err[8192], notice[8400] = "";
    policy *p = policy_open(rt, err, sizeof err);
    if (!p)
        snprintf(notice, sizeof notice, "policy not applied: %s", err);
    else if (policy_start(p, err, sizeof err) != POLICY_OK)
        snprintf(notice, sizeof notice, "the policy refused to start: %s",
                 err);
    health_start(rt->health);
    disp_pool *pool = p && !notice[0] ? start_pool(rt) : NULL;

    repl_options ro = {.rt = rt, .policy = p, .who = "local", .tag = "repl"};
    repl *r = repl_new(&ro, err, sizeof err);
    int rc = 1;
    if (!r) {
        fprintf(stderr, "netra repl: %s\n", err);
    } else {
        char banner[512];
        snprintf(banner, sizeof banner, repl_banner, NETRA_VERSION,
                 config_environment(rt->cfg));
        repl_set_pool(r, pool);
        rterm_evaluator ev = {r, local_eval, local_complete};
        rc = rterm_run(&ev, banner, notice[0] ? notice : NULL);
        repl_free(r);
    }
    disp_pool_free(pool);
    health_stop(rt->health);
    health_free(rt->health);
    rt->health = NULL;
    policy_close(p);
    runtime_free(rt);
    return rc;
}

static repl_status attach_eval(void *ud, const char *chunk, char **text) {
    return console_eval(ud, chunk, text);
}

static char **attach_complete(void *ud, const char *line) {
    return console_complete(ud, line);
}

/* `netra repl --attach [PATH]`: evaluates in a running server. With no
 * PATH, the only socket in the run directory; several or none: exit 2. */
static int cmd_repl_attach(const options *o) {
    config *cfg = load_config(o);
    if (!cfg) return 1;
    char dir[4096], path[4400], list[8192], err[1024], hello[1024];
    if (o->attach_path) {
        snprintf(path, sizeof path, "%s", o->attach_path);
    } else {
        console_run_dir(cfg, dir, sizeof dir);
        int n = console_find(dir, path, sizeof path, list, sizeof list);
        if (n != 1) {
            if (n == 0)
                fprintf(stderr, "netra repl: no control socket in %s - is "
                        "netra serve running (console on)? Or give the "
                        "path: --attach PATH\n", dir);
            else
                fprintf(stderr, "netra repl: %d control sockets in %s; "
                        "pick one with --attach PATH:\n%s", n, dir, list);
            config_free(cfg);
            return 2;
        }
    }
    config_free(cfg);
    console_client *cc = console_connect(path, hello, sizeof hello, err,
                                         sizeof err);
    if (!cc) {
        fprintf(stderr, "netra repl: %s\n", err);
        return 1;
    }
    rterm_evaluator ev = {cc, attach_eval, attach_complete};
    int rc = rterm_run(&ev, hello, NULL);
    console_close(cc);
    return rc;
}

/* `netra repl --serve`: the server runs in this process, as `netra
 * serve` would, and the prompt evaluates beside it in a state of its own
 * (the server's threads keep serving while the prompt waits or runs). */
static int cmd_repl_serve(const options *o) {
    config *cfg = load_config(o);
    if (!cfg) return 1;
    signal(SIGPIPE, SIG_IGN);
    char err[8192], notice[8400] = "";
    serve *s = serve_start(cfg, err, sizeof err);
    if (!s) {
        fprintf(stderr, "netra repl: %s\n", err);
        return 1;
    }
    for (int i = 0; i < 600 && serve_get_state(s, NULL, 0) == SERVE_STARTING;
         i++) {
        struct timespec ts = {.tv_sec = 0, .tv_nsec = 100 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    serve_state st = serve_get_state(s, err, sizeof err);
    runtime *rt = serve_runtime(s);
    if (st == SERVE_REFUSED)
        snprintf(notice, sizeof notice,
                 "the policy refused to start (not serving /ws): %s", err);
    else if (st == SERVE_STARTING)
        snprintf(notice, sizeof notice, "still starting after 60 s");
    else
        snprintf(notice, sizeof notice, "serving on 127.0.0.1:%d",
                 serve_port(s));

    repl_options ro = {.rt = rt, .policy = serve_policy(s),
                       .own_state = true, .who = "local", .tag = "repl"};
    repl *r = repl_new(&ro, err, sizeof err);
    int rc = 1;
    if (!r) {
        fprintf(stderr, "netra repl: %s\n", err);
    } else {
        char banner[512];
        snprintf(banner, sizeof banner, repl_banner, NETRA_VERSION,
                 config_environment(rt->cfg));
        repl_set_pool(r, serve_pool(s));
        rterm_evaluator ev = {r, local_eval, local_complete};
        rc = rterm_run(&ev, banner, notice);
        repl_free(r);
    }
    serve_stop(s);
    return rc;
}

static int cmd_repl(const options *o) {
    if (o->serve) return cmd_repl_serve(o);
    if (o->attach) return cmd_repl_attach(o);
    return cmd_repl_local(o);
}

int main(int argc, char **argv) {
    if (argc >= 2 && !strcmp(argv[1], "run"))
        return scenario_main(argc - 2, argv + 2);
    options o;
    int rc = parse_args(argc, argv, &o);
    if (rc) return rc;
    if (!strcmp(o.command, "serve")) return cmd_serve(&o);
    if (!strcmp(o.command, "check")) return cmd_check(&o);
    if (!strcmp(o.command, "token")) return cmd_token(&o);
    if (!strcmp(o.command, "repl")) return cmd_repl(&o);
    if (!strcmp(o.command, "version") || !strcmp(o.command, "--version")) {
        printf("netra %s\n", NETRA_VERSION);
        return 0;
    }
    if (!strcmp(o.command, "help") || !strcmp(o.command, "--help") ||
        !strcmp(o.command, "-h"))
        return usage(stdout, 0);
    fprintf(stderr, "netra: unknown command '%s'\n\n", o.command);
    return usage(stderr, 2);
}
