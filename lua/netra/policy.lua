--- netra's startup policy: which components this deployment has, in which
--- phase they start, whether each is required in this environment, how
--- each connects and how each is checked afterwards. The C core runs
--- `policy.start()` for `netra serve` and `policy.check()` for
--- `netra check`; everything it decides is in this file and in
--- netra/gating.lua.
local netra = require("netra")
local gating = require("netra.gating")

local policy = {}

local env = netra.environment
local rules = gating.rules(env)

--- Where a setting came from, for messages: "CLICKHOUSE_REQUIRED=false
--- (config/staging.env)".
local function setting_text(key)
  local value = netra.config.get(key)
  if value == nil then
    return key .. " unset"
  end
  if netra.config.is_secret(key) then
    value = "[REDACTED]"
  end
  return ("%s=%s (%s)"):format(key, value, netra.config.source(key))
end


--- The ClickHouse settings that are present, and whether enough are.
local function clickhouse_configured()
  local url = netra.config.get("CLICKHOUSE_URL")
  local host = netra.config.get("CLICKHOUSE_HOST")
  return url ~= nil or host ~= nil
end


--- The ClickHouse client settings from the configuration, with the
--- connection rules of this environment.
local function clickhouse_settings()
  local cfg = {}
  for _, key in ipairs({ "CLICKHOUSE_URL", "CLICKHOUSE_HOST", "CLICKHOUSE_PORT",
    "CLICKHOUSE_USER", "CLICKHOUSE_PASSWORD", "CLICKHOUSE_DB", "CLICKHOUSE_SECURE" }) do
    cfg[key] = netra.config.get(key)
  end
  cfg.connect_timeout_ms = rules.connect.timeout_ms
  cfg.timeout_ms = rules.connect.query_timeout_ms or 10000
  cfg.retries = 0
  return cfg
end


--- Each component: its type, and how to decide, start and check it.
--- decide() returns a decision:
---   { state = "required" | "optional" | "disabled", reason = "...",
---     problem = "...", advice = "...", severity = "error" | "warning" }
policy.components = {}

policy.components.agent_websocket_bridge = {
  type = "component",
  check = { interval_ms = 1000, timeout_ms = 1500, fail_after = 2, recover_after = 1 },
  decide = function()
    return { state = "required", reason = "the /ws listener serves every agent client" }
  end,
  start = function(decision, spec)
    netra.server.set_auth({
      anonymous = rules.anonymous,
      require_exp = env == "staging" or env == "production",
    })
    netra.health.register({
      name = "agent_websocket_bridge",
      type = spec.type,
      measurement = "connections",
      required = decision.state == "required",
      check = "bridge",
      interval_ms = spec.check.interval_ms,
      timeout_ms = spec.check.timeout_ms,
      fail_after = spec.check.fail_after,
      recover_after = spec.check.recover_after,
    })
    return true
  end,
}

