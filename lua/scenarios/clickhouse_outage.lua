--- An optional ClickHouse that goes away and comes back (needs: clickhouse,
--- a server of the scenario's own). Staging with ClickHouse configured is
--- healthy; when the server stops, the component turns unhealthy and the
--- whole degraded while readiness holds (ClickHouse is optional there);
--- after a restart it is healthy again.
--- Run: netra run lua/scenarios/clickhouse_outage.lua
local scenario = require("netra.scenario")

local s = scenario.new("staging rides out a ClickHouse outage")

local ch = s:clickhouse()
local up, err = ch:start()
s:ok(up, "a private ClickHouse server starts on loopback", err)
if not up then
  return
end
s:like(ch.address, "^127%.0%.0%.1:%d+$", "it listens on 127.0.0.1")

local settings = ch:settings()
settings.NETRA_JWT_SECRET = "scenario-secret-outage-0123456789abcdef"
settings.NETRA_ADMIN_TOKEN = "scenario-admin-token-outage"
local rt = assert(s:start({ env = "staging", settings = settings }))
s:is(rt:state(), "ready", "staging with ClickHouse becomes ready")

local function clickhouse_status()
  local _, doc = rt:health("/health")
  local comp = type(doc) == "table" and doc.netra and doc.netra.components.clickhouse
  return comp and comp.status, doc
end

local function becomes(want, what)
  local got
  local ok = s:wait_for(function()
    got = clickhouse_status()
    return got == want
  end, 30000, 200)
  s:ok(ok, what, ("clickhouse status %s, want %s"):format(tostring(got), want))
end

becomes("healthy", "the clickhouse component is healthy")

s:ok(ch:stop(), "the ClickHouse server stops")
becomes("unhealthy", "after it stops, the component turns unhealthy")
local status, doc = rt:health("/health")
s:is(status, 200, "/health still answers 200 (warn)")
s:is(type(doc) == "table" and doc.status, "warn", "overall is warn: degraded, not failed")
s:is((rt:health("/health/ready")), 200, "ready holds: ClickHouse is optional in staging")

s:ok(ch:restart(), "the ClickHouse server restarts on the same port")
becomes("healthy", "after the restart, the component is healthy again")
