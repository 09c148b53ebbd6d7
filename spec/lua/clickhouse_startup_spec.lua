-- needs: clickhouse
-- The policy's ClickHouse rows against a real server, or its absence:
-- optional and unreachable, required and unreachable, and the background
-- check following a server that is killed and started again.
local proc = require("support.proc")

local root = os.getenv("NETRA_HOME")

--- A loopback port with nothing listening on it.
local function dead_port()
  local socket = require("socket")
  local s = assert(socket.bind("127.0.0.1", 0))
  local _, port = s:getsockname()
  s:close()
  return port
end

local function count(text, pattern)
  local n = 0
  for _ in text:gmatch(pattern) do
    n = n + 1
  end
  return n
end

describe("ClickHouse at startup", function()
  local srv

  after_each(function()
    if srv then
      srv:kill()
      srv = nil
    end
  end)

  it("starts degraded when optional and unreachable, with one warning and no errors", function()
    local url = ("http://127.0.0.1:%d/default"):format(dead_port())
    srv = assert(proc.serve({ args = "--env development",
      env = { CLICKHOUSE_URL = url, CLICKHOUSE_REQUIRED = "false", NETRA_LOG_FORMAT = "text" } }))
    assert.truthy(proc.wait_for(function()
      return srv:get("/health/ready") == 200
    end, 10000), srv:log())
    local status, body = srv:get("/health")
    assert.equal(200, status)
    local doc = proc.json(body)
    assert.equal("warn", doc.status)
    assert.equal("degraded", doc.netra.status)
    assert.equal("unhealthy", doc.netra.components.clickhouse.status)
    assert.is_false(doc.netra.components.clickhouse.required)
    local log = srv:log()
    assert.equal(1, count(log, "\n[^\n]- warn "), log)
    assert.equal(0, count(log, "\n[^\n]- error "), log)
    assert.matches("optional ClickHouse unreachable", log, 1, true)
  end)

  it("refuses to start when required and unreachable, after retrying", function()
    local url = ("http://127.0.0.1:%d/default"):format(dead_port())
    local code, _, err = proc.run("serve --env staging --listen 127.0.0.1:0",
      { CLICKHOUSE_URL = url, CLICKHOUSE_REQUIRED = "true" })
    assert.equal(1, code)
    assert.matches("required in staging but unreachable after 3 attempt(s)", err, 1, true)
    assert.matches("could not connect to ClickHouse", err, 1, true)
  end)

  it("connects when configured and reports the server", function()
    local address = proc.read(os.getenv("NETRA_TEST_CLICKHOUSE")):gsub("%s", "")
    srv = assert(proc.serve({ args = "--env development",
      env = { CLICKHOUSE_URL = "http://" .. address .. "/default" } }))
    assert.truthy(proc.wait_for(function()
      return srv:get("/health/ready") == 200
    end, 10000), srv:log())
    local doc = proc.json(select(2, srv:get("/health/clickhouse")))
    assert.equal("healthy", doc.netra.status)
    assert.matches("connected: ClickHouse 18", srv:log(), 1, true)
  end)

  it("follows a ClickHouse that is killed and restarted, without restarting netra", function()
    local dir = proc.tmpdir("ch-private")
    local script = root .. "/spec/support/clickhouse.sh"
    assert(os.execute(("%s start %s >/dev/null"):format(script, dir)))
    local address = proc.read(dir .. "/address"):gsub("%s", "")
    local ok, err = pcall(function()
      srv = assert(proc.serve({ args = "--env development",
        env = { CLICKHOUSE_URL = "http://" .. address .. "/default" } }))
      local function state()
        local _, body = srv:get("/health/clickhouse")
        return body and proc.json(body).netra.status
      end
      assert.truthy(proc.wait_for(function() return state() == "healthy" end, 20000))
      assert(os.execute(("%s kill %s"):format(script, dir)))
      assert.truthy(proc.wait_for(function() return state() == "unhealthy" end, 30000),
        srv:log())
      assert.equal(200, (srv:get("/health/live")))
      assert(os.execute(("%s start %s %s >/dev/null"):format(script, dir,
        address:match(":(%d+)$"))))
      assert.truthy(proc.wait_for(function() return state() == "healthy" end, 30000),
        srv:log())
    end)
    os.execute(("%s stop %s >/dev/null"):format(script, dir))
    assert(ok, err)
  end)
end)