policy.components.clickhouse = {
  type = "datastore",
  check = { interval_ms = 2000, timeout_ms = 1500, fail_after = 2, recover_after = 1 },
  decide = function()
    local required = netra.config.bool("CLICKHOUSE_REQUIRED", rules.clickhouse_required)
    local why
    if netra.config.get("CLICKHOUSE_REQUIRED") then
      why = setting_text("CLICKHOUSE_REQUIRED")
    else
      why = ("CLICKHOUSE_REQUIRED=%s (the gating table's default for %s)"):format(
        tostring(required), env)
    end
    if not clickhouse_configured() then
      if required then
        return {
          state = "required",
          reason = why,
          severity = "error",
          problem = "Required secrets missing: ['CLICKHOUSE_URL']",
          advice = "set CLICKHOUSE_URL or CLICKHOUSE_HOST, or set CLICKHOUSE_REQUIRED=false",
        }
      end
      return {
        state = "disabled",
        reason = "not configured and " .. why,
      }
    end
    local parsed, note = netra.clickhouse.settings(clickhouse_settings())
    if not parsed then
      return {
        state = required and "required" or "optional",
        reason = why,
        severity = "error",
        problem = "ClickHouse settings are not usable: " .. tostring(note),
        advice = "fix CLICKHOUSE_URL (http[s]://user:password@host:port/db) "
          .. "or CLICKHOUSE_HOST/CLICKHOUSE_PORT",
      }
    end
    if note and note ~= "" then
      return {
        state = required and "required" or "optional",
        reason = why,
        severity = "warning",
        problem = "ClickHouse: " .. tostring(note),
        advice = "remove the settings that are ignored",
      }
    end
    return { state = required and "required" or "optional", reason = why }
  end,
  start = function(decision, spec)
    if decision.state == "disabled" then
      netra.log.info("ClickHouse",
        ("Skipping connection in %s - CLICKHOUSE_REQUIRED=false"):format(env))
      netra.health.register({ name = "clickhouse", type = spec.type, required = false })
      netra.health.set("clickhouse", "disabled", decision.reason)
      return true
    end
    if decision.problem and decision.severity == "error" then
      return nil, decision.problem .. " - " .. decision.advice
    end
    return policy.connect_clickhouse(decision, spec)
  end,
}


--- Connects to ClickHouse within this environment's budget: attempts
--- with backoff, never fewer than one. A required store that stays
--- unreachable refuses startup with the last error; an optional one
--- leaves the component unhealthy (overall degraded) with one warning,
--- and its check keeps trying in the background.
---@return boolean|nil ok
---@return string|nil message
function policy.connect_clickhouse(decision, spec)
  local required = decision.state == "required"
  local settings = clickhouse_settings()
  local client, warning = netra.clickhouse.new(settings)
  if not client then
    return nil, "[ClickHouse] bad settings: " .. tostring(warning)
  end
  if warning then
    netra.log.warn("ClickHouse", warning)
  end
  local connect = rules.connect
  local started = netra.startup.now_ms()
  local attempt, ok, err = 0, nil, nil -- luacheck: ignore 311
  repeat
    attempt = attempt + 1
    ok, err = client:connect()
    if ok then
      break
    end
    local elapsed = netra.startup.now_ms() - started
    local more = attempt < connect.attempts
      and elapsed + connect.backoff_ms + connect.timeout_ms <= connect.budget_ms
    if more then
      netra.startup.sleep(connect.backoff_ms * attempt)
    end
  until not more

  -- The check has a client of its own, bounded by the check's timeout.
  local check_settings = clickhouse_settings()
  check_settings.connect_timeout_ms = spec.check.timeout_ms
  check_settings.timeout_ms = spec.check.timeout_ms
  local probe = assert(netra.clickhouse.new(check_settings))
  netra.health.register({
    name = "clickhouse",
    type = spec.type,
    measurement = "responseTime",
    unit = "ms",
    required = required,
    interval_ms = spec.check.interval_ms,
    timeout_ms = spec.check.timeout_ms,
    fail_after = spec.check.fail_after,
    recover_after = spec.check.recover_after,
    check = function()
      local t0 = netra.startup.now_ms()
      local alive, why
      if probe:connected() then
        alive, why = probe:ping()
      else
        alive, why = probe:connect()
      end
      local took = netra.startup.now_ms() - t0
      if alive then
        return "healthy", ("ClickHouse %s answered in %d ms"):format(probe:version(), took), took
      end
      return "unhealthy", tostring(why)
    end,
  })
  policy.clickhouse = client

  if ok then
    netra.log.info("ClickHouse", ("connected: ClickHouse %s, time zone %s"):format(
      client:version(), client:timezone()))
    netra.health.set("clickhouse", "healthy", "connected to ClickHouse " .. client:version())
    return true
  end
  if required then
    return nil, ("[ClickHouse] required in %s but unreachable after %d attempt(s): %s"):format(
      env, attempt, tostring(err))
  end
  netra.log.warn("ClickHouse", ("optional ClickHouse unreachable after %d attempt(s): %s"
    .. " - starting degraded; analytics go to the spool until it is back"):format(
    attempt, tostring(err)))
  netra.health.set("clickhouse", "unhealthy", tostring(err))
  return true
