// A damaged spool (a flipped byte in one record, another segment cut off
// in the middle of a record), with a private ClickHouse: on restart the
// damage is reported with the file and offset and counted in the
// `analytics` component, and every undamaged record is replayed - exactly
// the records that were not hit, worked out from the segment files.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { readdirSync, readFileSync, rmSync, truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { startNetra } from './support.mjs';
import {
  EchoClient, chRows, echoLoop, newBooks, privateClickHouse, scratch, waitAnalytics,
  stopWithin,
} from './analytics_support.mjs';

const ch = privateClickHouse('damage-ch');
const dir = scratch('damage');
const spool = join(dir, 'spool');
let srv;

after(async () => {
  await srv?.kill();
  await ch.remove();
  rmSync(dir, { recursive: true, force: true });
});

/** The records of a segment file (doc/spool.md): offset, length, event_id. */
function records(path) {
  const buf = readFileSync(path);
  assert.equal(buf.toString('latin1', 0, 8), 'NETRASPL', `${path} header`);
  const out = [];
  for (let off = 32; off + 32 <= buf.length;) {
    assert.equal(buf.toString('latin1', off, off + 4), 'NSRC', `${path} record at ${off}`);
    const len = buf.readUInt32LE(off + 4);
    const payload = buf.toString('utf8', off + 32, off + 32 + len);
    out.push({ off, len, eventId: payload.split('\t')[0] });
    off += 32 + len;
  }
  return out;
}

/** Makes n echo calls as user with netra up and ClickHouse down, then stops netra. */
async function spoolCalls(user, n, env) {
  srv = await startNetra({ env });
  const c = await EchoClient.connect(srv.url(), user);
  const books = newBooks();
  let started = 0;
  await echoLoop(c, books, { tag: 'd', window: 4, limit: () => started++ < n });
  assert.equal(books.answered.size, n);
  await waitAnalytics(srv, (o) => o.pending === n, 30000, `${n} events pending`);
  c.close();
  await stopWithin(srv);
  srv = undefined;
}

test('a flipped byte and a truncated segment: reported, counted, everything else replayed', async () => {
  await ch.start();
  await ch.stop(); // down, with its port kept for later
  const env = { CLICKHOUSE_URL: ch.url, NETRA_SPOOL_DIR: spool, NETRA_LOG_FORMAT: 'text' };
  const users = [`damage_${process.pid}_a`, `damage_${process.pid}_b`];
  await spoolCalls(users[0], 40, env);
  await spoolCalls(users[1], 40, env);

  const segs = readdirSync(spool).filter((f) => /^seg-\d+\.spool$/.test(f)).sort()
    .map((f) => ({ path: join(spool, f), recs: records(join(spool, f)) }))
    .filter((s) => s.recs.length);
  assert.equal(segs.length, 2, 'one segment per netra start');
  const all = segs.flatMap((s) => s.recs.map((r) => r.eventId));
  assert.equal(all.length, 80);

  // Flip one byte in the middle of the payload of the 11th record of the first segment.
  const [a, b] = segs;
  const hit = a.recs[10];
  const bytes = readFileSync(a.path);
  bytes[hit.off + 32 + Math.floor(hit.len / 2)] ^= 0x20;
  writeFileSync(a.path, bytes);
  // Cut the second segment in the middle of its 26th record.
  const cut = b.recs[25];
  truncateSync(b.path, cut.off + 32 + Math.floor(cut.len / 2));
  const damaged = new Set([hit.eventId, ...b.recs.slice(25).map((r) => r.eventId)]);
  assert.equal(damaged.size, 16);

  await ch.start();
  srv = await startNetra({ env });
  const seen = await waitAnalytics(srv, (o) => o.pending === 0 && o.corrupt > 0, 90000,
    'the spool to drain with the damage counted');
  assert.ok(seen.observed.corrupt >= 2, JSON.stringify(seen.observed));
  const log = srv.log();
  assert.ok(log.includes(`${a.path} at offset ${hit.off}`), `no report for ${a.path} at ${hit.off}:\n${log}`);
  assert.ok(log.includes(`${b.path} at offset ${cut.off}`), `no report for ${b.path} at ${cut.off}:\n${log}`);

  const rows = await chRows(ch.addr,
    `SELECT event_id FROM netra_tool_calls FINAL WHERE user_id IN ('${users[0]}', '${users[1]}')`);
  const got = rows.map((r) => r[0]).sort();
  const expected = all.filter((id) => !damaged.has(id)).sort();
  assert.equal(got.length, 80 - 16);
  assert.deepEqual(got, expected);
});
