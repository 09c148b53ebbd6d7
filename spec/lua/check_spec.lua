-- `netra check`: the policy decided without connecting.
local proc = require("support.proc")

local no_clickhouse = { CLICKHOUSE_URL = false, CLICKHOUSE_HOST = false,
  CLICKHOUSE_REQUIRED = false }

describe("netra check", function()
  it("refuses production without ClickHouse settings, naming CLICKHOUSE_URL", function()
    local env = { NETRA_JWT_SECRET = "a-long-enough-secret-value" }
    for k, v in pairs(no_clickhouse) do env[k] = v end
    local code, out = proc.run("check --env production", env)
    assert.equal(1, code)
    assert.matches("clickhouse%s+required", out)
    assert.matches("Required secrets missing: ['CLICKHOUSE_URL']", out, 1, true)
    assert.matches("set CLICKHOUSE_URL or CLICKHOUSE_HOST", out, 1, true)
    assert.matches("startup would be refused", out, 1, true)
  end)

  it("passes staging without ClickHouse, the component disabled and why", function()
    local code, out = proc.run("check --env staging", no_clickhouse)
    assert.equal(0, code, out)
    assert.matches("clickhouse%s+disabled%s+not configured and CLICKHOUSE_REQUIRED=false", out)
    assert.matches("agent_websocket_bridge%s+required", out)
    assert.matches("warning: NETRA_JWT_SECRET is not set", out, 1, true)
    assert.matches("startup would proceed", out, 1, true)
  end)

  it("shows ClickHouse optional when configured outside production", function()
    local code, out = proc.run("check --env development",
      { CLICKHOUSE_URL = "http://default:hunter2@127.0.0.1:9/default" })
    assert.equal(0, code, out)
    assert.matches("clickhouse%s+optional", out)
    assert.is_nil(out:find("hunter2", 1, true))
  end)

  it("follows CLICKHOUSE_REQUIRED from the environment over the file", function()
    local code, out = proc.run("check --env staging",
      { CLICKHOUSE_URL = false, CLICKHOUSE_HOST = false, CLICKHOUSE_REQUIRED = "yes" })
    assert.equal(1, code)
    assert.matches("CLICKHOUSE_REQUIRED=yes %(environment%)", out)
  end)

  it("refuses production without NETRA_JWT_SECRET", function()
    local code, out = proc.run("check --env production",
      { CLICKHOUSE_URL = "http://127.0.0.1:9/default", NETRA_JWT_SECRET = false })
    assert.equal(1, code)
    assert.matches("error: NETRA_JWT_SECRET is not set", out, 1, true)
  end)

  it("reports a policy syntax error with file and line and exits 1", function()
    local dir = proc.tmpdir("check-bad")
    proc.write(dir .. "/p.lua", "return {\n check = function() return true, {} end,,\n}\n")
    local code, out = proc.run("check --env test", { NETRA_POLICY = dir .. "/p.lua" })
    assert.equal(1, code)
    assert.matches("p.lua:2: unexpected symbol near ','", out, 1, true)
  end)
end)

describe("configuration", function()
  local function home_with(env_file_text)
    local dir = proc.tmpdir("home")
    local src = os.getenv("NETRA_HOME")
    assert(os.execute(("cp -r %s/lua %s/ && mkdir -p %s/config"):format(src, dir, dir)))
    proc.write(dir .. "/config/test.env", env_file_text)
    return dir
  end

  it("names file and line of a malformed env file line", function()
    local dir = home_with("NETRA_LOG_LEVEL=info\n\nthis is not a setting\n")
    local code, _, err = proc.run("check --env test", { NETRA_HOME = dir })
    assert.equal(1, code)
    assert.matches("config/test.env:3: expected KEY=VALUE", err, 1, true)
  end)

  it("takes flag over environment over file", function()
    local dir = home_with("ENVIRONMENT_NOTE=x\nCLICKHOUSE_REQUIRED=true\n")
    -- file says required; the environment says no: optional wins.
    local code, out = proc.run("check --env test",
      { NETRA_HOME = dir, CLICKHOUSE_REQUIRED = "off", CLICKHOUSE_URL = false,
        CLICKHOUSE_HOST = false })
    assert.equal(0, code, out)
    assert.matches("clickhouse%s+disabled", out)
    -- without the environment value the file's true applies.
    code, out = proc.run("check --env test",
      { NETRA_HOME = dir, CLICKHOUSE_REQUIRED = false, CLICKHOUSE_URL = false,
        CLICKHOUSE_HOST = false })
    assert.equal(1, code, out)
    assert.matches("CLICKHOUSE_REQUIRED=true (config/test.env)", out, 1, true)
    -- the flag names the environment even when ENVIRONMENT says otherwise.
    local _, env_out = proc.run("check --env test",
      { NETRA_HOME = dir, ENVIRONMENT = "production" })
    assert.matches("environment: test (flag)", env_out, 1, true)
  end)

  it("treats an empty value as unset", function()
    local code, out = proc.run("check --env staging",
      { CLICKHOUSE_URL = "", CLICKHOUSE_HOST = "", CLICKHOUSE_REQUIRED = "" })
    assert.equal(0, code, out)
    assert.matches("clickhouse%s+disabled", out)
  end)

  it("rejects a boolean it cannot read", function()
    local code, out, err = proc.run("check --env test", { CLICKHOUSE_REQUIRED = "maybe" })
    assert.equal(1, code)
    assert.matches("CLICKHOUSE_REQUIRED: expected a boolean", out .. err, 1, true)
  end)

  it("writes JSON log lines and never prints secrets", function()
    local srv = assert(proc.serve({ args = "--env test", env = {
      NETRA_LOG_FORMAT = "json",
      NETRA_JWT_SECRET = "jwt-secret-value-123",
      CLICKHOUSE_REQUIRED = "false",
    } }))
    proc.wait_for(function() return srv:get("/health/ready") == 200 end)
    srv:stop()
    local log = srv:log()
    local lines = 0
    for line in log:gmatch("[^\n]+") do
      local entry = proc.json(line)
      assert.is_string(entry.time)
      assert.is_string(entry.level)
      assert.is_string(entry.message)
      lines = lines + 1
    end
    assert.is_true(lines >= 3)
    assert.is_nil(log:find("jwt-secret-value-123", 1, true))
  end)

  it("respects NETRA_LOG_LEVEL and refuses an unknown one", function()
    local code, _, err = proc.run("serve --env test --listen 127.0.0.1:0",
      { NETRA_LOG_LEVEL = "chatty" })
    assert.equal(1, code)
    assert.matches("NETRA_LOG_LEVEL=chatty", err, 1, true)
  end)
end)

describe("cmake --install", function()
  it("installs a binary that finds its lua/ and config/", function()
    local prefix = proc.tmpdir("prefix")
    assert(os.execute(("cmake --install %s --prefix %s >/dev/null"):format(
      proc.quote(os.getenv("NETRA_BUILD_DIR")), proc.quote(prefix))))
    local dir = proc.tmpdir("elsewhere")
    local cmd = ("cd %s && env -u NETRA_HOME %s/bin/netra check --env staging"):format(
      proc.quote(dir), proc.quote(prefix))
    local p = assert(io.popen(cmd .. " 2>&1"))
    local out = p:read("a")
    p:close()
    assert.matches("policy: " .. prefix .. "/share/netra/lua/netra/policy.lua", out, 1, true)
    assert.matches("startup would proceed", out, 1, true)
  end)
end)
