-- luacheck settings for netra's Lua: no globals, ever.
std = "lua54"
max_line_length = 100
files["spec"] = { std = "+busted" }
