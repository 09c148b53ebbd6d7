// Bad input and limits with real clients: per-user admission, the bounded
// outbox of a client that does not read, ping/pong keepalive, shutdown
// with a run in flight. (Framing errors, oversize messages, invalid UTF-8
// and binary frames are in bridge_protocol.test.mjs.)
import { test, describe } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { startNetra, Client, waitFor, httpStatus } from './support.mjs';
import { testHome, waitObserved, runEnd } from './testhome.mjs';

const as = (srv, user) => Client.connect(srv.url(), { headers: { 'X-Netra-User': user } });

function rssKb(pid) {
  const m = readFileSync(`/proc/${pid}/status`, 'utf8').match(/VmRSS:\s+(\d+) kB/);
  return Number(m[1]);
}

describe('admission', () => {
  test('a user over NETRA_MAX_INFLIGHT_PER_USER gets -32000 busy; another user is unaffected', async () => {
    const srv = await startNetra({ env: { NETRA_HOME: testHome(), NETRA_MAX_INFLIGHT_PER_USER: '2', NETRA_WORKERS: '2' } });
    try {
      const a = await as(srv, 'alice');
      const b = await as(srv, 'bob');
      const slow = [a.rpc('tools/call', { name: 'slow', arguments: { ms: 4000 } }),
        a.rpc('tools/call', { name: 'slow', arguments: { ms: 4000 } })];
      await waitFor(() => a.events((e) => e.type === 'tool_executing' && e.tool_name === 'slow').length === 2);
      const third = await a.rpc('tools/call', { name: 'echo', arguments: { text: 'x' } });
      assert.equal(third.error?.code, -32000, JSON.stringify(third));
      assert.match(third.error.message, /busy/);
      const run = await a.rpc('agents/run', { name: 'daily_brief', input: {} });
      assert.equal(run.error?.code, -32000);
      // Another user is admitted and served.
      const other = await b.rpc('tools/call', { name: 'echo', arguments: { text: 'bob here' } });
      assert.equal(other.result.content[0].text, 'bob here');
      for (const r of await Promise.all(slow)) assert.equal(r.result.content[0].text, 'slept');
      // Once they finished, alice is admitted again.
      const again = await a.rpc('tools/call', { name: 'echo', arguments: { text: 'again' } });
      assert.equal(again.result.content[0].text, 'again');
      await a.close();
      await b.close();
    } finally {
      await srv.stop();
    }
  });
});

describe('bounded outbox', () => {
  test('a client that never reads is closed with a logged reason; memory stays bounded; others go on', async () => {
    // ASan's quarantine would keep freed memory resident; keep it small.
    const asan = `${process.env.ASAN_OPTIONS ?? ''}:quarantine_size_mb=4`;
    const srv = await startNetra({ env: { NETRA_HOME: testHome(), NETRA_MAX_OUTBOX_BYTES: '65536', ASAN_OPTIONS: asan } });
    try {
      const other = await as(srv, 'olga');
      const c = await as(srv, 'sloth');
      await c.rpc('ping');
      const before = rssKb(srv.proc.pid);
      // Up to 8000 x 8 KiB = 62 MiB of events for a client that reads nothing:
      // the kernel's socket buffers fill first, then netra's outbox.
      c.send({ jsonrpc: '2.0', id: 'run', method: 'agents/run', params: { name: 'chatty', input: { kb: 8, count: 8000, gap_ms: 1 } } });
      c.ws._socket.pause();
      await waitFor(() => /closing connection \d+: \d+ bytes queued for a client that does not read \(limit 65536\)/.test(srv.log()),
        20000, () => srv.log());
      await waitObserved(srv.port, (o) => o.runs_in_flight === 0 && o.connections === 1, 20000);
      const after = rssKb(srv.proc.pid);
      assert.ok(after - before < 20 * 1024, `VmRSS grew from ${before} kB to ${after} kB`);
      c.ws._socket.resume();
      const closed = await c.closed;
      assert.ok([1006, 1008].includes(closed.code), `closed with ${closed.code}`);
      assert.match(srv.log(), /closed; 1 request\(s\) cancelled/);
      // Another client is served all along.
      assert.deepEqual((await other.rpc('ping')).result, {});
      const r = await other.rpc('tools/call', { name: 'big', arguments: { kb: 32 } });
      assert.equal(r.result.content[0].text.length, 32 * 1024);
      await other.close();
    } finally {
      await srv.stop();
    }
  });

  test('a client that reads is never closed, even when one result and its event exceed the limit', async () => {
    const srv = await startNetra({ env: { NETRA_HOME: testHome(), NETRA_MAX_OUTBOX_BYTES: '65536' } });
    try {
      const c = await as(srv, 'reader');
      // Each call queues tool_completed (40 KiB) and the result (40 KiB)
      // at once: 80 KiB over a 64 KiB limit, for a client that reads.
      for (let i = 0; i < 50; i++) {
        const r = await c.rpc('tools/call', { name: 'big', arguments: { kb: 40 } });
        assert.equal(r.result.content[0].text.length, 40 * 1024);
      }
      assert.equal(c.ws.readyState, 1);
      assert.doesNotMatch(srv.log(), /does not read/);
      await c.close();
    } finally {
      await srv.stop();
    }
  });

  test('a slow reader of large tool results is closed too', async () => {
    const srv = await startNetra({ env: { NETRA_HOME: testHome(), NETRA_MAX_OUTBOX_BYTES: '65536' } });
    try {
      const c = await as(srv, 'sloth');
      await c.rpc('ping');
      c.ws._socket.pause();
      for (let i = 0; i < 1000; i++) c.send({ jsonrpc: '2.0', id: i, method: 'tools/call', params: { name: 'big', arguments: { kb: 16 } } });
      await waitFor(() => /bytes queued for a client that does not read/.test(srv.log()), 20000, () => srv.log());
      await waitObserved(srv.port, (o) => o.connections === 0 || o.runs_in_flight === 0, 20000);
      c.ws._socket.resume();
      await c.closed;
    } finally {
      await srv.stop();
    }
  });
});

