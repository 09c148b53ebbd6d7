// The WebSocket bridge's connection, authentication and JSON-RPC framing,
// against a real `netra serve` and real WebSocket clients.
import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { createHmac } from 'node:crypto';
import { startNetra, Client, bin, home, waitFor } from './support.mjs';

const SECRET = 'a-test-secret-that-is-long-enough';

function token(user, { ttl = 600 } = {}) {
  return execFileSync(bin, ['token', '--user', user, '--ttl', String(ttl), '--env', 'staging'], {
    env: { ...process.env, NETRA_HOME: home, NETRA_JWT_SECRET: SECRET },
  }).toString().trim();
}

/** A token with any claims, signed with `secret` (for refusal cases). */
function craft(claims, secret = SECRET, header = { alg: 'HS256', typ: 'JWT' }) {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString('base64url');
  const body = `${b64(header)}.${b64(claims)}`;
  const sig = createHmac('sha256', secret).update(body).digest('base64url');
  return `${body}.${sig}`;
}

async function refused(url, opts) {
  try {
    const c = await Client.connect(url, opts);
    c.close();
    return 101;
  } catch (e) {
    return e.status ?? e.message;
  }
}

describe('authentication in staging', () => {
  let srv;
  before(async () => {
    srv = await startNetra({ args: ['--env', 'staging'], env: { NETRA_JWT_SECRET: SECRET, NETRA_LOG_FORMAT: 'text' } });
  });
  after(() => srv.stop());

  test('a token in the Authorization header is accepted', async () => {
    const c = await Client.connect(srv.url(), { headers: { Authorization: `Bearer ${token('alice')}` } });
    const r = await c.rpc('ping');
    assert.deepEqual(r.result, {});
    await c.close();
  });

  test('a token in the query string is accepted and never logged', async () => {
    const t = token('bob');
    const c = await Client.connect(srv.url(`?token=${t}`));
    assert.deepEqual((await c.rpc('ping')).result, {});
    await c.close();
    assert.ok(!srv.log().includes(t), 'the token appears in the log');
  });

  test('missing, malformed, wrongly signed, expired and early tokens get 401 with a logged reason', async () => {
    const now = Math.floor(Date.now() / 1000);
    const cases = [
      [{}, 'missing token'],
      [{ headers: { Authorization: 'Bearer not.a.token' } }, 'malformed'],
      [{ headers: { Authorization: `Bearer ${craft({ sub: 'carol', exp: now + 600 }, 'wrong-secret')}` } }, 'bad_signature'],
      [{ headers: { Authorization: `Bearer ${craft({ sub: 'carol', exp: now - 3600 })}` } }, 'expired'],
      [{ headers: { Authorization: `Bearer ${craft({ sub: 'carol', exp: now + 7200, nbf: now + 3600 })}` } }, 'not_yet_valid'],
      [{ headers: { Authorization: `Bearer ${craft({ sub: 'carol' })}` } }, 'exp'],
      [{ headers: { Authorization: `Bearer ${craft({ sub: 'null', exp: now + 600 })}` } }, 'placeholder'],
      [{ headers: { Authorization: `Bearer ${craft({ sub: 'dave', exp: now + 600 }, SECRET, { alg: 'none' })}` } }, 'algorithm'],
    ];
    for (const [opts, why] of cases) {
      assert.equal(await refused(srv.url(), opts), 401, why);
      const line = new RegExp(`refused a WebSocket client from 127\\.0\\.0\\.1: .*${why}`, 'i');
      await waitFor(() => line.test(srv.log()), 5000, () => `no log line for ${why}:\n${srv.log()}`);
    }
  });

  test('an unknown subprotocol is refused; none is served like mcp', async () => {
    const t = token('erin');
    const r = await refused(srv.url(`?token=${t}`), { protocols: ['graphql-ws'] });
    assert.notEqual(r, 101);
    const c = await Client.connect(srv.url(`?token=${t}`), { protocols: [] });
    assert.deepEqual((await c.rpc('ping')).result, {});
    await c.close();
  });

  test('only /ws upgrades', async () => {
    assert.equal(await refused(`ws://127.0.0.1:${srv.port}/elsewhere?token=${token('frank')}`), 404);
  });
});

describe('staging without NETRA_JWT_SECRET', () => {
  test('starts, and refuses every client', async () => {
    const srv = await startNetra({ args: ['--env', 'staging'], env: { NETRA_JWT_SECRET: '' } });
    try {
      const forged = craft({ sub: 'alice', exp: Math.floor(Date.now() / 1000) + 600 }, 'anything');
      assert.equal(await refused(srv.url(), {}), 401);
      assert.equal(await refused(srv.url(`?token=${forged}`)), 401);
    } finally {
      await srv.stop();
    }
  });
});

describe('development', () => {
  let srv;
  before(async () => {
    srv = await startNetra({ args: ['--env', 'development'], env: { NETRA_ALLOWED_ORIGINS: 'https://app.example, http://localhost:3000' } });
  });
  after(() => srv.stop());

  test('anonymous clients are named by X-Netra-User, default dev_user', async () => {
    const c = await Client.connect(srv.url(), { headers: { 'X-Netra-User': 'devon', Origin: 'http://localhost:3000' } });
    await c.rpc('ping');
    await c.close();
    assert.match(srv.log(), /opened for user devon/);
    const d = await Client.connect(srv.url(), { headers: { Origin: 'https://app.example' } });
    await d.rpc('ping');
    await d.close();
    assert.match(srv.log(), /opened for user dev_user/);
    assert.equal(await refused(srv.url(), { headers: { 'X-Netra-User': 'undefined', Origin: 'https://app.example' } }), 401);
  });

  test('an Origin outside NETRA_ALLOWED_ORIGINS gets 403', async () => {
    assert.equal(await refused(srv.url(), { headers: { Origin: 'https://evil.example' } }), 403);
  });
});

