/* module: the `netra` Lua C module for lua5.4 and busted. */
#include <lauxlib.h>
#include <lua.h>

int luaopen_netra(lua_State *L);

int luaopen_netra(lua_State *L) {
    lua_newtable(L);
    return 1;
}
