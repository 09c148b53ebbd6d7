--- clock: the current time, in UTC or at a fixed offset from it.
local function offset_seconds(zone)
  if zone == nil or zone == "UTC" or zone == "Z" then
    return 0, "UTC"
  end
  local sign, hours, minutes = zone:match("^([+-])(%d%d):?(%d%d)$")
  if not sign then
    return nil
  end
  local h, m = tonumber(hours), tonumber(minutes)
  if h > 14 or m > 59 then
    return nil
  end
  local seconds = (h * 3600 + m * 60) * (sign == "-" and -1 or 1)
  return seconds, ("%s%02d:%02d"):format(sign, h, m)
end

return {
  name = "clock",
  description = "Returns the current time as RFC 3339 text and Unix seconds, "
    .. "in UTC or at a fixed offset such as +05:30.",
  inputSchema = {
    type = "object",
    properties = {
      timezone = {
        type = "string",
        description = "UTC (the default) or an offset: +HH:MM or -HH:MM.",
      },
    },
    additionalProperties = false,
  },
  outputSchema = {
    type = "object",
    properties = {
      time = { type = "string" },
      unix = { type = "integer" },
      timezone = { type = "string" },
    },
    required = { "time", "unix", "timezone" },
  },
  annotations = { readOnlyHint = true, openWorldHint = false },
  handler = function(_, args)
    local offset, zone = offset_seconds(args.timezone)
    if not offset then
      return nil, ("timezone '%s' is not UTC or an offset like +05:30"):format(args.timezone)
    end
    local now = os.time()
    local text = os.date("!%Y-%m-%dT%H:%M:%S", now + offset)
    if offset == 0 then
      text = text .. "Z"
    else
      text = text .. zone
    end
    return { time = text, unix = now, timezone = zone }
  end,
}
