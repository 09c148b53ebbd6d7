// Agents and events over /ws with real clients: agents/list, agents/run,
// event order and fields, errors, budgets, agents/cancel, disconnects,
// redaction, tool events before results, progress.
import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startNetra, Client, waitFor } from './support.mjs';
import { testHome, waitObserved, runEnd, TIMESTAMP } from './testhome.mjs';

const COMMON = ['type', 'run_id', 'thread_id', 'user_id', 'agent_name', 'timestamp'];

function checkCommon(ev, { runId, threadId, user, agent }) {
  for (const k of COMMON) assert.ok(k in ev, `${ev.type} lacks ${k}: ${JSON.stringify(ev)}`);
  assert.equal(ev.run_id, runId);
  assert.equal(ev.thread_id, threadId);
  assert.equal(ev.user_id, user);
  assert.equal(ev.agent_name, agent);
  assert.match(ev.timestamp, TIMESTAMP);
}

/** Starts a run; returns {runId, threadId, responseIndex}. */
async function run(c, name, input = {}, extra = {}) {
  const r = await c.rpc('agents/run', { name, input, ...extra });
  assert.ok(r.result, `agents/run ${name} failed: ${JSON.stringify(r.error)}`);
  return { runId: r.result.run_id, threadId: r.result.thread_id, responseIndex: c.messages.indexOf(r) };
}

function runEvents(c, runId) {
  return c.events((e) => e.run_id === runId);
}