describe('large messages', () => {
  test('requests and results far larger than one frame buffer round-trip intact', async () => {
    const srv = await startNetra({ env: { NETRA_HOME: testHome() } });
    try {
      const c = await as(srv, 'ada');
      const text = 'é'.repeat(150000) + 'end';
      const r = await c.rpc('tools/call', { name: 'echo', arguments: { text } });
      assert.equal(r.result.content[0].text, text);
      const big = await c.rpc('tools/call', { name: 'big', arguments: { kb: 900 } });
      assert.equal(big.result.content[0].text.length, 900 * 1024);
      await c.close();
    } finally {
      await srv.stop();
    }
  });
});

describe('ping/pong', () => {
  test('NETRA_WS_PING_S keeps an idle client alive and drops one that stops answering', async () => {
    const srv = await startNetra({ env: { NETRA_WS_PING_S: '1' } });
    try {
      const idle = await as(srv, 'idle');
      let pings = 0;
      idle.ws.on('ping', () => { pings++; });
      const mute = await as(srv, 'mute');
      await mute.rpc('ping');
      mute.ws._socket.pause();
      const t0 = Date.now();
      // The mute client is dropped within a bounded time (ping + 10 s).
      await waitObserved(srv.port, (o) => o.connections === 1, 30000);
      const dropped = Date.now() - t0;
      assert.ok(dropped >= 1000, `dropped after ${dropped} ms`);
      assert.ok(pings >= 2, `idle client got ${pings} pings`);
      // The idle one answered every ping and is still served.
      assert.deepEqual((await idle.rpc('ping')).result, {});
      assert.equal(idle.ws.readyState, 1);
      mute.ws._socket.resume();
      await mute.closed;
      await idle.close();
    } finally {
      await srv.stop();
    }
  });
});

describe('shutdown', () => {
  test('SIGTERM with a run in flight: agent_error (cancelled) after the grace, then 1001, exit 0', async () => {
    const srv = await startNetra({ env: { NETRA_HOME: testHome(), NETRA_SHUTDOWN_GRACE_MS: '1000' } });
    const c = await as(srv, 'ada');
    const { result } = await c.rpc('agents/run', { name: 'wait', input: { ms: 60000 } });
    await c.waitMessage((m) => m.params?.type === 'agent_thinking');
    const t0 = Date.now();
    const stopped = srv.stop();
    // During the grace a new request is refused; the run goes on.
    await waitFor(async () => (await httpStatus(srv.port, '/health/ready')) === 503, 5000, () => srv.log());
    const late = await c.rpc('agents/run', { name: 'daily_brief', input: {} });
    assert.equal(late.error?.code, -32000, JSON.stringify(late));
    assert.match(late.error.message, /shutting down/);
    const [closed, exit] = await Promise.all([c.closed, stopped]);
    assert.ok(Date.now() - t0 < 10000);
    assert.equal(closed.code, 1001);
    assert.equal(exit.code, 0);
    const evs = c.events((e) => e.run_id === result.run_id);
    assert.equal(evs.at(-1).type, 'agent_error', JSON.stringify(evs.map((e) => e.type)));
    assert.equal(evs.at(-1).error.code, 'cancelled');
    assert.match(srv.log(), /cancelling 1 request\(s\) still running after the grace period/);
  });

  test('SIGTERM: a run that ends within the grace completes', async () => {
    const srv = await startNetra({ env: { NETRA_HOME: testHome(), NETRA_SHUTDOWN_GRACE_MS: '5000' } });
    const c = await as(srv, 'ada');
    const { result } = await c.rpc('agents/run', { name: 'wait', input: { ms: 800 } });
    await c.waitMessage((m) => m.params?.type === 'agent_thinking');
    const [closed, exit] = await Promise.all([c.closed, srv.stop()]);
    assert.equal(closed.code, 1001);
    assert.equal(exit.code, 0);
    const end = c.events((e) => e.run_id === result.run_id).at(-1);
    assert.equal(end.type, 'agent_completed');
  });
});
