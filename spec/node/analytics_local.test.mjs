// The analytics spool's bound and lock, and local mode (ClickHouse
// disabled): with ClickHouse unreachable and a small NETRA_SPOOL_MAX_BYTES
// calls still answer and the excess is dropped, counted and logged once;
// a second netra on the same spool directory is refused, naming the
// holder's pid; without ClickHouse, events are JSON lines in
// NETRA_EVENTS_FILE, rotated at NETRA_EVENTS_ROTATE_BYTES.
import { test, describe, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { existsSync, readdirSync, readFileSync, rmSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { startNetra, Client, bin, home, waitFor } from './support.mjs';
import { EchoClient, analyticsHealth, echoLoop, newBooks, scratch, waitAnalytics, stopWithin } from './analytics_support.mjs';

// Nothing listens on the discard port of the loopback: ClickHouse is down.
const DOWN = 'http://default:@127.0.0.1:9/default';
const dir = scratch('local');
after(() => rmSync(dir, { recursive: true, force: true }));

describe('the spool', () => {
  test('past NETRA_SPOOL_MAX_BYTES calls still answer; events are dropped, counted, logged once', async () => {
    const N = 600;
    const spool = join(dir, 'bounded');
    const srv = await startNetra({
      env: { CLICKHOUSE_URL: DOWN, NETRA_SPOOL_DIR: spool, NETRA_SPOOL_MAX_BYTES: '65536', NETRA_LOG_FORMAT: 'text' },
    });
    try {
      const c = await EchoClient.connect(srv.url(), `bound_${process.pid}`);
      const books = newBooks();
      let started = 0;
      await echoLoop(c, books, { tag: 'b', window: 8, limit: () => started++ < N });
      c.close();
      assert.equal(books.answered.size, N, 'every call answered');

      const seen = await waitAnalytics(srv, (o) => o.accepted + o.dropped >= N, 30000, 'every event counted');
      const o = seen.observed;
      assert.equal(o.accepted + o.dropped, N);
      assert.ok(o.dropped > 0 && o.accepted > 0, JSON.stringify(o));
      assert.equal(o.pending, o.accepted, 'everything accepted waits in the spool');
      assert.equal(seen.status, 'degraded');
      assert.match(seen.message, /dropped/);
      const drops = srv.log().split('\n').filter((l) => /dropping events/.test(l));
      assert.equal(drops.length, 1, `logged once, not per event:\n${drops.join('\n')}`);
      assert.match(drops[0], /spool is full/);
      assert.match(drops[0], /NETRA_SPOOL_MAX_BYTES/);
      const bytes = readdirSync(spool).filter((f) => f.endsWith('.spool'))
        .reduce((n, f) => n + statSync(join(spool, f)).size, 0);
      assert.ok(bytes <= 65536, `the segments take ${bytes} bytes`);
    } finally {
      await stopWithin(srv);
    }
  });

  test('a second netra on the same spool directory is refused, naming the holder', async () => {
    const spool = join(dir, 'locked');
    const env = { CLICKHOUSE_URL: DOWN, NETRA_SPOOL_DIR: spool, NETRA_LOG_FORMAT: 'text' };
    const first = await startNetra({ env });
    try {
      await assert.rejects(startNetra({ env }), (e) => {
        assert.match(e.message, /process exited/);
        assert.match(e.message, new RegExp(`spool directory ${spool} is in use by another process ` +
          `\\(pid ${first.proc.pid}, per ${spool}/spool.lock\\)`));
        assert.match(e.message, /stop that netra instance or give this one its own NETRA_SPOOL_DIR/);
        assert.doesNotMatch(e.message, /to a writable path/);
        assert.match(e.message, /startup refused/);
        return true;
      });
      // The first one is untouched.
      assert.equal((await analyticsHealth(first)).observed.mode, 'clickhouse');
    } finally {
      await stopWithin(first);
    }
  });
});

const SECRET = 'a-test-secret-that-is-long-enough';
const ADMIN = 'an-admin-token-for-health-details';
function token(user) {
  return execFileSync(bin, ['token', '--user', user, '--ttl', '600', '--env', 'staging'], {
    env: { ...process.env, NETRA_HOME: home, NETRA_JWT_SECRET: SECRET },
  }).toString().trim();
}

/** Every line of the events file and its rotated copies, parsed. */
function eventLines(file) {
  const base = file.split('/').pop();
  const d = file.slice(0, -base.length - 1);
  const files = readdirSync(d).filter((f) => f === base || /^\d+$/.test(f.slice(base.length + 1)) && f.startsWith(`${base}.`));
  return { files, lines: files.flatMap((f) => readFileSync(join(d, f), 'utf8').split('\n').filter((l) => l).map((l) => JSON.parse(l))) };
}

describe('local mode (staging without ClickHouse)', () => {
  test('events are JSON lines in the events file, rotated at NETRA_EVENTS_ROTATE_BYTES, never spooled', async () => {
    const state = join(dir, 'state');
    const env = {
      NETRA_JWT_SECRET: SECRET, NETRA_ADMIN_TOKEN: ADMIN, NETRA_LOG_FORMAT: 'text', NETRA_STATE_DIR: state,
      NETRA_EVENTS_ROTATE_BYTES: '4096',
    };
    const srv = await startNetra({ args: ['--env', 'staging'], env });
    srv.adminToken = ADMIN;
    const file = join(state, `events-${srv.port}.jsonl`);
    const user = `local_${process.pid}`;
    const calls = 20;
    let runId, runEvents;
    try {
      const h = await analyticsHealth(srv);
      assert.equal(h.observed.mode, 'local');
      assert.match(h.message, /ClickHouse disabled/);
      assert.equal(srv.log().match(/ClickHouse disabled: events go to the local JSON-lines file/)?.length, 1);

      const c = await Client.connect(srv.url(), { headers: { Authorization: `Bearer ${token(user)}` } });
      for (let i = 0; i < calls; i++) {
        const r = await c.rpc('tools/call', { name: 'echo', arguments: { text: `local ${i}` } });
        assert.equal(r.result.content[0].text, `local ${i}`);
      }
      const bad = await c.rpc('tools/call', { name: 'echo', arguments: { text: 's', token: 'sekrit-value' } });
      assert.equal(bad.result.isError, true);
      const run = await c.rpc('agents/run', { name: 'daily_brief', input: {} });
      runId = run.result.run_id;
      await c.waitMessage((m) => m.method === 'netra/event' && m.params.run_id === runId &&
        /^agent_(completed|error)$/.test(m.params.type));
      runEvents = c.events((e) => e.run_id === runId);
      await c.close();
      await waitAnalytics(srv, (o) => o.accepted === calls + 1 + 3 + runEvents.length, 20000, 'every event written');
    } finally {
      await stopWithin(srv);
    }

    const { files, lines } = eventLines(file);
    assert.ok(files.includes(`events-${srv.port}.jsonl.1`), `rotated: ${files}`);
    for (const f of files) assert.ok(statSync(join(state, f)).size <= 4096, `${f} is over the rotation size`);
    const toolLines = lines.filter((l) => l.table === 'netra_tool_calls');
    const eventLinesOfRun = lines.filter((l) => l.table === 'netra_agent_events');
    for (const l of toolLines) {
      assert.equal(l.user_id, user);
      assert.ok(l.tool_name, 'tool name');
      assert.ok(l.event_id, 'event id');
    }
    assert.deepEqual(toolLines.filter((l) => !l.run_id && l.status === 'ok').map((l) => JSON.parse(l.arguments).text).sort(),
      Array.from({ length: calls }, (_, i) => `local ${i}`).sort());
    const refused = toolLines.find((l) => !l.run_id && l.status === 'error');
    assert.deepEqual(JSON.parse(refused.arguments), { text: 's', token: '[REDACTED]' });
    assert.ok(!lines.some((l) => JSON.stringify(l).includes('sekrit-value')), 'a secret reached the events file');
    assert.deepEqual(toolLines.filter((l) => l.run_id === runId).map((l) => l.tool_name).sort(),
      ['analytics_recent_calls', 'clock', 'echo']);
    assert.deepEqual(eventLinesOfRun.map((l) => l.event.type).sort(), runEvents.map((e) => e.type).sort());
    for (const l of eventLinesOfRun) assert.equal(l.event.user_id, user);
    assert.ok(!readdirSync(state).some((f) => f.startsWith('spool')), 'local mode made a spool');

    // Another start in local mode appends to its own file; nothing is replayed.
    const before = lines.length;
    const again = await startNetra({ args: ['--env', 'staging'], env: { ...env, NETRA_EVENTS_FILE: file } });
    again.adminToken = ADMIN;
    await waitFor(async () => (await analyticsHealth(again)).observed.mode === 'local');
    await stopWithin(again);
    assert.equal(eventLines(file).lines.length, before);
    assert.ok(!existsSync(join(state, `spool-${again.port}`)));
  });
});
