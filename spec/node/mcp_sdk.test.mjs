// The official MCP TypeScript SDK client (pinned in package-lock.json)
// connects to netra over its WebSocket transport, with the token in the
// query string, lists the tools and calls echo.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { WebSocket as WsWebSocket } from 'ws';
import { Client } from '@modelcontextprotocol/sdk/client/index.js';
import { WebSocketClientTransport } from '@modelcontextprotocol/sdk/client/websocket.js';
import { startNetra, bin, home } from './support.mjs';

const SECRET = 'mcp-sdk-test-secret-0123456789';
let srv;

before(async () => {
  // Node 20 has no global WebSocket without a flag: the SDK's transport
  // uses the `ws` package's class instead.
  globalThis.WebSocket ??= WsWebSocket;
  srv = await startNetra({ args: ['--env', 'staging'], env: { NETRA_JWT_SECRET: SECRET } });
});
after(() => srv.stop());

test('the SDK client connects, lists tools and calls echo', async () => {
  const token = execFileSync(bin, ['token', '--user', 'sdk_user', '--env', 'staging'], {
    env: { ...process.env, NETRA_HOME: home, NETRA_JWT_SECRET: SECRET },
  }).toString().trim();
  const client = new Client({ name: 'netra-spec', version: '1.0.0' });
  await client.connect(new WebSocketClientTransport(new URL(srv.url(`?token=${token}`))));
  assert.equal(client.getServerVersion().name, 'netra');

  const { tools } = await client.listTools();
  const names = tools.map((t) => t.name);
  assert.ok(names.includes('echo'), `tools: ${names}`);
  const echo = tools.find((t) => t.name === 'echo');
  assert.equal(echo.inputSchema.type, 'object');

  const result = await client.callTool({ name: 'echo', arguments: { text: 'hello from the SDK' } });
  assert.equal(result.isError ?? false, false);
  assert.deepEqual(result.content, [{ type: 'text', text: 'hello from the SDK' }]);

  const bad = await client.callTool({ name: 'echo', arguments: { text: 42 } });
  assert.equal(bad.isError, true);
  assert.match(bad.content[0].text, /arguments\.text: expected string/);
  await client.close();
});
