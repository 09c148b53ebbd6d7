--- netra.scenario: staging scenarios as scripts, run by `netra run`.
---
--- A scenario starts netra runtimes in this process (the same code path as
--- `netra serve`), may own a ClickHouse server, connects real WebSocket
--- clients as named users, reads health over HTTP, and asserts. Output is
--- TAP on stdout; `netra run` exits 0 only when every assertion held and
--- the script did not raise. Everything listens on and talks to 127.0.0.1.
--- doc/scenarios.md describes the API with an example.
-- luacheck: ignore 212/self
local core = require("netra.scenario.core")
local netra = require("netra")

local M = {}

--- What one `netra run` shares: the TAP counter and what must be stopped.
local run = {
  count = 0,
  failed = 0,
  runtimes = {},
  clients = {},
  clickhouses = {},
  dir = nil,
  log_path = nil,
  log_mode = nil,
}

local DEFAULT_WAIT_MS = 30000
local RUNTIME_STATUSES = {
  starting = true, healthy = true, degraded = true, unhealthy = true,
  unknown = true, disabled = true,
}

--- The statuses a component may report (doc/health.md).
M.statuses = RUNTIME_STATUSES

-- ---- helpers --------------------------------------------------------------

local function diag_lines(text)
  for line in (tostring(text) .. "\n"):gmatch("(.-)\n") do
    io.stdout:write("# ", line, "\n")
  end
  io.stdout:flush()
end

local function show(v)
  if type(v) == "string" then
    return ("%q"):format(v)
  elseif type(v) == "table" then
    local ok, text = pcall(core.json_encode, v)
    return ok and text or tostring(v)
  end
  return tostring(v)
end

local function deep_equal(a, b)
  if a == b then
    return true
  end
  if type(a) ~= "table" or type(b) ~= "table" then
    return false
  end
  for k, v in pairs(a) do
    if not deep_equal(v, b[k]) then
      return false
    end
  end
  for k in pairs(b) do
    if a[k] == nil then
      return false
    end
  end
  return true
end

local function read_file(path, from)
  local f = io.open(path, "rb")
  if not f then
    return ""
  end
  if from then
    f:seek("set", from)
  end
  local text = f:read("a") or ""
  f:close()
  return text
end

local function file_size(path)
  local f = io.open(path, "rb")
  if not f then
    return 0
  end
  local size = f:seek("end")
  f:close()
  return size
end

local function shell_quote(s)
  return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end

--- The run's scratch directory (made on first use, removed at the end
--- when every assertion held).
local function run_dir()
  if not run.dir then
    local base = os.getenv("NETRA_TEST_DIR") or os.getenv("TMPDIR") or "/tmp"
    os.execute("mkdir -p " .. shell_quote(base))
    run.dir = assert(core.mkdtemp(base .. "/scenario"))
  end
  return run.dir
end

-- ---- clients --------------------------------------------------------------

local Client = {}
Client.__index = Client

