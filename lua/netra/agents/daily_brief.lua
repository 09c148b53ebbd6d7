--- daily_brief: an example agent. It greets the user, tells the time in
--- their timezone, and, when the analytics store is reachable, says how
--- many tool calls they made recently. It thinks aloud (agent_thinking)
--- and calls tools (tool_executing / tool_completed) as it goes.
return {
  name = "daily_brief",
  description = "Greets you with the time and a summary of your recent tool calls.",
  inputSchema = {
    type = "object",
    properties = {
      name = { type = "string", maxLength = 100 },
      timezone = { type = "string" },
    },
    additionalProperties = false,
  },
  run = function(ctx, input)
    local who = input.name or ctx.user_id
    ctx:think(("Preparing a brief for %s."):format(who))

    local clock, err = ctx:call("clock", { timezone = input.timezone })
    if not clock then
      error("could not read the clock: " .. tostring(err))
    end
    ctx:think("It is " .. clock.time .. ".")

    local greeting = ctx:call("echo", { text = ("Hello %s, it is %s."):format(who, clock.time) })

    local recent = ctx:call("analytics_recent_calls", { limit = 5 })
    local summary
    if recent then
      summary = ("You made %d tool call(s) recently."):format(recent.count)
    else
      summary = "Your recent calls are not available right now."
    end
    ctx:think(summary)

    return { greeting = greeting, time = clock.time, recent = summary }
  end,
}
