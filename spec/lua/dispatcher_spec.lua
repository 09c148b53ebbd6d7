-- netra.dispatcher from Lua: the real pool in process, contexts refused
-- without a user, released dispatchers, the shipped tools and agent, and
-- `netra check` reporting registration errors.
local netra = require("netra")
local proc = require("support.proc")

local home = os.getenv("NETRA_HOME")
local function shipped(kind, name)
  return ("%s/lua/netra/%s/%s.lua"):format(home, kind, name)
end

local function types(events)
  local out = {}
  for i, e in ipairs(events) do
    out[i] = e.type
  end
  return out
end

describe("netra.dispatcher", function()
  setup(function()
    assert(netra.dispatcher.start({
      workers = 2,
      tools = { shipped("tools", "echo"), shipped("tools", "clock"),
        shipped("tools", "analytics_recent_calls") },
      agents = { shipped("agents", "daily_brief") },
    }))
  end)

  teardown(function()
    netra.dispatcher.stop()
  end)

  it("refuses to make a dispatcher without a user context", function()
    local ok, err = pcall(netra.dispatcher.new)
    assert.is_false(ok)
    assert.matches("^GLOBAL STATE USAGE:", err)
    ok, err = pcall(netra.dispatcher.new, "alice")
    assert.is_false(ok)
    assert.matches("GLOBAL STATE USAGE:", err, 1, true)
    ok, err = pcall(netra.dispatcher.new, { user_id = "default" })
    assert.is_false(ok)
    assert.matches("placeholder", err, 1, true)
    ok, err = pcall(netra.dispatcher.new, { thread_id = "t" })
    assert.is_false(ok)
    assert.matches("user_id: missing", err, 1, true)
  end)

  it("calls echo and returns the result with its event pair", function()
    local d = netra.dispatcher.new({ user_id = "alice", thread_id = "t-1" })
    local result, events = d:call("echo", { text = "hello" })
    assert.equal("hello", result.content[1].text)
    assert.is_nil(result.isError)
    assert.same({ "tool_executing", "tool_completed" }, types(events))
    assert.equal(events[1].tool_call_id, events[2].tool_call_id)
    assert.equal("alice", events[1].user_id)
    assert.equal("t-1", events[1].thread_id)
    assert.matches("^%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%d%.%d%d%dZ$", events[1].timestamp)
    d:release()
  end)

  it("names the failing path of invalid arguments", function()
    local d = netra.dispatcher.new({ user_id = "alice" })
    local result = d:call("echo", { text = 12 })
    assert.is_true(result.isError)
    assert.equal("arguments.text: expected string", result.content[1].text)
    d:release()
  end)

  it("maps clock's table to structuredContent and checks its outputSchema", function()
    local d = netra.dispatcher.new({ user_id = "alice" })
    local result = d:call("clock", { timezone = "+05:30" })
    assert.equal("+05:30", result.structuredContent.timezone)
    result = d:call("clock", { timezone = "Mars/Olympus" })
    assert.is_true(result.isError)
    assert.matches("is not UTC or an offset", result.content[1].text, 1, true)
    d:release()
  end)

  it("says when ClickHouse is not connected", function()
    local d = netra.dispatcher.new({ user_id = "alice" })
    local result = d:call("analytics_recent_calls", { limit = 3 })
    assert.is_true(result.isError)
    assert.equal("Not connected to ClickHouse.", result.content[1].text)
    d:release()
  end)

  it("refuses an unknown tool with -32602", function()
    local d = netra.dispatcher.new({ user_id = "alice" })
    local result, err, code = d:call("no_such_tool", {})
    assert.is_nil(result)
    assert.matches("unknown tool", err, 1, true)
    assert.equal(-32602, code)
    d:release()
  end)

  it("raises, not crashes, when a released dispatcher is used", function()
    local d = netra.dispatcher.new({ user_id = "alice" })
    d:release()
    local ok, err = pcall(d.call, d, "echo", { text = "x" })
    assert.is_false(ok)
    assert.matches("dispatcher released: make a new one for each request", err, 1, true)
    ok = pcall(d.release, d)
    assert.is_false(ok)
  end)

  it("runs daily_brief with the documented event sequence", function()
    local d = netra.dispatcher.new({ user_id = "alice", thread_id = "t-2" })
    local final, events = d:run("daily_brief", { name = "Ada" })
    assert.same({
      "agent_started", "agent_thinking",
      "tool_executing", "tool_completed", "agent_thinking",
      "tool_executing", "tool_completed",
      "tool_executing", "tool_completed", "agent_thinking",
      "agent_completed",
    }, types(events))
    assert.equal("agent_completed", final.type)
    assert.matches("^Hello Ada, it is ", final.result.greeting)
    assert.equal("Your recent calls are not available right now.", final.result.recent)
    for _, e in ipairs(events) do
      assert.equal("daily_brief", e.agent_name)
      assert.equal(events[1].run_id, e.run_id)
    end
    assert.equal("clock", events[3].tool_name)
    d:release()
  end)

  it("refuses agent input that does not match its schema", function()
    local d = netra.dispatcher.new({ user_id = "alice" })
    local final, err, code = d:run("daily_brief", { name = 7 })
    assert.is_nil(final)
    assert.equal("input.name: expected string", err)
    assert.equal(-32602, code)
    d:release()
  end)
end)

