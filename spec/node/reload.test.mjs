// Hot reload on SIGHUP against a real `netra serve` with its own copy of
// lua/ and config/: connections stay open, calls in flight finish on the
// old generation, clients hear notifications/tools/list_changed, and a
// broken policy or tool keeps the old generation with file:line logged.
import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { cpSync, mkdtempSync, writeFileSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { startNetra, Client, home, waitFor } from './support.mjs';

const SLOW = `return {
  name = "slow",
  description = "Spins for the given seconds, then answers.",
  inputSchema = { type = "object", properties = { seconds = { type = "number" } } },
  budget = { time_ms = 20000, instructions = 10000000000 },
  handler = function(_, args)
    local t0 = os.clock()
    while os.clock() - t0 < args.seconds do end
    return "slept " .. args.seconds
  end,
}
`;

const reverse = (description) => `return {
  name = "reverse",
  description = "${description}",
  inputSchema = { type = "object", properties = { text = { type = "string" } } },
  handler = function(_, args)
    return args.text:reverse()
  end,
}
`;

const BROKEN = `return {
  name = "reverse",
  description = "broken",
  handler = function(_, args)
    return args.text:reverse(
  end,
}
`;

function makeHome() {
  const dir = mkdtempSync(join(tmpdir(), 'netra-reload-'));
  cpSync(join(home, 'lua'), join(dir, 'lua'), { recursive: true });
  cpSync(join(home, 'config'), join(dir, 'config'), { recursive: true });
  writeFileSync(join(dir, 'lua/netra/tools/slow.lua'), SLOW);
  return dir;
}

const count = (text, re) => (text.match(re) || []).length;

describe('reload on SIGHUP', () => {
  let srv, dir, client;
  const tool = (name) => join(dir, 'lua/netra/tools', name);

  /** Sends SIGHUP and waits for the n-th outcome line (done or failed). */
  async function hup() {
    const before = count(srv.log(), /reload (done|failed)/g);
    srv.proc.kill('SIGHUP');
    await waitFor(() => count(srv.log(), /reload (done|failed)/g) > before, 30000,
      () => `no reload outcome in the log:\n${srv.log()}`);
    return srv.log().split('\n').filter((l) => /reload (done|failed)/.test(l)).pop();
  }

  const listChanged = () => client.messages.filter(
    (m) => m.method === 'notifications/tools/list_changed').length;

  const toolNames = async () =>
    (await client.rpc('tools/list')).result.tools.map((t) => t.name).sort();

  before(async () => {
    dir = makeHome();
    srv = await startNetra({ env: { NETRA_HOME: dir, NETRA_STATE_DIR: dir, NETRA_LOG_FORMAT: 'text' } });
    client = await Client.connect(srv.url(), { headers: { 'X-Netra-User': 'alice' } });
    await client.rpc('initialize', { protocolVersion: '2025-06-18', capabilities: {},
      clientInfo: { name: 'reload-test', version: '1' } });
  });
  after(async () => {
    if (client) await client.close();
    const { code } = await srv.stop();
    if (process.env.RELOAD_TEST_LOG) process.stderr.write(srv.log());
    assert.equal(code, 0, srv.log());
  });

  test('a new tool appears, the client is told, and a call in flight finishes', async () => {
    assert.ok(!(await toolNames()).includes('reverse'));
    const slowId = 'slow-1';
    client.send({ jsonrpc: '2.0', id: slowId, method: 'tools/call',
      params: { name: 'slow', arguments: { seconds: 1.5 } } });

    writeFileSync(tool('reverse.lua'), reverse('Reverses text.'));
    const line = await hup();
    assert.match(line, /reload done: generation 2/);
    assert.match(line, /tools changed/);
    assert.match(line, /retires with 1 request\(s\) in flight/);

    await client.waitMessage((m) => m.method === 'notifications/tools/list_changed');
    assert.ok((await toolNames()).includes('reverse'));
    const r = await client.rpc('tools/call', { name: 'reverse', arguments: { text: 'abc' } });
    assert.equal(r.result.content[0].text, 'cba');

    const slow = await client.waitMessage((m) => m.id === slowId && m.result !== undefined);
    assert.ok(!slow.result.isError, JSON.stringify(slow));
    assert.equal(slow.result.content[0].text, 'slept 1.5');
  });

  test('a broken tool keeps the old generation and names file and line', async () => {
    const seen = listChanged();
    writeFileSync(tool('reverse.lua'), BROKEN);
    const line = await hup();
    assert.match(line, /reload failed: .*lua\/netra\/tools\/reverse\.lua:\d+/);
    assert.match(line, /generation 2 keeps serving/);

    const r = await client.rpc('tools/call', { name: 'reverse', arguments: { text: 'xyz' } });
    assert.equal(r.result.content[0].text, 'zyx');
    const e = await client.rpc('tools/call', { name: 'echo', arguments: { text: 'still' } });
    assert.equal(e.result.content[0].text, 'still');
    assert.equal(listChanged(), seen, 'a failed reload must not notify');
  });

  test('fixing the file and reloading again works', async () => {
    const seen = listChanged();
    writeFileSync(tool('reverse.lua'), reverse('Reverses text, fixed.'));
    const line = await hup();
    assert.match(line, /reload done: generation 3/);
    await waitFor(() => listChanged() > seen);
    const tools = (await client.rpc('tools/list')).result.tools;
    assert.equal(tools.find((t) => t.name === 'reverse').description, 'Reverses text, fixed.');
  });

  test('a reload that changes nothing does not notify', async () => {
    const seen = listChanged();
    const line = await hup();
    assert.match(line, /reload done: generation 4 .*tools unchanged/);
    const p = await client.rpc('ping');
    assert.deepEqual(p.result, {});
    assert.equal(listChanged(), seen);
  });

  test('a broken policy keeps the old generation and names file and line', async () => {
    const path = join(dir, 'lua/netra/policy.lua');
    const good = readFileSync(path, 'utf8');
    writeFileSync(path, good.replace('local policy = {}', 'local policy = {'));
    const line = await hup();
    assert.match(line, /reload failed: policy .* failed to load: lua\/netra\/policy\.lua:\d+:/);
    writeFileSync(path, good);
    const e = await client.rpc('tools/call', { name: 'reverse', arguments: { text: 'ok' } });
    assert.equal(e.result.content[0].text, 'ko');
    const again = await hup();
    assert.match(again, /reload done: generation 5/);
  });

  test('the server stays ready and the connection stays open throughout', async () => {
    const res = await fetch(`http://127.0.0.1:${srv.port}/health/ready`);
    assert.equal(res.status, 200);
    assert.deepEqual((await client.rpc('ping')).result, {});
  });
});
