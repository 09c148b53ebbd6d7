// Analytics tables on a real ClickHouse (needs: clickhouse): netra
// creates netra_tool_calls and netra_agent_events itself, its rows carry
// the call's identity, outcome, timing and redacted arguments, and rows
// sent twice collapse under FINAL.
import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { rmSync } from 'node:fs';
import { startNetra, Client } from './support.mjs';
import { chQuery, chRows, chNumber, scratch, sharedClickHouse, waitAnalytics, stopWithin } from './analytics_support.mjs';

describe('analytics tables', () => {
  let addr, db, srv, dir;
  const user = `tables_${process.pid}`;
  const secret = 'hunter2-do-not-store';
  let agentEvents, runId;

  before(async () => {
    addr = sharedClickHouse();
    db = `netra_an_${process.pid}_${Date.now()}`;
    await chQuery(addr, `CREATE DATABASE ${db}`);
    dir = scratch('tables');
    srv = await startNetra({
      env: {
        CLICKHOUSE_URL: `http://default:@${addr}/${db}`,
        NETRA_SPOOL_DIR: `${dir}/spool`,
        NETRA_LOG_FORMAT: 'text',
      },
    });
  });

  after(async () => {
    await stopWithin(srv);
    if (db) await chQuery(addr, `DROP DATABASE IF EXISTS ${db}`);
    rmSync(dir, { recursive: true, force: true });
  });

  test('netra creates both tables (ReplacingMergeTree, event_id in the key)', async () => {
    const rows = await chRows(addr,
      `SELECT name, engine, sorting_key FROM system.tables WHERE database = '${db}' ORDER BY name`);
    assert.deepEqual(rows.map((r) => r[0]), ['netra_agent_events', 'netra_tool_calls']);
    for (const [name, engine, key] of rows) {
      assert.equal(engine, 'ReplacingMergeTree', name);
      assert.match(key, /\bevent_id\b/, `${name} ORDER BY must include event_id`);
    }
    const calls = await chRows(addr, `DESCRIBE TABLE ${db}.netra_tool_calls`);
    assert.deepEqual(calls.map((r) => [r[0], r[1]]), [
      ['event_id', 'String'], ['started_at', 'DateTime'], ['started_ms', 'UInt16'],
      ['user_id', 'String'], ['thread_id', 'String'], ['run_id', 'String'],
      ['request_id', 'String'], ['tool_name', 'String'], ['tool_call_id', 'String'],
      ['agent_name', 'String'], ['status', 'String'], ['error', 'String'],
      ['duration_ms', 'Float64'], ['arguments', 'String'],
    ]);
    const events = await chRows(addr, `DESCRIBE TABLE ${db}.netra_agent_events`);
    assert.deepEqual(events.map((r) => [r[0], r[1]]), [
      ['event_id', 'String'], ['at', 'DateTime'], ['at_ms', 'UInt16'],
      ['user_id', 'String'], ['thread_id', 'String'], ['run_id', 'String'],
      ['agent_name', 'String'], ['type', 'String'], ['tool_name', 'String'],
      ['tool_call_id', 'String'], ['data', 'String'],
    ]);
  });

  test('tool calls and agent events arrive with identity, outcome, timing and redacted arguments', async () => {
    const t0 = Math.floor(Date.now() / 1000);
    const c = await Client.connect(srv.url(), { headers: { 'X-Netra-User': user } });
    const ok = await c.rpc('tools/call', { name: 'echo', arguments: { text: 'hello tables' } });
    assert.equal(ok.result.content[0].text, 'hello tables');
    // A refused call is recorded too, and its secret-looking argument is not.
    const bad = await c.rpc('tools/call', { name: 'echo', arguments: { text: 'x', password: secret, nested: { api_key: secret } } });
    assert.equal(bad.result.isError, true);
    const run = await c.rpc('agents/run', { name: 'daily_brief', input: { name: 'Tess' } });
    runId = run.result.run_id;
    await c.waitMessage((m) => m.method === 'netra/event' && m.params.run_id === runId &&
      /^agent_(completed|error)$/.test(m.params.type));
    agentEvents = c.events((e) => e.run_id === runId);
    await c.close();

    await waitAnalytics(srv, (o) => o.pending === 0 && o.delivered >= o.accepted && o.accepted >= 2 + agentEvents.length);

    const rows = await chRows(addr,
      `SELECT event_id, user_id, tool_name, status, error, duration_ms, started_at, started_ms,
              arguments, run_id, agent_name, tool_call_id, toUnixTimestamp(started_at)
       FROM ${db}.netra_tool_calls FINAL WHERE user_id = '${user}' ORDER BY started_at, started_ms`);
    const direct = rows.filter((r) => r[9] === '');
    assert.equal(direct.length, 2, JSON.stringify(rows));
    const ids = new Set(rows.map((r) => r[0]));
    assert.equal(ids.size, rows.length, 'event_id is unique per call');
    for (const r of rows) {
      assert.match(r[0], /^[0-9a-f-]{36}$/, 'event_id');
      assert.equal(r[1], user);
      assert.ok(Number(r[5]) >= 0, 'duration_ms');
      const at = Number(r[12]);
      assert.ok(at >= t0 - 5 && at <= t0 + 120, `started_at ${r[6]} is not around now`);
      assert.ok(!r[8].includes(secret) && !r[4].includes(secret), 'a secret reached ClickHouse');
    }
    const good = direct.find((r) => r[3] === 'ok');
    assert.ok(good, 'the successful call');
    assert.equal(good[2], 'echo');
    assert.deepEqual(JSON.parse(good[8]), { text: 'hello tables' });
    const refused = direct.find((r) => r[3] === 'error');
    assert.ok(refused, 'the refused call');
    assert.notEqual(refused[4], '');
    assert.deepEqual(JSON.parse(refused[8]),
      { text: 'x', password: '[REDACTED]', nested: { api_key: '[REDACTED]' } });

    // The agent's nested calls carry the run and the agent.
    const nested = rows.filter((r) => r[9] === runId);
    assert.deepEqual(nested.map((r) => r[2]).sort(), ['analytics_recent_calls', 'clock', 'echo']);
    for (const r of nested) assert.equal(r[10], 'daily_brief');

    // Every event the client saw is a row, with the same type and tool.
    const evs = await chRows(addr,
      `SELECT type, tool_name, tool_call_id, agent_name, data FROM ${db}.netra_agent_events FINAL
       WHERE run_id = '${runId}' ORDER BY at, at_ms`);
    assert.equal(evs.length, agentEvents.length);
    const key = (type, tool, id) => `${type}/${tool}/${id}`;
    assert.deepEqual(evs.map((r) => key(r[0], r[1], r[2])).sort(),
      agentEvents.map((e) => key(e.type, e.tool_name ?? '', e.tool_call_id ?? '')).sort());
    for (const r of evs) {
      assert.equal(r[3], 'daily_brief');
      assert.equal(JSON.parse(r[4]).run_id, runId);
    }
  });

  test('rows sent twice collapse under FINAL (the ReplacingMergeTree key includes event_id)', async () => {
    const before = await chNumber(addr, `SELECT count() FROM ${db}.netra_tool_calls FINAL`);
    const evBefore = await chNumber(addr, `SELECT count() FROM ${db}.netra_agent_events FINAL`);
    assert.ok(before > 0 && evBefore > 0);
    // A replay inserts identical rows again: do that by hand, with merges
    // stopped so that the duplicates stay visible without FINAL.
    await chQuery(addr, `SYSTEM STOP MERGES ${db}.netra_tool_calls`);
    await chQuery(addr, `INSERT INTO ${db}.netra_tool_calls SELECT * FROM ${db}.netra_tool_calls`);
    await chQuery(addr, `INSERT INTO ${db}.netra_agent_events SELECT * FROM ${db}.netra_agent_events`);
    assert.equal(await chNumber(addr, `SELECT count() FROM ${db}.netra_tool_calls`), 2 * before);
    assert.equal(await chNumber(addr, `SELECT count() FROM ${db}.netra_tool_calls FINAL`), before);
    assert.equal(await chNumber(addr, `SELECT count() FROM ${db}.netra_agent_events FINAL`), evBefore);
    await chQuery(addr, `SYSTEM START MERGES ${db}.netra_tool_calls`);
  });
});
