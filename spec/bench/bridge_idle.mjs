// Idle connections for spec/bench/bridge.sh: opens COUNT WebSocket
// clients in batches, prints "open N" when all are open, holds them until
// its standard input closes (or HOLD seconds), then exits.
//   node bridge_idle.mjs URL SECRET COUNT [BATCH] [HOLD]
import { createHmac } from 'node:crypto';
import { createRequire } from 'node:module';

const require = createRequire(new URL('../node/package.json', import.meta.url));
const WebSocket = require('ws');
const [url, secret, count] = [process.argv[2], process.argv[3], Number(process.argv[4])];
const batch = Number(process.argv[5] || 200);
const hold = Number(process.argv[6] || 120);

function token(user) {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString('base64url');
  const body = `${b64({ alg: 'HS256', typ: 'JWT' })}.${b64({ sub: user, exp: Math.floor(Date.now() / 1000) + 3600 })}`;
  return `${body}.${createHmac('sha256', secret).update(body).digest('base64url')}`;
}

function open(i) {
  return new Promise((resolve) => {
    const ws = new WebSocket(`${url}?token=${token(`idle${i}`)}`, 'mcp', { perMessageDeflate: false });
    ws.once('open', () => resolve(ws));
    ws.once('error', (e) => resolve(e));
    ws.once('unexpected-response', (_, res) => resolve(new Error(`HTTP ${res.statusCode}`)));
  });
}

const sockets = [];
let failed = 0;
let firstError;
for (let i = 0; i < count; i += batch) {
  const got = await Promise.all(Array.from({ length: Math.min(batch, count - i) }, (_, k) => open(i + k)));
  for (const g of got) {
    if (g instanceof WebSocket) sockets.push(g);
    else { failed++; firstError ??= g.message; }
  }
}
console.log(`open ${sockets.length} failed ${failed}${firstError ? ` (${firstError})` : ''}`);
const done = () => { for (const ws of sockets) ws.terminate(); process.exit(0); };
process.stdin.on('end', done);
process.stdin.on('close', done);
process.stdin.resume();
setTimeout(done, hold * 1000);