describe("tool registration", function()
  it("registers the shipped tools for the policy", function()
    local ok, err = netra.dispatcher.register_tool(shipped("tools", "echo"))
    assert.is_true(ok, err)
    local list = netra.dispatcher.list()
    assert.equal("echo", list.tools[1].name)
    ok, err = netra.dispatcher.register_tool(shipped("tools", "echo"))
    assert.is_nil(ok)
    assert.matches("already registered by", err, 1, true)
  end)

  local function home_with_tools(files)
    local dir = proc.tmpdir("tools-home")
    assert(os.execute(("cp -r %s/lua %s/ && cp -r %s/config %s/"):format(home, dir, home, dir)))
    for name, text in pairs(files) do
      proc.write(dir .. "/lua/netra/" .. name, text)
    end
    return dir
  end

  it("netra check lists tools and agents", function()
    local code, out = proc.run("check --env test", { CLICKHOUSE_URL = false,
      CLICKHOUSE_HOST = false, CLICKHOUSE_REQUIRED = false })
    assert.equal(0, code, out)
    assert.matches("tools%s+required%s+3 tool%(s%) and 1 agent%(s%) registered", out)
    assert.matches("tool%s+echo%s+%S+/lua/netra/tools/echo.lua", out)
    assert.matches("agent%s+daily_brief", out)
  end)

  it("netra check names file and reason of each bad tool, with advice, exit 1", function()
    local dir = home_with_tools({
      ["tools/dup.lua"] = "return { name = 'echo', description = 'd', "
        .. "inputSchema = { type = 'object' }, handler = function() end }\n",
      ["tools/badkw.lua"] = "return { name = 'badkw', description = 'd', "
        .. "inputSchema = { type = 'object', ['$dynamicRef'] = '#a' }, "
        .. "handler = function() end }\n",
      ["tools/nohandler.lua"] = "return { name = 'nohandler', description = 'd', "
        .. "inputSchema = { type = 'object' } }\n",
      ["tools/badtype.lua"] = "return { name = 'badtype', description = 'd', "
        .. "inputSchema = { type = 'thing' }, handler = function() end }\n",
    })
    local code, out = proc.run("check --env test", { NETRA_HOME = dir,
      CLICKHOUSE_URL = false, CLICKHOUSE_HOST = false, CLICKHOUSE_REQUIRED = false })
    assert.equal(1, code, out)
    -- files load in name order: dup.lua claims 'echo' first
    assert.matches("echo.lua: tool name 'echo' is already registered by " .. dir
      .. "/lua/netra/tools/dup.lua", out, 1, true)
    assert.matches("badkw.lua: inputSchema: unsupported keyword", out, 1, true)
    assert.matches("nohandler.lua: handler must be a function", out, 1, true)
    assert.matches("badtype.lua: inputSchema:", out, 1, true)
    assert.matches("fix " .. dir .. "/lua/netra/tools/nohandler.lua", out, 1, true)
    assert.matches("startup would be refused", out, 1, true)
  end)

  it("netra serve refuses to start with a bad tool, naming it", function()
    local dir = home_with_tools({
      ["tools/broken.lua"] = "return { name = 'broken', description = 'd', "
        .. "inputSchema = { type = 'object' }, handler = 'nope' }\n",
    })
    local code, _, err = proc.run("serve --env test --listen 127.0.0.1:0",
      { NETRA_HOME = dir, CLICKHOUSE_URL = false, CLICKHOUSE_HOST = false,
        CLICKHOUSE_REQUIRED = false })
    assert.equal(1, code)
    assert.matches("broken.lua: handler must be a function", err, 1, true)
  end)
end)
