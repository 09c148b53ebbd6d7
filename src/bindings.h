/* bindings: the `netra` Lua module, bound to one runtime: config, log,
 * health and startup for the policy, the REPL and specs.
 *
 * Threads: a lua_State belongs to one thread at a time; Lua health checks
 * run on checker threads and take rt->lua_lock, so whoever else runs Lua
 * in the same state must hold it too. */
#ifndef NETRA_BINDINGS_H
#define NETRA_BINDINGS_H

#include <lua.h>

#include "runtime.h"

/* Pushes a new `netra` module table bound to rt. Can't fail (raises a
 * Lua error when out of memory). */
int bindings_push(lua_State *L, runtime *rt);

/* Registers `netra` in package.preload of L, bound to rt, and sets
 * package.path to <home>/lua/?.lua;<home>/lua/?/init.lua first. */
void bindings_preload(lua_State *L, runtime *rt);

/* Converts between cJSON and Lua values. bindings_push_json pushes one
 * value (null becomes nil, or the light userdata netra.null inside
 * arrays). bindings_to_json returns NULL with err filled for functions,
 * cycles and nesting deeper than 64. */
#include <cJSON.h>
void bindings_push_json(lua_State *L, const cJSON *v);
cJSON *bindings_to_json(lua_State *L, int index, char *err, size_t size);

#endif
