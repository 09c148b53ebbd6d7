--- The operators' REPL: evaluating chunks, printing values readably, the
--- helpers (health, report, components, tools, agents, dispatch_as,
--- query, reload) and tab completion. The C side (src/repl.c) makes a
--- session with a `host` table of what only it can do, and calls
--- `eval` and `complete`; the same code serves `netra repl` and the
--- control socket of `netra serve`.
local repl = {}

--- Key words that mark a value as secret (compared without case).
repl.secret_words = { "password", "secret", "token", "api_key", "apikey", "authorization",
  "credential", "private_key" }

local MAX_DEPTH = 12
local INLINE_WIDTH = 72


--- Is this table key secret-looking?
---@param key any
---@return boolean
function repl.is_secret_key(key)
  if type(key) ~= "string" then
    return false
  end
  local lower = key:lower()
  for _, word in ipairs(repl.secret_words) do
    if lower:find(word, 1, true) then
      return true
    end
  end
  return false
end


local type_order = { number = 1, string = 2, boolean = 3 }

local function key_less(a, b)
  local ta, tb = type(a), type(b)
  if ta ~= tb then
    return (type_order[ta] or 9) < (type_order[tb] or 9)
      or ((type_order[ta] or 9) == (type_order[tb] or 9) and ta < tb)
  end
  if ta == "number" or ta == "string" then
    return a < b
  end
  return tostring(a) < tostring(b)
end


local function scalar(v)
  if type(v) == "string" then
    return (("%q"):format(v):gsub("\\\n", "\\n"))
  end
  return tostring(v)
end


local function key_text(k)
  if type(k) == "string" and k:match("^[%a_][%w_]*$") then
    return k
  end
  return "[" .. scalar(k) .. "]"
end


local render

--- "table 0x..." for a table (its address, whatever __tostring says).
local function address(t)
  local mt = getmetatable(t)
  if type(mt) == "table" and mt.__tostring then
    return ("table %s"):format(("%p"):format(t))
  end
  return (tostring(t):gsub("^table: ", "table "))
end

