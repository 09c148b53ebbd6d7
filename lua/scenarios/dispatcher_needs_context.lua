--- Staging failure 3: no tool runs outside a user's context.
--- A dispatcher created without a user context shared state between
--- concurrent users ("GLOBAL STATE USAGE: UnifiedToolDispatcher created
--- without user context"). Here a dispatcher without a context is
--- refused, a tool that assigns a global is stopped, and two users who
--- run agents at the same time each see only their own events.
--- Run: netra run lua/scenarios/dispatcher_needs_context.lua
local scenario = require("netra.scenario")
local netra = require("netra")

local s = scenario.new("a dispatcher needs a context; users see only their own events")

-- 1. No context, no dispatcher (the C path behind netra.dispatcher.new).
local ok, err = pcall(netra.dispatcher.new)
s:ok(not ok, "a dispatcher without a context is refused")
s:like(tostring(err), "GLOBAL STATE USAGE", "with the GLOBAL STATE USAGE error")

ok, err = pcall(netra.dispatcher.new, {})
s:ok(not ok, "a context without a user is refused", tostring(err))
ok, err = pcall(netra.dispatcher.new, { user_id = "default" })
s:ok(not ok, "a placeholder user id ('default') is refused", tostring(err))
local d
ok, d = pcall(netra.dispatcher.new, { user_id = "scenario_alice" })
s:ok(ok and d, "a dispatcher with a real user's context is made", tostring(d))

-- 2. A tool that keeps global state is stopped, for that request only.
local tool = s:write("global_counter.lua", [[
return {
  name = "global_counter",
  description = "counts calls in a global (and must be stopped)",
  inputSchema = { type = "object" },
  handler = function(ctx, args)
    calls = 1
    return "calls: 1"
  end,
}
]])
local echo_tool = netra.config.home() .. "/lua/netra/tools/echo.lua"
local started, serr = netra.dispatcher.start({ workers = 1, tools = { tool, echo_tool } })
s:ok(started, "a pool with a global-assigning tool starts", serr)
if started then
  local result = netra.dispatcher.new({ user_id = "scenario_alice" }):call("global_counter", {})
  s:is(result and result.isError, true, "the global-assigning tool answers an error result")
  local text = result and result.content and result.content[1] and result.content[1].text
  s:like(text, "GLOBAL STATE USAGE: tool 'global_counter' assigned global 'calls'",
    "naming the tool and the global")
  local bob = netra.dispatcher.new({ user_id = "scenario_bob" })
  local echo = bob:call("echo", { text = "unharmed" })
  s:is(echo and echo.content and echo.content[1].text, "unharmed",
    "the next request on the worker is unharmed")
  netra.dispatcher.stop()
end

-- 3. Two users at once over real WebSocket clients, in staging with tokens.
local rt = assert(s:start({
  env = "staging",
  unset = { "CLICKHOUSE_URL", "CLICKHOUSE_HOST" },
  settings = { NETRA_JWT_SECRET = "scenario-secret-dispatch-0123456789abcdef", NETRA_WORKERS = 2 },
}))
s:is(rt:state(), "ready", "the staging runtime is ready")

local alice = assert(s:connect({ user = "alice" }))
local bob = assert(s:connect({ user = "bob" }))

local ROUNDS = 3
local runs = { alice = {}, bob = {} }
for round = 1, ROUNDS do
  -- Both runs are started before either is waited for: they run at once.
  local a_id, a_err = alice:start_run("daily_brief", { name = "Alice " .. round })
  local b_id, b_err = bob:start_run("daily_brief", { name = "Bob " .. round })
  s:ok(a_id and b_id, ("round %d: both runs start"):format(round),
    tostring(a_err) .. " " .. tostring(b_err))
  runs.alice[#runs.alice + 1] = a_id
  runs.bob[#runs.bob + 1] = b_id
end

local function check_user(client, user, own)
  for i, run_id in ipairs(own) do
    local events, final = client:wait_run(run_id)
    s:ok(events, ("%s's run %d ends"):format(user, i), tostring(final))
    events = events or {}
    s:is(events[1] and events[1].type, "agent_started",
      ("%s's run %d starts with agent_started"):format(user, i))
    s:is(final and final.type, "agent_completed",
      ("%s's run %d ends with agent_completed"):format(user, i))
    s:is(events[#events], final, ("%s's run %d: the final event is last"):format(user, i))
  end
  local own_ids = {}
  for _, id in ipairs(own) do
    own_ids[id] = true
  end
  local foreign = {}
  for _, ev in ipairs(client:events()) do
    if ev.user_id ~= user or not own_ids[ev.run_id] then
      foreign[#foreign + 1] = ("%s %s of %s"):format(ev.type, tostring(ev.run_id),
        tostring(ev.user_id))
    end
  end
  s:is(#foreign, 0, user .. " received only their own events", table.concat(foreign, "\n"))
  s:ok(#client:events() >= #own * 3, user .. " received the events of all their runs")
  -- Each run was started with the user's own name: its result greets
  -- that name and no other.
  local name = user:sub(1, 1):upper() .. user:sub(2)
  local wrong = {}
  for _, ev in ipairs(client:events("agent_completed")) do
    local greeting = tostring(ev.result and ev.result.greeting)
    if not greeting:find("Hello " .. name .. " ", 1, true) then
      wrong[#wrong + 1] = greeting
    end
  end
  s:is(#wrong, 0, user .. "'s results greet " .. name, table.concat(wrong, "\n"))
end

check_user(alice, "alice", runs.alice)
check_user(bob, "bob", runs.bob)

-- Another user's run is invisible: bob cannot cancel alice's run.
local result, cerr = bob:request("agents/cancel", { run_id = runs.alice[1] })
s:ok(not result, "bob cannot cancel alice's run")
s:like(type(cerr) == "table" and cerr.message, "run not found", "it is 'run not found' to him")