function Client:_handle(text)
  local msg = core.json_decode(text)
  if type(msg) ~= "table" then
    self.garbage[#self.garbage + 1] = text
  elseif msg.id ~= nil and msg.method == nil then
    self.responses[msg.id] = msg
  elseif msg.method == "netra/event" and type(msg.params) == "table" then
    self.all_events[#self.all_events + 1] = msg.params
  else
    self.notifications[#self.notifications + 1] = msg
  end
end

--- Reads the messages that arrive within timeout_ms (0: only those
--- already here). Returns false once the connection has closed.
---@param timeout_ms? integer
---@return boolean open
function Client:pump(timeout_ms)
  if not self.ws then
    return false
  end
  local wait = timeout_ms or 0
  while true do
    local text, err, code = self.ws:recv(wait)
    if text then
      self:_handle(text)
      wait = 0
    elseif err == "timeout" then
      return true
    else
      self.close_code, self.close_reason = code, err
      return false
    end
  end
end

--- Sends a JSON-RPC notification.
---@param method string
---@param params? table
function Client:notify(method, params)
  local msg = { jsonrpc = "2.0", method = method, params = params }
  local ok, err = self.ws:send(core.json_encode(msg))
  if not ok then
    return nil, err
  end
  return true
end

--- Sends a JSON-RPC request and waits for its answer.
---@param method string
---@param params? table
---@param timeout_ms? integer default 10000
---@return table|nil result
---@return table|string|nil error `{code, message}` from the server, or why none came
function Client:request(method, params, timeout_ms)
  if not self.ws then
    return nil, "client closed"
  end
  self.next_id = self.next_id + 1
  local id = self.next_id
  local out = { jsonrpc = "2.0", id = id, method = method, params = params or {} }
  local ok, err = self.ws:send(core.json_encode(out))
  if not ok then
    return nil, err
  end
  local deadline = core.now_ms() + (timeout_ms or 10000)
  while not self.responses[id] do
    local left = deadline - core.now_ms()
    if left <= 0 then
      return nil, ("no answer to %s within %d ms"):format(method, timeout_ms or 10000)
    end
    if not self:pump(math.min(left, 200)) and not self.responses[id] then
      return nil, ("connection closed (%s) before %s was answered"):format(
        tostring(self.close_reason), method)
    end
  end
  local msg = self.responses[id]
  self.responses[id] = nil
  if msg.error then
    return nil, msg.error
  end
  return msg.result or {}
end

--- Calls a tool. Returns the CallToolResult (check `isError`), or nil and
--- the JSON-RPC error message and code.
---@param tool string
---@param args? table
---@return table|nil result
---@return string|nil message
---@return integer|nil code
function Client:call(tool, args)
  local result, err = self:request("tools/call", { name = tool, arguments = args or {} })
  if not result then
    if type(err) == "table" then
      return nil, err.message, err.code
    end
    return nil, err
  end
  return result
end

--- Starts an agent run; returns its run_id and thread_id at once.
---@param agent string
---@param input? table
---@param thread_id? string
---@return string|nil run_id
---@return string|table|nil thread_id_or_error
function Client:start_run(agent, input, thread_id)
  local params = { name = agent, input = input or {}, thread_id = thread_id }
  local result, err = self:request("agents/run", params)
  if not result then
    return nil, type(err) == "table" and err.message or err
  end
  return result.run_id, result.thread_id
end

local function final_event(ev)
  return ev.type == "agent_completed" or ev.type == "agent_error"
end

--- The events of one run received so far, and its final event if any.
function Client:run_events(run_id)
  local list, final = {}, nil
  for _, ev in ipairs(self.all_events) do
    if ev.run_id == run_id then
      list[#list + 1] = ev
      if final_event(ev) then
        final = ev
      end
    end
  end
  return list, final
end

--- Waits until a run has ended (agent_completed or agent_error).
---@param run_id string
---@param timeout_ms? integer default 30000
---@return table|nil events the run's events in order
---@return table|string final event, or why the wait ended
function Client:wait_run(run_id, timeout_ms)
  local deadline = core.now_ms() + (timeout_ms or DEFAULT_WAIT_MS)
  while true do
    local list, final = self:run_events(run_id)
    if final then
      return list, final
    end
    local left = deadline - core.now_ms()
    if left <= 0 then
      return nil, "run " .. run_id .. " did not end in time"
    end
    if not self:pump(math.min(left, 200)) then
      list, final = self:run_events(run_id)
      if final then
        return list, final
      end
      return nil, "connection closed before run " .. run_id .. " ended"
    end
  end
end

--- Runs an agent and waits for its end. Returns the run's events and the
--- final event, or nil and why.
---@param agent string
---@param input? table
---@param timeout_ms? integer
---@return table|nil events
---@return table|string final event or error
function Client:run(agent, input, timeout_ms)
  local run_id, err = self:start_run(agent, input)
  if not run_id then
    return nil, err
  end
  return self:wait_run(run_id, timeout_ms)
end

--- Every netra/event this client has received, in order (optionally of
--- one type). Reads what has already arrived first.
---@param type_name? string
---@return table events
function Client:events(type_name)
  self:pump(0)
  local list = {}
  for _, ev in ipairs(self.all_events) do
    if not type_name or ev.type == type_name then
      list[#list + 1] = ev
    end
  end
  return list
end

--- True until the connection has closed.
function Client:is_open()
  return self.ws ~= nil and self.ws:is_open()
end

--- Closes the connection (code 1000 by default) and waits briefly for the
--- server's close.
---@param code? integer
function Client:close(code)
  if self.ws then
    self.ws:close(code or 1000)
    self.ws = nil
  end
end

-- ---- runtimes -------------------------------------------------------------

local Runtime = {}
Runtime.__index = Runtime

--- "starting", "ready" or "refused" (then also why).
function Runtime:state()
  if not self.handle then
    return "stopped"
  end
  return self.handle:state()
end

--- Waits until the runtime is ready (or refused, or the time is up).
---@param timeout_ms? integer default 30000
---@return boolean|nil ready
---@return string|nil state when not ready
---@return string|nil why when refused
function Runtime:wait_ready(timeout_ms)
  local deadline = core.now_ms() + (timeout_ms or DEFAULT_WAIT_MS)
  while true do
    local st, why = self:state()
    if st == "ready" then
      return true
    elseif st ~= "starting" or core.now_ms() >= deadline then
      return nil, st, why
    end
    core.sleep(20)
  end
end

--- A setting as the runtime sees it (flags, environment, env file).
---@param key string
---@return string|nil
function Runtime:setting(key)
  return self.handle and self.handle:setting(key) or self.settings[key]
end

--- GET a path on the runtime's listener. Returns status, body, headers
--- (names in lower case), or nil and why.
---@param path string
---@param headers? table<string, string>
function Runtime:get(path, headers)
  return core.http_get(self.port, path, headers or {}, 5000)
end

--- GET a health endpoint (default /health); JSON bodies are decoded. The
--- runtime's NETRA_ADMIN_TOKEN, when set, goes along so that the details
--- are shown outside development and test.
---@param path? string
---@param headers? table<string, string>
---@return integer|nil status
---@return table|string body decoded JSON, the raw body, or the error
---@return table|nil headers
function Runtime:health(path, headers)
  local h = {}
  for k, v in pairs(headers or {}) do
    h[k] = v
  end
  local admin = self:setting("NETRA_ADMIN_TOKEN")
  if admin and not h.Authorization then
    h.Authorization = "Bearer " .. admin
  end
  local status, body, hdrs = self:get(path or "/health", h)
  if not status then
    return nil, body
  end
  local doc = core.json_decode(body)
  return status, doc or body, hdrs
end

--- The log lines this runtime wrote so far (empty when the run logs to
--- stderr).
---@return string
function Runtime:log()
  if not run.log_path then
    return ""
  end
  return read_file(run.log_path, self.log_from)
end

--- Connects a WebSocket client to /ws as a named user. With
--- NETRA_JWT_SECRET set the client sends a token signed with it (sub =
--- user); otherwise it names itself with X-Netra-User. Options: user,
--- token (sent as is), query (appended to the path), headers (a list of
--- "Name: value"), initialize (default true: initialize +
--- notifications/initialized), timeout_ms.
---@param opts? table
---@return table|nil client
---@return string|nil err
---@return integer|nil http_status when the upgrade was refused
function Runtime:connect(opts)
  opts = opts or {}
  local headers = {}
  for _, h in ipairs(opts.headers or {}) do
    headers[#headers + 1] = h
  end
  local token = opts.token
  local secret = self:setting("NETRA_JWT_SECRET")
  if token == nil and secret and opts.user then
    local err
    token, err = core.jwt_sign(secret, opts.user, opts.ttl or 3600)
    if not token then
      return nil, err
    end
  end
  if token then
    headers[#headers + 1] = "Authorization: Bearer " .. token
  elseif opts.user then
    headers[#headers + 1] = "X-Netra-User: " .. opts.user
  end
  local path = opts.path or "/ws"
  if opts.query then
    path = path .. "?" .. opts.query
  end
  local ws, err, status = core.ws_connect(self.port, path, headers, opts.timeout_ms or 5000)
  if not ws then
    return nil, err, status
  end
  local client = setmetatable({
    ws = ws, user = opts.user, runtime = self, next_id = 0, responses = {},
    all_events = {}, notifications = {}, garbage = {},
  }, Client)
  run.clients[#run.clients + 1] = client
  if opts.initialize ~= false then
    local result, ierr = client:request("initialize", {
      protocolVersion = "2025-06-18", capabilities = {},
      clientInfo = { name = "netra-scenario", version = netra.version },
    })
    if not result then
      client:close()
      return nil, "initialize: " .. show(ierr)
    end
    client.server_info = result
    client:notify("notifications/initialized")
  end
  return client
end

--- Stops the runtime as SIGTERM would (drain, grace, 1001 to clients).
function Runtime:stop()
  if self.handle then
    self.handle:stop()
    self.handle = nil
  end
end

-- ---- ClickHouse -----------------------------------------------------------

local ClickHouse = {}
ClickHouse.__index = ClickHouse

function ClickHouse:_script(cmd)
  local line = ("bash %s %s %s"):format(shell_quote(self.script), cmd, shell_quote(self.dir))
  if cmd == "start" and self.port then
    line = line .. " " .. self.port
  end
  local ok, _, code = os.execute(line .. " 1>&2")
  if not ok then
    return nil, ("clickhouse.sh %s failed (exit %s); see %s/log"):format(
      cmd, tostring(code), self.dir)
  end
  return true
end

function ClickHouse:_read_address()
  local address = read_file(self.dir .. "/address"):match("^%s*(%S+)")
  if address then
    self.address = address
    self.port = tonumber(address:match(":(%d+)$"))
    self.password = read_file(self.dir .. "/password"):match("^%s*(%S+)")
    self.url = ("http://netra_test:%s@%s/default"):format(self.password, address)
  end
end

--- Starts the server (a free loopback port the first time, the same port
--- after that) and waits until it answers /ping.
---@return boolean|nil ok
---@return string|nil err
function ClickHouse:start()
  self.started = true
  local ok, err = self:_script("start")
  -- A free port can be taken by someone else before the server binds it:
  -- the first start tries again on another one.
  for _ = 1, 2 do
    if ok or self.port then
      break
    end
    self:_script("stop")
    ok, err = self:_script("start")
  end
  if ok then
    self:_read_address()
  end
  return ok, err
end

--- Stops it (SIGTERM) and waits until it is gone.
function ClickHouse:stop()
  return self:_script("stop")
end

--- Kills it with SIGKILL, as a crash would.
function ClickHouse:kill()
  return self:_script("kill")
end

--- Stops it, then starts it again on the same port.
function ClickHouse:restart()
  local ok, err = self:_script("restart")
  if ok then
    self:_read_address()
  end
  return ok, err
end

--- The settings that point a runtime at this server.
---@return table<string, string>
function ClickHouse:settings()
  return { CLICKHOUSE_URL = self.url }
end

-- ---- the scenario ---------------------------------------------------------

local Scenario = {}
Scenario.__index = Scenario

--- Records one assertion. Returns cond as a boolean.
---@param cond any
---@param name string
---@param diagnostic? string shown under a failure
---@return boolean
function Scenario:ok(cond, name, diagnostic)
  run.count = run.count + 1
  local line = ("%s %d - %s"):format(cond and "ok" or "not ok", run.count, tostring(name or ""))
  io.stdout:write(line, "\n")
  if not cond then
    run.failed = run.failed + 1
    local where = debug.getinfo(3, "Sl") or debug.getinfo(2, "Sl")
    diag_lines(("  Failed test '%s'\n  at %s:%s"):format(tostring(name),
      where and where.short_src or "?", where and where.currentline or "?"))
    if diagnostic then
      diag_lines(diagnostic)
    end
  end
  io.stdout:flush()
  return not not cond
end

--- Asserts got equals want (tables compared deeply); `diagnostic` is
--- shown under a failure after got and expected.
---@param name string
---@param diagnostic? string
---@return boolean
function Scenario:is(got, want, name, diagnostic)
  local text = ("       got: %s\n  expected: %s"):format(show(got), show(want))
  if diagnostic and diagnostic ~= "" then
    text = text .. "\n" .. diagnostic
  end
  return self:ok(deep_equal(got, want), name, text)
end

--- Asserts text matches a Lua pattern.
---@param text any
---@param pattern string
---@param name string
---@return boolean
function Scenario:like(text, pattern, name)
  local matched = type(text) == "string" and text:find(pattern) ~= nil
  local shown = show(text)
  if type(text) == "string" and #text > 2000 then
    shown = text:sub(1, 2000) .. "..."
  end
  return self:ok(matched, name, ("  %s\n  does not match %q"):format(shown, pattern))
end

--- Writes a diagnostic line (# ...) into the TAP stream.
---@param msg any
function Scenario:diag(msg)
  diag_lines(type(msg) == "string" and msg or show(msg))
end

--- Calls fn every interval_ms until it returns a truthy value or
--- timeout_ms (default 10000) has passed. Returns fn's last values.
---@param fn fun(): any
---@param timeout_ms? integer
---@param interval_ms? integer
function Scenario:wait_for(fn, timeout_ms, interval_ms)
  local deadline = core.now_ms() + (timeout_ms or 10000)
  while true do
    local r = table.pack(fn())
    if r[1] or core.now_ms() >= deadline then
      return table.unpack(r, 1, r.n)
    end
    core.sleep(interval_ms or 50)
  end
end

--- Sleeps ms milliseconds.
function Scenario:sleep(ms)
  core.sleep(ms)
end

--- The run's scratch directory.
---@return string
function Scenario:tmpdir()
  return run_dir()
end

--- Writes text to a file under the scratch directory (or an absolute
--- path); returns the path.
---@param name string
---@param text string
---@return string path
function Scenario:write(name, text)
  local path = name:sub(1, 1) == "/" and name or (run_dir() .. "/" .. name)
  local f = assert(io.open(path, "wb"))
  f:write(text)
  f:close()
  return path
end

--- Starts a runtime in this process on a free loopback port. Options:
--- env (development, test, staging, production), settings (a table of
--- extra settings, as flags: they win over the environment and the env
--- file), unset (names to remove from the process environment first,
--- e.g. { "CLICKHOUSE_URL" }), policy (a policy file, NETRA_POLICY),
--- wait (default true: wait
--- until ready or refused), timeout_ms, log ("file", the default, or
--- "stderr"). Returns the runtime, or nil and why it could not listen.
---@param opts? table
---@return table|nil runtime
---@return string|nil err
function Scenario:start(opts)
  opts = opts or {}
  local dir = run_dir()
  local settings = { NETRA_LISTEN = "127.0.0.1:0", NETRA_SPOOL_DIR = dir .. "/spool",
    NETRA_RUN_DIR = dir .. "/run", NETRA_EVENTS_FILE = dir .. "/events.jsonl" }
  for k, v in pairs(opts.settings or {}) do
    settings[k] = v
  end
  if opts.policy then
    settings.NETRA_POLICY = opts.policy
  end
  local mode = opts.log or os.getenv("NETRA_SCENARIO_LOG") or "file"
  if mode ~= run.log_mode then
    if mode == "stderr" then
      core.log_to(nil)
      run.log_path = nil
    else
      run.log_path = dir .. "/netra.log"
      assert(core.log_to(run.log_path))
    end
    run.log_mode = mode
  end
  local log_from = run.log_path and file_size(run.log_path) or 0
  local handle, err = core.start(opts.env, settings, opts.unset)
  if not handle then
    return nil, err
  end
  local rt = setmetatable({ handle = handle, port = handle:port(), env = opts.env,
    settings = settings, log_from = log_from }, Runtime)
  run.runtimes[#run.runtimes + 1] = rt
  self.runtime = rt
  if opts.wait ~= false then
    rt:wait_ready(opts.timeout_ms)
  end
  return rt
end

--- Connects a client to the last runtime started (or opts.runtime); see
--- Runtime:connect.
---@param opts? table
function Scenario:connect(opts)
  local rt = (opts and opts.runtime) or self.runtime
  if not rt then
    error("connect: start a runtime first (s:start{...})", 2)
  end
  return rt:connect(opts)
end

--- A ClickHouse server this scenario owns (not started yet: call
--- ch:start()). Its data lives under the scratch directory; it listens on
--- 127.0.0.1 only, and is stopped when the scenario ends.
---@param name? string
---@return table
function Scenario:clickhouse(name)
  local ch = setmetatable({
    dir = run_dir() .. "/clickhouse-" .. (name or tostring(#run.clickhouses + 1)),
    script = netra.config.home() .. "/lua/netra/scenario/clickhouse.sh",
  }, ClickHouse)
  run.clickhouses[#run.clickhouses + 1] = ch
  return ch
end

--- Starts a scenario: a name for the TAP stream; assertions of every
--- scenario in one run share one plan.
---@param name? string
---@return table scenario
function M.new(name)
  if name then
    diag_lines(name)
  end
  return setmetatable({}, Scenario)
end

--- Ends the run (called by `netra run` after the script): closes clients,
--- stops runtimes and ClickHouse servers, reports a script error as a
--- failure, prints the plan. Returns the exit code.
---@param raised? string the script's error
---@return integer
function M.finish(raised)
  for _, c in ipairs(run.clients) do
    c:close()
  end
  for _, rt in ipairs(run.runtimes) do
    rt:stop()
  end
  for _, ch in ipairs(run.clickhouses) do
    if ch.started then
      ch:stop()
    end
  end
  if raised then
    run.count = run.count + 1
    run.failed = run.failed + 1
    io.stdout:write(("not ok %d - the script ran to its end\n"):format(run.count))
    diag_lines(raised)
  elseif run.count == 0 then
    run.count = 1
    run.failed = 1
    io.stdout:write("not ok 1 - the scenario asserts something\n")
    diag_lines("no assertion ran: a scenario must check what it claims")
  end
  io.stdout:write(("1..%d\n"):format(run.count))
  if run.failed > 0 then
    diag_lines(("%d of %d assertion(s) failed"):format(run.failed, run.count))
    if run.dir then
      diag_lines("kept for a look: " .. run.dir)
    end
  elseif run.dir then
    os.execute("rm -rf " .. shell_quote(run.dir))
  end
  io.stdout:flush()
  return run.failed > 0 and 1 or 0
end

return M
