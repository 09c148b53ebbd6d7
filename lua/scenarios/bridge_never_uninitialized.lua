--- Staging failure 2: health must describe the architecture that runs.
--- A health system expected a global WebSocket bridge singleton after the
--- code had moved to one bridge per connection, and reported
--- "agent_websocket_bridge reported unhealthy status: uninitialized".
--- Here /health is polled from before the runtime is ready, through
--- clients connecting and disconnecting: the bridge's status is always a
--- real one, healthy once ready, and its observed connections follow the
--- clients.
--- Run: netra run lua/scenarios/bridge_never_uninitialized.lua
local scenario = require("netra.scenario")

local s = scenario.new("the bridge is never reported uninitialized")
local netra = require("netra")

-- A policy that holds startup for a while, so that there is a "before
-- ready" to watch.
local policy = s:write("slow_policy.lua", ([[
  local netra = require("netra")
  local real = dofile(%q)
  local slow = {}
  function slow.start()
    netra.startup.phase("scenario_hold")
    netra.startup.sleep(1500)
    return real.start()
  end
  slow.check = real.check
  return slow
]]):format(netra.config.home() .. "/lua/netra/policy.lua"))

local rt = assert(s:start({ env = "test", policy = policy, wait = false }))

-- Every poll: the bridge's status, the phase, and its observed connections.
local seen = { polls = 0, bad = {}, statuses = {}, before_ready = 0, not_healthy_when_ready = {} }

local function poll()
  local status, doc = rt:health("/health")
  seen.polls = seen.polls + 1
  if type(doc) ~= "table" then
    seen.bad[#seen.bad + 1] = ("HTTP %s, body %s"):format(tostring(status), tostring(doc))
    return nil
  end
  local bridge = ((doc.netra or {}).components or {}).agent_websocket_bridge
  local bstatus = bridge and bridge.status
  seen.statuses[tostring(bstatus)] = true
  if not bstatus or not scenario.statuses[bstatus] then
    local phase = doc.netra and doc.netra.phase
    seen.bad[#seen.bad + 1] = ("phase %s: bridge status %s"):format(
      tostring(phase), tostring(bstatus))
  end
  local phase = doc.netra and doc.netra.phase
  if phase ~= "ready" then
    seen.before_ready = seen.before_ready + 1
  elseif bstatus ~= "healthy" then
    seen.not_healthy_when_ready[#seen.not_healthy_when_ready + 1] = tostring(bstatus)
  end
  local check = (doc.checks or {})["agent_websocket_bridge:connections"]
  local observed = check and check[1] and check[1].observedValue
  return phase, observed and observed.connections, bstatus
end

-- Before ready: live answers, ready says 503, the bridge is real.
s:is((rt:get("/health/live")), 200, "/health/live answers at once")
-- The policy is loaded first (phase "policy"), then holds.
local rstatus, rdoc
s:wait_for(function()
  rstatus, rdoc = rt:health("/health/ready")
  return type(rdoc) == "table" and rdoc.phase == "scenario_hold"
end, 5000, 10)
s:is(rstatus, 503, "/health/ready is 503 while the policy runs")
s:is(type(rdoc) == "table" and rdoc.phase, "scenario_hold", "and names the phase")

local became_ready = s:wait_for(function()
  return poll() == "ready"
end, 30000, 25)
s:ok(became_ready, "the runtime becomes ready")
s:ok(seen.before_ready > 0, "/health was read before ready",
  ("%d poll(s) before ready"):format(seen.before_ready))

local function connections_become(n, what)
  local got
  local ok = s:wait_for(function()
    local _, count = poll()
    got = count
    return count == n
  end, 10000, 50)
  s:ok(ok, what, ("observed connections %s, want %d"):format(tostring(got), n))
end

connections_become(0, "no connections observed before any client")

local users = { "alice", "bob", "carol" }
local clients = {}
for i, user in ipairs(users) do
  local c, err = s:connect({ user = user })
  s:ok(c, user .. " connects", err)
  clients[i] = c
end
connections_become(3, "the bridge observes 3 connections")

local c1 = clients[1]
if c1 then
  local r = c1:call("echo", { text = "hello" })
  s:is(r and r.content and r.content[1].text, "hello", "a connected client is served")
end

clients[1]:close()
connections_become(2, "after one client leaves, 2 connections")
clients[2]:close()
clients[3]:close()
connections_become(0, "after all leave, 0 connections")

local cstatus, comp = rt:health("/health/agent_websocket_bridge")
s:is(cstatus, 200, "/health/agent_websocket_bridge answers 200")
s:is(type(comp) == "table" and comp.status, "pass", "and says pass")

local _, body = rt:get("/health")
s:ok(not tostring(body):find("uninitialized", 1, true), "no health answer mentions 'uninitialized'")
s:is(#seen.bad, 0, ("every one of %d poll(s) saw a real bridge status"):format(seen.polls))
for _, line in ipairs(seen.bad) do
  s:diag(line)
end
s:is(#seen.not_healthy_when_ready, 0, "the bridge is healthy in every poll once ready")
local names = {}
for name in pairs(seen.statuses) do
  names[#names + 1] = name
end
table.sort(names)
s:diag("bridge statuses seen: " .. table.concat(names, ", "))