describe('agents', () => {
  let srv;
  let c;
  before(async () => {
    srv = await startNetra({ env: { NETRA_HOME: testHome(), NETRA_WORKERS: '2' } });
    c = await Client.connect(srv.url(), { headers: { 'X-Netra-User': 'ada' } });
  });
  after(async () => { await c.close(); await srv.stop(); });

  test('agents/list names every agent with its schema', async () => {
    const r = await c.rpc('agents/list');
    const names = r.result.agents.map((a) => a.name);
    for (const n of ['daily_brief', 'boom', 'spin', 'wait']) assert.ok(names.includes(n), n);
    const brief = r.result.agents.find((a) => a.name === 'daily_brief');
    assert.equal(typeof brief.description, 'string');
    assert.equal(brief.inputSchema.type, 'object');
  });

  test('daily_brief: response first, then events in order, one agent_completed last', async () => {
    const { runId, threadId, responseIndex } = await run(c, 'daily_brief', { name: 'Ada' });
    assert.match(runId, /\S/);
    assert.match(threadId, /\S/);
    await runEnd(c, runId);
    // Nothing more may follow the final event.
    await new Promise((r) => setTimeout(r, 200));
    const firstEvent = c.messages.findIndex((m) => m.method === 'netra/event' && m.params.run_id === runId);
    assert.ok(responseIndex < firstEvent, 'the response came after an event');

    const evs = runEvents(c, runId);
    for (const e of evs) checkCommon(e, { runId, threadId, user: 'ada', agent: 'daily_brief' });
    assert.equal(evs[0].type, 'agent_started');
    assert.deepEqual(evs[0].input, { name: 'Ada' });
    assert.equal(evs.at(-1).type, 'agent_completed');
    assert.equal(evs.filter((e) => e.type === 'agent_completed' || e.type === 'agent_error').length, 1);
    assert.match(evs.at(-1).result.greeting, /Hello Ada/);
    assert.ok(evs.some((e) => e.type === 'agent_thinking' && typeof e.text === 'string'));

    // tool_executing / tool_completed pairs, same id, top-level tool_name.
    const open = new Map();
    const tools = [];
    for (const e of evs.slice(1, -1)) {
      if (e.type === 'tool_executing') {
        assert.equal(typeof e.tool_name, 'string');
        assert.ok(e.tool_call_id);
        assert.ok(!open.has(e.tool_call_id));
        open.set(e.tool_call_id, e.tool_name);
        tools.push(e.tool_name);
      } else if (e.type === 'tool_completed') {
        assert.equal(open.get(e.tool_call_id), e.tool_name, 'tool_completed without its tool_executing');
        open.delete(e.tool_call_id);
        assert.ok('results' in e || 'error' in e);
      } else {
        assert.equal(e.type, 'agent_thinking');
      }
    }
    assert.equal(open.size, 0, 'a tool_executing without tool_completed');
    assert.deepEqual(tools, ['clock', 'echo', 'analytics_recent_calls']);
  });

  test('a thread_id given is kept', async () => {
    const { runId, threadId } = await run(c, 'daily_brief', {}, { thread_id: 'thread-42' });
    assert.equal(threadId, 'thread-42');
    await runEnd(c, runId);
    for (const e of runEvents(c, runId)) assert.equal(e.thread_id, 'thread-42');
  });

  test('an agent that raises ends with exactly one agent_error, last', async () => {
    const { runId } = await run(c, 'boom');
    const end = await runEnd(c, runId);
    await new Promise((r) => setTimeout(r, 200));
    const evs = runEvents(c, runId);
    assert.deepEqual(evs.map((e) => e.type), ['agent_started', 'agent_thinking', 'agent_error']);
    assert.equal(end.params.type, 'agent_error');
    assert.match(JSON.stringify(end.params.error), /boom on purpose/);
  });

  test('an agent over its budget ends with agent_error naming the budget', async () => {
    const { runId } = await run(c, 'spin');
    const end = await runEnd(c, runId);
    await new Promise((r) => setTimeout(r, 200));
    assert.equal(end.params.type, 'agent_error');
    assert.equal(end.params.error.code, 'budget');
    assert.match(end.params.error.message, /budget/);
    const evs = runEvents(c, runId);
    assert.equal(evs.at(-1).type, 'agent_error');
    assert.equal(evs.filter((e) => e.type === 'agent_error').length, 1);
    // The connection and the worker still serve.
    assert.deepEqual((await c.rpc('ping')).result, {});
    const r = await c.rpc('tools/call', { name: 'echo', arguments: { text: 'after' } });
    assert.equal(r.result.content[0].text, 'after');
  });

  test('agents/cancel of a running agent answers {} and ends it with agent_error (cancelled)', async () => {
    const { runId } = await run(c, 'wait', { ms: 60000 });
    await c.waitMessage((m) => m.method === 'netra/event' && m.params.run_id === runId && m.params.type === 'agent_thinking');
    const r = await c.rpc('agents/cancel', { run_id: runId });
    assert.deepEqual(r.result, {});
    const end = await runEnd(c, runId, 10000);
    await new Promise((res) => setTimeout(res, 200));
    assert.equal(end.params.type, 'agent_error');
    assert.equal(end.params.error.code, 'cancelled');
    const evs = runEvents(c, runId);
    assert.equal(evs.at(-1).type, 'agent_error');
    assert.equal(evs.filter((e) => e.type === 'agent_error' || e.type === 'agent_completed').length, 1);
    // A finished run is no longer found.
    const again = await c.rpc('agents/cancel', { run_id: runId });
    assert.equal(again.error.code, -32602);
    assert.equal(again.error.message, 'run not found');
  });

  test('a client that disconnects mid-run gets its run cancelled; nothing crashes', async () => {
    const d = await Client.connect(srv.url(), { headers: { 'X-Netra-User': 'ada' } });
    const { runId } = await run(d, 'wait', { ms: 60000 });
    await d.waitMessage((m) => m.method === 'netra/event' && m.params.run_id === runId && m.params.type === 'agent_thinking');
    await waitObserved(srv.port, (o) => o.runs_in_flight >= 1);
    d.ws.terminate();
    await waitObserved(srv.port, (o) => o.runs_in_flight === 0, 10000);
    await waitFor(() => /closed; 1 request\(s\) cancelled/.test(srv.log()), 5000, () => srv.log());
    assert.deepEqual((await c.rpc('ping')).result, {});
    assert.equal(srv.proc.exitCode, null);
  });

  test('secret-looking argument keys are redacted in tool_executing', async () => {
    const args = { user: 'ada', password: 'hunter2', nested: { api_key: 'k-123', Authorization: 'Bearer z' }, list: [{ token: 't' }] };
    const r = await c.rpc('tools/call', { name: 'login', arguments: args });
    assert.notEqual(r.result.isError, true);
    assert.equal(r.result.content[0].text, 'ok');
    const ex = c.events((e) => e.type === 'tool_executing' && e.tool_name === 'login').at(-1);
    assert.equal(ex.arguments.user, 'ada');
    assert.equal(ex.arguments.password, '[REDACTED]');
    assert.equal(ex.arguments.nested.api_key, '[REDACTED]');
    assert.equal(ex.arguments.nested.Authorization, '[REDACTED]');
    assert.equal(ex.arguments.list[0].token, '[REDACTED]');
    const raw = c.messages.filter((m) => m.method === 'netra/event').map((m) => m.__raw).join('\n');
    for (const secret of ['hunter2', 'k-123', 'Bearer z']) assert.ok(!raw.includes(secret), secret);
  });

  test('a tools/call: tool_completed arrives before its result; bare calls have null run and agent', async () => {
    for (let i = 0; i < 20; i++) {
      const r = await c.rpc('tools/call', { name: 'echo', arguments: { text: `n${i}` } });
      const at = c.messages.indexOf(r);
      const before = c.messages.slice(0, at).filter((m) => m.method === 'netra/event');
      const done = before.find((m) => m.params.type === 'tool_completed' && m.params.results?.content?.[0]?.text === `n${i}`);
      assert.ok(done, `no tool_completed before result ${i}`);
      const ex = before.find((m) => m.params.type === 'tool_executing' && m.params.tool_call_id === done.params.tool_call_id);
      assert.ok(ex, 'no tool_executing');
      assert.equal(done.params.tool_name, 'echo');
      assert.equal(done.params.agent_name, null);
      assert.equal(done.params.user_id, 'ada');
      assert.match(done.params.timestamp, TIMESTAMP);
    }
  });

  test('progress notifications carry the progressToken, in order, before the result', async () => {
    for (const token of ['tok-1', 77]) {
      const from = c.messages.length;
      const r = await c.rpc('tools/call', { name: 'steps', arguments: {}, _meta: { progressToken: token } });
      assert.deepEqual(r.result.structuredContent.sent, [true, true, true]);
      const at = c.messages.indexOf(r);
      const prog = c.messages.slice(from, at).filter((m) => m.method === 'notifications/progress').map((m) => m.params);
      assert.deepEqual(prog.map((p) => p.progress), [1, 2, 3]);
      for (const p of prog) {
        assert.equal(p.progressToken, token);
        assert.equal(p.total, 3);
      }
      assert.equal(prog[0].message, 'step 1');
    }
    // Without a token there is no progress.
    const from = c.messages.length;
    const r = await c.rpc('tools/call', { name: 'steps', arguments: {} });
    assert.deepEqual(r.result.structuredContent.sent, [false, false, false]);
    assert.equal(c.messages.slice(from).filter((m) => m.method === 'notifications/progress').length, 0);
  });

  test('bad agents/run params: unknown agent, bad input, bad thread_id', async () => {
    assert.equal((await c.rpc('agents/run', { name: 'nope' })).error.code, -32602);
    const bad = await c.rpc('agents/run', { name: 'daily_brief', input: { name: 5 } });
    assert.equal(bad.error.code, -32602);
    assert.match(bad.error.message, /input\.name/);
    assert.equal((await c.rpc('agents/run', { name: 'daily_brief', thread_id: 5 })).error.code, -32602);
    assert.equal((await c.rpc('agents/run', {})).error.code, -32602);
  });
});

