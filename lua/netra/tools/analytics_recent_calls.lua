--- analytics_recent_calls: the calling user's own recent tool calls, read
--- from ClickHouse (netra_tool_calls). Never another user's.
return {
  name = "analytics_recent_calls",
  description = "Lists your most recent tool calls (newest first) from the "
    .. "analytics store, optionally only those of one tool.",
  inputSchema = {
    type = "object",
    properties = {
      limit = { type = "integer", minimum = 1, maximum = 100, default = 10 },
      tool = { type = "string", maxLength = 128 },
    },
    additionalProperties = false,
  },
  annotations = { readOnlyHint = true, openWorldHint = false },
  handler = function(ctx, args)
    local ch = ctx.clickhouse
    local quote = ch.quote
    local where = "user_id = " .. quote(ctx.user_id)
    if args.tool then
      where = where .. " AND tool_name = " .. quote(args.tool)
    end
    local sql = ("SELECT event_id, tool_name, status, duration_ms, started_at, "
      .. "started_ms FROM netra_tool_calls FINAL WHERE %s "
      .. "ORDER BY started_at DESC, started_ms DESC LIMIT %d"):format(where, args.limit or 10)
    local rows, err = ch:query(sql)
    if not rows then
      return nil, err
    end
    return { calls = rows, count = #rows }
  end,
}
