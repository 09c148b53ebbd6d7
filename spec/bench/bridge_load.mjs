// Load for spec/bench/bridge.sh: CONNS WebSocket clients, each its own
// user with an HS256 token, each calling tools/call echo in a closed loop
// for SECONDS; prints one JSON line: calls, calls/s, p50 and p99 in ms.
//   node bridge_load.mjs URL SECRET SECONDS CONNS
import { createHmac } from 'node:crypto';
import { createRequire } from 'node:module';

const require = createRequire(new URL('../node/package.json', import.meta.url));
const WebSocket = require('ws');
const [url, secret, seconds, conns] = [process.argv[2], process.argv[3], Number(process.argv[4]), Number(process.argv[5])];

export function token(user, key) {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString('base64url');
  const body = `${b64({ alg: 'HS256', typ: 'JWT' })}.${b64({ sub: user, exp: Math.floor(Date.now() / 1000) + 3600 })}`;
  return `${body}.${createHmac('sha256', key).update(body).digest('base64url')}`;
}

function open(i) {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(`${url}?token=${token(`bench${i}`, secret)}`, 'mcp');
    ws.once('open', () => resolve(ws));
    ws.once('error', reject);
    ws.once('unexpected-response', (_, res) => reject(new Error(`HTTP ${res.statusCode}`)));
  });
}

const sockets = await Promise.all(Array.from({ length: conns }, (_, i) => open(i)));
const latencies = [];
let stop = false;
let failures = 0;
const loops = sockets.map((ws, i) => new Promise((resolve) => {
  let n = 0;
  let sent = 0;
  const send = () => {
    if (stop) { resolve(); return; }
    n++;
    sent = performance.now();
    ws.send(`{"jsonrpc":"2.0","id":${n},"method":"tools/call","params":{"name":"echo","arguments":{"text":"hello ${i}"}}}`);
  };
  ws.on('message', (data) => {
    const text = data.toString();
    if (!text.startsWith('{"jsonrpc":"2.0","id":')) return; // an event
    const msg = JSON.parse(text);
    if (msg.id !== n) return;
    if (!msg.result || msg.result.content[0].text !== `hello ${i}`) failures++;
    latencies.push(performance.now() - sent);
    send();
  });
  ws.on('close', () => { stop = true; resolve(); });
  send();
}));
const t0 = performance.now();
await new Promise((r) => setTimeout(r, seconds * 1000));
stop = true;
await Promise.race([Promise.all(loops), new Promise((r) => setTimeout(r, 5000))]);
const elapsed = (performance.now() - t0) / 1000;
for (const ws of sockets) ws.terminate();
latencies.sort((a, b) => a - b);
const pct = (p) => latencies[Math.min(latencies.length - 1, Math.floor(latencies.length * p))] ?? NaN;
console.log(JSON.stringify({
  calls: latencies.length, failures, rps: latencies.length / elapsed,
  p50_ms: pct(0.5), p99_ms: pct(0.99),
}));
process.exit(0);
