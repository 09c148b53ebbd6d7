/* policy: runs the startup policy (lua/netra/policy.lua, or the file named
 * by NETRA_POLICY) in a Lua state of its own, with the `netra` module
 * bound to the runtime.
 *
 * Threads: the caller's thread; every call holds rt->lua_lock while it
 * runs Lua, so Lua health checks of this state wait for it. */
#ifndef NETRA_POLICY_H
#define NETRA_POLICY_H

#include <lua.h>
#include <stdio.h>

#include "runtime.h"

typedef struct policy policy;

/* Outcomes of policy_start. */
enum {
    POLICY_OK = 0,
    POLICY_REFUSED = 1, /* the policy decided not to start; err says why */
    POLICY_FAILED = 2,  /* a Lua error: err has file, line and traceback */
};

/* Creates the state and loads the policy file. Returns NULL with err
 * filled (a syntax error names file and line). */
policy *policy_open(runtime *rt, char *err, size_t err_size);

/* Runs policy.start(). Returns POLICY_OK, POLICY_REFUSED or
 * POLICY_FAILED, with err filled when not OK. */
int policy_start(policy *p, char *err, size_t err_size);

/* Runs policy.check() and prints its report to out. Returns 0 when
 * startup would proceed, 1 when not, 2 on a Lua error (printed). */
int policy_check(policy *p, FILE *out);

/* The Lua state (for the REPL); use it under rt->lua_lock. */
lua_State *policy_state(policy *p);

/* The path of the policy file, as shown in messages. */
const char *policy_path(const policy *p);

/* Closes the state. Components with Lua checks must be gone first. */
void policy_close(policy *p);

#endif
