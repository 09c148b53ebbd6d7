/* module: the `netra` Lua C module, for lua5.4 and busted.
 *
 * `require "netra"` binds the module to a runtime made from the process
 * environment (ENVIRONMENT, NETRA_HOME, config/<env>.env), created on the
 * first require and kept for the life of the process: busted may open
 * the module more than once. */
#include <pthread.h>
#include <stdio.h>

#include <lauxlib.h>
#include <lua.h>

#include "bindings.h"
#include "config.h"
#include "runtime.h"

int luaopen_netra(lua_State *L);

static pthread_mutex_t module_lock = PTHREAD_MUTEX_INITIALIZER;
static runtime *module_runtime;

int luaopen_netra(lua_State *L) {
    char err[1024] = "";
    pthread_mutex_lock(&module_lock);
    if (!module_runtime) {
        config *cfg = config_new();
        if (cfg && config_load(cfg, err, sizeof err) == 0)
            module_runtime = runtime_new(cfg);
        else
            config_free(cfg);
    }
    runtime *rt = module_runtime;
    pthread_mutex_unlock(&module_lock);
    if (!rt) return luaL_error(L, "netra: %s", err[0] ? err : "out of memory");
    return bindings_push(L, rt);
}
