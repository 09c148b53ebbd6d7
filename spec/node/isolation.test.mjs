// Users are isolated: each connection receives only its own requests'
// events, a user cannot cancel another user's run, and one user may hold
// several connections.
import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startNetra, Client } from './support.mjs';
import { testHome, runEnd } from './testhome.mjs';

const as = (srv, user) => Client.connect(srv.url(), { headers: { 'X-Netra-User': user } });

describe('isolation between users', () => {
  let srv;
  before(async () => { srv = await startNetra({ env: { NETRA_HOME: testHome(), NETRA_WORKERS: '2' } }); });
  after(() => srv.stop());

  test('two users at once: each connection gets only its own events', async () => {
    const a = await as(srv, 'alice');
    const b = await as(srv, 'bob');
    const runsA = [];
    const runsB = [];
    const work = [];
    for (let i = 0; i < 5; i++) {
      work.push(a.rpc('agents/run', { name: 'daily_brief', input: { name: `A${i}` } }).then((r) => runsA.push(r.result.run_id)));
      work.push(b.rpc('agents/run', { name: 'daily_brief', input: { name: `B${i}` } }).then((r) => runsB.push(r.result.run_id)));
      work.push(a.rpc('tools/call', { name: 'echo', arguments: { text: `a${i}` } }));
      work.push(b.rpc('tools/call', { name: 'echo', arguments: { text: `b${i}` } }));
    }
    await Promise.all(work);
    await Promise.all([...runsA.map((id) => runEnd(a, id)), ...runsB.map((id) => runEnd(b, id))]);
    await new Promise((r) => setTimeout(r, 200));

    for (const [c, user, mine, other, letter] of [[a, 'alice', runsA, runsB, 'a'], [b, 'bob', runsB, runsA, 'b']]) {
      const evs = c.events();
      assert.ok(evs.length >= 5 * 8, `${user} got ${evs.length} events`);
      for (const e of evs) {
        assert.equal(e.user_id, user);
        if (e.run_id !== null) assert.ok(mine.includes(e.run_id), `${user} saw run ${e.run_id}`);
        assert.ok(!other.includes(e.run_id));
      }
      // Bare echo calls: only this user's texts.
      const texts = evs.filter((e) => e.type === 'tool_executing' && e.tool_name === 'echo' && e.run_id === null)
        .map((e) => e.arguments.text);
      assert.deepEqual(texts.sort(), [0, 1, 2, 3, 4].map((i) => `${letter}${i}`));
      const greetings = evs.filter((e) => e.type === 'agent_completed').map((e) => e.result.greeting);
      assert.equal(greetings.length, 5);
      for (const g of greetings) assert.match(g, new RegExp(`Hello ${letter.toUpperCase()}\\d`));
    }
    await a.close();
    await b.close();
  });

  test("user B naming user A's run in agents/cancel gets -32602 run not found; A's run goes on", async () => {
    const a = await as(srv, 'alice');
    const b = await as(srv, 'bob');
    const { result } = await a.rpc('agents/run', { name: 'wait', input: { ms: 1500 } });
    const r = await b.rpc('agents/cancel', { run_id: result.run_id });
    assert.equal(r.error.code, -32602);
    assert.equal(r.error.message, 'run not found');
    const end = await runEnd(a, result.run_id);
    assert.equal(end.params.type, 'agent_completed');
    assert.equal(b.events().length, 0);
    await a.close();
    await b.close();
  });

  test('two connections of the same user work side by side; either may cancel the run', async () => {
    const a1 = await as(srv, 'carol');
    const a2 = await as(srv, 'carol');
    const [r1, r2] = await Promise.all([
      a1.rpc('agents/run', { name: 'daily_brief', input: {} }),
      a2.rpc('agents/run', { name: 'daily_brief', input: {} }),
    ]);
    await runEnd(a1, r1.result.run_id);
    await runEnd(a2, r2.result.run_id);
    // Events go to the connection that started the run.
    assert.ok(a1.events().every((e) => e.run_id === r1.result.run_id));
    assert.ok(a2.events().every((e) => e.run_id === r2.result.run_id));

    const { result } = await a1.rpc('agents/run', { name: 'wait', input: { ms: 60000 } });
    await a1.waitMessage((m) => m.params?.type === 'agent_thinking' && m.params.run_id === result.run_id);
    assert.deepEqual((await a2.rpc('agents/cancel', { run_id: result.run_id })).result, {});
    const end = await runEnd(a1, result.run_id, 10000);
    assert.equal(end.params.error.code, 'cancelled');
    assert.ok(a2.events().every((e) => e.run_id !== result.run_id));
    await a1.close();
    await a2.close();
  });

  test('notifications/cancelled reaches only the same connection\'s call', async () => {
    const a = await as(srv, 'dan');
    const b = await as(srv, 'erin');
    // Same request id on two connections; b cancels its own only.
    a.send({ jsonrpc: '2.0', id: 'same', method: 'tools/call', params: { name: 'slow', arguments: { ms: 800 } } });
    b.send({ jsonrpc: '2.0', id: 'same', method: 'tools/call', params: { name: 'slow', arguments: { ms: 30000 } } });
    await new Promise((r) => setTimeout(r, 200));
    b.send({ jsonrpc: '2.0', method: 'notifications/cancelled', params: { requestId: 'same', reason: 'enough' } });
    const rb = await b.waitMessage((m) => m.id === 'same', 10000);
    assert.equal(rb.result.isError, true);
    assert.match(rb.result.content[0].text, /cancel/);
    const ra = await a.waitMessage((m) => m.id === 'same', 10000);
    assert.equal(ra.result.content[0].text, 'slept');
    await a.close();
    await b.close();
  });
});
