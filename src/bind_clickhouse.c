/* bind_clickhouse: netra.clickhouse - connect, query, insert, exec, kill
 * and escaping for Lua, over the blocking calls of clickhouse.h. Errors a
 * caller can handle come back as nil, message, code. */
#include "bind_clickhouse.h"

#include <lauxlib.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "clickhouse.h"

#define CLIENT_MT "netra.clickhouse.client"
#define ROWS_MT "netra.clickhouse.rows"

typedef struct {
    ch_client *c;
} client_ud;

/* ---- settings from a Lua table ----------------------------------------- */

/* CLICKHOUSE_X -> the short key also accepted in connect{...}. */
static const char *short_key(const char *key) {
    static const char *map[][2] = {
        {"CLICKHOUSE_URL", "url"},       {"CLICKHOUSE_HOST", "host"},
        {"CLICKHOUSE_PORT", "port"},     {"CLICKHOUSE_USER", "user"},
        {"CLICKHOUSE_PASSWORD", "password"}, {"CLICKHOUSE_DB", "db"},
        {"CLICKHOUSE_SECURE", "secure"},
    };
    for (size_t i = 0; i < sizeof map / sizeof *map; i++)
        if (strcmp(map[i][0], key) == 0)
            return map[i][1];
    return NULL;
}

typedef struct {
    lua_State *L;
    int table;
} getter_ud;

/* Leaves the value on the stack (the caller resets the top after). */
static const char *table_get(void *ud, const char *key) {
    getter_ud *g = ud;
    lua_State *L = g->L;
    const char *keys[3] = {key, short_key(key), NULL};
    if (strcmp(key, "CLICKHOUSE_DB") == 0)
        keys[2] = "database";
    luaL_checkstack(L, 4, "settings");
    for (int i = 0; i < 3; i++) {
        if (!keys[i])
            continue;
        int t = lua_getfield(L, g->table, keys[i]);
        if (t == LUA_TBOOLEAN) {
            bool b = lua_toboolean(L, -1);
            lua_pop(L, 1);
            lua_pushstring(L, b ? "true" : "false");
            return lua_tostring(L, -1);
        }
        if (t == LUA_TSTRING || t == LUA_TNUMBER)
            return lua_tostring(L, -1);
        lua_pop(L, 1);
    }
    return NULL;
}

static long opt_int(lua_State *L, int t, const char *k, long dflt) {
    lua_getfield(L, t, k);
    long v = lua_isinteger(L, -1) ? (long)lua_tointeger(L, -1) : dflt;
    lua_pop(L, 1);
    return v;
}

static ch_options read_options(lua_State *L, int t) {
    ch_options o = {0};
    o.connect_timeout_ms = opt_int(L, t, "connect_timeout_ms", 0);
    o.timeout_ms = opt_int(L, t, "timeout_ms", 30000);
    o.retries = (int)opt_int(L, t, "retries", 0);
    o.retry_backoff_ms = opt_int(L, t, "retry_backoff_ms", 0);
    o.max_idle_ms = opt_int(L, t, "max_idle_ms", 0);
    o.max_response_bytes = (size_t)opt_int(L, t, "max_response_bytes", 0);
    lua_getfield(L, t, "insecure_tls");
    o.insecure_tls = lua_toboolean(L, -1);
    lua_pop(L, 1);
    return o;
}

/* Parses settings from the table at index t. Returns the ch_settings_parse
 * code; pushes nothing. */
static int read_settings(lua_State *L, int t, ch_settings *s, char *warning,
                         size_t wn, char *error, size_t en) {
    int top = lua_gettop(L);
    getter_ud g = {L, lua_absindex(L, t)};
    int rc = ch_settings_parse(s, table_get, &g, warning, wn, error, en);
    lua_settop(L, top);
    return rc;
}

static int fail(lua_State *L, const ch_error *e) {
    lua_pushnil(L);
    lua_pushstring(L, e->message);
    lua_pushinteger(L, e->code);
    return 3;
}

static int fail_text(lua_State *L, const char *msg) {
    lua_pushnil(L);
    lua_pushstring(L, msg);
    return 2;
}

/* ---- module functions -------------------------------------------------- */

static client_ud *push_client(lua_State *L, ch_client *c) {
    client_ud *u = lua_newuserdatauv(L, sizeof *u, 0);
    u->c = c;
    luaL_setmetatable(L, CLIENT_MT);
    return u;
}

