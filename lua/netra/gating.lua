--- Environment gating: what each environment requires, allows and limits.
--- One row per environment; the policy reads this table and nothing else
--- decides these questions. Settings (config/<env>.env, the process
--- environment, flags) may override the rows marked "default".
---
--- Fields:
---   clickhouse_required  default for CLICKHOUSE_REQUIRED
---   jwt_secret           what a missing NETRA_JWT_SECRET means:
---                        "refuse" (do not start), "warn" (start, refuse
---                        every /ws client), "optional" (dev clients may
---                        connect without a token when anonymous is true)
---   anonymous            /ws clients without a token are accepted, named
---                        by X-Netra-User (default dev_user)
---   console              the control socket is opened (NETRA_CONSOLE
---                        overrides)
---   connect              ClickHouse connection attempts during startup
---   budget               per-request defaults for tools and agents
---   tools                tool names registered here ("*" for all)
local gating = {}

gating.environments = {
  development = {
    clickhouse_required = false,
    jwt_secret = "optional",
    anonymous = true,
    console = true,
    connect = { timeout_ms = 1000, attempts = 1, backoff_ms = 250, budget_ms = 3000 },
    budget = { time_ms = 5000, instructions = 50000000, memory_bytes = 64 * 1024 * 1024 },
    tools = { "*" },
  },
  test = {
    clickhouse_required = false,
    jwt_secret = "optional",
    anonymous = true,
    console = true,
    connect = { timeout_ms = 1000, attempts = 1, backoff_ms = 250, budget_ms = 3000 },
    budget = { time_ms = 2000, instructions = 20000000, memory_bytes = 32 * 1024 * 1024 },
    tools = { "*" },
  },
  staging = {
    clickhouse_required = false,
    jwt_secret = "warn",
    anonymous = false,
    console = true,
    connect = { timeout_ms = 2000, attempts = 3, backoff_ms = 500, budget_ms = 10000 },
    budget = { time_ms = 2000, instructions = 20000000, memory_bytes = 32 * 1024 * 1024 },
    tools = { "*" },
  },
  production = {
    clickhouse_required = true,
    jwt_secret = "refuse",
    anonymous = false,
    console = false,
    connect = { timeout_ms = 2000, attempts = 5, backoff_ms = 1000, budget_ms = 30000 },
    budget = { time_ms = 2000, instructions = 20000000, memory_bytes = 32 * 1024 * 1024 },
    tools = { "*" },
  },
}

--- The row for one environment.
---@param name string development, test, staging or production
---@return table rules
function gating.rules(name)
  local rules = gating.environments[name]
  if not rules then
    error(("no gating rules for environment '%s'"):format(tostring(name)), 2)
  end
  return rules
end

--- Is a tool allowed in this environment?
---@param rules table a row of gating.environments
---@param tool string the tool's name
---@return boolean
function gating.allows_tool(rules, tool)
  for _, name in ipairs(rules.tools) do
    if name == "*" or name == tool then
      return true
    end
  end
  return false
end

return gating
