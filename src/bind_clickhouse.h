/* bind_clickhouse: the Lua face of the ClickHouse client (the future
 * `netra.clickhouse`). Blocking calls only; see doc/clickhouse.md.
 *
 * Threads: the table and the clients it makes belong to the lua_State's
 * thread, like everything in that state. */
#ifndef NETRA_BIND_CLICKHOUSE_H
#define NETRA_BIND_CLICKHOUSE_H

#include <lua.h>

/* Pushes a new table with connect, new, settings, missing, quote, ident
 * and new_query_id, and registers the client metatable. Returns 1 (the
 * number of values pushed). Raises a Lua error only when out of memory. */
int bind_clickhouse(lua_State *L);

#endif
