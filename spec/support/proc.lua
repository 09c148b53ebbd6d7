--- Test support: start `netra` as a real process, read its log, talk HTTP
--- to it, send it signals. Everything stays on 127.0.0.1.
local socket = require("socket")

local proc = {}

local bin = os.getenv("NETRA_BIN") or "build/netra"
local scratch = os.getenv("NETRA_TEST_DIR") or "/tmp/netra-test"

local function shell_quote(s)
  return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end
proc.quote = shell_quote


--- A fresh scratch directory for one test.
---@param name string
---@return string path
function proc.tmpdir(name)
  local path = ("%s/%s-%d-%d"):format(scratch, name, os.time(), math.random(1e9))
  assert(os.execute("mkdir -p " .. shell_quote(path)))
  return path
end


--- Writes a file.
function proc.write(path, text)
  local f = assert(io.open(path, "w"))
  f:write(text)
  f:close()
end


--- Reads a whole file, or "" when missing.
function proc.read(path)
  local f = io.open(path, "r")
  if not f then
    return ""
  end
  local text = f:read("a")
  f:close()
  return text
end


--- Builds "env K=V ... " for a command line; a value of false unsets K.
local function env_prefix(env)
  local parts = { "env" }
  for k, v in pairs(env or {}) do
    if v == false then
      table.insert(parts, 2, "-u " .. k)
    else
      parts[#parts + 1] = k .. "=" .. shell_quote(v)
    end
  end
  return table.concat(parts, " ") .. " "
end


--- Runs `netra ARGS` to completion.
---@param args string the arguments, already quoted
---@param env table|nil extra environment
---@return integer code exit code
---@return string stdout
---@return string stderr
function proc.run(args, env)
  local dir = proc.tmpdir("run")
  local cmd = ("%s%s %s >%s/out 2>%s/err </dev/null"):format(env_prefix(env), bin, args,
    dir, dir)
  local _, _, code = os.execute(cmd)
  return code, proc.read(dir .. "/out"), proc.read(dir .. "/err")
end


--- Sleeps for ms milliseconds.
function proc.sleep(ms)
  socket.sleep(ms / 1000)
end


--- Polls fn until it returns a truthy value or timeout_ms passes.
---@return any the value fn returned, or nil on timeout
function proc.wait_for(fn, timeout_ms)
  local deadline = socket.gettime() + (timeout_ms or 20000) / 1000
  repeat
    local v = fn()
    if v then
      return v
    end
    socket.sleep(0.05)
  until socket.gettime() > deadline
  return nil
end


local Server = {}
Server.__index = Server

--- Starts `netra serve` in the background.
---@param opts table { env = {...}, args = "--env test", listen = "127.0.0.1:0" }
---@return table server with pid, port, log path; nil, log when it died
function proc.serve(opts)
  opts = opts or {}
  local dir = proc.tmpdir("serve")
  local log = dir .. "/log"
  local args = opts.args or "--env test"
  local listen = opts.listen or "127.0.0.1:0"
  local cmd = ("%s sh -c 'echo $$; exec %s serve %s --listen %s' 2>%s </dev/null &"):format(
    env_prefix(opts.env), bin, args, listen, log)
  local p = assert(io.popen(cmd, "r"))
  local pid = tonumber(p:read("l"))
  p:close()
  local self = setmetatable({ pid = pid, log_path = log, dir = dir }, Server)
  if opts.wait == false then
    return self
  end
  local port = proc.wait_for(function()
    local text = proc.read(log)
    local found = text:match("listening on http://[%[%]%w%.:]-:(%d+)")
    if found then
      return tonumber(found)
    end
    if not self:alive() then
      return -1
    end
  end, 20000)
  if not port or port < 0 then
    self:kill()
    return nil, proc.read(log)
  end
  self.port = port
  return self
end

function Server:log()
  return proc.read(self.log_path)
end

function Server:alive()
  local ok = os.execute(("kill -0 %d 2>/dev/null"):format(self.pid))
  if not ok then
    return false
  end
  -- A zombie is not alive.
  local stat = proc.read(("/proc/%d/stat"):format(self.pid))
  return stat ~= "" and not stat:match("^%d+ %b() Z")
end

function Server:signal(name)
  os.execute(("kill -%s %d 2>/dev/null"):format(name, self.pid))
end

--- Waits for the process to end; returns its exit code from the shell
--- that started it is not available, so this returns true when gone.
function Server:wait_exit(timeout_ms)
  return proc.wait_for(function()
    return not self:alive()
  end, timeout_ms or 20000)
end

function Server:kill()
  self:signal("KILL")
  self:wait_exit(5000)
end

--- Stops with SIGTERM and waits.
function Server:stop()
  self:signal("TERM")
  if not self:wait_exit(20000) then
    self:kill()
  end
end

--- One HTTP request to the server. Returns status, body, headers (lower
--- case names), or nil, error.
function Server:http(method, path, headers)
  return proc.http("127.0.0.1", self.port, method, path, headers)
end

function Server:get(path, headers)
  return self:http("GET", path, headers)
end


--- A raw HTTP/1.1 request on a new connection.
function proc.http(host, port, method, path, headers, body)
  local c = socket.tcp()
  c:settimeout(10)
  local ok, err = c:connect(host, port)
  if not ok then
    return nil, err
  end
  local lines = { ("%s %s HTTP/1.1"):format(method, path), "Host: " .. host .. ":" .. port,
    "Connection: close" }
  for k, v in pairs(headers or {}) do
    lines[#lines + 1] = k .. ": " .. v
  end
  if body then
    lines[#lines + 1] = "Content-Length: " .. #body
  end
  c:send(table.concat(lines, "\r\n") .. "\r\n\r\n" .. (body or ""))
  local status_line, serr = c:receive("*l")
  if not status_line then
    c:close()
    return nil, serr
  end
  local status = tonumber(status_line:match("^HTTP/1%.%d (%d+)"))
  local hdrs = {}
  while true do
    local line = c:receive("*l")
    if not line or line == "" then
      break
    end
    local k, v = line:match("^([^:]+):%s*(.*)$")
    if k then
      hdrs[k:lower()] = v
    end
  end
  local data
  local len = tonumber(hdrs["content-length"])
  if len then
    data = c:receive(len)
  else
    data = c:receive("*a")
  end
  c:close()
  return status, data or "", hdrs
end


--- Decodes JSON with the dkjson that busted depends on.
function proc.json(text)
  local dkjson = require("dkjson")
  local v, _, err = dkjson.decode(text)
  assert(v ~= nil, ("not JSON (%s): %s"):format(tostring(err), tostring(text)))
  return v
end


--- The local addresses listening on a TCP port, from /proc/net/tcp{,6}:
--- a list of hex address strings ("0100007F" is 127.0.0.1).
function proc.listeners(port)
  local found = {}
  for _, file in ipairs({ "/proc/net/tcp", "/proc/net/tcp6" }) do
    for line in proc.read(file):gmatch("[^\n]+") do
      local addr, p, state = line:match("^%s*%d+: (%x+):(%x+) %x+:%x+ (%x+)")
      if addr and tonumber(p, 16) == port and state == "0A" then
        found[#found + 1] = addr
      end
    end
  end
  return found
end

return proc
