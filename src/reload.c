/* reload: generations and hot reload (see reload.h). */
#include "reload.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "analytics.h"
#include "log.h"
#include "server.h"

/* One generation: a policy state and the pool made from what it
 * registered (the pool holds its registry). */
typedef struct gen {
    struct gen *next;
    unsigned long number;
    policy *policy;
    disp_pool *pool;
} gen;

struct reload {
    runtime *rt;
    bridge *b;
    pthread_mutex_t lock; /* serialises reloads; guards cur and retired */
    gen *cur;
    gen *retired;         /* waiting for their requests to finish */
    policy *stray;        /* a failed reload's policy that got as far as
                             start(): it may have re-registered health
                             checks that live in its state, so it stays
                             open until a later reload replaces them */
    atomic_ulong generation, failed;
};

typedef struct {
    int64_t time_ms, instructions, memory_bytes;
} budget;

static disp_pool *make_pool(runtime *rt, disp_registry *reg,
                            const budget *bud, char *err, size_t err_size) {
    long workers, per_user, queue_max, max_result;
    if (config_int(rt->cfg, "NETRA_WORKERS", 0, 0, 1024, &workers, err,
                   err_size) < 0 ||
        config_int(rt->cfg, "NETRA_MAX_INFLIGHT_PER_USER", 16, 1, 100000,
                   &per_user, err, err_size) < 0 ||
        config_int(rt->cfg, "NETRA_QUEUE_MAX", 256, 1, 1000000, &queue_max,
                   err, err_size) < 0 ||
        config_int(rt->cfg, "NETRA_MAX_RESULT_BYTES", 4L << 20, 1024,
                   1L << 30, &max_result, err, err_size) < 0)
        return NULL;

    health_info info;
    bool ch_off = health_get(rt->health, "clickhouse", &info) != 0 ||
                  info.status == HEALTH_DISABLED;
    disp_pool_config pc = {
        .workers = (int)workers,
        .queue_max = (int)queue_max,
        .max_inflight_per_user = (int)per_user,
        .max_result_bytes = max_result,
        .time_ms = bud->time_ms,
        .instructions = bud->instructions,
        .memory_bytes = bud->memory_bytes,
        .clickhouse_get = ch_off ? NULL : config_getter,
        .clickhouse_get_ud = rt->cfg,
        .counter_ud = rt,
        .requests_changed = runtime_requests_changed,
        .record_ud = rt->analytics,
        .record = rt->analytics ? analytics_record_call : NULL,
        .record_event = rt->analytics ? analytics_record_event : NULL,
    };
    return disp_pool_new(reg, &pc, err, err_size);
}

disp_pool *reload_pool_new(runtime *rt, disp_registry *reg, char *err,
                           size_t err_size) {
    budget bud = {rt->tool_budget.time_ms, rt->tool_budget.instructions,
                  rt->tool_budget.memory_bytes};
    return make_pool(rt, reg, &bud, err, err_size);
}

reload *reload_new(runtime *rt, bridge *b, policy *p, disp_pool *pool) {
    reload *r = calloc(1, sizeof *r);
    gen *g = calloc(1, sizeof *g);
    if (!r || !g) {
        free(r);
        free(g);
        return NULL;
    }
    g->number = 1;
    g->policy = p;
    g->pool = pool;
    r->rt = rt;
    r->b = b;
    r->cur = g;
    pthread_mutex_init(&r->lock, NULL);
    atomic_init(&r->generation, 1);
    atomic_init(&r->failed, 0);
    rt->reload = r;
    return r;
}

/* Puts the phase back to "ready" after the policy moved it through its
 * phases, unless the process began stopping meanwhile. */
static void restore_phase(runtime *rt) {
    pthread_mutex_lock(&rt->lock);
    if (!rt->stopping) snprintf(rt->phase, sizeof rt->phase, "ready");
    pthread_mutex_unlock(&rt->lock);
}

/* What one policy run produced. */
typedef struct {
    policy *policy;
    disp_registry *reg; /* owned; may be NULL when nothing registered */
    budget bud;
    bool started;       /* start() ran (it may have had side effects) */
} build;

/* Runs the policy in a fresh state with rt->tools and rt->tool_budget
 * pointed at the generation being built, then puts them back. Returns 0,
 * or -1 with err filled (out->policy, out->reg still to be disposed of).
 * Holds rt->lua_lock throughout, so no other Lua sees the swap. */