describe('many quick runs on one connection', () => {
  test('every run answers first and ends exactly once, with its events', async () => {
    const srv = await startNetra({ env: { NETRA_HOME: testHome(), NETRA_MAX_INFLIGHT_PER_USER: '1000' } });
    const c = await Client.connect(srv.url(), { headers: { 'X-Netra-User': 'quinn' } });
    try {
      const N = 300;
      const answers = await Promise.all(Array.from({ length: N }, (_, n) => c.rpc('agents/run', { name: 'quick', input: { n } })));
      const ids = answers.map((a) => {
        assert.ok(a.result, JSON.stringify(a.error));
        return a.result.run_id;
      });
      assert.equal(new Set(ids).size, N);
      await Promise.all(ids.map((id) => runEnd(c, id)));
      await new Promise((r) => setTimeout(r, 200));
      ids.forEach((id, n) => {
        const evs = c.events((e) => e.run_id === id);
        assert.deepEqual(evs.map((e) => e.type), ['agent_started', 'agent_completed'], id);
        assert.deepEqual(evs[1].result, { n });
        const resp = c.messages.indexOf(answers[n]);
        const first = c.messages.findIndex((m) => m.method === 'netra/event' && m.params.run_id === id);
        assert.ok(resp < first, `run ${n}: event before the response`);
      });
    } finally {
      await c.close();
      await srv.stop();
    }
    assert.doesNotMatch(srv.log(), /AddressSanitizer|runtime error/);
  });
});
