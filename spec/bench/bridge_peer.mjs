// The peer for spec/bench/bridge.sh: a Node.js WebSocket server on the ws
// package doing the same work per echo call as netra: an HS256 token
// check at the handshake, an argument check (text is a string), the two
// tool events as notifications, then the result. Loopback only.
//   node bridge_peer.mjs PORT SECRET
import { createHmac, randomUUID, timingSafeEqual } from 'node:crypto';
import { createRequire } from 'node:module';

const require = createRequire(new URL('../node/package.json', import.meta.url));
const { WebSocketServer } = require('ws');
const [port, secret] = [Number(process.argv[2]), process.argv[3]];

/** The token's subject, or null when the token is not a valid HS256 JWT. */
function verify(token) {
  const parts = (token || '').split('.');
  if (parts.length !== 3) return null;
  const sig = createHmac('sha256', secret).update(`${parts[0]}.${parts[1]}`).digest();
  const given = Buffer.from(parts[2], 'base64url');
  if (given.length !== sig.length || !timingSafeEqual(given, sig)) return null;
  try {
    const head = JSON.parse(Buffer.from(parts[0], 'base64url'));
    const claims = JSON.parse(Buffer.from(parts[1], 'base64url'));
    if (head.alg !== 'HS256' || typeof claims.sub !== 'string') return null;
    if (typeof claims.exp !== 'number' || claims.exp + 60 < Date.now() / 1000) return null;
    return claims.sub;
  } catch {
    return null;
  }
}

const wss = new WebSocketServer({
  host: '127.0.0.1',
  port,
  path: '/ws',
  maxPayload: 1 << 20,
  handleProtocols: (protocols) => (protocols.has('mcp') ? 'mcp' : false),
  verifyClient: (info, done) => {
    const url = new URL(info.req.url, 'http://x');
    const auth = info.req.headers.authorization;
    const token = auth?.startsWith('Bearer ') ? auth.slice(7) : url.searchParams.get('token');
    const user = verify(token);
    if (!user) return done(false, 401);
    info.req.user = user;
    return done(true);
  },
});

function event(user, type, extra) {
  return JSON.stringify({
    jsonrpc: '2.0', method: 'netra/event',
    params: { type, run_id: null, thread_id: null, user_id: user, agent_name: null, timestamp: new Date().toISOString(), ...extra },
  });
}

wss.on('connection', (ws, req) => {
  const user = req.user;
  ws.on('message', (data) => {
    let msg;
    try { msg = JSON.parse(data); } catch {
      ws.send('{"jsonrpc":"2.0","id":null,"error":{"code":-32700,"message":"parse error"}}');
      return;
    }
    const id = JSON.stringify(msg.id ?? null);
    const p = msg.params || {};
    if (msg.method !== 'tools/call' || p.name !== 'echo') {
      ws.send(`{"jsonrpc":"2.0","id":${id},"error":{"code":-32601,"message":"only tools/call echo"}}`);
      return;
    }
    const args = p.arguments || {};
    const callId = randomUUID();
    ws.send(event(user, 'tool_executing', { tool_name: 'echo', tool_call_id: callId, arguments: args }));
    let result;
    if (typeof args.text !== 'string') {
      result = { content: [{ type: 'text', text: 'arguments.text: expected string' }], isError: true };
    } else {
      result = { content: [{ type: 'text', text: args.text }] };
    }
    ws.send(event(user, 'tool_completed', { tool_name: 'echo', tool_call_id: callId, results: result }));
    ws.send(JSON.stringify({ jsonrpc: '2.0', id: msg.id, result }));
  });
});
wss.on('listening', () => console.error(`peer listening on 127.0.0.1:${port}`));
