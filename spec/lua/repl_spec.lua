-- `netra repl` as a real process: scripts on stdin, printing, helpers,
-- a terminal session under tmux, and `--attach` to a running server's
-- control socket.
local proc = require("support.proc")

local bin = os.getenv("NETRA_BIN") or "build/netra"
local q = proc.quote

--- Runs `netra repl ARGS` with `script` on stdin.
local function repl(script, args, env)
  local dir = proc.tmpdir("repl")
  proc.write(dir .. "/in", script)
  local parts = { "env" }
  for k, v in pairs(env or {}) do
    parts[#parts + 1] = k .. "=" .. q(v)
  end
  local cmd = ("%s %s repl %s <%s/in >%s/out 2>%s/err"):format(table.concat(parts, " "),
    bin, args or "--env test", dir, dir, dir)
  local _, _, code = os.execute(cmd)
  return code, proc.read(dir .. "/out"), proc.read(dir .. "/err")
end


describe("netra repl with a script on stdin", function()
  it("prints expression results, print output and tables", function()
    local code, out, err = repl("1 + 1\nprint('hi', 3)\nlocal x = 5\nreturn {b = 2, a = {1, 2}}\n")
    assert.equal(0, code, err)
    assert.equal("2\nhi\t3\n{\n  a = { 1, 2 },\n  b = 2,\n}\n", out)
  end)

  it("continues a chunk until it is complete", function()
    local code, out = repl("for i = 1, 3 do\n  print(i)\nend\n"
      .. "function f(x)\n  return x * 2\nend\nf(21)\n")
    assert.equal(0, code)
    assert.equal("1\n2\n3\n42\n", out)
  end)

  it("stops at the first error, exit 1, error and traceback on stderr", function()
    local code, out, err = repl("print('before')\nerror('boom')\nprint('after')\n")
    assert.equal(1, code)
    assert.equal("before\n", out)
    assert.matches("stdin:1: boom", err, 1, true)
    assert.matches("stack traceback:", err, 1, true)
    assert.not_matches("after", out)
  end)

  it("fails a script that ends inside a chunk", function()
    local code, _, err = repl("for i = 1, 2 do\n")
    assert.equal(1, code)
    assert.matches("unfinished chunk", err)
  end)

  it("has the helpers as bare names and in netra.repl, not as globals", function()
    local code, out, err = repl(table.concat({
      "report()",
      "netra.repl.health == health",
      "rawget(_G, 'health')",
      "components()[2].state",
      "tools().echo",
      "query('SELECT 1')",
    }, "\n") .. "\n")
    assert.equal(0, code, err)
    assert.matches("^overall: %a+ %(environment test, phase tools%)\n", out)
    assert.matches("clickhouse%s+disabled", out)
    assert.matches("\ntrue\nnil\ndisabled\nReturns the text it is given, unchanged.\n", out)
    assert.matches("Not connected to ClickHouse.", out, 1, true)
  end)

  it("dispatches as a user through the pool with events, and refuses a placeholder id", function()
    local code, out, err = repl(table.concat({
      "r, ev = dispatch_as{user_id = 'alice', thread_id = 't1'}('echo', {text = 'hi'})",
      "return r.content[1].text, #ev, ev[1].type, ev[2].type, ev[2].user_id",
      "dispatch_as{user_id = 'default', thread_id = 't1'}('echo', {text = 'hi'})",
    }, "\n") .. "\n")
    assert.equal(1, code)
    assert.equal("hi\n2\ntool_executing\ntool_completed\nalice\n", out)
    assert.matches("placeholder value 'default'", err, 1, true)
    assert.matches("operator local: dispatch_as user_id=alice thread_id=t1 tool=echo", err, 1,
      true)
  end)

  it("opens even when the policy refuses to start, and says why", function()
    local code, out, err = repl("netra.environment\n", "--env production",
      { CLICKHOUSE_URL = "", CLICKHOUSE_HOST = "", NETRA_JWT_SECRET = "" })
    assert.equal(0, code, err)
    assert.equal("production\n", out)
    assert.matches("the policy refused to start: ", err, 1, true)
  end)

  it("serves in the same process with --serve, and stops with the prompt", function()
    local socket = require("socket")
    local probe = assert(socket.bind("127.0.0.1", 0))
    local _, port = probe:getsockname()
    probe:close()
    local script = ([[
local code
for _ = 1, 100 do
  local p = io.popen("env -u LD_PRELOAD curl -s -o /dev/null -w '%%{http_code}' "
    .. "http://127.0.0.1:%d/health/ready")
  code = p:read("a")
  p:close()
  if code == "200" then break end
  netra.startup.sleep(100)
end
print("ready " .. code)
return dispatch_as{user_id = "alice"}("echo", {text = "served"}).content[1].text
]]):format(port)
    local code, out, err = repl(script, "--serve --env test",
      { NETRA_LISTEN = "127.0.0.1:" .. port })
    assert.equal(0, code, err)
    assert.matches("ready 200", out, 1, true)
    assert.matches("served", out, 1, true)
    assert.matches("serving on 127.0.0.1:" .. port, err, 1, true)
    -- The server went away with the prompt.
    local c = socket.tcp()
    c:settimeout(2)
    assert.is_nil((c:connect("127.0.0.1", port)))
    c:close()
  end)

  it("prints nested tables with sorted keys, cycles and redacted secrets", function()
    local code, out, err = repl(table.concat({
      "t = {z = 1, a = {b = {c = 'deep'}}, [2] = 'two', [1] = 'one',",
      "  Password = 'hunter2', nested = {API_KEY = 'k', authorization = 'Bearer x',",
      "  db_credential = {user = 'u'}, private_key = 'p', my_token = 't', apikey = 'a',",
      "  client_secret = 's'}}",
      "t.self = t",
      "t.a.b.up = t.a",
      "return t",
    }, "\n") .. "\n")
    assert.equal(0, code, err)
    for _, secret in ipairs({ "hunter2", "Bearer", "\"k\"", "\"u\"", "\"p\"", "\"t\"", "\"a\"",
      "\"s\"" }) do
      assert.not_matches(secret, out, 1, true)
    end
    assert.matches('Password = "[REDACTED]"', out, 1, true)
    assert.matches('API_KEY = "[REDACTED]"', out, 1, true)
    assert.matches('db_credential = "[REDACTED]"', out, 1, true)
    assert.matches("self = <cycle: table 0x%x+>", out)
    assert.matches("up = <cycle: table 0x%x+>", out)
    assert.matches('^{\n  "one",\n  "two",\n  Password = "%[REDACTED%]",\n  a = {', out)
    local a, n, z = out:find("\n  a = "), out:find("\n  nested = "), out:find("\n  z = 1")
    assert.truthy(a < n and n < z)
    assert.matches('c = "deep"', out, 1, true)
  end)
end)


--- A private tmux server for one terminal session.
local Tmux = {}
Tmux.__index = Tmux

local function tmux_start(cmd, env)
  local sock = proc.tmpdir("tmux") .. "/sock"
  local self = setmetatable({ sock = sock }, Tmux)
  local exports = {}
  for k, v in pairs(env) do
    exports[#exports + 1] = k .. "=" .. q(v)
  end
  assert(os.execute(("tmux -S %s new-session -d -x 160 -y 50 %s"):format(q(sock),
    q("env " .. table.concat(exports, " ") .. " " .. cmd))))
  return self
end

function Tmux:send(...)
  local keys = {}
  for _, k in ipairs({ ... }) do
    keys[#keys + 1] = q(k)
  end
  os.execute(("tmux -S %s send-keys %s"):format(q(self.sock), table.concat(keys, " ")))
end

--- Types text literally (tmux would read "end" as the End key).
function Tmux:type(text)
  os.execute(("tmux -S %s send-keys -l %s"):format(q(self.sock), q(text)))
end

function Tmux:screen()
  local p = io.popen(("tmux -S %s capture-pane -p -S -200"):format(q(self.sock)))
  local text = p:read("a")
  p:close()
  return text
end

function Tmux:wait(pattern)
  return proc.wait_for(function()
    return self:screen():find(pattern, 1, true)
  end, 20000)
end

function Tmux:kill()
  os.execute(("tmux -S %s kill-server 2>/dev/null"):format(q(self.sock)))
end


describe("netra repl in a terminal", function()
  it("edits multi-line input, completes netra.he to netra.health, writes history", function()
    local state = proc.tmpdir("state")
    local t = tmux_start(bin .. " repl --env test", { XDG_STATE_HOME = state,
      NETRA_HOME = os.getenv("NETRA_HOME"), NETRA_LOG_LEVEL = "warn" })
    local ok, err = pcall(function()
      assert.truthy(t:wait("Tab completes"), t:screen())
      t:type("for i = 1, 2 do")
      t:send("Enter")
      assert.truthy(t:wait(">>"), t:screen())
      t:type("print('line' .. i)")
      t:send("Enter")
      t:type("end")
      t:send("Enter")
      assert.truthy(t:wait("line2"), t:screen())
      t:type("netra.he")
      t:send("Tab")
      assert.truthy(t:wait("netra.health"), t:screen())
      t:type(".overall()")
      t:send("Enter")
      assert.truthy(t:wait("netra.health.overall()\n"), t:screen())
      t:send("C-d")
      assert.truthy(proc.wait_for(function()
        return proc.read(state .. "/netra/history"):find("netra.health.overall()", 1, true)
      end, 10000), "history: " .. proc.read(state .. "/netra/history"))
      local history = proc.read(state .. "/netra/history")
      -- libedit's format: spaces as \040, the chunk's newlines as \012.
      assert.matches("print('line'\\040..\\040i)\\012end", history, 1, true)
    end)
    t:kill()
    assert(ok, err)
  end)
end)


describe("netra repl --attach", function()
  local srv

  after_each(function()
    if srv then
      srv:kill()
      srv = nil
    end
  end)

  local function run_dir(mode)
    local dir = proc.tmpdir("run") .. "/netra"
    assert(os.execute(("mkdir -p %s && chmod %s %s"):format(q(dir), mode, q(dir))))
    return dir
  end

  it("evaluates in the server, keeps serving through a runaway expression", function()
    local dir = run_dir("700")
    srv = assert(proc.serve({ args = "--env test", env = { NETRA_RUN_DIR = dir } }))
    local sock = ("%s/netra-%d.sock"):format(dir, srv.port)
    assert.truthy(proc.wait_for(function()
      return srv:log():find("control socket " .. sock, 1, true)
    end), srv:log())
    assert.truthy(proc.wait_for(function()
      return srv:get("/health/ready") == 200
    end), srv:log())

    local f = assert(io.popen("stat -c %a " .. q(sock)))
    assert.equal("600", f:read("l"))
    f:close()

    local code, out, err = repl("health().netra.phase\ntools().echo ~= nil\n"
      .. "dispatch_as{user_id = 'op_user', thread_id = 'th'}('echo', {text = 'x'})"
      .. ".content[1].text\n",
      "--attach", { NETRA_RUN_DIR = dir })
    assert.equal(0, code, err)
    assert.equal("ready\ntrue\nx\n", out)

    -- A runaway expression ends with the budget error; /health/live
    -- answers meanwhile.
    local bg = proc.tmpdir("runaway")
    proc.write(bg .. "/in", "while true do pcall(function() while true do end end) end\n")
    os.execute(("(%s repl --attach %s <%s/in >%s/out 2>%s/err; echo $? >%s/code) &"):format(
      bin, q(sock), bg, bg, bg, bg))
    local lives = 0
    repeat
      if srv:get("/health/live") == 200 then
        lives = lives + 1
      end
    until proc.read(bg .. "/code") ~= "" or lives > 1000
    assert.truthy(proc.wait_for(function()
      return proc.read(bg .. "/code") ~= ""
    end), "the runaway evaluation never ended")
    assert.is_true(lives >= 1)
    code, err = tonumber(proc.read(bg .. "/code")), proc.read(bg .. "/err")
    assert.equal(1, code)
    assert.matches("evaluation exceeded its %a+ budget", err)
    assert.equal(200, (srv:get("/health/live")))
    -- The console serves the next operator.
    code, out = repl("1 + 2\n", "--attach " .. q(sock), {})
    assert.equal(0, code)
    assert.equal("3\n", out)

    local log = srv:log()
    assert.matches("operator uid=%d+ pid=%d+ evaluates: health%(%)%.netra%.phase", log)
    assert.matches("operator uid=%d+ pid=%d+: dispatch_as user_id=op_user", log)

    srv:stop()
    srv = nil
    assert.is_nil(io.open(sock, "r"))
  end)

  it("lists the sockets and exits 2 when it cannot pick one", function()
    local dir = run_dir("700")
    local code, _, err = repl("1\n", "--attach", { NETRA_RUN_DIR = dir })
    assert.equal(2, code)
    assert.matches("no control socket in " .. dir, err, 1, true)
    -- Two sockets someone listens on, and one a dead server left.
    local unix = require("socket.unix")
    local live = {}
    for i = 1, 2 do
      live[i] = unix()
      assert(live[i]:bind(("%s/netra-%d.sock"):format(dir, i)))
      assert(live[i]:listen(4))
    end
    proc.write(dir .. "/netra-3.sock", "")
    code, _, err = repl("1\n", "--attach", { NETRA_RUN_DIR = dir })
    for i = 1, 2 do
      live[i]:close()
    end
    assert.equal(2, code)
    assert.matches(dir .. "/netra-1.sock\n", err, 1, true)
    assert.matches(dir .. "/netra-2.sock", err, 1, true)
    assert.is_nil(err:find("netra-3.sock", 1, true))
  end)

  it("refuses a run directory writable by group and keeps serving", function()
    local dir = run_dir("770")
    srv = assert(proc.serve({ args = "--env test", env = { NETRA_RUN_DIR = dir } }))
    assert.truthy(proc.wait_for(function()
      return srv:get("/health/ready") == 200
    end), srv:log())
    assert.matches("refusing the control socket: the run directory " .. dir
      .. " is writable by group or others", srv:log(), 1, true)
    assert.is_nil(io.open(("%s/netra-%d.sock"):format(dir, srv.port), "r"))
  end)

  it("opens no socket in production unless NETRA_CONSOLE=on", function()
    local ch = proc.tmpdir("nochdir")
    local env = { NETRA_RUN_DIR = run_dir("700"), NETRA_JWT_SECRET = "s3cr3t-for-tests",
      CLICKHOUSE_REQUIRED = "false", CLICKHOUSE_URL = "", CLICKHOUSE_HOST = "" }
    srv = assert(proc.serve({ args = "--env production", env = env }))
    assert.truthy(proc.wait_for(function()
      return srv:log():find("control socket off in production", 1, true)
    end), srv:log())
    assert.is_nil(io.open(("%s/netra-%d.sock"):format(env.NETRA_RUN_DIR, srv.port), "r"))
    srv:kill()

    env.NETRA_CONSOLE = "on"
    srv = assert(proc.serve({ args = "--env production", env = env }))
    local sock = ("%s/netra-%d.sock"):format(env.NETRA_RUN_DIR, srv.port)
    assert.truthy(proc.wait_for(function()
      return srv:log():find("control socket " .. sock, 1, true)
    end), srv:log())
    assert.truthy(ch)
  end)
end)