static int run_policy(runtime *rt, build *out, char *err, size_t err_size) {
    memset(out, 0, sizeof *out);
    pthread_mutex_lock(&rt->lua_lock);
    disp_registry *old_reg = rt->tools;
    budget old_bud = {rt->tool_budget.time_ms, rt->tool_budget.instructions,
                      rt->tool_budget.memory_bytes};
    rt->tools = NULL;
    memset(&rt->tool_budget, 0, sizeof rt->tool_budget);

    int outcome = POLICY_FAILED;
    out->policy = policy_open(rt, err, err_size);
    if (out->policy) {
        out->started = true;
        outcome = policy_start(out->policy, err, err_size);
    }

    out->reg = rt->tools;
    out->bud = (budget){rt->tool_budget.time_ms, rt->tool_budget.instructions,
                        rt->tool_budget.memory_bytes};
    rt->tools = old_reg;
    rt->tool_budget.time_ms = old_bud.time_ms;
    rt->tool_budget.instructions = old_bud.instructions;
    rt->tool_budget.memory_bytes = old_bud.memory_bytes;
    pthread_mutex_unlock(&rt->lua_lock);

    if (outcome == POLICY_REFUSED) {
        char why[2048];
        snprintf(why, sizeof why, "%s", err);
        snprintf(err, err_size, "the policy refused: %s", why);
    }
    return outcome == POLICY_OK ? 0 : -1;
}

/* Disposes of a failed build. */
static void drop_build(reload *r, build *bd) {
    disp_registry_unref(bd->reg);
    if (bd->policy && bd->started) {
        policy *old = r->stray;
        r->stray = bd->policy;
        policy_close(old);
    } else {
        policy_close(bd->policy);
    }
}

/* True when the two registries list different tools. */
static bool tools_differ(disp_registry *a, disp_registry *b) {
    cJSON *ja = a ? disp_registry_tools_json(a) : cJSON_CreateArray();
    cJSON *jb = b ? disp_registry_tools_json(b) : cJSON_CreateArray();
    bool differ = !ja || !jb || !cJSON_Compare(ja, jb, true);
    cJSON_Delete(ja);
    cJSON_Delete(jb);
    return differ;
}

static int count_json(cJSON *array) {
    int n = cJSON_GetArraySize(array);
    cJSON_Delete(array);
    return n;
}

/* The reload itself; r->lock is held. */
static int reload_locked(reload *r, char *err, size_t err_size) {
    runtime *rt = r->rt;
    build bd;
    runtime_set_phase(rt, "reload");
    int rc = run_policy(rt, &bd, err, err_size);
    if (rc == 0 && !bd.reg) {
        char dir[4096];
        snprintf(dir, sizeof dir, "%s/lua", config_home(rt->cfg));
        bd.reg = disp_registry_new(dir);
        if (!bd.reg) {
            snprintf(err, err_size, "out of memory making the registry");
            rc = -1;
        }
    }
    disp_pool *pool = NULL;
    if (rc == 0) {
        char why[2048];
        pool = make_pool(rt, bd.reg, &bd.bud, why, sizeof why);
        if (!pool) {
            snprintf(err, err_size, "the new dispatcher did not start: %s",
                     why);
            rc = -1;
        }
    }
    gen *g = rc == 0 ? calloc(1, sizeof *g) : NULL;
    if (rc == 0 && !g) {
        snprintf(err, err_size, "out of memory");
        rc = -1;
    }
    if (rc < 0) {
        disp_pool_free(pool);
        drop_build(r, &bd);
        restore_phase(rt);
        return -1;
    }

    /* The swap: the registry Lua sees, then the bridge. */
    g->number = atomic_load(&r->generation) + 1;
    g->policy = bd.policy;
    g->pool = pool;
    pthread_mutex_lock(&rt->lua_lock);
    disp_registry *old_reg = rt->tools;
    rt->tools = bd.reg;
    rt->tool_budget.time_ms = bd.bud.time_ms;
    rt->tool_budget.instructions = bd.bud.instructions;
    rt->tool_budget.memory_bytes = bd.bud.memory_bytes;
    gen *old = r->cur;
    r->cur = g;
    pthread_mutex_unlock(&rt->lua_lock);
    bridge_set_dispatcher(r->b, pool, bd.reg);
    atomic_store(&r->generation, g->number);

    bool changed = tools_differ(old_reg, bd.reg);
    if (changed && rt->server)
        server_broadcast(rt->server, "{\"jsonrpc\":\"2.0\",\"method\":"
                                     "\"notifications/tools/list_changed\"}");
    int ntools = count_json(disp_registry_tools_json(bd.reg));
    int nagents = count_json(disp_registry_agents_json(bd.reg));
    disp_registry_unref(old_reg);

    old->next = r->retired;
    r->retired = old;
    int busy = disp_pool_in_flight(old->pool);
    policy_close(r->stray); /* its checks were registered again */
    r->stray = NULL;
    restore_phase(rt);
    log_msg(NLOG_INFO, "reload",
            "reload done: generation %lu serves %d tool(s) and %d agent(s)"
            "%s; generation %lu retires with %d request(s) in flight",
            g->number, ntools, nagents,
            changed ? ", tools changed (clients notified)"
                    : ", tools unchanged",
            old->number, busy);
    return 0;
}

