--- echo: returns the text it is given. The smallest useful tool, and the
--- one clients use to check that calls work end to end.
return {
  name = "echo",
  description = "Returns the text it is given, unchanged.",
  inputSchema = {
    type = "object",
    properties = {
      text = { type = "string", description = "The text to send back." },
    },
    required = { "text" },
    additionalProperties = false,
  },
  annotations = { readOnlyHint = true, idempotentHint = true, openWorldHint = false },
  handler = function(_, args)
    return args.text
  end,
}