--- Renders a table: sequences first without keys, then sorted keys.
local function render_table(t, indent, path)
  if path[t] then
    return ("<cycle: %s>"):format(address(t))
  end
  if path.depth >= MAX_DEPTH then
    return ("<%s: nested too deeply>"):format(address(t))
  end
  local n = #t
  local keys = {}
  for k in next, t do
    if not (math.type(k) == "integer" and k >= 1 and k <= n) then
      keys[#keys + 1] = k
    end
  end
  table.sort(keys, key_less)
  if n == 0 and #keys == 0 then
    return "{}"
  end

  path[t] = true
  path.depth = path.depth + 1
  local inner = indent .. "  "
  local items, simple = {}, true
  for i = 1, n do
    local v = rawget(t, i)
    simple = simple and type(v) ~= "table"
    items[#items + 1] = render(v, inner, path)
  end
  for _, k in ipairs(keys) do
    local v = rawget(t, k)
    local text
    if repl.is_secret_key(k) then
      text = '"[REDACTED]"'
    else
      simple = simple and type(v) ~= "table"
      text = render(v, inner, path)
    end
    items[#items + 1] = key_text(k) .. " = " .. text
  end
  path[t] = nil
  path.depth = path.depth - 1

  local line = "{ " .. table.concat(items, ", ") .. " }"
  if simple and #line + #indent <= INLINE_WIDTH and not line:find("\n", 1, true) then
    return line
  end
  return "{\n" .. inner .. table.concat(items, ",\n" .. inner) .. ",\n" .. indent .. "}"
end


render = function(v, indent, path)
  if type(v) == "table" then
    return render_table(v, indent, path)
  end
  return scalar(v)
end


--- Renders any value readably: tables nested, keys sorted, cycles shown
--- as `<cycle: table 0x...>`, secret-looking keys as "[REDACTED]".
---@param value any
---@return string
function repl.pretty(value)
  return render(value, "", { depth = 0 })
end


--- Renders results the way the prompt shows them: one per line.
---@param n integer how many values
---@return string|nil text nil when there is nothing to show
function repl.format(n, ...)
  if n == 0 then
    return nil
  end
  local parts = {}
  for i = 1, n do
    local v = select(i, ...)
    parts[i] = type(v) == "string" and v or repl.pretty(v)
  end
  return table.concat(parts, "\n")
end


-- ---- what runs in the policy's state ------------------------------------

--- The plan of a policy as plain data (no functions), in phase order.
local function plan_data(policy)
  local ok, plan = pcall(policy.plan)
  if not ok then
    return nil, "policy.plan() failed: " .. tostring(plan)
  end
  local out = {}
  for _, phase in ipairs(plan.phases) do
    for _, c in ipairs(phase.components) do
      local d = c.decision or {}
      out[#out + 1] = {
        name = c.name, phase = phase.name, state = d.state, why = d.reason,
        problem = d.problem, advice = d.advice,
      }
    end
  end
  return out
end


--- Runs a helper's part that needs the policy itself: "components" or
--- "query". Called directly by a local REPL (its state is the policy's)
--- and by the control socket's bridge into the server's policy state.
---@param policy table|nil the policy module
---@param name string
---@param arg any
---@return any result
---@return string|nil err
function repl.policy_side(policy, name, arg)
  if type(policy) ~= "table" then
    return nil, "no policy is loaded in this process"
  end
  if name == "components" then
    return plan_data(policy)
  elseif name == "query" then
    local client = policy.clickhouse
    if not client or not client:connected() then
      return nil, "Not connected to ClickHouse."
    end
    local rows, err = client:query(arg)
    if not rows then
      return nil, tostring(err)
    end
    return rows
  end
  return nil, "unknown helper " .. tostring(name)
end


--- Re-runs the policy file in this state (a local REPL): loads it
--- afresh and runs start(); the new policy replaces the old one only
--- when it started.
---@return boolean|nil ok
---@return string|nil err
function repl.rerun_policy()
  local netra = require("netra")
  local path = netra.config.get("NETRA_POLICY")
    or netra.config.home() .. "/lua/netra/policy.lua"
  local loaded, fresh = pcall(dofile, path)
  if not loaded then
    return nil, "policy " .. path .. " failed to load: " .. tostring(fresh)
  end
  local ran, ok, err = pcall(fresh.start)
  if not ran then
    return nil, "policy " .. path .. " failed: " .. tostring(ok)
  end
  if not ok then
    return nil, err or "the policy refused to start without saying why"
  end
  package.loaded["netra.policy"] = fresh
  return true
end


-- ---- helpers ----------------------------------------------------------------

local function raise(err)
  error(tostring(err), 3)
end


--- Makes the helpers of one session.
---@param netra table the netra module
---@param host table what the C side provides: log(text), policy_call(name,
---  arg) (nil: the policy is in this state), dispatch(fields, tool, args),
---  reload()
---@return table helpers
local function make_helpers(netra, host)
  local helpers = {}

  local function policy_call(name, arg)
    if host.policy_call then
      return host.policy_call(name, arg)
    end
    return repl.policy_side(package.loaded["netra.policy"], name, arg)
  end

  --- The health snapshot (the /health document with details).
  function helpers.health()
    return netra.health.snapshot()
  end

  --- A short text report: overall, then each component's status and message.
  function helpers.report()
    local lines = { ("overall: %s (environment %s, phase %s)"):format(
      netra.health.overall(), netra.environment, netra.startup.phase()) }
    for _, name in ipairs(netra.health.components()) do
      local c = netra.health.get(name)
      if c then
        lines[#lines + 1] = ("  %-24s %-9s %s%s"):format(name, c.status,
          c.required and "" or "(optional) ", c.message or "")
      end
    end
    return table.concat(lines, "\n")
  end

  --- Each component as the policy decides it: required, optional or
  --- disabled, and why.
  function helpers.components()
    local list, err = policy_call("components")
    if not list then
      raise(err)
    end
    return list
  end

  local function listed(kind)
    if not netra.dispatcher or not netra.dispatcher.list then
      return {}
    end
    local out = {}
    for _, item in ipairs(netra.dispatcher.list()[kind] or {}) do
      out[item.name] = item.description or ""
    end
    return out
  end

  --- Registered tools: name = description.
  function helpers.tools()
    return listed("tools")
  end

  --- Registered agents: name = description.
  function helpers.agents()
    return listed("agents")
  end

  --- dispatch_as{user_id=, thread_id=}(tool, args): calls a tool as that
  --- user, through the same context validation, pool and events as a
  --- real request; logged as an operator action.
  function helpers.dispatch_as(fields)
    if type(fields) ~= "table" then
      error("dispatch_as{user_id = ..., thread_id = ...}(tool, args): "
        .. "give the context as a table", 2)
    end
    return function(tool, args)
      if type(tool) ~= "string" then
        error("dispatch_as(...)(tool, args): tool must be a name", 2)
      end
      local result, events = host.dispatch(fields, tool, args)
      if result == nil then
        raise(events)
      end
      return result, events
    end
  end

  --- Runs SQL on the policy's ClickHouse client; rows, or an error
  --- ("Not connected to ClickHouse.").
  function helpers.query(sql)
    if type(sql) ~= "string" then
      error("query(sql): sql must be a string", 2)
    end
    host.log("query: " .. sql)
    local rows, err = policy_call("query", sql)
    if rows == nil then
      return nil, err
    end
    return rows
  end

  --- Re-runs the policy (locally) or asks the server to reload.
  function helpers.reload()
    host.log("reload")
    local ok, err
    if host.reload then
      ok, err = host.reload()
    else
      ok, err = repl.rerun_policy()
    end
    if not ok then
      raise(err)
    end
    return ok
  end

  return helpers
end


--- Makes a session: its chunk environment holds `netra` (with
--- `netra.repl`, the helpers), each helper as a bare name, and a `print`
--- that writes where the host says; anything else comes from _G.
---@param host table see make_helpers; also write(text)
---@return table session
function repl.session(host)
  local netra = require("netra")
  local helpers = make_helpers(netra, host)
  netra.repl = helpers
  local env = setmetatable({}, { __index = _G })
  for name, fn in pairs(helpers) do
    env[name] = fn
  end
  env.netra = netra
  env.print = function(...)
    local n = select("#", ...)
    local parts = {}
    for i = 1, n do
      parts[i] = tostring((select(i, ...)))
    end
    host.write(table.concat(parts, "\t") .. "\n")
  end
  return { env = env, host = host, helpers = helpers }
end


--- The error and a traceback of the chunk's frames only.
local function traceback(msg)
  if type(msg) ~= "string" then
    msg = repl.pretty(msg)
  end
  local text = debug.traceback(msg, 2)
  local cut = text:find("\n%s*%[C%]: in function 'xpcall'")
  return cut and text:sub(1, cut - 1) or text
end


--- Compiles and runs one chunk, like lua.c: "return <chunk>" first so that
--- bare expressions print, then the chunk; a syntax error at <eof> means
--- more input is needed.
---@param session table
---@param chunk string
---@return string status "ok", "incomplete" or "error"
---@return string|nil text results or the error with a traceback
function repl.eval(session, chunk)
  local fn = load("return " .. chunk, "=stdin", "t", session.env)
  if not fn then
    local err
    fn, err = load(chunk, "=stdin", "t", session.env)
    if not fn then
      if err:sub(-5) == "<eof>" then
        return "incomplete"
      end
      return "error", err
    end
  end
  local results = table.pack(xpcall(fn, traceback))
  if not results[1] then
    return "error", tostring(results[2])
  end
  return "ok", repl.format(results.n - 1, table.unpack(results, 2, results.n))
end


--- Completion candidates for the word ending `line`: names in the
--- session's environment, or fields of a table reached by a dotted path
--- (`netra.he` -> `netra.health`). Methods after `:` too.
---@param session table
---@param line string the text before the cursor
---@return string[] candidates whole words (the path included), sorted
function repl.complete(session, line)
  local word = line:match("[%w_%.:]*$") or ""
  local base, sep, partial = word:match("^(.*)([%.:])([%w_]*)$")
  local target
  if base then
    target = session.env
    for part in base:gmatch("[^%.:]+") do
      if type(target) ~= "table" then
        return {}
      end
      target = target[part]
    end
    if sep == ":" and type(target) ~= "table" then
      local mt = getmetatable(target)
      target = type(mt) == "table" and mt.__index or nil
    end
  else
    target, base, sep, partial = session.env, "", "", word
  end
  if type(target) ~= "table" and type(target) ~= "userdata" then
    return {}
  end

  local seen, out = {}, {}
  local function scan(t, depth)
    if type(t) ~= "table" or depth > 4 then
      return
    end
    for k, v in next, t do
      if type(k) == "string" and k:sub(1, #partial) == partial and not seen[k]
        and k:match("^[%a_][%w_]*$") and (sep ~= ":" or type(v) == "function") then
        seen[k] = true
        out[#out + 1] = base .. sep .. k
      end
    end
    local mt = getmetatable(t)
    if type(mt) == "table" and type(mt.__index) == "table" then
      scan(mt.__index, depth + 1)
    end
  end
  if type(target) == "table" then
    scan(target, 0)
  else
    local mt = getmetatable(target)
    scan(type(mt) == "table" and mt.__index or nil, 0)
  end
  table.sort(out)
  return out
end

return repl
