--- Staging failure 1: an optional analytics store must not stop startup.
--- A staging deployment without ClickHouse died with "Required secrets
--- missing: ['CLICKHOUSE_URL']". Here staging starts with no ClickHouse
--- configured, becomes ready, and reports the component as disabled (not
--- unhealthy, not degrading the whole), with the skip line in its log.
--- Run: netra run lua/scenarios/staging_without_clickhouse.lua
local scenario = require("netra.scenario")

local s = scenario.new("staging without ClickHouse starts ready with the component disabled")

local rt = assert(s:start({
  env = "staging",
  -- Nothing may point this runtime at a ClickHouse server.
  unset = { "CLICKHOUSE_URL", "CLICKHOUSE_HOST" },
  settings = {
    NETRA_JWT_SECRET = "scenario-secret-staging-0123456789abcdef",
    NETRA_ADMIN_TOKEN = "scenario-admin-token-4242",
  },
}))

local state, why = rt:state()
s:is(state, "ready", "staging becomes ready without ClickHouse")
if why then
  s:diag(why)
end

local status, ready = rt:health("/health/ready")
s:is(status, 200, "/health/ready answers 200")
s:diag(ready)

local hstatus, doc = rt:health("/health")
s:is(hstatus, 200, "/health answers 200")
doc = type(doc) == "table" and doc or {}
s:is(doc.status, "pass", "overall health is pass: a disabled component never degrades the whole")
local netra_doc = doc.netra or {}
local ch = (netra_doc.components or {}).clickhouse or {}
s:is(ch.status, "disabled", "the clickhouse component is disabled")
s:is(ch.required, false, "the clickhouse component is not required in staging")
s:like(ch.message, "CLICKHOUSE_REQUIRED=false", "its message says why it is disabled")
s:is(netra_doc.environment, "staging", "health names the environment")

local cstatus, comp = rt:health("/health/clickhouse")
s:is(cstatus, 200, "/health/clickhouse answers 200 for a disabled component")
s:is(type(comp) == "table" and comp.status, "pass", "and says pass")

local log = rt:log()
s:like(log, "Skipping connection in staging %- CLICKHOUSE_REQUIRED=false",
  "the log has the skip line operators grep for")
s:ok(not log:find('"level":"error"', 1, true), "startup wrote no error line", log)
s:ok(not log:find("Required secrets missing", 1, true), "nobody asked for CLICKHOUSE_URL")

-- The runtime serves: a user with a token calls a tool, and a ClickHouse
-- call fails with the documented message instead of taking anything down.
local client, err = s:connect({ user = "staging_alice" })
s:ok(client, "a client with a signed token connects", err)
if client then
  local echo = client:call("echo", { text = "still standing" })
  s:is(echo and echo.content and echo.content[1].text, "still standing", "echo works")
  local recent = client:call("analytics_recent_calls", {})
  s:is(recent and recent.isError, true, "a ClickHouse tool answers an error result")
  s:like(recent and recent.content and recent.content[1].text, "Not connected to ClickHouse%.",
    "with 'Not connected to ClickHouse.'")
  client:close()
end

local _, _, refused = s:connect({})
s:is(refused, 401, "a client without a token is refused with 401 in staging")
