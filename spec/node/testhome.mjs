// A private NETRA_HOME for node tests: a copy of the repository's lua/ and
// config/ with test-only tools and agents added. Nothing in the real tree
// changes.
import { cpSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { home, httpJson, waitFor } from './support.mjs';

/** Tools only tests use, by file name. */
export const TEST_TOOLS = {
  // Busy for args.ms milliseconds; a ctx call every few ms lets a cancel in.
  'slow.lua': `
return {
  name = "slow",
  description = "Waits args.ms milliseconds (test only).",
  inputSchema = { type = "object", properties = { ms = { type = "integer" } } },
  budget = { time_ms = 60000, instructions = 2000000000 },
  handler = function(ctx, args)
    local stop = os.clock() + (args.ms or 1000) / 1000
    local n = 0
    while os.clock() < stop do
      n = n + 1
      if n % 2000 == 0 then ctx:progress(n) end
    end
    return "slept"
  end,
}`,
  // Returns args.kb kilobytes of text.
  'big.lua': `
return {
  name = "big",
  description = "Returns args.kb kilobytes of text (test only).",
  inputSchema = { type = "object", properties = { kb = { type = "integer" } } },
  handler = function(_, args)
    return string.rep("x", 1024 * (args.kb or 64))
  end,
}`,
  // Reports progress three times, then answers.
  'steps.lua': `
return {
  name = "steps",
  description = "Reports progress 1, 2, 3 of 3 (test only).",
  inputSchema = { type = "object" },
  handler = function(ctx)
    local sent = {}
    for i = 1, 3 do sent[i] = ctx:progress(i, 3, "step " .. i) end
    return { sent = sent }
  end,
}`,
  // Accepts any arguments; used to see how tool_executing shows them.
  'login.lua': `
return {
  name = "login",
  description = "Accepts anything and says ok (test only).",
  inputSchema = { type = "object" },
  handler = function() return "ok" end,
}`,
};

/** Agents only tests use, by file name. */
export const TEST_AGENTS = {
  'quick.lua': `
return {
  name = "quick",
  description = "Returns at once (test only).",
  run = function(_, input) return { n = input.n } end,
}`,
  'boom.lua': `
return {
  name = "boom",
  description = "Thinks once, then raises (test only).",
  run = function(ctx)
    ctx:think("about to fail")
    error("boom on purpose")
  end,
}`,
  'spin.lua': `
return {
  name = "spin",
  description = "Loops forever under a small budget (test only).",
  budget = { time_ms = 300 },
  run = function()
    local n = 0
    while true do n = n + 1 end
  end,
}`,
  // Runs input.ms milliseconds (default 60 s), with a ctx call now and then
  // so that a cancel is noticed at once.
  'wait.lua': `
return {
  name = "wait",
  description = "Waits input.ms milliseconds (test only).",
  inputSchema = { type = "object", properties = { ms = { type = "integer" } } },
  budget = { time_ms = 120000, instructions = 10000000000 },
  run = function(ctx, input)
    ctx:think("waiting")
    local stop = os.clock() + (input.ms or 60000) / 1000
    local n = 0
    while os.clock() < stop do
      n = n + 1
      if n % 2000 == 0 then ctx:progress(n) end
    end
    return { waited = input.ms or 60000 }
  end,
}`,
  // Thinks input.count times with input.kb kilobytes each, input.gap_ms apart.
  'chatty.lua': `
return {
  name = "chatty",
  description = "Thinks aloud a lot (test only).",
  inputSchema = { type = "object" },
  budget = { time_ms = 60000, instructions = 10000000000,
             memory_bytes = 256 * 1024 * 1024 },
  run = function(ctx, input)
    local text = string.rep("y", 1024 * (input.kb or 64))
    for _ = 1, (input.count or 100) do
      ctx:think(text)
      local until_ = os.clock() + (input.gap_ms or 0) / 1000
      while os.clock() < until_ do end
    end
    return "done"
  end,
}`,
};

/** Makes a NETRA_HOME copy with the test tools and agents; returns its path. */
const made = [];
process.on('exit', () => {
  for (const dir of made) rmSync(dir, { recursive: true, force: true });
});

export function testHome() {
  const dir = mkdtempSync(join(tmpdir(), 'netra-home-'));
  made.push(dir);
  cpSync(join(home, 'lua'), join(dir, 'lua'), { recursive: true });
  cpSync(join(home, 'config'), join(dir, 'config'), { recursive: true });
  for (const [f, text] of Object.entries(TEST_TOOLS))
    writeFileSync(join(dir, 'lua/netra/tools', f), text);
  for (const [f, text] of Object.entries(TEST_AGENTS))
    writeFileSync(join(dir, 'lua/netra/agents', f), text);
  return dir;
}

/** agent_websocket_bridge's observed value from /health. */
export async function bridgeObserved(port) {
  const { body } = await httpJson(port, '/health');
  const check = body.checks?.['agent_websocket_bridge:connections']?.[0];
  return check?.observedValue;
}

/** Waits until the bridge's observed value satisfies pred; returns it. */
export async function waitObserved(port, pred, timeoutMs = 20000) {
  let last;
  return waitFor(async () => {
    last = await bridgeObserved(port);
    return last && pred(last) ? last : undefined;
  }, timeoutMs, () => `observed value never matched; last ${JSON.stringify(last)}`);
}

/** RFC 3339, UTC, milliseconds. */
export const TIMESTAMP = /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/;

/** Resolves when the run's last event (agent_completed/agent_error) came. */
export function runEnd(client, runId, timeoutMs = 30000) {
  return client.waitMessage((m) => m.method === 'netra/event' && m.params.run_id === runId &&
    (m.params.type === 'agent_completed' || m.params.type === 'agent_error'), timeoutMs);
}