end

--- Lists the .lua files of one directory under lua/netra, sorted.
local function lua_files(kind)
  local dir = ("%s/lua/netra/%s"):format(netra.config.home(), kind)
  local names = netra.startup.list_dir(dir) or {}
  local files = {}
  for _, name in ipairs(names) do
    local stem = name:match("^(.+)%.lua$")
    if stem then
      files[#files + 1] = { stem = stem, path = dir .. "/" .. name }
    end
  end
  return files
end


--- Registers the tools and agents the gating table allows, once per
--- process; the dispatcher's pool is made from them after the policy.
local registered
local function register_tools()
  if registered then
    return registered
  end
  local items, problems, skipped = {}, {}, 0
  for _, kind in ipairs({ "tools", "agents" }) do
    local register = kind == "tools" and netra.dispatcher.register_tool
      or netra.dispatcher.register_agent
    for _, file in ipairs(lua_files(kind)) do
      if kind == "agents" or gating.allows_tool(rules, file.stem) then
        local ok, err = register(file.path)
        if ok then
          items[#items + 1] = { kind = kind:sub(1, -2), name = file.stem, path = file.path }
        else
          problems[#problems + 1] = {
            severity = "error",
            problem = ("%s not registered: %s"):format(kind:sub(1, -2), err),
            advice = ("fix %s or move it out of lua/netra/%s"):format(file.path, kind),
          }
        end
      else
        skipped = skipped + 1
      end
    end
  end
  registered = { items = items, problems = problems, skipped = skipped }
  return registered
end

policy.components.tools = {
  type = "component",
  decide = function()
    local r = register_tools()
    local ntools, nagents = 0, 0
    for _, item in ipairs(r.items) do
      if item.kind == "tool" then ntools = ntools + 1 else nagents = nagents + 1 end
    end
    return {
      state = "required",
      reason = ("%d tool(s) and %d agent(s) registered, %d gated off in %s"):format(
        ntools, nagents, r.skipped, env),
      items = r.items,
      problems = r.problems,
    }
  end,
  start = function(decision)
    if rules.budget then
      netra.dispatcher.set_budget(rules.budget)
    end
    netra.log.info("dispatcher", decision.reason)
    return true
  end,
}

policy.components.analytics = {
  type = "component",
  decide = function()
    local ch = policy.components.clickhouse.decide()
    if ch.state == "disabled" then
      return { state = "optional",
        reason = "ClickHouse is disabled: events go to the local JSON-lines file" }
    end
    return { state = "optional",
      reason = "events are spooled (NETRA_SPOOL_DIR), then sent to ClickHouse" }
  end,
  start = function()
    local status = netra.health.get("clickhouse")
    local mode = (status and status.status == "disabled") and "local" or "clickhouse"
    local ok, err = netra.analytics.start({ mode = mode })
    if not ok then
      -- Most reasons already say what to do (a spool locked by another
      -- netra: stop it or use another NETRA_SPOOL_DIR); advice about a
      -- writable path would mislead there.
      if err:find("NETRA_", 1, true) then
        return nil, err
      end
      return nil, err .. " - set NETRA_SPOOL_DIR (or NETRA_EVENTS_FILE) to a writable path"
    end
    return true
  end,
}

--- Settings that are not components but can stop startup or warn.
policy.settings = {
  {
    key = "NETRA_JWT_SECRET",
    decide = function()
      if netra.config.get("NETRA_JWT_SECRET") then
        return nil
      end
      if rules.jwt_secret == "refuse" then
        return {
          severity = "error",
          problem = ("NETRA_JWT_SECRET is not set; %s refuses to start without it"):format(env),
          advice = "set NETRA_JWT_SECRET to a long random value (e.g. openssl rand -hex 32)",
        }
      elseif rules.jwt_secret == "warn" then
        return {
          severity = "warning",
          problem = ("NETRA_JWT_SECRET is not set; in %s every /ws client will be refused")
            :format(env),
          advice = "set NETRA_JWT_SECRET so that clients can authenticate",
        }
      end
      return nil
    end,
  },
}

--- Phases in order, each naming its components in start order.
policy.phases = {
  { name = "listener", components = { "agent_websocket_bridge" } },
  { name = "datastores", components = { "clickhouse", "analytics" } },
  { name = "tools", components = { "tools" } },
}


--- Decides every component and setting without connecting to anything.
---@return table plan { phases = {{name, components = {{name, spec, decision}}}}, problems = {...} }
function policy.plan()
  local plan = { environment = env, phases = {}, problems = {} }
  for _, phase in ipairs(policy.phases) do
    local entry = { name = phase.name, components = {} }
    for _, name in ipairs(phase.components) do
      local spec = policy.components[name]
      if not spec then
        error(("phase '%s' names unknown component '%s'"):format(phase.name, name))
      end
      local decision = spec.decide()
      entry.components[#entry.components + 1] = { name = name, spec = spec, decision = decision }
      if decision.problem then
        plan.problems[#plan.problems + 1] = {
          subject = name, severity = decision.severity or "error",
          problem = decision.problem, advice = decision.advice,
        }
      end
      for _, p in ipairs(decision.problems or {}) do
        plan.problems[#plan.problems + 1] = {
          subject = name, severity = p.severity or "error",
          problem = p.problem, advice = p.advice,
        }
      end
    end
    plan.phases[#plan.phases + 1] = entry
  end
  for _, setting in ipairs(policy.settings) do
    local decision = setting.decide()
    if decision then
      plan.problems[#plan.problems + 1] = {
        subject = setting.key, severity = decision.severity,
        problem = decision.problem, advice = decision.advice,
      }
    end
  end
  return plan
end


--- True when no problem in the plan is an error.
local function proceeds(plan)
  for _, p in ipairs(plan.problems) do
    if p.severity == "error" then
      return false
    end
  end
  return true
end


--- Runs the policy for `netra serve`: each phase in order, each component
--- started as decided. Warnings are logged; the first error refuses.
---@return boolean|nil ok
---@return string|nil message why startup is refused
function policy.start()
  local plan = policy.plan()
  local errors = {}
  for _, p in ipairs(plan.problems) do
    if p.severity == "warning" then
      netra.log.warn("policy", p.problem .. " - " .. p.advice)
    else
      errors[#errors + 1] = p.problem .. " - " .. p.advice
    end
  end
  if #errors > 0 then
    return nil, table.concat(errors, "; ")
  end
  for _, phase in ipairs(plan.phases) do
    netra.startup.phase(phase.name)
    for _, c in ipairs(phase.components) do
      local ok, err = c.spec.start(c.decision, c.spec)
      if not ok then
        return nil, err
      end
    end
  end
  return true
end


--- Runs the policy for `netra check`: decides without connecting and
--- describes every component and problem.
---@return boolean ok startup would proceed
---@return string[] lines the report
function policy.check()
  local plan = policy.plan()
  local lines = {}
  local function add(fmt, ...)
    lines[#lines + 1] = fmt:format(...)
  end
  add("environment: %s (%s)", env, netra.config.source("ENVIRONMENT"))
  for _, phase in ipairs(plan.phases) do
    add("phase %s", phase.name)
    for _, c in ipairs(phase.components) do
      add("  %-24s %-9s %s", c.name, c.decision.state, c.decision.reason or "")
      for _, item in ipairs(c.decision.items or {}) do
        add("    %-5s %-22s %s", item.kind, item.name, item.path)
      end
    end
  end
  local ok = proceeds(plan)
  if #plan.problems > 0 then
    add("problems")
    for _, p in ipairs(plan.problems) do
      add("  %s: %s - %s", p.severity, p.problem, p.advice)
    end
  end
  if ok then
    add("startup would proceed")
  else
    add("startup would be refused")
  end
  return ok, lines
end

return policy