/* new(cfg) -> client (not connected), warning | nil, message */
static int l_new(lua_State *L) {
    luaL_checktype(L, 1, LUA_TTABLE);
    ch_settings s;
    char warning[512], error[512];
    int rc = read_settings(L, 1, &s, warning, sizeof warning, error,
                           sizeof error);
    if (rc == CH_UNSET)
        return fail_text(L, "ClickHouse is not configured - set "
                         "CLICKHOUSE_URL or CLICKHOUSE_HOST");
    if (rc != CH_OK)
        return fail_text(L, error);
    ch_options o = read_options(L, 1);
    ch_client *c = ch_client_new(&s, &o);
    ch_settings_free(&s);
    if (!c)
        return luaL_error(L, "out of memory making a ClickHouse client");
    push_client(L, c);
    if (*warning) {
        lua_pushstring(L, warning);
        return 2;
    }
    return 1;
}

/* connect(cfg) -> client, warning? | nil, message, code */
static int l_connect(lua_State *L) {
    int n = l_new(L);
    if (lua_isnil(L, -n))
        return n;
    client_ud *u = luaL_checkudata(L, -n, CLIENT_MT);
    ch_error e;
    if (ch_connect(u->c, &e) != CH_OK)
        return fail(L, &e);
    return n;
}

/* settings(cfg) -> {host, port, user, database, secure}, warning | nil, msg.
 * The password is never returned. */
static int l_settings(lua_State *L) {
    luaL_checktype(L, 1, LUA_TTABLE);
    ch_settings s;
    char warning[512], error[512];
    int rc = read_settings(L, 1, &s, warning, sizeof warning, error,
                           sizeof error);
    if (rc == CH_UNSET)
        return fail_text(L, "ClickHouse is not configured");
    if (rc != CH_OK)
        return fail_text(L, error);
    lua_createtable(L, 0, 6);
    lua_pushstring(L, s.host);
    lua_setfield(L, -2, "host");
    lua_pushinteger(L, s.port);
    lua_setfield(L, -2, "port");
    lua_pushstring(L, s.user);
    lua_setfield(L, -2, "user");
    lua_pushstring(L, s.database);
    lua_setfield(L, -2, "database");
    lua_pushboolean(L, s.secure);
    lua_setfield(L, -2, "secure");
    lua_pushboolean(L, *s.password != '\0');
    lua_setfield(L, -2, "has_password");
    ch_settings_free(&s);
    lua_pushstring(L, warning);
    return 2;
}

/* missing(cfg) -> array of setting names that must be set */
static int l_missing(lua_State *L) {
    luaL_checktype(L, 1, LUA_TTABLE);
    const char *names[8];
    int top = lua_gettop(L);
    getter_ud g = {L, 1};
    size_t n = ch_settings_missing(table_get, &g, names, 8);
    lua_settop(L, top);
    lua_createtable(L, (int)n, 0);
    for (size_t i = 0; i < n && i < 8; i++) {
        lua_pushstring(L, names[i]);
        lua_rawseti(L, -2, (lua_Integer)i + 1);
    }
    return 1;
}

static int push_escaped(lua_State *L, char *(*fn)(const char *, size_t)) {
    size_t len;
    const char *s = luaL_checklstring(L, 1, &len);
    char *q = fn(s, len);
    if (!q)
        return luaL_error(L, "out of memory");
    lua_pushstring(L, q);
    free(q);
    return 1;
}

static int l_quote(lua_State *L) { return push_escaped(L, ch_quote); }

static int l_ident(lua_State *L) { return push_escaped(L, ch_ident); }

static int l_new_query_id(lua_State *L) {
    char id[37];
    ch_new_query_id(id);
    lua_pushstring(L, id);
    return 1;
}

/* ---- values ------------------------------------------------------------ */

static void push_value(lua_State *L, const ch_value *v) {
    switch (v->kind) {
    case CH_BOOL: lua_pushboolean(L, v->u.b); break;
    case CH_INT: lua_pushinteger(L, (lua_Integer)v->u.i); break;
    case CH_FLOAT: lua_pushnumber(L, v->u.f); break;
    case CH_STRING: lua_pushlstring(L, v->u.s.ptr, v->u.s.len); break;
    case CH_ARRAY:
        luaL_checkstack(L, 4, "result nesting");
        lua_createtable(L, (int)v->u.a.len, 0);
        for (size_t i = 0; i < v->u.a.len; i++) {
            push_value(L, &v->u.a.items[i]);
            lua_rawseti(L, -2, (lua_Integer)i + 1);
        }
        break;
    default: lua_pushnil(L);
    }
}

