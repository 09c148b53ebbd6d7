// ClickHouse killed (kill -9) and restarted in the middle of traffic,
// with a private server: every call still gets its result at once (a
// request never waits for ClickHouse), and once the spool has drained
// ClickHouse holds each answered call and each agent event exactly once.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { rmSync } from 'node:fs';
import { startNetra, Client, waitFor } from './support.mjs';
import {
  EchoClient, chRows, checkExactlyOnce, echoLoop, echoTexts, newBooks, privateClickHouse,
  scratch, sleep, waitAnalytics,
  stopWithin,
} from './analytics_support.mjs';

const N = 1500;
const ch = privateClickHouse('outage-ch');
const dir = scratch('outage');
let srv;

after(async () => {
  await stopWithin(srv);
  await ch.remove();
  rmSync(dir, { recursive: true, force: true });
});

/** Runs daily_brief once; resolves with the events the client saw. */
async function agentRun(c) {
  try {
    const r = await c.rpc('agents/run', { name: 'daily_brief', input: {} });
    const runId = r.result.run_id;
    await c.waitMessage((m) => m.method === 'netra/event' && m.params.run_id === runId &&
      /^agent_(completed|error)$/.test(m.params.type), 30000);
    return { runId, events: c.events((e) => e.run_id === runId) };
  } catch (e) {
    throw new Error(`agent run: ${e.message.slice(0, 300)}\nnetra's log:\n${srv.log().slice(-4000)}`);
  }
}

test('kill -9 of ClickHouse mid-traffic: every call answered, every event delivered once', async () => {
  await ch.start();
  srv = await startNetra({
    env: { CLICKHOUSE_URL: ch.url, NETRA_SPOOL_DIR: `${dir}/spool`, NETRA_LOG_FORMAT: 'text' },
  });
  const tag = `${process.pid}`;
  const users = [0, 1, 2].map((i) => `outage_${tag}_${i}`);
  const agentUser = `outage_${tag}_agent`;
  const books = newBooks();
  let started = 0;
  const limit = () => started++ < N;
  const clients = await Promise.all(users.map((u) => EchoClient.connect(srv.url(), u)));
  const traffic = Promise.all(clients.map((c) => echoLoop(c, books, { tag: 't', window: 4, limit, pauseMs: 40 })));
  const agent = await Client.connect(srv.url(), { headers: { 'X-Netra-User': agentUser } });
  const runs = [await agentRun(agent)];

  // Kill ClickHouse a third of the way in, bring it back at two thirds.
  await waitFor(() => books.answered.size >= N / 3, 60000, () => 'traffic stalled');
  await ch.kill();
  const atKill = books.answered.size;
  runs.push(await agentRun(agent));
  await sleep(1500);
  await waitFor(() => books.answered.size >= (2 * N) / 3 || started >= N, 60000,
    () => `traffic stalled while ClickHouse was down (${books.answered.size} answered)`);
  runs.push(await agentRun(agent));
  const atRestart = books.answered.size;
  await ch.start();
  await traffic;
  runs.push(await agentRun(agent));
  await agent.close();
  for (const c of clients) c.close();

  assert.deepEqual(books.errors.slice(0, 3), [], 'calls failed');
  assert.equal(books.lost.size, 0, 'calls without an answer');
  assert.equal(books.answered.size, N);
  assert.ok(atRestart > atKill, `no call was answered while ClickHouse was down (${atKill} -> ${atRestart})`);
  assert.match(srv.log(), /ClickHouse is not taking events/);

  await waitAnalytics(srv, (o) => o.pending === 0 && o.accepted > N, 90000, 'the spool to drain');
  const texts = await echoTexts(ch.addr, users);
  const counts = checkExactlyOnce(assert, texts, books);
  assert.equal(counts.rows, N, 'rows for the answered calls');

  for (const { runId, events } of runs) {
    const rows = await chRows(ch.addr,
      `SELECT type, tool_call_id FROM netra_agent_events FINAL WHERE run_id = '${runId}'`);
    assert.equal(rows.length, events.length, `events of run ${runId}`);
    assert.deepEqual(rows.map((r) => `${r[0]}/${r[1]}`).sort(),
      events.map((e) => `${e.type}/${e.tool_call_id ?? ''}`).sort());
  }
});
