-- `netra serve` as a real process: startup order, health endpoints,
-- policy errors, signals, and the address it binds.
local proc = require("support.proc")

local home = os.getenv("NETRA_HOME")

describe("netra serve", function()
  local srv

  after_each(function()
    if srv then
      srv:kill()
      srv = nil
    end
  end)

  it("starts in test and becomes ready with a healthy bridge", function()
    srv = assert(proc.serve({ args = "--env test" }))
    local ready = proc.wait_for(function()
      return srv:get("/health/ready") == 200
    end)
    assert.truthy(ready, srv:log())

    local status, body, headers = srv:get("/health")
    assert.equal(200, status)
    assert.equal("application/health+json", headers["content-type"])
    assert.equal("no-store", headers["cache-control"])
    local doc = proc.json(body)
    assert.equal("pass", doc.status)
    local check = doc.checks["agent_websocket_bridge:connections"]
    assert.is_table(check)
    assert.equal("pass", check[1].status)
    local bridge = doc.netra.components.agent_websocket_bridge
    assert.equal("healthy", bridge.status)
    assert.is_true(bridge.required)
    assert.equal("test", doc.netra.environment)
    assert.equal("ready", doc.netra.phase)
    assert.matches("listening on 127.0.0.1:" .. srv.port, bridge.message, 1, true)
  end)

  it("reports the port it picked when asked for port 0", function()
    srv = assert(proc.serve({ args = "--env test", listen = "127.0.0.1:0" }))
    assert.is_true(srv.port > 0)
    assert.equal(200, (srv:get("/health/live")))
  end)

  it("binds only the loopback address it was given", function()
    srv = assert(proc.serve({ args = "--env test" }))
    local addrs = proc.listeners(srv.port)
    assert.same({ "0100007F" }, addrs)
  end)

  it("answers live at once and ready 503 with the phase while the policy runs", function()
    local dir = proc.tmpdir("slow-policy")
    proc.write(dir .. "/policy.lua", ([[
      local netra = require("netra")
      local real = dofile(%q)
      local slow = {}
      function slow.start()
        netra.startup.phase("slow_phase")
        netra.startup.sleep(2500)
        return real.start()
      end
      slow.check = real.check
      return slow
    ]]):format(home .. "/lua/netra/policy.lua"))
    srv = assert(proc.serve({ args = "--env test", env = { NETRA_POLICY = dir .. "/policy.lua" } }))
    assert.equal(200, (srv:get("/health/live")))
    local status, body = srv:get("/health/ready")
    assert.equal(503, status)
    assert.equal("slow_phase", proc.json(body).phase)
    local ws = srv:get("/ws", { Upgrade = "websocket", Connection = "Upgrade",
      ["Sec-WebSocket-Key"] = "dGhlIHNhbXBsZSBub25jZQ==", ["Sec-WebSocket-Version"] = "13" })
    assert.equal(503, ws)
    assert.truthy(proc.wait_for(function()
      return srv:get("/health/ready") == 200
    end), srv:log())
  end)

  it("answers each component, 404 for an unknown one, and disabled with 200", function()
    srv = assert(proc.serve({ args = "--env test" }))
    assert.truthy(proc.wait_for(function()
      return srv:get("/health/ready") == 200
    end))
    local status, body = srv:get("/health/clickhouse")
    assert.equal(200, status)
    local doc = proc.json(body)
    assert.equal("disabled", doc.netra.status)
    assert.equal("pass", doc.status)
    assert.equal(404, (srv:get("/health/no_such_thing")))
    assert.equal(404, (srv:get("/nowhere")))
  end)

  it("logs the ClickHouse skip line when optional and not configured", function()
    srv = assert(proc.serve({ args = "--env staging",
      env = { CLICKHOUSE_URL = false, CLICKHOUSE_HOST = false, NETRA_LOG_FORMAT = "text" } }))
    assert.truthy(proc.wait_for(function()
      return srv:get("/health/ready") == 200
    end), srv:log())
    assert.matches("[ClickHouse] Skipping connection in staging - CLICKHOUSE_REQUIRED=false",
      srv:log(), 1, true)
  end)

  it("turns readiness 503 before it closes the listener", function()
    srv = assert(proc.serve({ args = "--env test", env = { NETRA_SHUTDOWN_DRAIN_MS = "1500" } }))
    assert.truthy(proc.wait_for(function()
      return srv:get("/health/ready") == 200
    end))
    srv:signal("TERM")
    local body = proc.wait_for(function()
      local st, b = srv:get("/health/ready")
      if st == 503 then
        return b
      end
    end, 1000)
    assert.truthy(body, "no 503 from /health/ready while draining")
    assert.equal("stopping", proc.json(body).phase)
    assert.equal(200, (srv:get("/health/live")))
    assert.truthy(srv:wait_exit(20000))
    srv = nil
  end)

  it("stops on SIGTERM: readiness off, then exit 0", function()
    srv = assert(proc.serve({ args = "--env test" }))
    assert.truthy(proc.wait_for(function()
      return srv:get("/health/ready") == 200
    end))
    local dir = proc.tmpdir("term")
    -- Wait for the exit status through a shell that owns no child: poll.
    srv:signal("TERM")
    assert.truthy(srv:wait_exit(20000))
    local log = srv:log()
    assert.matches("readiness off", log, 1, true)
    assert.matches("stopped", log, 1, true)
    srv = nil
    assert.truthy(dir)
  end)

  it("exits 0 after SIGINT and SIGTERM, checked through its exit status", function()
    for _, sig in ipairs({ "INT", "TERM" }) do
      local dir = proc.tmpdir("exit")
      local cmd = ("(%s serve --env test --listen 127.0.0.1:0 2>%s/log & pid=$!; "
        .. "for i in $(seq 100); do grep -q 'ready in' %s/log && break; sleep 0.1; done; "
        .. "kill -%s $pid; wait $pid; echo $? > %s/code)"):format(
          os.getenv("NETRA_BIN"), dir, dir, sig, dir)
      os.execute(cmd)
      assert.equal("0", (proc.read(dir .. "/code"):gsub("%s", "")), proc.read(dir .. "/log"))
    end
  end)

  it("refuses to start when the policy has a syntax error, naming file and line", function()
    local dir = proc.tmpdir("bad-policy")
    proc.write(dir .. "/policy.lua", "local x = \nreturn {\n  start = function( end\n}\n")
    local code, _, err = proc.run("serve --env test --listen 127.0.0.1:0",
      { NETRA_POLICY = dir .. "/policy.lua" })
    assert.is_not.equal(0, code)
    assert.matches("policy.lua:2: unexpected symbol near 'return'", err, 1, true)
  end)

  it("refuses to start with a traceback when the policy raises", function()
    local dir = proc.tmpdir("raising-policy")
    proc.write(dir .. "/policy.lua", [[
local policy = {}
local function connect()
  error("boom in the policy")
end
function policy.start()
  connect()
end
return policy
]])
    local code, _, err = proc.run("serve --env test --listen 127.0.0.1:0",
      { NETRA_POLICY = dir .. "/policy.lua" })
    assert.is_not.equal(0, code)
    assert.matches("policy.lua:3: boom in the policy", err, 1, true)
    assert.matches("stack traceback", err, 1, true)
  end)

  it("refuses production without ClickHouse settings", function()
    local code, _, err = proc.run("serve --env production --listen 127.0.0.1:0",
      { NETRA_JWT_SECRET = "a-long-enough-secret-value", CLICKHOUSE_URL = false,
        CLICKHOUSE_HOST = false })
    assert.equal(1, code)
    assert.matches("Required secrets missing: ['CLICKHOUSE_URL']", err, 1, true)
    assert.matches("set CLICKHOUSE_URL or CLICKHOUSE_HOST", err, 1, true)
  end)

  it("notices a service loop that stopped turning and shows it afterwards", function()
    srv = assert(proc.serve({ args = "--env test", env = { NETRA_WATCHDOG_STALL_MS = "500" } }))
    assert.truthy(proc.wait_for(function()
      return srv:get("/health/ready") == 200
    end), srv:log())
    -- Freeze the whole process past the stall threshold, then let it go.
    srv:signal("STOP")
    proc.sleep(1500)
    srv:signal("CONT")
    assert.truthy(proc.wait_for(function()
      return srv:log():find("service loop turned again after a stall", 1, true)
    end, 10000), srv:log())
    local bridge = proc.wait_for(function()
      local _, body = srv:get("/health/agent_websocket_bridge")
      local doc = body and proc.json(body)
      if doc and doc.netra.status == "degraded" then
        return doc.netra
      end
    end, 10000)
    assert.truthy(bridge, srv:log())
    assert.matches("stalled 1 time", bridge.message, 1, true)
    assert.equal(1, bridge.observed.stalls)
  end)

  it("refuses an address it cannot bind", function()
    srv = assert(proc.serve({ args = "--env test" }))
    local code, _, err = proc.run("serve --env test --listen 127.0.0.1:" .. srv.port)
    assert.equal(1, code)
    assert.matches("cannot listen on 127.0.0.1:" .. srv.port, err, 1, true)
  end)
end)

describe("netra command line", function()
  it("prints usage and exits 2 on an unknown command or flag", function()
    local code, _, err = proc.run("frobnicate")
    assert.equal(2, code)
    assert.matches("usage: netra", err, 1, true)
    code, _, err = proc.run("serve --bogus")
    assert.equal(2, code)
    assert.matches("unknown option '--bogus'", err, 1, true)
  end)

  it("prints the version and the help", function()
    local code, out = proc.run("version")
    assert.equal(0, code)
    assert.matches("^netra %d+%.%d+%.%d+", out)
    code, out = proc.run("--help")
    assert.equal(0, code)
    assert.matches("serve", out, 1, true)
    assert.matches("check", out, 1, true)
  end)

  it("refuses an unknown environment, listing the valid ones", function()
    local code, _, err = proc.run("serve --env qa --listen 127.0.0.1:0")
    assert.equal(1, code)
    assert.matches("development, test, staging, production", err, 1, true)
  end)
end)