/* rows (array of tables keyed by column), meta {columns, query_id, rows} */
static void push_result(lua_State *L, const ch_result *r) {
    lua_createtable(L, (int)r->nrows, 0);
    for (size_t i = 0; i < r->nrows; i++) {
        lua_createtable(L, 0, (int)r->ncols);
        for (size_t j = 0; j < r->ncols; j++) {
            push_value(L, ch_cell(r, i, j));
            lua_setfield(L, -2, r->columns[j].name);
        }
        lua_rawseti(L, -2, (lua_Integer)i + 1);
    }
    lua_createtable(L, 0, 3);
    lua_createtable(L, (int)r->ncols, 0);
    for (size_t j = 0; j < r->ncols; j++) {
        lua_createtable(L, 0, 2);
        lua_pushstring(L, r->columns[j].name);
        lua_setfield(L, -2, "name");
        lua_pushstring(L, r->columns[j].type);
        lua_setfield(L, -2, "type");
        lua_rawseti(L, -2, (lua_Integer)j + 1);
    }
    lua_setfield(L, -2, "columns");
    lua_pushstring(L, r->query_id);
    lua_setfield(L, -2, "query_id");
    lua_pushinteger(L, (lua_Integer)r->nrows);
    lua_setfield(L, -2, "rows");
}

/* An array value as a SQL literal, e.g. [1,'a'], into b. */
static void array_literal(lua_State *L, int idx, luaL_Buffer *b, int depth) {
    if (depth > 16)
        luaL_error(L, "insert: arrays nested too deeply");
    idx = lua_absindex(L, idx);
    lua_Integer n = (lua_Integer)lua_rawlen(L, idx);
    luaL_addchar(b, '[');
    for (lua_Integer i = 1; i <= n; i++) {
        if (i > 1)
            luaL_addchar(b, ',');
        int t = lua_rawgeti(L, idx, i);
        if (t == LUA_TSTRING) {
            size_t len;
            const char *s = lua_tolstring(L, -1, &len);
            char *q = ch_quote(s, len);
            if (!q)
                luaL_error(L, "out of memory");
            lua_pop(L, 1);
            luaL_addstring(b, q);
            free(q);
            continue;
        }
        if (t == LUA_TTABLE) {
            array_literal(L, -1, b, depth + 1);
            lua_pop(L, 1);
        } else if (t == LUA_TNUMBER) {
            luaL_tolstring(L, -1, NULL);
            lua_remove(L, -2);
            luaL_addvalue(b);
        } else if (t == LUA_TBOOLEAN) {
            luaL_addchar(b, lua_toboolean(L, -1) ? '1' : '0');
            lua_pop(L, 1);
        } else {
            lua_pop(L, 1);
            luaL_addstring(b, "NULL");
        }
    }
    luaL_addchar(b, ']');
}

/* Appends the value at the top of the stack as one field; pops it. */
static int add_field(lua_State *L, ch_rows *rows) {
    int rc;
    switch (lua_type(L, -1)) {
    case LUA_TNIL: rc = ch_rows_null(rows); break;
    case LUA_TBOOLEAN: rc = ch_rows_int(rows, lua_toboolean(L, -1)); break;
    case LUA_TNUMBER:
        rc = lua_isinteger(L, -1)
                 ? ch_rows_int(rows, (int64_t)lua_tointeger(L, -1))
                 : ch_rows_double(rows, lua_tonumber(L, -1));
        break;
    case LUA_TSTRING: {
        size_t len;
        const char *s = lua_tolstring(L, -1, &len);
        rc = ch_rows_str(rows, s, len);
        break;
    }
    case LUA_TTABLE: {
        luaL_Buffer b;
        int at = lua_gettop(L);
        luaL_buffinit(L, &b);
        array_literal(L, at, &b, 0);
        luaL_pushresult(&b);
        size_t len;
        const char *s = lua_tolstring(L, -1, &len);
        rc = ch_rows_literal(rows, s, len);
        lua_pop(L, 1);
        break;
    }
    default:
        return luaL_error(L, "insert: a %s cannot go into ClickHouse",
                          luaL_typename(L, -1));
    }
    lua_pop(L, 1);
    return rc;
}

/* ---- client methods ----------------------------------------------------- */

