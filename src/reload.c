/* reload: the entry point for reloading a running server (see reload.h). */
#include "reload.h"

#include <stdio.h>

#include "log.h"

int reload_request(runtime *rt, const char *who, char *err, size_t err_size) {
    (void)rt;
    /* TODO: re-run the policy into fresh Lua states and swap the tool
     * registry (a task of its own); until then the running generation
     * keeps serving, which is what a failed reload must do anyway. */
    snprintf(err, err_size, "reload is not available in this version; the "
                            "running policy and tools stay - restart the "
                            "server to apply changes");
    log_msg(NLOG_WARN, "reload", "%s asked for a reload: %s", who, err);
    return -1;
}
