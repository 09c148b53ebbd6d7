-- `netra run`: TAP out, and the exit code says whether every assertion
-- held. Scenarios that fail, raise or assert nothing must exit non-zero.
local bin = os.getenv("NETRA_BIN")
local scratch = os.getenv("NETRA_TEST_DIR") or "/tmp"

local function write_script(name, text)
  os.execute("mkdir -p '" .. scratch .. "'")
  local path = scratch .. "/scenario_spec_" .. name .. ".lua"
  local f = assert(io.open(path, "w"))
  f:write(text)
  f:close()
  return path
end

-- Runs `netra run path args`; returns stdout and the exit code.
local function run(path, args)
  local line = ("%q run %q %s 2>/dev/null; echo \"exit=$?\""):format(bin, path, args or "")
  local p = assert(io.popen(line))
  local out = p:read("a")
  p:close()
  local code = tonumber(out:match("exit=(%d+)%s*$"))
  return out:gsub("exit=%d+%s*$", ""), code
end

describe("netra run", function()
  it("exits 0 with ok lines and a plan when every assertion holds", function()
    local path = write_script("pass", [[
      local s = require("netra.scenario").new("passing")
      s:ok(true, "truth")
      s:is({ a = 1, b = { 2 } }, { a = 1, b = { 2 } }, "deep equal")
      s:like("hello world", "w%a+", "pattern")
      s:is(arg[1], "extra", "arguments reach the script")
    ]])
    local out, code = run(path, "extra")
    assert.equal(0, code, out)
    assert.matches("ok 1 %- truth", out)
    assert.matches("ok 4 %- arguments reach the script", out)
    assert.matches("\n1%.%.4\n", out)
    assert.not_matches("not ok", out)
  end)

  it("exits non-zero with not ok lines and diagnostics when one fails", function()
    local path = write_script("fail", [[
      local s = require("netra.scenario").new("failing")
      s:ok(true, "first holds")
      s:is(1 + 1, 3, "arithmetic is off")
      s:like("abc", "^x", "no match")
      s:ok(true, "last holds")
    ]])
    local out, code = run(path)
    assert.equal(1, code, out)
    assert.matches("ok 1 %- first holds", out)
    assert.matches("not ok 2 %- arithmetic is off", out)
    assert.matches("#%s+got: 2", out)
    assert.matches("#%s+expected: 3", out)
    assert.matches("not ok 3 %- no match", out)
    assert.matches("ok 4 %- last holds", out)
    assert.matches("1%.%.4", out)
  end)

  it("exits non-zero when the script raises, and says where", function()
    local path = write_script("raise", [[
      local s = require("netra.scenario").new("raising")
      s:ok(true, "before")
      error("boom in the scenario")
    ]])
    local out, code = run(path)
    assert.equal(1, code, out)
    assert.matches("not ok 2 %- the script ran to its end", out)
    assert.matches("boom in the scenario", out)
  end)

  it("exits non-zero when nothing was asserted", function()
    local path = write_script("empty", "local _ = require('netra.scenario').new('nothing')\n")
    local out, code = run(path)
    assert.equal(1, code, out)
    assert.matches("not ok 1", out)
  end)

  it("fails a scenario whose runtime assertion does not hold", function()
    local path = write_script("runtime", [[
      local s = require("netra.scenario").new("runtime")
      local rt = assert(s:start({ env = "test" }))
      s:is(rt:state(), "ready", "ready")
      local status = rt:health("/health/ready")
      s:is(status, 503, "ready is 503 (it is not: this must fail)")
      local c = assert(s:connect({ user = "spec_user" }))
      local r = c:call("echo", { text = "x" })
      s:is(r.content[1].text, "x", "echo")
      local _, msg, rpc = c:call("no_such_tool", {})
      s:is(rpc, -32602, "unknown tool is -32602")
      s:ok(msg, "with a message")
    ]])
    local out, code = run(path)
    assert.equal(1, code, out)
    assert.matches("ok 1 %- ready", out)
    assert.matches("not ok 2 %- ready is 503", out)
    assert.matches("#%s+got: 200", out)
    assert.matches("ok 3 %- echo", out)
    assert.matches("ok 4 %- unknown tool is %-32602", out)
    assert.matches("1%.%.5", out)
  end)

  it("says how to call it when the script is missing", function()
    local out, code = run(scratch .. "/no_such_scenario.lua")
    assert.equal(1, code, out)
    assert.matches("not ok 1 %- the script ran to its end", out)
  end)
end)