static client_ud *check_client(lua_State *L) {
    return luaL_checkudata(L, 1, CLIENT_MT);
}

/* Reads opts {query_id, stream, readonly, timeout_ms, settings} at idx;
 * the settings string stays on the stack while the call runs. */
static void read_query_opts(lua_State *L, int idx, ch_query_opts *o) {
    memset(o, 0, sizeof *o);
    if (lua_isnoneornil(L, idx))
        return;
    luaL_checktype(L, idx, LUA_TTABLE);
    lua_getfield(L, idx, "query_id");
    o->query_id = lua_tostring(L, -1); /* kept on the stack */
    lua_getfield(L, idx, "stream");
    o->stream = lua_toboolean(L, -1);
    lua_pop(L, 1);
    lua_getfield(L, idx, "readonly");
    o->readonly = lua_toboolean(L, -1);
    lua_pop(L, 1);
    o->timeout_ms = opt_int(L, idx, "timeout_ms", 0);
    lua_getfield(L, idx, "settings");
    o->settings = lua_tostring(L, -1); /* kept on the stack */
}

static int m_ping(lua_State *L) {
    client_ud *u = check_client(L);
    ch_error e;
    if (ch_ping(u->c, &e) != CH_OK)
        return fail(L, &e);
    lua_pushboolean(L, 1);
    return 1;
}

static int m_query(lua_State *L) {
    client_ud *u = check_client(L);
    const char *sql = luaL_checkstring(L, 2);
    ch_query_opts o;
    read_query_opts(L, 3, &o);
    ch_result *r = NULL;
    ch_error e;
    if (ch_query(u->c, sql, &o, &r, &e) != CH_OK)
        return fail(L, &e);
    push_result(L, r);
    ch_result_free(r);
    return 2;
}

static int m_exec(lua_State *L) {
    client_ud *u = check_client(L);
    const char *sql = luaL_checkstring(L, 2);
    ch_query_opts o;
    read_query_opts(L, 3, &o);
    ch_error e;
    if (ch_exec(u->c, sql, &o, &e) != CH_OK)
        return fail(L, &e);
    lua_pushboolean(L, 1);
    return 1;
}

/* Fills rows from the Lua rows table at index 4; returns the count or -1
 * when out of memory. Raises on a bad value. */
static lua_Integer fill_rows(lua_State *L, ch_rows *rows,
                             const char **names, size_t ncols) {
    lua_Integer n = (lua_Integer)lua_rawlen(L, 4);
    for (lua_Integer i = 1; i <= n; i++) {
        if (lua_rawgeti(L, 4, i) != LUA_TTABLE)
            luaL_error(L, "insert: row %d is not a table", (int)i);
        bool positional = lua_rawlen(L, -1) > 0;
        for (size_t j = 0; j < ncols; j++) {
            if (positional)
                lua_rawgeti(L, -1, (lua_Integer)j + 1);
            else
                lua_getfield(L, -1, names[j]);
            if (add_field(L, rows) != CH_OK)
                return -1;
        }
        lua_pop(L, 1);
        if (ch_rows_end(rows) != CH_OK)
            return -1;
    }
    return n;
}

/* insert(table, columns, rows, opts?) -> count | nil, message, code */
static int m_insert(lua_State *L) {
    client_ud *u = check_client(L);
    const char *table = luaL_checkstring(L, 2);
    luaL_checktype(L, 3, LUA_TTABLE);
    luaL_checktype(L, 4, LUA_TTABLE);
    size_t ncols = lua_rawlen(L, 3);
    luaL_argcheck(L, ncols > 0, 3, "give the column names");
    ch_query_opts o;
    read_query_opts(L, 5, &o);

    const char **names = lua_newuserdatauv(L, ncols * sizeof *names, 0);
    for (size_t j = 0; j < ncols; j++) {
        if (lua_rawgeti(L, 3, (lua_Integer)j + 1) != LUA_TSTRING)
            return luaL_argerror(L, 3, "column names must be strings");
        names[j] = lua_tostring(L, -1);
        lua_pop(L, 1); /* still referenced by the columns table */
    }
    /* a Lua error while filling must not leak rows: the box frees them */
    ch_rows **box = lua_newuserdatauv(L, sizeof *box, 0);
    *box = NULL;
    luaL_setmetatable(L, ROWS_MT);
    ch_rows *rows = *box = ch_rows_new();
    if (!rows)
        return luaL_error(L, "out of memory");
    lua_Integer n = fill_rows(L, rows, names, ncols);
    ch_error e;
    int rc = n < 0 ? CH_ERR
                   : ch_insert(u->c, table, names, ncols, rows, &o, &e);
    if (n < 0)
        snprintf(e.message, sizeof e.message, "out of memory");
    ch_rows_free(rows);
    *box = NULL;
    if (rc != CH_OK)
        return fail(L, &e);
    lua_pushinteger(L, n);
    return 1;
}