describe('JSON-RPC framing', () => {
  let srv;
  let c;
  before(async () => {
    srv = await startNetra({ args: ['--env', 'test'], env: { NETRA_MAX_MESSAGE_BYTES: '65536' } });
    c = await Client.connect(srv.url());
  });
  after(async () => { await c.close(); await srv.stop(); });

  test('initialize answers the client version when supported, else the newest', async () => {
    for (const [asked, answered] of [['2025-06-18', '2025-06-18'], ['2025-11-25', '2025-11-25'], ['2024-01-01', '2025-11-25']]) {
      const r = await c.rpc('initialize', { protocolVersion: asked, capabilities: {}, clientInfo: { name: 't', version: '1' } });
      assert.equal(r.result.protocolVersion, answered);
      assert.equal(r.result.serverInfo.name, 'netra');
      assert.ok(r.result.capabilities.tools);
    }
  });

  test('ids are echoed exactly as sent', async () => {
    c.send('{"jsonrpc":"2.0","id":12345678901234567890,"method":"ping"}');
    const big = await c.waitMessage((m) => m.__raw.includes('12345678901234567890'));
    assert.match(big.__raw, /"id":12345678901234567890[,}]/);
    c.send('{"jsonrpc":"2.0","id":"abc\\u00e9\\n","method":"ping"}');
    const str = await c.waitMessage((m) => m.id === 'abc\u00e9\n');
    assert.match(str.__raw, /"id":"abc\\u00e9\\n"/);
  });

  test('errors: -32700, -32600, -32601, -32602, and the connection stays usable', async () => {
    const cases = [
      ['{"jsonrpc":"2.0","id":1,"method":', -32700],
      ['{"jsonrpc":"2.0","id":1,"method":"ping"} trailing', -32700],
      ['[' .repeat(200) + ']'.repeat(200), -32700],
      ['[1,2,3]', -32600],
      ['"hello"', -32600],
      ['{"jsonrpc":"1.0","id":7,"method":"ping"}', -32600],
      ['{"jsonrpc":"2.0","id":{"x":1},"method":"ping"}', -32600],
      ['{"jsonrpc":"2.0","id":8,"method":"no/such"}', -32601],
      ['{"jsonrpc":"2.0","id":9,"method":"tools/call","params":{}}', -32602],
      ['{"jsonrpc":"2.0","id":10,"method":"agents/cancel","params":{"run_id":"nope"}}', -32602],
      ['{"jsonrpc":"2.0","id":11,"method":"ping","params":[1]}', -32602],
    ];
    for (const [text, code] of cases) {
      const from = c.messages.length;
      c.send(text);
      const m = await c.waitMessage((x) => x.error !== undefined, 10000, from);
      assert.equal(m.error.code, code, text.slice(0, 60));
      assert.equal(typeof m.error.message, 'string');
      assert.deepEqual((await c.rpc('ping')).result, {});
    }
  });

  test('agents/cancel of an unknown run says "run not found"', async () => {
    const r = await c.rpc('agents/cancel', { run_id: 'run-that-does-not-exist' });
    assert.equal(r.error.code, -32602);
    assert.equal(r.error.message, 'run not found');
  });
});

describe('limits', () => {
  let srv;
  before(async () => { srv = await startNetra({ args: ['--env', 'test'], env: { NETRA_MAX_MESSAGE_BYTES: '65536' } }); });
  after(() => srv.stop());

  test('an oversized message closes with 1009; others are unaffected', async () => {
    const other = await Client.connect(srv.url());
    const c = await Client.connect(srv.url());
    c.send(JSON.stringify({ jsonrpc: '2.0', id: 1, method: 'ping', params: { pad: 'x'.repeat(70000) } }));
    assert.equal((await c.closed).code, 1009);
    assert.deepEqual((await other.rpc('ping')).result, {});
    await other.close();
  });

  test('invalid UTF-8 closes with 1007', async () => {
    const c = await Client.connect(srv.url());
    // A final text frame, masked with a zero key, whose payload is not UTF-8.
    c.ws._socket.write(Buffer.from([0x81, 0x84, 0, 0, 0, 0, 0x7b, 0xff, 0xfe, 0x7d]));
    assert.equal((await c.closed).code, 1007);
  });

  test('a binary message closes with 1003', async () => {
    const c = await Client.connect(srv.url());
    c.ws.send(Buffer.from('{"jsonrpc":"2.0","id":1,"method":"ping"}'), { binary: true });
    assert.equal((await c.closed).code, 1003);
  });
});

describe('shutdown', () => {
  test('SIGTERM closes clients with 1001 and exits 0', async () => {
    const srv = await startNetra({ args: ['--env', 'test'] });
    const c = await Client.connect(srv.url());
    await c.rpc('ping');
    const [closed, exit] = await Promise.all([c.closed, srv.stop()]);
    assert.equal(closed.code, 1001);
    assert.equal(exit.code, 0);
  });
});
