/* runtime: the state one process shares between its parts. */
#include "runtime.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "disp.h"

runtime *runtime_new(config *cfg) {
    runtime *rt = calloc(1, sizeof *rt);
    if (!rt) {
        config_free(cfg);
        return NULL;
    }
    rt->cfg = cfg;
    rt->health = health_new();
    if (!rt->health) {
        config_free(cfg);
        free(rt);
        return NULL;
    }
    pthread_mutex_init(&rt->lock, NULL);
    pthread_mutexattr_t attr;
    pthread_mutexattr_init(&attr);
    pthread_mutexattr_settype(&attr, PTHREAD_MUTEX_RECURSIVE);
    pthread_mutex_init(&rt->lua_lock, &attr);
    pthread_mutexattr_destroy(&attr);
    snprintf(rt->phase, sizeof rt->phase, "starting");
    return rt;
}

void runtime_free(runtime *rt) {
    if (!rt) return;
    if (rt->health) health_free(rt->health);
    disp_registry_unref(rt->tools);
    config_free(rt->cfg);
    pthread_mutex_destroy(&rt->lock);
    pthread_mutex_destroy(&rt->lua_lock);
    free(rt);
}

void runtime_set_phase(runtime *rt, const char *phase) {
    pthread_mutex_lock(&rt->lock);
    snprintf(rt->phase, sizeof rt->phase, "%s", phase);
    pthread_mutex_unlock(&rt->lock);
}

void runtime_phase(runtime *rt, char *out, size_t size) {
    pthread_mutex_lock(&rt->lock);
    snprintf(out, size, "%s", rt->phase);
    pthread_mutex_unlock(&rt->lock);
}

void runtime_set_started(runtime *rt) {
    pthread_mutex_lock(&rt->lock);
    rt->started = true;
    snprintf(rt->phase, sizeof rt->phase, "ready");
    pthread_mutex_unlock(&rt->lock);
}

void runtime_set_stopping(runtime *rt) {
    pthread_mutex_lock(&rt->lock);
    rt->stopping = true;
    snprintf(rt->phase, sizeof rt->phase, "stopping");
    pthread_mutex_unlock(&rt->lock);
}

bool runtime_ready(runtime *rt) {
    pthread_mutex_lock(&rt->lock);
    bool ok = rt->started && !rt->stopping;
    pthread_mutex_unlock(&rt->lock);
    return ok && health_required_ok(rt->health);
}

void runtime_requests_changed(void *ud, int delta) {
    runtime *rt = ud;
    atomic_fetch_add(&rt->requests, delta);
}