static int m_kill(lua_State *L) {
    client_ud *u = check_client(L);
    const char *id = luaL_checkstring(L, 2);
    int killed = 0;
    ch_error e;
    if (ch_kill(u->c, id, &killed, &e) != CH_OK)
        return fail(L, &e);
    lua_pushinteger(L, killed);
    return 1;
}

static int m_connect(lua_State *L) {
    client_ud *u = check_client(L);
    ch_error e;
    if (ch_connect(u->c, &e) != CH_OK)
        return fail(L, &e);
    lua_pushboolean(L, 1);
    return 1;
}

static int m_version(lua_State *L) {
    client_ud *u = check_client(L);
    if (!ch_connected(u->c))
        return fail_text(L, CH_NOT_CONNECTED);
    lua_pushstring(L, ch_version(u->c));
    return 1;
}

static int m_timezone(lua_State *L) {
    client_ud *u = check_client(L);
    if (!ch_connected(u->c))
        return fail_text(L, CH_NOT_CONNECTED);
    lua_pushstring(L, ch_timezone(u->c));
    return 1;
}

static int m_connected(lua_State *L) {
    lua_pushboolean(L, ch_connected(check_client(L)->c));
    return 1;
}

static int m_stats(lua_State *L) {
    ch_stats s = ch_client_stats(check_client(L)->c);
    lua_createtable(L, 0, 3);
    lua_pushinteger(L, (lua_Integer)s.requests);
    lua_setfield(L, -2, "requests");
    lua_pushinteger(L, (lua_Integer)s.stale_retries);
    lua_setfield(L, -2, "stale_retries");
    lua_pushinteger(L, (lua_Integer)s.connect_retries);
    lua_setfield(L, -2, "connect_retries");
    return 1;
}

static int m_close(lua_State *L) {
    ch_close(check_client(L)->c);
    return 0;
}

static int m_gc(lua_State *L) {
    client_ud *u = luaL_checkudata(L, 1, CLIENT_MT);
    ch_client_free(u->c);
    u->c = NULL;
    return 0;
}

static int m_tostring(lua_State *L) {
    client_ud *u = check_client(L);
    lua_pushfstring(L, "clickhouse client (%s)",
                    ch_connected(u->c) ? ch_version(u->c) : "not connected");
    return 1;
}

static int rows_gc(lua_State *L) {
    ch_rows **box = luaL_checkudata(L, 1, ROWS_MT);
    ch_rows_free(*box);
    *box = NULL;
    return 0;
}

int bind_clickhouse(lua_State *L) {
    static const luaL_Reg methods[] = {
        {"ping", m_ping},       {"query", m_query},
        {"insert", m_insert},   {"exec", m_exec},
        {"kill", m_kill},       {"connect", m_connect},
        {"version", m_version}, {"timezone", m_timezone},
        {"connected", m_connected}, {"stats", m_stats},
        {"close", m_close},     {NULL, NULL},
    };
    static const luaL_Reg funcs[] = {
        {"connect", l_connect},   {"new", l_new},
        {"settings", l_settings}, {"missing", l_missing},
        {"quote", l_quote},       {"ident", l_ident},
        {"new_query_id", l_new_query_id}, {NULL, NULL},
    };
    if (luaL_newmetatable(L, ROWS_MT)) {
        lua_pushcfunction(L, rows_gc);
        lua_setfield(L, -2, "__gc");
    }
    lua_pop(L, 1);
    if (luaL_newmetatable(L, CLIENT_MT)) {
        luaL_newlib(L, methods);
        lua_setfield(L, -2, "__index");
        lua_pushcfunction(L, m_gc);
        lua_setfield(L, -2, "__gc");
        lua_pushcfunction(L, m_close);
        lua_setfield(L, -2, "__close");
        lua_pushcfunction(L, m_tostring);
        lua_setfield(L, -2, "__tostring");
    }
    lua_pop(L, 1);
    luaL_newlib(L, funcs);
    return 1;
}
