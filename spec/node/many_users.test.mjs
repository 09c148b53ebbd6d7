// The main job on real input: `netra serve` as the README starts it, 50
// users connected at once, each running agents and calling tools
// concurrently. Every event a client receives is its own, and every run
// ends exactly once.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { startNetra, Client } from './support.mjs';
import { runEnd } from './testhome.mjs';

const USERS = 50;
const RUNS = 2;
const CALLS = 3;

test('50 users at once: own events only, every run ends exactly once', { timeout: 120000 }, async () => {
  const srv = await startNetra({ args: ['--env', 'development'] });
  try {
    const clients = await Promise.all(Array.from({ length: USERS }, (_, i) =>
      Client.connect(srv.url(), { headers: { 'X-Netra-User': `user${i}` } })));

    const perClient = await Promise.all(clients.map(async (c, i) => {
      const runs = [];
      const work = [];
      for (let k = 0; k < RUNS; k++) {
        work.push(c.rpc('agents/run', { name: 'daily_brief', input: { name: `U${i}R${k}` } }, {}).then((r) => {
          assert.ok(r.result, `user${i}: ${JSON.stringify(r.error)}`);
          runs.push(r.result.run_id);
        }));
      }
      for (let k = 0; k < CALLS; k++) {
        work.push(c.rpc('tools/call', { name: 'echo', arguments: { text: `u${i}-${k}` } }).then((r) => {
          assert.equal(r.result.content[0].text, `u${i}-${k}`);
        }));
        work.push(c.rpc('tools/call', { name: 'clock', arguments: {} }).then((r) => {
          assert.match(r.result.structuredContent.time, /Z$/);
        }));
      }
      await Promise.all(work);
      await Promise.all(runs.map((id) => runEnd(c, id, 60000)));
      return runs;
    }));
    await new Promise((r) => setTimeout(r, 300));

    const allRuns = new Set(perClient.flat());
    assert.equal(allRuns.size, USERS * RUNS);
    clients.forEach((c, i) => {
      const user = `user${i}`;
      const mine = new Set(perClient[i]);
      const evs = c.events();
      for (const e of evs) {
        assert.equal(e.user_id, user, `user${i} got ${JSON.stringify(e)}`);
        if (e.run_id !== null) assert.ok(mine.has(e.run_id), `user${i} got run ${e.run_id}`);
      }
      for (const id of mine) {
        const runEvs = evs.filter((e) => e.run_id === id);
        const ends = runEvs.filter((e) => e.type === 'agent_completed' || e.type === 'agent_error');
        assert.equal(ends.length, 1, `run ${id} ended ${ends.length} times`);
        assert.equal(runEvs.at(-1), ends[0]);
        assert.equal(runEvs[0].type, 'agent_started');
        assert.equal(ends[0].type, 'agent_completed', JSON.stringify(ends[0]));
      }
      // Bare echo calls: exactly this user's texts.
      const echoed = evs.filter((e) => e.type === 'tool_executing' && e.tool_name === 'echo' && e.run_id === null)
        .map((e) => e.arguments.text).sort();
      assert.deepEqual(echoed, Array.from({ length: CALLS }, (_, k) => `u${i}-${k}`));
    });
    await Promise.all(clients.map((c) => c.close()));
  } finally {
    const exit = await srv.stop();
    assert.equal(exit.code, 0);
  }
  assert.doesNotMatch(srv.log(), /AddressSanitizer|runtime error|\berror\b.*\[bridge\]/);
});
