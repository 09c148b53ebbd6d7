// kill -9 of netra in the middle of traffic, and restarts on the same
// spool directory, with a private ClickHouse: a call whose result a
// client received is in ClickHouse exactly once, however often netra died
// (its record is written ahead before the result is sent; a batch sent
// again after a crash collapses under FINAL).
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { rmSync } from 'node:fs';
import { startNetra } from './support.mjs';
import {
  EchoClient, checkExactlyOnce, echoLoop, echoTexts, newBooks, privateClickHouse, scratch,
  sleep, waitAnalytics,
  stopWithin,
} from './analytics_support.mjs';
import { waitFor } from './support.mjs';

const ch = privateClickHouse('crash-ch');
const dir = scratch('crash');
const servers = [];

after(async () => {
  for (const s of servers) await s.kill();
  await ch.remove();
  rmSync(dir, { recursive: true, force: true });
});

async function netra(spool) {
  const s = await startNetra({
    env: { CLICKHOUSE_URL: ch.url, NETRA_SPOOL_DIR: spool, NETRA_LOG_FORMAT: 'text' },
  });
  servers.push(s);
  return s;
}

test('three kill -9 of netra at random moments under traffic: answered calls arrive exactly once', async (t) => {
  await ch.start();
  const spool = `${dir}/spool-a`;
  const users = [0, 1, 2].map((i) => `crash_${process.pid}_${i}`);
  const books = newBooks();
  for (let round = 0; round < 3; round++) {
    const srv = await netra(spool);
    const clients = await Promise.all(users.map((u) => EchoClient.connect(srv.url(), u)));
    const before = books.answered.size;
    const traffic = Promise.all(clients.map((c) =>
      echoLoop(c, books, { tag: `r${round}`, window: 4, limit: () => true, pauseMs: 2 })));
    await waitFor(() => books.answered.size >= before + 100, 30000, () => 'traffic stalled');
    await sleep(200 + Math.floor(Math.random() * 1500));
    await srv.kill();
    await traffic;
    t.diagnostic(`round ${round}: ${books.answered.size - before} answered, ${books.lost.size} lost so far`);
  }
  assert.deepEqual(books.errors.slice(0, 3), []);

  const srv = await netra(spool);
  const seen = await waitAnalytics(srv, (o) => o.pending === 0, 90000, 'the spool to drain');
  t.diagnostic(`after restart: ${JSON.stringify(seen.observed)}`);
  const counts = checkExactlyOnce(assert, await echoTexts(ch.addr, users), books);
  t.diagnostic(`ClickHouse FINAL rows ${counts.rows}, answered ${counts.answered}, ` +
    `written but unanswered ${counts.extra} (of ${books.lost.size} in flight at the kills)`);
  assert.ok(counts.rows >= books.answered.size);
  await stopWithin(srv);
});

test('ClickHouse down, calls, kill -9 of netra, ClickHouse up, netra again: all calls arrive', async () => {
  const N = 300;
  const spool = `${dir}/spool-b`;
  const users = [`crash_${process.pid}_down`];
  const books = newBooks();
  if (!ch.port) await ch.start(); // the test above may not have got that far
  await ch.stop();
  const srv = await netra(spool);
  const c = await EchoClient.connect(srv.url(), users[0]);
  let started = 0;
  await echoLoop(c, books, { tag: 'down', window: 8, limit: () => started++ < N });
  assert.equal(books.answered.size, N, 'every call answered while ClickHouse is down');
  await waitAnalytics(srv, (o) => o.accepted === N && o.pending === N, 30000, 'all calls spooled');
  await srv.kill();

  await ch.start();
  const again = await netra(spool);
  await waitAnalytics(again, (o) => o.pending === 0, 90000, 'the spool to drain');
  const counts = checkExactlyOnce(assert, await echoTexts(ch.addr, users), books);
  assert.equal(counts.rows, N);
  await stopWithin(again);
});