int netra_reload(runtime *rt, char *err, size_t err_size) {
    reload *r = rt ? rt->reload : NULL;
    if (!r) {
        snprintf(err, err_size, "reload: the server has not finished "
                 "starting - retry once /health/ready answers");
        return -1;
    }
    pthread_mutex_lock(&r->lock);
    pthread_mutex_lock(&rt->lock);
    bool stopping = rt->stopping;
    pthread_mutex_unlock(&rt->lock);
    int rc = -1;
    if (stopping) {
        snprintf(err, err_size, "reload: the server is stopping");
    } else {
        log_msg(NLOG_INFO, "reload", "reloading the policy, tools and "
                "agents (generation %lu serving)",
                atomic_load(&r->generation));
        rc = reload_locked(r, err, err_size);
    }
    if (rc < 0) {
        atomic_fetch_add(&r->failed, 1);
        log_msg(NLOG_ERROR, "reload", "reload failed: %s - generation %lu "
                "keeps serving; fix the file and reload again", err,
                atomic_load(&r->generation));
    }
    pthread_mutex_unlock(&r->lock);
    if (rc == 0) reload_collect(r);
    return rc;
}

int reload_collect(reload *r) {
    if (!r) return 0;
    gen *done = NULL;
    int left = 0;
    /* An attached console session may hold a retired generation's
     * policy and pool: keep them all until it ends. */
    bool pinned = atomic_load(&r->rt->pins) > 0;
    pthread_mutex_lock(&r->lock);
    gen **p = &r->retired;
    while (*p) {
        gen *g = *p;
        if (!pinned && disp_pool_in_flight(g->pool) == 0) {
            *p = g->next;
            g->next = done;
            done = g;
        } else {
            left++;
            p = &g->next;
        }
    }
    pthread_mutex_unlock(&r->lock);

    while (done) {
        gen *g = done;
        done = g->next;
        disp_pool_free(g->pool);
        policy_close(g->policy);
        log_msg(NLOG_DEBUG, "reload", "generation %lu freed", g->number);
        free(g);
    }
    return left;
}

void reload_counts(reload *r, unsigned long *generation,
                   unsigned long *failed) {
    if (generation) *generation = r ? atomic_load(&r->generation) : 0;
    if (failed) *failed = r ? atomic_load(&r->failed) : 0;
}

policy *reload_current_policy(runtime *rt) {
    reload *r = rt ? rt->reload : NULL;
    if (!r) return NULL;
    pthread_mutex_lock(&r->lock);
    policy *p = r->cur ? r->cur->policy : NULL;
    pthread_mutex_unlock(&r->lock);
    return p;
}

disp_pool *reload_current_pool(runtime *rt) {
    reload *r = rt ? rt->reload : NULL;
    if (!r) return NULL;
    pthread_mutex_lock(&r->lock);
    disp_pool *pool = r->cur ? r->cur->pool : NULL;
    pthread_mutex_unlock(&r->lock);
    return pool;
}

int reload_request(runtime *rt, const char *who, char *err, size_t size) {
    if (!rt->reload) {
        snprintf(err, size, "the server is still starting: reload once it "
                            "is ready");
        log_msg(NLOG_WARN, "reload", "%s asked for a reload: %s", who, err);
        return -1;
    }
    log_msg(NLOG_INFO, "reload", "%s asked for a reload", who);
    return netra_reload(rt, err, size);
}

void reload_free(reload *r) {
    if (!r) return;
    pthread_mutex_lock(&r->lock); /* a reload under way ends first */
    gen *all = r->cur;
    if (all) all->next = r->retired;
    else all = r->retired;
    r->cur = NULL;
    r->retired = NULL;
    policy *stray = r->stray;
    r->stray = NULL;
    r->rt->reload = NULL;
    pthread_mutex_unlock(&r->lock);

    while (all) {
        gen *g = all;
        all = g->next;
        disp_pool_free(g->pool);
        policy_close(g->policy);
        free(g);
    }
    policy_close(stray);
    pthread_mutex_destroy(&r->lock);
    free(r);
}
